"""The dashboard in a real browser: Debian's Chromium, headless, driven by Playwright (no
browser download), against the service with its background loops, the UAA and Cloud
Controller stand-ins, the Go agent's stand-in and the suite's S3 server. Screenshots of the
main pages go to tests/output/dashboard/ (gitignored: a run's artefacts, which CI keeps)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

from storage import S3Settings
from tests.conftest import skip_unless_available
from tests.runner.go_agent import PASSWORD as GO_PASSWORD
from tests.runner.go_agent import USER as GO_USER
from tests.runner.go_agent import GoAgentStandIn
from tests.servers.broker import (
    BROKER_PASSWORD,
    BROKER_USER,
    Service,
    start_service,
    stop_service,
)
from tests.servers.cloud_controller import CloudController, cloud_controller  # noqa: F401
from tests.servers.log_audit import audit_secret
from tests.servers.uaa import Uaa, uaa  # noqa: F401

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).resolve().parents[1] / "output" / "dashboard"
SERVICE_ID = "a2cc3ad7-d439-406d-9c62-e2be817c72fe"
STANDARD = "969e6b3d-4200-4f87-b552-cbc6882e7c95"
CLIENT_ID = "backup-manager-dashboard"
CLIENT_SECRET = "dashboard-client-secret-Hq27"
HOSTILE = '<img src=x onerror="alert(1)">"\'&'
"""A tenant's name as an attacker would choose it: pages must show it as text."""

DB_PASSWORD = "dashboard-db-password-Vb58"
audit_secret(CLIENT_SECRET, "tests.dashboard.conftest.CLIENT_SECRET")
audit_secret(DB_PASSWORD, "tests.dashboard.conftest.DB_PASSWORD")


@dataclass
class Dashboard:
    service: Service
    uaa: Uaa
    cc: CloudController
    agent: GoAgentStandIn
    instance_id: str
    provision: dict[str, Any]
    """The OSB provision's answer (it carries the dashboard_url)."""

    @property
    def instance_url(self) -> str:
        return f"{self.service.url}/dashboard/instances/{self.instance_id}"


async def _provision(service: Service, agent: GoAgentStandIn, instance_id: str) -> dict[str, Any]:
    response = await service.osb(
        "PUT",
        f"/v2/service_instances/{instance_id}?accepts_incomplete=true",
        json={
            "service_id": SERVICE_ID,
            "plan_id": STANDARD,
            "context": {"platform": "cloudfoundry", "instance_name": HOSTILE},
            "parameters": {
                "agent": {"url": agent.url, "username": GO_USER, "password": GO_PASSWORD},
                "database": {
                    "host": "127.0.0.1",
                    "port": 5432,
                    "username": "dbuser",
                    "password": DB_PASSWORD,
                },
                "items": ["orders", "customers"],
            },
        },
    )
    body: dict[str, Any] = await response.json()
    assert response.status == 202, body
    for _ in range(200):
        state = await service.osb("GET", f"/v2/service_instances/{instance_id}/last_operation")
        operation = await state.json()
        if operation["state"] != "in progress":
            assert operation["state"] == "succeeded", operation
            return body
        await asyncio.sleep(0.1)
    raise AssertionError("provisioning did not finish")


async def _destination(service: Service, instance_id: str, s3: S3Settings) -> None:
    response = await service.http.post(
        f"{service.url}/v1/service_instances/{instance_id}/destinations",
        headers={"Authorization": aiohttp.encode_basic_auth(BROKER_USER, BROKER_PASSWORD)},
        json={
            "type": "S3",
            "name": HOSTILE,
            "endpoint": s3.endpoint,
            "region": s3.region,
            "bucket": s3.bucket,
            "access_key_id": s3.access_key_id,
            "secret_access_key": s3.secret_access_key.get_secret_value(),
            "addressing_style": "path",
        },
    )
    assert response.status == 201, await response.text()


@pytest.fixture
async def dashboard(
    mongo_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    uaa: Uaa,  # noqa: F811
    cloud_controller: CloudController,  # noqa: F811
    s3_settings: S3Settings,
) -> AsyncIterator[Dashboard]:
    for name, value in {
        "OIDC_ISSUER": uaa.issuer,
        "OIDC_AUDIENCE": "backup_manager",
        "CLOUD_CONTROLLER_URL": cloud_controller.url,
        "OPERATOR_SCOPE": "backup_manager.admin",
        "RUNNER_AGENT_POLL_MIN_SECONDS": "0.2",
        "RUNNER_AGENT_POLL_MAX_SECONDS": "0.5",
        "RUNNER_POLL_SECONDS": "0.5",
    }.items():
        monkeypatch.setenv(name, value)
    agent = await GoAgentStandIn().start()
    service = await start_service(
        mongo_url, tmp_path, loops=True, DASHBOARD_CLIENT_SECRET=CLIENT_SECRET
    )
    uaa.register_client(CLIENT_ID, CLIENT_SECRET, f"{service.url}/dashboard/callback")
    instance_id = str(uuid.uuid4())
    try:
        provision = await _provision(service, agent, instance_id)
        await _destination(service, instance_id, s3_settings)
        yield Dashboard(service, uaa, cloud_controller, agent, instance_id, provision)
    finally:
        await stop_service(service)
        await agent.stop()


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    if not Path(CHROMIUM).exists():  # noqa: ASYNC240 (once per session, before any I/O)
        skip_unless_available(f"Debian's Chromium ({CHROMIUM}; make install-test installs it)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield launched
        await launched.close()


@pytest.fixture
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    """A fresh browser profile (no cookies) for one test; a script's alert fails the test."""
    ctx = await browser.new_context()
    ctx.set_default_timeout(20_000)
    dialogs: list[str] = []
    ctx.on("page", lambda page: page.on("dialog", lambda dialog: dialogs.append(dialog.message)))
    yield ctx
    await ctx.close()
    assert not dialogs, f"a page ran a script: {dialogs}"


async def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
