"""The differential machines of the OpenAI Agents, Google ADK and Agent Framework adapters
on the server stores: SQLite, Redis (also through the Redis Cluster code path, on the plain
server), PostgreSQL, S3 and DynamoDB with S3 (both on the session's moto server).

The machines are those of ``test_openai_agents_differential.py`` (``FastSession`` against
``SQLiteSession``), ``test_google_adk_differential.py`` (``FastSessionService`` against
``InMemorySessionService``) and ``test_agent_framework_differential.py``
(``FastCheckpointStorage`` against ``InMemoryCheckpointStorage``), each given stores over a
backing of the example's own: a SQLite file in a fresh directory, a Redis key prefix (its
keys deleted afterwards), a PostgreSQL schema of the test's own (emptied after each
example, dropped at the end), an S3 key prefix, a DynamoDB table. Each object a machine
calls "another process" has a store object of its own over that backing: the two
``FastSession`` objects of a session id, the two ``FastSessionService`` instances, and the
Agent Framework storage after each ``reopen``. What a store object keeps between calls
(connections, statement caches, the DynamoDB and S3 stores' run caches) thus meets a
writer it does not know about.

The clock: every store but Redis decides expiry by the ``now`` each call carries (the
machine's fake clock). Redis also expires its keys natively, on the server's real clock, so
its machines multiply the TTL and every clock move by 1,000: the real clock never reaches
an expiry while a machine runs, and the fake one still crosses each.

``ADSRV_EXAMPLES=N`` runs N random examples per machine and store (hunting: hundreds),
``ADSRV_STEPS=N`` N steps each; the default runs a few fixed examples (derandomized), the
whole file in about half a minute.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

pytest.importorskip("agents")
pytest.importorskip("google.adk")
pytest.importorskip("agent_framework")

from fastcheckpoint.stores import CheckpointStore
from tests._backings import (
    Backing,
    DynamoDBBacking,
    PostgresBacking,
    RedisBacking,
    S3Backing,
    SQLiteBacking,
)
from tests.integrations.test_agent_framework_differential import ExpiringStorageMachine
from tests.integrations.test_google_adk_differential import ServiceMachine
from tests.integrations.test_openai_agents_differential import SessionMachine
from tests.stores._moto import REGION, moto_endpoint, unique_name  # noqa: F401
from tests.test_model_checking_stores import _redis_url, postgres_schema

KINDS = ("sqlite", "redis", "redis-cluster-path", "postgres", "s3", "dynamodb")
MOTO_KINDS = ("s3", "dynamodb")
EXAMPLES = {"openai": 2, "adk": 4, "agent-framework": 2}
"""Examples per machine and store in CI, on SQLite, Redis and PostgreSQL; one on moto,
whose every request is an HTTP round trip served one at a time. Before they were settled,
every machine ran 300 examples on SQLite, Redis and PostgreSQL and 25 to 60 on moto."""
STEPS = {"openai": 15, "adk": 15, "agent-framework": 12}
MOTO_STEPS = {"openai": 10, "adk": 15, "agent-framework": 4}


def _settings(adapter: str, kind: str) -> settings:
    moto = kind in MOTO_KINDS
    return settings(
        max_examples=int(os.environ.get("ADSRV_EXAMPLES", 1 if moto else EXAMPLES[adapter])),
        stateful_step_count=int(os.environ.get(
            "ADSRV_STEPS", (MOTO_STEPS if moto else STEPS)[adapter])),
        deadline=None,
        derandomize="ADSRV_EXAMPLES" not in os.environ,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                               HealthCheck.data_too_large],
    )


SMALL_THRESHOLD = 200
"""A DynamoDB threshold most checkpoints exceed: their payloads go to the bucket."""


class Place:
    """Where a test's examples keep their data: each example gets a backing of its own
    there (``backing(machine)``)."""

    def __init__(self, backing: Callable[[Any], Backing], time_scale: float = 1.0) -> None:
        self.backing = backing
        self.time_scale = time_scale


def _attached(machine: Any, place: Place) -> Backing:
    """The example's backing, prepared, and removed when ``machine`` ends (after its stores
    are closed: ``_exit`` runs after the machine's ``teardown`` closes them)."""
    backing = place.backing(machine)
    machine._exit.callback(machine.call, backing.clean)
    machine.call(backing.prepare)
    return backing


# -- the machines, on a backing -----------------------------------------------------------------


class SessionsOnBacking(SessionMachine):
    """The OpenAI Agents machine: the two objects of each session id on two stores."""

    def __init__(self, place: Place) -> None:
        self.place = place
        self.TIME_SCALE = place.time_scale
        super().__init__()

    def open_stores(self) -> list[CheckpointStore]:
        backing = _attached(self, self.place)
        return [backing.open(), backing.open()]


class ServicesOnBacking(ServiceMachine):
    """The Google ADK machine: its two services on two stores."""

    def __init__(self, place: Place) -> None:
        self.place = place
        self.TIME_SCALE = place.time_scale
        super().__init__()

    def open_stores(self) -> list[CheckpointStore]:
        backing = _attached(self, self.place)
        return [backing.open(), backing.open()]


class StorageOnBacking(ExpiringStorageMachine):
    """The Agent Framework machine with a TTL: each ``reopen`` opens a new store object."""

    def __init__(self, place: Place) -> None:
        self.place = place
        self.TIME_SCALE = place.time_scale
        self.backing: Backing | None = None
        super().__init__()

    def open_store(self) -> CheckpointStore:
        if self.backing is None:
            self.backing = _attached(self, self.place)
        return self.backing.open()


MACHINES: dict[str, type[Any]] = {
    "openai": SessionsOnBacking, "adk": ServicesOnBacking, "agent-framework": StorageOnBacking}


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bucket(request: pytest.FixtureRequest) -> tuple[str, str]:
    """``(endpoint, bucket)``: a bucket on the session's moto server for this module."""
    pytest.importorskip("aiobotocore")
    pytest.importorskip("moto")
    from fastcheckpoint.stores.s3 import S3Store

    endpoint: str = request.getfixturevalue("moto_endpoint")
    name = unique_name("adsrv")

    async def provision() -> None:
        store = S3Store(name, region=REGION, endpoint_url=endpoint)
        try:
            await store.provision()
        finally:
            await store.aclose()

    asyncio.run(provision())
    return endpoint, name


@pytest.fixture
def place(request: pytest.FixtureRequest) -> Iterator[Place]:
    """Where the examples of the test's store kind keep their data."""
    kind = request.node.callspec.params["kind"]
    if kind == "sqlite":
        yield Place(lambda machine: SQLiteBacking(machine.directory))
    elif kind in ("redis", "redis-cluster-path"):
        url = _redis_url()
        # Native expiry runs on the server's clock: see the module docstring.
        yield Place(lambda machine: RedisBacking(url, cluster=kind != "redis", tag="fcadsrv"),
                    1000.0)
    elif kind == "postgres":
        with postgres_schema(request.config) as (target, schema):
            yield Place(lambda machine: PostgresBacking(target, schema))
    elif kind == "s3":
        endpoint, name = request.getfixturevalue("bucket")
        yield Place(lambda machine: S3Backing(endpoint, name, tag="adsrv"))
    else:
        endpoint, name = request.getfixturevalue("bucket")
        yield Place(lambda machine: DynamoDBBacking(
            endpoint, name, threshold=SMALL_THRESHOLD, tag="adsrv"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("adapter", list(MACHINES))
def test_adapter_agrees_with_its_framework(adapter: str, kind: str, place: Place) -> None:
    machine = MACHINES[adapter]
    run_state_machine_as_test(lambda: machine(place), settings=_settings(adapter, kind))


# -- what the machines found, each pinned by a deterministic test ------------------------------


def test_a_session_read_racing_another_process_change_on_dynamodb(
    bucket: tuple[str, str],
) -> None:
    """The two objects of a session, on two DynamoDB stores (two processes) whose
    checkpoints' payloads live in S3: one reads the session while the other adds an item.
    The read must give the session before or after the change; it raised
    ``CorruptCheckpointError`` (the payload object is missing)."""
    from fastcheckpoint.integrations.openai_agents import FastSession

    first = {"role": "user", "content": "x" * 300}
    second = {"role": "assistant", "content": "y" * 300}

    async def scenario() -> None:
        backing = DynamoDBBacking(*bucket, threshold=SMALL_THRESHOLD, tag="adsrv")
        await backing.prepare()
        reading_store, writing_store = backing.open(), backing.open()
        reader = FastSession("s", reading_store)
        writer = FastSession("s", writing_store)
        try:
            await writer.add_items([first])
            fetch = reading_store._bucket  # type: ignore[attr-defined]

            async def fetch_after_a_change() -> Any:
                # The reader has the checkpoint item: the other process changes the session.
                reading_store._bucket = fetch  # type: ignore[attr-defined]
                await writer.add_items([second])
                return await fetch()

            reading_store._bucket = fetch_after_a_change  # type: ignore[attr-defined]
            assert await reader.get_items() in ([first], [first, second])
        finally:
            await reading_store.aclose()
            await writing_store.aclose()

    asyncio.run(scenario())
