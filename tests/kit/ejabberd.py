"""Debian's ejabberd (23.01), run without systemd in a temp dir of its own, for integration tests.

Typical use (the same surface as :class:`tests.kit.prosody.Prosody` that the Internet bed uses)::

    with Ejabberd(ca=ca, netns=topo.pub, host=topo.service_ip) as xmpp:
        xmpp.register("alice", "secret")
        ... agents connect to xmpp.host, xmpp.port (STARTTLS required, cert from the kit CA) ...

How it runs (what ``/usr/sbin/ejabberdctl foreground`` does, minus its ``su ejabberd``):
``ejabberdctl`` always switches to the ``ejabberd`` user when started as root, which cannot read
a test's private temp dir and hides the server pid behind ``su``'s new session. The kit starts
the Erlang VM itself, as root, with the same arguments and environment the script builds
(``ERL_LIBS``, ``EJABBERD_CONFIG_PATH``, ``EJABBERD_LOG_PATH``, ``-mnesia dir``, ``-s ejabberd``)
and a node name, cookie (``$HOME/.erlang.cookie`` in the work dir) and distribution port of its
own. ``ERL_DIST_PORT`` mode (``-erl_epmd_port P -start_epmd false``, ejabberd >= 22.10) means no
``epmd`` daemon is ever started; control commands (``register``) run a hidden short-lived node
with ``-dist_listen false -s ejabberd_ctl`` exactly like ``ejabberdctl register``. ``erl``
execs ``beam.smp``, so the pid the kit holds is the server's; SIGTERM stops it (~3 s).

Measured here: start to "accepting c2s" ~0.6 s (plus VM boot ~1 s); ``register`` ~0.3 s.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
from pathlib import Path

from tests.kit.ca import CertFiles, ThrowawayCA
from tests.kit.netns import Netns
from tests.kit.ports import free_port, port_is_free
from tests.kit.procs import kill_matching
from tests.kit.server import XmppServerProcess, kill_stale

ERL = "/usr/bin/erl"
ERL_LIBS = "/usr/lib/x86_64-linux-gnu"  # where Debian puts ejabberd's own Erlang apps
WORKDIR_PREFIX = "svpn-ejabberd-"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
CTL_TIMEOUT = 30.0


class EjabberdError(RuntimeError):
    """ejabberd did not start, stop or run a command; the message carries the log tail."""


def available() -> bool:
    """True when Debian's ejabberd and Erlang are installed."""
    return Path(ERL).exists() and any(Path(ERL_LIBS).glob("ejabberd-*"))


def _yaml_str(value: str | Path) -> str:
    text = str(value)
    if any(c in text for c in "\"\\\n"):
        raise ValueError(f"unsafe value for a YAML string: {text!r}")
    return f'"{text}"'


class Ejabberd(XmppServerProcess):
    """One ejabberd node with its own config, Mnesia spool, log and cookie in ``workdir``.

    STARTTLS is required on c2s with a certificate for ``domain`` from ``ca``; no s2s, HTTP,
    STUN or MQTT listeners; no shaper on clients (the Debian default config limits them to
    3 kB/s). ``stop()`` keeps the spool, so ``start()`` again keeps the accounts.
    """

    _label = "ejabberd"
    _error = EjabberdError
    stop_timeout = STOP_TIMEOUT  # the VM shuts down cleanly on SIGTERM (~3 s)

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        domain: str = "svpn.test",
        host: str | None = None,
        port: int | None = None,
        ca: ThrowawayCA | None = None,
        cert: CertFiles | None = None,
        netns: Netns | None = None,
        log_level: str = "info",
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.netns = netns
        self.host = host or (netns.address if netns is not None else "127.0.0.1")
        self.domain = domain
        self.log_level = {"warn": "warning"}.get(log_level, log_level)
        self.start_timeout = start_timeout
        self.port = port if port is not None else free_port("tcp", self.host, netns=netns)
        self.dist_port = free_port("tcp", "127.0.0.1", netns=netns)
        self._make_workdir(workdir, WORKDIR_PREFIX)
        self.node = f"svpnej{os.getpid()}x{secrets.token_hex(3)}@localhost"
        self.config_path = self.workdir / "ejabberd.yml"
        self.log_path = self.workdir / "ejabberd.log"
        self.console_path = self.workdir / "console.log"
        self.spool = self.workdir / "spool"
        self._ca = ca
        self.cert = cert
        # any VM of this node name is ours alone (pid + random suffix)
        self._track([self.node], grace=STOP_TIMEOUT)
        self._prepare_files(self.workdir / "certs")

    # --- files -----------------------------------------------------------------------------

    def _write_files(self) -> None:
        assert self.cert is not None
        self.spool.mkdir(parents=True, exist_ok=True)
        pem = self.workdir / "server.pem"  # ejabberd wants the chain and key in certfiles
        pem.write_bytes(self.cert.cert.read_bytes() + self.cert.key.read_bytes())
        os.chmod(pem, 0o600)
        cookie = self.workdir / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16))
        os.chmod(cookie, 0o400)
        self.config_path.write_text(self.render_config(pem))

    def render_config(self, pem: Path) -> str:
        assert self.cert is not None
        return f"""# Written by tests/kit/ejabberd.py; ejabberd for tests only.
loglevel: {self.log_level}
log_rotate_count: 0
hosts:
  - {_yaml_str(self.domain)}
certfiles:
  - {_yaml_str(pem)}
ca_file: {_yaml_str(self.cert.ca_file)}
listen:
  -
    port: {self.port}
    ip: {_yaml_str(self.host)}
    module: ejabberd_c2s
    max_stanza_size: 262144
    shaper: none
    access: c2s
    starttls_required: true
auth_method: internal
auth_password_format: scram
acl:
  local:
    user_regexp: ""
access_rules:
  local:
    allow: local
  c2s:
    allow: all
api_permissions:
  "console commands":
    from:
      - ejabberd_ctl
    who: all
    what: "*"
shaper_rules:
  max_user_sessions: 10
modules:
  mod_roster: {{}}
  mod_disco: {{}}
  mod_ping: {{}}
  mod_caps: {{}}
  mod_admin_extra: {{}}
"""

    # --- lifecycle -------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        return {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.workdir),  # .erlang.cookie lives here
            "LANG": "C.UTF-8",
            "ERL_LIBS": ERL_LIBS,
            "ERL_DIST_PORT": str(self.dist_port),
            "ERL_CRASH_DUMP": str(self.workdir / "erl_crash.dump"),
            "ERL_CRASH_DUMP_BYTES": "0",
            "EJABBERD_CONFIG_PATH": str(self.config_path),
            "EJABBERD_LOG_PATH": str(self.log_path),
        }

    def _dist_args(self) -> list[str]:
        return ["-erl_epmd_port", str(self.dist_port), "-start_epmd", "false"]

    def start(self) -> None:
        """Start the node and wait until its c2s port accepts connections (bounded)."""
        if self.running():
            return
        if not port_is_free(self.port, "tcp", self.host, netns=self.netns):
            raise EjabberdError(f"port {self.host}:{self.port} is busy; not starting ejabberd")
        self._mark_log_start()
        self._spawn([ERL, "-sname", self.node, *self._dist_args(), "+K", "true", "+P", "250000",
                     "-noinput", "-mnesia", "dir", f'"{self.spool}"', "-s", "ejabberd"],
                    env=self._env())

    def _ready_line(self) -> str:
        return f"Start accepting TCP connections at {self.host}:{self.port} for ejabberd_c2s"

    # --- accounts --------------------------------------------------------------------------

    def ctl(self, *args: str, timeout: float = CTL_TIMEOUT) -> str:
        """``ejabberdctl ARGS...`` against this node (a hidden node that never listens)."""
        ctl_node = f"ctl{os.getpid()}x{secrets.token_hex(3)}@localhost"
        cmd = self._in_netns([ERL, "-sname", ctl_node, *self._dist_args(), "-dist_listen",
                              "false", "-hidden", "-noinput", "-s", "ejabberd_ctl", "-extra",
                              self.node, *args])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env=self._env(), cwd=self.workdir, stdin=subprocess.DEVNULL,
                                  check=False)
        except subprocess.TimeoutExpired as exc:
            kill_matching(lambda c: ctl_node in c, grace=1.0)
            raise EjabberdError(f"timed out after {timeout}s: ejabberdctl {' '.join(args)}") \
                from exc
        if proc.returncode != 0:
            raise EjabberdError(f"ejabberdctl {args[0] if args else ''} failed "
                                f"({proc.returncode}): {proc.stdout.strip()} "
                                f"{proc.stderr.strip()}")
        return proc.stdout

    def register(self, user: str, password: str) -> str:
        """Create ``user`` (the server must be running); returns the bare JID."""
        self.ctl("register", user, self.domain, password)
        return self.jid(user)


def cleanup_stale_ejabberd() -> list[int]:
    """Kill kit ejabberd nodes whose creating process is gone (their names carry its pid)."""
    return kill_stale(re.compile(r"-sname (?:svpnej|ctl)(\d+)x"), STOP_TIMEOUT)
