"""Property tests: every parser of peer input either parses or raises ProtocolError - nothing
else escapes, and a rejected input changes no state. 10 000 examples per parser."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from socialvpn.errors import ProtocolError
from socialvpn.link import noise, packet
from socialvpn.link.constants import (
    LABEL_MAC1,
    MESSAGE_COOKIE_REPLY_SIZE,
    MESSAGE_INITIATION_SIZE,
    MESSAGE_RESPONSE_SIZE,
)
from socialvpn.link.noise import HandshakeState
from socialvpn.link.packet import DatagramKind
from socialvpn.link.session import inner_length

from .support import MONO0, WALL0, handshake, make_pair

pytestmark = pytest.mark.unit

MANY = settings(
    max_examples=10_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SOME = settings(MANY, max_examples=2_000)
FEW = settings(max_examples=500, deadline=None)

# Hypothesis costs ~0.3 ms per drawn example, so every test draws ONE byte string and shapes it
# with its first byte (cheap, and it still shrinks well):
#   0 as is              1 right type and size, random body       2 like 1 with a valid mac1
#   3 a genuine message with up to 8 bytes edited                 4 like 3 with a valid mac1
#   5 right type, random length
RAW = st.binary(max_size=200)


def shape(
    raw: bytes, size: int, kind: int, genuine: bytes | None = None, mac1_for: bytes = b""
) -> bytes:
    if not raw:
        return raw
    mode, rest = raw[0] % 6, raw[1:]
    header = bytes([kind, 0, 0, 0])
    if mode == 0:
        return rest
    if mode == 5:
        return header + rest
    if mode in (3, 4) and genuine is not None:
        out = bytearray(genuine)
        for i in range(0, min(len(rest) - 1, 16), 2):
            out[rest[i] % len(out)] = rest[i + 1]
        data = bytes(out)
    else:
        data = header + rest[: size - 4].ljust(size - 4, b"\0")
    if mode in (2, 4) and mac1_for:
        data = _with_valid_mac1(data, mac1_for)
    return data


def _with_valid_mac1(data: bytes, public: bytes) -> bytes:
    if len(data) < 32:
        return data
    smac1 = len(data) - 32
    key = noise.hash_(LABEL_MAC1, public)
    return data[:smac1] + noise.mac(key, data[:smac1]) + data[smac1 + 16 :]


def _only_protocol_errors(parse: Callable[[bytes], object], data: bytes) -> object | None:
    try:
        return parse(data)
    except ProtocolError as err:
        assert err.reason == "malformed"
        return None


# --- packet parsers -------------------------------------------------------------------------------


@MANY
@given(RAW)
def test_unpack_initiation_total(raw: bytes) -> None:
    data = shape(raw, MESSAGE_INITIATION_SIZE, 1)
    msg = _only_protocol_errors(packet.unpack_initiation, data)
    if msg is not None:
        assert packet.pack_initiation(msg) == data  # type: ignore[arg-type]


@MANY
@given(RAW)
def test_unpack_response_total(raw: bytes) -> None:
    data = shape(raw, MESSAGE_RESPONSE_SIZE, 2)
    msg = _only_protocol_errors(packet.unpack_response, data)
    if msg is not None:
        assert packet.pack_response(msg) == data  # type: ignore[arg-type]


@MANY
@given(RAW)
def test_unpack_cookie_reply_total(raw: bytes) -> None:
    data = shape(raw, MESSAGE_COOKIE_REPLY_SIZE, 3)
    msg = _only_protocol_errors(packet.unpack_cookie_reply, data)
    if msg is not None:
        assert packet.pack_cookie_reply(msg) == data  # type: ignore[arg-type]


@MANY
@given(RAW)
def test_unpack_transport_total(raw: bytes) -> None:
    data = shape(raw, 32 + (raw[-1] if raw else 0), 4)
    msg = _only_protocol_errors(packet.unpack_transport, data)
    if msg is not None:
        assert packet.pack_transport(msg) == data  # type: ignore[arg-type]


@SOME
@given(RAW)
def test_unpack_any_and_classify_total(raw: bytes) -> None:
    size, kind = [(148, 1), (92, 2), (64, 3), (48, 4), (20, 0)][raw[-1] % 5 if raw else 0]
    data = shape(raw, size, kind)
    msg = _only_protocol_errors(packet.unpack, data)
    verdict = packet.classify(data)  # never raises
    if msg is not None:
        assert verdict is DatagramKind.WIREGUARD
    elif verdict is DatagramKind.WIREGUARD:
        pytest.fail("classified as WireGuard but does not parse")


# --- handshake consumers --------------------------------------------------------------------------

PAIR = make_pair(label="/properties")
GENUINE_INIT = PAIR.a_to_b.create_initiation(MONO0, WALL0, 0x1234)  # Alice now awaits a response
# a real response, but to another handshake (another pair): deep paths for consume_response
_OTHER = make_pair(label="/other")
UNRELATED_RESP = _OTHER.bob.consume_initiation(
    _OTHER.a_to_b.create_initiation(MONO0, WALL0, 0x1234), _OTHER.lookup_bob, MONO0
).create_response(MONO0, 0x5678)


def _snapshot(peer: noise.PeerHandshake) -> tuple:
    return (
        peer.state,
        peer.local_index,
        peer.remote_index,
        peer.last_timestamp,
        peer.handshake_hash,
        peer.cookies.has_cookie,
    )


@MANY
@given(RAW)
def test_consume_initiation_total(raw: bytes) -> None:
    data = shape(raw, MESSAGE_INITIATION_SIZE, 1, GENUINE_INIT, PAIR.bob.public)
    before = _snapshot(PAIR.b_to_a)
    try:
        peer = PAIR.bob.consume_initiation(data, PAIR.lookup_bob, MONO0)
    except ProtocolError as err:
        assert err.reason in {"malformed", "mac1", "auth", "lowpoint", "unknown", "replay"}
        assert _snapshot(PAIR.b_to_a) == before
    else:  # only an unmodified genuine initiation can get here, and only once
        assert peer is PAIR.b_to_a and peer.state is HandshakeState.INITIATION_CONSUMED
        peer.zero()


@MANY
@given(RAW)
def test_consume_response_total(raw: bytes) -> None:
    data = shape(raw, MESSAGE_RESPONSE_SIZE, 2, UNRELATED_RESP, PAIR.alice.public)
    if raw and raw[0] % 6 in (1, 2):  # aim at Alice's outstanding handshake
        data = data[:8] + (0x1234).to_bytes(4, "little") + data[12:]
        data = _with_valid_mac1(data, PAIR.alice.public) if raw[0] % 6 == 2 else data
    before = _snapshot(PAIR.a_to_b)
    assert before[0] is HandshakeState.INITIATION_CREATED
    with pytest.raises(ProtocolError) as err:
        PAIR.a_to_b.consume_response(data, MONO0)
    assert err.value.reason in {"malformed", "mac1", "auth", "lowpoint", "state"}
    assert _snapshot(PAIR.a_to_b) == before


@SOME
@given(RAW)
def test_consume_cookie_reply_total(raw: bytes) -> None:
    data = shape(raw, MESSAGE_COOKIE_REPLY_SIZE, 3)
    if raw and raw[0] % 6 in (1, 2):
        data = data[:4] + (0x1234).to_bytes(4, "little") + data[8:]
    before = _snapshot(PAIR.a_to_b)
    with pytest.raises(ProtocolError) as err:
        PAIR.a_to_b.consume_cookie_reply(data, MONO0)
    assert err.value.reason in {"malformed", "auth", "state"}
    assert _snapshot(PAIR.a_to_b) == before


# --- data path ------------------------------------------------------------------------------------

SENDER, RECEIVER = handshake(make_pair(label="/session"), MONO0)
GENUINE_DATA = bytes(SENDER.seal(b"\x45" + bytes(40), MONO0))


@MANY
@given(RAW)
def test_session_open_total(raw: bytes) -> None:
    data = shape(raw, 32 + (raw[-1] % 64 if raw else 0), 4, GENUINE_DATA)
    if raw and raw[0] % 6 in (1, 2):  # aim at the receiving session
        data = data[:4] + RECEIVER.local_index.to_bytes(4, "little") + data[8:]
    highest = RECEIVER.replay.highest
    try:
        plain = RECEIVER.open(data, MONO0)
    except ProtocolError as err:
        assert err.reason in {"malformed", "index", "auth", "replay", "expired"}
        assert RECEIVER.replay.highest == highest
    else:
        assert data == GENUINE_DATA and plain[:1] == b"\x45"


@FEW
@given(st.binary(max_size=1500), st.integers(0, 1500))
def test_seal_open_round_trip(payload: bytes, mtu: int) -> None:
    sealed = SENDER.seal(payload, MONO0, mtu=mtu)
    assert 0 <= len(sealed) - 32 - len(payload) < 16
    assert RECEIVER.open(sealed, MONO0)[: len(payload)] == payload


@FEW
@given(st.binary(max_size=64))
def test_inner_length_total(data: bytes) -> None:
    try:
        assert 0 <= inner_length(data) <= len(data)
    except ProtocolError as err:
        assert err.reason == "malformed"
