"""The embedded database of ``python -m broker`` (no ``MONGODB_URL``) serves the manager only.

Real processes: the manager as an operator starts it, its embedded SecantusDB, and another
local process (a pymongo client in the test) that knows the database's port, as any process
on the machine can (``ss -ltn``), but not its password."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import psutil
import pymongo
import pytest
from pymongo.errors import OperationFailure

from backup.embedded_db import USER
from tests.broker.conftest import STANDARD, go_parameters, provision_body
from tests.broker.test_process import ROOT, BrokerProcess, osb_headers, wait_succeeded
from tests.runner.go_agent import GoAgentStandIn
from tests.servers.log_audit import audit_secret
from tests.servers.ports import free_port, wait_listening


@pytest.fixture
def processes() -> Iterator[list[BrokerProcess]]:
    started: list[BrokerProcess] = []
    yield started
    for p in started:
        if p.proc is not None and p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()


def database_port(broker: BrokerProcess) -> int:
    started = next(x for x in broker.log_lines() if x["event"] == "embedded_database_started")
    return int(started["port"])


def assert_refuses_strangers(port: int) -> None:
    """A client without the password is refused every command that reads or writes data."""
    stranger = pymongo.MongoClient(
        f"mongodb://127.0.0.1:{port}/?directConnection=true", serverSelectionTimeoutMS=5000
    )
    try:
        attempts = {
            "listDatabases": lambda: stranger.list_database_names(),
            "find": lambda: list(stranger.backup_manager.instances.find()),
            "insert": lambda: stranger.backup_manager.instances.insert_one({"_id": "forged"}),
            "createUser": lambda: stranger.admin.command(
                "createUser", "intruder", pwd="intruder-PW-1", roles=["root"]
            ),
            "usersInfo": lambda: stranger.admin.command("usersInfo"),
        }
        for name, attempt in attempts.items():
            with pytest.raises(OperationFailure) as refused:
                attempt()
            assert refused.value.code == 13, name  # Unauthorized
        # A wrong password is no better than none.
        guesser = pymongo.MongoClient(
            f"mongodb://{USER}:not-the-password@127.0.0.1:{port}/?directConnection=true",
            serverSelectionTimeoutMS=5000,
        )
        with pytest.raises(OperationFailure) as refused:
            guesser.list_database_names()
        assert refused.value.code == 18  # AuthenticationFailed
        guesser.close()
    finally:
        stranger.close()


def assert_private(data_dir: Path) -> None:
    """Nothing in DATA_DIR is readable, writable or searchable by group or others."""
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    for dirpath, dirnames, filenames in os.walk(data_dir):
        for name in (*dirnames, *filenames):
            mode = stat.S_IMODE(Path(dirpath, name).lstat().st_mode)
            assert mode & 0o077 == 0, f"{Path(dirpath, name)} is {oct(mode)}"
    assert stat.S_IMODE((data_dir / "database-password").stat().st_mode) == 0o600


def database_password(data_dir: Path) -> str:
    return audit_secret((data_dir / "database-password").read_text().strip())


def assert_password_on_no_command_line(broker: BrokerProcess, password: str) -> None:
    assert broker.proc is not None
    family = psutil.Process(broker.proc.pid)
    for p in [family, *family.children(recursive=True)]:
        assert not any(password in arg for arg in p.cmdline()), p.cmdline()
        assert not any(password in v for v in p.environ().values())


async def test_only_the_manager_reaches_its_embedded_database(
    tmp_path: Path, processes: list[BrokerProcess], go_agent: GoAgentStandIn
) -> None:
    data = tmp_path / "data"
    broker = BrokerProcess(data, tmp_path / "broker.log")
    processes.append(broker.start())
    iid = str(uuid.uuid4())
    async with aiohttp.ClientSession(headers=osb_headers()) as http:
        url = f"{broker.url}/v2/service_instances/{iid}?accepts_incomplete=true"
        async with http.put(url, json=provision_body(go_parameters(go_agent))) as r:
            assert r.status == 202, await r.text()
        await wait_succeeded(http, broker.url, iid)

    port = database_port(broker)
    assert_refuses_strangers(port)
    assert_private(data)
    password = database_password(data)
    assert_password_on_no_command_line(broker, password)
    assert password not in broker.log.read_text()
    assert broker.stop() == 0

    # Started again on the same data directory: same password, the instance is there.
    again = BrokerProcess(data, tmp_path / "broker-2.log")
    processes.append(again.start())
    async with aiohttp.ClientSession(headers=osb_headers()) as http:
        async with http.get(f"{again.url}/v2/service_instances/{iid}") as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["plan_id"] == STANDARD
    assert database_password(data) == password
    assert_refuses_strangers(database_port(again))
    assert_private(data)
    assert again.stop() == 0


def test_a_data_directory_of_an_earlier_version_is_closed_on_first_start(
    tmp_path: Path, processes: list[BrokerProcess]
) -> None:
    """Before this version the database had no user and its files were 0644: the manager
    adds the user while the database is stopped, then starts it with authentication."""
    data = tmp_path / "data"
    (data / "db").mkdir(parents=True)
    data.chmod(0o755)
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "secantusd-py"),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--storage-path", str(data / "db"),
        "--log-level", "WARNING",
    ]  # fmt: skip
    old = subprocess.Popen(command, umask=0o022, stdout=subprocess.DEVNULL)
    try:
        wait_listening(port, 30, old)
        client = pymongo.MongoClient(f"mongodb://127.0.0.1:{port}/?directConnection=true")
        client.backup_manager.legacy.insert_one({"_id": "kept"})
        client.close()
    finally:
        old.terminate()
        assert old.wait(30) == 0
    assert any(p.stat().st_mode & 0o044 for p in (data / "db").iterdir())

    broker = BrokerProcess(data, tmp_path / "broker.log")
    processes.append(broker.start())
    db_port = database_port(broker)
    assert_refuses_strangers(db_port)
    assert_private(data)
    owner = pymongo.MongoClient(
        f"mongodb://{USER}:{database_password(data)}@127.0.0.1:{db_port}/"
        "?directConnection=true&authSource=admin"
    )
    assert owner.backup_manager.legacy.find_one({"_id": "kept"}) == {"_id": "kept"}
    owner.close()
    assert broker.stop() == 0


# ---------------------------------------------------------------- a manager that crashes


def database_pid(broker: BrokerProcess) -> int:
    started = [x for x in broker.log_lines() if x["event"] == "embedded_database_started"]
    return int(started[-1]["pid"])


def gone_within(pid: int, seconds: float) -> bool:
    try:
        psutil.Process(pid).wait(seconds)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return False
    return True


def databases_on(data: Path) -> list[psutil.Process]:
    """SecantusDB servers whose configuration file is the one in ``data``."""
    config = str((data / "database.toml").resolve())
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = p.info["cmdline"] or []
        if any("secantusd" in a for a in cmdline[:2]) and config in cmdline:
            found.append(p)
    return found


def start_timed(broker: BrokerProcess) -> float:
    began = time.monotonic()
    broker.start()
    return time.monotonic() - began


async def assert_instance_kept(broker: BrokerProcess, iid: str) -> None:
    async with aiohttp.ClientSession(headers=osb_headers()) as http:
        async with http.get(f"{broker.url}/v2/service_instances/{iid}") as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["plan_id"] == STANDARD


async def test_the_database_never_outlives_the_manager(
    tmp_path: Path, processes: list[BrokerProcess], go_agent: GoAgentStandIn
) -> None:
    data = tmp_path / "data"
    broker = BrokerProcess(data, tmp_path / "broker.log")
    processes.append(broker.start())
    iid = str(uuid.uuid4())
    async with aiohttp.ClientSession(headers=osb_headers()) as http:
        url = f"{broker.url}/v2/service_instances/{iid}?accepts_incomplete=true"
        async with http.put(url, json=provision_body(go_parameters(go_agent))) as r:
            assert r.status == 202, await r.text()
        await wait_succeeded(http, broker.url, iid)

    # kill -9 of the manager alone (an out-of-memory kill): its database goes with it.
    assert broker.proc is not None
    db = database_pid(broker)
    broker.proc.kill()
    broker.proc.wait()
    # The kernel kills it (SIGKILL: its own SIGTERM shutdown was seen to hang for good).
    assert gone_within(db, 10), "the embedded database outlived the manager"
    again = BrokerProcess(data, tmp_path / "broker-2.log")
    processes.append(again)
    assert start_timed(again) < 10
    await assert_instance_kept(again, iid)

    # kill -9 of both (a crashed host, or a supervisor killing the whole group).
    assert again.proc is not None
    db = database_pid(again)
    os.kill(db, signal.SIGKILL)
    again.proc.kill()
    again.proc.wait()
    assert gone_within(db, 10)
    third = BrokerProcess(data, tmp_path / "broker-3.log")
    processes.append(third)
    assert start_timed(third) < 10
    await assert_instance_kept(third, iid)

    # A clean stop leaves nothing holding the data directory.
    assert third.stop() == 0
    assert not databases_on(data)


def test_a_database_left_running_is_stopped_before_another_starts(
    tmp_path: Path, processes: list[BrokerProcess]
) -> None:
    """A database whose manager died without taking it along (a manager of an earlier
    version, or on a system without Linux's parent-death signal) is found and stopped."""
    data = tmp_path / "data"
    first = BrokerProcess(data, tmp_path / "broker.log")
    processes.append(first.start())
    assert first.stop() == 0
    config = data / "database.toml"
    port = int(re.search(r"port = (\d+)", config.read_text()).group(1))  # type: ignore[union-attr]
    with (tmp_path / "orphan.log").open("ab") as out:
        orphan = subprocess.Popen(
            [str(Path(sys.executable).parent / "secantusd-py"), "--config", str(config)],
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        wait_listening(port, 30, orphan)
        owner = pymongo.MongoClient(
            f"mongodb://{USER}:{database_password(data)}@127.0.0.1:{port}/"
            "?directConnection=true&authSource=admin"
        )
        owner.backup_manager.marker.insert_one({"_id": "kept"})
        owner.close()

        broker = BrokerProcess(data, tmp_path / "broker-2.log")
        processes.append(broker)
        assert start_timed(broker) < 25  # includes the orphan's own graceful stop
        assert orphan.wait(5) is not None
        events = [
            x for x in broker.log_lines() if x["event"] == "embedded_database_left_running_stopped"
        ]
        assert events and events[0]["pids"] == [orphan.pid]
        db_port = database_port(broker)
        owner = pymongo.MongoClient(
            f"mongodb://{USER}:{database_password(data)}@127.0.0.1:{db_port}/"
            "?directConnection=true&authSource=admin"
        )
        assert owner.backup_manager.marker.find_one({"_id": "kept"}) == {"_id": "kept"}
        owner.close()
        assert broker.stop() == 0
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


def run_manager(data: Path, **env: str) -> subprocess.CompletedProcess[bytes]:
    environ = {
        **{k: v for k, v in os.environ.items() if k not in ("MONGODB_URL", "VCAP_SERVICES")},
        "DATA_DIR": str(data),
        "PORT": str(free_port()),
        "BROKER_PASSWORD": "unused-in-these-starts-1",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "broker"], cwd=ROOT, env=environ, capture_output=True, timeout=60
    )


def assert_one_clear_line(
    result: subprocess.CompletedProcess[bytes],
    *words: str,
    prefix: str = "osb-backup-manager: embedded database: ",
    status: int = 1,
) -> None:
    err = result.stderr.decode(errors="replace")
    assert result.returncode == status, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(prefix), err
    for word in words:
        assert word in last, last


def test_the_database_of_another_running_manager_is_left_alone(
    tmp_path: Path, processes: list[BrokerProcess]
) -> None:
    data = tmp_path / "data"
    first = BrokerProcess(data, tmp_path / "broker.log")
    processes.append(first.start())
    db = database_pid(first)

    assert first.proc is not None
    assert_one_clear_line(run_manager(data), "another running manager", str(first.proc.pid))
    assert psutil.pid_exists(db)
    assert_refuses_strangers(database_port(first))
    with urllib.request.urlopen(first.url + "/ready", timeout=10) as r:  # noqa: S310
        assert r.status == 200
    assert first.stop() == 0


def test_a_start_up_failure_is_one_line_without_traceback(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "db").write_text("not a directory")
    assert_one_clear_line(run_manager(data), "cannot prepare the database directory")

    # DATA_DIR itself unusable: a configuration error (status 2).
    assert_one_clear_line(
        run_manager(data / "db"), "DATA_DIR", prefix="osb-backup-manager: ", status=2
    )

    # The manager's own port taken: after the database started, so that is stopped again.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # (Background loops off: their stop right after a start can hang, a separate bug.)
        result = run_manager(tmp_path / "fresh", PORT=str(port), BACKGROUND_ENABLED="false")
    assert_one_clear_line(
        result, "cannot listen on", "PORT", prefix="osb-backup-manager: ", status=1
    )
    assert not databases_on(tmp_path / "fresh")
