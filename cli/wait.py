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
from cli.errors import CliError, ExitCode

POLL_SECONDS = 1.0
PATIENCE_SECONDS = 60.0
"""How long a manager that cannot be reached (a restart, a router hiccup) is waited for."""


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


def _poll(client: Client, job_id: str, sleep: Callable[[float], None], poll: float) -> Job:
    """The job now; a manager that cannot be reached is asked again for a while."""
    give_up = time.monotonic() + PATIENCE_SECONDS
    while True:
        try:
            return client.job(job_id)
        except CliError as error:
            if error.code is not ExitCode.UNAVAILABLE or time.monotonic() > give_up:
                raise
        sleep(poll)


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
                job = _poll(client, job["id"], sleep, poll_seconds)
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
        job = _poll(client, job["id"], sleep, poll_seconds)
