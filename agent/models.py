"""The agent protocol's messages (docs/agent-protocol.md), modelled once for both sides; field
names exactly as the Go agent's.

The agent validates the requests it receives with these models; the manager
(``backup/agent_client.py``) builds its requests with the same models and reads the agents'
job states with :class:`JobStatus`. They stay here, beside the agent, rather than in a third
package: this is a pure module (pydantic, the standard library and ``agent.environment``,
itself pure), so the manager importing it takes on none of the agent's machinery (no
aiohttp app, no storage, no scripts), and the dependency stays one module of models. The
names a script parameter may not have are ``agent.environment``'s, which both sides check.
"""

from __future__ import annotations

import re
import traceback
from datetime import datetime
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)

from agent.environment import FROM_MANAGER, describe, refusal

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_SHA256 = re.compile(r"^sha256:[0-9a-f]{64}$")
NO_KEY = "none"
# (ours) ``POST /backup/{id}/cancel`` and ``POST /restore/{id}/cancel``: the running job stops
# at its next stage boundary and ends FAILED with ``cancelled: true`` and this error_message.
CANCEL_CAPABILITY = "cancel"
CANCELLED_MESSAGE = "cancelled by the manager"
# (ours) ``PUT /restore`` with ``verify: true``: a restore drill (download, decode, check the
# checksum, run the optional ``verify`` script), never the restore stages.
VERIFY_CAPABILITY = "verify"
VERIFY_STAGE = "verify"


def check_name(value: str, what: str) -> str:
    """A single path component that cannot escape its directory."""
    if (
        not value
        or "/" in value
        or "\\" in value
        or "\x00" in value
        or value in (".", "..")
        or len(value) > 255
    ):
        raise ValueError(f"{what} must be a plain file name (no '/', '..' or NUL)")
    return value


def check_prefix(value: str) -> str:
    if "\x00" in value or "\\" in value or value.startswith("/"):
        raise ValueError("filenamePrefix must be relative and must not contain NUL or '\\'")
    if any(part in (".", "..") for part in value.split("/")):
        raise ValueError("filenamePrefix must not contain '.' or '..' segments")
    if len(value) > 512:
        raise ValueError("filenamePrefix is too long")
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Destination(_Model):
    type: Literal["S3", "SWIFT"]
    skipStorage: bool = False
    filenamePrefix: str = ""
    filename: str | None = None
    # S3
    bucket: str = ""
    region: str = ""
    endpoint: str = ""
    authKey: str = ""
    authSecret: str = Field(default="", repr=False)
    skipSSL: bool = False
    # Swift
    authUrl: str = ""
    domain: str = ""
    container_name: str = ""
    project_name: str = ""
    username: str = ""
    password: str = Field(default="", repr=False)
    # Swift through Keystone v3 (our agent; the Go agent ignores them): an application
    # credential instead of username and password, and the catalog endpoint to choose.
    applicationCredentialId: str = ""
    applicationCredentialName: str = ""
    applicationCredentialSecret: str = Field(default="", repr=False)
    regionName: str = ""
    interface: Literal["public", "internal"] = "public"
    # S3 Object Lock (our agent, capability "object-lock"; the Go agent cannot set it, so the
    # manager never sends it one): the upload is written locked in this mode until that date.
    # (An RFC 3339 string, kept as text: the job's request is persisted as JSON.)
    objectLockMode: Literal["", "GOVERNANCE", "COMPLIANCE"] = ""
    objectLockRetainUntil: str = Field(default="", max_length=64)

    @field_validator("objectLockRetainUntil")
    @classmethod
    def _retain_until(cls, v: str) -> str:
        if v:
            try:
                TypeAdapter(AwareDatetime).validate_python(v)
            except ValidationError:
                raise ValueError("must be an RFC 3339 date and time with its offset") from None
        return v

    @property
    def retain_until(self) -> datetime | None:
        """``objectLockRetainUntil`` as a date (None: not sent)."""
        if not self.objectLockRetainUntil:
            return None
        return TypeAdapter(AwareDatetime).validate_python(self.objectLockRetainUntil)

    @field_validator("type", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @field_validator("filenamePrefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        return check_prefix(v)

    @field_validator("filename")
    @classmethod
    def _filename(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v, "filename")

    def missing_for_storage(self) -> list[str]:
        """Fields the agent needs to reach the store itself (not with skipStorage)."""
        if self.type == "S3":
            need = ["bucket", "authKey", "authSecret", "filenamePrefix"]
        elif self.applicationCredentialSecret:
            need = ["authUrl", "container_name"]
            if not self.applicationCredentialId:
                need += ["applicationCredentialName", "username"]
        else:
            need = ["authUrl", "container_name", "username", "password"]
        missing = [f"destination.{n}" for n in need if not getattr(self, n)]
        if self.type == "S3" and self.filenamePrefix and not self.filenamePrefix.endswith("/"):
            missing.append("destination.filenamePrefix (must end with '/')")
        return missing

    def script_env(self) -> tuple[dict[str, str], dict[str, str]]:
        """With skipStorage the script reaches the store itself: the Go agent's variable names
        (``S3_*``, ``SWIFT_*``), endpoint and region *not* swapped. Returns (plain, secret)."""
        if self.type == "S3":
            plain = {
                "S3_BUCKET": self.bucket,
                "S3_ENDPOINT": self.endpoint,
                "S3_REGION": self.region,
                "S3_AUTHKEY": self.authKey,
                "S3_SKIPSSL": str(self.skipSSL).lower(),
                "S3_FILENAMEPREFIX": self.filenamePrefix,
            }
            return plain, {"S3_AUTHSECRET": self.authSecret}
        plain = {
            "SWIFT_AUTHURL": self.authUrl,
            "SWIFT_DOMAIN": self.domain,
            "SWIFT_CONTAINERNAME": self.container_name,
            "SWIFT_PROJECTNAME": self.project_name,
            "SWIFT_USERNAME": self.username,
        }
        return plain, {"SWIFT_PASSWORD": self.password}

    def public(self) -> dict[str, Any]:
        """The destination fields the Go agent echoes in its job state (no secrets); empty
        ones are left out, as its ``omitempty`` does."""
        fields = {
            "region": self.region,
            "endpoint": self.endpoint,
            "bucket": self.bucket,
            "authUrl": self.authUrl,
            "domain": self.domain,
            "container_name": self.container_name,
            "project_name": self.project_name,
        }
        return {k: v for k, v in fields.items() if v}


Scalar = str | int | float | bool | None


class DatabaseSection(_Model):
    host: str = Field(min_length=1)
    # The Go agent's README shows "user"; its code reads "username". Both are accepted.
    username: str = Field(validation_alias=AliasChoices("username", "user"))
    password: str = Field(repr=False)
    database: str = Field(min_length=1)
    parameters: list[dict[str, Scalar]] = Field(default_factory=list)

    @field_validator("parameters")
    @classmethod
    def _params(cls, v: list[dict[str, Scalar]]) -> list[dict[str, Scalar]]:
        for item in v:
            if len(item) != 1:
                raise ValueError("each parameter must be an object with exactly one key")
            ((name, value),) = item.items()
            # Tenant input: a name a shell, the loader or the agent acts on would run code.
            reason = refusal(name, allow=FROM_MANAGER)
            if reason is not None:
                raise ValueError(describe(name, reason))
            if isinstance(value, str) and "\x00" in value:
                raise ValueError(f"parameter {name} must not contain NUL")
        return v

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in self.parameters:
            for k, val in item.items():
                if isinstance(val, bool):
                    out[k] = "true" if val else "false"
                else:
                    out[k] = "" if val is None else str(val)
        return out


class Transform(_Model):
    """(ours) The agent compresses and/or encrypts the stream itself while it uploads, and
    reverses both while it downloads. The top-level ``compression`` and ``encryption_key``
    still say *whether*; this says that the agent, not the script, does it."""

    compression: Literal["zstd", "gzip"] | None = None
    encryption: bool = False


class _Job(_Model):
    id: str
    compression: bool = False  # the Go agent's default
    encryption_key: str = Field(min_length=1, repr=False)
    destination: Destination
    transform: Transform | None = None

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not _ID.match(v):
            raise ValueError(
                "id must be 1-200 characters of letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        return v

    @property
    def has_key(self) -> bool:
        return self.encryption_key != NO_KEY

    @property
    def agent_compression(self) -> str | None:
        if self.transform and self.transform.compression and self.compression:
            return self.transform.compression
        return None

    @property
    def agent_encryption(self) -> bool:
        return bool(self.transform and self.transform.encryption and self.has_key)

    @property
    def script_compression(self) -> bool:
        """What the script is told: compress yourself (false when the agent does it)."""
        return self.compression and not self.agent_compression

    @property
    def script_key(self) -> str | None:
        """The key the script must encrypt with itself, if any."""
        return self.encryption_key if self.has_key and not self.agent_encryption else None


class BackupRequest(_Job):
    backup: DatabaseSection

    @property
    def section(self) -> DatabaseSection:
        return self.backup


class RestoreRequest(_Job):
    restore: DatabaseSection
    checksum: str | None = None
    """(ours) ``sha256:<hex>`` of the stored object: the download is verified against it."""

    verify: bool = False
    """(ours) A restore drill: the object is downloaded, decoded and checked against
    ``checksum``, then handed to the optional ``verify`` script; no restore stage runs, the
    live database is not touched."""

    @field_validator("checksum")
    @classmethod
    def _checksum(cls, v: str | None) -> str | None:
        if v is not None and not _SHA256.match(v):
            raise ValueError("checksum must be 'sha256:' followed by 64 lower-case hex digits")
        return v

    @property
    def section(self) -> DatabaseSection:
        return self.restore


class DeleteRequest(_Model):
    id: str = Field(min_length=1)


class FileSize(BaseModel):
    size: int | None = Field(default=None, ge=0, strict=True)
    unit: str = "byte"


class TransformDone(BaseModel):
    """(ours) What the agent itself did to the stream."""

    compression: str | None = None
    encryption: str | None = None


JOB_STATUSES = ("RUNNING", "SUCCEEDED", "FAILED")


class JobStatus(BaseModel):
    """A job state as ``GET /backup/{id}`` and ``GET /restore/{id}`` answer it, for both agent
    kinds. Read leniently, since it comes from another program: a field of an unexpected
    type, or an empty string, counts as absent, and a status other than the three (the Go
    agent answers an empty one for a moment after the start) as ``RUNNING``. The stage logs
    (``<stage>_log``, ``<stage>_errorlog``) are the extra fields."""

    model_config = ConfigDict(extra="allow")

    status: str = "RUNNING"
    state: str | None = None
    message: str | None = None
    error_message: str | None = None
    filename: str | None = None
    filenamePrefix: str | None = None
    filesize: FileSize | None = None
    # (ours)
    stored_size: int | None = Field(default=None, ge=0, strict=True)
    stored_key: str | None = None
    checksum: str | None = None
    transform: TransformDone | None = None
    # The Go agent echoes the request's boolean; older versions of ours named the format
    # (and the encryption) here instead of in ``transform``.
    compression: bool | str | None = None
    encryption: str | None = None
    # (ours) the job ended because the manager cancelled it (``POST .../{id}/cancel``)
    cancelled: bool | None = Field(default=None, strict=True)
    # (ours) a restore drill's timings: download_seconds, decrypt_seconds, verify_seconds
    timings: dict[str, float] | None = None
    verify_script: bool | None = Field(default=None, strict=True)  # a drill ran one

    @field_validator("*", mode="wrap")
    @classmethod
    def _lenient(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if value == "":
            return None
        try:
            return handler(value)
        except ValidationError:
            return None

    @field_validator("status", mode="after")
    @classmethod
    def _status(cls, value: str | None) -> str:
        upper = (value or "").upper()
        return upper if upper in JOB_STATUSES else "RUNNING"

    @property
    def size(self) -> int | None:
        return self.filesize.size if self.filesize else None

    @property
    def stream_compression(self) -> str | None:
        """The format the agent compressed the stream with, if it did (ours)."""
        done = self.transform.compression if self.transform else self.compression
        return done if isinstance(done, str) else None

    @property
    def stream_encryption(self) -> str | None:
        return self.transform.encryption if self.transform else self.encryption

    def logs(self) -> dict[str, str]:
        """The stage logs that are not empty."""
        return {
            k: v
            for k, v in (self.model_extra or {}).items()
            if (k.endswith("_log") or k.endswith("_errorlog")) and isinstance(v, str) and v
        }


def describe_errors(exc: ValidationError) -> str:
    """Location and reason of each error; never the input, which may be a secret."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        msg = "field required" if err["type"] == "missing" else err["msg"]
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def safe_error(exc: BaseException) -> dict[str, str]:
    """Log fields for an unexpected exception: its type, message and own traceback, but not
    the exceptions chained to it, and never pydantic's echo of the input (a request body
    holds passwords)."""
    message = describe_errors(exc) if isinstance(exc, ValidationError) else str(exc)
    frames = traceback.format_tb(exc.__traceback__)
    return {"error": f"{type(exc).__name__}: {message}", "traceback": "".join(frames)}
