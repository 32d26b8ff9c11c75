"""The log audit itself: it finds a secret in any ``*.log`` under the directory, reports the
file and line, and never prints the secret."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, SecretStr

from tests.servers.log_audit import Finding, audit_secret, mask, registered, scan, secrets_in


def test_scan_finds_each_line_and_masks(tmp_path: Path) -> None:
    secret = "leaky-Secret-7731"
    (tmp_path / "agents" / "a1").mkdir(parents=True)
    (tmp_path / "agents" / "a1" / "agent.log").write_text(
        '{"event": "ok"}\n{"event": "oops", "password": "leaky-Secret-7731"}\n'
    )
    (tmp_path / "service.log").write_text("clean\n" * 3 + f"Authorization: {secret}\n")
    (tmp_path / "notes.txt").write_text(secret)  # not a log: not scanned
    findings = scan(tmp_path, {secret: "a test secret", "absent-Secret-000": "other"})
    assert [(f.path.name, f.line) for f in findings] == [("agent.log", 2), ("service.log", 4)]
    text = "\n".join(str(f) for f in findings)
    assert secret not in text
    assert mask(secret) in text and "17 characters" in text and "a test secret" in text


def test_nothing_found_in_clean_logs(tmp_path: Path) -> None:
    (tmp_path / "x.log").write_text("nothing to see\n")
    assert scan(tmp_path, {"hidden-Value-123": "t"}) == []
    assert scan(tmp_path, {}) == []


def test_short_or_plain_word_values_are_not_audited() -> None:
    before = registered()
    audit_secret("pw")
    audit_secret("password")
    audit_secret(None)
    assert registered() == before
    audit_secret(SecretStr("long-enough-Secret-1"), "from a SecretStr")
    assert registered()["long-enough-Secret-1"] == "from a SecretStr"


def test_fixture_values_are_searched_for_secrets() -> None:
    class Settings(BaseModel):
        access_key_id: str
        secret_access_key: SecretStr

    class Server:
        def __init__(self) -> None:
            self.access_key = "AKIDNOTSECRET"
            self.secret_key = "server-Secret-55"
            self.keystone_password = "ks-Pass-99999"
            self.port = 8080

    found = dict(
        secrets_in(Settings(access_key_id="AKID1", secret_access_key=SecretStr("s3-Secret-1")), "s")
    )
    assert found == {"s3-Secret-1": "s.secret_access_key"}
    found = dict(secrets_in(Server(), "srv"))
    assert found == {"server-Secret-55": "srv.secret_key", "ks-Pass-99999": "srv.keystone_password"}
    found = dict(secrets_in({"secret_access_key": "body-Secret-2", "name": "x"}, "body"))
    assert found == {"body-Secret-2": "body['secret_access_key']"}


def test_finding_is_printable_without_the_secret(tmp_path: Path) -> None:
    f = Finding(tmp_path / "a.log", 3, "Sup3r-secret-value", "label")
    assert "Sup3r-secret-value" not in str(f) and "a.log:3" in str(f)
