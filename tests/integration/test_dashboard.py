"""Issue 5 acceptance against real agents, a real Prosody and coturn, in Debian's Chromium.

alice (no NAT) and bob (home-router NAT) run `socialvpn up` in their own namespaces on the
kit's small internet. alice's dashboard listens on 127.0.0.1:7387 inside her namespace; a TCP
forwarder (tests/kit/browser.py) makes it reachable from the root namespace on another port,
where headless Chromium (Playwright, /usr/bin/chromium) opens the URL `socialvpn dashboard`
printed. In the browser alice accepts bob's friend request, creates a group and invites bob;
bob accepts through the CLI; the peer row appears and its counters move while bob pings —
without a reload. Then: keyboard reachability, labels, screenshots at 390 and 1280 px
(test-artifacts/dashboard/ or $SOCIALVPN_ARTIFACTS), /metrics, and the security acceptance:
no data without the token; cross-origin POST, rebinding Host and CSRF-less POST get 403 and
change nothing; the session cookie without its origin key (what another local user's server
on another port of 127.0.0.1 receives from the browser) gets 401 and changes nothing, and a
second browser context given only the first one's cookies sees the login page, no data.
"""

from __future__ import annotations

import http.client
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from socialvpn.web.dashboard import KEY_HEADER
from tests.kit.agents import AgentProc, wait_for
from tests.kit.browser import Forwarder, artifacts_dir, browser_unavailable_reason, launch
from tests.kit.env import integration_required
from tests.kit.internet import Internet
from tests.kit.netns import NetLab

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

INTERACTIVE = ('a[href], button, input, select, textarea, '
               '[tabindex]:not([tabindex="-1"])')


@pytest.fixture(autouse=True)
def _need_browser() -> None:
    reason = browser_unavailable_reason()
    if reason is not None:
        if integration_required():
            pytest.fail(f"the browser is required here but unavailable: {reason}")
        pytest.skip(reason)


WIDE = """(w) => [...document.querySelectorAll('body *')]
    .filter((e) => e.getBoundingClientRect().right > w + 1).slice(0, 5)
    .map((e) => e.tagName + '.' + e.className + ': ' + e.textContent.slice(0, 60))"""


def _login_path(agent: AgentProc) -> str:
    url = agent.cli("dashboard").stdout.strip()
    parts = urlsplit(url)
    assert parts.scheme == "http" and parts.hostname == "127.0.0.1" and parts.port == 7387, url
    return f"{parts.path}?{parts.query}"


def _raw(fwd: Forwarder, method: str, path: str, headers: dict[str, str] | None = None,
         body: Any = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", fwd.port, timeout=15)
    try:
        h = {"Host": f"127.0.0.1:{fwd.port}", **(headers or {})}
        data = json.dumps(body).encode() if body is not None else None
        if data is not None:
            h["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=h)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def _session(fwd: Forwarder, agent: AgentProc) -> tuple[str, str, str]:
    """A session from a fresh login URL, like a browser: (Cookie header, origin key from the
    redirect's fragment, CSRF token)."""
    status, headers, _ = _raw(fwd, "GET", _login_path(agent))
    assert status == 303, status
    assert headers["location"].startswith("/#key="), headers["location"]
    key = headers["location"].split("=", 1)[1]
    cookie = headers["set-cookie"].split(";", 1)[0]
    status, _, body = _raw(fwd, "GET", "/api/v1/session", {"Cookie": cookie, KEY_HEADER: key})
    assert status == 200
    return cookie, key, json.loads(body)["result"]["csrf"]


def _keyboard_walk(page: Any, limit: int = 120) -> None:
    """Tab through the page: every visible control is reached, each with a visible focus.
    Controls are known by what they are (id, label, text), not by a mark on the element: the
    live page may redraw a row (and its buttons) between two presses."""
    key_of = """(e) => [e.tagName, e.id, e.getAttribute('aria-label') || '', e.name || '',
        e.getAttribute('href') || '', (e.textContent || '').trim().slice(0, 40)].join('|')"""
    keys = page.evaluate(f"""(sel) => {{ const key = {key_of};
        return [...document.querySelectorAll(sel)].filter((e) => e.getClientRects().length
            && getComputedStyle(e).visibility !== 'hidden' && !e.closest('[hidden]'))
            .map(key); }}""", INTERACTIVE)
    count = len(set(keys))
    assert count > 5
    page.locator("body").focus()
    reached: set[str] = set()
    for _ in range(limit):
        page.keyboard.press("Tab")
        info = page.evaluate(f"""(sel) => {{ const e = document.activeElement;
            const s = getComputedStyle(e);
            return [e.matches(sel) ? ({key_of})(e) : null, e.matches(':focus-visible'),
                    s.outlineStyle,
                    e.tagName + ' ' + (e.id || e.textContent.trim().slice(0, 30))]; }}""",
            INTERACTIVE)
        key, visible, outline, what = info
        if key is not None and key in keys:
            assert visible and outline != "none", f"no visible focus on {what}"
            reached.add(key)
        if len(reached) == count:
            break
    assert len(reached) == count, f"reached {len(reached)} of {count} controls by Tab"


def _labels_everywhere(page: Any) -> None:
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
        .filter((e) => e.type !== 'hidden' && !(e.labels && e.labels.length))
        .map((e) => e.outerHTML)""")
    assert unlabelled == []


def _cookie_alone_sees_nothing(browser: Any, ctx: Any, fwd: Forwarder,
                               alice: AgentProc) -> None:
    """A second browser context given only the first one's cookies (what another local
    user's server on another port gets): the page sends it to the login page, the API
    answers 401, and the first context's session keeps working."""
    from playwright.sync_api import expect

    thief = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        thief.add_cookies(ctx.cookies())
        assert any(c["name"].startswith("svpn_session") for c in thief.cookies())
        page = thief.new_page()
        page.set_default_timeout(20_000)
        page.goto(fwd.base + "/")
        page.wait_for_url(re.compile(r"/login\?again$"))
        expect(page.locator("main")).to_contain_text("socialvpn dashboard")
        expect(page.locator("main")).to_contain_text("not logged in")
        assert "alice-laptop" not in page.content() and alice.jid not in page.content()
        found = page.evaluate("""async () => {
            const out = {};
            for (const p of ["/api/v1/status", "/api/v1/peers", "/api/v1/session", "/metrics"]) {
                const r = await fetch(p, { credentials: "same-origin" });
                out[p] = [r.status, await r.text()];
            }
            return out; }""")
        for path, (status, text) in found.items():
            assert status == 401 and "alice-laptop" not in text, (path, status, text[:200])
        r = thief.request.get(fwd.base + "/api/v1/friends")
        assert r.status == 401
    finally:
        thief.close()
    assert ctx.pages[0].evaluate("() => fetch('/api/v1/status', { headers: { 'X-SVPN-Key': "
                                 "localStorage.getItem('svpn-key') } }).then((r) => r.status)"
                                 ) == 200


def test_dashboard_end_to_end(netns_factory: NetLab, test_ca, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    shots = artifacts_dir("dashboard")
    with Internet(netns_factory, tmp_path, test_ca) as net:
        alice = net.agent("alice", net.site("alice"), device_name="alice-laptop")
        bob = net.agent("bob", net.site("bob", "eim"), device_name="bob-pc")
        for agent in (alice, bob):
            agent.wait_connected(timeout=20)
        bob.json("friend", "add", alice.jid)
        wait_for(lambda: any(r["jid"] == bob.jid for r in alice.json("requests")["friends"]),
                 15, "alice to get bob's friend request", alice.log_tail)
        groups_before = alice.json("groups")

        with Forwarder(alice.netns or "") as fwd, sync_playwright() as pw:
            # --- security acceptance first, against the real agent -------------------------
            status, headers, body = _raw(fwd, "GET", "/")
            assert status == 303 and headers["location"] == "/login"
            status, _, body = _raw(fwd, "GET", "/login")
            assert status == 200 and b"socialvpn dashboard" in body and b"bob" not in body
            for path in ("/api/v1/status", "/api/v1/requests", "/api/v1/peers", "/metrics"):
                status, _, body = _raw(fwd, "GET", path)
                assert status == 401 and b"bob" not in body and b"alice" not in body, path
            cookie, key, csrf = _session(fwd, alice)
            auth = {"Cookie": cookie, KEY_HEADER: key}
            create = {"op": "create", "name": "evil"}
            own = f"http://127.0.0.1:{fwd.port}"
            attempts = {
                "cross-origin": ({**auth, "X-CSRF-Token": csrf,
                                  "Origin": "http://evil.example"}, None, 403),
                "rebinding Host": ({**auth, "X-CSRF-Token": csrf,
                                    "Origin": "http://evil.example:7387"},
                                   "evil.example:7387", 403),
                "no CSRF": ({**auth, "Origin": own}, None, 403),
                "wrong CSRF": ({**auth, "Origin": own, "X-CSRF-Token": "x"}, None, 403),
                "cookie without key": ({"Cookie": cookie, "Origin": own,
                                        "X-CSRF-Token": csrf}, None, 401),
                "another session's key": ({"Cookie": cookie, "Origin": own,
                                           "X-CSRF-Token": csrf,
                                           KEY_HEADER: _session(fwd, alice)[1]}, None, 401),
            }
            for what, (h, host, refused) in attempts.items():
                if host:
                    h = {**h, "Host": host}
                status, _, body = _raw(fwd, "POST", "/api/v1/groups", h, create)
                assert status == refused, f"{what}: {status} {body!r}"
                status, _, body = _raw(fwd, "POST", "/api/v1/requests", h,
                                       {"op": "reject", "jid": bob.jid})
                assert status == refused, f"{what}: {status} {body!r}"
            # the cookie alone (another port's server gets it from the browser): no data
            for path in ("/api/v1/status", "/api/v1/requests", "/api/v1/peers",
                         "/api/v1/session", "/metrics"):
                status, _, body = _raw(fwd, "GET", path, {"Cookie": cookie})
                assert status == 401 and b"bob" not in body and csrf.encode() not in body, path
            status, _, body = _raw(fwd, "GET", "/", {"Cookie": cookie})
            assert status == 200 and csrf.encode() not in body and key.encode() not in body
            status, _, body = _raw(fwd, "GET", "/api/v1/status", auth)
            assert status == 200 and alice.jid.encode() in body
            status, _, body = _raw(fwd, "GET", "/api/v1/status",
                                   {**auth, "Host": "evil.example:7387"})
            assert status == 403 and b"alice" not in body
            assert alice.json("groups") == groups_before  # nothing changed
            assert any(r["jid"] == bob.jid for r in alice.json("requests")["friends"])

            # --- the browser ---------------------------------------------------------------
            browser = launch(pw)
            try:
                ctx = browser.new_context(viewport={"width": 1280, "height": 900})
                page = ctx.new_page()
                page.set_default_timeout(20_000)
                documents: list[str] = []
                errors: list[str] = []
                page.on("request", lambda r: r.resource_type == "document"
                        and documents.append(r.url))
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.on("console", lambda m: m.type == "error" and errors.append(m.text))
                page.goto(fwd.base + _login_path(alice))
                expect(page.locator("#conn")).to_contain_text("connected")
                expect(page.locator("#ov-device")).to_contain_text("alice-laptop")
                assert "key" not in page.url and urlsplit(page.url).fragment == "", page.url
                _cookie_alone_sees_nothing(browser, ctx, fwd, alice)
                page.screenshot(path=str(shots / "overview-1280.png"), full_page=True)

                # bob's pending friend request: accept it with a click
                page.get_by_role("link", name="Friends").click()
                row = page.locator(f'[data-request="{bob.jid}"]')
                expect(row).to_contain_text("friend request")
                page.screenshot(path=str(shots / "friends-request-1280.png"), full_page=True)
                row.get_by_role("button", name="Accept").click()
                expect(row).to_have_count(0)
                friend = page.locator(f'[data-friend="{bob.jid}"]')
                expect(friend).to_contain_text("both", timeout=20_000)
                expect(friend).to_contain_text("bob-pc", timeout=20_000)

                # create a group and invite bob
                page.get_by_role("link", name="Groups").click()
                page.get_by_label("Group name", exact=True).fill("lab")
                page.get_by_label("IPv4 subnet (optional)").fill("10.77.0.0/24")
                page.get_by_role("button", name="Create group").click()
                card = page.locator('[data-group="lab"]')
                expect(card).to_contain_text("owner")
                expect(card).to_contain_text("10.77.0.1")
                card.get_by_label("Invite a friend to lab").fill(bob.jid)
                card.get_by_role("button", name="Invite").click()
                expect(page.locator("#flash")).to_contain_text("invitation sent")

                # bob accepts through the CLI
                wait_for(lambda: any(i["jid"] == alice.jid
                                     for i in bob.json("requests")["invitations"]),
                         15, "bob's invitation", bob.log_tail)
                bob.json("accept", alice.jid, "--group", "lab")
                expect(card.locator(f'[data-member="{bob.jid}/bob-pc"]')).to_have_count(
                    1, timeout=20_000)
                page.screenshot(path=str(shots / "groups-1280.png"), full_page=True)

                # the peer row appears and its counters change, live
                page.get_by_role("link", name="Peers").click()
                peer = page.locator('[data-peer="bob-pc"]')
                expect(peer.locator('[data-field="state"]')).to_have_text("up", timeout=60_000)
                expect(peer.locator('[data-field="path"]')).to_contain_text("direct")
                rx = peer.locator('[data-field="rx"]')
                before = int(rx.get_attribute("data-value") or "0")
                loads = len(documents)
                ping = bob.cli("ping", "10.77.0.1", "-c", "5", check=False, timeout=40)
                assert ping.returncode == 0, ping.stdout + ping.stderr
                expect(rx).not_to_have_attribute("data-value", str(before), timeout=10_000)
                after = int(rx.get_attribute("data-value") or "0")
                assert after > before
                assert len(documents) == loads, "the page reloaded"
                assert peer.locator('[data-field="rtt"]').inner_text().endswith("ms")
                fp = bob.status()["device"]["fingerprint"]  # type: ignore[index]
                expect(peer.locator('[data-field="fingerprint"]')).to_have_text(fp)
                page.screenshot(path=str(shots / "peers-1280.png"), full_page=True)

                # keyboard and labels, on every page
                for name in ("overview", "friends", "groups", "peers", "events"):
                    page.locator(f'[data-nav="{name}"]').focus()
                    page.keyboard.press("Enter")
                    expect(page.locator(f"#page-{name}")).to_be_visible()
                    _keyboard_walk(page)
                    _labels_everywhere(page)
                page.screenshot(path=str(shots / "events-1280.png"), full_page=True)

                # narrow: 390 px, same session
                narrow = ctx.new_page()
                narrow.set_viewport_size({"width": 390, "height": 844})
                for name in ("overview", "friends", "groups", "peers"):
                    narrow.goto(f"{fwd.base}/#{name}")
                    expect(narrow.locator(f"#page-{name}")).to_be_visible()
                    if name == "peers":
                        expect(narrow.locator('[data-peer="bob-pc"]')).to_be_visible()
                    narrow.screenshot(path=str(shots / f"{name}-390.png"), full_page=True)
                    width = narrow.evaluate("() => document.documentElement.scrollWidth")
                    assert width <= 390, f"{name} is {width} px wide at 390 px: " + repr(
                        narrow.evaluate(WIDE, 390))
                assert errors == [], errors
            finally:
                browser.close()

            # /metrics for a scraper: the bearer token file, per-peer traffic by path
            from prometheus_client.parser import text_string_to_metric_families

            token = (alice.state_dir / "metrics.token").read_text().strip()
            status, _, body = _raw(fwd, "GET", "/metrics", {"Authorization": f"Bearer {token}"})
            assert status == 200
            samples = [s for f in text_string_to_metric_families(body.decode())
                       for s in f.samples if s.name == "socialvpn_peer_rx_bytes_total"]
            assert any(s.labels["device"] == "bob-pc" and s.labels["path"] == "direct"
                       and s.labels["jid"] == bob.jid and s.value > 0 for s in samples)
        assert "evil" not in {g["name"] for g in alice.json("groups")}
