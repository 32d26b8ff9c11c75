"""``python -m agent`` / ``osb-backup-agent``: configuration from the environment."""

from __future__ import annotations

import ctypes
import logging
import ssl
import sys

import structlog
from pydantic import ValidationError

from agent.config import describe_errors, load_config
from webguard.server import run as run_guarded


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )


def pin_mmap_threshold() -> None:
    """Backups stream through buffers of megabytes (file blocks, upload parts). glibc serves
    the first ones with mmap, but raises its threshold after freeing one, and from then on
    takes them from heap arenas that fragment: measured, the agent's peak memory then crept
    up with the number of parts. Pinned at 4 MiB, every large buffer (a file block, an upload
    part) is mmapped and returned to the system when freed, so memory follows the live
    buffers only. Not lower: the transforms' blocks of 1 to 2 MiB (an encryption chunk, a
    decompressed block) then came fresh from mmap, page faults and all, which nearly doubled
    a restore's CPU time."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to pin
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 4 * 1024 * 1024)


def main() -> None:
    pin_mmap_threshold()
    configure_logging()
    log = structlog.get_logger("agent")
    try:
        cfg = load_config()
    except ValidationError as exc:
        print(f"osb-backup-agent: invalid configuration: {describe_errors(exc)}", file=sys.stderr)
        raise SystemExit(2) from None
    from agent.app import error_body, make_app, server_limits

    ssl_ctx = None
    if cfg.tls_cert_file and cfg.tls_key_file:
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ssl_ctx.load_cert_chain(str(cfg.tls_cert_file), str(cfg.tls_key_file))
    log.info(
        "agent_starting",
        host=cfg.client_host,
        port=cfg.client_port,
        tls=ssl_ctx is not None,
        scripts_path=str(cfg.scripts_path),
        max_job_number=cfg.max_job_number,
    )
    # web.run_app with aiohttp's protocol guarded against slow and oversized requests.
    run_guarded(
        make_app(cfg),
        host=cfg.client_host,
        port=cfg.client_port,
        limits=server_limits(cfg),
        ssl_context=ssl_ctx,
        shutdown_timeout=10,
        error_body=error_body,
    )


if __name__ == "__main__":
    main()
