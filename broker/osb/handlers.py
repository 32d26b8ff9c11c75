"""One small handler per OSB endpoint: parse and check the request, call one domain function
(:mod:`backup.instances`, :mod:`backup.bindings`), render the answer. Every failure is an
:class:`~broker.errors.ApiError` or a domain error carrying its status and OSB error key."""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from aiohttp import web
from pydantic import BaseModel, ValidationError

from backup import bindings
from backup.database import Document
from backup.instances import DELETED, Instances, Outcome, ProvisionRequest, UpdateRequest
from backup.registration import Registration
from broker.context import DATABASE, SETTINGS
from broker.errors import ApiError, from_validation
from broker.osb.catalog import Catalog, Plan, check_parameters
from broker.osb.models import BindBody, MaintenanceInfo, ProvisionBody, UpdateBody
from broker.throttling import LoginGuard

log = structlog.get_logger(__name__)

CATALOG = web.AppKey("osb_catalog", Catalog)
INSTANCES = web.AppKey("osb_instances", Instances)

MIN_MINOR = 13  # 2.13: the oldest version whose semantics this broker implements
RETRY_AFTER_SECONDS = 5
_CHALLENGE = 'Basic realm="osb-backup-manager"'
_VERSION = re.compile(r"^\s*(\d{1,4})\.(\d{1,4})\s*$")
_MAX_ID = 256

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
M = TypeVar("M", bound=BaseModel)
OSB_MINOR = web.RequestKey("osb_minor", int)  # the x of the platform's X-Broker-API-Version 2.x


# --------------------------------------------------------------------------- the checks


def _authenticate(request: web.Request) -> None:
    settings = request.app[SETTINGS]
    header = request.headers.get("Authorization", "")
    scheme, _, credentials = header.partition(" ")
    user = password = None
    if scheme.lower() == "basic" and header.isascii() and len(header) < 4096:
        try:
            user, sep, password = (
                base64.b64decode(credentials.strip(), validate=True).decode().partition(":")
            )
        except (binascii.Error, UnicodeDecodeError, ValueError):
            user = None
        else:
            if not sep:
                user = None
    # A request without credentials is not a failed login; every other is counted, and an
    # address (or user name) that failed too often is held back before anything is checked.
    guard = (
        LoginGuard(request, user[:256] if user is not None else None, (settings.broker_username,))
        if header
        else None
    )
    if guard is not None:
        guard.check()
    expected = settings.broker_password
    ok = (
        user is not None
        and password is not None
        and expected is not None
        and hmac.compare_digest(user.encode(), settings.broker_username.encode())
        & hmac.compare_digest(password.encode(), expected.get_secret_value().encode())
    )
    if guard is not None and ok:
        guard.succeeded()
    elif guard is not None:
        guard.failed()
    if not ok:
        raise ApiError(
            401,
            "Unauthorized",
            "Send the broker's credentials with HTTP Basic authentication."
            if not header
            else "Wrong broker user name or password.",
            headers={"WWW-Authenticate": _CHALLENGE},
        )


def _check_version(request: web.Request) -> str:
    raw = request.headers.get("X-Broker-API-Version")
    supported = f"this broker speaks OSB API 2.{MIN_MINOR} to 2.17 (any 2.x from 2.{MIN_MINOR})"
    if raw is None:
        raise ApiError(
            412, "PreconditionFailed", f"The X-Broker-API-Version header is missing; {supported}."
        )
    match = _VERSION.match(raw)
    if not match or int(match[1]) != 2 or int(match[2]) < MIN_MINOR:
        raise ApiError(
            412,
            "PreconditionFailed",
            f"X-Broker-API-Version {raw[:20]!r} is not supported; {supported}.",
        )
    return f"{match[1]}.{match[2]}"


def originating_identity(header: str | None) -> str | None:
    """``X-Broker-API-Originating-Identity: <platform> <base64 JSON>`` as ``platform:user``
    (CF ``user_id``, Kubernetes ``username``); ``None`` when absent or unreadable."""
    if not header:
        return None
    platform, _, value = header.strip().partition(" ")
    try:
        decoded = json.loads(base64.b64decode(value.strip() + "=" * (-len(value.strip()) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        log.warning("originating_identity_unreadable", platform=platform[:40])
        return None
    if not isinstance(decoded, dict):
        return None
    user = next(
        (
            str(decoded[k])[:200]
            for k in ("user_id", "username", "user_name", "uid", "sub")
            if isinstance(decoded.get(k), str | int) and str(decoded[k])
        ),
        None,
    )
    return f"{platform[:40]}:{user}" if user else platform[:40] or None


def osb_endpoint(handler: Handler) -> Handler:
    """Broker authentication, the API version header, and the acting user in every log line."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        _authenticate(request)
        version = _check_version(request)
        request[OSB_MINOR] = int(version.split(".")[1])
        user = originating_identity(request.headers.get("X-Broker-API-Originating-Identity"))
        structlog.contextvars.bind_contextvars(acting_user=user, osb_version=version)
        return await handler(request)

    return wrapped


# --------------------------------------------------------------------------- parsing


def _path_id(request: web.Request, name: str) -> str:
    value = request.match_info[name]
    if not value or len(value) > _MAX_ID or not value.isprintable():
        raise ApiError(
            400,
            "BadRequest",
            f"{name} must be 1 to {_MAX_ID} printable characters.",
            extra={"field": name},
        )
    return value


def _flag(request: web.Request, name: str) -> bool:
    raw = request.query.get(name)
    if raw is None or raw.lower() == "false":
        return False
    if raw.lower() == "true":
        return True
    raise ApiError(400, "BadRequest", f"{name} must be true or false.", extra={"field": name})


def _required_query(request: web.Request, name: str) -> str:
    value = request.query.get(name)
    if not value:
        raise ApiError(
            400,
            "BadRequest",
            f"The query parameter {name} is required.",
            extra={"field": name},
        )
    return value


async def _body(request: web.Request, model: type[M]) -> M:
    raw = await request.read()
    if not raw.strip():
        raise ApiError(400, "BadRequest", "A JSON request body is required.")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        detail = (
            f": {exc.msg} at line {exc.lineno} column {exc.colno}"
            if isinstance(exc, json.JSONDecodeError)
            else ""
        )
        raise ApiError(
            400, "MalformedRequest", f"The request body is not valid JSON{detail}."
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, "BadRequest", "The request body must be a JSON object.")
    try:
        # The version decides which fields exist (maintenance_info from 2.15): broker.osb.models.
        return model.model_validate(data, context={"osb_minor": request.get(OSB_MINOR)})
    except ValidationError as exc:
        err = from_validation(exc)
        err.error = "BadRequest"
        raise err from None


def _registration(params: dict[str, Any]) -> Registration:
    try:
        return Registration.model_validate(params)
    except ValidationError as exc:
        raise _invalid_parameters(exc) from None


def _invalid_parameters(exc: ValidationError) -> ApiError:
    err = from_validation(exc, "parameters")
    field = f"parameters.{err.extra['field']}"
    problem = err.extra["problems"][0]["message"]
    return ApiError(
        400,
        "InvalidParameters",
        f"Invalid parameters: {field}: {problem}.",
        extra={"field": field},
    )


def _check_maintenance(plan: Plan, info: MaintenanceInfo | None) -> None:
    if info is not None and info.version != plan.maintenance_version:
        offered = plan.maintenance_version
        raise ApiError(
            422,
            "MaintenanceInfoConflict",
            f"maintenance_info.version {info.version[:50]!r} does not match the plan's "
            + (f"{offered!r}" if offered else "(the plan has none)")
            + "; fetch the catalog again.",
        )


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status)


def _acting_user() -> str | None:
    """The platform's user behind the request (its originating identity), if it said."""
    return structlog.contextvars.get_contextvars().get("acting_user")


def _maintenance(info: MaintenanceInfo | None) -> dict[str, str] | None:
    return {"version": info.version} if info is not None else None


def _operation_answer(outcome: Outcome) -> web.Response:
    """202 with the operation while it goes on (the platform polls last_operation), else 200."""
    if outcome.status == "accepted":
        return _json({"operation": outcome.operation}, 202)
    return _json({}, 200)


def _credentials(request: web.Request, instance_id: str, key: str | None) -> Document:
    base = request.app[SETTINGS].base_url
    creds: Document = {
        "uri": f"{base}/v1/service_instances/{instance_id}",
        "api_url": base,
        "instance_id": instance_id,
    }
    if key is not None:
        creds["key"] = key
    return creds


# --------------------------------------------------------------------------- catalog


@osb_endpoint
async def get_catalog(request: web.Request) -> web.Response:
    return web.Response(body=request.app[CATALOG].body, content_type="application/json")


# --------------------------------------------------------------------------- instances


@osb_endpoint
async def provision(request: web.Request) -> web.Response:
    instance_id = _path_id(request, "instance_id")
    accepts = _flag(request, "accepts_incomplete")
    body = await _body(request, ProvisionBody)
    plan = request.app[CATALOG].plan(body.service_id, body.plan_id)
    if body.maintenance_info is not None:
        _check_maintenance(plan, body.maintenance_info)
    params = body.parameters or {}
    check_parameters(plan.create, params)
    outcome = await request.app[INSTANCES].provision(
        ProvisionRequest(
            instance_id=instance_id,
            service_id=body.service_id,
            plan_id=body.plan_id,
            registration=_registration(params),
            delete_backups_default=plan.delete_backups_default,
            context=body.context or {},
            organization_guid=body.organization_guid,
            space_guid=body.space_guid,
            maintenance_info=_maintenance(body.maintenance_info),
            acting_user=_acting_user(),
        ),
        accepts_incomplete=accepts,
    )
    return _operation_answer(outcome)


def _instance_view(doc: Document) -> Document:
    agent = doc.get("agent") or {}
    view: Document = {
        "service_id": doc.get("service_id"),
        "plan_id": doc.get("plan_id"),
        "parameters": doc.get("parameters") or {},
        "metadata": {
            "labels": {},
            "attributes": {
                "state": doc.get("state"),
                "agent_kind": agent.get("kind"),
                "agent_version": agent.get("version"),
                "delete_backups_on_deprovision": bool(doc.get("delete_backups_on_deprovision")),
            },
        },
    }
    if doc.get("maintenance_info"):
        view["maintenance_info"] = {"version": doc["maintenance_info"].get("version")}
    return view


@osb_endpoint
async def fetch_instance(request: web.Request) -> web.Response:
    instance_id = _path_id(request, "instance_id")
    doc = await request.app[INSTANCES].fetch(instance_id)
    return _json(_instance_view(doc))


@osb_endpoint
async def update(request: web.Request) -> web.Response:
    instance_id = _path_id(request, "instance_id")
    accepts = _flag(request, "accepts_incomplete")
    body = await _body(request, UpdateBody)
    instances = request.app[INSTANCES]
    current = await instances.get_document(instance_id)
    if current is None or current.get("state") == DELETED:
        raise ApiError(404, "InstanceNotFound", f"Service instance {instance_id!r} does not exist.")
    catalog = request.app[CATALOG]
    plan = catalog.plan(body.service_id, body.plan_id or current["plan_id"])
    if body.plan_id and body.plan_id != current["plan_id"]:
        old = catalog.plans.get((current["service_id"], current["plan_id"]))
        if old is not None and not old.plan_updateable:
            raise ApiError(
                422,
                "PlanChangeNotSupported",
                f"Plan {old.name!r} cannot be changed to another plan.",
                extra={"field": "plan_id"},
            )
    if body.maintenance_info is not None:
        _check_maintenance(plan, body.maintenance_info)
    if body.parameters is not None:
        check_parameters(plan.update, body.parameters)
    try:
        outcome = await instances.update(
            UpdateRequest(
                instance_id=instance_id,
                service_id=body.service_id,
                plan_id=body.plan_id,
                parameters=body.parameters,
                delete_backups_default=plan.delete_backups_default,
                context=body.context,
                maintenance_info=_maintenance(body.maintenance_info),
                acting_user=_acting_user(),
            ),
            accepts_incomplete=accepts,
        )
    except ValidationError as exc:  # the merged parameters (the plan's schema passed them)
        raise _invalid_parameters(exc) from None
    return _operation_answer(outcome)


@osb_endpoint
async def deprovision(request: web.Request) -> web.Response:
    instance_id = _path_id(request, "instance_id")
    accepts = _flag(request, "accepts_incomplete")
    _required_query(request, "service_id")
    _required_query(request, "plan_id")
    outcome = await request.app[INSTANCES].deprovision(
        instance_id,
        accepts_incomplete=accepts,
        acting_user=_acting_user(),
    )
    return _operation_answer(outcome)


@osb_endpoint
async def instance_last_operation(request: web.Request) -> web.Response:
    instance_id = _path_id(request, "instance_id")
    # An operation this broker did not hand out (the osb-checker sends "provision") is ignored.
    operation = request.query.get("operation") or None
    body = await request.app[INSTANCES].last_operation(instance_id, operation)
    response = _json(body)
    if body["state"] == "in progress":
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


# --------------------------------------------------------------------------- bindings


@osb_endpoint
async def bind(request: web.Request) -> web.Response:
    instance_id = _path_id(request, "instance_id")
    binding_id = _path_id(request, "binding_id")
    _flag(request, "accepts_incomplete")  # checked, but binding is always synchronous
    body = await _body(request, BindBody)
    plan = request.app[CATALOG].plan(body.service_id, body.plan_id)
    if not plan.bindable:
        raise ApiError(400, "BadRequest", f"Plan {plan.name!r} is not bindable.")
    params = body.parameters or {}
    check_parameters(plan.binding, params)
    resource = body.bind_resource.model_dump(exclude_none=True) if body.bind_resource else {}
    if body.app_guid and "app_guid" not in resource:
        resource["app_guid"] = body.app_guid
    outcome = await bindings.bind(
        request.app[DATABASE],
        bindings.BindRequest(
            instance_id=instance_id,
            binding_id=binding_id,
            service_id=body.service_id,
            plan_id=body.plan_id,
            parameters=params,
            context=body.context or {},
            bind_resource=resource or None,
            acting_user=_acting_user(),
        ),
    )
    credentials = _credentials(request, instance_id, outcome.key)
    return _json({"credentials": credentials}, 201 if outcome.created else 200)


@osb_endpoint
async def fetch_binding(request: web.Request) -> web.Response:
    instance_id = _path_id(request, "instance_id")
    binding_id = _path_id(request, "binding_id")
    doc = await bindings.get(request.app[DATABASE], instance_id, binding_id)
    return _json(
        {
            "credentials": _credentials(request, instance_id, None),
            "parameters": doc.get("parameters") or {},
        }
    )


@osb_endpoint
async def unbind(request: web.Request) -> web.Response:
    instance_id = _path_id(request, "instance_id")
    binding_id = _path_id(request, "binding_id")
    _flag(request, "accepts_incomplete")
    _required_query(request, "service_id")
    _required_query(request, "plan_id")
    await bindings.unbind(request.app[DATABASE], instance_id, binding_id)
    return _json({})


@osb_endpoint
async def binding_last_operation(request: web.Request) -> web.Response:
    instance_id = _path_id(request, "instance_id")
    binding_id = _path_id(request, "binding_id")
    body = await bindings.last_operation(request.app[DATABASE], instance_id, binding_id)
    return _json(body)


def add_routes(app: web.Application) -> None:
    instance = "/v2/service_instances/{instance_id}"
    binding = instance + "/service_bindings/{binding_id}"
    app.router.add_get("/v2/catalog", get_catalog)
    app.router.add_put(instance, provision)
    app.router.add_patch(instance, update)
    app.router.add_delete(instance, deprovision)
    app.router.add_get(instance, fetch_instance, allow_head=False)
    app.router.add_get(instance + "/last_operation", instance_last_operation, allow_head=False)
    app.router.add_put(binding, bind)
    app.router.add_delete(binding, unbind)
    app.router.add_get(binding, fetch_binding, allow_head=False)
    app.router.add_get(binding + "/last_operation", binding_last_operation, allow_head=False)
