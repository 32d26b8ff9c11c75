"""``--wait``: follow a job until it ends, showing each item's status, stage and bytes and
the time elapsed; live in a terminal, a line per change elsewhere (CI logs)."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Group
from rich.live import Live
from rich.text import Text

from cli import render
from cli.client import FINAL_STATUSES, Client, Job

POLL_SECONDS = 1.0


def _headline(job: Job) -> Text:
    line = Text.from_markup(
        f"{job['type'].capitalize()} job {job['id']}: {render.status(job['status'])}  "
        f"{render.elapsed(job)}"
    )
    if job.get("agent_unreachable_since"):
        line.append("  (the agent does not answer)", style="yellow")
    return line


def _changes(job: Job) -> tuple[object, ...]:
    return (
        job["status"],
        tuple(
            (item.get("status"), item.get("stage"), item.get("size"))
            for item in job.get("items") or []
        ),
        bool(job.get("agent_unreachable_since")),
    )


def follow(
    client: Client,
    job: Job,
    *,
    poll_seconds: float = POLL_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
) -> Job:
    """Poll ``job`` until it has ended; the job as it ended."""
    if render.err.is_terminal:
        with Live(console=render.err, refresh_per_second=4, transient=False) as live:
            while True:
                live.update(Group(_headline(job), render.job_items(job)))
                if job["status"] in FINAL_STATUSES:
                    return job
                sleep(poll_seconds)
                job = client.job(job["id"])
    seen: tuple[object, ...] | None = None
    while True:
        state = _changes(job)
        if state != seen:
            seen = state
            parts = [
                f"{item['name']} {item.get('status') or ''}"
                + (f" {item['stage']}" if item.get("stage") else "")
                + (f" {render.size(item.get('size'))}" if item.get("size") is not None else "")
                for item in job.get("items") or []
            ]
            render.err.print(
                f"{render.elapsed(job):>8} {job['status']}: {'; '.join(parts)}",
                markup=False,
                highlight=False,
            )
        if job["status"] in FINAL_STATUSES:
            return job
        sleep(poll_seconds)
        job = client.job(job["id"])
