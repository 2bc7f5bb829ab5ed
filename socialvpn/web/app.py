"""The aiohttp application behind the local API.

For now it serves the API on a Unix socket in the state directory, mode 0600, and checks the
caller's credentials (SO_PEERCRED): only root or the agent's own user get in. The dashboard's
TCP listener (login token, Host/Origin/CSRF checks) joins it in a later step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import struct
from pathlib import Path
from typing import Any

from aiohttp import web

from ..errors import APIError
from .api import PREFIX, ROUTES, AgentAPI

log = logging.getLogger("socialvpn.api")

MAX_BODY = 64 * 1024
_SMALL_INT = re.compile(r"[0-9]{1,18}")
_AGENT_KEY = web.AppKey("agent", object)


def _peer_uid(request: web.Request) -> int | None:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


@web.middleware
async def _only_owner(request: web.Request, handler: Any) -> web.StreamResponse:
    uid = _peer_uid(request)
    if uid is None or uid not in (0, os.geteuid()):
        return _error(403, "only root or the agent's user may use the local API")
    try:
        return await handler(request)
    except web.HTTPException as exc:  # aiohttp's own 404/405/413: JSON like everything else
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason or "request refused")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _make_handler(route: Any) -> Any:
    async def handle(request: web.Request) -> web.StreamResponse:
        agent: AgentAPI = request.app[_AGENT_KEY]  # type: ignore[assignment]
        body: dict[str, Any] = {}
        if request.method == "POST":
            if request.content_length is not None and request.content_length > MAX_BODY:
                return _error(413, "request body too large")
            try:
                raw = await request.read()  # the whole body; client_max_size bounds it
            except web.HTTPRequestEntityTooLarge:
                return _error(413, "request body too large")
            try:
                parsed = json.loads(raw or b"{}")
            except ValueError:
                return _error(400, "request body is not JSON")
            if not isinstance(parsed, dict):
                return _error(400, "request body must be a JSON object")
            body = parsed
        else:
            for key, value in request.query.items():
                body[key] = int(value) if _SMALL_INT.fullmatch(value) else value
        body.update(request.match_info)  # path parameters win over the body
        try:
            result = await route.handler(agent, body)
        except APIError as exc:
            return _error(exc.status, str(exc))
        except Exception:
            log.exception("API %s %s failed", request.method, request.path)
            return _error(500, "internal error in the agent (see its log)")
        return web.json_response({"result": result})

    return handle


def make_app(agent: AgentAPI) -> web.Application:
    app = web.Application(middlewares=[_only_owner], client_max_size=MAX_BODY)
    app[_AGENT_KEY] = agent
    for route in ROUTES.routes.values():
        app.router.add_route(route.method, PREFIX + route.path, _make_handler(route))
    return app


class APIServer:
    """Runs the app on the Unix socket; ``stop`` removes the socket file."""

    def __init__(self, agent: AgentAPI, socket_path: Path,
                 listen: tuple[str, int] | None = None) -> None:
        self.socket_path = socket_path
        self.listen = listen  # the dashboard's TCP address (config [web] listen); None: none
        self._app = make_app(agent)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        # The caller holds the state-dir lock, so a socket file left here is stale.
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        await self._runner.setup()
        old = os.umask(0o177)
        try:
            site = web.UnixSite(self._runner, str(self.socket_path))
            await site.start()
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o600)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
