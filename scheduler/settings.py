"""Settings of a replica's scheduler, from environment variables (documented defaults).

See docs/scheduling.md for what each one changes in behaviour.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from backup.settings import load_settings


class SchedulerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    enabled: bool = Field(
        default=True,
        validation_alias="SCHEDULER_ENABLED",
        description="Run the scheduler on this replica. Any number of replicas may run it: "
        "the database makes sure each fire gets exactly one job.",
    )
    lease_seconds: float = Field(
        default=15.0,
        ge=0.0,
        le=600.0,
        validation_alias="SCHEDULER_LEASE_SECONDS",
        description="One replica's scheduler leads (reads due plans, writes their jobs) under "
        "a lease of this length in the database; the others stand by and one takes over at "
        "most this long after the leader stops renewing. 0: no leader, every replica "
        "schedules (still one job per fire, at the price of refused duplicate writes).",
    )
    poll_seconds: float = Field(
        default=5.0,
        gt=0,
        le=300.0,
        validation_alias="SCHEDULER_POLL_SECONDS",
        description="The longest the scheduler sleeps without looking at the database. It "
        "wakes at once for a fire it knows of and for a plan changed on this replica; this "
        "bounds how late it notices a plan created or changed on a replica that runs no "
        "scheduler. Each look is one indexed query over the plans due within this window.",
    )
    misfire_threshold_seconds: float = Field(
        default=120.0,
        ge=1.0,
        le=86_400.0,
        validation_alias="SCHEDULER_MISFIRE_THRESHOLD_SECONDS",
        description="A fire handled at most this late runs as an ordinary SCHEDULE job. Later "
        "than this it is a misfire (no scheduler was running at its time) and the misfire "
        "policy applies.",
    )
    misfire_grace_seconds: float = Field(
        default=3600.0,
        ge=0.0,
        validation_alias="SCHEDULER_MISFIRE_GRACE_SECONDS",
        description="Misfire policy: of the fires a plan missed, the most recent one still runs, "
        "once, as a CATCH_UP job when it is at most this late; every other missed fire is "
        "recorded in a MISSED job. 0: never catch up, record every missed fire as MISSED.",
    )
    pass_interval_seconds: float = Field(
        default=0.25,
        ge=0.0,
        le=60.0,
        validation_alias="SCHEDULER_PASS_INTERVAL_SECONDS",
        description="At busy times (the last pass found due plans) the next pass starts this "
        "long (+-20%) after the last one instead of at the next fire's instant: the fires due "
        "meanwhile are written together (a few large database writes instead of many small "
        "ones) and replicas stop racing for the same fires, at the price of at most this much "
        "extra lag. 0: a pass at every fire's instant.",
    )
    batch_size: int = Field(
        default=500,
        ge=1,
        le=10_000,
        validation_alias="SCHEDULER_BATCH_SIZE",
        description="Due plans read, and their jobs written, per database round trip.",
    )
    error_backoff_seconds: float = Field(
        default=5.0,
        gt=0,
        le=600.0,
        validation_alias="SCHEDULER_ERROR_BACKOFF_SECONDS",
        description="Wait after a failed pass (database unreachable) before the next one.",
    )


def load_scheduler_settings() -> SchedulerSettings:
    """The scheduler settings from the environment, or :class:`backup.settings.ConfigError`
    (a ``ValueError``) naming each bad one."""
    return load_settings(SchedulerSettings, part="scheduler")
