"""DynamoDB+S3: a read that finds a record naming an S3 object, then finds the object gone
because another process removed the record meanwhile (a newer checkpoint pruned it, the
items were deleted), reads again and returns what is there now. Only an object missing
under a record that still names it is damage (``CorruptCheckpointError``).

Each race is made deterministic: the reading store's first fetch from S3 first lets the
other store (another process, in effect) make its change."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest

from fastcheckpoint.errors import CorruptCheckpointError
from fastcheckpoint.stores.dynamodb import DynamoDBStore
from fastcheckpoint.testing import T0, key_of, make_checkpoint, make_item, make_run
from fastcheckpoint.testing._adapter import _append_items
from tests.stores._moto import moto_endpoint, unique_name  # noqa: F401 (fixture)
from tests.stores.dynamodb.test_dynamodb import (  # noqa: F401 (fixtures)
    DEADLINE,
    atomic_moto,
    aws_names,
    opened,
    provisioned,
)

pytestmark = pytest.mark.anyio

_BIG = 2_000  # above the stores' threshold below: payloads and values go to S3
_THRESHOLD = 500


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


@pytest.fixture
async def two(
    provisioned: str, aws_names: tuple[str, str],  # noqa: F811
) -> AsyncIterator[tuple[DynamoDBStore, DynamoDBStore]]:
    """Two store objects over one table, bucket and prefix: two processes."""
    names = (unique_name("superseded"), aws_names[1])
    prefix = f"{unique_name('p')}/"
    async with opened(provisioned, names, prefix=prefix, threshold=_THRESHOLD) as reader:
        with anyio.fail_after(30):
            await reader.provision()
        async with opened(provisioned, names, prefix=prefix, threshold=_THRESHOLD) as writer:
            yield reader, writer


def _change_before_first_fetch(store: DynamoDBStore, change: Callable[[], Awaitable[Any]],
                               ) -> list[str]:
    """Make ``store``'s next S3 fetch wait for ``change`` (by another store) first; the list
    returned records that it ran."""
    ran: list[str] = []
    bucket = store._bucket

    async def changed_first() -> Any:
        store._bucket = bucket  # type: ignore[method-assign]
        await change()
        ran.append("changed")
        return await bucket()

    store._bucket = changed_first  # type: ignore[method-assign]
    return ran


async def test_latest_racing_a_pruning_append_returns_the_newer_checkpoint(
    two: tuple[DynamoDBStore, DynamoDBStore],
) -> None:
    reader, writer = two
    run = make_run("pruned-while-read")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await writer.append(key, make_checkpoint(run, 0, payload=b"0" * _BIG), run=run,
                            keep_latest=1, now=T0)
        newer = make_checkpoint(run, 1, payload=b"1" * _BIG)
        ran = _change_before_first_fetch(reader, lambda: writer.append(
            key, newer, run=run, keep_latest=1, now=T0))
        found = await reader.latest(key, now=T0)
    assert ran == ["changed"]
    assert found is not None
    assert (found[0].sequence, found[0].payload) == (1, newer.payload)


async def test_get_racing_a_pruning_append_finds_the_checkpoint_gone(
    two: tuple[DynamoDBStore, DynamoDBStore],
) -> None:
    reader, writer = two
    run = make_run("pruned-while-got")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await writer.append(key, make_checkpoint(run, 0, payload=b"0" * _BIG), run=run,
                            keep_latest=1, now=T0)
        ran = _change_before_first_fetch(reader, lambda: writer.append(
            key, make_checkpoint(run, 1, payload=b"1" * _BIG), run=run, keep_latest=1,
            now=T0))
        assert await reader.get(key, 0, now=T0) is None
    assert ran == ["changed"]


async def test_read_with_items_racing_a_pruning_append_reads_the_newer_checkpoint(
    two: tuple[DynamoDBStore, DynamoDBStore],
) -> None:
    reader, writer = two
    run = make_run("pruned-while-read-whole")
    with anyio.fail_after(DEADLINE):
        await _append_items(writer, run, 0, items=[make_item("a", b"a" * _BIG, owner=0)],
                            keep_latest=1)
        ran = _change_before_first_fetch(reader, lambda: _append_items(
            writer, run, 1, items=[make_item("b", b"b" * _BIG, owner=1)], keep_latest=1))
        found = await reader.read_with_items(key_of(run), sequence=None, now=T0)
    assert ran == ["changed"]
    assert found is not None
    assert (found[0].sequence, found[2]) == (1, {"b": b"b" * _BIG})


async def test_get_items_racing_their_delete_finds_them_gone(
    two: tuple[DynamoDBStore, DynamoDBStore],
) -> None:
    reader, writer = two
    run = make_run("deleted-while-read")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await _append_items(writer, run, 0, refs=["s"], items=[make_item("s", b"s" * _BIG)])
        ran = _change_before_first_fetch(reader, lambda: writer.delete_items(key, ["s"]))
        assert await reader.get_items(key, ["s"], now=T0) == {}
    assert ran == ["changed"]


async def test_a_payload_object_missing_under_its_record_is_still_damage(
    two: tuple[DynamoDBStore, DynamoDBStore],
) -> None:
    reader, writer = two
    run = make_run("object-lost")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await writer.append(key, make_checkpoint(run, 0, payload=b"0" * _BIG), run=run,
                            keep_latest=None, now=T0)
        bucket = await reader._bucket()

        class Emptied:
            async def get(self, name: str) -> None:
                return None  # the object is gone; the record still names it

            def __getattr__(self, name: str) -> Any:
                return getattr(bucket, name)

        async def emptied() -> Any:
            return Emptied()

        reader._bucket = emptied  # type: ignore[method-assign]
        with pytest.raises(CorruptCheckpointError, match=r"payload object .* is missing"):
            await reader.latest(key, now=T0)
