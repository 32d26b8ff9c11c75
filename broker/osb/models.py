"""Request bodies of OSB API 2.17, as pydantic models (ours: ``openbrokerapi`` is Flask-bound).

Types are strict (``"service_id": 1`` is a 400, not the string ``"1"``); fields the spec
does not define are ignored, as the spec requires of receivers (vendor extensions).

Liberal where real clients are sloppy (the official osb-checker's generated Go client sends
every struct, filled or not): ``maintenance_info`` does not exist before API 2.15, so below
2.15 it is ignored whatever it holds, and an empty ``{}`` is the same as none at any version;
the deprecated ``organization_guid``/``space_guid`` and the informational ``previous_values``
treat ``""`` as absent. The API version comes in the validation context (``osb_minor``).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

Id = Annotated[str, Field(min_length=1, max_length=256)]
Guid = Annotated[str, Field(min_length=1, max_length=256)]
Object = dict[str, Any]

MAINTENANCE_INFO_SINCE = 15  # OSB API 2.15 introduced maintenance_info


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, hide_input_in_errors=True)


def _maintenance_or_none(value: Any, info: ValidationInfo) -> Any:
    """None for a field the platform's API version does not have, or an empty object."""
    minor = (info.context or {}).get("osb_minor")
    if isinstance(minor, int) and minor < MAINTENANCE_INFO_SINCE:
        return None
    if isinstance(value, dict) and not value:
        return None
    return value


def _blank_is_absent(value: Any) -> Any:
    return None if value == "" else value


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

    _maintenance = field_validator("maintenance_info", mode="before")(
        classmethod(lambda cls, v, info: _maintenance_or_none(v, info))
    )
    _guids = field_validator("organization_guid", "space_guid", mode="before")(
        classmethod(lambda cls, v: _blank_is_absent(v))
    )


class PreviousValues(_Body):
    service_id: Id | None = None
    plan_id: Id | None = None
    organization_id: Guid | None = None
    space_id: Guid | None = None
    maintenance_info: MaintenanceInfo | None = None

    _maintenance = field_validator("maintenance_info", mode="before")(
        classmethod(lambda cls, v, info: _maintenance_or_none(v, info))
    )
    _ids = field_validator("service_id", "plan_id", "organization_id", "space_id", mode="before")(
        classmethod(lambda cls, v: _blank_is_absent(v))
    )


class UpdateBody(_Body):
    service_id: Id
    plan_id: Id | None = None
    context: Object | None = None
    parameters: Object | None = None
    previous_values: PreviousValues | None = None
    maintenance_info: MaintenanceInfo | None = None

    _maintenance = field_validator("maintenance_info", mode="before")(
        classmethod(lambda cls, v, info: _maintenance_or_none(v, info))
    )


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
