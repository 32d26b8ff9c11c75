"""The operations of the backup-manager API. Each is declared once, with the models of its
body, query string and answer; the routes and the OpenAPI document are both built from
:data:`OPERATIONS`. Handlers parse, call one domain function, and render."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypedDict, TypeVar, Unpack, cast

from aiohttp import web
from pydantic import BaseModel, ValidationError

from backup import (
    audit,
    destinations,
    drill,
    jobs,
    plans,
    protection,
    restore_points,
    retention,
    schedule,
)
from backup.database import Database, Document
from backup.errors import Conflict
from backup.pagination import Page, now
from backup.secrets import SecretBox
from broker.api import models, views
from broker.api.auth import AUTHORIZER, Principal
from broker.api.settings import ApiSettings
from broker.context import DATABASE, REQUEST_ID, SECRETS, STORE_OPENER
from broker.errors import ApiError, from_body, from_validation
from webguard.body import BodyError, read_json_object

PREFIX = "/v1/service_instances/{instance_id}"
PLATFORM_PREFIX = "/v1"
"""Platform-scoped operations (operators only: the fleet's protection, the whole audit trail)
live right under it."""
API_SETTINGS = web.AppKey("api_settings", ApiSettings)
"""How the API and the background loops open an object store (``storage.open_store``)."""
M = TypeVar("M", bound=BaseModel)

Answer = BaseModel | web.StreamResponse | None
"""What a handler returns: its answer model (rendered as JSON with the operation's status),
a response it built itself (another status), or nothing (204)."""
Handler = Callable[["Ctx"], Awaitable[Answer]]
H = TypeVar("H", bound=Handler)
PlatformHandler = Callable[["PlatformCtx"], Awaitable[Answer]]
PH = TypeVar("PH", bound=PlatformHandler)


@dataclass
class _RequestCtx:
    """What every handler gets: the request and the app's resources, and the reading of its
    body and query string."""

    request: web.Request
    db: Database
    box: SecretBox
    api: ApiSettings
    sent_fields: list[str] = field(default_factory=list, kw_only=True)
    """The names of the fields of the JSON object sent, for the audit trail."""

    def param(self, name: str) -> str:
        return self.request.match_info[name]

    async def raw_body(self) -> dict[str, object]:
        """The JSON object sent, not yet validated."""
        try:
            sent = await read_json_object(self.request)
        except BodyError as exc:
            raise from_body(exc) from None
        self.sent_fields = list(sent)
        return sent

    async def body(self, model: type[M]) -> M:
        """The JSON object sent, validated by ``model``."""
        return model.model_validate(await self.raw_body())

    def query(self, model: type[M]) -> M:
        """The query string validated by ``model``; a parameter given twice is refused."""
        query = self.request.query
        repeated = sorted({name for name in query if len(query.getall(name)) > 1})
        if repeated:
            raise ApiError(
                400,
                "invalid_input",
                f"Invalid query: {repeated[0]} is given more than once.",
                extra={"field": repeated[0]},
            )
        try:
            return model.model_validate(dict(query))
        except ValidationError as exc:
            raise from_validation(exc, "query") from None


@dataclass
class Ctx(_RequestCtx):
    """What an instance's handler gets: also the instance the caller may act on."""

    instance: Document = field(kw_only=True)

    @property
    def instance_id(self) -> str:
        return str(self.instance["_id"])


@dataclass
class PlatformCtx(_RequestCtx):
    """What a platform-scoped handler gets: also the operator that called; no instance (the
    operation spans them all)."""

    principal: Principal = field(kw_only=True)
    instance_id: str | None = field(default=None, kw_only=True)
    """The instance a change concerned, if one: the handler sets it for the audit trail."""


@dataclass
class Operation:
    method: str
    path: str
    handler: Handler | PlatformHandler
    """A :data:`Handler`, or a :data:`PlatformHandler` for the platform scope."""
    summary: str
    tag: str
    manage: bool
    changes: bool
    """A change: recorded in the audit trail when it succeeds."""
    status: int = 200
    body: object = None
    """The request body's model (a type, or an annotated union), for the OpenAPI document."""
    body_required: bool = True
    response: object = None
    """The answer's model (a type, or an annotated union), for the OpenAPI document."""
    query: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()
    also: dict[int, str] = field(default_factory=dict)
    """Other success statuses and what they mean (e.g. 202 of a cancel)."""
    scope: Literal["instance", "platform"] = "instance"
    """``platform``: under /v1 itself, for operators only (a tenant gets 403)."""

    @property
    def operation_id(self) -> str:
        return self.handler.__name__


OPERATIONS: list[Operation] = []
"""The operations on one instance (``/v1/service_instances/{instance_id}/...``)."""
PLATFORM_OPERATIONS: list[Operation] = []
"""The operations across the platform (``/v1/...``), for operators only: see
:func:`platform_op`."""


class _Details(TypedDict, total=False):
    """What an operation may declare besides its method, path, summary and tag (see
    :class:`Operation`)."""

    status: int
    body: object
    body_required: bool
    response: object
    query: type[BaseModel] | None
    errors: tuple[int, ...]
    also: dict[int, str]


def op(
    method: str,
    path: str,
    *,
    summary: str,
    tag: str,
    manage: bool | None = None,
    changes: bool | None = None,
    **details: Unpack[_Details],
) -> Callable[[H], H]:
    """Declare an operation; GET reads (Cloud Foundry ``read``), all else changes (``manage``)
    unless ``manage`` or ``changes`` say otherwise (a check sent by POST changes nothing)."""

    def register(handler: H) -> H:
        OPERATIONS.append(
            Operation(
                method,
                PREFIX + path,
                handler,
                summary,
                tag,
                manage=method != "GET" if manage is None else manage,
                changes=method != "GET" if changes is None else changes,
                **details,
            )
        )
        return handler

    return register


def platform_op(
    method: str,
    path: str,
    *,
    summary: str,
    tag: str,
    changes: bool | None = None,
    **details: Unpack[_Details],
) -> Callable[[PH], PH]:
    """Declare an operation across the platform, at ``/v1`` + ``path``: only operators (the
    broker's or operator's Basic credentials, a token with the operator scope) may call it;
    anyone else authenticated gets 403. GET changes nothing unless ``changes`` says so."""

    def register(handler: PH) -> PH:
        PLATFORM_OPERATIONS.append(
            Operation(
                method,
                PLATFORM_PREFIX + path,
                handler,
                summary,
                tag,
                manage=True,
                changes=method != "GET" if changes is None else changes,
                scope="platform",
                **details,
            )
        )
        return handler

    return register


def _page(page_model: type[M], page: Page, items: Sequence[BaseModel]) -> M:
    return page_model.model_validate(
        {
            "items": items,
            "total": page.total,
            "next_cursor": page.next_cursor,
            "page": page.page,
            "as_of": page.as_of,
        }
    )


def _check(result: destinations.CheckResult) -> models.ValidationOut:
    return models.ValidationOut(
        ok=result.ok,
        error=result.error,
        description=result.description,
        steps=[
            models.ValidationStepOut(
                name=step.name, ok=step.ok, error_code=step.error_code, message=step.message
            )
            for step in result.steps
        ],
    )


# --- items ----------------------------------------------------------------------------------


@op("GET", "/items", summary="The instance's backup items", tag="items", response=models.ItemsOut)
async def list_items(ctx: Ctx) -> models.ItemsOut:
    return models.ItemsOut(items=list(ctx.instance.get("items") or []))


# --- destinations ---------------------------------------------------------------------------


@op(
    "GET",
    "/destinations",
    summary="List destinations, newest first",
    tag="destinations",
    response=models.DestinationPage,
    query=models.ListQuery,
)
async def list_destinations(ctx: Ctx) -> models.DestinationPage:
    limit, cursor = ctx.query(models.ListQuery).window()
    page = await destinations.list_page(ctx.db, ctx.instance_id, limit, cursor)
    return _page(models.DestinationPage, page, [views.destination(d) for d in page.items])


@op(
    "POST",
    "/destinations",
    summary="Create a destination (with ?validate=true only if a probe succeeds)",
    tag="destinations",
    status=201,
    body=models.DestinationIn,
    response=models.DestinationOut,
    query=models.CheckQuery,
    errors=(409, 422),
)
async def create_destination(ctx: Ctx) -> models.AnyDestinationOut:
    check = ctx.query(models.CheckQuery)
    spec = destinations.parse(await ctx.raw_body())
    timeout = ctx.api.validate_timeout_seconds if check.validate_ else None
    doc = await destinations.create(ctx.db, ctx.box, ctx.instance_id, spec, verify_timeout=timeout)
    return views.destination(doc)


@op(
    "POST",
    "/destinations/validate",
    summary="Check destination settings before creating them: write, read back and delete "
    "a probe object (the answer says what failed; a name is not needed)",
    tag="destinations",
    body=models.DestinationIn,
    response=models.ValidationOut,
    errors=(422,),  # egress_denied: the host may not be connected to
    changes=False,
)
async def validate_new_destination(ctx: Ctx) -> models.ValidationOut:
    raw = await ctx.raw_body()
    raw.setdefault("name", "validation")
    spec = destinations.parse(raw)
    return _check(await destinations.check(spec.settings(), ctx.api.validate_timeout_seconds))


@op(
    "GET",
    "/destinations/{destination_id}",
    summary="Read a destination",
    tag="destinations",
    response=models.DestinationOut,
)
async def get_destination(ctx: Ctx) -> models.AnyDestinationOut:
    doc = await destinations.get(ctx.db, ctx.instance_id, ctx.param("destination_id"))
    return views.destination(doc)


@op(
    "PATCH",
    "/destinations/{destination_id}",
    summary="Change a destination (JSON merge patch; the secret is kept unless sent; with "
    "?validate=true only if a probe succeeds)",
    tag="destinations",
    body=models.DestinationPatch,
    response=models.DestinationOut,
    query=models.CheckQuery,
    errors=(409, 422),
)
async def update_destination(ctx: Ctx) -> models.AnyDestinationOut:
    check = ctx.query(models.CheckQuery)
    patch = await ctx.raw_body()
    timeout = ctx.api.validate_timeout_seconds if check.validate_ else None
    doc = await destinations.update(
        ctx.db, ctx.box, ctx.instance_id, ctx.param("destination_id"), patch, verify_timeout=timeout
    )
    # checked now (it passed), or changed unchecked: an earlier check says nothing of it
    await protection.record_destination_check(
        ctx.db, ctx.instance_id, doc["_id"], ok=True if timeout else None, reason=None
    )
    return views.destination(doc)


@op(
    "DELETE",
    "/destinations/{destination_id}",
    summary="Delete a destination (refused while a plan, restore point or job uses it)",
    tag="destinations",
    status=204,
    errors=(409,),
)
async def delete_destination(ctx: Ctx) -> None:
    await destinations.delete(ctx.db, ctx.instance_id, ctx.param("destination_id"))


@op(
    "POST",
    "/destinations/{destination_id}/validate",
    summary="Check a stored destination: write, read back and delete a probe object (with a "
    "JSON merge patch as body: check that change without saving it)",
    tag="destinations",
    body=models.DestinationPatch,
    body_required=False,
    response=models.ValidationOut,
    errors=(422,),  # egress_denied: the host may not be connected to
    changes=False,
)
async def validate_destination(ctx: Ctx) -> models.ValidationOut:
    patch = await ctx.raw_body() if ctx.request.body_exists else None
    result = await destinations.check_stored(
        ctx.db,
        ctx.box,
        ctx.instance_id,
        ctx.param("destination_id"),
        ctx.api.validate_timeout_seconds,
        patch,
    )
    if patch is None:  # the stored settings: protection reads the outcome (docs/protection.md)
        await protection.record_destination_check(
            ctx.db,
            ctx.instance_id,
            ctx.param("destination_id"),
            ok=result.ok,
            reason=result.description,
        )
    return _check(result)


# --- plans ----------------------------------------------------------------------------------


async def _plan_views(store: Database, docs: list[Document]) -> list[models.PlanOut]:
    last = await jobs.last_jobs(store, [d["last_job_id"] for d in docs if d.get("last_job_id")])
    return [views.plan(d, last.get(d.get("last_job_id") or "")) for d in docs]


@op(
    "GET",
    "/plans",
    summary="List backup plans, newest first",
    tag="plans",
    response=models.PlanPage,
    query=models.ListQuery,
)
async def list_plans(ctx: Ctx) -> models.PlanPage:
    limit, cursor = ctx.query(models.ListQuery).window()
    page = await plans.list_page(ctx.db, ctx.instance_id, limit, cursor)
    return _page(models.PlanPage, page, await _plan_views(ctx.db, page.items))


@op(
    "POST",
    "/plans",
    summary="Create a backup plan",
    tag="plans",
    status=201,
    body=models.PlanIn,
    response=models.PlanOut,
    errors=(409,),
)
async def create_plan(ctx: Ctx) -> models.PlanOut:
    spec = await ctx.body(models.PlanIn)
    doc = await plans.create(ctx.db, ctx.box, ctx.instance, spec, ctx.api.min_plan_interval_seconds)
    return views.plan(doc, None)


@op("GET", "/plans/{plan_id}", summary="Read a backup plan", tag="plans", response=models.PlanOut)
async def get_plan(ctx: Ctx) -> models.PlanOut:
    doc = await plans.get(ctx.db, ctx.instance_id, ctx.param("plan_id"))
    return (await _plan_views(ctx.db, [doc]))[0]


@op(
    "PATCH",
    "/plans/{plan_id}",
    summary="Change a backup plan (JSON merge patch; the merged plan is validated as a whole "
    "and returned)",
    tag="plans",
    body=models.PlanPatch,
    response=models.PlanOut,
    query=models.PlanPatchQuery,
    errors=(409,),
)
async def update_plan(ctx: Ctx) -> models.PlanOut:
    confirmed = ctx.query(models.PlanPatchQuery).confirm
    patch = await ctx.raw_body()
    models.PlanPatch.model_validate(patch)  # the merged plan is validated again as a whole

    async def confirm_retention(current: Document, fields: Document) -> None:
        if not confirmed:
            await retention.check_change(
                ctx.db,
                current,
                fields["retention"],
                fields["timezone"],
                now(),
                fraction=ctx.api.retention_confirm_fraction,
                min_points=ctx.api.retention_confirm_min_points,
            )

    try:
        doc = await plans.update(
            ctx.db,
            ctx.box,
            ctx.instance,
            ctx.param("plan_id"),
            patch,
            ctx.api.min_plan_interval_seconds,
            check=confirm_retention,
        )
    except retention.ConfirmationRequired as exc:
        extra = {"field": exc.field, **exc.counts}
        raise ApiError(409, exc.code, exc.description, extra=extra) from None
    return (await _plan_views(ctx.db, [doc]))[0]


@op(
    "GET",
    "/plans/{plan_id}/retention_preview",
    summary="What retention would delete now and keep (and why): the plan's saved retention, "
    "or a proposed one given as query parameters",
    tag="plans",
    response=models.RetentionPreviewOut,
    query=models.RetentionPreviewQuery,
)
async def retention_preview(ctx: Ctx) -> models.RetentionPreviewOut:
    query = ctx.query(models.RetentionPreviewQuery)
    plan = await plans.get(ctx.db, ctx.instance_id, ctx.param("plan_id"))
    proposed = query.proposed()
    try:
        rules = plans.Retention.model_validate(proposed or plan["retention"])
    except ValidationError as exc:
        raise from_validation(exc, "query") from None
    if query.timezone is not None:
        schedule.zone(query.timezone)
    zone = query.timezone or plan["timezone"]
    at = now()
    decisions = await retention.preview(
        ctx.db, plan, at, retention=rules.model_dump(), timezone=zone
    )
    return views.retention_preview(plan, rules, zone, proposed is not None, at, decisions)


@op(
    "DELETE",
    "/plans/{plan_id}",
    summary="Delete a backup plan (its restore points stay until retention or a delete "
    "removes them; its queued jobs are cancelled)",
    tag="plans",
    status=204,
)
async def delete_plan(ctx: Ctx) -> None:
    await plans.delete(ctx.db, ctx.instance_id, ctx.param("plan_id"))


# --- backups and restores -------------------------------------------------------------------


async def _backup_now(ctx: Ctx, plan_id: str) -> models.JobOut:
    plan = await plans.get(ctx.db, ctx.instance_id, plan_id)
    return views.job(await jobs.start_backup(ctx.db, plan), None)


@op(
    "POST",
    "/backups",
    summary="Back up now: queue a manual backup job of a plan",
    tag="jobs",
    status=202,
    body=models.BackupIn,
    response=models.JobOut,
    errors=(409,),
)
async def start_backup(ctx: Ctx) -> models.JobOut:
    spec = await ctx.body(models.BackupIn)
    return await _backup_now(ctx, spec.plan_id)


@op(
    "POST",
    "/plans/{plan_id}/backups",
    summary="Back up this plan now (the same as POST /backups with its plan_id)",
    tag="jobs",
    status=202,
    response=models.JobOut,
    errors=(409,),
)
async def start_plan_backup(ctx: Ctx) -> models.JobOut:
    return await _backup_now(ctx, ctx.param("plan_id"))


@op(
    "POST",
    "/restores",
    summary="Restore: queue a restore job of a restore point (all or some of its items), "
    "into this instance or another one the caller may manage (target_instance_id), each item "
    "into itself or another registered item (target)",
    tag="jobs",
    status=202,
    body=models.RestoreIn,
    response=models.JobOut,
    errors=(409,),
)
async def start_restore(ctx: Ctx) -> models.JobOut:
    spec = await ctx.body(models.RestoreIn)
    target = None
    if spec.target_instance_id is not None and spec.target_instance_id != ctx.instance_id:
        # Before the restore point is looked at: a target the caller may not manage answers
        # the same whatever the point, and one it may not see exactly like an unknown one.
        target = await ctx.request.app[AUTHORIZER].authorize_also(
            ctx.request, spec.target_instance_id
        )
    point = await restore_points.get(ctx.db, ctx.instance_id, spec.restore_point_id)
    job = await jobs.start_restore(ctx.db, point, spec.pairs(), target=target)
    return views.job(job, None)


async def _drill(ctx: Ctx, plan: Document, point: Document) -> models.JobOut:
    return views.job(await jobs.start_drill(ctx.db, plan, point), None)


@op(
    "POST",
    "/plans/{plan_id}/drill",
    summary="Drill now: queue a restore drill of the plan's newest restore point (downloaded, "
    "decrypted, checked and handed to the verify script, never to the live database)",
    tag="jobs",
    status=202,
    response=models.JobOut,
    errors=(409,),
)
async def start_plan_drill(ctx: Ctx) -> models.JobOut:
    plan = await plans.get(ctx.db, ctx.instance_id, ctx.param("plan_id"))
    point = await drill.newest_point(ctx.db, plan["_id"], instance_id=ctx.instance_id)
    if point is None:
        raise Conflict(
            "This plan has no available restore point to drill; run a backup first.",
            code="no_restore_point",
        )
    return await _drill(ctx, plan, point)


@op(
    "POST",
    "/restore_points/{restore_point_id}/drill",
    summary="Drill this restore point now: queue a restore drill of it",
    tag="jobs",
    status=202,
    response=models.JobOut,
    errors=(409,),
)
async def start_restore_point_drill(ctx: Ctx) -> models.JobOut:
    point = await restore_points.get(ctx.db, ctx.instance_id, ctx.param("restore_point_id"))
    plan = {
        "_id": point.get("plan_id"),
        "instance_id": point["instance_id"],
        "destination_id": point["destination_id"],
    }
    return await _drill(ctx, plan, point)


# --- jobs -----------------------------------------------------------------------------------


@op(
    "GET",
    "/jobs",
    summary="List jobs, newest first (filter by type, status, plan)",
    tag="jobs",
    response=models.JobPage,
    query=models.JobListQuery,
)
async def list_jobs(ctx: Ctx) -> models.JobPage:
    query = ctx.query(models.JobListQuery)
    limit, cursor = query.window()
    page = await jobs.list_page(
        ctx.db,
        ctx.instance_id,
        type=query.type,
        status=query.status,
        plan_id=query.plan_id,
        limit=limit,
        cursor=cursor,
    )
    return _page(models.JobPage, page, [views.job(d, None) for d in page.items])


@op(
    "GET",
    "/jobs/{job_id}",
    summary="Read a job: status, times, per-item results and stage logs (each cut to its "
    "last JOB_LOG_MAX_BYTES)",
    tag="jobs",
    response=models.JobOut,
)
async def get_job(ctx: Ctx) -> models.JobOut:
    doc = await jobs.get(ctx.db, ctx.instance_id, ctx.param("job_id"))
    return views.job(doc, ctx.api.job_log_max_bytes, ctx.api.job_logs_total_max_bytes)


@op(
    "POST",
    "/jobs/{job_id}/cancel",
    summary="Cancel a job: a queued one ends at once (200); a running one is asked to stop "
    "(202) and the runner ends it",
    tag="jobs",
    response=models.JobOut,
    errors=(409,),
    also={202: "A running job was asked to stop; it ends CANCELLED shortly."},
)
async def cancel_job(ctx: Ctx) -> web.Response:
    doc = await jobs.cancel(ctx.db, ctx.instance_id, ctx.param("job_id"))
    status = 200 if doc["status"] == jobs.JobStatus.CANCELLED else 202
    return web.json_response(views.job(doc, None).model_dump(mode="json"), status=status)


# --- restore points -------------------------------------------------------------------------


@op(
    "GET",
    "/restore_points",
    summary="List restore points (successful backups), newest first",
    tag="restore points",
    response=models.RestorePointPage,
    query=models.RestorePointListQuery,
)
async def list_restore_points(ctx: Ctx) -> models.RestorePointPage:
    query = ctx.query(models.RestorePointListQuery)
    limit, cursor = query.window()
    page = await restore_points.list_page(
        ctx.db, ctx.instance_id, plan_id=query.plan_id, limit=limit, cursor=cursor
    )
    return _page(models.RestorePointPage, page, [views.restore_point(d) for d in page.items])


@op(
    "GET",
    "/restore_points/{restore_point_id}",
    summary="Read a restore point",
    tag="restore points",
    response=models.RestorePointOut,
)
async def get_restore_point(ctx: Ctx) -> models.RestorePointOut:
    doc = await restore_points.get(ctx.db, ctx.instance_id, ctx.param("restore_point_id"))
    return views.restore_point(doc)


@op(
    "PATCH",
    "/restore_points/{restore_point_id}",
    summary="Pin a restore point (with a reason: retention, deprovision and DELETE leave it "
    "alone) or unpin it",
    tag="restore points",
    body=models.RestorePointPatch,
    response=models.RestorePointOut,
    errors=(409,),
)
async def update_restore_point(ctx: Ctx) -> models.RestorePointOut:
    spec = await ctx.body(models.RestorePointPatch)
    doc = await restore_points.pin(
        ctx.db,
        ctx.instance_id,
        ctx.param("restore_point_id"),
        pinned=spec.pinned,
        reason=spec.pin_reason,
    )
    return views.restore_point(doc)


@op(
    "DELETE",
    "/restore_points/{restore_point_id}",
    summary="Delete a restore point: its stored files, then the record (409 while pinned)",
    tag="restore points",
    status=204,
    errors=(409, 503),
)
async def delete_restore_point(ctx: Ctx) -> None:
    await restore_points.delete(
        ctx.db,
        ctx.box,
        ctx.instance_id,
        ctx.param("restore_point_id"),
        opener=ctx.request.app[STORE_OPENER],
    )


# --- audit trail ----------------------------------------------------------------------------


@op(
    "GET",
    "/audit",
    summary="The instance's audit trail, newest first: who changed what, and when",
    tag="audit",
    response=models.AuditPage,
    query=models.ListQuery,
    manage=True,
)
async def list_audit(ctx: Ctx) -> models.AuditPage:
    limit, cursor = ctx.query(models.ListQuery).window()
    page = await audit.list_page(ctx.db, ctx.instance_id, limit=limit, cursor=cursor)
    return _page(models.AuditPage, page, [views.audit_entry(d) for d in page.items])


@platform_op(
    "GET",
    "/audit",
    summary="Every instance's audit trail, newest first (operators only): filter by instance, "
    "actor, and time",
    tag="audit",
    response=models.AuditPage,
    query=models.AuditListQuery,
)
async def list_platform_audit(ctx: PlatformCtx) -> models.AuditPage:
    query = ctx.query(models.AuditListQuery)
    limit, cursor = query.window()
    where = audit.Filter(
        instance_id=query.instance_id,
        actor=query.actor,
        actor_kind=audit.ActorKind(query.actor_kind) if query.actor_kind else None,
        since=query.since,
        until=query.until,
    )
    page = await audit.list_platform_page(ctx.db, where, limit=limit, cursor=cursor)
    return _page(models.AuditPage, page, [views.audit_entry(d) for d in page.items])


# --- protection -----------------------------------------------------------------------------


@op(
    "GET",
    "/protection",
    summary="Whether the instance is protected: each plan's state (protected, at_risk, "
    "unprotected) against its recovery point objective, with the reasons in words, and the "
    "worst of them",
    tag="protection",
    response=models.InstanceProtectionOut,
)
async def get_protection(ctx: Ctx) -> models.InstanceProtectionOut:
    found = await protection.evaluate(ctx.db, now(), instance_ids=[ctx.instance_id])
    return views.protection(found[0])


@platform_op(
    "GET",
    "/protection",
    summary="Every instance's protection across the platform (operators only), newest "
    "instance first; ?state=unprotected lists the ones that need attention. As the "
    "background evaluator last stored it (evaluated_at)",
    tag="protection",
    response=models.ProtectionPage,
    query=models.ProtectionListQuery,
)
async def list_protection(ctx: PlatformCtx) -> models.ProtectionPage:
    query = ctx.query(models.ProtectionListQuery)
    limit, cursor = query.window()
    page = await protection.fleet_page(ctx.db, query.state, limit=limit, cursor=cursor)
    return _page(models.ProtectionPage, page, [views.stored_protection(d) for d in page.items])


def _actor(principal: Principal) -> audit.Actor:
    """Who acted, as the authorizer established it (never from a header the caller sets)."""
    return audit.Actor(audit.ActorKind(principal.kind), principal.subject)


def _resource(operation: Operation, ctx: Ctx, answer: Answer) -> audit.Resource:
    """The resource changed (its kind is the operation's tag): the one the answer shows (a
    job a backup started, a plan created), else the last one the path names (a deletion)."""
    shown = getattr(answer, "id", None) if isinstance(answer, BaseModel) else None
    if isinstance(shown, str):
        return audit.Resource(operation.tag, shown)
    ids = [value for name, value in ctx.request.match_info.items() if name != "instance_id"]
    return audit.Resource(operation.tag, ids[-1] if ids else None)


# --- wiring ---------------------------------------------------------------------------------


def handler_for(operation: Operation) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        app = request.app
        authorizer = app[AUTHORIZER]
        principal = await authorizer.authenticate(request)
        instance = await authorizer.instance_for(
            principal, request.match_info["instance_id"], operation.manage
        )
        ctx = Ctx(request, app[DATABASE], app[SECRETS], app[API_SETTINGS], instance=instance)
        answer = await cast(Handler, operation.handler)(ctx)
        resource = _resource(operation, ctx, answer)
        return await _answered(operation, ctx, principal, resource, answer)

    handle.__name__ = operation.operation_id
    return handle


async def _answered(
    operation: Operation,
    ctx: Ctx | PlatformCtx,
    principal: Principal,
    resource: audit.Resource,
    answer: Answer,
) -> web.StreamResponse:
    """Record a change in the audit trail (after success only: a refused change changed
    nothing), then render the handler's answer."""
    if operation.changes:
        await audit.record(
            ctx.db,
            _actor(principal),
            operation.operation_id,
            resource,
            ctx.sent_fields,
            ctx.request.get(REQUEST_ID),
            instance_id=ctx.instance_id,
        )
    if isinstance(answer, web.StreamResponse):
        return answer
    if answer is None:
        return web.Response(status=204)
    return web.json_response(answer.model_dump(mode="json"), status=operation.status)


def platform_handler_for(
    operation: Operation,
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        app = request.app
        authorizer = app[AUTHORIZER]
        principal = await authorizer.authenticate(request)
        authorizer.require_operator(principal)
        ctx = PlatformCtx(
            request, app[DATABASE], app[SECRETS], app[API_SETTINGS], principal=principal
        )
        answer = await cast(PlatformHandler, operation.handler)(ctx)
        resource = _platform_resource(operation, answer)
        return await _answered(operation, ctx, principal, resource, answer)

    handle.__name__ = operation.operation_id
    return handle


def _platform_resource(operation: Operation, answer: Answer) -> audit.Resource:
    shown = getattr(answer, "id", None) if isinstance(answer, BaseModel) else None
    return audit.Resource(operation.tag, shown if isinstance(shown, str) else None)


def add_routes(app: web.Application) -> None:
    for operation in OPERATIONS:
        app.router.add_route(operation.method, operation.path, handler_for(operation))
    for operation in PLATFORM_OPERATIONS:
        app.router.add_route(operation.method, operation.path, platform_handler_for(operation))


# The webhook operations are declared in a module of their own (it uses op, Ctx and _page).
from broker.api import imports as _imports  # noqa: E402, F401
from broker.api import orphans as _orphans  # noqa: E402, F401
from broker.api import webhooks as _webhooks  # noqa: E402, F401

__all__ = ["OPERATIONS", "PLATFORM_OPERATIONS", "add_routes", "platform_op"]
