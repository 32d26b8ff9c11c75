"""The log audit: no secret a test used may appear in any log of the test run.

A pytest plugin (listed in ``tests/conftest.py``'s ``pytest_plugins``). At the start of the
session it sends the in-process services' logs (structlog and the standard library, as JSON
lines: see :func:`broker.logging.configure_logging`) to ``<basetemp>/in-process.log`` as well
as to standard output. At the end of the session it reads **every ``*.log`` file under
pytest's basetemp** and fails the run if one holds a registered secret, naming the file and
line and showing only a masked form of the secret.

What other parts of the suite must do:

- A process a test starts (agent, manager, stand-in) writes its log to a file whose name ends
  in ``.log`` somewhere under pytest's basetemp (``tmp_path``, ``tmp_path_factory``).
- A test that makes up or receives a secret registers it: ``audit_secret(value)`` (a function
  importable from here, also a fixture of the same name). Binding keys, passwords sent in
  provision parameters, destination keys...
- Secrets held by fixtures are found without help: after each fixture is set up, its value
  is searched for pydantic ``SecretStr`` fields and for attributes named like a secret
  (``password``, ``secret``, ``*_key``, ``token``) holding a string.

The audit trail is held to the same rule: before the session's database server stops, the
``audit`` collection of every database on it (each test's manager has its own) is written to
``<basetemp>/audit-collections.log``, one entry a line, and scanned with the logs.

Values shorter than 8 characters or made only of lower-case letters are not audited (they
would match ordinary words).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr

from broker.logging import configure_logging

MIN_LENGTH = 8
IN_PROCESS_LOG = "in-process.log"
AUDIT_COLLECTIONS_LOG = "audit-collections.log"
MONGO_FIXTURE = "mongo_server"
# Attribute and key names whose string value is a secret (not ``access_key_id``: an S3 key id
# is a user name and may be logged).
_SECRET_NAME = re.compile(r"(password|passwd|secret|^key$|^token$|_token$)", re.IGNORECASE)
_REGISTERED: dict[str, str] = {}

# Fixed secrets of other parts of the suite, by where they are defined (imported at the end of
# the session, so that they stay in sync; a module that is gone is skipped).
_KNOWN: list[tuple[str, str]] = [
    ("tests.servers.broker", "BROKER_PASSWORD"),
    ("tests.agent.helpers", "PASSWORD"),
    ("tests.agent.test_protocol", "DB_PASSWORD"),
    ("tests.agent.test_faults", "DB_PASSWORD"),
    ("tests.servers.seed", "DB_PASSWORD"),
    ("tests.servers.seed", "AGENT_PASSWORD"),
    ("tests.runner.go_agent", "PASSWORD"),
    ("tests.api.conftest", "S3_BODY"),
    ("tests.api.conftest", "SWIFT_BODY"),
    ("tests.broker.conftest", "AGENT_PASSWORD"),
    ("tests.broker.conftest", "DB_PASSWORD"),
]
_KNOWN_LITERALS = ["ENC-KEY-very-secret", "SWIFT-pw-9", "topsecret-value", "wrong-secret-value"]


def _worth_auditing(value: str) -> bool:
    return len(value) >= MIN_LENGTH and not re.fullmatch(r"[a-z]+", value)


def audit_secret(value: str | SecretStr | None, label: str = "registered by a test") -> Any:
    """Register a secret the logs must never contain; returns ``value`` unchanged."""
    raw = value.get_secret_value() if isinstance(value, SecretStr) else value
    if isinstance(raw, str) and _worth_auditing(raw):
        _REGISTERED.setdefault(raw, label)
    return value


def registered() -> dict[str, str]:
    return dict(_REGISTERED)


@pytest.fixture(name="audit_secret")
def audit_secret_fixture() -> Any:
    return audit_secret


def mask(secret: str) -> str:
    return f"{secret[:2]}{'*' * 6} ({len(secret)} characters)"


def secrets_in(value: Any, label: str, depth: int = 0) -> Iterator[tuple[str, str]]:
    """Secrets held by a fixture value: SecretStr fields and secret-named string attributes."""
    if depth > 2 or value is None or isinstance(value, int | float | bool | bytes | Path):
        return
    if isinstance(value, SecretStr):
        yield value.get_secret_value(), label
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from secrets_in(getattr(value, name, None), f"{label}.{name}", depth + 1)
    elif isinstance(value, dict):
        for k, v in list(value.items())[:200]:
            if isinstance(v, str) and isinstance(k, str) and _SECRET_NAME.search(k):
                yield v, f"{label}[{k!r}]"
            elif isinstance(v, SecretStr | BaseModel):
                yield from secrets_in(v, f"{label}[{k!r}]", depth + 1)
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        for k, v in list(vars(value).items())[:200]:
            if isinstance(v, str) and _SECRET_NAME.search(k):
                yield v, f"{label}.{k}"
            elif isinstance(v, SecretStr | BaseModel):
                yield from secrets_in(v, f"{label}.{k}", depth + 1)


@dataclass(frozen=True)
class Finding:
    path: Path
    line: int
    secret: str
    label: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {mask(self.secret)}, {self.label}"


def scan(root: Path, secrets: dict[str, str]) -> list[Finding]:
    """Every line of every ``*.log`` file under ``root`` that contains one of ``secrets``."""
    findings: list[Finding] = []
    if not secrets:
        return findings
    for path in sorted(root.rglob("*.log")):
        if not path.is_file():
            continue
        try:
            text = path.read_bytes().decode(errors="replace")
        except OSError:
            continue
        present = [s for s in secrets if s in text]
        if not present:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            for secret in present:
                if secret in line:
                    findings.append(Finding(path, n, secret, secrets[secret]))
    return findings


class _Tee:
    """What the in-process services log to: the audit file, and standard output as it is at
    the time of writing (pytest captures it per test)."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("a", encoding="utf-8", buffering=1)

    def write(self, text: str) -> int:
        self._file.write(text)
        return sys.stdout.write(text)

    def flush(self) -> None:
        self._file.flush()
        sys.stdout.flush()


_STATE: dict[str, Any] = {}


def pytest_sessionstart(session: pytest.Session) -> None:
    basetemp = session.config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
    tee = _Tee(basetemp / IN_PROCESS_LOG)
    _STATE.update(tee=tee, basetemp=basetemp)
    configure_logging("DEBUG", stream=tee)  # type: ignore[arg-type]
    import logging

    logging.getLogger().setLevel(logging.INFO)  # the libraries' debug output is noise here


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any], request: Any) -> Any:
    value = yield
    for secret, label in secrets_in(value, f"fixture {fixturedef.argname}"):
        audit_secret(secret, label)
    if fixturedef.argname == MONGO_FIXTURE:
        # runs before the fixture's own teardown (finalizers run last in, first out), so the
        # server still answers
        request.addfinalizer(lambda: _dump_audit_collections(value.url))
    return value


def _dump_audit_collections(url: str) -> None:
    """Every database's audit trail as lines of a ``.log`` file, for :func:`scan`."""
    import pymongo  # the manager's driver

    basetemp: Path | None = _STATE.get("basetemp")
    if basetemp is None:
        return
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        url, serverSelectionTimeoutMS=5000
    )
    entries = 0
    try:
        with (basetemp / AUDIT_COLLECTIONS_LOG).open("a", encoding="utf-8") as out:
            for name in client.list_database_names():
                for entry in client[name]["audit"].find():
                    out.write(json.dumps({"database": name, **entry}, default=str) + "\n")
                    entries += 1
    except pymongo.errors.PyMongoError as exc:
        _STATE["audit_dump_error"] = f"{type(exc).__name__}: {exc}"
    finally:
        client.close()
    _STATE["audit_entries"] = _STATE.get("audit_entries", 0) + entries


def _known_secrets() -> None:
    """The fixed secrets of the modules this run imported (the others ran no test)."""
    for module_name, attr in _KNOWN:
        module = sys.modules.get(module_name)
        if module is None:
            continue
        value = getattr(module, attr, None)
        label = f"{module_name}.{attr}"
        if isinstance(value, str):
            audit_secret(value, label)
        else:
            for secret, where in secrets_in(value, label):
                audit_secret(secret, where)
    for literal in _KNOWN_LITERALS:
        audit_secret(literal, "a fixed secret of the test suite")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    tee = _STATE.get("tee")
    if tee is not None:
        tee.flush()
    basetemp: Path | None = _STATE.get("basetemp")
    if basetemp is None:
        return
    _known_secrets()
    findings = scan(basetemp, registered())
    _STATE["findings"] = findings
    _STATE["audited"] = (len(registered()), sum(1 for _ in basetemp.rglob("*.log")))
    if findings or "audit_dump_error" in _STATE:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    findings: list[Finding] | None = _STATE.get("findings")
    if findings is None:
        return
    secrets, files = _STATE.get("audited", (0, 0))
    if "audit_entries" in _STATE:
        terminalreporter.write_line(
            f"log audit: {_STATE['audit_entries']} audit-trail entries scanned as well"
        )
    if "audit_dump_error" in _STATE:
        # the trail could not be read: say so rather than pass it silently
        terminalreporter.write_line(
            f"log audit: the audit collections could not be read: {_STATE['audit_dump_error']}",
            red=True,
        )
    if not findings:
        terminalreporter.write_line(
            f"log audit: none of {secrets} secrets found in {files} log file(s)"
        )
        return
    terminalreporter.section("log audit: secrets found in logs", red=True, bold=True)
    for finding in findings[:200]:
        terminalreporter.write_line(str(finding), red=True)
    if len(findings) > 200:
        terminalreporter.write_line(f"... and {len(findings) - 200} more")
