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
from collections.abc import Iterable, Iterator

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

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


def _fold(value: int) -> int:
    """Fold a non-negative sum of 16-bit words to 16 bits (end-around carry)."""
    while value >> 16:
        value = (value & 0xFFFF) + (value >> 16)
    return value


class Segments:
    """The wire-ready IP packets of one TUN read, made lazily and **in place** in ``frame``.

    ``len()`` is the number of packets, :attr:`nbytes` their total size, :attr:`head` a view of
    the first IP header (for routing). Iterating yields memoryviews into ``frame``; a TSO
    segment's headers are written over the tail of the previous segment's payload, so **each
    view is valid only until the next one is requested** (consume it - seal, copy - first).
    Iterate once. ``frame`` must be writable (a ``bytearray`` the reader owns)."""

    __slots__ = ("_frame", "_mss", "_csum", "count", "head", "nbytes")

    def __init__(self, frame: bytearray | memoryview, length: int | None = None) -> None:
        n = len(frame) if length is None else length
        if n < VNET_HDR_LEN + 20:
            raise OffloadError("frame shorter than a virtio header and an IP header")
        view = memoryview(frame)[:n]
        flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(view)
        self._frame = view
        self._csum = (csum_start, csum_offset) if flags & F_NEEDS_CSUM else None
        kind = gso_type & ~GSO_ECN
        packet = view[VNET_HDR_LEN:]
        if kind == GSO_NONE:
            if self._csum is not None and (csum_start < 20 or
                                           csum_start + csum_offset + 2 > len(packet)):
                raise OffloadError("checksum offsets outside the packet")
            self._mss = 0
            self.count = 1
            self.nbytes = len(packet)
            self.head = packet
            return
        if kind not in (GSO_TCPV4, GSO_TCPV6) or gso_size <= 0:
            raise OffloadError(f"unsupported GSO type {gso_type}")
        ihl, thl = _tcp_headers(packet)
        total = len(packet) - ihl - thl
        self._mss = gso_size
        self.count = max(1, -(-total // gso_size))
        self.nbytes = total + self.count * (ihl + thl)
        self.head = packet[: ihl + thl]

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[memoryview]:
        packet = self._frame[VNET_HDR_LEN:]
        if not self._mss:
            if self._csum is not None:
                _complete_in_place(packet, *self._csum)
            return iter((packet,))
        return _tso_segments(self._frame, self._mss)


def _tcp_headers(packet: memoryview) -> tuple[int, int]:
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        if packet[9] != PROTO_TCP:
            raise OffloadError("TSO for a packet that is not TCP")
        if ihl < 20:
            raise OffloadError("bad IPv4 header length")
    elif version == 6:
        ihl = 40
        if packet[6] != PROTO_TCP:
            raise OffloadError("TSO over IPv6 extension headers is not supported")
    else:
        raise OffloadError("TSO for a packet that is not IP")
    if len(packet) < ihl + 20:
        raise OffloadError("truncated TCP header")
    thl = (packet[ihl + 12] >> 4) * 4
    if thl < 20 or len(packet) < ihl + thl:
        raise OffloadError("truncated TCP header")
    return ihl, thl


def _complete_in_place(packet: memoryview, start: int, offset: int) -> None:
    """The kernel left the L4 checksum partial (pseudo-header sum in place): finish it."""
    value = ~ones_sum(packet[start:]) & 0xFFFF
    if value == 0 and packet[9 if packet[0] >> 4 == 4 else 6] == PROTO_UDP:
        value = 0xFFFF  # UDP: 0 means "no checksum"
    _U16.pack_into(packet, start + offset, value)


def _tso_segments(frame: memoryview, mss: int) -> Iterator[memoryview]:
    """Cut a TSO super-packet (``frame``: virtio header + IP packet) into MSS segments with
    their own IP/TCP headers and checksums, each built in place right before its payload."""
    base = VNET_HDR_LEN
    version = frame[base] >> 4
    ihl, thl = _tcp_headers(frame[base:])
    hdr_len = ihl + thl
    end = len(frame)
    template = bytearray(frame[base : base + hdr_len])
    seq0 = _U32.unpack_from(template, ihl + 4)[0]
    flags0 = template[ihl + 13]
    template[ihl + TCP_CHECK : ihl + TCP_CHECK + 2] = b"\0\0"
    if version == 4:
        ident0 = _U16.unpack_from(template, 4)[0]
        template[2:6] = b"\0\0\0\0"  # total length, identification: set per segment
        template[10:12] = b"\0\0"
        ip_sum = ones_sum(template[:ihl])
        pseudo = ones_sum(template[12:20]) + PROTO_TCP
    else:
        ident0 = ip_sum = 0
        pseudo = ones_sum(template[8:40]) + PROTO_TCP
    tcp_off = ihl
    seq_at = ihl + 4
    flags_at = ihl + 13
    csum_at = ihl + TCP_CHECK
    pack16 = _U16.pack_into
    pack32 = _U32.pack_into
    first_flags = flags0 & ~(TCP_FIN | TCP_PSH)
    mid_flags = first_flags & ~TCP_CWR
    payload0 = base + hdr_len
    off = 0
    index = 0
    while True:
        start = payload0 + off - hdr_len  # where this segment's headers go
        seg_end = min(start + hdr_len + mss, end)
        last = seg_end >= end
        if index:
            frame[start : start + hdr_len] = template
            pack32(frame, start + seq_at, (seq0 + off) & 0xFFFFFFFF)
            flags = (flags0 & ~TCP_CWR) if last else mid_flags
        else:
            frame[start : start + hdr_len] = template  # checksums and lengths cleared
            flags = flags0 if last else first_flags
        frame[start + flags_at] = flags
        tcp_len = seg_end - start - ihl
        if version == 4:
            ident = (ident0 + index) & 0xFFFF
            pack16(frame, start + 2, ihl + tcp_len)
            pack16(frame, start + 4, ident)
            pack16(frame, start + 10, ~_fold(ip_sum + ihl + tcp_len + ident) & 0xFFFF)
        else:
            pack16(frame, start + 4, tcp_len)
        value = _fold(ones_sum(frame[start + tcp_off : seg_end]) + pseudo + tcp_len)
        pack16(frame, start + csum_at, ~value & 0xFFFF)
        yield frame[start:seg_end]
        if last:
            return
        off += mss
        index += 1


def split(frame: Buffer) -> list[Buffer]:
    """A TUN read with its virtio header → wire-ready IP packets (see module doc), copied out
    of ``frame`` (the packet path uses :class:`Segments`, which works in place)."""
    return [bytes(p) for p in Segments(bytearray(frame))]


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
