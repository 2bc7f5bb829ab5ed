"""ICE for links: the one adapter around aioice (STYLE.md B.2), one :class:`IceSession` per
link session.

The orchestrator's use, per signalled session (``sid``)::

    ice = IceSession(controlling=my_id > peer_id, servers=servers, ufrag=u, pwd=p,
                     on_failed=lambda reason: resignal(peer))
    mine = await ice.gather()                    # send to the peer with u, p
    ice.set_remote_credentials(peer_ufrag, peer_pwd)
    ice.add_remote(peer_candidates, end=True)    # may also trickle in several calls
    result = await ice.connect()                 # IceResult, or raises IceFailed(reason)
    io = ice.transport()                         # DatagramIO for the link device's threads
    ...
    await ice.close()

Contracts:

* Nothing a peer sends makes this module raise: bad candidates are dropped and counted in
  :attr:`IceSession.rejected` (reason → count); bad remote credentials make ``connect()``
  fail with ``IceFailed("credentials")``. Candidate text is parsed by :func:`parse_candidate`,
  which raises only :class:`~socialvpn.errors.ProtocolError`.
* Every wait is bounded: ``gather()`` by ``gather_timeout``, ``connect()`` by
  ``connect_timeout`` (aioice alone may wait 63 s per check, and once in ~50 runs one side
  never finishes: TESTBED.md), ``close()`` by :data:`CLOSE_TIMEOUT`.
* ``stun_retry_max`` lowers the retransmissions of this session's connectivity checks only
  (aioice reads the process-wide ``aioice.stun.RETRY_MAX`` per transaction; this module never
  changes it). aioice's TURN client (allocate, refresh, channel bind, delete) keeps its own
  7 tries (63.5 s): the outer bounds above cover gathering and closing.
* After ``connect()``, losing the selected pair sets :attr:`IceSession.failed` and calls
  ``on_failed(reason)`` once: ``consent-expired`` (``consent_failures`` consecutive checks,
  one every ~``consent_interval`` s, unanswered: ~30 s by default), or ``connection-lost``
  (the socket or the TURN allocation under the pair went away). The session then closes
  itself. There is no ICE restart: make a new session. (This module runs its own consent
  loop in place of aioice's, identical but with per-session timings.)
* Any datagram that is not STUN, from any source address, is handed up as data (aioice does
  not filter): whatever runs above must authenticate every packet (WireGuard does).

aioice facts this adapter leans on (0.13): the local side of a pair is always a host or relay
*socket* (an srflx candidate shares its host socket), so the local candidate type is learned
from the XOR-MAPPED-ADDRESS of one extra Binding request on the selected pair, which also
measures the RTT; the selected pair is ``Connection._nominated[1]``. Only the first STUN and
the first TURN server of :class:`IceServers` are used (aioice takes one of each).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import queue
import random
import re
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aioice
from aioice import stun
from aioice.candidate import Candidate

from ..errors import ProtocolError, SocialVPNError
from .transport import SockAddr

log = logging.getLogger("socialvpn.link.ice")

# --- limits and timings ----------------------------------------------------------------------

MAX_CANDIDATE_LENGTH = 512  # one SDP candidate line; real ones are ~100-150 characters
MAX_REMOTE_CANDIDATES = 32  # per session; each one costs a check per local socket
MAX_FOUNDATION_LENGTH = 32  # RFC 8839: 1*32ice-char
MAX_EXTENSION_PAIRS = 8  # "raddr x rport y generation z ..." after "typ <type>"
SIGNALLED_TYPES = ("host", "srflx", "relay")  # prflx is learned from checks, never signalled
GATHER_TIMEOUT = 10.0  # aioice gives STUN/TURN 5 s itself; this is the outer bound
CONNECT_TIMEOUT = 20.0
CLOSE_TIMEOUT = 3.0
PROBE_TIMEOUT = 1.5  # the Binding request that measures the RTT of the selected pair
CONSENT_INTERVAL = 5.0  # RFC 7675 consent checks, randomised 0.8..1.2x (as aioice)
CONSENT_FAILURES = 6  # consecutive unanswered checks (0.5 s each) before consent expires
RECV_QUEUE = 256  # datagrams held for recv() while nobody reads
TRANSPORT_QUEUE = 1024  # datagrams held in each direction between asyncio and the threads
MAX_STUN_IN_FLIGHT = 64  # STUN datagrams from a taken-over socket waiting for the loop

_ICE_CHARS = re.compile(r"[A-Za-z0-9+/]+")
_DIGITS = re.compile(r"[0-9]{1,10}")


class IceFailed(SocialVPNError):
    """ICE could not select a pair, or lost it. ``reason`` is a short stable token:
    ``timeout``, ``checks-failed``, ``credentials``, ``no-candidates``, ``gather-timeout``,
    ``consent-expired``, ``connection-lost``, ``not-connected``, ``closed``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"ICE failed: {reason}" + (f" ({detail})" if detail else ""))
        self.reason = reason


# --- configuration and results ---------------------------------------------------------------


@dataclass(frozen=True)
class TurnServer:
    host: str
    port: int
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class IceServers:
    """STUN servers as ``(host, port)``; TURN servers with long-term credentials (UDP)."""

    stun: tuple[tuple[str, int], ...] = ()
    turn: tuple[TurnServer, ...] = ()


def classify_path(local_type: str, remote_type: str) -> str:
    """``turn`` when either end of the selected pair is a relayed candidate, else ``direct``."""
    return "turn" if "relay" in (local_type, remote_type) else "direct"


@dataclass(frozen=True)
class IceResult:
    local_candidate_type: str  # host | srflx | prflx | relay (as the peer sees us)
    remote_candidate_type: str  # host | srflx | prflx | relay
    path: str  # direct | turn
    remote_addr: tuple[str, int]  # where our datagrams go
    local_addr: tuple[str, int]  # our address as the peer sees it (relayed address on TURN)
    rtt: float | None  # seconds, one Binding round trip on the selected pair; None if lost
    connect_time: float = 0.0  # seconds spent in connect()


# --- candidates ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteCandidate:
    """A peer's candidate that passed :func:`parse_candidate` (IPv4, UDP, component 1)."""

    foundation: str
    priority: int
    host: str
    port: int
    type: str
    related_address: str | None = None
    related_port: int | None = None
    component: int = 1

    def to_sdp(self) -> str:
        text = (f"candidate:{self.foundation} {self.component} udp {self.priority} "
                f"{self.host} {self.port} typ {self.type}")
        if self.related_address is not None:
            text += f" raddr {self.related_address}"
        if self.related_port is not None:
            text += f" rport {self.related_port}"
        return text


def _number(text: str, low: int, high: int, what: str) -> int:
    if not _DIGITS.fullmatch(text):  # no sign, no "_", no non-ASCII digits (int() takes them)
        raise ProtocolError(f"candidate {what} is not a number", "malformed")
    value = int(text)
    if not low <= value <= high:
        raise ProtocolError(f"candidate {what} out of range", "malformed")
    return value


def _ipv4(text: str, what: str) -> ipaddress.IPv4Address:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:  # hostnames (mDNS ".local" too) are never resolved for a peer
        raise ProtocolError(f"candidate {what} is not an IP address", "address") from None
    if not isinstance(ip, ipaddress.IPv4Address):
        raise ProtocolError(f"candidate {what} is not IPv4", "address")
    return ip


def parse_candidate(text: object) -> RemoteCandidate:
    """Parse one SDP candidate (``candidate:...``, ``a=candidate:...`` or bare) from a peer.

    Raises only :class:`ProtocolError` (``reason``: ``oversize``, ``malformed``, ``address``,
    ``type``, ``component``, ``transport``). Accepted: component 1, UDP, IPv4, host/srflx/relay,
    an address a peer can be reached at (not unspecified, loopback, multicast or reserved).
    """
    if not isinstance(text, str):
        raise ProtocolError("candidate is not text", "malformed")
    if len(text) > MAX_CANDIDATE_LENGTH:
        raise ProtocolError("candidate too long", "oversize")
    line = text.strip()
    if not line.isascii() or not line.isprintable():
        raise ProtocolError("candidate has control or non-ASCII characters", "malformed")
    for prefix in ("a=candidate:", "candidate:"):
        if line.startswith(prefix):
            line = line[len(prefix):]
            break
    bits = line.split()
    if len(bits) < 8 or bits[6] != "typ":
        raise ProtocolError("candidate has too few fields", "malformed")
    extensions = bits[8:]
    if len(extensions) % 2 or len(extensions) > 2 * MAX_EXTENSION_PAIRS:
        raise ProtocolError("candidate extensions are not name/value pairs", "malformed")
    foundation = bits[0]
    if len(foundation) > MAX_FOUNDATION_LENGTH or not _ICE_CHARS.fullmatch(foundation):
        raise ProtocolError("candidate foundation is not 1*32ice-char", "malformed")
    if _number(bits[1], 0, 256, "component") != 1:
        raise ProtocolError("candidate is not for component 1", "component")
    if bits[2].lower() != "udp":
        raise ProtocolError("candidate is not UDP", "transport")
    priority = _number(bits[3], 1, 2**32 - 1, "priority")
    ip = _ipv4(bits[4], "address")
    if ip.is_unspecified or ip.is_loopback or ip.is_multicast or ip.is_reserved:
        raise ProtocolError("candidate address cannot be a peer", "address")
    port = _number(bits[5], 1, 65535, "port")
    kind = bits[7]
    if kind not in SIGNALLED_TYPES:
        raise ProtocolError("candidate type not accepted", "type")
    related_address: str | None = None
    related_port: int | None = None
    for name, value in zip(extensions[::2], extensions[1::2], strict=True):
        if name == "raddr":
            related_address = str(_ipv4(value, "raddr"))
        elif name == "rport":
            related_port = _number(value, 0, 65535, "rport")
        # generation, network-id, ufrag...: ignored
    return RemoteCandidate(foundation=foundation, priority=priority, host=str(ip), port=port,
                           type=kind, related_address=related_address, related_port=related_port)


def _to_aioice(c: RemoteCandidate) -> Candidate:
    return Candidate(foundation=c.foundation, component=c.component, transport="udp",
                     priority=c.priority, host=c.host, port=c.port, type=c.type,
                     related_address=c.related_address, related_port=c.related_port)


def valid_ufrag(value: object) -> bool:
    """RFC 8445 ice-ufrag: 4..256 ice-char."""
    return isinstance(value, str) and 4 <= len(value) <= 256 and bool(_ICE_CHARS.fullmatch(value))


def valid_pwd(value: object) -> bool:
    """RFC 8445 ice-pwd: 22..256 ice-char."""
    return isinstance(value, str) and 22 <= len(value) <= 256 and bool(
        _ICE_CHARS.fullmatch(value))


# --- the datagram bridge to the link device's threads ----------------------------------------


class _Closed:
    def __init__(self, reason: str) -> None:
        self.reason = reason


class IceTransport:
    """A :class:`~socialvpn.link.transport.DatagramIO` over a connected ICE pair.

    The link device's threads call ``sendto``/``recv_into`` and block like on a socket; the
    event loop that runs aioice sends and receives. Two bounded queues bridge them: a full
    queue drops the datagram and counts it in :attr:`errors` (``tx-queue-full``,
    ``rx-queue-full``); WireGuard's timers and TCP recover, as from any loss. The address
    argument of ``sendto`` is ignored (the pair has one far end) and every datagram received
    is reported as coming from :attr:`remote`. When the pair is lost or the transport closed,
    blocked and later ``recv_into`` calls raise ``OSError(ENOTCONN)``; sends are dropped.

    Made by :meth:`IceSession.transport`; tests may build one over any ``send`` callable.
    ``close()`` detaches the device; the ICE session stays open until its owner closes it.
    STUN never reaches the device here (aioice consumes it), so ``Device.on_stun`` is unused.
    """

    gso = False
    gro = False

    def __init__(self, loop: asyncio.AbstractEventLoop, send: Callable[[bytes], None],
                 remote_addr: tuple[str, int], *, queue_size: int = TRANSPORT_QUEUE) -> None:
        self._loop = loop
        self._send = send
        self.remote: SockAddr = (str(remote_addr[0]), int(remote_addr[1]))
        self._rx: queue.Queue[bytes | _Closed] = queue.Queue(queue_size)
        self._tx: queue.Queue[bytes] = queue.Queue(queue_size)
        self._lock = threading.Lock()
        self._flush_scheduled = False
        self._closed: _Closed | None = None
        self.errors: dict[str, int] = {}

    def _count(self, name: str) -> None:
        with self._lock:
            self.errors[name] = self.errors.get(name, 0) + 1

    # -- any thread --

    def sendto(self, data: bytes | bytearray | memoryview, addr: SockAddr) -> None:
        if self._closed is not None:
            self._count("closed")
            return
        try:
            self._tx.put_nowait(bytes(data))
        except queue.Full:
            self._count("tx-queue-full")
            return
        with self._lock:
            if self._flush_scheduled:
                return
            self._flush_scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the event loop is closed: nothing will ever send
            with self._lock:
                self._flush_scheduled = False
            self._count("loop-closed")

    def send_batch(self, messages: list[bytearray], addr: SockAddr) -> None:
        for message in messages:
            self.sendto(message, addr)

    def recv_into(self, buf: bytearray) -> tuple[int, SockAddr]:
        item = self._rx.get()
        if isinstance(item, _Closed):
            self._post_closed(item)  # for the next reader
            raise OSError(errno.ENOTCONN, f"ICE transport closed: {item.reason}")
        n = min(len(item), len(buf))
        buf[:n] = item[:n]
        return n, self.remote

    def recv_segments(self, buf: bytearray) -> tuple[int, int, SockAddr]:
        n, addr = self.recv_into(buf)
        return n, n, addr

    def sockaddr(self, host: str, port: int) -> SockAddr:
        return (str(ipaddress.ip_address(host)), int(port))

    def wake(self) -> None:
        with contextlib.suppress(queue.Full):
            self._rx.put_nowait(b"")  # the device treats an empty datagram as a wake-up

    def close(self) -> None:
        self.fail("closed")

    # -- the event loop (fail() is safe from any thread) --

    def fail(self, reason: str) -> None:
        """The pair is gone (or the device detached): readers get ENOTCONN from now on."""
        if self._closed is None:
            self._closed = _Closed(reason)
            self._post_closed(self._closed)

    def _post_closed(self, marker: _Closed) -> None:
        while True:
            try:
                self._rx.put_nowait(marker)
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._rx.get_nowait()  # make room: the marker must get through

    def deliver(self, data: bytes) -> None:
        if self._closed is not None:
            return
        try:
            self._rx.put_nowait(data)
        except queue.Full:
            self._count("rx-queue-full")

    def _flush(self) -> None:
        with self._lock:
            self._flush_scheduled = False
        while True:
            try:
                data = self._tx.get_nowait()
            except queue.Empty:
                return
            if self._closed is None:
                self._send(data)


@dataclass(frozen=True)
class TakenSocket:
    """What :meth:`IceSession.take_socket` hands over."""

    sock: socket.socket
    stun: Callable[[bytes, tuple[str, int]], None]  # give a STUN datagram back to aioice
    early: tuple[bytes, ...] = ()  # non-STUN datagrams received before the take-over


# --- the session -----------------------------------------------------------------------------


class StunHandOff:
    """Hands STUN datagrams from a taken-over socket's reader thread to the event loop
    (``post``), at most ``limit`` waiting at a time: the thread reads faster than the loop, and
    a flood of STUN-looking datagrams must not grow the loop's queue without bound (before the
    take-over the kernel dropped what asyncio did not read). Excess datagrams are counted in
    ``dropped``. ``posted``/``dropped`` are written only by the reader thread, ``handled`` only
    by the loop, so no lock is needed."""

    def __init__(self, post: Callable[[bytes, tuple[str, int]], object],
                 closing: Callable[[], bool], limit: int = MAX_STUN_IN_FLIGHT) -> None:
        self._post = post
        self._closing = closing
        self.limit = limit
        self.posted = 0
        self.handled = 0
        self.dropped = 0

    def __call__(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._closing():
            return
        if self.posted - self.handled >= self.limit:
            self.dropped += 1
            return
        self.posted += 1
        with contextlib.suppress(RuntimeError):  # the loop is closed
            self._post(data, addr)


class IceSession:
    """One ICE negotiation and its selected pair (component 1, UDP, IPv4). Use it from one
    event loop; only :class:`IceTransport`'s thread-side methods are for other threads.

    ``exclude_networks`` (CIDR strings) drops local host candidates inside them, with the srflx
    candidates learned through them: pass the overlay's own prefixes so ICE never runs over the
    VPN itself.
    """

    def __init__(
        self,
        *,
        controlling: bool,
        servers: IceServers,
        ufrag: str,
        pwd: str,
        connect_timeout: float = CONNECT_TIMEOUT,
        stun_retry_max: int | None = None,
        gather_timeout: float = GATHER_TIMEOUT,
        exclude_networks: Iterable[str] = (),
        max_remote_candidates: int = MAX_REMOTE_CANDIDATES,
        consent_interval: float = CONSENT_INTERVAL,
        consent_failures: int = CONSENT_FAILURES,
        on_failed: Callable[[str], None] | None = None,
    ) -> None:
        if not valid_ufrag(ufrag):
            raise ValueError("ufrag must be 4..256 ice-char ([A-Za-z0-9+/])")
        if not valid_pwd(pwd):
            raise ValueError("pwd must be 22..256 ice-char ([A-Za-z0-9+/])")
        if stun_retry_max is not None and stun_retry_max < 0:
            raise ValueError("stun_retry_max must be >= 0")
        self.controlling = controlling
        self.servers = servers
        self.connect_timeout = connect_timeout
        self.gather_timeout = gather_timeout
        self.stun_retry_max = stun_retry_max
        self.max_remote_candidates = max_remote_candidates
        self.consent_interval = consent_interval
        self.consent_failures = max(1, consent_failures)
        self._exclude = tuple(ipaddress.ip_network(n, strict=False) for n in exclude_networks)
        self._on_failed = on_failed
        stun_server = servers.stun[0] if servers.stun else None
        turn = servers.turn[0] if servers.turn else None
        self._conn = aioice.Connection(
            ice_controlling=controlling,
            components=1,
            stun_server=stun_server,
            turn_server=(turn.host, turn.port) if turn else None,
            turn_username=turn.username if turn else None,
            turn_password=turn.password if turn else None,
            use_ipv4=True,
            use_ipv6=False,
            local_username=ufrag,
            local_password=pwd,
        )
        self.failed = asyncio.Event()
        """Set when the session fails at any stage (see :attr:`failure_reason`)."""
        self.failure_reason: str | None = None
        self.rejected: dict[str, int] = {}
        """Remote input dropped, by reason (``malformed``, ``address``, ``too-many``...)."""
        self.drops: dict[str, int] = {}
        """Datagrams dropped on the data path, by reason (``recv-queue-full``...)."""
        self.warnings: list[str] = []
        self.result: IceResult | None = None
        self._local: list[str] | None = None
        self._pending: list[RemoteCandidate] = []
        self._accepted = 0
        self._remote_end = False
        self._end_sent = False
        self._credentials_error: str | None = None
        self._connecting = False
        self._connected = False
        self._closing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._drain_task: asyncio.Task[None] | None = None
        self._close_task: asyncio.Future[None] | None = None
        self._rx: asyncio.Queue[bytes | None] = asyncio.Queue(RECV_QUEUE)
        self._transport: IceTransport | None = None
        self._taken = False
        self._handoff: StunHandOff | None = None  # set when the socket is taken over

    # -- introspection --

    @property
    def local_credentials(self) -> tuple[str, str]:
        return self._conn.local_username, self._conn.local_password

    @property
    def connected(self) -> bool:
        return self._connected and self.failure_reason is None and not self._closing

    def stats(self) -> dict[str, Any]:
        return {
            "controlling": self.controlling,
            "local_candidates": len(self._local or ()),
            "remote_candidates": self._accepted,
            "rejected": dict(sorted(self.rejected.items())),
            "drops": dict(sorted(self._all_drops().items())),
            "connected": self.connected,
            "failure": self.failure_reason,
            "path": self.result.path if self.result else None,
            "transport_errors": dict(self._transport.errors) if self._transport else {},
        }

    def _reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def _all_drops(self) -> dict[str, int]:
        if self._handoff is None or not self._handoff.dropped:
            return self.drops
        return {**self.drops, "stun-flood": self._handoff.dropped}

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- gathering --

    async def _gather_without_excluded(self) -> None:
        """aioice's gather_candidates, but host addresses inside ``exclude_networks`` (the
        group's own overlay subnets) are left out *before* gathering: a STUN request from an
        overlay address can never be answered and would hold gathering for aioice's 5 s."""
        conn = self._conn
        components = getattr(conn, "_components", None)
        if not self._exclude or components is None or conn._local_candidates_start:
            await conn.gather_candidates()
            return
        addresses = [
            a for a in aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False)
            if not any(ipaddress.ip_address(a) in net for net in self._exclude)
        ]
        conn._local_candidates_start = True
        results = await asyncio.gather(*(
            conn.get_component_candidates(component=c, addresses=addresses) for c in components))
        for candidates in results:
            conn._local_candidates += candidates
        conn._local_candidates_end = True

    async def gather(self) -> list[str]:
        """Gather host, server-reflexive and relayed candidates (bounded); returns them as SDP
        attribute strings (``candidate:...``). Raises IceFailed (and closes the session) if
        there are none. A STUN or TURN server that gives nothing is not fatal: it is logged
        and listed in :attr:`warnings`."""
        if self._local is not None:
            return list(self._local)
        if self._closing:
            raise IceFailed("closed")
        try:
            async with asyncio.timeout(self.gather_timeout):
                await self._gather_without_excluded()
        except TimeoutError:
            self._set_failed("gather-timeout")
            await self.close()
            raise IceFailed("gather-timeout", f"after {self.gather_timeout}s") from None
        await self._drop_excluded()
        self._limit_retries()
        candidates = self._conn.local_candidates
        kinds = {c.type for c in candidates}
        if self.servers.turn and "relay" not in kinds:
            self._warn(f"TURN {self.servers.turn[0].host}:{self.servers.turn[0].port} gave no "
                       "relayed candidate (unreachable, or credentials refused)")
        if self.servers.stun and "srflx" not in kinds:
            self._warn(f"STUN {self.servers.stun[0][0]}:{self.servers.stun[0][1]} gave no "
                       "server-reflexive candidate")
        if not candidates:
            self._set_failed("no-candidates")
            await self.close()
            raise IceFailed("no-candidates")
        self._local = ["candidate:" + c.to_sdp() for c in candidates]
        return list(self._local)

    def _warn(self, text: str) -> None:
        self.warnings.append(text)
        log.warning("ICE: %s", text)

    def _excluded(self, host: str | None) -> bool:
        if not self._exclude or host is None:
            return False
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(ip in net for net in self._exclude)

    async def _drop_excluded(self) -> None:
        conn = self._conn
        gone = [p for p in conn._protocols
                if p.local_candidate.type == "host" and self._excluded(p.local_candidate.host)]
        if not gone:
            return
        for protocol in gone:
            conn._protocols.remove(protocol)
            await protocol.close()
        bases = {p.local_candidate.host for p in gone}
        conn._local_candidates = [
            c for c in conn._local_candidates
            if c.host not in bases and not (c.type == "srflx" and c.related_address in bases)
        ]

    def _limit_retries(self) -> None:
        """Make this session's checks give up after ``stun_retry_max`` retransmissions
        (0.5 s, then doubling) instead of aioice's 6 (63.5 s). Explicit counts (consent uses
        0) are kept."""
        limit = self.stun_retry_max
        if limit is None:
            return
        for protocol in self._conn._protocols:
            original = protocol.request

            async def request(request: stun.Message, addr: tuple[str, int],
                              integrity_key: bytes | None = None,
                              retransmissions: int | None = None,
                              _original: Any = original) -> Any:
                return await _original(
                    request, addr, integrity_key=integrity_key,
                    retransmissions=limit if retransmissions is None else retransmissions)

            protocol.request = request  # type: ignore[method-assign]

    # -- remote side --

    def set_remote_credentials(self, ufrag: object, pwd: object) -> None:
        """The peer's ufrag/pwd from signalling. Malformed ones make ``connect()`` fail with
        ``IceFailed("credentials")``; this never raises."""
        if self._connecting:
            self._reject("credentials-late")
            return
        if not (valid_ufrag(ufrag) and valid_pwd(pwd)):
            self._credentials_error = "remote ufrag/pwd are not ice-char strings of legal length"
            self._reject("credentials")
            return
        self._credentials_error = None
        self._conn.remote_username = ufrag  # type: ignore[assignment]
        self._conn.remote_password = pwd  # type: ignore[assignment]

    def add_remote(self, candidates: Iterable[object], end: bool) -> None:
        """Add the peer's candidates (SDP strings); ``end`` = end-of-candidates. May be called
        several times (trickle), before or during ``connect()``. Never raises: bad or surplus
        candidates are dropped and counted in :attr:`rejected`."""
        try:
            items = list(candidates) if not isinstance(candidates, str | bytes) else [candidates]
        except Exception:  # a hostile iterable: count it, keep going
            self._reject("malformed")
            items = []
        for text in items:
            if self._remote_end:
                self._reject("after-end")
                continue
            if self._accepted >= self.max_remote_candidates:
                self._reject("too-many")
                continue
            try:
                candidate = parse_candidate(text)
            except ProtocolError as exc:
                self._reject(exc.reason)
                continue
            self._accepted += 1
            self._pending.append(candidate)
        if end:
            self._remote_end = True
        self._kick()

    def _kick(self) -> None:
        """Hand pending remote candidates to aioice soon (once gathering is done)."""
        if self._local is None or self._closing:
            return  # gather() must have run: aioice pairs candidates with its sockets
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # connect() feeds them
        if self._drain_task is None or self._drain_task.done():
            self._drain_task = self._spawn(self._drain())

    async def _drain(self) -> None:
        while self._pending and not self._closing:
            await self._conn.add_remote_candidate(_to_aioice(self._pending.pop(0)))
        if self._remote_end and not self._end_sent and not self._closing:
            self._end_sent = True
            await self._conn.add_remote_candidate(None)

    # -- connecting --

    async def connect(self) -> IceResult:
        """Run the connectivity checks until a pair is nominated; bounded by
        ``connect_timeout``. Fails with IceFailed (and the session is closed) otherwise.
        aioice reports failure only after end-of-candidates; until then only the timeout
        ends a hopeless attempt."""
        if self._closing:
            raise IceFailed("closed")
        if self._local is None:
            raise RuntimeError("IceSession.connect() before gather()")
        if self._connecting:
            raise RuntimeError("IceSession.connect() called twice")
        self._connecting = True
        loop = asyncio.get_running_loop()
        started = loop.time()
        reason: str | None = None
        detail = ""
        if self._credentials_error is not None:
            reason, detail = "credentials", self._credentials_error
        elif self._conn.remote_username is None or self._conn.remote_password is None:
            reason, detail = "credentials", "remote ufrag/pwd not set"
        else:
            try:
                await self._drain()
                async with asyncio.timeout(self.connect_timeout):
                    await self._conn.connect()
            except TimeoutError:
                reason, detail = "timeout", f"no pair selected in {self.connect_timeout}s"
            except ConnectionError as exc:
                reason, detail = "checks-failed", str(exc)
        if reason is None and self._closing:
            reason = "closed"
        if reason is not None:
            self._set_failed(reason)
            await self.close()
            raise IceFailed(reason, detail)
        self._connected = True
        # Our consent loop replaces aioice's (same checks, per-session timings).
        aioice_consent = self._conn._query_consent_task
        if aioice_consent is not None:
            aioice_consent.cancel()
        self.result = await self._describe(loop.time() - started)
        self._spawn(self._watch())
        self._spawn(self._pump())
        self._spawn(self._consent())
        log.info("ICE selected %s/%s -> %s/%s (%s, rtt %s)", self.result.local_candidate_type,
                 self.result.local_addr, self.result.remote_candidate_type,
                 self.result.remote_addr, self.result.path,
                 f"{self.result.rtt * 1000:.1f} ms" if self.result.rtt is not None else "?")
        return self.result

    async def _describe(self, elapsed: float) -> IceResult:
        pair = self._conn._nominated[1]
        local, remote = pair.local_candidate, pair.remote_candidate
        local_type, local_addr = local.type, (local.host, local.port)
        rtt, mapped = await self._probe(pair)
        if mapped is not None and local_type == "host" and mapped != local_addr:
            # The peer sees us at another address: a NAT mapping we learned from STUN (srflx)
            # or one only the peer saw (prflx).
            known = any(c.type == "srflx" and (c.host, c.port) == mapped
                        for c in self._conn.local_candidates)
            local_type, local_addr = ("srflx" if known else "prflx"), mapped
        return IceResult(
            local_candidate_type=local_type,
            remote_candidate_type=remote.type,
            path=classify_path(local_type, remote.type),
            remote_addr=(pair.remote_addr[0], pair.remote_addr[1]),
            local_addr=(local_addr[0], local_addr[1]),
            rtt=rtt,
            connect_time=elapsed,
        )

    async def _probe(self, pair: Any) -> tuple[float | None, tuple[str, int] | None]:
        """One authenticated Binding request on the selected pair: its RTT and our address as
        the peer saw it (like a consent check)."""
        loop = asyncio.get_running_loop()
        request = self._conn.build_request(pair, nominate=False)
        started = loop.time()
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                response, _ = await pair.protocol.request(
                    request, pair.remote_addr,
                    integrity_key=self._conn.remote_password.encode("utf8"),
                    retransmissions=1)
        except (TimeoutError, stun.TransactionError, ConnectionError, OSError):
            return None, None
        mapped = response.attributes.get("XOR-MAPPED-ADDRESS")
        return loop.time() - started, (tuple(mapped[:2]) if mapped else None)

    # -- after connecting --

    async def _watch(self) -> None:
        # A safety net: aioice closes a connection by itself only from its own consent loop,
        # which connect() cancels; any other close is ours.
        await self._conn.get_event()
        if not self._closing:
            self._lost("consent-expired")

    async def _consent(self) -> None:
        """RFC 7675 consent freshness: a Binding request (no retransmission) every
        ~``consent_interval`` s; ``consent_failures`` unanswered in a row end the session."""
        failures = 0
        while True:
            await asyncio.sleep(self.consent_interval * (0.8 + 0.4 * random.random()))
            pair = self._conn._nominated.get(1)
            if pair is None or self._conn.remote_password is None:
                return
            request = self._conn.build_request(pair, nominate=False)
            try:
                await pair.protocol.request(
                    request, pair.remote_addr,
                    integrity_key=self._conn.remote_password.encode("utf8"),
                    retransmissions=0)
                failures = 0
            except (stun.TransactionError, ConnectionError, OSError):
                failures += 1
            if failures >= self.consent_failures:
                self._lost("consent-expired")
                return

    async def _pump(self) -> None:
        """aioice's receive queue is unbounded: drain it always, into ours or the transport's
        (both bounded)."""
        try:
            while True:
                data = await self._conn.recv()
                if self._transport is not None:
                    self._transport.deliver(data)
                else:
                    try:
                        self._rx.put_nowait(data)
                    except asyncio.QueueFull:
                        self._drop("recv-queue-full")
        except ConnectionError:
            if not self._closing:
                self._lost("connection-lost")

    def _set_failed(self, reason: str) -> None:
        if self.failure_reason is None:
            self.failure_reason = reason
            self.failed.set()

    def _lost(self, reason: str) -> None:
        """The selected pair is gone: tell the owner once, wake readers, release sockets."""
        if self.failure_reason is not None or self._closing:
            return
        log.info("ICE pair lost: %s", reason)
        self._set_failed(reason)
        self._wake_readers(reason)
        if self._on_failed is not None:
            try:
                self._on_failed(reason)
            except Exception:
                log.exception("on_failed callback raised")
        self._spawn(self.close())

    def _wake_readers(self, reason: str) -> None:
        if self._transport is not None:
            self._transport.fail(reason)
        while True:
            try:
                self._rx.put_nowait(None)
                return
            except asyncio.QueueFull:
                self._rx.get_nowait()

    # -- data --

    def _send_now(self, data: bytes) -> None:
        pair = self._conn._nominated.get(1)
        if pair is None or self._closing:
            self._drop("send-not-connected")
            return
        try:
            pair.protocol.transport.sendto(data, pair.remote_addr)
        except OSError:
            self._drop("send-error")

    async def send(self, data: bytes) -> None:
        """Send one datagram on the selected pair (via the relay on a TURN path)."""
        if not self.connected:
            raise IceFailed(self.failure_reason or "not-connected")
        self._send_now(bytes(data))

    async def recv(self) -> bytes:
        """The next datagram from the selected pair's sockets. Raises IceFailed once the pair
        is lost or the session closed. Not usable once :meth:`transport` has been taken."""
        if self._transport is not None:
            raise RuntimeError("IceSession.recv() while an IceTransport owns the data path")
        if not self._connected:
            raise IceFailed(self.failure_reason or "not-connected")
        if self._closing and self._rx.empty():
            raise IceFailed(self.failure_reason or "closed")
        data = await self._rx.get()
        if data is None:
            self._rx.put_nowait(None)  # for the next reader
            raise IceFailed(self.failure_reason or "closed")
        return data

    def transport(self, queue_size: int = TRANSPORT_QUEUE) -> IceTransport:
        """The data path for the link device's threads (one per session; call on the loop)."""
        if not self.connected or self.result is None:
            raise IceFailed(self.failure_reason or "not-connected")
        if self._transport is None:
            transport = IceTransport(asyncio.get_running_loop(), self._send_now,
                                     self.result.remote_addr, queue_size=queue_size)
            while not self._rx.empty():
                item = self._rx.get_nowait()
                if item is not None:
                    transport.deliver(item)
            self._transport = transport
        return self._transport

    def take_socket(self) -> TakenSocket | None:
        """Hand the selected pair's UDP socket to the link device's threads (call on the loop,
        after ``connect()``): returns a duplicate of the socket aioice bound, and a function
        (callable from any thread) that gives a STUN datagram received on it back to aioice.
        From now on asyncio no longer reads that socket: whoever reads the duplicate must hand
        every STUN datagram over (consent checks and their answers keep working) and keeps the
        rest. aioice still sends on the socket. ``None`` when our side of the pair is relayed
        (TURN): that path stays on :meth:`transport`.

        Datagrams that arrived before (the peer's first WireGuard message often does) come
        along in ``early``. The duplicate outlives the session: closing the session releases
        only aioice's copy."""
        if not self.connected or self._transport is not None:
            return None
        pair = self._conn._nominated.get(1)
        if pair is None or pair.local_candidate.type == "relay":
            return None
        protocol = pair.protocol
        transport = getattr(protocol, "transport", None)
        get_extra_info = getattr(transport, "get_extra_info", None)
        sock = get_extra_info("socket") if get_extra_info is not None else None
        if sock is None or sock.type != socket.SOCK_DGRAM:
            return None  # a TURN client's transport, not a plain socket
        pause = getattr(transport, "pause_reading", None)
        if pause is None:
            return None
        dup = socket.socket(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno()))
        pause()
        loop = asyncio.get_running_loop()
        self._taken = True

        self._handoff = StunHandOff(
            lambda data, addr: loop.call_soon_threadsafe(self._stun_received, protocol, data,
                                                         addr),
            lambda: self._closing)
        deliver = self._handoff

        early: list[bytes] = []
        while not self._rx.empty():
            item = self._rx.get_nowait()
            if item is not None:
                early.append(item)
        queued = getattr(self._conn, "_queue", None)
        while queued is not None and not queued.empty():
            entry = queued.get_nowait()
            if entry is not None:
                early.append(entry[0])
            else:
                queued.put_nowait(None)  # aioice's own end marker stays for its reader
                break
        return TakenSocket(dup, deliver, tuple(early))

    def _stun_received(self, protocol: Any, data: bytes, addr: tuple[str, int]) -> None:
        if self._handoff is not None:
            self._handoff.handled += 1  # only the loop writes it
        if self._closing:
            return
        try:
            protocol.datagram_received(data, addr)
        except Exception:  # aioice must never take down the loop for one datagram
            log.debug("STUN datagram from %s dropped", addr, exc_info=True)

    # -- teardown --

    async def close(self) -> None:
        """Stop checks and consent, release sockets and the TURN allocation (bounded).
        Idempotent; every caller returns once the closing is done; readers are woken."""
        if self._close_task is None:
            self._closing = True
            self._close_task = asyncio.ensure_future(self._close())
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._wake_readers(self.failure_reason or "closed")
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._conn.close()
        except TimeoutError:
            log.warning("ICE close did not finish in %ss (TURN server unreachable?)",
                        CLOSE_TIMEOUT)
