"""Deterministic keys, randomness and handshake pairs for the link unit tests."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from socialvpn.link.constants import DEFAULT_TIMERS, LinkTimers
from socialvpn.link.noise import PeerHandshake, StaticIdentity
from socialvpn.link.session import Session

WALL0 = 1_700_000_000.0  # a Unix time for TAI64N
MONO0 = 1000.0


def key(label: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(hashlib.sha256(label.encode()).digest())


def ephemerals(label: str) -> Callable[[], X25519PrivateKey]:
    """A deterministic stream of ephemeral keys."""
    counter = itertools.count()
    return lambda: key(f"{label}/ephemeral/{next(counter)}")


def random_bytes(label: str) -> Callable[[int], bytes]:
    """A deterministic ``os.urandom`` stand-in."""
    counter = itertools.count()

    def rng(n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.sha256(f"{label}/{next(counter)}".encode()).digest()
        return out[:n]

    return rng


@dataclass
class Pair:
    """Alice (initiator by habit) and Bob, each with a PeerHandshake for the other."""

    alice: StaticIdentity
    bob: StaticIdentity
    a_to_b: PeerHandshake  # Alice's view of Bob
    b_to_a: PeerHandshake  # Bob's view of Alice

    def lookup_bob(self, public: bytes) -> PeerHandshake | None:
        """Bob's table of peers by static key."""
        return self.b_to_a if public == self.alice.public else None

    def lookup_alice(self, public: bytes) -> PeerHandshake | None:
        return self.a_to_b if public == self.bob.public else None


def make_pair(
    timers: LinkTimers = DEFAULT_TIMERS,
    *,
    psk_a: bytes | None = None,
    psk_b: bytes | None = None,
    label: str = "",
) -> Pair:
    alice = StaticIdentity(key(f"alice{label}"), timers=timers, rng=random_bytes(f"a{label}"))
    bob = StaticIdentity(key(f"bob{label}"), timers=timers, rng=random_bytes(f"b{label}"))
    a_to_b = PeerHandshake(alice, bob.public, psk=psk_a, ephemeral=ephemerals(f"a{label}"))
    b_to_a = PeerHandshake(bob, alice.public, psk=psk_b, ephemeral=ephemerals(f"b{label}"))
    return Pair(alice, bob, a_to_b, b_to_a)


def handshake(
    pair: Pair,
    now: float = MONO0,
    wall: float = WALL0,
    a_index: int = 0x11111111,
    b_index: int = 0x22222222,
) -> tuple[Session, Session]:
    """A full Alice-to-Bob handshake; returns (Alice's session, Bob's session)."""
    init = pair.a_to_b.create_initiation(now, wall, a_index)
    peer = pair.bob.consume_initiation(init, pair.lookup_bob, now)
    assert peer is pair.b_to_a
    resp = peer.create_response(now, b_index)
    pair.a_to_b.consume_response(resp, now)
    return pair.a_to_b.begin_session(now), peer.begin_session(now)
