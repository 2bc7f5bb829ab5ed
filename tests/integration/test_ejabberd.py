"""Issue 6 acceptance 7 (second half): the three-user flow of the groups issue with ejabberd.

Debian's ejabberd (started by the kit without systemd, TLS with the kit CA) replaces Prosody on
the test internet; everything else is the flow of ``test_mesh``: alice (no NAT), bob
(home-router NAT), carol (symmetric NAT, TURN through coturn); friends, the group through the
CLI (join + accept, invite + accept), then every pair pings over IPv4 and IPv6. The flow itself
is the one in ``test_mesh.py`` (imported, so both servers run the very same steps).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_mesh import test_three_users_full_mesh_through_nat as three_user_flow
from tests.kit.ejabberd import Ejabberd, available
from tests.kit.env import integration_required
from tests.kit.internet import Internet
from tests.kit.netns import NetLab

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def ejabberd_available() -> None:
    if not available():
        if integration_required():
            pytest.fail("ejabberd (Debian package) is required here but not installed")
        pytest.skip("ejabberd (Debian package) not installed")


def test_three_users_full_mesh_with_ejabberd(ejabberd_available, netns_factory: NetLab,
                                             test_ca, tmp_path: Path):
    with Internet(netns_factory, tmp_path, test_ca, server="ejabberd") as net:
        assert isinstance(net.server, Ejabberd) and net.server.running()
        sites = {"alice": net.site("alice"), "bob": net.site("bob", "eim"),
                 "carol": net.site("carol", "symmetric")}
        agents = {name: net.agent(name, site) for name, site in sites.items()}
        for agent in agents.values():
            agent.wait_connected(timeout=30)
        three_user_flow(agents)
        # it was ejabberd that carried the sessions, each over TLS
        log = net.server.log_text()
        for agent in agents.values():
            assert "(tls|" in log and f"Opened c2s session for {agent.jid}/" in log, \
                net.server.log_tail()
