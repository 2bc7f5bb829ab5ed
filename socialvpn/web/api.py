"""The local JSON API as a table of handlers: the CLI's and the dashboard's only door.

Each route is ``(method, path) → handler(agent, body)``; the table rejects duplicates when it
is built (Tailscale ``localapi`` habit). Handlers receive the agent through the narrow
:class:`AgentAPI` protocol and return JSON-able values; they raise :class:`APIError` for a
refusal a person should read.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..config import validate_jid
from ..errors import APIError, ConfigError

PREFIX = "/api/v1/"


class AgentAPI(Protocol):
    def status(self) -> dict[str, Any]: ...

    def friends(self) -> list[dict[str, Any]]: ...

    def requests(self) -> dict[str, Any]: ...

    async def friend_add(self, jid: str) -> dict[str, Any]: ...

    async def friend_remove(self, jid: str) -> dict[str, Any]: ...

    async def decide(self, jid: str, accept: bool, group: str | None) -> dict[str, Any]: ...

    def events_since(self, seq: int) -> list[dict[str, Any]]: ...

    def groups(self) -> list[dict[str, Any]]: ...

    def peers(self) -> list[dict[str, Any]]: ...

    def group_show(self, name: str) -> dict[str, Any]: ...

    async def group_create(self, name: str, subnet: str | None) -> dict[str, Any]: ...

    async def group_invite(self, name: str, jid: str) -> dict[str, Any]: ...

    async def group_join(self, owner_jid: str, name: str) -> dict[str, Any]: ...

    async def group_remove(self, name: str, jid: str) -> dict[str, Any]: ...

    async def group_leave(self, name: str) -> dict[str, Any]: ...


Handler = Callable[[AgentAPI, dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # below PREFIX, e.g. "status"
    handler: Handler
    mutating: bool


class RouteTable:
    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Route] = {}

    def add(self, method: str, path: str) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            key = (method, path)
            if key in self.routes:
                raise ValueError(f"duplicate API route {method} {path}")
            self.routes[key] = Route(method, path, handler, mutating=method != "GET")
            return handler

        return register


ROUTES = RouteTable()


def _str(body: dict[str, Any], key: str, required: bool = True) -> str | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise APIError(f"'{key}' must be a non-empty string", 400)
    if len(value) > 3071:
        raise APIError(f"'{key}' is too long", 400)
    return value.strip()


def _jid(body: dict[str, Any]) -> str:
    jid = _str(body, "jid")
    assert jid is not None
    try:
        return validate_jid(jid, "jid")
    except ConfigError:
        raise APIError(f"{jid!r} is not a bare JID like bob@example.org", 400) from None


@ROUTES.add("GET", "status")
async def get_status(agent: AgentAPI, body: dict[str, Any]) -> Any:
    return agent.status()


@ROUTES.add("GET", "friends")
async def get_friends(agent: AgentAPI, body: dict[str, Any]) -> Any:
    return agent.friends()


@ROUTES.add("POST", "friends")
async def post_friends(agent: AgentAPI, body: dict[str, Any]) -> Any:
    op = body.get("op")
    jid = _jid(body)
    if op == "add":
        return await agent.friend_add(jid)
    if op == "remove":
        return await agent.friend_remove(jid)
    raise APIError("'op' must be 'add' or 'remove'", 400)


@ROUTES.add("GET", "requests")
async def get_requests(agent: AgentAPI, body: dict[str, Any]) -> Any:
    return agent.requests()


@ROUTES.add("POST", "requests")
async def post_requests(agent: AgentAPI, body: dict[str, Any]) -> Any:
    op = body.get("op")
    if op not in ("accept", "reject"):
        raise APIError("'op' must be 'accept' or 'reject'", 400)
    return await agent.decide(_jid(body), op == "accept", _str(body, "group", required=False))


@ROUTES.add("GET", "groups")
async def get_groups(agent: AgentAPI, body: dict[str, Any]) -> Any:
    return agent.groups()


@ROUTES.add("GET", "groups/{name}")
async def get_group(agent: AgentAPI, body: dict[str, Any]) -> Any:
    return agent.group_show(_name(body))


def _name(body: dict[str, Any]) -> str:
    name = _str(body, "name")
    assert name is not None
    return name


@ROUTES.add("POST", "groups")
async def post_groups(agent: AgentAPI, body: dict[str, Any]) -> Any:
    op = body.get("op")
    if op == "create":
        return await agent.group_create(_name(body), _str(body, "subnet", required=False))
    if op == "invite":
        return await agent.group_invite(_name(body), _jid(body))
    if op == "join":
        return await agent.group_join(_jid(body), _name(body))
    if op == "remove":
        return await agent.group_remove(_name(body), _jid(body))
    if op == "leave":
        return await agent.group_leave(_name(body))
    raise APIError("'op' must be one of create, invite, join, remove, leave", 400)


@ROUTES.add("GET", "peers")
async def get_peers(agent: AgentAPI, body: dict[str, Any]) -> Any:
    return agent.peers()


@ROUTES.add("GET", "events")
async def get_events(agent: AgentAPI, body: dict[str, Any]) -> Any:
    since = body.get("since", 0)
    if not isinstance(since, int) or since < 0:
        raise APIError("'since' must be a non-negative integer", 400)
    return agent.events_since(since)
