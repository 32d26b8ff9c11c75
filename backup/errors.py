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
