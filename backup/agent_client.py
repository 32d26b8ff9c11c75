"""The manager's side of the agent protocol (docs/agent-protocol.md), for both agent kinds:
the Go ``osb-backup-agent`` and ours (``agent/``), told apart by ``GET /status``.

Requests are built, and job states read, with the protocol's models in ``agent/models.py``,
the ones the agent validates with: a pure module of pydantic models (see its docstring), so
the domain takes on none of the agent's machinery by importing it.

This module only speaks HTTP and builds request bodies; *what* to run and *when* is the job
runner's (``backup.runner``, each job driven by ``backup.job_run``). Secrets (agent password,
database password, encryption key, destination keys) live in request bodies and in the Basic
header only: no exception message, log line or repr here ever contains them, and the agent URL
is shown without user info.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from pydantic import BaseModel, SecretStr, ValidationError

from agent.models import (
    CANCEL_CAPABILITY,
    NO_KEY,
    BackupRequest,
    DatabaseSection,
    Destination,
    JobStatus,
    RestoreRequest,
    Transform,
    describe_errors,
)
from agent.models import VERIFY_CAPABILITY as VERIFY_CAPABILITY
from backup import jobs
from backup.registration import parameter_refusal
from storage import egress
from storage.base import EgressDenied
from storage.settings import S3Settings, SwiftSettings

_M = TypeVar("_M", bound=BaseModel)


class AgentKind(StrEnum):
    """Which agent answers at an instance's address, told apart by ``GET /status``."""

    OURS = "ours"  # agent/ (lists its capabilities)
    GO = "go"  # the Go osb-backup-agent


class AgentJobKind(StrEnum):
    """An agent job's kind, also the path of its endpoints (``/backup``, ``/restore``)."""

    BACKUP = "backup"
    RESTORE = "restore"


class AgentFailure(StrEnum):
    """Why an exchange with an agent failed (:attr:`AgentError.reason`): stable words, also
    the label of the metric counting them."""

    UNREACHABLE = "unreachable"
    UNAUTHORIZED = "unauthorized"
    REJECTED = "rejected"
    BUSY = "busy"
    NOT_FOUND = "not_found"
    BAD_RESPONSE = "bad_response"
    EGRESS_DENIED = "egress_denied"


# The stream format our agent names in /status and in job states.
ENCRYPTION_CAPABILITY = "encryption:aes-256-gcm-stream-v1"
ENCRYPTION_NAME = "aes-256-gcm-stream-v1"
COMPRESSION_PREFERENCE = ("zstd", "gzip")
# What a restore point records when the *scripts* compressed or encrypted (old contract).
BY_SCRIPT = "script"


class AgentError(Exception):
    """A failed exchange with an agent, ``reason`` saying why; the message is a sentence
    safe to store in a job and to log."""

    def __init__(self, reason: AgentFailure, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = status

    @property
    def transient(self) -> bool:
        """Worth retrying (within the runner's bounds) rather than failing at once."""
        return self.reason in (AgentFailure.UNREACHABLE, AgentFailure.BUSY) or (
            self.reason == AgentFailure.BAD_RESPONSE and (self.status or 0) >= 500
        )


@dataclass(frozen=True)
class AgentInfo:
    kind: AgentKind
    version: str | None
    capabilities: frozenset[str]

    def compression(self) -> str | None:
        """The stream compression our agent can do itself, preferred first."""
        for name in COMPRESSION_PREFERENCE:
            if f"compression:{name}" in self.capabilities:
                return name
        return None

    @property
    def encrypts(self) -> bool:
        return ENCRYPTION_CAPABILITY in self.capabilities

    @property
    def cancels(self) -> bool:
        """Our agent can stop a running job at its next stage boundary (the Go agent cannot:
        its jobs run to their end)."""
        return CANCEL_CAPABILITY in self.capabilities

    @property
    def verifies(self) -> bool:
        """Our agent runs restore drills (``verify``): download, decode, checksum and the
        DBA's optional verify script, never the restore stages."""
        return VERIFY_CAPABILITY in self.capabilities


@dataclass
class AgentJob:
    """An agent's answer to ``GET /backup/{id}`` or ``GET /restore/{id}``, both kinds."""

    status: str  # RUNNING, SUCCEEDED or FAILED (as a job's, ``backup.jobs.JobStatus``)
    state: str | None = None
    message: str | None = None
    error_message: str | None = None
    filename: str | None = None
    filename_prefix: str | None = None
    size: int | None = None
    stored_size: int | None = None
    stored_key: str | None = None
    checksum: str | None = None
    compression: str | None = None
    encryption: str | None = None
    cancelled: bool = False  # (ours) ended because the manager cancelled it
    logs: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] | None = None  # (ours) a restore drill's
    verify_script: bool | None = None  # (ours) whether a drill ran a verify script

    @property
    def finished(self) -> bool:
        return self.status in (jobs.JobStatus.SUCCEEDED, jobs.JobStatus.FAILED)

    @classmethod
    def parse(cls, body: Any, *, log_limit: int) -> AgentJob:
        if not isinstance(body, dict):
            raise AgentError(
                AgentFailure.BAD_RESPONSE, "the agent answered a job state that is not an object"
            )
        state = JobStatus.model_validate(body)
        return cls(
            status=state.status,
            state=state.state,
            message=state.message,
            error_message=state.error_message,
            filename=state.filename,
            filename_prefix=state.filenamePrefix,
            size=state.size,
            stored_size=state.stored_size,
            stored_key=state.stored_key,
            checksum=state.checksum,
            compression=state.stream_compression,
            encryption=state.stream_encryption,
            cancelled=state.cancelled is True,
            logs={k: tail(v, log_limit) for k, v in state.logs().items()},
            timings=state.timings,
            verify_script=state.verify_script,
        )


def tail(text: str, limit: int) -> str:
    """The last ``limit`` bytes of a log (UTF-8 safe), saying how much was cut."""
    raw = text.encode()
    if len(raw) <= limit:
        return text
    kept = raw[-limit:].decode(errors="ignore")
    return f"[... {len(raw) - limit} earlier bytes cut ...]\n{kept}"


def safe_url(url: str) -> str:
    """The URL without user info, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _message(body: Any) -> str:
    if isinstance(body, dict):
        for key in ("error_message", "message"):
            text = body.get(key)
            if isinstance(text, str) and text:
                return text[:500]
    return ""


def agent_session(**connector: Any) -> aiohttp.ClientSession:
    """An HTTP session for agents that connects only where the egress policy in force allows
    (a refusal is :class:`AgentError` ``egress_denied``); ``connector``: TCPConnector limits."""
    guard = egress.connector_args(egress.installed())
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(**connector, **guard))


class AgentClient:
    """One agent, reached with HTTP Basic credentials. Share ``session`` across clients."""

    def __init__(
        self,
        url: str,
        username: str,
        password: SecretStr,
        *,
        session: aiohttp.ClientSession,
        timeout: float = 30.0,
        log_limit: int = 16 * 1024,
    ) -> None:
        self.url = url.rstrip("/")
        self.where = safe_url(self.url)
        self._auth_header = aiohttp.encode_basic_auth(username, password.get_secret_value())
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 10.0))
        self.log_limit = log_limit

    def __repr__(self) -> str:
        return f"AgentClient({self.where!r})"

    async def _call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body)
        headers = {"Authorization": self._auth_header}
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self._session.request(
                method,
                self.url + path,
                data=data,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except TimeoutError:
            raise AgentError(
                AgentFailure.UNREACHABLE, f"the agent at {self.where} did not answer in time"
            ) from None
        except EgressDenied as exc:  # the session's connector refused the address
            raise AgentError(AgentFailure.EGRESS_DENIED, exc.message) from None
        except aiohttp.ClientError as exc:
            # The exception text may quote the URL; name only its class.
            raise AgentError(
                AgentFailure.UNREACHABLE,
                f"the agent at {self.where} cannot be reached ({type(exc).__name__})",
            ) from None
        parsed: Any = None
        if raw:
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None
        if status == 401:
            raise AgentError(
                AgentFailure.UNAUTHORIZED,
                f"the agent at {self.where} refused the registered credentials (401)",
                status=status,
            )
        return status, parsed

    async def status(self) -> AgentInfo:
        code, body = await self._call("GET", "/status")
        if code != 200:
            raise AgentError(
                AgentFailure.BAD_RESPONSE if code >= 500 else AgentFailure.REJECTED,
                f"the agent at {self.where} answered {code} to GET /status",
                status=code,
            )
        caps = body.get("capabilities") if isinstance(body, dict) else None
        if isinstance(caps, list):
            version = body.get("version")
            return AgentInfo(
                AgentKind.OURS,
                version if isinstance(version, str) else None,
                frozenset(c for c in caps if isinstance(c, str)),
            )
        return AgentInfo(AgentKind.GO, None, frozenset())

    async def start(self, kind: AgentJobKind, request: dict[str, Any]) -> AgentJob | None:
        """Start a job; ``None`` when it was started now, its state when the id already
        exists on the agent (409: resumed, not started twice)."""
        method, path = ("POST", "/backup") if kind == AgentJobKind.BACKUP else ("PUT", "/restore")
        code, body = await self._call(method, path, request)
        if code in (200, 201, 202):
            return None
        if code == 409:
            if isinstance(body, dict) and body.get("status"):
                return AgentJob.parse(body, log_limit=self.log_limit)
            return AgentJob(status=jobs.JobStatus.RUNNING)
        if code == 429:
            raise AgentError(
                AgentFailure.BUSY,
                f"the agent at {self.where} runs too many jobs (429)",
                status=code,
            )
        detail = _message(body)
        if 400 <= code < 500:
            raise AgentError(
                AgentFailure.REJECTED,
                f"the agent refused the {kind} request ({code}"
                + (f": {detail})" if detail else ")"),
                status=code,
            )
        raise AgentError(
            AgentFailure.BAD_RESPONSE,
            f"the agent at {self.where} answered {code} to {method} {path}",
            status=code,
        )

    async def get(self, kind: AgentJobKind, job_id: str) -> AgentJob:
        code, body = await self._call("GET", f"/{kind}/{job_id}")
        if code == 200:
            return AgentJob.parse(body, log_limit=self.log_limit)
        if code == 404:
            raise AgentError(
                AgentFailure.NOT_FOUND,
                f"the agent no longer knows {kind} job {job_id} (was it restarted?)",
                status=code,
            )
        raise AgentError(
            AgentFailure.BAD_RESPONSE if code >= 500 else AgentFailure.REJECTED,
            f"the agent at {self.where} answered {code} to GET /{kind}/{job_id}",
            status=code,
        )

    async def cancel(self, kind: AgentJobKind, job_id: str) -> AgentJob:
        """Ask our agent to stop a running job at its next stage boundary (only for an agent
        whose ``/status`` lists ``cancel``). Returns the job's state: still ``RUNNING`` while
        it finishes its stage, cleanup and unlock; already final when it ended before the
        cancel arrived (then possibly not cancelled)."""
        path = f"/{kind}/{job_id}/cancel"
        code, body = await self._call("POST", path)
        if code in (200, 202):
            return AgentJob.parse(body, log_limit=self.log_limit)
        if code == 409 and isinstance(body, dict) and isinstance(body.get("job"), dict):
            return AgentJob.parse(body["job"], log_limit=self.log_limit)
        if code == 404:
            raise AgentError(
                AgentFailure.NOT_FOUND,
                f"the agent no longer knows {kind} job {job_id}",
                status=code,
            )
        raise AgentError(
            AgentFailure.BAD_RESPONSE if code >= 500 else AgentFailure.REJECTED,
            f"the agent at {self.where} answered {code} to POST {path}",
            status=code,
        )

    async def forget(self, kind: AgentJobKind, job_id: str) -> bool:
        """Ask the agent to forget a finished job (``DELETE``); False if it still runs."""
        code, _ = await self._call("DELETE", f"/{kind}", {"id": job_id})
        return code in (200, 410)


# --------------------------------------------------------------------- request bodies


def _wire(model: BaseModel) -> dict[str, Any]:
    """A model as sent: the fields that were set, under the protocol's names."""
    return model.model_dump(mode="json", exclude_unset=True)


def _built(what: str, build: Callable[[], _M]) -> _M:
    """A model built from the manager's (already validated) data. A refusal is not expected;
    it is an AgentError that names the fields, never pydantic's text, which quotes the
    input (passwords, keys)."""
    try:
        return build()
    except ValidationError as exc:
        raise AgentError(
            AgentFailure.REJECTED, f"the {what} cannot be built: {describe_errors(exc)}"
        ) from None


def destination(
    settings: S3Settings | SwiftSettings,
    *,
    filename_prefix: str,
    filename: str | None = None,
    lock_until: datetime | None = None,
) -> dict[str, Any]:
    """The protocol's ``destination`` object (:class:`agent.models.Destination`) for a
    destination's opened settings.

    ``filename_prefix`` is the object-name prefix within the bucket/container (the
    destination's own prefix already included) and ends with ``/``. It carries the
    credentials: never log it.
    """
    extra: dict[str, Any] = {} if filename is None else {"filename": filename}
    if isinstance(settings, S3Settings):
        if settings.object_lock is not None and lock_until is not None:
            # An upload locked until then (S3 Object Lock): our agent only (see job_request).
            extra["objectLockMode"] = settings.object_lock.mode
            extra["objectLockRetainUntil"] = lock_until.isoformat()
        endpoint = settings.endpoint
        if endpoint:
            extra["endpoint"] = endpoint
        model = _built(
            "destination",
            lambda: Destination(
                type="S3",
                bucket=settings.bucket,
                region=settings.region or "",
                authKey=settings.access_key_id,
                authSecret=settings.secret_access_key.get_secret_value(),
                skipSSL=bool(endpoint) and str(endpoint).startswith("http://"),
                skipStorage=False,
                filenamePrefix=filename_prefix,
                **extra,
            ),
        )
    else:
        # Keystone's application credential and endpoint choice: sent only when used (the Go
        # agent knows none of them).
        secret = settings.application_credential_secret
        if secret is not None:
            extra["applicationCredentialSecret"] = secret.get_secret_value()
        if settings.application_credential_id:
            extra["applicationCredentialId"] = settings.application_credential_id
        if settings.application_credential_name:
            extra["applicationCredentialName"] = settings.application_credential_name
        if settings.region_name:
            extra["regionName"] = settings.region_name
        if settings.interface != "public":
            extra["interface"] = settings.interface
        model = _built(
            "destination",
            lambda: Destination(
                type="SWIFT",
                authUrl=settings.auth_url,
                domain=settings.user_domain_name or settings.project_domain_name or "Default",
                container_name=settings.container,
                project_name=settings.project_name or "",
                username=settings.username,
                password=settings.password.get_secret_value(),
                skipStorage=False,
                filenamePrefix=filename_prefix,
                **extra,
            ),
        )
    return _wire(model)


def database_section(
    *,
    host: str,
    username: str,
    password: str,
    database: str,
    port: int | None,
    parameters: Any,
) -> dict[str, Any]:
    """The ``backup``/``restore`` section (:class:`agent.models.DatabaseSection`).
    ``parameters`` (a mapping or the protocol's list of single-key objects) become
    environment variables of the scripts; the instance's port is exported as
    ``BACKUP_PORT``. A name a tenant may not set (stored before it was refused) is never
    sent: a Go agent would hand it to its scripts unchecked."""
    params: list[dict[str, Any]] = []
    if isinstance(parameters, dict):
        params = [{str(k): v} for k, v in parameters.items()]
    elif isinstance(parameters, list):
        params = [dict(p) for p in parameters if isinstance(p, dict) and len(p) == 1]
    params = [p for p in params if parameter_refusal(next(iter(p))) is None]
    if port is not None:
        params.append({"BACKUP_PORT": str(port)})
    section = _built(
        "database section",
        lambda: DatabaseSection(
            host=host, username=username, password=password, database=database, parameters=params
        ),
    )
    return _wire(section)


def backup_modes(info: AgentInfo, compress: bool, encrypt: bool) -> tuple[str | None, str | None]:
    """How a backup will be compressed and encrypted on this agent: by our agent itself
    (a format name) when ``/status`` lists the capability, else by the scripts (``script``,
    the old contract), or not at all (``None``)."""
    compression = (info.compression() or BY_SCRIPT) if compress else None
    encryption = (ENCRYPTION_NAME if info.encrypts else BY_SCRIPT) if encrypt else None
    return compression, encryption


def missing_capabilities(
    info: AgentInfo, compression: str | None, encryption: str | None
) -> list[str]:
    """What this agent lacks to reverse a restore point's transforms (empty: nothing)."""
    missing = []
    wanted = f"compression:{compression}"
    if compression not in (None, BY_SCRIPT) and wanted not in info.capabilities:
        missing.append(f"compression:{compression}")
    if encryption not in (None, BY_SCRIPT) and encryption != ENCRYPTION_NAME:
        missing.append(f"encryption:{encryption}")
    elif encryption == ENCRYPTION_NAME and not info.encrypts:
        missing.append(ENCRYPTION_CAPABILITY)
    return missing


CHECKSUM_CAPABILITY = "checksum:sha256"


# What a Swift destination may carry that the Go agent does not know: it would authenticate with
# an empty password, or write to the catalog's default endpoint instead of the one chosen.
_GO_UNKNOWN_SWIFT = {
    "applicationCredentialId": "an application credential",
    "applicationCredentialName": "an application credential",
    "applicationCredentialSecret": "an application credential",
    "regionName": "a region (region_name)",
    "interface": "the internal interface",
}


OBJECT_LOCK_CAPABILITY = "object-lock"


def _check_object_lock(info: AgentInfo, destination: dict[str, Any]) -> None:
    """A backup to a destination that requires object lock needs an agent that sets it: an
    upload without the lock would be a backup any credential could delete."""
    if "objectLockMode" not in destination or OBJECT_LOCK_CAPABILITY in info.capabilities:
        return
    who = "the Go agent" if info.kind == AgentKind.GO else "this agent (an older version)"
    raise AgentError(
        AgentFailure.REJECTED,
        f"{who} cannot write objects with S3 Object Lock, which this destination requires "
        "(object_lock): its backups would not be locked. Serve the instance with our agent "
        f"(capability {OBJECT_LOCK_CAPABILITY!r}), or use a destination without object_lock",
    )


def _check_go_destination(destination: dict[str, Any]) -> None:
    unknown = sorted({what for key, what in _GO_UNKNOWN_SWIFT.items() if key in destination})
    if unknown:
        raise AgentError(
            AgentFailure.REJECTED,
            f"the Go agent cannot use a Swift destination with {' or '.join(unknown)}: it "
            "authenticates with a user's password and uses the catalog's default endpoint. "
            "Give the destination a user name and password and no region or interface, or "
            "serve the instance with our agent",
        )


def job_request(
    kind: AgentJobKind,
    *,
    agent_job_id: str,
    info: AgentInfo,
    compression: str | None,
    encryption: str | None,
    encryption_key: str | None,
    destination: dict[str, Any],
    section: dict[str, Any],
    checksum: str | None = None,
) -> dict[str, Any]:
    """A backup or restore request for either agent kind.

    ``compression`` and ``encryption`` are modes (see :func:`backup_modes`; for a restore,
    what the restore point item records): a stream format our agent applies itself through
    ``transform``, ``script`` for the old contract (the ``compression`` flag and the
    ``encryption_key`` handed to the scripts), or ``None``. Without a key the request says
    ``"none"``: the Go agent rejects an empty one. ``checksum`` (restores: the stored
    object's ``sha256:<hex>``) is sent to an agent that lists ``checksum:sha256``, which
    verifies the download against it before the restore script runs.
    """
    _check_object_lock(info, destination)
    if info.kind == AgentKind.GO:
        _check_go_destination(destination)
    done_by_agent: dict[str, Any] = {}  # what our agent does itself (transform)
    if compression not in (None, BY_SCRIPT):
        done_by_agent["compression"] = compression
    if encryption == ENCRYPTION_NAME:
        done_by_agent["encryption"] = True
    verify = kind == AgentJobKind.RESTORE and checksum and CHECKSUM_CAPABILITY in info.capabilities

    def build() -> BackupRequest | RestoreRequest:
        fields: dict[str, Any] = {
            "id": agent_job_id,
            "compression": compression is not None,
            "encryption_key": encryption_key if encryption and encryption_key else NO_KEY,
            "destination": Destination.model_validate(destination),
        }
        if info.kind == AgentKind.OURS and done_by_agent:
            fields["transform"] = Transform(**done_by_agent)
        db = DatabaseSection.model_validate(section)
        if kind == AgentJobKind.BACKUP:
            return BackupRequest(**fields, backup=db)
        if verify:
            fields["checksum"] = checksum
        return RestoreRequest(**fields, restore=db)

    request = _built(f"{kind} request", build)
    return _wire(request)
