"""Unit tests for socialvpn/clock.py: exponential backoff with jitter, and the fake clock."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from socialvpn.clock import Backoff, Clock, FakeClock, RealClock

pytestmark = pytest.mark.unit

ALMOST_ONE = 1.0 - 2**-53  # the largest float random.random() can return


def delays(backoff: Backoff, n: int) -> list[float]:
    return [backoff.next_delay() for _ in range(n)]


def test_no_jitter_at_half() -> None:
    b = Backoff(1.0, 60.0, jitter=0.2, rand=lambda: 0.5)
    assert delays(b, 10) == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]
    assert b.attempts == 10


def test_no_jitter_exact_powers_to_cap() -> None:
    b = Backoff(0.5, 1024.0, jitter=0.3, rand=lambda: 0.5)
    assert delays(b, 14) == [0.5 * 2**i for i in range(12)] + [1024.0, 1024.0]


def test_cap_equal_to_first() -> None:
    b = Backoff(5.0, 5.0, rand=lambda: 0.5)
    assert delays(b, 4) == [5.0] * 4


def test_zero_jitter_ignores_rand() -> None:
    b = Backoff(1.0, 8.0, jitter=0.0, rand=lambda: 0.99)
    assert delays(b, 5) == [1, 2, 4, 8, 8]


def test_jitter_low_bound() -> None:
    b = Backoff(1.0, 60.0, jitter=0.2, rand=lambda: 0.0)
    assert delays(b, 8) == pytest.approx([0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 48.0, 48.0])


def test_jitter_high_bound() -> None:
    b = Backoff(1.0, 60.0, jitter=0.2, rand=lambda: ALMOST_ONE)
    got = delays(b, 8)
    assert got == pytest.approx([1.2, 2.4, 4.8, 9.6, 19.2, 38.4, 72.0, 72.0])
    bases = [1, 2, 4, 8, 16, 32, 60, 60]
    assert all(base * 1.2 * 0.999 < d <= base * 1.2 for d, base in zip(got, bases, strict=True))


def test_default_rand_within_bounds() -> None:
    b = Backoff(2.0, 2.0, jitter=0.25)
    for d in delays(b, 200):
        assert 1.5 <= d <= 2.5


@settings(max_examples=200, deadline=None, derandomize=True)
@given(first=st.floats(0.001, 100), factor=st.floats(1, 1000), jitter=st.floats(0, 0.99),
       rands=st.lists(st.floats(0, ALMOST_ONE), min_size=1, max_size=40))
def test_delay_bounds_property(first: float, factor: float, jitter: float,
                               rands: list[float]) -> None:
    cap = first * factor
    it = iter(rands)
    b = Backoff(first, cap, jitter=jitter, rand=lambda: next(it))
    for i in range(len(rands)):
        base = min(cap, first * 2**i)
        d = b.next_delay()
        assert base * (1 - jitter) * (1 - 1e-12) <= d <= base * (1 + jitter) * (1 + 1e-12)
        assert d > 0


def test_many_attempts_do_not_overflow() -> None:
    b = Backoff(1.0, 3600.0, rand=lambda: 0.5)
    b.attempts = 10_000
    assert b.next_delay() == 3600.0
    assert b.attempts == 10_001


def test_reset() -> None:
    b = Backoff(1.0, 60.0, rand=lambda: 0.5)
    delays(b, 5)
    b.reset()
    assert b.attempts == 0
    assert delays(b, 3) == [1, 2, 4]


@pytest.mark.parametrize(
    ("first", "cap", "jitter"),
    [(0, 1, 0.1), (-1, 1, 0.1), (2, 1, 0.1), (1, 0.5, 0.1), (1, 2, -0.1), (1, 2, 1.0),
     (1, 2, 1.5)],
)
def test_invalid_args(first: float, cap: float, jitter: float) -> None:
    with pytest.raises(ValueError):
        Backoff(first, cap, jitter)


def test_fake_clock_advance() -> None:
    c = FakeClock(start=10.0, wall_start=1000.0)
    assert (c.monotonic(), c.wall()) == (10.0, 1000.0)
    c.advance(2.5)
    assert (c.monotonic(), c.wall()) == (12.5, 1002.5)
    c.advance(0)
    assert c.monotonic() == 12.5


def test_fake_clock_defaults() -> None:
    c = FakeClock()
    assert c.monotonic() == 1000.0 and c.wall() == 1_700_000_000.0


def test_fake_clock_jump_wall() -> None:
    c = FakeClock(start=5.0, wall_start=100.0)
    c.jump_wall(-3600)
    assert (c.monotonic(), c.wall()) == (5.0, 100.0 - 3600)
    c.jump_wall(7200)
    assert (c.monotonic(), c.wall()) == (5.0, 100.0 + 3600)


def test_fake_clock_refuses_negative_advance() -> None:
    c = FakeClock()
    with pytest.raises(ValueError):
        c.advance(-0.001)
    assert c.monotonic() == 1000.0 and c.wall() == 1_700_000_000.0


def test_real_clock() -> None:
    c: Clock = RealClock()
    a = c.monotonic()
    assert c.monotonic() >= a
    assert abs(c.wall() - time.time()) < 5


def test_fake_clock_is_a_clock() -> None:
    c: Clock = FakeClock()
    assert isinstance(c.monotonic(), float)
