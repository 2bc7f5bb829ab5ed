"""`socialvpn service install`: the unit text, rendering, idempotence, systemctl steps."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from socialvpn import service
from socialvpn.errors import SocialVPNError

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def _keys(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_embedded_unit_is_the_shipped_file() -> None:
    assert (REPO / "config" / "socialvpn.service").read_text() == service.UNIT


def test_unit_requirements() -> None:
    keys = _keys(service.UNIT)
    assert keys["Type"] == ["notify"] and keys["NotifyAccess"] == ["main"]
    assert keys["Restart"] == ["on-failure"]
    assert keys["After"] == ["network-online.target"]
    assert keys["Wants"] == ["network-online.target"]
    assert keys["StateDirectory"] == ["socialvpn"]
    assert keys["ExecStopPost"][0].startswith("-") and " cleanup " in keys["ExecStopPost"][0]
    assert keys["CapabilityBoundingSet"] == ["CAP_NET_ADMIN"]
    assert keys["AmbientCapabilities"] == ["CAP_NET_ADMIN"]
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                       ("DeviceAllow", "/dev/net/tun rw"),
                       ("ReadWritePaths", "/var/lib/socialvpn")):
        assert keys[key] == [value], key
    assert set(keys["RestrictAddressFamilies"][0].split()) == {
        "AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    assert keys["RestartPreventExitStatus"] == ["2 3"]  # bad config / refused password


def test_render_fills_in_command_config_and_state_dir(tmp_path: Path) -> None:
    text = service.render_unit(["/opt/svpn/bin/socialvpn"], Path("/etc/x/c.toml"),
                               Path("/srv/state"))
    keys = _keys(text)
    assert keys["ExecStart"] == ["/opt/svpn/bin/socialvpn up --config /etc/x/c.toml"]
    assert keys["ExecStopPost"] == ["-/opt/svpn/bin/socialvpn cleanup --config /etc/x/c.toml"]
    assert keys["ReadWritePaths"] == ["/srv/state"]
    assert service.is_unmodified(text)
    assert not service.is_unmodified(text.replace("Restart=on-failure", "Restart=always"))
    assert not service.is_unmodified(service.UNIT)  # no header: not ours


def test_quoting_of_odd_paths() -> None:
    assert service.systemd_quote("/a b/c") == '"/a b/c"'
    assert service.systemd_quote("/x%y$z") == "/x%%y$$z"
    with pytest.raises(SocialVPNError):
        service.systemd_quote("a\nb")
    text = service.render_unit(["/usr/bin/python3", "-m", "socialvpn"], Path("/my dir/c.toml"),
                               Path("/var/lib/socialvpn"))
    assert 'ExecStart=/usr/bin/python3 -m socialvpn up --config "/my dir/c.toml"' in text


def test_agent_command_prefers_the_console_script(tmp_path: Path) -> None:
    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.touch()
    assert service.agent_command(str(python)) == [str(python), "-m", "socialvpn"]
    script = tmp_path / "bin" / "socialvpn"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    assert service.agent_command(str(python)) == [str(script)]


class Recorder:
    def __init__(self, fail: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(argv)
        code = 1 if self.fail and self.fail in argv else 0
        return subprocess.CompletedProcess(argv, code, "", "boom" if code else "")


def _install(tmp_path: Path, **kw: object) -> service.InstallResult:
    args: dict[str, object] = {"unit_dir": tmp_path / "units", "command": ["/usr/bin/svpn"],
                               "booted": False}
    args.update(kw)
    return service.install(tmp_path / "c.toml", tmp_path / "state", **args)  # type: ignore[arg-type]


def test_install_without_systemd_writes_only(tmp_path: Path) -> None:
    run = Recorder()
    result = _install(tmp_path, run=run)
    path = tmp_path / "units" / "socialvpn.service"
    assert result.unit_path == path and result.changed and not result.systemd
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert "systemd is not running" in result.messages[-1]
    assert run.calls == []
    assert f"--config {tmp_path / 'c.toml'}" in path.read_text()


def test_install_is_idempotent_and_keeps_hand_edits(tmp_path: Path) -> None:
    _install(tmp_path)
    path = tmp_path / "units" / "socialvpn.service"
    first = path.read_text()
    assert not _install(tmp_path).changed
    # Our own earlier unit (unmodified) is replaced when something changes.
    result = _install(tmp_path, command=["/opt/other/socialvpn"])
    assert result.changed and "/opt/other/socialvpn up" in path.read_text()
    path.write_text(first.replace("RestartSec=2", "RestartSec=9"))
    with pytest.raises(SocialVPNError, match="changed by hand"):
        _install(tmp_path)
    assert "RestartSec=9" in path.read_text()
    assert _install(tmp_path, force=True).changed
    assert path.read_text() == first


def test_install_with_systemd_reloads_enables_and_starts(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    run = Recorder()
    result = _install(tmp_path, run=run, booted=True)
    assert run.calls == []  # tmp is not a directory systemd reads
    assert "not a directory systemd loads units from" in result.messages[-1]

    monkeypatch.setattr(service, "DEFAULT_UNIT_DIR", tmp_path / "units")
    run = Recorder()
    _install(tmp_path, run=run, booted=True, now=True, command=["/x/socialvpn"])
    assert run.calls == [["systemctl", "daemon-reload"],
                         ["systemctl", "enable", "socialvpn.service"],
                         ["systemctl", "restart", "socialvpn.service"]]
    run = Recorder()
    _install(tmp_path, run=run, booted=True, now=True, command=["/x/socialvpn"])
    assert run.calls[-1] == ["systemctl", "start", "socialvpn.service"]  # unchanged: start
    run = Recorder()
    _install(tmp_path, run=run, booted=True, enable=False, command=["/y/socialvpn"])
    assert run.calls == [["systemctl", "daemon-reload"]]
    with pytest.raises(SocialVPNError, match="enable"):
        _install(tmp_path, run=Recorder(fail="enable"), booted=True)


def test_paths_under_home_are_warned_about(tmp_path: Path) -> None:
    result = service.install(Path("/home/al/c.toml"), Path("/var/lib/socialvpn"),
                             unit_dir=tmp_path, command=["/usr/bin/svpn"], booted=False,
                             files=[("the password file", Path("/root/pw"))])
    assert [w.split(" (")[0] for w in result.warnings] == ["the config file",
                                                           "the password file"]
    ok = service.install(Path("/etc/socialvpn/c.toml"), Path("/var/lib/socialvpn"),
                         unit_dir=tmp_path / "2", command=["/usr/bin/svpn"], booted=False,
                         files=[("the CA file", Path("/etc/ssl/ca.pem"))])
    assert ok.warnings == []
