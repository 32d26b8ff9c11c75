"""Encryption of secrets at rest: AES-256-GCM under a master key from configuration.

Each sealed value records the id of the key that sealed it, so keys can be rotated: the first
configured key seals, every configured key opens, and :meth:`SecretBox.needs_rotation` tells
which stored values to re-seal. The associated data binds a ciphertext to its document and
field, so a sealed value copied elsewhere does not open.
"""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_FORMAT = 1


class SecretKeyError(ValueError):
    """A master key is malformed, or a sealed value cannot be opened with the configured keys."""


@dataclass(frozen=True, slots=True)
class MasterKey:
    key_id: str
    key: bytes

    def __repr__(self) -> str:  # never show the key material
        return f"MasterKey(key_id={self.key_id!r})"


def parse_master_keys(spec: str) -> list[MasterKey]:
    """Parse ``"id1:base64key1,id2:base64key2"``; the first key is the active one."""
    keys: list[MasterKey] = []
    for index, part in enumerate(p.strip() for p in spec.split(",") if p.strip()):
        key_id, sep, material = part.partition(":")
        if not sep or not key_id or not material:
            raise SecretKeyError(
                f"master key #{index + 1} must look like '<id>:<base64 of 32 bytes>'"
            )
        try:
            raw = base64.urlsafe_b64decode(material + "=" * (-len(material) % 4))
        except (ValueError, TypeError) as exc:
            raise SecretKeyError(f"master key {key_id!r} is not valid base64") from exc
        if len(raw) != 32:
            raise SecretKeyError(f"master key {key_id!r} must decode to 32 bytes, not {len(raw)}")
        if any(k.key_id == key_id for k in keys):
            raise SecretKeyError(f"master key id {key_id!r} is configured twice")
        keys.append(MasterKey(key_id, raw))
    if not keys:
        raise SecretKeyError("at least one master key is required")
    return keys


def generate_master_key_spec(key_id: str = "k1") -> str:
    return f"{key_id}:" + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


class SecretBox:
    def __init__(self, keys: list[MasterKey]) -> None:
        if not keys:
            raise SecretKeyError("at least one master key is required")
        self._active = keys[0]
        self._by_id: Mapping[str, MasterKey] = {k.key_id: k for k in keys}

    def __repr__(self) -> str:
        return f"SecretBox(active={self._active.key_id!r}, keys={len(self._by_id)})"

    @property
    def active_key_id(self) -> str:
        return self._active.key_id

    def seal(self, plaintext: str, context: str) -> dict[str, object]:
        nonce = os.urandom(12)
        ciphertext = AESGCM(self._active.key).encrypt(nonce, plaintext.encode(), context.encode())
        return {"v": _FORMAT, "kid": self._active.key_id, "n": nonce, "ct": ciphertext}

    def open(self, sealed: Mapping[str, object], context: str) -> str:
        key = self._by_id.get(str(sealed.get("kid")))
        if key is None:
            raise SecretKeyError(
                f"a stored secret was sealed with key {sealed.get('kid')!r}, which is not "
                "configured; add it to SECRETS_MASTER_KEYS"
            )
        nonce, ciphertext = sealed.get("n"), sealed.get("ct")
        if not isinstance(nonce, bytes) or not isinstance(ciphertext, bytes):
            raise SecretKeyError("a stored secret failed authentication")
        try:
            plaintext = AESGCM(key.key).decrypt(nonce, ciphertext, context.encode())
        except InvalidTag as exc:
            raise SecretKeyError("a stored secret failed authentication") from exc
        return plaintext.decode()

    def needs_rotation(self, sealed: Mapping[str, object]) -> bool:
        return sealed.get("kid") != self._active.key_id

    def reseal(self, sealed: Mapping[str, object], context: str) -> dict[str, object]:
        return self.seal(self.open(sealed, context), context)

    def seal_map(self, values: Mapping[str, str | None], context: str) -> dict[str, object]:
        """Seal each non-empty value of a mapping, under ``context`` plus the field name."""
        return {k: self.seal(v, f"{context}/{k}") for k, v in values.items() if v}

    def open_map(self, sealed: Mapping[str, Mapping[str, object]], context: str) -> dict[str, str]:
        return {k: self.open(v, f"{context}/{k}") for k, v in sealed.items()}
