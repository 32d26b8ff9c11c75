"""A Cloud Controller stand-in answering ``GET /v3/service_instances/:guid/permissions`` in
the real format (``{"read": bool, "manage": bool}``) for the token's user."""

from __future__ import annotations

from collections.abc import AsyncIterator

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer


class CloudController:
    """``grant(user, instance, read, manage)``; unknown pairs answer 404 like the real one for
    an instance the user cannot see."""

    def __init__(self) -> None:
        self.grants: dict[tuple[str, str], tuple[bool, bool]] = {}
        self.requests = 0
        self.server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    def grant(self, user: str, instance_id: str, *, read: bool = True, manage: bool = True) -> None:
        self.grants[(user, instance_id)] = (read, manage)

    def app(self) -> web.Application:
        async def permissions(request: web.Request) -> web.Response:
            self.requests += 1
            auth = request.headers.get("Authorization", "")
            if not auth.startswith("Bearer "):
                return web.json_response({"errors": [{"code": 10002}]}, status=401)
            try:
                claims = jwt.decode(auth[7:], options={"verify_signature": False})
            except jwt.InvalidTokenError:
                return web.json_response({"errors": [{"code": 1000}]}, status=401)
            user = claims.get("user_id") or claims.get("sub")
            grant = self.grants.get((user, request.match_info["guid"]))
            if grant is None:
                return web.json_response(
                    {"errors": [{"code": 10010, "title": "CF-ResourceNotFound"}]}, status=404
                )
            return web.json_response({"read": grant[0], "manage": grant[1]})

        app = web.Application()
        app.router.add_get("/v3/service_instances/{guid}/permissions", permissions)
        return app


@pytest.fixture
async def cloud_controller() -> AsyncIterator[CloudController]:
    cc = CloudController()
    cc.server = TestServer(cc.app(), host="127.0.0.1")
    await cc.server.start_server()
    yield cc
    await cc.server.close()
