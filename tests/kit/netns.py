"""Network namespaces, veth links, NAT routers and topologies for integration tests.

Everything the kit makes is named under a per-run prefix (``svt<pid>-<lab>-``) and every
namespace records its owner pid in ``/run/svpn-kit/netns/<name>`` *before* it exists, so
``cleanup_stale()`` can remove what a crashed run left behind without touching a run that is
still going. Interfaces are created directly inside their namespaces (never in the root
namespace), so their names only need to be unique per namespace and stay <= 15 characters.

Typical use::

    with NetLab() as lab:
        topo = lab.topology()
        a = topo.add_site("a", nat="eim")          # a — nat_a — pub
        a.host.run(["ping", "-c1", "-W1", topo.service_ip])

Addressing of a :class:`Topology` (all inside namespaces this kit made):

* ``pub`` ("the internet") owns the service address ``198.18.0.1/32`` on its loopback; run
  Prosody/coturn there. Site ``k`` (1..254) is linked to ``pub`` by ``198.18.k.0/24``:
  ``pub`` is ``.1``, the site's public side (router WAN or the host itself) is ``.2``.
* A NATed site's LAN is ``10.k.0.0/24`` (router ``.1``, host ``.2``) unless given.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import itertools
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

RUN_PREFIX = f"svt{os.getpid()}-"
"""Prefix of every namespace made by this process. The full pid (not pid % 10000) keeps two
runs that overlap from ever picking the same names; namespace names, unlike interface names,
are not limited to 15 characters."""

KIT_PREFIX = "svt"
"""Prefix shared by every run of the kit (``cleanup_stale`` only looks at these)."""

OWNER_DIR = Path("/run/svpn-kit/netns")
NETNS_DIR = Path("/run/netns")
IFNAMSIZ = 15  # usable characters of a Linux interface name

NatKind = Literal["eim", "symmetric"]
"""``eim``: endpoint-independent mapping (``masquerade``, a home router);
``symmetric``: a new random port per destination (``masquerade random``)."""

NAT_TABLE = "svpn_nat"
UNSOLICITED_COUNTER = "unsolicited_udp"
BLOCKED_COUNTER = "blocked_inbound"

SERVICE_IP = "198.18.0.1"

_CLONE_NEWNET = 0x40000000
_DEFAULT_TIMEOUT = 10.0
_lab_seq = itertools.count(1)
_T = TypeVar("_T")


class NetnsError(RuntimeError):
    """A namespace command failed; the message names the command and its stderr."""


def _cmd_text(cmd: Sequence[str]) -> str:
    return " ".join(cmd)


def _run(
    cmd: Sequence[str],
    *,
    check: bool = True,
    timeout: float = _DEFAULT_TIMEOUT,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            list(cmd),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"timed out after {timeout}s: {_cmd_text(cmd)}") from exc
    if check and proc.returncode != 0:
        detail = proc.stderr.strip() or proc.stdout.strip()
        raise NetnsError(f"exit {proc.returncode}: {_cmd_text(cmd)}: {detail}")
    return proc


def _pid_alive(pid: int) -> bool:
    """True for a running process; zombies (exited, not yet reaped) count as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # the state letter follows the ")" that ends the command name
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _libc_setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def in_netns(name: str, fn: Callable[[], _T]) -> _T:
    """Call ``fn`` on a short-lived thread that has joined network namespace ``name``.

    Sockets created by ``fn`` stay in that namespace after the thread ends, so the calling
    process (and its asyncio loop) can use them: ``loop.create_datagram_endpoint(sock=...)``.
    """
    result: list[_T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _libc_setns(fd)
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:  # handed to the caller below
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join(_DEFAULT_TIMEOUT)
    if thread.is_alive():
        raise NetnsError(f"in_netns({name}) did not finish in {_DEFAULT_TIMEOUT}s")
    if errors:
        raise errors[0]
    return result[0]


def list_netns() -> list[str]:
    """Names of all named network namespaces."""
    out = _run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_pids(pids: Sequence[int], *, grace: float = 2.0) -> None:
    me = os.getpid()
    targets = [p for p in pids if p != me and p > 1]
    for pid in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_pid_alive(p) for p in targets):
        time.sleep(0.02)
    for pid in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _netns_pids(name: str) -> list[int]:
    proc = _run(["ip", "netns", "pids", name], check=False, timeout=5.0)
    return [int(tok) for tok in proc.stdout.split() if tok.isdigit()]


def delete_netns(name: str) -> None:
    """Kill every process in namespace ``name`` and delete it (no error if it is gone)."""
    if (NETNS_DIR / name).exists():
        for _ in range(3):
            pids = _netns_pids(name)
            if not pids:
                break
            _kill_pids(pids)
        _run(["ip", "netns", "del", name], check=False, timeout=5.0)
    with contextlib.suppress(FileNotFoundError):
        (OWNER_DIR / name).unlink()


def cleanup_prefix(prefix: str) -> list[str]:
    """Delete every namespace whose name starts with ``prefix``; returns the names removed.

    Use for leftovers of a crashed run whose prefix you know. ``prefix`` must be non-trivial.
    """
    if len(prefix) < 3:
        raise ValueError(f"refusing a prefix this broad: {prefix!r}")
    removed = [name for name in list_netns() if name.startswith(prefix)]
    for name in removed:
        delete_netns(name)
    return removed


def cleanup_stale() -> list[str]:
    """Delete kit namespaces whose owner process is gone (safe while other runs are going)."""
    removed: list[str] = []
    for name in list_netns():
        if not name.startswith(KIT_PREFIX):
            continue
        try:
            owner = int((OWNER_DIR / name).read_text().strip())
        except (FileNotFoundError, ValueError):
            continue  # not ours, or made by hand: leave it
        if not _pid_alive(owner):
            delete_netns(name)
            removed.append(name)
    # owner records whose namespace vanished and whose owner is gone
    with contextlib.suppress(FileNotFoundError):
        for record in OWNER_DIR.iterdir():
            if (NETNS_DIR / record.name).exists():
                continue
            try:
                owner = int(record.read_text().strip())
            except (OSError, ValueError):
                owner = 0
            if not owner or not _pid_alive(owner):
                with contextlib.suppress(FileNotFoundError):
                    record.unlink()
    return removed


@dataclass(frozen=True)
class Veth:
    """One veth pair: interface names and addresses (without prefix length) on each side."""

    a: Netns
    a_if: str
    a_ip: str | None
    b: Netns
    b_if: str
    b_ip: str | None


class Netns:
    """A named network namespace that this kit created; deleted by :meth:`delete`."""

    def __init__(self, name: str, short: str) -> None:
        self.name = name
        self.short = short
        self.addresses: dict[str, str] = {}  # interface -> first IPv4/IPv6 address (no prefix)
        self._procs: list[subprocess.Popen[Any]] = []
        self._deleted = False

    @classmethod
    def create(cls, name: str, short: str | None = None) -> Netns:
        """Create namespace ``name`` (recording this process as its owner) with ``lo`` up."""
        if (NETNS_DIR / name).exists():
            raise NetnsError(f"namespace {name} exists already")
        OWNER_DIR.mkdir(parents=True, exist_ok=True)
        (OWNER_DIR / name).write_text(f"{os.getpid()}\n")
        try:
            _run(["ip", "netns", "add", name])
        except NetnsError:
            with contextlib.suppress(FileNotFoundError):
                (OWNER_DIR / name).unlink()
            raise
        ns = cls(name, short or name)
        ns.ip("link", "set", "lo", "up")
        return ns

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    @property
    def exec_prefix(self) -> list[str]:
        """Argv prefix that runs a command inside this namespace."""
        return ["ip", "netns", "exec", self.name]

    @property
    def address(self) -> str:
        """The first address given to any interface of this namespace."""
        if not self.addresses:
            raise NetnsError(f"{self.name} has no address yet")
        return next(iter(self.addresses.values()))

    # --- running things ----------------------------------------------------------------

    def run(
        self,
        cmd: Sequence[str],
        *,
        check: bool = True,
        timeout: float = _DEFAULT_TIMEOUT,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the namespace to completion (bounded by ``timeout``)."""
        return _run([*self.exec_prefix, *cmd], check=check, timeout=timeout, input=input, env=env)

    def popen(
        self,
        cmd: Sequence[str],
        *,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        text: bool = False,
    ) -> subprocess.Popen[Any]:
        """Start ``cmd`` inside the namespace in its own session; killed by :meth:`delete`."""
        proc: subprocess.Popen[Any] = subprocess.Popen(
            [*self.exec_prefix, *cmd],
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            text=text,
            start_new_session=True,
        )
        self._procs.append(proc)
        return proc

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ip -n NAME ARGS...``."""
        return _run(["ip", "-n", self.name, *args], check=check)

    def sysctl(self, key: str, value: str | int) -> None:
        self.run(["sysctl", "-q", "-w", f"{key}={value}"])

    def enable_forwarding(self) -> None:
        """Turn on IPv4 and IPv6 forwarding inside the namespace."""
        self.sysctl("net.ipv4.ip_forward", 1)
        self.sysctl("net.ipv6.conf.all.forwarding", 1)

    def add_address(self, ifname: str, cidr: str) -> str:
        """Add ``cidr`` (e.g. ``10.1.0.2/24``) to ``ifname``; returns the bare address."""
        ipaddress.ip_interface(cidr)  # validate early, with a clear error
        self.ip("addr", "add", cidr, "dev", ifname)
        bare = cidr.split("/")[0]
        self.addresses.setdefault(ifname, bare)
        return bare

    def link_up(self, ifname: str) -> None:
        self.ip("link", "set", ifname, "up")

    def default_route(self, via: str, dev: str | None = None) -> None:
        args = ["route", "replace", "default", "via", via]
        if dev is not None:
            args += ["dev", dev]
        self.ip(*args)

    def add_sink_default_route(self, cidr: str = "100.127.255.1/30") -> None:
        """A default route into a veth that goes nowhere: sends to unknown networks succeed
        (and vanish) instead of failing with ENETUNREACH (coturn needs this, see TESTBED.md)."""
        iface = ipaddress.ip_interface(cidr)
        gateway = str(next(h for h in iface.network.hosts() if h != iface.ip))
        self.ip("link", "add", "sink0", "type", "veth", "peer", "name", "sink1")
        self.add_address("sink0", cidr)
        self.link_up("sink0")
        self.link_up("sink1")
        self.ip(
            "neigh",
            "replace",
            gateway,
            "lladdr",
            "02:00:00:00:00:01",
            "dev",
            "sink0",
            "nud",
            "permanent",
        )
        self.default_route(gateway, "sink0")

    def nft(self, ruleset: str) -> None:
        """Load an nftables ruleset (``nft -f -``) inside the namespace."""
        self.run(["nft", "-f", "-"], input=ruleset)

    def nft_counter(self, name: str, table: str = NAT_TABLE, family: str = "inet") -> int:
        """Packets counted so far by the named counter ``name`` in ``family table``."""
        out = self.run(["nft", "-j", "list", "counter", family, table, name]).stdout
        for item in json.loads(out).get("nftables", []):
            if "counter" in item:
                return int(item["counter"]["packets"])
        raise NetnsError(f"no counter {name} in {family} {table} of {self.name}")

    def socket(
        self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0
    ) -> socket.socket:
        """A socket that lives in this namespace (usable from the calling process)."""
        return in_netns(self.name, lambda: socket.socket(family, type, proto))

    # --- teardown ------------------------------------------------------------------------

    def pids(self) -> list[int]:
        """Pids of every process whose network namespace is this one."""
        return _netns_pids(self.name)

    def kill_processes(self, grace: float = 2.0) -> None:
        """SIGTERM every process in the namespace, SIGKILL after ``grace`` seconds; reap ours."""
        for _ in range(3):
            pids = self.pids()
            if not pids:
                break
            _kill_pids(pids, grace=grace)
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
        self._procs.clear()

    def exists(self) -> bool:
        return (NETNS_DIR / self.name).exists()

    def delete(self) -> None:
        """Kill its processes and delete the namespace (and its veth ends). Idempotent."""
        if self._deleted:
            return
        self.kill_processes()
        delete_netns(self.name)
        self._deleted = True


def nat_ruleset(wan_if: str, kind: NatKind) -> str:
    """nftables rules that make a namespace a NAT router with WAN interface ``wan_if``.

    * ``postrouting``: ``masquerade`` (eim) or ``masquerade random`` (symmetric) out of WAN.
    * ``input``: drop all UDP that reaches the router itself from WAN. Without it an early
      ICE check from the far side creates a conntrack entry on the router and hole punching
      fails (TESTBED.md). Counted in the named counter ``unsolicited_udp``.
    * ``forward``: from WAN only replies to existing flows get in (like a home router);
      anything else is counted in ``blocked_inbound`` and dropped.
    """
    if kind == "eim":
        masq = "masquerade"
    elif kind == "symmetric":
        masq = "masquerade random"
    else:
        raise ValueError(f"unknown NAT kind {kind!r}")
    return f"""
table inet {NAT_TABLE} {{
    counter {UNSOLICITED_COUNTER} {{ }}
    counter {BLOCKED_COUNTER} {{ }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{wan_if}" {masq}
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "{wan_if}" meta l4proto udp counter name "{UNSOLICITED_COUNTER}" drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{wan_if}" ct state established,related accept
        iifname "{wan_if}" counter name "{BLOCKED_COUNTER}" drop
    }}
}}
"""


def make_nat_router(ns: Netns, wan_if: str, kind: NatKind = "eim") -> None:
    """Turn ``ns`` into a NAT router whose public side is ``wan_if``."""
    ns.enable_forwarding()
    ns.nft(nat_ruleset(wan_if, kind))


@dataclass
class NetLab:
    """Makes namespaces and veth links under one prefix; :meth:`cleanup` removes them all.

    Calling the lab is a shortcut for :meth:`netns`: ``a = lab("a")``.
    """

    prefix: str = field(default_factory=lambda: f"{RUN_PREFIX}{next(_lab_seq)}-")
    namespaces: list[Netns] = field(default_factory=list)

    def netns(self, short: str) -> Netns:
        """A new namespace named ``<prefix><short>``."""
        name = f"{self.prefix}{short}"
        if any(ns.name == name for ns in self.namespaces):
            raise NetnsError(f"namespace {name} already made by this lab")
        ns = Netns.create(name, short)
        self.namespaces.append(ns)
        return ns

    __call__ = netns

    def veth(
        self,
        a: Netns,
        b: Netns,
        *,
        a_addr: str | None = None,
        b_addr: str | None = None,
        a_if: str | None = None,
        b_if: str | None = None,
        mtu: int | None = None,
    ) -> Veth:
        """Link ``a`` and ``b`` with a veth pair made inside ``a`` (ends up; addresses set).

        Default interface names are ``v-<other short name>``; addresses are CIDR strings.
        """
        a_if = a_if or f"v-{b.short}"[:IFNAMSIZ]
        b_if = b_if or f"v-{a.short}"[:IFNAMSIZ]
        for ifname in (a_if, b_if):
            if len(ifname) > IFNAMSIZ:
                raise ValueError(f"interface name longer than {IFNAMSIZ}: {ifname}")
        a.ip("link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name)
        if mtu is not None:
            a.ip("link", "set", a_if, "mtu", str(mtu))
            b.ip("link", "set", b_if, "mtu", str(mtu))
        a_ip = a.add_address(a_if, a_addr) if a_addr else None
        b_ip = b.add_address(b_if, b_addr) if b_addr else None
        a.link_up(a_if)
        b.link_up(b_if)
        return Veth(a=a, a_if=a_if, a_ip=a_ip, b=b, b_if=b_if, b_ip=b_ip)

    def topology(self, *, pub_sink_route: bool = True) -> Topology:
        """A :class:`Topology` whose namespaces belong to this lab."""
        return Topology(self, pub_sink_route=pub_sink_route)

    def cleanup(self) -> None:
        """Kill every process in the lab's namespaces and delete them. Idempotent."""
        errors: list[BaseException] = []
        for ns in reversed(self.namespaces):
            try:
                ns.delete()
            except BaseException as exc:  # keep going; report the first at the end
                errors.append(exc)
        # anything under the prefix that slipped through (e.g. made by hand)
        with contextlib.suppress(NetnsError):
            cleanup_prefix(self.prefix)
        self.namespaces.clear()
        if errors:
            raise errors[0]

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()


@dataclass(frozen=True)
class Site:
    """One host attached to ``pub``, directly or behind its own NAT router."""

    name: str
    host: Netns
    host_ip: str  # the host's own address (LAN address when NATed)
    public_ip: str  # the address ``pub`` sees (router WAN address, or the host's own)
    router: Netns | None = None
    nat: NatKind | None = None

    @property
    def lan_gateway(self) -> str | None:
        return self.router.addresses.get("lan") if self.router else None


class Topology:
    """``a — nat_a — pub — nat_b — b`` style layouts (see the module docstring for addresses).

    ``pub`` forwards between sites, owns ``service_ip`` on its loopback and (by default) has
    a sink default route, so servers there never get ENETUNREACH for private addresses.
    """

    def __init__(self, lab: NetLab, *, pub_sink_route: bool = True) -> None:
        self.lab = lab
        self.pub = lab.netns("pub")
        self.pub.enable_forwarding()
        self.service_ip = SERVICE_IP
        self.pub.add_address("lo", f"{SERVICE_IP}/32")
        if pub_sink_route:
            self.pub.add_sink_default_route()
        self.sites: dict[str, Site] = {}
        self._next = 1

    def add_site(
        self, name: str, nat: NatKind | None = None, *, lan_cidr: str | None = None
    ) -> Site:
        """Add host ``name``, behind a NAT router ``nat_<name>`` unless ``nat`` is None.

        ``lan_cidr`` (e.g. ``192.168.1.0/24``) overrides the LAN; two sites may share one.
        """
        if name in self.sites:
            raise NetnsError(f"site {name} exists")
        k = self._next
        if k > 254:
            raise NetnsError("at most 254 sites")
        self._next += 1
        pub_if = f"p{k}"
        pub_side = f"198.18.{k}.1"
        public = f"198.18.{k}.2"
        if nat is None:
            host = self.lab.netns(name)
            self.lab.veth(
                self.pub,
                host,
                a_if=pub_if,
                b_if="eth0",
                a_addr=f"{pub_side}/24",
                b_addr=f"{public}/24",
            )
            host.default_route(pub_side)
            site = Site(name=name, host=host, host_ip=public, public_ip=public)
        else:
            lan = ipaddress.ip_network(lan_cidr or f"10.{k}.0.0/24")
            hosts = lan.hosts()
            gw, host_ip = str(next(hosts)), str(next(hosts))
            router = self.lab.netns(f"nat_{name}")
            host = self.lab.netns(name)
            self.lab.veth(
                self.pub,
                router,
                a_if=pub_if,
                b_if="wan",
                a_addr=f"{pub_side}/24",
                b_addr=f"{public}/24",
            )
            router.default_route(pub_side)
            self.lab.veth(
                router,
                host,
                a_if="lan",
                b_if="eth0",
                a_addr=f"{gw}/{lan.prefixlen}",
                b_addr=f"{host_ip}/{lan.prefixlen}",
            )
            host.default_route(gw)
            make_nat_router(router, "wan", nat)
            site = Site(
                name=name, host=host, host_ip=host_ip, public_ip=public, router=router, nat=nat
            )
        self.sites[name] = site
        return site
