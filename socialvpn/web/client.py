"""Client of the local API over the Unix socket (used by the CLI and by tests).

Synchronous and stdlib-only so that every CLI command starts fast.
"""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from ..errors import AgentNotRunning, APIError
from .api import PREFIX


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class APIClient:
    def __init__(self, socket_path: Path, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def get(self, path: str, **query: Any) -> Any:
        suffix = f"?{urlencode(query)}" if query else ""
        return self._call("GET", path + suffix, None)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self._call("POST", path, body)

    def _call(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            try:
                payload = json.dumps(body).encode() if body is not None else None
                headers = {"Content-Type": "application/json"} if payload is not None else {}
                conn.request(method, PREFIX + path, body=payload, headers=headers)
                response = conn.getresponse()
                raw = response.read()
            except (FileNotFoundError, ConnectionRefusedError):
                raise AgentNotRunning(
                    f"the agent is not running (no API at {self.socket_path}); "
                    "start it with `socialvpn up`"
                ) from None
            except PermissionError:
                raise AgentNotRunning(
                    f"permission denied on {self.socket_path}: run as root or as the agent's user"
                ) from None
            except TimeoutError:
                raise APIError(f"the agent did not answer within {self.timeout:.0f} s", 504) \
                    from None
            except OSError as exc:
                raise AgentNotRunning(f"cannot reach the agent at {self.socket_path}: "
                                      f"{exc.strerror or exc}") from None
        finally:
            conn.close()
        try:
            data = json.loads(raw)
        except ValueError:
            raise APIError(f"the agent answered {response.status} with non-JSON", 502) from None
        if response.status >= 400 or "error" in data:
            raise APIError(str(data.get("error", f"HTTP {response.status}")), response.status)
        return data.get("result")
