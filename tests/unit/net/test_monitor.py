"""net/monitor.py's pure part: the debounce and which addresses count."""

from __future__ import annotations

import pytest

from socialvpn.net.monitor import AddressEntry, Debouncer, usable_addresses

pytestmark = pytest.mark.unit


def test_debouncer_waits_for_quiet_but_not_forever() -> None:
    d = Debouncer(delay=0.3, max_delay=1.0)
    assert d.deadline() is None and not d.due(100.0)
    d.poke(10.0)
    assert d.deadline() == pytest.approx(10.3)
    d.poke(10.2)
    assert d.deadline() == pytest.approx(10.5)
    assert not d.due(10.4)
    for t in (10.4, 10.6, 10.8):  # a steady stream of events...
        d.poke(t)
    assert d.deadline() == pytest.approx(11.0)  # ...is looked at after max_delay anyway
    assert d.due(11.0)
    assert not d.due(11.0)  # once per burst
    assert d.deadline() is None
    d.poke(20.0)
    assert d.due(20.3)


def test_max_delay_is_never_below_delay() -> None:
    d = Debouncer(delay=0.5, max_delay=0.1)
    d.poke(0.0)
    assert d.deadline() == pytest.approx(0.5)


def test_usable_addresses_leave_out_ours_overlay_down_and_local_scope() -> None:
    entries = [
        AddressEntry("eth0", "192.0.2.10", True),
        AddressEntry("eth0", "2001:db8::10", True),
        AddressEntry("eth0", "fe80::1", True),  # link-local
        AddressEntry("lo", "127.0.0.1", True),
        AddressEntry("wlan0", "198.51.100.7", False),  # down
        AddressEntry("svpn-lab", "10.77.0.1", True),  # our TUN device
        AddressEntry("eth1", "10.77.0.9", True),  # inside a group's overlay anyway
        AddressEntry("eth1", "fd00:1::5", True),  # the overlay /64
        AddressEntry("eth2", "not-an-address", True),
    ]
    got = usable_addresses(entries, ("svpn-", "lo"), ("10.77.0.0/24", "fd00:1::/64"))
    assert got == frozenset({"192.0.2.10", "2001:db8::10"})


def test_a_changed_address_changes_the_set() -> None:
    before = usable_addresses([AddressEntry("eth0", "10.1.0.2", True)])
    after = usable_addresses([AddressEntry("eth0", "10.1.0.3", True)])
    assert before != after
    assert usable_addresses([AddressEntry("eth0", "10.1.0.2", True)]) == before
