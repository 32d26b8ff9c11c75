"""The dashboard's side of retention's rails, pins, drills and protection, in headless
Chromium against the real service (the same rig as test_browser.py): the instance page shows
the protection state with its reasons and each plan's last drill, GFS retention reads in
words, a plan edit that would delete most points asks first (as the API's 409 does), and
restore points can be pinned and unpinned."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from playwright.async_api import BrowserContext, expect

from tests.dashboard.conftest import Dashboard, screenshot
from tests.dashboard.test_browser import sign_in
from tests.servers.broker import BROKER_PASSWORD, BROKER_USER


async def _api(dashboard: Dashboard, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    service = dashboard.service
    response = await service.http.request(
        method,
        f"{service.url}/v1/service_instances/{dashboard.instance_id}{path}",
        headers={"Authorization": aiohttp.encode_basic_auth(BROKER_USER, BROKER_PASSWORD)},
        json=body,
    )
    return response.status, await response.json()


async def _ended(dashboard: Dashboard, job: dict[str, Any]) -> dict[str, Any]:
    for _ in range(600):
        status, found = await _api(dashboard, "GET", f"/jobs/{job['id']}")
        assert status == 200, found
        if found["status"] in ("SUCCEEDED", "FAILED", "CANCELLED", "MISSED"):
            return dict(found)
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job['id']} did not end")


async def test_protection_drill_gfs_confirmation_and_pins(
    context: BrowserContext, dashboard: Dashboard
) -> None:
    dest = await dashboard.service.db.destinations.find_one({})
    status, plan = await _api(
        dashboard,
        "POST",
        "/plans",
        {
            "name": "gfs",
            "destination_id": dest["_id"],
            "frequency": "0 3 * * *",
            "retention": {"daily": 7, "weekly": 4, "min_good": 3},
            "rpo_seconds": 26 * 3600,
        },
    )
    assert status == 201, plan
    points = []
    for _ in range(3):
        status, job = await _api(dashboard, "POST", "/backups", {"plan_id": plan["id"]})
        assert status == 202, job
        done = await _ended(dashboard, job)
        assert done["status"] == "SUCCEEDED", done
        points.append(done["restore_point_id"])
    status, drill = await _api(dashboard, "POST", f"/plans/{plan['id']}/drill")
    assert status == 202, drill
    assert (await _ended(dashboard, drill))["status"] == "SUCCEEDED"

    dashboard.uaa.sign_in_as("dev-rails")
    dashboard.cc.grant("dev-rails", dashboard.instance_id, read=True, manage=True)
    page = await sign_in(context, dashboard, "dev-rails", dashboard.instance_url)
    await expect(page.locator(".protection h2")).to_have_text("Overall: protected")
    row = page.locator("tr.plan", has_text="gfs")
    await expect(row.locator(".state")).to_have_text("protected")
    await expect(row).to_contain_text("objective 26h")
    await expect(row).to_contain_text("7 daily, 4 weekly; at least 3 good")
    await expect(row.locator("td.drill")).to_contain_text("passed")
    await screenshot(page, "instance-protection")

    await page.click("text=Plans")
    await expect(page.locator("tr", has_text="gfs")).to_contain_text(
        "7 daily, 4 weekly; at least 3 good"
    )
    assert "None" not in await page.locator("main table").inner_text()

    # An edit that would delete two of three points asks first; going back changes nothing.
    await page.locator("tr", has_text="gfs").locator("text=Edit").click()
    await expect(page.locator("input[name=retention_daily]")).to_have_value("7")

    async def keep_only_the_newest() -> None:
        await page.select_option("select[name=retention_style]", "FILES")
        await page.fill("input[name=retention_period]", "1")
        for name in ("daily", "weekly", "min_good"):
            await page.fill(f"input[name=retention_{name}]", "")
        await page.click("button:has-text('Save')")

    await keep_only_the_newest()
    question = page.locator(".would-delete")
    await expect(question).to_contain_text("would delete 2 of its 3 restore points")
    await screenshot(page, "plan-confirm")
    saved = await dashboard.service.db.plans.find_one({"_id": plan["id"]})
    assert saved["retention"] == {"daily": 7, "weekly": 4, "min_good": 3}
    await page.click("text=Back to the plan")
    await expect(page.locator("input[name=retention_daily]")).to_have_value("7")

    # A pin, with its reason, from the restore points page.
    await page.click("text=Restore points")
    oldest = page.locator("tr").last
    await oldest.locator("input[name=pin_reason]").fill("legal hold #42")
    await oldest.locator("button:has-text('Pin')").click()
    pinned = page.locator("tr", has_text="legal hold #42")
    await expect(pinned.locator(".pinned")).to_have_text("pinned")
    kept = await dashboard.service.db.restore_points.find_one({"_id": points[0]})
    assert kept["pinned"] is True and kept["pin_reason"] == "legal hold #42"
    # The dashboard's changes are in the audit trail as the API's are: who, what, the names of
    # the fields sent (never their values), only once they succeeded.
    trail = await dashboard.service.db.audit.find({"instance_id": dashboard.instance_id}).to_list()
    pins = [e for e in trail if e["action"] == "update_restore_point"]
    assert [e["resource"] for e in pins] == [{"kind": "restore points", "id": points[0]}]
    assert pins[0]["fields"] == ["pin_reason", "pinned"] and pins[0]["actor"]["kind"] == "user"
    assert "legal hold #42" not in str(trail)
    assert not [e for e in trail if e["action"] == "update_plan"]  # asked, not yet saved
    await screenshot(page, "restore-points-pinned")

    # With the oldest pinned, the same change deletes one point: saved without a question.
    await page.click("text=Plans")
    await page.locator("tr", has_text="gfs").locator("text=Edit").click()
    await keep_only_the_newest()
    await expect(page.locator("h1")).to_have_text("Plans")
    await expect(page.locator("tr", has_text="gfs")).to_contain_text("1 latest backups")
    saved = await dashboard.service.db.plans.find_one({"_id": plan["id"]})
    assert saved["retention"] == {"style": "FILES", "period": 1}

    # Unpin.
    await page.click("text=Restore points")
    await page.locator("tr", has_text="legal hold #42").locator("button:has-text('Unpin')").click()
    await expect(page.locator("tr", has_text="legal hold #42")).to_have_count(0)
    unpinned = await dashboard.service.db.restore_points.find_one({"_id": points[0]})
    assert unpinned is None or unpinned["pinned"] is False


async def test_a_confirmed_retention_change_is_saved(
    context: BrowserContext, dashboard: Dashboard
) -> None:
    dest = await dashboard.service.db.destinations.find_one({})
    status, plan = await _api(
        dashboard,
        "POST",
        "/plans",
        {
            "name": "short",
            "destination_id": dest["_id"],
            "frequency": "0 3 * * *",
            "retention": {"style": "FILES", "period": 5},
        },
    )
    assert status == 201, plan
    for _ in range(3):
        status, job = await _api(dashboard, "POST", "/backups", {"plan_id": plan["id"]})
        assert status == 202, job
        assert (await _ended(dashboard, job))["status"] == "SUCCEEDED"
    dashboard.uaa.sign_in_as("dev-confirm")
    dashboard.cc.grant("dev-confirm", dashboard.instance_id, read=True, manage=True)
    page = await sign_in(context, dashboard, "dev-confirm", f"{dashboard.instance_url}/plans")

    # Drill now, from the plans page: the job page follows the drill to its end.
    await page.locator("tr", has_text="short").locator("button:has-text('Drill now')").click()
    await expect(page.locator("h1")).to_have_text("Drill job")
    await expect(page.locator(".job-status")).to_have_text("SUCCEEDED", timeout=60_000)
    await page.click("text=Protection")
    await expect(page.locator("tr.plan", has_text="short").locator("td.drill")).to_contain_text(
        "passed"
    )
    await page.goto(f"{dashboard.instance_url}/plans/{plan['id']}")
    await page.fill("input[name=retention_period]", "1")
    await page.fill("input[name=frequency]", "30 4 * * *")
    await page.click("button:has-text('Save')")
    await expect(page.locator(".would-delete")).to_contain_text("would delete 2 of its 3")
    await page.click("button:has-text('Delete them and save')")
    await expect(page.locator("h1")).to_have_text("Plans")
    row = page.locator("tr", has_text="short")
    await expect(row).to_contain_text("1 latest backups")
    await expect(row).to_contain_text("30 4 * * *")  # the whole form was sent again

    # A rule without its number (or a number without its rule) is refused, nothing changed.
    csrf = await page.locator("header input[name=csrf]").get_attribute("value")
    form = {
        "csrf": csrf or "",
        "name": "short",
        "destination_id": dest["_id"],
        "frequency": "30 4 * * *",
        "retention_style": "DAYS",
        "retention_period": "",
        "retention_daily": "3",
    }
    url = f"{dashboard.instance_url}/plans/{plan['id']}"
    refused = await page.request.post(url, form=form, max_redirects=0)
    assert refused.status == 400
    assert "both a number and what it counts" in await refused.text()
    hostile = await page.request.post(
        url, form={**form, "retention_period": "7", "retention_daily": "1e9"}, max_redirects=0
    )
    assert hostile.status == 400 and "whole number" in await hostile.text()
    saved = await dashboard.service.db.plans.find_one({"_id": plan["id"]})
    assert saved["retention"] == {"style": "FILES", "period": 1}
