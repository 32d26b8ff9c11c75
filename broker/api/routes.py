"""The operations of the backup-manager API. Each is declared once, with the models of its
body, query string and answer; the routes and the OpenAPI document are both built from
:data:`OPERATIONS`. Handlers parse, call one domain function, and render."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, TypeAdapter, ValidationError

from backup import destinations, jobs, plans, restore_points
from backup.database import Database, Document
from backup.pagination import Page
from backup.secrets import SecretBox
from broker.api import models as m
from broker.api import views
from broker.api.auth import AUTHORIZER
from broker.api.settings import ApiSettings
from broker.context import DATABASE, SECRETS
from broker.errors import ApiError, from_body, from_validation
from webguard.body import BodyError, read_json_object

PREFIX = "/v1/service_instances/{instance_id}"
API_SETTINGS = web.AppKey("api_settings", ApiSettings)
OPENER = web.AppKey("api_store_opener", Any)
"""How the API and the background loops open an object store (``storage.open_store``)."""
Q = TypeVar("Q", bound=BaseModel)


@dataclass
class Ctx:
    """What a handler gets: the request, the instance the caller may act on, and the app's
    resources."""

    request: web.Request
    instance: Document
    db: Database
    box: SecretBox
    api: ApiSettings

    @property
    def instance_id(self) -> str:
        return str(self.instance["_id"])

    def param(self, name: str) -> str:
        return self.request.match_info[name]

    async def raw_body(self) -> dict[str, object]:
        """The JSON object sent, not yet validated."""
        try:
            return await read_json_object(self.request)
        except BodyError as exc:
            raise from_body(exc) from None

    async def body(self, model: Any) -> Any:
        return adapter(model).validate_python(await self.raw_body())

    def query(self, model: type[Q]) -> Q:
        """The query string validated by ``model``; a parameter given twice is refused."""
        q = self.request.query
        repeated = sorted({k for k in q if len(q.getall(k)) > 1})
        if repeated:
            raise ApiError(
                400,
                "invalid_input",
                f"Invalid query: {repeated[0]} is given more than once.",
                extra={"field": repeated[0]},
            )
        try:
            return model.model_validate(dict(q))
        except ValidationError as exc:
            raise from_validation(exc, "query") from None


@dataclass
class Operation:
    method: str
    path: str
    handler: Callable[[Ctx], Awaitable[Any]]
    summary: str
    tag: str
    manage: bool
    status: int = 200
    body: Any = None
    body_required: bool = True
    response: Any = None
    query: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()
    also: dict[int, str] = field(default_factory=dict)
    """Other success statuses and what they mean (e.g. 202 of a cancel)."""

    @property
    def operation_id(self) -> str:
        return self.handler.__name__


OPERATIONS: list[Operation] = []
_ADAPTERS: dict[int, TypeAdapter[Any]] = {}


def adapter(tp: Any) -> TypeAdapter[Any]:
    key = id(tp)
    if key not in _ADAPTERS:
        _ADAPTERS[key] = TypeAdapter(tp)
    return _ADAPTERS[key]


def out(tp: Any, data: Any) -> Any:
    """``data`` checked against the answer's model and rendered as JSON values."""
    a = adapter(tp)
    return a.dump_python(a.validate_python(data), mode="json")


def op(
    method: str,
    path: str,
    *,
    summary: str,
    tag: str,
    status: int = 200,
    body: Any = None,
    body_required: bool = True,
    response: Any = None,
    query: type[BaseModel] | None = None,
    errors: tuple[int, ...] = (),
    also: dict[int, str] | None = None,
) -> Callable[[Callable[[Ctx], Awaitable[Any]]], Callable[[Ctx], Awaitable[Any]]]:
    """Declare an operation; GET reads (Cloud Foundry ``read``), all else changes (``manage``)."""

    def register(fn: Callable[[Ctx], Awaitable[Any]]) -> Callable[[Ctx], Awaitable[Any]]:
        OPERATIONS.append(
            Operation(
                method,
                PREFIX + path,
                fn,
                summary,
                tag,
                manage=method != "GET",
                status=status,
                body=body,
                body_required=body_required,
                response=response,
                query=query,
                errors=errors,
                also=also or {},
            )
        )
        return fn

    return register


def _page(tp: Any, page: Page, items: list[Any]) -> Any:
    return out(
        tp,
        {
            "items": items,
            "total": page.total,
            "next_cursor": page.next_cursor,
            "page": page.page,
            "as_of": page.as_of,
        },
    )


def _check(result: destinations.CheckResult) -> Any:
    return out(
        m.ValidationOut,
        {
            "ok": result.ok,
            "error": result.error,
            "description": result.description,
            "steps": [_step(s) for s in result.steps],
        },
    )


def _step(step: Any) -> dict[str, Any]:
    return {
        "name": step.name,
        "ok": step.ok,
        "error_code": step.error_code,
        "message": step.message,
    }


# --- items ----------------------------------------------------------------------------------


@op("GET", "/items", summary="The instance's backup items", tag="items", response=m.ItemsOut)
async def list_items(c: Ctx) -> Any:
    return out(m.ItemsOut, {"items": list(c.instance.get("items") or [])})


# --- destinations ---------------------------------------------------------------------------


@op(
    "GET",
    "/destinations",
    summary="List destinations, newest first",
    tag="destinations",
    response=m.DestinationPage,
    query=m.ListQuery,
)
async def list_destinations(c: Ctx) -> Any:
    limit, cursor = c.query(m.ListQuery).window()
    page = await destinations.list_page(c.db, c.instance_id, limit, cursor)
    return _page(m.DestinationPage, page, [views.destination(d) for d in page.items])


@op(
    "POST",
    "/destinations",
    summary="Create a destination (with ?validate=true only if a probe succeeds)",
    tag="destinations",
    status=201,
    body=m.DestinationIn,
    response=m.DestinationOut,
    query=m.CheckQuery,
    errors=(409, 422),
)
async def create_destination(c: Ctx) -> Any:
    check = c.query(m.CheckQuery)
    spec = destinations.parse(await c.raw_body())
    timeout = c.api.validate_timeout_seconds if check.validate_ else None
    doc = await destinations.create(c.db, c.box, c.instance_id, spec, verify_timeout=timeout)
    return out(m.DestinationOut, views.destination(doc))


@op(
    "POST",
    "/destinations/validate",
    summary="Check destination settings before creating them: write, read back and delete "
    "a probe object (the answer says what failed; a name is not needed)",
    tag="destinations",
    body=m.DestinationIn,
    response=m.ValidationOut,
    errors=(422,),  # egress_denied: the host may not be connected to
)
async def validate_new_destination(c: Ctx) -> Any:
    raw = await c.raw_body()
    raw.setdefault("name", "validation")
    spec = destinations.parse(raw)
    return _check(await destinations.check(spec.settings(), c.api.validate_timeout_seconds))


@op(
    "GET",
    "/destinations/{destination_id}",
    summary="Read a destination",
    tag="destinations",
    response=m.DestinationOut,
)
async def get_destination(c: Ctx) -> Any:
    doc = await destinations.get(c.db, c.instance_id, c.param("destination_id"))
    return out(m.DestinationOut, views.destination(doc))


@op(
    "PATCH",
    "/destinations/{destination_id}",
    summary="Change a destination (JSON merge patch; the secret is kept unless sent; with "
    "?validate=true only if a probe succeeds)",
    tag="destinations",
    body=m.DestinationPatch,
    response=m.DestinationOut,
    query=m.CheckQuery,
    errors=(409, 422),
)
async def update_destination(c: Ctx) -> Any:
    check = c.query(m.CheckQuery)
    patch = await c.raw_body()
    timeout = c.api.validate_timeout_seconds if check.validate_ else None
    doc = await destinations.update(
        c.db, c.box, c.instance_id, c.param("destination_id"), patch, verify_timeout=timeout
    )
    return out(m.DestinationOut, views.destination(doc))


@op(
    "DELETE",
    "/destinations/{destination_id}",
    summary="Delete a destination (refused while a plan, restore point or job uses it)",
    tag="destinations",
    status=204,
    errors=(409,),
)
async def delete_destination(c: Ctx) -> Any:
    await destinations.delete(c.db, c.instance_id, c.param("destination_id"))


@op(
    "POST",
    "/destinations/{destination_id}/validate",
    summary="Check a stored destination: write, read back and delete a probe object (with a "
    "JSON merge patch as body: check that change without saving it)",
    tag="destinations",
    body=m.DestinationPatch,
    body_required=False,
    response=m.ValidationOut,
    errors=(422,),  # egress_denied: the host may not be connected to
)
async def validate_destination(c: Ctx) -> Any:
    patch = await c.raw_body() if c.request.body_exists else None
    result = await destinations.check_stored(
        c.db,
        c.box,
        c.instance_id,
        c.param("destination_id"),
        c.api.validate_timeout_seconds,
        patch,
    )
    return _check(result)


# --- plans ----------------------------------------------------------------------------------


async def _plan_views(store: Database, docs: list[Document]) -> list[dict[str, Any]]:
    last = await jobs.last_jobs(store, [d.get("last_job_id") for d in docs])
    return [views.plan(d, last.get(d.get("last_job_id") or "")) for d in docs]


@op(
    "GET",
    "/plans",
    summary="List backup plans, newest first",
    tag="plans",
    response=m.PlanPage,
    query=m.ListQuery,
)
async def list_plans(c: Ctx) -> Any:
    limit, cursor = c.query(m.ListQuery).window()
    page = await plans.list_page(c.db, c.instance_id, limit, cursor)
    return _page(m.PlanPage, page, await _plan_views(c.db, page.items))


@op(
    "POST",
    "/plans",
    summary="Create a backup plan",
    tag="plans",
    status=201,
    body=m.PlanIn,
    response=m.PlanOut,
    errors=(409,),
)
async def create_plan(c: Ctx) -> Any:
    spec = await c.body(m.PlanIn)
    doc = await plans.create(c.db, c.box, c.instance, spec, c.api.min_plan_interval_seconds)
    return out(m.PlanOut, views.plan(doc, None))


@op("GET", "/plans/{plan_id}", summary="Read a backup plan", tag="plans", response=m.PlanOut)
async def get_plan(c: Ctx) -> Any:
    doc = await plans.get(c.db, c.instance_id, c.param("plan_id"))
    return out(m.PlanOut, (await _plan_views(c.db, [doc]))[0])


@op(
    "PATCH",
    "/plans/{plan_id}",
    summary="Change a backup plan (JSON merge patch; the merged plan is validated as a whole "
    "and returned)",
    tag="plans",
    body=m.PlanPatch,
    response=m.PlanOut,
    errors=(409,),
)
async def update_plan(c: Ctx) -> Any:
    patch = await c.raw_body()
    adapter(m.PlanPatch).validate_python(patch)
    doc = await plans.update(
        c.db, c.box, c.instance, c.param("plan_id"), patch, c.api.min_plan_interval_seconds
    )
    return out(m.PlanOut, (await _plan_views(c.db, [doc]))[0])


@op(
    "DELETE",
    "/plans/{plan_id}",
    summary="Delete a backup plan (its restore points stay until retention or a delete "
    "removes them; its queued jobs are cancelled)",
    tag="plans",
    status=204,
)
async def delete_plan(c: Ctx) -> Any:
    await plans.delete(c.db, c.instance_id, c.param("plan_id"))


# --- backups and restores -------------------------------------------------------------------


async def _backup_now(c: Ctx, plan_id: str) -> Any:
    plan = await plans.get(c.db, c.instance_id, plan_id)
    return out(m.JobOut, views.job(await jobs.start_backup(c.db, plan), None))


@op(
    "POST",
    "/backups",
    summary="Back up now: queue a manual backup job of a plan",
    tag="jobs",
    status=202,
    body=m.BackupIn,
    response=m.JobOut,
    errors=(409,),
)
async def start_backup(c: Ctx) -> Any:
    spec = await c.body(m.BackupIn)
    return await _backup_now(c, spec.plan_id)


@op(
    "POST",
    "/plans/{plan_id}/backups",
    summary="Back up this plan now (the same as POST /backups with its plan_id)",
    tag="jobs",
    status=202,
    response=m.JobOut,
    errors=(409,),
)
async def start_plan_backup(c: Ctx) -> Any:
    return await _backup_now(c, c.param("plan_id"))


@op(
    "POST",
    "/restores",
    summary="Restore: queue a restore job of a restore point (all or some of its items), "
    "into this instance or another one the caller may manage (target_instance_id), each item "
    "into itself or another registered item (target)",
    tag="jobs",
    status=202,
    body=m.RestoreIn,
    response=m.JobOut,
    errors=(409,),
)
async def start_restore(c: Ctx) -> Any:
    spec = await c.body(m.RestoreIn)
    target = None
    if spec.target_instance_id is not None and spec.target_instance_id != c.instance_id:
        # Before the restore point is looked at: a target the caller may not manage answers
        # the same whatever the point, and one it may not see exactly like an unknown one.
        target = await c.request.app[AUTHORIZER].authorize_also(c.request, spec.target_instance_id)
    point = await restore_points.get(c.db, c.instance_id, spec.restore_point_id)
    job = await jobs.start_restore(c.db, point, spec.pairs(), target=target)
    return out(m.JobOut, views.job(job, None))


# --- jobs -----------------------------------------------------------------------------------


@op(
    "GET",
    "/jobs",
    summary="List jobs, newest first (filter by type, status, plan)",
    tag="jobs",
    response=m.JobPage,
    query=m.JobListQuery,
)
async def list_jobs(c: Ctx) -> Any:
    q = c.query(m.JobListQuery)
    limit, cursor = q.window()
    page = await jobs.list_page(
        c.db,
        c.instance_id,
        type=q.type,
        status=q.status,
        plan_id=q.plan_id,
        limit=limit,
        cursor=cursor,
    )
    return _page(m.JobPage, page, [views.job(d, None) for d in page.items])


@op(
    "GET",
    "/jobs/{job_id}",
    summary="Read a job: status, times, per-item results and stage logs (each cut to its "
    "last JOB_LOG_MAX_BYTES)",
    tag="jobs",
    response=m.JobOut,
)
async def get_job(c: Ctx) -> Any:
    doc = await jobs.get(c.db, c.instance_id, c.param("job_id"))
    return out(m.JobOut, views.job(doc, c.api.job_log_max_bytes, c.api.job_logs_total_max_bytes))


@op(
    "POST",
    "/jobs/{job_id}/cancel",
    summary="Cancel a job: a queued one ends at once (200); a running one is asked to stop "
    "(202) and the runner ends it",
    tag="jobs",
    response=m.JobOut,
    errors=(409,),
    also={202: "A running job was asked to stop; it ends CANCELLED shortly."},
)
async def cancel_job(c: Ctx) -> Any:
    doc = await jobs.cancel(c.db, c.instance_id, c.param("job_id"))
    status = 200 if doc["status"] == jobs.JobStatus.CANCELLED else 202
    return web.json_response(out(m.JobOut, views.job(doc, None)), status=status)


# --- restore points -------------------------------------------------------------------------


@op(
    "GET",
    "/restore_points",
    summary="List restore points (successful backups), newest first",
    tag="restore points",
    response=m.RestorePointPage,
    query=m.RestorePointListQuery,
)
async def list_restore_points(c: Ctx) -> Any:
    q = c.query(m.RestorePointListQuery)
    limit, cursor = q.window()
    page = await restore_points.list_page(
        c.db, c.instance_id, plan_id=q.plan_id, limit=limit, cursor=cursor
    )
    return _page(m.RestorePointPage, page, [views.restore_point(d) for d in page.items])


@op(
    "GET",
    "/restore_points/{restore_point_id}",
    summary="Read a restore point",
    tag="restore points",
    response=m.RestorePointOut,
)
async def get_restore_point(c: Ctx) -> Any:
    doc = await restore_points.get(c.db, c.instance_id, c.param("restore_point_id"))
    return out(m.RestorePointOut, views.restore_point(doc))


@op(
    "DELETE",
    "/restore_points/{restore_point_id}",
    summary="Delete a restore point: its stored files, then the record",
    tag="restore points",
    status=204,
    errors=(409, 503),
)
async def delete_restore_point(c: Ctx) -> Any:
    await restore_points.delete(
        c.db,
        c.box,
        c.instance_id,
        c.param("restore_point_id"),
        opener=c.request.app[OPENER],
    )


# --- wiring ---------------------------------------------------------------------------------


def handler_for(operation: Operation) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        app = request.app
        instance = await app[AUTHORIZER].authorize(
            request, request.match_info["instance_id"], operation.manage
        )
        ctx = Ctx(request, instance, app[DATABASE], app[SECRETS], app[API_SETTINGS])
        result = await operation.handler(ctx)
        if isinstance(result, web.StreamResponse):
            return result
        if operation.status == 204:
            return web.Response(status=204)
        return web.json_response(result, status=operation.status)

    handle.__name__ = operation.operation_id
    return handle


def add_routes(app: web.Application) -> None:
    for operation in OPERATIONS:
        app.router.add_route(operation.method, operation.path, handler_for(operation))


__all__ = ["OPERATIONS", "add_routes"]
