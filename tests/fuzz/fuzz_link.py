"""Coverage-guided fuzzing of the WireGuard parsers (atheris), with a plain random fallback.

Every input must either parse or raise ProtocolError; anything else is a bug.

    python -m tests.fuzz.fuzz_link                    # atheris if installed, else random
    python -m tests.fuzz.fuzz_link -atheris_runs=1000000
    python -m tests.fuzz.fuzz_link --random 200000    # no atheris needed
"""

from __future__ import annotations

import os
import sys

from socialvpn.errors import ProtocolError
from socialvpn.link import noise, packet
from socialvpn.link.constants import LABEL_MAC1
from tests.unit.link.support import MONO0, WALL0, handshake, make_pair

PAIR = make_pair(label="/fuzz")
PAIR.a_to_b.create_initiation(MONO0, WALL0, 0x1234)
SENDER, RECEIVER = handshake(make_pair(label="/fuzz-session"), MONO0)


def _mac1(data: bytes, public: bytes) -> bytes:
    if len(data) < 32:
        return data
    smac1 = len(data) - 32
    return data[:smac1] + noise.mac(noise.hash_(LABEL_MAC1, public), data[:smac1]) + data[-16:]


def _initiation(data: bytes) -> None:
    peer = PAIR.bob.consume_initiation(_mac1(data, PAIR.bob.public), PAIR.lookup_bob, MONO0)
    peer.zero()


TARGETS = [
    packet.unpack,
    packet.classify,
    _initiation,
    lambda d: PAIR.bob.consume_initiation(d, PAIR.lookup_bob, MONO0),
    lambda d: PAIR.a_to_b.consume_response(_mac1(d, PAIR.alice.public), MONO0),
    lambda d: PAIR.a_to_b.consume_cookie_reply(d, MONO0),
    lambda d: RECEIVER.open(d, MONO0),
    lambda d: RECEIVER.open(d[:4] + RECEIVER.local_index.to_bytes(4, "little") + d[8:], MONO0),
]


def one_input(data: bytes) -> None:
    if not data:
        return
    target = TARGETS[data[0] % len(TARGETS)]
    try:
        target(data[1:])
    except ProtocolError:
        pass


def main(argv: list[str]) -> int:
    if "--random" in argv:
        runs = int(argv[argv.index("--random") + 1])
        for _ in range(runs):
            size = os.urandom(1)[0]
            one_input(os.urandom(size))
        print(f"{runs} random inputs: only ProtocolError escaped")
        return 0
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        return main(["--random", "100000"])
    atheris.Setup(argv, one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
