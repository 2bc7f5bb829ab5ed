"""ICE (socialvpn/link/ice.py) across real NATs: namespaces, nftables NAT routers, coturn.

Topology (one per module, ``tests.kit.netns.Topology``)::

    open (no NAT) ──┐
    home ─ nat_home (EIM) ── pub (coturn on 198.18.0.1:3478)
    phone ─ nat_phone (symmetric) ──┘

Each peer runs its own asyncio event loop on a thread that has joined the peer's namespace
(``setns``) for the thread's whole life. aioice creates its sockets (host, STUN, TURN) and
lists interfaces from whatever thread runs it, so every socket lands in the right namespace
and stays there; the two peers exchange candidates in-process through their loops. This was
chosen over entering a namespace only around ``gather()`` on the test's loop (any socket
another task made meanwhile would land in the wrong namespace, and the thread must reliably
get back) and over one subprocess per peer (candidate exchange and the IceTransport thread
test would need an IPC channel, and failures would be harder to see).

Connectivity checks use ``stun_retry_max=3`` (a failing check gives up after 7.5 s instead of
63.5 s: room for one side of a loaded 2-core machine starting its checks late); the cases that
expect ICE to fail use 1 (1.5 s), so the failure is quick. Every case is bounded by
``connect_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from socialvpn.link.device import Device, PeerConfig
from socialvpn.link.ice import (
    IceFailed,
    IceResult,
    IceServers,
    IceSession,
    IceTransport,
    TurnServer,
)
from socialvpn.link.noise import public_bytes
from socialvpn.net.fake import FakeTun
from socialvpn.net.packet_router import PacketRouter
from tests.kit.coturn import Coturn, cleanup_stale_coturn
from tests.kit.env import integration_unavailable_reason
from tests.kit.netns import NETNS_DIR, NetLab, Netns, Site, Topology, _libc_setns

pytestmark = pytest.mark.integration

T = TypeVar("T")
RETRY_MAX = 3  # 0.5 + 1 + 2 + 4 s per failing check
FAIL_FAST = 1  # 0.5 + 1 s: for the cases where ICE must fail
CONNECT_TIMEOUT = 10.0
CASE_BUDGET = 15.0  # seconds one NAT case may take, setup to teardown


class NsLoop:
    """An asyncio event loop on a thread that lives inside network namespace ``ns``."""

    def __init__(self, ns: Netns) -> None:
        self.ns = ns
        self.loop = asyncio.new_event_loop()
        self._error: BaseException | None = None
        ready = threading.Event()

        def main() -> None:
            try:
                fd = os.open(NETNS_DIR / ns.name, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _libc_setns(fd)
                finally:
                    os.close(fd)
            except BaseException as exc:
                self._error = exc
                ready.set()
                return
            asyncio.set_event_loop(self.loop)
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=main, name=f"loop-{ns.short}", daemon=True)
        self.thread.start()
        ready.wait(5.0)
        if self._error is not None:
            raise self._error

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on this loop; await its result from the caller's loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def call(self, fn: Callable[[], T]) -> T:
        """Call ``fn`` on this loop's thread (for sync methods that need the running loop)."""

        async def wrapper() -> T:
            return fn()

        return await self.run(wrapper())

    def close(self) -> None:
        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.loop.shutdown_default_executor()

        if self.thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(5.0)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5.0)
        if not self.thread.is_alive():
            self.loop.close()


@dataclass
class Bed:
    lab: NetLab
    topo: Topology
    turn: Coturn
    open: Site
    home: Site
    phone: Site

    @property
    def stun_only(self) -> IceServers:
        return self.turn.ice_servers(relay=False)

    @property
    def with_turn(self) -> IceServers:
        return self.turn.ice_servers(relay=True)


@pytest.fixture(scope="module")
def bed() -> Iterator[Bed]:
    reason = integration_unavailable_reason(("ip", "nft", "turnserver"))
    if reason:
        pytest.skip(f"ICE test bed unavailable: {reason}")
    cleanup_stale_coturn()  # servers and work dirs of crashed runs only
    with NetLab() as lab:
        topo = lab.topology()
        sites = (topo.add_site("open"), topo.add_site("home", nat="eim"),
                 topo.add_site("phone", nat="symmetric"))
        with Coturn(topo.pub, topo.service_ip) as turn:
            yield Bed(lab, topo, turn, *sites)


class Peer:
    """One IceSession on its own namespace loop."""

    def __init__(self, site: Site, name: str, controlling: bool, servers: IceServers,
                 **options: Any) -> None:
        self.site = site
        self.loop = NsLoop(site.host)
        self.ufrag = f"{name}{os.urandom(4).hex()}"
        self.pwd = os.urandom(16).hex()
        self.lost: list[str] = []
        self.session = IceSession(
            controlling=controlling, servers=servers, ufrag=self.ufrag, pwd=self.pwd,
            connect_timeout=options.pop("connect_timeout", CONNECT_TIMEOUT),
            stun_retry_max=options.pop("stun_retry_max", RETRY_MAX),
            on_failed=self.lost.append, **options)
        self.candidates: list[str] = []

    async def gather(self) -> list[str]:
        self.candidates = await self.loop.run(self.session.gather())
        return self.candidates

    async def learn(self, other: Peer) -> None:
        def apply() -> None:
            self.session.set_remote_credentials(other.ufrag, other.pwd)
            self.session.add_remote(other.candidates, end=True)

        await self.loop.call(apply)

    async def connect(self) -> IceResult:
        return await self.loop.run(self.session.connect())

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.loop.run(self.session.close()), 5.0)
        self.loop.close()


@contextlib.asynccontextmanager
async def pair(a_site: Site, b_site: Site, servers: IceServers,
               **options: Any) -> AsyncIterator[tuple[Peer, Peer]]:
    a = Peer(a_site, "a", True, servers, **options)
    b = Peer(b_site, "b", False, servers, **options)
    try:
        yield a, b
    finally:
        await asyncio.gather(a.close(), b.close())


async def negotiate(a: Peer, b: Peer) -> tuple[IceResult | BaseException,
                                               IceResult | BaseException, float]:
    await asyncio.gather(a.gather(), b.gather())
    await asyncio.gather(a.learn(b), b.learn(a))
    started = time.monotonic()
    ra, rb = await asyncio.gather(a.connect(), b.connect(), return_exceptions=True)
    return ra, rb, time.monotonic() - started


async def roundtrip(a: Peer, b: Peer, count: int = 5) -> None:
    """Datagrams both ways through IceSession.send/recv."""
    for i in range(count):
        msg = f"ping {i}".encode()
        await a.loop.run(a.session.send(msg))
        assert await b.loop.run(asyncio.wait_for(b.session.recv(), 2.0)) == msg
        await b.loop.run(b.session.send(b"re: " + msg))
        assert await a.loop.run(asyncio.wait_for(a.session.recv(), 2.0)) == b"re: " + msg


def _threads_exchange(ta: IceTransport, tb: IceTransport, count: int) -> dict[str, Any]:
    """Blocking threads on both sides, like the link device's: a sends ``count`` datagrams,
    b echoes each one back, a collects the echoes."""
    echoed: list[bytes] = []
    errors: list[BaseException] = []

    def echo() -> None:
        buf = bytearray(2048)
        try:
            for _ in range(count):
                n, addr = tb.recv_into(buf)
                tb.sendto(bytes(buf[:n]), addr)
        except BaseException as exc:
            errors.append(exc)

    def collect() -> None:
        buf = bytearray(2048)
        try:
            while len(echoed) < count:
                n, _seg, _addr = ta.recv_segments(buf)
                if n:
                    echoed.append(bytes(buf[:n]))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=echo, daemon=True),
               threading.Thread(target=collect, daemon=True)]
    for t in threads:
        t.start()
    payloads = [i.to_bytes(4, "big") + os.urandom(1200) for i in range(count)]
    for p in payloads:
        ta.sendto(p, ta.remote)
        time.sleep(0.001)  # well below the queue bounds; loss is not what this tests
    for t in threads:
        t.join(5.0)
    alive = [t for t in threads if t.is_alive()]
    ta.wake()
    tb.wake()
    return {"echoed": echoed, "sent": payloads, "errors": errors, "stuck": len(alive)}


async def transport_roundtrip(a: Peer, b: Peer, count: int = 50) -> None:
    ta = await a.loop.call(a.session.transport)
    tb = await b.loop.call(b.session.transport)
    out = await asyncio.to_thread(_threads_exchange, ta, tb, count)
    assert not out["errors"] and not out["stuck"], out["errors"]
    assert sorted(out["echoed"]) == sorted(out["sent"])
    assert not ta.errors and not tb.errors


# --- the NAT cases ---------------------------------------------------------------------------


async def test_open_to_eim_with_stun_is_direct(bed: Bed) -> None:
    t0 = time.monotonic()
    async with pair(bed.open, bed.home, bed.stun_only) as (a, b):
        ra, rb, took = await negotiate(a, b)
        assert isinstance(ra, IceResult), ra
        assert isinstance(rb, IceResult), rb
        assert ra.path == rb.path == "direct"
        assert "relay" not in (ra.local_candidate_type, rb.local_candidate_type)
        # "home" is behind NAT: the open side reaches it at the router's public address
        assert ra.remote_addr[0] == bed.home.public_ip
        assert rb.local_candidate_type in ("srflx", "prflx")
        assert rb.local_addr[0] == bed.home.public_ip
        assert ra.rtt is not None and ra.rtt < 0.5
        await roundtrip(a, b)
        await transport_roundtrip(a, b)
        print(f"open<->eim STUN: {ra.local_candidate_type}/{ra.remote_candidate_type} "
              f"connect {took:.2f}s rtt {ra.rtt * 1000:.2f} ms")
    assert time.monotonic() - t0 < CASE_BUDGET


async def test_eim_to_symmetric_with_stun_only_fails_in_time(bed: Bed) -> None:
    t0 = time.monotonic()
    async with pair(bed.home, bed.phone, bed.stun_only, stun_retry_max=FAIL_FAST) as (a, b):
        ra, rb, took = await negotiate(a, b)
        assert isinstance(ra, IceFailed), ra
        assert isinstance(rb, IceFailed), rb
        assert ra.reason in ("checks-failed", "timeout")
        assert took < CONNECT_TIMEOUT + 2.0
        assert a.session.failed.is_set() and b.session.failed.is_set()
        assert a.lost == [] and b.lost == []  # on_failed is for pairs lost after connect()
        with pytest.raises(IceFailed):
            await a.loop.run(a.session.send(b"x"))
        print(f"eim<->symmetric STUN only: {ra.reason}/{rb.reason} after {took:.2f}s")
    assert time.monotonic() - t0 < CASE_BUDGET


async def test_eim_to_symmetric_with_turn_relays(bed: Bed) -> None:
    t0 = time.monotonic()
    async with pair(bed.home, bed.phone, bed.with_turn) as (a, b):
        ra, rb, took = await negotiate(a, b)
        assert isinstance(ra, IceResult), ra
        assert isinstance(rb, IceResult), rb
        assert ra.path == rb.path == "turn"
        assert any(" typ relay " in c for c in a.candidates)
        await roundtrip(a, b)
        await transport_roundtrip(a, b)
        print(f"eim<->symmetric TURN: {ra.local_candidate_type}/{ra.remote_candidate_type} "
              f"connect {took:.2f}s rtt {ra.rtt * 1000 if ra.rtt else -1:.2f} ms")
    assert time.monotonic() - t0 < CASE_BUDGET


async def test_lost_peer_expires_consent_and_reports(bed: Bed) -> None:
    """The far side vanishes (its session closed without a word): consent checks go
    unanswered, on_failed fires once, readers wake with IceFailed and the transport with
    ENOTCONN."""
    async with pair(bed.open, bed.home, bed.stun_only, consent_interval=0.2,
                    consent_failures=3) as (a, b):
        ra, rb, _ = await negotiate(a, b)
        assert isinstance(ra, IceResult) and isinstance(rb, IceResult)
        ta = await a.loop.call(a.session.transport)
        blocked = asyncio.create_task(asyncio.to_thread(ta.recv_into, bytearray(64)))
        await asyncio.sleep(0.8)  # a few consent rounds succeed first
        assert a.lost == []
        started = time.monotonic()
        await b.loop.run(b.session.close())
        await asyncio.wait_for(a.loop.run(a.session.failed.wait()), 5.0)
        took = time.monotonic() - started
        assert a.lost == ["consent-expired"]
        assert a.session.failure_reason == "consent-expired"
        with pytest.raises(OSError):
            await asyncio.wait_for(blocked, 2.0)
        print(f"consent expired {took:.2f}s after the peer vanished")


async def test_gather_excludes_networks_and_bounds_remote_input(bed: Bed) -> None:
    """Overlay prefixes never become candidates; a flood of peer candidates is capped."""
    peer = Peer(bed.home, "x", True, bed.stun_only, exclude_networks=("10.0.0.0/8",),
                max_remote_candidates=4)
    try:
        with pytest.raises(IceFailed) as failed:
            await peer.gather()  # its only host address (10.x) and the srflx through it go
        assert failed.value.reason == "no-candidates"
    finally:
        await peer.close()
    peer = Peer(bed.home, "y", True, bed.stun_only, max_remote_candidates=4)
    try:
        await peer.gather()
        flood = [f"candidate:{i} 1 udp 100 198.18.9.{i % 250 + 1} {1000 + i} typ host"
                 for i in range(100)]
        await peer.loop.call(lambda: peer.session.add_remote(
            [*flood, "garbage", "candidate:1 1 udp 1 127.0.0.1 9 typ host"], end=True))
        assert peer.session.rejected == {"too-many": 98}
    finally:
        await peer.close()



# --- failure modes that must be clear ---------------------------------------------------------


async def test_turn_server_that_refuses_the_peers_range_fails_in_time(bed: Bed) -> None:
    """A strict TURN server (private and reserved peers denied, the usual production
    setting) allocates fine but relays nothing to the test ranges: a clear IceFailed within
    the bound, not a hang."""
    strict = Coturn(bed.topo.pub, bed.topo.service_ip, 3479, allowed_peer_ips=(),
                    denied_peer_ips=("10.0.0.0-10.255.255.255", "198.18.0.0-198.19.255.255"),
                    min_port=40000, max_port=40999)
    with strict:
        host, port, user, password = strict.turn_credentials
        servers = IceServers(turn=(TurnServer(host, port, user, password),))
        async with pair(bed.home, bed.phone, servers, stun_retry_max=FAIL_FAST) as (a, b):
            ra, rb, took = await negotiate(a, b)
            assert any(" typ relay " in c for c in a.candidates)  # allocating still works
            assert isinstance(ra, IceFailed) and isinstance(rb, IceFailed), (ra, rb)
            assert took < CONNECT_TIMEOUT + 2.0
            print(f"strict TURN: {ra.reason}/{rb.reason} after {took:.2f}s")


async def test_wrong_turn_password_is_reported_at_gather(bed: Bed) -> None:
    host, port, user, _ = bed.turn.turn_credentials
    servers = IceServers(stun=(bed.turn.stun_address,),
                         turn=(TurnServer(host, port, user, "not-the-password"),))
    peer = Peer(bed.phone, "w", True, servers)
    try:
        started = time.monotonic()
        candidates = await peer.gather()
        assert not any(" typ relay " in c for c in candidates)
        assert any("TURN" in w and "no relayed candidate" in w for w in peer.session.warnings)
        assert time.monotonic() - started < 6.0
    finally:
        await peer.close()


# --- the link device on top ------------------------------------------------------------------


def _ipv4(src: str, dst: str, payload: bytes) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 17, 0,
                         ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)
    return header + payload


def _keypair() -> tuple[bytes, bytes]:
    key = X25519PrivateKey.generate()
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()), public_bytes(key)


async def test_wireguard_devices_over_a_relayed_ice_pair(bed: Bed) -> None:
    """The real link device (handshake, sealing, timers) runs its blocking threads on
    IceTransport across a symmetric NAT through TURN: inner packets flow both ways."""
    async with pair(bed.home, bed.phone, bed.with_turn) as (a, b):
        ra, rb, _ = await negotiate(a, b)
        assert isinstance(ra, IceResult) and isinstance(rb, IceResult), (ra, rb)
        assert ra.path == "turn"
        ta = await a.loop.call(a.session.transport)
        tb = await b.loop.call(b.session.transport)
        (ka, pa), (kb, pb) = _keypair(), _keypair()
        da = Device(ka, FakeTun(capacity=1000), ta, PacketRouter())
        db = Device(kb, FakeTun(capacity=1000), tb, PacketRouter())
        da.add_peer(PeerConfig(pb, ("10.9.0.2/32",), ra.remote_addr))
        db.add_peer(PeerConfig(pa, ("10.9.0.1/32",), rb.remote_addr))
        da.start()
        db.start()

        def traffic() -> None:
            for i in range(20):
                da.tun.inject(_ipv4("10.9.0.1", "10.9.0.2", b"ping %d" % i))
            got = [db.tun.take_written(timeout=5) for _ in range(20)]
            assert got[0].endswith(b"ping 0") and got[-1].endswith(b"ping 19")
            db.tun.inject(_ipv4("10.9.0.2", "10.9.0.1", b"pong"))
            assert da.tun.take_written(timeout=5).endswith(b"pong")

        try:
            await asyncio.to_thread(traffic)
            stats = da.stats()
            assert stats["peers"][0]["handshakes"] == 1
            assert stats["peers"][0]["endpoint_changes"] == 0  # one far end: the ICE pair
            assert stats["transport_errors"] == {}
        finally:
            await asyncio.gather(asyncio.to_thread(da.stop), asyncio.to_thread(db.stop))
            ta.close()
            tb.close()
