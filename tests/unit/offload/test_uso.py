"""UDP segmentation (USO): a UDP super-packet read from the TUN device becomes ordinary
datagrams with their own IP/UDP headers, full or partial checksums (net/offload.py)."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from socialvpn.net.offload import (
    F_NEEDS_CSUM,
    GSO_UDP_L4,
    VNET_HDR,
    OffloadError,
    Segments,
    split,
)
from tests.unit.offload.test_offload import slow_sum

pytestmark = pytest.mark.unit

SRC4, DST4 = bytes([10, 9, 0, 1]), bytes([10, 9, 0, 2])
SRC6, DST6 = ipaddress.ip_address("fd00::1").packed, ipaddress.ip_address("fd00::2").packed


def pseudo_of(p: bytes) -> bytes:
    if p[0] >> 4 == 4:
        ihl = (p[0] & 15) * 4
        return p[12:20] + struct.pack("!BBH", 0, 17, len(p) - ihl)
    return p[8:40] + struct.pack("!IxxxB", len(p) - 40, 17)


def udp_super(payload: bytes, size: int, *, v6: bool = False, ident: int = 9) -> bytes:
    """A USO frame as the kernel hands it over: virtio header, one IP/UDP header for the whole
    write, the pseudo-header sum in the UDP checksum field."""
    udp = bytearray(struct.pack("!HHHH", 40000, 5201, 8 + len(payload), 0) + payload)
    if v6:
        ip = bytearray(struct.pack("!IHBB", 6 << 28, len(udp), 17, 64) + SRC6 + DST6)
        ihl = 40
    else:
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), ident, 0, 64, 17,
                                   0, SRC4, DST4))
        ip[10:12] = (~slow_sum(bytes(ip)) & 0xFFFF).to_bytes(2, "big")
        ihl = 20
    packet = bytes(ip + udp)
    udp[6:8] = slow_sum(pseudo_of(packet)).to_bytes(2, "big")
    vnet = VNET_HDR.pack(F_NEEDS_CSUM, GSO_UDP_L4, ihl + 8, size, ihl, 6)
    return vnet + bytes(ip + udp)


def check_datagram(p: bytes, *, partial: bool) -> bytes:
    """Check one datagram's headers and checksum; return its payload."""
    v6 = p[0] >> 4 == 6
    ihl = 40 if v6 else (p[0] & 15) * 4
    if v6:
        assert int.from_bytes(p[4:6], "big") == len(p) - 40
    else:
        assert int.from_bytes(p[2:4], "big") == len(p)
        assert slow_sum(p[:ihl]) == 0xFFFF
    udp = p[ihl:]
    assert int.from_bytes(udp[4:6], "big") == len(udp)
    field = int.from_bytes(udp[6:8], "big")
    assert field != 0
    if partial:
        assert field == slow_sum(pseudo_of(p))
        # What the receiving kernel does for a partial checksum: sum from the UDP header on.
        done = ~slow_sum(udp) & 0xFFFF or 0xFFFF
        completed = udp[:6] + done.to_bytes(2, "big") + udp[8:]
        assert slow_sum(pseudo_of(p) + completed) == 0xFFFF
    else:
        assert slow_sum(pseudo_of(p) + udp) == 0xFFFF
    return bytes(udp[8:])


@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("length", [1, 1200, 1201, 5000, 12345])
def test_uso_split_makes_valid_datagrams(v6: bool, partial: bool, length: int) -> None:
    payload = bytes(i * 7 % 251 for i in range(length))
    size = 1200
    frame = bytearray(udp_super(payload, size, v6=v6))
    segments = Segments(frame)
    assert len(segments) == -(-length // size)
    assert segments.nbytes == length + len(segments) * ((40 if v6 else 20) + 8)
    segments.partial = partial
    got = []
    for i, view in enumerate(segments):
        datagram = bytes(view)
        got.append(check_datagram(datagram, partial=partial))
        assert len(got[-1]) == min(size, length - i * size)
        if not v6:
            assert int.from_bytes(datagram[4:6], "big") == 9 + i  # IPv4 ids count up
    assert b"".join(got) == payload


def test_split_copies_datagrams_out() -> None:
    payload = b"q" * 3000
    out = split(udp_super(payload, 1000))
    assert [len(p) for p in out] == [1028, 1028, 1028]
    assert b"".join(check_datagram(bytes(p), partial=False) for p in out) == payload


def test_uso_for_a_packet_that_is_not_udp_is_refused() -> None:
    frame = bytearray(udp_super(b"x" * 3000, 1000))
    frame[10 + 9] = 6  # protocol TCP under a UDP GSO type
    with pytest.raises(OffloadError):
        Segments(frame)


def test_truncated_uso_header_is_refused() -> None:
    frame = bytearray(udp_super(b"", 1000))[: 10 + 24]
    with pytest.raises(OffloadError):
        Segments(frame)
