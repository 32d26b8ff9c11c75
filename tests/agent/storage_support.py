"""Protocol destinations pointing at the suite's real SeaweedFS and Swift, and reading back
what the agent stored there."""

from __future__ import annotations

import asyncio
import uuid

from storage import ObjectNotFound, S3Settings, SwiftSettings, open_store


def new_prefix(label: str = "agent") -> str:
    return f"{label}-{uuid.uuid4().hex[:10]}/"


def destination_for(settings: S3Settings | SwiftSettings, prefix: str | None = None) -> dict:
    """The protocol's ``destination`` for a real server, as the manager would send it."""
    prefix = prefix or new_prefix()
    if isinstance(settings, S3Settings):
        endpoint = settings.endpoint or ""
        return {
            "type": "S3",
            "skipStorage": False,
            "bucket": settings.bucket,
            "region": settings.region,
            "endpoint": endpoint,
            "authKey": settings.access_key_id,
            "authSecret": settings.secret_access_key.get_secret_value(),
            "skipSSL": endpoint.startswith("http://"),
            "filenamePrefix": prefix,
        }
    dest = {
        "type": "SWIFT",
        "skipStorage": False,
        "authUrl": settings.auth_url,
        "container_name": settings.container,
        "username": settings.username,
        "password": settings.password.get_secret_value(),
        "filenamePrefix": prefix,
        # The Go agent requires both even for auth v1, where they mean nothing.
        "domain": settings.user_domain_name or "Default",
        "project_name": settings.project_name or "backups",
    }
    return dest


def secrets_of(settings: S3Settings | SwiftSettings) -> list[str]:
    if isinstance(settings, S3Settings):
        return [settings.secret_access_key.get_secret_value()]
    return [settings.password.get_secret_value()]


def read_object(settings: S3Settings | SwiftSettings, key: str) -> bytes | None:
    async def go() -> bytes | None:
        async with open_store(settings) as store:
            try:
                return b"".join([c async for c in store.download(key)])
            except ObjectNotFound:
                return None

    return asyncio.run(go())


def list_keys(settings: S3Settings | SwiftSettings, prefix: str) -> list[str]:
    async def go() -> list[str]:
        async with open_store(settings) as store:
            return [o.key async for o in store.list(prefix)]

    return asyncio.run(go())
