"""Every WireGuard protocol constant, named as in wireguard-go ``device/constants.go``.

Times are in seconds (floats), sizes in bytes. The time constants are also gathered in the frozen
dataclass :class:`LinkTimers`, whose defaults are WireGuard's; tests and the config layer shorten
them by building another ``LinkTimers``, never by patching this module.
"""

from __future__ import annotations

from dataclasses import dataclass

# --- protocol limits (wireguard-go device/constants.go) ------------------------------------------

REKEY_AFTER_MESSAGES = 2**60
REJECT_AFTER_MESSAGES = 2**64 - 2**13 - 1
REKEY_AFTER_TIME = 120.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
MAX_TIMER_HANDSHAKES = int(REKEY_ATTEMPT_TIME // REKEY_TIMEOUT)  # 18
REKEY_TIMEOUT_JITTER_MAX_MS = 334
REKEY_TIMEOUT_JITTER_MAX = REKEY_TIMEOUT_JITTER_MAX_MS / 1000.0
REJECT_AFTER_TIME = 180.0
KEEPALIVE_TIMEOUT = 10.0
COOKIE_REFRESH_TIME = 120.0
HANDSHAKE_INITIATION_RATE = 1.0 / 50
PADDING_MULTIPLE = 16

# --- the Noise construction (wireguard-go device/noise-protocol.go) ------------------------------

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

# --- sizes ----------------------------------------------------------------------------------------

KEY_SIZE = 32  # X25519 keys, symmetric keys, hashes
TAG_SIZE = 16  # Poly1305
MAC_SIZE = 16  # mac1, mac2, cookie
TIMESTAMP_SIZE = 12  # TAI64N
COOKIE_NONCE_SIZE = 24  # XChaCha20-Poly1305
COOKIE_SIZE = 16

MESSAGE_INITIATION_TYPE = 1
MESSAGE_RESPONSE_TYPE = 2
MESSAGE_COOKIE_REPLY_TYPE = 3
MESSAGE_TRANSPORT_TYPE = 4

MESSAGE_INITIATION_SIZE = 148
MESSAGE_RESPONSE_SIZE = 92
MESSAGE_COOKIE_REPLY_SIZE = 64
MESSAGE_TRANSPORT_HEADER_SIZE = 16
MESSAGE_TRANSPORT_SIZE = MESSAGE_TRANSPORT_HEADER_SIZE + TAG_SIZE  # 32: an empty transport message
MESSAGE_KEEPALIVE_SIZE = MESSAGE_TRANSPORT_SIZE
MESSAGE_HANDSHAKE_SIZE = MESSAGE_INITIATION_SIZE

MESSAGE_TRANSPORT_OFFSET_RECEIVER = 4
MESSAGE_TRANSPORT_OFFSET_COUNTER = 8
MESSAGE_TRANSPORT_OFFSET_CONTENT = 16

MAX_SEGMENT_SIZE = (1 << 16) - 1
MIN_MESSAGE_SIZE = MESSAGE_KEEPALIVE_SIZE
MAX_MESSAGE_SIZE = MAX_SEGMENT_SIZE
MAX_CONTENT_SIZE = MAX_SEGMENT_SIZE - MESSAGE_TRANSPORT_SIZE

# --- replay window (wireguard-go replay/replay.go, kernel COUNTER_BITS_TOTAL) ---------------------

COUNTER_BITS_TOTAL = 8192
COUNTER_REDUNDANT_BITS = 64  # one word of the ring is always being recycled
COUNTER_WINDOW_SIZE = COUNTER_BITS_TOTAL - COUNTER_REDUNDANT_BITS  # 8128

# --- load and rate limiting (wireguard-go device/queueconstants_default.go, ratelimiter/) ---------

QUEUE_HANDSHAKE_SIZE = 1024
UNDER_LOAD_QUEUE_SIZE = QUEUE_HANDSHAKE_SIZE // 8  # 128 queued handshakes = under load
UNDER_LOAD_AFTER_TIME = 1.0  # stay under load this long after the queue drained
RATELIMITER_PACKETS_PER_SECOND = 20
RATELIMITER_PACKETS_BURSTABLE = 5
RATELIMITER_GARBAGE_COLLECT_TIME = 1.0
RATELIMITER_MAX_ENTRIES = 8192


@dataclass(frozen=True, slots=True)
class LinkTimers:
    """The time constants of one link. Defaults are WireGuard's; tests may shorten them."""

    rekey_after_time: float = REKEY_AFTER_TIME
    reject_after_time: float = REJECT_AFTER_TIME
    rekey_attempt_time: float = REKEY_ATTEMPT_TIME
    rekey_timeout: float = REKEY_TIMEOUT
    rekey_timeout_jitter_max: float = REKEY_TIMEOUT_JITTER_MAX
    keepalive_timeout: float = KEEPALIVE_TIMEOUT
    cookie_refresh_time: float = COOKIE_REFRESH_TIME
    handshake_initiation_rate: float = HANDSHAKE_INITIATION_RATE
    rekey_after_messages: int = REKEY_AFTER_MESSAGES
    reject_after_messages: int = REJECT_AFTER_MESSAGES

    def __post_init__(self) -> None:
        for name in (
            "rekey_after_time",
            "reject_after_time",
            "rekey_attempt_time",
            "rekey_timeout",
            "keepalive_timeout",
            "cookie_refresh_time",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"LinkTimers.{name} must be positive")
        if self.rekey_timeout_jitter_max < 0 or self.handshake_initiation_rate < 0:
            raise ValueError("LinkTimers jitter and initiation rate must not be negative")
        if not 0 < self.rekey_after_messages <= self.reject_after_messages:
            raise ValueError("LinkTimers needs 0 < rekey_after_messages <= reject_after_messages")

    @property
    def max_timer_handshakes(self) -> int:
        """Retransmissions before giving up: ``rekey_attempt_time / rekey_timeout`` (18)."""
        return int(self.rekey_attempt_time / self.rekey_timeout + 1e-9)

    @property
    def new_handshake_timeout(self) -> float:
        """Send-without-receive time before a new handshake (KEEPALIVE + REKEY_TIMEOUT, 15 s)."""
        return self.keepalive_timeout + self.rekey_timeout

    @property
    def zero_key_material_after(self) -> float:
        """Time without a new session after which all key material is erased (3 x 180 s)."""
        return self.reject_after_time * 3

    @property
    def rekey_on_receive_after(self) -> float:
        """Key age at which a receiving initiator starts a last-minute handshake (165 s)."""
        return self.reject_after_time - self.keepalive_timeout - self.rekey_timeout


DEFAULT_TIMERS = LinkTimers()
