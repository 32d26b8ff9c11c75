"""Request parameters become environment variables of the DBA scripts, which run as the
agent's user. A name that a shell, the dynamic loader, an interpreter or the agent itself
acts on is refused with the Go agent's failed-job 400 before any script runs; the operator
can narrow what passes (``allowed_parameters``); and the scripts start from a clean
environment, never the agent's own (issue 14)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig
from agent.environment import refusal
from tests.agent.helpers import (
    AgentProcess,
    backup_request,
    restore_request,
    script_env,
    tracing_scripts,
    write_script,
)
from tests.agent.test_e2e_databases import ENGINES, EXAMPLES, _require

DB_PASSWORD = "db-PASSW0RD-123"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
REFUSED = [
    "BASH_ENV",
    "bash_env",
    "ENV",
    "BASH_FUNC_x%%",
    "SHELLOPTS",
    "BASHOPTS",
    "PS4",
    "IFS",
    "PATH",
    "HOME",
    "LD_PRELOAD",
    "Ld_Library_Path",
    "LD_AUDIT",
    "DYLD_INSERT_LIBRARIES",
    "GCONV_PATH",
    "GLIBC_TUNABLES",
    "MALLOC_CHECK_",
    "TMPDIR",
    "PYTHONPATH",
    "PERL5OPT",
    "RUBYOPT",
    "NODE_OPTIONS",
    "PSQLRC",
    "OPENSSL_CONF",
    "http_proxy",
    "BACKUP_PASSWORD",
    "backup_host",
    "RESTORE_FILE",
    "AGENT_SECRETS_FILE",
    "AGENT_RECOVERY",
    "S3_ENDPOINT",
    "SWIFT_AUTHURL",
    "client_password",
    "directory_backup",
    "JOB_ID",
    "COMPRESSION",
    "ENCRYPTION_KEY",
    "allowed_parameters",
]


def _bash_scripts(directory: Path, marker: Path) -> Path:
    """bash scripts (bash, not sh, reads BASH_ENV) that touch ``marker`` when they run."""
    tracing_scripts(directory)
    for stage in ("pre-backup-lock", "pre-restore-lock", "backup.sh", "restore"):
        (directory / stage).unlink(missing_ok=True)
    for stage in ("pre-backup-lock", "pre-restore-lock"):
        path = directory / stage
        path.write_text(f'#!/bin/bash\ntouch "{marker}"\n')
        path.chmod(0o755)
    write_script(directory, "backup", 'echo x > "$BACKUP_DIRECTORY/f"')
    write_script(directory, "restore", "true")
    return directory


@pytest.mark.parametrize("name", REFUSED)
def test_a_dangerous_parameter_is_refused_and_no_script_runs(
    make_agent: Callable[..., AgentProcess], tmp_path: Path, name: str
) -> None:
    ran = tmp_path / "script-ran"
    pwned = tmp_path / "pwned"
    agent = make_agent(scripts=_bash_scripts(tmp_path / "scripts", ran))
    attack = f'$(touch "{pwned}"; id; env >&2)'
    for kind, method, path, body in (
        (
            "backup",
            "POST",
            "/backup",
            backup_request("b1", backup={"parameters": [{name: attack}]}),
        ),
        (
            "restore",
            "PUT",
            "/restore",
            restore_request("r1", restore={"parameters": [{name: "x"}]}),
        ),
    ):
        status, resp = agent.request(method, path, body)
        assert status == 400, (name, resp)
        assert resp["status"] == "FAILED" and resp["state"] == "Body Deserialization"
        assert resp["message"] == f"{kind.capitalize()} failed."
        assert resp["error"] == "invalid_request"
        assert resp["error_message"] == resp["description"]
        assert f"{kind}.parameters" in resp["description"]
        assert (
            repr(name) in resp["description"]
            or "environment variable name" in (resp["description"])
        )
        assert attack not in json.dumps(resp) and DB_PASSWORD not in json.dumps(resp)
        assert agent.request("GET", f"/{kind}/{body['id']}")[0] == 404  # never registered
    assert not ran.exists() and not pwned.exists()
    assert agent.trace_lines() == []


def test_the_bash_env_attack_runs_nothing(
    make_agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    """The finding itself: ``BASH_ENV`` set to a command substitution ran it before every
    bash script, and the job's error log showed its output (the password included)."""
    ran, pwned = tmp_path / "script-ran", tmp_path / "pwned"
    agent = make_agent(scripts=_bash_scripts(tmp_path / "scripts", ran))
    attack = f'$(touch "{pwned}"; env >&2)'
    body = backup_request("job", backup={"parameters": [{"BASH_ENV": attack}]})
    status, _ = agent.request("POST", "/backup", body)
    if status == 201:  # what the attack did before the fix, for the failure's message
        result = agent.wait_job("backup", "job")
        assert DB_PASSWORD not in json.dumps(result), "the password leaked to the job's logs"
    assert status == 400
    assert not pwned.exists() and not ran.exists()
    # The same request without it runs (the agent is fine, only the name was refused).
    ok = backup_request("job2", backup={"parameters": [{"PGSSLMODE": "disable"}]})
    assert agent.request("POST", "/backup", ok)[0] == 201
    assert agent.wait_job("backup", "job2")["status"] == "SUCCEEDED"
    assert ran.exists() and not pwned.exists()


def test_allowed_parameters_narrow_what_passes(
    make_agent: Callable[..., AgentProcess],
) -> None:
    agent = make_agent(allowed_parameters=" pg* , MYSQL_*,BASH_ENV")

    def start(job_id: str, params: list[dict[str, Any]]) -> tuple[int, Any]:
        return agent.request(
            "POST", "/backup", backup_request(job_id, backup={"parameters": params})
        )

    for name in ("REDIS_KEY_PATTERN", "EXTRA", "xPGSSLMODE"):
        status, resp = start("no", [{"PGSSLMODE": "disable"}, {name: "1"}])
        assert status == 400, resp
        assert resp["state"] == "Body Deserialization" and resp["error"] == "invalid_request"
        assert repr(name) in resp["description"] and "allowed_parameters" in resp["description"]
    # Listing a refused name does not let it through.
    status, resp = start("no", [{"BASH_ENV": "x"}])
    assert status == 400 and "'BASH_ENV'" in resp["description"], resp
    assert agent.trace_lines() == []
    # Inside the list (any case), and BACKUP_PORT, which the manager sends itself: accepted.
    params = [{"PGSSLMODE": "disable"}, {"pgport": "6432"}, {"MYSQL_PWD_X": "y"}]
    status, resp = start("yes", [*params, {"BACKUP_PORT": "5433"}])
    assert status == 201, resp
    assert agent.wait_job("backup", "yes")["status"] == "SUCCEEDED"
    env = script_env(agent.trace, "backup")
    assert env["PGSSLMODE"] == "disable" and env["pgport"] == "6432"
    assert env["MYSQL_PWD_X"] == "y" and env["BACKUP_PORT"] == "5433"


def test_an_empty_allow_list_lets_no_parameter_through(
    make_agent: Callable[..., AgentProcess],
) -> None:
    agent = make_agent(allowed_parameters="")
    body = backup_request("no", backup={"parameters": [{"PGSSLMODE": "disable"}]})
    assert agent.request("POST", "/backup", body)[0] == 400
    body = backup_request("yes", backup={"parameters": [{"BACKUP_PORT": "5433"}]})
    assert agent.request("POST", "/backup", body)[0] == 201
    assert agent.wait_job("backup", "yes")["status"] == "SUCCEEDED"


def test_scripts_start_from_a_clean_environment(
    make_agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    """The agent's own environment (a canary, a BASH_ENV, an LD_ variable set where the
    agent runs) does not reach the scripts; the operator lets names through explicitly."""
    sourced = tmp_path / "sourced"
    rc = tmp_path / "bashrc"
    rc.write_text(f'touch "{sourced}"\n')
    scripts = tmp_path / "scripts"
    tracing_scripts(scripts)
    (scripts / "backup.sh").unlink()
    path = scripts / "backup"
    path.write_text('#!/bin/bash\nenv > "$TRACE.backup.env"\necho x > "$BACKUP_DIRECTORY/f"\n')
    path.chmod(0o755)
    agent = make_agent(
        scripts=scripts,
        CANARY_SECRET="canary-4711",
        OPERATOR_VAR="let-through",
        BASH_ENV=str(rc),
        LD_BIND_NOW="1",
        PATH=f"{tmp_path}/evil-bin:{DEFAULT_PATH}",
        script_env_passthrough="TRACE,OPERATOR_VAR,client_username_x",
    )
    body = backup_request("clean", backup={"parameters": [{"PGSSLMODE": "disable"}]})
    assert agent.request("POST", "/backup", body)[0] == 201
    assert agent.wait_job("backup", "clean")["status"] == "SUCCEEDED"
    env = script_env(agent.trace, "backup")
    assert "CANARY_SECRET" not in env and "canary-4711" not in json.dumps(env)
    assert "BASH_ENV" not in env and "LD_BIND_NOW" not in env and not sourced.exists()
    assert env["PATH"] == DEFAULT_PATH
    assert env["OPERATOR_VAR"] == "let-through" and env["PGSSLMODE"] == "disable"
    assert env["directory_backup"] == str(agent.base / "backup")
    assert env["JOB_ID"] == "clean" and env["BACKUP_DATABASE"] == "mydb"
    for name in ("client_password", "client_username", "scripts_path", "state_directory"):
        assert name not in env
    # Every variable the script saw is one the agent chose: its own, the request's, the
    # passthrough's, and the fixed PATH / HOME / LANG (bash adds PWD, SHLVL and _).
    expected = {"PATH", "HOME", "LANG", "PWD", "SHLVL", "_", "TRACE", "OPERATOR_VAR"}
    for name in env:
        assert name in expected or refusal(name) is not None or name == "PGSSLMODE", name


def test_the_script_path_is_a_setting(make_agent: Callable[..., AgentProcess]) -> None:
    agent = make_agent(script_env_path="/usr/bin:/bin")
    assert agent.request("POST", "/backup", backup_request("p"))[0] == 201
    assert agent.wait_job("backup", "p")["status"] == "SUCCEEDED"
    assert script_env(agent.trace, "backup")["PATH"] == "/usr/bin:/bin"


def test_every_agent_setting_is_a_refused_name() -> None:
    """The agent configures itself through its environment: a parameter named like one of
    its settings (including one added later) is refused."""
    for name in AgentConfig.model_fields:
        assert refusal(name) is not None, f"add {name} to agent/environment.py"


@pytest.mark.parametrize(
    ("engine", "option"),
    [("postgresql", "--file"), ("mariadb", "--tee"), ("mariadb", "--result-file")],
)
def test_the_example_scripts_take_no_option_from_a_database_name(
    make_agent: Callable[..., AgentProcess], tmp_path: Path, engine: str, option: str
) -> None:
    """An item (database) name is tenant input too: the example scripts pass it as an
    option's value, never where the client would read it as one of its own options (which
    would write the dump, or the session, to a file of the tenant's choice)."""
    db = ENGINES[engine]()
    _require(db.port, engine)
    target = tmp_path / "written-by-the-client"
    agent = make_agent(scripts=EXAMPLES / engine, skip_storage="true")
    section = {"host": "127.0.0.1", "username": db.user, "password": ""}
    body = backup_request("inj", backup={**section, "database": f"{option}={target}"})
    assert agent.request("POST", "/backup", body)[0] == 201
    assert agent.wait_job("backup", "inj")["status"] == "FAILED"
    assert not target.exists()


@pytest.mark.parametrize(
    "name", ["dbname=postgres", "postgresql://127.0.0.1/postgres", "dbname='postgres' x=\\'"]
)
def test_a_postgresql_database_name_is_never_read_as_a_connection_string(
    make_agent: Callable[..., AgentProcess], name: str
) -> None:
    """libpq reads a database name with '=' or a URI prefix as a whole connection string, which
    could name another database, host, or client files (passfile=, sslkey=) on the agent's
    host. The example scripts pass the name as a quoted dbname= value: the job looks for a
    database literally named so, which does not exist."""
    db = ENGINES["postgresql"]()
    _require(db.port, "postgresql")
    agent = make_agent(scripts=EXAMPLES / "postgresql", skip_storage="true")
    section = {"host": "127.0.0.1", "username": db.user, "password": ""}
    body = backup_request("conninfo", backup={**section, "database": name})
    assert agent.request("POST", "/backup", body)[0] == 201
    job = agent.wait_job("backup", "conninfo")
    assert job["status"] == "FAILED", job
