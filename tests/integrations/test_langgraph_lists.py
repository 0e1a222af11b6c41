"""The LangGraph saver's list memo: a list channel's unchanged leading entries are not
serialized again, and what the memo returns is always, byte for byte, what the serde writes
for the whole list: through appends, edits in place (also of nested dicts, and an ``int``
swapped for an equal ``float``), truncation, insertion, entries it cannot fingerprint and
models whose dump is not a function of their fields."""

from __future__ import annotations

import array
import copy
import datetime as dt
import threading
from typing import Annotated, Any, TypedDict

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from pydantic import BaseModel, Field, computed_field, field_serializer

from fastcheckpoint import CheckpointConfig, MemoryStore
from fastcheckpoint.integrations._langgraph_lists import ListMemo, fingerprint
from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
from tests.integrations._langgraph_support import config, put

SERDE = JsonPlusSerializer()
DEADLINE = 30


class Plain(BaseModel):
    text: str
    count: int = 0


class Computed(BaseModel):
    text: str

    @computed_field  # type: ignore[prop-decorator]
    @property
    def length(self) -> int:
        return len(self.text)


class Clocked(BaseModel):
    text: str

    @field_serializer("text")
    def _stamp(self, text: str) -> str:
        return f"{text}@{dt.datetime.now().isoformat()}"


class Nesting(BaseModel):
    inner: Plain


def _serialized(memo: ListMemo, value: list[Any], channel: str = "messages") -> tuple[str, bytes]:
    calls: list[int] = []

    def dumps(entries: list[Any]) -> tuple[str, bytes]:
        calls.append(len(entries))
        return SERDE.dumps_typed(entries)

    found = memo.dumps(SERDE, "run", channel, value, dumps)
    return SERDE.dumps_typed(value) if found is None else found  # as the saver does


def test_only_new_entries_are_serialized() -> None:
    memo = ListMemo()
    value: list[Any] = [HumanMessage(content="hi", id="h0")]
    sizes: list[int] = []

    def dumps(entries: list[Any]) -> tuple[str, bytes]:
        sizes.append(len(entries))
        return SERDE.dumps_typed(entries)

    for step in range(20):
        value = [*value, AIMessage(content=f"answer {step}", id=f"a{step}")]
        assert memo.dumps(SERDE, "run", "messages", value, dumps) == SERDE.dumps_typed(value)
    assert sizes == [2] + [1] * 19


def test_edits_in_place_are_serialized_again() -> None:
    memo = ListMemo()
    value: list[Any] = [AIMessage(content=f"m{i}", id=f"a{i}") for i in range(5)]
    value.append({"score": 1, "tags": ["a"]})
    assert _serialized(memo, value) == SERDE.dumps_typed(value)
    value[2].content = "edited"
    assert _serialized(memo, value) == SERDE.dumps_typed(value)
    value[3].additional_kwargs["note"] = {"nested": True}
    assert _serialized(memo, value) == SERDE.dumps_typed(value)
    value[5]["score"] = 1.0  # equal, another type: serialized differently
    assert _serialized(memo, value) == SERDE.dumps_typed(value)
    value[5]["score"] = True
    assert _serialized(memo, value) == SERDE.dumps_typed(value)
    value[5]["tags"].append("b")
    assert _serialized(memo, value) == SERDE.dumps_typed(value)


def _answer(**metadata: Any) -> AIMessage:
    return AIMessage(content="x", id="a", response_metadata=metadata)


def test_fingerprints_are_exact() -> None:
    assert fingerprint(_answer(n=1)) == fingerprint(_answer(n=1))
    assert fingerprint(_answer(n=1)) != fingerprint(_answer(n=1.0)) != fingerprint(_answer(n=True))
    assert fingerprint(_answer(a=1, b=2)) != fingerprint(_answer(b=2, a=1))  # order is encoded
    assert fingerprint(_answer(n=0.0)) != fingerprint(_answer(n=-0.0))
    assert fingerprint(Plain(text="x")) == fingerprint(Plain(text="x"))
    bent = Plain(text="x", count=1)
    bent.count = True  # no validation on assignment: another value for the serde
    assert fingerprint(bent) != fingerprint(Plain(text="x", count=1))
    for opaque in (Computed(text="x"), Clocked(text="x"), Nesting(inner=Plain(text="x")),
                   _answer(when=dt.date(2026, 1, 1)), dt.datetime(2026, 1, 1), {"n": 1},
                   "text", 1, object()):
        assert fingerprint(opaque) is None


def test_buffers_and_other_objects_have_no_fingerprint() -> None:
    """Anything but exact data is refused, though marshal-like encoders would write a
    buffer's bytes alone (a numpy array's dtype and shape are not in them)."""
    import numpy as np

    for held in (np.zeros(2), array.array("d", [0.0]), (1, 2), {1, 2}, dt.timedelta(1),
                 "lone \udc80 surrogate", 2**70):
        assert fingerprint(_answer(held=held)) is None
    memo = ListMemo()
    value: list[Any] = [_answer(n=0), AIMessage(content="b", id="b",
                                                 response_metadata={"v": np.zeros(4, np.float32)})]
    for change in range(3):
        if change == 1:
            value[1].response_metadata["v"].shape = (2, 2)  # in place: same bytes, new shape
        if change == 2:
            value = [value[0], AIMessage(content="b", id="b",
                                         response_metadata={"v": np.zeros(2)})]
        value = [*value, _answer(n=change + 1)]
        assert _serialized(memo, value) == SERDE.dumps_typed(value)


def test_an_entry_edited_while_serialized_is_serialized_again() -> None:
    """A node may edit a message while a worker thread encodes a large save: the memo keeps
    the fingerprint taken before the serde read it, so the next save serializes it again."""
    memo = ListMemo()
    value: list[Any] = [AIMessage(content="draft", id="a")]

    def edit_while_dumping(entries: list[Any]) -> tuple[str, bytes]:
        typed = SERDE.dumps_typed(entries)
        value[0].content = "final"  # after the serde read it
        return typed

    memo.dumps(SERDE, "run", "messages", value, edit_while_dumping)
    value = [*value, AIMessage(content="next", id="b")]
    assert _serialized(memo, value) == SERDE.dumps_typed(value)
    assert b"final" in _serialized(memo, value)[1]


def test_an_entry_edited_and_restored_while_serialized_keeps_the_right_bytes() -> None:
    """Edited to another state while the serde works, and back before the next save: what is
    kept is the serde's output for the state the fingerprint saw, not the passing one."""
    memo = ListMemo()
    value: list[Any] = [AIMessage(content="draft", id="a")]
    before = SERDE.dumps_typed(copy.deepcopy(value))

    def edit_while_dumping(entries: list[Any]) -> tuple[str, bytes]:
        value[0].content = "streaming..."
        typed = SERDE.dumps_typed(entries)
        value[0].content = "draft"
        return typed

    assert memo.dumps(SERDE, "run", "messages", value, edit_while_dumping) == before
    value = [*value, AIMessage(content="next", id="b")]
    assert _serialized(memo, value) == SERDE.dumps_typed(value)


@pytest.mark.anyio
async def test_channel_values_changed_while_serialized_are_saved_as_they_were(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """LangGraph hands over the channels' own lists and dicts; a node of the next step may
    change them while a worker thread encodes a large save. The save is of the values as
    they were when it began (the serde's encoder never iterates a container that changes
    under it), through the memo (a list of messages) and without it (plain lists, dicts)."""
    messages: list[Any] = [AIMessage(content=f"m{i}", id=f"a{i}") for i in range(3)]
    plain: list[Any] = [1, 2, 3]
    table: dict[str, Any] = {"a": 1, "b": 2}
    values = {"messages": messages, "plain": plain, "table": table}
    expected = copy.deepcopy(values)
    dumps = JsonPlusSerializer.dumps_typed

    def meddling(self: JsonPlusSerializer, value: Any) -> tuple[str, bytes]:
        messages.append(AIMessage(content="late", id="late"))
        del messages[0]
        plain.append(4)
        del plain[0]
        table["c"] = 3
        table.pop("a", None)
        return dumps(self, value)

    saver = FastCheckpointSaver(MemoryStore())
    monkeypatch.setattr(JsonPlusSerializer, "dumps_typed", meddling)
    with anyio.fail_after(DEADLINE):
        saved = await put(saver, "t", values=values, versions=dict.fromkeys(values, "1"))
        found = await saver.aget_tuple(config("t", saved))
    assert found is not None
    assert found.checkpoint["channel_values"] == expected


@pytest.mark.anyio
async def test_a_large_save_serializes_on_the_callers_thread_and_encodes_off_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A large save's bytes are encoded in a worker thread, but LangGraph's objects are read
    (serialized) on the caller's thread when the save begins: with durability="async" a node
    of the next step may edit a list inside a channel's dict meanwhile, and the serde's C
    encoder crashes the process when a container it reads changes under it."""
    loop_thread = threading.get_ident()
    serialized_on: set[int] = set()
    encoded_off_loop: list[bool] = []
    dumps = JsonPlusSerializer.dumps_typed

    def recording(self: JsonPlusSerializer, value: Any) -> tuple[str, bytes]:
        serialized_on.add(threading.get_ident())
        return dumps(self, value)

    import fastcheckpoint.integrations.langgraph as module

    in_worker_thread = module.in_worker_thread

    async def counted(func: Any, *args: Any) -> Any:
        encoded_off_loop.append(True)
        return await in_worker_thread(func, *args)

    saver = FastCheckpointSaver(MemoryStore(), config=CheckpointConfig(offload_min_bytes=1))
    nested = {"found": [AIMessage(content=f"d{i}", id=f"d{i}") for i in range(3)]}
    values: dict[str, Any] = {"docs": nested, "messages": [HumanMessage(content="hi", id="h")]}
    with anyio.fail_after(DEADLINE):
        first = await put(saver, "t", values=values, versions=dict.fromkeys(values, "1"))
        monkeypatch.setattr(JsonPlusSerializer, "dumps_typed", recording)
        monkeypatch.setattr(module, "in_worker_thread", counted)
        nested["found"].append(AIMessage(content="d3", id="d3"))
        second = await put(saver, "t", parent=first, values=values,
                           versions=dict.fromkeys(values, "2"))
        found = await saver.aget_tuple(config("t", second))
    assert encoded_off_loop  # the large save's bytes: in a worker thread
    assert serialized_on == {loop_thread}  # LangGraph's objects: on the caller's thread
    assert found is not None
    assert [m.content for m in found.checkpoint["channel_values"]["docs"]["found"]] == [
        "d0", "d1", "d2", "d3"]


@pytest.mark.anyio
async def test_a_save_stores_the_values_as_they_were_when_it_began(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A save that first reads its parent's header (a process that did not save the parent)
    lets other tasks run meanwhile; a node editing a nested list in place then changes
    nothing that save stores."""
    store = MemoryStore()
    nested: dict[str, Any] = {"found": ["a", "b"]}
    values: dict[str, Any] = {"docs": nested, "context": {"k": "v"}}
    with anyio.fail_after(DEADLINE):
        first = await put(FastCheckpointSaver(store), "t", values=values,
                          versions=dict.fromkeys(values, "1"))
        headers = MemoryStore.headers

        async def edited_meanwhile(self: MemoryStore, *args: Any, **kwargs: Any) -> Any:
            nested["found"].append("late")  # a node of the next step, in place
            return await headers(self, *args, **kwargs)

        monkeypatch.setattr(MemoryStore, "headers", edited_meanwhile)
        second = await put(FastCheckpointSaver(store), "t", parent=first, values=values,
                           versions={"docs": "2", "context": "1"}, new_versions={"docs": "2"})
        found = await FastCheckpointSaver(store).aget_tuple(config("t", second))
    assert found is not None
    assert found.checkpoint["channel_values"]["docs"] == {"found": ["a", "b"]}


@pytest.mark.anyio
async def test_a_save_that_must_send_every_value_sends_them_as_they_were_when_it_began(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A save forked from a pruned parent sends the values it did not change as well (which
    of them the parent held as logs is unknown): those too are as they were when the save
    began, not as a node left them during the save's reads."""
    store = MemoryStore()
    nested: dict[str, Any] = {"found": ["a", "b"]}
    pruning = FastCheckpointSaver(store, keep_latest=2)
    with anyio.fail_after(DEADLINE):
        first = await put(pruning, "t", values={"docs": nested, "x": 1},
                          versions={"docs": "1", "x": "1"})
        second = await put(pruning, "t", parent=first, values={"docs": {"found": []}, "x": 2},
                           versions={"docs": "2", "x": "2"})
        await put(pruning, "t", parent=second, values={"docs": {"found": []}, "x": 3},
                  versions={"docs": "2", "x": "3"}, new_versions={"x": "3"})
        get_items = MemoryStore.get_items

        async def edited_meanwhile(self: MemoryStore, *args: Any, **kwargs: Any) -> Any:
            nested["found"].append("late")  # a node of the next step, in place
            return await get_items(self, *args, **kwargs)

        monkeypatch.setattr(MemoryStore, "get_items", edited_meanwhile)
        forked = await put(FastCheckpointSaver(store), "t", parent=first,
                           values={"docs": nested, "x": 10}, versions={"docs": "1", "x": "4"},
                           new_versions={"x": "4"})
        monkeypatch.undo()
        found = await FastCheckpointSaver(store).aget_tuple(config("t", forked))
    assert found is not None
    assert found.checkpoint["channel_values"] == {"docs": {"found": ["a", "b"]}, "x": 10}


def test_models_memo_cannot_judge_are_serialized_whole() -> None:
    class Flagged(BaseModel):
        text: str
        debug: str = Field(default="", exclude_if=lambda value: not DEBUG)

    class Skipped(BaseModel):
        text: str = "x"

        def __init__(self) -> None:  # pydantic's __init__ never runs
            object.__setattr__(self, "__dict__", {"text": "x"})

    class Meta(type(BaseModel)):  # type: ignore[misc]
        def __eq__(cls, other: object) -> bool:
            return cls is other

        __hash__ = None  # type: ignore[assignment]

    class Unhashable(BaseModel, metaclass=Meta):
        text: str

    class Picky(BaseModel):
        text: str

        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            if not kwargs:
                raise TypeError("Picky needs its fields")
            return super().__new__(cls)

    memo = ListMemo()
    picky = [Picky(text="a"), Picky(text="b")]
    assert _serialized(memo, picky) == SERDE.dumps_typed(picky)  # serialized whole
    assert fingerprint(Flagged(text="x")) is None
    assert fingerprint(Skipped()) is None
    assert fingerprint(Unhashable(text="x")) is None
    memo = ListMemo()
    for entries in ([Flagged(text="x", debug="d")], [AIMessage(content="a", id="a"), Skipped()],
                    [Unhashable(text="x")]):
        assert memo.dumps(SERDE, "run", "other", entries, SERDE.dumps_typed) in (
            None, SERDE.dumps_typed(entries))


DEBUG = False


def test_a_model_whose_schema_holds_a_cycle_is_judged_in_bounded_time() -> None:
    loop: list[Any] = []
    loop.append(loop)

    class Cached(BaseModel):
        text: str
        cache: Any = Field(default=loop, exclude=True)

    result: list[Any] = []
    judge = threading.Thread(target=lambda: result.append(fingerprint(Cached(text="x"))),
                             daemon=True)
    judge.start()
    judge.join(30)
    assert result == [None]  # judged; its default is not exact data: no fingerprint


def test_other_serializers_and_values_are_not_memoized() -> None:
    memo = ListMemo()

    class Other(JsonPlusSerializer):
        pass

    value = [AIMessage(content="x", id="a")]
    assert memo.dumps(Other(), "run", "messages", value, SERDE.dumps_typed) is None
    for other in ((1, 2), [], {"a": 1}, "text", [{"a": 1}], ["text", value[0]]):
        assert memo.dumps(SERDE, "run", "messages", other, SERDE.dumps_typed) is None


def _entry(kind: int, seed: int) -> Any:
    if kind == 0:
        return AIMessage(content=f"answer {seed}", id=f"a{seed}",
                         response_metadata={"tokens": seed, "score": seed / 7})
    if kind == 1:
        return HumanMessage(content=[{"type": "text", "text": f"q{seed}"}], id=f"h{seed}")
    if kind == 2:
        return {"step": seed, "items": [seed, str(seed)], "ok": seed % 2 == 0}
    if kind == 3:
        return Computed(text=f"c{seed}")
    if kind == 4:
        return Nesting(inner=Plain(text=f"n{seed}"))
    if kind == 5:
        return dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=seed)
    return f"text {seed}"


def _mutate(value: list[Any], op: int, at: int, seed: int) -> list[Any]:
    if op == 0:  # LangGraph's way: a new list with one more entry
        return [*value, _entry(seed % 7, seed)]
    if not value:
        return value
    target = value[at % len(value)]
    if op == 1:
        if isinstance(target, AIMessage):
            target.content = f"edited {seed}"
        elif isinstance(target, HumanMessage) and isinstance(target.content, list):
            target.content.append({"type": "text", "text": "more"})
        elif isinstance(target, dict):
            target["step"] = float(target["step"])
        elif isinstance(target, Nesting):
            target.inner.text = f"deep edit {seed}"
        return value
    if op == 2:  # an equal copy in its place
        return [*value[: at % len(value)], copy.deepcopy(target), *value[at % len(value) + 1:]]
    if op == 3:  # truncated
        return value[: at % len(value)]
    if op == 4:  # inserted at the front
        return [_entry(seed % 7, seed), *value]
    if op == 5 and isinstance(target, AIMessage):
        target.response_metadata["tokens"] = True if seed % 2 else target.response_metadata.get(
            "tokens", 0)
    return value


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 50), st.integers(0, 10_000)),
                max_size=40))
def test_memo_equals_the_serde_on_the_whole_list(ops: list[tuple[int, int, int]]) -> None:
    memo = ListMemo()
    value: list[Any] = []
    for op, at, seed in ops:
        value = _mutate(value, op, at, seed)
        if value:
            assert _serialized(memo, value) == SERDE.dumps_typed(value)


class Chat(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]
    turns: int


def _graph(saver: Any) -> Any:
    """Each turn edits the first answer in place (an anti-pattern LangGraph tolerates: the
    edit is saved with the next version of the list) and adds a new one."""

    def talk(state: Chat) -> dict[str, Any]:
        turn = state.get("turns", 0)
        answers = [m for m in state["messages"] if isinstance(m, AIMessage)]
        if answers:
            answers[0].content = f"first answer, seen at turn {turn}"
        return {"messages": [AIMessage(content=f"answer {turn}", id=f"a{turn}")],
                "turns": turn + 1}

    def more(state: Chat) -> str:
        return "talk" if state.get("turns", 0) < 40 else END

    graph = StateGraph(Chat)
    graph.add_node("talk", talk)
    graph.add_edge(START, "talk")
    graph.add_conditional_edges("talk", more, ["talk", END])
    return graph.compile(checkpointer=saver)


@pytest.mark.anyio
async def test_a_graph_editing_messages_in_place_saves_what_langgraph_saves() -> None:
    ours, theirs = FastCheckpointSaver(MemoryStore()), InMemorySaver()
    with anyio.fail_after(DEADLINE):
        for saver in (ours, theirs):
            await _graph(saver).ainvoke({"messages": [HumanMessage(content="go", id="q")]},
                                        config("t"))
        mine = [(found.metadata.get("step"), found.checkpoint["channel_values"])
                async for found in ours.alist(config("t"))]
        reference = [(found.metadata.get("step"), found.checkpoint["channel_values"])
                     async for found in theirs.alist(config("t"))]
    assert len(mine) == 42
    assert mine == reference


@pytest.mark.anyio
async def test_a_graph_serializes_each_message_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cost: after the input's save, each save serializes the one message its step added
    (and the step's write carries it once more), not the whole list."""
    sizes: list[int] = []
    dumps = JsonPlusSerializer.dumps_typed

    def counted(self: JsonPlusSerializer, value: Any) -> tuple[str, bytes]:
        if isinstance(value, list) and value and isinstance(value[0], (AIMessage, HumanMessage)):
            sizes.append(len(value))
        return dumps(self, value)

    monkeypatch.setattr(JsonPlusSerializer, "dumps_typed", counted)

    def talk(state: Chat) -> dict[str, Any]:
        turn = state.get("turns", 0)
        return {"messages": [AIMessage(content=f"answer {turn}", id=f"a{turn}")],
                "turns": turn + 1}

    graph = StateGraph(Chat)
    graph.add_node("talk", talk)
    graph.add_edge(START, "talk")
    graph.add_conditional_edges("talk", lambda state: "talk" if state["turns"] < 40 else END,
                                ["talk", END])
    saver = FastCheckpointSaver(MemoryStore())
    with anyio.fail_after(DEADLINE):
        final = await graph.compile(checkpointer=saver).ainvoke(
            {"messages": [HumanMessage(content="go", id="q")]}, config("t"))
        latest = await saver.aget_tuple(config("t"))
    assert len(final["messages"]) == 41
    assert set(sizes) == {1}  # 40 saves of a growing list, 40 writes, the input
    assert len(sizes) >= 81
    assert latest is not None
    assert latest.checkpoint["channel_values"]["messages"] == final["messages"]
