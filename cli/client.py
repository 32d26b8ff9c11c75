"""A typed client of the manager's ``/v1`` API for one service instance (docs/api.md).

Answers are JSON objects typed as :class:`typing.TypedDict` views of what the CLI reads; the
manager's OpenAPI document (``/v1/openapi.json``) is the full contract."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal, NotRequired, TypedDict, cast
from urllib.parse import quote

import httpx

from cli.errors import CliError, ExitCode, exit_code_for_status

MAX_PAGE = 100


class JobItem(TypedDict):
    name: str
    target: NotRequired[str | None]
    status: NotRequired[str | None]
    stage: NotRequired[str | None]
    size: NotRequired[int | None]
    stored_size: NotRequired[int | None]
    error: NotRequired[str | None]
    started_at: NotRequired[str | None]
    ended_at: NotRequired[str | None]
    logs: NotRequired[dict[str, str] | None]


class Job(TypedDict):
    id: str
    type: str
    status: str
    trigger: str
    created_at: str
    plan_id: NotRequired[str | None]
    reason: NotRequired[str | None]
    items: NotRequired[list[JobItem]]
    restore_point_id: NotRequired[str | None]
    source_instance_id: NotRequired[str | None]
    started_at: NotRequired[str | None]
    ended_at: NotRequired[str | None]
    cancel_requested: NotRequired[bool]
    agent_unreachable_since: NotRequired[str | None]
    drill: NotRequired[dict[str, Any] | None]


class Page(TypedDict):
    items: list[dict[str, Any]]
    total: int | None  # None: a cursor page with more after it (not counted)
    next_cursor: str | None


class Validation(TypedDict):
    ok: bool
    error: NotRequired[str | None]
    description: str
    steps: list[dict[str, Any]]


FINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED", "MISSED"})
Collection = Literal["destinations", "plans", "jobs", "restore_points", "webhooks"]


class ApiFailure(CliError):
    """An error answer of the manager: its stable code and sentence."""

    def __init__(self, status: int, error: str, description: str, body: dict[str, Any]) -> None:
        details = [
            f"{problem.get('field')}: {problem.get('message')}"
            for problem in body.get("problems") or []
            if isinstance(problem, dict)
        ]
        message = f"{description} ({error})"
        if details:
            message += "\n  " + "\n  ".join(details)
        super().__init__(message, exit_code_for_status(status))
        self.status, self.error, self.body = status, error, body


class Client:
    """The API of one instance at ``{url}/v1/service_instances/{instance_id}``."""

    def __init__(
        self, url: str, instance_id: str, auth: httpx.Auth, *, timeout: float = 90
    ) -> None:
        self.url = url.rstrip("/")
        self.instance_id = instance_id
        self.http = httpx.Client(
            base_url=f"{self.url}/v1/service_instances/{quote(instance_id, safe='')}",
            auth=auth,
            timeout=timeout,
            headers={"Accept": "application/json", "User-Agent": "osb-backup"},
        )

    def close(self) -> None:
        self.http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json: object = None,
        params: dict[str, Any] | None = None,
    ) -> Any:
        """The decoded answer (None for 204); an error answer raises :class:`ApiFailure`."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = self.http.request(method, path, json=json, params=query or None)
        except httpx.TimeoutException:
            raise CliError(f"{self.url} did not answer in time.", ExitCode.UNAVAILABLE) from None
        except httpx.HTTPError as exc:
            raise CliError(
                f"Cannot reach the backup manager at {self.url}: {exc or type(exc).__name__}.",
                ExitCode.UNAVAILABLE,
                hint="Check --url / OSB_BACKUP_URL.",
            ) from None
        if response.status_code == 204:
            return None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400:
            if isinstance(body, dict) and isinstance(body.get("error"), str):
                raise ApiFailure(
                    response.status_code,
                    body["error"],
                    str(body.get("description") or ""),
                    body,
                )
            raise CliError(
                f"{self.url} answered {response.status_code} {response.reason_phrase} "
                "(is this the backup manager's URL?).",
                exit_code_for_status(response.status_code),
            )
        if body is None:
            raise CliError(
                f"{self.url} answered something that is not JSON (is this the backup "
                "manager's URL?).",
                ExitCode.UNAVAILABLE,
            )
        return body

    # --- lists ------------------------------------------------------------------------------

    def page(self, collection: Collection, *, limit: int, **filters: Any) -> Page:
        return cast(Page, self.request("GET", f"/{collection}", params={"limit": limit, **filters}))

    def every(self, collection: Collection, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every entry, newest first, page after page."""
        cursor: str | None = None
        while True:
            page = cast(
                Page,
                self.request(
                    "GET",
                    f"/{collection}",
                    params={"limit": MAX_PAGE, "cursor": cursor, **filters},
                ),
            )
            yield from page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def find(self, collection: Literal["destinations", "plans"], ref: str) -> dict[str, Any]:
        """A destination or plan by id or by name."""
        try:
            return cast(dict[str, Any], self.request("GET", f"/{collection}/{_segment(ref)}"))
        except ApiFailure as failure:
            if failure.status != 404 or failure.error == "instance_not_found":
                raise
        named = [entry for entry in self.every(collection) if entry.get("name") == ref]
        if not named:
            kind = "destination" if collection == "destinations" else "plan"
            raise CliError(
                f"There is no {kind} named or with the id {ref!r}.",
                ExitCode.NOT_FOUND,
                hint=f"`osb-backup {collection} list INSTANCE` lists them.",
            )
        return named[0]

    # --- items ------------------------------------------------------------------------------

    def items(self) -> list[str]:
        return list(cast(dict[str, list[str]], self.request("GET", "/items"))["items"])

    # --- destinations -----------------------------------------------------------------------

    def create_destination(self, body: dict[str, Any], *, validate: bool) -> dict[str, Any]:
        params = {"validate": "true"} if validate else None
        return cast(dict[str, Any], self.request("POST", "/destinations", json=body, params=params))

    def update_destination(
        self, destination_id: str, patch: dict[str, Any], *, validate: bool
    ) -> dict[str, Any]:
        params = {"validate": "true"} if validate else None
        path = f"/destinations/{_segment(destination_id)}"
        return cast(dict[str, Any], self.request("PATCH", path, json=patch, params=params))

    def validate_destination(self, destination_id: str) -> Validation:
        path = f"/destinations/{_segment(destination_id)}/validate"
        return cast(Validation, self.request("POST", path))

    def validate_settings(self, body: dict[str, Any]) -> Validation:
        return cast(Validation, self.request("POST", "/destinations/validate", json=body))

    def delete_destination(self, destination_id: str) -> None:
        self.request("DELETE", f"/destinations/{_segment(destination_id)}")

    # --- plans ------------------------------------------------------------------------------

    def create_plan(self, body: dict[str, Any]) -> dict[str, Any]:
        return cast(dict[str, Any], self.request("POST", "/plans", json=body))

    def update_plan(
        self, plan_id: str, patch: dict[str, Any], *, confirm: bool = False
    ) -> dict[str, Any]:
        """``confirm``: apply a retention change that deletes many points (?confirm=true)."""
        params = {"confirm": "true"} if confirm else None
        path = f"/plans/{_segment(plan_id)}"
        return cast(dict[str, Any], self.request("PATCH", path, json=patch, params=params))

    def retention_preview(self, plan_id: str, proposed: dict[str, Any]) -> dict[str, Any]:
        """What retention deletes and keeps now: the saved one, or ``proposed`` (whole)."""
        path = f"/plans/{_segment(plan_id)}/retention_preview"
        return cast(dict[str, Any], self.request("GET", path, params=proposed))

    def drill_plan(self, plan_id: str) -> Job:
        return cast(Job, self.request("POST", f"/plans/{_segment(plan_id)}/drill"))

    def drill_point(self, restore_point_id: str) -> Job:
        path = f"/restore_points/{_segment(restore_point_id)}/drill"
        return cast(Job, self.request("POST", path))

    def protection(self) -> dict[str, Any]:
        return cast(dict[str, Any], self.request("GET", "/protection"))

    def delete_plan(self, plan_id: str) -> None:
        self.request("DELETE", f"/plans/{_segment(plan_id)}")

    # --- jobs -------------------------------------------------------------------------------

    def backup(self, plan_id: str) -> Job:
        return cast(Job, self.request("POST", "/backups", json={"plan_id": plan_id}))

    def restore(
        self,
        restore_point_id: str,
        *,
        target_instance_id: str | None = None,
        items: list[str | dict[str, str]] | None = None,
    ) -> Job:
        body: dict[str, Any] = {"restore_point_id": restore_point_id}
        if target_instance_id is not None:
            body["target_instance_id"] = target_instance_id
        if items is not None:
            body["items"] = items
        return cast(Job, self.request("POST", "/restores", json=body))

    def job(self, job_id: str) -> Job:
        return cast(Job, self.request("GET", f"/jobs/{_segment(job_id)}"))

    def cancel_job(self, job_id: str) -> Job:
        return cast(Job, self.request("POST", f"/jobs/{_segment(job_id)}/cancel"))

    # --- restore points ---------------------------------------------------------------------

    def restore_point(self, restore_point_id: str) -> dict[str, Any]:
        path = f"/restore_points/{_segment(restore_point_id)}"
        return cast(dict[str, Any], self.request("GET", path))

    def delete_restore_point(self, restore_point_id: str) -> None:
        self.request("DELETE", f"/restore_points/{_segment(restore_point_id)}")

    def pin_restore_point(self, restore_point_id: str, reason: str | None) -> dict[str, Any]:
        """Pin with ``reason``; ``None`` unpins."""
        body: dict[str, Any] = (
            {"pinned": True, "pin_reason": reason} if reason is not None else {"pinned": False}
        )
        path = f"/restore_points/{_segment(restore_point_id)}"
        return cast(dict[str, Any], self.request("PATCH", path, json=body))

    # --- webhooks ---------------------------------------------------------------------------

    def webhook(self, webhook_id: str) -> dict[str, Any]:
        return cast(dict[str, Any], self.request("GET", f"/webhooks/{_segment(webhook_id)}"))

    def create_webhook(self, body: dict[str, Any]) -> dict[str, Any]:
        return cast(dict[str, Any], self.request("POST", "/webhooks", json=body))

    def delete_webhook(self, webhook_id: str) -> None:
        self.request("DELETE", f"/webhooks/{_segment(webhook_id)}")

    def deliveries(self, webhook_id: str, *, limit: int) -> Page:
        path = f"/webhooks/{_segment(webhook_id)}/deliveries"
        return cast(Page, self.request("GET", path, params={"limit": limit}))


def _segment(value: str) -> str:
    return quote(value, safe="")
