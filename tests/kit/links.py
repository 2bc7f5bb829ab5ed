"""Link endpoints for tests and benchmarks, each in a namespace of the kit:

* :class:`OurLink` — SocialVPN's packet path (``tests.kit.linkrunner``) with directly
  configured peers;
* :class:`WgGoLink` — Debian's ``wireguard-go`` configured with ``wg``, the interop peer;
* :func:`iperf3` / :func:`ping` — measurements between namespaces, bounded in time.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from tests.kit.netns import Netns
from tests.kit.procs import end_process

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class KeyPair:
    private: str  # base64, as wg(8) writes keys
    public: str

    @classmethod
    def generate(cls) -> KeyPair:
        key = X25519PrivateKey.generate()
        priv = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return cls(base64.b64encode(priv).decode(), base64.b64encode(pub).decode())


@dataclass
class LinkPeer:
    public_key: str
    allowed_ips: list[str]
    endpoint: str | None = None
    persistent_keepalive: int = 0
    partial_checksums: bool = False  # both ends ours with offloads (net/offload.py)


@dataclass
class OurLink:
    ns: Netns
    workdir: Path
    keys: KeyPair
    address: str  # e.g. "10.9.0.1/24"
    port: int = 51821
    tun: str = "svpn-t0"
    mtu: int = 1380
    peers: list[LinkPeer] = field(default_factory=list)
    timers: dict[str, float] = field(default_factory=dict)
    offloads: bool = True
    extra_addresses: list[str] = field(default_factory=list)  # e.g. ["fd00:9::1/64"]
    proc: subprocess.Popen[str] | None = None

    @property
    def spec_path(self) -> Path:
        return self.workdir / f"link-{self.ns.short}.json"

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]

    def start(self, timeout: float = 15.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        spec = {
            "private_key": self.keys.private, "listen_port": self.port, "tun": self.tun,
            "mtu": self.mtu, "addresses": [self.address, *self.extra_addresses],
            "peers": [p.__dict__ for p in self.peers], "timers": self.timers,
            "offloads": self.offloads,
        }
        self.spec_path.write_text(json.dumps(spec))
        log = (self.workdir / f"link-{self.ns.short}.log").open("w")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = self.ns.popen([sys.executable, "-m", "tests.kit.linkrunner",
                                   str(self.spec_path)], stdout=subprocess.PIPE, stderr=log,
                                  env=env, text=True, cwd=str(REPO))
        log.close()
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline and self.proc.poll() is None:
            line = self.proc.stdout.readline()
            if line.startswith("READY"):
                return
        raise AssertionError(f"link in {self.ns.name} did not start: {line!r}\n{self.log_tail()}")

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / f"link-{self.ns.short}.log").read_text()[-3000:]
        return ""

    def pids(self) -> list[int]:
        """The link runner's process (all the packet path's threads are in it)."""
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        assert self.proc is not None and self.proc.poll() is None, "link not running"
        path = Path(str(self.spec_path) + ".stats.json")
        before = path.stat().st_mtime_ns if path.exists() else 0
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists() and path.stat().st_mtime_ns != before:
                with contextlib.suppress(ValueError):
                    return json.loads(path.read_text())
            time.sleep(0.02)
        raise AssertionError("no stats from the link runner")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


@dataclass
class WgGoLink:
    """wireguard-go + wg(8) in a namespace: the stock WireGuard implementation to prove against."""

    ns: Netns
    workdir: Path
    keys: KeyPair
    address: str
    port: int = 51820
    ifname: str = ""  # default: unique per process and namespace (wg's UAPI socket is global)
    mtu: int = 1380
    peers: list[LinkPeer] = field(default_factory=list)
    extra_addresses: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        if not self.ifname:
            self.ifname = f"wg{os.getpid() % 100000}{self.ns.short}"[:15]

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]

    def start(self, timeout: float = 10.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / f"wggo-{self.ns.short}.log").open("w")
        self.proc = self.ns.popen(["wireguard-go", "-f", self.ifname], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while self.ns.ip("link", "show", self.ifname, check=False).returncode != 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError("wireguard-go did not make its interface")
            time.sleep(0.05)
        key_file = self.workdir / f"wg-{self.ns.short}.key"
        key_file.write_text(self.keys.private + "\n")
        key_file.chmod(0o600)
        args = ["wg", "set", self.ifname, "private-key", str(key_file), "listen-port",
                str(self.port)]
        for p in self.peers:
            args += ["peer", p.public_key, "allowed-ips", ",".join(p.allowed_ips)]
            if p.endpoint:
                args += ["endpoint", p.endpoint]
            if p.persistent_keepalive:
                args += ["persistent-keepalive", str(p.persistent_keepalive)]
        self.ns.run(args)
        for address in (self.address, *self.extra_addresses):
            self.ns.ip("addr", "add", address, "dev", self.ifname)
        self.ns.ip("link", "set", self.ifname, "mtu", str(self.mtu), "up")

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def latest_handshakes(self) -> dict[str, int]:
        out = self.ns.run(["wg", "show", self.ifname, "latest-handshakes"]).stdout
        result = {}
        for line in out.splitlines():
            key, _, ts = line.partition("\t")
            result[key] = int(ts or 0)
        return result

    def stop(self) -> None:
        end_process(self.proc)
        self.ns.ip("link", "del", self.ifname, check=False)


def veth_hosts(lab: Any) -> tuple[Netns, Netns]:
    """Two hosts on one underlay segment: a = 10.0.0.1, b = 10.0.0.2."""
    a, b = lab.netns("a"), lab.netns("b")
    lab.veth(a, b, a_addr="10.0.0.1/24", b_addr="10.0.0.2/24")
    return a, b


def ours_pair(lab: Any, tmp: Path, *, timers: dict[str, float] | None = None,
              offloads: bool = True, partial: bool | None = None) -> tuple[OurLink, OurLink]:
    """Our link in two fresh hosts (overlay 10.9.0.1 and .2), started. ``partial``: partial
    checksums between the two (default: with offloads, as two agents negotiate them)."""
    a, b = veth_hosts(lab)
    ka, kb = KeyPair.generate(), KeyPair.generate()
    partial = offloads if partial is None else partial
    la = OurLink(a, tmp, ka, "10.9.0.1/24", port=51821, timers=timers or {}, offloads=offloads,
                 peers=[LinkPeer(kb.public, ["10.9.0.2/32"], "10.0.0.2:51822",
                                 partial_checksums=partial)])
    lb = OurLink(b, tmp, kb, "10.9.0.2/24", port=51822, timers=timers or {}, offloads=offloads,
                 peers=[LinkPeer(ka.public, ["10.9.0.1/32"], "10.0.0.1:51821",
                                 partial_checksums=partial)])
    la.start()
    lb.start()
    return la, lb


def ping(ns: Netns, target: str, count: int = 3, interval: float = 0.2, timeout: float = 2.0,
         size: int | None = None) -> subprocess.CompletedProcess[str]:
    cmd = ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", str(timeout), target]
    if size is not None:
        cmd[1:1] = ["-s", str(size)]
    return ns.run(cmd, check=False, timeout=count * (interval + timeout) + 10)


def ping_rtt_ms(result: subprocess.CompletedProcess[str]) -> float | None:
    for line in result.stdout.splitlines():
        if line.startswith(("rtt", "round-trip")):
            return float(line.split("=")[1].split("/")[1])
    return None


BUSY_RETRIES = 10  # iperf3 client tries against a server still busy with the last run
BUSY_PAUSE = 0.3  # seconds between them


class Iperf3Server:
    def __init__(self, ns: Netns, bind: str, port: int = 5201) -> None:
        self.ns = ns
        self.proc = ns.popen(["iperf3", "-s", "-B", bind, "-p", str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.port = port
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            out = ns.run(["ss", "-ltn"], check=False).stdout
            if f":{port} " in out:
                return
            time.sleep(0.05)
        raise AssertionError("iperf3 server did not listen")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            if self.proc.poll() is None:
                self.proc.kill()


def iperf3(ns: Netns, server: str, *, seconds: float = 3, streams: int = 1,
           reverse: bool = False, udp_bitrate: str | None = None, port: int = 5201,
           length: int | None = None) -> dict[str, Any]:
    """One iperf3 client run; returns its JSON summary (raises with stderr on failure)."""
    cmd = ["iperf3", "-c", server, "-p", str(port), "-t", str(seconds), "-J",
           "-P", str(streams), "--connect-timeout", "3000"]
    if reverse:
        cmd.append("-R")
    if udp_bitrate:
        cmd += ["-u", "-b", udp_bitrate]
    if length:
        cmd += ["-l", str(length)]
    # Right after a run the server takes a moment to reset and refuses the next client as
    # "busy": such a refusal (nothing was measured) is tried again, a bounded number of times.
    for attempt in range(BUSY_RETRIES + 1):
        result = ns.run(cmd, check=False, timeout=seconds + 30)
        try:
            data: dict[str, Any] = json.loads(result.stdout)
        except ValueError:
            raise AssertionError(
                f"iperf3 failed: {result.stderr} {result.stdout[-500:]}") from None
        error = str(data.get("error", ""))
        if "busy" in error and attempt < BUSY_RETRIES:
            time.sleep(BUSY_PAUSE)
            continue
        if error:
            raise AssertionError(f"iperf3: {error}")
        break
    return data


def tcp_mbps(data: dict[str, Any]) -> float:
    return float(data["end"]["sum_received"]["bits_per_second"]) / 1e6


def udp_summary(data: dict[str, Any]) -> dict[str, float]:
    s = data["end"]["sum"]
    return {"mbps": float(s["bits_per_second"]) / 1e6, "lost": float(s.get("lost_packets", 0)),
            "packets": float(s.get("packets", 0)), "lost_percent": float(s.get("lost_percent", 0))}


# --- the underlay: counters, offload features, loss ------------------------------------------

_FEATURES_SCRIPT = """
import json, sys
from pyroute2.ethtool import Ethtool
ifname, wanted = sys.argv[1], json.loads(sys.argv[2])
tool = Ethtool()
features = tool.get_features(ifname)
for name, on in wanted.items():
    features.features[name].enable = on
tool.set_features(ifname, features)
now = tool.get_features(ifname).features
print(json.dumps({name: now[name].enable for name in wanted}))
"""


def set_link_features(ns: Netns, ifname: str, features: dict[str, bool]) -> dict[str, bool]:
    """``ethtool -K IFNAME name on|off ...`` inside ``ns`` (pyroute2's ethtool ioctls: no
    ethtool binary needed); returns the features as the kernel reports them afterwards."""
    out = ns.run([sys.executable, "-c", _FEATURES_SCRIPT, ifname, json.dumps(features)]).stdout
    result: dict[str, bool] = json.loads(out)
    return result


NIC_LIKE_FEATURES = {
    # The kernel segments every GSO super-packet in software before the veth (as it does for
    # a NIC without these offloads, and as a NIC with them does in hardware): only MTU-sized
    # frames cross. UDP GSO is the one that matters for a VPN's underlay.
    "tx-udp-segmentation": False,
    "tx-tcp-segmentation": False,
    "tx-tcp6-segmentation": False,
    "tx-tcp-ecn-segmentation": False,
    "tx-tcp-mangleid-segmentation": False,
    # The receiving side runs GRO in NAPI like a NIC driver (veth: off by default).
    "rx-gro": True,
}


def link_counters(ns: Netns, ifname: str) -> dict[str, int]:
    """tx/rx packets and bytes of ``ifname`` in ``ns`` (``ip -s link``)."""
    data = json.loads(ns.ip("-s", "-j", "link", "show", "dev", ifname).stdout)[0]["stats64"]
    return {"tx_packets": int(data["tx"]["packets"]), "tx_bytes": int(data["tx"]["bytes"]),
            "rx_packets": int(data["rx"]["packets"]), "rx_bytes": int(data["rx"]["bytes"])}


LOSS_TABLE = "svpn_loss"


def add_udp_loss(ns: Netns, ifname: str, per_mille: int) -> None:
    """Drop ``per_mille``/1000 of the UDP datagrams crossing ``ifname`` of ``ns``, both ways
    (nftables ``numgen random``; this kernel has no netem). Counters: ``udp_seen``,
    ``udp_dropped`` (see :func:`udp_loss_counters`)."""
    rule = (f'meta l4proto udp counter name "udp_seen" '
            f'numgen random mod 1000 < {per_mille} counter name "udp_dropped" drop')
    ns.nft(f"""
table inet {LOSS_TABLE} {{
    counter udp_seen {{ }}
    counter udp_dropped {{ }}
    chain pre {{
        type filter hook prerouting priority raw; policy accept;
        iifname "{ifname}" {rule}
    }}
    chain out {{
        type filter hook output priority raw; policy accept;
        oifname "{ifname}" {rule}
    }}
}}
""")


def udp_loss_counters(ns: Netns) -> dict[str, int]:
    return {name: ns.nft_counter(name, table=LOSS_TABLE) for name in ("udp_seen", "udp_dropped")}


def status_number(path: Path, field: str) -> int:
    """The leading number of ``field`` in a /proc ``status`` file (0 if it or the file is
    gone: the process or thread ended)."""
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            name, _, value = line.partition(":")
            if name == field:
                return int(value.split()[0])
    return 0


def proc_memory_mib(pids: list[int]) -> tuple[float, float]:
    """Resident memory of ``pids`` now and at its peak (VmRSS, VmHWM summed), in MiB."""
    status = [Path(f"/proc/{pid}/status") for pid in pids]
    return (sum(status_number(p, "VmRSS") for p in status) / 1024,
            sum(status_number(p, "VmHWM") for p in status) / 1024)


def proc_wakeups(pids: list[int]) -> int:
    """Voluntary context switches of every thread of ``pids`` so far (each is a sleep that
    ended: a wake-up)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                total += status_number(task / "status", "voluntary_ctxt_switches")
    return total


def proc_cpu_seconds(pids: list[int]) -> float:
    """user + system CPU seconds of ``pids`` (all their threads) so far, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / tick


# --- TCP payloads across a link, hashed ---------------------------------------------------

_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}


def tcp_transfer(src: Netns, dst: Netns, dst_ip: str, fam: int, data: bytes,
                 port: int = 5001) -> tuple[str, int]:
    """Send ``data`` over one TCP connection; returns the receiver's (sha256, byte count)."""
    listener = dst.socket(_FAMILY[fam], socket.SOCK_STREAM)
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
    client = src.socket(_FAMILY[fam], socket.SOCK_STREAM)
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


def tcp_pull(client: Netns, server: Netns, server_ip: str, fam: int, data: bytes,
             port: int) -> tuple[str, int]:
    """``client`` connects to ``server``, which sends ``data`` (a download through a NAT that
    only lets the client open connections); returns the client's (sha256, byte count)."""
    listener = server.socket(_FAMILY[fam], socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((server_ip, port))
    listener.listen(1)
    listener.settimeout(15)
    errors: list[OSError] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(15)
                conn.sendall(data)
        except OSError as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    digest = hashlib.sha256()
    total = 0
    client_sock = client.socket(_FAMILY[fam], socket.SOCK_STREAM)
    try:
        client_sock.settimeout(15)
        client_sock.connect((server_ip, port))
        while chunk := client_sock.recv(1 << 16):
            digest.update(chunk)
            total += len(chunk)
        thread.join(30)
    finally:
        client_sock.close()
        listener.close()
    assert not thread.is_alive() and not errors, errors
    return digest.hexdigest(), total
