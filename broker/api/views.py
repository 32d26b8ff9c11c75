"""Stored documents -> API answers. Secrets become ``<name>_set`` flags; internal fields
(leases, agent job ids, sealed secrets) are left out."""

from __future__ import annotations

from typing import Any

from backup.destinations import SECRET_FIELD
from backup.store import Document


def _sealed(doc: Document, name: str) -> bool:
    return bool((doc.get("secrets") or {}).get(name))


def destination(doc: Document) -> dict[str, Any]:
    secret = SECRET_FIELD[doc["type"]]
    out = {k: v for k, v in doc.items() if k not in ("_id", "secrets", "instance_id")}
    out["id"] = doc["_id"]
    out[f"{secret}_set"] = _sealed(doc, secret)
    if doc["type"] == "S3":
        out["plain_http"] = str(doc.get("endpoint") or "").startswith("http://")
    return out


def plan(doc: Document, last: Document | None) -> dict[str, Any]:
    enc = doc.get("encryption") or {}
    return {
        **{k: v for k, v in doc.items() if k not in ("_id", "secrets", "encryption")},
        "id": doc["_id"],
        "encryption": {
            "enabled": bool(enc.get("enabled")),
            "key_set": _sealed(doc, "encryption_key"),
        },
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


def truncate(text: Any, limit: int) -> str:
    """The last ``limit`` bytes of a log (whole characters), saying how much was cut."""
    raw = str(text).encode()
    if len(raw) <= limit:
        return str(text)
    tail = raw[-limit:].decode(errors="ignore")
    return f"[... {len(raw) - len(tail.encode())} earlier bytes cut ...]\n{tail}"


def job(doc: Document, log_limit: int | None) -> dict[str, Any]:
    """``log_limit``: include stage logs, each cut to that many bytes (reading one job)."""
    items = []
    for item in doc.get("items") or []:
        view = {k: v for k, v in item.items() if k not in ("logs", "agent_job_id", "key")}
        if log_limit is not None:
            view["logs"] = {
                str(stage): truncate(text, log_limit)
                for stage, text in (item.get("logs") or {}).items()
            }
        items.append(view)
    return {**doc, "id": doc["_id"], "items": items}


def restore_point(doc: Document) -> dict[str, Any]:
    return {
        **{k: v for k, v in doc.items() if k not in ("_id", "secrets", "agent")},
        "id": doc["_id"],
        "encryption_key_set": _sealed(doc, "encryption_key"),
    }
