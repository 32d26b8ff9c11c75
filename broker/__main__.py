"""``python -m broker``: run the service; with no MONGODB_URL, with an embedded database."""

from __future__ import annotations

import errno
import os
import sys

import structlog
from pydantic import SecretStr

from backup.embedded_db import EmbeddedDatabaseError, EmbeddedMongo
from broker.app import create_app, server_limits
from broker.config import ConfigError, load_settings
from broker.logging import configure_logging
from webguard.server import run as run_guarded

log = structlog.get_logger("broker")


def main() -> int:
    try:
        settings = load_settings()
        settings.resolve_local_secrets()
        # Everything that can be wrong with the configuration (catalog, API settings) is
        # found here, before anything starts.
        app = create_app(settings)
    except ConfigError as exc:
        print(f"osb-backup-manager: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    embedded: EmbeddedMongo | None = None
    credentials_file = settings.data_dir / "broker-password" if settings.embedded_database else None
    try:
        if settings.embedded_database:
            embedded = EmbeddedMongo(settings.data_dir / "db", state_dir=settings.data_dir)
            try:
                embedded.start()
            except EmbeddedDatabaseError as exc:
                embedded = None  # one line, no traceback: what failed and what to do
                print(f"osb-backup-manager: embedded database: {exc}", file=sys.stderr)
                return 1
            if embedded.stopped_leftovers:
                log.warning(
                    "embedded_database_left_running_stopped", pids=embedded.stopped_leftovers
                )
            settings.mongodb_url = SecretStr(embedded.url)
            log.info(
                "embedded_database_started",
                port=embedded.port,
                pid=embedded.pid,
                data_dir=str(embedded.storage_path),
            )
        log.info(
            "starting",
            host=settings.host,
            port=settings.port,
            url=settings.base_url,
            broker_username=settings.broker_username,
            credentials_file=str(credentials_file) if credentials_file else None,
        )
        # run_app with aiohttp's protocol guarded against slow and oversized requests
        # (webguard.server). SIGTERM/SIGINT stop gracefully: stop accepting, let in-flight
        # requests finish (up to shutdown_timeout), then run the cleanup contexts (the OSB
        # worker and the job runner release their leases; the database client closes).
        run_guarded(
            app,
            host=settings.host,
            port=settings.port,
            limits=server_limits(settings),
            shutdown_timeout=settings.shutdown_timeout,
        )
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise
        # The listening socket could not be opened: one line, no traceback.
        print(
            f"osb-backup-manager: cannot listen on {settings.host}:{settings.port} "
            f"({os.strerror(exc.errno)}): stop the process that uses it, or set another "
            "PORT or LISTEN_HOST",
            file=sys.stderr,
        )
        return 1
    finally:
        if embedded is not None:
            embedded.stop()
            log.info("embedded_database_stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
