from __future__ import annotations

from tests.api.conftest import Api, plan_body


async def test_smoke(api: Api, instance: str, destination: dict) -> None:
    s, b = await api.call("POST", "/plans", instance=instance, json=plan_body(destination["id"]))
    assert s == 201, b
    s, b2 = await api.call("GET", "/plans", instance=instance)
    assert s == 200, b2
    assert b2["total"] == 1
