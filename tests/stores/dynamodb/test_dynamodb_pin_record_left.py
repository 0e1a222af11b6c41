"""DynamoDB+S3: what a run's first append too large for one transaction leaves, and what it
does when the removal of the ended life it plans over is refused. Its removal of that life
(``_purge_whole_run`` from ``_plan_first``) refused by another process's change of the run
item plans again from the run item the refusal returned, sending nothing it knows fails;
a pin record its failed pins left goes with the run (native TTL where it runs, a removal);
and such an append over an expired life of its own, cut at each of its requests (its
removal of that life's too) while another process appends, deletes or restarts the run,
is restorable exactly once when acknowledged, with its own values at every key (see
``test_dynamodb_pin_record_cuts.py``, which cuts one over no run item)."""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

from fastcheckpoint.errors import SequenceConflict
from fastcheckpoint.stores import _dynamodb_items as items_layout
from fastcheckpoint.stores import _dynamodb_layout as layout
from fastcheckpoint.stores.dynamodb import DynamoDBStore
from fastcheckpoint.testing._adapter import _append_items, _read
from fastcheckpoint.testing._builders import T0, key_of, make_item, make_run
from tests.stores._moto import moto_endpoint
from tests.stores.dynamodb.test_dynamodb import (
    DEADLINE,
    _purge_until_done,
    _raw_item,
    atomic_moto,
    aws_names,
    counting,
    opened,
    provisioned,
    store,
)
from tests.stores.dynamodb.test_dynamodb_pin_record import MANY
from tests.stores.dynamodb.test_dynamodb_pin_record_cuts import _cut
from tests.stores.dynamodb.test_dynamodb_stale_pins import (
    _emptied,
    _fail_first_append_after_its_pins,
    _sort_keys,
    anyio_backend,
)

__all__ = ["anyio_backend", "atomic_moto", "aws_names", "moto_endpoint", "provisioned",
           "store"]

pytestmark = pytest.mark.anyio

def _is_mark(operation: str, params: dict[str, Any]) -> bool:
    """Whether a conditional write is the mark of a removal of the run (``pg``)."""
    return operation == "UpdateItem" and params["Key"]["SK"]["S"] == layout.RUN_SK and (
        "pg" in params.get("ExpressionAttributeNames", {}).values())


async def test_a_refused_removal_of_the_ended_life_plans_again_from_the_run_item_it_returned(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch, provisioned: str,
    aws_names: tuple[str, str],
) -> None:
    """L0 expired (its run item cached). A first append of 110 items over it must remove it
    whole first; just before its mark, another process's small first append begins L1 over
    L0. The mark is refused (L1 raised the revision). Before, the result was ignored: the
    append planned over no run item and sent its first pin transaction (a hundred
    operations), which the run item refused, returning L1, only the pin check keeping it
    from landing. Now the refused mark's run item (L1) is remembered and planned from: no
    transaction is sent, and L1, live, is a conflict read once more (one GetItem)."""
    l0 = make_run("refused-mark", expires_at=T0 + 10)
    l1 = make_run("refused-mark", created_at=T0 + 100)
    l2 = make_run("refused-mark", created_at=T0 + 100)
    key = key_of(l0)
    try:
        with anyio.fail_after(DEADLINE):
            await _emptied(store, key, monkeypatch)
            await _append_items(store, l0, 0, refs=["a"], items=[make_item("a")],
                                expires_at=T0 + 10)
            async with opened(provisioned, aws_names, prefix=store.prefix) as other:
                conditional = store._conditional
                meanwhile: list[str] = []

                async def overtaken(operation: str, **params: Any) -> Any:
                    if _is_mark(operation, params) and not meanwhile:
                        meanwhile.append(operation)
                        await _append_items(other, l1, 0, refs=["b"], now=T0 + 100,
                                            items=[make_item("b", b"other")])
                    return await conditional(operation, **params)

                monkeypatch.setattr(store, "_conditional", overtaken)
                with counting(store) as (dynamo, _), pytest.raises(SequenceConflict) as raised:
                    await _append_items(store, l2, 0, refs=MANY, now=T0 + 100,
                                        items=[make_item(name, b"mine") for name in MANY])
                monkeypatch.undo()
            assert meanwhile
            assert raised.value.latest_sequence == 0
            assert raised.value.incarnation == l1.incarnation
            # The leftovers' Query, the refused mark, the run item read once more.
            assert dynamo.counts == {"Query": 1, "UpdateItem": 1, "GetItem": 1}
            assert not [sk for sk in await _sort_keys(store, key)
                        if sk.endswith("m/000") or sk == layout.PIN_SK]
            read = await _read(store, l1, None, now=T0 + 100)
            assert read is not None
            assert read[2] == {"b": b"other"}
    finally:
        await _emptied(store, key, monkeypatch)


async def test_a_pin_record_carries_native_ttl_an_hour_after_its_pin(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A first append that pinned and failed leaves its pin record; a later first append
    that pins nothing (one transaction) begins a life without touching it. Before, it had
    no ``ttl``: a run removed by native TTL alone (its run item, checkpoints and owned items
    carry one) kept it forever. It now carries the pin's wall-clock time plus the grace
    (``PIN_GRACE_SECONDS``) after which ``delete_run`` takes it for stale too."""
    run = make_run("left-record-ttl")
    later = make_run("left-record-ttl", created_at=T0 + 1)
    key = key_of(run)
    try:
        with anyio.fail_after(DEADLINE):
            await _emptied(store, key, monkeypatch)
            pinned = time.time()
            await _fail_first_append_after_its_pins(store, monkeypatch, b"failed", run=run,
                                                    names=MANY)
            store._cache.pop(key, None)
            await _append_items(store, later, 0, refs=["b"], now=T0 + 1,
                                items=[make_item("b", b"later")])
            record = await _raw_item(store, key, layout.PIN_SK)
            assert record is not None  # the later append, which pinned nothing, left it
            stamped = float(record["pa"]["N"])
            assert pinned - 1 <= stamped <= time.time() + 1
            assert "ttl" in record
            assert int(record["ttl"]["N"]) == layout.ttl_of(
                stamped + items_layout.PIN_GRACE_SECONDS)
    finally:
        await _emptied(store, key, monkeypatch)


@pytest.mark.parametrize("removal", ["cleanup", "delete_run", "restart-then-cleanup"])
async def test_no_item_of_a_run_outlives_its_removal_after_a_failed_first_append(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch, removal: str,
) -> None:
    """A failed first append leaves its pins and pin record; a small first append begins a
    life L1 over them (expiring at ``T0 + 10``). Whichever removal ends the run (the
    cleanup loop once L1 expired, ``delete_run``, or a new life L2 begun over expired L1,
    which removes only L1's checkpoints, then the cleanup loop once L2 expired), nothing of
    the run key is left in its partition: the removals list the whole partition."""
    run = make_run("left-record-removed")
    l1 = make_run("left-record-removed", created_at=T0 + 1, expires_at=T0 + 10)
    l2 = make_run("left-record-removed", created_at=T0 + 20, expires_at=T0 + 30)
    key = key_of(run)
    try:
        with anyio.fail_after(DEADLINE):
            await _emptied(store, key, monkeypatch)
            await _fail_first_append_after_its_pins(store, monkeypatch, b"failed", run=run,
                                                    names=MANY)
            store._cache.pop(key, None)
            await _append_items(store, l1, 0, refs=["b", MANY[-1]], now=T0 + 1,
                                expires_at=T0 + 10, items=[make_item("b", b"l1")])
            assert layout.PIN_SK in await _sort_keys(store, key)
            if removal == "delete_run":
                await store.delete_run(key)
            else:
                if removal == "restart-then-cleanup":
                    await _append_items(store, l2, 0, refs=["c"], now=T0 + 20,
                                        expires_at=T0 + 30, items=[make_item("c", b"l2")])
                    assert layout.PIN_SK in await _sort_keys(store, key)
                await _purge_until_done(store, T0 + 100)
            assert await store.get_run(key, now=T0 + 100) is None
            assert await _sort_keys(store, key) == []
    finally:
        await _emptied(store, key, monkeypatch)


@pytest.mark.parametrize("meanwhile", ["small", "large-failed", "restart", "cleanup"])
@pytest.mark.parametrize(("operation", "at"), [
    ("UpdateItem", 1), ("TransactWriteItems", 1), ("DeleteItem", 1),
    ("TransactWriteItems", 2), ("TransactWriteItems", 4)],
    ids=["mark", "removal", "run-item-delete", "pin-1", "transaction"])
@pytest.mark.parametrize("kind", ["delayed", "lost", "crash-after"])
async def test_a_large_first_append_over_an_ended_life_cut_at_any_request(
    provisioned: str, aws_names: tuple[str, str], kind: str, operation: str, at: int,
    meanwhile: str,
) -> None:
    """Over an expired life of its own: it removes that life whole first (the mark, the
    listing of the partition, the removal's transaction, the run item's delete), then pins
    and sends its own transaction; each of those cut in turn (see :func:`_cut`), while
    another process begins a life, pins and dies, deletes and restarts the run, or runs the
    cleanup loop (which removes that life too)."""
    await _cut(provisioned, aws_names, kind, operation, at, meanwhile, over_expired=True)
