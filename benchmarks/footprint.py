"""Untimed instrumented passes: what an operation costs in calls and bytes, and the floor.

* Store calls, worker-thread hops, fsyncs and backend requests (Redis and PostgreSQL round
  trips, AWS HTTP requests) per create / restore / list, counted on a separate short run
  (counting would slow the timed runs), in steady state: each operation runs once uncounted
  first (asyncpg prepares a statement on its first use on a connection).
* Bytes stored per checkpoint: the payload and header the manager hands the store, and for a
  file store the disk space the run takes divided by the checkpoints it holds.
* The floor: a bare msgspec msgpack encode + decode of the same state and messages, what a
  checkpoint library cannot go below.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import os
import statistics
import time
from asyncio.selector_events import _SelectorSocketTransport
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import anyio.to_thread
import msgspec

from benchmarks.content import Content
from benchmarks.subjects import StoreTarget, disk_usage, unique_run_id
from fastcheckpoint import CheckpointConfig, CheckpointManager

__all__ = ["CountingStore", "counting_syscalls", "floor", "measure_footprint"]


class CountingStore:
    """Forwards every store method, counting calls and the bytes handed to the appends.

    Build it with :meth:`wrap`: the wrapper gets a real method for each public method of the
    store, so ``isinstance`` checks against the store protocol and capability protocols see
    what the store offers (they look at the class, not at ``__getattr__``).
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()
        self.appended: list[int] = []
        self.item_bytes = 0
        """Keys and values of the items handed to the store (the LangGraph saver's channel
        values and pending writes, the manager's logs) and not removed by ``delete_items``
        since."""
        self.item_count = 0
        self.item_sizes: dict[tuple[Any, str], int] = {}
        self.item_bytes_written = 0
        """Keys and values of every item handed to the store, removed since or not."""

    @classmethod
    def wrap(cls, inner: Any) -> CountingStore:
        names = [name for name in dir(inner)
                 if not name.startswith("_") and callable(getattr(inner, name))]
        methods = {name: _forwarder(name, inspect.iscoroutinefunction(getattr(inner, name)))
                   for name in names}
        if hasattr(inner, "nested_items"):  # a capability flag, not a method
            methods["nested_items"] = inner.nested_items
        subclass = type(f"Counting{type(inner).__name__}", (cls,), methods)
        wrapper: CountingStore = subclass(inner)
        return wrapper


def _forwarder(name: str, asynchronous: bool) -> Callable[..., Any]:
    if not asynchronous:
        def forward(self: CountingStore, *args: Any, **kwargs: Any) -> Any:
            return getattr(self.inner, name)(*args, **kwargs)

        return forward

    async def counted(self: CountingStore, *args: Any, **kwargs: Any) -> Any:
        self.calls[name] += 1
        if name in ("append", "append_next", "append_with_items"):
            record = kwargs["record"] if "record" in kwargs else args[1]
            self.appended.append(len(record.payload) + len(record.header))
        if name in ("append_with_items", "put_items", "put_owned_items"):
            items = kwargs["items"] if "items" in kwargs else args[1]
            for item in items:
                size = len(item.key.encode()) + len(item.value)
                self.item_sizes[(args[0], item.key)] = size
                self.item_bytes += size
                self.item_bytes_written += size
            self.item_count += len(items)
        if name == "delete_items":  # what the run still stores (merged log parts go)
            keys = kwargs["keys"] if "keys" in kwargs else args[1]
            for key in keys:
                size = self.item_sizes.pop((args[0], key), None)
                if size is not None:
                    self.item_bytes -= size
                    self.item_count -= 1
        return await getattr(self.inner, name)(*args, **kwargs)

    return counted


@contextlib.contextmanager
def _patched(owner: Any, name: str, replacement: Callable[..., Any]) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, replacement(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def _network_patches(counts: Counter[str]) -> list[tuple[Any, str, Callable[..., Any]]]:
    """Backend requests, counted where the drivers put bytes on the wire.

    redis-py sends each command, or each pipeline, with one ``send_packed_command``: one round
    trip. aiobotocore sends each HTTP attempt (retries included) with one ``AioEndpoint._send``,
    botocore (boto3, blocking: AWS's LangGraph saver) with one ``Endpoint._send``. asyncpg
    writes each round trip's messages (a prepare, or bind + execute + sync) with one
    ``transport.write``; only writes of asyncpg's protocol are counted there.
    """
    patches: list[tuple[Any, str, Callable[..., Any]]] = []

    def counted(original: Callable[..., Any]) -> Callable[..., Any]:
        async def send(*args: Any, **kwargs: Any) -> Any:
            counts["requests"] += 1
            return await original(*args, **kwargs)

        return send

    def counted_blocking(original: Callable[..., Any]) -> Callable[..., Any]:
        def send(*args: Any, **kwargs: Any) -> Any:
            counts["requests"] += 1
            return original(*args, **kwargs)

        return send

    def counted_asyncpg(original: Callable[..., Any]) -> Callable[..., Any]:
        def write(transport: Any, data: Any) -> Any:
            if type(getattr(transport, "_protocol", None)).__module__.startswith("asyncpg"):
                counts["requests"] += 1
            return original(transport, data)

        return write

    try:
        from redis.asyncio.connection import AbstractConnection
    except ImportError:
        pass
    else:
        patches.append((AbstractConnection, "send_packed_command", counted))
    try:
        from aiobotocore.endpoint import AioEndpoint
    except ImportError:
        pass
    else:
        patches.append((AioEndpoint, "_send", counted))
    try:
        from botocore.endpoint import Endpoint
    except ImportError:
        pass
    else:
        patches.append((Endpoint, "_send", counted_blocking))
    if _importable("asyncpg"):
        patches.append((_SelectorSocketTransport, "write", counted_asyncpg))
    return patches


@contextlib.contextmanager
def counting_syscalls() -> Iterator[Counter[str]]:
    """Count thread hops (``anyio.to_thread.run_sync``, and aiosqlite's hops to its
    connection thread), ``os.fsync`` and ``os.fdatasync`` calls and backend requests (Redis
    and PostgreSQL round trips, AWS HTTP requests) while inside. SQLite's own syncs (in C) are
    not seen."""
    counts: Counter[str] = Counter()

    def hops(run_sync: Callable[..., Any]) -> Callable[..., Any]:
        async def counted_run_sync(*args: Any, **kwargs: Any) -> Any:
            counts["thread_hops"] += 1
            return await run_sync(*args, **kwargs)

        return counted_run_sync

    def fsyncs(fsync: Callable[[int], None]) -> Callable[[int], None]:
        def counted_fsync(fd: int) -> None:
            counts["fsyncs"] += 1
            fsync(fd)

        return counted_fsync

    def aiosqlite_hops(execute: Callable[..., Any]) -> Callable[..., Any]:
        async def counted_execute(*args: Any, **kwargs: Any) -> Any:
            counts["thread_hops"] += 1
            return await execute(*args, **kwargs)

        return counted_execute

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(anyio.to_thread, "run_sync", hops))
        stack.enter_context(_patched(os, "fsync", fsyncs))
        stack.enter_context(_patched(os, "fdatasync", fsyncs))
        if _importable("aiosqlite"):  # every aiosqlite call is one hop to its own thread
            from aiosqlite.core import Connection as AiosqliteConnection

            stack.enter_context(_patched(AiosqliteConnection, "_execute", aiosqlite_hops))
        for owner, name, replacement in _network_patches(counts):
            stack.enter_context(_patched(owner, name, replacement))
        yield counts


async def measure_footprint(
    target: StoreTarget, content: Content, keep: int | None, creates: int
) -> dict[str, Any]:
    """Per-operation counts and bytes per checkpoint, from ``creates`` creates on a new run."""
    store = CountingStore.wrap(target.open())
    manager = CheckpointManager(store, config=CheckpointConfig(max_checkpoints_per_run=keep))
    run_id = unique_run_id("footprint")
    before = disk_usage(target.disk_path) if target.disk_path else None
    per_op: dict[str, dict[str, float]] = {}
    try:
        await manager.create(run_id, content.state, messages=content.messages)  # starts the run
        operations = {
            "create": (creates, lambda: manager.create(
                run_id, content.state, messages=content.messages)),
            "restore": (5, lambda: manager.restore(run_id)),
            "list": (3, lambda: manager.list_checkpoints(run_id)),
        }
        for phase, (count, operation) in operations.items():
            await operation()  # steady state: a driver's first use of a statement prepares it
            calls_before = sum(store.calls.values())
            with counting_syscalls() as counts:
                for _ in range(count):
                    await operation()
            per_op[phase] = {
                "store_calls": (sum(store.calls.values()) - calls_before) / count,
                "thread_hops": counts["thread_hops"] / count,
                "fsyncs": counts["fsyncs"] / count,
                "requests": counts["requests"] / count,
            }
        info = await manager.get_run(run_id)
        held = info.checkpoint_count if info is not None else 0
        result: dict[str, Any] = {
            "payload_header_bytes": statistics.mean(store.appended),
            "per_op": per_op,
        }
        if before is not None and target.disk_path is not None and held:
            after = disk_usage(target.disk_path)
            result["disk_apparent_bytes"] = (after[0] - before[0]) / held
            result["disk_allocated_bytes"] = (after[1] - before[1]) / held
            result["disk_checkpoints_held"] = held
        return result
    finally:
        await manager.delete_run(run_id)
        await manager.aclose()


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def floor(content: Content, iterations: int) -> dict[str, float]:
    """µs of a bare msgspec msgpack encode, and decode, of the checkpoint's content.

    ``iterations`` is for W1-sized content; bigger content gets proportionally fewer.
    """
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder()
    value = {"state": content.state, "messages": content.messages}
    blob = encoder.encode(value)
    count = max(3, min(iterations, iterations * 16_000 // len(blob)))
    start = time.perf_counter_ns()
    for _ in range(count):
        encoder.encode(value)
    middle = time.perf_counter_ns()
    for _ in range(count):
        decoder.decode(blob)
    end = time.perf_counter_ns()
    encode_us = (middle - start) / count / 1e3
    decode_us = (end - middle) / count / 1e3
    return {"bytes": len(blob), "encode_us": encode_us, "decode_us": decode_us,
            "total_us": encode_us + decode_us}
