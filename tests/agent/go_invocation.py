"""Runs a script set the way the Go ``osb-backup-agent`` (evoila, branch develop) does, for
tests of scripts that must work under both agents (docs/agent-protocol.md, "What each agent
kind does"). Written from its documented behaviour, not from its code:

- every stage needs a script, ``<stage>`` or else ``<stage>.sh`` (any file: it is not run
  directly); a missing one fails the job at that stage;
- a script runs as ``bash <scripts_path>/<file> <arguments>``, stdin empty, in the agent's
  own working directory;
- arguments: ``database`` (pre-backup-lock, pre-backup-check, post-backup-unlock),
  ``host username password database file_name job_id compression encryption_key`` (backup;
  restore with the destination's ``filename``), ``database job_id`` (backup-cleanup),
  ``job_id`` (pre-restore-lock, restore-cleanup), none (post-restore-unlock); the backup's
  file name is bare: ``YYYY_MM_DD_HH_MM_<host>_<database>`` (UTC), no directory;
- the environment is exactly the request's ``parameters`` (``name=%v``) when there are any,
  nothing else (no ``PATH``, no ``HOME``); with none, the agent's own environment;
- the first failed stage ends the job: no later stage runs, the unlock script neither;
- the agent creates no directory: the backup's upload takes the first entry, by name, of
  ``<directory_backup>/<job_id>/`` (the job fails if it does not exist), and the restore's
  download creates ``<directory_restore>/<job_id>/<filename>`` (fails if the directory does
  not exist, or if the file does and ``allowed_to_delete_files`` is not true).

Storage is a local directory here: the subject is the scripts' invocation, not the upload.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BACKUP_STAGES = (
    "pre-backup-lock",
    "pre-backup-check",
    "backup",
    "backup-cleanup",
    "post-backup-unlock",
)
RESTORE_STAGES = ("pre-restore-lock", "restore", "restore-cleanup", "post-restore-unlock")
ALL_STAGES = BACKUP_STAGES + RESTORE_STAGES


def go_value(value: Any) -> str:
    """``fmt.Sprintf("%v")`` of a JSON scalar as Go decodes it (numbers are float64)."""
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        number = float(value)
        if number.is_integer() and abs(number) < 1e21:
            return str(int(number))
        return repr(number)
    return str(value)


@dataclass
class GoJob:
    status: str = "RUNNING"
    state: str = ""
    error_message: str = ""
    filename: str = ""
    logs: dict[str, tuple[str, str]] = field(default_factory=dict)
    ran: list[tuple[str, list[str]]] = field(default_factory=list)


@dataclass
class GoInvocation:
    """The Go agent's script runner: its configuration (``agent_env``: its process's
    environment, which holds ``directory_backup``, ``directory_restore`` and more) and a
    local bucket directory."""

    scripts_path: Path
    directory_backup: Path
    directory_restore: Path
    bucket: Path
    workdir: Path
    agent_env: dict[str, str]
    allowed_to_delete_files: bool = False
    timeout: float = 300.0

    def _script(self, stage: str) -> Path | None:
        for name in (stage, f"{stage}.sh"):
            path = self.scripts_path / name
            if path.exists():
                return path
        return None

    def _env(self, parameters: list[dict[str, Any]]) -> dict[str, str]:
        env = [f"{k}={go_value(v)}" for item in parameters for k, v in item.items()]
        if not env:
            return dict(self.agent_env)
        return dict(line.split("=", 1) for line in env)

    def _stage(self, job: GoJob, stage: str, args: list[str], env: dict[str, str]) -> bool:
        job.state = stage
        path = self._script(stage)
        if path is None:
            job.error_message = f"No script found for the {stage} stage."
            return False
        bash = shutil.which("bash", path=self.agent_env.get("PATH")) or "/bin/bash"
        job.ran.append((stage, list(args)))
        done = subprocess.run(
            [bash, str(path), *args],
            input=b"",
            capture_output=True,
            env=env,
            cwd=self.workdir,
            timeout=self.timeout,
        )
        job.logs[stage] = (
            done.stdout.decode(errors="replace"),
            done.stderr.decode(errors="replace"),
        )
        if done.returncode != 0:
            job.error_message = f"{stage}: exit status {done.returncode}"
            return False
        return True

    def _finish(self, job: GoJob, ok: bool) -> GoJob:
        job.status = "SUCCEEDED" if ok else "FAILED"
        job.state = "finished"
        return job

    def backup(self, request: dict[str, Any]) -> GoJob:
        job = GoJob()
        sec = request["backup"]
        job_id = request["id"]
        env = self._env(sec.get("parameters") or [])
        now = datetime.now(UTC)
        name = f"{now:%Y_%m_%d_%H_%M}_{sec['host']}_{sec['database']}"
        db_args = [
            sec["host"],
            sec["username"],
            sec["password"],
            sec["database"],
            name,
            job_id,
            "true" if request.get("compression") else "false",
            request["encryption_key"],
        ]
        plan = [
            ("pre-backup-lock", [sec["database"]]),
            ("pre-backup-check", [sec["database"]]),
            ("backup", db_args),
        ]
        for stage, args in plan:
            if not self._stage(job, stage, args, env):
                return self._finish(job, False)
        work = self.directory_backup / job_id
        try:
            first = sorted(p.name for p in work.iterdir())[0]
        except (OSError, IndexError):
            job.error_message = f"upload: no file in {work}"
            return self._finish(job, False)
        shutil.copyfile(work / first, self.bucket / first)
        job.filename = first
        for stage, args in [
            ("backup-cleanup", [sec["database"], job_id]),
            ("post-backup-unlock", [sec["database"]]),
        ]:
            if not self._stage(job, stage, args, env):
                return self._finish(job, False)
        return self._finish(job, True)

    def restore(self, request: dict[str, Any]) -> GoJob:
        job = GoJob()
        sec = request["restore"]
        job_id = request["id"]
        filename = request["destination"]["filename"]
        env = self._env(sec.get("parameters") or [])
        if not self._stage(job, "pre-restore-lock", [job_id], env):
            return self._finish(job, False)
        job.state = "restore"
        target = self.directory_restore / job_id / filename
        if target.exists():
            if not self.allowed_to_delete_files:
                job.error_message = f"File already exists: {target}"
                return self._finish(job, False)
            target.unlink()
        try:
            with target.open("xb") as out:  # os.Create: the directory must exist
                out.write((self.bucket / filename).read_bytes())
        except OSError as exc:
            job.error_message = f"download: {type(exc).__name__}"
            return self._finish(job, False)
        db_args = [
            sec["host"],
            sec["username"],
            sec["password"],
            sec["database"],
            filename,
            job_id,
            "true" if request.get("compression") else "false",
            request["encryption_key"],
        ]
        for stage, args in [
            ("restore", db_args),
            ("restore-cleanup", [job_id]),
            ("post-restore-unlock", []),
        ]:
            if not self._stage(job, stage, args, env):
                return self._finish(job, False)
        return self._finish(job, True)
