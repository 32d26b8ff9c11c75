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

import base64
import binascii
import hashlib
import hmac
import json
import uuid
from datetime import date, datetime
from enum import StrEnum
from typing import Any

import structlog

from backup.database import SCHEMA_VERSION, Database, Document
from backup.pagination import now

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
    db: Database, instance_id: str, event_type: EventType, subject: str, data: dict[str, Any]
) -> None:
    """Record an event for delivery to every enabled webhook of ``instance_id`` that wants
    ``event_type``: one outbox row each, written before this returns, all with the same event
    id. Never raises for a database failure or a bad ``data`` (it is logged): a notification
    that cannot be queued must not fail the change that caused it.

    ``subject``: what the event is about (a job's, plan's or restore point's id);
    ``data``: JSON-serialisable details (datetimes become ISO 8601 strings).
    """
    try:
        hooks = await db.webhooks.find(
            {"instance_id": instance_id, "enabled": True, "events": str(event_type)},
            {"_id": 1},
        ).to_list(None)
        if not hooks:
            return
        at = now()
        event_id = str(uuid.uuid4())
        body = event_body(event_id, instance_id, event_type, subject, data, at)
        rows: list[Document] = [
            {
                "_id": str(uuid.uuid4()),
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
                "attempt_log": [],
                "lease_owner": None,
                "lease_expires_at": None,
            }
            for hook in hooks
        ]
        await db.webhook_deliveries.insert_many(rows, ordered=False)
    except Exception:
        log.exception(
            "webhook_emit_failed",
            instance_id=instance_id,
            event_type=str(event_type),
            subject=subject,
        )
        return
    log.info(
        "webhook_event_queued",
        instance_id=instance_id,
        event_type=str(event_type),
        event_id=event_id,
        deliveries=len(rows),
    )


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


def verify(
    secret: str, headers: dict[str, str], body: str, *, now_ts: int, tolerance: int = 300
) -> bool:
    """What a receiver does (documented in docs/webhooks.md; used by the tests): the
    timestamp is within ``tolerance`` seconds and one of the header's ``v1`` signatures
    matches."""
    try:
        message_id = headers["webhook-id"]
        timestamp = int(headers["webhook-timestamp"])
    except (KeyError, ValueError):
        return False
    if abs(now_ts - timestamp) > tolerance:
        return False
    expected = sign(secret, message_id, timestamp, body)
    return any(
        hmac.compare_digest(expected, candidate)
        for candidate in headers.get("webhook-signature", "").split()
    )
