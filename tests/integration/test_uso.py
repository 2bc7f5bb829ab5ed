"""Issue 7, UDP segmentation: where the kernel offers USO on the TUN device, an application that
sends with ``UDP_SEGMENT`` hands our link one UDP super-packet per write; the link cuts it into
ordinary datagrams (one WireGuard message each) and every datagram arrives intact, with full
checksums to a peer that needs them and partial ones between our own peers."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import time
from pathlib import Path

import pytest

from tests.kit.links import ours_pair, ping
from tests.kit.netns import NetLab

pytestmark = pytest.mark.integration

UDP_SEGMENT = 103  # linux/udp.h
SIZE = 1200
PER_WRITE = 8  # datagrams per application write
WRITES = 40
PORT = 47311


@pytest.mark.parametrize("partial", [True, False])
def test_udp_segmentation_offload_carries_every_datagram(netns_factory: NetLab, tmp_path: Path,
                                                          partial: bool) -> None:
    la, lb = ours_pair(netns_factory, tmp_path, partial=partial)
    try:
        assert ping(la.ns, "10.9.0.2", count=2, timeout=3.0).returncode == 0
        if not la.stats()["tun"].get("uso"):
            pytest.skip("this kernel does not offer UDP segmentation on TUN devices")
        rx = lb.ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx = la.ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with contextlib.closing(rx), contextlib.closing(tx):
            rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            rx.bind(("10.9.0.2", PORT))
            rx.settimeout(5.0)
            tx.setsockopt(socket.SOL_UDP, UDP_SEGMENT, SIZE)
            sent: list[bytes] = []
            got: list[bytes] = []
            for w in range(WRITES):
                chunk = [hashlib.sha256(f"{w}/{i}".encode()).digest() * (SIZE // 32)
                         + bytes([w, i]) * ((SIZE % 32) // 2) for i in range(PER_WRITE)]
                chunk[-1] = chunk[-1][: SIZE - 100]  # the last datagram of a write is shorter
                tx.sendto(b"".join(chunk), ("10.9.0.2", PORT))
                sent.extend(chunk)
                # Lock-step: take this write's datagrams before the next (no buffer losses).
                deadline = time.monotonic() + 5.0
                while len(got) < len(sent) and time.monotonic() < deadline:
                    got.append(rx.recv(65536))
            assert len(got) == len(sent)
            assert hashlib.sha256(b"".join(got)).hexdigest() == \
                hashlib.sha256(b"".join(sent)).hexdigest()
        stats = la.stats()
        assert stats["tun"]["super_reads"] >= WRITES // 2, stats["tun"]  # USO really ran
        assert stats["peers"][0]["checksums"] == ("partial" if partial else "full")
        # (no-route: the kernel's own IPv6 router solicitations on the TUN, not our traffic)
        drops = {k: v for k, v in lb.stats()["drops"].items() if k != "no-route"}
        assert not drops, drops
    finally:
        la.stop()
        lb.stop()
