"""Unit tests for socialvpn/keys.py: device id, fingerprint, signatures, key file format."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from socialvpn.keys import (
    DEVICE_ID_LEN,
    KEY_LEN,
    DeviceKeys,
    b64,
    device_id_of,
    fingerprint_of,
    unb64_key,
    verify,
)

pytestmark = pytest.mark.unit

# Fixed private keys so that the expected values below are computed independently.
X_PRIV = bytes(range(1, 33))
E_PRIV = bytes(range(101, 133))


@pytest.fixture(scope="module")
def keys() -> DeviceKeys:
    return DeviceKeys(X_PRIV, E_PRIV)


def _x_pub(priv: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(priv).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)


def _e_pub(priv: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(priv).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)


def test_public_keys(keys: DeviceKeys) -> None:
    assert keys.x25519_public == _x_pub(X_PRIV)
    assert keys.ed25519_public == _e_pub(E_PRIV)
    assert len(keys.x25519_public) == len(keys.ed25519_public) == KEY_LEN


def test_device_id_definition(keys: DeviceKeys) -> None:
    digest = hashlib.sha256(_x_pub(X_PRIV)).digest()
    expected = base64.b32encode(digest).decode().lower()[:16]
    assert keys.device_id == expected
    assert device_id_of(keys.x25519_public) == expected
    assert DEVICE_ID_LEN == 16
    assert re.fullmatch(r"[a-z2-7]{16}", keys.device_id)


def test_device_id_known_vector() -> None:
    # SHA-256 of 32 zero bytes = 66687aad...; base32 of that digest, lower-cased, 16 chars.
    digest = bytes.fromhex("66687aadf862bd776c8fc18b8e9f8e20089714856ee233b3902a591d0d5f2925")
    assert hashlib.sha256(bytes(32)).digest() == digest
    assert device_id_of(bytes(32)) == base64.b32encode(digest).decode().lower()[:16]
    assert device_id_of(bytes(32)) == "mzuhvlpymk6xo3ep"


def test_device_id_depends_only_on_x25519() -> None:
    a = DeviceKeys(X_PRIV, E_PRIV)
    b = DeviceKeys(X_PRIV, bytes(32))
    c = DeviceKeys(bytes(range(2, 34)), E_PRIV)
    assert a.device_id == b.device_id
    assert a.device_id != c.device_id


def test_fingerprint_definition(keys: DeviceKeys) -> None:
    hexd = hashlib.sha256(b"socialvpn fingerprint v1" + _x_pub(X_PRIV) + _e_pub(E_PRIV)) \
        .hexdigest()[:32]
    expected = " ".join(hexd[i:i + 4] for i in range(0, 32, 4))
    assert keys.fingerprint == expected
    assert fingerprint_of(keys.x25519_public, keys.ed25519_public) == expected
    assert re.fullmatch(r"[0-9a-f]{4}( [0-9a-f]{4}){7}", keys.fingerprint)


def test_fingerprint_covers_both_keys() -> None:
    base = fingerprint_of(bytes(32), bytes(32))
    assert fingerprint_of(bytes(31) + b"\x01", bytes(32)) != base
    assert fingerprint_of(bytes(32), bytes(31) + b"\x01") != base
    # swapping the keys changes it too (order matters)
    assert fingerprint_of(b"\x01" * 32, b"\x02" * 32) != fingerprint_of(b"\x02" * 32, b"\x01" * 32)


def test_generate_makes_distinct_valid_keys() -> None:
    a, b = DeviceKeys.generate(), DeviceKeys.generate()
    assert len(a.x25519_private) == len(a.ed25519_private) == KEY_LEN
    assert a.x25519_private != b.x25519_private
    assert a.ed25519_private != b.ed25519_private
    assert a.device_id != b.device_id


def test_sign_verify_round_trip(keys: DeviceKeys) -> None:
    data = b"membership document"
    sig = keys.sign(data)
    assert len(sig) == 64
    assert verify(keys.ed25519_public, sig, data)
    assert keys.sign(data) == sig  # Ed25519 is deterministic


def test_verify_refuses_tampering(keys: DeviceKeys) -> None:
    data = b"membership document"
    sig = keys.sign(data)
    assert not verify(keys.ed25519_public, sig, data + b"x")
    assert not verify(keys.ed25519_public, sig, b"")
    for i in (0, 31, 63):
        bad = bytearray(sig)
        bad[i] ^= 0x01
        assert not verify(keys.ed25519_public, bytes(bad), data)
    other = DeviceKeys.generate()
    assert not verify(other.ed25519_public, sig, data)
    # the X25519 public key is not a signing key
    assert not verify(keys.x25519_public, sig, data)


@pytest.mark.parametrize(
    ("pub", "sig"),
    [(b"", b"\x00" * 64), (b"\x00" * 31, b"\x00" * 64), (b"\x00" * 33, b"\x00" * 64),
     (None, b"\x00" * 64), (b"\x00" * 32, b""), (b"\x00" * 32, b"\x00" * 63),
     (b"\x00" * 32, b"\x00" * 65)],
)
def test_verify_bad_lengths_return_false(keys: DeviceKeys, pub: bytes | None, sig: bytes) -> None:
    real_pub = keys.ed25519_public if pub is None else pub
    assert verify(real_pub, sig, b"data") is False


@settings(max_examples=50, deadline=None, derandomize=True)
@given(data=st.binary(max_size=200), flip=st.integers(0, 8 * 64 - 1))
def test_sign_property(keys: DeviceKeys, data: bytes, flip: int) -> None:
    sig = keys.sign(data)
    assert verify(keys.ed25519_public, sig, data)
    bad = bytearray(sig)
    bad[flip // 8] ^= 1 << (flip % 8)
    assert not verify(keys.ed25519_public, bytes(bad), data)


def test_json_round_trip(keys: DeviceKeys) -> None:
    data = keys.to_json()
    assert data == {"version": 1, "x25519": base64.b64encode(X_PRIV).decode(),
                    "ed25519": base64.b64encode(E_PRIV).decode()}
    again = DeviceKeys.from_json(data)
    assert again == keys
    assert again.device_id == keys.device_id


@pytest.mark.parametrize("version", [0, 2, "1", None, 1.5, [1]])
def test_from_json_wrong_version(keys: DeviceKeys, version: object) -> None:
    data = keys.to_json()
    data["version"] = version
    with pytest.raises(ValueError, match="format"):
        DeviceKeys.from_json(data)


def test_from_json_missing_version(keys: DeviceKeys) -> None:
    data = keys.to_json()
    del data["version"]
    with pytest.raises(ValueError):
        DeviceKeys.from_json(data)


@pytest.mark.parametrize("version", [True, 1.0])
def test_from_json_version_must_be_int(keys: DeviceKeys, version: object) -> None:
    data = keys.to_json()
    data["version"] = version
    with pytest.raises(ValueError):
        DeviceKeys.from_json(data)


@pytest.mark.parametrize("data", [None, [], "x", 1, {"version": 1}])
def test_from_json_not_a_key_file(data: object) -> None:
    with pytest.raises(ValueError):
        DeviceKeys.from_json(data)


@pytest.mark.parametrize("missing", ["x25519", "ed25519"])
def test_from_json_missing_key(keys: DeviceKeys, missing: str) -> None:
    data = keys.to_json()
    del data[missing]
    with pytest.raises(ValueError, match="lacks"):
        DeviceKeys.from_json(data)


@pytest.mark.parametrize("which", ["x25519", "ed25519"])
@pytest.mark.parametrize(
    "value",
    [
        1234,
        None,
        b64(bytes(32)).encode(),  # bytes, not str
        b64(bytes(31)),  # 31 bytes
        b64(bytes(33)),  # 33 bytes
        b64(bytes(32))[:-1],  # no padding
        b64(bytes(32))[:-2] + "B=",  # non-zero padding bits: not canonical
        " " + b64(bytes(32))[1:],
        b64(bytes(32)).replace("A", "-", 1),  # urlsafe alphabet
        "",
    ],
)
def test_from_json_bad_key(keys: DeviceKeys, which: str, value: object) -> None:
    data = keys.to_json()
    data[which] = value
    with pytest.raises(ValueError):
        DeviceKeys.from_json(data)


@pytest.mark.parametrize(("x", "e"), [(bytes(31), bytes(32)), (bytes(32), bytes(33)),
                                      (b"", b"")])
def test_constructor_checks_lengths(x: bytes, e: bytes) -> None:
    with pytest.raises(ValueError):
        DeviceKeys(x, e)


def test_unb64_key_accepts_canonical() -> None:
    assert unb64_key("A" * 43 + "=") == bytes(32)
    assert unb64_key("A" * 42 + "E=") == bytes(31) + b"\x01"  # low 2 bits are padding
    for raw in (bytes(32), b"\xff" * 32, bytes(range(32))):
        assert unb64_key(b64(raw)) == raw


@pytest.mark.parametrize(
    "text",
    [
        "",
        "A" * 43,
        "A" * 44,  # 33 bytes, no padding
        "A" * 45,
        "A" * 42 + "==",  # 31 bytes
        "A" * 43 + "B",
        "A" * 42 + "B=",  # non-canonical padding bits (decodes, but re-encodes to 'A=')
        "A" * 42 + "D=",
        "A" * 42 + "=A",
        "A" * 20 + "\n" + "A" * 22 + "=",
        "A" * 20 + " " + "A" * 22 + "=",
        "A" * 42 + "_=",
        "A" * 42 + "-=",
        "\u00c4" * 43 + "=",
        "\uff21" * 43 + "=",  # fullwidth A
        "====" + "A" * 40,
    ],
)
def test_unb64_key_strict(text: str) -> None:
    with pytest.raises(ValueError):
        unb64_key(text)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(max_size=50))
def test_unb64_key_only_value_error(text: str) -> None:
    try:
        raw = unb64_key(text)
    except ValueError:
        return
    assert len(raw) == KEY_LEN and b64(raw) == text


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(min_size=32, max_size=32))
def test_unb64_key_round_trip(raw: bytes) -> None:
    assert unb64_key(b64(raw)) == raw


def test_repr_does_not_leak(keys: DeviceKeys) -> None:
    secrets = [
        X_PRIV, E_PRIV,
    ]
    text = repr(keys) + str(keys) + f"{keys}" + f"{keys!r}" + repr([keys]) + repr({"k": keys})
    assert keys.device_id in repr(keys)
    for secret in secrets:
        for form in (b64(secret), secret.hex(), repr(secret), str(list(secret)),
                     base64.b32encode(secret).decode(), secret.hex().upper()):
            assert form not in text


def test_repr_of_generated_keys_does_not_leak() -> None:
    keys = DeviceKeys.generate()
    text = repr(keys)
    assert text == f"DeviceKeys(device_id={keys.device_id!r})"
    assert b64(keys.x25519_private) not in text and b64(keys.ed25519_private) not in text


def test_keys_are_frozen(keys: DeviceKeys) -> None:
    with pytest.raises(AttributeError):
        keys.x25519_private = bytes(32)  # type: ignore[misc]
