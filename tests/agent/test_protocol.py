"""The Go agent's documented requests, replayed against a real agent process: every status
code and every response field of its README and docs/backup.md, docs/restore.md."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.agent.helpers import (
    PASSWORD,
    ROOT,
    USER,
    AgentProcess,
    backup_request,
    restore_request,
    script_env,
    tracing_scripts,
    write_script,
)
from tests.agent.storage_support import destination_for, read_object, secrets_of
from tests.runner.go_agent import BACKUP_STAGES, RESTORE_STAGES

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$")
BACKUP_LOGS = {f"{s}_{k}" for s in BACKUP_STAGES for k in ("log", "errorlog")}
RESTORE_LOGS = {f"{s}_{k}" for s in RESTORE_STAGES for k in ("log", "errorlog")}
# The Go agent's BackupResponse / RestoreResponse fields (without the omitempty ones) ...
GO_BACKUP = {
    "status", "message", "state", "type", "compression", "skip_storage", "skipSSL",
    "filename", "filenamePrefix", "filesize", "start_time", "end_time", "execution_time_ms",
} | BACKUP_LOGS  # fmt: skip
GO_RESTORE = {
    "status", "message", "state", "type", "compression", "skip_storage", "skipSSL",
    "start_time", "end_time", "execution_time_ms",
} | RESTORE_LOGS  # fmt: skip
# ... its omitempty destination fields, and ours.
S3_FIELDS = {"region", "endpoint", "bucket"}
SWIFT_FIELDS = {"authUrl", "domain", "container_name", "project_name"}
OURS_CANCEL = {"cancel_requested", "cancelled"}  # tests/agent/test_cancel.py
OURS_BACKUP = {"transform", "checksum", "stored_size", "stored_key"} | OURS_CANCEL
OURS_RESTORE = {"transform", "filename"} | OURS_CANCEL
DB_PASSWORD = "db-PASSW0RD-123"


def slow_scripts(directory: Path, seconds: float = 30) -> Path:
    tracing_scripts(
        directory,
        backup_body=f'echo "backup $*" >> "$TRACE"; sleep {seconds}; '
        'echo x > "$BACKUP_DIRECTORY/$BACKUP_FILENAME.txt"',
    )
    write_script(directory, "restore", f'echo "restore $*" >> "$TRACE"; sleep {seconds}')
    return directory


def assert_finished(body: dict[str, Any], kind: str, ok: bool = True) -> None:
    assert body["status"] == ("SUCCEEDED" if ok else "FAILED"), body
    assert body["state"] == "finished"
    if ok:
        assert body["message"] == f"{kind} successfully carried out"
        assert "error_message" not in body  # the Go agent omits an empty one
    else:
        assert body["message"] == f"{kind} failed"
        assert body["error_message"]
    assert TIMESTAMP.match(body["start_time"]) and TIMESTAMP.match(body["end_time"])
    assert body["start_time"] <= body["end_time"]
    assert isinstance(body["execution_time_ms"], int) and body["execution_time_ms"] >= 0


# ----------------------------------------------------------------------------- status, auth


def test_status_and_auth(agent: AgentProcess) -> None:
    status, body = agent.request("GET", "/status")
    assert status == 200
    assert body["message"] == "Client is running"
    assert body["version"]
    assert {
        "compression:zstd",
        "compression:gzip",
        "encryption:aes-256-gcm-stream-v1",
        "checksum:sha256",
        "persistent-jobs",
        "unlock-always",
        "secrets-in-env",
    } <= set(body["capabilities"])
    calls = [
        ("GET", "/status", None),
        ("POST", "/backup", backup_request("a1")),
        ("GET", "/backup/a1", None),
        ("DELETE", "/backup", {"id": "a1"}),
        ("PUT", "/restore", restore_request("a1")),
        ("GET", "/restore/a1", None),
        ("DELETE", "/restore", {"id": "a1"}),
    ]
    for auth in (None, (USER, "wrong"), ("wrong", PASSWORD), ("", ""), (USER, PASSWORD + "x")):
        for method, path, body in calls:
            assert agent.request(method, path, body, auth=auth) == (
                401,
                {"message": "Unauthorised."},
            )
    # a header that is not Basic, or not base64
    for header in ("Bearer abc", "Basic !!!", "Basic " + "a" * 10):
        status, _ = agent.request("GET", "/status", headers={"Authorization": header}, auth=None)
        assert status == 401
    assert agent.trace_lines() == []
    assert agent.request("GET", "/backup/a1")[0] == 404  # nothing was started
    assert PASSWORD not in agent.logs()


# ----------------------------------------------------------------------------- happy paths


def test_backup_fields_and_script_contract(agent: AgentProcess) -> None:
    """skipStorage: the script stores the file itself and gets the destination in ``S3_*``
    variables (endpoint and region not swapped, unlike the Go agent)."""
    req = backup_request(
        "job-1",
        compression=True,
        encryption_key="script-side-key",
        backup={"parameters": [{"key": "arbitraryValue"}, {"retries": 2}, {"FLAG": True}]},
        destination={"region": "eu-central-1", "endpoint": "s3.example:9000"},
    )
    status, body = agent.request("POST", "/backup", req)
    assert (status, body) == (201, None)
    result = agent.wait_job("backup", "job-1")
    assert_finished(result, "backup")
    assert set(result) == GO_BACKUP | S3_FIELDS | OURS_BACKUP, set(result) ^ (
        GO_BACKUP | S3_FIELDS | OURS_BACKUP
    )
    assert result["type"] == "S3"
    assert result["compression"] is True
    assert result["skip_storage"] is True and result["skipSSL"] is True
    assert (result["region"], result["endpoint"], result["bucket"]) == (
        "eu-central-1",
        "s3.example:9000",
        "bucket-1",
    )
    assert result["filenamePrefix"] == "plan-1/"
    assert re.fullmatch(r"\d{4}_\d\d_\d\d_\d\d_\d\d_127\.0\.0\.1_mydb\.txt", result["filename"])
    assert result["filesize"] == {"size": len("payload\n"), "unit": "byte"}
    assert result["backup_log"] == "out-backup\n"
    assert result["backup_errorlog"] == "err-backup\n"
    assert result["pre_backup_lock_log"] == "out-pre-backup-lock\n"
    assert result["post_backup_unlock_log"] == "out-post-backup-unlock\n"
    assert result["pre_backup_check_errorlog"] == ""
    assert result["transform"] == {"compression": None, "encryption": None}
    assert result["checksum"] is None and result["stored_key"] is None  # not uploaded
    for secret in ("s3cr3t-AUTH", DB_PASSWORD, "script-side-key"):
        assert secret not in json.dumps(result)

    stem = result["filename"].removesuffix(".txt")
    assert agent.trace_lines() == [
        "pre-backup-lock mydb",
        "pre-backup-check mydb",
        f"backup 127.0.0.1 dbuser - mydb {stem} job-1 true -",
        "backup-cleanup mydb job-1",
        "post-backup-unlock mydb",
    ]
    env = script_env(agent.trace, "backup")
    assert env["key"] == "arbitraryValue" and env["retries"] == "2" and env["FLAG"] == "true"
    assert env["BACKUP_PASSWORD"] == DB_PASSWORD
    assert env["ENCRYPTION_KEY"] == "script-side-key"
    assert env["COMPRESSION"] == "true"
    assert env["S3_ENDPOINT"] == "s3.example:9000" and env["S3_REGION"] == "eu-central-1"
    assert env["S3_BUCKET"] == "bucket-1" and env["S3_AUTHKEY"] == "key"
    assert env["S3_AUTHSECRET"] == "s3cr3t-AUTH" and env["S3_FILENAMEPREFIX"] == "plan-1/"
    assert env["S3_SKIPSSL"] == "true"
    assert env["JOB_ID"] == "job-1" and env["BACKUP_DATABASE"] == "mydb"
    assert env["BACKUP_DIRECTORY"] == str(agent.base / "backup" / "job-1")
    assert env["BACKUP_FILENAME"] == stem
    assert "client_password" not in env and "client_username" not in env
    assert env["PATH"]  # the agent's own environment is extended, not replaced
    # skipStorage: the file stays where the script can ship it
    assert (agent.base / "backup" / "job-1" / result["filename"]).exists()


def test_restore_fields_and_script_contract(agent: AgentProcess) -> None:
    req = restore_request(
        "r-1",
        destination={
            "type": "SWIFT",
            "authUrl": "https://keystone.example/v3",
            "domain": "Default",
            "container_name": "backups",
            "project_name": "proj",
            "username": "swift-user",
            "password": "SWIFT-pw-9",
        },
    )
    status, body = agent.request("PUT", "/restore", req)
    assert (status, body) == (201, None)
    result = agent.wait_job("restore", "r-1")
    assert_finished(result, "restore")
    assert set(result) == GO_RESTORE | OURS_RESTORE
    assert result["type"] == "SWIFT" and result["compression"] is False
    assert result["skip_storage"] is True and result["skipSSL"] is True
    assert result["restore_log"] == "out-restore\n"
    assert result["post_restore_unlock_log"] == "out-post-restore-unlock\n"
    name = "2026_01_01_00_00_127.0.0.1_mydb.txt"
    assert result["filename"] == name
    assert "SWIFT-pw-9" not in json.dumps(result)
    assert agent.trace_lines() == [
        "pre-restore-lock r-1",
        f"restore 127.0.0.1 dbuser - mydb {name} r-1 false none",
        "restore-cleanup r-1",
        "post-restore-unlock ",
    ]
    env = script_env(agent.trace, "restore")
    assert env["SWIFT_AUTHURL"] == "https://keystone.example/v3"
    assert env["SWIFT_CONTAINERNAME"] == "backups" and env["SWIFT_PROJECTNAME"] == "proj"
    assert env["SWIFT_DOMAIN"] == "Default" and env["SWIFT_USERNAME"] == "swift-user"
    assert env["SWIFT_PASSWORD"] == "SWIFT-pw-9"
    assert "ENCRYPTION_KEY" not in env  # "none": no key
    assert env["RESTORE_FILE"] == str(agent.base / "restore" / "r-1" / name)
    assert agent.request("GET", "/restore/unknown")[0] == 404
    assert agent.request("GET", "/backup/r-1")[0] == 404  # backups and restores apart


@pytest.mark.parametrize("backend", ["s3", "swift-v1", "swift-keystone-v3"])
def test_documented_requests_on_real_storage(
    request: pytest.FixtureRequest, make_agent, tmp_path: Path, backend: str
) -> None:
    """docs/backup.md and docs/restore.md bodies, field for field (the README's ``user``
    spelling for the restore), into the suite's real SeaweedFS / Swift and back."""
    if backend == "s3":
        settings = request.getfixturevalue("s3_settings")
    elif backend == "swift-v1":
        settings = request.getfixturevalue("swift_settings")
    else:
        settings = request.getfixturevalue("swift_server").keystone_settings()
    scripts = tmp_path / "scripts"
    tracing_scripts(scripts)
    out = tmp_path / "restored"
    write_script(scripts, "restore", f'echo "restore $*" >> "$TRACE"; cp "$RESTORE_FILE" "{out}"')
    agent = make_agent(scripts=scripts)
    dest = destination_for(settings)
    backup = {
        "id": "778f038c-e1c5-11e8-9f32-f2801f1b9fd1",
        "compression": True,
        "encryption_key": "example-encryption-key",
        "destination": dest,
        "backup": {
            "host": "host",
            "username": "username",
            "password": "password",
            "database": "database name",
            "parameters": [{"key": "arbitraryValue"}, {"retries": 2}],
        },
    }
    assert agent.request("POST", "/backup", backup) == (201, None)
    result = agent.wait_job("backup", backup["id"])
    assert_finished(result, "backup")
    dest_fields = S3_FIELDS if backend == "s3" else SWIFT_FIELDS
    assert set(result) == GO_BACKUP | dest_fields | OURS_BACKUP
    assert result["type"] == dest["type"] and result["skip_storage"] is False
    assert re.fullmatch(r"\d{4}(_\d\d){4}_host_database_name\.txt", result["filename"])
    assert result["filenamePrefix"] == dest["filenamePrefix"]
    key = dest["filenamePrefix"] + result["filename"]
    assert result["stored_key"] == key
    stored = read_object(settings, key)
    assert stored == b"payload\n"
    assert result["stored_size"] == len(stored) == result["filesize"]["size"]
    assert result["checksum"] == "sha256:" + __import__("hashlib").sha256(stored).hexdigest()
    for secret in [*secrets_of(settings), "password", "example-encryption-key"]:
        assert f'"{secret}"' not in json.dumps(result)
    assert not (agent.base / "backup" / backup["id"]).exists()  # uploaded, then removed

    restore = {
        "id": "778f038c-e1c5-11e8-9f32-f2801f1b9fd1",  # same id, other kind: no conflict
        "compression": True,
        "encryption_key": "example-encryption-key",
        "destination": {**dest, "filename": result["filename"]},
        "restore": {
            "host": "host",
            "user": "user",
            "password": "password",
            "database": "database name",
            "parameters": [{"key": "arbitraryValue"}, {"retries": 2}],
        },
    }
    assert agent.request("PUT", "/restore", restore) == (201, None)
    restored = agent.wait_job("restore", restore["id"])
    assert_finished(restored, "restore")
    assert set(restored) == GO_RESTORE | OURS_RESTORE
    assert out.read_bytes() == b"payload\n"
    assert agent.trace_lines()[-3] == (
        f"restore host user - database name {result['filename']} {restore['id']} true -"
    )
    assert not (agent.base / "restore" / restore["id"]).exists()
    logs = agent.logs()
    for secret in [*secrets_of(settings), "example-encryption-key"]:
        assert secret not in logs


# ----------------------------------------------------------------------------- 400


def _body_400(resp: dict[str, Any], kind: str = "backup") -> None:
    assert resp["status"] == "FAILED"
    assert resp["message"] == f"{kind.capitalize()} failed."
    assert resp["state"] == "Body Deserialization"
    assert resp["error"] == "invalid_request"
    assert resp["error_message"] == resp["description"]


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda b: b.pop("id"), "id"),
        (lambda b: b.update(id=""), "id"),
        (lambda b: b.pop("encryption_key"), "encryption_key"),
        (lambda b: b.update(encryption_key=""), "encryption_key"),
        (lambda b: b.pop("destination"), "destination"),
        (lambda b: b.pop("backup"), "backup"),
        (lambda b: b["backup"].pop("host"), "backup.host"),
        (lambda b: b["backup"].update(host=""), "backup.host"),
        (lambda b: b["backup"].pop("database"), "backup.database"),
        (lambda b: b["backup"].pop("password"), "backup.password"),
        (lambda b: b["backup"].pop("username"), "backup.username"),
        (lambda b: b["backup"].update(host=5), "backup.host"),
        (lambda b: b.update(compression="maybe"), "compression"),
        (lambda b: b.update(id="../etc"), "id"),
        (lambda b: b.update(id="a/b"), "id"),
        (lambda b: b["destination"].update(type="FTP"), "destination.type"),
        (lambda b: b["destination"].pop("type"), "destination.type"),
        (lambda b: b["destination"].update(filenamePrefix="/abs/"), "filenamePrefix"),
        (lambda b: b["destination"].update(filenamePrefix="a/../"), "filenamePrefix"),
        (lambda b: b["destination"].update(skipStorage=False, bucket=""), "destination.bucket"),
        (
            lambda b: b["destination"].update(skipStorage=False, authSecret=""),
            "destination.authSecret",
        ),
        (
            lambda b: b["destination"].update(skipStorage=False, filenamePrefix="noslash"),
            "filenamePrefix",
        ),
        (
            lambda b: b["destination"].update(skipStorage=False, filenamePrefix=""),
            "destination.filenamePrefix",
        ),
        (lambda b: b["backup"].update(parameters=[{"A": "1", "B": "2"}]), "parameters"),
        (lambda b: b["backup"].update(parameters=[{"BAD=NAME": "1"}]), "parameters"),
        (lambda b: b["backup"].update(parameters=[{"N": {"nested": 1}}]), "parameters"),
        (lambda b: b.update(transform={"compression": "lz4"}), "transform.compression"),
    ],
)
def test_backup_400(agent: AgentProcess, mutate, field: str) -> None:
    body = backup_request("bad-1")
    mutate(body)
    status, resp = agent.request("POST", "/backup", body)
    assert status == 400, resp
    _body_400(resp)
    assert field in resp["description"]
    assert DB_PASSWORD not in json.dumps(resp)
    assert agent.request("GET", "/backup/bad-1")[0] == 404  # never registered


def test_400_bad_json_swift_and_restore_fields(agent: AgentProcess) -> None:
    status, resp = agent.request("POST", "/backup", raw=b"{not json")
    assert status == 400 and resp["error"] == "invalid_request" and "JSON" in resp["message"]
    assert agent.request("POST", "/backup", [1, 2])[0] == 400
    assert agent.request("POST", "/backup", raw=b"")[0] == 400
    swift = restore_request("r-bad", destination={"type": "SWIFT", "skipStorage": False})
    status, resp = agent.request("PUT", "/restore", swift)
    assert status == 400
    _body_400(resp, "restore")
    for f in ("authUrl", "container_name", "username", "password"):
        assert f"destination.{f}" in resp["description"]
    body = restore_request("r-bad")
    body["destination"].pop("filename")
    status, resp = agent.request("PUT", "/restore", body)
    assert status == 400 and "destination.filename" in resp["description"]
    for bad in ("../x", "a/b", "..", ".", "x\x00y", "/etc/passwd", "a\\b"):
        body = restore_request("r-bad")
        body["destination"]["filename"] = bad
        assert agent.request("PUT", "/restore", body)[0] == 400, bad
    body = restore_request("r-bad", checksum="md5:abc")
    assert agent.request("PUT", "/restore", body)[0] == 400
    assert agent.request("GET", "/restore/r-bad")[0] == 404
    assert agent.trace_lines() == []


def test_go_defaults_and_spellings(agent: AgentProcess) -> None:
    """``compression`` defaults to false; ``type`` in any case; ``user`` for ``username``."""
    body = backup_request("defaults")
    del body["compression"]
    body["destination"]["type"] = "s3"
    body["backup"]["user"] = body["backup"].pop("username")
    assert agent.request("POST", "/backup", body) == (201, None)
    result = agent.wait_job("backup", "defaults")
    assert_finished(result, "backup")
    assert result["compression"] is False and result["type"] == "S3"
    stem = result["filename"].removesuffix(".txt")
    assert agent.trace_lines()[2].endswith(f" dbuser - mydb {stem} defaults false none")


# ----------------------------------------------------------------------------- 409, 429


def test_409_resumes_never_a_second_run(make_agent, tmp_path: Path) -> None:
    agent = make_agent(scripts=slow_scripts(tmp_path / "s", 1.5))
    assert agent.request("POST", "/backup", backup_request("dup")) == (201, None)
    status, body = agent.request("POST", "/backup", backup_request("dup"))
    assert status == 409
    assert set(body) == GO_BACKUP | S3_FIELDS | OURS_BACKUP
    assert body["status"] == "RUNNING" and body["message"] == "backup is running"
    assert body["state"] in ("pre-backup-lock", "pre-backup-check", "backup")
    assert body["end_time"] == "" and body["execution_time_ms"] == 0
    # a different body under the same id is the same job too, even an incomplete one
    changed = backup_request("dup", backup={"database": "other"})
    assert agent.request("POST", "/backup", changed)[0] == 409
    assert agent.request("POST", "/backup", {"id": "dup"})[0] == 409
    agent.wait_job("backup", "dup")
    status, body = agent.request("POST", "/backup", backup_request("dup"))
    assert status == 409 and body["status"] == "SUCCEEDED"
    assert len([line for line in agent.trace_lines() if line.startswith("backup ")]) == 1


def test_429_without_slot_leak(make_agent, tmp_path: Path) -> None:
    agent = make_agent(scripts=slow_scripts(tmp_path / "s", 2), max_job_number=2)
    assert agent.request("POST", "/backup", backup_request("s1"))[0] == 201
    assert agent.request("PUT", "/restore", restore_request("s2"))[0] == 201
    for i in range(5):
        status, body = agent.request("POST", "/backup", backup_request(f"over{i}"))
        assert status == 429
        assert body["message"] == body["error_message"] == body["description"]
        assert body["state"] == "Job reservation" and body["error"] == "too_many_jobs"
        assert "max_job_number" in body["description"]
        assert agent.request("PUT", "/restore", restore_request(f"rover{i}"))[0] == 429
        assert agent.request("POST", "/backup", {"id": f"bad{i}"})[0] == 400
        assert agent.request("POST", "/backup", backup_request("s1"))[0] == 409
    assert agent.request("GET", "/backup/over0")[0] == 404
    agent.wait_job("backup", "s1")
    agent.wait_job("restore", "s2")
    # every slot came back: two more run at once, the third is refused
    assert agent.request("POST", "/backup", backup_request("n1"))[0] == 201
    assert agent.request("PUT", "/restore", restore_request("n2"))[0] == 201
    assert agent.request("POST", "/backup", backup_request("n3"))[0] == 429


def test_429_under_concurrent_requests(make_agent, tmp_path: Path) -> None:
    agent = make_agent(scripts=slow_scripts(tmp_path / "s", 3), max_job_number=3)
    with ThreadPoolExecutor(20) as pool:
        codes = list(
            pool.map(
                lambda i: agent.request("POST", "/backup", backup_request(f"c{i}"))[0], range(20)
            )
        )
    assert sorted(codes) == [201] * 3 + [429] * 17
    for i, code in enumerate(codes):
        if code == 201:
            agent.wait_job("backup", f"c{i}")
    assert agent.request("POST", "/backup", backup_request("after"))[0] == 201


# ----------------------------------------------------------------------------- delete, retention


def test_delete(make_agent, tmp_path: Path) -> None:
    agent = make_agent(scripts=slow_scripts(tmp_path / "s", 1))
    for kind in ("backup", "restore"):
        status, body = agent.request("DELETE", f"/{kind}", {"id": "nope"})
        assert status == 410 and body["error"] == "job_not_found"
        assert agent.request("DELETE", f"/{kind}", {})[0] == 400
        assert agent.request("DELETE", f"/{kind}", {"id": ""})[0] == 400
    assert agent.request("POST", "/backup", backup_request("d1"))[0] == 201
    status, body = agent.request("DELETE", "/backup", {"id": "d1"})
    assert status == 409 and body["error"] == "job_running"  # ours: a running job stays
    agent.wait_job("backup", "d1")
    assert agent.request("DELETE", "/backup", {"id": "d1"})[0] == 200
    assert agent.request("GET", "/backup/d1")[0] == 404
    assert agent.request("DELETE", "/backup", {"id": "d1"})[0] == 410
    assert not list((agent.base / "state").glob("backup-d1*"))
    # the id is free again: a new job runs under it
    assert agent.request("POST", "/backup", backup_request("d1"))[0] == 201
    agent.wait_job("backup", "d1")
    assert agent.request("PUT", "/restore", restore_request("d2"))[0] == 201
    agent.wait_job("restore", "d2")
    assert agent.request("DELETE", "/restore", {"id": "d2"})[0] == 200
    assert agent.request("GET", "/restore/d2")[0] == 404


def test_retention_forgets_finished_jobs(make_agent) -> None:
    agent = make_agent(job_retention_seconds=1)
    assert agent.request("POST", "/backup", backup_request("old"))[0] == 201
    agent.wait_job("backup", "old")
    deadline = time.monotonic() + 30
    while agent.request("GET", "/backup/old")[0] == 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert not list((agent.base / "state").glob("backup-old*"))


# ----------------------------------------------------------------------------- scripts


def test_optional_scripts_sh_suffix_and_bash(make_agent, tmp_path: Path) -> None:
    """Only backup and restore are mandatory. A script without the executable bit runs
    through bash, as every script of the Go agent does (bash-isms work)."""
    scripts = tmp_path / "only"
    scripts.mkdir()
    path = scripts / "backup.sh"
    path.write_text(
        'if [[ -n "$BACKUP_DIRECTORY" ]]; then echo hi > "$BACKUP_DIRECTORY/f.bin"; fi\n'
    )
    path.chmod(0o644)
    agent = make_agent(scripts=scripts)
    assert agent.request("POST", "/backup", backup_request("opt"))[0] == 201
    result = agent.wait_job("backup", "opt")
    assert_finished(result, "backup")
    assert result["filename"] == "f.bin"
    assert result["pre_backup_lock_log"] == ""
    assert agent.request("PUT", "/restore", restore_request("opt"))[0] == 201
    result = agent.wait_job("restore", "opt")
    assert_finished(result, "restore", ok=False)
    assert "mandatory script restore not found" in result["error_message"]


# ----------------------------------------------------------------------------- process


def test_bad_configuration_exits_clearly(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "client_username": "u",
        "client_password": "topsecret-value",
        "max_job_number": "many",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "agent"], env=env, cwd=ROOT, capture_output=True, timeout=60
    )
    assert proc.returncode == 2
    assert b"max_job_number" in proc.stderr
    assert b"topsecret-value" not in proc.stderr + proc.stdout
    env.pop("client_password")
    env["max_job_number"] = "3"
    proc = subprocess.run(
        [sys.executable, "-m", "agent"], env=env, cwd=ROOT, capture_output=True, timeout=60
    )
    assert proc.returncode == 2 and b"client_password" in proc.stderr


def test_console_script_and_tls(make_agent, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    console = Path(sys.executable).parent / "osb-backup-agent"
    agent = AgentProcess(tmp_path / "tls", tmp_path, tls_cert_file=cert, tls_key_file=key)
    agent.start_cmd = [str(console)]
    try:
        agent.start()
        status, body = agent.request("GET", "/status")
        assert status == 200 and body["message"] == "Client is running"
        assert agent.request("GET", "/status", auth=None)[0] == 401
    finally:
        agent.kill()


def test_unknown_route_and_method_json(agent: AgentProcess) -> None:
    status, body = agent.request("GET", "/nothing")
    assert status == 404 and body["error"] == "not_found"
    status, body = agent.request("PATCH", "/backup")
    assert status == 405 and body["error"] == "method_not_allowed"
    assert agent.request("GET", "/nothing", auth=None)[0] == 401
    status, body = agent.request("POST", "/backup", raw=b"x" * (2 * 1024 * 1024))
    assert status == 413 and body["error"] == "body_too_large"
