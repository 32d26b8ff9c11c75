"""``osb-backup import``: an operator rebuilds the manager's catalogue of restore points from a
destination's manifests after its database is lost (``POST /v1/imports``, docs/recovery.md).
cli/app.py imports this module so the command is registered."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from cli import render
from cli.app import _options, app, handled
from cli.client import Client
from cli.errors import CliError, ExitCode


def _destination(path: str) -> dict[str, Any]:
    """The destination's JSON (as for creating one, secret included) from ``path``."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"Cannot read {path}: {exc.strerror}.", ExitCode.USAGE) from None
    try:
        value = json.loads(text)
    except ValueError:
        raise CliError(f"{path} is not JSON.", ExitCode.USAGE) from None
    if not isinstance(value, dict):
        raise CliError(f"{path} must hold a JSON object (a destination).", ExitCode.USAGE)
    return value


def _mapping(values: list[str] | None) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for value in values or []:
        source, sep, target = value.partition("=")
        if not sep or not source or not target:
            raise CliError(
                f"--map {value!r}: give SOURCE_INSTANCE=TARGET_INSTANCE.", ExitCode.USAGE
            )
        mapping[source] = target
    return mapping


def _human(answer: dict[str, Any]) -> None:
    rows = [
        [
            p["id"],
            p["status"],
            p.get("instance_id") or f"orphaned (was {p.get('source_instance_id') or '?'})",
            p.get("plan_name") or p.get("plan_id") or "",
            render.when(p.get("created_at")),
            p.get("reason") or "",
        ]
        for p in answer["points"]
    ]
    if rows:
        render.out.print(
            render.table(
                None, ["RESTORE POINT", "STATUS", "INSTANCE", "PLAN", "CREATED", "REASON"], rows
            )
        )
    verb = "would be imported" if answer["dry_run"] else "imported"
    render.message(
        f"{answer['found']} manifest(s) found: {answer['imported']} {verb}, "
        f"{answer['existing']} already there, {answer['invalid']} invalid, "
        f"{answer['incomplete']} incomplete."
    )
    if answer.get("remaining"):
        render.message(f"{answer['remaining']} more to read: run the import again.")


@app.command("import")
@handled
def import_points(
    ctx: typer.Context,
    destination_file: Annotated[
        str,
        typer.Option(
            "--destination-file",
            help="A JSON file ('-': standard input) with the destination holding the backups, "
            "as for creating one: type, endpoint or auth_url, bucket or container, prefix and "
            "the credentials (secret included).",
            show_default=False,
        ),
    ],
    mapping: Annotated[
        list[str] | None,
        typer.Option(
            "--map",
            help="SOURCE=TARGET: the points of instance SOURCE go to the registered instance "
            "TARGET (repeatable). Unmapped instances that are not registered are kept as "
            "orphaned points.",
            show_default=False,
        ),
    ] = None,
    verify_checksums: Annotated[
        bool,
        typer.Option("--verify-checksums", help="Read every object and check its SHA-256 (slow)."),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Verify and report; change nothing.")
    ] = False,
) -> None:
    """Import the restore points of a destination from their manifests, after the manager's
    database is lost (operators only; importing twice creates nothing new). Exits 1 if a
    manifest was invalid or a point incomplete."""
    options = _options(ctx)
    body = {
        "destination": _destination(destination_file),
        "instances": _mapping(mapping),
        "verify_checksums": verify_checksums,
        "dry_run": dry_run,
    }
    if not options.url:
        raise CliError(
            "Where is the backup manager? Give --url or set OSB_BACKUP_URL.", ExitCode.USAGE
        )
    client = Client(options.url, "-", options.log_in().auth, timeout=900)
    try:
        answer = client.request("POST", f"{client.url}/v1/imports", json=body)
    finally:
        client.close()
    if options.json:
        render.emit_json(answer)
    else:
        _human(answer)
    if answer["invalid"] or answer["incomplete"]:
        render.err.print(
            escape("Some points were not imported: see their reason."), highlight=False
        )
        raise typer.Exit(int(ExitCode.JOB_FAILED))
