"""Restore drills (backup/drill.py) run by the job runner against real parts: our agent as a
real process with the PostgreSQL example scripts and this machine's PostgreSQL (the verify
script restores into a scratch database it creates and drops), the Go agent's stand-in
(manager-side: download and checksum only), real S3 (SeaweedFS) and the embedded database."""

from __future__ import annotations

import socket
import subprocess
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from backup import jobs
from backup.database import Database
from backup.secrets import SecretBox
from storage import S3Settings
from tests.agent.helpers import PASSWORD, ROOT, USER, AgentProcess
from tests.conftest import skip_unless_available
from tests.runner.conftest import (
    GoRig,
    RunnerFactory,
    final,
    seed_instance,
    seed_plan,
    until,
)
from tests.servers.s3 import SeaweedS3

EXAMPLES = ROOT / "agent" / "examples" / "postgresql"


def _psql(sql: str, db: str = "postgres") -> str:
    return subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", db, "-qAtX", "-v",
         "ON_ERROR_STOP=1", "-c", sql],
        check=True, capture_output=True, timeout=120, text=True,
    ).stdout  # fmt: skip


@pytest.fixture
def live_db() -> Any:
    """A live database on the machine's PostgreSQL, dropped afterwards."""
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=2).close()
    except OSError:
        skip_unless_available("PostgreSQL is not running on 127.0.0.1:5432")
    name = f"drill_live_{uuid.uuid4().hex[:10]}"
    _psql(f"create database {name}")
    _psql(
        "create table orders (id int primary key, what text);"
        "insert into orders select i, 'order ' || i from generate_series(1, 500) i;",
        name,
    )
    yield name
    _psql(f"drop database if exists {name} with (force)")


def _scratch_databases() -> list[str]:
    out = _psql("select datname from pg_database where datname like 'osb_drill_%'")
    return out.split()


async def test_drill_with_our_agent_restores_into_a_scratch_database_not_the_live_one(
    store: Database,
    box: SecretBox,
    s3_settings: S3Settings,
    make_agent: Callable[..., AgentProcess],
    make_runner: RunnerFactory,
    live_db: str,
) -> None:
    agent = make_agent(scripts=EXAMPLES)
    instance = await seed_instance(
        store,
        box,
        agent_url=f"http://127.0.0.1:{agent.port}",
        username=USER,
        password=PASSWORD,
        items=[live_db],
    )
    await store.instances.update_one(
        {"_id": instance["_id"]}, {"$set": {"database.username": "postgres"}}
    )
    plan = await seed_plan(store, box, instance, s3_settings, encryption=True, compression=True)
    runner = make_runner(clock=None, agent_poll_min_seconds=0.2, agent_poll_max_seconds=0.5)
    backup = await jobs.start_backup(store, plan)
    await runner.run_once()
    done = await final(store, backup["_id"])
    assert done["status"] == "SUCCEEDED", (done["reason"], done["items"])
    point = await store.restore_points.find_one({"_id": backup["_id"]})
    assert point["items"][0]["encryption"] == "aes-256-gcm-stream-v1"

    # The live database changes after the backup: a restore would undo this, a drill not.
    _psql("insert into orders values (10001, 'after the backup')", live_db)
    before = _psql("select count(*), max(id) from orders", live_db)
    scratch_before = _scratch_databases()

    drill = await jobs.start_drill(store, plan, point)
    assert drill["type"] == "DRILL" and drill["restore_point_id"] == point["_id"]
    await runner.run_once()
    done = await final(store, drill["_id"])
    assert done["status"] == "SUCCEEDED", (done["reason"], done["items"])
    outcome = done["drill"]
    assert outcome["outcome"] == "passed" and outcome["kind"] == "agent"
    assert outcome["verify_script"] is True
    timings = outcome["timings"]
    print("drill timings (agent, PostgreSQL, encrypted and compressed):", timings)
    assert timings["download_seconds"] > 0
    assert timings["decrypt_seconds"] is not None and timings["decrypt_seconds"] >= 0
    assert timings["verify_seconds"] > 0
    (item,) = done["items"]
    assert "restored into scratch database osb_drill_" in item["logs"]["verify_log"]
    assert "1 tables" in item["logs"]["verify_log"]

    # the restore point and the plan say it was proved
    proved = await store.restore_points.find_one({"_id": point["_id"]})
    assert proved["last_drill"]["job_id"] == drill["_id"]
    assert proved["last_drill"]["outcome"] == "passed"
    assert proved["last_drill"]["timings"] == timings
    assert (await store.plans.find_one({"_id": plan["_id"]}))["last_drill"]["job_id"] == drill[
        "_id"
    ]

    # the live database was untouched, and the scratch database is gone
    assert _psql("select count(*), max(id) from orders", live_db) == before
    assert "10001" in before
    assert _scratch_databases() == scratch_before
    # no restore stage ran on the agent
    assert "restore" not in " ".join(item["logs"])


async def test_a_failing_verify_script_fails_the_drill_with_its_reason(
    store: Database,
    box: SecretBox,
    s3_settings: S3Settings,
    make_agent: Callable[..., AgentProcess],
    make_runner: RunnerFactory,
    tmp_path: Any,
) -> None:
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "backup").write_text('#!/bin/sh\necho dump > "$BACKUP_DIRECTORY/x.txt"\n')
    (scripts / "restore").write_text('#!/bin/sh\necho restored >> "$TRACE"\n')
    (scripts / "verify").write_text(
        '#!/bin/sh\necho "verify $RESTORE_FILE" >> "$TRACE"\necho "no tables found" >&2\nexit 3\n'
    )
    for script in scripts.iterdir():
        script.chmod(0o755)
    agent = make_agent(scripts=scripts)
    instance = await seed_instance(
        store, box, agent_url=f"http://127.0.0.1:{agent.port}", username=USER, password=PASSWORD
    )
    plan = await seed_plan(store, box, instance, s3_settings, items=["orders"])
    runner = make_runner(clock=None, agent_poll_min_seconds=0.2, agent_poll_max_seconds=0.5)
    backup = await jobs.start_backup(store, plan)
    await runner.run_once()
    assert (await final(store, backup["_id"]))["status"] == "SUCCEEDED"
    point = await store.restore_points.find_one({"_id": backup["_id"]})

    drill = await jobs.start_drill(store, plan)  # the plan's newest point, chosen at start
    assert drill["restore_point_id"] is None
    await runner.run_once()
    done = await final(store, drill["_id"])
    assert done["status"] == "FAILED"
    assert done["restore_point_id"] == point["_id"]
    assert "verify" in done["reason"] and "no tables found" in done["reason"], done["reason"]
    assert done["drill"]["outcome"] == "failed" and done["drill"]["reason"] == done["reason"]
    proved = await store.restore_points.find_one({"_id": point["_id"]})
    assert proved["last_drill"]["outcome"] == "failed"
    trace = agent.trace_lines()
    assert any(line.startswith("verify ") for line in trace)
    assert "restored" not in trace  # never the restore script


async def test_manager_side_drill_with_the_go_agent(go: GoRig) -> None:
    _, plan, backup = await go.backup(items=["orders"])
    runner = go.make_runner()
    await runner.run_once()
    assert (await go.final(backup["_id"]))["status"] == "SUCCEEDED"
    point = await go.db.restore_points.find_one({"_id": backup["_id"]})

    drill = await jobs.start_drill(go.db, plan, point)
    await runner.run_once()
    done = await go.final(drill["_id"])
    assert done["status"] == "SUCCEEDED", (done["reason"], done["items"])
    assert done["drill"]["kind"] == "manager" and done["drill"]["outcome"] == "passed"
    assert done["drill"]["timings"]["download_seconds"] is not None
    assert done["drill"]["timings"]["decrypt_seconds"] is None
    assert done["drill"]["verify_script"] is None
    (item,) = done["items"]
    assert "manager-side: download and checksum only" in item["logs"]["manager_drill_log"]
    assert not [k for k in go.agent.starts if k.startswith(drill["_id"])]  # agent not asked
    proved = await go.db.restore_points.find_one({"_id": point["_id"]})
    assert proved["last_drill"]["outcome"] == "passed"
    assert proved["last_drill"]["kind"] == "manager"


async def test_manager_side_drill_of_a_corrupted_object_fails_with_the_reason(
    go: GoRig, s3_server: SeaweedS3
) -> None:
    _, plan, backup = await go.backup(items=["orders"])
    runner = go.make_runner()
    await runner.run_once()
    assert (await go.final(backup["_id"]))["status"] == "SUCCEEDED"
    point = await go.db.restore_points.find_one({"_id": backup["_id"]})
    (item,) = point["items"]
    s3_server.client().put_object(Bucket=go.s3.bucket, Key=item["key"], Body=b"truncated")

    drill = await jobs.start_drill(go.db, plan, point)
    await runner.run_once()
    done = await go.final(drill["_id"])
    assert done["status"] == "FAILED"
    reason = done["reason"]
    assert item["key"] in reason and "corrupt" in reason, reason
    assert "manager-side: download and checksum only" in reason
    assert done["drill"]["outcome"] == "failed" and done["drill"]["kind"] == "manager"
    proved = await go.db.restore_points.find_one({"_id": point["_id"]})
    assert proved["last_drill"]["outcome"] == "failed"
    assert proved["last_drill"]["reason"] == reason


async def test_manager_side_drill_checks_a_recorded_checksum(
    go: GoRig, s3_server: SeaweedS3
) -> None:
    """Same size, other bytes: only the checksum tells (recorded here as our agent would)."""
    _, plan, backup = await go.backup(items=["orders"])
    runner = go.make_runner()
    await runner.run_once()
    assert (await go.final(backup["_id"]))["status"] == "SUCCEEDED"
    point = await go.db.restore_points.find_one({"_id": backup["_id"]})
    (item,) = point["items"]
    client = s3_server.client()
    stored = client.get_object(Bucket=go.s3.bucket, Key=item["key"])["Body"].read()
    import hashlib

    await go.db.restore_points.update_one(
        {"_id": point["_id"]},
        {"$set": {"items.0.checksum": "sha256:" + hashlib.sha256(stored).hexdigest()}},
    )
    client.put_object(Bucket=go.s3.bucket, Key=item["key"], Body=b"X" * len(stored))
    point = await go.db.restore_points.find_one({"_id": point["_id"]})
    drill = await jobs.start_drill(go.db, plan, point)
    await runner.run_once()
    done = await go.final(drill["_id"])
    assert done["status"] == "FAILED"
    assert "does not match the checksum" in done["reason"], done["reason"]


async def test_a_plan_without_restore_points_fails_its_drill_saying_so(go: GoRig) -> None:
    instance = await seed_instance(go.db, go.box, agent_url=go.agent.url)
    plan = await seed_plan(go.db, go.box, instance, go.s3)
    # a webhook of the instance that wants failed drills (backup/webhooks.py)
    await go.db.webhooks.insert_one(
        {
            "_id": "hook-1",
            "instance_id": instance["_id"],
            "enabled": True,
            "events": ["drill.failed"],
        }
    )
    drill = await jobs.start_drill(go.db, plan)
    runner = go.make_runner()
    await runner.run_once()
    done = await go.final(drill["_id"])
    assert done["status"] == "FAILED"
    assert "no available restore point" in done["reason"]
    assert done["drill"]["outcome"] == "failed"
    assert (await go.db.plans.find_one({"_id": plan["_id"]}))["last_drill"]["outcome"] == "failed"
    # queued just after the job's final state is written: wait for it
    await until(
        lambda: go.db.webhook_deliveries.find_one({"webhook_id": "hook-1"}),
        what="the drill.failed delivery",
        timeout=10,
    )
    [delivery] = await go.db.webhook_deliveries.find({"webhook_id": "hook-1"}).to_list()
    assert delivery["event_type"] == "drill.failed" and delivery["subject"] == drill["_id"]
    assert "no available restore point" in delivery["body"]


async def test_one_drill_of_a_plan_at_a_time(go: GoRig) -> None:
    instance = await seed_instance(go.db, go.box, agent_url=go.agent.url)
    plan = await seed_plan(go.db, go.box, instance, go.s3)
    await jobs.start_drill(go.db, plan)
    with pytest.raises(jobs.Conflict) as refused:
        await jobs.start_drill(go.db, plan)
    assert refused.value.code == "job_active"
