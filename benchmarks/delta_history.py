"""What rebuilding a LangGraph delta channel costs: ``python -m benchmarks.delta_history``.

A graph whose ``messages`` is a ``DeltaChannel`` (LangGraph's beta; snapshot every
``--snapshot`` updates) runs ``--turns`` turns, each adding one message of ``--message-bytes``
characters, on ``FastCheckpointSaver`` over each ``--store`` URL (default: memory and a file
store in a temporary directory) and on LangGraph's ``InMemorySaver``. Then, on the latest
checkpoint, ``--repetitions`` times each:

* **ours**: ``aget_delta_channel_history`` (headers, the checkpoint holding the snapshot, one
  scan of the writes after it);
* **default walk**: LangGraph's ``BaseCheckpointSaver.aget_delta_channel_history`` on the same
  saver (``aget_tuple`` of every ancestor back to the snapshot);
* **InMemorySaver**: LangGraph's own override on its in-memory saver, for scale.

Prints p50 and mean in microseconds and the store calls of one call (ours and the default
walk). By default the latest checkpoint is as far from its snapshot as the frequency allows (the
longest rebuild). Each turn is an ``ainvoke`` (an input checkpoint and a step checkpoint).
The thread is deleted afterwards.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypedDict

import anyio

from benchmarks.footprint import CountingStore
from benchmarks.subjects import StoreTarget
from fastcheckpoint import open_store

_CHANNELS = ["messages"]


def _append(state: list[str], writes: list[list[str]]) -> list[str]:
    return [*state, *(message for batch in writes for message in batch)]


def _graph(saver: Any, snapshot: int, message_bytes: int) -> Any:
    from langgraph.channels.delta import DeltaChannel
    from langgraph.graph import END, START, StateGraph

    # Functional syntax: the class syntax cannot see ``snapshot`` under future annotations.
    chat = TypedDict("chat", {  # noqa: UP013
        "messages": Annotated[list[str], DeltaChannel(_append, snapshot_frequency=snapshot)],
        "turns": int,
    })

    def talk(state: Any) -> dict[str, Any]:
        turn = state.get("turns", 0)
        return {"messages": [f"{turn:08d}".ljust(message_bytes, "x")], "turns": turn + 1}

    graph = StateGraph(chat)
    graph.add_node("talk", talk)
    graph.add_edge(START, "talk")
    graph.add_edge("talk", END)
    return graph.compile(checkpointer=saver)


async def _fill(saver: Any, thread_id: str, turns: int, snapshot: int,
                message_bytes: int) -> dict[str, Any]:
    """Runs the turns (an invoke each); the latest checkpoint's config."""
    graph = _graph(saver, snapshot, message_bytes)
    config: dict[str, Any] = {"configurable": {"thread_id": thread_id}}
    for turn in range(turns):
        await graph.ainvoke({"turns": turn}, config)
    latest = await saver.aget_tuple(config)
    found: dict[str, Any] = latest.config
    return found


async def _timed(call: Callable[[], Awaitable[Any]], repetitions: int) -> list[float]:
    await call()  # warm
    seconds = []
    for _ in range(repetitions):
        start = time.perf_counter()
        await call()
        seconds.append(time.perf_counter() - start)
    return seconds


def _row(name: str, seconds: list[float], calls: int | None) -> str:
    p50 = statistics.median(seconds) * 1e6
    mean = statistics.fmean(seconds) * 1e6
    return f"| {name} | {p50:,.0f} | {mean:,.0f} | {'' if calls is None else calls} |"


async def run(stores: list[str], turns: int, snapshot: int, message_bytes: int,
              repetitions: int) -> list[str]:
    from langgraph.checkpoint.base import BaseCheckpointSaver
    from langgraph.checkpoint.memory import InMemorySaver

    from fastcheckpoint.integrations.langgraph import FastCheckpointSaver

    rows = ["| saver | p50 µs | mean µs | store calls |", "| --- | ---: | ---: | ---: |"]
    for url in stores:
        await StoreTarget(url).prepare()  # a table or schema the store can create itself
        store: Any = CountingStore.wrap(open_store(url))
        async with FastCheckpointSaver(store) as saver:
            thread_id = f"delta-history-{uuid.uuid4().hex}"
            config = await _fill(saver, thread_id, turns, snapshot, message_bytes)

            async def ours(saver: Any = saver, config: Any = config) -> Any:
                return await saver.aget_delta_channel_history(config=config, channels=_CHANNELS)

            async def default(saver: Any = saver, config: Any = config) -> Any:
                return await BaseCheckpointSaver.aget_delta_channel_history(
                    saver, config=config, channels=_CHANNELS)

            if await ours() != await default():
                raise SystemExit(f"{url}: the histories differ")
            for name, call in ((f"ours, {url}", ours), (f"default walk, {url}", default)):
                store.calls.clear()
                await call()
                calls = sum(store.calls.values())
                rows.append(_row(name, await _timed(call, repetitions), calls))
            await saver.adelete_thread(thread_id)
    memory = InMemorySaver()
    latest: Any = await _fill(memory, "delta-history", turns, snapshot, message_bytes)

    async def theirs() -> Any:
        return await memory.aget_delta_channel_history(config=latest, channels=_CHANNELS)

    rows.append(_row("LangGraph InMemorySaver", await _timed(theirs, repetitions), None))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.delta_history",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--store", action="append", default=None,
                        help="a store URL (repeatable); default memory:// and a file store")
    parser.add_argument("--snapshot", type=int, default=100,
                        help="the channel's snapshot_frequency (LangGraph's default, 100)")
    parser.add_argument("--turns", type=int, default=None,
                        help="turns before the measured checkpoint (default: --snapshot - 1 "
                             "past a snapshot, the longest chain)")
    parser.add_argument("--message-bytes", type=int, default=500)
    parser.add_argument("--repetitions", type=int, default=30)
    options = parser.parse_args()
    turns = options.turns or 2 * options.snapshot - 1
    with tempfile.TemporaryDirectory(prefix="fc-delta-") as directory:
        stores = options.store or ["memory://", f"file://{directory}"]
        rows = anyio.run(run, stores, turns, options.snapshot, options.message_bytes,
                         options.repetitions, backend="asyncio")
    print(f"{turns} turns, snapshot every {options.snapshot}, "
          f"{options.message_bytes}-character messages, {options.repetitions} repetitions")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
