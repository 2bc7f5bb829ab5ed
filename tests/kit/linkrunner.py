"""Run one SocialVPN link device from a JSON spec: the product's packet path with peers that a
test configures directly (keys, endpoints, allowed IPs), as issue 3 allows before groups and ICE
feed them. Run it inside a namespace: ``ip netns exec NS python -m tests.kit.linkrunner SPEC``.

Spec (JSON)::

    {"private_key": "<base64>", "listen_port": 51821, "tun": "svpn-t0", "mtu": 1380,
     "addresses": ["10.9.0.1/24"], "routes": [],
     "peers": [{"public_key": "<base64>", "endpoint": "10.0.0.2:51820",
                "allowed_ips": ["10.9.0.2/32"], "persistent_keepalive": 0,
                "partial_checksums": false}],
     "timers": {"rekey_after_time": 5}}

Prints ``READY <port> <public key base64>`` on stdout once packets flow. SIGUSR1 writes the
device's stats to ``SPEC.stats.json``; SIGTERM/SIGINT stop it (the TUN device goes away).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from socialvpn.link.constants import LinkTimers
from socialvpn.link.device import Device, PeerConfig
from socialvpn.link.transport import UdpTransport
from socialvpn.net.packet_router import PacketRouter
from socialvpn.net.router import InterfaceSpec, Router
from socialvpn.net.tun import TunDevice


def _endpoint(text: str | None) -> tuple[str, int] | None:
    if not text:
        return None
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def write_stats(device: Device, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(device.stats(), indent=1))
    os.replace(tmp, path)


def run(spec_path: Path) -> int:
    spec: dict[str, Any] = json.loads(spec_path.read_text())
    timers = LinkTimers(**spec.get("timers", {}))
    mtu = int(spec.get("mtu", 1380))
    tun = TunDevice.open(spec["tun"], mtu, offloads=bool(spec.get("offloads", True)))
    router = Router()
    router.apply(InterfaceSpec(name=spec["tun"], mtu=mtu,
                               addresses=tuple(spec.get("addresses", [])),
                               routes=tuple(spec.get("routes", []))))
    transport = UdpTransport(int(spec.get("listen_port", 0)), spec.get("listen_host"))
    device = Device(base64.b64decode(spec["private_key"]), tun, transport, PacketRouter(),
                    timers=timers, mtu=mtu)
    for p in spec.get("peers", []):
        device.add_peer(PeerConfig(
            public_key=base64.b64decode(p["public_key"]),
            allowed_ips=tuple(p.get("allowed_ips", [])),
            endpoint=_endpoint(p.get("endpoint")),
            persistent_keepalive=float(p.get("persistent_keepalive", 0)),
            partial_checksums=bool(p.get("partial_checksums", False)),
        ))
    stats_path = Path(str(spec_path) + ".stats.json")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGUSR1, lambda *_: write_stats(device, stats_path))
    device.start()
    print(f"READY {transport.port} {base64.b64encode(device.public_key).decode()}", flush=True)
    stop.wait()  # signal handlers run during the wait (no timeout: no idle wake-ups)
    device.stop()
    write_stats(device, stats_path)
    transport.close()
    router.remove(spec["tun"])
    router.close()
    return 0


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1])))
