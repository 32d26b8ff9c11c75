"""The service with its background loops (scheduler, runner, retention) and quick agent
polling, for the end-to-end tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.servers.broker import Service, start_service, stop_service


@pytest.fixture
async def service(
    mongo_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Service]:
    monkeypatch.setenv("RUNNER_AGENT_POLL_MIN_SECONDS", "0.2")
    monkeypatch.setenv("RUNNER_AGENT_POLL_MAX_SECONDS", "0.5")
    svc = await start_service(mongo_url, tmp_path, loops=True)
    yield svc
    await stop_service(svc)
