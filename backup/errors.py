"""The domain's exception hierarchy. Each error has a stable machine-readable ``code`` and a
sentence a person can act on; the HTTP layer maps the class to a status code."""

from __future__ import annotations


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
