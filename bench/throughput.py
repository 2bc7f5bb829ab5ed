"""Throughput and latency of the link, against raw veth and wireguard-go, in one run.

Two namespaces joined by a veth; for each setup: iperf3 TCP with one and four streams, UDP at
1 Gbit/s offered (received rate and loss), and ping RTT. Prints a markdown table with ratios to
wireguard-go measured in the same run (these machines are shared and noisy: compare ratios, not
absolute numbers). Needs root. ``--out FILE`` also writes the table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import emit
from tests.kit.links import (
    Iperf3Server,
    KeyPair,
    LinkPeer,
    WgGoLink,
    iperf3,
    ours_pair,
    ping,
    ping_rtt_ms,
    tcp_mbps,
    udp_summary,
    veth_hosts,
)
from tests.kit.netns import NetLab, Netns

Setup = Callable[[NetLab, Path], tuple[Netns, Netns, str, list[Any]]]


def raw_veth(lab: NetLab, tmp: Path) -> tuple[Netns, Netns, str, list[Any]]:
    a, b = veth_hosts(lab)
    return a, b, "10.0.0.2", []


def wireguard_go(lab: NetLab, tmp: Path) -> tuple[Netns, Netns, str, list[Any]]:
    a, b, _, _ = raw_veth(lab, tmp)
    ka, kb = KeyPair.generate(), KeyPair.generate()
    wa = WgGoLink(a, tmp, ka, "10.9.0.1/24", port=51820,
                  peers=[LinkPeer(kb.public, ["10.9.0.2/32"], "10.0.0.2:51820")])
    wb = WgGoLink(b, tmp, kb, "10.9.0.2/24", port=51820,
                  peers=[LinkPeer(ka.public, ["10.9.0.1/32"], "10.0.0.1:51820")])
    wa.start()
    wb.start()
    return a, b, "10.9.0.2", [wa, wb]


def socialvpn(lab: NetLab, tmp: Path, offloads: bool = True
              ) -> tuple[Netns, Netns, str, list[Any]]:
    la, lb = ours_pair(lab, tmp, offloads=offloads)
    return la.ns, lb.ns, "10.9.0.2", [la, lb]


def socialvpn_per_packet(lab: NetLab, tmp: Path) -> tuple[Netns, Netns, str, list[Any]]:
    return socialvpn(lab, tmp, offloads=False)


SETUPS: dict[str, Setup] = {"raw veth": raw_veth, "wireguard-go": wireguard_go,
                            "socialvpn": socialvpn,
                            "socialvpn, no TUN offloads": socialvpn_per_packet}


def measure(setup: Setup, seconds: float) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="svpn-bench-"))
    with NetLab() as lab:
        a, b, target, parts = setup(lab, tmp)
        try:
            warm = ping(a, target, count=3, interval=0.2)
            if warm.returncode != 0:
                raise RuntimeError(f"no connectivity: {warm.stdout}")
            rtt = ping_rtt_ms(ping(a, target, count=20, interval=0.05)) or float("nan")
            server = Iperf3Server(b, target)
            try:
                one = tcp_mbps(iperf3(a, target, seconds=seconds))
                four = tcp_mbps(iperf3(a, target, seconds=seconds, streams=4))
                udp = udp_summary(iperf3(a, target, seconds=seconds, udp_bitrate="1G",
                                         length=1200))
            finally:
                server.stop()
        finally:
            for part in parts:
                part.stop()
    return {"tcp1": one, "tcp4": four, "udp_mbps": udp["mbps"] * (1 - udp["lost_percent"] / 100),
            "udp_loss": udp["lost_percent"], "rtt": rtt}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat each setup and take the median")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    # Rounds interleave the setups, so a busy spell on this shared machine hits all of them.
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in SETUPS}
    for round_ in range(args.rounds):
        for name, setup in SETUPS.items():
            runs[name].append(measure(setup, args.seconds))
            print(f"round {round_ + 1} {name}: {runs[name][-1]}", flush=True)
    results = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
               for name, rs in runs.items()}
    ratios = [o["tcp1"] / w["tcp1"] for o, w in zip(runs["socialvpn"], runs["wireguard-go"],
                                                      strict=True)]
    plain = [o["tcp1"] / w["tcp1"] for o, w in zip(runs["socialvpn, no TUN offloads"],
                                                     runs["wireguard-go"], strict=True)]
    ref = results["wireguard-go"]
    lines = [
        f"## Link throughput and latency (iperf3 {args.seconds:.0f} s, median of "
        f"{args.rounds}, two namespaces over veth, MTU 1380 inside)",
        "",
        "| setup | TCP 1 stream Mbit/s | TCP 4 streams Mbit/s | UDP 1 Gbit/s offered: "
        "received Mbit/s (loss) | ping RTT ms | TCP 1 stream vs wireguard-go |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['tcp1']:.0f} | {r['tcp4']:.0f} | {r['udp_mbps']:.0f} "
            f"({r['udp_loss']:.1f} %) | {r['rtt']:.3f} | {r['tcp1'] / ref['tcp1']:.2f}x |")
    lines += ["", "socialvpn / wireguard-go, TCP 1 stream, per round: "
              + ", ".join(f"{r:.2f}x" for r in ratios)
              + f" (median {statistics.median(ratios):.2f}x); without TUN offloads: "
              + ", ".join(f"{r:.2f}x" for r in plain)
              + f" (median {statistics.median(plain):.2f}x)"]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
