"""The WireGuard handshake on top of Noise: round trip, mac1, cookies/mac2, replay, low points."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from socialvpn.errors import ProtocolError
from socialvpn.link import noise, packet
from socialvpn.link.constants import (
    DEFAULT_TIMERS,
    HANDSHAKE_INITIATION_RATE,
    IDENTIFIER,
    LABEL_MAC1,
    MESSAGE_INITIATION_SIZE,
    MESSAGE_RESPONSE_SIZE,
)
from socialvpn.link.noise import HandshakeState, PeerHandshake, StaticIdentity

from .support import MONO0, WALL0, handshake, key, make_pair

pytestmark = pytest.mark.unit

# X25519 points of small order: 0, 1, the two points of order 8, p - 1, and the non-canonical
# encodings p and p + 1 (libsodium's blacklist), each also with the ignored top bit set. Every
# DH with one of them gives the all-zero result.
_CANONICAL = [
    bytes(32),
    bytes([1]) + bytes(31),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    bytes.fromhex("ec" + "ff" * 30 + "7f"),  # p - 1
    bytes.fromhex("ed" + "ff" * 30 + "7f"),  # p
    bytes.fromhex("ee" + "ff" * 30 + "7f"),  # p + 1
]
LOW_ORDER_POINTS = _CANONICAL + [point[:31] + bytes([point[31] | 0x80]) for point in _CANONICAL]


def _snapshot(peer: PeerHandshake) -> tuple:
    return (
        peer.state,
        peer.local_index,
        peer.remote_index,
        peer.last_timestamp,
        peer.handshake_hash,
        peer.flood_guard._last,
    )


def _with_mac1(msg: bytearray, responder_public: bytes) -> bytes:
    """Recompute mac1 of an edited handshake message so it reaches the Noise layer."""
    smac1 = len(msg) - 32
    msg[smac1 : smac1 + 16] = noise.mac(noise.hash_(LABEL_MAC1, responder_public), msg[:smac1])
    return bytes(msg)


def test_round_trip_and_data_both_ways() -> None:
    pair = make_pair()
    init = pair.a_to_b.create_initiation(MONO0, WALL0, 0xAAAA0001)
    assert len(init) == MESSAGE_INITIATION_SIZE
    assert pair.a_to_b.state is HandshakeState.INITIATION_CREATED
    parsed = packet.unpack_initiation(init)
    assert parsed.sender == 0xAAAA0001 and parsed.mac2 == bytes(16)
    assert pair.bob.cookies.check_mac1(init)

    peer = pair.bob.consume_initiation(init, pair.lookup_bob, MONO0)
    assert peer is pair.b_to_a and peer.state is HandshakeState.INITIATION_CONSUMED
    assert peer.remote_index == 0xAAAA0001

    resp = peer.create_response(MONO0, 0xBBBB0002)
    assert len(resp) == MESSAGE_RESPONSE_SIZE
    parsed_resp = packet.unpack_response(resp)
    assert (parsed_resp.sender, parsed_resp.receiver) == (0xBBBB0002, 0xAAAA0001)
    assert pair.alice.cookies.check_mac1(resp)

    pair.a_to_b.consume_response(resp, MONO0)
    assert pair.a_to_b.state is HandshakeState.RESPONSE_CONSUMED
    assert pair.a_to_b.handshake_hash == peer.handshake_hash

    a, b = pair.a_to_b.begin_session(MONO0), peer.begin_session(MONO0)
    assert a.is_initiator and not b.is_initiator
    assert (a.local_index, a.remote_index) == (0xAAAA0001, 0xBBBB0002)
    assert (b.local_index, b.remote_index) == (0xBBBB0002, 0xAAAA0001)
    assert pair.a_to_b.state is HandshakeState.ZEROED and peer.handshake_hash is None

    for n in range(5):
        ping = f"ping {n}".encode()
        assert b.open(a.seal(ping, MONO0 + n), MONO0 + n)[: len(ping)] == ping
        pong = f"pong {n}".encode() * 50
        assert a.open(b.seal(pong, MONO0 + n), MONO0 + n)[: len(pong)] == pong
    assert b.open(a.seal(b"", MONO0), MONO0) == b""  # keepalive


def test_second_handshake_gives_fresh_keys() -> None:
    pair = make_pair()
    a1, b1 = handshake(pair, MONO0, WALL0)
    a2, b2 = handshake(pair, MONO0 + 1, WALL0 + 1, 0x33, 0x44)
    msg = a2.seal(b"x" * 16, MONO0 + 1)
    assert b2.open(msg, MONO0 + 1)[:1] == b"x"
    b1.local_index = b2.local_index
    with pytest.raises(ProtocolError) as err:
        b1.open(msg, MONO0 + 1)
    assert err.value.reason == "auth"


def test_psk_must_match() -> None:
    psk = bytes(range(32))
    pair = make_pair(psk_a=psk, psk_b=psk)
    a, b = handshake(pair)
    assert b.open(a.seal(b"hello", MONO0), MONO0)[:5] == b"hello"

    pair = make_pair(psk_a=psk, psk_b=None)
    init = pair.a_to_b.create_initiation(MONO0, WALL0, 1)
    peer = pair.bob.consume_initiation(init, pair.lookup_bob, MONO0)  # psk2: not used yet
    resp = peer.create_response(MONO0, 2)
    before = _snapshot(pair.a_to_b)
    with pytest.raises(ProtocolError) as err:
        pair.a_to_b.consume_response(resp, MONO0)
    assert err.value.reason == "auth"
    assert _snapshot(pair.a_to_b) == before


def test_mac1_failure_is_rejected_without_state_change() -> None:
    pair = make_pair()
    init = bytearray(pair.a_to_b.create_initiation(MONO0, WALL0, 7))
    before = _snapshot(pair.b_to_a)
    for position in (0 + 8, 50, 115, 116, 131):  # body bytes and mac1 itself
        bad = bytearray(init)
        bad[position] ^= 0x01
        assert not pair.bob.cookies.check_mac1(bad)
        with pytest.raises(ProtocolError) as err:
            pair.bob.consume_initiation(bytes(bad), pair.lookup_bob, MONO0)
        assert err.value.reason == "mac1"
    assert _snapshot(pair.b_to_a) == before
    # mac2 is not covered by mac1
    bad = bytearray(init)
    bad[140] ^= 0x01
    assert pair.bob.cookies.check_mac1(bad)

    # an initiation meant for someone else fails mac1 at Bob
    carol = StaticIdentity(key("carol"))
    to_carol = PeerHandshake(pair.alice, carol.public)
    with pytest.raises(ProtocolError) as err:
        pair.bob.consume_initiation(to_carol.create_initiation(MONO0, WALL0, 8), pair.lookup_bob, 0)
    assert err.value.reason == "mac1"


def test_response_mac1_failure_and_wrong_receiver() -> None:
    pair = make_pair()
    init = pair.a_to_b.create_initiation(MONO0, WALL0, 7)
    peer = pair.bob.consume_initiation(init, pair.lookup_bob, MONO0)
    resp = bytearray(peer.create_response(MONO0, 9))
    before = _snapshot(pair.a_to_b)
    bad = bytearray(resp)
    bad[40] ^= 0x80
    with pytest.raises(ProtocolError) as err:
        pair.a_to_b.consume_response(bytes(bad), MONO0)
    assert err.value.reason == "mac1"
    # body tampered but mac1 recomputed: the AEAD catches it
    with pytest.raises(ProtocolError) as err:
        pair.a_to_b.consume_response(_with_mac1(bad, pair.alice.public), MONO0)
    assert err.value.reason == "auth"
    # for another of our handshakes
    other = bytearray(resp)
    other[8:12] = (8).to_bytes(4, "little")
    with pytest.raises(ProtocolError) as err:
        pair.a_to_b.consume_response(_with_mac1(other, pair.alice.public), MONO0)
    assert err.value.reason == "state"
    assert _snapshot(pair.a_to_b) == before
    pair.a_to_b.consume_response(bytes(resp), MONO0)  # the genuine one still works
    # a second copy of the response is refused: no initiation outstanding any more
    with pytest.raises(ProtocolError) as err:
        pair.a_to_b.consume_response(bytes(resp), MONO0)
    assert err.value.reason == "state"


def test_body_tamper_with_valid_mac1_fails_auth() -> None:
    pair = make_pair()
    init = bytearray(pair.a_to_b.create_initiation(MONO0, WALL0, 7))
    for position in (40, 60, 100):  # inside encrypted static / timestamp
        bad = bytearray(init)
        bad[position] ^= 0x04
        with pytest.raises(ProtocolError) as err:
            pair.bob.consume_initiation(_with_mac1(bad, pair.bob.public), pair.lookup_bob, MONO0)
        assert err.value.reason == "auth"


def test_unknown_initiator() -> None:
    pair = make_pair()
    init = pair.a_to_b.create_initiation(MONO0, WALL0, 7)
    with pytest.raises(ProtocolError) as err:
        pair.bob.consume_initiation(init, lambda public: None, MONO0)
    assert err.value.reason == "unknown"
    # a lookup that answers with a peer of another identity or key is refused too
    with pytest.raises(ProtocolError) as err:
        pair.bob.consume_initiation(init, lambda public: pair.a_to_b, MONO0)
    assert err.value.reason == "unknown"


def test_replayed_initiation_changes_nothing() -> None:
    pair = make_pair()
    init = pair.a_to_b.create_initiation(MONO0, WALL0, 7)
    peer = pair.bob.consume_initiation(init, pair.lookup_bob, MONO0)
    resp = peer.create_response(MONO0, 9)
    pair.a_to_b.consume_response(resp, MONO0)
    a, b = pair.a_to_b.begin_session(MONO0), peer.begin_session(MONO0)

    before = _snapshot(peer)
    for later in (1.0, 60.0, 600.0):  # the same bytes, replayed later
        with pytest.raises(ProtocolError) as err:
            pair.bob.consume_initiation(init, pair.lookup_bob, MONO0 + later)
        assert err.value.reason == "replay"
        assert _snapshot(peer) == before
    assert b.open(a.seal(b"still fine", MONO0 + 1), MONO0 + 1)[:10] == b"still fine"


def test_older_or_equal_timestamp_initiation_changes_nothing() -> None:
    pair = make_pair()
    older = pair.a_to_b.create_initiation(MONO0, WALL0 - 10, 1)
    same_tick = pair.a_to_b.create_initiation(MONO0, WALL0 + 0.001, 2)  # whitened to WALL0
    newer = pair.a_to_b.create_initiation(MONO0, WALL0, 3)
    peer = pair.bob.consume_initiation(newer, pair.lookup_bob, MONO0)
    assert peer.remote_index == 3
    before = _snapshot(peer)
    for stale in (older, same_tick):
        with pytest.raises(ProtocolError) as err:
            pair.bob.consume_initiation(stale, pair.lookup_bob, MONO0 + 5)
        assert err.value.reason == "replay"
        assert _snapshot(peer) == before
    # the handshake in progress is untouched: the response still completes it
    resp = peer.create_response(MONO0 + 5, 4)
    assert packet.unpack_response(resp).receiver == 3
    pair.a_to_b.consume_response(resp, MONO0 + 5)
    a, b = pair.a_to_b.begin_session(MONO0 + 5), peer.begin_session(MONO0 + 5)
    assert b.open(a.seal(b"ok", MONO0 + 5), MONO0 + 5)[:2] == b"ok"


def test_initiation_flood_cap() -> None:
    pair = make_pair()
    first = pair.a_to_b.create_initiation(MONO0, WALL0, 1)
    second = pair.a_to_b.create_initiation(MONO0, WALL0 + 1, 2)
    third = pair.a_to_b.create_initiation(MONO0, WALL0 + 2, 3)
    pair.bob.consume_initiation(first, pair.lookup_bob, MONO0)
    before = _snapshot(pair.b_to_a)
    with pytest.raises(ProtocolError) as err:
        pair.bob.consume_initiation(second, pair.lookup_bob, MONO0 + HANDSHAKE_INITIATION_RATE / 2)
    assert err.value.reason == "flood"
    assert _snapshot(pair.b_to_a) == before
    pair.bob.consume_initiation(third, pair.lookup_bob, MONO0 + HANDSHAKE_INITIATION_RATE * 1.5)
    assert pair.b_to_a.remote_index == 3


@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=lambda p: p[:4].hex())
def test_low_order_points_are_rejected(point: bytes) -> None:
    with pytest.raises(ProtocolError) as err:
        noise.dh(key("x"), point)
    assert err.value.reason == "lowpoint"

    pair = make_pair()
    # 1. an initiation whose ephemeral is a low-order point (es at the responder)
    init = bytearray(pair.a_to_b.create_initiation(MONO0, WALL0, 1))
    init[8:40] = point
    before = _snapshot(pair.b_to_a)
    with pytest.raises(ProtocolError) as err:
        pair.bob.consume_initiation(_with_mac1(init, pair.bob.public), pair.lookup_bob, MONO0)
    assert err.value.reason == "lowpoint"
    assert _snapshot(pair.b_to_a) == before

    # 2. a response whose ephemeral is a low-order point (ee at the initiator)
    init = pair.a_to_b.create_initiation(MONO0, WALL0 + 1, 2)
    peer = pair.bob.consume_initiation(init, pair.lookup_bob, MONO0)
    resp = bytearray(peer.create_response(MONO0, 3))
    resp[12:44] = point
    before = _snapshot(pair.a_to_b)
    with pytest.raises(ProtocolError) as err:
        pair.a_to_b.consume_response(_with_mac1(resp, pair.alice.public), MONO0)
    assert err.value.reason == "lowpoint"
    assert _snapshot(pair.a_to_b) == before

    # 3. a peer configured with a low-order static key: no initiation can be made
    bad_peer = PeerHandshake(pair.alice, point)
    with pytest.raises(ProtocolError) as err:
        bad_peer.create_initiation(MONO0, WALL0, 4)
    assert err.value.reason == "lowpoint"
    assert bad_peer.state is HandshakeState.ZEROED


def test_cookie_reply_round_trip_and_mac2() -> None:
    pair = make_pair()
    source = noise.source_bytes("192.0.2.1", 51820)
    other_source = noise.source_bytes("192.0.2.2", 51820)
    checker = pair.bob.cookies

    init = pair.a_to_b.create_initiation(MONO0, WALL0, 0x77)
    assert checker.check_mac1(init)
    assert not checker.check_mac2(init, source, MONO0)  # no cookie yet, and no secret yet

    # Bob is under load: he answers with a cookie reply instead of processing the initiation
    reply = checker.create_reply(init, packet.unpack_initiation(init).sender, source, MONO0)
    assert len(reply) == 64 and packet.unpack_cookie_reply(reply).receiver == 0x77

    # tampered replies are refused without effect
    bad = bytearray(reply)
    bad[-1] ^= 1
    with pytest.raises(ProtocolError) as err:
        pair.a_to_b.consume_cookie_reply(bytes(bad), MONO0)
    assert err.value.reason == "auth"
    assert not pair.a_to_b.cookies.has_cookie
    other = make_pair(label="/other")
    other.a_to_b.create_initiation(MONO0, WALL0, 0x77)  # another mac1: the reply is not for it
    with pytest.raises(ProtocolError) as err:
        other.a_to_b.consume_cookie_reply(reply, MONO0)
    assert err.value.reason == "auth"

    pair.a_to_b.consume_cookie_reply(reply, MONO0 + 0.1)
    assert pair.a_to_b.cookies.has_cookie

    # the next initiation carries mac2, bound to Alice's source address
    retry = pair.a_to_b.create_initiation(MONO0 + 1, WALL0 + 1, 0x78)
    assert packet.unpack_initiation(retry).mac2 != bytes(16)
    assert checker.check_mac1(retry)
    assert checker.check_mac2(retry, source, MONO0 + 1)
    assert not checker.check_mac2(retry, other_source, MONO0 + 1)
    tampered = bytearray(retry)
    tampered[-1] ^= 1
    assert not checker.check_mac2(tampered, source, MONO0 + 1)
    peer = pair.bob.consume_initiation(retry, pair.lookup_bob, MONO0 + 1)
    # responses get mac2 the same way once Bob holds a cookie from Alice
    resp = peer.create_response(MONO0 + 1, 0x99)
    assert packet.unpack_response(resp).mac2 == bytes(16)
    pair.a_to_b.consume_response(resp, MONO0 + 1)

    # the cookie secret rotates: after 120 s a mac2 made with the old cookie no longer verifies
    late = pair.a_to_b.create_initiation(MONO0 + 100, WALL0 + 100, 0x79)
    assert checker.check_mac2(late, source, MONO0 + 100)
    assert not checker.check_mac2(late, source, MONO0 + 0 + DEFAULT_TIMERS.cookie_refresh_time + 1)
    # and Alice stops using a cookie older than 120 s
    stale = pair.a_to_b.create_initiation(MONO0 + 121, WALL0 + 121, 0x7A)
    assert packet.unpack_initiation(stale).mac2 == bytes(16)


def test_cookie_secret_rotation_makes_new_cookies() -> None:
    pair = make_pair()
    source = noise.source_bytes("2001:db8::1", 4000)
    checker = pair.bob.cookies
    init = pair.a_to_b.create_initiation(MONO0, WALL0, 1)
    checker.create_reply(init, 1, source, MONO0)
    first = checker.cookie(source, MONO0)
    assert first is not None and checker.cookie(source, MONO0 + 119) == first
    assert checker.cookie(source, MONO0 + 121) is None
    checker.create_reply(init, 1, source, MONO0 + 121)
    assert checker.cookie(source, MONO0 + 121) not in (None, first)


def test_cookie_reply_needs_a_sent_message() -> None:
    gen = noise.CookieGenerator(key("bob").public_key().public_bytes_raw())
    reply = packet.pack_cookie_reply(packet.CookieReply(1, bytes(24), bytes(32)))
    with pytest.raises(ProtocolError) as err:
        gen.consume_reply(reply, 0.0)
    assert err.value.reason == "state"
    checker = noise.CookieChecker(bytes(32))
    assert not checker.check_mac1(b"\x01\x00\x00\x00")
    assert not checker.check_mac2(b"", b"src", 0.0)
    with pytest.raises(ProtocolError):
        checker.create_reply(b"\x04" + bytes(40), 1, b"src", 0.0)


def test_local_illegal_moves() -> None:
    pair = make_pair()
    with pytest.raises(noise.HandshakeStateError):
        pair.b_to_a.create_response(MONO0, 1)
    with pytest.raises(noise.HandshakeStateError):
        pair.a_to_b.begin_session(MONO0)
    pair.a_to_b.create_initiation(MONO0, WALL0, 1)
    with pytest.raises(noise.HandshakeStateError):
        pair.a_to_b.begin_session(MONO0)
    with pytest.raises(ValueError):
        PeerHandshake(pair.alice, b"short")
    with pytest.raises(ValueError):
        PeerHandshake(pair.alice, pair.bob.public, psk=b"short")


def test_simultaneous_initiations_resolve() -> None:
    """Both sides initiate at once; each consumes the other's. The one that answers last wins,
    and whichever pair of sessions completes is consistent."""
    pair = make_pair()
    init_a = pair.a_to_b.create_initiation(MONO0, WALL0, 0xA1)
    init_b = pair.b_to_a.create_initiation(MONO0, WALL0, 0xB1)
    peer_at_b = pair.bob.consume_initiation(init_a, pair.lookup_bob, MONO0)
    resp_b = peer_at_b.create_response(MONO0, 0xB2)
    pair.a_to_b.consume_response(resp_b, MONO0)
    a = pair.a_to_b.begin_session(MONO0)
    b = peer_at_b.begin_session(MONO0)
    assert b.open(a.seal(b"data", MONO0), MONO0)[:4] == b"data"
    # Bob's own initiation then reaches Alice and starts a second, independent handshake
    peer_at_a = pair.alice.consume_initiation(init_b, pair.lookup_alice, MONO0 + 1)
    assert peer_at_a.remote_index == 0xB1


def test_default_ephemeral_keys_are_random() -> None:
    alice = StaticIdentity(X25519PrivateKey.generate())
    bob = StaticIdentity(X25519PrivateKey.generate())
    a = PeerHandshake(alice, bob.public)
    b = PeerHandshake(bob, alice.public)
    m1 = a.create_initiation(0.0, WALL0, 1)
    m2 = a.create_initiation(0.0, WALL0 + 1, 1)
    assert m1[8:40] != m2[8:40]
    peer = bob.consume_initiation(m2, lambda k: b if k == alice.public else None, 0.0)
    a_session = (a.consume_response(peer.create_response(0.0, 2), 0.0), a.begin_session(0.0))[1]
    assert peer.begin_session(0.0).open(a_session.seal(b"ok", 0.0), 0.0)[:2] == b"ok"


def test_identifier_is_the_prologue() -> None:
    """Our initiation decrypts with a generic Noise responder whose prologue is IDENTIFIER."""
    pair = make_pair()
    init = packet.unpack_initiation(pair.a_to_b.create_initiation(MONO0, WALL0, 1))
    responder = noise.NoiseHandshake(initiator=False, static=key("bob"), prologue=IDENTIFIER)
    body = init.ephemeral + init.encrypted_static + init.encrypted_timestamp
    payload = responder.read_message(body)
    assert payload == noise.tai64n(WALL0)
    assert responder.remote_static == pair.alice.public
    wrong = noise.NoiseHandshake(initiator=False, static=key("bob"), prologue=b"other")
    with pytest.raises(ProtocolError):
        wrong.read_message(body)
    assert dataclasses.is_dataclass(init)


def test_cookie_reply_to_our_response_after_the_session_began() -> None:
    """Alice, under load, answers Bob's response with a cookie reply; Bob already derived his
    session (handshake zeroed) and still takes the cookie, as wireguard-go does."""
    pair = make_pair()
    init = pair.a_to_b.create_initiation(MONO0, WALL0, 1)
    peer = pair.bob.consume_initiation(init, pair.lookup_bob, MONO0)
    resp = peer.create_response(MONO0, 2)
    peer.begin_session(MONO0)
    assert peer.state is HandshakeState.ZEROED
    source = noise.source_bytes("198.51.100.9", 1234)
    reply = pair.alice.cookies.create_reply(resp, 2, source, MONO0)
    peer.consume_cookie_reply(reply, MONO0)
    assert peer.cookies.has_cookie
    again = peer.create_initiation(MONO0 + 1, WALL0 + 1, 3)  # Bob now initiates, with mac2
    assert pair.alice.cookies.check_mac2(again, source, MONO0 + 1)


def test_transition_table_guards_every_move() -> None:
    pair = make_pair()
    assert pair.a_to_b.state is HandshakeState.ZEROED
    for event in noise.HANDSHAKE_TRANSITIONS:
        allowed, _ = noise.HANDSHAKE_TRANSITIONS[event]
        for state in HandshakeState:
            if state in allowed:
                assert noise._check_move(state, event) in HandshakeState
            elif event.startswith("consume_"):
                with pytest.raises(ProtocolError):
                    noise._check_move(state, event)
            else:
                with pytest.raises(noise.HandshakeStateError):
                    noise._check_move(state, event)
    resp = packet.pack_response(packet.Response(1, 0, bytes(32), bytes(16)))
    with pytest.raises(ProtocolError) as err:
        pair.a_to_b.consume_response(_with_mac1(bytearray(resp), pair.alice.public), MONO0)
    assert err.value.reason == "state"
