"""Groups: the membership document and every rule about it (DESIGN.md §2, §4.1, §4.3).

Pure: no I/O, no clock, no event loop. Randomness comes in as ``rng(n) -> bytes`` and signing as
``sign_fn(data) -> signature``. Two kinds of failure, as in h11:

- a document from a peer (:meth:`SignedDocument.from_wire`, :meth:`MembershipDocument.from_json`,
  :func:`verify`, :func:`accept_update`) fails with :class:`~socialvpn.errors.ProtocolError` only,
  its ``reason`` one of ``malformed``, ``oversize``, ``version``, ``signature``, ``owner-key``,
  ``gid``, ``stale``, ``owner``, ``address``, ``identity``;
- local misuse (a bad name, a full subnet, removing the owner, signing with the wrong key) fails
  with :class:`ValueError`, whose message is meant for a person.

A well-formed document (checked by :func:`check_document`, by every parser and before signing):

- ``gid`` is 32 lowercase hex digits; ``prefix6`` is :func:`prefix6_for` of it;
- ``subnet4`` passes :func:`validate_subnet4` and is written canonically;
- every member JID is a normalized bare JID with 1..MAX_DEVICES_PER_MEMBER devices, at most
  MAX_MEMBERS members; device lists are sorted by id;
- every device id is :func:`socialvpn.keys.device_id_of` its X25519 key; ids, ip4s and ip6s are
  unique; every ip4 is a host address of ``subnet4``;
- the owner device is a member under ``owner_jid``, signs with ``owner_sign_key`` and holds the
  first usable address of ``subnet4``;
- the canonical JSON is at most MAX_CANONICAL_BYTES, so the signed wire form fits in
  MAX_DOCUMENT_BYTES.

Hashes: :func:`default_subnet4` and :func:`prefix6_for` use SHA-256 of the ASCII gid;
:func:`ip6_for` uses SHA-256 of the raw 32-byte X25519 public key.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Protocol

from .config import validate_device_name, validate_jid
from .errors import ConfigError, ProtocolError
from .keys import DEVICE_ID_LEN, b64, device_id_of, unb64_exact, unb64_key
from .keys import verify as verify_signature

# -- limits and constants ------------------------------------------------------------------------

DOCUMENT_VERSION = 0
MAX_DOCUMENT_BYTES = 60_000          # the signed wire form, {"doc":...,"sig":"..."}
MAX_MEMBERS = 250
MAX_DEVICES_PER_MEMBER = 16
MAX_EPOCH = 2**53 - 1                # exact in every JSON implementation
SIGNATURE_LEN = 64                   # Ed25519
GID_BYTES = 16
GROUP_NAME_MAX = 10                  # "svpn-" + name fits IFNAMSIZ: 15 characters + NUL
SUBNET4_MIN_PREFIX = 16
SUBNET4_MAX_PREFIX = 29
_SIG_B64_LEN = 88
WIRE_OVERHEAD = len(b'{"doc":,"sig":""}') + _SIG_B64_LEN
MAX_CANONICAL_BYTES = MAX_DOCUMENT_BYTES - WIRE_OVERHEAD

_PRIVATE4 = tuple(ipaddress.IPv4Network(n) for n in
                  ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"))
_GID_RE = re.compile(r"[0-9a-f]{32}")
_GROUP_NAME_RE = re.compile(rf"[a-z][a-z0-9-]{{0,{GROUP_NAME_MAX - 1}}}")
_DEVICE_ID_RE = re.compile(rf"[a-z2-7]{{{DEVICE_ID_LEN}}}")
_DOC_KEYS = frozenset({"v", "gid", "name", "owner", "owner_jid", "owner_sign_key", "epoch",
                       "subnet4", "prefix6", "members"})
_DEVICE_KEYS = frozenset({"id", "name", "key", "sign", "ip4"})
_WIRE_KEYS = frozenset({"doc", "sig"})


class _Invalid(ValueError):
    """A rule of the document is broken; ``reason`` becomes the ProtocolError reason."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


def _as_protocol_error(exc: ValueError) -> ProtocolError:
    return ProtocolError(str(exc), getattr(exc, "reason", "malformed"))


# -- the document --------------------------------------------------------------------------------


class DeviceInfoLike(Protocol):
    """What a device is known by before it has an address (presence carries these)."""

    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def key(self) -> str: ...
    @property
    def sign(self) -> str: ...


@dataclass(frozen=True)
class Device:
    id: str
    name: str
    key: str     # base64 X25519 public key
    sign: str    # base64 Ed25519 public key
    ip4: str

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "key": self.key, "sign": self.sign,
                "ip4": self.ip4}


@dataclass(frozen=True)
class MembershipDocument:
    gid: str
    name: str
    owner: str            # owner device id
    owner_jid: str
    owner_sign_key: str   # base64 Ed25519 public key of the owner device
    epoch: int
    subnet4: str
    prefix6: str
    members: Mapping[str, tuple[Device, ...]]

    def __post_init__(self) -> None:
        # Normalize to a read-only mapping of JID -> devices sorted by id (canonical order).
        members = MappingProxyType({
            jid: tuple(sorted(devices, key=lambda d: d.id))
            for jid, devices in sorted(self.members.items())
        })
        object.__setattr__(self, "members", members)

    def __hash__(self) -> int:
        return hash((self.gid, self.epoch, tuple(self.devices())))

    # -- views --

    def devices(self) -> list[tuple[str, Device]]:
        """Every (JID, device), by JID then device id."""
        return [(jid, d) for jid, devices in self.members.items() for d in devices]

    def device(self, device_id: str) -> tuple[str, Device] | None:
        for jid, devices in self.members.items():
            for d in devices:
                if d.id == device_id:
                    return jid, d
        return None

    def member_jids(self) -> list[str]:
        return sorted(self.members)

    def ip6_of(self, device: Device) -> str:
        return ip6_for(self.prefix6, device.key)

    # -- serialization --

    def to_json(self) -> dict[str, Any]:
        return {
            "v": DOCUMENT_VERSION,
            "gid": self.gid,
            "name": self.name,
            "owner": self.owner,
            "owner_jid": self.owner_jid,
            "owner_sign_key": self.owner_sign_key,
            "epoch": self.epoch,
            "subnet4": self.subnet4,
            "prefix6": self.prefix6,
            "members": {jid: [d.to_json() for d in devices]
                        for jid, devices in self.members.items()},
        }

    def canonical(self) -> bytes:
        """The bytes the owner signs: sorted keys, no spaces, UTF-8."""
        return _canonical(self.to_json())

    @classmethod
    def from_json(cls, data: object) -> MembershipDocument:
        """Strictly parse and check a document; ProtocolError (and nothing else) otherwise."""
        try:
            doc = _parse_document(data)
            check_document(doc)
        except ValueError as exc:
            raise _as_protocol_error(exc) from None
        return doc


@dataclass(frozen=True)
class SignedDocument:
    doc: MembershipDocument
    signature: bytes

    def to_wire(self) -> bytes:
        return _canonical({"doc": self.doc.to_json(), "sig": b64(self.signature)})

    @classmethod
    def from_wire(cls, data: bytes) -> SignedDocument:
        """Parse (not verify) a signed document from a peer; ProtocolError only."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ProtocolError("a signed document is bytes")
        if len(data) > MAX_DOCUMENT_BYTES:
            raise ProtocolError(f"signed document larger than {MAX_DOCUMENT_BYTES} bytes",
                                "oversize")
        try:
            obj = json.loads(bytes(data).decode("utf-8"), object_pairs_hook=_unique_pairs,
                             parse_constant=_no_constants)
        except (ValueError, RecursionError):
            raise ProtocolError("signed document is not JSON") from None
        if not isinstance(obj, dict) or set(obj) != _WIRE_KEYS:
            raise ProtocolError('signed document must be {"doc": ..., "sig": ...}')
        sig = obj["sig"]
        if not isinstance(sig, str) or len(sig) != _SIG_B64_LEN:
            raise ProtocolError("signature is not 64 bytes of base64")
        try:
            raw = unb64_exact(sig, SIGNATURE_LEN)
        except ValueError:
            raise ProtocolError("signature is not 64 bytes of base64") from None
        return cls(MembershipDocument.from_json(obj["doc"]), raw)


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


# -- parsing -------------------------------------------------------------------------------------


def _str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"{what} must be a string")
    return value


def _parse_document(data: object) -> MembershipDocument:
    if not isinstance(data, dict):
        raise _Invalid("a membership document is a JSON object")
    version = data.get("v")
    if type(version) is not int:
        raise _Invalid("membership document lacks its format version 'v'")
    if version != DOCUMENT_VERSION:
        raise _Invalid(f"membership document format {version} is not supported", "version")
    if set(data) != _DOC_KEYS:
        raise _Invalid("membership document has missing or unknown fields")
    epoch = data["epoch"]
    if type(epoch) is not int:
        raise _Invalid("epoch must be an integer")
    members = data["members"]
    if not isinstance(members, dict):
        raise _Invalid("members must be an object")
    if len(members) > MAX_MEMBERS:
        raise _Invalid(f"more than {MAX_MEMBERS} members", "oversize")
    parsed: dict[str, tuple[Device, ...]] = {}
    for jid, devices in members.items():
        _str(jid, "a member JID")
        if not isinstance(devices, list):
            raise _Invalid("a member's devices must be a list")
        if len(devices) > MAX_DEVICES_PER_MEMBER:
            raise _Invalid(f"more than {MAX_DEVICES_PER_MEMBER} devices for one member",
                           "oversize")
        out = []
        for item in devices:
            if not isinstance(item, dict) or set(item) != _DEVICE_KEYS:
                raise _Invalid("a device is an object with id, name, key, sign, ip4")
            out.append(Device(*(_str(item[k], f"device {k}")
                                for k in ("id", "name", "key", "sign", "ip4"))))
        ids = [d.id for d in out]
        if ids != sorted(set(ids)):
            raise _Invalid("a member's devices must be sorted by id, without repeats")
        parsed[jid] = tuple(out)
    return MembershipDocument(
        gid=_str(data["gid"], "gid"),
        name=_str(data["name"], "name"),
        owner=_str(data["owner"], "owner"),
        owner_jid=_str(data["owner_jid"], "owner_jid"),
        owner_sign_key=_str(data["owner_sign_key"], "owner_sign_key"),
        epoch=epoch,
        subnet4=_str(data["subnet4"], "subnet4"),
        prefix6=_str(data["prefix6"], "prefix6"),
        members=parsed,
    )


# -- checks --------------------------------------------------------------------------------------


def _check_text(text: str, what: str) -> None:
    for ch in text:
        o = ord(ch)
        if o < 0x20 or o == 0x7F or 0xD800 <= o <= 0xDFFF:
            raise _Invalid(f"{what} contains a control or surrogate character")


def _jid(jid: object, what: str = "JID") -> str:
    """A bare JID, normalized (domain lowercased); ValueError otherwise."""
    if not isinstance(jid, str):
        raise _Invalid(f"{what} must be a string")
    _check_text(jid, what)
    try:
        return validate_jid(jid, what)
    except ConfigError as exc:
        raise _Invalid(str(exc)) from None


def _canonical_jid(jid: str, what: str) -> None:
    if _jid(jid, what) != jid:
        raise _Invalid(f"{what} {jid!r} is not normalized (lowercase domain)")


def _device_name(name: object) -> str:
    if not isinstance(name, str):
        raise _Invalid("device name must be a string")
    try:
        return validate_device_name(name, "device name")
    except ConfigError as exc:
        raise _Invalid(str(exc)) from None


def _key(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise _Invalid(f"{what} must be a string")
    try:
        return unb64_key(text)
    except ValueError as exc:
        raise _Invalid(f"{what}: {exc}") from None


def _first_host(net: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    return net.network_address + 1


def first_host4(subnet4: str) -> str:
    """The first usable address of a subnet: reserved for the owner device."""
    return str(_first_host(ipaddress.IPv4Network(validate_subnet4(subnet4))))


def check_document(doc: MembershipDocument) -> None:
    """Every rule of a well-formed document (module docstring); ValueError naming the first broken.

    The ValueError carries a ``reason`` attribute (``malformed`` or ``oversize``) that the peer
    facing functions turn into a ProtocolError.
    """
    if not isinstance(doc.gid, str) or not _GID_RE.fullmatch(doc.gid):
        raise _Invalid("gid must be 32 lowercase hex digits")
    try:
        validate_group_name(doc.name)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None
    if not isinstance(doc.owner, str) or not _DEVICE_ID_RE.fullmatch(doc.owner):
        raise _Invalid("owner is not a device id")
    _canonical_jid(doc.owner_jid, "owner_jid")
    _key(doc.owner_sign_key, "owner_sign_key")
    if type(doc.epoch) is not int or not 1 <= doc.epoch <= MAX_EPOCH:
        raise _Invalid(f"epoch must be an integer from 1 to {MAX_EPOCH}")
    if not isinstance(doc.subnet4, str):
        raise _Invalid("subnet4 must be a string")
    try:
        canonical_subnet = validate_subnet4(doc.subnet4)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None
    if canonical_subnet != doc.subnet4:
        raise _Invalid("subnet4 is not written canonically")
    if doc.prefix6 != prefix6_for(doc.gid):
        raise _Invalid("prefix6 is not the one derived from gid")
    if len(doc.members) > MAX_MEMBERS:
        raise _Invalid(f"more than {MAX_MEMBERS} members", "oversize")
    net = ipaddress.IPv4Network(doc.subnet4)
    ids: set[str] = set()
    keys: set[str] = set()
    ip4s: set[str] = set()
    ip6s: set[str] = set()
    for jid, devices in doc.members.items():
        _canonical_jid(jid, "member JID")
        if not isinstance(devices, tuple) or not devices:
            raise _Invalid(f"member {jid} has no devices")
        if len(devices) > MAX_DEVICES_PER_MEMBER:
            raise _Invalid(f"more than {MAX_DEVICES_PER_MEMBER} devices for {jid}", "oversize")
        for d in devices:
            if not isinstance(d, Device):
                raise _Invalid("a device is a Device")
            raw = _key(d.key, "device key")
            _key(d.sign, "device sign key")
            if not isinstance(d.id, str) or d.id != device_id_of(raw):
                raise _Invalid(f"device id {d.id!r} does not match its key")
            _device_name(d.name)
            ip4 = _host4(d.ip4, net)
            ip6 = ip6_for(doc.prefix6, d.key)
            if d.id in ids or d.key in keys:
                raise _Invalid(f"device {d.id} appears twice")
            if ip4 in ip4s:
                raise _Invalid(f"address {ip4} is used twice")
            if ip6 in ip6s:
                raise _Invalid(f"address {ip6} is used twice")
            ids.add(d.id)
            keys.add(d.key)
            ip4s.add(ip4)
            ip6s.add(ip6)
    found = doc.device(doc.owner)
    if found is None or found[0] != doc.owner_jid:
        raise _Invalid("the owner device is not a member under owner_jid")
    owner = found[1]
    if owner.sign != doc.owner_sign_key:
        raise _Invalid("owner_sign_key is not the owner device's sign key")
    if owner.ip4 != str(_first_host(net)):
        raise _Invalid("the owner device must hold the first usable address")
    if len(doc.canonical()) > MAX_CANONICAL_BYTES:
        raise _Invalid(f"document larger than {MAX_CANONICAL_BYTES} bytes", "oversize")


def _host4(text: object, net: ipaddress.IPv4Network) -> str:
    if not isinstance(text, str):
        raise _Invalid("ip4 must be a string")
    try:
        addr = ipaddress.IPv4Address(text)
    except ValueError:
        raise _Invalid(f"{text!r} is not an IPv4 address") from None
    if str(addr) != text:
        raise _Invalid(f"{text!r} is not written canonically")
    if addr not in net or addr in (net.network_address, net.broadcast_address):
        raise _Invalid(f"{text} is not a host address of {net}")
    return text


# -- names and addresses -------------------------------------------------------------------------


def new_gid(rng: Callable[[int], bytes]) -> str:
    raw = rng(GID_BYTES)
    if not isinstance(raw, bytes) or len(raw) != GID_BYTES:
        raise ValueError(f"rng must return {GID_BYTES} bytes")
    return raw.hex()


def _check_gid(gid: str) -> bytes:
    if not isinstance(gid, str) or not _GID_RE.fullmatch(gid):
        raise ValueError(f"{gid!r} is not a group id (32 lowercase hex digits)")
    return hashlib.sha256(gid.encode("ascii")).digest()


def default_subnet4(gid: str) -> str:
    """``10.X.Y.0/24`` with X = 64 + low 6 bits of h[0], Y = h[1], h = SHA-256(gid)."""
    h = _check_gid(gid)
    return f"10.{64 + (h[0] & 0x3F)}.{h[1]}.0/24"


def prefix6_for(gid: str) -> str:
    """RFC 4193 ULA ``fd`` + 40-bit global id (first 5 bytes of SHA-256(gid)) + subnet 0, /64."""
    h = _check_gid(gid)
    raw = b"\xfd" + h[:5] + b"\x00" * 10
    return str(ipaddress.IPv6Network((raw, 64)))


def _reserved_iid(iid: int) -> bool:
    """RFC 5453 reserved interface identifiers (subnet-router anycast and friends)."""
    return (iid == 0
            or 0xFDFF_FFFF_FFFF_FF80 <= iid <= 0xFDFF_FFFF_FFFF_FFFF
            or 0x0200_5EFF_FE00_0000 <= iid <= 0x0200_5EFF_FEFF_FFFF)


def ip6_for(prefix6: str, x25519_key_b64: str) -> str:
    """The /64 prefix + the first 64 bits of SHA-256(raw key); rehashed while reserved."""
    try:
        net = ipaddress.IPv6Network(prefix6)
    except ValueError:
        raise ValueError(f"{prefix6!r} is not an IPv6 prefix") from None
    if net.prefixlen != 64:
        raise ValueError(f"{prefix6!r} is not a /64")
    h = hashlib.sha256(unb64_key(x25519_key_b64)).digest()
    iid = int.from_bytes(h[:8], "big")
    while _reserved_iid(iid):
        h = hashlib.sha256(h).digest()
        iid = int.from_bytes(h[:8], "big")
    return str(net.network_address + iid)


def validate_group_name(name: str) -> str:
    if not isinstance(name, str) or not _GROUP_NAME_RE.fullmatch(name):
        raise ValueError(
            f"group name {name!r}: use 1-{GROUP_NAME_MAX} lowercase letters, digits or '-', "
            "starting with a letter (the interface is svpn-<name>)"
        )
    return name


def validate_subnet4(cidr: str) -> str:
    """A private IPv4 subnet /16../29 with host bits clear, returned canonically."""
    if not isinstance(cidr, str):
        raise ValueError("subnet must be a string like 10.77.0.0/24")
    try:
        net = ipaddress.IPv4Network(cidr.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"subnet {cidr!r}: {exc} (expected e.g. 10.77.0.0/24)") from None
    if "/" not in cidr:
        raise ValueError(f"subnet {cidr!r}: give a prefix length, e.g. 10.77.0.0/24")
    if not SUBNET4_MIN_PREFIX <= net.prefixlen <= SUBNET4_MAX_PREFIX:
        raise ValueError(f"subnet {cidr!r}: prefix must be /{SUBNET4_MIN_PREFIX} to "
                         f"/{SUBNET4_MAX_PREFIX}")
    if not any(net.subnet_of(p) for p in _PRIVATE4):
        raise ValueError(f"subnet {cidr!r}: must be private (10/8, 172.16/12, 192.168/16 "
                         "or 100.64/10)")
    return str(net)


# -- the owner's operations ----------------------------------------------------------------------


def _local_device(device: DeviceInfoLike, ip4: str) -> Device:
    did, name, key, sign_key = device.id, device.name, device.key, device.sign
    raw = _key(key, "device key")
    _key(sign_key, "device sign key")
    if did != device_id_of(raw):
        raise ValueError(f"device id {did!r} does not match its key")
    return Device(id=did, name=_device_name(name), key=key, sign=sign_key, ip4=ip4)


def _next_epoch(doc: MembershipDocument) -> int:
    if doc.epoch >= MAX_EPOCH:
        raise ValueError("the group's epoch cannot grow any further")
    return doc.epoch + 1


def create_group(*, name: str, owner_jid: str, owner: DeviceInfoLike,
                 rng: Callable[[int], bytes], subnet4: str | None = None) -> MembershipDocument:
    """A new group at epoch 1 whose only member is the owner device, at the first address."""
    name = validate_group_name(name)
    jid = _jid(owner_jid, "owner JID")
    gid = new_gid(rng)
    net = default_subnet4(gid) if subnet4 is None else validate_subnet4(subnet4)
    dev = _local_device(owner, first_host4(net))
    doc = MembershipDocument(gid=gid, name=name, owner=dev.id, owner_jid=jid,
                             owner_sign_key=dev.sign, epoch=1, subnet4=net,
                             prefix6=prefix6_for(gid), members={jid: (dev,)})
    check_document(doc)
    return doc


def add_device(doc: MembershipDocument, jid: str, device: DeviceInfoLike) -> MembershipDocument:
    """``doc`` with ``device`` under ``jid`` at the lowest free address, epoch + 1."""
    jid = _jid(jid, "member JID")
    if doc.device(device.id) is not None:
        raise ValueError(f"device {device.id} is already a member of group {doc.name}")
    devices = doc.members.get(jid, ())
    if not devices and len(doc.members) >= MAX_MEMBERS:
        raise ValueError(f"group {doc.name} already has {MAX_MEMBERS} members")
    if len(devices) >= MAX_DEVICES_PER_MEMBER:
        raise ValueError(f"{jid} already has {MAX_DEVICES_PER_MEMBER} devices in {doc.name}")
    new = _local_device(device, "0.0.0.0")
    ip6 = ip6_for(doc.prefix6, new.key)
    if any(doc.ip6_of(d) == ip6 for _, d in doc.devices()):
        raise ValueError(f"device {new.id}: its IPv6 address collides with another device's")
    net = ipaddress.IPv4Network(doc.subnet4)
    used = {d.ip4 for _, d in doc.devices()} | {str(_first_host(net))}
    ip4 = next((str(a) for a in net.hosts() if str(a) not in used), None)
    if ip4 is None:
        raise ValueError(f"subnet {doc.subnet4} of group {doc.name} is full")
    members = dict(doc.members)
    members[jid] = (*devices, replace(new, ip4=ip4))
    out = replace(doc, epoch=_next_epoch(doc), members=members)
    if len(out.canonical()) > MAX_CANONICAL_BYTES:
        raise ValueError(f"group {doc.name}: the membership document would exceed "
                         f"{MAX_DOCUMENT_BYTES} bytes")
    return out


def remove_member(doc: MembershipDocument, jid: str) -> MembershipDocument:
    """``doc`` without ``jid`` and all its devices, epoch + 1. The owner cannot be removed."""
    jid = _jid(jid, "member JID")
    if jid == doc.owner_jid:
        raise ValueError(f"{jid} owns group {doc.name} and cannot be removed")
    if jid not in doc.members:
        raise ValueError(f"{jid} is not a member of group {doc.name}")
    members = {j: d for j, d in doc.members.items() if j != jid}
    return replace(doc, epoch=_next_epoch(doc), members=members)


def remove_device(doc: MembershipDocument, device_id: str) -> MembershipDocument:
    """``doc`` without one device (and its JID if that was its last), epoch + 1."""
    if device_id == doc.owner:
        raise ValueError(f"device {device_id} owns group {doc.name} and cannot be removed")
    found = doc.device(device_id)
    if found is None:
        raise ValueError(f"device {device_id} is not a member of group {doc.name}")
    jid = found[0]
    members = dict(doc.members)
    rest = tuple(d for d in members[jid] if d.id != device_id)
    if rest:
        members[jid] = rest
    else:
        del members[jid]
    return replace(doc, epoch=_next_epoch(doc), members=members)


# -- signing and accepting -----------------------------------------------------------------------


def sign(doc: MembershipDocument, sign_fn: Callable[[bytes], bytes]) -> SignedDocument:
    """Sign with the owner's Ed25519 key; refuses a malformed doc or a signature by another key."""
    check_document(doc)
    data = doc.canonical()
    signature = sign_fn(data)
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_LEN:
        raise ValueError(f"sign_fn must return a {SIGNATURE_LEN}-byte Ed25519 signature")
    if not verify_signature(unb64_key(doc.owner_sign_key), signature, data):
        raise ValueError("the signature does not verify with owner_sign_key: "
                         "only the owner device can sign the group's document")
    return SignedDocument(doc, signature)


def verify(signed: SignedDocument, pinned_owner_key: str | None = None) -> MembershipDocument:
    """The document if the owner's signature holds (and its key is the pinned one)."""
    doc = signed.doc
    if pinned_owner_key is not None and doc.owner_sign_key != pinned_owner_key:
        raise ProtocolError("document signed by a key other than the pinned owner key",
                            "owner-key")
    try:
        key = unb64_key(doc.owner_sign_key)
        data = doc.canonical()
    except (ValueError, TypeError, AttributeError):
        raise ProtocolError("document cannot be verified: malformed") from None
    sig = signed.signature
    if not isinstance(sig, bytes) or not verify_signature(key, sig, data):
        raise ProtocolError("bad signature on membership document", "signature")
    try:
        check_document(doc)
    except ValueError as exc:
        raise _as_protocol_error(exc) from None
    return doc


def accept_update(current: MembershipDocument | None, pinned_owner_key: str,
                  signed: SignedDocument) -> MembershipDocument:
    """The new document if it may replace ``current`` (None: first document of a group).

    Besides :func:`verify`: same gid, strictly newer epoch, same owner device and JID, same
    subnet, and every device in both keeps its ip4 (``address``), JID and sign key
    (``identity``). "Stays" compares with ``current`` only: a device removed and re-added in
    epochs we never saw looks like one that stayed.
    """
    doc = verify(signed, pinned_owner_key)
    if current is None:
        return doc
    if doc.gid != current.gid:
        raise ProtocolError("document is for another group", "gid")
    if doc.epoch <= current.epoch:
        raise ProtocolError(f"epoch {doc.epoch} is not newer than {current.epoch}", "stale")
    if doc.owner != current.owner or doc.owner_jid != current.owner_jid:
        raise ProtocolError("the group's owner changed", "owner")
    if doc.subnet4 != current.subnet4:
        raise ProtocolError("the group's subnet changed", "address")
    for jid, dev in current.devices():
        found = doc.device(dev.id)
        if found is None:
            continue
        new_jid, new = found
        if new.ip4 != dev.ip4:
            raise ProtocolError(f"device {dev.id} moved from {dev.ip4} to {new.ip4}", "address")
        if new_jid != jid or new.sign != dev.sign or new.key != dev.key:
            raise ProtocolError(f"device {dev.id} changed account or keys", "identity")
    return doc


# -- who links with whom -------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkPlan:
    device_id: str
    jid: str
    name: str
    key: str
    allowed_ips: tuple[str, ...]   # ip4/32 and ip6/128 in every shared group, IPv4 first
    groups: tuple[str, ...]        # gids, sorted


def _ip_sort_key(text: str) -> tuple[int, int, int]:
    net = ipaddress.ip_network(text)
    return net.version, int(net.network_address), net.prefixlen


def link_plans(docs: Iterable[MembershipDocument], my_device_id: str) -> dict[str, LinkPlan]:
    """One plan per other device sharing at least one of my groups (keyed and sorted by id).

    Documents that do not list ``my_device_id`` are ignored. Where groups disagree on a
    device's JID or name, the group with the lowest gid wins (the key cannot differ: the id is
    derived from it). Two documents with the same gid are a ValueError.
    """
    acc: dict[str, tuple[str, Device, set[str], set[str]]] = {}
    gids: set[str] = set()
    for doc in sorted(docs, key=lambda d: d.gid):
        if doc.gid in gids:
            raise ValueError(f"two documents for group {doc.gid}")
        gids.add(doc.gid)
        if doc.device(my_device_id) is None:
            continue
        for jid, dev in doc.devices():
            if dev.id == my_device_id:
                continue
            entry = acc.setdefault(dev.id, (jid, dev, set(), set()))
            if entry[1].key != dev.key:
                continue
            entry[2].update((f"{dev.ip4}/32", f"{doc.ip6_of(dev)}/128"))
            entry[3].add(doc.gid)
    return {
        did: LinkPlan(device_id=did, jid=jid, name=dev.name, key=dev.key,
                      allowed_ips=tuple(sorted(ips, key=_ip_sort_key)),
                      groups=tuple(sorted(groups)))
        for did, (jid, dev, ips, groups) in sorted(acc.items())
    }
