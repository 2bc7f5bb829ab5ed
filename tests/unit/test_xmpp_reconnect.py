"""The XMPP client's reconnect delays: exponential, jittered, and capped so that an agent signs
in again within 10 s of a server's return (issue 6 acceptance 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from socialvpn.config import parse_config
from socialvpn.xmpp.client import XmppClient, XmppListener
from socialvpn.xmpp.stanzas import DeviceInfo

pytestmark = pytest.mark.unit

CONFIG = 'version = 1\n[account]\njid = "a@example.org"\n'
DEVICE = DeviceInfo(id="0123456789abcdef", name="d", key="k" * 43 + "=", sign="s" * 43 + "=")


def _client(text: str = CONFIG) -> XmppClient:
    return XmppClient(parse_config(text, Path("/etc/socialvpn/config.toml")), "pw", DEVICE,
                      XmppListener())


def test_default_delays_grow_are_jittered_and_stay_under_the_return_bound() -> None:
    delays = [_client()._backoff.next_delay() for _ in range(200)]  # first delays, many clients
    assert min(delays) >= 0.8 and max(delays) <= 1.2
    assert len({round(d, 6) for d in delays}) > 150  # jitter: no lockstep
    backoff = _client()._backoff
    series = [backoff.next_delay() for _ in range(40)]
    assert series[3] > series[0]  # exponential at first
    assert max(series) <= 6.0 * 1.2 < 10.0  # the cap: a returning server is found within 10 s
    assert sum(series[10:]) / 30 == pytest.approx(6.0, rel=0.15)


def test_configured_backoff_is_used() -> None:
    backoff = _client(CONFIG + "[xmpp]\nreconnect_min = 2.0\nreconnect_max = 3.0\n")._backoff
    assert (backoff.first, backoff.cap) == (2.0, 3.0) and backoff.jitter > 0


class _FakeTransport:
    def __init__(self, sockname: tuple) -> None:
        self.sockname = sockname

    def get_extra_info(self, name: str) -> object:
        return self.sockname if name == "sockname" else None


class _FakeStream:
    def __init__(self, sockname: tuple) -> None:
        self.transport = _FakeTransport(sockname)
        self.aborted = 0

    def abort(self) -> None:
        self.aborted += 1


@pytest.mark.parametrize(("sockname", "addresses", "aborted"), [
    (("10.0.0.2", 5222), {"10.0.0.2", "fe80::1"}, 0),  # still there
    (("10.0.0.2", 5222), {"10.0.0.3"}, 1),  # gone
    (("fe80::1%eth0", 5222, 0, 2), {"fe80::1", "10.0.0.2"}, 0),  # zone id ignored
    (("::ffff:10.0.0.2", 5222, 0, 0), {"10.0.0.2"}, 0),  # v4-mapped unwrapped
    (("::ffff:10.0.0.2", 5222, 0, 0), {"10.0.0.9"}, 1),
    (("127.0.0.1", 5222), set(), 0),  # loopback never goes away
    (("::1", 5222, 0, 0), set(), 0),
])
def test_network_change_drops_only_a_session_whose_address_is_gone(sockname, addresses,
                                                                    aborted) -> None:
    client = _client()
    stream = _FakeStream(sockname)
    client._xmpp = stream  # type: ignore[assignment]
    client.network_changed(frozenset(addresses))
    assert stream.aborted == aborted
