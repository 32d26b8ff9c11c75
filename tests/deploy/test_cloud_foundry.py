"""manifest.yml and the documented `cf` steps against what the service reads: every variable
named exists in its settings, nothing required is missing, the health checks are its routes."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import yaml
from aiohttp import web

from backup.secrets import generate_master_key_spec
from broker import health
from broker.config import load_settings
from tests.deploy import manifests
from tests.deploy.manifests import ROOT

MANIFEST = yaml.safe_load((ROOT / "manifest.yml").read_text())
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
# Cloud Foundry's default wait between SIGTERM and SIGKILL.
CF_KILL_SECONDS = 10


def application() -> dict[str, object]:
    (app,) = MANIFEST["applications"]
    assert isinstance(app, dict)
    return app


def cf_steps() -> str:
    """The shell block of docs/deploy.md that deploys on Cloud Foundry."""
    text = DEPLOY_DOC.read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    (block,) = [block for block in blocks if "cf push" in block]
    return block


def test_every_variable_of_the_manifest_is_read_by_the_service() -> None:
    environment = application()["env"]
    assert isinstance(environment, dict)
    unknown = set(map(str.upper, environment)) - set(manifests.manager_variables())
    assert not unknown, f"variables the service does not read: {sorted(unknown)}"


def test_the_settings_load_from_the_manifest_and_a_bound_database(
    only_environment: Callable[[dict[str, str]], None],
) -> None:
    environment = application()["env"]
    assert isinstance(environment, dict)
    values = {
        "BROKER_PASSWORD": "placeholder-password",
        "SECRETS_MASTER_KEYS": generate_master_key_spec(),
    }
    # ((vars)) are filled from the vars file; the rest is the manifest's literal value.
    variables = {name: values.get(name, str(value)) for name, value in environment.items()}
    assert all("((" not in value for value in variables.values())
    only_environment(
        {
            **variables,
            "PORT": "8080",
            "VCAP_APPLICATION": json.dumps({"application_uris": ["backup-manager.example.com"]}),
            "VCAP_SERVICES": json.dumps(
                {
                    "mongodb": [
                        {"credentials": {"uri": "mongodb://u:p@db:27017/backup?replicaSet=rs0"}}
                    ]
                }
            ),
        }
    )
    settings = load_settings()
    assert not settings.embedded_database
    assert settings.host == "0.0.0.0"
    settings.resolve_local_secrets()  # raises ConfigError when a secret is missing
    assert settings.shutdown_timeout < CF_KILL_SECONDS


def test_the_health_checks_are_the_services_routes() -> None:
    app = web.Application()
    health.setup(app)
    routes = {resource.canonical for resource in app.router.resources()}
    manifest = application()
    assert manifest["health-check-type"] == "http"
    assert manifest["health-check-http-endpoint"] == "/health"
    assert manifest["readiness-health-check-http-endpoint"] == "/ready"
    assert {"/health", "/ready"} <= routes
    assert manifest["command"] == "python -m broker"
    assert (ROOT / "broker" / "__main__.py").is_file()


def test_the_documented_cf_steps_match_the_manifest_and_the_catalog() -> None:
    steps = cf_steps()
    manifest_vars = set(re.findall(r"\(\(([\w-]+)\)\)", (ROOT / "manifest.yml").read_text()))
    vars_file = re.search(r"cat > vars.yml <<EOF\n(.*?)\nEOF", steps, re.S)
    assert vars_file is not None
    written = {line.split(":", 1)[0] for line in vars_file.group(1).splitlines()}
    assert written == manifest_vars
    (bound,) = application()["services"]
    assert re.search(rf"cf create-service \S+ \S+ {re.escape(bound)}\b", steps)
    catalog = yaml.safe_load((ROOT / "catalog.yml").read_text())
    offerings = {service["name"]: service for service in catalog["services"]}
    for offering, plan in re.findall(r"cf create-service (\S+) (\S+) \S+ -c", steps):
        assert plan in {p["name"] for p in offerings[offering]["plans"]}
    for offering in re.findall(r"cf enable-service-access (\S+)", steps):
        assert offering in offerings
    broker_user = re.search(r"cf create-service-broker \S+ (\S+) ", steps)
    assert broker_user is not None
    environment = application()["env"]
    assert isinstance(environment, dict)
    assert broker_user.group(1) == environment["BROKER_USERNAME"]


def test_the_readme_points_to_the_deployment_guide() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "docs/deploy.md" in readme
    assert "cf push" not in readme, "the Cloud Foundry steps live in docs/deploy.md"
