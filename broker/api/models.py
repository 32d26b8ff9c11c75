"""Every payload of the backup-manager API: request bodies, query strings and answers.
Handlers validate and answer with these models, and the OpenAPI document is generated from
them. Bodies a user describes (destinations, plans) are the domain's own specs."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Discriminator, Field, Tag, create_model

from backup import pagination
from backup.destinations import DestinationSpec, S3DestinationSpec, SwiftDestinationSpec
from backup.errors import InvalidInput
from backup.jobs import DrillKind, DrillOutcome, JobStatus, JobType, RestorePointState, Trigger
from backup.plans import DrillSpec, EncryptionIn, PlanSpec, Retention
from backup.protection import ProtectionState
from storage import ObjectLock

_IN = ConfigDict(extra="forbid", strict=True)
_QUERY = ConfigDict(extra="forbid")  # query strings are text: "5" is the number 5
_OUT = ConfigDict(extra="ignore")

Id = Annotated[str, Field(min_length=1, max_length=64)]
Text = Annotated[str, Field(min_length=1, max_length=256)]


class ErrorOut(BaseModel):
    """Every error answer."""

    model_config = _OUT
    error: str = Field(description="Stable machine-readable code.")
    description: str = Field(description="What went wrong, in words a person can act on.")
    field: str | None = Field(default=None, description="The offending field, if one.")
    problems: list[dict[str, str]] | None = Field(
        default=None, description="Every problem of an invalid body or query: field, message."
    )


# --- query strings --------------------------------------------------------------------------


class ListQuery(BaseModel):
    """Paging of a list, newest first: by cursor (``limit`` and ``cursor``), or by numbered
    pages (``page`` and ``size``, with ``as_of`` from the first page to keep later ones
    stable)."""

    model_config = _QUERY
    limit: int | None = Field(
        default=None,
        ge=1,
        le=pagination.MAX_LIMIT,
        description=f"Entries per page, 1 to {pagination.MAX_LIMIT} "
        f"(default {pagination.DEFAULT_LIMIT}).",
    )
    cursor: str | None = Field(
        default=None, max_length=512, description="The next_cursor of the previous page."
    )
    page: int | None = Field(
        default=None,
        ge=1,
        le=pagination.MAX_PAGE,
        description="Numbered page, from 1 (instead of cursor).",
    )
    size: int | None = Field(
        default=None,
        ge=1,
        le=pagination.MAX_LIMIT,
        description="Entries per numbered page (same as limit).",
    )
    as_of: str | None = Field(
        default=None,
        max_length=512,
        description="The as_of of the first numbered page: later pages stay stable.",
    )

    def window(self) -> tuple[int, str | None]:
        """(limit, cursor) for the domain's ``list_page``: numbered pages travel as a cursor."""
        if self.cursor is not None and self.page is not None:
            raise InvalidInput("Send either cursor or page, not both.", field="page")
        if self.as_of is not None and self.page is None:
            raise InvalidInput("as_of goes with page (numbered pages).", field="as_of")
        if self.limit is not None and self.size is not None and self.limit != self.size:
            raise InvalidInput("limit and size differ; send one of them.", field="size")
        limit = self.limit or self.size or pagination.DEFAULT_LIMIT
        if self.page is not None:
            return limit, pagination.page_cursor(self.page, self.as_of)
        return limit, self.cursor or None


class JobListQuery(ListQuery):
    type: JobType | None = Field(default=None, description="Only BACKUP, RESTORE or DRILL jobs.")
    status: JobStatus | None = Field(default=None, description="Only jobs in this status.")
    plan_id: Id | None = Field(default=None, description="Only jobs of this plan.")


class AuditListQuery(ListQuery):
    """The operator-wide audit trail's filters (all optional, combined with AND)."""

    instance_id: Annotated[str, Field(min_length=1, max_length=256)] | None = Field(
        default=None, description="Only entries of this service instance."
    )
    actor: Annotated[str, Field(min_length=1, max_length=256)] | None = Field(
        default=None,
        description="Only entries of this actor (a user's id, a binding's id, an "
        "account's name, a platform user's identity).",
    )
    actor_kind: Literal["user", "binding", "operator", "broker", "platform_user"] | None = Field(
        default=None, description="Only entries of this kind of actor."
    )
    since: AwareDatetime | None = Field(
        default=None,
        description="Only entries recorded at or after this time (RFC 3339, with its offset).",
    )
    until: AwareDatetime | None = Field(
        default=None,
        description="Only entries recorded before this time (RFC 3339, with its offset).",
    )


class ProtectionListQuery(ListQuery):
    state: ProtectionState | None = Field(
        default=None, description="Only instances in this state (e.g. unprotected)."
    )


class RestorePointListQuery(ListQuery):
    plan_id: Id | None = Field(default=None, description="Only restore points of this plan.")


class CheckQuery(BaseModel):
    model_config = _QUERY
    validate_: bool = Field(
        default=False,
        alias="validate",
        description="Check the destination against its storage first (write, read back and "
        "delete a probe) and refuse to save it if that fails (422).",
    )


class _PageOut(BaseModel):
    total: int | None = Field(
        description="Entries in the whole list: on numbered pages (as of as_of), and on a "
        "cursor page that ends the list; null on a cursor page with more after it (counting "
        "would cost a pass over the whole list: ask page=1 for a total).",
        ge=0,
    )
    next_cursor: str | None = Field(description="Pass as cursor for the next page; null: last.")
    page: int | None = Field(default=None, description="The numbered page, if one was asked.")
    as_of: str | None = Field(
        default=None, description="Numbered pages: pass back with the next page numbers."
    )


# --- destinations ---------------------------------------------------------------------------

S3DestinationIn = S3DestinationSpec
SwiftDestinationIn = SwiftDestinationSpec
DestinationIn = DestinationSpec


class DestinationPatch(BaseModel):
    """A JSON merge patch of a destination (RFC 7396): any of its fields. The merged result is
    validated as a whole; the secret is kept unless sent. Changing ``type`` needs every field
    of the new type."""

    model_config = ConfigDict(extra="allow")


class _DestinationOutBase(BaseModel):
    model_config = _OUT
    id: str
    name: str
    verify_tls: bool
    prefix: str
    created_at: datetime
    updated_at: datetime
    version: int = Field(description="Goes up by one with every change.")


class S3DestinationOut(_DestinationOutBase):
    type: Literal["S3"]
    endpoint: str | None
    plain_http: bool
    region: str
    bucket: str
    access_key_id: str
    addressing_style: str
    secret_access_key_set: bool = Field(description="Whether a secret access key is stored.")
    object_lock: ObjectLock | None = Field(
        default=None, description="Object lock on every restore point's objects; null: none."
    )


class SwiftDestinationOut(_DestinationOutBase):
    type: Literal["SWIFT"]
    auth_url: str
    auth_version: str
    username: str
    user_domain_name: str | None
    project_name: str | None
    project_domain_name: str | None
    region_name: str | None
    interface: str = "public"
    application_credential_id: str | None = None
    application_credential_name: str | None = None
    container: str
    password_set: bool = Field(description="Whether a key or password is stored.")
    application_credential_secret_set: bool = Field(
        default=False, description="Whether an application credential's secret is stored."
    )


AnyDestinationOut = S3DestinationOut | SwiftDestinationOut
DestinationOut = Annotated[AnyDestinationOut, Field(discriminator="type")]


class DestinationPage(_PageOut):
    items: list[DestinationOut]


class ValidationStepOut(BaseModel):
    name: str = Field(description="connect, write, read or delete.")
    ok: bool
    error_code: str | None = None
    message: str | None = None


class ValidationOut(BaseModel):
    """The outcome of writing, reading back and deleting a probe object."""

    ok: bool
    error: str | None = Field(default=None, description="Code of the first failure.")
    description: str = Field(description="What happened, and what to fix if it failed.")
    steps: list[ValidationStepOut]


# --- plans ----------------------------------------------------------------------------------

PlanIn = PlanSpec


def _nullable(annotation: Any) -> Any:
    """``annotation | None``: a merge patch may set any field to null (its default)."""
    return annotation | None


_PLAN_PATCH_FIELDS: dict[str, Any] = {
    **{
        name: (_nullable(field.annotation), None)
        for name, field in PlanSpec.model_fields.items()
        if name not in ("retention", "encryption")
    },
    "retention": (dict[str, Any] | None, None),
    "encryption": (dict[str, Any] | None, None),
}
_PLAN_PATCH_FIELDS["drill"] = (dict[str, Any] | None, None)  # merged, then validated whole
PlanPatch = create_model(
    "PlanPatch",
    __config__=ConfigDict(extra="forbid", strict=True),
    __doc__="A JSON merge patch of a plan (RFC 7396): objects merge, null restores the "
    "default. The merged plan is validated as a whole.",
    **_PLAN_PATCH_FIELDS,
)


class EncryptionOut(BaseModel):
    enabled: bool
    key_set: bool = Field(description="Whether an encryption key is stored (never shown).")


class LastJob(BaseModel):
    id: str
    status: JobStatus
    created_at: datetime | None = None
    ended_at: datetime | None


class PlanOut(BaseModel):
    model_config = _OUT
    id: str
    name: str
    destination_id: str
    frequency: str
    timezone: str
    items: list[str]
    retention: Retention
    compression: bool
    encryption: EncryptionOut
    paused: bool
    next_run_at: datetime | None = Field(description="Next scheduled run; null when paused.")
    rpo_seconds: int | None = Field(
        default=None, description="The recovery point objective set; null: derived."
    )
    effective_rpo_seconds: int | None = Field(
        default=None,
        description="The objective in force: rpo_seconds, else 1.5 times the longest gap "
        "between the schedule's fires over a year.",
    )
    rpo_derived: bool | None = Field(
        default=None, description="Whether effective_rpo_seconds was derived from the schedule."
    )
    drill: DrillSpec | None = Field(default=None, description="Scheduled restore drills.")
    drill_next_run_at: datetime | None = Field(
        default=None, description="Next scheduled drill; null: none, disabled or paused."
    )
    last_drill: DrillOut | None = Field(
        default=None, description="The plan's latest restore drill (of its restore_point_id)."
    )
    last_job: LastJob | None = Field(description="The plan's latest job, if any.")
    created_at: datetime
    updated_at: datetime
    version: int


class PlanPage(_PageOut):
    items: list[PlanOut]


class PlanPatchQuery(BaseModel):
    model_config = _QUERY
    confirm: bool = Field(
        default=False,
        description="Apply a retention (or time zone) change even if it deletes more than "
        "RETENTION_CONFIRM_FRACTION of the plan's restore points at once (else 409 "
        "confirmation_required).",
    )


class RetentionPreviewQuery(BaseModel):
    """A proposed retention, whole (not merged with the saved one); none of its fields: the
    saved retention. ``timezone``: a proposed time zone for the calendar periods."""

    model_config = _QUERY
    style: Literal["DAYS", "HOURS", "FILES"] | None = None
    period: int | None = Field(default=None, description="1 to 100000, with style.")
    daily: int | None = Field(default=None, description="1 to 10000.")
    weekly: int | None = Field(default=None, description="1 to 10000.")
    monthly: int | None = Field(default=None, description="1 to 10000.")
    yearly: int | None = Field(default=None, description="1 to 10000.")
    min_good: int | None = Field(default=None, description="0 to 10000.")
    timezone: str | None = Field(
        default=None, max_length=64, description="IANA zone; default: the plan's."
    )

    def proposed(self) -> dict[str, Any] | None:
        """The proposed retention's fields sent, or None (preview the saved one)."""
        sent = self.model_dump(exclude_none=True, exclude={"timezone"})
        return sent or None


class RetentionDecisionOut(BaseModel):
    id: str = Field(description="The restore point.")
    created_at: datetime
    pinned: bool = False
    kept_by: list[str] = Field(
        description="The rules that keep it (pinned, locked, newest, age, count, daily, "
        "weekly, monthly, yearly, min_good, no_retention); empty: deleted."
    )


class RetentionPreviewOut(BaseModel):
    plan_id: str
    retention: Retention
    timezone: str
    proposed: bool = Field(description="Whether this is a proposed retention, not the saved one.")
    as_of: datetime = Field(description="The moment the preview was computed for.")
    total: int = Field(description="The plan's available restore points.")
    to_delete: int
    to_keep: int
    delete: list[RetentionDecisionOut] = Field(
        description="Deleted by the next sweep, newest first."
    )
    keep: list[RetentionDecisionOut] = Field(description="Kept, newest first, with why.")


# --- jobs -----------------------------------------------------------------------------------


class JobItemOut(BaseModel):
    model_config = _OUT
    name: str
    target: str | None = Field(
        default=None,
        description="A restore: the item (database) restored into; name is the restore "
        "point's item.",
    )
    status: JobStatus | None = None
    filename: str | None = None
    size: int | None = Field(default=None, description="Bytes the scripts produced.")
    stored_size: int | None = Field(default=None, description="Bytes in storage.")
    checksum: str | None = None
    compression: str | None = Field(
        default=None, description="How it was compressed: zstd, gzip, script or null."
    )
    encryption: str | None = Field(
        default=None, description="How it was encrypted: a format name, script or null."
    )
    error: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    stage: str | None = Field(
        default=None,
        description="The agent's current stage while the item runs (e.g. pre-backup-lock, "
        "backup), its last one once it ended.",
    )
    last_heard_at: datetime | None = Field(
        default=None,
        description="When the agent last answered about this item (updated at least every "
        "RUNNER_AGENT_POLL_MAX_SECONDS while it answers).",
    )
    logs: dict[str, str] | None = Field(
        default=None,
        description="Stage logs (only when reading one job), each cut to its last bytes; kept "
        "as they arrive, so the stages finished before a failure stay visible.",
    )


class JobEncryptionOut(BaseModel):
    enabled: bool = False


class JobAgentOut(BaseModel):
    model_config = _OUT
    kind: str | None = Field(
        default=None, description="ours or go: what the job's agent is (its GET /status)."
    )
    version: str | None = None


class MissedOut(BaseModel):
    model_config = _OUT
    first: datetime = Field(description="The first fire no replica ran.")
    last: datetime = Field(description="The last fire no replica ran.")
    count: int = Field(description="How many fires were missed.")
    exact: bool = Field(description="False when the count stopped at its limit ('more than').")


class JobOut(BaseModel):
    model_config = _OUT
    id: str
    type: JobType
    plan_id: str | None = None
    destination_id: str | None = None
    trigger: Trigger = Field(description="SCHEDULE, MANUAL or CATCH_UP.")
    scheduled_for: datetime | None = Field(default=None, description="Scheduled fire time.")
    missed: MissedOut | None = Field(
        default=None, description="MISSED jobs: the fires no replica ran (docs/scheduling.md)."
    )
    status: JobStatus
    reason: str | None = Field(default=None, description="Why it ended as it did.")
    items: list[JobItemOut] = []
    restore_point_id: str | None = None
    source_instance_id: str | None = Field(
        default=None,
        description="A restore into another instance: the instance whose restore point it "
        "restores (the job is this, the target's, job).",
    )
    compression: bool = False
    encryption: JobEncryptionOut = Field(default_factory=JobEncryptionOut)
    cancel_requested: bool = False
    created_at: datetime
    started_at: datetime | None = None
    ended_at: datetime | None = None
    deadline_at: datetime | None = None
    attempts: int = 0
    agent: JobAgentOut | None = Field(
        default=None, description="The agent that ran it, once the runner reached it."
    )
    agent_unreachable_since: datetime | None = Field(
        default=None,
        description="Set while the agent does not answer (or answers 5xx): since when. "
        "Cleared when it answers again; kept on a job that gave up.",
    )
    drill: DrillOut | None = Field(default=None, description="A DRILL job's outcome, once ended.")


class DrillTimingsOut(BaseModel):
    model_config = _OUT
    download_seconds: float | None = Field(
        default=None, description="Fetching the objects (our agent: decoding overlaps it)."
    )
    decrypt_seconds: float | None = Field(
        default=None, description="Decrypting and decompressing (null: not done: manager-side)."
    )
    verify_seconds: float | None = Field(
        default=None, description="The DBA's verify script (null: none ran)."
    )


class DrillOut(BaseModel):
    """A restore drill's outcome (docs/jobs.md, "Restore drills")."""

    model_config = _OUT
    job_id: str
    restore_point_id: str | None = None
    at: datetime
    outcome: DrillOutcome = Field(description="passed or failed.")
    reason: str | None = Field(default=None, description="Why it failed (or a note).")
    kind: DrillKind = Field(
        description="agent: downloaded, decrypted, checked and verified by our agent; "
        "manager: manager-side, download and checksum only (an agent without 'verify')."
    )
    verify_script: bool | None = Field(
        default=None, description="Whether a verify script ran (null: manager-side)."
    )
    timings: DrillTimingsOut = Field(default_factory=DrillTimingsOut)


class JobPage(_PageOut):
    items: list[JobOut]


class BackupIn(BaseModel):
    model_config = _IN
    plan_id: Id = Field(description="The plan to back up now.")


class RestoreItemIn(BaseModel):
    """One item to restore, and where to."""

    model_config = _IN
    name: Text = Field(description="An item of the restore point.")
    target: Text | None = Field(
        default=None,
        description="The target instance's item (database) to restore it into; default: the "
        "same name. Unless it is the item itself on its own instance, it must be one of the "
        "target instance's registered items (GET .../items), else 400 unknown_item.",
    )


def _restore_item_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "name"
    return "item" if isinstance(value, dict | RestoreItemIn) else None


# A name or an object, told apart by type, so that an error names only what was meant.
RestoreItemChoice = Annotated[
    Annotated[Text, Tag("name")] | Annotated[RestoreItemIn, Tag("item")],
    Discriminator(
        _restore_item_kind,
        custom_error_type="restore_item",
        custom_error_message="An item is a name or an object {name, target}",
    ),
]


class RestoreIn(BaseModel):
    """A restore of a restore point of this instance: into the same databases by default, or
    into other items of this instance or of another instance the caller may manage."""

    model_config = _IN
    restore_point_id: Id
    target_instance_id: Text | None = Field(
        default=None,
        description="The instance to restore into; default: this one. The caller must be "
        "allowed to manage it too (a binding key: only its own instance); one it may not see "
        "answers 404 instance_not_found, one it may only read 403. The job is recorded and "
        "listed under the target, whose agent runs it with the target's database; the "
        "restore point stays with this instance.",
    )
    items: list[RestoreItemChoice] | None = Field(
        default=None,
        max_length=1000,
        description="A subset of the restore point's items (default: all), each a name "
        "(restored into the item of the same name) or {name, target}.",
    )

    def pairs(self) -> list[tuple[str, str | None]] | None:
        """The items as (restore point item, target item or None) pairs."""
        if self.items is None:
            return None
        return [(i, None) if isinstance(i, str) else (i.name, i.target) for i in self.items]


# --- restore points -------------------------------------------------------------------------


class RestorePointItemOut(BaseModel):
    model_config = _OUT
    name: str
    key: str | None = Field(default=None, description="The object's name in the destination.")
    filename: str | None = None
    size: int | None = None
    stored_size: int | None = None
    checksum: str | None = None
    compression: str | None = None
    encryption: str | None = None


PinReason = Annotated[
    str,
    Field(
        min_length=1,
        max_length=500,
        pattern=r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*$",
    ),
]


class RestorePointPatch(BaseModel):
    """Pin a restore point (with a reason) or unpin it."""

    model_config = _IN
    pinned: bool = Field(
        description="true: keep it out of every automatic deletion (retention, deprovision) "
        "and refuse DELETE until unpinned; false: unpin."
    )
    pin_reason: PinReason | None = Field(
        default=None,
        description="Why it is pinned (required with pinned: true; 1-500 characters, no "
        "control characters).",
    )


class RestorePointOut(BaseModel):
    model_config = _OUT
    id: str
    plan_id: str | None = None
    destination_id: str | None = None
    job_id: str | None = None
    created_at: datetime
    expires_at: datetime | None = Field(
        default=None, description="When retention removes it; null: kept by count (FILES)."
    )
    retention: Retention | None = None
    items: list[RestorePointItemOut] = []
    encryption_key_set: bool = Field(
        default=False, description="Whether the key to decrypt it is kept (never shown)."
    )
    state: RestorePointState = RestorePointState.AVAILABLE
    pinned: bool = Field(
        default=False, description="Kept out of retention and deprovision; DELETE answers 409."
    )
    pin_reason: str | None = None
    pinned_at: datetime | None = None
    locked_until: datetime | None = Field(
        default=None,
        description="Its files are locked (S3 Object Lock) until then: DELETE answers 409 and "
        "retention deletes it after that date.",
    )
    last_drill: DrillOut | None = Field(
        default=None, description="The latest restore drill of this restore point."
    )
    imported: bool = Field(
        default=False,
        description="Recreated from its manifest by an import (POST /v1/imports) after the "
        "manager's database was lost.",
    )


class RestorePointPage(_PageOut):
    items: list[RestorePointOut]


class ItemsOut(BaseModel):
    items: list[str]


__all__ = ["EncryptionIn", "PlanIn"]


# --- audit trail ----------------------------------------------------------------------------


class AuditActorOut(BaseModel):
    model_config = _OUT
    kind: str = Field(description="user, binding, operator, broker or platform_user (OSB).")
    subject: str = Field(description="The user's id, the binding's id or the account's name.")


class AuditResourceOut(BaseModel):
    model_config = _OUT
    kind: str
    id: str | None = None


class AuditEntryOut(BaseModel):
    model_config = _OUT
    id: str
    created_at: datetime
    instance_id: str | None = Field(
        default=None, description="The instance changed; null for a platform-wide change."
    )
    actor: AuditActorOut
    action: str = Field(description="The API operation or OSB call, e.g. create_destination.")
    resource: AuditResourceOut
    fields: list[str] = Field(description="The names of the fields sent; never their values.")
    outcome: str
    request_id: str | None = None


class AuditPage(_PageOut):
    items: list[AuditEntryOut]


# --- protection -----------------------------------------------------------------------------


class PlanProtectionOut(BaseModel):
    model_config = _OUT
    plan_id: str
    name: str
    state: ProtectionState
    reason: str = Field(description="Why, in words; the worst reason first in reasons.")
    reasons: list[str] = Field(description="Every reason found, worst first.")
    rpo_seconds: int = Field(description="The objective in force.")
    rpo_derived: bool = Field(description="Whether the objective was derived from the schedule.")
    paused: bool
    last_good_at: datetime | None = Field(description="The newest good restore point's time.")
    lapses_at: datetime | None = Field(
        description="When the newest good backup stops meeting the objective."
    )
    next_run_at: datetime | None


class InstanceProtectionOut(BaseModel):
    model_config = _OUT
    instance_id: str
    state: ProtectionState = Field(description="The worst of its plans' states.")
    reason: str
    plans: list[PlanProtectionOut]
    evaluated_at: datetime = Field(description="When this state was computed.")


class ProtectionPage(_PageOut):
    items: list[InstanceProtectionOut]
