"""structlog JSON logs with the request id (and acting user) bound on every line."""

from __future__ import annotations

import logging
import re
import sys

import structlog

_SENSITIVE_KEYS = re.compile(r"(pass|secret|token|key|credential|authorization)", re.I)


def _redact(_: object, __: str, event: dict[str, object]) -> dict[str, object]:
    """Last line of defence: a field whose name says it is secret never reaches a log."""
    for k in list(event):
        if k != "event" and _SENSITIVE_KEYS.search(k) and event[k] not in (None, "", True, False):
            event[k] = "[redacted]"
    return event


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(stream=sys.stdout, level=level, format="%(message)s", force=True)
    for noisy in ("aiohttp.access", "botocore", "aiobotocore", "urllib3", "swiftclient"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=False,
    )
