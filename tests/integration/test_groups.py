"""Issue 4, the control plane with real parts: a group formed through the real CLI flow over a
real Prosody — create, join + accept, invite + accept, signed documents pushed to members,
removal, persistence across an owner restart, and hostile documents refused."""

from __future__ import annotations

import asyncio
import base64

import pytest

from tests.kit.agents import befriend, wait_for

pytestmark = pytest.mark.integration


def _group(agent, name="lab"):
    return next((g for g in agent.json("groups") if g["name"] == name), None)


def test_group_flow_create_join_invite_remove(prosody_tls, agent_factory, unique_user):
    alice = agent_factory(prosody_tls, unique_user("alice"))
    bob = agent_factory(prosody_tls, unique_user("bob"))
    carol = agent_factory(prosody_tls, unique_user("carol"))
    for a in (alice, bob, carol):
        a.wait_connected()
    befriend(alice, bob)
    befriend(alice, carol)

    made = alice.json("group", "create", "lab", "--subnet", "10.77.0.0/24")
    assert made["ip4"] == "10.77.0.1" and made["role"] == "owner" and made["epoch"] == 1
    assert made["prefix6"].startswith("fd") and made["prefix6"].endswith("::/64")

    # bob asks; nothing happens until alice decides.
    bob.json("group", "join", alice.jid, "lab")
    wait_for(lambda: alice.json("requests")["joins"], 10, "alice to see bob's join request",
             alice.log_tail)
    assert _group(bob) is None
    alice.json("accept", bob.jid, "--group", "lab")
    g = wait_for(lambda: _group(bob), 10, "bob to be in lab", bob.log_tail)
    assert g["ip4"] == "10.77.0.2" and g["role"] == "member" and g["epoch"] == 2
    assert g["owner_key_fingerprint"] == made["owner_key_fingerprint"]

    # alice invites carol; carol decides.
    alice.json("group", "invite", "lab", carol.jid)
    inv = wait_for(lambda: carol.json("requests")["invitations"], 10, "carol's invitation")
    assert inv[0]["group"] == "lab" and inv[0]["owner_key_fingerprint"] == (
        made["owner_key_fingerprint"])
    carol.json("accept", alice.jid, "--group", "lab")
    g = wait_for(lambda: _group(carol), 10, "carol to be in lab", carol.log_tail)
    assert g["ip4"] == "10.77.0.3"
    # bob got the new document too (pushed by the owner).
    wait_for(lambda: (g := _group(bob)) and g["epoch"] == 3, 10, "bob to see epoch 3")
    show = bob.json("group", "show", "lab")
    assert sorted(m["jid"] for m in show["member_list"]) == sorted(
        [alice.jid, bob.jid, carol.jid])
    ips = {d["ip4"] for m in show["member_list"] for d in m["devices"]}
    assert ips == {"10.77.0.1", "10.77.0.2", "10.77.0.3"}

    # alice removes carol: carol learns it, bob sees epoch 4 without carol.
    out = alice.json("group", "remove", "lab", carol.jid)
    assert out["epoch"] == 4
    wait_for(lambda: _group(carol) is None, 10, "carol to be out", carol.log_tail)
    wait_for(lambda: (g := _group(bob)) and g["epoch"] == 4, 10, "bob to see epoch 4")
    assert carol.json("group", "join", alice.jid, "lab")["result"].startswith("request sent")
    wait_for(lambda: alice.json("requests")["joins"], 10, "carol's new request")
    assert _group(carol) is None  # back in only with a new acceptance

    # The owner restarts: the group, its epoch and addresses survive.
    alice.stop()
    alice.start()
    alice.wait_connected()
    g = _group(alice)
    assert g["epoch"] == 4 and g["ip4"] == "10.77.0.1"
    assert alice.json("requests")["joins"][0]["jid"] == carol.jid


async def test_forged_documents_are_refused(prosody_tls, agent_factory, unique_user):
    import slixmpp

    from socialvpn.keys import DeviceKeys, b64
    from socialvpn.xmpp import stanzas
    from tests.integration.test_hostile import _iq_error, _sign_in, el

    alice = agent_factory(prosody_tls, unique_user("alice"))
    bob = agent_factory(prosody_tls, unique_user("bob"))
    await asyncio.to_thread(alice.wait_connected)
    await asyncio.to_thread(bob.wait_connected)
    await asyncio.to_thread(befriend, alice, bob)
    await asyncio.to_thread(alice.json, "group", "create", "lab")
    await asyncio.to_thread(bob.json, "group", "join", alice.jid, "lab")
    await asyncio.to_thread(wait_for, lambda: alice.json("requests")["joins"], 10, "request")
    await asyncio.to_thread(alice.json, "accept", bob.jid, "--group", "lab")
    g = await asyncio.to_thread(wait_for, lambda: _group(bob), 10, "bob in lab")
    bob_full = bob.status()["xmpp"]["jid"]
    alice_full = alice.status()["xmpp"]["jid"]
    mallory = unique_user("mallory")
    prosody_tls.register(mallory, "m-pass")
    keys = DeviceKeys.generate()
    device = stanzas.DeviceInfo(keys.device_id, "evil", b64(keys.x25519_public),
                                b64(keys.ed25519_public))
    client: slixmpp.ClientXMPP = await _sign_in(prosody_tls, mallory, "m-pass",
                                                resource=f"svpn-{keys.device_id}")
    try:
        # A stranger's join request is not refused outright: it waits for alice's decision.
        iq_type, payload = stanzas.make_group_op(stanzas.JoinRequest("lab", "", device))
        assert await _iq_error(client, alice_full, payload) == "result"
        joins = await asyncio.to_thread(wait_for, lambda: alice.json("requests")["joins"], 10,
                                        "mallory's request")
        assert joins[0]["jid"].startswith(mallory) and _group(alice)["devices"] == 2

        # Link signalling from a device that shares no group: refused, counted, no ICE.
        offer = stanzas.LinkMessage(kind=stanzas.Kind.OFFER, sid="0123456789abcdef", seq=0,
                                    ufrag="abcd", pwd="p" * 22)
        _, payload = stanzas.make_group_op(stanzas.LinkSignal(g["gid"], offer))
        assert await _iq_error(client, bob_full, payload) == "forbidden"
        dropped = await asyncio.to_thread(
            wait_for, lambda: bob.status()["counters"]["stanzas_dropped"].get("not-member"), 10,
            "the refused offer to be counted")
        assert dropped == 1

        def push(text: str):
            return el("membership", text, ver="0")
        # Garbage, a well-formed but unsigned document, and an unsolicited group.
        assert await _iq_error(client, bob_full, push("!!!")) == "bad-request"
        fake = base64.b64encode(b'{"doc":{},"sig":"AAAA"}').decode()
        assert await _iq_error(client, bob_full, push(fake)) in ("bad-request", "not-acceptable")
        st = bob.status()
        dropped = st["counters"]["stanzas_dropped"]
        assert sum(dropped.values()) >= 2
        again = _group(bob)
        assert again["epoch"] == g["epoch"]  # nothing changed
    finally:
        await asyncio.wait_for(client.disconnect(wait=1), 3)
