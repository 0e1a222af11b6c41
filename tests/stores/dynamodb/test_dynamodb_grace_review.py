"""DynamoDB+S3 review of the stale pins (``pa``, ``PIN_GRACE_SECONDS``): ``delete_run`` of a
run key with no run item must never delete a shared item whose count a pin raised after its
``Query`` (a first append under way that names the item without writing it): that append
would land acknowledged, naming an item that is gone. Each test injects such a pin (the raise
of a count, stamped now, as ``DynamoDBStore._pin`` sends it) at one point of ``delete_run``
and checks that the item is still there with its count. And a first append whose clock is
ahead by more than the grace, pinning over the pins of another under way: the other is
refused (its pin record taken), never acknowledged with these values."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from fastcheckpoint.errors import SharedItemGone
from fastcheckpoint.stores import _dynamodb_layout as layout
from fastcheckpoint.stores import dynamodb as dynamodb_module
from fastcheckpoint.stores.dynamodb import DynamoDBStore
from fastcheckpoint.testing._adapter import _append_items, _read
from fastcheckpoint.testing._builders import T0, key_of, make_item, make_run
from tests.stores._moto import moto_endpoint
from tests.stores.dynamodb.test_dynamodb import (
    DEADLINE,
    _raw_item,
    atomic_moto,
    aws_names,
    opened,
    provisioned,
    store,
)
from tests.stores.dynamodb.test_dynamodb_stale_pins import (
    NAMES,
    _emptied,
    _fail_first_append_after_its_pins,
    _past_the_grace,
    _pin_before_the_delete_of,
    _sort_keys,
    anyio_backend,
    key,
)

__all__ = ["anyio_backend", "atomic_moto", "aws_names", "key", "moto_endpoint", "provisioned",
           "store"]

pytestmark = pytest.mark.anyio


def _value(store: DynamoDBStore, where: str) -> bytes:
    """An item value kept in the item's record, or one past the threshold, kept in S3."""
    return b"old" if where == "inline" else b"o" * (store.threshold + 1)


async def _kept_with_its_count(
    store: DynamoDBStore, run_key: str, item_key: str, value: bytes, *, raised: int = 1
) -> None:
    """The count the pin raised is there (``raised`` times: the pin's raise, and a stale one's
    it raised over), and so is the item it names, whose value reads back (from S3 too)."""
    count = await _raw_item(store, run_key, layout.counter_sk(item_key))
    assert count is not None
    assert count["rc"] == {"N": str(raised)}
    item = await _raw_item(store, run_key, layout.item_sk(item_key))
    assert item is not None, "the count a pin raised names an item delete_run deleted"
    assert await store.get_items(run_key, [item_key], now=T0) == {item_key: value}


@pytest.mark.parametrize("where", ["inline", "s3"])
async def test_a_pin_landing_between_delete_run_s_transactions_keeps_the_item_it_names(
    store: DynamoDBStore, key: str, monkeypatch: pytest.MonkeyPatch, where: str,
) -> None:
    """98 loose items (``a/..``, sorted first) and a failed first append's stale pins. Before,
    the deletes went in key order, 99 a transaction, item next to count: the count of the
    first pinned key was the 99th delete of the first transaction and its item the first of
    the second, where a first append under way naming that key could raise its count (it
    came back) before the item was deleted. A key's count and item now go in one
    transaction: a pin raising the count before it keeps both."""
    try:
        with anyio.fail_after(DEADLINE):
            await _emptied(store, key, monkeypatch)
            await store.put_items(key, [make_item(f"a/{index:03}", b"loose")
                                        for index in range(98)], now=T0)
            await _fail_first_append_after_its_pins(store, monkeypatch, _value(store, where))
            first = min(sort_key[len(layout.COUNTER_PREFIX):] for sort_key in
                        await _sort_keys(store, key) if sort_key.startswith(layout.COUNTER_PREFIX))
            _past_the_grace(monkeypatch)
            sent = _pin_before_the_delete_of(store, monkeypatch, key, first)
            await store.delete_run(key)
            assert layout.counter_sk(first) in sent  # the count's delete with the item's
            # The failed append's stale raise stays under the pin's (see Limits).
            await _kept_with_its_count(store, key, first, _value(store, where), raised=2)
    finally:
        await _emptied(store, key, monkeypatch)


@pytest.mark.parametrize("where", ["inline", "s3"])
async def test_a_pin_landing_after_delete_run_s_query_keeps_a_loose_item_it_names(
    store: DynamoDBStore, key: str, monkeypatch: pytest.MonkeyPatch, where: str,
) -> None:
    """A loose item (``put_items``, no count, no ``pa``) that a first append under way names
    without writing it: its pin raises the count after ``delete_run``'s ``Query``."""
    try:
        with anyio.fail_after(DEADLINE):
            await _emptied(store, key, monkeypatch)
            await store.put_items(key, [make_item("s/00", _value(store, where))], now=T0)
            sent = _pin_before_the_delete_of(store, monkeypatch, key, "s/00")
            await store.delete_run(key)
            assert sent
            await _kept_with_its_count(store, key, "s/00", _value(store, where))
    finally:
        await _emptied(store, key, monkeypatch)


def _first_transaction(operations: list[dict[str, Any]]) -> bool:
    """A run's first append's own transaction: the put of the run item."""
    return any(operation.get("Put", {}).get("Item", {}).get("SK") == {"S": layout.RUN_SK}
               for operation in operations)


async def test_a_first_append_under_way_is_refused_when_a_skewed_clock_pins_over_its_pins(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch, provisioned: str,
    aws_names: tuple[str, str],
) -> None:
    """Two processes begin the run's first checkpoint, each writing more items than one
    transaction takes. The first has pinned its items and is about to send its transaction
    when the second, its clock an hour and a minute ahead, pins over them and fails before
    its own transaction (its connection lost). Before, the second took the first's pins for
    stale and replaced them (all but the first one's first pin, which its transaction
    checked), and the first landed reading the second's values. Now no clock decides: the
    second's pins took the pin record, so the first's transaction is refused
    (``SharedItemGone``, nothing written), and appended again (as the manager does) it
    reads back its own values."""
    run = make_run("grace-skew")
    skew_key = key_of(run)
    transact = store._transact
    try:
        with anyio.fail_after(DEADLINE):
            await _emptied(store, skew_key, monkeypatch)
            async with opened(provisioned, aws_names) as other:
                other_transact = other._transact

                async def lost_before_its_transaction(
                    operations: Any, *args: Any, **kwargs: Any
                ) -> Any:
                    if _first_transaction(operations):
                        raise dynamodb_module.StoreUnavailableError("connection reset")
                    return await other_transact(operations, *args, **kwargs)

                async def overtaken(operations: Any, *args: Any, **kwargs: Any) -> Any:
                    if _first_transaction(operations) and not skewed_once:
                        skewed_once.append(True)
                        with monkeypatch.context() as skewed:
                            _past_the_grace(skewed)
                            skewed.setattr(other, "_transact", lost_before_its_transaction)
                            with pytest.raises(dynamodb_module.StoreUnavailableError):
                                await _append_items(
                                    other, make_run("grace-skew", created_at=T0 + 20), 0,
                                    refs=NAMES, now=T0 + 20,
                                    items=[make_item(name, b"p2") for name in NAMES])
                    return await transact(operations, *args, **kwargs)

                skewed_once: list[bool] = []
                monkeypatch.setattr(store, "_transact", overtaken)
                with pytest.raises(SharedItemGone):
                    await _append_items(store, run, 0, refs=NAMES,
                                        items=[make_item(name, b"p1") for name in NAMES])
                assert skewed_once
                store._families.pop(skew_key, None)
                assert await _read(store, run, None) is None  # nothing acknowledged
                await _append_items(store, run, 0, refs=NAMES,
                                    items=[make_item(name, b"p1") for name in NAMES])
            store._families.pop(skew_key, None)
            read = await _read(store, run, None)
            assert read is not None
            assert {name: read[2].get(name) for name in NAMES} == dict.fromkeys(NAMES, b"p1")
    finally:
        monkeypatch.setattr(store, "_transact", transact)
        await _emptied(store, skew_key, monkeypatch)
