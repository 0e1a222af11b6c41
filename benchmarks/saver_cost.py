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
each saver adds to the null one's: the part of a step a saver's speed can change.

``--disk DIR`` compares savers that keep a thread on disk instead, each in a directory of its
own under ``DIR`` (which is kept; give one on the disk to measure):

* **null**, as above;
* **disk floor**: ``InMemorySaver`` plus, in each ``aput`` and ``aput_writes``, one append of
  512 bytes to a file and one ``fdatasync`` of it in a worker thread: what any saver that
  makes each call durable with one write, off the event loop, cannot go below;
* **AsyncSqliteSaver**: LangGraph's, on a fresh database file (WAL, ``synchronous=FULL``, as
  its ``setup`` leaves it);
* **ours on file**: ``FastCheckpointSaver`` on the file store (``fsync`` on).

Ratios are to ``AsyncSqliteSaver`` there. Times, measured in one process, alternating:
compare the ratios of one run, not runs on different machines or loads.

``--replay`` times the savers' own calls without the graph: one G1 thread's ``aput`` and
``aput_writes`` calls are captured (copies of what LangGraph passes), then replayed on a
fresh ``InMemorySaver`` and a fresh ``FastCheckpointSaver`` on the memory store, alternating,
``--threads`` threads (the thread id renamed) per saver and round. Each thread's replay is
timed in CPU time of the calling thread (``time.thread_time``: other processes on the same
cores change it less than wall time), its copies made beforehand; it prints the p10 and the
median µs per step (an ``aput`` and an ``aput_writes``) of each.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import secrets
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio

from benchmarks.content import make_content
from benchmarks.graph import _build_graph, _config, _inputs
from benchmarks.settings import Sizes

SAVERS = ("null", "InMemorySaver", "ours")
DISK_SAVERS = ("null", "disk floor", "AsyncSqliteSaver", "ours on file")
_FLOOR_BYTES = 512


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


Maker = Callable[[], contextlib.AbstractAsyncContextManager[Any]]


def _plain(make: Callable[[], Any]) -> Maker:
    @contextlib.asynccontextmanager
    async def saver() -> AsyncIterator[Any]:
        yield make()

    return saver


def _makers() -> dict[str, Maker]:
    from langgraph.checkpoint.memory import InMemorySaver

    from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
    from fastcheckpoint.stores.memory import MemoryStore

    return {"null": _plain(_null_saver), "InMemorySaver": _plain(InMemorySaver),
            "ours": _plain(lambda: FastCheckpointSaver(MemoryStore()))}


def _disk_makers(root: str) -> dict[str, Maker]:
    """The ``--disk`` savers, each in a fresh directory under ``root``."""

    def fresh(name: str) -> str:
        return tempfile.mkdtemp(prefix=f"{name}-{secrets.token_hex(3)}-", dir=root)

    @contextlib.asynccontextmanager
    async def floor() -> AsyncIterator[Any]:
        fd = os.open(os.path.join(fresh("floor"), "log"),
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            yield _floor_saver(fd)
        finally:
            os.close(fd)

    @contextlib.asynccontextmanager
    async def sqlite() -> AsyncIterator[Any]:
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

        async with AsyncSqliteSaver.from_conn_string(
                os.path.join(fresh("sqlite"), "langgraph.sqlite")) as saver:
            await saver.setup()
            yield saver

    @contextlib.asynccontextmanager
    async def ours() -> AsyncIterator[Any]:
        from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
        from fastcheckpoint.stores.file import FileStore

        async with FastCheckpointSaver(FileStore(fresh("file"))) as saver:
            yield saver

    return {"null": _plain(_null_saver), "disk floor": floor, "AsyncSqliteSaver": sqlite,
            "ours on file": ours}


def _floor_saver(fd: int) -> Any:
    from langgraph.checkpoint.memory import InMemorySaver

    record = b"r" * _FLOOR_BYTES

    def durable() -> None:
        os.write(fd, record)
        os.fdatasync(fd)

    class FloorSaver(InMemorySaver):
        """``InMemorySaver`` with one durable append per call, in a worker thread."""

        async def aput(self, config: Any, checkpoint: Any, metadata: Any,
                       new_versions: Any) -> Any:
            saved = await super().aput(config, checkpoint, metadata, new_versions)
            await anyio.to_thread.run_sync(durable)
            return saved

        async def aput_writes(self, config: Any, writes: Any, task_id: str,
                              task_path: str = "") -> None:
            await super().aput_writes(config, writes, task_id, task_path)
            await anyio.to_thread.run_sync(durable)

    return FloorSaver()


async def _captured(sizes: Sizes) -> list[tuple[str, tuple[Any, ...]]]:
    """One G1 thread's ``aput`` and ``aput_writes`` calls, as copies of their arguments."""
    from langgraph.checkpoint.memory import InMemorySaver

    calls: list[tuple[str, tuple[Any, ...]]] = []

    class Recording(InMemorySaver):
        async def aput(self, config: Any, checkpoint: Any, metadata: Any,
                       new_versions: Any) -> Any:
            calls.append(("aput", copy.deepcopy((config, checkpoint, metadata, new_versions))))
            return await super().aput(config, checkpoint, metadata, new_versions)

        async def aput_writes(self, config: Any, writes: Any, task_id: str,
                              task_path: str = "") -> None:
            calls.append(("aput_writes", copy.deepcopy((config, writes, task_id, task_path))))
            await super().aput_writes(config, writes, task_id, task_path)

    graph = _build_graph(sizes, []).compile(checkpointer=Recording())
    inputs = _inputs(make_content(sizes.graph_context_bytes, 0, seed=3))
    await graph.ainvoke(inputs, _config("captured", sizes), durability="sync")
    return calls


async def _replayed(saver: Any, calls: list[tuple[str, tuple[Any, ...]]]) -> float:
    """µs of CPU time per step that ``saver`` takes for one thread's ``calls``, replayed in
    a thread of its own (the copies are made first, untimed)."""
    thread = uuid.uuid4().hex
    replay = []
    for name, captured in calls:
        arguments = copy.deepcopy(captured)
        arguments[0]["configurable"]["thread_id"] = thread
        replay.append((getattr(saver, name), arguments))
    gc.collect()
    start = time.thread_time()
    for method, arguments in replay:
        await method(*arguments)
    steps = sum(1 for name, _ in calls if name == "aput_writes")
    return (time.thread_time() - start) / steps * 1e6


async def replay(steps: int, threads: int, rounds: int) -> dict[str, tuple[float, float]]:
    """p10 and median µs per step of ``InMemorySaver`` and ours replaying one G1 thread's
    calls (:func:`_replayed`), the two alternating."""
    from langgraph.checkpoint.memory import InMemorySaver

    from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
    from fastcheckpoint.stores.memory import MemoryStore

    calls = await _captured(Sizes(graph_steps=steps))
    makers: dict[str, Callable[[], Any]] = {
        "InMemorySaver": InMemorySaver, "ours": lambda: FastCheckpointSaver(MemoryStore())}
    times: dict[str, list[float]] = {name: [] for name in makers}
    for _ in range(rounds):
        for name, make in makers.items():
            saver = make()
            times[name] += [await _replayed(saver, calls) for _ in range(threads)]
    return {name: (sorted(values)[len(values) // 10], statistics.median(values))
            for name, values in times.items()}


async def _per_step(make: Maker, sizes: Sizes, threads: int) -> float:
    """µs per step of ``threads`` fresh threads on a fresh saver (after one warm-up thread)."""
    async with make() as saver:
        return await _timed(saver, sizes, threads)


async def _timed(saver: Any, sizes: Sizes, threads: int) -> float:
    graph = _build_graph(sizes, []).compile(checkpointer=saver)
    inputs = _inputs(make_content(sizes.graph_context_bytes, 0, seed=3))
    await graph.ainvoke(inputs, _config(f"warm-{uuid.uuid4().hex}", sizes), durability="sync")
    start = time.perf_counter()
    for _ in range(threads):
        await graph.ainvoke(inputs, _config(uuid.uuid4().hex, sizes), durability="sync")
    return (time.perf_counter() - start) / (threads * sizes.graph_steps) * 1e6


async def run(steps: int, threads: int, rounds: int, disk: str | None = None,
              ) -> dict[str, float]:
    """Median µs per step of each saver over ``rounds`` rounds, the savers alternating
    (``disk``: the ``--disk`` savers, under that directory)."""
    sizes = Sizes(graph_steps=steps)
    makers = _makers() if disk is None else _disk_makers(disk)
    times: dict[str, list[float]] = {name: [] for name in makers}
    for _ in range(rounds):
        for name, make in makers.items():
            times[name].append(await _per_step(make, sizes, threads))
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.saver_cost",
        description="What a LangGraph saver adds to a step of G1 (µs per step, medians).")
    parser.add_argument("--steps", type=int, default=50, help="steps per thread (G1: 50)")
    parser.add_argument("--threads", type=int, default=20, help="threads per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, savers alternating")
    parser.add_argument("--disk", metavar="DIR",
                        help="compare the savers that keep threads on disk, in DIR (kept)")
    parser.add_argument("--replay", action="store_true",
                        help="time one G1 thread's saver calls replayed without the graph")
    args = parser.parse_args(argv)
    for name, value in (("--steps", args.steps), ("--threads", args.threads),
                        ("--rounds", args.rounds)):
        if value < 1:
            parser.error(f"{name} must be at least 1")
    if args.replay:
        _print_replay(args.steps, args.threads, args.rounds)
        return
    if args.disk is not None:
        os.makedirs(args.disk, exist_ok=True)
    found = anyio.run(run, args.steps, args.threads, args.rounds, args.disk)
    base = found["null"]
    reference = "InMemorySaver" if args.disk is None else "AsyncSqliteSaver"
    print(f"G1, {args.steps} steps, {args.threads} threads x {args.rounds} rounds "
          "(median µs per step)")
    print(f"| saver | µs per step | added to a step | ratio to {reference} |")
    print("| --- | ---: | ---: | ---: |")
    for name, value in found.items():
        ratio = found[reference] / value
        print(f"| {name} | {value:,.0f} | {value - base:+,.0f} | {ratio:.2f}x |")
    if args.disk is not None:
        print(f"2x {reference} is {found[reference] / 2:,.0f} µs per step; the disk floor "
              f"takes {found['disk floor']:,.0f}")



def _print_replay(steps: int, threads: int, rounds: int) -> None:
    found = anyio.run(replay, steps, threads, rounds, backend="asyncio")
    print(f"G1's saver calls replayed, {steps} steps, {threads} threads x {rounds} rounds "
          "(µs of CPU time per step)")
    print("| saver | p10 | median | ratio to InMemorySaver (medians) |")
    print("| --- | ---: | ---: | ---: |")
    for name, (p10, median) in found.items():
        ratio = found["InMemorySaver"][1] / median
        print(f"| {name} | {p10:,.1f} | {median:,.1f} | {ratio:.2f}x |")

if __name__ == "__main__":
    main()
