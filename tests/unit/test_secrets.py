"""Secrets at rest: AES-GCM sealing bound to its context, key rotation, clear key errors."""

from __future__ import annotations

import pytest

from backup.secrets import (
    SecretBox,
    SecretKeyError,
    generate_master_key_spec,
    parse_master_keys,
)


def test_seal_open_round_trip_and_ciphertext_hides_plaintext() -> None:
    box = SecretBox(parse_master_keys(generate_master_key_spec("a")))
    sealed = box.seal("s3cr3t-value", "instances/i1/agent_password")
    assert b"s3cr3t-value" not in sealed["ct"]  # type: ignore[operator]
    assert sealed["kid"] == "a"
    assert box.open(sealed, "instances/i1/agent_password") == "s3cr3t-value"


def test_sealed_value_does_not_open_in_another_context() -> None:
    box = SecretBox(parse_master_keys(generate_master_key_spec()))
    sealed = box.seal("pw", "instances/i1/agent_password")
    with pytest.raises(SecretKeyError, match="failed authentication"):
        box.open(sealed, "instances/i2/agent_password")


def test_rotation_old_key_still_opens_and_reseal_moves_to_active() -> None:
    old_spec = generate_master_key_spec("old")
    old = SecretBox(parse_master_keys(old_spec))
    sealed = old.seal("pw", "ctx")
    rotated = SecretBox(parse_master_keys(f"{generate_master_key_spec('new')},{old_spec}"))
    assert rotated.needs_rotation(sealed)
    assert rotated.open(sealed, "ctx") == "pw"
    resealed = rotated.reseal(sealed, "ctx")
    assert resealed["kid"] == "new" and not rotated.needs_rotation(resealed)
    with pytest.raises(SecretKeyError, match="not configured"):
        old.open(resealed, "ctx")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "at least one"),
        ("nokey", "must look like"),
        ("k1:!!!", "32 bytes|base64"),
        ("k1:AAAA", "32 bytes"),
        (f"{generate_master_key_spec('k')},{generate_master_key_spec('k')}", "twice"),
    ],
)
def test_bad_master_keys_are_refused_with_a_reason(spec: str, message: str) -> None:
    with pytest.raises(SecretKeyError, match=message):
        parse_master_keys(spec)


def test_repr_never_shows_key_material() -> None:
    keys = parse_master_keys(generate_master_key_spec("k"))
    assert "k" in repr(keys[0]) and str(keys[0].key) not in repr(keys[0])
    assert "key=" not in repr(SecretBox(keys)).replace("keys=", "")
