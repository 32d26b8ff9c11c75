"""Destinations: where an instance's backups are stored (an S3 bucket or a Swift container).

The document holds the public settings of :class:`storage.S3Settings` / :class:`SwiftSettings`
at top level and the secret (``secret_access_key`` or ``password``) sealed under ``secrets``.

A user describes a destination with :data:`DestinationSpec` (creation, and the merged result
of a change); :func:`check` writes, reads back and deletes a probe object and says in words a
user can act on what failed.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import structlog
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pymongo.errors import DuplicateKeyError

from backup.database import SCHEMA_VERSION, Database, Document
from backup.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    StorageUnavailable,
    Unprocessable,
)
from backup.merge_patch import merge_patch
from backup.pagination import Page, now, paginate
from backup.secrets import SecretBox
from storage import StorageError, TransferSettings, ValidationReport, ValidationStep, open_store
from storage.settings import ObjectLock, S3Settings, SwiftSettings

log = structlog.get_logger(__name__)

AnySettings = S3Settings | SwiftSettings
SECRET_FIELD = {"S3": "secret_access_key", "SWIFT": "password"}
"""Each type's usual secret; a Swift destination with a Keystone application credential has
``application_credential_secret`` instead (:func:`secret_field`)."""
SECRET_FIELDS = {
    "S3": ("secret_access_key",),
    "SWIFT": ("password", "application_credential_secret"),
}
# Never taken from users: a path on the manager's disk.
_SERVER_ONLY = {"ca_bundle"}

Name = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$")]
_SPEC = ConfigDict(extra="forbid", strict=True)


def _strip_name(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value.strip()


# --- what a user sends ----------------------------------------------------------------------


class S3DestinationSpec(BaseModel):
    """An S3 bucket (AWS or any S3-compatible endpoint)."""

    model_config = _SPEC
    type: Literal["S3"]
    name: Name
    plain_http: bool | None = Field(
        default=None,
        description="Speak plain HTTP to the endpoint (default: from the endpoint's scheme, "
        "else HTTPS).",
    )
    endpoint: str | None = Field(
        default=None,
        max_length=2048,
        description="https://host[:port] or host[:port]; omit for AWS.",
    )
    region: str = Field(default="us-east-1", min_length=1, max_length=64)
    bucket: str = Field(min_length=3, max_length=63)
    access_key_id: str = Field(min_length=1, max_length=256)
    secret_access_key: SecretStr = Field(
        min_length=1, max_length=1024, description="Never returned: answers say whether it is set."
    )
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    verify_tls: bool = Field(default=True, description="Check the endpoint's TLS certificate.")
    prefix: str = Field(default="", max_length=512, description="Key prefix of every object.")
    object_lock: ObjectLock | None = Field(
        default=None,
        description="Write every restore point's objects locked (S3 Object Lock) until its "
        "expiry plus margin_days; the bucket must have object lock enabled. See "
        'docs/storage.md, "Object lock".',
    )

    _name = field_validator("name")(classmethod(lambda cls, v: _strip_name(v)))

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None, info: ValidationInfo) -> str | None:
        plain = info.data.get("plain_http")
        if value is None:
            if plain:
                raise ValueError("plain_http needs an endpoint")
            return None
        raw = value.strip()
        if "://" not in raw:
            raw = ("http://" if plain else "https://") + raw
        try:
            parts = urlsplit(raw)
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise ValueError("must be http(s)://host[:port] with a valid port") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be http(s)://host[:port] or host[:port]")
        if parts.path.strip("/") or parts.query or parts.fragment or parts.username:
            raise ValueError("must be only scheme, host and port (the bucket is a field)")
        if plain is not None and plain != (parts.scheme == "http"):
            raise ValueError("its scheme contradicts plain_http")
        return raw.rstrip("/")

    def settings(self) -> S3Settings:
        return S3Settings(
            **self.model_dump(exclude={"name", "plain_http", "secret_access_key"}),
            secret_access_key=self.secret_access_key,
        )


class SwiftDestinationSpec(BaseModel):
    """An OpenStack Swift container (auth v1 such as tempauth, or Keystone v3)."""

    model_config = _SPEC
    type: Literal["SWIFT"]
    name: Name
    auth_url: str = Field(min_length=1, max_length=2048, pattern=r"^https?://[^\s/]+\S*$")
    auth_version: Literal["1", "3"] = "3"
    username: str = Field(
        default="",
        max_length=256,
        description="The user (auth v1, v3 password), or the owner of an application "
        "credential given by name.",
    )
    password: SecretStr | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description="The key (auth v1) or password (v3). Never returned.",
    )
    application_credential_id: str | None = Field(default=None, min_length=1, max_length=256)
    application_credential_name: str | None = Field(default=None, min_length=1, max_length=256)
    application_credential_secret: SecretStr | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description="Keystone v3: the application credential's secret, the recommended "
        "authentication (with application_credential_id, or its name and username). Never "
        "returned.",
    )
    user_domain_name: str | None = Field(default="Default", max_length=256)
    project_name: str | None = Field(default=None, max_length=256)
    project_domain_name: str | None = Field(default="Default", max_length=256)
    region_name: str | None = Field(default=None, max_length=256)
    interface: Literal["public", "internal"] = Field(
        default="public", description="Which of the catalog's object-store endpoints to use."
    )
    container: str = Field(min_length=1, max_length=256)
    verify_tls: bool = True
    prefix: str = Field(default="", max_length=512)

    _name = field_validator("name")(classmethod(lambda cls, v: _strip_name(v)))

    def settings(self) -> SwiftSettings:
        secrets = {k: v for k in SECRET_FIELDS["SWIFT"] if (v := getattr(self, k)) is not None}
        return SwiftSettings(
            **self.model_dump(exclude={"name", *SECRET_FIELDS["SWIFT"]}), **secrets
        )


DestinationSpec = Annotated[S3DestinationSpec | SwiftDestinationSpec, Field(discriminator="type")]
_ANY_SPEC: TypeAdapter[S3DestinationSpec | SwiftDestinationSpec] = TypeAdapter(DestinationSpec)


def parse(data: dict[str, Any]) -> S3DestinationSpec | SwiftDestinationSpec:
    """Validate ``data`` with the model its ``type`` names, so errors name plain field paths
    (``bucket``, not ``S3.bucket``). Raises pydantic's ``ValidationError``."""
    kind = data.get("type")
    if kind == "S3":
        return S3DestinationSpec.model_validate(data)
    if kind == "SWIFT":
        return SwiftDestinationSpec.model_validate(data)
    return _ANY_SPEC.validate_python(data)


# --- stored documents -----------------------------------------------------------------------


def _context(dest_id: str) -> str:
    return f"destinations/{dest_id}"


def secret_field(settings: AnySettings) -> str:
    """The field of ``settings`` that holds its secret."""
    if isinstance(settings, SwiftSettings) and settings.uses_application_credential:
        return "application_credential_secret"
    return SECRET_FIELD[settings.type]


def sealed_secret(settings: AnySettings) -> dict[str, str]:
    """The secret of ``settings`` by its field's name, to be sealed."""
    field_name = secret_field(settings)
    value: SecretStr | None = getattr(settings, field_name)
    return {field_name: value.get_secret_value() if value is not None else ""}


def public_settings(settings: AnySettings) -> dict[str, Any]:
    return settings.model_dump(exclude={*SECRET_FIELDS[settings.type], *_SERVER_ONLY})


def settings_for(doc: Document, box: SecretBox) -> AnySettings:
    """The connection settings of a stored destination, with its secret opened."""
    kind = doc["type"]
    names = SECRET_FIELDS[kind]
    opened = box.open_map(doc.get("secrets") or {}, _context(doc["_id"]))
    cls = S3Settings if kind == "S3" else SwiftSettings
    fields = {k: doc[k] for k in cls.model_fields if k in doc and k not in names}
    secrets = {k: SecretStr(opened[k]) for k in names if k in opened}
    if not secrets:
        secrets = {names[0]: SecretStr("")}
    return cls(**fields, **secrets)


def spec_of(doc: Document, box: SecretBox) -> dict[str, Any]:
    """The stored destination as the JSON a user would send to create it, secret included
    (to be merged with a change and validated again, never to be shown)."""
    kind = doc["type"]
    model = S3DestinationSpec if kind == "S3" else SwiftDestinationSpec
    spec = {k: doc[k] for k in model.model_fields if k in doc}
    opened = box.open_map(doc.get("secrets") or {}, _context(doc["_id"]))
    spec.update({k: opened[k] for k in SECRET_FIELDS[kind] if k in opened})
    return spec


def _duplicate(name: str) -> Conflict:
    return Conflict(
        f"This instance already has a destination named {name!r}; choose another name.",
        code="duplicate_name",
        field="name",
    )


async def _check_name(store: Database, instance_id: str, name: str, own_id: str | None) -> None:
    other = await store.destinations.find_one(
        {"instance_id": instance_id, "name": name, "_id": {"$ne": own_id}}, {"_id": 1}
    )
    if other is not None:
        raise _duplicate(name)


async def create(
    store: Database,
    box: SecretBox,
    instance_id: str,
    spec: S3DestinationSpec | SwiftDestinationSpec,
    *,
    verify_timeout: float | None = None,
) -> Document:
    """Store a new destination; with ``verify_timeout``, only once :func:`check` passed."""
    await _check_name(store, instance_id, spec.name, None)
    settings = spec.settings()
    if verify_timeout is not None:
        await _verified(settings, verify_timeout)
    dest_id = uuid.uuid4().hex
    at = now()
    doc: Document = {
        "_id": dest_id,
        "instance_id": instance_id,
        "name": spec.name,
        **public_settings(settings),
        "secrets": box.seal_map(sealed_secret(settings), _context(dest_id)),
        "created_at": at,
        "updated_at": at,
        "version": 1,
        "schema_version": SCHEMA_VERSION,
    }
    try:
        await store.destinations.insert_one(doc)
    except DuplicateKeyError:
        raise _duplicate(spec.name) from None
    return doc


async def get(store: Database, instance_id: str, dest_id: str) -> Document:
    doc = await store.destinations.find_one({"_id": dest_id, "instance_id": instance_id})
    if doc is None:
        raise NotFound(
            f"This instance has no destination {dest_id[:100]!r}.", code="destination_not_found"
        )
    return doc


async def list_page(store: Database, instance_id: str, limit: int, cursor: str | None) -> Page:
    return await paginate(
        store.destinations, {"instance_id": instance_id}, limit=limit, cursor=cursor
    )


# What decides where a destination's secret is sent, and how safely. Changing any of these
# while keeping the stored secret would let a caller who may edit the destination, but does
# not know its secret, have the secret sent to a host of their choosing.
_SWIFT_ROUTE = (
    "auth_url",
    "auth_version",
    "username",
    "user_domain_name",
    "project_name",
    "project_domain_name",
    "region_name",
    "interface",
    "application_credential_id",
    "application_credential_name",
)


def _s3_route(endpoint: str | None) -> tuple[str | None, int | None]:
    if endpoint is None:
        return None, None
    parts = urlsplit(endpoint)
    return parts.hostname, parts.port or (80 if parts.scheme == "http" else 443)


def _route_changes(before: AnySettings, after: AnySettings) -> list[str]:
    """The fields whose change in ``after`` would send the secret elsewhere, or less safely."""
    changed: list[str] = []
    if isinstance(before, S3Settings) and isinstance(after, S3Settings):
        if _s3_route(before.endpoint) != _s3_route(after.endpoint):
            changed.append("endpoint")
        elif (before.endpoint or "").startswith("https:") and (after.endpoint or "").startswith(
            "http:"
        ):
            changed.append("plain_http")
    elif isinstance(before, SwiftSettings) and isinstance(after, SwiftSettings):
        changed += [f for f in _SWIFT_ROUTE if getattr(before, f) != getattr(after, f)]
    if before.verify_tls and not after.verify_tls:
        changed.append("verify_tls")
    return changed


def _require_secret_for_moves(
    current: Document, box: SecretBox, patch: dict[str, Any], after: AnySettings
) -> None:
    secret = secret_field(after)
    if current["type"] != after.type or patch.get(secret) is not None:
        return  # a change of type, or the secret sent again: the caller knows it
    changed = _route_changes(settings_for(current, box), after)
    if changed:
        raise InvalidInput(
            f"Changing {', '.join(changed)} changes where or how the stored {secret} is sent; "
            f"send {secret} again in the same request.",
            code="secret_required",
            field=secret,
        )


def _merged(current: Document, box: SecretBox, patch: dict[str, Any]) -> dict[str, Any]:
    """The destination after ``patch``: a change of ``type`` starts afresh (keeping the name);
    otherwise the stored fields merged with the patch. The secret is kept unless sent."""
    kind = current["type"]
    if patch.get("type", kind) != kind:
        return {"name": current["name"], **patch}
    base = spec_of(current, box)
    if kind == "S3" and "plain_http" in patch and "endpoint" not in patch:
        # The switch alone changes the scheme of the stored endpoint.
        endpoint = str(base.get("endpoint") or "")
        if "://" in endpoint:
            base["endpoint"] = endpoint.split("://", 1)[1]
    merged = merge_patch(base, patch)
    for secret in SECRET_FIELDS[kind]:
        if merged.get(secret) is None and base.get(secret) is not None:
            merged[secret] = base[secret]  # null or absent: kept (it is never shown to resend)
    if kind == "SWIFT":
        # Sending one kind of Swift secret replaces the other kind of authentication.
        if patch.get("application_credential_secret") is not None and "password" not in patch:
            merged.pop("password", None)
        if patch.get("password") is not None:
            for name in (
                "application_credential_id",
                "application_credential_name",
                "application_credential_secret",
            ):
                if name not in patch:
                    merged.pop(name, None)
    return merged


def _changed(
    current: Document, box: SecretBox, patch: dict[str, Any]
) -> tuple[S3DestinationSpec | SwiftDestinationSpec, AnySettings]:
    """The destination ``current`` after ``patch``, validated, with its settings; refused when
    the patch moves the stored secret without sending it."""
    spec = parse(_merged(current, box, patch))
    settings = spec.settings()
    _require_secret_for_moves(current, box, patch, settings)
    return spec, settings


async def update(
    store: Database,
    box: SecretBox,
    instance_id: str,
    dest_id: str,
    patch: dict[str, Any],
    *,
    verify_timeout: float | None = None,
) -> Document:
    """Apply a JSON merge patch; the merged destination is validated as a whole (and with
    ``verify_timeout`` checked against the storage) before anything is stored."""
    current = await get(store, instance_id, dest_id)
    spec, settings = _changed(current, box, patch)
    await _check_name(store, instance_id, spec.name, dest_id)
    if verify_timeout is not None:
        await _verified(settings, verify_timeout)
    public = public_settings(settings)
    stale = [
        k for k in set(S3Settings.model_fields) | set(SwiftSettings.model_fields) if k in current
    ]
    update: dict[str, Any] = {
        "$set": {
            "name": spec.name,
            **public,
            "secrets": box.seal_map(sealed_secret(settings), _context(dest_id)),
            "updated_at": now(),
        },
        "$inc": {"version": 1},
    }
    unset = {k: "" for k in stale if k not in public}
    if unset:
        update["$unset"] = unset
    try:
        result = await store.destinations.update_one(
            {"_id": dest_id, "version": current["version"]}, update
        )
    except DuplicateKeyError:
        raise _duplicate(spec.name) from None
    if result.matched_count != 1:
        raise Conflict(
            "The destination was changed by someone else meanwhile; read it again and retry.",
            code="concurrent_update",
        )
    return await get(store, instance_id, dest_id)


async def delete(store: Database, instance_id: str, dest_id: str) -> None:
    """Delete a destination nothing refers to: no plan stores its backups there, no restore
    point's files are there, no job is writing or waiting to delete files there."""
    await get(store, instance_id, dest_id)
    plan = await store.plans.find_one(
        {"instance_id": instance_id, "destination_id": dest_id}, {"name": 1}
    )
    if plan is not None:
        raise Conflict(
            f"Plan {plan.get('name')!r} stores its backups in this destination; change or delete "
            "that plan first.",
            code="destination_in_use",
        )
    points = await store.restore_points.count_documents(
        {"instance_id": instance_id, "destination_id": dest_id}
    )
    if points:
        raise Conflict(
            f"{points} restore point(s) are stored in this destination; delete them first "
            "(deleting the destination would leave their files unreachable).",
            code="destination_in_use",
        )
    active = await store.jobs.find_one(
        {"destination_id": dest_id, "status": {"$in": ["QUEUED", "RUNNING"]}}, {"_id": 1}
    )
    if active is not None:
        raise Conflict(
            f"Job {active['_id']} is using this destination; wait for it to end.",
            code="destination_in_use",
        )
    pending = await store.jobs.find_one({"pending_deletes.destination_id": dest_id}, {"_id": 1})
    if pending is not None:
        raise Conflict(
            f"Files that job {pending['_id']} left in this destination still wait to be deleted "
            "by the retention sweep; retry once they are gone.",
            code="destination_in_use",
        )
    await store.destinations.delete_one({"_id": dest_id, "instance_id": instance_id})


# --- checking a destination -----------------------------------------------------------------


@dataclass
class CheckResult:
    """The outcome of writing, reading back and deleting a probe object."""

    ok: bool
    error: str | None
    description: str
    steps: list[ValidationStep] = field(default_factory=list)


def _where(settings: AnySettings) -> tuple[str, str]:
    if settings.type == "S3":
        return f"bucket {settings.bucket!r}", settings.endpoint or "AWS S3"
    return f"container {settings.container!r}", settings.auth_url


def advice(code: str | None, settings: AnySettings, step: str | None, detail: str = "") -> str:
    """What failed and what to do about it, in a user's words, for a storage error ``code``
    (``detail``: the storage's own message, to tell TLS failures apart)."""
    what, where = _where(settings)
    doing = f" (while trying to {step} a probe object)" if step and step != "connect" else ""
    secret = (
        "access key id and secret access key"
        if settings.type == "S3"
        else "user name and key (or password, domain and project, or application credential)"
    )
    if code == "storage_tls_failed":
        if "WRONG_VERSION_NUMBER" in detail or "wrong version number" in detail:
            plain = " (or set plain_http)" if settings.type == "S3" else ""
            return (
                f"The TLS connection to {where} failed{doing}: it does not speak HTTPS on that "
                f"port. Use its http:// address{plain}, or its HTTPS port."
            )
        if "CERTIFICATE_VERIFY_FAILED" in detail or "certificate" in detail.lower():
            return (
                f"The TLS connection to {where} failed{doing}: its certificate is not trusted "
                "(a private CA, self-signed, expired or for another host name). Use an "
                "endpoint with a trusted certificate, ask the operator to trust its CA, or set "
                "verify_tls to false for a test endpoint only."
            )
        return (
            f"The TLS connection to {where} failed{doing}: check that it speaks HTTPS on that "
            "port with a trusted certificate."
        )
    return {
        "storage_container_not_found": (
            f"The {what} does not exist at {where}; create it or correct its name."
        ),
        "storage_auth_failed": f"{where} refused the credentials{doing}: check the {secret}.",
        "storage_permission_denied": (
            f"The credentials are valid but may not use the {what} at {where}{doing}: grant "
            "them read, write and delete on it."
        ),
        "storage_unreachable": (
            f"{where} cannot be reached{doing}: check the host name and port, and that the "
            "manager can connect to it."
        ),
        "storage_transient": (
            f"{where} failed temporarily{doing} (timeout, throttling or server error); retry."
        ),
        "storage_timeout": f"{where} did not answer in time{doing}; check it and retry.",
        "storage_not_object_store": (
            f"{where} does not answer like an {'S3' if settings.type == 'S3' else 'Swift'} "
            f"server{doing}, so nothing was written to it: check the "
            f"{'endpoint' if settings.type == 'S3' else 'auth_url'}."
        ),
        "storage_invalid_settings": (
            f"The storage client cannot use these settings{doing}: check the endpoint and region."
        ),
        "storage_object_lock_missing": (
            f"The {what} at {where} does not have S3 Object Lock enabled, which object_lock "
            "requires (it can only be enabled when a bucket is created): use a bucket created "
            "with object lock, or remove object_lock."
        ),
    }.get(code or "", f"The storage check of the {what} at {where} failed{doing}.")


def _words(text: str) -> set[str]:
    return set(re.findall(r"[\w'./:-]+", text.lower().replace(".", " ")))


def _probe_transfer(timeout: float) -> TransferSettings:
    """Request timeouts that fit in the check's ``timeout``: each request may take at most
    half of it (a quarter to connect), so that a server that never answers is given up on by
    the request itself, not only by the check's deadline, and frees its thread in time."""
    default = TransferSettings()
    return TransferSettings(
        connect_timeout=min(default.connect_timeout, timeout / 4),
        read_timeout=min(default.read_timeout, timeout / 2),
    )


async def _probe(settings: AnySettings, timeout: float) -> ValidationReport:
    try:
        async with asyncio.timeout(timeout):
            async with open_store(settings, _probe_transfer(timeout)) as objects:
                return await objects.validate()
    except StorageError as exc:
        return ValidationReport(
            False, [ValidationStep(exc.step or "connect", False, exc.code, exc.message)]
        )
    except ImportError:
        raise StorageUnavailable(
            f"This manager cannot reach {settings.type} storage (its client is not installed)."
        ) from None
    except TimeoutError:
        return ValidationReport(
            False,
            [ValidationStep("connect", False, "storage_timeout", f"no answer in {timeout:g} s")],
        )
    except Exception as exc:  # a client failing in a way nobody foresaw: still an answer
        log.error("destination_check_failed", error=type(exc).__name__)
        return ValidationReport(
            False,
            [ValidationStep("connect", False, "storage_error", "the storage client failed")],
        )


async def check(settings: AnySettings, timeout: float) -> CheckResult:
    """Write, read back and delete a probe object with ``settings``."""
    report = await _probe(settings, timeout)
    failure = report.failure
    if report.ok and failure is None:
        what, where = _where(settings)
        return CheckResult(
            True,
            None,
            f"A probe object was written, read back and deleted in the {what} at {where}.",
            list(report.steps),
        )
    if failure is not None and failure.error_code == "egress_denied":
        # Not the destination failing, but this manager refusing to go there (storage.egress).
        field = "endpoint" if isinstance(settings, S3Settings) else "auth_url"
        raise Unprocessable(failure.message or "", code="egress_denied", field=field)
    code = failure.error_code if failure and failure.error_code else "storage_error"
    detail = (failure.message or "") if failure else ""
    text = advice(code, settings, failure.name if failure else None, detail)
    # The storage's own words, unless they only repeat ours.
    if detail and code != "storage_timeout" and not _words(detail) <= _words(text):
        text += f" Details: {detail.rstrip('.')}."
    return CheckResult(False, code, text, list(report.steps))


async def check_stored(
    store: Database,
    box: SecretBox,
    instance_id: str,
    dest_id: str,
    timeout: float,
    patch: dict[str, Any] | None = None,
) -> CheckResult:
    """Check a stored destination, or (``patch``) the result of changing it, which is not
    saved: a change that moves the secret needs the secret, as :func:`update` does."""
    doc = await get(store, instance_id, dest_id)
    if patch:
        return await check(_changed(doc, box, patch)[1], timeout)
    try:
        settings = settings_for(doc, box)
    except ValidationError as exc:
        # Stored before today's rules on endpoints and regions: say so, connect nowhere.
        problem = exc.errors(include_url=False, include_input=False)[0]
        name = ".".join(str(p) for p in problem["loc"]) or "settings"
        return CheckResult(
            False,
            "destination_invalid",
            f"The stored settings of this destination are no longer accepted ({name}: "
            f"{problem['msg']}); correct them with PATCH.",
        )
    return await check(settings, timeout)


async def _verified(settings: AnySettings, timeout: float) -> None:
    result = await check(settings, timeout)
    if not result.ok:
        raise Unprocessable(
            f"Not saved: {result.description}", code=result.error or "storage_error"
        )
