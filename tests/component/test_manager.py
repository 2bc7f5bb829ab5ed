"""MuxTransport and GroupLinks without ICE: per-peer paths are in-memory datagram pipes (the
twin of IceTransport: one far end, blocking reads, ENOTCONN once closed), the TUN is FakeTun
and cryptokey routing the real PacketRouter."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import queue
import socket
import struct
import threading
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from socialvpn.link.constants import LinkTimers
from socialvpn.link.device import Device, PeerConfig
from socialvpn.link.ice import IceResult, IceServers, TakenSocket
from socialvpn.link.manager import GroupLinks, LinkEvent, MuxTransport, crosses_nat
from socialvpn.link.noise import public_bytes
from socialvpn.linkhub import parse_cached
from socialvpn.net.fake import FakeTun
from socialvpn.net.packet_router import PacketRouter

pytestmark = pytest.mark.component

FAST = LinkTimers(rekey_timeout=0.5, keepalive_timeout=0.5)


class Pipe:
    """One end of an in-memory datagram pipe (a DatagramIO with a single far end)."""

    gso = False
    gro = False

    def __init__(self, name: str) -> None:
        self.remote = (name, 1)
        self.peer: Pipe | None = None
        self.rx: queue.Queue[bytes | None] = queue.Queue(1000)
        self.closed = False
        self.sent = 0

    @staticmethod
    def pair(a: str = "a", b: str = "b") -> tuple[Pipe, Pipe]:
        x, y = Pipe(b), Pipe(a)
        x.peer, y.peer = y, x
        return x, y

    def sendto(self, data, addr) -> None:
        if self.closed or self.peer is None or self.peer.closed:
            return
        self.sent += 1
        try:
            self.peer.rx.put_nowait(bytes(data))
        except queue.Full:
            pass

    def send_batch(self, messages, addr) -> None:
        for m in messages:
            self.sendto(m, addr)

    def recv_into(self, buf):
        item = self.rx.get()
        if item is None:
            self.rx.put_nowait(None)
            raise OSError(errno.ENOTCONN, "pipe closed")
        buf[: len(item)] = item
        return len(item), self.remote

    def recv_segments(self, buf):
        n, addr = self.recv_into(buf)
        return n, n, addr

    def sockaddr(self, host, port):
        return (host, port)

    def wake(self) -> None:
        self.rx.put_nowait(b"")

    def close(self) -> None:
        self.closed = True
        self.rx.put_nowait(None)


def ipv4(src: str, dst: str, payload: bytes) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 17, 0,
                         ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)
    return header + payload


def keypair() -> tuple[bytes, bytes]:
    k = X25519PrivateKey.generate()
    return k.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()), public_bytes(k)


def wait_for(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


# --- MuxTransport alone ----------------------------------------------------------------------


def test_mux_tokens_merge_and_drop():
    mux = MuxTransport(queue_size=8)
    tb, tc = mux.sockaddr("b", 0), mux.sockaddr("c", 0)
    assert tb != tc and mux.sockaddr("b", 0) == tb and mux.token("b") == tb
    assert mux.sockaddr(tb[0], 0) == tb  # a token's host maps back to it
    assert ipaddress.ip_address(tb[0]) in ipaddress.ip_network("240.0.0.0/4")
    assert mux.peer_of(tc) == "c"

    mux.sendto(b"nowhere", tb)  # nothing attached: dropped and counted
    assert mux.errors == {"no-path": 1}

    ab, ba = Pipe.pair("a", "b")
    ac, ca = Pipe.pair("a", "c")
    mux.attach("b", ab)
    mux.attach("c", ac)
    assert mux.attached("b") and mux.attached("c")
    mux.sendto(b"to b", tb)
    mux.send_batch([bytearray(b"to c 1"), bytearray(b"to c 2")], tc)
    assert ba.rx.get(timeout=1) == b"to b"
    assert [ca.rx.get(timeout=1), ca.rx.get(timeout=1)] == [b"to c 1", b"to c 2"]

    # receives of both paths merge into one queue, each tagged with its peer's token
    ba.sendto(b"from b", None)
    ca.sendto(b"from c", None)
    buf = bytearray(100)
    got = {}
    for _ in range(2):
        n, seg, addr = mux.recv_segments(buf)
        assert seg == n
        got[mux.peer_of(addr)] = bytes(buf[:n])
    assert got == {"b": b"from b", "c": b"from c"}

    # the bounded queue drops and counts what nobody reads
    for i in range(20):
        ba.sendto(b"x%d" % i, None)
    wait_for(lambda: mux.errors.get("rx-queue-full", 0) >= 12)
    for _ in range(8):
        mux.recv_into(buf)

    # detached: sends are dropped, the pump stops, the path's own transport stays open
    assert mux.detach("b") is ab
    assert not mux.attached("b") and not ab.closed
    mux.sendto(b"gone", tb)
    assert mux.errors["no-path"] == 2
    ba.sendto(b"late", None)
    time.sleep(0.1)
    assert mux.stats()["queued"] == 0

    # wake() gives a reader 0 bytes; close() makes reads fail
    mux.wake()
    assert mux.recv_into(buf)[0] == 0
    reader_error: list[BaseException] = []

    def reader() -> None:
        try:
            mux.recv_into(buf)
        except OSError as exc:
            reader_error.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.05)
    mux.close()
    t.join(2)
    assert not t.is_alive() and reader_error
    assert not mux.attached("c")
    with pytest.raises(OSError):
        mux.recv_into(buf)


def test_mux_path_that_fails_ends_its_pump():
    mux = MuxTransport()
    ab, ba = Pipe.pair()
    mux.attach("b", ab)
    ab.close()  # the path went away under the mux (ICE lost)
    wait_for(lambda: mux.errors.get("path-ended") == 1)
    mux.close()


def test_devices_over_mux_reach_two_peers():
    """A's Device reaches B and C through one MuxTransport with two paths."""
    (ka, pa), (kb, pb), (kc, pc) = keypair(), keypair(), keypair()
    mux = MuxTransport()
    ab, ba = Pipe.pair("a", "b")
    ac, ca = Pipe.pair("a", "c")
    a = Device(ka, FakeTun(capacity=1000), mux, PacketRouter(), timers=FAST)
    b = Device(kb, FakeTun(capacity=1000), ba, PacketRouter(), timers=FAST)
    c = Device(kc, FakeTun(capacity=1000), ca, PacketRouter(), timers=FAST)
    a.add_peer(PeerConfig(pb, ("10.9.0.2/32",), ("b", 0)))
    a.add_peer(PeerConfig(pc, ("10.9.0.3/32",), ("c", 0)))
    b.add_peer(PeerConfig(pa, ("10.9.0.1/32",), ("a", 1)))
    c.add_peer(PeerConfig(pa, ("10.9.0.1/32",), ("a", 1)))
    mux.attach("b", ab)
    mux.attach("c", ac)
    for d in (a, b, c):
        d.start()
    try:
        for i in range(20):
            a.tun.inject(ipv4("10.9.0.1", "10.9.0.2", b"to b %d" % i))
            a.tun.inject(ipv4("10.9.0.1", "10.9.0.3", b"to c %d" % i))
        got_b = [b.tun.take_written(timeout=5)[20:] for _ in range(20)]
        got_c = [c.tun.take_written(timeout=5)[20:] for _ in range(20)]
        assert got_b == [b"to b %d" % i for i in range(20)]
        assert got_c == [b"to c %d" % i for i in range(20)]
        b.tun.inject(ipv4("10.9.0.2", "10.9.0.1", b"from b"))
        c.tun.inject(ipv4("10.9.0.3", "10.9.0.1", b"from c"))
        got = {a.tun.take_written(timeout=5)[20:], a.tun.take_written(timeout=5)[20:]}
        assert got == {b"from b", b"from c"}
        # C spoofing B's inner address is refused by cryptokey routing
        c.tun.inject(ipv4("10.9.0.2", "10.9.0.1", b"spoof"))
        wait_for(lambda: a.drops.get("source") == 1)
        stats = {s["public_key"]: s for s in a.stats()["peers"]}
        assert stats[pb.hex()]["endpoint_changes"] == 0  # always the same token
        assert stats[pb.hex()]["rx_packets"] == 1 and stats[pc.hex()]["tx_packets"] == 20
    finally:
        for d in (a, b, c):
            d.stop()
        mux.close()


# --- GroupLinks over pipes -------------------------------------------------------------------


class Node:
    def __init__(self, name: str, address: str, **options: Any) -> None:
        self.name = name
        self.address = address
        self.key, self.public = keypair()
        self.tun = FakeTun(capacity=1000)
        self.events: list[LinkEvent] = []
        self.links = GroupLinks(private_key=self.key, tun=self.tun, routes=PacketRouter(),
                                servers=IceServers(), on_event=self.events.append, timers=FAST,
                                **options)


async def take(tun: FakeTun, timeout: float = 5.0) -> bytes:
    return await asyncio.to_thread(tun.take_written, timeout)


async def test_group_links_over_pipes() -> None:
    a, b = Node("a", "10.9.0.1"), Node("b", "10.9.0.2")
    a.links.start()
    b.links.start()
    try:
        a.links.set_peer("b", b.public, ("10.9.0.2/32",))
        b.links.set_peer("a", a.public, ("10.9.0.1/32",))
        assert a.links.peer_stats("b")["state"] == "idle"
        a.tun.inject(ipv4("10.9.0.1", "10.9.0.2", b"early"))  # no path yet: staged
        await asyncio.sleep(0.1)
        assert a.links.peer_stats("b")["staged"] == 1

        ab, ba = Pipe.pair("a", "b")
        b.links.attach_path("a", ba, initiate=False)
        a.links.attach_path("b", ab)  # initiates: the handshake runs without more traffic
        assert [e.kind for e in a.events] == ["connected"]
        assert (await take(b.tun))[20:] == b"early"
        b.tun.inject(ipv4("10.9.0.2", "10.9.0.1", b"reply"))
        assert (await take(a.tun))[20:] == b"reply"
        sa = a.links.peer_stats("b")
        assert sa["state"] == "up" and sa["handshakes"] == 1
        assert sa["tx_packets"] == 1 and sa["rx_packets"] == 1
        assert sa["path"] is None  # no ICE result on a pipe

        # allowed IPs replaced: B's new address is accepted, the old one no longer
        a.links.set_peer("b", b.public, ("10.9.0.22/32",))
        b.tun.inject(ipv4("10.9.0.2", "10.9.0.1", b"old address"))
        b.tun.inject(ipv4("10.9.0.22", "10.9.0.1", b"new address"))
        assert (await take(a.tun))[20:] == b"new address"
        assert a.links.stats()["device"]["drops"].get("source") == 1
        a.links.set_peer("b", b.public, ("10.9.0.2/32",))

        # B gets a new key: the Device peer is replaced on the same path, a new handshake
        b2 = Node("b2", "10.9.0.2")
        b2.links.start()
        try:
            b2.links.set_peer("a", a.public, ("10.9.0.1/32",))
            ab2, b2a = Pipe.pair("a", "b2")
            b2.links.attach_path("a", b2a, initiate=False)
            a.links.attach_path("b", ab2)
            a.links.set_peer("b", b2.public, ("10.9.0.2/32",))
            a.tun.inject(ipv4("10.9.0.1", "10.9.0.2", b"to the new key"))
            assert (await take(b2.tun))[20:] == b"to the new key"
            assert a.links.peer_stats("b")["public_key"] == b2.public.hex()
        finally:
            await b2.links.stop()

        # removed: packets for it are dropped (no route), nothing reaches the far end
        await a.links.remove_peer("b")
        assert a.links.peers() == []
        a.tun.inject(ipv4("10.9.0.1", "10.9.0.2", b"after removal"))
        await asyncio.sleep(0.2)
        assert a.links.stats()["device"]["drops"].get("no-route") == 1
        with pytest.raises(KeyError):
            a.links.peer_stats("b")
    finally:
        started = time.monotonic()
        await asyncio.gather(a.links.stop(), b.links.stop())
        await a.links.stop()  # idempotent
        assert time.monotonic() - started < 6.0


async def _state(node: Node, peer: str, want: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (row := node.links.peer_stats(peer))["state"] != want:
        assert time.monotonic() < deadline, row
        await asyncio.sleep(0.02)
    return row


async def test_up_means_the_wireguard_handshake_completed() -> None:
    """ICE selecting a path is not enough for "up": until WireGuard has a session the peer is
    in "handshake" (a ping sent then waits for the handshake, and may time out)."""
    a, b = Node("a", "10.9.0.1"), Node("b", "10.9.0.2")
    a.links.start()
    b.links.start()
    try:
        a.links.set_peer("b", b.public, ("10.9.0.2/32",))
        b.links.set_peer("a", a.public, ("10.9.0.1/32",))
        ab, ba = Pipe.pair("a", "b")
        a.links.attach_path("b", ab)  # a's ICE is done, b's not yet: the initiation waits
        await asyncio.sleep(0.2)
        row = a.links.peer_stats("b")
        assert row["state"] == "handshake" and row["last_handshake"] is None, row
        assert [e.kind for e in a.events] == ["connected"]
        b.links.attach_path("a", ba, initiate=False)
        row = await _state(a, "b", "up")  # the initiator: once the response is in
        assert row["last_handshake"] and row["handshakes"] >= 1
        row = await _state(b, "a", "up")  # the responder: once a packet came on the session
        assert row["last_handshake"]
        # a new ICE path over the same WireGuard session is up at once, no new handshake
        handshakes = a.links.peer_stats("b")["handshakes"]
        ab2, ba2 = Pipe.pair("a", "b")
        b.links.attach_path("a", ba2, initiate=False)
        a.links.attach_path("b", ab2)
        assert a.links.peer_stats("b")["state"] == "up"
        assert a.links.peer_stats("b")["handshakes"] == handshakes
    finally:
        await asyncio.gather(a.links.stop(), b.links.stop())


async def test_start_ice_needs_a_known_peer_and_a_running_manager() -> None:
    a = Node("a", "10.9.0.1")
    a.links.start()
    with pytest.raises(KeyError):
        await a.links.start_ice("nobody", controlling=True, local_ufrag="abcd",
                                local_pwd="p" * 22, remote_ufrag="efgh", remote_pwd="q" * 22)
    a.links.add_remote_candidates("nobody", ("x",), True)  # ignored
    await a.links.stop()
    with pytest.raises(RuntimeError):
        await a.links.start_ice("b", controlling=True, local_ufrag="abcd",
                                local_pwd="p" * 22, remote_ufrag="efgh", remote_pwd="q" * 22)


async def test_ice_sessions_are_replaced_and_stopped_without_leaks() -> None:
    """Real IceSessions (host candidates only, nobody answers): a second start_ice replaces
    the first, stop_ice ends the second; no task or session is left behind."""
    a, b = Node("a", "10.9.0.1"), Node("b", "10.9.0.2")
    a.links.start()
    a.links.set_peer("b", b.public, ("10.9.0.2/32",))
    baseline = len(asyncio.all_tasks())
    creds = dict(local_pwd="p" * 22, remote_ufrag="efgh", remote_pwd="q" * 22)
    try:
        await asyncio.gather(
            a.links.start_ice("b", controlling=True, local_ufrag="one1", **creds),
            a.links.start_ice("b", controlling=True, local_ufrag="two2", **creds))
        first = a.links._links["b"].session
        assert first is not None and first.local_credentials[0] in ("one1", "two2")
        await a.links.start_ice("b", controlling=True, local_ufrag="three3", **creds)
        assert a.links.peer_stats("b")["state"] in ("connecting", "failed")
        await asyncio.sleep(0.3)  # gathering (host candidates) is quick
        kinds = {e.kind for e in a.events}
        assert kinds <= {"candidates", "failed"}
        await a.links.stop_ice("b")
        assert a.links.peer_stats("b")["state"] == "idle"
        assert a.links._links["b"].session is None
        await asyncio.sleep(0.1)
        assert len(asyncio.all_tasks()) <= baseline
    finally:
        await a.links.stop()


# --- direct sockets (the fast path for direct ICE pairs) -------------------------------------


def _udp(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    return sock


def _result(local: socket.socket, remote: socket.socket) -> IceResult:
    return IceResult("host", "host", "direct", remote.getsockname(), local.getsockname(),
                     rtt=None)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


async def test_direct_sockets_carry_data_hand_stun_over_and_roam() -> None:
    a, b = Node("a", "10.9.0.1", keepalive=3.0), Node("b", "10.9.0.2", keepalive=3.0)
    a.links.start()
    b.links.start()
    stun_at_b: list[tuple[bytes, tuple[str, int]]] = []
    try:
        a.links.set_peer("b", b.public, ("10.9.0.2/32",))
        b.links.set_peer("a", a.public, ("10.9.0.1/32",))
        sa, sb = _udp(), _udp()
        b_addr = sb.getsockname()
        early = b"\x00" * 8  # arrived at a before the take-over: read first, then dropped
        b.links.attach_direct("a", TakenSocket(sb, lambda d, addr: stun_at_b.append((d, addr))),
                              _result(sb, sa), initiate=False)
        a.links.attach_direct("b", TakenSocket(sa, lambda d, addr: None, (early,)),
                              _result(sa, sb))
        a.tun.inject(ipv4("10.9.0.1", "10.9.0.2", b"over the socket"))
        assert (await take(b.tun))[20:] == b"over the socket"
        b.tun.inject(ipv4("10.9.0.2", "10.9.0.1", b"and back"))
        assert (await take(a.tun))[20:] == b"and back"
        row = a.links.peer_stats("b")
        assert row["state"] == "up" and row["transport"] == "direct-socket"
        assert row["remote_endpoint"] == f"127.0.0.1:{b_addr[1]}"
        assert row["keepalive"] == 0.0  # host/host: no NAT on the way
        stats = a.links.stats()
        assert stats["mux"]["paths"] == {} and stats["datapath"] == "per-packet"
        assert [d["rx"] > 0 for d in stats["direct"]] == [True]
        assert stats["device"]["drops"].get("malformed") == 1  # the early 8 zero bytes

        # STUN on the taken-over socket goes back to ICE, never to the Device
        stun = bytes([0, 1, 0, 0]) + b"\x21\x12\xa4\x42" + bytes(12)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            raw.sendto(stun, b_addr)
        wait_for(lambda: len(stun_at_b) == 1)
        assert stun_at_b[0][0] == stun

        # b's address is gone: it sends from its own wildcard socket at once, and a follows
        # the authenticated packet there (roaming) without any signalling
        changes = a.links.peer_stats("b")["endpoint_changes"]
        assert b.links.network_changed(set()) == ["a"]
        wait_for(lambda: a.links.peer_stats("b")["endpoint_changes"] > changes)
        row_b = b.links.peer_stats("a")
        assert row_b["transport"] == "roamed" and row_b["keepalive"] == 3.0
        assert a.links.peer_stats("b")["remote_endpoint"] == f"127.0.0.1:{row_b['local_port']}"
        a.tun.inject(ipv4("10.9.0.1", "10.9.0.2", b"after roaming"))
        assert (await take(b.tun))[20:] == b"after roaming"
        found = a.links.direct_endpoint("b")
        assert found == ("127.0.0.1", row_b["local_port"], sa.getsockname()[1])
        assert b.links.network_changed({"127.0.0.1"}) == []  # nothing to move any more
    finally:
        await asyncio.gather(a.links.stop(), b.links.stop())
    assert a.links.io.sockets() == [] and b.links.io.sockets() == []


async def test_a_taken_socket_that_cannot_be_used_is_closed() -> None:
    """A socket ICE handed over is ours: for a peer that left meanwhile, or when opening it
    for the Device fails, it is closed, not leaked."""
    a = Node("a", "10.9.0.1")
    a.links.start()
    try:
        gone, other = _udp(), _udp()
        a.links.attach_direct("nobody", TakenSocket(gone, lambda d, addr: None),
                              _result(gone, other))
        assert gone.fileno() == -1
        b_public = keypair()[1]
        a.links.set_peer("b", b_public, ("10.9.0.2/32",))
        broken = _udp()

        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise OSError("no room")

        a.links.io.open = refuse  # type: ignore[method-assign]
        with pytest.raises(OSError):
            a.links.attach_direct("b", TakenSocket(broken, lambda d, addr: None),
                                  _result(broken, other))
        assert broken.fileno() == -1
        other.close()
    finally:
        await a.links.stop()


async def test_links_come_back_from_cached_endpoints_without_signalling() -> None:
    a, b = Node("a", "10.9.0.1", keepalive=3.0), Node("b", "10.9.0.2", keepalive=3.0)
    a.links.start()
    b.links.start()
    try:
        a.links.set_peer("b", b.public, ("10.9.0.2/32",))
        b.links.set_peer("a", a.public, ("10.9.0.1/32",))
        pa, pb = _free_port(), _free_port()
        assert a.links.restore("b", ("127.0.0.1", pb), pa)
        assert b.links.restore("a", ("127.0.0.1", pa), pb)
        assert not a.links.restore("b", ("127.0.0.1", pb), pa)  # it has a path now
        a.tun.inject(ipv4("10.9.0.1", "10.9.0.2", b"from the cache"))
        assert (await take(b.tun))[20:] == b"from the cache"
        row = a.links.peer_stats("b")
        assert row["transport"] == "cached" and row["local_port"] == pa
        assert row["keepalive"] == 3.0 and row["handshakes"] >= 1
        assert row["state"] == "idle"  # no ICE ran
    finally:
        await asyncio.gather(a.links.stop(), b.links.stop())


def test_nat_and_cache_entries() -> None:
    assert not crosses_nat(IceResult("host", "host", "direct", ("1.2.3.4", 1), ("5.6.7.8", 2),
                                     rtt=None))
    assert crosses_nat(IceResult("srflx", "host", "direct", ("1.2.3.4", 1), ("5.6.7.8", 2),
                                 rtt=None))
    assert crosses_nat(IceResult("host", "relay", "turn", ("1.2.3.4", 1), ("5.6.7.8", 2),
                                 rtt=None))
    assert crosses_nat(None)
    assert parse_cached({"endpoint": "198.18.1.2:5000", "local_port": 4000}) == (
        ("198.18.1.2", 5000), 4000)
    for bad in (None, [], {"endpoint": "x:1"}, {"endpoint": "1.2.3.4:0"},
                {"endpoint": "1.2.3.4:70000"}, {"endpoint": "[::1]:5"},
                {"endpoint": "1.2.3.4:5", "local_port": True},
                {"endpoint": "1.2.3.4:5", "local_port": -1}, {"endpoint": "0.0.0.0:5"},
                {"endpoint": "1.2.3.4:5", "saved": "yesterday"},
                {"endpoint": "1.2.3.4:5", "saved": True},
                {"endpoint": "1.2.3.4:5", "saved": float("nan")}):
        assert parse_cached(bad) is None, bad
