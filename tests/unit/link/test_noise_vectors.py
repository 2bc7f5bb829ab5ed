"""Known-answer tests: the cacophony IKpsk2 vector, HChaCha20, XChaCha20-Poly1305, TAI64N."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from socialvpn.errors import ProtocolError
from socialvpn.link import noise
from socialvpn.link.constants import CONSTRUCTION, DEFAULT_TIMERS
from socialvpn.link.session import Session

pytestmark = pytest.mark.unit

VECTORS = json.loads(
    (Path(__file__).parent / "vectors" / "noise_IKpsk2_25519_ChaChaPoly_BLAKE2s.json").read_text()
)["vectors"]
h = bytes.fromhex


def _sides(v: dict) -> tuple[noise.NoiseHandshake, noise.NoiseHandshake]:
    assert v["protocol_name"].encode() == CONSTRUCTION
    init_e = X25519PrivateKey.from_private_bytes(h(v["init_ephemeral"]))
    resp_e = X25519PrivateKey.from_private_bytes(h(v["resp_ephemeral"]))
    initiator = noise.NoiseHandshake(
        initiator=True,
        static=X25519PrivateKey.from_private_bytes(h(v["init_static"])),
        remote_static=h(v["init_remote_static"]),
        prologue=h(v["init_prologue"]),
        psk=h(v["init_psks"][0]),
        ephemeral=lambda: init_e,
    )
    responder = noise.NoiseHandshake(
        initiator=False,
        static=X25519PrivateKey.from_private_bytes(h(v["resp_static"])),
        prologue=h(v["resp_prologue"]),
        psk=h(v["resp_psks"][0]),
        ephemeral=lambda: resp_e,
    )
    return initiator, responder


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: v["protocol_name"])
def test_cacophony_vector_handshake_and_transport(v: dict) -> None:
    initiator, responder = _sides(v)
    messages = v["messages"]
    # handshake: initiator writes message 0, responder writes message 1
    m0 = initiator.write_message(h(messages[0]["payload"]))
    assert m0.hex() == messages[0]["ciphertext"]
    assert responder.read_message(m0) == h(messages[0]["payload"])
    assert responder.remote_static == noise.public_bytes(
        X25519PrivateKey.from_private_bytes(h(v["init_static"]))
    )
    m1 = responder.write_message(h(messages[1]["payload"]))
    assert m1.hex() == messages[1]["ciphertext"]
    assert initiator.read_message(m1) == h(messages[1]["payload"])
    assert initiator.complete and responder.complete
    assert initiator.handshake_hash.hex() == v["handshake_hash"]
    assert responder.handshake_hash.hex() == v["handshake_hash"]
    # transport: alternating directions, starting with the initiator
    i_send, i_recv = initiator.split()
    r_send, r_recv = responder.split()
    for n, message in enumerate(messages[2:]):
        send, recv = (i_send, r_recv) if n % 2 == 0 else (r_send, i_recv)
        ct = send.encrypt_with_ad(b"", h(message["payload"]))
        assert ct.hex() == message["ciphertext"], f"transport message {n + 2}"
        assert recv.decrypt_with_ad(b"", ct) == h(message["payload"])


def test_cacophony_transport_keys_through_session() -> None:
    """The data-path Session uses the same AEAD and nonce as Noise transport messages."""
    v = VECTORS[0]
    initiator, responder = _sides(v)
    responder.read_message(initiator.write_message(h(v["messages"][0]["payload"])))
    initiator.read_message(responder.write_message(h(v["messages"][1]["payload"])))
    send_key, recv_key = initiator.transport_keys()
    assert (recv_key, send_key) == responder.transport_keys()
    session = Session(
        send_key,
        recv_key,
        local_index=1,
        remote_index=2,
        created=0.0,
        is_initiator=True,
        timers=DEFAULT_TIMERS,
    )
    i_send, _ = initiator.split()
    payload = bytes(range(32))  # a multiple of 16: no padding
    sealed = session.seal(payload, 0.0)
    assert bytes(sealed[16:]) == i_send.encrypt_with_ad(b"", payload)


def test_handshake_read_is_transactional() -> None:
    v = VECTORS[0]
    initiator, responder = _sides(v)
    m0 = bytearray(initiator.write_message(h(v["messages"][0]["payload"])))
    forged = bytes(m0[:-1]) + bytes([m0[-1] ^ 1])
    with pytest.raises(ProtocolError) as err:
        responder.read_message(forged)
    assert err.value.reason == "auth"
    assert responder.remote_static is None
    with pytest.raises(ProtocolError) as err:
        responder.read_message(bytes(m0[:40]))
    assert err.value.reason == "malformed"
    # the genuine message still works and gives the vector's answer
    assert responder.read_message(bytes(m0)) == h(v["messages"][0]["payload"])
    assert (
        responder.write_message(h(v["messages"][1]["payload"])).hex()
        == (v["messages"][1]["ciphertext"])
    )


def test_handshake_illegal_moves_raise_locally() -> None:
    v = VECTORS[0]
    initiator, responder = _sides(v)
    with pytest.raises(noise.HandshakeStateError):
        initiator.read_message(b"")
    with pytest.raises(noise.HandshakeStateError):
        responder.write_message(b"")
    with pytest.raises(noise.HandshakeStateError):
        initiator.split()
    initiator.write_message(b"")
    with pytest.raises(noise.HandshakeStateError):
        initiator.write_message(b"")
    with pytest.raises(ValueError):
        noise.NoiseHandshake(initiator=True, static=X25519PrivateKey.generate())


def test_hchacha20_draft_vector() -> None:
    """draft-irtf-cfrg-xchacha-03 §2.2.1."""
    key = bytes(range(32))
    nonce = h("000000090000004a0000000031415927")
    assert noise.hchacha20(key, nonce) == h(
        "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"
    )


XCHACHA_PLAINTEXT = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the "
    b"future, sunscreen would be it."
)
XCHACHA_CIPHERTEXT = h(
    "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb"
    "731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452"
    "2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9"
    "21f9664c97637da9768812f615c68b13b52e"
)
XCHACHA_TAG = h("c0875924c1c7987947deafd8780acf49")


def test_xchacha20_poly1305_draft_vector() -> None:
    """draft-irtf-cfrg-xchacha-03 §A.3.1."""
    key = bytes(range(0x80, 0xA0))
    nonce = bytes(range(0x40, 0x58))
    aad = h("50515253c0c1c2c3c4c5c6c7")
    sealed = noise.xaead_encrypt(key, nonce, XCHACHA_PLAINTEXT, aad)
    assert sealed == XCHACHA_CIPHERTEXT + XCHACHA_TAG
    assert noise.xaead_decrypt(key, nonce, sealed, aad) == XCHACHA_PLAINTEXT
    with pytest.raises(ProtocolError) as err:
        noise.xaead_decrypt(key, nonce, sealed, aad + b"x")
    assert err.value.reason == "auth"
    with pytest.raises(ValueError):
        noise.xaead_encrypt(key, nonce[:12], b"", b"")


def test_hmac_and_kdf_are_rfc2104_blake2s() -> None:
    key, data = b"k" * 32, b"input"
    assert noise.hmac_(key, data) == hmac.new(key, data, hashlib.blake2s).digest()
    t0 = hmac.new(key, data, hashlib.blake2s).digest()
    t1 = hmac.new(t0, b"\x01", hashlib.blake2s).digest()
    t2 = hmac.new(t0, t1 + b"\x02", hashlib.blake2s).digest()
    t3 = hmac.new(t0, t2 + b"\x03", hashlib.blake2s).digest()
    assert noise.kdf(key, data, 1) == (t1,)
    assert noise.kdf(key, data, 2) == (t1, t2)
    assert noise.kdf(key, data, 3) == (t1, t2, t3)
    assert noise.mac(key, data) == hashlib.blake2s(data, digest_size=16, key=key).digest()
    assert noise.hash_(b"a", b"b") == hashlib.blake2s(b"ab").digest()
    with pytest.raises(ValueError):
        noise.kdf(key, data, 4)


def test_tai64n() -> None:
    assert noise.tai64n(0.0) == h("400000000000000a00000000")
    stamp = noise.tai64n(1_700_000_000.5)
    assert stamp[:8] == (0x400000000000000A + 1_700_000_000).to_bytes(8, "big")
    nanos = int.from_bytes(stamp[8:], "big")
    assert nanos & 0xFFFFFF == 0  # whitened to ~16 ms
    assert 500_000_000 - 0x1000000 < nanos <= 500_000_000
    # strictly increasing over steps bigger than the whitening, byte order = time order
    stamps = [noise.tai64n(1_700_000_000 + i * 0.02) for i in range(200)]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    assert noise.tai64n(1_700_000_000.999999999)[8:] != b"\xff" * 4
