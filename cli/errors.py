"""The CLI's failures and their exit codes (stable: scripts test them; docs/cli.md lists them)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    JOB_FAILED = 1
    """A waited-for job ended FAILED, CANCELLED or MISSED; a destination check failed."""
    USAGE = 2
    """A wrong command line (the CLI library's own code for it)."""
    NOT_LOGGED_IN = 3
    """No credentials, or the manager, UAA or Cloud Controller refused them (401)."""
    NOT_FOUND = 4
    """No such instance, destination, plan, job or restore point (or not visible to you)."""
    FORBIDDEN = 5
    """You may read the instance but not change it (403)."""
    REFUSED = 6
    """The manager refused the request: invalid input, a conflict, too many attempts."""
    UNAVAILABLE = 7
    """A server cannot be reached, timed out, or answered 5xx."""
    INTERRUPTED = 130
    """Ctrl-C (a job already queued keeps running on the manager)."""


class CliError(Exception):
    """A failure to report in one sentence (never a traceback), with its exit code."""

    def __init__(self, message: str, code: ExitCode, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.hint = hint


def exit_code_for_status(status: int) -> ExitCode:
    """The exit code of an API error answer's HTTP status."""
    if status == 401:
        return ExitCode.NOT_LOGGED_IN
    if status == 403:
        return ExitCode.FORBIDDEN
    if status == 404:
        return ExitCode.NOT_FOUND
    if status >= 500:
        return ExitCode.UNAVAILABLE
    return ExitCode.REFUSED
