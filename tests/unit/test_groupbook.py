"""groups.json: round trip, 0600, corrupt files reported (never silently reset)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from socialvpn import groups
from socialvpn.errors import StateError
from socialvpn.groupbook import GroupBook
from socialvpn.keys import DeviceKeys, b64
from socialvpn.state import GROUPS_FILE, StateDir
from socialvpn.xmpp.stanzas import DeviceInfo

pytestmark = pytest.mark.unit


def _state(tmp_path: Path) -> StateDir:
    state = StateDir(tmp_path / "state")
    state.ensure()
    return state


def test_round_trip_and_mode(tmp_path: Path) -> None:
    keys = DeviceKeys.generate()
    me = DeviceInfo(keys.device_id, "laptop", b64(keys.x25519_public), b64(keys.ed25519_public))
    doc = groups.create_group(name="lab", owner_jid="alice@svpn.test", owner=me, rng=os.urandom)
    state = _state(tmp_path)
    book = GroupBook(state)
    book.groups[doc.gid] = (me.sign, groups.sign(doc, keys.sign))
    book.joins.append({"jid": "bob@svpn.test", "group": "lab", "gid": doc.gid,
                       "device": me.to_json(), "received_at": 1.0})
    book.save()
    assert stat.S_IMODE((state.path / GROUPS_FILE).stat().st_mode) == 0o600
    again = GroupBook(state)
    assert again.doc(doc.gid) == doc and again.by_name("lab") == doc.gid
    assert again.joins == book.joins and again.docs() == [doc]


@pytest.mark.parametrize("content", [b"not json", b'{"version": 2}', b"[]",
                                     b'{"version": 1, "groups": {"x": {"pin": "a"}}}',
                                     b'{"version": 1, "groups": {"x": {"pin": "a", "doc": "!!"}}}'])
def test_corrupt_file_is_reported(tmp_path: Path, content: bytes) -> None:
    state = _state(tmp_path)
    (state.path / GROUPS_FILE).write_bytes(content)
    with pytest.raises(StateError) as err:
        GroupBook(state)
    assert GROUPS_FILE in str(err.value)
