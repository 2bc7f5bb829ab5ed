"""`make demo`: a virtual cluster of SocialVPN agents running an unmodified distributed program.

Builds a small internet of network namespaces: Prosody (TLS with a throw-away CA) and coturn on
a "pub" namespace; four people, each with an agent (`socialvpn up`) in a namespace of their own —
alice with no NAT, bob behind a home-router NAT, carol behind a symmetric NAT, dave with no NAT.
Through the CLI, exactly as a person would, alice makes friends with the others and forms the
group `lab` (bob and dave ask to join and alice accepts; alice invites carol and carol accepts).
The agents link up over ICE (direct, or relayed by TURN where NATs are hard) with
WireGuard-protocol sessions. Then a Dask scheduler listens on alice's group address, Dask
workers in bob's, carol's and dave's namespaces connect to it over the group, and a client runs
a real job on them (a Monte-Carlo estimate of pi: 200 tasks and a reduce).

The cluster stays up afterwards, with one dashboard per agent reachable from a browser on this
machine through small TCP forwarders; everything it started is recorded in a state file.
`make demo` again first removes the previous run; `make demo-down` (``--down``) removes
everything (namespaces, processes, interfaces, files) and is safe when nothing runs.

``SOCIALVPN_DEMO_PREFIX`` (default ``svdemo-``) names the namespaces and the state file, so a
test can run its own demo next to a person's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PREFIX_ENV = "SOCIALVPN_DEMO_PREFIX"
STATE_DIR_ENV = "SOCIALVPN_DEMO_STATE_DIR"
DEFAULT_PREFIX = "svdemo-"
DEFAULT_STATE_DIR = Path("/run/socialvpn-demo")
TMP_PREFIX = "socialvpn-demo-"
FORWARD_BASE_PORT = 7401
DASK_PORT = 8786
TASKS = 200
SAMPLES_PER_TASK = 25_000

USERS = ("alice", "bob", "carol", "dave")
SITES: dict[str, str | None] = {"alice": None, "bob": "eim", "carol": "symmetric", "dave": None}
NAT_TEXT = {None: "no NAT", "eim": "a home-router NAT", "symmetric": "a symmetric NAT"}


def say(text: str = "") -> None:
    print(text, flush=True)


def indent(text: str) -> str:
    return "\n".join("   " + line for line in text.rstrip().splitlines())


def demo_prefix() -> str:
    prefix = os.environ.get(PREFIX_ENV, DEFAULT_PREFIX)
    if not re.fullmatch(r"[a-z][a-z0-9]{2,11}-", prefix):
        raise SystemExit(f"{PREFIX_ENV} must look like 'svdemo-' (3-12 lower-case letters/digits "
                         f"and a '-'), not {prefix!r}")
    return prefix


def state_path(prefix: str) -> Path:
    directory = Path(os.environ.get(STATE_DIR_ENV, str(DEFAULT_STATE_DIR)))
    return directory / f"{prefix.rstrip('-')}.json"


# --- the record of what a demo started -------------------------------------------------------


class DemoState:
    """What one demo run made, saved after every step so ``--down`` can undo a crashed run."""

    def __init__(self, path: Path, prefix: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {"prefix": prefix, "started": time.time(), "root": None,
                                     "namespaces": [], "etc_dirs": [], "processes": [],
                                     "agents": {}, "forward_ports": {}}

    @classmethod
    def load(cls, path: Path) -> dict[str, Any] | None:
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)

    def process(self, what: str, pid: int, marker: str) -> None:
        """Record a process; ``marker`` is a string its command line holds (guards pid reuse)."""
        self.data["processes"].append({"what": what, "pid": pid, "marker": marker})
        self.save()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def teardown(prefix: str, quiet: bool = False) -> list[str]:
    """Remove everything a demo with ``prefix`` made; returns what was removed (for the log).

    Processes recorded in the state file get SIGTERM (their process group; they were started in
    sessions of their own) and SIGKILL after 10 s; then every namespace with the prefix is
    deleted (which also ends any process left in it and every interface in it), and the hosts
    dirs, work dir and state file are removed. Safe when nothing is running.
    """
    from tests.kit.netns import cleanup_prefix
    removed: list[str] = []
    path = state_path(prefix)
    state = DemoState.load(path) or {}
    procs = [p for p in state.get("processes", [])
             if _alive(p["pid"]) and p["marker"] in _cmdline(p["pid"])]
    for p in reversed(procs):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p["pid"], signal.SIGTERM)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and any(_alive(p["pid"]) for p in procs):
        time.sleep(0.05)
    for p in procs:
        if _alive(p["pid"]):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p["pid"], signal.SIGKILL)
        removed.append(f"process {p['pid']} ({p['what']})")
    removed += [f"namespace {ns}" for ns in cleanup_prefix(prefix)]
    etc = Path("/etc/netns")
    for d in sorted(etc.glob(f"{prefix}*")) if etc.exists() else []:
        shutil.rmtree(d, ignore_errors=True)
        removed.append(f"{d}")
    root = state.get("root")
    if root and Path(root).name.startswith(TMP_PREFIX) and Path(root).exists():
        shutil.rmtree(root, ignore_errors=True)
        removed.append(f"files {root}")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        removed.append(f"state {path}")
    if not quiet:
        say(f"== removed {len(removed)} things of the demo '{prefix}'" if removed
            else f"== nothing of the demo '{prefix}' was running")
        for item in removed:
            say(f"   {item}")
    return removed


# --- the demo --------------------------------------------------------------------------------


def _forward_port(taken: set[int]) -> int:
    from tests.kit.ports import free_tcp_port, port_is_free
    for port in range(FORWARD_BASE_PORT, FORWARD_BASE_PORT + 50):
        if port not in taken and port_is_free(port):
            return port
    return free_tcp_port()


def dashboard_url(netns: str, config: Path, port: int) -> str:
    """A fresh one-time login URL of the agent in ``netns``, pointed at its forwarder."""
    result = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "socialvpn", "dashboard",
         "--config", str(config)], capture_output=True, text=True, timeout=20,
        stdin=subprocess.DEVNULL, check=False)
    found = re.search(r"https?://[^\s/]+(/\S*)", result.stdout)
    if result.returncode != 0 or not found:
        why = result.stderr.strip() or result.stdout.strip()
        raise RuntimeError(f"`socialvpn dashboard` failed: {why}")
    return f"http://127.0.0.1:{port}{found.group(1)}"


def run_demo(prefix: str) -> int:
    from tests.kit.agents import AgentProc, wait_for
    from tests.kit.ca import ThrowawayCA
    from tests.kit.internet import Internet
    from tests.kit.netns import NetLab
    from tests.kit.ports import tcp_connect_ok

    t_start = time.monotonic()
    if DemoState.load(state_path(prefix)) is not None or any(
            Path("/run/netns").glob(f"{prefix}*")):
        say("== a previous demo is still there: removing it first")
        teardown(prefix)
    state = DemoState(state_path(prefix), prefix)
    root = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
    os.chmod(root, 0o755)
    state.data["root"] = str(root)
    state.save()
    lab = NetLab(prefix=prefix)
    net: Internet | None = None
    ok = False
    try:
        net = Internet(lab, root, ThrowawayCA.create(root / "ca"))
        state.data["namespaces"] = [ns.name for ns in lab.namespaces]
        state.save()
        say("== network namespaces: " + ", ".join(
            f"{u} behind {NAT_TEXT[n]}" for u, n in SITES.items())
            + f"; Prosody and coturn on the 'internet' ({net.topo.service_ip})")
        net.start()
        net.detach()
        for what, pid in net.server_pids():
            state.process(what, pid, str(root))
        server = net.server
        host, port = net.turn.stun_address
        say(f"   Prosody (TLS, test CA) {server.host}:{server.port}, domain {server.domain}; "
            f"STUN/TURN {host}:{port}")
        agents: dict[str, AgentProc] = {}
        for user, nat in SITES.items():
            agents[user] = net.agent(user, net.site(user, nat), device_name=f"{user}-laptop",
                                     start=False)
        state.data["namespaces"] = [ns.name for ns in lab.namespaces]
        state.save()
        t0 = time.monotonic()
        for user, agent in agents.items():
            agent.start()
            assert agent.proc is not None
            state.process(f"agent {user}", agent.proc.pid, str(agent.config))
            state.data["agents"][user] = {"netns": agent.netns, "config": str(agent.config),
                                          "jid": agent.jid}
        state.save()
        for agent in agents.values():
            agent.wait_connected(timeout=30)
        say(f"== {len(agents)} agents signed in over verified TLS in "
            f"{time.monotonic() - t0:.2f} s")

        form_group(agents, wait_for)

        def mesh_up() -> bool:
            return all(len([p for p in a.json("peers") if p.get("state") == "up"]) == 3
                       for a in agents.values())

        t0 = time.monotonic()
        wait_for(mesh_up, 90, "the six links to come up", interval=0.3,
                 diagnostics=lambda: "\n".join(a.log_tail(10) for a in agents.values()))
        say(f"== all six links up {time.monotonic() - t0:.2f} s after the last accept")
        for user in ("alice", "carol"):
            say(f"== {user}: socialvpn peers")
            say(indent(agents[user].cli("peers").stdout))
        say("== carol: socialvpn ping bob-laptop -c 2   (symmetric NAT <-> home NAT: via TURN)")
        say(indent(agents["carol"].cli("ping", "bob-laptop", "-c", "2", check=False).stdout))

        ips = {u: next(g["ip4"] for g in a.json("groups") if g["name"] == "lab")
               for u, a in agents.items()}
        run_dask(state, root, agents, ips, tcp_connect_ok, wait_for)

        say("== dashboards (open in a browser on this machine; each link works once, "
            "within a few minutes):")
        routes = []
        taken: set[int] = set()
        for user, agent in agents.items():
            fport = _forward_port(taken)
            taken.add(fport)
            state.data["forward_ports"][user] = fport
            routes.append(f"{fport}:{agent.netns}:127.0.0.1:7387")
        flog = (root / "forward.log").open("ab")
        fproc = subprocess.Popen([sys.executable, "-m", "tests.kit.forward", *routes],
                                 cwd=ROOT, stdin=subprocess.DEVNULL, stdout=flog, stderr=flog,
                                 start_new_session=True)
        flog.close()
        state.process("dashboard forwarder", fproc.pid, routes[0])
        wait_for(lambda: all(tcp_connect_ok("127.0.0.1", p, timeout=0.3) for p in taken), 10,
                 "the dashboard forwarders")
        for user, agent in agents.items():
            port = state.data["forward_ports"][user]
            try:
                url = dashboard_url(agent.netns or "", agent.config, port)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                url = f"(no dashboard URL: {exc})"
            say(f"   {user:6} {url}")
        state.data["ready"] = True
        state.save()
        print_summary(prefix, root, agents, ips, net.server.log_path)
        say(f"== demo ready in {time.monotonic() - t_start:.1f} s (wall time)")
        ok = True
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        if not ok:
            say("== the demo did not finish: removing what it started "
                f"(logs were in {root})")
            if net is not None:
                with contextlib.suppress(Exception):
                    net.close()
            teardown(prefix, quiet=True)


def form_group(agents: dict[str, Any], wait_for: Any) -> None:
    alice = agents["alice"]
    for friend in ("bob", "carol", "dave"):
        other = agents[friend]
        say(f"== alice: socialvpn friend add {other.jid}")
        alice.cli("friend", "add", other.jid)
        wait_for(lambda o=other: o.json("requests")["friends"], 15,
                 f"{friend} to see the request")
        if friend == "bob":
            say(f"== {friend}: socialvpn requests")
            say(indent(other.cli("requests").stdout))
        say(f"== {friend}: socialvpn accept {alice.jid}")
        other.cli("accept", alice.jid)

    def friends_settled() -> bool:
        f = alice.json("friends")
        return len(f) == 3 and all(x["subscription"] == "both" and x["devices"] for x in f)

    wait_for(friends_settled, 20, "alice's friendships to settle")
    say("== alice: socialvpn friends")
    say(indent(alice.cli("friends").stdout))

    say("== alice: socialvpn group create lab --subnet 10.77.0.0/24")
    say(indent(alice.cli("group", "create", "lab", "--subnet", "10.77.0.0/24").stdout))
    for joiner in ("bob", "dave"):
        member = agents[joiner]
        say(f"== {joiner}: socialvpn group join {alice.jid} lab")
        say(indent(member.cli("group", "join", alice.jid, "lab").stdout))
        wait_for(lambda m=member: any(j["jid"] == m.jid for j in alice.json("requests")["joins"]),
                 15, f"{joiner}'s join request")
        if joiner == "bob":
            say("== alice: socialvpn requests")
            say(indent(alice.cli("requests").stdout))
        say(f"== alice: socialvpn accept {member.jid} --group lab")
        alice.cli("accept", member.jid, "--group", "lab")
    carol = agents["carol"]
    say(f"== alice: socialvpn group invite lab {carol.jid}")
    alice.cli("group", "invite", "lab", carol.jid)
    wait_for(lambda: carol.json("requests")["invitations"], 15, "carol's invitation")
    say("== carol: socialvpn requests")
    say(indent(carol.cli("requests").stdout))
    say(f"== carol: socialvpn accept {alice.jid} --group lab")
    carol.cli("accept", alice.jid, "--group", "lab")

    def everyone_in() -> bool:
        return all(any(g["name"] == "lab" and g["epoch"] >= 4 for g in a.json("groups"))
                   for a in agents.values())

    wait_for(everyone_in, 20, "all four devices to hold the signed document")
    say("== dave: socialvpn group show lab   (a signed membership document)")
    say(indent(agents["dave"].cli("group", "show", "lab").stdout))


def run_dask(state: DemoState, root: Path, agents: dict[str, Any], ips: dict[str, str],
             tcp_connect_ok: Any, wait_for: Any) -> None:
    from tests.kit.netns import Netns
    dask_dir = root / "dask"
    dask_dir.mkdir()
    env = {**os.environ, "DASK_TEMPORARY_DIRECTORY": str(dask_dir),
           "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "30s",
           "PYTHONPATH": str(ROOT)}
    scheduler = f"tcp://{ips['alice']}:{DASK_PORT}"

    def start(user: str, what: str, args: list[str]) -> None:
        agent = agents[user]
        log = (dask_dir / f"{what}-{user}.log").open("ab")
        proc = subprocess.Popen(["ip", "netns", "exec", agent.netns, sys.executable, "-m",
                                 *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True)
        log.close()
        state.process(f"dask {what} ({user})", proc.pid, str(dask_dir))
        say(f"   {user:6} ip netns exec <{user}> " + " ".join(shlex.quote(a) for a in args))

    say("== Dask, unmodified, on the group addresses:")
    start("alice", "scheduler", ["distributed.cli.dask_scheduler", "--host", ips["alice"],
                                 "--port", str(DASK_PORT), "--no-dashboard", "--pid-file",
                                 str(dask_dir / "scheduler.pid")])
    alice_ns = Netns(agents["alice"].netns, "alice")
    wait_for(lambda: tcp_connect_ok(ips["alice"], DASK_PORT, timeout=0.5, netns=alice_ns), 30,
             "the Dask scheduler", interval=0.3)
    for user in ("bob", "carol", "dave"):
        start(user, "worker", ["distributed.cli.dask_worker", scheduler, "--host", ips[user],
                               "--name", user, "--nthreads", "2", "--no-nanny",
                               "--no-dashboard", "--local-directory",
                               str(dask_dir / f"worker-{user}")])
    say(f"== alice: a Dask client runs the job ({TASKS} tasks + a reduce) on {scheduler}")
    t0 = time.monotonic()
    result = subprocess.run(
        ["ip", "netns", "exec", agents["alice"].netns, sys.executable, "-m", "tests.kit.demo",
         "--dask-job", scheduler], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=180, stdin=subprocess.DEVNULL, check=False)
    say(indent(result.stdout))
    if result.returncode != 0:
        logs = "\n".join(p.read_text(errors="replace")[-1500:] for p in dask_dir.glob("*.log"))
        raise RuntimeError(f"the Dask job failed ({result.returncode}):\n{result.stderr}\n{logs}")
    say(f"== the distributed job finished in {time.monotonic() - t0:.1f} s "
        "(client start to result)")


def dask_job(scheduler: str, workers: int = 3) -> int:
    """Runs in alice's namespace: a real Dask job whose tasks and results cross the group."""
    from distributed import Client, get_worker

    def sample(seed: int) -> tuple[int, str]:
        import random
        rng = random.Random(seed)
        hits = sum(1 for _ in range(SAMPLES_PER_TASK) if rng.random() ** 2 + rng.random() ** 2
                   <= 1.0)
        return hits, get_worker().address

    def reduce(parts: list[tuple[int, str]]) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for _, address in parts:
            counts[address] = counts.get(address, 0) + 1
        return {"hits": sum(h for h, _ in parts), "tasks_per_worker": counts,
                "reduced_on": get_worker().address}

    t0 = time.monotonic()
    with Client(scheduler, timeout="30s") as client:
        client.wait_for_workers(workers, timeout=90)
        info = client.scheduler_info()["workers"]
        names = {addr: w.get("name") for addr, w in info.items()}
        print(f"scheduler {scheduler}; workers: "
              + ", ".join(f"{names[a]} {a}" for a in sorted(info)), flush=True)
        futures = client.map(sample, range(TASKS), pure=False)
        total = client.submit(reduce, futures).result(timeout=120)
    samples = TASKS * SAMPLES_PER_TASK
    pi = 4 * total["hits"] / samples
    print(f"result: pi ~= {pi:.5f} from {samples:,} samples in {TASKS} tasks "
          f"({time.monotonic() - t0:.1f} s)")
    for address, count in sorted(total["tasks_per_worker"].items()):
        print(f"  {names.get(address, '?'):6} {address:24} ran {count} tasks")
    print(f"  reduce ran on {names.get(total['reduced_on'], '?')} {total['reduced_on']}")
    overlay = all(a.startswith("tcp://10.77.0.") for a in info)
    print("all worker addresses are group (overlay) addresses: " + ("yes" if overlay else "NO"))
    return 0 if overlay and abs(pi - 3.14159) < 0.02 and len(info) >= workers else 1


def print_summary(prefix: str, root: Path, agents: dict[str, Any], ips: dict[str, str],
                  server_log: Path) -> None:
    py = shlex.quote(sys.executable)
    say("== what to look at (the cluster keeps running):")
    say("   - the dashboards above: peers, paths (direct / TURN), traffic of the Dask run")
    say("   - members and paths from the CLI, e.g.:")
    for user in ("alice", "carol"):
        a = agents[user]
        say(f"       ip netns exec {a.netns} {py} -m socialvpn peers --config {a.config}")
    say(f"   - ping over the group: ip netns exec {agents['carol'].netns} ping {ips['bob']}")
    say(f"   - the Dask cluster is still up on tcp://{ips['alice']}:{DASK_PORT} "
        f"(logs in {root}/dask)")
    say(f"   - a fresh dashboard link: {py} -m tests.kit.demo --urls")
    say(f"   - logs: {root}/<user>/agent.log, Prosody {server_log}")
    say(f"   - namespaces: ip netns list | grep {prefix}; state: {state_path(prefix)}")
    say("   - remove everything: make demo-down")


def print_urls(prefix: str) -> int:
    state = DemoState.load(state_path(prefix))
    if not state or not state.get("ready"):
        say("no demo is running (make demo)")
        return 1
    for user, info in state["agents"].items():
        port = state["forward_ports"][user]
        say(f"{user:6} {dashboard_url(info['netns'], Path(info['config']), port)}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--down", action="store_true",
                        help="remove a running demo (namespaces, processes, files)")
    parser.add_argument("--urls", action="store_true",
                        help="print fresh dashboard login links of the running demo")
    parser.add_argument("--dask-job", metavar="SCHEDULER", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dask_job:
        return dask_job(args.dask_job)
    prefix = demo_prefix()
    if args.down:
        teardown(prefix)
        return 0
    if args.urls:
        return print_urls(prefix)
    if os.geteuid() != 0:
        say("make demo needs root (network namespaces)")
        return 1
    return run_demo(prefix)


if __name__ == "__main__":
    sys.exit(main())
