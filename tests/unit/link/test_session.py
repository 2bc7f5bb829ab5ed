"""Transport sessions: seal/open, padding, replay and auth failures, expiry, key rotation."""

from __future__ import annotations

import pytest

from socialvpn.errors import ProtocolError
from socialvpn.link import packet
from socialvpn.link.constants import (
    MAX_CONTENT_SIZE,
    REJECT_AFTER_TIME,
    LinkTimers,
)
from socialvpn.link.session import Keypairs, Session, SessionExpired, inner_length, padded_size

from .support import MONO0, handshake, make_pair

pytestmark = pytest.mark.unit


def _pair(timers: LinkTimers | None = None, now: float = MONO0) -> tuple[Session, Session]:
    return handshake(make_pair(timers) if timers else make_pair(), now)


def _reason(call, *args) -> str:
    with pytest.raises(ProtocolError) as err:
        call(*args)
    return err.value.reason


def test_seal_layout_counter_and_padding() -> None:
    a, b = _pair()
    for size, expected in [(0, 32), (1, 48), (15, 48), (16, 48), (17, 64), (1400, 1440)]:
        msg = a.seal(b"\x45" * size, MONO0)
        assert len(msg) == expected
        parsed = packet.unpack_transport(msg)
        assert parsed.receiver == b.local_index
        assert parsed.counter == a.send_counter - 1
        plain = b.open(msg, MONO0)
        assert len(plain) == expected - 32
        assert plain[:size] == b"\x45" * size and plain[size:] == bytes(len(plain) - size)
    assert a.send_counter == 6


def test_padding_respects_mtu() -> None:
    assert padded_size(0) == 0 and padded_size(1) == 16 and padded_size(16) == 16
    assert padded_size(1379, 1380) == 1380  # would be 1392, capped at the MTU
    assert padded_size(1370, 1380) == 1376
    assert padded_size(1380, 1380) == 1380
    assert padded_size(1381, 1380) == 1381 + 15  # beyond the MTU (GSO): pad the last unit
    a, b = _pair()
    assert len(a.seal(bytes(1379), MONO0, mtu=1380)) == 32 + 1380


def test_open_accepts_views_and_bytearrays() -> None:
    a, b = _pair()
    msg = a.seal(b"abc", MONO0)
    assert b.open(memoryview(bytes(msg)), MONO0)[:3] == b"abc"
    msg = a.seal(b"def", MONO0)
    assert b.open(bytes(msg), MONO0)[:3] == b"def"


def test_forged_packets_fail_auth_and_do_not_move_the_window() -> None:
    a, b = _pair()
    genuine = a.seal(b"payload", MONO0)
    for position in (16, 20, len(genuine) - 1):
        forged = bytearray(genuine)
        forged[position] ^= 0x01
        assert _reason(b.open, bytes(forged), MONO0) == "auth"
    # a forged counter far ahead must not advance the window
    ahead = bytearray(genuine)
    ahead[8:16] = (10**9).to_bytes(8, "little")
    assert _reason(b.open, bytes(ahead), MONO0) == "auth"
    assert b.replay.highest == 0
    assert b.open(genuine, MONO0)[:7] == b"payload"


def test_replays_and_reordering() -> None:
    a, b = _pair()
    msgs = [a.seal(f"m{i}".encode(), MONO0) for i in range(10)]
    for i in (3, 1, 0, 2, 9, 4, 8, 5, 7, 6):
        assert b.open(msgs[i], MONO0)[:2] == f"m{i}".encode()
    for i in range(10):
        assert _reason(b.open, msgs[i], MONO0) == "replay"


def test_behind_the_window_is_refused() -> None:
    a, b = _pair()
    old = a.seal(b"old", MONO0)
    a.send_counter = 9000
    assert b.open(a.seal(b"new", MONO0), MONO0)[:3] == b"new"
    assert _reason(b.open, old, MONO0) == "replay"


def test_wrong_receiver_and_malformed() -> None:
    a, b = _pair()
    msg = a.seal(b"x", MONO0)
    assert _reason(a.open, msg, MONO0) == "index"  # Alice's own message is not for her
    assert _reason(b.open, msg[:31], MONO0) == "malformed"
    assert _reason(b.open, b"\x01" + bytes(msg[1:]), MONO0) == "malformed"
    assert _reason(b.open, bytes(packet.MAX_MESSAGE_SIZE + 1), MONO0) == "malformed"
    for junk in (None, "text", 42, b"", b"\x04\x00"):
        assert _reason(b.open, junk, MONO0) == "malformed"


def test_reject_after_time() -> None:
    a, b = _pair()
    early = a.seal(b"early", MONO0 + REJECT_AFTER_TIME - 0.5)
    assert b.open(early, MONO0 + REJECT_AFTER_TIME - 0.1)[:5] == b"early"
    late = a.seal(b"late", MONO0 + REJECT_AFTER_TIME - 0.01)
    assert a.can_send(MONO0 + REJECT_AFTER_TIME - 0.01)
    assert not a.can_send(MONO0 + REJECT_AFTER_TIME)
    with pytest.raises(SessionExpired) as err:
        a.seal(b"too late", MONO0 + REJECT_AFTER_TIME)
    assert err.value.reason == "expired"
    assert _reason(b.open, late, MONO0 + REJECT_AFTER_TIME) == "expired"
    assert b.expired(MONO0 + REJECT_AFTER_TIME) and b.age(MONO0 + 1) == 1


def test_reject_after_messages() -> None:
    timers = LinkTimers(rekey_after_messages=5, reject_after_messages=8)
    a, b = _pair(timers)
    for i in range(8):
        assert b.open(a.seal(bytes([i]), MONO0), MONO0)[0] == i
    assert not a.can_send(MONO0)
    with pytest.raises(SessionExpired):
        a.seal(b"more", MONO0)
    assert a.send_counter == 8  # the failed seal did not use a counter
    # a peer that sends at or beyond the limit is refused before decryption
    header = packet.pack_transport_header(b.local_index, 8)
    assert _reason(b.open, header + bytes(16), MONO0) == "expired"


def test_zeroed_session_refuses_everything() -> None:
    a, b = _pair()
    msg = a.seal(b"x", MONO0)
    b.zero()
    assert b.zeroed and b.expired(MONO0)
    assert _reason(b.open, msg, MONO0) == "expired"
    with pytest.raises(SessionExpired):
        b.seal(b"x", MONO0)


def test_oversized_plaintext_is_a_local_error() -> None:
    a, _ = _pair()
    with pytest.raises(ValueError):
        a.seal(bytes(MAX_CONTENT_SIZE + 1), MONO0)
    assert a.send_counter == 0
    with pytest.raises(ValueError):
        Session(b"short", bytes(32), local_index=1, remote_index=2, created=0, is_initiator=True)
    assert "initiator" in repr(a)


def test_inner_length() -> None:
    ipv4 = bytes([0x45, 0]) + (28).to_bytes(2, "big") + bytes(24)
    assert inner_length(ipv4 + bytes(4)) == 28
    ipv6 = bytes([0x60, 0, 0, 0]) + (8).to_bytes(2, "big") + bytes(42)
    assert inner_length(ipv6 + bytes(6)) == 48
    assert inner_length(b"") == 0
    for bad in [
        b"\x45" + bytes(10),  # short IPv4
        bytes([0x45, 0]) + (10).to_bytes(2, "big") + bytes(24),  # total length < header
        bytes([0x45, 0]) + (100).to_bytes(2, "big") + bytes(24),  # longer than payload
        bytes([0x60]) + bytes(20),
        bytes([0x60, 0, 0, 0]) + (100).to_bytes(2, "big") + bytes(42),
        b"\x00" * 40,
    ]:
        with pytest.raises(ProtocolError) as err:
            inner_length(bad)
        assert err.value.reason == "malformed"


def test_keypairs_rotation_like_wireguard_go() -> None:
    pair = make_pair()
    a_pairs, b_pairs = Keypairs(), Keypairs()
    a1, b1 = handshake(pair, MONO0, a_index=1, b_index=2)
    assert a_pairs.install(a1) == []
    assert a_pairs.current is a1 and a_pairs.previous is None
    assert b_pairs.install(b1) == []
    assert b_pairs.next is b1 and b_pairs.current is None
    assert b_pairs.sending(MONO0) is None  # the responder waits for key confirmation
    confirmed, dropped = b_pairs.received_with(b1)
    assert confirmed and dropped == [] and b_pairs.current is b1 and b_pairs.next is None
    assert b_pairs.received_with(b1) == (False, [])
    assert b_pairs.sending(MONO0) is b1

    a2, b2 = handshake(pair, MONO0 + 120, 1_700_000_200.0, a_index=3, b_index=4)
    assert a_pairs.install(a2) == []
    assert (a_pairs.current, a_pairs.previous) == (a2, a1)
    assert b_pairs.install(b2) == []
    assert (b_pairs.current, b_pairs.next, b_pairs.previous) == (b1, b2, None)
    # old traffic still flows on the old session until the new one is confirmed
    assert b1.open(a1.seal(b"old", MONO0 + 120), MONO0 + 120)[:3] == b"old"
    confirmed, dropped = b_pairs.received_with(b2)
    assert confirmed and dropped == [] and (b_pairs.current, b_pairs.previous) == (b2, b1)

    a3, b3 = handshake(pair, MONO0 + 240, 1_700_000_400.0, a_index=5, b_index=6)
    assert a_pairs.install(a3) == [a1] and a1.zeroed
    assert b_pairs.install(b3) == [b1] and b1.zeroed
    assert list(b_pairs) == [b2, b3]
    # an initiator session arriving while a responder "next" is pending replaces both
    a4, _ = handshake(pair, MONO0 + 300, 1_700_000_500.0, a_index=7, b_index=8)
    dropped = b_pairs.install(a4)
    assert set(map(id, dropped)) == {id(b2)} and b_pairs.previous is b3
    assert b_pairs.current is a4 and b_pairs.next is None
    assert {id(s) for s in b_pairs.clear()} == {id(a4), id(b3)}
    assert list(b_pairs) == []


def test_reserve_hands_out_each_counter_once_and_respects_the_limit() -> None:
    timers = LinkTimers(rekey_after_messages=5, reject_after_messages=10)
    a, b = _pair(timers)
    assert a.reserve(4, MONO0) == 0
    assert a.reserve(3, MONO0) == 4
    with pytest.raises(SessionExpired):
        a.reserve(4, MONO0)  # only 3 left: nothing is taken
    assert a.send_counter == 7
    assert a.reserve(3, MONO0) == 7
    with pytest.raises(SessionExpired):
        a.reserve(1, MONO0)
    c, _ = _pair()
    with pytest.raises(SessionExpired):
        c.reserve(1, MONO0 + REJECT_AFTER_TIME)
    c.zero()
    with pytest.raises(SessionExpired):
        c.reserve(1, MONO0)


@pytest.mark.parametrize("mtu", [0, 1380, 1420])
def test_seal_into_back_to_back(mtu: int) -> None:
    """Back-to-back messages in one buffer, each opening to the padded plaintext, for sizes
    where padding takes the fast path and where it does not."""
    a, b = _pair()
    sizes = [0, 1, 15, 16, 17, 52, 1379, 1380, 1381, 1400, 1420, 1421]
    first = a.reserve(len(sizes), MONO0)
    out = bytearray(sum(sizes) + 48 * len(sizes))
    view = memoryview(out)
    pos = 0
    for i, size in enumerate(sizes):
        plain = bytes([i + 1]) * size
        n = a.seal_into(first + i, plain, mtu, view[pos:])
        assert n == 32 + padded_size(size, mtu)
        message = bytes(view[pos : pos + n])
        assert packet.unpack_transport(message).counter == first + i
        opened = b.open(message, MONO0)
        assert opened[:size] == plain and opened[size:] == bytes(len(opened) - size)
        pos += n
    a.zero()
    with pytest.raises(SessionExpired):
        a.seal_into(first, b"x", mtu, view)
