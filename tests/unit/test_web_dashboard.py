"""Unit tests for the dashboard's door (socialvpn/web/app.py + dashboard.py): the real
APIServer with a fake agent, the Unix socket for the login URL, TCP on 127.0.0.1 for the rest.

Login token one-time and expiring; no data without a session; a session cookie without its
origin key (or with another session's key) reads and changes nothing (the cookie leaks to
other ports of 127.0.0.1); foreign and rebinding Host, cross-origin and CSRF-less POSTs
refused with 403 and nothing changed; the page carries no secret; CSP and friends on every
response; static files; /metrics; the live event stream; a busy port keeps the agent up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from socialvpn.errors import APIError
from socialvpn.web import dashboard
from socialvpn.web.app import CSP, METRICS_TOKEN_FILE, STATIC_DIR, APIServer
from socialvpn.web.client import APIClient
from tests.kit.browser import FakeAgent, short_dir

pytestmark = pytest.mark.unit

AUTO = "(the key of this cookie's login)"

HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


@dataclass
class Reply:
    status: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Door:
    """The app behind a fake agent. ``request`` acts like the page's script: with a cookie from
    :meth:`login` it also sends that login's origin key, unless ``key`` says otherwise (None:
    no key header; a string: that key)."""

    agent: FakeAgent
    server: APIServer
    client: APIClient
    http: aiohttp.ClientSession
    keys: dict[str, str] = field(default_factory=dict)  # cookie -> its login's origin key

    @property
    def port(self) -> int:
        assert self.server.web.port is not None
        return self.server.web.port

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def login_url(self) -> str:
        return str((await asyncio.to_thread(self.client.post, "dashboard/login", {}))["url"])

    def auth(self, cookie: str | None, key: str | None = AUTO) -> dict[str, str]:
        """Cookie and key headers, as the page sends them."""
        h: dict[str, str] = {}
        if cookie is not None:
            h["Cookie"] = f"{self.server.web.cookie}={cookie}"
        if key == AUTO:
            key = self.keys.get(cookie or "")
        if key is not None:
            h[dashboard.KEY_HEADER] = key
        return h

    async def request(self, method: str, path: str, *, host: str | None = None,
                      cookie: str | None = None, key: str | None = AUTO,
                      headers: dict[str, str] | None = None, body: Any = None) -> Reply:
        h = {"Host": host or f"127.0.0.1:{self.port}", **self.auth(cookie, key),
             **(headers or {})}
        data = json.dumps(body).encode() if body is not None else None
        if data is not None:
            h.setdefault("Content-Type", "application/json")
        async with self.http.request(method, f"http://127.0.0.1:{self.port}{path}",
                                     headers=h, data=data, allow_redirects=False) as r:
            return Reply(r.status, r.headers, await r.read())

    async def login(self) -> tuple[str, str]:
        """A fresh session: (cookie value, CSRF token); its key goes to :attr:`keys`."""
        url = await self.login_url()
        r = await self.request("GET", url.split(str(self.port), 1)[1])
        assert r.status == 303
        location = r.headers["Location"]
        assert location.startswith("/#key=")
        morsel = r.headers["Set-Cookie"]
        cookie = morsel.split(";", 1)[0].split("=", 1)[1]
        self.keys[cookie] = location.split("=", 1)[1]
        session = await self.request("GET", "/api/v1/session", cookie=cookie)
        return cookie, session.json()["result"]["csrf"]

    async def post(self, path: str, body: Any, cookie: str | None, csrf: str | None,
                   key: str | None = AUTO, **headers: str) -> Reply:
        h = {"Origin": self.origin, **headers}
        if csrf is not None:
            h["X-CSRF-Token"] = csrf
        return await self.request("POST", path, cookie=cookie, key=key, headers=h, body=body)


@pytest.fixture
async def door(tmp_path: Path) -> AsyncIterator[Door]:
    with short_dir(tmp_path) as d:
        agent = FakeAgent(peer_count=3)
        server = APIServer(agent, d / "api.sock", listen=("127.0.0.1", 0))  # type: ignore[arg-type]
        await server.start()
        jar = aiohttp.DummyCookieJar()  # the tests send cookies by hand
        async with aiohttp.ClientSession(cookie_jar=jar, auto_decompress=True) as http:
            try:
                yield Door(agent, server, APIClient(d / "api.sock", timeout=10), http)
            finally:
                await server.stop()


# --- login ---------------------------------------------------------------------------------


async def test_login_url_from_the_unix_socket(door: Door) -> None:
    url = await door.login_url()
    assert url.startswith(f"http://127.0.0.1:{door.port}/login?token=")
    assert len(url.rsplit("=", 1)[1]) >= 40


async def test_login_token_is_single_use_and_sets_a_strict_cookie(door: Door) -> None:
    path = (await door.login_url()).split(str(door.port), 1)[1]
    first = await door.request("GET", path)
    assert first.status == 303 and first.headers["Location"].startswith("/#key=")
    cookie = first.headers["Set-Cookie"]
    name, _, rest = cookie.partition("=")
    assert name == door.server.web.cookie
    attrs = {a.strip().split("=")[0].lower(): a for a in rest.split(";")[1:]}
    assert {"httponly", "samesite", "path", "max-age"} <= set(attrs)
    assert attrs["samesite"].strip() == "SameSite=Strict" and attrs["path"].strip() == "Path=/"
    assert len(rest.split(";", 1)[0]) >= 40  # 32 random bytes, url-safe
    again = await door.request("GET", path)
    assert again.status == 403 and "Set-Cookie" not in again.headers
    assert b"socialvpn dashboard" in again.body and b"not valid" in again.body
    assert door.server.web.refused["token"] == 1


async def test_forged_token_and_page_without_session(door: Door) -> None:
    r = await door.request("GET", "/login?token=" + "A" * 43)
    assert r.status == 403 and "Set-Cookie" not in r.headers
    r = await door.request("GET", "/")
    assert r.status == 303 and r.headers["Location"] == "/login"
    r = await door.request("GET", "/login")
    assert r.status == 200 and b"socialvpn dashboard" in r.body
    assert b"alice" not in r.body and b"csrf" not in r.body.lower()


def test_token_expires_after_two_minutes_and_sessions_expire() -> None:
    now = [1000.0]
    sessions = dashboard.Sessions(clock=lambda: now[0])
    old = sessions.issue_token()
    now[0] += dashboard.TOKEN_TTL + 0.01
    assert sessions.redeem(old) is None
    fresh = sessions.issue_token()
    now[0] += dashboard.TOKEN_TTL - 1
    redeemed = sessions.redeem(fresh)
    assert redeemed is not None
    cookie, session = redeemed.cookie, redeemed.session
    assert sessions.redeem(fresh) is None  # single use
    assert sessions.get(cookie) == session
    assert sessions.get(cookie + "x") is None and sessions.get("") is None
    now[0] += dashboard.SESSION_TTL
    assert sessions.get(cookie) is None
    assert sessions.counts == (0, 0)


def test_token_and_session_stores_are_bounded() -> None:
    sessions = dashboard.Sessions(clock=lambda: 5.0)
    tokens = [sessions.issue_token() for _ in range(dashboard.MAX_TOKENS + 5)]
    assert sessions.counts[0] == dashboard.MAX_TOKENS
    assert sessions.redeem(tokens[0]) is None and sessions.redeem(tokens[-1]) is not None


async def test_logout_ends_the_session(door: Door) -> None:
    cookie, csrf = await door.login()
    r = await door.post("/logout", {}, cookie, csrf)
    assert r.status == 200
    r = await door.request("GET", "/api/v1/status", cookie=cookie)
    assert r.status == 401


# --- no data without a session --------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/v1/status", "/api/v1/friends", "/api/v1/requests",
                                  "/api/v1/groups", "/api/v1/peers", "/api/v1/events",
                                  "/api/v1/dashboard", "/api/v1/session", "/metrics"])
@pytest.mark.parametrize("cookie", [None, "forged-session-value"])
async def test_no_data_without_session(door: Door, path: str, cookie: str | None) -> None:
    r = await door.request("GET", path, cookie=cookie)
    assert r.status == 401
    assert b"alice" not in r.body and b"lab" not in r.body and b"socialvpn_" not in r.body
    assert "socialvpn dashboard" in r.json()["error"]


async def test_no_event_stream_without_session(door: Door) -> None:
    r = await door.request("GET", "/api/v1/events", headers={"Accept": "text/event-stream"})
    assert r.status == 401 and not r.headers["Content-Type"].startswith("text/event-stream")


async def test_session_reads_the_api(door: Door) -> None:
    cookie, _ = await door.login()
    r = await door.request("GET", "/api/v1/status", cookie=cookie)
    assert r.status == 200 and r.json()["result"]["account"] == "alice@example.org"
    r = await door.request("GET", "/api/v1/peers", cookie=cookie)
    assert [p["device"] for p in r.json()["result"]] == ["dev0", "dev1", "dev2"]


# --- the origin key: a cookie alone opens nothing -----------------------------------------


async def test_login_redirect_carries_the_key_only_in_the_fragment(door: Door) -> None:
    path = (await door.login_url()).split(str(door.port), 1)[1]
    r = await door.request("GET", path)
    assert r.status == 303
    location = r.headers["Location"]
    assert location.startswith("/#key=") and "?" not in location
    key = location[len("/#key="):]
    assert len(key) >= 40 and set(key) <= set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    cookie = r.headers["Set-Cookie"].split(";", 1)[0].split("=", 1)[1]
    assert key != cookie and key not in r.headers["Set-Cookie"]
    assert key.encode() not in r.body
    # the fragment's key with the cookie is a working session; the cookie alone is not
    ok = await door.request("GET", "/api/v1/status", cookie=cookie, key=key)
    assert ok.status == 200 and ok.json()["result"]["account"] == "alice@example.org"
    assert (await door.request("GET", "/api/v1/status", cookie=cookie, key=None)).status == 401


@pytest.mark.parametrize("path", ["/api/v1/status", "/api/v1/friends", "/api/v1/requests",
                                  "/api/v1/groups", "/api/v1/groups/lab", "/api/v1/peers",
                                  "/api/v1/events", "/api/v1/dashboard", "/api/v1/session",
                                  "/metrics"])
@pytest.mark.parametrize("key", [None, "", "wrong", "x" * 43],
                         ids=["no-key", "empty", "wrong", "same-length"])
async def test_cookie_without_its_key_reads_nothing(door: Door, path: str,
                                                    key: str | None) -> None:
    cookie, csrf = await door.login()
    r = await door.request("GET", path, cookie=cookie, key=key)
    assert r.status == 401
    for leak in (b"alice", b"lab", b"dev0", b"socialvpn_", csrf.encode()):
        assert leak not in r.body
    assert "socialvpn dashboard" in r.json()["error"]
    assert door.server.web.refused["key"] == 1
    assert door.agent.calls == []


async def test_cookie_without_its_key_gets_no_event_stream(door: Door) -> None:
    cookie, _ = await door.login()
    for key in (None, "wrong"):
        r = await door.request("GET", "/api/v1/events", cookie=cookie, key=key,
                               headers={"Accept": "text/event-stream"})
        assert r.status == 401 and not r.headers["Content-Type"].startswith("text/event-stream")
        assert b"dev0" not in r.body
    assert door.server.web.streams == 0 and door.server.web.refused["key"] == 2


@pytest.mark.parametrize("key", [None, "wrong"], ids=["no-key", "wrong-key"])
@pytest.mark.parametrize(("path", "body"), [
    ("/api/v1/requests", {"op": "accept", "jid": "bob@example.org"}),
    ("/api/v1/groups", {"op": "create", "name": "lab"}),
    ("/api/v1/friends", {"op": "add", "jid": "mallory@evil.example"}),
    ("/logout", {}),
])
async def test_cookie_and_csrf_without_the_key_change_nothing(
        door: Door, key: str | None, path: str, body: dict[str, Any]) -> None:
    """Even with the right Origin and CSRF token (which the key guards), no key: no change."""
    cookie, csrf = await door.login()
    r = await door.post(path, body, cookie, csrf, key=key)
    assert r.status == 401 and "socialvpn dashboard" in r.json()["error"]
    assert door.agent.calls == [] and door.agent.group_names == []
    assert door.agent.friend_requests == ["bob@example.org"]
    assert door.server.web.refused["key"] == 1
    assert (await door.request("GET", "/api/v1/status", cookie=cookie)).status == 200


async def test_key_of_another_session_is_refused(door: Door) -> None:
    cookie_a, csrf_a = await door.login()
    cookie_b, csrf_b = await door.login()
    key_a, key_b = door.keys[cookie_a], door.keys[cookie_b]
    for cookie, key, csrf in ((cookie_a, key_b, csrf_a), (cookie_b, key_a, csrf_b)):
        r = await door.request("GET", "/api/v1/peers", cookie=cookie, key=key)
        assert r.status == 401 and b"dev0" not in r.body
        r = await door.post("/api/v1/groups", {"op": "create", "name": "lab"}, cookie, csrf,
                            key=key)
        assert r.status == 401
    assert door.agent.calls == [] and door.server.web.refused["key"] == 4
    for cookie, key in ((cookie_a, key_a), (cookie_b, key_b)):
        r = await door.request("GET", "/api/v1/peers", cookie=cookie, key=key)
        assert r.status == 200


async def test_key_without_a_cookie_is_refused(door: Door) -> None:
    cookie, csrf = await door.login()
    r = await door.request("GET", "/api/v1/status", key=door.keys[cookie])
    assert r.status == 401 and door.server.web.refused["session"] == 1
    r = await door.post("/api/v1/groups", {"op": "create", "name": "lab"}, None, csrf,
                        key=door.keys[cookie])
    assert r.status == 403 and door.agent.calls == []


async def test_login_page_even_with_a_cookie_and_why(door: Door) -> None:
    """The page's script sends a browser without the key to /login?again: no redirect loop
    back to /, and a clear message; no data either way."""
    cookie, _ = await door.login()
    r = await door.request("GET", "/login", cookie=cookie, key=None)
    assert r.status == 200 and b"socialvpn dashboard" in r.body
    assert b"not logged in" not in r.body
    r = await door.request("GET", "/login?again", cookie=cookie, key=None)
    assert r.status == 200 and b"not logged in" in r.body and b"again" in r.body
    assert b"alice" not in r.body and b"dev0" not in r.body


async def test_metrics_bearer_path_unchanged_by_a_keyless_cookie(door: Door) -> None:
    cookie, _ = await door.login()
    token = (door.server.socket_path.parent / METRICS_TOKEN_FILE).read_text().strip()
    r = await door.request("GET", "/metrics", cookie=cookie, key=None,
                           headers={"Authorization": f"Bearer {token}"})
    assert r.status == 200 and b"socialvpn_up 1" in r.body
    r = await door.request("GET", "/metrics", cookie=cookie)  # cookie + key: a session
    assert r.status == 200 and b"socialvpn_up 1" in r.body


def test_sessions_admit_cookie_and_its_key_only() -> None:
    now = [10.0]
    sessions = dashboard.Sessions(clock=lambda: now[0])
    a = sessions.redeem(sessions.issue_token())
    b = sessions.redeem(sessions.issue_token())
    assert a is not None and b is not None
    assert len({a.cookie, a.key, a.session.csrf, b.cookie, b.key}) == 5
    assert sessions.admit(a.cookie, a.key) == (a.session, "")
    assert sessions.admit(b.cookie, b.key) == (b.session, "")
    assert sessions.admit(a.cookie, b.key) == (None, "key")
    assert sessions.admit(b.cookie, a.key) == (None, "key")
    for key in (None, "", a.key + "x", a.key[:-1], a.cookie):
        assert sessions.admit(a.cookie, key) == (None, "key")
    assert sessions.admit(None, a.key) == (None, "session")
    assert sessions.admit(a.key, a.key) == (None, "session")  # the key is no cookie
    now[0] += dashboard.SESSION_TTL
    assert sessions.admit(a.cookie, a.key) == (None, "session")


def test_keys_and_cookies_are_kept_as_digests() -> None:
    import hashlib

    sessions = dashboard.Sessions(clock=lambda: 1.0)
    login = sessions.redeem(sessions.issue_token())
    assert login is not None
    assert login.session.cookie == hashlib.sha256(login.cookie.encode()).digest()
    assert login.session.origin_key == hashlib.sha256(login.key.encode()).digest()
    assert login.key not in repr(login.session) and login.cookie not in repr(login.session)
    assert dashboard.key_ok(login.session, login.key)
    assert not dashboard.key_ok(login.session, None)
    assert not dashboard.key_ok(login.session, "\udcff")  # lone surrogate: refused, no error


def test_landing_puts_the_key_in_the_fragment() -> None:
    assert dashboard.landing("K-ey_1") == "/#key=K-ey_1"
    assert dashboard.KEY_HEADER.lower().startswith("x-")


# --- Host, Origin, Sec-Fetch-Site, CSRF -----------------------------------------------------


@pytest.mark.parametrize("host", ["evil.example", "evil.example:7387", "127.0.0.1.evil.example",
                                  "localhost.evil.example:80", "10.0.0.1:7387",
                                  "127.0.0.1@evil.example", "[::2]:7387", "::1"])
@pytest.mark.parametrize("path", ["/", "/login", "/api/v1/status", "/metrics",
                                  "/static/app.js"])
async def test_foreign_or_rebinding_host_is_refused(door: Door, host: str, path: str) -> None:
    cookie, _ = await door.login()
    r = await door.request("GET", path, host=host, cookie=cookie)
    assert r.status == 403
    assert b"alice" not in r.body
    assert "Host" in r.json()["error"]


async def test_rebinding_host_cannot_post(door: Door) -> None:
    cookie, csrf = await door.login()
    r = await door.request("POST", "/api/v1/friends", host="evil.example:7387", cookie=cookie,
                           headers={"Origin": "http://evil.example:7387", "X-CSRF-Token": csrf},
                           body={"op": "add", "jid": "mallory@evil.example"})
    assert r.status == 403 and door.agent.calls == []


@pytest.mark.parametrize("host", ["127.0.0.1:1", "localhost:7387", "LOCALHOST", "[::1]:9999",
                                  "127.0.0.1"])
async def test_loopback_names_on_any_port_are_fine(door: Door, host: str) -> None:
    cookie, _ = await door.login()
    r = await door.request("GET", "/api/v1/status", host=host, cookie=cookie)
    assert r.status == 200


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"},
    {"Origin": "http://evil.example:7387"},
    {"Origin": "null"},
    {"Origin": "https://127.0.0.1:{port}"},
    {"Origin": "http://127.0.0.1:1"},
    {"Origin": ""},
    {"Referer": "http://evil.example/page"},
    {},  # neither Origin nor Referer
], ids=["other-site", "other-site-same-port", "null", "https", "other-port", "empty",
        "referer-other", "none"])
async def test_cross_origin_post_is_refused(door: Door, headers: dict[str, str]) -> None:
    cookie, csrf = await door.login()
    h = {k: v.format(port=door.port) for k, v in headers.items()}
    h["X-CSRF-Token"] = csrf
    r = await door.request("POST", "/api/v1/requests", cookie=cookie, headers=h,
                           body={"op": "accept", "jid": "bob@example.org"})
    assert r.status == 403 and "cross-origin" in r.json()["error"]
    assert door.agent.calls == [] and door.agent.friend_requests == ["bob@example.org"]


async def test_same_origin_referer_without_origin_is_fine(door: Door) -> None:
    cookie, csrf = await door.login()
    r = await door.request("POST", "/api/v1/friends", cookie=cookie,
                           headers={"Referer": door.origin + "/#friends", "X-CSRF-Token": csrf},
                           body={"op": "add", "jid": "carol@example.org"})
    assert r.status == 200 and door.agent.calls == [("friend_add", "carol@example.org")]


@pytest.mark.parametrize("csrf", [None, "", "wrong", "x" * 43], ids=["none", "empty", "wrong",
                                                                     "same-length"])
@pytest.mark.parametrize(("path", "body"), [
    ("/api/v1/requests", {"op": "accept", "jid": "bob@example.org"}),
    ("/api/v1/groups", {"op": "create", "name": "lab"}),
    ("/api/v1/friends", {"op": "add", "jid": "mallory@evil.example"}),
    ("/logout", {}),
])
async def test_post_without_right_csrf_is_refused(door: Door, csrf: str | None, path: str,
                                                  body: dict[str, Any]) -> None:
    cookie, _ = await door.login()
    r = await door.post(path, body, cookie, csrf)
    assert r.status == 403 and "CSRF" in r.json()["error"]
    assert door.agent.calls == [] and door.agent.group_names == []
    assert (await door.request("GET", "/api/v1/status", cookie=cookie)).status == 200


async def test_csrf_of_another_session_is_refused(door: Door) -> None:
    cookie, _ = await door.login()
    _, other_csrf = await door.login()
    r = await door.post("/api/v1/groups", {"op": "create", "name": "lab"}, cookie, other_csrf)
    assert r.status == 403 and door.agent.calls == []


async def test_post_without_session_is_refused(door: Door) -> None:
    _, csrf = await door.login()
    r = await door.post("/api/v1/groups", {"op": "create", "name": "lab"}, None, csrf)
    assert r.status == 403 and door.agent.calls == []


async def test_post_with_session_origin_and_csrf_works(door: Door) -> None:
    cookie, csrf = await door.login()
    r = await door.post("/api/v1/requests", {"op": "accept", "jid": "bob@example.org"},
                        cookie, csrf)
    assert r.status == 200 and r.json()["result"]["result"] == "accepted"
    r = await door.post("/api/v1/groups", {"op": "create", "name": "lab"}, cookie, csrf)
    assert r.status == 200
    assert door.agent.calls == [("decide", "bob@example.org", True, None),
                                ("group_create", "lab", None)]


@pytest.mark.parametrize("site", ["cross-site", "same-site"])
async def test_cross_site_fetch_is_refused(door: Door, site: str) -> None:
    cookie, csrf = await door.login()
    r = await door.request("GET", "/api/v1/status", cookie=cookie,
                           headers={"Sec-Fetch-Site": site})
    assert r.status == 403 and b"alice" not in r.body
    r = await door.post("/api/v1/groups", {"op": "create", "name": "lab"}, cookie, csrf,
                        **{"Sec-Fetch-Site": site})
    assert r.status == 403 and door.agent.calls == []


async def test_login_urls_only_from_the_unix_socket(door: Door) -> None:
    cookie, csrf = await door.login()
    r = await door.post("/api/v1/dashboard/login", {}, cookie, csrf)
    assert r.status == 403 and "url" not in r.body.decode()


async def test_refusals_are_counted(door: Door) -> None:
    cookie, csrf = await door.login()
    await door.request("GET", "/", host="evil.example")
    await door.post("/api/v1/groups", {"op": "create", "name": "lab"}, cookie, "nope")
    await door.request("GET", "/api/v1/status", cookie=cookie, key=None)
    refused = door.server.web.refused
    assert refused["host"] == 1 and refused["csrf"] == 1 and refused["key"] == 1
    r = await door.request("GET", "/metrics", cookie=cookie)
    assert 'socialvpn_dashboard_refused_total{reason="key"} 1' in r.body.decode()


# --- headers and static files ---------------------------------------------------------------


@pytest.mark.parametrize(("path", "logged_in", "status"), [
    ("/login", False, 200), ("/", True, 200), ("/api/v1/status", True, 200),
    ("/api/v1/status", False, 401), ("/static/app.js", False, 200),
    ("/static/app.css", False, 200), ("/static/nothing.js", False, 404),
    ("/metrics", True, 200), ("/nowhere", True, 404),
])
async def test_security_headers_everywhere(door: Door, path: str, logged_in: bool,
                                           status: int) -> None:
    cookie = (await door.login())[0] if logged_in else None
    r = await door.request("GET", path, cookie=cookie)
    assert r.status == status
    for name, value in HEADERS.items():
        assert r.headers.get(name) == value, name
    if not path.startswith("/static/"):
        assert r.headers["Cache-Control"] == "no-store"


async def test_headers_on_refusals_too(door: Door) -> None:
    r = await door.request("GET", "/api/v1/status", host="evil.example")
    assert r.status == 403 and r.headers["Content-Security-Policy"] == CSP
    assert r.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize(("name", "ctype"), [("app.js", "text/javascript"),
                                             ("app.css", "text/css"),
                                             ("icon.svg", "image/svg+xml")])
async def test_static_files_served(door: Door, name: str, ctype: str) -> None:
    r = await door.request("GET", "/static/" + name)
    assert r.status == 200 and r.headers["Content-Type"].startswith(ctype)
    assert r.body == (STATIC_DIR / name).read_bytes()


@pytest.mark.parametrize("path", ["/static/index.html", "/static/login.html",
                                  "/static/..%2Fapp.py", "/static/%2e%2e/app.py"])
async def test_no_templates_or_escapes_through_static(door: Door, path: str) -> None:
    r = await door.request("GET", path)
    assert r.status == 404


@pytest.mark.parametrize("key", [AUTO, None], ids=["with-key", "cookie-only"])
async def test_index_carries_no_secret(door: Door, key: str | None) -> None:
    """The page is all a cookie-holder without the key gets: nothing secret in it."""
    cookie, csrf = await door.login()
    r = await door.request("GET", "/", cookie=cookie, key=key)
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
    for secret in (csrf, door.keys[cookie], cookie):
        assert secret.encode() not in r.body
    assert b"csrf" not in r.body.lower() and b"{{" not in r.body
    assert r.body == (STATIC_DIR / "index.html").read_bytes()  # the same for every session


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[dict[str, str | None]] = []
        self.label_for: set[str] = set()
        self.problems: list[str] = []
        self.in_label = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if "style" in a or any(k.startswith("on") for k in a):
            self.problems.append(f"inline style/handler on <{tag}>")
        if tag == "style":
            self.problems.append("<style> element")
        if tag == "script" and not a.get("src"):
            self.problems.append("inline <script>")
        for key in ("src", "href"):
            value = a.get(key) or ""
            if "//" in value:
                self.problems.append(f"network URL {value}")
        if tag in ("input", "select", "textarea") and a.get("type") != "hidden":
            self.inputs.append(a)
        if tag == "label":
            self.in_label += 1
            if a.get("for"):
                self.label_for.add(a["for"] or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "label":
            self.in_label -= 1


@pytest.mark.parametrize("name", ["index.html", "login.html"])
def test_pages_have_labels_and_nothing_inline(name: str) -> None:
    page = _Page()
    page.feed((STATIC_DIR / name).read_text())
    assert page.problems == []
    for control in page.inputs:
        assert control.get("id") in page.label_for, f"no <label for> for {control}"


def test_script_builds_labelled_fields_and_no_html_from_data() -> None:
    js = (STATIC_DIR / "app.js").read_text()
    assert "innerHTML" not in js and "eval(" not in js and "new Function" not in js
    assert js.count('h("input"') == js.count('h("label", { for:')
    assert "http://" not in js and "https://" not in js


# --- /metrics -------------------------------------------------------------------------------


async def test_metrics_parse_with_prometheus_parser(door: Door) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    cookie, _ = await door.login()
    r = await door.request("GET", "/metrics", cookie=cookie)
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(r.body.decode())}
    assert families["socialvpn_up"].samples[0].value == 1
    assert families["socialvpn_xmpp_connected"].samples[0].value == 1
    rx = families["socialvpn_peer_rx_bytes"]
    assert rx.type == "counter"
    by_device = {s.labels["device"]: s for s in rx.samples if s.name.endswith("_total")}
    assert by_device["dev1"].value == 1000
    assert by_device["dev1"].labels == {"group": "lab", "jid": "user1@example.org",
                                        "device": "dev1", "path": "direct"}
    assert by_device["dev2"].labels["path"] == "turn"
    drops = {s.labels.get("reason"): s.value
             for s in families["socialvpn_stanzas_dropped"].samples}
    assert drops["oversize"] == 2
    assert drops['we"ird\\label\n'] == 1  # escaped on the way out, equal after parsing
    assert families["socialvpn_dashboard_listening"].samples[0].value == 1


async def test_metrics_bearer_token_for_scrapers(door: Door) -> None:
    path = door.server.socket_path.parent / METRICS_TOKEN_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    token = path.read_text().strip()
    r = await door.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"})
    assert r.status == 200 and b"socialvpn_up 1" in r.body
    r = await door.request("GET", "/metrics", headers={"Authorization": "Bearer wrong"})
    assert r.status == 401
    r = await door.request("GET", "/api/v1/status",
                           headers={"Authorization": f"Bearer {token}"})
    assert r.status == 401  # the metrics token opens /metrics only


async def test_metrics_over_the_unix_socket(door: Door) -> None:
    conn = aiohttp.UnixConnector(path=str(door.server.socket_path))
    async with aiohttp.ClientSession(connector=conn) as s, \
            s.get("http://localhost/metrics") as r:
        assert r.status == 200 and "socialvpn_peer_tx_bytes_total" in await r.text()


# --- the live stream ------------------------------------------------------------------------


async def _read_events(resp: aiohttp.ClientResponse, want: set[str],
                       timeout: float = 10.0) -> dict[str, list[Any]]:
    got: dict[str, list[Any]] = {}
    event = "message"

    async def reader() -> None:
        nonlocal event
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                got.setdefault(event, []).append(json.loads(line[6:]))
                if want <= set(got):
                    return
    await asyncio.wait_for(reader(), timeout)
    return got


async def test_event_stream_sends_events_and_snapshots(door: Door) -> None:
    cookie, _ = await door.login()
    door.agent.publish("xmpp.state", state="connected")
    async with door.http.get(f"{door.origin}/api/v1/events",
                             headers={"Accept": "text/event-stream",
                                      **door.auth(cookie)}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["Content-Security-Policy"] == CSP
        got = await _read_events(resp, {"agent", "status", "peers"})
        assert got["agent"][0]["kind"] == "xmpp.state"
        assert [p["device"] for p in got["peers"][0]] == ["dev0", "dev1", "dev2"]
        # an event after connecting arrives, and changed peers are pushed again
        door.agent.publish("request.new", jid="dave@example.org", kind="friend")
        door.agent.traffic = 10
        got = await _read_events(resp, {"agent", "peers"})
        assert got["agent"][0]["kind"] == "request.new"
        assert got["peers"][0][1]["rx_bytes"] > 1000


async def test_streams_share_one_peer_snapshot(door: Door) -> None:
    """Every open stream reads the same status/peers text, built at most once per half
    interval (fixed clock values: no timing)."""
    from socialvpn.web.app import SNAPSHOT_INTERVAL, _snapshot
    state = door.server.web
    calls = 0
    real = door.agent.peers

    def counting() -> list[dict[str, Any]]:
        nonlocal calls
        calls += 1
        return real()

    door.agent.peers = counting  # type: ignore[method-assign]
    state.snapshots.clear()
    first = await _snapshot(door.agent, state, "peers", 100.0)
    for _ in range(10):  # ten streams in the same tick
        assert await _snapshot(door.agent, state, "peers", 100.0 + SNAPSHOT_INTERVAL / 4) == first
    assert calls == 1
    door.agent.traffic = 10
    later = await _snapshot(door.agent, state, "peers", 100.0 + SNAPSHOT_INTERVAL)
    assert calls == 2 and later != first
    # a clock that went backwards never serves a stale snapshot forever
    await _snapshot(door.agent, state, "peers", 50.0)
    assert calls == 3


async def test_stop_ends_open_streams(door: Door) -> None:
    cookie, _ = await door.login()
    async with door.http.get(f"{door.origin}/api/v1/events",
                             headers={"Accept": "text/event-stream",
                                      **door.auth(cookie)}) as resp:
        await _read_events(resp, {"peers"})
        await asyncio.wait_for(door.server.stop(), 10)
        assert door.server.web.streams == 0


async def test_plain_events_still_json(door: Door) -> None:
    door.agent.publish("group.changed", name="lab")
    cookie, _ = await door.login()
    r = await door.request("GET", "/api/v1/events?since=0", cookie=cookie)
    assert r.json()["result"][0]["kind"] == "group.changed"


# --- a busy port ----------------------------------------------------------------------------


async def test_busy_port_keeps_the_api_up(tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    with short_dir(tmp_path) as d, socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        server = APIServer(FakeAgent(), d / "api.sock", listen=("127.0.0.1", port))  # type: ignore[arg-type]
        with caplog.at_level(logging.WARNING, logger="socialvpn.api"):
            await server.start()
        try:
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1 and f"127.0.0.1:{port}" in warnings[0].getMessage()
            client = APIClient(d / "api.sock", timeout=10)
            info = await asyncio.to_thread(client.get, "dashboard")
            assert info["listening"] is False and "in use" in info["error"]
            assert (await asyncio.to_thread(client.get, "status"))["account"]
            with pytest.raises(APIError) as err:
                await asyncio.to_thread(client.post, "dashboard/login", {})
            assert err.value.status == 409 and f"127.0.0.1:{port}" in str(err.value)
        finally:
            await server.stop()


# --- pure helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize(("listen", "url"), [
    ("127.0.0.1", "http://127.0.0.1:7387/login?token=T"),
    ("0.0.0.0", "http://127.0.0.1:7387/login?token=T"),
    ("::", "http://127.0.0.1:7387/login?token=T"),
    ("::1", "http://[::1]:7387/login?token=T"),
    ("localhost", "http://localhost:7387/login?token=T"),
])
def test_login_url(listen: str, url: str) -> None:
    assert dashboard.login_url(listen, 7387, "T") == url


@pytest.mark.parametrize(("host", "parts"), [
    ("127.0.0.1:7387", ("127.0.0.1", "7387")), ("LocalHost", ("localhost", "")),
    ("[::1]:80", ("::1", "80")), ("[::1]", ("::1", "")), ("::1", None), ("a b", None),
    ("[::1]x", None), ("[nope]:1", None), ("host:port", None), ("h:123456", None),
    ("user@127.0.0.1", None), ("", None),
])
def test_split_host(host: str, parts: tuple[str, str] | None) -> None:
    assert dashboard.split_host(host) == parts


def test_configured_listen_host_is_allowed() -> None:
    allowed = dashboard.allowed_hosts("192.168.1.5")
    assert dashboard.host_ok("192.168.1.5:7387", allowed)
    assert dashboard.host_ok("localhost:1", allowed)
    assert not dashboard.host_ok("192.168.1.6:7387", allowed)
    assert dashboard.allowed_hosts("0.0.0.0") == dashboard.LOOPBACK_NAMES
