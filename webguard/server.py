"""The aiohttp protocol, guarded against slow and oversized requests, and ``run`` to serve an
app with it.

aiohttp parses requests before any middleware runs: a request line or header over its limit
is answered, by default, with a plain-text 400 that quotes the first ~100 characters of the
offending line (a bearer key, a password) and logs them with a traceback at ERROR. It also has
no deadline for a request's headers or body and no cap on connections, so a few hundred
clients that never finish a request hold as many connections open for an hour.

:class:`GuardedRequestHandler` (a subclass of aiohttp's public ``web.RequestHandler``) answers
such requests with a JSON error that quotes nothing and logs only the kind of failure; closes
a connection whose request headers are not complete ``header_timeout`` seconds after the
connection opened or the request began; fails the body read of a request whose body is not
complete ``body_timeout`` seconds after its headers (408, then the connection closes); and
answers 503 and closes a connection beyond ``max_connections``. :class:`GuardedRunner` makes
the sites listen with it; :func:`run` replaces ``web.run_app`` (same signal handling and
graceful stop).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

log = logging.getLogger("webguard")

ErrorBody = Callable[[str, str], dict[str, Any]]
"""Renders ``(error code, description)`` as the service's JSON error body."""


def default_error_body(code: str, description: str) -> dict[str, Any]:
    return {"error": code, "description": description}


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on what one client may hold of the server."""

    header_timeout: float = 30.0
    """Seconds from connection (or from a request's first byte) to its complete headers."""
    body_timeout: float = 60.0
    """Seconds from a request's complete headers to its complete body."""
    keepalive_timeout: float = 120.0
    """Seconds an idle keep-alive connection stays open (above Cloud Foundry's gorouter's 90 s
    idle timeout, so that the router, not we, closes idle connections first)."""
    max_connections: int = 1000
    """Open connections per process; beyond it a new one gets 503 and is closed."""
    max_line_size: int = 8190
    max_field_size: int = 8190

    def handler_kwargs(self) -> dict[str, Any]:
        return {
            "keepalive_timeout": self.keepalive_timeout,
            "max_line_size": self.max_line_size,
            "max_field_size": self.max_field_size,
            "access_log": None,
        }


class RequestBodyTimeout(web.HTTPRequestTimeout):
    """Raised by a handler's body read when the body did not arrive in time."""


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's request handler with the guards described in the module's docstring."""

    # The private attributes of RequestHandler used here (_manager, _request_count,
    # _messages, _request_in_progress, _lingering_time) are those of the exactly pinned
    # aiohttp (pyproject.toml); tests/broker/test_process_limits.py and
    # tests/agent/test_http_hardening.py exercise every one of them over real sockets.

    def __init__(
        self,
        manager: web.Server,
        *,
        limits: ServerLimits,
        error_body: ErrorBody = default_error_body,
        on_busy: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._guard_limits = limits
        self._guard_error_body = error_body
        self._guard_on_busy = on_busy
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body: Any = None
        self._refused = False

    # --- connections ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        manager = self._manager
        if manager is not None and len(manager.connections) >= self._guard_limits.max_connections:
            # Refused before aiohttp tracks it: answer once, close, and forget the manager so
            # that connection_lost has nothing to undo.
            self._manager = None
            body = json.dumps(
                self._guard_error_body(
                    "too_many_connections",
                    "The server has as many open connections as it accepts; retry shortly.",
                )
            ).encode()
            head = (
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
            ).encode()
            assert isinstance(transport, asyncio.WriteTransport)
            self._refused = True
            with suppress(Exception):
                transport.write(head + body)
                if transport.can_write_eof():
                    transport.write_eof()
            # Close a moment later, discarding what the client sends meanwhile: closing with
            # its request unread would reset the connection and lose the answer.
            self._loop.call_later(1.0, transport.close)
            if self._guard_on_busy is not None:
                self._guard_on_busy()
            return
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None

    # --- deadlines -----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:  # a request's headers are complete
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            payload = self._messages[-1][1] if self._messages else None
            if payload is not None and not payload.is_eof():
                self._arm_body_timer(payload)
        elif data and self._header_timer is None and not self._in_body():
            self._arm_header_timer()  # the first bytes of the next request on this connection
        if self._body is not None and self._body.is_eof() and self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _in_body(self) -> bool:
        return self._body is not None and not self._body.is_eof()

    def _arm_header_timer(self) -> None:
        if self._guard_limits.header_timeout > 0:
            self._header_timer = self._loop.call_later(
                self._guard_limits.header_timeout, self._headers_late
            )

    def _arm_body_timer(self, payload: Any) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
        self._body = payload
        if self._guard_limits.body_timeout > 0:
            self._body_timer = self._loop.call_later(
                self._guard_limits.body_timeout, self._body_late
            )

    def _headers_late(self) -> None:
        self._header_timer = None
        if self._request_in_progress:
            return  # a response is under way; keep-alive handling decides after it
        log.info("http_headers_timeout")
        self.force_close()

    def _body_late(self) -> None:
        self._body_timer = None
        payload = self._body
        if payload is None or payload.is_eof():
            return
        log.info("http_body_timeout")
        # The handler's read fails with 408 (rendered by the service's error handling); no
        # lingering read of the rest, and the connection closes after the answer.
        self._lingering_time = 0.0
        payload.set_exception(
            RequestBodyTimeout(
                text=json.dumps(
                    self._guard_error_body(
                        "request_timeout", "The request body did not arrive in time."
                    )
                ),
                content_type="application/json",
            )
        )
        if not self._request_in_progress:
            self.force_close()

    # --- requests the parser refused -----------------------------------------------------

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A JSON answer that quotes nothing of the request, and a log line that names only
        the kind of failure (aiohttp's own quotes the offending line and logs it)."""
        if request.writer.output_size > 0:
            raise ConnectionError("the response has begun; no error answer can follow")
        if isinstance(exc, LineTooLong) or (
            isinstance(exc, BadHttpMessage) and "Too many headers" in exc.message
        ):
            status, code = 431, "request_header_too_large"
            description = (
                f"The request line (URL) or a header is longer than "
                f"{self._guard_limits.max_field_size} bytes, or there are too many headers."
            )
        elif isinstance(exc, BadHttpMessage) or status == 400:
            status, code = 400, "bad_request"
            description = "The request is not valid HTTP/1.1."
        elif status == 504:
            code, description = "timeout", "The request took too long to handle."
        else:
            status, code = 500, "internal_error"
            description = "The server failed to handle this request; it has been logged."
        if status == 500 and exc is not None:
            log.error("http_handler_failed error=%s", type(exc).__name__, exc_info=exc)
        else:
            log.warning(
                "http_request_refused status=%s reason=%s",
                status,
                type(exc).__name__ if exc is not None else "-",
            )
        resp = web.json_response(self._guard_error_body(code, description), status=status)
        resp.force_close()
        return resp


class GuardedRunner(web.AppRunner):
    """``web.AppRunner`` whose sites accept connections with :class:`GuardedRequestHandler`
    (its ``server`` is what sites pass to ``loop.create_server`` as the protocol factory;
    start-up, shutdown and connection tracking remain aiohttp's)."""

    def __init__(
        self,
        app: web.Application,
        limits: ServerLimits,
        *,
        error_body: ErrorBody = default_error_body,
        **kwargs: Any,
    ) -> None:
        self._guard_limits = limits
        self._guard_error_body = error_body
        self._guard_on_busy = _busy_logger()
        self._guard_handler_kwargs = limits.handler_kwargs()
        super().__init__(app, **{**self._guard_handler_kwargs, **kwargs})

    @property
    def server(self) -> Any:
        inner = super().server
        if inner is None:
            return None
        loop = asyncio.get_running_loop()
        limits, error_body, on_busy = (
            self._guard_limits,
            self._guard_error_body,
            self._guard_on_busy,
        )
        handler_kwargs = self._guard_handler_kwargs

        def protocol() -> GuardedRequestHandler:
            return GuardedRequestHandler(
                inner,
                loop=loop,
                limits=limits,
                error_body=error_body,
                on_busy=on_busy,
                **handler_kwargs,
            )

        return protocol


def _busy_logger(every: float = 60.0) -> Callable[[], None]:
    """Logs refused connections at most once a ``every`` seconds, with their count."""
    state = {"last": float("-inf"), "count": 0}

    def busy() -> None:
        state["count"] += 1
        now = time.monotonic()
        if now - state["last"] >= every:
            log.warning("http_connections_refused count=%s", state["count"])
            state["last"], state["count"] = now, 0

    return busy


async def serve(
    app: web.Application,
    *,
    host: str,
    port: int,
    limits: ServerLimits,
    shutdown_timeout: float,
    ssl_context: ssl.SSLContext | None = None,
    error_body: ErrorBody = default_error_body,
) -> None:
    """Serve ``app`` until cancelled (SIGINT / SIGTERM stop it gracefully, as run_app does)."""
    runner = GuardedRunner(
        app,
        limits,
        error_body=error_body,
        handle_signals=True,
        shutdown_timeout=shutdown_timeout,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
        await asyncio.Event().wait()  # until cancelled
    finally:
        await runner.cleanup()


def run(
    app: web.Application,
    *,
    host: str,
    port: int,
    limits: ServerLimits,
    shutdown_timeout: float,
    ssl_context: ssl.SSLContext | None = None,
    error_body: ErrorBody = default_error_body,
) -> None:
    """``web.run_app`` with the guarded protocol: the same event-loop handling, so that a
    SIGTERM lets requests in flight finish, then runs the app's cleanup contexts."""
    loop = asyncio.new_event_loop()
    main = loop.create_task(
        serve(
            app,
            host=host,
            port=port,
            limits=limits,
            shutdown_timeout=shutdown_timeout,
            ssl_context=ssl_context,
            error_body=error_body,
        )
    )
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():
                main.cancel()
                with suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            rest = asyncio.all_tasks(loop)
            for task in rest:
                task.cancel()
            if rest:
                loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
