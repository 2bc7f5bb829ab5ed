"""Issue 2 acceptance 2 and 3: wrong password, refused certificates, plaintext, server outage."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from socialvpn.web.client import APIClient
from tests.kit.agents import befriend, wait_for
from tests.kit.agents import sd_notified as _notified
from tests.kit.ca import unknown_ca_server_cert

pytestmark = pytest.mark.integration


def test_wrong_password_exits_once_without_hammering(prosody_tls, agent_factory, unique_user):
    user = unique_user("frank")
    agent = agent_factory(prosody_tls, user, password="right one", login_password="wrong one")
    wait_for(lambda: agent.exited() is not None, 20, "the agent to give up",
             agent.log_tail)
    assert agent.exited() == 3
    lines = agent.log_text().splitlines()
    failures = [line for line in lines if "authentication failed" in line]
    assert len(failures) == 1, lines
    assert agent.jid in failures[0]
    assert "Traceback" not in agent.log_text()
    # One attempt reached the server; none follow.
    assert prosody_tls.count_auth_failures(user) == 1
    time.sleep(2)
    assert prosody_tls.count_auth_failures(user) == 1


@pytest.mark.parametrize("bad", ["wrong-name", "unknown-ca"])
def test_untrusted_certificate_is_refused(bad, prosody_factory, agent_factory, test_ca,
                                          tmp_path, unique_user):
    if bad == "wrong-name":
        cert = test_ca.issue_wrong_name(directory=tmp_path / "certs")
    else:
        cert = unknown_ca_server_cert(tmp_path / "rogue", ["svpn.test"])
    server = prosody_factory(cert=cert)
    user = unique_user("gina")
    agent = agent_factory(server, user, ca_file=test_ca.ca_file)
    st = wait_for(lambda: (s := agent.status()) and s["xmpp"]["attempts"] >= 1
                  and "certificate" in s["xmpp"]["reason"] and s, 15,
                  "the agent to report the refused certificate", agent.log_tail)
    assert st["xmpp"]["state"] in ("offline", "connecting")
    reason = st["xmpp"]["reason"]
    assert ("hostname" in reason.lower()) if bad == "wrong-name" else ("issuer" in reason)
    assert agent.exited() is None  # keeps running (and retrying with backoff)
    assert server.count_auth_failures() == 0
    assert f"Authenticated as {user}@" not in server.log_text()
    assert "session_start" not in agent.log_text()


def test_plaintext_server_refused_unless_allowed(prosody_factory, agent_factory, unique_user):
    server = prosody_factory(tls=False)
    user = unique_user("hank")
    agent = agent_factory(server, user, ca_file=None)
    st = wait_for(lambda: (s := agent.status()) and "TLS" in s["xmpp"]["reason"] and s, 15,
                  "the agent to refuse the plaintext server", agent.log_tail)
    assert st["xmpp"]["state"] in ("offline", "connecting")
    assert "plaintext" in st["xmpp"]["reason"]
    assert server.count_auth_failures() == 0
    assert "Authenticated" not in server.log_text() and "authenticated" not in agent.log_text()
    agent.stop()

    allowed = agent_factory(server, unique_user("ida"), ca_file=None, allow_plaintext=True)
    st = allowed.wait_connected()
    assert st["xmpp"]["tls"] is None


def test_server_outage_and_return(prosody_factory, agent_factory, unique_user):
    server = prosody_factory()
    alice = agent_factory(server, unique_user("alice"))
    bob = agent_factory(server, unique_user("bob"))
    alice.wait_connected()
    bob.wait_connected()
    befriend(alice, bob)

    server.stop()
    for agent in (alice, bob):
        st = wait_for(lambda a=agent: (s := a.status()) and s["xmpp"]["state"] != "connected"
                      and s, 10, "the agent to notice the outage", agent.log_tail)
        assert st["xmpp"]["state"] in ("offline", "connecting")
        assert st["xmpp"]["reason"]
        # Friends stay listed while the server is away (offline).
        friends = agent.json("friends")
        assert friends and friends[0]["subscription"] == "both" and not friends[0]["online"]
    time.sleep(2)  # an outage of a few seconds: agents back off meanwhile
    server.start()
    started = time.monotonic()
    for agent in (alice, bob):
        agent.wait_connected(timeout=10 - (time.monotonic() - started))
    back = time.monotonic() - started
    assert back < 10
    wait_for(lambda: all((f := a.json("friends")) and f[0]["subscription"] == "both"
                         and f[0]["online"] and f[0]["devices"] for a in (alice, bob)), 10,
             "the friendship and presence after the outage")


def test_password_changed_while_running(prosody_factory, agent_factory, unique_user):
    """After a good sign-in, a refused password keeps the agent (and later its links) up,
    reports auth-failed once, does not retry, and SIGHUP with a fixed file signs in again."""
    server = prosody_factory()
    user = unique_user("jane")
    agent = agent_factory(server, user, password="old-pw")
    agent.wait_connected()
    server.register(user, "new-pw")  # the person changed it elsewhere
    server.restart()  # the session ends; the agent reconnects with the old password
    st = wait_for(lambda: (s := agent.status()) and s["xmpp"]["state"] == "auth-failed" and s,
                  15, "auth-failed", agent.log_tail)
    assert agent.jid in st["xmpp"]["reason"]
    assert agent.exited() is None
    failures = server.count_auth_failures(user)
    time.sleep(2)
    assert server.count_auth_failures(user) == failures == 1
    assert agent.status()["xmpp"]["state"] == "auth-failed"

    agent.password_file.write_text("new-pw\n")
    agent.send_signal(signal.SIGHUP)
    agent.wait_connected(timeout=10)
    assert agent.log_text().count("authentication failed") == 1


def test_sd_notify_ready_and_stopping(prosody_tls, agent_factory, unique_user, tmp_path):
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(15)
        agent = agent_factory(prosody_tls, unique_user("kim"), start=False)
        agent.start(env={"NOTIFY_SOCKET": str(sock_path)})
        assert _notified(sock, b"READY=1")
        # READY means the local API answers: asked at once, with no retry.
        status = APIClient(agent.state_dir / "api.sock", timeout=5).get("status")
        assert status["agent"]["state"] == "running"
        agent.wait_connected()
        assert agent.stop() == 0
        assert _notified(sock, b"STOPPING=1")


def test_keepalive_notices_a_frozen_server(prosody_factory, agent_factory, unique_user):
    """A server that stops answering (SIGSTOP) is noticed by XMPP ping, not by TCP."""
    server = prosody_factory()
    agent = agent_factory(server, unique_user("lou"), start=False)
    text = agent.config.read_text().replace(
        "[xmpp]\n", "[xmpp]\nkeepalive_interval = 1.0\nkeepalive_timeout = 1.0\n"
                    "connect_timeout = 3.0\n", 1)
    agent.config.write_text(text)
    agent.start()
    agent.wait_connected()
    os.kill(server.pid, signal.SIGSTOP)
    try:
        st = wait_for(lambda: (s := agent.status()) and s["xmpp"]["state"] != "connected" and s,
                      15, "the agent to notice the frozen server", agent.log_tail)
        assert st["xmpp"]["state"] == "connecting"
    finally:
        os.kill(server.pid, signal.SIGCONT)
    agent.wait_connected(timeout=15)
