"""Handshake rate limits (pure; time is passed in as monotonic seconds).

* :class:`Ratelimiter`: per-source token bucket for handshake messages, 20 per second with a
  burst of 5 (wireguard-go ``ratelimiter/``, kernel ``ratelimiter.c``). The table is bounded and
  entries idle for more than a second are collected; when it is full of live sources new
  sources are refused (as the kernel does) rather than letting memory grow.
* :class:`InitiationFloodGuard`: at most one accepted initiation per peer per
  HANDSHAKE_INITIATION_RATE (1/50 s), wireguard-go's ``lastInitiationConsumption`` check.
* :class:`LoadMonitor`: "under load" when 128 handshakes are queued, sticky for 1 s; only then are
  mac2 cookies demanded.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable

from socialvpn.link.constants import (
    HANDSHAKE_INITIATION_RATE,
    RATELIMITER_GARBAGE_COLLECT_TIME,
    RATELIMITER_MAX_ENTRIES,
    RATELIMITER_PACKETS_BURSTABLE,
    RATELIMITER_PACKETS_PER_SECOND,
    UNDER_LOAD_AFTER_TIME,
    UNDER_LOAD_QUEUE_SIZE,
)

_NS = 1_000_000_000


def _ns(seconds: float) -> int:
    return round(seconds * _NS)


def source_key(address: str | bytes) -> bytes:
    """The rate-limit key of a source address: the whole IPv4 address, or the /64 of an IPv6
    address (one host usually owns a /64), as the kernel does. IPv4-mapped IPv6 counts as IPv4."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped.packed
        return ip.packed[:8]
    return ip.packed


class Ratelimiter:
    """Per-source token bucket. ``allow(source, now)`` is True if a handshake from ``source``
    may be processed now. ``source`` is any hashable key (see :func:`source_key`)."""

    __slots__ = ("_cost", "_entries", "_gc_ns", "_last_gc", "_max_entries", "_max_tokens")

    def __init__(
        self,
        *,
        packets_per_second: int = RATELIMITER_PACKETS_PER_SECOND,
        burst: int = RATELIMITER_PACKETS_BURSTABLE,
        max_entries: int = RATELIMITER_MAX_ENTRIES,
        garbage_collect_time: float = RATELIMITER_GARBAGE_COLLECT_TIME,
    ) -> None:
        if packets_per_second <= 0 or burst <= 0 or max_entries <= 0:
            raise ValueError("rate, burst and table size must be positive")
        self._cost = _NS // packets_per_second  # tokens are nanoseconds of credit
        self._max_tokens = self._cost * burst
        self._max_entries = max_entries
        self._gc_ns = _ns(garbage_collect_time)
        self._entries: dict[Hashable, list[int]] = {}  # source -> [tokens, last time ns]
        self._last_gc: int | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def collect_garbage(self, now: float) -> int:
        """Forget sources idle longer than the collection time; return how many went."""
        now_ns = _ns(now)
        self._last_gc = now_ns
        limit = self._gc_ns
        stale = [key for key, (_, last) in self._entries.items() if now_ns - last > limit]
        for key in stale:
            del self._entries[key]
        return len(stale)

    def allow(self, source: Hashable, now: float) -> bool:
        now_ns = _ns(now)
        if self._last_gc is None:
            self._last_gc = now_ns
        elif now_ns - self._last_gc >= self._gc_ns:
            self.collect_garbage(now)
        entry = self._entries.get(source)
        if entry is None:
            if len(self._entries) >= self._max_entries:
                self.collect_garbage(now)
                if len(self._entries) >= self._max_entries:
                    return False  # table full of live sources: refuse newcomers
            self._entries[source] = [self._max_tokens - self._cost, now_ns]
            return True
        tokens = entry[0] + max(0, now_ns - entry[1])
        entry[1] = max(entry[1], now_ns)
        if tokens > self._max_tokens:
            tokens = self._max_tokens
        if tokens >= self._cost:
            entry[0] = tokens - self._cost
            return True
        entry[0] = tokens
        return False


class InitiationFloodGuard:
    """One peer's initiation cap: an initiation is accepted only if more than ``rate`` seconds
    passed since the last accepted one. ``allow`` checks; ``record`` notes an acceptance."""

    __slots__ = ("_last", "rate")

    def __init__(self, rate: float = HANDSHAKE_INITIATION_RATE) -> None:
        self.rate = rate
        self._last: float | None = None

    def allow(self, now: float) -> bool:
        return self._last is None or now - self._last > self.rate

    def record(self, now: float) -> None:
        if self._last is None or now > self._last:
            self._last = now


class LoadMonitor:
    """ "Under load" when ``threshold`` (128) or more handshakes are queued, and for ``after``
    (1 s) seconds after that last happened (wireguard-go ``IsUnderLoad``)."""

    __slots__ = ("_after", "_threshold", "_until")

    def __init__(
        self, threshold: int = UNDER_LOAD_QUEUE_SIZE, after: float = UNDER_LOAD_AFTER_TIME
    ) -> None:
        self._threshold = threshold
        self._after = after
        self._until: float | None = None

    def under_load(self, queued: int, now: float) -> bool:
        if queued >= self._threshold:
            self._until = now + self._after
            return True
        return self._until is not None and now < self._until
