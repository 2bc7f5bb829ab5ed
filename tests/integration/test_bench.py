"""Smoke test of the throughput bench (issue 7, acceptance 1): ``--quick`` with one VPN (our
offload path) in every default scenario; the JSON has the documented shape, the NIC-like veth
really segments, the loss rule really drops, and the run leaves nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_root
from tests.kit.links import REPO
from tests.kit.netns import list_netns

pytestmark = pytest.mark.integration

METRICS = {"tcp1_mbps", "tcp4_mbps", "udp_rx_mbps", "udp_loss_percent", "rtt_ms",
           "rtt_avg_ms", "cpu_s_per_gb", "tcp1_retransmits", "underlay_bytes_per_packet",
           "rss_idle_mib", "rss_peak_mib", "idle_wakeups_per_s"}


def test_quick_bench_writes_json_and_markdown(tmp_path: Path) -> None:
    require_root(("ip", "nft", "iperf3"))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "throughput.md"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.throughput", "--quick", "--setups", "ours-offload",
         "--scenarios", "clean,loss,nic", "--out", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TMPDIR": str(tmp)})
    try:
        _, stderr = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()  # its namespaces go with the next cleanup_stale()
            proc.wait(10)
    assert proc.returncode == 0, stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["schema"] == "socialvpn-bench-throughput/1"
    assert report["config"]["quick"] is True and report["config"]["rounds"] == 1
    assert report["config"]["scenarios"] == ["clean", "loss", "nic"]
    assert set(report["setups"]) == {"ours-offload"}
    runs = {r["scenario"]: r for r in report["runs"]}
    assert set(runs) == {"clean", "loss", "nic"}
    for scenario, run in runs.items():
        assert "error" not in run, run
        assert set(run["metrics"]) == METRICS - ({"idle_wakeups_per_s"} if scenario != "clean"
                                                 else set())
        m = run["metrics"]
        for key in ("tcp1_mbps", "tcp4_mbps", "udp_rx_mbps", "rtt_ms", "cpu_s_per_gb",
                    "rss_idle_mib", "rss_peak_mib"):
            assert isinstance(m[key], float) and m[key] > 0, (scenario, key, m[key])
        assert m["rss_peak_mib"] >= m["rss_idle_mib"] * 0.9, m  # two link processes
        result = report["results"][scenario]["ours-offload"]
        assert result["rounds_ok"] == 1 and set(METRICS) <= set(result)
        assert set(report["ratios"][scenario]["ours-offload"]) >= {
            "tcp1_vs_wireguard_go", "tcp1_vs_best_other"}
    assert runs["clean"]["metrics"]["idle_wakeups_per_s"] >= 0
    # The NIC-like veth segments: only frames of at most an Ethernet MTU cross it; the plain
    # veth carries our GSO super-datagrams whole.
    assert runs["nic"]["metrics"]["underlay_bytes_per_packet"] <= 1514
    assert runs["nic"]["info"]["underlay"]["features_a"]["tx-udp-segmentation"] is False
    assert runs["clean"]["metrics"]["underlay_bytes_per_packet"] > 1514
    loss = runs["loss"]["info"]["loss_counters"]
    assert loss["udp_seen"] > 0 and loss["udp_dropped"] > 0
    # Targets: each judged or marked not measured (no wireguard-go in this run).
    targets = {t["id"]: t for t in report["targets"]}
    assert {"offload-vs-wireguard-go", "offload-vs-best-other", "per-packet-vs-wireguard-go",
            "offload-keeps-at-loss", "offload-rtt"} <= set(targets)
    assert targets["offload-vs-wireguard-go"]["met"] is None
    assert targets["offload-keeps-at-loss"]["met"] in (True, False)
    text = out.read_text()
    assert "### Targets" in text and "| ours-offload |" in text
    # Nothing left behind: the bench's namespaces (its pid prefix) and temp dirs are gone.
    assert not [n for n in list_netns() if n.startswith(f"svt{proc.pid}-")]
    assert list(tmp.iterdir()) == []
