"""Fixtures of the integration tests: fresh stores of every kind, a movable clock.

The LangGraph tests run on asyncio only (LangGraph is asyncio-based). ``fresh_store(kind)``
builds a new, empty store of a kind each time it is called (the conformance suite wants a
fresh saver per capability); Redis, S3, DynamoDB and PostgreSQL use the store tests' servers,
under prefixes, buckets, tables or schemas of their own.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from fastcheckpoint.stores import CheckpointStore, SupportsLabels, SupportsSharedItems
from tests._helpers import FakeClock
from tests.stores._moto import REGION, moto_endpoint, unique_name  # noqa: F401
from tests.stores.conftest import redis_target  # noqa: F401

KINDS = ("memory", "file", "sqlite", "redis", "s3", "dynamodb", "postgres")

FreshStore = Callable[[], contextlib.AbstractAsyncContextManager[CheckpointStore]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture
def fresh_store(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> FreshStore:
    """Builds fresh stores of ``kind``; skips kinds whose store lacks labels or shared items
    (the LangGraph saver needs both)."""
    build = _builder(kind, request, tmp_path)

    @contextlib.asynccontextmanager
    async def fresh() -> AsyncIterator[CheckpointStore]:
        store = build()
        try:
            if kind in ("postgres", "dynamodb"):  # a schema or table of its own
                with anyio.fail_after(30):
                    await store.provision()
            yield store
        finally:
            with anyio.fail_after(30):
                await store.aclose()

    probe = build()
    missing = [capability.__name__ for capability in (SupportsLabels, SupportsSharedItems)
               if not isinstance(probe, capability)]
    anyio.run(_closed, probe, backend="asyncio")
    if missing:
        pytest.skip(f"{type(probe).__name__} lacks {' and '.join(missing)} (not built yet)")
    return fresh


async def _closed(store: CheckpointStore) -> None:
    await store.aclose()


def _builder(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Any]:
    if kind == "memory":
        from fastcheckpoint.stores.memory import MemoryStore

        return MemoryStore
    if kind == "file":
        from fastcheckpoint.stores.file import FileStore

        return lambda: FileStore(tmp_path / secrets.token_hex(4), fsync=False)
    if kind == "sqlite":
        from fastcheckpoint.stores.sqlite import SQLiteStore

        return lambda: SQLiteStore(tmp_path / f"{secrets.token_hex(4)}.db", synchronous="normal")
    if kind == "postgres":
        return _postgres_builder(request)
    if kind == "redis":
        return _redis_builder(request)
    if kind == "s3":
        return _s3_builder(request.getfixturevalue("s3_bucket_for_savers"))
    return _dynamodb_builder(request.getfixturevalue("dynamodb_for_savers"))


def _redis_builder(request: pytest.FixtureRequest) -> Callable[[], Any]:
    pytest.importorskip("redis")
    from tests.stores._redis_support import make_store

    target = request.getfixturevalue("redis_target")
    prefixes: list[str] = []

    def build() -> Any:
        prefixes.append(f"{target.prefix}:lg{secrets.token_hex(3)}")
        return make_store(target, prefixes[-1])

    request.addfinalizer(lambda: _delete_redis_prefixes(target, prefixes))
    return build


def _delete_redis_prefixes(target: Any, prefixes: list[str]) -> None:
    if target.kind == "fakeredis":
        return
    import redis.asyncio as aioredis

    from tests.stores._redis_support import delete_prefix

    async def delete() -> None:
        client = aioredis.Redis.from_url(target.url)
        with anyio.fail_after(30):
            for prefix in prefixes:
                await delete_prefix(client, prefix)
            await client.aclose()

    anyio.run(delete, backend="asyncio")


def _postgres_builder(request: pytest.FixtureRequest) -> Callable[[], Any]:
    pytest.importorskip("asyncpg")
    from fastcheckpoint.stores.postgres import PostgresStore
    from tests.stores._postgres_server import drop_schema, session_target, unique_schema

    target = session_target(request.config)
    schemas: list[str] = []

    def build() -> Any:
        schemas.append(unique_schema())
        return PostgresStore.from_url(f"{target.url()}?schema={schemas[-1]}&max_size=4")

    async def drop() -> None:
        with anyio.fail_after(30):
            for schema in schemas:
                await drop_schema(target, schema)

    request.addfinalizer(lambda: anyio.run(drop, backend="asyncio"))
    return build


def _s3_builder(bucket_and_endpoint: tuple[str, str]) -> Callable[[], Any]:
    from fastcheckpoint.stores.s3 import S3Store

    bucket, endpoint = bucket_and_endpoint
    return lambda: S3Store(bucket, f"lg-{secrets.token_hex(4)}", region=REGION,
                           endpoint_url=endpoint)


def _dynamodb_builder(names_and_endpoint: tuple[str, str, str]) -> Callable[[], Any]:
    from fastcheckpoint.stores.dynamodb import DynamoDBStore

    # A table per store: ``prefix`` only places the bucket's objects.
    _, bucket, endpoint = names_and_endpoint
    return lambda: DynamoDBStore(unique_name("lgtable"), bucket=bucket, region=REGION,
                                 endpoint_url=endpoint, prefix=f"lg-{secrets.token_hex(4)}/")


@pytest.fixture(scope="session")
def s3_bucket_for_savers(moto_endpoint: str) -> tuple[str, str]:  # noqa: F811
    pytest.importorskip("aiobotocore")
    from fastcheckpoint.stores.s3 import S3Store

    bucket = unique_name("lg")

    async def provision() -> None:
        store = S3Store(bucket, region=REGION, endpoint_url=moto_endpoint)
        try:
            await store.provision()
        finally:
            await store.aclose()

    anyio.run(provision, backend="asyncio")
    return bucket, moto_endpoint


@pytest.fixture(scope="session")
def dynamodb_for_savers(moto_endpoint: str) -> tuple[str, str, str]:  # noqa: F811
    pytest.importorskip("aiobotocore")
    from fastcheckpoint.stores.dynamodb import DynamoDBStore

    table, bucket = unique_name("lgtable"), unique_name("lgbucket")

    async def provision() -> None:
        store = DynamoDBStore(table, bucket=bucket, region=REGION, endpoint_url=moto_endpoint)
        try:
            await store.provision()
        finally:
            await store.aclose()

    anyio.run(provision, backend="asyncio")
    return table, bucket, moto_endpoint
