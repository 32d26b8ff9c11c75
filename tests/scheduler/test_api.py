"""Scheduling through the HTTP API: what a user sees of pause, resume, reschedule and the
misfire policy, with the scheduler run against the service's database at chosen moments."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from backup import schedule
from backup.clock import ManualClock
from scheduler import Scheduler
from tests.api.conftest import Api, plan_body
from tests.scheduler.conftest import scheduler_settings
from tests.scheduler.test_scheduler import until


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def run_at(api: Api, moment: datetime, **settings: Any) -> int:
    """One scheduler pass over the service's database, as if it were ``moment``."""
    s = Scheduler(
        api.db, scheduler_settings(**settings), replica_id="test", clock=ManualClock(moment)
    )
    return await s.run_once()


async def jobs_of(api: Api, instance: str, plan_id: str) -> list[dict[str, Any]]:
    status, body = await api.call("GET", f"/jobs?plan_id={plan_id}", instance=instance)
    assert status == 200, body
    return sorted(body["items"], key=lambda j: j["scheduled_for"] or "")


async def test_a_paused_plan_fires_nothing_and_resuming_schedules_from_now(
    api: Api, instance: str, plan: dict
) -> None:
    fire = at(plan["next_run_at"])
    status, paused = await api.call(
        "PATCH", f"/plans/{plan['id']}", instance=instance, json={"paused": True}
    )
    assert status == 200 and paused["paused"] is True and paused["next_run_at"] is None
    assert await run_at(api, fire + timedelta(seconds=1)) == 0
    assert await run_at(api, fire + timedelta(days=3)) == 0  # days later: nothing missed either
    assert await jobs_of(api, instance, plan["id"]) == []
    before = datetime.now(UTC)
    status, resumed = await api.call(
        "PATCH", f"/plans/{plan['id']}", instance=instance, json={"paused": False}
    )
    after = datetime.now(UTC)
    assert status == 200 and resumed["paused"] is False
    nxt = at(resumed["next_run_at"])
    assert (
        schedule.next_fire_time("0 3 * * *", "Europe/Berlin", before)
        <= nxt
        <= schedule.next_fire_time("0 3 * * *", "Europe/Berlin", after)
    )
    assert await run_at(api, nxt) == 1
    [job] = await jobs_of(api, instance, plan["id"])
    assert job["trigger"] == "SCHEDULE" and job["status"] == "QUEUED"
    assert at(job["scheduled_for"]) == nxt
    status, shown = await api.call("GET", f"/plans/{plan['id']}", instance=instance)
    assert shown["last_job"]["id"] == job["id"] and at(shown["next_run_at"]) > nxt


async def test_changing_frequency_or_zone_reschedules_at_once(
    api: Api, instance: str, plan: dict
) -> None:
    old = at(plan["next_run_at"])  # 03:00 Berlin
    status, changed = await api.call(
        "PATCH",
        f"/plans/{plan['id']}",
        instance=instance,
        json={"frequency": "30 22 * * *", "timezone": "America/New_York"},
    )
    assert status == 200, changed
    new = at(changed["next_run_at"])
    zone = "America/New_York"
    assert new == schedule.next_fire_time("30 22 * * *", zone, new - timedelta(days=1))
    assert new.astimezone(schedule.zone("America/New_York")).strftime("%H:%M") == "22:30"
    if old < new:  # the old time no longer fires
        assert await run_at(api, old + timedelta(seconds=1)) == 0
    assert await run_at(api, new) == 1
    [job] = await jobs_of(api, instance, plan["id"])
    assert at(job["scheduled_for"]) == new


async def test_the_running_loop_wakes_on_a_change_made_through_the_api(
    api: Api, instance: str, destination: dict
) -> None:
    s = Scheduler(api.db, scheduler_settings(poll_seconds=300), replica_id="loop")
    await s.start()
    try:
        await until(lambda: s.next_wake_at is not None)
        passes = s.stats.passes
        status, plan = await api.call(
            "POST", "/plans", instance=instance, json=plan_body(destination["id"])
        )
        assert status == 201
        await until(lambda: s.stats.passes > passes and s.next_wake_at is not None, timeout=30)
        passes = s.stats.passes
        status, _ = await api.call(
            "PATCH", f"/plans/{plan['id']}", instance=instance, json={"paused": True}
        )
        assert status == 200
        await until(lambda: s.stats.passes > passes, timeout=30)
    finally:
        await s.stop()
    assert not s.running


async def test_an_outage_shows_in_the_jobs_api_as_missed_runs_and_one_catch_up(
    api: Api, instance: str, destination: dict
) -> None:
    status, plan = await api.call(
        "POST",
        "/plans",
        instance=instance,
        json=plan_body(destination["id"], frequency="0 * * * *", timezone="UTC"),
    )
    assert status == 201, plan
    first = at(plan["next_run_at"])
    back = first + timedelta(hours=4, minutes=20)  # every replica was down until then
    assert await run_at(api, back) == 1
    missed, caught = await jobs_of(api, instance, plan["id"])
    assert missed["status"] == "MISSED" and at(missed["scheduled_for"]) == first
    assert missed["reason"].startswith("Missed 4 runs scheduled from ")
    assert "no scheduler was running" in missed["reason"]
    assert at(missed["missed"]["first"]) == first
    assert at(missed["missed"]["last"]) == first + timedelta(hours=3)
    assert missed["missed"]["count"] == 4 and missed["missed"]["exact"] is True
    assert caught["trigger"] == "CATCH_UP" and caught["status"] == "QUEUED"
    assert at(caught["scheduled_for"]) == first + timedelta(hours=4)
    status, listed = await api.call("GET", "/jobs?status=MISSED", instance=instance)
    assert status == 200 and [j["id"] for j in listed["items"]] == [missed["id"]]
