from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agent.helpers import AgentProcess, tracing_scripts


@pytest.fixture
def make_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Start an agent process with the given env overrides (scripts: tracing set unless
    ``scripts`` is given); every agent started is stopped at teardown."""
    started: list[AgentProcess] = []

    def make(scripts: Path | None = None, **env: Any) -> AgentProcess:
        base = tmp_path / f"agent{len(started)}"
        base.mkdir()
        if scripts is None:
            scripts = base / "scripts"
            tracing_scripts(scripts)
        agent = AgentProcess(base, scripts, **env)
        started.append(agent)
        return agent.start()

    yield make
    for agent in started:
        agent.kill()


@pytest.fixture
def agent(make_agent: Callable[..., AgentProcess]) -> AgentProcess:
    return make_agent()
