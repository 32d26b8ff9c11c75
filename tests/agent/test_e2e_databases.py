"""Real PostgreSQL, MariaDB and Redis backed up and restored through the agent's example
scripts, into real object storage when the storage fixtures exist."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import socket
import subprocess
import uuid
from typing import Any

import pytest

from agent import transforms
from tests.agent.fake_storage import stored_objects
from tests.agent.helpers import ROOT, AgentProcess
from tests.agent.storage_support import destination_for, settings_for
from tests.conftest import skip_unless_available

EXAMPLES = ROOT / "agent" / "examples"
KEY = "e2e-encryption-passphrase"


def _require(port: int, name: str) -> None:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        skip_unless_available(f"{name} is not running on 127.0.0.1:{port}")


def _sh(*cmd: str, input: bytes | None = None) -> bytes:
    return subprocess.run(cmd, check=True, capture_output=True, input=input, timeout=120).stdout


class Postgres:
    name = "postgresql"
    port = 5432
    user = "postgres"

    def __init__(self) -> None:
        self.db = f"agent_e2e_{uuid.uuid4().hex[:10]}"

    def psql(self, sql: str, db: str | None = None) -> bytes:
        return _sh(
            "psql",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            db or self.db,
            "-qAtX",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        )

    def create(self) -> None:
        self.psql(f"create database {self.db}", db="postgres")
        self.psql(
            "create table t (id int primary key, name text, data bytea, doc jsonb);"
            "insert into t select i, 'row number ' || i || repeat(' filler', 20),"
            " decode(md5(i::text), 'hex'), jsonb_build_object('i', i, 'sq', i*i)"
            " from generate_series(1, 20000) i;"
            "create table empty_one (x int);"
        )

    def snapshot(self) -> bytes:
        return self.psql("copy (select * from t order by id) to stdout") + self.psql(
            "select count(*) from empty_one"
        )

    def drop_data(self) -> None:
        self.psql("drop table t; drop table empty_one")

    def cleanup(self) -> None:
        self.psql(f"drop database if exists {self.db} with (force)", db="postgres")


class MariaDB:
    name = "mariadb"
    port = 3306
    user = "root"

    def __init__(self) -> None:
        self.db = f"agent_e2e_{uuid.uuid4().hex[:10]}"

    def sql(self, sql: str, db: str | None = None) -> bytes:
        args = ["mariadb", "-h", "127.0.0.1", "-u", "root", "-N", "-B", "-e", sql]
        if db != "":
            args.append(db or self.db)
        return _sh(*args)

    def create(self) -> None:
        self.sql(f"create database {self.db}", db="")
        self.sql(
            "create table t (id int primary key, name text, data varbinary(64), d datetime);"
            "insert into t select seq, concat('row number ', seq, repeat(' filler', 20)),"
            " unhex(md5(seq)), '2026-01-02 03:04:05' from seq_1_to_20000;"
        )

    def snapshot(self) -> bytes:
        return self.sql("select id, name, hex(data), d from t order by id")

    def drop_data(self) -> None:
        self.sql("drop table t")

    def cleanup(self) -> None:
        self.sql(f"drop database if exists {self.db}", db="")


def _redis_module() -> Any:
    spec = importlib.util.spec_from_file_location(
        "redis_dump", EXAMPLES / "redis" / "redis_dump.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Redis:
    name = "redis"
    port = 6379
    user = ""

    def __init__(self) -> None:
        self.prefix = f"agent_e2e_{uuid.uuid4().hex[:10]}:"
        self.db = "0"
        self.resp = _redis_module()

    def client(self) -> Any:
        return self.resp.Resp("127.0.0.1", 6379)

    def keys(self) -> list[bytes]:
        r = self.client()
        cursor, found = b"0", []
        while True:
            cursor, batch = r.call("SCAN", cursor, "MATCH", self.prefix + "*", "COUNT", 1000)
            found += batch
            if cursor == b"0":
                return sorted(found)

    def create(self) -> None:
        r = self.client()
        p = self.prefix
        for i in range(2000):
            r.call("SET", f"{p}s{i}", f"value {i} " + "filler " * 20)
        r.call("HSET", f"{p}h", "a", "1", "b", b"\x00\xffbin")
        r.call("RPUSH", f"{p}l", "x", "y", "z")
        r.call("SADD", f"{p}set", "m1", "m2")
        r.call("ZADD", f"{p}z", "1.5", "one", "2", "two")
        r.call("XADD", f"{p}stream", "1-1", "field", "v")
        r.call("SET", f"{p}ttl", "soon", "EX", "3600")

    def snapshot(self) -> bytes:
        r = self.client()
        out = []
        for k in self.keys():
            kind = r.call("TYPE", k)
            if kind == b"string":
                value: Any = r.call("GET", k)
            elif kind == b"hash":
                value = sorted(r.call("HGETALL", k))
            elif kind == b"list":
                value = r.call("LRANGE", k, 0, -1)
            elif kind == b"set":
                value = sorted(r.call("SMEMBERS", k))
            elif kind == b"zset":
                value = r.call("ZRANGE", k, 0, -1, "WITHSCORES")
            else:
                value = r.call("XRANGE", k, "-", "+")
            out.append(repr((k, kind, value, r.call("PTTL", k) > 0)).encode())
        return b"\n".join(out)

    def drop_data(self) -> None:
        r = self.client()
        for k in self.keys():
            r.call("DEL", k)

    def cleanup(self) -> None:
        self.drop_data()


ENGINES = {"postgresql": Postgres, "mariadb": MariaDB, "redis": Redis}


def _job_body(job_id: str, engine: Any, dest: dict[str, Any], transform: bool, kind: str) -> dict:
    params = [{"REDIS_KEY_PATTERN": engine.prefix + "*"}] if engine.name == "redis" else []
    body: dict[str, Any] = {
        "id": job_id,
        "compression": transform,
        "encryption_key": KEY if transform else "none",
        "destination": dict(dest),
        kind: {
            "host": "127.0.0.1",
            "username": engine.user,
            "password": "",
            "database": engine.db,
            "parameters": params,
        },
    }
    if transform:
        body["transform"] = {"compression": "zstd", "encryption": True}
    return body


async def _read_object(settings: Any, key: str) -> bytes:
    from storage import open_store

    async with open_store(settings) as store:
        return b"".join([c async for c in store.download(key)])


@pytest.mark.parametrize(
    ("storage", "transform"),
    [("local", False), ("fake", True), ("s3", False), ("s3", True), ("swift", True)],
)
@pytest.mark.parametrize("engine_name", ["postgresql", "mariadb", "redis"])
def test_backup_drop_restore(
    request: pytest.FixtureRequest, make_agent, engine_name: str, storage: str, transform: bool
) -> None:
    engine = ENGINES[engine_name]()
    _require(engine.port, engine_name)
    settings = None if storage in ("local", "fake") else settings_for(request, storage)
    if storage == "fake":
        dest = {**destination_for(None, "s3-dummy"), "skipStorage": False}
    else:
        dest = destination_for(settings, storage)
    agent: AgentProcess = make_agent(scripts=EXAMPLES / engine_name, fake_storage=storage == "fake")
    engine.create()
    try:
        before = engine.snapshot()
        assert before
        body = _job_body("b-" + uuid.uuid4().hex[:8], engine, dest, transform, "backup")
        assert agent.request("POST", "/backup", body)[0] == 201
        result = agent.wait_job("backup", body["id"], timeout=300)
        assert result["status"] == "SUCCEEDED", result
        assert result["filesize"]["size"] > 0

        if storage == "local":
            produced = agent.base / "backup" / body["id"] / result["filename"]
            assert produced.exists()
        else:
            assert result["checksum"].startswith("sha256:")
            key = dest["filenamePrefix"] + result["filename"]
            if storage == "fake":
                stored = stored_objects(agent.base / "store")[key]
            else:
                stored = asyncio.run(_read_object(settings, key))
            assert len(stored) == result["stored_size"]
            if transform:
                assert result["filename"].endswith(".zst.enc")
                assert stored.startswith(transforms.MAGIC)
                assert b"filler" not in stored  # not readable without the key
                assert result["stored_size"] < result["filesize"]["size"]
            assert not (agent.base / "backup" / body["id"]).exists()

        engine.drop_data()
        try:
            gone = engine.snapshot()
        except subprocess.CalledProcessError:
            gone = b""
        assert gone != before

        rbody = _job_body("r-" + uuid.uuid4().hex[:8], engine, dest, transform, "restore")
        rbody["destination"]["filename"] = result["filename"]
        if storage == "local":
            target = agent.base / "restore" / rbody["id"]
            target.mkdir(parents=True)
            shutil.copy(produced, target / result["filename"])
        assert agent.request("PUT", "/restore", rbody)[0] == 201
        restored = agent.wait_job("restore", rbody["id"], timeout=300)
        assert restored["status"] == "SUCCEEDED", restored
        assert engine.snapshot() == before
    finally:
        engine.cleanup()
    logs = agent.logs()
    assert KEY not in logs
    if settings is not None and storage == "s3":
        assert settings.secret_access_key.get_secret_value() not in logs
    assert os.environ.get("CI") or True
