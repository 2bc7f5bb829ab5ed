"""The WireGuard handshake: Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s, mac1/mac2 cookies, TAI64N.

Pure and sans-I/O: time (``now``, monotonic seconds; ``wall``, Unix seconds for TAI64N) comes in as
an argument; ephemeral keys and random bytes come from injected callables, so tests are
deterministic. Any bad peer input raises :class:`~socialvpn.errors.ProtocolError` and leaves every
state object as it was. Reasons used here:

``malformed``  wrong size or type            ``mac1``     mac1 does not verify
``auth``       an AEAD tag does not verify   ``lowpoint`` a DH result is all zero (low-order point)
``replay``     initiation timestamp not newer than the last accepted one from that peer
``flood``      a second initiation from one peer within HANDSHAKE_INITIATION_RATE
``unknown``    the initiator's static key belongs to no peer we know
``state``      a response or cookie reply we are not waiting for

Layers, bottom up:

1. primitives: :func:`hash_`, :func:`hmac_`, :func:`kdf`, :func:`mac`, :func:`dh`, AEAD,
   :func:`hchacha20` / :func:`xaead_encrypt` (XChaCha20-Poly1305), :func:`tai64n`;
2. the generic Noise objects :class:`CipherState`, :class:`SymmetricState` and
   :class:`NoiseHandshake` (IKpsk2 with any prologue, psk and payloads);
3. WireGuard on top: :class:`StaticIdentity` (our key; consumes initiations), :class:`PeerHandshake`
   (one per peer: creates initiations and responses, consumes responses, derives the session),
   :class:`CookieChecker` and :class:`CookieGenerator` (mac1/mac2 and cookie replies).

Python cannot guarantee that key material is erased (``bytes`` are immutable and may be copied);
``zero()`` drops every reference we hold, which is the best this runtime offers.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import os
import struct
from collections.abc import Callable
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from socialvpn.errors import ProtocolError
from socialvpn.link import packet
from socialvpn.link.constants import (
    CONSTRUCTION,
    COOKIE_NONCE_SIZE,
    DEFAULT_TIMERS,
    IDENTIFIER,
    KEY_SIZE,
    LABEL_COOKIE,
    LABEL_MAC1,
    MAC_SIZE,
    MESSAGE_INITIATION_SIZE,
    MESSAGE_INITIATION_TYPE,
    MESSAGE_RESPONSE_SIZE,
    MESSAGE_RESPONSE_TYPE,
    TAG_SIZE,
    TIMESTAMP_SIZE,
    LinkTimers,
)
from socialvpn.link.ratelimit import InitiationFloodGuard
from socialvpn.link.session import Session

Buffer = bytes | bytearray | memoryview
EphemeralFactory = Callable[[], X25519PrivateKey]
RandomBytes = Callable[[int], bytes]

_ZERO_KEY: Final = bytes(KEY_SIZE)


class HandshakeStateError(RuntimeError):
    """A *local* illegal move (e.g. creating a response with no initiation consumed): a bug."""


# --- primitives -----------------------------------------------------------------------------------


def hash_(*parts: Buffer) -> bytes:
    """HASH: BLAKE2s-256 of the concatenation."""
    h = hashlib.blake2s()
    for part in parts:
        h.update(part)
    return h.digest()


def hmac_(key: Buffer, data: Buffer) -> bytes:
    """HMAC-BLAKE2s-256 (RFC 2104), as the Noise HKDF and WireGuard's KDF use it."""
    return hmac.digest(bytes(key), bytes(data), "blake2s")


def mac(key: Buffer, data: Buffer) -> bytes:
    """MAC: keyed BLAKE2s with a 16-byte output (mac1, mac2, cookies)."""
    return hashlib.blake2s(data, digest_size=MAC_SIZE, key=bytes(key)).digest()


def kdf(key: Buffer, data: Buffer, n: int) -> tuple[bytes, ...]:
    """KDF_n / Noise HKDF: ``n`` (1..3) 32-byte outputs from chaining key ``key`` and ``data``."""
    if not 1 <= n <= 3:
        raise ValueError("kdf gives 1 to 3 outputs")
    prk = hmac_(key, data)
    out: list[bytes] = []
    previous = b""
    for i in range(1, n + 1):
        previous = hmac_(prk, previous + bytes((i,)))
        out.append(previous)
    return tuple(out)


def public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def dh(private: X25519PrivateKey, public: Buffer) -> bytes:
    """X25519; ProtocolError ``lowpoint`` when the result is all zero (a low-order point)."""
    if len(public) != KEY_SIZE:
        raise ProtocolError("public key must be 32 bytes", "malformed")
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(bytes(public)))
    except ValueError:  # OpenSSL refuses an all-zero shared secret
        raise ProtocolError("X25519 result is all zero", "lowpoint") from None
    if hmac.compare_digest(shared, _ZERO_KEY):
        raise ProtocolError("X25519 result is all zero", "lowpoint")
    return shared


_NONCE: Final = struct.Struct("<4xQ")


def aead_encrypt(key: bytes, counter: int, plaintext: Buffer, ad: Buffer) -> bytes:
    """ChaCha20-Poly1305 with the Noise nonce (32 zero bits, 64-bit little-endian counter)."""
    return ChaCha20Poly1305(key).encrypt(_NONCE.pack(counter), bytes(plaintext), bytes(ad))


def aead_decrypt(key: bytes, counter: int, ciphertext: Buffer, ad: Buffer) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(_NONCE.pack(counter), bytes(ciphertext), bytes(ad))
    except InvalidTag:
        raise ProtocolError("AEAD tag does not verify", "auth") from None


_SIGMA: Final = struct.unpack("<4I", b"expand 32-byte k")
_M32: Final = 0xFFFFFFFF


def hchacha20(key: Buffer, nonce: Buffer) -> bytes:
    """HChaCha20 (draft-irtf-cfrg-xchacha §2.2): a 32-byte subkey from a key and 16-byte nonce."""
    if len(key) != KEY_SIZE or len(nonce) != 16:
        raise ValueError("hchacha20 takes a 32-byte key and a 16-byte nonce")
    x = [*_SIGMA, *struct.unpack("<8I", bytes(key)), *struct.unpack("<4I", bytes(nonce))]

    def quarter(a: int, b: int, c: int, d: int) -> None:
        x[a] = (x[a] + x[b]) & _M32
        v = x[d] ^ x[a]
        x[d] = ((v << 16) | (v >> 16)) & _M32
        x[c] = (x[c] + x[d]) & _M32
        v = x[b] ^ x[c]
        x[b] = ((v << 12) | (v >> 20)) & _M32
        x[a] = (x[a] + x[b]) & _M32
        v = x[d] ^ x[a]
        x[d] = ((v << 8) | (v >> 24)) & _M32
        x[c] = (x[c] + x[d]) & _M32
        v = x[b] ^ x[c]
        x[b] = ((v << 7) | (v >> 25)) & _M32

    for _ in range(10):
        quarter(0, 4, 8, 12)
        quarter(1, 5, 9, 13)
        quarter(2, 6, 10, 14)
        quarter(3, 7, 11, 15)
        quarter(0, 5, 10, 15)
        quarter(1, 6, 11, 12)
        quarter(2, 7, 8, 13)
        quarter(3, 4, 9, 14)
    return struct.pack("<8I", *x[0:4], *x[12:16])


def _xchacha(key: Buffer, nonce: Buffer) -> tuple[ChaCha20Poly1305, bytes]:
    if len(nonce) != COOKIE_NONCE_SIZE:
        raise ValueError("XChaCha20-Poly1305 takes a 24-byte nonce")
    subkey = hchacha20(key, bytes(nonce[:16]))
    return ChaCha20Poly1305(subkey), b"\x00\x00\x00\x00" + bytes(nonce[16:24])


def xaead_encrypt(key: Buffer, nonce: Buffer, plaintext: Buffer, ad: Buffer) -> bytes:
    """XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha), built from HChaCha20 + ChaCha20-Poly1305."""
    cipher, short_nonce = _xchacha(key, nonce)
    return cipher.encrypt(short_nonce, bytes(plaintext), bytes(ad))


def xaead_decrypt(key: Buffer, nonce: Buffer, ciphertext: Buffer, ad: Buffer) -> bytes:
    cipher, short_nonce = _xchacha(key, nonce)
    try:
        return cipher.decrypt(short_nonce, bytes(ciphertext), bytes(ad))
    except InvalidTag:
        raise ProtocolError("AEAD tag does not verify", "auth") from None


_TAI64_BASE: Final = 0x400000000000000A  # 2**62 + 10 (TAI - UTC offset at the epoch)
_TAI64N: Final = struct.Struct(">QI")
_WHITENER_MASK: Final = 0x1000000 - 1  # round nanoseconds down to ~16.8 ms (timing side channel)


def tai64n(wall: float) -> bytes:
    """The 12-byte TAI64N label of Unix time ``wall``, with the low 24 bits of nanoseconds cleared
    (as wireguard-go does), so it reveals nothing finer than ~16 ms."""
    seconds = int(wall // 1)
    nanos = min(int((wall - seconds) * 1e9), 999_999_999) & ~_WHITENER_MASK
    return _TAI64N.pack(_TAI64_BASE + seconds, nanos)


# --- generic Noise --------------------------------------------------------------------------------


class CipherState:
    """Noise CipherState: a key and a 64-bit nonce counter."""

    __slots__ = ("_aead", "n")

    def __init__(self, key: bytes | None = None) -> None:
        self._aead = ChaCha20Poly1305(key) if key is not None else None
        self.n = 0

    @property
    def has_key(self) -> bool:
        return self._aead is not None

    def encrypt_with_ad(self, ad: Buffer, plaintext: Buffer) -> bytes:
        if self._aead is None:
            return bytes(plaintext)
        if self.n >= 2**64 - 1:
            raise HandshakeStateError("nonce exhausted")
        out = self._aead.encrypt(_NONCE.pack(self.n), bytes(plaintext), bytes(ad))
        self.n += 1
        return out

    def decrypt_with_ad(self, ad: Buffer, ciphertext: Buffer) -> bytes:
        if self._aead is None:
            return bytes(ciphertext)
        if self.n >= 2**64 - 1:
            raise HandshakeStateError("nonce exhausted")
        try:
            out = self._aead.decrypt(_NONCE.pack(self.n), bytes(ciphertext), bytes(ad))
        except InvalidTag:
            raise ProtocolError("AEAD tag does not verify", "auth") from None
        self.n += 1
        return out


class SymmetricState:
    """Noise SymmetricState with BLAKE2s: chaining key ``ck``, handshake hash ``h``, key ``k``."""

    __slots__ = ("ck", "h", "k", "n")

    def __init__(self, protocol_name: bytes = CONSTRUCTION) -> None:
        h = protocol_name.ljust(32, b"\0") if len(protocol_name) <= 32 else hash_(protocol_name)
        self.ck = h
        self.h = h
        self.k: bytes | None = None
        self.n = 0

    def copy(self) -> SymmetricState:
        other = SymmetricState.__new__(SymmetricState)
        other.ck, other.h, other.k, other.n = self.ck, self.h, self.k, self.n
        return other

    def mix_hash(self, data: Buffer) -> None:
        self.h = hash_(self.h, data)

    def mix_key(self, ikm: Buffer) -> None:
        self.ck, self.k = kdf(self.ck, ikm, 2)
        self.n = 0

    def mix_key_and_hash(self, ikm: Buffer) -> None:
        self.ck, temp_h, self.k = kdf(self.ck, ikm, 3)
        self.n = 0
        self.mix_hash(temp_h)

    def encrypt_and_hash(self, plaintext: Buffer) -> bytes:
        if self.k is None:
            out = bytes(plaintext)
        else:
            out = aead_encrypt(self.k, self.n, plaintext, self.h)
            self.n += 1
        self.mix_hash(out)
        return out

    def decrypt_and_hash(self, ciphertext: Buffer) -> bytes:
        if self.k is None:
            out = bytes(ciphertext)
        else:
            out = aead_decrypt(self.k, self.n, ciphertext, self.h)
            self.n += 1
        self.mix_hash(ciphertext)
        return out

    def split(self) -> tuple[bytes, bytes]:
        """The two transport keys: initiator-to-responder, responder-to-initiator."""
        k1, k2 = kdf(self.ck, b"", 2)
        return k1, k2


# The handshake pattern as a table: pre-message tokens, then one token tuple per message.
# Message i is written by the initiator when i is even.
IK_PRE_MESSAGES: Final = ((), ("s",))  # (initiator's, responder's) pre-messages
IKPSK2_MESSAGES: Final = (("e", "es", "s", "ss"), ("e", "ee", "se", "psk"))


class NoiseHandshake:
    """A generic Noise IKpsk2 handshake (25519, ChaChaPoly, BLAKE2s) for one side.

    ``write_message(payload)`` and ``read_message(message)`` follow the pattern table; reading is
    transactional: on ProtocolError the state is exactly as before. After two messages,
    :attr:`complete` is true and :meth:`split` gives the transport keys.
    """

    def __init__(
        self,
        *,
        initiator: bool,
        static: X25519PrivateKey,
        remote_static: bytes | None = None,
        prologue: bytes = b"",
        psk: bytes | None = None,
        ephemeral: EphemeralFactory = X25519PrivateKey.generate,
        protocol_name: bytes = CONSTRUCTION,
    ) -> None:
        if initiator and remote_static is None:
            raise ValueError("the IK initiator must know the responder's static key")
        if psk is not None and len(psk) != KEY_SIZE:
            raise ValueError("psk must be 32 bytes")
        self.initiator = initiator
        self._s = static
        self._s_pub = public_bytes(static)
        self._e: X25519PrivateKey | None = None
        self.remote_static = remote_static
        self.remote_ephemeral: bytes | None = None
        self.psk = psk if psk is not None else _ZERO_KEY
        self.ephemeral_factory = ephemeral
        self._message = 0
        self._ss = SymmetricState(protocol_name)
        self._ss.mix_hash(prologue)
        # pre-message: the responder's static key
        self._ss.mix_hash(self._s_pub if not initiator else remote_static)  # type: ignore[arg-type]

    @property
    def complete(self) -> bool:
        return self._message >= len(IKPSK2_MESSAGES)

    @property
    def handshake_hash(self) -> bytes:
        return self._ss.h

    @property
    def chaining_key(self) -> bytes:
        return self._ss.ck

    @property
    def local_ephemeral_public(self) -> bytes | None:
        return public_bytes(self._e) if self._e is not None else None

    def _my_turn(self) -> bool:
        return (self._message % 2 == 0) == self.initiator

    def _dh_token(
        self, token: str, e: X25519PrivateKey | None, re: bytes | None, rs: bytes | None
    ) -> bytes:
        # token names are (initiator key)(responder key); map them to (ours, theirs)
        mine, theirs = (token[0], token[1]) if self.initiator else (token[1], token[0])
        private = self._s if mine == "s" else e
        public = rs if theirs == "s" else re
        if private is None or public is None:
            raise HandshakeStateError(f"token {token} without the keys it needs")
        return dh(private, public)

    def write_message(self, payload: Buffer = b"") -> bytes:
        if self.complete or not self._my_turn():
            raise HandshakeStateError("not our turn to write")
        ss = self._ss.copy()
        e = self._e
        out = bytearray()
        for token in IKPSK2_MESSAGES[self._message]:
            if token == "e":
                e = self.ephemeral_factory()
                e_pub = public_bytes(e)
                out += e_pub
                ss.mix_hash(e_pub)
                ss.mix_key(e_pub)  # psk handshakes also mix the ephemeral into the key
            elif token == "s":
                out += ss.encrypt_and_hash(self._s_pub)
            elif token == "psk":
                ss.mix_key_and_hash(self.psk)
            else:
                ss.mix_key(self._dh_token(token, e, self.remote_ephemeral, self.remote_static))
        out += ss.encrypt_and_hash(payload)
        self._ss, self._e = ss, e
        self._message += 1
        return bytes(out)

    def read_message(self, message: Buffer) -> bytes:
        if self.complete or self._my_turn():
            raise HandshakeStateError("not our turn to read")
        data = bytes(message)
        ss = self._ss.copy()
        re = self.remote_ephemeral
        rs = self.remote_static
        pos = 0
        for token in IKPSK2_MESSAGES[self._message]:
            if token == "e":
                if len(data) - pos < KEY_SIZE:
                    raise ProtocolError("handshake message too short", "malformed")
                re = data[pos : pos + KEY_SIZE]
                pos += KEY_SIZE
                ss.mix_hash(re)
                ss.mix_key(re)
            elif token == "s":
                size = KEY_SIZE + (TAG_SIZE if ss.k is not None else 0)
                if len(data) - pos < size:
                    raise ProtocolError("handshake message too short", "malformed")
                rs = ss.decrypt_and_hash(data[pos : pos + size])
                pos += size
            elif token == "psk":
                ss.mix_key_and_hash(self.psk)
            else:
                ss.mix_key(self._dh_token(token, self._e, re, rs))
        if ss.k is not None and len(data) - pos < TAG_SIZE:
            raise ProtocolError("handshake message too short", "malformed")
        payload = ss.decrypt_and_hash(data[pos:])
        self._ss, self.remote_ephemeral, self.remote_static = ss, re, rs
        self._message += 1
        return payload

    def split(self) -> tuple[CipherState, CipherState]:
        """(sending, receiving) transport CipherStates for this side."""
        if not self.complete:
            raise HandshakeStateError("handshake not complete")
        k1, k2 = self._ss.split()
        if self.initiator:
            return CipherState(k1), CipherState(k2)
        return CipherState(k2), CipherState(k1)

    def transport_keys(self) -> tuple[bytes, bytes]:
        """(sending key, receiving key) for this side."""
        if not self.complete:
            raise HandshakeStateError("handshake not complete")
        k1, k2 = self._ss.split()
        return (k1, k2) if self.initiator else (k2, k1)


# --- mac1 / mac2 / cookies ------------------------------------------------------------------------


def _mac_offsets(msg: Buffer) -> tuple[int, int]:
    """(mac1 offset, mac2 offset) of a well-sized initiation or response; else ProtocolError."""
    size = len(msg)
    kind = packet.message_type(msg)
    if not (
        (kind == MESSAGE_INITIATION_TYPE and size == MESSAGE_INITIATION_SIZE)
        or (kind == MESSAGE_RESPONSE_TYPE and size == MESSAGE_RESPONSE_SIZE)
    ):
        raise ProtocolError("not a handshake message with macs", "malformed")
    return size - 2 * MAC_SIZE, size - MAC_SIZE


def source_bytes(host: str | bytes, port: int) -> bytes:
    """The bytes a cookie is bound to: the packed IP address then the port (big-endian)."""
    packed = host if isinstance(host, bytes) else ipaddress.ip_address(host).packed
    return bytes(packed) + port.to_bytes(2, "big")


class CookieChecker:
    """Our side of mac1/mac2 (wireguard-go ``CookieChecker``): verify macs, make cookie replies.

    ``public`` is *our* static public key. The cookie secret is random and rotates every
    ``cookie_refresh_time`` (120 s); a mac2 made with an older secret no longer verifies.
    """

    def __init__(
        self,
        public: bytes,
        *,
        timers: LinkTimers = DEFAULT_TIMERS,
        rng: RandomBytes = os.urandom,
    ) -> None:
        self.mac1_key = hash_(LABEL_MAC1, public)
        self.cookie_key = hash_(LABEL_COOKIE, public)
        self._timers = timers
        self._rng = rng
        self._secret = _ZERO_KEY
        self._secret_set: float | None = None

    def check_mac1(self, msg: Buffer) -> bool:
        try:
            smac1, smac2 = _mac_offsets(msg)
        except ProtocolError:
            return False
        expected = mac(self.mac1_key, msg[:smac1])
        return hmac.compare_digest(expected, bytes(msg[smac1:smac2]))

    def _secret_fresh(self, now: float) -> bool:
        return self._secret_set is not None and now - self._secret_set <= (
            self._timers.cookie_refresh_time
        )

    def cookie(self, source: bytes, now: float) -> bytes | None:
        """The cookie for ``source`` under the current secret, or None if the secret is stale."""
        if not self._secret_fresh(now):
            return None
        return mac(self._secret, source)

    def check_mac2(self, msg: Buffer, source: bytes, now: float) -> bool:
        try:
            _, smac2 = _mac_offsets(msg)
        except ProtocolError:
            return False
        cookie = self.cookie(source, now)
        if cookie is None:
            return False
        expected = mac(cookie, msg[:smac2])
        return hmac.compare_digest(expected, bytes(msg[smac2:]))

    def create_reply(self, msg: Buffer, receiver: int, source: bytes, now: float) -> bytes:
        """A type-3 cookie reply to ``msg`` (whose mac1 the caller has verified).

        ``receiver`` is the sender index of ``msg``. Raises ProtocolError if ``msg`` is not a
        handshake message.
        """
        smac1, smac2 = _mac_offsets(msg)
        if not self._secret_fresh(now):
            self._secret = self._rng(KEY_SIZE)
            self._secret_set = now
        cookie = mac(self._secret, source)
        nonce = self._rng(COOKIE_NONCE_SIZE)
        encrypted = xaead_encrypt(self.cookie_key, nonce, cookie, msg[smac1:smac2])
        return packet.pack_cookie_reply(packet.CookieReply(receiver, nonce, encrypted))


class CookieGenerator:
    """The peer-facing side of mac1/mac2 (wireguard-go ``CookieGenerator``).

    ``remote_public`` is the *peer's* static key: mac1 on what we send is keyed by it; a cookie
    reply from the peer is decrypted with it; the cookie it gives us makes our mac2.
    """

    def __init__(self, remote_public: bytes, *, timers: LinkTimers = DEFAULT_TIMERS) -> None:
        self.mac1_key = hash_(LABEL_MAC1, remote_public)
        self.cookie_key = hash_(LABEL_COOKIE, remote_public)
        self._timers = timers
        self._cookie = bytes(MAC_SIZE)
        self._cookie_set: float | None = None
        self._last_mac1: bytes | None = None

    @property
    def has_cookie(self) -> bool:
        return self._cookie_set is not None

    def add_macs(self, msg: bytearray, now: float) -> None:
        """Fill mac1 (always) and mac2 (when we hold a cookie younger than 120 s) in place."""
        smac1, smac2 = _mac_offsets(msg)
        mac1 = mac(self.mac1_key, memoryview(msg)[:smac1])
        msg[smac1:smac2] = mac1
        self._last_mac1 = mac1
        if self._cookie_set is None or now - self._cookie_set > self._timers.cookie_refresh_time:
            msg[smac2:] = bytes(MAC_SIZE)
            return
        msg[smac2:] = mac(self._cookie, memoryview(msg)[:smac2])

    def consume_reply(self, data: Buffer, now: float) -> None:
        """Take the cookie from a type-3 reply to the last message we sent; else ProtocolError."""
        reply = packet.unpack_cookie_reply(data)
        if self._last_mac1 is None:
            raise ProtocolError("cookie reply to nothing we sent", "state")
        cookie = xaead_decrypt(
            self.cookie_key, reply.nonce, reply.encrypted_cookie, self._last_mac1
        )
        self._cookie = cookie
        self._cookie_set = now


# --- WireGuard handshake --------------------------------------------------------------------------


class HandshakeState(enum.Enum):
    ZEROED = "zeroed"
    INITIATION_CREATED = "initiation-created"
    INITIATION_CONSUMED = "initiation-consumed"
    RESPONSE_CREATED = "response-created"
    RESPONSE_CONSUMED = "response-consumed"


_ANY_STATE: Final = frozenset(HandshakeState)

# The handshake's one transition table: event -> (states it may happen in, state it leads to).
# Events a peer causes ("consume_*") that arrive in the wrong state are ProtocolError "state";
# local events in the wrong state are HandshakeStateError (a bug in the caller).
HANDSHAKE_TRANSITIONS: Final[dict[str, tuple[frozenset[HandshakeState], HandshakeState]]] = {
    "create_initiation": (_ANY_STATE, HandshakeState.INITIATION_CREATED),
    "consume_initiation": (_ANY_STATE, HandshakeState.INITIATION_CONSUMED),
    "create_response": (
        frozenset({HandshakeState.INITIATION_CONSUMED}),
        HandshakeState.RESPONSE_CREATED,
    ),
    "consume_response": (
        frozenset({HandshakeState.INITIATION_CREATED}),
        HandshakeState.RESPONSE_CONSUMED,
    ),
    "begin_session": (
        frozenset({HandshakeState.RESPONSE_CREATED, HandshakeState.RESPONSE_CONSUMED}),
        HandshakeState.ZEROED,
    ),
    "zero": (_ANY_STATE, HandshakeState.ZEROED),
}


def _check_move(state: HandshakeState, event: str) -> HandshakeState:
    """The state after ``event`` in ``state``; raises if the table forbids the move."""
    allowed, target = HANDSHAKE_TRANSITIONS[event]
    if state not in allowed:
        if event.startswith("consume_"):
            raise ProtocolError(f"{event} while {state.value}", "state")
        raise HandshakeStateError(f"{event} while {state.value}")
    return target


class StaticIdentity:
    """Our device's static X25519 key plus what derives from it (mac1 checking, cookie replies)."""

    def __init__(
        self,
        private: X25519PrivateKey,
        *,
        timers: LinkTimers = DEFAULT_TIMERS,
        rng: RandomBytes = os.urandom,
    ) -> None:
        self.private = private
        self.public = public_bytes(private)
        self.timers = timers
        self.cookies = CookieChecker(self.public, timers=timers, rng=rng)

    def consume_initiation(
        self,
        data: Buffer,
        lookup: Callable[[bytes], PeerHandshake | None],
        now: float,
    ) -> PeerHandshake:
        """Verify and consume a type-1 message; return the peer it came from.

        ``lookup`` maps an initiator static public key to that peer's :class:`PeerHandshake`
        (None if unknown). On success the peer is in ``INITIATION_CONSUMED`` and ready for
        :meth:`PeerHandshake.create_response`. On any ProtocolError no state has changed.
        mac2 is the caller's business (only demanded under load, see :class:`CookieChecker`).
        """
        msg = packet.unpack_initiation(data)
        if not self.cookies.check_mac1(data):
            raise ProtocolError("initiation mac1 does not verify", "mac1")
        noise = NoiseHandshake(initiator=False, static=self.private, prologue=IDENTIFIER)
        timestamp = noise.read_message(
            msg.ephemeral + msg.encrypted_static + msg.encrypted_timestamp
        )
        assert noise.remote_static is not None and len(timestamp) == TIMESTAMP_SIZE
        peer = lookup(noise.remote_static)
        if peer is None or peer.identity is not self:
            raise ProtocolError("initiation from an unknown static key", "unknown")
        if not hmac.compare_digest(peer.remote_static, noise.remote_static):
            raise ProtocolError("lookup returned a different peer", "unknown")
        if timestamp <= peer.last_timestamp:
            raise ProtocolError("initiation timestamp is not newer than the last one", "replay")
        if not peer.flood_guard.allow(now):
            raise ProtocolError("initiations from this peer come too fast", "flood")
        # everything checked: commit
        noise.psk = peer.psk
        peer.flood_guard.record(now)
        peer.last_timestamp = timestamp
        peer._noise = noise
        peer.remote_index = msg.sender
        peer.state = _check_move(peer.state, "consume_initiation")
        return peer


class PeerHandshake:
    """The handshake with one peer (wireguard-go ``Handshake`` + the peer's cookie generator).

    Initiator: :meth:`create_initiation`, then :meth:`consume_response`, then
    :meth:`begin_session`. Responder: :meth:`StaticIdentity.consume_initiation`, then
    :meth:`create_response`, then :meth:`begin_session`.
    """

    def __init__(
        self,
        identity: StaticIdentity,
        remote_static: bytes,
        *,
        psk: bytes | None = None,
        ephemeral: EphemeralFactory = X25519PrivateKey.generate,
    ) -> None:
        if len(remote_static) != KEY_SIZE:
            raise ValueError("remote static key must be 32 bytes")
        if psk is not None and len(psk) != KEY_SIZE:
            raise ValueError("psk must be 32 bytes")
        self.identity = identity
        self.remote_static = bytes(remote_static)
        self.psk = psk if psk is not None else _ZERO_KEY
        self.timers = identity.timers
        self.cookies = CookieGenerator(self.remote_static, timers=identity.timers)
        self.flood_guard = InitiationFloodGuard(identity.timers.handshake_initiation_rate)
        self._ephemeral = ephemeral
        self.state = HandshakeState.ZEROED
        self.local_index = 0
        self.remote_index = 0
        self.last_timestamp = bytes(TIMESTAMP_SIZE)
        self._noise: NoiseHandshake | None = None

    @property
    def handshake_hash(self) -> bytes | None:
        return self._noise.handshake_hash if self._noise is not None else None

    def create_initiation(self, now: float, wall: float, sender_index: int) -> bytes:
        """A type-1 message with mac1 (and mac2 if we hold a fresh cookie). ``wall`` is Unix time
        for the TAI64N timestamp; ``sender_index`` is our fresh local index."""
        noise = NoiseHandshake(
            initiator=True,
            static=self.identity.private,
            remote_static=self.remote_static,
            prologue=IDENTIFIER,
            psk=self.psk,
            ephemeral=self._ephemeral,
        )
        body = noise.write_message(tai64n(wall))
        msg = bytearray(
            packet.pack_initiation(
                packet.Initiation(
                    sender_index,
                    body[:KEY_SIZE],
                    body[KEY_SIZE : KEY_SIZE + packet.ENCRYPTED_STATIC_SIZE],
                    body[KEY_SIZE + packet.ENCRYPTED_STATIC_SIZE :],
                )
            )
        )
        self.cookies.add_macs(msg, now)
        self.state = _check_move(self.state, "create_initiation")
        self._noise = noise
        self.local_index = sender_index
        self.remote_index = 0
        return bytes(msg)

    def consume_response(self, data: Buffer, now: float) -> None:
        """Verify and consume a type-2 message answering our initiation; else ProtocolError and
        no change. The caller found this peer by the response's receiver index."""
        msg = packet.unpack_response(data)
        if not self.identity.cookies.check_mac1(data):
            raise ProtocolError("response mac1 does not verify", "mac1")
        target = _check_move(self.state, "consume_response")
        noise = self._noise
        assert noise is not None
        if msg.receiver != self.local_index:
            raise ProtocolError("response for another handshake", "state")
        payload = noise.read_message(msg.ephemeral + msg.encrypted_nothing)
        assert payload == b""
        self.remote_index = msg.sender
        self.state = target

    def create_response(self, now: float, sender_index: int) -> bytes:
        """A type-2 message answering the initiation just consumed."""
        target = _check_move(self.state, "create_response")
        noise = self._noise
        assert noise is not None
        noise.ephemeral_factory = self._ephemeral
        body = noise.write_message(b"")
        msg = bytearray(
            packet.pack_response(
                packet.Response(sender_index, self.remote_index, body[:KEY_SIZE], body[KEY_SIZE:])
            )
        )
        self.cookies.add_macs(msg, now)
        self.local_index = sender_index
        self.state = target
        return bytes(msg)

    def consume_cookie_reply(self, data: Buffer, now: float) -> None:
        """Take a cookie from a type-3 reply to the last initiation or response we sent.

        The caller routes the reply by its receiver index, which may name our handshake or (a
        reply to our response) the session derived from it, so the handshake state is not
        checked, as in wireguard-go. The reply is bound to our last mac1 by its AEAD.
        """
        self.cookies.consume_reply(data, now)

    def begin_session(self, now: float) -> Session:
        """Derive the transport keys (KDF2 of the chaining key), zero the handshake, and return
        the new :class:`Session`. Initiator after a response, responder after creating one."""
        _check_move(self.state, "begin_session")
        noise = self._noise
        assert noise is not None
        send_key, receive_key = noise.transport_keys()
        session = Session(
            send_key,
            receive_key,
            local_index=self.local_index,
            remote_index=self.remote_index,
            created=now,
            is_initiator=self.state is HandshakeState.RESPONSE_CONSUMED,
            timers=self.timers,
        )
        self.zero()
        return session

    def zero(self) -> None:
        """Forget the handshake in progress (keeps the last timestamp and the cookie)."""
        self._noise = None
        self.state = _check_move(self.state, "zero")
        self.local_index = 0
        self.remote_index = 0
