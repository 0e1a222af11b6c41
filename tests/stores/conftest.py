"""Fixtures of the store tests: which Redis the Redis tests use, reported in the summary."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import anyio
import pytest

from tests import _summary
from tests.stores._redis_servers import (
    SHARED_HOST,
    SHARED_PORT,
    PrivateCluster,
    PrivateRedis,
    answers_ping,
    free_port,
    redis_binary,
    session_prefix,
)


@dataclass(frozen=True)
class RedisTarget:
    kind: str  # "shared", "private" or "fakeredis"
    url: str
    prefix: str  # every key a test writes starts with it

    def describe(self) -> str:
        if self.kind == "fakeredis":
            return "fakeredis (no redis-server reachable or installed)"
        where = self.url.split("//", 1)[1]
        return f"{self.kind} redis-server at {where} (under key prefixes of their own)"


FORCE = "FC_TEST_REDIS"
"""``shared``, ``private`` or ``fakeredis``: skip the earlier choices (to test a fallback).

Test-only, so outside the library's ``FASTCHECKPOINT_*`` configuration namespace (whose
unknown names the library refuses)."""


def _tier() -> str:
    forced = os.environ.get(FORCE, "")
    if forced:
        if forced not in ("shared", "private", "fakeredis"):
            raise pytest.UsageError(f"{FORCE} must be shared, private or fakeredis, not {forced!r}")
        return forced
    if answers_ping(SHARED_HOST, SHARED_PORT):
        return "shared"
    if redis_binary() is not None:
        return "private"
    return "fakeredis"


def _plan() -> str:
    return {
        "shared": f"shared redis-server at {SHARED_HOST}:{SHARED_PORT}",
        "private": "a private redis-server started from the binary on a free port",
        "fakeredis": "fakeredis (no redis-server reachable or installed)",
    }[_tier()]


def pytest_report_header() -> str:
    return f"redis store tests: {_plan()}"


@pytest.fixture(scope="session")
def redis_target() -> Iterator[RedisTarget]:
    prefix = session_prefix()
    tier = _tier()
    if tier == "shared":
        target = RedisTarget("shared", f"redis://{SHARED_HOST}:{SHARED_PORT}/0", prefix)
        _summary.note(f"redis store tests ran against {target.describe()}")
        yield target
        return
    if tier == "private":
        server = PrivateRedis(free_port())
        server.start()
        target = RedisTarget("private", server.url, prefix)
        _summary.note(f"redis store tests ran against {target.describe()}")
        try:
            yield target
        finally:
            server.stop()
        return
    if importlib.util.find_spec("fakeredis") is None or importlib.util.find_spec("lupa") is None:
        pytest.skip("no Redis: 127.0.0.1:6379 is unreachable, redis-server is not installed, "
                    "and fakeredis with lupa (pip install 'fakeredis[lua]') is missing")
    target = RedisTarget("fakeredis", "fakeredis://", prefix)
    _summary.note(f"redis store tests ran against {target.describe()}")
    yield target


@pytest.fixture(scope="session")
def private_redis() -> Iterator[PrivateRedis]:
    """A redis-server of our own, for what must not touch the shared one (SCRIPT FLUSH, ACL,
    restarts)."""
    if redis_binary() is None:
        pytest.skip("redis-server is not installed: cannot start a private server")
    server = PrivateRedis(free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[PrivateCluster]:
    """Three primaries started from the binary and joined with redis-cli --cluster create."""
    if redis_binary() is None:
        pytest.skip("redis-server is not installed: cannot start a Redis Cluster")
    cluster = PrivateCluster()
    try:
        cluster.start()
    except Exception as exc:  # e.g. a sandbox without the cluster bus ports: say why
        cluster.stop()
        pytest.skip(f"could not start a Redis Cluster from the binary: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
async def prefixed(redis_target: RedisTarget) -> AsyncIterator[tuple[RedisTarget, str]]:
    """A Redis key prefix of this test's own; its keys are deleted afterwards."""
    import redis.asyncio as aioredis

    from tests.stores._redis_support import delete_prefix, unique_prefix

    prefix = unique_prefix(redis_target)
    yield redis_target, prefix
    if redis_target.kind != "fakeredis":
        client = aioredis.Redis.from_url(redis_target.url)
        with anyio.fail_after(30):
            await delete_prefix(client, prefix)
            await client.aclose()
