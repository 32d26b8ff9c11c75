"""The dashboard's plots, drawn on the server as SVG shapes (no chart library, no script):
backup size and duration over time, and a success/failure timeline of recent jobs."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from backup.database import Document
from backup.jobs import JobStatus

WIDTH = 720
HEIGHT = 160
MAX_STEP = 24.0
"""The widest a bar's slot gets, so that a few backups do not look like a wall."""
_COLOURS = {
    JobStatus.SUCCEEDED: "#2e7d32",
    JobStatus.FAILED: "#c62828",
    JobStatus.CANCELLED: "#757575",
    JobStatus.MISSED: "#ef6c00",
    JobStatus.RUNNING: "#1565c0",
    JobStatus.QUEUED: "#90a4ae",
}


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    colour: str
    label: str


@dataclass(frozen=True, slots=True)
class Plot:
    title: str
    bars: list[Bar]
    top_label: str
    """What the top of the plot stands for (its largest value), empty for a timeline."""


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def job_size(job: Document) -> int:
    return sum(int(item.get("stored_size") or item.get("size") or 0) for item in job["items"])


def job_seconds(job: Document) -> float | None:
    started, ended = job.get("started_at"), job.get("ended_at")
    if isinstance(started, datetime) and isinstance(ended, datetime):
        return max(0.0, (ended - started).total_seconds())
    return None


def _stamp(job: Document) -> str:
    created = job.get("created_at")
    return created.strftime("%Y-%m-%d %H:%M UTC") if isinstance(created, datetime) else "?"


def _bars(values: list[tuple[float, str, str]]) -> list[Bar]:
    """One bar per value, oldest on the left, scaled to the largest."""
    if not values:
        return []
    top = max(value for value, _, _ in values) or 1.0
    step = min(WIDTH / len(values), MAX_STEP)
    width = max(1.0, step * 0.8)
    bars = []
    for index, (value, colour, label) in enumerate(values):
        height = max(1.0, HEIGHT * value / top)
        bars.append(Bar(index * step, HEIGHT - height, width, height, colour, label))
    return bars


def backup_plots(backups: list[Document]) -> list[Plot]:
    """``backups``: backup jobs, newest first (as listed)."""
    chronological = list(reversed(backups))
    done = [job for job in chronological if job["status"] == JobStatus.SUCCEEDED]
    sizes = [
        (
            float(job_size(job)),
            _COLOURS[JobStatus.SUCCEEDED],
            f"{_stamp(job)}: {human_bytes(job_size(job))}",
        )
        for job in done
    ]
    durations = []
    for job in done:
        seconds = job_seconds(job)
        if seconds is not None:
            durations.append((seconds, "#1565c0", f"{_stamp(job)}: {seconds:.1f} s"))
    timeline = [
        (1.0, _COLOURS.get(JobStatus(job["status"]), "#90a4ae"), f"{_stamp(job)}: {job['status']}")
        for job in chronological
    ]
    return [
        Plot(
            "Backup size",
            _bars(sizes),
            human_bytes(max((value for value, _, _ in sizes), default=0)),
        ),
        Plot(
            "Backup duration",
            _bars(durations),
            f"{max((value for value, _, _ in durations), default=0):.1f} s",
        ),
        Plot("Successes and failures", _bars(timeline), ""),
    ]
