"""Recovery without the manager's database, end to end through public interfaces only: a
PostgreSQL database is backed up (our agent, the machine's PostgreSQL, SeaweedFS), the
manager's database is dropped, a new manager with the same master key starts on an empty one,
the platform registers the instance again, an operator imports the destination with the
command-line tool, and a restore from the imported point brings back identical rows."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from backup.database import connect
from backup.secrets import generate_master_key_spec
from storage import S3Settings
from tests.agent.helpers import ROOT, AgentProcess
from tests.cli.conftest import SCRIPT
from tests.e2e.test_full_stack import ENCRYPTION_KEY, Client, Postgres, _destination, _require
from tests.servers.broker import BROKER_PASSWORD, BROKER_USER, start_service, stop_service
from tests.servers.log_audit import audit_secret


async def _operator(client: Client, body: dict[str, Any], **auth: Any) -> tuple[int, Any]:
    """``POST /v1/imports`` as the platform's operator (the broker's credentials), or with the
    ``headers`` given."""
    headers = auth.get("headers") or {
        "Authorization": aiohttp.encode_basic_auth(BROKER_USER, BROKER_PASSWORD)
    }
    async with client.service.http.post(
        client.service.url + "/v1/imports", json=body, headers=headers
    ) as r:
        return r.status, await r.json(content_type=None)


async def _cli(url: str, home: Path, *args: str) -> tuple[int, str, str]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "CF_HOME": str(home),
        "OSB_BACKUP_URL": url,
        "OSB_BACKUP_OPERATOR": BROKER_USER,
        "OSB_BACKUP_OPERATOR_PASSWORD": BROKER_PASSWORD,
        "COLUMNS": "200",
    }
    proc = await asyncio.create_subprocess_exec(
        SCRIPT,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=300)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_wipe_the_managers_database_import_and_restore(
    mongo_url: str,
    tmp_path: Path,
    s3_settings: S3Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = Postgres()
    _require(engine.port, engine.scripts)
    monkeypatch.setenv("RUNNER_AGENT_POLL_MIN_SECONDS", "0.2")
    monkeypatch.setenv("RUNNER_AGENT_POLL_MAX_SECONDS", "0.5")
    audit_secret(ENCRYPTION_KEY, "the import test")
    master_keys = generate_master_key_spec("k1")
    instance_id = str(uuid.uuid4())
    agent = AgentProcess(
        tmp_path / "agent", ROOT / "agent" / "examples" / "postgresql", secrets_via="fd"
    ).start()
    engine.create()
    try:
        # 1. A manager backs the database up, compressed and encrypted.
        (tmp_path / "first").mkdir()
        first = await start_service(
            mongo_url, tmp_path / "first", loops=True, SECRETS_MASTER_KEYS=master_keys
        )
        try:
            client = Client(first, instance_id)
            await client.register_and_bind(engine, agent)
            status, dest = await client.api(
                "POST", "/destinations?validate=true", json=_destination(s3_settings)
            )
            assert status == 201, dest
            status, plan = await client.api(
                "POST",
                "/plans",
                json={
                    "name": "nightly",
                    "destination_id": dest["id"],
                    "frequency": "0 3 * * *",
                    "retention": {"style": "DAYS", "period": 30},
                    "compression": True,
                    "encryption": {"enabled": True, "key": ENCRYPTION_KEY},
                },
            )
            assert status == 201, plan
            before = engine.rows()
            status, job = await client.api("POST", "/backups", json={"plan_id": plan["id"]})
            assert status == 202, job
            job = await client.job_done(job["id"])
            assert job["status"] == "SUCCEEDED", (job["reason"], job["items"])
            status, point = await client.api("GET", f"/restore_points/{job['id']}")
            assert status == 200, point
        finally:
            await stop_service(first)

        # 2. The manager's database is lost.
        lost = connect(mongo_url, first.settings.mongodb_database)
        await lost.client.drop_database(first.settings.mongodb_database)
        assert first.settings.mongodb_database not in await lost.client.list_database_names()
        await lost.close()

        # 3. A new manager on an empty database, with the same master key; the platform
        #    registers the instance again and the application binds again.
        (tmp_path / "second").mkdir()
        second = await start_service(
            mongo_url, tmp_path / "second", loops=True, SECRETS_MASTER_KEYS=master_keys
        )
        try:
            client = Client(second, instance_id)
            await client.register_and_bind(engine, agent)
            status, points = await client.api("GET", "/restore_points")
            assert status == 200 and points["total"] == 0

            body = {"destination": _destination(s3_settings)}
            # a tenant may not import, whatever it sends
            status, refused = await _operator(
                client, body, headers={"Authorization": f"Bearer {client.key}"}
            )
            assert status == 403, refused

            # 4. The operator imports the destination with the command-line tool.
            destination_file = tmp_path / "destination.json"
            destination_file.write_text(json.dumps(_destination(s3_settings)))
            destination_file.chmod(0o600)
            home = tmp_path / "home"
            home.mkdir()
            code, out, err = await _cli(
                second.url, home, "--json", "import", "--destination-file", str(destination_file)
            )
            assert code == 0, (out, err)
            answer = json.loads(out)
            assert answer["found"] == 1 and answer["imported"] == 1, answer
            (imported,) = answer["points"]
            assert imported["id"] == point["id"] and imported["status"] == "imported"
            assert imported["instance_id"] == instance_id and not imported["orphaned"]
            assert imported["plan_name"] == "nightly"

            # importing again creates nothing new
            status, again = await _operator(client, body)
            assert status == 200, again
            assert again["imported"] == 0 and again["existing"] == 1
            code, out, err = await _cli(
                second.url, home, "import", "--destination-file", str(destination_file)
            )
            assert code == 0 and "1 already there" in err, (out, err)
            assert f"{point['id']}  existing  {instance_id}  nightly" in out, out

            status, points = await client.api("GET", "/restore_points")
            assert status == 200 and points["total"] == 1, points
            (got,) = points["items"]
            assert got["id"] == point["id"] and got["imported"] is True
            assert got["encryption_key_set"] is True and got["items"] == point["items"]
            assert got["created_at"] == point["created_at"]
            assert got["expires_at"] == point["expires_at"]

            # 5. The data is lost too; a restore from the imported point brings it back.
            engine.lose_data()
            status, restore = await client.api(
                "POST", "/restores", json={"restore_point_id": point["id"]}
            )
            assert status == 202, restore
            restore = await client.job_done(restore["id"])
            assert restore["status"] == "SUCCEEDED", (restore["reason"], restore["items"])
            assert engine.rows() == before
        finally:
            await stop_service(second)
    finally:
        agent.stop()
        engine.cleanup()


async def test_import_refuses_what_a_destination_would_refuse(
    mongo_url: str, tmp_path: Path, s3_settings: S3Settings
) -> None:
    """Bad bodies are 400 with the field, a denied host 422 (egress policy), a wrong secret
    422 saying so, an unknown target instance 404; none changes anything."""
    service = await start_service(mongo_url, tmp_path)
    try:
        client = Client(service, str(uuid.uuid4()))
        good = _destination(s3_settings)
        cases: list[tuple[dict[str, Any], int, str]] = [
            ({}, 400, "invalid_input"),
            ({"destination": {**good, "bucket": ""}}, 400, "invalid_input"),
            ({"destination": good, "instances": "x"}, 400, "invalid_input"),
            ({"destination": good, "surprise": 1}, 400, "invalid_input"),
            ({"destination": {**good, "endpoint": "http://127.0.0.2:9"}}, 422, "egress_denied"),
            (
                {"destination": {**good, "secret_access_key": "wrong-secret-0000"}},
                422,
                "storage_auth_failed",
            ),
            (
                {"destination": good, "instances": {"a": "not-registered"}},
                404,
                "instance_not_found",
            ),
        ]
        for body, want, code in cases:
            status, answer = await _operator(client, body)
            assert (status, answer.get("error")) == (want, code), (body, answer)
            assert "Traceback" not in json.dumps(answer)
        assert await service.db.restore_points.count_documents({}) == 0
        assert await service.db.destinations.count_documents({}) == 0
        # an empty destination imports nothing, and says so
        status, answer = await _operator(client, {"destination": good})
        assert status == 200 and answer["found"] == 0 and answer["points"] == [], answer
    finally:
        await stop_service(service)
