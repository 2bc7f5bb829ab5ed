"""Issue 3 acceptance with real parts: our packet path in network namespaces, against a stock
wireguard-go and against itself; rekey under load; floods; spoofing; cleanup after SIGKILL."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kit.links import (
    Iperf3Server,
    KeyPair,
    LinkPeer,
    OurLink,
    WgGoLink,
    iperf3,
    ours_pair,
    ping,
    tcp_mbps,
    udp_summary,
    veth_hosts,
)
from tests.kit.netns import NetLab, Netns

pytestmark = pytest.mark.integration

OVERLAY = "10.9.0.0/24"


def _hosts(lab: NetLab, *names: str) -> list[Netns]:
    """Hosts on one underlay segment 10.0.0.0/24 through a bridge-less chain of veths."""
    if len(names) == 2:
        return list(veth_hosts(lab))
    hosts = [lab.netns(n) for n in names]
    hub = lab.netns("hub")
    hub.enable_forwarding()
    for i, h in enumerate(hosts, start=1):
        lab.veth(hub, h, a_addr=f"10.0.{i}.254/24", b_addr=f"10.0.{i}.1/24")
        h.default_route(f"10.0.{i}.254")
    return hosts


@pytest.fixture
def lab(netns_factory: NetLab) -> Iterator[NetLab]:
    yield netns_factory


@pytest.fixture
def links(tmp_path: Path) -> Iterator[list]:
    made: list = []
    yield made
    for link in made:
        link.stop()


def _pair_ours_wggo(lab: NetLab, tmp_path: Path, links: list, *, ours_initiates: bool
                    ) -> tuple[OurLink, WgGoLink]:
    a, b = _hosts(lab, "a", "b")
    ka, kb = KeyPair.generate(), KeyPair.generate()
    ours = OurLink(a, tmp_path, ka, "10.9.0.1/24", port=51821,
                   peers=[LinkPeer(kb.public, ["10.9.0.2/32"],
                                   "10.0.0.2:51820" if ours_initiates else None)])
    wg = WgGoLink(b, tmp_path, kb, "10.9.0.2/24", port=51820,
                  peers=[LinkPeer(ka.public, ["10.9.0.1/32"],
                                  None if ours_initiates else "10.0.0.1:51821")])
    links += [ours, wg]
    wg.start()
    ours.start()
    return ours, wg


@pytest.mark.parametrize("ours_initiates", [True, False], ids=["we-initiate", "we-respond"])
def test_interop_with_wireguard_go(lab, tmp_path, links, ours_initiates):
    ours, wg = _pair_ours_wggo(lab, tmp_path, links, ours_initiates=ours_initiates)
    src, dst = (ours.ns, wg.ip) if ours_initiates else (wg.ns, ours.ip)
    result = ping(src, dst, count=5)
    assert result.returncode == 0, result.stdout + result.stderr + ours.log_tail()
    assert wg.latest_handshakes()[ours.keys.public] > 0  # `wg show` saw the handshake
    stats = ours.stats()["peers"][0]
    assert stats["handshakes"] >= 1 and stats["endpoint"].startswith("10.0.0.2:")

    server = Iperf3Server(wg.ns, wg.ip)
    try:
        up = iperf3(ours.ns, wg.ip, seconds=2)
        down = iperf3(ours.ns, wg.ip, seconds=2, reverse=True)
    finally:
        server.stop()
    assert tcp_mbps(up) > 5 and tcp_mbps(down) > 5


def _pair_ours(lab, tmp_path, links, timers=None) -> tuple[OurLink, OurLink]:
    pair = ours_pair(lab, tmp_path, timers=timers)
    links += list(pair)
    return pair


def test_two_of_ours_ping_tcp_udp(lab, tmp_path, links):
    la, lb = _pair_ours(lab, tmp_path, links)
    assert ping(la.ns, lb.ip, count=3).returncode == 0
    assert ping(lb.ns, la.ip, count=3).returncode == 0
    server = Iperf3Server(lb.ns, lb.ip)
    try:
        assert tcp_mbps(iperf3(la.ns, lb.ip, seconds=2)) > 5
        assert tcp_mbps(iperf3(la.ns, lb.ip, seconds=2, reverse=True)) > 5
        udp = udp_summary(iperf3(la.ns, lb.ip, seconds=2, udp_bitrate="20M"))
        assert udp["packets"] > 1000 and udp["lost_percent"] < 1.0
    finally:
        server.stop()


def test_rekey_under_traffic_without_loss(lab, tmp_path, links):
    timers = {"rekey_after_time": 2.0, "reject_after_time": 5.0, "keepalive_timeout": 1.0,
              "rekey_timeout": 1.0}
    la, lb = _pair_ours(lab, tmp_path, links, timers)
    assert ping(la.ns, lb.ip, count=2).returncode == 0
    server = Iperf3Server(lb.ns, lb.ip)
    try:
        udp = udp_summary(iperf3(la.ns, lb.ip, seconds=7, udp_bitrate="10M"))
    finally:
        server.stop()
    handshakes = la.stats()["peers"][0]["handshakes"]
    assert handshakes >= 3, f"expected rekeys under traffic, saw {handshakes} handshakes"
    assert udp["packets"] > 5000
    assert udp["lost"] == 0, udp


def test_random_udp_flood_does_not_stop_ping(lab, tmp_path, links):
    la, lb = _pair_ours(lab, tmp_path, links)
    assert ping(la.ns, lb.ip, count=2).returncode == 0
    flood = (
        "import os, socket, time\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "end = time.monotonic() + 4\n"
        "n = 0\n"
        "while time.monotonic() < end and n < 400000:\n"
        "    size = 1 + os.urandom(1)[0] * 5\n"
        "    first = bytes([1 + n % 4, 0, 0, 0]) if n % 3 == 0 else b''\n"
        "    s.sendto(first + os.urandom(size), ('10.0.0.2', 51822))\n"
        "    n += 1\n"
        "print(n)\n"
    )
    attacker = la.ns.popen([sys.executable, "-c", flood], stdout=-1, text=True)
    try:
        result = ping(la.ns, lb.ip, count=15, interval=0.2)
    finally:
        out, _ = attacker.communicate(timeout=20)
    assert int(out.strip()) > 1000
    received = int(result.stdout.split(" received")[0].rsplit(" ", 1)[-1])
    assert received >= 14, result.stdout
    drops = lb.stats()["drops"]
    assert sum(drops.values()) > 1000, drops
    assert lb.proc is not None and lb.proc.poll() is None


def test_spoofed_inner_source_is_dropped(lab, tmp_path, links):
    a, b, c = _hosts(lab, "a", "b", "c")
    keys = {n: KeyPair.generate() for n in "abc"}
    ip = {"a": "10.9.0.1", "b": "10.9.0.2", "c": "10.9.0.3"}
    under = {"a": "10.0.1.1", "b": "10.0.2.1", "c": "10.0.3.1"}
    ns = {"a": a, "b": b, "c": c}
    made = {}
    for i, n in enumerate("abc"):
        peers = [LinkPeer(keys[m].public, [f"{ip[m]}/32"], f"{under[m]}:{51821 + 'abc'.index(m)}")
                 for m in "abc" if m != n]
        made[n] = OurLink(ns[n], tmp_path, keys[n], f"{ip[n]}/24", port=51821 + i,
                          peers=peers)
    links += list(made.values())
    for link in made.values():
        link.start()
    assert ping(a, ip["c"], count=2).returncode == 0
    assert ping(b, ip["c"], count=2).returncode == 0
    # From a, craft UDP packets whose inner source is b's overlay address, towards c.
    spoof = (
        "import socket, struct\n"
        "def csum(b):\n"
        "    s = sum(struct.unpack('!%dH' % (len(b)//2), b))\n"
        "    s = (s >> 16) + (s & 0xffff); s += s >> 16\n"
        "    return ~s & 0xffff\n"
        "src, dst = socket.inet_aton('10.9.0.2'), socket.inet_aton('10.9.0.3')\n"
        "udp = struct.pack('!HHHH', 4444, 5555, 8 + 5, 0) + b'spoof'\n"
        "hdr = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, src, dst)\n"
        "hdr = hdr[:10] + struct.pack('!H', csum(hdr)) + hdr[12:]\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)\n"
        "for _ in range(20):\n"
        "    s.sendto(hdr + udp, ('10.9.0.3', 0))\n"
    )
    before = made["c"].stats()
    a.run([sys.executable, "-c", spoof])
    deadline = time.monotonic() + 5
    drops = 0
    while time.monotonic() < deadline:
        drops = made["c"].stats()["drops"].get("source", 0)
        if drops >= 20:
            break
        time.sleep(0.1)
    assert drops >= 20
    assert before["drops"].get("source", 0) == 0
    # The real a and b still reach c.
    assert ping(a, ip["c"], count=1).returncode == 0


def test_cleanup_after_sigkill_leaves_nothing(lab, tmp_path, links):
    la, lb = _pair_ours(lab, tmp_path, links)
    assert ping(la.ns, lb.ip, count=1).returncode == 0
    ns = la.ns
    # A leftover persistent device, as a crash of an older version could leave.
    ns.ip("tuntap", "add", "dev", "svpn-left", "mode", "tun")
    ns.ip("addr", "add", "10.66.0.1/24", "dev", "svpn-left")
    ns.ip("link", "set", "svpn-left", "up")
    la.stop(signal.SIGKILL)
    out = ns.run([sys.executable, "-m", "socialvpn", "cleanup", "--config", "/nonexistent"])
    assert "svpn-left" in out.stdout
    assert "svpn-" not in ns.ip("link", "show").stdout
    assert "svpn-" not in ns.ip("route", "show").stdout
    assert "svpn-" not in ns.ip("-6", "route", "show").stdout
    again = ns.run([sys.executable, "-m", "socialvpn", "cleanup", "--config", "/nonexistent"])
    assert "nothing to clean up" in again.stdout
