"""Background work of a manager replica: the scheduler, the job runner and the retention sweep.

On start-up each replica gets a fresh id (host, pid and a random part: a restarted replica
never mistakes its predecessor's leases for its own), then starts

- the scheduler (``scheduler.Scheduler``, unless its settings disable it), which turns due
  plans into QUEUED jobs,
- the job runner (``backup.runner.JobRunner``), which claims and drives jobs,
- the retention sweeper (``backup.retention.RetentionSweeper``), periodic,

and connects the in-process signals (``plans_changed`` wakes the scheduler, ``jobs_queued``
wakes the runner) so this replica reacts at once to its own writes; other replicas notice on
their next poll. All three are stored under app keys.

On shutdown (SIGTERM) the scheduler stops first (no new jobs), then the runner stops driving
and *releases* its leases (their expiry is set to now), so another replica, or this one once
restarted, resumes those jobs at once; the agents keep running them meanwhile and are
re-attached by job id. A replica killed without a shutdown simply stops renewing: its jobs
are taken over when the lease expires (``RUNNER_LEASE_SECONDS``). Either way no job is left
RUNNING without a live holder for longer than one lease.

``BACKGROUND_ENABLED=false`` runs a replica that serves HTTP only. The in-process test
service sets ``app[LOOPS_ENABLED] = False`` unless a test asks for the loops.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import structlog
from aiohttp import web
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from backup.retention import RetentionSweeper
from backup.runner import JobRunner, load_runner_settings, new_replica_id
from broker import metrics
from broker.config import ConfigError
from broker.context import DATABASE, SECRETS
from scheduler import Scheduler, SchedulerSettings, load_scheduler_settings
from storage import open_store

log = structlog.get_logger(__name__)

LOOPS_ENABLED = web.AppKey("background_loops_enabled", bool)
REPLICA_ID = web.AppKey("replica_id", str)
RUNNER = web.AppKey("job_runner", JobRunner)
SWEEPER = web.AppKey("retention_sweeper", RetentionSweeper)
SCHEDULER = web.AppKey("scheduler", Scheduler)


class BackgroundSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    enabled: bool = Field(
        default=True,
        validation_alias="BACKGROUND_ENABLED",
        description="Run the scheduler, job runner and retention sweep on this replica.",
    )


def _scheduler_settings() -> SchedulerSettings | None:
    """The scheduler's settings when they enable it (a bad setting is a ConfigError)."""
    try:
        settings = load_scheduler_settings()
    except (ValueError, ValidationError) as exc:
        raise ConfigError(str(exc)) from None
    return settings if settings.enabled else None


def setup(app: web.Application) -> None:
    """Start the replica's background loops with the app and stop them with it; also serves
    ``GET /metrics`` (the loops' figures)."""
    observer = metrics.setup(app)
    try:  # a bad value stops the service at start-up, naming the variable
        settings = load_runner_settings()
        enabled_by_env = BackgroundSettings().enabled
    except (ValueError, ValidationError) as exc:
        raise ConfigError(str(exc)) from None
    scheduler_settings = _scheduler_settings()

    async def loops(app: web.Application) -> AsyncIterator[None]:
        replica_id = new_replica_id()
        app[REPLICA_ID] = replica_id
        enabled = app.get(LOOPS_ENABLED)
        if enabled is None:
            enabled = enabled_by_env
        if not enabled:
            log.info("background_disabled", replica=replica_id)
            yield
            return
        from broker.api.routes import OPENER

        store, box = app[DATABASE], app[SECRETS]
        opener = app.get(OPENER, open_store)
        # The runner's and sweeper's own pool: however many jobs run, they cannot take every
        # turn of the database from the scheduler (see RUNNER_DB_CONNECTIONS).
        work_store = store.pool(settings.db_connections)
        sweeper = RetentionSweeper(
            work_store,
            box,
            interval=settings.retention_sweep_seconds,
            storage_timeout=settings.storage_timeout_seconds,
            opener=opener,
            observer=observer.swept,
        )
        runner = JobRunner(
            work_store,
            box,
            settings,
            replica_id=replica_id,
            opener=opener,
            observer=observer,
            sweeper=sweeper,
        )
        observer.runner_active = lambda: runner.active
        observer.runner_window = lambda: runner.window.jobs
        scheduler = None
        if scheduler_settings is not None:
            scheduler = Scheduler(
                store, scheduler_settings, replica_id=replica_id, observer=observer
            )
        else:
            log.info("scheduler_not_running", replica=replica_id)
        app[SWEEPER], app[RUNNER] = sweeper, runner
        if scheduler is not None:
            app[SCHEDULER] = scheduler
            await scheduler.start()  # it listens to the plans_changed event itself
        if settings.enabled:
            store.events.jobs_queued.connect(runner.wake)
            await runner.start()
        if settings.retention_enabled:
            await sweeper.start()
        log.info(
            "background_started",
            replica=replica_id,
            scheduler=scheduler is not None,
            runner=settings.enabled,
            retention=settings.retention_enabled,
        )
        try:
            yield
        finally:
            if scheduler is not None:
                try:
                    await scheduler.stop()
                except Exception:
                    log.exception("scheduler_stop_failed")
            store.events.jobs_queued.disconnect(runner.wake)
            await runner.stop()
            await sweeper.stop()
            await work_store.close()
            log.info("background_stopped", replica=replica_id)

    app.cleanup_ctx.append(loops)
