"""A Cloud Controller stand-in answering, in the real v3 format and for the token's user:
``GET /v3/service_instances/:guid/permissions`` (``{"read": bool, "manage": bool}``), and the
look-ups the ``osb-backup`` CLI makes to turn an instance name into its guid:
``GET /v3/service_instances?names=...&space_guids=...`` and ``GET /v3/spaces/:guid``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer


@dataclass(frozen=True, slots=True)
class ServiceInstance:
    guid: str
    name: str
    space_guid: str
    dashboard_url: str | None = None


def _error(status: int, code: int, title: str, detail: str) -> web.Response:
    return web.json_response(
        {"errors": [{"code": code, "title": title, "detail": detail}]}, status=status
    )


class CloudController:
    """``grant(user, instance, read, manage)``; unknown pairs answer 404 like the real one for
    an instance the user cannot see. ``add_space`` and ``add_instance`` name spaces and
    instances; a user sees the instances it has a grant on and the spaces holding them."""

    def __init__(self) -> None:
        self.grants: dict[tuple[str, str], tuple[bool, bool]] = {}
        self.spaces: dict[str, str] = {}
        self.instances: dict[str, ServiceInstance] = {}
        self.requests = 0
        self.lookups = 0
        self.server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    def grant(self, user: str, instance_id: str, *, read: bool = True, manage: bool = True) -> None:
        self.grants[(user, instance_id)] = (read, manage)

    def add_space(self, guid: str, name: str) -> None:
        self.spaces[guid] = name

    def add_instance(
        self, guid: str, name: str, space_guid: str, dashboard_url: str | None = None
    ) -> None:
        self.instances[guid] = ServiceInstance(guid, name, space_guid, dashboard_url)

    def _visible(self, user: str, instance: ServiceInstance) -> bool:
        return (user, instance.guid) in self.grants

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

        async def list_instances(request: web.Request) -> web.Response:
            self.lookups += 1
            user = _user(request)
            if user is None:
                return _invalid_token()
            names = _csv(request.query.get("names"))
            spaces = _csv(request.query.get("space_guids"))
            found = [
                instance
                for instance in self.instances.values()
                if self._visible(user, instance)
                and (names is None or instance.name in names)
                and (spaces is None or instance.space_guid in spaces)
            ]
            return web.json_response(
                {
                    "pagination": {
                        "total_results": len(found),
                        "total_pages": 1,
                        "first": {"href": str(request.url)},
                        "last": {"href": str(request.url)},
                        "next": None,
                        "previous": None,
                    },
                    "resources": [_instance_resource(instance) for instance in found],
                }
            )

        async def get_space(request: web.Request) -> web.Response:
            user = _user(request)
            if user is None:
                return _invalid_token()
            guid = request.match_info["guid"]
            if guid not in self.spaces:
                return _error(404, 10010, "CF-ResourceNotFound", "Space not found")
            return web.json_response({"guid": guid, "name": self.spaces[guid]})

        app = web.Application()
        app.router.add_get("/v3/service_instances/{guid}/permissions", permissions)
        app.router.add_get("/v3/service_instances", list_instances)
        app.router.add_get("/v3/spaces/{guid}", get_space)
        return app


def _user(request: web.Request) -> str | None:
    """The token's user, or None when the token is missing, malformed or expired (the real
    Cloud Controller checks the signature as well; the manager's tests cover that)."""
    auth = request.headers.get("Authorization", "")
    if not auth.lower().startswith("bearer "):
        return None
    try:
        claims: dict[str, Any] = jwt.decode(auth[7:], options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return None
    if not isinstance(claims.get("exp"), int) or claims["exp"] < time.time():
        return None
    user = claims.get("user_id") or claims.get("sub")
    return str(user) if user else None


def _invalid_token() -> web.Response:
    return _error(401, 1000, "CF-InvalidAuthToken", "Invalid Auth Token")


def _csv(value: str | None) -> set[str] | None:
    return None if value is None else {part for part in value.split(",") if part}


def _instance_resource(instance: ServiceInstance) -> dict[str, Any]:
    return {
        "guid": instance.guid,
        "name": instance.name,
        "type": "managed",
        "dashboard_url": instance.dashboard_url,
        "relationships": {"space": {"data": {"guid": instance.space_guid}}},
    }


@pytest.fixture
async def cloud_controller() -> AsyncIterator[CloudController]:
    cc = CloudController()
    cc.server = TestServer(cc.app(), host="127.0.0.1")
    await cc.server.start_server()
    yield cc
    await cc.server.close()
