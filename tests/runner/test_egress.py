"""The job runner's agent calls keep to the egress policy: a job whose agent is on an address
the manager may not reach fails, saying why, and nothing connects to that address."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from pydantic import SecretStr

from broker.context import SECRETS
from storage import S3Settings
from tests.runner.conftest import final, seed_instance, seed_plan
from tests.servers.broker import BROKER_PASSWORD, BROKER_USER, start_service, stop_service
from tests.servers.listener import start_listener


async def test_a_job_whose_agent_is_on_a_denied_address_fails_without_connecting(
    mongo_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNNER_POLL_SECONDS", "3600")  # only the API's signal wakes it
    denied = await start_listener("127.0.0.2")  # denied by the tests' policy (TEST_EGRESS)
    svc = await start_service(mongo_url, tmp_path, loops=True)
    try:
        store, box = svc.db, svc.app[SECRETS]
        # Stored as an agent registered before the policy, or whose name moved since.
        instance = await seed_instance(store, box, agent_url=denied.url)
        settings = S3Settings(
            endpoint="http://127.0.0.1:9",
            bucket="bucket",
            access_key_id="AKIDRUNNER",
            secret_access_key=SecretStr("runner-egress-secret"),
        )
        plan = await seed_plan(store, box, instance, settings)
        async with svc.http.post(
            f"{svc.url}/v1/service_instances/{instance['_id']}/plans/{plan['_id']}/backups",
            headers={"Authorization": aiohttp.encode_basic_auth(BROKER_USER, BROKER_PASSWORD)},
        ) as r:
            body = await r.json()
            assert r.status == 202, body
        done = await final(store, body["id"], timeout=60)
    finally:
        await stop_service(svc)
        await denied.close()
    assert done["status"] == "FAILED", done
    assert "127.0.0.2" in done["reason"] and "EGRESS_DENY_NETWORKS" in done["reason"], done
    assert denied.connections == 0
