"""The dashboard's test kit: Debian's Chromium under Playwright, a fake agent, a TCP forwarder.

- :func:`launch` starts ``/usr/bin/chromium`` headless through Playwright (never a downloaded
  browser), with a fresh profile and no background network traffic.
- :class:`FakeAgent` implements the local API's ``AgentAPI`` from canned data and records every
  call, for unit tests and for the page-weight benchmark (``peers=50``).
- :class:`Forwarder` (:mod:`tests.kit.forward`) forwards a TCP port on the root namespace's
  loopback to an address inside a network namespace (an agent's dashboard on its own
  127.0.0.1:7387), so a browser in the root namespace reaches it; the port differs, which the
  dashboard's Host check allows.
- :func:`artifacts_dir`: where screenshots go (``$SOCIALVPN_ARTIFACTS`` or
  ``test-artifacts/``, gitignored).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.kit.forward import Forwarder as Forwarder  # re-exported for the dashboard tests

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage"]
ROOT = Path(__file__).resolve().parents[2]


def browser_unavailable_reason() -> str | None:
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is not installed"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright (Python) is not installed"
    return None


def launch(playwright: Any) -> Any:
    """A headless Chromium browser (Playwright ``Browser``); the caller closes it."""
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                      args=CHROMIUM_ARGS, timeout=30_000)


def artifacts_dir(*parts: str) -> Path:
    base = Path(os.environ.get("SOCIALVPN_ARTIFACTS") or ROOT / "test-artifacts")
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- a fake agent ---------------------------------------------------------------------------


def fake_peer(i: int, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    direct = i % 3 != 2
    return {
        "group": "lab", "jid": f"user{i}@example.org", "device": f"dev{i}",
        "id": f"{i:016x}", "ip4": f"10.77.{i // 250}.{i % 250 + 2}",
        "ip6": f"fd5e:1a2b:3c4d:77::{i + 2:x}", "signalling": "up", "failure": None,
        "endpoint": f"192.0.2.{i % 250 + 1}:{40000 + i}",
        "fingerprint": "ab12 cd34 ef56 7890 " * 2, "peer_id": f"{i:016x}",
        "state": "up", "path": "direct" if direct else "turn",
        "local_candidate_type": "srflx" if direct else "relay",
        "remote_candidate_type": "host" if direct else "relay",
        "remote_endpoint": f"192.0.2.{i % 250 + 1}:{40000 + i}", "rtt": 0.0012 + i / 10000,
        "connect_time": 0.3, "reason": None, "controlling": bool(i % 2),
        "allowed_ips": [f"10.77.0.{i + 2}/32"], "public_key": "00" * 32,
        "rx_bytes": 1000 * i, "tx_bytes": 2000 * i, "rx_packets": i, "tx_packets": 2 * i,
        "handshakes": 1, "last_handshake": now - 5, "endpoint_changes": 0,
        "session_age": 5.0, "staged": 0,
    }


@dataclass
class FakeAgent:
    """Implements ``AgentAPI`` from canned data; ``calls`` records every call."""

    peer_count: int = 1
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    friend_requests: list[str] = field(default_factory=lambda: ["bob@example.org"])
    group_names: list[str] = field(default_factory=list)
    event_log: list[dict[str, Any]] = field(default_factory=list)
    traffic: int = 0  # grows rx/tx of every peer on each peers() call when > 0

    def __post_init__(self) -> None:
        now = time.time()
        self._peers = [fake_peer(i, now) for i in range(self.peer_count)]

    def publish(self, kind: str, /, **data: Any) -> None:
        self.event_log.append({"kind": kind, "seq": len(self.event_log) + 1, "at": time.time(),
                               "data": data})

    def status(self) -> dict[str, Any]:
        return {
            "agent": {"state": "running", "version": "0.1.0", "pid": os.getpid(),
                      "started_at": time.time() - 60},
            "account": "alice@example.org",
            "xmpp": {"state": "connected", "reason": "signed in", "since": time.time() - 50,
                     "attempts": 1, "next_attempt_in": None, "connected_at": time.time() - 50,
                     "tls": "TLSv1.3", "jid": "alice@example.org/svpn-0123456789abcdef",
                     "server": "example.org"},
            "device": {"id": "0123456789abcdef", "name": "laptop",
                       "fingerprint": "1234 5678 9abc def0 1234 5678 9abc def0",
                       "key": "AAAA"},
            "groups": [{"name": n, "role": "owner", "ip4": "10.77.0.1",
                        "ip6": "fd5e:1a2b:3c4d:77::1", "epoch": 1} for n in self.group_names],
            "counters": {"stanzas_dropped": {"oversize": 2, 'we"ird\\label\n': 1},
                         "xmpp_sign_ins": {"": 1}},
        }

    def friends(self) -> list[dict[str, Any]]:
        return [{"jid": "carol@example.org", "name": "", "subscription": "both",
                 "request_sent": False, "request_received": False, "online": True,
                 "devices": [{"resource": "svpn-x", "id": "x", "name": "phone"}],
                 "other_resources": []}]

    def requests(self) -> dict[str, Any]:
        return {"friends": [{"jid": j, "received_at": time.time() - 10}
                            for j in self.friend_requests],
                "joins": [], "invitations": []}

    async def friend_add(self, jid: str) -> dict[str, Any]:
        self.calls.append(("friend_add", jid))
        return {"jid": jid, "result": "request sent"}

    async def friend_remove(self, jid: str) -> dict[str, Any]:
        self.calls.append(("friend_remove", jid))
        return {"jid": jid, "result": "removed"}

    async def decide(self, jid: str, accept: bool, group: str | None) -> dict[str, Any]:
        self.calls.append(("decide", jid, accept, group))
        if jid in self.friend_requests:
            self.friend_requests.remove(jid)
        self.publish("request.decided", jid=jid, accepted=accept)
        return {"jid": jid, "result": "accepted" if accept else "rejected"}

    def events_since(self, seq: int) -> list[dict[str, Any]]:
        return [e for e in self.event_log if e["seq"] > seq]

    def groups(self) -> list[dict[str, Any]]:
        return [{"name": n, "gid": "g" * 32, "owner": "alice@example.org", "role": "owner",
                 "epoch": 1, "subnet4": "10.77.0.0/24", "prefix6": "fd5e:1a2b:3c4d:77::/64",
                 "ip4": "10.77.0.1", "ip6": "fd5e:1a2b:3c4d:77::1", "members": 1, "devices": 1,
                 "owner_key_fingerprint": "aaaa bbbb cccc dddd"} for n in self.group_names]

    def peers(self) -> list[dict[str, Any]]:
        if self.traffic:
            for p in self._peers:
                p["rx_bytes"] += self.traffic
                p["tx_bytes"] += self.traffic
        return [dict(p) for p in self._peers]

    def group_show(self, name: str) -> dict[str, Any]:
        summary = next(g for g in self.groups() if g["name"] == name)
        return {**summary, "member_list": [{"jid": "alice@example.org", "devices": [
            {"id": "0123456789abcdef", "name": "laptop", "ip4": "10.77.0.1",
             "ip6": "fd5e:1a2b:3c4d:77::1", "key": "AAAA", "online": True}]}], "join_requests": []}

    async def group_create(self, name: str, subnet: str | None) -> dict[str, Any]:
        self.calls.append(("group_create", name, subnet))
        self.group_names.append(name)
        self.publish("group.changed", name=name, epoch=1)
        return next(g for g in self.groups() if g["name"] == name)

    async def group_invite(self, name: str, jid: str) -> dict[str, Any]:
        self.calls.append(("group_invite", name, jid))
        return {"group": name, "jid": jid, "result": "invitation sent to 1 device(s)"}

    async def group_join(self, owner_jid: str, name: str) -> dict[str, Any]:
        self.calls.append(("group_join", owner_jid, name))
        return {"group": name, "owner": owner_jid, "result": "request sent"}

    async def group_remove(self, name: str, jid: str) -> dict[str, Any]:
        self.calls.append(("group_remove", name, jid))
        return {"group": name, "jid": jid, "result": "removed"}

    async def group_leave(self, name: str) -> dict[str, Any]:
        self.calls.append(("group_leave", name))
        return {"group": name, "result": "left"}


# --- running the app with a fake agent in a thread (for sync Playwright code) ---------------


class AppThread:
    """The real ``APIServer`` with a :class:`FakeAgent`, on its own event loop in a thread,
    so synchronous Playwright code can drive it. ``login_url()`` asks the Unix socket like
    ``socialvpn dashboard`` does."""

    def __init__(self, agent: FakeAgent, directory: Path, host: str = "127.0.0.1") -> None:
        from socialvpn.web.app import APIServer

        self.agent = agent
        self.socket_path = directory / "api.sock"
        self.server = APIServer(agent, self.socket_path, listen=(host, 0))  # type: ignore[arg-type]
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="app", daemon=True)

    def __enter__(self) -> AppThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    @property
    def port(self) -> int:
        assert self.server.web.port is not None
        return self.server.web.port

    def login_url(self) -> str:
        from socialvpn.web.client import APIClient

        return str(APIClient(self.socket_path, timeout=5).post("dashboard/login", {})["url"])


@contextlib.contextmanager
def short_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory whose ``api.sock`` fits in sun_path (108 bytes)."""
    import tempfile

    if len(str(tmp_path / "api.sock")) < 100:
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="svpn-web-"))
    try:
        yield d
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()
