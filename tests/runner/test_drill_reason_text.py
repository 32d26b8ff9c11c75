"""The verify script's last line of stderr becomes a failed drill's reason (on the job, the
drill outcome, the restore point and a webhook's event): it is the DBA's script, so its words
are welcome, but a reason is one short line of text. Escape sequences, bells and other
control characters are removed and the line is capped."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from backup import jobs
from backup.database import Database
from backup.secrets import SecretBox
from storage import S3Settings
from tests.agent.helpers import PASSWORD, USER, AgentProcess
from tests.runner.conftest import RunnerFactory, final, seed_instance, seed_plan


async def test_a_verify_scripts_control_characters_do_not_reach_the_reason(
    store: Database,
    box: SecretBox,
    s3_settings: S3Settings,
    make_agent: Callable[..., AgentProcess],
    make_runner: RunnerFactory,
    tmp_path: Any,
) -> None:
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "backup").write_text('#!/bin/sh\necho dump > "$BACKUP_DIRECTORY/x.txt"\n')
    (scripts / "verify").write_text(
        "#!/bin/sh\n"
        "printf '\\033[2J\\033[31mno tables\\007 found\\033]0;owned\\007 %s\\n' "
        '"$(head -c 2000 /dev/zero | tr "\\0" x)" >&2\n'
        "exit 3\n"
    )
    for script in scripts.iterdir():
        script.chmod(0o755)
    agent = make_agent(scripts=scripts)
    instance = await seed_instance(
        store, box, agent_url=f"http://127.0.0.1:{agent.port}", username=USER, password=PASSWORD
    )
    plan = await seed_plan(store, box, instance, s3_settings, items=["orders"])
    runner = make_runner(clock=None, agent_poll_min_seconds=0.2, agent_poll_max_seconds=0.5)
    backup = await jobs.start_backup(store, plan)
    await runner.run_once()
    assert (await final(store, backup["_id"]))["status"] == "SUCCEEDED"

    drill = await jobs.start_drill(store, plan)
    await runner.run_once()
    done = await final(store, drill["_id"])
    assert done["status"] == "FAILED"
    for reason in (done["reason"], done["drill"]["reason"], done["items"][0]["error"]):
        assert "no tables found" in reason, reason
        assert not any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 for c in reason), repr(reason)
        assert "[31m" not in reason and "owned" not in reason, reason
        assert len(reason) < 1000, len(reason)
