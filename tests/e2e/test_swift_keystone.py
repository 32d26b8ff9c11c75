"""End to end against the real Keystone and Swift: an application binds, stores a destination
authenticated by a Keystone application credential, backs a PostgreSQL database up through our
agent, and once the credential is revoked the next backup fails with a reason that says so and
leaves nothing in the container or its segments."""

from __future__ import annotations

import uuid
from pathlib import Path

from storage import SwiftSettings, open_store
from tests.agent.helpers import ROOT, AgentProcess
from tests.e2e.test_full_stack import (
    DB_PASSWORD,
    Client,
    Postgres,
    _require,
)
from tests.servers.broker import Service
from tests.servers.keystone import REGION, ApplicationCredential
from tests.servers.log_audit import audit_secret
from tests.servers.swift import KeystoneSwiftCluster


async def test_a_revoked_application_credential_fails_the_next_backup_clearly(
    service: Service,
    tmp_path: Path,
    keystone_swift: KeystoneSwiftCluster,
    application_credential: ApplicationCredential,
) -> None:
    engine = Postgres()
    _require(engine.port, engine.scripts)
    audit_secret(DB_PASSWORD, "the Keystone end-to-end test")
    container = keystone_swift.make_container()
    agent = AgentProcess(
        tmp_path / "agent", ROOT / "agent" / "examples" / engine.scripts, secrets_via="fd"
    ).start()
    engine.create()
    try:
        client = Client(service, str(uuid.uuid4()))
        await client.register_and_bind(engine, agent)

        status, dest = await client.api(
            "POST",
            "/destinations?validate=true",
            json={
                "type": "SWIFT",
                "name": "keystone",
                "auth_url": keystone_swift.keystone.url,
                "application_credential_id": application_credential.id,
                "application_credential_secret": application_credential.secret,
                "region_name": REGION,
                "container": container,
            },
        )
        assert status == 201, dest
        assert application_credential.secret not in str(dest)
        status, plan = await client.api(
            "POST",
            "/plans",
            json={
                "name": "nightly",
                "destination_id": dest["id"],
                "frequency": "0 3 * * *",
                "timezone": "UTC",
                "retention": {"style": "FILES", "period": 3},
            },
        )
        assert status == 201, plan

        status, job = await client.api("POST", "/backups", json={"plan_id": plan["id"]})
        assert status == 202, job
        job = await client.job_done(job["id"])
        assert job["status"] == "SUCCEEDED", (job["reason"], job["items"])
        stored = keystone_swift.names(container)
        # the backup's file, and its restore point's manifest (written last, by the manager)
        assert len(stored) == 2 and sum(k.endswith(".osb-manifest.json") for k in stored) == 1

        keystone_swift.keystone.revoke(application_credential)
        status, job = await client.api("POST", "/backups", json={"plan_id": plan["id"]})
        assert status == 202, job
        job = await client.job_done(job["id"])
        assert job["status"] == "FAILED", job
        said = str(job["reason"]) + str(job["items"])
        assert "storage_auth_failed" in said and "application credential" in said, said
        assert application_credential.secret not in said
        assert keystone_swift.names(container) == stored  # nothing new
        assert keystone_swift.names(container + "_segments") == []
        # Whoever holds a working credential can still read the first backup.
        owner: SwiftSettings = keystone_swift.settings(container)
        async with open_store(owner) as objects:
            assert [o.key async for o in objects.list()] == stored
    finally:
        agent.stop()
        engine.cleanup()
