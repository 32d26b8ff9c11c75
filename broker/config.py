"""Typed configuration from environment variables, with a clear error for each bad value.

Every setting has a documented default that runs the service locally with no configuration:
an embedded database under ``DATA_DIR``, broker credentials and a master key generated on first
start and kept (mode 0600) under ``DATA_DIR``. On Cloud Foundry ``PORT`` is honoured and a bound
MongoDB service in ``VCAP_SERVICES`` is used without extra settings.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from backup.secrets import MasterKey, generate_master_key_spec, parse_master_keys
from backup.settings import ConfigError as ConfigError
from backup.settings import load_settings as load_part_settings
from storage.egress import EgressPolicy, parse_networks
from webguard.middleware import parse_origins

# broker/osb/catalog.yml links to the top-level catalog.yml, so that an installed wheel carries
# it as package data (a file beside the packages is not installed).
DEFAULT_CATALOG = Path(__file__).parent / "osb" / "catalog.yml"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    host: str = Field(
        default="127.0.0.1",
        validation_alias=AliasChoices("LISTEN_HOST", "HOST"),
        description="Address to listen on; 0.0.0.0 on Cloud Foundry.",
    )
    port: int = Field(default=8080, ge=1, le=65535, validation_alias="PORT")
    public_url: str | None = Field(
        default=None,
        validation_alias="PUBLIC_URL",
        description="Base URL handed to bound applications; defaults from the listen address.",
    )
    mongodb_url: SecretStr | None = Field(default=None, validation_alias="MONGODB_URL")
    mongodb_database: str = Field(
        default="",
        max_length=63,
        pattern=r"^[^/\\. \"$*<>:|?]*$",
        validation_alias="MONGODB_DATABASE",
        description="Database name; unset: the one named in MONGODB_URL, else 'backup_manager'.",
    )
    data_dir: Path = Field(default=Path("data"), validation_alias="DATA_DIR")
    broker_username: str = Field(
        default="broker", min_length=1, max_length=128, validation_alias="BROKER_USERNAME"
    )
    broker_password: SecretStr | None = Field(default=None, validation_alias="BROKER_PASSWORD")
    master_keys_spec: SecretStr | None = Field(
        default=None,
        validation_alias="SECRETS_MASTER_KEYS",
        description="'id:base64(32 bytes)[,id:key...]'; the first seals, all open (rotation).",
    )
    catalog_path: Path = Field(
        default=DEFAULT_CATALOG,
        validation_alias="CATALOG_PATH",
        description="The OSB catalog served at /v2/catalog (YAML).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", validation_alias="LOG_LEVEL"
    )
    tombstone_seconds: int = Field(
        default=3600,
        ge=0,
        validation_alias="TOMBSTONE_SECONDS",
        description="How long a deprovisioned instance answers last_operation 'succeeded'.",
    )
    shutdown_timeout: float = Field(default=30.0, gt=0, validation_alias="SHUTDOWN_TIMEOUT")
    agent_probe_timeout: float = Field(
        default=300.0,
        ge=0,
        le=86400,
        validation_alias="AGENT_PROBE_TIMEOUT_SECONDS",
        description="How long provisioning keeps trying to reach the agent before it fails.",
    )
    agent_require_tls: bool = Field(
        default=False,
        validation_alias="AGENT_REQUIRE_TLS",
        description="Refuse agent URLs with http://: they carry the agent's and the database's "
        "passwords in the clear.",
    )
    egress_deny_networks: str | None = Field(
        default=None,
        validation_alias="EGRESS_DENY_NETWORKS",
        description="CIDRs the service never connects to on a tenant's behalf (destinations, "
        "agents); unset: loopback, link-local (cloud metadata), unspecified, multicast and "
        "broadcast; empty: none.",
    )
    egress_allow_networks: str = Field(
        default="",
        validation_alias="EGRESS_ALLOW_NETWORKS",
        description="CIDRs the service may connect to on a tenant's behalf; empty: all not denied.",
    )
    deprovision_job_wait: float = Field(
        default=600.0,
        ge=0,
        le=86400,
        validation_alias="DEPROVISION_JOB_WAIT_SECONDS",
        description="How long deprovisioning waits for running jobs to stop once asked to.",
    )
    operation_lease_seconds: float = Field(
        default=60.0,
        ge=1,
        le=3600,
        validation_alias="OPERATION_LEASE_SECONDS",
        description="A replica working on an OSB operation renews its claim this often (x3); "
        "another replica resumes the operation when the claim lapses.",
    )
    # HTTP hardening (webguard): slow clients, connection count, password guessing, CORS.
    http_header_timeout: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        validation_alias="HTTP_HEADER_TIMEOUT_SECONDS",
        description="A connection whose request headers are not complete this long after it "
        "opened (or after the request began) is closed.",
    )
    http_body_timeout: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        validation_alias="HTTP_BODY_TIMEOUT_SECONDS",
        description="A request body not complete this long after its headers: 408, closed.",
    )
    http_keepalive_timeout: float = Field(
        default=120.0,
        gt=0,
        le=3600,
        validation_alias="HTTP_KEEPALIVE_TIMEOUT_SECONDS",
        description="An idle keep-alive connection is closed after this long.",
    )
    http_max_connections: int = Field(
        default=1000,
        ge=1,
        le=100_000,
        validation_alias="HTTP_MAX_CONNECTIONS",
        description="Open connections per process; beyond it a new one gets 503 and is closed.",
    )
    auth_failure_limit: int = Field(
        default=10,
        ge=0,
        le=100_000,
        validation_alias="AUTH_FAILURE_LIMIT",
        description="Failed logins per client address (and per user name) within the window "
        "after which attempts are held back (429); 0 turns throttling off.",
    )
    auth_failure_window: float = Field(
        default=60.0,
        gt=0,
        le=86400,
        validation_alias="AUTH_FAILURE_WINDOW_SECONDS",
        description="The window of AUTH_FAILURE_LIMIT, in seconds.",
    )
    trusted_proxy_hops: int | None = Field(
        default=None,
        ge=0,
        le=10,
        validation_alias="TRUSTED_PROXY_HOPS",
        description="Proxies in front of the service that append to X-Forwarded-For (the "
        "client address counted by the throttle); unset: 1 on Cloud Foundry, else 0.",
    )
    cors_allowed_origins: str = Field(
        default="",
        validation_alias="CORS_ALLOWED_ORIGINS",
        description="Comma-separated exact origins whose pages may call the API; none: no "
        "CORS headers at all.",
    )
    dashboard_client_id: str = Field(
        default="backup-manager-dashboard",
        min_length=1,
        max_length=255,
        validation_alias="DASHBOARD_CLIENT_ID",
        description="The web dashboard's OAuth client at the UAA (the catalog's "
        "dashboard_client id).",
    )
    dashboard_client_secret: SecretStr | None = Field(
        default=None,
        validation_alias="DASHBOARD_CLIENT_SECRET",
        description="Its client secret; unset: no dashboard sign-in and no dashboard_url.",
    )
    dashboard_session_seconds: int = Field(
        default=3600,
        ge=60,
        le=86400,
        validation_alias="DASHBOARD_SESSION_SECONDS",
        description="How long a dashboard sign-in lasts at most (never past the token's expiry).",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v

    @field_validator("mongodb_url")
    @classmethod
    def _mongo_scheme(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value().startswith(("mongodb://", "mongodb+srv://")):
            raise ValueError("must start with mongodb:// or mongodb+srv://")
        return v

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if not v.strip() or any(c.isspace() for c in v):
            raise ValueError("must be an IP address or host name, such as 0.0.0.0")
        return v

    @field_validator("cors_allowed_origins")
    @classmethod
    def _origins(cls, v: str) -> str:
        parse_origins(v)
        return v

    @field_validator("catalog_path")
    @classmethod
    def _catalog_exists(cls, v: Path) -> Path:
        if not v.is_file():
            raise ValueError(f"no catalog file at {v}")
        return v

    @field_validator("egress_deny_networks", "egress_allow_networks")
    @classmethod
    def _networks(cls, v: str | None) -> str | None:
        if v is not None:
            parse_networks(v)
        return v

    def egress_policy(self) -> EgressPolicy:
        """Where the service may connect on a tenant's behalf (see storage.egress)."""
        return EgressPolicy.from_settings(self.egress_deny_networks, self.egress_allow_networks)

    @field_validator("master_keys_spec")
    @classmethod
    def _keys(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            parse_master_keys(v.get_secret_value())
        return v

    @model_validator(mode="after")
    def _cloud_foundry(self) -> Settings:
        if os.environ.get("VCAP_APPLICATION") and "LISTEN_HOST" not in os.environ:
            self.host = "0.0.0.0"
        if self.trusted_proxy_hops is None:
            self.trusted_proxy_hops = 1 if os.environ.get("VCAP_APPLICATION") else 0
        if self.mongodb_url is None and (url := _mongodb_from_vcap()):
            self.mongodb_url = SecretStr(url)
        if not self.mongodb_database:
            named = (
                _database_in_url(self.mongodb_url.get_secret_value()) if self.mongodb_url else ""
            )
            self.mongodb_database = named or "backup_manager"
        return self

    @property
    def embedded_database(self) -> bool:
        return self.mongodb_url is None

    @property
    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        if uris := _vcap_application_uris():
            return f"https://{uris[0]}"
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def master_keys(self) -> list[MasterKey]:
        assert self.master_keys_spec is not None, "call resolve_local_secrets() first"
        return parse_master_keys(self.master_keys_spec.get_secret_value())

    def resolve_local_secrets(self) -> None:
        """Fill the broker password and master key from ``DATA_DIR`` (created on first start)
        when they are not configured. With an external database both must be configured:
        a key kept on one instance's disk would not be shared by replicas."""
        if self.broker_password is not None and self.master_keys_spec is not None:
            return
        if not self.embedded_database:
            missing = [
                name
                for name, value in (
                    ("BROKER_PASSWORD", self.broker_password),
                    ("SECRETS_MASTER_KEYS", self.master_keys_spec),
                )
                if value is None
            ]
            raise ConfigError(
                f"{' and '.join(missing)} must be set when MONGODB_URL points at a shared "
                "database (generated local values would differ between replicas)"
            )
        # Readable by the service's user only: it holds the secrets and the database files.
        try:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.data_dir.chmod(0o700)
        except OSError as exc:
            raise ConfigError(
                f"DATA_DIR: cannot use {self.data_dir} ({exc.strerror}): it must be a "
                "directory that this user owns, or a path where it can create one"
            ) from None
        if self.broker_password is None:
            self.broker_password = SecretStr(
                _read_or_create(
                    self.data_dir / "broker-password", lambda: secrets.token_urlsafe(24)
                )
            )
        if self.master_keys_spec is None:
            self.master_keys_spec = SecretStr(
                _read_or_create(self.data_dir / "master-key", generate_master_key_spec)
            )


def _read_or_create(path: Path, make: Callable[[], str]) -> str:
    if path.exists():
        return path.read_text().strip()
    value = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def _database_in_url(url: str) -> str:
    """The database a connection string names (``mongodb://h/<db>?...``): on Cloud Foundry a
    bound service's user is often allowed only there."""
    rest = url.split("://", 1)[-1]
    _, slash, path = rest.partition("/")
    return unquote(path.split("?", 1)[0]) if slash else ""


def _vcap_application_uris() -> list[str]:
    try:
        app = json.loads(os.environ.get("VCAP_APPLICATION", "") or "{}")
    except json.JSONDecodeError:
        return []
    uris = app.get("application_uris") or app.get("uris") or []
    return [str(uri) for uri in uris]


def _mongodb_from_vcap() -> str | None:
    raw = os.environ.get("VCAP_SERVICES")
    if not raw:
        return None
    try:
        services = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError("VCAP_SERVICES is not valid JSON") from exc
    for instances in services.values():
        for svc in instances:
            creds = svc.get("credentials") or {}
            for key in ("uri", "url", "connection_string", "connectionString"):
                value = creds.get(key)
                if isinstance(value, str) and value.startswith(("mongodb://", "mongodb+srv://")):
                    return value
    return None


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment (plus ``overrides``, by variable name), or
    :class:`ConfigError` naming every bad variable and why."""
    return load_part_settings(Settings, **overrides)
