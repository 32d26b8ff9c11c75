"""``GET /metrics``: Prometheus text format, for operators.

Two kinds of figures:

- Counters and histograms of *this replica* (jobs started and finished, durations, fire lag,
  agent errors, bytes stored, take-overs, retention deletions). Prometheus scrapes every
  replica; sum over them for the service.
- Gauges read from the database at scrape time (``backup_jobs{status}``, the oldest queued
  job's age, RUNNING jobs whose lease expired, restore points stuck in ``deleting``, jobs with
  files left to delete). They are the same on every replica: they describe the shared queue,
  which per-replica counters cannot (a job queued by one replica is run by another). Each is
  a count over an indexed field, bounded by a timeout; if the database does not answer,
  ``backup_metrics_database_up`` is 0 and the gauges keep their last values.

Protection (``backup.protection``, docs/protection.md), from the summary the background
evaluator writes with each evaluation of the fleet (a small document, and the per-plan rows
in a second), whatever the fleet's size: ``backup_instances_protection{state}`` counts
instances per state, and ``backup_protection_evaluation_age_seconds`` says how long ago the
fleet was evaluated (an evaluator that stopped shows here). Per plan, unless
``METRICS_PER_PLAN=false`` (very large fleets), with labels ``instance_id`` and ``plan_id``:
``backup_plan_last_good_backup_timestamp_seconds`` (unix time of the newest good restore
point; 0: none), ``backup_plan_protection_state{state}`` (1 for the plan's state, 0 for the
two others) and ``backup_plan_rpo_seconds`` (the objective in force).

Apart from those two ids, the endpoint exposes counts and durations only: no names, no
URLs, no credentials. It needs no authentication by default (scrapers usually have none);
set ``METRICS_USERNAME`` and ``METRICS_PASSWORD`` to require HTTP Basic.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import structlog
from aiohttp import BasicAuth, web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from pymongo.errors import PyMongoError

from backup import protection
from backup.database import Database
from backup.jobs import JobStatus
from backup.protection import ProtectionState
from backup.retention import SweepResult
from backup.runner import JobRunner, RunnerObserver
from backup.settings import load_settings
from broker.context import DATABASE, RUNNER
from scheduler import SchedulerObserver

log = structlog.get_logger(__name__)

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 21600, 43200)
LAG_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600)


class MetricsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    username: str | None = Field(default=None, validation_alias="METRICS_USERNAME")
    password: SecretStr | None = Field(default=None, validation_alias="METRICS_PASSWORD")
    db_timeout_seconds: float = Field(
        default=5.0, gt=0, validation_alias="METRICS_DB_TIMEOUT_SECONDS"
    )
    per_plan: bool = Field(default=True, validation_alias="METRICS_PER_PLAN")
    """Per-plan protection series (three per plan, plus one per state); off for very large
    fleets, where the per-state instance counts remain."""


class PlanProtectionCollector(Collector):
    """The per-plan protection gauges, built at collection from the rows the last scrape
    read (prometheus_client collects synchronously; the database is read before)."""

    def __init__(self) -> None:
        self.rows: list[list[Any]] = []
        """[instance id, plan id, state, newest good point's time, objective] per plan."""

    def collect(self) -> Iterable[Metric]:
        labels = ["instance_id", "plan_id"]
        last_good = GaugeMetricFamily(
            "backup_plan_last_good_backup_timestamp_seconds",
            "Unix time of the plan's newest good restore point (0: none).",
            labels=labels,
        )
        state = GaugeMetricFamily(
            "backup_plan_protection_state",
            "1 for the plan's protection state (protected, at_risk, unprotected), else 0.",
            labels=[*labels, "state"],
        )
        rpo = GaugeMetricFamily(
            "backup_plan_rpo_seconds", "The plan's recovery point objective.", labels=labels
        )
        for instance_id, plan_id, plan_state, at, objective in self.rows:
            ids = [str(instance_id), str(plan_id)]
            last_good.add_metric(ids, at.timestamp() if isinstance(at, datetime) else 0.0)
            for name in tuple(ProtectionState):
                state.add_metric([*ids, name], 1.0 if plan_state == name else 0.0)
            rpo.add_metric(ids, float(objective or 0))
        return [last_good, state, rpo]


class Metrics(RunnerObserver, SchedulerObserver):
    """The registry of one app (not the global one: several apps may share a process); the
    observer of its job runner, scheduler and retention sweeper."""

    def __init__(self, *, per_plan: bool = True) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.jobs_started = Counter(
            "backup_jobs_started_total",
            "Jobs this replica claimed from the queue.",
            ["type", "trigger"],
            registry=r,
        )
        self.jobs_finished = Counter(
            "backup_jobs_finished_total",
            "Jobs this replica ended, by final status.",
            ["type", "status"],
            registry=r,
        )
        self.job_duration = Histogram(
            "backup_job_duration_seconds",
            "Time from a job's start to its end.",
            ["type", "status"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.fire_lag = Histogram(
            "backup_job_fire_lag_seconds",
            "Time from a scheduled job's fire time to its start on an agent.",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.agent_errors = Counter(
            "backup_agent_errors_total",
            "Failed exchanges with agents (unreachable, unauthorized, rejected, busy, "
            "not_found, bad_response).",
            ["reason"],
            registry=r,
        )
        self.stored = Counter(
            "backup_stored_bytes_total",
            "Bytes of backups confirmed in storage (after compression and encryption).",
            registry=r,
        )
        self.takeovers = Counter(
            "backup_job_takeovers_total",
            "RUNNING jobs taken over from a replica that stopped renewing its lease.",
            registry=r,
        )
        self.retention_deleted = Counter(
            "backup_retention_deleted_total",
            "Restore points deleted by retention.",
            registry=r,
        )
        self.retention_deleted_bytes = Counter(
            "backup_retention_deleted_bytes_total",
            "Stored bytes freed by retention.",
            registry=r,
        )
        self.retention_failures = Counter(
            "backup_retention_failures_total",
            "Deletions that failed (storage unreachable...) and wait for the next sweep.",
            registry=r,
        )
        self.orphans_deleted = Counter(
            "backup_failed_job_objects_deleted_total",
            "Objects uploaded by failed or cancelled backups, deleted by the sweep.",
            registry=r,
        )
        self.jobs_pruned = Counter(
            "backup_job_records_pruned_total",
            "Records of jobs ended longer ago than JOB_HISTORY_DAYS, deleted by the sweep.",
            registry=r,
        )
        self.scheduler_fires = Counter(
            "backup_scheduler_fires_total",
            "Jobs this replica's scheduler queued for plan fires (SCHEDULE, CATCH_UP).",
            ["trigger"],
            registry=r,
        )
        self.scheduler_lag = Histogram(
            "backup_scheduler_queue_lag_seconds",
            "Time from a plan's fire time to its job being queued.",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.scheduler_missed = Counter(
            "backup_scheduler_missed_fires_total",
            "Fires recorded as MISSED by this replica's scheduler (misfire policy).",
            registry=r,
        )
        self.jobs = Gauge("backup_jobs", "Jobs in the database, by status.", ["status"], registry=r)
        self.oldest_queued = Gauge(
            "backup_jobs_oldest_queued_seconds",
            "Age of the oldest QUEUED job (0 when none).",
            registry=r,
        )
        self.lease_expired = Gauge(
            "backup_jobs_lease_expired",
            "RUNNING jobs whose holder stopped renewing (about to be taken over).",
            registry=r,
        )
        self.points_deleting = Gauge(
            "backup_restore_points_deleting",
            "Restore points whose deletion failed and is retried by the sweep.",
            registry=r,
        )
        self.pending_deletes = Gauge(
            "backup_jobs_with_pending_deletes",
            "Failed backups whose uploaded files still wait to be deleted.",
            registry=r,
        )
        self.active = Gauge(
            "backup_runner_active_jobs", "Jobs this replica drives now.", registry=r
        )
        self.window = Gauge(
            "backup_runner_claim_window",
            "Jobs this replica may drive at once now: its claim window, at most "
            "RUNNER_CONCURRENCY, halved each time the scheduler is behind.",
            registry=r,
        )
        self.instances_protection = Gauge(
            "backup_instances_protection",
            "Live instances by protection state, as last evaluated.",
            ["state"],
            registry=r,
        )
        self.protection_age = Gauge(
            "backup_protection_evaluation_age_seconds",
            "Time since the fleet's protection was last evaluated (0 when never).",
            registry=r,
        )
        self.plan_protection = PlanProtectionCollector()
        self.per_plan = per_plan
        if per_plan:
            r.register(self.plan_protection)
        self.db_up = Gauge(
            "backup_metrics_database_up",
            "1 if the database answered the last scrape's queries.",
            registry=r,
        )

    # -- RunnerObserver

    def job_started(self, job_type: str, trigger: str, lag_seconds: float | None) -> None:
        self.jobs_started.labels(job_type or "unknown", trigger or "unknown").inc()
        if lag_seconds is not None:
            self.fire_lag.observe(lag_seconds)

    def job_finished(self, job_type: str, status: str, seconds: float | None) -> None:
        self.jobs_finished.labels(job_type, status).inc()
        if seconds is not None:
            self.job_duration.labels(job_type, status).observe(max(0.0, seconds))

    def agent_error(self, reason: str) -> None:
        self.agent_errors.labels(reason).inc()

    def bytes_stored(self, nbytes: int) -> None:
        self.stored.inc(max(0, nbytes))

    def takeover(self) -> None:
        self.takeovers.inc()

    # -- the scheduler's observer (scheduler.SchedulerObserver)

    def fired(self, trigger: str, lag_seconds: float) -> None:
        self.scheduler_fires.labels(trigger).inc()
        self.scheduler_lag.observe(max(0.0, lag_seconds))

    def missed(self, fires: int) -> None:
        self.scheduler_missed.inc(max(0, fires))

    def swept(self, result: SweepResult) -> None:
        self.retention_deleted.inc(result.deleted)
        self.retention_deleted_bytes.inc(result.deleted_bytes)
        self.retention_failures.inc(result.failed)
        self.orphans_deleted.inc(result.orphans_deleted)
        self.jobs_pruned.inc(result.jobs_pruned)

    # -- scrape

    async def refresh(self, store: Database, timeout: float, runner: JobRunner | None) -> None:
        """The gauges, from ``runner`` (None on a replica that runs none) and the database."""
        self.active.set(runner.active if runner is not None else 0)
        self.window.set(runner.window.jobs if runner is not None else 0)
        try:
            async with asyncio.timeout(timeout):
                counts = await asyncio.gather(
                    *(store.jobs.count_documents({"status": s}) for s in tuple(JobStatus))
                )
                now = datetime.now(UTC)
                oldest = await store.jobs.find_one(
                    {"status": "QUEUED"}, {"created_at": 1}, sort=[("created_at", 1)]
                )
                expired = await store.jobs.count_documents(
                    {"status": "RUNNING", "lease_expires_at": {"$lt": now}}
                )
                deleting = await store.restore_points.count_documents({"state": "deleting"})
                pending = await store.jobs.count_documents(
                    {"pending_deletes.destination_id": {"$exists": True}}
                )
                protected = await self._protection(store)
        except (PyMongoError, TimeoutError) as exc:
            log.warning("metrics_database_unavailable", error=type(exc).__name__)
            self.db_up.set(0)
            return
        for status, n in zip(tuple(JobStatus), counts, strict=True):
            self.jobs.labels(status).set(n)
        age = (now - oldest["created_at"]).total_seconds() if oldest else 0.0
        self.oldest_queued.set(max(0.0, age))
        self.lease_expired.set(expired)
        self.points_deleting.set(deleting)
        self.pending_deletes.set(pending)
        by_state, evaluated_at, rows = protected
        for name in tuple(ProtectionState):
            self.instances_protection.labels(name).set(by_state.get(name, 0))
        age = (now - evaluated_at).total_seconds() if evaluated_at else 0.0
        self.protection_age.set(max(0.0, age))
        if self.per_plan:
            self.plan_protection.rows = rows
        self.db_up.set(1)

    async def _protection(
        self, store: Database
    ) -> tuple[dict[str, int], datetime | None, list[list[Any]]]:
        """Instances per state, when the fleet was last evaluated and (per plan) a row per
        plan: one document the evaluator writes (backup.protection.summary), whatever the
        number of plans."""
        found = await protection.summary(store, plans=self.per_plan)
        if found is None:
            return {}, None, []
        at = found.get("evaluated_at")
        rows = found.get("plans") or []
        return dict(found.get("by_state") or {}), at if isinstance(at, datetime) else None, rows


METRICS = web.AppKey("metrics", Metrics)
METRICS_SETTINGS = web.AppKey("metrics_settings", MetricsSettings)


def _authorized(request: web.Request, settings: MetricsSettings) -> bool:
    if not settings.password:
        return True
    header = request.headers.get("Authorization", "")
    try:
        given = BasicAuth.decode(header)
    except ValueError:
        return False
    ok_user = hmac.compare_digest(given.login.encode(), (settings.username or "").encode())
    ok_pw = hmac.compare_digest(
        given.password.encode(), settings.password.get_secret_value().encode()
    )
    return ok_user and ok_pw


async def metrics(request: web.Request) -> web.Response:
    settings = request.app[METRICS_SETTINGS]
    if not _authorized(request, settings):
        return web.json_response(
            {"error": "unauthorized", "description": "Send the metrics credentials (HTTP Basic)."},
            status=401,
            headers={"WWW-Authenticate": 'Basic realm="metrics"'},
        )
    figures = request.app[METRICS]
    await figures.refresh(
        request.app[DATABASE], settings.db_timeout_seconds, request.app.get(RUNNER)
    )
    return web.Response(
        body=generate_latest(figures.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def setup(app: web.Application) -> None:
    """Serve ``GET /metrics``; the registry (``app[METRICS]``) observes the background parts."""
    settings = app[METRICS_SETTINGS] = load_settings(MetricsSettings, part="metrics")
    app[METRICS] = Metrics(per_plan=settings.per_plan)
    app.router.add_get("/metrics", metrics)
