"""The WireGuard device: peers, the index table, and the packet path threads.

This is the adapter that feeds the pure cores (``noise``, ``session``, ``timers``,
``ratelimit``) from real I/O, in the shape of wireguard-go's ``device/``:

* the **I/O thread** (``_io_loop``) polls the TUN device and the UDP socket. From the TUN it
  takes inner packets (with offloads: TSO super-packets, cut into MSS segments in place), finds
  the peer by destination (cryptokey routing), seals them into one buffer and sends it as UDP
  GSO runs. From the socket it takes datagrams (with UDP GRO: batches): transport messages are
  opened, checked against the replay window and the peer's allowed source addresses, and
  written to the TUN device together (with offloads: a TCP flow's segments merged into one
  GSO write); handshake messages go to a bounded queue; STUN goes to ``on_stun`` (ICE). One
  thread for both directions: no GIL hand-over per batch, and a reply or ACK that a TUN write
  makes the kernel queue is read on the next turn instead of waking another thread.
  Transports or TUN twins that cannot be polled get the older layout, a **TUN thread** and a
  **UDP thread** (also ``SOCIALVPN_LINK_THREADS=2``); ``serve`` adds UDP threads for extra
  sockets. TUN reads happen under ``_tun_lock`` so packets leave in the order read.
* the **handshake thread** verifies mac1, demands mac2 with a cookie reply and rate-limits per
  source when under load, and runs the Noise handshake;
* the **timer thread** fires each peer's WireGuard timers (keepalive, retransmit, rekey, zero).

Blocking calls, no asyncio on the packet path. Locks: ``_hs_lock`` serialises handshake state
(rare), each peer's ``lock`` its sessions, timers and counters (one uncontended acquire per
batch). A nonce is never reused: send counters are reserved under the peer lock (one range per
batch) and each is sealed once, outside it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ..errors import ProtocolError
from .constants import (
    DEFAULT_TIMERS,
    MESSAGE_COOKIE_REPLY_SIZE,
    MESSAGE_INITIATION_SIZE,
    MESSAGE_RESPONSE_SIZE,
    MESSAGE_TRANSPORT_SIZE,
    QUEUE_HANDSHAKE_SIZE,
    LinkTimers,
)
from .noise import PeerHandshake, StaticIdentity, source_bytes
from .packet import DatagramKind, classify
from .ratelimit import LoadMonitor, Ratelimiter, source_key
from .session import Keypairs, Session, SessionExpired, inner_length
from .timers import PeerTimers, TimerAction
from .transport import DatagramIO, SockAddr, display, host_of

log = logging.getLogger("socialvpn.link")

Buffer = bytes | bytearray | memoryview
_TYPE_RECEIVER = struct.Struct("<II")

MAX_STAGED_PACKETS = 128  # packets held per peer while a handshake is under way (wireguard-go)
TIMER_TICK = 0.05  # the timer thread's resolution, seconds
TIMER_IDLE_MAX = 1.0  # the longest it sleeps (it sleeps until the next deadline, see _timer_loop)
RECEIVE_BUFFER = 65536
TUN_BATCH = 32  # inner packets taken from the TUN device per wake-up
UDP_BUDGET = 8  # receives per turn of the one-thread loop before the TUN device gets a turn
DEFAULT_MTU = 1380


class PacketIO(Protocol):
    """The TUN device as the packet path sees it (net/tun.py and net/fake.py provide it)."""

    def read(self, size: int = 65536) -> bytes: ...

    def write(self, packet: bytes | bytearray | memoryview) -> int: ...

    def close(self) -> None: ...


P = TypeVar("P")


class RouteTable(Protocol, Generic[P]):
    """Cryptokey routing (net/packet_router.py): destination → peer; allowed inner sources."""

    def peer_for_destination(self, packet: bytes | bytearray | memoryview) -> P | None: ...

    def source_allowed(self, peer: P, packet: bytes | bytearray | memoryview) -> bool: ...

    def set_allowed(self, peer: P, prefixes: Iterable[str]) -> None: ...

    def remove(self, peer: P) -> None: ...


@dataclass(frozen=True)
class PeerConfig:
    public_key: bytes
    allowed_ips: tuple[str, ...] = ()
    endpoint: tuple[str, int] | None = None
    persistent_keepalive: float = 0.0
    psk: bytes | None = None
    partial_checksums: bool = False
    """The peer is one of ours with an offload TUN (negotiated out of band): send it TCP/UDP
    packets in partial form (net/offload.py). Never for a stock WireGuard peer. (Receiving
    needs no setting: the form is told from each packet.)"""


class Peer:
    """One remote device. Fields below ``lock`` change only while holding it."""

    def __init__(self, device: Device, cfg: PeerConfig) -> None:
        self.public_key = cfg.public_key
        self.lock = threading.Lock()
        self.handshake = PeerHandshake(device.identity, cfg.public_key, psk=cfg.psk)
        self.keypairs = Keypairs()
        self.timers = PeerTimers(device.timers, persistent_keepalive=cfg.persistent_keepalive)
        self.endpoint: SockAddr | None = None
        self.staged: deque[bytes] = deque(maxlen=MAX_STAGED_PACKETS)
        self.pending_index = 0  # our index of an initiation in flight
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.rx_packets = 0
        self.tx_packets = 0
        self.handshakes = 0
        self.last_handshake_wall: float | None = None
        self.endpoint_changes = 0
        self.removed = False
        self.partial_checksums = cfg.partial_checksums and device.vnet
        """In effect only when our TUN device takes virtio headers (offloads)."""

    def __repr__(self) -> str:
        return f"<Peer {self.public_key.hex()[:8]} endpoint={display(self.endpoint)}>"


def _pollable(io: object) -> bool:
    """A DatagramIO the I/O thread can poll (non-blocking receives on a descriptor)."""
    return hasattr(io, "try_recv_segments") and hasattr(io, "fileno")


def _inner_bytes(groups: list[Any]) -> int:
    """Total size of the packets in ``groups`` (offload ``Segments`` know theirs)."""
    total = 0
    for group in groups:
        nbytes = getattr(group, "nbytes", None)
        total += sum(map(len, group)) if nbytes is None else nbytes
    return total


class Device:
    def __init__(
        self,
        private_key: bytes,
        tun: PacketIO,
        transport: DatagramIO,
        routes: RouteTable[Peer],
        *,
        timers: LinkTimers = DEFAULT_TIMERS,
        mtu: int = DEFAULT_MTU,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        on_stun: Callable[[bytes, SockAddr], None] | None = None,
    ) -> None:
        self.identity = StaticIdentity(
            X25519PrivateKey.from_private_bytes(private_key), timers=timers
        )
        self.public_key = self.identity.public
        self.tun = tun
        self.vnet = bool(getattr(tun, "offloads", False))
        """The TUN device reads and writes virtio headers: partial checksums can be used."""
        self.transport = transport
        self.routes = routes
        self.timers = timers
        self.mtu = mtu
        self._clock = clock
        self._wall = wall
        self.on_stun = on_stun
        self._peers: dict[bytes, Peer] = {}
        self._index: dict[int, tuple[Peer, Session | None]] = {}
        self._hs_lock = threading.Lock()
        self._handshakes: queue.Queue[tuple[bytes, SockAddr] | None] = queue.Queue(
            QUEUE_HANDSHAKE_SIZE
        )
        self._ratelimiter = Ratelimiter()
        self._load = LoadMonitor()
        self.drops: dict[str, int] = {}
        self.gro_batches = 0
        self.tun_reads_after_write = 0  # TUN reads the UDP thread took (_help_tun)
        self._running = False
        self._stopped = threading.Event()
        self._timer_kick = threading.Event()  # look at the timers now (new peer, new interval)
        self._threads: list[threading.Thread] = []
        # Non-blocking TUN reads (net/tun.py TunDevice): the TUN thread waits for readability
        # and then drains under _tun_lock, which the UDP thread may also take (_help_tun).
        self._tun_lock = threading.Lock()
        self._tun_wait: Callable[[], None] | None = getattr(tun, "wait_readable", None)
        self._tun_groups = bool(getattr(tun, "offloads", False)) and hasattr(tun, "read_groups")
        self._write_batch: Callable[[list[Buffer]], object] | None = getattr(
            tun, "write_batch", None)
        # One I/O thread polls the TUN device and every socket that can be polled: the main
        # transport if it can, and the sockets handed to serve() (see _io_loop).
        self._tun_polled = (self._tun_wait is not None and hasattr(tun, "fileno")
                            and os.environ.get("SOCIALVPN_LINK_THREADS") != "2")
        self._main_polled = self._tun_polled and _pollable(transport)
        self.single_thread = self._main_polled
        """TUN and the main transport in one thread (else a UDP thread reads the latter)."""
        self._serve_queue: deque[DatagramIO] = deque()  # for the I/O loop to poll
        self._wake_r = self._wake_w = -1  # the I/O loop's wake-up pipe (while running)
        self._io_done = False  # the I/O loop ended: serve() falls back to threads
        self._polled_count = 0  # sockets the I/O loop polls besides the main transport
        self._send_packed: Callable[[memoryview, list[int], SockAddr], None] | None = getattr(
            transport, "send_packed", None)

    # --- peers -----------------------------------------------------------------------------

    def add_peer(self, cfg: PeerConfig) -> Peer:
        if cfg.public_key in self._peers:
            raise ValueError("peer already present")
        if cfg.public_key == self.public_key:
            raise ValueError("a device cannot be its own peer")
        peer = Peer(self, cfg)
        if cfg.endpoint is not None:
            peer.endpoint = self.transport.sockaddr(*cfg.endpoint)
        self.routes.set_allowed(peer, cfg.allowed_ips)
        self._peers[cfg.public_key] = peer
        self._timer_kick.set()
        if cfg.persistent_keepalive > 0 and peer.endpoint is not None and self._running:
            self.send_keepalive(peer)
        return peer

    def remove_peer(self, public_key: bytes) -> None:
        peer = self._peers.pop(public_key, None)
        if peer is None:
            return
        self.routes.remove(peer)
        with self._hs_lock, peer.lock:
            peer.removed = True
            peer.timers.stop()
            for session in peer.keypairs.clear():
                self._index.pop(session.local_index, None)
            self._index.pop(peer.pending_index, None)
            peer.handshake.zero()
            peer.staged.clear()

    def peer(self, public_key: bytes) -> Peer | None:
        return self._peers.get(public_key)

    def peers(self) -> list[Peer]:
        return list(self._peers.values())

    def send_keepalive(self, peer: Peer) -> None:
        """Send a keepalive now, starting a handshake first if there is no session."""
        self._send(peer, [[b""]], keepalive=True)

    def set_endpoint(self, public_key: bytes, host: str, port: int) -> None:
        peer = self._peers[public_key]
        with peer.lock:
            peer.endpoint = self.transport.sockaddr(host, port)

    # --- hooks for link/manager.py (direct per-path sockets) -------------------------------

    def set_endpoint_addr(self, public_key: bytes, addr: SockAddr) -> None:
        """Point the peer at ``addr`` in the transport's own form (no ``sockaddr`` lookup)."""
        peer = self._peers[public_key]
        with peer.lock:
            peer.endpoint = addr

    def endpoint_of(self, public_key: bytes) -> SockAddr | None:
        peer = self._peers.get(public_key)
        return None if peer is None else peer.endpoint

    def set_partial_checksums(self, public_key: bytes, on: bool) -> bool:
        """Use partial checksums with the peer (``PeerConfig.partial_checksums``) or stop;
        returns whether they are in effect (never without offloads here)."""
        peer = self._peers[public_key]
        with peer.lock:
            peer.partial_checksums = bool(on) and self.vnet
            return peer.partial_checksums

    def set_persistent_keepalive(self, public_key: bytes, seconds: float) -> None:
        """Change the peer's persistent keepalive (0 = off); armed by the next packet."""
        peer = self._peers[public_key]
        with peer.lock:
            peer.timers.persistent_keepalive = max(0.0, seconds)
        self._timer_kick.set()

    def serve(self, io: DatagramIO, name: str = "udp-path") -> None:
        """Receive from one more DatagramIO exactly like the main transport (GRO batches,
        roaming). One that can be polled (``fileno``, ``try_recv_segments``, ``closed``, and
        the hand-over below) joins the I/O thread's poll set: no thread of its own, no GIL
        hand-over per batch. Its ``polled`` is set and ``on_close`` told to wake the I/O loop,
        which then drops it and calls its ``release()``; at the device's stop its
        ``unpoll()``. Anything else gets a thread of its own, which ends when ``io`` raises
        OSError or the device stops (``io`` should return 0 bytes now and then so a stop is
        noticed). Replies go out through ``self.transport``, which must route the addresses
        ``io`` reports."""
        if not self._running:
            return
        if (self._tun_polled and not self._io_done and _pollable(io)
                and hasattr(io, "release")):
            io.polled = True  # type: ignore[attr-defined]
            io.on_close = self._wake_io  # type: ignore[attr-defined]
            self._serve_queue.append(io)
            self._wake_io()
            return
        t = threading.Thread(target=self._udp_loop, args=(io,), name=f"link-{name}",
                             daemon=True)
        self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    # --- lifecycle -------------------------------------------------------------------------

    def _wake_io(self) -> None:
        """Make the I/O loop look at its poll set (a socket to add, or one that closed)."""
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def start(self) -> None:
        self._running = True
        loops: tuple[tuple[str, Callable[[], None]], ...]
        if self._tun_polled:
            self._io_done = False
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            loops = (("io", self._io_loop),) if self._main_polled else (
                ("io", self._io_loop), ("udp", self._udp_loop))
        else:
            loops = (("tun", self._tun_loop), ("udp", self._udp_loop))
        for name, target in (
            *loops,
            ("handshake", self._handshake_loop),
            ("timers", self._timer_loop),
        ):
            t = threading.Thread(target=target, name=f"link-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        for peer in self.peers():
            if peer.timers.persistent_keepalive > 0 and peer.endpoint is not None:
                self.send_keepalive(peer)

    def stop(self, timeout: float = 5.0) -> None:
        if not self._running:
            return
        self._running = False
        self._stopped.set()
        self._timer_kick.set()
        self._handshakes.put(None)
        self.transport.wake()
        self._wake_io()
        self.tun.close()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            log.warning("link threads still running after stop: %s", ", ".join(alive))
        self._threads.clear()
        if "link-io" not in alive:
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            self._wake_r = self._wake_w = -1

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def _new_index(self, peer: Peer) -> int:
        while True:
            index = int.from_bytes(os.urandom(4), "little")
            if index and index not in self._index:
                self._index[index] = (peer, None)
                return index

    def _release(self, sessions: Iterable[Session]) -> None:
        for session in sessions:
            self._index.pop(session.local_index, None)

    # --- sending ---------------------------------------------------------------------------

    def _tun_loop(self) -> None:
        tun = self.tun
        pump = self._pump_tun
        wait = self._tun_wait
        if wait is None:  # a TUN twin without non-blocking reads: block in read_batch/read
            read_batch = getattr(tun, "read_batch", None)
            read = tun.read
            while self._running:
                try:
                    packets = read_batch(TUN_BATCH) if read_batch else [read(RECEIVE_BUFFER)]
                except Exception:  # TunClosed after stop(), or the device vanished
                    if self._running:
                        log.exception("TUN read failed; the link device stops reading")
                    break
                self._route_and_send(packets, False)
            return
        lock = self._tun_lock
        while self._running:
            try:
                wait()
                # Take what is queued, batch after batch, then sleep again. The lock lets the
                # UDP thread do the same right after it wrote to the TUN device (the replies
                # and ACKs that write caused are queued by then): no thread wake-up for them,
                # and reads and sends stay in one order.
                with lock:
                    while pump(0) >= TUN_BATCH:
                        pass
            except Exception:  # TunClosed after stop(), or the device vanished
                if self._running:
                    log.exception("TUN read failed; the link device stops reading")
                break

    def _pump_tun(self, slot: int) -> int:
        """Read what the TUN device has queued (without blocking) and send it; the number of
        reads taken. Call with ``_tun_lock`` held."""
        if self._tun_groups:
            groups: list[Any] = self.tun.read_groups(  # type: ignore[attr-defined]
                TUN_BATCH, block=False, slot=slot)
        else:
            groups = self.tun.read_batch(TUN_BATCH, block=False)  # type: ignore[call-arg]
        if groups:
            self._route_and_send(groups, self._tun_groups)
        return len(groups)

    def _route_and_send(self, groups: list[Any], segmented: bool) -> None:
        """Inner packets read from the TUN device → their peers. ``segmented``: ``groups`` are
        offload ``Segments`` (one read each, one destination each); else plain packets."""
        route = self.routes.peer_for_destination
        if len(groups) == 1:
            peer = route(groups[0].head if segmented else groups[0])
            if peer is None:
                self._drop("no-route")
            else:
                if segmented and peer.partial_checksums:
                    groups[0].partial = True
                self._send(peer, groups if segmented else [groups])
            return
        # Keep each peer's packets in order and send each peer's share in one batch.
        by_peer: dict[Peer, list[Any]] = {}
        for group in groups:
            peer = route(group.head if segmented else group)
            if peer is None:
                self._drop("no-route")
                continue
            if segmented and peer.partial_checksums:
                group.partial = True
            if peer in by_peer:
                by_peer[peer].append(group)
            else:
                by_peer[peer] = [group]
        for peer, share in by_peer.items():
            self._send(peer, share if segmented else [share])

    def _help_tun(self) -> None:
        """From the UDP thread after a TUN write: send what that write made the kernel queue
        (if the TUN thread is not busy doing so)."""
        if self._tun_wait is not None and self._tun_lock.acquire(blocking=False):
            try:
                self.tun_reads_after_write += self._pump_tun(1)
            except Exception:  # a closed device: the TUN thread reports it
                log.debug("TUN read from the UDP thread failed", exc_info=True)
            finally:
                self._tun_lock.release()

    def _send(self, peer: Peer, groups: list[Any], keepalive: bool = False) -> None:
        """Seal and send inner packets (``[[b""]]`` with ``keepalive``), or stage them and
        start a handshake when there is no usable session. ``groups``: collections of packets
        (lists, or offload ``Segments`` whose packets are valid one at a time, in order)."""
        now = self._clock()
        count = len(groups[0]) if len(groups) == 1 else sum(map(len, groups))
        nbytes = _inner_bytes(groups)
        first = -1
        with peer.lock:
            if peer.removed:
                return
            session = peer.keypairs.sending(now)
            endpoint = peer.endpoint
            if session is not None and endpoint is not None:
                try:
                    first = session.reserve(count, now)
                except SessionExpired:
                    session = None
            if session is None or endpoint is None:
                if not keepalive or not peer.staged:
                    peer.staged.extend(bytes(p) for group in groups for p in group)
                initiate = endpoint is not None
            else:
                timers = peer.timers
                timers.on_any_authenticated_packet_traversed(now)
                timers.on_any_authenticated_packet_sent(now)
                if not keepalive:
                    timers.on_data_sent(now)
                    peer.tx_bytes += nbytes
                    peer.tx_packets += count
                initiate = timers.keep_key_fresh_sending(now, session)
        if first >= 0:
            # Outside the lock: the counters are ours alone, so the ACK-receiving thread is
            # not held up by a 64 KiB super-packet being sealed.
            self._seal_and_send(session, first, groups, count, nbytes,  # type: ignore[arg-type]
                                endpoint)
        if initiate:
            self._initiate(peer, now)

    def _seal_and_send(self, session: Session, counter: int, groups: list[Any], count: int,
                       nbytes: int, endpoint: SockAddr) -> None:
        mtu = self.mtu
        out = bytearray(nbytes + count * (MESSAGE_TRANSPORT_SIZE + 16))
        view = memoryview(out)
        seal = session.seal_into
        sizes: list[int] = []
        pos = 0
        try:
            for group in groups:
                for packet in group:
                    size = seal(counter, packet, mtu, view[pos:])
                    sizes.append(size)
                    pos += size
                    counter += 1
        except SessionExpired:
            self._drop("expired")  # zeroed meanwhile: TCP resends, the timers rehandshake
        except ValueError:
            self._drop("too-big")
        if not sizes:
            return
        transport = self.transport
        if len(sizes) == 1:
            transport.sendto(view[:pos], endpoint)
        elif self._send_packed is not None:
            self._send_packed(view, sizes, endpoint)
        else:
            messages, pos = [], 0
            for size in sizes:
                messages.append(view[pos : pos + size])
                pos += size
            transport.send_batch(messages, endpoint)  # type: ignore[arg-type]

    def _send_staged(self, peer: Peer) -> None:
        with peer.lock:
            staged = [p for p in peer.staged if p]
            peer.staged.clear()
        if staged:
            self._send(peer, [staged])
        else:
            self._send(peer, [[b""]], keepalive=True)

    def _initiate(self, peer: Peer, now: float, is_retry: bool = False) -> None:
        with self._hs_lock, peer.lock:
            if peer.removed or peer.endpoint is None:
                return
            if not peer.timers.want_initiation(now, is_retry=is_retry):
                return
            self._index.pop(peer.pending_index, None)
            index = self._new_index(peer)
            peer.pending_index = index
            message = peer.handshake.create_initiation(now, self._wall(), index)
            timers = peer.timers
            timers.on_any_authenticated_packet_traversed(now)
            timers.on_any_authenticated_packet_sent(now)
            timers.on_handshake_initiated(now)
            endpoint = peer.endpoint
        self.transport.sendto(message, endpoint)

    # --- receiving -------------------------------------------------------------------------

    def _udp_loop(self, io: DatagramIO | None = None) -> None:
        buf = bytearray(RECEIVE_BUFFER)
        view = memoryview(buf)
        main = io is None
        recv = (self.transport if io is None else io).recv_segments
        on_batch = self._on_datagrams
        help_tun = self._help_tun
        while self._running:
            try:
                n, segment, addr = recv(buf)
            except OSError:
                if self._running and main:
                    log.exception("UDP receive failed; the link device stops receiving")
                break
            try:
                if n and on_batch(view, n, segment, addr):
                    help_tun()
            except Exception:  # TunClosed after stop(), or the device vanished
                if self._running:
                    log.exception("link receive failed; the link device stops receiving")
                break

    def _io_loop(self) -> None:
        """The TUN device, the main transport (when it can be polled) and the sockets handed
        to :meth:`serve` served by one thread: no GIL hand-over between TUN and UDP threads,
        and a reply that a TUN write makes the kernel queue is read at once, without waking
        another thread."""
        tun = self.tun
        pump = self._pump_tun
        on_batch = self._on_datagrams
        buf = bytearray(RECEIVE_BUFFER)
        view = memoryview(buf)
        tun_fd = tun.fileno()
        wake_fd = self._wake_r
        poller = select.poll()
        poller.register(tun_fd, select.POLLIN)
        poller.register(wake_fd, select.POLLIN)
        ios: dict[int, Any] = {}  # fd -> DatagramIO polled here
        if self._main_polled:
            ios[self.transport.fileno()] = self.transport  # type: ignore[attr-defined]
            poller.register(self.transport.fileno(), select.POLLIN)  # type: ignore[attr-defined]
        poll = poller.poll
        lock = self._tun_lock
        queue = self._serve_queue
        try:
            while self._running:
                try:
                    tun_ready = False
                    ready: list[Any] = []
                    for fd, _events in poll():
                        if fd == tun_fd:
                            tun_ready = True
                        elif fd == wake_fd:
                            # New sockets are read at once: datagrams that came before the
                            # take-over wait in them without making the descriptor readable.
                            ready.extend(self._update_polled(poller, ios, queue))
                        else:
                            io = ios.get(fd)
                            if io is not None:
                                ready.append(io)
                    for io in ready:
                        try_recv = io.try_recv_segments
                        for _ in range(UDP_BUDGET):
                            try:
                                got = try_recv(buf)
                            except OSError:
                                if io is self.transport:
                                    raise
                                self._drop_polled(poller, ios, io)  # closed under us
                                break
                            if got is None:
                                break
                            n, segment, addr = got
                            if n and on_batch(view, n, segment, addr):
                                tun_ready = True  # the write may have queued replies or ACKs
                    if tun_ready and self._running:
                        with lock:  # one batch per turn: the UDP side (ACKs) is not starved
                            pump(0)
                except Exception:  # TunClosed after stop(), the device or the socket gone
                    if self._running:
                        log.exception("link I/O failed; the link device stops its packet path")
                    break
        finally:
            self._io_done = True
            pending = list(queue)
            queue.clear()
            for io in [*ios.values(), *pending]:
                if io is not self.transport:
                    io.unpoll()  # closes from now on release at once
            self._polled_count = 0

    def _update_polled(self, poller: select.poll, ios: dict[int, Any],
                       queue: deque[DatagramIO]) -> list[Any]:
        """Take the sockets serve() queued into the poll set (returned: to be read now); drop
        the ones that closed."""
        with contextlib.suppress(OSError):
            os.read(self._wake_r, 4096)
        added = []
        while queue:
            io: Any = queue.popleft()
            if io.closed:
                io.release()
                continue
            fd = io.fileno()
            ios[fd] = io
            poller.register(fd, select.POLLIN)
            added.append(io)
        for io in [io for io in ios.values() if io is not self.transport and io.closed]:
            self._drop_polled(poller, ios, io)
        self._polled_count = sum(1 for io in ios.values() if io is not self.transport)
        return added

    def _drop_polled(self, poller: select.poll, ios: dict[int, Any], io: Any) -> None:
        for fd, known in list(ios.items()):
            if known is io:
                with contextlib.suppress(KeyError, ValueError):
                    poller.unregister(fd)
                del ios[fd]
        io.release()  # its descriptor closes only now: the number cannot be reused under us
        self._polled_count = sum(1 for known in ios.values() if known is not self.transport)

    def _on_datagrams(self, view: memoryview, n: int, segment: int, addr: SockAddr) -> bool:
        """One receive (``n`` bytes in ``view``; GRO: datagrams of ``segment`` bytes back to
        back, the last may be shorter). True if inner packets were written to the TUN."""
        if segment < n:
            self.gro_batches += 1
        # Open every transport message of the batch, then settle each peer's state once and
        # write the inner packets together, so the TUN device can merge a TCP flow's segments.
        now = self._clock()
        index = self._index
        drop = self._drop
        deliver = self._deliver
        inner: list[Buffer] = []
        after: list[tuple[Peer, bool, bool]] = []
        peer: Peer | None = None
        opened: list[tuple[Session, bytes]] = []
        last_receiver = -1
        entry: tuple[Peer, Session | None] | None = None
        data = view[:n]
        unpack = _TYPE_RECEIVER.unpack_from
        for offset in range(0, n, segment):
            message = data[offset : offset + segment]
            if len(message) < MESSAGE_TRANSPORT_SIZE:
                self._dispatch_other(message, addr)
                continue
            kind, receiver = unpack(message)  # type 4 with its three reserved zero bytes
            if kind != 4:
                self._dispatch_other(message, addr)
                continue
            if receiver != last_receiver:
                last_receiver = receiver
                entry = index.get(receiver)
            if entry is None or entry[1] is None:
                drop("unknown-index")
                continue
            session = entry[1]
            try:
                plaintext = session.open(message, now)
            except ProtocolError as exc:
                drop(exc.reason)
                continue
            if entry[0] is not peer:
                if opened:
                    deliver(peer, opened, addr, now, inner, after)  # type: ignore[arg-type]
                    opened = []
                peer = entry[0]
            opened.append((session, plaintext))
        if opened:
            deliver(peer, opened, addr, now, inner, after)  # type: ignore[arg-type]
        if inner:
            if len(inner) == 1:
                self.tun.write(inner[0])
            elif self._write_batch is not None:
                self._write_batch(inner)
            else:
                for packet in inner:
                    self.tun.write(packet)
        for done_peer, confirmed, rekey in after:
            # After this batch's inner packets are written (staged packets follow them).
            if confirmed:
                self._send_staged(done_peer)
            if rekey:
                self._initiate(done_peer, now)
        return bool(inner)

    def _deliver(self, peer: Peer, opened: list[tuple[Session, bytes]], addr: SockAddr,
                 now: float, inner: list[Buffer], after: list[tuple[Peer, bool, bool]]
                 ) -> None:
        """Authenticated messages of one peer from one batch: check each inner packet (length,
        cryptokey routing of its source) into ``inner``, then update the peer's sessions,
        timers, endpoint and counters under one acquisition of its lock."""
        source_allowed = self.routes.source_allowed
        rx_bytes = rx_packets = 0
        data = False
        sessions: list[Session] = []
        allowed_source = b""
        for session, plaintext in opened:
            if not sessions or session is not sessions[-1]:
                sessions.append(session)
            if not plaintext:
                continue  # keepalive
            data = True
            try:
                length = inner_length(plaintext)
            except ProtocolError as exc:
                self._drop(exc.reason)
                continue
            # Cryptokey routing: the peer must own the inner source. One lookup per source
            # address and batch (the bytes of the address are compared instead).
            source = plaintext[12:16] if plaintext[0] < 0x60 else plaintext[8:24]
            if source != allowed_source:
                if not source_allowed(peer, plaintext):
                    self._drop("source")
                    continue
                allowed_source = source
            inner.append(plaintext if length == len(plaintext)
                         else memoryview(plaintext)[:length])
            rx_bytes += length
            rx_packets += 1
        confirmed = False
        with peer.lock:
            for session in sessions:
                was_confirmed, dropped = peer.keypairs.received_with(session)
                if dropped:
                    self._release(dropped)
                confirmed = confirmed or was_confirmed
            timers = peer.timers
            if confirmed:
                timers.on_handshake_complete(now)
                peer.handshakes += 1
                peer.last_handshake_wall = self._wall()
            if addr != peer.endpoint:
                peer.endpoint = addr  # roaming: only an authenticated packet moves it
                peer.endpoint_changes += 1
            timers.on_any_authenticated_packet_received(now)
            timers.on_any_authenticated_packet_traversed(now)
            if data:
                timers.on_data_received(now)
            rekey = timers.keep_key_fresh_receiving(now, peer.keypairs.current)
            peer.rx_bytes += rx_bytes
            peer.rx_packets += rx_packets
        if confirmed or rekey:
            after.append((peer, confirmed, rekey))

    def _dispatch_other(self, data: memoryview, addr: SockAddr) -> None:
        """A datagram that is not a transport message: handshake, STUN, or junk."""
        message = bytes(data)
        kind = classify(message)
        if kind is DatagramKind.WIREGUARD:
            try:
                self._handshakes.put_nowait((message, addr))
            except queue.Full:
                self._drop("handshake-queue-full")
        elif kind is DatagramKind.STUN and self.on_stun is not None:
            self.on_stun(message, addr)
        else:
            self._drop("malformed")

    # --- handshakes ------------------------------------------------------------------------

    def _handshake_loop(self) -> None:
        while True:
            item = self._handshakes.get()
            if item is None or not self._running:
                return
            data, addr = item
            try:
                self._handle_handshake(data, addr)
            except ProtocolError as exc:
                self._drop(exc.reason)
            except Exception:  # a bug must not stop every future handshake
                log.exception("handshake processing failed")
                self._drop("internal")

    def _handle_handshake(self, data: bytes, addr: SockAddr) -> None:
        now = self._clock()
        kind = data[0]
        if kind in (1, 2):
            if not self.identity.cookies.check_mac1(data):
                self._drop("mac1")
                return
            if self._load.under_load(self._handshakes.qsize(), now):
                host = host_of(addr)
                source = source_bytes(host, addr[1])
                if not self.identity.cookies.check_mac2(data, source, now):
                    sender = int.from_bytes(data[4:8], "little")
                    reply = self.identity.cookies.create_reply(data, sender, source, now)
                    self.transport.sendto(reply, addr)
                    self._drop("cookie-sent")
                    return
                if not self._ratelimiter.allow(source_key(host), now):
                    self._drop("ratelimit")
                    return
        if kind == 1 and len(data) == MESSAGE_INITIATION_SIZE:
            self._on_initiation(data, addr, now)
        elif kind == 2 and len(data) == MESSAGE_RESPONSE_SIZE:
            self._on_response(data, addr, now)
        elif kind == 3 and len(data) == MESSAGE_COOKIE_REPLY_SIZE:
            self._on_cookie_reply(data, now)
        else:
            self._drop("malformed")

    def _on_initiation(self, data: bytes, addr: SockAddr, now: float) -> None:
        with self._hs_lock:
            peer = self.identity.consume_initiation(data, self._lookup_handshake, now)
            owner = self._peer_of_handshake(peer)
            if owner is None:
                raise ProtocolError("initiation for a removed peer", "unknown")
            with owner.lock:
                self._index.pop(owner.pending_index, None)
                owner.pending_index = 0
                index = self._new_index(owner)
                response = peer.create_response(now, index)
                session = peer.begin_session(now)
                self._index[index] = (owner, session)
                self._release(owner.keypairs.install(session))
                timers = owner.timers
                timers.on_any_authenticated_packet_traversed(now)
                timers.on_any_authenticated_packet_received(now)
                timers.on_session_derived(now)
                timers.on_any_authenticated_packet_sent(now)
                if addr != owner.endpoint:
                    owner.endpoint = addr
                    owner.endpoint_changes += 1
        self.transport.sendto(response, addr)

    def _lookup_handshake(self, public_key: bytes) -> PeerHandshake | None:
        peer = self._peers.get(public_key)
        return peer.handshake if peer is not None else None

    def _peer_of_handshake(self, handshake: PeerHandshake) -> Peer | None:
        peer = self._peers.get(handshake.remote_static)
        return peer if peer is not None and peer.handshake is handshake else None

    def _on_response(self, data: bytes, addr: SockAddr, now: float) -> None:
        receiver = int.from_bytes(data[8:12], "little")
        entry = self._index.get(receiver)
        if entry is None or entry[1] is not None:
            self._drop("unknown-index")
            return
        peer = entry[0]
        with self._hs_lock, peer.lock:
            if peer.removed or peer.pending_index != receiver:
                self._drop("unknown-index")
                return
            peer.handshake.consume_response(data, now)
            session = peer.handshake.begin_session(now)
            self._index[receiver] = (peer, session)
            peer.pending_index = 0
            self._release(peer.keypairs.install(session))
            timers = peer.timers
            timers.on_any_authenticated_packet_traversed(now)
            timers.on_any_authenticated_packet_received(now)
            timers.on_handshake_complete(now)
            timers.on_session_derived(now)
            peer.handshakes += 1
            peer.last_handshake_wall = self._wall()
            if addr != peer.endpoint:
                peer.endpoint = addr
                peer.endpoint_changes += 1
        self._send_staged(peer)

    def _on_cookie_reply(self, data: bytes, now: float) -> None:
        receiver = int.from_bytes(data[4:8], "little")
        entry = self._index.get(receiver)
        if entry is None:
            self._drop("unknown-index")
            return
        peer = entry[0]
        with self._hs_lock:
            peer.handshake.consume_cookie_reply(data, now)

    # --- timers ----------------------------------------------------------------------------

    def _timer_loop(self) -> None:
        """Fire the peers' due timers, then sleep until the next deadline - but no longer than
        half the shortest interval a packet can arm a timer for (``shortest_interval``): a
        deadline armed meanwhile is never missed, and nothing has to wake this thread for it.
        An idle device wakes about once a second, not 20 times."""
        kick = self._timer_kick
        while self._running:
            now = self._clock()
            wait = TIMER_IDLE_MAX
            for peer in self.peers():
                with peer.lock:
                    timers = peer.timers
                    deadline = timers.next_deadline()
                    actions = (
                        timers.handle_timer(now)
                        if deadline is not None and deadline <= now
                        else []
                    )
                for action in actions:
                    self._carry_out(peer, action, now)
                with peer.lock:
                    wait = min(wait, timers.shortest_interval() / 2)
                    deadline = timers.next_deadline()
                if deadline is not None:
                    wait = min(wait, deadline - now)
            kick.wait(max(TIMER_TICK, wait))
            kick.clear()

    def _carry_out(self, peer: Peer, action: TimerAction, now: float) -> None:
        if action is TimerAction.SEND_KEEPALIVE:
            self.send_keepalive(peer)
        elif action is TimerAction.SEND_INITIATION:
            self._initiate(peer, now, is_retry=True)
        elif action is TimerAction.ZERO_KEYS:
            with self._hs_lock, peer.lock:
                self._release(peer.keypairs.clear())
                self._index.pop(peer.pending_index, None)
                peer.pending_index = 0
                peer.handshake.zero()
        elif action is TimerAction.GIVE_UP:
            with peer.lock:
                peer.staged.clear()
            log.info("handshake with %r gave up", peer)

    # --- what people and tests look at -----------------------------------------------------

    def peer_stats(self, peer: Peer) -> dict[str, Any]:
        with peer.lock:
            current = peer.keypairs.current
            return {
                "public_key": peer.public_key.hex(),
                "endpoint": display(peer.endpoint),
                "rx_bytes": peer.rx_bytes,
                "tx_bytes": peer.tx_bytes,
                "rx_packets": peer.rx_packets,
                "tx_packets": peer.tx_packets,
                "handshakes": peer.handshakes,
                "last_handshake": peer.last_handshake_wall,
                "endpoint_changes": peer.endpoint_changes,
                "session_age": None if current is None else self._clock() - current.created,
                "checksums": "partial" if peer.partial_checksums else "full",
                "staged": len(peer.staged),
            }

    def stats(self) -> dict[str, Any]:
        return {
            "public_key": self.public_key.hex(),
            "peers": [self.peer_stats(p) for p in self.peers()],
            "drops": dict(sorted(self.drops.items())),
            "transport_errors": dict(getattr(self.transport, "errors", {})),
            "tun": self.tun.stats() if hasattr(self.tun, "stats") else {},
            "udp": {"gso": getattr(self.transport, "gso", False),
                    "gro": getattr(self.transport, "gro", False),
                    "gro_batches": self.gro_batches,
                    "tun_reads_after_write": self.tun_reads_after_write,
                    "loop": ("one-thread" if self.single_thread else
                             "io+udp threads" if self._tun_polled else "tun+udp threads"),
                    "polled_paths": self._polled_count},
        }
