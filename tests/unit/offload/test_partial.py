"""Partial checksums between our own peers (net/offload.py, "Partial checksums"), checked
against a small reference kernel written here.

A packet in *partial form* carries the folded pseudo-header sum in its TCP/UDP checksum field.
Written to a TUN device with a ``NEEDS_CSUM`` virtio header it is ``CHECKSUM_PARTIAL`` to the
kernel: accepted locally without verification, and completed when routed on the way
``skb_checksum_help`` does it: ``~fold(sum from csum_start to the end, field included)``,
0 written as 0xFFFF. :func:`kernel_forward` below does exactly that (or, for a packet written
with the empty header, verifies it as the receiving kernel would), and every completed packet
is compared with a checksum computed independently (word by word, field zeroed, pseudo header
built here) - and, for TSO splits, byte for byte with the full-checksum split.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from socialvpn.net import offload
from socialvpn.net.offload import (
    EMPTY_HDR,
    F_NEEDS_CSUM,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    VNET_HDR,
    coalesce,
    partial_header,
    split,
)
from tests.unit.offload.test_offload import slow_sum, tcp_packet, tcp_valid

pytestmark = pytest.mark.unit

TCP, UDP = 6, 17
V4_SRC, V4_DST = bytes([10, 9, 0, 1]), bytes([10, 9, 0, 2])
V6_SRC = ipaddress.ip_address("fd00::1").packed
V6_DST = ipaddress.ip_address("fd00::2").packed
TS_OPTION = b"\x01\x01\x08\x0a" + struct.pack("!II", 5, 9)  # NOP NOP timestamp
IP_OPTION = b"\x94\x04\x00\x00"  # router alert (4 bytes: IHL 6)


# --- building packets (TCP: tcp_packet of test_offload) --------------------------------------


def ipv4(l4: bytes, proto: int, *, options: bytes = b"", frag: int = 0x4000,
         ident: int = 7) -> bytes:
    """An IPv4 packet around ``l4`` with a valid header checksum."""
    ihl = 20 + len(options)
    assert ihl % 4 == 0
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl // 4, 0, ihl + len(l4), ident, frag,
                               64, proto, 0, V4_SRC, V4_DST) + options)
    ip[10:12] = (~slow_sum(bytes(ip)) & 0xFFFF).to_bytes(2, "big")
    return bytes(ip) + l4


def ipv6(l4: bytes, next_header: int, *, ext: bytes = b"") -> bytes:
    return struct.pack("!IHBB", 6 << 28, len(ext) + len(l4), next_header, 64) + V6_SRC + \
        V6_DST + ext + l4


def with_ip_options(packet: bytes, options: bytes) -> bytes:
    """An IPv4 ``packet`` (20-byte header) with IP ``options`` inserted (the TCP/UDP pseudo
    header does not include them: the L4 checksum stays what it was)."""
    assert packet[0] == 0x45
    return ipv4(packet[20:], packet[9], options=options, frag=struct.unpack_from("!H", packet,
                6)[0], ident=struct.unpack_from("!H", packet, 4)[0])


def pseudo_header(packet: bytes, start: int, proto: int) -> bytes:
    length = len(packet) - start
    if packet[0] >> 4 == 4:
        return packet[12:20] + struct.pack("!BBH", 0, proto, length)
    return packet[8:40] + struct.pack("!IxxxB", length, proto)


def udp_packet(payload: bytes, *, v6: bool = False, csum: str = "full",
               ip_options: bytes = b"") -> bytes:
    """A UDP packet; ``csum``: "full", "partial" (pseudo-header sum, as the kernel leaves it
    for NEEDS_CSUM) or "zero" (IPv4: no checksum)."""
    udp = bytearray(struct.pack("!HHHH", 40000, 5002, 8 + len(payload), 0) + payload)
    packet = bytearray(ipv6(bytes(udp), UDP) if v6 else ipv4(bytes(udp), UDP,
                                                             options=ip_options))
    start = 40 if v6 else 20 + len(ip_options)
    pseudo = pseudo_header(bytes(packet), start, UDP)
    if csum == "full":
        value = ~slow_sum(pseudo + bytes(udp)) & 0xFFFF or 0xFFFF
    elif csum == "partial":
        value = slow_sum(pseudo)
    else:
        assert csum == "zero"
        value = 0
    packet[start + 6 : start + 8] = value.to_bytes(2, "big")
    return bytes(packet)


def l4_where(packet: bytes) -> tuple[int, int, int]:
    """(start, checksum offset, protocol) of the TCP/UDP header of a plain packet (the test's
    own parse)."""
    if packet[0] >> 4 == 4:
        start, proto = (packet[0] & 15) * 4, packet[9]
    else:
        start, proto = 40, packet[6]
    assert proto in (TCP, UDP), proto
    return start, (16 if proto == TCP else 6), proto


def field(packet: bytes) -> int:
    start, offset, _ = l4_where(packet)
    return int.from_bytes(packet[start + offset : start + offset + 2], "big")


# --- the reference kernel --------------------------------------------------------------------


def full_checksum(packet: bytes) -> int:
    """The checksum a packet's TCP/UDP header should carry, computed from scratch (UDP: 0 is
    sent as 0xFFFF)."""
    start, offset, proto = l4_where(packet)
    l4 = bytearray(packet[start:])
    l4[offset : offset + 2] = b"\0\0"
    value = ~slow_sum(pseudo_header(packet, start, proto) + bytes(l4)) & 0xFFFF
    return value or (0xFFFF if proto == UDP else 0)


def same_checksum(got: int, want: int, proto: int) -> bool:
    """Equal, or (TCP) both spellings of one's-complement zero."""
    return got == want or (proto == TCP and {got, want} == {0, 0xFFFF})


def same_packet(a: bytes, b: bytes) -> bool:
    """Equal bytes but for the TCP/UDP checksum field, whose values are the same checksum."""
    start, offset, proto = l4_where(a)
    at = start + offset
    return (a[:at] + a[at + 2 :] == b[:at] + b[at + 2 :]
            and same_checksum(field(a), field(b), proto))


def l4_valid(packet: bytes) -> bool:
    """What the receiving kernel checks for a packet without NEEDS_CSUM (IPv4: also the
    header checksum)."""
    start, _offset, proto = l4_where(packet)
    if packet[0] >> 4 == 4:
        if slow_sum(packet[:start]) != 0xFFFF:
            return False
        if proto == UDP and field(packet) == 0:
            return True  # no checksum
    return slow_sum(pseudo_header(packet, start, proto) + packet[start:]) == 0xFFFF


def kernel_complete(hdr: bytes, packet: bytes) -> bytes:
    """``skb_checksum_help`` for a packet written with ``NEEDS_CSUM``: the sum from
    csum_start to the end, field included, folded and inverted into the field."""
    flags, gso, hdr_len, gso_size, start, offset = VNET_HDR.unpack(hdr)
    assert (flags, gso, hdr_len, gso_size) == (F_NEEDS_CSUM, GSO_NONE, 0, 0), hdr
    assert start + offset + 2 <= len(packet)
    value = ~slow_sum(packet[start:]) & 0xFFFF
    out = bytearray(packet)
    out[start + offset : start + offset + 2] = (value or 0xFFFF).to_bytes(2, "big")
    return bytes(out)


def kernel_forward(hdr: bytes, packet: bytes) -> bytes:
    """The packet as a receiving kernel routes it on: completed if written with NEEDS_CSUM,
    else verified as it is (a kernel drops what fails: here, an assertion)."""
    out = packet if hdr == EMPTY_HDR else kernel_complete(hdr, packet)
    assert l4_valid(out), f"the kernel would drop {out.hex()}"
    return out


def partial_hdr(start: int, offset: int) -> bytes:
    return VNET_HDR.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, start, offset)


def check_partial_form(packet: bytes) -> bytes:
    """``packet`` is in partial form: its field is the pseudo-header sum, its header is
    NEEDS_CSUM at its TCP/UDP checksum; returns it completed (checked against full_checksum)."""
    start, offset, proto = l4_where(packet)
    assert field(packet) == slow_sum(pseudo_header(packet, start, proto))
    hdr = partial_header(packet)
    assert hdr == partial_hdr(start, offset)
    done = kernel_forward(hdr, packet)
    assert same_checksum(field(done), full_checksum(packet), proto)
    at = start + offset
    assert done[:at] + done[at + 2 :] == packet[:at] + packet[at + 2 :]  # only the field moved
    return done


def test_the_reference_kernel_catches_mistakes() -> None:
    """The checks below would see a wrong form: a partial-form packet written without
    NEEDS_CSUM is dropped, a full checksum written with it is completed wrongly."""
    full = tcp_packet(b"abc" * 101)
    partial = tcp_packet(b"abc" * 101, partial=True)
    assert l4_valid(full) and not l4_valid(partial)
    with pytest.raises(AssertionError):
        kernel_forward(EMPTY_HDR, partial)
    with pytest.raises(AssertionError):
        kernel_forward(partial_hdr(20, 16), full)
    assert kernel_forward(partial_hdr(20, 16), partial) == full
    assert kernel_forward(EMPTY_HDR, full) == full


# --- TSO splits in partial form --------------------------------------------------------------


def tso_frame(payload: bytes, *, v6: bool, mss: int, tcp_options: bytes = b"",
              ip_options: bytes = b"", flags: int = 0x18) -> tuple[bytes, int, int]:
    """(virtio header + super-packet as the kernel hands it out, IP header length, headers
    length)."""
    packet = tcp_packet(payload, v6=v6, options=tcp_options, partial=True, flags=flags)
    if ip_options:
        packet = with_ip_options(packet, ip_options)
    ihl = 40 if v6 else 20 + len(ip_options)
    hdr_len = ihl + 20 + len(tcp_options)
    vnet = VNET_HDR.pack(F_NEEDS_CSUM, GSO_TCPV6 if v6 else GSO_TCPV4, hdr_len, mss, ihl, 16)
    return vnet + packet, ihl, hdr_len


def check_tso(payload: bytes, *, v6: bool, mss: int, tcp_options: bytes = b"",
              ip_options: bytes = b"", flags: int = 0x18) -> list[bytes]:
    frame, ihl, hdr_len = tso_frame(payload, v6=v6, mss=mss, tcp_options=tcp_options,
                                    ip_options=ip_options, flags=flags)
    partial = [bytes(s) for s in split(frame, partial=True)]
    full = [bytes(s) for s in split(frame)]
    assert len(partial) == len(full) == max(1, -(-len(payload) // mss))
    completed = []
    for i, (seg, want) in enumerate(zip(partial, full, strict=True)):
        assert len(seg) == len(want) == hdr_len + min(mss, len(payload) - i * mss)
        if not v6:
            assert slow_sum(seg[:ihl]) == 0xFFFF, f"segment {i}: IPv4 header checksum"
        done = check_partial_form(seg)
        assert tcp_valid(want), f"segment {i}: full split invalid"
        # Completed by the kernel, the partial segment is the full-checksum segment.
        at = ihl + 16
        assert done[:at] + done[at + 2 :] == want[:at] + want[at + 2 :], f"segment {i}"
        assert same_checksum(field(done), field(want), TCP), f"segment {i}"
        completed.append(done)
    assert b"".join(s[hdr_len:] for s in partial) == payload
    return completed


PAYLOAD_SIZES = [1, 7, 535, 537, 1327, 1329, 3 * 1328 + 1, 9 * 1000 + 333, 40001]


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("mss", [536, 1000, 1328, 1441])
@pytest.mark.parametrize("size", PAYLOAD_SIZES)
def test_tso_split_in_partial_form_completes_to_the_full_split(v6: bool, mss: int,
                                                               size: int) -> None:
    payload = bytes((i * 31 + 7) & 0xFF for i in range(size))
    check_tso(payload, v6=v6, mss=mss)


OPTION_CASES = [(v6, ip_opts, tcp_opts) for v6 in (False, True)
                for ip_opts in ((b"",) if v6 else (b"", IP_OPTION, IP_OPTION * 10))
                for tcp_opts in (b"", TS_OPTION, b"\x01" * 40)]


@pytest.mark.parametrize(("v6", "ip_options", "tcp_options"), OPTION_CASES,
                         ids=[f"ipv{6 if v6 else 4}-ipopt{len(i)}-tcpopt{len(t)}"
                              for v6, i, t in OPTION_CASES])
def test_tso_split_with_options(v6: bool, ip_options: bytes, tcp_options: bytes) -> None:
    payload = bytes((i * 13) & 0xFF for i in range(5 * 1200 + 601))
    done = check_tso(payload, v6=v6, mss=1200, tcp_options=tcp_options,
                     ip_options=ip_options, flags=0x18 | 0x80)
    ihl = 40 if v6 else 20 + len(ip_options)
    assert all(s[ihl + 20 : ihl + 20 + len(tcp_options)] == tcp_options for s in done)


@given(st.booleans(), st.integers(100, 1460), st.integers(1, 20000), st.booleans(),
       st.sampled_from([0x10, 0x18, 0x19, 0x98]), st.binary(min_size=0, max_size=64))
@settings(max_examples=150, deadline=None)
def test_tso_split_partial_property(v6: bool, mss: int, size: int, options: bool, flags: int,
                                    seed: bytes) -> None:
    payload = (seed or b"\xa5") * (size // max(1, len(seed)) + 1)
    check_tso(payload[:size], v6=v6, mss=mss, tcp_options=TS_OPTION if options else b"",
              flags=flags)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize(("size", "total"), [(1, 5), (200, 4001), (1000, 1000), (1331, 13311),
                                             (1352, 64000)])
def test_uso_split_in_partial_form_completes_to_the_full_split(v6: bool, size: int,
                                                               total: int) -> None:
    """UDP super-packets (USO) cut into datagrams in partial form: each completes to the
    datagram of the full-checksum split."""
    payload = bytes((i * 29 + 3) & 0xFF for i in range(total))
    packet = udp_packet(payload, v6=v6, csum="partial")
    ihl = 40 if v6 else 20
    frame = VNET_HDR.pack(F_NEEDS_CSUM, offload.GSO_UDP_L4, ihl + 8, size, ihl, 6) + packet
    partial = [bytes(p) for p in split(frame, partial=True)]
    full = [bytes(p) for p in split(frame)]
    assert len(partial) == len(full) == -(-total // size)
    for i, (datagram, want) in enumerate(zip(partial, full, strict=True)):
        assert l4_valid(want), i
        assert check_partial_form(datagram) == want, i
    assert b"".join(d[ihl + 8 :] for d in partial) == payload


# --- single packets: the kernel's NEEDS_CSUM, full checksums ---------------------------------

PLAIN = {
    "tcp4": lambda payload: tcp_packet(payload, partial=True),
    "tcp6": lambda payload: tcp_packet(payload, v6=True, partial=True),
    "udp4": lambda payload: udp_packet(payload, csum="partial"),
    "udp6": lambda payload: udp_packet(payload, v6=True, csum="partial"),
    "tcp4-ipopt": lambda payload: with_ip_options(tcp_packet(payload, partial=True),
                                                  IP_OPTION * 3),
    "udp4-ipopt": lambda payload: udp_packet(payload, csum="partial", ip_options=IP_OPTION),
}
FULL = {
    "tcp4": lambda payload: tcp_packet(payload),
    "tcp6": lambda payload: tcp_packet(payload, v6=True),
    "udp4": lambda payload: udp_packet(payload),
    "udp6": lambda payload: udp_packet(payload, v6=True),
    "tcp4-ipopt": lambda payload: with_ip_options(tcp_packet(payload), IP_OPTION * 3),
    "udp4-ipopt": lambda payload: udp_packet(payload, ip_options=IP_OPTION),
}


@pytest.mark.parametrize("kind", list(PLAIN))
@pytest.mark.parametrize("size", [0, 1, 2, 3, 99, 1000, 1331])
def test_kernel_needs_csum_frame_stays_in_partial_form(kind: str, size: int) -> None:
    """A non-GSO NEEDS_CSUM frame at the plain TCP/UDP checksum: already partial form (no
    pass over the payload); the receiver's header is the one the kernel gave."""
    payload = bytes((i * 7 + size) & 0xFF for i in range(size))
    packet = PLAIN[kind](payload)
    start, offset, _ = l4_where(packet)
    vnet = partial_hdr(start, offset)
    (out,) = [bytes(p) for p in split(vnet + packet, partial=True)]
    assert out == packet
    assert partial_header(out) == vnet
    done = check_partial_form(out)
    (full,) = [bytes(p) for p in split(vnet + packet)]  # the full-checksum path
    assert same_packet(done, full) and same_packet(done, FULL[kind](payload))


@pytest.mark.parametrize("kind", list(FULL))
@pytest.mark.parametrize("size", [0, 1, 2, 3, 99, 1000, 1331])
def test_full_checksum_frames_cross_as_they_are(kind: str, size: int) -> None:
    """A packet the kernel hands out with a full checksum (empty header: e.g. routed in from
    elsewhere) crosses unchanged in partial mode too, and the receiver's header for it lets
    its kernel verify it."""
    payload = bytes((i * 11 + size) & 0xFF for i in range(size))
    packet = FULL[kind](payload)
    assert l4_valid(packet)
    (out,) = [bytes(p) for p in split(EMPTY_HDR + packet, partial=True)]
    assert out == packet
    assert kernel_forward(partial_header(out), out) == packet
    (same,) = [bytes(p) for p in split(EMPTY_HDR + packet)]  # full mode: untouched too
    assert same == packet


@given(st.sampled_from(list(FULL)), st.binary(max_size=1400))
@settings(max_examples=300, deadline=None)
def test_a_full_checksum_is_read_right_whatever_its_value(kind: str, payload: bytes) -> None:
    packet = FULL[kind](payload)
    assert kernel_forward(partial_header(packet), packet) == packet


def _full_checksum_equal_to_pseudo_sum(proto: int, v6: bool) -> bytes:
    """A valid full-checksum packet whose checksum field happens to equal its pseudo-header
    sum (the last two payload bytes chosen for it): the receiver takes it for partial form."""
    payload = bytearray(b"coincidence!" * 5 + b"\0\0")
    packet = bytearray(tcp_packet(bytes(payload), v6=v6) if proto == TCP
                       else udp_packet(bytes(payload), v6=v6))
    start, offset, _ = l4_where(bytes(packet))
    pseudo = slow_sum(pseudo_header(bytes(packet), start, proto))
    packet[start + offset : start + offset + 2] = b"\0\0"
    rest = slow_sum(bytes(packet[start:]))
    # Want ~fold(pseudo + rest + x) == pseudo, i.e. rest + x == ~pseudo - pseudo (mod 0xFFFF).
    x = ((0xFFFF - pseudo) - pseudo - rest) % 0xFFFF
    packet[-2:] = x.to_bytes(2, "big")
    packet[start + offset : start + offset + 2] = pseudo.to_bytes(2, "big")
    out = bytes(packet)
    assert l4_valid(out) and field(out) == pseudo
    return out


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("proto", [TCP, UDP], ids=["tcp", "udp"])
def test_a_full_checksum_equal_to_the_pseudo_sum_is_harmless(v6: bool, proto: int) -> None:
    """Read as partial form, completing it gives the very same checksum back."""
    packet = _full_checksum_equal_to_pseudo_sum(proto, v6)
    hdr = partial_header(packet)
    assert hdr != EMPTY_HDR
    assert kernel_forward(hdr, packet) == packet


def _with_checksum_all_ones(v6: bool, proto: int) -> bytes:
    """A full-checksum packet whose computed checksum is 0 (sent as 0xFFFF by UDP, 0 by TCP):
    its last two payload bytes chosen to make the sum 0xFFFF."""
    payload = bytearray(b"zero-sum" * 7 + b"\0\0")  # even length: the last word aligned
    packet = tcp_packet(bytes(payload), v6=v6) if proto == TCP else udp_packet(bytes(payload),
                                                                               v6=v6)
    buf = bytearray(packet)
    start, offset, _ = l4_where(packet)
    buf[start + offset : start + offset + 2] = b"\0\0"
    rest = slow_sum(pseudo_header(packet, start, proto) + bytes(buf[start:]))
    buf[-2:] = (~rest & 0xFFFF).to_bytes(2, "big")
    buf[start + offset : start + offset + 2] = (0xFFFF if proto == UDP else 0).to_bytes(2, "big")
    out = bytes(buf)
    assert l4_valid(out) and full_checksum(out) == (0xFFFF if proto == UDP else 0)
    return out


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("proto", [TCP, UDP], ids=["tcp", "udp"])
def test_a_checksum_of_zero_round_trips(v6: bool, proto: int) -> None:
    """The sum that folds to 0xFFFF (UDP's 0xFFFF is not "no checksum"): crosses as it is
    and verifies."""
    packet = _with_checksum_all_ones(v6, proto)
    (out,) = [bytes(p) for p in split(EMPTY_HDR + packet, partial=True)]
    assert out == packet
    assert kernel_forward(partial_header(out), out) == packet


def test_udp_over_ipv4_without_checksum_stays_zero() -> None:
    for payload in (b"", b"x", b"no checksum here" * 50):
        for options in (b"", IP_OPTION):
            packet = udp_packet(payload, csum="zero", ip_options=options)
            assert l4_valid(packet)
            (out,) = [bytes(p) for p in split(EMPTY_HDR + packet, partial=True)]
            assert out == packet and field(out) == 0
            assert partial_header(packet) == EMPTY_HDR
            assert kernel_forward(partial_header(packet), packet) == packet
            assert coalesce([packet]) == [[EMPTY_HDR, packet]]


def test_ipv6_extension_headers_with_needs_csum_are_completed_in_full() -> None:
    """The kernel's NEEDS_CSUM behind an IPv6 extension header (not plain): the sender
    completes it, the receiver writes it with the empty header (the kernel verifies)."""
    udp = bytearray(struct.pack("!HHHH", 1, 2, 8 + 300, 0) + bytes(range(150)) * 2)
    hop_by_hop = bytes([UDP, 0]) + b"\x01\x04\0\0\0\0"  # next: UDP, PadN
    packet = bytearray(ipv6(bytes(udp), 0, ext=hop_by_hop))
    start = 48
    pseudo = packet[8:40] + struct.pack("!IxxxB", len(udp), UDP)
    packet[start + 6 : start + 8] = slow_sum(bytes(pseudo)).to_bytes(2, "big")
    (out,) = [bytes(p) for p in split(partial_hdr(start, 6) + bytes(packet), partial=True)]
    assert partial_header(out) == EMPTY_HDR
    assert slow_sum(bytes(pseudo) + out[start:]) == 0xFFFF  # a full, valid checksum


# --- what is not plain TCP/UDP is left alone --------------------------------------------------


def _not_plain() -> dict[str, bytes]:
    tcp = tcp_packet(b"t" * 200)
    udp = udp_packet(b"u" * 200)
    tcp6 = tcp_packet(b"t" * 200, v6=True)
    udp6 = udp_packet(b"u" * 200, v6=True)
    icmp = struct.pack("!BBHHH", 8, 0, 0, 1, 1) + b"ping" * 10
    icmp = icmp[:2] + (~slow_sum(icmp) & 0xFFFF).to_bytes(2, "big") + icmp[4:]
    ext = bytes([UDP, 0]) + b"\x01\x04\0\0\0\0"
    return {
        "ipv4-tcp-more-fragments": ipv4(tcp[20:], TCP, frag=0x2000),
        "ipv4-udp-more-fragments": ipv4(udp[20:], UDP, frag=0x2000),
        "ipv4-udp-fragment-offset": ipv4(b"rest of a datagram" * 5, UDP, frag=185),
        "ipv4-tcp-fragment-offset-high-bits": ipv4(tcp[20:], TCP, frag=0x1F00),
        "ipv4-icmp": ipv4(icmp, 1),
        "ipv6-icmp": ipv6(icmp, 58),
        "ipv6-hop-by-hop-udp": ipv6(udp6[40:], 0, ext=ext),
        "ipv6-dest-options-tcp": ipv6(tcp6[40:], 60, ext=bytes([TCP]) + ext[1:]),
        "ipv6-routing-tcp": ipv6(tcp6[40:], 43, ext=bytes([TCP, 0, 0, 0]) + bytes(4)),
        "ipv6-fragment-udp": ipv6(udp6[40:], 44, ext=bytes([UDP, 0, 0, 1]) + bytes(4)),
        "ipv4-tcp-truncated": tcp[:39],
        "ipv4-udp-truncated": udp[:27],
        "ipv4-options-tcp-truncated": with_ip_options(tcp, IP_OPTION * 2)[:28 + 19],
        "ipv4-options-udp-truncated": with_ip_options(udp, IP_OPTION * 3)[:32 + 7],
        "ipv4-bad-ihl": bytes([0x44]) + tcp[1:],
        "ipv6-tcp-truncated": tcp6[:59],
        "ipv6-udp-truncated": udp6[:47],
        "ipv6-header-only": tcp6[:40],
        "not-ip": bytes([0x55]) + tcp[1:],
        "ipv4-gre": ipv4(b"\0" * 40, 47),
    }


NOT_PLAIN = _not_plain()


@pytest.mark.parametrize("name", list(NOT_PLAIN))
def test_not_plain_packets_are_left_alone(name: str) -> None:
    packet = NOT_PLAIN[name]
    assert partial_header(packet) == EMPTY_HDR
    (out,) = [bytes(p) for p in split(EMPTY_HDR + packet, partial=True)]
    assert out == packet
    assert coalesce([packet]) == [[EMPTY_HDR, packet]]


@pytest.mark.parametrize("size", range(0, 48))
def test_short_packets_are_left_alone(size: int) -> None:
    for packet in (tcp_packet(b"x" * 30)[:size], udp_packet(b"y" * 30)[:size],
                   tcp_packet(b"x" * 30, v6=True)[:size], udp_packet(b"y" * 30, v6=True)[:size]):
        if len(packet) >= l4_min(packet):
            continue  # a whole header: plain (tested above)
        assert partial_header(packet) == EMPTY_HDR


def l4_min(packet: bytes) -> int:
    """The shortest plain packet of this kind: IP header and the whole TCP/UDP header."""
    if not packet:
        return 1
    v6 = packet[0] >> 4 == 6
    proto = (packet[6] if len(packet) > 6 else 0) if v6 else (packet[9] if len(packet) > 9
                                                              else 0)
    return (40 if v6 else 20) + (20 if proto == TCP else 8)


# --- coalesce: each packet's form told from the packet ----------------------------------------


def _segments(v6: bool, count: int, mss: int = 1000, *, partial: bool = True) -> list[bytes]:
    """Segments of one flow, as split(partial=...) makes them."""
    payload = bytes((i * 5) & 0xFF for i in range(count * mss - 123))
    frame, _ihl, _hdr_len = tso_frame(payload, v6=v6, mss=mss, flags=0x10)
    return [bytes(s) for s in split(frame, partial=partial)]


def _frames(writes: list[list[offload.Buffer]]) -> list[bytes]:
    return [b"".join(bytes(b) for b in w) for w in writes]


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_coalesce_single_packets_get_needs_csum(v6: bool) -> None:
    ihl = 40 if v6 else 20
    lone = _segments(v6, 1)[0]
    syn = tcp_packet(b"", v6=v6, flags=0x02, partial=True)
    fin = tcp_packet(b"bye", v6=v6, flags=0x11, partial=True)
    udp = udp_packet(b"datagram" * 9, v6=v6, csum="partial")
    empty_udp = udp_packet(b"", v6=v6, csum="partial")
    packets = [lone, syn, udp, fin, empty_udp]
    writes = coalesce(packets)
    assert [w[1] for w in writes] == packets  # each alone, in order
    assert [w[0] for w in writes] == [partial_hdr(ihl, 16), partial_hdr(ihl, 16),
                                      partial_hdr(ihl, 6), partial_hdr(ihl, 16),
                                      partial_hdr(ihl, 6)]
    for hdr, packet in writes:
        done = kernel_forward(hdr, packet)
        assert same_checksum(field(done), full_checksum(packet), l4_where(packet)[2])


def test_coalesce_single_packets_with_ip_options() -> None:
    tcp = with_ip_options(tcp_packet(b"o" * 500, flags=0x10, partial=True), IP_OPTION * 2)
    udp = udp_packet(b"o" * 500, csum="partial", ip_options=IP_OPTION)
    writes = coalesce([tcp, udp])
    assert writes == [[partial_hdr(28, 16), tcp], [partial_hdr(24, 6), udp]]
    for hdr, packet in writes:
        kernel_forward(hdr, packet)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_coalesce_merged_runs_are_the_same_from_full_or_partial_segments(v6: bool) -> None:
    """A merged run always gets a GSO NEEDS_CSUM header with the pseudo-header sum: the same
    whether its segments came full, partial, or mixed (a peer switching modes)."""
    partial_segs = _segments(v6, 12)
    full_segs = _segments(v6, 12, partial=False)
    mixed = [p if i % 2 else f for i, (p, f) in enumerate(zip(partial_segs, full_segs,
                                                             strict=True))]
    reference = _frames(coalesce(full_segs))
    assert len(reference) == 1
    assert _frames(coalesce(partial_segs)) == reference
    assert _frames(coalesce(mixed)) == reference
    # The merged super-packet is sound: completed as one packet it verifies, and the kernel's
    # segmentation (with checksums) gives back the full segments.
    merged = reference[0]
    vflags, gso, hdr_len, mss, start, offset = VNET_HDR.unpack_from(merged)
    assert (vflags, gso, mss, start, offset) == (F_NEEDS_CSUM, GSO_TCPV6 if v6 else GSO_TCPV4,
                                                 1000, 40 if v6 else 20, 16)
    super_packet = merged[VNET_HDR.size :]
    assert l4_valid(kernel_complete(partial_hdr(start, offset), super_packet))
    assert [bytes(s) for s in split(merged)] == full_segs


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_coalesce_reads_each_packets_form(v6: bool) -> None:
    """A run of one, and every packet that merges with nothing, gets the header of its own
    form: NEEDS_CSUM in partial form, empty with a full checksum."""
    ihl = 40 if v6 else 20
    run = _segments(v6, 4)
    other = _segments(v6, 3)  # the same flow from its start again: a new run
    udp_p = udp_packet(b"p" * 100, v6=v6, csum="partial")
    udp_f = udp_packet(b"f" * 100, v6=v6)
    syn_f = tcp_packet(b"", v6=v6, flags=0x02)
    packets = [*run, udp_p, udp_f, other[0], syn_f, *other[1:], run[0]]
    writes = coalesce(packets)
    assert len(writes) == 7, [(len(w), w[0]) for w in writes]
    assert writes[0][0][0] == F_NEEDS_CSUM and len(writes[0]) == 2 + 4  # merged run of 4
    assert writes[1] == [partial_hdr(ihl, 6), udp_p]
    assert writes[2] == [EMPTY_HDR, udp_f]
    assert writes[3] == [partial_hdr(ihl, 16), other[0]]  # run of one
    assert writes[4] == [EMPTY_HDR, syn_f]
    assert writes[5][0][0] == F_NEEDS_CSUM and len(writes[5]) == 2 + 2  # other[1:], merged
    assert writes[6] == [partial_hdr(ihl, 16), run[0]]
    for hdr, *parts in writes:
        if len(parts) == 1:
            kernel_forward(hdr, bytes(parts[0]))


@given(st.lists(st.sampled_from(["seg", "full-seg", "udp", "udp-full", "syn", "frag", "udp0"]),
                min_size=1, max_size=30), st.booleans())
@settings(max_examples=200, deadline=None)
def test_coalesce_form_property(items: list[str], v6: bool) -> None:
    """Whatever the mix: packets stay in order, every single write's header is
    partial_header(packet), and each one the receiving kernel gets is sound."""
    segs = iter(_segments(v6, 31, mss=200))
    full_segs = iter(_segments(v6, 31, mss=200, partial=False))
    packets: list[bytes] = []
    for kind in items:
        if kind == "seg":
            packets.append(next(segs))
            next(full_segs)
        elif kind == "full-seg":
            packets.append(next(full_segs))
            next(segs)
        elif kind == "udp":
            packets.append(udp_packet(b"u" * 33, v6=v6, csum="partial"))
        elif kind == "udp-full":
            packets.append(udp_packet(b"u" * 33, v6=v6))
        elif kind == "syn":
            packets.append(tcp_packet(b"", v6=v6, flags=0x02, partial=True))
        elif kind == "udp0":
            packets.append(udp_packet(b"z" * 10, csum="zero") if not v6 else
                           udp_packet(b"z" * 10, v6=True))
        else:
            packets.append(NOT_PLAIN["ipv6-fragment-udp" if v6 else "ipv4-udp-more-fragments"])
    writes = coalesce(packets)
    index = 0
    for hdr, *parts in writes:
        if hdr[1] != GSO_NONE:  # a merged run of segments
            assert l4_valid(kernel_complete(partial_hdr(hdr[6] | hdr[7] << 8, 16),
                                            b"".join(bytes(p) for p in parts)))
            index += len(parts) - 1  # its head, then each segment's payload
            continue
        (packet,) = parts
        assert packet is packets[index]
        assert hdr == partial_header(packet), index
        if items[index] not in ("frag",):
            kernel_forward(hdr, bytes(packet))
        index += 1
    assert index == len(packets)


# --- a checksum that was already bad ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["tcp4", "tcp6", "udp4", "udp6"])
def test_a_bad_checksum_is_not_made_good(kind: str) -> None:
    """A packet corrupted before it reached the sender (one payload byte changed after its
    checksum was made): in either mode it crosses with its bad checksum and the receiving
    kernel verifies (and drops) it - never routes it on with a checksum made valid."""
    packet = bytearray(FULL[kind](bytes(range(200))))
    packet[-50] ^= 0x40  # corrupted on a LAN before the tunnel
    corrupted = bytes(packet)
    assert not l4_valid(corrupted)
    for partial in (False, True):
        wire = [bytes(p) for p in split(EMPTY_HDR + corrupted, partial=partial)]
        assert wire == [corrupted]
        assert coalesce(wire) == [[EMPTY_HDR, corrupted]]


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
def test_a_bad_segment_is_not_merged(v6: bool, partial: bool) -> None:
    """In a run of TCP segments, one whose full checksum is bad (corrupted before the tunnel,
    routed in) breaks the run: written alone with the empty header, the kernel drops it, and
    the segments before and after still merge."""
    segs = _segments(v6, 9, partial=partial)
    full = _segments(v6, 9, partial=False)
    bad = bytearray(full[4])
    bad[-10] ^= 0x01
    packets = [*segs[:4], bytes(bad), *segs[5:]]
    writes = coalesce(packets)
    assert len(writes) == 3
    assert writes[0][0][1] != GSO_NONE and len(writes[0]) == 2 + 4
    assert writes[1] == [EMPTY_HDR, bytes(bad)] and not l4_valid(bytes(bad))
    assert writes[2][0][1] != GSO_NONE and len(writes[2]) == 2 + 4
