from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.agent.helpers import AgentProcess


@pytest.fixture
def agent(make_agent: Callable[..., AgentProcess]) -> AgentProcess:
    return make_agent()
