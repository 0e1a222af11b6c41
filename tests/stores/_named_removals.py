"""The store's own removals of items a checkpoint names, shared by the SQLite and PostgreSQL
tests of items deleted behind a store's back (what those removals leave must keep reading as
absent, where a row deleted by hand is damage)."""

from __future__ import annotations

from fastcheckpoint.stores._base import CheckpointStore, RunRecord
from fastcheckpoint.testing import checkpoint_id_of, key_of, make_item
from fastcheckpoint.testing._adapter import _append_items


async def remove_while_named(store: CheckpointStore, run: RunRecord, *,
                             removed: list[str]) -> None:
    """Checkpoint 1 names ``o`` (owned by checkpoint 0, then deleted with it), ``b/a`` and
    ``b/b``; ``delete_items`` is given ``removed`` (at most ``b/a`` among what it holds)."""
    key = key_of(run)
    await _append_items(store, run, 0, items=[make_item("o", owner=0)])
    await _append_items(store, run, 1, refs=["o", "b/a", "b/b"],
                        items=[make_item("b/a"), make_item("b/b")])
    assert await store.delete(key, 0, checkpoint_id=checkpoint_id_of(run, 0))
    if removed:
        assert await store.delete_items(key, removed) == 1
