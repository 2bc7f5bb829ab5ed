"""Debian's Prosody, run without systemd in a temp dir of its own, for integration tests.

Typical use::

    ca = ThrowawayCA.create(tmp / "ca")
    with Prosody(ca=ca) as xmpp:                 # TLS required, cert for "svpn.test"
        xmpp.register("alice", "secret")
        ctx = xmpp.client_context()              # verifying context trusting the kit CA
        ... connect a client to xmpp.host, xmpp.port with ctx ...
        assert xmpp.count_auth_failures() == 0

    Prosody(tls=False)                           # plaintext, PLAIN auth allowed, no STARTTLS
    Prosody(ca=ca, cert=ca.issue_wrong_name())   # negative TLS tests
    Prosody(ca=ca, netns=ns, host=ns.address)    # inside a namespace

Failed logins: Prosody 0.12 logs nothing for a failed SASL attempt at ``info`` (mod_saslauth
only fires the ``authentication-failure`` event). The kit loads a tiny plugin of its own,
``mod_svpn_kit_authlog``, that logs one ``info`` line per failed SASL attempt::

    svpn-kit: authentication failure user=alice ip=127.0.0.1 session=<id>
        condition=not-authorized text=...      (one line in the file)

:meth:`Prosody.count_auth_failures` counts those lines (per user if asked). Natively, only the
``debug`` log shows a failure, as
``Sending[c2s_unauthed]: <failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>``.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tests.kit.ca import CertFiles, ThrowawayCA
from tests.kit.netns import Netns
from tests.kit.ports import free_port, port_is_free
from tests.kit.server import XmppServerProcess, cleanup_stale

DEFAULT_DOMAIN = "svpn.test"
AUTH_FAILURE_MARK = "svpn-kit: authentication failure"
WORKDIR_PREFIX = "svpn-prosody-"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
CTL_TIMEOUT = 15.0
LogLevel = Literal["debug", "info", "warn", "error"]

_PLUGIN_NAME = "svpn_kit_authlog"
_PLUGIN_SOURCE = f"""-- Written by tests/kit/prosody.py: log each failed SASL authentication.
-- Fired by mod_saslauth before it resets the SASL handler, so the handler still knows the
-- user name the client tried (PLAIN and SCRAM set it before checking the password).
module:hook("authentication-failure", function(event)
    local session = event.session or {{}};
    local handler = session.sasl_handler;
    module:log("info", "{AUTH_FAILURE_MARK} user=%s ip=%s session=%s condition=%s text=%s",
        tostring(handler and handler.username), tostring(session.ip), tostring(session.id),
        tostring(event.condition), tostring(event.text));
end);
"""
_AUTH_FAILURE_RX = re.compile(
    re.escape(AUTH_FAILURE_MARK)
    + r" user=(?P<user>\S+) ip=(?P<ip>\S+) session=(?P<session>\S+) condition=(?P<condition>\S+)"
)
_user_seq = itertools.count(1)


@dataclass(frozen=True)
class AuthFailure:
    """One failed SASL attempt as logged by the kit plugin (user is "nil" if unknown)."""

    user: str
    ip: str
    session: str
    condition: str


class ProsodyError(RuntimeError):
    """Prosody did not start, stop or run a command; the message carries the log tail."""


def unique_user(prefix: str = "u") -> str:
    """An account name no other call in any run returns (lower case, valid XMPP localpart)."""
    clean = re.sub(r"[^a-z0-9_-]", "", prefix.lower()) or "u"
    return f"{clean}-{os.getpid()}-{next(_user_seq)}-{uuid.uuid4().hex[:6]}"


def _lua_str(value: str | Path) -> str:
    text = str(value)
    if any(c in text for c in '"\\\n'):
        raise ValueError(f"unsafe value for a Lua string: {text!r}")
    return f'"{text}"'


def stop_all(servers: Iterable[Prosody], *, close: bool = False) -> None:
    """Stop (or close) several servers at once: SIGTERM to all first, then wait for each."""
    servers = list(servers)
    for server in servers:
        server.begin_stop()
    errors: list[BaseException] = []
    for server in servers:
        try:
            if close:
                server.close()
            else:
                server.stop()
        except BaseException as exc:  # stop the others anyway; report the first
            errors.append(exc)
    if errors:
        raise errors[0]


def cleanup_stale_prosody() -> list[int]:
    """Kill kit Prosody processes whose creating process is gone and remove their work dirs.

    Returns the pids killed.

    Kit work dirs are named ``svpn-prosody-<creator pid>-...``; a Prosody whose config lives in
    one whose creator is dead was left by a crashed run. Running runs are not touched.
    """
    return cleanup_stale(WORKDIR_PREFIX, "prosody", STOP_TIMEOUT)


class Prosody(XmppServerProcess):
    """One Prosody server with its own config, data, log and pid file in ``workdir``.

    ``tls=True`` (default) requires STARTTLS with ``cert`` (default: issued by ``ca`` for
    ``domain``); ``tls=False`` is plaintext with PLAIN auth allowed and no STARTTLS offered.
    ``stop()`` keeps the data, so ``start()`` again gives the same accounts on the same port.
    """

    _label = "Prosody"
    _error = ProsodyError
    stop_timeout = STOP_TIMEOUT

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        domain: str = DEFAULT_DOMAIN,
        host: str | None = None,
        port: int | None = None,
        tls: bool = True,
        ca: ThrowawayCA | None = None,
        cert: CertFiles | None = None,
        netns: Netns | str | None = None,
        log_level: LogLevel = "debug",
        extra_config: str = "",
        start_timeout: float = START_TIMEOUT,
        s2s_port: int | None = None,
    ) -> None:
        if isinstance(netns, str):
            if host is None:
                raise ValueError("Prosody(netns=<name>) needs host=<an address in that namespace>")
            netns = Netns(netns, netns)
        self.netns: Netns | None = netns
        if self.netns is not None and host is None:
            host = self.netns.address
        self.host = host or "127.0.0.1"
        self.domain = domain
        self.tls = tls
        self.log_level = log_level
        self.extra_config = extra_config
        self.start_timeout = start_timeout
        self.s2s_port = s2s_port
        # before making any file, so a bad host leaves nothing behind
        self.port = port if port is not None else free_port("tcp", self.host, netns=self.netns)
        self._make_workdir(workdir, WORKDIR_PREFIX)
        self.config_path = self.workdir / "prosody.cfg.lua"
        self.log_path = self.workdir / "prosody.log"
        self.console_path = self.workdir / "console.log"
        self.pid_path = self.workdir / "prosody.pid"
        self.data_path = self.workdir / "data"
        self.plugin_dir = self.workdir / "plugins"
        self.cert_dir = self.workdir / "certs"
        self._ca = ca
        self.cert: CertFiles | None = cert if tls else None
        self._track([str(self.config_path)])  # its processes: those with our config file
        self._prepare_files(self.cert_dir if tls else None)

    # --- files -----------------------------------------------------------------------------

    def _write_files(self) -> None:
        for d in (self.data_path, self.plugin_dir, self.cert_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        (self.plugin_dir / f"mod_{_PLUGIN_NAME}.lua").write_text(_PLUGIN_SOURCE)
        self.config_path.write_text(self.render_config())

    def render_config(self) -> str:
        """The config file text (written at construction)."""
        modules = ["roster", "saslauth", "disco", "ping", "posix", _PLUGIN_NAME]
        lines = [
            "-- Written by tests/kit/prosody.py; Prosody for tests only.",
            "run_as_root = true",
            f"pidfile = {_lua_str(self.pid_path)}",
            f"data_path = {_lua_str(self.data_path)}",
            f"plugin_paths = {{ {_lua_str(self.plugin_dir)} }}",
            f"admin_socket = {_lua_str(self.workdir / 'admin.sock')}",
            f"log = {{ {self.log_level} = {_lua_str(self.log_path)} }}",
            f"certificates = {_lua_str(self.cert_dir)}",
            'authentication = "internal_hashed"',
            'storage = "internal"',
            "allow_registration = false",
            f"c2s_ports = {{ {self.port} }}",
            f"c2s_interfaces = {{ {_lua_str(self.host)} }}",
            "c2s_direct_tls_ports = {}",
            "legacy_ssl_ports = {}",
            "http_ports = {}",
            "https_ports = {}",
            "component_ports = {}",
        ]
        if self.s2s_port is None:
            lines += ["s2s_ports = {}", "s2s_require_encryption = false"]
        else:
            if not self.tls:
                raise ValueError("federation (s2s_port) needs tls=True")
            modules.append("dialback")
            lines += [
                f"s2s_ports = {{ {self.s2s_port} }}",
                f"s2s_interfaces = {{ {_lua_str(self.host)} }}",
                "s2s_require_encryption = true",
                # the peer's certificate must verify against the kit CA and name its domain
                "s2s_secure_auth = true",
                # lua-unbound reads /etc/hosts (per namespace: /etc/netns/<ns>/hosts); SRV
                # records under .test are answered NXDOMAIN at once by unbound's default zones
                "unbound = { hoststxt = true }",
            ]
        if self.tls:
            assert self.cert is not None
            modules.insert(2, "tls")
            ca_file = self.ca_file
            federated = ca_file is not None and self.s2s_port is not None
            cafile = f", cafile = {_lua_str(ca_file)}" if federated else ""
            ssl_block = (
                f"{{ certificate = {_lua_str(self.cert.cert)}, key = {_lua_str(self.cert.key)}"
                f"{cafile} }}"
            )
            lines += [
                "c2s_require_encryption = true",
                "allow_unencrypted_plain_auth = false",
                f"ssl = {ssl_block}",
            ]
        else:
            lines += [
                "c2s_require_encryption = false",
                "allow_unencrypted_plain_auth = true",
            ]
        lines.insert(1, "modules_enabled = { " + ", ".join(_lua_str(m) for m in modules) + " }")
        if self.extra_config:
            lines.append(self.extra_config)
        lines.append(f"VirtualHost {_lua_str(self.domain)}")
        if self.tls:
            lines.append(f"    ssl = {ssl_block}")
        return "\n".join(lines) + "\n"

    # --- properties ------------------------------------------------------------------------

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts only :attr:`ca_file`."""
        if self.ca_file is None:
            raise ProsodyError("plaintext Prosody has no CA")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cafile=str(self.ca_file))
        return ctx

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start Prosody and wait until its c2s port accepts connections (bounded)."""
        if self.running():
            return
        try:
            free = port_is_free(self.port, "tcp", self.host, netns=self.netns)
        except OSError as exc:
            raise ProsodyError(f"cannot listen on {self.host}:{self.port}: {exc}") from exc
        if not free:
            raise ProsodyError(f"port {self.host}:{self.port} is busy; not starting Prosody")
        self._mark_log_start()
        prosody = shutil.which("prosody") or "/usr/bin/prosody"
        self._spawn([prosody, "-F", "--config", str(self.config_path)])

    def _ready_line(self) -> str:
        return f"Activated service 'c2s' on [{self.host}]:{self.port}"

    def restart(self) -> None:
        self.stop()
        self.start()

    # --- accounts --------------------------------------------------------------------------

    def prosodyctl(self, *args: str, timeout: float = CTL_TIMEOUT) -> str:
        """Run ``prosodyctl --config CFG ARGS...``; returns stdout, raises on failure."""
        cmd = ["prosodyctl", "--config", str(self.config_path), *args]
        try:
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise ProsodyError(f"timed out after {timeout}s: prosodyctl {' '.join(args)}") from exc
        if proc.returncode != 0:
            raise ProsodyError(
                f"prosodyctl {args[0] if args else ''} failed ({proc.returncode}): "
                f"{proc.stderr.strip()} {proc.stdout.strip()}"
            )
        return proc.stdout

    def register(self, user: str, password: str) -> str:
        """Create (or reset the password of) ``user``; returns the bare JID. Works up or down."""
        self.prosodyctl("register", user, self.domain, password)
        return self.jid(user)

    def unregister(self, user: str) -> None:
        self.prosodyctl("deluser", self.jid(user))

    # --- logs ------------------------------------------------------------------------------

    def auth_failures(self, user: str | None = None) -> list[AuthFailure]:
        """Failed SASL attempts logged so far (all runs), optionally only for ``user``."""
        out = []
        for found in _AUTH_FAILURE_RX.finditer(self.log_text()):
            failure = AuthFailure(
                user=found["user"],
                ip=found["ip"],
                session=found["session"],
                condition=found["condition"],
            )
            if user is None or failure.user == user:
                out.append(failure)
        return out

    def count_auth_failures(self, user: str | None = None) -> int:
        """Failed SASL *attempts* so far (optionally for ``user``; all runs of this server).

        One failed login can be several attempts: slixmpp tries SCRAM-SHA-1 and then PLAIN on
        one connection, which logs two failures. Use :meth:`count_failed_sessions` to count
        connections instead.
        """
        return len(self.auth_failures(user))

    def count_failed_sessions(self, user: str | None = None) -> int:
        """Client connections that had at least one failed SASL attempt."""
        return len({f.session for f in self.auth_failures(user)})

    def wait_for_log(self, pattern: str, *, timeout: float = 5.0) -> re.Match[str]:
        """Wait until the log matches regex ``pattern``; raise with the log tail on timeout."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = rx.search(self.log_text())
            if found:
                return found
            if time.monotonic() >= deadline:
                raise ProsodyError(
                    f"log did not match {pattern!r} in {timeout}s\n{self.log_tail()}"
                )
            time.sleep(0.05)
