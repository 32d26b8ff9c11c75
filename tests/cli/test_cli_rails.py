"""``osb-backup`` for retention's rails, pins, drills, protection and webhooks, against the
real manager (the same rig as test_cli.py)."""

from __future__ import annotations

from storage import S3Settings
from tests.cli.conftest import INSTANCE_NAME, Cli
from tests.servers.log_audit import audit_secret

HOOK_SECRET = "cli-hook-Secret-0123456789"
audit_secret(HOOK_SECRET, "tests.cli.test_cli_rails.HOOK_SECRET")


async def _destination(cli: Cli, s3_settings: S3Settings) -> None:
    created = await cli(
        "destinations", "create", INSTANCE_NAME, "main",
        "--endpoint", str(s3_settings.endpoint), "--bucket", s3_settings.bucket,
        "--access-key-id", s3_settings.access_key_id, "--secret-file", "-",
        input=s3_settings.secret_access_key.get_secret_value(),
    )  # fmt: skip
    assert created.code == 0, created.text


async def test_gfs_retention_preview_confirmation_pins_drill_and_protection(
    cli: Cli, s3_settings: S3Settings
) -> None:
    await _destination(cli, s3_settings)
    none = await cli(
        "plans", "create", INSTANCE_NAME, "gfs", "-d", "main", "--schedule", "0 3 * * *"
    )  # fmt: skip
    assert none.code == 2 and "--keep-daily" in none.stderr, none.text
    plan = await cli(
        "plans", "create", INSTANCE_NAME, "gfs", "-d", "main", "--schedule", "0 3 * * *",
        "--keep-daily", "7", "--keep-weekly", "4", "--min-good", "3", "--rpo", "26h",
        "--drill-schedule", "0 5 * * 0",
    )  # fmt: skip
    assert plan.code == 0, plan.text
    assert "7 daily, 4 weekly; at least 3 good" in plan.stdout
    assert "None" not in plan.stdout and "26h" in plan.stdout and "0 5 * * 0" in plan.stdout
    listed = await cli("plans", "list", INSTANCE_NAME)
    assert "7 daily, 4 weekly; at least 3 good" in listed.stdout, listed.text
    shown = await cli("--json", "plans", "show", INSTANCE_NAME, "gfs")
    assert shown.json()["retention"] == {"daily": 7, "weekly": 4, "min_good": 3}
    assert shown.json()["rpo_seconds"] == 26 * 3600
    assert shown.json()["drill"]["frequency"] == "0 5 * * 0"

    points = []
    for _ in range(3):
        done = await cli("--json", "backup", INSTANCE_NAME, "--wait")
        assert done.code == 0, done.text
        points.append(done.json()["restore_point_id"])
    # min_good 3 keeps all three; a proposed FILES 1 without it deletes the two older ones
    preview = await cli(
        "plans", "retention-preview", INSTANCE_NAME, "gfs", "--keep", "1", "--keep-unit",
        "backups",
    )  # fmt: skip
    assert preview.code == 0, preview.text
    assert "2 of 3 restore points would be deleted, 1 kept" in preview.stdout
    assert preview.stdout.count("delete") >= 2 and "newest" in preview.stdout
    saved = await cli("--json", "plans", "retention-preview", INSTANCE_NAME, "gfs")
    assert saved.json()["to_delete"] == 0 and saved.json()["proposed"] is False

    # a change deleting 2 of 3 asks; "no" changes nothing
    change = (
        "plans", "edit", INSTANCE_NAME, "gfs", "--keep", "1", "--keep-unit", "backups",
        "--keep-daily", "0", "--keep-weekly", "0", "--min-good", "0",
    )  # fmt: skip
    refused = await cli(*change, input="n\n")
    assert refused.code == 6, refused.text
    assert "would delete 2 of plan gfs's 3 restore points" in refused.stderr
    unchanged = await cli("--json", "plans", "show", INSTANCE_NAME, "gfs")
    assert unchanged.json()["retention"] == {"daily": 7, "weekly": 4, "min_good": 3}

    # a pin keeps one of them whatever the rules
    pinned = await cli(
        "restore-points", "pin", INSTANCE_NAME, points[0], "--reason", "legal hold #42"
    )
    assert pinned.code == 0 and "pinned" in pinned.stderr, pinned.text
    point = await cli("restore-points", "show", INSTANCE_NAME, points[0])
    assert "pinned" in point.stdout and "legal hold #42" in point.stdout, point.text
    listed_points = await cli("restore-points", "list", INSTANCE_NAME)
    assert "available, pinned" in listed_points.stdout
    kept = await cli("restore-points", "delete", INSTANCE_NAME, points[0], "--yes")
    assert kept.code == 6 and "(restore_point_pinned)" in kept.stderr, kept.text

    applied = await cli(*change, "--yes")
    assert applied.code == 0, applied.text
    assert "1 backups" in applied.stdout and "daily" not in applied.stdout
    unpinned = await cli("restore-points", "unpin", INSTANCE_NAME, points[0])
    assert unpinned.code == 0 and "unpinned" in unpinned.stderr, unpinned.text

    drill = await cli("drill", INSTANCE_NAME, "gfs", "--wait")
    assert drill.code == 0, drill.text
    assert "Drill job" in drill.stdout and "passed" in drill.stdout
    by_point = await cli("--json", "drill", INSTANCE_NAME, "--point", points[-1], "--wait")
    assert by_point.code == 0, by_point.text
    assert by_point.json()["drill"]["outcome"] == "passed"
    after = await cli("plans", "show", INSTANCE_NAME, "gfs")
    assert "passed" in after.stdout, after.text
    neither = await cli("drill", INSTANCE_NAME)
    assert neither.code == 2 and "--point" in neither.stderr

    state = await cli("protection", INSTANCE_NAME)
    assert state.code == 0, state.text
    assert "Instance protected" in state.stdout and "gfs" in state.stdout, state.text
    assert "26h" in state.stdout
    as_json = await cli("--json", "protection", INSTANCE_NAME)
    assert [p["name"] for p in as_json.json()["plans"]] == ["gfs"]


async def test_webhooks_take_their_secret_from_a_file_and_never_show_it(
    cli: Cli, s3_settings: S3Settings
) -> None:
    nothing = await cli("webhooks", "list", INSTANCE_NAME)
    assert nothing.code == 0, nothing.text
    wrong = await cli(
        "webhooks", "create", INSTANCE_NAME, "--url", "http://127.0.0.1:9/hooks",
        "--event", "job.sent", "--secret-file", "-", input=HOOK_SECRET,
    )  # fmt: skip
    assert wrong.code == 2 and "job.sent" in wrong.stderr, wrong.text
    created = await cli(
        "--json", "webhooks", "create", INSTANCE_NAME, "--url", "http://127.0.0.1:9/hooks",
        "-e", "job.succeeded", "-e", "job.failed", "--secret-file", "-",
        "--description", "pager", input=HOOK_SECRET,
    )  # fmt: skip
    assert created.code == 0, created.text
    hook = created.json()
    assert hook["secret_set"] is True and HOOK_SECRET not in created.text
    assert hook["events"] == ["job.succeeded", "job.failed"]
    from_env = await cli(
        "webhooks", "create", INSTANCE_NAME, "--url", "http://127.0.0.1:9/other",
        "-e", "drill.failed", env={"OSB_BACKUP_WEBHOOK_SECRET": HOOK_SECRET},
    )  # fmt: skip
    assert from_env.code == 0 and "Webhook" in from_env.stderr, from_env.text
    assert HOOK_SECRET not in from_env.text
    listed = await cli("webhooks", "list", INSTANCE_NAME)
    assert "http://127.0.0.1:9/hooks" in listed.stdout and "pager" in listed.stdout
    shown = await cli("webhooks", "show", INSTANCE_NAME, hook["id"])
    assert "secret" in shown.stdout and " set" in shown.stdout and HOOK_SECRET not in shown.text

    await _destination(cli, s3_settings)
    plan = await cli(
        "plans", "create", INSTANCE_NAME, "nightly", "-d", "main",
        "--schedule", "0 3 * * *", "--keep", "7",
    )  # fmt: skip
    assert plan.code == 0, plan.text
    assert (await cli("backup", INSTANCE_NAME, "--wait")).code == 0
    deliveries = await cli("--json", "webhooks", "deliveries", INSTANCE_NAME, hook["id"])
    assert deliveries.code == 0, deliveries.text
    assert [d["event_type"] for d in deliveries.json()] == ["job.succeeded"]
    table = await cli("webhooks", "deliveries", INSTANCE_NAME, hook["id"])
    assert "job.succeeded" in table.stdout, table.text

    refused = await cli("webhooks", "delete", INSTANCE_NAME, hook["id"], input="n\n")
    assert refused.code == 6
    removed = await cli("webhooks", "delete", INSTANCE_NAME, hook["id"], "--yes")
    assert removed.code == 0 and "deleted" in removed.stderr, removed.text
    gone = await cli("webhooks", "show", INSTANCE_NAME, hook["id"])
    assert gone.code == 4, gone.text
