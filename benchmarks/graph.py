"""G1: a LangGraph graph on each checkpoint saver (``--workload G1``, asyncio only).

The graph is a ``StateGraph`` with ``messages`` (``add_messages``), ``step`` and ``context``:
one async node appends a deterministic message of ``graph_message_bytes`` characters and
bumps ``step``, and a conditional edge loops back to it until ``graph_steps`` steps are done.
No LLM, no tool call: only the framework and the saver are timed. ``context`` (a nested
document of ``graph_context_bytes``) is set by the input and never changes, as an agent's
instructions and retrieved documents often do; ``messages`` grows by one each step.

Each repetition runs ``graph_threads`` fresh threads one after another with
``durability="sync"`` (each step's checkpoint is saved before the next step starts, so the
saver's cost is in the step time instead of overlapping the next node):

* **step**: per step, from the node's start to the next node's start (the last one: to the
  end of ``ainvoke``); ops/s is steps per second of whole ``ainvoke`` calls (the first
  ``aget_tuple`` and the input checkpoint included).
* **aput**, **aput_writes**, **aget_tuple**: each saver call as LangGraph makes it.

Separately, untimed, on a fresh saver: a warm-up thread (connections opened, statements
prepared), then one more thread with counters on: saver calls, store calls (ours),
worker-thread hops (anyio's and aiosqlite's), backend requests (Redis and PostgreSQL round
trips, AWS HTTP requests of aiobotocore and of boto3) per step, and the bytes a thread
leaves stored (see :class:`_Probe`). Threads are deleted after each repetition.

Subjects: :class:`~benchmarks.subjects.StoreTarget` runs ``FastCheckpointSaver`` on that
store; :class:`~benchmarks.compare.LangGraphSubject` runs LangGraph's (or AWS's) saver.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, TypedDict

import msgspec

from benchmarks.content import Content, _text, make_content
from benchmarks.footprint import CountingStore, counting_syscalls
from benchmarks.measure import Sample
from benchmarks.settings import Sizes
from benchmarks.subjects import StoreTarget, Subject, unique_run_id
from benchmarks.workloads import Outcome, Workload

__all__ = ["GRAPH_WORKLOADS", "GraphLoop"]

_PYTHON_FSYNCS = ("memory", "file", "file-nofsync")
SAVER_CALLS = ("aput", "aput_writes", "aget_tuple")
"""The saver methods a graph run calls (``alist`` only in the checks)."""


@dataclass
class _Recorder:
    """Latency of every instrumented saver call, by method."""

    latencies: dict[str, list[int]] = field(
        default_factory=lambda: {name: [] for name in SAVER_CALLS})
    enabled: bool = True

    def record(self, name: str, elapsed_ns: int) -> None:
        if self.enabled:
            self.latencies[name].append(elapsed_ns)

    def calls(self) -> int:
        return sum(len(values) for values in self.latencies.values())


def _instrument(saver: Any, recorder: _Recorder) -> None:
    """Time ``saver``'s calls through a subclass, so that copies LangGraph makes of it
    (``with_allowlist``) are timed too."""
    base = type(saver)

    def timed(name: str) -> Callable[..., Any]:
        original = getattr(base, name)

        async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter_ns()
            try:
                return await original(self, *args, **kwargs)
            finally:
                recorder.record(name, time.perf_counter_ns() - start)

        return method

    saver.__class__ = type(f"Timed{base.__name__}", (base,),
                           {name: timed(name) for name in SAVER_CALLS})


def _build_graph(sizes: Sizes, marks: list[int]) -> Any:
    from langchain_core.messages import AIMessage
    from langgraph.graph import END, START, StateGraph
    from langgraph.graph.message import add_messages

    # The functional form: class-body annotations would be strings here (postponed
    # evaluation), which LangGraph resolves in this module's globals, without add_messages.
    LoopState = TypedDict("LoopState", {  # noqa: UP013
        "messages": Annotated[list[Any], add_messages], "step": int, "context": dict[str, Any],
    })

    rng = random.Random(7)
    words = max(1, sizes.graph_message_bytes // 7)
    texts = [_text(rng, words)[: sizes.graph_message_bytes] for _ in range(sizes.graph_steps)]

    async def agent(state: Any) -> dict[str, Any]:
        marks.append(time.perf_counter_ns())
        step = state["step"]
        message = AIMessage(content=texts[step % len(texts)], id=f"ai-{step:04d}")
        return {"messages": [message], "step": step + 1}

    def route(state: Any) -> str:
        return "agent" if state["step"] < sizes.graph_steps else END

    builder = StateGraph(LoopState)
    builder.add_node("agent", agent)
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", route, ["agent", END])
    return builder


def _inputs(content: Content) -> dict[str, Any]:
    from langchain_core.messages import HumanMessage

    return {"messages": [HumanMessage(content="start the loop", id="human-0000")], "step": 0,
            "context": content.state}


def _config(thread_id: str, sizes: Sizes) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread_id},
            "recursion_limit": sizes.graph_steps + 10}


# -- sessions: one saver on a fresh backend ----------------------------------------------------


class _Probe:
    """What a thread leaves stored, in bytes handed to the backend as values.

    Ours: checkpoint records (payload + header) plus item keys and values, counted as the
    saver hands them to the store (:class:`~benchmarks.footprint.CountingStore`). LangGraph's
    savers: the serialized bytes they keep (InMemorySaver's dictionaries; the BLOB and JSONB
    columns of the thread's rows in SQLite and PostgreSQL; the attribute values of the items
    in the AWS saver's own table). Neither counts key columns, indexes or page overhead.
    """

    measure = "bytes handed to the backend as values"

    def __init__(self, saver: Any, store: CountingStore | None = None) -> None:
        self.saver = saver
        self.store = store

    def store_calls(self) -> int | None:
        return None if self.store is None else sum(self.store.calls.values())

    async def stored(self, thread_id: str) -> tuple[int | None, int | None]:
        """``(bytes, records)``: records are checkpoints plus items for ours, rows (SQL),
        items (DynamoDB) or dictionary entries (InMemorySaver) for LangGraph's savers."""
        if self.store is not None:
            return (sum(self.store.appended) + self.store.item_bytes,
                    len(self.store.appended) + self.store.item_count)
        return await _their_bytes(self.saver, thread_id)


def _bytes_in(value: Any) -> int:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    if isinstance(value, dict):
        return sum(_bytes_in(item) for item in value.values())
    if isinstance(value, (tuple, list)):
        return sum(_bytes_in(item) for item in value)
    return 0


async def _their_bytes(saver: Any, thread_id: str) -> tuple[int | None, int | None]:
    names = {cls.__name__ for cls in type(saver).__mro__}
    if "InMemorySaver" in names:
        checkpoints = saver.storage.get(thread_id, {})
        blobs = [v for k, v in saver.blobs.items() if k[0] == thread_id]
        writes = [v for k, v in saver.writes.items() if k[0] == thread_id]
        return (_bytes_in(checkpoints) + _bytes_in(blobs) + _bytes_in(writes),
                sum(len(c) for c in checkpoints.values()) + len(blobs)
                + sum(len(w) for w in writes))
    if "AsyncSqliteSaver" in names:
        total = rows = 0
        for sql in ("SELECT sum(length(checkpoint) + length(metadata)), count(*) "
                    "FROM checkpoints WHERE thread_id = ?",
                    "SELECT sum(length(value)), count(*) FROM writes WHERE thread_id = ?"):
            row = await (await saver.conn.execute(sql, (thread_id,))).fetchone()
            total += int(row[0] or 0)
            rows += int(row[1])
        return total, rows
    if "AsyncPostgresSaver" in names:
        total = rows = 0
        async with saver._cursor() as cursor:
            for sql in ("SELECT sum(pg_column_size(checkpoint) + pg_column_size(metadata)) AS b,"
                        " count(*) AS n FROM checkpoints WHERE thread_id = %s",
                        "SELECT sum(octet_length(blob)) AS b, count(*) AS n "
                        "FROM checkpoint_blobs WHERE thread_id = %s",
                        "SELECT sum(octet_length(blob)) AS b, count(*) AS n "
                        "FROM checkpoint_writes WHERE thread_id = %s"):
                await cursor.execute(sql, (thread_id,))
                row = await cursor.fetchone()
                values = (row["b"], row["n"]) if isinstance(row, dict) else (row[0], row[1])
                total += int(values[0] or 0)
                rows += int(values[1])
        return total, rows
    if "DynamoDBSaver" in names:
        return await _dynamodb_value_bytes(saver, thread_id)
    return None, None


async def _dynamodb_value_bytes(saver: Any, thread_id: str) -> tuple[int, int]:
    """Attribute values of the thread's items in the AWS saver's own table (their partition
    keys all carry the thread id: ``CHECKPOINT_``, ``WRITES_`` and ``CHUNK_`` items)."""
    import anyio.to_thread

    def scan() -> tuple[int, int]:
        total = items = 0
        paginator = saver.client.get_paginator("scan")
        for page in paginator.paginate(TableName=saver.fcbench_table):
            for item in page["Items"]:
                if thread_id not in item["PK"]["S"]:
                    continue
                items += 1
                for name, value in item.items():
                    if name in ("PK", "SK"):
                        continue
                    total += _attribute_bytes(value)
        return total, items

    return await anyio.to_thread.run_sync(scan)


def _attribute_bytes(value: dict[str, Any]) -> int:
    (kind, inner), = value.items()
    if kind == "B":
        return len(inner)
    if kind in ("S", "N"):
        return len(str(inner).encode())
    if kind == "M":
        return sum(_attribute_bytes(v) for v in inner.values())
    if kind == "L":
        return sum(_attribute_bytes(v) for v in inner)
    return len(msgspec.json.encode(inner))


@contextlib.asynccontextmanager
async def _session(subject: Subject, counting: bool) -> AsyncIterator[tuple[Any, _Probe]]:
    """A saver for ``subject`` and the probe of what it stores."""
    if isinstance(subject, StoreTarget):
        from fastcheckpoint.integrations.langgraph import FastCheckpointSaver

        store: Any = subject.open()
        counted = CountingStore.wrap(store) if counting else None
        saver = FastCheckpointSaver(counted if counted is not None else store)
        try:
            yield saver, _Probe(saver, counted)
        finally:
            await saver.aclose()
        return
    async with subject.saver() as saver:  # type: ignore[attr-defined]
        yield saver, _Probe(saver)


# -- the workload ----------------------------------------------------------------------------


class GraphLoop(Workload):
    name = "G1"
    title = "LangGraph: a StateGraph loop (one message per step), on each saver"
    comparable = True
    compared_systems: ClassVar[tuple[str, ...]] = ("langgraph",)

    def keep(self, sizes: Sizes) -> int | None:
        return None

    def content(self, sizes: Sizes) -> Content:
        return make_content(sizes.graph_context_bytes, 0, seed=3)

    def skip_reason(self, subject: Subject) -> str | None:
        try:
            import langgraph.graph  # noqa: F401
        except ImportError:
            return "LangGraph is not installed (pip install -e '.[dev]')"
        if isinstance(subject, StoreTarget):
            try:
                import fastcheckpoint.integrations.langgraph  # noqa: F401
            except ImportError as exc:
                return f"the LangGraph saver does not import: {exc}"
        return None

    async def run_once(self, subject: Subject, sizes: Sizes, content: Content) -> Outcome:
        marks: list[int] = []
        builder = _build_graph(sizes, marks)
        recorder = _Recorder()
        steps: list[int] = []
        elapsed = 0
        checks: dict[str, Any] = {}
        async with _session(subject, counting=False) as (saver, _):
            _instrument(saver, recorder)
            app = builder.compile(checkpointer=saver)
            threads = [unique_run_id(self.name) for _ in range(sizes.graph_threads)]
            for thread in threads:
                marks.clear()
                start = time.perf_counter_ns()
                final = await app.ainvoke(_inputs(content), _config(thread, sizes),
                                          durability="sync")
                end = time.perf_counter_ns()
                elapsed += end - start
                points = [*marks, end]
                steps += [after - before for before, after in itertools.pairwise(points)]
                checks["messages"] = len(final["messages"])
            recorder.enabled = False  # the checks' own calls are not the graph's
            held = [item async for item in saver.alist(_config(threads[-1], sizes))]
            latest = await saver.aget_tuple(_config(threads[-1], sizes))
            checks.update({
                "all_messages": checks["messages"] == sizes.graph_steps + 1,
                "checkpoints": len(held),
                "all_checkpoints": len(held) == sizes.graph_steps + 2,
                "latest_step": None if latest is None
                else latest.checkpoint["channel_values"].get("step"),
            })
            checks["latest_is_last"] = checks["latest_step"] == sizes.graph_steps
            for thread in threads:
                await saver.adelete_thread(thread)
        samples = {"step": Sample(steps, elapsed)}
        for name, latencies in recorder.latencies.items():
            if latencies:
                samples[name] = Sample(latencies, sum(latencies))
        return Outcome(samples, checks)

    async def footprint(self, subject: Subject, sizes: Sizes, content: Content) -> dict[str, Any]:
        """Per step: saver calls, store calls, thread hops, requests; bytes per thread.

        Steady state: one thread runs uncounted first (pool connections opened, statements
        prepared), then a second one is counted."""
        marks: list[int] = []
        builder = _build_graph(sizes, marks)
        recorder = _Recorder()
        warm, thread = unique_run_id("g1-warm-up"), unique_run_id("g1-footprint")
        async with _session(subject, counting=True) as (saver, probe):
            _instrument(saver, recorder)
            app = builder.compile(checkpointer=saver)
            await app.ainvoke(_inputs(content), _config(warm, sizes), durability="sync")
            recorder.latencies = {name: [] for name in SAVER_CALLS}
            store_before = probe.store_calls()
            before = await probe.stored(warm) if probe.store is not None else (0, 0)
            counts: Counter[str]
            with counting_syscalls() as counts:
                await app.ainvoke(_inputs(content), _config(thread, sizes), durability="sync")
            calls_made = recorder.calls()
            store_after = probe.store_calls()
            store_calls = (None if store_after is None or store_before is None
                           else store_after - store_before)
            stored, records = await probe.stored(thread)
            if stored is not None and before[0] is not None:
                stored -= before[0]  # ours counts the session's writes: take the warm-up's off
            if records is not None and before[1] is not None:
                records -= before[1]
            for done in (warm, thread):
                await saver.adelete_thread(done)
        per = float(sizes.graph_steps)
        kind = subject.kind
        per_step: dict[str, float | None] = {
            "saver_calls": calls_made / per,
            "store_calls": None if store_calls is None else store_calls / per,
            "thread_hops": counts["thread_hops"] / per,
            # Only fsyncs made from Python are seen: not SQLite's (in C) nor a server's.
            "fsyncs": counts["fsyncs"] / per if kind in _PYTHON_FSYNCS else None,
            # psycopg (AsyncPostgresSaver) talks to the server through libpq, not counted.
            "requests": None if (subject.system, kind) == ("langgraph", "postgres")
            else counts["requests"] / per,
        }
        return {"per_step": per_step, "bytes_per_thread": stored, "records_per_thread": records,
                "bytes_measure": probe.measure,
                "calls": {name: len(values) for name, values in recorder.latencies.items()},
                "settings": getattr(subject, "settings", "")}


GRAPH_WORKLOADS: dict[str, Workload] = {"G1": GraphLoop()}
