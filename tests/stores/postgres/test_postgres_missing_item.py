"""PostgreSQL: an item row a checkpoint's refs name, deleted by plain SQL, is damage:
``read_with_items`` raises ``CorruptCheckpointError`` naming it. What the store removes itself
while a checkpoint names the key (an owned item with its owner, ``delete_items``) keeps reading
as absent: the protocol says those reads lack it. The store tells them apart by the removals it
records on the key's ``refs`` row (migration 13), which go with the row."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import asyncpg
import pytest

from fastcheckpoint.errors import CorruptCheckpointError
from fastcheckpoint.stores import postgres as postgres_module
from fastcheckpoint.stores._base import RunRecord
from fastcheckpoint.stores._postgres_sql import MIGRATIONS, Names
from fastcheckpoint.stores.postgres import PostgresStore
from fastcheckpoint.testing import T0, key_of, make_item, make_run
from fastcheckpoint.testing._adapter import _append_items
from tests.stores._named_removals import remove_while_named
from tests.stores._postgres_server import PostgresTarget, drop_schema, unique_schema
from tests.stores.postgres.test_postgres_purge import cleanup_reading
from tests.stores.postgres.test_postgres_specific import _migrate_to

pytestmark = pytest.mark.anyio

_DEADLINE = 20


async def _delete_row(postgres: PostgresTarget, schema: str, key: str) -> None:
    connection = await asyncpg.connect(postgres.url())
    try:
        done = await connection.execute(
            Names(schema, "fc_").render("DELETE FROM {items} WHERE key = $1"), key.encode())
    finally:
        await connection.close()
    assert done == "DELETE 1"


async def _counts(postgres: PostgresTarget, schema: str) -> list[tuple[str, int, bool | None]]:
    """Every reference count: ``(key, holders, removed)``."""
    connection = await asyncpg.connect(postgres.url())
    try:
        rows = await connection.fetch(Names(schema, "fc_").render(
            "SELECT key, holders, removed FROM {refs} ORDER BY key"))
    finally:
        await connection.close()
    return [(bytes(row[0]).decode(), row[1], row[2]) for row in rows]


class _ReadWithoutItem(Exception):
    """The checkpoint came back without an item its refs name."""


async def _read_whole(store: PostgresStore, run: RunRecord) -> None:
    found = await store.read_with_items(key_of(run), sequence=0, now=T0)
    raise _ReadWithoutItem(f"read without the item: {found and found[2]}")


async def test_a_read_naming_an_item_row_deleted_by_hand_raises(
    store: PostgresStore, postgres: PostgresTarget, schema: str
) -> None:
    run = make_run("row-deleted")
    with anyio.fail_after(_DEADLINE):
        await _append_items(store, run, 0, refs=["b/a", "b/b"],
                            items=[make_item("b/a"), make_item("b/b")])
        await _delete_row(postgres, schema, "b/a")
        with pytest.raises(CorruptCheckpointError, match="b/a"):
            await _read_whole(store, run)


async def test_named_items_the_store_removed_read_as_absent(store: PostgresStore) -> None:
    run = make_run("removed-while-named")
    key = key_of(run)
    with anyio.fail_after(_DEADLINE):
        await remove_while_named(store, run, removed=["b/a"])
        found = await store.read_with_items(key, sequence=1, now=T0)
    assert found is not None
    assert found[2] == {"b/b": b"value-b/b"}


async def test_removal_records_go_with_the_last_checkpoint_naming_the_key(
    store: PostgresStore, postgres: PostgresTarget, schema: str
) -> None:
    """A removal is recorded while a checkpoint names the key and goes with its count (the
    pruning of the last checkpoint naming it): a value written at the key later, named by a
    new checkpoint and deleted by hand, is damage again; ``delete_run`` takes every record of
    the run."""
    run = make_run("records-go")
    key = key_of(run)
    with anyio.fail_after(_DEADLINE):
        await remove_while_named(store, run, removed=["b/a", "b/a", "never"])
        recorded = await _counts(postgres, schema)
        await _append_items(store, run, 2, refs=["b/b"], keep_latest=1)
        pruned = await _counts(postgres, schema)
        await _append_items(store, run, 3, refs=["b/b", "b/a"], items=[make_item("b/a")])
        await _delete_row(postgres, schema, "b/a")
        with pytest.raises(CorruptCheckpointError, match="b/a"):
            await store.read_with_items(key, sequence=3, now=T0)
        assert await store.delete_run(key) == 2
        left = await _counts(postgres, schema)
    assert recorded == [("b/a", 1, True), ("b/b", 1, False), ("o", 1, True)]
    assert pruned == [("b/b", 1, False)]
    assert left == []


async def test_a_version_12_schema_keeps_reading_what_the_store_removed(
    postgres: PostgresTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An owned item removed with its owner and an item removed by ``delete_items`` at schema
    version 12, while a checkpoint named them, left no record: upgraded by ``provision`` (what
    ``fastcheckpoint init`` runs), the schema reads them as absent, as before. The counts of
    version 12 record nothing either way (a process of the release before may still remove
    their items unrecorded), so an item row deleted by hand under one of them reads as absent
    too; one under a count written after the upgrade is damage."""
    schema = unique_schema()
    url = f"{postgres.url()}?schema={schema}"
    run = make_run("from-v12")
    key = key_of(run)
    connection = await asyncpg.connect(postgres.url())
    try:
        await _migrate_to(connection, Names(schema, "fc_"), 12)
    finally:
        await connection.close()
    try:
        with monkeypatch.context() as at_v12:
            at_v12.setattr(postgres_module, "_LATEST", 12)
            old = PostgresStore.from_url(url)
            try:
                with anyio.fail_after(_DEADLINE):
                    await remove_while_named(old, run, removed=["b/a"])
            finally:
                await old.aclose()
        store = PostgresStore.from_url(url)
        try:
            with anyio.fail_after(_DEADLINE):
                lines = await store.provision()
                found = await store.read_with_items(key, sequence=1, now=T0)
                await _delete_row(postgres, schema, "b/b")
                unknown = await store.read_with_items(key, sequence=1, now=T0)
                await _append_items(store, run, 2, refs=["n"], items=[make_item("n")])
                await _delete_row(postgres, schema, "n")
                with pytest.raises(CorruptCheckpointError, match="'n'"):
                    await store.read_with_items(key, sequence=None, now=T0)
                counts = await _counts(postgres, schema)
        finally:
            await store.aclose()
    finally:
        await drop_schema(postgres, schema)
    assert lines[0] == f"applied migration 13: {MIGRATIONS[12].description}"
    assert found is not None
    assert found[2] == {"b/b": b"value-b/b"}
    assert unknown is not None
    assert unknown[2] == {}
    assert counts == [("b/a", 1, None), ("b/b", 1, None), ("n", 1, False), ("o", 1, None)]


async def _waiting(watcher: asyncpg.Connection, count: int) -> None:
    """Until ``count`` sessions of the test database wait for a lock."""
    query = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
             "AND wait_event_type = 'Lock'")
    while await watcher.fetchval(query) < count:  # noqa: ASYNC110 (the server's locks)
        await anyio.sleep(0.01)


async def _while_appending(
    postgres: PostgresTarget, block: Callable[[asyncpg.Connection], Awaitable[None]],
    append: Callable[[], Awaitable[object]], meanwhile: Callable[[], Awaitable[object]],
) -> None:
    """``append`` stopped by the lock ``block`` takes, after it checked its refs; ``meanwhile``
    run (``delete_items`` of what it names, say) until it ends or waits for a lock; then the
    lock given up and both let finish."""
    blocker, watcher = [await asyncpg.connect(postgres.url()) for _ in range(2)]
    try:
        transaction = blocker.transaction()
        await transaction.start()
        await block(blocker)
        async with anyio.create_task_group() as group:
            group.start_soon(append)
            await _waiting(watcher, 1)
            group.start_soon(meanwhile)
            with anyio.move_on_after(1):
                await _waiting(watcher, 2)  # it waits for the append (or ran to its end)
            await transaction.rollback()
    finally:
        await blocker.close()
        await watcher.close()


async def test_an_append_naming_what_a_concurrent_delete_items_removes_reads_it_as_absent(
    store: PostgresStore, postgres: PostgresTarget, schema: str
) -> None:
    """The append holds the run row from its refs check to its commit (held up here by a lock
    on the checkpoint its pruning removes): ``delete_items`` waits for it and records its
    removal on the count the append wrote, so the read lacks the item instead of reporting it
    deleted behind the store's back."""
    run = make_run("delete-while-appending")
    key = key_of(run)
    names = Names(schema, "fc_")

    async def block(blocker: asyncpg.Connection) -> None:
        await blocker.execute(names.render(
            "SELECT 1 FROM {checkpoints} WHERE run_key = $1 AND sequence = 0 FOR UPDATE"), key)

    with anyio.fail_after(_DEADLINE):
        await _append_items(store, run, 0)
        await store.put_items(key, [make_item("k")], now=T0)
        await _while_appending(postgres, block, lambda: _append_items(
            store, run, 1, refs=["k"], keep_latest=1), lambda: store.delete_items(key, ["k"]))
        found = await store.read_with_items(key, sequence=1, now=T0)
        counts = await _counts(postgres, schema)
    assert found is not None
    assert found[2] == {}
    assert counts == [("k", 1, True)]


async def test_a_first_append_naming_what_a_concurrent_delete_items_removes_reads_it_as_absent(
    store: PostgresStore, postgres: PostgresTarget, schema: str
) -> None:
    """The same for a run's first append, before its run row exists for ``delete_items`` to
    lock (held up here by another transaction's insert of an item it writes): ``delete_items``
    waits on the lock of the run key the first append takes."""
    run = make_run("delete-while-starting")
    key = key_of(run)
    with anyio.fail_after(_DEADLINE):
        await store.put_items(key, [make_item("k")], now=T0)
        await _while_appending(
            postgres, _inserting_x(Names(schema, "fc_"), key),
            lambda: _append_items(store, run, 0, refs=["k", "x"], items=[make_item("x")]),
            lambda: store.delete_items(key, ["k"]))
        found = await store.read_with_items(key, sequence=0, now=T0)
        counts = await _counts(postgres, schema)
    assert found is not None
    assert found[2] == {"x": b"value-x"}
    assert counts == [("k", 1, True), ("x", 1, False)]


def _inserting_x(names: Names, key: str) -> Callable[[asyncpg.Connection], Awaitable[None]]:
    """A lock an append writing the item ``x`` of run key ``key`` waits for after its refs
    check: another transaction's insert of ``x``."""

    async def block(blocker: asyncpg.Connection) -> None:
        await blocker.execute(names.render(
            "INSERT INTO {items} (run_key, key, value) VALUES ($1, $2, $3)"), key, b"x", b"v")

    return block

async def test_rebuild_run_keeps_the_removals_recorded(
    store: PostgresStore, postgres: PostgresTarget, schema: str
) -> None:
    """``rebuild_run`` counts the references again from the checkpoints: the removals recorded
    stay (the items read as absent after the repair, not as damage), and a key counted anew
    whose item is in place records none."""
    run = make_run("rebuilt")
    key = key_of(run)
    names = Names(schema, "fc_")
    connection = await asyncpg.connect(postgres.url())
    try:
        with anyio.fail_after(_DEADLINE):
            await remove_while_named(store, run, removed=["b/a"])
            await connection.execute(names.render(
                "DELETE FROM {refs} WHERE run_key = $1 AND key = 'b/b'::bytea"), key)
            await connection.execute(names.render(
                "UPDATE {runs} SET checkpoint_count = 5 WHERE run_key = $1"), key)
            await store.rebuild_run(key, run, now=T0)
            found = await store.read_with_items(key, sequence=1, now=T0)
            counts = await _counts(postgres, schema)
    finally:
        await connection.close()
    assert found is not None
    assert found[2] == {"b/b": b"value-b/b"}
    assert counts == [("b/a", 1, True), ("b/b", 1, False), ("o", 1, True)]


async def test_the_cleanup_purging_an_expired_item_a_running_append_names_is_no_damage(
    store: PostgresStore, postgres: PostgresTarget, schema: str
) -> None:
    """An append names an item written with an expiry, live at the append's time; the cleanup
    loop, its clock later, purges expired items no count names while the append is between
    its refs check and its commit (its count not yet visible). The item must not be taken
    from under the append without a record: the checkpoint reads (with the item, live at its
    time), never as damage."""
    run = make_run("purged-while-appending")
    key = key_of(run)
    with anyio.fail_after(_DEADLINE):
        await _append_items(store, run, 0)
        await store.put_items(key, [make_item("k", expires_at=T0 + 5)], now=T0)
        await _while_appending(
            postgres, _inserting_x(Names(schema, "fc_"), key),
            lambda: _append_items(store, run, 1, refs=["k", "x"], items=[make_item("x")]),
            lambda: store.purge_expired(now=T0 + 10, limit=100))
        found = await store.read_with_items(key, sequence=1, now=T0)
    assert found is not None
    assert found[2] == {"k": b"value-k", "x": b"value-x"}



async def test_the_cleanup_leaves_the_expired_items_of_a_busy_run_for_its_next_pass(
    store: PostgresStore, postgres: PostgresTarget, schema: str
) -> None:
    """The cleanup purges expired items only in runs whose lock it takes without waiting: a
    run held by a write in flight keeps them until the next cleanup, and the cleanup ends
    (never waits for that write, nor calls again and again while it lasts); the other runs'
    go."""
    busy, idle = make_run("busy"), make_run("idle")
    names = Names(schema, "fc_")
    expired = [make_item("k", expires_at=T0 + 5)]
    blocker = await asyncpg.connect(postgres.url())
    try:
        with anyio.fail_after(_DEADLINE):
            for run in (busy, idle):
                await _append_items(store, run, 0)
                await store.put_items(key_of(run), expired, now=T0)
            transaction = blocker.transaction()
            await transaction.start()
            await blocker.execute(names.render(
                "SELECT 1 FROM {runs} WHERE run_key = $1 FOR NO KEY UPDATE"), key_of(busy))
            first = await store.purge_expired(now=T0 + 10, limit=100)
            held = await blocker.fetchval(names.render(
                "SELECT count(*) FROM {items} WHERE run_key = $1"), key_of(busy))
            await transaction.rollback()
            second = await store.purge_expired(now=T0 + 10, limit=100)
            left = await blocker.fetchval(names.render("SELECT count(*) FROM {items}"))
    finally:
        await blocker.close()
    assert first == (0, True)
    assert held == 1
    assert second == (0, True)
    assert left == 0

async def test_delete_run_of_a_run_without_a_row_during_its_first_append_is_no_damage(
    store: PostgresStore, postgres: PostgresTarget, schema: str
) -> None:
    """``delete_run`` of a run that has items but no row yet, while the run's first append
    (naming one of them) is between its refs check and its commit: the removal must be ordered
    with the append (it removes the new life whole, or the append finds the item gone), never
    leave the append's checkpoint naming an item removed without a record."""
    run = make_run("deleted-while-starting")
    key = key_of(run)
    with anyio.fail_after(_DEADLINE):
        await store.put_items(key, [make_item("k")], now=T0)
        await _while_appending(
            postgres, _inserting_x(Names(schema, "fc_"), key),
            lambda: _append_items(store, run, 0, refs=["k", "x"], items=[make_item("x")]),
            lambda: store.delete_run(key))
        found = await store.read_with_items(key, sequence=0, now=T0)
        left = await store.get_items(key, ["k", "x"], now=T0)
    assert found is None  # the run's first life went whole with delete_run
    assert left == {}


async def test_removals_by_the_release_before_during_the_upgrade_are_no_damage(
    postgres: PostgresTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Processes of the release before run on beside ``init`` (their functions are replaced in
    place). A ``delete_items`` of theirs whose transaction was open while migration 13 ran
    (its removal not yet visible to it), and one entered before the migration committed that
    removes after it (running the function as it was when called): neither recorded its
    removal, and the checkpoint naming the items must read them as absent, not as damage."""
    schema = unique_schema()
    url = f"{postgres.url()}?schema={schema}"
    names = Names(schema, "fc_")
    run = make_run("removed-while-upgrading")
    key = key_of(run)
    connection, open_call, entered, watcher = [
        await asyncpg.connect(postgres.url()) for _ in range(4)]
    delete_items = names.render("SELECT {delete_items}($1, $2::bytea[], $3)")
    try:
        await _migrate_to(connection, names, 12)
        with monkeypatch.context() as at_v12:
            at_v12.setattr(postgres_module, "_LATEST", 12)
            old = PostgresStore.from_url(url)
            try:
                with anyio.fail_after(_DEADLINE):
                    await _append_items(old, run, 0, refs=["a", "b", "c"],
                                        items=[make_item(k) for k in "abc"])
            finally:
                await old.aclose()
        store = PostgresStore.from_url(url)
        try:
            with anyio.fail_after(_DEADLINE):
                # Removed by a transaction still open while the migration runs.
                transaction = open_call.transaction()
                await transaction.start()
                await open_call.execute(delete_items, key, [b"a"], "open-call")
                # Entered before the migration commits, held up by its token's lock.
                await connection.execute("SELECT pg_advisory_lock(26211, hashtext('late'))")
                async with anyio.create_task_group() as group:
                    group.start_soon(entered.execute, delete_items, key, [b"b"], "late")
                    await _waiting(watcher, 1)
                    upgraded = anyio.Event()

                    async def upgrade() -> None:
                        await store.provision()
                        upgraded.set()

                    group.start_soon(upgrade)
                    with anyio.move_on_after(1):
                        await upgraded.wait()
                    await transaction.commit()
                    await upgraded.wait()
                    await connection.execute(
                        "SELECT pg_advisory_unlock(26211, hashtext('late'))")
                found = await store.read_with_items(key, sequence=0, now=T0)
        finally:
            await store.aclose()
    finally:
        for each in (connection, open_call, entered, watcher):
            await each.close()
        await drop_schema(postgres, schema)
    assert found is not None
    assert found[2] == {"c": b"value-c"}


async def test_the_cleanup_purges_the_expired_items_of_more_runs_without_rows_than_locks_fit(
    store: PostgresStore, postgres: PostgresTarget, schema: str
) -> None:
    """Expired items of runs without a row (items put, no append ever), more runs than the
    server's lock table holds: the cleanup takes each such run's lock (held to its commit)
    without ever running out of lock memory, and removes them all."""
    names = Names(schema, "fc_")
    connection = await asyncpg.connect(postgres.url())
    try:
        with anyio.fail_after(_DEADLINE * 6):
            await store.put_items("seed", [make_item("k")], now=T0)  # the schema is in place
            slots = await connection.fetchval(
                "SELECT current_setting('max_locks_per_transaction')::int"
                " * (current_setting('max_connections')::int"
                "    + current_setting('max_prepared_transactions')::int)")
            runs = 2 * slots
            await connection.execute(names.render(
                "INSERT INTO {items} (run_key, key, value, expires_at)"
                " SELECT 'run-' || g, 'k'::bytea, 'v'::bytea, $1"
                "   FROM generate_series(1, $2) g"), T0 + 5, runs)
            result = await store.purge_expired(now=T0 + 10, limit=runs + 10)
            while not result[1]:
                result = await store.purge_expired(now=T0 + 10, limit=runs + 10)
            left = await connection.fetchval(names.render(
                "SELECT count(*) FROM {items} WHERE run_key LIKE 'run-%'"))
    finally:
        await connection.close()
    assert left == 0


async def test_the_cleanup_reads_the_expired_items_a_count_names_once_a_batch(
    store: PostgresStore, postgres: PostgresTarget, schema: str
) -> None:
    """Expired items that held checkpoints name stay; the cleanup that purges the expired
    items of many runs beside them reads them about once, not once per run it purges (a
    table's worth of rows read per run). Marking them counts against a batch's budget: this
    cleanup takes three batches of 1,000."""
    names = Names(schema, "fc_")
    named, runs = 2000, 100
    holder = make_run("holder")
    connection = await asyncpg.connect(postgres.url())
    try:
        with anyio.fail_after(_DEADLINE * 3):
            await _append_items(store, holder, 0)
            await connection.execute(names.render(
                "INSERT INTO {items} (run_key, key, value, expires_at)"
                " SELECT $1, ('n' || g)::bytea, 'v'::bytea, $2 FROM generate_series(1, $3) g"),
                key_of(holder), T0 + 1, named)
            await connection.execute(names.render(
                "INSERT INTO {refs} (run_key, key, holders, removed)"
                " SELECT $1, ('n' || g)::bytea, 1, false FROM generate_series(1, $2) g"),
                key_of(holder), named)
            for n in range(runs):
                run = make_run(f"purged-{n}")
                await _append_items(store, run, 0)
                await store.put_items(key_of(run), [make_item("k", expires_at=T0 + 5)], now=T0)
            batches, read = await cleanup_reading(connection, names, T0 + 10, 1000)
            left = await connection.fetchval(names.render(
                "SELECT count(*) FROM {items} WHERE run_key <> $1"), key_of(holder))
            held = await connection.fetchval(names.render(
                "SELECT count(*) FROM {items} WHERE run_key = $1"), key_of(holder))
    finally:
        await connection.close()
    assert batches == 3
    assert left == 0
    assert held == named
    assert read < 10 * (named + runs)


async def test_an_item_written_again_while_the_cleanup_removes_it_keeps_its_new_value(
    store: PostgresStore, postgres: PostgresTarget, schema: str
) -> None:
    """``put_items`` writes an expired item again (a new value, a later expiry) while the
    cleanup is about to remove it (the cleanup waits for the write's row lock): the
    acknowledged write must stay, the cleanup judging the row it finds after the wait."""
    run = make_run("written-again")
    key = key_of(run)
    names = Names(schema, "fc_")
    writer, watcher = [await asyncpg.connect(postgres.url()) for _ in range(2)]
    try:
        with anyio.fail_after(_DEADLINE):
            await _append_items(store, run, 0)
            await store.put_items(key, [make_item("k", expires_at=T0 + 5)], now=T0)
            transaction = writer.transaction()
            await transaction.start()
            await writer.execute(names.render(
                "SELECT {put_items}($1, ARRAY['k'::bytea], ARRAY['new'::bytea],"
                " ARRAY[NULL::bigint], ARRAY[$2::double precision], false, $3, 'written-again')"),
                key, T0 + 100, T0 + 10)
            async with anyio.create_task_group() as group:
                group.start_soon(lambda: store.purge_expired(now=T0 + 10, limit=100))
                await _waiting(watcher, 1)
                await transaction.commit()
            found = await store.get_items(key, ["k"], now=T0 + 10)
    finally:
        await writer.close()
        await watcher.close()
    assert found == {"k": b"new"}
