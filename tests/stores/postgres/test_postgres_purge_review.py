"""Review of schema version 14 (the cleanup's ``kept`` mark on expired items a count names):
whatever rewrites, names again or releases a marked item, and a count removed while a cleanup
that marked its item is still open, leaves the item purged once no checkpoint names it and
kept while one does."""

from __future__ import annotations

import anyio
import asyncpg
import pytest

from fastcheckpoint.stores._base import RunRecord
from fastcheckpoint.stores._postgres_sql import Names
from fastcheckpoint.stores.postgres import PostgresStore
from fastcheckpoint.testing import T0, checkpoint_id_of, key_of, make_item, make_run
from fastcheckpoint.testing._adapter import _append_items
from tests.stores.postgres import test_postgres_purge as purge_tests
from tests.stores.postgres.test_postgres_purge import _cleanup, cleanup_reading

pytestmark = pytest.mark.anyio

_DEADLINE = 20

connection = purge_tests.connection  # the fixture: a connection of the test's own


async def _marks(connection: asyncpg.Connection, names: Names,
                 run_key: str) -> dict[str, bool | None]:
    rows = await connection.fetch(names.render(
        "SELECT key, kept FROM {items} WHERE run_key = $1 ORDER BY key"), run_key)
    return {bytes(row[0]).decode(): row[1] for row in rows}


async def _owned_and_named(store: PostgresStore, run: RunRecord) -> None:
    """Checkpoint 0 owns ``x`` (expiring at T0 + 5 by put_items), checkpoint 1 names it."""
    await _append_items(store, run, 0)
    await store.put_items(key_of(run), [make_item("x", owner=0, expires_at=T0 + 5)], now=T0)
    await _append_items(store, run, 1, refs=["x"])


async def test_an_owned_marked_item_rewritten_with_a_later_expiry_is_purged_once_unnamed(
    store: PostgresStore, connection: asyncpg.Connection, schema: str
) -> None:
    """``put_items`` over a marked item keeps the mark (the count still names the key); when
    the count goes the mark goes, and the item is purged once its new expiry passes."""
    names = Names(schema, "fc_")
    run = make_run("rewritten")
    key = key_of(run)
    with anyio.fail_after(_DEADLINE):
        await _owned_and_named(store, run)
        await _cleanup(store, T0 + 10)
        marked = await _marks(connection, names, key)
        await store.put_items(key, [make_item("x", b"new", owner=0, expires_at=T0 + 50)],
                              now=T0 + 10)
        rewritten = await _marks(connection, names, key)
        assert await store.delete(key, 1, checkpoint_id=checkpoint_id_of(run, 1))
        released = await _marks(connection, names, key)
        await _cleanup(store, T0 + 20)
        live = await _marks(connection, names, key)
        await _cleanup(store, T0 + 60)
        purged = await _marks(connection, names, key)
    assert marked == {"x": True}
    assert rewritten == {"x": True}
    assert released == {"x": None}
    assert live == {"x": None}
    assert purged == {}


async def test_a_marked_item_named_again_stays_until_the_last_name_goes(
    store: PostgresStore, connection: asyncpg.Connection, schema: str
) -> None:
    """A marked item (owned, so it stays when no checkpoint names it) written again and named
    by a second checkpoint stays while either checkpoint is held, through cleanups, and is
    purged after the last goes."""
    names = Names(schema, "fc_")
    run = make_run("named-again")
    key = key_of(run)
    with anyio.fail_after(_DEADLINE):
        await _owned_and_named(store, run)
        await _cleanup(store, T0 + 10)
        await store.put_items(key, [make_item("x", b"again", owner=0, expires_at=T0 + 15)],
                              now=T0 + 10)
        await _append_items(store, run, 2, refs=["x"], now=T0 + 10)
        assert await store.delete(key, 1, checkpoint_id=checkpoint_id_of(run, 1))
        await _cleanup(store, T0 + 20)
        held = await _marks(connection, names, key)
        assert await store.delete(key, 2, checkpoint_id=checkpoint_id_of(run, 2))
        await _cleanup(store, T0 + 20)
        purged = await _marks(connection, names, key)
    assert held == {"x": True}
    assert purged == {}


async def test_a_count_removed_while_a_cleanup_that_marked_its_item_is_open(
    store: PostgresStore, connection: asyncpg.Connection, schema: str
) -> None:
    """A cleanup marks an item (its transaction still open, holding the run row shared); a
    delete of the last checkpoint naming the key waits for it, then clears the mark: the next
    cleanup purges the item."""
    names = Names(schema, "fc_")
    run = make_run("concurrent")
    key = key_of(run)
    with anyio.fail_after(_DEADLINE):
        await _owned_and_named(store, run)
        deleted: list[bool] = []

        async def delete() -> None:
            deleted.append(await store.delete(key, 1, checkpoint_id=checkpoint_id_of(run, 1)))

        transaction = connection.transaction()
        await transaction.start()
        await connection.fetchrow(names.render("SELECT * FROM {purge}($1, 100)"), T0 + 10)
        async with anyio.create_task_group() as group:
            group.start_soon(delete)
            await anyio.sleep(0.5)
            waited = not deleted
            await transaction.commit()
        released = await _marks(connection, names, key)
        await _cleanup(store, T0 + 10)
        purged = await _marks(connection, names, key)
    assert waited
    assert deleted == [True]
    assert released == {"x": None}
    assert purged == {}


@pytest.mark.parametrize("released_by", ["pruning", "expiry"])
async def test_a_marked_nested_item_released_by_pruning_or_expiry_is_purged(
    store: PostgresStore, connection: asyncpg.Connection, schema: str, released_by: str
) -> None:
    """The last checkpoint naming ``a/x`` goes by ``keep_latest`` pruning, or by its own
    expiry in a cleanup; ``a/x`` stays (nested under ``a``, still named), unmarked, and the
    cleanup purges it as it did before the marks."""
    names = Names(schema, "fc_")
    run = make_run(f"released-by-{released_by}")
    key = key_of(run)
    with anyio.fail_after(_DEADLINE):
        await store.put_items(key, [make_item("a"), make_item("a/x", expires_at=T0 + 5)],
                              now=T0)
        await _append_items(store, run, 0, refs=["a/x"],
                            expires_at=T0 + 20 if released_by == "expiry" else None)
        await _append_items(store, run, 1, refs=["a"])
        await _cleanup(store, T0 + 10)
        marked = await _marks(connection, names, key)
        if released_by == "pruning":
            await _append_items(store, run, 2, refs=["a"], now=T0 + 10, keep_latest=2)
            released = await _marks(connection, names, key)
            await _cleanup(store, T0 + 30)
        else:
            released = marked
            await _cleanup(store, T0 + 30)
        purged = await _marks(connection, names, key)
    assert marked == {"a": None, "a/x": True}
    if released_by == "pruning":
        assert released == {"a": None, "a/x": None}
    assert purged == {"a": None}


async def test_the_cleanup_reading_counts_only_the_cleanup(
    store: PostgresStore, connection: asyncpg.Connection, schema: str
) -> None:
    """A cleanup with nothing to do, measured right after another transaction of the same
    connection read every item row, reads next to none of them (the measurement counts only
    the cleanup's own transaction)."""
    names = Names(schema, "fc_")
    run = make_run("counted")
    with anyio.fail_after(_DEADLINE):
        await store.put_items(key_of(run), [make_item(f"k{n}") for n in range(2000)], now=T0)
        async with connection.transaction():
            await connection.fetchval(names.render("SELECT count(*) FROM {items}"))
        _, read = await cleanup_reading(connection, names, T0, 1000)
    assert read < 100
