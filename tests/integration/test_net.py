"""net/ against a real kernel: TUN devices and pyroute2 inside throw-away namespaces.

The TUN device is opened by a thread that joined the test's namespace (``in_netns``: the
descriptor keeps working from any thread afterwards); the router works on that namespace by
name. The SIGKILL test runs a child process in the namespace. Nothing touches the root
namespace.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from socialvpn.net.fake import FakeRouter
from socialvpn.net.packet_router import PacketRouter
from socialvpn.net.router import InterfaceSpec, Router, RouterAPI, RouterError
from socialvpn.net.tun import TunClosed, TunDevice, TunError
from tests.kit.netns import NetLab, Netns, in_netns

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEV = "svpn-t"
SPEC = InterfaceSpec(
    DEV, 1380, ("10.77.0.1/24", "fd00::1/64"), ("10.88.0.0/16", "fd01::/64", "10.77.0.0/24")
)


def open_tun(ns: Netns, name: str = DEV, mtu: int = 1380) -> TunDevice:
    return in_netns(ns.name, lambda: TunDevice.open(name, mtu))


def ip_json(ns: Netns, *args: str) -> list[dict[str, object]]:
    out = ns.ip("-j", *args).stdout.strip()
    return json.loads(out) if out else []


def addresses(ns: Netns, dev: str = DEV) -> set[str]:
    """Global addresses of ``dev`` (the kernel's own fe80:: is left out)."""
    links = ip_json(ns, "addr", "show", "dev", dev)
    return {f"{a['local']}/{a['prefixlen']}" for link in links for a in link["addr_info"]
            if a.get("scope") != "link"}


def routes(ns: Netns, dev: str = DEV) -> set[tuple[str, str]]:
    """(prefix, protocol) of the main-table routes through ``dev``, both families."""
    out = set()
    for family in ("-4", "-6"):
        for r in ip_json(ns, family, "route", "show", "dev", dev):
            dst = str(r["dst"])
            if "/" not in dst:
                dst += "/32" if family == "-4" else "/128"
            out.add((dst, str(r.get("protocol", "boot"))))
    return out


def link(ns: Netns, dev: str = DEV) -> dict[str, object]:
    return ip_json(ns, "-d", "link", "show", "dev", dev)[0]


def svpn_links(ns: Netns) -> list[str]:
    return sorted(str(x["ifname"]) for x in ip_json(ns, "link") if
                  str(x["ifname"]).startswith("svpn-"))


def wait_for(cond: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def read_until(tun: TunDevice, want: Callable[[bytes], bool], timeout: float = 3.0) -> bytes:
    """Read packets (skipping IPv6 router solicitations and the like) until one is wanted."""
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(tun.fileno(), select.POLLIN)
    while (left := deadline - time.monotonic()) > 0:
        if poller.poll(int(left * 1000) + 1):
            packet = tun.read()
            if want(packet):
                return packet
    raise AssertionError("the wanted packet never came out of the TUN device")


def is_echo_request(dst: bytes) -> Callable[[bytes], bool]:
    def check(p: bytes) -> bool:
        if p[0] >> 4 == 4:
            return p[9] == 1 and p[16:20] == dst and p[(p[0] & 15) * 4] == 8
        return len(p) > 40 and p[6] == 58 and p[24:40] == dst and p[40] == 128
    return check


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_reply_v4(request: bytes) -> bytes:
    """The ICMP echo reply a peer would send back (addresses swapped, type 0, checksums)."""
    hlen = (request[0] & 15) * 4
    header = bytearray(request[:hlen])
    header[12:16], header[16:20] = request[16:20], request[12:16]
    header[10:12] = b"\0\0"
    header[10:12] = checksum(bytes(header)).to_bytes(2, "big")
    icmp = bytearray(request[hlen:])
    icmp[0] = 0
    icmp[2:4] = b"\0\0"
    icmp[2:4] = checksum(bytes(icmp)).to_bytes(2, "big")
    return bytes(header + icmp)


@pytest.fixture
def ns(netns_factory: NetLab) -> Netns:
    return netns_factory("net")


# --- the device -------------------------------------------------------------------------------


def test_open_makes_a_non_persistent_tun(ns: Netns) -> None:
    with open_tun(ns, mtu=1400) as tun:
        info = link(ns)
        assert info["mtu"] == 1400
        kind = info["linkinfo"]["info_kind"]  # type: ignore[index]
        data = info["linkinfo"]["info_data"]  # type: ignore[index]
        assert kind == "tun" and data["type"] == "tun" and data["pi"] is False
        assert data["persist"] is False
        assert not os.get_inheritable(tun.fileno())
    assert wait_for(lambda: svpn_links(ns) == [])


def test_open_takes_over_a_leftover_persistent_device(ns: Netns) -> None:
    ns.run(["ip", "tuntap", "add", "dev", DEV, "mode", "tun"])
    with open_tun(ns):
        assert link(ns)["linkinfo"]["info_data"]["persist"] is False  # type: ignore[index]
    assert wait_for(lambda: svpn_links(ns) == [])


def test_open_errors_are_clear(ns: Netns) -> None:
    # (in the namespace, so that a validation bug could not make a device in the root one)
    with pytest.raises(ValueError, match="at most 15"):
        open_tun(ns, "svpn-0123456789a")
    with pytest.raises(ValueError, match="MTU"):
        open_tun(ns, "svpn-x", 10)
    ns.ip("link", "add", "svpn-veth", "type", "veth", "peer", "name", "other")
    with pytest.raises(TunError, match="svpn-veth: EINVAL"):
        open_tun(ns, "svpn-veth")
    with open_tun(ns), pytest.raises(TunError, match=f"{DEV}: EBUSY"):
        open_tun(ns)


def test_packets_flow_through_device_and_routes(ns: Netns) -> None:
    tun = open_tun(ns)
    Router(ns.name).apply(SPEC)
    peers: PacketRouter[str] = PacketRouter()
    peers.set_allowed("bob", ["10.77.0.2/32", "fd00::2/128"])
    peers.set_allowed("gw", ["10.88.0.0/16", "fd01::/64"])

    # IPv4 round trip: the kernel's echo request comes out, our reply goes in, ping is happy
    ping = ns.popen(["ping", "-n", "-c", "1", "-W", "3", "10.77.0.2"], stdout=subprocess.PIPE)
    request = read_until(tun, is_echo_request(bytes([10, 77, 0, 2])))
    assert request[12:16] == bytes([10, 77, 0, 1])
    assert peers.peer_for_destination(request) == "bob"
    reply = echo_reply_v4(request)
    assert peers.source_allowed("bob", reply) and not peers.source_allowed("gw", reply)
    assert tun.write(reply) == len(reply)
    assert ping.wait(5) == 0, ping.stdout.read() if ping.stdout else ""

    # the extra routes lead into the device too, for both families
    ns.popen(["ping", "-n", "-c", "1", "-W", "1", "10.88.3.4"])
    request = read_until(tun, is_echo_request(bytes([10, 88, 3, 4])))
    assert peers.peer_for_destination(request) == "gw"
    ns.popen(["ping", "-6", "-n", "-c", "1", "-W", "1", "fd01::5"])
    request = read_until(tun, is_echo_request(bytes.fromhex("fd01" + "00" * 13 + "05")))
    assert request[8:24] == bytes.fromhex("fd00" + "00" * 13 + "01")
    assert peers.peer_for_destination(memoryview(request)) == "gw"
    tun.close()


def test_malformed_writes_are_counted_not_raised(ns: Netns) -> None:
    with open_tun(ns) as tun:
        Router(ns.name).apply(SPEC)
        assert tun.write(b"") == 0
        assert tun.write(b"\x00" * 40) == 0
        assert tun.write_batch([b"\x10" * 30, b""]) == 0
        assert tun.dropped_writes == 4


def test_close_wakes_a_blocked_reader_and_removes_the_interface(ns: Netns) -> None:
    tun = open_tun(ns)
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while True:
                tun.read()  # the kernel may send IPv6 router solicitations; keep reading
        except BaseException as exc:
            errors.append(exc)

    Router(ns.name).apply(SPEC)
    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    time.sleep(0.1)
    assert thread.is_alive()
    tun.close()
    thread.join(2)
    assert not thread.is_alive() and isinstance(errors[0], TunClosed)
    assert wait_for(lambda: svpn_links(ns) == [])


def test_deleting_the_interface_ends_the_reader(ns: Netns) -> None:
    tun = open_tun(ns)
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while True:
                tun.read()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    time.sleep(0.05)
    assert Router(ns.name).remove(DEV) == [f"link del {DEV}"]
    thread.join(2)
    assert not thread.is_alive()
    assert isinstance(errors[0], TunClosed) and "is gone" in str(errors[0])
    tun.close()


CHILD = """
import subprocess, sys, time
from socialvpn.net.router import InterfaceSpec, Router
from socialvpn.net.tun import TunDevice
tun = TunDevice.open("svpn-kill", 1380)
Router().apply(InterfaceSpec("svpn-kill", 1380, ("10.66.0.1/24",), ("10.67.0.0/16",)))
# a grandchild that outlives us must not keep the device alive (close-on-exec)
subprocess.Popen(["sleep", "30"])
print("ready", flush=True)
time.sleep(60)
"""


def test_sigkill_leaves_no_interface(ns: Netns) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = ns.popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, env=env, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    assert svpn_links(ns) == ["svpn-kill"]
    assert addresses(ns, "svpn-kill") == {"10.66.0.1/24"}
    assert ("10.67.0.0/16", "77") in routes(ns, "svpn-kill")
    os.kill(child.pid, signal.SIGKILL)
    child.wait(5)
    assert wait_for(lambda: svpn_links(ns) == []), svpn_links(ns)
    assert "10.67.0.0" not in ns.ip("route").stdout


# --- the router -------------------------------------------------------------------------------


def test_apply_converges_and_is_idempotent(ns: Netns) -> None:
    router = Router(ns.name)
    assert isinstance(router, RouterAPI)
    twin = FakeRouter()  # must report exactly the same changes at every step
    twin.add_interface(DEV, 1500)
    with open_tun(ns, mtu=1500):
        changes = router.apply(SPEC)
        assert twin.apply(SPEC) == changes
        assert changes == [
            f"mtu 1380 dev {DEV}",
            f"up dev {DEV}",
            f"addr add 10.77.0.1/24 dev {DEV}",
            f"addr add fd00::1/64 dev {DEV}",
            f"route add 10.88.0.0/16 dev {DEV}",
            f"route add fd01::/64 dev {DEV}",
        ]
        info = link(ns)
        assert info["mtu"] == 1380 and "UP" in info["flags"]  # type: ignore[operator]
        assert addresses(ns) == {"10.77.0.1/24", "fd00::1/64"}
        assert {("10.77.0.0/24", "kernel"), ("10.88.0.0/16", "77"), ("fd00::/64", "kernel"),
                ("fd01::/64", "77")} <= routes(ns)

        before = [ns.ip("-j", *args).stdout for args in
                  (["addr"], ["-4", "route", "show", "table", "all"],
                   ["-6", "route", "show", "table", "all"], ["link"])]
        assert router.apply(SPEC) == [] == twin.apply(SPEC)
        after = [ns.ip("-j", *args).stdout for args in
                 (["addr"], ["-4", "route", "show", "table", "all"],
                  ["-6", "route", "show", "table", "all"], ["link"])]
        assert after == before

        # someone else's route through the device is left alone
        ns.ip("route", "add", "10.9.0.0/16", "dev", DEV)
        twin.links[DEV].other_routes.append("10.9.0.0/16")
        changed = InterfaceSpec(DEV, 1400, ("10.77.0.1/24", "fd00::7/64"),
                                ("10.99.0.0/16", "10.88.0.0/16"))
        assert twin.apply(changed) == router.apply(changed) == [
            f"mtu 1400 dev {DEV}",
            f"addr del fd00::1/64 dev {DEV}",
            f"addr add fd00::7/64 dev {DEV}",
            f"route del fd01::/64 dev {DEV}",
            f"route add 10.99.0.0/16 dev {DEV}",
        ]
        assert link(ns)["mtu"] == 1400
        assert addresses(ns) == {"10.77.0.1/24", "fd00::7/64"}
        got = routes(ns)
        assert ("fd01::/64", "77") not in got
        assert {("10.99.0.0/16", "77"), ("10.88.0.0/16", "77"), ("10.9.0.0/16", "boot"),
                ("fd00::/64", "kernel")} <= got
        assert router.apply(changed) == [] == twin.apply(changed)

        # replacing the only IPv4 address flushes the kernel's IPv4 routes: they come back
        moved = InterfaceSpec(DEV, 1400, ("10.55.0.1/24",), ("10.88.0.0/16",))
        assert twin.apply(moved) == router.apply(moved) == [
            f"addr del 10.77.0.1/24 dev {DEV}",
            f"addr del fd00::7/64 dev {DEV}",
            f"addr add 10.55.0.1/24 dev {DEV}",
            f"route add 10.88.0.0/16 dev {DEV}",
        ]
        assert addresses(ns) == {"10.55.0.1/24"}
        assert ("10.88.0.0/16", "77") in routes(ns)
        assert ("10.99.0.0/16", "77") not in routes(ns)
        assert router.apply(moved) == [] == twin.apply(moved)
        assert twin.links[DEV].other_routes == []  # the flush took the foreign route too
        assert "10.9.0.0" not in ns.ip("route").stdout


def test_apply_errors(ns: Netns) -> None:
    router = Router(ns.name)
    with pytest.raises(RouterError, match="does not exist"):
        router.apply(SPEC)
    with open_tun(ns):
        ns.sysctl(f"net.ipv6.conf.{DEV}.disable_ipv6", 1)
        with pytest.raises(RouterError, match=f"cannot add fd00::1/64 to {DEV}"):
            router.apply(SPEC)


def test_cleanup_removes_leftovers_and_only_ours(ns: Netns) -> None:
    # a persistent device left by a crashed agent, with addresses and routes
    ns.run(["ip", "tuntap", "add", "dev", "svpn-left", "mode", "tun"])
    ns.run(["ip", "tuntap", "add", "dev", "keep0", "mode", "tun"])
    for dev in ("svpn-left", "keep0"):
        ns.ip("link", "set", dev, "up")
    ns.ip("addr", "add", "10.5.0.1/24", "dev", "svpn-left")
    ns.ip("addr", "add", "fd05::1/64", "dev", "svpn-left")
    ns.ip("route", "add", "10.6.0.0/16", "dev", "svpn-left")
    ns.ip("route", "add", "10.7.0.0/16", "dev", "svpn-left", "table", "100")
    ns.ip("-6", "route", "add", "fd06::/64", "dev", "svpn-left")
    ns.ip("route", "add", "10.8.0.0/16", "dev", "keep0")
    assert "persist on" in ns.ip("-d", "link", "show", "svpn-left").stdout

    router = Router(ns.name)
    assert router.interfaces() == ["svpn-left"]
    removed = router.cleanup()
    assert removed[-1] == "link del svpn-left"
    assert set(removed) == {
        "route del 10.6.0.0/16 dev svpn-left",
        "route del 10.7.0.0/16 dev svpn-left",
        "route del fd06::/64 dev svpn-left",
        "link del svpn-left",
    }
    assert svpn_links(ns) == []
    everything = ns.ip("route", "show", "table", "all").stdout + ns.ip(
        "-6", "route", "show", "table", "all").stdout
    assert "svpn-left" not in everything
    assert "10.8.0.0/16 dev keep0" in ns.ip("route").stdout
    assert router.cleanup() == []
    assert router.interfaces() == []
    with pytest.raises(ValueError, match="broad"):
        router.cleanup("")


def test_cleanup_removes_a_live_device_too(ns: Netns) -> None:
    tun = open_tun(ns, "svpn-live")
    Router(ns.name).apply(InterfaceSpec("svpn-live", 1380, ("10.4.0.1/24",), ("10.3.0.0/16",)))
    assert Router(ns.name).cleanup() == ["route del 10.3.0.0/16 dev svpn-live",
                                         "link del svpn-live"]
    with pytest.raises(TunClosed, match="is gone"):
        tun.read()
    tun.close()


def test_router_works_from_inside_an_event_loop(ns: Netns) -> None:
    async def main() -> list[str]:
        return Router(ns.name).interfaces()

    with open_tun(ns):
        assert asyncio.run(main()) == [DEV]


def test_missing_namespace_is_an_error_not_created(netns_factory: NetLab) -> None:
    name = f"{netns_factory.prefix}missing"
    with pytest.raises(RouterError, match="does not exist"):
        Router(name).interfaces()
    assert not Path("/run/netns", name).exists()
