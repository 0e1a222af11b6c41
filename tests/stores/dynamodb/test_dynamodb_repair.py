"""Damaged run items of the DynamoDB store: the shared repair contract, and what is particular
to DynamoDB (a damaged book alone, the cleanup loop meeting a damaged run, rebuilding a run
longer than a book details)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import pytest

from fastcheckpoint.errors import CorruptCheckpointError
from fastcheckpoint.stores import CheckpointStore
from fastcheckpoint.stores import _dynamodb_layout as layout
from fastcheckpoint.stores.dynamodb import DynamoDBStore
from fastcheckpoint.testing import RepairContract
from fastcheckpoint.testing._builders import (
    T0,
    checkpoint_id_of,
    key_of,
    make_checkpoint,
    make_item,
    make_run,
)
from fastcheckpoint.testing._repair import DamageRunRecord
from tests.stores._moto import moto_endpoint, unique_name
from tests.stores.dynamodb.test_dynamodb import (
    DEADLINE,
    _raw_item,
    atomic_moto,
    aws_names,
    opened,
    provisioned,
)

__all__ = ["atomic_moto", "aws_names", "moto_endpoint", "provisioned"]

pytestmark = pytest.mark.anyio

_RECORD_ATTRIBUTES = ("rid", "inc", "st", "ca", "ua", "ls", "cnt", "ver", "dat", "rev", "bk")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


async def _garble(store: DynamoDBStore, run_key: str, attributes: tuple[str, ...]) -> None:
    """Overwrite attributes of the run item with random bytes, behind the store's back."""
    ddb, _ = await store.clients()
    names = {f"#a{index}": name for index, name in enumerate(attributes)}
    await ddb.update_item(
        TableName=store.table,
        Key={"PK": {"S": layout.partition(run_key)}, "SK": {"S": layout.RUN_SK}},
        UpdateExpression="SET " + ", ".join(f"{name} = :garbage" for name in names),
        ConditionExpression="attribute_exists(PK)",
        ExpressionAttributeNames=names,
        ExpressionAttributeValues={":garbage": {"B": os.urandom(24)}},
    )


@pytest.fixture
async def fresh_table(provisioned: str, aws_names: tuple[str, str]) -> AsyncIterator[
    DynamoDBStore
]:
    """A store on a table of its own: repair reads every run of the table."""
    async with opened(provisioned, (unique_name("repair"), aws_names[1])) as store:
        with anyio.fail_after(30):
            await store.provision()
        yield store


class TestDynamoDBRepair(RepairContract):
    deadline_seconds = DEADLINE

    @pytest.fixture
    async def store(self, fresh_table: DynamoDBStore) -> AsyncIterator[CheckpointStore]:
        return fresh_table

    @pytest.fixture
    def damage_run_record(self) -> DamageRunRecord:
        async def damage(store: CheckpointStore, run_key: str) -> None:
            assert isinstance(store, DynamoDBStore)
            await _garble(store, run_key, _RECORD_ATTRIBUTES)

        return damage


async def test_a_damaged_book_alone_blocks_appends_until_rebuilt(
    fresh_table: DynamoDBStore,
) -> None:
    store = fresh_table
    run = make_run("book-only")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        for sequence in range(3):
            await store.append(key, make_checkpoint(run, sequence), run=run, keep_latest=None,
                               now=T0)
        await _garble(store, key, ("bk",))

        found = await store.get(key, 1, now=T0)
        assert found is not None
        assert found[1] == "active"
        with pytest.raises(CorruptCheckpointError, match="unreadable") as caught:
            await store.append(key, make_checkpoint(run, 3), run=run, keep_latest=None, now=T0)
        assert caught.value.key.endswith(f"{layout.partition(key)}/{layout.RUN_SK}")
        [damage] = await store.damaged_runs(now=T0)
        assert (damage.run_key, damage.checkpoints) == (key, 3)

        rebuilt = await store.rebuild_run(
            key, msgspec.structs.replace(run, status="active"), now=T0 + 1)
        assert (rebuilt.latest_sequence, rebuilt.checkpoint_count) == (2, 3)
        await store.append(key, make_checkpoint(run, 3), run=run, keep_latest=None, now=T0 + 1)
        assert await store.damaged_runs(now=T0 + 1) == []


async def test_cleanup_removes_expired_checkpoints_of_a_damaged_run_and_finishes(
    fresh_table: DynamoDBStore,
) -> None:
    store = fresh_table
    run = make_run("damaged-and-expiring")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await store.append(key, make_checkpoint(run, 0), run=run, keep_latest=None, now=T0)
        await store.append(key, make_checkpoint(run, 1, expires_at=T0 + 5), run=run,
                           keep_latest=None, now=T0)
        await _garble(store, key, _RECORD_ATTRIBUTES)

        assert await store.cleanup_expired() == 0  # ends, though the run cannot be purged
        assert await _raw_item(store, key, layout.checkpoint_sk(1)) is None
        assert await _raw_item(store, key, layout.checkpoint_sk(0)) is not None
        assert await store.purge_expired(now=T0 + 5, limit=10) == (0, True)


async def test_rebuild_of_a_run_longer_than_the_book_details(
    fresh_table: DynamoDBStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = fresh_table
    monkeypatch.setattr(store, "_book_capacity", 4)
    run = make_run("long-damaged")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        for sequence in range(12):
            await store.append(key, make_checkpoint(run, sequence, expires_at=T0 + 100 + sequence),
                               run=run, keep_latest=None, now=T0)
        await store.put_items(key, [make_item("of-0", owner=0), make_item("of-11", owner=11)],
                              now=T0)
        await _garble(store, key, _RECORD_ATTRIBUTES)

        rebuilt = await store.rebuild_run(key, msgspec.structs.replace(run, data=b"x"), now=T0)

        assert (rebuilt.latest_sequence, rebuilt.checkpoint_count) == (11, 12)
        assert rebuilt.expires_at == T0 + 111
        raw: Any = await _raw_item(store, key, layout.RUN_SK)
        book = layout.BOOK_DECODER.decode(raw["bk"]["B"])
        assert book.back is not None  # the front details 4 entries, the back counts the rest
        assert {int(owner) for owner in raw["own"]["NS"]} == {0, 11}
        # Pruning after the rebuild still takes the owned items with their checkpoint.
        await store.append(key, make_checkpoint(run, 12, expires_at=T0 + 200), run=run,
                           keep_latest=12, now=T0)
        assert await store.get_items(key, ["of-0", "of-11"], now=T0) == {"of-11": b"value-of-11"}
        assert await store.get(key, 0, now=T0) is None
        assert await store.delete(key, 11, checkpoint_id=checkpoint_id_of(run, 11))
