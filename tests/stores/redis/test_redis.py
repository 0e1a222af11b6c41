"""The store contract on RedisStore: plain Redis, the cluster code path, and a real cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from fastcheckpoint.stores import CheckpointStore
from fastcheckpoint.stores.redis import RedisStore
from fastcheckpoint.testing import (
    DamageRunRecord,
    LabelsContract,
    NestedItemsContract,
    RepairContract,
    SequenceGuardContract,
    SharedItemsContract,
    StoreContract,
)
from tests.stores._redis_servers import PrivateCluster
from tests.stores._redis_support import delete_prefix, make_store, unique_prefix
from tests.stores.conftest import RedisTarget


@pytest.fixture
def anyio_backend() -> str:
    # redis.asyncio runs on asyncio only.
    return "asyncio"


async def _closed(store: RedisStore, prefix: str) -> None:
    with anyio.fail_after(30):
        await delete_prefix(store._client, prefix)
        await store.aclose()


async def _garble_run_hash(store: CheckpointStore, run_key: str) -> None:
    """Overwrite the run hash's fields in place with bytes that are not what they should be,
    as a foreign writer or an operator's mistake would."""
    assert isinstance(store, RedisStore)
    await store._client.hset(f"{store._ns}{{{run_key}}}:run", mapping={
        "inc": b"\xff\x00??", "ls": b"-x-", "ct": b"yesterday", "m": b"\x00"})


class TestRedisStore(
    StoreContract, RepairContract, LabelsContract, SharedItemsContract, NestedItemsContract,
    SequenceGuardContract,
):
    """Plain Redis: every script also updates the global indexes itself."""

    deadline_seconds = 30.0

    @pytest.fixture
    async def store(self, redis_target: RedisTarget) -> AsyncIterator[CheckpointStore]:
        prefix = unique_prefix(redis_target)
        store = make_store(redis_target, prefix)
        yield store
        await _closed(store, prefix)

    @pytest.fixture
    def damage_run_record(self) -> DamageRunRecord:
        return _garble_run_hash


class TestRedisStoreClusterCodePath(
    StoreContract, RepairContract, LabelsContract, SharedItemsContract, NestedItemsContract,
    SequenceGuardContract,
):
    """The Redis Cluster code path on a plain server: run scripts touch only their run's slot
    and return index changes, which the client applies in a second call."""

    deadline_seconds = 30.0

    @pytest.fixture
    async def store(self, redis_target: RedisTarget) -> AsyncIterator[CheckpointStore]:
        prefix = unique_prefix(redis_target)
        store = make_store(redis_target, prefix, cluster=True)
        yield store
        await _closed(store, prefix)

    @pytest.fixture
    def damage_run_record(self) -> DamageRunRecord:
        return _garble_run_hash


class TestRedisStoreOnCluster(
    StoreContract, RepairContract, LabelsContract, SharedItemsContract, NestedItemsContract,
    SequenceGuardContract,
):
    """A real three-primary Redis Cluster: cross-slot scripts would fail here."""

    deadline_seconds = 30.0

    @pytest.fixture
    async def store(self, redis_cluster: PrivateCluster) -> AsyncIterator[CheckpointStore]:
        store = RedisStore.from_url(f"{redis_cluster.url}?prefix=contract")
        yield store
        with anyio.fail_after(30):
            # A private cluster: clearing every node between tests is ours to do.
            for node in store._client.get_primaries():
                await store._client.execute_command("FLUSHALL", target_nodes=node)
            await store.aclose()

    @pytest.fixture
    def damage_run_record(self) -> DamageRunRecord:
        return _garble_run_hash
