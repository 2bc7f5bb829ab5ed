"""TUN offloads without C: virtio-net headers, TSO splitting, checksums, GRO-style merging.

With ``IFF_VNET_HDR`` and ``TUNSETOFFLOAD`` the kernel hands the TUN reader TCP super-packets
of up to 64 KiB (one read instead of ~45) and accepts them back (one write, one pass through
the receiving TCP stack instead of ~45). On the wire we stay WireGuard: every datagram carries
one ordinary, fully checksummed IP packet of at most the MTU, so any WireGuard peer can read
it. This module does the packet surgery: pure functions on bytes, no I/O.

* :func:`split` — a packet read from the TUN device (virtio header + IP packet) → a list of
  wire-ready IP packets (TSO segments with their own IP/TCP headers and checksums; a
  checksum left "partial" by the kernel completed).
* :func:`coalesce` — decrypted IP packets → the buffers to write to the TUN device: runs of
  consecutive segments of one TCP flow merged into one super-packet with a GSO virtio header,
  everything else with an empty header.

Checksums use the identity that the one's-complement sum of 16-bit words equals the big
integer of the bytes modulo 0xFFFF (as 2^16 ≡ 1), which CPython computes at C speed.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_off
VNET_HDR_LEN = VNET_HDR.size  # 10
F_NEEDS_CSUM = 1
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_TCPV6 = 4
GSO_ECN = 0x80
EMPTY_HDR = bytes(VNET_HDR_LEN)

PROTO_TCP = 6
PROTO_UDP = 17
TCP_FIN = 0x01
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_CWR = 0x80
TCP_CHECK = 16  # offset of the checksum in the TCP header
MAX_COALESCED = 65535 - 60  # an IP packet's total length field, headers included

Buffer = bytes | bytearray | memoryview


class OffloadError(ValueError):
    """A packet from the kernel we cannot segment (then it is dropped and counted)."""


def ones_sum(data: Buffer) -> int:
    """The folded one's-complement sum of ``data`` as 16-bit big-endian words (odd length:
    a zero byte is implied at the end). 0 only for all-zero data."""
    value = int.from_bytes(data, "big")
    if len(data) & 1:
        value <<= 8
    if not value:
        return 0
    folded = value % 0xFFFF
    return folded or 0xFFFF


def _add(a: int, b: int) -> int:
    s = a + b
    return (s & 0xFFFF) + (s >> 16)


def checksum(*parts: Buffer) -> int:
    """The Internet checksum over even-length ``parts`` (only the last may be odd)."""
    total = 0
    for part in parts:
        total = _add(total, ones_sum(part))
    return ~total & 0xFFFF


def _pseudo(packet: Buffer, version: int, proto: int, length: int) -> bytes:
    if version == 4:
        return bytes(packet[12:20]) + struct.pack("!BBH", 0, proto, length)
    return bytes(packet[8:40]) + struct.pack("!IxxxB", length, proto)


def ipv4_header_checksum(header: bytearray) -> None:
    header[10:12] = b"\0\0"
    header[10:12] = checksum(header).to_bytes(2, "big")


# --- TUN → wire ----------------------------------------------------------------------------


def split(frame: Buffer) -> list[Buffer]:
    """A TUN read with its virtio header → wire-ready IP packets (see module doc)."""
    if len(frame) < VNET_HDR_LEN + 20:
        raise OffloadError("frame shorter than a virtio header and an IP header")
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(frame)
    packet = memoryview(frame)[VNET_HDR_LEN:]
    kind = gso_type & ~GSO_ECN
    if kind == GSO_NONE:
        if flags & F_NEEDS_CSUM:
            return [_complete_checksum(packet, csum_start, csum_offset)]
        return [packet]
    if kind not in (GSO_TCPV4, GSO_TCPV6) or gso_size <= 0:
        raise OffloadError(f"unsupported GSO type {gso_type}")
    return _segment_tcp(packet, gso_size)


def _complete_checksum(packet: memoryview, start: int, offset: int) -> bytes:
    """The kernel left the L4 checksum partial (pseudo-header sum in place): finish it."""
    end = start + offset + 2
    if start < 20 or end > len(packet):
        raise OffloadError("checksum offsets outside the packet")
    out = bytearray(packet)
    value = checksum(memoryview(out)[start:])
    if value == 0 and out[9 if out[0] >> 4 == 4 else 6] == PROTO_UDP:
        value = 0xFFFF  # UDP: 0 means "no checksum"
    out[start + offset:end] = value.to_bytes(2, "big")
    return bytes(out)


def _segment_tcp(packet: memoryview, mss: int) -> list[Buffer]:
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        if packet[9] != PROTO_TCP:
            raise OffloadError("TSO for a packet that is not TCP")
    elif version == 6:
        ihl = 40
        if packet[6] != PROTO_TCP:
            raise OffloadError("TSO over IPv6 extension headers is not supported")
    else:
        raise OffloadError("TSO for a packet that is not IP")
    if len(packet) < ihl + 20:
        raise OffloadError("truncated TCP header")
    thl = (packet[ihl + 12] >> 4) * 4
    hdr_len = ihl + thl
    if thl < 20 or len(packet) < hdr_len:
        raise OffloadError("truncated TCP header")
    payload = packet[hdr_len:]
    total = len(payload)
    if total <= mss:
        head = bytearray(packet[:hdr_len])
        return [_finish_segment(head, payload, version, ihl, None, 0, True, True)]
    seq0 = int.from_bytes(packet[ihl + 4 : ihl + 8], "big")
    ident = int.from_bytes(packet[4:6], "big") if version == 4 else 0
    template = bytes(packet[:hdr_len])
    out: list[Buffer] = []
    for i, off in enumerate(range(0, total, mss)):
        head = bytearray(template)
        head[ihl + 4 : ihl + 8] = ((seq0 + off) & 0xFFFFFFFF).to_bytes(4, "big")
        last = off + mss >= total
        out.append(_finish_segment(head, payload[off : off + mss], version, ihl,
                                   (ident + i) & 0xFFFF, i, last, False))
    return out


def _finish_segment(head: bytearray, payload: Buffer, version: int, ihl: int,
                    ident: int | None, index: int, last: bool, whole: bool) -> bytes:
    tcp_len = len(head) - ihl + len(payload)
    if version == 4:
        head[2:4] = (ihl + tcp_len).to_bytes(2, "big")
        if ident is not None:
            head[4:6] = ident.to_bytes(2, "big")
        ipv4_header_checksum(memoryview(head)[:ihl])  # type: ignore[arg-type]
    else:
        head[4:6] = tcp_len.to_bytes(2, "big")
    if not whole:
        flags = head[ihl + 13]
        if not last:
            flags &= ~(TCP_FIN | TCP_PSH)
        if index:
            flags &= ~TCP_CWR
        head[ihl + 13] = flags
    head[ihl + TCP_CHECK : ihl + TCP_CHECK + 2] = b"\0\0"
    pseudo = _pseudo(head, version, PROTO_TCP, tcp_len)
    value = checksum(pseudo, memoryview(head)[ihl:], payload)
    head[ihl + TCP_CHECK : ihl + TCP_CHECK + 2] = value.to_bytes(2, "big")
    return bytes(head) + bytes(payload)


# --- wire → TUN ----------------------------------------------------------------------------


def _tcp_key(p: Buffer) -> tuple[int, int, int] | None:
    """(ip header length, tcp header length, version) of a plain TCP segment we may merge:
    IPv4 without options and not fragmented, or IPv6 without extension headers; ACK set and
    no SYN/FIN/RST/URG; some payload."""
    n = len(p)
    if n < 40:
        return None
    version = p[0] >> 4
    if version == 4:
        if p[0] != 0x45 or p[9] != PROTO_TCP or (p[6] & 0x3F) or p[7]:
            return None  # options, or a fragment (MF / offset)
        ihl = 20
    elif version == 6:
        if n < 60 or p[6] != PROTO_TCP:
            return None
        ihl = 40
    else:
        return None
    thl = (p[ihl + 12] >> 4) * 4
    flags = p[ihl + 13]
    if thl < 20 or ihl + thl >= n or flags & ~(TCP_ACK | TCP_PSH | TCP_CWR) or not flags & TCP_ACK:
        return None
    return ihl, thl, version


def _same_flow(a: Buffer, b: Buffer, ihl: int, thl: int, version: int) -> bool:
    if version == 4:
        # TOS, TTL, protocol, addresses; then ports and, after seq/ack, the TCP options.
        return (a[1] == b[1] and a[8:10] == b[8:10] and a[12:20] == b[12:20]
                and a[20:24] == b[20:24] and a[28:32] == b[28:32]
                and a[20 + 14 : 20 + 16] == b[20 + 14 : 20 + 16]
                and a[40 : 20 + thl] == b[40 : 20 + thl])
    return (a[0:4] == b[0:4] and a[7:40] == b[7:40] and a[40:44] == b[40:44]
            and a[48:52] == b[48:52] and a[40 + 14 : 40 + 16] == b[40 + 14 : 40 + 16]
            and a[60 : 40 + thl] == b[60 : 40 + thl])


def coalesce(packets: Iterable[Buffer]) -> list[list[Buffer]]:
    """Decrypted IP packets in arrival order → TUN writes, each a list of buffers for one
    ``writev`` (virtio header first). Consecutive in-order segments of one TCP flow with equal
    payload sizes (the last may be shorter, or carry PSH) become one GSO super-packet."""
    writes: list[list[Buffer]] = []
    run: list[Buffer] = []
    run_info: tuple[int, int, int] | None = None
    next_seq = 0
    mss = 0
    size = 0
    last_closed = False

    def flush() -> None:
        nonlocal run, run_info
        if len(run) == 1:
            writes.append([EMPTY_HDR, run[0]])
        elif run:
            assert run_info is not None
            writes.append(_merge(run, *run_info, mss))
        run = []
        run_info = None

    for p in packets:
        info = _tcp_key(p)
        if info is not None and run_info is not None and not last_closed:
            ihl, thl, version = info
            seq = int.from_bytes(p[ihl + 4 : ihl + 8], "big")
            plen = len(p) - ihl - thl
            if (info == run_info and seq == next_seq and plen <= mss
                    and size + plen <= MAX_COALESCED
                    and _same_flow(run[0], p, ihl, thl, version)):
                run.append(p)
                next_seq = (seq + plen) & 0xFFFFFFFF
                size += plen
                last_closed = plen < mss or bool(p[ihl + 13] & TCP_PSH)
                continue
        flush()
        if info is None:
            writes.append([EMPTY_HDR, p])
            continue
        ihl, thl, version = info
        run = [p]
        run_info = info
        mss = len(p) - ihl - thl
        size = mss
        next_seq = (int.from_bytes(p[ihl + 4 : ihl + 8], "big") + mss) & 0xFFFFFFFF
        last_closed = bool(p[ihl + 13] & TCP_PSH)
    flush()
    return writes


def _merge(run: list[Buffer], ihl: int, thl: int, version: int, mss: int) -> list[Buffer]:
    first, last = run[0], run[-1]
    hdr_len = ihl + thl
    head = bytearray(first[:hdr_len])
    payloads = [memoryview(p)[hdr_len:] for p in run]
    tcp_len = thl + sum(len(x) for x in payloads)
    head[ihl + 13] = first[ihl + 13] | (last[ihl + 13] & TCP_PSH)
    if version == 4:
        head[2:4] = (ihl + tcp_len).to_bytes(2, "big")
        ipv4_header_checksum(memoryview(head)[:ihl])  # type: ignore[arg-type]
        gso = GSO_TCPV4
    else:
        head[4:6] = tcp_len.to_bytes(2, "big")
        gso = GSO_TCPV6
    # A partial checksum, as the kernel's own TSO packets carry: the pseudo-header sum.
    pseudo = ones_sum(_pseudo(head, version, PROTO_TCP, tcp_len))
    head[ihl + TCP_CHECK : ihl + TCP_CHECK + 2] = pseudo.to_bytes(2, "big")
    vnet = VNET_HDR.pack(F_NEEDS_CSUM, gso, hdr_len, mss, ihl, TCP_CHECK)
    return [vnet, head, *payloads]
