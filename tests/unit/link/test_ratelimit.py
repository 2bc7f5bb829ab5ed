"""Handshake rate limits: per-source token bucket, per-peer flood cap, under-load detection."""

from __future__ import annotations

import pytest

from socialvpn.clock import FakeClock
from socialvpn.link.constants import (
    HANDSHAKE_INITIATION_RATE,
    RATELIMITER_PACKETS_BURSTABLE,
    RATELIMITER_PACKETS_PER_SECOND,
    UNDER_LOAD_AFTER_TIME,
    UNDER_LOAD_QUEUE_SIZE,
)
from socialvpn.link.ratelimit import InitiationFloodGuard, LoadMonitor, Ratelimiter, source_key

pytestmark = pytest.mark.unit


def test_burst_then_refill() -> None:
    clock, limiter = FakeClock(), Ratelimiter()
    now = clock.monotonic()
    allowed = [limiter.allow("192.0.2.1", now) for _ in range(10)]
    assert allowed == [True] * RATELIMITER_PACKETS_BURSTABLE + [False] * 5
    clock.advance(1 / RATELIMITER_PACKETS_PER_SECOND - 0.001)
    assert not limiter.allow("192.0.2.1", clock.monotonic())
    clock.advance(0.001)
    assert limiter.allow("192.0.2.1", clock.monotonic())
    assert not limiter.allow("192.0.2.1", clock.monotonic())


def test_sustained_rate_is_20_per_second() -> None:
    clock, limiter = FakeClock(), Ratelimiter()
    allowed = 0
    for _ in range(1000):  # 100 attempts per second for 10 s
        allowed += limiter.allow("src", clock.monotonic())
        clock.advance(0.01)
    assert 10 * RATELIMITER_PACKETS_PER_SECOND <= allowed <= 10 * 20 + RATELIMITER_PACKETS_BURSTABLE


def test_sources_are_independent() -> None:
    limiter = Ratelimiter()
    for _ in range(5):
        assert limiter.allow("a", 0.0)
    assert not limiter.allow("a", 0.0)
    assert limiter.allow("b", 0.0)


def test_idle_sources_are_collected() -> None:
    limiter = Ratelimiter()
    for n in range(100):
        limiter.allow(n, 0.0)
    assert len(limiter) == 100
    limiter.allow("late", 1.5)  # the periodic collection runs on its own
    assert len(limiter) == 1
    assert limiter.collect_garbage(5.0) == 1 and len(limiter) == 0


def test_table_is_bounded() -> None:
    limiter = Ratelimiter(max_entries=4)
    for n in range(4):
        assert limiter.allow(n, 0.0)
    assert not limiter.allow("fifth", 0.5)  # full of live sources: newcomer refused
    assert limiter.allow(0, 0.5)  # known sources keep working
    assert len(limiter) == 4
    assert limiter.allow("fifth", 1.6)  # the old ones went idle and were collected
    assert len(limiter) <= 4


def test_clock_going_backwards_gives_no_credit() -> None:
    limiter = Ratelimiter()
    for _ in range(5):
        limiter.allow("a", 10.0)
    assert not limiter.allow("a", 5.0)
    assert not limiter.allow("a", 10.0)


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        Ratelimiter(packets_per_second=0)


def test_source_key() -> None:
    assert source_key("192.0.2.7") == bytes([192, 0, 2, 7])
    assert source_key(bytes([192, 0, 2, 7])) == bytes([192, 0, 2, 7])
    assert source_key("2001:db8:1:2::1") == source_key("2001:db8:1:2:ffff::9")
    assert source_key("2001:db8:1:2::1") != source_key("2001:db8:1:3::1")
    assert source_key("::ffff:192.0.2.7") == bytes([192, 0, 2, 7])
    with pytest.raises(ValueError):
        source_key("not an address")


def test_initiation_flood_guard() -> None:
    guard = InitiationFloodGuard()
    assert guard.rate == HANDSHAKE_INITIATION_RATE == 0.02
    assert guard.allow(0.0)
    guard.record(10.0)
    assert not guard.allow(10.0)
    assert not guard.allow(10.02)  # not more than 1/50 s later
    assert guard.allow(10.021)
    guard.record(5.0)  # never goes back
    assert not guard.allow(10.01)


def test_load_monitor_is_sticky_for_a_second() -> None:
    load = LoadMonitor()
    assert not load.under_load(UNDER_LOAD_QUEUE_SIZE - 1, 0.0)
    assert load.under_load(UNDER_LOAD_QUEUE_SIZE, 1.0)
    assert load.under_load(0, 1.0 + UNDER_LOAD_AFTER_TIME - 0.01)
    assert not load.under_load(0, 1.0 + UNDER_LOAD_AFTER_TIME)
