"""Unit tests for socialvpn/events.py: the event bus and the counters behind /metrics."""

from __future__ import annotations

import json

import pytest

from socialvpn.events import Counters, Event, EventBus

pytestmark = pytest.mark.unit


def test_publish_returns_event_with_increasing_seq() -> None:
    bus = EventBus()
    a = bus.publish("xmpp.state", state="connecting")
    b = bus.publish("xmpp.state", state="online")
    c = bus.publish("friends.changed")
    assert (a.seq, b.seq, c.seq) == (1, 2, 3)
    assert a.kind == "xmpp.state" and a.data == {"state": "connecting"}
    assert c.data == {}
    assert list(bus.recent) == [a, b, c]


def test_seq_per_bus() -> None:
    one, two = EventBus(), EventBus()
    one.publish("a")
    one.publish("a")
    assert two.publish("b").seq == 1


def test_subscribe_and_unsubscribe() -> None:
    bus = EventBus()
    got1: list[Event] = []
    got2: list[Event] = []
    unsub1 = bus.subscribe(got1.append)
    bus.subscribe(got2.append)
    e1 = bus.publish("one")
    unsub1()
    e2 = bus.publish("two")
    assert got1 == [e1]
    assert got2 == [e1, e2]
    unsub1()  # twice is harmless
    assert bus.publish("three").seq == 3


def test_subscriber_added_late_gets_only_new_events() -> None:
    bus = EventBus()
    bus.publish("old")
    got: list[str] = []
    bus.subscribe(lambda e: got.append(e.kind))
    bus.publish("new")
    assert got == ["new"]


def test_unsubscribe_during_publish() -> None:
    bus = EventBus()
    calls: list[str] = []
    unsub_holder: list = []

    def first(event: Event) -> None:
        calls.append("first")
        unsub_holder[0]()

    def second(event: Event) -> None:
        calls.append("second")

    unsub_holder.append(bus.subscribe(first))
    bus.subscribe(second)
    bus.publish("x")
    bus.publish("y")
    assert calls == ["first", "second", "second"]


def test_same_callback_subscribed_twice() -> None:
    bus = EventBus()
    got: list[Event] = []
    unsub_a = bus.subscribe(got.append)
    unsub_b = bus.subscribe(got.append)
    bus.publish("x")
    assert len(got) == 2
    unsub_a()
    bus.publish("y")
    assert len(got) == 3
    unsub_b()
    bus.publish("z")
    assert len(got) == 3


def test_history_bounded() -> None:
    bus = EventBus(history=3)
    events = [bus.publish("e", i=i) for i in range(10)]
    assert list(bus.recent) == events[-3:]
    assert [e.seq for e in bus.recent] == [8, 9, 10]


def test_default_history() -> None:
    bus = EventBus()
    for i in range(300):
        bus.publish("e", i=i)
    assert len(bus.recent) == 256
    assert bus.recent[0].seq == 45 and bus.recent[-1].seq == 300


def test_event_to_json() -> None:
    bus = EventBus()
    ev = bus.publish("request.new", jid="bob@example.org", group=None)
    data = ev.to_json()
    assert data == {"kind": "request.new", "seq": 1, "at": ev.at,
                    "data": {"jid": "bob@example.org", "group": None}}
    json.dumps(data)  # JSON-able
    assert isinstance(ev.at, float) and ev.at > 1_600_000_000


def test_event_frozen() -> None:
    ev = EventBus().publish("x")
    with pytest.raises(AttributeError):
        ev.seq = 5  # type: ignore[misc]


def test_counters() -> None:
    c = Counters()
    assert c.get("stanzas_dropped", "oversize") == 0
    c.add("stanzas_dropped", "oversize")
    c.add("stanzas_dropped", "oversize")
    c.add("stanzas_dropped", "malformed", 5)
    c.add("reconnects")
    assert c.get("stanzas_dropped", "oversize") == 2
    assert c.get("stanzas_dropped", "malformed") == 5
    assert c.get("stanzas_dropped", "version") == 0
    assert c.get("reconnects") == 1
    assert c.get("unknown_name") == 0


def test_counters_get_does_not_create() -> None:
    c = Counters()
    c.get("a", "b")
    c.add("x", "y")
    c.get("x", "zzz")
    assert c.to_json() == {"x": {"y": 1}}


def test_counters_to_json_sorted() -> None:
    c = Counters()
    c.add("zeta", "b")
    c.add("alpha", "z", 3)
    c.add("alpha", "a")
    c.add("zeta", "a", 2)
    data = c.to_json()
    assert data == {"alpha": {"a": 1, "z": 3}, "zeta": {"a": 2, "b": 1}}
    assert list(data) == ["alpha", "zeta"]
    assert list(data["alpha"]) == ["a", "z"]
    assert json.dumps(data)
    # a snapshot, not a live view
    data["alpha"]["a"] = 99
    assert c.get("alpha", "a") == 1


def test_counters_empty() -> None:
    assert Counters().to_json() == {}
