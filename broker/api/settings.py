"""Settings of the backup-manager API (authentication, authorization, limits), from the
environment. Read once when the app is created."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from backup.settings import load_settings


class ApiSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    oidc_issuer: str | None = Field(
        default=None,
        validation_alias="OIDC_ISSUER",
        description="Expected 'iss' of user tokens (UAA: https://uaa.<domain>/oauth/token). "
        "Unset: bearer JWTs are refused.",
    )
    oidc_jwks_url: str | None = Field(
        default=None,
        validation_alias="OIDC_JWKS_URL",
        description="Where the signing keys are published (UAA: https://uaa.<domain>/token_keys). "
        "Unset: discovered from <issuer>/.well-known/openid-configuration.",
    )
    oidc_audience: str | None = Field(
        default=None,
        validation_alias="OIDC_AUDIENCE",
        description="Required 'aud' of user tokens (UAA: 'cloud_controller'). Unset: not checked.",
    )
    operator_scope: str | None = Field(
        default="backup_manager.admin",
        validation_alias="OPERATOR_SCOPE",
        description="A token holding this scope may act on every instance. Empty: none.",
    )
    cloud_controller_url: str | None = Field(
        default=None,
        validation_alias="CLOUD_CONTROLLER_URL",
        description="Cloud Controller base URL; users are authorized by its "
        "/v3/service_instances/<guid>/permissions answer.",
    )
    permission_cache_seconds: float = Field(
        default=30.0, ge=0, le=3600, validation_alias="PERMISSION_CACHE_SECONDS"
    )
    jwks_min_refresh_seconds: float = Field(
        default=30.0,
        ge=0,
        validation_alias="JWKS_MIN_REFRESH_SECONDS",
        description="Least time between two fetches of the key set on an unknown 'kid'.",
    )
    jwks_max_age_seconds: float = Field(
        default=3600.0,
        gt=0,
        validation_alias="JWKS_MAX_AGE_SECONDS",
        description="The key set is fetched again when older than this, so that keys the "
        "issuer retired stop being accepted.",
    )
    operator_username: str | None = Field(
        default=None,
        max_length=128,
        validation_alias="OPERATOR_USERNAME",
        description="HTTP Basic user name of operators (all instances); unset: only the "
        "broker credentials and the operator token scope.",
    )
    operator_password: SecretStr | None = Field(default=None, validation_alias="OPERATOR_PASSWORD")
    jwt_leeway_seconds: int = Field(default=30, ge=0, le=600, validation_alias="JWT_LEEWAY_SECONDS")
    http_timeout_seconds: float = Field(default=10.0, gt=0, validation_alias="AUTH_HTTP_TIMEOUT")
    min_plan_interval_seconds: int = Field(
        default=3600,
        ge=0,
        validation_alias="MIN_PLAN_INTERVAL_SECONDS",
        description="Least time between two fires of a plan's cron frequency.",
    )
    job_log_max_bytes: int = Field(
        default=16 * 1024,
        ge=256,
        le=1024 * 1024,
        validation_alias="JOB_LOG_MAX_BYTES",
        description="Each stage log of a job is cut to its last N bytes in API answers.",
    )
    job_logs_total_max_bytes: int = Field(
        default=1024 * 1024,
        ge=4096,
        le=64 * 1024 * 1024,
        validation_alias="JOB_LOGS_TOTAL_MAX_BYTES",
        description="All stage logs of one job answer together stay under about this many "
        "bytes: with many items each log gets an equal, smaller share (at least 256 bytes).",
    )
    validate_timeout_seconds: float = Field(
        default=60.0, gt=0, validation_alias="DESTINATION_VALIDATE_TIMEOUT"
    )
    retention_confirm_fraction: float = Field(
        default=0.5,
        ge=0,
        le=1,
        validation_alias="RETENTION_CONFIRM_FRACTION",
        description="A plan change whose retention would delete more than this share of the "
        "plan's restore points at once needs ?confirm=true (409 confirmation_required).",
    )
    retention_confirm_min_points: int = Field(
        default=2,
        ge=1,
        validation_alias="RETENTION_CONFIRM_MIN_POINTS",
        description="... and at least this many of them.",
    )

    @field_validator(
        "oidc_issuer",
        "oidc_jwks_url",
        "oidc_audience",
        "operator_scope",
        "cloud_controller_url",
        "operator_username",
    )
    @classmethod
    def _empty_is_none(cls, v: str | None) -> str | None:
        return v or None

    @model_validator(mode="after")
    def _operator_pair(self) -> ApiSettings:
        password = self.operator_password.get_secret_value() if self.operator_password else ""
        if bool(self.operator_username) != bool(password):
            raise ValueError("set OPERATOR_USERNAME and OPERATOR_PASSWORD together")
        if password and len(password) < 12:
            raise ValueError("OPERATOR_PASSWORD must be at least 12 characters")
        return self


def load_api_settings() -> ApiSettings:
    """The API settings from the environment, or :class:`backup.settings.ConfigError` naming
    each bad one."""
    return load_settings(ApiSettings, part="API")
