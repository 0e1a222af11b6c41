"""The LangGraph saver under asyncio's own cancellations (``task.cancel()``, ``asyncio.wait_for``:
how LangGraph and its callers cancel), which anyio's shields do not hold back: a cancelled
save never makes a later call wait out a timeout, drop writes it acknowledged, or report a
checkpoint saved that is not. asyncio only: anyio's and trio's cancellations wait for a
worker thread that has begun."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio
import pytest

from fastcheckpoint import CheckpointStatus, FileStore, MemoryStore
from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
from tests._helpers import FakeClock, make_config
from tests.integrations._langgraph_support import checkpoint, config, metadata

pytestmark = pytest.mark.anyio

DEADLINE = 10.0
"""Far below the 30 s a parked write waits for its checkpoint's save."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _saver(store: Any) -> FastCheckpointSaver:
    return FastCheckpointSaver(store, config=make_config(FakeClock()))


def _held_appends(store: FileStore) -> tuple[threading.Event, threading.Event]:
    """The file store's appends wait, in their worker thread, until the second event is set;
    the first is set when one is waiting."""
    waiting, go = threading.Event(), threading.Event()
    real: Callable[..., Any] = store._append  # type: ignore[attr-defined]

    def held(*args: Any, **kwargs: Any) -> Any:
        waiting.set()
        go.wait(DEADLINE)
        return real(*args, **kwargs)

    store._append = held  # type: ignore[method-assign]
    return waiting, go


def _held_saves(saver: FastCheckpointSaver) -> Callable[[], None]:
    """The saver's saves wait for good before they reach the store (until their task is
    cancelled; once an append is under way, a cancellation waits for it); the function
    returned lets later saves through."""
    real = saver._encode

    async def held(*args: Any, **kwargs: Any) -> Any:
        await asyncio.Event().wait()
        return await real(*args, **kwargs)

    saver._encode = held  # type: ignore[method-assign]
    return lambda: setattr(saver, "_encode", real)


async def _until(event: threading.Event) -> None:
    while not event.is_set():  # noqa: ASYNC110 (set by a worker thread)
        await asyncio.sleep(0.001)


@pytest.mark.parametrize("known", [False, True], ids=["new-thread", "known-thread"])
async def test_writes_sent_while_a_cancelled_save_lands_are_kept(
    tmp_path: Path, known: bool
) -> None:
    """The save's worker thread goes on after its task is cancelled and stores the
    checkpoint; the writes sent for it meanwhile are stored with it, at once."""
    store = FileStore(tmp_path, fsync=False)
    saver = _saver(store)
    parent_config = config("t")
    if known:
        first = checkpoint()
        parent_config = await saver.aput(config("t"), first, metadata(-1), {})
    saved = checkpoint()
    waiting, go = _held_appends(store)
    save = asyncio.create_task(saver.aput(parent_config, saved, metadata(0), {}))
    await asyncio.wait_for(_until(waiting), DEADLINE)
    writes = asyncio.create_task(
        saver.aput_writes(config("t", saved["id"]), [("messages", "w")], "task"))
    await asyncio.sleep(0.01)
    save.cancel()
    await asyncio.sleep(0.05)
    assert not save.done()  # its cancellation waits for its worker thread
    go.set()
    started = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await save
    await asyncio.wait_for(writes, DEADLINE)
    assert time.monotonic() - started < DEADLINE / 2
    found = await saver.aget_tuple(config("t", saved["id"]))
    assert found is not None
    assert found.pending_writes == [("task", "messages", "w")]
    again = await _saver(FileStore(tmp_path, fsync=False)).aget_tuple(
        config("t", saved["id"]))
    assert again is not None
    assert again.pending_writes == [("task", "messages", "w")]


async def test_writes_parked_behind_a_cancelled_save_are_released_at_once() -> None:
    """LangGraph makes no save after one that was cancelled (each waits for the one before):
    writes parked for the next checkpoint are released at once, as after a failed save,
    instead of waiting 30 s for a save that will not come."""
    store = MemoryStore()
    saver = _saver(store)
    first, second, third = checkpoint(), checkpoint(), checkpoint()
    first_config = await saver.aput(config("t"), first, metadata(-1), {})
    _held_saves(saver)
    save = asyncio.create_task(saver.aput(first_config, second, metadata(0), {}))
    await asyncio.sleep(0.01)
    writes = asyncio.create_task(
        saver.aput_writes(config("t", third["id"]), [("messages", "w")], "task"))
    await asyncio.sleep(0.01)
    save.cancel()
    started = time.monotonic()
    await asyncio.wait_for(writes, DEADLINE)
    assert time.monotonic() - started < DEADLINE / 2
    assert save.cancelled()


async def test_a_save_racing_a_cancelled_one_of_the_same_checkpoint_saves_it() -> None:
    """Two saves of one checkpoint: the second waits for the first; the first is cancelled
    before it stored anything, so the second saves the checkpoint rather than reporting it
    saved."""
    store = MemoryStore()
    saver = _saver(store)
    first, second = checkpoint(), checkpoint()
    first_config = await saver.aput(config("t"), first, metadata(-1), {})
    release = _held_saves(saver)
    one = asyncio.create_task(saver.aput(first_config, second, metadata(0), {}))
    await asyncio.sleep(0.01)
    release()
    other = asyncio.create_task(saver.aput(first_config, second, metadata(0), {}))
    await asyncio.sleep(0.01)
    one.cancel()
    saved = await asyncio.wait_for(other, DEADLINE)
    assert one.cancelled()
    found = await saver.aget_tuple(saved)
    assert found is not None
    assert found.checkpoint["id"] == second["id"]


async def test_an_interrupt_parked_for_a_cancelled_save_that_landed_pauses_the_thread(
    tmp_path: Path,
) -> None:
    """An interrupt written for a checkpoint whose save has not begun waits for it; the save
    takes it, lands, and its task is cancelled meanwhile. The writes were stored, so the
    thread is paused with its approval request, as if the save had returned."""
    store = FileStore(tmp_path, fsync=False)
    saver = _saver(store)
    saved = checkpoint()
    writes = asyncio.create_task(saver.aput_writes(
        config("t", saved["id"]), [("__interrupt__", {"q": 1})], "task"))
    await asyncio.sleep(0.05)  # parked: the run is new, the checkpoint not saved yet
    waiting, go = _held_appends(store)
    save = asyncio.create_task(saver.aput(config("t"), saved, metadata(0), {}))
    await asyncio.wait_for(_until(waiting), DEADLINE)
    save.cancel()
    go.set()
    with pytest.raises(asyncio.CancelledError):
        await save
    await asyncio.wait_for(writes, DEADLINE)
    found = await saver.aget_tuple(config("t", saved["id"]))
    assert found is not None
    assert found.pending_writes == [("task", "__interrupt__", {"q": 1})]
    run = await saver.manager.get_run("t")
    assert run is not None
    assert run.status is CheckpointStatus.PAUSED


def _held(store: FileStore, method: str) -> tuple[threading.Event, threading.Event]:
    """The file store's ``method`` (run in its worker thread) waits until the second event is
    set; the first is set when it is waiting."""
    waiting, go = threading.Event(), threading.Event()
    real: Callable[..., Any] = getattr(store, method)

    def held(*args: Any, **kwargs: Any) -> Any:
        waiting.set()
        go.wait(DEADLINE)
        return real(*args, **kwargs)

    setattr(store, method, held)
    return waiting, go


async def _cancelled_under_way(
    call: Coroutine[Any, Any, Any], waiting: threading.Event, go: threading.Event
) -> None:
    """Run ``call``, cancel it once its held store call is waiting, then let that go on:
    the call ends with its cancellation."""
    task = asyncio.create_task(call)
    await asyncio.wait_for(_until(waiting), DEADLINE)
    task.cancel()
    go.set()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_interrupt_stored_by_a_cancelled_call_has_paused_the_thread(
    tmp_path: Path,
) -> None:
    """An interrupt whose ``aput_writes`` is cancelled while the store writes it: when the
    cancellation is raised, the interrupt is stored and the thread PAUSED with it (the
    approval queue lists it; ``approve`` works)."""
    store = FileStore(tmp_path, fsync=False)
    saver = _saver(store)
    saved = await saver.aput(config("t"), checkpoint(), metadata(0), {})
    waiting, go = _held(store, "_put_owned_items")
    await _cancelled_under_way(
        saver.aput_writes(saved, [("__interrupt__", {"q": 1})], "task"), waiting, go)
    run = await saver.manager.get_run("t")
    assert run is not None
    assert run.status is CheckpointStatus.PAUSED
    await saver.manager.approve("t", approver="ops")


async def test_a_save_cancelled_once_it_landed_after_an_interrupt_has_resumed_the_thread(
    tmp_path: Path,
) -> None:
    """The save after an interrupt (the graph went on) cancelled while the store writes it:
    when the cancellation is raised, the thread is ACTIVE again, not left in the queue."""
    store = FileStore(tmp_path, fsync=False)
    saver = _saver(store)
    first = await saver.aput(config("t"), checkpoint(), metadata(0), {})
    await saver.aput_writes(first, [("__interrupt__", {"q": 1})], "task")
    paused = await saver.manager.get_run("t")
    assert paused is not None
    assert paused.status is CheckpointStatus.PAUSED
    waiting, go = _held_appends(store)
    await _cancelled_under_way(saver.aput(first, checkpoint(), metadata(1), {}), waiting, go)
    run = await saver.manager.get_run("t")
    assert run is not None
    assert run.status is CheckpointStatus.ACTIVE


async def test_regular_and_special_writes_cancelled_under_way_land_together(
    tmp_path: Path,
) -> None:
    """A failing task's writes (LangGraph's ``__error_source_node__``, a regular write, and
    ``__error__``, a special one) are two store calls: cancelled while the first runs, the
    call ends with both stored (LangGraph takes a task with writes but no error as done)."""
    store = FileStore(tmp_path, fsync=False)
    saver = _saver(store)
    saved = await saver.aput(config("t"), checkpoint(), metadata(0), {})
    waiting, go = _held(store, "_put_owned_items")
    await _cancelled_under_way(saver.aput_writes(
        saved, [("__error_source_node__", "node"), ("__error__", "boom")], "task"), waiting, go)
    found = await _saver(store).aget_tuple(saved)
    assert found is not None
    assert sorted(channel for _, channel, _ in found.pending_writes) == [
        "__error__", "__error_source_node__"]


async def test_parked_writes_a_save_took_land_before_their_cancelled_call_ends() -> None:
    """Writes parked for a checkpoint whose save is running: cancelled once that save took
    them, the call ends when the save stored them, with the thread PAUSED for an interrupt
    among them (not after the caller was told the call ended)."""
    store = MemoryStore()
    store.never_suspends = False  # its append waits below
    saver = _saver(store)
    first, second = checkpoint(), checkpoint()
    first_config = await saver.aput(config("t"), first, metadata(-1), {})
    real = saver._store.append_with_items
    taken, go = asyncio.Event(), asyncio.Event()

    async def held(*args: Any, **kwargs: Any) -> Any:
        taken.set()
        await go.wait()
        return await real(*args, **kwargs)

    saver._store.append_with_items = held  # type: ignore[method-assign]
    writes = asyncio.create_task(
        saver.aput_writes(config("t", second["id"]), [("__interrupt__", {"q": 1})], "task"))
    await asyncio.sleep(0.01)  # parked: the checkpoint is not saved yet
    save = asyncio.create_task(saver.aput(first_config, second, metadata(0), {}))
    await asyncio.wait_for(taken.wait(), DEADLINE)  # the save took them and is storing them
    writes.cancel()
    await asyncio.sleep(0.01)
    assert not writes.done()  # waits for the save that carries its writes
    go.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(writes, DEADLINE)
    run = await saver.manager.get_run("t")
    assert run is not None
    assert run.status is CheckpointStatus.PAUSED
    await asyncio.wait_for(save, DEADLINE)


async def _save_held_in_the_store(
    tmp_path: Path,
) -> tuple[FastCheckpointSaver, Any, asyncio.Task[Any], threading.Event]:
    """A file store saver whose second save of thread ``t`` is under way, its append held
    until the event returned is set: (saver, that checkpoint, its save's task, the event)."""
    store = FileStore(tmp_path, fsync=False)
    saver = _saver(store)
    first = await saver.aput(config("t"), checkpoint(), metadata(-1), {})
    waiting, go = _held(store, "_append")
    second = checkpoint()
    save = asyncio.create_task(saver.aput(first, second, metadata(0), {}))
    await asyncio.wait_for(_until(waiting), DEADLINE)
    return saver, second, save, go


async def test_a_read_drain_and_aclose_wait_for_the_saves_under_way(tmp_path: Path) -> None:
    """A graph run cut short by a timeout returns while LangGraph's calls to the saver go on
    (LangGraph does not wait for them): a read of the namespace in this process waits for
    them, and so do ``drain`` and ``aclose``."""
    saver, second, save, go = await _save_held_in_the_store(tmp_path)
    read = asyncio.create_task(saver.aget_tuple(config("t")))
    drained = asyncio.create_task(saver.drain())
    closing = asyncio.create_task(saver.aclose())
    await asyncio.sleep(0.05)
    assert not read.done()
    assert not drained.done()
    assert not closing.done()
    go.set()
    await asyncio.wait_for(drained, DEADLINE)
    found = await asyncio.wait_for(read, DEADLINE)
    assert found is not None
    assert found.checkpoint["id"] == second["id"]
    await asyncio.wait_for(closing, DEADLINE)
    await asyncio.wait_for(save, DEADLINE)


async def test_drain_waits_for_writes_waiting_on_their_save(tmp_path: Path) -> None:
    """An interrupt write whose checkpoint's save is still running waits for it: ``drain``
    (and a read) return only once the write landed and paused the thread."""
    saver, second, save, go = await _save_held_in_the_store(tmp_path)
    writes = asyncio.create_task(saver.aput_writes(
        config("t", second["id"]), [("__interrupt__", {"q": 1})], "task"))
    await asyncio.sleep(0.01)
    drained = asyncio.create_task(saver.drain("t"))
    other = asyncio.create_task(saver.drain("another thread"))
    await asyncio.wait_for(other, DEADLINE)  # nothing of its own under way
    await asyncio.sleep(0.05)
    assert not drained.done()
    go.set()
    await asyncio.wait_for(drained, DEADLINE)
    assert writes.done()
    run = await saver.manager.get_run("t")
    assert run is not None
    assert run.status is CheckpointStatus.PAUSED
    found = await saver.aget_tuple(config("t"))
    assert found is not None
    assert [channel for _, channel, _ in found.pending_writes] == ["__interrupt__"]
    await asyncio.wait_for(save, DEADLINE)


# -- thread operations: several store calls each ----------------------------------------------


class _CancelledMidway:
    """The store's ``method`` cancels ``caller`` once its first call has returned, then lets
    the event loop turn (as a store whose calls wait on I/O would): the operation's next
    store call is where the cancellation lands, unless the operation holds it back."""

    def __init__(self, store: MemoryStore, method: str) -> None:
        self.caller: asyncio.Task[Any] | None = None
        self.calls = 0
        original = getattr(store, method)

        async def cancelling(*args: Any, **kwargs: Any) -> Any:
            result = await original(*args, **kwargs)
            self.calls += 1
            if self.calls == 1 and self.caller is not None:
                self.caller.cancel()
            await asyncio.sleep(0)
            return result

        setattr(store, method, cancelling)

    async def run(self, operation: Coroutine[Any, Any, Any]) -> None:
        self.caller = asyncio.ensure_future(operation)
        with pytest.raises(asyncio.CancelledError):
            await self.caller
        self.caller = None


async def _two_namespaces(saver: FastCheckpointSaver, thread: str) -> None:
    """A thread with a root and a subgraph namespace, two checkpoints each."""
    for ns in ("", "child:1"):
        parent = None
        for step in range(2):
            made = checkpoint({"n": step}, {"n": str(step + 1)})
            saved = await saver.aput(config(thread, parent, ns), made, metadata(step),
                                     {"n": str(step + 1)})
            parent = saved["configurable"]["checkpoint_id"]


async def _listed(saver: FastCheckpointSaver, thread: str) -> list[tuple[str, str]]:
    return sorted([(found.config["configurable"]["checkpoint_ns"],
                    found.config["configurable"]["checkpoint_id"])
                   async for found in saver.alist({"configurable": {"thread_id": thread}})])


@pytest.mark.parametrize("operation", ["delete", "prune-delete", "prune-latest", "copy"])
async def test_a_thread_operation_cancelled_midway_ends_whole(operation: str) -> None:
    """Deleting, pruning or copying a thread takes a store call per namespace or checkpoint;
    cancelled after the first, it ends whole before the caller gets the cancellation: never
    a thread that lists without its root, a root without its subgraph, or half a copy."""
    store = MemoryStore()
    saver = _saver(store)
    with anyio.fail_after(DEADLINE):
        await _two_namespaces(saver, "t")
        source = await _listed(saver, "t")
        method = "append_with_items" if operation == "copy" else (
            "delete" if operation == "prune-latest" else "delete_run")
        cut = _CancelledMidway(store, method)
        if operation == "delete":
            await cut.run(saver.adelete_thread("t"))
        elif operation == "prune-delete":
            await cut.run(saver.aprune(["t"], strategy="delete"))
        elif operation == "prune-latest":
            await cut.run(saver.aprune(["t"]))
        else:
            await cut.run(saver.acopy_thread("t", "copy"))
        left = await _listed(saver, "t")
        copied = await _listed(saver, "copy")
    assert cut.calls > 1  # the operation went on after the cancellation
    if operation in ("delete", "prune-delete"):
        assert left == []
    elif operation == "prune-latest":
        assert sorted(ns for ns, _ in left) == ["", "child:1"]  # the newest of each
    else:
        assert copied == source
