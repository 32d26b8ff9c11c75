"""Job state, persisted as one JSON file per job so that it survives an agent restart."""

from __future__ import annotations

import contextlib
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

Kind = Literal["backup", "restore"]
RESTART_REASON = "agent restarted while the job was running"


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class JobState(BaseModel):
    id: str
    kind: Kind
    status: Literal["RUNNING", "SUCCEEDED", "FAILED"] = "RUNNING"
    message: str = ""
    state: str = "starting"
    error_message: str = ""
    start_time: str = Field(default_factory=now_iso)
    end_time: str | None = None
    execution_time_ms: int | None = None
    started_epoch: float = Field(default_factory=time.time)
    ended_epoch: float | None = None
    logs: dict[str, dict[str, str]] = Field(default_factory=dict)
    filenamePrefix: str | None = None
    filename: str | None = None
    filesize: int | None = None
    checksum: str | None = None
    stored_size: int | None = None
    stored_key: str | None = None
    compression: str | None = None
    encryption: str | None = None
    # Recovery bookkeeping (no secrets): enough to run the unlock script after a crash.
    database: str = ""
    host: str = ""
    username: str = ""
    lock_succeeded: bool = False
    unlock_done: bool = False
    upload_key: str | None = None
    upload_in_progress: bool = False
    script_pid: int | None = None

    def finish(self, ok: bool, message: str, error: str = "") -> None:
        self.status = "SUCCEEDED" if ok else "FAILED"
        self.message = message
        self.error_message = error
        self.state = "finished"
        self.end_time = now_iso()
        self.ended_epoch = time.time()
        self.execution_time_ms = int((self.ended_epoch - self.started_epoch) * 1000)

    def public(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "status": self.status,
            "message": self.message,
            "state": self.state,
            "error_message": self.error_message,
            "start_time": self.start_time,
            "end_time": self.end_time,
            "execution_time_ms": self.execution_time_ms,
        }
        if self.kind == "backup":
            body["filenamePrefix"] = self.filenamePrefix
            body["filename"] = self.filename
            body["filesize"] = {"size": self.filesize or 0, "unit": "byte"}
            body["checksum"] = self.checksum
            body["stored_size"] = self.stored_size
            body["stored_key"] = self.stored_key
            body["compression"] = self.compression
            body["encryption"] = self.encryption
        else:
            body["filename"] = self.filename
        for stage, out in self.logs.items():
            key = stage.replace("-", "_")
            body[f"{key}_log"] = out.get("log", "")
            body[f"{key}_errorlog"] = out.get("errorlog", "")
        return body


def _write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class StateStore:
    """``<dir>/<kind>-<id>.json`` per job; ``<kind>-<id>.dest.json`` (0600) only while an
    upload runs, so that a restarted agent can delete a half-written object."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, kind: str, job_id: str, suffix: str = ".json") -> Path:
        return self.dir / f"{kind}-{job_id}{suffix}"

    def save(self, job: JobState) -> None:
        _write_atomic(self._path(job.kind, job.id), job.model_dump_json().encode())

    def remove(self, kind: str, job_id: str) -> None:
        for suffix in (".json", ".dest.json"):
            with contextlib.suppress(FileNotFoundError):
                self._path(kind, job_id, suffix).unlink()

    def load_all(self) -> list[JobState]:
        jobs = []
        for path in sorted(self.dir.glob("*.json")):
            if path.name.endswith(".dest.json") or path.name.startswith("."):
                continue
            try:
                jobs.append(JobState.model_validate_json(path.read_bytes()))
            except (OSError, ValueError):
                continue
        return jobs

    def save_destination(self, kind: str, job_id: str, dest: dict[str, Any]) -> None:
        _write_atomic(self._path(kind, job_id, ".dest.json"), json.dumps(dest).encode())

    def load_destination(self, kind: str, job_id: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._path(kind, job_id, ".dest.json").read_bytes())
        except (OSError, ValueError):
            return None

    def drop_destination(self, kind: str, job_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(kind, job_id, ".dest.json").unlink()
