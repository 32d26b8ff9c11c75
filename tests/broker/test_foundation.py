"""Health, readiness and the JSON error contract of the running service."""

from __future__ import annotations

from tests.servers.broker import Service


async def test_health_and_ready(service: Service) -> None:
    async with service.http.get(service.url + "/health") as r:
        assert r.status == 200
        assert await r.json() == {"status": "ok"}
    async with service.http.get(service.url + "/ready") as r:
        assert r.status == 200
        assert (await r.json())["database"] == "ok"


async def test_unknown_path_is_a_json_error_with_request_id(service: Service) -> None:
    async with service.http.get(service.url + "/nope", headers={"X-Request-Id": "abc123"}) as r:
        assert r.status == 404
        body = await r.json()
        assert body["error"] == "not_found"
        assert "/nope" in body["description"]
        assert r.headers["X-Request-Id"] == "abc123"
