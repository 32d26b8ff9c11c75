"""Manager replicas as real processes (``python -m broker``) on one shared database: the
harness is ``tests/servers/managers.py``, shared with ``tests/scheduler/test_replicas.py``."""

from tests.servers.managers import managers, shared_database  # noqa: F401 - fixtures
