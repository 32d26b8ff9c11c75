"""The image definition (Dockerfile) without a builder: what it copies exists, what it runs is
the package's entry point, its user is not root, its base image is pinned."""

from __future__ import annotations

import fnmatch
import importlib
import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field

from tests.deploy import manifests
from tests.deploy.manifests import ROOT

DOCKERFILE = ROOT / "Dockerfile"
# A pinned base: an exact version tag (x.y.z, optionally with a variant) or a digest.
PINNED = re.compile(r"^[\w./-]+(:\d+\.\d+\.\d+[\w.-]*)?(@sha256:[0-9a-f]{64})?$")


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def last(self, keyword: str) -> str | None:
        values = [value for key, value in self.instructions if key == keyword]
        return values[-1] if values else None


def stages() -> list[Stage]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, value = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = value.split()
            result.append(Stage(words[0], words[2] if len(words) == 3 else ""))
        else:
            result[-1].instructions.append((keyword, value.strip()))
    return result


def by_name() -> dict[str, Stage]:
    return {stage.name: stage for stage in stages()}


def entry_point(stage: Stage) -> list[str]:
    value = stage.last("ENTRYPOINT")
    assert value is not None and value.startswith("["), "ENTRYPOINT in exec form"
    words = json.loads(value)
    assert isinstance(words, list)
    return [str(word) for word in words]


def inherited(stage: Stage, keyword: str) -> str | None:
    """The instruction's last value in ``stage`` or the stages it is built from."""
    named = by_name()
    while True:
        value = stage.last(keyword)
        if value is not None or stage.base not in named:
            return value
        stage = named[stage.base]


def test_base_images_are_pinned() -> None:
    named = by_name()
    for stage in stages():
        if stage.base in named:
            continue
        assert stage.base != "scratch"
        assert PINNED.match(stage.base) and (":" in stage.base or "@" in stage.base), (
            f"{stage.base}: pin an exact version or digest"
        )
        assert not stage.base.endswith(":latest")


def test_what_the_image_copies_exists_and_is_not_ignored() -> None:
    ignored = [
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = 0
    for stage in stages():
        for keyword, value in stage.instructions:
            if keyword not in ("COPY", "ADD"):
                continue
            words = shlex.split(value)
            if any(word.startswith("--from=") for word in words):
                source_stage = next(w for w in words if w.startswith("--from="))[7:]
                assert source_stage in by_name(), value
                continue
            for source in [word for word in words if not word.startswith("--")][:-1]:
                path = ROOT / source
                assert path.exists(), f"COPY {source}: no such file in the repository"
                relative = source.rstrip("/")
                assert not any(fnmatch.fnmatch(relative, pattern) for pattern in ignored), source
                copied += 1
    assert copied


def test_the_image_copies_every_package_of_the_project() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {
        pattern.rstrip("*")
        for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    build = by_name()["build"]
    copied = {
        shlex.split(value)[0].rstrip("/") for key, value in build.instructions if key == "COPY"
    }
    assert packages <= copied
    assert pyproject["project"]["readme"] in " ".join(
        value for key, value in build.instructions if key == "COPY"
    )


def test_the_images_run_the_packages_entry_points_as_a_user_that_is_not_root() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    expected = {"manager": "osb-backup-manager", "agent-postgresql": "osb-backup-agent"}
    named = by_name()
    assert stages()[-1].name == "manager", "the default target is the manager"
    for stage_name, script in expected.items():
        stage = named[stage_name]
        (command,) = entry_point(stage)
        assert command == script and script in scripts
        module, _, function = scripts[script].partition(":")
        assert callable(getattr(importlib.import_module(module), function))
        user = inherited(stage, "USER")
        assert user is not None, f"{stage_name}: no USER"
        uid = user.split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"{stage_name}: USER {user} (numeric, not 0)"


def test_the_manager_image_and_the_deployment_agree() -> None:
    """The catalog the image names exists in it; the user and port match the Deployment's."""
    stage = by_name()["manager"]
    environment = dict(
        pair.split("=", 1) for value in [inherited(stage, "ENV") or ""] for pair in value.split()
    )
    copied_to = {shlex.split(value)[-1] for key, value in stage.instructions if key == "COPY"}
    assert environment["CATALOG_PATH"] in copied_to
    known = manifests.manager_variables()
    envs = " ".join(value for key, value in stage.instructions if key == "ENV").split()
    assert {pair.split("=", 1)[0] for pair in envs} <= set(known)
    base = manifests.render(manifests.BASE)
    pod = manifests.find(base, "Deployment")["spec"]["template"]["spec"]
    assert str(pod["securityContext"]["runAsUser"]) == (stage.last("USER") or "").split(":")[0]
    (port,) = pod["containers"][0]["ports"]
    assert stage.last("EXPOSE") == str(port["containerPort"])


def test_every_link_in_what_the_build_copies_points_at_something_it_copies() -> None:
    """A link copied without its target breaks the wheel the build stage makes
    (broker/osb/catalog.yml links to the top-level catalog.yml)."""
    build = by_name()["build"]
    sources = [
        ROOT / source
        for key, value in build.instructions
        if key == "COPY"
        for source in shlex.split(value)[:-1]
        if not source.startswith("--")
    ]
    links = [
        path
        for source in sources
        for path in ([source] if source.is_file() else source.rglob("*"))
        if path.is_symlink()
    ]
    assert links, "broker/osb/catalog.yml is a link: the check would see it"
    for link in links:
        target = link.resolve()
        assert any(target == s.resolve() or s.resolve() in target.parents for s in sources), (
            f"{link.relative_to(ROOT)} links to {target.relative_to(ROOT)}, which is not copied"
        )
