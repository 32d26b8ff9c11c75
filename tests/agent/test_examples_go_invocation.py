"""The example script sets under the Go agent's script invocation (tests/agent/go_invocation.py):
this machine's PostgreSQL, MariaDB and Redis backed up, dropped, restored and compared, the
scripts given only positional arguments and an environment of the request's parameters (or,
without parameters, the agent's own). The same sets run under our agent in
test_e2e_databases.py."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.agent.go_invocation import ALL_STAGES, GoInvocation
from tests.agent.test_e2e_databases import ENGINES, EXAMPLES, _require

SETS = ("postgresql", "mariadb", "redis")


def test_every_set_has_all_nine_stages_and_the_same_lib() -> None:
    libs = {(EXAMPLES / s / "lib.sh").read_bytes() for s in SETS}
    assert len(libs) == 1
    for name in SETS:
        for stage in ALL_STAGES:
            path = EXAMPLES / name / stage
            assert path.is_file() and os.access(path, os.X_OK), path


def _runner(tmp_path: Path, name: str, *, conf: bool, extra_env: dict[str, str]) -> GoInvocation:
    scripts = tmp_path / "scripts"
    shutil.copytree(EXAMPLES / name, scripts)  # the set unchanged ...
    backup_dir, restore_dir = tmp_path / "backup", tmp_path / "restore"
    for d in (backup_dir, restore_dir, tmp_path / "bucket", tmp_path / "cwd"):
        d.mkdir()
    if conf:  # ... plus the operator's note of the agent's directories
        (scripts / "agent.conf").write_text(
            f"directory_backup={backup_dir}\ndirectory_restore={restore_dir}\n"
        )
    agent_env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "client_username": "go-agent",
        "client_password": "go-agent-password",
        "directory_backup": str(backup_dir),
        "directory_restore": str(restore_dir),
        "scripts_path": str(scripts),
        **extra_env,
    }
    return GoInvocation(
        scripts_path=scripts,
        directory_backup=backup_dir,
        directory_restore=restore_dir,
        bucket=tmp_path / "bucket",
        workdir=tmp_path / "cwd",
        agent_env=agent_env,
    )


# What a registration for a Go agent holds: a username and a password, both required (it
# refuses empty ones). This machine's PostgreSQL trusts loopback and its Redis default user
# has no password (any is accepted), so a value that is never checked stands in; its MariaDB
# root has an empty password, which no Go agent could be given (the runner does not check).
CREDENTIALS = {
    "postgresql": ("postgres", "not-checked-by-trust"),
    "redis": ("default", "not-checked-nopass"),
    "mariadb": ("root", ""),
}


def _request(kind: str, engine: Any, parameters: list[dict[str, Any]], **top: Any) -> dict:
    username, password = CREDENTIALS[engine.name]
    return {
        "id": f"{kind[0]}-{uuid.uuid4().hex[:8]}",
        "compression": top.get("compression", False),
        "encryption_key": top.get("encryption_key", "none"),
        "destination": {"type": "S3", "filename": top.get("filename")},
        kind: {
            "host": "127.0.0.1",
            "username": username,
            "password": password,
            "database": engine.db,
            "parameters": parameters,
        },
    }


@pytest.mark.parametrize(
    "mode",
    [
        # parameters given: the scripts' whole environment is these (no PATH, no HOME, no
        # directories: they come from agent.conf beside the scripts)
        "parameters",
        # none given: the scripts inherit the Go agent's own environment
        "inherited",
    ],
)
@pytest.mark.parametrize("engine_name", SETS)
def test_backup_drop_restore_under_go_invocation(
    tmp_path: Path, engine_name: str, mode: str
) -> None:
    engine = ENGINES[engine_name]()
    _require(engine.port, engine_name)
    params: list[dict[str, Any]] = []
    extra_env: dict[str, str] = {}
    if mode == "parameters":
        params = [{"BACKUP_PORT": engine.port}]  # a number, as JSON has it
        if engine_name == "redis":
            params.append({"REDIS_KEY_PATTERN": engine.prefix + "*"})
    elif engine_name == "redis":
        extra_env["REDIS_KEY_PATTERN"] = engine.prefix + "*"
    go = _runner(tmp_path, engine_name, conf=mode == "parameters", extra_env=extra_env)
    compression = mode == "parameters"
    engine.create()
    try:
        before = engine.snapshot()
        body = _request("backup", engine, params, compression=compression)
        job = go.backup(body)
        assert job.status == "SUCCEEDED", (job.error_message, job.logs)
        assert [s for s, _ in job.ran] == [
            "pre-backup-lock",
            "pre-backup-check",
            "backup",
            "backup-cleanup",
            "post-backup-unlock",
        ]
        stored = (go.bucket / job.filename).read_bytes()
        if job.filename.endswith(".gz"):
            assert engine_name == "mariadb" and compression
            stored = gzip.decompress(stored)
        assert engine.magic in stored[:1024]
        # backup-cleanup removed what the Go agent leaves behind
        assert not (go.directory_backup / body["id"]).exists()

        engine.drop_data()
        try:
            gone = engine.snapshot()
        except subprocess.CalledProcessError:
            gone = b""
        assert gone != before

        rbody = _request("restore", engine, params, compression=compression, filename=job.filename)
        restored = go.restore(rbody)
        assert restored.status == "SUCCEEDED", (restored.error_message, restored.logs)
        assert engine.snapshot() == before
        # pre-restore-lock made the job directory the Go agent does not make; restore-cleanup
        # removed it again
        assert not (go.directory_restore / rbody["id"]).exists()
    finally:
        engine.cleanup()


def test_a_key_the_scripts_must_apply_fails_the_backup(tmp_path: Path) -> None:
    """The Go agent hands the plan's encryption key to the scripts; these do not encrypt, and
    say so instead of storing a plaintext dump."""
    engine = ENGINES["postgresql"]()
    _require(engine.port, "postgresql")
    go = _runner(tmp_path, "postgresql", conf=True, extra_env={})
    job = go.backup(_request("backup", engine, [{"BACKUP_PORT": 5432}], encryption_key="k3y"))
    assert job.status == "FAILED" and job.state == "finished"
    assert "do not encrypt" in job.logs["backup"][1]
    assert "k3y" not in job.logs["backup"][1]
    assert list(go.bucket.iterdir()) == []
