"""Connections and descriptors a store leaves open when its backend fails or it is closed, and
what a store raises when it cannot build its client.

The leak tests count what they can see from outside: the server's connections of a client
name the store was given (Redis ``CLIENT LIST``), or the process's open descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
import redis.asyncio as aioredis

from fastcheckpoint import Checkpoint, CheckpointManager
from fastcheckpoint.errors import ConfigurationError, StoreError
from fastcheckpoint.stores import _loops
from fastcheckpoint.stores import file as file_store
from fastcheckpoint.stores._loops import PerLoop, holds_clients
from fastcheckpoint.stores.dynamodb import DynamoDBStore
from fastcheckpoint.stores.file import FileStore
from fastcheckpoint.stores.redis import RedisStore
from fastcheckpoint.stores.s3 import S3Store
from fastcheckpoint.stores.sqlite import SQLiteStore
from tests.stores.conftest import RedisTarget

pytestmark = pytest.mark.anyio


async def _settled(count: Callable[[], Awaitable[int]]) -> int:
    """``count()`` once connections being closed have left (the server takes a moment to
    drop a closed one from its list)."""
    deadline = time.monotonic() + 5
    while (found := await count()) and time.monotonic() < deadline:  # noqa: ASYNC110
        await anyio.sleep(0.05)
    return found


# -- Redis --------------------------------------------------------------------------------------


def _redis_connections(url: str, name: str) -> Callable[[], Awaitable[int]]:
    async def count() -> int:
        watcher = aioredis.Redis.from_url(url)
        try:
            clients = await watcher.client_list()
        finally:
            await watcher.aclose()
        return sum(1 for client in clients if client.get("name") == name)
    return count


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_redis_aclose_while_calls_run_leaves_no_connection(
    prefixed: tuple[RedisTarget, str],
) -> None:
    # redis-py reconnects a client closed under a running command (its retry): those
    # connections stayed open after aclose(), until the garbage collector found the client
    # (7 of 8 here; the collector is off while they are counted).
    target, prefix = prefixed
    if target.kind == "fakeredis":
        pytest.skip("counts the connections of a real server")
    name = f"fc-leak-{secrets.token_hex(4)}"
    store = RedisStore.from_url(f"{target.url}?prefix={prefix}&client_name={name}")
    manager = CheckpointManager(store)
    gc.disable()
    try:
        with anyio.fail_after(30):
            await manager.create("run", state={"text": "x" * 2_000_000}, messages=[])
            restores = [asyncio.ensure_future(manager.restore("run")) for _ in range(8)]
            await asyncio.sleep(0.001)
            running = sum(not restore.done() for restore in restores)
            await store.aclose()
            restored = await asyncio.gather(*restores)
            left = await _settled(_redis_connections(target.url, name))
            await manager.delete_run("run")
            await store.aclose()
    finally:
        gc.enable()
    assert running
    assert all(checkpoint is not None for checkpoint in restored)
    assert left == 0



@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_redis_aclose_waits_for_a_hung_command_only_so_long(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A server that accepts and never answers, and a client of the store's own without
    # timeouts: the close gives up waiting for the hung command, and closes the client.
    monkeypatch.setattr(_loops, "CLOSE_WAIT_S", 0.2)
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = RedisStore(aioredis.Redis(host="127.0.0.1", port=port), owns_client=True)
    hung = asyncio.ensure_future(CheckpointManager(store).restore("run"))
    try:
        with anyio.fail_after(10):
            while not accepted:  # noqa: ASYNC110 - until the command is sent
                await asyncio.sleep(0.01)
            await store.aclose()
            assert not hung.done()
            hung.cancel()
            with pytest.raises(asyncio.CancelledError):
                await hung
    finally:
        server.close()
        for writer in accepted:
            writer.close()
        await server.wait_closed()


# -- file store -----------------------------------------------------------------------------------


def _descriptors() -> dict[str, str]:
    """The process's open descriptors and what each names (not the listing's own)."""
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            found[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the descriptor of the listing itself, closed since
            continue
    return found


async def test_file_reads_whose_close_fails_leave_no_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A read holds the run directory open and its log through it; when closing the log failed,
    # the directory's descriptor stayed open (one per read) and the read failed, although a
    # failed close is logged, never reported as the operation's.
    manager = CheckpointManager(FileStore(tmp_path / "store"))
    await manager.create("run", state={"step": 1}, messages=[])
    assert (await manager.restore("run")) is not None  # the worker threads exist from here on
    close = file_store._Dir.close

    def failing_close(self: file_store._Dir) -> None:
        close(self)  # the descriptor is released: Linux frees it even when close fails
        raise OSError(errno.EIO, "injected: closing the log failed")

    monkeypatch.setattr(file_store._Dir, "close", failing_close)
    before = _descriptors()
    outcomes: list[object] = []
    for _ in range(3):
        try:
            outcomes.append(await manager.restore("run"))
        except StoreError as exc:
            outcomes.append(exc)
    after = _descriptors()
    assert [after[fd] for fd in after.keys() - before.keys()] == []
    assert all(isinstance(outcome, Checkpoint) for outcome in outcomes), outcomes
    assert len(await manager.list_checkpoints("run")) == 1


# -- S3 and DynamoDB ------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", [
    "http://exa mple.com:9000", "http://127.0.0.1:99999", "http://[::1", "http://:9000",
    "http://127.0.0.1:port",
])
def test_a_malformed_endpoint_url_is_refused_when_the_store_is_built(endpoint: str) -> None:
    # The client is built on first use: botocore refused such an endpoint with a ValueError
    # there (or while signing the first request), out of every call instead of a
    # ConfigurationError, and the DynamoDB store's constructor did not look at it at all.
    builds: list[Callable[[], object]] = [
        lambda: S3Store("bucket", endpoint_url=endpoint, region="us-east-1"),
        lambda: DynamoDBStore("table", endpoint_url=endpoint, region="us-east-1"),
        lambda: S3Store.from_url(f"s3://bucket/p?region=us-east-1&endpoint_url={endpoint}"),
        lambda: DynamoDBStore.from_url(f"dynamodb://table?region=us-east-1&endpoint_url={endpoint}"),
    ]
    for build in builds:
        with pytest.raises(ConfigurationError, match="endpoint_url"):
            build()


def test_a_call_whose_tasks_get_the_client_at_once_holds_it_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Tasks of one call (gather) that each got the client first took it once each, but the
    # call let go of it once: aclose() then waited for a call long returned.
    monkeypatch.setattr(_loops, "CLOSE_WAIT_S", 0.01)
    closed: list[str] = []

    async def build() -> str:
        await asyncio.sleep(0)
        return "client"

    async def close(resource: str) -> None:
        closed.append(resource)

    clients: PerLoop[str] = PerLoop(build, close, store="TestStore", driver="a driver")

    @holds_clients
    async def call() -> list[str]:
        return list(await asyncio.gather(clients.get(), clients.get(), clients.get()))

    async def main() -> list[str]:
        got = await call()
        await clients.aclose()
        return got

    assert asyncio.run(main()) == ["client"] * 3
    assert closed == ["client"]
    assert "calls still use" not in caplog.text


# -- SQLite ---------------------------------------------------------------------------------------


async def test_sqlite_aclose_closes_a_reader_lent_out_while_the_writer_is_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With its writer closed (provision() reopens it on next use; so does a failed rollback)
    # and no reader idle, aclose() returned at once: a reader lent out to a running read went
    # back to the idle ones after it, and stayed open.
    path = tmp_path / "store.db"
    store = SQLiteStore(path)
    manager = CheckpointManager(store)
    await manager.create("run", state={"step": 1}, messages=[])
    lent, give_back = threading.Event(), threading.Event()
    connection = store._readers.connection

    @contextlib.contextmanager
    def held() -> Iterator[sqlite3.Connection]:
        with connection() as db:
            yield db
            lent.set()
            give_back.wait(10)

    monkeypatch.setattr(store._readers, "connection", held)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            group.start_soon(manager.restore, "run")
            await anyio.to_thread.run_sync(lent.wait)
            await store.provision()
            await store.aclose()
            give_back.set()
    assert [name for name in _descriptors().values() if name.startswith(str(path))] == []
