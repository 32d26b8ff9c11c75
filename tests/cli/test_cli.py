"""``osb-backup`` as its users run it, against the real manager."""

from __future__ import annotations

import os
import re
import stat
import subprocess

from typer.testing import CliRunner

from backup import bindings
from cli.app import app
from storage import S3Settings
from tests.cli.conftest import INSTANCE_NAME, OPERATOR, OPERATOR_PASSWORD, SCRIPT, Cli
from tests.servers.log_audit import audit_secret
from tests.servers.s3 import SeaweedS3


async def test_an_expired_cf_session_is_refreshed_and_the_instance_found_by_name(
    cli: Cli,
) -> None:
    refresh = cli.log_in(expires_in=-120)
    before = cli.config()
    first = await cli("items", INSTANCE_NAME)
    assert first.code == 0, first.text
    assert first.stdout.split() == ["ITEM", "orders", "customers"]
    assert cli.uaa.refresh_requests == 1 and cli.cc.lookups == 1
    # written back as the cf CLI does: a new access token, everything else as it was
    after = cli.config()
    assert after["AccessToken"] != before["AccessToken"]
    assert after["AccessToken"].startswith("bearer ") and after["RefreshToken"] == refresh
    assert {k: v for k, v in after.items() if k != "AccessToken"} == {
        k: v for k, v in before.items() if k != "AccessToken"
    }
    assert stat.S_IMODE(cli.config_path.stat().st_mode) == 0o600
    assert after["AccessToken"].split()[1] not in first.text and refresh not in first.text

    again = await cli("--json", "items", INSTANCE_NAME)
    assert again.code == 0 and again.json() == ["orders", "customers"]
    assert cli.uaa.refresh_requests == 1  # the refreshed token is used as it is


async def test_a_refused_refresh_token_says_to_log_in_again(cli: Cli) -> None:
    cli.log_in(expires_in=-120, refresh="revoked-r")
    result = await cli("items", INSTANCE_NAME)
    assert result.code == 3, result.text
    assert "cf session has expired" in result.stderr and "cf login" in result.stderr
    assert "Traceback" not in result.text


async def test_names_are_looked_up_in_the_targeted_space_only(cli: Cli) -> None:
    result = await cli("plans", "list", "someone-elses-db")
    assert result.code == 4, result.text
    assert "no service instance named 'someone-elses-db' in space 'dev'" in result.stderr
    # a GUID is used as it is; one the user may not see is the API's 404
    result = await cli("plans", "list", "0b5d3c2e-9a1f-4c1e-8f6a-2d3b4c5d6e7f")
    assert result.code == 4 and "(instance_not_found)" in result.stderr


async def test_back_up_with_wait_then_restore(
    cli: Cli, s3_settings: S3Settings, s3_server: SeaweedS3
) -> None:
    secret = s3_settings.secret_access_key.get_secret_value()
    where = ["--endpoint", str(s3_settings.endpoint), "--bucket", s3_settings.bucket]
    wrong = await cli(
        "destinations", "create", INSTANCE_NAME, "main", *where,
        "--access-key-id", "nobody", "--secret-file", "-", "--check-only",
        input="not-the-secret-key\n",
    )  # fmt: skip
    assert wrong.code == 1 and "failed" in wrong.stdout, wrong.text
    nothing = await cli("--json", "destinations", "list", INSTANCE_NAME)
    assert nothing.code == 0 and nothing.json() == []
    created = await cli(
        "destinations",
        "create",
        INSTANCE_NAME,
        "main",
        "--endpoint",
        str(s3_settings.endpoint),
        "--bucket",
        s3_settings.bucket,
        "--access-key-id",
        s3_settings.access_key_id,
        "--secret-file",
        "-",
        input=secret + "\n",
    )
    assert created.code == 0, created.text
    assert "Destination main created" in created.stderr and secret not in created.text
    shown = await cli("--json", "destinations", "show", INSTANCE_NAME, "main")
    assert shown.json()["secret_access_key_set"] is True and secret not in shown.text
    checked = await cli("destinations", "validate", INSTANCE_NAME, "main")
    assert checked.code == 0 and "ok" in checked.stdout, checked.text

    plan = await cli(
        "plans", "create", INSTANCE_NAME, "nightly", "-d", "main",
        "--schedule", "0 3 * * *", "--timezone", "Europe/Berlin", "--keep", "7",
    )  # fmt: skip
    assert plan.code == 0, plan.text
    assert "0 3 * * * (Europe/Berlin)" in plan.stdout and "7 days" in plan.stdout
    paused = await cli("plans", "pause", INSTANCE_NAME, "nightly")
    assert paused.code == 0 and "Plan nightly paused." in paused.stderr
    listed = await cli("--json", "plans", "list", INSTANCE_NAME)
    assert [p["paused"] for p in listed.json()] == [True]
    resumed = await cli("plans", "resume", INSTANCE_NAME, "nightly")
    assert resumed.code == 0 and "resumed; next run" in resumed.stderr

    backup = await cli("backup", INSTANCE_NAME, "--wait")
    assert backup.code == 0, backup.text
    # progress, a line per change when not on a terminal, then the outcome (whether a poll
    # catches the job RUNNING depends on timing: the stand-in's backup takes milliseconds)
    progress = [line for line in backup.stderr.splitlines() if line.strip()]
    assert progress and "SUCCEEDED" in progress[-1], backup.stderr
    assert all(re.match(r"^ *\d+m\d\ds [A-Z]+: ", line) for line in progress), backup.stderr
    assert "1.4 KiB" in backup.stdout  # the stand-in's dump of 1,400 bytes per item
    assert "Backup job" in backup.stdout and "SUCCEEDED" in backup.stdout

    points = await cli("--json", "restore-points", "list", INSTANCE_NAME)
    assert points.code == 0, points.text
    (point,) = points.json()
    assert [item["name"] for item in point["items"]] == ["orders", "customers"]
    jobs = await cli("--json", "jobs", "list", INSTANCE_NAME, "--type", "backup")
    (job,) = jobs.json()
    assert job["status"] == "SUCCEEDED" and job["id"] == point["job_id"]
    logs = await cli("jobs", "logs", INSTANCE_NAME, job["id"], "--item", "orders")
    assert logs.code == 0 and "out-backup" in logs.stdout and "customers" not in logs.stdout

    restore = await cli(
        "restore", INSTANCE_NAME, "--from", point["id"], "--item", "customers", "--yes", "--wait"
    )
    assert restore.code == 0, restore.text
    assert "Restore job" in restore.stdout and "SUCCEEDED" in restore.stdout
    assert cli.agent.downloaded == [point["items"][1]["key"]]


async def test_a_failed_backup_exits_1_with_its_reason(cli: Cli, s3_settings: S3Settings) -> None:
    await _destination_and_plan(cli, s3_settings)
    cli.agent.fail_stage = "backup"
    result = await cli("backup", INSTANCE_NAME, "--plan", "nightly", "--wait")
    assert result.code == 1, result.text
    assert "FAILED: Item 'orders' failed: Executing the shell script failed" in result.stderr
    assert "osb-backup jobs logs" in result.stderr and "Traceback" not in result.text


async def test_api_errors_are_one_sentence_and_a_stable_exit_code(
    cli: Cli, s3_settings: S3Settings
) -> None:
    await _destination_and_plan(cli, s3_settings)
    bad = await cli(
        "plans", "create", INSTANCE_NAME, "hourly", "-d", "main",
        "--schedule", "*/5 * * * *", "--keep", "3",
    )  # fmt: skip
    assert bad.code == 6 and "(frequency_too_frequent)" in bad.stderr, bad.text
    missing = await cli("jobs", "show", INSTANCE_NAME, "no-such-job")
    assert missing.code == 4 and "(job_not_found)" in missing.stderr
    no_plan = await cli("backup", INSTANCE_NAME, "--plan", "weekly")
    assert no_plan.code == 4 and "no plan named or with the id 'weekly'" in no_plan.stderr

    cli.cc.grant("bob", cli.instance["_id"], read=True, manage=False)
    cli.log_in("bob")
    looked = await cli("plans", "list", INSTANCE_NAME)
    assert looked.code == 0 and "nightly" in looked.stdout, looked.text
    refused = await cli("plans", "pause", INSTANCE_NAME, "nightly")
    assert refused.code == 5 and "(forbidden)" in refused.stderr, refused.text

    down = await cli("items", INSTANCE_NAME, env={"OSB_BACKUP_URL": "http://127.0.0.1:9"})
    assert down.code == 7, down.text
    assert "Cannot reach the backup manager at http://127.0.0.1:9" in down.stderr
    unset = await cli("items", INSTANCE_NAME, env={"OSB_BACKUP_URL": ""})
    assert unset.code == 2 and "--url or set OSB_BACKUP_URL" in unset.stderr
    for result in (bad, missing, no_plan, refused, down, unset):
        assert "Traceback" not in result.text


async def test_operators_and_bindings_log_in_without_a_cf_session(cli: Cli) -> None:
    cli.config_path.unlink()
    instance_id = cli.instance["_id"]
    nobody = await cli("items", instance_id)
    assert nobody.code == 3 and "cf login" in nobody.stderr, nobody.text

    as_operator = {"OSB_BACKUP_OPERATOR_PASSWORD": OPERATOR_PASSWORD}
    ops = await cli("--operator", OPERATOR, "--json", "items", instance_id, env=as_operator)
    assert ops.code == 0 and ops.json() == ["orders", "customers"], ops.text
    wrong = await cli(
        "--operator", OPERATOR, "items", instance_id,
        env={"OSB_BACKUP_OPERATOR_PASSWORD": "not-the-password"},
    )  # fmt: skip
    assert wrong.code == 3 and "(unauthorized)" in wrong.stderr

    key = bindings.new_key()
    audit_secret(key, "a binding key of tests/cli")
    await cli.service.db.bindings.insert_one(
        {"_id": "binding-1", "instance_id": instance_id, "key_hash": bindings.key_hash(key)}
    )
    by_env = await cli(
        "--json", "items", env={"OSB_BACKUP_KEY": key, "OSB_BACKUP_INSTANCE": instance_id}
    )
    assert by_env.code == 0 and by_env.json() == ["orders", "customers"], by_env.text
    by_file = await cli("--key-file", "-", "jobs", "list", instance_id, input=key + "\n")
    assert by_file.code == 0 and "ID" in by_file.stdout, by_file.text
    elsewhere = await cli(
        "items", "0b5d3c2e-9a1f-4c1e-8f6a-2d3b4c5d6e7f", env={"OSB_BACKUP_KEY": key}
    )
    assert elsewhere.code == 4 and "(instance_not_found)" in elsewhere.stderr
    for result in (ops, by_env, by_file, elsewhere):
        assert key not in result.text and OPERATOR_PASSWORD not in result.text


async def _destination_and_plan(cli: Cli, s3_settings: S3Settings) -> None:
    created = await cli(
        "destinations", "create", INSTANCE_NAME, "main",
        "--endpoint", str(s3_settings.endpoint), "--bucket", s3_settings.bucket,
        "--access-key-id", s3_settings.access_key_id, "--secret-file", "-",
        input=s3_settings.secret_access_key.get_secret_value(),
    )  # fmt: skip
    assert created.code == 0, created.text
    plan = await cli(
        "plans", "create", INSTANCE_NAME, "nightly", "-d", "main",
        "--schedule", "0 3 * * *", "--keep", "7",
    )  # fmt: skip
    assert plan.code == 0, plan.text


def test_shell_completion_completes_commands_and_choices() -> None:
    def complete(words: str) -> list[str]:
        env = {
            "PATH": os.environ.get("PATH", ""),
            "_OSB_BACKUP_COMPLETE": "complete_bash",
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1)),
        }
        done = subprocess.run([SCRIPT], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert complete("osb-backup pl") == ["plans"]
    assert complete("osb-backup restore-points ") == ["list", "show", "delete", "pin", "unpin"]
    assert complete("osb-backup jobs list x --status f") == ["failed"]
    assert complete("osb-backup webhooks create x --event drill") == ["drill.failed"]


def test_usage_errors_without_a_server() -> None:
    runner = CliRunner()
    helped = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert helped.exit_code == 0
    for command in ("items", "backup", "restore", "destinations", "plans", "jobs"):
        assert command in helped.output
    unknown = runner.invoke(app, ["jobs", "list", "x", "--status", "bogus"])
    assert unknown.exit_code == 2 and "--status" in unknown.output
    nowhere = runner.invoke(app, ["items", "x"], env={"OSB_BACKUP_URL": None})
    assert nowhere.exit_code == 2 and "OSB_BACKUP_URL" in nowhere.output


async def test_edit_cancel_and_delete(cli: Cli, s3_settings: S3Settings) -> None:
    await _destination_and_plan(cli, s3_settings)
    edited = await cli(
        "plans", "edit", INSTANCE_NAME, "nightly", "--keep", "5", "--keep-unit", "backups",
        "--items", "customers,orders", "--name", "daily",
    )  # fmt: skip
    assert edited.code == 0, edited.text
    assert "5 backups" in edited.stdout and "customers, orders" in edited.stdout
    renamed = await cli("destinations", "edit", INSTANCE_NAME, "main", "--prefix", "cli/")
    assert renamed.code == 0, renamed.text
    shown = await cli("--json", "destinations", "show", INSTANCE_NAME, "main")
    assert shown.json()["prefix"] == "cli/"
    moved = await cli(
        "destinations", "edit", INSTANCE_NAME, "main", "--endpoint", "http://127.0.0.1:9"
    )
    assert moved.code == 6 and "(secret_required)" in moved.stderr, moved.text
    assert "--new-secret" in moved.stderr

    cli.agent.hold()
    started = await cli("--json", "backup", INSTANCE_NAME)
    assert started.code == 0, started.text
    job_id = started.json()["id"]
    cancelled = await cli("jobs", "cancel", INSTANCE_NAME, job_id)
    assert cancelled.code == 0, cancelled.text
    assert f"Job {job_id} was asked to stop" in cancelled.stderr
    cli.agent.let_go()
    waited = await cli("jobs", "wait", INSTANCE_NAME, job_id)
    assert waited.code == 1 and f"Backup job {job_id} CANCELLED" in waited.stderr, waited.text
    again = await cli("jobs", "cancel", INSTANCE_NAME, job_id)
    assert again.code == 6 and "(job_finished)" in again.stderr

    succeeded = await cli("--json", "backup", INSTANCE_NAME, "--wait")
    assert succeeded.code == 0, succeeded.text
    point_id = succeeded.json()["restore_point_id"]
    refused = await cli("restore-points", "delete", INSTANCE_NAME, point_id, input="n\n")
    assert refused.code == 6 and "Nothing was changed." in refused.stderr
    removed = await cli("points", "delete", INSTANCE_NAME, point_id, "--yes")
    assert removed.code == 0, removed.text
    gone = await cli("restore-points", "show", INSTANCE_NAME, point_id)
    assert gone.code == 4 and "(restore_point_not_found)" in gone.stderr

    in_use = await cli("destinations", "delete", INSTANCE_NAME, "main", "--yes")
    assert in_use.code == 6 and "(destination_in_use)" in in_use.stderr
    assert (await cli("plans", "delete", INSTANCE_NAME, "daily", "--yes")).code == 0
    listed = await cli("--json", "plans", "list", INSTANCE_NAME)
    assert listed.json() == []
