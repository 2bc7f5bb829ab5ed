"""Watch the host's links and addresses over netlink (pyroute2) and report when the set of
addresses the links could use changes: the laptop moved to another network, DHCP gave a new
lease, a cable came back, someone ran ``ip addr``.

What counts (:func:`usable_addresses`): addresses on interfaces that are up, except loopback,
IPv6 link-local, our own ``svpn-*`` TUN devices and every group's overlay networks (a TUN
device or overlay address coming and going is our own doing, never a reason to re-link).
Events arrive in bursts (a link flap is several messages): :class:`Debouncer` waits until they
settle, then the monitor takes a fresh snapshot and calls ``on_change(addresses)`` only if the
set differs from the last one.

Use from one event loop::

    monitor = NetMonitor(on_change, exclude_networks=lambda: ("10.77.0.0/24",))
    await monitor.start()
    ...
    await monitor.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

log = logging.getLogger("socialvpn.net.monitor")

DEBOUNCE = 0.3  # seconds of quiet after the last netlink event before looking
DEBOUNCE_MAX = 1.5  # but never wait longer than this after the first one
WATCH_RETRIES = 30  # consecutive netlink failures (1 s apart) before the watch gives up
EXCLUDED_PREFIXES = ("svpn-", "lo")
IFF_UP = 0x1


# --- the pure part ---------------------------------------------------------------------------


class Debouncer:
    """When to look after a burst of events: ``delay`` after the last one, at most
    ``max_delay`` after the first. Time comes in as ``now``."""

    def __init__(self, delay: float = DEBOUNCE, max_delay: float = DEBOUNCE_MAX) -> None:
        self.delay = delay
        self.max_delay = max(delay, max_delay)
        self._first: float | None = None
        self._last: float | None = None

    def poke(self, now: float) -> None:
        if self._first is None:
            self._first = now
        self._last = now

    def deadline(self) -> float | None:
        if self._first is None or self._last is None:
            return None
        return min(self._last + self.delay, self._first + self.max_delay)

    def due(self, now: float) -> bool:
        """True (once per burst) when the burst has settled; resets for the next one."""
        deadline = self.deadline()
        if deadline is None or now < deadline:
            return False
        self._first = self._last = None
        return True


@dataclass(frozen=True)
class AddressEntry:
    interface: str
    address: str
    up: bool


def usable_addresses(entries: Iterable[AddressEntry],
                     exclude_prefixes: Iterable[str] = EXCLUDED_PREFIXES,
                     exclude_networks: Iterable[str] = ()) -> frozenset[str]:
    """The addresses ICE and the links may use, from (interface, address, up) entries."""
    prefixes = tuple(exclude_prefixes)
    networks = [ipaddress.ip_network(n, strict=False) for n in exclude_networks]
    out = set()
    for entry in entries:
        if not entry.up or entry.interface.startswith(prefixes):
            continue
        try:
            ip = ipaddress.ip_address(entry.address)
        except ValueError:
            continue
        if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
            continue
        if any(ip.version == n.version and ip in n for n in networks):
            continue
        out.add(str(ip))
    return frozenset(out)


# --- the netlink adapter ---------------------------------------------------------------------


class NetMonitor:
    """Netlink watch of links and addresses in this process's network namespace."""

    def __init__(self, on_change: Callable[[frozenset[str]], None], *,
                 exclude_networks: Callable[[], Iterable[str]] = tuple,
                 exclude_prefixes: Iterable[str] = EXCLUDED_PREFIXES,
                 debounce: float = DEBOUNCE, debounce_max: float = DEBOUNCE_MAX) -> None:
        self.on_change = on_change
        self.exclude_networks = exclude_networks
        self.exclude_prefixes = tuple(exclude_prefixes)
        self.debouncer = Debouncer(debounce, debounce_max)
        self.addresses: frozenset[str] = frozenset()
        self.changes = 0
        self.events = 0
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._ipr: object | None = None
        self._pending: set[asyncio.Task[None]] = set()

    async def snapshot(self) -> frozenset[str]:
        from pyroute2 import AsyncIPRoute

        ipr = AsyncIPRoute()
        try:
            links = {}
            async for msg in await ipr.get_links():
                links[msg.get("index")] = (msg.get_attr("IFLA_IFNAME") or "",
                                           bool(msg.get("flags", 0) & IFF_UP))
            entries = []
            async for msg in await ipr.get_addr():
                name, up = links.get(msg.get("index"), ("", False))
                address = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
                if address:
                    entries.append(AddressEntry(name, address, up))
        finally:
            with contextlib.suppress(Exception):
                ipr.close()
        return usable_addresses(entries, self.exclude_prefixes, self.exclude_networks())

    async def start(self) -> None:
        """Take the first snapshot and start watching (errors are logged: the agent runs on
        without a monitor, links then recover by consent loss and re-signalling)."""
        from pyroute2 import AsyncIPRoute
        from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR, RTMGRP_LINK

        self.addresses = await self.snapshot()
        ipr = AsyncIPRoute()
        try:
            await ipr.bind(groups=RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)
        except Exception:
            ipr.close()
            raise
        self._ipr = ipr
        self._task = asyncio.get_running_loop().create_task(self._watch(ipr), name="netmon")
        log.info("watching host addresses: %s", ", ".join(sorted(self.addresses)) or "none")

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        pending, self._pending = list(self._pending), set()
        for task in pending:  # a settle in flight must not report a change after stop
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self._ipr is not None:
            with contextlib.suppress(Exception):
                self._ipr.close()  # type: ignore[attr-defined]
            self._ipr = None

    async def _watch(self, ipr: object) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            try:
                async for msg in ipr.get():  # type: ignore[attr-defined]
                    failures = 0
                    if msg.get("event") in ("RTM_NEWADDR", "RTM_DELADDR", "RTM_NEWLINK",
                                            "RTM_DELLINK"):
                        self.events += 1
                        self.debouncer.poke(loop.time())
                        self._schedule(loop)
            except asyncio.CancelledError:
                raise
            except Exception:
                failures += 1
                if failures > WATCH_RETRIES:
                    log.error("netlink watch failed %d times; network changes are no longer "
                              "followed", failures)
                    return
                log.exception("netlink watch failed; retrying in 1 s")
                await asyncio.sleep(1.0)

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        deadline = self.debouncer.deadline()
        if deadline is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(deadline, self._spawn_settled, loop)

    def _spawn_settled(self, loop: asyncio.AbstractEventLoop) -> None:
        task = loop.create_task(self._settled())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _settled(self) -> None:
        loop = asyncio.get_running_loop()
        if not self.debouncer.due(loop.time()):
            self._schedule(loop)
            return
        try:
            addresses = await self.snapshot()
        except Exception:
            log.exception("reading host addresses failed")
            return
        if addresses == self.addresses:
            return
        log.info("host addresses changed: %s -> %s", ", ".join(sorted(self.addresses)) or "none",
                 ", ".join(sorted(addresses)) or "none")
        self.addresses = addresses
        self.changes += 1
        try:
            self.on_change(addresses)
        except Exception:
            log.exception("network change handler failed")
