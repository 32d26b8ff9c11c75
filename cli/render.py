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


GFS_COUNTS = ("daily", "weekly", "monthly", "yearly")


def retention_text(retention: dict[str, Any] | None) -> str:
    """A plan's retention in words: "14 days + 7 daily, 4 weekly; at least 3 good"."""
    retention = retention or {}
    parts = []
    if retention.get("style") is not None:
        unit = {"DAYS": "days", "HOURS": "hours", "FILES": "backups"}.get(
            str(retention.get("style")), str(retention.get("style")).lower()
        )
        parts.append(f"{retention.get('period')} {unit}")
    counts = [f"{retention[name]} {name}" for name in GFS_COUNTS if retention.get(name)]
    if counts:
        parts.append(", ".join(counts))
    text = " + ".join(parts) or "nothing"
    if retention.get("min_good"):
        text += f"; at least {retention['min_good']} good"
    return text


def _retention(plan: dict[str, Any]) -> str:
    return retention_text(plan.get("retention"))


def seconds_text(value: object) -> str:
    """A duration in seconds as people read it (26h, 90m, 2d)."""
    if not isinstance(value, int):
        return ""
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if value >= length and value % length == 0:
            return f"{value // length}{unit}"
    return f"{value}s"


def drill_text(drill: object) -> str:
    """A last drill: outcome, when, and why it failed."""
    if not isinstance(drill, dict) or not drill:
        return "never"
    outcome = str(drill.get("outcome") or "")
    style = "green" if outcome == "passed" else "bold red"
    text = f"[{style}]{escape(outcome)}[/] {when(drill.get('at'))}"
    if drill.get("reason") and outcome != "passed":
        text += f": {_text(drill.get('reason'))}"
    return text


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
        ["rpo", _rpo(entry)],
        ["drill", _drill_schedule(entry)],
        ["last drill", drill_text(entry.get("last_drill"))],
    ]
    out.print(table(None, ["FIELD", "VALUE"], rows))


def _rpo(entry: dict[str, Any]) -> str:
    text = seconds_text(entry.get("effective_rpo_seconds") or entry.get("rpo_seconds"))
    return f"{text} (derived from the schedule)" if entry.get("rpo_derived") else text


def _drill_schedule(entry: dict[str, Any]) -> str:
    drill = entry.get("drill") or {}
    if not drill.get("frequency"):
        return "none"
    text = _text(drill.get("frequency"))
    if drill.get("enabled") is False:
        return f"{text} (disabled)"
    return f"{text}, next {when(entry.get('drill_next_run_at'))}"


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
    if entry.get("drill"):
        out.print(f"drill: {drill_text(entry.get('drill'))}")
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
            when(point.get("expires_at")) or "by the rules",
            _point_state(point),
        ]
        for point in entries
    ]
    out.print(table(None, ["ID", "CREATED", "ITEMS", "SIZE", "EXPIRES", "STATE"], rows))


def _point_state(point: dict[str, Any]) -> str:
    """available, plus pinned and locked (until a date) when they are."""
    parts = [_text(point.get("state"))]
    if point.get("pinned"):
        parts.append("[magenta]pinned[/]")
    if point.get("locked_until"):
        parts.append(f"locked until {when(point.get('locked_until'))}")
    return ", ".join(parts)


def restore_point(point: dict[str, Any]) -> None:
    out.print(
        f"Restore point {escape(str(point.get('id')))} of {when(point.get('created_at'))}, "
        f"{_point_state(point)}, expires {when(point.get('expires_at')) or 'by the rules'}"
    )
    if point.get("pinned"):
        out.print(
            f"pinned {when(point.get('pinned_at'))}: {_text(point.get('pin_reason'))}",
            highlight=False,
        )
    out.print(f"last drill: {drill_text(point.get('last_drill'))}", highlight=False)
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


def retention_preview(preview: dict[str, Any]) -> None:
    which = "proposed" if preview.get("proposed") else "saved"
    out.print(
        f"Retention ({which}): {_text(retention_text(preview.get('retention')))} "
        f"({_text(preview.get('timezone'))}), as of {when(preview.get('as_of'))}",
        highlight=False,
    )
    out.print(
        f"{preview.get('to_delete')} of {preview.get('total')} restore points would be "
        f"deleted, {preview.get('to_keep')} kept.",
        highlight=False,
    )
    rows = [
        [_text(point.get("id")), when(point.get("created_at")), "[red]delete[/]", ""]
        for point in preview.get("delete") or []
    ]
    rows += [
        [
            _text(point.get("id")),
            when(point.get("created_at")),
            "[green]keep[/]",
            _text(", ".join(point.get("kept_by") or [])),
        ]
        for point in preview.get("keep") or []
    ]
    out.print(table(None, ["ID", "CREATED", "VERDICT", "KEPT BY"], rows))


PROTECTION_STYLE = {"protected": "green", "at_risk": "yellow", "unprotected": "bold red"}


def protection_state(value: object) -> str:
    text = str(value or "")
    style = PROTECTION_STYLE.get(text)
    return f"[{style}]{escape(text)}[/]" if style else escape(text)


def protection(state: dict[str, Any]) -> None:
    out.print(
        f"Instance {protection_state(state.get('state'))}: {_text(state.get('reason'))} "
        f"(evaluated {when(state.get('evaluated_at'))})",
        highlight=False,
    )
    rows = [
        [
            _text(plan.get("name")),
            protection_state(plan.get("state")),
            _text(seconds_text(plan.get("rpo_seconds")))
            + (" (derived)" if plan.get("rpo_derived") else ""),
            when(plan.get("last_good_at")) or "never",
            when(plan.get("lapses_at")),
            _text("; ".join(plan.get("reasons") or [plan.get("reason") or ""])),
        ]
        for plan in state.get("plans") or []
    ]
    out.print(table(None, ["PLAN", "STATE", "RPO", "LAST GOOD", "LAPSES", "REASONS"], rows))


def webhooks(entries: Iterable[dict[str, Any]]) -> None:
    rows = [
        [
            _text(hook.get("id")),
            _text(hook.get("url")),
            _text(", ".join(hook.get("events") or [])),
            "yes" if hook.get("enabled") else "[yellow]no[/]",
            _text(hook.get("description") or ""),
        ]
        for hook in entries
    ]
    out.print(table(None, ["ID", "URL", "EVENTS", "ENABLED", "DESCRIPTION"], rows))


def webhook(hook: dict[str, Any]) -> None:
    rows = [
        ["id", _text(hook.get("id"))],
        ["url", _text(hook.get("url"))],
        ["events", _text(", ".join(hook.get("events") or []))],
        ["enabled", "yes" if hook.get("enabled") else "no"],
        ["description", _text(hook.get("description") or "")],
        ["secret", "set" if hook.get("secret_set") else "not set"],
        ["created", when(hook.get("created_at"))],
        ["updated", when(hook.get("updated_at"))],
    ]
    out.print(table(None, ["FIELD", "VALUE"], rows))


DELIVERY_STYLE = {
    "succeeded": "green",
    "failed": "bold red",
    "pending": "blue",
    "delivering": "cyan",
}


def deliveries(entries: Iterable[dict[str, Any]]) -> None:
    rows = []
    for delivery in entries:
        state = str(delivery.get("state") or "")
        style = DELIVERY_STYLE.get(state.lower())
        last = delivery.get("last_status_code") or delivery.get("last_error") or ""
        rows.append(
            [
                _text(delivery.get("event_id")),
                _text(delivery.get("event_type")),
                f"[{style}]{escape(state)}[/]" if style else escape(state),
                _text(delivery.get("attempts")),
                when(delivery.get("last_attempt_at")),
                _text(last),
            ]
        )
    out.print(table(None, ["EVENT", "TYPE", "STATE", "ATTEMPTS", "LAST ATTEMPT", "LAST"], rows))
