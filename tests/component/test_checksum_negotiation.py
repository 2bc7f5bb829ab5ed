"""Partial checksums negotiated per link: GroupLinks applies what a session agreed on (on when
it connects, off at once when a new session does not use them), LinkHub advertises
``csum-partial`` for a group whose TUN device has offloads and hands the agreement from the
signalling to GroupLinks; signalling that arrives before the group is up waits for it.

No ICE connects here: GroupLinks runs real (idle) ICE sessions and paths are attached by hand
(as ICE does on success); the TUN is a FakeTun that claims offloads (the Device's packet
threads are not started, only the per-peer flag is looked at)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from socialvpn import linkhub
from socialvpn.errors import ProtocolError
from socialvpn.link.ice import IceServers
from socialvpn.link.manager import GroupLinks, LinkEvent
from socialvpn.link.noise import public_bytes
from socialvpn.linkhub import HOLD_MAX, LinkHub
from socialvpn.net.fake import FakeTun
from socialvpn.net.packet_router import PacketRouter
from socialvpn.xmpp import stanzas
from socialvpn.xmpp.signal import CSUM_PARTIAL, Kind, LinkMessage

pytestmark = pytest.mark.component

CREDS = dict(local_ufrag="abcd", local_pwd="p" * 22, remote_ufrag="efgh", remote_pwd="q" * 22)


class OffloadTun(FakeTun):
    offloads = True  # what TunDevice.open(offloads=True) sets: the Device takes virtio headers


def keypair() -> tuple[bytes, bytes]:
    key = X25519PrivateKey.generate()
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()), public_bytes(key)


class FakePath:
    """A path nobody sends on (the Device threads do not run)."""

    gso = gro = False

    def sendto(self, data: Any, addr: Any) -> None: ...

    def send_batch(self, messages: Any, addr: Any) -> None: ...

    def recv_into(self, buf: bytearray) -> tuple[int, Any]:
        raise OSError("closed")

    def recv_segments(self, buf: bytearray) -> tuple[int, int, Any]:
        raise OSError("closed")

    def sockaddr(self, host: str, port: int) -> tuple[str, int]:
        return host, port

    def wake(self) -> None: ...

    def close(self) -> None: ...


def make_links(tun: FakeTun) -> tuple[GroupLinks, list[LinkEvent]]:
    events: list[LinkEvent] = []
    links = GroupLinks(private_key=keypair()[0], tun=tun, routes=PacketRouter(),
                       servers=IceServers(), on_event=events.append)
    return links, events


def checksums(links: GroupLinks, peer_id: str = "b") -> str:
    return links.peer_stats(peer_id)["checksums"]


async def test_group_links_apply_the_agreed_checksums_per_session() -> None:
    links, _ = make_links(OffloadTun())
    peer_key = keypair()[1]
    try:
        assert links.offloads
        links.set_peer("b", peer_key, ("10.9.0.2/32",))
        assert checksums(links) == "full"  # nothing agreed yet
        # a session that agreed on them: in effect once it connects, not before
        await links.start_ice("b", controlling=True, partial_checksums=True, **CREDS)
        assert checksums(links) == "full"
        links.attach_path("b", FakePath(), initiate=False)  # what ICE does on success
        assert checksums(links) == "partial"
        assert links.device.peer_stats(links.device.peer(peer_key))["checksums"] == "partial"
        # the peer restarted as a build without them: off as soon as the new session starts
        await links.start_ice("b", controlling=True, partial_checksums=False, **CREDS)
        assert checksums(links) == "full"
        links.attach_path("b", FakePath(), initiate=False)
        assert checksums(links) == "full"
        # and on again with the next session that agrees
        await links.start_ice("b", controlling=True, partial_checksums=True, **CREDS)
        links.attach_path("b", FakePath(), initiate=False)
        assert checksums(links) == "partial"
        # losing the ICE session keeps them (the WireGuard session goes on on that path)
        await links.stop_ice("b")
        assert checksums(links) == "partial"
        # a new key for the peer is a new Device peer: full until a session agrees again
        links.set_peer("b", keypair()[1], ("10.9.0.2/32",))
        assert checksums(links) == "full"
        links.attach_path("b", FakePath(), initiate=False)
        assert checksums(links) == "full"
    finally:
        await links.stop()


async def test_group_links_without_offloads_never_use_partial_checksums() -> None:
    links, _ = make_links(FakeTun())
    try:
        assert not links.offloads
        links.set_peer("b", keypair()[1], ("10.9.0.2/32",))
        await links.start_ice("b", controlling=False, partial_checksums=True, **CREDS)
        links.attach_path("b", FakePath(), initiate=False)
        assert checksums(links) == "full"
    finally:
        await links.stop()


# --- LinkHub: what is advertised, and what reaches GroupLinks --------------------------------


ME = "mmmmmmmmmmmmmmmm"  # the greater device id: controlling
PEER = "cccccccccccccccc"
GID = "0123456789abcdef0123456789abcdef"
JID = "bob@example.test"
SID1, SID2, SID3 = "0123456789abcdef", "fedcba9876543210", "00000000000000aa"
CAND = "candidate:1 1 UDP 2130706431 10.0.0.1 51820 typ host"


def offer(sid: str = SID1, **kw: Any) -> LinkMessage:
    return LinkMessage(Kind.OFFER, sid, 0, ufrag="abcd", pwd="A" * 22, **kw)


class FakeXmpp:
    connected = True

    def __init__(self) -> None:
        self.sent: list[LinkMessage] = []

    async def send_group_op(self, to: str, op: stanzas.LinkSignal) -> None:
        assert to == f"{JID}/svpn-{PEER}" and op.gid == GID
        self.sent.append(op.msg)


class FakeAgent:
    def __init__(self) -> None:
        self.cfg = SimpleNamespace(link=SimpleNamespace(enabled=True))
        self.state = SimpleNamespace(read_json=lambda name, default: default)
        self.device = SimpleNamespace(id=ME)
        self.xmpp = FakeXmpp()
        self.dropped: list[str] = []
        self.tasks: set[asyncio.Task[Any]] = set()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def stanza_dropped(self, reason: str, sender: str, detail: str) -> None:
        self.dropped.append(reason)


class FakeLinks:
    """What LinkHub calls on a group's GroupLinks."""

    def __init__(self, offloads: bool) -> None:
        self.offloads = offloads
        self.started: list[dict[str, Any]] = []

    async def start_ice(self, peer_id: str, **kw: Any) -> None:
        assert peer_id == PEER
        self.started.append(kw)

    def add_remote_candidates(self, peer_id: str, candidates: Any, end: bool) -> None: ...

    async def stop_ice(self, peer_id: str) -> None: ...


async def until(cond: Callable[[], Any], what: str, timeout: float = 3.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)
    return value


async def _finish(agent: FakeAgent) -> None:
    for task in list(agent.tasks):
        task.cancel()
    await asyncio.gather(*agent.tasks, return_exceptions=True)


@pytest.mark.parametrize("ours", [True, False])
async def test_hub_advertises_offloads_and_hands_the_agreement_to_group_links(
        ours: bool) -> None:
    agent = FakeAgent()
    hub = LinkHub(agent)  # type: ignore[arg-type]
    links = FakeLinks(offloads=ours)
    try:
        # The offer arrives before the group's TUN device is up: it waits for it, so that
        # the answer can say what the device does.
        hub.receive(GID, PEER, JID, offer(features=(CSUM_PARTIAL,)))
        await asyncio.sleep(0.05)
        assert agent.xmpp.sent == [] and (GID, PEER) not in hub.signals
        hub.groups[GID] = links
        hub._ready(GID).set()
        (answer,) = await until(lambda: agent.xmpp.sent, "the answer")
        assert answer.kind is Kind.ANSWER and answer.sid == SID1
        assert answer.features == ((CSUM_PARTIAL,) if ours else ())
        (first,) = await until(lambda: links.started, "StartIce")
        assert first["partial_checksums"] is ours and first["controlling"] is True
        sig = hub.signals[(GID, PEER)]
        assert sig.remote_features == {CSUM_PARTIAL}

        # The peer restarts as an older build (no features): that session goes without.
        hub.receive(GID, PEER, JID, offer(SID2))
        await until(lambda: len(links.started) == 2, "the second StartIce")
        assert links.started[1]["partial_checksums"] is False
        assert sig.remote_features == frozenset()
        # ... and comes back with them
        hub.receive(GID, PEER, JID, offer(SID3, features=("zz-later", CSUM_PARTIAL)))
        await until(lambda: len(links.started) == 3, "the third StartIce")
        assert links.started[2]["partial_checksums"] is ours
        assert [m.features for m in agent.xmpp.sent] == [answer.features] * 3
        # Every action ran: the per-peer ordering lock is not kept around.
        await until(lambda: not agent.tasks, "the actions to finish")
        assert hub._order == {}
    finally:
        await _finish(agent)


async def test_hub_holds_signalling_bounded_and_in_order(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    monkeypatch.setattr(linkhub, "HOLD_TIMEOUT", 0.3)
    agent = FakeAgent()
    hub = LinkHub(agent)  # type: ignore[arg-type]
    try:
        # malformed input is refused at once, also while held
        with pytest.raises(ProtocolError) as info:
            hub.receive(GID, PEER, JID, LinkMessage(Kind.OFFER, "XYZ", 0))
        assert info.value.reason == "malformed"
        hub.receive(GID, PEER, JID, offer())
        for seq in range(1, HOLD_MAX):
            hub.receive(GID, PEER, JID, LinkMessage(Kind.CANDIDATES, SID1, seq, candidates=(CAND,),
                                                    end_of_candidates=seq == HOLD_MAX - 1))
        with pytest.raises(ProtocolError) as info:
            hub.receive(GID, PEER, JID, LinkMessage(Kind.END, SID1, HOLD_MAX))
        assert info.value.reason == "oversize"
        # The group never comes up: after HOLD_TIMEOUT the messages go to the state machine
        # in order, the answer advertising nothing; those it refuses are counted.
        (answer,) = await until(lambda: agent.xmpp.sent, "the answer after the hold")
        assert answer.kind is Kind.ANSWER and answer.features == ()
        assert agent.dropped == []  # candidates in order, end-of-candidates last: all taken
        assert (GID, PEER) not in hub._held
        # A message for a group that is not up after that is held again (a fresh wait).
        hub.receive(GID, PEER, JID, LinkMessage(Kind.CANDIDATES, SID1, HOLD_MAX + 1,
                                                candidates=(CAND,)))
        assert (GID, PEER) in hub._held
        await until(lambda: agent.dropped, "the refused message to be counted")
        assert agent.dropped == ["state"]  # candidates after end-of-candidates
    finally:
        await _finish(agent)
