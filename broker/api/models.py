"""Every payload of the backup-manager API. Handlers validate and answer with these models,
and the OpenAPI document is generated from them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    create_model,
    field_validator,
)

from backup.plans import EncryptionIn, Name, PlanSpec, Retention
from storage.settings import S3Settings, SwiftSettings

_IN = ConfigDict(extra="forbid", strict=True)
_OUT = ConfigDict(extra="ignore")

Id = Annotated[str, Field(min_length=1, max_length=64)]
Text = Annotated[str, Field(min_length=1, max_length=256)]


class ErrorOut(BaseModel):
    model_config = _OUT
    error: str = Field(description="Stable machine-readable code.")
    description: str = Field(description="What went wrong, in words a person can act on.")
    field: str | None = None
    problems: list[dict[str, str]] | None = None


# --- destinations ---------------------------------------------------------------------------


class S3DestinationIn(BaseModel):
    """An S3 bucket (AWS or any S3-compatible endpoint)."""

    model_config = _IN
    type: Literal["S3"]
    name: Name
    plain_http: bool | None = Field(
        default=None,
        description="Speak plain HTTP to the endpoint (default: from the endpoint's scheme, "
        "else HTTPS).",
    )
    endpoint: str | None = Field(
        default=None,
        max_length=2048,
        description="https://host[:port] or host[:port]; omit for AWS.",
    )
    region: str = Field(default="us-east-1", min_length=1, max_length=64)
    bucket: str = Field(min_length=3, max_length=63)
    access_key_id: str = Field(min_length=1, max_length=256)
    secret_access_key: SecretStr = Field(min_length=1, max_length=1024)
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    verify_tls: bool = True
    prefix: str = Field(default="", max_length=512, description="Key prefix of every object.")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None, info: ValidationInfo) -> str | None:
        plain = info.data.get("plain_http")
        if value is None:
            if plain:
                raise ValueError("plain_http needs an endpoint")
            return None
        raw = value.strip()
        if "://" not in raw:
            raw = ("http://" if plain else "https://") + raw
        parts = urlsplit(raw)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be http(s)://host[:port] or host[:port]")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise ValueError("has an invalid port") from None
        if plain is not None and plain != (parts.scheme == "http"):
            raise ValueError("its scheme contradicts plain_http")
        return raw.rstrip("/")

    def settings(self) -> S3Settings:
        return S3Settings(
            **self.model_dump(exclude={"name", "plain_http", "secret_access_key"}),
            secret_access_key=self.secret_access_key,
        )


class SwiftDestinationIn(BaseModel):
    """An OpenStack Swift container (auth v1 such as tempauth, or Keystone v3)."""

    model_config = _IN
    type: Literal["SWIFT"]
    name: Name
    auth_url: str = Field(min_length=1, max_length=2048, pattern=r"^https?://\S+$")
    auth_version: Literal["1", "3"] = "3"
    username: str = Field(min_length=1, max_length=256)
    password: SecretStr = Field(
        min_length=1, max_length=1024, description="The key (auth v1) or password (v3)."
    )
    user_domain_name: str | None = Field(default="Default", max_length=256)
    project_name: str | None = Field(default=None, max_length=256)
    project_domain_name: str | None = Field(default="Default", max_length=256)
    region_name: str | None = Field(default=None, max_length=256)
    container: str = Field(min_length=1, max_length=256)
    verify_tls: bool = True
    prefix: str = Field(default="", max_length=512)

    def settings(self) -> SwiftSettings:
        return SwiftSettings(
            **self.model_dump(exclude={"name", "password"}), password=self.password
        )


DestinationIn = Annotated[S3DestinationIn | SwiftDestinationIn, Field(discriminator="type")]


class DestinationPatch(BaseModel):
    """Any fields of a destination; the merged result is validated as a whole. Secrets that
    are not sent are kept. Changing ``type`` needs every field of the new type."""

    model_config = ConfigDict(extra="allow")


class _DestinationOutBase(BaseModel):
    model_config = _OUT
    id: str
    name: str
    verify_tls: bool
    prefix: str
    created_at: datetime
    updated_at: datetime
    version: int


class S3DestinationOut(_DestinationOutBase):
    type: Literal["S3"]
    endpoint: str | None
    plain_http: bool
    region: str
    bucket: str
    access_key_id: str
    addressing_style: str
    secret_access_key_set: bool


class SwiftDestinationOut(_DestinationOutBase):
    type: Literal["SWIFT"]
    auth_url: str
    auth_version: str
    username: str
    user_domain_name: str | None
    project_name: str | None
    project_domain_name: str | None
    region_name: str | None
    container: str
    password_set: bool


DestinationOut = Annotated[S3DestinationOut | SwiftDestinationOut, Field(discriminator="type")]


class DestinationPage(BaseModel):
    items: list[DestinationOut]
    total: int
    next_cursor: str | None


class ValidationStepOut(BaseModel):
    name: str
    ok: bool
    error_code: str | None = None
    message: str | None = None


class ValidationOut(BaseModel):
    """The outcome of writing, reading back and deleting a probe object."""

    ok: bool
    error: str | None = Field(default=None, description="Code of the first failure.")
    description: str = Field(description="What happened, and what to fix if it failed.")
    steps: list[ValidationStepOut]


# --- plans ----------------------------------------------------------------------------------

PlanIn = PlanSpec

PlanPatch = create_model(  # type: ignore[call-overload]
    "PlanPatch",
    __config__=ConfigDict(extra="forbid", strict=True),
    __doc__="A JSON merge patch of a plan (RFC 7396): objects merge, null restores the "
    "default. The merged plan is validated as a whole.",
    **{
        name: (field.annotation | None, None)
        for name, field in PlanSpec.model_fields.items()
        if name not in ("retention", "encryption")
    },
    retention=(dict[str, Any] | None, None),
    encryption=(dict[str, Any] | None, None),
)


class EncryptionOut(BaseModel):
    enabled: bool
    key_set: bool


class LastJob(BaseModel):
    id: str
    status: str
    ended_at: datetime | None


class PlanOut(BaseModel):
    model_config = _OUT
    id: str
    name: str
    destination_id: str
    frequency: str
    timezone: str
    items: list[str]
    retention: Retention
    compression: bool
    encryption: EncryptionOut
    paused: bool
    next_run_at: datetime | None = Field(description="Next scheduled run; null when paused.")
    last_job: LastJob | None
    created_at: datetime
    updated_at: datetime
    version: int


class PlanPage(BaseModel):
    items: list[PlanOut]
    total: int
    next_cursor: str | None


# --- jobs -----------------------------------------------------------------------------------

JobType = Literal["BACKUP", "RESTORE"]
JobStatus = Literal["QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "MISSED"]


class JobItemOut(BaseModel):
    model_config = _OUT
    name: str
    status: str | None = None
    filename: str | None = None
    size: int | None = None
    stored_size: int | None = None
    checksum: str | None = None
    error: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    logs: dict[str, str] | None = Field(
        default=None,
        description="Stage logs (only when reading one job), each cut to its last bytes.",
    )


class JobOut(BaseModel):
    model_config = _OUT
    id: str
    type: JobType
    plan_id: str | None = None
    destination_id: str | None = None
    trigger: str
    scheduled_for: datetime | None = None
    status: JobStatus
    reason: str | None = None
    items: list[JobItemOut] = []
    restore_point_id: str | None = None
    compression: Any = None
    encryption: dict[str, Any] | None = None
    cancel_requested: bool = False
    created_at: datetime
    started_at: datetime | None = None
    ended_at: datetime | None = None
    deadline_at: datetime | None = None
    attempts: int = 0


class JobPage(BaseModel):
    items: list[JobOut]
    total: int
    next_cursor: str | None


class JobQuery(BaseModel):
    model_config = _IN
    type: JobType | None = None
    status: JobStatus | None = None
    plan_id: Id | None = None


class RestoreIn(BaseModel):
    model_config = _IN
    restore_point_id: Id
    items: list[Text] | None = Field(
        default=None, max_length=1000, description="A subset of the restore point's items."
    )


# --- restore points -------------------------------------------------------------------------


class RestorePointItemOut(BaseModel):
    model_config = _OUT
    name: str
    filename: str | None = None
    key: str | None = None
    size: int | None = None
    stored_size: int | None = None
    checksum: str | None = None
    compression: Any = None
    encryption: Any = None


class RestorePointOut(BaseModel):
    model_config = _OUT
    id: str
    plan_id: str | None = None
    destination_id: str | None = None
    job_id: str | None = None
    created_at: datetime
    expires_at: datetime | None = None
    items: list[RestorePointItemOut] = []
    state: str = "available"


class RestorePointPage(BaseModel):
    items: list[RestorePointOut]
    total: int
    next_cursor: str | None


class ItemsOut(BaseModel):
    items: list[str]


__all__ = ["EncryptionIn", "PlanIn"]
