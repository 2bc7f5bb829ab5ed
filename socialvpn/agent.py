"""The orchestrator: the only module that imports across subpackages.

It owns the XMPP client and the local API server, keeps the person's pending decisions
(friend requests) in the state directory, counts what was dropped and why, and answers the
API's questions from what the parts report.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from . import __version__
from .config import Config
from .errors import APIError, StateError
from .events import Counters, EventBus
from .keys import DeviceKeys, b64
from .state import REQUESTS_FILE, StateDir
from .web.app import APIServer
from .xmpp.client import ConnectionStatus, XmppClient, XmppListener
from .xmpp.stanzas import DeviceInfo

log = logging.getLogger("socialvpn.agent")

INTERFACE_PREFIX = "svpn-"  # every TUN device the agent makes is named svpn-<group>

MAX_PENDING_REQUESTS = 1000  # a flood of friend requests cannot grow the state file forever
DROP_LOG_INTERVAL = 10.0  # at most one log line per reason per interval


class Agent(XmppListener):
    def __init__(self, cfg: Config, password: str, state: StateDir, keys: DeviceKeys) -> None:
        self.cfg = cfg
        self.state = state
        self.keys = keys
        self.events = EventBus()
        self.counters = Counters()
        self.started_at = time.time()
        self.device = DeviceInfo(id=keys.device_id, name=cfg.device.name,
                                 key=b64(keys.x25519_public), sign=b64(keys.ed25519_public))
        self.xmpp = XmppClient(cfg, password, self.device, self)
        self.api = APIServer(self, state.api_socket)
        self._requests: dict[str, dict[str, Any]] = self._load_requests()
        self._drop_logged: dict[str, float] = {}
        self.running = False
        # Set when the agent cannot go on (the server refused the password at start-up).
        self.fatal: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self.api.start()
        self.xmpp.start()
        self.running = True
        log.info("agent up: device %s (%s), API at %s", self.device.id, self.cfg.device.name,
                 self.state.api_socket)

    async def stop(self) -> None:
        self.running = False
        await self.xmpp.stop()
        await self.api.stop()

    # --- state files -----------------------------------------------------------------------

    def _load_requests(self) -> dict[str, dict[str, Any]]:
        data = self.state.read_json(REQUESTS_FILE, {"version": 1, "friends": []})
        friends = data.get("friends") if isinstance(data, dict) else None
        if not isinstance(friends, list):
            raise StateError(f"{self.state.path / REQUESTS_FILE}: corrupt (no 'friends' list)")
        out: dict[str, dict[str, Any]] = {}
        for item in friends:
            if isinstance(item, dict) and isinstance(item.get("jid"), str):
                out[item["jid"]] = {"jid": item["jid"],
                                    "received_at": float(item.get("received_at", 0))}
        return out

    def _save_requests(self) -> None:
        self.state.write_json(REQUESTS_FILE, {
            "version": 1,
            "friends": sorted(self._requests.values(), key=lambda r: r["jid"]),
        })

    # --- what the XMPP client reports ------------------------------------------------------

    def xmpp_state_changed(self, status: ConnectionStatus) -> None:
        self.events.publish("xmpp.state", **status.to_json())

    def signed_in(self) -> None:
        self.counters.add("xmpp_sign_ins")
        self._prune_requests()

    def auth_failed(self, reason: str, ever_connected: bool) -> None:
        self.counters.add("xmpp_auth_failures")
        if not ever_connected:
            if not self.fatal.done():
                self.fatal.set_result(reason)
            return
        # Signed in before, so the password changed under us: keep links and the API up,
        # report it, and wait for a new password (SIGHUP re-reads the file).
        log.error("%s; fix the password and reload the agent (SIGHUP) to sign in again", reason)

    def reload(self, password: str) -> None:
        self.xmpp.set_password(password)

    def roster_changed(self) -> None:
        self._prune_requests()
        self.events.publish("friends.changed")

    def presence_changed(self, bare: str) -> None:
        self.events.publish("presence.changed", jid=bare)

    def subscription_requested(self, jid: str) -> None:
        if jid == self.cfg.account.jid:
            return
        if jid not in self._requests:
            if len(self._requests) >= MAX_PENDING_REQUESTS:
                self.counters.add("requests_dropped", "full")
                return
            self._requests[jid] = {"jid": jid, "received_at": time.time()}
            self._save_requests()
            log.info("friend request from %s (decide with `socialvpn accept/reject %s`)",
                     jid, jid)
            self.events.publish("request.new", jid=jid, kind="friend")

    def subscription_withdrawn(self, jid: str) -> None:
        if self._requests.pop(jid, None) is not None:
            self._save_requests()
            self.events.publish("request.withdrawn", jid=jid, kind="friend")

    def stanza_dropped(self, reason: str, sender: str, detail: str) -> None:
        self.counters.add("stanzas_dropped", reason)
        now = time.monotonic()
        if now - self._drop_logged.get(reason, -DROP_LOG_INTERVAL) >= DROP_LOG_INTERVAL:
            self._drop_logged[reason] = now
            log.warning("dropped a stanza from %s (%s): %s", sender, reason, detail)
        self.events.publish("stanza.dropped", reason=reason, sender=sender)

    def _prune_requests(self) -> None:
        """A request is settled once the roster shows we let them see us."""
        changed = False
        for item in self.xmpp.roster():
            if item.jid in self._requests and item.subscription in ("from", "both"):
                del self._requests[item.jid]
                changed = True
        if changed:
            self._save_requests()

    # --- the API ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        xs = self.xmpp.status
        return {
            "agent": {"state": "running" if self.running else "stopping",
                      "version": __version__, "pid": os.getpid(),
                      "started_at": self.started_at},
            "account": self.cfg.account.jid,
            "xmpp": {**xs.to_json(), "jid": self.xmpp.jid,
                     "server": str(self.cfg.xmpp.server or self.cfg.account.domain)},
            "device": {"id": self.device.id, "name": self.device.name,
                       "fingerprint": self.keys.fingerprint, "key": self.device.key},
            "groups": [],
            "counters": self.counters.to_json(),
        }

    def friends(self) -> list[dict[str, Any]]:
        out = []
        for item in self.xmpp.roster():
            resources = self.xmpp.resources(item.jid)
            out.append({
                "jid": item.jid,
                "name": item.name,
                "subscription": item.subscription,
                "request_sent": item.pending_out,
                "request_received": item.jid in self._requests,
                "online": any(r.available for r in resources),
                "devices": [
                    {"resource": r.resource, **r.device.to_json()}
                    for r in resources if r.device is not None
                ],
                "other_resources": [r.resource for r in resources if r.device is None],
            })
        return out

    def requests(self) -> dict[str, Any]:
        return {
            "friends": sorted(self._requests.values(), key=lambda r: r["received_at"]),
            "joins": [],
            "invitations": [],
        }

    async def friend_add(self, jid: str) -> dict[str, Any]:
        if jid == self.cfg.account.jid:
            raise APIError("that is your own account; its other devices are found by themselves",
                           400)
        item = next((r for r in self.xmpp.roster() if r.jid == jid), None)
        if item is not None and item.subscription == "both":
            return {"jid": jid, "result": "already friends"}
        if jid in self._requests:
            self.xmpp.approve(jid)
            self._requests.pop(jid)
            self._save_requests()
            return {"jid": jid, "result": "accepted their request"}
        self.xmpp.add_friend(jid)
        return {"jid": jid, "result": "request sent"}

    async def friend_remove(self, jid: str) -> dict[str, Any]:
        await self.xmpp.remove_friend(jid)
        if self._requests.pop(jid, None) is not None:
            self._save_requests()
        return {"jid": jid, "result": "removed"}

    async def decide(self, jid: str, accept: bool, group: str | None) -> dict[str, Any]:
        if group is not None:
            raise APIError(f"no join request or invitation for group {group!r} from {jid}", 404)
        if jid not in self._requests:
            raise APIError(f"no pending friend request from {jid} (see `socialvpn requests`)",
                           404)
        if accept:
            self.xmpp.approve(jid)
        else:
            self.xmpp.deny(jid)
        del self._requests[jid]
        self._save_requests()
        self.events.publish("request.decided", jid=jid, accepted=accept)
        return {"jid": jid, "result": "accepted" if accept else "rejected"}

    def events_since(self, seq: int) -> list[dict[str, Any]]:
        return [e.to_json() for e in self.events.recent if e.seq > seq]



def cleanup_network(prefix: str = INTERFACE_PREFIX) -> list[str]:
    """Remove every interface (and with it every route and address) the agent ever made.

    Works with no agent running, e.g. after a crash; idempotent.
    """
    from .net.router import Router  # pyroute2 only for commands that touch the network

    router = Router()
    try:
        return router.cleanup(prefix)
    finally:
        router.close()
