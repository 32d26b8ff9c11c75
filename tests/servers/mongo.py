"""The real MongoDB-protocol server (the product's embedded SecantusDB) for the test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from backup.embedded_db import EmbeddedMongo


@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedMongo]:
    server = EmbeddedMongo(tmp_path_factory.mktemp("mongo"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mongo_url(mongo_server: EmbeddedMongo) -> str:
    return mongo_server.url
