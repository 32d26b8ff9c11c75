"""Agent configuration from environment variables (names compatible with the Go agent)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agent.environment import parse_patterns


class AgentConfig(BaseSettings):
    """Every field is read from the environment variable of the same name (case-insensitive).
    The first block are the Go agent's names and defaults; the rest are ours."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore")

    client_username: str = Field(min_length=1)
    client_password: SecretStr = Field(min_length=1)
    client_port: int = Field(default=8000, ge=1, le=65535)
    client_host: str = "0.0.0.0"
    directory_backup: Path = Path("/var/vcap/store/backup-agent/backup")
    directory_restore: Path = Path("/var/vcap/store/backup-agent/restore")
    scripts_path: Path = Path("/var/vcap/jobs/backup-agent/backup")
    allowed_to_delete_files: bool = False
    skip_storage: bool | None = None
    """When set, overrides the request's ``skipStorage``."""
    default_s3_endpoint: str | None = None
    max_job_number: int = Field(default=10, ge=1, le=1000)
    # ours
    state_directory: Path | None = None
    """Job state (default ``<directory_backup>/.agent-state``)."""
    stage_timeout_seconds: float = Field(default=3600.0, gt=0)
    """Each script is killed, with its whole process group, after this long."""
    log_limit_bytes: int = Field(default=64 * 1024, ge=1024)
    """Per stage and stream, the tail of stdout / stderr kept in the job state."""
    job_retention_seconds: float = Field(default=7 * 24 * 3600.0, gt=0)
    """Finished jobs are forgotten this long after they ended."""
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    secrets_via: Literal["env", "fd"] = "env"
    """How scripts receive secrets: environment variables, or (``fd``) an in-memory file
    named by ``AGENT_SECRETS_FILE`` that the script sources, leaving its environment clean."""
    positional_secrets: bool = False
    """Compatibility: also pass password and encryption key as positional script arguments
    (visible in ``ps``), as the Go agent does."""
    s3_part_size: int = Field(default=8 * 1024 * 1024, ge=5 * 1024 * 1024)
    """Smallest upload part (S3) / segment (Swift); larger for a file that would otherwise
    need more than 9,000 parts. The AWS CLI's default chunk size."""
    s3_max_concurrency: int = Field(default=4, ge=1, le=32)
    """Parts in flight at once: peak memory is about part size x (this + 1), plus copies in
    socket buffers, whatever the backup's size."""
    allowed_parameters: str | None = None
    """Comma-separated names or fnmatch patterns (any case), e.g. ``PG*,MYSQL_*``: when set, a
    request parameter outside them is refused (400); set but empty, none passes. Names
    refused anyway stay refused."""
    script_env_path: str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    """``PATH`` of the scripts (they never inherit the agent's environment)."""
    script_env_passthrough: str = ""
    """Comma-separated names of the agent's own environment variables the scripts also see."""

    # HTTP hardening (webguard): slow clients, connection count, password guessing.
    http_header_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    """A connection whose request headers are not complete this long after it opened (or
    after the request began) is closed."""
    http_body_timeout_seconds: float = Field(default=60.0, gt=0, le=3600)
    """A request body not complete this long after its headers: 408, connection closed."""
    http_keepalive_timeout_seconds: float = Field(default=120.0, gt=0, le=3600)
    http_max_connections: int = Field(default=100, ge=1, le=100_000)
    """Open connections; beyond it a new one gets 503 and is closed."""
    auth_failure_limit: int = Field(default=10, ge=0, le=100_000)
    """Failed logins per client address (and per user name) within the window after which
    attempts are held back (429); 0 turns throttling off."""
    auth_failure_window_seconds: float = Field(default=60.0, gt=0, le=86400)

    @model_validator(mode="after")
    def _check(self) -> AgentConfig:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.state_directory is None:
            self.state_directory = self.directory_backup / ".agent-state"
        if self.default_s3_endpoint == "":
            self.default_s3_endpoint = None
        if {n.lower() for n in self.passthrough_names} & {"client_password", "client_username"}:
            raise ValueError("script_env_passthrough must not name the agent's credentials")
        return self

    @property
    def passthrough_names(self) -> list[str]:
        return [n.strip() for n in self.script_env_passthrough.split(",") if n.strip()]

    @property
    def allowed_parameter_patterns(self) -> tuple[str, ...] | None:
        """The allow list, upper-cased; ``None`` when there is none."""
        return None if self.allowed_parameters is None else parse_patterns(self.allowed_parameters)

    @property
    def state_dir(self) -> Path:
        assert self.state_directory is not None
        return self.state_directory


def describe_errors(exc: ValidationError) -> str:
    """Field and reason only: configuration values may be secrets, so never echo them."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "configuration"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def load_config() -> AgentConfig:
    return AgentConfig()
