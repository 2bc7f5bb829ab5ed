"""Fixtures for integration tests with real agents (`socialvpn up` subprocesses)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kit.agents import AgentProc
from tests.kit.prosody import Prosody


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Callable[..., AgentProc]]:
    """``agent_factory(prosody, "alice", password=None, start=True)`` → a signed-up agent.

    The account is registered on ``prosody`` with ``password`` (default: a fixed test one);
    ``login_password`` lets a test start the agent with a different (wrong) password. All
    agents are stopped at teardown; their logs stay in ``tmp_path``.
    """
    made: list[AgentProc] = []

    def make(prosody: Prosody, user: str, *, password: str = "correct horse",
             login_password: str | None = None, start: bool = True, register: bool = True,
             **kwargs: Any) -> AgentProc:
        if register:
            prosody.register(user, password)
        kwargs.setdefault("ca_file", prosody.ca_file)
        if kwargs.get("netns") is None:
            # In the root namespace an agent must not make TUN devices: signalling only.
            kwargs.setdefault("extra_config", "[link]\nenabled = false")
        agent = AgentProc(tmp_path / f"{user}-{len(made)}", f"{user}@{prosody.domain}",
                          login_password if login_password is not None else password,
                          server=f"{prosody.host}:{prosody.port}", **kwargs)
        made.append(agent)
        agent.init()
        if start:
            agent.start()
        return agent

    yield make
    for agent in made:
        agent.stop()
