"""structlog JSON logs with the request id (and acting user) bound on every line."""

from __future__ import annotations

import logging
import re
import sys
from typing import TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

# Field names that say "secret" (an object's storage ``key`` or a ``key_id`` does not).
_SENSITIVE_KEYS = re.compile(
    r"(pass|secret|token|credential|authorization|api_?key|private_?key|encryption_?key"
    r"|master_?key|key_?material|^bmk)",
    re.I,
)


def _redact(logger: WrappedLogger, method_name: str, event: EventDict) -> EventDict:
    """Last line of defence: a field whose name says it is secret never reaches a log."""
    for k in list(event):
        if k != "event" and _SENSITIVE_KEYS.search(k) and event[k] not in (None, "", True, False):
            event[k] = "[redacted]"
    return event


def configure_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """One JSON object per line on ``stream`` (standard output by default), from structlog and
    from the standard library's loggers (aiohttp, pymongo...) alike, each with the context
    bound for the request (``request_id``, ``acting_user``)."""
    stream = stream or sys.stdout
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.contextvars.merge_contextvars,
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                stamp,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _redact,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("aiohttp.access", "botocore", "aiobotocore", "urllib3", "swiftclient"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            stamp,
            _redact,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
