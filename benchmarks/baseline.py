"""The backend floor: what the bare driver or filesystem pays for one write and one read.

For each network store measured, the same payload size is written and read back with the
driver alone (redis-py ``SET``/``GET``; aiobotocore ``PutObject``/``GetObject`` or
``PutItem``/``GetItem``) against the same server, in scratch keys, buckets and tables that are
removed afterwards. Set next to a store's create and restore, it shows what is the server (or
the emulator: moto answers in milliseconds, AWS in tens of them) and what is the library.

For a file store, the least an async library can pay for a write of those bytes that survives
a crash: one append to an open file and one ``fdatasync`` (no new file, no rename, no
directory sync), and for a read one ``pread``, each in a worker thread as a library must do
to keep disk waits off the event loop. With ``fsync=false`` the write is the append alone.

For PostgreSQL, one autocommitted ``INSERT`` of a ``bytea`` row (a prepared statement on one
asyncpg connection, so one round trip and one WAL flush) and one ``SELECT`` of it by primary
key, in a scratch table of the store's database. For SQLite, one ``INSERT`` and ``COMMIT`` of
a BLOB row in WAL mode with the store's ``synchronous`` setting, and one ``SELECT``, each in a
worker thread, in a scratch database beside the store's.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import anyio.to_thread

from benchmarks.measure import percentile
from benchmarks.subjects import StoreTarget

__all__ = ["NETWORK_KINDS", "backend_floor"]

NETWORK_KINDS = ("redis", "rediss", "s3", "dynamodb", "postgres")

Operation = Callable[[], Awaitable[Any]]


async def _timed(operation: Operation, iterations: int) -> dict[str, float]:
    latencies: list[int] = []
    for _ in range(iterations):
        start = time.perf_counter_ns()
        await operation()
        latencies.append(time.perf_counter_ns() - start)
    ordered = sorted(latencies)
    return {
        "p50_us": percentile(ordered, 0.50) / 1e3,
        "p99_us": percentile(ordered, 0.99) / 1e3,
        "ops_per_s": len(ordered) / (sum(ordered) / 1e9),
    }


@contextlib.asynccontextmanager
async def _redis(
    target: StoreTarget, body: bytes
) -> AsyncIterator[tuple[str, Operation, Operation]]:
    import redis.asyncio

    parts = urlsplit(target.url)
    prefix = dict(parse_qsl(parts.query)).get("prefix", "fcbench")
    client = redis.asyncio.Redis.from_url(urlunsplit(parts._replace(query="")))
    key = f"{prefix}:floor:{secrets.token_hex(4)}"
    try:
        yield "SET / GET", lambda: client.set(key, body), lambda: client.get(key)
    finally:
        await client.delete(key)
        await client.aclose()


def _aws_options(url: str) -> dict[str, Any]:
    query = dict(parse_qsl(urlsplit(url).query))
    return {"region_name": query.get("region"), "endpoint_url": query.get("endpoint_url")}


@contextlib.asynccontextmanager
async def _s3(target: StoreTarget, body: bytes) -> AsyncIterator[tuple[str, Operation, Operation]]:
    from aiobotocore.session import get_session

    bucket = f"fcbench-floor-{secrets.token_hex(4)}"
    async with get_session().create_client("s3", **_aws_options(target.url)) as client:
        await client.create_bucket(Bucket=bucket)

        async def get() -> bytes:
            response = await client.get_object(Bucket=bucket, Key="k")
            async with response["Body"] as stream:
                data: bytes = await stream.read()
                return data

        try:
            yield ("PutObject / GetObject",
                   lambda: client.put_object(Bucket=bucket, Key="k", Body=body), get)
        finally:
            await client.delete_object(Bucket=bucket, Key="k")
            await client.delete_bucket(Bucket=bucket)


@contextlib.asynccontextmanager
async def _dynamodb(
    target: StoreTarget, body: bytes
) -> AsyncIterator[tuple[str, Operation, Operation]]:
    from aiobotocore.session import get_session

    table = f"fcbench-floor-{secrets.token_hex(4)}"
    async with get_session().create_client("dynamodb", **_aws_options(target.url)) as client:
        await client.create_table(
            TableName=table, BillingMode="PAY_PER_REQUEST",
            AttributeDefinitions=[{"AttributeName": "PK", "AttributeType": "S"}],
            KeySchema=[{"AttributeName": "PK", "KeyType": "HASH"}],
        )
        await client.get_waiter("table_exists").wait(TableName=table)
        item = {"PK": {"S": "k"}, "v": {"B": body}}
        try:
            yield ("PutItem / GetItem",
                   lambda: client.put_item(TableName=table, Item=item),
                   lambda: client.get_item(TableName=table, Key={"PK": {"S": "k"}}))
        finally:
            await client.delete_table(TableName=table)


@contextlib.asynccontextmanager
async def _file(
    target: StoreTarget, body: bytes
) -> AsyncIterator[tuple[str, Operation, Operation]]:
    directory = target.disk_path
    assert directory is not None
    os.makedirs(directory, exist_ok=True)
    sync = target.kind == "file"
    handle, path = tempfile.mkstemp(prefix=".floor-", dir=directory)
    size = len(body)

    def append() -> None:
        os.write(handle, body)
        if sync:
            os.fdatasync(handle)

    def read() -> bytes:
        return os.pread(handle, size, 0)

    try:
        yield ("append + fdatasync / pread, in a worker thread" if sync
               else "append / pread, in a worker thread",
               lambda: anyio.to_thread.run_sync(append),
               lambda: anyio.to_thread.run_sync(read))
    finally:
        os.close(handle)
        os.unlink(path)


@contextlib.asynccontextmanager
async def _postgres(
    target: StoreTarget, body: bytes
) -> AsyncIterator[tuple[str, Operation, Operation]]:
    import asyncpg

    parts = urlsplit(target.url)
    connection = await asyncpg.connect(urlunsplit(parts._replace(scheme="postgresql", query="")))
    table = f"fcbench_floor_{secrets.token_hex(4)}"
    await connection.execute(f"CREATE TABLE {table} (k bigint PRIMARY KEY, v bytea NOT NULL)")
    counter = iter(range(1 << 62))
    insert = await connection.prepare(f"INSERT INTO {table} (k, v) VALUES ($1, $2)")
    select = await connection.prepare(f"SELECT v FROM {table} WHERE k = $1")
    try:
        yield ("INSERT / SELECT of a bytea row (autocommit)",
               lambda: insert.fetch(next(counter), body), lambda: select.fetchval(0))
    finally:
        await connection.execute(f"DROP TABLE {table}")
        await connection.close()


@contextlib.asynccontextmanager
async def _sqlite(
    target: StoreTarget, body: bytes
) -> AsyncIterator[tuple[str, Operation, Operation]]:
    import sqlite3

    from fastcheckpoint.stores.sqlite import parse_sqlite_url

    path, options = parse_sqlite_url(target.url)
    synchronous = dict(options).get("synchronous", "full").upper()

    def open_scratch() -> tuple[sqlite3.Connection, str]:
        directory = os.path.dirname(os.path.abspath(path))
        handle, scratch = tempfile.mkstemp(prefix=".floor-", suffix=".sqlite", dir=directory)
        os.close(handle)
        db = sqlite3.connect(scratch, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {synchronous}")
        db.execute("CREATE TABLE floor (k INTEGER PRIMARY KEY, v BLOB NOT NULL)")
        return db, scratch

    db, scratch = await anyio.to_thread.run_sync(open_scratch)
    counter = iter(range(1 << 62))

    def write() -> None:
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO floor (k, v) VALUES (?, ?)", (next(counter), body))
        db.execute("COMMIT")

    def read() -> bytes:
        row = db.execute("SELECT v FROM floor WHERE k = 0").fetchone()
        return bytes(row[0])

    try:
        yield (f"INSERT + COMMIT / SELECT of a BLOB row (WAL, synchronous={synchronous}), "
               "in a worker thread",
               lambda: anyio.to_thread.run_sync(write), lambda: anyio.to_thread.run_sync(read))
    finally:
        db.close()
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(scratch + suffix)


_DRIVERS = {"redis": _redis, "rediss": _redis, "s3": _s3, "dynamodb": _dynamodb,
            "file": _file, "file-nofsync": _file, "postgres": _postgres, "sqlite": _sqlite,
            "sqlite-normal": _sqlite}


async def backend_floor(target: StoreTarget, size: int, iterations: int) -> dict[str, Any] | None:
    """Bare write and read latency of ``size`` bytes on ``target``'s server or disk, or None
    for a store that has neither (memory)."""
    driver = _DRIVERS.get(target.kind)
    if driver is None:
        return None
    body = secrets.token_bytes(size)  # incompressible, like an encoded checkpoint
    async with driver(target, body) as (label, write, read):
        await write()  # connect and warm up outside the timing
        await read()
        return {
            "store": target.label,
            "operations": label,
            "bytes": size,
            "write": await _timed(write, iterations),
            "read": await _timed(read, iterations),
        }
