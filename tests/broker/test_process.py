"""``python -m broker`` as an operator runs it: embedded database started and stopped with it,
``PORT`` and the broker credentials from the environment, a clear exit for bad configuration,
a graceful stop on SIGTERM that lets an in-flight request finish, data kept across restarts."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.broker.conftest import SERVICE_ID, STANDARD, go_parameters, provision_body
from tests.runner.go_agent import GoAgentStandIn
from tests.servers.broker import TEST_EGRESS
from tests.servers.log_audit import audit_secret
from tests.servers.ports import free_port, wait_listening
from tests.servers.process import terminate

ROOT = Path(__file__).resolve().parents[2]
USER, PASSWORD = "platform", audit_secret("proc-broker-PW-8812")


class BrokerProcess:
    def __init__(self, data_dir: Path, log: Path, **env: str) -> None:
        self.port = free_port()
        self.log = log
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in ("MONGODB_URL", "VCAP_SERVICES")},
            "PORT": str(self.port),
            "BROKER_USERNAME": USER,
            "BROKER_PASSWORD": PASSWORD,
            "DATA_DIR": str(data_dir),
            "SHUTDOWN_TIMEOUT": "30",
            **TEST_EGRESS,  # the agents and storage of these tests listen on 127.0.0.1
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> BrokerProcess:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "broker"], cwd=ROOT, env=self.env, stdout=out, stderr=out
            )
        wait_listening(self.port, timeout=60, proc=self.proc)
        return self

    def stop(self) -> int:
        assert self.proc is not None
        return terminate(self.proc, 60)

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out


@pytest.fixture
def processes() -> Iterator[list[BrokerProcess]]:
    started: list[BrokerProcess] = []
    yield started
    for p in started:
        if p.proc is not None and p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()


def osb_headers() -> dict[str, str]:
    return {
        "X-Broker-API-Version": "2.17",
        "Authorization": aiohttp.encode_basic_auth(USER, PASSWORD),
    }


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


async def test_runs_on_embedded_defaults_and_stops_gracefully(
    tmp_path: Path, processes: list[BrokerProcess], go_agent: GoAgentStandIn
) -> None:
    data = tmp_path / "data"
    broker = BrokerProcess(data, tmp_path / "broker.log", DESTINATION_VALIDATE_TIMEOUT="5")
    processes.append(broker.start())
    iid = str(uuid.uuid4())
    async with aiohttp.ClientSession(headers=osb_headers()) as http:
        async with http.get(broker.url + "/ready") as r:
            assert r.status == 200
        async with http.get(broker.url + "/v2/catalog") as r:
            assert r.status == 200 and (await r.json())["services"][0]["id"] == SERVICE_ID
        url = f"{broker.url}/v2/service_instances/{iid}?accepts_incomplete=true"
        async with http.put(url, json=provision_body(go_parameters(go_agent))) as r:
            assert r.status == 202
        await wait_succeeded(http, broker.url, iid)

    started = next(x for x in broker.log_lines() if x["event"] == "embedded_database_started")
    db_port = started["port"]
    assert port_open(db_port)
    assert all("request_id" in x for x in broker.log_lines() if x["event"] == "request")

    # A request in flight when SIGTERM arrives is finished before the process exits: here a
    # destination check against a storage endpoint that accepts connections and never
    # answers, so the handler is busy until DESTINATION_VALIDATE_TIMEOUT.
    blackhole = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    hole = blackhole.sockets[0].getsockname()[1]
    check = {
        "type": "S3",
        "name": "probe",
        "endpoint": f"http://127.0.0.1:{hole}",
        "bucket": "never",
        "access_key_id": "AKPROBE",
        "secret_access_key": audit_secret("probe-secret-Key-991"),
    }
    async with aiohttp.ClientSession(headers=osb_headers()) as http:
        url = f"{broker.url}/v1/service_instances/{iid}/destinations/validate"
        in_flight = asyncio.ensure_future(http.post(url, json=check))
        await asyncio.sleep(1.5)
        assert not in_flight.done()
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGTERM)
        response = await asyncio.wait_for(in_flight, 60)
        assert response.status == 200, await response.text()
        assert (await response.json())["ok"] is False
        response.release()
    blackhole.close()
    assert await asyncio.to_thread(broker.proc.wait, 60) == 0
    assert not port_open(db_port), "the embedded database stops with the service"
    lines = broker.log_lines()
    assert [x["event"] for x in lines][-1] == "embedded_database_stopped"

    # Started again on the same data directory: the instance is there.
    again = BrokerProcess(data, tmp_path / "broker-2.log")
    processes.append(again.start())
    async with aiohttp.ClientSession(headers=osb_headers()) as http:
        async with http.get(f"{again.url}/v2/service_instances/{iid}") as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["plan_id"] == STANDARD
    assert again.stop() == 0


async def wait_succeeded(http: aiohttp.ClientSession, base: str, iid: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        async with http.get(f"{base}/v2/service_instances/{iid}/last_operation") as r:
            assert r.status == 200
            state = (await r.json())["state"]
        if state != "in progress":
            assert state == "succeeded"
            return
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"PORT": "eighty"}, "PORT"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
        ({"MONGODB_URL": "http://db"}, "MONGODB_URL"),
        ({"CATALOG_PATH": "/nonexistent/catalog.yml"}, "CATALOG_PATH"),
        ({"SECRETS_MASTER_KEYS": "k1:short"}, "SECRETS_MASTER_KEYS"),
    ],
)
def test_bad_configuration_exits_with_a_clear_message(
    tmp_path: Path, env: dict[str, str], variable: str
) -> None:
    environ = {
        **{k: v for k, v in os.environ.items() if k not in ("MONGODB_URL", "VCAP_SERVICES")},
        "DATA_DIR": str(tmp_path),
        **env,
    }
    result = subprocess.run(
        [sys.executable, "-m", "broker"],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    err = result.stderr.decode()
    assert variable in err and "Traceback" not in err
    assert re.search(r"osb-backup-manager: invalid", err) or variable in err
