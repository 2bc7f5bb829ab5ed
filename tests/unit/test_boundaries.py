"""Layering rules of DESIGN.md §3 and STYLE.md §B, enforced by walking the imports.

- Pure cores import no asyncio, socket, slixmpp, aioice, pyroute2 or aiohttp (directly).
- Only agent.py and linkhub.py import across subpackages; shared top-level modules import
  no subpackage.
- One adapter per foreign library: slixmpp only in xmpp/, aioice only in link/ice.py,
  pyroute2/pytun only in net/, aiohttp only in web/.
- cli.py reaches the agent only through web/client.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PKG = Path(__file__).resolve().parents[2] / "socialvpn"

PURE_CORES = [
    "groups.py", "config.py", "xmpp/signal.py", "link/packet.py", "link/noise.py",
    "link/session.py", "link/timers.py", "link/ratelimit.py", "link/constants.py",
    "net/packet_router.py", "net/offload.py",
]
IO_LIBRARIES = {"asyncio", "socket", "slixmpp", "aioice", "pyroute2", "aiohttp", "pytun",
                "selectors", "ssl"}
ADAPTERS = {
    "slixmpp": ("xmpp/",),
    "aioice": ("link/ice.py",),
    "pyroute2": ("net/",),
    "pytun": ("net/",),
    "aiohttp": ("web/",),
}
SUBPACKAGES = {"xmpp", "link", "net", "web"}


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def _rel(path: Path) -> str:
    return path.relative_to(PKG).as_posix()


def _imports(path: Path) -> list[tuple[str, int]]:
    """Absolute dotted names of everything ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = ["socialvpn", *path.relative_to(PKG).parent.parts]
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:
                    out += [(f"{mod}.{alias.name}", node.lineno) for alias in node.names]
                    continue
            else:
                mod = node.module or ""
            out.append((mod, node.lineno))
    return out


def test_walker_sees_every_module() -> None:
    assert {"agent.py", "cli.py", "config.py", "xmpp/client.py", "web/app.py"} <= {
        _rel(p) for p in _modules()
    }


@pytest.mark.parametrize("core", PURE_CORES)
def test_pure_cores_do_no_io(core: str) -> None:
    path = PKG / core
    if not path.exists():
        pytest.skip(f"{core} does not exist yet")
    bad = [(name, line) for name, line in _imports(path)
           if name.split(".")[0] in IO_LIBRARIES]
    assert not bad, f"{core} imports I/O libraries: {bad}"


def test_pure_cores_list_is_checked_for_existing_modules() -> None:
    # At least the cores that exist today are really checked (not all skipped).
    assert sum((PKG / c).exists() for c in PURE_CORES) >= 1


ORCHESTRATORS = ("agent.py", "linkhub.py")  # the two modules that wire the parts together


def test_only_agent_imports_across_subpackages() -> None:
    problems = []
    for path in _modules():
        rel = _rel(path)
        own = rel.split("/")[0] if "/" in rel else None
        for name, line in _imports(path):
            parts = name.split(".")
            if parts[0] != "socialvpn" or len(parts) < 2 or parts[1] not in SUBPACKAGES:
                continue
            target = parts[1]
            if target == own or rel in ORCHESTRATORS:
                continue
            if rel == "cli.py" and name in ("socialvpn.web.client", "socialvpn.web"):
                continue
            problems.append(f"{rel}:{line} imports {name}")
    assert not problems, "only the orchestrators may cross subpackages:\n" + "\n".join(problems)


def test_foreign_libraries_stay_in_their_adapter() -> None:
    problems = []
    for path in _modules():
        rel = _rel(path)
        for name, line in _imports(path):
            top = name.split(".")[0]
            allowed = ADAPTERS.get(top)
            if allowed and not any(rel == a or rel.startswith(a) for a in allowed):
                problems.append(f"{rel}:{line} imports {name}")
    assert not problems, "\n".join(problems)


def test_cli_talks_to_the_agent_only_through_the_api_client() -> None:
    names = {name for name, _ in _imports(PKG / "cli.py")}
    assert "socialvpn.agent" not in names
    assert not any(n.startswith("socialvpn.xmpp") for n in names)
    assert "socialvpn.web.client" in names


def test_walker_catches_a_forbidden_import(tmp_path: Path) -> None:
    fake = PKG / "link" / "_boundary_probe.py"
    try:
        fake.write_text("import asyncio\nfrom ..xmpp import client\n")
        names = [n for n, _ in _imports(fake)]
        assert "asyncio" in names and "socialvpn.xmpp" in names
    finally:
        fake.unlink()
