"""Protocol destination -> the storage package's typed settings."""

from __future__ import annotations

from agent.config import AgentConfig
from agent.models import Destination
from storage import S3Settings, SwiftSettings, TransferSettings


def _s3_endpoint(endpoint: str, skip_ssl: bool) -> str:
    if "://" not in endpoint:
        return ("http://" if skip_ssl else "https://") + endpoint
    if skip_ssl and endpoint.startswith("https://"):
        return "http://" + endpoint[len("https://") :]
    return endpoint


def to_settings(dest: Destination, cfg: AgentConfig) -> S3Settings | SwiftSettings:
    """Keys are passed whole (filenamePrefix + filename), so the settings' prefix stays ''."""
    if dest.type == "S3":
        endpoint = dest.endpoint or cfg.default_s3_endpoint
        return S3Settings(
            endpoint=_s3_endpoint(endpoint, dest.skipSSL) if endpoint else None,
            region=dest.region or "us-east-1",
            bucket=dest.bucket or "",
            access_key_id=dest.authKey or "",
            secret_access_key=dest.authSecret or "",
            addressing_style="path" if endpoint else "auto",
            verify_tls=not dest.skipSSL,
            prefix="",
        )
    auth_url = dest.authUrl or ""
    v1 = auth_url.rstrip("/").endswith("/auth/v1.0")
    return SwiftSettings(
        auth_url=auth_url,
        auth_version="1" if v1 else "3",
        username=dest.username or "",
        password=dest.password or "",
        user_domain_name=None if v1 else (dest.domain or "Default"),
        project_name=None if v1 else dest.project_name,
        project_domain_name=None if v1 else (dest.domain or "Default"),
        container=dest.container_name or "",
        prefix="",
    )


def transfer_settings(cfg: AgentConfig) -> TransferSettings:
    return TransferSettings(part_size=cfg.s3_part_size, max_concurrency=cfg.s3_max_concurrency)
