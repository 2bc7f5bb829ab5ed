"""Time from `socialvpn up` to signed in (issue 2), median of N runs, against a real Prosody.

Two numbers per run: wall time from starting the process until the local API reports
`connected` (what a person waits for), and the agent's own start→signed-in time (without
Python start-up). Prints a markdown table; `--out FILE` also writes it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import emit
from socialvpn.errors import SocialVPNError
from socialvpn.web.client import APIClient
from tests.kit.agents import AgentProc
from tests.kit.ca import ThrowawayCA
from tests.kit.prosody import Prosody


def measure(runs: int) -> list[tuple[float, float]]:
    with tempfile.TemporaryDirectory(prefix="svpn-bench-signin-") as tmp_dir:
        return _measure(Path(tmp_dir), runs)


def _measure(root: Path, runs: int) -> list[tuple[float, float]]:
    ca = ThrowawayCA.create(root / "ca")
    results = []
    with Prosody(root / "prosody", ca=ca, log_level="info") as server:
        server.register("bench", "bench-pw")
        agent = AgentProc(root / "agent", f"bench@{server.domain}", "bench-pw",
                          server=f"{server.host}:{server.port}", ca_file=ca.ca_file)
        agent.init()
        api = APIClient(agent.state_dir / "api.sock", timeout=2)
        try:
            for _ in range(runs):
                t0 = time.monotonic()
                agent.start()
                deadline = t0 + 30
                status = None
                while time.monotonic() < deadline:
                    try:
                        status = api.get("status")
                        if status["xmpp"]["state"] == "connected":
                            break
                    except SocialVPNError:
                        pass
                    time.sleep(0.005)
                wall = time.monotonic() - t0
                assert status and status["xmpp"]["state"] == "connected", agent.log_tail()
                internal = status["xmpp"]["connected_at"] - status["agent"]["started_at"]
                results.append((wall, internal))
                agent.stop()
        finally:
            agent.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = measure(args.runs)
    walls = [w for w, _ in results]
    internals = [i for _, i in results]
    lines = [
        f"## Sign-in time (Prosody on loopback, TLS 1.3, {args.runs} runs)",
        "",
        "| measure | median | min | max |",
        "| --- | --- | --- | --- |",
        f"| `up` → status connected (wall) | {statistics.median(walls):.3f} s | "
        f"{min(walls):.3f} s | {max(walls):.3f} s |",
        f"| agent start → signed in | {statistics.median(internals):.3f} s | "
        f"{min(internals):.3f} s | {max(internals):.3f} s |",
    ]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
