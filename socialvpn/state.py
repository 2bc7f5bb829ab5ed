"""The state directory: keys, requests and (later) groups and peer caches.

Every file is written atomically (temp file in the same directory, fsync, rename, fsync of the
directory) with mode 0600; the directory itself is 0700. A corrupt file is reported as a
:class:`StateError` naming it; it is never silently reset.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any

from .errors import StateError
from .keys import DeviceKeys

KEYS_FILE = "device.json"
REQUESTS_FILE = "requests.json"
GROUPS_FILE = "groups.json"
API_SOCKET = "api.sock"
LOCK_FILE = "agent.lock"


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_fd: int | None = None

    @property
    def api_socket(self) -> Path:
        return self.path / API_SOCKET

    def ensure(self) -> None:
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.path, 0o700)
        except OSError as exc:
            raise StateError(f"{self.path}: cannot create the state directory: "
                             f"{exc.strerror}") from None

    # --- JSON files ----------------------------------------------------------------------

    def write_json(self, name: str, value: Any) -> None:
        data = json.dumps(value, sort_keys=True, indent=1).encode() + b"\n"
        try:
            atomic_write(self.path / name, data)
        except OSError as exc:
            raise StateError(f"{self.path / name}: cannot write: {exc.strerror}") from None

    def read_json(self, name: str, default: Any = None) -> Any:
        path = self.path / name
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return default
        except OSError as exc:
            raise StateError(f"{path}: cannot read: {exc.strerror}") from None
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise StateError(
                f"{path}: corrupt (not JSON); move it away to start that part afresh"
            ) from None

    # --- device keys ---------------------------------------------------------------------

    def has_keys(self) -> bool:
        return (self.path / KEYS_FILE).exists()

    def load_keys(self) -> DeviceKeys:
        path = self.path / KEYS_FILE
        if not path.exists():
            raise StateError(f"{path}: no device keys; run `socialvpn init` first")
        data = self.read_json(KEYS_FILE)
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise StateError(f"{path}: the key file is readable by others (mode {mode:o}); "
                             f"run chmod 600 {path}")
        try:
            return DeviceKeys.from_json(data)
        except ValueError as exc:
            raise StateError(f"{path}: corrupt device keys: {exc}") from None

    def load_or_create_keys(self) -> tuple[DeviceKeys, bool]:
        """The device keys, made on first use. Returns (keys, created)."""
        self.ensure()
        if self.has_keys():
            return self.load_keys(), False
        keys = DeviceKeys.generate()
        self.write_json(KEYS_FILE, keys.to_json())
        return keys, True

    # --- single agent per state dir ------------------------------------------------------

    def lock(self) -> None:
        """Take the agent lock; a second agent on the same state dir is refused."""
        self.ensure()
        path = self.path / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateError(
                f"{self.path}: another SocialVPN agent is running with this state directory"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
