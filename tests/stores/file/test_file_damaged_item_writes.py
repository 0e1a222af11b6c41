"""Writes over a damaged item (its value fails its checksum): a damaged item is not live, so
every writer that brings a value for its key writes it anew, and an append that only names
it, once a read of this process found it damaged, is refused with ``SharedItemGone`` (the
LangGraph saver then sends the value again)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from fastcheckpoint.errors import ConflictError, CorruptCheckpointError, SharedItemGone
from fastcheckpoint.stores.file import FileStore
from fastcheckpoint.testing import T0, checkpoint_id_of, key_of, make_item, make_run
from fastcheckpoint.testing._adapter import _append_items
from tests._file_records import item_record

pytestmark = pytest.mark.anyio


async def _loose(store: FileStore, root: Path, name: str) -> str:
    """A run holding the loose items a, b and c, b damaged; its run key."""
    run_key = key_of(make_run(name))
    await store.put_items(run_key, [make_item(key, key.encode()) for key in "abc"], now=T0)
    item_record(root, run_key, "b").flip(-1)
    return run_key


async def test_a_create_only_put_writes_over_a_damaged_item(store: FileStore, root: Path) -> None:
    with anyio.fail_after(5):
        run_key = await _loose(store, root, "create-only")
        with pytest.raises(ConflictError):  # an intact item still conflicts
            await store.put_items(run_key, [make_item("a", b"A2")], create_only=True, now=T0)
        await store.put_items(run_key, [make_item("b", b"B2")], create_only=True, now=T0)
        assert await store.get_items(run_key, ["a", "b", "c"], now=T0) == {
            "a": b"a", "b": b"B2", "c": b"c"}


async def test_an_append_bringing_a_damaged_items_value_writes_it_anew(
    store: FileStore, root: Path
) -> None:
    """The append's own checkpoint reads back whole; an intact item it brings again is kept."""
    run = make_run("append-value")
    run_key = key_of(run)
    with anyio.fail_after(5):
        await _append_items(store, run, 0, refs=["a", "b"],
                            items=[make_item("a", b"A0"), make_item("b", b"B0")])
        item_record(root, run_key, "b").flip(-1)
        await _append_items(store, run, 1, refs=["a", "b"],
                            items=[make_item("a", b"A1"), make_item("b", b"B1")])
        found = await store.read_with_items(run_key, sequence=1, now=T0)
        assert found is not None
        assert found[2] == {"a": b"A0", "b": b"B1"}


async def test_put_owned_items_if_absent_replaces_a_damaged_item(
    store: FileStore, root: Path
) -> None:
    run = make_run("owned")
    run_key = key_of(run)
    checkpoint_id = checkpoint_id_of(run, 0)
    with anyio.fail_after(5):
        await _append_items(store, run, 0)
        owned = [make_item("w", b"W0", owner=0), make_item("x", b"X0", owner=0)]
        assert await store.put_owned_items(run_key, owned, owner=0, checkpoint_id=checkpoint_id,
                                           if_absent=False, now=T0)
        item_record(root, run_key, "w").flip(-1)
        again = [make_item("w", b"W1", owner=0), make_item("x", b"X1", owner=0)]
        assert await store.put_owned_items(run_key, again, owner=0, checkpoint_id=checkpoint_id,
                                           if_absent=True, now=T0)
        found = await store.read_with_items(run_key, sequence=0, now=T0)
        assert found is not None
        assert found[2] == {"w": b"W1", "x": b"X0"}


async def _get_b(store: FileStore, run_key: str) -> None:
    with pytest.raises(CorruptCheckpointError):
        await store.get_items(run_key, ["b"], now=T0)


async def _read_0(store: FileStore, run_key: str) -> None:
    with pytest.raises(CorruptCheckpointError):
        await store.read_with_items(run_key, sequence=0, now=T0)


async def _scan(store: FileStore, run_key: str) -> None:
    assert await store.scan_items(run_key, now=T0) == [("a", b"A0")]  # b skipped


@pytest.mark.parametrize("reader", [_get_b, _read_0, _scan])
async def test_an_append_naming_an_item_a_read_found_damaged_is_refused(
    store: FileStore, root: Path, reader: Callable[[FileStore, str], Awaitable[None]]
) -> None:
    """Refused with nothing written; the same append with the value is stored and reads."""
    run = make_run("named")
    run_key = key_of(run)
    with anyio.fail_after(5):
        await _append_items(store, run, 0, refs=["a", "b"],
                            items=[make_item("a", b"A0"), make_item("b", b"B0")])
        item_record(root, run_key, "b").flip(-1)
        await reader(store, run_key)
        with pytest.raises(SharedItemGone):
            await _append_items(store, run, 1, refs=["a", "b"])
        latest = await store.latest(run_key, now=T0)
        assert latest is not None
        assert latest[0].sequence == 0
        await _append_items(store, run, 1, refs=["a", "b"], items=[make_item("b", b"B1")])
        found = await store.read_with_items(run_key, sequence=None, now=T0)
        assert found is not None
        assert (found[0].sequence, found[2]) == (1, {"a": b"A0", "b": b"B1"})


async def test_a_langgraph_thread_whose_channel_value_is_damaged_saves_again(
    root: Path,
) -> None:
    """Channel a's value damaged after the first checkpoint and found so by a read: the next
    save, a unchanged, is refused by the store, the saver sends every value again, and the
    thread's latest checkpoint reads whole."""
    pytest.importorskip("langgraph")
    from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
    from tests.integrations._langgraph_support import CountingStore, config, put

    inner = FileStore(root)
    counting: Any = CountingStore(inner)
    saver = FastCheckpointSaver(counting)
    with anyio.fail_after(5):
        first = await put(saver, "thread", values={"a": "A1", "b": "B1"},
                          versions={"a": 1, "b": 1})
        run_key = counting.last["append_with_items"][0][0]
        held = await inner.scan_items(run_key, now=T0 + 1e9)
        blob = next(key for key, value in held if b"A1" in value)
        item_record(root, run_key, blob).flip(-1)
        with pytest.raises(CorruptCheckpointError):
            await saver.aget_tuple(config("thread", first))
        counting.take()
        await put(saver, "thread", parent=first, values={"a": "A1", "b": "B2"},
                  versions={"a": 1, "b": 2}, new_versions={"b": 2})
        assert counting.take()["append_with_items"] == 2  # refused, then sent whole
        latest = await saver.aget_tuple(config("thread"))
        assert latest is not None
        assert latest.checkpoint["channel_values"] == {"a": "A1", "b": "B2"}
