"""The in-memory twins: FakeTun (TunIO) and FakeRouter (RouterAPI) and the spec type."""

from __future__ import annotations

import threading
import time

import pytest

from socialvpn.net.fake import FakeRouter, FakeTun, PacketQueue
from socialvpn.net.router import InterfaceSpec, RouterAPI, RouterError
from socialvpn.net.tun import TunClosed, TunIO, validate_ifname

from .support import ipv4, ipv6

pytestmark = pytest.mark.unit


# --- names and specs --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["svpn-a", "svpn-123456789a", "x", "a_b.c-d"])
def test_good_names(name: str) -> None:
    assert validate_ifname(name) == name


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("svpn-1234567890a", "at most 15"),
        ("", "non-empty"),
        ("svpn a", "may only use"),
        ("svpn/a", "may only use"),
        ("svpn:a", "may only use"),
        ("tun%d", "may only use"),
        ("..", "may only use"),
        ("svpn-é", "may only use"),
    ],
)
def test_bad_names(name: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        validate_ifname(name)


def test_spec_is_canonical() -> None:
    spec = InterfaceSpec(
        "svpn-a", 1380, ("10.77.0.1/24", "FD00:0::1/64", "10.77.0.1/24"), ("fd01:0::/64",)
    )
    assert spec.addresses == ("10.77.0.1/24", "fd00::1/64")
    assert spec.routes == ("fd01::/64",)
    assert spec == InterfaceSpec("svpn-a", 1380, ("10.77.0.1/24", "fd00::1/64"), ("fd01::/64",))


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"name": "svpn-much-too-long"}, "at most 15"),
        ({"mtu": 20}, "MTU"),
        ({"mtu": 70000}, "MTU"),
        ({"mtu": 1200, "addresses": ("fd00::1/64",)}, "IPv6 needs an MTU"),
        ({"addresses": ("10.77.0.1",)}, "CIDR"),
        ({"addresses": ("10.77.0.300/24",)}, "bad interface address"),
        ({"routes": ("10.88.0.1/16",)}, "host bits"),
        ({"routes": ("nonsense",)}, "bad route prefix"),
    ],
)
def test_bad_specs(kwargs: dict[str, object], why: str) -> None:
    args: dict[str, object] = {"name": "svpn-a", "mtu": 1380} | kwargs
    with pytest.raises(ValueError, match=why):
        InterfaceSpec(**args)  # type: ignore[arg-type]


def test_spec_refuses_a_bare_string() -> None:
    with pytest.raises(TypeError):
        InterfaceSpec("svpn-a", 1380, "10.77.0.1/24")  # type: ignore[arg-type]


# --- FakeTun ----------------------------------------------------------------------------------


def test_fake_tun_is_a_tun_io() -> None:
    assert isinstance(FakeTun(), TunIO)


def test_inject_then_read() -> None:
    tun = FakeTun("svpn-t", 1400)
    assert (tun.name, tun.mtu, tun.fileno()) == ("svpn-t", 1400, -1)
    a, b = ipv4("10.0.0.1", "10.0.0.2"), ipv6("fd00::1", "fd00::2")
    tun.inject(a)
    tun.inject(memoryview(b))
    assert tun.read() == a
    buf = bytearray(2048)
    n = tun.readinto(buf)
    assert bytes(buf[:n]) == b


def test_read_truncates_to_size_like_a_kernel_read() -> None:
    tun = FakeTun()
    tun.inject(ipv4("10.0.0.1", "10.0.0.2", b"x" * 100))
    assert len(tun.read(30)) == 30
    tun.inject(ipv4("10.0.0.1", "10.0.0.2", b"x" * 100))
    buf = bytearray(10)
    assert tun.readinto(buf) == 10


def test_read_batch_takes_what_is_queued() -> None:
    tun = FakeTun()
    packets = [ipv4("10.0.0.1", f"10.0.0.{i}") for i in range(2, 7)]
    for p in packets:
        tun.inject(p)
    assert tun.read_batch(3) == packets[:3]
    assert tun.read_batch(10) == packets[3:]


def test_writes_are_collected_and_junk_is_counted() -> None:
    tun = FakeTun()
    a = ipv4("10.0.0.1", "10.0.0.2")
    assert tun.write(a) == len(a)
    assert tun.write(b"") == 0
    assert tun.write(b"\x00" * 20) == 0
    assert tun.write_batch([a, b"\x00junk", bytearray(a)]) == 2
    assert tun.dropped_writes == 3
    assert tun.take_written() == a
    assert tun.written_packets() == [a, a]
    with pytest.raises(TimeoutError):
        tun.take_written(timeout=0.01)


def test_full_write_queue_drops_instead_of_blocking() -> None:
    tun = FakeTun(capacity=2)
    a = ipv4("10.0.0.1", "10.0.0.2")
    assert [tun.write(a) for _ in range(3)] == [len(a), len(a), 0]
    assert tun.dropped_writes == 1


def test_full_inbound_queue_times_out() -> None:
    tun = FakeTun(capacity=1)
    tun.inject(b"\x45" * 20)
    with pytest.raises(TimeoutError):
        tun.inject(b"\x45" * 20, timeout=0.01)


def test_read_timeout() -> None:
    tun = FakeTun(read_timeout=0.01)
    with pytest.raises(TimeoutError):
        tun.read()
    with pytest.raises(TimeoutError):
        FakeTun().read(timeout=0.01)


def test_close_unblocks_a_blocked_reader() -> None:
    tun = FakeTun()
    result: list[BaseException] = []

    def reader() -> None:
        try:
            tun.read()
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.05)
    assert thread.is_alive()
    tun.close()
    thread.join(2)
    assert not thread.is_alive()
    assert isinstance(result[0], TunClosed)
    tun.close()  # idempotent
    with pytest.raises(TunClosed):
        tun.read()
    with pytest.raises(TunClosed):
        tun.write(ipv4("10.0.0.1", "10.0.0.2"))
    with pytest.raises(TunClosed):
        tun.inject(ipv4("10.0.0.1", "10.0.0.2"))


def test_threads_pass_packets_through() -> None:
    tun = FakeTun(capacity=8)
    count = 500

    def echo() -> None:
        try:
            while True:
                tun.write(tun.read())
        except TunClosed:
            pass

    thread = threading.Thread(target=echo)
    thread.start()
    sent = [ipv4("10.0.0.1", "10.0.0.2", i.to_bytes(2, "big")) for i in range(count)]
    got = []
    for i in range(0, count, 5):  # in bursts: writes beyond `capacity` would be dropped
        for p in sent[i : i + 5]:
            tun.inject(p)
        got += [tun.take_written(timeout=2) for _ in sent[i : i + 5]]
    tun.close()
    thread.join(2)
    assert got == sent


def test_packet_queue_rejects_zero_capacity() -> None:
    with pytest.raises(ValueError):
        PacketQueue(0)


# --- FakeRouter -------------------------------------------------------------------------------

SPEC = InterfaceSpec("svpn-g", 1380, ("10.77.0.1/24", "fd00::1/64"),
                     ("10.88.0.0/16", "fd01::/64", "10.77.0.0/24"))


def test_fake_router_is_a_router_api() -> None:
    assert isinstance(FakeRouter(), RouterAPI)


def test_apply_needs_the_interface() -> None:
    with pytest.raises(RouterError, match="does not exist"):
        FakeRouter().apply(SPEC)


def test_apply_converges_and_is_idempotent() -> None:
    r = FakeRouter()
    r.add_interface("svpn-g")
    assert r.apply(SPEC) == [
        "mtu 1380 dev svpn-g",
        "up dev svpn-g",
        "addr add 10.77.0.1/24 dev svpn-g",
        "addr add fd00::1/64 dev svpn-g",
        "route add 10.88.0.0/16 dev svpn-g",
        "route add fd01::/64 dev svpn-g",
        # 10.77.0.0/24 is the connected prefix of 10.77.0.1/24: present already
    ]
    assert r.apply(SPEC) == []
    link = r.links["svpn-g"]
    assert (link.mtu, link.up) == (1380, True)
    assert link.addresses == ["10.77.0.1/24", "fd00::1/64"]
    assert link.routes == ["10.88.0.0/16", "fd01::/64"]


def test_apply_changed_spec_removes_the_stale() -> None:
    r = FakeRouter()
    r.add_interface("svpn-g", addresses=["fe80::1/64"], routes=["10.9.0.0/16"])
    r.apply(SPEC)
    new = InterfaceSpec("svpn-g", 1400, ("10.77.0.1/24", "10.77.0.2/24"),
                        ("10.99.0.0/16", "10.88.0.0/16"))
    assert r.apply(new) == [
        "mtu 1400 dev svpn-g",
        "addr del fd00::1/64 dev svpn-g",
        "addr add 10.77.0.2/24 dev svpn-g",
        "route del fd01::/64 dev svpn-g",
        "route add 10.99.0.0/16 dev svpn-g",
    ]
    link = r.links["svpn-g"]
    # the kernel's link-local address and a foreign route stay
    assert link.addresses == ["fe80::1/64", "10.77.0.1/24", "10.77.0.2/24"]
    assert link.other_routes == ["10.9.0.0/16"]
    assert r.apply(new) == []


def test_losing_the_last_ipv4_address_flushes_ipv4_routes_like_the_kernel() -> None:
    r = FakeRouter()
    r.add_interface("svpn-g", routes=["10.9.0.0/16", "fd09::/64"])
    r.apply(SPEC)
    moved = InterfaceSpec("svpn-g", 1380, ("10.55.0.1/24", "fd00::1/64"), SPEC.routes)
    assert r.apply(moved) == [
        "addr del 10.77.0.1/24 dev svpn-g",
        "addr add 10.55.0.1/24 dev svpn-g",
        "route add 10.88.0.0/16 dev svpn-g",  # flushed with the address, so added again
        "route add 10.77.0.0/24 dev svpn-g",  # no longer a connected prefix
    ]
    assert r.links["svpn-g"].other_routes == ["fd09::/64"]


def test_remove_cleanup_and_interfaces() -> None:
    r = FakeRouter()
    r.add_interface("svpn-g")
    r.add_interface("svpn-left", routes=["10.6.0.0/16"])
    r.add_interface("eth0")
    r.apply(SPEC)
    assert r.interfaces() == ["svpn-g", "svpn-left"]
    assert r.interfaces("eth") == ["eth0"]
    assert r.remove("svpn-g") == [
        "route del 10.88.0.0/16 dev svpn-g",
        "route del fd01::/64 dev svpn-g",
        "link del svpn-g",
    ]
    assert r.remove("svpn-g") == []
    assert r.cleanup() == ["route del 10.6.0.0/16 dev svpn-left", "link del svpn-left"]
    assert r.cleanup() == []
    assert list(r.links) == ["eth0"]
    assert r.changes[-1] == "link del svpn-left"
    with pytest.raises(ValueError, match="broad"):
        r.cleanup("")
    r.close()
    with pytest.raises(RouterError, match="closed"):
        r.interfaces()


def test_add_interface_twice_is_an_error() -> None:
    r = FakeRouter()
    r.add_interface("svpn-g")
    with pytest.raises(RouterError, match="exists"):
        r.add_interface("svpn-g")
