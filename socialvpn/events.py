"""Typed events for the API and the dashboard, and the counters behind ``/metrics``.

The agent publishes; subscribers (the API's event stream) get each event through a callback
and keep their own bounded queue. A slow subscriber never blocks the agent.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    kind: str  # "xmpp.state", "friends.changed", "request.new", "stanza.dropped", ...
    data: dict[str, Any]
    seq: int
    at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "seq": self.seq, "at": self.at, "data": self.data}


class EventBus:
    def __init__(self, history: int = 256) -> None:
        self._subscribers: list[Callable[[Event], None]] = []
        self._seq = itertools.count(1)
        self.recent: deque[Event] = deque(maxlen=history)

    def publish(self, kind: str, /, **data: Any) -> Event:
        event = Event(kind, data, next(self._seq))
        self.recent.append(event)
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:  # one broken subscriber must not starve the others
                logging.getLogger("socialvpn.events").exception("event subscriber failed")
        return event

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe


class Counters:
    """Named counters with one label each: ``counters.add("stanzas_dropped", "oversize")``."""

    def __init__(self) -> None:
        self._values: dict[str, Counter[str]] = {}

    def add(self, name: str, label: str = "", n: int = 1) -> None:
        self._values.setdefault(name, Counter())[label] += n

    def get(self, name: str, label: str = "") -> int:
        return self._values.get(name, Counter())[label]

    def to_json(self) -> dict[str, dict[str, int]]:
        return {name: dict(sorted(c.items())) for name, c in sorted(self._values.items())}
