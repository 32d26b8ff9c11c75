"""The ``osb-backup`` CLI against the real manager (in-process, with its runner), the Go
agent's stand-in, a real S3 server, and the UAA and Cloud Controller stand-ins.

The CLI runs as users run it: the installed console script in a subprocess (the manager
shares the test's event loop and logs to standard output, so an in-process CliRunner would
both block the loop and capture the manager's log lines), with a ``cf`` CLI config of its
own under ``CF_HOME``."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from backup.database import Document
from broker.context import SECRETS
from tests.runner.conftest import seed_instance
from tests.runner.go_agent import GoAgentStandIn
from tests.servers.broker import Service, start_service, stop_service
from tests.servers.cloud_controller import CloudController, cloud_controller  # noqa: F401
from tests.servers.log_audit import audit_secret
from tests.servers.uaa import Uaa, uaa  # noqa: F401

USER = "alice"
SPACE_GUID, SPACE_NAME = "5f0c1a52-0d55-4c8e-9d38-6b5c4c2d1e01", "dev"
INSTANCE_NAME = "orders-db"
OPERATOR, OPERATOR_PASSWORD = "ops", "operator-PW-5521-xy"
audit_secret(OPERATOR_PASSWORD, "tests.cli.conftest.OPERATOR_PASSWORD")
SCRIPT = shutil.which("osb-backup", path=str(Path(sys.executable).parent)) or "osb-backup"
"""The installed console script (``pip install -e .`` puts it beside the interpreter)."""


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    @property
    def text(self) -> str:
        return self.stdout + self.stderr


@dataclass
class Cli:
    """The manager and stand-ins, one instance (``INSTANCE_NAME`` in the targeted space, which
    ``USER`` may manage) and the CLI's environment."""

    service: Service
    uaa: Uaa
    cc: CloudController
    agent: GoAgentStandIn
    instance: Document
    home: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def config_path(self) -> Path:
        return self.home / ".cf" / "config.json"

    def config(self) -> dict[str, Any]:
        return dict(json.loads(self.config_path.read_text()))

    def log_in(self, user: str = USER, *, expires_in: int = 600, refresh: str | None = None) -> str:
        """Write a cf config as ``cf login`` leaves it; its refresh token."""
        refresh = refresh or self.uaa.refresh_token(user)
        config = {
            "ConfigVersion": 3,
            "Target": self.cc.url,
            "APIVersion": "3.180.0",
            "AuthorizationEndpoint": self.uaa.url,
            "DopplerEndPoint": "wss://doppler.example.com:443",
            "UaaEndpoint": self.uaa.url,
            "UAAEndpoint": self.uaa.url,
            "AccessToken": "bearer " + self.uaa.token(user, expires_in=expires_in),
            "RefreshToken": refresh,
            "UAAOAuthClient": "cf",
            "UAAOAuthClientSecret": "",
            "SSLDisabled": False,
            "TargetedOrganization": {"GUID": "org-guid", "Name": "acme"},
            "TargetedSpace": {"GUID": SPACE_GUID, "Name": SPACE_NAME, "AllowSSH": True},
        }
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(config, indent=2))
        self.config_path.chmod(0o600)
        return refresh

    async def __call__(
        self, *args: str, input: str | None = None, env: dict[str, str] | None = None
    ) -> Outcome:
        """Run ``osb-backup args`` to its end."""
        environ = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(self.home),
            "CF_HOME": str(self.home),
            "OSB_BACKUP_URL": self.service.url,
            "COLUMNS": "200",
            **self.env,
            **(env or {}),
        }
        proc = await asyncio.create_subprocess_exec(
            SCRIPT,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=environ,
        )
        stdout, stderr = await asyncio.wait_for(
            proc.communicate(input.encode() if input is not None else None), timeout=120
        )
        assert proc.returncode is not None
        return Outcome(proc.returncode, stdout.decode(), stderr.decode())


@pytest.fixture
async def cli(
    mongo_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    uaa: Uaa,  # noqa: F811
    cloud_controller: CloudController,  # noqa: F811
) -> AsyncIterator[Cli]:
    for name, value in {
        "OIDC_ISSUER": uaa.issuer,
        "OIDC_AUDIENCE": "backup_manager",
        "CLOUD_CONTROLLER_URL": cloud_controller.url,
        "JWKS_MIN_REFRESH_SECONDS": "0",
        "OPERATOR_USERNAME": OPERATOR,
        "OPERATOR_PASSWORD": OPERATOR_PASSWORD,
        "RUNNER_AGENT_POLL_MIN_SECONDS": "0.1",
        "RUNNER_AGENT_POLL_MAX_SECONDS": "0.3",
        "WEBHOOK_ALLOW_HTTP": "true",  # the webhook commands' test points at 127.0.0.1
    }.items():
        monkeypatch.setenv(name, value)
    agent = await GoAgentStandIn().start()
    service = await start_service(mongo_url, tmp_path, loops=True)
    try:
        instance = await seed_instance(service.db, service.app[SECRETS], agent_url=agent.url)
        cloud_controller.add_space(SPACE_GUID, SPACE_NAME)
        cloud_controller.add_instance(instance["_id"], INSTANCE_NAME, SPACE_GUID)
        cloud_controller.grant(USER, instance["_id"], read=True, manage=True)
        home = tmp_path / "home"
        home.mkdir()
        rig = Cli(service, uaa, cloud_controller, agent, instance, home)
        rig.log_in()
        yield rig
    finally:
        await stop_service(service)
        await agent.stop()
