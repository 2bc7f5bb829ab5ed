"""link/ice.py without a network: candidate parsing of hostile input, limits, path
classification, credentials, and the IceTransport bridge between a loop and blocking threads."""

from __future__ import annotations

import asyncio
import errno
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from socialvpn.errors import ProtocolError
from socialvpn.link.ice import (
    MAX_CANDIDATE_LENGTH,
    IceFailed,
    IceResult,
    IceServers,
    IceSession,
    IceTransport,
    RemoteCandidate,
    TurnServer,
    classify_path,
    parse_candidate,
    valid_pwd,
    valid_ufrag,
)

pytestmark = pytest.mark.unit

UFRAG = "abcd"
PWD = "a" * 22
HOST = "candidate:0d3c8a2f1e6b4a59c7d8e9f0a1b2c3d4 1 udp 2130706431 10.2.0.2 45678 typ host"
SRFLX = ("candidate:9f8e7d6c5b4a39281706f5e4d3c2b1a0 1 udp 1694498815 198.18.2.2 40001 typ srflx "
         "raddr 10.2.0.2 rport 45678")
RELAY = ("candidate:abc 1 UDP 16777215 198.18.0.1 50000 typ relay raddr 198.18.3.2 rport 1024 "
         "generation 0")


def session(**kw: object) -> IceSession:
    return IceSession(controlling=True, servers=IceServers(), ufrag=UFRAG, pwd=PWD, **kw)


# --- parsing -----------------------------------------------------------------------------------


def test_parses_what_aioice_produces() -> None:
    host = parse_candidate(HOST)
    assert (host.type, host.host, host.port, host.priority) == ("host", "10.2.0.2", 45678,
                                                                2130706431)
    srflx = parse_candidate(SRFLX)
    assert (srflx.type, srflx.related_address, srflx.related_port) == ("srflx", "10.2.0.2",
                                                                       45678)
    relay = parse_candidate(RELAY)
    assert relay.type == "relay" and relay.host == "198.18.0.1"


@pytest.mark.parametrize("text", [HOST, HOST[len("candidate:"):], "a=" + HOST,
                                  "  " + HOST + "\t"])
def test_prefixes_and_spaces(text: str) -> None:
    assert parse_candidate(text) == parse_candidate(HOST)


def test_round_trip() -> None:
    for text in (HOST, SRFLX, RELAY):
        c = parse_candidate(text)
        assert parse_candidate(c.to_sdp()) == c


BASE = "candidate:f 1 udp 100 198.18.1.2 4000 typ host"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (None, "malformed"),
        (b"candidate:f 1 udp 100 198.18.1.2 4000 typ host", "malformed"),
        (42, "malformed"),
        (["candidate"], "malformed"),
        ("", "malformed"),
        ("candidate:", "malformed"),
        ("x" * (MAX_CANDIDATE_LENGTH + 1), "oversize"),
        (BASE + " " * MAX_CANDIDATE_LENGTH, "oversize"),
        (BASE.replace("host", "ho\x00st"), "malformed"),
        (BASE.replace(" typ", "\ntyp"), "malformed"),
        (BASE.replace("4000", "\u0664\u0660\u0660\u0660"), "malformed"),  # Arabic-Indic digits
        (BASE.replace("4000", "4_000"), "malformed"),  # int() would take it
        (BASE.replace("4000", "+4000"), "malformed"),
        (BASE.replace("4000", "-1"), "malformed"),
        (BASE.replace("4000", "0"), "malformed"),
        (BASE.replace("4000", "65536"), "malformed"),
        (BASE.replace("4000", "9" * 400), "malformed"),
        (BASE.replace(" 100 ", " 0 "), "malformed"),
        (BASE.replace(" 100 ", " 4294967296 "), "malformed"),
        (BASE.replace("candidate:f", "candidate:" + "f" * 33), "malformed"),
        (BASE.replace("candidate:f", "candidate:f;rm"), "malformed"),
        (BASE.replace(" 1 udp", " 2 udp"), "component"),
        (BASE.replace(" 1 udp", " 256 udp"), "component"),
        (BASE.replace("udp", "tcp"), "transport"),
        (BASE.replace("typ host", "typ prflx"), "type"),
        (BASE.replace("typ host", "typ HOST"), "type"),
        (BASE.replace("typ host", "type host"), "malformed"),
        (BASE.replace("198.18.1.2", "fe80::1%eth0"), "address"),
        (BASE.replace("198.18.1.2", "2001:db8::1"), "address"),
        (BASE.replace("198.18.1.2", "3f2a9c1e-4b5d.local"), "address"),  # mDNS: never resolved
        (BASE.replace("198.18.1.2", "example.com"), "address"),
        (BASE.replace("198.18.1.2", "0.0.0.0"), "address"),
        (BASE.replace("198.18.1.2", "127.0.0.1"), "address"),
        (BASE.replace("198.18.1.2", "224.0.0.251"), "address"),
        (BASE.replace("198.18.1.2", "255.255.255.255"), "address"),
        (BASE.replace("198.18.1.2", "240.0.0.1"), "address"),
        (BASE.replace("198.18.1.2", "010.1.1.1"), "address"),
        (BASE + " raddr", "malformed"),
        (BASE + " raddr not-an-ip rport 1", "address"),
        (BASE + " raddr 10.0.0.1 rport 99999", "malformed"),
        (BASE + " generation 0" * 9, "malformed"),
    ],
)
def test_hostile_candidates_raise_protocol_error(text: object, reason: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_candidate(text)
    assert caught.value.reason == reason


def test_unknown_extensions_are_ignored() -> None:
    c = parse_candidate(BASE + " network-id 1 network-cost 10 ufrag abcd")
    assert c == parse_candidate(BASE) == parse_candidate(BASE + "\r\n")


_sdp_words = st.sampled_from(["candidate:f", "1", "udp", "UDP", "100", "198.18.1.2", "4000",
                              "typ", "host", "srflx", "relay", "raddr", "rport", "10.0.0.1",
                              "0", "-1", "65536", "::1", "x.local", "generation", "\x00", "٣"])


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=600),
                 st.lists(_sdp_words, max_size=20).map(" ".join)))
def test_any_text_parses_or_raises_protocol_error(text: str) -> None:
    try:
        c = parse_candidate(text)
    except ProtocolError:
        return
    assert isinstance(c, RemoteCandidate) and c.type in ("host", "srflx", "relay")
    assert 1 <= c.port <= 65535


# --- the session's handling of remote input (no sockets are opened) --------------------------


def test_add_remote_counts_and_never_raises() -> None:
    s = session(max_remote_candidates=3)

    def hostile() -> object:
        yield BASE
        raise RuntimeError("a peer-controlled iterator blew up")

    s.add_remote([None, 7, "garbage", BASE.replace("udp", "tcp"), HOST, SRFLX], end=False)
    assert s.rejected == {"malformed": 3, "transport": 1}
    s.add_remote(hostile(), end=False)  # the blow-up is counted; nothing gets in from it
    assert s.rejected["malformed"] == 4
    s.add_remote([RELAY, BASE], end=True)  # RELAY is the 3rd accepted: the limit
    assert s.rejected["too-many"] == 1
    s.add_remote([HOST], end=False)
    assert s.rejected["after-end"] == 1
    s.add_remote(HOST, end=True)  # a lone string is one candidate, not its characters
    assert s.rejected["after-end"] == 2
    assert s.stats()["remote_candidates"] == 3


def test_remote_credentials_are_checked_not_raised() -> None:
    s = session()
    for ufrag, pwd in [(None, None), ("abc", PWD), (UFRAG, "short"), ("ab:cd", PWD),
                       (UFRAG, "ä" * 22), (UFRAG * 100, PWD), (1234, PWD)]:
        s.set_remote_credentials(ufrag, pwd)
    assert s.rejected == {"credentials": 7}
    s.set_remote_credentials("wxyz", "b" * 22)
    assert s.rejected == {"credentials": 7}


@pytest.mark.parametrize(("ufrag", "pwd"), [("abc", PWD), (UFRAG, "a" * 21), ("a b c", PWD),
                                            (UFRAG, "a" * 257), ("é" * 4, PWD)])
def test_local_credentials_must_be_legal(ufrag: str, pwd: str) -> None:
    with pytest.raises(ValueError):
        IceSession(controlling=False, servers=IceServers(), ufrag=ufrag, pwd=pwd)


def test_credential_rules() -> None:
    assert valid_ufrag("a+/9") and not valid_ufrag("a+/")
    assert valid_pwd("A" * 22) and valid_pwd("A" * 256) and not valid_pwd("A" * 257)


def test_turn_password_is_not_in_repr() -> None:
    servers = IceServers(turn=(TurnServer("198.18.0.1", 3478, "svpn", "s3cret-pw"),))
    assert "s3cret-pw" not in repr(servers)


async def test_connect_before_gather_is_a_programming_error() -> None:
    s = session()
    with pytest.raises(RuntimeError):
        await s.connect()
    await s.close()
    with pytest.raises(IceFailed) as failed:
        await s.connect()
    assert failed.value.reason == "closed"


async def test_data_calls_before_connect_fail_clearly() -> None:
    s = session()
    with pytest.raises(IceFailed) as failed:
        await s.send(b"x")
    assert failed.value.reason == "not-connected"
    with pytest.raises(IceFailed):
        await s.recv()
    with pytest.raises(IceFailed):
        s.transport()
    await s.close()


# --- results -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("local", "remote", "path"),
    [("host", "host", "direct"), ("host", "srflx", "direct"), ("srflx", "prflx", "direct"),
     ("prflx", "srflx", "direct"), ("relay", "srflx", "turn"), ("host", "relay", "turn"),
     ("relay", "relay", "turn")],
)
def test_path_classification(local: str, remote: str, path: str) -> None:
    assert classify_path(local, remote) == path


def test_result_is_frozen() -> None:
    r = IceResult("host", "srflx", "direct", ("198.18.2.2", 1), ("198.18.1.2", 2), 0.001)
    with pytest.raises(AttributeError):
        r.path = "turn"  # type: ignore[misc]


# --- IceTransport: a loop on one side, blocking threads on the other ------------------------


async def test_transport_bridges_threads_and_loop() -> None:
    loop = asyncio.get_running_loop()
    sent: list[bytes] = []
    got_all = asyncio.Event()

    def send(data: bytes) -> None:
        sent.append(data)
        if len(sent) == 100:
            got_all.set()

    t = IceTransport(loop, send, ("198.18.2.2", 40001), queue_size=200)
    assert t.sockaddr("198.18.2.2", 40001) == t.remote
    payloads = [i.to_bytes(2, "big") * 10 for i in range(100)]
    threads = [threading.Thread(target=lambda part=part: [t.sendto(p, t.remote) for p in part])
               for part in (payloads[:50], payloads[50:])]
    for th in threads:
        th.start()
    await asyncio.wait_for(got_all.wait(), 2.0)
    for th in threads:
        th.join()
    assert sorted(sent) == sorted(payloads)
    for p in payloads[:3]:
        t.deliver(p)
    buf = bytearray(1500)
    n, addr = await asyncio.to_thread(t.recv_into, buf)
    assert bytes(buf[:n]) == payloads[0] and addr == t.remote
    n, seg, _ = await asyncio.to_thread(t.recv_segments, buf)
    assert n == seg == len(payloads[1])
    small = bytearray(5)  # like recvfrom_into: a short buffer truncates
    n, _ = await asyncio.to_thread(t.recv_into, small)
    assert n == 5 and bytes(small) == payloads[2][:5]
    t.wake()
    assert (await asyncio.to_thread(t.recv_into, buf))[0] == 0
    assert t.errors == {}


async def test_transport_bounds_and_failure() -> None:
    loop = asyncio.get_running_loop()
    t = IceTransport(loop, lambda data: None, ("198.18.2.2", 1), queue_size=2)
    for _ in range(5):
        t.deliver(b"x")
    assert t.errors == {"rx-queue-full": 3}
    for _ in range(5):
        t.sendto(b"y", t.remote)  # the loop is busy running this test: nothing is flushed
    assert t.errors["tx-queue-full"] == 3
    blocked = [asyncio.create_task(asyncio.to_thread(t.recv_into, bytearray(8)))
               for _ in range(4)]
    await asyncio.sleep(0.05)
    t.fail("consent-expired")
    results = await asyncio.gather(*blocked, return_exceptions=True)
    errors = [r for r in results if isinstance(r, OSError)]
    assert len(errors) == 2  # two readers got the queued datagrams, two the failure
    assert all(e.errno == errno.ENOTCONN and "consent-expired" in str(e) for e in errors)
    with pytest.raises(OSError):
        t.recv_into(bytearray(8))  # and so does every later reader, without blocking
    t.sendto(b"z", t.remote)
    assert t.errors["closed"] == 1
    t.close()  # idempotent


def test_transport_on_a_closed_loop_drops() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    t = IceTransport(loop, lambda data: None, ("198.18.2.2", 1))
    t.sendto(b"x", t.remote)
    assert t.errors == {"loop-closed": 1}


def test_stun_hand_off_caps_what_waits_for_the_loop_and_counts_the_rest() -> None:
    from socialvpn.link.ice import StunHandOff

    posted: list[bytes] = []
    closing = [False]
    handoff = StunHandOff(lambda data, addr: posted.append(data), lambda: closing[0], limit=4)
    for i in range(10):  # a flood while the loop is busy: only `limit` wait
        handoff(bytes([i]), ("10.0.0.1", 3478))
    assert len(posted) == 4 and handoff.dropped == 6
    handoff.handled += 2  # the loop caught up with two
    handoff(b"x", ("10.0.0.1", 3478))
    handoff(b"y", ("10.0.0.1", 3478))
    handoff(b"z", ("10.0.0.1", 3478))
    assert posted[-2:] == [b"x", b"y"] and handoff.dropped == 7
    closing[0] = True
    handoff(b"late", ("10.0.0.1", 3478))
    assert posted[-1] == b"y" and handoff.dropped == 7  # closing: silently ignored


def test_stun_hand_off_survives_a_closed_loop() -> None:
    from socialvpn.link.ice import StunHandOff

    def closed(data: bytes, addr: tuple[str, int]) -> None:
        raise RuntimeError("Event loop is closed")

    handoff = StunHandOff(closed, lambda: False)
    handoff(b"x", ("10.0.0.1", 3478))  # no exception escapes into the reader thread
