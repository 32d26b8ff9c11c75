"""Uploads, downloads and streaming transforms through the agent, on the suite's real
SeaweedFS (S3) and Swift servers."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from agent import transforms
from tests.agent.helpers import AgentProcess, backup_request, restore_request, write_script
from tests.agent.storage_support import destination_for, list_keys, read_object, secrets_of

KEY = "the-passphrase-42"
TRANSFORMS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "zstd+enc": {"compression": "zstd", "encryption": True},
    "gzip": {"compression": "gzip", "encryption": False},
    "enc": {"compression": None, "encryption": True},
}
PART = 5 * 1024 * 1024


def make_source(path: Path, size: int) -> bytes:
    """Half text-like (compressible), half random."""
    text = b"".join(b"line %d of a compressible backup\n" % i for i in range(size // 30 + 1))
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
        f'echo "$4 $5" > "{out}.args"; ls -A "$RESTORE_DIRECTORY" > "{out}.ls"; '
        f'cp "$RESTORE_FILE" "{out}"',
    )
    write_script(d, "pre-backup-lock", 'echo lock >> "$TRACE"')
    write_script(d, "post-backup-unlock", 'echo unlock >> "$TRACE"')
    write_script(d, "pre-restore-lock", 'echo rlock >> "$TRACE"')
    write_script(d, "post-restore-unlock", 'echo runlock >> "$TRACE"')
    return d


def bodies(
    job: str, dest: dict[str, Any], transform: dict[str, Any] | None, key: str = KEY
) -> tuple[dict[str, Any], dict[str, Any]]:
    b = backup_request(job, destination=dest)
    r = restore_request(job, destination=dest)
    for body in (b, r):
        if transform:
            body["transform"] = transform
            body["compression"] = bool(transform["compression"])
            body["encryption_key"] = key if transform["encryption"] else "none"
    return b, r


@pytest.mark.parametrize(
    ("backend", "transform_name"),
    [
        ("s3", "plain"),
        ("s3", "zstd+enc"),
        ("s3", "gzip"),
        ("s3", "enc"),
        ("swift", "plain"),
        ("swift", "zstd+enc"),
    ],
)
def test_backup_restore_round_trip(
    request: pytest.FixtureRequest, make_agent, tmp_path: Path, backend: str, transform_name: str
) -> None:
    """Larger than one part, so S3 multipart uploads and Swift segments are exercised."""
    settings = request.getfixturevalue(f"{backend}_settings")
    transform = TRANSFORMS[transform_name]
    source = tmp_path / "source.bin"
    data = make_source(source, 3 * PART + 123)
    out = tmp_path / "restored.bin"
    agent = make_agent(scripts=scripts(tmp_path, source, out), s3_part_size=PART)
    dest = destination_for(settings)
    b, r = bodies("rt", dest, transform)
    assert agent.request("POST", "/backup", b)[0] == 201
    res = agent.wait_job("backup", "rt", timeout=120)
    assert res["status"] == "SUCCEEDED", res
    compression = transform["compression"] if transform else None
    encrypted = bool(transform and transform["encryption"])
    suffix = transforms.stored_suffix(compression, encrypted)
    assert res["filename"].endswith(".bin" + suffix)
    assert res["filesize"] == {"size": len(data), "unit": "byte"}
    assert res["transform"] == {
        "compression": compression,
        "encryption": "aes-256-gcm-stream-v1" if encrypted else None,
    }
    key = dest["filenamePrefix"] + res["filename"]
    stored = read_object(settings, key)
    assert stored is not None
    assert res["stored_key"] == key
    assert res["checksum"] == "sha256:" + hashlib.sha256(stored).hexdigest()
    assert res["stored_size"] == len(stored)
    if encrypted:
        assert stored.startswith(transforms.MAGIC) and b"compressible backup" not in stored
    if compression:
        assert len(stored) < len(data) * 0.8
    if not transform:
        assert stored == data
    assert list_keys(settings, dest["filenamePrefix"]) == [key]  # no segment, no leftover
    assert not (agent.base / "backup" / "rt").exists()

    r["destination"]["filename"] = res["filename"]
    r["checksum"] = res["checksum"]
    assert agent.request("PUT", "/restore", r)[0] == 201
    res = agent.wait_job("restore", "rt", timeout=120)
    assert res["status"] == "SUCCEEDED", res
    assert out.read_bytes() == data
    local = res["filename"].removesuffix(suffix)
    assert Path(f"{out}.ls").read_text().split() == [local]  # no partial file beside it
    assert Path(f"{out}.args").read_text().split() == ["mydb", local]
    assert not (agent.base / "restore" / "rt").exists()
    assert agent.trace_lines() == ["lock", "unlock", "rlock", "runlock"]
    logs = agent.logs()
    for secret in [KEY, *secrets_of(settings)]:
        assert secret not in logs


def test_restore_refuses_wrong_key_checksum_and_missing_object(
    s3_settings, make_agent, tmp_path: Path
) -> None:
    source = tmp_path / "source.bin"
    make_source(source, 2 * 1024 * 1024)
    out = tmp_path / "restored.bin"
    agent = make_agent(scripts=scripts(tmp_path, source, out))
    dest = destination_for(s3_settings)
    b, _ = bodies("wk", dest, TRANSFORMS["zstd+enc"])
    agent.request("POST", "/backup", b)
    backup = agent.wait_job("backup", "wk")
    assert backup["status"] == "SUCCEEDED"

    _, r = bodies("wk", dest, TRANSFORMS["zstd+enc"], key="not-the-key")
    r["destination"]["filename"] = backup["filename"]
    agent.request("PUT", "/restore", r)
    res = agent.wait_job("restore", "wk")
    assert res["status"] == "FAILED"
    assert "wrong encryption key" in res["error_message"]
    assert "not-the-key" not in res["error_message"]
    assert not out.exists()  # the restore script never ran
    assert agent.trace_lines()[-1] == "runlock"

    _, r = bodies("sum", dest, TRANSFORMS["zstd+enc"])
    r["destination"]["filename"] = backup["filename"]
    r["checksum"] = "sha256:" + "0" * 64
    agent.request("PUT", "/restore", r)
    res = agent.wait_job("restore", "sum")
    assert res["status"] == "FAILED" and "storage_checksum_mismatch" in res["error_message"]
    assert not out.exists()

    _, r = bodies("missing", dest, None)
    r["destination"]["filename"] = "does-not-exist.bin"
    agent.request("PUT", "/restore", r)
    res = agent.wait_job("restore", "missing")
    assert res["status"] == "FAILED"
    assert "download of" in res["error_message"]
    assert "storage_object_not_found" in res["error_message"]
    assert not out.exists()


@pytest.mark.parametrize("allowed", [False, True])
def test_restore_target_exists(s3_settings, make_agent, tmp_path: Path, allowed: bool) -> None:
    source = tmp_path / "source.bin"
    data = make_source(source, 1000)
    out = tmp_path / "restored.bin"
    agent = make_agent(
        scripts=scripts(tmp_path, source, out), allowed_to_delete_files=str(allowed).lower()
    )
    b, r = bodies("ex", destination_for(s3_settings), None)
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
        assert target.read_bytes() == b"old content"  # untouched


def test_skip_storage_setting_overrides_the_request(
    s3_settings, make_agent, tmp_path: Path
) -> None:
    source = tmp_path / "source.bin"
    make_source(source, 1000)
    agent = make_agent(scripts=scripts(tmp_path, source, tmp_path / "o"), skip_storage="true")
    dest = destination_for(s3_settings)
    b, _ = bodies("sk", dest, None)
    del b["destination"]["bucket"]  # not needed when the agent does not upload
    assert agent.request("POST", "/backup", b)[0] == 201
    res = agent.wait_job("backup", "sk")
    assert res["status"] == "SUCCEEDED" and res["checksum"] is None
    assert res["skip_storage"] is True
    assert (agent.base / "backup" / "sk" / res["filename"]).exists()
    assert list_keys(s3_settings, dest["filenamePrefix"]) == []


def test_failure_after_upload_deletes_the_object(s3_settings, make_agent, tmp_path: Path) -> None:
    """A failed job is no restore point: the object it uploaded is deleted, not orphaned."""
    source = tmp_path / "source.bin"
    make_source(source, 5000)
    d = scripts(tmp_path, source, tmp_path / "o")
    write_script(d, "backup-cleanup", "exit 7")
    agent = make_agent(scripts=d)
    dest = destination_for(s3_settings)
    b, _ = bodies("late", dest, TRANSFORMS["zstd+enc"])
    agent.request("POST", "/backup", b)
    res = agent.wait_job("backup", "late")
    assert res["status"] == "FAILED"
    assert res["error_message"] == "script backup-cleanup exited with status 7"
    assert res["stored_key"] is None and res["checksum"] is None
    assert list_keys(s3_settings, dest["filenamePrefix"]) == []
    assert agent.trace_lines() == ["lock", "unlock"]


def test_upload_refused_by_the_store_fails_clearly(s3_settings, make_agent, tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    make_source(source, 5000)
    agent: AgentProcess = make_agent(scripts=scripts(tmp_path, source, tmp_path / "o"))
    dest = {**destination_for(s3_settings), "authSecret": "wrong-secret-value"}
    b, _ = bodies("auth", dest, None)
    agent.request("POST", "/backup", b)
    res = agent.wait_job("backup", "auth", timeout=120)
    assert res["status"] == "FAILED"
    assert "upload of" in res["error_message"]
    assert "storage_auth_failed" in res["error_message"]
    assert "wrong-secret-value" not in res["error_message"]
    assert agent.trace_lines() == ["lock", "unlock"]
    assert "wrong-secret-value" not in agent.logs()
    assert read_object(s3_settings, dest["filenamePrefix"] + res["filename"]) is None
