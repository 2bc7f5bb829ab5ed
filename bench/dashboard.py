"""Dashboard page weight and time to first render of the peers page with 50 peers (issue 5).

The real web app (APIServer) with a fake agent serving 50 peers (fake data for this
measurement only), Debian's Chromium headless via Playwright, a fresh browser context (empty
cache) per run. Page weight: bytes of every static asset and first API payload the page loads,
plus the first events of the live stream. Time to first render: from navigation start to the
peers table drawn (the page's ``performance.mark("svpn:peers")``), with first contentful paint
and DOMContentLoaded for context; median of ``--runs``. Prints a markdown table; ``--out FILE``
also writes it.
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.common import emit
from socialvpn.web.dashboard import KEY_HEADER
from tests.kit.browser import AppThread, FakeAgent, launch


def _sse_first_bytes(app: AppThread, cookie: str, key: str) -> int:
    """Bytes of the stream until it has sent status and peers once (the session's cookie and
    origin key, as the page sends them)."""
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=15)
    try:
        conn.request("GET", "/api/v1/events",
                     headers={"Accept": "text/event-stream", "Cookie": cookie,
                              KEY_HEADER: key})
        r = conn.getresponse()
        total, seen = 0, set()
        for _ in range(100_000):
            line = r.fp.readline()
            if not line:
                break
            total += len(line)
            if line.startswith(b"event: "):
                seen.add(line[7:].strip())
            if {b"status", b"peers"} <= seen and line == b"\n":
                break
        return total
    finally:
        conn.close()


def measure(runs: int, peers: int) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    root = Path(tempfile.mkdtemp(prefix="svpn-bench-dash-"))
    agent = FakeAgent(peer_count=peers)
    renders: list[float] = []
    fcps: list[float] = []
    dcls: list[float] = []
    sizes: dict[str, int] = {}
    sse = 0
    with AppThread(agent, root) as app, sync_playwright() as pw:
        browser = launch(pw)
        try:
            for run in range(runs):
                ctx = browser.new_context(viewport={"width": 1280, "height": 900})
                page = ctx.new_page()
                page.goto(app.login_url())  # logs in, lands on the overview
                page.wait_for_selector("#ov-device dd")
                cookie = next(c for c in ctx.cookies() if c["name"].startswith("svpn_session"))
                key = page.evaluate("() => localStorage.getItem('svpn-key')")
                got: dict[str, int] = {}

                def on_response(r: Any, got: dict[str, int] = got) -> None:
                    if "event-stream" in (r.headers.get("content-type") or ""):
                        return
                    path = urlsplit(r.url).path
                    try:
                        got[path] = len(r.body())
                    except Exception:  # redirects have no body
                        got.setdefault(path, 0)

                fresh = ctx.new_page()  # same session, new page: a cold load of #peers
                fresh.on("response", on_response)
                fresh.goto(f"http://127.0.0.1:{app.port}/#peers")
                fresh.wait_for_selector(f"[data-peer=dev{peers - 1}]")
                timing = fresh.evaluate("""() => {
                    const m = performance.getEntriesByName('svpn:peers')[0];
                    const p = performance.getEntriesByName('first-contentful-paint')[0];
                    const n = performance.getEntriesByType('navigation')[0];
                    return [m ? m.startTime : null, p ? p.startTime : null,
                            n ? n.domContentLoadedEventEnd : null]; }""")
                renders.append(timing[0])
                fcps.append(timing[1])
                dcls.append(timing[2])
                if run == 0:
                    fresh.wait_for_timeout(500)
                    sizes = dict(got)
                    sse = _sse_first_bytes(app, f"{cookie['name']}={cookie['value']}", key)
                ctx.close()
        finally:
            browser.close()
    return {"renders": renders, "fcp": fcps, "dcl": dcls, "sizes": sizes, "sse": sse}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--peers", type=int, default=50)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    r = measure(args.runs, args.peers)
    sizes = r["sizes"]
    static = {k: v for k, v in sizes.items() if k == "/" or k.startswith("/static/")}
    api = {k: v for k, v in sizes.items() if k.startswith("/api/")}
    lines = [f"## Dashboard: peers page with {args.peers} peers "
             f"(fake agent, Chromium headless, median of {args.runs} cold loads)", "",
             "| what | bytes |", "|---|---:|"]
    for path, n in sorted(static.items()):
        lines.append(f"| `{path}` | {n:,} |")
    lines.append(f"| **static total** | **{sum(static.values()):,}** |")
    for path, n in sorted(api.items()):
        lines.append(f"| `{path}` (JSON) | {n:,} |")
    lines.append(f"| event stream until first status + peers | {r['sse']:,} |")
    total = sum(static.values()) + sum(api.values()) + r["sse"]
    lines += [f"| **page weight** | **{total:,}** |", "",
              "| timing (ms from navigation start) | median | min | max |", "|---|---:|---:|---:|"]
    for name, key in (("DOMContentLoaded", "dcl"), ("first contentful paint", "fcp"),
                      (f"peers table drawn ({args.peers} rows)", "renders")):
        values = [v for v in r[key] if v is not None]
        if values:
            lines.append(f"| {name} | {statistics.median(values):.0f} | {min(values):.0f} | "
                         f"{max(values):.0f} |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
