"""Device identity: an X25519 static key for links and an Ed25519 key for signing.

``device id`` = the first 16 characters of the lowercase base32 of SHA-256(X25519 public key).
The fingerprint, shown to people to compare out of band, covers both public keys.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

KEY_LEN = 32
DEVICE_ID_LEN = 16
_FP_DOMAIN = b"socialvpn fingerprint v1"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64_exact(text: str, length: int) -> bytes:
    """Strict base64 of exactly ``length`` bytes (canonical padding); ValueError otherwise."""
    if len(text) != 4 * ((length + 2) // 3):
        raise ValueError(f"not {length} bytes of base64")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
    if len(raw) != length or b64(raw) != text:
        raise ValueError(f"not canonical base64 of {length} bytes")
    return raw


def unb64_key(text: str) -> bytes:
    """A base64 32-byte key, strictly; ValueError otherwise."""
    return unb64_exact(text, KEY_LEN)


def sign_key_fingerprint(sign_key_b64: str) -> str:
    """A signing key (e.g. a group owner's) as people compare it: 8 groups of 4 hex digits."""
    digest = hashlib.sha256(base64.b64decode(sign_key_b64)).hexdigest()[:32]
    return " ".join(digest[i:i + 4] for i in range(0, 32, 4))


def device_id_of(x25519_public: bytes) -> str:
    digest = hashlib.sha256(x25519_public).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:DEVICE_ID_LEN]


def fingerprint_of(x25519_public: bytes, ed25519_public: bytes) -> str:
    """128 bits as eight groups of four hex digits: ``1a2b 3c4d ...``."""
    digest = hashlib.sha256(_FP_DOMAIN + x25519_public + ed25519_public).hexdigest()[:32]
    return " ".join(digest[i:i + 4] for i in range(0, 32, 4))


def verify(sign_public: bytes, signature: bytes, data: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(sign_public).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class DeviceKeys:
    """The private keys of this device. Never logged, never sent."""

    x25519_private: bytes
    ed25519_private: bytes

    @classmethod
    def generate(cls) -> DeviceKeys:
        x = X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw,
                                                      NoEncryption())
        e = Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw,
                                                       NoEncryption())
        return cls(x, e)

    def __post_init__(self) -> None:
        if len(self.x25519_private) != KEY_LEN or len(self.ed25519_private) != KEY_LEN:
            raise ValueError("device keys are 32 bytes each")

    def __repr__(self) -> str:  # keep secrets out of logs and tracebacks
        return f"DeviceKeys(device_id={self.device_id!r})"

    @property
    def x25519_public(self) -> bytes:
        key = X25519PrivateKey.from_private_bytes(self.x25519_private)
        return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def ed25519_public(self) -> bytes:
        key = Ed25519PrivateKey.from_private_bytes(self.ed25519_private)
        return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def device_id(self) -> str:
        return device_id_of(self.x25519_public)

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.x25519_public, self.ed25519_public)

    def sign(self, data: bytes) -> bytes:
        return Ed25519PrivateKey.from_private_bytes(self.ed25519_private).sign(data)

    def to_json(self) -> dict[str, object]:
        return {"version": 1, "x25519": b64(self.x25519_private),
                "ed25519": b64(self.ed25519_private)}

    @classmethod
    def from_json(cls, data: object) -> DeviceKeys:
        version = data.get("version") if isinstance(data, dict) else None
        if type(version) is not int or version != 1:
            raise ValueError("unknown key file format")
        assert isinstance(data, dict)
        x, e = data.get("x25519"), data.get("ed25519")
        if not isinstance(x, str) or not isinstance(e, str):
            raise ValueError("key file lacks x25519/ed25519")
        return cls(unb64_key(x), unb64_key(e))
