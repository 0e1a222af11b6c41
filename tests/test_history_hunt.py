"""Growing histories against a model, with lists built to catch a wrong restore.

The manager machine of tests/test_model_checking.py (its reference model of runs, pruning,
expiry, deletes, forks, status changes and races) with two more kinds of create: one whose
``messages`` and ``tool_calls`` are derived from any earlier checkpoint's lists (not only the
latest: a live one, a pruned one, a deleted one) by appending, editing an old entry in place,
truncating, inserting in the middle, replacing the list with another of the same length,
swapping an entry for a twin that compares equal but is another type (``1``, ``1.0`` and
``True``; ``"a"`` and ``b"a"``; a tuple and a list; a dict in another key order; ``0.0`` and
``-0.0``), adding long entries or emptying it; and two such creates at once, one per manager.
After every step every checkpoint the model holds restores, through each manager, to exactly
what its create received, types and dict key order included; one it does not hold restores
to nothing. Logs begin at two entries, parts of a few dozen bytes are compressed, and
large creates are encoded in worker threads, so every code path of the logs is taken.

The LangGraph saver's list channels get the same treatment against LangGraph's own saver:
random turns adding, removing, editing (by id, in place, or swapping a value in a message
for its equal of another type) and clearing messages and growing a plain list, through two
savers sharing one store, some continuing from an older checkpoint, with and without
pruning; every checkpoint of the thread must load what LangGraph's saver loads, byte for
byte as the serde writes it.

By default a few examples on the memory store (one store, two managers) and on two SQLite
store objects over one file run in a few seconds. ``FC_HUNT=1`` runs many more, also on the
file store, Redis and PostgreSQL with two store objects each (``FC_HUNT_EXAMPLES`` sets the
examples per store, default 200, a quarter of them on those three, of ``FC_HUNT_STEPS``
steps, default 40; ``FC_HUNT_SEEDS`` the LangGraph seeds per store, default 300).
"""

from __future__ import annotations

import copy
import functools
import math
import operator
import os
import struct
import uuid
from collections.abc import Callable, Iterator
from typing import Annotated, Any, TypedDict

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    MultipleResults,
    RuleBasedStateMachine,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from fastcheckpoint import Checkpoint, CheckpointManager, CheckpointStore
from tests import test_model_checking as machines
from tests import test_model_checking_stores as shared
from tests._helpers import make_config

HUNT = os.environ.get("FC_HUNT") == "1"
EXAMPLES = int(os.environ.get("FC_HUNT_EXAMPLES", "200")) if HUNT else 6
STEPS = int(os.environ.get("FC_HUNT_STEPS", "40")) if HUNT else 20

_scalars = (
    st.none() | st.booleans() | st.sampled_from([0, 1, -1, 2**63, 1.0, 0.0, -0.0, 1.5])
    | st.sampled_from(["", "a", "é", "1"]) | st.sampled_from([b"", b"a", b"1"])
)
entries = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.sampled_from(["a", "b", "c", "role"]), inner, max_size=3)
    ),
    max_leaves=6,
)
LONG = 3_000
"""Characters of a long entry (far above the parts' compression threshold)."""
OPS = ("append", "same", "edit", "twin", "truncate", "insert", "replace", "long", "empty",
       "nested")


def twin(value: Any) -> Any:
    """A value that compares equal to ``value`` (or nearly) but stores differently."""
    kind = type(value)
    if kind is bool:
        return int(value)
    if kind is int:
        return float(value) if abs(value) < 2**53 else value - 1
    if kind is float:
        return -value if value == 0 else (True if value == 1.0 else int(value))
    if kind is str:
        return value.encode()
    if kind is bytes:
        return value.decode("latin-1")
    if kind is tuple:
        return list(value)
    if kind is list:
        return tuple(value)
    if kind is dict:
        return dict(reversed(list(value.items()))) if len(value) > 1 else {**value, "x": None}
    return 0


def exact(actual: Any, expected: Any, path: str = "") -> None:
    """Assert ``actual`` is ``expected`` as stored data: same types at every level, dicts in
    the same key order, floats with the same bits."""
    assert type(actual) is type(expected), (path, actual, expected)
    if type(expected) is float:
        assert struct.pack("<d", actual) == struct.pack("<d", expected), (path, actual, expected)
    elif type(expected) in (list, tuple):
        assert len(actual) == len(expected), (path, actual, expected)
        for index, (one, other) in enumerate(zip(actual, expected, strict=True)):
            exact(one, other, f"{path}[{index}]")
    elif type(expected) is dict:
        assert list(actual) == list(expected), (path, actual, expected)
        for key in expected:
            exact(actual[key], expected[key], f"{path}[{key!r}]")
    else:
        assert actual == expected, (path, actual, expected)


def derive(data: st.DataObject, base: list[Any]) -> list[Any]:
    """A list made from ``base`` (a copy) by one change. The draws never depend on ``base``
    (a race decides which list is the latest, and hypothesis must replay the same draws)."""
    op, where = data.draw(st.sampled_from(OPS)), data.draw(st.integers(0, 1 << 16))
    added, entry = data.draw(st.lists(entries, min_size=1, max_size=3)), data.draw(entries)
    made = copy.deepcopy(base)
    index = where % len(made) if made else 0
    if op == "append" or (not made and op not in ("empty", "long", "same")):
        made += added
    elif op == "edit":
        if type(made[index]) is dict:
            made[index]["role"] = entry  # in place: the dict the base holds
        else:
            made[index] = entry
    elif op == "twin":
        made[index] = twin(made[index])
        made += added[1:]
    elif op == "truncate":
        del made[index:]
    elif op == "insert":
        made.insert(index, entry)
    elif op == "replace":
        made = [twin(one) for one in made]
    elif op == "long":
        made.append({"content": "y" * LONG, "n": len(made)})
    elif op == "empty":
        made = []
    elif op == "nested":
        made.append([copy.deepcopy(made), len(made)])
    return made


class HuntMachine(machines.ExplicitParentMachine):
    """Every rule of the model machine with explicit parents, plus derived lists; the
    expected ``tool_calls`` of each checkpoint are kept beside the model (``[]`` unless a
    derived create gave some)."""

    processes = 2

    def __init__(self) -> None:
        self.tools: dict[str, list[Any]] = {}
        # Not super(): the store machines mixed in after this class take other arguments.
        machines.ManagerMachine.__init__(self)

    def make_managers(self, cleanup_batch_size: int = 500) -> list[CheckpointManager]:
        stores = self.stores if len(self.stores) > 1 else self.stores * 2
        return [
            CheckpointManager(store, config=make_config(
                self.clock, history_min_entries=2, max_checkpoints_per_run=limit,
                cleanup_batch_size=cleanup_batch_size, compress_min_bytes=48,
                offload_min_bytes=2_000))
            for store, limit in zip(stores, self.limits, strict=True)
        ]

    def check_checkpoint(self, actual: Checkpoint | None,
                         expected: machines.ModelCheckpoint | None) -> None:
        super().check_checkpoint(actual, expected)
        if actual is not None and expected is not None:
            exact(actual.messages, expected.messages, f"{actual.checkpoint_id} messages")
            exact(actual.tool_calls, self.tools.get(expected.checkpoint_id, []),
                  f"{actual.checkpoint_id} tool_calls")

    def lists_of(self, source: str, run_id: str) -> tuple[list[Any], list[Any]]:
        """The lists of checkpoint ``source`` as its create received them (gone or not), or
        of the run's latest when ``source`` names none."""
        found = self.model.checkpoints.get(source) or self.model.restore(run_id)
        if found is None:
            return [], []
        return found.messages, self.tools.get(found.checkpoint_id, [])

    def create_lists(self, process: int, run_id: str, messages: list[Any],
                     tool_calls: list[Any], ttl: float | None) -> Checkpoint:
        return self.call(self.manager(process).create, run_id, {}, messages=messages,
                         tool_calls=tool_calls,
                         ttl_seconds=None if ttl is None else ttl * self.TIME_SCALE)

    def record(self, created: Checkpoint, process: int, messages: list[Any],
               tool_calls: list[Any]) -> str:
        """Check ``created`` against the model's next checkpoint of its run and add it."""
        run_id = created.run_id
        sequence, parent, status = self.model.next_append(run_id)
        metadata = created.metadata
        assert (metadata.sequence, metadata.parent_id, metadata.status) == (
            sequence, parent, status)
        exact(created.messages, messages)
        exact(created.tool_calls, tool_calls)
        self.model.append(
            machines.ModelCheckpoint(
                checkpoint_id=created.checkpoint_id, run_id=run_id, sequence=sequence,
                state={}, tags=[], parent_id=parent, expires_at=metadata.expires_at,
                messages=copy.deepcopy(messages)),
            self.limit(process))
        self.tools[created.checkpoint_id] = copy.deepcopy(tool_calls)
        return created.checkpoint_id

    @rule(
        target=machines.checkpoint_ids,
        process=machines.processes,
        run_id=st.sampled_from(machines.RUN_IDS),
        source=machines.checkpoint_ids,
        restore_first=st.booleans(),
        ttl=machines.ttls,
        data=st.data(),
    )
    def create_derived(self, process: int, run_id: str, source: str, restore_first: bool,
                       ttl: float | None, data: st.DataObject) -> str:
        if restore_first:
            self.restore(process, run_id)
        messages, tool_calls = self.lists_of(source, run_id)
        messages = derive(data, messages)
        other = derive(data, tool_calls)
        if data.draw(st.booleans()):
            tool_calls = other
        created = self.create_lists(process, run_id, messages, tool_calls, ttl)
        return self.record(created, process, messages, tool_calls)

    @rule(target=machines.checkpoint_ids, run_id=st.sampled_from(machines.RUN_IDS),
          data=st.data())
    def race_derived(self, run_id: str, data: st.DataObject) -> MultipleResults[str]:
        """Two creates of one run at once, one per manager, each from the latest lists
        (which both may have restored first)."""
        for process in (0, 1):
            if data.draw(st.booleans()):
                self.restore(process, run_id)
        base, base_tools = self.lists_of("", run_id)
        lists = [(derive(data, base), derive(data, base_tools) if process else base_tools)
                 for process in (0, 1)]
        created = self.call_both(*(
            functools.partial(self.manager(process).create, run_id, {}, messages=messages,
                              tool_calls=tool_calls)
            for process, (messages, tool_calls) in enumerate(lists)))
        assert all(isinstance(result, Checkpoint) for result in created), created
        landed = sorted(zip(created, lists, (0, 1), strict=True),
                        key=lambda made: made[0].metadata.sequence)
        for checkpoint, (messages, tool_calls), process in landed:
            self.record(checkpoint, process, messages, tool_calls)
        return multiple(*(checkpoint.checkpoint_id for checkpoint in created))

    @rule(
        target=machines.checkpoint_ids,
        process=machines.processes,
        source=machines.checkpoint_ids,
        new_run_id=st.sampled_from(machines.RUN_IDS),
        ttl=machines.ttls,
    )
    def fork(self, process: int, source: str, new_run_id: str, ttl: float | None) -> str:
        forked = super().fork(process, source, new_run_id, ttl)
        if forked != machines.NOT_AN_ID:
            self.tools[forked] = copy.deepcopy(self.tools.get(source, []))
        return forked

    @invariant()
    def every_checkpoint_restores_exactly(self) -> None:
        for checkpoint_id in list(self.model.checkpoints):
            expected = self.model.restore_from(checkpoint_id)
            for manager in self.managers:
                self.check_checkpoint(self.call(manager.restore_from, checkpoint_id),
                                      expected)


class MemoryHunt(HuntMachine):
    """One memory store, two managers ("two processes" sharing it)."""


class FileHunt(HuntMachine, shared.FileMachine):
    """Two file store objects over one directory, one manager each."""


class SQLiteHunt(HuntMachine, shared.SQLiteMachine):
    """Two SQLite store objects over one file, one manager each."""


def _settings(examples: int) -> settings:
    return settings(max_examples=examples, stateful_step_count=STEPS, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture
def hunt(request: pytest.FixtureRequest) -> Iterator[Callable[[], HuntMachine]]:
    kind = request.param
    if kind == "memory":
        yield MemoryHunt
    elif kind == "file":
        yield FileHunt
    elif kind == "sqlite":
        yield SQLiteHunt
    elif kind == "redis":
        url = shared._redis_url()

        class RedisHunt(HuntMachine, shared.RedisMachine):
            def __init__(self) -> None:
                self.url, self.cluster = url, False
                self.prefix = f"fchunt-{uuid.uuid4().hex[:12]}"
                HuntMachine.__init__(self)

        yield RedisHunt
    else:
        with shared.postgres_schema(request.config) as (target, schema):

            class PostgresHunt(HuntMachine, shared.PostgresMachine):
                def __init__(self) -> None:
                    self.target, self.schema = target, schema
                    HuntMachine.__init__(self)

            yield PostgresHunt


@pytest.mark.parametrize("hunt", ["memory", "sqlite"], indirect=True)
def test_every_checkpoint_restores_exactly(hunt: Callable[[], HuntMachine]) -> None:
    run_state_machine_as_test(hunt, settings=_settings(EXAMPLES))


@pytest.mark.skipif(not HUNT, reason="a long search: FC_HUNT=1")
@pytest.mark.parametrize("hunt", ["file", "redis", "postgres"], indirect=True)
def test_every_checkpoint_restores_exactly_on_more_stores(
        hunt: Callable[[], HuntMachine]) -> None:
    run_state_machine_as_test(hunt, settings=_settings(max(1, EXAMPLES // 4)))


def test_twins_store_differently() -> None:
    """The twins this search swaps in compare equal (or nearly) but are other values."""
    for value in (1, 1.0, True, 0.0, "a", b"a", (1,), [1], {"a": 1, "b": 2}):
        other = twin(value)
        assert type(other) is not type(value) or other != value or (
            type(value) is dict and list(other) != list(value)) or (
            type(value) is float and math.copysign(1, other) != math.copysign(1, value))


async def _anchors(store: CheckpointStore, run_id: str) -> int:
    """How many messages logs the run's items hold (anchors, not their parts)."""
    from fastcheckpoint import _ids

    page = await store.scan_items(_ids.key_of(run_id), prefix="m/", start_after=None,
                                  limit=1_000, now=0.0)
    return sum("/" not in key[2:].split("/", 1)[1] for key, _ in page)


@pytest.mark.anyio
async def test_the_bytes_kept_to_extend_logs_are_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A log that grows counts what it adds to the bytes the process keeps: past
    ``KEPT_BYTES`` the least recently written run is forgotten (its next create begins a new
    log) instead of every run's entries being kept however much they grow."""
    from fastcheckpoint import _history
    from fastcheckpoint.stores.memory import MemoryStore
    from tests._helpers import FakeClock

    monkeypatch.setattr(_history, "KEPT_BYTES", 4_000)
    store = MemoryStore()
    manager = CheckpointManager(store, config=make_config(FakeClock(), history_min_entries=2))
    small = [{"content": "a"}, {"content": "b"}]
    await manager.create("small", {}, messages=small)
    growing: list[Any] = []
    for step in range(60):  # about 6 kB of entries, added 100 bytes at a time
        growing.append({"content": "x" * 90, "step": step})
        await manager.create("growing", {}, messages=growing)
    await manager.create("small", {}, messages=[*small, {"content": "c"}])
    assert await _anchors(store, "small") == 2  # forgotten: a new log
    assert await _anchors(store, "growing") == 1
    restored = await manager.restore("small")
    assert restored is not None
    exact(restored.messages, [*small, {"content": "c"}])


# -- the LangGraph saver's list channels --------------------------------------------------------

try:
    from langchain_core.messages import AnyMessage
    from langgraph.graph.message import add_messages
except ImportError:  # without LangGraph its test is skipped
    pass
else:

    class Chat(TypedDict):
        messages: Annotated[list[AnyMessage], add_messages]
        items: Annotated[list[Any], operator.add]
        ops: list[Any]


TWINS = (1, 1.0, True, "1", b"1", 0.0, -0.0, [1], {"n": 1})
LANGGRAPH_SEEDS = range(int(os.environ.get("FC_HUNT_SEEDS", "300")) if HUNT else 2)
LANGGRAPH_STEPS = 30 if HUNT else 10


def _chat_graph(saver: Any) -> Any:
    """A graph whose one node does what its input's ``ops`` say to ``messages`` (under
    ``add_messages``: new messages, removals and edits by id, all removed) and ``items``
    (a plain list under ``operator.add``)."""
    from langchain_core.messages import AIMessage, RemoveMessage
    from langgraph.graph import END, START, StateGraph
    from langgraph.graph.message import REMOVE_ALL_MESSAGES

    def act(state: Chat) -> dict[str, Any]:
        messages, updates, items = state.get("messages", []), [], []
        for op in state.get("ops", []):
            kind, number, text = op
            if kind == "add":
                updates += [AIMessage(content=text * (1 + number % 3), id=f"{text}-{i}")
                            for i in range(1 + number % 3)]
            elif kind in ("remove", "edit", "mutate") and messages:
                target = messages[number % len(messages)]
                if kind == "remove":
                    updates.append(RemoveMessage(id=target.id))
                elif kind == "edit":
                    updates.append(AIMessage(content=text, id=target.id))
                else:  # in place, the object the graph's state holds
                    target.content = f"{target.content}{text}"
                    updates.append(target)
            elif kind == "twin" and messages:
                # In place, a value its equal of another type replaces (1, 1.0, True, ...).
                target = messages[number % len(messages)]
                target.additional_kwargs["n"] = TWINS[number % len(TWINS)]
                updates.append(target)
            elif kind == "clear":
                updates += [RemoveMessage(id=REMOVE_ALL_MESSAGES),
                            AIMessage(content=text, id=f"after-{number}")]
            elif kind == "items":
                items += [number, float(number), number == 1, text, text.encode(), [number]]
        return {"messages": updates, "items": items}

    graph = StateGraph(Chat)
    graph.add_node("act", act)
    graph.add_edge(START, "act")
    graph.add_edge("act", END)
    return graph.compile(checkpointer=saver)


async def _all_values(saver: Any, thread: str) -> list[tuple[Any, bytes]]:
    """Every checkpoint's (step, channel values as the serde writes them), newest first."""
    from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

    serde = JsonPlusSerializer()
    found = []
    async for listed in saver.alist({"configurable": {"thread_id": thread}}):
        values = listed.checkpoint["channel_values"]
        found.append((listed.metadata.get("step"),
                      {name: serde.dumps_typed(value) for name, value in values.items()}))
    return found


async def _langgraph_hunt(seed: int, store: CheckpointStore, keep: int | None = None) -> None:
    """``keep``: the savers prune to the newest ``keep`` checkpoints (compared with the
    newest of LangGraph's)."""
    import random

    import anyio
    from langchain_core.messages import HumanMessage
    from langgraph.checkpoint.memory import InMemorySaver

    from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
    from tests._helpers import FakeClock

    rng = random.Random(seed)
    ours = [FastCheckpointSaver(store, keep_latest=keep, config=make_config(
        FakeClock(), history_min_entries=2, compress_min_bytes=48)) for _ in range(2)]
    graphs = [_chat_graph(saver) for saver in ours]
    theirs = _chat_graph(InMemorySaver())
    thread = "hunt"
    for step in range(LANGGRAPH_STEPS):
        ops = [(rng.choice(["add", "add", "remove", "edit", "mutate", "twin", "clear", "items"]),
                rng.randrange(100), rng.choice(["a", "b", "é", "long" * 50]))
               for _ in range(rng.randint(1, 3))]
        update = {"ops": ops, "messages": [HumanMessage(content=f"q{step}", id=f"q{step}")]}
        mine = rng.choice(graphs)
        listed_ours = [found.config async for found in mine.checkpointer.alist(
            {"configurable": {"thread_id": thread}})]
        listed_theirs = [found.config async for found in theirs.checkpointer.alist(
            {"configurable": {"thread_id": thread}})]
        assert len(listed_ours) == (len(listed_theirs) if keep is None
                                    else min(keep, len(listed_theirs))), seed
        at = rng.randrange(len(listed_ours)) if listed_ours and rng.random() < 0.3 else None
        with anyio.fail_after(30):
            for graph, listed in ((mine, listed_ours), (theirs, listed_theirs)):
                settings = listed[at] if at is not None else {
                    "configurable": {"thread_id": thread}}
                # durability="sync": LangGraph hands a save the live message objects and
                # calls it only after the previous save; a node editing one in place while
                # a slower saver's previous save runs would change it for any saver.
                await graph.ainvoke(copy.deepcopy(update), settings, durability="sync")
        expected = (await _all_values(theirs.checkpointer, thread))[:keep]
        for saver in ours:
            found = await _all_values(saver, thread)
            assert found == expected, (seed, step, ops, at, [
                (index, name, value, expected[index][1].get(name))
                for index, (_, values) in enumerate(found)
                for name, value in values.items() if value != expected[index][1].get(name)])


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("kind", ["memory", "sqlite", "memory-keep"] + ["file"] * HUNT)
async def test_langgraph_list_channels_load_what_langgraph_saved(
        kind: str, tmp_path: Any) -> None:
    """Random turns through two savers ("processes") sharing one store, some continuing
    from an older checkpoint (a fork), compared with LangGraph's own saver: every checkpoint
    of the thread loads the same values, serialized byte for byte."""
    pytest.importorskip("langgraph")
    from fastcheckpoint.stores.file import FileStore
    from fastcheckpoint.stores.memory import MemoryStore
    from fastcheckpoint.stores.sqlite import SQLiteStore

    for seed in LANGGRAPH_SEEDS:
        store: CheckpointStore = (
            SQLiteStore(tmp_path / f"{seed}.db", synchronous="normal") if kind == "sqlite"
            else FileStore(tmp_path / str(seed), fsync=False) if kind == "file"
            else MemoryStore())
        try:
            await _langgraph_hunt(seed, store, keep=3 if kind == "memory-keep" else None)
        finally:
            await store.aclose()



# -- the log format itself ----------------------------------------------------------------------


class LogFormatMachine(RuleBasedStateMachine):
    """Writers extending one log (``fastcheckpoint._logs``) from whatever tail they hold:
    their own last write, or any version as a read finds it (branches that share a start);
    writes that fail after storing their part (left behind, never acknowledged); merges
    whose removal of the parts they merged runs late, never, or while other writers still
    hold those parts in their tails; damaged strays under the anchor. Every acknowledged
    version reads back exactly."""

    ANCHOR = "m/hunt.1"

    def __init__(self) -> None:
        super().__init__()
        from fastcheckpoint import _logs

        self.logs = _logs
        self.items: dict[str, bytes] = {}
        self.serial = 0
        first = self.entries(3)
        write = _logs.begin(self.ANCHOR, first, 3)
        self.items[write.key] = write.value
        self.versions: list[tuple[str, int, int, bytes]] = [
            (write.key, write.count, write.crc, first)]
        self.writers: list[tuple[Any, bytes]] = [(write.tail(self.ANCHOR), first)] * 3
        self.pending: list[tuple[str, ...]] = []

    def entries(self, count: int) -> bytes:
        made = b"".join(msgspec_encode(f"e{self.serial}-{index}") for index in range(count))
        self.serial += 1
        return made

    def read(self, version: int) -> Any:
        last, count, crc, data = self.versions[version]
        found = self.logs.read(self.ANCHOR, last, count, crc, self.items, what="log",
                               where="hunt")
        assert bytes(found.entries) == data, version
        return found

    @rule(writer=st.integers(0, 2), version=st.integers(0, 1 << 16))
    def read_a_version(self, writer: int, version: int) -> None:
        """The writer reads a version and will extend it (a restore of the latest)."""
        index = version % len(self.versions)
        found = self.read(index)
        self.writers[writer] = (found.tail, bytes(found.entries))

    @rule(writer=st.integers(0, 2), added=st.integers(1, 3), landed=st.booleans(),
          removal=st.sampled_from(["now", "later", "never"]))
    def write(self, writer: int, added: int, landed: bool, removal: str) -> None:
        tail, data = self.writers[writer]
        new = self.entries(added)
        write = self.logs.extend(tail, data, new, added)
        assert write.key not in self.items
        self.items[write.key] = write.value
        if not landed:  # stored, then the write failed: left behind, the writer goes on
            return
        self.versions.append((write.key, write.count, write.crc, data + new))
        after = write.tail(self.ANCHOR)
        if write.discard and removal == "now":
            for key in write.discard:
                self.items.pop(key, None)
        elif write.discard:
            after.leftovers = write.discard  # the manager's way: left to the next merge
            if removal == "later":
                self.pending.append(write.discard)
        self.writers[writer] = (after, data + new)

    @rule(writer=st.integers(0, 2), writes=st.sampled_from(
        [15, 17, 31, 40, 260] if HUNT else [15, 17]),
          removal=st.sampled_from(["now", "later", "never"]))
    def burst(self, writer: int, writes: int, removal: str) -> None:
        """Many writes in a row by one writer: enough level-0 parts to merge (16), and of
        merged parts to merge again (256)."""
        for _ in range(writes):
            self.write(writer, 1, True, removal)

    @rule()
    def late_removal(self) -> None:
        if self.pending:
            for key in self.pending.pop(0):
                self.items.pop(key, None)

    @rule(index=st.integers(0, 200), garbage=st.binary(max_size=8))
    def damaged_stray(self, index: int, garbage: bytes) -> None:
        from fastcheckpoint.stores import nested_prefix

        self.items[f"{nested_prefix(self.ANCHOR)}{index:010d}.stray{self.serial}"] = garbage
        self.serial += 1

    @invariant()
    def versions_read_exactly(self) -> None:
        """The newest versions and a seventh of the others after every step (all of them
        after each step would cost the square of the steps), every one at the end."""
        self.steps = getattr(self, "steps", 0) + 1
        count = len(self.versions)
        for version in range(count):
            if version >= count - 3 or version % 7 == self.steps % 7:
                self.read(version)

    def teardown(self) -> None:
        for version in range(len(self.versions)):
            self.read(version)


def test_the_log_format_reads_every_version_exactly() -> None:
    run_state_machine_as_test(LogFormatMachine, settings=settings(
        max_examples=int(os.environ.get("FC_HUNT_EXAMPLES", "200")) * 2 if HUNT else 8,
        stateful_step_count=100 if HUNT else 25, deadline=None,
        suppress_health_check=[HealthCheck.too_slow]))

# -- the adapters' entry log ----------------------------------------------------------------


@pytest.mark.anyio
async def test_an_entry_log_never_names_a_segment_another_write_left_at_its_place() -> None:
    """On S3 an append writes its new segment before it commits, and a segment is written
    only where no item is: one that lost the sequence race (or failed after writing it)
    leaves its segment at the place the winner's goes, and the winner read the loser's
    entries. Seen with two ``EntryLog`` objects appending at once on S3 (moto): the log read
    ``[start, start, A]`` where ``[start, A, B]`` was appended. Here the leftover is put in
    place by hand, on the memory store; the segment's key carries a token of its own, so
    the append writes its own entries."""
    from fastcheckpoint import _ids
    from fastcheckpoint.integrations._entrylog import EntryLog
    from fastcheckpoint.stores import Item
    from fastcheckpoint.stores.memory import MemoryStore
    from tests._helpers import T0

    store = MemoryStore()
    log = EntryLog(store, "session", clock=lambda: T0)
    head = await log.append([b"start"])
    leftover = msgspec_encode([b"another", b"writer's"])
    # Where a segment of the next append would be at a place its sequence alone decides.
    await store.put_items(_ids.key_of("session"), [
        Item(key=f"s/{head.incarnation}/{sequence:x}", value=leftover)
        for sequence in range(1, 4)], now=T0)
    expected = [b"start"]
    for entry in (b"a", b"b", b"c"):
        await log.append([entry])
        expected.append(entry)
        found = await EntryLog(store, "session", clock=lambda: T0).read()
        assert found is not None
        assert found.entries == expected


def msgspec_encode(value: Any) -> bytes:
    import msgspec

    return msgspec.msgpack.encode(value)

