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
from collections.abc import Callable
from typing import Any

from . import __version__, groups
from .config import Config
from .errors import APIError, ProtocolError, StateError
from .events import Counters, EventBus
from .groupbook import GroupBook
from .keys import DeviceKeys, b64, sign_key_fingerprint
from .linkhub import LinkHub
from .state import REQUESTS_FILE, StateDir
from .web.app import APIServer
from .xmpp import stanzas
from .xmpp.client import ConnectionStatus, XmppClient, XmppListener
from .xmpp.stanzas import DeviceInfo

log = logging.getLogger("socialvpn.agent")

MAX_PENDING_REQUESTS = 1000  # a flood of requests cannot grow the state files forever
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
        self.api = APIServer(self, state.api_socket,
                             listen=(cfg.web.listen.host, cfg.web.listen.port))
        self._requests: dict[str, dict[str, Any]] = self._load_requests()
        self.book = GroupBook(state)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pushes: dict[str, set[tuple[str, str]]] = {}  # gid -> extra targets, while pushing
        self._push_again: set[str] = set()
        self.links = LinkHub(self)
        self._drop_logged: dict[str, float] = {}
        self.running = False
        # The daemon sets this to sd_notify: `systemctl status` then shows the XMPP state.
        self.notify: Callable[[str], None] = lambda _message: None
        # Set when the agent cannot go on (the server refused the password at start-up).
        self.fatal: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self.api.start()
        # Groups, TUN devices and addresses come back from the state before XMPP is up.
        await self.links.start()
        self.xmpp.start()
        self.running = True
        log.info("agent up: device %s (%s), API at %s", self.device.id, self.cfg.device.name,
                 self.state.api_socket)

    async def stop(self) -> None:
        self.running = False
        await self.links.stop()
        for task in list(self._tasks):
            task.cancel()
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
        self.notify(f"STATUS=XMPP {status.state}: {status.reason}")

    def signed_in(self) -> None:
        self.counters.add("xmpp_sign_ins")
        self._prune_requests()
        self._catch_up()
        self.links.reoffer()  # offers made while signed out went nowhere

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

    # --- groups: what other devices ask of us ---------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def group_request(self, op: stanzas.GroupOp, sender: str) -> bytes | None:
        bare, _, resource = sender.partition("/")
        if isinstance(op, stanzas.MembershipFetch):
            return self._serve_document(op.gid, bare, resource)
        if isinstance(op, stanzas.MembershipPush):
            self._receive_document(op.document, sender)
            return None
        if isinstance(op, stanzas.JoinRequest):
            if resource != f"svpn-{op.device.id}":
                raise ProtocolError("the device in the request is not the sender", "refused")
            self._receive_join(op, bare)
            return None
        if isinstance(op, stanzas.Invitation):
            if resource != f"svpn-{op.owner_device}":
                raise ProtocolError("the invitation's owner device is not the sender", "refused")
            self._receive_invitation(op, bare)
            return None
        if isinstance(op, stanzas.Leave):
            self._receive_leave(op.gid, bare, resource)
            return None
        if isinstance(op, stanzas.LinkSignal):
            self._receive_link(op, bare, resource)
            return None
        raise ProtocolError("unknown group operation", "unknown")

    def _receive_link(self, signal: stanzas.LinkSignal, bare: str, resource: str) -> None:
        """Link signalling is taken only from a device we share the named group with (per the
        signed documents); anything else is refused before any ICE work starts."""
        device_id = resource.removeprefix("svpn-")
        doc = self.book.doc(signal.gid) if signal.gid in self.book.groups else None
        found = doc.device(device_id) if doc is not None else None
        if (doc is None or found is None or found[0] != bare
                or doc.device(self.device.id) is None or device_id == self.device.id):
            raise ProtocolError(f"link signalling from {bare}/{resource}, which shares no "
                                "group with us", "not-member")
        self.links.receive(signal.gid, device_id, bare, signal.msg)

    def _is_friend(self, jid: str) -> bool:
        if jid == self.cfg.account.jid:
            return True
        return any(r.jid == jid and r.subscription == "both" for r in self.xmpp.roster())

    def _owned(self, gid: str) -> bool:
        return gid in self.book.groups and self.book.doc(gid).owner == self.device.id

    def _serve_document(self, gid: str, bare: str, resource: str) -> bytes:
        if gid not in self.book.groups:
            raise ProtocolError("no such group here", "unknown-group")
        doc = self.book.doc(gid)
        found = doc.device(resource.removeprefix("svpn-"))
        if found is None or found[0] != bare:
            raise ProtocolError("the document is only for members", "not-member")
        return self.book.groups[gid][1].to_wire()

    def _receive_join(self, op: stanzas.JoinRequest, bare: str) -> None:
        gid = self.book.by_name(op.group)
        if gid is None or not self._owned(gid) or (op.gid and op.gid != gid):
            raise ProtocolError(f"no group {op.group!r} owned here", "unknown-group")
        doc = self.book.doc(gid)
        if doc.device(op.device.id) is not None:
            self._schedule_push(gid)  # already in: send the document again
            return
        if any(i["gid"] == gid and i["jid"] == bare for i in self.book.invited):
            log.info("%s accepted the invitation to %s", bare, op.group)
            self.book.invited = [i for i in self.book.invited
                                 if not (i["gid"] == gid and i["jid"] == bare)]
            try:
                self._admit(gid, bare, [op.device])
            except APIError as exc:
                raise ProtocolError(str(exc), "full") from None
            return
        if any(j["gid"] == gid and j["device"]["id"] == op.device.id for j in self.book.joins):
            return
        if len(self.book.joins) >= MAX_PENDING_REQUESTS:
            raise ProtocolError("too many pending join requests", "full")
        self.book.joins.append({"jid": bare, "group": op.group, "gid": gid,
                                "device": op.device.to_json(), "received_at": time.time()})
        self.book.save()
        log.info("join request from %s (%s) for %s: decide with `socialvpn accept %s "
                 "--group %s`", bare, op.device.name, op.group, bare, op.group)
        self.events.publish("request.new", jid=bare, kind="join", group=op.group)

    def _receive_invitation(self, op: stanzas.Invitation, bare: str) -> None:
        if not self._is_friend(bare):
            raise ProtocolError("invitations are taken from friends only", "refused")
        if op.gid in self.book.groups or any(i["gid"] == op.gid for i in self.book.invitations):
            return
        if len(self.book.invitations) >= MAX_PENDING_REQUESTS:
            raise ProtocolError("too many pending invitations", "full")
        self.book.invitations.append({
            "jid": bare, "group": op.name, "gid": op.gid, "owner_key": op.owner_sign_key,
            "owner_device": op.owner_device, "received_at": time.time()})
        self.book.save()
        log.info("invitation from %s to group %s (owner key %s): decide with `socialvpn "
                 "accept %s --group %s`", bare, op.name, sign_key_fingerprint(op.owner_sign_key),
                 bare, op.name)
        self.events.publish("request.new", jid=bare, kind="invitation", group=op.name)

    def _receive_document(self, wire: bytes, sender: str) -> None:
        signed = groups.SignedDocument.from_wire(wire)
        gid = signed.doc.gid
        if gid in self.book.groups:
            pin, current = self.book.groups[gid]
            doc = groups.accept_update(current.doc, pin, signed)
        else:
            asked = next((a for a in self.book.asked
                          if a.get("gid") == gid or (not a.get("gid")
                                                     and a["jid"] == signed.doc.owner_jid
                                                     and a["group"] == signed.doc.name)), None)
            if asked is None:
                raise ProtocolError("a membership document nobody asked for", "refused")
            # Trust on first use for a join we asked for; the invitation's key otherwise.
            pin = asked.get("owner_key") or signed.doc.owner_sign_key
            doc = groups.accept_update(None, pin, signed)
            if doc.device(self.device.id) is None:
                return  # not admitted (yet): keep asking
            self.book.asked.remove(asked)
            log.info("joined group %s of %s (owner key %s)", doc.name, doc.owner_jid,
                     sign_key_fingerprint(pin))
        if doc.device(self.device.id) is None:
            del self.book.groups[gid]
            self.book.save()
            self.links.changed()
            log.warning("removed from group %s by its owner", doc.name)
            self.events.publish("group.removed", gid=gid, name=doc.name)
            return
        self.book.groups[gid] = (pin, signed)
        self.book.save()
        self.events.publish("group.changed", gid=gid, name=doc.name, epoch=doc.epoch)
        self.links.changed()

    def _receive_leave(self, gid: str, bare: str, resource: str) -> None:
        if not self._owned(gid):
            raise ProtocolError("not the owner of that group", "unknown-group")
        device_id = resource.removeprefix("svpn-")
        found = self.book.doc(gid).device(device_id)
        if found is None or found[0] != bare:
            return
        self._change(gid, groups.remove_device(self.book.doc(gid), device_id),
                     also=[(bare, device_id)])

    def device_seen(self, full_jid: str, device: DeviceInfo) -> None:
        """A device came online: the owner brings it up to date."""
        bare = full_jid.split("/", 1)[0]
        self.links.reoffer(device.id)  # what we sent while it was offline went nowhere
        for gid in list(self.book.groups):
            if self._owned(gid):
                found = self.book.doc(gid).device(device.id)
                if found is not None and found[0] == bare:
                    self._spawn(self._send_document(gid, full_jid))

    def _catch_up(self) -> None:
        """After signing in: fetch every group's document from its owner (we may have missed
        changes), and ask again for joins still unanswered."""
        for gid in list(self.book.groups):
            doc = self.book.doc(gid)
            if doc.owner != self.device.id:
                self._spawn(self._fetch(gid, f"{doc.owner_jid}/svpn-{doc.owner}"))
        for asked in list(self.book.asked):
            self._spawn(self._ask_join(asked))

    async def _fetch(self, gid: str, owner: str) -> None:
        try:
            wire = await self.xmpp.send_group_op(owner, stanzas.MembershipFetch(gid))
            if wire:
                self._receive_document(wire, owner)
        except (APIError, ProtocolError) as exc:
            log.info("could not refresh group %s from %s: %s", gid[:8], owner, exc)

    # --- groups: owner side ---------------------------------------------------------------

    def _admit(self, gid: str, jid: str, devices: list[DeviceInfo]) -> None:
        doc = self.book.doc(gid)
        try:
            for device in devices:
                if doc.device(device.id) is None:
                    doc = groups.add_device(doc, jid, device)
        except ValueError as exc:  # subnet full, a device name the document cannot hold...
            raise APIError(f"cannot admit {jid} to {doc.name}: {exc}", 409) from None
        self._change(gid, doc)

    def _change(self, gid: str, doc: groups.MembershipDocument,
                also: list[tuple[str, str]] | tuple[()] = ()) -> None:
        """Sign a new epoch, store it, then push it to every member (and to ``also``)."""
        signed = groups.sign(doc, self.keys.sign)
        self.book.groups[gid] = (self.book.groups[gid][0], signed)
        self.book.save()
        self.links.changed()
        self.events.publish("group.changed", gid=gid, name=doc.name, epoch=doc.epoch)
        self._schedule_push(gid, also)

    def _schedule_push(self, gid: str, extra: list[tuple[str, str]] | tuple[()] = ()) -> None:
        """Push the group's latest document to its members. Changes that come while a push is
        under way are folded into one more push of the newest epoch (signalling is paced, and
        an older epoch is worth nothing once a newer one exists)."""
        pending = self._pushes.get(gid)
        if pending is not None:  # a pusher runs: it goes round once more
            pending.update(extra)
            self._push_again.add(gid)
            return
        self._pushes[gid] = set(extra)
        self._spawn(self._pusher(gid))

    async def _pusher(self, gid: str) -> None:
        try:
            while True:
                extra = self._pushes[gid]
                self._pushes[gid] = set()
                self._push_again.discard(gid)
                await self._push(gid, extra=list(extra))
                if gid not in self._push_again:
                    break
        finally:
            self._pushes.pop(gid, None)
            self._push_again.discard(gid)

    async def _push(self, gid: str, extra: list[tuple[str, str]] | tuple[()] = ()) -> None:
        if gid not in self.book.groups:
            return
        doc = self.book.doc(gid)
        targets = [(jid, d.id) for jid, d in doc.devices() if d.id != self.device.id]
        await asyncio.gather(*(self._send_document(gid, f"{jid}/svpn-{dev}")
                               for jid, dev in [*targets, *extra]))

    async def _send_document(self, gid: str, full_jid: str) -> None:
        if gid not in self.book.groups or not self.xmpp.connected:
            return
        wire = self.book.groups[gid][1].to_wire()
        try:
            await self.xmpp.send_group_op(full_jid, stanzas.MembershipPush(wire))
        except APIError as exc:
            log.debug("document for %s not delivered to %s: %s", gid[:8], full_jid, exc)

    async def _ask_join(self, asked: dict[str, Any]) -> None:
        device = asked.get("owner_device")
        targets = ([f"{asked['jid']}/svpn-{device}"] if device
                   else [full for full, _ in self.xmpp.devices_of(asked["jid"])])
        if not targets:
            raise APIError(f"{asked['jid']} has no SocialVPN device online; the request is "
                           "kept and sent again when you sign in next", 409)
        op = stanzas.JoinRequest(asked["group"], asked.get("gid", ""), self.device)
        errors = []
        for full in targets:
            try:
                await self.xmpp.send_group_op(full, op)
                return
            except APIError as exc:
                errors.append(str(exc))
        raise APIError("; ".join(errors), 409)

    # --- groups: the API ------------------------------------------------------------------

    def _group_or_404(self, name: str) -> str:
        gid = self.book.by_name(name)
        if gid is None:
            raise APIError(f"no group named {name!r} (see `socialvpn groups`)", 404)
        return gid

    def _summary(self, gid: str) -> dict[str, Any]:
        pin, signed = self.book.groups[gid]
        doc = signed.doc
        mine = doc.device(self.device.id)
        return {
            "name": doc.name, "gid": gid, "owner": doc.owner_jid,
            "role": "owner" if doc.owner == self.device.id else "member",
            "epoch": doc.epoch, "subnet4": doc.subnet4, "prefix6": doc.prefix6,
            "ip4": mine[1].ip4 if mine else None,
            "ip6": doc.ip6_of(mine[1]) if mine else None,
            "members": len(doc.members), "devices": len(doc.devices()),
            "owner_key_fingerprint": sign_key_fingerprint(pin),
        }

    def groups(self) -> list[dict[str, Any]]:
        return sorted((self._summary(gid) for gid in self.book.groups), key=lambda g: g["name"])

    def group_show(self, name: str) -> dict[str, Any]:
        gid = self._group_or_404(name)
        doc = self.book.doc(gid)
        members = []
        for jid in doc.member_jids():
            online = {r.resource for r in self.xmpp.resources(jid) if r.available}
            visible = self._is_friend(jid)  # presence is only shared between friends
            members.append({"jid": jid, "devices": [
                {"id": d.id, "name": d.name, "ip4": d.ip4, "ip6": doc.ip6_of(d), "key": d.key,
                 "online": True if d.id == self.device.id
                 else (f"svpn-{d.id}" in online if visible else None)}
                for d in doc.members[jid]]})
        pending = [j for j in self.book.joins if j["gid"] == gid]
        return {**self._summary(gid), "member_list": members, "join_requests": pending}

    async def group_create(self, name: str, subnet: str | None) -> dict[str, Any]:
        try:
            name = groups.validate_group_name(name)
            if subnet is not None:
                subnet = groups.validate_subnet4(subnet)
        except ValueError as exc:
            raise APIError(str(exc), 400) from None
        if self.book.by_name(name) is not None:
            raise APIError(f"a group named {name!r} exists already", 409)
        try:
            doc = groups.create_group(name=name, owner_jid=self.cfg.account.jid,
                                      owner=self.device, rng=os.urandom, subnet4=subnet)
        except ValueError as exc:
            raise APIError(str(exc), 400) from None
        self.book.groups[doc.gid] = (self.device.sign, groups.sign(doc, self.keys.sign))
        self.book.save()
        self.links.changed()
        self.events.publish("group.changed", gid=doc.gid, name=name, epoch=doc.epoch)
        return self._summary(doc.gid)

    async def group_invite(self, name: str, jid: str) -> dict[str, Any]:
        gid = self._group_or_404(name)
        if not self._owned(gid):
            raise APIError(f"only the owner ({self.book.doc(gid).owner_jid}) invites to {name}",
                           403)
        if not self._is_friend(jid):
            raise APIError(f"{jid} is not your friend yet: `socialvpn friend add {jid}` first",
                           409)
        devices = self.xmpp.devices_of(jid)
        if not devices:
            raise APIError(f"{jid} has no SocialVPN device online to invite", 409)
        if not any(i["gid"] == gid and i["jid"] == jid for i in self.book.invited):
            self.book.invited.append({"gid": gid, "jid": jid, "sent_at": time.time()})
            self.book.save()
        op = stanzas.Invitation(gid, name, self.device.sign, self.device.id)
        sent = []
        for full, _ in devices:
            try:
                await self.xmpp.send_group_op(full, op)
                sent.append(full)
            except APIError as exc:
                log.info("invitation to %s not delivered: %s", full, exc)
        if not sent:
            raise APIError(f"no device of {jid} took the invitation", 409)
        return {"group": name, "jid": jid, "result": f"invitation sent to {len(sent)} device(s)"}

    async def group_join(self, owner_jid: str, name: str) -> dict[str, Any]:
        try:
            name = groups.validate_group_name(name)
        except ValueError as exc:
            raise APIError(str(exc), 400) from None
        if self.book.by_name(name) is not None:
            raise APIError(f"you are in a group named {name!r} already", 409)
        asked = {"jid": owner_jid, "group": name, "sent_at": time.time()}
        if not any(a["jid"] == owner_jid and a["group"] == name for a in self.book.asked):
            self.book.asked.append(asked)
            self.book.save()
        await self._ask_join(asked)
        return {"group": name, "owner": owner_jid,
                "result": "request sent; you are in once the owner accepts"}

    async def group_remove(self, name: str, jid: str) -> dict[str, Any]:
        gid = self._group_or_404(name)
        if not self._owned(gid):
            raise APIError(f"only the owner removes members of {name}", 403)
        doc = self.book.doc(gid)
        if jid not in doc.members:
            raise APIError(f"{jid} is not a member of {name}", 404)
        try:
            new = groups.remove_member(doc, jid)
        except ValueError as exc:
            raise APIError(str(exc), 409) from None
        self._change(gid, new, also=[(jid, d.id) for d in doc.members[jid]])
        return {"group": name, "jid": jid, "result": "removed", "epoch": new.epoch}

    async def group_leave(self, name: str) -> dict[str, Any]:
        gid = self._group_or_404(name)
        doc = self.book.doc(gid)
        if doc.owner == self.device.id:
            raise APIError(f"you own {name}: remove its members instead of leaving", 409)
        try:
            await self.xmpp.send_group_op(f"{doc.owner_jid}/svpn-{doc.owner}",
                                          stanzas.Leave(gid))
        except APIError as exc:
            log.info("the owner did not hear that we left %s: %s", name, exc)
        del self.book.groups[gid]
        self.book.save()
        self.links.changed()
        self.events.publish("group.removed", gid=gid, name=name)
        return {"group": name, "result": "left"}

    async def _decide_group(self, jid: str, accept: bool, group: str) -> dict[str, Any]:
        joins = [j for j in self.book.joins if j["jid"] == jid and j["group"] == group]
        if joins:
            self.book.joins = [j for j in self.book.joins if j not in joins]
            self.book.save()
            if accept:
                devices = [DeviceInfo(**j["device"]) for j in joins]
                self._admit(joins[0]["gid"], jid, devices)
            return {"jid": jid, "group": group, "result": "accepted" if accept else "rejected"}
        invitation = next((i for i in self.book.invitations
                           if i["jid"] == jid and i["group"] == group), None)
        if invitation is None:
            raise APIError(f"no join request or invitation for group {group!r} from {jid}", 404)
        self.book.invitations.remove(invitation)
        if accept:
            asked = {"jid": jid, "group": group, "gid": invitation["gid"],
                     "owner_key": invitation["owner_key"],
                     "owner_device": invitation["owner_device"], "sent_at": time.time()}
            self.book.asked.append(asked)
            self.book.save()
            await self._ask_join(asked)
        else:
            self.book.save()
        return {"jid": jid, "group": group, "result": "accepted" if accept else "rejected"}

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
            "groups": [{k: g[k] for k in ("name", "role", "ip4", "ip6", "epoch")}
                       for g in self.groups()],
            "counters": self.counters.to_json(),
            "links": self.links.summary(),
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
            "joins": [{k: j[k] for k in ("jid", "group", "received_at")}
                      | {"device": j["device"]["name"], "device_id": j["device"]["id"]}
                      for j in self.book.joins],
            "invitations": [{k: i[k] for k in ("jid", "group", "received_at")}
                            | {"owner_key_fingerprint": sign_key_fingerprint(i["owner_key"])}
                            for i in self.book.invitations],
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
            return await self._decide_group(jid, accept, group)
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

    def peers(self) -> list[dict[str, Any]]:
        return self.links.peers()

    def events_since(self, seq: int) -> list[dict[str, Any]]:
        return [e.to_json() for e in self.events.recent if e.seq > seq]
