"""Issue 7, acceptance 3: both packet paths (offload and per-packet), against themselves and
against a stock wireguard-go, carry inner IPv4 and IPv6, TCP and UDP payloads intact — checked
with SHA-256 end to end — and no receiving kernel drops anything for a bad checksum (its
/proc/net/snmp and /proc/net/snmp6 counters do not move). Between two of our offload peers
both checksum modes run (partial, the default two agents negotiate, and full), and the link
stats say which one did.

Routed on: with partial checksums the receiving peer's kernel must complete the checksum of
what it forwards; a third namespace behind it (no offloads on that hop: it verifies every
packet) proves it, and a control shows that it would notice if not. Relayed: a peer that
routes between two peers through its one TUN device hands a stock WireGuard peer full
checksums and one of ours partial ones. Through an exit node's NAT, too. A datagram whose
checksum was bad before it entered the tunnel must still be dropped by its destination, in
either mode (a full checksum crosses as it is, and the receiver tells partial form from the
packet).

Sockets are made inside the namespaces by this process (``Netns.socket``); the links run as
their own processes. UDP goes lock-step (a burst, then wait for it) so nothing is lost for
want of buffer space: every datagram must arrive.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.kit.links import (
    KeyPair,
    LinkPeer,
    OurLink,
    WgGoLink,
    ping,
    set_link_features,
    tcp_pull,
    tcp_transfer,
    veth_hosts,
)
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


def _pair(lab: NetLab, tmp: Path, made: list, *, offloads: bool, peer: str,
          partial: bool = False) -> Pair:
    """a (our link) and b (``peer``: "ours" or "wireguard-go") over a veth. ``partial``:
    the two ask for partial checksums (only ours with ours; in effect only with offloads)."""
    assert not (partial and peer != "ours"), "a stock WireGuard peer gets full checksums"
    a, b = veth_hosts(lab)
    ka, kb = KeyPair.generate(), KeyPair.generate()
    allowed_a = [f"{IPS[4][0]}/32", f"{IPS[6][0]}/128"]
    allowed_b = [f"{IPS[4][1]}/32", f"{IPS[6][1]}/128"]
    la = OurLink(a, tmp, ka, f"{IPS[4][0]}/24", port=51821, offloads=offloads,
                 extra_addresses=[f"{IPS[6][0]}/64"],
                 peers=[LinkPeer(kb.public, allowed_b, "10.0.0.2:51822",
                                 partial_checksums=partial)])
    lb: OurLink | WgGoLink
    if peer == "ours":
        lb = OurLink(b, tmp, kb, f"{IPS[4][1]}/24", port=51822, offloads=offloads,
                     extra_addresses=[f"{IPS[6][1]}/64"],
                     peers=[LinkPeer(ka.public, allowed_a, "10.0.0.1:51821",
                                     partial_checksums=partial)])
    else:
        lb = WgGoLink(b, tmp, kb, f"{IPS[4][1]}/24", port=51822,
                      extra_addresses=[f"{IPS[6][1]}/64"],
                      peers=[LinkPeer(ka.public, allowed_a, "10.0.0.1:51821")])
    made += [la, lb]
    lb.start()
    la.start()
    ours = [la] + ([lb] if isinstance(lb, OurLink) else [])
    for ns, target in ((a, IPS[4][1]), (a, IPS[6][1]), (b, IPS[4][0]), (b, IPS[6][0])):
        wait_ping(ns, target)
    return Pair(a, b, ours)


def wait_ping(ns: Netns, target: str, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while ping(ns, target, count=1, timeout=1.0).returncode != 0:
        assert time.monotonic() < deadline, f"{ns.name} cannot reach {target}"


@contextlib.contextmanager
def udp_pair(src: Netns, dst: Netns, dst_ip: str, fam: int, port: int, *, timeout: float,
             rcvbuf: int = 0) -> Iterator[tuple[socket.socket, socket.socket]]:
    """(tx, rx): a UDP socket in ``src`` connected to ``dst_ip``:``port`` and one bound there
    in ``dst`` (receives time out after ``timeout`` s); both closed on the way out."""
    rx = dst.socket(FAMILY[fam], socket.SOCK_DGRAM)
    tx = src.socket(FAMILY[fam], socket.SOCK_DGRAM)
    try:
        if rcvbuf:
            rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        rx.bind((dst_ip, port))
        rx.settimeout(timeout)
        tx.connect((dst_ip, port))
        yield tx, rx
    finally:
        tx.close()
        rx.close()


def udp_echo(client: Netns, server: Netns, server_ip: str, fam: int, sizes: list[int], *,
             port: int) -> tuple[list[bytes], dict[int, bytes]]:
    """``client`` sends each datagram to ``server``, which sends it back to where it came
    from (through a NAT: the address it was mapped to); returns (sent, echoed back by id)."""
    sent: list[bytes] = []
    echoed: dict[int, bytes] = {}
    with udp_pair(client, server, server_ip, fam, port, timeout=1.0) as (tx, rx):
        tx.settimeout(1.0)
        for i, size in enumerate(sizes):
            payload = struct.pack("!I", i) + os.urandom(size - 4)
            sent.append(payload)
            tx.send(payload)
            with contextlib.suppress(TimeoutError):
                data, addr = rx.recvfrom(65536)
                rx.sendto(data, addr)
                back = tx.recv(65536)
                echoed[struct.unpack("!I", back[:4])[0]] = back
    return sent, echoed


def _udp_max(fam: int) -> int:
    return INNER_MTU - (20 if fam == 4 else 40) - 8


def udp_transfer(src: Netns, dst: Netns, dst_ip: str, fam: int, *, gso: bool = False,
                 port: int = 5002) -> tuple[list[bytes], dict[int, bytes]]:
    """Datagrams of varied sizes (1 byte over the id up to the largest that fits the inner
    MTU), lock-step in bursts; with ``gso`` each burst is one UDP_SEGMENT send of equal-size
    segments. Returns (sent, received by id)."""
    biggest = _udp_max(fam)
    sizes = [5, 64, 200, 576, 1000, 1200, biggest - 1, biggest]
    sent: list[bytes] = []
    received: dict[int, bytes] = {}
    lossy = 0
    with udp_pair(src, dst, dst_ip, fam, port, timeout=0.5, rcvbuf=4 << 20) as (tx, rx):
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
    return sent, received


SO_NO_CHECK = 11  # asm-generic/socket.h: send UDP over IPv4 without a checksum (0)


def udp_each(src: Netns, dst: Netns, dst_ip: str, fam: int, sizes: list[int], *,
             port: int, no_check: bool = False) -> tuple[list[bytes], dict[int, bytes]]:
    """One datagram at a time, each waited for (up to a second): sizes over the MTU are
    fragmented by the sending kernel; ``no_check`` (IPv4): sent with checksum 0."""
    sent: list[bytes] = []
    received: dict[int, bytes] = {}
    with udp_pair(src, dst, dst_ip, fam, port, timeout=0.2) as (tx, rx):
        if no_check:
            tx.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
        for i, size in enumerate(sizes):
            payload = struct.pack("!I", i) + os.urandom(size - 4)
            sent.append(payload)
            tx.send(payload)
            deadline = time.monotonic() + 1.0
            while i not in received and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    data = rx.recv(65536)
                    received[struct.unpack("!I", data[:4])[0]] = data
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


def _check_path(pair: Pair, offloads: bool, checksums: str) -> None:
    """Which path runs: the TUN's offloads, ``datapath`` where the device reports it, and the
    checksum mode with the peer ("partial" or "full")."""
    for link in pair.ours:
        stats = link.stats()
        assert stats["tun"]["offloads"] is offloads, stats["tun"]
        if "datapath" in stats:
            assert stats["datapath"] == ("offload" if offloads else "per-packet"), stats
        if offloads:  # the offload machinery really ran (super-packets in, merged writes out)
            assert stats["tun"]["super_reads"] > 0 or stats["tun"]["merged_writes"] > 0, stats
        assert [p["checksums"] for p in stats["peers"]] == [checksums], stats["peers"]


# path, peer -> (offloads, ask for partial checksums, the mode that must be in effect)
CASES = {
    ("offload", "ours"): (True, True, "partial"),
    ("offload", "ours-full"): (True, False, "full"),
    ("offload", "wireguard-go"): (True, False, "full"),
    # Asked for, partial checksums are never in effect without offloads.
    ("per-packet", "ours"): (False, True, "full"),
    ("per-packet", "wireguard-go"): (False, False, "full"),
}


@pytest.mark.parametrize(("path", "peer"), list(CASES), ids=[f"{p}-{q}" for p, q in CASES])
def test_payloads_arrive_intact(netns_factory: NetLab, tmp_path: Path, made: list,
                                path: str, peer: str) -> None:
    offloads, partial, checksums = CASES[path, peer]
    pair = _pair(netns_factory, tmp_path, made, offloads=offloads,
                 peer="wireguard-go" if peer == "wireguard-go" else "ours", partial=partial)
    _run_all(pair, offloads)
    _check_path(pair, offloads, checksums)
    for link in pair.ours:
        assert link.proc is not None and link.proc.poll() is None, link.log_tail()


# --- routed on: the kernel of the receiving peer completes partial checksums ----------------

FWD_IPS = {4: ("10.20.0.1", "10.20.0.2"), 6: ("fd00:20::1", "fd00:20::2")}  # b, c
FWD_NETS = {4: "10.20.0.0/24", 6: "fd00:20::/64"}
FWD_TCP_PORT, FWD_UDP_PORT = 5101, 5102
FRAGMENTED = [1400, 2000, 2999, 5000, 9001, 20000] * 3  # UDP payload sizes over the MTU
NO_CHECK = [5, 100, 1000, 1300, 1352] * 4
# The TX checksum offload of b's veth to c: off, the kernel of b must complete every partial
# checksum itself before the packet leaves (skb_checksum_help, software GSO) and c verifies
# what arrives; on, partial packets cross to c as they are (c accepts them unverified) and
# c's TCP hands b super-packets with partial checksums for the way back.
VETH_CSUM = ["tx-checksum-ip-generic"]
MASQUERADE = """
table inet svpn_exit {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "v-c" masquerade random
    }
}
"""


@dataclass
class Routed:
    a: Netns  # our link to b
    b: Netns  # our link to a, routes between the overlay and c (ip_forward=1)
    c: Netns  # behind b on a plain veth, no link of its own
    ours: list[OurLink]


def _routed(lab: NetLab, tmp: Path, made: list, *, partial: tuple[bool, bool],
            veth_offload: bool, nat: bool = False, b_offloads: bool = True) -> Routed:
    """a —(our link over a veth)— b —(plain veth)— c; a's peer entry for b allows c's
    subnets, c routes the overlay back via b - or, with ``nat``, knows nothing of it: b
    masquerades (random ports) what it routes to c, an exit node. ``partial``: a's and b's
    setting for the other; ``b_offloads``: b's TUN device takes virtio headers."""
    a, b = veth_hosts(lab)
    c = lab.netns("c")
    lab.veth(b, c, mtu=INNER_MTU)
    for fam in (4, 6):
        plen = 24 if fam == 4 else 64
        b.ip("addr", "add", f"{FWD_IPS[fam][0]}/{plen}", "dev", "v-c", "nodad")
        c.ip("addr", "add", f"{FWD_IPS[fam][1]}/{plen}", "dev", "v-b", "nodad")
    if nat:
        b.nft(MASQUERADE)
    else:
        c.ip("route", "add", "10.9.0.0/24", "via", FWD_IPS[4][0])
        c.ip("-6", "route", "add", "fd00:9::/64", "via", FWD_IPS[6][0])
    if not veth_offload:
        for ns, ifname in ((b, "v-c"), (c, "v-b")):
            now = set_link_features(ns, ifname, dict.fromkeys(VETH_CSUM, False))
            assert not any(now.values()), now
    ka, kb = KeyPair.generate(), KeyPair.generate()
    la = OurLink(a, tmp, ka, f"{IPS[4][0]}/24", port=51821, offloads=True,
                 extra_addresses=[f"{IPS[6][0]}/64"],
                 peers=[LinkPeer(kb.public, [f"{IPS[4][1]}/32", f"{IPS[6][1]}/128",
                                             FWD_NETS[4], FWD_NETS[6]],
                                 "10.0.0.2:51822", partial_checksums=partial[0])])
    lb = OurLink(b, tmp, kb, f"{IPS[4][1]}/24", port=51822, offloads=b_offloads,
                 extra_addresses=[f"{IPS[6][1]}/64"],
                 peers=[LinkPeer(ka.public, [f"{IPS[4][0]}/32", f"{IPS[6][0]}/128"],
                                 "10.0.0.1:51821", partial_checksums=partial[1])])
    made += [la, lb]
    lb.start()
    la.start()
    a.ip("route", "add", FWD_NETS[4], "dev", la.tun)
    a.ip("-6", "route", "add", FWD_NETS[6], "dev", la.tun)
    b.enable_forwarding()
    pings = [(a, FWD_IPS[4][1]), (a, FWD_IPS[6][1])]
    for ns, target in pings + ([] if nat else [(c, IPS[4][0]), (c, IPS[6][0])]):
        wait_ping(ns, target)
    return Routed(a, b, c, [la, lb])


def _link_bytes(link: OurLink) -> tuple[int, int]:
    peer = link.stats()["peers"][0]
    return int(peer["tx_bytes"]), int(peer["rx_bytes"])


@pytest.mark.parametrize(("veth_offload", "partial"), [
    (False, (True, True)), (True, (True, True)), (False, (True, False))],
    ids=["b-completes", "veth-offload", "only-a-partial"])
def test_routed_partial_checksums_are_completed(netns_factory: NetLab, tmp_path: Path,
                                                made: list, veth_offload: bool,
                                                partial: tuple[bool, bool]) -> None:
    """TCP and UDP, IPv4 and IPv6, a→c and c→a through b: everything arrives intact and
    neither end's kernel counts a bad checksum - b completes the partial checksums of what it
    routes on (with ``b-completes``, c verifies every packet it gets). ``only-a-partial``: the
    two ends disagree (one restarted, or switched first): b tells a's partial form from the
    packets, a gets full checksums from b - still nothing lost."""
    net = _routed(netns_factory, tmp_path, made, partial=partial,
                  veth_offload=veth_offload)
    data = os.urandom(TCP_BYTES)
    want = hashlib.sha256(data).hexdigest()
    before = {ns.short: csum_counters(ns) for ns in (net.a, net.b, net.c)}
    bytes_before = _link_bytes(net.ours[0])
    for fam in (4, 6):
        ways = (("a", net.a, net.c, FWD_IPS[fam][1]), ("c", net.c, net.a, IPS[fam][0]))
        for src_name, src, dst, dst_ip in ways:
            what = f"IPv{fam} {src_name}->{'c' if src_name == 'a' else 'a'}"
            digest, count = tcp_transfer(src, dst, dst_ip, fam, data, port=FWD_TCP_PORT)
            assert (count, digest) == (len(data), want), f"TCP {what}: bytes or hash differ"
            sent, received = udp_transfer(src, dst, dst_ip, fam, port=FWD_UDP_PORT)
            _check_udp(sent, received, f"UDP {what}")
            sent, received = udp_transfer(src, dst, dst_ip, fam, gso=True, port=FWD_UDP_PORT)
            _check_udp(sent, received, f"UDP GSO {what}")
            # Fragments (not plain: they cross with their full checksums, left alone).
            sent, received = udp_each(src, dst, dst_ip, fam, FRAGMENTED, port=FWD_UDP_PORT)
            _check_udp(sent, received, f"UDP fragmented {what}")
            if fam == 4:  # no checksum at all: stays 0 (and b does not make one up)
                sent, received = udp_each(src, dst, dst_ip, fam, NO_CHECK, port=FWD_UDP_PORT,
                                          no_check=True)
                _check_udp(sent, received, f"UDP without checksum {what}")
    after = {ns.short: csum_counters(ns) for ns in (net.a, net.b, net.c)}
    for name, counters in after.items():
        moved = {k: v - before[name][k] for k, v in counters.items() if v != before[name][k]}
        assert not moved, f"{name}: the kernel dropped packets for bad checksums: {moved}"
    tx, rx = (now - then for now, then in zip(_link_bytes(net.ours[0]), bytes_before,
                                               strict=True))
    assert min(tx, rx) > 2 * TCP_BYTES, (tx, rx)  # both ways went over the link
    for link, mode in zip(net.ours, partial, strict=True):
        stats = link.stats()
        assert [p["checksums"] for p in stats["peers"]] == [
            "partial" if mode else "full"], stats["peers"]
        assert stats["tun"]["dropped_writes"] == 0, stats["tun"]
        assert link.proc is not None and link.proc.poll() is None, link.log_tail()


def test_routed_check_sees_checksums_left_partial(netns_factory: NetLab, tmp_path: Path,
                                                  made: list) -> None:
    """The control for the test above: c really verifies what b routes on. With a in partial
    mode and b without offloads on its TUN (a configuration the negotiation never produces:
    b advertises nothing), b cannot hand a's partial-form datagrams to its kernel as such,
    routes them on with the pseudo-header sum as their checksum, and c drops and counts every
    one."""
    net = _routed(netns_factory, tmp_path, made, partial=(True, False), veth_offload=False,
                  b_offloads=False)
    count = 20
    for fam, key in ((4, "UdpInCsumErrors"), (6, "Udp6InCsumErrors")):
        before = csum_counters(net.c)
        got = 0
        with udp_pair(net.a, net.c, FWD_IPS[fam][1], fam, FWD_UDP_PORT, timeout=0.5) as (tx, rx):
            for i in range(count):
                tx.send(struct.pack("!I", i) + os.urandom(100 + i))
            with contextlib.suppress(TimeoutError):
                for _ in range(count):
                    rx.recv(2048)
                    got += 1
        deadline = time.monotonic() + 3
        while csum_counters(net.c)[key] - before[key] < count and time.monotonic() < deadline:
            time.sleep(0.05)
        moved = csum_counters(net.c)[key] - before[key]
        assert (got, moved) == (0, count), f"IPv{fam}: received {got}, {key} +{moved}"
    assert [p["checksums"] for p in net.ours[0].stats()["peers"]] == ["partial"]
    assert [p["checksums"] for p in net.ours[1].stats()["peers"]] == ["full"]


# --- relayed: in and out of the same TUN device on b -----------------------------------------

HUB_IPS = {4: ("10.9.0.1", "10.9.0.2", "10.9.0.3"), 6: ("fd00:9::1", "fd00:9::2", "fd00:9::3")}


def _checksums_by_key(link: OurLink) -> dict[str, str]:
    return {p["public_key"]: p["checksums"] for p in link.stats()["peers"]}


@pytest.mark.parametrize("far", ["wireguard-go", "ours"])
def test_relayed_through_one_tun(netns_factory: NetLab, tmp_path: Path, made: list,
                                 far: str) -> None:
    """a —(ours, partial)— b —(d: wireguard-go, full; or ours, partial)— d, b relaying
    between its two peers through its one TUN device (ip_forward=1): what a sends in partial
    form leaves b for wireguard-go fully checksummed (b completes what its kernel hands back
    partial) and for one of ours still partial; everything arrives intact, no kernel on the
    way drops a packet for a bad checksum."""
    lab = netns_factory
    a, b = veth_hosts(lab)
    d = lab.netns("d")
    lab.veth(b, d, a_addr="10.0.1.1/24", b_addr="10.0.1.2/24")
    ka, kb, kd = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
    ours_far = far == "ours"
    ip = {name: {fam: HUB_IPS[fam][i] for fam in (4, 6)} for i, name in enumerate("abd")}

    def hosts(*names: str) -> list[str]:
        return [f"{ip[n][4]}/32" for n in names] + [f"{ip[n][6]}/128" for n in names]

    la = OurLink(a, tmp_path, ka, f"{ip['a'][4]}/24", port=51821,
                 extra_addresses=[f"{ip['a'][6]}/64"],
                 peers=[LinkPeer(kb.public, hosts("b", "d"), "10.0.0.2:51822",
                                 partial_checksums=True)])
    lb = OurLink(b, tmp_path, kb, f"{ip['b'][4]}/24", port=51822,
                 extra_addresses=[f"{ip['b'][6]}/64"],
                 peers=[LinkPeer(ka.public, hosts("a"), "10.0.0.1:51821",
                                 partial_checksums=True),
                        LinkPeer(kd.public, hosts("d"), "10.0.1.2:51823",
                                 partial_checksums=ours_far)])
    far_peers = [LinkPeer(kb.public, hosts("a", "b"), "10.0.1.1:51822",
                          partial_checksums=ours_far)]
    ld: OurLink | WgGoLink
    if ours_far:
        ld = OurLink(d, tmp_path, kd, f"{ip['d'][4]}/24", port=51823,
                     extra_addresses=[f"{ip['d'][6]}/64"], peers=far_peers)
    else:
        ld = WgGoLink(d, tmp_path, kd, f"{ip['d'][4]}/24", port=51823,
                      extra_addresses=[f"{ip['d'][6]}/64"], peers=far_peers)
    made += [la, lb, ld]
    for link in (lb, la, ld):
        link.start()
    b.enable_forwarding()
    b.sysctl("net.ipv4.conf.all.send_redirects", 0)
    b.sysctl(f"net.ipv4.conf.{lb.tun}.send_redirects", 0)
    for ns, target in ((a, ip["d"][4]), (a, ip["d"][6]), (d, ip["a"][4]), (d, ip["a"][6])):
        wait_ping(ns, target)
    data = os.urandom(TCP_BYTES)
    want = hashlib.sha256(data).hexdigest()
    before = {ns.short: csum_counters(ns) for ns in (a, b, d)}
    for fam in (4, 6):
        for src_name, src, dst, dst_ip in (("a", a, d, ip["d"][fam]), ("d", d, a, ip["a"][fam])):
            what = f"IPv{fam} {src_name}->{'d' if src_name == 'a' else 'a'}"
            digest, count = tcp_transfer(src, dst, dst_ip, fam, data, port=FWD_TCP_PORT)
            assert (count, digest) == (len(data), want), f"TCP {what}: bytes or hash differ"
            sent, received = udp_transfer(src, dst, dst_ip, fam, port=FWD_UDP_PORT)
            _check_udp(sent, received, f"UDP {what}")
            if src is a or ours_far:  # an application's UDP GSO, from an offload side
                sent, received = udp_transfer(src, dst, dst_ip, fam, gso=True,
                                              port=FWD_UDP_PORT)
                _check_udp(sent, received, f"UDP GSO {what}")
    after = {ns.short: csum_counters(ns) for ns in (a, b, d)}
    for name, counters in after.items():
        moved = {k: v - before[name][k] for k, v in counters.items() if v != before[name][k]}
        assert not moved, f"{name}: the kernel dropped packets for bad checksums: {moved}"
    hexkey = {name: base64.b64decode(k.public).hex() for name, k in (("a", ka), ("d", kd))}
    far_mode = "partial" if ours_far else "full"
    assert _checksums_by_key(lb) == {hexkey["a"]: "partial", hexkey["d"]: far_mode}
    assert list(_checksums_by_key(la).values()) == ["partial"]
    for link in (la, lb) + ((ld,) if isinstance(ld, OurLink) else ()):
        assert link.proc is not None and link.proc.poll() is None, link.log_tail()


@pytest.mark.parametrize("veth_offload", [False, True], ids=["b-completes", "veth-offload"])
def test_partial_checksums_through_a_nat(netns_factory: NetLab, tmp_path: Path, made: list,
                                         veth_offload: bool) -> None:
    """b as an exit node: it masquerades (new source address and random port) what it routes
    from a to c. NAT rewrites the pseudo-header sum of a partial checksum as it stands (the
    kernel's own convention, which ours must be): uploads and downloads, TCP and UDP, IPv4
    and IPv6 arrive intact and no kernel counts a bad checksum."""
    net = _routed(netns_factory, tmp_path, made, partial=(True, True),
                  veth_offload=veth_offload, nat=True)
    data = os.urandom(TCP_BYTES)
    want = hashlib.sha256(data).hexdigest()
    before = {ns.short: csum_counters(ns) for ns in (net.a, net.b, net.c)}
    sizes = [5, 64, 200, 576, 1000, 1200, 1300, 1352, 2000, 4000] * 20
    for fam in (4, 6):
        server = FWD_IPS[fam][1]
        digest, count = tcp_transfer(net.a, net.c, server, fam, data, port=FWD_TCP_PORT)
        assert (count, digest) == (len(data), want), f"TCP IPv{fam} upload through the NAT"
        digest, count = tcp_pull(net.a, net.c, server, fam, data, port=FWD_TCP_PORT + 1)
        assert (count, digest) == (len(data), want), f"TCP IPv{fam} download through the NAT"
        sent, received = udp_transfer(net.a, net.c, server, fam, port=FWD_UDP_PORT)
        _check_udp(sent, received, f"UDP IPv{fam} a->c through the NAT")
        sent, echoed = udp_echo(net.a, net.c, server, fam, sizes, port=FWD_UDP_PORT + 1)
        _check_udp(sent, echoed, f"UDP IPv{fam} echoed through the NAT")
    after = {ns.short: csum_counters(ns) for ns in (net.a, net.b, net.c)}
    for name, counters in after.items():
        moved = {k: v - before[name][k] for k, v in counters.items() if v != before[name][k]}
        assert not moved, f"{name}: the kernel dropped packets for bad checksums: {moved}"
    # c has no route to the overlay: every reply it sent went to b's address, de-NATed there.
    for link in net.ours:
        assert [p["checksums"] for p in link.stats()["peers"]] == ["partial"]
        assert link.proc is not None and link.proc.poll() is None, link.log_tail()


@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
def test_a_bad_checksum_still_reaches_its_destination_bad(netns_factory: NetLab,
                                                          tmp_path: Path, made: list,
                                                          partial: bool) -> None:
    """What the link did not make it must not mend: a datagram whose UDP checksum is wrong
    when it enters the tunnel is dropped and counted by its destination, c."""
    net = _routed(netns_factory, tmp_path, made, partial=(partial, partial),
                  veth_offload=False)
    port = FWD_UDP_PORT + 5
    payload = b"corrupted before the tunnel" * 10
    udp = bytearray(struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload)
    src = socket.inet_aton(IPS[4][0])
    dst = socket.inet_aton(FWD_IPS[4][1])
    pseudo = src + dst + struct.pack("!BBH", 0, 17, len(udp))
    total = sum(struct.unpack(f"!{(len(pseudo) + len(udp)) // 2}H", pseudo + udp))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    good = ~total & 0xFFFF or 0xFFFF
    udp[6:8] = (good ^ 0x0101).to_bytes(2, "big")  # wrong (and not 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0x4000, 64, 17, 0, src, dst)
    rx = net.c.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw = net.a.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    before = csum_counters(net.c)["UdpInCsumErrors"]
    got: list[bytes] = []
    try:
        rx.bind((FWD_IPS[4][1], port))
        rx.settimeout(1.0)
        raw.sendto(ip + bytes(udp), (FWD_IPS[4][1], 0))
        with contextlib.suppress(TimeoutError):
            got.append(rx.recv(2048))
    finally:
        raw.close()
        rx.close()
    deadline = time.monotonic() + 2
    while csum_counters(net.c)["UdpInCsumErrors"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    counted = csum_counters(net.c)["UdpInCsumErrors"] - before
    assert (len(got), counted) == (0, 1), f"c received {len(got)}, UdpInCsumErrors +{counted}"
