"""The example script sets end to end: this machine's real PostgreSQL, MariaDB and Redis
backed up through the agent into the suite's real SeaweedFS and Swift, the data dropped,
restored, and compared row by row and key by key."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import uuid
from typing import Any

import pytest

from agent import transforms
from tests.agent.helpers import ROOT, AgentProcess
from tests.agent.storage_support import destination_for, read_object, secrets_of
from tests.conftest import skip_unless_available

EXAMPLES = ROOT / "agent" / "examples"
KEY = "e2e-encryption-passphrase"


def _require(port: int, name: str) -> None:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        skip_unless_available(f"{name} is not running on 127.0.0.1:{port}")


def _sh(*cmd: str) -> bytes:
    return subprocess.run(cmd, check=True, capture_output=True, timeout=300).stdout


class Postgres:
    name, port, user = "postgresql", 5432, "postgres"
    magic = b"PGDMP"  # pg_dump's custom format

    def __init__(self) -> None:
        self.db = f"agent_e2e_{uuid.uuid4().hex[:10]}"

    def psql(self, sql: str, db: str | None = None) -> bytes:
        return _sh(
            "psql", "-h", "127.0.0.1", "-U", "postgres", "-d", db or self.db,
            "-qAtX", "-v", "ON_ERROR_STOP=1", "-c", sql,
        )  # fmt: skip

    def create(self) -> None:
        self.psql(f"create database {self.db}", db="postgres")
        self.psql(
            "create table t (id int primary key, name text, data bytea, doc jsonb, at timestamptz);"
            "insert into t select i, 'row number ' || i || repeat(' filler', 20),"
            " decode(md5(i::text), 'hex'), jsonb_build_object('i', i, 'sq', i*i),"
            " '2026-01-02 03:04:05+00'::timestamptz + i * interval '1 minute'"
            " from generate_series(1, 20000) i;"
            "insert into t values (0, null, '\\x00ff'::bytea, '{}', null);"
            "create table empty_one (x int);"
            "create view v as select id from t where id < 10;"
        )

    def snapshot(self) -> bytes:
        return (
            self.psql("copy (select * from t order by id) to stdout")
            + self.psql("select count(*) from empty_one")
            + self.psql("select string_agg(id::text, ',') from v")
        )

    def drop_data(self) -> None:
        self.psql("drop view v; drop table t; drop table empty_one")

    def cleanup(self) -> None:
        self.psql(f"drop database if exists {self.db} with (force)", db="postgres")


class MariaDB:
    name, port, user = "mariadb", 3306, "root"
    magic = b"-- MariaDB dump"

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
            "create table t (id int primary key, name text, data varbinary(64), d datetime,"
            " price decimal(10,2));"
            "insert into t select seq, concat('row number ', seq, repeat(' filler', 20)),"
            " unhex(md5(seq)), '2026-01-02 03:04:05' + interval seq minute, seq / 7"
            " from seq_1_to_20000;"
            "insert into t values (0, null, 0x00ff, null, null);"
            "create view v as select id from t where id < 10;"
        )

    def snapshot(self) -> bytes:
        return self.sql("select id, name, hex(data), d, price from t order by id") + self.sql(
            "select group_concat(id order by id) from v"
        )

    def drop_data(self) -> None:
        self.sql("drop view v; drop table t")

    def cleanup(self) -> None:
        self.sql(f"drop database if exists {self.db}", db="")


def _resp_module() -> Any:
    spec = importlib.util.spec_from_file_location(
        "redis_copy", EXAMPLES / "redis" / "redis_copy.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Redis:
    name, port, user = "redis", 6379, ""
    magic = b"REDIS"  # the RDB file header

    def __init__(self) -> None:
        self.prefix = f"agent_e2e_{uuid.uuid4().hex[:10]}:"
        self.db = "0"
        self.resp = _resp_module()

    def call(self, *args: Any) -> Any:
        r = self.resp.Resp.tcp("127.0.0.1", 6379)
        try:
            return self.resp.ok(r.call(*args))
        finally:
            r.sock.close()

    def keys(self) -> list[bytes]:
        r = self.resp.Resp.tcp("127.0.0.1", 6379)
        try:
            return sorted(k for batch in self.resp.scan(r, self.prefix + "*") for k in batch)
        finally:
            r.sock.close()

    def create(self) -> None:
        p = self.prefix
        r = self.resp.Resp.tcp("127.0.0.1", 6379)
        try:
            cmds = [("SET", f"{p}s{i}", f"value {i} " + "filler " * 20) for i in range(3000)]
            cmds += [
                ("HSET", f"{p}h", "a", "1", "b", b"\x00\xffbin"),
                ("RPUSH", f"{p}l", "x", "y", "z"),
                ("SADD", f"{p}set", "m1", "m2"),
                ("ZADD", f"{p}z", "1.5", "one", "2", "two"),
                ("XADD", f"{p}stream", "1-1", "field", "v"),
                ("SET", f"{p}ttl", "soon", "EX", "3600"),
                ("SET", f"{p}bin\x00key", b"\x00\x01\x02"),
            ]
            for reply in r.pipeline(cmds):
                self.resp.ok(reply)
        finally:
            r.sock.close()

    def snapshot(self) -> bytes:
        out = []
        for k in self.keys():
            kind = self.call("TYPE", k)
            if kind == b"string":
                value: Any = self.call("GET", k)
            elif kind == b"hash":
                value = sorted(self.call("HGETALL", k))
            elif kind == b"list":
                value = self.call("LRANGE", k, 0, -1)
            elif kind == b"set":
                value = sorted(self.call("SMEMBERS", k))
            elif kind == b"zset":
                value = self.call("ZRANGE", k, 0, -1, "WITHSCORES")
            else:
                value = self.call("XRANGE", k, "-", "+")
            ttl = self.call("PTTL", k)
            out.append(repr((k, kind, value, 3_500_000 < ttl <= 3_600_000 or ttl == -1)))
        return "\n".join(out).encode()

    def drop_data(self) -> None:
        keys = self.keys()
        if keys:
            self.call("DEL", *keys)

    def cleanup(self) -> None:
        self.drop_data()


ENGINES = {"postgresql": Postgres, "mariadb": MariaDB, "redis": Redis}


def _body(job_id: str, engine: Any, dest: dict, transform: bool, kind: str) -> dict:
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


def _decode(stored: bytes, key: str) -> bytes:
    chain = transforms.decoder("zstd", key)
    return chain.update(stored) + chain.finalize()


@pytest.mark.parametrize(
    ("backend", "transform", "secrets_via"),
    [
        ("s3", False, "env"),
        ("s3", True, "env"),
        ("swift", True, "fd"),
        ("swift", False, "fd"),
    ],
)
@pytest.mark.parametrize("engine_name", ["postgresql", "mariadb", "redis"])
def test_backup_drop_restore(
    request: pytest.FixtureRequest,
    make_agent,
    engine_name: str,
    backend: str,
    transform: bool,
    secrets_via: str,
) -> None:
    engine = ENGINES[engine_name]()
    _require(engine.port, engine_name)
    settings = request.getfixturevalue(f"{backend}_settings")
    dest = destination_for(settings)
    agent: AgentProcess = make_agent(scripts=EXAMPLES / engine_name, secrets_via=secrets_via)
    engine.create()
    try:
        before = engine.snapshot()
        assert len(before) > 100_000

        body = _body("b-" + uuid.uuid4().hex[:8], engine, dest, transform, "backup")
        assert agent.request("POST", "/backup", body)[0] == 201
        result = agent.wait_job("backup", body["id"], timeout=300)
        assert result["status"] == "SUCCEEDED", result
        dump_size = result["filesize"]["size"]
        assert dump_size > 0
        key = dest["filenamePrefix"] + result["filename"]
        assert result["stored_key"] == key
        stored = read_object(settings, key)
        assert stored is not None and len(stored) == result["stored_size"]
        if transform:
            assert result["filename"].endswith(".zst.enc")
            assert result["transform"] == {
                "compression": "zstd",
                "encryption": "aes-256-gcm-stream-v1",
            }
            # Not readable without the key: our format's header, then ciphertext only ...
            assert stored.startswith(transforms.MAGIC)
            assert engine.magic not in stored and b"filler" not in stored
            with pytest.raises(transforms.TransformError, match="wrong encryption key"):
                _decode(stored, "not-the-key")
            # ... smaller than the dump, and exactly the dump with the key.
            assert result["stored_size"] < dump_size
            plain = _decode(stored, KEY)
            assert len(plain) == dump_size and engine.magic in plain[:1024]
        else:
            assert result["stored_size"] == dump_size and engine.magic in stored[:1024]
        assert not (agent.base / "backup" / body["id"]).exists()

        engine.drop_data()
        try:
            gone = engine.snapshot()
        except subprocess.CalledProcessError:
            gone = b""
        assert gone != before

        rbody = _body("r-" + uuid.uuid4().hex[:8], engine, dest, transform, "restore")
        rbody["destination"]["filename"] = result["filename"]
        rbody["checksum"] = result["checksum"]
        assert agent.request("PUT", "/restore", rbody)[0] == 201
        restored = agent.wait_job("restore", rbody["id"], timeout=300)
        assert restored["status"] == "SUCCEEDED", restored
        assert engine.snapshot() == before
        assert not (agent.base / "restore" / rbody["id"]).exists()
    finally:
        engine.cleanup()
    logs = agent.logs()
    for secret in [KEY, *secrets_of(settings)]:
        assert secret not in logs
