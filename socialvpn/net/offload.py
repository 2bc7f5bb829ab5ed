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
  everything else alone (with ``NEEDS_CSUM`` if in partial form, below).

**Partial checksums between our own peers.** Computing every segment's TCP checksum is the
largest single cost of the sending side, and the receiving kernel does not need it: a packet
written to a TUN device with ``NEEDS_CSUM`` is "checksum partial" to the kernel, which accepts
it locally without verifying and completes the checksum itself if it routes the packet on
(integrity is the AEAD's job: kernel WireGuard marks decrypted packets checksum-unnecessary).
So when the peer is ours with an offload TUN (negotiated per peer; a stock WireGuard peer
always gets full checksums), the sender leaves *plain* TCP/UDP packets - IPv4 not fragmented,
or IPv6 with the TCP/UDP header first - in **partial form**: the checksum field holds the
folded pseudo-header sum, as the kernel itself leaves it with ``NEEDS_CSUM``. That is every
TSO/USO segment (``Segments.partial``: no pass over the payload at all) and every packet the
kernel handed over partial; a packet that came with a full checksum (routed traffic) keeps it,
good or bad. The receiver tells the form from the packet itself (:func:`partial_header`: the
field equals the pseudo-header sum), never from what was negotiated, so the two ends need not
switch at the same moment; a TCP segment merges only if it is in partial form or its full
checksum verifies (:func:`coalesce`), so a checksum that was bad before the tunnel stays bad.
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
GSO_UDP_L4 = 5  # UDP segmentation (USO), TUN_F_USO4/6
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


_MASKS: dict[int, int] = {}


def _sum16(data: Buffer) -> int:
    """As :func:`ones_sum` (but 0xFFFF for all-zero data, the same value in one's complement),
    cheaper on packet-sized data: two folds with shifts (as 2^16k ≡ 1) leave a quarter of the
    digits for the division."""
    n = len(data)
    value = int.from_bytes(data, "big")
    if n & 1:
        value <<= 8
        n += 1
    k = (n << 2) & ~15  # half the bits, a multiple of 16
    mask = _MASKS.get(k)
    if mask is None:
        mask = _MASKS[k] = (1 << k) - 1
    value = (value >> k) + (value & mask)
    k = (k >> 1) & ~15
    mask = _MASKS.get(k)
    if mask is None:
        mask = _MASKS[k] = (1 << k) - 1
    value = (value >> k) + (value & mask)
    return value % 0xFFFF or 0xFFFF


def _add(a: int, b: int) -> int:
    s = a + b
    return (s & 0xFFFF) + (s >> 16)


def checksum(*parts: Buffer) -> int:
    """The Internet checksum over even-length ``parts`` (only the last may be odd)."""
    total = 0
    for part in parts:
        total = _add(total, ones_sum(part))
    return ~total & 0xFFFF


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

    __slots__ = ("_frame", "_mss", "_csum", "_udp", "count", "head", "nbytes", "partial")

    def __init__(self, frame: bytearray | memoryview, length: int | None = None) -> None:
        n = len(frame) if length is None else length
        if n < VNET_HDR_LEN + 20:
            raise OffloadError("frame shorter than a virtio header and an IP header")
        view = memoryview(frame)[:n]
        flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(view)
        self._frame = view
        self.partial = False
        """Set before iterating: make the packets in partial form (module doc), not full."""
        self._csum = (csum_start, csum_offset) if flags & F_NEEDS_CSUM else None
        kind = gso_type & ~GSO_ECN
        packet = view[VNET_HDR_LEN:]
        self._udp = kind == GSO_UDP_L4
        if kind == GSO_NONE:
            if self._csum is not None and (csum_start < 20 or
                                           csum_start + csum_offset + 2 > len(packet)):
                raise OffloadError("checksum offsets outside the packet")
            self._mss = 0
            self.count = 1
            self.nbytes = len(packet)
            self.head = packet
            return
        if kind not in (GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4) or gso_size <= 0:
            raise OffloadError(f"unsupported GSO type {gso_type}")
        ihl, thl = _gso_headers(packet, PROTO_UDP if self._udp else PROTO_TCP)
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
            csum = self._csum
            # Partial form where the kernel left a plain packet partial and the peer reads it;
            # a full checksum (forwarded traffic) crosses as it is, good or bad.
            if csum is not None and not (self.partial and csum == _plain_l4(packet)):
                _complete_in_place(packet, *csum)
            return iter((packet,))
        if self._udp:
            return _uso_segments(self._frame, self._mss, self.partial)
        return _tso_segments(self._frame, self._mss, self.partial)


def _plain_l4(packet: Buffer) -> tuple[int, int] | None:
    """(start, checksum offset) of the TCP or UDP header of a *plain* packet (module doc), or
    None for anything else (other protocols, fragments, IPv6 extension headers, truncated)."""
    n = len(packet)
    if n < 28:
        return None
    first = packet[0]
    if first >> 4 == 4:
        start = (first & 0x0F) * 4
        proto = packet[9]
        if start < 20 or (packet[6] & 0x3F) or packet[7]:  # MF flag or fragment offset
            return None
    elif first >> 4 == 6:
        start = 40
        proto = packet[6]
    else:
        return None
    if proto == PROTO_TCP:
        return (start, TCP_CHECK) if n >= start + 20 else None
    if proto == PROTO_UDP:
        return (start, 6) if n >= start + 8 else None
    return None


def _pseudo_sum(packet: Buffer, start: int) -> int:
    """The folded pseudo-header sum (addresses, protocol, L4 length) of a plain packet whose
    L4 header starts at ``start``; never 0."""
    return (_address_sum(packet) + len(packet) - start) % 0xFFFF or 0xFFFF


_PARTIAL_HDRS: dict[tuple[int, int], bytes] = {}


def partial_header(packet: Buffer) -> bytes:
    """The virtio header to write a decrypted packet with: ``NEEDS_CSUM`` at its TCP/UDP
    checksum when it is a plain packet (module doc) in partial form - its checksum field holds
    its pseudo-header sum - else the empty header (the kernel verifies a full checksum, and
    drops a bad one). Told by the packet itself, not by what the peer negotiated, so a peer
    that switched modes (or restarted) is read right from its first packet. A full checksum
    that happens to equal the pseudo-header sum is harmless: completing it gives it back."""
    where = _plain_l4(packet)
    if where is None:
        return EMPTY_HDR
    start, offset = where
    at = start + offset
    if (packet[at] << 8) | packet[at + 1] != _pseudo_sum(packet, start):
        return EMPTY_HDR  # a full checksum (or UDP over IPv4 without one: 0)
    hdr = _PARTIAL_HDRS.get(where)
    if hdr is None:
        hdr = _PARTIAL_HDRS[where] = VNET_HDR.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, start, offset)
    return hdr


def _gso_headers(packet: memoryview, proto: int) -> tuple[int, int]:
    """(IP header length, TCP or UDP header length) of a super-packet of protocol ``proto``,
    else OffloadError."""
    what = "TCP" if proto == PROTO_TCP else "UDP"
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        if packet[9] != proto:
            raise OffloadError(f"{what} segmentation for a packet that is not {what}")
        if ihl < 20:
            raise OffloadError("bad IPv4 header length")
    elif version == 6:
        ihl = 40
        if packet[6] != proto:
            raise OffloadError(f"{what} segmentation over IPv6 extension headers is not supported")
    else:
        raise OffloadError(f"{what} segmentation for a packet that is not IP")
    if proto == PROTO_UDP:
        if len(packet) < ihl + 8:
            raise OffloadError("truncated UDP header")
        return ihl, 8
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


def _headers_template(frame: memoryview, version: int, ihl: int, hdr_len: int, proto: int
                      ) -> tuple[bytearray, int, int, int]:
    """A super-packet's IP and TCP/UDP headers as the template of its segments, with the
    IPv4 fields set per segment (total length, identification, header checksum) zeroed:
    (template, first identification, IPv4 header sum, pseudo-header sum of the addresses and
    protocol)."""
    template = bytearray(frame[VNET_HDR_LEN : VNET_HDR_LEN + hdr_len])
    if version == 4:
        ident0 = _U16.unpack_from(template, 4)[0]
        template[2:6] = b"\0\0\0\0"
        template[10:12] = b"\0\0"
        return template, ident0, ones_sum(template[:ihl]), ones_sum(template[12:20]) + proto
    return template, 0, 0, ones_sum(template[8:40]) + proto


def _tso_segments(frame: memoryview, mss: int, partial: bool = False) -> Iterator[memoryview]:
    """Cut a TSO super-packet (``frame``: virtio header + IP packet) into MSS segments with
    their own IP/TCP headers and checksums (``partial``: the pseudo-header sum only), each
    built in place right before its payload."""
    base = VNET_HDR_LEN
    version = frame[base] >> 4
    ihl, thl = _gso_headers(frame[base:], PROTO_TCP)
    hdr_len = ihl + thl
    end = len(frame)
    template, ident0, ip_sum, pseudo = _headers_template(frame, version, ihl, hdr_len,
                                                         PROTO_TCP)
    seq0 = _U32.unpack_from(template, ihl + 4)[0]
    flags0 = template[ihl + 13]
    template[ihl + TCP_CHECK : ihl + TCP_CHECK + 2] = b"\0\0"
    tcp_off = ihl
    seq_at = ihl + 4
    flags_at = ihl + 13
    csum_at = ihl + TCP_CHECK
    pack16 = _U16.pack_into
    pack32 = _U32.pack_into
    first_flags = flags0 & ~(TCP_FIN | TCP_PSH)
    mid_flags = first_flags & ~TCP_CWR
    payload0 = base + hdr_len
    # The full-size segments between the first and the last differ only in sequence number
    # (and IPv4 identification and header checksum): a template with their flags, lengths and
    # (partial) TCP checksum leaves three fields to write per segment.
    full_len = hdr_len - ihl + mss
    middle = bytearray(template)
    middle[flags_at] = mid_flags
    if version == 4:
        pack16(middle, 2, ihl + full_len)
        mid_ip_sum = ip_sum + ihl + full_len
    else:
        pack16(middle, 4, full_len)
        mid_ip_sum = 0
    if partial:
        pack16(middle, csum_at, _fold(pseudo + full_len))
    off = 0
    index = 0
    while True:
        start = payload0 + off - hdr_len  # where this segment's headers go
        seg_end = min(start + hdr_len + mss, end)
        last = seg_end >= end
        if index and not last:
            frame[start : start + hdr_len] = middle
            pack32(frame, start + seq_at, (seq0 + off) & 0xFFFFFFFF)
            if version == 4:
                ident = (ident0 + index) & 0xFFFF
                pack16(frame, start + 4, ident)
                value = mid_ip_sum + ident  # < 2^18: two folds are enough
                value = (value & 0xFFFF) + (value >> 16)
                value = (value & 0xFFFF) + (value >> 16)
                pack16(frame, start + 10, ~value & 0xFFFF)
            if not partial:
                value = _sum16(frame[start + tcp_off : seg_end]) + pseudo + full_len
                value = (value & 0xFFFF) + (value >> 16)
                value = (value & 0xFFFF) + (value >> 16)
                pack16(frame, start + csum_at, ~value & 0xFFFF)
            yield frame[start:seg_end]
            off += mss
            index += 1
            continue
        frame[start : start + hdr_len] = template  # checksums and lengths cleared
        if index:
            pack32(frame, start + seq_at, (seq0 + off) & 0xFFFFFFFF)
            flags = flags0 & ~TCP_CWR  # the last segment (FIN, PSH as the super-packet's)
        else:
            flags = flags0 if last else first_flags
        frame[start + flags_at] = flags
        tcp_len = seg_end - start - ihl
        if version == 4:
            ident = (ident0 + index) & 0xFFFF
            pack16(frame, start + 2, ihl + tcp_len)
            pack16(frame, start + 4, ident)
            value = ip_sum + ihl + tcp_len + ident  # < 2^18: two folds are enough
            value = (value & 0xFFFF) + (value >> 16)
            value = (value & 0xFFFF) + (value >> 16)
            pack16(frame, start + 10, ~value & 0xFFFF)
        else:
            pack16(frame, start + 4, tcp_len)
        if partial:
            pack16(frame, start + csum_at, _fold(pseudo + tcp_len))
        else:
            value = _sum16(frame[start + tcp_off : seg_end]) + pseudo + tcp_len  # < 2^18
            value = (value & 0xFFFF) + (value >> 16)
            value = (value & 0xFFFF) + (value >> 16)
            pack16(frame, start + csum_at, ~value & 0xFFFF)
        yield frame[start:seg_end]
        if last:
            return
        off += mss
        index += 1


def _uso_segments(frame: memoryview, size: int, partial: bool = False) -> Iterator[memoryview]:
    """Cut a UDP super-packet (USO: one application write of several datagrams of ``size``
    bytes, the last may be shorter) into datagrams with their own IP/UDP headers and
    checksums (``partial``: the pseudo-header sum only), built in place like TSO segments."""
    base = VNET_HDR_LEN
    version = frame[base] >> 4
    ihl, _ = _gso_headers(frame[base:], PROTO_UDP)
    hdr_len = ihl + 8
    end = len(frame)
    template, ident0, ip_sum, pseudo = _headers_template(frame, version, ihl, hdr_len,
                                                         PROTO_UDP)
    template[ihl + 4 : ihl + 8] = b"\0\0\0\0"  # length and checksum: set per datagram
    pack16 = _U16.pack_into
    payload0 = base + hdr_len
    off = 0
    index = 0
    while True:
        start = payload0 + off - hdr_len
        seg_end = min(start + hdr_len + size, end)
        frame[start : start + hdr_len] = template
        udp_len = seg_end - start - ihl
        if version == 4:
            ident = (ident0 + index) & 0xFFFF
            pack16(frame, start + 2, ihl + udp_len)
            pack16(frame, start + 4, ident)
            value = _fold(ip_sum + ihl + udp_len + ident)
            pack16(frame, start + 10, ~value & 0xFFFF)
        else:
            pack16(frame, start + 4, udp_len)
        pack16(frame, start + ihl + 4, udp_len)
        if partial:
            pack16(frame, start + ihl + 6, _fold(pseudo + udp_len))
        else:
            value = _fold(_sum16(frame[start + ihl : seg_end]) + pseudo + udp_len)
            pack16(frame, start + ihl + 6, (~value & 0xFFFF) or 0xFFFF)
        yield frame[start:seg_end]
        if seg_end >= end:
            return
        off += size
        index += 1


def split(frame: Buffer, *, partial: bool = False) -> list[Buffer]:
    """A TUN read with its virtio header → wire-ready IP packets (see module doc; ``partial``:
    in partial form), copied out of ``frame`` (the packet path uses :class:`Segments`, which
    works in place)."""
    segments = Segments(bytearray(frame))
    segments.partial = partial
    return [bytes(p) for p in segments]


# --- wire → TUN ----------------------------------------------------------------------------


_MERGE_FLAGS = TCP_ACK | TCP_PSH | TCP_CWR
# IPv4 without options: version/ihl, TOS, -, -, fragment, TTL, protocol, (checksum),
# addresses + ports, seq, ack, data offset, flags, window.
_V4_TCP = struct.Struct("!BBHHHBB2x12sI4sBB2s")
# IPv6: version/class/flow, -, next header, hop limit, addresses + ports, seq, ack, data
# offset, flags, window.
_V6_TCP = struct.Struct("!4sHBB36sI4sBB2s")

_Parsed = tuple[tuple[object, ...], int, int, int, int]


def _parse(p: Buffer) -> _Parsed | None:
    """(flow key, seq, payload length, header length, flags) of a plain TCP segment we may
    merge - IPv4 without options and not fragmented, or IPv6 without extension headers; ACK
    set and no SYN/FIN/RST/URG; some payload - else None. Segments merge only when their keys
    are equal: same addresses, ports, TOS/class, TTL/hop limit, ack, header length, window
    and TCP options (the rules of the kernel's own GRO)."""
    n = len(p)
    if n < 40:
        return None
    first = p[0]
    if first == 0x45:
        _vi, tos, _len, _id, frag, ttl, proto, ports, seq, ack, doff, flags, win = \
            _V4_TCP.unpack_from(p)
        if proto != PROTO_TCP or frag & 0x3FFF:
            return None  # not TCP, or a fragment (MF / offset)
        thl = (doff >> 4) * 4
        hdr = 20 + thl
        key: tuple[object, ...] = (tos, ttl, ports, ack, doff, win, bytes(p[40:hdr]))
    elif first >> 4 == 6:
        if n < 60:
            return None
        vtf, _plen, nxt, hop, ports, seq, ack, doff, flags, win = _V6_TCP.unpack_from(p)
        if nxt != PROTO_TCP:
            return None
        thl = (doff >> 4) * 4
        hdr = 40 + thl
        key = (vtf, hop, ports, ack, doff, win, bytes(p[60:hdr]))
    else:
        return None
    if thl < 20 or hdr >= n or flags & ~_MERGE_FLAGS or not flags & TCP_ACK:
        return None
    return key, seq, n - hdr, hdr, flags


def _address_sum(p: Buffer) -> int:
    """The pseudo-header sum of a packet's addresses and protocol (length not included)."""
    if p[0] >> 4 == 4:
        return int.from_bytes(p[12:20], "big") % 0xFFFF + p[9]
    return int.from_bytes(p[8:40], "big") % 0xFFFF + p[6]


def _intact(p: Buffer, ihl: int, address_sum: int) -> bool:
    """A TCP segment we may merge: its checksum field holds the partial form (its
    pseudo-header sum), or a full checksum that verifies. A segment whose checksum was already
    bad must stay bad (written alone, the kernel drops it): merging would hide it."""
    tcp_len = len(p) - ihl
    field = (p[ihl + TCP_CHECK] << 8) | p[ihl + TCP_CHECK + 1]
    if field == _fold(address_sum + tcp_len):
        return True
    return _fold(_sum16(memoryview(p)[ihl:]) + address_sum + tcp_len) == 0xFFFF


def coalesce(packets: Iterable[Buffer]) -> list[list[Buffer]]:
    """Decrypted IP packets in arrival order → TUN writes, each a list of buffers for one
    ``writev`` (virtio header first). Consecutive in-order segments of one TCP flow with equal
    payload sizes (the last may be shorter, or carry PSH) and intact checksums (partial form,
    or full and verified) become one GSO super-packet; every other packet is written alone
    with :func:`partial_header`."""
    writes: list[list[Buffer]] = []
    run: list[Buffer] = []
    run_key: tuple[object, ...] = ()
    run_hdr = next_seq = mss = size = run_ihl = run_addr = 0
    closed = True
    parse = _parse
    for p in packets:
        info = parse(p)
        if info is not None:
            key, seq, plen, hdr, flags = info
            if (not closed and seq == next_seq and plen <= mss and key == run_key
                    and size + plen <= MAX_COALESCED and run_hdr + size + plen <= 65535):
                # Intact: the field holds the partial form (the common case: one add and
                # two folds, inline), or a full checksum that verifies.
                value = run_addr + run_hdr - run_ihl + plen
                value = (value & 0xFFFF) + (value >> 16)
                value = (value & 0xFFFF) + (value >> 16)
                at = run_ihl + TCP_CHECK
                if (p[at] << 8 | p[at + 1]) == value or _intact(p, run_ihl, run_addr):
                    run.append(p)
                    next_seq = (seq + plen) & 0xFFFFFFFF
                    size += plen
                    closed = plen < mss or bool(flags & TCP_PSH)
                    continue
        if run:
            writes.append(_merge(run, run_hdr, mss) if len(run) > 1
                          else [partial_header(run[0]), run[0]])
            run = []
        if info is not None:
            ihl = 20 if p[0] >> 4 == 4 else 40
            address_sum = _address_sum(p)
            if _intact(p, ihl, address_sum):
                run = [p]
                run_key, run_hdr, mss, size = key, hdr, plen, plen
                run_ihl, run_addr = ihl, address_sum
                next_seq = (seq + plen) & 0xFFFFFFFF
                closed = bool(flags & TCP_PSH)
                continue
        writes.append([partial_header(p), p])
        closed = True
    if run:
        writes.append(_merge(run, run_hdr, mss) if len(run) > 1
                      else [partial_header(run[0]), run[0]])
    return writes


def _merge(run: list[Buffer], hdr_len: int, mss: int) -> list[Buffer]:
    first, last = run[0], run[-1]
    version = first[0] >> 4
    ihl = 20 if version == 4 else 40
    head = bytearray(first[:hdr_len])
    payloads = [memoryview(p)[hdr_len:] for p in run]
    tcp_len = hdr_len - ihl + sum(map(len, payloads))
    head[ihl + 13] = first[ihl + 13] | (last[ihl + 13] & TCP_PSH)
    if version == 4:
        head[2:4] = (ihl + tcp_len).to_bytes(2, "big")
        ipv4_header_checksum(memoryview(head)[:ihl])  # type: ignore[arg-type]
        gso = GSO_TCPV4
    else:
        head[4:6] = tcp_len.to_bytes(2, "big")
        gso = GSO_TCPV6
    # A partial checksum, as the kernel's own TSO packets carry: the pseudo-header sum.
    pseudo = _fold(_address_sum(head) + tcp_len)
    head[ihl + TCP_CHECK : ihl + TCP_CHECK + 2] = pseudo.to_bytes(2, "big")
    vnet = VNET_HDR.pack(F_NEEDS_CSUM, gso, hdr_len, mss, ihl, TCP_CHECK)
    return [vnet, head, *payloads]
