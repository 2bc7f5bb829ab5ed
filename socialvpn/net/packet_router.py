"""Cryptokey routing: which peer an inner packet goes to, and whether a peer may send it.

Like WireGuard's allowed-ips: every peer owns a set of IPv4/IPv6 prefixes, a prefix belongs to
at most one peer (assigning it to another moves it), an outgoing packet goes to the peer owning
the longest prefix that contains its destination, and a packet received from a peer is accepted
only if the longest-prefix owner of its *source* is that same peer.

Pure and lean: no I/O imports; ``ipaddress`` is used only when prefixes are set, never per
packet. The per-packet functions read the version nibble, slice the address out of the header,
turn it into an ``int`` and do dict lookups: first a dict of host routes (/32, /128), then one
dict per prefix length in use, longest first. Tables are rebuilt on every change (rare) and
swapped in with one assignment, so the packet threads always see a consistent snapshot without
locks.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

P = TypeVar("P", bound=Hashable)

_Buffer = bytes | bytearray | memoryview
_Key = tuple[int, int, int]  # (ip version, network as int, prefix length)
# (host routes by address, ((mask, routes by masked address), ...) longest prefix first)
_Table = tuple[dict[int, P], tuple[tuple[int, dict[int, P]], ...]]

IPV4_HEADER_MIN = 20
IPV6_HEADER_MIN = 40


class PacketRouter(Generic[P]):
    """Allowed-prefix table mapping inner addresses to peers (any hashable object).

    Mutations (:meth:`set_allowed`, :meth:`remove`) may come from the control-plane thread
    while packet threads call the lookups.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # serialises writers; readers never take it
        self._owner: dict[_Key, P] = {}
        self._by_peer: dict[P, set[_Key]] = {}
        self._v4: _Table[P] = ({}, ())
        self._v6: _Table[P] = ({}, ())

    # --- control plane ----------------------------------------------------------------------

    def set_allowed(self, peer: P, prefixes: Iterable[str]) -> None:
        """Make ``prefixes`` (and only those) the allowed prefixes of ``peer``.

        Prefixes are CIDR strings with the host bits clear (a bare address means /32 or
        /128). A prefix another peer owned moves to ``peer``. Raises ``ValueError`` naming a
        bad prefix, before changing anything.
        """
        if isinstance(prefixes, str):
            raise TypeError("prefixes must be an iterable of strings, not one string")
        keys = {_parse(p) for p in prefixes}
        with self._lock:
            for key in self._by_peer.pop(peer, set()):
                del self._owner[key]
            for key in keys:
                previous = self._owner.get(key)
                if previous is not None:
                    owned = self._by_peer[previous]
                    owned.discard(key)
                    if not owned:
                        del self._by_peer[previous]
                self._owner[key] = peer
            if keys:
                self._by_peer[peer] = keys
            self._rebuild()

    def remove(self, peer: P) -> None:
        """Forget ``peer`` and all its prefixes (no error if unknown)."""
        with self._lock:
            keys = self._by_peer.pop(peer, None)
            if not keys:
                return
            for key in keys:
                del self._owner[key]
            self._rebuild()

    def prefixes(self, peer: P) -> list[str]:
        """The prefixes ``peer`` owns, IPv4 first, sorted."""
        return [_format(k) for k in sorted(self._by_peer.get(peer, ()))]

    def peers(self) -> list[P]:
        """Peers that own at least one prefix."""
        return list(self._by_peer)

    def __len__(self) -> int:
        return len(self._owner)

    def _rebuild(self) -> None:
        self._v4 = _build(self._owner, 4, 32)
        self._v6 = _build(self._owner, 6, 128)

    # --- packet path ------------------------------------------------------------------------

    def peer_for_destination(self, packet: _Buffer) -> P | None:
        """The peer owning the packet's destination address, or None (also for non-IP)."""
        if len(packet) < IPV4_HEADER_MIN:
            return None
        version = packet[0] >> 4
        if version == 4:
            hosts, walk = self._v4
            address = int.from_bytes(packet[16:20], "big")
        elif version == 6:
            if len(packet) < IPV6_HEADER_MIN:
                return None
            hosts, walk = self._v6
            address = int.from_bytes(packet[24:40], "big")
        else:
            return None
        peer = hosts.get(address)
        if peer is not None:
            return peer
        for mask, routes in walk:
            peer = routes.get(address & mask)
            if peer is not None:
                return peer
        return None

    def source_allowed(self, peer: P, packet: _Buffer) -> bool:
        """True if ``peer`` owns the longest prefix containing the packet's source address.

        (WireGuard's rule: a source inside one of the peer's prefixes but inside a longer
        prefix of another peer is refused too, since replies would go to that other peer.)
        """
        if len(packet) < IPV4_HEADER_MIN:
            return False
        version = packet[0] >> 4
        if version == 4:
            hosts, walk = self._v4
            address = int.from_bytes(packet[12:16], "big")
        elif version == 6:
            if len(packet) < IPV6_HEADER_MIN:
                return False
            hosts, walk = self._v6
            address = int.from_bytes(packet[8:24], "big")
        else:
            return False
        owner = hosts.get(address)
        if owner is None:
            for mask, routes in walk:
                owner = routes.get(address & mask)
                if owner is not None:
                    break
            else:
                return False
        return owner is peer or owner == peer


def _parse(text: str) -> _Key:
    if not isinstance(text, str):
        raise ValueError(f"allowed prefix {text!r} must be a string like 10.77.0.5/32")
    try:
        net = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"bad allowed prefix {text!r}: {exc}") from None
    return (net.version, int(net.network_address), net.prefixlen)


def _format(key: _Key) -> str:
    version, value, plen = key
    address = ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)
    return f"{address}/{plen}"


def _build(owner: dict[_Key, P], version: int, bits: int) -> _Table[P]:
    hosts: dict[int, P] = {}
    by_len: dict[int, dict[int, P]] = {}
    for (v, value, plen), peer in owner.items():
        if v != version:
            continue
        if plen == bits:
            hosts[value] = peer
        else:
            by_len.setdefault(plen, {})[value] = peer
    full = (1 << bits) - 1
    walk = tuple(
        (full ^ ((1 << (bits - plen)) - 1), by_len[plen])
        for plen in sorted(by_len, reverse=True)
    )
    return hosts, walk
