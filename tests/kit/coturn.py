"""Debian's coturn (``turnserver``), run without systemd, for ICE integration tests.

Typical use::

    with NetLab() as lab:
        topo = lab.topology()                      # ``pub`` has a sink default route
        with Coturn(topo.pub, topo.service_ip) as turn:
            stun = turn.stun_address               # ("198.18.0.1", 3478)
            host, port, user, password = turn.turn_credentials

One server = one work dir (``svpn-coturn-<creator pid>-...``) holding its log and pid file; no
config file is read (``-n``), no CLI, no TLS/DTLS. STUN and TURN (long-term credentials, realm
``svpn.test``) listen on ``ip:port`` and relay from ``ip``.

Pitfalls handled here (TESTBED.md):

* Peer address filters: Debian's ``/etc/turnserver.conf`` (and most production configs) deny
  relaying to private and reserved ranges. This kit reads no config file (``-n``), and coturn
  4.6.1 then denies none of the test ranges by itself (verified), but the test ranges
  (``10.0.0.0/8``, ``198.18.0.0/15``) are still allowed explicitly with ``--allowed-peer-ip``,
  which wins over any ``--denied-peer-ip`` (verified: with both, relaying works; with only the
  deny, every relayed check fails). ``denied_peer_ips`` lets a test reproduce a strict server.
* coturn drops a whole allocation when a send to a peer fails locally (ENETUNREACH): the
  namespace it runs in needs a default route. :class:`Coturn` adds a sink route to a namespace
  that has none (``Topology.pub`` already has one).
* A busy UDP port does not stop coturn from starting: the port is checked first.
* ``start()`` returns only once the server answers a STUN Binding request.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tests.kit.netns import Netns
from tests.kit.server import ServerProcess, cleanup_stale

if TYPE_CHECKING:
    from socialvpn.link.ice import IceServers

DEFAULT_REALM = "svpn.test"
DEFAULT_USER = "svpn"
DEFAULT_PASSWORD = "turn-test-password"
DEFAULT_PORT = 3478
ALLOWED_PEER_RANGES: tuple[str, ...] = (
    "10.0.0.0-10.255.255.255",
    "198.18.0.0-198.19.255.255",
)
"""The kit's private test ranges (``10.0.0.0/8``, ``198.18.0.0/15``), which coturn would deny."""
WORKDIR_PREFIX = "svpn-coturn-"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0

_STUN_MAGIC = 0x2112A442
_BINDING_REQUEST = 0x0001
_BINDING_SUCCESS = 0x0101


class CoturnError(RuntimeError):
    """coturn did not start or stop; the message carries the log tail."""


def stun_binding_ok(sock: socket.socket, server: tuple[str, int], timeout: float = 0.3) -> bool:
    """Send one STUN Binding request from ``sock`` and wait ``timeout`` for its success answer."""
    txid = os.urandom(12)
    request = struct.pack("!HHI", _BINDING_REQUEST, 0, _STUN_MAGIC) + txid
    sock.settimeout(timeout)
    try:
        sock.sendto(request, server)
        deadline = time.monotonic() + timeout
        while True:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            data, _ = sock.recvfrom(2048)
            if len(data) >= 20 and data[8:20] == txid:
                return struct.unpack_from("!H", data)[0] == _BINDING_SUCCESS
    except OSError:  # timeout, or ICMP unreachable while the server is not up yet
        return False


def cleanup_stale_coturn() -> list[int]:
    """Kill kit coturn servers whose creating process is gone; remove their work dirs.

    Never touches a server of a run that is still going (its creator pid is alive).
    """
    return cleanup_stale(WORKDIR_PREFIX, "turnserver", STOP_TIMEOUT)


def _has_default_route(ns: Netns | None) -> bool:
    cmd = ["ip", "-4", "route", "show", "default"]
    if ns is not None:
        cmd = ["ip", "-n", ns.name, "-4", "route", "show", "default"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=5.0, check=False)
    return bool(out.stdout.strip())


class Coturn(ServerProcess):
    """One coturn server (STUN + TURN over UDP/TCP) on ``ip:port`` inside ``netns``.

    ``netns=None`` runs it in the caller's namespace (then ``ip`` must exist there).
    ``relay_ip`` defaults to ``ip``; ``external_ip`` is only for a server behind NAT.
    """

    stop_timeout = STOP_TIMEOUT

    def __init__(
        self,
        netns: Netns | None,
        ip: str,
        port: int = DEFAULT_PORT,
        *,
        user: str = DEFAULT_USER,
        password: str = DEFAULT_PASSWORD,
        realm: str = DEFAULT_REALM,
        relay_ip: str | None = None,
        external_ip: str | None = None,
        allowed_peer_ips: Sequence[str] = ALLOWED_PEER_RANGES,
        denied_peer_ips: Sequence[str] = (),
        min_port: int = 49152,
        max_port: int = 65535,
        verbose: bool = False,
        workdir: Path | str | None = None,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        for value in (user, password, realm):
            if not value or any(c in value for c in ":\n\0 "):
                raise ValueError(f"unusable coturn credential or realm: {value!r}")
        self.netns = netns
        self.ip = ip
        self.port = port
        self.user = user
        self.password = password
        self.realm = realm
        self.relay_ip = relay_ip or ip
        self.external_ip = external_ip
        self.allowed_peer_ips = tuple(allowed_peer_ips)
        self.denied_peer_ips = tuple(denied_peer_ips)
        self.min_port = min_port
        self.max_port = max_port
        self.verbose = verbose
        self.start_timeout = start_timeout
        self._make_workdir(workdir, WORKDIR_PREFIX)
        self.log_path = self.workdir / "turnserver.log"
        self.console_path = self.workdir / "console.log"
        self.pid_path = self.workdir / "turnserver.pid"
        self.db_path = self.workdir / "turndb"
        self._track(["turnserver", str(self.workdir)])

    # --- what clients use ------------------------------------------------------------------

    @property
    def stun_address(self) -> tuple[str, int]:
        return (self.ip, self.port)

    @property
    def turn_credentials(self) -> tuple[str, int, str, str]:
        """``(host, port, username, password)`` for a TURN client."""
        return (self.ip, self.port, self.user, self.password)

    def ice_servers(self, *, relay: bool) -> IceServers:
        """The agent-side view of this server: STUN only, or STUN and TURN (``relay``)."""
        from socialvpn.link.ice import IceServers, TurnServer

        if not relay:
            return IceServers(stun=(self.stun_address,))
        host, port, user, password = self.turn_credentials
        return IceServers(stun=(self.stun_address,), turn=(TurnServer(host, port, user, password),))

    def command(self) -> list[str]:
        """The ``turnserver`` argv (without the namespace prefix)."""
        binary = shutil.which("turnserver") or "/usr/bin/turnserver"
        cmd = [
            binary,
            "-n",  # no config file: everything is on this command line
            "--listening-ip", self.ip,
            "--listening-port", str(self.port),
            "--relay-ip", self.relay_ip,
            "--min-port", str(self.min_port),
            "--max-port", str(self.max_port),
            "--lt-cred-mech",
            "--user", f"{self.user}:{self.password}",
            "--realm", self.realm,
            "--fingerprint",
            "--no-tls",
            "--no-dtls",
            "--no-cli",
            "--no-rfc5780",
            "--log-file", str(self.log_path),
            "--simple-log",
            "--no-stdout-log",
            "--pidfile", str(self.pid_path),
            "--userdb", str(self.db_path),  # not the system's /var/lib/turn/turndb
            "--relay-threads", "1",
        ]
        if self.external_ip:
            cmd += ["--external-ip", self.external_ip]
        for peer_range in self.allowed_peer_ips:
            cmd.append(f"--allowed-peer-ip={peer_range}")
        for peer_range in self.denied_peer_ips:
            cmd.append(f"--denied-peer-ip={peer_range}")
        if self.verbose:
            cmd.append("--verbose")
        return cmd

    # --- lifecycle -------------------------------------------------------------------------

    def _socket(self) -> socket.socket:
        if self.netns is not None:
            return self.netns.socket(socket.AF_INET, socket.SOCK_DGRAM)
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def _port_free(self) -> bool:
        with self._socket() as sock:
            try:
                sock.bind((self.ip, self.port))
            except OSError:
                return False
        return True

    def start(self) -> None:
        """Start coturn and wait (bounded) until it answers a STUN Binding request."""
        if self.running():
            return
        if not self._port_free():
            raise CoturnError(f"UDP {self.ip}:{self.port} is busy (or not local); not starting")
        if not _has_default_route(self.netns):
            if self.netns is None:
                raise CoturnError("coturn needs a default route (see TESTBED.md)")
            self.netns.add_sink_default_route()
        self._spawn(self.command())

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        with self._socket() as sock:
            sock.bind((self.ip, 0) if self.netns is not None else ("0.0.0.0", 0))
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise CoturnError(
                        f"turnserver exited with {self._proc.returncode} while starting\n"
                        + self.diagnostics()
                    )
                if stun_binding_ok(sock, self.stun_address):
                    return
                time.sleep(0.02)
        raise CoturnError(
            f"turnserver did not answer STUN on {self.ip}:{self.port} within "
            f"{self.start_timeout}s\n" + self.diagnostics()
        )

    def answers_stun(self, timeout: float = 0.5) -> bool:
        """True if the server answers one STUN Binding request now."""
        with self._socket() as sock:
            return stun_binding_ok(sock, self.stun_address, timeout)

    # --- logs ------------------------------------------------------------------------------

    def diagnostics(self, lines: int = 30) -> str:
        out = []
        for path in (self.console_path, self.log_path):
            with contextlib.suppress(OSError):
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path.name} ---\n" + "\n".join(tail))
        return "\n".join(out)
