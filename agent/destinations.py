"""Protocol destination -> the storage package's typed settings."""

from __future__ import annotations

from agent.config import AgentConfig
from agent.models import Destination
from storage import ObjectLock, S3Settings, SwiftSettings, TransferSettings


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
            # The date comes with each upload (retain_until); the margin is the manager's.
            object_lock=ObjectLock(mode=dest.objectLockMode, margin_days=0)
            if dest.objectLockMode
            else None,
        )
    auth_url = dest.authUrl or ""
    v1 = auth_url.rstrip("/").endswith("/auth/v1.0")
    if not v1 and dest.applicationCredentialSecret:
        return SwiftSettings(
            auth_url=auth_url,
            auth_version="3",
            username=dest.username or "",
            application_credential_id=dest.applicationCredentialId or None,
            application_credential_name=dest.applicationCredentialName or None,
            application_credential_secret=dest.applicationCredentialSecret,
            user_domain_name=dest.domain or "Default",
            region_name=dest.regionName or None,
            interface=dest.interface,
            container=dest.container_name or "",
            prefix="",
        )
    return SwiftSettings(
        auth_url=auth_url,
        auth_version="1" if v1 else "3",
        username=dest.username or "",
        password=dest.password or "",
        user_domain_name=None if v1 else (dest.domain or "Default"),
        project_name=None if v1 else dest.project_name,
        project_domain_name=None if v1 else (dest.domain or "Default"),
        region_name=None if v1 else (dest.regionName or None),
        interface=dest.interface,
        container=dest.container_name or "",
        prefix="",
    )


MIB = 1024 * 1024
PLANNED_PARTS = 9000  # of S3's 10,000: headroom for compression expanding random data


def transfer_settings(cfg: AgentConfig, size: int | None = None) -> TransferSettings:
    """Part size and concurrency. With the file's size known (a backup), parts are chosen
    large enough that the object fits S3's part limit at one constant part size, so peak
    memory (about part size x (concurrency + 1)) is known before the upload starts, instead
    of growing with the object as parts double for a stream of unknown length."""
    part = cfg.s3_part_size
    growth = TransferSettings.model_fields["part_growth_every"].default
    if size is not None:
        needed = -(-size // PLANNED_PARTS)
        part = max(part, -(-needed // MIB) * MIB)
        growth = PLANNED_PARTS
    return TransferSettings(
        part_size=part, max_concurrency=cfg.s3_max_concurrency, part_growth_every=growth
    )
