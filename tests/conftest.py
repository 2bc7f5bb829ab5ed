"""Shared fixtures: the integration test bed (CA, Prosody, namespaces) from ``tests.kit``.

Integration tests (``@pytest.mark.integration``) are skipped with a clear reason when the
machine cannot run the bed (not root, or prosody/ip/nft missing) - unless ``CI=true`` or
``SOCIALVPN_REQUIRE_INTEGRATION=1`` is set, then they fail, so CI can never skip silently.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kit.ca import ThrowawayCA
from tests.kit.env import BED_TOOLS, integration_required, integration_unavailable_reason
from tests.kit.netns import NetLab, cleanup_stale
from tests.kit.prosody import (
    DEFAULT_DOMAIN,
    Prosody,
    cleanup_stale_prosody,
    stop_all,
)
from tests.kit.prosody import unique_user as _unique_user


def require_root(tools: tuple[str, ...] = BED_TOOLS) -> None:
    """Skip (or, under CI / SOCIALVPN_REQUIRE_INTEGRATION=1, fail) unless the bed can run."""
    reason = integration_unavailable_reason(tools)
    if reason is None:
        return
    if integration_required():
        pytest.fail(
            f"integration test bed is required here (CI=true or "
            f"SOCIALVPN_REQUIRE_INTEGRATION=1) but unavailable: {reason}",
            pytrace=False,
        )
    pytest.skip(f"integration test bed unavailable: {reason}")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Remove namespaces and Prosody servers left by crashed earlier runs (never live ones)."""
    if integration_unavailable_reason() is None:
        with contextlib.suppress(Exception):
            cleanup_stale()
        with contextlib.suppress(Exception):
            cleanup_stale_prosody()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("integration") is not None:
        require_root()


@pytest.fixture(name="require_root")
def require_root_fixture() -> None:
    """Use in tests (or fixtures) that need the bed but are not marked ``integration``."""
    require_root()


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> ThrowawayCA:
    """A throw-away CA for the whole session (clients trust ``test_ca.ca_file``)."""
    return ThrowawayCA.create(tmp_path_factory.mktemp("test-ca"))


def _keep_log(server: Prosody, directory: Path, name: str) -> None:
    with contextlib.suppress(OSError):
        shutil.copyfile(server.log_path, directory / f"{name}.log")


@pytest.fixture
def prosody_factory(
    request: pytest.FixtureRequest, tmp_path: Path, test_ca: ThrowawayCA
) -> Iterator[Callable[..., Prosody]]:
    """Make Prosody servers: ``prosody_factory(tls=False)``, ``(cert=..., start=False)``...

    Keyword arguments go to :class:`tests.kit.prosody.Prosody`; TLS servers default to the
    session ``test_ca``. Servers are started unless ``start=False``, and all are stopped and
    removed at teardown (their logs are copied into the test's ``tmp_path``).
    """
    require_root()
    made: list[Prosody] = []

    def make(*, start: bool = True, **kwargs: Any) -> Prosody:
        if kwargs.get("tls", True):
            kwargs.setdefault("ca", test_ca)
        server = Prosody(**kwargs)
        made.append(server)
        if start:
            server.start()
        return server

    yield make
    for i, server in enumerate(made):
        _keep_log(server, tmp_path, f"prosody{i}")
    stop_all(made, close=True)


@pytest.fixture(scope="session")
def prosody_tls(
    tmp_path_factory: pytest.TempPathFactory, test_ca: ThrowawayCA
) -> Iterator[Prosody]:
    """One TLS-only Prosody on loopback for the session, domain ``svpn.test``, kit CA.

    Share it between tests by using :func:`unique_user` account names.
    """
    require_root()
    server = Prosody(domain=DEFAULT_DOMAIN, host="127.0.0.1", tls=True, ca=test_ca)
    try:
        server.start()
        yield server
    finally:
        _keep_log(server, tmp_path_factory.getbasetemp(), "prosody_tls")
        server.close()


@pytest.fixture
def netns_factory() -> Iterator[NetLab]:
    """A :class:`tests.kit.netns.NetLab`: ``ns = netns_factory("a")``, ``.veth(...)``,
    ``.topology()``. Every namespace (and process in it) is removed at teardown."""
    require_root()
    lab = NetLab()
    try:
        yield lab
    finally:
        lab.cleanup()


@pytest.fixture
def unique_user() -> Callable[[str], str]:
    """``unique_user("alice")`` -> an account name no other test uses (share ``prosody_tls``)."""
    return _unique_user
