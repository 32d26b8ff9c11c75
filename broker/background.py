"""Background work of a manager replica: the scheduler, the job runner and the retention sweep.

Each replica gets a fresh id when its app is created (host, pid and a random part: a
restarted replica never mistakes its predecessor's leases for its own). Each background part
is one cleanup context of the app (aiohttp starts them in order after the database is
ready, and stops them in reverse order):

1. the work database: the runner's and sweeper's own connection pool,
2. the retention sweeper (``backup.retention.RetentionSweeper``), periodic,
3. the job runner (``backup.runner.JobRunner``), which claims and drives jobs; the
   ``jobs_queued`` event wakes it, so this replica reacts at once to its own writes,
4. the scheduler (``scheduler.Scheduler``, unless its settings disable it), which turns due
   plans into QUEUED jobs; it listens to ``plans_changed`` itself.
5. the webhook deliverer (``backup.webhooks.WebhookDeliverer``), and the protection
   evaluator (``backup.protection.ProtectionEvaluator``), which re-evaluates every instance's
   protection periodically and when this replica ends a job or a plan changes.

Other replicas notice those writes on their next poll. The parts are stored under the app
keys of ``broker.context``.

On shutdown (SIGTERM) the scheduler stops first (no new jobs), then the runner stops driving
and *releases* its leases (their expiry is set to now), so another replica, or this one once
restarted, resumes those jobs at once; the agents keep running them meanwhile and are
re-attached by job id. A replica killed without a shutdown simply stops renewing: its jobs
are taken over when the lease expires (``RUNNER_LEASE_SECONDS``). Either way no job is left
RUNNING without a live holder for longer than one lease.

``BACKGROUND_ENABLED=false`` runs a replica that serves HTTP only; so does the in-process
test service unless a test asks for the loops (``create_app(..., run_background=True)``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import structlog
from aiohttp import web
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from backup.protection import ProtectionEvaluator, ProtectionSettings
from backup.retention import RetentionSweeper
from backup.runner import JobRunner, RunnerSettings, new_replica_id
from backup.settings import load_settings
from backup.webhooks import WebhookDeliverer, WebhookSettings
from broker import metrics
from broker.context import (
    DATABASE,
    REPLICA_ID,
    RUNNER,
    RUNNER_SETTINGS,
    SCHEDULER,
    SCHEDULER_SETTINGS,
    SECRETS,
    STORE_OPENER,
    SWEEPER,
    WORK_DATABASE,
)
from scheduler import Scheduler, SchedulerSettings

log = structlog.get_logger(__name__)

WEBHOOK_SETTINGS = web.AppKey("webhook_settings", WebhookSettings)
WEBHOOK_DELIVERER = web.AppKey("webhook_deliverer", WebhookDeliverer)
PROTECTION_SETTINGS = web.AppKey("protection_settings", ProtectionSettings)
PROTECTION_EVALUATOR = web.AppKey("protection_evaluator", ProtectionEvaluator)


class BackgroundSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    enabled: bool = Field(
        default=True,
        validation_alias="BACKGROUND_ENABLED",
        description="Run the scheduler, job runner and retention sweep on this replica.",
    )


def setup(app: web.Application, *, enabled: bool | None = None) -> None:
    """Start the replica's background parts with the app and stop them with it; also serves
    ``GET /metrics`` (their figures). ``enabled``: run them (default: ``BACKGROUND_ENABLED``).

    Every setting is read here, so that a bad value stops the service before anything
    starts (:class:`backup.settings.ConfigError` naming the variable)."""
    metrics.setup(app)
    app[RUNNER_SETTINGS] = load_settings(RunnerSettings, part="runner")
    from_env = load_settings(BackgroundSettings, part="background").enabled
    app[SCHEDULER_SETTINGS] = load_settings(SchedulerSettings, part="scheduler")
    app[WEBHOOK_SETTINGS] = load_settings(WebhookSettings, part="webhook")
    app[PROTECTION_SETTINGS] = load_settings(ProtectionSettings, part="protection")
    app[REPLICA_ID] = new_replica_id()
    if not (from_env if enabled is None else enabled):
        app.cleanup_ctx.append(http_only)
        return
    app.cleanup_ctx.extend([work_database, retention_sweeper, job_runner, plan_scheduler])
    app.cleanup_ctx.append(webhook_deliverer)
    app.cleanup_ctx.append(protection_evaluator)


async def http_only(app: web.Application) -> AsyncIterator[None]:
    """A replica that runs no background part says so once started."""
    log.info("background_disabled", replica=app[REPLICA_ID])
    yield


async def work_database(app: web.Application) -> AsyncIterator[None]:
    """The runner's and sweeper's own pool: however many jobs run, they cannot take every
    turn of the database from the scheduler (see RUNNER_DB_CONNECTIONS). Closed last."""
    work = app[WORK_DATABASE] = app[DATABASE].pool(app[RUNNER_SETTINGS].db_connections)
    yield
    await work.close()
    log.info("background_stopped", replica=app[REPLICA_ID])


async def retention_sweeper(app: web.Application) -> AsyncIterator[None]:
    settings = app[RUNNER_SETTINGS]
    sweeper = app[SWEEPER] = RetentionSweeper(
        app[WORK_DATABASE],
        app[SECRETS],
        interval=settings.retention_sweep_seconds,
        storage_timeout=settings.storage_timeout_seconds,
        opener=app[STORE_OPENER],
        observer=app[metrics.METRICS].swept,
        job_history_days=settings.job_history_days,
        audit_retention_days=settings.audit_retention_days,
    )
    if settings.retention_enabled:
        await sweeper.start()
    yield
    await sweeper.stop()


async def job_runner(app: web.Application) -> AsyncIterator[None]:
    settings = app[RUNNER_SETTINGS]
    runner = app[RUNNER] = JobRunner(
        app[WORK_DATABASE],
        app[SECRETS],
        settings,
        replica_id=app[REPLICA_ID],
        opener=app[STORE_OPENER],
        observer=app[metrics.METRICS],
        sweeper=app[SWEEPER],
    )
    events = app[DATABASE].events
    if settings.enabled:
        events.jobs_queued.connect(runner.wake)
        await runner.start()
    yield
    events.jobs_queued.disconnect(runner.wake)
    await runner.stop()


async def plan_scheduler(app: web.Application) -> AsyncIterator[None]:
    """Started last, stopped first: no new job is queued while the runner lets go of its
    leases. A failure to stop is logged and does not keep the runner from stopping."""
    replica_id, settings = app[REPLICA_ID], app[SCHEDULER_SETTINGS]
    runner_settings = app[RUNNER_SETTINGS]
    if settings.enabled:
        scheduler = app[SCHEDULER] = Scheduler(
            app[DATABASE], settings, replica_id=replica_id, observer=app[metrics.METRICS]
        )
        await scheduler.start()
    else:
        log.info("scheduler_not_running", replica=replica_id)
    log.info(
        "background_started",
        replica=replica_id,
        scheduler=settings.enabled,
        runner=runner_settings.enabled,
        retention=runner_settings.retention_enabled,
    )
    yield
    if settings.enabled:
        try:
            await app[SCHEDULER].stop()
        except Exception:
            log.exception("scheduler_stop_failed")


async def webhook_deliverer(app: web.Application) -> AsyncIterator[None]:
    """Sends the webhook outbox's due deliveries (backup.webhooks); on shutdown it lets the
    attempts in flight end, and a delivery it could not finish is sent again later."""
    settings = app[WEBHOOK_SETTINGS]
    deliverer = app[WEBHOOK_DELIVERER] = WebhookDeliverer(
        app[DATABASE], app[SECRETS], settings, replica_id=app[REPLICA_ID]
    )
    if settings.enabled:
        await deliverer.start()
    yield
    if settings.enabled:
        await deliverer.stop()


async def protection_evaluator(app: web.Application) -> AsyncIterator[None]:
    """Re-evaluates every instance's protection (backup.protection) periodically, and soon
    after this replica ends a job or a plan changes; stored for the fleet view and the
    metrics, each change a protection.changed event."""
    settings = app[PROTECTION_SETTINGS]
    evaluator = app[PROTECTION_EVALUATOR] = ProtectionEvaluator(app[WORK_DATABASE], settings)
    events = app[DATABASE].events
    if settings.enabled:
        events.plans_changed.connect(evaluator.wake)
        events.jobs_ended.connect(evaluator.wake)
        await evaluator.start()
    yield
    if settings.enabled:
        events.plans_changed.disconnect(evaluator.wake)
        events.jobs_ended.disconnect(evaluator.wake)
        await evaluator.stop()
