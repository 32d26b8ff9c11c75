"""The operations of the backup-manager API. Each is declared once with its models; the
routes and the OpenAPI document are both built from :data:`OPERATIONS`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import TypeAdapter

from backup import destinations, jobs, plans, restore_points
from backup.errors import InvalidInput
from backup.pagination import DEFAULT_LIMIT, MAX_LIMIT, Page
from backup.secrets import SecretBox
from backup.store import Document, Store
from broker.api import models as m
from broker.api import validation, views
from broker.api.auth import AUTHORIZER
from broker.api.settings import ApiSettings
from broker.context import SECRETS, STORE
from broker.errors import ApiError, read_json

PREFIX = "/v1/service_instances/{instance_id}"
API_SETTINGS = web.AppKey("api_settings", ApiSettings)


@dataclass
class Ctx:
    request: web.Request
    instance: Document
    store: Store
    box: SecretBox
    api: ApiSettings

    def param(self, name: str) -> str:
        return self.request.match_info[name]

    async def body(self, model: Any) -> Any:
        try:
            data = await read_json(self.request)
        except (ValueError, RecursionError):  # int too long, nesting too deep
            raise ApiError(400, "malformed_json", "The request body is not valid JSON.") from None
        if not isinstance(data, dict):
            raise ApiError(400, "invalid_input", "The request body must be a JSON object.")
        return _adapter(model).validate_python(data)

    async def raw_body(self) -> dict[str, Any]:
        try:
            data = await read_json(self.request)
        except (ValueError, RecursionError):
            raise ApiError(400, "malformed_json", "The request body is not valid JSON.") from None
        if not isinstance(data, dict):
            raise ApiError(400, "invalid_input", "The request body must be a JSON object.")
        return data

    def page_args(self) -> tuple[int, str | None]:
        q = self.request.query
        raw = q.get("limit", str(DEFAULT_LIMIT))
        if not raw.isdigit() or len(raw) > 4 or not 1 <= int(raw) <= MAX_LIMIT:
            raise InvalidInput(
                f"limit must be a whole number from 1 to {MAX_LIMIT}.", field="limit"
            )
        cursor = q.get("cursor") or None
        return int(raw), cursor


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
    response: Any = None
    query: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    errors: tuple[int, ...] = ()

    @property
    def operation_id(self) -> str:
        return self.handler.__name__


OPERATIONS: list[Operation] = []
_ADAPTERS: dict[Any, TypeAdapter[Any]] = {}


def _adapter(tp: Any) -> TypeAdapter[Any]:
    key = id(tp)
    if key not in _ADAPTERS:
        _ADAPTERS[key] = TypeAdapter(tp)
    return _ADAPTERS[key]


def out(tp: Any, data: Any) -> Any:
    """``data`` checked against the response model and rendered as JSON values."""
    adapter = _adapter(tp)
    return adapter.dump_python(adapter.validate_python(data), mode="json")


PAGE_QUERY = [
    ("limit", f"Page size, 1 to {MAX_LIMIT} (default {DEFAULT_LIMIT}).", {"type": "integer"}),
    ("cursor", "The next_cursor of the previous page.", {"type": "string"}),
]


def op(
    method: str,
    path: str,
    *,
    summary: str,
    tag: str,
    status: int = 200,
    body: Any = None,
    response: Any = None,
    query: list[tuple[str, str, dict[str, Any]]] | None = None,
    errors: tuple[int, ...] = (),
) -> Callable[[Callable[[Ctx], Awaitable[Any]]], Callable[[Ctx], Awaitable[Any]]]:
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
                response=response,
                query=query or [],
                errors=errors,
            )
        )
        return fn

    return register


def _page(tp: Any, page: Page, view: Callable[[Document], Any]) -> Any:
    return out(
        tp,
        {
            "items": [view(d) for d in page.items],
            "total": page.total,
            "next_cursor": page.next_cursor,
        },
    )


# --- items ----------------------------------------------------------------------------------


@op("GET", "/items", summary="The instance's backup items", tag="items", response=m.ItemsOut)
async def list_items(c: Ctx) -> Any:
    return out(m.ItemsOut, {"items": list(c.instance.get("items") or [])})


# --- destinations ---------------------------------------------------------------------------


def _destination(data: dict[str, Any]) -> m.S3DestinationIn | m.SwiftDestinationIn:
    """Validated with the model its ``type`` names, so errors name plain field paths."""
    kind = data.get("type")
    if kind == "S3":
        return m.S3DestinationIn.model_validate(data)
    if kind == "SWIFT":
        return m.SwiftDestinationIn.model_validate(data)
    return _adapter(m.DestinationIn).validate_python(data)


@op(
    "GET",
    "/destinations",
    summary="List destinations",
    tag="destinations",
    response=m.DestinationPage,
    query=PAGE_QUERY,
)
async def list_destinations(c: Ctx) -> Any:
    limit, cursor = c.page_args()
    page = await destinations.list_page(c.store, c.instance["_id"], limit, cursor)
    return _page(m.DestinationPage, page, views.destination)


@op(
    "POST",
    "/destinations",
    summary="Create a destination",
    tag="destinations",
    status=201,
    body=m.DestinationIn,
    response=m.DestinationOut,
    errors=(409,),
)
async def create_destination(c: Ctx) -> Any:
    spec = _destination(await c.raw_body())
    doc = await destinations.create(c.store, c.box, c.instance["_id"], spec.name, spec.settings())
    return out(m.DestinationOut, views.destination(doc))


@op(
    "POST",
    "/destinations/validate",
    summary="Check destination settings before creating it (writes, reads and deletes a probe)",
    tag="destinations",
    body=m.DestinationIn,
    response=m.ValidationOut,
)
async def validate_new_destination(c: Ctx) -> Any:
    raw = await c.raw_body()
    raw.setdefault("name", "validation")  # the same body as a creation; a name is not needed
    spec = _destination(raw)
    report = await validation.validate(spec.settings(), c.api.validate_timeout_seconds)
    return out(m.ValidationOut, report)


@op(
    "GET",
    "/destinations/{destination_id}",
    summary="Read a destination",
    tag="destinations",
    response=m.DestinationOut,
)
async def get_destination(c: Ctx) -> Any:
    doc = await destinations.get(c.store, c.instance["_id"], c.param("destination_id"))
    return out(m.DestinationOut, views.destination(doc))


@op(
    "PATCH",
    "/destinations/{destination_id}",
    summary="Change a destination (merge patch; secrets not sent are kept)",
    tag="destinations",
    body=m.DestinationPatch,
    response=m.DestinationOut,
    errors=(409,),
)
async def update_destination(c: Ctx) -> Any:
    current = await destinations.get(c.store, c.instance["_id"], c.param("destination_id"))
    patch = await c.raw_body()
    kind = current["type"]
    if patch.get("type", kind) != kind:
        merged: dict[str, Any] = {"name": current["name"], **patch}
    else:
        public = views.destination(current)
        keep = set(
            m.S3DestinationIn.model_fields if kind == "S3" else m.SwiftDestinationIn.model_fields
        )
        base = {k: v for k, v in public.items() if k in keep and v is not None}
        if kind == "S3" and "plain_http" in patch and "endpoint" not in patch:
            base.pop("plain_http", None)
            endpoint = str(base.get("endpoint") or "")
            if "://" in endpoint:
                base["endpoint"] = endpoint.split("://", 1)[1]
        elif kind == "S3":
            base.pop("plain_http", None)
        merged = plans.merge(base, patch)
        secret = destinations.SECRET_FIELD[kind]
        if secret not in merged:
            opened = c.box.open_map(current.get("secrets") or {}, f"destinations/{current['_id']}")
            if secret in opened:
                merged[secret] = opened[secret]
    spec = _destination(merged)
    doc = await destinations.replace(c.store, c.box, current, spec.name, spec.settings())
    return out(m.DestinationOut, views.destination(doc))


@op(
    "DELETE",
    "/destinations/{destination_id}",
    summary="Delete a destination (refused while a plan or restore point uses it)",
    tag="destinations",
    status=204,
    errors=(409,),
)
async def delete_destination(c: Ctx) -> Any:
    await destinations.delete(c.store, c.instance["_id"], c.param("destination_id"))


@op(
    "POST",
    "/destinations/{destination_id}/validate",
    summary="Check a stored destination (writes, reads and deletes a probe)",
    tag="destinations",
    response=m.ValidationOut,
)
async def validate_destination(c: Ctx) -> Any:
    doc = await destinations.get(c.store, c.instance["_id"], c.param("destination_id"))
    settings = destinations.settings_for(doc, c.box)
    return out(m.ValidationOut, await validation.validate(settings, c.api.validate_timeout_seconds))


# --- plans ----------------------------------------------------------------------------------


async def _plan_views(store: Store, docs: list[Document]) -> list[dict[str, Any]]:
    last = await jobs.last_jobs(store, [d.get("last_job_id") for d in docs])
    return [views.plan(d, last.get(d.get("last_job_id") or "")) for d in docs]


@op(
    "GET",
    "/plans",
    summary="List backup plans",
    tag="plans",
    response=m.PlanPage,
    query=PAGE_QUERY,
)
async def list_plans(c: Ctx) -> Any:
    limit, cursor = c.page_args()
    page = await plans.list_page(c.store, c.instance["_id"], limit, cursor)
    items = await _plan_views(c.store, page.items)
    return out(m.PlanPage, {"items": items, "total": page.total, "next_cursor": page.next_cursor})


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
    doc = await plans.create(c.store, c.box, c.instance, spec, c.api.min_plan_interval_seconds)
    return out(m.PlanOut, views.plan(doc, None))


@op("GET", "/plans/{plan_id}", summary="Read a backup plan", tag="plans", response=m.PlanOut)
async def get_plan(c: Ctx) -> Any:
    doc = await plans.get(c.store, c.instance["_id"], c.param("plan_id"))
    return out(m.PlanOut, (await _plan_views(c.store, [doc]))[0])


@op(
    "PATCH",
    "/plans/{plan_id}",
    summary="Change a backup plan (JSON merge patch; the result is validated as a whole)",
    tag="plans",
    body=m.PlanPatch,
    response=m.PlanOut,
    errors=(409,),
)
async def update_plan(c: Ctx) -> Any:
    await plans.get(c.store, c.instance["_id"], c.param("plan_id"))
    patch = await c.raw_body()
    _adapter(m.PlanPatch).validate_python(patch)
    doc = await plans.update(
        c.store, c.box, c.instance, c.param("plan_id"), patch, c.api.min_plan_interval_seconds
    )
    return out(m.PlanOut, (await _plan_views(c.store, [doc]))[0])


@op(
    "DELETE",
    "/plans/{plan_id}",
    summary="Delete a backup plan (its restore points stay; its queued jobs are cancelled)",
    tag="plans",
    status=204,
)
async def delete_plan(c: Ctx) -> Any:
    await plans.delete(c.store, c.instance["_id"], c.param("plan_id"))


@op(
    "POST",
    "/plans/{plan_id}/backups",
    summary="Back up now: queue a manual backup job of the plan",
    tag="jobs",
    status=202,
    response=m.JobOut,
    errors=(409,),
)
async def start_backup(c: Ctx) -> Any:
    plan = await plans.get(c.store, c.instance["_id"], c.param("plan_id"))
    job = await jobs.start_backup(c.store, plan)
    return out(m.JobOut, views.job(job, None))


# --- jobs -----------------------------------------------------------------------------------


@op(
    "GET",
    "/jobs",
    summary="List jobs, newest first",
    tag="jobs",
    response=m.JobPage,
    query=[
        ("type", "BACKUP or RESTORE", {"type": "string", "enum": ["BACKUP", "RESTORE"]}),
        ("status", "Only jobs in this status", {"type": "string", "enum": list(jobs.STATUSES)}),
        ("plan_id", "Only jobs of this plan", {"type": "string"}),
        *PAGE_QUERY,
    ],
)
async def list_jobs(c: Ctx) -> Any:
    limit, cursor = c.page_args()
    q = c.request.query
    filters = _adapter(m.JobQuery).validate_python(
        {k: q[k] for k in ("type", "status", "plan_id") if k in q}
    )
    page = await jobs.list_page(
        c.store,
        c.instance["_id"],
        type=filters.type,
        status=filters.status,
        plan_id=filters.plan_id,
        limit=limit,
        cursor=cursor,
    )
    return _page(m.JobPage, page, lambda d: views.job(d, None))


@op(
    "GET",
    "/jobs/{job_id}",
    summary="Read a job, with its stage logs (each cut to a bounded size)",
    tag="jobs",
    response=m.JobOut,
)
async def get_job(c: Ctx) -> Any:
    doc = await jobs.get(c.store, c.instance["_id"], c.param("job_id"))
    return out(m.JobOut, views.job(doc, c.api.job_log_max_bytes))


@op(
    "POST",
    "/jobs/{job_id}/cancel",
    summary="Cancel a job: a queued one at once (200), a running one is asked to stop (202)",
    tag="jobs",
    response=m.JobOut,
    errors=(409,),
)
async def cancel_job(c: Ctx) -> Any:
    doc = await jobs.cancel(c.store, c.instance["_id"], c.param("job_id"))
    status = 200 if doc["status"] == jobs.CANCELLED else 202
    return web.json_response(out(m.JobOut, views.job(doc, None)), status=status)


# --- restore points and restores ------------------------------------------------------------


@op(
    "GET",
    "/restore_points",
    summary="List restore points, newest first",
    tag="restore points",
    response=m.RestorePointPage,
    query=[("plan_id", "Only restore points of this plan", {"type": "string"}), *PAGE_QUERY],
)
async def list_restore_points(c: Ctx) -> Any:
    limit, cursor = c.page_args()
    plan_id = c.request.query.get("plan_id") or None
    page = await restore_points.list_page(
        c.store, c.instance["_id"], plan_id=plan_id, limit=limit, cursor=cursor
    )
    return _page(m.RestorePointPage, page, views.restore_point)


@op(
    "GET",
    "/restore_points/{restore_point_id}",
    summary="Read a restore point",
    tag="restore points",
    response=m.RestorePointOut,
)
async def get_restore_point(c: Ctx) -> Any:
    doc = await restore_points.get(c.store, c.instance["_id"], c.param("restore_point_id"))
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
        c.store,
        c.box,
        c.instance["_id"],
        c.param("restore_point_id"),
        opener=c.request.app[OPENER],
    )


@op(
    "POST",
    "/restores",
    summary="Restore: queue a restore job of a restore point (all or some of its items)",
    tag="jobs",
    status=202,
    body=m.RestoreIn,
    response=m.JobOut,
    errors=(409,),
)
async def start_restore(c: Ctx) -> Any:
    spec = await c.body(m.RestoreIn)
    point = await restore_points.get(c.store, c.instance["_id"], spec.restore_point_id)
    job = await jobs.start_restore(c.store, point, spec.items)
    return out(m.JobOut, views.job(job, None))


# --- wiring ---------------------------------------------------------------------------------

OPENER = web.AppKey("api_store_opener", Any)


def handler_for(operation: Operation) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        app = request.app
        instance = await app[AUTHORIZER].authorize(
            request, request.match_info["instance_id"], operation.manage
        )
        ctx = Ctx(request, instance, app[STORE], app[SECRETS], app[API_SETTINGS])
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
