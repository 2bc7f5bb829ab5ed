"""WireGuard's per-peer timer rules as a pure state object (wireguard-go ``device/timers.go``).

The data path says what happened through ``on_*`` hooks; only this module decides what to arm.
The owner asks :meth:`PeerTimers.next_deadline` when to wake up and calls
:meth:`PeerTimers.handle_timer` then; it returns the :class:`TimerAction` values to carry out.
After carrying out ``SEND_INITIATION`` the owner reports it with :meth:`on_handshake_initiated`
(and the ``on_any_authenticated_packet_*`` hooks), as for any handshake it sends.

The rules (defaults in parentheses):

* ``retransmit_handshake``: REKEY_TIMEOUT + jitter (5 s + up to 334 ms) after an initiation; resend,
  and after MAX_TIMER_HANDSHAKES (18) retries, i.e. REKEY_ATTEMPT_TIME, give up.
* ``send_keepalive``: KEEPALIVE_TIMEOUT (10 s) after data was received if nothing was sent since.
* ``new_handshake``: KEEPALIVE + REKEY_TIMEOUT + jitter (15 s) after data was sent if nothing
  authenticated was received since.
* ``zero_key_material``: 3 x REJECT_AFTER_TIME (540 s) after the last session was derived.
* ``persistent_keepalive``: the configured interval after any authenticated packet (0 = off).

Rekeying is decided on the data path: :meth:`keep_key_fresh_sending` (counter beyond
REKEY_AFTER_MESSAGES, or, for the initiator, key older than REKEY_AFTER_TIME) and
:meth:`keep_key_fresh_receiving` (initiator, key older than REJECT - KEEPALIVE - REKEY_TIMEOUT).
Initiations are never sent more often than once per REKEY_TIMEOUT (:meth:`want_initiation`).
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from typing import Protocol

from socialvpn.link.constants import DEFAULT_TIMERS, LinkTimers

_EPSILON = 1e-6


class TimerAction(enum.Enum):
    SEND_KEEPALIVE = "send-keepalive"
    SEND_INITIATION = "send-initiation"
    ZERO_KEYS = "zero-keys"  # erase all sessions and any handshake in progress
    GIVE_UP = "give-up"  # the handshake failed: drop staged packets, stop retrying


class KeypairInfo(Protocol):
    """What the rekey rules need to know about the current sending session."""

    @property
    def created(self) -> float: ...

    @property
    def is_initiator(self) -> bool: ...

    @property
    def send_counter(self) -> int: ...


class Timer(enum.StrEnum):
    RETRANSMIT_HANDSHAKE = "retransmit_handshake"
    SEND_KEEPALIVE = "send_keepalive"
    NEW_HANDSHAKE = "new_handshake"
    ZERO_KEY_MATERIAL = "zero_key_material"
    PERSISTENT_KEEPALIVE = "persistent_keepalive"


class PeerTimers:
    """The timers of one peer. Pure: every method takes ``now`` (monotonic seconds)."""

    def __init__(
        self,
        timers: LinkTimers = DEFAULT_TIMERS,
        *,
        rng: Callable[[], float] = random.random,
        persistent_keepalive: float = 0.0,
    ) -> None:
        self.timers = timers
        self._rng = rng
        self.persistent_keepalive = persistent_keepalive
        self._deadlines: dict[Timer, float] = {}
        self.active = True
        self.handshake_attempts = 0
        self.need_another_keepalive = False
        self.sent_last_minute_handshake = False
        self.last_sent_handshake: float | None = None
        self.last_handshake: float | None = None
        self._expiry: dict[Timer, Callable[[float], list[TimerAction]]] = {
            Timer.RETRANSMIT_HANDSHAKE: self.expired_retransmit_handshake,
            Timer.SEND_KEEPALIVE: self.expired_send_keepalive,
            Timer.NEW_HANDSHAKE: self.expired_new_handshake,
            Timer.ZERO_KEY_MATERIAL: self.expired_zero_key_material,
            Timer.PERSISTENT_KEEPALIVE: self.expired_persistent_keepalive,
        }

    # --- timer plumbing --------------------------------------------------------------------------

    def _jitter(self) -> float:
        return self._rng() * self.timers.rekey_timeout_jitter_max

    def _arm(self, timer: Timer, deadline: float) -> None:
        if self.active:
            self._deadlines[timer] = deadline

    def _cancel(self, timer: Timer) -> None:
        self._deadlines.pop(timer, None)

    def pending(self, timer: Timer) -> bool:
        return timer in self._deadlines

    def deadline(self, timer: Timer) -> float | None:
        return self._deadlines.get(timer)

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` next has something to do (None: nothing armed)."""
        return min(self._deadlines.values(), default=None)

    def shortest_interval(self) -> float:
        """The least time from now at which anything that happens now can arm a timer: every
        deadline is ``now`` plus one of the intervals here (and jitter). A caller that looks
        again within this time misses none, however many packets come meanwhile."""
        t = self.timers
        shortest = min(t.rekey_timeout, t.keepalive_timeout)
        if self.persistent_keepalive > 0:
            shortest = min(shortest, self.persistent_keepalive)
        return shortest

    def handle_timer(self, now: float) -> list[TimerAction]:
        """Fire every timer due at ``now``, earliest first; return the actions to carry out."""
        actions: list[TimerAction] = []
        while True:
            due = [(d, t.value, t) for t, d in self._deadlines.items() if d <= now]
            if not due:
                return actions
            _, _, timer = min(due)
            del self._deadlines[timer]
            actions.extend(self._expiry[timer](now))

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        """Cancel everything (the peer or device went down)."""
        self.active = False
        self._deadlines.clear()

    # --- initiation gating -----------------------------------------------------------------------

    def want_initiation(self, now: float, *, is_retry: bool = False) -> bool:
        """May an initiation be sent now? Not within REKEY_TIMEOUT of the previous one. A fresh
        (non-retry) attempt resets the retry count (wireguard-go ``SendHandshakeInitiation``)."""
        if not is_retry:
            self.handshake_attempts = 0
        last = self.last_sent_handshake
        # the tolerance keeps float rounding of "last + timeout" from skipping a retransmit
        return last is None or now - last >= self.timers.rekey_timeout - _EPSILON

    def keep_key_fresh_sending(self, now: float, current: KeypairInfo | None) -> bool:
        """Called when sending on ``current``: True if an initiation should be sent now."""
        if current is None:
            return False
        if current.send_counter > self.timers.rekey_after_messages or (
            current.is_initiator and now - current.created > self.timers.rekey_after_time
        ):
            return self.want_initiation(now)
        return False

    def keep_key_fresh_receiving(self, now: float, current: KeypairInfo | None) -> bool:
        """Called after data arrived on ``current``: True if a last-minute initiation should be
        sent (the initiator's key is about to be rejected and nobody rekeyed)."""
        if self.sent_last_minute_handshake or current is None:
            return False
        if current.is_initiator and now - current.created > self.timers.rekey_on_receive_after:
            self.sent_last_minute_handshake = True
            return self.want_initiation(now)
        return False

    # --- event hooks -----------------------------------------------------------------------------

    def on_data_sent(self, now: float) -> None:
        """An authenticated data packet (not a keepalive) was sent."""
        if not self.pending(Timer.NEW_HANDSHAKE):
            self._arm(Timer.NEW_HANDSHAKE, now + self.timers.new_handshake_timeout + self._jitter())

    def on_data_received(self, now: float) -> None:
        """An authenticated data packet (not a keepalive) was received."""
        if not self.pending(Timer.SEND_KEEPALIVE):
            self._arm(Timer.SEND_KEEPALIVE, now + self.timers.keepalive_timeout)
        else:
            self.need_another_keepalive = True

    def on_any_authenticated_packet_sent(self, now: float) -> None:
        """Any authenticated packet (keepalive, data or handshake) was sent."""
        self._cancel(Timer.SEND_KEEPALIVE)

    def on_any_authenticated_packet_received(self, now: float) -> None:
        """Any authenticated packet (keepalive, data or handshake) was received."""
        self._cancel(Timer.NEW_HANDSHAKE)

    def on_any_authenticated_packet_traversed(self, now: float) -> None:
        """Any authenticated packet is about to be sent or was received."""
        if self.persistent_keepalive > 0:
            self._arm(Timer.PERSISTENT_KEEPALIVE, now + self.persistent_keepalive)

    def on_handshake_initiated(self, now: float) -> None:
        """An initiation was sent."""
        self.last_sent_handshake = now
        self._arm(Timer.RETRANSMIT_HANDSHAKE, now + self.timers.rekey_timeout + self._jitter())

    def on_handshake_complete(self, now: float) -> None:
        """A response was consumed, or the first data arrived on a responder's new session."""
        self._cancel(Timer.RETRANSMIT_HANDSHAKE)
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False
        self.last_handshake = now

    def on_session_derived(self, now: float) -> None:
        """A new session was derived (before sending a response or after consuming one)."""
        self._arm(Timer.ZERO_KEY_MATERIAL, now + self.timers.zero_key_material_after)

    # --- expiries --------------------------------------------------------------------------------

    def expired_retransmit_handshake(self, now: float) -> list[TimerAction]:
        if self.handshake_attempts > self.timers.max_timer_handshakes:
            self._cancel(Timer.SEND_KEEPALIVE)
            if not self.pending(Timer.ZERO_KEY_MATERIAL):
                self._arm(Timer.ZERO_KEY_MATERIAL, now + self.timers.zero_key_material_after)
            return [TimerAction.GIVE_UP]
        self.handshake_attempts += 1
        if self.want_initiation(now, is_retry=True):
            return [TimerAction.SEND_INITIATION]
        return []

    def expired_send_keepalive(self, now: float) -> list[TimerAction]:
        if self.need_another_keepalive:
            self.need_another_keepalive = False
            self._arm(Timer.SEND_KEEPALIVE, now + self.timers.keepalive_timeout)
        return [TimerAction.SEND_KEEPALIVE]

    def expired_new_handshake(self, now: float) -> list[TimerAction]:
        if self.want_initiation(now):
            return [TimerAction.SEND_INITIATION]
        return []

    def expired_zero_key_material(self, now: float) -> list[TimerAction]:
        return [TimerAction.ZERO_KEYS]

    def expired_persistent_keepalive(self, now: float) -> list[TimerAction]:
        if self.persistent_keepalive > 0:
            return [TimerAction.SEND_KEEPALIVE]
        return []
