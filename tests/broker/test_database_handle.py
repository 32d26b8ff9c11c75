"""The database handle never shows its connection string's password: not in its repr, and not
where a failing test prints its arguments (hypothesis prints dataclasses field by field)."""

from __future__ import annotations

from hypothesis.vendor.pretty import pretty

from backup.database import connect


async def test_the_password_is_not_in_any_rendering_of_the_handle() -> None:
    db = connect("mongodb://manager:pw-Hx81qzT@127.0.0.1:9/?directConnection=true", "t_handle")
    try:
        pool = db.pool(2)
        try:
            for handle in (db, pool):
                for text in (repr(handle), str(handle), pretty(handle)):
                    assert "pw-Hx81qzT" not in text
            assert pool.events is db.events  # one application: one set of events
        finally:
            await pool.close()
    finally:
        await db.close()
