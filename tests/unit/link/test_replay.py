"""The 8192-bit replay window: WireGuard's counter.c self-test (34 cases + bulk runs) adapted to
our window, and a hypothesis state machine against a set oracle."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from socialvpn.link.constants import COUNTER_BITS_TOTAL, COUNTER_WINDOW_SIZE, REJECT_AFTER_MESSAGES
from socialvpn.link.session import ReplayWindow

pytestmark = pytest.mark.unit

W = COUNTER_WINDOW_SIZE  # 8128 = 8192 - 64
T_LIM = W + 1
R = REJECT_AFTER_MESSAGES

# (counter, accepted) in order, on one window: the 34 cases of counter.c
COUNTER_C_CASES = [
    (0, True),  # 1
    (1, True),  # 2
    (1, False),  # 3
    (9, True),  # 4
    (8, True),  # 5
    (7, True),  # 6
    (7, False),  # 7
    (T_LIM, True),  # 8
    (T_LIM - 1, True),  # 9
    (T_LIM - 1, False),  # 10
    (T_LIM - 2, True),  # 11
    (2, True),  # 12
    (2, False),  # 13
    (T_LIM + 16, True),  # 14
    (3, False),  # 15
    (T_LIM + 16, False),  # 16
    (T_LIM * 4, True),  # 17
    (T_LIM * 4 - (T_LIM - 1), True),  # 18
    (10, False),  # 19
    (T_LIM * 4 - T_LIM, False),  # 20
    (T_LIM * 4 - (T_LIM + 1), False),  # 21
    (T_LIM * 4 - (T_LIM - 2), True),  # 22
    (T_LIM * 4 + 1 - T_LIM, False),  # 23
    (0, False),  # 24
    (R, False),  # 25
    (R - 1, True),  # 26
    (R, False),  # 27
    (R - 1, False),  # 28
    (R - 2, True),  # 29
    (R + 1, False),  # 30
    (R + 2, False),  # 31
    (R - 2, False),  # 32
    (R - 3, True),  # 33
    (0, False),  # 34
]


def test_window_geometry() -> None:
    assert COUNTER_BITS_TOTAL == 8192 and W == 8128


def test_counter_c_34_cases() -> None:
    assert len(COUNTER_C_CASES) == 34
    window = ReplayWindow()
    for number, (counter, expected) in enumerate(COUNTER_C_CASES, start=1):
        assert window.validate(counter, R) is expected, f"case {number}: T({counter})"


def test_bulk_1_ascending_then_zero() -> None:
    window = ReplayWindow()
    for n in range(1, W + 1):
        assert window.validate(n)
    assert window.validate(0)
    assert not window.validate(0)


def test_bulk_2_ascending_from_two() -> None:
    window = ReplayWindow()
    for n in range(2, W + 2):
        assert window.validate(n)
    assert window.validate(1)
    assert not window.validate(0)


def test_bulk_3_descending_from_window_plus_one() -> None:
    window = ReplayWindow()
    for n in range(W, -1, -1):  # counter.c: i = W + 1; i-- > 0  (W .. 0)
        assert window.validate(n), n


def test_bulk_4_descending_from_window_plus_two() -> None:
    window = ReplayWindow()
    for n in range(W + 1, 0, -1):  # counter.c: i = W + 2; i-- > 1
        assert window.validate(n), n
    assert not window.validate(0)


def test_bulk_5_descending_then_next() -> None:
    window = ReplayWindow()
    for n in range(W, 0, -1):  # counter.c: i = W + 1; i-- > 1
        assert window.validate(n), n
    assert window.validate(W + 1)
    assert not window.validate(0)


def test_bulk_6_descending_then_zero_then_next() -> None:
    window = ReplayWindow()
    for n in range(W, 0, -1):
        assert window.validate(n), n
    assert window.validate(0)
    assert window.validate(W + 1)


def test_seen_is_read_only() -> None:
    window = ReplayWindow()
    assert not window.seen(5)
    assert window.validate(5)
    assert window.seen(5) and not window.seen(4) and not window.seen(6)
    assert window.validate(10_000)
    assert window.seen(5) and window.seen(10_000 - W - 1) and not window.seen(10_000 - W)
    assert window.highest == 10_000
    window.reset()
    assert window.highest == 0 and not window.seen(5)


def test_big_jumps_clear_the_ring() -> None:
    window = ReplayWindow()
    for n in range(0, 8192, 3):
        assert window.validate(n)
    jump = 10**12
    assert window.validate(jump)
    for n in range(jump - W, jump):
        assert not window.seen(n)
    assert not window.validate(jump - W - 1)
    assert window.validate(jump - W)
    assert not window.validate(-1)


class WindowVersusSet(RuleBasedStateMachine):
    """Every counter is accepted at most once; inside the window exactly the unseen ones are;
    behind the window and at/after the limit nothing is."""

    LIMIT = 2**20

    @initialize()
    def start(self) -> None:
        self.window = ReplayWindow()
        self.accepted: set[int] = set()
        self.highest = 0

    def _oracle(self, n: int) -> bool:
        if n >= self.LIMIT or n in self.accepted:
            return False
        return not (n <= self.highest and self.highest - n > W)

    def _check(self, n: int) -> None:
        expected = self._oracle(n)
        assert self.window.validate(n, self.LIMIT) is expected, n
        if expected:
            self.accepted.add(n)
            self.highest = max(self.highest, n)

    @rule(n=st.integers(min_value=0, max_value=LIMIT + 10))
    def anywhere(self, n: int) -> None:
        self._check(n)

    @rule(delta=st.integers(min_value=-W - 70, max_value=200))
    def near_the_front(self, delta: int) -> None:
        self._check(max(0, self.highest + delta))

    @rule(delta=st.integers(min_value=-70, max_value=70))
    def near_the_back_edge(self, delta: int) -> None:
        self._check(max(0, self.highest - W + delta))

    @rule(delta=st.integers(min_value=0, max_value=5))
    def next_in_order(self, delta: int) -> None:
        self._check(self.highest + 1 + delta)

    @rule(data=st.data())
    def replay_an_accepted_one(self, data: st.DataObject) -> None:
        if self.accepted:
            n = data.draw(st.sampled_from(sorted(self.accepted)))
            assert not self.window.validate(n, self.LIMIT)

    @rule(n=st.integers(min_value=LIMIT - 3, max_value=LIMIT + 3))
    def near_the_limit(self, n: int) -> None:
        self._check(n)

    @invariant()
    def highest_matches(self) -> None:
        assert self.window.highest == self.highest


WindowVersusSet.TestCase.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None
)
test_window_against_set_oracle = WindowVersusSet.TestCase
