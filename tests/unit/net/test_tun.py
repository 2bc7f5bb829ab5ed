"""TunDevice's read/close machinery without a kernel TUN: a SOCK_SEQPACKET socketpair keeps
packet boundaries like a TUN descriptor does. (Opening real devices: tests/integration.)"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from socialvpn.net.tun import TunClosed, TunDevice, TunIO

from .support import ipv4

pytestmark = pytest.mark.unit


@pytest.fixture
def pair() -> Iterator[tuple[TunDevice, socket.socket]]:
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fd = ours.detach()
    os.set_blocking(fd, False)
    dev = TunDevice("svpn-unit", fd, 1380)
    yield dev, kernel
    dev.close()
    kernel.close()


def _in_thread(fn: object) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())  # type: ignore[operator]
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_is_a_tun_io(pair: tuple[TunDevice, socket.socket]) -> None:
    dev, _ = pair
    assert isinstance(dev, TunIO)
    assert (dev.name, dev.mtu) == ("svpn-unit", 1380)
    assert dev.fileno() >= 0 and not dev.closed


def test_read_readinto_batch_and_write(pair: tuple[TunDevice, socket.socket]) -> None:
    dev, kernel = pair
    packets = [ipv4("10.0.0.1", f"10.0.0.{i}") for i in range(2, 6)]
    kernel.send(packets[0])
    assert dev.read() == packets[0]
    kernel.send(packets[1])
    buf = bytearray(100)
    n = dev.readinto(buf)
    assert bytes(buf[:n]) == packets[1]
    kernel.send(packets[2])
    kernel.send(packets[3])
    assert dev.read_batch(8) == packets[2:]
    assert dev.write(packets[0]) == len(packets[0])
    assert dev.write_batch([packets[1], memoryview(packets[2])]) == 2
    assert [kernel.recv(100) for _ in range(3)] == packets[:3]


def test_read_waits_for_a_packet(pair: tuple[TunDevice, socket.socket]) -> None:
    dev, kernel = pair
    thread, out = _in_thread(dev.read)
    time.sleep(0.05)
    assert thread.is_alive()
    kernel.send(b"\x45" * 20)
    thread.join(2)
    assert out == [b"\x45" * 20]


@pytest.mark.parametrize("method", ["read", "readinto", "read_batch"])
def test_close_wakes_blocked_readers(pair: tuple[TunDevice, socket.socket], method: str) -> None:
    dev, _ = pair
    call = {
        "read": dev.read,
        "readinto": lambda: dev.readinto(bytearray(64)),
        "read_batch": dev.read_batch,
    }[method]
    threads = [_in_thread(call) for _ in range(3)]
    time.sleep(0.05)
    assert all(t.is_alive() for t, _ in threads)
    dev.close()
    for thread, out in threads:
        thread.join(2)
        assert not thread.is_alive()
        assert isinstance(out[0], TunClosed)
    dev.close()  # idempotent


def test_closed_device_refuses_everything(pair: tuple[TunDevice, socket.socket]) -> None:
    dev, kernel = pair
    kernel.send(b"\x45" * 20)  # queued but never handed out after close
    with dev:
        pass
    assert dev.closed
    for call in (dev.read, lambda: dev.readinto(bytearray(10)), dev.read_batch,
                 lambda: dev.write(b"\x45" * 20), lambda: dev.write_batch([b"\x45" * 20])):
        with pytest.raises(TunClosed, match="svpn-unit is closed"):
            call()


def test_close_releases_the_descriptor_at_once(pair: tuple[TunDevice, socket.socket]) -> None:
    dev, kernel = pair
    dev.close()
    # our end is gone (replaced by /dev/null): the peer sees the connection closed
    kernel.settimeout(2)
    assert kernel.recv(10) == b""


def test_write_errors_are_counted_not_raised(pair: tuple[TunDevice, socket.socket]) -> None:
    dev, kernel = pair
    kernel.close()  # EPIPE from now on, like EINVAL for a malformed packet on a real TUN
    assert dev.write(b"\x45" * 20) == 0
    assert dev.write_batch([b"\x45" * 20, b"\x45" * 20]) == 0
    assert dev.dropped_writes == 3


def test_end_of_file_ends_the_reader(pair: tuple[TunDevice, socket.socket]) -> None:
    dev, kernel = pair
    thread, out = _in_thread(dev.read)
    time.sleep(0.05)
    kernel.close()  # our end now reads b"": the device is gone, readers must not spin
    thread.join(2)
    assert not thread.is_alive()
    assert isinstance(out[0], TunClosed) and "is gone" in str(out[0])
