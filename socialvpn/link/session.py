"""Transport sessions: keys, counters, the 8192-bit replay window, seal/open of type-4 messages.

This is the data path, so it is kept lean: one ChaCha20Poly1305 object per direction made when
the session is born, ``struct`` objects compiled once, the ciphertext written straight into the
output buffer, and the received payload decrypted from a view of the datagram (no slicing copy).

:meth:`Session.open` raises :class:`~socialvpn.errors.ProtocolError` with reason

``malformed``  not a transport message     ``index``    for another session (receiver index)
``auth``       the AEAD tag does not verify ``replay``   counter already seen or behind the window
``expired``    the session is older than REJECT_AFTER_TIME, zeroed, or the counter is at the limit

The replay window (RFC 6479, as wireguard-go ``replay/replay.go``) is checked and updated only
after the AEAD succeeds, so forged packets cannot move it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from socialvpn.errors import ProtocolError
from socialvpn.link.constants import (
    COUNTER_BITS_TOTAL,
    COUNTER_REDUNDANT_BITS,
    COUNTER_WINDOW_SIZE,
    DEFAULT_TIMERS,
    KEY_SIZE,
    MAX_CONTENT_SIZE,
    MAX_MESSAGE_SIZE,
    MESSAGE_TRANSPORT_HEADER_SIZE,
    MESSAGE_TRANSPORT_SIZE,
    MESSAGE_TRANSPORT_TYPE,
    PADDING_MULTIPLE,
    REJECT_AFTER_MESSAGES,
    LinkTimers,
)

Buffer = bytes | bytearray | memoryview

_HEADER: Final = struct.Struct("<IIQ")  # type, receiver, counter
_NONCE: Final = struct.Struct("<4xQ")
_RING_WORDS: Final = COUNTER_BITS_TOTAL // COUNTER_REDUNDANT_BITS  # 128
_RING_MASK: Final = _RING_WORDS - 1
_WORD_SHIFT: Final = COUNTER_REDUNDANT_BITS.bit_length() - 1  # 6
_BIT_MASK: Final = COUNTER_REDUNDANT_BITS - 1
_ZEROS: Final = bytes(PADDING_MULTIPLE)


class ReplayWindow:
    """Sliding-window replay filter of 8192 bits (RFC 6479): a ring of 128 64-bit words.

    Counters up to ``COUNTER_WINDOW_SIZE`` (8128) behind the highest seen are tracked; older ones
    are refused. Not thread-safe; a session is owned by one thread.
    """

    __slots__ = ("_last", "_ring")

    def __init__(self) -> None:
        self._last = 0
        self._ring = [0] * _RING_WORDS

    def reset(self) -> None:
        self._last = 0
        self._ring = [0] * _RING_WORDS

    @property
    def highest(self) -> int:
        return self._last

    def seen(self, counter: int) -> bool:
        """True if ``counter`` would be refused (read-only)."""
        last = self._last
        if counter > last:
            return False
        if last - counter > COUNTER_WINDOW_SIZE:
            return True
        return bool(self._ring[(counter >> _WORD_SHIFT) & _RING_MASK] >> (counter & _BIT_MASK) & 1)

    def validate(self, counter: int, limit: int = REJECT_AFTER_MESSAGES) -> bool:
        """Accept ``counter`` once: True and mark it, or False for a replay / too old / >= limit."""
        if counter >= limit or counter < 0:
            return False
        ring = self._ring
        index = counter >> _WORD_SHIFT
        last = self._last
        if counter > last and index == last >> _WORD_SHIFT:
            # The common case, the next counter in the same word: its bit cannot be set yet
            # (a word is cleared when the window moves into it).
            self._last = counter
            ring[index & _RING_MASK] |= 1 << (counter & _BIT_MASK)
            return True
        if counter > last:
            current = last >> _WORD_SHIFT
            diff = index - current
            if diff > _RING_WORDS:
                diff = _RING_WORDS
            for i in range(current + 1, current + diff + 1):
                ring[i & _RING_MASK] = 0
            self._last = counter
        elif last - counter > COUNTER_WINDOW_SIZE:
            return False
        index &= _RING_MASK
        bit = 1 << (counter & _BIT_MASK)
        word = ring[index]
        if word & bit:
            return False
        ring[index] = word | bit
        return True


def padded_size(size: int, mtu: int = 0) -> int:
    """The plaintext size after WireGuard's padding to a multiple of 16, capped at ``mtu``
    (wireguard-go ``calculatePaddingSize``). ``mtu == 0`` means no cap."""
    if mtu <= 0:
        return (size + PADDING_MULTIPLE - 1) & ~(PADDING_MULTIPLE - 1)
    last_unit = size % mtu if size > mtu else size
    padded = (last_unit + PADDING_MULTIPLE - 1) & ~(PADDING_MULTIPLE - 1)
    if padded > mtu:
        padded = mtu
    return size + (padded - last_unit)


class SessionExpired(ProtocolError):
    """Raised by :meth:`Session.seal` when the session may no longer send (age or counter):
    the caller should start a handshake. A ProtocolError subclass with reason ``expired``."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "expired")


class Session:
    """One WireGuard keypair: a sending key with its counter and a receiving key with its replay
    window. ``created`` is the monotonic time of the handshake that made it."""

    __slots__ = (
        "_receiver",
        "_sender",
        "created",
        "is_initiator",
        "limit",
        "local_index",
        "reject_after_time",
        "remote_index",
        "replay",
        "send_counter",
    )

    def __init__(
        self,
        send_key: bytes,
        receive_key: bytes,
        *,
        local_index: int,
        remote_index: int,
        created: float,
        is_initiator: bool,
        timers: LinkTimers = DEFAULT_TIMERS,
    ) -> None:
        if len(send_key) != KEY_SIZE or len(receive_key) != KEY_SIZE:
            raise ValueError("transport keys are 32 bytes")
        self._sender: ChaCha20Poly1305 | None = ChaCha20Poly1305(bytes(send_key))
        self._receiver: ChaCha20Poly1305 | None = ChaCha20Poly1305(bytes(receive_key))
        self.local_index = local_index
        self.remote_index = remote_index
        self.created = created
        self.is_initiator = is_initiator
        self.send_counter = 0
        self.replay = ReplayWindow()
        self.reject_after_time = timers.reject_after_time
        self.limit = timers.reject_after_messages

    def __repr__(self) -> str:
        role = "initiator" if self.is_initiator else "responder"
        return (
            f"<Session {role} local={self.local_index:#010x} remote={self.remote_index:#010x}"
            f" sent={self.send_counter}>"
        )

    @property
    def zeroed(self) -> bool:
        return self._sender is None

    def age(self, now: float) -> float:
        return now - self.created

    def expired(self, now: float) -> bool:
        """True once the session must not be used in either direction (REJECT_AFTER_TIME)."""
        return self._sender is None or now - self.created >= self.reject_after_time

    def can_send(self, now: float) -> bool:
        return not self.expired(now) and self.send_counter < self.limit

    def seal(self, plaintext: Buffer, now: float, mtu: int = 0) -> bytearray:
        """Encrypt one inner packet (empty for a keepalive) into a type-4 message.

        The plaintext is zero-padded to a multiple of 16 (not beyond ``mtu`` if given). Raises
        :class:`SessionExpired` when the session is too old or its counter is used up.
        """
        size = len(plaintext)
        if size > MAX_CONTENT_SIZE:
            raise ValueError(f"inner packet larger than {MAX_CONTENT_SIZE} bytes")
        counter = self.reserve(1, now)
        out = bytearray(MESSAGE_TRANSPORT_SIZE + padded_size(size, mtu))
        self.seal_into(counter, plaintext, mtu, memoryview(out))
        return out

    def reserve(self, count: int, now: float) -> int:
        """Take ``count`` consecutive send counters and return the first. Each is sealed once
        with :meth:`seal_into` (which may then run outside the caller's lock: a counter, hence
        a nonce, is never handed out twice). Raises :class:`SessionExpired` when the session is
        too old or fewer than ``count`` counters are left."""
        counter = self.send_counter
        if self._sender is None or now - self.created >= self.reject_after_time:
            raise SessionExpired("session too old to send")
        if counter + count > self.limit:
            raise SessionExpired("session send counter exhausted")
        self.send_counter = counter + count
        return counter

    def seal_into(self, counter: int, plaintext: Buffer, mtu: int, out: memoryview) -> int:
        """Seal ``plaintext`` with a counter from :meth:`reserve` into the start of ``out``
        (at least ``MESSAGE_TRANSPORT_SIZE + padded_size(len(plaintext), mtu)`` bytes); return
        the message size. Raises :class:`SessionExpired` if the session was zeroed since."""
        sender = self._sender
        if sender is None:
            raise SessionExpired("session zeroed")
        size = len(plaintext)
        if size > MAX_CONTENT_SIZE:
            raise ValueError(f"inner packet larger than {MAX_CONTENT_SIZE} bytes")
        if size == mtu or (size < mtu and not size & 15):
            padded = size  # the common cases, without the general rule below
        else:
            padded = padded_size(size, mtu)
            if padded != size:
                pad = padded - size
                plaintext = bytes(plaintext) + (_ZEROS[:pad] if pad <= PADDING_MULTIPLE
                                                else bytes(pad))
        end = MESSAGE_TRANSPORT_SIZE + padded
        _HEADER.pack_into(out, 0, MESSAGE_TRANSPORT_TYPE, self.remote_index, counter)
        sender.encrypt_into(_NONCE.pack(counter), plaintext, None,
                            out[MESSAGE_TRANSPORT_HEADER_SIZE:end])
        return end

    def open(self, message: Buffer, now: float) -> bytes:
        """Authenticate and decrypt a type-4 message; return the (padded) inner packet.

        Raises ProtocolError (see the module doc for reasons); the replay window only moves when
        the tag verified.
        """
        try:
            size = len(message)
            kind, receiver, counter = _HEADER.unpack_from(message, 0)
        except (struct.error, TypeError):
            raise ProtocolError("not a transport message", "malformed") from None
        if size < MESSAGE_TRANSPORT_SIZE or size > MAX_MESSAGE_SIZE:
            raise ProtocolError("transport message of impossible size", "malformed")
        if kind != MESSAGE_TRANSPORT_TYPE:
            raise ProtocolError("not a transport message", "malformed")
        if receiver != self.local_index:
            raise ProtocolError("transport message for another session", "index")
        receiver_aead = self._receiver
        if receiver_aead is None or now - self.created >= self.reject_after_time:
            raise ProtocolError("session expired", "expired")
        if counter >= self.limit:
            raise ProtocolError("counter beyond the reject limit", "expired")
        view = message if isinstance(message, memoryview) else memoryview(message)
        try:
            plaintext = receiver_aead.decrypt(
                _NONCE.pack(counter), view[MESSAGE_TRANSPORT_HEADER_SIZE:], None
            )
        except InvalidTag:
            raise ProtocolError("transport AEAD tag does not verify", "auth") from None
        if not self.replay.validate(counter, self.limit):
            raise ProtocolError("replayed or too old transport counter", "replay")
        return plaintext

    def zero(self) -> None:
        """Drop the keys. (Python cannot scrub memory; this drops our only references.)"""
        self._sender = None
        self._receiver = None


def inner_length(plaintext: Buffer) -> int:
    """The length of the IP packet at the start of a decrypted payload (WireGuard trims padding
    by the IP header). 0 for a keepalive; ProtocolError ``malformed`` for anything that is not a
    whole IPv4/IPv6 packet."""
    size = len(plaintext)
    if size >= 20 and plaintext[0] >> 4 == 4:  # the common case first, without slices
        length = (plaintext[2] << 8) | plaintext[3]
        if 20 <= length <= size:
            return length
    if size == 0:
        return 0
    version = plaintext[0] >> 4
    if version == 4 and size >= 20:
        length = int.from_bytes(plaintext[2:4], "big")
        if length < 20:
            raise ProtocolError("IPv4 total length below the header size", "malformed")
    elif version == 6 and size >= 40:
        length = 40 + int.from_bytes(plaintext[4:6], "big")
    else:
        raise ProtocolError("inner packet is not IPv4 or IPv6", "malformed")
    if length > size:
        raise ProtocolError("inner packet longer than the payload", "malformed")
    return length


class Keypairs:
    """A peer's sessions: ``current`` (send with this), ``previous`` (still receive), and ``next``
    (a responder's new session, unconfirmed until the initiator's first packet arrives on it).
    As wireguard-go ``Keypairs``/``BeginSymmetricSession``/``ReceivedWithKeypair``. Methods return
    the sessions they dropped, so the caller can free their indices."""

    __slots__ = ("current", "next", "previous")

    def __init__(self) -> None:
        self.current: Session | None = None
        self.previous: Session | None = None
        self.next: Session | None = None

    def __iter__(self) -> Iterator[Session]:
        for session in (self.current, self.previous, self.next):
            if session is not None:
                yield session

    def install(self, session: Session) -> list[Session]:
        """Add a freshly derived session; return the sessions it displaces (zeroed)."""
        dropped: list[Session] = []
        if session.is_initiator:
            if self.next is not None:
                dropped += [s for s in (self.previous, self.current) if s is not None]
                self.previous, self.next = self.next, None
            else:
                if self.previous is not None:
                    dropped.append(self.previous)
                self.previous = self.current
            self.current = session
        else:
            dropped += [s for s in (self.next, self.previous) if s is not None]
            self.next = session
            self.previous = None
        for old in dropped:
            old.zero()
        return dropped

    def received_with(self, session: Session) -> tuple[bool, list[Session]]:
        """Note an authenticated packet on ``session``. Returns (confirmed, dropped): confirmed is
        True when this packet promoted ``next`` to ``current`` (the handshake is now complete)."""
        if session is not self.next:
            return False, []
        dropped = [self.previous] if self.previous is not None else []
        self.previous = self.current
        self.current = session
        self.next = None
        for old in dropped:
            old.zero()
        return True, dropped

    def sending(self, now: float) -> Session | None:
        """The session to send with, if it may still send."""
        current = self.current
        if current is not None and current.can_send(now):
            return current
        return None

    def clear(self) -> list[Session]:
        dropped = list(self)
        for session in dropped:
            session.zero()
        self.current = self.previous = self.next = None
        return dropped
