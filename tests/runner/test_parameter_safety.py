"""Script parameters stored before the manager refused dangerous names (issue 14) are never
sent to an agent: the Go agent would hand them to its scripts unchecked. ``BACKUP_PORT``
always comes from the instance's ``database.port``."""

from __future__ import annotations

from tests.runner.conftest import GoRig


async def test_refused_names_stored_earlier_never_reach_an_agent(go: GoRig) -> None:
    instance, _plan, job = await go.backup()
    stored = {
        "PGSSLMODE": "disable",
        "BASH_ENV": "$(id; env >&2)",
        "ld_preload": "/tmp/evil.so",  # noqa: S108 - a value, never a file here
        "AGENT_SECRETS_FILE": "/etc/passwd",
        "BACKUP_PORT": "1",
    }
    await go.db.instances.update_one(
        {"_id": instance["_id"]}, {"$set": {"database.parameters": stored}}
    )
    runner = go.make_runner()
    assert await runner.run_once() == 1
    done = await go.final(job["_id"])
    assert done["status"] == "SUCCEEDED", done["reason"]
    sent = [body for kind, body in go.agent.requests if kind == "backup"]
    assert sent
    for body in sent:
        assert body["backup"]["parameters"] == [{"PGSSLMODE": "disable"}, {"BACKUP_PORT": "5432"}]
