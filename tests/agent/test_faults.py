"""Failures, crashes and secrets: the database is always unlocked, nothing leaks."""

from __future__ import annotations

import os
import time
from pathlib import Path

from agent.jobs import RESTART_REASON
from tests.agent.helpers import (
    PASSWORD,
    AgentProcess,
    backup_request,
    restore_request,
    tracing_scripts,
    write_script,
)


def scripts_with(tmp_path: Path, **bodies: str) -> Path:
    d = tmp_path / "scripts"
    tracing_scripts(d)
    for name, body in bodies.items():
        for old in (d / name, d / f"{name}.sh"):
            old.unlink(missing_ok=True)
        write_script(d, name, f'echo "{name} $*" >> "$TRACE"; ' + body)
    return d


def test_failing_backup_still_unlocks(make_agent, tmp_path: Path) -> None:
    agent = make_agent(scripts=scripts_with(tmp_path, backup="echo boom >&2; exit 3"))
    assert agent.request("POST", "/backup", backup_request("f1"))[0] == 201
    result = agent.wait_job("backup", "f1")
    assert result["status"] == "FAILED"
    assert result["message"] == "Backup failed"
    assert "script backup exited with status 3" in result["error_message"]
    assert result["backup_errorlog"] == "boom\n"
    stages = [line.split()[0] for line in agent.trace_lines()]
    assert stages == [
        "pre-backup-lock",
        "pre-backup-check",
        "backup",
        "backup-cleanup",
        "post-backup-unlock",
    ]


def test_failing_check_unlocks_failing_lock_does_not(make_agent, tmp_path: Path) -> None:
    agent = make_agent(scripts=scripts_with(tmp_path, **{"pre-backup-check": "exit 1"}))
    agent.request("POST", "/backup", backup_request("c1"))
    assert agent.wait_job("backup", "c1")["status"] == "FAILED"
    assert agent.trace_lines()[-1] == "post-backup-unlock mydb"
    agent2 = make_agent(scripts=scripts_with(tmp_path / "x", **{"pre-backup-lock": "exit 1"}))
    agent2.request("POST", "/backup", backup_request("l1"))
    result = agent2.wait_job("backup", "l1")
    assert "pre-backup-lock" in result["error_message"]
    assert agent2.trace_lines() == ["pre-backup-lock mydb"]


def test_failing_restore_unlocks_and_failing_unlock_fails(make_agent, tmp_path: Path) -> None:
    agent = make_agent(
        scripts=scripts_with(tmp_path, restore="exit 4", **{"post-backup-unlock": "exit 5"})
    )
    agent.request("PUT", "/restore", restore_request("r1"))
    result = agent.wait_job("restore", "r1")
    assert result["status"] == "FAILED" and "status 4" in result["error_message"]
    assert agent.trace_lines()[-1].strip() == "post-restore-unlock"
    agent.request("POST", "/backup", backup_request("b1"))
    result = agent.wait_job("backup", "b1")
    assert result["status"] == "FAILED"
    assert "post-backup-unlock exited with status 5" in result["error_message"]


def test_timeout_kills_process_group(make_agent, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    agent = make_agent(
        scripts=scripts_with(tmp_path, backup=f"sleep 60 & echo $! > {pidfile}; wait"),
        stage_timeout_seconds=1,
    )
    agent.request("POST", "/backup", backup_request("t1"))
    result = agent.wait_job("backup", "t1", timeout=30)
    assert result["status"] == "FAILED"
    assert "timed out" in result["error_message"]
    child = int(pidfile.read_text())
    time.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text()
    assert agent.trace_lines()[-1] == "post-backup-unlock mydb"


def test_exactly_one_file(make_agent, tmp_path: Path) -> None:
    agent = make_agent(scripts=scripts_with(tmp_path, backup="true"))
    agent.request("POST", "/backup", backup_request("z"))
    result = agent.wait_job("backup", "z")
    assert result["status"] == "FAILED" and "exactly one file" in result["error_message"]
    agent2 = make_agent(
        scripts=scripts_with(
            tmp_path / "two", backup='touch "$BACKUP_DIRECTORY/a" "$BACKUP_DIRECTORY/b"'
        )
    )
    agent2.request("POST", "/backup", backup_request("two"))
    result = agent2.wait_job("backup", "two")
    assert result["status"] == "FAILED" and "found 2 entries (a, b)" in result["error_message"]
    assert agent2.trace_lines()[-1] == "post-backup-unlock mydb"


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
    assert result["backup_log"].endswith("49999\n50000\n")
    assert result["backup_errorlog"].endswith("20000\n")


def test_secrets_never_in_argv_or_logs(make_agent, tmp_path: Path) -> None:
    out = tmp_path / "seen"
    out.mkdir()
    body = (
        f'printf %s "$BACKUP_PASSWORD" > {out}/pw; printf %s "$ENCRYPTION_KEY" > {out}/key; '
        f'printf %s "${{client_password:-unset}}" > {out}/agentpw; '
        f'echo "$AGENT_SIDE $EXTRA $FLAG" > {out}/vars; touch {out}/ready; sleep 3; '
        'echo x > "$BACKUP_DIRECTORY/f"'
    )
    agent = make_agent(scripts=scripts_with(tmp_path, backup=body), AGENT_SIDE="kept")
    req = backup_request(
        "sec",
        encryption_key="ENC-KEY-very-secret",
        backup={"parameters": [{"EXTRA": "e1"}, {"FLAG": True}]},
    )
    assert agent.request("POST", "/backup", req)[0] == 201
    deadline = time.monotonic() + 20
    while not (out / "ready").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    secrets = [b"db-PASSW0RD-123", b"ENC-KEY-very-secret", b"s3cr3t-AUTH", PASSWORD.encode()]
    cmdlines = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdlines.append((proc / "cmdline").read_bytes())
            except OSError:
                pass
    assert any(b"sec" in c and b"mydb" in c for c in cmdlines)  # the script was seen
    for c in cmdlines:
        for s in secrets:
            assert s not in c, (s, c)
    result = agent.wait_job("backup", "sec")
    assert result["status"] == "SUCCEEDED", result
    assert (out / "pw").read_text() == "db-PASSW0RD-123"
    assert (out / "key").read_text() == "ENC-KEY-very-secret"
    assert (out / "agentpw").read_text() == "unset"
    assert (out / "vars").read_text().split() == ["kept", "e1", "true"]
    line = agent.trace_lines()[2]
    assert "dbuser - mydb" in line and line.endswith(" sec false -")
    # a bad request echoing nothing either
    bad = backup_request("sec2", encryption_key="ENC-KEY-very-secret")
    bad["backup"]["host"] = 5
    assert agent.request("POST", "/backup", bad)[0] == 400
    agent.stop()
    logs = agent.logs().encode()
    assert b"job_started" in logs
    for s in secrets:
        assert s not in logs
        assert s not in (agent.base / "state" / "backup-sec.json").read_bytes()


def test_positional_secrets_compat_switch(make_agent) -> None:
    agent = make_agent(positional_secrets="true")
    agent.request("POST", "/backup", backup_request("p", encryption_key="k1"))
    assert agent.wait_job("backup", "p")["status"] == "SUCCEEDED"
    line = agent.trace_lines()[2]
    assert " db-PASSW0RD-123 mydb " in line and line.endswith(" p false k1")


def test_sigkill_mid_backup_then_restart(make_agent, tmp_path: Path) -> None:
    pidfile = tmp_path / "script.pid"
    agent: AgentProcess = make_agent(
        scripts=scripts_with(
            tmp_path,
            backup=f'if [ "$JOB_ID" = crash ]; then echo $$ > {pidfile}; sleep 60; fi; '
            'echo x > "$BACKUP_DIRECTORY/f"',
        )
    )
    agent.request("POST", "/backup", backup_request("done"))
    done = agent.wait_job("backup", "done")
    assert done["status"] == "SUCCEEDED"
    agent.request("POST", "/backup", backup_request("crash"))
    agent.wait_state("backup", "crash", "backup")
    deadline = time.monotonic() + 10
    while not pidfile.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    script_pid = int(pidfile.read_text())
    agent.kill()
    assert Path(f"/proc/{script_pid}").exists()  # scripts live in their own session
    unlocks_before = agent.trace_lines().count("post-backup-unlock mydb")
    agent.start()
    result = agent.wait_job("backup", "crash")
    assert result["status"] == "FAILED"
    assert result["state"] == "finished"
    assert RESTART_REASON in result["error_message"]
    assert result["post_backup_unlock_log"] == "out-post-backup-unlock\n"
    assert agent.trace_lines().count("post-backup-unlock mydb") == unlocks_before + 1
    assert agent.request("GET", "/backup/done") == (200, done)  # finished jobs survive
    time.sleep(0.2)
    assert (
        not Path(f"/proc/{script_pid}").exists()
        or "Z" in Path(f"/proc/{script_pid}/stat").read_text()
    )
    # the id is taken: the manager resumes polling, no second run
    assert agent.request("POST", "/backup", backup_request("crash"))[0] == 409


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
    assert "agent stopped" in result["error_message"]
    assert os.path.exists(agent.base / "state" / "backup-term.json")
