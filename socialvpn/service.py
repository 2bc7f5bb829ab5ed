"""``socialvpn service install``: write the systemd unit and enable it.

The unit text is :data:`UNIT` (the same as ``config/socialvpn.service`` in the source tree, a unit
test keeps them equal). Installing fills in the real command (the ``socialvpn`` installed next
to the running Python, else ``python -m socialvpn``), the config file and the state directory,
puts a header with a digest of the body on top, and writes it with mode 0644. A unit whose body
no longer matches its digest was changed by hand and is only replaced with ``--force``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import SocialVPNError

UNIT_NAME = "socialvpn.service"
DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
PACKAGE_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
SYSTEMD_RUNTIME_DIR = Path("/run/systemd/system")  # exists iff booted with systemd (sd_booted)
TEMPLATE_COMMAND = "/usr/bin/env socialvpn"
TEMPLATE_CONFIG = "/etc/socialvpn/config.toml"
TEMPLATE_STATE_DIR = "/var/lib/socialvpn"
DIGEST_PREFIX = "# body-sha256: "
# Directories ProtectHome=yes hides from the service.
HOME_DIRS = (Path("/home"), Path("/root"), Path("/run/user"))

UNIT = """\
[Unit]
Description=SocialVPN agent: a private network of your XMPP friends
# Documentation: `socialvpn --help` and `socialvpn COMMAND --help`.
Wants=network-online.target
After=network-online.target

[Service]
# READY=1 once the local API answers and the groups' TUN devices are back; STOPPING=1 on exit.
Type=notify
NotifyAccess=main
ExecStart=/usr/bin/env socialvpn up --config /etc/socialvpn/config.toml
ExecReload=/bin/kill -HUP $MAINPID
# Also after a crash (SIGKILL): nothing of the old run is left behind.
ExecStopPost=-/usr/bin/env socialvpn cleanup --config /etc/socialvpn/config.toml
Restart=on-failure
RestartSec=2
# 2 = bad configuration, 3 = the server refused the password: restarting cannot help.
RestartPreventExitStatus=2 3
TimeoutStopSec=20
StateDirectory=socialvpn
StateDirectoryMode=0700
UMask=0077
# TUN devices, addresses and routes need CAP_NET_ADMIN and nothing else: UDP sockets, the
# XMPP connection, ports above 1023 and the API's Unix socket need no capability.
AmbientCapabilities=CAP_NET_ADMIN
CapabilityBoundingSet=CAP_NET_ADMIN
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
ReadWritePaths=/var/lib/socialvpn
PrivateTmp=yes
DevicePolicy=closed
DeviceAllow=/dev/net/tun rw
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native

[Install]
WantedBy=multi-user.target
"""


def systemd_quote(arg: str) -> str:
    """One command-line word for a unit file: ``%`` and ``$`` escaped, quoted if needed."""
    if not arg or any(ch in arg for ch in "\n\r\0"):
        raise SocialVPNError(f"cannot put {arg!r} on a unit's command line")
    text = arg.replace("%", "%%").replace("$", "$$")
    if any(ch.isspace() or ch in "\"'\\;" for ch in text):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def agent_command(python: str | None = None) -> list[str]:
    """How systemd should run this installation: the ``socialvpn`` console script beside the
    running interpreter (a venv's bin/), else ``python -m socialvpn`` with that interpreter."""
    exe = Path(python or sys.executable)
    script = exe.parent / "socialvpn"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [str(exe), "-m", "socialvpn"]


def _digest(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()


def render_unit(command: Sequence[str], config: Path, state_dir: Path) -> str:
    """The unit for ``command`` (argv of the agent without its subcommand), the absolute
    ``config`` path and ``state_dir``, with a header recording the digest of the body."""
    cmd = " ".join(systemd_quote(a) for a in command)
    cfg = systemd_quote(str(config))
    body = UNIT.replace(f"{TEMPLATE_COMMAND} up --config {TEMPLATE_CONFIG}",
                        f"{cmd} up --config {cfg}")
    body = body.replace(f"{TEMPLATE_COMMAND} cleanup --config {TEMPLATE_CONFIG}",
                        f"{cmd} cleanup --config {cfg}")
    body = body.replace(f"ReadWritePaths={TEMPLATE_STATE_DIR}\n",
                        f"ReadWritePaths={systemd_quote(str(state_dir))}\n")
    header = (f"# Written by `socialvpn service install` (socialvpn {__version__}).\n"
              "# Change settings with a drop-in (`systemctl edit socialvpn`): a unit edited\n"
              "# here is only replaced by `socialvpn service install --force`.\n"
              f"{DIGEST_PREFIX}{_digest(body)}\n")
    return header + body


def is_unmodified(text: str) -> bool:
    """True if ``text`` is a unit this command wrote and nobody edited since."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines[:8]):
        if line.startswith(DIGEST_PREFIX):
            return line[len(DIGEST_PREFIX):].strip() == _digest("".join(lines[i + 1:]))
    return False


def systemd_running() -> bool:
    """Whether this machine was booted with systemd as PID 1 (sd_booted(3))."""
    return SYSTEMD_RUNTIME_DIR.is_dir()


def _pid1() -> str:
    try:
        return Path("/proc/1/comm").read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@dataclass
class InstallResult:
    unit_path: Path
    changed: bool
    systemd: bool
    ran: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"unit": str(self.unit_path), "changed": self.changed, "systemd": self.systemd,
                "ran": self.ran, "warnings": self.warnings}


Runner = Callable[[list[str]], subprocess.CompletedProcess[str]]


def _run_systemctl(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, check=False)


def install(config: Path, state_dir: Path, *, unit_dir: Path = DEFAULT_UNIT_DIR,
            enable: bool = True, now: bool = False, force: bool = False,
            command: Sequence[str] | None = None, booted: bool | None = None,
            files: Sequence[tuple[str, Path]] = (),
            run: Runner = _run_systemctl) -> InstallResult:
    """Write the unit into ``unit_dir`` (idempotent) and, when systemd runs this machine and
    reads ``unit_dir``, reload systemd, enable the unit and (``now``) start or restart it.
    ``files``: (what, path) the agent reads besides the config (password file, CA file), to
    warn about when the unit's sandbox hides them."""
    config = config.expanduser().absolute()
    state_dir = state_dir.expanduser().absolute()
    argv = list(command) if command is not None else agent_command()
    text = render_unit(argv, config, state_dir)
    path = unit_dir / UNIT_NAME
    try:
        old = path.read_text() if path.exists() else None
    except OSError as exc:
        raise SocialVPNError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    if old is not None and old != text and not force and not is_unmodified(old):
        raise SocialVPNError(f"{path} was changed by hand; keep your changes in a drop-in "
                             "(`systemctl edit socialvpn`) or replace it with --force")
    result = InstallResult(path, changed=old != text, systemd=False)
    for p, what in ((config, "the config file"), (state_dir, "the state directory"),
                    (Path(argv[0]), "the agent"), *((p, w) for w, p in files)):
        if any(p == h or h in p.parents for h in HOME_DIRS):
            result.warnings.append(f"{what} ({p}) is under a home directory, which the unit "
                                   "hides (ProtectHome=yes): move it or relax that in a drop-in")
    if result.changed:
        try:
            unit_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except PermissionError:
            raise SocialVPNError(f"{path}: permission denied (run it as root)") from None
        except OSError as exc:
            raise SocialVPNError(f"{path}: cannot write it: {exc.strerror or exc}") from None
        result.messages.append(f"wrote {path}")
    else:
        result.messages.append(f"{path} is up to date")
    result.systemd = systemd_running() if booted is None else booted
    if not result.systemd:
        result.messages.append(
            f"systemd is not running on this machine (PID 1 is {_pid1()}): the unit was "
            "written but not enabled or started; on a systemd machine run `systemctl "
            "daemon-reload && systemctl enable --now socialvpn`")
        return result
    if unit_dir.absolute() not in (DEFAULT_UNIT_DIR, *PACKAGE_UNIT_DIRS):
        result.messages.append(f"{unit_dir} is not a directory systemd loads units from: "
                               "not enabled or started")
        return result
    steps = [["systemctl", "daemon-reload"]]
    if enable:
        steps.append(["systemctl", "enable", UNIT_NAME])
    if now:
        steps.append(["systemctl", "restart" if result.changed else "start", UNIT_NAME])
    for step in steps:
        done = run(step)
        result.ran.append(" ".join(step))
        if done.returncode != 0:
            raise SocialVPNError(f"`{' '.join(step)}` failed ({done.returncode}): "
                                 f"{(done.stderr or done.stdout).strip()}")
    if enable:
        result.messages.append(f"enabled {UNIT_NAME}: it starts on boot")
    if now:
        result.messages.append(f"started {UNIT_NAME}: see `systemctl status socialvpn`")
    elif not enable:
        result.messages.append("not enabled (--no-enable): `systemctl start socialvpn` runs it")
    return result
