"""The agent's jobs: script pipelines, uploads and downloads, persistence and recovery."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from pydantic import ValidationError

from agent import transforms
from agent.config import AgentConfig
from agent.destinations import to_settings, transfer_settings
from agent.jobs import RESTART_REASON, JobState, Kind, StateStore
from agent.models import BackupRequest, Destination, RestoreRequest, describe_errors
from agent.scripts import (
    MANDATORY,
    StageResult,
    find_script,
    kill_leftover_group,
    run_script,
)

log = structlog.get_logger("agent")

BACKUP_STAGES = (
    "pre-backup-lock",
    "pre-backup-check",
    "backup",
    "backup-cleanup",
    "post-backup-unlock",
)
RESTORE_STAGES = ("pre-restore-lock", "restore", "restore-cleanup", "post-restore-unlock")
PLACEHOLDER = "-"
READ_BLOCK = 4 * 1024 * 1024
# Variables of the agent's own environment that scripts must never see.
_HIDDEN_ENV = {"client_password", "client_username"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class JobFailed(Exception):
    """A step failed; the message is safe to show and to log."""


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.store = StateStore(cfg.state_dir)
        self.jobs: dict[Kind, dict[str, JobState]] = {"backup": {}, "restore": {}}
        self.tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._sweeper: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        for d in (self.cfg.directory_backup, self.cfg.directory_restore):
            d.mkdir(parents=True, exist_ok=True)
        await self.recover()
        self._sweeper = asyncio.create_task(self._sweep_loop())

    async def stop(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
        tasks = list(self.tasks.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def recover(self) -> None:
        """Jobs of a previous run: finished ones answer again; running ones failed with the
        agent, and the database they locked is unlocked now."""
        for job in self.store.load_all():
            if self._expired(job):
                self.store.remove(job.kind, job.id)
                continue
            if job.status == "RUNNING":
                job.finish(False, f"{job.kind.capitalize()} failed", RESTART_REASON)
                log.warning("job_interrupted", job_id=job.id, kind=job.kind, stage=job.state)
                if job.script_pid and kill_leftover_group(job.script_pid):
                    log.warning("leftover_script_killed", job_id=job.id, pid=job.script_pid)
                job.script_pid = None
                if job.upload_in_progress and job.upload_key:
                    await self._delete_orphan(job)
                if job.lock_succeeded and not job.unlock_done:
                    stage = "post-backup-unlock" if job.kind == "backup" else "post-restore-unlock"
                    args = [job.database] if job.kind == "backup" else []
                    env = self._base_env()
                    env.update(
                        JOB_ID=job.id,
                        BACKUP_HOST=job.host,
                        BACKUP_USERNAME=job.username,
                        BACKUP_DATABASE=job.database,
                    )
                    try:
                        result = await self._stage(job, stage, args, env, save=False)
                        if not result.ok:
                            job.error_message += f"; {result.failure()}"
                    except Exception as exc:
                        job.error_message += f"; {stage} could not run: {type(exc).__name__}"
                    job.unlock_done = True
                job.state = "finished"
                self.store.save(job)
                # What the interrupted job left (a partial dump or download) is useless.
                base = (
                    self.cfg.directory_backup
                    if job.kind == "backup"
                    else self.cfg.directory_restore
                )
                shutil.rmtree(base / job.id, ignore_errors=True)
            self.jobs[job.kind][job.id] = job

    async def _delete_orphan(self, job: JobState) -> None:
        raw = self.store.load_destination(job.kind, job.id)
        if raw is None or job.upload_key is None:
            return
        try:
            from storage import open_store

            dest = Destination.model_validate(raw)
            async with open_store(to_settings(dest, self.cfg), transfer_settings(self.cfg)) as st:
                await st.delete(job.upload_key)
            log.info("orphan_deleted", job_id=job.id, key=job.upload_key)
        except Exception as exc:
            log.warning("orphan_delete_failed", job_id=job.id, error=type(exc).__name__)
        finally:
            self.store.drop_destination(job.kind, job.id)
            job.upload_in_progress = False

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
            for kind in ("backup", "restore"):
                for job_id, job in list(self.jobs[kind].items()):  # type: ignore[index]
                    if self._expired(job):
                        try:
                            self.forget(kind, job_id)  # type: ignore[arg-type]
                        except OSError as exc:
                            log.warning("forget_failed", job_id=job_id, error=str(exc))

    # ---------------------------------------------------------------- API

    def running_count(self) -> int:
        return len(self.tasks)

    def get(self, kind: Kind, job_id: str) -> JobState | None:
        return self.jobs[kind].get(job_id)

    def forget(self, kind: Kind, job_id: str) -> None:
        self.jobs[kind].pop(job_id, None)
        self.store.remove(kind, job_id)

    def submit(self, kind: Kind, req: BackupRequest | RestoreRequest) -> JobState:
        """Registers and starts the job. The caller has checked id and capacity without an
        await in between, so no other request can take the slot or the id meanwhile."""
        sec = req.section
        job = JobState(
            id=req.id,
            kind=kind,
            message=f"{kind.capitalize()} started",
            database=sec.database,
            host=sec.host,
            username=sec.username,
            filenamePrefix=req.destination.filenamePrefix,
            compression=req.agent_compression,
            encryption=transforms.ENCRYPTION_NAME if req.agent_encryption else None,
        )
        for stage in BACKUP_STAGES if kind == "backup" else RESTORE_STAGES:
            job.logs[stage] = {"log": "", "errorlog": ""}
        self.store.save(job)
        self.jobs[kind][job.id] = job
        key = (kind, job.id)
        runner = self._backup(job, req) if kind == "backup" else self._restore(job, req)  # type: ignore[arg-type]
        task = asyncio.create_task(runner)
        self.tasks[key] = task
        task.add_done_callback(lambda _t: self.tasks.pop(key, None))
        log.info("job_started", job_id=job.id, kind=kind, database=sec.database)
        return job

    def skip_storage(self, dest: Destination) -> bool:
        return self.cfg.skip_storage if self.cfg.skip_storage is not None else dest.skipStorage

    # ---------------------------------------------------------------- helpers

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k.lower() not in _HIDDEN_ENV}
        env["directory_backup"] = str(self.cfg.directory_backup)
        env["directory_restore"] = str(self.cfg.directory_restore)
        return env

    def _env(self, job: JobState, req: BackupRequest | RestoreRequest) -> dict[str, str]:
        sec = req.section
        env = self._base_env()
        env.update(sec.env())  # the request extends the agent's environment
        env.update(
            JOB_ID=job.id,
            BACKUP_HOST=sec.host,
            BACKUP_USERNAME=sec.username,
            BACKUP_PASSWORD=sec.password,
            BACKUP_DATABASE=sec.database,
            COMPRESSION="false" if req.agent_compression else str(req.compression).lower(),
            AGENT_TRANSFORM_COMPRESSION=req.agent_compression or "",
            AGENT_TRANSFORM_ENCRYPTION=transforms.ENCRYPTION_NAME if req.agent_encryption else "",
        )
        script_key = req.has_key and not req.agent_encryption
        if script_key:
            env["ENCRYPTION_KEY"] = req.encryption_key
        else:
            env.pop("ENCRYPTION_KEY", None)
        return env

    def _db_args(
        self, req: BackupRequest | RestoreRequest, filename: str, job_id: str
    ) -> list[str]:
        sec = req.section
        secret = self.cfg.positional_secrets
        if req.agent_encryption or not req.has_key:
            key = "none"
        else:
            key = req.encryption_key if secret else PLACEHOLDER
        compression = "false" if req.agent_compression else str(req.compression).lower()
        password = sec.password if secret else PLACEHOLDER
        return [sec.host, sec.username, password, sec.database, filename, job_id, compression, key]

    async def _stage(
        self,
        job: JobState,
        stage: str,
        args: list[str],
        env: dict[str, str],
        *,
        save: bool = True,
    ) -> StageResult:
        path = find_script(self.cfg.scripts_path, stage)
        if path is None:
            if stage in MANDATORY:
                raise JobFailed(f"mandatory script {stage} not found in {self.cfg.scripts_path}")
            return StageResult(stage=stage, found=False)
        job.state = stage
        if save:
            self.store.save(job)
        result = await run_script(
            path,
            stage,
            args,
            env,
            cwd=self.cfg.scripts_path,
            timeout=self.cfg.stage_timeout_seconds,
            log_limit=self.cfg.log_limit_bytes,
            on_start=lambda pid: self._started(job, pid, save),
        )
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
        if save:
            self.store.save(job)
        return result

    async def _unlock(
        self, job: JobState, stage: str, args: list[str], env: dict[str, str], error: str | None
    ) -> str | None:
        """Runs the unlock script; returns the job's error, now including an unlock failure."""
        try:
            result = await self._stage(job, stage, args, env)
            failure = None if result.ok else result.failure()
        except Exception as exc:
            failure = f"script {stage} could not run: {type(exc).__name__}: {exc}"
        job.unlock_done = True
        if failure:
            log.error("unlock_failed", job_id=job.id, stage=stage, reason=failure)
        return error or failure

    def _started(self, job: JobState, pid: int, save: bool) -> None:
        job.script_pid = pid
        if save:
            self.store.save(job)

    async def _must(self, job: JobState, stage: str, args: list[str], env: dict[str, str]) -> None:
        result = await self._stage(job, stage, args, env)
        if not result.ok:
            raise JobFailed(result.failure())

    def _prepare_dir(self, path: Path) -> bool:
        """True once the directory is ours (created or emptied), so it may be removed."""
        if path.exists() and any(path.iterdir()):
            if not self.cfg.allowed_to_delete_files:
                raise JobFailed(
                    f"working directory {path} is not empty (allowed_to_delete_files is false)"
                )
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        return True

    def _open_store(self, dest: Destination) -> Any:
        try:
            from storage import open_store

            return open_store(to_settings(dest, self.cfg), transfer_settings(self.cfg))
        except ValidationError as exc:
            raise JobFailed(f"invalid destination: {describe_errors(exc)}") from None
        except ImportError as exc:
            raise JobFailed(f"storage backend not available: {exc.name}") from None

    def _finish(self, job: JobState, error: str | None) -> None:
        noun = job.kind.capitalize()
        if error:
            job.finish(False, f"{noun} failed", error)
        else:
            job.finish(True, f"{noun} succeeded")
        self.store.save(job)
        log.info(
            "job_finished",
            job_id=job.id,
            kind=job.kind,
            status=job.status,
            error=job.error_message,
            ms=job.execution_time_ms,
        )

    # ---------------------------------------------------------------- backup

    async def _backup(self, job: JobState, req: BackupRequest) -> None:
        cfg = self.cfg
        sec = req.backup
        work = cfg.directory_backup / job.id
        stamp = datetime.now(UTC).strftime("%Y_%m_%d_%H_%M")
        base_name = f"{stamp}_{_UNSAFE.sub('_', sec.host)}_{_UNSAFE.sub('_', sec.database)}"
        env = self._env(job, req)
        env.update(BACKUP_FILENAME=base_name, BACKUP_DIRECTORY=str(work))
        skip = self.skip_storage(req.destination)
        error: str | None = None
        backup_started = cleanup_ran = owned = False
        try:
            try:
                owned = self._prepare_dir(work)
                await self._must(job, "pre-backup-lock", [sec.database], env)
                job.lock_succeeded = True
                self.store.save(job)
                await self._must(job, "pre-backup-check", [sec.database], env)
                backup_started = True
                await self._must(job, "backup", self._db_args(req, base_name, job.id), env)
                produced = _single_file(work)
                job.filesize = produced.stat().st_size
                job.filename = produced.name
                if not skip:
                    await self._upload(job, req, produced)
                cleanup_ran = True
                await self._must(job, "backup-cleanup", [sec.database, job.id], env)
            except JobFailed as exc:
                error = str(exc)
            except asyncio.CancelledError:
                error = "agent stopped while the job was running"
            except ValidationError as exc:
                error = describe_errors(exc)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                log.exception("job_error", job_id=job.id)
            if backup_started and not cleanup_ran:
                with contextlib.suppress(Exception, JobFailed):
                    await self._stage(job, "backup-cleanup", [sec.database, job.id], env)
            if job.lock_succeeded:
                error = await self._unlock(job, "post-backup-unlock", [sec.database], env, error)
            if not skip and owned:
                shutil.rmtree(work, ignore_errors=True)
            if error and job.stored_key and not skip:
                await self._discard_upload(job, req)
        finally:
            self._finish(job, error)

    async def _discard_upload(self, job: JobState, req: BackupRequest) -> None:
        """A failed job is no restore point: its object would be an orphan nobody expires."""
        key = job.stored_key
        try:
            async with self._open_store(req.destination) as store:
                await store.delete(key)
            job.stored_key = None
            log.info("failed_backup_object_deleted", job_id=job.id, key=key)
        except Exception as exc:
            log.warning(
                "failed_backup_object_kept", job_id=job.id, key=key, error=_storage_error(exc)
            )

    async def _upload(self, job: JobState, req: BackupRequest, path: Path) -> None:
        compression = req.agent_compression
        key_phrase = req.encryption_key if req.agent_encryption else None
        stored_name = path.name + transforms.stored_suffix(compression, bool(key_phrase))
        key = (req.destination.filenamePrefix or "") + stored_name
        job.filename = stored_name
        job.state = "upload"
        job.upload_key = key
        job.upload_in_progress = True
        self.store.save_destination(job.kind, job.id, req.destination.model_dump())
        self.store.save(job)
        store = self._open_store(req.destination)
        try:
            chunks: AsyncIterator[bytes] = _file_chunks(path)
            if compression or key_phrase:
                chunks = transforms.transform_stream(
                    chunks, lambda: transforms.encoder(compression, key_phrase)
                )
            stored = await store.upload(key, chunks)
        except Exception as exc:
            # The storage layer aborted the multipart upload: nothing is left to clean up.
            job.upload_in_progress = False
            self.store.drop_destination(job.kind, job.id)
            raise JobFailed(f"upload of {key} failed: {_storage_error(exc)}") from None
        finally:
            with contextlib.suppress(Exception):
                await store.aclose()
        job.upload_in_progress = False
        job.checksum = f"sha256:{stored.sha256}"
        job.stored_size = stored.size
        job.stored_key = stored.key
        self.store.drop_destination(job.kind, job.id)
        self.store.save(job)
        log.info("uploaded", job_id=job.id, key=key, size=stored.size)

    # ---------------------------------------------------------------- restore

    async def _restore(self, job: JobState, req: RestoreRequest) -> None:
        cfg = self.cfg
        work = cfg.directory_restore / job.id
        dest = req.destination
        assert dest.filename is not None
        compression = req.agent_compression
        key_phrase = req.encryption_key if req.agent_encryption else None
        local_name = _strip_suffixes(dest.filename, compression, bool(key_phrase))
        target = work / local_name
        job.filename = dest.filename
        env = self._env(job, req)
        env.update(
            BACKUP_FILENAME=local_name,
            RESTORE_FILENAME=local_name,
            RESTORE_DIRECTORY=str(work),
            RESTORE_FILE=str(target),
            BACKUP_DIRECTORY=str(work),
        )
        skip = self.skip_storage(dest)
        error: str | None = None
        owned = not work.exists()
        try:
            try:
                work.mkdir(parents=True, exist_ok=True)
                await self._must(job, "pre-restore-lock", [job.id], env)
                job.lock_succeeded = True
                self.store.save(job)
                if not skip:
                    if target.exists():
                        if not cfg.allowed_to_delete_files:
                            raise JobFailed(
                                f"restore target {target} already exists "
                                "(allowed_to_delete_files is false)"
                            )
                        target.unlink()
                    owned = True
                    await self._download(job, req, target, compression, key_phrase)
                await self._must(job, "restore", self._db_args(req, local_name, job.id), env)
                await self._must(job, "restore-cleanup", [job.id], env)
            except JobFailed as exc:
                error = str(exc)
            except asyncio.CancelledError:
                error = "agent stopped while the job was running"
            except ValidationError as exc:
                error = describe_errors(exc)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                log.exception("job_error", job_id=job.id)
            if job.lock_succeeded:
                error = await self._unlock(job, "post-restore-unlock", [], env, error)
            if not skip and owned:
                shutil.rmtree(work, ignore_errors=True)
        finally:
            self._finish(job, error)

    async def _download(
        self,
        job: JobState,
        req: RestoreRequest,
        target: Path,
        compression: str | None,
        key_phrase: str | None,
    ) -> None:
        dest = req.destination
        key = (dest.filenamePrefix or "") + (dest.filename or "")
        job.state = "download"
        self.store.save(job)
        part = target.with_name(f".{target.name}.part")
        store = self._open_store(dest)
        size = 0
        try:
            chunks: AsyncIterator[bytes] = store.download(key)
            if compression or key_phrase:
                chunks = transforms.transform_stream(
                    chunks, lambda: transforms.decoder(compression, key_phrase)
                )
            f = await asyncio.to_thread(open, part, "wb")
            try:
                async for chunk in chunks:
                    size += len(chunk)
                    await asyncio.to_thread(f.write, chunk)
            finally:
                await asyncio.to_thread(f.close)
            os.replace(part, target)
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


def _storage_error(exc: BaseException) -> str:
    from storage import StorageError

    if isinstance(exc, StorageError):
        return f"{exc.code}: {exc}"
    if isinstance(exc, JobFailed | transforms.TransformError):
        return str(exc)
    return type(exc).__name__


def _single_file(work: Path) -> Path:
    entries = list(work.iterdir()) if work.exists() else []
    files = [p for p in entries if p.is_file() and not p.is_symlink()]
    if len(entries) != 1 or len(files) != 1:
        names = ", ".join(sorted(p.name for p in entries)) or "nothing"
        raise JobFailed(
            f"the backup script must leave exactly one file in {work}; found {len(entries)}"
            f" entries ({names})"
        )
    return files[0]


def _strip_suffixes(name: str, compression: str | None, encrypted: bool) -> str:
    if encrypted and name.endswith(transforms.ENCRYPTED_SUFFIX):
        name = name[: -len(transforms.ENCRYPTED_SUFFIX)]
    suffix = transforms.SUFFIXES.get(compression or "", "")
    if suffix and name.endswith(suffix):
        name = name[: -len(suffix)]
    return name or "restore"


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    f = await asyncio.to_thread(open, path, "rb")
    try:
        while True:
            block = await asyncio.to_thread(f.read, READ_BLOCK)
            if not block:
                return
            yield block
    finally:
        await asyncio.to_thread(f.close)
