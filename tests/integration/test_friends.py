"""Issue 2 acceptance 1 and 7: sign in over verified TLS, become friends, files stay private."""

from __future__ import annotations

import os
import stat

import pytest

from tests.kit.agents import befriend, wait_for

pytestmark = pytest.mark.integration


def _friend(agent, jid):
    return next((f for f in agent.json("friends") if f["jid"] == jid), None)


def _mutual(agent, other) -> bool:
    """``agent`` lists ``other`` as a friend with subscription both and its device id."""
    f = _friend(agent, other.jid)
    dev = other.status()["device"]["id"]
    return bool(f and f["subscription"] == "both" and any(d["id"] == dev for d in f["devices"]))


def test_friend_request_accepted_over_tls(prosody_tls, agent_factory, unique_user):
    alice = agent_factory(prosody_tls, unique_user("alice"))
    bob = agent_factory(prosody_tls, unique_user("bob"))
    st = alice.wait_connected()
    assert st["xmpp"]["tls"].startswith("TLSv1.")
    assert st["xmpp"]["jid"] == f"{alice.jid}/svpn-{st['device']['id']}"
    bob.wait_connected()

    out = alice.json("friend", "add", bob.jid)
    assert out["result"] == "request sent"
    reqs = wait_for(lambda: (r := bob.json("requests"))["friends"] and r, 10,
                    "bob to see alice's request", bob.log_tail)
    assert [r["jid"] for r in reqs["friends"]] == [alice.jid]
    # Nothing is auto-accepted: alice is not bob's friend until bob decides.
    assert _friend(bob, alice.jid) is None or _friend(bob, alice.jid)["subscription"] != "both"

    assert bob.json("accept", alice.jid)["result"] == "accepted"
    wait_for(lambda: _mutual(alice, bob) and _mutual(bob, alice), 10,
             "both to list each other with subscription both and device ids",
             lambda: alice.log_tail() + "\n" + bob.log_tail())
    assert bob.json("requests")["friends"] == []
    human = alice.cli("friends").stdout
    assert bob.jid in human and "both" in human


def test_reject_and_remove(prosody_tls, agent_factory, unique_user):
    carol = agent_factory(prosody_tls, unique_user("carol"))
    dave = agent_factory(prosody_tls, unique_user("dave"))
    carol.wait_connected()
    dave.wait_connected()
    carol.json("friend", "add", dave.jid)
    wait_for(lambda: dave.json("requests")["friends"], 10, "dave to see the request")
    assert dave.json("reject", carol.jid)["result"] == "rejected"
    wait_for(lambda: (f := _friend(carol, dave.jid)) is None
             or (f["subscription"] == "none" and not f["request_sent"]), 10,
             "carol to see the rejection")
    assert dave.json("requests")["friends"] == []
    # Deciding twice is a clear error, not a crash.
    again = dave.cli("accept", carol.jid, check=False)
    assert again.returncode == 1 and "no pending friend request" in again.stderr

    # Become friends, then remove: both sides drop to "none"/gone.
    befriend(carol, dave)
    assert carol.json("friend", "remove", dave.jid)["result"] == "removed"
    wait_for(lambda: _friend(carol, dave.jid) is None, 10, "carol's roster to drop dave")
    wait_for(lambda: (f := _friend(dave, carol.jid)) is None or f["subscription"] == "none",
             10, "dave to see the removal")


def test_files_are_private_and_restart_keeps_device_id(prosody_tls, agent_factory,
                                                       unique_user):
    erin = agent_factory(prosody_tls, unique_user("erin"))
    first = erin.wait_connected()["device"]
    assert stat.S_IMODE(os.stat(erin.config).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(erin.state_dir).st_mode) == 0o700
    for path in erin.state_dir.iterdir():
        mode = stat.S_IMODE(os.lstat(path).st_mode)
        assert mode & 0o077 == 0, f"{path} has mode {mode:o}"
    assert stat.S_IMODE(os.stat(erin.state_dir / "api.sock").st_mode) == 0o600

    assert erin.stop() == 0
    assert not (erin.state_dir / "api.sock").exists()
    erin.start()
    again = erin.wait_connected()["device"]
    assert again["id"] == first["id"] and again["fingerprint"] == first["fingerprint"]
    # A second agent on the same state directory is refused, clearly.
    twin = erin.cli("up", check=False, timeout=20)
    assert twin.returncode != 0 and "another SocialVPN agent" in twin.stderr
