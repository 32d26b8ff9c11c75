"""An instance's caller naming another instance's objects by id under its own instance's path
(a plan, a restore point, a job, a webhook, a destination of B in a URL of A): every operation
with an id in its path answers as for an id that does not exist (404 not found; 400 for an id
in a body), reads nothing of B and changes nothing anywhere. Covers each operation the API
declares, so a new one (pins, drills, webhooks and their deliveries, the retention preview)
is tried without being named here."""

from __future__ import annotations

import re
from typing import Any

from broker.api.routes import OPERATIONS, Operation
from tests.api.conftest import Api, Seeded, sample_body, seed
from tests.api.test_auth import _add_binding, _snapshot


def _body(operation: Operation, seeded: Seeded) -> Any:
    """The sample body, with the ids it names taken from ``seeded``; a pin for a point."""
    if operation.operation_id == "update_restore_point":
        return {"pinned": True, "pin_reason": "keep it"}
    return sample_body(operation, seeded)


async def test_ids_of_another_instance_are_unknown_under_ones_own(api: Api) -> None:
    a = await seed(api)
    b = await seed(api)
    api.cc.grant("alice", a.instance)
    callers = {
        "user of A": {"token": api.uaa.token("alice")},
        "binding of A": {"token": await _add_binding(api, a.instance)},
    }
    in_body = {"start_backup", "start_restore", "create_plan"}
    with_ids = [
        o
        for o in OPERATIONS
        if re.search(r"{(?!instance_id)\w+_id}", o.path) or o.operation_id in in_body
    ]
    named = {o.operation_id for o in with_ids}
    assert {"update_webhook", "start_restore_point_drill", "update_restore_point"} <= named
    before = await _snapshot(api)
    b_ids = set(b.ids.values())
    for who, auth in callers.items():
        for operation in with_ids:
            answers = []
            for ids in (b.ids, {k: "no-such-id" for k in b.ids}):
                answers.append(
                    await api.call(
                        operation.method,
                        a.path(operation, **ids),
                        instance=a.instance,
                        json=_body(operation, Seeded(a.instance, ids)),
                        **auth,
                    )
                )
            (status, body), (unknown_status, unknown) = answers
            where = (who, operation.operation_id, body)
            assert status == unknown_status and status in (400, 404), where
            said = str(body)
            for i in b_ids:  # the id sent is named back; nothing else differs
                said = said.replace(i, "no-such-id")
            assert said == str(unknown), (where, unknown)
    assert await _snapshot(api) == before
