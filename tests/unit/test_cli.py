"""The command line as a person meets it (issue 2 acceptance 4): bad config files make
`check-config` and `up` exit non-zero with one line naming the problem, never a traceback."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

CLI = [sys.executable, "-m", "socialvpn"]
GOOD = """version = 1
[account]
jid = "alice@svpn.test"
password_file = "{pw}"
[xmpp]
server = "127.0.0.1:5"
[device]
name = "laptop"
state_dir = "{state}"
"""


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    pw.chmod(0o600)
    state = tmp_path / "state"
    cfg = tmp_path / "config.toml"
    r = run("init", "--jid", "alice@svpn.test", "--password-file", str(pw), "--server",
            "127.0.0.1:5", "--state-dir", str(state), "--config", str(cfg),
            "--device-name", "laptop")
    assert r.returncode == 0, r.stderr
    return cfg, pw


BAD = {
    "unknown key": ('[device]\nname = "laptop"', '[device]\nname = "laptop"\ncolour = "red"',
                    "colour"),
    "wrong type": ('[device]\nname = "laptop"', '[device]\nname = 7', "name"),
    "missing jid": ('jid = "alice@svpn.test"\n', "", "jid"),
    "not TOML": ("version = 1", "version = = 1 [[", "not valid TOML"),
    "bad server": ('server = "127.0.0.1:5"', 'server = "127.0.0.1:99999"', "server"),
    "bad version": ("version = 1", "version = 3", "version"),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("command", ["check-config", "up"])
def test_bad_config_is_one_clear_line(case: str, command: str, setup: tuple[Path, Path]) -> None:
    cfg, _pw = setup
    old, new, needle = BAD[case]
    text = cfg.read_text()
    assert old in text
    cfg.write_text(text.replace(old, new, 1))
    r = run(command, "--config", str(cfg))
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert needle in lines[0] and str(cfg) in lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.parametrize("command", ["check-config", "up"])
def test_unreadable_password_file(command: str, setup: tuple[Path, Path], tmp_path: Path
                                  ) -> None:
    cfg, pw = setup
    pw.unlink()
    r = run(command, "--config", str(cfg))
    assert r.returncode == 2 and "password_file" in r.stderr and "no such file" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    pw.mkdir()
    r = run(command, "--config", str(cfg))
    assert r.returncode == 2 and "is a directory" in r.stderr


def test_password_file_without_read_permission(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    # Root reads any file, so the EACCES a normal user gets is simulated at the read.
    from socialvpn import cli

    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    cfg = tmp_path / "config.toml"
    cfg.write_text(GOOD.format(pw=pw, state=tmp_path / "state"))
    real = Path.read_bytes

    def deny(self: Path) -> bytes:
        if self == pw:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", deny)
    assert cli.main(["check-config", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "password_file" in err[0] and "permission denied" in err[0]


def test_missing_config_file(tmp_path: Path) -> None:
    r = run("check-config", "--config", str(tmp_path / "nope.toml"))
    assert r.returncode == 2 and "socialvpn init" in r.stderr


def test_init_writes_private_files_and_refuses_overwrite(setup: tuple[Path, Path]) -> None:
    cfg, pw = setup
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    state = cfg.parent / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "device.json").stat().st_mode) == 0o600
    before = (state / "device.json").read_bytes()
    r = run("init", "--jid", "bob@svpn.test", "--password-file", str(pw), "--config", str(cfg))
    assert r.returncode == 2 and "--force" in r.stderr
    assert "alice@svpn.test" in cfg.read_text()
    r = run("init", "--jid", "alice@svpn.test", "--password-file", str(pw), "--config",
            str(cfg), "--state-dir", str(state), "--force")
    assert r.returncode == 0
    assert (state / "device.json").read_bytes() == before  # keys are kept
    ok = run("check-config", "--config", str(cfg))
    assert ok.returncode == 0 and "ok" in ok.stdout


def test_password_never_from_argv() -> None:
    r = run("init", "--help")
    assert "--password-file" in r.stdout and "--password " not in r.stdout
    r = run("init", "--jid", "a@b.c", "--password", "x")
    assert r.returncode == 2


@pytest.mark.parametrize("command", ["init", "up", "status", "friends", "friend", "requests",
                                     "accept", "reject", "check-config"])
def test_every_command_explains_itself(command: str) -> None:
    r = run(command, "--help")
    assert r.returncode == 0 and "--config" in r.stdout


def test_commands_without_an_agent_say_so(setup: tuple[Path, Path]) -> None:
    cfg, _ = setup
    for args in (["status"], ["friends", "--json"], ["friend", "add", "bob@svpn.test"],
                 ["requests"], ["accept", "bob@svpn.test"]):
        r = run(*args, "--config", str(cfg))
        assert r.returncode == 1 and "agent is not running" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_bad_arguments_are_usage_errors(setup: tuple[Path, Path]) -> None:
    r = run("init", "--jid", "not a jid", "--config", str(setup[0].parent / "x.toml"))
    assert r.returncode == 2 and "--jid" in r.stderr
    r = run("frobnicate")
    assert r.returncode == 2
