"""WireGuard message pack/unpack and STUN/WireGuard demultiplexing."""

from __future__ import annotations

import pytest

from socialvpn.errors import ProtocolError
from socialvpn.link import packet
from socialvpn.link.constants import (
    MAX_MESSAGE_SIZE,
    MESSAGE_COOKIE_REPLY_SIZE,
    MESSAGE_INITIATION_SIZE,
    MESSAGE_RESPONSE_SIZE,
    MESSAGE_TRANSPORT_SIZE,
)
from socialvpn.link.packet import DatagramKind

pytestmark = pytest.mark.unit

INITIATION = packet.Initiation(
    0x01020304, b"E" * 32, b"S" * 48, b"T" * 28, mac1=b"1" * 16, mac2=b"2" * 16
)
RESPONSE = packet.Response(0x0A0B0C0D, 0xFFFFFFFF, b"e" * 32, b"n" * 16, b"m" * 16, b"M" * 16)
COOKIE_REPLY = packet.CookieReply(7, b"N" * 24, b"C" * 32)


def test_initiation_layout() -> None:
    raw = packet.pack_initiation(INITIATION)
    assert len(raw) == MESSAGE_INITIATION_SIZE == 148
    assert raw[:8] == b"\x01\x00\x00\x00\x04\x03\x02\x01"
    assert raw[8:40] == b"E" * 32 and raw[40:88] == b"S" * 48 and raw[88:116] == b"T" * 28
    assert raw[116:132] == b"1" * 16 and raw[132:] == b"2" * 16
    assert packet.unpack_initiation(raw) == INITIATION
    assert packet.unpack(raw) == INITIATION
    assert packet.unpack_initiation(bytearray(raw)) == INITIATION
    assert packet.unpack_initiation(memoryview(raw)) == INITIATION
    assert packet.pack(INITIATION) == raw


def test_response_layout() -> None:
    raw = packet.pack_response(RESPONSE)
    assert len(raw) == MESSAGE_RESPONSE_SIZE == 92
    assert raw[:12] == b"\x02\x00\x00\x00\x0d\x0c\x0b\x0a\xff\xff\xff\xff"
    assert raw[60:76] == b"m" * 16
    assert packet.unpack_response(raw) == RESPONSE == packet.unpack(raw)
    assert packet.pack(RESPONSE) == raw


def test_cookie_reply_layout() -> None:
    raw = packet.pack_cookie_reply(COOKIE_REPLY)
    assert len(raw) == MESSAGE_COOKIE_REPLY_SIZE == 64
    assert raw[:8] == b"\x03\x00\x00\x00\x07\x00\x00\x00"
    assert packet.unpack_cookie_reply(raw) == COOKIE_REPLY == packet.unpack(raw)
    assert packet.pack(COOKIE_REPLY) == raw


def test_transport_layout() -> None:
    header = packet.pack_transport_header(5, 2**64 - 1)
    assert header == b"\x04\x00\x00\x00\x05\x00\x00\x00" + b"\xff" * 8
    raw = header + b"x" * 16
    msg = packet.unpack_transport(raw)
    assert (msg.receiver, msg.counter, bytes(msg.encrypted)) == (5, 2**64 - 1, b"x" * 16)
    assert packet.pack(msg) == raw
    big = packet.pack_transport_header(1, 1) + bytes(MAX_MESSAGE_SIZE - 16)
    assert len(packet.unpack_transport(big).encrypted) == MAX_MESSAGE_SIZE - 16


@pytest.mark.parametrize(
    ("unpacker", "good"),
    [
        (packet.unpack_initiation, packet.pack_initiation(INITIATION)),
        (packet.unpack_response, packet.pack_response(RESPONSE)),
        (packet.unpack_cookie_reply, packet.pack_cookie_reply(COOKIE_REPLY)),
    ],
    ids=["initiation", "response", "cookie"],
)
def test_fixed_size_messages_reject_bad_input(unpacker, good: bytes) -> None:
    bad_inputs = [
        b"",
        good[:4],
        good[:-1],
        good + b"\x00",
        b"\x05" + good[1:],  # unknown type
        good[:1] + b"\x01" + good[2:],  # reserved byte set
        good[:3] + b"\x80" + good[4:],
        bytes([good[0] % 3 + 1]) + good[1:],  # another type with this size
        "a string",
        None,
        12345,
    ]
    for bad in bad_inputs:
        with pytest.raises(ProtocolError) as err:
            unpacker(bad)
        assert err.value.reason == "malformed"


def test_transport_rejects_bad_input() -> None:
    good = packet.pack_transport_header(1, 1) + bytes(16)
    for bad in [
        b"",
        good[:31],
        good[:1] + b"\x01" + good[2:],
        b"\x01" + good[1:],
        packet.pack_transport_header(1, 1) + bytes(MAX_MESSAGE_SIZE - 15),
        None,
    ]:
        with pytest.raises(ProtocolError) as err:
            packet.unpack_transport(bad)
        assert err.value.reason == "malformed"
    assert len(good) == MESSAGE_TRANSPORT_SIZE


def test_unpack_dispatch_and_message_type() -> None:
    for bad in [b"", b"\x00\x00\x00\x00" + bytes(100), b"\x05\x00\x00\x00", b"\x01\x00\x00"]:
        with pytest.raises(ProtocolError):
            packet.unpack(bad)
    assert packet.message_type(b"\x04\x00\x00\x00") == 4
    multi = memoryview(bytes(148)).cast("I")  # a view of another item size is re-cast
    with pytest.raises(ProtocolError):
        packet.unpack(multi)


def test_pack_refuses_wrong_field_sizes() -> None:
    with pytest.raises(ValueError):
        packet.pack_initiation(packet.Initiation(1, b"short", b"S" * 48, b"T" * 28))
    with pytest.raises(ValueError):
        packet.pack_initiation(packet.Initiation(2**32, b"E" * 32, b"S" * 48, b"T" * 28))
    with pytest.raises(ValueError):
        packet.pack_response(packet.Response(1, -1, b"e" * 32, b"n" * 16))
    with pytest.raises(ValueError):
        packet.pack_cookie_reply(packet.CookieReply(1, b"N" * 23, b"C" * 32))
    with pytest.raises(ValueError):
        packet.pack_transport_header(1, 2**64)
    with pytest.raises(ValueError):
        packet.pack_transport(packet.Transport(1, 1, memoryview(b"short")))
    with pytest.raises(TypeError):
        packet.pack("nope")  # type: ignore[arg-type]


STUN_BINDING_REQUEST = bytes.fromhex(
    "0001 0008 2112a442 000102030405060708090a0b 8028 0004 12345678".replace(" ", "")
)


def test_classify() -> None:
    assert packet.classify(packet.pack_initiation(INITIATION)) is DatagramKind.WIREGUARD
    assert packet.classify(packet.pack_response(RESPONSE)) is DatagramKind.WIREGUARD
    assert packet.classify(packet.pack_cookie_reply(COOKIE_REPLY)) is DatagramKind.WIREGUARD
    transport = packet.pack_transport_header(1, 1) + bytes(16)
    assert packet.classify(transport) is DatagramKind.WIREGUARD
    assert packet.classify(memoryview(transport)) is DatagramKind.WIREGUARD
    assert packet.classify(STUN_BINDING_REQUEST) is DatagramKind.STUN
    assert packet.classify(bytearray(STUN_BINDING_REQUEST)) is DatagramKind.STUN
    # a binding success response (class bits set in the type) is STUN too
    assert packet.classify(b"\x01\x01" + STUN_BINDING_REQUEST[2:]) is DatagramKind.STUN
    # a WireGuard initiation whose sender index happens to spell the STUN magic cookie
    tricky = packet.pack_initiation(packet.Initiation(0x42A41221, b"E" * 32, b"S" * 48, b"T" * 28))
    assert tricky[4:8] == bytes.fromhex("2112a442")
    assert packet.classify(tricky) is DatagramKind.WIREGUARD
    for junk in [
        b"",
        b"\x01",
        b"\x01\x00\x00\x00",  # type 1 of the wrong size
        packet.pack_initiation(INITIATION)[:-1],
        b"\x04\x00\x00\x00" + bytes(20),  # transport shorter than 32
        b"\x05\x00\x00\x00" + bytes(100),
        b"\xc0\x01\x00\x00\x21\x12\xa4\x42" + bytes(12),  # top bits set
        STUN_BINDING_REQUEST[:-4],  # length field does not match
        b"\x00\x01\x00\x00\x21\x12\xa4\x43" + bytes(12),  # wrong cookie
        b"GET / HTTP/1.1\r\n\r\n",
    ]:
        assert packet.classify(junk) is DatagramKind.UNKNOWN, junk
