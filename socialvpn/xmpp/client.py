"""The slixmpp adapter: verified TLS, sign-in, roster, presence, keepalive, reconnect.

Nothing of slixmpp leaks out of this module (and ``stanzas.py``): the agent sees plain
dataclasses (:class:`RosterItem`, :class:`ConnectionStatus`) and calls plain methods.

One connection attempt = one fresh ``ClientXMPP``. The attempt ends with an outcome (session
lost, connection failed, TLS refused, authentication failed, timed out); this module's own loop
decides what comes next: exponential backoff with jitter (``[xmpp] reconnect_min`` growing to
``reconnect_max``), except after an authentication failure, which is reported once and not
retried (no retry storm against the server).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from xml.etree import ElementTree as ET

from slixmpp import ClientXMPP
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher.base import MatcherBase

from ..clock import Backoff
from ..config import Config
from ..errors import APIError, ProtocolError
from . import stanzas
from .signal import Pacer
from .stanzas import DeviceInfo

log = logging.getLogger("socialvpn.xmpp")

PRESENCE_PRIORITY = -1  # chats to the bare JID still reach the person's chat client
RESOURCE_PREFIX = "svpn-"
STABLE_SESSION = 30.0  # a session that lasted this long resets the backoff


class XmppState(StrEnum):
    OFFLINE = "offline"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    AUTH_FAILED = "auth-failed"
    STOPPED = "stopped"


class Outcome(StrEnum):
    LOST = "lost"
    FAILED = "failed"
    TLS = "tls"
    AUTH = "auth"
    TIMEOUT = "timeout"
    STOPPED = "stopped"


@dataclass
class ConnectionStatus:
    state: XmppState = XmppState.OFFLINE
    reason: str = "not started"
    since: float = field(default_factory=time.time)
    attempts: int = 0
    next_attempt_at: float | None = None
    connected_at: float | None = None
    tls: str | None = None
    ever_connected: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "state": str(self.state),
            "reason": self.reason,
            "since": self.since,
            "attempts": self.attempts,
            "next_attempt_in": (
                max(0.0, round(self.next_attempt_at - time.time(), 1))
                if self.next_attempt_at else None
            ),
            "connected_at": self.connected_at,
            "tls": self.tls,
        }


@dataclass(frozen=True)
class RosterItem:
    jid: str
    name: str
    subscription: str  # none | to | from | both
    pending_out: bool  # we asked them and they have not answered
    pending_in: bool  # they asked us and we have not answered


@dataclass(frozen=True)
class ContactResource:
    resource: str
    available: bool
    device: DeviceInfo | None


class XmppListener:
    """What the client tells the agent. The agent subclasses and overrides what it needs."""

    def xmpp_state_changed(self, status: ConnectionStatus) -> None: ...

    def roster_changed(self) -> None: ...

    def subscription_requested(self, jid: str) -> None: ...

    def subscription_withdrawn(self, jid: str) -> None: ...

    def presence_changed(self, bare: str) -> None: ...

    def stanza_dropped(self, reason: str, sender: str, detail: str) -> None: ...

    def group_request(self, op: stanzas.GroupOp, sender: str) -> bytes | None:
        """A group operation from ``sender`` (a full JID). Return the membership document to
        answer a fetch with, or None; raise ProtocolError to refuse (the reason picks the
        XMPP error)."""
        raise ProtocolError("groups are not handled here", "unknown")

    def signed_in(self) -> None: ...

    def device_seen(self, full_jid: str, device: DeviceInfo) -> None: ...

    def auth_failed(self, reason: str, ever_connected: bool) -> None: ...


class _OurNamespace(MatcherBase):
    """Matches any stanza with a child element in ``urn:xmpp:socialvpn:0``."""

    def __init__(self) -> None:
        super().__init__(stanzas.NS)

    def match(self, xml: Any) -> bool:
        return bool(stanzas.ours(xml.xml))


class _Client(ClientXMPP):
    """ClientXMPP that never reconnects on its own: our loop owns reconnection."""

    def reconnect(self, wait: int | float = 2.0, reason: str = "Reconnecting") -> None:
        self.disconnect(wait, reason)

    def exception(self, exception: Exception) -> None:
        # A bug in one of our handlers: slixmpp answers undefined-condition; we log it.
        log.error("XMPP handler failed: %r", exception, exc_info=exception)


def build_ssl_context(cfg: Config) -> ssl.SSLContext:
    """A verifying context: chain and host name, system trust plus ``ca_file`` if set."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.xmpp.ca_file is not None:
        ctx.load_verify_locations(cafile=str(cfg.xmpp.ca_file))
    return ctx


class XmppClient:
    # IQ operations in our namespace this agent understands (later issues add join, link...).
    KNOWN_IQ_OPS: frozenset[str] = stanzas.GROUP_OPS

    def __init__(self, cfg: Config, password: str, device: DeviceInfo,
                 listener: XmppListener) -> None:
        self.cfg = cfg
        self._password = password
        self.device = device
        self.listener = listener
        self.jid = f"{cfg.account.jid}/{RESOURCE_PREFIX}{device.id}"
        self.status = ConnectionStatus()
        self._xmpp: _Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._roster: dict[str, RosterItem] = {}
        self._resources: dict[str, dict[str, ContactResource]] = {}
        self._backoff = Backoff(cfg.xmpp.reconnect_min, cfg.xmpp.reconnect_max)
        self._ssl = build_ssl_context(cfg)
        self._pacer = Pacer()
        self._pace_lock = asyncio.Lock()
        stanzas.register_stanzas()

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="xmpp")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        xmpp = self._xmpp
        if xmpp is not None and xmpp.transport is not None:
            with contextlib.suppress(Exception):
                xmpp.send_presence(ptype="unavailable")
                await asyncio.wait_for(xmpp.disconnect(wait=1.0), 2.0)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._set_state(XmppState.STOPPED, "agent stopped")

    def set_password(self, password: str) -> None:
        """A new password (SIGHUP re-read the file): try again now if sign-in had failed."""
        changed = password != self._password
        self._password = password
        if changed and self.status.state == XmppState.AUTH_FAILED:
            self.reconnect_now()

    def reconnect_now(self) -> None:
        """Skip the remaining backoff delay (e.g. the network came back)."""
        self._backoff.reset()
        self._wake.set()

    def network_changed(self, addresses: frozenset[str]) -> None:
        """The host's addresses changed (net/monitor.py): a session whose socket sits on an
        address that is gone can never recover, so drop it now rather than after the ping
        timeout; the usual backoff then reconnects from the new address."""
        xmpp = self._xmpp
        transport = xmpp.transport if xmpp is not None else None
        name = transport.get_extra_info("sockname") if transport is not None else None
        host = _plain_address(name[0]) if name else None
        if host is None or host.is_loopback:
            return
        known = {a for a in map(_plain_address, addresses) if a is not None}
        if host not in known:
            log.info("XMPP session was on %s, which is gone: reconnecting", host)
            self._backoff.reset()  # a new network: the first retry comes soon
            xmpp.abort()  # type: ignore[union-attr]

    @property
    def connected(self) -> bool:
        return self.status.state == XmppState.CONNECTED

    def _set_state(self, state: XmppState, reason: str) -> None:
        if state == self.status.state and reason == self.status.reason:
            return
        self.status.state = state
        self.status.reason = reason
        self.status.since = time.time()
        if state != XmppState.CONNECTED:
            self.status.connected_at = None
        self.listener.xmpp_state_changed(self.status)

    async def _run(self) -> None:
        while not self._stopping:
            self.status.attempts += 1
            self.status.next_attempt_at = None
            if self.status.state != XmppState.CONNECTING:
                self._set_state(XmppState.CONNECTING, self.status.reason)
            started = time.monotonic()
            outcome, reason = await self._attempt()
            if self._stopping or outcome == Outcome.STOPPED:
                break
            self._resources.clear()
            self.listener.presence_changed("")
            if outcome == Outcome.AUTH:
                # Retrying cannot help and would hammer the server: wait for a new password.
                self._set_state(XmppState.AUTH_FAILED, reason)
                self.listener.auth_failed(reason, self.status.ever_connected)
                self._wake.clear()
                await self._wake.wait()
                continue
            if time.monotonic() - started > STABLE_SESSION:
                self._backoff.reset()
            delay = self._backoff.next_delay()
            self.status.next_attempt_at = time.time() + delay
            self._set_state(XmppState.CONNECTING if self.status.ever_connected
                            else XmppState.OFFLINE, reason)
            log.warning("XMPP %s: %s; next attempt in %.1f s", outcome, reason, delay)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def _attempt(self) -> tuple[Outcome, str]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[Outcome, str]] = loop.create_future()
        xmpp = self._make_client(done)
        self._xmpp = xmpp
        server = self.cfg.xmpp.server
        where = str(server) if server else self.cfg.account.domain
        self.status.reason = f"connecting to {where}"

        def finish(outcome: Outcome, reason: str) -> None:
            if not done.done():
                done.set_result((outcome, reason))

        xmpp.add_event_handler("connection_failed",
                               lambda err: finish(Outcome.FAILED, f"cannot reach {where}: "
                                                  f"{_describe(err)}"))
        xmpp.add_event_handler("disconnected",
                               lambda why: finish(Outcome.LOST, "connection to the server lost"
                                                  + (f": {_describe(why)}" if why else "")))
        if server:
            xmpp.connect(server.host, server.port)
        else:
            xmpp.connect()

        timeout = self.cfg.xmpp.connect_timeout
        try:
            # The attempt ends when `done` resolves. Until signed in, bound it by connect_timeout.
            signed_in = asyncio.ensure_future(self._until_session(xmpp))
            first = await asyncio.wait({done, signed_in}, timeout=timeout,
                                       return_when=asyncio.FIRST_COMPLETED)
            if not first[0]:
                finish(Outcome.TIMEOUT, f"no session with {where} after {timeout:.0f} s")
            signed_in.cancel()
            return await done
        except asyncio.CancelledError:
            finish(Outcome.STOPPED, "stopped")
            raise
        finally:
            self._teardown(xmpp)

    async def _until_session(self, xmpp: _Client) -> None:
        event = asyncio.Event()
        xmpp.add_event_handler("session_start", lambda _e: event.set())
        await event.wait()

    def _teardown(self, xmpp: _Client) -> None:
        xmpp.cancel_connection_attempt()
        if xmpp.transport is not None:
            xmpp.abort()
        if self._xmpp is xmpp:
            self._xmpp = None

    def _make_client(self, done: asyncio.Future[tuple[Outcome, str]]) -> _Client:
        xmpp = _Client(self.jid, self._password)
        xmpp.ssl_context = self._ssl
        xmpp.enable_direct_tls = False
        xmpp.enable_starttls = True
        xmpp.enable_plaintext = False
        xmpp.auto_authorize = None  # never accept (or reject) a friend request by ourselves
        xmpp.auto_subscribe = False
        xmpp.register_plugin("xep_0030")
        xmpp.register_plugin("xep_0199", {"keepalive": True,
                                          "interval": self.cfg.xmpp.keepalive_interval,
                                          "timeout": self.cfg.xmpp.keepalive_timeout})
        mech = xmpp.plugin["feature_mechanisms"]
        if self.cfg.xmpp.allow_plaintext:
            mech.unencrypted_scram = True
        self._guard_plaintext_auth(xmpp, mech, done)

        def fail(outcome: Outcome, reason: str) -> None:
            if not done.done():
                done.set_result((outcome, reason))
            xmpp.abort()

        def on_failed_auth(stanza: Any) -> None:
            condition = stanza["condition"] if stanza is not None else "unknown"
            text = stanza["text"] if stanza is not None else ""
            fail(Outcome.AUTH,
                 f"authentication failed for {self.cfg.account.jid}: {condition}"
                 + (f" ({text})" if text else "") + " - check the password")

        xmpp.add_event_handler("failed_auth", on_failed_auth)
        xmpp.add_event_handler("failed_all_auth", lambda _e: fail(
            Outcome.AUTH, f"authentication failed for {self.cfg.account.jid}: "
                          "no login method acceptable to both sides"))
        xmpp.add_event_handler("ssl_invalid_chain", lambda err: fail(
            Outcome.TLS, f"TLS certificate of {self.cfg.account.domain} refused: "
                         f"{_describe(err)}"))
        xmpp.add_event_handler("session_start", self._on_session_start)
        xmpp.add_event_handler("roster_update", lambda _e: self._refresh_roster())
        xmpp.add_event_handler("roster_subscription_request", self._on_subscribe)
        xmpp.add_event_handler("roster_subscription_authorized", lambda _p: self._refresh_roster())
        xmpp.add_event_handler("roster_subscription_remove", lambda _p: self._refresh_roster())
        xmpp.add_event_handler("presence_unsubscribe", self._on_unsubscribe)
        xmpp.add_event_handler("presence_available", self._on_presence)
        xmpp.add_event_handler("presence_unavailable", self._on_presence)
        xmpp.add_event_handler("changed_status", self._on_presence)
        xmpp.register_handler(Callback("socialvpn", _OurNamespace(), self._on_ours))
        return xmpp

    def _guard_plaintext_auth(self, xmpp: _Client, mech: Any,
                              done: asyncio.Future[tuple[Outcome, str]]) -> None:
        """Refuse SASL on a stream that is not encrypted (unless allow_plaintext)."""
        original = mech._handle_sasl_auth
        order = mech.config.get("order", 100) if hasattr(mech, "config") else 100
        allow = self.cfg.xmpp.allow_plaintext

        def guarded(features: Any) -> Any:
            encrypted = "starttls" in xmpp.features or isinstance(
                xmpp.socket, ssl.SSLObject | ssl.SSLSocket)
            if not encrypted and not allow:
                if not done.done():
                    done.set_result((Outcome.TLS,
                                     f"the server {self.cfg.account.domain} offers no TLS; "
                                     "refusing to send the password in plaintext"))
                xmpp.abort()
                return True
            return original(features)

        xmpp.unregister_feature("mechanisms", order)
        xmpp.register_feature("mechanisms", guarded, restart=True, order=order)

    # --- session ---------------------------------------------------------------------------

    async def _on_session_start(self, _event: Any) -> None:
        xmpp = self._xmpp
        if xmpp is None:
            return
        try:
            await xmpp.get_roster(timeout=10)
        except (IqError, IqTimeout) as exc:
            log.warning("roster fetch failed: %s", exc)
        self._refresh_roster()
        self._send_presence()
        cipher = None
        sock = xmpp.socket
        if isinstance(sock, ssl.SSLObject | ssl.SSLSocket):
            cipher = f"{sock.version()} {sock.cipher()[0] if sock.cipher() else ''}".strip()
        self.status.tls = cipher
        self.status.ever_connected = True
        self.status.connected_at = time.time()
        self.status.next_attempt_at = None
        self._set_state(XmppState.CONNECTED, f"signed in as {self.jid}")
        log.info("signed in as %s (%s)", self.jid, cipher or "no TLS")
        self.listener.signed_in()

    def _send_presence(self, to: str | None = None) -> None:
        xmpp = self._xmpp
        if xmpp is None:
            return
        pres = xmpp.make_presence(ppriority=PRESENCE_PRIORITY, pto=to)
        pres.append(stanzas.make_device(self.device))
        pres.send()

    # --- roster and presence ---------------------------------------------------------------

    def _refresh_roster(self) -> None:
        xmpp = self._xmpp
        if xmpp is None:
            return
        roster = xmpp.client_roster
        items: dict[str, RosterItem] = {}
        for jid in roster:
            item = roster[jid]
            bare = str(jid)
            if bare == self.cfg.account.jid:
                continue
            items[bare] = RosterItem(
                jid=bare, name=item["name"] or "", subscription=item["subscription"],
                pending_out=bool(item["pending_out"]), pending_in=bool(item["pending_in"]))
        if items != self._roster:
            self._roster = items
            self.listener.roster_changed()

    def roster(self) -> list[RosterItem]:
        return sorted(self._roster.values(), key=lambda r: r.jid)

    def resources(self, bare: str) -> list[ContactResource]:
        return sorted(self._resources.get(bare, {}).values(), key=lambda r: r.resource)

    def _on_subscribe(self, presence: Any) -> None:
        sender = presence["from"].bare
        self._refresh_roster()
        item = self._roster.get(sender)
        if item is not None and (item.subscription in ("to", "both") or item.pending_out):
            # We asked them first: their request is the other half of ours.
            log.info("approving %s: we asked them to be friends", sender)
            self._approve(sender)
            return
        self.listener.subscription_requested(sender)

    def _on_unsubscribe(self, presence: Any) -> None:
        self._refresh_roster()
        self.listener.subscription_withdrawn(presence["from"].bare)

    def _on_presence(self, presence: Any) -> None:
        sender = presence["from"]
        bare, resource = sender.bare, sender.resource
        if not resource:
            return
        is_self = bare == self.cfg.account.jid
        if is_self and resource == self.jid.split("/", 1)[1]:
            return
        if not is_self and bare not in self._roster:
            return  # presence from strangers tells us nothing we use
        available = presence["type"] not in ("unavailable", "error")
        device = None
        elements = [el for el in stanzas.ours(presence.xml) if el.tag.endswith("}device")]
        if available and elements:
            try:
                device = stanzas.parse_device(elements[0])
            except ProtocolError as exc:
                # Counted in _on_ours; the presence still says "online", without a device.
                log.debug("bad device element from %s: %s", sender, exc)
        per = self._resources.setdefault(bare, {})
        known = per.get(resource)
        if available:
            per[resource] = ContactResource(resource, True, device)
        else:
            per.pop(resource, None)
        self.listener.presence_changed(bare)
        if device is not None and (known is None or known.device != device):
            self.listener.device_seen(f"{bare}/{resource}", device)

    # --- our namespace ---------------------------------------------------------------------

    def _on_ours(self, stanza: Any) -> None:
        """Every stanza carrying our namespace passes here first: validate, count, answer."""
        sender = str(stanza["from"])
        kind = stanza.name
        op: stanzas.GroupOp | None = None
        try:
            for element in stanzas.ours(stanza.xml):
                if kind == "presence":
                    stanzas.parse_device(element)
                elif kind == "iq":
                    if stanza["type"] in ("result", "error"):
                        continue
                    stanzas.parse_iq_payload(element, self.KNOWN_IQ_OPS)
                    if op is not None:
                        raise ProtocolError("more than one operation in one IQ", "malformed")
                    op = stanzas.parse_group_op(element, stanza["type"])
                else:
                    raise ProtocolError(f"our namespace is not used in <{kind}/>", "unexpected")
        except ProtocolError as exc:
            self.listener.stanza_dropped(exc.reason, sender, str(exc))
            if kind == "iq" and stanza["type"] in ("get", "set"):
                unknown = exc.reason in ("unknown", "version")
                _error_reply(stanza, "feature-not-implemented" if unknown else "bad-request",
                             "cancel" if unknown else "modify")
            return
        if op is None or kind != "iq" or stanza["type"] not in ("get", "set"):
            return
        try:
            document = self.listener.group_request(op, sender)
        except ProtocolError as exc:
            self.listener.stanza_dropped(exc.reason, sender, str(exc))
            _error_reply(stanza, _REFUSALS.get(exc.reason, "not-acceptable"), "cancel")
            return
        reply = stanza.reply(clear=True)
        if document is not None:
            _, payload = stanzas.make_group_op(stanzas.MembershipPush(document))
            reply.append(payload)
        reply.send()

    async def send_group_op(self, to: str, op: stanzas.GroupOp,
                            timeout: float = 10.0) -> bytes | None:
        """Send a group operation to a full JID; the membership document in the answer, if any.
        A refusal or no answer raises APIError naming the peer."""
        iq_type, payload = stanzas.make_group_op(op)
        # Pace our own signalling to stay under a server's per-client rate limit (Prosody's
        # mod_limits example allows 10 kB/s): a burst of links waits its turn, in order.
        size = len(ET.tostring(payload)) + 120
        async with self._pace_lock:
            delay = self._pacer.delay(size, time.monotonic())
            if delay > 0:
                await asyncio.sleep(delay)
            self._pacer.commit(size, time.monotonic())
        xmpp = self._need()
        iq = xmpp.Iq()
        iq["type"] = iq_type
        iq["to"] = to
        iq.append(payload)
        try:
            answer = await iq.send(timeout=timeout)
        except IqError as exc:
            condition = exc.iq["error"]["condition"]
            raise APIError(f"{to} refused: {condition}", 409) from None
        except IqTimeout:
            raise APIError(f"{to} did not answer within {timeout:.0f} s", 504) from None
        for element in stanzas.ours(answer.xml):
            try:
                stanzas.parse_iq_payload(element, self.KNOWN_IQ_OPS)
                result = stanzas.parse_group_op(element, "set")
            except ProtocolError as exc:
                self.listener.stanza_dropped(exc.reason, to, str(exc))
                raise APIError(f"{to} answered with something unreadable", 502) from None
            if isinstance(result, stanzas.MembershipPush):
                return result.document
        return None

    def devices_of(self, bare: str) -> list[tuple[str, DeviceInfo]]:
        """Online SocialVPN devices of a contact (or of our own account): (full JID, device)."""
        out = []
        for r in self.resources(bare):
            if r.available and r.device is not None:
                out.append((f"{bare}/{r.resource}", r.device))
        return out

    # --- actions (called through the local API) --------------------------------------------

    def _need(self) -> _Client:
        xmpp = self._xmpp
        if xmpp is None or self.status.state != XmppState.CONNECTED:
            raise APIError(f"not connected to the XMPP server ({self.status.state}: "
                           f"{self.status.reason}); try again once `status` says connected", 503)
        return xmpp

    def add_friend(self, jid: str) -> None:
        xmpp = self._need()
        item = self._roster.get(jid)
        if item is not None and item.pending_in:
            self._approve(jid)
            return
        xmpp.send_presence_subscription(pto=jid, ptype="subscribe")

    def _approve(self, jid: str) -> None:
        xmpp = self._need()
        xmpp.send_presence_subscription(pto=jid, ptype="subscribed")
        item = self._roster.get(jid)
        asked = item is not None and (item.subscription in ("to", "both") or item.pending_out)
        if not asked:
            xmpp.send_presence_subscription(pto=jid, ptype="subscribe")
        # Our presence reaches them now that they may see it (servers do this too; be sure).
        self._send_presence(to=jid)

    def approve(self, jid: str) -> None:
        self._approve(jid)

    def deny(self, jid: str) -> None:
        xmpp = self._need()
        xmpp.send_presence_subscription(pto=jid, ptype="unsubscribed")

    async def remove_friend(self, jid: str) -> None:
        xmpp = self._need()
        if jid in self._roster:
            try:
                await xmpp.del_roster_item(jid)
            except (IqError, IqTimeout) as exc:
                raise APIError(f"the server refused to remove {jid}: {exc}", 502) from None
        else:
            xmpp.send_presence_subscription(pto=jid, ptype="unsubscribe")
            xmpp.send_presence_subscription(pto=jid, ptype="unsubscribed")
        self._resources.pop(jid, None)
        self._refresh_roster()

    def send_raw(self, xml: ET.Element) -> None:
        """Send one stanza (tests and later layers)."""
        self._need().send_raw(ET.tostring(xml, encoding="unicode"))


def _describe(err: Any) -> str:
    if isinstance(err, ssl.SSLCertVerificationError):
        return err.verify_message or str(err)
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err).strip()
    return text or type(err).__name__


_REFUSALS = {"refused": "forbidden", "unknown-group": "item-not-found",
             "not-member": "forbidden", "stale": "conflict", "full": "resource-constraint"}


def _error_reply(stanza: Any, condition: str, etype: str) -> None:
    with contextlib.suppress(Exception):
        reply = stanza.reply(clear=True)
        reply["type"] = "error"
        reply["error"]["condition"] = condition
        reply["error"]["type"] = etype
        reply.send()


def _plain_address(text: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``text`` as an address without a zone (``fe80::1%eth0``) and with a v4-mapped IPv6
    address unwrapped, so a socket's name compares with netlink's address strings."""
    try:
        ip = ipaddress.ip_address(str(text).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
