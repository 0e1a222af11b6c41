"""An adversarial probe of SQLiteStore: a seeded sweep of edits to one run's rows made with
plain sqlite3 (wrong types with the checks off, NULLs, truncated blobs, text that is not
UTF-8, rows deleted), each followed by one store call: every call completes or raises a
`CheckpointError`, and a write that raises leaves the database as it was (``FC_PROBE_SEEDS``
sweeps more seeds). Then the cases the sweep found, one test each, and the probes of what
held: cancellation at random instants, expiry leaving no row behind, two stores of one
process sharing a run."""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from fastcheckpoint import CheckpointConfig, CheckpointManager, _ids
from fastcheckpoint.errors import CheckpointError, CorruptCheckpointError
from fastcheckpoint.stores.sqlite import SQLiteStore
from fastcheckpoint.testing import (
    T0,
    checkpoint_id_of,
    key_of,
    make_checkpoint,
    make_item,
    make_run,
)

pytestmark = pytest.mark.anyio

_SEEDS = range(int(os.environ.get("FC_PROBE_SEEDS", "400")))
_VALUES = [
    "NULL", "'x'", "X'FFFE'", "CAST(X'FFFE' AS TEXT)", "-1", "0", "1", "2",
    "9223372036854775807", "-9223372036854775808", "1.5", "9e999", "-9e999", "''", "'\\'",
    "char(10)", "'K'", "'K' || char(10) || 'P'", "'P/1'", "X''", "1700000000.0",
    "1700000020.0", "1700001000.5", "zeroblob(3)", "'active'", "'1.5'",
]
_COLUMNS = {
    "fc_runs": ["run_id", "incarnation", "status", "created_at", "updated_at",
                "latest_sequence", "checkpoint_count", "immortal", "expires_at", "due",
                "version", "labels", "data"],
    "fc_checkpoints": ["sequence", "checkpoint_id", "created_at", "expires_at", "refs", "header",
                       "payload"],
    "fc_items": ["key", "owner", "expires_at", "value"],
    "fc_item_refs": ["key", "holders", "removed"],
    "fc_labels": ["label", "created_at", "position"],
}
_TRUNCATED = {"header": "substr(header, 1, 3)", "payload": "substr(payload, 1, 3)",
              "data": "substr(data, 1, 3)", "value": "substr(value, 1, 2)",
              "refs": "substr(refs, 1, 1)", "checkpoint_id": "substr(checkpoint_id, 1, 20)"}
_WRITES = ["append", "append_prune", "append_next", "append_new_run", "delete", "delete_run",
           "update_run", "put_items", "put_items_create", "put_owned", "put_owned_absent",
           "delete_items", "purge", "rebuild"]
_READS = ["latest", "get", "read", "read_0", "headers", "headers_all", "get_items", "get_run",
          "list_runs", "list_active", "count_runs", "with_label", "scan", "scan_nested",
          "damaged"]


async def _seed_run(store: SQLiteStore, run: Any) -> None:
    rk = key_of(run)
    seed = msgspec.structs.replace(run, labels=("l1", "l2"))
    first = msgspec.structs.replace(make_checkpoint(run, 0, expires_at=T0 + 10), refs=("K",))
    await store.append_with_items(rk, first, run=seed, keep_latest=None, now=T0,
                                  items=[make_item("K"), make_item("o0", owner=0)])
    second = msgspec.structs.replace(make_checkpoint(run, 1, expires_at=T0 + 1000),
                                     refs=("K", "P"))
    await store.append_with_items(rk, second, run=seed, keep_latest=None, now=T0,
                                  items=[make_item("P"), make_item("P/1"),
                                         make_item("o1", owner=1)])
    await store.put_items(rk, [make_item("L", expires_at=T0 + 5)], now=T0)


def _edit(database: Path, rk: str, rnd: random.Random) -> list[str]:
    done: list[str] = []
    with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as db:
        db.execute("PRAGMA ignore_check_constraints = ON")
        for _ in range(rnd.randint(1, 3)):
            table = rnd.choice(list(_COLUMNS))
            roll = rnd.random()
            if roll < 0.1:
                sql = f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} " \
                      f"WHERE run_key = ?1 ORDER BY random() LIMIT 1)"
                if table in ("fc_item_refs", "fc_labels"):  # WITHOUT ROWID
                    sql = f"DELETE FROM {table} WHERE run_key = ?1 AND key = 'K'" \
                        if table == "fc_item_refs" else \
                        f"DELETE FROM {table} WHERE run_key = ?1 AND label = 'l1'"
            else:
                column = rnd.choice(_COLUMNS[table])
                value = _TRUNCATED[column] if column in _TRUNCATED and rnd.random() < 0.3 \
                    else rnd.choice(_VALUES)
                where = {
                    "fc_checkpoints": f"sequence = {rnd.choice([0, 1])}",
                    "fc_items": f"key = '{rnd.choice(['K', 'P', 'P/1', 'o0', 'o1', 'L'])}'",
                    "fc_item_refs": f"key = '{rnd.choice(['K', 'P'])}'",
                    "fc_labels": f"label = '{rnd.choice(['l1', 'l2'])}'",
                    "fc_runs": "1",
                }[table]
                sql = f"UPDATE OR IGNORE {table} SET {column} = {value} " \
                      f"WHERE run_key = ?1 AND {where}"
            db.execute(sql, (rk,))
            done.append(sql)
    return done


def _calls(store: SQLiteStore, run: Any, now: float) -> dict[str, Callable[[], Awaitable[Any]]]:
    rk = key_of(run)
    third = msgspec.structs.replace(make_checkpoint(run, 2, expires_at=T0 + 2000), refs=("K",))
    plain = make_checkpoint(run, 2, expires_at=T0 + 2000)
    fresh = make_run(run.run_id, expires_at=T0 + 3000)
    seed = msgspec.structs.replace(run, incarnation="", status="paused", data=b"rebuilt")
    return {
        "append": lambda: store.append_with_items(
            rk, third, run=run, keep_latest=None, now=now, items=[make_item("Q")]),
        "append_prune": lambda: store.append_with_items(
            rk, third, run=run, keep_latest=1, now=now, items=[make_item("Q")]),
        "append_next": lambda: store.append_next(
            rk, plain, run=run, keep_latest=2, now=now,
            renumber=lambda sequence: make_checkpoint(run, sequence, expires_at=T0 + 2000)),
        "append_new_run": lambda: store.append(
            rk, make_checkpoint(fresh, 0, expires_at=T0 + 3000), run=fresh, keep_latest=None,
            now=now),
        "delete": lambda: store.delete(rk, 1, checkpoint_id=checkpoint_id_of(run, 1)),
        "delete_run": lambda: store.delete_run(rk),
        "update_run": lambda: store.update_run(rk, incarnation=run.incarnation, version=0,
                                               status="paused", data=b"d", now=now,
                                               latest_sequence=1),
        "put_items": lambda: store.put_items(
            rk, [make_item("K", expires_at=T0 + 3), make_item("N")], now=now),
        "put_items_create": lambda: store.put_items(
            rk, [make_item("N"), make_item("L")], create_only=True, now=now),
        "put_owned": lambda: store.put_owned_items(
            rk, [make_item("w", owner=1)], owner=1, checkpoint_id=checkpoint_id_of(run, 1),
            if_absent=False, now=now),
        "put_owned_absent": lambda: store.put_owned_items(
            rk, [make_item("o1", owner=1)], owner=1, checkpoint_id=checkpoint_id_of(run, 1),
            if_absent=True, now=now),
        "delete_items": lambda: store.delete_items(rk, ["K", "L", "P"]),
        "purge": lambda: store.purge_expired(now=now, limit=100),
        "rebuild": lambda: store.rebuild_run(rk, seed, now=now),
        "latest": lambda: store.latest(rk, now=now),
        "get": lambda: store.get(rk, 1, now=now),
        "read": lambda: store.read_with_items(rk, sequence=None, now=now),
        "read_0": lambda: store.read_with_items(rk, sequence=0, now=now),
        "headers": lambda: store.headers(rk, before=None, limit=10, now=now),
        "headers_all": lambda: store.headers(rk, before=None, limit=1, now=now,
                                             include_expired=True),
        "get_items": lambda: store.get_items(rk, ["K", "P", "L", "zz"], now=now),
        "get_run": lambda: store.get_run(rk, now=now),
        "list_runs": lambda: store.list_runs(status=None, limit=10, cursor=None, now=now),
        "list_active": lambda: store.list_runs(status="active", limit=1, cursor=None, now=now),
        "count_runs": lambda: store.count_runs(status="active", now=now),
        "with_label": lambda: store.runs_with_label("l1", limit=10, cursor=None, now=now),
        "scan": lambda: store.scan_items(rk, limit=2, now=now),
        "scan_nested": lambda: store.scan_items(rk, prefix="P", reverse=True, now=now),
        "damaged": lambda: store.damaged_runs(now=now),
    }


def _dump(database: Path) -> list[Any]:
    with contextlib.closing(sqlite3.connect(database)) as db:
        db.text_factory = bytes
        return [db.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
                for table in _COLUMNS]


async def test_no_call_fails_halfway_or_raises_a_foreign_error_after_edits(
    tmp_path: Path, anyio_backend: str,
) -> None:
    halfway: list[tuple[int, str, str]] = []
    foreign: list[tuple[int, str, str, list[str]]] = []
    if anyio_backend != "asyncio":
        pytest.skip("the sweep runs once; every call is one thread hop on either loop")
    database = tmp_path / "sweep.db"
    store = SQLiteStore(database, synchronous="normal")
    with anyio.fail_after(60 + len(_SEEDS) / 4):
        for seed in _SEEDS:
            rnd = random.Random(seed)
            run = make_run(f"sweep-{seed}")
            await _seed_run(store, run)
            edits = await anyio.to_thread.run_sync(_edit, database, key_of(run), rnd)
            operation = rnd.choice([*_WRITES, *_READS])
            now = rnd.choice([T0, T0 + 20, T0 + 5000])
            before = await anyio.to_thread.run_sync(_dump, database)
            try:
                await _calls(store, run, now)[operation]()
            except CheckpointError as exc:
                if operation in _WRITES and await anyio.to_thread.run_sync(
                        _dump, database) != before:
                    halfway.append((seed, operation, str(exc)[:120]))
            except Exception as exc:  # what the probe looks for
                foreign.append((seed, operation, repr(exc)[:160], edits))
            await store.delete_run(key_of(run))  # removes the run whole, damaged or not
            leftover = await anyio.to_thread.run_sync(_dump, database)
            assert leftover == [[]] * len(_COLUMNS), (seed, operation, edits)
        await store.aclose()
    assert foreign == []
    assert halfway == []


# -- what the sweep found: rows of another type read inside write transactions --------------


def _unchecked(database: Path, sql: str, *parameters: Any) -> None:
    """A statement with the schema's checks off, as a foreign tool may run it."""
    with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as db:
        db.execute("PRAGMA ignore_check_constraints = ON")
        db.execute(sql, parameters)


async def _two_checkpoints(store: SQLiteStore, name: str) -> Any:
    run = make_run(name, expires_at=T0 + 100)
    for sequence in range(2):
        await store.append(key_of(run), make_checkpoint(run, sequence, expires_at=T0 + 100),
                           run=run, keep_latest=None, now=T0)
    return run


_NEWEST_DAMAGE = {
    "sequence text": "sequence = 'x'",
    "sequence blob": "sequence = X'FFFE'",
    "expiry text": "expires_at = 'soon'",
    "expiry blob": "expires_at = X''",
}


@pytest.mark.parametrize("damage", list(_NEWEST_DAMAGE))
async def test_a_create_after_a_newest_checkpoint_row_of_another_type_is_corrupt(
    tmp_path: Path, damage: str,
) -> None:
    """The newest checkpoint row holds a sequence or an expiry of another type (written with
    the checks off): the create refuses with `CorruptCheckpointError` naming the checkpoint
    row, and writes nothing (it raised `TypeError` comparing it with the run row)."""
    store = SQLiteStore(tmp_path / "checkpoints.db")
    with anyio.fail_after(30):
        run = await _two_checkpoints(store, "typed newest")
        key = key_of(run)
        await anyio.to_thread.run_sync(
            _unchecked, store.path, f"UPDATE fc_checkpoints SET {_NEWEST_DAMAGE[damage]} "
            "WHERE run_key = ? AND sequence = 1", key)
        before = await anyio.to_thread.run_sync(_dump, store.path)
        for proposed in (make_checkpoint(run, 2, expires_at=T0 + 100),
                         make_checkpoint(run, 0, expires_at=T0 + 100)):
            with pytest.raises(CorruptCheckpointError, match="another type") as caught:
                await store.append(key, proposed, run=run, keep_latest=1, now=T0)
            assert caught.value.key.startswith(f"{store.path}#fc_checkpoints/{key}/")
        with pytest.raises(CorruptCheckpointError, match="another type"):
            await store.append(key, make_checkpoint(run, 2, expires_at=T0 + 100), run=run,
                               keep_latest=None, now=T0 + 200)  # the run expired
        after = await anyio.to_thread.run_sync(_dump, store.path)
        await store.aclose()
    assert after == before


@pytest.mark.parametrize("damage", list(_NEWEST_DAMAGE))
async def test_repair_past_a_newest_checkpoint_row_of_another_type_goes_on_with_other_runs(
    tmp_path: Path, damage: str,
) -> None:
    """``damaged_runs`` met the row with `TypeError`, which ended the repair of every run: now
    the run is reported, its repair is `unrecoverable` naming the checkpoint row, and another
    run whose row was deleted is still rebuilt."""
    store = SQLiteStore(tmp_path / "checkpoints.db")
    manager = CheckpointManager(store, CheckpointConfig(clock=lambda: T0))
    typed, lost = _ids.run_key("typed"), _ids.run_key("lost row")
    with anyio.fail_after(30):
        for run_id in ("typed", "lost row"):
            for step in range(2):
                assert await manager.create(run_id, {"step": step}) is not None
        await anyio.to_thread.run_sync(
            _unchecked, store.path, f"UPDATE fc_checkpoints SET {_NEWEST_DAMAGE[damage]} "
            "WHERE run_key = ? AND sequence = 1", typed)
        await anyio.to_thread.run_sync(
            _unchecked, store.path, "DELETE FROM fc_runs WHERE run_key = ?", lost)
        found = {damage.run_key for damage in await store.damaged_runs(now=T0)}
        reports = {report.key: report for report in await manager.repair()}
        await store.aclose()
    assert found == {typed, lost}
    assert reports[f"{store.path}#fc_runs/{lost}"].outcome == "rebuilt"
    stuck = reports[f"{store.path}#fc_runs/{typed}"]
    assert stuck.outcome == "unrecoverable"
    assert "another type" in (stuck.detail or "")


@pytest.mark.parametrize("column", ["c.expires_at", "r.expires_at"])
async def test_put_owned_items_beside_an_expiry_of_another_type_is_corrupt(
    tmp_path: Path, column: str,
) -> None:
    """The owner checkpoint's or its run's expiry holds a blob: `put_owned_items` raised
    `TypeError` comparing it with now; now `CorruptCheckpointError`, nothing written."""
    store = SQLiteStore(tmp_path / "checkpoints.db")
    with anyio.fail_after(30):
        run = await _two_checkpoints(store, "owned")
        key = key_of(run)
        table, where = ("fc_checkpoints", "AND sequence = 1") if column[0] == "c" else (
            "fc_runs", "")
        await anyio.to_thread.run_sync(
            _unchecked, store.path,
            f"UPDATE {table} SET expires_at = X'00' WHERE run_key = ? {where}", key)
        before = await anyio.to_thread.run_sync(_dump, store.path)
        with pytest.raises(CorruptCheckpointError, match="another type"):
            await store.put_owned_items(key, [make_item("w", owner=1)], owner=1,
                                        checkpoint_id=checkpoint_id_of(run, 1),
                                        if_absent=False, now=T0)
        after = await anyio.to_thread.run_sync(_dump, store.path)
        await store.aclose()
    assert after == before


@pytest.mark.parametrize("damage", ["expires_at = 'later'", "checkpoint_count = 'x'",
                                    "immortal = 1.5", "expires_at = X'00'"])
async def test_the_cleanup_leaves_a_due_run_row_of_another_type_and_cleans_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str,
) -> None:
    """A due run row whose expiry or counts hold values of another type failed every cleanup
    batch of the store with `TypeError`: now that run is left alone (logged, not visited
    again until repaired) and the other expired runs go."""
    store = SQLiteStore(tmp_path / "checkpoints.db")
    with anyio.fail_after(30):
        bad = await _two_checkpoints(store, "bad row")
        await _two_checkpoints(store, "good row")
        await anyio.to_thread.run_sync(
            _unchecked, store.path, f"UPDATE fc_runs SET {damage} WHERE run_key = ?",
            key_of(bad))
        first = await store.purge_expired(now=T0 + 200, limit=100)
        second = await store.purge_expired(now=T0 + 200, limit=100)
        left = await anyio.to_thread.run_sync(_dump, store.path)
        await store.aclose()
    assert first == (2, True)
    assert second == (0, True)
    assert {row[0] for row in left[1]} == {key_of(bad).encode()}  # fc_checkpoints
    assert "another type" in caplog.text


async def test_the_cleanup_of_a_live_run_past_a_checkpoint_expiry_of_another_type(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A live run's checkpoint holds an expiry of text (checks off): the run's expiry taken
    from its checkpoints was that text, which the run row's CHECK refused, so the cleanup
    batch (and with it every later one) and a create that pruned failed with `StoreError`.
    Now the expiry comes from the other checkpoints; the other runs' cleanup goes on."""
    store = SQLiteStore(tmp_path / "checkpoints.db")
    with anyio.fail_after(30):
        run = make_run("text expiry", expires_at=T0 + 1000)
        key = key_of(run)
        for sequence, expires_at in enumerate([T0 + 10, T0 + 1000, T0 + 1000]):
            await store.append(key, make_checkpoint(run, sequence, expires_at=expires_at),
                               run=run, keep_latest=None, now=T0)
        other = await _two_checkpoints(store, "other")
        await anyio.to_thread.run_sync(
            _unchecked, store.path, "UPDATE fc_checkpoints SET expires_at = 'later' "
            "WHERE run_key = ? AND sequence = 1", key)
        purged = await store.purge_expired(now=T0 + 200, limit=100)
        record = await store.get_run(key, now=T0 + 200)
        created = await store.append(key, make_checkpoint(run, 3, expires_at=T0 + 1000),
                                     run=run, keep_latest=1, now=T0 + 200)
        left = await anyio.to_thread.run_sync(_dump, store.path)
        await store.aclose()
    assert purged == (3, True)  # checkpoint 0 of the run, and the expired other run whole
    assert record is not None
    assert record.expires_at == T0 + 1000
    assert created == "active"
    assert [row[1] for row in left[1]] == [3]
    assert key_of(other).encode() not in {row[0] for row in left[0]}
    assert "expiry of another type" in caplog.text
