"""What the deployment tests read: the kustomizations rendered as kustomize would, the
environment variables each part of the service reads (from its settings classes), and the
agent-scripts ConfigMap generated from agent/examples/postgresql.

    .venv/bin/python -m tests.deploy.manifests agent-scripts   # rewrite that ConfigMap
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
BASE = KUBERNETES / "base"
AGENT_EXAMPLE = KUBERNETES / "examples" / "postgresql-agent"
REGISTRATION = KUBERNETES / "registration"
AGENT_SCRIPTS = ROOT / "agent" / "examples" / "postgresql"
AGENT_SCRIPTS_CONFIGMAP = AGENT_EXAMPLE / "agent-scripts.yaml"
AGENT_SCRIPTS_NAME = "orders-db-agent-scripts"

# Kinds without a namespace among those the kustomizations hold.
CLUSTER_SCOPED = {"Namespace", "ClusterServiceBroker", "ClusterRole", "ClusterRoleBinding"}
# The product's packages whose settings classes the manager reads (the agent has its own).
MANAGER_PACKAGES = ("broker", "backup", "scheduler", "storage", "webguard")


Document = dict[str, Any]


def load_documents(path: Path) -> list[Document]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def kustomization(directory: Path) -> Document:
    document = load_documents(directory / "kustomization.yaml")[0]
    assert isinstance(document, dict)
    return document


def render(directory: Path) -> list[Document]:
    """The objects ``kubectl kustomize directory`` prints, for the features these
    kustomizations use (resources, namespace, images); anything else fails loudly, so that a
    new feature is added here (and checked against kubectl by the tests) before it is used."""
    spec = kustomization(directory)
    known = {"apiVersion", "kind", "namespace", "resources", "images"}
    unknown = set(spec) - known
    if unknown:
        raise NotImplementedError(f"{directory}: kustomize features not rendered: {unknown}")
    objects: list[Document] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        objects += render(path) if path.is_dir() else load_documents(path)
    for obj in objects:
        if "namespace" in spec and obj["kind"] not in CLUSTER_SCOPED:
            obj.setdefault("metadata", {})["namespace"] = spec["namespace"]
        for container in containers(obj):
            container["image"] = _image(container["image"], spec.get("images", []))
    return objects


def _image(image: str, replacements: list[Document]) -> str:
    name, _, tag = image.partition(":")
    for replacement in replacements:
        if replacement["name"] == name:
            name = replacement.get("newName", name)
            tag = replacement.get("newTag", tag)
    return f"{name}:{tag}" if tag else name


def pod_spec(obj: Document) -> Document | None:
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        spec = obj["spec"]["template"]["spec"]
        assert isinstance(spec, dict)
        return spec
    return None


def containers(obj: Document) -> list[Document]:
    spec = pod_spec(obj)
    if spec is None:
        return []
    return [*spec.get("initContainers", []), *spec["containers"]]


def find(objects: list[Document], kind: str, name: str | None = None) -> Document:
    matches = [
        obj
        for obj in objects
        if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name)
    ]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


@dataclass(frozen=True)
class Variable:
    """An environment variable a settings class reads."""

    name: str
    owner: str
    required: bool
    secret: bool


def settings_variables(settings_class: type[BaseSettings]) -> list[Variable]:
    """Every variable ``settings_class`` reads (its aliases, else the field name; these
    classes are case-insensitive and have no prefix) and whether it must be set."""
    assert settings_class.model_config.get("env_prefix", "") == ""
    assert settings_class.model_config.get("case_sensitive") is False
    variables = []
    for field_name, field in settings_class.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names = [choice for choice in alias.choices if isinstance(choice, str)]
        elif isinstance(alias, str):
            names = [alias]
        else:
            names = [field.alias or field_name]
        for name in names:
            variables.append(
                Variable(
                    name.upper(),
                    settings_class.__name__,
                    field.is_required(),
                    "SecretStr" in repr(field.annotation),
                )
            )
    return variables


def manager_settings_classes() -> list[type[BaseSettings]]:
    """The settings classes of the manager's packages, found by importing every module (so a
    class added, moved or renamed is still found)."""
    for package_name in MANAGER_PACKAGES:
        package = importlib.import_module(package_name)
        for module in pkgutil.walk_packages(package.__path__, package_name + "."):
            if not module.name.endswith("__main__"):
                importlib.import_module(module.name)
    found: list[type[BaseSettings]] = []
    pending = list(BaseSettings.__subclasses__())
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if cls.__module__.split(".")[0] in MANAGER_PACKAGES:
            found.append(cls)
    return found


def manager_variables() -> dict[str, Variable]:
    return {
        variable.name: variable
        for cls in manager_settings_classes()
        for variable in settings_variables(cls)
    }


def agent_variables() -> dict[str, Variable]:
    from agent.config import AgentConfig

    return {variable.name: variable for variable in settings_variables(AgentConfig)}


def container_environment(container: Document, objects: list[Document]) -> dict[str, Any]:
    """Name -> value (a string, or the ``valueFrom`` reference) of a container's environment,
    with ``envFrom`` ConfigMaps of ``objects`` resolved; a missing ConfigMap fails."""
    environment: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        environment.update(find(objects, "ConfigMap", ref)["data"])
    for entry in container.get("env", []):
        environment[entry["name"]] = entry.get("value", entry.get("valueFrom"))
    return environment


class _Literal(str):
    """A string YAML writes as a block (``|``), as a script reads best."""


def _literal(dumper: yaml.SafeDumper, value: _Literal) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")


def agent_scripts_configmap() -> str:
    """agent/examples/postgresql as the ConfigMap the agent example mounts."""
    dumper = type("Dumper", (yaml.SafeDumper,), {})
    dumper.add_representer(_Literal, _literal)
    document = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": AGENT_SCRIPTS_NAME, "labels": {"app.kubernetes.io/name": "orders-db"}},
        "data": {
            path.name: _Literal(path.read_text())
            for path in sorted(AGENT_SCRIPTS.iterdir())
            if path.is_file()
        },
    }
    header = (
        "# Generated from agent/examples/postgresql: do not edit; regenerate with\n"
        "#   .venv/bin/python -m tests.deploy.manifests agent-scripts\n"
    )
    return header + yaml.dump(document, Dumper=dumper, sort_keys=False, width=1000)


if __name__ == "__main__":
    if sys.argv[1:] != ["agent-scripts"]:
        sys.exit("usage: python -m tests.deploy.manifests agent-scripts")
    AGENT_SCRIPTS_CONFIGMAP.write_text(agent_scripts_configmap())
