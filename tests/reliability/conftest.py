"""Fixtures of the reliability suite: one target per store, the seed, the figures."""

from __future__ import annotations

import asyncio
import concurrent.futures
import secrets
import zlib
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.reliability._audit import FIGURES, SCALE_VARIABLE, SEED_VARIABLE, Figures, scale
from tests.reliability._stores import (
    REGION,
    Target,
    dynamodb_target,
    file_target,
    postgres_target,
    redis_target,
    s3_target,
    sqlite_target,
)
from tests.stores._moto import moto_endpoint, unique_name
from tests.stores._postgres_server import (
    PostgresTarget,
    drop_schema,
    session_target,
    unique_schema,
)
from tests.stores.conftest import RedisTarget
from tests.stores.conftest import redis_target as shared_redis

__all__ = ["moto_endpoint", "shared_redis"]

DURABLE = ("file", "sqlite", "redis", "postgres", "s3", "dynamodb")
NETWORK = ("redis", "postgres", "s3", "dynamodb")

_figures = FIGURES


def pytest_report_header() -> str:
    return (f"reliability suite: seed {_figures.seed} (replay with {SEED_VARIABLE}), "
            f"scale {scale():g} ({SCALE_VARIABLE})")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis.asyncio and aiobotocore run on asyncio only


@pytest.fixture(scope="session")
def figures() -> Figures:
    return _figures


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """A seed per test, derived from the session's, so one test replays alone."""
    return zlib.crc32(f"{_figures.seed}/{request.node.nodeid}".encode())


@pytest.fixture(scope="session")
def aws_bucket(moto_endpoint: str) -> str:
    """The session's bucket (S3 checkpoints, DynamoDB blobs); tests use their own prefixes."""
    from fastcheckpoint.stores.s3 import S3Store

    bucket = unique_name("rel")

    async def provision() -> None:
        store = S3Store(bucket, region=REGION, endpoint_url=moto_endpoint)
        try:
            await store.provision()
        finally:
            await store.aclose()

    anyio.run(provision, backend="asyncio")
    return bucket


@pytest.fixture
def file_store_target(tmp_path: Path) -> Iterator[Target]:
    target = file_target(tmp_path / "store")
    yield target
    target.tamperer.close()


@pytest.fixture
def sqlite_store_target(tmp_path: Path) -> Iterator[Target]:
    target = sqlite_target(tmp_path / "checkpoints.db")
    yield target
    target.tamperer.close()


def _on_own_loop(work: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run ``work()`` on an event loop of its own, in a thread of its own: fixtures run while
    the test's loop may exist, and asyncpg ties connections to the loop that opened them."""
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, work()).result(120)


@pytest.fixture(scope="session")
def postgres_server(pytestconfig: pytest.Config) -> PostgresTarget:
    """The session's PostgreSQL database (dropped at the end), or a skip saying why there is
    none, which the summary repeats."""
    return session_target(pytestconfig)


@pytest.fixture
def postgres_store_target(postgres_server: PostgresTarget) -> Iterator[Target]:
    """The store's tables in a schema of this test's own, dropped afterwards."""
    schema = unique_schema()
    target = postgres_target(postgres_server.url(), schema)

    async def provision() -> None:
        store = target.store()
        try:
            await store.provision()  # type: ignore[attr-defined]
        finally:
            await store.aclose()

    _on_own_loop(provision)
    yield target
    target.tamperer.close()
    _on_own_loop(lambda: drop_schema(postgres_server, schema))


@pytest.fixture
def redis_store_target(shared_redis: RedisTarget) -> Iterator[Target]:
    if shared_redis.kind == "fakeredis":
        pytest.skip("needs a real redis-server: fakeredis cannot sit behind a TCP proxy")
    target = redis_target(shared_redis.url, f"{shared_redis.prefix}-rel-{secrets.token_hex(4)}")
    yield target
    target.tamperer.close()  # removes this test's keys from the shared server


@pytest.fixture
def s3_store_target(moto_endpoint: str, aws_bucket: str) -> Iterator[Target]:
    target = s3_target(moto_endpoint, aws_bucket, f"rel-{secrets.token_hex(4)}")
    yield target
    target.tamperer.close()


@pytest.fixture(scope="session")
def aws_table(moto_endpoint: str, aws_bucket: str) -> str:
    """The session's table; tests use their own run ids, and remove the runs they damage."""
    table = unique_name("rel")

    async def provision() -> None:
        store = dynamodb_target(moto_endpoint, table, aws_bucket, "").store()
        try:
            await store.provision()  # type: ignore[attr-defined]
        finally:
            await store.aclose()

    anyio.run(provision, backend="asyncio")
    return table


@pytest.fixture
def dynamodb_store_target(moto_endpoint: str, aws_table: str, aws_bucket: str) -> Iterator[Target]:
    target = dynamodb_target(moto_endpoint, aws_table, aws_bucket, f"rel-{secrets.token_hex(4)}/")
    yield target
    target.tamperer.close()


@pytest.fixture(params=DURABLE)
def durable_target(request: pytest.FixtureRequest) -> Target:
    target: Target = request.getfixturevalue(f"{request.param}_store_target")
    return target


@pytest.fixture(params=NETWORK)
def network_target(request: pytest.FixtureRequest) -> Target:
    target: Target = request.getfixturevalue(f"{request.param}_store_target")
    return target
