"""The webhook operations of the API (``/v1/service_instances/{id}/webhooks``): their models
and handlers, declared with :func:`broker.api.routes.op` (routes.py imports this module so
they are registered with the others). Every operation needs manage rights: a webhook's URL
and delivery log are the instance manager's business. The domain is :mod:`backup.webhooks`.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from backup import webhooks
from backup.database import Document
from backup.webhooks import DeliveryState, EventType, WebhookSpec
from broker.api import models
from broker.api.routes import Ctx, _page, op
from broker.background import WEBHOOK_SETTINGS

_OUT = ConfigDict(extra="ignore")
TAG = "webhooks"

# --- models ---------------------------------------------------------------------------------

WebhookIn = WebhookSpec


class WebhookPatch(BaseModel):
    """A JSON merge patch of a webhook (RFC 7396): any of url, events, secret, enabled,
    description. The merged webhook is validated as a whole; the secret is kept unless
    sent."""

    model_config = ConfigDict(extra="allow")


class WebhookOut(BaseModel):
    model_config = _OUT
    id: str
    url: str
    events: list[EventType]
    enabled: bool
    description: str | None = None
    secret_set: bool = Field(description="A secret is stored; it is never returned.")
    created_at: datetime
    updated_at: datetime


class WebhookPage(models._PageOut):
    items: list[WebhookOut]


class DeliveryAttemptOut(BaseModel):
    model_config = _OUT
    at: datetime
    status_code: int | None = Field(description="The receiver's HTTP status, if it answered.")
    error: str | None = Field(
        description="Why the attempt failed, in the manager's words (never the receiver's "
        "body); null when it succeeded."
    )
    duration_ms: float


class DeliveryOut(BaseModel):
    model_config = _OUT
    id: str
    event_id: str = Field(description="The CloudEvents id, also sent as webhook-id.")
    event_type: EventType
    subject: str
    state: DeliveryState = Field(
        description="pending (next attempt at next_attempt_at), delivering, succeeded, or "
        "failed (given up after WEBHOOK_MAX_ATTEMPTS attempts, or undeliverable)."
    )
    attempts: int
    created_at: datetime
    next_attempt_at: datetime | None = None
    last_attempt_at: datetime | None = None
    delivered_at: datetime | None = None
    failed_at: datetime | None = None
    last_status_code: int | None = None
    last_error: str | None = None
    attempt_log: list[DeliveryAttemptOut] = Field(
        description=f"The newest {webhooks.ATTEMPT_LOG_MAX} attempts, oldest first."
    )


class DeliveryPage(models._PageOut):
    items: list[DeliveryOut]


def webhook_view(doc: Document) -> WebhookOut:
    return WebhookOut.model_validate(
        {
            **{k: v for k, v in doc.items() if k not in ("_id", "secret", "instance_id")},
            "id": doc["_id"],
            "secret_set": bool(doc.get("secret")),
        }
    )


def delivery_view(doc: Document) -> DeliveryOut:
    return DeliveryOut.model_validate(
        {
            **{k: v for k, v in doc.items() if k not in ("_id", "body", "lease_owner")},
            "id": doc["_id"],
        }
    )


# --- operations -----------------------------------------------------------------------------


@op(
    "GET",
    "/webhooks",
    summary="List the instance's webhooks, newest first",
    tag=TAG,
    response=WebhookPage,
    query=models.ListQuery,
    manage=True,
)
async def list_webhooks(ctx: Ctx) -> WebhookPage:
    limit, cursor = ctx.query(models.ListQuery).window()
    page = await webhooks.list_page(ctx.db, ctx.instance_id, limit, cursor)
    return _page(WebhookPage, page, [webhook_view(d) for d in page.items])


@op(
    "POST",
    "/webhooks",
    summary="Create a webhook: a URL, the events wanted and a signing secret (refused when "
    "the egress policy denies the URL's host)",
    tag=TAG,
    status=201,
    body=WebhookIn,
    response=WebhookOut,
    errors=(409,),
)
async def create_webhook(ctx: Ctx) -> WebhookOut:
    spec = await ctx.body(WebhookIn)
    settings = ctx.request.app[WEBHOOK_SETTINGS]
    doc = await webhooks.create(ctx.db, ctx.box, ctx.instance_id, spec, settings)
    return webhook_view(doc)


@op(
    "GET",
    "/webhooks/{webhook_id}",
    summary="Read a webhook (its secret is never returned: secret_set)",
    tag=TAG,
    response=WebhookOut,
    manage=True,
)
async def get_webhook(ctx: Ctx) -> WebhookOut:
    return webhook_view(await webhooks.get(ctx.db, ctx.instance_id, ctx.param("webhook_id")))


@op(
    "PATCH",
    "/webhooks/{webhook_id}",
    summary="Change a webhook (JSON merge patch; the secret is kept unless sent)",
    tag=TAG,
    body=WebhookPatch,
    response=WebhookOut,
    errors=(409,),
)
async def update_webhook(ctx: Ctx) -> WebhookOut:
    patch = await ctx.raw_body()
    settings = ctx.request.app[WEBHOOK_SETTINGS]
    doc = await webhooks.update(
        ctx.db, ctx.box, ctx.instance_id, ctx.param("webhook_id"), patch, settings
    )
    return webhook_view(doc)


@op(
    "DELETE",
    "/webhooks/{webhook_id}",
    summary="Delete a webhook and its delivery log (events not yet delivered are dropped)",
    tag=TAG,
    status=204,
)
async def delete_webhook(ctx: Ctx) -> None:
    await webhooks.delete(ctx.db, ctx.instance_id, ctx.param("webhook_id"))


@op(
    "GET",
    "/webhooks/{webhook_id}/deliveries",
    summary="A webhook's delivery log, newest first: each event's state, attempts, status "
    "codes and errors",
    tag=TAG,
    response=DeliveryPage,
    query=models.ListQuery,
    manage=True,
)
async def list_webhook_deliveries(ctx: Ctx) -> DeliveryPage:
    limit, cursor = ctx.query(models.ListQuery).window()
    page = await webhooks.deliveries_page(
        ctx.db, ctx.instance_id, ctx.param("webhook_id"), limit, cursor
    )
    return _page(DeliveryPage, page, [delivery_view(d) for d in page.items])
