"""The LangGraph saver's request budget on each backend, counted where the requests leave:
Redis round trips on the connection, HTTP requests of the S3 and DynamoDB clients, PostgreSQL
round trips through a counting proxy, and store calls for the in-process stores.

Steady state: one process per thread, which has saved the thread before (its scripts loaded,
its connections open). A save changes one channel of two; the writes are regular ones.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
from tests._helpers import completed_at_once
from tests.integrations._langgraph_support import CountingStore, config, put
from tests.stores._moto import REGION

pytestmark = pytest.mark.anyio

DEADLINE = 60

Action = Callable[[], Awaitable[Any]]
Count = Callable[[Action], Awaitable[dict[str, int]]]
"""Runs an action and returns the requests it sent, by kind."""

# What aput (a checkpoint with one changed channel value of two), aput_writes (two regular
# writes) and aget_tuple (the latest, with its two writes and two channel values) cost in
# steady state.
_ONE_CALL_EACH = {"aput": {"append_with_items": 1}, "aput_writes": {"put_owned_items": 1},
                  "aget_tuple": {"read_with_items": 1}}
_ONE_ROUND_TRIP_EACH = {"aput": {"round trips": 1}, "aput_writes": {"round trips": 1},
                        "aget_tuple": {"round trips": 1}}
BUDGETS: dict[str, dict[str, dict[str, int]]] = {
    "memory": _ONE_CALL_EACH,
    "file": _ONE_CALL_EACH,
    "sqlite": _ONE_CALL_EACH,
    "redis": _ONE_ROUND_TRIP_EACH,
    "postgres": _ONE_ROUND_TRIP_EACH,
    # The latest checkpoint, which this process saved: the run item, the checkpoint, its
    # writes and the channel values it names in one consistent TransactGetItems.
    "dynamodb": {"aput": {"TransactWriteItems": 1}, "aput_writes": {"TransactWriteItems": 1},
                 "aget_tuple": {"TransactGetItems": 1}},
    # S3 has no multi-object write or read: each call sends its requests in 2 to 4 round
    # trips of concurrent requests (docs/integrations/langgraph.md states them per call).
    # aput: slot, marker, location item and its marker, one PUT per changed value (4 + 1),
    # and 2 GETs of checks. aput_writes: the checkpoint's slot and run object plus each
    # write's current object (2 + 2 GETs) with a LIST of the slot's keys (is the checkpoint
    # pending?), then each write and its marker (2 x 2 PUTs).
    # aget_tuple: the run's head (1 LIST), the slot, then the location item, each channel
    # value and each write (1 + 1 + 2 + 2 GETs).
    "s3": {"aput": {"PutObject": 5, "GetObject": 3},
           "aput_writes": {"GetObject": 4, "ListObjectsV2": 1, "PutObject": 4},
           "aget_tuple": {"ListObjectsV2": 1, "GetObject": 6}},
}


@pytest.fixture(params=sorted(BUDGETS))
def budget_kind(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture
def server(budget_kind: str, request: pytest.FixtureRequest) -> Any:
    """Where the kind's store lives (resolved outside the test's event loop: the session
    fixtures set servers up with their own)."""
    if budget_kind == "redis":
        pytest.importorskip("redis")
        return request.getfixturevalue("redis_target")
    if budget_kind == "postgres":
        pytest.importorskip("asyncpg")
        from tests.stores._postgres_server import session_target

        return session_target(request.config)
    if budget_kind == "s3":
        return request.getfixturevalue("s3_bucket_for_savers")
    if budget_kind == "dynamodb":
        return request.getfixturevalue("dynamodb_for_savers")
    return None


async def test_save_writes_and_load_stay_within_the_budget(
    budget_kind: str, server: Any, tmp_path: Path
) -> None:
    with anyio.fail_after(DEADLINE):
        async with _counted_saver(budget_kind, server, tmp_path) as (saver, count):
            counted = await _steady_state(saver, count)
    assert counted == BUDGETS[budget_kind]


async def _steady_state(saver: FastCheckpointSaver, count: Count) -> dict[str, dict[str, int]]:
    first = await put(saver, "t", values={"a": "a0", "b": "b" * 2000},
                      versions={"a": 1, "b": 1}, run_id="r")
    await saver.aput_writes(config("t", first), [("a", "w0")], "task-0")
    await saver.aget_tuple(config("t"))
    second = await put(saver, "t", parent=first, values={"a": "a1", "b": "b" * 2000},
                       versions={"a": 2, "b": 1}, new_versions={"a": 2}, run_id="r")
    await saver.aput_writes(config("t", second), [("a", "w1")], "task-1")
    await saver.aget_tuple(config("t"))

    saved: list[str] = []

    async def save() -> None:
        saved.append(await put(saver, "t", parent=second, values={"a": "a2", "b": "b" * 2000},
                               versions={"a": 3, "b": 1}, new_versions={"a": 3}, run_id="r"))

    counted = {"aput": await count(save)}
    counted["aput_writes"] = await count(
        lambda: saver.aput_writes(config("t", saved[0]), [("a", "w2"), ("c", 1)], "task-2"))
    loaded: list[Any] = []

    async def load() -> None:
        loaded.append(await saver.aget_tuple(config("t")))

    counted["aget_tuple"] = await count(load)
    [latest] = loaded
    assert latest is not None
    assert latest.checkpoint["id"] == saved[0]
    assert latest.checkpoint["channel_values"] == {"a": "a2", "b": "b" * 2000}
    assert latest.pending_writes == [("task-2", "a", "w2"), ("task-2", "c", 1)]
    return counted


@contextlib.asynccontextmanager
async def _counted_saver(
    kind: str, server: Any, tmp_path: Path
) -> AsyncIterator[tuple[FastCheckpointSaver, Count]]:
    if kind in ("memory", "file", "sqlite"):
        store = CountingStore(_local_store(kind, tmp_path))

        async def calls(action: Action) -> dict[str, int]:
            store.take()
            await action()
            return store.take()

        async with FastCheckpointSaver(store) as saver:  # type: ignore[arg-type]
            yield saver, calls
        return
    openers: dict[str, Callable[[Any], contextlib.AbstractAsyncContextManager[Any]]] = {
        "redis": _redis, "postgres": _postgres, "s3": _s3, "dynamodb": _dynamodb}
    opener = openers[kind]
    async with opener(server) as (store, count):
        # Not entered: entering starts the cleanup loop, whose requests would land in the
        # counts at random; its cost is the store's cleanup_expired, not a call's.
        saver = FastCheckpointSaver(store)
        try:
            yield saver, count
        finally:
            await saver.aclose()


def _local_store(kind: str, tmp_path: Path) -> Any:
    if kind == "memory":
        from fastcheckpoint.stores.memory import MemoryStore

        return MemoryStore()
    if kind == "file":
        from fastcheckpoint.stores.file import FileStore

        return FileStore(tmp_path / "store", fsync=False)
    from fastcheckpoint.stores.sqlite import SQLiteStore

    return SQLiteStore(tmp_path / "store.db", synchronous="normal")


@contextlib.asynccontextmanager
async def _redis(target: Any) -> AsyncIterator[tuple[Any, Count]]:
    import redis.asyncio as aioredis

    from fastcheckpoint.stores.redis import RedisStore
    from tests.stores._redis_support import (
        counting_connection_class,
        delete_prefix,
        load_scripts,
        real_server,
    )

    real_server(target)
    counter = counting_connection_class()
    client = aioredis.Redis.from_url(target.url, connection_class=counter)
    prefix = f"{target.prefix}:lgb{secrets.token_hex(3)}"

    async def trips(action: Action) -> dict[str, int]:
        before = counter.round_trips
        await action()
        return {"round trips": counter.round_trips - before}

    try:
        await load_scripts(client)
        yield RedisStore(client, prefix=prefix), trips
    finally:
        await delete_prefix(client, prefix)
        await client.aclose()


@contextlib.asynccontextmanager
async def _postgres(target: Any) -> AsyncIterator[tuple[Any, Count]]:
    from fastcheckpoint.stores.postgres import PostgresStore
    from tests.stores._postgres_server import WireCounter, drop_schema, unique_schema

    schema = unique_schema()

    with WireCounter((target.host, target.port)) as counter:

        async def trips(action: Action) -> dict[str, int]:
            return {"round trips": await counter.trips(action)}

        store = PostgresStore.from_url(f"{counter.url(target)}?schema={schema}&max_size=1")
        try:
            await store.provision()
            yield store, trips
        finally:
            await drop_schema(target, schema)


@contextlib.asynccontextmanager
async def _s3(server: tuple[str, str]) -> AsyncIterator[tuple[Any, Count]]:
    from fastcheckpoint.stores._aws import RequestCounter
    from fastcheckpoint.stores.s3 import S3Store

    bucket, endpoint = server
    store = S3Store(bucket, f"lgb-{secrets.token_hex(4)}", region=REGION, endpoint_url=endpoint)

    async def requests(action: Action) -> dict[str, int]:
        with RequestCounter.attached(await store.client()) as counter:
            await action()
        return dict(counter.counts)

    yield store, requests


@contextlib.asynccontextmanager
async def _dynamodb(server: tuple[str, str, str]) -> AsyncIterator[tuple[Any, Count]]:
    from fastcheckpoint.stores._aws import RequestCounter
    from fastcheckpoint.stores.dynamodb import DynamoDBStore

    table, bucket, endpoint = server
    store = DynamoDBStore(table, bucket=bucket, region=REGION, endpoint_url=endpoint,
                          prefix=f"lgb-{secrets.token_hex(4)}/")

    async def requests(action: Action) -> dict[str, int]:
        dynamodb, s3 = await store.clients()
        with RequestCounter.attached(dynamodb) as tables, RequestCounter.attached(s3) as blobs:
            await action()
        return {**tables.counts, **blobs.counts}

    yield store, requests


async def test_on_the_memory_store_a_step_takes_no_turn_of_the_event_loop() -> None:
    """The memory store's calls never suspend, so the saver's saves and writes (an interrupt
    among them, which pauses the thread) on it complete in the caller's task at once: no
    task to shield them from a cancellation, no turn of the event loop to pay. (A load
    takes a few turns on purpose: it first lets the saves under way in the process end.)"""
    from fastcheckpoint.stores.memory import MemoryStore

    at_once = completed_at_once
    saver = FastCheckpointSaver(MemoryStore())
    first = at_once(put(saver, "t", values={"a": "a0"}, versions={"a": 1}, run_id="r"))
    at_once(saver.aput_writes(config("t", first), [("a", "w0")], "task-0"))
    second = at_once(put(saver, "t", parent=first, values={"a": "a1"}, versions={"a": 2},
                         new_versions={"a": 2}, run_id="r"))
    at_once(saver.aput_writes(config("t", second), [("a", "w1"), ("__interrupt__", {"q": 1})],
                              "task-1"))
    latest = await saver.aget_tuple(config("t"))
    assert latest is not None
    assert latest.checkpoint["id"] == second
    assert ("task-1", "a", "w1") in latest.pending_writes
    run = await saver.manager.get_run("t")
    assert run is not None
    assert run.status.value == "paused"
    await saver.aclose()
