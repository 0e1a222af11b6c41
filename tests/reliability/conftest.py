"""Fixtures of the reliability suite: one target per store, the seed, the figures."""

from __future__ import annotations

import os
import secrets
import zlib
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from tests.reliability._audit import SCALE_VARIABLE, SEED_VARIABLE, Figures, scale
from tests.reliability._stores import (
    REGION,
    Target,
    dynamodb_target,
    file_target,
    redis_target,
    s3_target,
)
from tests.stores._moto import moto_endpoint, unique_name
from tests.stores.conftest import RedisTarget
from tests.stores.conftest import redis_target as shared_redis

__all__ = ["moto_endpoint", "shared_redis"]

DURABLE = ("file", "redis", "s3", "dynamodb")
NETWORK = ("redis", "s3", "dynamodb")

_figures = Figures(int(os.environ.get(SEED_VARIABLE) or secrets.randbits(32)))


def pytest_report_header() -> str:
    return (f"reliability suite: seed {_figures.seed} (replay with {SEED_VARIABLE}), "
            f"scale {scale():g} ({SCALE_VARIABLE})")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = _figures.lines()
    if not lines:
        return
    terminalreporter.section("reliability figures")
    terminalreporter.write_line(f"seed {_figures.seed}, scale {scale():g}")
    for line in lines:
        terminalreporter.write_line(line)


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
