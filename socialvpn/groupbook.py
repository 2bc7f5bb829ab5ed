"""This device's groups as kept on disk: signed documents with their pinned owner keys, and
the requests and invitations in flight (``groups.json`` in the state directory, 0600)."""

from __future__ import annotations

import base64
from typing import Any

from . import groups
from .errors import ProtocolError, StateError
from .state import GROUPS_FILE, StateDir


class GroupBook:
    """This device's groups: signed documents with pinned owner keys, the join requests and
    invitations waiting for the person, and the joins we asked for. Persisted in
    ``groups.json`` (0600); every change is written before it is acted on."""

    def __init__(self, state: StateDir) -> None:
        self.state = state
        data = state.read_json(GROUPS_FILE, {"version": 1})
        if not isinstance(data, dict) or data.get("version") != 1:
            raise StateError(f"{state.path / GROUPS_FILE}: corrupt (unknown format)")
        try:
            self.groups: dict[str, tuple[str, groups.SignedDocument]] = {
                gid: (g["pin"], groups.SignedDocument.from_wire(base64.b64decode(g["doc"])))
                for gid, g in data.get("groups", {}).items()
            }
        except (KeyError, TypeError, ValueError, ProtocolError) as exc:
            raise StateError(f"{state.path / GROUPS_FILE}: corrupt group: {exc}") from None
        self.joins: list[dict[str, Any]] = list(data.get("joins", []))
        self.invitations: list[dict[str, Any]] = list(data.get("invitations", []))
        self.asked: list[dict[str, Any]] = list(data.get("asked", []))  # joins we sent
        self.invited: list[dict[str, Any]] = list(data.get("invited", []))  # invites we sent

    def save(self) -> None:
        self.state.write_json(GROUPS_FILE, {
            "version": 1,
            "groups": {gid: {"pin": pin, "doc": base64.b64encode(s.to_wire()).decode()}
                       for gid, (pin, s) in sorted(self.groups.items())},
            "joins": self.joins, "invitations": self.invitations,
            "asked": self.asked, "invited": self.invited,
        })

    def doc(self, gid: str) -> groups.MembershipDocument:
        return self.groups[gid][1].doc

    def by_name(self, name: str) -> str | None:
        for gid, (_, signed) in self.groups.items():
            if signed.doc.name == name:
                return gid
        return None

    def docs(self) -> list[groups.MembershipDocument]:
        return [s.doc for _, s in self.groups.values()]
