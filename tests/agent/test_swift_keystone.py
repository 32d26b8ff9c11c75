"""Our agent stores a backup in Swift behind the real Keystone with an application credential,
through the catalog's internal endpoint: the destination as the manager builds it
(``backup.agent_client.destination``), the agent's process, the real servers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from backup.agent_client import destination
from storage import SwiftSettings
from tests.agent.helpers import tracing_scripts
from tests.agent.storage_support import new_prefix, read_object
from tests.servers.keystone import REGION, ApplicationCredential
from tests.servers.swift import KeystoneSwiftCluster


def test_an_application_credential_and_the_internal_endpoint_reach_the_agent(
    make_agent: Any,
    tmp_path: Path,
    keystone_swift: KeystoneSwiftCluster,
    application_credential: ApplicationCredential,
) -> None:
    settings = SwiftSettings(
        auth_url=keystone_swift.keystone.url,
        application_credential_id=application_credential.id,
        application_credential_secret=application_credential.secret,
        region_name=REGION,
        interface="internal",
        container=keystone_swift.make_container(),
    )
    dest = destination(settings, filename_prefix=new_prefix())
    assert "password" not in dest or not dest["password"]
    scripts = tmp_path / "scripts"
    tracing_scripts(scripts)
    agent = make_agent(scripts=scripts)
    job = {
        "id": "5d1f2a0e-0c8b-4a43-9d7e-3f5a1b2c4d6e",
        "compression": False,
        "encryption_key": "none",
        "destination": dest,
        "backup": {"host": "h", "username": "u", "password": "p", "database": "d"},
    }
    assert agent.request("POST", "/backup", job) == (201, None)
    result = agent.wait_job("backup", job["id"])
    assert result["status"] == "SUCCEEDED", result
    key = result["stored_key"]
    assert read_object(settings, key) == b"payload\n"
    secret = application_credential.secret
    assert secret not in json.dumps(result) and secret not in agent.logs()
    # Written through the catalog's internal endpoint (its own proxy port and log name).
    log = (keystone_swift.base / "access.log").read_text(errors="replace")
    assert any(
        line.startswith("proxy_internal ") and " PUT " in line and key in line
        for line in log.splitlines()
    )
