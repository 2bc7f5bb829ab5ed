"""The test-bed kit works with the real parts: Prosody, TLS, slixmpp, namespaces, nftables NAT."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.kit.ca import ThrowawayCA, unknown_ca_server_cert
from tests.kit.netns import (
    BLOCKED_COUNTER,
    UNSOLICITED_COUNTER,
    NetLab,
    Netns,
    cleanup_prefix,
    list_netns,
)
from tests.kit.prosody import Prosody, ProsodyError
from tests.kit.xmpp import (
    offers_starttls,
    sasl_mechanisms,
    starttls_handshake,
    stream_features,
    try_login,
)

pytestmark = pytest.mark.integration

ProsodyFactory = Callable[..., Prosody]


def _prosody_pids(config: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(config) in cmd:
                pids.append(int(entry.name))
    return pids


def _wait_until(check: Callable[[], bool], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _udp(ns: Netns, bind: tuple[str, int] | None = None) -> socket.socket:
    sock = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(1.0)
    if bind is not None:
        sock.bind(bind)
    return sock


# --- Prosody ------------------------------------------------------------------------------


async def test_tls_prosody_register_and_sign_in(
    prosody_tls: Prosody, unique_user: Callable[[str], str]
) -> None:
    user = unique_user("alice")
    jid = prosody_tls.register(user, "correct horse")
    assert prosody_tls.ca_file is not None and prosody_tls.ca_file.exists()

    ok = await try_login(
        jid, "correct horse", *prosody_tls.address, ssl_context=prosody_tls.client_context()
    )
    assert ok.outcome == "session_start", ok

    assert prosody_tls.count_auth_failures(user) == 0
    bad = await try_login(
        jid, "wrong", *prosody_tls.address, ssl_context=prosody_tls.client_context()
    )
    assert bad.outcome == "failed_auth", bad
    # slixmpp tries SCRAM-SHA-1, then PLAIN: one failed login, >= 1 failed SASL attempt
    assert _wait_until(lambda: prosody_tls.count_failed_sessions(user) == 1)
    assert prosody_tls.count_auth_failures(user) >= 1
    assert {f.condition for f in prosody_tls.auth_failures(user)} == {"not-authorized"}


async def test_tls_prosody_requires_starttls(prosody_tls: Prosody) -> None:
    features = await stream_features(*prosody_tls.address, domain=prosody_tls.domain)
    assert offers_starttls(features) and "<required" in features
    assert sasl_mechanisms(features) == []  # no auth before TLS
    cert = await starttls_handshake(*prosody_tls.address, prosody_tls.client_context())
    assert ("DNS", "svpn.test") in cert["subjectAltName"]


async def test_plain_prosody_offers_no_starttls(
    prosody_factory: ProsodyFactory, unique_user: Callable[[str], str]
) -> None:
    server = prosody_factory(tls=False)
    assert server.ca_file is None
    features = await stream_features(*server.address)
    assert not offers_starttls(features)
    assert "PLAIN" in sasl_mechanisms(features)
    user = unique_user("plain")
    result = await try_login(server.register(user, "pw"), "pw", *server.address, ssl_context=None)
    assert result.outcome == "session_start", result


async def test_negative_certificates_fail_verification(
    prosody_factory: ProsodyFactory, test_ca: ThrowawayCA, tmp_path: Path
) -> None:
    wrong = prosody_factory(cert=test_ca.issue_wrong_name(directory=tmp_path / "wrong"))
    rogue = prosody_factory(cert=unknown_ca_server_cert(tmp_path / "rogue", ["svpn.test"]))
    for server, expected in (
        (wrong, "(?i)hostname mismatch"),
        (rogue, "unable to get local issuer"),
    ):
        assert server.ca_file == test_ca.ca_file  # clients are given the kit CA only
        with pytest.raises(ssl.SSLCertVerificationError, match=expected):
            await starttls_handshake(*server.address, server.client_context())
    result = await try_login(
        "nobody@svpn.test", "pw", *wrong.address, ssl_context=wrong.client_context()
    )
    assert result.outcome in ("tls_failed", "disconnected"), result
    assert result.outcome != "session_start"


async def test_stop_leaves_no_process_and_restart_keeps_accounts(
    prosody_factory: ProsodyFactory, unique_user: Callable[[str], str]
) -> None:
    server = prosody_factory(tls=False)
    jid = server.register(unique_user("keeper"), "pw")
    pid = server.pid
    assert pid is not None and _prosody_pids(server.config_path)
    server.stop()
    assert server.pid is None
    assert _prosody_pids(server.config_path) == []
    assert not Path(f"/proc/{pid}").exists()
    server.stop()  # idempotent

    server.start()  # same port, same data
    result = await try_login(jid, "pw", *server.address, ssl_context=None)
    assert result.outcome == "session_start", result
    server.stop()
    assert _prosody_pids(server.config_path) == []


def test_busy_port_is_refused(prosody_factory: ProsodyFactory) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        server = prosody_factory(tls=False, port=port, start=False)
        with pytest.raises(ProsodyError, match="busy"):
            server.start()
    assert not server.running() and _prosody_pids(server.config_path) == []


# --- namespaces ---------------------------------------------------------------------------


def test_veth_between_two_namespaces_pings(netns_factory: NetLab) -> None:
    a, b = netns_factory("a"), netns_factory("b")
    link = netns_factory.veth(a, b, a_addr="10.99.0.1/24", b_addr="10.99.0.2/24")
    assert (link.a_ip, link.b_ip) == ("10.99.0.1", "10.99.0.2")
    a.run(["ping", "-c", "1", "-W", "1", "10.99.0.2"], timeout=5)
    assert a.name.startswith(netns_factory.prefix) and len(link.a_if) <= 15


def test_nat_topology_passes_outbound_and_drops_unsolicited(netns_factory: NetLab) -> None:
    topo = netns_factory.topology()
    site = topo.add_site("a", nat="eim")
    assert site.router is not None
    site.host.run(["ping", "-c", "1", "-W", "1", topo.service_ip], timeout=5)

    with (
        _udp(topo.pub, (topo.service_ip, 3478)) as server,
        _udp(site.host) as client,
        _udp(site.router, (site.public_ip, 40000)) as on_router,
        _udp(topo.pub) as stranger,
    ):
        client.sendto(b"out", (topo.service_ip, 3478))
        data, seen = server.recvfrom(100)
        assert data == b"out" and seen[0] == site.public_ip  # masqueraded
        server.sendto(b"reply", seen)
        assert client.recvfrom(100)[0] == b"reply"  # replies to the mapping get in

        before = site.router.nft_counter(UNSOLICITED_COUNTER)
        stranger.sendto(b"unsolicited", (site.public_ip, 40000))
        stranger.sendto(b"unsolicited", (site.public_ip, seen[1] + 1))
        assert _wait_until(lambda: site.router.nft_counter(UNSOLICITED_COUNTER) >= before + 2)
        on_router.settimeout(0.2)
        with pytest.raises(TimeoutError):
            on_router.recvfrom(100)
        assert site.router.nft_counter(BLOCKED_COUNTER) == 0


def test_nat_kinds_map_ports_as_named(netns_factory: NetLab) -> None:
    topo = netns_factory.topology()
    mapped: dict[str, set[int]] = {}
    with (
        _udp(topo.pub, (topo.service_ip, 5001)) as s1,
        _udp(topo.pub, (topo.service_ip, 5002)) as s2,
    ):
        for kind in ("eim", "symmetric"):
            site = topo.add_site(kind, nat=kind)  # type: ignore[arg-type]
            with _udp(site.host) as client:
                client.sendto(b"1", (topo.service_ip, 5001))
                client.sendto(b"2", (topo.service_ip, 5002))
                mapped[kind] = {s1.recvfrom(10)[1][1], s2.recvfrom(10)[1][1]}
    assert len(mapped["eim"]) == 1  # same public port for both destinations
    assert len(mapped["symmetric"]) == 2  # a new public port per destination


async def test_prosody_inside_namespace_reached_through_nat(
    netns_factory: NetLab, prosody_factory: ProsodyFactory
) -> None:
    topo = netns_factory.topology()
    site = topo.add_site("a", nat="eim")
    server = prosody_factory(netns=topo.pub, host=topo.service_ip)
    assert server.host == topo.service_ip
    features = await stream_features(*server.address, netns=site.host)
    assert offers_starttls(features)
    cert = await starttls_handshake(*server.address, server.client_context(), netns=site.host)
    assert ("DNS", "svpn.test") in cert["subjectAltName"]


def test_cleanup_removes_namespaces_and_their_processes() -> None:
    lab = NetLab()
    a = lab("a")
    lab("b")
    sleeper = a.popen(["sleep", "60"])
    assert _wait_until(lambda: sleeper.pid in a.pids() or bool(a.pids()))
    lab.cleanup()
    assert [n for n in list_netns() if n.startswith(lab.prefix)] == []
    assert sleeper.poll() is not None
    lab.cleanup()  # idempotent

    stray = Netns.create(f"{lab.prefix}stray")
    assert stray.exists()
    assert cleanup_prefix(lab.prefix) == [stray.name]
    assert not stray.exists()
