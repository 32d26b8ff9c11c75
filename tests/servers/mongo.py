"""The real MongoDB-protocol server (the product's embedded SecantusDB) for the test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from backup.embedded_db import EmbeddedMongo


@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedMongo]:
    # As the manager runs it: authentication required, the password generated into the
    # directory (the log audit finds it on the server's ``password`` attribute).
    home = tmp_path_factory.mktemp("mongo")
    server = EmbeddedMongo(home / "db", state_dir=home)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mongo_url(mongo_server: EmbeddedMongo) -> str:
    return mongo_server.url
