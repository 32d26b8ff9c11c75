"""Job state, persisted as one JSON file per job so that it survives an agent restart."""

from __future__ import annotations

import contextlib
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, Field

Kind = Literal["backup", "restore"]
RESTART_REASON = "agent restarted while the job was running"
_SEAL_INFO = b"osb-backup-agent job secrets v1"


def now_iso() -> str:
    """The Go agent's timestamp format, in UTC."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00")


class JobState(BaseModel):
    """What ``GET /<kind>/<id>`` answers, plus what a restarted agent needs to finish the job
    (never a secret: the destination's credentials live in a separate file, and only while an
    upload runs)."""

    id: str
    kind: Kind
    status: Literal["RUNNING", "SUCCEEDED", "FAILED"] = "RUNNING"
    message: str = ""
    state: str = "starting"
    error_message: str = ""
    start_time: str = Field(default_factory=now_iso)
    end_time: str = ""
    execution_time_ms: int = 0
    started_epoch: float = Field(default_factory=time.time)
    ended_epoch: float | None = None
    logs: dict[str, dict[str, str]] = Field(default_factory=dict)
    # echoed from the request, as the Go agent does
    type: str = ""
    compression: bool = False
    skip_storage: bool = False
    skipSSL: bool = False
    destination: dict[str, str] = Field(default_factory=dict)
    filenamePrefix: str = ""
    filename: str = ""
    filesize: int = 0
    # (ours)
    checksum: str | None = None
    stored_size: int | None = None
    stored_key: str | None = None
    transform: dict[str, str | None] = Field(default_factory=dict)
    # Recovery bookkeeping: enough to run the unlock script after a crash.
    database: str = ""
    host: str = ""
    username: str = ""
    lock_succeeded: bool = False
    unlock_done: bool = False
    upload_key: str | None = None
    upload_in_progress: bool = False
    script_pid: int | None = None
    # (ours) A cancel the manager asked for (kept across a restart), and whether the job
    # ended because of it: the protocol's states stay the three, a cancelled job is FAILED.
    cancel_requested: bool = False
    cancelled: bool = False
    # (ours) A restore drill (``verify``): its timings, and whether a verify script ran.
    verify: bool = False
    timings: dict[str, float] = Field(default_factory=dict)
    verify_script: bool | None = None

    def finish(self, ok: bool, error: str = "") -> None:
        noun = self.kind
        self.status = "SUCCEEDED" if ok else "FAILED"
        self.message = f"{noun} successfully carried out" if ok else f"{noun} failed"
        if self.cancelled:
            self.message = f"{noun} cancelled"
        self.error_message = error
        self.state = "finished"
        self.end_time = now_iso()
        self.ended_epoch = time.time()
        self.execution_time_ms = int((self.ended_epoch - self.started_epoch) * 1000)

    def public(self) -> dict[str, Any]:
        """The Go agent's polling body (its field names and omissions) plus ours."""
        body: dict[str, Any] = {
            "status": self.status,
            "message": self.message,
            "state": self.state,
        }
        if self.error_message:  # the Go agent omits an empty one
            body["error_message"] = self.error_message
        body.update(
            type=self.type,
            compression=self.compression,
            skip_storage=self.skip_storage,
            skipSSL=self.skipSSL,
        )
        if self.kind == "backup":
            body.update(self.destination)
            body.update(
                filename=self.filename,
                filenamePrefix=self.filenamePrefix,
                filesize={"size": self.filesize, "unit": "byte"},
            )
        body.update(
            start_time=self.start_time,
            end_time=self.end_time,
            execution_time_ms=self.execution_time_ms,
        )
        for stage, out in self.logs.items():
            key = stage.replace("-", "_")
            body[f"{key}_log"] = out.get("log", "")
            body[f"{key}_errorlog"] = out.get("errorlog", "")
        # (ours)
        body["transform"] = self.transform
        body.update(cancel_requested=self.cancel_requested, cancelled=self.cancelled)
        if self.kind == "backup":
            body.update(
                checksum=self.checksum, stored_size=self.stored_size, stored_key=self.stored_key
            )
        else:
            body["filename"] = self.filename
        if self.verify:
            body.update(verify=True, timings=self.timings, verify_script=self.verify_script)
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
    """``<dir>/<kind>-<id>.json`` per job (no secrets), and ``<kind>-<id>.secrets`` while the
    job runs: what a restarted agent needs to unlock the database and delete a half-written
    upload (the database password, the destination), sealed with AES-256-GCM under a key
    derived from the agent's own ``client_password``, which never touches this disk."""

    def __init__(self, directory: Path, sealing_secret: str) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = HKDF(algorithm=SHA256(), length=32, salt=None, info=_SEAL_INFO).derive(
            sealing_secret.encode()
        )
        self._aead = AESGCM(key)

    def _path(self, kind: str, job_id: str, suffix: str = ".json") -> Path:
        return self.dir / f"{kind}-{job_id}{suffix}"

    def save(self, job: JobState) -> None:
        _write_atomic(self._path(job.kind, job.id), job.model_dump_json().encode())

    def remove(self, kind: str, job_id: str) -> None:
        for suffix in (".json", ".secrets"):
            with contextlib.suppress(FileNotFoundError):
                self._path(kind, job_id, suffix).unlink()

    def load_all(self) -> list[JobState]:
        jobs = []
        for path in sorted(self.dir.glob("*.json")):
            if path.name.startswith("."):
                continue
            try:
                jobs.append(JobState.model_validate_json(path.read_bytes()))
            except (OSError, ValueError):
                continue
        return jobs

    def save_secrets(self, kind: str, job_id: str, data: dict[str, Any]) -> None:
        nonce = os.urandom(12)
        aad = f"{kind}-{job_id}".encode()
        sealed = self._aead.encrypt(nonce, json.dumps(data).encode(), aad)
        _write_atomic(self._path(kind, job_id, ".secrets"), nonce + sealed)

    def load_secrets(self, kind: str, job_id: str) -> dict[str, Any] | None:
        """None when absent, or when sealed under another ``client_password``."""
        try:
            raw = self._path(kind, job_id, ".secrets").read_bytes()
            data = self._aead.decrypt(raw[:12], raw[12:], f"{kind}-{job_id}".encode())
            # Authenticated, so written by save_secrets: a JSON object.
            return cast(dict[str, Any], json.loads(data))
        except (OSError, ValueError, InvalidTag):
            return None

    def drop_secrets(self, kind: str, job_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(kind, job_id, ".secrets").unlink()
