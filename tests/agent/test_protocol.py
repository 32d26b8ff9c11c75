"""The Go agent's documented requests, replayed against a real agent process."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.agent.helpers import (
    PASSWORD,
    USER,
    AgentProcess,
    backup_request,
    restore_request,
    tracing_scripts,
    write_script,
)

STAGE_FIELDS_BACKUP = [
    f"{s}_{k}"
    for s in (
        "pre_backup_lock",
        "pre_backup_check",
        "backup",
        "backup_cleanup",
        "post_backup_unlock",
    )
    for k in ("log", "errorlog")
]
STAGE_FIELDS_RESTORE = [
    f"{s}_{k}"
    for s in ("pre_restore_lock", "restore", "restore_cleanup", "post_restore_unlock")
    for k in ("log", "errorlog")
]


def slow_scripts(directory: Path, seconds: float = 30) -> Path:
    tracing_scripts(
        directory,
        backup_body=f'echo "backup $*" >> "$TRACE"; sleep {seconds}; '
        'echo x > "$BACKUP_DIRECTORY/$BACKUP_FILENAME.txt"',
    )
    write_script(directory, "restore", f'echo "restore $*" >> "$TRACE"; sleep {seconds}')
    return directory


def test_status_and_auth(agent: AgentProcess) -> None:
    status, body = agent.request("GET", "/status")
    assert status == 200
    assert body["message"] == "Client is running"
    assert body["version"]
    assert "encryption:aes-256-gcm-stream-v1" in body["capabilities"]
    assert {"compression:zstd", "compression:gzip", "persistent-jobs", "unlock-always"} <= set(
        body["capabilities"]
    )
    for auth in (None, (USER, "wrong"), ("wrong", PASSWORD), ("", "")):
        for method, path in (("GET", "/status"), ("POST", "/backup"), ("GET", "/backup/x")):
            status, body = agent.request(method, path, backup_request("a1"), auth=auth)
            assert status == 401
            assert body == {"message": "Unauthorised."}
    assert agent.trace_lines() == []


def test_backup_happy_path_fields(agent: AgentProcess) -> None:
    status, body = agent.request("POST", "/backup", backup_request("job-1"))
    assert (status, body) == (201, None)
    result = agent.wait_job("backup", "job-1")
    assert result["status"] == "SUCCEEDED", result
    assert result["state"] == "finished"
    assert result["message"] == "Backup succeeded"
    assert result["error_message"] == ""
    assert re.match(r"\d{4}-\d\d-\d\dT", result["start_time"])
    assert re.match(r"\d{4}-\d\d-\d\dT", result["end_time"])
    assert isinstance(result["execution_time_ms"], int)
    assert result["filenamePrefix"] == "plan-1/"
    assert re.fullmatch(r"\d{4}_\d\d_\d\d_\d\d_\d\d_127\.0\.0\.1_mydb\.txt", result["filename"])
    assert result["filesize"] == {"size": len("payload\n"), "unit": "byte"}
    for field in STAGE_FIELDS_BACKUP:
        assert field in result
    assert result["backup_log"] == "out-backup\n"
    assert result["backup_errorlog"] == "err-backup\n"
    assert result["post_backup_unlock_log"] == "out-post-backup-unlock\n"
    stem = result["filename"].removesuffix(".txt")
    assert agent.trace_lines() == [
        "pre-backup-lock mydb",
        "pre-backup-check mydb",
        f"backup 127.0.0.1 dbuser - mydb {stem} job-1 false none",
        "backup-cleanup mydb job-1",
        "post-backup-unlock mydb",
    ]


def test_restore_happy_path(agent: AgentProcess) -> None:
    status, body = agent.request("PUT", "/restore", restore_request("r-1"))
    assert (status, body) == (201, None)
    result = agent.wait_job("restore", "r-1")
    assert result["status"] == "SUCCEEDED", result
    assert result["message"] == "Restore succeeded"
    for field in STAGE_FIELDS_RESTORE:
        assert field in result
    assert result["restore_log"] == "out-restore\n"
    name = "2026_01_01_00_00_127.0.0.1_mydb.txt"
    assert agent.trace_lines() == [
        "pre-restore-lock r-1",
        f"restore 127.0.0.1 dbuser - mydb {name} r-1 false none",
        "restore-cleanup r-1",
        "post-restore-unlock ",
    ]
    assert agent.request("GET", "/restore/unknown")[0] == 404
    assert agent.request("GET", "/backup/r-1")[0] == 404


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda b: b.pop("id"), "id"),
        (lambda b: b.pop("destination"), "destination"),
        (lambda b: b["backup"].pop("host"), "backup.host"),
        (lambda b: b["backup"].pop("password"), "backup.password"),
        (lambda b: b.pop("compression"), "compression"),
        (lambda b: b.update(id="../etc"), "id"),
        (lambda b: b.update(id="a/b"), "id"),
        (lambda b: b["destination"].update(type="FTP"), "destination.type"),
        (lambda b: b["destination"].update(filenamePrefix="/abs/"), "filenamePrefix"),
        (lambda b: b["destination"].update(filenamePrefix="a/../"), "filenamePrefix"),
        (lambda b: b["destination"].update(skipStorage=False, bucket=None), "destination.bucket"),
        (
            lambda b: b["destination"].update(skipStorage=False, filenamePrefix="noslash"),
            "filenamePrefix",
        ),
        (lambda b: b["backup"].update(parameters=[{"A": "1", "B": "2"}]), "parameters"),
        (lambda b: b["backup"].update(parameters=[{"BAD=NAME": "1"}]), "parameters"),
    ],
)
def test_backup_400(agent: AgentProcess, mutate, field: str) -> None:
    body = backup_request("bad-1")
    mutate(body)
    status, resp = agent.request("POST", "/backup", body)
    assert status == 400, resp
    assert field in resp["message"]
    assert "db-PASSW0RD-123" not in resp["message"]
    assert agent.request("GET", "/backup/bad-1")[0] == 404


def test_400_bad_json_and_restore_fields(agent: AgentProcess) -> None:
    status, resp = agent.request("POST", "/backup", raw=b"{not json")
    assert status == 400 and "JSON" in resp["message"]
    assert agent.request("POST", "/backup", [1, 2])[0] == 400
    body = restore_request("r-bad")
    body["destination"].pop("filename")
    status, resp = agent.request("PUT", "/restore", body)
    assert status == 400 and "destination.filename" in resp["message"]
    for bad in ("../x", "a/b", "..", "x\x00y", "/etc/passwd"):
        body = restore_request("r-bad")
        body["destination"]["filename"] = bad
        assert agent.request("PUT", "/restore", body)[0] == 400, bad
    assert agent.trace_lines() == []


def test_409_resumes_never_a_second_run(make_agent, tmp_path: Path) -> None:
    agent = make_agent(scripts=slow_scripts(tmp_path / "s", 1.5))
    assert agent.request("POST", "/backup", backup_request("dup"))[0] == 201
    status, body = agent.request("POST", "/backup", backup_request("dup"))
    assert status == 409
    assert body["status"] == "RUNNING"
    assert body["state"] in ("pre-backup-lock", "pre-backup-check", "backup")
    agent.wait_job("backup", "dup")
    status, body = agent.request("POST", "/backup", backup_request("dup"))
    assert status == 409 and body["status"] == "SUCCEEDED"
    assert [line for line in agent.trace_lines() if line.startswith("backup ")].__len__() == 1


def test_429_without_slot_leak(make_agent, tmp_path: Path) -> None:
    agent = make_agent(scripts=slow_scripts(tmp_path / "s", 2), max_job_number=2)
    assert agent.request("POST", "/backup", backup_request("s1"))[0] == 201
    assert agent.request("PUT", "/restore", restore_request("s2"))[0] == 201
    for i in range(5):
        assert agent.request("POST", "/backup", backup_request(f"over{i}"))[0] == 429
        assert agent.request("PUT", "/restore", restore_request(f"rover{i}"))[0] == 429
        assert agent.request("POST", "/backup", {"id": f"bad{i}"})[0] == 400
        assert agent.request("POST", "/backup", backup_request("s1"))[0] == 409
    status, body = agent.request("POST", "/backup", backup_request("over0"))
    assert status == 429 and "max_job_number" in body["message"]
    assert agent.request("GET", "/backup/over0")[0] == 404
    agent.wait_job("backup", "s1")
    agent.wait_job("restore", "s2")
    # every slot came back: two more run at once, the third is refused
    assert agent.request("POST", "/backup", backup_request("n1"))[0] == 201
    assert agent.request("POST", "/backup", backup_request("n2"))[0] == 201
    assert agent.request("POST", "/backup", backup_request("n3"))[0] == 429


def test_delete(make_agent, tmp_path: Path) -> None:
    agent = make_agent(scripts=slow_scripts(tmp_path / "s", 1))
    assert agent.request("DELETE", "/backup", {"id": "nope"})[0] == 410
    assert agent.request("DELETE", "/restore", {"id": "nope"})[0] == 410
    assert agent.request("DELETE", "/backup", {})[0] == 400
    assert agent.request("POST", "/backup", backup_request("d1"))[0] == 201
    status, body = agent.request("DELETE", "/backup", {"id": "d1"})
    assert status == 409 and body["status"] == "RUNNING"  # ours: a running job stays
    agent.wait_job("backup", "d1")
    assert agent.request("DELETE", "/backup", {"id": "d1"})[0] == 200
    assert agent.request("GET", "/backup/d1")[0] == 404
    assert agent.request("DELETE", "/backup", {"id": "d1"})[0] == 410
    assert agent.request("PUT", "/restore", restore_request("d2"))[0] == 201
    agent.wait_job("restore", "d2")
    assert agent.request("DELETE", "/restore", {"id": "d2"})[0] == 200
    assert agent.request("GET", "/restore/d2")[0] == 404


def test_retention_forgets_finished_jobs(make_agent) -> None:
    agent = make_agent(job_retention_seconds=1)
    assert agent.request("POST", "/backup", backup_request("old"))[0] == 201
    agent.wait_job("backup", "old")
    deadline = time.monotonic() + 10
    while agent.request("GET", "/backup/old")[0] == 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert not list((agent.base / "state").glob("backup-old*"))


def test_missing_optional_scripts_and_sh_suffix(make_agent, tmp_path: Path) -> None:
    scripts = tmp_path / "only"
    scripts.mkdir()
    write_script(scripts, "backup.sh", 'echo data > "$BACKUP_DIRECTORY/f.bin"')
    agent = make_agent(scripts=scripts)
    assert agent.request("POST", "/backup", backup_request("opt"))[0] == 201
    result = agent.wait_job("backup", "opt")
    assert result["status"] == "SUCCEEDED", result
    assert result["filename"] == "f.bin"
    assert result["pre_backup_lock_log"] == ""
    # restore is mandatory
    assert agent.request("PUT", "/restore", restore_request("opt"))[0] == 201
    result = agent.wait_job("restore", "opt")
    assert result["status"] == "FAILED"
    assert "mandatory script restore not found" in result["error_message"]


def test_bad_configuration_exits_clearly(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.agent.helpers import ROOT

    env = {
        "PATH": "/usr/bin:/bin",
        "client_username": "u",
        "client_password": "topsecret-value",
        "max_job_number": "many",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "agent"], env=env, cwd=ROOT, capture_output=True, timeout=30
    )
    assert proc.returncode == 2
    assert b"max_job_number" in proc.stderr
    assert b"topsecret-value" not in proc.stderr + proc.stdout


def test_tls(make_agent, tmp_path: Path) -> None:
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    agent = make_agent(tls_cert_file=cert, tls_key_file=key)
    status, body = agent.request("GET", "/status")
    assert status == 200 and body["message"] == "Client is running"
    assert agent.request("GET", "/status", auth=None)[0] == 401


def test_429_under_concurrent_requests(make_agent, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    agent = make_agent(scripts=slow_scripts(tmp_path / "s", 3), max_job_number=3)
    with ThreadPoolExecutor(20) as pool:
        codes = list(
            pool.map(
                lambda i: agent.request("POST", "/backup", backup_request(f"c{i}"))[0], range(20)
            )
        )
    assert sorted(codes) == [201] * 3 + [429] * 17
    started = [i for i, c in enumerate(codes) if c == 201]
    for i in started:
        agent.wait_job("backup", f"c{i}")
    assert agent.request("POST", "/backup", backup_request("after"))[0] == 201


def test_unknown_route_and_method_json(agent: AgentProcess) -> None:
    assert agent.request("GET", "/nothing") == (404, {"message": "Not Found"})
    assert agent.request("PATCH", "/backup")[0] == 405
    assert agent.request("GET", "/nothing", auth=None)[0] == 401
