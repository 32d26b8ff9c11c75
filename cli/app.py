"""The `osb-backup` commands: one per thing people do with their backups (docs/cli.md).

Every command takes the service instance first: its name in the cf CLI's targeted space, or
its GUID. Failures print one sentence and exit with a stable code (:class:`ExitCode`)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from rich.markup import escape

from cli import render, wait
from cli.client import ApiFailure, Client, Job
from cli.errors import CliError, ExitCode
from cli.login import Login, choose_login, read_secret_file

P = ParamSpec("P")
R = TypeVar("R")

app = typer.Typer(
    name="osb-backup",
    help="Back up and restore your service instances with the OSB backup manager.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
destinations_app = typer.Typer(help="Where backups are stored (S3 buckets, Swift containers).")
plans_app = typer.Typer(help="Backup plans: what is backed up when, and how long it is kept.")
jobs_app = typer.Typer(help="Backup and restore jobs: list, show, follow, logs, cancel.")
points_app = typer.Typer(help="Restore points: the successful backups you can restore.")
webhooks_app = typer.Typer(help="Webhooks: signed notifications of the instance's events.")
for group, group_name in (
    (destinations_app, "destinations"),
    (plans_app, "plans"),
    (jobs_app, "jobs"),
    (points_app, "restore-points"),
    (webhooks_app, "webhooks"),
):
    group.info.no_args_is_help = True
    app.add_typer(group, name=group_name)
app.add_typer(points_app, name="points", hidden=True)  # short for restore-points


@dataclass
class Options:
    """The global options, kept for the command that runs."""

    url: str | None
    key_file: str | None
    operator: str | None
    json: bool
    login: Login | None = None

    def connect(self, instance: str) -> Client:
        """A client of ``instance``'s API, logged in."""
        if not self.url:
            raise CliError(
                "Where is the backup manager? Give --url or set OSB_BACKUP_URL.",
                ExitCode.USAGE,
                hint="A binding's credentials carry it as api_url.",
            )
        login = self.log_in()
        return Client(self.url, login.instance_id(instance), login.auth)

    def log_in(self) -> Login:
        if self.login is None:
            self.login = choose_login(
                key_file=self.key_file, operator=self.operator, password_prompt=self._password
            )
        return self.login

    def _password(self) -> str:
        try:
            return str(
                typer.prompt(f"Password of operator {self.operator}", hide_input=True, err=True)
            )
        except typer.Abort:  # no answer (standard input closed)
            raise CliError(
                "No operator password: set OSB_BACKUP_OPERATOR_PASSWORD or answer the prompt.",
                ExitCode.NOT_LOGGED_IN,
            ) from None


def _options(ctx: typer.Context) -> Options:
    options = ctx.find_object(Options)
    assert options is not None  # the app's callback always sets it
    return options


def _report(error: CliError) -> None:
    render.err.print(f"[bold red]Error:[/] {escape(error.message)}", highlight=False)
    if error.hint:
        render.err.print(escape(error.hint), highlight=False, style="dim")


def handled(func: Callable[P, R]) -> Callable[P, R]:
    """Report a :class:`CliError` in its sentence and exit with its code; Ctrl-C exits 130."""

    @functools.wraps(func)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except CliError as error:
            _report(error)
            raise typer.Exit(int(error.code)) from None
        except KeyboardInterrupt:
            render.err.print("Interrupted (a job already started keeps running).")
            raise typer.Exit(int(ExitCode.INTERRUPTED)) from None

    return run


@contextmanager
def connected(ctx: typer.Context, instance: str) -> Iterator[tuple[Client, Options]]:
    options = _options(ctx)
    client = options.connect(instance)
    try:
        yield client, options
    finally:
        client.close()


@app.callback()
def main(
    ctx: typer.Context,
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            envvar="OSB_BACKUP_URL",
            help="The backup manager, e.g. https://backup-manager.example.com.",
            show_default=False,
        ),
    ] = None,
    key_file: Annotated[
        str | None,
        typer.Option(
            "--key-file",
            help="Log in with a binding's key read from this file ('-': standard input); "
            "or set OSB_BACKUP_KEY.",
            show_default=False,
        ),
    ] = None,
    operator: Annotated[
        str | None,
        typer.Option(
            "--operator",
            envvar="OSB_BACKUP_OPERATOR",
            help="Log in as this operator (password from OSB_BACKUP_OPERATOR_PASSWORD, or asked).",
            show_default=False,
        ),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the API's JSON answers (for scripts).")
    ] = False,
) -> None:
    """Back up and restore your service instances with the OSB backup manager.

    Logs in with the cf CLI's session (`cf login`), a binding's key, or operator credentials.
    """
    ctx.obj = Options(url, key_file, operator, json_output)


Instance = Annotated[
    str,
    typer.Argument(
        envvar="OSB_BACKUP_INSTANCE",
        help="The service instance: its name in the cf CLI's targeted space, or its GUID.",
        show_default=False,
    ),
]
Limit = Annotated[int, typer.Option("--limit", min=1, max=100, help="Show at most this many.")]
All = Annotated[bool, typer.Option("--all", help="Show every entry (page after page).")]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
Wait = Annotated[
    bool,
    typer.Option("--wait", "-w", help="Follow the job until it ends; exit 1 if it fails."),
]


def _listing(
    client: Client, options: Options, collection: Any, limit: int, every: bool, **filters: Any
) -> list[dict[str, Any]]:
    more = False
    if every:
        entries = list(client.every(collection, **filters))
        total: int | None = len(entries)
    else:
        page = client.page(collection, limit=limit, **filters)
        entries, total, more = page["items"], page["total"], page["next_cursor"] is not None
    if not options.json:
        render.page_note(len(entries), total, more)
    return entries


def _output(options: Options, value: Any, human: Callable[[Any], None]) -> None:
    """Print ``value`` as the API's JSON with --json, else for people with ``human``."""
    if options.json:
        render.emit_json(value)
    else:
        human(value)


def _list(
    ctx: typer.Context,
    instance: str,
    collection: str,
    human: Callable[[Any], None],
    limit: int,
    every: bool,
    filters: Callable[[Client], dict[str, Any]] | None = None,
) -> None:
    """A page (or, with --all, every page) of one of the instance's collections."""
    with connected(ctx, instance) as (client, options):
        chosen = filters(client) if filters else {}
        _output(options, _listing(client, options, collection, limit, every, **chosen), human)


def _show(
    ctx: typer.Context,
    instance: str,
    fetch: Callable[[Client], Any],
    human: Callable[[Any], None],
) -> None:
    """One thing the API answers, e.g. a plan found by name or id."""
    with connected(ctx, instance) as (client, options):
        _output(options, fetch(client), human)


def _delete(
    ctx: typer.Context,
    instance: str,
    fetch: Callable[[Client], dict[str, Any]],
    question: Callable[[dict[str, Any]], str],
    delete: Callable[[Client, dict[str, Any]], None],
    done: Callable[[dict[str, Any]], str],
    yes: bool,
) -> None:
    """Find the thing, ask (unless --yes), delete it and say so."""
    with connected(ctx, instance) as (client, _options):
        found = fetch(client)
        _confirm(question(found), yes)
        delete(client, found)
        render.message(done(found))


def _confirm(question: str, yes: bool) -> None:
    if yes:
        return
    try:
        agreed = typer.confirm(question, default=False, err=True)
    except typer.Abort:  # no answer (standard input closed)
        agreed = False
    if not agreed:
        raise CliError("Nothing was changed.", ExitCode.REFUSED, hint="--yes skips the question.")


def _finish(job: Job, options: Options, client: Client, follow: bool) -> None:
    """Print a started job (and follow it with ``--wait``); a job that did not succeed
    exits 1 with its reason."""
    if not follow:
        if options.json:
            render.emit_json(job)
        else:
            render.message(
                f"{job['type'].capitalize()} job {job['id']} is {job['status']}; follow it "
                f"with `osb-backup jobs wait {client.instance_id} {job['id']}`."
            )
        return
    done = wait.follow(client, job)
    if options.json:
        render.emit_json(done)
    elif done["status"] == "SUCCEEDED":
        render.job(done)
    if done["status"] != "SUCCEEDED":
        raise CliError(
            f"{done['type'].capitalize()} job {done['id']} {done['status']}: "
            f"{done.get('reason') or 'no reason given'}",
            ExitCode.JOB_FAILED,
            hint=f"`osb-backup jobs logs {client.instance_id} {done['id']}` shows the "
            "agent's stage logs.",
        )


# --- items ----------------------------------------------------------------------------------


@app.command("items")
@handled
def items(ctx: typer.Context, instance: Instance) -> None:
    """The instance's backup items (its databases)."""
    _show(ctx, instance, lambda client: client.items(), render.items)


# --- destinations ---------------------------------------------------------------------------


class Kind(StrEnum):
    s3 = "s3"
    swift = "swift"


class Addressing(StrEnum):
    auto = "auto"
    path = "path"
    virtual = "virtual"


SECRET_HELP = (
    "Read the secret (S3 secret access key, Swift key or password) from this file ('-': "
    "standard input); else OSB_BACKUP_DESTINATION_SECRET, else it is asked for. Never an "
    "argument: other users can see command lines."
)


def _destination_secret(secret_file: str | None, *, ask: bool) -> str | None:
    if secret_file:
        return read_secret_file(secret_file)
    from_env = os.environ.get("OSB_BACKUP_DESTINATION_SECRET")
    if from_env:
        return from_env
    if not ask:
        return None
    return str(typer.prompt("Secret (access key secret or password)", hide_input=True, err=True))


def _destination_fields(**fields: Any) -> dict[str, Any]:
    """The options given, by API field name (unset ones left out)."""
    return {name: value for name, value in fields.items() if value is not None}


@destinations_app.command("list")
@handled
def destinations_list(
    ctx: typer.Context, instance: Instance, limit: Limit = 20, every: All = False
) -> None:
    """List destinations, newest first."""
    _list(ctx, instance, "destinations", render.destinations, limit, every)


@destinations_app.command("show")
@handled
def destinations_show(
    ctx: typer.Context,
    instance: Instance,
    destination: Annotated[str, typer.Argument(help="Its name or id.")],
) -> None:
    """Show a destination (its secret is never shown, only whether it is set)."""
    _show(
        ctx, instance, lambda client: client.find("destinations", destination), render.destination
    )


@destinations_app.command("create")
@handled
def destinations_create(
    ctx: typer.Context,
    instance: Instance,
    name: Annotated[str, typer.Argument(help="A name for it, unique in the instance.")],
    kind: Annotated[Kind, typer.Option("--type", help="s3 or swift.")] = Kind.s3,
    endpoint: Annotated[
        str | None, typer.Option(help="S3: https://host[:port]; omit for AWS.")
    ] = None,
    region: Annotated[str | None, typer.Option(help="S3 region / Swift region name.")] = None,
    bucket: Annotated[str | None, typer.Option(help="S3 bucket.")] = None,
    access_key_id: Annotated[str | None, typer.Option(help="S3 access key id.")] = None,
    plain_http: Annotated[
        bool | None, typer.Option("--plain-http", help="S3: speak plain HTTP.")
    ] = None,
    addressing_style: Annotated[
        Addressing | None, typer.Option(help="S3 addressing style.")
    ] = None,
    auth_url: Annotated[str | None, typer.Option(help="Swift: the auth URL.")] = None,
    auth_version: Annotated[str | None, typer.Option(help="Swift: 1 or 3.")] = None,
    username: Annotated[str | None, typer.Option(help="Swift user.")] = None,
    user_domain: Annotated[str | None, typer.Option(help="Swift v3 user domain.")] = None,
    project: Annotated[str | None, typer.Option(help="Swift v3 project.")] = None,
    project_domain: Annotated[str | None, typer.Option(help="Swift v3 project domain.")] = None,
    container: Annotated[str | None, typer.Option(help="Swift container.")] = None,
    prefix: Annotated[str | None, typer.Option(help="Prefix of every stored object.")] = None,
    no_verify_tls: Annotated[
        bool, typer.Option("--no-verify-tls", help="Do not check the TLS certificate.")
    ] = False,
    secret_file: Annotated[str | None, typer.Option(help=SECRET_HELP)] = None,
    validate: Annotated[
        bool,
        typer.Option(help="Save it only if a probe object can be written, read and deleted."),
    ] = True,
    check_only: Annotated[
        bool,
        typer.Option(
            "--check-only", help="Only check these settings with a probe object; save nothing."
        ),
    ] = False,
) -> None:
    """Create a destination (checked first, unless --no-validate)."""
    with connected(ctx, instance) as (client, options):
        secret = _destination_secret(secret_file, ask=True)
        body: dict[str, Any] = {"type": kind.value.upper(), "name": name}
        if kind is Kind.s3:
            body |= _destination_fields(
                endpoint=endpoint,
                region=region,
                bucket=bucket,
                access_key_id=access_key_id,
                plain_http=plain_http,
                addressing_style=addressing_style.value if addressing_style else None,
                secret_access_key=secret,
            )
        else:
            body |= _destination_fields(
                auth_url=auth_url,
                auth_version=auth_version,
                username=username,
                user_domain_name=user_domain,
                project_name=project,
                project_domain_name=project_domain,
                region_name=region,
                container=container,
                password=secret,
            )
        body |= _destination_fields(prefix=prefix, verify_tls=False if no_verify_tls else None)
        if check_only:
            result = client.validate_settings(body)
            _output(options, result, render.validation)
            if not result["ok"]:
                raise typer.Exit(int(ExitCode.JOB_FAILED))
            return
        created = client.create_destination(body, validate=validate)
        if options.json:
            render.emit_json(created)
        else:
            render.message(f"Destination {created['name']} created: {created['id']}")


@destinations_app.command("edit")
@handled
def destinations_edit(
    ctx: typer.Context,
    instance: Instance,
    destination: Annotated[str, typer.Argument(help="Its name or id.")],
    name: Annotated[str | None, typer.Option(help="A new name.")] = None,
    endpoint: Annotated[str | None, typer.Option(help="S3 endpoint.")] = None,
    region: Annotated[str | None, typer.Option(help="S3 region / Swift region name.")] = None,
    bucket: Annotated[str | None, typer.Option(help="S3 bucket.")] = None,
    access_key_id: Annotated[str | None, typer.Option(help="S3 access key id.")] = None,
    auth_url: Annotated[str | None, typer.Option(help="Swift: the auth URL.")] = None,
    username: Annotated[str | None, typer.Option(help="Swift user.")] = None,
    container: Annotated[str | None, typer.Option(help="Swift container.")] = None,
    prefix: Annotated[str | None, typer.Option(help="Prefix of every stored object.")] = None,
    new_secret: Annotated[
        bool,
        typer.Option(
            "--new-secret",
            help="Send a new secret (from --secret-file, OSB_BACKUP_DESTINATION_SECRET or a "
            "prompt); needed when the endpoint or credentials change.",
        ),
    ] = False,
    secret_file: Annotated[str | None, typer.Option(help=SECRET_HELP)] = None,
    validate: Annotated[
        bool, typer.Option(help="Save the change only if a probe object round-trips.")
    ] = True,
) -> None:
    """Change a destination (the stored secret is kept unless --new-secret)."""
    with connected(ctx, instance) as (client, options):
        found = client.find("destinations", destination)
        patch = _destination_fields(
            name=name,
            endpoint=endpoint,
            region=region if found.get("type") == "S3" else None,
            region_name=region if found.get("type") == "SWIFT" else None,
            bucket=bucket,
            access_key_id=access_key_id,
            auth_url=auth_url,
            username=username,
            container=container,
            prefix=prefix,
        )
        if new_secret or secret_file:
            secret_field = "secret_access_key" if found.get("type") == "S3" else "password"
            patch[secret_field] = _destination_secret(secret_file, ask=True)
        if not patch:
            raise CliError("Nothing to change: give an option to change.", ExitCode.USAGE)
        try:
            changed = client.update_destination(found["id"], patch, validate=validate)
        except ApiFailure as failure:
            if failure.error == "secret_required":
                failure.hint = "Send the secret again with --new-secret."
            raise
        if options.json:
            render.emit_json(changed)
        else:
            render.message(f"Destination {changed['name']} changed.")


@destinations_app.command("validate")
@handled
def destinations_validate(
    ctx: typer.Context,
    instance: Instance,
    destination: Annotated[str, typer.Argument(help="Its name or id.")],
) -> None:
    """Check a destination: write, read back and delete a probe object. Exits 1 if it fails."""
    with connected(ctx, instance) as (client, options):
        found = client.find("destinations", destination)
        result = client.validate_destination(found["id"])
        _output(options, result, render.validation)
        if not result["ok"]:
            raise typer.Exit(int(ExitCode.JOB_FAILED))


@destinations_app.command("delete")
@handled
def destinations_delete(
    ctx: typer.Context,
    instance: Instance,
    destination: Annotated[str, typer.Argument(help="Its name or id.")],
    yes: Yes = False,
) -> None:
    """Delete a destination (refused while a plan, restore point or job uses it)."""
    _delete(
        ctx,
        instance,
        lambda client: client.find("destinations", destination),
        lambda found: f"Delete destination {found['name']}?",
        lambda client, found: client.delete_destination(found["id"]),
        lambda found: f"Destination {found['name']} deleted.",
        yes,
    )


# --- plans ----------------------------------------------------------------------------------


class KeepUnit(StrEnum):
    days = "days"
    hours = "hours"
    backups = "backups"


RETENTION_STYLE = {KeepUnit.days: "DAYS", KeepUnit.hours: "HOURS", KeepUnit.backups: "FILES"}

Schedule = Annotated[
    str | None,
    typer.Option("--schedule", help="When: five-field cron, e.g. '0 3 * * *' (3:00 daily)."),
]
Timezone = Annotated[
    str | None, typer.Option("--timezone", help="IANA zone the schedule is in (default UTC).")
]
Keep = Annotated[int | None, typer.Option("--keep", min=1, help="How many days/hours/backups.")]
Unit = Annotated[KeepUnit | None, typer.Option("--keep-unit", help="What --keep counts.")]
ItemsOption = Annotated[
    str | None, typer.Option("--items", help="Comma-separated items (default: all).")
]


KeepDaily = Annotated[
    int | None,
    typer.Option("--keep-daily", min=0, help="Keep the newest point of each of N days (0: none)."),
]
KeepWeekly = Annotated[
    int | None,
    typer.Option("--keep-weekly", min=0, help="Keep the newest point of each of N weeks."),
]
KeepMonthly = Annotated[
    int | None,
    typer.Option("--keep-monthly", min=0, help="Keep the newest point of each of N months."),
]
KeepYearly = Annotated[
    int | None,
    typer.Option("--keep-yearly", min=0, help="Keep the newest point of each of N years."),
]
MinGood = Annotated[
    int | None,
    typer.Option("--min-good", min=0, help="Never keep fewer than N good restore points."),
]
Rpo = Annotated[
    str | None,
    typer.Option(
        "--rpo",
        help="Recovery point objective, e.g. 26h, 90m, 2d or seconds ('auto': derived from "
        "the schedule).",
        show_default=False,
    ),
]
DrillSchedule = Annotated[
    str | None,
    typer.Option(
        "--drill-schedule",
        help="Restore drills on this five-field cron, e.g. '0 5 * * 0' ('off': none).",
        show_default=False,
    ),
]
YesConfirm = Annotated[
    bool,
    typer.Option(
        "--yes", "-y", help="Apply a retention change that deletes many points without asking."
    ),
]


def _counts(
    daily: int | None, weekly: int | None, monthly: int | None, yearly: int | None
) -> dict[str, int | None]:
    """The GFS counts given (0: none, sent as null so a merge patch removes it)."""
    given = {"daily": daily, "weekly": weekly, "monthly": monthly, "yearly": yearly}
    return {name: (value or None) for name, value in given.items() if value is not None}


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _rpo(value: str) -> int | None:
    """``--rpo``: seconds, or a number with s/m/h/d/w; 'auto' (None): derived."""
    text = value.strip().lower()
    if text == "auto":
        return None
    unit = DURATION_UNITS.get(text[-1:], 0)
    number = text[:-1] if unit else text
    if not number.isdigit():
        raise CliError(
            f"--rpo {value!r}: give a duration such as 26h, 90m, 2d, or seconds, or 'auto'.",
            ExitCode.USAGE,
        )
    return int(number) * (unit or 1)


def _drill(value: str) -> dict[str, Any] | None:
    """``--drill-schedule``: a drill on this cron; 'off' (None): no drill."""
    if value.strip().lower() == "off":
        return None
    return {"frequency": value, "enabled": True}


def _items(value: str | None) -> list[str] | None:
    return None if value is None else [part.strip() for part in value.split(",") if part.strip()]


@plans_app.command("list")
@handled
def plans_list(
    ctx: typer.Context, instance: Instance, limit: Limit = 20, every: All = False
) -> None:
    """List backup plans, newest first."""
    _list(ctx, instance, "plans", render.plans, limit, every)


@plans_app.command("show")
@handled
def plans_show(
    ctx: typer.Context, instance: Instance, plan: Annotated[str, typer.Argument(help="Name or id.")]
) -> None:
    """Show a backup plan."""
    _show(ctx, instance, lambda client: client.find("plans", plan), render.plan)


@plans_app.command("create")
@handled
def plans_create(
    ctx: typer.Context,
    instance: Instance,
    name: Annotated[str, typer.Argument(help="A name for it, unique in the instance.")],
    destination: Annotated[
        str, typer.Option("--destination", "-d", help="Where to store: destination name or id.")
    ],
    schedule: Annotated[
        str, typer.Option("--schedule", help="When: five-field cron, e.g. '0 3 * * *'.")
    ],
    keep: Keep = None,
    keep_unit: Annotated[KeepUnit, typer.Option("--keep-unit", help="What --keep counts.")] = (
        KeepUnit.days
    ),
    keep_daily: KeepDaily = None,
    keep_weekly: KeepWeekly = None,
    keep_monthly: KeepMonthly = None,
    keep_yearly: KeepYearly = None,
    min_good: MinGood = None,
    rpo: Rpo = None,
    drill_schedule: DrillSchedule = None,
    timezone: Timezone = None,
    items: ItemsOption = None,
    compression: Annotated[bool, typer.Option(help="Compress backups.")] = True,
    encrypt: Annotated[
        bool, typer.Option("--encrypt", help="Encrypt backups (the manager makes a key).")
    ] = False,
    encryption_key_file: Annotated[
        str | None,
        typer.Option(help="Encrypt with the key read from this file ('-': standard input)."),
    ] = None,
    paused: Annotated[bool, typer.Option("--paused", help="Create it paused.")] = False,
) -> None:
    """Create a backup plan: --keep and/or the --keep-daily/weekly/monthly/yearly counts (a
    point is kept if any rule keeps it), --min-good as a floor."""
    retention: dict[str, Any] = {
        name: value
        for name, value in _counts(keep_daily, keep_weekly, keep_monthly, keep_yearly).items()
        if value is not None
    }
    if keep is not None:
        retention |= {"style": RETENTION_STYLE[keep_unit], "period": keep}
    if min_good is not None:
        retention["min_good"] = min_good
    if not retention:
        raise CliError(
            "How long are backups kept? Give --keep and/or --keep-daily, --keep-weekly, "
            "--keep-monthly, --keep-yearly.",
            ExitCode.USAGE,
        )
    with connected(ctx, instance) as (client, options):
        dest = client.find("destinations", destination)
        body: dict[str, Any] = {
            "name": name,
            "destination_id": dest["id"],
            "frequency": schedule,
            "retention": retention,
            "compression": compression,
            "paused": paused,
        }
        if rpo is not None:
            body["rpo_seconds"] = _rpo(rpo)
        if drill_schedule is not None and _drill(drill_schedule) is not None:
            body["drill"] = _drill(drill_schedule)
        if timezone:
            body["timezone"] = timezone
        if items is not None:
            body["items"] = _items(items)
        if encrypt or encryption_key_file:
            body["encryption"] = {"enabled": True}
            if encryption_key_file:
                body["encryption"]["key"] = read_secret_file(encryption_key_file)
        created = client.create_plan(body)
        if options.json:
            render.emit_json(created)
        else:
            render.message(f"Plan {created['name']} created: {created['id']}")
            render.plan(created)


@plans_app.command("edit")
@handled
def plans_edit(
    ctx: typer.Context,
    instance: Instance,
    plan: Annotated[str, typer.Argument(help="Name or id.")],
    name: Annotated[str | None, typer.Option(help="A new name.")] = None,
    destination: Annotated[
        str | None, typer.Option("--destination", "-d", help="Destination name or id.")
    ] = None,
    schedule: Schedule = None,
    timezone: Timezone = None,
    keep: Keep = None,
    keep_unit: Unit = None,
    keep_daily: KeepDaily = None,
    keep_weekly: KeepWeekly = None,
    keep_monthly: KeepMonthly = None,
    keep_yearly: KeepYearly = None,
    min_good: MinGood = None,
    rpo: Rpo = None,
    drill_schedule: DrillSchedule = None,
    items: ItemsOption = None,
    compression: Annotated[bool | None, typer.Option(help="Compress backups.")] = None,
    yes: YesConfirm = False,
) -> None:
    """Change a backup plan (only what is given; a count of 0 removes that rule).

    A retention change that would delete many restore points at once shows how many and asks
    first (--yes: apply it); `plans retention-preview` shows which."""
    with connected(ctx, instance) as (client, options):
        found = client.find("plans", plan)
        patch: dict[str, Any] = _destination_fields(
            name=name,
            frequency=schedule,
            timezone=timezone,
            items=_items(items),
            compression=compression,
        )
        if destination is not None:
            patch["destination_id"] = client.find("destinations", destination)["id"]
        retention: dict[str, Any] = dict(
            _counts(keep_daily, keep_weekly, keep_monthly, keep_yearly)
        )
        if keep is not None:
            retention["period"] = keep
        if keep_unit is not None:
            retention["style"] = RETENTION_STYLE[keep_unit]
        if min_good is not None:
            retention["min_good"] = min_good
        if retention:
            patch["retention"] = retention
        if rpo is not None:
            patch["rpo_seconds"] = _rpo(rpo)
        if drill_schedule is not None:
            patch["drill"] = _drill(drill_schedule)
        if not patch:
            raise CliError("Nothing to change: give an option to change.", ExitCode.USAGE)
        try:
            changed = client.update_plan(found["id"], patch)
        except ApiFailure as failure:
            if failure.error != "confirmation_required":
                raise
            deleting, total = failure.body.get("would_delete"), failure.body.get("total")
            render.message(
                f"This change would delete {deleting} of plan {found['name']}'s {total} "
                "restore points at the next retention sweep (`osb-backup plans "
                f"retention-preview {client.instance_id} {found['name']}` with the same "
                "options lists them)."
            )
            _confirm("Apply it?", yes)
            changed = client.update_plan(found["id"], patch, confirm=True)
        _output(options, changed, render.plan)


@plans_app.command("retention-preview")
@handled
def plans_retention_preview(
    ctx: typer.Context,
    instance: Instance,
    plan: Annotated[str, typer.Argument(help="Name or id.")],
    keep: Keep = None,
    keep_unit: Annotated[KeepUnit, typer.Option("--keep-unit", help="What --keep counts.")] = (
        KeepUnit.days
    ),
    keep_daily: KeepDaily = None,
    keep_weekly: KeepWeekly = None,
    keep_monthly: KeepMonthly = None,
    keep_yearly: KeepYearly = None,
    min_good: MinGood = None,
    timezone: Timezone = None,
) -> None:
    """What retention would delete and keep now, and why: the plan's saved retention, or the
    one the options propose (given whole, not merged with the saved one)."""
    proposed: dict[str, Any] = {
        name: value
        for name, value in _counts(keep_daily, keep_weekly, keep_monthly, keep_yearly).items()
        if value is not None
    }
    if keep is not None:
        proposed |= {"style": RETENTION_STYLE[keep_unit], "period": keep}
    if min_good is not None:
        proposed["min_good"] = min_good
    if timezone is not None:
        proposed["timezone"] = timezone
    _show(
        ctx,
        instance,
        lambda client: client.retention_preview(client.find("plans", plan)["id"], proposed),
        render.retention_preview,
    )


def _pause(ctx: typer.Context, instance: str, plan: str, paused: bool) -> None:
    with connected(ctx, instance) as (client, options):
        found = client.find("plans", plan)
        changed = client.update_plan(found["id"], {"paused": paused})
        if options.json:
            render.emit_json(changed)
        else:
            state = (
                "paused"
                if paused
                else f"resumed; next run {render.when(changed.get('next_run_at'))}"
            )
            render.message(f"Plan {changed['name']} {state}.")


@plans_app.command("pause")
@handled
def plans_pause(
    ctx: typer.Context, instance: Instance, plan: Annotated[str, typer.Argument(help="Name or id.")]
) -> None:
    """Pause a plan: no scheduled backups until it is resumed."""
    _pause(ctx, instance, plan, True)


@plans_app.command("resume")
@handled
def plans_resume(
    ctx: typer.Context, instance: Instance, plan: Annotated[str, typer.Argument(help="Name or id.")]
) -> None:
    """Resume a paused plan."""
    _pause(ctx, instance, plan, False)


@plans_app.command("delete")
@handled
def plans_delete(
    ctx: typer.Context,
    instance: Instance,
    plan: Annotated[str, typer.Argument(help="Name or id.")],
    yes: Yes = False,
) -> None:
    """Delete a plan (its restore points stay until retention removes them)."""
    _delete(
        ctx,
        instance,
        lambda client: client.find("plans", plan),
        lambda found: f"Delete plan {found['name']} (its queued jobs are cancelled)?",
        lambda client, found: client.delete_plan(found["id"]),
        lambda found: f"Plan {found['name']} deleted.",
        yes,
    )


# --- backup and restore ---------------------------------------------------------------------


@app.command("backup")
@handled
def backup(
    ctx: typer.Context,
    instance: Instance,
    plan: Annotated[
        str | None,
        typer.Option("--plan", "-p", help="The plan (name or id); needed if there are several."),
    ] = None,
    follow: Wait = False,
) -> None:
    """Back up now, with a plan's settings."""
    with connected(ctx, instance) as (client, options):
        if plan is not None:
            plan_id = client.find("plans", plan)["id"]
        else:
            every = list(client.every("plans"))
            if len(every) != 1:
                names = ", ".join(str(p.get("name")) for p in every) or "none yet"
                raise CliError(
                    f"Which plan? Give --plan (the instance's plans: {names}).",
                    ExitCode.USAGE if every else ExitCode.NOT_FOUND,
                    hint=None if every else "`osb-backup plans create` makes one.",
                )
            plan_id = every[0]["id"]
        _finish(client.backup(plan_id), options, client, follow)


def _restore_items(values: list[str] | None) -> list[str | dict[str, str]] | None:
    if not values:
        return None
    chosen: list[str | dict[str, str]] = []
    for value in values:
        name, sep, target = value.partition("=")
        chosen.append({"name": name, "target": target} if sep else name)
    return chosen


@app.command("restore")
@handled
def restore(
    ctx: typer.Context,
    instance: Instance,
    point: Annotated[
        str,
        typer.Option("--from", "-f", help="The restore point's id (`restore-points list`)."),
    ],
    item: Annotated[
        list[str] | None,
        typer.Option(
            "--item", "-i", help="Restore only this item; NAME=TARGET restores it into TARGET."
        ),
    ] = None,
    into: Annotated[
        str | None,
        typer.Option("--into", help="Restore into this other instance (name or GUID)."),
    ] = None,
    yes: Yes = False,
    follow: Wait = False,
) -> None:
    """Restore a restore point: its data overwrites the target databases."""
    with connected(ctx, instance) as (client, options):
        target = options.log_in().instance_id(into) if into is not None else None
        chosen = _restore_items(item)
        found = client.restore_point(point)
        names = [
            (f"{entry['name']} -> {entry['target']}" if isinstance(entry, dict) else entry)
            for entry in chosen or [str(i.get("name")) for i in found.get("items") or []]
        ]
        _confirm(
            f"Overwrite {', '.join(names)} of instance {into or instance} with the backup of "
            f"{render.when(found.get('created_at'))}?",
            yes,
        )
        job = client.restore(point, target_instance_id=target, items=chosen)
        if target is not None and target != client.instance_id:
            # The job belongs to the target instance: follow it there.
            with connected(ctx, target) as (target_client, _):
                _finish(job, options, target_client, follow)
        else:
            _finish(job, options, client, follow)


@app.command("drill")
@handled
def drill(
    ctx: typer.Context,
    instance: Instance,
    plan: Annotated[
        str | None,
        typer.Argument(
            help="Drill this plan's newest restore point (name or id).", show_default=False
        ),
    ] = None,
    point: Annotated[
        str | None,
        typer.Option("--point", help="Drill this restore point instead (its id)."),
    ] = None,
    follow: Wait = False,
) -> None:
    """Start a restore drill: a restore point is downloaded, decrypted and checked (and given
    to the verify script), never restored into the live database."""
    if (plan is None) == (point is None):
        raise CliError("Give a plan or --point (one of them).", ExitCode.USAGE)
    with connected(ctx, instance) as (client, options):
        if point is not None:
            job = client.drill_point(point)
        else:
            assert plan is not None
            job = client.drill_plan(client.find("plans", plan)["id"])
        _finish(job, options, client, follow)


@app.command("protection")
@handled
def protection(ctx: typer.Context, instance: Instance) -> None:
    """Whether the instance meets its plans' recovery point objectives, per plan with reasons."""
    _show(ctx, instance, lambda client: client.protection(), render.protection)


# --- jobs -----------------------------------------------------------------------------------


class JobType(StrEnum):
    backup = "backup"
    restore = "restore"
    drill = "drill"


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    missed = "missed"


JobId = Annotated[str, typer.Argument(help="The job's id (`jobs list`).")]


@jobs_app.command("list")
@handled
def jobs_list(
    ctx: typer.Context,
    instance: Instance,
    job_type: Annotated[JobType | None, typer.Option("--type", help="Only these.")] = None,
    status: Annotated[JobStatus | None, typer.Option("--status", help="Only these.")] = None,
    plan: Annotated[str | None, typer.Option("--plan", "-p", help="Only this plan's.")] = None,
    limit: Limit = 20,
    every: All = False,
) -> None:
    """List jobs, newest first."""

    def filters(client: Client) -> dict[str, Any]:
        return {
            "type": job_type.value.upper() if job_type else None,
            "status": status.value.upper() if status else None,
            "plan_id": client.find("plans", plan)["id"] if plan else None,
        }

    _list(ctx, instance, "jobs", render.jobs, limit, every, filters)


@jobs_app.command("show")
@handled
def jobs_show(ctx: typer.Context, instance: Instance, job_id: JobId) -> None:
    """Show a job: status, reason, and each item's stage and sizes."""
    _show(ctx, instance, lambda client: client.job(job_id), render.job)


@jobs_app.command("logs")
@handled
def jobs_logs(
    ctx: typer.Context,
    instance: Instance,
    job_id: JobId,
    item: Annotated[str | None, typer.Option("--item", "-i", help="Only this item's.")] = None,
) -> None:
    """Print a job's stage logs (each cut to its last bytes by the manager)."""
    with connected(ctx, instance) as (client, options):
        job = client.job(job_id)
        if options.json:
            render.emit_json({i["name"]: i.get("logs") or {} for i in job.get("items") or []})
        else:
            render.logs(job, item)


@jobs_app.command("wait")
@handled
def jobs_wait(ctx: typer.Context, instance: Instance, job_id: JobId) -> None:
    """Follow a job until it ends; exit 1 if it did not succeed."""
    with connected(ctx, instance) as (client, options):
        _finish(client.job(job_id), options, client, True)


@jobs_app.command("cancel")
@handled
def jobs_cancel(ctx: typer.Context, instance: Instance, job_id: JobId) -> None:
    """Cancel a job: a queued one at once, a running one at its next stage boundary."""
    with connected(ctx, instance) as (client, options):
        job = client.cancel_job(job_id)
        if options.json:
            render.emit_json(job)
        elif job["status"] == "CANCELLED":
            render.message(f"Job {job['id']} cancelled.")
        else:
            render.message(f"Job {job['id']} was asked to stop; it ends CANCELLED shortly.")


# --- restore points -------------------------------------------------------------------------

PointId = Annotated[str, typer.Argument(help="The restore point's id (`restore-points list`).")]


@points_app.command("list")
@handled
def points_list(
    ctx: typer.Context,
    instance: Instance,
    plan: Annotated[str | None, typer.Option("--plan", "-p", help="Only this plan's.")] = None,
    limit: Limit = 20,
    every: All = False,
) -> None:
    """List restore points (successful backups), newest first."""

    def filters(client: Client) -> dict[str, Any]:
        return {"plan_id": client.find("plans", plan)["id"] if plan else None}

    _list(ctx, instance, "restore_points", render.restore_points, limit, every, filters)


@points_app.command("show")
@handled
def points_show(ctx: typer.Context, instance: Instance, point: PointId) -> None:
    """Show a restore point: its items, sizes and checksums."""
    _show(ctx, instance, lambda client: client.restore_point(point), render.restore_point)


@points_app.command("delete")
@handled
def points_delete(ctx: typer.Context, instance: Instance, point: PointId, yes: Yes = False) -> None:
    """Delete a restore point: its stored files, then its record."""
    _delete(
        ctx,
        instance,
        lambda client: client.restore_point(point),
        lambda found: f"Delete the backup of {render.when(found.get('created_at'))}?",
        lambda client, _found: client.delete_restore_point(point),
        lambda _found: f"Restore point {point} deleted.",
        yes,
    )


@points_app.command("pin")
@handled
def points_pin(
    ctx: typer.Context,
    instance: Instance,
    point: PointId,
    reason: Annotated[str, typer.Option("--reason", help="Why it is kept (1 to 500 characters).")],
) -> None:
    """Pin a restore point: retention keeps it and it cannot be deleted until unpinned."""
    with connected(ctx, instance) as (client, options):
        pinned = client.pin_restore_point(point, reason)
        if options.json:
            render.emit_json(pinned)
        else:
            render.message(f"Restore point {point} pinned.")


@points_app.command("unpin")
@handled
def points_unpin(ctx: typer.Context, instance: Instance, point: PointId) -> None:
    """Unpin a restore point: retention decides again."""
    with connected(ctx, instance) as (client, options):
        unpinned = client.pin_restore_point(point, None)
        if options.json:
            render.emit_json(unpinned)
        else:
            render.message(f"Restore point {point} unpinned; retention decides again.")


# --- webhooks -------------------------------------------------------------------------------

WebhookId = Annotated[str, typer.Argument(help="The webhook's id (`webhooks list`).")]
WEBHOOK_SECRET_HELP = (
    "Read the signing secret (16 to 256 characters) from this file ('-': standard input); "
    "else OSB_BACKUP_WEBHOOK_SECRET, else it is asked for. Never an argument."
)


class Event(StrEnum):
    job_succeeded = "job.succeeded"
    job_failed = "job.failed"
    protection_changed = "protection.changed"
    drill_failed = "drill.failed"
    restore_point_expired = "restore_point.expired"
    restore_point_deleted = "restore_point.deleted"


def _webhook_secret(secret_file: str | None) -> str:
    if secret_file:
        return read_secret_file(secret_file)
    from_env = os.environ.get("OSB_BACKUP_WEBHOOK_SECRET")
    if from_env:
        return from_env
    try:
        return str(typer.prompt("Signing secret", hide_input=True, err=True))
    except typer.Abort:  # no answer (standard input closed)
        raise CliError(
            "No signing secret: give --secret-file, set OSB_BACKUP_WEBHOOK_SECRET or answer "
            "the prompt.",
            ExitCode.USAGE,
        ) from None


@webhooks_app.command("list")
@handled
def webhooks_list(
    ctx: typer.Context, instance: Instance, limit: Limit = 20, every: All = False
) -> None:
    """List webhooks, newest first."""
    _list(ctx, instance, "webhooks", render.webhooks, limit, every)


@webhooks_app.command("show")
@handled
def webhooks_show(ctx: typer.Context, instance: Instance, webhook: WebhookId) -> None:
    """Show a webhook (its secret is never shown, only whether it is set)."""
    _show(ctx, instance, lambda client: client.webhook(webhook), render.webhook)


@webhooks_app.command("create")
@handled
def webhooks_create(
    ctx: typer.Context,
    instance: Instance,
    url: Annotated[str, typer.Option("--url", help="Where events are POSTed (https://).")],
    event: Annotated[
        list[Event], typer.Option("--event", "-e", help="An event wanted (repeat for several).")
    ],
    secret_file: Annotated[str | None, typer.Option(help=WEBHOOK_SECRET_HELP)] = None,
    description: Annotated[str | None, typer.Option(help="What it is for.")] = None,
    disabled: Annotated[
        bool, typer.Option("--disabled", help="Create it disabled (nothing is sent).")
    ] = False,
) -> None:
    """Create a webhook: the manager POSTs the chosen events to the URL, signed with the
    secret (docs/webhooks.md shows how to verify them)."""
    secret = _webhook_secret(secret_file)
    with connected(ctx, instance) as (client, options):
        body: dict[str, Any] = {
            "url": url,
            "events": [e.value for e in dict.fromkeys(event)],
            "secret": secret,
            "enabled": not disabled,
        }
        if description is not None:
            body["description"] = description
        created = client.create_webhook(body)
        if options.json:
            render.emit_json(created)
        else:
            render.message(f"Webhook {created['id']} created.")
            render.webhook(created)


@webhooks_app.command("delete")
@handled
def webhooks_delete(
    ctx: typer.Context, instance: Instance, webhook: WebhookId, yes: Yes = False
) -> None:
    """Delete a webhook (its unsent deliveries are dropped)."""
    _delete(
        ctx,
        instance,
        lambda client: client.webhook(webhook),
        lambda found: f"Delete the webhook to {found['url']}?",
        lambda client, found: client.delete_webhook(found["id"]),
        lambda found: f"Webhook {found['id']} deleted.",
        yes,
    )


@webhooks_app.command("deliveries")
@handled
def webhooks_deliveries(
    ctx: typer.Context, instance: Instance, webhook: WebhookId, limit: Limit = 20
) -> None:
    """A webhook's delivery log, newest first: state, attempts, the last answer or error."""
    with connected(ctx, instance) as (client, options):
        page = client.deliveries(webhook, limit=limit)
        if not options.json:
            render.page_note(len(page["items"]), page["total"], page["next_cursor"] is not None)
        _output(options, page["items"], render.deliveries)


def run() -> None:
    """Run the command-line tool."""
    app()


# The operators' import is declared in a module of its own (it uses app and handled).
from cli import recovery as _recovery  # noqa: E402, F401
