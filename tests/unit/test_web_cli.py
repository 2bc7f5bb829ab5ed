"""`socialvpn dashboard` (the real CLI in a subprocess) against the real web app with a fake
agent: it prints one login URL that logs a browser in once; when the dashboard port is busy it
says why in one line; without an agent it says the agent is not running."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.kit.browser import AppThread, FakeAgent, short_dir

pytestmark = pytest.mark.unit

CLI = [sys.executable, "-m", "socialvpn"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL, env=dict(os.environ))


def _config(tmp_path: Path, state: Path) -> Path:
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    pw.chmod(0o600)
    cfg = tmp_path / "config.toml"
    r = run("init", "--jid", "alice@svpn.test", "--password-file", str(pw), "--server",
            "127.0.0.1:5", "--state-dir", str(state), "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    return cfg


def _get(port: int, path: str) -> tuple[int, str | None]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        return r.status, r.getheader("Set-Cookie")
    finally:
        conn.close()


def test_dashboard_prints_a_one_time_login_url(tmp_path: Path) -> None:
    with short_dir(tmp_path) as d:
        cfg = _config(tmp_path, d)
        with AppThread(FakeAgent(), d) as app:
            r = run("dashboard", "--config", str(cfg))
            assert r.returncode == 0, r.stderr
            lines = r.stdout.strip().splitlines()
            assert len(lines) == 1
            url = urlsplit(lines[0])
            assert (url.scheme, url.hostname, url.port) == ("http", "127.0.0.1", app.port)
            assert url.path == "/login" and url.query.startswith("token=")
            assert "once" in r.stderr
            status, cookie = _get(app.port, f"{url.path}?{url.query}")
            assert status == 303 and cookie and "HttpOnly" in cookie
            assert _get(app.port, f"{url.path}?{url.query}")[0] == 403
            j = run("dashboard", "--json", "--config", str(cfg))
            assert j.returncode == 0 and '"expires_in": 120' in j.stdout


def test_dashboard_says_why_when_the_port_is_busy(tmp_path: Path) -> None:
    with short_dir(tmp_path) as d, socket.socket() as busy:
        cfg = _config(tmp_path, d)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        app = AppThread(FakeAgent(), d)
        app.server.listen = ("127.0.0.1", port)
        with app:
            r = run("dashboard", "--config", str(cfg))
        assert r.returncode == 1 and r.stdout == ""
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "off" in lines[0]


def test_dashboard_without_agent(tmp_path: Path) -> None:
    with short_dir(tmp_path) as d:
        cfg = _config(tmp_path, d)
        r = run("dashboard", "--config", str(cfg))
        assert r.returncode == 1 and "not running" in r.stderr
