"""DynamoDB+S3: pins (shared items and counts an append writes before its transaction) left
by a run's first append that failed with no answer, once no append can be under way with
them (``PIN_GRACE_SECONDS`` after they were written, by the wall clock, which these tests
move): ``delete_run`` of the run key with no run item removes them, and a new life's first
append writing their keys replaces them. Younger pins stay for a first append that may be
under way."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import anyio
import pytest

from fastcheckpoint.stores import RunRecord
from fastcheckpoint.stores import _dynamodb_items as items_layout
from fastcheckpoint.stores import _dynamodb_layout as layout
from fastcheckpoint.stores import dynamodb as dynamodb_module
from fastcheckpoint.stores.dynamodb import DynamoDBStore
from fastcheckpoint.testing._adapter import _append_items, _read, _stored
from fastcheckpoint.testing._builders import T0, key_of, make_item, make_run
from tests.stores._moto import moto_endpoint
from tests.stores.dynamodb.test_dynamodb import (
    DEADLINE,
    _raw_item,
    atomic_moto,
    aws_names,
    counting,
    provisioned,
    store,
)

__all__ = ["atomic_moto", "aws_names", "moto_endpoint", "provisioned", "store"]

pytestmark = pytest.mark.anyio

NAMES = [f"s/{index:02}" for index in range(60)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


@pytest.fixture
def key() -> str:
    return key_of(make_run("stale-pins"))


async def _fail_first_append_after_its_pins(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch, value: bytes, *,
    run: RunRecord | None = None, names: Sequence[str] = NAMES,
) -> None:
    """A run's first checkpoint (of ``run``, else of the run key ``stale-pins``) naming and
    writing ``names`` (the 60 of ``NAMES``): its first pin transaction lands (putting the
    pin record), and its reply is lost; the append fails with its raises left."""
    transact = store._transact
    lost: list[int] = []

    async def reply_lost(operations: Any, *args: Any, **kwargs: Any) -> Any:
        result = await transact(operations, *args, **kwargs)
        if not lost:
            lost.append(len(operations))
            raise dynamodb_module.StoreUnavailableError("connection reset")
        return result

    monkeypatch.setattr(store, "_transact", reply_lost)
    with pytest.raises(dynamodb_module.StoreUnavailableError):
        await _append_items(store, run or make_run("stale-pins"), 0, refs=names,
                            items=[make_item(name, value) for name in names])
    monkeypatch.setattr(store, "_transact", transact)
    assert lost


def _past_the_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    later = time.time() + items_layout.PIN_GRACE_SECONDS + 60
    monkeypatch.setattr(dynamodb_module, "_wall_clock", lambda: later)


async def _sort_keys(store: DynamoDBStore, run_key: str) -> list[str]:
    return [entry["SK"]["S"] for entry in await store._partition(run_key)]


async def _emptied(store: DynamoDBStore, run_key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run key emptied, young pins too (``delete_run`` keeps those): the session's
    table is shared, and other tests of this key leave pins behind (stamped by a clock
    moved past the grace, hence a clock moved twice as far)."""
    monkeypatch.undo()
    later = time.time() + 3 * items_layout.PIN_GRACE_SECONDS
    monkeypatch.setattr(dynamodb_module, "_wall_clock", lambda: later)
    await store.delete_run(run_key)
    monkeypatch.undo()
    assert await _sort_keys(store, run_key) == []


async def _pin_raise(store: DynamoDBStore, run_key: str, item_key: str) -> None:
    """What a first append under way that names ``item_key`` without writing it sends before
    its transaction: the raise of its count, checked against no run item, stamped now."""
    await store._transact([
        dynamodb_module._pin_check(run_key, None),
        items_layout.pin_stamped(items_layout.counter_raise(run_key, item_key, 1, writing=False),
                                 dynamodb_module._wall_clock()),
    ])


def _sort_keys_of(operations: list[dict[str, Any]]) -> list[str]:
    """The sort keys a transaction's operations write or check."""
    return [next(iter(operation.values()))["Key"]["SK"]["S"] if "Put" not in operation
            else operation["Put"]["Item"]["SK"]["S"]
            for operation in operations]


def _pin_before_the_delete_of(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch, run_key: str, item_key: str
) -> list[str]:
    """Before ``delete_run``'s first transaction deleting ``item_key``'s item, the pin of
    ``item_key`` (see :func:`_pin_raise`); returns the sort keys of that transaction's
    operations, once it is sent."""
    transact = store._transact
    sent: list[str] = []
    doomed = layout.item_sk(item_key)

    async def pinning(operations: Any, *args: Any, **kwargs: Any) -> Any:
        if not sent and any(operation.get("Delete", {}).get("Key", {}).get("SK") == {"S": doomed}
                            for operation in operations):
            sent.extend(_sort_keys_of(operations))
            await _pin_raise(store, run_key, item_key)
        return await transact(operations, *args, **kwargs)

    monkeypatch.setattr(store, "_transact", pinning)
    return sent


async def test_delete_run_with_no_run_item_removes_pins_older_than_the_grace(
    store: DynamoDBStore, key: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, ``delete_run`` with no run item left every count and the item it counts:
    a run key that never got a life kept them for good. Pinned less than the grace ago, they
    stay (a first append may be under way with them); older, they go, in one Query and one
    TransactWriteItems per 99 records, as any run's records."""
    try:
        with anyio.fail_after(DEADLINE):
            await _fail_first_append_after_its_pins(store, monkeypatch, b"old")
            pinned = await _sort_keys(store, key)
            assert layout.counter_sk("s/59") in pinned
            await store.delete_run(key)
            assert await _sort_keys(store, key) == pinned  # young: kept
            _past_the_grace(monkeypatch)
            with counting(store) as (dynamo, _):
                await store.delete_run(key)
            assert await _sort_keys(store, key) == []
            assert dynamo.counts["Query"] == 1
            assert dynamo.counts["TransactWriteItems"] == -(-len(pinned) // 99)
            assert "DeleteItem" not in dynamo.counts
    finally:
        await _emptied(store, key, monkeypatch)


async def test_a_pin_landing_after_delete_run_read_the_partition_keeps_its_item_and_count(
    store: DynamoDBStore, key: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``delete_run`` reads stale pins; before its transaction, a new first append pins
    ``s/59`` again (its count raised, stamped now). Each delete of a pin holds only while it
    is stale: the count's is refused, and the item's goes with it (one group); the others
    are deleted in the transaction sent again (one TransactWriteItems more, on that path)."""
    try:
        with anyio.fail_after(DEADLINE):
            await _fail_first_append_after_its_pins(store, monkeypatch, b"old")
            _past_the_grace(monkeypatch)
            _pin_before_the_delete_of(store, monkeypatch, key, "s/59")
            with counting(store) as (dynamo, _):
                await store.delete_run(key)
            assert sorted(await _sort_keys(store, key)) == [
                layout.counter_sk("s/59"), layout.item_sk("s/59")]
            # The repin, delete_run's transaction refused, and sent again without s/59.
            assert dynamo.counts["TransactWriteItems"] == 3
            count = await _raw_item(store, key, layout.counter_sk("s/59"))
            assert count is not None
            assert count["rc"] == {"N": "2"}
    finally:
        await _emptied(store, key, monkeypatch)


@pytest.mark.parametrize("grace", ["past", "within"])
async def test_a_new_life_s_first_append_reads_back_its_own_values_at_the_keys_it_pins(
    store: DynamoDBStore, key: str, monkeypatch: pytest.MonkeyPatch, grace: str,
) -> None:
    """A failed first append's pins sit at the keys a new first append pins (it writes the
    same 60 keys, too many for its transaction). Older than the grace, they are replaced:
    before, each of its pin puts was dropped (a live item there) and its acknowledged
    checkpoint read back the failed append's values. Within the grace (after a
    ``delete_run``, which keeps them), they are kept at the keys it pins (those in its
    transaction take its own): the case left open."""
    try:
        with anyio.fail_after(DEADLINE):
            await _fail_first_append_after_its_pins(store, monkeypatch, b"old")
            if grace == "past":
                _past_the_grace(monkeypatch)
            else:
                await store.delete_run(key)
            await _append_items(store, make_run("stale-pins", created_at=T0 + 20), 0,
                                refs=NAMES, now=T0 + 20,
                                items=[make_item(name, b"new") for name in NAMES])
            # Read as another process would: moto takes 25 TransactGetItems (AWS, 100).
            store._families.pop(key, None)
            read = await _read(store, make_run("stale-pins"), None, now=T0 + 20)
            assert read is not None
            assert {name: read[2].get(name) for name in NAMES} == dict.fromkeys(NAMES, b"new")
    finally:
        await _emptied(store, key, monkeypatch)


async def test_a_first_append_keeps_a_loose_item_at_a_key_it_writes(
    store: DynamoDBStore, key: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A first append replaces only items an append wrote: a loose item of ``put_items``
    (which a new life holds) is kept as it is, as by every write."""
    try:
        with anyio.fail_after(DEADLINE):
            await store.put_items(key, [make_item("s/00", b"loose")], now=T0)
            await _append_items(store, make_run("stale-pins"), 0, refs=["s/00"],
                                items=[make_item("s/00", b"new")])
            assert await _stored(store, make_run("stale-pins"), ["s/00"]) == {
                "s/00": b"loose"}
    finally:
        await _emptied(store, key, monkeypatch)


async def test_delete_run_with_no_run_item_checks_the_count_of_each_item_it_found_none_for(
    store: DynamoDBStore, key: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A shared item ``delete_run`` finds no count for (one of ``put_items``) is deleted only
    while its count is still absent or stale (a first append under way naming it may raise
    it meanwhile): a check in the delete's transaction, one operation more per such item,
    so 49 of them a transaction (before, 99, unchecked)."""
    try:
        with anyio.fail_after(DEADLINE):
            await _emptied(store, key, monkeypatch)
            await store.put_items(key, [make_item(f"a/{index:02}", b"loose")
                                        for index in range(50)], now=T0)
            with counting(store) as (dynamo, _):
                await store.delete_run(key)
            assert await _sort_keys(store, key) == []
            assert dynamo.counts["Query"] == 1
            assert dynamo.counts["TransactWriteItems"] == 2  # 49 items, then 1
    finally:
        await _emptied(store, key, monkeypatch)


async def test_delete_run_sends_no_transaction_of_the_run_check_alone(
    store: DynamoDBStore, key: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every delete of ``delete_run``'s transaction refused (a pin raised the count of the one
    item it found): it is not sent again with only the check that no run item is there,
    which would delete nothing."""
    try:
        with anyio.fail_after(DEADLINE):
            await _emptied(store, key, monkeypatch)
            await store.put_items(key, [make_item("s/00", b"loose")], now=T0)
            sent = _pin_before_the_delete_of(store, monkeypatch, key, "s/00")
            with counting(store) as (dynamo, _):
                await store.delete_run(key)
            assert sorted(await _sort_keys(store, key)) == [
                layout.counter_sk("s/00"), layout.item_sk("s/00")]
            # The pin, and delete_run's transaction, refused: nothing more.
            # The check of no run item, of the count, and the item's delete.
            assert sent == [layout.RUN_SK, layout.counter_sk("s/00"), layout.item_sk("s/00")]
            assert dynamo.counts["TransactWriteItems"] == 2
    finally:
        await _emptied(store, key, monkeypatch)
