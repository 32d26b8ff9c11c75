"""Webhooks: an instance's notifications, delivered from a durable outbox.

An instance may register webhooks (a URL, the events wanted, a secret). When something
happens that a webhook wants (a job succeeded or failed, the protection state changed, a
drill failed, a restore point expired or was deleted), :func:`emit` writes one *delivery*
per matching webhook into the database (the outbox), all carrying the same event id, before
it returns. A background loop on every replica (:class:`WebhookDeliverer`) claims due
deliveries with a lease, POSTs them and records each attempt; a failed attempt is retried
with exponential backoff (the next attempt's time is in the database, so retries survive a
restart) until ``WEBHOOK_MAX_ATTEMPTS``, after which the delivery is marked ``failed``.
A replica killed while it delivers leaves its lease to expire and another (or itself,
restarted) sends the same event again: receivers see an event at least once, and a
duplicate always with the same id.

Deliveries are CloudEvents 1.0 in structured JSON mode, signed as the Standard Webhooks
specification says (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``); see
``docs/webhooks.md`` for the verification recipe.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import random
import ssl
import uuid
from collections.abc import Callable
from datetime import date, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any
from urllib.parse import urlsplit

import aiohttp
import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pymongo.errors import BulkWriteError, PyMongoError

from backup.clock import Clock, SystemClock
from backup.database import SCHEMA_VERSION, Database, Document
from backup.errors import Conflict, InvalidInput, NotFound
from backup.merge_patch import merge_patch
from backup.pagination import Page, now, paginate
from backup.secrets import SecretBox, SecretKeyError
from storage import egress
from storage.base import EgressDenied

log = structlog.get_logger(__name__)

EVENT_TYPE_PREFIX = "io.osbbackup."
SPEC_VERSION = "1.0"


class EventType(StrEnum):
    """The events a webhook may ask for; the CloudEvents ``type`` is the value prefixed with
    ``io.osbbackup.`` (``io.osbbackup.job.succeeded``)."""

    JOB_SUCCEEDED = "job.succeeded"
    JOB_FAILED = "job.failed"
    PROTECTION_CHANGED = "protection.changed"
    DRILL_FAILED = "drill.failed"
    RESTORE_POINT_EXPIRED = "restore_point.expired"
    RESTORE_POINT_DELETED = "restore_point.deleted"

    @property
    def cloudevents_type(self) -> str:
        return EVENT_TYPE_PREFIX + self.value


class DeliveryState(StrEnum):
    PENDING = "pending"
    """Waiting for its next attempt (``next_attempt_at``), the first one included."""
    DELIVERING = "delivering"
    """Claimed by a replica (``lease_owner`` until ``lease_expires_at``)."""
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    """Given up after ``WEBHOOK_MAX_ATTEMPTS`` attempts, or undeliverable (webhook gone)."""


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, StrEnum):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def source(instance_id: str) -> str:
    """The CloudEvents ``source`` of an instance's events."""
    return f"/v1/service_instances/{instance_id}"


def event_body(
    event_id: str,
    instance_id: str,
    event_type: EventType,
    subject: str,
    data: dict[str, Any],
    at: datetime,
) -> str:
    """The CloudEvents 1.0 structured-mode JSON of one event: the exact bytes every attempt
    of every delivery of the event sends."""
    event = {
        "specversion": SPEC_VERSION,
        "id": event_id,
        "source": source(instance_id),
        "type": event_type.cloudevents_type,
        "subject": subject,
        "time": at.isoformat().replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": data,
    }
    return json.dumps(event, default=_json_default, separators=(",", ":"), ensure_ascii=False)


async def emit(
    db: Database,
    instance_id: str,
    event_type: EventType,
    subject: str,
    data: dict[str, Any],
    *,
    event_id: str | None = None,
) -> bool:
    """Record an event for delivery to every enabled webhook of ``instance_id`` that wants
    ``event_type``: one outbox row each, written before this returns, all with the same event
    id. Never raises for a database failure or a bad ``data`` (it is logged): a notification
    that cannot be queued must not fail the change that caused it.

    ``subject``: what the event is about (a job's, plan's or restore point's id);
    ``data``: JSON-serialisable details (datetimes become ISO 8601 strings);
    ``event_id``: given for an event that may be emitted again after a crash (see
    :func:`requeue_job_events`): each webhook then gets it once, whoever emits it.
    Answers whether the event is queued (or nobody wants it).
    """
    try:
        hooks = await db.webhooks.find(
            {"instance_id": instance_id, "enabled": True, "events": str(event_type)},
            {"_id": 1},
        ).to_list(None)
        if not hooks:
            return True
        at = now()
        fixed = event_id is not None
        event_id = event_id or str(uuid.uuid4())
        body = event_body(event_id, instance_id, event_type, subject, data, at)
        rows: list[Document] = [
            {
                "_id": f"{hook['_id']}:{event_id}" if fixed else str(uuid.uuid4()),
                "schema_version": SCHEMA_VERSION,
                "created_at": at,
                "instance_id": instance_id,
                "webhook_id": hook["_id"],
                "event_id": event_id,
                "event_type": str(event_type),
                "subject": subject,
                "body": body,
                "state": str(DeliveryState.PENDING),
                "next_attempt_at": at,
                "attempts": 0,
                "claims": 0,
                "attempt_log": [],
                "lease_owner": None,
                "lease_expires_at": None,
            }
            for hook in hooks
        ]
        try:
            await db.webhook_deliveries.insert_many(rows, ordered=False)
        except BulkWriteError as exc:
            # an event emitted again (after a crash) that a webhook already has: not twice
            if any(e.get("code") != 11000 for e in exc.details.get("writeErrors", [])):
                raise
        _wake_deliverers()
    except Exception:
        log.exception(
            "webhook_emit_failed",
            instance_id=instance_id,
            event_type=str(event_type),
            subject=subject,
        )
        return False
    log.info(
        "webhook_event_queued",
        instance_id=instance_id,
        event_type=str(event_type),
        event_id=event_id,
        deliveries=len(rows),
    )
    return True


NOTIFY_PENDING = "events_pending"
"""Set on a job in the same write as its final state (SUCCEEDED or FAILED) and removed once
its event is in the outbox: a replica that dies in between leaves it set, and
:func:`requeue_job_events` emits the event then (with the same id)."""

_JOB_EVENTS = uuid.UUID("5f1d0c56-9a54-4e59-a1f4-0d1a2b9f63c1")


async def job_ended(db: Database, job: Document, status: str, reason: str | None) -> None:
    """Emit ``job.succeeded`` or ``job.failed`` for a job that just ended (a cancelled job
    is no event), then clear its :data:`NOTIFY_PENDING` mark; the job runner calls it once
    the final state is written. The event's id is derived from the job's, so an emission
    repeated after a crash reaches each webhook once."""
    if status == "SUCCEEDED":
        event_type = EventType.JOB_SUCCEEDED
    elif status == "FAILED":
        event_type = EventType.JOB_FAILED
    else:
        return
    data = {
        "job_id": job["_id"],
        "type": job.get("type"),
        "status": status,
        "reason": reason,
        "plan_id": job.get("plan_id"),
        "trigger": job.get("trigger"),
        "restore_point_id": job.get("restore_point_id"),
        "started_at": job.get("started_at"),
    }
    event_id = str(uuid.uuid5(_JOB_EVENTS, f"{job['_id']}:{event_type}"))
    if not await emit(db, job["instance_id"], event_type, job["_id"], data, event_id=event_id):
        return  # the mark stays: emitted again later
    try:
        await db.jobs.update_one({"_id": job["_id"]}, {"$unset": {NOTIFY_PENDING: ""}})
    except PyMongoError as exc:  # emitted; the mark left set only means emitting it again
        log.warning("webhook_job_mark_not_cleared", job_id=job["_id"], error=type(exc).__name__)


async def requeue_job_events(db: Database, *, limit: int = 500) -> int:
    """Emit the events of jobs whose replica ended them but died before queuing their event
    (their :data:`NOTIFY_PENDING` mark is still set); how many. An event the dead replica
    did queue is not queued twice (same id)."""
    pending = (
        await db.jobs.find({NOTIFY_PENDING: True, "status": {"$in": ["SUCCEEDED", "FAILED"]}})
        .limit(limit)
        .to_list(None)
    )
    for job in pending:
        await job_ended(db, job, str(job["status"]), job.get("reason"))
    return len(pending)


async def restore_point_gone(db: Database, point: Document, event_type: EventType) -> None:
    """Emit ``restore_point.expired`` (retention) or ``restore_point.deleted`` (a user)."""
    data = {
        "restore_point_id": point["_id"],
        "plan_id": point.get("plan_id"),
        "destination_id": point.get("destination_id"),
        "created_at": point.get("created_at"),
        "expires_at": point.get("expires_at"),
    }
    await emit(db, point["instance_id"], event_type, point["_id"], data)


# --------------------------------------------------------------------------- signatures


def signing_key(secret: str) -> bytes:
    """The HMAC key of a webhook's secret: a Standard Webhooks secret (``whsec_`` and base64)
    is its decoded bytes, as the Standard Webhooks libraries read it; any other secret is
    its UTF-8 bytes."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[len("whsec_") :], validate=True)
        except (binascii.Error, ValueError):
            pass
    return secret.encode()


def sign(secret: str, message_id: str, timestamp: int, body: str) -> str:
    """The ``webhook-signature`` header's value: ``v1,`` and the base64 of
    HMAC-SHA256(key, ``{message_id}.{timestamp}.{body}``)."""
    signed = f"{message_id}.{timestamp}.{body}".encode()
    digest = hmac.new(signing_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


# --------------------------------------------------------------------------- settings


class WebhookSettings(BaseSettings):
    """Webhooks and their delivery on one replica, from environment variables."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    enabled: bool = Field(
        default=True,
        validation_alias="WEBHOOK_DELIVERY_ENABLED",
        description="Deliver webhook events from this replica (with the other background "
        "parts; false: this replica only queues them).",
    )
    allow_http: bool = Field(
        default=False,
        validation_alias="WEBHOOK_ALLOW_HTTP",
        description="Accept webhook URLs with http:// (default: https:// only).",
    )
    max_per_instance: int = Field(
        default=20,
        ge=1,
        le=1000,
        validation_alias="WEBHOOK_MAX_PER_INSTANCE",
        description="Webhooks one instance may have.",
    )
    max_attempts: int = Field(
        default=8,
        ge=1,
        le=100,
        validation_alias="WEBHOOK_MAX_ATTEMPTS",
        description="Attempts of one delivery before it is given up (marked failed).",
    )
    backoff_seconds: float = Field(
        default=30.0,
        gt=0,
        le=86400.0,
        validation_alias="WEBHOOK_BACKOFF_SECONDS",
        description="Wait before the first retry; it doubles after every failed attempt "
        "(plus up to a fifth at random), up to WEBHOOK_BACKOFF_MAX_SECONDS.",
    )
    backoff_max_seconds: float = Field(
        default=3600.0,
        gt=0,
        le=7 * 86400.0,
        validation_alias="WEBHOOK_BACKOFF_MAX_SECONDS",
        description="The longest wait between two attempts.",
    )
    timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        le=300.0,
        validation_alias="WEBHOOK_TIMEOUT_SECONDS",
        description="How long one attempt may take, connection included.",
    )
    lease_seconds: float = Field(
        default=60.0,
        ge=1.0,
        le=3600.0,
        validation_alias="WEBHOOK_LEASE_SECONDS",
        description="How long a replica holds a delivery it sends; a crashed replica's "
        "deliveries are sent again after at most this long. Longer than the timeout.",
    )
    poll_seconds: float = Field(
        default=5.0,
        gt=0,
        le=3600.0,
        validation_alias="WEBHOOK_POLL_SECONDS",
        description="How often the outbox is checked for due deliveries when nothing "
        "signalled one (events queued on this replica are sent at once).",
    )
    concurrency: int = Field(
        default=8,
        ge=1,
        le=256,
        validation_alias="WEBHOOK_CONCURRENCY",
        description="Deliveries this replica sends at once.",
    )
    retention_days: float = Field(
        default=30.0,
        gt=0,
        le=3650.0,
        validation_alias="WEBHOOK_DELIVERY_RETENTION_DAYS",
        description="How long finished deliveries stay in the delivery log.",
    )

    @model_validator(mode="after")
    def _lease_outlasts_an_attempt(self) -> WebhookSettings:
        if self.lease_seconds <= self.timeout_seconds:
            raise ValueError(
                "WEBHOOK_LEASE_SECONDS must be longer than WEBHOOK_TIMEOUT_SECONDS: a delivery "
                "still being sent would be sent again by another replica"
            )
        return self

    def backoff(self, attempts: int) -> float:
        """Seconds before the attempt after ``attempts`` failed ones."""
        base = self.backoff_seconds * 2 ** min(attempts - 1, 40)
        return float(min(self.backoff_max_seconds, base * (1 + random.random() / 5)))


# --------------------------------------------------------------------------- webhooks

Url = Annotated[str, Field(min_length=1, max_length=2048)]
Secret = Annotated[str, Field(min_length=16, max_length=256)]


def _events(value: list[EventType]) -> list[EventType]:
    if len(set(value)) != len(value):
        raise ValueError("an event is listed twice")
    return value


class WebhookSpec(BaseModel):
    """A webhook as created: where to, which events, the signing secret."""

    model_config = ConfigDict(extra="forbid", strict=True)
    url: Url = Field(
        description="Where events are POSTed: https:// (http:// only if the operator "
        "allows it); no user name or password in it."
    )
    events: list[EventType] = Field(
        min_length=1, max_length=len(EventType), description="The events wanted."
    )
    secret: Secret = Field(
        description="The signing secret, 16 to 256 characters (a Standard Webhooks secret, "
        "whsec_ and base64, is used as its decoded bytes); write-only."
    )
    enabled: bool = Field(default=True, description="false: no event is queued or sent.")
    description: str | None = Field(
        default=None, max_length=256, pattern=r"^[^\x00-\x1f\x7f-\x9f]*$"
    )

    @field_validator("events", mode="before")
    @classmethod
    def _no_strict_enum(cls, value: Any) -> Any:
        # strict mode refuses strings for an enum; the values are checked right after
        if isinstance(value, list):
            try:
                return [EventType(v) if isinstance(v, str) else v for v in value]
            except ValueError:
                allowed = ", ".join(e.value for e in EventType)
                raise ValueError(f"events are among: {allowed}") from None
        return value

    @field_validator("events")
    @classmethod
    def _unique(cls, value: list[EventType]) -> list[EventType]:
        return _events(value)


SPEC_FIELDS = frozenset(WebhookSpec.model_fields)


def _context(webhook_id: str) -> str:
    return f"webhooks/{webhook_id}/secret"


async def check_url(url: str, settings: WebhookSettings, *, field: str = "url") -> None:
    """Refuse a URL the service must not send to: a scheme other than https (or http when
    allowed), credentials or a fragment in it, a host the egress policy denies (a name is
    resolved now; each delivery checks again). Spaces and control characters are refused,
    not cleaned: URL parsers drop CR, LF and tab, so the URL checked would not be the one
    stored."""
    if any(c <= " " or "\x7f" <= c <= "\x9f" for c in url):
        raise InvalidInput(
            "The url must not contain spaces, line breaks or other control characters; "
            "percent-encode them (a space is %20).",
            code="invalid_url",
            field=field,
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise InvalidInput(
            "The url is not a valid URL; send one like https://example.com/hooks.",
            code="invalid_url",
            field=field,
        ) from None
    schemes = ("https", "http") if settings.allow_http else ("https",)
    if parts.scheme not in schemes:
        allowed = "https:// or http://" if settings.allow_http else "https://"
        raise InvalidInput(f"The url must start with {allowed}.", code="invalid_url", field=field)
    if not parts.hostname:
        raise InvalidInput("The url has no host.", code="invalid_url", field=field)
    if parts.username is not None or parts.password is not None:
        raise InvalidInput(
            "The url must not hold a user name or password: the secret signs every delivery.",
            code="invalid_url",
            field=field,
        )
    if parts.fragment:
        raise InvalidInput("The url must not have a #fragment.", code="invalid_url", field=field)
    refusal = egress.literal_refusal(url)
    policy = egress.installed()
    try:
        if refusal is not None:
            raise refusal
        if policy is not None:
            await policy.check_url(url)
    except EgressDenied as exc:
        raise InvalidInput(exc.message, code="egress_denied", field=field) from None


def _store_fields(spec: WebhookSpec) -> dict[str, Any]:
    return {
        "url": spec.url,
        "events": [str(e) for e in spec.events],
        "enabled": spec.enabled,
        "description": spec.description,
    }


async def create(
    db: Database, box: SecretBox, instance_id: str, spec: WebhookSpec, settings: WebhookSettings
) -> Document:
    await check_url(spec.url, settings)
    count = await db.webhooks.count_documents({"instance_id": instance_id})
    if count >= settings.max_per_instance:
        raise Conflict(
            f"This instance has {count} webhooks, the most allowed; delete one first.",
            code="too_many_webhooks",
        )
    webhook_id = str(uuid.uuid4())
    at = now()
    doc: Document = {
        "_id": webhook_id,
        "schema_version": SCHEMA_VERSION,
        "instance_id": instance_id,
        **_store_fields(spec),
        "secret": box.seal(spec.secret, _context(webhook_id)),
        "created_at": at,
        "updated_at": at,
        "version": 1,
    }
    await db.webhooks.insert_one(doc)
    return doc


async def get(db: Database, instance_id: str, webhook_id: str) -> Document:
    doc = await db.webhooks.find_one({"_id": webhook_id, "instance_id": instance_id})
    if doc is None:
        raise NotFound(
            f"This instance has no webhook {webhook_id[:100]!r}.", code="webhook_not_found"
        )
    return doc


async def list_page(db: Database, instance_id: str, limit: int, cursor: str | None) -> Page:
    return await paginate(db.webhooks, {"instance_id": instance_id}, limit=limit, cursor=cursor)


async def update(
    db: Database,
    box: SecretBox,
    instance_id: str,
    webhook_id: str,
    patch: dict[str, Any],
    settings: WebhookSettings,
) -> Document:
    """Apply a JSON merge patch; the merged webhook is validated as a whole; the secret is
    kept unless sent."""
    doc = await get(db, instance_id, webhook_id)
    unknown = sorted(set(patch) - SPEC_FIELDS)
    if unknown:
        raise InvalidInput(
            f"A webhook has no field {unknown[0]!r}.", code="invalid_input", field=unknown[0]
        )
    if "secret" in patch and patch["secret"] is None:
        raise InvalidInput(
            "The secret cannot be removed; send a new one to change it.", field="secret"
        )
    current = {**_store_fields_of(doc), "secret": "0" * 16}
    merged = merge_patch(current, patch)
    spec = WebhookSpec.model_validate(merged)  # pydantic's ValidationError: a 400
    if spec.url != doc["url"]:
        await check_url(spec.url, settings)
    changes: dict[str, Any] = {**_store_fields(spec), "updated_at": now()}
    if "secret" in patch:
        changes["secret"] = box.seal(spec.secret, _context(webhook_id))
    result = await db.webhooks.find_one_and_update(
        {"_id": webhook_id, "instance_id": instance_id, "version": doc.get("version", 1)},
        {"$set": changes, "$inc": {"version": 1}},
        return_document=True,
    )
    if result is None:
        raise Conflict(
            "The webhook was changed or deleted by someone else meanwhile; read it again and "
            "retry.",
            code="concurrent_update",
        )
    return result


def _store_fields_of(doc: Document) -> dict[str, Any]:
    fields: dict[str, Any] = {k: doc[k] for k in ("url", "events", "enabled") if k in doc}
    if doc.get("description") is not None:
        fields["description"] = doc["description"]
    return fields


async def delete(db: Database, instance_id: str, webhook_id: str) -> None:
    """Delete a webhook and its delivery log (deliveries not yet sent are dropped)."""
    result = await db.webhooks.delete_one({"_id": webhook_id, "instance_id": instance_id})
    if result.deleted_count == 0:
        await get(db, instance_id, webhook_id)  # raises NotFound
    await db.webhook_deliveries.delete_many({"webhook_id": webhook_id})


async def delete_all(db: Database, instance_id: str) -> None:
    """Delete an instance's webhooks and deliveries (its deprovision)."""
    await db.webhooks.delete_many({"instance_id": instance_id})
    await db.webhook_deliveries.delete_many({"instance_id": instance_id})


async def deliveries_page(
    db: Database, instance_id: str, webhook_id: str, limit: int, cursor: str | None
) -> Page:
    """A webhook's delivery log, newest first."""
    await get(db, instance_id, webhook_id)
    return await paginate(
        db.webhook_deliveries,
        {"webhook_id": webhook_id, "instance_id": instance_id},
        limit=limit,
        cursor=cursor,
    )


# --------------------------------------------------------------------------- delivery

_deliverers: list[Callable[[], None]] = []


def _wake_deliverers() -> None:
    """A hint to this process's deliverers that an event was queued (others poll)."""
    for wake in list(_deliverers):
        wake()


def _due(at: datetime) -> dict[str, Any]:
    return {
        "$or": [
            {"state": str(DeliveryState.PENDING), "next_attempt_at": {"$lte": at}},
            {"state": str(DeliveryState.DELIVERING), "lease_expires_at": {"$lte": at}},
        ]
    }


ATTEMPT_LOG_MAX = 20
"""The newest attempts kept on a delivery."""


class WebhookDeliverer:
    """One replica's delivery loop: claims due deliveries with a lease and sends them,
    ``WEBHOOK_CONCURRENCY`` at a time."""

    def __init__(
        self,
        db: Database,
        box: SecretBox,
        settings: WebhookSettings,
        *,
        replica_id: str,
        clock: Clock | None = None,
    ) -> None:
        self.db, self.box, self.settings = db, box, settings
        self.replica_id = replica_id
        self.clock: Clock = clock or SystemClock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._stopping = False
        self._last_prune: datetime | None = None

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        policy = egress.installed()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=self.settings.concurrency, **egress.connector_args(policy)
            ),
            timeout=aiohttp.ClientTimeout(
                total=self.settings.timeout_seconds,
                connect=min(self.settings.timeout_seconds, 10.0),
            ),
            trust_env=False,
            auto_decompress=False,
        )
        _deliverers.append(self.wake)
        self._task = asyncio.create_task(self._loop(), name="webhook-deliverer")

    async def stop(self) -> None:
        """Stop claiming, let the attempts in flight end (up to their timeout), close."""
        self._stopping = True
        if self.wake in _deliverers:
            _deliverers.remove(self.wake)
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=self.settings.timeout_seconds + 1)
        for task in list(self._inflight):
            task.cancel()
        if self._session is not None:
            await self._session.close()

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                await requeue_job_events(self.db)
                claimed = await self.run_once()
                await self._prune()
            except PyMongoError as exc:
                log.warning("webhook_outbox_unavailable", error=type(exc).__name__)
                claimed = 0
            except Exception:
                log.exception("webhook_deliverer_failed")
                claimed = 0
            if claimed and len(self._inflight) < self.settings.concurrency:
                continue
            self._wake.clear()
            await self.clock.wait(self._wake, self.settings.poll_seconds)

    async def run_once(self) -> int:
        """Claim due deliveries for the free slots and start sending them; how many."""
        free = self.settings.concurrency - len(self._inflight)
        if free <= 0:
            return 0
        at = self.clock.now()
        candidates = (
            await self.db.webhook_deliveries.find(_due(at), {"_id": 1, "state": 1, "claims": 1})
            .sort("next_attempt_at", 1)
            .limit(free)
            .to_list(None)
        )
        started = 0
        for candidate in candidates:
            claim = await self._claim(candidate, at)
            if claim is None:
                continue
            task = asyncio.create_task(self._deliver(claim))
            self._inflight.add(task)
            task.add_done_callback(self._done)
            started += 1
        return started

    def _done(self, task: asyncio.Task[None]) -> None:
        """A slot is free: claim the next due delivery now, not at the next poll."""
        self._inflight.discard(task)
        self._wake.set()

    async def _claim(self, candidate: Document, at: datetime) -> Document | None:
        token = int(candidate.get("claims") or 0)
        result = await self.db.webhook_deliveries.find_one_and_update(
            {"_id": candidate["_id"], "claims": candidate.get("claims"), **_due(at)},
            {
                "$set": {
                    "state": str(DeliveryState.DELIVERING),
                    "lease_owner": self.replica_id,
                    "lease_expires_at": at + timedelta(seconds=self.settings.lease_seconds),
                    "claims": token + 1,
                }
            },
            return_document=True,
        )
        return result

    async def _deliver(self, delivery: Document) -> None:
        try:
            await self._attempt(delivery)
        except Exception:
            log.exception("webhook_delivery_crashed", delivery_id=delivery["_id"])

    async def _attempt(self, delivery: Document) -> None:
        hook = await self.db.webhooks.find_one({"_id": delivery["webhook_id"]})
        started = self.clock.now()
        status: int | None = None
        if hook is None:
            await self._record(delivery, started, None, "the webhook was deleted", final=True)
            return
        if not hook.get("enabled", True):
            await self._record(
                delivery, started, None, "the webhook was disabled before delivery", final=True
            )
            return
        try:
            secret = self.box.open(hook["secret"], _context(hook["_id"]))
        except SecretKeyError:
            await self._record(
                delivery, started, None, "the webhook's secret cannot be opened", final=False
            )
            return
        error: str | None
        try:
            status = await self._post(hook["url"], secret, delivery)
            error = None if 200 <= status < 300 else _status_error(status)
        except EgressDenied as exc:
            error = f"the egress policy refuses the receiver's address ({exc.setting})"
        except TimeoutError:
            error = f"the receiver did not answer within {self.settings.timeout_seconds:g} s"
        except aiohttp.ClientSSLError:
            error = "the TLS connection to the receiver failed (certificate or handshake)"
        except aiohttp.ClientConnectorError as exc:
            inner = egress.refusal_in(exc)
            error = (
                f"the egress policy refuses the receiver's address ({inner.setting})"
                if inner is not None
                else "the receiver could not be reached (connection failed)"
            )
        except (aiohttp.ClientError, OSError, ssl.SSLError):
            error = "the connection to the receiver failed before it answered"
        await self._record(delivery, started, status, error, final=False)

    async def _post(self, url: str, secret: str, delivery: Document) -> int:
        assert self._session is not None
        refusal = egress.literal_refusal(url)
        if refusal is not None:
            raise refusal
        body: str = delivery["body"]
        timestamp = int(self.clock.now().timestamp())
        headers = {
            "Content-Type": "application/cloudevents+json; charset=utf-8",
            "User-Agent": "osb-backup-manager-webhooks/1",
            "webhook-id": delivery["event_id"],
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, delivery["event_id"], timestamp, body),
        }
        async with self._session.post(
            url, data=body.encode(), headers=headers, allow_redirects=False
        ) as response:
            return response.status  # the body is never read: nothing of it is shown

    async def _record(
        self,
        delivery: Document,
        started: datetime,
        status: int | None,
        error: str | None,
        *,
        final: bool,
    ) -> None:
        at = self.clock.now()
        attempts = int(delivery.get("attempts") or 0) + 1
        entry = {
            "at": started,
            "status_code": status,
            "error": error,
            "duration_ms": round((at - started).total_seconds() * 1000, 1),
        }
        changes: dict[str, Any] = {
            "attempts": attempts,
            "last_attempt_at": started,
            "last_status_code": status,
            "last_error": error,
            "lease_owner": None,
            "lease_expires_at": None,
        }
        if error is None:
            changes.update(state=str(DeliveryState.SUCCEEDED), delivered_at=at)
            changes["next_attempt_at"] = None
        elif final or attempts >= self.settings.max_attempts:
            changes.update(state=str(DeliveryState.FAILED), next_attempt_at=None, failed_at=at)
        else:
            retry = at + timedelta(seconds=self.settings.backoff(attempts))
            changes.update(state=str(DeliveryState.PENDING), next_attempt_at=retry)
        result = await self.db.webhook_deliveries.update_one(
            {"_id": delivery["_id"], "claims": delivery["claims"]},
            {
                "$set": changes,
                "$push": {"attempt_log": {"$each": [entry], "$slice": -ATTEMPT_LOG_MAX}},
            },
        )
        log.info(
            "webhook_delivery_attempt",
            delivery_id=delivery["_id"],
            webhook_id=delivery["webhook_id"],
            event_id=delivery["event_id"],
            attempt=attempts,
            status_code=status,
            error=error,
            state=changes["state"],
            lease_lost=result.matched_count == 0,
        )

    async def _prune(self) -> None:
        """Now and then: finished deliveries older than WEBHOOK_DELIVERY_RETENTION_DAYS go."""
        at = self.clock.now()
        if self._last_prune is not None and at - self._last_prune < timedelta(hours=1):
            return
        self._last_prune = at
        before = at - timedelta(days=self.settings.retention_days)
        await self.db.webhook_deliveries.delete_many(
            {
                "state": {"$in": [str(DeliveryState.SUCCEEDED), str(DeliveryState.FAILED)]},
                "created_at": {"$lt": before},
            }
        )


def _status_error(status: int) -> str:
    if 300 <= status < 400:
        return f"the receiver answered {status}, a redirect, which is not followed"
    return f"the receiver answered {status}"


__all__ = [
    "DeliveryState",
    "EventType",
    "WebhookDeliverer",
    "WebhookSettings",
    "WebhookSpec",
    "emit",
    "sign",
]
