"""Every failure the OSB endpoints answer, in one place (as brokerapi's ``apiresponses``): the
HTTP status and OSB error key a platform receives for each domain failure
(:data:`DOMAIN_FAILURES`), and the failures the OSB layer finds itself in a request. The
domain (:mod:`backup.errors`) says what happened; only this module says how a platform is told.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import ValidationError

from backup import errors as domain
from broker.errors import ApiError, from_domain, from_validation


class ErrorKey(StrEnum):
    """The ``error`` field of an OSB failure: the spec's keys, and this broker's own."""

    ASYNC_REQUIRED = "AsyncRequired"
    CONCURRENCY_ERROR = "ConcurrencyError"
    MAINTENANCE_INFO_CONFLICT = "MaintenanceInfoConflict"
    BAD_REQUEST = "BadRequest"
    MALFORMED_REQUEST = "MalformedRequest"
    INVALID_PARAMETERS = "InvalidParameters"
    INSTANCE_NOT_FOUND = "InstanceNotFound"
    BINDING_NOT_FOUND = "BindingNotFound"
    PLAN_CHANGE_NOT_SUPPORTED = "PlanChangeNotSupported"
    CONFLICT = "Conflict"
    GONE = "Gone"
    PRECONDITION_FAILED = "PreconditionFailed"
    UNAUTHORIZED = "Unauthorized"


DOMAIN_FAILURES: dict[type[domain.BackupError], tuple[int, ErrorKey]] = {
    domain.AsynchronousOnly: (422, ErrorKey.ASYNC_REQUIRED),
    domain.ConcurrentOperation: (422, ErrorKey.CONCURRENCY_ERROR),
    domain.PlanChangeNotAllowed: (422, ErrorKey.PLAN_CHANGE_NOT_SUPPORTED),
    domain.UnknownInstance: (404, ErrorKey.INSTANCE_NOT_FOUND),
    domain.UnknownBinding: (404, ErrorKey.BINDING_NOT_FOUND),
    domain.InstanceGone: (410, ErrorKey.GONE),
    domain.BindingGone: (410, ErrorKey.GONE),
    domain.AlreadyExists: (409, ErrorKey.CONFLICT),
    domain.ServiceMismatch: (400, ErrorKey.BAD_REQUEST),
    domain.InvalidRegistration: (400, ErrorKey.INVALID_PARAMETERS),
}


def osb_failure(exc: domain.BackupError) -> ApiError:
    """The answer to a domain failure. One the catalogue does not list (a deletion that
    failed within the request, say) is answered as the rest of the broker answers it."""
    for failure, (status, key) in DOMAIN_FAILURES.items():
        if isinstance(exc, failure):
            extra = {"field": exc.field} if exc.field else None
            return ApiError(status, key, exc.description, extra=extra)
    return from_domain(exc)


# --------------------------------------------------------------------------- the OSB layer's own


def bad_request(description: str, field: str | None = None) -> ApiError:
    return ApiError(
        400, ErrorKey.BAD_REQUEST, description, extra={"field": field} if field else None
    )


def invalid_body(exc: ValidationError) -> ApiError:
    """A request body that is JSON but not what the endpoint takes (broker.osb.models)."""
    err = from_validation(exc)
    err.error = ErrorKey.BAD_REQUEST
    return err


def malformed_request(description: str) -> ApiError:
    return ApiError(400, ErrorKey.MALFORMED_REQUEST, description)


def invalid_parameters(field: str, problem: str) -> ApiError:
    """Parameters the plan's schema or the registration refuse, naming the field, never
    quoting its value (it may be a password)."""
    return ApiError(
        400,
        ErrorKey.INVALID_PARAMETERS,
        f"Invalid parameters: {field}: {problem}.",
        extra={"field": field},
    )


def invalid_registration(exc: ValidationError) -> ApiError:
    """Parameters the registration's model refuses (:class:`backup.registration.Registration`)."""
    err = from_validation(exc, "parameters")
    return invalid_parameters(
        f"parameters.{err.extra['field']}", err.extra["problems"][0]["message"]
    )


def maintenance_info_conflict(description: str) -> ApiError:
    return ApiError(422, ErrorKey.MAINTENANCE_INFO_CONFLICT, description)


def unsupported_version(description: str) -> ApiError:
    return ApiError(412, ErrorKey.PRECONDITION_FAILED, description)


def unauthorized(description: str, challenge: str) -> ApiError:
    return ApiError(
        401, ErrorKey.UNAUTHORIZED, description, headers={"WWW-Authenticate": challenge}
    )
