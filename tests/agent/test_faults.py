"""Failures, crashes and secrets: the database is always unlocked, nothing leaks, nothing is
left half-written in the store."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from agent.jobs import RESTART_REASON
from tests.agent.helpers import (
    PASSWORD,
    AgentProcess,
    backup_request,
    restore_request,
    tracing_scripts,
    write_script,
)
from tests.agent.storage_support import destination_for, list_keys, secrets_of

DB_PASSWORD = "db-PASSW0RD-123"


def scripts_with(tmp_path: Path, **bodies: str) -> Path:
    d = tmp_path / "scripts"
    tracing_scripts(d)
    for name, body in bodies.items():
        for old in (d / name, d / f"{name}.sh"):
            old.unlink(missing_ok=True)
        write_script(d, name, f'echo "{name} $*" >> "$TRACE"; ' + body)
    return d


def wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def gone(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().split()[2] == "Z"


def wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not gone(pid):
        assert time.monotonic() < deadline, f"process {pid} still alive"
        time.sleep(0.05)


# ----------------------------------------------------------------------------- unlock always


def test_failing_backup_still_unlocks(make_agent, tmp_path: Path) -> None:
    agent = make_agent(scripts=scripts_with(tmp_path, backup="echo boom >&2; exit 3"))
    assert agent.request("POST", "/backup", backup_request("f1"))[0] == 201
    result = agent.wait_job("backup", "f1")
    assert result["status"] == "FAILED"
    assert result["message"] == "backup failed"
    assert result["error_message"] == "script backup exited with status 3"
    assert result["backup_errorlog"] == "boom\n"
    assert result["post_backup_unlock_log"] == "out-post-backup-unlock\n"
    stages = [line.split()[0] for line in agent.trace_lines()]
    assert stages == [
        "pre-backup-lock",
        "pre-backup-check",
        "backup",
        "backup-cleanup",  # cleans up after a failed backup too
        "post-backup-unlock",
    ]


def test_failing_check_unlocks_failing_lock_does_not(make_agent, tmp_path: Path) -> None:
    agent = make_agent(scripts=scripts_with(tmp_path, **{"pre-backup-check": "exit 1"}))
    agent.request("POST", "/backup", backup_request("c1"))
    assert agent.wait_job("backup", "c1")["status"] == "FAILED"
    assert agent.trace_lines()[-1] == "post-backup-unlock mydb"
    assert "backup mydb" not in " ".join(agent.trace_lines())
    agent2 = make_agent(scripts=scripts_with(tmp_path / "x", **{"pre-backup-lock": "exit 1"}))
    agent2.request("POST", "/backup", backup_request("l1"))
    result = agent2.wait_job("backup", "l1")
    assert result["error_message"] == "script pre-backup-lock exited with status 1"
    assert agent2.trace_lines() == ["pre-backup-lock mydb"]  # nothing was locked


def test_failing_restore_unlocks_and_failing_unlock_fails(make_agent, tmp_path: Path) -> None:
    agent = make_agent(
        scripts=scripts_with(tmp_path, restore="exit 4", **{"post-backup-unlock": "exit 5"})
    )
    agent.request("PUT", "/restore", restore_request("r1"))
    result = agent.wait_job("restore", "r1")
    assert result["status"] == "FAILED"
    assert result["error_message"] == "script restore exited with status 4"
    assert [line.split()[0] for line in agent.trace_lines()] == [
        "pre-restore-lock",
        "restore",
        "restore-cleanup",
        "post-restore-unlock",
    ]
    agent.request("POST", "/backup", backup_request("b1"))
    result = agent.wait_job("backup", "b1")
    assert result["status"] == "FAILED"
    assert result["error_message"] == "script post-backup-unlock exited with status 5"


def test_failing_cleanup_after_failure_keeps_first_error(make_agent, tmp_path: Path) -> None:
    agent = make_agent(
        scripts=scripts_with(tmp_path, backup="exit 2", **{"backup-cleanup": "exit 9"})
    )
    agent.request("POST", "/backup", backup_request("k"))
    result = agent.wait_job("backup", "k")
    assert result["error_message"] == "script backup exited with status 2"
    assert agent.trace_lines()[-1] == "post-backup-unlock mydb"


def test_timeout_kills_process_group(make_agent, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    agent = make_agent(
        scripts=scripts_with(tmp_path, backup=f"sleep 60 & echo $! > {pidfile}; wait"),
        stage_timeout_seconds=1,
    )
    agent.request("POST", "/backup", backup_request("t1"))
    result = agent.wait_job("backup", "t1", timeout=60)
    assert result["status"] == "FAILED"
    assert result["error_message"] == "script backup timed out and was killed"
    wait_gone(int(pidfile.read_text()))  # the dump's children die with the script
    assert agent.trace_lines()[-1] == "post-backup-unlock mydb"


def test_exactly_one_file(make_agent, tmp_path: Path) -> None:
    agent = make_agent(scripts=scripts_with(tmp_path, backup="true"))
    agent.request("POST", "/backup", backup_request("z"))
    result = agent.wait_job("backup", "z")
    assert result["status"] == "FAILED"
    assert "exactly one regular file" in result["error_message"]
    assert "found 0 entries (nothing)" in result["error_message"]
    agent2 = make_agent(
        scripts=scripts_with(
            tmp_path / "two", backup='touch "$BACKUP_DIRECTORY/a" "$BACKUP_DIRECTORY/b"'
        )
    )
    agent2.request("POST", "/backup", backup_request("two"))
    result = agent2.wait_job("backup", "two")
    assert result["status"] == "FAILED" and "found 2 entries (a, b)" in result["error_message"]
    assert agent2.trace_lines()[-1] == "post-backup-unlock mydb"
    agent3 = make_agent(
        scripts=scripts_with(tmp_path / "link", backup='ln -s /etc/passwd "$BACKUP_DIRECTORY/l"')
    )
    agent3.request("POST", "/backup", backup_request("link"))
    result = agent3.wait_job("backup", "link")
    assert result["status"] == "FAILED" and "found 1 entries (l)" in result["error_message"]


def test_working_directory_not_empty(make_agent, tmp_path: Path) -> None:
    agent = make_agent()
    leftover = agent.base / "backup" / "busy"
    leftover.mkdir(parents=True)
    (leftover / "old.dump").write_text("old")
    agent.request("POST", "/backup", backup_request("busy"))
    result = agent.wait_job("backup", "busy")
    assert result["status"] == "FAILED" and "is not empty" in result["error_message"]
    assert (leftover / "old.dump").read_text() == "old"
    assert agent.trace_lines() == []  # refused before anything was locked


def test_log_keeps_the_tail(make_agent, tmp_path: Path) -> None:
    agent = make_agent(
        scripts=scripts_with(
            tmp_path,
            backup='seq 1 50000; seq 1 20000 >&2; touch "$BACKUP_DIRECTORY/f"',
        ),
        log_limit_bytes=1024,
    )
    agent.request("POST", "/backup", backup_request("big"))
    result = agent.wait_job("backup", "big")
    assert result["status"] == "SUCCEEDED"
    assert len(result["backup_log"]) < 1100
    assert result["backup_log"].startswith("[... output truncated ...]\n")
    assert result["backup_log"].endswith("49999\n50000\n")
    assert result["backup_errorlog"].endswith("20000\n")


# ----------------------------------------------------------------------------- secrets


def _ps(fmt: str) -> str:
    return subprocess.run(["ps", *fmt.split()], capture_output=True, text=True, check=True).stdout


def _scripts_ps(agent: AgentProcess, fmt: str) -> str:
    """``ps`` lines of the agent's scripts and their children (other engineers' tests may run
    agents with the same test credentials meanwhile)."""
    assert agent.proc is not None
    pids = {str(c.pid) for c in psutil.Process(agent.proc.pid).children(recursive=True)}
    assert pids, "no script running"
    lines = _ps(f"-e -ww {fmt} -o pid,args").splitlines()
    return "\n".join(line for line in lines if line.split(None, 1)[0] in pids)


SECRETS = [DB_PASSWORD, "ENC-KEY-very-secret", "s3cr3t-AUTH", PASSWORD]


def _leaky_request(job_id: str) -> dict:
    return backup_request(
        job_id,
        encryption_key="ENC-KEY-very-secret",
        backup={"parameters": [{"EXTRA": "e1"}, {"FLAG": True}]},
    )


def test_secrets_in_no_ps_output_and_no_log(make_agent, tmp_path: Path) -> None:
    out = tmp_path / "seen"
    out.mkdir()
    body = (
        f'printf %s "$BACKUP_PASSWORD" > {out}/pw; printf %s "$ENCRYPTION_KEY" > {out}/key; '
        f'printf %s "$S3_AUTHSECRET" > {out}/s3; '
        f'printf %s "${{client_password:-unset}}" > {out}/agentpw; '
        f'echo "$AGENT_SIDE $EXTRA $FLAG" > {out}/vars; touch {out}/ready; sleep 3; '
        'echo x > "$BACKUP_DIRECTORY/f"'
    )
    agent = make_agent(
        scripts=scripts_with(tmp_path, backup=body),
        AGENT_SIDE="kept",
        script_env_passthrough="TRACE,AGENT_SIDE",  # the operator lets it through
    )
    assert agent.request("POST", "/backup", _leaky_request("sec"))[0] == 201
    wait_for(out / "ready")
    listing = _scripts_ps(agent, "")
    sealed = agent.base / "state" / "backup-sec.secrets"
    assert sealed.stat().st_mode & 0o777 == 0o600
    for secret in SECRETS:  # the recovery file is sealed, not plain
        assert secret.encode() not in sealed.read_bytes()
    assert "sec" in listing and "mydb" in listing  # the script was seen ...
    for secret in SECRETS:
        assert secret not in listing  # ... with none of the secrets on its command line
    result = agent.wait_job("backup", "sec")
    assert result["status"] == "SUCCEEDED", result
    assert (out / "pw").read_text() == DB_PASSWORD
    assert (out / "key").read_text() == "ENC-KEY-very-secret"
    assert (out / "s3").read_text() == "s3cr3t-AUTH"  # skipStorage: the script uploads
    assert (out / "agentpw").read_text() == "unset"
    assert (out / "vars").read_text().split() == ["kept", "e1", "true"]
    line = agent.trace_lines()[2]
    assert "dbuser - mydb" in line and line.endswith(" sec false -")
    bad = _leaky_request("sec2")
    bad["backup"]["host"] = 5
    assert agent.request("POST", "/backup", bad)[0] == 400
    agent.stop()
    logs = agent.logs()
    assert "job_started" in logs and "stage_finished" in logs
    for secret in SECRETS:
        assert secret not in logs
        for state in (agent.base / "state").iterdir():
            assert secret.encode() not in state.read_bytes()


def test_secrets_via_fd_keep_the_environment_clean(make_agent, tmp_path: Path) -> None:
    """``secrets_via=fd``: the script sources an in-memory file; no secret is in its
    environment either, so not even ``ps e`` shows one."""
    out = tmp_path / "seen"
    out.mkdir()
    body = (
        f'[ -z "${{BACKUP_PASSWORD:-}}" ] && echo clean > {out}/env; '
        f'. "$AGENT_SECRETS_FILE"; . "$AGENT_SECRETS_FILE"; '  # readable more than once
        f'printf %s "$BACKUP_PASSWORD|$ENCRYPTION_KEY|$S3_AUTHSECRET" > {out}/got; '
        f'touch {out}/ready; sleep 3; echo x > "$BACKUP_DIRECTORY/f"'
    )
    agent = make_agent(scripts=scripts_with(tmp_path, backup=body), secrets_via="fd")
    assert agent.request("POST", "/backup", _leaky_request("fd"))[0] == 201
    wait_for(out / "ready")
    # command lines *and* environments of the scripts (the agent itself is configured
    # through its environment, client_password, as the Go agent is)
    listing = _scripts_ps(agent, "e")
    assert "AGENT_SECRETS_FILE=/dev/fd/" in listing
    for secret in SECRETS:
        assert secret not in listing
    assert agent.wait_job("backup", "fd")["status"] == "SUCCEEDED"
    assert (out / "env").read_text() == "clean\n"
    assert (out / "got").read_text() == f"{DB_PASSWORD}|ENC-KEY-very-secret|s3cr3t-AUTH"
    for secret in SECRETS:
        assert secret not in agent.logs()


def test_positional_secrets_compat_switch(make_agent) -> None:
    agent = make_agent(positional_secrets="true")
    agent.request("POST", "/backup", backup_request("p", encryption_key="k1"))
    assert agent.wait_job("backup", "p")["status"] == "SUCCEEDED"
    line = agent.trace_lines()[2]
    assert f" {DB_PASSWORD} mydb " in line and line.endswith(" p false k1")


# ----------------------------------------------------------------------------- crashes


def test_sigkill_mid_backup_then_restart(make_agent, tmp_path: Path) -> None:
    """The restarted agent reports the job FAILED with the reason, kills the orphaned script,
    and runs the unlock script with the job's credentials and parameters (sealed on disk
    under a key derived from client_password)."""
    pidfile = tmp_path / "script.pid"
    unlock_env = tmp_path / "unlock.env"
    agent: AgentProcess = make_agent(
        scripts=scripts_with(
            tmp_path,
            backup=f'if [ "$JOB_ID" = crash ]; then echo $$ > {pidfile}; sleep 60; fi; '
            'echo x > "$BACKUP_DIRECTORY/f"',
            **{
                "post-backup-unlock": f'echo "$BACKUP_PASSWORD $EXTRA $AGENT_RECOVERY" '
                f"> {unlock_env}; echo unlocked"
            },
        )
    )
    agent.request("POST", "/backup", backup_request("done"))
    done = agent.wait_job("backup", "done")
    assert done["status"] == "SUCCEEDED"
    agent.request("POST", "/backup", _leaky_request("crash"))
    wait_for(pidfile)
    state = agent.base / "state" / "backup-crash.json"
    deadline = time.monotonic() + 30
    while not (script_pid := json.loads(state.read_text())["script_pid"]):
        assert time.monotonic() < deadline  # the agent persists the pid as the script starts
        time.sleep(0.02)
    assert pidfile.read_text().strip() == str(script_pid)
    assert (agent.base / "state" / "backup-crash.secrets").exists()
    agent.kill()
    assert not gone(script_pid)  # scripts live in their own session ...
    agent.start()
    result = agent.wait_job("backup", "crash")
    assert result["status"] == "FAILED" and result["state"] == "finished"
    assert result["error_message"] == f"{RESTART_REASON} (stage backup)"
    assert result["post_backup_unlock_log"] == "unlocked\n"
    assert unlock_env.read_text().split() == [DB_PASSWORD, "e1", "true"]
    assert agent.trace_lines().count("post-backup-unlock mydb") == 2
    wait_gone(script_pid)  # ... until the restarted agent kills what is left
    assert agent.request("GET", "/backup/done") == (200, done)  # finished jobs survive
    assert agent.request("POST", "/backup", backup_request("crash"))[0] == 409  # no rerun
    assert not (agent.base / "backup" / "crash").exists()
    assert not list((agent.base / "state").glob("*.secrets"))
    for secret in SECRETS:
        assert secret not in agent.logs()


def test_restart_with_another_password_still_unlocks(make_agent, tmp_path: Path) -> None:
    agent = make_agent(scripts=scripts_with(tmp_path, backup="sleep 60"))
    agent.request("POST", "/backup", backup_request("pw"))
    agent.wait_state("backup", "pw", "backup")
    agent.kill()
    agent.env["client_password"] = "a-new-password"
    agent.start()
    auth = ("agent-user", "a-new-password")
    deadline = time.monotonic() + 60
    while (result := agent.request("GET", "/backup/pw", auth=auth)[1])["status"] == "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert result["status"] == "FAILED"
    assert "sealed credentials were unreadable" in result["error_message"]
    assert agent.trace_lines()[-1] == "post-backup-unlock mydb"


def test_sigkill_mid_restore_runs_restore_unlock(make_agent, tmp_path: Path) -> None:
    agent = make_agent(scripts=scripts_with(tmp_path, restore="sleep 60"))
    agent.request("PUT", "/restore", restore_request("rc"))
    agent.wait_state("restore", "rc", "restore")
    agent.kill()
    agent.start()
    result = agent.wait_job("restore", "rc")
    assert result["status"] == "FAILED" and RESTART_REASON in result["error_message"]
    assert agent.trace_lines()[-1].strip() == "post-restore-unlock"


def test_sigterm_mid_backup_unlocks(make_agent, tmp_path: Path) -> None:
    agent = make_agent(scripts=scripts_with(tmp_path, backup="sleep 60"))
    agent.request("POST", "/backup", backup_request("term"))
    agent.wait_state("backup", "term", "backup")
    agent.stop()
    assert agent.trace_lines()[-1] == "post-backup-unlock mydb"
    agent.start()
    result = agent.wait_job("backup", "term")
    assert result["status"] == "FAILED"
    assert result["error_message"] == "agent stopped while the job was running"
    assert agent.trace_lines().count("post-backup-unlock mydb") == 1  # not a second time


def _big_source(path: Path, mib: int) -> None:
    """Sparse: costs no disk here, and uploads (untransformed) at the store's own pace."""
    with open(path, "wb") as f:
        f.truncate(mib << 20)


@pytest.mark.parametrize("backend", ["s3", "swift"])
def test_sigkill_mid_upload_leaves_no_orphan(
    request: pytest.FixtureRequest, make_agent, tmp_path: Path, backend: str
) -> None:
    """SIGKILL while parts / segments are being written: after the restart the job is
    FAILED, the database unlocked, and the store holds no object, no multipart upload and
    no segment under the job's prefix."""
    settings = request.getfixturevalue(f"{backend}_settings")
    source = tmp_path / "source.bin"
    _big_source(source, 1024)
    scripts = tmp_path / "scripts"
    tracing_scripts(scripts)
    write_script(scripts, "backup", f'cp "{source}" "$BACKUP_DIRECTORY/data.bin"')
    # 1 GiB in parts of 5 MiB, one in flight: the upload takes hundreds of requests, so the
    # kill lands in the middle of it.
    agent = make_agent(scripts=scripts, s3_part_size=5 * 1024 * 1024, s3_max_concurrency=1)
    dest = destination_for(settings)
    prefix = dest["filenamePrefix"]
    req = backup_request("orphan", destination=dest)
    assert agent.request("POST", "/backup", req)[0] == 201
    agent.wait_state("backup", "orphan", "upload", timeout=120)
    deadline = time.monotonic() + 120
    while not _pending(request, settings, prefix, backend):
        _, body = agent.request("GET", "/backup/orphan")
        assert body["status"] == "RUNNING", body
        assert time.monotonic() < deadline
        time.sleep(0.05)
    agent.kill()
    assert _pending(request, settings, prefix, backend)  # the kill left parts behind ...
    agent.start()
    result = agent.wait_job("backup", "orphan", timeout=120)
    assert result["status"] == "FAILED"
    assert result["error_message"] == f"{RESTART_REASON} (stage upload)"
    assert agent.trace_lines()[-1] == "post-backup-unlock mydb"
    assert not _pending(request, settings, prefix, backend)  # ... which the restart removed
    assert list_keys(settings, prefix) == []
    assert not (agent.base / "backup" / "orphan").exists()
    for secret in secrets_of(settings):
        assert secret not in agent.logs()


def _pending(request: pytest.FixtureRequest, settings, prefix: str, backend: str) -> list[str]:
    """Multipart uploads (S3) or segments (Swift) under ``prefix``, asked of the server."""
    if backend == "s3":
        uploads = request.getfixturevalue("s3_server").multipart_uploads(settings.bucket)
        return [u["Key"] for u in uploads if u["Key"].startswith(prefix)]
    names = request.getfixturevalue("swift_server").names(settings.container + "_segments")
    return [n for n in names if n.startswith(prefix)]


def test_sigkill_after_the_upload_deletes_the_object(
    s3_settings, make_agent, tmp_path: Path
) -> None:
    """Killed in backup-cleanup, after a complete upload: the job can no longer succeed, so
    the restarted agent deletes the object (no restore point will ever refer to it)."""
    marker = tmp_path / "cleanup-started"
    scripts = scripts_with(tmp_path, **{"backup-cleanup": f"touch {marker}; sleep 60"})
    agent = make_agent(scripts=scripts)
    dest = destination_for(s3_settings)
    agent.request("POST", "/backup", backup_request("late", destination=dest))
    wait_for(marker)
    _, running = agent.request("GET", "/backup/late")
    assert running["stored_key"] == dest["filenamePrefix"] + running["filename"]
    assert list_keys(s3_settings, dest["filenamePrefix"]) == [running["stored_key"]]
    agent.kill()
    agent.start()
    result = agent.wait_job("backup", "late")
    assert result["status"] == "FAILED"
    assert result["error_message"] == f"{RESTART_REASON} (stage backup-cleanup)"
    assert result["stored_key"] is None and result["checksum"] is None
    assert list_keys(s3_settings, dest["filenamePrefix"]) == []
    assert agent.trace_lines()[-1] == "post-backup-unlock mydb"
