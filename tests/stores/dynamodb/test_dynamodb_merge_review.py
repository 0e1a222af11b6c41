"""Review of the merged DynamoDB+S3 fixes of this session: a new life's first append that
removes its ended life whole from ``_plan_first``, the check of its pins (now of its pin
record), and the undo's check of its life."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from fastcheckpoint.stores import _dynamodb_layout as layout
from fastcheckpoint.stores import dynamodb as dynamodb_module
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

__all__ = ["atomic_moto", "aws_names", "moto_endpoint", "provisioned", "store"]

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


def _refusals(store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the size of every TransactWriteItems the store sends that is refused."""
    refused: list[int] = []
    transact = store._transact

    async def recording(operations: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await transact(operations, *args, **kwargs)
        except dynamodb_module._Cancelled:
            refused.append(len(operations))
            raise

    monkeypatch.setattr(store, "_transact", recording)
    return refused


async def test_a_first_append_that_removes_its_ended_life_sends_no_transaction_it_knows_fails(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """This process appended checkpoint 0 of life L1, which expired (its run item cached).
    It now appends checkpoint 0 of a new life L2 naming 60 new shared items: more than its
    transaction holds, so ``_plan_first`` removes L1 whole (mark, records, run item), plans
    over no run item, and the pins land. ``_append`` then continues with ``state`` still
    L1 (``_purge_whole_run`` popped the cache, not the local): ``_plan_first(previous=L1)``
    Queries L1's leftovers again and sends the transaction with the run item's put
    conditioned on L1's revision, run id and life, and without the delete of its pin record
    (``_pins_held`` returns nothing over a run item). The run item is gone: refused, and
    only the next attempt, over no run item, lands. One Query and one TransactWriteItems
    more than needed (of 98 operations, twice the write units of a refused transaction), and
    one of the 8 attempts spent."""
    l1 = make_run("merge-stale-state", expires_at=T0 + 10)
    l2 = make_run("merge-stale-state", created_at=T0 + 20)
    key = key_of(l1)
    names = [f"s/{index}" for index in range(60)]
    try:
        with anyio.fail_after(DEADLINE):
            await _append_items(store, l1, 0, refs=["a"], items=[make_item("a")],
                                expires_at=T0 + 10)
            refused = _refusals(store, monkeypatch)
            with counting(store) as (dynamo, _):
                await _append_items(store, l2, 0, refs=names, now=T0 + 20,
                                    items=[make_item(name) for name in names])
            run = await store.get_run(key, now=T0 + 20)
            assert run is not None
            assert run.incarnation == l2.incarnation
            assert refused == []
            # The leftovers' Query and the removal's; the removal, the pins, the append.
            assert dynamo.counts["Query"] == 2
            assert dynamo.counts["TransactWriteItems"] == 3
    finally:
        await store.delete_run(key)


async def test_a_first_append_after_delete_run_with_no_run_item_reads_back_its_own_value(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """F1, a run's first checkpoint naming 60 new shared items (value ``old``), pins some of
    them (``s/59`` among them); the reply to its pin transaction is lost (it landed): the
    append fails with its raises left (outcome unknown) and ``s/59``'s value kept. No run
    item was ever written. ``delete_run`` of the key, which before removed every record it
    found, now leaves shared items and counts (they may be the pins of a new run's first
    append under way). F2, the run's first checkpoint of a new life, writes ``s/59`` with
    value ``new`` in its transaction: its put is dropped (a live item there, count 1), and it
    is acknowledged. Reading it back gives ``old``. Unlikely with the LangGraph saver (its
    blob keys digest the channel and a version with a random part), but any caller that
    reuses a key across lives (the contract allows it once the run is deleted) reads a value
    it did not write."""
    f1 = make_run("merge-left-pin")
    f2 = make_run("merge-left-pin", created_at=T0 + 20)
    key = key_of(f1)
    names = [f"s/{index}" for index in range(60)]
    transact = store._transact
    lost: list[int] = []

    async def reply_lost(operations: Any, *args: Any, **kwargs: Any) -> Any:
        result = await transact(operations, *args, **kwargs)
        if not lost:  # the first pin transaction lands, its reply does not come
            lost.append(len(operations))
            raise dynamodb_module.StoreUnavailableError("connection reset")
        return result

    try:
        with anyio.fail_after(DEADLINE):
            monkeypatch.setattr(store, "_transact", reply_lost)
            with pytest.raises(dynamodb_module.StoreUnavailableError):
                await _append_items(store, f1, 0, refs=names,
                                    items=[make_item(name, b"old") for name in names])
            monkeypatch.setattr(store, "_transact", transact)
            assert lost
            assert await store.get_run(key, now=T0) is None
            await store.delete_run(key)
            assert await _raw_item(store, key, layout.counter_sk("s/59")) is not None
            await _append_items(store, f2, 0, refs=["s/59"], now=T0 + 20,
                                items=[make_item("s/59", b"new")])
            read = await _read(store, f2, None, now=T0 + 20)
            assert read is not None
            assert read[2]["s/59"] == b"new"
    finally:
        await store.delete_run(key)



async def test_a_pruning_s_lowered_counts_sent_after_it_recreate_no_count_a_removal_deleted(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """P appends checkpoint 21 of life L1 with ``keep_latest=1``: the pruning of 0..20
    (checkpoint 0 names the shared item ``k``; 1..20 own three items each) has more records
    than its transaction holds, so the deletes and ``k``'s lowering (-1) that do not fit are
    sent after the commit (``_committed``: ``_guarded_deletes(overflow, life=...)``). Before
    they are, Q's ``delete_run`` reads the run (``c#k`` at 1 among the records) and sends its
    first transaction (the fence, ``pg``, and the first 99 deletes, ``c#k`` among them). P's
    overflow now lands: its check is ``inc = L1`` only, which the fenced run item still
    passes, and the lowering is an ``ADD rc -1`` that creates ``c#k`` at -1, in the expiry
    index. Q's second Query skips keys its first one found: ``c#k`` stays after the run is
    gone. A new life L2 writing and naming ``k`` raises it to 0 (its acknowledged checkpoint
    names an item whose count says no one does), and the cleanup loop removes ``k``: the
    read of L2's checkpoint lacks it. The undo of a failed append lowers counts with
    ``_life_check`` (no ``pg``) and ``existing=True``; the overflow's lowerings need both."""
    l1 = make_run("merge-overflow")
    l2 = make_run("merge-overflow", created_at=T0 + 20)
    key = key_of(l1)
    async with opened(provisioned, aws_names, prefix=store.prefix) as other:
        guarded = store._guarded_deletes
        fenced, overflow_done = anyio.Event(), anyio.Event()

        async def racing(deletes: Any, *, life: Any = None) -> None:
            if life is None:
                await guarded(deletes)
                return
            async with anyio.create_task_group() as group:
                group.start_soon(other.delete_run, key)
                await fenced.wait()
                await guarded(deletes, life=life)
                overflow_done.set()

        transact = other._transact

        async def paused(operations: Any, *args: Any, **kwargs: Any) -> Any:
            result = await transact(operations, *args, **kwargs)
            if not fenced.is_set():  # delete_run's first transaction landed
                fenced.set()
                await overflow_done.wait()
            return result

        try:
            with anyio.fail_after(DEADLINE):
                await _append_items(store, l1, 0, refs=["k"], items=[make_item("k")])
                for sequence in range(1, 21):
                    await _append_items(store, l1, sequence, items=[
                        make_item(f"o{sequence}/{j}", owner=sequence) for j in range(3)])
                monkeypatch.setattr(store, "_guarded_deletes", racing)
                monkeypatch.setattr(other, "_transact", paused)
                await _append_items(store, l1, 21, keep_latest=1)
                monkeypatch.undo()
                assert overflow_done.is_set()
                assert await _raw_item(store, key, layout.RUN_SK) is None
                await _append_items(other, l2, 0, refs=["k"], now=T0 + 20,
                                    items=[make_item("k", b"new")])
                await _purge_until_done(other, T0 + 20)
                read = await _read(other, l2, None, now=T0 + 20)
                assert read is not None
                assert read[2].get("k") == b"new"
        finally:
            monkeypatch.undo()
            await other.delete_run(key)
