"""In-memory twins of the OS-facing pieces of ``net/`` for unit and component tests.

* :class:`FakeTun` behaves like :class:`.tun.TunDevice` (the :class:`.tun.TunIO` protocol)
  without a kernel: two bounded queues, like wireguard-go's ``tun/tuntest`` ChannelTUN.
  ``inject(packet)`` is what the kernel would route into the device (the packet path reads it);
  everything the packet path writes lands in ``written``.
* :class:`FakeRouter` keeps interfaces, addresses and routes in dicts and applies
  :class:`.router.InterfaceSpec` with the same rules and the same change records as
  :class:`.router.Router` (STYLE C.6, Tailscale ``router_fake.go``).

Neither touches the OS, so they need no root and are fast.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from .router import (
    DEFAULT_PREFIX,
    InterfaceSpec,
    RouterError,
    change_addr,
    change_link_del,
    change_mtu,
    change_route,
    change_up,
    check_prefix,
    connected_prefixes,
    is_kernel_link_local,
)
from .tun import DEFAULT_BATCH, DEFAULT_READ_SIZE, TunClosed, validate_ifname

_Buffer = bytes | bytearray | memoryview


class PacketQueue:
    """A bounded FIFO of packets whose getters block until data, a timeout, or :meth:`close`."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._items: collections.deque[bytes] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: bytes, timeout: float | None = None) -> bool:
        """Append ``item``, waiting up to ``timeout`` for room (0: don't wait).

        Returns False if the queue stayed full; raises :class:`TunClosed` once closed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._closed and len(self._items) >= self.capacity:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            if self._closed:
                raise TunClosed("queue is closed")
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None = None) -> bytes:
        """Remove and return the oldest item, waiting up to ``timeout`` seconds.

        Raises ``TimeoutError`` when nothing came and :class:`TunClosed` once closed (a closed
        queue hands out nothing, like a closed device; :meth:`drain` still empties it).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._closed and not self._items:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no packet within {timeout} s")
                self._cond.wait(remaining)
            if self._closed:
                raise TunClosed("queue is closed")
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def get_nowait(self) -> bytes | None:
        with self._cond:
            if self._closed or not self._items:
                return None
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def drain(self) -> list[bytes]:
        """Remove and return everything queued now (also after close)."""
        with self._cond:
            items = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            return items

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class FakeTun:
    """In-memory TUN device (implements :class:`.tun.TunIO`).

    ``read`` blocks until a packet is injected, ``read_timeout`` passes (``TimeoutError``;
    ``None`` waits forever) or :meth:`close` is called (:class:`TunClosed`). ``write`` never
    blocks: when ``written`` is full the packet is dropped and counted, like a kernel queue.
    ``fileno()`` is ``-1``: there is no descriptor to poll.
    """

    def __init__(
        self,
        name: str = "svpn-fake",
        mtu: int = 1380,
        *,
        capacity: int = 1024,
        read_timeout: float | None = None,
    ) -> None:
        self._name = validate_ifname(name)
        self._mtu = mtu
        self.read_timeout = read_timeout
        self.inbound = PacketQueue(capacity)
        """What the kernel would send into the device; fill it with :meth:`inject`."""
        self.written = PacketQueue(capacity)
        """Everything the packet path wrote, oldest first (``written.get(timeout=1)``)."""
        self.dropped_writes = 0
        self._closed = False

    @property
    def name(self) -> str:
        return self._name

    @property
    def mtu(self) -> int:
        return self._mtu

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        return -1

    def __repr__(self) -> str:
        return f"FakeTun({self._name!r}{', closed' if self._closed else ''})"

    # --- the test's side --------------------------------------------------------------------

    def inject(self, packet: _Buffer, timeout: float | None = 1.0) -> None:
        """Make ``packet`` readable (as if the kernel routed it into the device).

        Waits up to ``timeout`` for room; raises ``TimeoutError`` if the reader is stuck.
        """
        if not self.inbound.put(bytes(packet), timeout):
            raise TimeoutError(f"{self._name}: inbound queue stayed full for {timeout} s")

    def take_written(self, timeout: float | None = 1.0) -> bytes:
        """The oldest packet the packet path wrote; ``TimeoutError`` if none comes."""
        return self.written.get(timeout)

    def written_packets(self) -> list[bytes]:
        """Every packet written so far and not taken yet (removes them)."""
        return self.written.drain()

    # --- the packet path's side (TunIO) -----------------------------------------------------

    def read(self, size: int = DEFAULT_READ_SIZE, *, timeout: float | None = None) -> bytes:
        packet = self.inbound.get(self.read_timeout if timeout is None else timeout)
        return packet[:size]

    def readinto(self, buf: bytearray | memoryview) -> int:
        packet = self.inbound.get(self.read_timeout)
        n = min(len(packet), len(buf))
        buf[:n] = packet[:n]
        return n

    def read_batch(
        self, max_packets: int = DEFAULT_BATCH, size: int = DEFAULT_READ_SIZE
    ) -> list[bytes]:
        packets = [self.read(size)]
        while len(packets) < max_packets:
            more = self.inbound.get_nowait()
            if more is None:
                break
            packets.append(more[:size])
        return packets

    def write(self, packet: _Buffer) -> int:
        if self._closed:
            raise TunClosed(f"TUN device {self._name} is closed")
        data = bytes(packet)
        if not data or data[0] >> 4 not in (4, 6) or not self.written.put(data, 0):
            self.dropped_writes += 1  # the kernel refuses non-IP packets with EINVAL
            return 0
        return len(data)

    def write_batch(self, packets: Iterable[_Buffer]) -> int:
        return sum(1 for packet in packets if self.write(packet))

    def close(self) -> None:
        """Wake every blocked reader with :class:`TunClosed`; ``written`` stays readable
        through :meth:`written_packets`. Idempotent."""
        self._closed = True
        self.inbound.close()

    def __enter__(self) -> FakeTun:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass
class FakeInterface:
    """One interface as :class:`FakeRouter` sees it."""

    name: str
    mtu: int = 1500
    up: bool = False
    addresses: list[str] = field(default_factory=list)
    routes: list[str] = field(default_factory=list)
    """Routes we own (``proto 77``); connected prefixes are derived from ``addresses``."""
    other_routes: list[str] = field(default_factory=list)
    """Routes someone else put through the interface (e.g. ``ip route add ... dev``)."""

    def present_routes(self) -> set[str]:
        return set(self.routes) | set(self.other_routes) | connected_prefixes(self.addresses)


class FakeRouter:
    """In-memory :class:`.router.RouterAPI` with :class:`.router.Router`'s semantics.

    Interfaces appear with :meth:`add_interface` (what opening a TUN device does to the
    kernel); ``changes`` logs every change record ever returned, in order.
    """

    def __init__(self) -> None:
        self.links: dict[str, FakeInterface] = {}
        self.changes: list[str] = []
        self._closed = False

    def add_interface(self, name: str, mtu: int = 1500, *, up: bool = False,
                      addresses: Iterable[str] = (), routes: Iterable[str] = ()) -> FakeInterface:
        """Make interface ``name`` exist (``routes``: foreign routes through it)."""
        validate_ifname(name)
        if name in self.links:
            raise RouterError(f"interface {name} exists")
        link = FakeInterface(name, mtu, up, list(addresses), [], list(routes))
        self.links[name] = link
        return link

    def apply(self, spec: InterfaceSpec) -> list[str]:
        self._check_open()
        link = self.links.get(spec.name)
        if link is None:
            raise RouterError(f"interface {spec.name} does not exist (open its TUN device first)")
        name = spec.name
        changes: list[str] = []
        if link.mtu != spec.mtu:
            link.mtu = spec.mtu
            changes.append(change_mtu(name, spec.mtu))
        if not link.up:
            link.up = True
            changes.append(change_up(name))
        desired = set(spec.addresses)
        for address in sorted(set(link.addresses) - desired):
            if is_kernel_link_local(address):
                continue
            link.addresses.remove(address)
            changes.append(change_addr("del", address, name))
            if ":" not in address and not any(":" not in a for a in link.addresses):
                # like the kernel: the last IPv4 address takes every IPv4 route with it
                link.routes = [r for r in link.routes if ":" in r]
                link.other_routes = [r for r in link.other_routes if ":" in r]
        for address in spec.addresses:
            if address not in link.addresses:
                link.addresses.append(address)
                changes.append(change_addr("add", address, name))
        wanted = set(spec.routes)
        for prefix in sorted(set(link.routes) - wanted):
            link.routes.remove(prefix)
            changes.append(change_route("del", prefix, name))
        present = link.present_routes()
        for prefix in spec.routes:
            if prefix not in present:
                link.routes.append(prefix)
                changes.append(change_route("add", prefix, name))
        self.changes += changes
        return changes

    def remove(self, name: str) -> list[str]:
        self._check_open()
        validate_ifname(name)
        link = self.links.pop(name, None)
        if link is None:
            return []
        changes = [change_route("del", p, name) for p in sorted(link.routes + link.other_routes)]
        changes.append(change_link_del(name))
        self.changes += changes
        return changes

    def cleanup(self, prefix: str = DEFAULT_PREFIX) -> list[str]:
        self._check_open()
        check_prefix(prefix)
        changes: list[str] = []
        for name in self.interfaces(prefix):
            changes += self.remove(name)
        return changes

    def interfaces(self, prefix: str = DEFAULT_PREFIX) -> list[str]:
        self._check_open()
        return sorted(n for n in self.links if n.startswith(prefix))

    def close(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise RouterError("router is closed")
