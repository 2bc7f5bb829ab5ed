"""TSO splitting, checksum completion and GRO-style merging (net/offload.py)."""

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
    OffloadError,
    coalesce,
    split,
)

pytestmark = pytest.mark.unit


def slow_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return s


def tcp_valid(p: bytes) -> bool:
    if p[0] >> 4 == 4:
        ihl = (p[0] & 15) * 4
        if slow_sum(p[:ihl]) != 0xFFFF:
            return False
        tcp = p[ihl:]
        pseudo = p[12:20] + struct.pack("!BBH", 0, 6, len(tcp))
    else:
        tcp = p[40:]
        pseudo = p[8:40] + struct.pack("!IxxxB", len(tcp), 6)
    return slow_sum(pseudo + tcp) == 0xFFFF


def tcp_packet(payload: bytes, *, v6: bool = False, seq: int = 1000, flags: int = 0x18,
               options: bytes = b"", partial: bool = False, ident: int = 7) -> bytes:
    thl = 20 + len(options)
    tcp = bytearray(struct.pack("!HHIIBBHHH", 40000, 5201, seq, 555, (thl // 4) << 4, flags,
                                502, 0, 0) + options + payload)
    if v6:
        src, dst = ipaddress.ip_address("fd00::1").packed, ipaddress.ip_address("fd00::2").packed
        ip = bytearray(struct.pack("!IHBB", 6 << 28, len(tcp), 6, 64) + src + dst)
        pseudo = src + dst + struct.pack("!IxxxB", len(tcp), 6)
    else:
        src, dst = bytes([10, 9, 0, 1]), bytes([10, 9, 0, 2])
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), ident, 0x4000, 64,
                                   6, 0, src, dst))
        ip[10:12] = (~slow_sum(bytes(ip)) & 0xFFFF).to_bytes(2, "big")
        pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
    if partial:
        tcp[16:18] = slow_sum(pseudo).to_bytes(2, "big")
    else:
        tcp[16:18] = (~slow_sum(pseudo + bytes(tcp)) & 0xFFFF).to_bytes(2, "big")
    return bytes(ip + tcp)


def test_ones_sum_matches_the_slow_loop() -> None:
    for data in (b"", b"\x01", b"\xff\xff", b"\x12\x34\x56", bytes(range(256)) * 7):
        assert offload.ones_sum(data) == (slow_sum(data) if data.strip(b"\0") else 0)


@given(st.binary(max_size=3000))
@settings(max_examples=500, deadline=None)
def test_ones_sum_property(data: bytes) -> None:
    expected = slow_sum(data)
    got = offload.ones_sum(data)
    assert got == expected or (got == 0xFFFF and expected == 0) or (got == 0 and expected == 0)


@pytest.mark.parametrize("v6", [False, True])
def test_tso_split_makes_valid_segments(v6: bool) -> None:
    payload = bytes(range(256)) * 40  # 10240 bytes
    options = b"\x01\x01\x08\x0a" + b"\x00\x00\x00\x05\x00\x00\x00\x09"
    super_packet = tcp_packet(payload, v6=v6, options=options, partial=True, flags=0x18 | 0x80)
    mss = 1328
    hdr_len = (40 if v6 else 20) + 32
    vnet = VNET_HDR.pack(F_NEEDS_CSUM, GSO_TCPV6 if v6 else GSO_TCPV4, hdr_len, mss,
                         40 if v6 else 20, 16)
    segments = [bytes(s) for s in split(vnet + super_packet)]
    assert len(segments) == -(-len(payload) // mss)
    data = b""
    for i, seg in enumerate(segments):
        assert tcp_valid(seg), i
        ihl = 40 if v6 else 20
        seq = int.from_bytes(seg[ihl + 4 : ihl + 8], "big")
        assert seq == 1000 + i * mss
        flags = seg[ihl + 13]
        assert bool(flags & 0x08) == (i == len(segments) - 1)  # PSH only on the last
        assert bool(flags & 0x80) == (i == 0)  # CWR only on the first
        if not v6:
            assert int.from_bytes(seg[4:6], "big") == 7 + i
        data += seg[hdr_len:]
    assert data == payload


def test_partial_checksum_is_completed() -> None:
    packet = tcp_packet(b"hello world", partial=True)
    vnet = VNET_HDR.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, 20, 16)
    (out,) = split(vnet + packet)
    assert tcp_valid(bytes(out))


def test_plain_packet_passes_untouched() -> None:
    packet = tcp_packet(b"x" * 100)
    (out,) = split(EMPTY_HDR + packet)
    assert bytes(out) == packet


@pytest.mark.parametrize("frame", [b"", b"\0" * 12, VNET_HDR.pack(0, 3, 0, 100, 0, 0) + b"E" * 40,
                                   VNET_HDR.pack(0, GSO_TCPV4, 0, 100, 0, 0) + b"\x45" + b"\0" * 30,
                                   VNET_HDR.pack(F_NEEDS_CSUM, 0, 0, 0, 500, 16) + b"E" * 40])
def test_bad_frames_raise_offload_error(frame: bytes) -> None:
    with pytest.raises(OffloadError):
        split(frame)


@pytest.mark.parametrize("v6", [False, True])
def test_coalesce_merges_a_flow_and_round_trips(v6: bool) -> None:
    mss = 1200
    segs = [tcp_packet(bytes([i]) * mss, v6=v6, seq=5000 + i * mss, flags=0x10)
            for i in range(10)]
    segs.append(tcp_packet(b"z" * 300, v6=v6, seq=5000 + 10 * mss, flags=0x18))
    writes = coalesce(segs)
    assert len(writes) == 1
    buffers = writes[0]
    frame = b"".join(bytes(b) for b in buffers)
    flags, gso, hdr_len, gso_size, start, off = VNET_HDR.unpack_from(frame)
    assert (flags, gso, gso_size, start, off) == (
        F_NEEDS_CSUM, GSO_TCPV6 if v6 else GSO_TCPV4, mss, 40 if v6 else 20, 16)
    # What the kernel would do with it: segmenting again gives the original segments back.
    again = [bytes(s) for s in split(frame)]
    assert [s[hdr_len:] for s in again] == [s[hdr_len:] for s in segs]
    assert all(tcp_valid(s) for s in again)


def test_coalesce_keeps_order_and_breaks_runs() -> None:
    mss = 1000
    a = [tcp_packet(b"a" * mss, seq=1 + i * mss, flags=0x10) for i in range(3)]
    gap = tcp_packet(b"b" * mss, seq=1 + 10 * mss, flags=0x10)  # not contiguous
    syn = tcp_packet(b"", seq=1, flags=0x02)
    udp_like = b"\x45" + b"\0" * 39
    writes = coalesce([*a, gap, syn, udp_like, *a[:1]])
    kinds = [len(w) for w in writes]
    assert kinds == [2 + 3, 2, 2, 2, 2]  # merged(vnet, head, 3 payloads), then singles
    assert writes[1] == [EMPTY_HDR, gap]
    assert writes[2] == [EMPTY_HDR, syn]


@given(st.integers(1, 40), st.integers(200, 1400), st.integers(0, 1399), st.booleans())
@settings(max_examples=200, deadline=None)
def test_split_then_coalesce_round_trip(count: int, mss: int, tail: int, v6: bool) -> None:
    payload = bytes((i * 7) & 0xFF for i in range(count * mss + tail % mss))
    packet = tcp_packet(payload, v6=v6, partial=True, flags=0x10)
    hdr_len = (40 if v6 else 20) + 20
    vnet = VNET_HDR.pack(F_NEEDS_CSUM, GSO_TCPV6 if v6 else GSO_TCPV4, hdr_len, mss,
                         hdr_len - 20, 16)
    segments = [bytes(s) for s in split(vnet + packet)]
    assert all(tcp_valid(s) for s in segments)
    writes = coalesce(segments)
    rebuilt = b"".join(b"".join(bytes(x) for x in w[2:]) if len(w) > 2 else bytes(w[1])[hdr_len:]
                       for w in writes)
    assert rebuilt == payload


@given(st.integers(0, 30), st.integers(100, 1400), st.integers(0, 1399), st.booleans(),
       st.sampled_from([0x10, 0x18, 0x19, 0x98]), st.booleans())
@settings(max_examples=200, deadline=None)
def test_segments_in_place_match_their_sizes(count: int, mss: int, tail: int, v6: bool,
                                             flags: int, options: bool) -> None:
    """Segments made in place: len() and nbytes are what iterating gives, each segment is
    valid while it is the current one, and the payload comes back whole and in order."""
    payload = bytes((i * 13) & 0xFF for i in range(count * mss + tail % mss))
    opts = b"\x01\x01\x08\x0a" + bytes(8) if options else b""
    packet = tcp_packet(payload, v6=v6, partial=True, flags=flags, options=opts)
    ihl = 40 if v6 else 20
    hdr_len = ihl + 20 + len(opts)
    vnet = VNET_HDR.pack(F_NEEDS_CSUM, GSO_TCPV6 if v6 else GSO_TCPV4, hdr_len, mss, ihl, 16)
    frame = bytearray(vnet + packet)
    group = offload.Segments(frame)
    assert bytes(group.head) == packet[:hdr_len]
    seen = []
    for view in group:
        segment = bytes(view)  # consumed before the next one is made
        assert tcp_valid(segment)
        seen.append(segment)
    assert len(seen) == len(group) == max(1, -(-len(payload) // mss))
    assert sum(map(len, seen)) == group.nbytes
    assert b"".join(s[hdr_len:] for s in seen) == payload
    assert seen[-1][ihl + 13] & 0x08 == flags & 0x08  # PSH (and FIN) stay on the last only
    assert all(s[ihl + 13] & 0x09 == 0 for s in seen[:-1])


def test_segments_of_a_frame_read_into_a_larger_buffer() -> None:
    """read_groups gives Segments a reused buffer and the length read."""
    packet = tcp_packet(b"q" * 3000, partial=True)
    vnet = VNET_HDR.pack(F_NEEDS_CSUM, GSO_TCPV4, 40, 1000, 20, 16)
    buf = bytearray(65600)
    frame = vnet + packet
    buf[: len(frame)] = frame
    group = offload.Segments(buf, len(frame))
    assert len(group) == 3 and group.nbytes == 3000 + 3 * 40
    segs = [bytes(v) for v in group]
    assert [len(s) for s in segs] == [1040] * 3 and all(tcp_valid(s) for s in segs)
    single = offload.Segments(bytearray(VNET_HDR.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, 20, 16)
                                        + tcp_packet(b"hi", partial=True)))
    assert len(single) == 1
    (only,) = [bytes(v) for v in single]
    assert tcp_valid(only)


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("change", ["ack", "window", "options", "ttl", "port", "fragment",
                                    "syn", "no-ack"])
def test_coalesce_breaks_runs_where_the_kernel_would(v6: bool, change: str) -> None:
    mss = 500
    opts = b"\x01\x01\x08\x0a" + struct.pack("!II", 5, 9)
    segs = [bytearray(tcp_packet(bytes([i]) * mss, v6=v6, seq=1 + i * mss, flags=0x10,
                                 options=opts)) for i in range(4)]
    ihl = 40 if v6 else 20
    odd = segs[2]
    if change == "ack":
        odd[ihl + 8] ^= 1
    elif change == "window":
        odd[ihl + 14] ^= 1
    elif change == "options":
        odd[ihl + 20 + 7] ^= 1  # the timestamp value
    elif change == "ttl":
        odd[7 if v6 else 8] -= 1
    elif change == "port":
        odd[ihl + 1] ^= 1
    elif change == "fragment":
        if v6:
            odd[6] = 44  # a fragment header follows: not plain TCP
        else:
            odd[6] |= 0x20  # more fragments
    elif change == "syn":
        odd[ihl + 13] |= 0x02
    elif change == "no-ack":
        odd[ihl + 13] &= ~0x10
    writes = coalesce([bytes(s) for s in segs])
    assert [len(w) for w in writes] == [4, 2, 2]  # merged(first two), the odd one, the last
    assert writes[1][1] == bytes(odd)


@given(st.binary(max_size=3000))
@settings(max_examples=500, deadline=None)
def test_sum16_is_ones_sum(data: bytes) -> None:
    got = offload._sum16(memoryview(data))
    assert got == (offload.ones_sum(data) or 0xFFFF)


def test_coalesce_never_builds_a_packet_longer_than_the_length_field() -> None:
    # 60 segments of 1091 bytes (65,460 payload bytes, under MAX_COALESCED) with 40 bytes of
    # TCP options: merged with their 80-byte headers they would exceed 65,535.
    mss, options = 1091, b"\x01" * 40
    segs = [tcp_packet(bytes([i]) * mss, seq=9000 + i * mss, flags=0x10, options=options)
            for i in range(60)]
    writes = coalesce(segs)
    total = 0
    for buffers in writes:
        frame = b"".join(bytes(b) for b in buffers)
        ip = frame[VNET_HDR.size:]
        assert struct.unpack_from("!H", ip, 2)[0] == len(ip) <= 65535
        total += len(ip) - 80
    assert len(writes) == 2 and total == 60 * mss
