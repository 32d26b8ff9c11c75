"""Request bodies of the agent protocol; field names exactly as the Go agent's."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


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
    if any(part in (".", "..") for part in value.split("/")[:-1]) or value in (".", ".."):
        raise ValueError("filenamePrefix must not contain '.' or '..' segments")
    if len(value) > 512:
        raise ValueError("filenamePrefix is too long")
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=False)


class Destination(_Model):
    type: Literal["S3", "SWIFT"]
    skipStorage: bool = False
    filenamePrefix: str | None = None
    filename: str | None = None
    # S3
    bucket: str | None = None
    region: str | None = None
    endpoint: str | None = None
    authKey: str | None = None
    authSecret: str | None = Field(default=None, repr=False)
    skipSSL: bool = False
    # Swift
    authUrl: str | None = None
    domain: str | None = None
    container_name: str | None = None
    project_name: str | None = None
    username: str | None = None
    password: str | None = Field(default=None, repr=False)

    @field_validator("type", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @field_validator("filenamePrefix")
    @classmethod
    def _prefix(cls, v: str | None) -> str | None:
        return None if v is None else check_prefix(v)

    @field_validator("filename")
    @classmethod
    def _filename(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v, "filename")

    def missing_for_storage(self) -> list[str]:
        """Fields the agent needs to reach the store itself (not with skipStorage)."""
        if self.type == "S3":
            need = ["bucket", "authKey", "authSecret", "filenamePrefix"]
        else:
            need = ["authUrl", "container_name", "username", "password"]
        missing = [f"destination.{n}" for n in need if not getattr(self, n)]
        if self.type == "S3" and self.filenamePrefix and not self.filenamePrefix.endswith("/"):
            missing.append("destination.filenamePrefix (must end with '/')")
        return missing


class DatabaseSection(_Model):
    host: str
    username: str
    password: str = Field(repr=False)
    database: str
    parameters: list[dict[str, str | int | float | bool | None]] = Field(default_factory=list)

    @field_validator("parameters")
    @classmethod
    def _params(
        cls, v: list[dict[str, str | int | float | bool | None]]
    ) -> list[dict[str, str | int | float | bool | None]]:
        for item in v:
            if len(item) != 1:
                raise ValueError("each parameter must be an object with exactly one key")
            (name,) = item
            if not _ENV_NAME.match(name):
                raise ValueError("parameter names must be valid environment variable names")
        return v

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in self.parameters:
            for k, val in item.items():
                if isinstance(val, bool):
                    out[k] = "true" if val else "false"
                elif val is None:
                    out[k] = ""
                else:
                    out[k] = str(val)
                if "\x00" in out[k]:
                    raise ValueError("parameter values must not contain NUL")
        return out


class Transform(_Model):
    """(ours) The manager asks the agent to compress and/or encrypt the stream itself."""

    compression: Literal["zstd", "gzip"] | None = None
    encryption: bool = False


class _Job(_Model):
    id: str
    compression: bool
    encryption_key: str = Field(repr=False)
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
        return self.encryption_key not in ("", "none")

    @property
    def agent_compression(self) -> str | None:
        if self.transform and self.transform.compression and self.compression:
            return self.transform.compression
        return None

    @property
    def agent_encryption(self) -> bool:
        return bool(self.transform and self.transform.encryption and self.has_key)


class BackupRequest(_Job):
    backup: DatabaseSection

    @property
    def section(self) -> DatabaseSection:
        return self.backup


class RestoreRequest(_Job):
    restore: DatabaseSection

    @property
    def section(self) -> DatabaseSection:
        return self.restore


class DeleteRequest(_Model):
    id: str


def describe_errors(exc: ValidationError) -> str:
    """Location and reason of each error; never the input, which may be a secret."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        msg = err["msg"]
        if err["type"] == "missing":
            msg = "field required"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)
