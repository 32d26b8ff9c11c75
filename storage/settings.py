"""Typed connection settings of a destination. Secrets are ``SecretStr`` so they never show in
a repr, a log line or an exception."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

_Prefix = Annotated[str, Field(default="", max_length=512)]

# What the S3 client (botocore) accepts as a region: one DNS label, not all digits. Anything
# else makes it raise while building its client, so it is refused here, naming the field.
_REGION = re.compile(r"^(?![0-9]+$)(?!-)[a-zA-Z0-9-]{1,63}(?<!-)$")
_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$", re.IGNORECASE)


def _check_region(value: str) -> str:
    if not _REGION.match(value):
        raise ValueError(
            "must be a region name made of letters, digits and '-' (such as us-east-1)"
        )
    return value


def check_url(value: str, *, path: bool = True) -> str:
    """``value`` if it is an http(s) URL whose host is a DNS name (ASCII: IDNA names in their
    xn-- form), an IPv4 address or a bracketed IPv6 address, with a valid port, no user info,
    query or fragment (and no path unless ``path``); else ``ValueError`` saying what is wrong.

    The clients (botocore, requests, keystoneauth) raise on such URLs while building a
    request, where no input may fail with anything but a clear refusal."""
    if any(c in value for c in "\t\r\n ") or not value.isascii() or not value.isprintable():
        raise ValueError(
            "must be an http(s) URL without spaces or control characters (write a "
            "non-ASCII host name in its xn-- form)"
        )
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValueError("must be an http(s) URL with a port between 1 and 65535") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("must start with http:// or https://")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ValueError("must not hold a user name or password")
    if parts.query or parts.fragment or "?" in value or "#" in value:
        raise ValueError("must not have a query or fragment")
    if not path and parts.path.strip("/"):
        raise ValueError("must be only scheme, host and port")
    if (port is not None and not 1 <= port <= 65535) or parts.netloc.endswith(":"):
        raise ValueError("must have a port between 1 and 65535")
    host = parts.hostname or ""
    if parts.netloc.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("has an invalid IPv6 address") from None
        if "%" in host:
            raise ValueError("must not name an IPv6 zone")
        return value
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253 or not all(map(_HOST_LABEL.match, name.split("."))):
        raise ValueError(
            "must name a host made of letters, digits, '-' and '.' (a DNS name), or an IP address"
        )
    return value


def _check_prefix(value: str) -> str:
    if value.startswith("/") or ".." in value.split("/"):
        raise ValueError("the key prefix must be relative and must not contain '..'")
    if value and not value.endswith("/"):
        value += "/"
    return value


MAX_LOCK_MARGIN_DAYS = 3650


class ObjectLock(BaseModel):
    """S3 Object Lock on every restore point's objects: each is written with ``mode`` and a
    retain-until date (the point's expiry plus ``margin_days``), before which no credential
    (the manager's included) can delete or overwrite it. See docs/storage.md, "Object lock"."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    mode: Literal["GOVERNANCE", "COMPLIANCE"] = Field(
        description="COMPLIANCE: nobody can shorten or lift the lock; GOVERNANCE: only a "
        "credential allowed to bypass governance retention can (the manager never does)."
    )
    margin_days: int = Field(
        default=1,
        ge=0,
        le=MAX_LOCK_MARGIN_DAYS,
        description="Days the lock lasts past the restore point's expiry (0 to 3650).",
    )


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
    object_lock: ObjectLock | None = Field(
        default=None, description="Lock every restore point's objects (S3 Object Lock)."
    )

    _prefix = field_validator("prefix")(classmethod(lambda cls, v: _check_prefix(v)))
    _region = field_validator("region")(classmethod(lambda cls, v: _check_region(v)))

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return None if value is None else check_url(value)


class SwiftSettings(BaseModel):
    """An OpenStack Swift container, reached through auth v1 (tempauth, swauth) or Keystone v3.

    Keystone authenticates either a user's password (scoped to ``project_name``) or an
    application credential (its id, or its name and its owner's ``username`` and
    ``user_domain_name``, with its secret), which is bound to one project and is what
    OpenStack recommends for services. The object-store endpoint is the catalog's one of
    ``interface`` in ``region_name`` (any region if None)."""

    # No input in validation errors: it would show the secrets.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    type: Literal["SWIFT"] = "SWIFT"
    auth_url: str = Field(min_length=1, max_length=2048)
    auth_version: Literal["1", "3"] = "3"
    username: str = Field(default="", max_length=256)
    password: SecretStr = Field(
        default=SecretStr(""),
        description="Password (v3) or key (v1); empty with an application credential",
    )
    application_credential_id: str | None = Field(default=None, min_length=1, max_length=256)
    application_credential_name: str | None = Field(default=None, min_length=1, max_length=256)
    application_credential_secret: SecretStr | None = None
    user_domain_name: str | None = "Default"
    project_name: str | None = None
    project_domain_name: str | None = "Default"
    region_name: str | None = None
    interface: Literal["public", "internal"] = "public"
    container: str = Field(min_length=1, max_length=256)
    verify_tls: bool = True
    ca_bundle: str | None = None
    prefix: _Prefix = ""

    _prefix = field_validator("prefix")(classmethod(lambda cls, v: _check_prefix(v)))
    _auth_url = field_validator("auth_url")(classmethod(lambda cls, v: check_url(v)))

    @property
    def uses_application_credential(self) -> bool:
        return self.application_credential_secret is not None

    @model_validator(mode="after")
    def _one_authentication(self) -> SwiftSettings:
        """Exactly one complete way to authenticate, so that none is silently ignored."""
        credential = (
            self.application_credential_id,
            self.application_credential_name,
            self.application_credential_secret,
        )
        password = self.password.get_secret_value()
        if self.auth_version == "1":
            if any(v is not None for v in credential):
                raise ValueError("auth v1 takes a username and key, not an application credential")
            if not self.username or not password:
                raise ValueError("auth v1 needs a username and a password (the key)")
            return self
        if all(v is None for v in credential):
            if not self.username or not password:
                raise ValueError(
                    "Keystone v3 needs a username and a password, or an application credential"
                )
            return self
        if password:
            raise ValueError("give either a password or an application credential, not both")
        secret = self.application_credential_secret
        if secret is None or not secret.get_secret_value():
            raise ValueError(
                "an application credential needs its secret (application_credential_secret)"
            )
        if not self.application_credential_id and not self.application_credential_name:
            raise ValueError(
                "an application credential needs its id or name (application_credential_id "
                "or application_credential_name)"
            )
        if not self.application_credential_id and not self.username:
            raise ValueError(
                "an application credential given by name needs its owner's username (and "
                "user_domain_name)"
            )
        if self.project_name:
            raise ValueError(
                "an application credential is bound to its project: leave project_name empty"
            )
        return self


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
