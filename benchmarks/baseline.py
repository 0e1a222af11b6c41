"""The network floor: what the bare driver pays for one write and one read on the same server.

For each network store measured, the same payload size is written and read back with the
driver alone (redis-py ``SET``/``GET``; aiobotocore ``PutObject``/``GetObject`` or
``PutItem``/``GetItem``) against the same server, in scratch keys, buckets and tables that are
removed afterwards. Set next to a store's create and restore, it shows what is the server (or
the emulator: moto answers in milliseconds, AWS in tens of them) and what is the library.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from benchmarks.measure import percentile
from benchmarks.subjects import StoreTarget

__all__ = ["NETWORK_KINDS", "network_floor"]

NETWORK_KINDS = ("redis", "rediss", "s3", "dynamodb")

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
async def _redis(url: str, body: bytes) -> AsyncIterator[tuple[str, Operation, Operation]]:
    import redis.asyncio

    parts = urlsplit(url)
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
async def _s3(url: str, body: bytes) -> AsyncIterator[tuple[str, Operation, Operation]]:
    from aiobotocore.session import get_session

    bucket = f"fcbench-floor-{secrets.token_hex(4)}"
    async with get_session().create_client("s3", **_aws_options(url)) as client:
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
async def _dynamodb(url: str, body: bytes) -> AsyncIterator[tuple[str, Operation, Operation]]:
    from aiobotocore.session import get_session

    table = f"fcbench-floor-{secrets.token_hex(4)}"
    async with get_session().create_client("dynamodb", **_aws_options(url)) as client:
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


_DRIVERS = {"redis": _redis, "rediss": _redis, "s3": _s3, "dynamodb": _dynamodb}


async def network_floor(target: StoreTarget, size: int, iterations: int) -> dict[str, Any] | None:
    """Bare driver write and read latency of ``size`` bytes on ``target``'s server, or None
    for a store that is not a network store."""
    driver = _DRIVERS.get(target.kind)
    if driver is None:
        return None
    body = secrets.token_bytes(size)  # incompressible, like an encoded checkpoint
    async with driver(target.url, body) as (label, write, read):
        await write()  # connect and warm up outside the timing
        await read()
        return {
            "store": target.label,
            "operations": label,
            "bytes": size,
            "write": await _timed(write, iterations),
            "read": await _timed(read, iterations),
        }
