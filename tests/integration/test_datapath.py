"""Issue 7, acceptance 3: both packet paths (offload and per-packet), against themselves and
against a stock wireguard-go, carry inner IPv4 and IPv6, TCP and UDP payloads intact — checked
with SHA-256 end to end — and no receiving kernel drops anything for a bad checksum (its
/proc/net/snmp and /proc/net/snmp6 counters do not move).

Sockets are made inside the namespaces by this process (``Netns.socket``); the links run as
their own processes. UDP goes lock-step (a burst, then wait for it) so nothing is lost for
want of buffer space: every datagram must arrive.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.kit.links import KeyPair, LinkPeer, OurLink, WgGoLink, ping, veth_hosts
from tests.kit.netns import NetLab, Netns

pytestmark = pytest.mark.integration

INNER_MTU = 1380
TCP_BYTES = 4 * 1024 * 1024
UDP_DATAGRAMS = 1500
UDP_BURST = 24
UDP_SEGMENT = 103  # linux/udp.h
IPS = {4: ("10.9.0.1", "10.9.0.2"), 6: ("fd00:9::1", "fd00:9::2")}
FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}

# Counters that go up when the kernel drops a packet for a bad checksum or header.
SNMP_KEYS = [("Ip", "InHdrErrors"), ("Icmp", "InCsumErrors"), ("Tcp", "InCsumErrors"),
             ("Udp", "InCsumErrors"), ("UdpLite", "InCsumErrors")]
SNMP6_KEYS = ["Ip6InHdrErrors", "Icmp6InCsumErrors", "Udp6InCsumErrors", "UdpLite6InCsumErrors"]


def csum_counters(ns: Netns) -> dict[str, int]:
    """The namespace's checksum/header error counters (IPv4 and IPv6)."""
    out: dict[str, int] = {}
    lines = ns.run(["cat", "/proc/net/snmp"]).stdout.splitlines()
    for header, values in zip(lines[::2], lines[1::2], strict=True):
        proto, names = header.split(":", 1)
        table = dict(zip(names.split(), values.split(":", 1)[1].split(), strict=True))
        for p, key in SNMP_KEYS:
            if p == proto and key in table:
                out[f"{p}{key}"] = int(table[key])
    for line in ns.run(["cat", "/proc/net/snmp6"]).stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in SNMP6_KEYS:
            out[parts[0]] = int(parts[1])
    assert {"TcpInCsumErrors", "UdpInCsumErrors", "IpInHdrErrors",
            "Udp6InCsumErrors", "Ip6InHdrErrors"} <= set(out), out
    return out


@dataclass
class Pair:
    a: Netns  # always our link
    b: Netns  # ours or wireguard-go
    ours: list[OurLink]


@pytest.fixture
def made() -> Iterator[list]:
    parts: list = []
    yield parts
    for part in parts:
        with contextlib.suppress(Exception):
            part.stop()


def _pair(lab: NetLab, tmp: Path, made: list, *, offloads: bool, peer: str) -> Pair:
    a, b = veth_hosts(lab)
    ka, kb = KeyPair.generate(), KeyPair.generate()
    allowed_a = [f"{IPS[4][0]}/32", f"{IPS[6][0]}/128"]
    allowed_b = [f"{IPS[4][1]}/32", f"{IPS[6][1]}/128"]
    la = OurLink(a, tmp, ka, f"{IPS[4][0]}/24", port=51821, offloads=offloads,
                 extra_addresses=[f"{IPS[6][0]}/64"],
                 peers=[LinkPeer(kb.public, allowed_b, "10.0.0.2:51822")])
    lb: OurLink | WgGoLink
    if peer == "ours":
        lb = OurLink(b, tmp, kb, f"{IPS[4][1]}/24", port=51822, offloads=offloads,
                     extra_addresses=[f"{IPS[6][1]}/64"],
                     peers=[LinkPeer(ka.public, allowed_a, "10.0.0.1:51821")])
    else:
        lb = WgGoLink(b, tmp, kb, f"{IPS[4][1]}/24", port=51822,
                      extra_addresses=[f"{IPS[6][1]}/64"],
                      peers=[LinkPeer(ka.public, allowed_a, "10.0.0.1:51821")])
    made += [la, lb]
    lb.start()
    la.start()
    ours = [la] + ([lb] if isinstance(lb, OurLink) else [])
    for ns, target in ((a, IPS[4][1]), (a, IPS[6][1]), (b, IPS[4][0]), (b, IPS[6][0])):
        deadline = time.monotonic() + 15
        while ping(ns, target, count=1, timeout=1.0).returncode != 0:
            assert time.monotonic() < deadline, f"{ns.name} cannot reach {target}"
    return Pair(a, b, ours)


def tcp_transfer(src: Netns, dst: Netns, dst_ip: str, fam: int, data: bytes,
                 port: int = 5001) -> tuple[str, int]:
    """Send ``data`` over one TCP connection; returns the receiver's (sha256, byte count)."""
    listener = dst.socket(FAMILY[fam], socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((dst_ip, port))
    listener.listen(1)
    listener.settimeout(15)
    got: dict[str, object] = {}

    def receive() -> None:
        digest = hashlib.sha256()
        total = 0
        try:
            conn, _ = listener.accept()
            conn.settimeout(15)
            with conn:
                while chunk := conn.recv(1 << 16):
                    digest.update(chunk)
                    total += len(chunk)
        except OSError as exc:
            got["error"] = exc
        got["hash"], got["bytes"] = digest.hexdigest(), total

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    client = src.socket(FAMILY[fam], socket.SOCK_STREAM)
    try:
        client.settimeout(15)
        client.connect((dst_ip, port))
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        thread.join(30)
    finally:
        client.close()
        listener.close()
    assert not thread.is_alive(), "TCP receiver did not finish"
    assert "error" not in got, got
    return str(got["hash"]), int(got["bytes"])  # type: ignore[call-overload]


def _udp_max(fam: int) -> int:
    return INNER_MTU - (20 if fam == 4 else 40) - 8


def udp_transfer(src: Netns, dst: Netns, dst_ip: str, fam: int, *, gso: bool = False,
                 port: int = 5002) -> tuple[list[bytes], dict[int, bytes]]:
    """Datagrams of varied sizes (1 byte over the id up to the largest that fits the inner
    MTU), lock-step in bursts; with ``gso`` each burst is one UDP_SEGMENT send of equal-size
    segments. Returns (sent, received by id)."""
    biggest = _udp_max(fam)
    sizes = [5, 64, 200, 576, 1000, 1200, biggest - 1, biggest]
    rx = dst.socket(FAMILY[fam], socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    rx.bind((dst_ip, port))
    rx.settimeout(0.5)
    tx = src.socket(FAMILY[fam], socket.SOCK_DGRAM)
    tx.connect((dst_ip, port))
    sent: list[bytes] = []
    received: dict[int, bytes] = {}
    lossy = 0
    try:
        for start in range(0, UDP_DATAGRAMS, UDP_BURST):
            ids = range(start, min(start + UDP_BURST, UDP_DATAGRAMS))
            if gso:
                size = sizes[(start // UDP_BURST) % len(sizes)]
                size = max(size, 64)
                burst = [struct.pack("!I", i) + os.urandom(size - 4) for i in ids]
                tx.setsockopt(socket.SOL_UDP, UDP_SEGMENT, size)
                tx.send(b"".join(burst))
            else:
                burst = [struct.pack("!I", i) + os.urandom(sizes[i % len(sizes)] - 4)
                         for i in ids]
                for payload in burst:
                    tx.send(payload)
            sent += burst
            deadline = time.monotonic() + 1.0
            while not all(i in received for i in ids) and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    data = rx.recv(65536)
                    received[struct.unpack("!I", data[:4])[0]] = data
            if not all(i in received for i in ids):
                lossy += 1
                if lossy >= 5:  # enough to say what is lost; keep the test short
                    break
    finally:
        tx.close()
        rx.close()
    return sent, received


def _check_udp(sent: list[bytes], received: dict[int, bytes], what: str) -> None:
    missing = [i for i in range(len(sent)) if i not in received]
    sizes = sorted({len(sent[i]) for i in missing})
    assert not missing, (f"{what}: {len(missing)} of {len(sent)} datagrams lost: "
                         f"{missing[:10]}, payload sizes {sizes}")
    bad = [i for i, payload in enumerate(sent) if received[i] != payload]
    assert not bad, f"{what}: {len(bad)} datagrams changed on the way: {bad[:10]}"
    sent_hash = hashlib.sha256(b"".join(sent)).hexdigest()
    got_hash = hashlib.sha256(b"".join(received[i] for i in range(len(sent)))).hexdigest()
    assert sent_hash == got_hash, what


def _run_all(pair: Pair, offloads: bool) -> None:
    data = os.urandom(TCP_BYTES)
    want = hashlib.sha256(data).hexdigest()
    before = {ns.name: csum_counters(ns) for ns in (pair.a, pair.b)}
    ends = {"a": pair.a, "b": pair.b}
    for fam in (4, 6):
        for src_name, dst_name, dst_ip in (("a", "b", IPS[fam][1]), ("b", "a", IPS[fam][0])):
            src, dst = ends[src_name], ends[dst_name]
            what = f"IPv{fam} {src_name}->{dst_name}"
            digest, count = tcp_transfer(src, dst, dst_ip, fam, data)
            assert (count, digest) == (len(data), want), f"TCP {what}: bytes or hash differ"
            sent, received = udp_transfer(src, dst, dst_ip, fam)
            _check_udp(sent, received, f"UDP {what}")
            # An application's own UDP GSO: segmented by the kernel before (per-packet path,
            # wireguard-go: no checksum offload on their TUN, so only from our offload side).
            if offloads and src is pair.a:
                sent, received = udp_transfer(src, dst, dst_ip, fam, gso=True)
                _check_udp(sent, received, f"UDP GSO {what}")
    after = {ns.name: csum_counters(ns) for ns in (pair.a, pair.b)}
    for name, counters in after.items():
        moved = {k: v - before[name][k] for k, v in counters.items() if v != before[name][k]}
        assert not moved, f"{name}: the kernel dropped packets for bad checksums: {moved}"


def _check_path(pair: Pair, offloads: bool) -> None:
    """Which path runs: the TUN's offloads, and ``datapath`` where the device reports it."""
    for link in pair.ours:
        stats = link.stats()
        assert stats["tun"]["offloads"] is offloads, stats["tun"]
        if "datapath" in stats:
            assert stats["datapath"] == ("offload" if offloads else "per-packet"), stats
        if offloads:  # the offload machinery really ran (super-packets in, merged writes out)
            assert stats["tun"]["super_reads"] > 0 or stats["tun"]["merged_writes"] > 0, stats


PATHS = {"offload": True, "per-packet": False}


@pytest.mark.parametrize("peer", ["ours", "wireguard-go"])
@pytest.mark.parametrize("path", list(PATHS))
def test_payloads_arrive_intact(netns_factory: NetLab, tmp_path: Path, made: list,
                                path: str, peer: str) -> None:
    offloads = PATHS[path]
    pair = _pair(netns_factory, tmp_path, made, offloads=offloads, peer=peer)
    _run_all(pair, offloads)
    _check_path(pair, offloads)
    for link in pair.ours:
        assert link.proc is not None and link.proc.poll() is None, link.log_tail()
