"""Fixtures of the deployment tests: the rendered kustomizations, and an environment holding
only what a manifest sets (placeholder values in place of the Secret's)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.deploy import manifests


@pytest.fixture(scope="session")
def base() -> list[manifests.Document]:
    return manifests.render(manifests.BASE)


@pytest.fixture(scope="session")
def agent_example() -> list[manifests.Document]:
    return manifests.render(manifests.AGENT_EXAMPLE)


@pytest.fixture
def only_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[[dict[str, str]], None]]:
    """Sets exactly ``variables`` among those the service reads (and no Cloud Foundry
    variables), so that loading the settings sees what the deployment gives it."""

    def apply(variables: dict[str, str]) -> None:
        for name in [*manifests.manager_variables(), "VCAP_APPLICATION", "VCAP_SERVICES"]:
            monkeypatch.delenv(name, raising=False)
        for name, value in variables.items():
            monkeypatch.setenv(name, value)

    yield apply
