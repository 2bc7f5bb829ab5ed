"""Versioned TOML configuration → frozen dataclasses.

Pure: reads files, imports no network or event-loop library. Every error is a
:class:`ConfigError` whose one-line message names the file and the key, so ``check-config``
and ``up`` can print it as it is. An absent optional key takes its default; a present key
with a wrong type or value is an error, never silently replaced (Tailscale conffile:
"absent is not invalid").
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

CONFIG_VERSION = 1
DEFAULT_CONFIG_PATH = Path("/etc/socialvpn/config.toml")
DEFAULT_STATE_DIR = Path("/var/lib/socialvpn")
DEFAULT_WEB_LISTEN = "127.0.0.1:7387"
DEFAULT_XMPP_PORT = 5222
DEFAULT_MTU = 1380
DEFAULT_LINK_KEEPALIVE = 20.0
PASSWORD_ENV = "SOCIALVPN_PASSWORD"
CONFIG_ENV = "SOCIALVPN_CONFIG"

_JID_RE = re.compile(r"[^@/\s\"&'<>:]{1,1023}@[A-Za-z0-9.\-\[\]:]{1,1023}")
_DEVICE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}")
_PORT_RE = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True)
class AccountConfig:
    jid: str
    password_file: Path | None = None

    @property
    def domain(self) -> str:
        return self.jid.split("@", 1)[1]


@dataclass(frozen=True)
class XmppConfig:
    server: Endpoint | None = None
    ca_file: Path | None = None
    allow_plaintext: bool = False
    # Reconnect backoff: first delay, cap (seconds); each delay gets ±20 % jitter. The cap
    # bounds how long after a server outage the agent signs in again (under 10 s with 6 s and
    # the jitter); a refused connection every ~6 s is no load worth saving.
    reconnect_min: float = 1.0
    reconnect_max: float = 6.0
    # XEP-0199 keepalive: ping the server after this many idle seconds; give up after timeout.
    keepalive_interval: float = 60.0
    keepalive_timeout: float = 20.0
    # How long one connection attempt (TCP + TLS + SASL + bind) may take before it is abandoned.
    connect_timeout: float = 20.0


@dataclass(frozen=True)
class DeviceConfig:
    name: str
    state_dir: Path = DEFAULT_STATE_DIR


@dataclass(frozen=True)
class WebConfig:
    listen: Endpoint = field(default_factory=lambda: Endpoint("127.0.0.1", 7387))


@dataclass(frozen=True)
class TurnServer:
    url: str
    username: str
    password: str


@dataclass(frozen=True)
class IceConfig:
    stun: tuple[Endpoint, ...] = ()
    turn: tuple[TurnServer, ...] = ()


@dataclass(frozen=True)
class LinkConfig:
    mtu: int = DEFAULT_MTU
    # False: groups and signalling only, no TUN devices or links (no CAP_NET_ADMIN needed).
    enabled: bool = True
    # WireGuard persistent keepalive (seconds) on links that cross a NAT, below the NAT's UDP
    # timeout so idle links keep their mapping; 0 = off.
    keepalive: float = DEFAULT_LINK_KEEPALIVE


@dataclass(frozen=True)
class Config:
    path: Path
    account: AccountConfig
    xmpp: XmppConfig
    device: DeviceConfig
    web: WebConfig
    ice: IceConfig
    link: LinkConfig
    version: int = CONFIG_VERSION

    @property
    def state_dir(self) -> Path:
        return self.device.state_dir

    @property
    def xmpp_endpoint(self) -> Endpoint | None:
        """Where to connect, or None to resolve the JID's domain (SRV, then port 5222)."""
        return self.xmpp.server


def default_config_path() -> Path:
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG_PATH


def _default_device_name() -> str:
    name = os.uname().nodename.split(".")[0] or "device"
    cleaned = re.sub(r"[^A-Za-z0-9_.\-]", "-", name)[:32].lstrip("-_.")
    return cleaned or "device"


# --- parsing helpers -----------------------------------------------------------------------


class _Section:
    """One TOML table being read; remembers which keys were consumed to report unknown ones."""

    def __init__(self, path: Path, name: str, data: Any) -> None:
        self.path = path
        self.name = name
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: [{name}]: must be a table, not {_tname(data)}")
        self.data: Mapping[str, Any] = data
        self.used: set[str] = set()

    def where(self, key: str) -> str:
        return f"{self.path}: [{self.name}] {key}"

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None,
            required: bool = False) -> Any:
        self.used.add(key)
        if key not in self.data:
            if required:
                raise ConfigError(f"{self.where(key)}: missing (required)")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; never accept it where a number is meant, or vice versa.
        if isinstance(value, bool) and bool not in kinds:
            raise ConfigError(f"{self.where(key)}: expected {_kname(kinds)}, got a boolean")
        if not isinstance(value, kinds):
            raise ConfigError(f"{self.where(key)}: expected {_kname(kinds)}, got {_tname(value)}")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            names = ", ".join(k if re.fullmatch(r"[A-Za-z0-9_\-]+", k) else repr(k)
                              for k in unknown)
            raise ConfigError(f"{self.path}: [{self.name}]: unknown key(s): {names}")


def _tname(value: Any) -> str:
    return {
        str: "a string", int: "an integer", float: "a number", bool: "a boolean",
        list: "an array", dict: "a table",
    }.get(type(value), type(value).__name__)


def _kname(kinds: tuple[type, ...]) -> str:
    return " or ".join(_tname(k()) if k is not dict else "a table" for k in kinds)


def parse_endpoint(text: str, default_port: int, where: str) -> Endpoint:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address → :class:`Endpoint`."""
    text = text.strip()
    if not text:
        raise ConfigError(f"{where}: empty address")
    host, port_s, has_port = text, "", False
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"{where}: {text!r}: unclosed '['")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"{where}: {text!r}: expected ':PORT' after ']'")
            port_s, has_port = rest[1:], True
    elif text.count(":") == 1:
        host, port_s = text.split(":")
        has_port = True
    if has_port:
        if not _PORT_RE.fullmatch(port_s) or not 1 <= int(port_s) <= 65535:
            raise ConfigError(f"{where}: {text!r}: port must be a number from 1 to 65535")
        port = int(port_s)
    else:
        port = default_port
    if not host or any(c.isspace() for c in host) or "/" in host:
        raise ConfigError(f"{where}: {text!r}: not a host name or address")
    return Endpoint(host, port)


def validate_jid(jid: str, where: str) -> str:
    if not _JID_RE.fullmatch(jid) or jid.endswith(".") or ".." in jid.split("@", 1)[1]:
        raise ConfigError(
            f"{where}: {jid!r} is not a bare JID like alice@example.org (no resource, no spaces)"
        )
    local, domain = jid.split("@", 1)
    return f"{local}@{domain.lower()}"


def validate_device_name(name: str, where: str) -> str:
    if not _DEVICE_NAME_RE.fullmatch(name):
        raise ConfigError(
            f"{where}: {name!r}: use 1-32 letters, digits, '-', '_' or '.', starting with a "
            "letter or digit"
        )
    return name


def _positive(section: _Section, key: str, default: float) -> float:
    value = section.get(key, (int, float), default)
    if not value > 0:
        raise ConfigError(f"{section.where(key)}: must be greater than 0")
    return float(value)


def _path(section: _Section, key: str, base: Path) -> Path | None:
    value = section.get(key, str, "")
    if not value:
        return None
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def _turn(path: Path, index: int, item: Any) -> TurnServer:
    sec = _Section(path, f"ice.turn[{index}]", item)
    url = sec.get("url", str, required=True)
    if not re.match(r"^turns?:[^\s]+$", url):
        raise ConfigError(f"{sec.where('url')}: {url!r}: expected turn:HOST[:PORT] or turns:...")
    username = sec.get("username", str, "")
    password = sec.get("password", str, "")
    sec.finish()
    return TurnServer(url, username, password)


# --- the loader ----------------------------------------------------------------------------


def parse_config(text: str, path: Path) -> Config:
    """Parse and validate config ``text`` read from ``path`` (used in messages and as base dir)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    base = path.parent
    top = _Section(path, "top level", data)
    top.where = lambda key: f"{path}: {key}"  # type: ignore[method-assign]
    version = top.get("version", int, required=True)
    if version != CONFIG_VERSION:
        raise ConfigError(
            f"{path}: version: {version} is not supported (this SocialVPN reads version "
            f"{CONFIG_VERSION})"
        )

    acc = _Section(path, "account", top.get("account", dict, required=True))
    jid = validate_jid(acc.get("jid", str, required=True), acc.where("jid"))
    account = AccountConfig(jid=jid, password_file=_path(acc, "password_file", base))
    acc.finish()

    xs = _Section(path, "xmpp", top.get("xmpp", dict, {}))
    server_s = xs.get("server", str, "")
    server = parse_endpoint(server_s, DEFAULT_XMPP_PORT, xs.where("server")) if server_s else None
    allow_plaintext = xs.get("allow_plaintext", bool, False)
    if allow_plaintext and (server is None or not server.is_loopback):
        raise ConfigError(
            f"{xs.where('allow_plaintext')}: plaintext is only allowed for a test server on "
            "loopback: set [xmpp] server to 127.0.0.1:PORT or remove allow_plaintext"
        )
    reconnect_min = _positive(xs, "reconnect_min", XmppConfig.reconnect_min)
    reconnect_max = _positive(xs, "reconnect_max", XmppConfig.reconnect_max)
    if reconnect_max < reconnect_min:
        raise ConfigError(f"{xs.where('reconnect_max')}: must not be less than reconnect_min")
    xmpp = XmppConfig(
        server=server,
        ca_file=_path(xs, "ca_file", base),
        allow_plaintext=allow_plaintext,
        reconnect_min=reconnect_min,
        reconnect_max=reconnect_max,
        keepalive_interval=_positive(xs, "keepalive_interval", 60.0),
        keepalive_timeout=_positive(xs, "keepalive_timeout", 20.0),
        connect_timeout=_positive(xs, "connect_timeout", 20.0),
    )
    xs.finish()

    ds = _Section(path, "device", top.get("device", dict, {}))
    name = validate_device_name(ds.get("name", str, _default_device_name()), ds.where("name"))
    state_dir = _path(ds, "state_dir", base) or DEFAULT_STATE_DIR
    device = DeviceConfig(name=name, state_dir=state_dir)
    ds.finish()

    ws = _Section(path, "web", top.get("web", dict, {}))
    listen = parse_endpoint(ws.get("listen", str, DEFAULT_WEB_LISTEN), 7387, ws.where("listen"))
    web = WebConfig(listen=listen)
    ws.finish()

    ics = _Section(path, "ice", top.get("ice", dict, {}))
    stun_list = ics.get("stun", list, [])
    stun = []
    for i, s in enumerate(stun_list):
        if not isinstance(s, str):
            raise ConfigError(f"{ics.where('stun')}[{i}]: expected a string, got {_tname(s)}")
        stun.append(parse_endpoint(s, 3478, f"{ics.where('stun')}[{i}]"))
    turn_list = ics.get("turn", list, [])
    turn = tuple(_turn(path, i, t) for i, t in enumerate(turn_list))
    ice = IceConfig(stun=tuple(stun), turn=turn)
    ics.finish()

    ls = _Section(path, "link", top.get("link", dict, {}))
    mtu = ls.get("mtu", int, DEFAULT_MTU)
    if not 1280 <= mtu <= 9000:
        raise ConfigError(f"{ls.where('mtu')}: {mtu} is outside 1280..9000")
    keepalive = ls.get("keepalive", (int, float), DEFAULT_LINK_KEEPALIVE)
    if isinstance(keepalive, bool) or not 0 <= keepalive <= 3600:
        raise ConfigError(f"{ls.where('keepalive')}: {keepalive} is outside 0..3600 seconds")
    link = LinkConfig(mtu=mtu, enabled=ls.get("enabled", bool, True), keepalive=float(keepalive))
    ls.finish()

    top.finish()
    return Config(path=path, account=account, xmpp=xmpp, device=device, web=web, ice=ice,
                  link=link, version=version)


def load_config(path: Path | None = None) -> Config:
    path = path or default_config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such config file (run `socialvpn init --jid JID` to make one)"
        ) from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied reading the config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: the file is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_config(text, path)


def _read_text_file(path: Path, where: str) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{where}: {path}: no such file") from None
    except PermissionError:
        raise ConfigError(f"{where}: {path}: permission denied") from None
    except IsADirectoryError:
        raise ConfigError(f"{where}: {path}: is a directory") from None
    except OSError as exc:
        raise ConfigError(f"{where}: {path}: cannot read: {exc.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: {path}: not UTF-8 text") from None


def _read_secret_file(path: Path, where: str) -> str:
    secret = _read_text_file(path, where).rstrip("\r\n")
    if not secret:
        raise ConfigError(f"{where}: {path}: the file is empty")
    if "\n" in secret:
        raise ConfigError(f"{where}: {path}: must hold the password on a single line")
    return secret


def read_password(cfg: Config, env: Mapping[str, str] | None = None) -> str:
    """The account password: ``password_file`` if set, else ``$SOCIALVPN_PASSWORD``."""
    env = os.environ if env is None else env
    where = f"{cfg.path}: [account] password_file"
    if cfg.account.password_file is not None:
        return _read_secret_file(cfg.account.password_file, where)
    if env.get(PASSWORD_ENV):
        return env[PASSWORD_ENV]
    raise ConfigError(
        f"{where}: not set, and ${PASSWORD_ENV} is empty: the account needs a password"
    )


def check_files(cfg: Config, env: Mapping[str, str] | None = None) -> list[str]:
    """Everything ``up`` will need from disk. Raises on errors; returns warnings."""
    warnings: list[str] = []
    read_password(cfg, env)
    if cfg.xmpp.ca_file is not None:
        where = f"{cfg.path}: [xmpp] ca_file"
        pem = _read_text_file(cfg.xmpp.ca_file, where)
        if "-----BEGIN CERTIFICATE-----" not in pem:
            raise ConfigError(f"{where}: {cfg.xmpp.ca_file}: holds no PEM certificate")
    pw = cfg.account.password_file
    if pw is not None:
        mode = pw.stat().st_mode & 0o777
        if mode & 0o077:
            warnings.append(
                f"{cfg.path}: [account] password_file: {pw} is readable by others "
                f"(mode {mode:o}); run chmod 600 {pw}"
            )
    try:
        mode = cfg.path.stat().st_mode & 0o777
        if mode & 0o022:
            warnings.append(f"{cfg.path}: writable by others (mode {mode:o}); run chmod 600")
    except OSError:
        pass
    return warnings


# --- writing (init) ------------------------------------------------------------------------


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n",
                 "\f": "\\f", "\r": "\\r"}


def _toml_str(value: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped, the rest as is
    (TOML has no surrogate escapes, so characters beyond U+FFFF are written literally)."""
    out = []
    for ch in value:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        elif 0xD800 <= ord(ch) <= 0xDFFF:
            raise ConfigError(f"{value!r}: contains a lone surrogate, not valid text")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'



def render_config(
    *,
    jid: str,
    password_file: Path | None,
    server: str | None,
    ca_file: Path | None,
    allow_plaintext: bool,
    device_name: str,
    state_dir: Path,
) -> str:
    """The TOML that ``init`` writes; every key the person chose, the rest documented."""
    lines = [
        "# SocialVPN configuration; `socialvpn check-config` validates it.",
        "# Every key, its default and its meaning: config/config.example.toml.",
        f"version = {CONFIG_VERSION}",
        "",
        "[account]",
        f"jid = {_toml_str(jid)}",
    ]
    if password_file is not None:
        lines.append(f"password_file = {_toml_str(str(password_file))}")
    else:
        lines.append(f"# password: from ${PASSWORD_ENV} (no password_file set)")
    lines += ["", "[xmpp]"]
    if server:
        lines.append(f"server = {_toml_str(server)}")
    if ca_file is not None:
        lines.append(f"ca_file = {_toml_str(str(ca_file))}")
    if allow_plaintext:
        lines.append("allow_plaintext = true")
    lines += [
        "",
        "[device]",
        f"name = {_toml_str(device_name)}",
        f"state_dir = {_toml_str(str(state_dir))}",
        "",
    ]
    return "\n".join(lines)
