"""Issue 4 acceptance 1, with every real part: Prosody and coturn in a "pub" namespace, three
users in their own namespaces — alice (no NAT), bob (endpoint-independent NAT), carol
(symmetric NAT). The group is formed through the real CLI; then every device pings every
other over the group's IPv4 and IPv6 addresses, and `peers --json` reports the paths."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kit.agents import AgentProc, befriend, wait_for
from tests.kit.internet import Internet
from tests.kit.netns import NetLab

pytestmark = pytest.mark.integration


@pytest.fixture
def mesh(netns_factory: NetLab, test_ca, tmp_path: Path) -> Iterator[dict[str, AgentProc]]:
    with Internet(netns_factory, tmp_path, test_ca) as net:
        sites = {"alice": net.site("alice"), "bob": net.site("bob", "eim"),
                 "carol": net.site("carol", "symmetric"),
                 "alice2": net.site("alice2", "eim")}  # alice's second device
        agents = {name: net.agent(name, site, account=name.rstrip("2"))
                  for name, site in sites.items()}
        for agent in agents.values():
            agent.wait_connected(timeout=20)
        yield agents


def _peer(agent: AgentProc, device: str) -> dict | None:
    """The peer entry of ``device`` (a device name: alice, alice2, bob, carol)."""
    return next((p for p in agent.json("peers") if p["device"] == device), None)


def test_three_users_full_mesh_through_nat(mesh):
    alice, bob, carol = mesh["alice"], mesh["bob"], mesh["carol"]  # alice2 stays out
    befriend(alice, bob)
    befriend(alice, carol)
    alice.json("group", "create", "lab", "--subnet", "10.77.0.0/24")
    bob.json("group", "join", alice.jid, "lab")
    wait_for(lambda: alice.json("requests")["joins"], 10, "bob's join request")
    alice.json("accept", bob.jid, "--group", "lab")
    alice.json("group", "invite", "lab", carol.jid)
    wait_for(lambda: carol.json("requests")["invitations"], 10, "carol's invitation")
    carol.json("accept", alice.jid, "--group", "lab")
    ips = {"alice": "10.77.0.1", "bob": "10.77.0.2", "carol": "10.77.0.3"}

    def up(a: AgentProc, b: str) -> dict | None:
        p = _peer(a, b)
        return p if p and p.get("state") == "up" else None

    pairs = [(alice, "bob"), (alice, "carol"), (bob, "alice"), (bob, "carol"),
             (carol, "alice"), (carol, "bob")]
    for a, b in pairs:
        wait_for(lambda a=a, b=b: up(a, b), 45, f"{a.user} -> {b} link up",
                 lambda a=a: a.log_tail(40))
    ab = up(alice, "bob")
    assert ab["path"] == "direct"
    assert up(bob, "carol")["path"] == "turn"
    assert "relay" in (up(bob, "carol")["local_candidate_type"],
                       up(bob, "carol")["remote_candidate_type"])
    assert ab["fingerprint"] == bob.status()["device"]["fingerprint"]
    assert ab["endpoint"] and ab["rtt"] is not None and ab["last_handshake"]
    assert {"rx_bytes", "tx_bytes", "ip4", "ip6", "jid", "group"} <= set(ab)
    for a, b in pairs:
        result = a.cli("ping", ips[b], "-c", "2", check=False, timeout=30)
        assert result.returncode == 0, f"{a.user} -> {b}: {result.stdout} {result.stderr}"
        ip6 = up(a, b)["ip6"]
        r6 = a.cli("ping", ip6, "-c", "2", check=False, timeout=30)
        assert r6.returncode == 0, f"{a.user} -> {b} over IPv6: {r6.stdout} {r6.stderr}"


def _form(alice: AgentProc, *members: AgentProc) -> None:
    alice.json("group", "create", "lab", "--subnet", "10.77.0.0/24")
    for m in members:
        if m.jid != alice.jid:
            befriend(alice, m)
        m.json("group", "join", alice.jid, "lab")
        wait_for(lambda m=m: any(j["jid"] == m.jid for j in alice.json("requests")["joins"]),
                 10, f"{m.user}'s join request")
        alice.json("accept", m.jid, "--group", "lab")


def _up(a: AgentProc, device: str) -> dict | None:
    p = _peer(a, device)
    return p if p and p.get("state") == "up" else None


def test_without_turn_symmetric_pair_fails_with_a_reason(netns_factory, test_ca, tmp_path):
    with Internet(netns_factory, tmp_path, test_ca) as net:
        alice = net.agent("alice", net.site("alice"), turn=False)
        bob = net.agent("bob", net.site("bob", "eim"), turn=False)
        carol = net.agent("carol", net.site("carol", "symmetric"), turn=False)
        for agent in (alice, bob, carol):
            agent.wait_connected(timeout=20)
        _form(alice, bob, carol)
        for a, b in ((alice, "bob"), (alice, "carol"), (bob, "alice"), (carol, "alice")):
            wait_for(lambda a=a, b=b: _up(a, b), 45, f"{a.user} -> {b} up",
                     lambda a=a: a.log_tail(30))
        failed = wait_for(lambda: (p := _peer(bob, "carol")) and p.get("failure") and p, 60,
                          "bob -> carol to report failure", lambda: bob.log_tail(30))
        assert failed["state"] != "up" and failed["failure"]
        assert bob.cli("ping", "10.77.0.1", "-c", "1", check=False).returncode == 0


def test_second_device_removal_and_owner_restart(mesh):
    alice, bob, carol, alice2 = mesh["alice"], mesh["bob"], mesh["carol"], mesh["alice2"]
    _form(alice, bob, carol, alice2)  # alice2: the same account, another device
    g2 = wait_for(lambda: next((g for g in alice2.json("groups") if g["name"] == "lab"), None),
                  10, "alice's second device in lab")
    assert g2["ip4"] == "10.77.0.4" and g2["role"] == "member"
    for a, b in ((alice, "bob"), (alice, "carol"), (bob, "carol"), (alice2, "alice"),
                 (alice2, "bob"), (alice2, "carol")):
        wait_for(lambda a=a, b=b: _up(a, b), 45, f"{a.device_name} -> {b} up")
    assert alice2.cli("ping", "10.77.0.3", "-c", "1", check=False).returncode == 0

    # alice removes carol: within 2 s nobody forwards carol's packets any more.
    assert carol.cli("ping", "10.77.0.2", "-c", "1", check=False).returncode == 0
    alice.json("group", "remove", "lab", carol.jid)
    wait_for(lambda: _peer(bob, "carol") is None and _peer(alice, "carol") is None, 2,
             "members to drop carol")
    assert carol.cli("ping", "10.77.0.2", "-c", "2", check=False).returncode != 0

    # The owner restarts: the group, its addresses and the link to bob come back.
    alice.stop()
    alice.start()
    alice.wait_connected(timeout=20)
    g = next(g for g in alice.json("groups") if g["name"] == "lab")
    assert g["ip4"] == "10.77.0.1"
    wait_for(lambda: bob.cli("ping", "10.77.0.1", "-c", "1", check=False).returncode == 0, 45,
             "bob to reach alice again", lambda: alice.log_tail(30), interval=0.5)
    assert _up(alice, "bob")
