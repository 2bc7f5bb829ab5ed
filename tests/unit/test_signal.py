"""Unit tests for socialvpn/xmpp/signal.py: the link-signalling state machine, Pacer, coalescing.

RELIABILITY rows 7 (hostile signalling: limits, only ProtocolError escapes), 8 (stale and
duplicated offers: sid + seq), 24 (own start-up signalling paced). Time is an explicit ``now``;
randomness is a seeded ``random.Random``. Two machines are driven against each other through a
tiny in-test wire that can interleave, reorder, delay and drop messages.
"""

from __future__ import annotations

import ast
import heapq
import random
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from socialvpn.errors import ProtocolError
from socialvpn.xmpp import signal as sigmod
from socialvpn.xmpp.signal import (
    CSUM_PARTIAL,
    MAX_CANDIDATE_CHARS,
    MAX_CANDIDATES,
    MAX_FEATURE_CHARS,
    MAX_FEATURES,
    MAX_SESSION_CANDIDATES,
    SEEN_SIDS,
    AddRemoteCandidates,
    Kind,
    LinkMessage,
    LinkSignaling,
    Pacer,
    Role,
    SendMessage,
    StartIce,
    State,
    StopIce,
    check_candidate,
    check_features,
    coalesce_candidates,
    validate,
)

pytestmark = pytest.mark.unit

BIG = "mmmmmmmmmmmmmmmm"  # the greater device id: controlling, wins glare
SMALL = "cccccccccccccccc"
CAND = "candidate:1 1 UDP 2130706431 10.0.0.1 51820 typ host"
UFRAG = "abcd"
PWD = "A" * 22
SID1 = "0123456789abcdef"
SID2 = "fedcba9876543210"
ACTIONS = (SendMessage, StartIce, AddRemoteCandidates, StopIce)


def rng_of(seed: int):
    return random.Random(seed).randbytes


def machine(local: str = BIG, remote: str = SMALL, seed: int = 1, **kw) -> LinkSignaling:
    kw.setdefault("jitter_rand", lambda: 0.5)  # jitter factor exactly 1
    return LinkSignaling(local, remote, rng=rng_of(seed), **kw)


def sent(actions: list) -> list[LinkMessage]:
    return [a.msg for a in actions if isinstance(a, SendMessage)]


def only_msg(actions: list) -> LinkMessage:
    (msg,) = sent(actions)
    return msg


def cand(i: int) -> str:
    address = f"10.0.{i // 250}.{i % 250 + 1}"
    return f"candidate:{i} 1 UDP {2130706431 - i} {address} {40000 + i} typ host"


def offer(sid: str = SID1, seq: int = 0, **kw) -> LinkMessage:
    return LinkMessage(Kind.OFFER, sid, seq, ufrag=UFRAG, pwd=PWD, **kw)


def answer(sid: str = SID1, seq: int = 0, **kw) -> LinkMessage:
    return LinkMessage(Kind.ANSWER, sid, seq, ufrag=UFRAG, pwd=PWD, **kw)


def cands(sid: str, seq: int, *items: str, end: bool = False) -> LinkMessage:
    return LinkMessage(Kind.CANDIDATES, sid, seq, candidates=items, end_of_candidates=end)


def reason_of(fn, *args) -> str:
    with pytest.raises(ProtocolError) as info:
        fn(*args)
    return info.value.reason


def handshake(a: LinkSignaling, b: LinkSignaling, now: float = 0.0) -> tuple[list, list]:
    """a offers, b answers; returns (a's actions on the answer, b's actions on the offer)."""
    b_actions = b.receive(only_msg(a.start(now)), now)
    a_actions = a.receive(only_msg(b_actions), now)
    return a_actions, b_actions


# --- validate and check_candidate ---------------------------------------------------------------


GOOD_CANDIDATES = [
    CAND,
    "candidate:842163049 1 udp 1677729535 203.0.113.7 61665 typ srflx raddr 10.0.0.1 rport 51820",
    "candidate:3 1 UDP 16777215 198.51.100.9 3478 typ relay raddr 203.0.113.7 rport 61665",
    "candidate:4 1 TCP 2105524479 10.0.0.1 9 typ host tcptype active generation 0",
    "candidate:5 1 UDP 2130706431 fd00:1::2 51820 typ host",
    "candidate:6 1 UDP 2130706431 fe80::1%eth0 51820 typ host",
    "candidate:7 1 UDP 2130706431 1f0c7ab3-8f1d-4c5e-9d2a-0b3c4d5e6f70.local 51820 typ host",
    "candidate:a+/B 256 UDP 4294967295 10.0.0.1 65535 typ prflx",
]

BAD_CANDIDATES = [
    ("", "malformed"),
    ("1 1 UDP 2130706431 10.0.0.1 51820 typ host", "malformed"),  # no "candidate:" prefix
    ("candidate:1 1 UDP 2130706431 10.0.0.1 51820 typ bogus", "malformed"),
    ("candidate:1 0 UDP 2130706431 10.0.0.1 51820 typ host", "malformed"),  # component 0
    ("candidate:1 1 UDP 4294967296 10.0.0.1 51820 typ host", "malformed"),  # priority > 2^32-1
    ("candidate:1 1 UDP 2130706431 10.0.0.1 65536 typ host", "malformed"),
    ("candidate:1 1 UDP 2130706431 evil.example.com 51820 typ host", "malformed"),  # no DNS
    ("candidate:1 1 UDP 2130706431 10.0.0.1 51820 typ host raddr", "malformed"),  # odd extension
    ("candidate:1 1 UDP 2130706431 10.0.0.1 51820 typ host\n", "malformed"),
    ("candidate:1  1 UDP 2130706431 10.0.0.1 51820 typ host", "malformed"),
    ("candidate:1 1 UDP 2130706431 10.0.0.1 51820 typ host x " + "y" * 300, "oversize"),
    (b"candidate:1", "malformed"),
    (None, "malformed"),
]


@pytest.mark.parametrize("text", GOOD_CANDIDATES)
def test_check_candidate_accepts_sdp_attributes(text: str) -> None:
    assert check_candidate(text) == text
    validate(cands(SID1, 1, text))


@pytest.mark.parametrize(("text", "reason"), BAD_CANDIDATES)
def test_check_candidate_refuses(text: object, reason: str) -> None:
    assert reason_of(check_candidate, text) == reason


def test_validate_accepts_each_kind() -> None:
    messages = [
        offer(),
        offer(candidates=(CAND,), end_of_candidates=True),
        answer(seq=7),
        cands(SID1, 1, *(cand(i) for i in range(MAX_CANDIDATES))),
        cands(SID1, 2, end=True),
        LinkMessage(Kind.END, SID1, 3, reason="ice-failed"),
        LinkMessage(Kind.BYE, SID1, 0),
        LinkMessage("offer", SID1, 0, ufrag="u" * 32, pwd="p" * 256),  # type: ignore[arg-type]
    ]
    for msg in messages:
        assert validate(msg) is msg


BAD_MESSAGES = [
    (offer(sid="0123456789ABCDEF"), "malformed"),
    (offer(sid="0123456789abcde"), "malformed"),
    (offer(sid=123), "malformed"),
    (offer(seq=-1), "malformed"),
    (offer(seq=2**31), "malformed"),
    (offer(seq=True), "malformed"),
    (offer(seq="1"), "malformed"),
    (LinkMessage("hello", SID1, 0), "malformed"),  # type: ignore[arg-type]
    (LinkMessage([], SID1, 0), "malformed"),  # type: ignore[arg-type]
    (LinkMessage(Kind.OFFER, SID1, 0, pwd=PWD), "malformed"),  # no ufrag
    (LinkMessage(Kind.OFFER, SID1, 0, ufrag=UFRAG), "malformed"),  # no pwd
    (LinkMessage(Kind.OFFER, SID1, 0, ufrag="abc", pwd=PWD), "malformed"),  # ufrag < 4
    (LinkMessage(Kind.OFFER, SID1, 0, ufrag="u" * 33, pwd=PWD), "oversize"),
    (LinkMessage(Kind.OFFER, SID1, 0, ufrag="ab:d", pwd=PWD), "malformed"),  # not ice-char
    (LinkMessage(Kind.OFFER, SID1, 0, ufrag=UFRAG, pwd="p" * 21), "malformed"),
    (LinkMessage(Kind.OFFER, SID1, 0, ufrag=UFRAG, pwd="p" * 257), "oversize"),
    (LinkMessage(Kind.ANSWER, SID1, 0, ufrag=UFRAG, pwd="p" * 21 + " "), "malformed"),
    (LinkMessage(Kind.CANDIDATES, SID1, 1, ufrag=UFRAG, candidates=(CAND,)), "malformed"),
    (cands(SID1, 1), "malformed"),  # neither candidates nor end
    (cands(SID1, 1, *(cand(i) for i in range(MAX_CANDIDATES + 1))), "oversize"),
    (cands(SID1, 1, "x" * (MAX_CANDIDATE_CHARS + 1)), "oversize"),
    (cands(SID1, 1, "candidate:garbage"), "malformed"),
    (LinkMessage(Kind.CANDIDATES, SID1, 1, candidates=[CAND]), "malformed"),  # type: ignore[arg-type]
    (LinkMessage(Kind.CANDIDATES, SID1, 1, candidates=(CAND,), end_of_candidates=1), "malformed"),  # type: ignore[arg-type]
    (LinkMessage(Kind.END, SID1, 1, candidates=(CAND,)), "malformed"),
    (LinkMessage(Kind.BYE, SID1, 1, end_of_candidates=True), "malformed"),
    (LinkMessage(Kind.END, SID1, 1, reason="r" * 65), "oversize"),
    (LinkMessage(Kind.END, SID1, 1, reason="bad\x00reason"), "malformed"),
    (LinkMessage(Kind.END, SID1, 1, reason=7), "malformed"),  # type: ignore[arg-type]
    (offer(reason="why"), "malformed"),
    ("not a message", "malformed"),
]


@pytest.mark.parametrize(("msg", "reason"), BAD_MESSAGES)
def test_validate_refuses(msg: LinkMessage, reason: str) -> None:
    assert reason_of(validate, msg) == reason


# --- happy paths --------------------------------------------------------------------------------


@pytest.mark.parametrize("offerer_is_big", [True, False])
def test_offer_answer_candidates_both_roles(offerer_is_big: bool) -> None:
    big, small = machine(BIG, SMALL, 1), machine(SMALL, BIG, 2)
    offerer, answerer = (big, small) if offerer_is_big else (small, big)
    assert big.role is Role.CONTROLLING and small.role is Role.CONTROLLED
    assert offerer.state is State.IDLE and offerer.sid is None

    o = only_msg(offerer.start(0.0))
    assert (o.kind, o.seq) == (Kind.OFFER, 0)
    assert len(o.sid) == 16 and offerer.sid == o.sid and offerer.state is State.OFFERING
    assert offerer.next_deadline() == pytest.approx(10.0)
    assert offerer.start(0.5) == []  # already offering: no-op

    acts = answerer.receive(o, 1.0)
    a = only_msg(acts)
    assert (a.kind, a.sid, a.seq) == (Kind.ANSWER, o.sid, 0)
    (start_b,) = [x for x in acts if isinstance(x, StartIce)]
    assert start_b == StartIce(o.sid, answerer.role, a.ufrag, a.pwd, o.ufrag, o.pwd)
    assert answerer.state is State.CONNECTING and answerer.next_deadline() == pytest.approx(31.0)

    acts = offerer.receive(a, 1.5)
    assert acts == [StartIce(o.sid, offerer.role, o.ufrag, o.pwd, a.ufrag, a.pwd)]
    assert offerer.state is State.CONNECTING

    # trickle: the answerer's candidates, then the offerer's, seq per (sid, direction)
    c1 = only_msg(answerer.local_candidates((cand(1), cand(2)), False, 2.0))
    c2 = only_msg(answerer.local_candidates((), True, 2.1))
    assert (c1.seq, c2.seq, c2.candidates, c2.end_of_candidates) == (1, 2, (), True)
    assert offerer.receive(c1, 2.2) == [AddRemoteCandidates(o.sid, (cand(1), cand(2)), False)]
    assert offerer.receive(c2, 2.3) == [AddRemoteCandidates(o.sid, (), True)]
    c3 = only_msg(offerer.local_candidates((cand(3),), True, 2.4))
    assert c3.seq == 1 and c3.end_of_candidates
    assert answerer.receive(c3, 2.5) == [AddRemoteCandidates(o.sid, (cand(3),), True)]

    for m in (offerer, answerer):
        assert m.ice_connected(3.0) == []
        assert m.state is State.CONNECTED and m.next_deadline() is None
        assert m.ice_connected(3.1) == []  # idempotent


def test_credentials_are_fresh_random_ice_chars() -> None:
    m = machine()
    o = only_msg(m.start(0.0))
    validate(o)
    assert len(o.ufrag) == 16 and len(o.pwd) == 24
    other = only_msg(machine(seed=2).start(0.0))
    assert (o.sid, o.ufrag, o.pwd) != (other.sid, other.ufrag, other.pwd)


def test_offer_and_answer_may_carry_candidates() -> None:
    b = machine(SMALL, BIG)
    acts = b.receive(offer(candidates=(CAND,), end_of_candidates=True), 0.0)
    assert acts[-1] == AddRemoteCandidates(SID1, (CAND,), True)
    assert reason_of(b.receive, cands(SID1, 1, cand(2)), 0.1) == "state"  # after end


def test_local_candidates_are_chunked() -> None:
    a, b = machine(BIG, SMALL), machine(SMALL, BIG, 2)
    handshake(a, b)
    many = tuple(cand(i) for i in range(70))
    msgs = sent(a.local_candidates(many, True, 1.0))
    assert [len(m.candidates) for m in msgs] == [32, 32, 6]
    assert [m.seq for m in msgs] == [1, 2, 3]
    assert [m.end_of_candidates for m in msgs] == [False, False, True]
    got: list[str] = []
    for m in msgs:
        (add,) = b.receive(m, 1.1)
        got += add.candidates
    assert tuple(got) == many
    assert a.local_candidates((cand(99),), False, 1.2) == []  # after our end-of-candidates
    assert a.local_candidates((), False, 1.2) == []
    with pytest.raises(ValueError):
        a.local_candidates(("nonsense",), False, 1.3)


def test_local_candidates_capped_per_session() -> None:
    a, b = machine(BIG, SMALL), machine(SMALL, BIG, 2)
    handshake(a, b)
    msgs = sent(a.local_candidates(tuple(cand(i) for i in range(200)), False, 1.0))
    assert sum(len(m.candidates) for m in msgs) == MAX_SESSION_CANDIDATES
    for m in msgs:
        b.receive(m, 1.1)
    assert a.local_candidates((cand(300),), False, 1.2) == []


def test_candidate_limits_on_receive() -> None:
    a, b = machine(BIG, SMALL), machine(SMALL, BIG, 2)
    handshake(a, b)
    sid = a.sid
    too_many = cands(sid, 1, *(cand(i) for i in range(33)))
    assert reason_of(a.receive, too_many, 1.0) == "oversize"
    for seq in range(1, 5):
        a.receive(cands(sid, seq, *(cand(seq * 100 + i) for i in range(32))), 1.0)
    assert reason_of(a.receive, cands(sid, 5, cand(999)), 1.0) == "oversize"  # > 128 per session
    assert a.receive(cands(sid, 5, end=True), 1.0) == [AddRemoteCandidates(sid, (), True)]


# --- glare --------------------------------------------------------------------------------------


@dataclass
class Peer:
    """One LinkSignaling plus a fake ICE agent that checks the actions make sense."""

    sig: LinkSignaling
    gather: bool = True
    outbox: list[LinkMessage] = field(default_factory=list)
    ice: dict[str, StartIce] = field(default_factory=dict)  # running ICE sessions
    started: list[StartIce] = field(default_factory=list)
    remote: dict[str, list[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def apply(self, actions: list, now: float) -> None:
        for act in actions:
            assert isinstance(act, ACTIONS), act
            if isinstance(act, SendMessage):
                validate(act.msg)
                self.outbox.append(act.msg)
            elif isinstance(act, StartIce):
                assert not self.ice, f"StartIce {act.sid} while {list(self.ice)} runs"
                assert act.role is self.sig.role
                self.ice[act.sid] = act
                self.started.append(act)
                self.remote.setdefault(act.sid, [])
                if self.gather:
                    self.apply(self.sig.local_candidates((CAND,), True, now, sid=act.sid), now)
            elif isinstance(act, StopIce):
                assert act.sid in self.ice, f"StopIce {act.sid} not running"
                del self.ice[act.sid]
            else:
                assert act.sid in self.ice, "candidates for an ICE agent that does not run"
                self.remote[act.sid] += act.candidates
        assert set(self.ice) == ({self.sig.sid} if self.sig.ice_running else set())

    def deliver(self, msg: LinkMessage, now: float) -> None:
        try:
            self.apply(self.sig.receive(msg, now), now)
        except ProtocolError as exc:
            self.errors.append(exc.reason)

    def take(self) -> list[LinkMessage]:
        out, self.outbox = self.outbox, []
        return out


def pair(seed: int = 0, gather: bool = True) -> tuple[Peer, Peer]:
    return (
        Peer(machine(BIG, SMALL, seed * 2 + 1), gather),
        Peer(machine(SMALL, BIG, seed * 2 + 2), gather),
    )


def assert_linked(big: Peer, small: Peer, state: State = State.CONNECTING) -> None:
    assert big.sig.state is state and small.sig.state is state
    assert big.sig.sid == small.sig.sid
    assert set(big.ice) == set(small.ice) == {big.sig.sid}
    sa, sb = big.ice[big.sig.sid], small.ice[small.sig.sid]
    assert {sa.role, sb.role} == {Role.CONTROLLING, Role.CONTROLLED}
    assert (sa.local_ufrag, sa.local_pwd) == (sb.remote_ufrag, sb.remote_pwd)
    assert (sb.local_ufrag, sb.local_pwd) == (sa.remote_ufrag, sa.remote_pwd)


@pytest.mark.parametrize("first", ["big", "small"])
def test_glare_greater_id_wins(first: str) -> None:
    big, small = pair()
    big.apply(big.sig.start(0.0), 0.0)
    small.apply(small.sig.start(0.0), 0.0)
    (offer_big,), (offer_small,) = big.take(), small.take()
    if first == "big":  # the winner hears the loser's offer first
        assert big.sig.receive(offer_small, 0.1) == []
        small.deliver(offer_big, 0.1)
    else:
        small.deliver(offer_big, 0.1)
        assert big.sig.receive(offer_small, 0.1) == []
    assert small.sig.sid == offer_big.sid
    (ans, small_cands) = small.take()
    assert ans.kind is Kind.ANSWER and ans.sid == offer_big.sid
    big.deliver(ans, 0.2)
    big.deliver(small_cands, 0.2)
    for msg in big.take():
        small.deliver(msg, 0.3)
    assert not big.errors and not small.errors
    assert_linked(big, small)
    assert big.remote[big.sig.sid] == [CAND] and small.remote[small.sig.sid] == [CAND]
    # the loser's abandoned offer is stale everywhere now
    assert reason_of(big.sig.receive, offer_small, 0.4) == "stale"


def test_glare_offer_seen_late_is_taken_for_a_restart_and_loser_follows() -> None:
    """Reordering: the winner gets the loser's answer before the loser's (older) offer. It takes
    the offer for a restart and answers it; the loser then follows to its own old session."""
    big, small = pair(gather=False)
    big.apply(big.sig.start(0.0), 0.0)
    small.apply(small.sig.start(0.0), 0.0)
    (offer_big,), (offer_small,) = big.take(), small.take()
    small.deliver(offer_big, 0.1)
    (ans,) = small.take()
    big.deliver(ans, 0.2)  # CONNECTING on the winner's sid
    big.deliver(offer_small, 0.3)  # the delayed glare offer: a "restart"
    assert big.sig.sid == offer_small.sid and big.sig.state is State.CONNECTING
    (ans2,) = big.take()
    assert ans2.kind is Kind.ANSWER and ans2.sid == offer_small.sid
    small.deliver(ans2, 0.4)
    assert not big.errors and not small.errors
    assert_linked(big, small)


# --- restart, stale, sequence -------------------------------------------------------------------


def test_peer_restart_and_stale_replays() -> None:
    big, small = pair()
    big.apply(big.sig.start(0.0), 0.0)
    for msg in big.take():
        small.deliver(msg, 0.1)
    old = small.take()  # answer + candidates on the first session
    for msg in old:
        big.deliver(msg, 0.2)
    for msg in big.take():
        small.deliver(msg, 0.2)
    big.sig.ice_connected(1.0)
    small.sig.ice_connected(1.0)
    old_sid = big.sig.sid

    # small restarts: a new process, no memory; it offers a new session
    small2 = Peer(machine(SMALL, BIG, 77))
    small2.apply(small2.sig.start(5.0), 5.0)
    (new_offer,) = small2.take()
    acts = big.sig.receive(new_offer, 5.1)
    assert acts[0] == StopIce(old_sid, "peer-restarted")
    assert isinstance(acts[1], SendMessage) and acts[1].msg.kind is Kind.ANSWER
    assert isinstance(acts[2], StartIce) and acts[2].sid == new_offer.sid
    big.apply(acts, 5.1)
    for msg in big.take():
        small2.deliver(msg, 5.2)
    for msg in small2.take():
        big.deliver(msg, 5.3)
    assert_linked(big, small2)

    # the old process's messages, replayed or delayed, are stale
    assert reason_of(big.sig.receive, replace(new_offer), 6.0) == "stale"  # the same offer again
    assert reason_of(big.sig.receive, old[0], 6.0) == "stale"  # answer of the old session
    assert reason_of(big.sig.receive, old[1], 6.0) == "stale"  # candidates of the old session
    end_old = LinkMessage(Kind.END, old_sid, 9)
    assert reason_of(big.sig.receive, end_old, 6.0) == "stale"
    assert reason_of(big.sig.receive, offer(old_sid, 5), 6.0) == "stale"
    assert big.sig.sid == new_offer.sid and big.sig.state is State.CONNECTING


def test_offer_replay_after_our_restart_is_not_stale_but_a_new_session() -> None:
    """A replayed offer only looks fresh to a machine that forgot the sid (restart, or memory
    evicted): the bound is documented, not hidden."""
    b = machine(SMALL, BIG)
    b.receive(offer(SID1), 0.0)
    assert reason_of(b.receive, offer(SID1), 0.1) == "stale"
    fresh = machine(SMALL, BIG)
    assert fresh.receive(offer(SID1), 0.2)


def test_sequence_must_strictly_increase_and_refusals_consume_nothing() -> None:
    a, b = machine(BIG, SMALL), machine(SMALL, BIG, 2)
    handshake(a, b)
    sid = a.sid
    assert a.receive(cands(sid, 3, cand(1)), 1.0)
    assert reason_of(a.receive, cands(sid, 3, cand(2)), 1.1) == "sequence"  # duplicate
    assert reason_of(a.receive, cands(sid, 2, cand(2)), 1.1) == "sequence"  # regression
    assert reason_of(a.receive, answer(sid, 0), 1.1) == "sequence"
    assert reason_of(a.receive, answer(sid, 9), 1.1) == "state"  # second answer
    assert a.receive(cands(sid, 4, cand(2)), 1.2)  # seq 9 was not consumed by the refusal
    assert a.receive(cands(sid, 1000, cand(3)), 1.3)  # gaps are fine


def test_candidates_before_the_answer_are_refused_without_consuming_seq() -> None:
    a = machine(BIG, SMALL)
    sid = only_msg(a.start(0.0)).sid
    assert reason_of(a.receive, cands(sid, 1, CAND), 0.1) == "state"
    assert [type(x) for x in a.receive(answer(sid, 0), 0.2)] == [StartIce]


@pytest.mark.parametrize("kind", [Kind.ANSWER, Kind.CANDIDATES, Kind.END])
def test_messages_for_unknown_sessions_are_stale(kind: Kind) -> None:
    a = machine(BIG, SMALL)
    fields = {Kind.ANSWER: {"ufrag": UFRAG, "pwd": PWD}, Kind.CANDIDATES: {"candidates": (CAND,)}}
    msg = LinkMessage(kind, SID2, 1, **fields.get(kind, {}))
    assert reason_of(a.receive, msg, 0.0) == "stale"  # IDLE, no session at all
    a.start(0.0)
    assert reason_of(a.receive, msg, 0.1) == "stale"
    assert a.state is State.OFFERING


def test_closed_accepts_nothing() -> None:
    a = machine(BIG, SMALL)
    a.receive(LinkMessage(Kind.BYE, SID2, 0), 0.0)
    assert a.state is State.CLOSED
    for msg in (offer(SID1), LinkMessage(Kind.BYE, "00000000000000aa", 0)):
        assert reason_of(a.receive, msg, 0.1) == "state"


# --- failure, backoff, timers -------------------------------------------------------------------


def test_end_backoff_then_new_sid_with_fresh_credentials() -> None:
    big, small = pair()
    big.apply(big.sig.start(0.0), 0.0)
    for msg in big.take():
        small.deliver(msg, 0.0)
    for msg in small.take():
        big.deliver(msg, 0.0)
    big.take()
    first = big.started[-1]

    acts = small.sig.ice_failed("consent lost", 10.0)
    assert acts[0] == StopIce(first.sid, "consent lost")
    end = only_msg(acts)
    assert (end.kind, end.sid, end.reason) == (Kind.END, first.sid, "consent lost")
    small.apply(acts, 10.0)
    small.take()
    assert small.sig.state is State.WAITING
    assert small.sig.next_deadline() == pytest.approx(12.0)  # smaller id: 2 x 1 s

    assert big.sig.receive(end, 10.1) == [StopIce(first.sid, "peer-ended")]
    big.ice.clear()
    assert big.sig.state is State.WAITING
    assert big.sig.next_deadline() == pytest.approx(11.1)  # greater id: 1 s
    assert big.sig.handle_timer(11.0) == []

    big.apply(big.sig.handle_timer(11.1), 11.1)
    (new,) = big.take()
    assert new.kind is Kind.OFFER and new.sid != first.sid and new.seq == 0
    assert (new.ufrag, new.pwd) != (first.local_ufrag, first.local_pwd)
    small.deliver(new, 11.2)
    for msg in small.take():
        big.deliver(msg, 11.3)
    for msg in big.take():
        small.deliver(msg, 11.3)
    assert_linked(big, small)
    assert small.sig.next_deadline() == pytest.approx(11.2 + 30.0)  # connect timer, not retry
    assert (new.ufrag, new.pwd) == (small.ice[new.sid].remote_ufrag, small.ice[new.sid].remote_pwd)

    # a second failure backs off longer; connecting resets it
    small.apply(small.sig.ice_failed("again", 20.0), 20.0)
    assert small.sig.next_deadline() == pytest.approx(24.0)  # 2 x 2 s
    assert small.sig.backoff_attempts == 2


def test_smaller_id_re_offers_itself_when_the_greater_stays_silent() -> None:
    a, b = machine(BIG, SMALL), machine(SMALL, BIG, 2)
    handshake(a, b)
    b.ice_failed("x", 5.0)
    assert b.handle_timer(6.9) == []
    o = only_msg(b.handle_timer(7.0))
    assert o.kind is Kind.OFFER and b.state is State.OFFERING


def test_crossing_ends_are_harmless() -> None:
    a, b = machine(BIG, SMALL), machine(SMALL, BIG, 2)
    handshake(a, b)
    end_a, end_b = only_msg(a.ice_failed("x", 5.0)), only_msg(b.ice_failed("y", 5.0))
    assert a.receive(end_b, 5.1) == [] and b.receive(end_a, 5.1) == []
    assert a.state is b.state is State.WAITING
    late = cands(a.sid, 7, CAND)
    assert a.receive(late, 5.2) == []  # in-flight candidates of the ended session


def test_offer_timeout_retries_with_backoff_and_takes_a_late_answer() -> None:
    a = machine(BIG, SMALL)
    first = only_msg(a.start(0.0))
    assert a.handle_timer(9.99) == [] and a.state is State.OFFERING
    assert a.handle_timer(10.0) == [] and a.state is State.WAITING
    assert a.next_deadline() == pytest.approx(11.0)
    # the answer arrives during the backoff: still welcome
    acts = a.receive(answer(first.sid, 0), 10.5)
    assert [type(x) for x in acts] == [StartIce] and a.state is State.CONNECTING

    b = machine(BIG, SMALL, 5)
    first = only_msg(b.start(0.0))
    b.handle_timer(10.0)
    retry = only_msg(b.handle_timer(11.0))
    assert retry.kind is Kind.OFFER and retry.sid != first.sid and retry.ufrag != first.ufrag
    assert b.next_deadline() == pytest.approx(21.0)
    assert reason_of(b.receive, answer(first.sid, 0), 11.5) == "stale"  # superseded
    b.handle_timer(21.0)
    assert b.next_deadline() == pytest.approx(23.0)  # 2 s: exponential


def test_end_for_a_timed_out_offer_cancels_the_late_answer() -> None:
    a = machine(BIG, SMALL)
    sid = only_msg(a.start(0.0)).sid
    a.handle_timer(10.0)
    assert a.receive(LinkMessage(Kind.END, sid, 1), 10.5) == []
    assert reason_of(a.receive, answer(sid, 2), 10.6) == "state"
    assert a.state is State.WAITING and only_msg(a.handle_timer(11.0)).kind is Kind.OFFER


def test_end_from_the_peer_while_offering() -> None:
    a = machine(BIG, SMALL)
    sid = only_msg(a.start(0.0)).sid
    assert a.receive(LinkMessage(Kind.END, sid, 1), 1.0) == []
    assert a.state is State.WAITING
    assert reason_of(a.receive, answer(sid, 2), 1.1) == "state"  # no late answer after its end


def test_connect_timeout_is_an_ice_failure() -> None:
    a, b = machine(BIG, SMALL), machine(SMALL, BIG, 2)
    handshake(a, b, now=0.0)
    sid = a.sid
    assert a.handle_timer(29.9) == []
    acts = a.handle_timer(30.0)
    assert acts[0] == StopIce(sid, "connect-timeout")
    assert only_msg(acts) == LinkMessage(Kind.END, sid, 1, reason="connect-timeout")
    assert a.state is State.WAITING and a.next_deadline() == pytest.approx(31.0)


def test_connected_has_no_timer_and_resets_backoff() -> None:
    a, b = machine(BIG, SMALL), machine(SMALL, BIG, 2)
    handshake(a, b)
    a.ice_failed("x", 1.0)
    assert a.backoff_attempts == 1
    o = only_msg(a.handle_timer(2.0))
    acts = b.receive(o, 2.1)  # b never heard the end: the new offer is a restart
    assert isinstance(acts[0], StopIce)
    a.receive(only_msg(acts), 2.2)
    assert a.ice_connected(3.0) == []
    assert a.state is State.CONNECTED and a.next_deadline() is None
    assert a.backoff_attempts == 0
    assert a.handle_timer(1e6) == []


def test_stale_local_events_are_ignored() -> None:
    a, b = machine(BIG, SMALL), machine(SMALL, BIG, 2)
    handshake(a, b)
    old = a.sid
    assert a.ice_connected(1.0, sid="ffffffffffffffff") == [] and a.state is State.CONNECTING
    assert a.ice_failed("x", 1.0, sid="ffffffffffffffff") == []
    assert a.local_candidates((CAND,), True, 1.0, sid="ffffffffffffffff") == []
    a.ice_failed("x", 2.0)
    assert a.ice_connected(2.1, sid=old) == [] and a.state is State.WAITING
    assert a.ice_failed("x", 2.1) == [] and a.local_candidates((CAND,), True, 2.1) == []
    assert machine().ice_failed("x", 0.0) == [] and machine().handle_timer(1e9) == []


# --- bye ----------------------------------------------------------------------------------------


def test_bye_closes_both_sides() -> None:
    a, b = machine(BIG, SMALL), machine(SMALL, BIG, 2)
    handshake(a, b)
    sid = a.sid
    acts = a.close(5.0, "left group")
    assert acts[0] == StopIce(sid, "left group")
    bye = only_msg(acts)
    assert bye.kind is Kind.BYE and bye.reason == "left group" and bye.sid != sid
    assert a.state is State.CLOSED and a.next_deadline() is None and a.close(5.1) == []
    assert b.receive(bye, 5.2) == [StopIce(sid, "peer-left")]
    assert b.state is State.CLOSED and b.next_deadline() is None
    assert reason_of(b.receive, bye, 5.3) == "stale"  # a replayed bye
    # re-opening is explicit
    o = only_msg(a.start(6.0))
    assert a.state is State.OFFERING and o.sid not in (sid, bye.sid)


def test_bye_without_session_and_on_current_sid() -> None:
    a = machine(BIG, SMALL)
    (bye,) = sent(a.close(0.0))
    assert bye.kind is Kind.BYE and bye.reason == "bye"
    b = machine(SMALL, BIG, 2)
    sid = b.receive(offer(SID1), 0.0)[0].msg.sid
    assert b.receive(LinkMessage(Kind.BYE, sid, 1), 0.1) == [StopIce(SID1, "peer-left")]


def test_close_while_offering_and_waiting_stops_no_ice() -> None:
    a = machine(BIG, SMALL)
    a.start(0.0)
    assert [type(x) for x in a.close(0.1)] == [SendMessage]
    b, c = machine(BIG, SMALL), machine(SMALL, BIG, 2)
    handshake(b, c)
    b.ice_failed("x", 1.0)
    assert [type(x) for x in b.close(1.1)] == [SendMessage]


# --- memory of session ids ----------------------------------------------------------------------


def test_seen_sid_memory_is_bounded() -> None:
    b = machine(SMALL, BIG)
    sids = [f"{i:016x}" for i in range(1, 201)]
    for i, sid in enumerate(sids):
        b.receive(offer(sid), float(i))  # each is a restart: accepted
    assert b.seen_count == SEEN_SIDS
    assert all(b.seen(s) for s in sids[-SEEN_SIDS:])
    assert not b.seen(sids[0])
    for sid in sids[-SEEN_SIDS:]:
        assert reason_of(b.receive, offer(sid), 500.0) == "stale"
    small = machine(SMALL, BIG, seen_sids=4)
    for i, sid in enumerate(sids[:10]):
        small.receive(offer(sid), float(i))
    assert small.seen_count == 4


def test_glare_winner_remembers_loser_sids_but_not_beyond_the_bound() -> None:
    a = machine(BIG, SMALL)
    own = only_msg(a.start(0.0)).sid
    for i in range(3 * SEEN_SIDS):
        assert a.receive(offer(f"{i + 1:016x}"), 0.1) == []
    assert a.seen_count == SEEN_SIDS
    assert reason_of(a.receive, offer(own), 0.2) == "stale"  # our own sid is always known
    assert a.receive(answer(own, 0), 0.3)  # and our session is intact


# --- constructor and helpers --------------------------------------------------------------------


def test_constructor_checks() -> None:
    with pytest.raises(ValueError):
        LinkSignaling(BIG, BIG, rng=rng_of(1))
    with pytest.raises(ValueError):
        LinkSignaling("", BIG, rng=rng_of(1))
    with pytest.raises(ValueError):
        LinkSignaling(BIG, SMALL, rng=rng_of(1), offer_timeout=0)
    with pytest.raises(ValueError):
        LinkSignaling(BIG, SMALL, rng=lambda n: b"\x00").start(0.0)  # short rng
    stuck = LinkSignaling(BIG, SMALL, rng=lambda n: bytes(n))
    stuck.start(0.0)
    with pytest.raises(ValueError):
        stuck.close(0.0)  # the rng keeps repeating session ids


def test_default_jitter_comes_from_rng() -> None:
    delays = set()
    for seed in range(5):
        a, b = machine(BIG, SMALL, seed, jitter_rand=None), machine(SMALL, BIG, 50 + seed)
        handshake(a, b)
        a.ice_failed("x", 0.0)
        d = a.next_deadline()
        assert 0.8 <= d <= 1.2
        delays.add(d)
    assert len(delays) > 1


def test_coalesce_candidates() -> None:
    q = [
        offer(SID1),
        cands(SID1, 1, cand(1)),
        cands(SID1, 2, cand(2), cand(3)),
        cands(SID2, 3, cand(4)),
        cands(SID2, 5, *(cand(i) for i in range(10, 41))),  # 31: would make 32 with the one before
        cands(SID2, 6, cand(50)),
        cands(SID2, 7, end=True),
        LinkMessage(Kind.END, SID2, 8),
        cands(SID2, 9, cand(60)),
    ]
    out = coalesce_candidates(q)
    assert [(m.kind, m.sid, m.seq, len(m.candidates)) for m in out] == [
        (Kind.OFFER, SID1, 0, 0),
        (Kind.CANDIDATES, SID1, 2, 3),
        (Kind.CANDIDATES, SID2, 5, 32),
        (Kind.CANDIDATES, SID2, 7, 1),
        (Kind.END, SID2, 8, 0),
        (Kind.CANDIDATES, SID2, 9, 1),
    ]
    assert out[3].end_of_candidates and not out[2].end_of_candidates
    for m in out:
        validate(m)
    # a receiver accepts the coalesced stream
    b = machine(BIG, SMALL)
    b.start(0.0)
    sid = b.sid
    stream = [cands(sid, i, cand(i)) for i in range(1, 40)]
    b.receive(answer(sid, 0), 0.0)
    got = []
    for m in coalesce_candidates(stream):
        got += b.receive(m, 0.1)[0].candidates
    assert got == [cand(i) for i in range(1, 40)]


# --- Pacer --------------------------------------------------------------------------------------


def test_pacer_basics() -> None:
    p = Pacer(1000, 3000)
    assert p.delay(3000, 0.0) == 0
    p.commit(3000, 0.0)
    assert p.delay(500, 0.0) == pytest.approx(0.5)
    assert p.delay(500, 0.25) == pytest.approx(0.25)
    assert p.delay(500, 0.5) == 0
    p.commit(500, 0.5)
    assert p.tokens(100.0) == 3000  # refills up to the burst only
    assert p.delay(10_000, 100.0) == 0  # bigger than the burst: goes when the bucket is full
    p.commit(10_000, 100.0)
    assert p.delay(1, 100.0) == pytest.approx(7.001)
    assert p.delay(1, 99.0) == pytest.approx(7.001)  # time going back changes nothing
    with pytest.raises(ValueError):
        Pacer(0, 1)
    with pytest.raises(ValueError):
        p.delay(-1, 0)


def test_pacer_defaults_fit_prosody_mod_limits() -> None:
    p = Pacer()
    assert p.rate <= 10_000 and p.burst <= 2 * 10_000  # mod_limits "10kb/s", burst "2s"


@pytest.mark.parametrize(("rate", "burst"), [(1250, 4000), (sigmod.PACER_RATE, sigmod.PACER_BURST)])
def test_pacer_keeps_twenty_peers_offers_under_the_rate(rate: float, burst: float) -> None:
    # 20 peers appear at once: for each an offer stanza and two candidate stanzas
    rnd = random.Random(4)
    sizes = []
    for _ in range(20):
        sizes += [rnd.randint(280, 420), rnd.randint(300, 900), rnd.randint(120, 300)]
    p = Pacer(rate, burst)
    now, log = 0.0, []
    for size in sizes:
        wait = p.delay(size, now)
        assert wait >= 0
        now += wait
        assert p.delay(size, now) < 1e-9
        p.commit(size, now)
        log.append((now, size))
    total = sum(sizes)
    # every prefix stays under burst + rate * t, and the average rate after the burst is <= rate
    sent_bytes = 0
    for t, size in log:
        sent_bytes += size
        assert sent_bytes <= burst + rate * t + 1e-6
    duration = log[-1][0]
    assert duration >= (total - burst) / rate - 1e-6
    assert (total - burst) / duration <= rate * (1 + 1e-9)
    # and it is not needlessly slow: it finishes as soon as the bucket allows
    assert duration <= (total - burst) / rate + max(sizes) / rate + 1e-6


# --- purity -------------------------------------------------------------------------------------

IO_LIBRARIES = {"asyncio", "socket", "slixmpp", "aioice", "pyroute2", "aiohttp", "pytun",
                "selectors", "ssl"}


def test_module_imports_no_io_library() -> None:
    path = Path(sigmod.__file__)
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert not names & IO_LIBRARIES
    script = "import sys, socialvpn.xmpp.signal; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert not {m.split(".")[0] for m in out.split()} & IO_LIBRARIES


def test_transition_table_covers_closed_as_illegal() -> None:
    table = LinkSignaling._TRANSITIONS
    assert not any(state is State.CLOSED for state, _ in table)
    assert all((s, Kind.BYE) in table for s in State if s is not State.CLOSED)
    assert all((s, Kind.OFFER) in table for s in State if s is not State.CLOSED)


# --- properties ---------------------------------------------------------------------------------


def snapshot(m: LinkSignaling) -> tuple:
    s, p = m._session, m._pending
    return (m.state, m.next_deadline(), m.sid, vars(s).copy() if s else None,
            vars(p).copy() if p else None, list(m._seen), m.backoff_attempts)


BAD_CANDIDATE_TEXTS = [text for text, _ in BAD_CANDIDATES]


def random_message(rnd: random.Random, sids: list[str]) -> LinkMessage:
    """Mostly well-shaped messages on sids the machine knows, with hostile variants mixed in."""
    kind = rnd.choice([*Kind, *Kind, "bogus"])
    sid = rnd.choice(sids) if rnd.random() < 0.9 else rnd.choice(["", "XYZ", SID1.upper(), 7])
    seq = rnd.randint(0, 8) if rnd.random() < 0.9 else rnd.choice([-1, 2**31, True])
    good_creds = (kind in (Kind.OFFER, Kind.ANSWER)) != (rnd.random() < 0.1)
    ufrag = rnd.choice(["abcd", "x" * 32] if good_creds else ["", "abc", "ab:d", "u" * 33])
    pwd = rnd.choice([PWD, "p" * 256] if good_creds else ["", "p" * 21, "p" * 257])
    pool = GOOD_CANDIDATES * 4 + [c for c in BAD_CANDIDATE_TEXTS if isinstance(c, str)]
    candidates = tuple(rnd.choice(pool) for _ in range(rnd.choice([0, 0, 1, 2, 3])))
    if rnd.random() < 0.05:
        candidates = tuple(cand(i) for i in range(MAX_CANDIDATES + rnd.randint(-2, 2)))
    if rnd.random() < 0.02:
        candidates = [CAND]  # type: ignore[assignment]
    end = rnd.random() < 0.5
    reason = rnd.choice(["", "", "", "ice-failed", "bad\x00", "r" * 65])
    features = rnd.choice([(), (), (CSUM_PARTIAL,), ("x-new", CSUM_PARTIAL), ("Bad",), ("f",) * 2,
                           tuple(f"f{i}" for i in range(MAX_FEATURES + 1)), [CSUM_PARTIAL]])
    return LinkMessage(kind, sid, seq, ufrag, pwd, candidates, end, reason,  # type: ignore[arg-type]
                       features)  # type: ignore[arg-type]


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), big=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_random_input_only_yields_actions_or_protocol_error(data, big: bool, seed: int) -> None:
    local, remote = (BIG, SMALL) if big else (SMALL, BIG)
    peer = Peer(machine(local, remote, seed, seen_sids=8), gather=False)
    m = peer.sig
    history: list[str] = [SID1, SID2]
    last_sent: dict[str, int] = {}
    now = 0.0
    for _ in range(data.draw(st.integers(1, 30))):
        op = data.draw(st.sampled_from(
            ["recv"] * 8 + ["start", "cands", "connected", "failed", "close", "timer", "wait"]))
        before = snapshot(m)
        if op == "recv":
            sids = [s for s in (m.sid, m._pending.sid if m._pending else None) if s]
            msg = random_message(random.Random(data.draw(st.integers(0, 2**32))),
                                 sids + history[-6:])
            try:
                actions = m.receive(msg, now)
            except ProtocolError as exc:
                assert exc.reason in {"malformed", "oversize", "stale", "sequence", "state"}
                assert snapshot(m) == before, "a refused message changed the machine"
                continue
        elif op == "start":
            actions = m.start(now)
        elif op == "cands":
            n = data.draw(st.integers(0, 40))
            actions = m.local_candidates(tuple(cand(i) for i in range(n)), data.draw(st.booleans()),
                                         now, sid=data.draw(st.sampled_from([None, m.sid, SID2])))
        elif op == "connected":
            actions = m.ice_connected(now, sid=data.draw(st.sampled_from([None, m.sid, SID2])))
        elif op == "failed":
            actions = m.ice_failed(data.draw(st.sampled_from(["x", "é\n" * 50])), now)
        elif op == "close":
            actions = m.close(now)
        elif op == "timer":
            deadline = m.next_deadline()
            now = max(now, deadline if deadline is not None else now)
            actions = m.handle_timer(now)
        else:
            now += data.draw(st.floats(0, 100))
            actions = m.handle_timer(now)
        assert isinstance(actions, list)
        peer.apply(actions, now)  # checks action types, ICE start/stop pairing, SendMessage shape
        for msg in peer.take():
            assert msg.seq > last_sent.get(msg.sid, -1), "our own seq went backwards"
            last_sent[msg.sid] = msg.seq
            history.append(msg.sid)
        assert m.state in State
        assert (m.next_deadline() is None) == (m.state in (State.IDLE, State.CONNECTED,
                                                           State.CLOSED))
        assert m.seen_count <= 8


def exchange(data, mode: str, starters: str, seed: int) -> tuple[Peer, Peer]:
    """Run two honest peers without timers until nothing is in flight. ``mode`` "fifo": each
    direction in order (XMPP), directions interleaved at random; "any": any message in flight
    may be delivered next."""
    big, small = pair(seed)
    peers = {"big": big, "small": small}
    inflight: dict[str, list[LinkMessage]] = {"big": [], "small": []}  # to that peer
    to_start = [n for n in ("big", "small") if starters in (n, "both")]
    now = 0.0
    while True:
        inflight["small"] += big.take()
        inflight["big"] += small.take()
        options = [("start", n) for n in to_start] + [("deliver", n) for n in peers if inflight[n]]
        if not options:
            return big, small
        op, name = data.draw(st.sampled_from(options))
        now += 0.01
        if op == "start":
            to_start.remove(name)
            peers[name].apply(peers[name].sig.start(now), now)
        else:
            queue = inflight[name]
            index = 0 if mode == "fifo" else data.draw(st.integers(0, len(queue) - 1))
            peers[name].deliver(queue.pop(index), now)


@settings(max_examples=2000, deadline=None)
@given(data=st.data(), starters=st.sampled_from(["big", "small", "both", "both"]),
       seed=st.integers(0, 2**20))
def test_two_honest_peers_in_order_converge_without_errors(data, starters: str, seed: int) -> None:
    big, small = exchange(data, "fifo", starters, seed)
    assert not big.errors and not small.errors
    assert_linked(big, small)


@settings(max_examples=2000, deadline=None)
@given(data=st.data(), starters=st.sampled_from(["big", "small", "both", "both"]),
       seed=st.integers(0, 2**20))
def test_two_honest_peers_reordered_converge(data, starters: str, seed: int) -> None:
    big, small = exchange(data, "any", starters, seed)
    assert set(big.errors + small.errors) <= {"stale", "sequence", "state"}
    assert_linked(big, small)


@dataclass(order=True)
class _Event:
    time: float
    order: int
    what: str = field(compare=False)
    args: tuple = field(compare=False, default=())


def simulate(
    seed: int, loss: float, lossy_until: float, end: float, fail_p: float = 0.0,
    restart: tuple[int, float] | None = None,
) -> tuple[Peer, Peer, float]:
    """Two honest peers with timers, a fake ICE (connects when both run the same session with
    matching credentials, consent fails 5 s after the other side stopped), per-direction FIFO
    delivery with 10 ms..2 s latency. Until ``lossy_until``: messages are lost with probability
    ``loss`` and ICE fails on one side with probability ``fail_p``. ``restart=(i, t)`` replaces
    peer i by a fresh process (no memory, its ICE gone) at time t, which then starts. Returns the
    peers and when they last became CONNECTED on one sid (-1: not now)."""
    rnd = random.Random(seed)
    peers = list(pair(seed % 100_000))
    events: list[_Event] = []
    counter = iter(range(10**9))
    last_arrival = [0.0, 0.0]
    timer_at: list[float | None] = [None, None]
    ice_scheduled: set[str] = set()
    linked_at = -1.0

    def push(t: float, what: str, *args: object) -> None:
        heapq.heappush(events, _Event(t, next(counter), what, args))

    def settle(i: int, now: float) -> None:
        nonlocal linked_at
        for msg in peers[i].take():
            if now < lossy_until and rnd.random() < loss:
                continue
            t = max(now + rnd.uniform(0.01, 2.0), last_arrival[1 - i])
            last_arrival[1 - i] = t
            push(t, "deliver", 1 - i, msg)
        deadline = peers[i].sig.next_deadline()
        if deadline is not None and deadline != timer_at[i]:
            timer_at[i] = deadline
            push(deadline, "timer", i)
        both = set(peers[0].ice) & set(peers[1].ice)
        for sid in both - ice_scheduled:
            a, b = peers[0].ice[sid], peers[1].ice[sid]
            assert (a.local_ufrag, a.local_pwd) == (b.remote_ufrag, b.remote_pwd)
            assert (b.local_ufrag, b.local_pwd) == (a.remote_ufrag, a.remote_pwd)
            ice_scheduled.add(sid)
            push(now + rnd.uniform(0.1, 3.0), "ice_ok", sid)
        for j in (0, 1):
            sig = peers[j].sig
            if sig.state is State.CONNECTED and sig.sid not in peers[1 - j].ice:
                push(now + 5.0, "consent", j, sig.sid)
        if (peers[0].sig.state is peers[1].sig.state is State.CONNECTED
                and peers[0].sig.sid == peers[1].sig.sid and linked_at < 0):
            linked_at = now
        if peers[0].sig.state is not State.CONNECTED or peers[1].sig.state is not State.CONNECTED:
            linked_at = -1.0

    for i in (0, 1):
        push(rnd.uniform(0, 5), "start", i)
    if restart is not None:
        push(restart[1], "restart", restart[0])
    while events and events[0].time <= end:
        ev = heapq.heappop(events)
        now = ev.time
        touched = (0, 1)
        if ev.what == "start":
            peers[ev.args[0]].apply(peers[ev.args[0]].sig.start(now), now)
        elif ev.what == "deliver":
            peers[ev.args[0]].deliver(ev.args[1], now)
        elif ev.what == "timer":
            i = ev.args[0]
            if timer_at[i] == now:
                timer_at[i] = None
            peers[i].apply(peers[i].sig.handle_timer(now), now)
        elif ev.what == "restart":
            i = ev.args[0]
            local, remote = (BIG, SMALL) if i == 0 else (SMALL, BIG)
            peers[i] = Peer(machine(local, remote, seed + 7))
            timer_at[i] = None
            peers[i].apply(peers[i].sig.start(now), now)
        elif ev.what == "ice_ok":
            sid = ev.args[0]
            if now < lossy_until and rnd.random() < fail_p:
                j = rnd.randint(0, 1)
                if sid in peers[j].ice:
                    peers[j].apply(peers[j].sig.ice_failed("flaky", now, sid=sid), now)
            elif all(sid in p.ice for p in peers):
                for p in peers:
                    p.apply(p.sig.ice_connected(now, sid=sid), now)
        elif ev.what == "consent":
            j, sid = ev.args
            if sid in peers[j].ice and sid not in peers[1 - j].ice:
                peers[j].apply(peers[j].sig.ice_failed("consent", now, sid=sid), now)
        for i in touched:
            settle(i, now)
    return peers[0], peers[1], linked_at


@settings(max_examples=500, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), loss=st.sampled_from([0.0, 0.1, 0.3, 0.6]),
       lossy_until=st.floats(0, 60), fail_p=st.sampled_from([0.0, 0.3, 0.8]),
       restart=st.none() | st.tuples(st.integers(0, 1), st.floats(0, 60)))
def test_liveness_with_timers_loss_restarts_and_ice_failures(
    seed: int, loss: float, lossy_until: float, fail_p: float, restart: tuple[int, float] | None
) -> None:
    if restart is not None:
        lossy_until = max(lossy_until, restart[1])
    end = lossy_until + 600.0
    big, small, linked_at = simulate(seed, loss, lossy_until, end, fail_p, restart)
    assert big.sig.state is State.CONNECTED and small.sig.state is State.CONNECTED
    assert big.sig.sid == small.sig.sid and linked_at >= 0
    assert_linked(big, small, State.CONNECTED)
    assert set(big.errors + small.errors) <= {"stale", "state", "sequence"}


def test_liveness_without_loss_is_fast() -> None:
    worst = 0.0
    for seed in range(200):
        big, small, linked_at = simulate(seed, 0.0, 0.0, 120.0)
        assert_linked(big, small, State.CONNECTED)
        worst = max(worst, linked_at)
    assert worst < 15.0, worst


def test_reoffer_after_lost_signalling_offers_a_fresh_session_at_once() -> None:
    """An offer sent while the server (or the peer) was away went nowhere: on sign-in (or when
    the peer comes online) the machine offers again at once, backoff reset."""
    a = machine(BIG, SMALL)
    lost = only_msg(a.start(0.0))  # never delivered
    again = only_msg(a.reoffer(1.0))
    assert again.kind is Kind.OFFER and again.sid != lost.sid and a.state is State.OFFERING
    assert a.next_deadline() == pytest.approx(11.0)
    assert reason_of(a.receive, answer(lost.sid, 0), 1.5) == "stale"
    # from WAITING after several failed attempts: at once, and the backoff starts over
    for t in (11.0, 12.0, 22.0, 24.0, 34.0):
        a.handle_timer(t)
    assert a.state is State.WAITING and a.backoff_attempts >= 2
    assert only_msg(a.reoffer(35.0)).kind is Kind.OFFER and a.backoff_attempts == 0
    # a link that is up or coming up is left alone; so are IDLE and CLOSED machines
    b, c = machine(BIG, SMALL, 3), machine(SMALL, BIG, 4)
    handshake(b, c)
    assert b.reoffer(1.0) == [] and c.reoffer(1.0) == [] and b.state is State.CONNECTING
    b.ice_connected(2.0)
    assert b.reoffer(3.0) == [] and b.state is State.CONNECTED
    assert machine().reoffer(0.0) == []
    d = machine(BIG, SMALL, 5)
    d.close(0.0)
    assert d.reoffer(1.0) == [] and d.state is State.CLOSED


# --- features (partial checksums between our own peers) -----------------------------------------


def test_features_are_offered_answered_and_agreed_per_session() -> None:
    a = machine(BIG, SMALL, 1, features=[CSUM_PARTIAL])
    b = machine(SMALL, BIG, 2, features=(CSUM_PARTIAL,))
    assert a.features == (CSUM_PARTIAL,) and a.remote_features == frozenset()
    offer_msg = only_msg(a.start(0.0))
    assert offer_msg.features == (CSUM_PARTIAL,)
    assert a.agreed_features == frozenset()  # no answer yet
    b_actions = b.receive(offer_msg, 0.1)
    answer_msg = only_msg(b_actions)
    assert answer_msg.kind is Kind.ANSWER and answer_msg.features == (CSUM_PARTIAL,)
    (b_start,) = [x for x in b_actions if isinstance(x, StartIce)]
    assert b_start.features == {CSUM_PARTIAL} and b.agreed_features == {CSUM_PARTIAL}
    assert b.remote_features == {CSUM_PARTIAL}
    (a_start,) = [x for x in a.receive(answer_msg, 0.2) if isinstance(x, StartIce)]
    assert a_start.features == {CSUM_PARTIAL} and a.remote_features == {CSUM_PARTIAL}
    # other kinds never carry features
    assert all(not m.features for m in sent(a.local_candidates((CAND,), True, 0.3)))


@pytest.mark.parametrize("side", ["offerer", "answerer"])
def test_a_peer_without_features_gets_none(side: str) -> None:
    """An older build sends no features (and ignores ours): the session agrees on nothing."""
    ours = machine(BIG, SMALL, 1, features=(CSUM_PARTIAL,))
    if side == "offerer":
        assert only_msg(ours.start(0.0)).features == (CSUM_PARTIAL,)
        actions = ours.receive(answer(ours.sid, 0), 0.1)
    else:
        actions = ours.receive(offer(), 0.1)
        assert only_msg(actions).features == (CSUM_PARTIAL,)
    (start,) = [x for x in actions if isinstance(x, StartIce)]
    assert start.features == frozenset() and ours.agreed_features == frozenset()
    assert ours.remote_features == frozenset()
    # and we without offloads advertise nothing, whatever the peer says
    plain = machine(BIG, SMALL, 3)
    actions = plain.receive(offer(features=(CSUM_PARTIAL,)), 0.0)
    assert only_msg(actions).features == ()
    assert plain.remote_features == {CSUM_PARTIAL} and plain.agreed_features == frozenset()


def test_unknown_feature_tokens_are_ignored() -> None:
    m = machine(BIG, SMALL, 1, features=(CSUM_PARTIAL,))
    actions = m.receive(offer(features=("zz-future", CSUM_PARTIAL, "x1")), 0.0)
    (start,) = [x for x in actions if isinstance(x, StartIce)]
    assert start.features == {CSUM_PARTIAL} and m.remote_features == {CSUM_PARTIAL}
    m2 = machine(BIG, SMALL, 2, features=(CSUM_PARTIAL,))
    m2.receive(offer(features=("zz-future",)), 0.0)
    assert m2.remote_features == frozenset() and m2.agreed_features == frozenset()


def test_each_new_session_negotiates_anew() -> None:
    """A restart by the peer (new offer while connected) without the token switches the feature
    off for the new session; a later one with it switches it on again. Our own change of
    features applies from our next offer or answer."""
    ours = Peer(machine(BIG, SMALL, 1, features=(CSUM_PARTIAL,)), gather=False)
    ours.deliver(offer(SID1, features=(CSUM_PARTIAL,)), 0.0)
    ours.sig.ice_connected(1.0)
    assert ours.sig.agreed_features == {CSUM_PARTIAL}
    ours.deliver(offer(SID2), 2.0)  # the peer came back as an older build
    assert not ours.errors and ours.sig.sid == SID2
    assert ours.started[-1].features == frozenset() and ours.sig.agreed_features == frozenset()
    sid3 = "00000000000000aa"
    ours.deliver(offer(sid3, features=(CSUM_PARTIAL,)), 3.0)
    assert ours.started[-1].features == {CSUM_PARTIAL}
    ours.sig.set_features(())  # e.g. our TUN device lost its offloads
    assert ours.sig.agreed_features == {CSUM_PARTIAL}  # the running session keeps its own
    ours.apply(ours.sig.ice_failed("consent", 4.0), 4.0)
    ours.take()
    offer_msg = only_msg(ours.sig.handle_timer(100.0))
    assert offer_msg.kind is Kind.OFFER and offer_msg.features == ()
    ours.deliver(answer(offer_msg.sid, 0, features=(CSUM_PARTIAL,)), 101.0)
    assert ours.started[-1].features == frozenset() and ours.sig.agreed_features == frozenset()


def test_glare_loser_answers_with_its_features_and_winner_agrees() -> None:
    big, small = pair()
    big.sig.set_features((CSUM_PARTIAL,))
    small.sig.set_features((CSUM_PARTIAL,))
    big.apply(big.sig.start(0.0), 0.0)
    small.apply(small.sig.start(0.0), 0.0)
    (offer_big,), (offer_small,) = big.take(), small.take()
    assert big.sig.receive(offer_small, 0.1) == []
    small.deliver(offer_big, 0.1)
    for msg in small.take():
        big.deliver(msg, 0.2)
    assert not big.errors and not small.errors
    assert big.started[-1].features == small.started[-1].features == {CSUM_PARTIAL}


LONG = "f" * (MAX_FEATURE_CHARS + 1)
BAD_FEATURES = [
    (["csum-partial"], "malformed"),  # not a tuple
    ((7,), "malformed"),
    (("",), "malformed"),
    (("Csum",), "malformed"),
    (("-x",), "malformed"),
    (("a b",), "malformed"),
    (("a\x00",), "malformed"),
    (("é",), "malformed"),
    ((CSUM_PARTIAL, CSUM_PARTIAL), "malformed"),
    ((LONG,), "oversize"),
    (tuple(f"f{i}" for i in range(MAX_FEATURES + 1)), "oversize"),
    (("x" * 10_000,), "oversize"),
]


@pytest.mark.parametrize(("features", "reason"), BAD_FEATURES)
def test_hostile_features_are_refused_and_change_nothing(features: object, reason: str) -> None:
    assert reason_of(check_features, features) == reason
    msg = replace(offer(), features=features)  # type: ignore[arg-type]
    assert reason_of(validate, msg) == reason
    m = machine(features=(CSUM_PARTIAL,))
    before = snapshot(m)
    assert reason_of(m.receive, msg, 0.0) == reason
    assert snapshot(m) == before


def test_feature_limits_and_where_features_may_go() -> None:
    most = tuple(f"f{i}" for i in range(MAX_FEATURES - 1)) + ("f" * MAX_FEATURE_CHARS,)
    assert check_features(most) == most and validate(answer(features=most))
    for msg in (cands(SID1, 1, CAND), LinkMessage(Kind.END, SID1, 1, reason="x"),
                LinkMessage(Kind.BYE, SID1, 0)):
        assert reason_of(validate, replace(msg, features=(CSUM_PARTIAL,))) == "malformed"


def test_local_features_are_checked() -> None:
    m = machine(features=("b-feature", "a-feature", "a-feature"))
    assert m.features == ("a-feature", "b-feature")  # sorted, once each
    for bad in ("csum-partial", ("Bad",), (LONG,), [f"f{i}" for i in range(MAX_FEATURES + 1)]):
        with pytest.raises(ValueError):
            m.set_features(bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            machine(features=bad)  # type: ignore[arg-type]
    assert m.features == ("a-feature", "b-feature")
