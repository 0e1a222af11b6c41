"""PostgresStore: a create sent again after a lost reply whose checkpoint went meanwhile, a
run row whose count is too high, and NULL elements in the byte arrays of a row.

Lost replies are injected at the driver: the append's statement runs (and commits) on the
server, then the store's ``pool.fetch`` raises the error asyncpg raises for a connection that
closed in the middle of the call, after another process acted; the store retries with the
same write token, as it does after a real lost reply.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import asyncpg
import asyncpg.exceptions as pg_errors
import pytest

from fastcheckpoint import CheckpointConfig, CheckpointManager, RetryPolicy
from fastcheckpoint.errors import CorruptCheckpointError
from fastcheckpoint.stores._postgres_sql import Names
from fastcheckpoint.stores.postgres import PostgresStore
from fastcheckpoint.testing import T0, key_of, make_checkpoint, make_run
from tests.stores._postgres_server import (
    PostgresTarget,
    append_checkpoint,
)

FAST_RETRY = RetryPolicy(base_delay=0.001, max_delay=0.01, max_retries=5)

pytestmark = pytest.mark.anyio


@pytest.fixture
async def stores(
    postgres: PostgresTarget, schema: str
) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two processes' stores on one schema."""
    url = f"{postgres.url()}?schema={schema}"
    first = PostgresStore.from_url(url, retry=FAST_RETRY)
    second = PostgresStore.from_url(url, retry=FAST_RETRY)
    yield first, second
    with anyio.fail_after(30):
        await first.aclose()
        await second.aclose()


def _lose_reply(
    monkeypatch: pytest.MonkeyPatch,
    store: PostgresStore,
    sequence: int,
    meanwhile: Callable[[], Awaitable[object]],
) -> list[int]:
    """The reply of ``store``'s next append at ``sequence`` is lost after the server committed
    it, and ``meanwhile()`` runs before the store sends it again. Returns the list where each
    append at ``sequence`` sent is counted."""
    fetch = asyncpg.Pool.fetch
    sent: list[int] = []

    async def lossy(pool: asyncpg.Pool, sql: str, *args: Any, **kwargs: Any) -> Any:
        rows = await fetch(pool, sql, *args, **kwargs)
        if sql == store._sql.append and args[1] == sequence:
            sent.append(sequence)
            if len(sent) == 1:
                await meanwhile()
                raise pg_errors.ConnectionDoesNotExistError(
                    "connection was closed in the middle of operation"
                )
        return rows

    monkeypatch.setattr(asyncpg.Pool, "fetch", lossy)
    return sent


async def _sql(postgres: PostgresTarget, statement: str, *args: Any) -> Any:
    connection = await asyncpg.connect(postgres.url())
    try:
        return await connection.fetch(statement, *args)
    finally:
        await connection.close()


# -- a create sent again after its checkpoint went ------------------------------------------


async def test_a_create_whose_reply_was_lost_and_whose_checkpoint_was_deleted_is_not_rewritten(
    stores: tuple[PostgresStore, PostgresStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process lists the committed checkpoint and deletes it before the retry: the
    create is acknowledged at its sequence, once; the deleted checkpoint does not come back
    at the next sequence."""
    first, second = stores
    config = CheckpointConfig(history_min_entries=None)
    writer = CheckpointManager(first, config=config)
    other = CheckpointManager(second, config=config)
    deleted: list[bool] = []

    async def delete_it() -> None:
        listed = await other.list_checkpoints("r")
        deleted.append(await other.delete(listed[0].checkpoint_id))

    with anyio.fail_after(30):
        await writer.create("r", {"step": 0})
        sent = _lose_reply(monkeypatch, first, 1, delete_it)
        created = await writer.create("r", {"step": 1})
        monkeypatch.undo()
        held = [(c.sequence, c.checkpoint_id) for c in await other.list_checkpoints("r")]
    assert deleted == [True]
    assert sent == [1, 1]  # sent again once, recognised
    assert created.metadata.sequence == 1
    assert held == [(0, created.metadata.checkpoint_id.rsplit("-", 1)[0] + "-0")]


async def test_a_stale_create_sent_again_never_prunes_a_newer_checkpoint(
    stores: tuple[PostgresStore, PostgresStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """max_checkpoints_per_run=1: another process's create (sequence 2) prunes the committed
    sequence 1 before its retry. The retry is acknowledged at 1; it is not written again at 3
    (which pruned the newer checkpoint, and restore returned the stale state)."""
    first, second = stores
    config = CheckpointConfig(history_min_entries=None, max_checkpoints_per_run=1)
    writer = CheckpointManager(first, config=config)
    other = CheckpointManager(second, config=config)

    async def newer() -> None:
        created = await other.create("r", {"by": "B", "step": 2})
        assert created.metadata.sequence == 2

    with anyio.fail_after(30):
        await writer.create("r", {"by": "A", "step": 0})
        _lose_reply(monkeypatch, first, 1, newer)
        created = await writer.create("r", {"by": "A", "step": 1})
        monkeypatch.undo()
        held = [c.sequence for c in await other.list_checkpoints("r")]
        latest = await other.restore("r")
    assert created.metadata.sequence == 1
    assert held == [2]
    assert latest is not None
    assert latest.state == {"by": "B", "step": 2}


async def test_a_first_create_sent_again_after_its_run_was_deleted_does_not_start_it_again(
    postgres: PostgresTarget, schema: str
) -> None:
    """The server side: a new run's first append, its run deleted, the same call sent again
    (same token) is acknowledged and writes nothing; another token starts the run again."""
    names = Names(schema, "fc_")
    run = make_run("gone")
    record = make_checkpoint(run, 0)
    args = [
        key_of(run),
        0,
        record.checkpoint_id,
        T0,
        None,
        b"h",
        b"p",
        None,
        "tok-1",
        b"gone",
        run.incarnation,
        "active",
        T0,
        0,
        b"",
        [],
        None,
        T0,
        None,
        None,
        None,
        None,
    ]
    sql = (
        f"SELECT outcome, status FROM {names['append']}({', '.join(f'${n}' for n in range(1, 23))})"
    )
    count = f"SELECT count(*) FROM {names['checkpoints']}"
    connection = await asyncpg.connect(postgres.url())
    try:
        with anyio.fail_after(30):
            first = await connection.fetchrow(sql, *args)
            gone = await connection.fetchval(f"SELECT {names['delete_run']}($1, 'd')", args[0])
            again = await connection.fetchrow(sql, *args)
            after_again = await connection.fetchval(count)
            other = await connection.fetchrow(sql, *args[:8], "tok-2", *args[9:])
            after_other = await connection.fetchval(count)
    finally:
        await connection.close()
    assert (tuple(first), gone) == (("ok", "active"), 1)
    assert (tuple(again), after_again) == (("ok", "active"), 0)
    assert (tuple(other), after_other) == (("ok", "active"), 1)


async def test_appends_take_out_expired_memos_next_to_their_own(
    postgres: PostgresTarget, schema: str
) -> None:
    """An append's memo, and the two memos after it in token order taken out when they
    expired (a live one stays, and so does a third expired one): the memo table stays
    bounded without the cleanup loop."""
    names = Names(schema, "fc_")
    ops = names["ops"]
    run = make_run("memos")
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}")
    try:
        with anyio.fail_after(30):
            await _sql(
                postgres,
                f"INSERT INTO {ops} (token, result, expires_at) VALUES "
                "('m1', 1, 0), ('m2', 1, 0), ('m3', 1, 0), "
                "('n1', 1, 1e15), ('n2', 1, 0), ('n3', 1, 0)",
            )
            store_token = "fastcheckpoint.stores.postgres._token"
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(store_token, lambda: "m0")
                await append_checkpoint(store, run, 0)
                patch.setattr(store_token, lambda: "n0")
                await append_checkpoint(store, run, 1)
            rows = await _sql(
                postgres, f"SELECT token, result, expires_at > 1e9 FROM {ops} ORDER BY token"
            )
    finally:
        await store.aclose()
    assert [tuple(row) for row in rows] == [
        ("m0", 0, True),
        ("m3", 1, False),
        ("n0", 1, True),
        ("n1", 1, True),
        ("n3", 1, False),
    ]


# -- pruning by a count that is too high -----------------------------------------------------


async def test_an_inflated_count_never_prunes_the_checkpoint_just_written(
    postgres: PostgresTarget, schema: str
) -> None:
    """A run row whose counts were raised out of band: the next create (keep 5) prunes
    nothing it must keep, and never the checkpoint it writes."""
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}")
    manager = CheckpointManager(store, config=CheckpointConfig(max_checkpoints_per_run=5))
    runs = Names(schema, "fc_")["runs"]
    try:
        with anyio.fail_after(30):
            for step in range(3):
                await manager.create("r", {"step": step})
            await _sql(postgres, f"UPDATE {runs} SET checkpoint_count = 50, forever_count = 50")
            created = await manager.create("r", {"step": "new"})
            held = [c.sequence for c in await manager.list_checkpoints("r")]
            latest = await manager.restore("r")
    finally:
        await store.aclose()
    assert created.metadata.sequence == 3
    assert held == [3, 2, 1, 0]
    assert latest is not None
    assert latest.state == {"step": "new"}


async def test_a_row_put_back_after_every_checkpoint_was_deleted_keeps_the_next_create(
    postgres: PostgresTarget, schema: str
) -> None:
    """A copy of the run row taken while it held five checkpoints, put back after they were
    all deleted (the per-call probe finds no checkpoint to judge it by): the next create
    (keep 5) is held and restorable."""
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}")
    manager = CheckpointManager(store, config=CheckpointConfig(max_checkpoints_per_run=5))
    names = Names(schema, "fc_")
    runs, kept = names["runs"], f'"{schema}"."kept"'
    try:
        with anyio.fail_after(30):
            for step in range(5):
                await manager.create("r", {"step": step})
            await _sql(postgres, f"CREATE TABLE {kept} AS SELECT * FROM {runs}")
            for checkpoint in await manager.list_checkpoints("r"):
                assert await manager.delete(checkpoint.checkpoint_id)
            await _sql(postgres, f"DELETE FROM {names['labels']}")
            await _sql(
                postgres,
                f"UPDATE {runs} r SET checkpoint_count = b.checkpoint_count, "
                "forever_count = b.forever_count, expires_at = b.expires_at, "
                f"version = b.version, data = b.data FROM {kept} b "
                "WHERE b.run_key = r.run_key",
            )
            created = await manager.create("r", {"step": "new"})
            held = [c.sequence for c in await manager.list_checkpoints("r")]
            latest = await manager.restore("r")
    finally:
        await store.aclose()
    assert created.metadata.sequence == 5
    assert held == [5]
    assert latest is not None
    assert latest.state == {"step": "new"}


@pytest.mark.parametrize("deleted", [2, 1])
async def test_a_row_put_back_from_before_a_delete_never_prunes_one_of_the_newest_held(
    postgres: PostgresTarget, schema: str, deleted: int
) -> None:
    """Three checkpoints (keep 3), a copy of the run row taken, checkpoint ``deleted``
    deleted, the copy put back (it counts 3 and knows every sequence in place, so nothing
    tells it apart). The next create pruned by sequence numbers (at most ``3 - 3``) and took
    checkpoint 0, one of the three newest the run held, without a word (schema version 8);
    pruning stops below the third newest live checkpoint in place now."""
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}")
    manager = CheckpointManager(store, config=CheckpointConfig(max_checkpoints_per_run=3))
    names = Names(schema, "fc_")
    runs, kept = names["runs"], f'"{schema}"."kept"'
    try:
        with anyio.fail_after(30):
            for step in range(3):
                await manager.create("r", {"step": step})
            await _sql(postgres, f"CREATE TABLE {kept} AS SELECT * FROM {runs}")
            [gone] = [c for c in await manager.list_checkpoints("r") if c.sequence == deleted]
            assert await manager.delete(gone.checkpoint_id)
            await _sql(
                postgres,
                f"UPDATE {runs} r SET checkpoint_count = b.checkpoint_count, "
                f"forever_count = b.forever_count FROM {kept} b WHERE b.run_key = r.run_key",
            )
            await manager.create("r", {"step": "new"})
            held = [c.sequence for c in await manager.list_checkpoints("r")]
            await manager.create("r", {"step": "newer"})
            then = [c.sequence for c in await manager.list_checkpoints("r")]
    finally:
        await store.aclose()
    kept_sequences = [sequence for sequence in (2, 1, 0) if sequence != deleted]
    assert held == [3, *kept_sequences]
    assert then == [4, 3, kept_sequences[0]]


# -- NULL elements in byte arrays ------------------------------------------------------------


async def test_a_null_label_is_damage_that_hides_no_other_run(
    postgres: PostgresTarget, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A run row whose labels hold a NULL (an operator's UPDATE): listings skip it (logged)
    and list the others, get_run raises CorruptCheckpointError, and repair finds and rebuilds
    it; nothing raises AttributeError."""
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}")
    manager = CheckpointManager(store)
    names = Names(schema, "fc_")
    runs = names["runs"]
    try:
        with anyio.fail_after(30):
            await manager.create("good", {"a": 1})
            await manager.create("bad", {"a": 1})
            await _sql(
                postgres,
                f"UPDATE {runs} SET labels = ARRAY['l'::bytea, NULL] WHERE run_id = $1",
                b"bad",
            )
            await _sql(
                postgres,
                f"INSERT INTO {names['labels']} (label, created_at, run_key) "
                f"SELECT 'l', created_at, run_key FROM {runs} WHERE run_id = $1",
                b"bad",
            )
            with caplog.at_level(logging.WARNING, "fastcheckpoint.stores.postgres"):
                listed = [run.run_id for run in (await manager.list_runs()).runs]
            with pytest.raises(CorruptCheckpointError, match="a label is NULL"):
                await manager.get_run("bad")
            damaged = await store.damaged_runs(now=T0 + 10**9)
            reports = await manager.repair()
            repaired = await manager.get_run("bad")
            relisted = sorted(run.run_id for run in (await manager.list_runs()).runs)
    finally:
        await store.aclose()
    assert listed == ["good"]
    assert "skips a damaged run row" in caplog.text
    assert [damage.problem for damage in damaged] == ["the run row holds a NULL label"]
    assert [(report.run_id, report.outcome) for report in reports] == [("bad", "rebuilt")]
    assert repaired is not None
    labels = await _sql(postgres, f"SELECT labels FROM {runs} WHERE run_id = $1", b"bad")
    assert labels[0][0] == [b"l"]
    assert relisted == ["bad", "good"]


async def test_a_null_ref_makes_its_checkpoint_corrupt_not_an_attribute_error(
    postgres: PostgresTarget, schema: str
) -> None:
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}")
    manager = CheckpointManager(store)
    names = Names(schema, "fc_")
    try:
        with anyio.fail_after(30):
            await manager.create("good2", {"a": 1})
            await _sql(postgres, f"UPDATE {names['checkpoints']} SET refs = ARRAY[NULL::bytea]")
            with pytest.raises(CorruptCheckpointError, match="a ref is NULL"):
                await manager.restore("good2")
    finally:
        await store.aclose()
