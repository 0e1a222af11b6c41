"""Growing list channels on the LangGraph saver: a ``messages`` list of ``history_min_entries``
entries or more is stored as a log (an anchor, then a piece per version with what it added),
and every checkpoint loads exactly the value LangGraph saved: compared with LangGraph's own
``InMemorySaver`` running the same graph, on every store, through edits, forks, pruning, a
second process, a removed log and damage."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, TypedDict

import anyio
import pytest
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.graph.state import CompiledStateGraph

from fastcheckpoint import MemoryStore, open_store
from fastcheckpoint._ids import run_key
from fastcheckpoint.errors import CorruptCheckpointError, StoreError
from fastcheckpoint.integrations import _langgraph_logs as logs
from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
from fastcheckpoint.stores import Item, nested_prefix
from tests._helpers import T0, FakeClock, make_config
from tests.integrations._langgraph_support import CountingStore, checkpoint, config, metadata
from tests.integrations.conftest import FreshStore

pytestmark = pytest.mark.anyio

DEADLINE = 30
STORE_DEADLINE = 120
TURNS_PER_INVOKE = 6


class Chat(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]
    turns: int


def _graph(saver: Any) -> CompiledStateGraph[Any, Any, Any, Any]:
    """Each turn adds an answer (ids fixed, so two savers' runs are equal); an invoke runs
    until the turn count is a multiple of :data:`TURNS_PER_INVOKE`."""

    def talk(state: Chat) -> dict[str, Any]:
        turn = state.get("turns", 0)
        return {"messages": [AIMessage(content=f"answer {turn} " + "x" * 200, id=f"a{turn}")],
                "turns": turn + 1}

    def more(state: Chat) -> str:
        return "talk" if state.get("turns", 0) % TURNS_PER_INVOKE else END

    graph = StateGraph(Chat)
    graph.add_node("talk", talk)
    graph.add_edge(START, "talk")
    graph.add_conditional_edges("talk", more, ["talk", END])
    return graph.compile(checkpointer=saver)


def _saver(store: Any, **options: Any) -> FastCheckpointSaver:
    settings = options.pop("settings", {})
    return FastCheckpointSaver(store, config=make_config(FakeClock(), **settings), **options)


async def _invoke(graphs: list[Any], thread: str, first: int, invokes: int) -> None:
    for number in range(first, first + invokes):
        for graph in graphs:
            await graph.ainvoke({"messages": [HumanMessage(content=f"question {number}",
                                                           id=f"q{number}")]}, config(thread))


async def _values(saver: Any, thread: str, limit: int | None = None) -> list[tuple[Any, Any]]:
    """The (step, channel values) of every checkpoint (the newest ``limit``), newest first."""
    return [(found.metadata.get("step"), found.checkpoint["channel_values"])
            async for found in saver.alist(config(thread), limit=limit)]


async def _anchors(store: Any, thread: str) -> list[str]:
    found = await store.scan_items(run_key(thread), prefix=logs.LOGS, limit=10_000, now=T0)
    return [key for key, _ in found if key.count("/") == 2]


async def _log_bytes(store: Any, thread: str) -> int:
    found = await store.scan_items(run_key(thread), prefix=logs.LOGS, limit=10_000, now=T0)
    return sum(len(value) for _, value in found)


async def test_every_checkpoint_loads_what_langgraph_saved_on_every_store(
    fresh_store: FreshStore, kind: str
) -> None:
    # Logs from the 16th message; on moto's S3 and DynamoDB (a request per piece, slow) the
    # newest 10 checkpoints are compared, elsewhere all.
    limit = 10 if kind in ("s3", "dynamodb") else None
    settings = {"history_min_entries": 16}
    with anyio.fail_after(STORE_DEADLINE):
        async with fresh_store() as store:
            saver, theirs = _saver(store, settings=settings), InMemorySaver()
            await _invoke([_graph(saver), _graph(theirs)], "t", 0, 4)  # 28 messages
            expected = await _values(theirs, "t", limit)
            assert await _values(saver, "t", limit) == expected
            assert len(await _anchors(store, "t")) == 1
            final = expected[0][1]["messages"]
            assert len(final) == 28
            # The log holds each message once, not once per checkpoint.
            whole = len(JsonPlusSerializer().dumps_typed(final)[1])
            assert whole < await _log_bytes(store, "t") < 1.5 * whole
            # Another process reads the thread, goes on, and extends the same log.
            other = _saver(store, settings=settings)
            await _invoke([_graph(other), _graph(theirs)], "t", 4, 1)
            assert await _values(_saver(store, settings=settings), "t", limit) == \
                await _values(theirs, "t", limit)
            assert len(await _anchors(store, "t")) == 1


async def test_two_branches_of_one_log_merge_their_parts_and_load_exactly(
    fresh_store: FreshStore, kind: str
) -> None:
    """Two processes read the same head and each goes on with a branch of its own: both
    extend the same log, each merges its parts (removing them) as they accumulate, and every
    checkpoint of both branches still loads exactly what was saved."""
    from fastcheckpoint._logs import FANOUT

    moto = kind in ("s3", "dynamodb")
    with anyio.fail_after(STORE_DEADLINE):
        async with fresh_store() as store:
            entries = [f"entry {number}" for number in range(40)]
            head = await _saver(store).aput(config("t"), checkpoint({"log": entries},
                                                                    {"log": 1}),
                                            metadata(0), {"log": 1})
            branches: dict[str, tuple[Any, list[str], int]] = {}
            for name in ("a", "b"):
                saver = _saver(store)
                assert await saver.aget_tuple(config("t")) is not None  # the head, kept
                branches[name] = (saver, head, list(entries))
            expected: dict[str, list[str]] = {}
            most = 0
            for step in range(2 * FANOUT + 3):
                for name, (saver, parent, before) in list(branches.items()):
                    values = [*before, f"{name} {step}"]
                    version = step + 2
                    saved = await saver.aput(parent, checkpoint({"log": values},
                                                                {"log": version}),
                                             metadata(step + 1), {"log": version})
                    expected[saved["configurable"]["checkpoint_id"]] = values
                    branches[name] = (saver, saved, values)
                [anchor] = await _anchors(store, "t")
                parts = await store.scan_items(run_key("t"), prefix=nested_prefix(anchor),
                                               limit=10_000, now=T0)
                most = max(most, len(parts))
            # Each branch keeps at most FANOUT - 1 parts per level (two levels here).
            assert most <= 2 * 2 * (FANOUT - 1)
            reader = _saver(store)
            checked = list(expected.items())
            for checkpoint_id, values in checked[::5] if moto else checked:
                found = await reader.aget_tuple(config("t", checkpoint_id))
                assert found is not None
                assert found.checkpoint["channel_values"]["log"] == values


async def test_an_edited_list_begins_a_new_log_and_loads_exactly() -> None:
    store = MemoryStore()
    saver, theirs = _saver(store), InMemorySaver()
    graphs = [_graph(saver), _graph(theirs)]
    with anyio.fail_after(DEADLINE):
        await _invoke(graphs, "t", 0, 6)
        for graph in graphs:  # a message replaced in place (same id), then a turn more
            await graph.aupdate_state(config("t"), {"messages": [
                AIMessage(content="corrected", id="a3")]})
        await _invoke(graphs, "t", 6, 1)
        assert await _values(saver, "t") == await _values(theirs, "t")
        assert len(await _anchors(store, "t")) == 2


async def test_forks_and_pruning_keep_every_held_checkpoint_exact() -> None:
    store = MemoryStore()
    saver, theirs = _saver(store, keep_latest=4), InMemorySaver()
    graphs = [_graph(saver), _graph(theirs)]
    with anyio.fail_after(DEADLINE):
        await _invoke(graphs, "t", 0, 6)
        ours_then = [found.config async for found in saver.alist(config("t"))]
        theirs_then = [found.config async for found in theirs.alist(config("t"))]
        for graph, at in ((graphs[0], ours_then[2]), (graphs[1], theirs_then[2])):
            forked = await graph.aupdate_state(at, {"messages": [
                HumanMessage(content="fork", id="fork")]}, as_node="talk")
            await graph.ainvoke(None, forked)
        await _invoke(graphs, "t", 6, 2)
        ours, all_theirs = await _values(saver, "t"), await _values(theirs, "t")
        assert len(ours) == 4
        assert ours == all_theirs[:4]
        # The store holds exactly the logs the held checkpoints name (pruning took the rest).
        key = run_key("t")
        headers, _ = await store.headers(key, before=None, limit=100, now=T0)
        named: set[str] = set()
        for header in headers:
            found = await store.read_with_items(key, sequence=header.sequence, now=T0)
            assert found is not None
            named.update(ref for ref in found[0].refs if ref.startswith(logs.LOGS))
        assert named
        assert set(await _anchors(store, "t")) == named


async def test_a_save_whose_parent_another_process_wrote_keeps_its_log(
    fresh_store: FreshStore,
) -> None:
    with anyio.fail_after(STORE_DEADLINE):
        async with fresh_store() as store:
            writer = _saver(store)
            entries = [f"entry {number}" for number in range(40)]
            first = await writer.aput(config("t"), checkpoint({"log": entries, "n": 0},
                                                              {"log": 1, "n": 1}),
                                      metadata(0), {"log": 1, "n": 1})
            counting = CountingStore(store)
            other = _saver(counting, keep_latest=1)
            counting.take()
            second = await other.aput(first, checkpoint({"log": entries, "n": 1},
                                                        {"log": 1, "n": 2}),
                                      metadata(1), {"n": 2})
            # Where the parent lives, and its header: the log it keeps unchanged.
            assert counting.take() == {"get_items": 1, "get_run": 1, "headers": 1,
                                       "append_with_items": 1}
            assert await _loads(store, second) == {"log": entries, "n": 1}
            assert len(await _anchors(store, "t")) == 1


ENTRIES = [f"entry {number}" for number in range(40)]


async def _loads(store: Any, saved: Any, clock: FakeClock | None = None) -> Any:
    found = await FastCheckpointSaver(store, config=make_config(clock or FakeClock()),
                                      ttl_seconds=None).aget_tuple(saved)
    assert found is not None
    return found.checkpoint["channel_values"]


async def test_a_log_another_process_removed_is_written_again(fresh_store: FreshStore) -> None:
    # S3 and DynamoDB do not check refs of an earlier life of a run: the saver must not name a
    # log of the life another process deleted, or of one that expired.
    clock = FakeClock()
    with anyio.fail_after(STORE_DEADLINE):
        async with fresh_store() as store:
            saver = FastCheckpointSaver(store, config=make_config(clock), ttl_seconds=100)
            await saver.aput(config("t"), checkpoint({"log": ENTRIES}, {"log": 1}),
                             metadata(0), {"log": 1})
            await store.delete_run(run_key("t"))  # another process deletes the thread
            longer = [*ENTRIES, "one more"]  # the client sends the conversation again
            saved = await saver.aput(config("t"), checkpoint({"log": longer}, {"log": 2}),
                                     metadata(0), {"log": 2})
            assert await _loads(store, saved, clock) == {"log": longer}
            clock.advance(1000)  # the thread expires, is purged, and starts again
            await store.purge_expired(now=clock(), limit=1000)
            again = [*longer, "and again"]
            saved = await saver.aput(config("t"), checkpoint({"log": again}, {"log": 3}),
                                     metadata(0), {"log": 3})
            assert await _loads(store, saved, clock) == {"log": again}


async def test_a_process_with_logs_off_keeps_logged_values(fresh_store: FreshStore) -> None:
    with anyio.fail_after(STORE_DEADLINE):
        async with fresh_store() as store:
            first = await _saver(store).aput(
                config("t"), checkpoint({"log": ENTRIES, "n": 0}, {"log": 1, "n": 1}),
                metadata(0), {"log": 1, "n": 1})
            off = _saver(store, settings={"history_min_entries": None})
            assert await off.aget_tuple(first) is not None  # LangGraph reads, then goes on
            second = await off.aput(first, checkpoint({"log": ENTRIES, "n": 1},
                                                      {"log": 1, "n": 2}), metadata(1), {"n": 2})
            assert await _loads(store, second) == {"log": ENTRIES, "n": 1}


async def test_an_unseen_parent_that_is_gone_sends_every_value(fresh_store: FreshStore) -> None:
    with anyio.fail_after(STORE_DEADLINE):
        async with fresh_store() as store:
            writer = _saver(store)
            first = await writer.aput(
                config("t"), checkpoint({"log": ENTRIES, "n": 0}, {"log": 1, "n": 1}),
                metadata(0), {"log": 1, "n": 1})
            second = await writer.aput(first, checkpoint({"log": ENTRIES, "n": 1},
                                                         {"log": 1, "n": 2}),
                                       metadata(1), {"n": 2})
            key = run_key("t")  # another process deletes the parent; the first keeps the log
            headers, _ = await store.headers(key, before=None, limit=10, now=T0)
            assert await store.delete(key, headers[0].sequence,
                                      checkpoint_id=headers[0].checkpoint_id)
            third = await _saver(store).aput(second, checkpoint({"log": ENTRIES, "n": 2},
                                                                {"log": 1, "n": 3}),
                                             metadata(2), {"n": 3})
            assert await _loads(store, third) == {"log": ENTRIES, "n": 2}


async def test_a_damaged_or_missing_piece_is_a_corrupt_checkpoint() -> None:
    store = MemoryStore()
    saver = _saver(store)
    entries = [f"entry {number}" for number in range(40)]
    with anyio.fail_after(DEADLINE):
        saved = await saver.aput(config("t"), checkpoint({"log": entries}, {"log": 1}),
                                 metadata(0), {"log": 1})
        saved = await saver.aput(saved, checkpoint({"log": [*entries, "x"]}, {"log": 2}),
                                 metadata(1), {"log": 2})
        [anchor] = await _anchors(store, "t")
        pieces = await store.scan_items(run_key("t"), prefix=nested_prefix(anchor), now=T0)
        assert len(pieces) == 1
        # A stray piece under the anchor (a failed save's) is never read.
        await store.put_items(run_key("t"), [Item(key=nested_prefix(anchor) + "0000000040.f",
                                                  value=b"junk")], now=T0)
        assert (await _saver(store).aget_tuple(saved)) is not None
        await store.delete_items(run_key("t"), [pieces[0][0]])
        with pytest.raises(CorruptCheckpointError, match="missing"):
            await _saver(store).aget_tuple(saved)


async def test_short_lists_and_logs_off_store_whole_values() -> None:
    store = MemoryStore()
    with anyio.fail_after(DEADLINE):
        short = _saver(store)
        await short.aput(config("short"), checkpoint({"log": ["a"] * 31}, {"log": 1}),
                         metadata(0), {"log": 1})
        off = _saver(store, settings={"history_min_entries": None})
        await off.aput(config("off"), checkpoint({"log": ["a"] * 100}, {"log": 1}),
                       metadata(0), {"log": 1})
        assert await _anchors(store, "short") == await _anchors(store, "off") == []


def test_the_log_settings_come_from_the_checkpoint_config() -> None:
    settings = dataclasses.replace(make_config(FakeClock()), history_min_entries=5)
    saver = FastCheckpointSaver(MemoryStore(), config=settings)
    assert saver._shared.logs.min_entries == 5


@pytest.mark.parametrize("url", ["memory://", "file://{tmp}/files", "sqlite:///{tmp}/db.sqlite"])
async def test_a_copied_thread_takes_its_logs_along(url: str, tmp_path: Path) -> None:
    store = open_store(url.format(tmp=tmp_path))
    with anyio.fail_after(DEADLINE):
        async with _saver(store) as saver:
            await _invoke([_graph(saver)], "t", 0, 6)
            source = await _values(saver, "t")
            await saver.acopy_thread("t", "copy")
            await saver.adelete_thread("t")
            assert await _values(_saver(store), "copy") == source
            assert len(source[0][1]["messages"]) == 42
            assert len(await _anchors(store, "copy")) == 1


class _LosingReplies(MemoryStore):
    """Applies every append, and loses the reply of every third (the caller sees an error
    after the store wrote)."""

    def __init__(self) -> None:
        super().__init__()
        self.appends = 0

    async def append_with_items(self, *args: Any, **kwargs: Any) -> str:
        status = await super().append_with_items(*args, **kwargs)
        self.appends += 1
        if self.appends % 3 == 0:
            raise StoreError("the reply was lost")
        return status


async def test_replies_lost_after_the_store_wrote_lose_no_acknowledged_value() -> None:
    store = _LosingReplies()
    saver = _saver(store)
    entries = [f"entry {number}" for number in range(35)]
    acknowledged: list[tuple[Any, list[str]]] = []
    parent = config("t")
    with anyio.fail_after(DEADLINE):
        for step in range(30):
            entries = [*entries, f"step {step}"]
            if step % 7 == 6:  # now and then a list edited in place
                entries = [f"edited {step}", *entries[1:]]
            try:
                parent = await saver.aput(parent, checkpoint({"log": entries}, {"log": step + 1}),
                                          metadata(step), {"log": step + 1})
            except StoreError:
                continue
            acknowledged.append((parent, entries))
        assert len(acknowledged) == 20
        # Logs were extended across the lost replies (one per edit and a few more, not one
        # per save), and every acknowledged checkpoint loads exactly its list.
        assert len(await _anchors(store, "t")) <= 8
        for saved, expected in acknowledged:
            found = await _saver(store).aget_tuple(saved)
            assert found is not None
            assert found.checkpoint["channel_values"] == {"log": expected}
