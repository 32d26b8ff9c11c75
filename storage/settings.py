"""Typed connection settings of a destination. Secrets are ``SecretStr`` so they never show in
a repr, a log line or an exception."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

_Prefix = Annotated[str, Field(default="", max_length=512)]


def _check_prefix(value: str) -> str:
    if value.startswith("/") or ".." in value.split("/"):
        raise ValueError("the key prefix must be relative and must not contain '..'")
    if value and not value.endswith("/"):
        value += "/"
    return value


class S3Settings(BaseModel):
    """An S3 bucket on AWS or any S3-compatible endpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["S3"] = "S3"
    endpoint: str | None = Field(
        default=None, description="Endpoint URL; omit for AWS. http:// means plain HTTP."
    )
    region: str = Field(default="us-east-1", min_length=1, max_length=64)
    bucket: str = Field(min_length=3, max_length=63)
    access_key_id: str = Field(min_length=1, max_length=256)
    secret_access_key: SecretStr
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    verify_tls: bool = True
    ca_bundle: str | None = Field(default=None, description="Path of a PEM CA bundle to trust")
    prefix: _Prefix = ""

    _prefix = field_validator("prefix")(classmethod(lambda cls, v: _check_prefix(v)))


class SwiftSettings(BaseModel):
    """An OpenStack Swift container, reached through auth v1 (tempauth, swauth) or Keystone v3."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["SWIFT"] = "SWIFT"
    auth_url: str = Field(min_length=1, max_length=2048)
    auth_version: Literal["1", "3"] = "3"
    username: str = Field(min_length=1, max_length=256)
    password: SecretStr = Field(description="Password (v3) or key (v1)")
    user_domain_name: str | None = "Default"
    project_name: str | None = None
    project_domain_name: str | None = "Default"
    region_name: str | None = None
    container: str = Field(min_length=1, max_length=256)
    verify_tls: bool = True
    ca_bundle: str | None = None
    prefix: _Prefix = ""

    _prefix = field_validator("prefix")(classmethod(lambda cls, v: _check_prefix(v)))


DestinationSettings = Annotated[S3Settings | SwiftSettings, Field(discriminator="type")]


class TransferSettings(BaseModel):
    """Tuning shared by both backends; the defaults suit backups of a few MiB to many GiB."""

    model_config = ConfigDict(frozen=True)

    part_size: int = Field(default=16 * 1024 * 1024, ge=5 * 1024 * 1024, le=5 * 1024**3)
    """Bytes per multipart part / SLO segment; also the large-object threshold."""
    max_concurrency: int = Field(default=4, ge=1, le=32)
    """Parts in flight at once; peak memory is about part_size * (max_concurrency + 1)."""
    part_growth_every: int = Field(default=1000, ge=1, le=10_000)
    """S3 only: the part size doubles after every this many parts, so a stream of unknown
    length fits S3's 10,000 parts (objects up to ``part_size * part_growth_every`` keep the
    memory bound above; larger ones use proportionally larger parts)."""
    max_attempts: int = Field(default=5, ge=1, le=20)
    """Attempts of one request on a transient failure, with exponential backoff."""
    connect_timeout: float = Field(default=10.0, gt=0)
    read_timeout: float = Field(default=60.0, gt=0)
    backoff_initial: float = Field(default=0.2, gt=0)
    backoff_max: float = Field(default=10.0, gt=0)
