"""Request bodies of OSB API 2.17, as pydantic models (ours: ``openbrokerapi`` is Flask-bound).

Types are strict (``"service_id": 1`` is a 400, not the string ``"1"``); fields the spec
does not define are ignored, as the spec requires of receivers (vendor extensions).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

Id = Annotated[str, Field(min_length=1, max_length=256)]
Guid = Annotated[str, Field(min_length=1, max_length=256)]
Object = dict[str, Any]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, hide_input_in_errors=True)


class MaintenanceInfo(_Body):
    version: Annotated[str, Field(min_length=1, max_length=256)]
    description: str | None = None


class ProvisionBody(_Body):
    service_id: Id
    plan_id: Id
    context: Object | None = None
    organization_guid: Guid | None = None  # deprecated by context, still sent by CF
    space_guid: Guid | None = None
    parameters: Object | None = None
    maintenance_info: MaintenanceInfo | None = None


class PreviousValues(_Body):
    service_id: Id | None = None
    plan_id: Id | None = None
    organization_id: Guid | None = None
    space_id: Guid | None = None
    maintenance_info: MaintenanceInfo | None = None


class UpdateBody(_Body):
    service_id: Id
    plan_id: Id | None = None
    context: Object | None = None
    parameters: Object | None = None
    previous_values: PreviousValues | None = None
    maintenance_info: MaintenanceInfo | None = None


class BindResource(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, hide_input_in_errors=True)

    app_guid: Guid | None = None
    route: Annotated[str, Field(max_length=2048)] | None = None


class BindBody(_Body):
    service_id: Id
    plan_id: Id
    app_guid: Guid | None = None  # deprecated by bind_resource.app_guid
    bind_resource: BindResource | None = None
    context: Object | None = None
    parameters: Object | None = None
