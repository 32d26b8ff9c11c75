"""The Swift test cluster's process: run by ``tests/servers/swift.py`` with the interpreter of
``.venv-swift`` (Swift brings eventlet, so it does not share the project's venv).

One eventlet process serves, each on its own loopback port, the real account, container,
object and proxy servers of OpenStack Swift (loaded from the configuration files the fixture
wrote; the proxy perhaps on more ports, which a Keystone catalog lists as other interfaces or
regions), plus, for a cluster behind tempauth, a small Keystone v3 stand-in for fast tests: it
speaks Keystone's wire format (``POST /v3/auth/tokens`` with the password method, user domain
and project scope; the token in ``X-Subject-Token``; a catalog with an ``object-store``
endpoint) and backs it with a real tempauth token from the proxy, so that everything after
authentication is real Swift. A cluster behind the real Keystone (``authtoken`` and
``keystoneauth`` in the proxy's pipeline) has no stand-in.

Usage: ``python swift_runner.py CONF_DIR`` (reads ``CONF_DIR/runner.json``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import sys
import urllib.error
import urllib.request
import uuid
import warnings

warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")

import eventlet  # noqa: E402
import eventlet.wsgi  # noqa: E402


def _log_to_stderr() -> None:
    """Swift logs to syslog (UDP to localhost when /dev/log is missing): send it to stderr,
    which the fixture points at a log file."""
    from swift.common.utils import logs

    class StderrHandler(logging.StreamHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(sys.stderr)

    logs.ThreadSafeSysLogHandler = StderrHandler  # type: ignore[misc]


def _build_rings(conf_dir: str, ports: dict[str, int]) -> None:
    from swift.common.ring import RingBuilder

    for name in ("account", "container", "object"):
        target = os.path.join(conf_dir, f"{name}.ring.gz")
        if os.path.exists(target):
            continue
        builder = RingBuilder(10, 1, 1)
        builder.add_dev(
            {
                "id": 0,
                "region": 1,
                "zone": 1,
                "ip": "127.0.0.1",
                "port": ports[name],
                "device": "sdb1",
                "weight": 1,
                "meta": "",
            }
        )
        builder.rebalance()
        builder.get_ring().save(target)


class Keystone:
    """``POST /v3/auth/tokens`` as Keystone answers it, for one configured user and project."""

    def __init__(self, cfg: dict, proxy_port: int) -> None:
        self.cfg = cfg
        self.proxy = f"http://127.0.0.1:{proxy_port}"

    def __call__(self, environ: dict, start_response):  # type: ignore[no-untyped-def]
        path = environ.get("PATH_INFO", "").rstrip("/")
        method = environ["REQUEST_METHOD"]
        if method == "GET" and path in ("", "/v3"):
            return self._json(start_response, "200 OK", self._versions(environ, path))
        if path != "/v3/auth/tokens":
            return self._error(start_response, 404, "Not Found", "The resource could not be found.")
        if method != "POST":
            return self._error(start_response, 405, "Method Not Allowed", "Use POST.")
        try:
            size = int(environ.get("CONTENT_LENGTH") or 0)
            body = json.loads(environ["wsgi.input"].read(size) or b"{}")
            auth = body["auth"]
            identity = auth["identity"]
            user = identity["password"]["user"]
        except (ValueError, KeyError, TypeError):
            return self._error(start_response, 400, "Bad Request", "Malformed auth request.")
        if "password" not in identity.get("methods", []):
            return self._unauthorized(start_response)
        domain = user.get("domain") or {}
        if not (
            user.get("name") == self.cfg["user"]
            and user.get("password") == self.cfg["password"]
            and (domain.get("name") == self.cfg["user_domain"] or domain.get("id") == "default")
        ):
            return self._unauthorized(start_response)
        project = ((auth.get("scope") or {}).get("project")) or {}
        pdomain = project.get("domain") or {}
        if not (
            project.get("name") == self.cfg["project"]
            and (
                pdomain.get("name") == self.cfg["project_domain"] or pdomain.get("id") == "default"
            )
        ):
            return self._unauthorized(start_response)
        try:
            token, storage_url = self._tempauth_token()
        except OSError as exc:
            return self._error(start_response, 503, "Service Unavailable", str(exc))
        now = dt.datetime.now(dt.UTC)
        endpoint = {
            "region": "RegionOne",
            "region_id": "RegionOne",
            "url": storage_url,
        }
        answer = {
            "token": {
                "methods": ["password"],
                "issued_at": now.strftime("%Y-%m-%dT%H:%M:%S.000000Z"),
                "expires_at": (now + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.000000Z"),
                "audit_ids": [uuid.uuid4().hex[:22]],
                "user": {
                    "id": "u-" + self.cfg["user"],
                    "name": self.cfg["user"],
                    "domain": {"id": "default", "name": self.cfg["user_domain"]},
                    "password_expires_at": None,
                },
                "project": {
                    "id": "p-" + self.cfg["project"],
                    "name": self.cfg["project"],
                    "domain": {"id": "default", "name": self.cfg["project_domain"]},
                },
                "roles": [{"id": "r-member", "name": "member"}],
                "is_domain": False,
                "catalog": [
                    {
                        "id": "s-swift",
                        "type": "object-store",
                        "name": "swift",
                        "endpoints": [
                            {"id": f"e-{kind}", "interface": kind, **endpoint}
                            for kind in ("public", "internal", "admin")
                        ],
                    }
                ],
            }
        }
        return self._json(start_response, "201 Created", answer, [("X-Subject-Token", token)])

    def _tempauth_token(self) -> tuple[str, str]:
        request = urllib.request.Request(  # noqa: S310 - loopback, fixed scheme
            self.proxy + "/auth/v1.0",
            headers={
                "X-Auth-User": self.cfg["tempauth_user"],
                "X-Auth-Key": self.cfg["tempauth_key"],
            },
        )
        with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310
            return answer.headers["X-Auth-Token"], answer.headers["X-Storage-Url"]

    def _versions(self, environ: dict, path: str) -> dict:
        host = environ.get("HTTP_HOST", "127.0.0.1")
        v3 = {
            "id": "v3.14",
            "status": "stable",
            "updated": "2020-04-07T00:00:00Z",
            "links": [{"rel": "self", "href": f"http://{host}/v3/"}],
            "media-types": [
                {"base": "application/json", "type": "application/vnd.openstack.identity-v3+json"}
            ],
        }
        return {"version": v3} if path == "/v3" else {"versions": {"values": [v3]}}

    def _unauthorized(self, start_response):  # type: ignore[no-untyped-def]
        return self._error(
            start_response,
            401,
            "Unauthorized",
            "The request you have made requires authentication.",
            [("WWW-Authenticate", 'Keystone uri="http://127.0.0.1"')],
        )

    def _error(self, start_response, code, title, message, headers=()):  # type: ignore[no-untyped-def]
        body = {"error": {"code": code, "title": title, "message": message}}
        return self._json(start_response, f"{code} {title}", body, list(headers))

    @staticmethod
    def _json(start_response, status, body, headers=None):  # type: ignore[no-untyped-def]
        data = json.dumps(body).encode()
        start_response(
            status,
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(data))),
                *(headers or []),
            ],
        )
        return [data]


def main(conf_dir: str) -> None:
    from swift.common import utils
    from swift.common.http_protocol import SwiftHttpProtocol
    from swift.common.wsgi import loadapp

    utils.monkey_patch()
    _log_to_stderr()
    with open(os.path.join(conf_dir, "runner.json")) as f:
        cfg = json.load(f)
    ports: dict[str, int] = cfg["ports"]
    utils.set_swift_dir(conf_dir)
    _build_rings(conf_dir, ports)

    servers = []
    for name in ("account", "container", "object", "proxy"):
        sock = eventlet.listen(("127.0.0.1", ports[name]), backlog=128)
        app = loadapp(os.path.join(conf_dir, f"{name}-server.conf"))
        servers.append((name, sock, app))
    # The same proxy on more ports: a catalog's other interfaces and regions.
    proxy_app = servers[-1][2]
    for name in cfg.get("more_proxies", []):
        servers.append((name, eventlet.listen(("127.0.0.1", ports[name]), backlog=128), proxy_app))

    # Line-buffered: tests read it while the cluster runs.
    access_log = open(os.path.join(conf_dir, "..", "access.log"), "a", buffering=1)
    for name, sock, app in servers:
        eventlet.spawn(
            eventlet.wsgi.server,
            sock,
            app,
            log=access_log,
            custom_pool=eventlet.GreenPool(1024),
            protocol=SwiftHttpProtocol,
            socket_timeout=120,
            capitalize_response_headers=False,
            log_format=f"{name} %(client_ip)s %(request_line)s %(status_code)s %(body_length)s "
            "%(wall_seconds).3f",
        )
    if cfg.get("keystone"):  # the stand-in, for a cluster behind tempauth
        eventlet.spawn(
            eventlet.wsgi.server,
            eventlet.listen(("127.0.0.1", ports["keystone"]), backlog=64),
            Keystone(cfg["keystone"], ports["proxy"]),
            log=access_log,
            socket_timeout=60,
        )

    def stop(*_: object) -> None:
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("swift ready", flush=True)
    while True:
        eventlet.sleep(3600)


if __name__ == "__main__":
    main(sys.argv[1])
