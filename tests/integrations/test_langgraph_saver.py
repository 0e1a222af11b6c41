"""The LangGraph saver beyond LangGraph's conformance suite: request budgets, shared channel
values under pruning and deletes, listings across threads and namespaces, writes that arrive
before (or after) their checkpoint, TTL and retention, no pickles, the blocking bridge,
copies, status changes and configuration."""

from __future__ import annotations

import asyncio
import copy
import os
import pickle
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.types import Command

from fastcheckpoint import CheckpointStatus, FileStore, MemoryStore
from fastcheckpoint._codec import Codec
from fastcheckpoint._ids import run_key
from fastcheckpoint.errors import (
    CheckpointError,
    ConfigurationError,
    ConflictError,
    CorruptCheckpointError,
    SerializationError,
    SharedItemGone,
    StoreError,
    ValidationError,
)
from fastcheckpoint.integrations import _langgraph_records as records
from fastcheckpoint.integrations import langgraph as saver_module
from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
from fastcheckpoint.stores import Item
from tests._helpers import T0, FakeClock, ForwardingStore, make_config
from tests.integrations._langgraph_support import (
    CountingStore,
    asking,
    checkpoint,
    config,
    metadata,
    put,
)
from tests.integrations.conftest import FreshStore

pytestmark = pytest.mark.anyio

DEADLINE = 20
STORE_DEADLINE = 60
"""For the tests that run on every kind of store (S3 and DynamoDB on moto are slow)."""
INTERRUPT = "__interrupt__"


def _saver(store: Any, clock: FakeClock | None = None, **options: Any) -> FastCheckpointSaver:
    return FastCheckpointSaver(store, config=make_config(clock or FakeClock()), **options)


async def _ids(saver: FastCheckpointSaver, cfg: Any, **options: Any) -> list[str]:
    return [found.checkpoint["id"] async for found in saver.alist(cfg, **options)]


async def _items(store: Any, thread_id: str, keys: list[str], ns: str = "") -> dict[str, bytes]:
    found: dict[str, bytes] = await store.get_items(
        run_key(records.run_id_of(thread_id, ns)), keys, now=T0)
    return found


# -- request budgets ------------------------------------------------------------------------------


async def test_each_call_costs_one_store_call_in_steady_state() -> None:
    store = CountingStore(MemoryStore())
    saver = _saver(store)
    with anyio.fail_after(DEADLINE):
        first = await put(saver, "t", values={"a": 1}, versions={"a": 1})
        assert store.take() == {"append_with_items": 1}
        second = await put(saver, "t", parent=first, values={"a": 2}, versions={"a": 2})
        assert store.take() == {"append_with_items": 1}
        await saver.aput_writes(config("t", second), [("a", 3), ("b", 4)], "task-1")
        assert store.take() == {"put_owned_items": 1}
        assert (await saver.aget_tuple(config("t"))) is not None
        assert store.take() == {"read_with_items": 1}
        assert (await saver.aget_tuple(config("t", first))) is not None
        assert store.take() == {"read_with_items": 1}

        elsewhere = _saver(store)  # another process: nothing cached
        found = await elsewhere.aget_tuple(config("t", first))
        assert store.take() == {"get_items": 1, "read_with_items": 1}
    assert found is not None
    assert found.checkpoint["channel_values"] == {"a": 1}


async def test_a_langgraph_run_is_indexed_once_per_namespace() -> None:
    store = CountingStore(MemoryStore())
    saver = _saver(store)
    with anyio.fail_after(DEADLINE):
        first = await put(saver, "t", run_id="run-1")
        assert store.take() == {"put_items": 1, "append_with_items": 1}
        await put(saver, "t", parent=first, run_id="run-1")
        assert store.take() == {"append_with_items": 1}


async def test_writes_mixing_special_and_regular_ones_cost_two_calls() -> None:
    store = CountingStore(MemoryStore())
    saver = _saver(store)
    with anyio.fail_after(DEADLINE):
        first = await put(saver, "t")
        store.take()
        await saver.aput_writes(config("t", first), [("__resume__", "yes"), ("a", 1)], "task")
        assert store.take() == {"put_owned_items": 2}


async def test_unchanged_channel_values_are_not_sent_again() -> None:
    store = CountingStore(MemoryStore())
    saver = _saver(store)
    with anyio.fail_after(DEADLINE):
        first = await put(saver, "t", values={"a": "1", "big": "x" * 10_000},
                          versions={"a": 1, "big": 1})
        await put(saver, "t", parent=first, values={"a": "2", "big": "x" * 10_000},
                  versions={"a": 2, "big": 1}, new_versions={"a": 2})
        items = store.last["append_with_items"][1]["items"]
        latest = await saver.aget_tuple(config("t"))
    blobs = [item for item in items if item.key.startswith("b/")]
    assert [item.key for item in blobs] == [records.blob_key("a", 2)]
    assert latest is not None
    assert latest.checkpoint["channel_values"] == {"a": "2", "big": "x" * 10_000}


class RefusingStore(CountingStore):
    """Refuses the next ``refusals`` appends that name shared values they do not send, as a
    store does when a removal took such a value away meanwhile."""

    def __init__(self, inner: Any, refusals: int, *, even_when_all_sent: bool = False) -> None:
        super().__init__(inner)
        self.refusals = refusals
        self.even_when_all_sent = even_when_all_sent

    async def append_with_items(self, run_key: str, record: Any, **options: Any) -> Any:
        sent = {item.key for item in options["items"]}
        if self.refusals and (self.even_when_all_sent
                              or any(key not in sent for key in record.refs)):
            self.refusals -= 1
            self.calls["refused"] += 1
            raise SharedItemGone("removed meanwhile: append it again with their values")
        self.calls["append_with_items"] += 1
        self.last["append_with_items"] = ((run_key, record), options)
        return await self.inner.append_with_items(run_key, record, **options)


async def test_a_save_refused_for_a_removed_value_is_sent_again_with_every_value() -> None:
    store = RefusingStore(MemoryStore(), refusals=0)
    saver = _saver(store)
    with anyio.fail_after(DEADLINE):
        first = await put(saver, "t", values={"a": "1", "big": "x" * 1000},
                          versions={"a": 1, "big": 1})
        store.refusals = 1
        await put(saver, "t", parent=first, values={"a": "2", "big": "x" * 1000},
                  versions={"a": 2, "big": 1}, new_versions={"a": 2})
        items = store.last["append_with_items"][1]["items"]
        latest = await saver.aget_tuple(config("t"))
    assert store.calls["refused"] == 1
    assert {records.blob_key("a", 2), records.blob_key("big", 1)} <= {item.key for item in items}
    assert latest is not None
    assert latest.checkpoint["channel_values"] == {"a": "2", "big": "x" * 1000}


async def test_a_save_refused_again_is_a_typed_error_and_writes_nothing() -> None:
    """A store that refuses the resend too (none of ours does once every value is sent) gets
    its error back: the saver sends again once, never in a loop."""
    store = RefusingStore(MemoryStore(), refusals=0, even_when_all_sent=True)
    saver = _saver(store)
    with anyio.fail_after(DEADLINE):
        first = await put(saver, "t", values={"a": "1", "big": "x"}, versions={"a": 1, "big": 1})
        store.refusals = 2
        with pytest.raises(SharedItemGone):
            await put(saver, "t", parent=first, values={"a": "2", "big": "x"},
                      versions={"a": 2, "big": 1}, new_versions={"a": 2})
        latest = await saver.aget_tuple(config("t"))
    assert store.calls["refused"] == 2
    assert latest is not None
    assert latest.checkpoint["id"] == first


# -- shared values, pruning and deletes --------------------------------------------------------


@pytest.mark.parametrize("how", ["prune", "keep_latest", "delete_for_runs"])
async def test_a_value_shared_with_a_removed_checkpoint_survives(
    how: str, clock: FakeClock, fresh_store: FreshStore
) -> None:
    async with fresh_store() as memory:
        await _shared_value_survives(how, clock, memory)


async def _shared_value_survives(how: str, clock: FakeClock, memory: Any) -> None:
    saver = _saver(memory, clock, keep_latest=1 if how == "keep_latest" else None)
    with anyio.fail_after(STORE_DEADLINE):
        first = await put(saver, "t", values={"a": "a1", "b": "b1"}, versions={"a": 1, "b": 1},
                          run_id="run-1")
        await put(saver, "t", parent=first, values={"a": "a2", "b": "b1"},
                  versions={"a": 2, "b": 1}, new_versions={"a": 2}, run_id="run-2")
        if how == "prune":
            await saver.aprune(["t"])
        elif how == "delete_for_runs":
            await saver.adelete_for_runs(["run-1"])
        await saver.manager.cleanup_expired()
        listed = [found.checkpoint["channel_values"] async for found in saver.alist(config("t"))]
        stored = await _items(memory, "t", [records.blob_key(name, version) for name, version
                                            in (("a", 1), ("a", 2), ("b", 1))])
    assert listed == [{"a": "a2", "b": "b1"}]
    assert set(stored) == {records.blob_key("a", 2), records.blob_key("b", 1)}


async def test_a_value_another_process_removed_is_sent_again(
    clock: FakeClock, fresh_store: FreshStore
) -> None:
    """Process A saved channel b at version 1; process B saved the next checkpoint with a new
    b and pruned the thread, removing b's first value. A, still believing it held, saves a
    checkpoint on its own parent with b unchanged: the store refuses the append (the value
    is gone) and A sends it again, so the checkpoint restores whole."""
    async with fresh_store() as store:
        first_process, second_process = _saver(store, clock), _saver(store, clock)
        with anyio.fail_after(STORE_DEADLINE):
            first = await put(first_process, "t", values={"a": "a1", "b": "b1"},
                              versions={"a": 1, "b": 1})
            await put(second_process, "t", parent=first, values={"a": "a2", "b": "b2"},
                      versions={"a": 2, "b": 2}, new_versions={"a": 2, "b": 2})
            await second_process.aprune(["t"])
            await second_process.manager.cleanup_expired()
            assert await _items(store, "t", [records.blob_key("b", 1)]) == {}
            third = await put(first_process, "t", parent=first, values={"a": "a3", "b": "b1"},
                              versions={"a": 3, "b": 1}, new_versions={"a": 3})
            restored = await second_process.aget_tuple(config("t", third))
    assert restored is not None
    assert restored.checkpoint["channel_values"] == {"a": "a3", "b": "b1"}


async def test_delete_for_runs_finds_runs_in_every_thread_and_namespace() -> None:
    saver = _saver(MemoryStore())
    with anyio.fail_after(DEADLINE):
        await put(saver, "t1", run_id="gone")
        await put(saver, "t1", ns="child:1", run_id="gone")
        kept = await put(saver, "t2", run_id="kept")
        await put(saver, "t2", parent=kept, run_id="gone")
        await saver.adelete_for_runs(["gone"])
        await saver.adelete_for_runs(["gone"])  # idempotent
        left = [(found.config["configurable"]["thread_id"], found.metadata["run_id"])
                async for found in saver.alist(None)]
    assert left == [("t2", "kept")]


# -- listings -----------------------------------------------------------------------------------


async def test_list_without_a_thread_or_namespace_covers_all_of_them() -> None:
    saver = _saver(MemoryStore())
    with anyio.fail_after(DEADLINE):
        root = await put(saver, "t1", score=1)
        child = await put(saver, "t1", ns="child:1", score=2)
        other = await put(saver, "t2", score=1)
        everything = set(await _ids(saver, None))
        scored = set(await _ids(saver, None, filter={"score": 1}))
        one_limited = await _ids(saver, None, limit=1)
        thread = set(await _ids(saver, {"configurable": {"thread_id": "t1"}}))
        root_only = await _ids(saver, config("t1"))
    assert everything == {root, child, other}
    assert scored == {root, other}
    assert len(one_limited) == 1
    assert thread == {root, child}
    assert root_only == [root]


async def test_before_may_name_a_checkpoint_of_another_namespace() -> None:
    """Subgraph replay lists a child namespace before a root checkpoint's id."""
    saver = _saver(MemoryStore())
    with anyio.fail_after(DEADLINE):
        older = await put(saver, "t", ns="child:1")
        root = await put(saver, "t")
        await put(saver, "t", ns="child:1", parent=older)
        found = await _ids(saver, config("t", ns="child:1"), before=config("t", root), limit=1)
    assert found == [older]


async def test_list_pages_with_before_and_limit_in_a_long_thread() -> None:
    saver = _saver(MemoryStore())
    with anyio.fail_after(DEADLINE):
        ids: list[str] = []
        for step in range(250):
            ids.append(await put(saver, "t", parent=ids[-1] if ids else None, step=step))
        pages: list[str] = []
        before = None
        while True:
            page = await _ids(saver, config("t"), before=before, limit=100)
            pages += page
            if len(page) < 100:
                break
            before = config("t", page[-1])
    assert pages == ids[::-1]


# -- writes before and after their checkpoint ----------------------------------------------------


async def _settle() -> None:
    """Let every task started so far run to where it waits (no thread hop is involved here:
    small values are encoded inline). Not ``anyio.wait_all_tasks_blocked()``: writes waiting
    for a save poll their signal every 50 ms, and its own 0.1 s re-checks can fall in step
    with those wake-ups and find a task runnable every time, until the test's deadline."""
    for _ in range(50):
        await anyio.lowlevel.checkpoint()


class _GatedStore(CountingStore):
    """Holds ``append_with_items`` until ``gate`` is set (a slow save)."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.gate: anyio.Event | None = None

    async def append_with_items(self, *args: Any, **kwargs: Any) -> Any:
        if self.gate is not None:
            await self.gate.wait()
        return await super().append_with_items(*args, **kwargs)  # type: ignore[misc]


async def test_writes_sent_before_their_checkpoint_is_saved_go_with_it() -> None:
    """LangGraph sends a step's writes while the step's checkpoint still waits behind the
    previous save: they must be kept, not dropped as writes to a missing checkpoint."""
    store = _GatedStore(MemoryStore())
    saver = _saver(store)
    with anyio.fail_after(DEADLINE):
        first = await put(saver, "t")
        store.gate = anyio.Event()
        second, third = checkpoint(), checkpoint()
        async with anyio.create_task_group() as group:
            group.start_soon(saver.aput, config("t", first), second, metadata(1), {})
            await _settle()
            group.start_soon(saver.aput_writes, config("t", second["id"]), [("x", 1)], "a")
            group.start_soon(saver.aput_writes, config("t", third["id"]), [("y", 2)], "b")
            await _settle()
            store.gate.set()
            await _settle()
            store.take()
            await saver.aput(config("t", second["id"]), third, metadata(2), {})
        calls = store.take()
        on_second = await saver.aget_tuple(config("t", second["id"]))
        on_third = await saver.aget_tuple(config("t", third["id"]))
    assert calls == {"append_with_items": 1}  # the third checkpoint's writes went with it
    assert on_second is not None
    assert on_second.pending_writes == [("a", "x", 1)]
    assert on_third is not None
    assert on_third.pending_writes == [("b", "y", 2)]


class _SlowReplies(CountingStore):
    """``append_with_items`` waits for ``save_gate`` before it starts; ``get_items`` answers
    what the store held when asked, but only once ``reply_gate`` is set (a reply in flight)."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.save_gate: anyio.Event | None = None
        self.reply_gate: anyio.Event | None = None

    async def append_with_items(self, *args: Any, **kwargs: Any) -> Any:
        if self.save_gate is not None:
            await self.save_gate.wait()
        return await super().append_with_items(*args, **kwargs)  # type: ignore[misc]

    async def get_items(self, *args: Any, **kwargs: Any) -> Any:
        found = await super().get_items(*args, **kwargs)  # type: ignore[misc]
        if self.reply_gate is not None:
            await self.reply_gate.wait()
        return found


async def test_writes_whose_checkpoint_is_saved_during_their_lookup_are_stored_at_once() -> None:
    """A new thread (nothing known of it here): the second checkpoint's writes ask the store
    where it lives while the first save is on its way; before the answer (none) comes back,
    the first save ends and the second checkpoint is saved. The writes must then go on that
    checkpoint at once, not wait for a save that has already happened."""
    store = _SlowReplies(MemoryStore())
    saver = _saver(store)
    first, second = checkpoint(), checkpoint()
    store.save_gate, store.reply_gate = anyio.Event(), anyio.Event()
    with anyio.fail_after(DEADLINE / 4):  # far below the saver's wait for a coming save
        async with anyio.create_task_group() as group:
            group.start_soon(saver.aput, config("t"), first, metadata(-1), {})
            await _settle()
            group.start_soon(saver.aput_writes, config("t", second["id"]), [("x", 1)], "a")
            await _settle()
            assert store.take() == {"get_items": 1}  # asked, the answer still on its way
            store.save_gate.set()
            await _settle()
            await saver.aput(config("t", first["id"]), second, metadata(0), {})
            store.reply_gate.set()
        found = await saver.aget_tuple(config("t", second["id"]))
    assert found is not None
    assert found.pending_writes == [("a", "x", 1)]


async def test_writes_wait_out_a_slow_first_save_of_a_new_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """LangGraph queues a graph run's saves behind its first one and sends each step's writes
    at once: in a new thread, writes for the second checkpoint arrive while the first save is
    still on its way (a new store client and a new run: seconds on a busy S3). However long
    that save takes, they wait for their checkpoint's save behind it, instead of being
    dropped as writes to a checkpoint that never came (a delta channel rebuilt from them
    would read back short for good)."""
    monkeypatch.setattr(saver_module, "_FIRST_SAVE_SECONDS", 0.0)  # the first save outlasts it
    store = _GatedStore(MemoryStore())
    saver = _saver(store)
    first, second = checkpoint(), checkpoint()
    store.gate = anyio.Event()
    with anyio.fail_after(DEADLINE / 4):  # far below the saver's wait for a coming save
        async with anyio.create_task_group() as group:
            group.start_soon(saver.aput, config("t"), first, metadata(-1), {})
            await _settle()
            group.start_soon(saver.aput_writes, config("t", second["id"]), [("x", 1)], "a")
            await _settle()
            store.gate.set()
            await _settle()
            store.take()
            await saver.aput(config("t", first["id"]), second, metadata(0), {})
        calls = store.take()
        found = await saver.aget_tuple(config("t", second["id"]))
    assert calls == {"append_with_items": 1}  # the writes went with their checkpoint
    assert found is not None
    assert found.pending_writes == [("a", "x", 1)]


async def test_writes_waiting_for_a_save_that_fails_are_released_by_it() -> None:
    """Writes parked for a checkpoint whose save then fails before it reaches the store learn
    it from the save, and are dropped as writes to a checkpoint that does not exist, instead
    of waiting out the saver's wait for a coming save."""
    store = CountingStore(MemoryStore())
    saver = _saver(store)
    with anyio.fail_after(DEADLINE / 4):  # far below the saver's wait for a coming save
        first = await put(saver, "t")
        second = checkpoint({"a": threading.Lock()})
        store.take()
        async with anyio.create_task_group() as group:
            group.start_soon(saver.aput_writes, config("t", second["id"]), [("x", 1)], "a")
            await _settle()
            assert store.take() == {}  # parked for the coming save, nothing asked
            with pytest.raises(SerializationError):
                await saver.aput(config("t", first), second, metadata(0), {"a": 1})
        calls = store.take()
    assert "put_owned_items" not in calls
    assert await saver.aget_tuple(config("t", second["id"])) is None


async def test_after_a_failed_save_writes_for_later_checkpoints_do_not_wait() -> None:
    """LangGraph makes no save after one that failed in a graph run: writes parked for the
    checkpoints after it, or sent later, are dropped at once. The next graph run (which starts
    with a read) parks writes for its coming saves again."""
    store = CountingStore(MemoryStore())
    saver = _saver(store)
    with anyio.fail_after(DEADLINE / 4):  # far below the saver's wait for a coming save
        first = await put(saver, "t")
        broken, after, later = checkpoint({"a": threading.Lock()}), checkpoint(), checkpoint()
        async with anyio.create_task_group() as group:
            group.start_soon(saver.aput_writes, config("t", after["id"]), [("x", 1)], "a")
            await _settle()
            with pytest.raises(SerializationError):
                await saver.aput(config("t", first), broken, metadata(0), {"a": 1})
        await saver.aput_writes(config("t", later["id"]), [("y", 2)], "b")
        await saver.aput_writes(config("t", broken["id"]), [("z", 3)], "c")
        assert "put_owned_items" not in store.take()
        assert await saver.aget_tuple(config("t")) is not None  # the next graph run
        again = checkpoint()
        async with anyio.create_task_group() as group:
            group.start_soon(saver.aput_writes, config("t", again["id"]), [("x", 4)], "d")
            await _settle()
            store.take()
            await saver.aput(config("t", first), again, metadata(1), {})
        calls = store.take()
        found = await saver.aget_tuple(config("t", again["id"]))
    assert calls == {"append_with_items": 1}  # the writes went with their checkpoint
    assert found is not None
    assert found.pending_writes == [("d", "x", 4)]


async def test_late_writes_and_saves_never_bring_a_deleted_thread_back(
    monkeypatch: pytest.MonkeyPatch, fresh_store: FreshStore
) -> None:
    monkeypatch.setattr(saver_module, "_FIRST_SAVE_SECONDS", 0.05)
    async with fresh_store() as memory:
        await _deleted_thread_stays_deleted(memory)


async def _deleted_thread_stays_deleted(memory: Any) -> None:
    saver, elsewhere = _saver(memory), _saver(memory)
    with anyio.fail_after(STORE_DEADLINE):
        first = await put(saver, "t")
        second = await put(saver, "t", parent=first)
        assert await elsewhere.aget_tuple(config("t")) is not None  # the other knows it too
        await saver.adelete_thread("t")
        for writer in (saver, elsewhere, _saver(memory)):
            await writer.aput_writes(config("t", second), [("x", 1)], "late")
            await writer.aput_writes(config("t", second), [(INTERRUPT, "?")], "late")
            await put(writer, "t", parent=second)
        runs = await saver.manager.list_runs()
        found = await saver.aget_tuple(config("t"))
    assert found is None
    assert list(runs) == []


async def test_a_new_first_checkpoint_starts_a_deleted_thread_afresh() -> None:
    saver = _saver(MemoryStore())
    with anyio.fail_after(DEADLINE):
        old = await put(saver, "t")
        await saver.adelete_thread("t")
        new = await put(saver, "t")
        found = await _ids(saver, config("t"))
    assert found == [new]
    assert old != new


async def test_a_write_already_stored_is_kept_and_a_special_one_replaced() -> None:
    saver = _saver(MemoryStore())
    with anyio.fail_after(DEADLINE):
        first = await put(saver, "t")
        await saver.aput_writes(config("t", first), [("a", "first"), ("__error__", "e1")], "t1")
        await saver.aput_writes(config("t", first), [("a", "second"), ("__error__", "e2")], "t1")
        await saver.aput_writes(config("t", first), [("b", 1)], "t0", task_path="~a")
        found = await saver.aget_tuple(config("t"))
    assert found is not None
    # writes_sort_key order: (task_path, task_id, idx)
    assert found.pending_writes == [("t1", "__error__", "e2"), ("t1", "a", "first"),
                                    ("t0", "b", 1)]


# -- TTL and retention ---------------------------------------------------------------------------


async def test_a_checkpoint_expires_with_its_writes_and_values(
    clock: FakeClock, fresh_store: FreshStore
) -> None:
    async with fresh_store() as memory:
        await _expires_together(clock, memory)


async def _expires_together(clock: FakeClock, memory: Any) -> None:
    saver = _saver(memory, clock, ttl_seconds=60)
    with anyio.fail_after(STORE_DEADLINE):
        first = await put(saver, "t", values={"a": 1, "b": 1}, versions={"a": 1, "b": 1})
        await saver.aput_writes(config("t", first), [("a", 5)], "task")
        clock.advance(30)
        second = await put(saver, "t", parent=first, values={"a": 2, "b": 1},
                           versions={"a": 2, "b": 1}, new_versions={"a": 2})
        clock.advance(31)  # the first expired, the second (sharing b) lives
        assert await saver.aget_tuple(config("t", first)) is None
        latest = await saver.aget_tuple(config("t"))
        assert latest is not None
        assert latest.checkpoint["id"] == second
        assert latest.checkpoint["channel_values"] == {"a": 2, "b": 1}
        assert await _ids(saver, config("t")) == [second]
        clock.advance(30)  # both expired
        assert await saver.aget_tuple(config("t")) is None
        assert list(await saver.manager.list_runs()) == []
        await saver.manager.cleanup_expired()
    assert await _items(memory, "t", [records.blob_key("b", 1), records.blob_key("a", 1),
                                      records.write_key(0, "task", 0)]) == {}


async def test_keep_latest_keeps_the_newest_of_each_namespace(fresh_store: FreshStore) -> None:
    async with fresh_store() as store:
        await _keeps_the_newest(store)


async def _keeps_the_newest(store: Any) -> None:
    saver = _saver(store, keep_latest=2)
    with anyio.fail_after(STORE_DEADLINE):
        kept: dict[str, list[str]] = {}
        for ns in ("", "child:1"):
            ids: list[str] = []
            for step in range(5):
                ids.append(await put(saver, "t", ns=ns, parent=ids[-1] if ids else None,
                                     values={"n": step, "same": "s"},
                                     versions={"n": step + 1, "same": 1},
                                     new_versions={"n": step + 1, **({} if step else {"same": 1})},
                                     step=step))
            kept[ns] = ids[-2:][::-1]
        listed = {ns: await _ids(saver, config("t", ns=ns)) for ns in kept}
        latest = await saver.aget_tuple(config("t", ns="child:1"))
    assert listed == kept
    assert latest is not None
    assert latest.checkpoint["channel_values"] == {"n": 4, "same": "s"}


# -- serialization -------------------------------------------------------------------------------


class _Opaque:
    """Nothing but pickle can store it."""

    __slots__ = ("x",)

    def __init__(self) -> None:
        self.x = threading.Lock()

    def __reduce__(self) -> Any:
        return (_Opaque, ())


_UNPICKLED: list[str] = []


def _mark_unpickled() -> str:
    _UNPICKLED.append("ran")
    return "ran"


class _Bomb:
    def __reduce__(self) -> Any:
        return (_mark_unpickled, ())


async def test_pickled_values_are_refused_when_saved() -> None:
    saver = FastCheckpointSaver(MemoryStore(), serde=JsonPlusSerializer(pickle_fallback=True))
    with anyio.fail_after(DEADLINE):
        with pytest.raises(SerializationError, match="pickle"):
            await put(saver, "t", values={"a": _Opaque()}, versions={"a": 1})
        assert await saver.aget_tuple(config("t")) is None


async def test_pickled_values_in_the_store_are_never_loaded() -> None:
    memory = MemoryStore()
    saver = FastCheckpointSaver(memory, serde=JsonPlusSerializer(pickle_fallback=True))
    planted = records.ItemCodec(Codec()).encode(("pickle", pickle.dumps(_Bomb())))
    with anyio.fail_after(DEADLINE):
        await memory.put_items(run_key("t"), [Item(key=records.blob_key("a", 1), value=planted)],
                               now=T0)
        await put(saver, "t", values={"a": "fine"}, versions={"a": 1})  # its value is kept
        with pytest.raises(SerializationError, match="pickle"):
            await saver.aget_tuple(config("t"))
    assert _UNPICKLED == []


async def test_an_unserializable_value_is_a_serialization_error() -> None:
    saver = _saver(MemoryStore())
    with anyio.fail_after(DEADLINE):
        with pytest.raises(SerializationError):
            await put(saver, "t", values={"a": threading.Lock()}, versions={"a": 1})
        with pytest.raises(SerializationError):
            await saver.aput_writes(config("t", "x"), [("a", threading.Lock())], "task")
        assert await saver.aget_tuple(config("t")) is None


# -- the blocking bridge -------------------------------------------------------------------------


async def test_blocking_calls_on_the_loop_thread_raise_and_work_from_another() -> None:
    saver = _saver(MemoryStore())
    with anyio.fail_after(DEADLINE):
        first = await put(saver, "t")
        with pytest.raises(ConfigurationError, match="event loop"):
            saver.get_tuple(config("t"))
        with pytest.raises(ConfigurationError, match="event loop"):
            saver.put(config("t", first), checkpoint(), {}, {})
        with pytest.raises(ConfigurationError, match="event loop"):
            saver.put_writes(config("t", first), [("a", 1)], "task")
        found = await asyncio.to_thread(saver.get_tuple, config("t"))
        listed = await asyncio.to_thread(lambda: list(saver.list(config("t"))))
    assert found is not None
    assert found.checkpoint["id"] == first
    assert [item.checkpoint["id"] for item in listed] == [first]


def test_blocking_calls_without_a_loop_use_the_savers_own_thread(tmp_path: Path) -> None:
    saver = FastCheckpointSaver(FileStore(tmp_path, fsync=False))
    first = saver.put(config("t"), checkpoint(), {"step": 0}, {})["configurable"]
    saver.put_writes(config("t", first["checkpoint_id"]), [("a", 1)], "task")
    found = saver.get_tuple(config("t"))
    listed = list(saver.list(config("t")))
    threads = [thread for thread in threading.enumerate()
               if thread.name == "fastcheckpoint-loop"]
    saver.close()
    assert found is not None
    assert found.pending_writes == [("task", "a", 1)]
    assert len(listed) == 1
    assert len(threads) == 1
    assert not threads[0].is_alive()


def test_a_saver_outliving_its_loop_serves_blocking_calls(tmp_path: Path) -> None:
    async def build() -> FastCheckpointSaver:
        saver = FastCheckpointSaver(FileStore(tmp_path, fsync=False))
        await put(saver, "t")
        return saver

    saver = asyncio.run(build())
    found = saver.get_tuple(config("t"))
    saver.close()
    assert found is not None


# -- copies --------------------------------------------------------------------------------------


async def test_copies_share_the_store_and_what_the_saver_knows() -> None:
    store = CountingStore(MemoryStore())
    strict = JsonPlusSerializer(allowed_msgpack_modules=None)  # as LANGGRAPH_STRICT_MSGPACK
    saver = _saver(store, serde=strict)
    clone = copy.copy(saver)
    allowed = saver.with_allowlist([("tests.integrations", "Anything")])
    with anyio.fail_after(DEADLINE):
        first = await put(clone, "t", values={"a": 1}, versions={"a": 1})
        store.take()
        found = await allowed.aget_tuple(config("t", first))
        calls = store.take()
    assert allowed is not saver
    assert found is not None
    assert found.checkpoint["channel_values"] == {"a": 1}
    assert calls == {"read_with_items": 1}  # the clone's save taught the other copy where


async def test_copy_thread_copies_a_paused_threads_request() -> None:
    saver = _saver(MemoryStore())
    with anyio.fail_after(DEADLINE):
        first = await put(saver, "src", values={"a": 1}, versions={"a": 1})
        await saver.aput_writes(config("src", first), [(INTERRUPT, {"ask": "ok?"})], "task")
        await saver.acopy_thread("src", "dst")
        copied = await saver.manager.get_run("dst")
        found = await saver.aget_tuple(config("dst"))
        with pytest.raises(ConflictError):
            await saver.acopy_thread("src", "dst")
    assert copied is not None
    assert copied.status is CheckpointStatus.PAUSED
    assert copied.approval is not None
    assert copied.approval["request"]["interrupts"] == [{"value": {"ask": "ok?"}}]
    assert found is not None
    assert found.checkpoint["id"] == first
    assert found.pending_writes == [("task", INTERRUPT, {"ask": "ok?"})]


async def test_a_copy_of_a_thread_whose_request_was_decided_keeps_the_decision() -> None:
    saver = _saver(MemoryStore())
    with anyio.fail_after(DEADLINE):
        first = await put(saver, "src")
        await saver.aput_writes(config("src", first), [(INTERRUPT, "go?")], "task")
        await saver.manager.reject("src", approver="bob", reason="no")
        await saver.acopy_thread("src", "dst")
        reader = _saver(saver.store)  # another process reads the copy
        found = await reader.aget_tuple(config("dst"))
        copied = await reader.manager.get_run("dst")
    assert found is not None
    assert found.pending_writes == [("task", INTERRUPT, "go?")]
    assert copied is not None
    assert copied.status is CheckpointStatus.ACTIVE  # not asked again
    assert copied.approval is not None
    assert copied.approval["decision"] == "rejected"


# -- status: interrupts and approvals ------------------------------------------------------------


async def test_an_interrupt_pauses_the_thread_until_the_graph_goes_on() -> None:
    saver = _saver(MemoryStore())
    with anyio.fail_after(DEADLINE):
        first = await put(saver, "t")
        await saver.aput_writes(config("t", first), [(INTERRUPT, {"q": 1})], "one")
        await saver.aput_writes(config("t", first), [(INTERRUPT, {"q": 2})], "two")
        child = await put(saver, "t", ns="child:1")
        await saver.aput_writes(config("t", child, ns="child:1"), [(INTERRUPT, "x")], "c")
        paused = await saver.manager.get_run("t")
        child_run = await saver.manager.get_run(records.run_id_of("t", "child:1"))
        await put(saver, "t", parent=first)
        resumed = await saver.manager.get_run("t")
    assert paused is not None
    assert paused.status is CheckpointStatus.PAUSED
    assert paused.approval is not None
    assert paused.approval["request"] == {
        "interrupts": [{"value": {"q": 1}}, {"value": {"q": 2}}], "checkpoint_id": first}
    assert child_run is not None
    assert child_run.status is CheckpointStatus.ACTIVE
    assert resumed is not None
    assert resumed.status is CheckpointStatus.ACTIVE


class _StatusChangeFails(CountingStore):
    """Fails ``update_run`` while ``failing``, as a process killed between a stored interrupt
    and its status change leaves the thread (the interrupt stored, the run not PAUSED)."""

    failing = False

    async def update_run(self, *args: Any, **kwargs: Any) -> Any:
        if self.failing:
            raise StoreError("the status change did not happen")
        return await super().update_run(*args, **kwargs)

    async def interrupted(self, saver: FastCheckpointSaver) -> str:
        """Thread ``t``'s first checkpoint, with an interrupt stored and the run not paused."""
        first = await put(saver, "t")
        self.failing = True
        await saver.aput_writes(config("t", first), [(INTERRUPT, {"q": 1})], "task")
        self.failing = False
        return first


async def test_an_interrupt_left_without_its_pause_is_queued_by_the_next_read() -> None:
    store = _StatusChangeFails(MemoryStore())
    writer = _saver(store)
    with anyio.fail_after(DEADLINE):
        first = await store.interrupted(writer)
        left = await writer.manager.get_run("t")
        reader = _saver(store)  # another process, after the first one died
        store.take()
        found = await reader.aget_tuple(config("t"))
        calls = store.take()
        await reader.aget_tuple(config("t"))
        again = store.take()
        queued = await reader.manager.get_run("t")
    assert left is not None
    assert left.status is CheckpointStatus.ACTIVE
    assert found is not None
    assert found.pending_writes == [("task", INTERRUPT, {"q": 1})]
    assert queued is not None
    assert queued.status is CheckpointStatus.PAUSED
    assert queued.approval is not None
    assert queued.approval["request"] == {"interrupts": [{"value": {"q": 1}}],
                                          "checkpoint_id": first}
    assert calls == {"read_with_items": 1, "get_run": 1, "update_run": 1}
    assert again == {"read_with_items": 1}


async def test_a_read_after_the_approval_does_not_queue_the_thread_again() -> None:
    store = CountingStore(MemoryStore())
    saver = _saver(store)
    with anyio.fail_after(DEADLINE):
        first = await put(saver, "t")
        await saver.aput_writes(config("t", first), [(INTERRUPT, "run it?")], "task")
        await saver.manager.approve("t", approver="alice")
        store.take()
        here = await saver.aget_tuple(config("t"))
        calls_here = store.take()  # the process that paused the thread knows
        reader = _saver(store)  # another process reads the approval record once
        found = await reader.aget_tuple(config("t"))
        calls = store.take()
        await reader.aget_tuple(config("t"))
        again = store.take()
        after = await saver.manager.get_run("t")
    assert here is not None
    assert calls_here == {"read_with_items": 1}
    assert found is not None
    assert found.pending_writes == [("task", INTERRUPT, "run it?")]
    assert calls == {"read_with_items": 1, "get_run": 1}  # the approval names it
    assert again == {"read_with_items": 1}
    assert after is not None
    assert after.status is CheckpointStatus.ACTIVE
    assert [change.status for change in after.history] == [
        CheckpointStatus.PAUSED, CheckpointStatus.ACTIVE]


async def test_a_read_showing_interrupts_otherwise_neither_reopens_nor_repeats_a_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """How an interrupt's value is shown may differ between processes (a set's order, a
    repr): a decided request stays decided, a pending one is not asked again."""
    store = CountingStore(MemoryStore())
    writer = _saver(store)
    with anyio.fail_after(DEADLINE):
        decided = await put(writer, "decided")
        await writer.aput_writes(config("decided", decided), [(INTERRUPT, {"q": 1})], "task")
        await writer.manager.approve("decided", approver="alice")
        pending = await put(writer, "pending")
        await writer.aput_writes(config("pending", pending), [(INTERRUPT, {"q": 2})], "task")
        monkeypatch.setattr(records, "json_value", lambda value: f"shown otherwise: {value!r}")
        reader = _saver(store)
        for thread in ("decided", "pending"):
            assert await reader.aget_tuple(config(thread)) is not None
        approved = await reader.manager.get_run("decided")
        waiting = await reader.manager.get_run("pending")
    assert approved is not None
    assert approved.status is CheckpointStatus.ACTIVE
    assert approved.approval is not None
    assert approved.approval["decision"] == "approved"
    assert waiting is not None
    assert waiting.status is CheckpointStatus.PAUSED
    assert waiting.approval is not None
    assert waiting.approval["request"]["interrupts"] == [{"value": {"q": 2}}]
    assert [change.status for change in waiting.history] == [CheckpointStatus.PAUSED]


async def test_a_read_never_reopens_a_request_of_its_checkpoint() -> None:
    """Two branches interrupt at one checkpoint; both are approved, the graph answers one,
    the other asks again (a new request at the same checkpoint), approved too. A read in
    another process sees every interrupt still written there, and leaves the decision."""
    from langgraph.types import Interrupt

    store = CountingStore(MemoryStore())
    writer = _saver(store)
    with anyio.fail_after(DEADLINE):
        first = await put(writer, "t")
        for task, asked in (("b1", Interrupt("q1", "id-1")), ("b2", Interrupt("q2", "id-2"))):
            await writer.aput_writes(config("t", first), [(INTERRUPT, [asked])], task)
        await writer.manager.approve("t", approver="alice")
        await writer.aput_writes(config("t", first), [(INTERRUPT, [Interrupt("q2", "id-3")])],
                                 "b2")
        await writer.manager.approve("t", approver="alice")
        found = await _saver(store).aget_tuple(config("t"))
        run = await writer.manager.get_run("t")
    assert found is not None
    assert len(found.pending_writes or []) == 2  # b1's first and b2's last
    assert run is not None
    assert run.status is CheckpointStatus.ACTIVE
    assert run.approval is not None
    assert run.approval["decision"] == "approved"
    assert run.approval["request"]["interrupts"] == [{"value": "q2", "id": "id-3"}]


async def test_a_read_leaves_a_thread_paused_by_hand_as_it_is() -> None:
    store = _StatusChangeFails(MemoryStore())
    writer = _saver(store)
    with anyio.fail_after(DEADLINE):
        await store.interrupted(writer)  # left unpaused, then paused by an operator
        await writer.manager.pause("t", request={"reason": "hold: legal review"})
        await _saver(store).aget_tuple(config("t"))
        run = await writer.manager.get_run("t")
    assert run is not None
    assert run.status is CheckpointStatus.PAUSED
    assert run.approval is not None
    assert run.approval["request"] == {"reason": "hold: legal review"}


async def test_a_read_replaces_a_request_the_graph_went_past() -> None:
    """Paused at one checkpoint, the graph went on (its status change failed) and asked
    again at the next (that pause failed too): a read asks the current question."""
    store = _StatusChangeFails(MemoryStore())
    writer = _saver(store)
    with anyio.fail_after(DEADLINE):
        first = await put(writer, "t")
        await writer.aput_writes(config("t", first), [(INTERRUPT, "q1")], "task")
        store.failing = True
        second = await put(writer, "t", parent=first)
        await writer.aput_writes(config("t", second), [(INTERRUPT, "q2")], "task")
        store.failing = False
        stale = await writer.manager.get_run("t")
        await _saver(store).aget_tuple(config("t"))
        run = await writer.manager.get_run("t")
    assert stale is not None
    assert stale.approval is not None
    assert stale.approval["request"]["checkpoint_id"] == first
    assert run is not None
    assert run.status is CheckpointStatus.PAUSED
    assert run.approval is not None
    assert run.approval["request"] == {"interrupts": [{"value": "q2"}], "checkpoint_id": second}


async def test_reads_of_interrupts_never_fail_and_ask_once() -> None:
    """Two tasks asking the same thing without ids are one request, asked once; a request
    recorded by hand in an unexpected shape never fails a read."""
    store = CountingStore(MemoryStore())
    saver = _saver(store)
    with anyio.fail_after(DEADLINE):
        twice = await put(saver, "twice")
        for task in ("one", "two"):
            await saver.aput_writes(config("twice", twice), [(INTERRUPT, "go?")], task)
        for _ in range(3):
            await _saver(store).aget_tuple(config("twice"))
        asked = await saver.manager.get_run("twice")
        odd = await put(saver, "odd")
        await saver.manager.pause("odd", request={
            "checkpoint_id": odd, "interrupts": [{"value": "go?", "id": ["not", "text"]}, 7]})
        await saver.aput_writes(config("odd", odd), [(INTERRUPT, "go?")], "task")
        found = await _saver(store).aget_tuple(config("odd"))
        odder = await put(saver, "odder")
        await saver.manager.pause("odder", request={"checkpoint_id": odder, "interrupts": 5})
        await saver.aput_writes(config("odder", odder), [(INTERRUPT, "go?")], "task")
        found_too = await _saver(store).aget_tuple(config("odder"))
    assert asked is not None
    assert [change.status for change in asked.history] == [
        CheckpointStatus.PAUSED, CheckpointStatus.PAUSED]
    assert found is not None
    assert found_too is not None


async def test_a_stale_read_of_an_interrupt_does_not_pause_a_thread_that_went_on() -> None:
    class SavedMeanwhile(_StatusChangeFails):
        """Another process saves the next checkpoint just before the read's status check."""

        then: Any = None

        async def get_run(self, *args: Any, **kwargs: Any) -> Any:
            if self.then is not None:
                then, self.then = self.then, None
                await then()
            return await super().get_run(*args, **kwargs)

    store = SavedMeanwhile(MemoryStore())
    writer = _saver(store)
    with anyio.fail_after(DEADLINE):
        first = await store.interrupted(writer)
        other = _saver(store)

        async def went_on() -> None:
            await put(other, "t", parent=first)

        store.then = went_on
        found = await _saver(store).aget_tuple(config("t"))
        run = await writer.manager.get_run("t")
    assert found is not None
    assert found.checkpoint["id"] == first
    assert run is not None
    assert run.status is CheckpointStatus.ACTIVE
    assert run.approval is None


async def test_a_rejected_thread_is_active_again_once_the_graph_goes_on() -> None:
    saver = _saver(MemoryStore())
    with anyio.fail_after(DEADLINE):
        first = await put(saver, "t")
        await saver.aput_writes(config("t", first), [(INTERRUPT, "run it?")], "task")
        rejected = await saver.manager.reject("t", approver="bob", reason="no")
        await put(saver, "t", parent=first)
        after = await saver.manager.get_run("t")
    assert rejected.status is CheckpointStatus.REJECTED
    assert after is not None
    assert after.status is CheckpointStatus.ACTIVE
    assert [change.status for change in after.history] == [
        CheckpointStatus.PAUSED, CheckpointStatus.REJECTED, CheckpointStatus.ACTIVE]


def _run(thread_id: str, langgraph_run: str) -> Any:
    return {"configurable": {"thread_id": thread_id, "run_id": langgraph_run}}


async def _interrupted_at(saver: FastCheckpointSaver, thread_id: str) -> str:
    found = await saver.aget_tuple(config(thread_id))
    assert found is not None
    assert [channel for _, channel, _ in found.pending_writes or ()] == [INTERRUPT]
    checkpoint_id: str = found.checkpoint["id"]
    return checkpoint_id


async def _queue(saver: FastCheckpointSaver) -> list[str]:
    return [run.run_id for run in await saver.manager.list_runs(CheckpointStatus.PAUSED)]


async def test_deleting_the_run_that_asked_takes_the_thread_out_of_the_queue() -> None:
    """A thread paused by a LangGraph run whose checkpoints ``delete_for_runs`` removes is
    ACTIVE again when no interrupt is left unanswered; paused about the latest checkpoint's
    interrupts when those are (a later run that went past them, deleted)."""
    saver = _saver(MemoryStore())
    graph = asking(saver)
    with anyio.fail_after(DEADLINE):
        await graph.ainvoke({"done": []}, _run("t", "first"))
        await graph.ainvoke(Command(resume="yes"), _run("t", "first"))  # answered, ended
        await graph.ainvoke({"done": []}, _run("t", "second"))
        before = await _queue(saver)
        await saver.adelete_for_runs(["second"])
        after = await _queue(saver)
        active = await saver.manager.get_run("t")
        await graph.ainvoke({"done": []}, _run("t", "third"))
        asked = await _interrupted_at(saver, "t")
        await graph.ainvoke({"done": []}, _run("t", "fourth"))  # went past the question
        await saver.adelete_for_runs(["fourth"])
        again = await saver.manager.get_run("t")
    assert before == ["t"]
    assert after == []
    assert active is not None
    assert active.status is CheckpointStatus.ACTIVE
    assert again is not None
    assert again.status is CheckpointStatus.PAUSED
    assert again.approval is not None
    assert again.approval["request"]["checkpoint_id"] == asked
    assert again.approval["request"]["interrupts"][0]["value"] == {"step": 3}


async def test_deleting_runs_leaves_answered_decided_and_hand_made_requests() -> None:
    """The run that answered an interrupt deleted: the answer (a resume written on the
    interrupted checkpoint) and a decision stand, the thread stays ACTIVE. A thread paused
    by hand stays paused. A thread still asking, whose older run is deleted, stays queued."""
    saver = _saver(MemoryStore())
    graph = asking(saver)
    with anyio.fail_after(DEADLINE):
        for thread in ("answered", "decided"):
            await graph.ainvoke({"done": []}, _run(thread, f"{thread}-ask"))
        await saver.manager.approve("decided", approver="alice")
        for thread in ("answered", "decided"):
            await graph.ainvoke(Command(resume="yes"), _run(thread, f"{thread}-resume"))
        for langgraph_run in ("by hand-0", "by hand-1"):
            await graph.ainvoke({"done": []}, _run("by hand", langgraph_run))
            await graph.ainvoke(Command(resume="yes"), _run("by hand", langgraph_run))
        await saver.manager.pause("by hand", request={"reason": "legal review"})
        await graph.ainvoke({"done": []}, _run("asking", "asking-1"))
        await graph.ainvoke(Command(resume="yes"), _run("asking", "asking-1"))
        await graph.ainvoke({"done": []}, _run("asking", "asking-2"))
        await saver.adelete_for_runs(["answered-resume", "decided-resume", "by hand-1",
                                      "asking-1"])
        runs = {thread: await saver.manager.get_run(thread)
                for thread in ("answered", "decided", "by hand", "asking")}
    assert {thread: run.status if run else None for thread, run in runs.items()} == {
        "answered": CheckpointStatus.ACTIVE, "decided": CheckpointStatus.ACTIVE,
        "by hand": CheckpointStatus.PAUSED, "asking": CheckpointStatus.PAUSED}
    assert runs["decided"] is not None
    assert runs["decided"].approval is not None
    assert runs["decided"].approval["decision"] == "approved"


async def test_deleting_runs_again_after_a_failed_status_change_puts_the_thread_right(
) -> None:
    store = _StatusChangeFails(MemoryStore())
    saver = _saver(store)
    graph = asking(saver)
    with anyio.fail_after(DEADLINE):
        await graph.ainvoke({"done": []}, _run("t", "first"))
        await graph.ainvoke(Command(resume="yes"), _run("t", "first"))
        await graph.ainvoke({"done": []}, _run("t", "second"))
        store.failing = True
        with pytest.raises(StoreError):
            await saver.adelete_for_runs(["second"])
        store.failing = False
        left = await _queue(saver)
        await saver.adelete_for_runs(["second"])
        after = await _queue(saver)
    assert left == ["t"]
    assert after == []


# -- configuration and arguments -----------------------------------------------------------------


async def test_a_store_without_the_capabilities_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="SupportsLabels and SupportsSharedItems"):
        FastCheckpointSaver(ForwardingStore(MemoryStore()))


@pytest.mark.parametrize(("options", "match"), [
    ({"ttl_seconds": 0}, "ttl_seconds"),
    ({"ttl_seconds": float("inf")}, "ttl_seconds"),
    ({"keep_latest": 0}, "keep_latest"),
    ({"config": object()}, "CheckpointConfig"),
])
async def test_bad_settings_are_configuration_errors(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        FastCheckpointSaver(MemoryStore(), **options)


async def test_bad_arguments_are_validation_errors() -> None:
    saver = _saver(MemoryStore())
    bad_calls: list[Any] = [
        lambda: saver.aget_tuple({"configurable": {}}),
        lambda: saver.aget_tuple({"configurable": {"thread_id": "a\x1fb"}}),
        lambda: saver.aget_tuple({"configurable": {"thread_id": ""}}),
        lambda: saver.aput_writes(config("t"), [("a", 1)], "no checkpoint id"),
        lambda: saver.aprune(["t"], strategy="everything"),
        lambda: saver.adelete_for_runs("not-a-list"),
        lambda: _ids(saver, config("t"), limit=-1),
    ]
    with anyio.fail_after(DEADLINE):
        for call in bad_calls:
            with pytest.raises(ValidationError):
                await call()


async def test_thread_ids_that_are_numbers_are_kept_as_text() -> None:
    saver = _saver(MemoryStore())
    with anyio.fail_after(DEADLINE):
        first = await saver.aput({"configurable": {"thread_id": 42, "checkpoint_ns": ""}},
                                 checkpoint(), {}, {})
        found = await saver.aget_tuple(config("42"))
    assert first["configurable"]["thread_id"] == "42"
    assert found is not None


def test_versions_increase_and_differ_on_every_branch() -> None:
    saver = FastCheckpointSaver(MemoryStore())
    first = saver.get_next_version(None, None)
    second = saver.get_next_version(first, None)
    sibling = saver.get_next_version(first, None)
    from_int = saver.get_next_version(7, None)  # type: ignore[arg-type]
    assert first.startswith("0" * 31 + "1.")
    assert first < second
    assert second.split(".")[0] == sibling.split(".")[0]
    assert second != sibling
    assert from_int.startswith("0" * 31 + "8.")
    with pytest.raises(ValidationError):
        saver.get_next_version("not a version", None)


@pytest.mark.parametrize(("environ", "expected"), [
    ({"CHECKPOINT_MODE": "development"}, (MemoryStore, None, None)),
    ({"CHECKPOINT_MODE": "development", "CHECKPOINT_TTL_DAYS": "2"},
     (MemoryStore, 2 * 86400.0, None)),
    ({"FASTCHECKPOINT_URL": "memory://", "FASTCHECKPOINT_MAX_CHECKPOINTS_PER_RUN": "5",
      "FASTCHECKPOINT_DEFAULT_TTL_SECONDS": "60"}, (MemoryStore, 60.0, 5)),
])
async def test_from_env_reads_the_managers_variables(
    environ: dict[str, str], expected: tuple[type, float | None, int | None]
) -> None:
    saver = FastCheckpointSaver.from_env(environ)
    assert (type(saver.store), saver.ttl_seconds, saver.keep_latest) == expected
    await saver.aclose()


async def test_from_env_refuses_an_unknown_mode() -> None:
    with pytest.raises(ConfigurationError, match="CHECKPOINT_MODE"):
        FastCheckpointSaver.from_env({"CHECKPOINT_MODE": "staging"})


async def test_every_error_is_a_checkpoint_error() -> None:
    saver = _saver(MemoryStore())
    with anyio.fail_after(DEADLINE), pytest.raises(CheckpointError):
        await saver.aput(config("t"), {"id": ""}, {}, {})  # type: ignore[typeddict-item]


async def test_from_env_in_production_mode_saves_to_dynamodb_and_s3(
    dynamodb_for_savers: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastcheckpoint.stores.dynamodb import DynamoDBStore

    table, bucket, endpoint = dynamodb_for_savers
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # botocore's own variable
    environ = {"CHECKPOINT_MODE": "production", "CHECKPOINT_TABLE_NAME": table,
               "CHECKPOINT_S3_BUCKET": bucket, "CHECKPOINT_TTL_DAYS": "90"}
    with anyio.fail_after(STORE_DEADLINE):
        async with FastCheckpointSaver.from_env(environ) as saver:
            assert isinstance(saver.store, DynamoDBStore)
            _, s3 = await saver.store.clients()
            before = await s3.list_objects_v2(Bucket=bucket)
            large = os.urandom(500_000)  # above DynamoDB's item limit: the value goes to S3
            first = await put(saver, "prod", values={"small": 1, "large": large},
                              versions={"small": 1, "large": 1})
            after = await s3.list_objects_v2(Bucket=bucket)
            found = await saver.aget_tuple(config("prod"))
            run = await saver.manager.get_run("prod")
    assert after.get("KeyCount", 0) == before.get("KeyCount", 0) + 1
    assert (saver.store.table, saver.store.bucket) == (table, bucket)
    assert saver.ttl_seconds == 90 * 86400
    assert found is not None
    assert found.checkpoint["id"] == first
    assert found.checkpoint["channel_values"] == {"small": 1, "large": large}
    assert run is not None
    assert run.expires_at is not None
    assert run.expires_at > time.time() + 89 * 86400


async def test_prune_with_the_delete_strategy_removes_every_namespace() -> None:
    memory = MemoryStore()
    saver = _saver(memory)
    with anyio.fail_after(DEADLINE):
        root = await put(saver, "t", values={"a": 1}, versions={"a": 1})
        await put(saver, "t", ns="child:1", values={"a": 2}, versions={"a": 1})
        await saver.aput_writes(config("t", root), [("a", 3)], "task")
        kept = await put(saver, "other")
        await saver.aprune(["t"], strategy="delete")
        left = await _ids(saver, None)
        runs = [run.run_id for run in await saver.manager.list_runs()]
        stored = await _items(memory, "t", [records.blob_key("a", 1),
                                            records.write_key(0, "task", 0)])
    assert left == [kept]
    assert runs == ["other"]
    assert stored == {}


@pytest.mark.parametrize("compress_min_bytes", [None, 0, 64, 1 << 20])
def test_item_values_are_the_records_the_codec_writes(compress_min_bytes: int | None) -> None:
    """Item values are the manager's codec records (framed, checksummed, compressed alike)."""
    codec = Codec(compress_min_bytes=compress_min_bytes)
    items = records.ItemCodec(codec)
    encoder = msgspec.msgpack.Encoder()
    values: list[Any] = [
        ("json", b""), ("msgpack", b"x" * 10), ("msgpack", bytes(range(256)) * 40),
        records.Located("inc", 3, None), records.Located("inc", 2**40, 1.5),
        records.StoredWrite("task", "path", "channel", -1, ("json", b"{}")),
        records.RegistryEntry("thread\x1fns"),
    ]
    for value in values:
        blob = items.encode(value)
        assert blob == codec.encode_payload({"v": encoder.encode(value)}, [], [], {})
        assert items.decode(blob, type(value), "here") == value
        other = codec.encode_payload({"v": encoder.encode(value), "x": [1]}, [2], [], {"y": 3})
        assert items.decode(other, type(value), "here") == value  # any record with a "v"
        damaged = blob[:-1] + bytes([blob[-1] ^ 1])
        with pytest.raises(CorruptCheckpointError):
            items.decode(damaged, type(value), "here")


async def test_writes_parked_together_all_return_when_no_save_comes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two calls park writes for one checkpoint that never comes; the first to give up does
    not leave the other waiting for good."""
    monkeypatch.setattr(saver_module, "_PARKED_SECONDS", 0.2)
    saver = _saver(MemoryStore())
    first = await put(saver, "t")
    coming = checkpoint()  # newer than any saved: it may still come
    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as group:
            group.start_soon(saver.aput_writes, config("t", coming["id"]), [("x", 1)], "a")
            await anyio.sleep(0.05)
            group.start_soon(saver.aput_writes, config("t", coming["id"]), [("x", 2)], "b")
    assert saver._state.parked.get((run_key("t"), coming["id"])) is None
    assert await saver.aget_tuple(config("t", first)) is not None


async def test_writes_whose_calls_were_all_cancelled_are_not_kept_parked() -> None:
    """Parked writes are held for the calls that wait for them: once every one of them is
    cancelled, nothing is kept (it was kept until a save of that checkpoint came, maybe
    never); while one still waits, they stay."""
    saver = _saver(MemoryStore())
    await put(saver, "t")
    coming = checkpoint()
    slot = (run_key("t"), coming["id"])
    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as group:
            group.start_soon(saver.aput_writes, config("t", coming["id"]), [("x", 1)], "a")
            group.start_soon(saver.aput_writes, config("t", coming["id"]), [("x", 2)], "b")
            await anyio.sleep(0.05)
            parked = saver._state.parked.get(slot)
            assert parked is not None
            assert parked.waiting == 2
            group.cancel_scope.cancel()
    assert saver._state.parked.get(slot) is None
