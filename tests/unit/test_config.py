"""Configuration: typed values, a clear error per bad variable, Cloud Foundry conventions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backup.secrets import generate_master_key_spec
from broker.config import ConfigError, load_settings

_ENV = (
    "PORT", "MONGODB_URL", "VCAP_SERVICES", "VCAP_APPLICATION", "LISTEN_HOST", "LOG_LEVEL",
    "BROKER_PASSWORD", "SECRETS_MASTER_KEYS", "DATA_DIR", "PUBLIC_URL", "MONGODB_DATABASE",
    "CATALOG_PATH", "AGENT_PROBE_TIMEOUT_SECONDS", "OPERATION_LEASE_SECONDS", "TOMBSTONE_SECONDS",
    "DEPROVISION_JOB_WAIT_SECONDS",
)  # fmt: skip


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)


def test_defaults_need_no_configuration(tmp_path: Path) -> None:
    s = load_settings(DATA_DIR=str(tmp_path))
    assert s.embedded_database and s.port == 8080 and s.host == "127.0.0.1"
    s.resolve_local_secrets()
    assert s.broker_password is not None and len(s.broker_password.get_secret_value()) >= 24
    assert (tmp_path / "broker-password").stat().st_mode & 0o777 == 0o600
    again = load_settings(DATA_DIR=str(tmp_path))
    again.resolve_local_secrets()
    assert again.broker_password == s.broker_password, "generated once, then kept"
    assert again.master_keys()[0].key == s.master_keys()[0].key


def test_each_bad_value_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "eighty")
    monkeypatch.setenv("MONGODB_URL", "http://db")
    monkeypatch.setenv("LOG_LEVEL", "loud")
    with pytest.raises(ConfigError) as err:
        load_settings()
    text = str(err.value)
    assert "PORT" in text and "MONGODB_URL" in text and "LOG_LEVEL" in text
    assert "http://db" not in text, "a connection string may hold a password"


def test_bad_master_key_is_reported_without_echoing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRETS_MASTER_KEYS", "k1:c2hvcnQ")
    with pytest.raises(ConfigError, match="SECRETS_MASTER_KEYS") as err:
        load_settings()
    assert "c2hvcnQ" not in str(err.value)


def test_external_database_requires_explicit_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONGODB_URL", "mongodb://db.example:27017")
    s = load_settings()
    with pytest.raises(ConfigError, match="BROKER_PASSWORD and SECRETS_MASTER_KEYS"):
        s.resolve_local_secrets()
    monkeypatch.setenv("BROKER_PASSWORD", "pw")
    monkeypatch.setenv("SECRETS_MASTER_KEYS", generate_master_key_spec())
    load_settings().resolve_local_secrets()


def test_cloud_foundry_port_vcap_services_and_route(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "61001")
    monkeypatch.setenv("VCAP_APPLICATION", json.dumps({"application_uris": ["bm.apps.example"]}))
    monkeypatch.setenv(
        "VCAP_SERVICES",
        json.dumps(
            {"mongodb": [{"name": "db", "credentials": {"uri": "mongodb://u:p@h:27017/bm"}}]}
        ),
    )
    s = load_settings()
    assert s.port == 61001 and s.host == "0.0.0.0"
    assert s.mongodb_url is not None
    assert s.mongodb_url.get_secret_value() == "mongodb://u:p@h:27017/bm"
    assert not s.embedded_database
    assert s.base_url == "https://bm.apps.example"
    assert "u:p" not in repr(s)


def test_operation_settings_are_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_PROBE_TIMEOUT_SECONDS", "soon")
    monkeypatch.setenv("OPERATION_LEASE_SECONDS", "0")
    monkeypatch.setenv("TOMBSTONE_SECONDS", "-1")
    with pytest.raises(ConfigError) as err:
        load_settings()
    text = str(err.value)
    for name in ("AGENT_PROBE_TIMEOUT_SECONDS", "OPERATION_LEASE_SECONDS", "TOMBSTONE_SECONDS"):
        assert name in text


def test_missing_catalog_and_bad_listen_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATALOG_PATH", "/nonexistent/catalog.yml")
    monkeypatch.setenv("LISTEN_HOST", "not a host")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "CATALOG_PATH" in str(err.value) and "LISTEN_HOST" in str(err.value)


def test_database_name_comes_from_the_url_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONGODB_URL", "mongodb://u:p@h1:27017,h2:27017/svc_db?replicaSet=rs0")
    assert load_settings().mongodb_database == "svc_db"
    monkeypatch.setenv("MONGODB_DATABASE", "explicit")
    assert load_settings().mongodb_database == "explicit"
    monkeypatch.delenv("MONGODB_DATABASE")
    monkeypatch.setenv("MONGODB_URL", "mongodb://h:27017/?tls=true")
    assert load_settings().mongodb_database == "backup_manager"
    monkeypatch.setenv("MONGODB_DATABASE", "bad/name")
    with pytest.raises(ConfigError, match="MONGODB_DATABASE"):
        load_settings()


def test_vcap_services_with_a_database_in_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "VCAP_SERVICES",
        json.dumps({"user-provided": [{"credentials": {"url": "mongodb+srv://u:p@c.example/bm"}}]}),
    )
    s = load_settings()
    assert s.mongodb_database == "bm" and not s.embedded_database
