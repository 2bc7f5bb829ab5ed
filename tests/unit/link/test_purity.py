"""The link cores stay sans-I/O even transitively: importing them loads no I/O library."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

CORES = ["constants", "packet", "noise", "session", "timers", "ratelimit"]
FORBIDDEN = {"asyncio", "socket", "slixmpp", "aioice", "pyroute2", "aiohttp", "pytun", "ssl"}


def test_cores_load_no_io_library() -> None:
    script = (
        "import sys\n"
        + "".join(f"import socialvpn.link.{name}\n" for name in CORES)
        + "print('\\n'.join(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = {name.split(".")[0] for name in result.stdout.split()}
    assert not loaded & FORBIDDEN, sorted(loaded & FORBIDDEN)


def test_constants_match_wireguard_go() -> None:
    from socialvpn.link import constants as c

    assert c.REKEY_AFTER_MESSAGES == 1 << 60
    assert c.REJECT_AFTER_MESSAGES == (1 << 64) - (1 << 13) - 1
    assert (c.REKEY_AFTER_TIME, c.REJECT_AFTER_TIME, c.REKEY_ATTEMPT_TIME) == (120, 180, 90)
    assert (c.REKEY_TIMEOUT, c.KEEPALIVE_TIMEOUT, c.COOKIE_REFRESH_TIME) == (5, 10, 120)
    assert c.HANDSHAKE_INITIATION_RATE == 1 / 50 and c.MAX_TIMER_HANDSHAKES == 18
    assert c.COUNTER_BITS_TOTAL == 8192 and c.COUNTER_WINDOW_SIZE == 8128
    sizes = (c.MESSAGE_INITIATION_SIZE, c.MESSAGE_RESPONSE_SIZE, c.MESSAGE_COOKIE_REPLY_SIZE)
    assert sizes == (148, 92, 64) and c.MESSAGE_TRANSPORT_SIZE == 32
    assert c.CONSTRUCTION == b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
    assert c.IDENTIFIER == b"WireGuard v1 zx2c4 Jason@zx2c4.com"
    assert (c.LABEL_MAC1, c.LABEL_COOKIE) == (b"mac1----", b"cookie--")
    assert c.UNDER_LOAD_QUEUE_SIZE == 128 and c.UNDER_LOAD_AFTER_TIME == 1
    assert (c.RATELIMITER_PACKETS_PER_SECOND, c.RATELIMITER_PACKETS_BURSTABLE) == (20, 5)
    t = c.LinkTimers()
    assert t == c.DEFAULT_TIMERS and t.max_timer_handshakes == 18
    assert (t.new_handshake_timeout, t.zero_key_material_after, t.rekey_on_receive_after) == (
        15,
        540,
        165,
    )
    with pytest.raises(AttributeError):
        t.rekey_timeout = 1  # type: ignore[misc]
