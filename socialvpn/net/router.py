"""Declarative, idempotent OS network configuration (the only pyroute2 user).

The agent says what one interface should look like (:class:`InterfaceSpec`: MTU, addresses,
extra routes) and :meth:`Router.apply` converges the kernel to it, changing only the
difference; applying the same spec again changes nothing (Tailscale ``router.Set``, STYLE C.7).
``socialvpn cleanup`` calls :meth:`Router.cleanup`, which removes every interface under our
prefix and every route through it.

What "ours" means
-----------------
* Interfaces: those whose name starts with the prefix (``svpn-``). The router never creates
  interfaces; the TUN device (:mod:`.tun`) does, and ``apply`` refuses a missing one.
* Addresses on such an interface: all of them, except IPv6 link-local ones (``fe80::/10``),
  which the kernel makes by itself and which are left alone unless the spec names them.
* Routes: routes we add carry ``proto`` :data:`RTPROT_SOCIALVPN` in the main table, so stale
  ones can be told from the kernel's and an operator's. A spec route that is already present
  on the interface in the main table (for example the connected prefix of an address, which
  the kernel adds with ``proto kernel``) counts as present and is not added twice.

Every method opens its own short-lived netlink socket, so a :class:`Router` can be used from
any thread. pyroute2's synchronous API cannot run on a thread whose asyncio loop is running
(it calls ``run_until_complete``); on such a thread the work is done on a helper thread and the
call still blocks. From asyncio code prefer ``await asyncio.to_thread(router.apply, spec)``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from socket import AF_INET, AF_INET6
from typing import Any, Protocol, TypeVar, runtime_checkable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..errors import SocialVPNError
from .tun import validate_ifname

DEFAULT_PREFIX = "svpn-"
"""Every interface the agent makes is named ``svpn-<group>``."""

RTPROT_SOCIALVPN = 77
"""Routing protocol number on the routes we add (``ip route`` shows ``proto 77``); unassigned
in iproute2's ``rt_protos``."""

RT_TABLE_MAIN = 254
RT_TABLE_LOCAL = 255
RTPROT_KERNEL = 2
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RTN_UNICAST = 1
IFF_UP = 0x1
MIN_MTU = 68
MIN_MTU_IPV6 = 1280
MAX_MTU = 65535

_T = TypeVar("_T")


class RouterError(SocialVPNError):
    """The kernel refused a change, or the interface to configure does not exist."""


@dataclass(frozen=True)
class InterfaceSpec:
    """The desired state of one interface. Values are validated and canonicalised.

    ``addresses``: interface addresses in CIDR form (``"10.77.0.1/24"``, ``"fd00::1/64"``).
    ``routes``: prefixes (host bits clear) routed through the interface in addition to the
    connected prefixes of the addresses, e.g. ``("10.88.0.0/16", "fd01::/64")``.
    """

    name: str
    mtu: int = 1380
    addresses: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        validate_ifname(self.name)
        if isinstance(self.addresses, str) or isinstance(self.routes, str):
            raise TypeError(f"{self.name}: addresses and routes must be tuples of strings")
        addresses = tuple(dict.fromkeys(_canonical_interface(a) for a in self.addresses))
        routes = tuple(dict.fromkeys(_canonical_network(r) for r in self.routes))
        if not isinstance(self.mtu, int) or not MIN_MTU <= self.mtu <= MAX_MTU:
            raise ValueError(
                f"{self.name}: MTU must be an integer in {MIN_MTU}..{MAX_MTU}, got {self.mtu!r}"
            )
        if self.mtu < MIN_MTU_IPV6 and any(":" in x for x in addresses + routes):
            raise ValueError(
                f"{self.name}: IPv6 needs an MTU of at least {MIN_MTU_IPV6}, got {self.mtu}"
            )
        object.__setattr__(self, "addresses", addresses)
        object.__setattr__(self, "routes", routes)


def _canonical_interface(text: str) -> str:
    if not isinstance(text, str) or "/" not in text:
        raise ValueError(f"address {text!r} must be in CIDR form, e.g. 10.77.0.1/24")
    try:
        return ipaddress.ip_interface(text).with_prefixlen
    except ValueError as exc:
        raise ValueError(f"bad interface address {text!r}: {exc}") from None


def _canonical_network(text: str) -> str:
    if not isinstance(text, str):
        raise ValueError(f"route {text!r} must be a string prefix, e.g. 10.88.0.0/16")
    try:
        return ipaddress.ip_network(text, strict=True).with_prefixlen
    except ValueError as exc:
        raise ValueError(f"bad route prefix {text!r}: {exc}") from None


def connected_prefixes(addresses: Iterable[str]) -> set[str]:
    """Prefixes the kernel routes by itself for these interface addresses (not /32, /128)."""
    out = set()
    for text in addresses:
        iface = ipaddress.ip_interface(text)
        if iface.network.prefixlen < iface.max_prefixlen:
            out.add(iface.network.with_prefixlen)
    return out


def is_kernel_link_local(address: str) -> bool:
    """True for an IPv6 link-local interface address (left alone unless the spec has it)."""
    return ipaddress.ip_interface(address).ip.is_link_local and ":" in address


# Change records: what apply/remove/cleanup report (and FakeRouter reports the same way).
def change_mtu(name: str, mtu: int) -> str:
    return f"mtu {mtu} dev {name}"


def change_up(name: str) -> str:
    return f"up dev {name}"


def change_addr(op: str, address: str, name: str) -> str:
    return f"addr {op} {address} dev {name}"


def change_route(op: str, prefix: str, name: str) -> str:
    return f"route {op} {prefix} dev {name}"


def change_link_del(name: str) -> str:
    return f"link del {name}"


def check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or len(prefix) < 2:
        raise ValueError(f"refusing an interface prefix this broad: {prefix!r}")
    return prefix


@runtime_checkable
class RouterAPI(Protocol):
    """The OS configuration the agent needs (:class:`Router`, ``fake.FakeRouter``).

    Every method returns the changes it made, as ``change_*`` strings (empty: nothing to do).
    """

    def apply(self, spec: InterfaceSpec) -> list[str]: ...

    def remove(self, name: str) -> list[str]: ...

    def cleanup(self, prefix: str = DEFAULT_PREFIX) -> list[str]: ...

    def interfaces(self, prefix: str = DEFAULT_PREFIX) -> list[str]: ...

    def close(self) -> None: ...


class Router:
    """Applies :class:`InterfaceSpec` with pyroute2 in one network namespace.

    ``netns``: a named namespace (``/run/netns/NAME``) to work in instead of the calling
    process's own; it must exist (it is never created).
    """

    def __init__(self, netns: str | None = None) -> None:
        self._netns = netns
        self._closed = False

    def __repr__(self) -> str:
        return f"Router(netns={self._netns!r})"

    # --- public API -------------------------------------------------------------------------

    def apply(self, spec: InterfaceSpec) -> list[str]:
        """Converge interface ``spec.name`` to ``spec``; returns the changes made."""
        return self._run(lambda ipr: self._apply(ipr, spec))

    def remove(self, name: str) -> list[str]:
        """Delete interface ``name`` and the routes through it; ``[]`` if it does not exist."""
        validate_ifname(name)
        return self._run(lambda ipr: self._remove(ipr, name))

    def cleanup(self, prefix: str = DEFAULT_PREFIX) -> list[str]:
        """Delete every interface named ``prefix*`` and every route through one. Idempotent."""
        check_prefix(prefix)

        def work(ipr: IPRoute) -> list[str]:
            changes: list[str] = []
            for name in self._names(ipr, prefix):
                changes += self._remove(ipr, name)
            return changes

        return self._run(work)

    def interfaces(self, prefix: str = DEFAULT_PREFIX) -> list[str]:
        """Names of the interfaces that start with ``prefix``, sorted."""
        return self._run(lambda ipr: self._names(ipr, prefix))

    def close(self) -> None:
        """Nothing stays open between calls; kept for :class:`RouterAPI`. Idempotent."""
        self._closed = True

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- plumbing ---------------------------------------------------------------------------

    def _run(self, work: Callable[[IPRoute], _T]) -> _T:
        if self._closed:
            raise RouterError("router is closed")

        def call() -> _T:
            try:
                with self._open() as ipr:
                    return work(ipr)
            except NetlinkError as exc:
                raise RouterError(f"netlink: {exc}") from exc

        if not _loop_running():
            return call()
        result: list[_T] = []
        errors: list[BaseException] = []

        def target() -> None:
            try:
                result.append(call())
            except BaseException as exc:  # re-raised on the caller's thread
                errors.append(exc)

        thread = threading.Thread(target=target, name="svpn-router", daemon=True)
        thread.start()
        thread.join()
        if errors:
            raise errors[0]
        return result[0]

    def _open(self) -> IPRoute:
        if self._netns is None:
            return IPRoute()
        try:
            return IPRoute(netns=self._netns, flags=0)
        except FileNotFoundError as exc:
            raise RouterError(f"network namespace {self._netns} does not exist") from exc

    @staticmethod
    def _names(ipr: IPRoute, prefix: str) -> list[str]:
        names = (link.get("ifname") or "" for link in ipr.get_links())
        return sorted(n for n in names if n.startswith(prefix))

    @staticmethod
    def _index(ipr: IPRoute, name: str) -> int | None:
        found = ipr.link_lookup(ifname=name)
        return found[0] if found else None

    def _apply(self, ipr: IPRoute, spec: InterfaceSpec) -> list[str]:
        name = spec.name
        index = self._index(ipr, name)
        if index is None:
            raise RouterError(f"interface {name} does not exist (open its TUN device first)")
        changes: list[str] = []
        link = ipr.get_links(index)[0]
        if link.get("mtu") != spec.mtu:
            self._call(ipr.link, "set", f"set MTU {spec.mtu} on {name}", index=index,
                       mtu=spec.mtu)
            changes.append(change_mtu(name, spec.mtu))
        if not link["flags"] & IFF_UP:
            self._call(ipr.link, "set", f"set {name} up", index=index, state="up")
            changes.append(change_up(name))

        # Addresses: remove the stale first (an IPv6 address with a new prefix length is the
        # same key to the kernel), then re-read (removing an IPv4 primary address also drops
        # its secondaries) and add what is missing. Removing the last IPv4 address makes the
        # kernel flush every IPv4 route through the link, so routes are read only afterwards.
        desired = set(spec.addresses)
        for address in sorted(self._addresses(ipr, index) - desired):
            if is_kernel_link_local(address):
                continue
            ip, _, plen = address.partition("/")
            self._call(ipr.addr, "del", f"remove {address} from {name}", index=index,
                       address=ip, prefixlen=int(plen))
            changes.append(change_addr("del", address, name))
        present = self._addresses(ipr, index)
        for address in spec.addresses:
            if address in present:
                continue
            ip, _, plen = address.partition("/")
            self._call(ipr.addr, "add", f"add {address} to {name}", index=index, address=ip,
                       prefixlen=int(plen))
            changes.append(change_addr("add", address, name))

        # Routes: remove our stale ones, add the missing ones (anyone's counts as present).
        wanted = set(spec.routes)
        routes = self._routes(ipr, index)
        for prefix, route in sorted(routes.items()):
            if prefix in wanted or route.get("proto") != RTPROT_SOCIALVPN:
                continue
            self._del_route(ipr, route, f"remove route {prefix} from {name}")
            changes.append(change_route("del", prefix, name))
        for prefix in spec.routes:
            if prefix in routes:
                continue
            net = ipaddress.ip_network(prefix)
            v4 = net.version == 4
            self._call(
                ipr.route, "add", f"add route {prefix} via {name}",
                dst=str(net.network_address), dst_len=net.prefixlen, oif=index,
                family=AF_INET if v4 else AF_INET6, proto=RTPROT_SOCIALVPN,
                table=RT_TABLE_MAIN, scope=RT_SCOPE_LINK if v4 else RT_SCOPE_UNIVERSE,
            )
            changes.append(change_route("add", prefix, name))
        return changes

    def _remove(self, ipr: IPRoute, name: str) -> list[str]:
        index = self._index(ipr, name)
        if index is None:
            return []
        changes: list[str] = []
        # Routes through the interface that are not the kernel's own (those go with the link),
        # in every table but "local". Deleting them first keeps the report literal.
        for route in _routes_via(ipr, index):
            table = route.get_attr("RTA_TABLE") or route.get("table")
            if route.get("proto") == RTPROT_KERNEL or table == RT_TABLE_LOCAL:
                continue
            prefix = _route_prefix(route)
            if self._del_route(ipr, route, f"remove route {prefix} from {name}"):
                changes.append(change_route("del", prefix, name))
        try:
            ipr.link("del", index=index)
        except NetlinkError as exc:
            if exc.code != 19:  # ENODEV: gone meanwhile, which is what we wanted
                raise RouterError(f"cannot delete {name}: {exc}") from exc
            return changes
        changes.append(change_link_del(name))
        return changes

    @staticmethod
    def _addresses(ipr: IPRoute, index: int) -> set[str]:
        out = set()
        for msg in ipr.get_addr(index=index):
            family = msg.get("family")
            if family == AF_INET:
                ip = msg.get("local") or msg.get("address")
            elif family == AF_INET6:
                ip = msg.get("address")
            else:
                continue
            if ip:
                out.add(ipaddress.ip_interface(f"{ip}/{msg['prefixlen']}").with_prefixlen)
        return out

    @staticmethod
    def _routes(ipr: IPRoute, index: int) -> dict[str, Any]:
        """Unicast routes of the main table through ``index``, by canonical prefix."""
        out: dict[str, Any] = {}
        for route in _routes_via(ipr, index):
            table = route.get_attr("RTA_TABLE") or route.get("table")
            if table != RT_TABLE_MAIN or route.get("type") != RTN_UNICAST:
                continue
            prefix = _route_prefix(route)
            # keep ours when a prefix is there twice (e.g. ours and the kernel's)
            if prefix not in out or route.get("proto") == RTPROT_SOCIALVPN:
                out[prefix] = route
        return out

    @staticmethod
    def _del_route(ipr: IPRoute, route: Any, what: str) -> bool:
        family = route.get("family")
        dst = route.get("dst") or ("0.0.0.0" if family == AF_INET else "::")
        kwargs: dict[str, Any] = {
            "dst": dst, "dst_len": route["dst_len"], "family": family,
            "oif": route.get("oif"), "proto": route.get("proto"),
            "table": route.get_attr("RTA_TABLE") or route.get("table"),
            "tos": route.get("tos", 0), "scope": route.get("scope", RT_SCOPE_UNIVERSE),
        }
        priority = route.get("priority")
        if priority is not None:
            kwargs["priority"] = priority
        gateway = route.get("gateway")
        if gateway is not None:
            kwargs["gateway"] = gateway
        try:
            ipr.route("del", **kwargs)
        except NetlinkError as exc:
            if exc.code in (3, 19):  # ESRCH/ENODEV: already gone
                return False
            raise RouterError(f"cannot {what}: {exc}") from exc
        return True

    @staticmethod
    def _call(method: Callable[..., Any], command: str, what: str, **kwargs: Any) -> None:
        try:
            method(command, **kwargs)
        except NetlinkError as exc:
            raise RouterError(f"cannot {what}: {exc}") from exc


def _routes_via(ipr: IPRoute, index: int) -> list[Any]:
    """Every IPv4 and IPv6 route (all tables) whose output interface is ``index``."""
    return [
        route
        for family in (AF_INET, AF_INET6)
        for route in ipr.get_routes(family=family, oif=index)
        if route.get("family") == family
    ]


def _route_prefix(route: Any) -> str:
    family = route.get("family")
    dst = route.get("dst") or ("0.0.0.0" if family == AF_INET else "::")
    return ipaddress.ip_network(f"{dst}/{route['dst_len']}", strict=False).with_prefixlen


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
