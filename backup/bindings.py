"""Service bindings: credentials for the backup-manager API of one instance.

Binding creates a random key (``bmk_`` + 43 url-safe characters) that is returned once, in
the bind response, and stored only as its SHA-256 (``key_hash``, what
:mod:`broker.api.auth` looks up). Fetching a binding later returns the API address but not
the key (OSB allows a broker to return a binding's credentials only once); a lost key is
replaced by unbinding and binding again. Unbinding deletes the document, which revokes the
key at once.

Binding and unbinding are synchronous: there is nothing to wait for.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass, field
from enum import StrEnum

import structlog
from pymongo.errors import DuplicateKeyError

from backup.clock import Clock, SystemClock
from backup.database import SCHEMA_VERSION, Database, Document
from backup.errors import (
    AlreadyExists,
    BindingGone,
    ConcurrentOperation,
    ServiceMismatch,
    UnknownBinding,
)
from backup.instances import LIVE_STATES, instance_not_found
from backup.operations import InstanceState, OperationState, OperationStatus

log = structlog.get_logger(__name__)

KEY_PREFIX = "bmk_"


class BindingState(StrEnum):
    """A binding document's ``state``: binding is synchronous, and unbinding deletes it."""

    READY = "ready"
    DELETED = "deleted"  # never written (unbinding deletes the document): read as absent


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    """What is stored and looked up: hex SHA-256 of the whole key (prefix included)."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class BindRequest:
    instance_id: str
    binding_id: str
    service_id: str
    plan_id: str
    parameters: Document = field(default_factory=dict)
    context: Document = field(default_factory=dict)
    bind_resource: Document | None = None
    acting_user: str | None = None


@dataclass
class BindOutcome:
    """``created``: a new binding and its ``key`` (shown once); otherwise an identical
    repeat of an existing binding, without the key."""

    created: bool
    binding: Document
    key: str | None = None


def _same(doc: Document, req: BindRequest) -> bool:
    return (
        doc.get("instance_id") == req.instance_id
        and doc.get("service_id") == req.service_id
        and doc.get("plan_id") == req.plan_id
        and (doc.get("parameters") or {}) == (req.parameters or {})
        and (doc.get("bind_resource") or {}) == (req.bind_resource or {})
    )


async def bind(store: Database, req: BindRequest, *, clock: Clock | None = None) -> BindOutcome:
    instance = await store.instances.find_one(
        {"_id": req.instance_id}, {"state": 1, "service_id": 1, "plan_id": 1}
    )
    state = instance.get("state") if instance else None
    if instance is None or state == InstanceState.DELETED:
        raise instance_not_found(req.instance_id)
    if state == InstanceState.FAILED:
        raise instance_not_found(req.instance_id, "failed to provision")
    if state in (InstanceState.PROVISIONING, InstanceState.DEPROVISIONING):
        doing = "provisioned" if state == InstanceState.PROVISIONING else "deleted"
        raise ConcurrentOperation(f"The instance is being {doing}; bind once that has finished.")
    assert state in LIVE_STATES, state
    if req.service_id != instance.get("service_id"):
        raise ServiceMismatch(
            f"service_id {req.service_id!r} is not the service of this instance.",
            field="service_id",
        )
    existing = await store.bindings.find_one({"_id": req.binding_id})
    if existing is not None:
        return _repeat(existing, req)
    key = new_key()
    at = (clock or SystemClock()).now()
    doc: Document = {
        "_id": req.binding_id,
        "instance_id": req.instance_id,
        "service_id": req.service_id,
        "plan_id": req.plan_id,
        "key_hash": key_hash(key),
        "parameters": req.parameters or {},
        "context": req.context or {},
        "bind_resource": req.bind_resource,
        "state": BindingState.READY,
        "last_operation": {
            "id": f"bind-{uuid.uuid4().hex}",
            "type": "bind",
            "state": OperationState.SUCCEEDED,
            "description": "Bound.",
            "updated_at": at,
        },
        "created_by": req.acting_user,
        "created_at": at,
        "updated_at": at,
        "version": 1,
        "schema_version": SCHEMA_VERSION,
    }
    try:
        await store.bindings.insert_one(doc)
    except DuplicateKeyError:
        # A concurrent bind with the same id won (a key hash collision is not credible).
        existing = await store.bindings.find_one({"_id": req.binding_id})
        if existing is None:
            raise ConcurrentOperation("The binding keeps changing; retry.") from None
        return _repeat(existing, req)
    log.info(
        "binding_created",
        instance_id=req.instance_id,
        binding_id=req.binding_id,
        acting_user=req.acting_user,
    )
    return BindOutcome(True, doc, key)


def _repeat(existing: Document, req: BindRequest) -> BindOutcome:
    if not _same(existing, req):
        raise AlreadyExists(
            f"Service binding {req.binding_id!r} already exists with different attributes."
        )
    return BindOutcome(False, existing)


async def get(store: Database, instance_id: str, binding_id: str) -> Document:
    doc = await store.bindings.find_one({"_id": binding_id, "instance_id": instance_id})
    if doc is None or doc.get("state") == BindingState.DELETED:
        raise UnknownBinding(f"Service binding {binding_id!r} does not exist for this instance.")
    return doc


async def unbind(store: Database, instance_id: str, binding_id: str) -> None:
    """Delete the binding (its key stops working at once); Gone when there is none, so that
    a repeated DELETE (orphan mitigation) is harmless."""
    result = await store.bindings.delete_one({"_id": binding_id, "instance_id": instance_id})
    if result.deleted_count != 1:
        raise BindingGone(f"Service binding {binding_id!r} does not exist for this instance.")
    log.info("binding_deleted", instance_id=instance_id, binding_id=binding_id)


async def last_operation(store: Database, instance_id: str, binding_id: str) -> OperationStatus:
    doc = await store.bindings.find_one({"_id": binding_id, "instance_id": instance_id})
    if doc is None:
        raise BindingGone(f"Service binding {binding_id!r} does not exist for this instance.")
    op = doc.get("last_operation") or {}
    return OperationStatus(
        OperationState(op.get("state", OperationState.SUCCEEDED)), op.get("description", "Bound.")
    )
