"""What the kit's server wrappers (Prosody, ejabberd, coturn) share: one server process started
in a session of its own, with a work dir, a console log and a last-resort finalizer.

A subclass sets ``netns``, ``console_path`` and ``log_path``, calls :meth:`_make_workdir` and
:meth:`_track`, and implements ``start()`` (with :meth:`_spawn`) and ``_wait_ready()``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Self

from tests.kit.ca import CertFiles, ThrowawayCA
from tests.kit.netns import Netns
from tests.kit.ports import tcp_connect_ok
from tests.kit.procs import kill_matching


def _finalize(markers: tuple[str, ...], grace: float, workdir: Path | None) -> None:
    kill_matching(lambda cmd: all(m in cmd for m in markers), grace=grace)
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)


def _creator_gone(found: re.Match[str] | None) -> bool:
    return found is not None and not Path(f"/proc/{found.group(1)}").exists()


def kill_stale(pattern: re.Pattern[str], grace: float, program: str = "") -> list[int]:
    """Kill processes whose command line names ``program`` and matches ``pattern``, whose group
    1 is the pid of the kit process that made them, when that process is gone."""
    return kill_matching(
        lambda cmd: program in cmd and _creator_gone(pattern.search(cmd)), grace=grace
    )


def cleanup_stale(workdir_prefix: str, program: str, grace: float) -> list[int]:
    """Kill ``program`` processes using a work dir ``<workdir_prefix><creator pid>-...`` whose
    creator is gone and remove such work dirs; running runs are not touched. Returns the pids."""
    pattern = re.compile(re.escape(workdir_prefix) + r"(\d+)-")
    killed = kill_stale(pattern, grace, program)
    for workdir in Path(tempfile.gettempdir()).glob(f"{workdir_prefix}*"):
        if _creator_gone(pattern.match(workdir.name)):
            shutil.rmtree(workdir, ignore_errors=True)
    return killed


class ServerProcess:
    """A server process the kit started: pid, stop (SIGTERM, then SIGKILL), close, logs."""

    netns: Netns | None
    workdir: Path
    console_path: Path
    log_path: Path
    stop_timeout: float = 5.0
    _owns_workdir: bool
    _markers: tuple[str, ...]
    _finalizer: weakref.finalize
    _proc: subprocess.Popen[bytes] | None = None
    _console: IO[Any] | None = None
    _log_offset: int = 0

    def _make_workdir(self, workdir: Path | str | None, prefix: str) -> None:
        """Use ``workdir`` or make ``<tmp>/<prefix><our pid>-...`` (then owned: close removes
        it); private to root either way."""
        self._owns_workdir = workdir is None
        self.workdir = Path(
            workdir if workdir is not None else tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-")
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o700)

    def _track(self, markers: Sequence[str], *, grace: float = 1.0) -> None:
        """``markers``: strings whose presence in a command line marks it as this server's.
        Last resort if the owner forgets close(): at exit (or GC) kill it and drop the dir."""
        self._markers = tuple(markers)
        self._finalizer = weakref.finalize(
            self, _finalize, self._markers, grace, self.workdir if self._owns_workdir else None
        )

    # --- properties ------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def running(self) -> bool:
        return self.pid is not None

    # --- lifecycle -------------------------------------------------------------------------

    def _in_netns(self, argv: Sequence[str]) -> list[str]:
        prefix = self.netns.exec_prefix if self.netns is not None else []
        return [*prefix, *argv]

    def _wait_ready(self) -> None:
        raise NotImplementedError

    def _spawn(self, argv: Sequence[str], *, env: dict[str, str] | None = None) -> None:
        """Run ``argv`` (in ``netns``) in a new session, console to ``console_path``, and wait
        until ready; stops it again if that fails."""
        self._console = open(self.console_path, "ab")  # noqa: SIM115 (closed in stop())
        try:
            self._proc = subprocess.Popen(
                self._in_netns(argv),
                stdin=subprocess.DEVNULL,
                stdout=self._console,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
                start_new_session=True,
            )
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def begin_stop(self) -> None:
        """Send SIGTERM to its session without waiting; :meth:`stop` waits."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM, wait ``stop_timeout``, then SIGKILL. Idempotent; keeps the work dir."""
        self.begin_stop()
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                try:
                    proc.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=self.stop_timeout)
            # anything left in its session (helpers it started)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        # belt and braces: any process still running with our markers
        markers = self._markers
        kill_matching(lambda cmd: all(m in cmd for m in markers), grace=1.0)
        if self._console is not None:
            self._console.close()
            self._console = None

    def close(self) -> None:
        """Stop and, if the kit made the work dir, remove it. Idempotent."""
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self._finalizer.detach()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        raise NotImplementedError

    # --- logs ------------------------------------------------------------------------------

    def _mark_log_start(self) -> None:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_text(self, *, since_start: bool = False) -> str:
        """The server's log file (all runs, or only since the last ``start()``)."""
        try:
            with open(self.log_path, "rb") as f:
                if since_start:
                    f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


class XmppServerProcess(ServerProcess):
    """An XMPP server of the kit: c2s on ``host:port`` for ``domain``, cert from the kit CA."""

    host: str
    port: int
    domain: str
    cert: CertFiles | None
    start_timeout: float
    _ca: ThrowawayCA | None
    _label: str  # "Prosody", "ejabberd": for messages
    _error: type[RuntimeError]  # what start() raises

    def _ready_line(self) -> str:
        """The log line that says c2s listens on ``host:port``."""
        raise NotImplementedError

    def _wait_ready(self) -> None:
        assert self._proc is not None
        needle = self._ready_line()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise self._error(f"{self._label} exited with {self._proc.returncode} while "
                                  f"starting\n{self.diagnostics()}")
            if needle in self.log_text(since_start=True) and tcp_connect_ok(
                self.host, self.port, timeout=0.5, netns=self.netns
            ):
                return
            time.sleep(0.05)
        raise self._error(f"{self._label} not ready on {self.host}:{self.port} within "
                          f"{self.start_timeout}s\n{self.diagnostics()}")

    def _prepare_files(self, cert_dir: Path | None) -> None:
        """Issue a server cert into ``cert_dir`` unless given one (``None``: no TLS), write the
        config; remove an owned work dir if that fails."""
        try:
            if cert_dir is not None and self.cert is None:
                if self._ca is None:
                    self._ca = ThrowawayCA.create(self.workdir / "ca")
                self.cert = self._ca.issue_server([self.domain], directory=cert_dir)
            self._write_files()
        except BaseException:
            if self._owns_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            raise

    def _write_files(self) -> None:
        raise NotImplementedError

    @property
    def ca_file(self) -> Path | None:
        """The CA certificate clients should trust (None in plaintext mode)."""
        if self._ca is not None:
            return self._ca.ca_file
        return self.cert.ca_file if self.cert is not None else None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def jid(self, user: str) -> str:
        return f"{user}@{self.domain}"

    def diagnostics(self) -> str:
        try:
            console = self.console_path.read_text(errors="replace")[-2000:]
        except FileNotFoundError:
            console = ""
        return f"--- log tail ({self.log_path}) ---\n{self.log_tail()}\n--- console ---\n{console}"
