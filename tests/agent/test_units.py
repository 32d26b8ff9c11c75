"""Pure functions: destination mapping, configuration, request models."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from agent.config import AgentConfig
from agent.destinations import to_settings
from agent.models import BackupRequest, Destination, check_name
from storage import S3Settings, SwiftSettings


def cfg(**kw: object) -> AgentConfig:
    return AgentConfig(client_username="u", client_password="p", **kw)  # type: ignore[arg-type]


def test_config_defaults_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    c = cfg(directory_backup="/x")
    assert c.client_port == 8000 and c.max_job_number == 10
    assert c.allowed_to_delete_files is False and c.skip_storage is None
    assert str(c.state_dir) == "/x/.agent-state"
    monkeypatch.setenv("client_username", "env-user")
    monkeypatch.setenv("client_password", "env-pw")
    monkeypatch.setenv("max_job_number", "3")
    monkeypatch.setenv("skip_storage", "true")
    c = AgentConfig()  # type: ignore[call-arg]
    assert (c.client_username, c.max_job_number, c.skip_storage) == ("env-user", 3, True)
    with pytest.raises(ValidationError):
        cfg(tls_cert_file="/a")
    with pytest.raises(ValidationError):
        cfg(client_port=0)


def test_s3_mapping() -> None:
    d = Destination(
        type="s3", bucket="bkt", region="eu-1", endpoint="minio:9000", authKey="k",
        authSecret="s", skipSSL=True, filenamePrefix="p/",
    )  # fmt: skip
    s = to_settings(d, cfg())
    assert isinstance(s, S3Settings)
    assert s.endpoint == "http://minio:9000" and s.region == "eu-1"  # not swapped
    assert s.verify_tls is False and s.prefix == "" and s.addressing_style == "path"
    d2 = d.model_copy(update={"endpoint": None, "skipSSL": False})
    assert to_settings(d2, cfg(default_s3_endpoint="https://s3.example")).endpoint == (
        "https://s3.example"
    )
    assert to_settings(d2, cfg()).endpoint is None
    secret = d.model_copy(update={"authSecret": "topsecret"})
    assert "topsecret" not in repr(secret) and "topsecret" not in repr(to_settings(secret, cfg()))


def test_swift_mapping() -> None:
    v1 = Destination(
        type="SWIFT", authUrl="http://sw/auth/v1.0", container_name="c", username="a:u",
        password="pw",
    )  # fmt: skip
    s = to_settings(v1, cfg())
    assert isinstance(s, SwiftSettings) and s.auth_version == "1" and s.container == "c"
    v3 = v1.model_copy(update={"authUrl": "https://ks/v3", "domain": "D", "project_name": "P"})
    s = to_settings(v3, cfg())
    assert (s.auth_version, s.user_domain_name, s.project_name) == ("3", "D", "P")


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "a\\b", "x\x00", "/abs"])
def test_check_name(bad: str) -> None:
    with pytest.raises(ValueError):
        check_name(bad, "filename")


def test_transform_flags() -> None:
    base = {
        "id": "j",
        "compression": True,
        "encryption_key": "k",
        "destination": {"type": "S3", "skipStorage": True},
        "backup": {"host": "h", "username": "u", "password": "p", "database": "d"},
    }
    old = BackupRequest.model_validate(base)
    assert old.agent_compression is None and not old.agent_encryption
    new = BackupRequest.model_validate(
        {**base, "transform": {"compression": "zstd", "encryption": True}}
    )
    assert new.agent_compression == "zstd" and new.agent_encryption
    off = BackupRequest.model_validate(
        {
            **base,
            "compression": False,
            "encryption_key": "none",
            "transform": {"compression": "gzip", "encryption": True},
        }
    )
    assert off.agent_compression is None and not off.agent_encryption
    leaky = BackupRequest.model_validate({**base, "encryption_key": "KEYVAL"})
    leaky.backup.password = "PWVAL"
    assert "KEYVAL" not in repr(leaky) and "PWVAL" not in repr(leaky)


def test_part_size_follows_the_file_size() -> None:
    """Known size: one constant part size that fits S3's part limit, so memory is bounded
    before the upload starts; unknown size: the storage layer's growing parts."""
    from agent.destinations import transfer_settings

    c = cfg()
    assert transfer_settings(c).part_size == 8 * MIB
    small = transfer_settings(c, 1 << 30)
    assert (small.part_size, small.part_growth_every) == (8 * MIB, 9000)
    huge = transfer_settings(c, 1 << 40)  # 1 TiB
    assert huge.part_size % MIB == 0
    assert huge.part_size * 9000 >= 1 << 40 > (huge.part_size - MIB) * 9000
    assert huge.part_growth_every == 9000


MIB = 1024 * 1024
