"""Issue 2 acceptance 5: hostile stanzas in our namespace are dropped and counted; the agent
keeps working. The attacker is a real account on the real server (RELIABILITY.md row 7)."""

from __future__ import annotations

import asyncio
import contextlib
from xml.etree import ElementTree as ET

import pytest
import slixmpp
from slixmpp.exceptions import IqError, IqTimeout

from tests.kit.agents import wait_for

pytestmark = pytest.mark.integration

NS = "urn:xmpp:socialvpn:0"


def el(tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    e = ET.Element(f"{{{NS}}}{tag}", attrs)
    e.text = text
    return e


async def _sign_in(prosody, user: str, password: str, resource: str = "probe"
                   ) -> slixmpp.ClientXMPP:
    client = slixmpp.ClientXMPP(f"{user}@{prosody.domain}/{resource}", password)
    client.ssl_context = prosody.client_context()
    client.enable_direct_tls = False
    client.auto_authorize = None
    client.auto_subscribe = False
    started = asyncio.get_running_loop().create_future()
    client.add_event_handler("session_start", lambda _e: started.done() or started.set_result(1))
    client.connect(prosody.host, prosody.port)
    await asyncio.wait_for(started, 10)
    return client


async def _iq_error(client: slixmpp.ClientXMPP, to: str, payload: ET.Element) -> str:
    iq = client.Iq()
    iq["type"] = "set"
    iq["to"] = to
    iq.append(payload)
    try:
        await iq.send(timeout=5)
    except IqError as exc:
        return str(exc.iq["error"]["condition"])
    except IqTimeout:
        return "timeout"
    return "result"


async def test_hostile_stanzas_are_dropped_and_counted(prosody_tls, agent_factory,
                                                       unique_user):
    bob = agent_factory(prosody_tls, unique_user("bob"))
    full = (await asyncio.to_thread(bob.wait_connected))["xmpp"]["jid"]
    mallory = unique_user("mallory")
    prosody_tls.register(mallory, "m-pass")
    client = await _sign_in(prosody_tls, mallory, "m-pass")
    try:
        conditions = {
            "unknown-op": await _iq_error(client, full, el("frobnicate", ver="0", sid="x")),
            "bad-version": await _iq_error(client, full, el("link", ver="99")),
            "oversize": await _iq_error(client, full, el("link", "A" * 120_000, ver="0")),
            "no-version": await _iq_error(client, full, el("hello")),
        }
        assert conditions == {"unknown-op": "feature-not-implemented",
                              "bad-version": "feature-not-implemented",
                              "oversize": "bad-request",
                              "no-version": "bad-request"}

        key = "A" * 43 + "="
        presences = [
            el("device", ver="0"),  # missing attributes
            el("device", "garbage <text> & more", ver="0", id="a" * 16, name="x", key=key,
               sign=key),
            el("device", ver="0", id="a" * 16, name="n" * 2000, key=key, sign=key),
            el("device", ver="7", id="a" * 16, name="x", key=key, sign=key),
            el("device", ver="0", id="a" * 16, name="x", key=key, sign=key),  # id ≠ key
        ]
        for payload in presences:
            pres = client.make_presence(pto=full)
            pres.append(payload)
            pres.send()
        msg = client.make_message(mto=full, mbody="hi")
        msg.append(el("device", ver="0"))
        msg.send()

        def counted() -> dict[str, int] | None:
            st = bob.status()
            dropped = (st or {}).get("counters", {}).get("stanzas_dropped", {})
            return dropped if sum(dropped.values()) >= 10 else None

        dropped = await asyncio.to_thread(wait_for, counted, 10, "drops to be counted",
                                          bob.log_tail)
        assert dropped == {"malformed": 4, "oversize": 2, "unexpected": 1, "unknown": 1,
                           "version": 2}

        # The agent keeps working: still signed in, and a real friend request gets through.
        st = bob.status()
        assert st["xmpp"]["state"] == "connected"
        client.send_presence_subscription(pto=bob.jid, ptype="subscribe")
        reqs = await asyncio.to_thread(
            wait_for, lambda: bob.json("requests")["friends"], 10, "mallory's request")
        assert [r["jid"] for r in reqs] == [f"{mallory}@{prosody_tls.domain}"]
        assert "Traceback" not in bob.log_text()
        # Logging of drops is rate limited: one line per reason, not one per stanza.
        assert bob.log_text().count("dropped a stanza") <= 5
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(wait=1), 3)
