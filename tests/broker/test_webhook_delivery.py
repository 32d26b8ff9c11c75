"""Webhook deliveries against a real receiver on loopback (an aiohttp server in the test that
checks signatures the way docs/webhooks.md tells receivers to): CloudEvents bodies signed
with the webhook's secret, retries with backoff on 5xx, giving up after WEBHOOK_MAX_ATTEMPTS
with the failure in the delivery log, no redirect followed, the egress policy checked at
each delivery, and no event lost (duplicates only with the same id) when a manager process
is killed with SIGKILL while it delivers."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from backup import webhooks
from backup.secrets import generate_master_key_spec
from backup.webhooks import EventType
from tests.servers.broker import BROKER_PASSWORD, BROKER_USER, Service, start_service, stop_service
from tests.servers.listener import Listener
from tests.servers.log_audit import audit_secret
from tests.servers.managers import (  # noqa: F401 - fixtures
    ManagerProcess,
    SharedDatabase,
    managers,
    shared_database,
)
from tests.servers.seed import seed_instance

SECRET = "receiver-Secret-0123456789abcdef"
OTHER_SECRET = "the-other-Secret-0123456789"
RECEIVER_TEXT = "receiver-private-detail-Z9"  # the receiver's body: never in our log
for _value in (SECRET, OTHER_SECRET):
    audit_secret(_value, "tests.broker.test_webhook_delivery")

FAST = {
    "WEBHOOK_ALLOW_HTTP": "true",
    "WEBHOOK_POLL_SECONDS": "0.1",
    "WEBHOOK_BACKOFF_SECONDS": "0.05",
    "WEBHOOK_BACKOFF_MAX_SECONDS": "0.2",
    "WEBHOOK_TIMEOUT_SECONDS": "5",
}


# --------------------------------------------------------------------------- the receiver


def verify(secret: str, headers: dict[str, str], body: bytes, tolerance: int = 300) -> bool:
    """The receiver's check, as docs/webhooks.md writes it (independent of the manager's
    code): HMAC-SHA256 over ``webhook-id.webhook-timestamp.body`` with the secret, base64,
    compared with each ``v1,`` signature; the timestamp within five minutes."""
    msg_id, stamp = headers.get("webhook-id", ""), headers.get("webhook-timestamp", "")
    if not msg_id or not stamp.isdigit() or abs(time.time() - int(stamp)) > tolerance:
        return False
    key = base64.b64decode(secret[6:]) if secret.startswith("whsec_") else secret.encode()
    digest = hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    expected = "v1," + base64.b64encode(digest).decode()
    return any(
        hmac.compare_digest(expected, s) for s in headers.get("webhook-signature", "").split()
    )


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


@dataclass
class Receiver:
    url: str = ""
    got: list[Received] = field(default_factory=list)
    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    """The answers to give, in order; then ``otherwise``."""
    otherwise: int = 200
    delay: float = 0.0

    async def handle(self, request: web.Request) -> web.Response:
        self.got.append(
            Received({k.lower(): v for k, v in request.headers.items()}, await request.read())
        )
        if self.delay:
            await asyncio.sleep(self.delay)
        status, headers = self.script.pop(0) if self.script else (self.otherwise, {})
        return web.Response(status=status, headers=headers, text=RECEIVER_TEXT)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hooks", rec.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    rec.url = f"http://127.0.0.1:{port}/hooks"
    yield rec
    await runner.cleanup()


# --------------------------------------------------------------------------- the service


@pytest.fixture
async def start(
    mongo_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., Awaitable[Service]]]:
    started: list[Service] = []

    async def make(database: str | None = None, keys: str | None = None, **env: str) -> Service:
        """A service (on ``database``, with the master ``keys``, when given: a replica of
        another) with the tests' fast webhook settings and ``env``."""
        for name, value in {**FAST, **env}.items():
            monkeypatch.setenv(name, value)
        overrides = {"SECRETS_MASTER_KEYS": keys} if keys else {}
        service = await start_service(mongo_url, tmp_path, database, loops=True, **overrides)
        started.append(service)
        return service

    yield make
    for service in started:
        await stop_service(service)


async def call(service: Service, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    auth = aiohttp.encode_basic_auth(BROKER_USER, BROKER_PASSWORD)
    async with service.http.request(
        method, service.url + path, json=body, headers={"Authorization": auth}
    ) as r:
        return r.status, (await r.json(content_type=None) if r.status != 204 else None)


async def add_webhook(
    service: Service, instance: str, url: str, events: list[str], secret: str = SECRET
) -> dict[str, Any]:
    status, hook = await call(
        service,
        "POST",
        f"/v1/service_instances/{instance}/webhooks",
        {"url": url, "events": events, "secret": secret},
    )
    assert status == 201, hook
    return dict(hook)


async def deliveries(service: Service, instance: str, hook_id: str) -> list[dict[str, Any]]:
    status, page = await call(
        service, "GET", f"/v1/service_instances/{instance}/webhooks/{hook_id}/deliveries"
    )
    assert status == 200, page
    return list(page["items"])


async def until(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def settled(service: Service, instance: str, hook_id: str, state: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        items = await deliveries(service, instance, hook_id)
        return items[0] if items and items[0]["state"] == state else None

    return dict(await until(check, f"a delivery {state}"))


# --------------------------------------------------------------------------- tests


async def test_a_delivery_is_a_signed_cloudevent_that_only_the_right_secret_verifies(
    start: Callable[..., Awaitable[Service]], receiver: Receiver
) -> None:
    service = await start()
    instance = (await seed_instance(service.db))["_id"]
    wanted = await add_webhook(service, instance, receiver.url, ["job.failed"])
    await add_webhook(service, instance, receiver.url, ["job.succeeded"], OTHER_SECRET)

    await webhooks.emit(
        service.db, instance, EventType.JOB_FAILED, "job-1", {"job_id": "job-1", "reason": "x"}
    )
    await until(lambda: _true(len(receiver.got) >= 1), "the delivery")
    done = await settled(service, instance, wanted["id"], "succeeded")
    await asyncio.sleep(0.3)
    assert len(receiver.got) == 1, "the webhook that does not want the event gets nothing"

    got = receiver.got[0]
    event = got.event
    assert event["specversion"] == "1.0"
    assert event["type"] == "io.osbbackup.job.failed"
    assert event["source"] == f"/v1/service_instances/{instance}"
    assert event["subject"] == "job-1"
    assert event["datacontenttype"] == "application/json"
    assert event["data"] == {"job_id": "job-1", "reason": "x"}
    assert event["time"].endswith("Z")
    assert got.headers["webhook-id"] == event["id"] == done["event_id"]
    assert got.headers["content-type"].startswith("application/cloudevents+json")

    assert verify(SECRET, got.headers, got.body)
    assert not verify(OTHER_SECRET, got.headers, got.body), "a wrong secret fails"
    assert not verify(SECRET, got.headers, got.body.replace(b"job-1", b"job-2"))
    stale = {**got.headers, "webhook-timestamp": str(int(time.time()) - 3600)}
    assert not verify(SECRET, stale, got.body), "an old timestamp fails"

    assert done["attempts"] == 1 and done["last_status_code"] == 200
    assert done["attempt_log"][0]["error"] is None
    assert "body" not in done and SECRET not in json.dumps(done)


async def test_a_standard_webhooks_secret_signs_with_its_decoded_bytes(
    start: Callable[..., Awaitable[Service]], receiver: Receiver
) -> None:
    service = await start()
    instance = (await seed_instance(service.db))["_id"]
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    audit_secret(secret, "a whsec_ secret")
    await add_webhook(service, instance, receiver.url, ["drill.failed"], secret)
    await webhooks.emit(service.db, instance, EventType.DRILL_FAILED, "plan-1", {})
    await until(lambda: _true(receiver.got), "the delivery")
    got = receiver.got[0]
    assert verify(secret, got.headers, got.body)
    # the same bytes as a plain secret do not verify: the key is the decoded secret
    assert not verify(secret.removeprefix("whsec_") + "==", got.headers, got.body)


async def test_5xx_answers_are_retried_with_backoff_until_one_succeeds(
    start: Callable[..., Awaitable[Service]], receiver: Receiver
) -> None:
    service = await start()
    instance = (await seed_instance(service.db))["_id"]
    hook = await add_webhook(service, instance, receiver.url, ["restore_point.expired"])
    receiver.script = [(500, {}), (503, {})]
    await webhooks.emit(service.db, instance, EventType.RESTORE_POINT_EXPIRED, "rp-1", {})
    done = await settled(service, instance, hook["id"], "succeeded")
    assert len(receiver.got) == 3
    assert {r.headers["webhook-id"] for r in receiver.got} == {done["event_id"]}
    assert len({r.body for r in receiver.got}) == 1, "every attempt sends the same event"
    assert all(verify(SECRET, r.headers, r.body) for r in receiver.got)
    assert done["attempts"] == 3
    assert [a["status_code"] for a in done["attempt_log"]] == [500, 503, 200]
    assert [a["error"] for a in done["attempt_log"]] == [
        "the receiver answered 500",
        "the receiver answered 503",
        None,
    ]
    assert RECEIVER_TEXT not in json.dumps(done)


async def test_a_delivery_is_given_up_after_the_configured_attempts_and_says_why(
    start: Callable[..., Awaitable[Service]], receiver: Receiver
) -> None:
    service = await start(WEBHOOK_MAX_ATTEMPTS="3")
    instance = (await seed_instance(service.db))["_id"]
    hook = await add_webhook(service, instance, receiver.url, ["job.succeeded"])
    receiver.otherwise = 500
    await webhooks.emit(service.db, instance, EventType.JOB_SUCCEEDED, "job-9", {})
    failed = await settled(service, instance, hook["id"], "failed")
    assert failed["attempts"] == 3
    assert failed["last_status_code"] == 500
    assert failed["last_error"] == "the receiver answered 500"
    assert failed["next_attempt_at"] is None and failed["failed_at"]
    await asyncio.sleep(0.5)
    assert len(receiver.got) == 3, "no attempt after giving up"
    assert RECEIVER_TEXT not in json.dumps(failed)


async def test_a_redirect_is_not_followed(
    start: Callable[..., Awaitable[Service]], receiver: Receiver, allowed: Listener
) -> None:
    service = await start(WEBHOOK_MAX_ATTEMPTS="1")
    instance = (await seed_instance(service.db))["_id"]
    hook = await add_webhook(service, instance, receiver.url, ["job.failed"])
    receiver.script = [(307, {"Location": allowed.url + "/elsewhere"})]
    await webhooks.emit(service.db, instance, EventType.JOB_FAILED, "job-3", {})
    failed = await settled(service, instance, hook["id"], "failed")
    assert failed["last_status_code"] == 307
    assert failed["last_error"] == "the receiver answered 307, a redirect, which is not followed"
    assert allowed.connections == 0


async def test_the_egress_policy_is_checked_again_at_each_delivery(
    start: Callable[..., Awaitable[Service]], denied: Listener
) -> None:
    """A webhook whose URL was allowed when it was created (a name that resolved to an
    allowed address then) and points at a denied network now: nothing connects there."""
    service = await start(WEBHOOK_MAX_ATTEMPTS="2")
    instance = (await seed_instance(service.db))["_id"]
    status, hook = await call(
        service,
        "POST",
        f"/v1/service_instances/{instance}/webhooks",
        {"url": "http://127.0.0.1:9/hooks", "events": ["job.failed"], "secret": SECRET},
    )
    assert status == 201, hook
    await service.db.webhooks.update_one(
        {"_id": hook["id"]}, {"$set": {"url": f"{denied.url}/hooks"}}
    )
    await webhooks.emit(service.db, instance, EventType.JOB_FAILED, "job-4", {})
    failed = await settled(service, instance, hook["id"], "failed")
    assert failed["attempts"] == 2
    assert "egress policy" in failed["last_error"], failed
    assert denied.connections == 0


async def test_a_disabled_or_deleted_webhook_gets_no_new_events(
    start: Callable[..., Awaitable[Service]], receiver: Receiver
) -> None:
    service = await start()
    instance = (await seed_instance(service.db))["_id"]
    hook = await add_webhook(service, instance, receiver.url, ["job.failed"])
    status, _ = await call(
        service,
        "PATCH",
        f"/v1/service_instances/{instance}/webhooks/{hook['id']}",
        {"enabled": False},
    )
    assert status == 200
    await webhooks.emit(service.db, instance, EventType.JOB_FAILED, "job-5", {})
    assert await service.db.webhook_deliveries.count_documents({"webhook_id": hook["id"]}) == 0


async def test_two_replicas_share_the_outbox_and_send_each_event_once(
    start: Callable[..., Awaitable[Service]], receiver: Receiver
) -> None:
    keys = generate_master_key_spec()  # replicas share their master keys
    audit_secret(keys.partition(":")[2], "the master key of two replicas")
    one = await start(keys=keys)
    two = await start(one.settings.mongodb_database, keys=keys)
    instance = (await seed_instance(one.db))["_id"]
    hook = await add_webhook(one, instance, receiver.url, ["job.succeeded"])
    receiver.delay = 0.02
    events = 40
    for n in range(events):
        by = one if n % 2 else two  # each replica's own events wake it first
        await webhooks.emit(by.db, instance, EventType.JOB_SUCCEEDED, f"job-{n}", {"n": n})

    async def all_sent() -> bool:
        done = {"webhook_id": hook["id"], "state": "succeeded"}
        return await one.db.webhook_deliveries.count_documents(done) == events

    try:
        await until(all_sent, "every delivery", timeout=90)
    except AssertionError:
        rows = await one.db.webhook_deliveries.find({}, {"state": 1}).to_list()
        states = sorted(r["state"] for r in rows)
        raise AssertionError(f"not every delivery succeeded: {states}") from None
    ids = [r.headers["webhook-id"] for r in receiver.got]
    assert len(ids) == len(set(ids)) == events, "each event once: no crash, no duplicate"
    owners = {
        e["lease_owner"] async for e in one.db.webhook_deliveries.find({}, {"lease_owner": 1})
    }
    assert owners == {None}, "every lease was let go"


def _true(value: Any) -> Awaitable[Any]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


# --------------------------------------------------------------------------- kill -9


async def test_no_event_is_lost_when_the_manager_is_killed_while_it_delivers(
    shared_database: SharedDatabase,  # noqa: F811
    managers: Callable[..., list[ManagerProcess]],  # noqa: F811
    receiver: Receiver,
) -> None:
    env = {**FAST, "WEBHOOK_LEASE_SECONDS": "2", "WEBHOOK_TIMEOUT_SECONDS": "1.5"}
    env["WEBHOOK_CONCURRENCY"] = "4"
    (first,) = managers(1, **shared_database.env, **env)
    db = shared_database.db
    instance = (await seed_instance(db))["_id"]
    status, hook = await first.api(
        "POST",
        f"/v1/service_instances/{instance}/webhooks",
        {"url": receiver.url, "events": ["job.succeeded"], "secret": SECRET},
    )
    assert status == 201, hook
    receiver.delay = 0.2  # each delivery takes a while: the kill lands in the middle
    events = 30
    for n in range(events):
        await webhooks.emit(db, instance, EventType.JOB_SUCCEEDED, f"job-{n}", {"n": n})
    emitted = {d["event_id"] async for d in db.webhook_deliveries.find({"webhook_id": hook["id"]})}
    assert len(emitted) == events

    await until(lambda: _true(len(receiver.got) >= 5), "some deliveries", timeout=60)
    first.kill()
    at_kill = len(receiver.got)
    assert at_kill < events, "the kill came after every delivery: nothing was tested"
    in_flight = await db.webhook_deliveries.count_documents(
        {"webhook_id": hook["id"], "state": "delivering"}
    )

    managers(1, **shared_database.env, **env)  # the replica that takes over

    async def all_done() -> bool:
        return (
            await db.webhook_deliveries.count_documents(
                {"webhook_id": hook["id"], "state": "succeeded"}
            )
            == events
        )

    await until(all_done, "every delivery to succeed", timeout=90)
    received = [r.event for r in receiver.got]
    ids = [e["id"] for e in received]
    assert set(ids) == emitted, "no event lost"
    assert all(verify(SECRET, r.headers, r.body) for r in receiver.got)
    by_id: dict[str, set[bytes]] = {}
    for r in receiver.got:
        assert r.headers["webhook-id"] == r.event["id"]
        by_id.setdefault(r.event["id"], set()).add(r.body)
    assert all(len(bodies) == 1 for bodies in by_id.values()), "a duplicate is the same event"
    duplicates = len(ids) - len(set(ids))
    assert duplicates <= in_flight + 4, (duplicates, in_flight)
    print(f"kill -9 after {at_kill} of {events}; {in_flight} in flight; {duplicates} duplicates")
