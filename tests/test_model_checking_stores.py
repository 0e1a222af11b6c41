"""The model-checking machine of tests/test_model_checking.py on the SQLite, Redis and
PostgreSQL stores, and with two managers ("two processes") sharing one file, SQLite, Redis or
PostgreSQL store (Redis also through the Redis Cluster code path, on the plain server).

Each example of a machine gets a backing of its own: a fresh directory (file, SQLite), a
Redis key prefix (its keys deleted afterwards) or a PostgreSQL schema of the test's own
(emptied afterwards, dropped at the end of the test).
With two processes each manager has its own store object over that backing, so what a store
object keeps between calls (the file store's item index and run hints, SQLite's and
PostgreSQL's connections and statement caches, a manager's sequence cache and log bases) is
exercised by a writer it does not know about. The model is one logical store either way.

The clock: the file, SQLite and PostgreSQL stores decide expiry by the ``now`` each call
carries (the manager's fake clock; PostgreSQL's server clock only ages the retry memos of
deletes). Redis also lets its keys expire natively, ``expires_at - now`` after the write on
the server's real clock, so a checkpoint with a one-second TTL would vanish a real second
later whatever the fake clock says. Its machines therefore multiply every TTL and clock move
by 1,000: the real clock never reaches an expiry while a machine runs, and the fake clock
still crosses each one.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from fastcheckpoint import CheckpointStore, FileStore
from tests.test_model_checking import ExplicitParentMachine, ManagerMachine

EXAMPLES = {"file": 10, "sqlite": 10, "redis": 8, "redis-cluster-path": 6, "postgres": 5}
"""Examples per machine, about 4 s each on a busy 2-core machine. Before they were settled,
every machine ran 300 examples of 50 steps (and some 100 of 100) without a disagreement."""


def _settings(kind: str) -> settings:
    return settings(
        max_examples=EXAMPLES[kind],
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


class SharedBackingMachine(ExplicitParentMachine):
    """``processes`` stores over one backing, one manager each; every rule of the memory
    machines, explicit parents included."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        super().__init__()

    def open_stores(self) -> list[CheckpointStore]:
        return [self.open_store() for _ in range(self.processes)]

    def open_store(self) -> CheckpointStore:
        raise NotImplementedError


class FileMachine(SharedBackingMachine):
    def open_store(self) -> CheckpointStore:
        return FileStore(self.directory, fsync=False)


class SQLiteMachine(SharedBackingMachine):
    def open_store(self) -> CheckpointStore:
        from fastcheckpoint.stores.sqlite import SQLiteStore

        return SQLiteStore(self.directory / "runs.db", synchronous="normal")


class RedisMachine(SharedBackingMachine):
    TIME_SCALE = 1000.0  # native expiry runs on the server's clock: see the module docstring

    def __init__(self, processes: int, url: str, *, cluster: bool = False) -> None:
        self.url = url
        self.cluster = cluster
        self.prefix = f"fcmodel-{uuid.uuid4().hex[:12]}"
        super().__init__(processes)

    def open_stores(self) -> list[CheckpointStore]:
        self._exit.callback(self.call, self._delete_keys)
        return super().open_stores()

    def open_store(self) -> CheckpointStore:
        import redis.asyncio as aioredis

        from fastcheckpoint.stores.redis import RedisStore

        if not self.cluster:
            return RedisStore.from_url(f"{self.url}?prefix={self.prefix}")
        # The Redis Cluster code path on a plain server: run scripts return their index
        # changes and the store applies them in a second call.
        client = aioredis.Redis.from_url(self.url)
        return RedisStore(client, prefix=self.prefix, cluster=True, owns_client=True)

    async def _delete_keys(self) -> None:
        import redis.asyncio as aioredis

        from tests.stores._redis_support import delete_prefix

        client = aioredis.Redis.from_url(self.url)
        try:
            await delete_prefix(client, self.prefix)
        finally:
            await client.aclose()


class PostgresMachine(SharedBackingMachine):
    """Over a schema provisioned once per test (0.4 s each): every example empties its
    tables afterwards."""

    def __init__(self, processes: int, target: Any, schema: str) -> None:
        self.target = target
        self.schema = schema
        super().__init__(processes)

    def open_stores(self) -> list[CheckpointStore]:
        self._exit.callback(self.call, _empty_schema, self.target, self.schema)
        return super().open_stores()

    def open_store(self) -> CheckpointStore:
        from fastcheckpoint.stores.postgres import PostgresStore

        # Commits need not wait for the disk: this is about what is seen, not what survives.
        return PostgresStore.from_url(
            _postgres_url(self.target, self.schema),
            server_settings={"synchronous_commit": "off"},
        )


def _postgres_url(target: Any, schema: str) -> str:
    return f"{target.url()}?schema={schema}&table_prefix=fc_&max_size=2"


async def _provision(target: Any, schema: str) -> None:
    from fastcheckpoint.stores.postgres import PostgresStore

    store = PostgresStore.from_url(_postgres_url(target, schema))
    try:
        await store.provision()
    finally:
        await store.aclose()


async def _empty_schema(target: Any, schema: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(target.url(), timeout=10)
    try:
        tables = await connection.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = $1 AND tablename <> "
            "'fc_migrations'",
            schema,
        )
        names = ", ".join(f'"{schema}"."{row["tablename"]}"' for row in tables)
        await connection.execute(f"TRUNCATE {names}")
    finally:
        await connection.close()


def _redis_url() -> str:
    pytest.importorskip("redis")
    from tests.stores._redis_servers import SHARED_HOST, SHARED_PORT, answers_ping

    if not answers_ping(SHARED_HOST, SHARED_PORT):
        pytest.skip(f"no Redis answers on {SHARED_HOST}:{SHARED_PORT}")
    return f"redis://{SHARED_HOST}:{SHARED_PORT}/0"


def _postgres_target(config: pytest.Config) -> Any:
    pytest.importorskip("asyncpg")
    from tests.stores._postgres_server import session_target

    return session_target(config)


@contextlib.contextmanager
def postgres_schema(config: pytest.Config) -> Iterator[tuple[Any, str]]:
    """A provisioned schema of its own on the session's PostgreSQL (its target and name),
    dropped afterwards."""
    from tests.stores._postgres_server import drop_schema, unique_schema

    target = _postgres_target(config)
    schema = unique_schema()
    asyncio.run(_provision(target, schema))
    try:
        yield target, schema
    finally:
        asyncio.run(drop_schema(target, schema))


@pytest.fixture
def machine(request: pytest.FixtureRequest) -> Iterator[Callable[[], ManagerMachine]]:
    """What builds the machine of ``(kind, processes)``, each example's backing its own."""
    kind, processes = request.param
    if kind == "file":
        yield lambda: FileMachine(processes)
    elif kind == "sqlite":
        yield lambda: SQLiteMachine(processes)
    elif kind in ("redis", "redis-cluster-path"):
        url = _redis_url()
        yield lambda: RedisMachine(processes, url, cluster=kind != "redis")
    else:
        with postgres_schema(request.config) as (target, schema):
            yield lambda: PostgresMachine(processes, target, schema)


@pytest.mark.parametrize(
    "machine",
    [
        ("sqlite", 1),
        ("redis", 1),
        ("postgres", 1),
        ("file", 2),
        ("sqlite", 2),
        ("redis", 2),
        ("redis-cluster-path", 2),
        ("postgres", 2),
    ],
    indirect=True,
    ids=lambda param: f"{param[0]}-{param[1]}process{'es' if param[1] > 1 else ''}",
)
def test_manager_agrees_with_the_model(
    machine: Callable[[], ManagerMachine], request: pytest.FixtureRequest
) -> None:
    kind = request.node.callspec.params["machine"][0]
    run_state_machine_as_test(machine, settings=_settings(kind))
