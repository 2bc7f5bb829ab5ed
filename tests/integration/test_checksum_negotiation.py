"""Partial checksums negotiated between two real agents (net/offload.py, xmpp/signal.py).

Bed (tests/kit/internet.py): Prosody in a "pub" namespace, alice on a public address and bob
behind an endpoint-independent NAT, each agent in its own namespace with an offload TUN
device. The group ``lab`` is formed through the real CLI; the link signalling over Prosody
carries ``features="csum-partial"`` both ways, so both ``peers --json`` rows (and ``status
--json``) say ``"checksums": "partial"``. Then a ping and a 1 MB TCP echo over IPv4 and over
IPv6 cross with the SHA-256 compared, and neither namespace's kernel counted a TCP or UDP
checksum error (a side writing partial-form packets without NEEDS_CSUM would make it count).
Then bob restarts (a fresh process has full checksums): the new session negotiates them again
and the transfers still cross.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from tests.kit.agents import AgentProc, befriend, join_group, peer_row, wait_for
from tests.kit.internet import Internet
from tests.kit.links import tcp_pull, tcp_transfer
from tests.kit.netns import NetLab, Site
from tests.kit.ports import free_port

pytestmark = pytest.mark.integration

IPS = {"alice": "10.77.0.1", "bob": "10.77.0.2"}
SIZE = 1 << 20  # bytes per transfer

def _diag(*agents: AgentProc) -> Any:
    return lambda: "\n".join(f"--- {a.user} ---\n{a.log_tail(30)}" for a in agents)


def _csum_errors(site: Site) -> dict[str, int]:
    """The namespace's TCP and UDP ``InCsumErrors`` (/proc/net/snmp is per namespace)."""
    lines = site.host.run(["cat", "/proc/net/snmp"], timeout=10).stdout.splitlines()
    out: dict[str, int] = {}
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        proto, _, keys = names.partition(":")
        if proto in ("Tcp", "Udp") and "InCsumErrors" in keys.split():
            out[proto] = int(values.split()[keys.split().index("InCsumErrors") + 1])
    return out


def _both_ways(server_site: Site, client_site: Site, host: str) -> None:
    """1 MB from the client to ``host`` in the server's namespace and 1 MB back (a download on
    a connection the client opened), each compared by hash."""
    fam = 6 if ":" in host else 4
    for move in (tcp_transfer, tcp_pull):
        port = free_port("tcp", host, netns=server_site.host)
        data = os.urandom(SIZE)
        assert move(client_site.host, server_site.host, host, fam, data, port) == (
            hashlib.sha256(data).hexdigest(), SIZE), move.__name__


def test_two_agents_negotiate_partial_checksums_and_carry_tcp(
        netns_factory: NetLab, test_ca: Any, tmp_path: Path) -> None:
    with Internet(netns_factory, tmp_path, test_ca) as net:
        alice_site, bob_site = net.site("alice"), net.site("bob", "eim")
        alice = net.agent("alice", alice_site, turn=False)
        bob = net.agent("bob", bob_site, turn=False)
        for agent in (alice, bob):
            agent.wait_connected(timeout=20)
        befriend(alice, bob)
        alice.json("group", "create", "lab", "--subnet", "10.77.0.0/24")
        join_group(alice, bob)
        rows = {}
        for a, b in ((alice, "bob"), (bob, "alice")):
            rows[a.user] = wait_for(
                lambda a=a, b=b: (row := peer_row(a, b)) and row.get("state") == "up"
                and row.get("checksums") == "partial" and row, 45,
                f"{a.user} -> {b} up with partial checksums",
                lambda a=a, b=b: f"{peer_row(a, b)}\n{_diag(alice, bob)()}")
        for user, row in rows.items():
            assert row["datapath"] == "offload", (user, row)
            assert row["transport"] == "direct-socket" and row["path"] == "direct", (user, row)
        for agent, other in ((alice, rows["alice"]), (bob, rows["bob"])):
            status = agent.status()
            assert status is not None
            assert status["links"]["groups"]["lab"]["checksums"] == {other["id"]: "partial"}

        before = {"alice": _csum_errors(alice_site), "bob": _csum_errors(bob_site)}
        ping = alice_site.host.run(["ping", "-n", "-c", "3", "-W", "2", IPS["bob"]],
                                   check=False, timeout=30)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        _both_ways(bob_site, alice_site, IPS["bob"])  # alice -> bob -> alice over IPv4
        _both_ways(alice_site, bob_site, rows["bob"]["ip6"])  # bob -> alice -> bob over IPv6
        after = {"alice": _csum_errors(alice_site), "bob": _csum_errors(bob_site)}
        assert after == before, f"checksum errors counted: {before} -> {after}"
        # still partial on both ends after the traffic (nothing renegotiated it away)
        for a, b in ((alice, "bob"), (bob, "alice")):
            row = peer_row(a, b)
            assert row and row["checksums"] == "partial", row

        # bob restarts: a fresh process starts with full checksums, and its new session (a
        # new offer to alice, who takes it for a restart) negotiates them again.
        bob.stop()
        bob.start()
        bob.wait_connected(timeout=20)
        for a, b in ((alice, "bob"), (bob, "alice")):
            wait_for(lambda a=a, b=b: (row := peer_row(a, b)) and row.get("state") == "up"
                     and row.get("checksums") == "partial", 45,
                     f"{a.user} -> {b} partial again after bob's restart", _diag(alice, bob))
        _both_ways(bob_site, alice_site, IPS["bob"])
        _both_ways(alice_site, bob_site, rows["bob"]["ip6"])
        print(f"checksum errors over bob's restart: {after} -> "
              f"{ {'alice': _csum_errors(alice_site), 'bob': _csum_errors(bob_site)} }")
