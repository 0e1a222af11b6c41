"""SQLite rows damaged or copied behind the store's back, with plain sqlite3: a run row copied
over from another run, a checkpoint of another run swapped in, ids edited by hand, rows of the
wrong type. Such a row is damage: writers refuse it, listings skip it, ``damaged_runs``
reports it and a repair rebuilds the run from its own checkpoints; it never attributes one
run's data to another, nor stops the repair or the cleanup of the other runs."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from fastcheckpoint import CheckpointConfig, CheckpointManager, CheckpointMetadata, _ids
from fastcheckpoint.errors import CheckpointError, CorruptCheckpointError
from fastcheckpoint.stores.sqlite import SQLiteStore
from fastcheckpoint.testing import T0

pytestmark = pytest.mark.anyio

DEADLINE = 30.0
_RUN_COLUMNS = (
    "run_id, incarnation, status, created_at, updated_at, latest_sequence, checkpoint_count, "
    "immortal, expires_at, due, version, labels, data"
)
_CHECKPOINT_COLUMNS = "checkpoint_id, created_at, expires_at, refs, header, payload"


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "store" / "checkpoints.db"


@pytest.fixture
async def store(database: Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(database)
    yield store
    with anyio.fail_after(10):
        await store.aclose()


@pytest.fixture
def manager(store: SQLiteStore) -> CheckpointManager:
    return CheckpointManager(store, CheckpointConfig(clock=lambda: T0))


def _key(run_id: str) -> str:
    return _ids.run_key(run_id)


async def _sql(database: Path, sql: str, *parameters: Any) -> list[tuple[Any, ...]]:
    """A statement on a connection of its own, as an operator's tool would run it."""

    def run() -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(database)) as db, db:
            return db.execute(sql, parameters).fetchall()

    return await anyio.to_thread.run_sync(run)


async def _copy_run_row(database: Path, source: str, target: str) -> None:
    await _sql(database, f"UPDATE fc_runs SET ({_RUN_COLUMNS}) = (SELECT {_RUN_COLUMNS} FROM "
               "fc_runs WHERE run_key = ?) WHERE run_key = ?", _key(source), _key(target))


async def _incarnation(database: Path, run_id: str) -> str:
    [(incarnation,)] = await _sql(
        database, "SELECT incarnation FROM fc_runs WHERE run_key = ?", _key(run_id))
    return str(incarnation)


async def _create(
    manager: CheckpointManager, run_id: str, state: Any, **options: Any
) -> CheckpointMetadata:
    created = await manager.create(run_id, state, **options)
    assert created is not None
    return created.metadata


# -- a run row copied over from another run ---------------------------------------------------


async def test_a_run_row_copied_over_from_another_run_is_damage_that_repair_rebuilds(
    store: SQLiteStore, manager: CheckpointManager, database: Path,
) -> None:
    """B's row copied over A (which holds checkpoints) and over C (which holds none): neither
    is listed as B, no create of A or C lands under B's incarnation, both are reported, A is
    rebuilt with its own incarnation; C, with nothing to rebuild from, is reported
    unrecoverable and starts afresh once deleted."""
    with anyio.fail_after(DEADLINE):
        for step in range(2):
            await _create(manager, "A", {"a": step})
        for step in range(3):
            await _create(manager, "B", {"b": step})
        only = await _create(manager, "C", {"c": 0})
        await manager.delete(only.checkpoint_id)
        own = await _incarnation(database, "A")
        for target in ("A", "C"):
            await _copy_run_row(database, "B", target)

        listed = await manager.list_runs()
        damages = await store.damaged_runs(now=T0)
        for run_id in ("A", "C"):
            with pytest.raises(CorruptCheckpointError, match="names another run") as caught:
                await _create(manager, run_id, {"late": True})
            assert caught.value.key == f"{database}#fc_runs/{_key(run_id)}"
            with pytest.raises(CorruptCheckpointError, match="names another run"):
                await store.update_run(_key(run_id), incarnation=await _incarnation(
                    database, "B"), version=0, status="completed", data=b"", now=T0)
        reports = {report.run_id: report for report in await manager.repair()}
        rebuilt = await _incarnation(database, "A")
        created = await _create(manager, "A", {"a": 2})
        await manager.delete_run("C")
        started = await _create(manager, "C", {"c": 1})
        after = await manager.list_runs()

    assert [run.run_id for run in listed.runs] == ["B"]
    assert {(damage.run_key, damage.checkpoints) for damage in damages} == {
        (_key("A"), 2), (_key("C"), 0)}
    assert all("names another run ('B')" in damage.problem for damage in damages)
    assert reports["A"].outcome == "rebuilt"
    assert reports[None].outcome == "unrecoverable"
    assert reports[None].key == f"{database}#fc_runs/{_key('C')}"
    assert rebuilt == own
    assert created.checkpoint_id == _ids.checkpoint_id(_key("A"), own, 2)
    assert started.sequence == 0
    assert sorted(run.run_id for run in after.runs) == ["A", "B", "C"]
    assert await store.damaged_runs(now=T0) == []


# -- checkpoint ids of another run ------------------------------------------------------------


async def test_a_rebuild_takes_the_incarnation_of_the_runs_own_newest_checkpoint(
    store: SQLiteStore, manager: CheckpointManager, database: Path,
) -> None:
    """A's newest checkpoint id edited to B's, and A's row lost: the rebuilt row is of A's
    incarnation, not B's, and the next create follows the newest sequence in place."""
    with anyio.fail_after(DEADLINE):
        for step in range(2):
            await _create(manager, "A", {"a": step})
            await _create(manager, "B", {"b": step})
        own = await _incarnation(database, "A")
        [(b_id,)] = await _sql(database, "SELECT checkpoint_id FROM fc_checkpoints "
                               "WHERE run_key = ? AND sequence = 1", _key("B"))
        await _sql(database, "UPDATE fc_checkpoints SET checkpoint_id = ? WHERE run_key = ? "
                   "AND sequence = 1", b_id, _key("A"))
        await _sql(database, "DELETE FROM fc_runs WHERE run_key = ?", _key("A"))

        [damage] = await store.damaged_runs(now=T0)
        [report] = await manager.repair()
        rebuilt = await _incarnation(database, "A")
        created = await _create(manager, "A", {"a": 2})

    assert damage.newest is not None
    assert damage.newest.checkpoint_id == _ids.checkpoint_id(_key("A"), own, 0)
    assert (report.run_id, report.outcome) == ("A", "rebuilt")
    assert rebuilt == own
    assert created.checkpoint_id == _ids.checkpoint_id(_key("A"), own, 2)


_SWAP = (
    f"UPDATE fc_checkpoints SET ({_CHECKPOINT_COLUMNS}) = (SELECT {_CHECKPOINT_COLUMNS} FROM "
    "fc_checkpoints WHERE run_key = ?1 AND sequence = 1) WHERE run_key = ?2 AND sequence = 1"
)


async def test_a_checkpoint_of_another_run_swapped_in_leaves_the_run_writable(
    store: SQLiteStore, manager: CheckpointManager, database: Path,
) -> None:
    """B's newest checkpoint swapped in over A's: it is damage of its own (reads of it
    refuse), never a contradiction of A's row, so creates go on from A's own checkpoints."""
    with anyio.fail_after(DEADLINE):
        for step in range(2):
            await _create(manager, "A", {"a": step})
            await _create(manager, "B", {"b": step})
        own = await _incarnation(database, "A")
        await _sql(database, _SWAP, _key("B"), _key("A"))

        damages = await store.damaged_runs(now=T0)
        created = await _create(manager, "A", {"a": 2})
        await manager.mark_completed("A")
        first = await manager.restore_from(_ids.checkpoint_id(_key("A"), own, 0))

    assert damages == []
    assert created.checkpoint_id == _ids.checkpoint_id(_key("A"), own, 2)
    assert first is not None
    assert first.state == {"a": 0}


async def test_a_run_whose_newest_checkpoint_is_another_runs_is_rebuilt_from_its_own(
    store: SQLiteStore, manager: CheckpointManager, database: Path,
) -> None:
    """The swap of the test above and A's row lost: the damage names A's own newest
    checkpoint (the manager reads the run id from it), and the repair lets A go on."""
    with anyio.fail_after(DEADLINE):
        for step in range(2):
            await _create(manager, "A", {"a": step})
            await _create(manager, "B", {"b": step})
        own = await _incarnation(database, "A")
        await _sql(database, _SWAP, _key("B"), _key("A"))
        await _sql(database, "DELETE FROM fc_runs WHERE run_key = ?", _key("A"))

        [damage] = await store.damaged_runs(now=T0)
        [report] = await manager.repair()
        created = await _create(manager, "A", {"a": 2})

    assert damage.newest is not None
    assert damage.newest.sequence == 0
    assert (report.run_id, report.outcome, report.checkpoints) == ("A", "rebuilt", 2)
    assert created.checkpoint_id == _ids.checkpoint_id(_key("A"), own, 2)


# -- rows of types the tables do not check ----------------------------------------------------


async def test_a_reference_count_whose_key_is_not_text_blocks_no_cleanup_and_no_delete(
    database: Path,
) -> None:
    """``fc_item_refs`` does not check its key's type: a BLOB key written by hand, met when a
    removal counts the run's references again, is removed with a warning instead of raising
    ``TypeError`` (which rolled back every cleanup batch: no run of the store expired)."""
    clock = [T0]
    store = SQLiteStore(database)
    manager = CheckpointManager(store, CheckpointConfig(clock=lambda: clock[0]))
    with anyio.fail_after(DEADLINE):
        kept = await _create(manager, "bad", {"x": 0})
        await _create(manager, "bad", {"x": 1}, ttl_seconds=10)
        for run_id in ("ok1", "ok2"):
            await _create(manager, run_id, {"x": 0}, ttl_seconds=10)
        await _sql(database, "INSERT INTO fc_item_refs (run_key, key, holders) "
                   "VALUES (?, CAST('k' AS BLOB), 1)",
                   _key("bad"))
        # Refs unknown (NULL): removing such a checkpoint counts the run's references again.
        await _sql(database, "UPDATE fc_checkpoints SET refs = NULL WHERE run_key = ?",
                   _key("bad"))
        clock[0] += 100
        purged = await manager.cleanup_expired()
        left = await _sql(database, "SELECT run_key, sequence FROM fc_checkpoints")
        counts = await _sql(database, "SELECT key FROM fc_item_refs")
        deleted = await manager.delete(kept.checkpoint_id)
        await store.aclose()
    assert purged == 3
    assert left == [(_key("bad"), 0)]
    assert counts == []
    assert deleted


async def test_a_label_row_that_is_not_text_fails_neither_the_rebuild_nor_the_other_repairs(
    store: SQLiteStore, manager: CheckpointManager, database: Path,
) -> None:
    """``fc_labels`` does not check its types: a BLOB label written by hand is left out of
    the rebuilt row (logged) instead of failing the rebuild with ``ValidationError``, which
    stopped the repair of every run of the store."""
    with anyio.fail_after(DEADLINE):
        for run_id in ("labelled", "other"):
            await _create(manager, run_id, {"x": 0})
        key = _key("labelled")
        await _sql(database, "INSERT INTO fc_labels VALUES (?, 'alpha', ?, 0)", key, T0)
        await _sql(database, "INSERT INTO fc_labels VALUES (?, CAST('beta' AS BLOB), ?, 1)",
                   key, T0)
        for run_id in ("labelled", "other"):
            await _sql(database, "DELETE FROM fc_runs WHERE run_key = ?", _key(run_id))
        reports = await manager.repair()
        rebuilt = await store.get_run(key, now=T0)
    assert sorted((report.run_id, report.outcome) for report in reports) == [
        ("labelled", "rebuilt"), ("other", "rebuilt")]
    assert rebuilt is not None
    assert rebuilt.labels == ("alpha",)


# -- values no run reaches --------------------------------------------------------------------


@pytest.mark.parametrize(("column", "value", "problem"), [
    ("latest_sequence", 2**63 - 1, "leaves no sequence"),
    ("created_at", float("inf"), "is not finite"),
    ("created_at", float("-inf"), "is not finite"),
    ("version", 2**63 - 1, "leaves no version"),
])
async def test_a_run_row_edited_beyond_what_a_run_reaches_is_damage_that_repair_rebuilds(
    store: SQLiteStore, manager: CheckpointManager, database: Path, column: str, value: object,
    problem: str,
) -> None:
    """A latest sequence or a version at the 64-bit limit stops the run (no create or status
    change can follow); an infinite creation time hides it from listings. ``damaged_runs``
    reports them, and the repair rebuilds the row from the checkpoints."""
    with anyio.fail_after(DEADLINE):
        for step in range(2):
            await _create(manager, "edited", {"x": step})
        await _create(manager, "other", {"x": 0})
        await _sql(database, f"UPDATE fc_runs SET {column} = ? WHERE run_key = ?", value,
                   _key("edited"))
        [damage] = await store.damaged_runs(now=T0)
        [report] = await manager.repair()
        created = await _create(manager, "edited", {"x": 2})
        completed = await manager.mark_completed("edited")
        listed = await manager.list_runs()
    assert damage.run_key == _key("edited")
    assert problem in damage.problem
    assert (report.run_id, report.outcome) == ("edited", "rebuilt")
    assert created.sequence == 2
    assert completed is not None
    assert sorted(run.run_id for run in listed.runs) == ["edited", "other"]


_WRONG_TYPES = [
    ("fc_runs", "latest_sequence", "'x'"), ("fc_runs", "checkpoint_count", "'x'"),
    ("fc_runs", "immortal", "'x'"), ("fc_runs", "expires_at", "'x'"),
    ("fc_runs", "created_at", "'x'"), ("fc_runs", "version", "'x'"),
    ("fc_runs", "data", "'text'"), ("fc_runs", "status", "X'ff'"),
    ("fc_runs", "run_id", "X'41'"), ("fc_runs", "incarnation", "42"),
    ("fc_runs", "labels", "X'00'"), ("fc_runs", "due", "'x'"),
    ("fc_checkpoints", "checkpoint_id", "X'41'"), ("fc_checkpoints", "created_at", "'x'"),
    ("fc_checkpoints", "expires_at", "'x'"), ("fc_checkpoints", "refs", "X'41'"),
    ("fc_checkpoints", "header", "'text'"), ("fc_checkpoints", "payload", "'text'"),
]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # rows of SQLite, not of the loop
@pytest.mark.parametrize(("table", "column", "value"), _WRONG_TYPES)
async def test_a_row_of_the_wrong_type_raises_only_checkpoint_errors_and_is_reported(
    store: SQLiteStore, manager: CheckpointManager, database: Path, table: str, column: str,
    value: str,
) -> None:
    """Every column is typed by a ``CHECK``; a row written with the checks off (``PRAGMA
    ignore_check_constraints``) is damage: the run's calls raise ``CorruptCheckpointError``
    or work, never ``TypeError``; listings skip the row and keep the other runs; a damaged
    run row is reported."""
    with anyio.fail_after(DEADLINE):
        for step in range(2):
            await _create(manager, "A", {"a": step})
        await _create(manager, "B", {"b": 0})

        def damage() -> None:
            with contextlib.closing(sqlite3.connect(database)) as db, db:
                db.execute("PRAGMA ignore_check_constraints = ON")
                where = " AND sequence = 1" if table == "fc_checkpoints" else ""
                db.execute(f"UPDATE {table} SET {column} = {value} WHERE run_key = ?{where}",
                           (_key("A"),))

        await anyio.to_thread.run_sync(damage)
        damages = await store.damaged_runs(now=T0)
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "restore": lambda: manager.restore("A"),
            "list_checkpoints": lambda: manager.list_checkpoints("A"),
            "get_run": lambda: manager.get_run("A"),
            "create": lambda: manager.create("A", {"a": 9}),
            "mark_completed": lambda: manager.mark_completed("A"),
            "count_runs": manager.count_runs,
            "repair": manager.repair,
            "prune": lambda: manager.prune("A", 1),
            "cleanup": manager.cleanup_expired,
        }
        for name, call in calls.items():
            with contextlib.suppress(CheckpointError):
                await call()
            listed = await manager.list_runs()
            assert "B" in [run.run_id for run in listed.runs], name
    if table == "fc_runs":
        assert [damage.run_key for damage in damages] == [_key("A")]


async def test_a_listing_pages_past_rows_whose_creation_time_was_edited_to_minus_infinity(
    store: SQLiteStore, manager: CheckpointManager, database: Path,
) -> None:
    """A page that ends on such a row hands out a cursor naming -inf: the next page must be
    read from it, not refused as malformed."""
    with anyio.fail_after(DEADLINE):
        for run_id in ("a", "b", "c"):
            await _create(manager, run_id, {"x": 0})
        for run_id in ("a", "b"):
            await _sql(database, "UPDATE fc_runs SET created_at = ? WHERE run_key = ?",
                       float("-inf"), _key(run_id))
        listed: list[str] = []
        cursor: str | None = None
        for _ in range(5):
            page = await manager.list_runs(limit=1, cursor=cursor)
            listed += [run.run_id for run in page.runs]
            cursor = page.next_cursor
            if cursor is None:
                break
        damages = await store.damaged_runs(now=T0)
    assert sorted(listed) == ["a", "b", "c"]
    assert sorted(damage.run_key for damage in damages) == sorted([_key("a"), _key("b")])
