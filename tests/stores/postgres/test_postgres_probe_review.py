"""A review of schema version 15 (the recount of a lowered count in ``<p>remove``): items
nested under a key the newest checkpoint names, and what the probe costs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import asyncpg
import msgspec
import pytest

from fastcheckpoint.stores._postgres_sql import Names
from fastcheckpoint.stores.postgres import PostgresStore
from fastcheckpoint.testing import (
    T0,
    checkpoint_id_of,
    key_of,
    make_checkpoint,
    make_item,
    make_run,
)
from tests.stores._postgres_server import PostgresTarget

pytestmark = pytest.mark.anyio


@pytest.fixture
async def sql(
    postgres: PostgresTarget, schema: str,
) -> AsyncIterator[tuple[asyncpg.Connection, Names]]:
    connection = await asyncpg.connect(postgres.url())
    yield connection, Names(schema, "fc_")
    with anyio.fail_after(10):
        await connection.close()


async def _two_checkpoints(store: PostgresStore, run: Any) -> str:
    """Checkpoint 0 (expires at T0 + 10) names P/1 on its own; checkpoint 1 (the newest) names
    P, so it reads P/1 as an item nested under P."""
    key = key_of(run)
    first = msgspec.structs.replace(make_checkpoint(run, 0, expires_at=T0 + 10), refs=("P/1",))
    await store.append_with_items(key, first, run=run, keep_latest=None, now=T0,
                                  items=[make_item("P/1")])
    second = msgspec.structs.replace(make_checkpoint(run, 1, expires_at=T0 + 1000), refs=("P",))
    await store.append_with_items(key, second, run=run, keep_latest=None, now=T0,
                                  items=[make_item("P")])
    return key


@pytest.mark.parametrize("removal", ["delete", "purge"])
@pytest.mark.parametrize("damage", ["deleted", "renamed"])
async def test_an_item_nested_under_a_key_the_newest_checkpoint_names_stays_past_its_count(
    store: PostgresStore, sql: tuple[asyncpg.Connection, Names], removal: str, damage: str,
) -> None:
    """P's count deleted (or renamed) by hand; removing checkpoint 0 takes the count of P/1 to
    zero. The newest checkpoint names P, under which P/1 is read: the zero contradicts it as
    much as a zero of P would. The probe looked at exact keys only, so P/1's item was freed
    and checkpoint 1 read back without it, with no error (no removal recorded)."""
    connection, names = sql
    run = make_run(f"nested {damage} {removal}")
    with anyio.fail_after(30):
        key = await _two_checkpoints(store, run)
        edit = ("DELETE FROM {refs} WHERE run_key = $1 AND key = 'P'" if damage == "deleted"
                else "UPDATE {refs} SET key = 'gone' WHERE run_key = $1 AND key = 'P'")
        await connection.execute(names.render(edit), key)
        if removal == "delete":
            assert await store.delete(key, 0, checkpoint_id=checkpoint_id_of(run, 0))
        else:
            await store.purge_expired(now=T0 + 10, limit=100)
        found = await store.read_with_items(key, sequence=1, now=T0 + 10)
        counts = await connection.fetch(names.render(
            "SELECT key, holders FROM {refs} WHERE run_key = $1 ORDER BY key"), key)
    assert found is not None
    assert found[2] == {"P": b"value-P", "P/1": b"value-P/1"}
    assert [(bytes(k), n) for k, n in counts] == [(b"P", 1)]


async def test_a_count_of_a_nested_key_falling_to_zero_normally_frees_no_more(
    store: PostgresStore, sql: tuple[asyncpg.Connection, Names],
) -> None:
    """The undamaged counterpart: removing checkpoint 0 takes P/1's count to zero, the newest
    checkpoint names P (so P/1 stays, nested under it), and no recount runs (the counts are
    as they were: P's row untouched). Then deleting checkpoint 1 frees P and P/1."""
    connection, names = sql
    run = make_run("nested undamaged")
    with anyio.fail_after(30):
        key = await _two_checkpoints(store, run)
        before = await connection.fetchval(names.render(
            "SELECT xmin::text FROM {refs} WHERE run_key = $1 AND key = 'P'"), key)
        assert await store.delete(key, 0, checkpoint_id=checkpoint_id_of(run, 0))
        after = await connection.fetchval(names.render(
            "SELECT xmin::text FROM {refs} WHERE run_key = $1 AND key = 'P'"), key)
        found = await store.read_with_items(key, sequence=1, now=T0)
        assert await store.delete(key, 1, checkpoint_id=checkpoint_id_of(run, 1))
        left = await connection.fetch(names.render(
            "SELECT key FROM {items} WHERE run_key = $1 ORDER BY key"), key)
    assert found is not None
    assert found[2] == {"P": b"value-P", "P/1": b"value-P/1"}
    assert before == after
    assert left == []


async def test_a_recount_keeps_the_removal_recorded_on_a_count_it_takes_again(
    store: PostgresStore, sql: tuple[asyncpg.Connection, Names],
) -> None:
    """What held: K's item removed by ``delete_items`` (recorded on K's count), the count then
    lowered to 1 by hand while two checkpoints name K; deleting checkpoint 0 takes it to zero,
    the recount takes it again (1) and keeps the record, so checkpoint 1 reads K as absent
    (not as damage), and another key's count taken again starts unrecorded."""
    connection, names = sql
    run = make_run("recount keeps removed")
    key = key_of(run)
    with anyio.fail_after(30):
        first = msgspec.structs.replace(make_checkpoint(run, 0), refs=("K",))
        await store.append_with_items(key, first, run=run, keep_latest=None, now=T0,
                                      items=[make_item("K"), make_item("J")])
        second = msgspec.structs.replace(make_checkpoint(run, 1), refs=("K", "J"))
        await store.append_with_items(key, second, run=run, keep_latest=None, now=T0,
                                      items=[])
        assert await store.delete_items(key, ["K"]) == 1
        await connection.execute(names.render(
            "UPDATE {refs} SET holders = 1 WHERE run_key = $1 AND key = 'K'"), key)
        await connection.execute(names.render(
            "DELETE FROM {refs} WHERE run_key = $1 AND key = 'J'"), key)
        assert await store.delete(key, 0, checkpoint_id=checkpoint_id_of(run, 0))
        found = await store.read_with_items(key, sequence=1, now=T0)
        counts = await connection.fetch(names.render(
            "SELECT key, holders, removed FROM {refs} WHERE run_key = $1 ORDER BY key"), key)
    assert found is not None
    assert found[2] == {"J": b"value-J"}
    assert [(bytes(k), n, r) for k, n, r in counts] == [(b"J", 1, False), (b"K", 1, True)]
