"""Stores of every bundled kind for the tests that run one scenario on all of them: memory,
file, SQLite, Redis (the store tests' server, under prefixes of this session), PostgreSQL
(a schema per test), S3 and DynamoDB (the session's moto server).

``StorePlace`` builds stores of one kind in one place (a directory, a Redis server, a
schema, a bucket, a table); stores built with distinct ``prefix`` values share that place,
which is what two applications on one server do. Everything built is closed, and the
Redis keys, schemas, buckets and tables are removed, when the test ends.
"""

from __future__ import annotations

import contextlib
import secrets
from pathlib import Path
from typing import Any

import anyio
import pytest

from fastcheckpoint.stores import CheckpointStore

KINDS = ("memory", "file", "sqlite", "redis", "postgres", "s3", "dynamodb")
PREFIXED_KINDS = ("redis", "postgres", "s3")
"""The kinds whose stores take a prefix that keeps stores in one place apart."""

_DEADLINE = 30


class StorePlace:
    """Builds stores of ``kind`` in one place; :meth:`aclose` removes what they wrote. Make
    it outside the event loop (a sync fixture), use and close it in the test's."""

    def __init__(self, kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self.kind = kind
        self._target = _target(kind, request)
        self._tmp_path = tmp_path
        self._stack = contextlib.AsyncExitStack()
        self._token = secrets.token_hex(4)
        self._first: CheckpointStore | None = None

    async def store(self, prefix: str = "") -> CheckpointStore:
        """A store of this place under ``prefix`` (a Redis key prefix, a PostgreSQL table
        prefix, an S3 key prefix; ``""``: the place's own); the memory store is one object."""
        store = await self._built(prefix)
        self._stack.push_async_callback(_closed, store)
        if self.kind in ("postgres", "dynamodb"):
            with anyio.fail_after(_DEADLINE):
                await store.provision()
        return store

    async def first(self) -> CheckpointStore:
        """The place's own store, built at the first call (for a test that calls this once
        per example)."""
        if self._first is None:
            self._first = await self.store()
        return self._first

    async def _built(self, prefix: str) -> Any:
        if self.kind == "memory":
            from fastcheckpoint.stores.memory import MemoryStore

            return MemoryStore()
        if self.kind == "file":
            from fastcheckpoint.stores.file import FileStore

            return FileStore(self._tmp_path / "files", fsync=False)
        if self.kind == "sqlite":
            from fastcheckpoint.stores.sqlite import SQLiteStore

            return SQLiteStore(self._tmp_path / "runs.db", synchronous="normal")
        if self.kind == "redis":
            return await self._redis(prefix)
        if self.kind == "postgres":
            return await self._postgres(prefix)
        if self.kind == "s3":
            return await self._s3(prefix)
        return await self._dynamodb(prefix)

    async def _redis(self, prefix: str) -> Any:
        from tests.stores._redis_support import make_store

        target = self._target
        full = f"{target.prefix}-k{self._token}{prefix}"
        if target.kind != "fakeredis":
            self._stack.push_async_callback(_delete_redis_keys, target.url, full)
        return make_store(target, full)

    async def _postgres(self, prefix: str) -> Any:
        from fastcheckpoint.stores.postgres import PostgresStore
        from tests.stores._postgres_server import drop_schema

        target = self._target
        schema = f"t_{self._token}"
        self._stack.push_async_callback(_bounded, drop_schema(target, schema))
        table_prefix = f"fc{prefix}_"
        return PostgresStore.from_url(
            f"{target.url()}?schema={schema}&table_prefix={table_prefix}&max_size=4")

    async def _s3(self, prefix: str) -> Any:
        from fastcheckpoint.stores.s3 import S3Store
        from tests.stores._moto import REGION

        endpoint, bucket = self._target
        return S3Store(bucket, f"k{self._token}{prefix}", region=REGION, endpoint_url=endpoint)

    async def _dynamodb(self, prefix: str) -> Any:
        from fastcheckpoint.stores.dynamodb import DynamoDBStore
        from tests.stores._moto import REGION, unique_name

        endpoint, bucket = self._target
        return DynamoDBStore(unique_name("keys"), bucket=bucket, region=REGION,
                             endpoint_url=endpoint, prefix=f"k{self._token}{prefix}/")

    async def aclose(self) -> None:
        await self._stack.aclose()


def _target(kind: str, request: pytest.FixtureRequest) -> Any:
    """What stores of ``kind`` need from the session (outside any event loop: the PostgreSQL
    session starts its server with ``asyncio.run``)."""
    if kind == "redis":
        pytest.importorskip("redis")
        return request.getfixturevalue("redis_target")
    if kind == "postgres":
        pytest.importorskip("asyncpg")
        from tests.stores._postgres_server import session_target

        return session_target(request.config)
    if kind in ("s3", "dynamodb"):
        pytest.importorskip("aiobotocore")
        return request.getfixturevalue("moto_endpoint"), request.getfixturevalue("s3_bucket")
    return None


async def _closed(store: CheckpointStore) -> None:
    with anyio.fail_after(_DEADLINE):
        await store.aclose()


async def _bounded(call: Any) -> None:
    with anyio.fail_after(_DEADLINE):
        await call


async def _delete_redis_keys(url: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    from tests.stores._redis_support import delete_prefix

    client = aioredis.Redis.from_url(url)
    with anyio.fail_after(_DEADLINE):
        try:
            await delete_prefix(client, prefix)
        finally:
            await client.aclose()
