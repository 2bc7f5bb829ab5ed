"""The aiohttp application behind the local API and the dashboard: one app, two doors.

- The Unix socket in the state directory (mode 0600): the CLI's door. The caller's credentials
  (SO_PEERCRED) must be root or the agent's own user.
- The TCP listener (config ``[web] listen``, default ``127.0.0.1:7387``): the dashboard's door.
  A browser gets in with the one-time URL that ``socialvpn dashboard`` prints (see
  :mod:`socialvpn.web.dashboard` for the login, the session cookie and its origin key, the
  Host/Origin/Sec-Fetch-Site checks and CSRF). Without a session cookie it sees the login page
  only; ``/`` itself carries no secret. The API, the event stream and ``/metrics`` answer 401
  unless the request has the cookie *and* that session's key (header ``X-SVPN-Key``), or, for
  ``/metrics`` only, ``Authorization: Bearer`` with the content of ``metrics.token`` (0600,
  made in the state directory when the listener starts).

Both doors reach the same route table (:data:`socialvpn.web.api.ROUTES`): the dashboard's
script calls ``/api/v1/...`` like the CLI does. ``GET /api/v1/events`` with
``Accept: text/event-stream`` is the live stream (server-sent events): the agent's events as
they happen and, every second, ``peers`` and ``status`` when they changed, each taken from the
same handlers. Every response carries a strict Content-Security-Policy and friends.

The page reads that stream with ``fetch()`` and a stream reader, not ``EventSource``:
``EventSource`` cannot send headers, so the key would have to ride in the URL's query, where
it would land in whatever logs or shows URLs on the way (a reverse proxy or forwarder's log,
the browser's network panel and HAR exports). With ``fetch()`` the key travels the same way
for every request (one header, one check here) and a refused stream shows its 401 to the
page, which then sends the person to the login page instead of retrying for ever.

If the TCP address cannot be bound, the agent logs one warning and runs on; the Unix socket
works, ``GET /api/v1/dashboard`` says why the dashboard is off, and ``socialvpn dashboard``
prints that reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import inspect
import json
import logging
import os
import re
import secrets
import socket
import struct
import time
from collections import Counter
from pathlib import Path
from typing import Any

from aiohttp import web, web_runner

from ..errors import APIError
from . import dashboard, metrics
from .api import PREFIX, ROUTES, AgentAPI, Route

log = logging.getLogger("socialvpn.api")

MAX_BODY = 64 * 1024
MAX_STREAMS = 16  # concurrent event streams (browser tabs)
STREAM_TICK = 0.25  # how often a stream looks for new events
SNAPSHOT_INTERVAL = 1.0  # peers and status, when they changed
KEEPALIVE_INTERVAL = 15.0
METRICS_TOKEN_FILE = "metrics.token"
STATIC_DIR = Path(__file__).parent / "static"
STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                ".svg": "image/svg+xml", ".html": "text/html; charset=utf-8",
                ".ico": "image/x-icon", ".png": "image/png"}
UNIX_ONLY = frozenset({PREFIX + "dashboard/login"})
NO_KEY = ("not logged in in this browser (the session cookie came without its key): run "
          "`socialvpn dashboard` again and open the link it prints")
LOGIN_AGAIN = ("This browser is not logged in to the dashboard (the session ended, or the page "
               "was opened without the key that the login link gives it). Run "
               "`socialvpn dashboard` again and open the link it prints.")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
# Open event streams end when the server stops; older aiohttp takes no runner-level timeout.
_RUNNER_KW: dict[str, Any] = (
    {"shutdown_timeout": 2.0}
    if "shutdown_timeout" in inspect.signature(web_runner.BaseRunner.__init__).parameters
    else {})
_SMALL_INT = re.compile(r"[0-9]{1,18}")
_AGENT_KEY = web.AppKey("agent", object)
_SESSION: Any = (web.RequestKey("session", object)  # type: ignore[attr-defined]
                 if hasattr(web, "RequestKey") else "svpn_session")


class WebState:
    """What the dashboard door knows: its address, sessions, refusals, the metrics token."""

    def __init__(self, listen: tuple[str, int] | None, token_path: Path | None) -> None:
        self.listen = listen
        self.port: int | None = None  # the bound port, once listening
        self.error: str | None = None if listen is not None else "no [web] listen address"
        self.sessions = dashboard.Sessions()
        self.allowed = dashboard.allowed_hosts(listen[0] if listen else "127.0.0.1")
        self.cookie = dashboard.COOKIE_PREFIX + secrets.token_hex(4)
        self.token_path = token_path
        self.metrics_token: str | None = None
        self.refused: Counter[str] = Counter()
        self.closing = asyncio.Event()
        self.streams = 0
        self.snapshots: dict[str, tuple[float, str]] = {}
        """status/peers as JSON text and when they were taken: every open stream shares one."""
        self.static = _load_static()

    @property
    def listening(self) -> bool:
        return self.port is not None

    def describe(self) -> dict[str, Any]:
        listen = self.listen
        address = None
        if listen is not None:
            host = f"[{listen[0]}]" if ":" in listen[0] else listen[0]
            address = f"{host}:{self.port or listen[1]}"
        return {"listen": address, "listening": self.listening, "error": self.error,
                "sessions": self.sessions.counts[1], "refused": dict(self.refused),
                "metrics_token_file": str(self.token_path) if self.metrics_token else None}


_WEB_KEY = web.AppKey("web", WebState)


def _load_static() -> dict[str, tuple[bytes, str]]:
    out: dict[str, tuple[bytes, str]] = {}
    if STATIC_DIR.is_dir():
        for path in sorted(STATIC_DIR.iterdir()):
            ctype = STATIC_TYPES.get(path.suffix)
            if path.is_file() and ctype is not None:
                out[path.name] = (path.read_bytes(), ctype)
    return out


# --- the doors -----------------------------------------------------------------------------


def _listener(request: web.Request) -> str | None:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None:
        return None
    if sock.family == socket.AF_UNIX:
        return "unix"
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        return "tcp"
    return None


def _peer_uid(request: web.Request) -> int | None:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def _refuse(state: WebState, reason: str, status: int, message: str) -> web.Response:
    state.refused[reason] += 1
    log.debug("dashboard refused a request (%s)", reason)
    return _error(status, message)


def _check_tcp(request: web.Request, state: WebState) -> web.Response | None:
    """None if the request may pass the dashboard's door, else the refusal."""
    if not dashboard.host_ok(request.headers.get("Host"), state.allowed):
        return _refuse(state, "host", 403, "refused: foreign Host (open the dashboard by the "
                                           "URL that `socialvpn dashboard` prints)")
    path = request.path
    reading = request.method in ("GET", "HEAD")
    guarded = path.startswith(PREFIX) or path == "/metrics"
    if guarded and not dashboard.fetch_site_ok(request.headers.get("Sec-Fetch-Site")):
        return _refuse(state, "fetch-site", 403, "refused: cross-site request")
    if path in UNIX_ONLY:
        return _refuse(state, "unix-only", 403,
                       "refused: login URLs come from `socialvpn dashboard` only")
    if not reading:
        host = request.headers.get("Host", "")
        if not dashboard.origin_ok(request.headers.get("Origin"),
                                   request.headers.get("Referer"), host):
            return _refuse(state, "origin", 403, "refused: cross-origin request")
        session, why = _admit(request, state)
        if why == "session":
            return _refuse(state, "session", 403, "refused: not logged in (run `socialvpn "
                                                  "dashboard` for a login URL)")
        if session is None:
            return _refuse(state, "key", 401, NO_KEY)
        if not dashboard.csrf_ok(session, request.headers.get(dashboard.CSRF_HEADER)):
            return _refuse(state, "csrf", 403, "refused: missing or wrong CSRF token "
                                               "(reload the page)")
        request[_SESSION] = session
        return None
    if guarded:
        if path == "/metrics" and dashboard.bearer_ok(
                state.metrics_token, request.headers.get("Authorization")):
            return None
        session, why = _admit(request, state)
        if why == "session":
            return _refuse(state, "session", 401, "not logged in: run `socialvpn dashboard` "
                                                  "for a login URL")
        if session is None:
            return _refuse(state, "key", 401, NO_KEY)
        request[_SESSION] = session
    return None


def _admit(request: web.Request, state: WebState) -> tuple[dashboard.Session | None, str]:
    """The session of the request's cookie, if the request also carries its origin key."""
    return state.sessions.admit(request.cookies.get(state.cookie),
                                request.headers.get(dashboard.KEY_HEADER))


@web.middleware
async def _guard(request: web.Request, handler: Any) -> web.StreamResponse:
    state = request.app[_WEB_KEY]
    kind = _listener(request)
    if kind == "unix":
        uid = _peer_uid(request)
        if uid is None or uid not in (0, os.geteuid()):
            return _error(403, "only root or the agent's user may use the local API")
    elif kind == "tcp":
        refusal = _check_tcp(request, state)
        if refusal is not None:
            return refusal
    else:
        return _error(403, "refused: unknown listener")
    try:
        return await handler(request)
    except web.HTTPException as exc:  # aiohttp's own 404/405/413: JSON like everything else
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason or "request refused")


async def _headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if request.path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-cache")
    else:
        response.headers["Cache-Control"] = "no-store"


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


# --- the API -------------------------------------------------------------------------------


def _make_handler(route: Route) -> Any:
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


async def _call(agent: AgentAPI, method: str, path: str, body: dict[str, Any]) -> Any:
    return await ROUTES.routes[(method, path)].handler(agent, body)


async def _snapshot(agent: AgentAPI, state: WebState, name: str, now: float) -> str:
    """``GET name`` as JSON text, taken at most once per half snapshot interval for all
    streams together (ten open tabs do not make the agent build its peer table ten times)."""
    cached = state.snapshots.get(name)
    if cached is not None and 0 <= now - cached[0] < SNAPSHOT_INTERVAL / 2:
        return cached[1]
    text = json.dumps(await _call(agent, "GET", name, {}), sort_keys=True)
    state.snapshots[name] = (now, text)
    return text


def _sse(event: str, data: Any, event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, sort_keys=True)}\n\n".encode()


async def _stream(request: web.Request, agent: AgentAPI, state: WebState) -> web.StreamResponse:
    """Server-sent events: the agent's events, and peers/status whenever they change."""
    if state.streams >= MAX_STREAMS:
        return _error(429, "too many event streams open")
    resume = request.headers.get("Last-Event-ID", "")
    last = int(resume) if _SMALL_INT.fullmatch(resume) else None
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "X-Accel-Buffering": "no"})
    state.streams += 1
    cookie = request.cookies.get(state.cookie)
    tcp = _listener(request) == "tcp"
    try:
        await response.prepare(request)
        await response.write(b"retry: 2000\n\n")
        events = await _call(agent, "GET", "events", {"since": last or 0})
        if last is None:
            events = events[-100:]
        sent: dict[str, str] = {}
        loop = asyncio.get_running_loop()
        next_snapshot = last_write = loop.time()
        next_snapshot -= 1
        while not state.closing.is_set():
            if tcp and state.sessions.get(cookie) is None:
                await response.write(_sse("logout", {"reason": "session ended"}))
                break
            for event in events:
                await response.write(_sse("agent", event, event["seq"]))
                last = event["seq"]
                last_write = loop.time()
            now = loop.time()
            if now >= next_snapshot:
                next_snapshot = now + SNAPSHOT_INTERVAL
                for name in ("status", "peers"):
                    text = await _snapshot(agent, state, name, now)
                    if text != sent.get(name):
                        sent[name] = text
                        await response.write(f"event: {name}\ndata: {text}\n\n".encode())
                        last_write = now
            if now - last_write >= KEEPALIVE_INTERVAL:
                await response.write(b": keepalive\n\n")
                last_write = now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.closing.wait(), STREAM_TICK)
            events = await _call(agent, "GET", "events", {"since": last or 0})
    except (ConnectionResetError, ConnectionError):
        pass  # the browser went away
    except APIError as exc:
        with contextlib.suppress(ConnectionError):
            await response.write(_sse("error", {"error": str(exc)}))
    finally:
        state.streams -= 1
    return response


def _events_or_stream(plain: Any) -> Any:
    async def handle(request: web.Request) -> web.StreamResponse:
        if "text/event-stream" in request.headers.get("Accept", ""):
            return await _stream(request, request.app[_AGENT_KEY],  # type: ignore[arg-type]
                                 request.app[_WEB_KEY])
        return await plain(request)

    return handle


# --- the dashboard's own routes --------------------------------------------------------------


async def _dashboard_info(request: web.Request) -> web.Response:
    return web.json_response({"result": request.app[_WEB_KEY].describe()})


async def _dashboard_login(request: web.Request) -> web.Response:
    """Unix socket only: a one-time login URL for ``socialvpn dashboard``."""
    state = request.app[_WEB_KEY]
    if not state.listening or state.listen is None or state.port is None:
        return _error(409, f"the dashboard is off: {state.error or 'not listening'}")
    token = state.sessions.issue_token()
    return web.json_response({"result": {
        "url": dashboard.login_url(state.listen[0], state.port, token),
        "expires_in": int(dashboard.TOKEN_TTL)}})


async def _session(request: web.Request) -> web.Response:
    session = request.get(_SESSION)
    if session is None:
        return web.json_response({"result": None})
    return web.json_response({"result": {
        "csrf": session.csrf, "header": dashboard.CSRF_HEADER,
        "expires_in": max(0, int(session.expires - time.monotonic()))}})


def _page(state: WebState, name: str, status: int = 200, **values: str) -> web.Response:
    body, ctype = state.static[name]
    text = body.decode()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", html.escape(value, quote=True))
    return web.Response(body=text.encode(), status=status, content_type="text/html",
                        charset="utf-8")


async def _index(request: web.Request) -> web.StreamResponse:
    """The page itself: no secret in it (its script fetches data and the CSRF token with the
    key); without a session cookie, the login page instead."""
    state = request.app[_WEB_KEY]
    session = state.sessions.get(request.cookies.get(state.cookie))
    if _listener(request) != "tcp" or session is None:
        raise web.HTTPSeeOther("/login")
    return _page(state, "index.html")


async def _login(request: web.Request) -> web.StreamResponse:
    state = request.app[_WEB_KEY]
    token = request.query.get("token")
    if token is None:
        # Always the login page, also with a cookie: only the page's script knows whether
        # this browser has the key, and it comes here (``?again``) when it has not.
        return _page(state, "login.html",
                     message=LOGIN_AGAIN if "again" in request.query else "")
    redeemed = state.sessions.redeem(token) if _listener(request) == "tcp" else None
    if redeemed is None:
        state.refused["token"] += 1
        return _page(state, "login.html", status=403,
                     message="That login link is not valid: it works once, for two minutes. "
                             "Run `socialvpn dashboard` for a new one.")
    response = web.HTTPSeeOther(dashboard.landing(redeemed.key))
    response.set_cookie(state.cookie, redeemed.cookie, max_age=int(dashboard.SESSION_TTL),
                        path="/", httponly=True, samesite="Strict")
    raise response


async def _logout(request: web.Request) -> web.Response:
    state = request.app[_WEB_KEY]
    state.sessions.end(request.cookies.get(state.cookie))
    response = web.json_response({"result": "logged out"})
    response.del_cookie(state.cookie, path="/")
    return response


async def _static(request: web.Request) -> web.Response:
    found = request.app[_WEB_KEY].static.get(request.match_info["name"])
    if found is None or request.match_info["name"].endswith(".html"):
        raise web.HTTPNotFound()
    body, ctype = found
    return web.Response(body=body, headers={"Content-Type": ctype})


async def _metrics(request: web.Request) -> web.Response:
    agent: AgentAPI = request.app[_AGENT_KEY]  # type: ignore[assignment]
    try:
        status = await _call(agent, "GET", "status", {})
        peers = await _call(agent, "GET", "peers", {})
    except APIError as exc:
        return _error(exc.status, str(exc))
    text = metrics.render(status, peers, request.app[_WEB_KEY].describe())
    return web.Response(text=text, headers={"Content-Type": metrics.CONTENT_TYPE})


def make_app(agent: AgentAPI, state: WebState | None = None) -> web.Application:
    app = web.Application(middlewares=[_guard], client_max_size=MAX_BODY)
    app[_AGENT_KEY] = agent
    app[_WEB_KEY] = state if state is not None else WebState(None, None)
    app.on_response_prepare.append(_headers)
    for route in ROUTES.routes.values():
        handler = _make_handler(route)
        if (route.method, route.path) == ("GET", "events"):
            handler = _events_or_stream(handler)
        app.router.add_route(route.method, PREFIX + route.path, handler)
    app.router.add_get(PREFIX + "dashboard", _dashboard_info, allow_head=False)
    app.router.add_post(PREFIX + "dashboard/login", _dashboard_login)
    app.router.add_get(PREFIX + "session", _session, allow_head=False)
    app.router.add_get("/", _index)
    app.router.add_get("/login", _login)
    app.router.add_post("/logout", _logout)
    app.router.add_get("/static/{name}", _static)
    app.router.add_get("/metrics", _metrics)
    return app


def _read_or_make_token(path: Path) -> str:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


class APIServer:
    """Runs the app on the Unix socket and, if configured, on the dashboard's TCP address;
    ``stop`` ends the event streams and removes the socket file."""

    def __init__(self, agent: AgentAPI, socket_path: Path,
                 listen: tuple[str, int] | None = None) -> None:
        self.socket_path = socket_path
        self.listen = listen  # the dashboard's TCP address (config [web] listen); None: none
        self.web = WebState(listen, socket_path.parent / METRICS_TOKEN_FILE)
        self._app = make_app(agent, self.web)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        # The caller holds the state-dir lock, so a socket file left here is stale.
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._runner = web.AppRunner(self._app, access_log=None, handle_signals=False,
                                     **_RUNNER_KW)
        await self._runner.setup()
        old = os.umask(0o177)
        try:
            site = web.UnixSite(self._runner, str(self.socket_path))
            await site.start()
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o600)
        if self.listen is not None:
            await self._start_dashboard(self.listen)

    async def _start_dashboard(self, listen: tuple[str, int]) -> None:
        assert self._runner is not None
        host, port = listen
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            self.web.error = f"cannot listen on {shown}: {exc.strerror or exc}"
            log.warning("dashboard off: %s (set [web] listen to a free address); the local "
                        "API and the CLI work as before", self.web.error)
            return
        bound = [a for a in self._runner.addresses if isinstance(a, tuple)]
        self.web.port = int(bound[-1][1]) if bound else port
        self.web.error = None
        try:
            self.web.metrics_token = _read_or_make_token(self.web.token_path) \
                if self.web.token_path is not None else None
        except OSError as exc:
            log.warning("no metrics token file (%s): /metrics needs a dashboard session", exc)
        log.info("dashboard on http://%s (run `socialvpn dashboard` for a login URL)",
                 shown if port else f"{host}:{self.web.port}")

    async def stop(self) -> None:
        self.web.closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
