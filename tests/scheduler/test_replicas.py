"""Three manager processes (``python -m broker``) on one database, real agents and real S3:
over many fires of minute-frequency plans, while one replica is killed (``kill -9``) right as
a minute fires and replaced, and another is stopped (SIGTERM), every fire has exactly one job,
and every job runs once on its agent."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from backup import schedule
from storage import S3Settings
from tests.agent.helpers import PASSWORD, USER, AgentProcess, tracing_scripts
from tests.runner.conftest import seed_instance, until
from tests.servers.managers import (  # noqa: F401 - fixtures
    ManagerProcess,
    SharedDatabase,
    managers,
    shared_database,
)
from tests.servers.s3 import SeaweedS3

SCHEDULES = [
    ("* * * * *", "UTC"),
    ("* * * * *", "Europe/Berlin"),
    ("*/2 * * * *", "Asia/Kolkata"),
    ("* * * * *", "America/New_York"),
]


async def _sleep_until(at: datetime) -> None:
    await asyncio.sleep(max(0.0, (at - datetime.now(UTC)).total_seconds()))


def _minute_after(at: datetime) -> datetime:
    return at.replace(second=0, microsecond=0) + timedelta(minutes=1)


@pytest.mark.slow
async def test_every_fire_has_exactly_one_job_across_three_replicas(
    tmp_path: Path,
    shared_database: SharedDatabase,  # noqa: F811
    s3_server: SeaweedS3,
    s3_settings: S3Settings,
    managers: Callable[..., list[ManagerProcess]],  # noqa: F811
) -> None:
    store, box = shared_database.db, shared_database.box
    agents: list[AgentProcess] = []
    try:
        instances = []
        for i in range(3):
            scripts = tmp_path / f"scripts-{i}"
            tracing_scripts(scripts)
            agent = AgentProcess(tmp_path / f"agent-{i}", scripts).start()
            agents.append(agent)
            instances.append(
                await seed_instance(
                    store,
                    box,
                    agent_url=f"http://127.0.0.1:{agent.port}",
                    username=USER,
                    password=PASSWORD,
                )
            )
        env = {
            **shared_database.env,
            "MIN_PLAN_INTERVAL_SECONDS": "0",
            "SCHEDULER_POLL_SECONDS": "2",
            "RUNNER_LEASE_SECONDS": "5",
            "RUNNER_POLL_SECONDS": "1",
            "RUNNER_AGENT_POLL_MIN_SECONDS": "0.2",
            "RUNNER_AGENT_POLL_MAX_SECONDS": "0.5",
            "RUNNER_VERIFY_UPLOADS": "true",
        }
        replicas = await asyncio.to_thread(managers, 3, **env)

        plans = []
        for n, instance in enumerate(instances):
            base = f"/v1/service_instances/{instance['_id']}"
            dest = await replicas[n % 3].create_s3_destination(instance["_id"], s3_settings)
            for k, (frequency, tz) in enumerate(SCHEDULES):
                status, plan = await replicas[(n + k) % 3].api(
                    "POST",
                    f"{base}/plans",
                    {
                        "name": f"every-minute-{k}",
                        "destination_id": dest["id"],
                        "frequency": frequency,
                        "timezone": tz,
                        "retention": {"style": "FILES", "period": 100},
                    },
                )
                assert status == 201, plan
                plans.append(plan)

        first = min(datetime.fromisoformat(p["next_run_at"]) for p in plans)
        # A replica killed as a minute fires (mid-pass, maybe between a job and its plan's
        # advance), then replaced; a second one stopped gracefully a minute later.
        kill_at = first + timedelta(milliseconds=30)
        await _sleep_until(kill_at)
        replicas[0].kill()
        replacement = await asyncio.to_thread(managers, 1, **env)
        await _sleep_until(_minute_after(kill_at) + timedelta(seconds=20))
        await asyncio.to_thread(replicas[1].terminate)
        end = _minute_after(kill_at) + timedelta(minutes=1)
        await _sleep_until(end + timedelta(seconds=5))

        expected: dict[str, list[datetime]] = {}
        for plan in plans:
            start = datetime.fromisoformat(plan["next_run_at"]) - timedelta(microseconds=1)
            fires, _ = schedule.fires_between(
                plan["frequency"], plan["timezone"], start, end, limit=100
            )
            expected[plan["id"]] = fires
        total = sum(len(f) for f in expected.values())
        assert total >= 20  # many fires, across the kill and the stop

        async def recorded() -> bool:
            n = await store.jobs.count_documents({"scheduled_for": {"$lte": end}})
            return n >= total

        await until(recorded, timeout=60, what="every fire to be recorded")
        for plan in plans:
            got = (
                await store.jobs.find({"plan_id": plan["id"], "scheduled_for": {"$lte": end}})
                .sort([("scheduled_for", 1)])
                .to_list()
            )
            assert [j["scheduled_for"] for j in got] == expected[plan["id"]], plan["frequency"]
            assert all(j["trigger"] == "SCHEDULE" for j in got), [j["trigger"] for j in got]
            assert all(j["status"] != "MISSED" for j in got)

        async def all_final() -> bool:
            left = await store.jobs.count_documents(
                {"scheduled_for": {"$lte": end}, "status": {"$in": ["QUEUED", "RUNNING"]}}
            )
            return left == 0

        await until(all_final, timeout=240, what="every scheduled job to end")
        done = await store.jobs.find({"scheduled_for": {"$lte": end}}).to_list()
        failed = [(j["status"], j["reason"]) for j in done if j["status"] != "SUCCEEDED"]
        assert not failed, failed
        # each job ran once on its agent: one backup script run per item per job
        for agent, instance in zip(agents, instances, strict=True):
            ran = [line for line in agent.trace_lines() if line.startswith("backup ")]
            jobs_here = await store.jobs.count_documents(
                {"instance_id": instance["_id"], "status": "SUCCEEDED"}
            )
            assert len(ran) == 2 * jobs_here, (len(ran), jobs_here)
        fired_by = {m.index for m in [*replicas, *replacement] if m.logged("scheduler_fired")}
        print(f"{total} fires; replicas that queued jobs: {sorted(fired_by)}")
    finally:
        for agent in agents:
            agent.kill()
