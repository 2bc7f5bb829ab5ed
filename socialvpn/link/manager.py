"""All links of one group: one WireGuard :class:`~.device.Device` over a multiplexed
transport whose per-peer paths are ICE sessions.

The orchestrator (``agent.py``) does the signalling (offer/answer/candidates over XMPP) and
drives a :class:`GroupLinks` from its event loop::

    links = GroupLinks(private_key=k, tun=tun, routes=PacketRouter(), servers=servers,
                       on_event=handle)          # handle(LinkEvent) runs on the loop
    links.start()
    links.set_peer("dev-b", b_public_key, ("10.77.0.2/32",))
    await links.start_ice("dev-b", controlling=True, local_ufrag=u, local_pwd=p,
                          remote_ufrag=ru, remote_pwd=rp)
    # -> LinkEvent("candidates", end=True): send them to the peer
    links.add_remote_candidates("dev-b", theirs, end=True)
    # -> LinkEvent("connected", result=IceResult) or LinkEvent("failed", reason=...)
    ...
    await links.stop()

How the pieces fit:

* :class:`MuxTransport` is the Device's :class:`~.transport.DatagramIO`. Every peer has one
  stable *address token* (``sockaddr(peer_id, 0)``), a reserved IPv4 address from
  ``240.0.0.0/4`` with port 0, so the Device's endpoint bookkeeping, cookies and rate limits
  work unchanged. ``sendto(token)`` goes to the peer's attached path (an
  :class:`~.ice.IceTransport`); with none attached the datagram is dropped and counted
  (``no-path``). Each attached path has one small pump thread that moves what it receives,
  tagged with the peer's token, into one bounded queue the Device's UDP thread reads.
* When ICE selects a pair, the session's transport is attached, the Device peer's endpoint set
  to the token and (on the controlling side) a keepalive is pushed through the Device, which
  starts the WireGuard handshake at once instead of waiting for traffic. Only the controlling
  side does it: two initiations crossing each other cost a ``rekey_timeout`` (5 s).
* The Device stays the only judge of packets: a path is just a pipe. A peer with no path keeps
  its sessions; its packets are dropped until a new path is attached.

Direct paths (DESIGN.md §4.2) skip all of the above: when our side of the selected pair is a
plain socket (host/srflx/prflx), :meth:`IceSession.take_socket` hands a duplicate of it over
and the Device reads and writes it from its own threads (:class:`DirectSocket`: UDP GSO/GRO,
blocking calls). Its addresses are ``(host, port, socket id)``, so :class:`LinkIO` (the
Device's transport) sends out of the socket a peer was last heard on, and WireGuard roaming
(an authenticated packet from a new address moves the endpoint) works as on any socket. STUN
on it goes back to aioice on the loop (consent keeps working). Only relayed pairs use the
MuxTransport. A direct socket outlives its ICE session: losing consent or re-signalling never
stops a working WireGuard session; a newer pair replaces it (the old socket keeps receiving
for :data:`DIRECT_GRACE` s). Our own wildcard sockets serve links restored from the endpoint
cache (:meth:`GroupLinks.restore`) and links whose local address went away
(:meth:`GroupLinks.network_changed`). Links that cross a NAT get WireGuard persistent keepalive
(``keepalive``, config ``[link] keepalive``): that, not ICE consent, keeps NAT mappings.

Partial checksums (net/offload.py) are negotiated per ICE session by the signalling (both
sides' TUN devices have offloads: :attr:`GroupLinks.offloads`) and handed to
:meth:`GroupLinks.start_ice`. They take effect when that session connects; a session that
does not use them switches them off at once (the peer may be a fresh process or an older build
that expects full checksums on whatever path is still in use).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .constants import DEFAULT_TIMERS, LinkTimers
from .device import Device, PacketIO, Peer, PeerConfig, RouteTable
from .ice import (
    CONSENT_FAILURES,
    CONSENT_INTERVAL,
    IceFailed,
    IceResult,
    IceServers,
    IceSession,
    TakenSocket,
)
from .transport import DatagramIO, SockAddr, UdpTransport, display

log = logging.getLogger("socialvpn.link.manager")

MUX_QUEUE = 4096  # datagrams received from all paths and not yet read by the Device
PUMP_BUFFER = 65536
STOP_TIMEOUT = 8.0  # stop(): ICE closes (3 s each, concurrently) and the Device's threads
ICE_STOP_TIMEOUT = 4.0  # one session's close (IceSession bounds it at 3 s)
TOKEN_NETWORK = 240 << 24  # 240.0.0.0/4, reserved: never a real peer address
_WAKE_ADDR: SockAddr = ("0.0.0.0", 0)
STUN_COOKIE = b"\x21\x12\xa4\x42"  # RFC 5389 magic cookie, bytes 4..8 of every STUN message
DIRECT_RECV_TIMEOUT = 0.5  # a direct socket's reader looks at its stop flag this often
DIRECT_GRACE = 5.0  # a replaced direct socket keeps receiving this long (packets in flight)
CONTROLLED_KICK_DELAY = 0.5  # see GroupLinks._kick_unless_handshaken
CACHE_FRESH = 180.0  # an endpoint is worth caching while its last handshake is this recent


@dataclass(frozen=True)
class LinkEvent:
    """What :class:`GroupLinks` reports to the orchestrator (always on its event loop).

    ``candidates``: our gathered candidates to signal (``end`` = that is all of them);
    ``connected``: ICE selected a pair (``result``) and the Device now uses it;
    ``failed``: ICE could not connect, or lost its pair later (``reason``, an
    :class:`~.ice.IceFailed` reason token); re-signal with a new session.
    """

    peer_id: str
    kind: str  # "candidates" | "connected" | "failed"
    candidates: tuple[str, ...] = ()
    end: bool = False
    result: IceResult | None = None
    reason: str = ""


# --- the multiplexed transport ---------------------------------------------------------------


class _Path:
    """One attached per-peer transport and the thread that pumps its receives."""

    def __init__(self, peer_id: str, token: SockAddr, transport: DatagramIO) -> None:
        self.peer_id = peer_id
        self.token = token
        self.transport = transport
        self.addr: SockAddr = getattr(transport, "remote", token)
        self.stopped = False
        self.thread: threading.Thread | None = None
        self.rx = 0
        self.tx = 0


class MuxTransport:
    """A :class:`~.transport.DatagramIO` for one Device over many per-peer transports.

    Thread-safe: ``sendto``/``send_batch``/``recv_*`` come from the Device's threads,
    ``attach``/``detach``/``close`` from the control plane. The path table is replaced, never
    changed in place, so the packet threads read it without a lock.
    """

    gso = False
    gro = False

    def __init__(self, queue_size: int = MUX_QUEUE) -> None:
        self._rx: queue.Queue[tuple[bytes, SockAddr] | None] = queue.Queue(queue_size)
        self._tokens: dict[str, SockAddr] = {}
        self._peers: dict[SockAddr, str] = {}
        self._paths: dict[SockAddr, _Path] = {}
        self._lock = threading.Lock()
        self._next = 1
        self._closed = False
        self.errors: dict[str, int] = {}

    def _count(self, name: str) -> None:
        with self._lock:
            self.errors[name] = self.errors.get(name, 0) + 1

    # -- tokens --

    def sockaddr(self, host: str, port: int) -> SockAddr:
        """The token of peer ``host`` (a peer id; a token's own host maps to that token).
        Stable for the life of the transport; ``port`` is ignored."""
        with self._lock:
            token = self._tokens.get(host)
            if token is not None:
                return token
            for known in self._peers:
                if known[0] == host:
                    return known
            n = self._next
            if n >= 1 << 28:
                raise ValueError("address tokens exhausted")
            self._next += 1
            value = TOKEN_NETWORK | n
            token = (f"{value >> 24}.{(value >> 16) & 255}.{(value >> 8) & 255}.{value & 255}", 0)
            self._tokens[host] = token
            self._peers[token] = host
            return token

    def token(self, peer_id: str) -> SockAddr:
        return self.sockaddr(peer_id, 0)

    def peer_of(self, token: SockAddr) -> str | None:
        return self._peers.get(token)

    def forget(self, peer_id: str) -> None:
        """Detach ``peer_id`` and drop its token (a later peer of that id gets a new one)."""
        self.detach(peer_id)
        with self._lock:
            token = self._tokens.pop(peer_id, None)
            if token is not None:
                self._peers.pop(token, None)

    # -- paths --

    def attach(self, peer_id: str, transport: DatagramIO) -> SockAddr:
        """Make ``transport`` the path of ``peer_id`` (replacing any previous one, which is
        detached) and start pumping its receives. Returns the peer's token."""
        if self._closed:
            raise OSError(errno.EBADF, "MuxTransport is closed")
        token = self.token(peer_id)
        self.detach(peer_id)
        path = _Path(peer_id, token, transport)
        path.thread = threading.Thread(target=self._pump, args=(path,),
                                       name=f"link-mux-{peer_id[:16]}", daemon=True)
        with self._lock:
            paths = dict(self._paths)
            paths[token] = path
            self._paths = paths
        path.thread.start()
        return token

    def detach(self, peer_id: str) -> DatagramIO | None:
        """Stop using the path of ``peer_id``: its datagrams are dropped from now on. The
        transport is woken (its pump ends) but not closed: its owner closes it."""
        with self._lock:
            token = self._tokens.get(peer_id)
            path = self._paths.get(token) if token is not None else None
            if path is None:
                return None
            paths = dict(self._paths)
            del paths[token]  # type: ignore[arg-type]
            self._paths = paths
        path.stopped = True
        with contextlib.suppress(Exception):
            path.transport.wake()
        return path.transport

    def attached(self, peer_id: str) -> bool:
        token = self._tokens.get(peer_id)
        return token is not None and token in self._paths

    def _pump(self, path: _Path) -> None:
        buf = bytearray(PUMP_BUFFER)
        recv = path.transport.recv_into
        put = self._rx.put_nowait
        while not path.stopped:
            try:
                n, _addr = recv(buf)
            except OSError:
                break  # the path is gone (ICE lost or transport closed)
            except Exception:
                log.exception("receive on the path of %s failed", path.peer_id)
                break
            if path.stopped:
                break
            if n == 0:
                continue  # a wake-up
            path.rx += 1
            try:
                put((bytes(buf[:n]), path.token))
            except queue.Full:
                self._count("rx-queue-full")
        if not path.stopped:
            self._count("path-ended")

    # -- DatagramIO --

    def sendto(self, data: bytes | bytearray | memoryview, addr: SockAddr) -> None:
        path = self._paths.get(addr)
        if path is None:
            self._count("no-path")
            return
        path.tx += 1
        path.transport.sendto(data, path.addr)

    def send_batch(self, messages: list[bytearray], addr: SockAddr) -> None:
        path = self._paths.get(addr)
        if path is None:
            self._count("no-path")
            return
        path.tx += len(messages)
        path.transport.send_batch(messages, path.addr)

    def recv_into(self, buf: bytearray) -> tuple[int, SockAddr]:
        if self._closed:
            raise OSError(errno.EBADF, "MuxTransport is closed")
        item = self._rx.get()
        if item is None:
            if self._closed:
                self._post(None)  # for the next reader
                raise OSError(errno.EBADF, "MuxTransport is closed")
            return 0, _WAKE_ADDR
        data, token = item
        n = min(len(data), len(buf))
        buf[:n] = data[:n]
        return n, token

    def recv_segments(self, buf: bytearray) -> tuple[int, int, SockAddr]:
        n, addr = self.recv_into(buf)
        return n, n, addr

    def wake(self) -> None:
        """Unblock a reader (it gets 0 bytes). A full queue wakes readers anyway."""
        with contextlib.suppress(queue.Full):
            self._rx.put_nowait(None)

    def _post(self, item: tuple[bytes, SockAddr] | None) -> None:
        while True:
            try:
                self._rx.put_nowait(item)
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._rx.get_nowait()

    def close(self) -> None:
        """Detach every path and wake readers; reads raise ``OSError(EBADF)`` from now on."""
        if self._closed:
            return
        self._closed = True
        for peer_id in list(self._tokens):
            self.detach(peer_id)
        self._post(None)

    def stats(self) -> dict[str, Any]:
        return {
            "paths": {p.peer_id: {"rx": p.rx, "tx": p.tx} for p in self._paths.values()},
            "queued": self._rx.qsize(),
            "errors": dict(sorted(self.errors.items())),
        }


# --- direct paths: real sockets on the packet path ---------------------------------------------


class DirectSocket:
    """A real UDP socket the Device's threads use directly (UDP GSO/GRO, blocking calls, no
    asyncio): the socket ICE selected (taken over from aioice) or one of our own.

    Addresses it reports are ``(host, port, id)``: the ``id`` names this socket, so
    :class:`LinkIO` sends a reply out of the socket the peer was heard on and the Device's
    roaming (an authenticated packet from a new address moves the endpoint) works across
    sockets too. STUN datagrams (first byte 0/1, magic cookie at offset 4) never reach the
    Device: they go to ``on_stun`` (aioice's consent checks) or are dropped.
    """

    def __init__(self, sock: socket.socket, sid: int, *, owner: str = "",
                 on_stun: Callable[[bytes, tuple[str, int]], None] | None = None) -> None:
        # A dup of an asyncio socket shares its O_NONBLOCK flag, which must stay set (the
        # loop's own sends on aioice's copy must never block): a Python timeout keeps the fd
        # non-blocking and waits in poll, so the reader still looks at its flags this often.
        sock.settimeout(DIRECT_RECV_TIMEOUT)
        self.udp = UdpTransport.from_socket(sock)
        # The Device's I/O thread polls a twin of the descriptor and receives without
        # waiting (timeout 0: the same O_NONBLOCK the description has anyway). Its number
        # stays taken until the I/O thread has let go of it (release()).
        twin = socket.socket(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno()))
        twin.setblocking(False)
        self._rx = UdpTransport.from_socket(twin)
        self._lock = threading.Lock()
        self._released = False
        self.polled = False
        """The Device's I/O thread polls this socket (set by Device.serve)."""
        self.on_close: Callable[[], None] | None = None
        """Called once closed while polled: the I/O thread then drops it and releases it."""
        self.id = sid
        self.owner = owner
        self.on_stun = on_stun
        name = sock.getsockname()
        self.local: tuple[str, int] = (str(name[0]), int(name[1]))
        self.closed = False
        self.rx = 0
        self.stun_rx = 0
        self._wake: SockAddr = ("0.0.0.0", 0, sid)
        self._early: collections.deque[tuple[bytes, SockAddr]] = collections.deque()

    @property
    def gso(self) -> bool:
        return self.udp.gso

    @property
    def gro(self) -> bool:
        return self.udp.gro

    @property
    def errors(self) -> dict[str, int]:
        return self.udp.errors

    def addr(self, host: str, port: int) -> SockAddr:
        return (host, port, self.id)

    def early(self, datagrams: Iterable[bytes], remote: tuple[str, int]) -> None:
        """Datagrams from ``remote`` that arrived before this socket was ours: the reader
        gets them first."""
        addr = (str(remote[0]), int(remote[1]), self.id)
        self._early.extend((bytes(d), addr) for d in datagrams)

    def sendto(self, data: bytes | bytearray | memoryview, addr: SockAddr) -> None:
        self.udp.sendto(data, (addr[0], addr[1]))

    def send_batch(self, messages: list[bytearray], addr: SockAddr) -> None:
        self.udp.send_batch(messages, (addr[0], addr[1]))

    def send_packed(self, buf: memoryview, sizes: list[int], addr: SockAddr) -> None:
        self.udp.send_packed(buf, sizes, (addr[0], addr[1]))

    def fileno(self) -> int:
        return self._rx.fileno()

    def _take_early(self, buf: bytearray) -> tuple[int, int, SockAddr]:
        data, early_addr = self._early.popleft()
        n = min(len(data), len(buf))
        buf[:n] = data[:n]
        return n, n, early_addr

    def try_recv_segments(self, buf: bytearray) -> tuple[int, int, SockAddr] | None:
        """:meth:`recv_segments` without waiting (the I/O thread polls :meth:`fileno`): None
        when nothing is queued; OSError once closed."""
        if self._early:
            return self._take_early(buf)
        recv = self._rx.try_recv_segments
        while True:
            if self.closed:
                raise OSError(errno.EBADF, "direct socket closed")
            got = recv(buf)
            if got is None:
                return None
            n, segment, addr = got
            if self._stun(buf, n, segment, addr):
                continue
            self.rx += 1
            return n, segment, (addr[0], addr[1], self.id)

    def _stun(self, buf: bytearray, n: int, segment: int, addr: SockAddr) -> bool:
        """A STUN datagram goes to ``on_stun`` (or nowhere), never to the Device."""
        if n >= 20 and segment >= n and buf[0] < 2 and buf[4:8] == STUN_COOKIE:
            self.stun_rx += 1
            on_stun = self.on_stun
            if on_stun is not None:
                on_stun(bytes(buf[:n]), (addr[0], addr[1]))
            return True
        return False

    def recv_segments(self, buf: bytearray) -> tuple[int, int, SockAddr]:
        if self._early:
            return self._take_early(buf)
        recv = self.udp.recv_segments
        while True:
            try:
                n, segment, addr = recv(buf)
            except (BlockingIOError, TimeoutError):  # give the reader a look at its flags
                if self.closed:
                    raise OSError(errno.EBADF, "direct socket closed") from None
                return 0, 0, self._wake
            except OSError:
                if self.closed:
                    raise OSError(errno.EBADF, "direct socket closed") from None
                raise
            if self.closed:
                raise OSError(errno.EBADF, "direct socket closed")
            if self._stun(buf, n, segment, addr):
                continue
            self.rx += 1
            return n, segment, (addr[0], addr[1], self.id)

    def recv_into(self, buf: bytearray) -> tuple[int, SockAddr]:
        n, _segment, addr = self.recv_segments(buf)
        return n, addr

    def sockaddr(self, host: str, port: int) -> SockAddr:
        return (host, port, self.id)

    def wake(self) -> None:
        pass  # the reader wakes by itself every DIRECT_RECV_TIMEOUT

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self.on_stun = None
            self.udp.close()
            hand_over = self.polled
        if hand_over and self.on_close is not None:
            self.on_close()  # the I/O thread lets go of the twin, then releases it
        else:
            self.release()

    def release(self) -> None:
        """Close the twin descriptor (idempotent): when nobody polls it any more."""
        with self._lock:
            if self._released:
                return
            self._released = True
        self._rx.close()

    def unpoll(self) -> None:
        """The I/O thread stopped polling this socket: a close from now on releases at once
        (and one that came already does)."""
        with self._lock:
            self.polled = False
            closed = self.closed
        if closed:
            self.release()

    def stats(self) -> dict[str, Any]:
        return {"local": f"{self.local[0]}:{self.local[1]}", "owner": self.owner, "rx": self.rx,
                "stun_rx": self.stun_rx, "gso": self.gso, "gro": self.gro,
                "errors": dict(self.errors)}


def bind_direct(port: int = 0) -> socket.socket:
    """Our own IPv4 socket on every address (``port``, or any if that one is taken): it keeps
    working when the host's addresses change, so it serves cached and roamed endpoints."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            if not port:
                raise
            sock.bind(("0.0.0.0", 0))
    except OSError:
        sock.close()
        raise
    return sock


class LinkIO:
    """The Device's transport: direct sockets for ``(host, port, id)`` addresses, the
    :class:`MuxTransport` (relayed ICE paths) for address tokens. The Device's main UDP thread
    reads the mux; every direct socket has its own reader (``Device.serve``)."""

    def __init__(self, mux: MuxTransport) -> None:
        self.mux = mux
        self._sockets: dict[int, DirectSocket] = {}
        self._next = 1
        self._lock = threading.Lock()
        self._errors: dict[str, int] = {}

    @property
    def gso(self) -> bool:
        return any(s.gso for s in self._sockets.values())

    @property
    def gro(self) -> bool:
        return any(s.gro for s in self._sockets.values())

    @property
    def errors(self) -> dict[str, int]:
        out = dict(self.mux.errors)
        for key, value in self._errors.items():
            out[key] = out.get(key, 0) + value
        for sock in list(self._sockets.values()):
            for key, value in sock.errors.items():
                out[key] = out.get(key, 0) + value
        return out

    def open(self, sock: socket.socket, *, owner: str = "",
             on_stun: Callable[[bytes, tuple[str, int]], None] | None = None) -> DirectSocket:
        with self._lock:
            sid = self._next
            self._next += 1
        direct = DirectSocket(sock, sid, owner=owner, on_stun=on_stun)
        sockets = dict(self._sockets)
        sockets[sid] = direct
        self._sockets = sockets
        return direct

    def discard(self, direct: DirectSocket) -> None:
        sockets = dict(self._sockets)
        sockets.pop(direct.id, None)
        self._sockets = sockets
        direct.close()

    def sockets(self) -> list[DirectSocket]:
        return list(self._sockets.values())

    def sendto(self, data: bytes | bytearray | memoryview, addr: SockAddr) -> None:
        if len(addr) == 3:
            direct = self._sockets.get(addr[2])
            if direct is None:
                self._errors["no-socket"] = self._errors.get("no-socket", 0) + 1
                return
            direct.sendto(data, addr)
            return
        self.mux.sendto(data, addr)

    def send_batch(self, messages: list[bytearray], addr: SockAddr) -> None:
        if len(addr) == 3:
            direct = self._sockets.get(addr[2])
            if direct is None:
                self._errors["no-socket"] = self._errors.get("no-socket", 0) + len(messages)
                return
            direct.send_batch(messages, addr)
            return
        self.mux.send_batch(messages, addr)

    def send_packed(self, buf: memoryview, sizes: list[int], addr: SockAddr) -> None:
        """Datagrams back to back in ``buf`` (the Device's sealed batch): one GSO send per run
        on a direct socket; through the mux one by one."""
        if len(addr) == 3:
            direct = self._sockets.get(addr[2])
            if direct is None:
                self._errors["no-socket"] = self._errors.get("no-socket", 0) + len(sizes)
                return
            direct.send_packed(buf, sizes, addr)
            return
        pos = 0
        messages = []
        for size in sizes:
            messages.append(buf[pos : pos + size])
            pos += size
        self.mux.send_batch(messages, addr)  # type: ignore[arg-type]

    def recv_into(self, buf: bytearray) -> tuple[int, SockAddr]:
        return self.mux.recv_into(buf)

    def recv_segments(self, buf: bytearray) -> tuple[int, int, SockAddr]:
        return self.mux.recv_segments(buf)

    def sockaddr(self, host: str, port: int) -> SockAddr:
        return self.mux.sockaddr(host, port)

    def wake(self) -> None:
        self.mux.wake()

    def close(self) -> None:
        self.mux.close()
        for direct in list(self._sockets.values()):
            self.discard(direct)


def crosses_nat(result: IceResult | None) -> bool:
    """Whether a selected pair goes through a NAT (or a relay) as far as ICE can tell; unknown
    paths (``None``) count as crossing one."""
    if result is None:
        return True
    return result.local_candidate_type != "host" or result.remote_candidate_type != "host"


# --- the group's links -----------------------------------------------------------------------


class _Link:
    """What GroupLinks keeps per peer (event-loop side only)."""

    def __init__(self, peer_id: str, public_key: bytes, allowed_ips: tuple[str, ...]) -> None:
        self.peer_id = peer_id
        self.public_key = public_key
        self.allowed_ips = allowed_ips
        self.session: IceSession | None = None
        self.task: asyncio.Task[None] | None = None
        self.state = "idle"  # idle | connecting | up (ICE selected a path) | failed
        self.confirmed = False  # a WireGuard session worked on this ICE path (see peer_stats)
        self.result: IceResult | None = None
        self.reason = ""
        self.controlling = False
        self.direct: DirectSocket | None = None  # the direct socket the Device sends on
        self.transport: str | None = None  # direct-socket | cached | roamed | ice-relay
        self.keepalive = 0.0  # the persistent keepalive the Device peer has now
        self.partial_checksums = False  # the current ICE session agreed on them (see start_ice)


class GroupLinks:
    """One group's Device, its MuxTransport and one ICE session per peer. Use from one event
    loop (the orchestrator's); events are reported on it through ``on_event``."""

    def __init__(
        self,
        *,
        private_key: bytes,
        tun: PacketIO,
        routes: RouteTable[Peer],
        servers: IceServers,
        on_event: Callable[[LinkEvent], None],
        timers: LinkTimers = DEFAULT_TIMERS,
        mtu: int = 1380,
        exclude_networks: tuple[str, ...] = (),
        connect_timeout: float = 20.0,
        stun_retry_max: int | None = None,
        consent_interval: float = CONSENT_INTERVAL,
        consent_failures: int = CONSENT_FAILURES,
        keepalive: float = 0.0,
        direct_sockets: bool = True,
    ) -> None:
        self.servers = servers
        self.keepalive = keepalive
        self.direct_sockets = direct_sockets  # False: every path through aioice (as before)
        self.consent_interval = consent_interval
        self.consent_failures = consent_failures
        self.on_event = on_event
        self.exclude_networks = tuple(exclude_networks)
        self.connect_timeout = connect_timeout
        self.stun_retry_max = stun_retry_max
        self.mux = MuxTransport()
        self.io = LinkIO(self.mux)
        self.device = Device(private_key, tun, self.io, routes, timers=timers, mtu=mtu)
        self._own: dict[int, DirectSocket] = {}  # our wildcard sockets by port
        self.routes = routes
        self._links: dict[str, _Link] = {}
        self._started = False
        self._stopped = False
        self._stop_task: asyncio.Future[None] | None = None

    @property
    def public_key(self) -> bytes:
        return self.device.public_key

    @property
    def offloads(self) -> bool:
        """Our TUN device has offloads: partial checksums can be offered to our peers."""
        return self.device.vnet

    # -- lifecycle --

    def start(self) -> None:
        """Start the Device's packet threads."""
        if self._stopped:
            raise RuntimeError("GroupLinks was stopped")
        if not self._started:
            self._started = True
            self.device.start()

    async def stop(self) -> None:
        """Close every ICE session, stop the Device and the transport. Idempotent, bounded
        (:data:`STOP_TIMEOUT` plus the Device's own 5 s thread join at worst)."""
        if self._stop_task is None:
            self._stopped = True
            self._stop_task = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stop_task)

    async def _stop(self) -> None:
        # The packet threads first (they would take the closing paths for a failure), then
        # the ICE sessions, then the mux.
        if self._started:
            await asyncio.to_thread(self.device.stop)
        closing = [self._close_session(link) for link in self._links.values()]
        if closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_TIMEOUT):
                    await asyncio.gather(*closing, return_exceptions=True)
        self.io.close()

    def set_excluded_networks(self, networks: tuple[str, ...]) -> None:
        """Overlay networks ICE must never gather on (every group's, not just this one's);
        taken by the next ICE session."""
        self.exclude_networks = tuple(networks)

    # -- peers --

    def set_peer(self, peer_id: str, public_key: bytes, allowed_ips: tuple[str, ...]) -> None:
        """Add a peer or update it: allowed IPs are replaced; a changed key makes a new Device
        peer (the old one's sessions are dropped) on the same path."""
        allowed = tuple(allowed_ips)
        link = self._links.get(peer_id)
        if link is not None and link.public_key == public_key:
            peer = self.device.peer(public_key)
            if peer is not None:
                self.routes.set_allowed(peer, allowed)
            link.allowed_ips = allowed
            return
        if link is not None:
            self.device.remove_peer(link.public_key)
            link.public_key = public_key
            link.allowed_ips = allowed
            link.partial_checksums = False  # another key: the next session negotiates anew
        else:
            link = _Link(peer_id, public_key, allowed)
        endpoint = (peer_id, 0) if self.mux.attached(peer_id) else None
        self.device.add_peer(PeerConfig(public_key, allowed, endpoint))
        self._links[peer_id] = link
        if endpoint is not None and link.controlling:
            self._kick(link)

    async def remove_peer(self, peer_id: str) -> None:
        """Stop the peer's ICE and remove it from the Device: its packets are dropped."""
        link = self._links.pop(peer_id, None)
        if link is None:
            return
        await self._close_session(link)
        self.device.remove_peer(link.public_key)
        self.mux.forget(peer_id)
        self._release(link.direct)

    def peers(self) -> list[str]:
        return list(self._links)

    # -- ICE --

    async def start_ice(self, peer_id: str, *, controlling: bool, local_ufrag: str,
                        local_pwd: str, remote_ufrag: str, remote_pwd: str,
                        partial_checksums: bool = False) -> None:
        """Begin a new ICE session with ``peer_id`` (closing any previous one). Gathering and
        connecting run in the background and report :class:`LinkEvent` values. Raises
        ``KeyError`` for an unknown peer and ``ValueError`` for malformed local
        credentials (the remote ones, from the peer, only make the session fail).

        ``partial_checksums``: the session agreed on them (both sides advertised it); they
        take effect when it connects. Without, they are off from now on."""
        if self._stopped:
            raise RuntimeError("GroupLinks was stopped")
        link = self._links[peer_id]
        link.partial_checksums = bool(partial_checksums)
        if not link.partial_checksums:
            self._apply_checksums(link)
        await self._close_session(link)
        while link.session is not None:  # another start_ice won the race: replace it
            await self._close_session(link)
        if self._links.get(peer_id) is not link or self._stopped:
            return  # removed or stopped meanwhile
        session = IceSession(
            controlling=controlling, servers=self.servers, ufrag=local_ufrag, pwd=local_pwd,
            connect_timeout=self.connect_timeout, stun_retry_max=self.stun_retry_max,
            exclude_networks=self.exclude_networks, consent_interval=self.consent_interval,
            consent_failures=self.consent_failures,
            on_failed=lambda reason: self._on_lost(link, session, reason))
        session.set_remote_credentials(remote_ufrag, remote_pwd)
        link.session = session
        link.controlling = controlling
        link.state = "connecting"
        link.result = None
        link.reason = ""
        link.task = asyncio.get_running_loop().create_task(
            self._run(link, session), name=f"ice-{peer_id}")

    def add_remote_candidates(self, peer_id: str, candidates: tuple[str, ...],
                              end: bool) -> None:
        """The peer's candidates for its current session (ignored if there is none)."""
        link = self._links.get(peer_id)
        if link is not None and link.session is not None:
            link.session.add_remote(candidates, end)

    async def stop_ice(self, peer_id: str) -> None:
        """Close the peer's ICE session; the peer stays (idle, its packets dropped)."""
        link = self._links.get(peer_id)
        if link is not None:
            await self._close_session(link)

    async def _run(self, link: _Link, session: IceSession) -> None:
        try:
            candidates = await session.gather()
            if link.session is not session:
                await session.close()  # superseded meanwhile
                return
            self._emit(LinkEvent(link.peer_id, "candidates", tuple(candidates), end=True))
            result = await session.connect()
            if link.session is not session:
                await session.close()
                return
            taken = session.take_socket() if self.direct_sockets else None
            if taken is not None:
                self.attach_direct(link.peer_id, taken, result, initiate=link.controlling)
            else:
                transport = session.transport()
                self.attach_path(link.peer_id, transport, result, initiate=link.controlling)
        except IceFailed as exc:
            if link.session is session:
                self._failed(link, exc.reason)
        except Exception as exc:  # a bug: report the link as failed, never hang it
            log.exception("ICE with %s failed unexpectedly", link.peer_id)
            if link.session is session:
                self._failed(link, f"internal: {type(exc).__name__}")

    def attach_path(self, peer_id: str, transport: DatagramIO,
                    result: IceResult | None = None, *, initiate: bool = True) -> None:
        """Make ``transport`` the peer's path and point its Device peer there; with
        ``initiate`` start the WireGuard handshake now. Reports ``connected``. (ICE does it on
        success, initiating on the controlling side; tests may attach any DatagramIO.)"""
        link = self._links[peer_id]
        self.mux.attach(peer_id, transport)
        self.device.set_endpoint(link.public_key, peer_id, 0)
        link.keepalive = self.keepalive
        self.device.set_persistent_keepalive(link.public_key, link.keepalive)
        old, link.direct, link.transport = link.direct, None, "ice-relay"
        self._release(old, later=True)
        self._connected(link, result, initiate)

    def _connected(self, link: _Link, result: IceResult | None, initiate: bool) -> None:
        """A path is in place: the controlling side starts the handshake, the other waits a
        moment for it (then starts one itself); tell the signalling side."""
        link.state = "up"
        link.confirmed = False
        link.result = result
        link.reason = ""
        link.controlling = initiate
        self._apply_checksums(link)
        if initiate:
            self._kick(link)
        else:
            self._kick_unless_handshaken(link)
        self._emit(LinkEvent(link.peer_id, "connected", result=result))

    # -- direct sockets --

    def attach_direct(self, peer_id: str, taken: TakenSocket, result: IceResult, *,
                      initiate: bool = True) -> None:
        """ICE selected a pair whose local side is a plain socket (``sock``, a duplicate the
        Device's threads now read with the fast path): point the peer there and report
        ``connected``. The socket the peer used before keeps receiving a little while."""
        link = self._links.get(peer_id)
        if self._stopped or link is None:  # stopped, or the peer left meanwhile
            taken.sock.close()
            return
        try:
            direct = self.io.open(taken.sock, owner=peer_id, on_stun=taken.stun)
        except BaseException:
            taken.sock.close()  # the duplicate is ours until the I/O table holds it
            raise
        direct.early(taken.early, result.remote_addr)
        self.device.serve(direct, f"udp-{peer_id[:8]}")
        self.mux.detach(peer_id)
        self._use_direct(link, direct, result.remote_addr, "direct-socket", crosses_nat(result))
        self._connected(link, result, initiate)

    def restore(self, peer_id: str, endpoint: tuple[str, int], local_port: int = 0) -> bool:
        """Bring a link back without signalling (DESIGN.md §4.5): send from our own socket
        (``local_port``, the port the peer knew us by, when it is free) to the peer's last
        working ``endpoint`` and start a WireGuard handshake now; persistent keepalive on.
        ICE may take over later. False when the peer already has a path."""
        link = self._links.get(peer_id)
        if link is None or link.direct is not None or self.mux.attached(peer_id):
            return False
        direct = self._own_socket(local_port)
        self._use_direct(link, direct, endpoint, "cached", True)
        self._kick(link)
        return True

    def network_changed(self, addresses: set[str]) -> list[str]:
        """The host's addresses changed (``addresses``: the ones it has now). A direct path
        on a socket bound to an address that is gone moves to our own wildcard socket; every
        peer gets a keepalive (a handshake if it has no session) at once, so it follows us
        by roaming. Returns the peers whose path moved."""
        moved = []
        for link in self._links.values():
            endpoint = self.device.endpoint_of(link.public_key)
            direct = link.direct
            if (direct is not None and endpoint is not None and len(endpoint) == 3
                    and direct.local[0] not in ("0.0.0.0", *addresses)):
                own = self._own_socket(0)
                self._use_direct(link, own, (endpoint[0], endpoint[1]), "roamed", True)
                moved.append(link.peer_id)
            self._kick(link)
        return moved

    def direct_endpoint(self, peer_id: str) -> tuple[str, int, int] | None:
        """``(host, port, local port)`` of a working direct path (a handshake in the last
        :data:`CACHE_FRESH` s) for the endpoint cache, else None."""
        link = self._links.get(peer_id)
        if link is None:
            return None
        peer = self.device.peer(link.public_key)
        endpoint = self.device.endpoint_of(link.public_key)
        if peer is None or endpoint is None or len(endpoint) != 3:
            return None
        direct = next((d for d in self.io.sockets() if d.id == endpoint[2]), None)
        last = self.device.peer_stats(peer).get("last_handshake")
        if direct is None or last is None or time.time() - last > CACHE_FRESH:
            return None
        return str(endpoint[0]), int(endpoint[1]), direct.local[1]

    def _own_socket(self, port: int) -> DirectSocket:
        if port in self._own and not self._own[port].closed:
            return self._own[port]
        if not port and self._own:
            return next(iter(self._own.values()))
        direct = self.io.open(bind_direct(port), owner="group")
        self._own[port] = direct
        self._own.setdefault(direct.local[1], direct)
        self.device.serve(direct, f"udp-own-{direct.local[1]}")
        return direct

    def _use_direct(self, link: _Link, direct: DirectSocket, remote: tuple[str, int],
                    kind: str, nat: bool) -> None:
        old, link.direct, link.transport = link.direct, direct, kind
        self.device.set_endpoint_addr(link.public_key, direct.addr(str(remote[0]),
                                                                  int(remote[1])))
        link.keepalive = self.keepalive if nat else 0.0
        self.device.set_persistent_keepalive(link.public_key, link.keepalive)
        if old is not direct:
            self._release(old, later=True)

    def _release(self, direct: DirectSocket | None, later: bool = False) -> None:
        """Close a peer's taken-over socket (our own wildcard sockets stay for the group)."""
        if direct is None or direct.owner == "group":
            return
        if later and not self._stopped:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().call_later(DIRECT_GRACE, self.io.discard, direct)
                return
        self.io.discard(direct)

    def _apply_checksums(self, link: _Link) -> bool:
        """Give the Device peer the checksums its link agreed on; whether partial ones are in
        effect now (never without offloads here)."""
        if self.device.peer(link.public_key) is None:
            return False
        return self.device.set_partial_checksums(link.public_key, link.partial_checksums)

    def _kick(self, link: _Link) -> None:
        """Push a keepalive through the Device: with no session it starts the handshake."""
        if not self._started or self._stopped:
            return
        peer = self.device.peer(link.public_key)
        if peer is not None:
            self.device.send_keepalive(peer)

    def _kick_unless_handshaken(self, link: _Link) -> None:
        """The controlled side leaves the handshake to the controlling one, but that side may
        hold a session from before we restarted (its keepalive then goes nowhere): with still
        no handshake after :data:`CONTROLLED_KICK_DELAY`, start one ourselves."""
        def check() -> None:
            peer = self.device.peer(link.public_key)
            if (peer is not None and self._links.get(link.peer_id) is link
                    and not self.device.peer_stats(peer).get("last_handshake")):
                self._kick(link)

        try:
            asyncio.get_running_loop().call_later(CONTROLLED_KICK_DELAY, check)
        except RuntimeError:  # no event loop (a test attaching a path by hand)
            pass

    def _on_lost(self, link: _Link, session: IceSession, reason: str) -> None:
        if link.session is session and self._links.get(link.peer_id) is link:
            self._failed(link, reason)

    def _failed(self, link: _Link, reason: str) -> None:
        # A relayed path dies with its session; a direct socket does not: WireGuard keeps
        # using it (and its timers tell) until a new session moves the peer elsewhere.
        self.mux.detach(link.peer_id)
        link.state = "failed"
        link.reason = reason
        self._emit(LinkEvent(link.peer_id, "failed", reason=reason))

    async def _close_session(self, link: _Link) -> None:
        session, task = link.session, link.task
        link.session = None
        link.task = None
        self.mux.detach(link.peer_id)
        link.state = "idle"
        link.result = None
        if task is not None and not task.done():
            task.cancel()
        if session is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(ICE_STOP_TIMEOUT):
                    await session.close()
        if task is not None:
            await asyncio.wait({task}, timeout=1.0)

    def _emit(self, event: LinkEvent) -> None:
        try:
            self.on_event(event)
        except Exception:
            log.exception("on_event raised for %s", event)

    # -- what people and tests look at --

    def peer_stats(self, peer_id: str) -> dict[str, Any]:
        """One peer's row. ``state``: ``idle``, ``connecting`` (ICE), ``handshake`` (ICE
        selected a path, no WireGuard session yet), ``up`` (both: the link carries packets)
        or ``failed`` (``reason`` says why)."""
        link = self._links[peer_id]
        result = link.result if link.state == "up" else None
        stats: dict[str, Any] = {
            "peer_id": peer_id,
            "state": link.state,
            "path": result.path if result else None,
            "local_candidate_type": result.local_candidate_type if result else None,
            "remote_candidate_type": result.remote_candidate_type if result else None,
            "remote_endpoint": (f"{result.remote_addr[0]}:{result.remote_addr[1]}"
                                if result else None),
            "rtt": result.rtt if result else None,
            "connect_time": result.connect_time if result else None,
            "reason": link.reason,
            "controlling": link.controlling,
            "transport": None,
            "local_port": None,
            "keepalive": link.keepalive,
            "checksums": "full",  # the Device's row says "partial" when they are in effect
            "allowed_ips": list(link.allowed_ips),
            "ice": link.session.stats() if link.session is not None else None,
        }
        peer = self.device.peer(link.public_key)
        if peer is not None:
            device_stats = self.device.peer_stats(peer)
            endpoint = self.device.endpoint_of(link.public_key)
            device_stats.pop("endpoint", None)  # the token: remote_endpoint says where
            stats.update(device_stats)
            if link.state == "up" and not link.confirmed:
                # "up" means the link carries packets: ICE selected a path AND WireGuard has a
                # confirmed session (an initiator's after the response, a responder's after
                # the first packet on it). Until then the peer is in "handshake". Once seen
                # the flag stays for this path (a session that later expires on an idle link
                # is renewed on demand, the link is still up).
                link.confirmed = device_stats.get("session_age") is not None
            if endpoint is not None and len(endpoint) == 3:
                direct = link.direct
                stats["transport"] = link.transport
                stats["remote_endpoint"] = display(endpoint)
                stats["local_port"] = direct.local[1] if direct is not None else None
            elif endpoint is not None and self.mux.attached(peer_id):
                stats["transport"] = "ice-relay"
        if link.state == "up" and not link.confirmed:
            stats["state"] = "handshake"
        return stats

    def datapath(self) -> str:
        """``offload`` when the TUN device hands over TCP super-packets, else ``per-packet``."""
        tun = self.device.tun
        offloads = tun.stats().get("offloads") if hasattr(tun, "stats") else False
        return "offload" if offloads else "per-packet"

    def stats(self) -> dict[str, Any]:
        device = self.device.stats()
        device.pop("peers", None)
        return {
            "public_key": self.device.public_key.hex(),
            "peers": {peer_id: self.peer_stats(peer_id) for peer_id in self._links},
            "device": device,
            "datapath": self.datapath(),
            "mux": self.mux.stats(),
            "direct": [d.stats() for d in self.io.sockets()],
        }
