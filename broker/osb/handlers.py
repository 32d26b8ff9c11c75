"""One small handler per OSB endpoint: parse and check the request, call one domain function
(:mod:`backup.instances`, :mod:`backup.bindings`), render the answer
(:mod:`broker.osb.responses`). Every failure is an :class:`~broker.errors.ApiError`; a domain
failure becomes one in :func:`osb_endpoint`, by the catalogue of :mod:`broker.osb.errors`."""

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

from backup import audit, bindings
from backup.database import Document
from backup.errors import BackupError
from backup.instances import Instances, Outcome, ProvisionRequest, UpdateRequest
from backup.operations import OperationState
from backup.registration import Registration
from broker.context import DATABASE, REQUEST_ID, SETTINGS
from broker.dashboard.links import dashboard_url
from broker.osb import responses
from broker.osb.catalog import Catalog, Plan, check_parameters
from broker.osb.errors import (
    bad_request,
    invalid_body,
    invalid_registration,
    maintenance_info_conflict,
    malformed_request,
    osb_failure,
    unauthorized,
    unsupported_version,
)
from broker.osb.models import BindBody, MaintenanceInfo, ProvisionBody, UpdateBody
from broker.throttling import LoginGuard
from webguard.body import BodyError, BodyProblem, read_json_object

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
SENT_FIELDS = web.RequestKey("osb_sent_fields", list[str])
"""The names of the fields of the body sent (and of its parameters), for the audit trail."""


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
        raise unauthorized(
            "Send the broker's credentials with HTTP Basic authentication."
            if not header
            else "Wrong broker user name or password.",
            _CHALLENGE,
        )


def _check_version(request: web.Request) -> str:
    raw = request.headers.get("X-Broker-API-Version")
    supported = f"this broker speaks OSB API 2.{MIN_MINOR} to 2.17 (any 2.x from 2.{MIN_MINOR})"
    if raw is None:
        raise unsupported_version(f"The X-Broker-API-Version header is missing; {supported}.")
    match = _VERSION.match(raw)
    if not match or int(match[1]) != 2 or int(match[2]) < MIN_MINOR:
        raise unsupported_version(
            f"X-Broker-API-Version {raw[:20]!r} is not supported; {supported}."
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
    """Broker authentication, the API version header, the acting user in every log line, and
    a domain failure told as OSB tells it."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        _authenticate(request)
        version = _check_version(request)
        request[OSB_MINOR] = int(version.split(".")[1])
        user = originating_identity(request.headers.get("X-Broker-API-Originating-Identity"))
        structlog.contextvars.bind_contextvars(acting_user=user, osb_version=version)
        try:
            response = await handler(request)
        except BackupError as exc:
            raise osb_failure(exc) from None
        if request.method != "GET" and 200 <= response.status < 300:
            await _record_change(request, handler.__name__, user, response.status)
        return response

    return wrapped


async def _record_change(request: web.Request, action: str, user: str | None, status: int) -> None:
    """The audit entry of a change the platform made: on behalf of its user when it names
    one (the originating identity, which the platform vouches for), else as the broker."""
    actor = (
        audit.Actor(audit.ActorKind.PLATFORM_USER, user)
        if user
        else audit.Actor(audit.ActorKind.BROKER, request.app[SETTINGS].broker_username)
    )
    binding_id = request.match_info.get("binding_id")
    resource = (
        audit.Resource("binding", binding_id)
        if binding_id is not None
        else audit.Resource("instance", request.match_info["instance_id"])
    )
    await audit.record(
        request.app[DATABASE],
        actor,
        action,
        resource,
        request.get(SENT_FIELDS, []),
        request.get(REQUEST_ID),
        instance_id=request.match_info["instance_id"],
        outcome="accepted" if status == 202 else "succeeded",
    )


# --------------------------------------------------------------------------- parsing


def _path_id(request: web.Request, name: str) -> str:
    value = request.match_info[name]
    if not value or len(value) > _MAX_ID or not value.isprintable():
        raise bad_request(f"{name} must be 1 to {_MAX_ID} printable characters.", field=name)
    return value


def _flag(request: web.Request, name: str) -> bool:
    raw = request.query.get(name)
    if raw is None or raw.lower() == "false":
        return False
    if raw.lower() == "true":
        return True
    raise bad_request(f"{name} must be true or false.", field=name)


def _required_query(request: web.Request, name: str) -> str:
    value = request.query.get(name)
    if not value:
        raise bad_request(f"The query parameter {name} is required.", field=name)
    return value


async def _body(request: web.Request, model: type[M]) -> M:
    try:
        data = await read_json_object(request)
    except BodyError as exc:
        if exc.problem in (BodyProblem.NOT_JSON, BodyProblem.TOO_DEEP):
            raise malformed_request(exc.description) from None
        raise bad_request(exc.description) from None
    parameters = data.get("parameters")
    named = parameters if isinstance(parameters, dict) else {}
    request[SENT_FIELDS] = [*data, *(f"parameters.{name}" for name in named)]
    try:
        # The version decides which fields exist (maintenance_info from 2.15): broker.osb.models.
        return model.model_validate(data, context={"osb_minor": request.get(OSB_MINOR)})
    except ValidationError as exc:
        raise invalid_body(exc) from None


def _registration(params: dict[str, Any]) -> Registration:
    try:
        return Registration.model_validate(params)
    except ValidationError as exc:
        raise invalid_registration(exc) from None


def _check_maintenance(plan: Plan, info: MaintenanceInfo | None) -> None:
    if info is not None and info.version != plan.maintenance_version:
        offered = plan.maintenance_version
        raise maintenance_info_conflict(
            f"maintenance_info.version {info.version[:50]!r} does not match the plan's "
            + (f"{offered!r}" if offered else "(the plan has none)")
            + "; fetch the catalog again."
        )


def _acting_user() -> str | None:
    """The platform's user behind the request (its originating identity), if it said."""
    return structlog.contextvars.get_contextvars().get("acting_user")


def _maintenance(info: MaintenanceInfo | None) -> dict[str, str] | None:
    return {"version": info.version} if info is not None else None


def _operation_answer(outcome: Outcome) -> web.Response:
    """202 with the operation while it goes on (the platform polls last_operation), else 200."""
    if outcome.status == "accepted":
        return responses.answer(responses.OperationStarted(operation=outcome.operation), 202)
    return responses.answer(responses.Empty())


def _credentials(request: web.Request, instance_id: str, key: str | None) -> responses.Credentials:
    base = request.app[SETTINGS].base_url
    return responses.Credentials(
        uri=f"{base}/v1/service_instances/{instance_id}",
        api_url=base,
        instance_id=instance_id,
        key=key,
    )


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
    dashboard = dashboard_url(request.app[SETTINGS], instance_id)
    if outcome.status == "accepted":
        started = responses.ProvisionStarted(operation=outcome.operation, dashboard_url=dashboard)
        return responses.answer(started, 202)
    return responses.answer(responses.Provisioned(dashboard_url=dashboard))


def _instance_view(doc: Document) -> responses.FetchedInstance:
    agent = doc.get("agent") or {}
    attributes = responses.InstanceAttributes(
        state=doc.get("state"),
        agent_kind=agent.get("kind"),
        agent_version=agent.get("version"),
        delete_backups_on_deprovision=bool(doc.get("delete_backups_on_deprovision")),
    )
    view = responses.FetchedInstance(
        service_id=doc.get("service_id"),
        plan_id=doc.get("plan_id"),
        parameters=doc.get("parameters") or {},
        metadata=responses.InstanceMetadata(labels={}, attributes=attributes),
    )
    if doc.get("maintenance_info"):
        info = responses.MaintenanceInfo(version=doc["maintenance_info"].get("version"))
        view.maintenance_info = info
    return view


@osb_endpoint
async def fetch_instance(request: web.Request) -> web.Response:
    instance_id = _path_id(request, "instance_id")
    doc = await request.app[INSTANCES].fetch(instance_id)
    return responses.answer(_instance_view(doc))


@osb_endpoint
async def update(request: web.Request) -> web.Response:
    instance_id = _path_id(request, "instance_id")
    accepts = _flag(request, "accepts_incomplete")
    body = await _body(request, UpdateBody)
    catalog = request.app[CATALOG]

    def admit(plan: Plan) -> None:
        """The request against the plan in force after the update, which the domain names."""
        if body.maintenance_info is not None:
            _check_maintenance(plan, body.maintenance_info)
        if body.parameters is not None:
            check_parameters(plan.update, body.parameters)

    try:
        outcome = await request.app[INSTANCES].update(
            UpdateRequest(
                instance_id=instance_id,
                service_id=body.service_id,
                plan_id=body.plan_id,
                parameters=body.parameters,
                context=body.context,
                maintenance_info=_maintenance(body.maintenance_info),
                acting_user=_acting_user(),
            ),
            accepts_incomplete=accepts,
            plans=catalog,
            admit=admit,
        )
    except ValidationError as exc:  # the merged parameters (the plan's schema passed them)
        raise invalid_registration(exc) from None
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
    status = await request.app[INSTANCES].last_operation(instance_id, operation)
    response = responses.answer(responses.LastOperation.of(status))
    if status.state == OperationState.IN_PROGRESS:
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
        raise bad_request(f"Plan {plan.name!r} is not bindable.")
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
    return responses.answer(
        responses.Binding(credentials=credentials), 201 if outcome.created else 200
    )


@osb_endpoint
async def fetch_binding(request: web.Request) -> web.Response:
    instance_id = _path_id(request, "instance_id")
    binding_id = _path_id(request, "binding_id")
    doc = await bindings.get(request.app[DATABASE], instance_id, binding_id)
    return responses.answer(
        responses.FetchedBinding(
            credentials=_credentials(request, instance_id, None),
            parameters=doc.get("parameters") or {},
        )
    )


@osb_endpoint
async def unbind(request: web.Request) -> web.Response:
    instance_id = _path_id(request, "instance_id")
    binding_id = _path_id(request, "binding_id")
    _flag(request, "accepts_incomplete")
    _required_query(request, "service_id")
    _required_query(request, "plan_id")
    await bindings.unbind(request.app[DATABASE], instance_id, binding_id)
    return responses.answer(responses.Empty())


@osb_endpoint
async def binding_last_operation(request: web.Request) -> web.Response:
    instance_id = _path_id(request, "instance_id")
    binding_id = _path_id(request, "binding_id")
    status = await bindings.last_operation(request.app[DATABASE], instance_id, binding_id)
    return responses.answer(responses.LastOperation.of(status))


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
