"""Values the frameworks' own storages take are taken by the adapters too, and come back as
they went in (the counterpart of the adapters' surface fuzz, which checks refusals): each
test runs the framework's reference storage beside ours."""

from __future__ import annotations

import collections
import enum
from pathlib import Path
from typing import Any, TypedDict

import anyio
import numpy as np
import pytest
from agent_framework import InMemoryCheckpointStorage, WorkflowCheckpoint
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from pydantic_ai.conversation import Conversation
from pydantic_ai.conversation_store import InMemoryConversationStore
from pydantic_ai.messages import ModelRequest, ModelResponse, TextPart, UserPromptPart

from fastcheckpoint.errors import CorruptCheckpointError
from fastcheckpoint.integrations._agent_framework_codec import CheckpointCodec
from fastcheckpoint.integrations.agent_framework import FastCheckpointStorage
from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
from fastcheckpoint.integrations.pydantic_ai import FastConversationStore
from fastcheckpoint.stores.file import FileStore
from fastcheckpoint.stores.memory import MemoryStore


def _state() -> dict[str, Any]:
    return {
        "ordered": collections.OrderedDict([("z", 1), ("a", collections.Counter("abca"))]),
        "window": collections.deque([1, ("two", 2)], maxlen=3),
        "open": collections.deque(["x"]),
        "counts": collections.Counter({"🎉": 2}),
    }


def _shape(value: Any) -> Any:
    """Types and order all the way down: an ``OrderedDict`` equal to a ``dict`` is not it."""
    if isinstance(value, dict):
        return type(value), [(key, _shape(item)) for key, item in value.items()]
    if isinstance(value, (list, tuple, collections.deque)):
        return type(value), getattr(value, "maxlen", None), [_shape(item) for item in value]
    return type(value), value


@pytest.mark.parametrize("kind", ["memory", "file"])
@pytest.mark.anyio
async def test_agent_framework_standard_containers_round_trip(kind: str, tmp_path: Path) -> None:
    """A workflow's state holding an ``OrderedDict``, a ``Counter`` or a ``deque``: the
    framework's storages keep them; this one refused them with a hint (name the class in
    ``checkpoint_types``) that the constructor then refused too."""
    store = MemoryStore() if kind == "memory" else FileStore(tmp_path)
    ours = FastCheckpointStorage(store)
    theirs = InMemoryCheckpointStorage()
    with anyio.fail_after(10):
        for storage in (theirs, ours):
            checkpoint = WorkflowCheckpoint(workflow_name="流程", graph_signature_hash="h",
                                            state=_state())
            await storage.save(checkpoint)
            loaded = await storage.load(checkpoint.checkpoint_id)
            assert loaded.state == _state()
            assert _shape(loaded.state) == _shape(_state())
        await ours.aclose()


def test_agent_framework_damaged_container_is_corrupt() -> None:
    """A stored deque that does not rebuild one (planted or damaged) is damage, named."""
    codec = CheckpointCodec((), compress_min_bytes=None)
    for stored in ([[1], "not a size"], "abc", [[1], -1]):
        with pytest.raises(CorruptCheckpointError, match="deque"):
            codec._decode_value("collections.deque", stored)


class _Count(TypedDict):
    n: int


def _counting_graph() -> StateGraph[_Count]:
    graph = StateGraph(_Count)
    graph.add_node("step", lambda state: {"n": state["n"] + 1})
    graph.add_edge(START, "step")
    graph.add_edge("step", END)
    return graph


@pytest.mark.parametrize("limit", [np.int64(2), np.uint8(2)], ids=["int64", "uint8"])
@pytest.mark.anyio
async def test_langgraph_list_limit_of_numpy_integers(limit: Any) -> None:
    """``alist(config, limit=...)`` with a numpy integer: LangGraph's own savers take it."""
    config: Any = {"configurable": {"thread_id": "t-🎉"}}
    listed = []
    with anyio.fail_after(10):
        for saver in (InMemorySaver(), FastCheckpointSaver(MemoryStore())):
            app = _counting_graph().compile(checkpointer=saver)
            await app.ainvoke({"n": 0}, config)
            found = [entry async for entry in saver.alist(config, limit=limit)]
            listed.append([entry.metadata.get("step") for entry in found])
    assert listed[0] == listed[1]
    assert len(listed[1]) == 2


@pytest.mark.anyio
async def test_pydantic_ai_limits_of_numpy_integers() -> None:
    """``load(..., limit=...)`` and ``list_conversations(limit=...)`` with a numpy integer:
    Pydantic AI's in-memory store takes it."""
    seen = []
    with anyio.fail_after(10):
        for store in (InMemoryConversationStore(), FastConversationStore(MemoryStore())):
            for cid in ("c1", "c2"):
                await store.save(Conversation(conversation_id=cid, messages=[
                    ModelRequest(parts=[UserPromptPart(content="שלום 🎉")]),
                    ModelResponse(parts=[TextPart(content="hi")])]))
            loaded = await store.load("c1", limit=np.int64(1))
            assert loaded is not None
            listed = await store.list_conversations(limit=np.int64(1))
            seen.append((len(loaded.messages), [record.conversation_id for record in listed]))
    assert seen[0] == seen[1] == (1, ["c2"])


class _Kept(int, enum.Enum):
    TWO = 2


@pytest.mark.parametrize("keep", [np.int64(2), _Kept.TWO], ids=["int64", "int-enum"])
@pytest.mark.anyio
async def test_langgraph_keep_latest_and_ttl_of_other_number_types(keep: Any) -> None:
    """``keep_latest`` and ``ttl_seconds`` as a numpy or enum number: their value, handed to
    the store as a plain number (an int-mixin enum's text, ``'_Kept.TWO'``, is no number to
    the Redis store's scripts)."""
    saver = FastCheckpointSaver(MemoryStore(), keep_latest=keep, ttl_seconds=np.float32(60))
    assert saver.keep_latest == 2
    assert type(saver.keep_latest) is int
    config: Any = {"configurable": {"thread_id": "t"}}
    with anyio.fail_after(10):
        app = _counting_graph().compile(checkpointer=saver)
        for _ in range(2):
            await app.ainvoke({"n": 0}, config)
        assert len([entry async for entry in saver.alist(config)]) == 2
