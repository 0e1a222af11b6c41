"""DynamoDB+S3: the pin record (``SK = a``) of a run's first append too large for one
transaction. Its first pin transaction puts its write token there, each later one checks
it, and its own transaction deletes it only while it still holds that token: another first
append whose pins took the record meanwhile (they write over this one's) refuses the rest,
so no first append lands naming another's values at the keys it pinned."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from fastcheckpoint.errors import SharedItemGone
from fastcheckpoint.stores import _dynamodb_layout as layout
from fastcheckpoint.stores.dynamodb import DynamoDBStore
from fastcheckpoint.testing._adapter import _append_items, _read
from fastcheckpoint.testing._builders import key_of, make_item, make_run
from tests.stores._moto import moto_endpoint
from tests.stores.dynamodb.test_dynamodb import (
    DEADLINE,
    _raw_item,
    atomic_moto,
    aws_names,
    counting,
    opened,
    provisioned,
    store,
)
from tests.stores.dynamodb.test_dynamodb_grace_review import _first_transaction
from tests.stores.dynamodb.test_dynamodb_stale_pins import _emptied, _sort_keys, anyio_backend

__all__ = ["anyio_backend", "atomic_moto", "aws_names", "moto_endpoint", "provisioned",
           "store"]

pytestmark = pytest.mark.anyio

# 47 fit in a first append's transaction: the other 63 take two pin transactions (49, 14).
MANY = [f"m/{index:03}" for index in range(110)]


def _pin_record_operation(operations: list[dict[str, Any]]) -> str | None:
    """What a transaction does to the pin record: ``Put``, ``ConditionCheck``, ``Delete``."""
    for operation in operations:
        for kind, body in operation.items():
            if kind in {"Put", "ConditionCheck", "Delete"}:
                sort_key = (body["Item"] if kind == "Put" else body["Key"])["SK"]["S"]
                if sort_key == layout.PIN_SK:
                    return kind
    return None


async def test_a_first_append_s_pins_take_check_and_release_the_pin_record(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """110 items: 47 in the transaction, 63 in two pin transactions of 49 and 14 items. The
    first pin transaction puts the pin record, the second checks it (one operation each,
    beside the check of no run item: 49 items still fill one, 100 operations), the append's
    own transaction deletes it: 3 requests, as without the record, and none is left."""
    run = make_run("pin-record")
    key = key_of(run)
    transact = store._transact
    sent: list[list[dict[str, Any]]] = []

    async def recording(operations: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(list(operations))
        return await transact(operations, *args, **kwargs)

    try:
        with anyio.fail_after(DEADLINE):
            await _emptied(store, key, monkeypatch)
            await store.clients()
            monkeypatch.setattr(store, "_transact", recording)
            with counting(store) as (dynamo, s3):
                await _append_items(store, run, 0, refs=MANY,
                                    items=[make_item(name, b"v") for name in MANY])
            monkeypatch.undo()
            assert (dynamo.counts, s3.counts) == ({"TransactWriteItems": 3}, {})
            assert [_pin_record_operation(operations) for operations in sent] == [
                "Put", "ConditionCheck", "Delete"]
            assert [len(operations) for operations in sent[:2]] == [100, 2 + 2 * 14]
            assert layout.PIN_SK not in await _sort_keys(store, key)
            store._families.pop(key, None)
            read = await _read(store, run, None)
            assert read is not None
            assert read[2] == dict.fromkeys(MANY, b"v")
    finally:
        monkeypatch.setattr(store, "_transact", transact)
        await _emptied(store, key, monkeypatch)


async def test_a_first_append_whose_pin_record_another_took_lands_nothing_more(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch, provisioned: str,
    aws_names: tuple[str, str],
) -> None:
    """Two processes begin the run's first checkpoint with the same 110 keys. The first has
    sent its first pin transaction when the second pins them all (over the first's values)
    and is held before its own transaction. The first's second pin transaction is refused
    by the pin record (``SharedItemGone``, its transaction never sent); the second lands
    and reads back its own values at every key. Before, the second's pins were dropped over
    the first's (younger than the grace), the first's went on and landed, and the second
    was refused."""
    run = make_run("pin-record-race")
    key = key_of(run)
    transact = store._transact
    try:
        with anyio.fail_after(DEADLINE):
            await _emptied(store, key, monkeypatch)
            async with opened(provisioned, aws_names) as other, \
                    anyio.create_task_group() as group:
                other_transact = other._transact
                pinned, refused = anyio.Event(), anyio.Event()
                first_sent: list[list[dict[str, Any]]] = []

                async def held(operations: Any, *args: Any, **kwargs: Any) -> Any:
                    if _first_transaction(operations):
                        pinned.set()
                        await refused.wait()
                    return await other_transact(operations, *args, **kwargs)

                async def second() -> None:
                    await _append_items(other, run, 0, refs=MANY,
                                        items=[make_item(name, b"second") for name in MANY])

                async def overtaken(operations: Any, *args: Any, **kwargs: Any) -> Any:
                    first_sent.append(list(operations))
                    if len(first_sent) == 2:  # its second pin transaction
                        group.start_soon(second)
                        await pinned.wait()
                    return await transact(operations, *args, **kwargs)

                monkeypatch.setattr(other, "_transact", held)
                monkeypatch.setattr(store, "_transact", overtaken)
                try:
                    with pytest.raises(SharedItemGone):
                        await _append_items(store, run, 0, refs=MANY, items=[
                            make_item(name, b"first") for name in MANY])
                finally:
                    refused.set()  # the second goes on, whatever the first did
            # Its own transaction was never sent (then only the undo of its raises, refused:
            # its life never began).
            assert not any(_first_transaction(operations) for operations in first_sent)
            monkeypatch.undo()
            store._families.pop(key, None)
            read = await _read(store, run, None)
            assert read is not None
            assert read[2] == dict.fromkeys(MANY, b"second")
            assert await _raw_item(store, key, layout.PIN_SK) is None
    finally:
        monkeypatch.setattr(store, "_transact", transact)
        await _emptied(store, key, monkeypatch)
