"""The OSB catalog (``catalog.yml``): loaded and checked once at start-up by its models, which
also render ``GET /v2/catalog`` (as written: no default filled in), and the source of the
plans' parameter schemas that provision, update and bind are checked against (JSON Schema
draft-04, as OSB requires of platforms)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft4Validator
from jsonschema.exceptions import SchemaError, ValidationError, best_match
from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as ModelError

from broker.config import ConfigError
from broker.osb.errors import bad_request, invalid_parameters

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"  # CLI-friendly


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class MaintenanceInfoModel(_Model):
    version: str = Field(min_length=1)
    description: str | None = None


class PlanModel(_Model):
    id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=255, pattern=_NAME)
    description: str = Field(min_length=1)
    free: bool = True
    bindable: bool | None = None
    plan_updateable: bool | None = None
    maintenance_info: MaintenanceInfoModel | None = None
    metadata: dict[str, Any] | None = None
    schemas: dict[str, Any] | None = None


class ServiceModel(_Model):
    id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=255, pattern=_NAME)
    description: str = Field(min_length=1)
    bindable: bool
    instances_retrievable: bool = False
    bindings_retrievable: bool = False
    plan_updateable: bool = False
    plans: list[PlanModel] = Field(min_length=1)


class CatalogModel(_Model):
    services: list[ServiceModel]


@dataclass(frozen=True)
class Plan:
    id: str
    name: str
    service_id: str
    bindable: bool
    plan_updateable: bool
    maintenance_version: str | None
    delete_backups_default: bool
    create: Draft4Validator | None
    update: Draft4Validator | None
    binding: Draft4Validator | None


def _schema(plan: dict[str, Any], *path: str) -> Draft4Validator | None:
    node: Any = plan.get("schemas") or {}
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    if node is None:
        return None
    if not isinstance(node, dict):
        raise ConfigError(f"schemas.{'.'.join(path)} must be a JSON schema object")
    try:
        Draft4Validator.check_schema(node)
    except SchemaError as exc:
        raise ConfigError(
            f"schemas.{'.'.join(path)} is not a valid JSON schema: {exc.message}"
        ) from None
    return Draft4Validator(node)


class Catalog:
    """The checked catalog: ``body`` (what ``GET /v2/catalog`` returns) and the plans."""

    def __init__(self, raw: dict[str, Any]) -> None:
        try:
            model = CatalogModel.model_validate({"services": raw.get("services")})
        except ModelError as exc:
            err = exc.errors(include_url=False, include_input=False)[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ConfigError(f"catalog: {where}: {err['msg']}") from None
        # The catalog as written (fields it leaves out are not filled in with defaults).
        self.body: bytes = model.model_dump_json(exclude_unset=True).encode()
        self.plans: dict[tuple[str, str], Plan] = {}
        self.services: dict[str, dict[str, Any]] = {}
        names: set[str] = set()
        plan_ids: set[str] = set()
        for service in raw["services"]:
            if service["id"] in self.services or service["name"] in names:
                raise ConfigError(f"catalog: service {service['name']!r} is listed twice")
            self.services[service["id"]] = service
            names.add(service["name"])
            plan_names: set[str] = set()
            for plan in service["plans"]:
                if plan["id"] in plan_ids or plan["name"] in plan_names:
                    raise ConfigError(f"catalog: plan {plan['name']!r} is listed twice")
                plan_ids.add(plan["id"])
                plan_names.add(plan["name"])
                where = f"catalog: plan {plan['name']!r}: "
                try:
                    create = _schema(plan, "service_instance", "create", "parameters")
                    update = _schema(plan, "service_instance", "update", "parameters")
                    binding = _schema(plan, "service_binding", "create", "parameters")
                except ConfigError as exc:
                    raise ConfigError(where + str(exc)) from None
                delete = (plan.get("metadata") or {}).get("delete_backups_on_deprovision", False)
                if not isinstance(delete, bool):
                    raise ConfigError(where + "metadata.delete_backups_on_deprovision: a boolean")
                self.plans[(service["id"], plan["id"])] = Plan(
                    id=plan["id"],
                    name=plan["name"],
                    service_id=service["id"],
                    bindable=plan.get("bindable", service["bindable"]),
                    plan_updateable=plan.get("plan_updateable", service.get("plan_updateable")),
                    maintenance_version=(plan.get("maintenance_info") or {}).get("version"),
                    delete_backups_default=delete,
                    create=create,
                    update=update,
                    binding=binding,
                )

    @classmethod
    def load(cls, path: Path) -> Catalog:
        try:
            raw = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigError(f"CATALOG_PATH: cannot read {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"CATALOG_PATH: {path} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"CATALOG_PATH: {path} must hold a mapping with 'services'")
        try:
            return cls(raw)
        except ConfigError as exc:
            raise ConfigError(f"CATALOG_PATH ({path}): {exc}") from None

    def plan(self, service_id: str, plan_id: str) -> Plan:
        """The plan, or a 400 naming what is unknown."""
        if service_id not in self.services:
            raise bad_request(
                f"service_id {service_id[:100]!r} is not a service of this broker's catalog.",
                field="service_id",
            )
        plan = self.plans.get((service_id, plan_id))
        if plan is None:
            raise bad_request(
                f"plan_id {plan_id[:100]!r} is not a plan of service "
                f"{self.services[service_id]['name']!r}.",
                field="plan_id",
            )
        return plan

    def find(self, service_id: str, plan_id: str) -> Plan | None:
        """The plan, or None when the catalog does not list it (any more)."""
        return self.plans.get((service_id, plan_id))


def check_parameters(validator: Draft4Validator | None, params: dict[str, Any]) -> None:
    """A 400 ``InvalidParameters`` naming the offending field, never quoting its value (it may
    be a password)."""
    if validator is None:
        return
    error = best_match(validator.iter_errors(params))
    if error is None:
        return
    field, message = describe(error)
    raise invalid_parameters(field, message)


def _path(parts: Any) -> str:
    out = "parameters"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def describe(error: ValidationError) -> tuple[str, str]:
    """(field, message) for a schema violation, built from the rule, not the value."""
    field = _path(error.absolute_path)
    rule = error.validator
    limit: Any = error.validator_value  # the schema's own value for the rule: JSON
    instance = error.instance
    schema = error.schema if isinstance(error.schema, dict) else {}
    if rule == "required" and isinstance(instance, dict):
        missing = next((p for p in limit if p not in instance), "?")
        return f"{field}.{missing}", "is required"
    if rule == "additionalProperties" and isinstance(instance, dict):
        known = set(schema.get("properties") or {})
        patterns = list((schema.get("patternProperties") or {}).keys())
        extra = next(
            (k for k in instance if k not in known and not any(re.search(p, k) for p in patterns)),
            "?",
        )
        if patterns and not known:
            return f"{field}.{str(extra)[:64]}", "is not an allowed name"
        return f"{field}.{str(extra)[:64]}", "is not a known parameter"
    if rule == "type":
        kinds = limit if isinstance(limit, list) else [limit]
        return field, f"must be of type {' or '.join(kinds)}"
    plural = "y" if limit == 1 else "ies"
    templates = {
        "minLength": "must be at least {} character(s) long",
        "maxLength": "must be at most {} characters long",
        "minimum": "must be at least {}",
        "maximum": "must be at most {}",
        "minItems": "must list at least {} entr" + plural,
        "maxItems": "must list at most {} entries",
        "maxProperties": "must have at most {} entries",
        "minProperties": "must have at least {} entries",
    }
    if rule in templates:
        return field, templates[rule].format(limit)
    if rule == "uniqueItems":
        return field, "lists a value twice"
    if rule == "enum" and isinstance(limit, list):
        return field, "must be one of " + ", ".join(json.dumps(v) for v in limit)
    if rule == "pattern":
        hint = schema.get("description")
        return field, "does not have the expected form" + (f" ({hint.rstrip('.')})" if hint else "")
    return field, f"breaks the schema's {rule!r} rule"
