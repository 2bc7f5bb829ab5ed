"""Other VPNs to measure against, each as a pair of endpoints in two namespaces of the kit.

* :func:`tinc_pair` — tinc 1.0 in router mode (TUN), RSA keys made per run, tinc's default
  data cipher (Blowfish-CBC, HMAC-SHA1 truncated to 4 bytes) over UDP (``PMTUDiscovery = no``:
  otherwise the first seconds of bulk data go over tinc's TCP meta connection);
* :func:`openvpn_pair` — OpenVPN 2.6 point-to-point in TLS mode (``--tls-server`` /
  ``--tls-client``, self-signed certificates pinned with ``--peer-fingerprint``), data
  channel AES-256-GCM only
  (``--data-ciphers AES-256-GCM``), userspace (``--disable-dco``), UDP;
* :func:`fastd_pair` — fastd in TUN mode with a chosen method (``salsa2012+umac``,
  ``aes128-gcm``, ...).

Every endpoint runs as one foreground process started with ``ip netns exec`` (so the
:class:`subprocess.Popen` pid *is* the daemon's pid), is stopped by that pid, and keeps its
configuration, keys and log under ``workdir``. Inner addresses: ``10.9.0.1`` (a) and
``10.9.0.2`` (b), inner MTU 1380, like :mod:`tests.kit.links`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.kit.netns import Netns
from tests.kit.procs import end_process

INNER_MTU = 1380
TINC_CIPHER = ("Blowfish-CBC + HMAC-SHA1/32 (tinc 1.0 defaults: Cipher, Digest, MACLength "
               "unset), PMTUDiscovery = no")
OPENVPN_CIPHER = "AES-256-GCM (TLS p2p, peer-fingerprint, data-ciphers AES-256-GCM, no DCO)"


def available(program: str) -> bool:
    return shutil.which(program) is not None


@dataclass
class DaemonLink:
    """One VPN daemon in a namespace: started by :meth:`start`, ended by pid in :meth:`stop`."""

    ns: Netns
    workdir: Path
    address: str  # inner address with prefix, e.g. "10.9.0.1/24"
    argv: list[str]
    ifname: str
    ready: Callable[[DaemonLink], bool] | None = None
    proc: subprocess.Popen[bytes] | None = None
    log_name: str = "daemon.log"
    files: list[Path] = field(default_factory=list)

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]

    @property
    def log_path(self) -> Path:
        return self.workdir / self.log_name

    def pids(self) -> list[int]:
        """The processes whose CPU time is the VPN's (here: the one daemon)."""
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-3000:]
        return ""

    def start(self, timeout: float = 15.0) -> None:
        self.launch()
        self.wait_up(timeout)

    def launch(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = self.ns.popen(self.argv, stdout=log, stderr=subprocess.STDOUT)

    def wait_up(self, timeout: float = 15.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.argv[0]} in {self.ns.name} exited "
                                     f"{self.proc.returncode}:\n{self.log_tail()}")
            up = self.ns.ip("-o", "addr", "show", "dev", self.ifname, check=False)
            if self.ip in up.stdout and (self.ready is None or self.ready(self)):
                return
            time.sleep(0.05)
        raise AssertionError(f"{self.argv[0]} in {self.ns.name} not up in {timeout:.0f} s:\n"
                             f"{self.log_tail()}")

    def stop(self) -> None:
        end_process(self.proc)
        self.ns.ip("link", "del", self.ifname, check=False)


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def _wait_log(link: DaemonLink, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in link.log_tail():
        if time.monotonic() > deadline:
            raise AssertionError(f"{link.argv[0]}: no {text!r} in its log:\n{link.log_tail()}")
        time.sleep(0.05)


# --- tinc 1.0 ------------------------------------------------------------------------------


def _rsa_pems(bits: int = 2048) -> tuple[bytes, bytes]:
    """(private key, public key) as tinc 1.0 reads them: PKCS#1 PEM."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private = key.private_bytes(Encoding.PEM, PrivateFormat.TraditionalOpenSSL, NoEncryption())
    public = key.public_key().public_bytes(Encoding.PEM, PublicFormat.PKCS1)
    return private, public


def tinc_pair(a: Netns, b: Netns, tmp: Path, *, underlay: tuple[str, str] = ("10.0.0.1",
              "10.0.0.2"), port: int = 655, pmtu_discovery: bool = False
              ) -> tuple[DaemonLink, DaemonLink]:
    """tinc 1.0 router mode between ``a`` (10.9.0.1, connects) and ``b`` (10.9.0.2)."""
    names = ("a", "b")
    inner = ("10.9.0.1", "10.9.0.2")
    keys = [_rsa_pems() for _ in names]
    links = []
    for i, (ns, name) in enumerate(zip((a, b), names, strict=True)):
        conf = tmp / f"tinc-{name}"
        (conf / "hosts").mkdir(parents=True, exist_ok=True)
        for j, other in enumerate(names):
            (conf / "hosts" / other).write_text(
                f"Address = {underlay[j]}\nPort = {port}\nSubnet = {inner[j]}/32\n"
                + ("" if pmtu_discovery else "PMTUDiscovery = no\n") + "\n"
                + keys[j][1].decode())
        key_file = conf / "rsa_key.priv"
        key_file.write_bytes(keys[i][0])
        key_file.chmod(0o600)
        ifname = f"tinc-{name}"
        lines = [f"Name = {name}", "Mode = router", f"Interface = {ifname}",
                 "AddressFamily = ipv4", f"Port = {port}", f"PrivateKeyFile = {key_file}",
                 # While PMTU discovery runs (seconds), tinc 1.0 sends every packet larger
                 # than the MTU found so far over its TCP meta connection; without it, data
                 # goes over UDP from the start (the underlay MTU is known: 1500).
                 f"PMTUDiscovery = {'yes' if pmtu_discovery else 'no'}"]
        if i == 0:
            lines.append(f"ConnectTo = {names[1]}")
        (conf / "tinc.conf").write_text("\n".join(lines) + "\n")
        _script(conf / "tinc-up", f"ip addr add {inner[i]}/24 dev $INTERFACE\n"
                                  f"ip link set $INTERFACE mtu {INNER_MTU} up\n")
        argv = ["tincd", "-c", str(conf), "-D", "-d1", f"--pidfile={conf / 'tinc.pid'}"]
        links.append(DaemonLink(ns, conf, f"{inner[i]}/24", argv, ifname, log_name="tinc.log"))
    links[1].start()  # b listens first: a's first connection attempt must not be refused
    links[0].start()
    _wait_log(links[0], "activated", 15)
    return links[0], links[1]


# --- OpenVPN 2.6 ---------------------------------------------------------------------------


def _self_signed(name: str, work: Path) -> tuple[Path, Path, str]:
    """A self-signed EC certificate (both TLS purposes): (cert, key, SHA-256 fingerprint)."""
    work.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = work / "cert.pem", work / "key.pem"
    cert_path.write_bytes(cert.public_bytes(Encoding.PEM))
    key_path.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    key_path.chmod(0o600)
    fingerprint = cert.fingerprint(hashes.SHA256()).hex(":").upper()
    return cert_path, key_path, fingerprint


def _openvpn_ready(link: DaemonLink) -> bool:
    return "Initialization Sequence Completed" in link.log_tail()


def openvpn_pair(a: Netns, b: Netns, tmp: Path, *, underlay: tuple[str, str] = ("10.0.0.1",
                 "10.0.0.2"), port: int = 1194) -> tuple[DaemonLink, DaemonLink]:
    """OpenVPN p2p, TLS mode (b is the TLS server), AES-256-GCM data channel, UDP."""
    inner = ("10.9.0.1", "10.9.0.2")
    works = [tmp / f"ovpn-{n}" for n in ("a", "b")]
    certs = [_self_signed(f"ovpn-{n}.svpn.test", w) for n, w in zip("ab", works, strict=True)]
    links = []
    for i, (ns, name) in enumerate(zip((a, b), ("a", "b"), strict=True)):
        work = works[i]
        cert, key, _ = certs[i]
        ifname = f"ovpn-{name}"
        argv = [
            "openvpn", "--dev", ifname, "--dev-type", "tun", "--disable-dco",
            "--proto", "udp", "--local", underlay[i], "--lport", str(port),
            "--remote", underlay[1 - i], str(port),
            "--ifconfig", inner[i], inner[1 - i], "--tun-mtu", str(INNER_MTU),
            "--tls-server" if i == 1 else "--tls-client", "--dh", "none",
            "--cert", str(cert), "--key", str(key), "--peer-fingerprint", certs[1 - i][2],
            "--data-ciphers", "AES-256-GCM", "--data-ciphers-fallback", "AES-256-GCM",
            "--auth-nocache", "--verb", "3", "--writepid", str(work / "openvpn.pid"),
        ]
        links.append(DaemonLink(ns, work, f"{inner[i]}/32", argv, ifname,
                                ready=_openvpn_ready, log_name="openvpn.log"))
    for link in links:
        link.launch()
    for link in links:
        link.wait_up(timeout=20)
    for link in links:  # the data channel of each side says which cipher it uses
        if "Data Channel: cipher 'AES-256-GCM'" not in link.log_tail():
            raise AssertionError(f"OpenVPN data channel is not AES-256-GCM:\n{link.log_tail()}")
    return links[0], links[1]


# --- fastd ---------------------------------------------------------------------------------


def _fastd_keys(ns: Netns, work: Path) -> tuple[str, str]:
    secret = ns.run(["fastd", "--machine-readable", "--generate-key"]).stdout.strip()
    conf = work / "key.conf"
    conf.write_text(f'secret "{secret}";\n')
    conf.chmod(0o600)
    public = ns.run(["fastd", "--machine-readable", "--show-key", "-c", str(conf)]).stdout
    return secret, public.strip()


def _fastd_ready(link: DaemonLink) -> bool:
    return "established" in link.log_tail()


def fastd_method_supported(method: str) -> bool:
    """Whether this fastd build accepts ``method`` (it checks the config and exits)."""
    conf = ('secret "b843c6cccf2aa89a80f57df0bf14a7bd0feee38b374c1d5d4120d80b08626e69";\n'
            f'method "{method}";\nmode tun;\n')
    result = subprocess.run(["fastd", "--verify-config", "-c", "-"], input=conf, text=True,
                            capture_output=True, timeout=10, check=False)
    return result.returncode == 0


def fastd_pair(a: Netns, b: Netns, tmp: Path, *, method: str = "salsa2012+umac",
               underlay: tuple[str, str] = ("10.0.0.1", "10.0.0.2"), port: int = 10000
               ) -> tuple[DaemonLink, DaemonLink]:
    """fastd TUN mode between a (10.9.0.1) and b (10.9.0.2) with one ``method``."""
    inner = ("10.9.0.1", "10.9.0.2")
    works = [tmp / f"fastd-{n}" for n in ("a", "b")]
    for w in works:
        w.mkdir(parents=True, exist_ok=True)
    keys = [_fastd_keys(ns, w) for ns, w in zip((a, b), works, strict=True)]
    links = []
    for i, (ns, name) in enumerate(zip((a, b), ("a", "b"), strict=True)):
        ifname = f"fastd-{name}"
        conf = works[i] / "fastd.conf"
        conf.write_text(
            "log level verbose;\n"
            f'interface "{ifname}";\nmode tun;\nbind {underlay[i]}:{port};\n'
            f'method "{method}";\nsecret "{keys[i][0]}";\nmtu {INNER_MTU};\n'
            f'on up sync "ip addr add {inner[i]}/24 dev $INTERFACE && '
            'ip link set $INTERFACE up";\n'
            f'peer "{"ab"[1 - i]}" {{ key "{keys[1 - i][1]}"; '
            # Only a connects: handshakes from both sides at once left no working session.
            + (f"remote {underlay[1]}:{port}; " if i == 0 else "") + "}\n")
        conf.chmod(0o600)
        links.append(DaemonLink(ns, works[i], f"{inner[i]}/24", ["fastd", "-c", str(conf)],
                                ifname, log_name="fastd.log"))
    links[1].start()  # b (no remote, waits) is bound before a's first handshake
    links[0].start()
    # fastd repeats a lost handshake only after 15-20 s (with underlay loss it happens)
    deadline = time.monotonic() + 45
    while not all(_fastd_ready(link) for link in links):
        if time.monotonic() > deadline:
            raise AssertionError(f"fastd did not establish:\n{links[0].log_tail()}")
        time.sleep(0.05)
    return links[0], links[1]
