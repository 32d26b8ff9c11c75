"""(ours) Cancelling a running job through the protocol: ``POST /backup/{id}/cancel`` and
``POST /restore/{id}/cancel``. The stage running when the cancel arrives finishes (a script
is never killed half-way), no further data stage starts, cleanup and unlock still run, the
job ends FAILED with ``cancelled: true``, and nothing it uploaded is left in storage."""

from __future__ import annotations

import json
from pathlib import Path

from agent.models import CANCELLED_MESSAGE
from tests.agent.helpers import AgentProcess, backup_request, restore_request
from tests.agent.storage_support import destination_for, list_keys
from tests.agent.test_faults import scripts_with, wait_for


def pausing(tmp_path: Path, name: str) -> str:
    """A script body that says it started, waits for the test's go, and says it ended: the
    test cancels while the script is known to run."""
    started, go = tmp_path / f"{name}.started", tmp_path / f"{name}.go"
    return (
        f'touch {started}; while [ ! -e {go} ]; do sleep 0.05; done; echo "{name} done" >> "$TRACE"'
    )


def release(tmp_path: Path, name: str) -> None:
    (tmp_path / f"{name}.go").touch()


def stages(agent: AgentProcess) -> list[str]:
    return [line.split()[0] for line in agent.trace_lines()]


def test_cancel_during_check_skips_the_backup_and_unlocks(make_agent, tmp_path: Path) -> None:
    agent = make_agent(
        scripts=scripts_with(tmp_path, **{"pre-backup-check": pausing(tmp_path, "check")})
    )
    assert agent.request("POST", "/backup", backup_request("c1"))[0] == 201
    wait_for(tmp_path / "check.started")
    status, body = agent.request("POST", "/backup/c1/cancel")
    assert status == 202
    assert body["status"] == "RUNNING" and body["state"] == "pre-backup-check"
    assert body["cancel_requested"] is True and body["cancelled"] is False
    assert agent.request("POST", "/backup/c1/cancel")[0] == 202  # asked again: the same
    release(tmp_path, "check")
    result = agent.wait_job("backup", "c1")
    assert result["status"] == "FAILED" and result["cancelled"] is True
    assert result["error_message"] == CANCELLED_MESSAGE
    assert result["message"] == "backup cancelled"
    assert result["post_backup_unlock_log"] == "out-post-backup-unlock\n"
    # The check ran to its end; the backup script and its cleanup never started.
    assert stages(agent) == ["pre-backup-lock", "pre-backup-check", "check", "post-backup-unlock"]
    assert agent.request("POST", "/backup/c1/cancel") == (200, result)  # a retry sees the end
    assert agent.request("DELETE", "/backup", {"id": "c1"})[0] == 200


def test_cancel_during_the_backup_script_uploads_nothing(
    s3_settings, make_agent, tmp_path: Path
) -> None:
    body = pausing(tmp_path, "dump") + '; echo payload > "$BACKUP_DIRECTORY/$BACKUP_FILENAME.txt"'
    agent = make_agent(scripts=scripts_with(tmp_path, **{"backup.sh": body}))
    dest = destination_for(s3_settings)
    assert agent.request("POST", "/backup", backup_request("c2", destination=dest))[0] == 201
    wait_for(tmp_path / "dump.started")
    assert agent.request("POST", "/backup/c2/cancel")[0] == 202
    release(tmp_path, "dump")
    result = agent.wait_job("backup", "c2")
    assert result["status"] == "FAILED" and result["cancelled"] is True
    assert result["error_message"] == CANCELLED_MESSAGE
    assert result["stored_key"] is None and result["checksum"] is None
    # The script finished (never killed half-way), then cleanup and unlock ran; no upload.
    assert stages(agent) == [
        "pre-backup-lock",
        "pre-backup-check",
        "backup.sh",
        "dump",
        "backup-cleanup",
        "post-backup-unlock",
    ]
    assert list_keys(s3_settings, dest["filenamePrefix"]) == []
    assert not (agent.base / "backup" / "c2").exists()


def test_cancel_after_the_upload_deletes_it(s3_settings, make_agent, tmp_path: Path) -> None:
    """A cancel that arrives once the file is stored (during the cleanup script) still ends
    the job cancelled, and the stored object is deleted: an accepted cancel never succeeds."""
    agent = make_agent(
        scripts=scripts_with(tmp_path, **{"backup-cleanup": pausing(tmp_path, "cleanup")})
    )
    dest = destination_for(s3_settings)
    assert agent.request("POST", "/backup", backup_request("c3", destination=dest))[0] == 201
    wait_for(tmp_path / "cleanup.started")
    assert len(list_keys(s3_settings, dest["filenamePrefix"])) == 1  # uploaded already
    assert agent.request("POST", "/backup/c3/cancel")[0] == 202
    release(tmp_path, "cleanup")
    result = agent.wait_job("backup", "c3")
    assert result["status"] == "FAILED" and result["cancelled"] is True
    assert result["stored_key"] is None
    assert list_keys(s3_settings, dest["filenamePrefix"]) == []
    assert stages(agent)[-1] == "post-backup-unlock"


def test_cancel_of_a_restore_during_its_lock(make_agent, tmp_path: Path) -> None:
    agent = make_agent(
        scripts=scripts_with(tmp_path, **{"pre-restore-lock": pausing(tmp_path, "rlock")})
    )
    assert agent.request("PUT", "/restore", restore_request("r1"))[0] == 201
    wait_for(tmp_path / "rlock.started")
    assert agent.request("POST", "/restore/r1/cancel")[0] == 202
    release(tmp_path, "rlock")
    result = agent.wait_job("restore", "r1")
    assert result["status"] == "FAILED" and result["cancelled"] is True
    assert result["message"] == "restore cancelled"
    assert result["error_message"] == CANCELLED_MESSAGE
    assert stages(agent) == ["pre-restore-lock", "rlock", "post-restore-unlock"]


def test_cancel_of_a_finished_job_unknown_job_and_wrong_credentials(
    make_agent, tmp_path: Path
) -> None:
    agent = make_agent()
    assert agent.request("POST", "/backup", backup_request("ok"))[0] == 201
    done = agent.wait_job("backup", "ok")
    assert done["status"] == "SUCCEEDED"
    status, body = agent.request("POST", "/backup/ok/cancel")
    assert status == 409 and body["error"] == "job_finished"
    assert body["job"]["status"] == "SUCCEEDED" and body["job"]["cancelled"] is False
    assert agent.request("GET", "/backup/ok") == (200, done)  # unchanged
    status, body = agent.request("POST", "/backup/nope/cancel")
    assert status == 404 and body["error"] == "job_not_found"
    assert agent.request("POST", "/restore/ok/cancel")[0] == 404  # a backup, not a restore
    status, body = agent.request("POST", "/backup/ok/cancel", auth=("agent-user", "wrong"))
    assert status == 401 and body == {"message": "Unauthorised."}
    assert agent.request("POST", "/backup/ok/cancel", auth=None)[0] == 401
    status, body = agent.request("GET", "/status")
    assert "cancel" in body["capabilities"]


def test_cancel_survives_a_restart(make_agent, tmp_path: Path) -> None:
    """Cancelled, then the agent is killed while the backup script runs: the restarted agent
    finishes the job cancelled, its unlock script run."""
    agent = make_agent(scripts=scripts_with(tmp_path, **{"backup.sh": pausing(tmp_path, "dump")}))
    assert agent.request("POST", "/backup", backup_request("c4"))[0] == 201
    wait_for(tmp_path / "dump.started")
    assert agent.request("POST", "/backup/c4/cancel")[0] == 202
    state = json.loads((agent.base / "state" / "backup-c4.json").read_text())
    assert state["cancel_requested"] is True  # persisted before the answer
    agent.kill()
    agent.start()
    result = agent.wait_job("backup", "c4")
    assert result["status"] == "FAILED" and result["cancelled"] is True
    assert result["error_message"].startswith(f"{CANCELLED_MESSAGE}; agent restarted")
    assert result["post_backup_unlock_log"] == "out-post-backup-unlock\n"
    # The leftover script was killed by the recovery (the agent that had to let it finish is
    # gone); the restarted agent started no further stage but the unlock.
    assert "dump done" not in agent.trace.read_text()
    assert stages(agent) == [
        "pre-backup-lock",
        "pre-backup-check",
        "backup.sh",
        "post-backup-unlock",
    ]


def test_cancel_during_the_upload_aborts_it(
    s3_settings, s3_server, make_agent, tmp_path: Path
) -> None:
    """The agent's own upload is the one stage stopped mid-way: at its next block, the S3
    multipart upload aborted, nothing stored; cleanup and unlock still run."""
    body = 'truncate -s 400M "$BACKUP_DIRECTORY/$BACKUP_FILENAME.bin"'  # sparse: quick to make
    agent = make_agent(scripts=scripts_with(tmp_path, **{"backup.sh": body}))
    dest = destination_for(s3_settings)
    assert agent.request("POST", "/backup", backup_request("up", destination=dest))[0] == 201
    agent.wait_state("backup", "up", "upload")
    status, body = agent.request("POST", "/backup/up/cancel")
    assert status == 202 and body["state"] == "upload"
    result = agent.wait_job("backup", "up")
    assert result["status"] == "FAILED" and result["cancelled"] is True
    assert result["error_message"] == CANCELLED_MESSAGE
    assert result["stored_key"] is None
    assert stages(agent)[-2:] == ["backup-cleanup", "post-backup-unlock"]
    assert list_keys(s3_settings, dest["filenamePrefix"]) == []
    uploads = s3_server.client().list_multipart_uploads(Bucket=s3_settings.bucket)
    assert not uploads.get("Uploads")  # aborted, no parts left behind
    assert '"event": "uploaded"' not in agent.logs()


def test_cancel_during_the_download_skips_the_restore(
    s3_settings, make_agent, tmp_path: Path
) -> None:
    """A restore cancelled while the agent downloads: the download stops, its partial file is
    removed, the restore script never runs (the database is untouched), the unlock runs."""
    body = 'truncate -s 300M "$BACKUP_DIRECTORY/$BACKUP_FILENAME.bin"'
    agent = make_agent(scripts=scripts_with(tmp_path, **{"backup.sh": body}))
    dest = destination_for(s3_settings)
    assert agent.request("POST", "/backup", backup_request("src", destination=dest))[0] == 201
    stored = agent.wait_job("backup", "src", timeout=120)
    assert stored["status"] == "SUCCEEDED", stored
    request = restore_request("rd", destination={**dest, "filename": stored["filename"]})
    assert agent.request("PUT", "/restore", request)[0] == 201
    agent.wait_state("restore", "rd", "download")
    status, body = agent.request("POST", "/restore/rd/cancel")
    assert status == 202 and body["state"] == "download"
    result = agent.wait_job("restore", "rd")
    assert result["status"] == "FAILED" and result["cancelled"] is True
    assert result["error_message"] == CANCELLED_MESSAGE
    restore_stages = [s for s in stages(agent) if "restore" in s]
    assert restore_stages == ["pre-restore-lock", "post-restore-unlock"]
    assert not (agent.base / "restore" / "rd").exists()  # the partial download is gone
