"""Cryptokey routing: longest-prefix match, moves, removal, source checks, junk input."""

from __future__ import annotations

import ast
import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from socialvpn.net import packet_router
from socialvpn.net.packet_router import PacketRouter

from .support import ipv4, ipv6, packet

pytestmark = pytest.mark.unit


def _table() -> PacketRouter[str]:
    r: PacketRouter[str] = PacketRouter()
    r.set_allowed("alice", ["10.77.0.2/32", "fd00::2/128"])
    r.set_allowed("bob", ["10.77.0.3/32", "fd00::3/128", "10.88.0.0/16", "fd01::/48"])
    r.set_allowed("gw", ["0.0.0.0/0", "10.88.5.0/24", "fd01:0:0:5::/64"])
    return r


@pytest.fixture
def table() -> PacketRouter[str]:
    return _table()


@pytest.mark.parametrize(
    ("dst", "peer"),
    [
        ("10.77.0.2", "alice"),
        ("10.77.0.3", "bob"),
        ("10.88.1.1", "bob"),
        ("10.88.5.9", "gw"),  # /24 beats bob's /16
        ("8.8.8.8", "gw"),  # default route
        ("fd00::2", "alice"),
        ("fd00::3", "bob"),
        ("fd01::1", "bob"),
        ("fd01:0:0:5::1", "gw"),  # /64 beats /48
        ("fd00::4", None),  # no IPv6 default
        ("2001:db8::1", None),
    ],
)
def test_destination_longest_prefix(table: PacketRouter[str], dst: str, peer: str | None) -> None:
    src = "fd00::1" if ":" in dst else "10.77.0.1"
    assert table.peer_for_destination(packet(src, dst)) == peer


def test_buffer_types_are_accepted(table: PacketRouter[str]) -> None:
    raw = ipv4("10.77.0.1", "10.77.0.2")
    for buf in (raw, bytearray(raw), memoryview(raw), memoryview(bytearray(raw))):
        assert table.peer_for_destination(buf) == "alice"
        assert table.source_allowed("bob", ipv4("10.77.0.3", "10.77.0.2"))
    big = memoryview(bytearray(b"\x00" * 8 + raw))[8:]
    assert table.peer_for_destination(big) == "alice"


def test_empty_table_routes_nothing() -> None:
    r: PacketRouter[str] = PacketRouter()
    assert r.peer_for_destination(ipv4("10.0.0.1", "10.0.0.2")) is None
    assert not r.source_allowed("x", ipv4("10.0.0.1", "10.0.0.2"))
    assert len(r) == 0 and r.peers() == []


def test_reassigning_a_prefix_moves_it(table: PacketRouter[str]) -> None:
    table.set_allowed("carol", ["10.77.0.2/32"])
    assert table.peer_for_destination(ipv4("10.77.0.1", "10.77.0.2")) == "carol"
    assert table.prefixes("alice") == ["fd00::2/128"]
    assert table.prefixes("carol") == ["10.77.0.2/32"]
    # alice may no longer send from the address she lost
    assert not table.source_allowed("alice", ipv4("10.77.0.2", "10.77.0.1"))
    assert table.source_allowed("carol", ipv4("10.77.0.2", "10.77.0.1"))


def test_moving_the_last_prefix_forgets_the_peer() -> None:
    r: PacketRouter[str] = PacketRouter()
    r.set_allowed("a", ["10.0.0.0/8"])
    r.set_allowed("b", ["10.0.0.0/8"])
    assert r.peers() == ["b"] and r.prefixes("a") == []


def test_set_allowed_replaces_the_peers_set(table: PacketRouter[str]) -> None:
    table.set_allowed("bob", ["10.77.0.3/32"])
    assert table.prefixes("bob") == ["10.77.0.3/32"]
    assert table.peer_for_destination(ipv4("10.77.0.1", "10.88.1.1")) == "gw"
    assert table.peer_for_destination(ipv6("fd00::1", "fd01::1")) is None
    table.set_allowed("bob", [])
    assert "bob" not in table.peers()


def test_remove(table: PacketRouter[str]) -> None:
    table.remove("bob")
    table.remove("bob")  # unknown: no error
    table.remove("nobody")
    assert table.prefixes("bob") == []
    assert table.peer_for_destination(ipv4("10.77.0.1", "10.77.0.3")) == "gw"
    assert table.peer_for_destination(ipv6("fd00::1", "fd00::3")) is None
    assert sorted(table.peers()) == ["alice", "gw"]


def test_prefixes_are_canonical_and_sorted() -> None:
    r: PacketRouter[str] = PacketRouter()
    r.set_allowed("a", ["fd00:0:0::1/128", "10.1.0.0/16", "10.0.0.7"])
    assert r.prefixes("a") == ["10.0.0.7/32", "10.1.0.0/16", "fd00::1/128"]
    assert len(r) == 3


@pytest.mark.parametrize("bad", ["10.0.0.1/24", "10.0.0.0/33", "nonsense", "fd00::1/64", ""])
def test_bad_prefix_is_refused_without_changing_anything(
    table: PacketRouter[str], bad: str
) -> None:
    before = {p: table.prefixes(p) for p in table.peers()}
    with pytest.raises(ValueError, match="allowed prefix"):
        table.set_allowed("alice", ["10.99.0.0/16", bad])
    assert {p: table.prefixes(p) for p in table.peers()} == before


def test_a_single_string_is_not_an_iterable_of_prefixes() -> None:
    with pytest.raises(TypeError):
        PacketRouter().set_allowed("a", "10.0.0.0/8")


@pytest.mark.parametrize(
    ("peer", "src", "ok"),
    [
        ("alice", "10.77.0.2", True),
        ("alice", "10.77.0.3", False),  # spoofing bob
        ("alice", "10.77.0.9", False),  # spoofing nobody's... gw's default route
        ("gw", "10.77.0.9", True),
        ("bob", "10.88.1.1", True),
        ("bob", "10.88.5.1", False),  # inside bob's /16 but gw owns the longer /24
        ("alice", "fd00::2", True),
        ("alice", "fd00::3", False),
        ("bob", "fd01::9", True),
        ("bob", "fd00::9", False),  # owned by nobody
        ("nobody", "10.77.0.2", False),
    ],
)
def test_source_check(table: PacketRouter[str], peer: str, src: str, ok: bool) -> None:
    dst = "fd00::1" if ":" in src else "10.77.0.1"
    assert table.source_allowed(peer, packet(src, dst)) is ok


def test_source_check_uses_equality_not_identity() -> None:
    r: PacketRouter[tuple[str, int]] = PacketRouter()
    r.set_allowed(("alice", 1), ["10.0.0.2/32"])
    key = tuple(["alice", 1])  # equal, not the same object
    assert r.source_allowed(key, ipv4("10.0.0.2", "10.0.0.1"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "junk",
    [
        b"",
        b"\x45",
        ipv4("10.77.0.2", "10.77.0.2")[:19],  # one byte short of a header
        b"\x60" + bytes(30),  # IPv6 nibble, but shorter than 40
        ipv6("fd00::2", "fd00::2")[:39],
        b"\x00" * 60,  # version 0
        b"\xff" * 60,  # version 15
        b"\x55" + bytes(59),  # version 5
    ],
)
def test_malformed_packets(table: PacketRouter[str], junk: bytes) -> None:
    assert table.peer_for_destination(junk) is None
    assert table.source_allowed("gw", junk) is False
    assert table.source_allowed("alice", junk) is False


def test_exactly_minimal_headers_work(table: PacketRouter[str]) -> None:
    assert table.peer_for_destination(ipv4("10.77.0.2", "10.77.0.2", b"")) == "alice"
    assert table.peer_for_destination(ipv6("fd00::2", "fd00::2", b"")) == "alice"


class _Forbidden:
    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"ipaddress.{name} used on the packet path")


def test_lookups_use_no_ipaddress_objects(
    table: PacketRouter[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    packets = [packet(s, d) for s, d in [("10.77.0.2", "10.88.5.1"), ("fd00::2", "fd01::1"),
                                         ("10.77.0.3", "8.8.8.8"), ("fd00::3", "2001:db8::1")]]
    monkeypatch.setattr(packet_router, "ipaddress", _Forbidden())
    for raw in packets + [b"", b"\x45" * 3]:
        table.peer_for_destination(raw)
        table.source_allowed("bob", raw)
        table.source_allowed("nobody", raw)


def test_module_is_pure() -> None:
    path = Path(packet_router.__file__)
    forbidden = {"asyncio", "socket", "selectors", "ssl", "pyroute2", "pytun", "aiohttp",
                 "aioice", "slixmpp", "os", "select"}
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    assert not names & forbidden, names & forbidden


# --- properties -------------------------------------------------------------------------------


_IP_LIKE = st.tuples(st.sampled_from([0x45, 0x4F, 0x60, 0x6F]), st.binary(max_size=60)).map(
    lambda t: bytes([t[0]]) + t[1]
)
_TABLE = _table()


@settings(max_examples=3000, deadline=None)
@given(data=st.binary(max_size=80) | _IP_LIKE)
def test_random_bytes_never_raise(data: bytes) -> None:
    table = _TABLE
    assert table.peer_for_destination(data) in (None, "alice", "bob", "gw")
    assert table.source_allowed("bob", data) in (True, False)
    assert table.peer_for_destination(memoryview(bytearray(data))) == table.peer_for_destination(
        data
    )


_v4_nets = st.builds(
    lambda a, plen: ipaddress.IPv4Network((a, plen), strict=False).with_prefixlen,
    st.integers(0, 2**32 - 1),
    st.sampled_from([0, 8, 16, 24, 28, 31, 32]),
)
_v6_nets = st.builds(
    lambda a, plen: ipaddress.IPv6Network((a, plen), strict=False).with_prefixlen,
    st.integers(0, 2**128 - 1),
    st.sampled_from([0, 16, 48, 64, 120, 128]),
)


@settings(max_examples=300, deadline=None)
@given(
    assignments=st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.lists(_v4_nets | _v6_nets, max_size=5)),
        max_size=6,
    ),
    probes=st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 2**128 - 1), max_size=10),
)
def test_matches_a_reference_implementation(
    assignments: list[tuple[str, list[str]]], probes: list[int]
) -> None:
    r: PacketRouter[str] = PacketRouter()
    for peer, prefixes in assignments:
        r.set_allowed(peer, prefixes)
    # probe addresses from the prefixes themselves too, so matches happen
    addresses = [str(ipaddress.ip_network(p).network_address)
                 for _, ps in assignments for p in ps]
    addresses += [str(ipaddress.IPv4Address(n)) if n < 2**32 else str(ipaddress.IPv6Address(n))
                  for n in probes]
    for address in addresses:
        expected = _reference(assignments, address)
        raw = packet("10.0.0.1" if ":" not in address else "fd00::1", address)
        assert r.peer_for_destination(raw) == expected, address
        src = packet(address, "10.0.0.1" if ":" not in address else "fd00::1")
        for peer in ("a", "b", "c"):
            assert r.source_allowed(peer, src) is (expected == peer)


def _reference(history: list[tuple[str, list[str]]], address: str) -> str | None:
    """Slow and obvious: replay the assignments (a peer's set is replaced, a prefix moves to
    its latest owner), then take the longest prefix containing the address."""
    owner: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, str] = {}
    for peer, prefixes in history:
        for net in [n for n, p in owner.items() if p == peer]:
            del owner[net]
        for p in prefixes:
            owner[ipaddress.ip_network(p)] = peer
    ip = ipaddress.ip_address(address)
    best = [(net.prefixlen, peer) for net, peer in owner.items()
            if net.version == ip.version and ip in net]
    return max(best)[1] if best else None
