"""Join time (issue 4): from `accept` to the first ping reply over the group, direct and TURN
path, median of N; and the time for a group of M devices to reach a full mesh.

Real parts: Prosody and coturn in a "pub" namespace, agents in their own namespaces (alice: no
NAT, bob: home NAT, carol: symmetric NAT; the mesh devices: no NAT). Needs root.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import emit
from tests.kit.agents import AgentProc, befriend, wait_for
from tests.kit.ca import ThrowawayCA
from tests.kit.internet import Internet
from tests.kit.links import proc_memory_mib, proc_wakeups
from tests.kit.netns import NetLab


def ping_ok(agent: AgentProc, address: str) -> bool:
    assert agent.netns is not None
    cmd = ["ip", "netns", "exec", agent.netns, "ping", "-n", "-c", "1", "-W", "0.2", address]
    return subprocess.run(cmd, capture_output=True, timeout=10, check=False).returncode == 0


def first_ping(agent: AgentProc, address: str, timeout: float = 60.0) -> float:
    start = time.monotonic()
    wait_for(lambda: ping_ok(agent, address), timeout, f"{agent.user} -> {address}",
             interval=0.05)
    return time.monotonic() - start


def join_times(rounds: int) -> tuple[list[float], list[float]]:
    direct: list[float] = []
    turn: list[float] = []
    with tempfile.TemporaryDirectory(prefix="svpn-bench-join-") as tmp_dir, NetLab() as lab, \
            Internet(lab, Path(tmp_dir), ThrowawayCA.create(Path(tmp_dir) / "ca")) as net:
        alice = net.agent("alice", net.site("alice"))
        bob = net.agent("bob", net.site("bob", "eim"))
        carol = net.agent("carol", net.site("carol", "symmetric"))
        for a in (alice, bob, carol):
            a.wait_connected(timeout=20)
        befriend(alice, bob)
        befriend(alice, carol)
        for i in range(rounds):
            name = f"lab{i}"
            alice.json("group", "create", name, "--subnet", f"10.{80 + i}.0.0/24")
            bob.json("group", "join", alice.jid, name)
            wait_for(lambda n=name: any(j["group"] == n for j in alice.json("requests")["joins"]),
                     10, "bob's request")
            start = time.monotonic()
            alice.json("accept", bob.jid, "--group", name)
            first_ping(bob, f"10.{80 + i}.0.1")
            direct.append(time.monotonic() - start)
            carol.json("group", "join", alice.jid, name)
            wait_for(lambda n=name: any(j["group"] == n and j["jid"] == carol.jid
                                        for j in alice.json("requests")["joins"]),
                     10, "carol's request")
            start = time.monotonic()
            alice.json("accept", carol.jid, "--group", name)
            first_ping(bob, f"10.{80 + i}.0.3")  # bob (home NAT) <-> carol (symmetric): TURN
            turn.append(time.monotonic() - start)
            print(f"round {i + 1}: direct {direct[-1]:.2f} s, turn {turn[-1]:.2f} s", flush=True)
    return direct, turn


IDLE_SECONDS = 5.0  # how long the mesh's idle wake-ups are counted


def mesh_time(devices: int) -> tuple[float, list[float], list[float]]:
    """Seconds from the accepts to a full mesh; each agent's resident memory (MiB) then, and
    its wake-ups per second over the next IDLE_SECONDS with no traffic."""
    with tempfile.TemporaryDirectory(prefix="svpn-bench-mesh-") as tmp_dir, NetLab() as lab, \
            Internet(lab, Path(tmp_dir), ThrowawayCA.create(Path(tmp_dir) / "ca")) as net:
        agents = [net.agent(f"m{i}", net.site(f"m{i}")) for i in range(devices)]
        for a in agents:
            a.wait_connected(timeout=30)
        owner = agents[0]
        owner.json("group", "create", "mesh", "--subnet", "10.90.0.0/24")
        for a in agents[1:]:
            befriend(owner, a)
            a.json("group", "join", owner.jid, "mesh")
        wait_for(lambda: len(owner.json("requests")["joins"]) == devices - 1, 30, "requests")
        start = time.monotonic()
        for a in agents[1:]:
            owner.json("accept", a.jid, "--group", "mesh")

        def full() -> bool:
            return all(len([p for p in a.json("peers") if p.get("state") == "up"]) == devices - 1
                       for a in agents)

        wait_for(full, 180, "a full mesh", interval=0.5)
        took = time.monotonic() - start
        pids = [a.proc.pid for a in agents if a.proc is not None]
        rss = [proc_memory_mib([pid])[0] for pid in pids]
        before = [proc_wakeups([pid]) for pid in pids]
        time.sleep(IDLE_SECONDS)
        woke = [(proc_wakeups([pid]) - b) / IDLE_SECONDS for pid, b in zip(pids, before,
                                                                           strict=True)]
        return took, rss, woke


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mesh", type=int, default=10, help="devices in the mesh (0: skip)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    direct, turn = join_times(args.rounds)
    lines = [
        f"## Join time: `accept` → first ping reply (median of {args.rounds})",
        "",
        "| path | median | min | max |",
        "| --- | --- | --- | --- |",
        f"| direct (home NAT ↔ no NAT) | {statistics.median(direct):.2f} s | {min(direct):.2f} s "
        f"| {max(direct):.2f} s |",
        f"| TURN (home NAT ↔ symmetric NAT) | {statistics.median(turn):.2f} s | "
        f"{min(turn):.2f} s | {max(turn):.2f} s |",
    ]
    if args.mesh:
        t, rss, woke = mesh_time(args.mesh)
        lines += ["", f"{args.mesh}-device group: all accepts → full mesh "
                      f"({args.mesh * (args.mesh - 1) // 2} links up): {t:.1f} s"]
        if rss:
            lines += ["", f"Resident memory of one whole agent (XMPP, ICE, dashboard, link "
                          f"device) with {args.mesh - 1} peers up: median "
                          f"{statistics.median(rss):.1f} MiB, max {max(rss):.1f} MiB; idle "
                          f"wake-ups (all its threads, {IDLE_SECONDS:.0f} s without traffic, "
                          f"consent checks and XMPP included): median "
                          f"{statistics.median(woke):.1f}/s, max {max(woke):.1f}/s"]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
