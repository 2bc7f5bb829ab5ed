"""Two link devices in one process over real loopback UDP, with the in-memory TUN twin
(net/fake.py) and the real cryptokey routing table."""

from __future__ import annotations

import ipaddress
import struct
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from socialvpn.link.constants import LinkTimers
from socialvpn.link.device import Device, PeerConfig
from socialvpn.link.timers import Timer
from socialvpn.link.transport import UdpTransport
from socialvpn.net.fake import FakeTun
from socialvpn.net.packet_router import PacketRouter
from tests.kit.links import status_number

pytestmark = pytest.mark.component


def ipv4(src: str, dst: str, payload: bytes) -> bytes:
    total = 20 + len(payload)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 17, 0,
                         ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)
    return header + payload


def keypair() -> tuple[bytes, bytes]:
    k = X25519PrivateKey.generate()
    from socialvpn.link.noise import public_bytes

    return k.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()), public_bytes(k)


def make_pair(timers: LinkTimers, wrap=lambda t: t) -> tuple[Device, Device]:
    """Two started devices over loopback UDP: a = 10.9.0.1, b = 10.9.0.2."""
    (ka, pa), (kb, pb) = keypair(), keypair()
    ta, tb = wrap(UdpTransport(0, "127.0.0.1")), UdpTransport(0, "127.0.0.1")
    a = Device(ka, FakeTun(capacity=10000), ta, PacketRouter(), timers=timers)
    b = Device(kb, FakeTun(capacity=10000), tb, PacketRouter(), timers=timers)
    a.add_peer(PeerConfig(pb, ("10.9.0.2/32",), ("127.0.0.1", tb.port)))
    b.add_peer(PeerConfig(pa, ("10.9.0.1/32",), ("127.0.0.1", ta.port)))
    a.start()
    b.start()
    return a, b


def stop_pair(a: Device, b: Device) -> None:
    for d in (a, b):
        d.stop()
        d.transport.close()


@pytest.fixture
def pair():
    a, b = make_pair(LinkTimers(rekey_after_time=1.0, reject_after_time=3.0, rekey_timeout=0.5,
                                keepalive_timeout=0.5))
    yield a, b
    stop_pair(a, b)


def test_handshake_and_data_both_ways(pair):
    a, b = pair
    for i in range(50):
        a.tun.inject(ipv4("10.9.0.1", "10.9.0.2", b"ping %d" % i))
    got = [b.tun.take_written(timeout=5) for _ in range(50)]
    assert got[0].endswith(b"ping 0") and got[-1].endswith(b"ping 49")
    b.tun.inject(ipv4("10.9.0.2", "10.9.0.1", b"pong"))
    assert a.tun.take_written(timeout=5).endswith(b"pong")
    sa = a.stats()["peers"][0]
    assert sa["handshakes"] == 1 and sa["tx_packets"] == 50 and sa["rx_packets"] == 1


def _timer_thread_switches() -> int:
    """Voluntary context switches (sleeps and wake-ups) of every link-timers thread so far."""
    return sum(status_number(Path(f"/proc/self/task/{t.native_id}/status"),
                             "voluntary_ctxt_switches")
               for t in threading.enumerate() if t.name == "link-timers")


def test_idle_devices_timer_threads_sleep_until_needed():
    """After a handshake and some data, WireGuard's timers (keepalive 10 s, retransmit 5 s) let
    the timer threads sleep up to TIMER_IDLE_MAX: a few wake-ups in 2.5 idle seconds, not the
    50 per device a fixed 50 ms tick took; the keepalive still goes out when due."""
    a, b = make_pair(LinkTimers(keepalive_timeout=2.0))
    try:
        for word in (b"hello", b"again"):  # the second after b confirmed the session
            a.tun.inject(ipv4("10.9.0.1", "10.9.0.2", word))
            assert b.tun.take_written(timeout=5).endswith(word)
            time.sleep(0.2)
        owed = b.peers()[0].timers
        assert owed.pending(Timer.SEND_KEEPALIVE)  # b received data and sent none
        before = _timer_thread_switches()
        time.sleep(2.5)  # the keepalive is due 2 s after the data: sent meanwhile
        woke = _timer_thread_switches() - before
        assert 0 < woke <= 16, woke
        assert not owed.pending(Timer.SEND_KEEPALIVE)
        assert b.stats()["peers"][0]["tx_packets"] == 0  # it was a keepalive, not data
    finally:
        stop_pair(a, b)


def test_spoofed_inner_source_dropped(pair):
    a, b = pair
    a.tun.inject(ipv4("10.9.0.1", "10.9.0.2", b"ok"))
    assert b.tun.take_written(timeout=5).endswith(b"ok")
    a.tun.inject(ipv4("10.9.0.77", "10.9.0.2", b"spoof"))
    a.tun.inject(ipv4("10.9.0.1", "10.9.0.2", b"after"))
    assert b.tun.take_written(timeout=5).endswith(b"after")
    assert b.drops.get("source") == 1


def test_rekey_under_traffic_loses_nothing(pair):
    a, b = pair
    n = 0
    deadline = time.monotonic() + 3.0  # rekey_after_time is 1 s: at least two rekeys
    while time.monotonic() < deadline:
        a.tun.inject(ipv4("10.9.0.1", "10.9.0.2", b"%d" % n))
        n += 1
        time.sleep(0.002)
        if n % 100 == 0:
            b.tun.inject(ipv4("10.9.0.2", "10.9.0.1", b"ack"))
    got = set()
    for _ in range(n):
        got.add(b.tun.take_written(timeout=5)[20:])
    assert len(got) == n
    assert a.stats()["peers"][0]["handshakes"] >= 2


class Tap:
    """Wraps a transport to keep copies of what it sends."""

    def __init__(self, inner: UdpTransport) -> None:
        self.inner = inner
        self.sent: list[bytes] = []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def sendto(self, data, addr) -> None:
        self.sent.append(bytes(data))
        self.inner.sendto(data, addr)

    def send_batch(self, messages, addr) -> None:
        self.sent.extend(bytes(m) for m in messages)
        self.inner.send_batch(messages, addr)

    def send_packed(self, buf, sizes, addr) -> None:
        pos = 0
        for size in sizes:
            self.sent.append(bytes(buf[pos : pos + size]))
            pos += size
        self.inner.send_packed(buf, sizes, addr)


def test_forged_and_replayed_packets_change_nothing():
    import socket

    a, b = make_pair(LinkTimers(), Tap)
    ta, tb = a.transport, b.transport
    attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    attacker.bind(("127.0.0.1", 0))
    try:
        a.tun.inject(ipv4("10.9.0.1", "10.9.0.2", b"first"))
        assert b.tun.take_written(timeout=5).endswith(b"first")
        endpoint = b.stats()["peers"][0]["endpoint"]
        initiation = next(m for m in ta.sent if m[0] == 1)
        data = [m for m in ta.sent if m[0] == 4 and len(m) > 32][-1]

        forged = bytearray(data)
        forged[-1] ^= 0x01  # the tag no longer verifies
        attacker.sendto(bytes(forged), ("127.0.0.1", tb.port))
        attacker.sendto(data, ("127.0.0.1", tb.port))  # a replay of a real packet
        attacker.sendto(initiation, ("127.0.0.1", tb.port))  # a replayed initiation
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and sum(b.drops.values()) < 3:
            time.sleep(0.02)
        assert b.drops == {"auth": 1, "replay": 2}, b.drops
        stats = b.stats()["peers"][0]
        assert stats["endpoint"] == endpoint and stats["endpoint_changes"] == 0
        assert stats["handshakes"] == 1
        assert b.tun.written_packets() == []
        # The session still works.
        a.tun.inject(ipv4("10.9.0.1", "10.9.0.2", b"second"))
        assert b.tun.take_written(timeout=5).endswith(b"second")
    finally:
        attacker.close()
        stop_pair(a, b)


def test_batches_of_mixed_sizes_arrive_intact_and_in_order(pair):
    """Batches read together are sealed into one buffer and sent as GSO runs (equal sizes, a
    shorter last); the receiver opens GRO batches whose last datagram is shorter."""
    a, b = pair
    a.tun.inject(ipv4("10.9.0.1", "10.9.0.2", b"hello"))
    assert b.tun.take_written(timeout=5).endswith(b"hello")
    sizes = [1000] * 7 + [37] + [1000] * 5 + [300, 1300, 1300, 1, 0] * 6 + [1360] * 50
    sent = [ipv4("10.9.0.1", "10.9.0.2", bytes([i % 251]) * n) for i, n in enumerate(sizes)]
    for packet in sent:
        a.tun.inject(packet)
    got = [b.tun.take_written(timeout=5) for _ in sent]
    assert got == sent
    assert b.drops == {} and a.drops == {}
    assert a.stats()["peers"][0]["tx_packets"] == len(sent) + 1
    assert b.stats()["peers"][0]["rx_bytes"] == sum(map(len, sent)) + 25


@pytest.mark.parametrize("gso", [True, False])
def test_send_packed_keeps_datagram_boundaries(gso: bool) -> None:
    import socket

    tx = UdpTransport(0, "127.0.0.1")
    tx.gso = tx.gso and gso
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(5)
    try:
        sizes = [100] * 70 + [40, 100, 100, 1412, 1412, 7, 1412] + [1412] * 50 + [3]
        data = b"".join(bytes([i % 256]) * n for i, n in enumerate(sizes))
        tx.send_packed(memoryview(data), sizes, tx.sockaddr("127.0.0.1", rx.getsockname()[1]))
        got = [rx.recv(2000) for _ in sizes]
        assert [len(g) for g in got] == sizes
        assert b"".join(got) == data
        assert tx.errors == {}
    finally:
        rx.close()
        tx.close()


def test_spoofed_sources_inside_a_batch_are_each_dropped(pair):
    """The source check is cached per batch by address: every spoofed packet of a burst
    (interleaved with good ones, IPv4) is still dropped, every good one delivered."""
    a, b = pair
    a.tun.inject(ipv4("10.9.0.1", "10.9.0.2", b"hello"))
    assert b.tun.take_written(timeout=5).endswith(b"hello")
    good, sources = [], ["10.9.0.1", "10.9.0.66", "10.9.0.1", "10.9.0.1", "10.9.0.67"] * 20
    for i, src in enumerate(sources):
        packet = ipv4(src, "10.9.0.2", b"%d" % i + bytes(1000))
        if src == "10.9.0.1":
            good.append(packet)
        a.tun.inject(packet)
    got = [b.tun.take_written(timeout=5) for _ in good]
    assert got == good
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and b.drops.get("source", 0) < 40:
        time.sleep(0.01)
    assert b.drops == {"source": 40}
    assert b.tun.written_packets() == []
