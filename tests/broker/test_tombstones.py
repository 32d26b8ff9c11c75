"""After an asynchronous deprovision the instance answers ``last_operation`` with
``succeeded`` for ``TOMBSTONE_SECONDS`` (platforms poll after completion); then its tombstone
is purged: every endpoint answers as for an instance that never existed, and the id can be
provisioned again. With ``TOMBSTONE_SECONDS=0`` nothing is kept at all."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tests.broker.conftest import FAST, Osb, parameters, provision_body
from tests.servers.broker import start_service, stop_service


async def _purged(osb: Osb, iid: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while (await osb.service.db.instances.count_documents({"_id": iid})) > 0:
        assert time.monotonic() < deadline, "the tombstone was never purged"
        await asyncio.sleep(0.2)


async def test_the_tombstone_answers_then_expires(
    mongo_url: str, tmp_path: Path, agent_url: str
) -> None:
    # The sweep that purges tombstones runs every half lease (at least every second).
    broker = await start_service(
        mongo_url, tmp_path, **{**FAST, "TOMBSTONE_SECONDS": "2", "OPERATION_LEASE_SECONDS": "2"}
    )
    osb = Osb(broker)
    try:
        iid = await osb.ready_instance(parameters(agent_url))
        status, data = await osb.deprovision(iid)
        assert status == 202
        result = await osb.wait(iid, data["operation"])
        assert result["state"] == "succeeded"
        assert (await osb.last_operation(iid, data["operation"]))[0] == 200
        await _purged(osb, iid)
        assert (await osb.last_operation(iid, data["operation"]))[0] == 410
        assert (await osb.deprovision(iid))[0] == 410
        assert (await osb.call("GET", f"/v2/service_instances/{iid}"))[0] == 404
        # The id is free again: a new registration starts from nothing.
        status, data = await osb.provision(iid, provision_body(parameters(agent_url)))
        assert status == 202, data
        assert (await osb.wait(iid, data["operation"]))["state"] == "succeeded"
    finally:
        await stop_service(broker)


async def test_without_tombstones_nothing_is_kept(
    mongo_url: str, tmp_path: Path, agent_url: str
) -> None:
    broker = await start_service(mongo_url, tmp_path, **{**FAST, "TOMBSTONE_SECONDS": "0"})
    osb = Osb(broker)
    try:
        iid = await osb.ready_instance(parameters(agent_url))
        status, data = await osb.deprovision(iid)
        assert status == 202
        assert (await osb.wait(iid, data["operation"]))["state"] == "gone"
        assert await broker.db.instances.count_documents({"_id": iid}) == 0
        assert (await osb.deprovision(iid))[0] == 410
    finally:
        await stop_service(broker)
