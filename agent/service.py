"""The agent's jobs: script pipelines, uploads and downloads, persistence and recovery."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from pydantic import ValidationError

from agent import transforms
from agent.config import AgentConfig
from agent.destinations import to_settings, transfer_settings
from agent.environment import FROM_MANAGER, allowed, describe, refusal
from agent.jobs import RESTART_REASON, JobState, Kind, StateStore
from agent.models import (
    CANCELLED_MESSAGE,
    NO_KEY,
    VERIFY_STAGE,
    BackupRequest,
    Destination,
    RestoreRequest,
    describe_errors,
    safe_error,
)
from agent.scripts import MANDATORY, StageResult, find_script, kill_leftover_group, run_script
from agent.scripts import secrets_fd as make_secrets_fd
from storage import ObjectStore, StorageError, StoredObject, TransferSettings, open_store

log = structlog.get_logger("agent")

BACKUP_STAGES = (
    "pre-backup-lock",
    "pre-backup-check",
    "backup",
    "backup-cleanup",
    "post-backup-unlock",
)
RESTORE_STAGES = ("pre-restore-lock", "restore", "restore-cleanup", "post-restore-unlock")
UNLOCK = {"backup": "post-backup-unlock", "restore": "post-restore-unlock"}
PLACEHOLDER = "-"
READ_BLOCK = 4 * 1024 * 1024
SECRET_NAMES = frozenset({"BACKUP_PASSWORD", "ENCRYPTION_KEY", "S3_AUTHSECRET", "SWIFT_PASSWORD"})
# Variables of the agent's own environment that scripts must never see (compared lower-case),
# even when the operator lists them in script_env_passthrough.
_HIDDEN_ENV = frozenset(
    {"client_password", "client_username", "agent_secrets_file", "agent_secrets_fd"}
    | {n.lower() for n in SECRET_NAMES}
)
# The operator's own settings of these reach the scripts (never a tenant's: refused names).
_INHERITED = ("HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class JobFailed(Exception):
    """A step failed; the message is safe to show and to log."""


class JobCancelled(JobFailed):
    """The manager cancelled the job: no further data stage starts (cleanup and unlock do)."""

    def __init__(self) -> None:
        super().__init__(CANCELLED_MESSAGE)


@dataclass(slots=True)
class ScriptEnv:
    """What a script sees: plain variables, and secrets delivered as ``secrets_via`` says."""

    plain: dict[str, str]
    secrets: dict[str, str] = field(default_factory=dict)


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.store = StateStore(cfg.state_dir, cfg.client_password.get_secret_value())
        self.jobs: dict[Kind, dict[str, JobState]] = {"backup": {}, "restore": {}}
        self.tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._sweeper: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        for d in (self.cfg.directory_backup, self.cfg.directory_restore):
            d.mkdir(parents=True, exist_ok=True)
        # The storage backends import botocore / swiftclient lazily; a second of CPU that
        # belongs to the start, not to the first backup.
        for module in ("storage.s3", "storage.swift"):
            await asyncio.to_thread(importlib.import_module, module)
        self._recover()
        self._sweeper = asyncio.create_task(self._sweep_loop())

    async def stop(self) -> None:
        """Cancel every job: each runs its unlock script before it ends (SIGTERM path)."""
        if self._sweeper:
            self._sweeper.cancel()
        tasks = list(self.tasks.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _recover(self) -> None:
        """Jobs of a previous run: finished ones answer again; running ones failed with the
        agent. Each of those is finished in the background (holding a job slot): its script
        group killed, its half-written upload deleted, its database unlocked."""
        for job in self.store.load_all():
            if self._expired(job):
                self.store.remove(job.kind, job.id)
                continue
            self.jobs[job.kind][job.id] = job
            if job.status == "RUNNING":
                log.warning("job_interrupted", job_id=job.id, kind=job.kind, stage=job.state)
                self._spawn(job, self._finish_interrupted(job))

    async def _finish_interrupted(self, job: JobState) -> None:
        error = f"{RESTART_REASON} (stage {job.state})"
        try:
            if job.script_pid and kill_leftover_group(job.script_pid):
                log.warning("leftover_script_killed", job_id=job.id, pid=job.script_pid)
            job.script_pid = None
            sealed = self.store.load_secrets(job.kind, job.id)
            # A half-written upload, or a complete one of a job that can no longer succeed:
            # either would be an object no restore point refers to.
            key = job.upload_key if job.upload_in_progress else job.stored_key
            if key:
                problem = await self._delete_orphan(job, key, (sealed or {}).get("destination"))
                if problem:
                    error += f"; {problem}"
            if job.lock_succeeded and not job.unlock_done:
                if sealed is None:
                    error += "; its sealed credentials were unreadable: unlock ran without them"
                env = self._recovery_env(job, sealed or {})
                error = await self._unlock(job, env, error) or error
        except asyncio.CancelledError:
            # Stopped again before the job could be finished: the next start tries again.
            self.store.save(job)
            raise
        except Exception as exc:
            error += f"; recovery failed: {safe_error(exc)['error']}"
            log.error("recovery_failed", job_id=job.id, **safe_error(exc))
        base = self.cfg.directory_backup if job.kind == "backup" else self.cfg.directory_restore
        shutil.rmtree(base / job.id, ignore_errors=True)
        if job.cancel_requested:  # asked before the restart, or while this recovery ran
            job.cancelled = True
            error = f"{CANCELLED_MESSAGE}; {error}"
        self._finish(job, error)

    def _recovery_env(self, job: JobState, sealed: dict[str, Any]) -> ScriptEnv:
        # Sealed by this or an older agent: checked again, as a request's are.
        plain = self._parameters(sealed.get("parameters") or {})
        plain.update(self._base_env())
        plain.update(
            JOB_ID=job.id,
            BACKUP_HOST=job.host,
            BACKUP_USERNAME=job.username,
            BACKUP_DATABASE=job.database,
            AGENT_RECOVERY="true",
        )
        secrets = {}
        if sealed.get("password") is not None:
            secrets["BACKUP_PASSWORD"] = sealed["password"]
        return ScriptEnv(plain, secrets)

    async def _delete_orphan(
        self, job: JobState, key: str, raw: dict[str, Any] | None
    ) -> str | None:
        """Delete an object of an interrupted job, with the multipart upload's parts or the
        Swift segments it left; returns what went wrong, if anything."""
        if raw is None:
            return f"the object {key} may remain: its destination is unknown"
        try:
            dest = Destination.model_validate(raw)
            async with self._open_store(dest) as store:
                await store.delete(key)
        except Exception as exc:
            reason = _storage_error(exc)
            log.warning("orphan_delete_failed", job_id=job.id, key=key, error=reason)
            return f"the object {key} may remain: deleting it failed ({reason})"
        job.upload_in_progress = False
        job.stored_key = job.checksum = job.stored_size = None
        log.info("orphan_deleted", job_id=job.id, key=key)
        return None

    def _expired(self, job: JobState) -> bool:
        return (
            job.status != "RUNNING"
            and job.ended_epoch is not None
            and time.time() - job.ended_epoch > self.cfg.job_retention_seconds
        )

    async def _sweep_loop(self) -> None:
        interval = max(0.5, min(60.0, self.cfg.job_retention_seconds / 4))
        while True:
            await asyncio.sleep(interval)
            for kind, jobs in self.jobs.items():
                for job_id, job in list(jobs.items()):
                    if self._expired(job):
                        try:
                            self.forget(kind, job_id)
                        except OSError as exc:
                            log.warning("forget_failed", job_id=job_id, error=str(exc))

    # ---------------------------------------------------------------- API

    def running_count(self) -> int:
        return len(self.tasks)

    def get(self, kind: Kind, job_id: str) -> JobState | None:
        return self.jobs[kind].get(job_id)

    def cancel(self, kind: Kind, job_id: str) -> JobState | None:
        """Ask a running job to stop at its next stage boundary (persisted: a restart ends it
        cancelled too). The stage running now finishes, unless it is the agent's own upload or
        download, which stops at its next block; cleanup and unlock still run. Idempotent."""
        job = self.jobs[kind].get(job_id)
        if job is not None and job.status == "RUNNING" and not job.cancel_requested:
            job.cancel_requested = True
            self.store.save(job)
            log.info("job_cancel_requested", job_id=job_id, kind=kind, stage=job.state)
        return job

    def forget(self, kind: Kind, job_id: str) -> None:
        self.jobs[kind].pop(job_id, None)
        self.store.remove(kind, job_id)

    def skip_storage(self, dest: Destination) -> bool:
        return self.cfg.skip_storage if self.cfg.skip_storage is not None else dest.skipStorage

    def submit(self, kind: Kind, req: BackupRequest | RestoreRequest) -> JobState:
        """Registers and starts the job. The caller has checked id and capacity without an
        await in between, so no other request can take the slot or the id meanwhile."""
        sec, dest = req.section, req.destination
        job = JobState(
            id=req.id,
            kind=kind,
            message=f"{kind} is running",
            type=dest.type,
            compression=req.compression,
            skip_storage=self.skip_storage(dest),
            skipSSL=dest.skipSSL,
            destination=dest.public(),
            filenamePrefix=dest.filenamePrefix,
            database=sec.database,
            host=sec.host,
            username=sec.username,
            transform={
                "compression": req.agent_compression,
                "encryption": transforms.ENCRYPTION_NAME if req.agent_encryption else None,
            },
        )
        for stage in BACKUP_STAGES if kind == "backup" else RESTORE_STAGES:
            job.logs[stage] = {"log": "", "errorlog": ""}
        self.store.save(job)
        self.store.save_secrets(
            kind,
            job.id,
            {
                "password": sec.password,
                "parameters": sec.env(),
                "destination": None if job.skip_storage else dest.model_dump(),
            },
        )
        self.jobs[kind][job.id] = job
        if isinstance(req, BackupRequest):
            self._spawn(job, self._backup(job, req))
        elif req.verify:
            self._spawn(job, self._verify(job, req))
        else:
            self._spawn(job, self._restore(job, req))
        log.info("job_started", job_id=job.id, kind=kind, database=sec.database)
        return job

    def _spawn(self, job: JobState, coro: Coroutine[Any, Any, None]) -> None:
        key = (job.kind, job.id)
        task = asyncio.create_task(coro)
        self.tasks[key] = task
        task.add_done_callback(lambda _t: self.tasks.pop(key, None))

    # ---------------------------------------------------------------- scripts

    def refused_parameter(self, req: BackupRequest | RestoreRequest) -> str | None:
        """Why a request's parameter may not reach the scripts under this agent's
        ``allowed_parameters`` (the names refused everywhere the request model refuses)."""
        for name in req.section.env():
            if not self._operator_allows(name):
                return describe(
                    name,
                    f"this agent's allowed_parameters ({self.cfg.allowed_parameters}) "
                    "does not list it",
                )
        return None

    def _operator_allows(self, name: str) -> bool:
        patterns = self.cfg.allowed_parameter_patterns
        return patterns is None or name.upper() in FROM_MANAGER or allowed(name, patterns)

    def _parameters(self, params: dict[str, str]) -> dict[str, str]:
        """The parameters that may reach a script; the others are dropped (a request's were
        refused already: this guards what was sealed before, by an older agent)."""
        return {
            name: value
            for name, value in params.items()
            if refusal(name, allow=FROM_MANAGER) is None and self._operator_allows(name)
        }

    def _base_env(self) -> dict[str, str]:
        """A clean environment, not the agent's: a fixed ``PATH``, the operator's home, locale,
        time zone and temporary directory, and what ``script_env_passthrough`` names."""
        env = {"PATH": self.cfg.script_env_path, "HOME": os.environ.get("HOME") or "/"}
        env["LANG"] = os.environ.get("LANG") or "C.UTF-8"
        for name in (*_INHERITED, *self.cfg.passthrough_names):
            if name in os.environ and name.lower() not in _HIDDEN_ENV:
                env[name] = os.environ[name]
        env["directory_backup"] = str(self.cfg.directory_backup)
        env["directory_restore"] = str(self.cfg.directory_restore)
        return env

    def _script_env(
        self, job: JobState, req: BackupRequest | RestoreRequest, **extra: str
    ) -> ScriptEnv:
        sec = req.section
        plain = self._parameters(sec.env())  # the request's, then what the agent sets
        plain.update(self._base_env())
        plain.update(
            JOB_ID=job.id,
            BACKUP_HOST=sec.host,
            BACKUP_USERNAME=sec.username,
            BACKUP_DATABASE=sec.database,
            COMPRESSION=str(req.script_compression).lower(),
            AGENT_TRANSFORM_COMPRESSION=req.agent_compression or "",
            AGENT_TRANSFORM_ENCRYPTION=transforms.ENCRYPTION_NAME if req.agent_encryption else "",
            **extra,
        )
        secrets = {"BACKUP_PASSWORD": sec.password}
        if req.script_key is not None:
            secrets["ENCRYPTION_KEY"] = req.script_key
        if job.skip_storage:  # the script reaches the store itself
            dest_plain, dest_secrets = req.destination.script_env()
            plain.update(dest_plain)
            secrets.update(dest_secrets)
        for name in SECRET_NAMES:  # only ever from the secrets channel
            plain.pop(name, None)
        return ScriptEnv(plain, secrets)

    def _db_args(
        self, req: BackupRequest | RestoreRequest, filename: str, job_id: str
    ) -> list[str]:
        """``host username password database filename job_id compression encryption_key``;
        password and key are placeholders unless ``positional_secrets`` asks for them."""
        sec = req.section
        compat = self.cfg.positional_secrets
        key = req.script_key
        key_arg = NO_KEY if key is None else (key if compat else PLACEHOLDER)
        password = sec.password if compat else PLACEHOLDER
        compression = str(req.script_compression).lower()
        db = sec.database
        return [sec.host, sec.username, password, db, filename, job_id, compression, key_arg]

    async def _stage(
        self, job: JobState, stage: str, args: list[str], env: ScriptEnv
    ) -> StageResult:
        path = find_script(self.cfg.scripts_path, stage)
        if path is None:
            if stage in MANDATORY:
                raise JobFailed(f"mandatory script {stage} not found in {self.cfg.scripts_path}")
            return StageResult(stage=stage, found=False)
        job.state = stage
        self.store.save(job)
        plain = dict(env.plain)
        fd: int | None = None
        if self.cfg.secrets_via == "fd":
            fd = make_secrets_fd(env.secrets)
            plain.update(AGENT_SECRETS_FILE=f"/dev/fd/{fd}", AGENT_SECRETS_FD=str(fd))
        else:
            plain.update(env.secrets)
        try:
            result = await run_script(
                path,
                stage,
                args,
                plain,
                cwd=self.cfg.scripts_path,
                timeout=self.cfg.stage_timeout_seconds,
                log_limit=self.cfg.log_limit_bytes,
                pass_fds=() if fd is None else (fd,),
                on_start=lambda pid: self._script_started(job, pid),
            )
        finally:
            if fd is not None:
                os.close(fd)
        job.script_pid = None
        job.logs[stage] = {"log": result.stdout, "errorlog": result.stderr}
        log.info(
            "stage_finished",
            job_id=job.id,
            stage=stage,
            returncode=result.returncode,
            timed_out=result.timed_out,
            seconds=round(result.seconds, 3),
        )
        self.store.save(job)
        return result

    def _script_started(self, job: JobState, pid: int) -> None:
        job.script_pid = pid
        self.store.save(job)

    async def _must(self, job: JobState, stage: str, args: list[str], env: ScriptEnv) -> None:
        result = await self._stage(job, stage, args, env)
        if not result.ok:
            raise JobFailed(result.failure())

    async def _best_effort(
        self, job: JobState, stage: str, args: list[str], env: ScriptEnv
    ) -> None:
        """A cleanup after a failure: its own failure is logged, the first error is kept."""
        try:
            result = await self._stage(job, stage, args, env)
            if not result.ok:
                log.warning("cleanup_failed", job_id=job.id, stage=stage, reason=result.failure())
        except Exception as exc:
            log.warning("cleanup_failed", job_id=job.id, stage=stage, error=type(exc).__name__)

    async def _unlock(self, job: JobState, env: ScriptEnv, error: str | None) -> str | None:
        """Runs the unlock script; returns the job's error, now including an unlock failure."""
        stage = UNLOCK[job.kind]
        args = [job.database] if job.kind == "backup" else []
        try:
            result = await self._stage(job, stage, args, env)
            failure = None if result.ok else result.failure()
        except Exception as exc:
            failure = f"script {stage} could not run: {type(exc).__name__}: {exc}"
        job.unlock_done = True
        if failure:
            log.error("unlock_failed", job_id=job.id, stage=stage, reason=failure)
            return f"{error}; {failure}" if error else failure
        return error

    def _checkpoint(self, job: JobState) -> None:
        """A stage boundary: a cancelled job starts no further data stage."""
        if job.cancel_requested:
            raise JobCancelled()

    def _cancelled_at_end(self, job: JobState, error: str | None) -> str | None:
        """A cancel that arrived during the last stages still ends the job cancelled (its
        upload is then deleted): an accepted cancel never ends in a success."""
        if job.cancel_requested and not error:
            job.cancelled = True
            return CANCELLED_MESSAGE
        return error

    def _finish(self, job: JobState, error: str | None) -> None:
        job.finish(not error, error or "")
        self.store.save(job)
        self.store.drop_secrets(job.kind, job.id)
        log.info(
            "job_finished",
            job_id=job.id,
            kind=job.kind,
            status=job.status,
            error=job.error_message,
            ms=job.execution_time_ms,
        )

    def _prepare_dir(self, path: Path) -> None:
        if path.exists() and any(path.iterdir()):
            if not self.cfg.allowed_to_delete_files:
                raise JobFailed(
                    f"working directory {path} is not empty (allowed_to_delete_files is false)"
                )
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- backup

    async def _backup(self, job: JobState, req: BackupRequest) -> None:
        sec = req.backup
        work = self.cfg.directory_backup / job.id
        stamp = datetime.now(UTC).strftime("%Y_%m_%d_%H_%M")
        base_name = f"{stamp}_{_UNSAFE.sub('_', sec.host)}_{_UNSAFE.sub('_', sec.database)}"
        env = self._script_env(job, req, BACKUP_FILENAME=base_name, BACKUP_DIRECTORY=str(work))
        error: str | None = None
        prepared = backup_started = cleanup_ran = False
        try:
            try:
                self._checkpoint(job)
                self._prepare_dir(work)
                prepared = True
                await self._must(job, "pre-backup-lock", [sec.database], env)
                job.lock_succeeded = True
                self.store.save(job)
                self._checkpoint(job)
                await self._must(job, "pre-backup-check", [sec.database], env)
                self._checkpoint(job)
                backup_started = True
                await self._must(job, "backup", self._db_args(req, base_name, job.id), env)
                self._checkpoint(job)
                produced = _single_file(work)
                job.filesize = produced.stat().st_size
                job.filename = produced.name
                if not job.skip_storage:
                    await self._upload(job, req, produced)
                self._checkpoint(job)
                cleanup_ran = True
                await self._must(job, "backup-cleanup", [sec.database, job.id], env)
            except JobCancelled as exc:
                job.cancelled = True
                error = str(exc)
                log.info("job_cancelled", job_id=job.id, kind=job.kind, after=job.state)
            except JobFailed as exc:
                error = str(exc)
            except asyncio.CancelledError:
                error = "agent stopped while the job was running"
            except Exception as exc:
                error = safe_error(exc)["error"]
                log.error("job_error", job_id=job.id, **safe_error(exc))
            if backup_started and not cleanup_ran:
                await self._best_effort(job, "backup-cleanup", [sec.database, job.id], env)
            if job.lock_succeeded:
                error = await self._unlock(job, env, error)
            error = self._cancelled_at_end(job, error)
            if prepared and not job.skip_storage:
                shutil.rmtree(work, ignore_errors=True)
            if error and job.stored_key:
                await self._discard_upload(job, req, job.stored_key)
        finally:
            self._finish(job, error)

    async def _upload(self, job: JobState, req: BackupRequest, path: Path) -> None:
        compression = req.agent_compression
        passphrase = req.encryption_key if req.agent_encryption else None
        stored_name = path.name + transforms.stored_suffix(compression, passphrase is not None)
        key = req.destination.filenamePrefix + stored_name
        job.filename = stored_name
        job.state = "upload"
        job.upload_key = key
        job.upload_in_progress = True
        self.store.save(job)
        transfer = transfer_settings(self.cfg, job.filesize)
        store = self._open_store(req.destination, transfer)
        try:
            chunks: AsyncIterator[bytes] = _until_cancelled(job, _file_chunks(path, READ_BLOCK))
            if compression or passphrase:
                chunks = transforms.transform_stream(
                    chunks, lambda: transforms.encoder(compression, passphrase)
                )
            stored = await _upload_locked(store, key, chunks, req.destination)
        except Exception as exc:
            # The storage layer aborted the multipart upload: nothing is left to clean up.
            job.upload_in_progress = False
            self.store.save(job)
            if job.cancel_requested:  # stopped by _until_cancelled, or failing meanwhile
                raise JobCancelled() from None
            raise JobFailed(f"upload of {key} failed: {_storage_error(exc)}") from None
        finally:
            with contextlib.suppress(Exception):
                await store.aclose()
        job.upload_in_progress = False
        job.checksum = stored.checksum
        job.stored_size = stored.size
        job.stored_key = stored.key
        self.store.save(job)
        log.info("uploaded", job_id=job.id, key=key, size=stored.size)

    async def _discard_upload(self, job: JobState, req: BackupRequest, key: str) -> None:
        """A failed job is no restore point: its object (``key``) would be an orphan nobody
        expires."""
        try:
            async with self._open_store(req.destination) as store:
                await store.delete(key)
            job.stored_key = job.checksum = job.stored_size = None
            log.info("failed_backup_object_deleted", job_id=job.id, key=key)
        except Exception as exc:
            log.warning(
                "failed_backup_object_kept", job_id=job.id, key=key, error=_storage_error(exc)
            )

    # ---------------------------------------------------------------- restore

    def _restore_files(
        self, job: JobState, req: RestoreRequest, **extra_env: str
    ) -> tuple[Path, str, Path, str | None, str | None, ScriptEnv]:
        """Where a restore (or a drill) puts the downloaded file, how it is decoded, and the
        scripts' environment: the work directory, the file's name and path once decoded,
        the compression, the passphrase, the environment."""
        work = self.cfg.directory_restore / job.id
        dest = req.destination
        assert dest.filename is not None
        compression = req.agent_compression
        passphrase = req.encryption_key if req.agent_encryption else None
        local_name = _strip_suffixes(dest.filename, compression, passphrase is not None)
        target = work / local_name
        job.filename = dest.filename
        env = self._script_env(
            job,
            req,
            BACKUP_FILENAME=local_name,
            BACKUP_DIRECTORY=str(work),
            RESTORE_FILENAME=local_name,
            RESTORE_DIRECTORY=str(work),
            RESTORE_FILE=str(target),
            **extra_env,
        )
        return work, local_name, target, compression, passphrase, env

    async def _restore(self, job: JobState, req: RestoreRequest) -> None:
        work, local_name, target, compression, passphrase, env = self._restore_files(job, req)
        error: str | None = None
        created = not work.exists()
        restore_started = cleanup_ran = False
        try:
            try:
                self._checkpoint(job)
                work.mkdir(parents=True, exist_ok=True)
                await self._must(job, "pre-restore-lock", [job.id], env)
                job.lock_succeeded = True
                self.store.save(job)
                self._checkpoint(job)
                if not job.skip_storage:
                    if target.exists():
                        if not self.cfg.allowed_to_delete_files:
                            raise JobFailed(
                                f"restore target {target} already exists "
                                "(allowed_to_delete_files is false)"
                            )
                        target.unlink()
                    created = True
                    await self._download(job, req, target, compression, passphrase)
                    self._checkpoint(job)
                restore_started = True
                await self._must(job, "restore", self._db_args(req, local_name, job.id), env)
                self._checkpoint(job)
                cleanup_ran = True
                await self._must(job, "restore-cleanup", [job.id], env)
            except JobCancelled as exc:
                job.cancelled = True
                error = str(exc)
                log.info("job_cancelled", job_id=job.id, kind=job.kind, after=job.state)
            except JobFailed as exc:
                error = str(exc)
            except asyncio.CancelledError:
                error = "agent stopped while the job was running"
            except Exception as exc:
                error = safe_error(exc)["error"]
                log.error("job_error", job_id=job.id, **safe_error(exc))
            if restore_started and not cleanup_ran:
                await self._best_effort(job, "restore-cleanup", [job.id], env)
            if job.lock_succeeded:
                error = await self._unlock(job, env, error)
            error = self._cancelled_at_end(job, error)
            if created and not job.skip_storage:
                shutil.rmtree(work, ignore_errors=True)
        finally:
            self._finish(job, error)

    # ---------------------------------------------------------------- restore drill (ours)

    async def _verify(self, job: JobState, req: RestoreRequest) -> None:
        """A restore drill (``verify``): download the object, decode it (decrypt, decompress)
        and check it against the request's checksum, then hand the file to the optional
        ``verify`` script (e.g. ``pg_restore --list``, or a restore into a scratch database
        the script creates and drops). No lock, restore, cleanup or unlock stage runs: the
        live database is never touched by the agent. Timings are reported in ``timings``."""
        work, local_name, target, compression, passphrase, env = self._restore_files(
            job, req, AGENT_DRILL="true"
        )
        job.verify = True
        job.logs = {VERIFY_STAGE: {"log": "", "errorlog": ""}}
        self.store.save(job)
        error: str | None = None
        created = False
        try:
            try:
                self._checkpoint(job)
                if job.skip_storage:
                    raise JobFailed(
                        "a restore drill needs the agent to download the object itself, but "
                        "skip_storage is set"
                    )
                self._prepare_dir(work)
                created = True
                await self._download(job, req, target, compression, passphrase, job.timings)
                self._checkpoint(job)
                started = time.monotonic()
                result = await self._stage(
                    job, VERIFY_STAGE, self._db_args(req, local_name, job.id), env
                )
                job.timings["verify_seconds"] = round(time.monotonic() - started, 3)
                job.verify_script = result.found
                self.store.save(job)
                if not result.ok:
                    raise JobFailed(result.failure())
            except JobCancelled as exc:
                job.cancelled = True
                error = str(exc)
            except JobFailed as exc:
                error = str(exc)
            except asyncio.CancelledError:
                error = "agent stopped while the job was running"
            except Exception as exc:
                error = safe_error(exc)["error"]
                log.error("job_error", job_id=job.id, **safe_error(exc))
            error = self._cancelled_at_end(job, error)
            if created:
                shutil.rmtree(work, ignore_errors=True)
        finally:
            self._finish(job, error)

    async def _download(
        self,
        job: JobState,
        req: RestoreRequest,
        target: Path,
        compression: str | None,
        passphrase: str | None,
        timings: dict[str, float] | None = None,
    ) -> None:
        dest = req.destination
        key = dest.filenamePrefix + (dest.filename or "")
        job.state = "download"
        self.store.save(job)
        part = target.with_name(f".{target.name}.part")
        expected = req.checksum.removeprefix("sha256:") if req.checksum else None
        store = self._open_store(dest)
        size = 0
        started = time.monotonic()
        decoding = _DecodeTimer()
        try:
            chunks: AsyncIterator[bytes] = store.download(key, expected_sha256=expected)
            if compression or passphrase:
                chunks = transforms.transform_stream(
                    chunks, lambda: decoding.wrap(transforms.decoder(compression, passphrase))
                )
            f = await asyncio.to_thread(open, part, "wb")
            try:
                async for chunk in chunks:
                    self._checkpoint(job)  # the partial file is removed below
                    size += len(chunk)
                    await asyncio.to_thread(f.write, chunk)
            finally:
                await asyncio.to_thread(f.close)
            os.replace(part, target)
        except JobFailed:
            raise
        except transforms.TransformError as exc:
            raise JobFailed(f"cannot decode {key}: {exc}") from None
        except Exception as exc:
            raise JobFailed(f"download of {key} failed: {_storage_error(exc)}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
            with contextlib.suppress(Exception):
                await store.aclose()
        log.info("downloaded", job_id=job.id, key=key, size=size)
        if timings is not None:
            timings["download_seconds"] = round(time.monotonic() - started, 3)
            timings["decrypt_seconds"] = round(decoding.seconds, 3)

    def _open_store(
        self, dest: Destination, transfer: TransferSettings | None = None
    ) -> ObjectStore:
        try:
            return open_store(to_settings(dest, self.cfg), transfer or transfer_settings(self.cfg))
        except ValidationError as exc:
            raise JobFailed(f"invalid destination: {describe_errors(exc)}") from None


class _DecodeTimer:
    """Time spent decoding a download (decrypting, decompressing), summed over the decoder's
    stages; it overlaps the download itself (the stages run in worker threads)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, chain: transforms.Chain) -> transforms.Chain:
        timer = self

        class _Timed:
            def __init__(self, inner: transforms.Stage) -> None:
                self.inner = inner

            def update(self, data: bytes) -> bytes:
                started = time.monotonic()
                try:
                    return self.inner.update(data)
                finally:
                    timer.seconds += time.monotonic() - started

            def finalize(self) -> bytes:
                started = time.monotonic()
                try:
                    return self.inner.finalize()
                finally:
                    timer.seconds += time.monotonic() - started

        return transforms.Chain([_Timed(stage) for stage in chain.stages])


def _storage_error(exc: BaseException) -> str:
    if isinstance(exc, StorageError):
        return f"{exc.code}: {exc}"
    if isinstance(exc, JobFailed | transforms.TransformError):
        return str(exc)
    return type(exc).__name__


def _single_file(work: Path) -> Path:
    """Exactly one regular file: the Go agent uploaded whichever sorted first."""
    entries = list(work.iterdir()) if work.exists() else []
    files = [p for p in entries if p.is_file() and not p.is_symlink()]
    if len(entries) != 1 or len(files) != 1:
        names = ", ".join(sorted(p.name for p in entries)) or "nothing"
        raise JobFailed(
            f"the backup script must leave exactly one regular file in {work}; found "
            f"{len(entries)} entries ({names})"
        )
    return files[0]


def _strip_suffixes(name: str, compression: str | None, encrypted: bool) -> str:
    if encrypted and name.endswith(transforms.ENCRYPTED_SUFFIX):
        name = name[: -len(transforms.ENCRYPTED_SUFFIX)]
    suffix = transforms.SUFFIXES.get(compression or "", "")
    if suffix and name.endswith(suffix):
        name = name[: -len(suffix)]
    return name or "restore"


async def _until_cancelled(job: JobState, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The chunks of an upload, which stops at the next block once the job is cancelled (the
    storage layer then aborts the multipart upload, as after any failure)."""
    async for chunk in chunks:
        if job.cancel_requested:
            raise JobCancelled()
        yield chunk


async def _file_chunks(path: Path, size: int) -> AsyncIterator[bytes]:
    f = await asyncio.to_thread(open, path, "rb")
    try:
        while True:
            block = await asyncio.to_thread(f.read, size)
            if not block:
                return
            yield block
    finally:
        await asyncio.to_thread(f.close)


async def _upload_locked(
    store: ObjectStore, key: str, chunks: AsyncIterator[bytes], dest: Destination
) -> StoredObject:
    """The upload, locked until the date the manager sent (S3 Object Lock) if it sent one."""
    until = dest.retain_until
    if dest.objectLockMode and until is not None:
        from storage.s3 import S3Store  # an S3 destination: its client is installed

        if isinstance(store, S3Store):
            return await store.upload(key, chunks, retain_until=until)
    return await store.upload(key, chunks)
