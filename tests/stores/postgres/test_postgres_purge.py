"""PostgreSQL: the cleanup's purge of expired items and the expired items a held checkpoint
names (schema version 14). Such an item stays while the checkpoint is held; the cleanup, which
meets it once, passes it by from then on without reading it again, and purges it once no
checkpoint names it (when its item stays after the last name went: owned by a checkpoint still
held, nested under a key still named, or a count dropped by a repair)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import asyncpg
import pytest

from fastcheckpoint.stores import postgres as postgres_module
from fastcheckpoint.stores._base import RunRecord
from fastcheckpoint.stores._postgres_sql import Names
from fastcheckpoint.stores.postgres import PostgresStore
from fastcheckpoint.testing import T0, checkpoint_id_of, key_of, make_item, make_run
from fastcheckpoint.testing._adapter import _append_items
from tests.stores._postgres_server import (
    PostgresTarget,
    drop_schema,
    run_row_damage,
    unique_schema,
)
from tests.stores.postgres.test_postgres_specific import _migrate_to

pytestmark = pytest.mark.anyio

_DEADLINE = 20


@pytest.fixture
async def connection(postgres: PostgresTarget) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(postgres.url())
    yield connection
    await connection.close()


async def cleanup_reading(connection: asyncpg.Connection, names: Names, now: float,
                          limit: int) -> tuple[int, int]:
    """A whole cleanup (``<p>purge`` batches until one says it is done) in one transaction:
    ``(batches, rows of <p>items read)``. The reading at its start is subtracted: until the
    server flushes them (about once a second), the connection's earlier transactions count
    in ``pg_stat_xact_user_tables`` too."""
    reading = names.render(
        "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)"
        "  FROM pg_stat_xact_user_tables WHERE relid = '{items}'::regclass")
    async with connection.transaction():
        before = await connection.fetchval(reading)
        batches, done = 0, False
        while not done:
            _, done = await connection.fetchrow(
                names.render("SELECT * FROM {purge}($1, $2)"), now, limit)
            batches += 1
            assert batches < 100, "the cleanup never ends"
        read = await connection.fetchval(reading)
    return batches, int(read) - int(before or 0)


async def _cleanup(store: PostgresStore, now: float) -> None:
    with anyio.fail_after(_DEADLINE):
        while not (await store.purge_expired(now=now, limit=100))[1]:
            pass


async def _items(connection: asyncpg.Connection, names: Names, run_key: str) -> list[str]:
    rows = await connection.fetch(names.render(
        "SELECT key FROM {items} WHERE run_key = $1 ORDER BY key"), run_key)
    return [bytes(row[0]).decode() for row in rows]


async def _with_expiring_item(store: PostgresStore, run: RunRecord, expires_at: float) -> None:
    """The run's first checkpoint, and an item ``k`` that no checkpoint names."""
    await _append_items(store, run, 0)
    await store.put_items(key_of(run), [make_item("k", expires_at=expires_at)], now=T0)


async def _expiring_runs(store: PostgresStore, prefix: str, runs: int, expires_at: float) -> None:
    for n in range(runs):
        await _with_expiring_item(store, make_run(f"{prefix}-{n}"), expires_at)


async def test_a_later_cleanup_reads_none_of_the_expired_items_held_checkpoints_name(
    store: PostgresStore, connection: asyncpg.Connection, schema: str
) -> None:
    """20,000 expired items a held checkpoint names: the first cleanup meets them once; a
    later one, purging the expired items of 100 other runs, reads none of them (before, every
    batch of every cleanup read past all of them, twice: to find what to purge and to tell
    whether it was done)."""
    names = Names(schema, "fc_")
    named, runs = 20_000, 100
    holder = make_run("holder")
    keys = [f"n{n}" for n in range(named)]
    with anyio.fail_after(_DEADLINE * 3):
        await store.put_items(key_of(holder), [make_item(k, expires_at=T0 + 1) for k in keys],
                              now=T0)
        await _append_items(store, holder, 0, refs=keys)
        await _expiring_runs(store, "first", runs, T0 + 5)
        await cleanup_reading(connection, names, T0 + 10, 1000)
        # What autovacuum does after such a pass: the index entries of the rows before their
        # mark go (as those of the rows a cleanup deletes), the planner learns the table.
        await connection.execute(names.render("VACUUM ANALYZE {items}"))
        await _expiring_runs(store, "later", runs, T0 + 15)
        batches, read = await cleanup_reading(connection, names, T0 + 20, 1000)
        held = await _items(connection, names, key_of(holder))
        left = await connection.fetchval(names.render(
            "SELECT count(*) FROM {items} WHERE run_key <> $1"), key_of(holder))
    assert batches == 1
    assert left == 0
    assert len(held) == named
    assert read < 5 * runs


@pytest.mark.parametrize("kept_by", ["owner", "nesting"])
async def test_an_expired_item_named_by_a_held_checkpoint_is_kept_then_purged_once_unnamed(
    store: PostgresStore, connection: asyncpg.Connection, schema: str, kept_by: str
) -> None:
    """An expired item a held checkpoint names stays through every cleanup. When the last
    checkpoint naming it goes and its item stays (owned by a checkpoint still held, or nested
    under a key a held checkpoint names), the next cleanup purges it: the cleanup's passing
    it by ends with its name."""
    names = Names(schema, "fc_")
    run = make_run(f"kept-by-{kept_by}")
    key = key_of(run)
    with anyio.fail_after(_DEADLINE):
        if kept_by == "owner":
            # put_items writes an owned item with an expiry of its own (an append's owned
            # items expire with their owner).
            await _append_items(store, run, 0)
            await store.put_items(key, [make_item("x", owner=0, expires_at=T0 + 5)], now=T0)
            await _append_items(store, run, 1, refs=["x"])
        else:
            await store.put_items(key, [make_item("a"), make_item("a/x", expires_at=T0 + 5)],
                                  now=T0)
            await _append_items(store, run, 0, refs=["a"])
            await _append_items(store, run, 1, refs=["a/x"])
        await _cleanup(store, T0 + 10)
        await _cleanup(store, T0 + 10)
        named = await _items(connection, names, key)
        assert await store.delete(key, 1, checkpoint_id=checkpoint_id_of(run, 1))
        unnamed = await _items(connection, names, key)
        await _cleanup(store, T0 + 10)
        purged = await _items(connection, names, key)
        found = await store.read_with_items(key, sequence=0, now=T0)
    expected = ["x"] if kept_by == "owner" else ["a", "a/x"]
    assert named == expected
    assert unnamed == expected
    assert purged == [key for key in expected if key not in {"x", "a/x"}]
    assert found is not None


async def test_an_expired_item_whose_count_a_repair_drops_is_purged(
    store: PostgresStore, connection: asyncpg.Connection, postgres: PostgresTarget,
    schema: str
) -> None:
    """A count that no checkpoint backs (written by hand) keeps its expired item through the
    cleanup; ``rebuild_run`` counts the references again from the checkpoints and drops it,
    and the next cleanup purges the item."""
    names = Names(schema, "fc_")
    run = make_run("recounted")
    key = key_of(run)
    with anyio.fail_after(_DEADLINE):
        await _append_items(store, run, 0)
        await _append_items(store, run, 1)
        await store.put_items(key, [make_item("z", expires_at=T0 + 5)], now=T0)
        await connection.execute(names.render(
            "INSERT INTO {refs} (run_key, key, holders, removed) VALUES ($1, 'z', 1, false)"),
            key)
        await _cleanup(store, T0 + 10)
        counted = await _items(connection, names, key)
        await run_row_damage(postgres, "older-copy")(store, key)
        await store.rebuild_run(key, run, now=T0)
        await _cleanup(store, T0 + 10)
        recounted = await _items(connection, names, key)
    assert counted == ["z"]
    assert recounted == []


async def test_an_expired_item_a_new_life_of_its_run_releases_is_purged(
    store: PostgresStore, connection: asyncpg.Connection, schema: str
) -> None:
    """A new life of an expired run releases every count of the old one: an item that stays
    (owned, by ``put_items``, by a sequence the run does not hold) is purged by the next
    cleanup, also after a cleanup met it named."""
    names = Names(schema, "fc_")
    run = make_run("new-life")
    key = key_of(run)
    with anyio.fail_after(_DEADLINE):
        await _append_items(store, run, 0, expires_at=T0 + 20)
        await store.put_items(key, [make_item("x", owner=7, expires_at=T0 + 5)], now=T0)
        await _append_items(store, run, 1, refs=["x"], expires_at=T0 + 20)
        await _cleanup(store, T0 + 10)
        named = await _items(connection, names, key)
        await _append_items(store, run, 0, now=T0 + 30)
        released = await _items(connection, names, key)
        await _cleanup(store, T0 + 30)
        purged = await _items(connection, names, key)
    assert named == ["x"]
    assert released == ["x"]
    assert purged == []


async def test_a_version_13_schema_upgraded_purges_the_items_that_expired_before(
    postgres: PostgresTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Items written at schema version 13 (expired, named or not) are in the cleanup's view
    after the upgrade: the unnamed ones go, the named ones stay. A process of the release
    before, its pool opened at version 13, runs its cleanup on the upgraded schema."""
    schema = unique_schema()
    url = f"{postgres.url()}?schema={schema}"
    names = Names(schema, "fc_")
    named, loose = make_run("named"), make_run("loose")
    connection = await asyncpg.connect(postgres.url())
    try:
        await _migrate_to(connection, names, 13)
        with monkeypatch.context() as at_v13:
            at_v13.setattr(postgres_module, "_LATEST", 13)
            old = PostgresStore.from_url(url)
            with anyio.fail_after(_DEADLINE):
                for run in (named, loose):
                    await _with_expiring_item(old, run, T0 + 5)
                await _append_items(old, named, 1, refs=["k"])
        store = PostgresStore.from_url(url)
        try:
            with anyio.fail_after(_DEADLINE):
                await store.provision()
                await _cleanup(old, T0 + 10)
                kept = await _items(connection, names, key_of(named))
                gone = await _items(connection, names, key_of(loose))
                await _expiring_runs(store, "after", 3, T0 + 5)
                await _cleanup(store, T0 + 10)
                left = await connection.fetchval(names.render(
                    "SELECT count(*) FROM {items} WHERE run_key <> $1"), key_of(named))
        finally:
            await store.aclose()
            await old.aclose()
    finally:
        await connection.close()
        await drop_schema(postgres, schema)
    assert kept == ["k"]
    assert gone == []
    assert left == 0
