"""The runner confirms uploads with storage clients it keeps open across jobs (one per
distinct destination settings): opening one costs tens of milliseconds of CPU on the event
loop the replica's scheduler shares (benchmarks/scheduler_fire_lag.py). A client whose use
failed is closed and never used again."""

from __future__ import annotations

from collections import Counter

from backup import jobs
from backup.runner import JobRunner
from storage import S3Settings, open_store
from storage.base import ObjectStore
from tests.runner.conftest import GoRig, runner_settings, seed_instance, seed_plan, until
from tests.servers.s3 import SeaweedS3


class CountingOpener:
    """``open_store`` that counts the stores it opened and those closed again."""

    def __init__(self) -> None:
        self.opened: Counter[str] = Counter()
        self.closed: Counter[str] = Counter()

    def __call__(self, settings: S3Settings) -> ObjectStore:  # type: ignore[override]
        store = open_store(settings)
        self.opened[settings.bucket] += 1
        close = store.aclose

        async def aclose() -> None:
            self.closed[settings.bucket] += 1
            await close()

        store.aclose = aclose  # type: ignore[method-assign]
        return store


def _runner(go: GoRig, opener: CountingOpener) -> JobRunner:
    return JobRunner(
        go.db, go.box, runner_settings(), replica_id="replica-a", clock=go.clock, opener=opener
    )


async def test_destinations_with_the_same_settings_share_one_client(
    go: GoRig, s3_server: SeaweedS3
) -> None:
    other = s3_server.settings()  # another bucket: other settings, another client
    opener = CountingOpener()
    runner = _runner(go, opener)
    try:
        queued = [(await go.backup())[2] for _ in range(3)]
        instance = await seed_instance(go.db, go.box, agent_url=go.agent.url)
        plan = await seed_plan(go.db, go.box, instance, other)
        queued.append(await jobs.start_backup(go.db, plan))
        await runner.run_once()
        for job in queued:
            done = await go.final(job["_id"])
            assert done["status"] == "SUCCEEDED", done["reason"]
        assert opener.opened == {go.s3.bucket: 1, other.bucket: 1}
        assert not opener.closed  # kept open for the next backups
        points = await go.db.restore_points.find({}).to_list()
        assert len(points) == 4
        stored = set(s3_server.keys(go.s3.bucket)) | set(s3_server.keys(other.bucket))
        assert {i["key"] for p in points for i in p["items"]} <= stored
    finally:
        await runner.stop()
        s3_server.drop_bucket(other.bucket)
    assert opener.closed == opener.opened  # closed when the runner stops


async def test_a_client_that_failed_is_not_used_again(
    go: GoRig, s3_private_server: SeaweedS3
) -> None:
    s3 = s3_private_server.settings()
    opener = CountingOpener()
    runner = _runner(go, opener)
    try:
        instance = await seed_instance(go.db, go.box, agent_url=go.agent.url)
        plan = await seed_plan(go.db, go.box, instance, s3, items=["orders"])
        job = await jobs.start_backup(go.db, plan)
        await runner.run_once()

        async def uploaded() -> bool:
            state = go.agent.jobs.get(("backup", f"{job['_id']}-0"))
            return state is not None and state["status"] == "SUCCEEDED"

        await until(uploaded, what="the agent's upload")  # the manager has not polled yet
        s3_private_server.stop()
        done = await go.final(job["_id"])
        assert done["status"] == "FAILED"
        assert "could not be confirmed in storage" in done["reason"]
        assert runner.object_stores.opened == 1
        assert opener.closed == opener.opened  # the failed client is closed at once

        s3_private_server.start()
        job = await jobs.start_backup(go.db, plan)
        await runner.run_once()
        done = await go.final(job["_id"])
        assert done["status"] == "SUCCEEDED", done["reason"]
        assert runner.object_stores.opened == 2  # a new client, not the failed one
    finally:
        await runner.stop()
