"""Answers of OSB API 2.17, as pydantic models (the requests are in :mod:`broker.osb.models`).

Each answer is built from what the domain returns and rendered with :func:`answer`; an
optional field the answer does not carry is left out, not sent as ``null``.
"""

from __future__ import annotations

from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from backup.operations import OperationState, OperationStatus

OsbState = Literal["in progress", "succeeded", "failed"]

# The domain's operation states as OSB names them in last_operation.
OSB_STATES: dict[OperationState, OsbState] = {
    OperationState.IN_PROGRESS: "in progress",
    OperationState.SUCCEEDED: "succeeded",
    OperationState.FAILED: "failed",
}


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def body(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def answer(model: Answer, status: int = 200) -> web.Response:
    return web.json_response(model.body(), status=status)


class Empty(Answer):
    """``{}``: a change done within the request, or an unbind."""


class OperationStarted(Answer):
    """202: the change goes on; the platform polls last_operation with this id."""

    operation: str | None

    def body(self) -> dict[str, Any]:
        return self.model_dump(mode="json")  # the id, even if an old record has none


class Provisioned(Answer):
    """A provision done within the request (or already done): ``dashboard_url`` is where the
    instance's users manage its backups, when the dashboard is configured."""

    dashboard_url: str | None = None


class ProvisionStarted(OperationStarted):
    """202 of a provision: the operation, and the dashboard's address as soon as it is known."""

    dashboard_url: str | None = None

    def body(self) -> dict[str, Any]:
        body = super().body()
        if self.dashboard_url is None:
            del body["dashboard_url"]
        return body


class LastOperation(Answer):
    state: OsbState
    description: str
    instance_usable: bool | None = None
    update_repeatable: bool | None = None

    @classmethod
    def of(cls, status: OperationStatus) -> LastOperation:
        return cls(
            state=OSB_STATES[status.state],
            description=status.description,
            instance_usable=status.instance_usable,
            update_repeatable=status.update_repeatable,
        )


class Credentials(Answer):
    """What a binding gives an application: the instance's address in the manager's API, and
    the key once, when the binding is created."""

    uri: str
    api_url: str
    instance_id: str
    key: str | None = None


class Binding(Answer):
    credentials: Credentials


class FetchedBinding(Answer):
    credentials: Credentials
    parameters: dict[str, Any]


class InstanceAttributes(Answer):
    state: str | None
    agent_kind: str | None
    agent_version: str | None
    delete_backups_on_deprovision: bool


class InstanceMetadata(Answer):
    labels: dict[str, str]
    attributes: InstanceAttributes


class MaintenanceInfo(Answer):
    version: str | None


class FetchedInstance(Answer):
    service_id: str | None
    plan_id: str | None
    parameters: dict[str, Any]
    metadata: InstanceMetadata
    maintenance_info: MaintenanceInfo | None = None

    def body(self) -> dict[str, Any]:
        # The attributes say null when unknown; maintenance_info only when the instance has it.
        return self.model_dump(mode="json", exclude_unset=True)
