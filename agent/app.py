"""HTTP endpoints of the agent protocol: the Go ``osb-backup-agent``'s, plus ours (README)."""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from pydantic import ValidationError

from agent import __version__, transforms
from agent.config import AgentConfig
from agent.destinations import to_settings
from agent.jobs import Kind
from agent.models import (
    CANCEL_CAPABILITY,
    VERIFY_CAPABILITY,
    BackupRequest,
    DeleteRequest,
    RestoreRequest,
    describe_errors,
    safe_error,
)
from agent.service import Agent
from webguard.body import BodyError, read_json_object
from webguard.middleware import UNSUPPORTED_DESCRIPTION, unsupported_body
from webguard.server import ServerLimits
from webguard.throttle import Throttle, client_address, user_label

log = structlog.get_logger("agent")

AGENT_KEY: web.AppKey[Agent] = web.AppKey("agent", Agent)
# (ours) What the manager may rely on beyond the Go agent's protocol.
CAPABILITIES = [
    *(f"compression:{c}" for c in transforms.COMPRESSIONS),  # transform.compression
    f"encryption:{transforms.ENCRYPTION_NAME}",  # transform.encryption
    "checksum:sha256",  # checksum / stored_size in the backup state; restore verifies it
    "persistent-jobs",  # job state survives a restart; interrupted jobs end FAILED
    "unlock-always",  # the unlock script runs whenever the lock script succeeded
    "secrets-in-env",  # passwords and keys never on a command line
    CANCEL_CAPABILITY,  # POST /<kind>/{id}/cancel: stop at the next stage boundary
    VERIFY_CAPABILITY,  # PUT /restore with verify: a restore drill, no restore stage runs
    "object-lock",  # destination.objectLockMode/objectLockRetainUntil: S3 Object Lock uploads
]


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.json_response(body, status=status)


def _error(http_status: int, code: str, description: str, **extra: Any) -> web.Response:
    """Go agent clients read ``message`` (and ``state`` / ``error_message`` where it sets
    them); ours read the stable ``error`` code and the ``description``."""
    body = {**error_body(code, description), **extra, "error": code, "description": description}
    return _json(http_status, body)


def error_body(code: str, description: str) -> dict[str, Any]:
    """The body of :func:`_error`, also for requests refused before the app sees them."""
    return {"message": description, "error": code, "description": description}


def server_limits(cfg: AgentConfig) -> ServerLimits:
    """What one client may hold of the agent (see webguard.server)."""
    return ServerLimits(
        header_timeout=cfg.http_header_timeout_seconds,
        body_timeout=cfg.http_body_timeout_seconds,
        keepalive_timeout=cfg.http_keepalive_timeout_seconds,
        max_connections=cfg.http_max_connections,
    )


_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "body_too_large",
}


def _auth_middleware(cfg: AgentConfig) -> Middleware:
    user = cfg.client_username.encode()
    password = cfg.client_password.get_secret_value().encode()
    # Failed logins are counted per client address and per user name: an address (or, from
    # addresses it has not logged in from, a user name) that failed auth_failure_limit times
    # in auth_failure_window_seconds is answered 429 before its credentials are looked at.
    throttle = Throttle(cfg.auth_failure_limit, cfg.auth_failure_window_seconds)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        given_user, given_pw = b"", b""
        if header[:6].lower() == "basic ":
            try:
                decoded = base64.b64decode(header[6:].strip(), validate=True)
                given_user, _, given_pw = decoded.partition(b":")
            except (binascii.Error, ValueError):
                pass
        address = client_address(request)
        name = given_user.decode(errors="replace")[:256] if given_user else None
        if header:  # a request without credentials is not a failed login
            refusal = throttle.check(address, name)
            if refusal is not None:
                if refusal.new:
                    log.warning(
                        "auth_throttled",
                        scope=refusal.scope,
                        client=address,
                        retry_after=refusal.retry_after,
                        **(user_label(name, (cfg.client_username,)) if name else {}),
                    )
                whom = "from this address" if refusal.scope == "address" else "for this user"
                response = _error(
                    429,
                    "too_many_attempts",
                    f"too many failed logins {whom}; retry in {refusal.retry_after} seconds",
                )
                response.headers["Retry-After"] = str(refusal.retry_after)
                return response
        # Both comparisons always run so timing reveals neither which part was wrong.
        ok_user = hmac.compare_digest(given_user, user)
        ok_pw = hmac.compare_digest(given_pw, password)
        if not (ok_user and ok_pw):
            if header:
                throttle.failed(address, name)
            return web.json_response(
                {"message": "Unauthorised."},
                status=401,
                headers={"WWW-Authenticate": 'Basic realm="osb-backup-agent"'},
            )
        throttle.succeeded(address, name)
        if unsupported_body(request):
            return _error(415, "unsupported_media_type", UNSUPPORTED_DESCRIPTION)
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error(exc.status, _HTTP_CODES.get(exc.status, "http_error"), exc.reason)
        except Exception as exc:
            log.error("request_failed", path=request.path, method=request.method, **safe_error(exc))
            return _error(500, "internal_error", "the agent failed to handle the request")

    return middleware


async def _body(request: web.Request) -> dict[str, object] | web.Response:
    """The JSON object the request carries, or the agent's answer to any body that is not
    one (missing, not JSON, nested too deep, another JSON value): one 400, as the Go agent's
    clients expect."""
    try:
        return await read_json_object(request)
    except BodyError:
        return _error(400, "invalid_request", "the request body must be a JSON object")


async def status(request: web.Request) -> web.Response:
    return _json(
        200,
        {"message": "Client is running", "version": __version__, "capabilities": CAPABILITIES},
    )


def _rejected(kind: Kind, description: str) -> web.Response:
    """400 with the Go agent's failed-job body, so its clients find ``error_message``."""
    return _error(
        400,
        "invalid_request",
        description,
        status="FAILED",
        message=f"{kind.capitalize()} failed.",
        state="Body Deserialization",
        error_message=description,
    )


async def _start(request: web.Request, kind: Kind) -> web.Response:
    agent = request.app[AGENT_KEY]
    data = await _body(request)
    if isinstance(data, web.Response):
        return data
    # A known id answers its state before anything else is checked, as the Go agent does: a
    # manager resending its request after a restart resumes polling whatever it sent.
    job_id = data.get("id")
    existing = agent.get(kind, job_id) if isinstance(job_id, str) else None
    if existing is not None:
        return _json(409, existing.public())
    model = BackupRequest if kind == "backup" else RestoreRequest
    try:
        req = model.model_validate(data)
    except ValidationError as exc:
        return _rejected(kind, describe_errors(exc))
    refused = agent.refused_parameter(req)  # this agent's allowed_parameters
    if refused is not None:
        return _rejected(kind, f"{kind}.parameters: {refused}")
    dest = req.destination
    missing: list[str] = []
    if not agent.skip_storage(dest):
        missing = dest.missing_for_storage()
    if kind == "restore" and not dest.filename:
        missing.append("destination.filename")
    if missing:
        return _rejected(kind, "missing or invalid field: " + ", ".join(missing))
    if not agent.skip_storage(dest):
        try:
            to_settings(dest, agent.cfg)
        except ValidationError as exc:
            return _rejected(kind, "invalid destination: " + describe_errors(exc))
    # No await from here to submit(): the id check and the slot count cannot race, and a
    # rejected request never holds a slot.
    existing = agent.get(kind, req.id)
    if existing is not None:
        return _json(409, existing.public())
    if agent.running_count() >= agent.cfg.max_job_number:
        description = (
            f"{agent.running_count()} jobs are running, the limit (max_job_number) is "
            f"{agent.cfg.max_job_number}; retry when one has finished"
        )
        return _error(
            429,
            "too_many_jobs",
            description,
            state="Job reservation",
            error_message=description,
        )
    agent.submit(kind, req)
    return web.Response(status=201)


async def start_backup(request: web.Request) -> web.Response:
    return await _start(request, "backup")


async def start_restore(request: web.Request) -> web.Response:
    return await _start(request, "restore")


async def _get(request: web.Request, kind: Kind) -> web.Response:
    job = request.app[AGENT_KEY].get(kind, request.match_info["id"])
    if job is None:
        return _error(404, "job_not_found", f"no {kind} job with this id")
    return _json(200, job.public())


async def get_backup(request: web.Request) -> web.Response:
    return await _get(request, "backup")


async def get_restore(request: web.Request) -> web.Response:
    return await _get(request, "restore")


async def _delete(request: web.Request, kind: Kind) -> web.Response:
    agent = request.app[AGENT_KEY]
    data = await _body(request)
    if isinstance(data, web.Response):
        return data
    try:
        req = DeleteRequest.model_validate(data)
    except ValidationError as exc:
        return _error(400, "invalid_request", describe_errors(exc))
    job = agent.get(kind, req.id)
    if job is None:
        return _error(410, "job_not_found", f"no {kind} job with this id")
    if job.status == "RUNNING":
        # Forgetting a running job would let the same id start a second run beside it.
        return _error(
            409,
            "job_running",
            "the job is still running; delete it once it has finished",
            state=job.state,
        )
    agent.forget(kind, req.id)
    return _json(200, {"message": f"{kind} job {req.id} deleted"})


async def _cancel(request: web.Request, kind: Kind) -> web.Response:
    """(ours) Stop a running job at its next stage boundary: 202 and its state while it
    runs (also when asked again), 200 once it has ended cancelled, 409 ``job_finished`` with
    its state when it ended before the cancel reached it."""
    agent = request.app[AGENT_KEY]
    job_id = request.match_info["id"]
    job = agent.get(kind, job_id)
    if job is None:
        return _error(404, "job_not_found", f"no {kind} job with this id")
    if job.status != "RUNNING":
        if job.cancelled:
            return _json(200, job.public())
        return _error(
            409,
            "job_finished",
            f"the job had already finished ({job.status}) when the cancel arrived",
            job=job.public(),
        )
    agent.cancel(kind, job_id)
    return _json(202, job.public())


async def cancel_backup(request: web.Request) -> web.Response:
    return await _cancel(request, "backup")


async def cancel_restore(request: web.Request) -> web.Response:
    return await _cancel(request, "restore")


async def delete_backup(request: web.Request) -> web.Response:
    return await _delete(request, "backup")


async def delete_restore(request: web.Request) -> web.Response:
    return await _delete(request, "restore")


def make_app(cfg: AgentConfig) -> web.Application:
    app = web.Application(middlewares=[_auth_middleware(cfg)], client_max_size=1024 * 1024)
    agent = Agent(cfg)
    app[AGENT_KEY] = agent

    async def on_startup(_app: web.Application) -> None:
        await agent.start()

    async def on_cleanup(_app: web.Application) -> None:
        await agent.stop()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.add_routes(
        [
            web.get("/status", status),
            web.post("/backup", start_backup),
            web.get("/backup/{id}", get_backup),
            web.post("/backup/{id}/cancel", cancel_backup),
            web.delete("/backup", delete_backup),
            web.put("/restore", start_restore),
            web.get("/restore/{id}", get_restore),
            web.post("/restore/{id}/cancel", cancel_restore),
            web.delete("/restore", delete_restore),
        ]
    )
    return app
