"""Real SocialVPN agents as subprocesses (`socialvpn up`), driven through the real CLI.

Used by integration tests and by `make demo`. Every wait is bounded; `stop()` is idempotent and
escalates to SIGKILL, so nothing is left running.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tests.kit.ports import free_tcp_port

T = TypeVar("T")

CLI = [sys.executable, "-m", "socialvpn"]


class AgentProc:
    def __init__(
        self,
        root: Path,
        jid: str,
        password: str | None,
        *,
        server: str,
        ca_file: Path | None = None,
        device_name: str | None = None,
        allow_plaintext: bool = False,
        extra_config: str = "",
        netns: str | None = None,
    ) -> None:
        self.jid = jid
        self.user = jid.split("@", 1)[0]
        self.dir = root
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "config.toml"
        self.state_dir = self.dir / "state"
        self.password_file = self.dir / "password"
        self.log_path = self.dir / "agent.log"
        self.server = server
        self.ca_file = ca_file
        self.device_name = device_name or self.user
        self.allow_plaintext = allow_plaintext
        self.extra_config = extra_config
        self.netns = netns
        self.proc: subprocess.Popen[bytes] | None = None
        self.web_port = 7387  # the dashboard's port (config [web] listen)
        if password is not None:
            self.password_file.write_text(password + "\n")
            os.chmod(self.password_file, 0o600)

    def _prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def init(self, *extra: str) -> subprocess.CompletedProcess[str]:
        args = [
            "init",
            "--jid",
            self.jid,
            "--server",
            self.server,
            "--state-dir",
            str(self.state_dir),
            "--device-name",
            self.device_name,
            "--password-file",
            str(self.password_file),
            "--force",
            *extra,
        ]
        if self.ca_file is not None:
            args += ["--ca-file", str(self.ca_file)]
        if self.allow_plaintext:
            args.append("--allow-plaintext")
        result = self.cli(*args)
        extra = self.extra_config
        if self.netns is None and "[web]" not in extra:
            # Agents in the root namespace share its loopback: each gets its own dashboard
            # port (in a namespace every agent has its own 127.0.0.1:7387).
            self.web_port = free_tcp_port()
            extra += f'\n[web]\nlisten = "127.0.0.1:{self.web_port}"\n'
        if extra:
            with self.config.open("a") as f:
                f.write("\n" + extra + "\n")
        return result

    def cli(
        self, *args: str, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        cmd = [*self._prefix(), *CLI, *args, "--config", str(self.config)]
        result = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}"
            )
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def status(self) -> dict[str, Any] | None:
        result = self.cli("status", "--json", check=False, timeout=10)
        return json.loads(result.stdout) if result.returncode == 0 else None

    def xmpp_state(self) -> str | None:
        st = self.status()
        return st["xmpp"]["state"] if st else None

    def start(self, *extra: str, env: dict[str, str] | None = None) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                [*self._prefix(), *CLI, "up", "--config", str(self.config), *extra],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        finally:
            log.close()

    def wait_connected(self, timeout: float = 15.0) -> dict[str, Any]:
        return wait_for(
            lambda: (st := self.status()) and st["xmpp"]["state"] == "connected" and st,
            timeout,
            f"{self.jid} to sign in",
            self.log_tail,
        )

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None and self.proc.poll() is None, "not running"
        self.proc.send_signal(sig)

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        return proc.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])


def wait_for(
    predicate: Callable[[], T | None | bool],
    timeout: float,
    what: str,
    diagnostics: Callable[[], str] | None = None,
    interval: float = 0.1,
) -> T:
    """Poll ``predicate`` until it returns something truthy; bounded in time and count."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        value = predicate()
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    extra = f"\n{diagnostics()}" if diagnostics else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{extra}")


def befriend(a: AgentProc, b: AgentProc, timeout: float = 10.0) -> None:
    """The real CLI flow: ``a`` sends a friend request, ``b`` sees it and accepts; returns once
    both list each other with subscription ``both`` and a device."""
    a.json("friend", "add", b.jid)
    wait_for(lambda: any(r["jid"] == a.jid for r in b.json("requests")["friends"]), timeout,
             f"{b.jid} to see the request of {a.jid}", b.log_tail)
    b.json("accept", a.jid)

    def mutual() -> bool:
        for x, y in ((a, b), (b, a)):
            f = next((f for f in x.json("friends") if f["jid"] == y.jid), None)
            if not (f and f["subscription"] == "both" and f["devices"]):
                return False
        return True

    wait_for(mutual, timeout, f"{a.jid} and {b.jid} to be friends",
             lambda: a.log_tail() + "\n" + b.log_tail())


def peer_row(agent: AgentProc, device: str) -> dict[str, Any] | None:
    """``agent``'s ``peers`` row for ``device`` (a device name), or None - also while the
    agent cannot answer (restarting), for wait_for loops."""
    try:
        rows = agent.json("peers")
    except Exception:
        return None
    return next((p for p in rows if p["device"] == device), None)


def join_group(owner: AgentProc, member: AgentProc, group: str = "lab",
               timeout: float = 10.0) -> None:
    """The real CLI flow: ``member`` asks to join ``owner``'s ``group``, the owner sees the
    request and accepts it."""
    member.json("group", "join", owner.jid, group)
    wait_for(lambda: owner.json("requests")["joins"], timeout,
             f"{member.user}'s join request", owner.log_tail)
    owner.json("accept", member.jid, "--group", group)


def sd_notified(sock: socket.socket, token: bytes) -> bytes:
    """The first sd_notify datagram holding ``token`` (STATUS= lines may come before it)."""
    for _ in range(50):
        message = sock.recv(4096)
        if token in message:
            return message
    raise AssertionError(f"no {token!r} in 50 notifications")
