"""The runner with our agent as a real process and real S3: capabilities detected from
``/status``, compression and encryption done by the agent, checksums recorded, a restore
that gets the original bytes back, and the agent killed in the middle of a job."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import tests.agent.helpers as helpers
from backup import jobs
from backup.database import Database, Document
from backup.runner import JobRunner
from backup.secrets import SecretBox
from storage import S3Settings, SwiftSettings, open_store
from tests.agent.helpers import PASSWORD, USER, AgentProcess
from tests.runner.conftest import RunnerFactory, final, seed_instance, seed_plan, until
from tests.servers.s3 import SeaweedS3

PAYLOAD = "row;" * 5000  # compressible, and recognisable in plaintext
BACKUP = (
    f'echo "backup $*" >> "$TRACE"; env > "$TRACE.backup.env"; printf "{PAYLOAD}" > '
    '"$BACKUP_DIRECTORY/$BACKUP_FILENAME.txt"; echo out-backup'
)
HANGING_BACKUP = 'echo "backup $*" >> "$TRACE"; sleep 60'
RESTORE = 'echo "restore $*" >> "$TRACE"; cat "$RESTORE_FILE" > "$TRACE.$BACKUP_DATABASE"'


def _read(path: str) -> str:
    return Path(path).read_text()


@dataclass
class Ours:
    """A runner test with our agent as a real process: the database, the secret box, and
    agents and runners (on the real clock) made on demand."""

    db: Database
    box: SecretBox
    make_agent: Callable[..., AgentProcess]
    make_runner: RunnerFactory

    def agent(self, backup: str = BACKUP) -> AgentProcess:
        return self.make_agent(backup_body=backup, restore_body=RESTORE)

    async def backup(
        self, agent: AgentProcess, settings: S3Settings | SwiftSettings, **plan_fields: Any
    ) -> tuple[Document, Document, Document]:
        """(instance, plan, job): a backup queued for a new instance of ``agent``."""
        url = f"http://127.0.0.1:{agent.port}"
        instance = await seed_instance(
            self.db, self.box, agent_url=url, username=USER, password=PASSWORD
        )
        plan = await seed_plan(self.db, self.box, instance, settings, **plan_fields)
        return instance, plan, await jobs.start_backup(self.db, plan)

    def runner(self, **settings: Any) -> JobRunner:
        """A runner polling the agent often."""
        return self.make_runner(
            clock=None, agent_poll_min_seconds=0.2, agent_poll_max_seconds=0.5, **settings
        )


@pytest.fixture
def ours(
    store: Database,
    box: SecretBox,
    make_agent: Callable[..., AgentProcess],
    make_runner: RunnerFactory,
) -> Ours:
    return Ours(store, box, make_agent, make_runner)


async def _backing_up(agent: AgentProcess) -> None:
    """Wait until the agent runs the backup script."""

    async def running() -> bool:
        return any(line.startswith("backup ") for line in agent.trace_lines())

    await until(running)


async def test_backup_and_restore_with_our_agent(
    ours: Ours, s3_server: SeaweedS3, s3_settings: S3Settings
) -> None:
    agent = ours.agent()
    instance, plan, job = await ours.backup(agent, s3_settings, encryption=True, compression=True)
    runner = ours.runner()
    assert await runner.run_once() == 1
    done = await final(ours.db, job["_id"])
    assert done["status"] == "SUCCEEDED", (done["reason"], done["items"])
    assert done["agent"]["kind"] == "ours" and done["agent"]["version"]
    point = await ours.db.restore_points.find_one({"_id": job["_id"]})
    client = s3_server.client()
    for item in point["items"]:
        assert item["compression"] == "zstd" and item["encryption"] == "aes-256-gcm-stream-v1"
        assert item["key"].startswith(f"{instance['_id']}/{plan['_id']}/")
        assert item["key"].endswith(".txt.zst.enc") and item["size"] == len(PAYLOAD)
        stored = client.get_object(Bucket=s3_settings.bucket, Key=item["key"])["Body"].read()
        assert len(stored) == item["stored_size"]
        assert item["checksum"] == "sha256:" + hashlib.sha256(stored).hexdigest()
        assert b"row;" not in stored  # no plaintext reached the storage
    # the scripts were told the agent does the transforms, so they did not
    env = helpers.script_env(agent.trace, "backup")
    assert env["AGENT_TRANSFORM_COMPRESSION"] == "zstd" and env["COMPRESSION"] == "false"
    assert "ENCRYPTION_KEY" not in env

    restore = await jobs.start_restore(ours.db, point, None)
    assert await runner.run_once() == 1
    done = await final(ours.db, restore["_id"])
    assert done["status"] == "SUCCEEDED", (done["reason"], done["items"])
    for name in ("orders", "customers"):
        assert _read(f"{agent.trace}.{name}") == PAYLOAD
    assert any(line.startswith("post-restore-unlock") for line in agent.trace_lines())


async def test_a_restore_whose_stored_object_changed_fails_before_the_restore_script(
    ours: Ours, s3_server: SeaweedS3, s3_settings: S3Settings
) -> None:
    """The runner sends the restore point's checksum; our agent verifies the download
    against it, so a stored object replaced behind the manager's back is never restored."""
    agent = ours.agent()
    # stored as the script wrote it: a changed object decodes, only its checksum tells
    _, _, job = await ours.backup(
        agent, s3_settings, items=["orders"], compression=False, encryption=False
    )
    runner = ours.runner()
    await runner.run_once()
    assert (await final(ours.db, job["_id"]))["status"] == "SUCCEEDED"
    point = await ours.db.restore_points.find_one({"_id": job["_id"]})
    (item,) = point["items"]
    s3_server.client().put_object(
        Bucket=s3_settings.bucket, Key=item["key"], Body=b"not the backup that was taken"
    )
    restore = await jobs.start_restore(ours.db, point, None)
    await runner.run_once()
    done = await final(ours.db, restore["_id"])
    assert done["status"] == "FAILED", (done["reason"], done["items"])
    assert "checksum" in (done["items"][0]["error"] or "").lower(), done["items"][0]
    assert not any(line.startswith("restore ") for line in agent.trace_lines())
    assert any(line.startswith("post-restore-unlock") for line in agent.trace_lines())


async def test_agent_killed_mid_job_and_restarted_ends_failed_with_its_reason(
    ours: Ours, s3_settings: S3Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = ours.agent(HANGING_BACKUP)
    _, _, job = await ours.backup(agent, s3_settings, items=["orders"])
    await ours.runner().run_once()
    await _backing_up(agent)
    agent.kill()
    monkeypatch.setattr(helpers, "free_port", lambda: agent.port)  # come back where it was
    agent.start()
    done = await final(ours.db, job["_id"])
    assert done["status"] == "FAILED"
    assert "agent restarted while the job was running" in done["reason"]
    assert any(line.startswith("post-backup-unlock") for line in agent.trace_lines())
    assert await ours.db.restore_points.count_documents({}) == 0


async def test_agent_killed_mid_job_and_gone_ends_failed_after_the_bound(
    ours: Ours, s3_settings: S3Settings
) -> None:
    agent = ours.agent(HANGING_BACKUP)
    _, _, job = await ours.backup(agent, s3_settings, items=["orders"])
    await ours.runner(agent_unreachable_seconds=3).run_once()
    await _backing_up(agent)
    agent.kill()
    done = await final(ours.db, job["_id"])
    assert done["status"] == "FAILED" and "cannot be reached" in done["reason"]
    assert "no answer for 3 s" in done["reason"]
    assert done["items"][0]["status"] == "FAILED"


async def test_backup_and_restore_to_swift_with_our_agent(
    ours: Ours, swift_settings: SwiftSettings
) -> None:
    agent = ours.agent()
    instance, plan, job = await ours.backup(agent, swift_settings, items=["orders"])
    runner = ours.runner()
    await runner.run_once()
    done = await final(ours.db, job["_id"])
    assert done["status"] == "SUCCEEDED", (done["reason"], done["items"])
    point = await ours.db.restore_points.find_one({"_id": job["_id"]})
    (item,) = point["items"]
    assert item["key"].startswith(f"{instance['_id']}/{plan['_id']}/") and item["checksum"]
    async with open_store(swift_settings) as objects:
        assert sorted([o.key async for o in objects.list()]) == sorted(
            [item["key"], point["manifest_key"]]
        )
    restore = await jobs.start_restore(ours.db, point, None)
    await runner.run_once()
    done = await final(ours.db, restore["_id"])
    assert done["status"] == "SUCCEEDED", (done["reason"], done["items"])
    assert _read(f"{agent.trace}.orders") == PAYLOAD
