"""Destination validation: write, read back and delete a probe, then say in words a user can
act on what failed."""

from __future__ import annotations

import asyncio
from typing import Any

from backup.destinations import AnySettings
from broker.errors import ApiError
from storage import StorageError, ValidationReport, ValidationStep, open_store


def _where(settings: AnySettings) -> tuple[str, str]:
    if settings.type == "S3":
        return f"bucket {settings.bucket!r}", settings.endpoint or "AWS S3"
    return f"container {settings.container!r}", settings.auth_url


def advice(code: str | None, settings: AnySettings, step: str | None) -> str:
    what, where = _where(settings)
    doing = f" (while trying to {step} a probe object)" if step else ""
    secret = "access key id and secret key" if settings.type == "S3" else "user name and key"
    return {
        "storage_container_not_found": (
            f"The {what} does not exist at {where}; create it or correct its name."
        ),
        "storage_auth_failed": (f"{where} refused the credentials{doing}: check the {secret}."),
        "storage_permission_denied": (
            f"The credentials are valid but may not use the {what}{doing}: grant them read, "
            "write and delete on it."
        ),
        "storage_unreachable": (
            f"{where} cannot be reached{doing}: check the URL and port, and that the manager "
            "can connect to it."
        ),
        "storage_tls_failed": (
            f"The TLS connection to {where} failed{doing}: its certificate is not trusted or "
            "the endpoint does not speak HTTPS (set plain_http for an http:// endpoint)."
        ),
        "storage_transient": (
            f"{where} failed temporarily{doing} (timeout, throttling or server error); retry."
        ),
        "storage_timeout": f"{where} did not answer in time{doing}; check it and retry.",
    }.get(code or "", f"The storage check failed{doing}.")


async def validate(settings: AnySettings, timeout: float) -> dict[str, Any]:
    """A :class:`broker.api.models.ValidationOut` answer for ``settings``."""
    try:
        async with asyncio.timeout(timeout):
            async with open_store(settings) as objects:
                report = await objects.validate()
    except StorageError as exc:
        report = ValidationReport(
            False, [ValidationStep(exc.step or "connect", False, exc.code, exc.message)]
        )
    except ImportError:
        raise ApiError(
            503,
            "storage_unavailable",
            f"This manager cannot reach {settings.type} storage (its client is not installed).",
        ) from None
    except TimeoutError:
        report = ValidationReport(
            False, [ValidationStep("connect", False, "storage_timeout", "timed out")]
        )
    steps = [
        {"name": s.name, "ok": s.ok, "error_code": s.error_code, "message": s.message}
        for s in report.steps
    ]
    failure = report.failure
    if report.ok and failure is None:
        what, where = _where(settings)
        return {
            "ok": True,
            "error": None,
            "description": f"A probe object was written, read back and deleted in the {what} "
            f"at {where}.",
            "steps": steps,
        }
    code = failure.error_code if failure else "storage_error"
    text = advice(code, settings, failure.name if failure else None)
    if failure and failure.message and code not in _OWN_WORDS:
        text += f" The storage said: {failure.message}"
    return {"ok": False, "error": code, "description": text, "steps": steps}


_OWN_WORDS = {"storage_timeout"}
