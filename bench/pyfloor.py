"""The floor of a Python user-space hop: the smallest forwarder that still encrypts.

A reference for the bench, **not a VPN**: one static ChaCha20-Poly1305 key, a counter nonce, no
handshake, no replay window, no routing, no checks - a TUN device and a UDP socket served by one
polling loop (the shape of our I/O thread), one packet per read, one datagram per packet. What
our link costs beyond this is the price of WireGuard, offloads and safety; what this costs
beyond raw veth is the price of any Python process in the path on this machine (thread
wake-ups, cold caches after an idle gap).

Run inside a namespace: ``python -m bench.pyfloor TUN ADDRESS/PREFIX LISTEN_PORT PEER:PORT
KEY_HEX``; prints ``READY`` once the TUN device is up.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import pytun
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from tests.kit.netns import Netns
from tests.kit.procs import end_process

_COUNTER = struct.Struct("<Q")
_NONCE = struct.Struct("<4xQ")
REPO = Path(__file__).resolve().parent.parent


def serve(tun_name: str, address: str, port: int, peer: tuple[str, int], key: bytes) -> None:
    ip, _, prefix = address.partition("/")
    tun = pytun.TunTapDevice(name=tun_name, flags=pytun.IFF_TUN | pytun.IFF_NO_PI)
    tun.mtu = 1380
    subprocess.run(["ip", "addr", "add", f"{ip}/{prefix or 24}", "dev", tun_name], check=True)
    tun.up()
    fd = tun.fileno()
    os.set_blocking(fd, False)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    sock.setblocking(False)
    aead = ChaCha20Poly1305(key)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poller.register(sock.fileno(), select.POLLIN)
    buf = bytearray(65536)
    view = memoryview(buf)
    counter = 0
    running = True

    def stop(_sig: int, _frame: FrameType | None) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    print("READY", flush=True)
    while running:
        for ready, _events in poller.poll(500):
            if ready == fd:
                while True:
                    try:
                        packet = os.read(fd, 65536)
                    except BlockingIOError:
                        break
                    counter += 1
                    sealed = aead.encrypt(_NONCE.pack(counter), packet, None)
                    with contextlib.suppress(OSError):
                        sock.sendto(_COUNTER.pack(counter) + sealed, peer)
            else:
                while True:
                    try:
                        n = sock.recv_into(buf)
                    except BlockingIOError:
                        break
                    if n < 24:
                        continue
                    nonce = _NONCE.pack(_COUNTER.unpack_from(buf)[0])
                    try:
                        plain = aead.decrypt(nonce, view[8:n], None)
                    except Exception:  # a bad tag: drop, as any receiver would
                        continue
                    with contextlib.suppress(OSError):
                        os.write(fd, plain)
    tun.close()


@dataclass
class FloorLink:
    """One end of the reference forwarder in a namespace (bench part: start/stop/pids)."""

    ns: Netns
    address: str
    port: int
    peer: str
    key: bytes
    tun: str = "svpn-fl0"
    proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 10.0) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = self.ns.popen([sys.executable, "-m", "bench.pyfloor", self.tun, self.address,
                                   str(self.port), self.peer, self.key.hex()],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                                  text=True, cwd=str(REPO))
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.proc.stdout.readline().startswith("READY"):
                return
        self.stop()
        raise RuntimeError(f"python floor forwarder in {self.ns.name} did not start")

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def stop(self) -> None:
        if self.proc is None:
            return
        end_process(self.proc)  # type: ignore[arg-type]
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None


def floor_pair(a: Netns, b: Netns, tmp: Path) -> tuple[FloorLink, FloorLink]:
    key = os.urandom(32)
    la = FloorLink(a, "10.9.0.1/24", 51821, "10.0.0.2:51822", key)
    lb = FloorLink(b, "10.9.0.2/24", 51822, "10.0.0.1:51821", key)
    try:
        la.start()
        lb.start()
    except BaseException:
        la.stop()
        lb.stop()
        raise
    return la, lb


def main(argv: list[str]) -> int:
    tun, address, port, peer, key = argv
    host, _, peer_port = peer.rpartition(":")
    serve(tun, address, int(port), (host, int(peer_port)), bytes.fromhex(key))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
