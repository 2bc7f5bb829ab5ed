"""Unit tests for socialvpn/state.py: atomic 0600 writes, the 0700 dir, keys and the agent lock.

RELIABILITY row 25: a corrupt state file is reported (StateError naming it), never reset; the
key file must be 0600.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from socialvpn.errors import StateError
from socialvpn.keys import DeviceKeys
from socialvpn.state import (
    API_SOCKET,
    KEYS_FILE,
    LOCK_FILE,
    StateDir,
    atomic_write,
)

pytestmark = pytest.mark.unit


@pytest.fixture
def umask0() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


# --- atomic_write ------------------------------------------------------------------------


def test_atomic_write_mode_0600_with_umask_0(tmp_path: Path, umask0: None) -> None:
    path = tmp_path / "f.json"
    atomic_write(path, b"hello")
    assert path.read_bytes() == b"hello"
    assert mode(path) == 0o600
    assert no_temp_files(tmp_path)


def test_atomic_write_replaces_loose_file(tmp_path: Path, umask0: None) -> None:
    path = tmp_path / "f.json"
    path.write_bytes(b"old content that is longer")
    path.chmod(0o666)
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new"
    assert mode(path) == 0o600


def test_atomic_write_explicit_mode(tmp_path: Path, umask0: None) -> None:
    path = tmp_path / "pub"
    atomic_write(path, b"x", mode=0o644)
    assert mode(path) == 0o644


def test_atomic_write_stale_temp_file_is_reused(tmp_path: Path, umask0: None) -> None:
    path = tmp_path / "f"
    stale = tmp_path / f".f.{os.getpid()}.tmp"
    stale.write_bytes(b"stale stale stale")
    stale.chmod(0o666)
    atomic_write(path, b"ok")
    assert path.read_bytes() == b"ok" and mode(path) == 0o600
    assert not stale.exists()


def test_atomic_write_refuses_symlinked_temp(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"do not touch")
    (tmp_path / f".f.{os.getpid()}.tmp").symlink_to(target)
    with pytest.raises(OSError):
        atomic_write(tmp_path / "f", b"evil")
    assert target.read_bytes() == b"do not touch"
    assert not (tmp_path / "f").exists()


def test_atomic_write_large(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    atomic_write(tmp_path / "big", data)
    assert (tmp_path / "big").read_bytes() == data


def test_atomic_write_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "nope" / "f", b"x")


# --- the directory -------------------------------------------------------------------------


def test_ensure_makes_0700(tmp_path: Path, umask0: None) -> None:
    sd = StateDir(tmp_path / "a" / "state")
    sd.ensure()
    assert sd.path.is_dir()
    assert mode(sd.path) == 0o700
    sd.ensure()  # idempotent
    assert mode(sd.path) == 0o700


def test_ensure_tightens_existing_dir(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.mkdir()
    path.chmod(0o755)
    StateDir(path).ensure()
    assert mode(path) == 0o700


def test_ensure_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    sd = StateDir(tmp_path / "file" / "state")
    with pytest.raises(StateError) as info:
        sd.ensure()
    assert str(sd.path) in str(info.value) and "state directory" in str(info.value)


def test_api_socket_path(tmp_path: Path) -> None:
    assert StateDir(tmp_path).api_socket == tmp_path / API_SOCKET


# --- JSON files ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [{"b": 1, "a": [1, 2, {"c": None}]}, [], "text \u00e9 \u2603",
                                   0, None, {"k": "\U0001f511"}])
def test_write_read_json(tmp_path: Path, umask0: None, value: object) -> None:
    sd = StateDir(tmp_path)
    sd.write_json("x.json", value)
    assert sd.read_json("x.json", default="absent") == value
    assert mode(tmp_path / "x.json") == 0o600
    assert (tmp_path / "x.json").read_bytes().endswith(b"\n")


def test_write_json_sorted(tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    sd.write_json("x.json", {"b": 1, "a": 2})
    text = (tmp_path / "x.json").read_text()
    assert text.index('"a"') < text.index('"b"')


def test_read_json_missing_default(tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    assert sd.read_json("nope.json") is None
    assert sd.read_json("nope.json", default={"d": 1}) == {"d": 1}


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe{}", b'{"a": 1}garbage',
                                     b"\x00" * 10])
def test_read_json_corrupt(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "requests.json").write_bytes(content)
    with pytest.raises(StateError) as info:
        StateDir(tmp_path).read_json("requests.json")
    msg = str(info.value)
    assert str(tmp_path / "requests.json") in msg and "corrupt" in msg
    assert "\n" not in msg
    # never silently reset
    assert (tmp_path / "requests.json").read_bytes() == content


def test_read_json_directory(tmp_path: Path) -> None:
    (tmp_path / "d.json").mkdir()
    with pytest.raises(StateError) as info:
        StateDir(tmp_path).read_json("d.json")
    assert str(tmp_path / "d.json") in str(info.value)


def test_write_json_failure_is_state_error(tmp_path: Path) -> None:
    sd = StateDir(tmp_path / "missing")
    with pytest.raises(StateError) as info:
        sd.write_json("x.json", {})
    assert str(tmp_path / "missing" / "x.json") in str(info.value)


def test_write_json_unserialisable_raises_before_touching(tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    sd.write_json("x.json", {"keep": True})
    with pytest.raises(TypeError):
        sd.write_json("x.json", {"bad": object()})
    assert sd.read_json("x.json") == {"keep": True}


# --- device keys ---------------------------------------------------------------------------


def test_load_keys_missing_mentions_init(tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    assert not sd.has_keys()
    with pytest.raises(StateError) as info:
        sd.load_keys()
    msg = str(info.value)
    assert "init" in msg and str(tmp_path / KEYS_FILE) in msg


def test_load_or_create_keys_stable(tmp_path: Path, umask0: None) -> None:
    path = tmp_path / "state"
    keys1, created1 = StateDir(path).load_or_create_keys()
    assert created1 is True
    assert mode(path) == 0o700
    assert mode(path / KEYS_FILE) == 0o600
    keys2, created2 = StateDir(path).load_or_create_keys()
    keys3, created3 = StateDir(path).load_or_create_keys()
    assert (created2, created3) == (False, False)
    assert keys1 == keys2 == keys3
    assert keys1.device_id == keys2.device_id == keys3.device_id
    assert StateDir(path).load_keys() == keys1


def test_key_file_content(tmp_path: Path) -> None:
    keys, _ = StateDir(tmp_path).load_or_create_keys()
    data = json.loads((tmp_path / KEYS_FILE).read_text())
    assert data == keys.to_json()


@pytest.mark.parametrize("loose", [0o644, 0o640, 0o604, 0o660, 0o666, 0o700])
def test_load_keys_refuses_loose_mode(tmp_path: Path, loose: int) -> None:
    sd = StateDir(tmp_path)
    sd.load_or_create_keys()
    (tmp_path / KEYS_FILE).chmod(loose)
    if loose & 0o077:
        with pytest.raises(StateError) as info:
            sd.load_keys()
        msg = str(info.value)
        assert str(tmp_path / KEYS_FILE) in msg and f"{loose:o}" in msg and "chmod 600" in msg
        with pytest.raises(StateError):
            sd.load_or_create_keys()  # no silent replacement either
    else:
        sd.load_keys()


@pytest.mark.parametrize(
    "content",
    [b"{", b"[]", b'{"version": 2}', b'{"version": 1, "x25519": "AAAA", "ed25519": "AAAA"}',
     b"null"],
)
def test_load_keys_corrupt(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / KEYS_FILE
    path.write_bytes(content)
    path.chmod(0o600)
    sd = StateDir(tmp_path)
    with pytest.raises(StateError) as info:
        sd.load_keys()
    assert str(path) in str(info.value)
    with pytest.raises(StateError):
        sd.load_or_create_keys()
    assert path.read_bytes() == content  # never silently reset


def test_load_keys_round_trip_of_given_keys(tmp_path: Path) -> None:
    keys = DeviceKeys(bytes(range(32)), bytes(range(32, 64)))
    sd = StateDir(tmp_path)
    sd.write_json(KEYS_FILE, keys.to_json())
    assert sd.load_keys() == keys


# --- the agent lock ------------------------------------------------------------------------


def test_lock_twice_refused_then_released(tmp_path: Path) -> None:
    path = tmp_path / "state"
    first, second = StateDir(path), StateDir(path)
    first.lock()
    try:
        assert (path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        assert mode(path / LOCK_FILE) == 0o600
        with pytest.raises(StateError) as info:
            second.lock()
        assert str(path) in str(info.value) and "another" in str(info.value)
    finally:
        first.unlock()
    second.lock()
    second.unlock()
    second.unlock()  # harmless when not locked
    first.lock()
    first.unlock()


def test_lock_refused_does_not_leak_fds(tmp_path: Path) -> None:
    first, second = StateDir(tmp_path), StateDir(tmp_path)
    first.lock()
    try:
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(20):
            with pytest.raises(StateError):
                second.lock()
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        first.unlock()


def test_lock_creates_dir(tmp_path: Path, umask0: None) -> None:
    sd = StateDir(tmp_path / "new")
    sd.lock()
    try:
        assert mode(sd.path) == 0o700
    finally:
        sd.unlock()
