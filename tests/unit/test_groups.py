"""Unit tests for socialvpn/groups.py: documents, allocation, signing, update rules, link plans."""

from __future__ import annotations

import ast
import base64
import copy
import dataclasses
import hashlib
import ipaddress
import json
import random
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from socialvpn import groups
from socialvpn.errors import ProtocolError
from socialvpn.groups import (
    MAX_CANONICAL_BYTES,
    MAX_DEVICES_PER_MEMBER,
    MAX_DOCUMENT_BYTES,
    MAX_MEMBERS,
    Device,
    LinkPlan,
    MembershipDocument,
    SignedDocument,
    accept_update,
    add_device,
    check_document,
    create_group,
    default_subnet4,
    ip6_for,
    link_plans,
    new_gid,
    prefix6_for,
    remove_device,
    remove_member,
    sign,
    validate_group_name,
    validate_subnet4,
    verify,
)
from socialvpn.keys import DeviceKeys, b64, device_id_of

pytestmark = pytest.mark.unit

FUZZ = settings(max_examples=5000, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- helpers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Info:
    """A DeviceInfoLike, as presence carries it."""

    id: str
    name: str
    key: str
    sign: str


def device_keys(seed: str) -> DeviceKeys:
    x = hashlib.sha256(b"x" + seed.encode()).digest()
    return DeviceKeys(x, hashlib.sha256(b"e" + seed.encode()).digest())


def info_of(keys: DeviceKeys, name: str = "laptop") -> Info:
    return Info(keys.device_id, name, b64(keys.x25519_public), b64(keys.ed25519_public))


def fake_info(seed: str, name: str = "dev") -> Info:
    """A device with made-up public keys (any 32 bytes do for ids and addresses)."""
    x = hashlib.sha256(b"fx" + seed.encode()).digest()
    return Info(device_id_of(x), name, b64(x), b64(hashlib.sha256(b"fe" + seed.encode()).digest()))


def rng_from(seed: str):
    def rng(n: int) -> bytes:
        return hashlib.sha256(seed.encode()).digest()[:n]
    return rng


OWNER = device_keys("owner")
OTHER_OWNER = device_keys("other-owner")
BOB = device_keys("bob-laptop")
BOB_PHONE = device_keys("bob-phone")
CAROL = device_keys("carol")
OWNER_INFO, BOB_INFO, BOB_PHONE_INFO, CAROL_INFO = (
    info_of(OWNER, "owner-box"), info_of(BOB), info_of(BOB_PHONE, "phone"), info_of(CAROL))
PIN = b64(OWNER.ed25519_public)


def new_group(name: str = "lab", subnet4: str | None = None, seed: str = "g1",
              owner: DeviceKeys = OWNER, owner_jid: str = "alice@example.org"
              ) -> MembershipDocument:
    return create_group(name=name, owner_jid=owner_jid, owner=info_of(owner, "owner-box"),
                        rng=rng_from(seed), subnet4=subnet4)


def populated() -> MembershipDocument:
    doc = new_group()
    doc = add_device(doc, "bob@example.org", BOB_INFO)
    doc = add_device(doc, "bob@example.org", BOB_PHONE_INFO)
    return add_device(doc, "carol@example.net", CAROL_INFO)


DOC = populated()
SIGNED = sign(DOC, OWNER.sign)
WIRE = SIGNED.to_wire()


def raw_sign(doc: MembershipDocument, keys: DeviceKeys = OWNER) -> SignedDocument:
    """Sign without the checks of groups.sign: what a broken or hostile owner could send."""
    return SignedDocument(doc, keys.sign(doc.canonical()))


def with_device(doc: MembershipDocument, jid: str, old_id: str, new: Device,
                **changes: object) -> MembershipDocument:
    members = {j: tuple(new if d.id == old_id else d for d in ds) for j, ds in doc.members.items()}
    if jid not in members:
        members[jid] = (new,)
    return dataclasses.replace(doc, members=members, **changes)


# -- create, sign, verify ------------------------------------------------------------------------


def test_create_group_owner_first_usable_and_epoch_one() -> None:
    doc = new_group()
    assert doc.epoch == 1
    assert doc.gid == hashlib.sha256(b"g1").digest()[:16].hex()
    assert doc.owner == OWNER.device_id
    assert doc.owner_sign_key == PIN
    assert doc.subnet4 == default_subnet4(doc.gid)
    assert doc.prefix6 == prefix6_for(doc.gid)
    [(jid, dev)] = doc.devices()
    assert jid == "alice@example.org" and dev.id == OWNER.device_id
    assert dev.ip4 == str(ipaddress.IPv4Network(doc.subnet4).network_address + 1)
    assert doc.member_jids() == ["alice@example.org"]


def test_create_group_normalizes_jid_and_takes_custom_subnet() -> None:
    doc = new_group(subnet4="192.168.7.0/29", owner_jid="Alice@Example.ORG")
    assert doc.owner_jid == "Alice@example.org"
    assert doc.subnet4 == "192.168.7.0/29"
    assert doc.device(OWNER.device_id) == ("Alice@example.org", doc.devices()[0][1])
    assert doc.devices()[0][1].ip4 == "192.168.7.1"


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "Lab"}, "group name"),
    ({"subnet4": "8.8.8.0/24"}, "private"),
    ({"owner_jid": "alice@example.org/laptop"}, "bare JID"),
])
def test_create_group_refuses_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        new_group(**kwargs)


def test_create_group_refuses_device_id_not_matching_key() -> None:
    bad = dataclasses.replace(OWNER_INFO, id=BOB.device_id)
    with pytest.raises(ValueError, match="does not match"):
        create_group(name="lab", owner_jid="alice@example.org", owner=bad, rng=rng_from("x"))


def test_new_gid_uses_rng() -> None:
    assert new_gid(lambda n: bytes(range(n))) == bytes(range(16)).hex()
    with pytest.raises(ValueError):
        new_gid(lambda n: b"short")


def test_sign_verify_round_trip() -> None:
    assert verify(SIGNED) == DOC
    assert verify(SIGNED, PIN) == DOC
    parsed = SignedDocument.from_wire(WIRE)
    assert parsed == SIGNED
    assert accept_update(None, PIN, parsed) == DOC
    assert MembershipDocument.from_json(DOC.to_json()) == DOC
    assert MembershipDocument.from_json(json.loads(json.dumps(DOC.to_json()))) == DOC


def test_sign_refuses_other_key_and_malformed_doc() -> None:
    with pytest.raises(ValueError, match="owner"):
        sign(DOC, BOB.sign)
    with pytest.raises(ValueError, match="64-byte"):
        sign(DOC, lambda data: b"x")
    broken = dataclasses.replace(DOC, epoch=0)
    with pytest.raises(ValueError, match="epoch"):
        sign(broken, OWNER.sign)


def test_documents_are_values() -> None:
    again = populated()
    assert again == DOC and hash(again) == hash(DOC)
    with pytest.raises(TypeError):
        DOC.members["x@y.z"] = ()  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        DOC.epoch = 9  # type: ignore[misc]


# -- canonical form ------------------------------------------------------------------------------


def test_canonical_shape() -> None:
    data = DOC.canonical()
    assert data.startswith(b'{"epoch":4,"gid":"')
    assert b'"v":0' in data
    assert b" " not in data and b"\n" not in data
    assert data == json.dumps(json.loads(data), sort_keys=True, separators=(",", ":"),
                              ensure_ascii=False).encode()
    assert len(data) <= MAX_CANONICAL_BYTES


def test_canonical_stable_golden() -> None:
    # Fixed keys and rng: a change here breaks every signature already made.
    assert hashlib.sha256(DOC.canonical()).hexdigest() == GOLDEN


GOLDEN = "511ed5af9c01653930e67cfd63c2bdfb7df998c52ef6e48994c3236853f7c518"


def test_canonical_independent_of_dict_and_list_order() -> None:
    data = DOC.to_json()
    shuffled = dict(reversed(list(data.items())))
    shuffled["members"] = dict(reversed(list(data["members"].items())))
    for devs in shuffled["members"].values():
        for i, d in enumerate(devs):
            devs[i] = dict(reversed(list(d.items())))
    assert MembershipDocument.from_json(shuffled).canonical() == DOC.canonical()
    built = MembershipDocument(
        gid=DOC.gid, name=DOC.name, owner=DOC.owner, owner_jid=DOC.owner_jid,
        owner_sign_key=DOC.owner_sign_key, epoch=DOC.epoch, subnet4=DOC.subnet4,
        prefix6=DOC.prefix6,
        members={j: tuple(reversed(ds)) for j, ds in reversed(list(DOC.members.items()))},
    )
    assert built == DOC and built.canonical() == DOC.canonical()
    assert verify(SignedDocument(built, SIGNED.signature), PIN) == DOC


def test_non_ascii_jid_is_utf8_in_canonical() -> None:
    doc = add_device(new_group(), "jürgen@example.de", BOB_INFO)
    assert "jürgen@example.de".encode() in doc.canonical()
    wire = sign(doc, OWNER.sign).to_wire()
    assert SignedDocument.from_wire(wire).doc == doc


# -- allocation ----------------------------------------------------------------------------------


def ip4s(doc: MembershipDocument) -> dict[str, str]:
    return {d.id: d.ip4 for _, d in doc.devices()}


def test_allocation_lowest_free_and_stable() -> None:
    doc = new_group(subnet4="10.1.2.0/24")
    assert ip4s(DOC)[OWNER.device_id].endswith(".1")
    doc = add_device(doc, "bob@example.org", BOB_INFO)
    doc = add_device(doc, "bob@example.org", BOB_PHONE_INFO)
    doc = add_device(doc, "carol@example.net", CAROL_INFO)
    assert doc.epoch == 4
    assert ip4s(doc) == {OWNER.device_id: "10.1.2.1", BOB.device_id: "10.1.2.2",
                         BOB_PHONE.device_id: "10.1.2.3", CAROL.device_id: "10.1.2.4"}
    assert [d.id for d in doc.members["bob@example.org"]] == sorted(
        [BOB.device_id, BOB_PHONE.device_id])
    before = ip4s(doc)
    doc = remove_device(doc, BOB.device_id)
    assert doc.epoch == 5
    assert ip4s(doc) == {k: v for k, v in before.items() if k != BOB.device_id}
    dave = fake_info("dave")
    doc = add_device(doc, "dave@example.com", dave)
    assert ip4s(doc)[dave.id] == "10.1.2.2"          # the freed address is reused
    doc = remove_member(doc, "carol@example.net")
    assert "carol@example.net" not in doc.members
    assert ip4s(doc)[BOB_PHONE.device_id] == "10.1.2.3" and ip4s(doc)[dave.id] == "10.1.2.2"
    check_document(doc)


def test_allocation_full_subnet() -> None:
    doc = new_group(subnet4="10.9.9.8/29")           # hosts .9-.14, owner .9
    for i in range(5):
        doc = add_device(doc, f"u{i}@example.org", fake_info(f"full{i}"))
    assert sorted(ip4s(doc).values(), key=ipaddress.IPv4Address) == [
        f"10.9.9.{i}" for i in range(9, 15)]
    with pytest.raises(ValueError, match="full"):
        add_device(doc, "late@example.org", fake_info("late"))
    doc = remove_member(doc, "u2@example.org")
    doc = add_device(doc, "late@example.org", fake_info("late"))
    assert ip4s(doc)[fake_info("late").id] == "10.9.9.12"    # u2's, the lowest free
    assert "10.9.9.8" not in ip4s(doc).values() and "10.9.9.15" not in ip4s(doc).values()


def test_add_same_device_again_refused() -> None:
    with pytest.raises(ValueError, match="already a member"):
        add_device(DOC, "bob@example.org", BOB_INFO)
    with pytest.raises(ValueError, match="already a member"):
        add_device(DOC, "mallory@example.org", BOB_INFO)
    with pytest.raises(ValueError, match="already a member"):
        add_device(DOC, "alice@example.org", OWNER_INFO)


def test_add_device_refuses_bad_device() -> None:
    with pytest.raises(ValueError, match="does not match"):
        add_device(DOC, "eve@example.org", dataclasses.replace(fake_info("e"), id="a" * 16))
    with pytest.raises(ValueError, match="key"):
        add_device(DOC, "eve@example.org", dataclasses.replace(fake_info("e"), sign="nope"))
    with pytest.raises(ValueError):
        add_device(DOC, "eve@example.org", fake_info("e", name="bad name!"))
    with pytest.raises(ValueError, match="bare JID"):
        add_device(DOC, "not a jid", fake_info("e"))


def test_remove_rules() -> None:
    with pytest.raises(ValueError, match="owns"):
        remove_member(DOC, "alice@example.org")
    with pytest.raises(ValueError, match="owns"):
        remove_device(DOC, OWNER.device_id)
    with pytest.raises(ValueError, match="not a member"):
        remove_member(DOC, "nobody@example.org")
    with pytest.raises(ValueError, match="not a member"):
        remove_device(DOC, "a" * 16)
    doc = remove_device(DOC, CAROL.device_id)         # carol's last device: her JID goes too
    assert doc.member_jids() == ["alice@example.org", "bob@example.org"]


def test_device_and_member_limits() -> None:
    doc = new_group()
    for i in range(MAX_DEVICES_PER_MEMBER):
        doc = add_device(doc, "many@example.org", fake_info(f"m{i}"))
    with pytest.raises(ValueError, match=str(MAX_DEVICES_PER_MEMBER)):
        add_device(doc, "many@example.org", fake_info("one-more"))
    doc = new_group(subnet4="10.20.0.0/16")
    owner = doc.devices()[0]
    members: dict[str, tuple[Device, ...]] = {owner[0]: (owner[1],)}
    net = ipaddress.IPv4Network(doc.subnet4)
    for i in range(MAX_MEMBERS - 1):
        f = fake_info(f"mm{i}", name="d")
        members[f"u{i}@x.io"] = (Device(f.id, f.name, f.key, f.sign, str(net[i + 2])),)
    full = dataclasses.replace(doc, members=members)
    check_document(full)
    with pytest.raises(ValueError, match=str(MAX_MEMBERS)):
        add_device(full, "new@x.io", fake_info("new"))
    assert add_device(full, "u0@x.io", fake_info("new")).epoch == 2
    wire = sign(full, OWNER.sign).to_wire()
    assert len(wire) <= MAX_DOCUMENT_BYTES
    over = json.loads(wire)
    over["doc"]["members"]["extra@x.io"] = []
    with pytest.raises(ProtocolError) as exc:
        MembershipDocument.from_json(over["doc"])
    assert exc.value.reason == "oversize"


def test_document_size_limit() -> None:
    doc = new_group(subnet4="10.20.0.0/16")
    long_local = "x" * 1000
    i = 0
    with pytest.raises(ValueError, match="exceed"):
        while True:
            doc = add_device(doc, f"{long_local}{i}@example.org", fake_info(f"big{i}"))
            i += 1
    assert len(sign(doc, OWNER.sign).to_wire()) <= MAX_DOCUMENT_BYTES
    too_big = b'{"doc":' + b" " * MAX_DOCUMENT_BYTES + b"}"
    with pytest.raises(ProtocolError) as exc:
        SignedDocument.from_wire(too_big)
    assert exc.value.reason == "oversize"


# -- names and addresses -------------------------------------------------------------------------


def test_default_subnet4_deterministic() -> None:
    gid = DOC.gid
    h = hashlib.sha256(gid.encode()).digest()
    assert default_subnet4(gid) == f"10.{64 + h[0] % 64}.{h[1]}.0/24"
    for i in range(200):
        gid = hashlib.sha256(str(i).encode()).hexdigest()[:32]
        net = ipaddress.IPv4Network(default_subnet4(gid))
        assert net.subnet_of(ipaddress.IPv4Network("10.64.0.0/10")) and net.prefixlen == 24
        assert validate_subnet4(str(net)) == str(net)
    with pytest.raises(ValueError):
        default_subnet4("ABC")


def test_prefix6_ula_deterministic() -> None:
    gid = DOC.gid
    h = hashlib.sha256(gid.encode()).digest()
    net = ipaddress.IPv6Network(prefix6_for(gid))
    assert net.prefixlen == 64
    assert net.network_address.packed == b"\xfd" + h[:5] + bytes(10)
    assert net.subnet_of(ipaddress.IPv6Network("fd00::/8"))
    assert prefix6_for(gid) == str(net) == prefix6_for(gid)
    assert prefix6_for("0" * 32) != prefix6_for("0" * 31 + "1")
    with pytest.raises(ValueError):
        prefix6_for("g" * 32)


def test_ip6_for_deterministic_and_inside_prefix() -> None:
    prefix = DOC.prefix6
    for _, dev in DOC.devices():
        addr = ipaddress.IPv6Address(ip6_for(prefix, dev.key))
        assert addr in ipaddress.IPv6Network(prefix)
        raw = base64_key(dev.key)
        assert int(addr) & (2**64 - 1) == int.from_bytes(hashlib.sha256(raw).digest()[:8], "big")
        assert DOC.ip6_of(dev) == str(addr)
    assert len({DOC.ip6_of(d) for _, d in DOC.devices()}) == len(DOC.devices())
    with pytest.raises(ValueError):
        ip6_for("fd00::/48", BOB_INFO.key)
    with pytest.raises(ValueError):
        ip6_for(prefix, "short")


def base64_key(text: str) -> bytes:
    return base64.b64decode(text)


def test_ip6_for_skips_reserved_interface_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    real = hashlib.sha256
    calls = []

    def fake_sha256(data: bytes = b"") -> object:
        calls.append(data)
        if len(calls) == 1:
            return types.SimpleNamespace(digest=lambda: bytes(32))           # all-zero: anycast
        if len(calls) == 2:
            return types.SimpleNamespace(digest=lambda: b"\xfd" + b"\xff" * 31)  # RFC 5453
        return real(data)

    monkeypatch.setattr(groups, "hashlib", types.SimpleNamespace(sha256=fake_sha256))
    addr = ipaddress.IPv6Address(ip6_for("fd00:1:2:3::/64", BOB_INFO.key))
    iid = int(addr) & (2**64 - 1)
    assert len(calls) == 3 and iid != 0 and not groups._reserved_iid(iid)


@pytest.mark.parametrize("iid, reserved", [
    (0, True), (1, False), (0xFDFF_FFFF_FFFF_FF7F, False), (0xFDFF_FFFF_FFFF_FF80, True),
    (0xFDFF_FFFF_FFFF_FFFF, True), (0x0200_5EFF_FE00_5213, True), (0x0200_5EFF_FF00_0000, False),
])
def test_reserved_iid(iid: int, reserved: bool) -> None:
    assert groups._reserved_iid(iid) is reserved


@pytest.mark.parametrize("name", ["a", "lab", "home-net", "a123456789", "x-"])
def test_group_name_ok(name: str) -> None:
    assert validate_group_name(name) == name
    assert len("svpn-" + name) <= 15


@pytest.mark.parametrize("name", ["", "1lab", "-lab", "Lab", "lab_1", "a1234567890", "lab.x",
                                  "läb", " lab", "lab\n"])
def test_group_name_refused(name: str) -> None:
    with pytest.raises(ValueError, match="group name"):
        validate_group_name(name)


@pytest.mark.parametrize("cidr, canonical", [
    ("10.77.0.0/24", "10.77.0.0/24"), ("192.168.5.8/29", "192.168.5.8/29"),
    ("172.16.0.0/16", "172.16.0.0/16"), ("100.64.1.0/24", "100.64.1.0/24"),
    ("10.1.0.0/255.255.0.0", "10.1.0.0/16"),
])
def test_subnet4_ok(cidr: str, canonical: str) -> None:
    assert validate_subnet4(cidr) == canonical


@pytest.mark.parametrize("cidr", ["8.8.8.0/24", "10.0.0.0/8", "10.0.0.0/15", "10.0.0.0/30",
                                  "10.0.0.1/24", "172.32.0.0/16", "100.128.0.0/24", "garbage",
                                  "fd00::/64", "10.0.0.0", "", "010.0.0.0/24"])
def test_subnet4_refused(cidr: str) -> None:
    with pytest.raises(ValueError, match="subnet"):
        validate_subnet4(cidr)


# -- accept_update -------------------------------------------------------------------------------


def test_accept_update_valid_sequence() -> None:
    v1 = new_group()
    cur = accept_update(None, PIN, sign(v1, OWNER.sign))
    v2 = add_device(v1, "bob@example.org", BOB_INFO)
    cur = accept_update(cur, PIN, sign(v2, OWNER.sign))
    v4 = add_device(add_device(v2, "carol@example.net", CAROL_INFO), "d@x.io", fake_info("d"))
    cur = accept_update(cur, PIN, sign(v4, OWNER.sign))   # epochs may be skipped
    v5 = remove_member(v4, "bob@example.org")
    assert accept_update(cur, PIN, sign(v5, OWNER.sign)) == v5


def expect(reason: str, current: MembershipDocument | None, signed: SignedDocument,
           pin: str = PIN) -> None:
    with pytest.raises(ProtocolError) as exc:
        accept_update(current, pin, signed)
    assert exc.value.reason == reason, exc.value


def test_refuses_bad_signature() -> None:
    sig = bytearray(SIGNED.signature)
    sig[5] ^= 1
    expect("signature", None, SignedDocument(DOC, bytes(sig)))
    expect("signature", None, SignedDocument(DOC, b""))
    expect("signature", None, SignedDocument(dataclasses.replace(DOC, name="lab2"),
                                             SIGNED.signature))


def test_refuses_older_or_equal_epoch() -> None:
    older = sign(remove_member(DOC, "carol@example.net"), OWNER.sign)
    current = dataclasses.replace(DOC, epoch=10)
    expect("stale", current, older)
    expect("stale", older.doc, SIGNED)
    expect("stale", DOC, SIGNED)
    expect("stale", current, sign(dataclasses.replace(DOC, epoch=10), OWNER.sign))


def test_refuses_unpinned_owner_key() -> None:
    expect("owner-key", None, SIGNED, pin=b64(OTHER_OWNER.ed25519_public))
    expect("owner-key", DOC, SIGNED, pin=b64(OTHER_OWNER.ed25519_public))


def test_refuses_changed_gid() -> None:
    other = add_device(add_device(add_device(add_device(new_group(seed="g2"), "b@x.io",
                                                        fake_info("1")), "b@x.io",
                                             fake_info("2")), "b@x.io", fake_info("3")),
                       "b@x.io", fake_info("4"))
    assert other.gid != DOC.gid and other.epoch > DOC.epoch
    expect("gid", DOC, sign(other, OWNER.sign))


def test_member_key_swapped_in_transit() -> None:
    mallory = info_of(device_keys("mallory"))
    bob = DOC.device(BOB.device_id)[1]
    swapped = Device(mallory.id, bob.name, mallory.key, mallory.sign, bob.ip4)
    tampered = with_device(DOC, "bob@example.org", BOB.device_id, swapped)
    check_document(tampered)                      # well formed: only the signature tells
    expect("signature", DOC, SignedDocument(tampered, SIGNED.signature))
    expect("signature", None, SignedDocument(tampered, SIGNED.signature))
    # the same through the wire: a relaying member edits the JSON
    obj = json.loads(WIRE)
    for d in obj["doc"]["members"]["bob@example.org"]:
        if d["id"] == BOB.device_id:
            d.update(id=mallory.id, key=mallory.key, sign=mallory.sign)
    obj["doc"]["members"]["bob@example.org"].sort(key=lambda d: d["id"])
    parsed = SignedDocument.from_wire(json.dumps(obj).encode())
    expect("signature", DOC, parsed)
    # re-signed by someone else who also claims ownership: the pin refuses it
    owner = DOC.device(OWNER.device_id)[1]
    forged = with_device(tampered, "alice@example.org", OWNER.device_id,
                         dataclasses.replace(owner, sign=b64(OTHER_OWNER.ed25519_public)),
                         owner_sign_key=b64(OTHER_OWNER.ed25519_public), epoch=DOC.epoch + 1)
    signed = sign(forged, OTHER_OWNER.sign)
    assert verify(signed) == forged               # valid on its own ...
    expect("owner-key", DOC, signed)              # ... but not by the pinned owner
    expect("owner-key", None, signed)


def test_refuses_ip4_change_of_staying_device() -> None:
    bob = DOC.device(BOB.device_id)[1]
    moved = with_device(DOC, "bob@example.org", BOB.device_id,
                        dataclasses.replace(bob, ip4=_free_ip4(DOC)), epoch=DOC.epoch + 1)
    expect("address", DOC, sign(moved, OWNER.sign))
    # a device removed and re-added with a new address is fine once we saw the removal
    removed = remove_device(DOC, BOB.device_id)
    cur = accept_update(DOC, PIN, sign(removed, OWNER.sign))
    readded = add_device(add_device(removed, "x@x.io", fake_info("fill")), "bob@example.org",
                         BOB_INFO)
    assert readded.device(BOB.device_id)[1].ip4 != bob.ip4
    accept_update(cur, PIN, sign(readded, OWNER.sign))


def _free_ip4(doc: MembershipDocument) -> str:
    used = set(ip4s(doc).values())
    return next(str(a) for a in ipaddress.IPv4Network(doc.subnet4).hosts() if str(a) not in used)


def test_refuses_identity_owner_and_subnet_changes() -> None:
    bob = DOC.device(BOB.device_id)[1]
    resigned = with_device(DOC, "bob@example.org", BOB.device_id,
                           dataclasses.replace(bob, sign=b64(CAROL.ed25519_public)),
                           epoch=DOC.epoch + 1)
    expect("identity", DOC, sign(resigned, OWNER.sign))
    members = {j: tuple(d for d in ds if d.id != BOB.device_id)
               for j, ds in DOC.members.items()}
    members["mallory@example.org"] = (bob,)
    moved_account = dataclasses.replace(DOC, members=members, epoch=DOC.epoch + 1)
    expect("identity", DOC, sign(moved_account, OWNER.sign))
    subnet = dataclasses.replace(new_group(subnet4="10.5.5.0/24"), epoch=DOC.epoch + 1)
    assert subnet.gid == DOC.gid
    expect("address", DOC, sign(subnet, OWNER.sign))
    # another device of the owner's, same signing key, claims ownership of the same gid
    x = hashlib.sha256(b"second owner device").digest()
    second = Info(device_id_of(x), "box2", b64(x), PIN)
    coup = create_group(name="lab", owner_jid="alice@example.org", owner=second,
                        rng=rng_from("g1"), subnet4=DOC.subnet4)
    coup = dataclasses.replace(coup, epoch=DOC.epoch + 1)
    expect("owner", DOC, sign(coup, OWNER.sign))
    accept_update(None, PIN, sign(coup, OWNER.sign))


@pytest.mark.parametrize("breakage", ["duplicate-ip4", "outside-subnet", "network-address",
                                      "id-not-key", "owner-not-first", "owner-sign-mismatch",
                                      "duplicate-device", "prefix6", "epoch-zero", "empty-member",
                                      "jid-resource", "jid-case"])
def test_refuses_malformed_signed_documents(breakage: str) -> None:
    bob = DOC.device(BOB.device_id)[1]
    carol = DOC.device(CAROL.device_id)[1]
    owner = DOC.device(OWNER.device_id)[1]
    net = ipaddress.IPv4Network(DOC.subnet4)
    up = {"epoch": DOC.epoch + 1}
    if breakage == "duplicate-ip4":
        doc = with_device(DOC, "carol@example.net", carol.id,
                          dataclasses.replace(carol, ip4=bob.ip4), **up)
    elif breakage == "outside-subnet":
        doc = with_device(DOC, "carol@example.net", carol.id,
                          dataclasses.replace(carol, ip4="192.168.1.1"), **up)
    elif breakage == "network-address":
        doc = with_device(DOC, "carol@example.net", carol.id,
                          dataclasses.replace(carol, ip4=str(net.broadcast_address)), **up)
    elif breakage == "id-not-key":
        doc = with_device(DOC, "carol@example.net", carol.id,
                          dataclasses.replace(carol, id="a" * 16), **up)
    elif breakage == "owner-not-first":
        doc = with_device(DOC, "alice@example.org", owner.id,
                          dataclasses.replace(owner, ip4=str(net[200])), **up)
    elif breakage == "owner-sign-mismatch":
        doc = with_device(DOC, "alice@example.org", owner.id,
                          dataclasses.replace(owner, sign=bob.sign), **up)
    elif breakage == "duplicate-device":
        doc = with_device(DOC, "dup@example.org", "", carol, **up)
    elif breakage == "prefix6":
        doc = dataclasses.replace(DOC, prefix6="fd00::/64", **up)
    elif breakage == "epoch-zero":
        doc = dataclasses.replace(DOC, epoch=0)
    elif breakage == "empty-member":
        doc = dataclasses.replace(DOC, members={**DOC.members, "e@x.io": ()}, **up)
    elif breakage == "jid-resource":
        doc = with_device(DOC, "carol@example.net/phone", "", fake_device(DOC, "r"), **up)
    else:
        doc = with_device(DOC, "carol@EXAMPLE.net", "", fake_device(DOC, "c"), **up)
    signed = raw_sign(doc)
    expect("malformed", None, signed)
    expect("malformed", DOC, signed)
    with pytest.raises(ProtocolError) as exc:
        SignedDocument.from_wire(signed.to_wire())
    assert exc.value.reason == "malformed"


def fake_device(doc: MembershipDocument, seed: str) -> Device:
    f = fake_info(seed)
    return Device(f.id, f.name, f.key, f.sign, _free_ip4(doc))


# -- strict parsing ------------------------------------------------------------------------------


def wire_of(mutate) -> bytes:
    obj = json.loads(WIRE)
    mutate(obj)
    return json.dumps(obj).encode()


@pytest.mark.parametrize("data, reason", [
    (b"", "malformed"),
    (b"[]", "malformed"),
    (b"\xff\xfe", "malformed"),
    (b'{"doc": {}, "sig": "x"}', "malformed"),
    (WIRE.replace(b'"epoch":4', b'"epoch":NaN'), "malformed"),
    (WIRE.replace(b'"epoch":4', b'"epoch":4.0'), "malformed"),
    (WIRE.replace(b'"epoch":4', b'"epoch":true'), "malformed"),
    (WIRE.replace(b'"epoch":4', b'"epoch":' + b"9" * 5000), "malformed"),
    (WIRE.replace(b'"epoch":4', b'"epoch":4,"epoch":5'), "malformed"),
    (WIRE.replace(b'"v":0', b'"v":1'), "version"),
    (WIRE.replace(b'"v":0', b'"v":"0"'), "malformed"),
    (WIRE.replace(b'"v":0', b'"v":0,"extra":1'), "malformed"),
    (WIRE.replace(b',"v":0', b""), "malformed"),
    (WIRE[:-1] + b',"more":1}', "malformed"),
    (b"[" * 50_000, "malformed"),
    (WIRE.decode().encode("utf-16"), "malformed"),
])
def test_from_wire_refuses(data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as exc:
        SignedDocument.from_wire(data)
    assert exc.value.reason == reason


def test_from_wire_strict_shapes() -> None:
    cases = [
        lambda o: o.update(sig=o["sig"][:-4]),
        lambda o: o.update(sig=7),
        lambda o: o["doc"].update(members=[]),
        lambda o: o["doc"]["members"]["bob@example.org"].reverse(),
        lambda o: o["doc"]["members"]["bob@example.org"][0].update(extra="x"),
        lambda o: o["doc"]["members"]["bob@example.org"][0].pop("name"),
        lambda o: o["doc"]["members"]["bob@example.org"][0].update(ip4=None),
        lambda o: o["doc"].update(subnet4=o["doc"]["subnet4"].replace(".0/24", ".0/255.255.255.0")),
        lambda o: o["doc"].update(gid=o["doc"]["gid"].upper()),
        lambda o: o["doc"]["members"].update({"x\u0000y@example.org":
                                              o["doc"]["members"]["carol@example.net"]}),
        lambda o: o["doc"]["members"].update({"\ud800@example.org": []}),
    ]
    for mutate in cases:
        with pytest.raises(ProtocolError) as exc:
            SignedDocument.from_wire(wire_of(mutate))
        assert exc.value.reason == "malformed"
    many = wire_of(lambda o: o["doc"]["members"].update(
        {f"u{i}@x.io": [] for i in range(MAX_MEMBERS)}))
    with pytest.raises(ProtocolError) as exc:
        SignedDocument.from_wire(many)
    assert exc.value.reason == "oversize"
    devs = wire_of(lambda o: o["doc"]["members"].update(
        {"bob@example.org": [{}] * (MAX_DEVICES_PER_MEMBER + 1)}))
    with pytest.raises(ProtocolError) as exc:
        SignedDocument.from_wire(devs)
    assert exc.value.reason == "oversize"


@pytest.mark.parametrize("data", [None, 1, "x", [], {"v": 0}, {"v": True}, b"{}"])
def test_from_json_refuses_non_documents(data: object) -> None:
    with pytest.raises(ProtocolError):
        MembershipDocument.from_json(data)


def test_from_wire_refuses_non_bytes() -> None:
    with pytest.raises(ProtocolError):
        SignedDocument.from_wire(WIRE.decode())  # type: ignore[arg-type]
    assert SignedDocument.from_wire(bytearray(WIRE)) == SIGNED
    assert SignedDocument.from_wire(memoryview(WIRE)) == SIGNED


# -- fuzzing: nothing but ProtocolError gets out -------------------------------------------------


def parse_or_protocol_error(data: bytes) -> None:
    try:
        signed = SignedDocument.from_wire(data)
    except ProtocolError:
        return
    # Anything accepted re-serializes to itself, and verifying raises only ProtocolError.
    assert SignedDocument.from_wire(signed.to_wire()) == signed
    assert MembershipDocument.from_json(signed.doc.to_json()) == signed.doc
    try:
        accept_update(DOC, PIN, signed)
    except ProtocolError:
        pass


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(data: bytes) -> None:
    parse_or_protocol_error(data)


@FUZZ
@given(st.binary(min_size=4, max_size=32))
def test_fuzz_mutated_wire_bytes(edits: bytes) -> None:
    # every 4 bytes of ``edits`` are one edit: position (2 bytes), byte, operation
    data = bytearray(WIRE)
    for i in range(0, len(edits) - 3, 4):
        pos = int.from_bytes(edits[i:i + 2], "big") % max(len(data), 1)
        byte, op = edits[i + 2], edits[i + 3] % 3
        if op == 0 and data:
            data[pos] = byte
        elif op == 1:
            data.insert(pos, byte)
        elif data:
            del data[pos]
    parse_or_protocol_error(bytes(data))


def _paths(obj: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _get(obj: object, path: tuple) -> object:
    for step in path:
        obj = obj[step]  # type: ignore[index]
    return obj


WIRE_OBJ = json.loads(WIRE)
WIRE_PATHS = _paths(WIRE_OBJ)
LEAF_PATHS = [p for p in WIRE_PATHS if not isinstance(_get(WIRE_OBJ, p), dict | list)]
MEMBER_PATHS = [("doc", "members", jid) for jid in WIRE_OBJ["doc"]["members"]]
# Values that pass some checks and fail others: the mutations below mostly keep the shape, so
# most examples get past parsing into check_document, verify and accept_update.
NEAR_VALUES = sorted({str(_get(WIRE_OBJ, p)) for p in LEAF_PATHS}) + [
    "10.0.0.1", "10.97.51.0", "10.97.51.255", "10.97.51.5", "010.97.51.2", "192.168.0.0/24",
    "10.97.51.0/25", "fd00::/64", "bob@EXAMPLE.org", "bob@example.org/res", "x@y", "@y", "a",
    "a" * 16, "A" * 44, "=" * 44, BOB_INFO.key[:-1] + "A", "\u0000", "lab", "-", "",
    "é@example.org", "\ud800",
]
OPS = ["near"] * 6 + ["edit"] * 3 + ["rename"] * 2 + ["copy", "replace", "delete", "add"]


def _scalar(rnd: random.Random) -> object:
    kind = rnd.randrange(7)
    if kind == 0:
        return rnd.choice([None, True, False, 0.5, float("inf"), 2**53, 2**64, -1, 0])
    if kind == 1:
        return rnd.randrange(-2, 8)
    if kind == 2:
        return "".join(chr(rnd.choice([rnd.randrange(32, 127), rnd.randrange(0x110000)]))
                       for _ in range(rnd.randrange(6)))
    return rnd.choice(NEAR_VALUES)


def _json_value(rnd: random.Random) -> object:
    kind = rnd.randrange(4)
    if kind == 0:
        return [_scalar(rnd) for _ in range(rnd.randrange(3))]
    if kind == 1:
        return {rnd.choice(["id", "name", "key", "sign", "ip4", "v", "x"]): _scalar(rnd)
                for _ in range(rnd.randrange(5))}
    return _scalar(rnd)


def _mutate(obj: dict, rnd: random.Random) -> None:
    op = rnd.choice(OPS)
    path = rnd.choice(MEMBER_PATHS if op == "rename" else
                      LEAF_PATHS if op in ("near", "edit") else WIRE_PATHS[1:])
    parent, key = _get(obj, path[:-1]), path[-1]
    if op == "near":
        parent[key] = rnd.choice([*NEAR_VALUES, -1, 0, 1, 5])
    elif op == "edit":
        value = str(parent[key])
        cut = rnd.randrange(len(value) + 1)
        parent[key] = value[:cut] + str(_scalar(rnd))[:2] + value[cut + rnd.randrange(2):]
    elif op == "rename":
        parent[rnd.choice(NEAR_VALUES)] = parent.pop(key)
    elif op == "copy":                             # a value from elsewhere in the document
        parent[key] = copy.deepcopy(_get(WIRE_OBJ, rnd.choice(WIRE_PATHS)))
    elif op == "replace":
        parent[key] = _json_value(rnd)
    elif op == "delete":
        del parent[key]
    elif isinstance(parent, dict):
        parent[str(_scalar(rnd))] = _json_value(rnd)
    else:
        parent.insert(key, _json_value(rnd))


@FUZZ
@given(st.integers(0, 2**64))
def test_fuzz_mutated_documents(seed: int) -> None:
    rnd = random.Random(seed)
    obj = copy.deepcopy(WIRE_OBJ)
    for _ in range(rnd.randrange(1, 4)):
        try:
            _mutate(obj, rnd)
        except (KeyError, IndexError, TypeError, AttributeError):
            pass                                  # an earlier edit removed or retyped the path
    try:
        MembershipDocument.from_json(obj.get("doc"))
    except ProtocolError:
        pass
    try:
        wire = json.dumps(obj, ensure_ascii=rnd.random() < 0.5).encode("utf-8", "surrogatepass")
    except ValueError:
        return
    parse_or_protocol_error(wire)


# -- link plans ----------------------------------------------------------------------------------


def test_link_plans_over_overlapping_groups() -> None:
    dave, erin, frank = fake_info("dave"), fake_info("erin"), fake_info("frank")
    g1 = add_device(add_device(new_group("one", seed="p1"), "bob@example.org", BOB_INFO),
                    "carol@example.net", CAROL_INFO)
    g2 = add_device(add_device(new_group("two", seed="p2", subnet4="192.168.9.0/24"),
                               "dave@example.com", dave), "bob@example.org", BOB_INFO)
    other = create_group(name="three", owner_jid="erin@example.com", owner=erin,
                         rng=rng_from("p3"), subnet4="172.16.0.0/24")
    g3 = add_device(add_device(other, "bob@example.org", BOB_INFO), "frank@example.com", frank)
    plans = link_plans([g3, g2, g1], OWNER.device_id)
    assert list(plans) == sorted([BOB.device_id, CAROL.device_id, dave.id])
    bob = plans[BOB.device_id]
    b1, b2 = g1.device(BOB.device_id)[1], g2.device(BOB.device_id)[1]
    assert bob == LinkPlan(
        device_id=BOB.device_id, jid="bob@example.org", name="laptop", key=BOB_INFO.key,
        allowed_ips=tuple(sorted([f"{b1.ip4}/32", f"{b2.ip4}/32"],
                                 key=lambda s: ipaddress.ip_network(s).network_address)
                          + sorted([f"{g1.ip6_of(b1)}/128", f"{g2.ip6_of(b2)}/128"])),
        groups=tuple(sorted([g1.gid, g2.gid])),
    )
    assert b2.ip4 == "192.168.9.3" and "172.16.0." not in " ".join(bob.allowed_ips)
    assert plans[CAROL.device_id].groups == (g1.gid,)
    assert plans[dave.id].allowed_ips == (
        "192.168.9.2/32", f"{g2.ip6_of(g2.device(dave.id)[1])}/128")
    assert OWNER.device_id not in plans and erin.id not in plans and frank.id not in plans
    # seen from bob: everyone in all three groups but himself
    from_bob = link_plans([g1, g2, g3], BOB.device_id)
    assert set(from_bob) == {OWNER.device_id, CAROL.device_id, dave.id, erin.id, frank.id}
    assert from_bob[OWNER.device_id].groups == tuple(sorted([g1.gid, g2.gid]))
    assert link_plans([g3], OWNER.device_id) == {}
    assert link_plans([], OWNER.device_id) == {}
    with pytest.raises(ValueError, match="two documents"):
        link_plans([g1, g1], OWNER.device_id)


def test_link_plans_include_my_other_devices() -> None:
    plans = link_plans([DOC], BOB.device_id)
    assert set(plans) == {OWNER.device_id, BOB_PHONE.device_id, CAROL.device_id}
    assert plans[BOB_PHONE.device_id].jid == "bob@example.org"


# -- purity --------------------------------------------------------------------------------------

IO_LIBRARIES = {"asyncio", "socket", "slixmpp", "aioice", "pyroute2", "aiohttp", "pytun",
                "selectors", "ssl"}


def test_groups_imports_no_io_library() -> None:
    source = Path(groups.__file__).read_text()
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add((node.module or "").split(".")[0])
    assert not names & IO_LIBRARIES
    code = ("import sys, socialvpn.groups; "
            f"print(sorted(m for m in {sorted(IO_LIBRARIES)!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(groups.__file__).parents[1])
    assert out.stdout.strip() == "[]"
