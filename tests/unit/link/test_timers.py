"""WireGuard timer rules driven by a FakeClock."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from socialvpn.clock import FakeClock
from socialvpn.link.constants import (
    KEEPALIVE_TIMEOUT,
    MAX_TIMER_HANDSHAKES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_TIME,
    REKEY_ATTEMPT_TIME,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
    LinkTimers,
)
from socialvpn.link.session import SessionExpired
from socialvpn.link.timers import PeerTimers, Timer, TimerAction

from .support import handshake, make_pair

pytestmark = pytest.mark.unit

A = TimerAction


@dataclass
class Key:
    created: float
    is_initiator: bool = True
    send_counter: int = 0


def _timers(jitter: float = 0.0, **kwargs) -> PeerTimers:
    return PeerTimers(rng=lambda: jitter, **kwargs)


def _run_until(t: PeerTimers, clock: FakeClock, until: float) -> list[tuple[float, TimerAction]]:
    """Advance the clock deadline by deadline up to ``until``, collecting actions; carry out
    SEND_INITIATION the way the manager would (report it sent)."""
    fired: list[tuple[float, TimerAction]] = []
    while True:
        deadline = t.next_deadline()
        if deadline is None or deadline > until:
            clock.advance(max(0.0, until - clock.monotonic()))
            return fired
        clock.advance(max(0.0, deadline - clock.monotonic()))
        now = clock.monotonic()
        for action in t.handle_timer(now):
            fired.append((now, action))
            if action is A.SEND_INITIATION:
                t.on_any_authenticated_packet_traversed(now)
                t.on_any_authenticated_packet_sent(now)
                t.on_handshake_initiated(now)


def test_keepalive_after_receive_without_send() -> None:
    clock, t = FakeClock(), _timers()
    t0 = clock.monotonic()
    t.on_data_received(t0)
    assert t.next_deadline() == t0 + KEEPALIVE_TIMEOUT
    clock.advance(KEEPALIVE_TIMEOUT - 0.001)
    assert t.handle_timer(clock.monotonic()) == []
    clock.advance(0.001)
    assert t.handle_timer(clock.monotonic()) == [A.SEND_KEEPALIVE]
    assert t.next_deadline() is None


def test_no_keepalive_when_we_sent_something() -> None:
    clock, t = FakeClock(), _timers()
    t.on_data_received(clock.monotonic())
    clock.advance(3)
    t.on_any_authenticated_packet_sent(clock.monotonic())
    assert _run_until(t, clock, clock.monotonic() + 60) == []


def test_another_keepalive_when_more_data_arrived_meanwhile() -> None:
    clock, t = FakeClock(), _timers()
    t0 = clock.monotonic()
    t.on_data_received(t0)
    t.on_data_received(t0 + 1)  # already pending: remember to send another
    assert t.need_another_keepalive
    fired = _run_until(t, clock, t0 + 25)
    assert fired == [(t0 + 10, A.SEND_KEEPALIVE), (t0 + 20, A.SEND_KEEPALIVE)]


def test_new_handshake_after_send_without_receive() -> None:
    clock, t = FakeClock(), _timers()
    t0 = clock.monotonic()
    t.on_data_sent(t0)
    t.on_data_sent(t0 + 5)  # does not push the deadline
    assert t.next_deadline() == t0 + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT == t0 + 15
    fired = _run_until(t, clock, t0 + 15)
    assert fired == [(t0 + 15, A.SEND_INITIATION)]


def test_new_handshake_jitter_is_bounded() -> None:
    t = _timers(jitter=0.999999)
    t.on_data_sent(0.0)
    deadline = t.next_deadline()
    assert deadline is not None and 15.0 < deadline < 15.0 + REKEY_TIMEOUT_JITTER_MAX <= 15.334


def test_any_received_packet_cancels_new_handshake() -> None:
    clock, t = FakeClock(), _timers()
    t.on_data_sent(clock.monotonic())
    clock.advance(14)
    t.on_any_authenticated_packet_received(clock.monotonic())
    assert _run_until(t, clock, clock.monotonic() + 100) == []


def test_retransmit_at_rekey_timeout_plus_jitter() -> None:
    clock, t = FakeClock(), _timers(jitter=0.5)
    t0 = clock.monotonic()
    assert t.want_initiation(t0)
    t.on_handshake_initiated(t0)
    expected = t0 + REKEY_TIMEOUT + 0.5 * REKEY_TIMEOUT_JITTER_MAX
    assert t.next_deadline() == pytest.approx(expected)
    clock.advance(REKEY_TIMEOUT)
    assert t.handle_timer(clock.monotonic()) == []
    clock.advance(0.5 * REKEY_TIMEOUT_JITTER_MAX)
    assert t.handle_timer(clock.monotonic()) == [A.SEND_INITIATION]
    assert t.handshake_attempts == 1


def test_handshake_complete_stops_retransmits() -> None:
    clock, t = FakeClock(), _timers()
    t.on_handshake_initiated(clock.monotonic())
    clock.advance(1)
    t.on_handshake_complete(clock.monotonic())
    assert t.last_handshake == clock.monotonic() and t.handshake_attempts == 0
    assert not t.pending(Timer.RETRANSMIT_HANDSHAKE)


def test_give_up_after_rekey_attempt_time() -> None:
    clock, t = FakeClock(), _timers(jitter=0.3)
    t0 = clock.monotonic()
    assert t.want_initiation(t0)
    t.on_handshake_initiated(t0)
    fired = _run_until(t, clock, t0 + 200)
    sends = [at for at, action in fired if action is A.SEND_INITIATION]
    give_ups = [at for at, action in fired if action is A.GIVE_UP]
    # wireguard-go: the first initiation plus MAX_TIMER_HANDSHAKES + 1 retries, then give up
    assert MAX_TIMER_HANDSHAKES == REKEY_ATTEMPT_TIME / REKEY_TIMEOUT == 18
    assert len(sends) == MAX_TIMER_HANDSHAKES + 1
    assert len(give_ups) == 1
    assert sends[-1] - t0 < REKEY_ATTEMPT_TIME + 2 * REKEY_TIMEOUT
    assert give_ups[0] - t0 >= REKEY_ATTEMPT_TIME
    # after giving up, only the zeroing of leftover key material is pending
    assert t.next_deadline() == pytest.approx(give_ups[0] + 3 * REJECT_AFTER_TIME)
    # a fresh attempt (new data to send) starts counting again
    assert t.want_initiation(clock.monotonic())
    assert t.handshake_attempts == 0


def test_initiations_are_spaced_by_rekey_timeout() -> None:
    t = _timers()
    assert t.want_initiation(0.0)
    t.on_handshake_initiated(0.0)
    assert not t.want_initiation(4.99)
    assert t.want_initiation(5.0)


def test_rekey_after_time_initiator_only() -> None:
    clock, t = FakeClock(), _timers()
    created = clock.monotonic()
    mine, theirs = Key(created, True), Key(created, False)
    clock.advance(REKEY_AFTER_TIME)
    assert not t.keep_key_fresh_sending(clock.monotonic(), mine)
    clock.advance(0.01)
    assert not t.keep_key_fresh_sending(clock.monotonic(), theirs)
    assert t.keep_key_fresh_sending(clock.monotonic(), mine)
    assert not t.keep_key_fresh_sending(clock.monotonic(), None)


def test_rekey_after_messages() -> None:
    t = PeerTimers(LinkTimers(rekey_after_messages=100, reject_after_messages=200))
    assert not t.keep_key_fresh_sending(0.0, Key(0.0, False, send_counter=100))
    assert t.keep_key_fresh_sending(0.0, Key(0.0, False, send_counter=101))


def test_last_minute_handshake_on_receive() -> None:
    t = _timers()
    key = Key(0.0, True)
    edge = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT  # 165 s
    assert not t.keep_key_fresh_receiving(edge, key)
    assert not t.keep_key_fresh_receiving(edge + 1, Key(0.0, False))
    assert t.keep_key_fresh_receiving(edge + 1, key)
    assert not t.keep_key_fresh_receiving(edge + 2, key)  # only once per session
    t.on_handshake_complete(edge + 3)
    assert t.keep_key_fresh_receiving(edge + 10, key)


def test_reject_after_time_with_real_sessions() -> None:
    clock = FakeClock()
    a, b = handshake(make_pair(), clock.monotonic())
    clock.advance(REJECT_AFTER_TIME - 1)
    assert b.open(a.seal(b"hi", clock.monotonic()), clock.monotonic())[:2] == b"hi"
    clock.advance(1)
    with pytest.raises(SessionExpired):
        a.seal(b"hi", clock.monotonic())


def test_zero_key_material_after_three_reject_times() -> None:
    clock, t = FakeClock(), _timers()
    t0 = clock.monotonic()
    t.on_session_derived(t0)
    fired = _run_until(t, clock, t0 + 3 * REJECT_AFTER_TIME - 0.01)
    assert fired == []
    fired = _run_until(t, clock, t0 + 3 * REJECT_AFTER_TIME)
    assert fired == [(t0 + 540, A.ZERO_KEYS)]
    # a newer session pushes the zeroing out
    t.on_session_derived(t0 + 540)
    t.on_session_derived(t0 + 600)
    assert t.next_deadline() == t0 + 600 + 540


def test_persistent_keepalive() -> None:
    clock, t = FakeClock(), _timers(persistent_keepalive=25)
    t0 = clock.monotonic()
    t.on_any_authenticated_packet_traversed(t0)
    assert _run_until(t, clock, t0 + 25) == [(t0 + 25, A.SEND_KEEPALIVE)]
    quiet = _timers()
    quiet.on_any_authenticated_packet_traversed(t0)
    assert quiet.next_deadline() is None


def test_stop_cancels_and_disarms() -> None:
    t = _timers()
    t.on_data_sent(0.0)
    t.on_data_received(0.0)
    t.on_session_derived(0.0)
    t.stop()
    assert t.next_deadline() is None
    t.on_data_sent(1.0)
    assert t.next_deadline() is None
    t.start()
    t.on_data_sent(1.0)
    assert t.next_deadline() == 16.0


def test_several_timers_due_fire_in_deadline_order() -> None:
    t = _timers()
    t.on_data_received(0.0)  # keepalive at 10
    t.on_data_sent(0.0)  # new handshake at 15
    t.on_session_derived(0.0)  # zero at 540
    assert t.handle_timer(600.0) == [A.SEND_KEEPALIVE, A.SEND_INITIATION, A.ZERO_KEYS]


def test_shortened_timers_through_linktimers() -> None:
    fast = LinkTimers(
        rekey_after_time=1.2,
        reject_after_time=1.8,
        rekey_attempt_time=0.9,
        rekey_timeout=0.05,
        rekey_timeout_jitter_max=0.0,
        keepalive_timeout=0.1,
    )
    clock, t = FakeClock(), PeerTimers(fast)
    t0 = clock.monotonic()
    t.on_data_received(t0)
    assert t.next_deadline() == pytest.approx(t0 + 0.1)
    t.on_handshake_initiated(t0)
    fired = _run_until(t, clock, t0 + 5)
    assert [a for _, a in fired].count(A.SEND_INITIATION) == fast.max_timer_handshakes + 1 == 19
    assert fired[-1][1] is A.GIVE_UP
    a, b = handshake(make_pair(fast), 0.0)
    assert a.can_send(1.79) and not a.can_send(1.8)
    with pytest.raises(ValueError):
        LinkTimers(rekey_timeout=0)
    with pytest.raises(ValueError):
        LinkTimers(rekey_after_messages=10, reject_after_messages=5)
    with pytest.raises(ValueError):
        LinkTimers(rekey_timeout_jitter_max=-1)


@pytest.mark.parametrize("persistent", [0.0, 0.3, 25.0])
@pytest.mark.parametrize("timers", [LinkTimers(), LinkTimers(rekey_timeout=0.5,
                                                             keepalive_timeout=0.2)])
def test_no_event_arms_a_timer_sooner_than_the_shortest_interval(
        timers: LinkTimers, persistent: float) -> None:
    """The device's timer thread sleeps up to half of shortest_interval() without being woken
    by packets: every event and every expiry must arm its deadlines at least that far out."""
    names = [n for n in dir(PeerTimers) if n.startswith(("on_", "expired_"))]
    assert len(names) >= 12
    for first in names:
        for second in names:  # each event, also right after each other one
            t = PeerTimers(timers, rng=lambda: 0.0, persistent_keepalive=persistent)
            t.need_another_keepalive = True
            getattr(t, first)(100.0)
            before = {timer: t.deadline(timer) for timer in Timer}
            getattr(t, second)(200.0)
            for timer in Timer:
                deadline = t.deadline(timer)
                if deadline is not None and deadline != before[timer]:
                    assert deadline >= 200.0 + t.shortest_interval(), (first, second, timer)
    t = PeerTimers(timers, persistent_keepalive=persistent)
    assert t.shortest_interval() == min(timers.rekey_timeout, timers.keepalive_timeout,
                                        persistent or float("inf"))
