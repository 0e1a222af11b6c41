"""What a LangGraph saver adds to a step of G1.

``python -m benchmarks.saver_cost``:

G1's graph (``benchmarks/graph.py``: one message of ``graph_message_bytes`` characters per
step, a 4 KB ``context`` set once, ``durability="sync"``) runs ``--threads`` threads of
``--steps`` steps in one process on each of three savers in turn, for ``--rounds`` rounds:

* **null**: an ``InMemorySaver`` whose ``aput`` returns the config it would return, and
  whose ``aput_writes`` and ``aget_tuple`` do nothing: LangGraph's own cost of a step, with
  the saver calls LangGraph makes but nothing saved;
* **InMemorySaver**: LangGraph's;
* **ours**: ``FastCheckpointSaver`` on the memory store.

It prints the median µs per step of each (whole ``ainvoke`` calls over their steps) and what
each saver adds to the null one's: the part of a step a saver's speed can change. Times,
measured in one process, alternating: compare the ratios of one run, not runs on different
machines or loads.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import anyio

from benchmarks.content import make_content
from benchmarks.graph import _build_graph, _config, _inputs
from benchmarks.settings import Sizes

SAVERS = ("null", "InMemorySaver", "ours")


def _null_saver() -> Any:
    from langgraph.checkpoint.memory import InMemorySaver

    class NullSaver(InMemorySaver):
        """Keeps nothing and serializes nothing."""

        async def aput(self, config: Any, checkpoint: Any, metadata: Any,
                       new_versions: Any) -> Any:
            configurable = config["configurable"]
            return {"configurable": {
                "thread_id": configurable["thread_id"],
                "checkpoint_ns": configurable.get("checkpoint_ns", ""),
                "checkpoint_id": checkpoint["id"]}}

        async def aput_writes(self, config: Any, writes: Any, task_id: str,
                              task_path: str = "") -> None:
            return None

        async def aget_tuple(self, config: Any) -> None:
            return None

    return NullSaver()


def _makers() -> dict[str, Callable[[], Any]]:
    from langgraph.checkpoint.memory import InMemorySaver

    from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
    from fastcheckpoint.stores.memory import MemoryStore

    return {"null": _null_saver, "InMemorySaver": InMemorySaver,
            "ours": lambda: FastCheckpointSaver(MemoryStore())}


async def _per_step(make: Callable[[], Any], sizes: Sizes, threads: int) -> float:
    """µs per step of ``threads`` fresh threads on a fresh saver (after one warm-up thread)."""
    graph = _build_graph(sizes, []).compile(checkpointer=make())
    inputs = _inputs(make_content(sizes.graph_context_bytes, 0, seed=3))
    await graph.ainvoke(inputs, _config(f"warm-{uuid.uuid4().hex}", sizes), durability="sync")
    start = time.perf_counter()
    for _ in range(threads):
        await graph.ainvoke(inputs, _config(uuid.uuid4().hex, sizes), durability="sync")
    return (time.perf_counter() - start) / (threads * sizes.graph_steps) * 1e6


async def run(steps: int, threads: int, rounds: int) -> dict[str, float]:
    """Median µs per step of each saver over ``rounds`` rounds, the savers alternating."""
    sizes = Sizes(graph_steps=steps)
    makers = _makers()
    times: dict[str, list[float]] = {name: [] for name in SAVERS}
    for _ in range(rounds):
        for name in SAVERS:
            times[name].append(await _per_step(makers[name], sizes, threads))
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.saver_cost",
        description="What a LangGraph saver adds to a step of G1 (µs per step, medians).")
    parser.add_argument("--steps", type=int, default=50, help="steps per thread (G1: 50)")
    parser.add_argument("--threads", type=int, default=20, help="threads per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, savers alternating")
    args = parser.parse_args(argv)
    for name, value in (("--steps", args.steps), ("--threads", args.threads),
                        ("--rounds", args.rounds)):
        if value < 1:
            parser.error(f"{name} must be at least 1")
    found = anyio.run(run, args.steps, args.threads, args.rounds)
    base = found["null"]
    print(f"G1, {args.steps} steps, {args.threads} threads x {args.rounds} rounds "
          "(median µs per step)")
    print("| saver | µs per step | added to a step | ratio to InMemorySaver |")
    print("| --- | ---: | ---: | ---: |")
    for name in SAVERS:
        ratio = found["InMemorySaver"] / found[name]
        print(f"| {name} | {found[name]:,.0f} | {found[name] - base:+,.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
