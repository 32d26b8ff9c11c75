"""Uploads, downloads and transforms through the agent, on real S3 / Swift when their
fixtures exist, and always on a directory-backed stand-in store inside the agent process."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from agent import transforms
from agent.jobs import RESTART_REASON
from tests.agent.fake_storage import pending_parts, stored_objects
from tests.agent.helpers import AgentProcess, backup_request, restore_request, write_script
from tests.agent.storage_support import destination_for, settings_for

KEY = "the-passphrase-42"
TRANSFORMS = {
    "plain": None,
    "zstd+enc": {"compression": "zstd", "encryption": True},
    "gzip": {"compression": "gzip", "encryption": False},
    "enc": {"compression": None, "encryption": True},
}


def make_source(path: Path, size: int = 3 * 1024 * 1024 + 123) -> bytes:
    text = b"".join(b"line %d of a compressible backup\n" % i for i in range(size // 30))
    data = (text[: size // 2] + os.urandom(size - size // 2))[:size]
    path.write_bytes(data)
    return data


def scripts(tmp: Path, source: Path, out: Path) -> Path:
    d = tmp / "scripts"
    d.mkdir()
    write_script(d, "backup", f'cp "{source}" "$BACKUP_DIRECTORY/$BACKUP_FILENAME.bin"')
    write_script(
        d,
        "restore",
        f'echo "$4 $5" > "{out}.args"; ls "$RESTORE_DIRECTORY" > "{out}.ls"; '
        f'cp "$RESTORE_FILE" "{out}"',
    )
    write_script(d, "pre-backup-lock", 'echo lock >> "$TRACE"')
    write_script(d, "post-backup-unlock", 'echo unlock >> "$TRACE"')
    write_script(d, "pre-restore-lock", 'echo rlock >> "$TRACE"')
    write_script(d, "post-restore-unlock", 'echo runlock >> "$TRACE"')
    return d


class Backend:
    def __init__(self, request: pytest.FixtureRequest, kind: str) -> None:
        self.kind = kind
        self.settings = None if kind == "fake" else settings_for(request, kind)

    def destination(self) -> dict[str, Any]:
        if self.kind == "fake":
            return {
                **backup_request("x")["destination"],
                "skipStorage": False,
                "filenamePrefix": f"p-{uuid.uuid4().hex[:6]}/",
            }
        return destination_for(self.settings, self.kind)

    def read(self, agent: AgentProcess, key: str) -> bytes | None:
        if self.kind == "fake":
            return stored_objects(agent.base / "store").get(key)

        async def go() -> bytes | None:
            from storage import ObjectNotFound, open_store

            async with open_store(self.settings) as store:
                try:
                    return b"".join([c async for c in store.download(key)])
                except ObjectNotFound:
                    return None

        return asyncio.run(go())


@pytest.fixture(params=["fake", "s3", "swift"])
def backend(request: pytest.FixtureRequest) -> Backend:
    return Backend(request, request.param)


def _bodies(job: str, dest: dict[str, Any], transform: dict | None, key: str = KEY):
    b = backup_request(job, destination=dest)
    r = restore_request(job, destination=dest)
    for body in (b, r):
        if transform:
            body["transform"] = transform
            body["compression"] = bool(transform["compression"])
            body["encryption_key"] = key if transform["encryption"] else "none"
    return b, r


@pytest.mark.parametrize("transform_name", list(TRANSFORMS))
def test_backup_restore_round_trip(
    make_agent, backend: Backend, tmp_path: Path, transform_name: str
) -> None:
    transform = TRANSFORMS[transform_name]
    source = tmp_path / "source.bin"
    data = make_source(source)
    out = tmp_path / "restored.bin"
    agent = make_agent(scripts=scripts(tmp_path, source, out), fake_storage=backend.kind == "fake")
    dest = backend.destination()
    b, r = _bodies("rt", dest, transform)
    assert agent.request("POST", "/backup", b)[0] == 201
    res = agent.wait_job("backup", "rt")
    assert res["status"] == "SUCCEEDED", res
    suffix = transforms.stored_suffix(
        transform and transform["compression"], bool(transform and transform["encryption"])
    )
    assert res["filename"].endswith(".bin" + suffix)
    assert res["filesize"] == {"size": len(data), "unit": "byte"}
    stored = backend.read(agent, dest["filenamePrefix"] + res["filename"])
    assert stored is not None
    assert res["stored_key"] == dest["filenamePrefix"] + res["filename"]
    assert res["checksum"] == "sha256:" + hashlib.sha256(stored).hexdigest()
    assert res["stored_size"] == len(stored)
    if transform and transform["encryption"]:
        assert stored.startswith(transforms.MAGIC) and b"compressible backup" not in stored
        assert res["encryption"] == "aes-256-gcm-stream-v1"
    if transform and transform["compression"]:
        assert len(stored) < len(data) * 0.8
    if not transform:
        assert stored == data
    assert not (agent.base / "backup" / "rt").exists()  # working directory removed

    r["destination"]["filename"] = res["filename"]
    assert agent.request("PUT", "/restore", r)[0] == 201
    res = agent.wait_job("restore", "rt")
    assert res["status"] == "SUCCEEDED", res
    assert out.read_bytes() == data
    local = res["filename"].removesuffix(suffix)
    assert Path(f"{out}.ls").read_text().split() == [local]
    assert Path(f"{out}.args").read_text().split() == ["mydb", local]
    assert not (agent.base / "restore" / "rt").exists()
    assert agent.trace_lines() == ["lock", "unlock", "rlock", "runlock"]
    logs = agent.logs()
    assert KEY not in logs and "s3cr3t-AUTH" not in logs


def test_wrong_key_and_missing_object(make_agent, backend: Backend, tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    make_source(source, 2 * 1024 * 1024)
    out = tmp_path / "restored.bin"
    agent = make_agent(scripts=scripts(tmp_path, source, out), fake_storage=backend.kind == "fake")
    dest = backend.destination()
    b, _ = _bodies("wk", dest, TRANSFORMS["zstd+enc"])
    agent.request("POST", "/backup", b)
    filename = agent.wait_job("backup", "wk")["filename"]
    _, r = _bodies("wk", dest, TRANSFORMS["zstd+enc"], key="not-the-key")
    r["destination"]["filename"] = filename
    agent.request("PUT", "/restore", r)
    res = agent.wait_job("restore", "wk")
    assert res["status"] == "FAILED"
    assert "wrong encryption key" in res["error_message"]
    assert "not-the-key" not in res["error_message"]
    assert not out.exists()  # the restore script never ran
    assert agent.trace_lines()[-1] == "runlock"
    _, r = _bodies("missing", dest, None)
    r["destination"]["filename"] = "does-not-exist.bin"
    agent.request("PUT", "/restore", r)
    res = agent.wait_job("restore", "missing")
    assert res["status"] == "FAILED" and "download of" in res["error_message"]


@pytest.mark.parametrize("allowed", [False, True])
def test_restore_target_exists(make_agent, tmp_path: Path, allowed: bool) -> None:
    source = tmp_path / "source.bin"
    data = make_source(source, 1000)
    out = tmp_path / "restored.bin"
    agent = make_agent(
        scripts=scripts(tmp_path, source, out),
        fake_storage=True,
        allowed_to_delete_files=str(allowed).lower(),
    )
    b, r = _bodies("ex", {**backup_request("x")["destination"], "skipStorage": False}, None)
    agent.request("POST", "/backup", b)
    r["destination"]["filename"] = agent.wait_job("backup", "ex")["filename"]
    target = agent.base / "restore" / "ex" / r["destination"]["filename"]
    target.parent.mkdir(parents=True)
    target.write_bytes(b"old content")
    agent.request("PUT", "/restore", r)
    res = agent.wait_job("restore", "ex")
    if allowed:
        assert res["status"] == "SUCCEEDED", res
        assert out.read_bytes() == data
    else:
        assert res["status"] == "FAILED" and "already exists" in res["error_message"]
        assert target.read_bytes() == b"old content"


def test_skip_storage_env_overrides_request(make_agent, tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    make_source(source, 1000)
    agent = make_agent(
        scripts=scripts(tmp_path, source, tmp_path / "o"), fake_storage=True, skip_storage="true"
    )
    b, _ = _bodies("sk", {**backup_request("x")["destination"], "skipStorage": False}, None)
    del b["destination"]["bucket"]  # not needed when the agent does not upload
    assert agent.request("POST", "/backup", b)[0] == 201
    res = agent.wait_job("backup", "sk")
    assert res["status"] == "SUCCEEDED" and res["checksum"] is None
    assert (agent.base / "backup" / "sk" / res["filename"]).exists()
    assert not (agent.base / "store").exists() or not stored_objects(agent.base / "store")


def test_sigkill_mid_upload_leaves_no_orphan(make_agent, tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    with open(source, "wb") as f:
        f.truncate(200 * 1024 * 1024)  # sparse: 50 chunks of 4 MiB
    agent = make_agent(
        scripts=scripts(tmp_path, source, tmp_path / "o"), fake_storage=True, FAKE_STORE_DELAY=0.2
    )
    dest = {**backup_request("x")["destination"], "skipStorage": False}
    b, _ = _bodies("orphan", dest, TRANSFORMS["zstd+enc"])
    agent.request("POST", "/backup", b)
    agent.wait_state("backup", "orphan", "upload")
    deadline = time.monotonic() + 20
    while not pending_parts(agent.base / "store"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    assert (agent.base / "state" / "backup-orphan.dest.json").exists()
    agent.kill()
    assert pending_parts(agent.base / "store")
    agent.start()
    res = agent.wait_job("backup", "orphan")
    assert res["status"] == "FAILED" and RESTART_REASON in res["error_message"]
    assert pending_parts(agent.base / "store") == []
    assert stored_objects(agent.base / "store") == {}
    assert not (agent.base / "state" / "backup-orphan.dest.json").exists()
    assert agent.trace_lines() == ["lock", "unlock"]
    assert "s3cr3t-AUTH" not in agent.logs()


@pytest.mark.parametrize("kind", ["s3", "swift"])
def test_sigkill_mid_upload_real_storage(
    request: pytest.FixtureRequest, make_agent, tmp_path: Path, kind: str
) -> None:
    backend = Backend(request, kind)
    source = tmp_path / "source.bin"
    with open(source, "wb") as f:
        for _ in range(300):
            f.write(os.urandom(1 << 20))
    agent = make_agent(scripts=scripts(tmp_path, source, tmp_path / "o"))
    dest = backend.destination()
    b, _ = _bodies("orphan", dest, None)
    agent.request("POST", "/backup", b)
    agent.wait_state("backup", "orphan", "upload")
    time.sleep(0.3)
    _, body = agent.request("GET", "/backup/orphan")
    if body["status"] != "RUNNING":
        pytest.skip("the upload finished before the agent could be killed")
    agent.kill()
    agent.start()
    res = agent.wait_job("backup", "orphan")
    assert res["status"] == "FAILED" and RESTART_REASON in res["error_message"]
    assert body["filename"].endswith(".bin")
    assert backend.read(agent, dest["filenamePrefix"] + body["filename"]) is None
    if kind == "s3":
        import boto3

        s = backend.settings
        s3 = boto3.client(
            "s3",
            endpoint_url=s.endpoint,
            region_name=s.region,
            aws_access_key_id=s.access_key_id,
            aws_secret_access_key=s.secret_access_key.get_secret_value(),
        )
        uploads = s3.list_multipart_uploads(Bucket=s.bucket, Prefix=dest["filenamePrefix"])
        assert uploads.get("Uploads", []) == []
    listed = asyncio.run(_list(backend.settings, dest["filenamePrefix"]))
    assert listed == []


async def _list(settings: Any, prefix: str) -> list[str]:
    from storage import open_store

    async with open_store(settings) as store:
        return [o.key async for o in store.list(prefix)]


def test_failure_after_upload_deletes_the_object(make_agent, tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    make_source(source, 5000)
    d = scripts(tmp_path, source, tmp_path / "o")
    write_script(d, "backup-cleanup", "exit 7")
    agent = make_agent(scripts=d, fake_storage=True)
    dest = {**backup_request("x")["destination"], "skipStorage": False}
    b, _ = _bodies("late", dest, TRANSFORMS["zstd+enc"])
    agent.request("POST", "/backup", b)
    res = agent.wait_job("backup", "late")
    assert (
        res["status"] == "FAILED" and "backup-cleanup exited with status 7" in res["error_message"]
    )
    assert res["stored_key"] is None
    assert stored_objects(agent.base / "store") == {}
    assert agent.trace_lines() == ["lock", "unlock"]
    assert not list((agent.base / "state").glob("*.dest.json"))
