"""LangGraph's delta channels (beta) on the saver: ``aget_delta_channel_history`` answers from
the run's headers, one read per ancestor holding seeds and a range scan of writes, and gives
exactly what LangGraph's default walk (every ancestor read whole) gives: on every store,
along forks, after an ancestor was deleted, for headers of an older release and for targets
that are not there."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Annotated, Any, TypedDict

import anyio
import msgspec
import pytest
from langgraph.channels.delta import DeltaChannel
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph

from fastcheckpoint import MemoryStore
from fastcheckpoint._codec import Codec
from fastcheckpoint._ids import run_key
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
    step_loop,
)
from tests.integrations.conftest import FreshStore

pytestmark = pytest.mark.anyio

DEADLINE = 20
STORE_DEADLINE = 120
"""For the tests that run on every kind of store (S3 and DynamoDB on moto are slow)."""
TURNS_PER_INVOKE = 5
CHANNELS = ["messages", "notes", "turns"]


class Chat(TypedDict, total=False):
    """The state as the nodes see it (the graph's schema adds the delta channels)."""

    messages: list[str]
    notes: list[str]
    turns: int


def _concat(state: Sequence[str], writes: Sequence[Sequence[str]]) -> list[str]:
    return [*state, *itertools.chain.from_iterable(writes)]


def _graph(saver: FastCheckpointSaver, *, messages_every: int = 4,
           notes_every: int = 7) -> CompiledStateGraph[Any, Any, Any, Any]:
    """A chat loop: each turn adds a message, every other turn a note too; an invoke runs
    until the turn count is a multiple of :data:`TURNS_PER_INVOKE`."""

    # Functional syntax: the class syntax cannot see the frequencies under future annotations.
    chat = TypedDict("chat", {  # type: ignore[misc]  # noqa: UP013
        "messages": Annotated[list[str], DeltaChannel(_concat, snapshot_frequency=messages_every)],
        "notes": Annotated[list[str], DeltaChannel(_concat, snapshot_frequency=notes_every)],
        "turns": int,
    }, total=False)

    def talk(state: Chat) -> dict[str, Any]:
        turn = state.get("turns", 0)
        update: dict[str, Any] = {"messages": [f"m{turn}"], "turns": turn + 1}
        if turn % 2 == 0:
            update["notes"] = [f"n{turn}"]
        return update

    def more(state: Chat) -> str:
        return "talk" if state.get("turns", 0) % TURNS_PER_INVOKE else END

    graph = StateGraph(chat)
    graph.add_node("talk", talk)
    graph.add_edge(START, "talk")
    graph.add_conditional_edges("talk", more, ["talk", END])
    return graph.compile(checkpointer=saver)


def _saver(store: Any, **options: Any) -> FastCheckpointSaver:
    return FastCheckpointSaver(store, config=make_config(FakeClock()), **options)


async def _run(graph: CompiledStateGraph[Any, Any, Any, Any], thread: str, invokes: int) -> None:
    for number in range(invokes):
        await graph.ainvoke({"messages": [f"user{number}"]}, config(thread))


def _expected_messages(invokes: int) -> list[str]:
    expected: list[str] = []
    for number in range(invokes):
        expected.append(f"user{number}")
        expected += [f"m{turn}" for turn in range(number * TURNS_PER_INVOKE,
                                                  (number + 1) * TURNS_PER_INVOKE)]
    return expected


async def _default(saver: FastCheckpointSaver, cfg: Any,
                   channels: list[str] = CHANNELS) -> Any:
    """LangGraph's own walk: every ancestor read whole through ``aget_tuple``, as the saver
    runs it (reading the ancestors it hides from ``aget_tuple`` by id too)."""
    walking = saver_module._WALKING_ANCESTORS.set(True)
    try:
        return await BaseCheckpointSaver.aget_delta_channel_history(
            saver, config=cfg, channels=channels)
    finally:
        saver_module._WALKING_ANCESTORS.reset(walking)


async def _assert_every_checkpoint_matches(
    saver: FastCheckpointSaver, thread: str, *, every: int = 1
) -> int:
    """Compares the histories at every checkpoint (``every``: every so many) and at the
    latest with the default walk's; how many were compared."""
    compared = 0
    async for number, found in _enumerate(saver.alist(config(thread))):
        if number % every:
            continue
        fast = await saver.aget_delta_channel_history(config=found.config, channels=CHANNELS)
        assert fast == await _default(saver, found.config), found.config
        compared += 1
    latest = config(thread)
    assert await saver.aget_delta_channel_history(config=latest, channels=CHANNELS) == \
        await _default(saver, latest)
    return compared


async def _enumerate(found: AsyncIterator[Any]) -> AsyncIterator[tuple[int, Any]]:
    number = 0
    async for value in found:
        yield number, value
        number += 1


async def test_histories_equal_the_default_walk_on_every_store(
    fresh_store: FreshStore, kind: str
) -> None:
    # The default walk reads each ancestor whole: on moto's S3 and DynamoDB a few seconds per
    # checkpoint, so there a third of them are compared.
    every = 3 if kind in ("s3", "dynamodb") else 1
    with anyio.fail_after(STORE_DEADLINE):
        async with fresh_store() as store:
            saver = _saver(store)
            await _run(_graph(saver, messages_every=3, notes_every=4), "t", 3)
            assert await _assert_every_checkpoint_matches(saver, "t", every=every) > 15 / every
            # Another process reads the thread back through the histories.
            state = await _graph(_saver(store), messages_every=3, notes_every=4).aget_state(
                config("t"))
            assert state.values["messages"] == _expected_messages(3)
            assert state.values["notes"] == [f"n{turn}" for turn in range(0, 15, 2)]


class _SlowFirstSave(CountingStore):
    """Its first ``append_with_items`` (a new thread's first save) takes ``delay`` seconds
    longer: a new store client and a new run, on a busy S3."""

    def __init__(self, inner: Any, delay: float) -> None:
        super().__init__(inner)
        self.delay: float | None = delay

    async def append_with_items(self, *args: Any, **kwargs: Any) -> Any:
        if self.delay is not None:
            delay, self.delay = self.delay, None
            await anyio.sleep(delay)
        return await super().append_with_items(*args, **kwargs)  # type: ignore[misc]


async def test_writes_sent_during_a_slow_first_save_are_all_replayed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The graph runs its steps while its first save is on its way, and sends their writes
    (the notes) at once; the saves of their checkpoints queue behind the first. However long
    it takes (here longer than the saver's wait for a new thread's first save), no write
    is lost: another process reads every note back (once, a busy S3 lost those of the steps
    whose saves came last)."""
    monkeypatch.setattr(saver_module, "_FIRST_SAVE_SECONDS", 0.0)  # the first save outlasts it
    store = _SlowFirstSave(MemoryStore(), delay=0.2)
    with anyio.fail_after(DEADLINE):
        await _run(_graph(_saver(store), messages_every=3, notes_every=4), "t", 3)
        state = await _graph(_saver(store), messages_every=3, notes_every=4).aget_state(
            config("t"))
    assert state.values["messages"] == _expected_messages(3)
    assert state.values["notes"] == [f"n{turn}" for turn in range(0, 15, 2)]


async def test_a_fork_follows_its_parents_not_the_save_order() -> None:
    saver = _saver(MemoryStore())
    graph = _graph(saver)
    with anyio.fail_after(DEADLINE):
        await _run(graph, "t", 3)
        history = [found async for found in saver.alist(config("t"))]
        middle = next(found for found in history
                      if found.checkpoint["channel_versions"].get("turns") and
                      found.metadata.get("step") == 7)
        forked = await graph.aupdate_state(middle.config, {"messages": ["edited"]},
                                           as_node="talk")
        await graph.ainvoke(None, forked)
        await _run(graph, "t", 1)
        assert await _assert_every_checkpoint_matches(saver, "t") > len(history)
        state = await _graph(_saver(saver.store)).aget_state(config("t"))
        before = (await graph.aget_state(middle.config)).values["messages"]
        assert state.values["messages"][:len(before) + 1] == [*before, "edited"]


async def test_a_long_chain_costs_a_few_store_calls() -> None:
    store = CountingStore(MemoryStore())
    saver = _saver(store)
    with anyio.fail_after(DEADLINE):
        await _run(_graph(saver, messages_every=20, notes_every=1000), "t", 8)
        latest = config("t")
        store.take()
        fast = await saver.aget_delta_channel_history(config=latest, channels=["messages"])
        # The headers (one page), the checkpoint holding the seed, with its writes, the writes
        # of the ancestors after it (one page), and the headers again (none went meanwhile).
        assert store.take() == {"headers": 2, "read_with_items": 1, "scan_items": 1}
        assert fast == await _default(saver, latest, ["messages"])
        assert store.take()["read_with_items"] >= 10
        # Notes reach the root (48 checkpoints); turns seeds at the parent.
        fast = await saver.aget_delta_channel_history(config=latest, channels=CHANNELS)
        assert store.take() == {"headers": 2, "read_with_items": 2, "scan_items": 1}
        assert fast == await _default(saver, latest)
        assert store.take()["read_with_items"] >= 48


async def test_headers_of_an_older_release_are_walked_the_default_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = CountingStore(MemoryStore())
    saver = _saver(store)
    header = saver_module.LangGraphHeader

    def unrecorded(**fields: Any) -> Any:
        return header(**{**fields, "values": None})

    with anyio.fail_after(DEADLINE):
        monkeypatch.setattr(saver_module, "LangGraphHeader", unrecorded)
        await _run(_graph(saver, notes_every=1000), "t", 2)
        monkeypatch.undo()
        await _run(_graph(saver, notes_every=1000), "t", 1)  # newer ones over older ones
        assert await _assert_every_checkpoint_matches(saver, "t") > 10
        store.take()
        # Notes reach the root, through the older headers.
        await saver.aget_delta_channel_history(config=config("t"), channels=["notes"])
        assert store.take()["read_with_items"] > 10


async def test_a_deleted_ancestor_ends_the_chain_as_in_the_default_walk() -> None:
    store = MemoryStore()
    saver = _saver(store)
    with anyio.fail_after(DEADLINE):
        await _run(_graph(saver, messages_every=100, notes_every=100), "t", 2)
        key = run_key("t")
        headers, _ = await store.headers(key, before=None, limit=100, now=FakeClock()())
        removed = headers[4]
        assert await store.delete(key, removed.sequence, checkpoint_id=removed.checkpoint_id)
        assert await _assert_every_checkpoint_matches(saver, "t") > 5
        fast = await saver.aget_delta_channel_history(config=config("t"), channels=CHANNELS)
        assert "seed" not in fast["messages"]
        assert 0 < len(fast["messages"]["writes"]) < len(_expected_messages(2))


async def test_a_parent_saved_after_its_child_is_walked_the_default_way() -> None:
    store = CountingStore(MemoryStore())
    saver = _saver(store)
    with anyio.fail_after(DEADLINE):
        root = await put(saver, "t", values={"x": ["a"]}, versions={"x": 1})
        parent, child = checkpoint(versions={"x": 2}), checkpoint(versions={"x": 3})
        await saver.aput(config("t", parent["id"]), child, metadata(2), {})
        await saver.aput(config("t", root), parent, metadata(1), {})
        for made, value in ((root, "b"), (parent["id"], "c"), (child["id"], "d")):
            await saver.aput_writes(config("t", made), [("x", [value])], "task")
        target = config("t", child["id"])
        store.take()
        fast = await saver.aget_delta_channel_history(config=target, channels=["x"])
        assert fast == {"x": {"writes": [("task", "x", ["b"]), ("task", "x", ["c"])],
                              "seed": ["a"]}}
        assert fast == await _default(saver, target, ["x"])
        assert store.take()["get_items"] == 1  # the parent looked up: it is there


async def test_a_target_that_is_not_there_has_empty_histories() -> None:
    saver = _saver(MemoryStore())
    with anyio.fail_after(DEADLINE):
        empty = {channel: {"writes": []} for channel in CHANNELS}
        assert await saver.aget_delta_channel_history(config=config("none"),
                                                      channels=CHANNELS) == empty
        await _run(_graph(saver), "t", 1)
        unknown = config("t", "1f0e0000-0000-6000-8000-000000000000")
        assert await saver.aget_delta_channel_history(config=unknown, channels=CHANNELS) == \
            empty == await _default(saver, unknown)
        kept = [found.config async for found in saver.alist(config("t"))][2]
        await saver.adelete_thread("t")
        await _run(_graph(saver), "t", 1)  # a new life of the thread: the old ids are gone
        assert await saver.aget_delta_channel_history(config=kept, channels=CHANNELS) == empty
        assert await saver.aget_delta_channel_history(config=config("t"), channels=[]) == {}


def test_write_keys_sort_by_sequence() -> None:
    sequences = [0, 1, 2, 9, 10, 11, 99, 100, 101, 999, 1000, 12345, 10**12, 10**12 + 1]
    prefixes = [records.writes_prefix(sequence) for sequence in sequences]
    assert sorted(prefixes) == prefixes
    for sequence in sequences:
        key = records.write_key(sequence, "task", 3)
        assert key.startswith(records.WRITES)
        assert records.write_sequence(key) == sequence
    for other in ("b/abc", "w/", "w/x1/", "w/02a/", "i/w/011/"):
        assert records.write_sequence(other) is None


def test_write_keys_and_item_values_keep_their_stored_form() -> None:
    """Keys and values written by earlier releases are found and read the same way."""
    task = hashlib.blake2b(b"task", digest_size=15).hexdigest()
    assert records.write_key(12, "task", 3) == f"w/0212/{task}/3"
    assert records.task_writes_prefix(12, "task") + "-1" == records.write_key(12, "task", -1)
    codec = Codec()
    items = records.ItemCodec(codec)
    for value in (records.Located("inc", 4, None), ("msgpack", b"\x05"),
                  records.StoredWrite("task", "", "messages", 0, ("msgpack", b"\x90"))):
        packed = msgspec.msgpack.encode(value)
        assert items.encode(value) == codec.encode_payload({"v": packed}, [], [], {})


class _DeletesDuringScan(MemoryStore):
    """Another process deletes checkpoint ``victim`` just before the scan of writes."""

    victim: tuple[int, str] | None = None

    async def scan_items(self, run_key: str, **options: Any) -> list[tuple[str, bytes]]:
        if self.victim is not None and options.get("prefix") == records.WRITES:
            sequence, record_id = self.victim
            self.victim = None
            assert await self.delete(run_key, sequence, checkpoint_id=record_id)
        found: list[tuple[str, bytes]] = await super().scan_items(run_key, **options)
        return found


async def _chain(saver: FastCheckpointSaver) -> list[Any]:
    """x = ["a"] at the root, then three checkpoints storing none; each but the last has a
    write to x: b, c, d."""
    saved = [await saver.aput(config("t"), checkpoint({"x": ["a"]}, {"x": 1}), metadata(0),
                              {"x": 1})]
    for step in range(1, 4):
        saved.append(await saver.aput(saved[-1], checkpoint({}, {"x": step + 1}),
                                      metadata(step), {}))
    for at, value in zip(saved, "bcd", strict=False):
        await saver.aput_writes(at, [("x", [value])], "task")
    return saved


async def test_an_ancestor_removed_during_the_walk_gives_the_default_answer() -> None:
    store = _DeletesDuringScan()
    saver = _saver(store)
    with anyio.fail_after(DEADLINE):
        saved = await _chain(saver)
        headers, _ = await store.headers(run_key("t"), before=None, limit=10,
                                         now=FakeClock()())
        store.victim = (headers[2].sequence, headers[2].checkpoint_id)  # the second one
        fast = await saver.aget_delta_channel_history(config=saved[-1], channels=["x"])
        # Never a history with a gap: what the default walk gives now (the chain ends at the
        # removed checkpoint).
        assert fast == await _default(saver, saved[-1], ["x"]) == {
            "x": {"writes": [("task", "x", ["d"])]}}


async def test_a_checkpoint_moved_to_another_life_is_found_again() -> None:
    store = MemoryStore()
    saver, other = _saver(store), _saver(store)
    with anyio.fail_after(DEADLINE):
        saved = await _chain(saver)
        # Another process copies the thread away, deletes it and copies it back: the same
        # LangGraph ids in a new life of the run; this process remembers the old places.
        await other.acopy_thread("t", "s")
        await other.adelete_thread("t")
        await other.acopy_thread("s", "t")
        fast = await saver.aget_delta_channel_history(config=saved[-1], channels=["x"])
        assert fast == {"x": {"writes": [("task", "x", ["b"]), ("task", "x", ["c"]),
                                         ("task", "x", ["d"])], "seed": ["a"]}}
        assert fast == await _default(saver, saved[-1], ["x"])


class _LosesAPart(MemoryStore):
    """A read that lists a log part another process merges away before it is read (a store
    whose reads are not atomic): the next ``read_with_items`` misses one part."""

    lose: str | None = None

    async def read_with_items(self, run_key: str, **options: Any) -> Any:
        found = await super().read_with_items(run_key, **options)
        if found is not None and self.lose is not None and self.lose in found[2]:
            items = {key: value for key, value in found[2].items() if key != self.lose}
            self.lose = None
            return (*found[:2], items)
        return found


async def test_a_seed_log_part_missing_during_the_read_gives_the_default_answer() -> None:
    store = _LosesAPart()
    saver = FastCheckpointSaver(store, config=make_config(FakeClock(), history_min_entries=2))
    with anyio.fail_after(DEADLINE):
        seed = ["a0", "a1", "a2"]
        saved = [await saver.aput(config("t"), checkpoint({"x": seed}, {"x": 1}),
                                  metadata(0), {"x": 1})]
        saved.append(await saver.aput(saved[-1], checkpoint({"x": [*seed, "a3"]}, {"x": 2}),
                                      metadata(1), {"x": 2}))
        saved.append(await saver.aput(saved[-1], checkpoint({}, {"x": 3}), metadata(2), {}))
        await saver.aput_writes(saved[1], [("x", ["b"])], "task")
        parts = [key for key, _ in await store.scan_items(run_key("t"), prefix="l/", now=0.0)
                 if key.count("/") == 3]
        assert len(parts) == 1  # the seed is a log: its anchor and one part
        store.lose = parts[0]
        fast = await saver.aget_delta_channel_history(config=saved[-1], channels=["x"])
        assert store.lose is None  # the fast path met the gap and let the walk answer
        assert fast == await _default(saver, saved[-1], ["x"]) == {
            "x": {"writes": [("task", "x", ["b"])], "seed": [*seed, "a3"]}}


class _ForkDuringPrune(CountingStore):
    """Runs ``fork`` (another process forking the thread) before the first removal."""

    fork: Callable[[], Awaitable[None]] | None = None

    async def delete(self, *args: Any, **kwargs: Any) -> Any:
        if self.fork is not None:
            fork, self.fork = self.fork, None
            await fork()
        return await super().delete(*args, **kwargs)  # type: ignore[misc]


async def _fork_at_step(graph: CompiledStateGraph[Any, Any, Any, Any],
                        saver: FastCheckpointSaver, step: int) -> Any:
    """Time travel: an edit of the checkpoint at ``step``, run on; the fork's state."""
    history = [found async for found in saver.alist(config("t"))]
    at = next(found for found in history if found.metadata.get("step") == step)
    forked = await graph.aupdate_state(at.config, {"messages": ["edited"]}, as_node="talk")
    await graph.ainvoke(None, forked)
    return (await graph.aget_state(config("t"))).values


async def test_a_fork_saved_while_pruning_keeps_the_ancestors_it_rebuilds_from() -> None:
    """``aprune`` keeps the newest checkpoint's delta ancestors; a fork from an older
    checkpoint saved (by another process) while it runs needs its own, and they stay: the
    fork's state reads back whole, as on a thread never pruned."""
    with anyio.fail_after(DEADLINE):
        unpruned = _saver(MemoryStore())
        await _run(_graph(unpruned), "t", 3)
        expected = await _fork_at_step(_graph(unpruned), unpruned, 7)
        store = _ForkDuringPrune(MemoryStore())
        other = _saver(store.inner)
        await _run(_graph(other), "t", 3)
        forked: list[Any] = []

        async def fork() -> None:
            forked.append(await _fork_at_step(_graph(other), other, 7))

        store.fork = fork
        await _saver(store).aprune(["t"])
        reader = _saver(store.inner)
        state = await _graph(reader).aget_state(config("t"))
        assert await _assert_every_checkpoint_matches(reader, "t") > 1
    assert forked == [expected]
    assert state.values == expected


# -- keep_latest with delta channels ------------------------------------------------------

RARE = {"messages_every": 20, "notes_every": 7}
"""Snapshots rarer than the checkpoints kept: messages every 20 updates (about 20
checkpoints), notes every 7 (every 14 turns)."""
SNAPSHOT_SPAN = 22
"""How many checkpoints beyond the newest N the rarest snapshot lies back, at most."""


async def _newest_states(saver: FastCheckpointSaver, count: int, thread: str = "t") -> list[Any]:
    graph = _graph(saver, **RARE)
    newest = [found.config async for found in saver.alist(config(thread), limit=count)]
    return [(await graph.aget_state(at)).values for at in newest]


async def _held(store: Any, thread: str = "t") -> int:
    headers, _ = await store.headers(run_key(thread), before=None, limit=1000,
                                     now=FakeClock()())
    return len(headers)


@pytest.mark.parametrize("keep", [1, 3, 5, 10, 20])
async def test_keep_latest_keeps_what_the_newest_rebuild_from(keep: int) -> None:
    """Each save keeps the newest N and the ancestors back to their delta channels' snapshots:
    the newest N read back as on a thread never pruned (they read short before), and the
    thread holds N plus at most a snapshot's span of checkpoints."""
    store = MemoryStore()
    saver, unpruned = _saver(store, keep_latest=keep), _saver(MemoryStore())
    graph, reference = _graph(saver, **RARE), _graph(unpruned, **RARE)
    held = []
    with anyio.fail_after(DEADLINE):
        for number in range(12):  # 84 checkpoints
            for made in (graph, reference):
                await made.ainvoke({"messages": [f"user{number}"]}, config("t"))
            held.append(await _held(store))
            assert await _newest_states(saver, keep) == await _newest_states(unpruned, keep)
        # Another process reads them back the same (from the headers alone).
        assert await _newest_states(_saver(store), keep) == await _newest_states(unpruned, keep)
        # A copy keeps them all (its sequences are new), until the next snapshots.
        await saver.acopy_thread("t", "copy")
        assert await _held(store, "copy") == held[-1]
        assert await _newest_states(saver, keep, "copy") == await _newest_states(unpruned, keep)
    assert max(held) <= keep + SNAPSHOT_SPAN
    assert held[-1] < 84


async def test_a_fork_from_a_kept_checkpoint_reads_back_whole() -> None:
    """Time travel to the fourth newest of five kept, and on: the fork and the checkpoints
    kept after it read back as on a thread never pruned."""
    store = MemoryStore()
    saver, unpruned = _saver(store, keep_latest=5), _saver(MemoryStore())
    with anyio.fail_after(DEADLINE):
        for made in (saver, unpruned):
            graph = _graph(made, **RARE)
            await _run(graph, "t", 8)
            at = [found.config async for found in made.alist(config("t"), limit=5)][3]
            forked = await graph.aupdate_state(at, {"messages": ["edited"]}, as_node="talk")
            await graph.ainvoke(None, forked)
            await graph.ainvoke({"messages": ["after"]}, config("t"))
        assert await _newest_states(saver, 5) == await _newest_states(unpruned, 5)
        state = (await _graph(_saver(store), **RARE).aget_state(config("t"))).values
        held = await _held(store)
    assert "edited" in state["messages"]
    assert state["messages"][-1] == "m44"
    assert held <= 5 + SNAPSHOT_SPAN


async def _calls_of_an_invoke(keep: int | None, *, new_process: bool) -> dict[str, int]:
    store = CountingStore(MemoryStore())
    saver = _saver(store, keep_latest=keep)
    await _run(_graph(saver, **RARE), "t", 6)
    if new_process:
        saver = _saver(store, keep_latest=keep)
    graph = _graph(saver, **RARE)
    store.take()
    await graph.ainvoke({"messages": ["one more"]}, config("t"))
    return store.take()


async def test_keeping_the_delta_ancestors_costs_no_store_call_in_steady_state() -> None:
    """A graph run saving every step pays what it pays without keep_latest; in a new process
    the first save reads the newest headers once (what they rebuild from)."""
    with anyio.fail_after(DEADLINE):
        steady = await _calls_of_an_invoke(5, new_process=False)
        assert steady == await _calls_of_an_invoke(None, new_process=False)
        assert steady["append_with_items"] == 7  # a save per step: the input, 5 turns, the end
        first = await _calls_of_an_invoke(5, new_process=True)
        unpruned = await _calls_of_an_invoke(None, new_process=True)
    assert first == {**unpruned, "headers": unpruned["headers"] + 1}


async def test_headers_that_do_not_say_keep_all_until_every_channel_snapshots() -> None:
    """Checkpoints whose headers do not say how far back their delta channels reach (saved
    without keep_latest, as by an earlier release): nothing is pruned that they might need,
    and the thread is bounded again once every delta channel has snapshotted since."""
    store = MemoryStore()
    unpruned = _saver(MemoryStore())
    with anyio.fail_after(DEADLINE):
        await _run(_graph(_saver(store), **RARE), "t", 6)
        await _run(_graph(unpruned, **RARE), "t", 6)
        saver = _saver(store, keep_latest=5)
        graph = _graph(saver, **RARE)
        held = []
        for number in range(6, 14):
            for made in (graph, _graph(unpruned, **RARE)):
                await made.ainvoke({"messages": [f"user{number}"]}, config("t"))
            held.append(await _held(store))
            assert await _newest_states(saver, 5) == await _newest_states(unpruned, 5)
    assert held[0] == 7 * 7  # nothing pruned while the older headers are needed
    assert held[-1] <= 5 + SNAPSHOT_SPAN


def test_a_header_without_delta_channels_keeps_its_stored_form() -> None:
    extra = records.LangGraphHeader(
        checkpoint_id="c", parent_checkpoint_id=None, thread_id="t", checkpoint_ns="",
        metadata=("msgpack", b"\x80"), values=("a",))
    assert records.encode_header(extra) == msgspec.msgpack.encode(
        ["c", None, "t", "", ["msgpack", b"\x80"], ["a"], None])
    with_delta = msgspec.structs.replace(extra, delta={"a": 3})
    assert records.decode_header(records.encode_header(with_delta), "here") == with_delta


async def test_a_thread_without_delta_channels_is_pruned_as_before() -> None:
    store = CountingStore(MemoryStore())
    saver = _saver(store, keep_latest=2)
    with anyio.fail_after(DEADLINE):
        for _ in range(2):
            await step_loop(saver, 6).ainvoke({"done": []}, config("t"))
            assert store.last["append_with_items"][1]["keep_latest"] == 2
        assert "headers" not in store.take()
        assert await _held(store.inner) == 2
        headers, _ = await store.inner.headers(run_key("t"), before=None, limit=2, now=0.0)
    for stored in headers:
        extra = Codec().decode_header(stored.header, "here").extra
        assert records.decode_header(extra, "here").delta is None


async def _states_by_step(saver: FastCheckpointSaver, thread: str = "t") -> dict[int, Any]:
    """The state every checkpoint ``alist`` returns reads back as, by its step."""
    graph = _graph(saver, **RARE)
    return {found.metadata["step"]: (await graph.aget_state(found.config)).values
            async for found in saver.alist(config(thread))}


async def test_every_checkpoint_returned_under_keep_latest_reads_back_whole() -> None:
    """Snapshots at different frequencies: a checkpoint kept only for what the newest N
    rebuild from may need older ones for its own channels (pruned). alist leaves such
    checkpoints out and aget_tuple by id returns None for them (they read short, no error,
    before): what is returned reads back as on a thread never pruned, the newest N always."""
    store = MemoryStore()
    saver, unpruned = _saver(store, keep_latest=5), _saver(MemoryStore())
    graph = _graph(saver, **RARE)
    seen: dict[int, Any] = {}
    with anyio.fail_after(DEADLINE):
        for number in range(8):
            await graph.ainvoke({"messages": [f"user{number}"]}, config("t"))
            seen |= {found.metadata["step"]: found.config
                     async for found in saver.alist(config("t"))}
        await _run(_graph(unpruned, **RARE), "t", 8)
        everything = await _states_by_step(unpruned)
        listed = await _states_by_step(saver)
        by_id = {step: (await graph.aget_state(at)).values for step, at in seen.items()
                 if await saver.aget_tuple(at) is not None}
        held = await _held(store)
    assert {step: everything[step] for step in listed} == listed
    assert sorted(listed)[-5:] == sorted(everything)[-5:]
    assert by_id == listed
    assert len(listed) < held


async def test_the_default_walk_still_reads_the_checkpoints_kept_for_newer_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the saver walks a chain LangGraph's way (through ``aget_tuple``), the
    checkpoints it no longer returns are read all the same: the newest rebuild whole."""
    saver = _saver(MemoryStore(), keep_latest=5)
    with anyio.fail_after(DEADLINE):
        await _run(_graph(saver, **RARE), "t", 8)
        newest = [found.config async for found in saver.alist(config("t"), limit=5)]
        fast = [await saver.aget_delta_channel_history(config=at, channels=CHANNELS)
                for at in newest]

        async def walk_the_default_way(*_: Any) -> None:
            return None

        monkeypatch.setattr(saver, "_delta_history", walk_the_default_way)
        walked = [await saver.aget_delta_channel_history(config=at, channels=CHANNELS)
                  for at in newest]
    assert walked == fast


async def test_two_savers_saving_a_thread_in_turns_keep_it_whole() -> None:
    """Two processes (two savers on one store) continue one thread in turns under
    keep_latest: neither knows what the other's saves rebuild from, so each reads the newest
    headers again; the newest checkpoints, and whatever alist lists, read back whole."""
    store = CountingStore(MemoryStore())
    savers = [_saver(store, keep_latest=5), _saver(store, keep_latest=5)]
    unpruned = _graph(_saver(MemoryStore()), **RARE)
    with anyio.fail_after(DEADLINE):
        for number in range(8):
            store.take()
            for graph in (_graph(savers[number % 2], **RARE), unpruned):
                await graph.ainvoke({"messages": [f"user{number}"]}, config("t"))
            calls = store.take()
            if number:  # the other process saved last: what it kept is read again
                assert calls["headers"] >= 1
            for saver in savers:
                assert await _newest_states(saver, 5) == await _newest_states(
                    unpruned.checkpointer, 5)  # type: ignore[arg-type]
        everything = await _states_by_step(unpruned.checkpointer)  # type: ignore[arg-type]
        for saver in savers:
            listed = await _states_by_step(saver)
            assert {step: everything[step] for step in listed} == listed
        held = await _held(store.inner)
    assert held <= 5 + SNAPSHOT_SPAN


async def test_a_copy_of_a_thread_pruned_under_keep_latest_hides_what_the_source_hides() -> None:
    """The copy's floors name the copies of the checkpoints the source's name (they were
    all 0 before, so the walk stopped at the copy's oldest: alist listed checkpoints of the
    copy that read short)."""
    store = MemoryStore()
    saver, unpruned = _saver(store, keep_latest=5), _saver(MemoryStore())
    with anyio.fail_after(DEADLINE):
        await _run(_graph(saver, **RARE), "t", 8)
        await _run(_graph(unpruned, **RARE), "t", 8)
        await saver.acopy_thread("t", "c")
        everything = await _states_by_step(unpruned)
        source = await _states_by_step(saver)
        copy = await _states_by_step(saver, "c")
        held = await _held(store, "c")
    assert {step: everything[step] for step in copy} == copy == source
    assert len(copy) < held


async def test_aprune_without_keep_latest_hides_the_ancestors_it_keeps_for_newer_ones() -> None:
    """A thread saved without keep_latest records no floors: the supersteps in each
    checkpoint's metadata tell which ancestors it needs, as aprune keeps them."""
    store = MemoryStore()
    saver, unpruned = _saver(store), _saver(MemoryStore())
    graph = _graph(saver, **RARE)
    with anyio.fail_after(DEADLINE):
        await _run(graph, "t", 8)
        await _run(_graph(unpruned, **RARE), "t", 8)
        before = {found.metadata["step"]: found.config async for found in saver.alist(config("t"))}
        await saver.aprune(["t"])
        everything = await _states_by_step(unpruned)
        listed = await _states_by_step(saver)
        by_id = {step: (await graph.aget_state(at)).values for step, at in before.items()
                 if await saver.aget_tuple(at) is not None}
        held = await _held(store)
    assert {step: everything[step] for step in listed} == listed == by_id
    assert len(listed) < held


async def test_a_checkpoint_whose_parent_was_saved_after_it_is_returned_by_id() -> None:
    """aget_tuple reads the headers below the checkpoint: a parent saved after it is not
    among them but is there (looked up), so the checkpoint is not taken for one whose
    ancestors were pruned."""
    saver = _saver(MemoryStore())
    counted = {"counters_since_delta_snapshot": {"x": [1, 2]}}
    with anyio.fail_after(DEADLINE):
        root = await put(saver, "t", values={"x": ["a"]}, versions={"x": 1})
        parent, child = checkpoint(versions={"x": 2}), checkpoint(versions={"x": 3})
        await saver.aput(config("t", parent["id"]), child, metadata(2, **counted), {})
        await saver.aput(config("t", root), parent, metadata(1, **counted), {})
        found = await saver.aget_tuple(config("t", child["id"]))
    assert found is not None
    assert found.checkpoint["id"] == child["id"]


async def test_aget_tuple_by_id_reads_only_the_headers_back_to_where_its_channels_reach() -> None:
    store = CountingStore(MemoryStore())
    saver = _saver(store)
    with anyio.fail_after(DEADLINE):
        await _run(_graph(saver, **RARE), "t", 2)
        newest = await saver.aget_tuple(config("t"))
        assert newest is not None
        store.take()
        assert await saver.aget_tuple(newest.config) is not None
    counters = newest.metadata["counters_since_delta_snapshot"]
    reach = max(steps for _, steps in counters.values())
    assert 0 < reach < 100
    assert store.take()["headers"] == 1
    assert store.last["headers"][1]["limit"] == reach


@pytest.mark.parametrize("parent_steps", [2, 0])  # 0: the parent needs no check itself
async def test_alist_lists_a_checkpoint_whose_parent_was_saved_after_it(
    parent_steps: int,
) -> None:
    saver = _saver(MemoryStore())
    with anyio.fail_after(DEADLINE):
        root = await put(saver, "t", values={"x": ["a"]}, versions={"x": 1})
        parent, child = checkpoint(versions={"x": 2}), checkpoint(versions={"x": 3})
        await saver.aput(config("t", parent["id"]), child,
                         metadata(2, counters_since_delta_snapshot={"x": [1, 2]}), {})
        await saver.aput(config("t", root), parent, metadata(
            1, counters_since_delta_snapshot={"x": [1, parent_steps]}), {})
        listed = [found.checkpoint["id"] async for found in saver.alist(config("t"))]
        by_id = await saver.aget_tuple(config("t", child["id"]))
    assert listed == [parent["id"], child["id"], root]
    assert by_id is not None
