"""Our agent's restore drills (``PUT /restore`` with ``verify: true``, capability
``verify``) against the suite's real SeaweedFS: the object is downloaded, decrypted,
decompressed and checked against its checksum, then handed to the optional ``verify``
script; no restore stage (lock, restore, cleanup, unlock) ever runs."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from storage import S3Settings
from tests.agent.helpers import AgentProcess, tracing_scripts, write_script
from tests.agent.storage_support import destination_for, read_object

KEY = "drill-encryption-passphrase"
PAYLOAD = "drill-row;" * 3000


def _agent(make_agent: Any, tmp_path: Path, *, verify: str | None) -> AgentProcess:
    scripts = tmp_path / "scripts"
    tracing_scripts(
        scripts,
        backup_body=f'printf "{PAYLOAD}" > "$BACKUP_DIRECTORY/$BACKUP_FILENAME.txt"',
    )
    if verify is not None:
        write_script(scripts, "verify", verify)
    agent: AgentProcess = make_agent(scripts=scripts)
    return agent


def _backed_up(agent: AgentProcess, settings: S3Settings) -> tuple[dict[str, Any], dict]:
    """Back up through the agent (zstd and encryption by the agent): (destination, state)."""
    dest = destination_for(settings)
    body = {
        "id": "drill-backup-1",
        "compression": True,
        "encryption_key": KEY,
        "transform": {"compression": "zstd", "encryption": True},
        "destination": dest,
        "backup": {"host": "h", "username": "u", "password": "p", "database": "live"},
    }
    assert agent.request("POST", "/backup", body) == (201, None)
    state = agent.wait_job("backup", body["id"])
    assert state["status"] == "SUCCEEDED", state
    return dest, state


def _drill(
    agent: AgentProcess, dest: dict, state: dict, job_id: str, **over: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": job_id,
        "compression": True,
        "encryption_key": KEY,
        "transform": {"compression": "zstd", "encryption": True},
        "destination": {**dest, "filename": state["filename"]},
        "restore": {"host": "h", "username": "u", "password": "p", "database": "live"},
        "checksum": state["checksum"],
        "verify": True,
        **over,
    }
    assert agent.request("PUT", "/restore", body) == (201, None)
    return agent.wait_job("restore", job_id)


def _restore_stages_ran(agent: AgentProcess) -> list[str]:
    stages = ("pre-restore-lock", "restore ", "restore-cleanup", "post-restore-unlock")
    return [line for line in agent.trace_lines() if line.startswith(stages)]


def test_status_lists_verify(make_agent: Any, tmp_path: Path) -> None:
    agent = _agent(make_agent, tmp_path, verify=None)
    status, body = agent.request("GET", "/status")
    assert status == 200 and "verify" in body["capabilities"]


def test_a_drill_decodes_checks_and_verifies_without_any_restore_stage(
    make_agent: Any, tmp_path: Path, s3_settings: S3Settings
) -> None:
    out = tmp_path / "verified.txt"
    agent = _agent(
        make_agent,
        tmp_path,
        verify=f'echo "verify $*" >> "$TRACE"; echo "drill=$AGENT_DRILL"; '
        f'cp "$RESTORE_FILE" "{out}"; echo checked',
    )
    dest, state = _backed_up(agent, settings=s3_settings)
    stored = read_object(s3_settings, state["stored_key"])
    assert stored is not None and PAYLOAD.encode() not in stored  # encrypted at rest
    assert state["checksum"] == "sha256:" + hashlib.sha256(stored).hexdigest()

    result = _drill(agent, dest, state, "drill-1")
    assert result["status"] == "SUCCEEDED", result
    assert result["verify"] is True and result["verify_script"] is True
    assert set(result["timings"]) == {"download_seconds", "decrypt_seconds", "verify_seconds"}
    assert result["timings"]["download_seconds"] > 0
    assert result["timings"]["decrypt_seconds"] > 0
    assert result["timings"]["verify_seconds"] > 0
    assert "checked" in result["verify_log"] and "drill=true" in result["verify_log"]
    assert out.read_text() == PAYLOAD  # the script got the decoded file
    verify_lines = [line for line in agent.trace_lines() if line.startswith("verify ")]
    assert verify_lines == [f"verify h u - live {state['filename'][:-8]} drill-1 false none"]
    assert _restore_stages_ran(agent) == []
    assert not (agent.base / "restore" / "drill-1").exists()  # the download is removed


def test_a_changed_object_fails_the_drill_before_the_verify_script(
    make_agent: Any, tmp_path: Path, s3_settings: S3Settings
) -> None:
    agent = _agent(make_agent, tmp_path, verify='echo "verify $*" >> "$TRACE"')
    dest, state = _backed_up(agent, settings=s3_settings)
    other = "sha256:" + "0" * 64
    result = _drill(agent, dest, state, "drill-2", checksum=other)
    assert result["status"] == "FAILED"
    assert "checksum" in result["error_message"].lower(), result["error_message"]
    assert not [line for line in agent.trace_lines() if line.startswith("verify ")]
    assert _restore_stages_ran(agent) == []


def test_without_a_verify_script_a_drill_is_download_decode_and_checksum(
    make_agent: Any, tmp_path: Path, s3_settings: S3Settings
) -> None:
    agent = _agent(make_agent, tmp_path, verify=None)
    dest, state = _backed_up(agent, settings=s3_settings)
    result = _drill(agent, dest, state, "drill-3")
    assert result["status"] == "SUCCEEDED", result
    assert result["verify_script"] is False
    assert _restore_stages_ran(agent) == []


def test_a_failing_verify_script_fails_the_drill(
    make_agent: Any, tmp_path: Path, s3_settings: S3Settings
) -> None:
    agent = _agent(make_agent, tmp_path, verify='echo "the dump is empty" >&2; exit 4')
    dest, state = _backed_up(agent, settings=s3_settings)
    result = _drill(agent, dest, state, "drill-4")
    assert result["status"] == "FAILED"
    assert "verify" in result["error_message"], result["error_message"]
    assert "the dump is empty" in result["verify_errorlog"]
    assert _restore_stages_ran(agent) == []


def test_a_drill_needs_the_agent_to_download(make_agent: Any, tmp_path: Path) -> None:
    agent = _agent(make_agent, tmp_path, verify=None)
    body = {
        "id": "drill-5",
        "compression": False,
        "encryption_key": "none",
        "destination": {
            "type": "S3",
            "skipStorage": True,
            "filename": "x.txt",
            "filenamePrefix": "p/",
        },
        "restore": {"host": "h", "username": "u", "password": "p", "database": "live"},
        "verify": True,
    }
    assert agent.request("PUT", "/restore", body) == (201, None)
    result = agent.wait_job("restore", "drill-5")
    assert result["status"] == "FAILED"
    assert "skip_storage" in result["error_message"]
    assert _restore_stages_ran(agent) == []
