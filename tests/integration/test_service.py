"""Issue 6 acceptance 1: `systemd-analyze verify` accepts the unit `socialvpn service install`
writes (with the real installed command), and the agent sends READY=1 only once its local API
answers, also while the XMPP server is unreachable."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from socialvpn import service
from socialvpn.web.client import APIClient
from tests.kit.agents import CLI, AgentProc
from tests.kit.agents import sd_notified as _notified
from tests.kit.ports import free_tcp_port

pytestmark = pytest.mark.integration


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("SOCIALVPN_REQUIRE_INTEGRATION") == "1":
            pytest.fail(f"{tool} is not installed")
        pytest.skip(f"{tool} is not installed")
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, check=False)


def test_installed_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = _need("systemd-analyze")
    (tmp_path / "password").write_text("pw\n")
    os.chmod(tmp_path / "password", 0o600)
    config = tmp_path / "etc" / "config.toml"
    init = _cli("init", "--jid", "svc@example.org", "--state-dir", str(tmp_path / "state"),
                "--password-file", str(tmp_path / "password"), "--config", str(config))
    assert init.returncode == 0, init.stderr
    units = tmp_path / "units"
    first = _cli("service", "install", "--config", str(config), "--unit-dir", str(units))
    assert first.returncode == 0, first.stderr
    unit = units / "socialvpn.service"
    assert f"wrote {unit}" in first.stdout
    if not service.systemd_running():  # this machine: not booted with systemd
        assert "systemd is not running" in first.stdout and "written" in first.stdout
    assert oct(unit.stat().st_mode & 0o777) == "0o644"
    text = unit.read_text()
    command = service.agent_command()
    assert f"ExecStart={' '.join(command)} up --config {config}" in text
    assert f"ExecStopPost=-{' '.join(command)} cleanup --config {config}" in text
    assert f"ReadWritePaths={tmp_path / 'state'}" in text

    verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    # Idempotent; a hand edit is kept unless --force.
    again = _cli("service", "install", "--config", str(config), "--unit-dir", str(units))
    assert again.returncode == 0 and "up to date" in again.stdout
    unit.write_text(text.replace("RestartSec=2", "RestartSec=7"))
    refused = _cli("service", "install", "--config", str(config), "--unit-dir", str(units))
    assert refused.returncode == 1 and "changed by hand" in refused.stderr
    assert "RestartSec=7" in unit.read_text()
    forced = _cli("service", "install", "--force", "--config", str(config), "--unit-dir",
                  str(units))
    assert forced.returncode == 0 and unit.read_text() == text
    # A broken unit is caught by the same check (so the check above means something).
    unit.write_text(text.replace(command[0], "/nonexistent/socialvpn", 1))
    bad = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert bad.returncode != 0

    helptext = _cli("service", "install", "--help").stdout
    for word in ("systemctl", "--unit-dir", "--now", "--no-enable", "--force", "CAP_NET_ADMIN"):
        assert word in helptext


def test_ready_only_once_the_api_answers_even_with_the_server_away(tmp_path: Path) -> None:
    """READY=1 does not wait for XMPP (the server may be down at boot) but does wait for the
    local API: asked the moment READY arrives, it answers."""
    port = free_tcp_port()  # nothing listens there: the server is "down"
    agent = AgentProc(tmp_path / "away", "away@svpn.test", "pw", server=f"127.0.0.1:{port}",
                      extra_config="[link]\nenabled = false")
    agent.init()
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(20)
        try:
            agent.start(env={"NOTIFY_SOCKET": str(sock_path)})
            assert _notified(sock, b"READY=1")
            status = APIClient(agent.state_dir / "api.sock", timeout=5).get("status")
            assert status["agent"]["state"] == "running"
            assert status["xmpp"]["state"] != "connected"
            assert agent.stop() == 0
            assert _notified(sock, b"STOPPING=1")
        finally:
            agent.stop()
