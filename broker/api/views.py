"""Stored documents -> API answers (the models of :mod:`broker.api.models`). Secrets become
``<name>_set`` flags; internal fields (leases, agent job ids, sealed secrets) are left out."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import TypeAdapter

from backup import protection as protection_
from backup import retention
from backup.database import Document
from backup.destinations import SECRET_FIELDS
from backup.plans import Retention
from broker.api import models

_DESTINATION: TypeAdapter[models.S3DestinationOut | models.SwiftDestinationOut] = TypeAdapter(
    models.DestinationOut
)


def _sealed(doc: Document, name: str) -> bool:
    return bool((doc.get("secrets") or {}).get(name))


def destination(doc: Document) -> models.S3DestinationOut | models.SwiftDestinationOut:
    view = {k: v for k, v in doc.items() if k not in ("_id", "secrets", "instance_id")}
    view["id"] = doc["_id"]
    for secret in SECRET_FIELDS[doc["type"]]:
        view[f"{secret}_set"] = _sealed(doc, secret)
    if doc["type"] == "S3":
        view["plain_http"] = str(doc.get("endpoint") or "").startswith("http://")
    return _DESTINATION.validate_python(view)


def plan(doc: Document, last: Document | None) -> models.PlanOut:
    """``last``: the plan's latest job, if any."""
    encryption = doc.get("encryption") or {}
    view = {
        **{k: v for k, v in doc.items() if k not in ("_id", "secrets", "encryption")},
        "id": doc["_id"],
        "encryption": {
            "enabled": bool(encryption.get("enabled")),
            "key_set": _sealed(doc, "encryption_key"),
        },
        **_rpo(doc),
        "last_job": (
            {
                "id": last["_id"],
                "status": last["status"],
                "created_at": last.get("created_at"),
                "ended_at": last.get("ended_at"),
            }
            if last
            else None
        ),
    }
    return models.PlanOut.model_validate(view)


def _rpo(doc: Document) -> dict[str, Any]:
    """The plan's objective in force, and whether it was derived from its schedule."""
    rpo = protection_.effective_rpo(doc)
    return {"effective_rpo_seconds": rpo.seconds, "rpo_derived": rpo.derived}


def truncate(text: Any, limit: int) -> str:
    """The last ``limit`` bytes of a log (whole characters), saying how much was cut."""
    raw = str(text).encode()
    if len(raw) <= limit:
        return str(text)
    tail = raw[-limit:].decode(errors="ignore")
    return f"[... {len(raw) - len(tail.encode())} earlier bytes cut ...]\n{tail}"


MIN_LOG_SHARE = 256


def job(doc: Document, log_limit: int | None, total_limit: int | None = None) -> models.JobOut:
    """``log_limit``: include stage logs, each cut to its last ``log_limit`` bytes (reading one
    job); with ``total_limit``, a job with many logs gives each an equal smaller share, so the
    answer stays bounded whatever the number of items."""
    items = []
    logs = [item.get("logs") or {} for item in doc.get("items") or []]
    share = log_limit
    stages = sum(len(stage_logs) for stage_logs in logs)
    if share is not None and total_limit is not None and stages:
        share = min(share, max(MIN_LOG_SHARE, total_limit // stages))
    for item, item_logs in zip(doc.get("items") or [], logs, strict=True):
        view = {k: v for k, v in item.items() if k not in ("logs", "agent_job_id", "key")}
        if share is not None:
            view["logs"] = {str(stage): truncate(text, share) for stage, text in item_logs.items()}
        items.append(view)
    return models.JobOut.model_validate({**doc, "id": doc["_id"], "items": items})


def restore_point(doc: Document) -> models.RestorePointOut:
    return models.RestorePointOut.model_validate(
        {
            **{k: v for k, v in doc.items() if k not in ("_id", "secrets", "agent")},
            "id": doc["_id"],
            "encryption_key_set": _sealed(doc, "encryption_key"),
        }
    )


def audit_entry(doc: Document) -> models.AuditEntryOut:
    return models.AuditEntryOut.model_validate({**doc, "id": doc["_id"]})


def retention_preview(
    plan: Document,
    rules: Retention,
    timezone: str,
    proposed: bool,
    at: datetime,
    decisions: list[retention.Decision],
) -> models.RetentionPreviewOut:
    def entry(d: retention.Decision) -> models.RetentionDecisionOut:
        return models.RetentionDecisionOut(
            id=d.point["_id"],
            created_at=d.point["created_at"],
            pinned=bool(d.point.get("pinned")),
            kept_by=[str(r) for r in d.reasons],
        )

    delete = [entry(d) for d in decisions if not d.kept]
    keep = [entry(d) for d in decisions if d.kept]
    return models.RetentionPreviewOut(
        plan_id=plan["_id"],
        retention=rules,
        timezone=timezone,
        proposed=proposed,
        as_of=at,
        total=len(decisions),
        to_delete=len(delete),
        to_keep=len(keep),
        delete=delete,
        keep=keep,
    )


def protection(result: protection_.InstanceProtection) -> models.InstanceProtectionOut:
    return models.InstanceProtectionOut(
        instance_id=result.instance_id,
        state=result.state,
        reason=result.reason,
        plans=[models.PlanProtectionOut(**p.as_document(), reason=p.reason) for p in result.plans],
        evaluated_at=result.evaluated_at,
    )


def stored_protection(doc: Document) -> models.InstanceProtectionOut:
    """An instance's protection as the background evaluator stored it."""
    plans = [{**p, "reason": (p.get("reasons") or [""])[0]} for p in doc.get("plans") or []]
    return models.InstanceProtectionOut.model_validate({**doc, "plans": plans})
