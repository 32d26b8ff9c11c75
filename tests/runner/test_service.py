"""The service with its background loops: a backup queued through the API is run by the
replica's runner (woken by the ``jobs_queued`` signal), and ``GET /metrics`` counts it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backup import jobs
from backup.database import Database
from broker.context import REPLICA_ID, RUNNER, SECRETS, SWEEPER
from storage import S3Settings
from tests.runner.conftest import final, seed_instance, seed_plan
from tests.runner.go_agent import GoAgentStandIn
from tests.servers.broker import BROKER_PASSWORD, BROKER_USER, start_service, stop_service


@pytest.fixture(autouse=True)
def _fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNER_AGENT_POLL_MIN_SECONDS", "0.1")
    monkeypatch.setenv("RUNNER_AGENT_POLL_MAX_SECONDS", "0.3")
    monkeypatch.setenv("RUNNER_POLL_SECONDS", "3600")  # only the signal can wake it


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def _backup_now(http: aiohttp.ClientSession, url: str, instance_id: str, plan_id: str) -> str:
    async with http.post(
        f"{url}/v1/service_instances/{instance_id}/plans/{plan_id}/backups",
        headers={"Authorization": aiohttp.encode_basic_auth(BROKER_USER, BROKER_PASSWORD)},
    ) as r:
        body = await r.json()
        assert r.status == 202, body
        return body["id"]


async def test_the_runner_runs_what_the_api_queues_and_metrics_count_it(
    mongo_url: str, tmp_path: Path, go_agent: GoAgentStandIn, s3_settings: S3Settings
) -> None:
    svc = await start_service(mongo_url, tmp_path, loops=True)
    try:
        app = svc.server.app
        assert RUNNER in app and app[REPLICA_ID]
        store: Database = svc.db
        box = app[SECRETS]
        instance = await seed_instance(store, box, agent_url=go_agent.url)
        plan = await seed_plan(store, box, instance, s3_settings)
        job_id = await _backup_now(svc.http, svc.url, instance["_id"], plan["_id"])
        done = await final(store, job_id, timeout=60)
        assert done["status"] == "SUCCEEDED", done["reason"]

        # The job's final state is written before its run has ended on the runner (its
        # webhook event is queued after): wait for the runner to count it done.
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            async with svc.http.get(f"{svc.url}/metrics") as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
                text = await r.text()
            samples = _samples(text)
            active = samples[("backup_runner_active_jobs", ())]
            if active == 0 or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.05)
        assert (
            samples[("backup_jobs_finished_total", (("status", "SUCCEEDED"), ("type", "BACKUP")))]
            == 1
        )
        assert (
            samples[("backup_jobs_started_total", (("trigger", "MANUAL"), ("type", "BACKUP")))] == 1
        )
        assert samples[("backup_jobs", (("status", "SUCCEEDED"),))] == 1
        assert samples[("backup_jobs", (("status", "QUEUED"),))] == 0
        assert samples[("backup_stored_bytes_total", ())] == 2 * len(go_agent.payload)
        assert (
            samples[
                ("backup_job_duration_seconds_count", (("status", "SUCCEEDED"), ("type", "BACKUP")))
            ]
            == 1
        )
        assert samples[("backup_metrics_database_up", ())] == 1
        assert samples[("backup_runner_active_jobs", ())] == 0
        # RUNNER_CONCURRENCY at its default (4), the window never halved: 4
        assert samples[("backup_runner_claim_window", ())] == 4
        # a scheduled fire: how late it started is observed
        scheduled = jobs.new_job(
            instance_id=instance["_id"],
            type="BACKUP",
            plan_id=plan["_id"],
            destination_id=plan["destination_id"],
            trigger="SCHEDULE",
            items=[jobs.new_item("orders")],
            compression=True,
            encryption={"enabled": False},
            scheduled_for=datetime.now(UTC) - timedelta(seconds=5),
        )
        await store.jobs.insert_one(scheduled)
        store.events.jobs_queued.fire()
        assert (await final(store, scheduled["_id"], timeout=60))["status"] == "SUCCEEDED"
        async with svc.http.get(f"{svc.url}/metrics") as r:
            samples = _samples(await r.text())
        assert samples[("backup_job_fire_lag_seconds_count", ())] == 1
        assert samples[("backup_job_fire_lag_seconds_sum", ())] >= 5
        assert samples[("backup_jobs", (("status", "SUCCEEDED"),))] == 2
        # counts only: nothing that identifies an instance, a plan, a job or a credential
        for private in (instance["_id"], plan["_id"], job_id, go_agent.url, s3_settings.bucket):
            assert private not in text
    finally:
        await stop_service(svc)


async def test_metrics_can_require_credentials(
    mongo_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METRICS_USERNAME", "scraper")
    monkeypatch.setenv("METRICS_PASSWORD", "scrape-PW-55120")
    svc = await start_service(mongo_url, tmp_path)
    try:
        async with svc.http.get(f"{svc.url}/metrics") as r:
            assert r.status == 401 and (await r.json())["error"] == "unauthorized"
        wrong = {"Authorization": aiohttp.encode_basic_auth("scraper", "nope-nope-nope")}
        async with svc.http.get(f"{svc.url}/metrics", headers=wrong) as r:
            assert r.status == 401
        right = {"Authorization": aiohttp.encode_basic_auth("scraper", "scrape-PW-55120")}
        async with svc.http.get(f"{svc.url}/metrics", headers=right) as r:
            assert r.status == 200 and "backup_jobs" in await r.text()
    finally:
        await stop_service(svc)


async def test_the_in_process_test_service_leaves_jobs_queued_by_default(
    mongo_url: str, tmp_path: Path, go_agent: GoAgentStandIn, s3_settings: S3Settings
) -> None:
    svc = await start_service(mongo_url, tmp_path)
    try:
        assert RUNNER not in svc.server.app
        box = svc.server.app[SECRETS]
        instance = await seed_instance(svc.db, box, agent_url=go_agent.url)
        plan = await seed_plan(svc.db, box, instance, s3_settings)
        job_id = await _backup_now(svc.http, svc.url, instance["_id"], plan["_id"])
        await asyncio.sleep(1)
        assert (await svc.db.jobs.find_one({"_id": job_id}))["status"] == "QUEUED"
        assert not go_agent.requests
    finally:
        await stop_service(svc)


async def test_the_service_sweeps_job_records_with_the_configured_history(
    mongo_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JOB_HISTORY_DAYS reaches the sweeper the service starts, not only a runner built by hand:
    a job that ended two days ago goes with a one-day history."""
    monkeypatch.setenv("JOB_HISTORY_DAYS", "1")
    monkeypatch.setenv("RETENTION_ENABLED", "false")  # the sweep runs when the test says
    svc = await start_service(mongo_url, tmp_path, loops=True)
    try:
        ended = datetime.now(UTC) - timedelta(days=2)
        old = jobs.new_job(
            instance_id="instance-h",
            type=jobs.JobType.BACKUP,
            plan_id="plan-h",
            destination_id="dest-h",
            trigger=jobs.Trigger.SCHEDULE,
            items=[jobs.new_item("orders")],
            compression=True,
            encryption={"enabled": False},
            status=jobs.JobStatus.SUCCEEDED,
        )
        old["created_at"], old["ended_at"] = ended - timedelta(minutes=5), ended
        await svc.db.jobs.insert_one(old)
        assert await svc.db.jobs.find_one({"_id": old["_id"]}) is not None, "pruned before"
        result = await svc.server.app[SWEEPER].run_once()
        assert result.jobs_pruned == 1
        assert await svc.db.jobs.find_one({"_id": old["_id"]}) is None
    finally:
        await stop_service(svc)
