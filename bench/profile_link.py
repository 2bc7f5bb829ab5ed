"""Where the time goes on our link: py-spy samples both link runners during an iperf3 TCP run.

Our link (offload path by default, ``--per-packet`` for the other) between two namespaces over
veth, one TCP stream a → b for ``--seconds``; ``py-spy record`` samples the sender's and the
receiver's link runner (all threads, idle ones left out) and writes raw collapsed stacks and a
flame graph per side under ``--outdir``. Prints, per side, the functions with the most samples
on top of the stack (self) and anywhere on it (inclusive), as a share of busy samples: with
``--gil`` only samples holding the GIL (Python CPU; syscalls and other GIL-free waits left
out), without it all samples except those sleeping in a known wait (blocking receives count).
Needs root and py-spy (in the venv).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import emit
from tests.kit.links import Iperf3Server, iperf3, ours_pair, tcp_mbps
from tests.kit.netns import NetLab

PY_SPY = Path(sys.executable).with_name("py-spy")
IDLE_LEAVES = ("Condition.wait ", "Event.wait ", "Queue.get ", "TunDevice._wait ",
               "TunDevice.wait_readable ")
"""Frames where a thread only sleeps (py-spy's own idle detection does not work on this
kernel: it counted the timer thread's ``Condition.wait`` as busy)."""


def _frame_name(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)"; keep function and file
    name, _, where = frame.partition(" (")
    file = where.rsplit("/", 1)[-1].split(":")[0]
    return f"{name} ({file})" if file else name


def summarise(raw: Path, top: int) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """(busy samples, top self, top inclusive) from py-spy's raw collapsed-stack output."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame_name(f) for f in stack.split(";") if not f.startswith("thread (")]
        if not frames or frames[-1].startswith(IDLE_LEAVES):
            continue
        total += n
        own[frames[-1]] += n
        for name in set(frames):
            incl[name] += n
    return total, own.most_common(top), incl.most_common(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--per-packet", action="store_true")
    parser.add_argument("--gil", action="store_true",
                        help="only samples holding the GIL (Python CPU, no syscalls)")
    parser.add_argument("--native", action="store_true", help="C frames too (slower)")
    parser.add_argument("--outdir", type=Path, default=Path("bench/results/profile"))
    parser.add_argument("--out", type=Path, help="markdown summary (also printed)")
    args = parser.parse_args()
    args.spy_args = (["--gil"] if args.gil else []) + (["--native"] if args.native else [])
    tag = "-gil" if args.gil else ""
    if not PY_SPY.exists():
        raise SystemExit(f"py-spy not found at {PY_SPY}")
    args.outdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="svpn-bench-prof-"))
    path = "per-packet" if args.per_packet else "offload"
    spies: list[subprocess.Popen[bytes]] = []
    try:
        with NetLab() as lab:
            la, lb = ours_pair(lab, tmp, offloads=not args.per_packet)
            try:
                server = Iperf3Server(lb.ns, lb.ip)
                try:
                    iperf3(la.ns, lb.ip, seconds=1)  # warm: handshake done, windows open
                    for side, link in (("sender", la), ("receiver", lb)):
                        assert link.proc is not None
                        for fmt, ext in (("raw", "txt"), ("flamegraph", "svg")):
                            spies.append(subprocess.Popen(
                                [str(PY_SPY), "record", "-p", str(link.proc.pid), "-r",
                                 str(args.rate), "-d", str(args.seconds + 1), "-f", fmt,
                                 "-o", str(args.outdir / f"{path}{tag}-{side}.{ext}"),
                                 *args.spy_args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                    time.sleep(0.5)
                    result = iperf3(la.ns, lb.ip, seconds=args.seconds)
                finally:
                    server.stop()
                for spy in spies:
                    spy.wait(args.seconds + 30)
            finally:
                la.stop()
                lb.stop()
    finally:
        for spy in spies:
            if spy.poll() is None:
                spy.kill()
                spy.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)
    mode = "GIL-holding samples only" if args.gil else "all samples but known sleeps"
    lines = [f"## py-spy profile of our link, {path} path, during iperf3 TCP 1 stream "
             f"({tcp_mbps(result):.0f} Mbit/s under the profiler, {args.seconds} s, "
             f"{args.rate} samples/s, {mode})"]
    for side in ("sender", "receiver"):
        total, own, incl = summarise(args.outdir / f"{path}{tag}-{side}.txt", args.top)
        share = total / (args.rate * args.seconds)
        lines += ["", f"### {side} ({total} samples ≈ {share:.2f} threads busy)", "",
                  "| self % | function | | inclusive % | function |",
                  "| --- | --- | --- | --- | --- |"]
        for (fn_s, n_s), (fn_i, n_i) in zip(own, incl, strict=False):
            lines.append(f"| {100 * n_s / total:.1f} | `{fn_s}` | | {100 * n_i / total:.1f} | "
                         f"`{fn_i}` |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
