"""Unit tests for the local API: socialvpn/web/{api,app,client}.py over a Unix socket.

The real aiohttp server (APIServer) runs in the test's event loop on a socket in tmp_path with
a fake agent behind it; the synchronous APIClient is called through asyncio.to_thread.
RELIABILITY row 26: only root or the agent's user get in (SO_PEERCRED).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import socket
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from socialvpn.errors import AgentNotRunning, APIError
from socialvpn.web.api import PREFIX, ROUTES, AgentAPI, RouteTable
from socialvpn.web.app import MAX_BODY, APIServer
from socialvpn.web.client import APIClient
from tests.kit.browser import short_dir

pytestmark = pytest.mark.unit

NOBODY = 65534


# --- the fake agent ------------------------------------------------------------------------


@dataclass
class FakeAgent:
    """Implements AgentAPI; records every call; ``fail`` makes the next calls raise."""

    calls: list[tuple[Any, ...]] = field(default_factory=list)
    fail: BaseException | None = None

    def _record(self, *call: Any) -> None:
        self.calls.append(call)
        if self.fail is not None:
            raise self.fail

    def status(self) -> dict[str, Any]:
        self._record("status")
        return {"state": "online", "device_id": "abcdefghijklmnop", "groups": []}

    def friends(self) -> list[dict[str, Any]]:
        self._record("friends")
        return [{"jid": "bob@example.org", "subscription": "both", "devices": []}]

    def requests(self) -> dict[str, Any]:
        self._record("requests")
        return {"friends": [{"jid": "carol@example.org"}], "joins": [], "invites": []}

    async def friend_add(self, jid: str) -> dict[str, Any]:
        self._record("friend_add", jid)
        await asyncio.sleep(0)
        return {"jid": jid, "requested": True}

    async def friend_remove(self, jid: str) -> dict[str, Any]:
        self._record("friend_remove", jid)
        return {"jid": jid, "removed": True}

    async def decide(self, jid: str, accept: bool, group: str | None) -> dict[str, Any]:
        self._record("decide", jid, accept, group)
        return {"jid": jid, "accepted": accept, "group": group}

    def events_since(self, seq: int) -> list[dict[str, Any]]:
        self._record("events_since", seq)
        return [{"kind": "xmpp.state", "seq": seq + 1, "at": 1.5, "data": {"state": "online"}}]


_FITS_PROTOCOL: AgentAPI = FakeAgent()  # a type checker verifies FakeAgent against AgentAPI


@dataclass
class Api:
    agent: FakeAgent
    server: APIServer
    path: Path
    client: APIClient

    async def get(self, path: str, **query: Any) -> Any:
        return await asyncio.to_thread(self.client.get, path, **query)

    async def post(self, path: str, body: Any) -> Any:
        return await asyncio.to_thread(self.client.post, path, body)

    async def error(self, method: str, path: str, body: Any = None, **query: Any) -> APIError:
        with pytest.raises(APIError) as info:
            if method == "GET":
                await self.get(path, **query)
            else:
                await self.post(path, body)
        return info.value

    async def raw(self, method: str, path: str, body: bytes | None = None,
                  headers: dict[str, str] | None = None, chunked: bool = False,
                  split: int | None = None) -> tuple[int, str, bytes]:
        return await asyncio.to_thread(raw_request, self.path, method, path, body, headers,
                                       chunked, split)


class _Conn(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=10)
        self._unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(str(self._unix_path))
        self.sock = sock


def raw_request(sock_path: Path, method: str, path: str, body: bytes | None,
                headers: dict[str, str] | None, chunked: bool = False,
                split: int | None = None) -> tuple[int, str, bytes]:
    """One HTTP request; with ``split`` the body is sent in two parts 0.4 s apart."""
    conn = _Conn(sock_path)
    headers = dict(headers or {})
    try:
        payload: bytes | Iterator[bytes] | None = body
        if body is not None and (chunked or split is not None):
            first, rest = (body, b"") if split is None else (body[:split], body[split:])

            def pieces() -> Iterator[bytes]:
                yield first
                if split is not None:
                    time.sleep(0.4)
                if rest:
                    yield rest

            payload = pieces()
            if not chunked:
                headers["Content-Length"] = str(len(body))
        conn.request(method, path, body=payload, headers=headers, encode_chunked=chunked)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read()
    finally:
        conn.close()


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    with short_dir(tmp_path) as d:
        agent = FakeAgent()
        path = d / "api.sock"
        server = APIServer(agent, path)
        await server.start()
        try:
            yield Api(agent, server, path, APIClient(path, timeout=10))
        finally:
            await server.stop()


# --- reads ----------------------------------------------------------------------------------


async def test_get_status(api: Api) -> None:
    assert await api.get("status") == {"state": "online", "device_id": "abcdefghijklmnop",
                                       "groups": []}
    assert api.agent.calls == [("status",)]


async def test_get_friends_and_requests(api: Api) -> None:
    assert await api.get("friends") == [{"jid": "bob@example.org", "subscription": "both",
                                         "devices": []}]
    assert await api.get("requests") == {"friends": [{"jid": "carol@example.org"}],
                                         "joins": [], "invites": []}
    assert api.agent.calls == [("friends",), ("requests",)]


async def test_get_events(api: Api) -> None:
    assert await api.get("events") == [{"kind": "xmpp.state", "seq": 1, "at": 1.5,
                                        "data": {"state": "online"}}]
    assert (await api.get("events", since=41))[0]["seq"] == 42
    assert api.agent.calls == [("events_since", 0), ("events_since", 41)]


@pytest.mark.parametrize("path", ["status", "friends", "requests", "events"])
async def test_results_are_wrapped(api: Api, path: str) -> None:
    status, ctype, body = await api.raw("GET", PREFIX + path)
    assert status == 200
    assert ctype.startswith("application/json")
    data = json.loads(body)
    assert list(data) == ["result"]
    assert data["result"] == await api.get(path)


# --- writes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("jid", "normal"),
    [
        ("bob@example.org", "bob@example.org"),
        ("  bob@Example.ORG \n", "bob@example.org"),
        ("Bob@EXAMPLE.org", "Bob@example.org"),
        ("\tj\u00f6rg@Ex.ORG", "j\u00f6rg@ex.org"),
    ],
)
async def test_friend_add_remove(api: Api, jid: str, normal: str) -> None:
    assert await api.post("friends", {"op": "add", "jid": jid}) == {"jid": normal,
                                                                     "requested": True}
    assert await api.post("friends", {"op": "remove", "jid": jid}) == {"jid": normal,
                                                                        "removed": True}
    assert api.agent.calls == [("friend_add", normal), ("friend_remove", normal)]


@pytest.mark.parametrize(
    ("body", "call"),
    [
        ({"op": "accept", "jid": "Carol@Example.org"}, ("decide", "Carol@example.org", True, None)),
        ({"op": "reject", "jid": " carol@example.org "},
         ("decide", "carol@example.org", False, None)),
        ({"op": "accept", "jid": "carol@example.org", "group": " lab "},
         ("decide", "carol@example.org", True, "lab")),
        ({"op": "reject", "jid": "carol@example.org", "group": "lab", "extra": 1},
         ("decide", "carol@example.org", False, "lab")),
        ({"op": "accept", "jid": "carol@example.org", "group": None},
         ("decide", "carol@example.org", True, None)),
    ],
)
async def test_requests_decide(api: Api, body: dict[str, Any], call: tuple[Any, ...]) -> None:
    result = await api.post("requests", body)
    assert api.agent.calls == [call]
    assert result == {"jid": call[1], "accepted": call[2], "group": call[3]}


BAD_BODIES: list[tuple[str, str, Any, str]] = [
    # (id, path, JSON body, words in the message)
    ("array", "friends", [{"op": "add", "jid": "bob@example.org"}], "JSON object"),
    ("string", "friends", "bob@example.org", "JSON object"),
    ("number", "requests", 5, "JSON object"),
    ("empty-object", "friends", {}, "'jid'"),
    ("missing-jid", "friends", {"op": "add"}, "'jid'"),
    ("jid-null", "friends", {"op": "add", "jid": None}, "'jid'"),
    ("jid-empty", "friends", {"op": "add", "jid": ""}, "'jid'"),
    ("jid-blank", "friends", {"op": "add", "jid": "   "}, "'jid'"),
    ("jid-number", "friends", {"op": "add", "jid": 7}, "'jid'"),
    ("jid-list", "friends", {"op": "add", "jid": ["bob@example.org"]}, "'jid'"),
    ("jid-resource", "friends", {"op": "add", "jid": "bob@example.org/phone"}, "bare JID"),
    ("jid-no-at", "friends", {"op": "remove", "jid": "bob"}, "bare JID"),
    ("jid-no-local", "friends", {"op": "add", "jid": "@example.org"}, "bare JID"),
    ("jid-no-domain", "friends", {"op": "add", "jid": "bob@"}, "bare JID"),
    ("jid-space", "friends", {"op": "add", "jid": "bob smith@example.org"}, "bare JID"),
    ("jid-too-long", "friends", {"op": "add", "jid": "b" * 3072 + "@x.org"}, "too long"),
    ("op-wrong", "friends", {"op": "delete", "jid": "bob@example.org"}, "'op'"),
    ("op-missing", "friends", {"jid": "bob@example.org"}, "'op'"),
    ("op-number", "friends", {"op": 1, "jid": "bob@example.org"}, "'op'"),
    ("op-accept-on-friends", "friends", {"op": "accept", "jid": "bob@example.org"}, "'op'"),
    ("req-op-wrong", "requests", {"op": "add", "jid": "bob@example.org"}, "'op'"),
    ("req-op-missing", "requests", {"jid": "bob@example.org"}, "'op'"),
    ("req-jid-missing", "requests", {"op": "accept"}, "'jid'"),
    ("req-jid-resource", "requests", {"op": "accept", "jid": "a@b.org/r"}, "bare JID"),
    ("req-group-number", "requests", {"op": "accept", "jid": "a@b.org", "group": 3}, "'group'"),
    ("req-group-empty", "requests", {"op": "reject", "jid": "a@b.org", "group": ""}, "'group'"),
]


@pytest.mark.parametrize(("path", "body", "words"), [c[1:] for c in BAD_BODIES],
                         ids=[c[0] for c in BAD_BODIES])
async def test_bad_bodies(api: Api, path: str, body: Any, words: str) -> None:
    err = await api.error("POST", path, body)
    assert err.status == 400
    assert words in str(err)
    assert "\n" not in str(err)
    assert api.agent.calls == []


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b"{'op': 'add'}", b"[1,", b"nan"])
async def test_non_json_body(api: Api, raw: bytes) -> None:
    status, ctype, body = await api.raw("POST", PREFIX + "friends", raw,
                                        {"Content-Type": "application/json"})
    assert status == 400
    assert ctype.startswith("application/json")
    assert json.loads(body) == {"error": "request body is not JSON"}
    assert api.agent.calls == []


@pytest.mark.parametrize("raw", [b"null", b"true", b'"x"', b"[]", b"3.5"])
async def test_json_but_not_object(api: Api, raw: bytes) -> None:
    status, _, body = await api.raw("POST", PREFIX + "requests", raw)
    assert status == 400
    assert json.loads(body) == {"error": "request body must be a JSON object"}
    assert api.agent.calls == []


async def test_empty_body_is_empty_object(api: Api) -> None:
    status, _, body = await api.raw("POST", PREFIX + "friends", b"")
    assert status == 400
    assert "'jid'" in json.loads(body)["error"]


@pytest.mark.parametrize(("since", "status"), [(-1, 400), ("abc", 400), ("1.5", 400),
                                               ("", 400)])
async def test_events_bad_since(api: Api, since: Any, status: int) -> None:
    err = await api.error("GET", "events", since=since)
    assert err.status == status and "'since'" in str(err)
    assert api.agent.calls == []


@pytest.mark.parametrize("since", ["\u00b2", "1" * 5000])
async def test_events_since_non_ascii_digit(api: Api, since: str) -> None:
    err = await api.error("GET", "events", since=since)
    assert err.status == 400


async def test_jid_with_two_at_signs(api: Api) -> None:
    err = await api.error("POST", "friends", {"op": "add", "jid": "bob@ex@ample.org"})
    assert err.status == 400


# --- errors from the agent -----------------------------------------------------------------


@pytest.mark.parametrize(("message", "status"), [("bob@example.org is not a friend", 404),
                                                 ("already asked", 409),
                                                 ("bad group name", 400)])
async def test_agent_api_error_reaches_client(api: Api, message: str, status: int) -> None:
    api.agent.fail = APIError(message, status)
    err = await api.error("POST", "friends", {"op": "remove", "jid": "bob@example.org"})
    assert (err.status, str(err)) == (status, message)
    err = await api.error("GET", "status")
    assert (err.status, str(err)) == (status, message)


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_unexpected_exception_is_500_without_details(
        api: Api, method: str, caplog: pytest.LogCaptureFixture) -> None:
    api.agent.fail = RuntimeError("secret detail: /root/.ssh/id_rsa")
    with caplog.at_level(logging.ERROR, logger="socialvpn.api"):
        err = await api.error(method, "friends", {"op": "add", "jid": "bob@example.org"})
    assert err.status == 500
    assert "internal error" in str(err)
    assert "secret" not in str(err) and "RuntimeError" not in str(err)
    # ... but it is in the agent's log
    assert any("secret detail" in (r.exc_text or "") or
               (r.exc_info and "secret detail" in str(r.exc_info[1]))
               for r in caplog.records)
    status, _, body = await api.raw(method, PREFIX + "friends",
                                    b'{"op": "add", "jid": "bob@example.org"}'
                                    if method == "POST" else None)
    assert status == 500 and b"secret" not in body


# --- size limits ----------------------------------------------------------------------------


async def test_body_over_64k_is_413(api: Api) -> None:
    err = await api.error("POST", "friends", {"op": "add", "jid": "b" * (70 * 1024)})
    assert err.status == 413
    assert "too large" in str(err)
    assert api.agent.calls == []


async def test_body_limit_boundary(api: Api) -> None:
    def body_of(size: int) -> bytes:
        head = b'{"op": "add", "jid": "'
        tail = b'"}'
        return head + b"b" * (size - len(head) - len(tail)) + tail

    at_limit = body_of(MAX_BODY)
    assert len(at_limit) == MAX_BODY == 64 * 1024
    status, _, body = await api.raw("POST", PREFIX + "friends", at_limit)
    # 400 for the over-long jid (or, while the single-read bug stands, for a body read only
    # in part): in either case not refused for its size
    assert status == 400 and json.loads(body)["error"] != "request body too large"
    status, _, body = await api.raw("POST", PREFIX + "friends", body_of(MAX_BODY + 1))
    assert status == 413 and json.loads(body) == {"error": "request body too large"}


async def test_chunked_small_body_accepted(api: Api) -> None:
    status, _, body = await api.raw("POST", PREFIX + "friends",
                                    b'{"op": "add", "jid": "bob@example.org"}', chunked=True)
    assert status == 200
    assert json.loads(body) == {"result": {"jid": "bob@example.org", "requested": True}}


BODY = b'{"op": "add", "jid": "bob@example.org"}'


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_arriving_in_pieces(api: Api, chunked: bool) -> None:
    status, _, body = await api.raw("POST", PREFIX + "friends", BODY, chunked=chunked, split=20)
    assert (status, json.loads(body)) == (200, {"result": {"jid": "bob@example.org",
                                                           "requested": True}})


async def test_chunked_body_over_64k_is_413(api: Api) -> None:
    big = BODY[:-1] + b', "pad": "' + b"x" * MAX_BODY + b'"}'
    status, _, body = await api.raw("POST", PREFIX + "friends", big, chunked=True, split=20)
    assert status == 413
    assert json.loads(body) == {"error": "request body too large"}


async def test_body_in_pieces_never_reaches_agent_truncated(api: Api) -> None:
    # Whatever the status, a truncated body must never turn into a call with partial data.
    await api.raw("POST", PREFIX + "friends", BODY, split=20)
    assert api.agent.calls in ([], [("friend_add", "bob@example.org")])


# --- unknown routes -------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "status"), [("GET", "nope", 404),
                                                        ("POST", "status", 405)])
async def test_unknown_route_is_json_error(api: Api, method: str, path: str,
                                           status: int) -> None:
    err = await api.error(method, path, {})
    assert err.status == status


async def test_unknown_route_is_not_served(api: Api) -> None:
    status, _, _ = await api.raw("GET", PREFIX + "nope")
    assert status == 404
    status, _, _ = await api.raw("DELETE", PREFIX + "friends")
    assert status == 405
    assert api.agent.calls == []


# --- the socket file ------------------------------------------------------------------------


async def test_socket_mode_and_removal(tmp_path: Path) -> None:
    with short_dir(tmp_path) as d:
        path = d / "api.sock"
        server = APIServer(FakeAgent(), path)
        umask = os.umask(0o022)
        try:
            await server.start()
            assert os.umask(0o022) == 0o022  # start() restored the umask
        finally:
            os.umask(umask)
        try:
            st = path.stat()
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o600
            assert await asyncio.to_thread(APIClient(path).get, "status")
        finally:
            await server.stop()
        assert not path.exists()
        await server.stop()  # twice is harmless
        with pytest.raises(AgentNotRunning):
            await asyncio.to_thread(APIClient(path).get, "status")


@pytest.mark.parametrize("kind", ["socket", "file"])
async def test_stale_socket_replaced(tmp_path: Path, kind: str) -> None:
    with short_dir(tmp_path) as d:
        path = d / "api.sock"
        if kind == "socket":
            old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old.bind(str(path))
            old.close()  # the file stays behind, nobody listens
            with pytest.raises(AgentNotRunning, match="not running"):
                await asyncio.to_thread(APIClient(path, timeout=5).get, "status")
        else:
            path.write_text("left over")
        assert path.exists()
        server = APIServer(FakeAgent(), path)
        await server.start()
        try:
            assert stat.S_ISSOCK(path.stat().st_mode)
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert (await asyncio.to_thread(APIClient(path).get, "status"))["state"] == "online"
        finally:
            await server.stop()


def test_client_missing_socket(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "api.sock"
    for call in (lambda c: c.get("status"),
                 lambda c: c.post("friends", {"op": "add", "jid": "a@b.org"})):
        with pytest.raises(AgentNotRunning) as info:
            call(APIClient(path, timeout=2))
        assert str(path) in str(info.value)
        assert "not running" in str(info.value)


def test_client_path_is_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    path.write_text("not a socket")
    with pytest.raises(AgentNotRunning) as info:
        APIClient(path, timeout=2).get("status")
    assert str(path) in str(info.value)


# --- the route table ------------------------------------------------------------------------


def test_route_table_refuses_duplicates() -> None:
    table = RouteTable()

    async def h1(agent: AgentAPI, body: dict[str, Any]) -> Any:
        return 1

    async def h2(agent: AgentAPI, body: dict[str, Any]) -> Any:
        return 2

    assert table.add("GET", "thing")(h1) is h1
    table.add("POST", "thing")(h2)  # same path, other method: fine
    with pytest.raises(ValueError, match="duplicate.*GET thing"):
        table.add("GET", "thing")(h2)
    assert table.routes[("GET", "thing")].handler is h1
    assert table.routes[("GET", "thing")].mutating is False
    assert table.routes[("POST", "thing")].mutating is True


def test_global_routes() -> None:
    assert set(ROUTES.routes) == {
        ("GET", "status"), ("GET", "friends"), ("POST", "friends"), ("GET", "requests"),
        ("POST", "requests"), ("GET", "events"), ("GET", "groups"), ("GET", "groups/{name}"),
        ("POST", "groups"), ("GET", "peers"),
    }
    for (method, _), route in ROUTES.routes.items():
        assert route.mutating is (method != "GET")


# --- peer credentials -----------------------------------------------------------------------


async def _wait_child(pid: int, timeout: float = 20.0) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if loop.time() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("child did not finish")
        await asyncio.sleep(0.02)


def _child_as_nobody(directory: Path, write_fd: int,
                     calls: list[Callable[[APIClient], Any]]) -> None:
    """In the forked child: become nobody, call the API, report statuses; never returns."""
    code = 10
    try:
        os.chdir(directory)  # while still root: the path above is root-only
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        client = APIClient(Path("api.sock"), timeout=5)
        report = []
        for call in calls:
            try:
                call(client)
                report.append("ok")
            except APIError as exc:
                report.append(f"{exc.status} {exc}")
            except BaseException as exc:
                report.append(f"exception {exc!r}")
        os.write(write_fd, json.dumps(report).encode())
        code = 0
    finally:
        os._exit(code)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another user")
async def test_other_user_is_refused(tmp_path: Path) -> None:
    with short_dir(tmp_path) as base:
        d = base / "pub"
        d.mkdir()
        d.chmod(0o711)
        path = d / "api.sock"
        agent = FakeAgent()
        server = APIServer(agent, path)
        await server.start()
        try:
            os.chmod(path, 0o666)  # for this test only: let the other user reach the socket
            read_fd, write_fd = os.pipe()
            calls: list[Callable[[APIClient], Any]] = [
                lambda c: c.get("status"),
                lambda c: c.post("friends", {"op": "add", "jid": "mallory@example.org"}),
            ]
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child
                os.close(read_fd)
                _child_as_nobody(d, write_fd, calls)
            os.close(write_fd)
            try:
                assert await _wait_child(pid) == 0
                report = json.loads(os.read(read_fd, 65536))
            finally:
                os.close(read_fd)
            assert len(report) == 2
            for line in report:
                assert line.startswith("403 "), report
                assert "only root or the agent's user" in line
            assert agent.calls == []
            # root itself still gets in
            assert (await asyncio.to_thread(APIClient(path).get, "status"))["state"] == "online"
        finally:
            await server.stop()
