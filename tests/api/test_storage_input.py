"""No storage input answers 500, and a silent server holds nothing for long (issue 14, findings
5 and 6).

botocore raised while building its client for an endpoint such as ``http://bad_host:9`` or a
region such as ``bad region!``: validation, creation with ``?validate=true``, a later
``.../{id}/validate`` and a restore point's delete answered 500, the last leaving the point
``deleting``. A Swift validation against a host that accepts connections and never answers
outlived its deadline by the whole read timeout, and each such validation held threads of its
own.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from storage.swift import MAX_THREADS
from tests.api.conftest import (
    S3_BODY,
    SWIFT_BODY,
    Api,
    ApiFactory,
    add_instance,
    insert_restore_point,
)

KEYSTONE_BODY = {
    **SWIFT_BODY,
    "auth_url": "http://127.0.0.1:9/v3",
    "auth_version": "3",
    "username": "tester",
    "project_name": "proj",
}


@pytest.fixture
async def inst(api: Api) -> str:
    return await add_instance(api.db)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**S3_BODY, "endpoint": "http://bad_host:9", "plain_http": None}, "endpoint"),
        ({**S3_BODY, "endpoint": "bad_host:9"}, "endpoint"),
        ({**S3_BODY, "endpoint": "http://b\u00fccher.example:9", "plain_http": None}, "endpoint"),
        ({**S3_BODY, "endpoint": "http://[fe80::1%25eth0]:9", "plain_http": None}, "endpoint"),
        ({**S3_BODY, "region": "bad region!"}, "region"),
        ({**S3_BODY, "region": "12345"}, "region"),
        ({**SWIFT_BODY, "auth_url": "http://bad_host:9/auth/v1.0"}, "auth_url"),
        ({**KEYSTONE_BODY, "auth_url": "http://127.0.0.1:99999/v3"}, "auth_url"),
    ],
    ids=["underscore", "bare", "unicode", "ipv6-zone", "space", "digits", "v1", "port"],
)
async def test_settings_clients_refuse_are_a_400_naming_the_field(
    api: Api, inst: str, body: dict[str, Any], field: str
) -> None:
    body = {k: v for k, v in body.items() if v is not None}
    for path in ("/destinations/validate", "/destinations?validate=true", "/destinations"):
        status, answer = await api.call("POST", path, instance=inst, json=body)
        assert status == 400, (path, answer)
        assert answer["error"] == "invalid_input" and answer["field"] == field, answer
    assert await api.db.destinations.count_documents({"instance_id": inst}) == 0


async def test_a_stored_destination_refused_today_answers_without_a_500(
    api: Api, inst: str
) -> None:
    """Stored before the rules (or by hand): the check says what is wrong, and deleting a
    restore point in it is refused before the point is touched."""
    status, dest = await api.call("POST", "/destinations", instance=inst, json=S3_BODY)
    assert status == 201, dest
    point = await insert_restore_point(api, inst, dest["id"], "p")
    for endpoint, region in (("http://bad_host:9", "us-east-1"), (dest["endpoint"], "bad region!")):
        await api.db.destinations.update_one(
            {"_id": dest["id"]}, {"$set": {"endpoint": endpoint, "region": region}}
        )
        status, answer = await api.call(
            "POST", f"/destinations/{dest['id']}/validate", instance=inst
        )
        assert status == 200 and answer["ok"] is False, answer
        assert answer["error"] == "destination_invalid", answer
        status, answer = await api.call("DELETE", f"/restore_points/{point}", instance=inst)
        assert status == 409 and answer["error"] == "destination_invalid", answer
        assert "correct the destination" in answer["description"]
        stored = await api.db.restore_points.find_one({"_id": point})
        assert stored is not None and stored["state"] == "available"


@pytest.fixture
async def silent() -> AsyncIterator[str]:
    """A server that accepts connections, reads, and never answers: its base URL."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    for writer in held:
        writer.close()
    server.close()


def _aimed_at(body: dict[str, Any], url: str) -> dict[str, Any]:
    if body["type"] == "S3":
        return {**body, "endpoint": url}
    suffix = "/auth/v1.0" if body["auth_version"] == "1" else "/v3"
    return {**body, "auth_url": url + suffix}


DEADLINE = 3.0


@pytest.fixture
async def quick(make_api: ApiFactory) -> Api:
    return await make_api(DESTINATION_VALIDATE_TIMEOUT=str(DEADLINE))


@pytest.mark.parametrize("body", [SWIFT_BODY, KEYSTONE_BODY, S3_BODY], ids=["v1", "v3", "s3"])
async def test_a_silent_server_is_given_up_on_in_time(
    quick: Api, silent: str, body: dict[str, Any]
) -> None:
    inst = await add_instance(quick.db)
    started = time.monotonic()
    status, answer = await quick.call(
        "POST", "/destinations/validate", instance=inst, json=_aimed_at(body, silent)
    )
    elapsed = time.monotonic() - started
    assert status == 200 and answer["ok"] is False, answer
    assert answer["error"] in ("storage_timeout", "storage_transient"), answer
    # The deadline plus a generous margin: it was the deadline plus the 60 s read timeout.
    assert elapsed < DEADLINE + 7, elapsed


async def test_concurrent_validations_share_a_bounded_pool(quick: Api, silent: str) -> None:
    inst = await add_instance(quick.db)
    body = _aimed_at(SWIFT_BODY, silent)
    most = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal most
        while not done.is_set():
            swift = [t for t in threading.enumerate() if t.name.startswith("swift")]
            most = max(most, len(swift))
            await asyncio.sleep(0.05)

    async def validate() -> tuple[int, Any]:
        return await quick.call("POST", "/destinations/validate", instance=inst, json=body)

    sampler = asyncio.create_task(sample())
    started = time.monotonic()
    answers = await asyncio.gather(*(validate() for _ in range(MAX_THREADS + 16)))
    elapsed = time.monotonic() - started
    done.set()
    await sampler
    assert all(status == 200 and not answer["ok"] for status, answer in answers), answers
    assert 0 < most <= MAX_THREADS, most
    assert elapsed < DEADLINE + 10, elapsed
