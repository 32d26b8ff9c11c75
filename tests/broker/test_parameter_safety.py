"""Script parameters are tenant input that become environment variables of the DBA scripts
on the agent: a name that a shell, the dynamic loader, an interpreter or the agent itself
acts on (``BASH_ENV=$(id; env >&2)``, ``LD_PRELOAD``, ``AGENT_SECRETS_FILE``, ...) would run
the tenant's code as the agent's user. Provision and update refuse them over OSB with
``400 InvalidParameters`` naming the parameter, and nothing stored changes (issue 14)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from tests.broker.conftest import (
    AGENT_PASSWORD,
    DB_PASSWORD,
    SERVICE_ID,
    Osb,
    parameters,
    provision_body,
)
from tests.servers.broker import Service

ATTACK = "$(id; env >&2)"
REFUSED = [
    "BASH_ENV",
    "bash_env",
    "ENV",
    "BASH_FUNC_x%%",
    "SHELLOPTS",
    "BASHOPTS",
    "PS4",
    "IFS",
    "PATH",
    "Home",
    "LD_PRELOAD",
    "ld_library_path",
    "DYLD_INSERT_LIBRARIES",
    "GCONV_PATH",
    "GLIBC_TUNABLES",
    "PYTHONSTARTUP",
    "PERL5OPT",
    "RUBYOPT",
    "NODE_OPTIONS",
    "PSQLRC",
    "OPENSSL_CONF",
    "https_proxy",
    "BACKUP_PASSWORD",
    "BACKUP_PORT",
    "restore_file",
    "AGENT_SECRETS_FILE",
    "Agent_Secrets_Fd",
    "S3_ENDPOINT",
    "client_password",
    "directory_backup",
    "JOB_ID",
    "ENCRYPTION_KEY",
]
# What DBAs set: connection options of the clients the example scripts call.
ACCEPTED = {
    "PGSSLMODE": "require",
    "PGCONNECT_TIMEOUT": "10",
    "pgappname": "backup",
    "MYSQL_HOST_ALIAS": "x",
    "REDIS_KEY_PATTERN": "app:*",
    "TZ": "UTC",
}


def _assert_refused(status: int, data: Any, name: str) -> None:
    assert status == 400, (name, data)
    assert data["error"] == "InvalidParameters", data
    # Named by the field (the plan's schema refuses what is no variable name at all) or in
    # the description (the names a shell or the agent would act on) ...
    field = data["field"]
    assert field in ("parameters.database.parameters", f"parameters.database.parameters.{name}")
    assert repr(name) in data["description"] or field.endswith(name), data
    text = json.dumps(data)
    assert ATTACK not in text  # ... never echoes its value
    assert AGENT_PASSWORD not in text and DB_PASSWORD not in text


def _with_parameter(agent_url: str, name: str) -> dict[str, Any]:
    params = parameters(agent_url)
    params["database"]["parameters"] = {"PGSSLMODE": "disable", name: ATTACK}
    return params


@pytest.mark.parametrize("name", REFUSED)
async def test_provision_refuses_a_dangerous_parameter(
    osb: Osb, broker: Service, agent_url: str, name: str
) -> None:
    iid = str(uuid.uuid4())
    status, data = await osb.provision(iid, provision_body(_with_parameter(agent_url, name)))
    _assert_refused(status, data, name)
    assert await broker.db.instances.count_documents({}) == 0


async def test_update_refuses_a_dangerous_parameter_and_changes_nothing(
    osb: Osb, broker: Service, agent_url: str
) -> None:
    iid = await osb.ready_instance(parameters(agent_url))
    before = await broker.db.instances.find_one({"_id": iid})
    for name in REFUSED:
        for accepts in (True, False):
            body = {
                "service_id": SERVICE_ID,
                "parameters": {"database": {"parameters": {name: ATTACK}}, "items": ["x"]},
            }
            status, data = await osb.update(iid, body, accepts=accepts)
            _assert_refused(status, data, name)
    assert await broker.db.instances.find_one({"_id": iid}) == before


async def test_database_client_parameters_keep_working(
    osb: Osb, broker: Service, agent_url: str
) -> None:
    params = parameters(agent_url)
    params["database"]["parameters"] = dict(ACCEPTED)
    iid = await osb.ready_instance(params)
    doc = await broker.db.instances.find_one({"_id": iid})
    assert doc["database"]["parameters"] == ACCEPTED
    status, data = await osb.update(
        iid,
        {"service_id": SERVICE_ID, "parameters": {"database": {"parameters": {"PGPORT": "1"}}}},
        accepts=False,
    )
    assert (status, data) == (200, {})
    doc = await broker.db.instances.find_one({"_id": iid})
    assert doc["database"]["parameters"] == {"PGPORT": "1"}


async def test_an_instance_stored_with_a_refused_name_can_still_be_updated(
    osb: Osb, broker: Service, agent_url: str
) -> None:
    """Stored before the names were refused: the name is dropped (it is never sent to an
    agent either), so the tenant is not locked out of updating the instance."""
    iid = await osb.ready_instance(parameters(agent_url))
    legacy = {"PGSSLMODE": "disable", "BASH_ENV": ATTACK, "BACKUP_PORT": "1"}
    await broker.db.instances.update_one({"_id": iid}, {"$set": {"database.parameters": legacy}})
    body = {"service_id": SERVICE_ID, "parameters": {"items": ["orders"]}}
    assert await osb.update(iid, body, accepts=False) == (200, {})
    doc = await broker.db.instances.find_one({"_id": iid})
    assert doc["items"] == ["orders"]
    assert doc["database"]["parameters"] == {"PGSSLMODE": "disable"}
