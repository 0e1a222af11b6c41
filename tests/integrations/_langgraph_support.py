"""Helpers of the LangGraph saver tests: a store that counts its calls, checkpoints as
LangGraph's conformance suite builds them, and a step-loop graph."""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, TypedDict

from langgraph.checkpoint.base import Checkpoint, CheckpointMetadata
from langgraph.checkpoint.conformance.test_utils import (
    generate_checkpoint,
    generate_config,
    generate_metadata,
)
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import interrupt

from fastcheckpoint.integrations.langgraph import FastCheckpointSaver

METHODS = (
    "append", "get", "latest", "headers", "delete", "delete_run", "get_run", "update_run",
    "list_runs", "count_runs", "put_items", "get_items", "scan_items", "delete_items",
    "purge_expired", "aclose", "runs_with_label", "append_with_items", "read_with_items",
    "put_owned_items",
)


class CountingStore:
    """Forwards every store call to ``inner``; counts them by method and keeps the last
    arguments of each."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()
        self.last: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    @property
    def nested_items(self) -> bool:
        """The inner store's capability flag (a flag, not a call: not counted)."""
        return getattr(self.inner, "nested_items", False) is True

    def take(self) -> dict[str, int]:
        """The calls counted since the last ``take`` (``aclose`` not counted)."""
        counted = {name: count for name, count in self.calls.items() if name != "aclose"}
        self.calls.clear()
        return counted


def _forwarding(name: str) -> Callable[..., Coroutine[Any, Any, Any]]:
    async def forward(self: CountingStore, *args: Any, **kwargs: Any) -> Any:
        self.calls[name] += 1
        self.last[name] = (args, kwargs)
        return await getattr(self.inner, name)(*args, **kwargs)

    forward.__name__ = name
    return forward


for _name in METHODS:
    setattr(CountingStore, _name, _forwarding(_name))


def config(thread_id: str, checkpoint_id: str | None = None, ns: str = "") -> Any:
    return generate_config(thread_id, checkpoint_ns=ns, checkpoint_id=checkpoint_id)


def checkpoint(values: dict[str, Any] | None = None,
               versions: dict[str, Any] | None = None) -> Checkpoint:
    made: Checkpoint = generate_checkpoint(channel_values=values or {},
                                           channel_versions=versions or {})
    return made


def metadata(step: int = 0, **extra: Any) -> CheckpointMetadata:
    made: CheckpointMetadata = generate_metadata(step=step, **extra)
    return made


async def put(
    saver: FastCheckpointSaver,
    thread_id: str,
    *,
    parent: str | None = None,
    ns: str = "",
    values: dict[str, Any] | None = None,
    versions: dict[str, Any] | None = None,
    new_versions: dict[str, Any] | None = None,
    step: int = 0,
    **extra: Any,
) -> str:
    """Save a checkpoint (the first of its thread unless ``parent``); its LangGraph id."""
    made = checkpoint(values, versions)
    changed = dict(versions or {}) if new_versions is None else new_versions
    saved = await saver.aput(config(thread_id, parent, ns), made, metadata(step, **extra),
                             changed)
    checkpoint_id: str = saved["configurable"]["checkpoint_id"]
    return checkpoint_id


class Steps(TypedDict):
    done: Annotated[list[int], operator.add]


def step_loop(
    saver: FastCheckpointSaver, steps: int, on_step: Callable[[int], None] | None = None
) -> CompiledStateGraph[Any, Any, Any, Any]:
    """A graph that runs ``step`` ``steps`` times, each adding its number to ``done``."""

    def step(state: Steps) -> dict[str, Any]:
        number = len(state["done"])
        if on_step is not None:
            on_step(number)
        return {"done": [number]}

    def more(state: Steps) -> str:
        return "step" if len(state["done"]) < steps else END

    graph = StateGraph(Steps)
    graph.add_node("step", step)
    graph.add_edge(START, "step")
    graph.add_conditional_edges("step", more, ["step", END])
    return graph.compile(checkpointer=saver)


def asking(saver: FastCheckpointSaver) -> CompiledStateGraph[Any, Any, Any, Any]:
    """A graph that works a step, then asks (``interrupt``) and records the answer."""

    def work(state: Steps) -> dict[str, Any]:
        return {"done": [len(state["done"])]}

    def ask(state: Steps) -> dict[str, Any]:
        return {"done": [interrupt({"step": len(state["done"])})]}

    graph = StateGraph(Steps)
    graph.add_node("work", work)
    graph.add_node("ask", ask)
    graph.add_edge(START, "work")
    graph.add_edge("work", "ask")
    graph.add_edge("ask", END)
    return graph.compile(checkpointer=saver)
