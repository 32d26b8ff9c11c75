"""Typed HTTP error responses and the middleware that renders every failure as JSON.

Handlers raise :class:`ApiError` (or a domain :class:`backup.errors.BackupError`, mapped to a
status here); anything else becomes a 500 with a generic sentence and the request id, never a
traceback.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from pydantic import ValidationError

from backup import errors as domain
from broker.context import REQUEST_ID
from webguard.body import BodyError, BodyProblem

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_STATUS: dict[type[domain.BackupError], int] = {
    domain.InvalidInput: 400,
    domain.NotFound: 404,
    domain.Gone: 410,
    domain.Conflict: 409,
    domain.Unprocessable: 422,
    domain.Unavailable: 503,
}


class ApiError(Exception):
    """An error response: HTTP status, stable ``error`` code and a ``description``."""

    def __init__(
        self,
        status: int,
        error: str,
        description: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(description)
        self.status, self.error, self.description = status, error, description
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "description": self.description, **self.extra}


def from_domain(exc: domain.BackupError) -> ApiError:
    status = next((s for cls, s in _STATUS.items() if isinstance(exc, cls)), 400)
    extra = {"field": exc.field} if exc.field else None
    return ApiError(status, exc.code, exc.description, extra=extra)


def from_validation(exc: ValidationError, what: str = "request body") -> ApiError:
    """A 400 naming the first offending field, with every problem listed."""
    problems = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"] if p not in ("body",))
        problems.append({"field": loc or what, "message": err["msg"]})
    first = problems[0] if problems else {"field": what, "message": "invalid"}
    return ApiError(
        400,
        "invalid_input",
        f"Invalid {what}: {first['field']}: {first['message']}.",
        extra={"field": first["field"], "problems": problems},
    )


def from_body(exc: BodyError) -> ApiError:
    """A body that cannot be read, in the /v1 API's codes: ``malformed_json`` when it is not
    JSON, ``invalid_input`` when it is missing or not an object."""
    return ApiError(400, _BODY_ERRORS[exc.problem], exc.description)


_BODY_ERRORS = {
    BodyProblem.MISSING: "invalid_input",
    BodyProblem.NOT_JSON: "malformed_json",
    BodyProblem.TOO_DEEP: "malformed_json",
    BodyProblem.NOT_OBJECT: "invalid_input",
}


def json_error(err: ApiError) -> web.Response:
    return web.json_response(err.body(), status=err.status, headers=err.headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as err:
        return json_error(err)
    except domain.BackupError as exc:
        return json_error(from_domain(exc))
    except ValidationError as exc:
        return json_error(from_validation(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code, description = _HTTP_ERRORS.get(exc.status, ("http_error", exc.reason or "Failed."))
        return json_error(
            ApiError(
                exc.status,
                code,
                description.format(method=request.method, path=request.path),
                headers=_allow(exc),
            )
        )
    except Exception:
        log.exception("unhandled_error", path=request.path, method=request.method)
        return json_error(
            ApiError(
                500,
                "internal_error",
                "The server failed to handle this request; it has been logged. "
                f"Quote request id {request.get(REQUEST_ID, '-')} when reporting it.",
            )
        )


_HTTP_ERRORS = {
    404: ("not_found", "There is no endpoint {method} {path}."),
    405: ("method_not_allowed", "{path} does not accept {method}; see the Allow header."),
    408: ("request_timeout", "The request body did not arrive in time."),
    413: ("request_too_large", "The request body is larger than the 1 MiB accepted."),
}


def _allow(exc: web.HTTPException) -> dict[str, str]:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else {}
