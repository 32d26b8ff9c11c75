"""The protocol's messages are modelled once (agent/models.py) and used on both sides: what the
manager's client builds is what a real agent process accepts, and what the agent answers is
what the manager reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.models import BackupRequest, JobStatus, RestoreRequest
from backup import agent_client
from backup.agent_client import AgentError, AgentInfo, AgentJob, AgentKind
from storage.settings import S3Settings, SwiftSettings
from tests.agent.helpers import AgentProcess

OUR_INFO = AgentInfo(
    AgentKind.OURS,
    "1",
    frozenset({"compression:zstd", "encryption:aes-256-gcm-stream-v1", "checksum:sha256"}),
)
GO_INFO = AgentInfo(AgentKind.GO, None, frozenset())
S3 = S3Settings(
    type="S3",
    endpoint="http://127.0.0.1:1",
    region="us-east-1",
    bucket="bucket-1",
    access_key_id="key",
    secret_access_key="s3cr3t-AUTH",
)
SWIFT = SwiftSettings(
    type="SWIFT",
    auth_url="http://127.0.0.1:1/v3",
    auth_version="3",
    username="swift-user",
    password="swift-PASS",
    user_domain_name="Default",
    project_name="proj",
    container="cont",
)


def _request(kind: str, info: AgentInfo, settings: Any, **modes: Any) -> dict[str, Any]:
    dest = agent_client.destination(
        settings,
        filename_prefix="dest/inst/plan/",
        filename="2026_01_01_00_00_127.0.0.1_mydb.txt" if kind == "restore" else None,
    )
    section = agent_client.database_section(
        host="127.0.0.1",
        username="dbuser",
        password="db-PASSW0RD-123",
        database="mydb",
        port=5432,
        parameters={"PGSSLMODE": "disable"},
    )
    return agent_client.job_request(
        kind,  # type: ignore[arg-type]
        agent_job_id=f"{kind}-1",
        info=info,
        compression=modes.get("compression"),
        encryption=modes.get("encryption"),
        encryption_key=modes.get("key"),
        destination=dest,
        section=section,
        checksum="sha256:" + "a" * 64,
    )


@pytest.mark.parametrize("settings", [S3, SWIFT], ids=["s3", "swift"])
@pytest.mark.parametrize("info", [OUR_INFO, GO_INFO], ids=["ours", "go"])
@pytest.mark.parametrize("kind", ["backup", "restore"])
def test_the_manager_builds_what_the_agent_model_reads(kind: str, info: Any, settings: Any) -> None:
    body = _request(
        kind, info, settings, compression="zstd", encryption="aes-256-gcm-stream-v1", key="k3y"
    )
    model = BackupRequest if kind == "backup" else RestoreRequest
    parsed = model.model_validate(body)
    assert parsed.model_dump(mode="json", exclude_unset=True) == body
    assert parsed.section.env() == {"PGSSLMODE": "disable", "BACKUP_PORT": "5432"}
    # the extensions of ours go only to ours
    assert ("transform" in body) == (info.kind == AgentKind.OURS)
    assert ("checksum" in body) == (info.kind == AgentKind.OURS and kind == "restore")


def test_a_request_that_cannot_be_built_is_an_agent_error_without_the_input() -> None:
    with pytest.raises(AgentError) as err:
        agent_client.destination(S3, filename_prefix="../up/")
    assert "filenamePrefix" in err.value.message and "s3cr3t" not in err.value.message


def test_the_go_agents_documented_state_is_read() -> None:
    # The polling body of the Go agent's README, with values.
    body = {
        "status": "SUCCEEDED",
        "message": "backup successfully carried out",
        "state": "finished",
        "region": "us-east-1",
        "bucket": "bucket-1",
        "filename": "2026_01_01_00_00_host_db.tar.gz",
        "filesize": {"size": 42, "unit": "byte"},
        "start_time": "2026-01-01T00:00:00+00:00",
        "end_time": "2026-01-01T00:00:42+00:00",
        "execution_time_ms": 42000,
        "compression": True,
        "pre_backup_lock_log": "",
        "backup_log": "dumped",
        "backup_errorlog": "",
    }
    job = AgentJob.parse(body, log_limit=1024)
    assert (job.status, job.filename, job.size) == ("SUCCEEDED", body["filename"], 42)
    assert job.compression is None  # a flag, not a format the agent applied
    assert job.logs == {"backup_log": "dumped"}
    # a fresh job's empty status, and fields of the wrong type, read as absent
    odd = JobStatus.model_validate({"status": "", "filesize": {"size": -1}, "stored_size": True})
    assert (odd.status, odd.size, odd.stored_size) == ("RUNNING", None, None)


def test_our_agents_state_is_read_by_the_manager(agent: AgentProcess, tmp_path: Path) -> None:
    body = _request("backup", OUR_INFO, S3)
    body["destination"]["skipStorage"] = True  # the tracing script "stores" it
    status, _ = agent.request("POST", "/backup", body)
    assert status == 201
    raw = agent.wait_job("backup", body["id"])
    assert raw["status"] == "SUCCEEDED", raw
    job = AgentJob.parse(raw, log_limit=1024)
    assert job.status == "SUCCEEDED" and job.finished
    assert job.filename == raw["filename"] and job.size == raw["filesize"]["size"] > 0
    assert job.logs and all(k.endswith(("_log", "_errorlog")) for k in job.logs)
