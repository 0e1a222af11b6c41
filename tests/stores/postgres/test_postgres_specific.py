"""PostgresStore beyond the contract: round trips, PgBouncer mode, lost replies, connection
faults, processes, migrations, event loops, URL options and errors."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import msgspec
import pytest

from fastcheckpoint import CheckpointConfig, CheckpointError, CheckpointManager, RetryPolicy
from fastcheckpoint.errors import (
    ConfigurationError,
    ConflictError,
    CorruptCheckpointError,
    SequenceConflict,
    SharedItemGone,
    StoreError,
    StoreUnavailableError,
    ValidationError,
)
from fastcheckpoint.stores import Item, RunRecord, _postgres_schema, open_store
from fastcheckpoint.stores._postgres_sql import FUNCTIONS, MIGRATIONS, Names, Statements
from fastcheckpoint.stores.postgres import PostgresStore
from fastcheckpoint.testing import (
    T0,
    checkpoint_id_of,
    key_of,
    make_checkpoint,
    make_item,
    make_run,
)
from tests.reliability._audit import Ack, audit_run, state_for
from tests.reliability.faults import Fault, FaultPlan, FaultProxy, Wire
from tests.stores._postgres_server import (
    PostgresTarget,
    PrivatePgBouncer,
    WireCounter,
    append_checkpoint,
    drop_schema,
    free_port,
    unique_schema,
)

ROOT = Path(__file__).resolve().parents[3]
WORKER = ROOT / "tests" / "postgres_worker.py"
FAST_RETRY = RetryPolicy(base_delay=0.001, max_delay=0.01, max_retries=5)
LATEST = MIGRATIONS[-1].version
APPLIED = [f"applied migration {migration.version}: {migration.description}"
           for migration in MIGRATIONS]

# Requests in a client's byte stream: a simple query, or the Parse or Bind that opens an
# extended-protocol exchange (asyncpg sends Bind, Execute and Sync in one write).
POSTGRES_WIRE = Wire("postgres", lambda chunk: chunk[:1] in (b"Q", b"P", b"B"))

pytestmark = pytest.mark.anyio


_append = append_checkpoint


async def _exercise(store: PostgresStore, run: RunRecord) -> None:
    """Every operation once, so each statement is prepared on the pool's one connection."""
    key = key_of(run)
    await _append(store, run, 0, expires_at=T0 + 100, refs=["b/a"],
                  items=[make_item("b/a"), make_item("w/0", owner=0)], labels=("l",))
    await _append(store, run, 1, keep_latest=5)
    await store.read_with_items(key, sequence=None, now=T0)
    await store.read_with_items(key, sequence=0, now=T0)
    await store.put_owned_items(key, [make_item("w/1", owner=1)], owner=1,
                                checkpoint_id=checkpoint_id_of(run, 1), if_absent=True, now=T0)
    await store.runs_with_label("l", limit=10, cursor=None, now=T0)
    await store.get(key, 0, now=T0)
    await store.latest(key, now=T0)
    await store.headers(key, before=None, limit=10, now=T0)
    await store.get_run(key, now=T0)
    await store.update_run(key, incarnation=run.incarnation, version=0, status="active",
                           data=b"", now=T0)
    await store.put_items(key, [make_item("a")], now=T0)
    await store.get_items(key, ["a"], now=T0)
    await store.scan_items(key, now=T0)
    await store.delete_items(key, ["a"])
    await store.list_runs(status=None, limit=10, cursor=None, now=T0)
    await store.count_runs(status=None, now=T0)
    await store.delete(key, 1, checkpoint_id=checkpoint_id_of(run, 1))
    await store.delete_run(key)
    await store.purge_expired(now=T0, limit=10)


def _budget(store: PostgresStore, run: RunRecord) -> dict[str, tuple[Any, int]]:
    key, own = key_of(run), checkpoint_id_of(run, 3)
    return {
        "first append, labelled": (lambda: _append(
            store, run, 0, expires_at=T0 + 100, labels=("thread:t", "app:a")), 1),
        "append": (lambda: _append(store, run, 1, expires_at=T0 + 101), 1),
        "append with pruning": (lambda: _append(store, run, 2, expires_at=T0 + 102,
                                                keep_latest=2), 1),
        "append with items and refs, pruning": (lambda: _append(
            store, run, 3, expires_at=T0 + 103, keep_latest=2, refs=["b/a", "b/b"],
            items=[make_item("b/a"), make_item("b/b"), make_item("w/3/x", owner=3)]), 1),
        "put_owned_items": (lambda: store.put_owned_items(
            key, [make_item("w/3/y", owner=3)], owner=3, checkpoint_id=own, if_absent=True,
            now=T0), 1),
        "read_with_items, latest": (lambda: store.read_with_items(key, sequence=None, now=T0), 1),
        "read_with_items, by sequence": (
            lambda: store.read_with_items(key, sequence=3, now=T0), 1),
        "runs_with_label": (lambda: store.runs_with_label("thread:t", limit=10, cursor=None,
                                                          now=T0), 1),
        "get": (lambda: store.get(key, 2, now=T0), 1),
        "latest": (lambda: store.latest(key, now=T0), 1),
        "headers": (lambda: store.headers(key, before=None, limit=50, now=T0), 1),
        "get_run": (lambda: store.get_run(key, now=T0), 1),
        "update_run": (lambda: store.update_run(key, incarnation=run.incarnation, version=0,
                                                status="paused", data=b"x", now=T0), 1),
        "put_items": (lambda: store.put_items(key, [make_item("k")], now=T0), 1),
        "get_items": (lambda: store.get_items(key, ["k"], now=T0), 1),
        "scan_items": (lambda: store.scan_items(key, now=T0), 1),
        "delete_items": (lambda: store.delete_items(key, ["k"]), 1),
        "delete": (lambda: store.delete(key, 2, checkpoint_id=checkpoint_id_of(run, 2)), 1),
        "list_runs": (lambda: store.list_runs(status=None, limit=10, cursor=None, now=T0), 1),
        "list_runs by status": (lambda: store.list_runs(status="paused", limit=10, cursor=None,
                                                        now=T0), 1),
        "count_runs": (lambda: store.count_runs(status="paused", now=T0), 1),
        "purge_expired": (lambda: store.purge_expired(now=T0, limit=100), 1),
        "delete_run": (lambda: store.delete_run(key), 1),
    }


# -- round trips --------------------------------------------------------------------------


async def test_every_operation_is_one_round_trip(postgres: PostgresTarget, schema: str) -> None:
    with WireCounter((postgres.host, postgres.port)) as counter:
        store = PostgresStore.from_url(f"{counter.url(postgres)}?schema={schema}&max_size=1")
        with anyio.fail_after(60):
            await _exercise(store, make_run("warm-up"))
            expected = _budget(store, make_run("counted"))
            counted = {name: await counter.trips(action)
                       for name, (action, _) in expected.items()}
            await store.aclose()
    assert counted == {name: trips for name, (_, trips) in expected.items()}


async def test_manager_create_and_restore_are_one_round_trip_each(
    postgres: PostgresTarget, schema: str
) -> None:
    with WireCounter((postgres.host, postgres.port)) as counter:
        store = PostgresStore.from_url(f"{counter.url(postgres)}?schema={schema}&max_size=1")
        manager = CheckpointManager(store, config=CheckpointConfig(max_checkpoints_per_run=10))
        state = {"messages": [{"role": "user", "content": "x" * 500}] * 20}
        with anyio.fail_after(60):
            for _ in range(3):  # the first calls prepare their statements
                await manager.create("w1", state, force=True)
                await manager.restore("w1")
                await manager.list_checkpoints("w1", limit=5)
            creates = [await counter.trips(lambda: manager.create("w1", state, force=True))
                       for _ in range(20)]
            restores = [await counter.trips(lambda: manager.restore("w1")) for _ in range(20)]
            pages = [await counter.trips(lambda: manager.list_checkpoints("w1", limit=5))
                     for _ in range(3)]
            await store.aclose()
    assert creates == [1] * 20
    assert restores == [1] * 20
    assert pages == [1] * 3


async def test_a_thousand_nested_items_cost_no_extra_round_trip(
    postgres: PostgresTarget, schema: str
) -> None:
    """A 1,000-step history (an anchor and 1,000 items of 1 KB nested under it): reading a
    checkpoint with all of them is one round trip, and so is the append whose pruning takes
    the anchor with everything under it."""
    run = make_run("nested-cost")
    key = key_of(run)
    with WireCounter((postgres.host, postgres.port)) as counter:
        store = PostgresStore.from_url(f"{counter.url(postgres)}?schema={schema}&max_size=1")
        with anyio.fail_after(60):
            await _exercise(store, make_run("warm-up"))
            await _append(store, run, 0, refs=["h/log"], items=[make_item("h/log")])
            for sequence in range(1, 11):
                await _append(store, run, sequence, refs=["h/log"], keep_latest=3, items=[
                    make_item(f"h/log/{sequence:03}{index:03}", bytes(1000))
                    for index in range(100)])
            found: list[Any] = []
            reading = await counter.trips(lambda: _into(found, store.read_with_items(
                key, sequence=None, now=T0)))
            removing = await counter.trips(lambda: _append(
                store, run, 11, refs=["h/next"], items=[make_item("h/next")], keep_latest=1))
            left = await store.scan_items(key, limit=10, now=T0)
            await store.aclose()
    assert (reading, removing) == (1, 1)
    assert len(found[0][2]) == 1001
    assert left == [("h/next", b"value-h/next")]


async def _into(results: list[Any], call: Any) -> None:
    results.append(await call)


async def test_refs_nested_under_refs_and_owned_nested_items_read_once(
    postgres: PostgresTarget, schema: str
) -> None:
    """A ref nested under another ref: the items under both (sent once per range) come back
    once each; an owned item nested under a ref, once; ``h/aé/z`` is not under ``h/a``
    (``é`` follows ``0``)."""
    run = make_run("nested-twice")
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}")
    try:
        with anyio.fail_after(30):
            await _append(store, run, 0, refs=["h/a", "h/a/1", "h/a"], items=[
                make_item(key) for key in ("h/a", "h/a/1", "h/a/1/x", "h/a/\u00e9", "h/a\u00e9/z")
            ] + [make_item("h/a/own", owner=0), make_item("w/0", owner=0)])
            found = await store.read_with_items(key_of(run), sequence=0, now=T0)
    finally:
        await store.aclose()
    assert found is not None
    assert found[2] == {key: f"value-{key}".encode() for key in (
        "h/a", "h/a/1", "h/a/1/x", "h/a/\u00e9", "h/a/own", "w/0")}


async def test_pgbouncer_mode_prepares_no_named_statement(
    postgres: PostgresTarget, schema: str
) -> None:
    """statement_cache_size=0: every statement unnamed (nothing kept in the session), at two
    round trips per call; the default names and caches them (one round trip)."""
    found: dict[str, tuple[list[str], int]] = {}
    for mode, option in (("pgbouncer", "&statement_cache_size=0"), ("default", "")):
        with WireCounter((postgres.host, postgres.port)) as counter:
            store = PostgresStore.from_url(
                f"{counter.url(postgres)}?schema={schema}&max_size=1{option}")
            with anyio.fail_after(60):
                await _exercise(store, make_run(f"warm-up-{mode}"))
                run = make_run(f"pgbouncer-{mode}")
                await _append(store, run, 0)
                trips = await counter.trips(
                    lambda store=store, run=run: store.latest(key_of(run), now=T0))
                await store.aclose()
            found[mode] = (counter.statement_names, trips)
    names, trips = found["pgbouncer"]
    assert names
    assert set(names) == {""}
    assert trips == 2
    names, trips = found["default"]
    assert "" not in set(names)
    assert trips == 1


async def test_works_through_pgbouncer_in_transaction_mode(
    postgres: PostgresTarget, schema: str
) -> None:
    """A real PgBouncer (1.18: no prepared statements in transaction mode) with two server
    connections behind many clients: concurrent runs, every operation, nothing relies on a
    server session."""
    if shutil.which("pgbouncer") is None:
        pytest.skip("pgbouncer is not installed: the no-prepared-statement mode is covered by "
                    "test_pgbouncer_mode_prepares_no_named_statement")
    bouncer = PrivatePgBouncer((postgres.host, postgres.port))
    bouncer.start()
    url = f"postgresql://postgres@127.0.0.1:{bouncer.port}/{postgres.database}"
    store = PostgresStore.from_url(f"{url}?schema={schema}&statement_cache_size=0&max_size=6")
    manager = CheckpointManager(store, config=CheckpointConfig(max_checkpoints_per_run=5))

    async def worker(index: int) -> None:
        for step in range(15):
            created = await manager.create(f"bounced-{index}", {"step": step}, force=True)
            assert created is not None
            restored = await manager.restore(f"bounced-{index}")
            assert restored is not None
            assert restored.state == {"step": step}

    try:
        with anyio.fail_after(120):
            async with anyio.create_task_group() as group:
                for index in range(6):
                    group.start_soon(worker, index)
            await _exercise(store, make_run("bounced-everything"))
            listed = await manager.list_checkpoints("bounced-0", limit=10)
    finally:
        await store.aclose()
        bouncer.stop()
    assert [checkpoint.sequence for checkpoint in listed] == [14, 13, 12, 11, 10]


# -- lost replies and connection faults ---------------------------------------------------


async def test_a_retried_append_recognises_its_own_write(
    postgres: PostgresTarget, schema: str
) -> None:
    """The server side of a lost reply: the same call sent again finds its token."""
    names = Names(schema, "fc_")
    run = make_run("token")
    record = make_checkpoint(run, 0)
    args = [key_of(run), 0, record.checkpoint_id, T0, None, b"h", b"p", None, "tok-1",
            b"token", run.incarnation, "active", T0, 0, b"", [], None, T0, None, None, None, None]
    connection = await asyncpg.connect(postgres.url())
    try:
        sql = f"SELECT outcome, status, latest_sequence FROM {names['append']}({', '.join(f'${n}' for n in range(1, 23))})"  # noqa: E501
        first = await connection.fetchrow(sql, *args)
        again = await connection.fetchrow(sql, *args)
        other = await connection.fetchrow(sql, *args[:8], "tok-2", *args[9:])
        count = await connection.fetchval(f"SELECT count(*) FROM {names['checkpoints']}")
    finally:
        await connection.close()
    assert tuple(first) == ("ok", "active", None)
    assert tuple(again) == ("ok", "active", None)
    assert tuple(other) == ("conflict", None, 0)
    assert count == 1


async def test_a_guarded_update_sent_again_finds_its_token_and_a_refused_one_stays_refused(
    postgres: PostgresTarget, schema: str
) -> None:
    """The server side of a lost reply of ``update_run(..., latest_sequence=)``: applied,
    then a checkpoint appended, the same call sent again is the update applied (not
    ``newer``); a call refused as ``newer`` is refused again when sent again."""
    names = Names(schema, "fc_")
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}")
    run = make_run("guard-token")
    key = key_of(run)
    sql = (f"SELECT outcome, (run).version, (run).latest_sequence "
           f"FROM {names['update_run']}($1, $2, $3, $4, $5, $6, $7, $8)")
    applied = [key, run.incarnation, 0, "paused", b"ask", T0, "tok-1", 0]
    refused = [key, run.incarnation, 1, "active", b"", T0, "tok-2", 0]
    try:
        with anyio.fail_after(30):
            await _append(store, run, 0)
            connection = await asyncpg.connect(postgres.url())
            try:
                first = await connection.fetchrow(sql, *applied)
                await _append(store, run, 1)
                again = await connection.fetchrow(sql, *applied)
                outcomes = [await connection.fetchrow(sql, *refused) for _ in range(2)]
            finally:
                await connection.close()
            after = await store.get_run(key, now=T0)
    finally:
        await store.aclose()
    assert tuple(first) == ("ok", 1, 0)
    assert tuple(again) == ("ok", 1, 1)
    assert [tuple(outcome) for outcome in outcomes] == [("newer", 1, 1)] * 2
    assert after is not None
    assert (after.status, after.version, after.latest_sequence) == ("paused", 1, 1)


async def test_an_update_whose_row_was_put_back_meanwhile_is_a_conflict_not_a_success(
    postgres: PostgresTarget, schema: str
) -> None:
    """Another transaction deletes the run row and puts the same row back (an operator's
    copy put back, with its checkpoints) while an update waits for the row's lock: the
    update finds no row to change, and the row it then reads has the incarnation and
    version it expected. Nothing was changed, so the call must not return as if it was
    (a lost ``complete``); it is a conflict, which the manager reads again and retries."""
    names = Names(schema, "fc_")
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}")
    run = make_run("put-back")
    key = key_of(run)
    where = f"WHERE run_key = '{key}'"  # a checked run key: letters and digits only
    put_back = ";\n".join([
        f"CREATE TEMP TABLE kept_run ON COMMIT DROP AS SELECT * FROM {names['runs']} {where}",
        f"CREATE TEMP TABLE kept_log ON COMMIT DROP AS SELECT * FROM {names['checkpoints']} "
        f"{where}",
        f"DELETE FROM {names['runs']} {where}",
        f"INSERT INTO {names['runs']} SELECT * FROM kept_run",
        f"INSERT INTO {names['checkpoints']} SELECT * FROM kept_log",
    ])
    outcome: list[Any] = []

    async def update() -> None:
        try:
            outcome.append(await store.update_run(
                key, incarnation=run.incarnation, version=0, status="completed", data=b"",
                now=T0))
        except ConflictError as exc:
            outcome.append(exc)

    try:
        with anyio.fail_after(30):
            await _append(store, run, 0)
            await store.get_run(key, now=T0)  # the pool is open: the update only waits
            operator = await asyncpg.connect(postgres.url())
            try:
                transaction = operator.transaction()
                await transaction.start()
                await operator.execute(put_back)
                async with anyio.create_task_group() as group:
                    group.start_soon(update)
                    await anyio.sleep(0.5)  # the update waits for the row's lock
                    assert not outcome
                    await transaction.commit()
            finally:
                await operator.close()
            after = await store.get_run(key, now=T0)
    finally:
        await store.aclose()
    assert after is not None
    assert (after.status, after.version) == ("active", 0)
    assert isinstance(outcome[0], ConflictError), f"reported {outcome[0]!r} as applied"


async def test_unheld_refs_are_named_and_a_retry_still_finds_its_write(
    postgres: PostgresTarget, schema: str
) -> None:
    """The refused keys come back decoded, once each, in refs order; a wrong sequence is a
    SequenceConflict first; an append whose reply was lost is acknowledged when sent again
    even if the item it named went meanwhile (its checkpoint is written: nothing to refuse)."""
    names = Names(schema, "fc_")
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}")
    run = make_run("unheld")
    key = key_of(run)
    odd, snowman = "z/\x00é", "a/\u2603"
    args = [key, 1, checkpoint_id_of(run, 1), T0, None, b"h", b"p", [b"b/a"], "tok-1",
            run.run_id.encode(), run.incarnation, "active", T0, 0, b"", [], None, T0, None,
            None, None, None]
    sql = (f"SELECT outcome FROM {names['append']}"
           f"({', '.join(f'${n}' for n in range(1, 23))})")
    try:
        with anyio.fail_after(30):
            await _append(store, run, 0, refs=["b/a"], items=[make_item("b/a")])
            with pytest.raises(SharedItemGone, match="nothing was written") as refused:
                await _append(store, run, 1, refs=[odd, "b/a", snowman, odd, "b/new"],
                              items=[make_item("b/new")])
            with pytest.raises(SequenceConflict):
                await _append(store, run, 5, refs=[odd])
            connection = await asyncpg.connect(postgres.url())
            try:
                first = await connection.fetchval(sql, *args)
                assert await store.delete_items(key, ["b/a"]) == 1
                again = await connection.fetchval(sql, *args)
                with pytest.raises(asyncpg.PostgresError) as raw:
                    await connection.fetchval(sql, *args[:1], 2, checkpoint_id_of(run, 2),
                                              *args[3:8], "tok-2", *args[9:])
            finally:
                await connection.close()
            sequences = [header.sequence for header in
                         (await store.headers(key, before=None, limit=10, now=T0))[0]]
    finally:
        await store.aclose()
    assert refused.value.keys == (odd, snowman)
    assert (first, again) == ("ok", "ok")
    assert (raw.value.sqlstate, raw.value.detail) == ("FC004", b"b/a".hex())
    assert sequences == [1, 0]


async def test_retried_deletes_and_updates_report_what_happened(
    postgres: PostgresTarget, schema: str
) -> None:
    names = Names(schema, "fc_")
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}")
    run = make_run("memo")
    key = key_of(run)
    connection = await asyncpg.connect(postgres.url())
    try:
        with anyio.fail_after(30):
            for sequence in range(3):
                await _append(store, run, sequence)
            delete = f"SELECT {names['delete']}($1, $2, $3, $4)"
            removed = [await connection.fetchval(delete, key, 1, checkpoint_id_of(run, 1), "d")
                       for _ in range(2)]
            fresh = await connection.fetchval(delete, key, 1, checkpoint_id_of(run, 1), "d2")
            update = (f"SELECT outcome, (run).version FROM "
                      f"{names['update_run']}($1, $2, $3, $4, $5, $6, $7)")
            updates = [tuple(await connection.fetchrow(update, key, run.incarnation, 0, "paused",
                                                       b"", T0, "u")) for _ in range(2)]
            stale = tuple(await connection.fetchrow(update, key, run.incarnation, 0, "paused",
                                                    b"", T0, "u2"))
            delete_run = f"SELECT {names['delete_run']}($1, $2)"
            whole = [await connection.fetchval(delete_run, key, "r") for _ in range(2)]
    finally:
        await connection.close()
        await store.aclose()
    assert removed == [1, 1]
    assert fresh == 0
    assert updates == [("ok", 1), ("ok", 1)]
    assert stale == ("conflict", 1)
    assert whole == [2, 2]


async def test_retried_item_writes_and_deletes_report_what_happened(
    postgres: PostgresTarget, schema: str
) -> None:
    """A create-only items write and an items delete sent again with their token: the write
    is not a conflict with itself, the delete reports what the first attempt removed. Another
    token meets the state as it is."""
    names = Names(schema, "fc_")
    run = make_run("item-memo")
    key = key_of(run)
    put = f"SELECT {names['put_items']}($1, $2, $3, $4, $5, $6, $7, $8)"
    delete = f"SELECT {names['delete_items']}($1, $2, $3)"
    args = [key, [b"a", b"b"], [b"1", b"2"], [None, None], [None, None], True, T0]
    connection = await asyncpg.connect(postgres.url())
    try:
        with anyio.fail_after(30):
            for _ in range(2):
                await connection.execute(put, *args, "p")
            with pytest.raises(asyncpg.PostgresError) as taken:
                await connection.execute(put, *args, "p2")
            removed = [await connection.fetchval(delete, key, [b"a", b"b"], "d")
                       for _ in range(2)]
            fresh = await connection.fetchval(delete, key, [b"a", b"b"], "d2")
            left = await connection.fetchval(f"SELECT count(*) FROM {names['items']}")
    finally:
        await connection.close()
    assert taken.value.sqlstate == "FC002"
    assert removed == [2, 2]
    assert fresh == 0
    assert left == 0


async def test_connection_faults_never_half_write_or_duplicate(
    postgres: PostgresTarget, schema: str
) -> None:
    """A proxy cuts requests mid-way (the server never runs them) and drops replies of
    requests the server committed: every acknowledged create is there exactly once, nothing
    is half-written, and sequences stay gap-free."""
    kinds = (Fault.CUT, Fault.LOSE_REPLY, Fault.DELAY)
    opening = [*kinds, *kinds, *[Fault.PASS] * 12]
    plan = FaultPlan(rate=0.1, kinds=kinds, seed=15, script=opening)
    config = CheckpointConfig(max_checkpoints_per_run=None, retry=FAST_RETRY)
    acks: list[Ack] = []
    unconfirmed: set[str] = set()
    foreign: list[str] = []
    with FaultProxy((postgres.host, postgres.port), POSTGRES_WIRE, plan) as proxy:
        url = f"postgresql://postgres@127.0.0.1:{proxy.port}/{postgres.database}"
        store = PostgresStore.from_url(f"{url}?schema={schema}", retry=FAST_RETRY)
        manager = CheckpointManager(store, config=config)
        try:
            with anyio.fail_after(120):
                for step in range(80):
                    token = f"faults/{step}"
                    try:
                        created = await manager.create("faulty", state_for(token), force=True)
                    except CheckpointError:
                        unconfirmed.add(token)
                        continue
                    except Exception as exc:  # what is under test: nothing else escapes
                        foreign.append(f"{type(exc).__name__}: {exc}")
                        unconfirmed.add(token)
                        continue
                    assert created is not None
                    acks.append(Ack(token, created.metadata.sequence, created.checkpoint_id))
        finally:
            await store.aclose()
    clean = PostgresStore.from_url(f"{postgres.url()}?schema={schema}")
    try:
        with anyio.fail_after(60):
            audit = await audit_run(CheckpointManager(clean, config=config), "faulty", acks,
                                    unconfirmed)
    finally:
        await clean.aclose()
    assert min(proxy.counts[fault] for fault in kinds) >= 2
    assert not foreign
    assert not audit.problems(), audit.problems()
    assert len(audit.unacknowledged) <= len(unconfirmed)
    assert len(acks) >= 40


# -- processes ----------------------------------------------------------------------------


async def test_processes_get_unique_gap_free_sequences(
    postgres: PostgresTarget, schema: str
) -> None:
    url = f"{postgres.url()}?schema={schema}&max_size=2"
    workers, each = 4, 25

    def run_workers() -> list[str]:
        processes = [
            subprocess.Popen([sys.executable, str(WORKER), url, "shared-run", str(each),
                              f"w{index}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
            for index in range(workers)
        ]
        outputs = []
        for process in processes:
            out, err = process.communicate(timeout=120)
            assert process.returncode == 0, err.decode()
            outputs.append(out.decode())
        return outputs

    with anyio.fail_after(150):
        outputs = await anyio.to_thread.run_sync(run_workers)
        store = PostgresStore.from_url(url)
        record = await store.get_run(key_of(make_run("shared-run")), now=time.time())
        await store.aclose()
    sequences = sorted(int(line) for out in outputs for line in out.split())
    assert sequences == list(range(workers * each))
    assert record is not None
    assert (record.latest_sequence, record.checkpoint_count) == (99, 100)


# -- migrations ---------------------------------------------------------------------------


async def test_provision_creates_then_finds(postgres: PostgresTarget) -> None:
    schema = unique_schema()
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}&table_prefix=app_")
    try:
        with anyio.fail_after(60):
            first = await store.provision()
            second = await store.provision()
            await _append(store, make_run("provisioned"), 0)
    finally:
        await store.aclose()
        await drop_schema(postgres, schema)
    assert first == [
        f"created schema {schema}",
        f"created table {schema}.app_migrations",
        *APPLIED,
        f"now schema {schema} at version {LATEST} (table prefix 'app_')",
    ]
    assert second == [f"found schema {schema} at version {LATEST} (table prefix 'app_')"]


async def test_concurrent_provisioning_takes_turns(postgres: PostgresTarget) -> None:
    schema = unique_schema()
    stores = [PostgresStore.from_url(f"{postgres.url()}?schema={schema}") for _ in range(3)]
    reports: list[list[str]] = []

    async def provision(store: PostgresStore) -> None:
        reports.append(await store.provision())

    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as group:
                for store in stores:
                    group.start_soon(provision, store)
    finally:
        for store in stores:
            await store.aclose()
        await drop_schema(postgres, schema)
    applied = [report for report in reports if any("applied" in line for line in report)]
    assert len(applied) == 1
    assert sorted(report[-1] for report in reports) == sorted(
        [f"now schema {schema} at version {LATEST} (table prefix 'fc_')"]
        + [f"found schema {schema} at version {LATEST} (table prefix 'fc_')"] * 2)


class _PausedAfterSchemaCheck:
    """An asyncpg connection that runs ``meanwhile`` once, right after provisioning on it found
    out whether the schema exists: where another process's provisioning can come in."""

    def __init__(self, connection: asyncpg.Connection,
                 meanwhile: Callable[[], Awaitable[None]]) -> None:
        self._connection = connection
        self._meanwhile: Callable[[], Awaitable[None]] | None = meanwhile

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        value = await self._connection.fetchval(sql, *args)
        if "pg_namespace" in sql and self._meanwhile is not None:
            meanwhile, self._meanwhile = self._meanwhile, None
            await meanwhile()
        return value


async def _waits_for_a_lock(watcher: asyncpg.Connection, pid: int) -> bool:
    waiting = await watcher.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = $1 AND NOT granted)", pid)
    return bool(waiting)


async def test_stores_with_other_prefixes_provision_one_new_schema_at_once(
    postgres: PostgresTarget,
) -> None:
    """The second store's provisioning runs whole (or until it waits) between the first's check
    that the schema is missing and its CREATE SCHEMA: both end provisioned, neither fails."""
    schema = unique_schema()
    first, second = Names(schema, "a_"), Names(schema, "b_")
    connections = [await asyncpg.connect(postgres.url()) for _ in range(3)]
    mine, other, watcher = connections
    later: list[asyncio.Task[list[str]]] = []

    async def meanwhile() -> None:
        later.append(asyncio.ensure_future(_postgres_schema.provision(other, second)))
        pid = other.get_server_pid()
        while not later[0].done() and not await _waits_for_a_lock(watcher, pid):  # noqa: ASYNC110 (the server's locks)
            await asyncio.sleep(0.01)

    try:
        with anyio.fail_after(60):
            paused = _PausedAfterSchemaCheck(mine, meanwhile)
            report = await _postgres_schema.provision(paused, first)
            other_report = await later[0]
            assert await _postgres_schema.missing_objects(watcher, first) == []
            assert await _postgres_schema.missing_objects(watcher, second) == []
    finally:
        for task in later:
            task.cancel()
        for connection in connections:
            await connection.close()
        await drop_schema(postgres, schema)
    assert report[0] == f"created schema {schema}"
    assert f"created schema {schema}" not in other_report
    assert report[-1] == f"now schema {schema} at version {LATEST} (table prefix 'a_')"
    assert other_report[-1] == f"now schema {schema} at version {LATEST} (table prefix 'b_')"


async def test_a_store_without_its_schema_says_to_run_init(postgres: PostgresTarget) -> None:
    store = PostgresStore.from_url(f"{postgres.url()}?schema={unique_schema()}")
    try:
        with anyio.fail_after(30), pytest.raises(ConfigurationError, match="fastcheckpoint init"):
            await store.get_run(key_of(make_run("nothing")), now=T0)
    finally:
        await store.aclose()


async def _migrate_to(connection: Any, names: Names, version: int) -> None:
    """A new schema at ``version``, as the release that stopped there left it."""
    await connection.execute(f'CREATE SCHEMA "{names.schema}"; CREATE TABLE '
                             f'{names["migrations"]} (version integer PRIMARY KEY, description '
                             "text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
    for migration in MIGRATIONS[:version]:
        await connection.execute(names.render(migration.sql))
        await connection.execute(f"INSERT INTO {names['migrations']} (version, description) "
                                 "VALUES ($1, $2)", migration.version, migration.description)


async def _connections_left(watcher: asyncpg.Connection, application: str) -> int:
    """Server connections of ``application``, once those closed have left (a closed one's
    server process may take a moment to leave the list)."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
    deadline = time.monotonic() + 5
    while (left := int(await watcher.fetchval(query, application))) and (  # noqa: ASYNC110
            time.monotonic() < deadline):
        await anyio.sleep(0.05)
    return left


async def test_calls_before_init_hold_no_connection(postgres: PostgresTarget) -> None:
    # Processes that start before init has run: every call is refused, and each refusal left
    # its pool open (a connection each, until the server ran out of them), aclose or not.
    application = f"fc-before-init-{secrets.token_hex(4)}"
    store = PostgresStore.from_url(
        f"{postgres.url()}?schema={unique_schema()}&application_name={application}")
    watcher = await asyncpg.connect(postgres.url())
    try:
        with anyio.fail_after(30):
            for _ in range(3):
                with pytest.raises(ConfigurationError, match="fastcheckpoint init"):
                    await store.get_run(key_of(make_run("early")), now=T0)
            held = await _connections_left(watcher, application)
    finally:
        await store.aclose()
        await watcher.close()
    assert held == 0


async def test_an_older_schema_is_upgraded_by_init(postgres: PostgresTarget) -> None:
    """A migrations table with nothing applied stands for a schema older than this code."""
    schema = unique_schema()
    names = Names(schema, "fc_")
    connection = await asyncpg.connect(postgres.url())
    await connection.execute(f'CREATE SCHEMA "{schema}"; CREATE TABLE {names["migrations"]} '
                             "(version integer PRIMARY KEY, description text NOT NULL, "
                             "applied_at timestamptz NOT NULL DEFAULT now())")
    await connection.close()
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}")
    try:
        with anyio.fail_after(30):
            with pytest.raises(ConfigurationError, match=r"version 0.*upgrade it with"):
                await store.latest(key_of(make_run("old")), now=T0)
            lines = await store.provision()
            assert await store.latest(key_of(make_run("old")), now=T0) is None
    finally:
        await store.aclose()
        await drop_schema(postgres, schema)
    assert lines == [*APPLIED, f"now schema {schema} at version {LATEST} (table prefix 'fc_')"]


async def test_a_version_1_schema_is_upgraded_and_its_data_kept(postgres: PostgresTarget) -> None:
    """Migration 2 replaces the append function in place (same signature, so the same object
    and its grants): a run written at version 1 goes on, and refs naming items the run does
    not hold, acknowledged at version 1, are refused from then on."""
    schema = unique_schema()
    names = Names(schema, "fc_")
    run = make_run("from-v1")
    key = key_of(run)
    signature = f"{names['append']}({FUNCTIONS['append']})"
    v1_append = (f"SELECT outcome FROM {names['append']}"
                 f"({', '.join(f'${n}' for n in range(1, 23))})")

    def v1_call(sequence: int, refs: list[bytes], items: list[bytes]) -> list[Any]:
        return [key, sequence, checkpoint_id_of(run, sequence), T0, None, b"h", b"p", refs,
                f"tok-{sequence}", run.run_id.encode(), run.incarnation, "active", T0, 0, b"",
                [], None, T0, items or None, [b"v"] * len(items) or None,
                [None] * len(items) or None, [None] * len(items) or None]

    connection = await asyncpg.connect(postgres.url())
    try:
        await _migrate_to(connection, names, 1)
        before = await connection.fetchval("SELECT to_regprocedure($1)::oid", signature)
        written = [await connection.fetchval(v1_append, *v1_call(0, [b"b/a"], [b"b/a"])),
                   await connection.fetchval(v1_append, *v1_call(1, [b"b/nothing"], []))]
    finally:
        await connection.close()
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}")
    try:
        with anyio.fail_after(30):
            with pytest.raises(ConfigurationError, match=r"version 1.*upgrade it with"):
                await store.latest(key, now=T0)
            lines = await store.provision()
            await _append(store, run, 2, refs=["b/a"])
            with pytest.raises(SharedItemGone) as refused:
                await _append(store, run, 3, refs=["b/a", "b/nothing"])
            found = await store.read_with_items(key, sequence=None, now=T0)
            connection = await asyncpg.connect(postgres.url())
            try:
                after = await connection.fetchval("SELECT to_regprocedure($1)::oid", signature)
            finally:
                await connection.close()
    finally:
        await store.aclose()
        await drop_schema(postgres, schema)
    assert written == ["ok", "ok"]
    assert lines == [*APPLIED[1:], f"now schema {schema} at version {LATEST} (table prefix 'fc_')"]
    assert after == before
    assert refused.value.keys == ("b/nothing",)
    assert found is not None
    assert (found[0].sequence, found[2]) == (2, {"b/a": b"v"})


async def test_a_version_2_schema_is_upgraded_and_its_data_kept(postgres: PostgresTarget) -> None:
    """Migration 3 replaces remove, append and read_with_items in place (same signatures, so
    the same objects and their grants): items nested under a shared item, written at version
    2 and not read with it there, are read with it from then on and go when it goes."""
    schema = unique_schema()
    names = Names(schema, "fc_")
    run = make_run("from-v2")
    key = key_of(run)
    # Migration 13 adds a read_with_items of another signature beside this one.
    signatures = {**FUNCTIONS, "read_with_items": "text, bigint, double precision"}
    replaced = [f"{names[name]}({signatures[name]})"
                for name in ("remove", "append", "read_with_items")]
    append = (f"SELECT outcome FROM {names['append']}"
              f"({', '.join(f'${n}' for n in range(1, 23))})")
    read = f"SELECT item_keys FROM {names['read_with_items']}($1, $2, $3)"

    def v2_call(sequence: int, refs: list[str], items: list[str]) -> list[Any]:
        return [key, sequence, checkpoint_id_of(run, sequence), T0, None, b"h", b"p",
                [ref.encode() for ref in refs], f"tok-{sequence}", run.run_id.encode(),
                run.incarnation, "active", T0, 0, b"", [], None, T0,
                [item.encode() for item in items], [b"v"] * len(items), [None] * len(items),
                [None] * len(items)]

    connection = await asyncpg.connect(postgres.url())
    try:
        await _migrate_to(connection, names, 2)
        before = [await connection.fetchval("SELECT to_regprocedure($1)::oid", signature)
                  for signature in replaced]
        written = [await connection.fetchval(append, *v2_call(0, ["h/a"], ["h/a", "h/a/0"])),
                   await connection.fetchval(append, *v2_call(1, ["h/a"], ["h/a/1"]))]
        at_v2 = await connection.fetchval(read, key, None, T0)
    finally:
        await connection.close()
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}")
    try:
        with anyio.fail_after(30):
            with pytest.raises(ConfigurationError, match=r"version 2.*upgrade it with"):
                await store.latest(key, now=T0)
            lines = await store.provision()
            found = await store.read_with_items(key, sequence=0, now=T0)
            await _append(store, run, 2, refs=["h/b"], items=[make_item("h/b")], keep_latest=1)
            left = await store.scan_items(key, prefix="h/", now=T0)
            connection = await asyncpg.connect(postgres.url())
            try:
                after = [await connection.fetchval("SELECT to_regprocedure($1)::oid", signature)
                         for signature in replaced]
            finally:
                await connection.close()
    finally:
        await store.aclose()
        await drop_schema(postgres, schema)
    assert written == ["ok", "ok"]
    assert at_v2 == [b"h/a"]
    assert lines == [*APPLIED[2:], f"now schema {schema} at version {LATEST} (table prefix 'fc_')"]
    assert after == before
    assert None not in before
    assert found is not None
    assert found[2] == {"h/a": b"v", "h/a/0": b"v", "h/a/1": b"v"}
    assert left == [("h/b", b"value-h/b")]


async def test_a_version_5_schema_is_upgraded_and_the_old_update_kept(
    postgres: PostgresTarget,
) -> None:
    """Migration 6 adds the update taking ``latest_sequence`` beside migration 1's (another
    signature, so another object): a run written at version 5 takes guarded updates, and a
    process of the release before, still running, keeps calling its own."""
    schema = unique_schema()
    names = Names(schema, "fc_")
    run = make_run("from-v5")
    key = key_of(run)
    append = (f"SELECT outcome FROM {names['append']}"
              f"({', '.join(f'${n}' for n in range(1, 23))})")
    v5_update = f"SELECT outcome FROM {names['update_run']}($1, $2, $3, $4, $5, $6, $7)"

    def v5_call(sequence: int) -> list[Any]:
        return [key, sequence, checkpoint_id_of(run, sequence), T0, None, b"h", b"p", [],
                f"tok-{sequence}", run.run_id.encode(), run.incarnation, "active", T0, 0, b"",
                [], None, T0, None, None, None, None]

    connection = await asyncpg.connect(postgres.url())
    try:
        await _migrate_to(connection, names, 5)
        written = [await connection.fetchval(append, *v5_call(sequence)) for sequence in (0, 1)]
    finally:
        await connection.close()
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}")
    try:
        with anyio.fail_after(30):
            with pytest.raises(ConfigurationError, match=r"version 5.*upgrade it with"):
                await store.latest(key, now=T0)
            lines = await store.provision()
            with pytest.raises(ConflictError, match="newer checkpoints"):
                await store.update_run(key, incarnation=run.incarnation, version=0,
                                       status="paused", data=b"", now=T0, latest_sequence=0)
            paused = await store.update_run(key, incarnation=run.incarnation, version=0,
                                            status="paused", data=b"", now=T0,
                                            latest_sequence=1)
            connection = await asyncpg.connect(postgres.url())
            try:
                by_the_old_release = await connection.fetchval(
                    v5_update, key, run.incarnation, 1, "active", b"", T0, "tok-old")
            finally:
                await connection.close()
            after = await store.get_run(key, now=T0)
    finally:
        await store.aclose()
        await drop_schema(postgres, schema)
    assert written == ["ok", "ok"]
    assert lines == [*APPLIED[5:], f"now schema {schema} at version {LATEST} (table prefix 'fc_')"]
    assert (paused.status, paused.version, paused.latest_sequence) == ("paused", 1, 1)
    assert by_the_old_release == "ok"
    assert after is not None
    assert (after.status, after.version) == ("active", 2)


async def test_a_newer_schema_is_never_downgraded(postgres: PostgresTarget, schema: str) -> None:
    names = Names(schema, "fc_")
    connection = await asyncpg.connect(postgres.url())
    await connection.execute(f"INSERT INTO {names['migrations']} (version, description) "
                             "VALUES ($1, 'from the future')", LATEST + 1)
    before = await connection.fetch(f"SELECT version FROM {names['migrations']} ORDER BY 1")
    await connection.close()
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}")
    try:
        with anyio.fail_after(30):
            with pytest.raises(ConfigurationError, match=r"newer fastcheckpoint.*never downgrades"):
                await store.provision()
            with pytest.raises(ConfigurationError, match="migrated by a newer fastcheckpoint"):
                await store.latest(key_of(make_run("new")), now=T0)
    finally:
        await store.aclose()
    connection = await asyncpg.connect(postgres.url())
    after = await connection.fetch(f"SELECT version FROM {names['migrations']} ORDER BY 1")
    await connection.close()
    assert [row[0] for row in after] == [row[0] for row in before] == [*range(1, LATEST + 2)]


# -- event loops --------------------------------------------------------------------------


def test_trio_is_refused_with_a_configuration_error(postgres: PostgresTarget) -> None:
    store = PostgresStore.from_url(f"{postgres.url()}?schema=never_created")

    async def under_trio() -> None:
        with pytest.raises(ConfigurationError, match="asyncio only"):
            await store.latest(key_of(make_run("trio")), now=T0)
        with pytest.raises(ConfigurationError, match="asyncio only"):
            await store.provision()
        await store.aclose()

    anyio.run(under_trio, backend="trio")


def test_a_module_level_store_serves_several_asyncio_runs(
    postgres: PostgresTarget, schema: str
) -> None:
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}")
    manager = CheckpointManager(store)

    async def step(number: int) -> int:
        with anyio.fail_after(30):
            created = await manager.create("loops", {"step": number}, force=True)
            assert created is not None
            return created.metadata.sequence

    sequences = [asyncio.run(step(number)) for number in range(3)]

    async def close() -> None:
        await store.aclose()

    asyncio.run(close())
    assert sequences == [0, 1, 2]


async def test_a_given_pool_is_used_and_never_closed(
    postgres: PostgresTarget, schema: str
) -> None:
    pool = await asyncpg.create_pool(postgres.url(), min_size=1, max_size=2)
    store = PostgresStore(pool, schema=schema)
    try:
        with anyio.fail_after(30):
            await _append(store, make_run("given"), 0)
            await store.aclose()
            assert await pool.fetchval("SELECT 1") == 1
    finally:
        await pool.close()


def test_a_given_pool_refuses_another_event_loop(postgres: PostgresTarget, schema: str) -> None:
    first_loop = asyncio.new_event_loop()

    async def first() -> tuple[PostgresStore, asyncpg.Pool]:
        pool = await asyncpg.create_pool(postgres.url(), min_size=1, max_size=1)
        store = PostgresStore(pool, schema=schema)
        await store.latest(key_of(make_run("loop")), now=T0)
        return store, pool

    async def second(store: PostgresStore) -> None:
        with pytest.raises(ConfigurationError, match="another event loop"):
            await store.latest(key_of(make_run("loop")), now=T0)

    try:
        store, pool = first_loop.run_until_complete(first())
        asyncio.run(second(store))
        first_loop.run_until_complete(pool.close())
    finally:
        first_loop.close()


# -- construction and errors --------------------------------------------------------------


def test_unknown_url_options_are_refused(postgres: PostgresTarget) -> None:
    with pytest.raises(ConfigurationError, match=r"'tabel_prefix'.*did you mean 'table_prefix'"):
        PostgresStore.from_url(f"{postgres.url()}?tabel_prefix=x_")
    with pytest.raises(ConfigurationError, match="'search_path'"):
        PostgresStore.from_url(f"{postgres.url()}?search_path=x")
    with pytest.raises(ConfigurationError, match="'colour'"):
        open_store(postgres.url(), colour="blue")
    with pytest.raises(ConfigurationError, match="names its database"):
        PostgresStore.from_url("postgresql://localhost:5432")
    with pytest.raises(ConfigurationError, match="table_prefix"):
        PostgresStore.from_url(f"{postgres.url()}?table_prefix=Bad-Prefix")
    with pytest.raises(ConfigurationError, match="min_size"):
        PostgresStore.from_url(f"{postgres.url()}?min_size=5&max_size=2")
    with pytest.raises(ConfigurationError, match="max_size must be an integer"):
        PostgresStore.from_url(f"{postgres.url()}?max_size=many")


async def test_open_store_takes_both_schemes_and_options(
    postgres: PostgresTarget, schema: str
) -> None:
    for scheme in ("postgresql", "postgres"):
        url = postgres.url().replace("postgresql://", f"{scheme}://")
        store = open_store(f"{url}?schema={schema}&default_ttl_seconds=60&max_payload_bytes=16",
                           retry=FAST_RETRY, statement_cache_size=0)
        assert isinstance(store, PostgresStore)
        assert store.default_ttl_seconds == 60.0
        with anyio.fail_after(30):
            with pytest.raises(ValidationError, match="at most 16"):
                await _append(store, make_run(f"big-{scheme}"), 0)
            assert await store.get_run(key_of(make_run(f"big-{scheme}")), now=T0) is None
            await store.aclose()


async def test_an_unreachable_server_is_unavailable_after_retries() -> None:
    store = PostgresStore.from_url(f"postgresql://postgres@127.0.0.1:{free_port()}/db",
                                   retry=FAST_RETRY, connect_timeout=2)
    try:
        with anyio.fail_after(30), pytest.raises(StoreUnavailableError, match="after 5 retries"):
            await store.latest(key_of(make_run("nowhere")), now=T0)
    finally:
        await store.aclose()


async def test_a_driver_option_it_refuses_is_a_configuration_error(
    postgres: PostgresTarget,
) -> None:
    store = PostgresStore.from_url(f"{postgres.url()}?sslmode=sometimes", retry=FAST_RETRY)
    try:
        with anyio.fail_after(30), pytest.raises(ConfigurationError, match="sslmode"):
            await store.latest(key_of(make_run("nowhere")), now=T0)
    finally:
        await store.aclose()


async def test_a_missing_database_is_a_configuration_error(postgres: PostgresTarget) -> None:
    store = PostgresStore.from_url(postgres.url("fc_no_such_database"), retry=FAST_RETRY)
    try:
        with anyio.fail_after(30), pytest.raises(ConfigurationError, match="does not exist"):
            await store.latest(key_of(make_run("nowhere")), now=T0)
    finally:
        await store.aclose()


async def test_a_role_without_grants_is_told_which_grants(
    postgres: PostgresTarget, schema: str
) -> None:
    role = f"fc_nogrant_{schema[2:]}"
    admin = await asyncpg.connect(postgres.url())
    await admin.execute(f"CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA {schema} TO {role}; "
                        f"GRANT SELECT ON {schema}.fc_migrations TO {role}")
    store = PostgresStore.from_url(f"{postgres.url(user=role)}?schema={schema}",
                                   retry=FAST_RETRY)
    try:
        with anyio.fail_after(30), pytest.raises(StoreError, match=r"grants\.sql"):
            await _append(store, make_run("denied"), 0)
    finally:
        await store.aclose()
        await admin.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
        await admin.close()


async def test_a_contradicting_log_is_reported_corrupt_and_changes_nothing(
    postgres: PostgresTarget, schema: str
) -> None:
    """An operator who rewinds a run row by hand: the append sees a checkpoint beyond what the
    row knows, and refuses rather than overwrite it; so do the other writes, and cleanup
    leaves the run alone, until the repair rebuilds the row."""
    names = Names(schema, "fc_")
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}")
    run = make_run("rewound")
    key = key_of(run)
    try:
        with anyio.fail_after(30):
            for sequence in range(3):
                await _append(store, run, sequence, expires_at=T0 + 10 + sequence)
            connection = await asyncpg.connect(postgres.url())
            await connection.execute(f"UPDATE {names['runs']} SET latest_sequence = 1, "
                                     "checkpoint_count = 0, expires_at = 0, purge_at = 0")
            await connection.close()
            with pytest.raises(CorruptCheckpointError, match="knows sequences up to 1") as refused:
                await _append(store, run, 2)
            with pytest.raises(CorruptCheckpointError, match="knows sequences up to 1"):
                await _append(store, run, 0, now=T0 + 5)  # never taken for an expired run
            with pytest.raises(CorruptCheckpointError):
                await store.delete(key, 1, checkpoint_id=checkpoint_id_of(run, 1))
            with pytest.raises(CorruptCheckpointError):
                await store.update_run(key, incarnation=run.incarnation, version=0,
                                       status="paused", data=b"", now=T0)
            found = await store.get(key, 2, now=T0)
            listed, status = await store.headers(key, before=None, limit=10, now=T0)
            # The row says the run is empty and long expired: cleanup removes only what
            # expired by its own expiry, the row stays for the repair, and cleanup finishes.
            purged = await store.purge_expired(now=T0 + 10.5, limit=100)
            [damage] = await store.damaged_runs(now=T0 + 10.5)
            rebuilt = await store.rebuild_run(
                key, msgspec.structs.replace(run, status="paused"), now=T0 + 10.5)
            after = await _append(store, run, 3, now=T0 + 11)
    finally:
        await store.aclose()
    assert refused.value.key == f"{names['runs']} ({key})"
    assert found is not None
    assert found[0].payload == make_checkpoint(run, 2).payload
    assert found[1] == "active"
    assert ([h.sequence for h in listed], status) == ([2, 1, 0], "active")
    assert purged == (1, True)
    assert (damage.run_key, damage.checkpoints) == (key, 2)
    assert damage.newest is not None
    assert damage.newest.sequence == 2
    assert (rebuilt.latest_sequence, rebuilt.checkpoint_count, rebuilt.expires_at) == (
        2, 2, T0 + 12)
    assert (rebuilt.incarnation, rebuilt.status, rebuilt.created_at) == (
        run.incarnation, "paused", T0)
    assert after == "paused"


async def test_a_run_row_with_a_foreign_run_id_hides_no_other_run(
    postgres: PostgresTarget, schema: str
) -> None:
    """A run id that is not UTF-8 (written behind the store's back): that run reads as
    corrupt, listings and counts leave it out (logged) and still list the others, with a
    cursor."""
    names = Names(schema, "fc_")
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}")
    runs = [make_run(f"listed-{n}") for n in range(3)]
    try:
        with anyio.fail_after(30):
            for run in runs:
                await _append(store, run, 0)
            connection = await asyncpg.connect(postgres.url())
            await connection.execute(
                f"UPDATE {names['runs']} SET run_id = '\\xff'::bytea WHERE run_key = $1",
                key_of(runs[1]))
            await connection.close()
            with pytest.raises(CorruptCheckpointError, match="not UTF-8") as damaged:
                await store.get_run(key_of(runs[1]), now=T0)
            first, cursor = await store.list_runs(status=None, limit=2, cursor=None, now=T0)
            rest, end = await store.list_runs(status=None, limit=2, cursor=cursor, now=T0)
            counted = await store.count_runs(status=None, now=T0)
    finally:
        await store.aclose()
    assert key_of(runs[1]) in damaged.value.key
    assert sorted(r.run_id for r in first + rest) == ["listed-0", "listed-2"]
    assert cursor is not None
    assert end is None
    assert counted == 2


async def test_an_item_key_that_is_not_utf8_is_left_out_of_scans(
    postgres: PostgresTarget, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An item whose key is not UTF-8 (written behind the store's back) is left out of a
    scan, logged; the items around it are listed (it failed the scan with a
    UnicodeDecodeError)."""
    names = Names(schema, "fc_")
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}")
    run = make_run("scanned")
    key = key_of(run)
    try:
        with anyio.fail_after(30):
            await store.put_items(key, [Item(key="k1", value=b"1"), Item(key="k3", value=b"3")],
                                  now=T0)
            connection = await asyncpg.connect(postgres.url())
            await connection.execute(
                f"INSERT INTO {names['items']} (run_key, key, value) VALUES ($1, $2, $3)",
                key, b"k2\xff", b"2")
            await connection.close()
            with caplog.at_level(logging.WARNING, logger="fastcheckpoint.stores.postgres"):
                page = await store.scan_items(key, prefix="k", limit=10, now=T0)
                # A page the damaged row falls in is filled from past it: a short page
                # would read as the end of the listing.
                first = await store.scan_items(key, prefix="k", limit=1, now=T0)
                second = await store.scan_items(key, prefix="k", start_after="k1", limit=1,
                                                now=T0)
    finally:
        await store.aclose()
    assert page == [("k1", b"1"), ("k3", b"3")]
    assert (first, second) == ([("k1", b"1")], [("k3", b"3")])
    assert "not UTF-8" in caplog.text


async def test_a_rebuilt_row_keeps_labels_and_recounts_shared_items(
    postgres: PostgresTarget, schema: str
) -> None:
    """An older copy of a labelled run's row, with shared items named by its checkpoints, put
    back: the rebuilt row keeps the labels (the run is found by them again, newest first) and
    the reference counts follow the log, so a shared item goes with the last checkpoint that
    names it, not before."""
    names = Names(schema, "fc_")
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}")
    run = make_run("labelled")
    key = key_of(run)
    labels = ("thread:t", "app:a")
    try:
        with anyio.fail_after(30):
            await _append(store, run, 0, labels=labels, refs=["b/a"], items=[make_item("b/a")])
            connection = await asyncpg.connect(postgres.url())
            saved = await connection.fetchrow(
                f"SELECT latest_sequence, checkpoint_count, forever_count, incarnation "
                f"FROM {names['runs']} WHERE run_key = $1", key)
            await _append(store, run, 1, labels=labels, refs=["b/a", "b/b"],
                          items=[make_item("b/b")])
            await _append(store, run, 2, labels=labels, refs=["b/b"])
            await connection.execute(
                f"UPDATE {names['runs']} SET latest_sequence = $2, checkpoint_count = $3, "
                f"forever_count = $4, labels = '{{}}' WHERE run_key = $1", key, *saved[:3])
            await connection.execute(f"UPDATE {names['refs']} SET holders = 7")
            await connection.close()
            hidden, _ = await store.runs_with_label("app:a", limit=10, cursor=None, now=T0)
            rebuilt = await store.rebuild_run(key, msgspec.structs.replace(run, labels=()),
                                              now=T0 + 1)
            found, _ = await store.runs_with_label("app:a", limit=10, cursor=None, now=T0)
            assert await store.delete(key, 0, checkpoint_id=checkpoint_id_of(run, 0))
            after_first = await store.get_items(key, ["b/a", "b/b"], now=T0)
            assert await store.delete(key, 1, checkpoint_id=checkpoint_id_of(run, 1))
            after_second = await store.get_items(key, ["b/a", "b/b"], now=T0)
            assert await store.delete(key, 2, checkpoint_id=checkpoint_id_of(run, 2))
            after_last = await store.get_items(key, ["b/a", "b/b"], now=T0)
    finally:
        await store.aclose()
    assert hidden == []
    assert sorted(rebuilt.labels) == sorted(labels)
    assert (rebuilt.latest_sequence, rebuilt.checkpoint_count) == (2, 3)
    assert [record.run_id for record in found] == ["labelled"]
    assert set(after_first) == {"b/a", "b/b"}
    assert set(after_second) == {"b/b"}
    assert after_last == {}


async def test_damaged_runs_pages_through_every_run(
    postgres: PostgresTarget, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a run key, damaged_runs judges every run row, a page per call."""
    import fastcheckpoint.stores.postgres as module

    monkeypatch.setattr(module, "_REPAIR_PAGE", 2)
    names = Names(schema, "fc_")
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}")
    runs = [make_run(f"paged-{n}") for n in range(7)]
    damaged = sorted(key_of(run) for run in runs[1::3])
    try:
        with anyio.fail_after(30):
            for run in runs:
                await _append(store, run, 0)
                await _append(store, run, 1)
            connection = await asyncpg.connect(postgres.url())
            await connection.execute(
                f"UPDATE {names['runs']} SET latest_sequence = 0 WHERE run_key = ANY ($1)",
                damaged)
            await connection.close()
            found = await store.damaged_runs(now=T0)
            counted = await store.count_runs(status=None, now=T0)
    finally:
        await store.aclose()
    assert [damage.run_key for damage in found] == damaged
    assert {damage.problem for damage in found} == {
        "the run row knows sequences up to 0, but checkpoint 1 is in place (an older copy "
        "of the row was put back)"}
    assert counted == len(runs) - len(damaged)


async def test_sequence_conflicts_carry_the_live_run(postgres: PostgresTarget, schema: str) -> None:
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}")
    run = make_run("conflict")
    try:
        with anyio.fail_after(30):
            await _append(store, run, 0)
            with pytest.raises(SequenceConflict) as caught:
                await _append(store, run, 5)
    finally:
        await store.aclose()
    assert (caught.value.latest_sequence, caught.value.incarnation) == (0, run.incarnation)


# -- plans: indexes, and no locking reads in sequencing -----------------------------------


async def _plans(postgres: PostgresTarget, calls: list[tuple[str, list[Any]]]) -> list[str]:
    """The plans of every statement run inside the store's functions for ``calls``
    (auto_explain, nested statements included), sequential scans priced out."""
    plans: list[str] = []
    connection = await asyncpg.connect(postgres.url())
    try:
        with anyio.fail_after(30):
            connection.add_log_listener(lambda _, message: plans.append(message.message))
            await connection.execute(
                "LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0; "
                "SET auto_explain.log_nested_statements = on; SET client_min_messages = log; "
                "SET enable_seqscan = off")
            for sql, args in calls:
                await connection.fetch(sql, *args)
            await connection.execute("SELECT 1")  # the log messages above have arrived
    finally:
        await connection.close()
    return plans


async def test_sequencing_takes_no_locking_read(postgres: PostgresTarget, schema: str) -> None:
    """The first append, the next ones, a lost race and a retried one: no statement of the
    append locks rows with SELECT ... FOR UPDATE/SHARE (a LockRows plan node); the
    compare-and-set UPDATE and the primary key decide. (The delete does lock the run row
    that way, which shows the check sees such locks.)"""
    names = Names(schema, "fc_")
    sql = Statements(names)
    run = make_run("no-lock")
    key = key_of(run)

    def append(sequence: int, token: str) -> tuple[str, list[Any]]:
        record = make_checkpoint(run, sequence)
        return sql.append, [key, sequence, record.checkpoint_id, T0, None, record.header,
                            record.payload, None, token, b"no-lock", run.incarnation, "active",
                            T0, 0, b"", [], 2, T0, None, None, None, None]

    plans = await _plans(postgres, [
        append(0, "t0"), append(1, "t1"), append(2, "t2"), append(3, "t3"),  # pruning too
        append(2, "lost"), append(3, "t3"),
    ])
    deleting = await _plans(postgres, [
        (sql.delete, [key, 3, checkpoint_id_of(run, 3), "d"])])
    # PostgreSQL's own foreign-key check (SELECT 1 FROM ONLY ... FOR KEY SHARE) of the run
    # row is a key-share lock: it never waits for the compare-and-set UPDATE of the row.
    ours = [plan for plan in plans if "Query Text: SELECT 1 FROM ONLY" not in plan]
    assert len(ours) >= 20
    assert not [plan for plan in ours if "LockRows" in plan]
    assert [plan for plan in deleting if "LockRows" in plan]


async def test_listing_by_status_and_purging_run_on_indexes(
    postgres: PostgresTarget, schema: str
) -> None:
    """The plans of the statements inside the store's functions (auto_explain with nested
    statements), with sequential scans priced out: each names its index, so the index fits
    the query whatever the planner picks for a table this small."""
    names = Names(schema, "fc_")
    sql = Statements(names)
    plans = await _plans(postgres, [
        (sql.list_runs, ["paused", 10, math.inf, "", T0]),
        (sql.count_runs, ["paused", T0]),
        (sql.list_runs, [None, 10, math.inf, "", T0]),
        (sql.purge, [T0, 10]),
    ])

    def plan_of(query: str) -> str:
        found = [plan for plan in plans if query in plan.partition("\n")[2]]
        assert found, f"no plan for {query!r} among {len(plans)}"
        return found[0]

    runs = f"FROM {names['runs']} x"
    assert "fc_runs_status" in plan_of(f"{runs}\n         WHERE x.status = p_status AND (")
    assert "fc_runs_status" in plan_of(f"SELECT count(*) {runs}\n        LEFT JOIN LATERAL")
    assert "fc_runs_created" in plan_of(
        f"{runs}\n         WHERE (x.expires_at IS NULL OR x.expires_at > p_now)")
    assert "fc_runs_purge" in plan_of(f"{runs} WHERE x.purge_at IS NOT NULL")
    assert "fc_checkpoints_expiry" in plan_of("WHERE c.expires_at IS NOT NULL AND c.expires_at")
    assert "fc_ops_expiry" in plan_of(f"SELECT token FROM {names['ops']} WHERE expires_at")


async def test_nested_items_are_read_and_removed_by_key_range(
    postgres: PostgresTarget, schema: str
) -> None:
    """The plans inside read_with_items (latest, by sequence) and a delete that releases a
    shared item, sequential scans priced out: the items nested under a ref are one range of
    the items' primary key (both bounds in the index condition), not the run's items each
    tested against the refs."""
    names = Names(schema, "fc_")
    sql = Statements(names)
    run = make_run("nested-plans")
    key = key_of(run)
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}")
    try:
        with anyio.fail_after(30):
            await _append(store, run, 0, refs=["h/a"], items=[
                make_item("h/a"), make_item("h/a/0"), make_item("h/a.x"), make_item("h/a0")])
    finally:
        await store.aclose()
    plans = await _plans(postgres, [
        (sql.read_with_items, [key, None, T0, True]),
        (sql.read_with_items, [key, 0, T0, True]),
        (sql.delete, [key, 0, checkpoint_id_of(run, 0), "nested-plans"]),
    ])
    ranged = re.compile(r"Index Scan using fc_items_pkey on fc_items \w+ .*\n\s+Index Cond: "
                        r"\(\(run_key = .*\) AND \(key >= .*'\\x2f'::bytea\)\) AND "
                        r"\(key < .*'\\x30'::bytea\)\)\)")
    reads = [plan for plan in plans if names["items"] in plan and "w(keys, vals" in plan]
    removals = [plan for plan in plans if "USING unnest(v_zeroed)" in plan]
    assert len(reads) == 2
    assert len(removals) == 1
    assert all(ranged.search(plan) for plan in reads + removals), "\n\n".join(reads + removals)

