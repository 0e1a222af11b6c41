"""What the LangGraph saver pays to tell whether a checkpoint reads back whole (``alist``
leaves out, and ``aget_tuple`` by id returns ``None`` for, one kept only for what newer
checkpoints rebuild from): the headers back to where its delta channels reach, and a look-up
by id for an ancestor further back (a fork's parent) or gone. Not a page per 100 headers
back to the fork point, nor every header below a removed parent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from fastcheckpoint import MemoryStore
from fastcheckpoint.integrations import langgraph as saver_module
from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
from fastcheckpoint.stores.file import FileStore
from tests._helpers import FakeClock, make_config
from tests.integrations._langgraph_support import CountingStore, config, put

pytestmark = pytest.mark.anyio

DEADLINE = 20
LENGTH = 600
SNAPSHOT_EVERY = 5
"""The checkpoints' one delta channel snapshots every 5 supersteps."""
MOST_HEADERS_CALLS = 2
"""The headers calls of a check: the page below the checkpoint (or alist's page), and the
headers at an ancestor looked up by id."""


@pytest.fixture(params=["memory", "file"])
def counted_store(request: pytest.FixtureRequest, tmp_path: Path) -> CountingStore:
    """A store whose calls are counted: the memory store, or the file store (the same calls)."""
    inner = MemoryStore() if request.param == "memory" else FileStore(tmp_path, fsync=False)
    return CountingStore(inner)


def _saver(store: Any) -> FastCheckpointSaver:
    return FastCheckpointSaver(store, config=make_config(FakeClock()))


def _counted(steps: int) -> dict[str, Any]:
    return {"counters_since_delta_snapshot": {"x": [1, steps]}}


async def _chain(saver: FastCheckpointSaver, length: int, *, invoke_every: int = 6) -> list[str]:
    """A thread of ``length`` checkpoints, each the child of the one before, saved without
    keep_latest; their LangGraph ids, oldest first. Each ``invoke_every`` is a LangGraph
    run of its own (``run_id`` r0, r1, ...)."""
    ids = [await put(saver, "t", values={"x": ["a"]}, versions={"x": 1}, run_id="r0",
                     **_counted(0))]
    for number in range(1, length):
        ids.append(await put(saver, "t", parent=ids[-1], step=number,
                             run_id=f"r{number // invoke_every}",
                             **_counted(number % SNAPSHOT_EVERY)))
    return ids


async def _forked(store: CountingStore) -> tuple[FastCheckpointSaver, list[str], str]:
    """600 checkpoints, then a fork from the fourth (its channel rebuilds from the fork
    point's three ancestors and the fork point); read by a new process."""
    saver = _saver(store)
    ids = await _chain(saver, LENGTH)
    fork = await put(saver, "t", parent=ids[3], step=4, run_id="fork", **_counted(4))
    return _saver(store), ids, fork


async def test_the_newest_of_a_fork_from_far_back_is_listed_for_a_few_headers_calls(
    counted_store: CountingStore,
) -> None:
    store = counted_store
    with anyio.fail_after(DEADLINE):
        saver, _, fork = await _forked(store)
        store.take()
        listed = [found.checkpoint["id"] async for found in saver.alist(config("t"), limit=1)]
        calls = store.take()
    assert listed == [fork]
    assert calls.get("headers", 0) <= MOST_HEADERS_CALLS  # 7 before: a page per 100 back
    assert calls.get("get_items", 0) <= 1


async def test_a_fork_from_far_back_is_returned_by_id_for_a_few_headers_calls(
    counted_store: CountingStore,
) -> None:
    store = counted_store
    with anyio.fail_after(DEADLINE):
        saver, _, fork = await _forked(store)
        store.take()
        found = await saver.aget_tuple(config("t", fork))
        calls = store.take()
    assert found is not None
    assert found.checkpoint["id"] == fork
    assert calls.get("headers", 0) <= MOST_HEADERS_CALLS  # 7 before
    assert calls.get("get_items", 0) <= 2  # where the fork is, where its parent is


async def test_every_checkpoint_of_a_forked_thread_is_listed_and_returned_by_id() -> None:
    """Nothing is pruned: the ancestors the checks look up by id are there."""
    store = CountingStore(MemoryStore())
    with anyio.fail_after(DEADLINE):
        saver, ids, fork = await _forked(store)
        listed = [found.checkpoint["id"] async for found in saver.alist(config("t"))]
        by_id = [checkpoint_id for checkpoint_id in [fork, *ids[:8]]
                 if await saver.aget_tuple(config("t", checkpoint_id)) is not None]
    assert listed == [fork, *reversed(ids)]
    assert by_id == [fork, *ids[:8]]


async def _removed_middle_run(store: CountingStore) -> tuple[FastCheckpointSaver, list[str]]:
    """600 checkpoints in runs of 6; the checkpoints of run r50 (sequences 300 to 305)
    removed: the one after them (306, rebuilding from its parent) reads short. The saver
    that saved them (it knows where each is)."""
    saver = _saver(store)
    ids = await _chain(saver, LENGTH)
    await saver.adelete_for_runs(["r50"])
    return saver, ids


async def test_a_checkpoint_whose_parent_was_removed_is_hidden_for_a_few_calls(
    counted_store: CountingStore,
) -> None:
    store = counted_store
    with anyio.fail_after(DEADLINE):
        saver, ids = await _removed_middle_run(store)
        store.take()
        found = await saver.aget_tuple(config("t", ids[306]))
        by_id = store.take()
        listed = [found.checkpoint["id"] async for found in saver.alist(
            config("t"), before=config("t", ids[307]), limit=1)]
        listing = store.take()
    assert found is None
    assert by_id.get("headers", 0) <= MOST_HEADERS_CALLS  # 4 before: every header below
    # The one below the removed run: reads whole from the headers alone.
    assert listed == [ids[299]]
    assert listing.get("headers", 0) <= MOST_HEADERS_CALLS  # 4 before


async def test_a_listing_hides_exactly_the_checkpoints_that_read_short() -> None:
    store = CountingStore(MemoryStore())
    with anyio.fail_after(DEADLINE):
        saver, ids = await _removed_middle_run(store)
        listed = [found.checkpoint["id"] async for found in saver.alist(config("t"))]
        by_id = [checkpoint_id for checkpoint_id in ids[295:315]
                 if await saver.aget_tuple(config("t", checkpoint_id)) is not None]
    # 306 to 309 rebuild from 305 (removed) and those between; 310 snapshots.
    shown = [*ids[:300], *ids[310:]]
    assert listed == shown[::-1]
    assert by_id == [*ids[295:300], *ids[310:315]]


async def test_aprune_hides_the_ancestor_whose_own_parent_it_removed() -> None:
    """aprune keeps the fork (the newest) and the three ancestors it rebuilds from; they
    rebuild from the one before them too (removed): hidden, for a few calls."""
    store = CountingStore(MemoryStore())
    with anyio.fail_after(DEADLINE):
        saver = _saver(store)
        ids = await _chain(saver, LENGTH)
        fork = await put(saver, "t", parent=ids[303], step=4, run_id="fork", **_counted(3))
        await saver.aprune(["t"])
        saver = _saver(store)
        store.take()
        hidden = await saver.aget_tuple(config("t", ids[301]))
        by_id = store.take()
        listed = [found.checkpoint["id"] async for found in saver.alist(config("t"))]
        listing = store.take()
    assert hidden is None  # it rebuilds from 300, which aprune removed
    assert by_id.get("headers", 0) <= MOST_HEADERS_CALLS
    assert listed == [fork]
    assert listing.get("headers", 0) <= MOST_HEADERS_CALLS


async def test_metadata_without_delta_counters_is_not_decoded_to_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A thread without delta channels: its headers' metadata (LangGraph's serde, in the
    clear) does not name the counters, so no listed header's metadata is decoded to check
    (only to return it)."""
    saver = _saver(MemoryStore())
    counted: list[object] = []

    def supersteps(metadata: object) -> int:
        counted.append(metadata)
        return 0

    with anyio.fail_after(DEADLINE):
        ids = [await put(saver, "t", values={"x": ["a"]}, versions={"x": 1})]
        for number in range(1, 5):
            ids.append(await put(saver, "t", parent=ids[-1], step=number))
        monkeypatch.setattr(saver_module, "_supersteps", supersteps)
        listed = [found.checkpoint["id"] async for found in saver.alist(config("t"))]
        assert await saver.aget_tuple(config("t", ids[2])) is not None
    assert listed == ids[::-1]
    assert counted == []
