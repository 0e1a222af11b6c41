"""Two savers on one store (two processes, or two savers in one): thread operations of one
(delete, copy, prune, delete_for_runs) racing the saves, writes and reads of the other, and
what a saver remembers of a thread after the other deleted, copied into, pruned or started it
again."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypedDict

import anyio
import pytest
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

from fastcheckpoint import CheckpointStatus, MemoryStore
from fastcheckpoint.errors import ConflictError
from fastcheckpoint.integrations import _langgraph_records as records
from fastcheckpoint.integrations import langgraph as saver_module
from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
from tests._helpers import FakeClock, make_config
from tests.integrations._langgraph_support import (
    CountingStore,
    checkpoint,
    config,
    metadata,
    put,
)
from tests.integrations.conftest import KINDS, FreshStore

pytestmark = pytest.mark.anyio

DEADLINE = 60
"""Per test: S3 and DynamoDB on moto are slow."""


def _saver(store: Any, **options: Any) -> FastCheckpointSaver:
    return FastCheckpointSaver(store, config=make_config(FakeClock()), **options)


async def _ids(saver: FastCheckpointSaver, thread_id: str) -> list[str]:
    return [found.checkpoint["id"] async for found in saver.alist(config(thread_id))]


# -- a save continuing a life of the thread that another saver ended ------------------------------


async def test_a_save_continuing_a_deleted_life_never_lands_in_the_next_one(
    fresh_store: FreshStore,
) -> None:
    async with fresh_store() as store:
        saver, other = _saver(store), _saver(store)
        with anyio.fail_after(DEADLINE):
            # Started again by the other saver.
            old = await put(saver, "t", values={"x": "old"}, versions={"x": "1.a"})
            await other.adelete_thread("t")
            new = await put(other, "t", values={"x": "new"}, versions={"x": "1.b"})
            late = await put(saver, "t", parent=old, values={"x": "late", "y": "late"},
                             versions={"x": "2.a", "y": "1.a"})
            await put(saver, "t", parent=late, values={"x": "later", "y": "late"},
                      versions={"x": "3.a", "y": "1.a"}, new_versions={"x": "3.a"})
            restarted = await _ids(other, "t")
            latest = await other.aget_tuple(config("t"))
            # Copied into by the other saver (a copy keeps the source's checkpoint ids).
            gone = await put(saver, "c", values={"x": "old"}, versions={"x": "1.a"})
            source = await put(other, "s", values={"x": "source"}, versions={"x": "1.s"})
            await other.adelete_thread("c")
            await other.acopy_thread("s", "c")
            await put(saver, "c", parent=gone, values={"x": "late"}, versions={"x": "2.a"})
            copied = await _ids(other, "c")
            # Put back by the other saver (copied away and back): the same life goes on.
            kept = await put(saver, "k", values={"x": "1"}, versions={"x": "1.a"})
            await other.acopy_thread("k", "backup")
            await other.adelete_thread("k")
            await other.acopy_thread("backup", "k")
            after = await put(saver, "k", parent=kept, values={"x": "2"}, versions={"x": "2.a"})
            restored = await _ids(other, "k")
    assert restarted == [new]
    assert latest is not None
    assert latest.checkpoint["channel_values"] == {"x": "new"}
    assert copied == [source]
    assert restored == [after, kept]


class _Chat(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def _chat(saver: FastCheckpointSaver, gate: tuple[asyncio.Event, asyncio.Event] | None = None
          ) -> Any:
    async def answer(state: _Chat) -> dict[str, Any]:
        if gate is not None:
            gate[0].set()
            await gate[1].wait()
        return {"messages": [AIMessage(f"answer to {state['messages'][-1].content}")]}

    async def close(state: _Chat) -> dict[str, Any]:
        return {"messages": [AIMessage("done")]}

    graph = StateGraph(_Chat)
    graph.add_node("answer", answer)
    graph.add_node("close", close)
    graph.add_edge(START, "answer")
    graph.add_edge("answer", "close")
    graph.add_edge("close", END)
    return graph.compile(checkpointer=saver)


async def test_a_graph_run_outliving_a_delete_leaves_the_new_conversation_alone(
    fresh_store: FreshStore,
) -> None:
    async with fresh_store() as store:
        saver, other = _saver(store), _saver(store)
        thread = {"configurable": {"thread_id": "chat"}}
        with anyio.fail_after(DEADLINE):
            await _chat(saver).ainvoke({"messages": [HumanMessage("old 1")]}, thread)
            gate = (asyncio.Event(), asyncio.Event())
            running = asyncio.create_task(_chat(saver, gate).ainvoke(
                {"messages": [HumanMessage("old 2")]}, thread, durability="sync"))
            await gate[0].wait()  # mid-step: its next saves are on their way
            await other.adelete_thread("chat")
            await _chat(other).ainvoke({"messages": [HumanMessage("new 1")]}, thread)
            gate[1].set()
            await running
            state = await _chat(other).aget_state(thread)
    assert [message.content for message in state.values["messages"]] == [
        "new 1", "answer to new 1", "done"]


# -- delete_for_runs while the LangGraph run goes on in another saver -----------------------------


async def test_a_run_deleted_while_it_goes_on_elsewhere_is_found_by_the_next_delete(
    fresh_store: FreshStore,
) -> None:
    async with fresh_store() as store:
        saver, other = _saver(store), _saver(store)
        with anyio.fail_after(DEADLINE):
            # The thread keeps another run's checkpoint: it stays while the run's go.
            kept = await put(saver, "t", run_id="earlier")
            await put(saver, "t", parent=kept, run_id="r")
            await other.adelete_for_runs(["r"])
            await put(saver, "t", parent=kept, run_id="r")  # the run goes on
            # A thread holding only the run's checkpoints goes, and is started again.
            await put(saver, "u", run_id="r")
            await other.adelete_for_runs(["r"])
            await put(saver, "u", run_id="r")
            await _saver(store).adelete_for_runs(["r"])
            left = {thread: await _ids(other, thread) for thread in ("t", "u")}
    assert left == {"t": [kept], "u": []}


async def test_a_graph_run_deleted_midway_leaves_nothing_once_deleted_again(
    fresh_store: FreshStore,
) -> None:
    async with fresh_store() as store:
        saver, other = _saver(store), _saver(store)
        thread: Any = {"configurable": {"thread_id": "chat"}}
        with anyio.fail_after(DEADLINE):
            await _chat(saver).ainvoke({"messages": [HumanMessage("first")]},
                                       {**thread, "metadata": {"run_id": "first"}})
            gate = (asyncio.Event(), asyncio.Event())
            running = asyncio.create_task(_chat(saver, gate).ainvoke(
                {"messages": [HumanMessage("second")]},
                {**thread, "metadata": {"run_id": "second"}}, durability="sync"))
            await gate[0].wait()
            await other.adelete_for_runs(["second"])
            gate[1].set()
            await running
            await other.adelete_for_runs(["second"])
            left = [found.metadata["run_id"] async for found in other.alist(thread)]
    assert left == ["first"] * 4


# -- copy_thread while another saver writes into the copy or deletes the source ------------------


class _BeforeRead(CountingStore):
    """Runs ``hook`` before the ``at``-th read of a checkpoint by sequence (a copy reads each
    checkpoint of the source so), and the same for ``delete_run`` (``at_delete``)."""

    def __init__(self, inner: Any, hook: Callable[[], Awaitable[Any]], *, at: int = 0,
                 at_delete: int = 0) -> None:
        super().__init__(inner)
        self.hook, self.at, self.at_delete = hook, at, at_delete
        self.reads = self.deletes = 0

    async def read_with_items(self, run_key: str, *, sequence: int | None, now: float) -> Any:
        if sequence is not None:
            self.reads += 1
            if self.reads == self.at:
                await self.hook()
        return await self.inner.read_with_items(run_key, sequence=sequence, now=now)

    async def delete_run(self, run_key: str) -> int:
        removed: int = await self.inner.delete_run(run_key)
        self.deletes += 1
        if self.deletes == self.at_delete:
            await self.hook()
        return removed


async def _with_subgraph(saver: FastCheckpointSaver, thread: str) -> list[tuple[str, str]]:
    """A thread with a root (two checkpoints) and a subgraph namespace; its (ns, id) pairs."""
    first = await put(saver, thread, values={"x": 1}, versions={"x": "1.a"})
    second = await put(saver, thread, parent=first, values={"x": 2}, versions={"x": "2.a"})
    child = await put(saver, thread, ns="child:1", values={"y": 1}, versions={"y": "1.a"})
    return sorted([("", first), ("", second), ("child:1", child)])


async def _listed(saver: FastCheckpointSaver, thread: str) -> list[tuple[str, str]]:
    """Every namespace's checkpoints, as (namespace, id)."""
    return sorted([(found.config["configurable"]["checkpoint_ns"],
                    found.config["configurable"]["checkpoint_id"])
                   async for found in saver.alist({"configurable": {"thread_id": thread}})])


async def test_a_copy_into_a_thread_written_meanwhile_fails_with_nothing_copied(
    fresh_store: FreshStore,
) -> None:
    async with fresh_store() as store:
        other = _saver(store)
        mine: list[str] = []

        async def write_into_the_copy() -> None:
            mine.append(await put(other, "copy", values={"x": "mine"}, versions={"x": "1.m"}))

        copier = _saver(_BeforeRead(store, write_into_the_copy, at=2))
        with anyio.fail_after(DEADLINE):
            await _with_subgraph(other, "s")
            with pytest.raises(ConflictError):
                await copier.acopy_thread("s", "copy")
            left = await _listed(other, "copy")
    assert left == [("", mine[0])]  # the other's checkpoint, nothing of the copy


async def test_a_copy_of_a_thread_deleted_meanwhile_fails_with_nothing_copied(
    fresh_store: FreshStore,
) -> None:
    async with fresh_store() as store:
        other = _saver(store)
        copier = _saver(_BeforeRead(store, lambda: other.adelete_thread("s"), at=2))
        with anyio.fail_after(DEADLINE):
            await _with_subgraph(other, "s")
            with pytest.raises(ConflictError):
                await copier.acopy_thread("s", "copy")
            left = await _listed(other, "copy")
    assert left == []


async def test_a_thread_being_deleted_is_seen_whole_or_not_at_all(fresh_store: FreshStore) -> None:
    """The root namespace goes first: a copy (or a graph run reading the root) made while
    the other namespaces are still being deleted copies nothing, never a root without the
    subgraph checkpoint it resumes from."""
    async with fresh_store() as store:
        copier = _saver(store)
        copies: list[str] = []

        async def copy_meanwhile() -> None:
            copies.append(f"copy-{len(copies)}")
            await copier.acopy_thread(thread, copies[-1])

        deleter = _saver(_BeforeRead(store, copy_meanwhile, at_delete=1))
        with anyio.fail_after(DEADLINE):
            for number in range(6):  # the order of a thread's namespaces is the hash's
                thread = f"t{number}"
                await _with_subgraph(copier, thread)
                deleter.store.deletes = 0  # type: ignore[attr-defined]
                await deleter.adelete_thread(thread)
            left = [await _listed(copier, copy) for copy in copies]
    assert left == [[]] * 6


# -- status changes that follow a store call, with the thread started again in between -----------


class _Then(CountingStore):
    """Runs ``hook`` once the next call of ``method`` returned (armed with :meth:`arm`)."""

    def __init__(self, inner: Any, method: str) -> None:
        super().__init__(inner)
        self.hook: Callable[[], Awaitable[Any]] | None = None
        original = getattr(self, method)

        async def then(*args: Any, **kwargs: Any) -> Any:
            result = await original(*args, **kwargs)
            hook, self.hook = self.hook, None
            if hook is not None:
                await hook()
            return result

        setattr(self, method, then)

    def arm(self, hook: Callable[[], Awaitable[Any]]) -> None:
        self.hook = hook


async def test_an_interrupt_of_a_deleted_life_does_not_pause_the_next_one(
    fresh_store: FreshStore,
) -> None:
    async with fresh_store() as store:
        other = _saver(store)
        writes = _Then(store, "put_owned_items")
        saver = _saver(writes)
        with anyio.fail_after(DEADLINE):
            old = await put(saver, "t")

            async def start_again() -> None:
                await other.adelete_thread("t")
                await put(other, "t")

            writes.arm(start_again)  # between storing the interrupt and pausing the thread
            await saver.aput_writes(config("t", old), [("__interrupt__", "old?")], "task")
            run = await other.manager.get_run("t")
    assert run is not None
    assert run.status is CheckpointStatus.ACTIVE
    assert run.approval is None


async def test_a_save_after_an_interrupt_does_not_resume_the_next_life(
    fresh_store: FreshStore,
) -> None:
    async with fresh_store() as store:
        other = _saver(store)
        appends = _Then(store, "append_with_items")
        saver = _saver(appends)
        with anyio.fail_after(DEADLINE):
            old = await put(saver, "t")
            await saver.aput_writes(config("t", old), [("__interrupt__", "old?")], "task")

            async def start_again_and_ask() -> None:
                await other.adelete_thread("t")
                new = await put(other, "t")
                await other.aput_writes(config("t", new), [("__interrupt__", "new?")], "task")

            appends.arm(start_again_and_ask)  # between the save and the thread's resumption
            await put(saver, "t", parent=old)
            run = await other.manager.get_run("t")
    assert run is not None
    assert run.status is CheckpointStatus.PAUSED
    assert run.approval is not None
    assert run.approval["request"]["interrupts"] == [{"value": "new?"}]


# -- listings with what a saver remembers of an earlier life --------------------------------------


async def test_before_known_from_an_earlier_life_lists_everything_before_it(
    fresh_store: FreshStore,
) -> None:
    async with fresh_store() as store:
        saver, other = _saver(store), _saver(store)
        with anyio.fail_after(DEADLINE):
            source: list[str] = []
            for _ in range(5):  # older ids than the thread's, more checkpoints
                source.insert(0, await put(other, "s", parent=source[0] if source else None))
            known = None
            for _ in range(2):
                known = await put(saver, "t", parent=known)
            await other.adelete_thread("t")
            await other.acopy_thread("s", "t")
            listed = [found.checkpoint["id"]
                      async for found in saver.alist(config("t"), before=config("t", known))]
    assert listed == source


# -- subgraph namespaces of a deleted thread ------------------------------------------------------


def _with_subgraph_node(saver: FastCheckpointSaver, *, own_history: bool,
                        gate: tuple[asyncio.Event, asyncio.Event] | None = None) -> Any:
    """first -> sub (a subgraph: its own namespace, kept across runs with ``own_history``)."""

    async def inner(state: _Chat) -> dict[str, Any]:
        return {"messages": [AIMessage("from the subgraph")]}

    sub = StateGraph(_Chat)
    sub.add_node("inner", inner)
    sub.add_edge(START, "inner")
    sub.add_edge("inner", END)

    async def first(state: _Chat) -> dict[str, Any]:
        if gate is not None:
            gate[0].set()
            await gate[1].wait()
        return {"messages": [AIMessage("first")]}

    graph = StateGraph(_Chat)
    graph.add_node("first", first)
    graph.add_node("sub", sub.compile(checkpointer=True if own_history else None))
    graph.add_edge(START, "first")
    graph.add_edge("first", "sub")
    graph.add_edge("sub", END)
    return graph.compile(checkpointer=saver)


@pytest.mark.parametrize("own_history", [True, False])
async def test_a_graph_run_outliving_a_delete_starts_no_subgraph_namespace(
    fresh_store: FreshStore, own_history: bool
) -> None:
    async with fresh_store() as store:
        saver, other = _saver(store), _saver(store)
        thread: Any = {"configurable": {"thread_id": "t"}}
        with anyio.fail_after(DEADLINE):
            await _with_subgraph_node(saver, own_history=own_history).ainvoke(
                {"messages": [HumanMessage("1")]}, thread)
            gate = (asyncio.Event(), asyncio.Event())
            running = asyncio.create_task(
                _with_subgraph_node(saver, own_history=own_history, gate=gate).ainvoke(
                    {"messages": [HumanMessage("2")]}, thread, durability="sync"))
            await gate[0].wait()
            await other.adelete_thread("t")
            gate[1].set()
            await running
            left = await _listed(other, "t")
            runs = await other.manager.list_runs()
    assert left == []
    assert list(runs) == []


async def test_a_namespace_started_while_its_thread_is_deleted_goes_too(
    fresh_store: FreshStore,
) -> None:
    async with fresh_store() as store:
        saver = _saver(store)

        async def start_a_namespace() -> None:  # by a saver that knows nothing of the delete
            await put(_saver(store), "t", ns="child:2", values={"z": 1}, versions={"z": "1.a"})

        deleter = _saver(_BeforeRead(store, start_a_namespace, at_delete=1))
        with anyio.fail_after(DEADLINE):
            await _with_subgraph(saver, "t")
            await deleter.adelete_thread("t")
            left = await _listed(saver, "t")
    assert left == []


async def test_a_copy_takes_the_namespaces_started_while_it_copies(
    fresh_store: FreshStore,
) -> None:
    async with fresh_store() as store:
        other = _saver(store)
        started: list[tuple[str, str]] = []

        async def start_a_subgraph() -> None:
            started.append(("child:2", await put(other, "s", ns="child:2", values={"z": 1},
                                                  versions={"z": "1.a"})))

        copier = _saver(_BeforeRead(store, start_a_subgraph, at=3))
        with anyio.fail_after(DEADLINE):
            source = await _with_subgraph(other, "s")
            await copier.acopy_thread("s", "copy")
            copied = await _listed(other, "copy")
    assert copied == sorted([*source, *started])


async def test_writes_to_a_checkpoint_put_back_elsewhere_are_stored_with_it(
    fresh_store: FreshStore,
) -> None:
    async with fresh_store() as store:
        saver, other = _saver(store), _saver(store)
        with anyio.fail_after(DEADLINE):
            first = await put(saver, "t", values={"x": 1}, versions={"x": "1.a"})
            await put(other, "t", parent=first, values={"x": 2}, versions={"x": "2.a"})
            await other.acopy_thread("t", "backup")  # the thread is put back: another life
            await other.adelete_thread("t")
            await other.acopy_thread("backup", "t")
            await saver.aput_writes(config("t", first), [("x", 3)], "task")
            found = await other.aget_tuple(config("t", first))
    assert found is not None
    assert found.pending_writes == [("task", "x", 3)]


class _SlowRoot(CountingStore):
    """Appends to a thread's root namespace take a while (subgraph namespaces' do not)."""

    async def append_with_items(self, run_key: str, record: Any, **options: Any) -> Any:
        if records.SEPARATOR not in options["run"].run_id:
            await asyncio.sleep(0.05)
        return await self.inner.append_with_items(run_key, record, **options)


# Every durability mode, with and without a subgraph history of its own, on the memory
# store; on the others two of the six (the race is the saver's; the stores add their own
# listings of namespaces): "async" with, "exit" without.
_NEW_RUN_CASES = [
    *(("memory", durability, own_history)
      for durability in ("sync", "async", "exit") for own_history in (True, False)),
    *((kind, durability, own_history) for kind in KINDS if kind != "memory"
      for durability, own_history in (("async", True), ("exit", False))),
]


@pytest.mark.parametrize(("kind", "durability", "own_history"), _NEW_RUN_CASES)
async def test_a_new_graph_run_after_a_delete_keeps_its_subgraph_checkpoints(
    fresh_store: FreshStore, durability: str, own_history: bool
) -> None:
    async with fresh_store() as store:
        saver = _saver(_SlowRoot(store))
        thread: Any = {"configurable": {"thread_id": "t"}}
        with anyio.fail_after(DEADLINE):
            graph = _with_subgraph_node(saver, own_history=own_history)
            await graph.ainvoke({"messages": [HumanMessage("1")]}, thread)
            await saver.adelete_thread("t")
            for thread_id in ("t", "never deleted"):
                await graph.ainvoke({"messages": [HumanMessage("1")]},
                                    {"configurable": {"thread_id": thread_id}},
                                    durability=durability)
            await saver.drain()
            after = await _listed(saver, "t")
            expected = await _listed(saver, "never deleted")
    assert after
    assert [ns.partition(":")[0] for ns, _ in after] == [
        ns.partition(":")[0] for ns, _ in expected]


# -- writes sent from one saver for a checkpoint the other saved ----------------------------------


async def test_writes_for_a_checkpoint_saved_elsewhere_are_stored_without_waiting(
    fresh_store: FreshStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A saver that knows the thread gets writes for a newer checkpoint another saver saved
    (a task run in another process than the graph's): with no save of the thread on its way
    here, it asks the store, and stores them on that checkpoint, instead of waiting for a
    save of its own that never comes."""
    monkeypatch.setattr(saver_module, "_PARKED_SECONDS", 3600.0)  # a wait would outlast DEADLINE
    async with fresh_store() as store:
        saver, other = _saver(store), _saver(store)
        with anyio.fail_after(DEADLINE):
            first = await put(saver, "t", values={"x": 1}, versions={"x": "1.a"})
            newer = await put(other, "t", parent=first, values={"x": 2}, versions={"x": "2.a"})
            await saver.aput_writes(config("t", newer), [("x", 3)], "task")
            found = await other.aget_tuple(config("t", newer))
            parent = await other.aget_tuple(config("t", first))
    assert found is not None
    assert found.pending_writes == [("task", "x", 3)]
    assert parent is not None
    assert parent.pending_writes == []


class _Looked(CountingStore):
    """Tells when the saver first looked an item up."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.looked = anyio.Event()

    async def get_items(self, *args: Any, **kwargs: Any) -> Any:
        found = await super().get_items(*args, **kwargs)  # type: ignore[misc]
        self.looked.set()
        return found


async def test_writes_asked_about_and_not_found_still_go_with_their_save(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Writes for a checkpoint not saved yet, with no save of the thread on its way (a
    blocking ``put_writes`` can reach the loop before its ``put``): the store, asked, does
    not have it; they wait for its save, which takes them along."""
    monkeypatch.setattr(saver_module, "_PARKED_SECONDS", 3600.0)
    store = _Looked(MemoryStore())
    saver = _saver(store)
    with anyio.fail_after(DEADLINE):
        first = await put(saver, "t")
        coming = checkpoint()
        store.take()
        async with anyio.create_task_group() as group:
            group.start_soon(saver.aput_writes, config("t", coming["id"]), [("x", 1)], "task")
            await store.looked.wait()
            asked = store.take()
            await saver.aput(config("t", first), coming, metadata(1), {})
        saved = store.take()
        found = await saver.aget_tuple(config("t", coming["id"]))
    assert asked == {"get_items": 1}
    assert saved == {"append_with_items": 1}  # the writes went with their checkpoint
    assert found is not None
    assert found.pending_writes == [("task", "x", 1)]
