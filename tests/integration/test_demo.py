"""Issue 6 acceptance 8: `make demo` finishes the distributed job and prints dashboard URLs;
running it again replaces the previous cluster; `make demo-down` leaves no namespace, process,
interface or file behind (and is safe when nothing runs).

The demo runs as `make demo` runs it (``python -m tests.kit.demo``), with a namespace prefix and
state directory of this test's own (``SOCIALVPN_DEMO_PREFIX``, ``SOCIALVPN_DEMO_STATE_DIR``), so
it never touches a demo a person left running.
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.kit.demo import PREFIX_ENV, ROOT, STATE_DIR_ENV, _alive
from tests.kit.netns import list_netns
from tests.kit.procs import proc_cmdlines

pytestmark = [pytest.mark.integration, pytest.mark.slow]

URL_RX = re.compile(r"^\s+(alice|bob|carol|dave)\s+(http://127\.0\.0\.1:(\d+)/login\?token=\S+)$",
                    re.M)


def _demo(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.kit.demo", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                         check=True, timeout=10).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _leftovers(prefix: str, state: dict) -> list[str]:
    left = [f"namespace {ns}" for ns in list_netns() if ns.startswith(prefix)]
    pids = {p["pid"] for p in state["processes"]}
    markers = [state["root"], prefix]
    for pid, cmd in proc_cmdlines():
        if pid == os.getpid():
            continue
        if pid in pids and _alive(pid):  # a zombie waits for init to reap it: gone
            left.append(f"recorded process {pid}: {cmd}")
        elif any(m in cmd for m in markers) and "pytest" not in cmd and _alive(pid):
            left.append(f"process {pid}: {cmd}")
    left += [f"/etc/netns/{d.name}" for d in Path("/etc/netns").glob(f"{prefix}*")]
    if Path(state["root"]).exists():
        left.append(f"files {state['root']}")
    return left


def _check_run(result: subprocess.CompletedProcess, state_file: Path) -> dict:
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-4000:]
    assert "all worker addresses are group (overlay) addresses: yes" in out, out[-3000:]
    found = re.search(r"result: pi ~= (\d\.\d+) from 5,000,000 samples in 200 tasks", out)
    assert found and abs(float(found.group(1)) - 3.14159) < 0.02, out[-3000:]
    workers = re.findall(r"^\s+(bob|carol|dave)\s+(tcp://10\.77\.0\.\d+:\d+)\s+ran (\d+) tasks",
                         out, re.M)
    assert {w[0] for w in workers} == {"bob", "carol", "dave"}, out[-3000:]
    assert sum(int(w[2]) for w in workers) == 200
    assert re.search(r"demo ready in \d+\.\d s \(wall time\)", out)
    urls = URL_RX.findall(out)
    assert {u[0] for u in urls} == {"alice", "bob", "carol", "dave"}, out[-3000:]
    # a browser on this machine (root namespace) can open them: login sets a session cookie
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    for _user, url, _port in urls:
        with opener.open(url, timeout=10) as page:
            assert page.status == 200 and b"<html" in page.read(2000).lower()
    state = json.loads(state_file.read_text())
    assert state["ready"] and len(state["processes"]) >= 11  # 2 servers, 4 agents, 4 dask, fwd
    return state


def test_demo_runs_the_job_and_down_removes_everything(tmp_path: Path):
    prefix = f"svdt{os.getpid() % 100000}-"
    env = {**os.environ, PREFIX_ENV: prefix, STATE_DIR_ENV: str(tmp_path / "state")}
    state_file = tmp_path / "state" / f"{prefix.rstrip('-')}.json"
    links_before = _root_links()
    states: list[dict] = []
    try:
        states.append(_check_run(_demo(env), state_file))
        # again: the previous cluster is removed first, then a new one runs
        second = _demo(env)
        assert "a previous demo is still there: removing it first" in second.stdout
        states.append(_check_run(second, state_file))
        assert states[0]["root"] != states[1]["root"] and not Path(states[0]["root"]).exists()
    finally:
        down = _demo(env, "--down", timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "namespace " in down.stdout and "agent alice" in down.stdout
    for state in states:
        assert _leftovers(prefix, state) == []
    assert not state_file.exists()
    # every interface of the demo lived in its namespaces: none appeared here
    new_links = _root_links() - links_before
    assert not [name for name in new_links if name.startswith("svpn")], new_links
    again = _demo(env, "--down", timeout=60)
    assert again.returncode == 0 and "nothing of the demo" in again.stdout
