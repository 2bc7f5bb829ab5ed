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

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.kit.agents import AgentProc, befriend, join_group, peer_row, wait_for
from tests.kit.internet import Internet
from tests.kit.netns import NetLab, Site
from tests.kit.ports import free_port

pytestmark = pytest.mark.integration

IPS = {"alice": "10.77.0.1", "bob": "10.77.0.2"}
SIZE = 1 << 20  # bytes per transfer

SERVER = """
import hashlib, socket, sys
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
srv = socket.create_server((host, port), family=family)
srv.settimeout(60)
print("listening", flush=True)
conn, _ = srv.accept()
conn.settimeout(60)
buf = bytearray()
while len(buf) < size:
    chunk = conn.recv(65536)
    if not chunk:
        break
    buf += chunk
conn.sendall(bytes(buf))  # echo: the way back crosses the link the other way
conn.shutdown(socket.SHUT_WR)
print(hashlib.sha256(buf).hexdigest(), len(buf), flush=True)
"""

CLIENT = """
import hashlib, random, socket, sys, time
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = random.Random(port).randbytes(size)
for _ in range(100):  # the server may still be starting: bounded retries
    try:
        sock = socket.create_connection((host, port), timeout=60)
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit("no connection")
sock.sendall(data)
got = bytearray()
while len(got) < size:
    chunk = sock.recv(65536)
    if not chunk:
        break
    got += chunk
print(hashlib.sha256(data).hexdigest(), hashlib.sha256(got).hexdigest(), len(got), flush=True)
"""


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


def _echo(server_site: Site, client_site: Site, host: str) -> None:
    """1 MB from the client to ``host`` in the server's namespace and back, hashes compared."""
    port = free_port("tcp", host, netns=server_site.host)
    server = server_site.host.popen([sys.executable, "-c", SERVER, host, str(port), str(SIZE)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = client_site.host.run([sys.executable, "-c", CLIENT, host, str(port), str(SIZE)],
                                      check=False, timeout=90)
        out, err = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)
    assert client.returncode == 0, f"client: {client.stdout} {client.stderr}; server: {err}"
    sent, echoed, length = client.stdout.split()
    received = out.split()[-2:]
    assert received == [sent, str(SIZE)], f"server got {received}, client sent {sent}: {err}"
    assert (echoed, int(length)) == (sent, SIZE), "the echo came back changed"


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
        _echo(bob_site, alice_site, IPS["bob"])  # alice -> bob -> alice over IPv4
        _echo(alice_site, bob_site, rows["bob"]["ip6"])  # bob -> alice -> bob over IPv6
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
        _echo(bob_site, alice_site, IPS["bob"])
        _echo(alice_site, bob_site, rows["bob"]["ip6"])
        print(f"checksum errors over bob's restart: {after} -> "
              f"{ {'alice': _csum_errors(alice_site), 'bob': _csum_errors(bob_site)} }")
