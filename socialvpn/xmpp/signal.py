"""Link signalling between this device and ONE peer device: a pure state machine (sans-I/O).

Link signalling travels as IQ ``set`` carrying ``<link sid seq kind>`` (DESIGN.md §4.1). The XMPP
adapter parses each stanza into a :class:`LinkMessage` and calls :meth:`LinkSignaling.receive`;
the orchestrator reports local events (``start``, ``local_candidates``, ``ice_connected``,
``ice_failed``, ``close``, ``handle_timer``). Every call returns a list of actions to carry out, in
order: :class:`SendMessage`, :class:`StartIce`, :class:`AddRemoteCandidates`, :class:`StopIce`.
Nothing here does I/O: time comes in as ``now`` (monotonic seconds), randomness through ``rng``.

Messages (one session = one ``sid``, 16 lowercase hex chars, chosen by the offerer):

* ``offer``      creates a session; carries the offerer's fresh ICE ufrag/pwd (and may carry
                 candidates and feature tokens).
* ``answer``     accepts it; carries the answerer's fresh ufrag/pwd (and may carry candidates and
                 feature tokens).
* ``candidates`` up to :data:`MAX_CANDIDATES` SDP ``candidate:`` attributes; ``end_of_candidates``
                 marks the last.
* ``end``        the sender's ICE failed or timed out; both sides stop ICE and retry later with a
                 new sid (backoff with jitter; the greater device id re-offers first, the smaller
                 after twice its backoff, so neither waits forever for the other).
* ``bye``        the sender leaves (left the group, shut down): stop everything, CLOSED. Sent with
                 a sid of its own, never used before, so it is never mistaken for a stale message.

Rules (RELIABILITY rows 7, 8, 24; NetBird's ``OfferAnswer.SessionID``):

* ``seq`` strictly increases per (sid, direction); anything else is ``sequence``.
* An ``offer`` whose sid was seen before (ours or theirs, bounded memory of :data:`SEEN_SIDS`) is
  ``stale``: a replay after a restart. ``answer``/``candidates``/``end`` for any sid other than the
  current session are ``stale``.
* Glare: both sides offered; the offer of the GREATER device id wins. The winner ignores the
  loser's offer (returns ``[]``), the loser abandons its own and answers. ICE controlling side =
  greater device id.
* A new offer while CONNECTING/CONNECTED means the peer restarted: stop the old ICE, answer.
* Timers (one armed at a time, :meth:`LinkSignaling.next_deadline`): ``offer_timeout`` without
  an answer -> WAITING (an answer arriving during the backoff is still taken up);
  ``connect_timeout`` in CONNECTING -> like an ICE failure; the backoff in WAITING -> new offer.
* Rejected input changes nothing (no state, no sequence number consumed).

Features: an offer and an answer may carry up to :data:`MAX_FEATURES` feature tokens (what the
sender's side of the link can do, e.g. :data:`CSUM_PARTIAL`). A session uses a feature when
both sides advertised it (:attr:`StartIce.features`, :attr:`LinkSignaling.agreed_features`);
tokens we do not know are ignored, and a peer that sends none (an older build) has none. Every
session negotiates anew: a restart or a new offer may switch a feature on or off.

Everything a peer can do wrong raises :class:`ProtocolError` (reasons ``malformed``, ``oversize``,
``stale``, ``sequence``, ``state``); the caller drops the stanza and counts the reason. Local
misuse (bad arguments) raises ``ValueError``; stale local events (an ICE report for a session that
is gone) are ignored and return ``[]``.

The adapter must carry out ``SendMessage`` actions in the order they were returned (one stream
to the peer, as XMPP delivers per sender). Under reordering the machine still converges: see the
"take up an abandoned offer" rule in :meth:`LinkSignaling._on_answer_switch`.

Also here: :class:`Pacer`, a byte token bucket so our own signalling stays under the server's
per-client limit, and :func:`coalesce_candidates` to merge queued candidate messages.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

from socialvpn.clock import Backoff
from socialvpn.errors import ProtocolError

# --- limits and timers (one place; DESIGN.md §4.1, RELIABILITY row 7) ---------------------------

MAX_CANDIDATES = 32  # per message
MAX_CANDIDATE_CHARS = 256  # per candidate attribute
MAX_SESSION_CANDIDATES = 4 * MAX_CANDIDATES  # remote candidates accepted per session
UFRAG_MIN_CHARS, UFRAG_MAX_CHARS = 4, 32  # RFC 8839 §5.4 ice-ufrag: 4*256 ice-char, we cap at 32
PWD_MIN_CHARS, PWD_MAX_CHARS = 22, 256  # RFC 8839 §5.4 ice-pwd: 22*256 ice-char
MAX_REASON_CHARS = 64
MAX_FEATURES = 8  # feature tokens per offer/answer
MAX_FEATURE_CHARS = 24  # per feature token
MAX_SEQ = 2**31 - 1
SID_BYTES = 8  # 16 hex chars
UFRAG_BYTES = 12  # 16 base64 chars (base64's alphabet is exactly ice-char)
PWD_BYTES = 18  # 24 base64 chars
SEEN_SIDS = 64  # how many session ids we remember to refuse replays

OFFER_TIMEOUT = 10.0  # no answer to our offer -> retry after backoff
CONNECT_TIMEOUT = 30.0  # ICE did not connect -> like an ICE failure
BACKOFF_FIRST = 1.0
BACKOFF_CAP = 60.0
BACKOFF_JITTER = 0.2
FOLLOWER_BACKOFF_FACTOR = 2.0  # the smaller device id waits this much longer before re-offering

# Prosody mod_limits reads ``rate = "10kb/s"`` as 10 * 10^3 BYTES per second and ``burst`` in
# seconds (default 2 s). We pace our signalling to half of that (5000 B/s, 2 s of burst), leaving
# room for presence, IQ results and pings on the same stream.
PACER_RATE = 5000.0  # bytes per second
PACER_BURST = 10000.0  # bytes

_SID_RE = re.compile(r"[0-9a-f]{16}")
_ICE_CHARS_RE = re.compile(r"[A-Za-z0-9+/]+")
_REASON_RE = re.compile(r"[ -~]*")  # printable ASCII
# RFC 8839 §5.1 candidate-attribute, in the a=candidate value form that aioice reads after the
# "candidate:" prefix. Extensions are (name, value) pairs of printable non-space ASCII.
_CANDIDATE_RE = re.compile(
    r"candidate:[A-Za-z0-9+/]{1,32}"  # foundation
    r" (?P<component>[0-9]{1,3})"
    r" [A-Za-z0-9_.-]{1,16}"  # transport
    r" (?P<priority>[0-9]{1,10})"
    r" (?P<address>[A-Za-z0-9.:%_-]{1,253})"
    r" (?P<port>[0-9]{1,5})"
    r" typ (?:host|srflx|prflx|relay)"
    r"(?: [!-~]+ [!-~]+)*"
)
_MDNS_RE = re.compile(r"[A-Za-z0-9-]{1,63}\.local")
_FEATURE_RE = re.compile(r"[a-z0-9][a-z0-9-]*")

CSUM_PARTIAL = "csum-partial"
"""Feature: this side's TUN device has offloads, so TCP/UDP packets may cross with only the
pseudo-header sum in their checksum field (net/offload.py, "partial checksums")."""
KNOWN_FEATURES = frozenset({CSUM_PARTIAL})
"""The feature tokens this build understands; others a peer advertises are ignored."""


class Kind(StrEnum):
    OFFER = "offer"
    ANSWER = "answer"
    CANDIDATES = "candidates"
    END = "end"
    BYE = "bye"


_WITH_CREDENTIALS = frozenset({Kind.OFFER, Kind.ANSWER})
_WITH_CANDIDATES = frozenset({Kind.OFFER, Kind.ANSWER, Kind.CANDIDATES})
_WITH_REASON = frozenset({Kind.END, Kind.BYE})


class Role(StrEnum):
    CONTROLLING = "controlling"
    CONTROLLED = "controlled"


class State(StrEnum):
    IDLE = "idle"  # nothing yet
    OFFERING = "offering"  # our offer sent, waiting for the answer
    CONNECTING = "connecting"  # ICE running
    CONNECTED = "connected"  # ICE selected a pair
    WAITING = "waiting"  # backoff before the next offer
    CLOSED = "closed"  # bye sent or received


@dataclass(frozen=True)
class LinkMessage:
    """One ``<link/>`` element, parsed. Check it with :func:`validate` before trusting it."""

    kind: Kind
    sid: str
    seq: int
    ufrag: str = ""
    pwd: str = ""
    candidates: tuple[str, ...] = ()
    end_of_candidates: bool = False
    reason: str = ""
    features: tuple[str, ...] = ()  # offer/answer: the sender's feature tokens


@dataclass(frozen=True)
class SendMessage:
    msg: LinkMessage


@dataclass(frozen=True)
class StartIce:
    sid: str
    role: Role
    local_ufrag: str
    local_pwd: str
    remote_ufrag: str
    remote_pwd: str
    features: frozenset[str] = frozenset()
    """The features this session uses: advertised by both sides (see the module doc)."""


@dataclass(frozen=True)
class AddRemoteCandidates:
    sid: str
    candidates: tuple[str, ...]
    end_of_candidates: bool


@dataclass(frozen=True)
class StopIce:
    sid: str
    reason: str


Action = SendMessage | StartIce | AddRemoteCandidates | StopIce


# --- validation ---------------------------------------------------------------------------------


def _bad(message: str, reason: str = "malformed") -> ProtocolError:
    return ProtocolError(message, reason)


def check_candidate(candidate: object) -> str:
    """Check one SDP candidate attribute (``candidate:1 1 UDP 2130706431 10.0.0.1 51820 typ
    host``). Returns it; raises ProtocolError (``oversize``/``malformed``), nothing else."""
    if not isinstance(candidate, str):
        raise _bad("candidate is not a string")
    if len(candidate) > MAX_CANDIDATE_CHARS:
        raise _bad(f"candidate longer than {MAX_CANDIDATE_CHARS}", "oversize")
    m = _CANDIDATE_RE.fullmatch(candidate)
    if m is None:
        raise _bad("candidate is not an SDP candidate attribute")
    if not 1 <= int(m["component"]) <= 256:
        raise _bad("candidate component out of range")
    if int(m["priority"]) > 2**32 - 1:
        raise _bad("candidate priority out of range")
    if int(m["port"]) > 65535:
        raise _bad("candidate port out of range")
    address = m["address"]
    if not _MDNS_RE.fullmatch(address):  # else an IP literal: never make ICE resolve a name
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise _bad("candidate address is neither an IP address nor an mDNS name") from None
    return candidate


def check_features(features: object) -> tuple[str, ...]:
    """Check a tuple of feature tokens (known or not): at most :data:`MAX_FEATURES` distinct
    tokens of 1..:data:`MAX_FEATURE_CHARS` characters ``[a-z0-9-]`` (not starting with ``-``).
    Returns it; raises ProtocolError (``oversize``/``malformed``), nothing else."""
    if not isinstance(features, tuple):
        raise _bad("features is not a tuple")
    if len(features) > MAX_FEATURES:
        raise _bad(f"more than {MAX_FEATURES} features", "oversize")
    for token in features:
        if not isinstance(token, str):
            raise _bad("feature is not a string")
        if len(token) > MAX_FEATURE_CHARS:
            raise _bad(f"feature longer than {MAX_FEATURE_CHARS}", "oversize")
        if not _FEATURE_RE.fullmatch(token):
            raise _bad("feature is not a token of [a-z0-9-]")
    if len(set(features)) != len(features):
        raise _bad("feature listed twice")
    return features


def _check_text(value: object, name: str, low: int, high: int, pattern: re.Pattern[str]) -> None:
    if not isinstance(value, str):
        raise _bad(f"{name} is not a string")
    if len(value) > high:
        raise _bad(f"{name} longer than {high}", "oversize")
    if len(value) < low or not pattern.fullmatch(value):
        raise _bad(f"{name} is not {low}..{high} allowed characters")


def validate(msg: LinkMessage) -> LinkMessage:
    """Check limits and shape of a parsed message; returns it unchanged.

    Raises :class:`ProtocolError` with reason ``malformed`` or ``oversize`` and nothing else,
    whatever the fields hold.
    """
    if not isinstance(msg, LinkMessage):
        raise _bad("not a link message")
    try:
        kind = Kind(msg.kind)
    except (ValueError, TypeError):
        raise _bad("unknown link kind") from None
    if not isinstance(msg.sid, str) or not _SID_RE.fullmatch(msg.sid):
        raise _bad("sid is not 16 lowercase hex characters")
    if type(msg.seq) is not int or not 0 <= msg.seq <= MAX_SEQ:
        raise _bad("seq is not an integer in 0..2^31-1")
    if kind in _WITH_CREDENTIALS:
        _check_text(msg.ufrag, "ufrag", UFRAG_MIN_CHARS, UFRAG_MAX_CHARS, _ICE_CHARS_RE)
        _check_text(msg.pwd, "pwd", PWD_MIN_CHARS, PWD_MAX_CHARS, _ICE_CHARS_RE)
    elif msg.ufrag != "" or msg.pwd != "":
        raise _bad(f"{kind} carries ICE credentials")
    check_features(msg.features)
    if msg.features and kind not in _WITH_CREDENTIALS:
        raise _bad(f"{kind} carries features")
    if not isinstance(msg.candidates, tuple):
        raise _bad("candidates is not a tuple")
    if len(msg.candidates) > MAX_CANDIDATES:
        raise _bad(f"more than {MAX_CANDIDATES} candidates", "oversize")
    if type(msg.end_of_candidates) is not bool:
        raise _bad("end_of_candidates is not a boolean")
    if kind not in _WITH_CANDIDATES and (msg.candidates or msg.end_of_candidates):
        raise _bad(f"{kind} carries candidates")
    for candidate in msg.candidates:
        check_candidate(candidate)
    if kind is Kind.CANDIDATES and not msg.candidates and not msg.end_of_candidates:
        raise _bad("empty candidates message")
    _check_text(msg.reason, "reason", 0, MAX_REASON_CHARS, _REASON_RE)
    if msg.reason and kind not in _WITH_REASON:
        raise _bad(f"{kind} carries a reason")
    return msg


def _known(features: tuple[str, ...]) -> frozenset[str]:
    """The tokens of a (validated) peer's feature list that this build understands."""
    return frozenset(features) & KNOWN_FEATURES


def _clean_reason(reason: str) -> str:
    """A local reason string made fit for the wire (printable ASCII, bounded)."""
    text = "".join(ch if " " <= ch <= "~" else "?" for ch in str(reason))
    return text[:MAX_REASON_CHARS]


# --- the state machine --------------------------------------------------------------------------


@dataclass
class _Session:
    sid: str
    offerer: bool  # we made the offer
    local_ufrag: str
    local_pwd: str
    remote_ufrag: str = ""
    remote_pwd: str = ""
    send_seq: int = 0  # next seq we send on this sid
    recv_seq: int = -1  # last seq accepted from the peer on this sid
    ice: bool = False  # StartIce issued, no StopIce yet
    remote_candidates: int = 0
    remote_end: bool = False
    local_candidates: int = 0
    local_end: bool = False
    local_features: frozenset[str] = frozenset()  # what we advertised in our offer/answer
    remote_features: frozenset[str] = frozenset()  # the known ones the peer advertised

    @property
    def agreed(self) -> frozenset[str]:
        return self.local_features & self.remote_features


_Handler = Callable[["LinkSignaling", LinkMessage, float], list[Action]]


class LinkSignaling:
    """The signalling state machine for the link between ``local_id`` and ``remote_id``.

    ``rng(n)`` returns ``n`` random bytes (``os.urandom`` in production); it makes session ids and
    ICE credentials. ``jitter_rand()`` returns a float in [0, 1) for the backoff jitter; by default
    it is drawn from ``rng`` so that one injected source drives everything.
    """

    def __init__(
        self,
        local_id: str,
        remote_id: str,
        *,
        rng: Callable[[int], bytes],
        backoff_first: float = BACKOFF_FIRST,
        backoff_cap: float = BACKOFF_CAP,
        offer_timeout: float = OFFER_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        jitter_rand: Callable[[], float] | None = None,
        seen_sids: int = SEEN_SIDS,
        features: Iterable[str] = (),
    ) -> None:
        if not isinstance(local_id, str) or not isinstance(remote_id, str):
            raise ValueError("device ids must be strings")
        if not local_id or not remote_id or local_id == remote_id:
            raise ValueError("need two different, non-empty device ids")
        if offer_timeout <= 0 or connect_timeout <= 0 or seen_sids < 1:
            raise ValueError("timeouts must be positive and seen_sids at least 1")
        self.local_id = local_id
        self.remote_id = remote_id
        self._rng = rng
        self._features: tuple[str, ...] = ()
        self.set_features(features)
        self.offer_timeout = offer_timeout
        self.connect_timeout = connect_timeout
        self._backoff = Backoff(
            backoff_first, backoff_cap, BACKOFF_JITTER, rand=jitter_rand or self._unit_random
        )
        self._seen_limit = seen_sids
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._state = State.IDLE
        self._session: _Session | None = None  # current (or, in WAITING/CLOSED, last) session
        self._pending: _Session | None = None  # our latest offer an answer may still take up
        self._deadline: float | None = None
        self._timer: Callable[[float], list[Action]] | None = None

    # --- read-only views ------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def sid(self) -> str | None:
        """The current session id (in WAITING/CLOSED: the last one), None before any."""
        return self._session.sid if self._session is not None else None

    @property
    def role(self) -> Role:
        """ICE role: controlling = greater device id (string comparison)."""
        return Role.CONTROLLING if self.local_id > self.remote_id else Role.CONTROLLED

    @property
    def ice_running(self) -> bool:
        """True between our StartIce and StopIce for the current session."""
        return self._session is not None and self._session.ice

    @property
    def backoff_attempts(self) -> int:
        return self._backoff.attempts

    @property
    def features(self) -> tuple[str, ...]:
        """What we advertise in our next offer or answer (sorted)."""
        return self._features

    def set_features(self, features: Iterable[str]) -> None:
        """Change what we advertise from the next offer or answer on (a running session keeps
        what was agreed). Raises ValueError for tokens that could not go on the wire."""
        if isinstance(features, str):
            raise ValueError("features is an iterable of tokens, not one string")
        tokens = tuple(sorted(set(features)))
        try:
            check_features(tokens)
        except ProtocolError as exc:
            raise ValueError(f"local features {tokens!r}: {exc}") from None
        self._features = tokens

    @property
    def remote_features(self) -> frozenset[str]:
        """The known features the peer advertised for the current session (empty before its
        offer or answer, or when it sent none)."""
        return self._session.remote_features if self._session is not None else frozenset()

    @property
    def agreed_features(self) -> frozenset[str]:
        """The features the current session uses: advertised by both sides."""
        return self._session.agreed if self._session is not None else frozenset()

    def seen(self, sid: str) -> bool:
        """Whether ``sid`` is remembered (an offer with it would be refused as stale)."""
        return sid in self._seen

    @property
    def seen_count(self) -> int:
        return len(self._seen)

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` next has something to do (None: nothing armed)."""
        return self._deadline

    # --- local events ---------------------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """Offer a new session: new sid, seq 0, fresh ICE credentials.

        From IDLE, WAITING (skipping the rest of the backoff) or CLOSED (re-opening, e.g. the peer
        rejoined). A no-op while OFFERING, CONNECTING or CONNECTED.
        """
        if self._state in (State.OFFERING, State.CONNECTING, State.CONNECTED):
            return []
        ufrag, pwd = self._credentials()
        session = _Session(self._new_sid(), True, ufrag, pwd,
                           local_features=frozenset(self._features))
        self._session = self._pending = session
        self._remember(session.sid)
        offer = self._message(Kind.OFFER, ufrag=ufrag, pwd=pwd, features=self._features)
        self._state = State.OFFERING
        self._arm(now + self.offer_timeout, self._expired_offer)
        return [SendMessage(offer)]

    def reoffer(self, now: float) -> list[Action]:
        """Our messages may have gone nowhere (the XMPP server was unreachable, or the peer was
        offline and just came back): in OFFERING or WAITING, offer a fresh session now with the
        backoff starting over. A no-op in IDLE, CONNECTING, CONNECTED and CLOSED."""
        if self._state not in (State.OFFERING, State.WAITING):
            return []
        self._backoff.reset()
        self._state = State.WAITING
        return self.start(now)

    def local_candidates(
        self, candidates: Iterable[str], end: bool, now: float, *, sid: str | None = None
    ) -> list[Action]:
        """Send our gathered candidates, at most :data:`MAX_CANDIDATES` per message, the last one
        flagged ``end_of_candidates`` if ``end``. Ignored (``[]``) when there is no live session,
        when ``sid`` is given and is not the current session, or after our end-of-candidates.
        At most :data:`MAX_SESSION_CANDIDATES` are sent per session (the peer refuses more)."""
        batch = tuple(candidates)
        for candidate in batch:
            try:
                check_candidate(candidate)
            except ProtocolError as exc:
                raise ValueError(f"local candidate {candidate!r}: {exc}") from None
        session = self._session
        if (
            self._state not in (State.OFFERING, State.CONNECTING, State.CONNECTED)
            or session is None
            or (sid is not None and sid != session.sid)
            or session.local_end
        ):
            return []
        batch = batch[: MAX_SESSION_CANDIDATES - session.local_candidates]
        if not batch and not end:
            return []
        session.local_candidates += len(batch)
        session.local_end = end
        chunks = [batch[i : i + MAX_CANDIDATES] for i in range(0, len(batch), MAX_CANDIDATES)]
        chunks = chunks or [()]
        last = len(chunks) - 1
        return [
            SendMessage(self._message(Kind.CANDIDATES, candidates=chunk, end_of_candidates=flag))
            for chunk, flag in zip(chunks, [False] * last + [end], strict=True)
        ]

    def ice_connected(self, now: float, *, sid: str | None = None) -> list[Action]:
        """ICE selected a pair: CONNECTING -> CONNECTED and the backoff starts over."""
        if self._state is State.CONNECTING and self._is_current(sid):
            self._state = State.CONNECTED
            self._disarm()
            self._backoff.reset()
        return []

    def ice_failed(self, reason: str, now: float, *, sid: str | None = None) -> list[Action]:
        """ICE failed or consent was lost: stop ICE, tell the peer (``end``), back off."""
        if self._state not in (State.CONNECTING, State.CONNECTED) or not self._is_current(sid):
            return []
        return self._fail(_clean_reason(reason) or "ice-failed", now)

    def close(self, now: float, reason: str = "bye") -> list[Action]:
        """We leave (the peer left the group, or we shut down): [StopIce?, SendMessage(bye)]."""
        if self._state is State.CLOSED:
            return []
        reason = _clean_reason(reason) or "bye"
        actions: list[Action] = self._stop_ice(reason)
        sid = self._new_sid()
        self._remember(sid)
        actions.append(SendMessage(LinkMessage(Kind.BYE, sid, 0, reason=reason)))
        self._enter_closed()
        return actions

    def handle_timer(self, now: float) -> list[Action]:
        """Fire the armed timer if it is due (offer timeout, connect timeout, retry)."""
        if self._deadline is None or now < self._deadline or self._timer is None:
            return []
        expired = self._timer
        self._disarm()
        return expired(now)

    # --- timer expiries -------------------------------------------------------------------------

    def _expired_offer(self, now: float) -> list[Action]:
        # No answer: back off and offer anew. The offer stays pending, so a late answer to it
        # still gets taken up while we wait.
        self._enter_waiting(now)
        return []

    def _expired_connect(self, now: float) -> list[Action]:
        return self._fail("connect-timeout", now)

    def _expired_retry(self, now: float) -> list[Action]:
        return self.start(now)

    # --- the peer's messages --------------------------------------------------------------------

    def receive(self, msg: LinkMessage, now: float) -> list[Action]:
        """Take a message from the peer. Returns actions or raises :class:`ProtocolError` (reasons
        ``malformed``, ``oversize``, ``stale``, ``sequence``, ``state``); a refused message changes
        nothing. Losing glare is not an error: the winner's ``receive`` returns ``[]``."""
        validate(msg)
        kind = Kind(msg.kind)
        current = self._session is not None and msg.sid == self._session.sid
        pending = self._pending is not None and msg.sid == self._pending.sid
        if kind is Kind.OFFER:
            if self._is_seen(msg.sid):
                raise _bad(f"offer for a session already seen ({msg.sid})", "stale")
        elif kind is Kind.BYE:
            if not current and self._is_seen(msg.sid):
                raise _bad(f"bye for an old session ({msg.sid})", "stale")
        elif not current and not (kind is Kind.ANSWER and pending):
            raise _bad(f"{kind} for a session that is not current ({msg.sid})", "stale")
        target = self._session if current else self._pending if pending else None
        if target is not None and msg.seq <= target.recv_seq:
            raise _bad(f"seq {msg.seq} not above {target.recv_seq} on {msg.sid}", "sequence")
        handler = self._TRANSITIONS.get((self._state, kind))
        if handler is None:
            raise _bad(f"{kind} not expected in state {self._state}", "state")
        actions = handler(self, msg, now)
        if target is not None:
            target.recv_seq = msg.seq
        self._remember(msg.sid)
        return actions

    # One handler per (state, kind); a missing pair is an illegal move (ProtocolError "state").
    # Handlers check everything before they change anything.

    def _on_offer_new(self, msg: LinkMessage, now: float) -> list[Action]:
        """IDLE/WAITING: a session offered by the peer; answer it."""
        self._pending = None
        return self._accept_offer(msg, now)

    def _on_offer_glare(self, msg: LinkMessage, now: float) -> list[Action]:
        """OFFERING: both offered. The greater device id wins; the winner ignores the loser's
        offer, the loser abandons its own (kept pending, see _on_answer_switch) and answers."""
        if self.role is Role.CONTROLLING:
            return []
        return self._accept_offer(msg, now)

    def _on_offer_restart(self, msg: LinkMessage, now: float) -> list[Action]:
        """CONNECTING/CONNECTED: a new sid means the peer restarted; drop ours, answer theirs."""
        actions = self._stop_ice("peer-restarted")
        self._pending = None
        return actions + self._accept_offer(msg, now)

    def _on_answer(self, msg: LinkMessage, now: float) -> list[Action]:
        """OFFERING: the answer to our offer; start ICE."""
        return self._take_up_pending(msg, now)

    def _on_answer_late(self, msg: LinkMessage, now: float) -> list[Action]:
        """WAITING: an answer to our still pending offer (it came after the offer timeout)."""
        if self._pending is None or msg.sid != self._pending.sid:
            raise _bad("answer to an offer we no longer wait for", "state")
        return self._take_up_pending(msg, now)

    def _on_answer_switch(self, msg: LinkMessage, now: float) -> list[Action]:
        """CONNECTING/CONNECTED: an answer to the offer we abandoned when we lost glare.

        Only possible when stanzas were reordered: the winner saw our offer only after our answer
        and took it for a restart, so it now runs our session. Follow it there; that is where
        the peer is. An answer for the current session is a duplicate: ``state``.
        """
        if self._pending is None or msg.sid != self._pending.sid:
            raise _bad("second answer for the current session", "state")
        return self._stop_ice("superseded") + self._take_up_pending(msg, now)

    def _on_candidates(self, msg: LinkMessage, now: float) -> list[Action]:
        """CONNECTING/CONNECTED: remote candidates for the running ICE agent."""
        session = self._live()
        if session.remote_end:
            raise _bad("candidates after end-of-candidates", "state")
        if session.remote_candidates + len(msg.candidates) > MAX_SESSION_CANDIDATES:
            raise _bad(f"more than {MAX_SESSION_CANDIDATES} candidates in a session", "oversize")
        session.remote_candidates += len(msg.candidates)
        session.remote_end = msg.end_of_candidates
        return [AddRemoteCandidates(session.sid, msg.candidates, msg.end_of_candidates)]

    def _on_after_end(self, msg: LinkMessage, now: float) -> list[Action]:
        """WAITING: candidates or end of the session that just ended (crossed our end)."""
        if msg.kind == Kind.END and self._pending is self._session:
            self._pending = None  # the peer gave up on our pending offer: no late answer
        return []

    def _on_end_offer(self, msg: LinkMessage, now: float) -> list[Action]:
        """OFFERING: the peer ended the session we offered (its ICE failed): back off."""
        self._pending = None
        self._enter_waiting(now)
        return []

    def _on_end(self, msg: LinkMessage, now: float) -> list[Action]:
        """CONNECTING/CONNECTED: the peer's ICE failed: stop ours, back off, re-offer later."""
        actions = self._stop_ice("peer-ended")
        self._enter_waiting(now)
        return actions

    def _on_bye(self, msg: LinkMessage, now: float) -> list[Action]:
        """Any state but CLOSED: the peer left."""
        actions = self._stop_ice("peer-left")
        self._enter_closed()
        return actions

    _TRANSITIONS: dict[tuple[State, Kind], _Handler] = {
        (State.IDLE, Kind.OFFER): _on_offer_new,
        (State.IDLE, Kind.BYE): _on_bye,
        (State.OFFERING, Kind.OFFER): _on_offer_glare,
        (State.OFFERING, Kind.ANSWER): _on_answer,
        (State.OFFERING, Kind.END): _on_end_offer,
        (State.OFFERING, Kind.BYE): _on_bye,
        (State.CONNECTING, Kind.OFFER): _on_offer_restart,
        (State.CONNECTING, Kind.ANSWER): _on_answer_switch,
        (State.CONNECTING, Kind.CANDIDATES): _on_candidates,
        (State.CONNECTING, Kind.END): _on_end,
        (State.CONNECTING, Kind.BYE): _on_bye,
        (State.CONNECTED, Kind.OFFER): _on_offer_restart,
        (State.CONNECTED, Kind.ANSWER): _on_answer_switch,
        (State.CONNECTED, Kind.CANDIDATES): _on_candidates,
        (State.CONNECTED, Kind.END): _on_end,
        (State.CONNECTED, Kind.BYE): _on_bye,
        (State.WAITING, Kind.OFFER): _on_offer_new,
        (State.WAITING, Kind.ANSWER): _on_answer_late,
        (State.WAITING, Kind.CANDIDATES): _on_after_end,
        (State.WAITING, Kind.END): _on_after_end,
        (State.WAITING, Kind.BYE): _on_bye,
        # CLOSED accepts nothing; start() re-opens.
    }

    # --- helpers --------------------------------------------------------------------------------

    def _accept_offer(self, msg: LinkMessage, now: float) -> list[Action]:
        ufrag, pwd = self._credentials()
        session = _Session(msg.sid, False, ufrag, pwd, msg.ufrag, msg.pwd, recv_seq=msg.seq,
                           local_features=frozenset(self._features),
                           remote_features=_known(msg.features))
        self._session = session
        answer = self._message(Kind.ANSWER, ufrag=ufrag, pwd=pwd, features=self._features)
        return [SendMessage(answer), *self._start_ice(msg, now)]

    def _take_up_pending(self, msg: LinkMessage, now: float) -> list[Action]:
        session = self._pending
        assert session is not None
        session.remote_ufrag, session.remote_pwd = msg.ufrag, msg.pwd
        session.remote_features = _known(msg.features)
        self._session, self._pending = session, None
        return self._start_ice(msg, now)

    def _start_ice(self, msg: LinkMessage, now: float) -> list[Action]:
        """Start ICE for the current session with the credentials and candidates in ``msg``."""
        session = self._live()
        session.ice = True
        self._state = State.CONNECTING
        self._arm(now + self.connect_timeout, self._expired_connect)
        actions: list[Action] = [
            StartIce(session.sid, self.role, session.local_ufrag, session.local_pwd,
                     session.remote_ufrag, session.remote_pwd, session.agreed)
        ]
        if msg.candidates or msg.end_of_candidates:
            session.remote_candidates = len(msg.candidates)
            session.remote_end = msg.end_of_candidates
            actions.append(AddRemoteCandidates(session.sid, msg.candidates, msg.end_of_candidates))
        return actions

    def _stop_ice(self, reason: str) -> list[Action]:
        session = self._session
        if session is None or not session.ice:
            return []
        session.ice = False
        return [StopIce(session.sid, reason)]

    def _fail(self, reason: str, now: float) -> list[Action]:
        actions = self._stop_ice(reason)
        actions.append(SendMessage(self._message(Kind.END, reason=reason)))
        self._enter_waiting(now)
        return actions

    def _enter_waiting(self, now: float) -> None:
        delay = self._backoff.next_delay()
        if self.role is Role.CONTROLLED:
            delay *= FOLLOWER_BACKOFF_FACTOR
        self._state = State.WAITING
        self._arm(now + delay, self._expired_retry)

    def _enter_closed(self) -> None:
        self._state = State.CLOSED
        self._pending = None
        self._disarm()

    def _arm(self, deadline: float, expiry: Callable[[float], list[Action]]) -> None:
        self._deadline, self._timer = deadline, expiry

    def _disarm(self) -> None:
        self._deadline, self._timer = None, None

    def _live(self) -> _Session:
        assert self._session is not None
        return self._session

    def _is_current(self, sid: str | None) -> bool:
        return sid is None or (self._session is not None and sid == self._session.sid)

    def _is_seen(self, sid: str) -> bool:
        return (
            sid in self._seen
            or (self._session is not None and sid == self._session.sid)
            or (self._pending is not None and sid == self._pending.sid)
        )

    def _remember(self, sid: str) -> None:
        self._seen[sid] = None
        self._seen.move_to_end(sid)
        while len(self._seen) > self._seen_limit:
            self._seen.popitem(last=False)

    def _message(
        self,
        kind: Kind,
        *,
        ufrag: str = "",
        pwd: str = "",
        candidates: tuple[str, ...] = (),
        end_of_candidates: bool = False,
        reason: str = "",
        features: tuple[str, ...] = (),
    ) -> LinkMessage:
        session = self._live()
        msg = LinkMessage(
            kind, session.sid, session.send_seq, ufrag, pwd, candidates, end_of_candidates,
            reason, features,
        )
        session.send_seq += 1
        return msg

    def _random(self, n: int) -> bytes:
        data = bytes(self._rng(n))
        if len(data) != n:
            raise ValueError(f"rng returned {len(data)} bytes, wanted {n}")
        return data

    def _unit_random(self) -> float:
        return int.from_bytes(self._random(4), "big") / 2**32

    def _new_sid(self) -> str:
        for _ in range(16):
            sid = self._random(SID_BYTES).hex()
            if not self._is_seen(sid):
                return sid
        raise ValueError("rng keeps returning session ids already used")

    def _credentials(self) -> tuple[str, str]:
        ufrag = base64.b64encode(self._random(UFRAG_BYTES)).decode()
        pwd = base64.b64encode(self._random(PWD_BYTES)).decode()
        return ufrag, pwd


# --- outbound pacing ----------------------------------------------------------------------------


class Pacer:
    """Token bucket over bytes for our outbound signalling (RELIABILITY row 24).

    Before sending a stanza of ``size`` bytes ask :meth:`delay`; wait that long, send, then
    :meth:`commit`. A stanza larger than the burst waits for a full bucket and then drives it
    negative, so the long-run rate never exceeds ``rate_bytes_per_s``: in any interval of length
    ``t`` from the start at most ``burst + rate * t`` bytes (plus one stanza) are committed.
    """

    def __init__(self, rate_bytes_per_s: float = PACER_RATE, burst: float = PACER_BURST) -> None:
        if not rate_bytes_per_s > 0 or not burst > 0:
            raise ValueError("rate and burst must be positive")
        self.rate = float(rate_bytes_per_s)
        self.burst = float(burst)
        self._tokens = self.burst
        self._last: float | None = None

    def _refill(self, now: float) -> None:
        if self._last is None:
            self._last = now
        elif now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now

    def tokens(self, now: float) -> float:
        self._refill(now)
        return self._tokens

    def delay(self, size: int, now: float) -> float:
        """Seconds to wait before a stanza of ``size`` bytes may go (0: now)."""
        if size < 0:
            raise ValueError("size must not be negative")
        self._refill(now)
        need = min(float(size), self.burst)
        return 0.0 if self._tokens >= need else (need - self._tokens) / self.rate

    def commit(self, size: int, now: float) -> None:
        """Account for a stanza of ``size`` bytes sent at ``now``."""
        if size < 0:
            raise ValueError("size must not be negative")
        self._refill(now)
        self._tokens -= size


def coalesce_candidates(messages: Iterable[LinkMessage]) -> list[LinkMessage]:
    """Merge runs of consecutive ``candidates`` messages of one sid that are still queued (for
    the pacer) into as few messages as fit :data:`MAX_CANDIDATES`. Messages are never split; a
    merged message keeps the seq of the last one merged into it, so seqs still strictly increase
    (with gaps, which the receiver accepts). Order and all other messages are kept."""
    out: list[LinkMessage] = []
    for msg in messages:
        last = out[-1] if out else None
        if (
            last is not None
            and msg.kind == Kind.CANDIDATES
            and last.kind == Kind.CANDIDATES
            and last.sid == msg.sid
            and not last.end_of_candidates
            and last.seq < msg.seq
            and len(last.candidates) + len(msg.candidates) <= MAX_CANDIDATES
        ):
            out[-1] = LinkMessage(
                Kind.CANDIDATES,
                msg.sid,
                msg.seq,
                candidates=last.candidates + msg.candidates,
                end_of_candidates=msg.end_of_candidates,
            )
        else:
            out.append(msg)
    return out


__all__ = [
    "CONNECT_TIMEOUT",
    "CSUM_PARTIAL",
    "KNOWN_FEATURES",
    "MAX_FEATURES",
    "MAX_FEATURE_CHARS",
    "MAX_CANDIDATES",
    "MAX_CANDIDATE_CHARS",
    "MAX_SESSION_CANDIDATES",
    "OFFER_TIMEOUT",
    "PACER_BURST",
    "PACER_RATE",
    "PWD_MAX_CHARS",
    "PWD_MIN_CHARS",
    "SEEN_SIDS",
    "UFRAG_MAX_CHARS",
    "UFRAG_MIN_CHARS",
    "Action",
    "AddRemoteCandidates",
    "Kind",
    "LinkMessage",
    "LinkSignaling",
    "Pacer",
    "Role",
    "SendMessage",
    "StartIce",
    "State",
    "StopIce",
    "check_candidate",
    "check_features",
    "coalesce_candidates",
    "validate",
]
