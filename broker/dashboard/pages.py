"""The dashboard's pages: each reads the session, asks the API's authorizer what the user may
do with the instance (``read`` to look, ``manage`` to change), calls the domain as the /v1
API does, and renders a template. Changes are HTML form posts carrying the session's CSRF token,
answered with a redirect (post, redirect, get)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import jwt
import structlog
from aiohttp import web
from multidict import CIMultiDict
from pydantic import ValidationError

from backup import audit, destinations, drill, jobs, plans, protection, restore_points, retention
from backup.database import Database, Document
from backup.errors import BackupError, Conflict
from backup.instances import LIVE_STATES
from backup.pagination import now
from backup.secrets import SecretBox
from broker.api import models, views
from broker.api.auth import AUTHORIZER, Authorizer, Principal
from broker.api.routes import API_SETTINGS
from broker.api.settings import ApiSettings
from broker.context import DATABASE, REQUEST_ID, SECRETS, SETTINGS
from broker.dashboard import oauth, plots
from broker.dashboard.links import PREFIX, instance_url
from broker.dashboard.render import render
from broker.dashboard.session import (
    COOKIE_PATH,
    SESSION_COOKIE,
    SIGN_IN_COOKIE,
    SIGN_IN_SECONDS,
    Session,
    SignIn,
    forget,
    new_csrf,
    new_state,
    read_session,
    read_sign_in,
    safe_next,
    same_secret,
    write_session,
    write_sign_in,
)
from broker.errors import ApiError, from_domain

log = structlog.get_logger(__name__)

ENDPOINTS = web.AppKey("dashboard_endpoints", dict[str, oauth.Endpoints])
"""The identity provider's endpoints, discovered on first sign-in (keyed by issuer)."""
LIST_LIMIT = 50
PLOT_JOBS = 60


class SignInRequired(Exception):
    """The page needs a session; the user is sent to sign in and brought back."""


@dataclass
class Page:
    """A page about one instance, for a signed-in user who may read it."""

    request: web.Request
    session: Session
    principal: Principal
    instance: Document
    may_manage: bool

    @property
    def instance_id(self) -> str:
        return str(self.instance["_id"])

    @property
    def db(self) -> Database:
        return self.request.config_dict[DATABASE]

    @property
    def box(self) -> SecretBox:
        return self.request.config_dict[SECRETS]

    @property
    def api(self) -> ApiSettings:
        return self.request.config_dict[API_SETTINGS]

    def url(self, *parts: str) -> str:
        return "/".join([instance_url(self.instance_id), *(quote(p, safe="") for p in parts)])

    def render(self, template: str, **values: Any) -> web.Response:
        return render(
            self.request,
            template,
            session=self.session,
            instance=self.instance,
            instance_name=instance_name(self.instance),
            base=instance_url(self.instance_id),
            may_manage=self.may_manage,
            **values,
        )


def instance_name(instance: Document) -> str:
    context = instance.get("context") or {}
    name = context.get("instance_name") if isinstance(context, dict) else None
    return str(name) if name else str(instance["_id"])


def _redirect_uri(request: web.Request) -> str:
    return f"{request.config_dict[SETTINGS].base_url}{COOKIE_PATH}/callback"


def _authorizer(request: web.Request) -> Authorizer:
    return request.config_dict[AUTHORIZER]


async def principal_of(request: web.Request, token: str) -> Principal:
    """The user as the API's authorizer sees a request with this access token: its
    signature, issuer, audience and expiry are checked again on every page."""
    headers = CIMultiDict(request.headers)
    headers["Authorization"] = f"Bearer {token}"
    try:
        return await _authorizer(request).authenticate(request.clone(headers=headers))
    except ApiError as err:
        if err.status == 401:
            raise SignInRequired from None
        raise


async def _session(request: web.Request) -> Session:
    session = read_session(request, request.config_dict[SECRETS])
    if session is None:
        raise SignInRequired
    return session


async def _form(request: web.Request, session: Session) -> Mapping[str, str]:
    """A change's form fields, once its CSRF token is the session's."""
    posted = await request.post()
    form = {name: value for name, value in posted.items() if isinstance(value, str)}
    if not same_secret(form.get("csrf"), session.csrf):
        log.warning("dashboard_csrf_refused", path=request.path)
        raise ApiError(403, "csrf_refused", "This form has expired; reload the page and retry.")
    return form


async def instance_page(request: web.Request, *, manage: bool = False) -> Page:
    """The instance the path names, if the session's user may read it (and manage it)."""
    session = await _session(request)
    principal = await principal_of(request, session.token)
    authorizer = _authorizer(request)
    instance_id = request.match_info["instance_id"]
    instance = await authorizer.instance_for(principal, instance_id, manage)
    _, may_manage = await authorizer.permissions(principal, instance_id)
    return Page(request, session, principal, instance, may_manage)


_CHANGE: web.RequestKey[tuple[Page, Mapping[str, str]]] = web.RequestKey("dashboard_change")
"""The request's key of the change being made (its page and form), for the audit trail."""


async def change(request: web.Request) -> tuple[Page, Mapping[str, str]]:
    """A change to the instance: the caller must manage it, and the form carry the session's
    CSRF token (the principal is found first: a request read cannot be cloned)."""
    page = await instance_page(request, manage=True)
    form = await _form(request, page.session)
    request[_CHANGE] = (page, form)
    return page, form


def audited(handler: Handler, action: str, kind: str) -> Handler:
    """Records a change made through the dashboard in the audit trail, as the API records its
    own (the same action names): once it succeeded, which a change says by redirecting (post,
    redirect, get). A change that answers a page (a question, a failure) changed nothing."""

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPSeeOther as done:
            page, form = request[_CHANGE]
            # a change that starts a job shows it: the job is what was made
            location = str(done.location)
            shown = location.split("/jobs/", 1)[1] if "/jobs/" in location else None
            named = [v for n, v in request.match_info.items() if n != "instance_id"]
            await audit.record(
                page.db,
                audit.Actor(audit.ActorKind(page.principal.kind), page.principal.subject),
                action,
                audit.Resource(kind, shown or (named[-1] if named else None)),
                [name for name in form if name not in ("csrf", "confirm")],
                request.get(REQUEST_ID),
                instance_id=page.instance_id,
            )
            raise

    return handle


def see(location: str) -> web.HTTPSeeOther:
    """Raised after a change: the browser gets the changed page (post, redirect, get)."""
    return web.HTTPSeeOther(location)


def redirect(location: str, status: int = 303) -> web.Response:
    """A redirect that sets or clears cookies (an HTTP exception would lose them)."""
    return web.Response(status=status, headers={"Location": location})


# --- sign-in ---------------------------------------------------------------------------------


async def sign_in(request: web.Request) -> web.StreamResponse:
    """Sends the browser to the identity provider with a fresh ``state`` kept in a sealed
    cookie, to come back to ``next``."""
    settings = request.config_dict[SETTINGS]
    api = request.config_dict[API_SETTINGS]
    if settings.dashboard_client_secret is None or not api.oidc_issuer:
        return render(
            request,
            "message.html",
            status=503,
            title="Sign-in is not configured",
            message="The operator has not configured the dashboard's sign-in "
            "(DASHBOARD_CLIENT_SECRET and OIDC_ISSUER).",
        )
    endpoints = await _endpoints(request, api.oidc_issuer)
    state = new_state()
    response = redirect(
        oauth.authorize_url(endpoints, settings.dashboard_client_id, _redirect_uri(request), state),
        302,
    )
    pending = SignIn(state, safe_next(request.query.get("next")), time.time() + SIGN_IN_SECONDS)
    write_sign_in(response, request, request.config_dict[SECRETS], settings.base_url, pending)
    return response


async def _endpoints(request: web.Request, issuer: str) -> oauth.Endpoints:
    known = request.config_dict[ENDPOINTS]
    if issuer not in known:
        known[issuer] = await oauth.discover(_authorizer(request).http, issuer)
    return known[issuer]


async def callback(request: web.Request) -> web.StreamResponse:
    """The identity provider's redirect back: the state must be the one we sent, the code
    is exchanged for an access token, which the API's authorizer must accept."""
    settings = request.config_dict[SETTINGS]
    api = request.config_dict[API_SETTINGS]
    box = request.config_dict[SECRETS]
    pending = read_sign_in(request, box)
    if pending is None or not same_secret(request.query.get("state"), pending.state):
        return _sign_in_failed(request, "This sign-in was not started here or has expired.")
    code = request.query.get("code")
    if not code or settings.dashboard_client_secret is None or not api.oidc_issuer:
        return _sign_in_failed(request, "The identity provider did not sign you in.")
    try:
        token = await oauth.exchange(
            _authorizer(request).http,
            await _endpoints(request, api.oidc_issuer),
            client_id=settings.dashboard_client_id,
            client_secret=settings.dashboard_client_secret.get_secret_value(),
            code=code,
            redirect_uri=_redirect_uri(request),
        )
    except oauth.SignInFailed as exc:
        return _sign_in_failed(request, str(exc))
    try:
        principal = await principal_of(request, token)
    except SignInRequired:
        return _sign_in_failed(request, "The identity provider's token was not accepted.")
    claims = _claims(token)
    name = claims.get("user_name") or claims.get("email") or principal.subject
    expires = claims.get("exp")
    session = Session(
        subject=principal.subject,
        name=str(name)[:200],
        token=token,
        operator=principal.kind == "operator",
        csrf=new_csrf(),
        expires_at=min(
            time.time() + settings.dashboard_session_seconds,
            float(expires) if isinstance(expires, int | float) else time.time(),
        ),
    )
    response = redirect(pending.next_path)
    write_session(response, request, box, settings.base_url, session)
    forget(response, SIGN_IN_COOKIE)
    log.info("dashboard_sign_in", subject=principal.subject, operator=session.operator)
    return response


def _claims(token: str) -> dict[str, Any]:
    """The claims of a token the authorizer has just verified: the name to show, and the
    expiry the session may not outlive."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return {}
    return claims if isinstance(claims, dict) else {}


def _sign_in_failed(request: web.Request, message: str) -> web.Response:
    response = render(request, "message.html", status=400, title="Sign-in failed", message=message)
    forget(response, SIGN_IN_COOKIE)
    return response


async def sign_out(request: web.Request) -> web.StreamResponse:
    session = await _session(request)
    await _form(request, session)
    response = redirect(COOKIE_PATH + "/signed-out")
    forget(response, SESSION_COOKIE)
    return response


async def signed_out(request: web.Request) -> web.Response:
    return render(
        request, "message.html", title="Signed out", message="You are signed out of the dashboard."
    )


# --- home and the fleet ----------------------------------------------------------------------


async def home(request: web.Request) -> web.StreamResponse:
    session = await _session(request)
    if session.operator:
        raise see(COOKIE_PATH + "/fleet")
    return render(
        request,
        "message.html",
        session=session,
        title="Open an instance",
        message="Open the dashboard of a service instance from your platform "
        "(cf service NAME shows its dashboard URL).",
    )


async def fleet(request: web.Request) -> web.Response:
    """Every live instance with its latest job, failures first (operators only)."""
    session = await _session(request)
    principal = await principal_of(request, session.token)
    if principal.kind != "operator":
        raise ApiError(403, "forbidden", "Only operators see the fleet.")
    db = request.config_dict[DATABASE]
    instances = await db.instances.find({"state": {"$in": list(LIVE_STATES)}}).to_list(500)
    rows = []
    for instance in instances:
        last = await db.jobs.find_one(
            {"instance_id": instance["_id"]},
            {"items.logs": 0},
            sort=[("created_at", -1)],
        )
        failed = await db.jobs.count_documents(
            {"instance_id": instance["_id"], "status": jobs.JobStatus.FAILED}
        )
        rows.append(
            {
                "id": instance["_id"],
                "name": instance_name(instance),
                "url": instance_url(str(instance["_id"])),
                "last": last,
                "failed": failed,
            }
        )
    rows.sort(
        key=lambda row: (not (row["last"] and row["last"]["status"] == "FAILED"), row["name"])
    )
    return render(request, "fleet.html", session=session, rows=rows)


# --- one instance ----------------------------------------------------------------------------


async def _plan_views(db: Database, instance_id: str) -> list[models.PlanOut]:
    page = await plans.list_page(db, instance_id, LIST_LIMIT, None)
    last = await jobs.last_jobs(db, [d["last_job_id"] for d in page.items if d.get("last_job_id")])
    return [views.plan(d, last.get(d.get("last_job_id") or "")) for d in page.items]


async def instance(request: web.Request) -> web.Response:
    """Protection at a glance: recent failures first, then the last and next backups."""
    page = await instance_page(request)
    failures = await jobs.list_page(
        page.db, page.instance_id, status=jobs.JobStatus.FAILED, limit=5, cursor=None
    )
    last_backup = await jobs.list_page(
        page.db,
        page.instance_id,
        type=jobs.JobType.BACKUP,
        status=jobs.JobStatus.SUCCEEDED,
        limit=1,
        cursor=None,
    )
    plan_views = await _plan_views(page.db, page.instance_id)
    upcoming = [p.next_run_at for p in plan_views if p.next_run_at is not None]
    evaluated = await protection.evaluate(page.db, now(), instance_ids=[page.instance_id])
    state = views.protection(evaluated[0])
    return page.render(
        "instance.html",
        failures=[views.job(d, None) for d in failures.items],
        last_backup=views.job(last_backup.items[0], None) if last_backup.items else None,
        next_backup=min(upcoming) if upcoming else None,
        plans=plan_views,
        protection=state,
        plan_protection={p.plan_id: p for p in state.plans},
    )


async def plan_list(request: web.Request) -> web.Response:
    page = await instance_page(request)
    dests = await destinations.list_page(page.db, page.instance_id, LIST_LIMIT, None)
    return page.render(
        "plans.html",
        plans=await _plan_views(page.db, page.instance_id),
        destinations=[views.destination(d) for d in dests.items],
    )


RETENTION_COUNTS = ("daily", "weekly", "monthly", "yearly", "min_good")


def _number(form: Mapping[str, str], name: str, label: str) -> int | None:
    """A whole number from the form; empty: none."""
    text = form.get(name, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ApiError(400, "invalid_input", f"{label} must be a whole number.") from None


def _retention_fields(form: Mapping[str, str]) -> dict[str, Any]:
    """The retention a form describes, every rule present (None: that rule is not used), so
    that as a merge patch it replaces the saved retention whole."""
    style = form.get("retention_style", "") or None
    period = _number(form, "retention_period", "The retention period")
    if (style is None) != (period is None):
        raise ApiError(
            400,
            "invalid_input",
            "Give the age or count rule both a number and what it counts (days, hours, latest "
            "backups), or neither.",
        )
    fields: dict[str, Any] = {"style": style, "period": period}
    for name in RETENTION_COUNTS:
        value = _number(form, f"retention_{name}", f"The {name.replace('_', ' ')} count")
        # 0 of a GFS count means "not used"; min_good 0 is a valid floor, but also none
        fields[name] = value or None
    return fields


def _plan_fields(form: Mapping[str, str]) -> dict[str, Any]:
    """The plan a form describes, in the API's shape (what the PlanIn model validates)."""
    return {
        "name": form.get("name", ""),
        "destination_id": form.get("destination_id", ""),
        "frequency": form.get("frequency", ""),
        "timezone": form.get("timezone") or "UTC",
        "retention": _retention_fields(form),
        "compression": form.get("compression") == "on",
    }


async def plan_create(request: web.Request) -> web.StreamResponse:
    page, form = await change(request)
    fields = _plan_fields(form)
    fields["retention"] = {k: v for k, v in fields["retention"].items() if v is not None}
    fields["encryption"] = {"enabled": form.get("encryption") == "on"}
    spec = models.PlanIn.model_validate(fields)
    await plans.create(page.db, page.box, page.instance, spec, page.api.min_plan_interval_seconds)
    raise see(page.url("plans"))


async def plan_edit(request: web.Request) -> web.Response:
    page = await instance_page(request)
    doc = await plans.get(page.db, page.instance_id, request.match_info["plan_id"])
    dests = await destinations.list_page(page.db, page.instance_id, LIST_LIMIT, None)
    return page.render(
        "plan_edit.html",
        plan=views.plan(doc, None),
        destinations=[views.destination(d) for d in dests.items],
    )


async def _update_plan(page: Page, patch: dict[str, Any], *, confirmed: bool = True) -> None:
    """As the API's PATCH: a retention or time zone change that would delete many points at
    once is refused (:class:`retention.ConfirmationRequired`) unless ``confirmed``."""

    async def confirm_retention(current: Document, fields: Document) -> None:
        if not confirmed:
            await retention.check_change(
                page.db,
                current,
                fields["retention"],
                fields["timezone"],
                now(),
                fraction=page.api.retention_confirm_fraction,
                min_points=page.api.retention_confirm_min_points,
            )

    await plans.update(
        page.db,
        page.box,
        page.instance,
        page.request.match_info["plan_id"],
        patch,
        page.api.min_plan_interval_seconds,
        check=confirm_retention,
    )


async def plan_update(request: web.Request) -> web.StreamResponse:
    """Saves the plan form; a retention change that deletes many points shows how many and
    asks again (the confirm page posts the same form with ``confirm=true``)."""
    page, form = await change(request)
    patch = _plan_fields(form)
    models.PlanPatch.model_validate(patch)
    try:
        await _update_plan(page, patch, confirmed=form.get("confirm") == "true")
    except retention.ConfirmationRequired as exc:
        doc = await plans.get(page.db, page.instance_id, request.match_info["plan_id"])
        fields = {k: v for k, v in form.items() if k not in ("csrf", "confirm")}
        return page.render(
            "plan_confirm.html",
            status=409,
            plan=views.plan(doc, None),
            fields=fields,
            proposed=patch["retention"],
            would_delete=exc.counts["would_delete"],
            total=exc.counts["total"],
        )
    raise see(page.url("plans"))


async def plan_pause(request: web.Request) -> web.StreamResponse:
    page, form = await change(request)
    await _update_plan(page, {"paused": form.get("paused") == "true"})
    raise see(page.url("plans"))


async def plan_run(request: web.Request) -> web.StreamResponse:
    page, _ = await change(request)
    plan = await plans.get(page.db, page.instance_id, request.match_info["plan_id"])
    job = await jobs.start_backup(page.db, plan)
    raise see(page.url("jobs", str(job["_id"])))


async def plan_drill(request: web.Request) -> web.StreamResponse:
    """Drill now: a restore drill of the plan's newest restore point, as the API's
    ``POST .../plans/{id}/drill``; the browser follows the job."""
    page, _ = await change(request)
    plan = await plans.get(page.db, page.instance_id, request.match_info["plan_id"])
    point = await drill.newest_point(page.db, plan["_id"], instance_id=page.instance_id)
    if point is None:
        raise Conflict(
            "This plan has no available restore point to drill; run a backup first.",
            code="no_restore_point",
        )
    job = await jobs.start_drill(page.db, plan, point)
    raise see(page.url("jobs", str(job["_id"])))


async def job_list(request: web.Request) -> web.Response:
    page = await instance_page(request)
    found = await jobs.list_page(page.db, page.instance_id, limit=LIST_LIMIT, cursor=None)
    items = [views.job(d, None) for d in found.items]
    return page.render("jobs.html", jobs=items, live=any(j.status in jobs.ACTIVE for j in items))


async def job_detail(request: web.Request) -> web.Response:
    """A job with its items' stages and logs; the page reloads itself while the job runs."""
    page = await instance_page(request)
    doc = await jobs.get(page.db, page.instance_id, request.match_info["job_id"])
    job = views.job(doc, page.api.job_log_max_bytes, page.api.job_logs_total_max_bytes)
    return page.render("job.html", job=job, live=job.status in jobs.ACTIVE)


async def job_cancel(request: web.Request) -> web.StreamResponse:
    page, _ = await change(request)
    await jobs.cancel(page.db, page.instance_id, request.match_info["job_id"])
    raise see(page.url("jobs", request.match_info["job_id"]))


async def point_list(request: web.Request) -> web.Response:
    page = await instance_page(request)
    found = await restore_points.list_page(
        page.db, page.instance_id, plan_id=None, limit=LIST_LIMIT, cursor=None
    )
    return page.render("restore_points.html", points=[views.restore_point(d) for d in found.items])


async def point_pin(request: web.Request) -> web.StreamResponse:
    """Pins a restore point (a reason required) or, with ``pinned=false``, unpins it."""
    page, form = await change(request)
    pinned = form.get("pinned") == "true"
    spec = models.RestorePointPatch.model_validate(
        {"pinned": True, "pin_reason": form.get("pin_reason", "")} if pinned else {"pinned": False}
    )
    await restore_points.pin(
        page.db,
        page.instance_id,
        request.match_info["point_id"],
        pinned=spec.pinned,
        reason=spec.pin_reason,
    )
    raise see(page.url("restore_points"))


async def restore_confirm(request: web.Request) -> web.Response:
    """What a restore will overwrite, asked before it is done."""
    page = await instance_page(request, manage=True)
    doc = await restore_points.get(page.db, page.instance_id, request.match_info["point_id"])
    return page.render("restore_confirm.html", point=views.restore_point(doc))


async def restore(request: web.Request) -> web.StreamResponse:
    page, _ = await change(request)
    point = await restore_points.get(page.db, page.instance_id, request.match_info["point_id"])
    job = await jobs.start_restore(page.db, point, None, target=None)
    raise see(page.url("jobs", str(job["_id"])))


async def destination_list(request: web.Request) -> web.Response:
    page = await instance_page(request)
    found = await destinations.list_page(page.db, page.instance_id, LIST_LIMIT, None)
    return page.render(
        "destinations.html", destinations=[views.destination(d) for d in found.items]
    )


async def destination_validate(request: web.Request) -> web.Response:
    """Writes, reads back and deletes a probe object, and shows each step's outcome."""
    page, _ = await change(request)
    dest_id = request.match_info["destination_id"]
    doc = await destinations.get(page.db, page.instance_id, dest_id)
    result = await destinations.check_stored(
        page.db, page.box, page.instance_id, dest_id, page.api.validate_timeout_seconds, None
    )
    return page.render("validation.html", destination=views.destination(doc), result=result)


async def plot_page(request: web.Request) -> web.Response:
    page = await instance_page(request)
    found = await jobs.list_page(
        page.db, page.instance_id, type=jobs.JobType.BACKUP, limit=PLOT_JOBS, cursor=None
    )
    finished = [d for d in found.items if d["status"] in jobs.FINAL]
    return page.render(
        "plots.html", plots=plots.backup_plots(finished), width=plots.WIDTH, height=plots.HEIGHT
    )


# --- errors ----------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def html_errors(handler: Handler) -> Handler:
    """The dashboard answers in pages, not JSON: a missing session goes to sign-in, a refusal
    or a domain failure is shown with the API's sentence and status."""

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except SignInRequired:
            if request.method != "GET":
                return render(
                    request,
                    "message.html",
                    status=401,
                    title="Signed out",
                    message="Your session has ended; sign in again.",
                )
            target = safe_next(request.path_qs)
            raise web.HTTPFound(f"{COOKIE_PATH}/login?{urlencode({'next': target})}") from None
        except ApiError as err:
            return _failure(request, err.status, err.body().get("description"))
        except BackupError as exc:
            mapped = from_domain(exc)
            return _failure(request, mapped.status, mapped.body().get("description"))
        except ValidationError as exc:
            first = exc.errors(include_url=False, include_input=False)[0]
            where = ".".join(str(part) for part in first["loc"]) or "the form"
            return _failure(request, 400, f"{where}: {first['msg']}")

    handle.__name__ = handler.__name__
    return handle


def _failure(request: web.Request, status: int, description: object) -> web.Response:
    titles = {401: "Signed out", 403: "Not allowed", 404: "Not found", 409: "Not now"}
    return render(
        request,
        "message.html",
        status=status,
        session=read_session(request, request.config_dict[SECRETS]),
        title=titles.get(status, "That did not work"),
        message=str(description or "The request failed."),
    )


def add_routes(app: web.Application) -> None:
    """The dashboard's pages, under :data:`PREFIX`, each answering failures as a page."""
    instance_path = "/instances/{instance_id}"
    pages: list[tuple[str, str, Handler]] = [
        ("GET", "/", home),
        ("GET", "/login", sign_in),
        ("GET", "/callback", callback),
        ("POST", "/logout", sign_out),
        ("GET", "/signed-out", signed_out),
        ("GET", "/fleet", fleet),
        ("GET", instance_path, instance),
        ("GET", instance_path + "/plans", plan_list),
        ("POST", instance_path + "/plans", audited(plan_create, "create_plan", "plans")),
        ("GET", instance_path + "/plans/{plan_id}", plan_edit),
        ("POST", instance_path + "/plans/{plan_id}", audited(plan_update, "update_plan", "plans")),
        (
            "POST",
            instance_path + "/plans/{plan_id}/pause",
            audited(plan_pause, "update_plan", "plans"),
        ),
        (
            "POST",
            instance_path + "/plans/{plan_id}/run",
            audited(plan_run, "start_plan_backup", "jobs"),
        ),
        (
            "POST",
            instance_path + "/plans/{plan_id}/drill",
            audited(plan_drill, "start_plan_drill", "jobs"),
        ),
        ("GET", instance_path + "/jobs", job_list),
        ("GET", instance_path + "/jobs/{job_id}", job_detail),
        (
            "POST",
            instance_path + "/jobs/{job_id}/cancel",
            audited(job_cancel, "cancel_job", "jobs"),
        ),
        ("GET", instance_path + "/restore_points", point_list),
        (
            "POST",
            instance_path + "/restore_points/{point_id}/pin",
            audited(point_pin, "update_restore_point", "restore points"),
        ),
        ("GET", instance_path + "/restore_points/{point_id}/restore", restore_confirm),
        (
            "POST",
            instance_path + "/restore_points/{point_id}/restore",
            audited(restore, "start_restore", "jobs"),
        ),
        ("GET", instance_path + "/destinations", destination_list),
        ("POST", instance_path + "/destinations/{destination_id}/validate", destination_validate),
        ("GET", instance_path + "/plots", plot_page),
    ]
    for method, path, handler in pages:
        app.router.add_route(method, PREFIX + path, html_errors(handler))


__all__ = ["ENDPOINTS", "add_routes"]
