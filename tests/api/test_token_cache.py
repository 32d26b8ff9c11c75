"""A verified bearer token is taken again without checking its signature (broker/api/auth.py
keeps the verdict), but never past the token's expiry."""

from __future__ import annotations

import asyncio
import time

from tests.api.conftest import ApiFactory, add_instance


async def test_a_token_taken_once_is_refused_once_it_expires(make_api: ApiFactory) -> None:
    api = await make_api(JWT_LEEWAY_SECONDS="0")
    inst = await add_instance(api.db)
    api.cc.grant("alice", inst)
    token = api.uaa.token("alice", expires_in=3)
    expires = time.time() + 3
    for _ in range(3):
        assert (await api.call("GET", "/plans", instance=inst, token=token))[0] == 200
    await asyncio.sleep(max(0.0, expires - time.time()) + 1.1)
    status, body = await api.call("GET", "/plans", instance=inst, token=token)
    assert status == 401 and "expired" in body["description"], body
    # a token the issuer never signed is not taken for one it did
    forged = token[: token.rindex(".") + 1] + "A" * 40
    status, body = await api.call("GET", "/plans", instance=inst, token=forged)
    assert status == 401, body
