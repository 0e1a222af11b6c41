"""SQLite: an item row a checkpoint's refs name, deleted by hand (plain sqlite3), is damage:
``read_with_items`` raises ``CorruptCheckpointError`` naming it. What the store removes itself
while a checkpoint names the key (an owned item with its owner, ``delete_items``) keeps reading
as absent: the protocol says those reads lack it. The store tells them apart by the removals it
records on the key's reference count (schema version 2), which go with the count."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio
import pytest

from fastcheckpoint.errors import CorruptCheckpointError
from fastcheckpoint.stores import _sqlite_schema as schema
from fastcheckpoint.stores._base import RunRecord
from fastcheckpoint.stores.sqlite import SQLiteStore
from fastcheckpoint.testing import T0, checkpoint_id_of, key_of, make_item, make_run
from fastcheckpoint.testing._adapter import _append_items
from tests.stores._named_removals import remove_while_named

pytestmark = pytest.mark.anyio

_DEADLINE = 10


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _delete_row(database: Path, key: str) -> None:
    with sqlite3.connect(database) as db:
        assert db.execute("DELETE FROM fc_items WHERE key = ?", (key,)).rowcount == 1
    db.close()


def _counts(database: Path) -> list[tuple[str, int, int]]:
    """Every reference count: ``(key, holders, removed)``."""
    with sqlite3.connect(database) as db:
        rows = db.execute("SELECT key, holders, removed FROM fc_item_refs ORDER BY key").fetchall()
    db.close()
    return [(str(key), int(holders), int(removed)) for key, holders, removed in rows]


class _ReadWithoutItem(Exception):
    """The checkpoint came back without an item its refs name."""


async def _read_whole(store: SQLiteStore, run: RunRecord) -> None:
    found = await store.read_with_items(key_of(run), sequence=0, now=T0)
    raise _ReadWithoutItem(f"read without the item: {found and found[2]}")


async def test_a_read_naming_an_item_row_deleted_by_hand_raises(tmp_path: Path) -> None:
    database = tmp_path / "checkpoints.db"
    store = SQLiteStore(database)
    run = make_run("row-deleted")
    try:
        with anyio.fail_after(_DEADLINE):
            await _append_items(store, run, 0, refs=["b/a", "b/b"],
                                items=[make_item("b/a"), make_item("b/b")])
            _delete_row(database, "b/a")
            with pytest.raises(CorruptCheckpointError, match="b/a"):
                await _read_whole(store, run)
    finally:
        await store.aclose()


async def test_named_items_the_store_removed_read_as_absent(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "checkpoints.db")
    run = make_run("removed-while-named")
    key = key_of(run)
    try:
        with anyio.fail_after(_DEADLINE):
            await remove_while_named(store, run, removed=["b/a"])
            found = await store.read_with_items(key, sequence=1, now=T0)
    finally:
        await store.aclose()
    assert found is not None
    assert found[2] == {"b/b": b"value-b/b"}


async def test_removal_records_go_with_the_last_checkpoint_naming_the_key(tmp_path: Path) -> None:
    """A removal is recorded while a checkpoint names the key and goes with its count (the
    pruning of the last checkpoint naming it): a value written at the key later, named by a
    new checkpoint and deleted by hand, is damage again; ``delete_run`` takes every record of
    the run."""
    database = tmp_path / "checkpoints.db"
    store = SQLiteStore(database)
    run = make_run("records-go")
    key = key_of(run)
    try:
        with anyio.fail_after(_DEADLINE):
            await remove_while_named(store, run, removed=["b/a", "b/a", "never"])
            recorded = _counts(database)
            await _append_items(store, run, 2, refs=["b/b"], keep_latest=1)
            pruned = _counts(database)
            await _append_items(store, run, 3, refs=["b/b", "b/a"], items=[make_item("b/a")])
            _delete_row(database, "b/a")
            with pytest.raises(CorruptCheckpointError, match="b/a"):
                await store.read_with_items(key, sequence=3, now=T0)
            assert await store.delete_run(key) == 2
    finally:
        await store.aclose()
    assert recorded == [("b/a", 1, 1), ("b/b", 1, 0), ("o", 1, 1)]
    assert pruned == [("b/b", 1, 0)]
    assert _counts(database) == []


async def test_a_version_1_database_keeps_reading_what_the_store_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An owned item removed with its owner and an item removed by ``delete_items`` at schema
    version 1, while a checkpoint named them, left no record: upgraded by ``provision`` (what
    ``fastcheckpoint init`` runs), the database reads them as absent, as before; an item row
    deleted by hand after the upgrade is damage."""
    database = tmp_path / "checkpoints.db"
    run = make_run("from-v1")
    key = key_of(run)
    with monkeypatch.context() as at_v1:
        at_v1.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:1])
        at_v1.setattr(schema, "SCHEMA_VERSION", 1)
        old = SQLiteStore(database)
        try:
            with anyio.fail_after(_DEADLINE):
                await remove_while_named(old, run, removed=[])
        finally:
            await old.aclose()
    _delete_row(database, "b/a")  # what delete_items did at version 1
    store = SQLiteStore(database)
    try:
        with anyio.fail_after(_DEADLINE):
            done = await store.provision()
            found = await store.read_with_items(key, sequence=1, now=T0)
            _delete_row(database, "b/b")
            with pytest.raises(CorruptCheckpointError, match="b/b"):
                await store.read_with_items(key, sequence=None, now=T0)
    finally:
        await store.aclose()
    assert done[0] == f"upgraded schema of {database} from version 1 to {schema.SCHEMA_VERSION}"
    assert found is not None
    assert found[2] == {"b/b": b"value-b/b"}
    assert _counts(database) == [("b/a", 1, 1), ("b/b", 1, 0), ("o", 1, 1)]


async def test_counts_taken_again_keep_the_removals_recorded(tmp_path: Path) -> None:
    """Removing a checkpoint whose refs are unknown (NULL) takes the run's counts again: the
    removals recorded stay, and a count written anew for a key that had lost its count row
    takes a missing item for a removal (``b/a``) and records none for one in place (``b/b``)."""
    database = tmp_path / "checkpoints.db"
    store = SQLiteStore(database)
    run = make_run("recounted")
    key = key_of(run)
    try:
        with anyio.fail_after(_DEADLINE):
            await remove_while_named(store, run, removed=["b/a"])
            await _append_items(store, run, 2)
            with sqlite3.connect(database) as db:
                db.execute("DELETE FROM fc_item_refs WHERE key IN ('b/a', 'b/b')")
                db.execute("UPDATE fc_checkpoints SET refs = NULL WHERE sequence = 2")
            db.close()
            assert await store.delete(key, 2, checkpoint_id=checkpoint_id_of(run, 2))
            found = await store.read_with_items(key, sequence=1, now=T0)
    finally:
        await store.aclose()
    assert found is not None
    assert found[2] == {"b/b": b"value-b/b"}
    assert _counts(database) == [("b/a", 1, 1), ("b/b", 1, 0), ("o", 1, 1)]


def _upgraded_from_version_1(database: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database made at schema version 1, then upgraded by ``provision``."""
    with monkeypatch.context() as at_v1:
        at_v1.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:1])
        at_v1.setattr(schema, "SCHEMA_VERSION", 1)
        with sqlite3.connect(database, isolation_level=None) as db:
            schema.provision(db, str(database), upgrade=False)
        db.close()
    with sqlite3.connect(database, isolation_level=None) as db:
        schema.provision(db, str(database), upgrade=True)
    db.close()


@pytest.mark.parametrize("made", ["fresh", "upgraded from version 1"])
@pytest.mark.parametrize("value", ["'x'", "7", "-1", "0.5", "X'01'", "NULL"])
async def test_a_removal_record_that_is_not_0_or_1_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, made: str, value: str
) -> None:
    """``removed`` is typed by a ``CHECK`` like every other column: a value other than the
    integers 0 and 1 written by hand is refused by SQLite, in a new database and in one
    upgraded from version 1."""
    database = tmp_path / "checkpoints.db"
    if made == "fresh":
        with sqlite3.connect(database, isolation_level=None) as db:
            schema.provision(db, str(database), upgrade=False)
        db.close()
    else:
        _upgraded_from_version_1(database, monkeypatch)
    with sqlite3.connect(database) as db:
        db.execute("INSERT INTO fc_item_refs (run_key, key, holders) VALUES ('r', 'k', 1)")
        with pytest.raises(sqlite3.IntegrityError):
            db.execute(f"UPDATE fc_item_refs SET removed = {value}")
        with pytest.raises(sqlite3.IntegrityError):
            db.execute("INSERT INTO fc_item_refs (run_key, key, holders, removed) "
                       f"VALUES ('r', 'k2', 1, {value})")
        kept = db.execute("SELECT removed, typeof(removed) FROM fc_item_refs").fetchall()
    db.close()
    assert kept == [(0, "integer")]


@pytest.mark.parametrize("value", ["'x'", "7"])
async def test_a_removal_record_damaged_by_hand_vouches_for_no_missing_item(
    tmp_path: Path, value: str
) -> None:
    """A ``removed`` value other than 0 or 1 written with the checks off is no record of a
    removal: the item row deleted by hand under it is damage, as under a count that records
    none, never read as absent."""
    database = tmp_path / "checkpoints.db"
    store = SQLiteStore(database)
    run = make_run("record-damaged")
    try:
        with anyio.fail_after(_DEADLINE):
            await _append_items(store, run, 0, refs=["b/a", "b/b"],
                                items=[make_item("b/a"), make_item("b/b")])
            with sqlite3.connect(database) as db:
                db.execute("PRAGMA ignore_check_constraints = ON")
                db.execute(f"UPDATE fc_item_refs SET removed = {value} WHERE key = 'b/a'")
            db.close()
            _delete_row(database, "b/a")
            with pytest.raises(CorruptCheckpointError, match="b/a"):
                await _read_whole(store, run)
    finally:
        await store.aclose()
