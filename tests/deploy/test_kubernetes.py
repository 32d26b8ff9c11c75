"""The Kubernetes manifests (deploy/kubernetes) against the Kubernetes schemas and against the
service's own settings, routes and egress policy, so that they cannot drift from the code."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from aiohttp import web

from backup.secrets import generate_master_key_spec
from broker import health
from broker.api.settings import load_api_settings
from broker.config import load_settings
from scheduler.settings import load_scheduler_settings
from storage.egress import ALLOW_SETTING, DENY_SETTING, EgressPolicy
from tests.deploy import manifests
from tests.deploy.manifests import Document, container_environment, find

# The oldest Kubernetes release the manifests are meant for (the preStop sleep action and the
# fields used exist there); the schemas ship with kubernetes-validate, no cluster needed.
KUBERNETES_VERSION = "1.29"
SECRET_KEYS = {
    "MONGODB_URL": "mongodb-url",
    "BROKER_PASSWORD": "broker-password",
    "SECRETS_MASTER_KEYS": "master-keys",
}
# Placeholder values standing in for the Secret when the settings are loaded.
PLACEHOLDERS = {
    "MONGODB_URL": "mongodb://db-0.mongodb:27017,db-1.mongodb:27017/backup?replicaSet=rs0",
    "BROKER_PASSWORD": "placeholder-password",
    "SECRETS_MASTER_KEYS": generate_master_key_spec(),
}
# Service Catalog kinds: no schema ships for them; their shape is checked below instead.
CUSTOM_KINDS = {"ClusterServiceBroker", "ServiceInstance"}


def all_manifest_files() -> list[Path]:
    return sorted(manifests.KUBERNETES.rglob("*.yaml"))


def manager(objects: list[Document]) -> Document:
    deployment = find(objects, "Deployment", "backup-manager")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def manager_environment(objects: list[Document]) -> dict[str, str]:
    """The manager container's environment, each Secret reference replaced by a placeholder."""
    environment = container_environment(manager(objects), objects)
    return {
        name: PLACEHOLDERS[name] if isinstance(value, dict) else str(value)
        for name, value in environment.items()
    }


# ----------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("directory", [manifests.BASE, manifests.AGENT_EXAMPLE], ids=str)
def test_rendering_matches_kubectl_kustomize(directory: Path) -> None:
    """The tests' renderer prints what kustomize itself does (kubectl ships with kustomize)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is needed in CI to check the renderer against kustomize")
        pytest.skip("kubectl not installed")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert rendered.returncode == 0, rendered.stderr
    by_kustomize = list(yaml.safe_load_all(rendered.stdout))
    key = lambda obj: (obj["kind"], obj["metadata"]["name"])  # noqa: E731
    assert sorted(by_kustomize, key=key) == sorted(manifests.render(directory), key=key)


def test_every_object_is_valid_against_the_kubernetes_schemas(
    base: list[Document], agent_example: list[Document]
) -> None:
    registration = [
        doc
        for path in manifests.REGISTRATION.glob("*.yaml")
        for doc in manifests.load_documents(path)
    ]
    validated = 0
    for obj in [*base, *agent_example, *registration]:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        validated += 1
    assert validated == len(base) + len(agent_example)


def test_every_yaml_file_is_rendered_or_a_registration_example(
    base: list[Document], agent_example: list[Document]
) -> None:
    """No manifest is left out of its kustomization by mistake."""
    listed = set()
    for directory in (manifests.BASE, manifests.AGENT_EXAMPLE):
        listed |= {directory / name for name in manifests.kustomization(directory)["resources"]}
        listed.add(directory / "kustomization.yaml")
    listed |= set(manifests.REGISTRATION.glob("*.yaml"))
    assert set(all_manifest_files()) == listed


# ----------------------------------------------------------------------------- the manager


def test_the_manager_deployment(base: list[Document]) -> None:
    deployment = find(base, "Deployment", "backup-manager")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 3
    assert pod["automountServiceAccountToken"] is False
    assert (
        find(base, "ServiceAccount", pod["serviceAccountName"])["automountServiceAccountToken"]
        is False
    )
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    container = manager(base)
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    resources = container["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"}
    assert "memory" in resources["limits"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_probes_name_the_services_routes_and_port(base: list[Document]) -> None:
    app = web.Application()
    health.setup(app)
    routes = {resource.canonical for resource in app.router.resources()}
    container = manager(base)
    settings = manager_environment(base)
    (port,) = container["ports"]
    assert port["containerPort"] == int(settings.get("PORT", "8080"))
    assert settings["LISTEN_HOST"] == "0.0.0.0"
    readiness = container["readinessProbe"]["httpGet"]
    liveness = container["livenessProbe"]["httpGet"]
    assert (readiness["path"], liveness["path"]) == ("/ready", "/health")
    assert {readiness["path"], liveness["path"]} <= routes
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in (port["name"], port["containerPort"])
    service = find(base, "Service", "backup-manager")
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in (port["name"], port["containerPort"])
    pod_labels = find(base, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    budget = find(base, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_termination_outlasts_the_shutdown_timeout(base: list[Document]) -> None:
    pod = find(base, "Deployment", "backup-manager")["spec"]["template"]["spec"]
    container = manager(base)
    pause = float(container["lifecycle"]["preStop"]["exec"]["command"][1])
    shutdown = load_settings(SHUTDOWN_TIMEOUT=manager_environment(base)["SHUTDOWN_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] > pause + shutdown.shutdown_timeout


def test_every_variable_set_is_read_by_the_service(base: list[Document]) -> None:
    known = manifests.manager_variables()
    unknown = set(manager_environment(base)) - set(known)
    assert not unknown, f"variables the service does not read: {sorted(unknown)}"


def test_the_settings_load_from_what_the_manifests_set(
    base: list[Document], only_environment: Callable[[dict[str, str]], None]
) -> None:
    """Nothing required is missing: every part's settings load, and with the external
    database the secrets come from the environment (nothing generated per replica)."""
    only_environment(manager_environment(base))
    required = [v.name for v in manifests.manager_variables().values() if v.required]
    assert set(required) <= set(manager_environment(base))
    settings = load_settings()
    assert not settings.embedded_database
    settings.resolve_local_secrets()  # raises ConfigError when a secret is missing
    load_api_settings()
    load_scheduler_settings()


def test_secrets_come_from_the_secret_by_reference(base: list[Document]) -> None:
    environment = container_environment(manager(base), base)
    for name, key in SECRET_KEYS.items():
        assert environment[name] == {"secretKeyRef": {"name": "backup-manager", "key": key}}, name


def test_the_network_policy_matches_the_egress_policy(base: list[Document]) -> None:
    environment = manager_environment(base)
    policy = EgressPolicy.from_settings(
        environment.get(DENY_SETTING), environment.get(ALLOW_SETTING)
    )
    network_policy = find(base, "NetworkPolicy", "backup-manager")
    assert set(network_policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    (rule,) = network_policy["spec"]["egress"]
    assert "ports" not in rule  # any port: destinations, agents and MongoDB use their own
    blocks = [peer["ipBlock"] for peer in rule["to"]]
    allowed = {ipaddress.ip_network(block["cidr"]) for block in blocks}
    assert allowed == (
        set(policy.allow) or {ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")}
    )
    excepted = [ipaddress.ip_network(net) for block in blocks for net in block.get("except", [])]
    assert sorted(map(str, excepted)) == sorted(map(str, policy.deny))
    for block in blocks:
        cidr = ipaddress.ip_network(block["cidr"])
        assert all(
            ipaddress.ip_network(net).version == cidr.version for net in block.get("except", [])
        )
    pod_labels = find(base, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert network_policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()


def test_the_image_tag_is_the_package_version(base: list[Document]) -> None:
    import tomllib

    version = tomllib.loads((manifests.ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert manager(base)["image"].endswith(f":{version}")


# ----------------------------------------------------------------------------- no secrets


def test_no_secret_value_is_in_the_repository() -> None:
    """Secrets are referenced, never shipped: no Secret object, no data in one, no
    password-like literal, no private key anywhere under deploy/ or in the image files."""
    files = [
        *all_manifest_files(),
        manifests.ROOT / "Dockerfile",
        manifests.ROOT / "manifest.yml",
    ]
    secret_names = {
        variable.name
        for variable in [
            *manifests.manager_variables().values(),
            *manifests.agent_variables().values(),
        ]
        if variable.secret
    }
    assert {
        "MONGODB_URL",
        "BROKER_PASSWORD",
        "SECRETS_MASTER_KEYS",
        "CLIENT_PASSWORD",
    } <= secret_names
    for path in files:
        text = path.read_text()
        assert "PRIVATE KEY" not in text, path
        if path.suffix != ".yaml":
            continue
        for doc in manifests.load_documents(path):
            assert doc["kind"] != "Secret", f"{path}: a Secret object (create it as docs say)"
            for container in manifests.containers(doc):
                for entry in container.get("env", []):
                    name = entry["name"].upper()
                    if name in secret_names or {"PASSWORD", "SECRET", "TOKEN"} & set(
                        name.split("_")
                    ):
                        assert "valueFrom" in entry, f"{path}: {entry['name']} set inline"
            for name, value in (doc.get("data") or {}).items():
                assert not re.search(r"password|secret|token|master", name, re.I), (path, name)
                assert not re.search(r"mongodb(\+srv)?://[^/@]*:[^/@]*@", str(value)), path


# ----------------------------------------------------------------------------- the agent


def test_the_agent_sidecar(agent_example: list[Document]) -> None:
    statefulset = find(agent_example, "StatefulSet", "orders-db")
    pod = statefulset["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    by_name = {container["name"]: container for container in pod["containers"]}
    agent = by_name["backup-agent"]
    known = manifests.agent_variables()
    environment = container_environment(agent, agent_example)
    assert set(map(str.upper, environment)) <= set(known)
    required = {variable.name for variable in known.values() if variable.required}
    assert required <= set(map(str.upper, environment))
    assert agent["securityContext"]["readOnlyRootFilesystem"] is True
    assert agent["securityContext"]["runAsUser"] != 0
    # The scripts directory is the ConfigMap of agent/examples/postgresql, executable.
    mounts = {mount["name"]: mount["mountPath"] for mount in agent["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert mounts["scripts"] == environment["scripts_path"]
    scripts = volumes["scripts"]["configMap"]
    assert scripts["name"] == manifests.AGENT_SCRIPTS_NAME
    assert scripts["defaultMode"] & 0o111 == 0o111
    for setting in ("directory_backup", "directory_restore"):
        assert any(environment[setting].startswith(path + "/") for path in mounts.values())
    for setting in ("tls_cert_file", "tls_key_file"):
        assert Path(environment[setting]).parent.as_posix() == mounts["agent-tls"]
    (agent_port,) = agent["ports"]
    assert agent_port["containerPort"] == int(environment["client_port"])
    service = find(agent_example, "Service", "orders-db")
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert agent_port["name"] in {port["targetPort"] for port in service["spec"]["ports"]}


def test_the_scripts_configmap_is_the_example_set() -> None:
    assert manifests.AGENT_SCRIPTS_CONFIGMAP.read_text() == manifests.agent_scripts_configmap(), (
        "regenerate: .venv/bin/python -m tests.deploy.manifests agent-scripts"
    )
    (configmap,) = manifests.load_documents(manifests.AGENT_SCRIPTS_CONFIGMAP)
    for name, text in configmap["data"].items():
        assert (manifests.AGENT_SCRIPTS / name).read_text() == text


def test_only_the_manager_reaches_the_agent(
    agent_example: list[Document], base: list[Document]
) -> None:
    policy = find(agent_example, "NetworkPolicy", "orders-db")
    manager_labels = find(base, "Deployment")["spec"]["template"]["metadata"]["labels"]
    manager_namespace = find(base, "Deployment")["metadata"]["namespace"]
    (rule,) = [rule for rule in policy["spec"]["ingress"] if rule["ports"][0]["port"] == "agent"]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"].items() <= manager_labels.items()
    assert peer["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": manager_namespace
    }


# ----------------------------------------------------------------------------- registration


def test_the_registration_examples(base: list[Document]) -> None:
    catalog = yaml.safe_load((manifests.ROOT / "catalog.yml").read_text())
    offerings = {service["name"]: service for service in catalog["services"]}
    (broker,) = manifests.load_documents(manifests.REGISTRATION / "clusterservicebroker.yaml")
    assert broker["apiVersion"] == "servicecatalog.k8s.io/v1beta1"
    service = find(base, "Service", "backup-manager")
    namespace = service["metadata"]["namespace"]
    port = service["spec"]["ports"][0]["port"]
    assert broker["spec"]["url"] == f"http://backup-manager.{namespace}.svc:{port}"
    secret_ref = broker["spec"]["authInfo"]["basic"]["secretRef"]
    assert secret_ref["namespace"] == namespace
    (instance,) = manifests.load_documents(manifests.REGISTRATION / "serviceinstance.yaml")
    offering = offerings[instance["spec"]["clusterServiceClassExternalName"]]
    assert instance["spec"]["clusterServicePlanExternalName"] in {
        plan["name"] for plan in offering["plans"]
    }
    assert "parameters" not in instance["spec"]  # passwords: only from the Secret
    assert instance["spec"]["parametersFrom"][0]["secretKeyRef"]["key"] == "parameters"
    json.dumps(instance)


def quantity(text: str) -> float:
    """A Kubernetes resource quantity (the suffixes these manifests use) as a number."""
    suffixes = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m|Ki|Mi|Gi)?", str(text))
    assert match, f"not a quantity: {text}"
    return float(match.group(1)) * suffixes.get(match.group(2) or "", 1)


def test_requests_fit_their_limits(base: list[Document], agent_example: list[Document]) -> None:
    for obj in [*base, *agent_example]:
        for container in manifests.containers(obj):
            resources = container.get("resources")
            if not resources:
                continue
            for name, limit in resources.get("limits", {}).items():
                assert quantity(resources["requests"][name]) <= quantity(limit), container["name"]
            for value in resources["requests"].values():
                assert quantity(value) > 0
