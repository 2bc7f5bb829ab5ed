"""Finding and ending the kit's own server processes (by command line), bounded in time."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def proc_cmdlines() -> list[tuple[int, str]]:
    """(pid, command line) of every process this machine shows in /proc."""
    out: list[tuple[int, str]] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        out.append((int(entry.name), raw.replace(b"\0", b" ").decode(errors="replace")))
    return out


def kill_pids(pids: Sequence[int], grace: float) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL what is left."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.02)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def kill_matching(match: Callable[[str], bool], grace: float) -> list[int]:
    """End every process (not this one) whose command line ``match`` accepts."""
    me = os.getpid()
    pids = [pid for pid, cmd in proc_cmdlines() if pid != me and match(cmd)]
    kill_pids(pids, grace)
    return pids


def end_process(proc: subprocess.Popen[bytes] | None, timeout: float = 5.0) -> None:
    """Terminate a child we started if it still runs; kill it after ``timeout`` seconds."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
