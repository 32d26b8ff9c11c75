"""The domain's exception hierarchy. Each error has a stable machine-readable ``code`` and a
sentence a person can act on; the HTTP layer maps the class to a status code."""

from __future__ import annotations

from pydantic import ValidationError

from backup.secrets import SecretKeyError
from storage import StorageError


class BackupError(Exception):
    code: str = "error"

    def __init__(self, description: str, *, code: str | None = None, field: str | None = None):
        super().__init__(description)
        self.description = description
        if code is not None:
            self.code = code
        self.field = field


class InvalidInput(BackupError):
    """The request is malformed or violates a rule: nothing was changed."""

    code = "invalid_input"


class NotFound(BackupError):
    code = "not_found"


class Gone(BackupError):
    code = "gone"


class Conflict(BackupError):
    """The request conflicts with what is stored (a duplicate name, a resource in use...)."""

    code = "conflict"


class Unprocessable(BackupError):
    """Well-formed but cannot be processed now (OSB's 422 family)."""

    code = "unprocessable"


class Unavailable(BackupError):
    """A dependency (database, agent, storage) cannot be reached; the request may be retried."""

    code = "unavailable"


# The failures of the service instances' and bindings' life cycle. Each says what happened in
# the domain's terms; the OSB layer (broker/osb/errors.py) alone decides how a platform is told.


class AsynchronousOnly(Unprocessable):
    """The work cannot be done within the request, and the caller did not accept to be
    answered before it is done."""


class ConcurrentOperation(Unprocessable):
    """Another change of the instance is under way (or it keeps changing under the request)."""


class PlanChangeNotAllowed(Unprocessable):
    """The instance's plan does not allow moving to another plan."""


class UnknownInstance(NotFound):
    """The instance does not exist, or not in a state that can be shown or changed."""


class InstanceGone(Gone):
    """The instance does not exist (any more): deleting it again or asking after its last
    operation has nothing to act on."""


class UnknownBinding(NotFound):
    """The binding does not exist for this instance."""


class BindingGone(Gone):
    """The binding does not exist (any more) for this instance: unbinding again is harmless."""


class AlreadyExists(Conflict):
    """An instance or a binding of that id exists with different attributes."""


class ServiceMismatch(InvalidInput):
    """The request names a service other than the instance's."""


class InvalidRegistration(InvalidInput):
    """The registration parameters cannot be accepted (the agent's URL, what its kind needs)."""


# --------------------------------------------------------------------------- storage failures
# Storage has its own catalogue of failures (storage.base: code, step, retryable), the words of
# a lower layer. These are the one place the domain turns them into its own.


class StorageUnavailable(Unavailable):
    """Storage a request needs failed or did not answer; nothing was lost and repeating the
    request resumes where it stopped."""

    code = "storage_unavailable"


STORAGE_FAILURES: tuple[type[BaseException], ...] = (
    StorageError,
    TimeoutError,
    OSError,
    ImportError,  # the backend's client library is not installed
    SecretKeyError,  # the destination's stored credentials cannot be opened
    ValidationError,  # settings stored before today's checks no longer pass them
)
"""What working with a destination's storage can raise for reasons outside the manager's code:
each is reported with :func:`storage_failure`, anything else is a bug and is logged as one."""


def invalid_field(exc: ValidationError) -> str:
    """``field: problem`` of the first error of a destination's stored settings."""
    problem = exc.errors(include_url=False, include_input=False)[0]
    return f"{'.'.join(str(p) for p in problem['loc']) or 'settings'}: {problem['msg']}"


def storage_failure(exc: BaseException) -> str:
    """Why a storage operation failed, in words safe to show (no credentials, no text the
    storage server chose: storage's own messages are its classified sentences)."""
    if isinstance(exc, StorageError):
        return exc.message
    if isinstance(exc, ValidationError):
        return f"the destination's settings are no longer accepted ({invalid_field(exc)})"
    if isinstance(exc, SecretKeyError):
        return "a secret cannot be opened"
    if isinstance(exc, TimeoutError):
        return "the storage did not answer in time"
    if isinstance(exc, ImportError):
        return "the storage backend is not installed"
    return "the storage did not answer"
