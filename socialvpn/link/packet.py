"""WireGuard message pack/unpack with exact length checks (pure; no I/O).

Layouts (all integers little-endian, the first four bytes are the message type as a uint32, so the
three reserved bytes must be zero):

=================  ====  =====================================================================
message            size  fields
=================  ====  =====================================================================
1 initiation        148  type, sender, ephemeral[32], static[32+16], timestamp[12+16], mac1, mac2
2 response           92  type, sender, receiver, ephemeral[32], empty[0+16], mac1, mac2
3 cookie reply       64  type, receiver, nonce[24], cookie[16+16]
4 transport        >=32  type, receiver, counter (u64), packet[n+16]
=================  ====  =====================================================================

Every ``unpack_*`` raises :class:`~socialvpn.errors.ProtocolError` (reason ``malformed``) on any
bad input and nothing else. :func:`classify` tells WireGuard datagrams from STUN on a shared socket.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from socialvpn.errors import ProtocolError
from socialvpn.link.constants import (
    COOKIE_NONCE_SIZE,
    KEY_SIZE,
    MAC_SIZE,
    MAX_MESSAGE_SIZE,
    MESSAGE_COOKIE_REPLY_SIZE,
    MESSAGE_COOKIE_REPLY_TYPE,
    MESSAGE_INITIATION_SIZE,
    MESSAGE_INITIATION_TYPE,
    MESSAGE_RESPONSE_SIZE,
    MESSAGE_RESPONSE_TYPE,
    MESSAGE_TRANSPORT_HEADER_SIZE,
    MESSAGE_TRANSPORT_SIZE,
    MESSAGE_TRANSPORT_TYPE,
    TAG_SIZE,
    TIMESTAMP_SIZE,
)

Buffer = bytes | bytearray | memoryview

ENCRYPTED_STATIC_SIZE: Final = KEY_SIZE + TAG_SIZE  # 48
ENCRYPTED_TIMESTAMP_SIZE: Final = TIMESTAMP_SIZE + TAG_SIZE  # 28
ENCRYPTED_NOTHING_SIZE: Final = TAG_SIZE  # 16
ENCRYPTED_COOKIE_SIZE: Final = MAC_SIZE + TAG_SIZE  # 32

# offsets of mac1 and mac2 in the two handshake messages: mac1 covers everything before it,
# mac2 everything before mac2 (including mac1)
INITIATION_MAC1_OFFSET: Final = MESSAGE_INITIATION_SIZE - 2 * MAC_SIZE  # 116
INITIATION_MAC2_OFFSET: Final = MESSAGE_INITIATION_SIZE - MAC_SIZE  # 132
RESPONSE_MAC1_OFFSET: Final = MESSAGE_RESPONSE_SIZE - 2 * MAC_SIZE  # 60
RESPONSE_MAC2_OFFSET: Final = MESSAGE_RESPONSE_SIZE - MAC_SIZE  # 76

_INITIATION = struct.Struct(
    f"<II{KEY_SIZE}s{ENCRYPTED_STATIC_SIZE}s{ENCRYPTED_TIMESTAMP_SIZE}s16s16s"
)
_RESPONSE = struct.Struct(f"<III{KEY_SIZE}s{ENCRYPTED_NOTHING_SIZE}s16s16s")
_COOKIE_REPLY = struct.Struct(f"<II{COOKIE_NONCE_SIZE}s{ENCRYPTED_COOKIE_SIZE}s")
TRANSPORT_HEADER: Final = struct.Struct("<IIQ")  # type, receiver, counter
_U32 = struct.Struct("<I")

assert _INITIATION.size == MESSAGE_INITIATION_SIZE
assert _RESPONSE.size == MESSAGE_RESPONSE_SIZE
assert _COOKIE_REPLY.size == MESSAGE_COOKIE_REPLY_SIZE
assert TRANSPORT_HEADER.size == MESSAGE_TRANSPORT_HEADER_SIZE

_U32_MAX: Final = 0xFFFFFFFF
_U64_MAX: Final = 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True, slots=True)
class Initiation:
    """Message type 1: the initiator's first handshake message."""

    sender: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes = bytes(MAC_SIZE)
    mac2: bytes = bytes(MAC_SIZE)


@dataclass(frozen=True, slots=True)
class Response:
    """Message type 2: the responder's handshake message."""

    sender: int
    receiver: int
    ephemeral: bytes
    encrypted_nothing: bytes
    mac1: bytes = bytes(MAC_SIZE)
    mac2: bytes = bytes(MAC_SIZE)


@dataclass(frozen=True, slots=True)
class CookieReply:
    """Message type 3: an encrypted cookie sent instead of a response while under load."""

    receiver: int
    nonce: bytes
    encrypted_cookie: bytes


@dataclass(frozen=True, slots=True)
class Transport:
    """Message type 4: encrypted data. ``encrypted`` is a view into the datagram (no copy)."""

    receiver: int
    counter: int
    encrypted: memoryview


Message = Initiation | Response | CookieReply | Transport


def _malformed(what: str) -> ProtocolError:
    return ProtocolError(what, "malformed")


def _view(data: object) -> memoryview:
    try:
        view = memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        raise _malformed("not a byte buffer") from None
    if view.ndim != 1 or view.itemsize != 1:
        try:
            view = view.cast("B")
        except (TypeError, ValueError):
            raise _malformed("not a contiguous byte buffer") from None
    return view


def message_type(data: Buffer) -> int:
    """The WireGuard type (1..4) of ``data``; ProtocolError if it is not a WireGuard message."""
    view = _view(data)
    if len(view) < 4:
        raise _malformed("message shorter than its type field")
    kind = _U32.unpack_from(view, 0)[0]
    if not MESSAGE_INITIATION_TYPE <= kind <= MESSAGE_TRANSPORT_TYPE:
        raise _malformed(f"unknown message type {kind:#x}")
    return kind


def _check(view: memoryview, kind: int, size: int, name: str) -> None:
    if len(view) != size:
        raise _malformed(f"{name} must be {size} bytes, got {len(view)}")
    if _U32.unpack_from(view, 0)[0] != kind:
        raise _malformed(f"not a {name} message")


def _check_u32(value: int, name: str) -> None:
    if not 0 <= value <= _U32_MAX:
        raise ValueError(f"{name} must fit in 32 bits")


def _check_len(value: bytes, size: int, name: str) -> None:
    if len(value) != size:
        raise ValueError(f"{name} must be {size} bytes")


# --- type 1 ---------------------------------------------------------------------------------------


def pack_initiation(msg: Initiation) -> bytes:
    """Serialise a type-1 message (ValueError on wrong field sizes: that is a local bug)."""
    _check_u32(msg.sender, "sender")
    _check_len(msg.ephemeral, KEY_SIZE, "ephemeral")
    _check_len(msg.encrypted_static, ENCRYPTED_STATIC_SIZE, "encrypted_static")
    _check_len(msg.encrypted_timestamp, ENCRYPTED_TIMESTAMP_SIZE, "encrypted_timestamp")
    _check_len(msg.mac1, MAC_SIZE, "mac1")
    _check_len(msg.mac2, MAC_SIZE, "mac2")
    return _INITIATION.pack(
        MESSAGE_INITIATION_TYPE,
        msg.sender,
        msg.ephemeral,
        msg.encrypted_static,
        msg.encrypted_timestamp,
        msg.mac1,
        msg.mac2,
    )


def unpack_initiation(data: Buffer) -> Initiation:
    view = _view(data)
    _check(view, MESSAGE_INITIATION_TYPE, MESSAGE_INITIATION_SIZE, "initiation")
    _, sender, ephemeral, static, timestamp, mac1, mac2 = _INITIATION.unpack(view)
    return Initiation(sender, ephemeral, static, timestamp, mac1, mac2)


# --- type 2 ---------------------------------------------------------------------------------------


def pack_response(msg: Response) -> bytes:
    _check_u32(msg.sender, "sender")
    _check_u32(msg.receiver, "receiver")
    _check_len(msg.ephemeral, KEY_SIZE, "ephemeral")
    _check_len(msg.encrypted_nothing, ENCRYPTED_NOTHING_SIZE, "encrypted_nothing")
    _check_len(msg.mac1, MAC_SIZE, "mac1")
    _check_len(msg.mac2, MAC_SIZE, "mac2")
    return _RESPONSE.pack(
        MESSAGE_RESPONSE_TYPE,
        msg.sender,
        msg.receiver,
        msg.ephemeral,
        msg.encrypted_nothing,
        msg.mac1,
        msg.mac2,
    )


def unpack_response(data: Buffer) -> Response:
    view = _view(data)
    _check(view, MESSAGE_RESPONSE_TYPE, MESSAGE_RESPONSE_SIZE, "response")
    _, sender, receiver, ephemeral, nothing, mac1, mac2 = _RESPONSE.unpack(view)
    return Response(sender, receiver, ephemeral, nothing, mac1, mac2)


# --- type 3 ---------------------------------------------------------------------------------------


def pack_cookie_reply(msg: CookieReply) -> bytes:
    _check_u32(msg.receiver, "receiver")
    _check_len(msg.nonce, COOKIE_NONCE_SIZE, "nonce")
    _check_len(msg.encrypted_cookie, ENCRYPTED_COOKIE_SIZE, "encrypted_cookie")
    return _COOKIE_REPLY.pack(
        MESSAGE_COOKIE_REPLY_TYPE, msg.receiver, msg.nonce, msg.encrypted_cookie
    )


def unpack_cookie_reply(data: Buffer) -> CookieReply:
    view = _view(data)
    _check(view, MESSAGE_COOKIE_REPLY_TYPE, MESSAGE_COOKIE_REPLY_SIZE, "cookie reply")
    _, receiver, nonce, cookie = _COOKIE_REPLY.unpack(view)
    return CookieReply(receiver, nonce, cookie)


# --- type 4 ---------------------------------------------------------------------------------------


def pack_transport_header(receiver: int, counter: int) -> bytes:
    _check_u32(receiver, "receiver")
    if not 0 <= counter <= _U64_MAX:
        raise ValueError("counter must fit in 64 bits")
    return TRANSPORT_HEADER.pack(MESSAGE_TRANSPORT_TYPE, receiver, counter)


def pack_transport(msg: Transport) -> bytes:
    if len(msg.encrypted) < TAG_SIZE:
        raise ValueError("encrypted packet is shorter than its tag")
    return pack_transport_header(msg.receiver, msg.counter) + bytes(msg.encrypted)


def unpack_transport(data: Buffer) -> Transport:
    view = _view(data)
    size = len(view)
    if size < MESSAGE_TRANSPORT_SIZE:
        raise _malformed(f"transport message must be at least {MESSAGE_TRANSPORT_SIZE} bytes")
    if size > MAX_MESSAGE_SIZE:
        raise _malformed(f"transport message larger than {MAX_MESSAGE_SIZE} bytes")
    kind, receiver, counter = TRANSPORT_HEADER.unpack_from(view, 0)
    if kind != MESSAGE_TRANSPORT_TYPE:
        raise _malformed("not a transport message")
    return Transport(receiver, counter, view[MESSAGE_TRANSPORT_HEADER_SIZE:])


_UNPACKERS = {
    MESSAGE_INITIATION_TYPE: unpack_initiation,
    MESSAGE_RESPONSE_TYPE: unpack_response,
    MESSAGE_COOKIE_REPLY_TYPE: unpack_cookie_reply,
    MESSAGE_TRANSPORT_TYPE: unpack_transport,
}


def unpack(data: Buffer) -> Message:
    """Unpack any WireGuard message by its type."""
    return _UNPACKERS[message_type(data)](data)  # type: ignore[operator]


def pack(msg: Message) -> bytes:
    if isinstance(msg, Initiation):
        return pack_initiation(msg)
    if isinstance(msg, Response):
        return pack_response(msg)
    if isinstance(msg, CookieReply):
        return pack_cookie_reply(msg)
    if isinstance(msg, Transport):
        return pack_transport(msg)
    raise TypeError(f"not a WireGuard message: {type(msg).__name__}")


# --- demultiplexing STUN and WireGuard on one socket ---------------------------------------------

STUN_MAGIC_COOKIE: Final = 0x2112A442
STUN_HEADER_SIZE: Final = 20
_STUN_COOKIE_BYTES: Final = STUN_MAGIC_COOKIE.to_bytes(4, "big")
_WG_SIZES: Final = {
    MESSAGE_INITIATION_TYPE: MESSAGE_INITIATION_SIZE,
    MESSAGE_RESPONSE_TYPE: MESSAGE_RESPONSE_SIZE,
    MESSAGE_COOKIE_REPLY_TYPE: MESSAGE_COOKIE_REPLY_SIZE,
}


class DatagramKind(enum.Enum):
    WIREGUARD = "wireguard"
    STUN = "stun"
    UNKNOWN = "unknown"


def classify(data: Buffer) -> DatagramKind:
    """Tell a WireGuard message from a STUN message by their first bytes.

    WireGuard: first byte 1..4 followed by three zero bytes, and a length that fits the type.
    STUN (RFC 5389): first two bits zero, the magic cookie at offset 4, a 20-byte header whose
    length field matches the datagram. WireGuard is checked first: its first word can never be a
    STUN message ICE sends, while a random sender index could equal the magic cookie.
    Never raises.
    """
    size = len(data)
    if size >= 4 and 1 <= data[0] <= 4 and data[1] == 0 and data[2] == 0 and data[3] == 0:
        kind = data[0]
        expected = _WG_SIZES.get(kind)
        if (expected is not None and size == expected) or (
            kind == MESSAGE_TRANSPORT_TYPE and MESSAGE_TRANSPORT_SIZE <= size <= MAX_MESSAGE_SIZE
        ):
            return DatagramKind.WIREGUARD
    if (
        size >= STUN_HEADER_SIZE
        and data[0] & 0xC0 == 0
        and bytes(data[4:8]) == _STUN_COOKIE_BYTES
        and int.from_bytes(data[2:4], "big") + STUN_HEADER_SIZE == size
        and size % 4 == 0
    ):
        return DatagramKind.STUN
    return DatagramKind.UNKNOWN
