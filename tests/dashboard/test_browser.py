"""The dashboard as people use it, in headless Chromium: sign in through the UAA, create a
plan, back up, watch the job succeed, restore; a reader sees no change controls and cannot
change anything; a forged post is refused; tenant names stay text."""

from __future__ import annotations

import re

import aiohttp
from playwright.async_api import BrowserContext, Page, expect

from backup import jobs
from tests.dashboard.conftest import CLIENT_ID, HOSTILE, Dashboard, screenshot
from tests.servers.broker import BROKER_PASSWORD, BROKER_USER


async def sign_in(context: BrowserContext, dashboard: Dashboard, user: str, url: str) -> Page:
    """Opens ``url``; the dashboard sends the browser through the UAA's sign-in and back."""
    page = await context.new_page()
    await page.goto(url)
    return page


async def test_provision_answers_the_dashboard_url(dashboard: Dashboard) -> None:
    assert dashboard.provision["dashboard_url"] == dashboard.instance_url
    catalog = await dashboard.service.osb("GET", "/v2/catalog")
    client = (await catalog.json())["services"][0]["dashboard_client"]
    assert client["id"] == CLIENT_ID
    assert client["redirect_uri"].endswith("/dashboard/callback")


async def test_sign_in_plan_backup_restore(context: BrowserContext, dashboard: Dashboard) -> None:
    dashboard.uaa.sign_in_as("dev-1")
    dashboard.cc.grant("dev-1", dashboard.instance_id, read=True, manage=True)
    page = await sign_in(context, dashboard, "dev-1", dashboard.instance_url)
    await expect(page.locator("h1")).to_have_text("Protection")
    assert page.url == dashboard.instance_url
    # The instance's hostile name is shown as text, not run or parsed.
    await expect(page.locator("header")).to_contain_text(HOSTILE)
    cookies = {c["name"]: c for c in await context.cookies()}
    session = cookies["bm_session"]
    assert session["httpOnly"] and session["sameSite"] == "Lax"
    assert "bm_sign_in" not in cookies  # the sign-in's state is used once
    await screenshot(page, "instance-empty")

    # A plan, created through the form.
    await page.click("text=Plans")
    await page.fill("input[name=name]", HOSTILE)
    await page.fill("input[name=frequency]", "0 3 * * *")
    await page.fill("input[name=retention_period]", "7")
    await page.click("button:has-text('Create plan')")
    row = page.locator("tr", has_text=HOSTILE)
    await expect(row).to_have_count(1)
    await screenshot(page, "plans")

    # Back up now: the job page follows it until it succeeds.
    await row.locator("button:has-text('Back up now')").click()
    await expect(page).to_have_url(re.compile(r"/jobs/[0-9a-f]+$"))
    await expect(page.locator(".job-status")).to_have_text("SUCCEEDED", timeout=60_000)
    await expect(page.locator("section h2").first).to_have_text("orders")
    await screenshot(page, "backup-job")

    # Restore: a confirmation names what will be overwritten.
    await page.click("text=Restore points")
    await screenshot(page, "restore-points")
    await page.click("text=Restore…")
    confirmation = page.locator(".overwrite")
    await expect(confirmation).to_contain_text("orders")
    await expect(confirmation).to_contain_text("customers")
    await expect(confirmation).to_contain_text(HOSTILE)
    await screenshot(page, "restore-confirm")
    await page.click("button:has-text('Overwrite and restore')")
    await expect(page.locator("h1")).to_have_text("Restore job")
    await expect(page.locator(".job-status")).to_have_text("SUCCEEDED", timeout=60_000)
    assert dashboard.agent.downloaded, "the agent was asked to restore"

    # The other pages.
    await page.click("text=Jobs")
    await expect(page.locator("td.SUCCEEDED")).to_have_count(2)
    await screenshot(page, "jobs")
    await page.click("text=Destinations")
    await page.click("button:has-text('Validate')")
    await expect(page.locator("p.status")).to_have_text("It works.", timeout=30_000)
    await screenshot(page, "destination-validation")
    await page.click("text=Plots")
    await expect(page.locator("svg rect")).not_to_have_count(0)
    await screenshot(page, "plots")
    await page.click("text=Protection")
    await expect(page.locator("text=Last successful backup")).to_be_visible()
    await screenshot(page, "instance")

    # Pause, from the plans page.
    await page.click("text=Plans")
    await page.locator("tr", has_text=HOSTILE).locator("button:has-text('Pause')").click()
    await expect(page.locator("tr", has_text=HOSTILE)).to_contain_text("(paused)")

    # Edit: the form shows the plan as it is; the change is saved.
    await page.locator("tr", has_text=HOSTILE).locator("text=Edit").click()
    await expect(page.locator("input[name=frequency]")).to_have_value("0 3 * * *")
    await page.fill("input[name=frequency]", "30 4 * * *")
    await page.click("button:has-text('Save')")
    await expect(page.locator("tr", has_text=HOSTILE)).to_contain_text("30 4 * * *")

    # Signing out ends the session: the next page asks the UAA again.
    await page.click("button:has-text('Sign out')")
    await expect(page.locator("h1")).to_have_text("Signed out")
    dashboard.uaa.sign_in_as(None)
    response = await page.goto(dashboard.instance_url)
    assert response is not None and response.status == 401  # the UAA's, nobody signs in


async def test_reader_sees_no_change_controls_and_cannot_change(
    context: BrowserContext, dashboard: Dashboard
) -> None:
    service, instance_id = dashboard.service, dashboard.instance_id
    response = await service.http.post(
        f"{service.url}/v1/service_instances/{instance_id}/plans",
        headers={"Authorization": aiohttp.encode_basic_auth(BROKER_USER, BROKER_PASSWORD)},
        json={
            "name": "nightly",
            "destination_id": (await service.db.destinations.find_one({}))["_id"],
            "frequency": "0 3 * * *",
            "retention": {"style": "DAYS", "period": 7},
        },
    )
    plan = await response.json()
    assert response.status == 201, plan
    dashboard.uaa.sign_in_as("reader-1")
    dashboard.cc.grant("reader-1", instance_id, read=True, manage=False)
    page = await sign_in(context, dashboard, "reader-1", dashboard.instance_url + "/plans")
    await expect(page.locator("tr", has_text="nightly")).to_have_count(1)
    assert await page.locator("main form").count() == 0
    assert await page.locator("main button").count() == 0
    await page.click("text=Destinations")
    assert await page.locator("main button").count() == 0
    await screenshot(page, "reader-plans")

    # A post the page did not offer: refused (the reader may not manage), nothing queued.
    csrf = await page.locator("header input[name=csrf]").get_attribute("value")
    run = f"{dashboard.instance_url}/plans/{plan['id']}/run"
    refused = await page.request.post(run, form={"csrf": csrf or ""}, max_redirects=0)
    assert refused.status == 403
    assert await service.db.jobs.count_documents({}) == 0


async def test_forged_post_without_the_csrf_token_is_refused(
    context: BrowserContext, dashboard: Dashboard
) -> None:
    service, instance_id = dashboard.service, dashboard.instance_id
    dashboard.uaa.sign_in_as("dev-2")
    dashboard.cc.grant("dev-2", instance_id, read=True, manage=True)
    page = await sign_in(context, dashboard, "dev-2", dashboard.instance_url + "/plans")
    await expect(page.locator("h1")).to_have_text("Plans")
    dest = await service.db.destinations.find_one({})
    form = {
        "name": "forged",
        "destination_id": dest["_id"],
        "frequency": "0 3 * * *",
        "retention_style": "DAYS",
        "retention_period": "7",
    }
    plans_url = dashboard.instance_url + "/plans"
    # The session cookie goes along (as from another site's form), the token does not.
    forged = await page.request.post(plans_url, form=form, max_redirects=0)
    assert forged.status == 403
    wrong = await page.request.post(plans_url, form={**form, "csrf": "x" * 43}, max_redirects=0)
    assert wrong.status == 403
    assert await service.db.plans.count_documents({}) == 0
    # JSON, the API's way, is no way round it either.
    as_json = await page.request.post(plans_url, data=form, max_redirects=0)
    assert as_json.status == 403
    assert await service.db.jobs.count_documents({"status": jobs.JobStatus.QUEUED}) == 0


async def test_sign_in_refuses_a_foreign_state_and_open_redirects(
    context: BrowserContext, dashboard: Dashboard
) -> None:
    dashboard.uaa.sign_in_as("dev-3")
    dashboard.cc.grant("dev-3", dashboard.instance_id, read=True, manage=True)
    page = await context.new_page()
    # A callback this browser did not start (a login CSRF): refused.
    response = await page.goto(f"{dashboard.service.url}/dashboard/callback?code=x&state=y")
    assert response is not None and response.status == 400
    # next= pointing elsewhere ends on the dashboard's own home, not on the other site.
    for target in ("//evil.example/x", "https://evil.example/", "/dashboard/\\evil.example"):
        await page.goto(f"{dashboard.service.url}/dashboard/login?next={target}")
        assert page.url == f"{dashboard.service.url}/dashboard/", target
    await expect(page.locator("h1")).to_have_text("Open an instance")


async def test_operator_sees_the_fleet(context: BrowserContext, dashboard: Dashboard) -> None:
    dashboard.uaa.sign_in_as("operator-1", scope=["openid", "backup_manager.admin"])
    page = await sign_in(context, dashboard, "operator-1", f"{dashboard.service.url}/dashboard/")
    await expect(page.locator("h1")).to_have_text("Fleet")
    row = page.locator("tr", has_text=dashboard.instance_id)
    await expect(row).to_contain_text(HOSTILE)
    await screenshot(page, "fleet")
    await row.locator("a").first.click()
    await expect(page.locator("h1")).to_have_text("Protection")


async def test_a_user_without_access_sees_not_found(
    context: BrowserContext, dashboard: Dashboard
) -> None:
    dashboard.uaa.sign_in_as("stranger")
    page = await context.new_page()
    response = await page.goto(dashboard.instance_url)
    assert response is not None and response.status == 404
    await expect(page.locator("h1")).to_have_text("Not found")
