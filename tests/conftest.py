"""Shared fixtures: the real servers the suite starts itself on loopback."""

from __future__ import annotations

import os

import pytest

pytest_plugins = [
    "tests.servers.log_audit",  # first: it configures logging and others import it
    "tests.servers.mongo",
    "tests.servers.seed",  # store, box: a database to seed, and the keys to seal with
    "tests.servers.broker",
    "tests.servers.s3",
    "tests.servers.keystone",  # a real Keystone; tests.servers.swift puts Swift behind it
    "tests.servers.swift",
    "tests.agent.helpers",  # make_agent: agent processes
    "tests.servers.recorder",  # recorder: an HTTP stand-in for a host an attacker controls
    "tests.servers.listener",  # denied, allowed, second: TCP listeners that count connections
]

IN_CI = os.environ.get("CI", "").lower() == "true"


def skip_unless_available(reason: str) -> None:
    """Skip a test whose machine-provided server is missing, but never in CI: there it fails."""
    if IN_CI:
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)
