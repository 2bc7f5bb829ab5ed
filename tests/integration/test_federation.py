"""Issue 6 acceptance 7 (first half): members on two federated XMPP servers form one group.

Two Prosody servers on the test internet — ``a.test`` on 198.18.0.1 and ``b.test`` on 198.18.0.2
of the ``pub`` namespace — talk server-to-server over TLS with certificate verification
(``s2s_secure_auth``, both certificates from the kit CA). Names resolve through per-namespace
hosts files, for the servers (lua-unbound reads ``/etc/hosts``) and the agents alike. alice@a.test
(no NAT) owns the group; bob@b.test (home-router NAT) asks to join and is accepted; carol@b.test
(symmetric NAT, so TURN) is invited and accepts. Every device pings every other over the group's
IPv4 and IPv6 addresses.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.kit.agents import AgentProc, befriend, wait_for
from tests.kit.ca import unknown_ca_server_cert
from tests.kit.internet import NETNS_ETC, Internet
from tests.kit.netns import NetLab

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _up(agent: AgentProc, device: str) -> dict | None:
    p = next((p for p in agent.json("peers") if p["device"] == device), None)
    return p if p and p.get("state") == "up" else None


def test_group_across_two_federated_servers(netns_factory: NetLab, test_ca, tmp_path: Path):
    with Internet(netns_factory, tmp_path, test_ca, domains=("a.test", "b.test")) as net:
        alice = net.agent("alice", net.site("alice"), domain="a.test")
        bob = net.agent("bob", net.site("bob", "eim"), domain="b.test")
        carol = net.agent("carol", net.site("carol", "symmetric"), domain="b.test")
        etc_dirs = [NETNS_ETC / a.netns for a in (alice, bob, carol)]
        assert all((d / "hosts").exists() for d in etc_dirs)
        for agent in (alice, bob, carol):
            agent.wait_connected(timeout=20)
        assert alice.jid == "alice@a.test" and bob.jid == "bob@b.test"

        # friend requests cross the servers (subscription presence over s2s)
        befriend(alice, bob, timeout=20)
        befriend(alice, carol, timeout=20)
        alice.json("group", "create", "lab", "--subnet", "10.77.0.0/24")
        bob.json("group", "join", alice.jid, "lab")
        wait_for(lambda: alice.json("requests")["joins"], 15, "bob's join request",
                 lambda: bob.log_tail() + net.server_log_tails())
        alice.json("accept", bob.jid, "--group", "lab")
        alice.json("group", "invite", "lab", carol.jid)
        wait_for(lambda: carol.json("requests")["invitations"], 15, "carol's invitation",
                 carol.log_tail)
        carol.json("accept", alice.jid, "--group", "lab")

        agents = {"alice": alice, "bob": bob, "carol": carol}
        ips = {"alice": "10.77.0.1", "bob": "10.77.0.2", "carol": "10.77.0.3"}
        pairs = [(a, b) for a in agents for b in agents if a != b]
        for a, b in pairs:
            wait_for(lambda a=a, b=b: _up(agents[a], b), 60, f"{a} -> {b} link up",
                     lambda a=a: agents[a].log_tail(40))
        assert _up(bob, "carol")["path"] == "turn"  # both NATs hard: relayed
        assert _up(alice, "bob")["jid"] == "bob@b.test"
        for a, b in pairs:
            r4 = agents[a].cli("ping", ips[b], "-c", "2", check=False, timeout=30)
            assert r4.returncode == 0, f"{a} -> {b}: {r4.stdout} {r4.stderr}"
            ip6 = _up(agents[a], b)["ip6"]
            r6 = agents[a].cli("ping", ip6, "-c", "2", check=False, timeout=30)
            assert r6.returncode == 0, f"{a} -> {b} over IPv6: {r6.stdout} {r6.stderr}"

        # the servers really federated, over TLS with verified certificates both ways
        for domain, other in (("a.test", "b.test"), ("b.test", "a.test")):
            log = net.servers[domain].log_tail(100000)
            assert re.search(rf"s2sout\S*\s+info\s+Outgoing s2s connection {domain}->{other} "
                             r"complete", log), log[-3000:]
            # s2s_secure_auth: the peer authenticated with its certificate (SASL EXTERNAL)
            assert f"Accepting SASL EXTERNAL identity from {other}" in log, log[-3000:]
            assert "Stream encrypted (TLSv1.3" in log
    assert not any(d.exists() for d in etc_dirs)


def test_server_with_untrusted_certificate_is_refused(netns_factory: NetLab, test_ca,
                                                      tmp_path: Path):
    """s2s_secure_auth really verifies: b.test serving a certificate from a CA a.test does not
    trust gets no s2s session, so alice's friend request never leaves a.test."""
    rogue = unknown_ca_server_cert(tmp_path / "rogue", ["b.test"])
    with Internet(netns_factory, tmp_path, test_ca, domains=("a.test", "b.test"),
                  certs={"b.test": rogue}) as net:
        alice = net.agent("alice", net.site("alice"), domain="a.test")
        alice.wait_connected(timeout=20)
        alice.json("friend", "add", "bob@b.test")
        a_log = net.servers["a.test"]
        refused = ("Forbidding insecure connection to/from b.test because its certificate is "
                   "not trusted")
        wait_for(lambda: refused in a_log.log_tail(400), 15, "a.test to refuse b.test",
                 lambda: a_log.log_tail(60))
        log = a_log.log_tail(100000)
        assert "Outgoing s2s connection a.test->b.test complete" not in log, log[-3000:]
