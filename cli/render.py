"""What the CLI prints: Rich tables for people, the API's JSON for scripts (``--json``).
Tables go to standard output, messages and progress to standard error."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, cast

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cli.client import Job, Validation

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

STATUS_STYLE = {
    "SUCCEEDED": "green",
    "FAILED": "bold red",
    "CANCELLED": "yellow",
    "MISSED": "yellow",
    "RUNNING": "cyan",
    "QUEUED": "blue",
}


def emit_json(value: Any) -> None:
    """``value`` as JSON, unstyled, on standard output."""
    print(json.dumps(value, indent=2))


def message(text: str) -> None:
    err.print(text, highlight=False)


def size(value: object) -> str:
    """Bytes as people read them (1.5 MiB); empty when unknown."""
    if not isinstance(value, int):
        return ""
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if amount < 1024 or unit == "TiB":
            return f"{value} B" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{value} B"


def when(value: object) -> str:
    """An API timestamp in local time, to the second."""
    if not isinstance(value, str) or not value:
        return ""
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def elapsed(job: Job) -> str:
    start = job.get("started_at") or job.get("created_at")
    if not start:
        return ""
    end = job.get("ended_at")
    try:
        began = datetime.fromisoformat(start.replace("Z", "+00:00"))
        ended = datetime.fromisoformat(end.replace("Z", "+00:00")) if end else datetime.now(UTC)
    except ValueError:
        return ""
    if began.tzinfo is None:
        began = began.replace(tzinfo=UTC)
    if ended.tzinfo is None:
        ended = ended.replace(tzinfo=UTC)
    return duration((ended - began).total_seconds())


def status(value: object) -> str:
    text = str(value or "")
    style = STATUS_STYLE.get(text)
    return f"[{style}]{escape(text)}[/]" if style else escape(text)


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> Table:
    grid = Table(title=title, title_justify="left", header_style="bold", box=None, pad_edge=False)
    for column in columns:
        grid.add_column(column, overflow="fold")
    for row in rows:
        grid.add_row(*row)
    return grid


def _text(value: object) -> str:
    return escape("" if value is None else str(value))


def items(names: list[str]) -> None:
    out.print(table(None, ["ITEM"], ([_text(name)] for name in names)))


def destinations(entries: Iterable[dict[str, Any]]) -> None:
    rows = []
    for dest in entries:
        where = (
            f"{dest.get('endpoint') or 'AWS'} bucket {dest.get('bucket')}"
            if dest.get("type") == "S3"
            else f"{dest.get('auth_url')} container {dest.get('container')}"
        )
        if dest.get("prefix"):
            where += f" prefix {dest['prefix']}"
        rows.append(
            [_text(dest.get("name")), _text(dest.get("type")), _text(where), _text(dest.get("id"))]
        )
    out.print(table(None, ["NAME", "TYPE", "WHERE", "ID"], rows))


def destination(dest: dict[str, Any]) -> None:
    hidden = {"id", "name", "type", "created_at", "updated_at", "version"}
    rows = [
        ["name", _text(dest.get("name"))],
        ["id", _text(dest.get("id"))],
        ["type", _text(dest.get("type"))],
    ]
    rows += [[_text(key), _text(value)] for key, value in dest.items() if key not in hidden]
    rows += [["updated", when(dest.get("updated_at"))]]
    out.print(table(None, ["FIELD", "VALUE"], rows))


def _retention(plan: dict[str, Any]) -> str:
    retention = plan.get("retention") or {}
    unit = {"DAYS": "days", "HOURS": "hours", "FILES": "backups"}.get(
        str(retention.get("style")), str(retention.get("style"))
    )
    return f"{retention.get('period')} {unit}"


def plans(entries: Iterable[dict[str, Any]]) -> None:
    rows = []
    for plan in entries:
        last = plan.get("last_job") or {}
        rows.append(
            [
                _text(plan.get("name")),
                _text(plan.get("frequency")) + f" ({_text(plan.get('timezone'))})",
                "[yellow]paused[/]" if plan.get("paused") else when(plan.get("next_run_at")),
                status(last.get("status")) if last else "",
                _text(_retention(plan)),
                _text(plan.get("id")),
            ]
        )
    out.print(table(None, ["NAME", "SCHEDULE", "NEXT RUN", "LAST", "KEEP", "ID"], rows))


def plan(entry: dict[str, Any]) -> None:
    encryption = entry.get("encryption") or {}
    last = entry.get("last_job") or {}
    rows = [
        ["name", _text(entry.get("name"))],
        ["id", _text(entry.get("id"))],
        ["destination", _text(entry.get("destination_id"))],
        ["schedule", f"{_text(entry.get('frequency'))} ({_text(entry.get('timezone'))})"],
        ["items", _text(", ".join(entry.get("items") or []) or "all")],
        ["keep", _text(_retention(entry))],
        ["compression", "on" if entry.get("compression") else "off"],
        ["encryption", "on" if encryption.get("enabled") else "off"],
        ["paused", "yes" if entry.get("paused") else "no"],
        ["next run", when(entry.get("next_run_at"))],
        ["last job", f"{_text(last.get('id'))} {status(last.get('status'))}" if last else ""],
    ]
    out.print(table(None, ["FIELD", "VALUE"], rows))


def jobs(entries: Iterable[dict[str, Any]]) -> None:
    rows = [
        [
            _text(job.get("id")),
            _text(job.get("type")),
            status(job.get("status")),
            _text(job.get("trigger")),
            when(job.get("created_at")),
            elapsed(cast(Job, job)),
            _text(job.get("reason") or ""),
        ]
        for job in entries
    ]
    out.print(table(None, ["ID", "TYPE", "STATUS", "TRIGGER", "CREATED", "TOOK", "REASON"], rows))


def job_items(job: Job) -> Table:
    rows = []
    for item in job.get("items") or []:
        name = item["name"]
        if item.get("target") and item.get("target") != name:
            name = f"{name} -> {item['target']}"
        rows.append(
            [
                _text(name),
                status(item.get("status")),
                _text(item.get("stage") or ""),
                size(item.get("size")),
                size(item.get("stored_size")),
                _text(item.get("error") or ""),
            ]
        )
    return table(None, ["ITEM", "STATUS", "STAGE", "SIZE", "STORED", "ERROR"], rows)


def job(entry: Job) -> None:
    header = (
        f"{entry['type'].capitalize()} job {escape(entry['id'])}: {status(entry['status'])}"
        f"  ({entry['trigger'].lower()}, created {when(entry.get('created_at'))}, "
        f"{elapsed(entry)})"
    )
    out.print(header)
    if entry.get("reason"):
        out.print(f"reason: {_text(entry.get('reason'))}")
    if entry.get("restore_point_id"):
        out.print(f"restore point: {_text(entry.get('restore_point_id'))}")
    out.print(job_items(entry))


def logs(entry: Job, only_item: str | None) -> None:
    for item in entry.get("items") or []:
        if only_item is not None and item["name"] != only_item:
            continue
        for stage, text in (item.get("logs") or {}).items():
            out.rule(f"{escape(item['name'])}: {escape(stage)}", align="left")
            out.print(text, markup=False, highlight=False)


def restore_points(entries: Iterable[dict[str, Any]]) -> None:
    rows = [
        [
            _text(point.get("id")),
            when(point.get("created_at")),
            _text(", ".join(str(i.get("name")) for i in point.get("items") or [])),
            size(sum(int(i.get("size") or 0) for i in point.get("items") or [])),
            when(point.get("expires_at")) or "kept by count",
            _text(point.get("state")),
        ]
        for point in entries
    ]
    out.print(table(None, ["ID", "CREATED", "ITEMS", "SIZE", "EXPIRES", "STATE"], rows))


def restore_point(point: dict[str, Any]) -> None:
    out.print(
        f"Restore point {escape(str(point.get('id')))} of {when(point.get('created_at'))}, "
        f"{_text(point.get('state'))}, expires {when(point.get('expires_at')) or 'by count'}"
    )
    rows = [
        [
            _text(item.get("name")),
            size(item.get("size")),
            size(item.get("stored_size")),
            _text(item.get("compression") or ""),
            _text(item.get("encryption") or ""),
            _text(item.get("checksum") or ""),
        ]
        for item in point.get("items") or []
    ]
    out.print(
        table(None, ["ITEM", "SIZE", "STORED", "COMPRESSION", "ENCRYPTION", "CHECKSUM"], rows)
    )


def validation(result: Validation) -> None:
    rows = [
        [
            _text(step.get("name")),
            "[green]ok[/]" if step.get("ok") else "[red]failed[/]",
            _text(step.get("message") or step.get("error_code") or ""),
        ]
        for step in result["steps"]
    ]
    out.print(table(None, ["STEP", "RESULT", "DETAIL"], rows))
    verdict = "[green]ok[/]" if result["ok"] else "[bold red]failed[/]"
    out.print(f"{verdict}: {_text(result['description'])}")


def page_note(shown: int, total: int | None, more: bool = False) -> None:
    """``total`` is None when the API did not count the list (a page with more after it)."""
    if total is None and more:
        message(f"{shown} shown, more exist; --limit N (up to 100) or --all for more.")
    elif total is not None and total > shown:
        message(f"{shown} of {total} shown; --limit N (up to 100) or --all for more.")
