"""Hostile text in a webhook: a URL with line breaks, tabs, spaces or other control characters
is refused, not silently cleaned (URL parsers drop CR, LF and tab, so the address checked and
stored would not be the one sent), and a description is one line of text like every other
name a tenant gives. Refused with a clear 400 on create and on change; nothing is stored."""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.conftest import Api, ApiFactory, add_instance

SECRET = "hostile-input-Secret-0123456789"


def hook(**over: Any) -> dict[str, Any]:
    return {"url": "http://127.0.0.1:9/hooks", "events": ["job.failed"], "secret": SECRET, **over}


@pytest.fixture
async def hapi(make_api: ApiFactory) -> Api:
    return await make_api(WEBHOOK_ALLOW_HTTP="true")


HOSTILE = [
    {"url": "http://127.0.0.1\r\n:9/hooks"},
    {"url": "http://127.0.0.1:9/hooks\r\nX-Injected: 1"},
    {"url": "http://127.0.0.1:9/ho\toks"},
    {"url": "http://127.0.0.1:9/a b"},
    {"url": "http://127.0.0.1:9/\x00"},
    {"url": " http://127.0.0.1:9/hooks"},
    {"description": "line one\nline two"},
    {"description": "\x1b[31mred\x1b[0m"},
]


@pytest.mark.parametrize("bad", HOSTILE)
async def test_hostile_webhook_text_is_refused_on_create_and_on_change(
    hapi: Api, bad: dict[str, Any]
) -> None:
    inst = await add_instance(hapi.db)
    status, answer = await hapi.call("POST", "/webhooks", instance=inst, json=hook(**bad))
    assert status == 400 and answer["error"] in ("invalid_input", "invalid_url"), answer
    [name] = bad
    assert name in (answer.get("field") or "") + str(answer.get("problems")), answer
    assert await hapi.db.webhooks.count_documents({"instance_id": inst}) == 0
    status, created = await hapi.call("POST", "/webhooks", instance=inst, json=hook())
    assert status == 201, created
    before = await hapi.db.webhooks.find_one({"_id": created["id"]})
    path = f"/webhooks/{created['id']}"
    status, answer = await hapi.call("PATCH", path, instance=inst, json=bad)
    assert status == 400, answer
    assert await hapi.db.webhooks.find_one({"_id": created["id"]}) == before
