"""A backup whose destination was stored before today's checks of endpoint and region (no
storage client accepts it) fails, saying which setting to correct, instead of crashing the run
(issue 14, finding 5)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from pydantic import SecretStr

from broker.context import SECRETS
from storage import S3Settings
from tests.runner.conftest import final, seed_instance, seed_plan
from tests.servers.broker import BROKER_PASSWORD, BROKER_USER, start_service, stop_service


async def test_a_backup_to_a_destination_no_client_accepts_fails_saying_why(
    mongo_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNNER_POLL_SECONDS", "3600")  # only the API's signal wakes it
    svc = await start_service(mongo_url, tmp_path, loops=True)
    try:
        store, box = svc.db, svc.app[SECRETS]
        instance = await seed_instance(store, box, agent_url="http://127.0.0.1:9")
        settings = S3Settings(
            endpoint="http://127.0.0.1:9",
            bucket="bucket",
            access_key_id="AKIDRUNNER",
            secret_access_key=SecretStr("runner-invalid-secret"),
        )
        plan = await seed_plan(store, box, instance, settings)
        await store.destinations.update_one(
            {"_id": plan["destination_id"]}, {"$set": {"region": "bad region!"}}
        )
        async with svc.http.post(
            f"{svc.url}/v1/service_instances/{instance['_id']}/plans/{plan['_id']}/backups",
            headers={"Authorization": aiohttp.encode_basic_auth(BROKER_USER, BROKER_PASSWORD)},
        ) as r:
            body = await r.json()
            assert r.status == 202, body
        done = await final(store, body["id"], timeout=60)
    finally:
        await stop_service(svc)
    assert done["status"] == "FAILED", done
    assert "no longer accepted (region:" in done["reason"], done
