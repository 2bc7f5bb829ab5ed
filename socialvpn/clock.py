"""Clocks. Protocol code takes ``now`` as an argument; adapters read it from a :class:`Clock`.

``monotonic`` drives timers; ``wall`` is only for things a person reads or for TAI64N.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def wall(self) -> float: ...


class RealClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()


class FakeClock:
    """A clock a test moves by hand. ``wall`` can be made to jump independently."""

    def __init__(self, start: float = 1000.0, wall_start: float = 1_700_000_000.0) -> None:
        self._mono = start
        self._wall = wall_start

    def monotonic(self) -> float:
        return self._mono

    def wall(self) -> float:
        return self._wall

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")
        self._mono += seconds
        self._wall += seconds

    def jump_wall(self, seconds: float) -> None:
        self._wall += seconds


class Backoff:
    """Exponential backoff with jitter: ``first``, 2×, 4×... capped at ``cap``.

    Each delay is multiplied by a random factor in ``[1 - jitter, 1 + jitter]`` so that many
    agents that lost the same server do not come back in lockstep. ``rand`` returns a float in
    [0, 1); tests pass a fixed one.
    """

    def __init__(self, first: float, cap: float, jitter: float = 0.2,
                 rand: Callable[[], float] | None = None) -> None:
        if first <= 0 or cap < first or not 0 <= jitter < 1:
            raise ValueError("need 0 < first <= cap and 0 <= jitter < 1")
        self.first = first
        self.cap = cap
        self.jitter = jitter
        self._rand = rand or random.random
        self.attempts = 0

    def next_delay(self) -> float:
        base = min(self.cap, self.first * (2 ** min(self.attempts, 32)))
        self.attempts += 1
        return base * (1 - self.jitter + 2 * self.jitter * self._rand())

    def reset(self) -> None:
        self.attempts = 0
