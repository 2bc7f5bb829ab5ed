"""The links of every group this device is in (the second orchestrator module, beside agent.py).

One TUN device and one ``GroupLinks`` per group, a signalling state machine per (group, peer
device); signalling actions become XMPP messages and ICE calls, ICE events become signalling.
Like agent.py it may import across subpackages.

Always on: at start every group's TUN device and links come back from the stored documents,
and peers with an entry in the endpoint cache (``endpoints.json`` in the state dir, 0600: the
last working direct endpoint and our local port) get a WireGuard handshake at once, with no
XMPP needed. net/monitor.py reports host address changes: links move off addresses that are
gone and send at once (peers follow by roaming), XMPP drops a session on a lost address, and
ICE starts over.

Partial checksums (net/offload.py): a group whose TUN device has offloads advertises
``csum-partial`` in its offers and answers; a session both sides advertised it for uses them
once its ICE connects (GroupLinks.start_ice), every other session switches them off. Link
signalling that arrives before the group's TUN device is up waits for it (at most
:data:`HOLD_TIMEOUT` s), so an answer never leaves out what the device can do.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from . import groups
from .errors import APIError, ProtocolError
from .keys import fingerprint_of
from .xmpp import stanzas
from .xmpp.signal import (
    CSUM_PARTIAL,
    AddRemoteCandidates,
    LinkMessage,
    LinkSignaling,
    Role,
    SendMessage,
    StartIce,
    StopIce,
    validate,
)

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger("socialvpn.links")

INTERFACE_PREFIX = "svpn-"  # every TUN device the agent makes is named svpn-<group>
ENDPOINTS_FILE = "endpoints.json"  # last working direct endpoint per (group, peer device)
ENDPOINTS_VERSION = 1
CACHE_INTERVAL = 5.0  # seconds between looks at what to cache
CACHE_MAX_AGE = 7 * 86400.0  # cached endpoints older than this are forgotten
HOLD_TIMEOUT = 10.0  # link signalling waits this long for its group's TUN device
HOLD_MAX = 64  # messages per peer held meanwhile; more are refused (oversize)


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


def parse_cached(entry: object) -> tuple[tuple[str, int], int] | None:
    """``((host, port), local_port)`` from one endpoint cache entry, None if malformed."""
    if not isinstance(entry, dict):
        return None
    text, local_port = entry.get("endpoint"), entry.get("local_port", 0)
    if not isinstance(text, str) or not isinstance(local_port, int) or isinstance(
            local_port, bool) or not 0 <= local_port <= 65535:
        return None
    saved = entry.get("saved", 0)  # seconds since the epoch; the save loop compares it
    if not isinstance(saved, int | float) or isinstance(saved, bool) or saved != saved:
        return None
    host, _, port = text.rpartition(":")
    try:
        ip = ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        return None
    if ip.version != 4 or not 0 < number < 65536 or ip.is_unspecified or ip.is_multicast:
        return None
    return (str(ip), number), local_port


class LinkHub:
    """The links of every group this device is in: a TUN device and a ``GroupLinks`` per
    group, and a signalling state machine per (group, peer device). It turns signalling
    actions into XMPP messages and ICE calls, and ICE events back into signalling."""

    TICK = 0.2

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.enabled = agent.cfg.link.enabled
        self.groups: dict[str, Any] = {}  # gid -> GroupLinks
        self.tuns: dict[str, Any] = {}  # gid -> TunDevice
        self.signals: dict[tuple[str, str], LinkSignaling] = {}
        self.jids: dict[tuple[str, str], str] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.failures: dict[tuple[str, str], str] = {}
        self._up: dict[str, asyncio.Event] = {}  # gid -> set once its links are up
        self._order: dict[tuple[str, str], tuple[asyncio.Lock, list[int]]] = {}
        """Per peer: the lock that keeps its actions in order, and how many tasks use it (the
        entry goes when the last one is done)."""
        self._unsent: set[tuple[str, str]] = set()  # our last signalling to them went nowhere
        self._held: dict[tuple[str, str], list[LinkMessage]] = {}  # until the group is up
        self._overlay: tuple[str, ...] = ()
        self._restored: set[tuple[str, str]] = set()
        self._cache: dict[str, dict[str, dict[str, Any]]] = self._load_cache()
        self._cache_at = 0.0
        self.monitor: Any = None
        self.network_changes = 0

    async def start(self) -> None:
        """Bring back every group's TUN device and addresses from the state (XMPP need not be
        up), then keep the links in step with the documents."""
        if self.enabled:
            try:
                await self._sync()
            except Exception:
                log.exception("restoring the groups' devices failed")
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="links")
            self.changed()
            await self._start_monitor()

    async def _start_monitor(self) -> None:
        from .net.monitor import NetMonitor

        monitor = NetMonitor(self.network_changed, exclude_networks=lambda: self._overlay,
                             exclude_prefixes=(INTERFACE_PREFIX, "lo"))
        try:
            await monitor.start()
        except Exception as exc:
            log.warning("no network monitor (%s): links recover by re-signalling only", exc)
            return
        self.monitor = monitor

    def network_changed(self, addresses: frozenset[str]) -> None:
        """The host's usable addresses changed: every link sends from where it can now at once
        (a peer follows an authenticated packet from a new address), and every ICE session
        starts over with fresh candidates (signalled as end + new offer)."""
        self.network_changes += 1
        now = time.monotonic()
        xmpp_changed = getattr(self.agent.xmpp, "network_changed", None)
        if xmpp_changed is not None:
            try:
                xmpp_changed(addresses)
            except Exception:
                log.exception("XMPP network change handling failed")
        for gid, links in self.groups.items():
            moved = links.network_changed(set(addresses))
            if moved:
                log.info("network change: %s now sent from our own socket", ", ".join(moved))
            for key, sig in list(self.signals.items()):
                if key[0] == gid and sig.ice_running:
                    self._run(key, sig.ice_failed("network-changed", now))
        self._wake.set()

    def reoffer(self, device_id: str | None = None) -> None:
        """Signalling sent while the server (or the peer) was away went nowhere: offer again
        now to every such peer (or to ``device_id``) whose link is not up or coming up."""
        for key, sig in list(self.signals.items()):
            if key in self._unsent and (device_id is None or key[1] == device_id):
                self._unsent.discard(key)
                self._run(key, sig.reoffer(time.monotonic()))

    def changed(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        if self.monitor is not None:
            await self.monitor.stop()
            self.monitor = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for gid in list(self.groups):
            await self._drop_group(gid)

    async def _loop(self) -> None:
        while True:
            if self._wake.is_set():
                self._wake.clear()
                try:
                    await self._sync()
                except Exception:
                    log.exception("link set-up failed")
            now = time.monotonic()
            if now - self._cache_at >= CACHE_INTERVAL:
                self._cache_at = now
                try:
                    self._save_cache()
                except Exception:
                    log.exception("saving the endpoint cache failed")
            for key, sig in list(self.signals.items()):
                deadline = sig.next_deadline()
                if deadline is not None and deadline <= now:
                    self._run(key, sig.handle_timer(now))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.TICK)

    async def _sync(self) -> None:
        agent = self.agent
        me = agent.device.id
        wanted = {gid: agent.book.doc(gid) for gid in agent.book.groups
                  if agent.book.doc(gid).device(me) is not None}
        for gid in list(self.groups):
            if gid not in wanted:
                await self._drop_group(gid)
        # ICE must never gather on (or through) any group's overlay addresses.
        overlay = tuple(n for doc in wanted.values() for n in (doc.subnet4, doc.prefix6))
        self._overlay = overlay
        for gid, doc in wanted.items():
            if gid not in self.groups:
                await self._add_group(gid, doc)
            links = self.groups[gid]
            links.set_excluded_networks(overlay)
            plans = groups.link_plans([doc], me)
            features = self._features(gid)
            for peer_id, plan in plans.items():
                links.set_peer(peer_id, base64.b64decode(plan.key), plan.allowed_ips)
                key = (gid, peer_id)
                if key not in self._restored:
                    self._restored.add(key)
                    self._restore(gid, peer_id, links)
                if key not in self.signals:
                    sig = LinkSignaling(me, peer_id, rng=os.urandom, features=features)
                    self.signals[key] = sig
                    self.jids[key] = plan.jid
                    self._run(key, sig.start(time.monotonic()))
                else:
                    self.signals[key].set_features(features)  # from its next session on
            for key in [k for k in self.signals if k[0] == gid and k[1] not in plans]:
                sig = self.signals.pop(key)
                self._run(key, sig.close(time.monotonic()), jid=self.jids.pop(key, None))
                await links.remove_peer(key[1])

    async def _add_group(self, gid: str, doc: groups.MembershipDocument) -> None:
        from .link.ice import IceServers, TurnServer
        from .link.manager import GroupLinks
        from .net.packet_router import PacketRouter
        from .net.router import InterfaceSpec, Router
        from .net.tun import TunDevice

        cfg = self.agent.cfg
        _, mine = doc.device(self.agent.device.id)  # type: ignore[misc]
        name = f"svpn-{doc.name}"
        prefix4 = doc.subnet4.split("/")[1]
        tun = await asyncio.to_thread(TunDevice.open, name, cfg.link.mtu, offloads=True)
        spec = InterfaceSpec(name=name, mtu=cfg.link.mtu,
                             addresses=(f"{mine.ip4}/{prefix4}", f"{doc.ip6_of(mine)}/64"))
        router = Router()
        try:
            await asyncio.to_thread(router.apply, spec)
        finally:
            router.close()
        turn = []
        for t in cfg.ice.turn:
            host_port = t.url.split(":", 1)[1].split("?")[0]
            host, _, port = host_port.rpartition(":")
            turn.append(TurnServer(host or host_port, int(port or 3478), t.username, t.password))
        servers = IceServers(stun=tuple((s.host, s.port) for s in cfg.ice.stun),
                             turn=tuple(turn))
        links = GroupLinks(private_key=self.agent.keys.x25519_private, tun=tun,
                           routes=PacketRouter(), servers=servers, mtu=cfg.link.mtu,
                           keepalive=cfg.link.keepalive,
                           on_event=lambda ev, gid=gid: self._on_event(gid, ev),
                           exclude_networks=(doc.subnet4, doc.prefix6))
        links.start()
        self.groups[gid] = links
        self.tuns[gid] = tun
        self._ready(gid).set()
        log.info("group %s: %s up with %s and %s", doc.name, name, mine.ip4, doc.ip6_of(mine))

    async def _drop_group(self, gid: str) -> None:
        from .net.router import Router

        links = self.groups.pop(gid)
        self._up.pop(gid, None)
        self._restored = {k for k in self._restored if k[0] != gid}
        for key in [k for k in self.signals if k[0] == gid]:
            sig = self.signals.pop(key)
            self._run(key, sig.close(time.monotonic()), jid=self.jids.pop(key, None))
        await links.stop()
        tun = self.tuns.pop(gid, None)
        name = getattr(tun, "name", None)
        if tun is not None:
            tun.close()
        if name:
            router = Router()
            try:
                await asyncio.to_thread(router.remove, name)
            except Exception as exc:
                log.debug("removing %s: %s", name, exc)
            finally:
                router.close()

    # --- the peer endpoint cache (DESIGN.md §4.5) --------------------------------------------

    def _load_cache(self) -> dict[str, dict[str, dict[str, Any]]]:
        try:
            raw = self.agent.state.read_json(ENDPOINTS_FILE, {})
        except Exception as exc:  # a corrupt cache only costs the quick start
            log.warning("endpoint cache ignored: %s", exc)
            return {}
        groups_ = raw.get("groups") if isinstance(raw, dict) else None
        if not isinstance(groups_, dict) or raw.get("version") != ENDPOINTS_VERSION:
            return {}
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for gid, peers in groups_.items():
            if not isinstance(peers, dict):
                continue
            for peer_id, entry in peers.items():
                if parse_cached(entry) is not None:
                    out.setdefault(str(gid), {})[str(peer_id)] = entry
        return out

    def _restore(self, gid: str, peer_id: str, links: Any) -> None:
        entry = parse_cached(self._cache.get(gid, {}).get(peer_id))
        if entry is None:
            return
        endpoint, local_port = entry
        try:
            if links.restore(peer_id, endpoint, local_port):
                log.info("link to %s restored from cache: %s:%s from port %s", peer_id,
                         endpoint[0], endpoint[1], local_port)
        except OSError as exc:
            log.warning("restoring the link to %s: %s", peer_id, exc)

    def _save_cache(self) -> None:
        """Remember each peer's working direct endpoint (and our local port); keep older
        entries of peers that are down now (they are tried at the next start); forget peers
        and groups that are gone."""
        agent = self.agent
        me = agent.device.id
        now = time.time()
        cache: dict[str, dict[str, dict[str, Any]]] = {}
        for gid in agent.book.groups:
            doc = agent.book.doc(gid)
            if doc.device(me) is None:
                continue
            peers = {d.id for _, d in doc.devices() if d.id != me}
            links = self.groups.get(gid)
            for peer_id in peers:
                entry = self._cache.get(gid, {}).get(peer_id)
                found = (links.direct_endpoint(peer_id)
                         if links is not None and peer_id in links.peers() else None)
                if found is not None:
                    host, port, local_port = found
                    same = (entry is not None and entry.get("endpoint") == f"{host}:{port}"
                            and entry.get("local_port") == local_port
                            and now - float(entry.get("saved", 0)) < 3600)
                    if not same:
                        entry = {"endpoint": f"{host}:{port}", "local_port": local_port,
                                 "saved": round(now)}
                if entry is not None and now - float(entry.get("saved", 0)) < CACHE_MAX_AGE:
                    cache.setdefault(gid, {})[peer_id] = entry
        if cache != self._cache:
            self._cache = cache
            agent.state.write_json(ENDPOINTS_FILE, {"version": ENDPOINTS_VERSION,
                                                    "groups": cache})

    # --- signalling <-> ICE ----------------------------------------------------------------

    def _ready(self, gid: str) -> asyncio.Event:
        event = self._up.get(gid)
        if event is None:
            event = self._up[gid] = asyncio.Event()
        if gid in self.groups:
            event.set()
        return event

    def _features(self, gid: str) -> tuple[str, ...]:
        """What this device advertises on the links of group ``gid``."""
        links = self.groups.get(gid)
        return (CSUM_PARTIAL,) if links is not None and links.offloads else ()

    def receive(self, gid: str, peer_id: str, jid: str, msg: LinkMessage) -> None:
        if not self.enabled:
            raise ProtocolError("links are switched off on this device", "unknown")
        key = (gid, peer_id)
        held = self._held.get(key)
        if gid not in self.groups or held is not None:
            # The document just arrived: the group's links are being set up. Our answer
            # must say what its TUN device can do, so the peer's messages wait for it (in
            # order; malformed ones are still refused at once).
            self.changed()
            validate(msg)
            if held is None:
                held = self._held[key] = []
                self.agent._spawn(self._release_held(key, jid))
            if len(held) >= HOLD_MAX:
                raise ProtocolError("too much link signalling before the group is up",
                                    "oversize")
            held.append(msg)
            return
        self._receive_now(key, jid, msg)

    def _receive_now(self, key: tuple[str, str], jid: str, msg: LinkMessage) -> None:
        sig = self.signals.get(key)
        if sig is None:
            sig = LinkSignaling(self.agent.device.id, key[1], rng=os.urandom,
                                features=self._features(key[0]))
            self.signals[key] = sig
            self.jids[key] = jid
        self._run(key, sig.receive(msg, time.monotonic()))

    async def _release_held(self, key: tuple[str, str], jid: str) -> None:
        """Hand the peer's held messages to its state machine once the group is up (or after
        :data:`HOLD_TIMEOUT` s without: then nothing is advertised)."""
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready(key[0]).wait(), HOLD_TIMEOUT)
        finally:
            held = self._held.pop(key, [])
        for msg in held:
            try:
                self._receive_now(key, jid, msg)
            except ProtocolError as exc:
                self.agent.stanza_dropped(exc.reason, jid, str(exc))

    def _on_event(self, gid: str, event: Any) -> None:
        key = (gid, event.peer_id)
        sig = self.signals.get(key)
        if sig is None:
            return
        now = time.monotonic()
        if event.kind == "candidates":
            self._run(key, sig.local_candidates(tuple(event.candidates), event.end, now))
        elif event.kind == "connected":
            self.failures.pop(key, None)
            self._run(key, sig.ice_connected(now))
        elif event.kind == "failed":
            self.failures[key] = event.reason
            self._run(key, sig.ice_failed(event.reason, now))

    def _run(self, key: tuple[str, str], actions: list[Any], jid: str | None = None) -> None:
        if actions:
            self.agent._spawn(self._execute(key, actions, jid or self.jids.get(key)))

    async def _execute(self, key: tuple[str, str], actions: list[Any], jid: str | None) -> None:
        # One peer's actions run strictly in the order the state machine gave them (an ICE
        # session must exist before its remote candidates arrive).
        entry = self._order.get(key)
        if entry is None:
            entry = self._order[key] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                await self._execute_in_order(key, actions, jid)
        finally:
            users[0] -= 1
            if not users[0] and self._order.get(key) is entry:
                del self._order[key]

    async def _execute_in_order(self, key: tuple[str, str], actions: list[Any],
                                jid: str | None) -> None:
        gid, peer_id = key
        for action in actions:
            try:
                if isinstance(action, SendMessage):
                    self._unsent.add(key)  # until the peer took it (see reoffer)
                    if jid and self.agent.xmpp.connected:
                        await self.agent.xmpp.send_group_op(
                            f"{jid}/svpn-{peer_id}", stanzas.LinkSignal(gid, action.msg))
                        self._unsent.discard(key)
                    continue
                if gid not in self.groups:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._ready(gid).wait(), 10)
                links = self.groups.get(gid)
                if links is None:
                    continue
                elif isinstance(action, StartIce):
                    await links.start_ice(peer_id, controlling=action.role == Role.CONTROLLING,
                                          local_ufrag=action.local_ufrag,
                                          local_pwd=action.local_pwd,
                                          remote_ufrag=action.remote_ufrag,
                                          remote_pwd=action.remote_pwd,
                                          partial_checksums=CSUM_PARTIAL in action.features)
                elif isinstance(action, AddRemoteCandidates):
                    links.add_remote_candidates(peer_id, tuple(action.candidates),
                                                action.end_of_candidates)
                elif isinstance(action, StopIce):
                    if action.reason and action.reason not in ("bye", "restart"):
                        self.failures[key] = action.reason
                    await links.stop_ice(peer_id)
            except APIError as exc:
                log.debug("link signalling to %s: %s", peer_id, exc)
            except Exception:
                log.exception("link action %r for %s failed", type(action).__name__, peer_id)

    # --- the API ---------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """For ``status``: per group the data path (``offload``/``per-packet``), the UDP
        offloads in use, each peer's transport and checksums (``partial``: negotiated with
        that peer, see the module doc; else ``full``); whether the network monitor runs."""
        out: dict[str, Any] = {}
        for gid, links in self.groups.items():
            doc = self.agent.book.doc(gid) if gid in self.agent.book.groups else None
            udp = links.device.stats().get("udp", {})
            out[doc.name if doc is not None else gid] = {
                "datapath": links.datapath(),
                "udp": {"gso": bool(udp.get("gso")), "gro": bool(udp.get("gro"))},
                "transports": {p: links.peer_stats(p).get("transport") for p in links.peers()},
                "checksums": {p: links.peer_stats(p).get("checksums") or "full"
                              for p in links.peers()},
            }
        return {"enabled": self.enabled, "monitor": self.monitor is not None,
                "network_changes": self.network_changes, "groups": out}

    def peers(self) -> list[dict[str, Any]]:
        out = []
        agent = self.agent
        for gid in agent.book.groups:
            doc = agent.book.doc(gid)
            if doc.device(agent.device.id) is None:
                continue
            links = self.groups.get(gid)
            for jid, device in doc.devices():
                if device.id == agent.device.id:
                    continue
                key = (gid, device.id)
                sig = self.signals.get(key)
                stats = (links.peer_stats(device.id)
                         if links is not None and device.id in links.peers() else {})
                stats.pop("ice", None)
                out.append({
                    "group": doc.name, "jid": jid, "device": device.name, "id": device.id,
                    "ip4": device.ip4, "ip6": doc.ip6_of(device),
                    "signalling": str(sig.state) if sig is not None else "idle",
                    "failure": self.failures.get(key),
                    "endpoint": stats.get("remote_endpoint"),
                    "datapath": links.datapath() if links is not None else None,
                    "transport": stats.get("transport"),
                    "checksums": stats.get("checksums") or "full",
                    "fingerprint": fingerprint_of(base64.b64decode(device.key),
                                                  base64.b64decode(device.sign)),
                    **stats,
                })
        return out
