"""What a provision registers: the agent, how the scripts reach the database, the items.

The provision parameters as validated models (:class:`Registration`), how an update's
parameters are merged into them (:func:`merge_registration`), and how they are read back from
an instance document or its pending update (:func:`registration_of`). Passwords are
``SecretStr`` here and sealed with :class:`~backup.secrets.SecretBox` under
:func:`secrets_context` plus the field name in the document (docs/data-model.md); only
:meth:`Registration.public` (no secrets) is stored in clear or shown.
"""

from __future__ import annotations

import hmac
import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

# The one list of names a script parameter may not have, shared with the agent that enforces
# it too. The domain imports nothing else of the agent: agent.environment is a pure module of
# constants and functions (standard library only).
from agent.environment import FROM_MANAGER, describe, refusal
from backup.database import Document
from backup.secrets import SecretBox

_URL = re.compile(r"^https?://[^/@\s]+(/\S*)?$", re.IGNORECASE)
ItemName = Annotated[str, Field(min_length=1, max_length=256)]


class AgentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, hide_input_in_errors=True)

    url: str = Field(max_length=2048)
    username: str = Field(min_length=1, max_length=256)
    password: SecretStr = Field(min_length=1, max_length=1024)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not _URL.match(v):
            raise ValueError(
                "must be an http:// or https:// URL without user info (credentials go in "
                "username and password)"
            )
        return v.rstrip("/")


class DatabaseSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, hide_input_in_errors=True)

    host: str = Field(min_length=1, max_length=255)
    port: int | None = Field(default=None, ge=1, le=65535)
    username: str = Field(default="", max_length=256)
    password: SecretStr | None = Field(default=None, max_length=1024)
    parameters: dict[str, Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=dict, max_length=100
    )

    @field_validator("parameters")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            reason = parameter_refusal(name)
            if reason is not None:
                raise ValueError(describe(name, reason))
        return v


def parameter_refusal(name: str) -> str | None:
    """Why a tenant may not set the script parameter ``name`` (``None``: it may). Besides
    what the agent refuses, the names the manager adds itself (``BACKUP_PORT``, from
    ``database.port``)."""
    if name.upper() in FROM_MANAGER:
        return "the manager sets it from database.port; set that instead"
    return refusal(name)


class Registration(BaseModel):
    """What a provision registers: the agent, the database connection, the items."""

    model_config = ConfigDict(extra="forbid", strict=True, hide_input_in_errors=True)

    agent: AgentSpec
    database: DatabaseSpec
    items: list[ItemName] = Field(min_length=1, max_length=1000)
    delete_backups_on_deprovision: bool | None = None

    @field_validator("items")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("lists an item twice")
        return v

    def public(self) -> Document:
        """The parameters without their secrets: what is stored in clear and shown."""
        out: Document = {
            "agent": {"url": self.agent.url, "username": self.agent.username},
            "database": self.database.model_dump(exclude={"password"}),
            "items": list(self.items),
        }
        if self.delete_backups_on_deprovision is not None:
            out["delete_backups_on_deprovision"] = self.delete_backups_on_deprovision
        return out

    def secrets(self) -> dict[str, str | None]:
        db = self.database.password
        return {
            "agent_password": self.agent.password.get_secret_value(),
            "database_password": db.get_secret_value() if db is not None else None,
        }

    def same_as(self, other: Registration) -> bool:
        """Equal, secrets compared in constant time."""
        if self.public() != other.public():
            return False
        mine, theirs = self.secrets(), other.secrets()
        return all(
            hmac.compare_digest((mine[k] or "").encode(), (theirs[k] or "").encode()) for k in mine
        )

    def agent_changed(self, other: Registration) -> bool:
        return (
            self.agent.url != other.agent.url
            or self.agent.username != other.agent.username
            or not hmac.compare_digest(
                self.agent.password.get_secret_value().encode(),
                other.agent.password.get_secret_value().encode(),
            )
        )


def secrets_context(instance_id: str) -> str:
    return f"instances/{instance_id}"


def registration_of(part: Document, box: SecretBox, instance_id: str) -> Registration:
    """The registration stored in ``part`` (an instance or its pending update)."""
    opened = box.open_map(part.get("secrets") or {}, secrets_context(instance_id))
    agent = part.get("agent") or {}
    db = dict(part.get("database") or {})
    if isinstance(db.get("parameters"), dict):
        # Names stored before they were refused are dropped (never sent to an agent either),
        # so that such an instance can still be updated, deprovisioned or backed up.
        db["parameters"] = {
            k: v for k, v in db["parameters"].items() if parameter_refusal(k) is None
        }
    data: Document = {
        "agent": {
            "url": agent.get("url", ""),
            "username": agent.get("username", ""),
            "password": opened.get("agent_password", ""),
        },
        "database": {**db, "password": opened.get("database_password")},
        "items": list(part.get("items") or []),
    }
    explicit = (part.get("parameters") or {}).get("delete_backups_on_deprovision")
    if explicit is not None:
        data["delete_backups_on_deprovision"] = explicit
    return Registration.model_validate(data)


def merge_registration(current: Registration, patch: Document) -> Registration:
    """Apply update parameters: ``agent`` and ``database`` fields are merged one by one,
    ``items`` and ``delete_backups_on_deprovision`` replaced. Raises ``ValidationError``."""
    data: Document = {
        "agent": {**current.agent.model_dump(), "password": current.agent.password},
        "database": current.database.model_dump(),
        "items": list(current.items),
        "delete_backups_on_deprovision": current.delete_backups_on_deprovision,
    }
    data["database"]["password"] = current.database.password
    for key in ("agent", "database"):
        if key in patch:
            if not isinstance(patch[key], dict):
                data[key] = patch[key]  # let validation name the wrong type
            else:
                data[key] = {**data[key], **patch[key]}
    for key in ("items", "delete_backups_on_deprovision"):
        if key in patch:
            data[key] = patch[key]
    extra = set(patch) - {"agent", "database", "items", "delete_backups_on_deprovision"}
    data.update({k: patch[k] for k in extra})  # unknown keys: validation refuses them
    return Registration.model_validate(data)
