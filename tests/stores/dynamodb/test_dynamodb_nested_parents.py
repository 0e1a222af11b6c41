"""The removal of a shared item nested under other keys, and those keys: it never leaves an
append naming one of them acknowledged reading back without it, never writes their counts
on the common path (LangGraph blobs ``b/<digest>``: ``b`` is never named), keeps the cleanup
loop moving, and fits in DynamoDB's 100 operations per transaction however deep the key."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from fastcheckpoint.errors import SharedItemGone
from fastcheckpoint.stores import _dynamodb_items as items_layout
from fastcheckpoint.stores import _dynamodb_layout as layout
from fastcheckpoint.stores.dynamodb import DynamoDBStore
from fastcheckpoint.testing._adapter import _append_items
from fastcheckpoint.testing._builders import T0, key_of, make_item, make_run
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
from tests.stores.dynamodb.test_dynamodb_nested_races import _refused, _scan

__all__ = ["atomic_moto", "aws_names", "moto_endpoint", "provisioned", "store"]

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


def _measure(store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch,
             sent: list[list[dict[str, Any]]]) -> None:
    """Record the operations of every transaction the store sends."""
    real = store._transact

    async def measured(operations: list[dict[str, Any]]) -> None:
        sent.append(list(operations))
        await real(operations)

    monkeypatch.setattr(store, "_transact", measured)


def _writes_to(sent: list[list[dict[str, Any]]], sort_key: str) -> int:
    return sum(1 for operations in sent for operation in operations
               for kind, body in operation.items()
               if kind in ("Put", "Update", "Delete")
               and (body.get("Key") or body.get("Item", {}))["SK"]["S"] == sort_key)


async def test_removing_blobs_writes_nothing_of_the_key_above_them(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The LangGraph saver's blobs ``b/<digest>``: ``b`` is never named and holds no item.
    Removing two of them costs what it did (a BatchGetItem; per blob a Query for nested
    items and one transaction of three operations: the mark, the delete, a check of
    ``b``'s count) and writes no count of ``b``."""
    run = make_run("nested-blobs")
    key = key_of(run)
    sent: list[list[dict[str, Any]]] = []
    with anyio.fail_after(DEADLINE):
        await store.clients()
        await _append_items(store, run, 0, refs=["b/x", "b/y"],
                            items=[make_item("b/x"), make_item("b/y")])
        await _append_items(store, run, 1, refs=["b/z"], items=[make_item("b/z")],
                            keep_latest=1)
        _measure(store, monkeypatch, sent)
        with counting(store) as (dynamo, _):
            await store._sweep_shared(key, ["b/x", "b/y"], T0)
        assert await _scan(store, key, "b/") == ["b/z"]
    assert dict(dynamo.counts) == {"BatchGetItem": 1, "Query": 2, "TransactWriteItems": 2}
    assert [len(operations) for operations in sent] == [3, 3]
    assert _writes_to(sent, layout.counter_sk("b")) == 0
    assert await _raw_item(store, key, layout.counter_sk("b")) is None


async def test_a_leading_slash_is_no_key_above(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``/x`` is nested under no key (not under ``""``, which is no key): its removal is the
    mark and the delete, nothing more."""
    run = make_run("nested-leading-slash")
    key = key_of(run)
    sent: list[list[dict[str, Any]]] = []
    with anyio.fail_after(DEADLINE):
        await store.clients()
        await _append_items(store, run, 0, refs=["/x"], items=[make_item("/x")])
        await _append_items(store, run, 1, refs=["o1"], items=[make_item("o1")],
                            keep_latest=1)
        _measure(store, monkeypatch, sent)
        await store._sweep_shared(key, ["/x"], T0)
        assert await _scan(store, key, "/") == []
    assert [len(operations) for operations in sent] == [2]


@pytest.mark.parametrize("removed", [True, False])
async def test_the_cleanup_loop_gets_past_keys_under_a_key_at_zero(
    store: DynamoDBStore, removed: bool,
) -> None:
    """``p`` was named and is not now. ``removed``: it had no item of its own and was
    removed, taking what was nested under it; its count stays at zero, in the expiry index
    a day on. Else it holds an item and its removal is due. Twelve keys nested under it,
    named later and unnamed now, are due too; the cleanup loop, 10 entries a pass, removes
    them all and is done within two passes (it does not wait for ``p``'s entry)."""
    run = make_run(f"nested-parent-later-{removed}")
    key = key_of(run)
    keys = [f"p/k{index:02}" for index in range(12)]
    with anyio.fail_after(DEADLINE):
        await store.clients()
        await _append_items(store, run, 0, refs=["p"],
                            items=[make_item(k) for k in ["p/x", *([] if removed else ["p"])]])
        await _append_items(store, run, 1, refs=["o1"], items=[make_item("o1")],
                            keep_latest=1)
        if removed:
            await store._sweep_shared(key, ["p"], T0)
            parent = await _raw_item(store, key, layout.counter_sk("p"))
            assert parent is not None
            assert "gn" not in parent
            assert "np" not in parent
            assert float(parent["xat"]["N"]) > T0  # zero, due again only a day on
        await _append_items(store, run, 2, refs=keys, items=[make_item(k) for k in keys])
        await _append_items(store, run, 3, refs=["o2"], items=[make_item("o2")],
                            keep_latest=1)

        passes = []
        for _ in range(4):
            passes.append(await store.purge_expired(now=T0 + 1, limit=10))
            if passes[-1][1]:
                break
        assert len(passes) <= 2, passes
        assert passes[-1][1]
        assert await _scan(store, key, "p/") == []


async def test_a_key_above_named_and_unnamed_before_the_removal_commits_takes_it(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cleanup loop read the counts of ``h/a`` (zero) and of ``h`` (none: ``h``'s item
    was written, never named) and is about to take ``h/a``, when another process appends
    checkpoint 2 naming ``h`` and writing ``h/c`` under it, reads it (``h`` with ``h/a``,
    ``h/a/0`` and ``h/c``), and prunes it: ``h``'s own removal is due now. The transaction
    taking ``h/a`` is refused (it checks that ``h``'s removal is not due) and it stays; the
    next pass removes ``h``, which takes it with the rest and condemns ``h``: an append
    naming ``h`` without writing it is refused, not acknowledged reading back ``h`` alone."""
    run = make_run("nested-parent-due-meanwhile")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await store.clients()
        await _append_items(store, run, 0, refs=["h/a"],
                            items=[make_item(k) for k in ["h", "h/a", "h/a/0"]])
        await _append_items(store, run, 1, refs=["o1"], items=[make_item("o1")],
                            keep_latest=1)

        real_page = store._nested_page
        seen: list[list[str]] = []

        async def page_then_raced(*args: Any, **kwargs: Any) -> Any:
            found = await real_page(*args, **kwargs)
            if not seen:  # the look for nested items, after the counts were read
                await _append_items(other, run, 2, refs=["h"], items=[make_item("h/c")])
                read = await other.read_with_items(key, sequence=2, now=T0)
                assert read is not None
                seen.append(sorted(read[2]))
                await _append_items(other, run, 3, refs=["o2"], items=[make_item("o2")],
                                    keep_latest=1)
            return found

        monkeypatch.setattr(store, "_nested_page", page_then_raced)
        async with opened(provisioned, aws_names, prefix=store.prefix) as other:
            await store._sweep_shared(key, ["h/a"], T0)
        monkeypatch.setattr(store, "_nested_page", real_page)
        assert seen == [["h", "h/a", "h/a/0", "h/c"]]
        assert await _scan(store, key, "h") == ["h", "h/a", "h/a/0", "h/c"]

        await store._sweep_shared(key, ["h/a"], T0)  # the next pass
        assert await _scan(store, key, "h") == []
        assert [error.keys for error in await _refused(store, run, "h")] == [("h",)]


async def test_a_fence_refuses_an_append_writing_the_key_it_stands_for(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A key under 110 others: the checks of the outermost do not fit in the transaction
    taking it and are fences sent first. Another process appends, between the fences and
    that transaction, a checkpoint naming and writing ``k`` (the outermost): it is refused,
    nothing written (``k`` named, the item nested under it would have to stay), and the
    removal completes."""
    deep = "k" + "/" * 110 + "x"
    run = make_run("nested-deep-fenced")
    key = key_of(run)
    refused: list[SharedItemGone] = []
    with anyio.fail_after(DEADLINE):
        await store.clients()
        await _append_items(store, run, 0, refs=[deep], items=[make_item(deep)])
        await _append_items(store, run, 1, refs=["o1"], items=[make_item("o1")],
                            keep_latest=1)
        real = store._transact
        sent = 0

        async def fenced_then_raced(operations: list[dict[str, Any]]) -> None:
            nonlocal sent
            await real(operations)
            sent += 1
            if sent == 1:  # the fences landed; the removal's own transaction is next
                try:
                    await _append_items(other, run, 2, refs=["k"], items=[make_item("k")])
                except SharedItemGone as error:
                    refused.append(error)

        monkeypatch.setattr(store, "_transact", fenced_then_raced)
        async with opened(provisioned, aws_names, prefix=store.prefix) as other:
            await store._sweep_shared(key, [deep], T0)
        monkeypatch.setattr(store, "_transact", real)
        assert sent == 2
        assert [error.keys for error in refused] == [("k",)]
        assert await store.read_with_items(key, sequence=2, now=T0) is None
        assert await _scan(store, key, "k") == []


@pytest.mark.parametrize("after_read", [False, True])
async def test_a_key_above_named_and_unnamed_during_the_nested_deletes_takes_them(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch, after_read: bool,
) -> None:
    """The removal of ``h/a`` took it (``h``: an item, never named) and is about to delete
    ``h/a/0``, when another process appends checkpoint 2 naming ``h`` and writing ``h/c``
    under it, reads it (``h``, ``h/a/0``, ``h/c``) and prunes it, before the removal reads
    the counts around ``h/a`` (or after, ``after_read``: then its delete is refused). Either
    way ``h``'s removal is due, so ``h/a/0`` is left to it: the next pass removes ``h`` with
    all under it and condemns it, and an append naming ``h`` without writing it is refused,
    not acknowledged reading back without ``h/a/0``."""
    run = make_run(f"nested-parent-due-deleting-{after_read}")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await store.clients()
        await _append_items(store, run, 0, refs=["h/a"],
                            items=[make_item(k) for k in ["h", "h/a", "h/a/0"]])
        await _append_items(store, run, 1, refs=["o1"], items=[make_item("o1")],
                            keep_latest=1)

        real_named = store._named_around
        seen: list[list[str]] = []

        async def race() -> None:
            await _append_items(other, run, 2, refs=["h"], items=[make_item("h/c")])
            read = await other.read_with_items(key, sequence=2, now=T0)
            assert read is not None
            seen.append(sorted(read[2]))
            await _append_items(other, run, 3, refs=["o2"], items=[make_item("o2")],
                                keep_latest=1)

        async def raced_around_the_read(*args: Any) -> set[str]:
            if not after_read:
                await race()
            found = await real_named(*args)
            if after_read:
                await race()
            return found

        monkeypatch.setattr(store, "_named_around", raced_around_the_read)
        async with opened(provisioned, aws_names, prefix=store.prefix) as other:
            with counting(store) as (dynamo, _):
                await store._sweep_shared(key, ["h/a"], T0)
        monkeypatch.setattr(store, "_named_around", real_named)
        assert seen == [["h", "h/a/0", "h/c"]]
        # Taking h/a, (the refused delete,) the end of the removal: a due removal read with
        # the counts spares what is under it at once.
        assert dynamo.counts["TransactWriteItems"] == (3 if after_read else 2)
        assert await _scan(store, key, "h") == ["h", "h/a/0", "h/c"]
        count = await _raw_item(store, key, layout.counter_sk("h/a"))
        assert count is not None
        assert "np" not in count  # the removal of h/a ended

        await store._sweep_shared(key, ["h"], T0)  # the next pass
        assert await _scan(store, key, "h") == []
        assert [error.keys for error in await _refused(store, run, "h")] == [("h",)]


@pytest.mark.parametrize("stale", [False, True])
@pytest.mark.parametrize("own_item", [True, False])
async def test_a_fence_on_a_count_already_due_outlives_another_workers_pass(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch, own_item: bool, stale: bool,
) -> None:
    """``k`` was removed a day and a minute ago (``own_item``: it held an item, its count
    is condemned; else it is at zero since): its count is due in the expiry index, no pass
    has reached it yet. A key under ``k`` and 110 others is removed now; ``k``'s check is a
    fence. Between the fences and the removal's own transaction, another process's cleanup
    pass reaches ``k``'s entry (``stale``: it read the count before the fences): it keeps
    the count, fenced, a day on in the expiry index (``stale``: as it was), where it deleted
    it, fence and all, so an append writing ``k`` then is refused, not acknowledged reading
    back without the item nested under ``k``. A day on the count goes."""
    deep = "k" + "/" * 110 + "x"
    run = make_run(f"nested-fence-outlives-{own_item}-{stale}")
    key = key_of(run)
    later = T0 + layout.CONDEMNED_SECONDS + 60
    refused: list[SharedItemGone] = []
    kept: list[dict[str, Any] | None] = []
    with anyio.fail_after(DEADLINE * 2):
        await store.clients()
        await _append_items(store, run, 0, refs=["k"],
                            items=[make_item("k" if own_item else "k/y")])
        await _append_items(store, run, 1, refs=["o1"], items=[make_item("o1")],
                            keep_latest=1)
        await store._sweep_shared(key, ["k"], T0)
        removed = await _raw_item(store, key, layout.counter_sk("k"))
        assert removed is not None
        assert ("gn" in removed) is own_item
        assert float(removed["xat"]["N"]) == T0 + layout.CONDEMNED_SECONDS
        await _append_items(store, run, 2, refs=[deep], items=[make_item(deep)])
        await _append_items(store, run, 3, refs=["o3"], items=[make_item("o3")],
                            keep_latest=1)
        real = store._transact
        sent = 0

        async def fenced_then_raced(operations: list[dict[str, Any]]) -> None:
            nonlocal sent
            sent += 1
            if sent == 1 and stale:  # the fences land once the other pass read the counts
                real_get = other._batch_get

                async def read_then_fenced(*args: Any) -> dict[str, dict[str, Any]]:
                    records = await real_get(*args)
                    await real(operations)
                    return records

                monkeypatch.setattr(other, "_batch_get", read_then_fenced)
                await other._sweep_shared(key, ["k"], later)
                monkeypatch.setattr(other, "_batch_get", real_get)
            else:
                await real(operations)
            if sent == 1:  # the fences landed; the removal's own transaction is next
                if not stale:
                    await other._sweep_shared(key, ["k"], later)
                kept.append(await _raw_item(store, key, layout.counter_sk("k")))
                try:
                    await _append_items(other, run, 4, refs=["k"], items=[make_item("k")],
                                        now=later)
                except SharedItemGone as error:
                    refused.append(error)

        monkeypatch.setattr(store, "_transact", fenced_then_raced)
        async with opened(provisioned, aws_names, prefix=store.prefix) as other:
            await store._sweep_shared(key, [deep], later)
        monkeypatch.setattr(store, "_transact", real)
        assert sent == 2
        [count] = kept
        assert count is not None
        assert float(count["nf"]["N"]) == later
        assert float(count["xat"]["N"]) == (
            T0 + layout.CONDEMNED_SECONDS if stale else later + layout.CONDEMNED_SECONDS)
        assert [error.keys for error in refused] == [("k",)]
        assert await store.read_with_items(key, sequence=4, now=later) is None
        assert await _scan(store, key, "k") == []

        await store._sweep_shared(key, ["k"], later + layout.CONDEMNED_SECONDS)
        assert await _raw_item(store, key, layout.counter_sk("k")) is None


async def test_a_fenced_count_is_not_dropped_on_a_stale_read(store: DynamoDBStore) -> None:
    """A worker that read ``k``'s count at zero before a fence landed on it and drops it
    (its read said a key above was named) leaves it: only the cleanup loop's pass over a
    fenced count deletes it, once the fence's day is up."""
    run = make_run("nested-fenced-not-dropped")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await store.clients()
        await store._transact([items_layout.fence(key, "k", T0, T0 + layout.CONDEMNED_SECONDS)])
        await store._drop_count(key, "k")
        count = await _raw_item(store, key, layout.counter_sk("k"))
        assert count is not None
        assert "nf" in count


@pytest.mark.parametrize("parent_item", [True, False])
async def test_a_key_before_the_key_above_it_costs_what_the_other_order_does(
    store: DynamoDBStore, parent_item: bool,
) -> None:
    """``p/k`` (with ``p/k/z`` under it) and ``p`` both due, ``p/k`` first: ``p``'s
    removal goes first and takes ``p/k``; ``p`` is not handled a second time from the
    counts read before (no second read, Query or cancelled transaction): one BatchGetItem,
    three Query, three transactions, as in the order ``p``, ``p/k``, and the same counts
    left."""
    left: dict[str, list[dict[str, Any] | None]] = {}
    counts: dict[str, dict[str, int]] = {}
    for order in (["p/k", "p"], ["p", "p/k"]):
        run = make_run(f"nested-order-{order[0]}-{parent_item}")
        key = key_of(run)
        with anyio.fail_after(DEADLINE):
            await store.clients()
            items = [make_item("p/k"), make_item("p/k/z"),
                     *([make_item("p")] if parent_item else [])]
            await _append_items(store, run, 0, refs=["p/k", "p"], items=items)
            await _append_items(store, run, 1, refs=["o1"], items=[make_item("o1")],
                                keep_latest=1)
            with counting(store) as (dynamo, _):
                await store._sweep_shared(key, order, T0)
            assert await _scan(store, key, "p") == []
            counts[order[0]] = dict(dynamo.counts)
            left[order[0]] = [
                None if raw is None else {k: v for k, v in raw.items() if k not in ("PK", "xpk")}
                for raw in [await _raw_item(store, key, layout.counter_sk(k))
                            for k in ("p", "p/k")]]
    assert counts["p/k"] == {"BatchGetItem": 1, "Query": 3, "TransactWriteItems": 3}
    assert counts["p/k"] == counts["p"]
    assert left["p/k"] == left["p"]
    assert all(count is not None for count in left["p/k"])
