"""The catalog file: checked at start-up with a clear error naming what is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.config import DEFAULT_CATALOG, ConfigError
from broker.errors import ApiError
from broker.osb.catalog import Catalog, check_parameters


def load(tmp_path: Path, data: Any) -> Catalog:
    path = tmp_path / "catalog.yml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return Catalog.load(path)


def shipped() -> dict[str, Any]:
    return yaml.safe_load(DEFAULT_CATALOG.read_text())


def test_shipped_catalog_loads() -> None:
    catalog = Catalog.load(DEFAULT_CATALOG)
    plans = {p.name: p for p in catalog.plans.values()}
    assert plans["standard"].delete_backups_default is False
    assert plans["transient"].delete_backups_default is True
    assert plans["standard"].maintenance_version == "1.0.0"
    assert all(p.create and p.update and p.binding for p in plans.values())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["services"][0].pop("plans"), "plans"),
        (lambda c: c["services"][0].update(name="has space"), "name"),
        (lambda c: c["services"][0]["plans"].append(dict(c["services"][0]["plans"][0])), "twice"),
        (
            lambda c: c["services"][0]["plans"][0]["schemas"]["service_instance"]["create"].update(
                parameters={"type": "nonsense"}
            ),
            "not a valid JSON schema",
        ),
        (
            lambda c: c["services"][0]["plans"][0]["metadata"].update(
                delete_backups_on_deprovision="yes"
            ),
            "delete_backups_on_deprovision",
        ),
    ],
    ids=["no-plans", "bad-name", "duplicate-plan", "bad-schema", "bad-delete-flag"],
)
def test_broken_catalogs_are_refused(tmp_path: Path, change: Any, message: str) -> None:
    data = shipped()
    change(data)
    with pytest.raises(ConfigError, match="CATALOG_PATH") as err:
        load(tmp_path, data)
    assert message in str(err.value)


def test_not_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(tmp_path, "services: [\n")


def test_parameter_errors_never_quote_the_value() -> None:
    catalog = Catalog.load(DEFAULT_CATALOG)
    plan = next(iter(catalog.plans.values()))
    params = {
        "agent": {"url": "http://h:1", "username": "u", "password": "x" * 2000},
        "database": {"host": "h"},
        "items": ["a"],
    }
    with pytest.raises(ApiError) as err:
        check_parameters(plan.create, params)
    assert err.value.extra["field"] == "parameters.agent.password"
    assert "xxxx" not in err.value.description
