"""SQLite: an item row a checkpoint's refs name, deleted by hand (plain sqlite3), is read as
absent: ``read_with_items`` returns the checkpoint without it (strict xfail below, until the
store can tell such a row from one it removed itself). What the store removes itself while a
checkpoint names the key (an owned item with its owner, ``delete_items``) must keep reading
as absent: the protocol says those reads lack it, and the row left behind is the same."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio
import pytest

from fastcheckpoint.errors import CorruptCheckpointError
from fastcheckpoint.stores._base import RunRecord
from fastcheckpoint.stores.sqlite import SQLiteStore
from fastcheckpoint.testing import T0, checkpoint_id_of, key_of, make_item, make_run
from fastcheckpoint.testing._adapter import _append_items

pytestmark = pytest.mark.anyio

_DEADLINE = 10


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _delete_row(database: Path, key: str) -> None:
    with sqlite3.connect(database) as db:
        assert db.execute("DELETE FROM fc_items WHERE key = ?", (key,)).rowcount == 1
    db.close()


class _ReadWithoutItem(Exception):
    """The checkpoint came back without an item its refs name (what the xfail expects)."""


async def _read_whole(store: SQLiteStore, run: RunRecord) -> None:
    found = await store.read_with_items(key_of(run), sequence=0, now=T0)
    raise _ReadWithoutItem(f"read without the item: {found and found[2]}")


@pytest.mark.xfail(strict=True, raises=_ReadWithoutItem, reason=(
    "a row deleted by hand leaves the rows the store's own removals leave (an owned item "
    "gone with its owner, delete_items): telling them apart needs the store to record its "
    "removals of named items"))
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
            await _append_items(store, run, 0, items=[make_item("o", owner=0)])
            await _append_items(store, run, 1, refs=["o", "b/a", "b/b"],
                                items=[make_item("b/a"), make_item("b/b")])
            assert await store.delete(key, 0, checkpoint_id=checkpoint_id_of(run, 0))
            assert await store.delete_items(key, ["b/a"]) == 1
            found = await store.read_with_items(key, sequence=1, now=T0)
    finally:
        await store.aclose()
    assert found is not None
    assert found[2] == {"b/b": b"value-b/b"}
