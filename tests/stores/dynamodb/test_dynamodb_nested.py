"""Items nested under a shared item on DynamoDB: what reading and removing them costs (a read
looks only under the items the run item lists as having nested items), and a removal that is
interrupted, raced by an append, or finished by another worker."""

from __future__ import annotations

import math
import os
import secrets
from typing import Any

import anyio
import pytest

from fastcheckpoint.errors import SharedItemGone
from fastcheckpoint.stores import Item
from fastcheckpoint.stores import _dynamodb_items as items_layout
from fastcheckpoint.stores import _dynamodb_layout as layout
from fastcheckpoint.stores import dynamodb as dynamodb_module
from fastcheckpoint.stores._dynamodb_items import Value
from fastcheckpoint.stores.dynamodb import DynamoDBStore
from fastcheckpoint.testing._adapter import _append_items
from fastcheckpoint.testing._builders import T0, checkpoint_id_of, key_of, make_item, make_run
from tests.stores._moto import moto_endpoint
from tests.stores.dynamodb.test_dynamodb import (
    DEADLINE,
    _blob_keys,
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

STEPS = 1000
"""A 1,000-step run: as many items of ~1 KB nested under one anchor."""
REMOVED = 300
"""Nested items (of 4 KB: two Query pages) the removal test takes: enough for several
transactions; moto copies every table for each transaction, so more would only be slow."""
SLOW_DEADLINE = 3 * DEADLINE


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


async def _nest(store: DynamoDBStore, key: str, anchor: str, count: int, size: int = 0
                ) -> dict[str, bytes]:
    """Lay out ``count`` items nested under ``anchor`` (values of ``size`` bytes, or the
    default ones) as appends leave them, fast (25 per BatchWriteItem), the run item listing
    the anchor as one with nested items; returns them."""
    items = [make_item(f"{anchor}/{index:04}", os.urandom(size) if size else None)
             for index in range(count)]
    await store._batch_write([{"PutRequest": {"Item": items_layout.plain_record(
        key, item.key, Value(inline=item.value), None, secrets.token_hex(8))}}
        for item in items])
    await _list(store, key, anchor)
    return {item.key: item.value for item in items}


async def _list(store: DynamoDBStore, key: str, anchor: str) -> None:
    """List ``anchor`` in the run item as an append nesting items under it does (behind this
    process's back: its copy of the run item does not show it)."""
    ddb, _ = await store.clients()
    await ddb.update_item(
        TableName=store.table, Key={"PK": {"S": layout.partition(key)}, "SK": {"S": layout.RUN_SK}},
        UpdateExpression="ADD nk :k", ExpressionAttributeValues={":k": {"SS": [anchor]}})


async def _listed(store: DynamoDBStore, key: str) -> tuple[set[str], bool]:
    """What the run item lists as having nested items (``nk``), and whether any may (``nka``)."""
    run_item = await _raw_item(store, key, layout.RUN_SK)
    assert run_item is not None
    return set(run_item.get("nk", {}).get("SS", ())), "nka" in run_item


async def _nested_keys(store: DynamoDBStore, key: str, anchor: str) -> list[str]:
    found = await store._nested_records(key, [anchor], T0)
    return sorted(found)


async def _release(store: DynamoDBStore, run: Any, anchor: str) -> None:
    """Let the count of ``anchor`` drop to zero: a checkpoint naming something else prunes
    the only one naming it."""
    await _append_items(store, run, 1, refs=[f"{anchor}-other"], keep_latest=1)


async def test_nested_items_cost_a_query_per_anchor_and_page(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str]
) -> None:
    """1,000 items of 1 KB nested under one anchor, one of them in S3: a read of a checkpoint
    naming the anchor adds one Query per MB of them (two here), sent with the read's other
    requests, and one GetObject for the large one."""
    run = make_run("nested-costs")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await store.clients()
        await _append_items(store, run, 0, refs=["h/log"], items=[make_item("h/log")])
        await _append_items(store, run, 1, refs=["h/log"], items=[make_item("h/log/piece")])
        expected = await _nest(store, key, "h/log", STEPS, size=1000)
        big = os.urandom(450 * 1024)
        await store.put_items(key, [Item(key="h/log/big", value=big)], now=T0)
        expected.update({"h/log": b"value-h/log", "h/log/big": big,
                         "h/log/piece": b"value-h/log/piece"})
        with counting(store) as (known, known_s3):
            found = await store.read_with_items(key, sequence=None, now=T0)
        assert found is not None
        assert found[2] == expected

        await _append_items(store, run, 2, refs=["h/log"])
        async with opened(provisioned, aws_names, prefix=store.prefix) as other:
            await other.clients()
            with counting(other) as (older, older_s3):
                found = await other.read_with_items(key, sequence=0, now=T0)
        assert found is not None
        assert found[2] == expected
        await store.delete_run(key)

    # This process appended it, nesting an item under the anchor: the snapshot, and the
    # nested items' two pages beside it (one round trip).
    assert known.counts == {"TransactGetItems": 1, "Query": 2}
    # Not the latest: its records and the run item, then the named item and the two pages.
    assert older.counts == {"Query": 1 + 2, "GetItem": 1, "BatchGetItem": 1}
    assert known_s3.counts == older_s3.counts == {"GetObject": 1}


async def test_only_items_with_nested_items_are_looked_under(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str]
) -> None:
    """Reads look for nested items only under the items the run item lists: those an append
    naming them wrote nested items under. Shared items named as the LangGraph saver names
    them (``b/<digest>``, nothing under them) cost what they did before nested items
    existed; a manager's log (an anchor, pieces under it) one Query more, in the round trip
    of the named items."""
    blobs = ["b/1", "b/2", "b/3"]
    shared = make_run("nested-none")
    logged = make_run("nested-log")
    with anyio.fail_after(DEADLINE):
        await store.clients()
        for sequence in (0, 1):
            await _append_items(store, shared, sequence, refs=blobs,
                                items=[make_item(name) for name in blobs])
        await _append_items(store, logged, 0, refs=["m/a", *blobs],
                            items=[make_item(name) for name in ("m/a", *blobs)])
        with counting(store) as (first, _):
            await _append_items(store, logged, 1, refs=["m/a", *blobs],
                                items=[make_item("m/a/0000000001")])
        await _append_items(store, logged, 2, refs=["m/a", *blobs],
                            items=[make_item("m/a/0000000002")])
        reads: dict[str, Any] = {}
        for name, run in (("shared", shared), ("logged", logged)):
            with counting(store) as (reads[f"{name} known"], _):
                found = await store.read_with_items(key_of(run), sequence=None, now=T0)
            assert found is not None
            reads[f"{name} items"] = found[2]
            async with opened(provisioned, aws_names, prefix=store.prefix) as other:
                await other.clients()
                with counting(other) as (reads[f"{name} cold"], _):
                    found = await other.read_with_items(key_of(run), sequence=None, now=T0)
                assert found is not None
                assert found[2] == reads[f"{name} items"]
                with counting(other) as (reads[f"{name} older"], _):
                    found = await other.read_with_items(key_of(run), sequence=0, now=T0)
                assert found is not None
                assert set(found[2]) == set(reads[f"{name} items"])
        listed = await _listed(store, key_of(logged)), await _listed(store, key_of(shared))

    assert reads["shared items"] == {name: f"value-{name}".encode() for name in blobs}
    assert set(reads["logged items"]) == {"m/a", "m/a/0000000001", "m/a/0000000002", *blobs}
    assert listed == (({"m/a"}, False), (set(), False))
    # The append nesting items under the anchor lists it in the run item: no request more.
    assert first.counts == {"TransactWriteItems": 1}
    # Nothing nested: as before nested items existed. (A process that never read the run
    # learns the size of the checkpoint's family from a second Query.)
    assert reads["shared known"].counts == {"TransactGetItems": 1}
    assert reads["shared cold"].counts == {"Query": 2, "BatchGetItem": 1}
    assert reads["shared older"].counts == {"Query": 1, "GetItem": 1, "BatchGetItem": 1}
    # A log: one Query more (per MB of pieces), sent with the snapshot or the BatchGetItem.
    assert reads["logged known"].counts == {"TransactGetItems": 1, "Query": 1}
    assert reads["logged cold"].counts == {"Query": 2 + 1, "BatchGetItem": 1}
    assert reads["logged older"].counts == {"Query": 1 + 1, "GetItem": 1, "BatchGetItem": 1}


async def test_a_listing_this_process_did_not_see_is_read_after_the_snapshot(
    store: DynamoDBStore,
) -> None:
    """This process knows the checkpoint's records but not that its anchor has nested items
    now (an item listed behind its back): the snapshot's run item says so, and the nested
    items are read after it (a second round trip), none missed."""
    run = make_run("nested-late")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await store.clients()
        await _append_items(store, run, 0, refs=["h/a"], items=[make_item("h/a")])
        nested = await _nest(store, key, "h/a", 2)
        with counting(store) as (late, _):
            found = await store.read_with_items(key, sequence=None, now=T0)
    assert found is not None
    assert found[2] == {"h/a": b"value-h/a", **nested}
    assert late.counts == {"TransactGetItems": 1, "Query": 1}


async def test_many_anchors_with_nested_items_make_reads_look_under_every_item(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run item lists at most ``_NESTING_CAPACITY`` anchors; past it, it says that any
    may have nested items, and every read looks under every item it names."""
    monkeypatch.setattr(dynamodb_module, "_NESTING_CAPACITY", 2)
    run = make_run("nested-capacity")
    key = key_of(run)
    anchors = ["h/a", "h/b", "h/c"]
    with anyio.fail_after(DEADLINE):
        await store.clients()
        await _append_items(store, run, 0, refs=[*anchors, "b/1"],
                            items=[make_item(name) for name in (*anchors, "b/1")])
        for sequence, anchor in enumerate(anchors, start=1):
            await _append_items(store, run, sequence, refs=[*anchors, "b/1"],
                                items=[make_item(f"{anchor}/0")])
            assert await _listed(store, key) == (
                (set(anchors[:sequence]), False) if sequence <= 2 else (set(), True))
        with counting(store) as (reads, _):
            found = await store.read_with_items(key, sequence=0, now=T0)
    assert found is not None
    assert set(found[2]) == {*anchors, "b/1", *(f"{anchor}/0" for anchor in anchors)}
    assert reads.counts == {"Query": 1 + 4, "GetItem": 1, "BatchGetItem": 1}


async def test_removing_nested_items_costs_a_transaction_per_49(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The removal of an anchor with 300 nested items of 4 KB: one Query to find that there
    are some, the transaction taking the anchor, then per MB a Query and per 49 items of a
    page a transaction (each delete goes with the check of its key's count), and one update
    ending the removal; the large value's object goes too."""
    run = make_run("nested-removal-costs")
    key = key_of(run)
    with anyio.fail_after(SLOW_DEADLINE):
        await store.clients()
        await _append_items(store, run, 0, refs=["h/log"], items=[make_item("h/log")])
        await _nest(store, key, "h/log", REMOVED, size=4000)
        await store.put_items(key, [Item(key="h/log/big", value=os.urandom(450 * 1024))],
                              now=T0)
        await _release(store, run, "h/log")
        assert len(await _blob_keys(store, key)) == 1
        real_page = store._nested_page
        pages: list[int] = []

        async def counted_page(*args: Any, **kwargs: Any) -> Any:
            found = await real_page(*args, **kwargs)
            if kwargs.get("limit") is None:
                pages.append(len(found[0]))
            return found

        monkeypatch.setattr(store, "_nested_page", counted_page)
        with counting(store) as (dynamo, s3):
            await store._sweep_shared(key, ["h/log"], T0)
        assert await _nested_keys(store, key, "h/log") == []
        assert await _blob_keys(store, key) == []
        count = await _raw_item(store, key, layout.counter_sk("h/log"))
        listed = await _listed(store, key)
        await store.delete_run(key)

    assert dynamo.counts == {
        # The count and the item (and the count of "h", the key it is nested under); then,
        # with the first page of nested records, the count of "h" again.
        "BatchGetItem": 1 + 1,
        # Is anything nested; then the nested records, per MB, and (with the first page)
        # the counts of keys nested under the anchor: which of them are named.
        "Query": 1 + 2 + 1,
        # The anchor; the nested items: a transaction holds the check of the removal's
        # mark, the check of the count of "h" and 49 deletes with the checks of their
        # counts; the end of the removal (the count's mark and the run item's listing of
        # the anchor).
        "TransactWriteItems": 1 + sum(math.ceil(page / 49) for page in pages) + 1,
    }
    assert sum(pages) == REMOVED + 1
    assert len(pages) == 2
    assert s3.counts == {"DeleteObjects": 1}
    assert listed == (set(), False)
    assert count is not None
    assert "np" not in count
    assert float(count["xat"]["N"]) == float(count["gn"]["N"]) + layout.CONDEMNED_SECONDS


async def test_a_key_nested_under_a_named_one_stays_with_what_is_nested_under_it(
    store: DynamoDBStore,
) -> None:
    """The shared item ``h/a`` that its last checkpoint left stays, with what is nested under
    it, while a held checkpoint names ``h`` (the key it is nested under): ``h``'s rules
    decide. Once nothing names ``h``, they all go with it."""
    run = make_run("nested-under-named")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await store.clients()
        kept = [make_item("h"), make_item("h/a"), make_item("h/a/x")]
        await _append_items(store, run, 0, refs=["h", "h/a"], items=kept)
        await _append_items(store, run, 1, refs=["h"])
        assert await store.delete(key, 0, checkpoint_id=checkpoint_id_of(run, 0))
        await _purge_until_done(store, T0)
        found = await store.read_with_items(key, sequence=1, now=T0)
        assert found is not None
        assert found[2] == {item.key: item.value for item in kept}
        assert await _raw_item(store, key, layout.counter_sk("h/a")) is None

        assert await store.delete(key, 1, checkpoint_id=checkpoint_id_of(run, 1))
        await _purge_until_done(store, T0)
        assert await store.scan_items(key, prefix="", start_after=None, limit=10,
                                      reverse=False, now=T0) == []


async def test_an_interrupted_removal_is_completed_by_the_next_purge(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A removal that dies after deleting some nested items leaves its mark in the expiry
    index, due: meanwhile no append brings the anchor back (its nested items would show
    under the new one); the next purge deletes the rest, and then the anchor can be written
    anew, with nested items that a late worker of the old removal leaves alone."""
    run = make_run("nested-interrupted")
    key = key_of(run)
    with anyio.fail_after(SLOW_DEADLINE):
        await store.clients()
        await _append_items(store, run, 0, refs=["h/a"], items=[make_item("h/a")])
        await _nest(store, key, "h/a", 150)
        await _release(store, run, "h/a")

        real_transact = store._transact
        chunks = 0

        async def dying_transact(operations: list[dict[str, Any]]) -> None:
            nonlocal chunks
            if "ConditionCheck" in operations[0]:  # a chunk of nested deletes
                chunks += 1
                if chunks == 2:
                    raise RuntimeError("the process died")
            await real_transact(operations)

        monkeypatch.setattr(store, "_transact", dying_transact)
        with pytest.raises(RuntimeError, match="died"):
            await store._sweep_shared(key, ["h/a"], T0)
        monkeypatch.setattr(store, "_transact", real_transact)

        left = await _nested_keys(store, key, "h/a")
        assert 0 < len(left) < 150
        assert await store.get_items(key, ["h/a"], now=T0) == {}
        count = await _raw_item(store, key, layout.counter_sk("h/a"))
        assert count is not None
        token = count["np"]["S"]
        assert float(count["xat"]["N"]) <= T0  # due at once

        for items in ([make_item("h/a"), make_item("h/a/new")], [make_item("h/a/new")]):
            with pytest.raises(SharedItemGone):
                await _append_items(store, run, 2, refs=["h/a"], items=items)
        assert await store.get_items(key, ["h/a", "h/a/new"], now=T0) == {}

        await _purge_until_done(store, T0)
        assert await _nested_keys(store, key, "h/a") == []
        count = await _raw_item(store, key, layout.counter_sk("h/a"))
        assert count is not None
        assert "np" not in count

        await _append_items(store, run, 2, refs=["h/a"],
                            items=[make_item("h/a", b"new"), make_item("h/a/0", b"new 0")])
        await store._remove_nested(key, "h/a", token, T0)  # a late worker of the old removal
        found = await store.read_with_items(key, sequence=None, now=T0)
        assert found is not None
        assert found[2] == {"h/a": b"new", "h/a/0": b"new 0"}


async def test_an_anchor_named_again_keeps_its_nested_items(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append naming the anchor lands between the removal finding its nested items and
    taking it: the removal is cancelled, and nothing nested under the anchor goes."""
    run = make_run("nested-raced")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await store.clients()
        await _append_items(store, run, 0, refs=["h/a"], items=[make_item("h/a")])
        nested = await _nest(store, key, "h/a", 3)
        await _release(store, run, "h/a")

        real_page = store._nested_page
        raced = False

        async def racing_page(*args: Any, **kwargs: Any) -> Any:
            nonlocal raced
            found = await real_page(*args, **kwargs)
            if not raced:
                raced = True
                await _append_items(store, run, 2, refs=["h/a"])
            return found

        monkeypatch.setattr(store, "_nested_page", racing_page)
        await store._sweep_shared(key, ["h/a"], T0)
        monkeypatch.setattr(store, "_nested_page", real_page)
        assert raced

        found = await store.read_with_items(key, sequence=2, now=T0)
        assert found is not None
        assert found[2] == {"h/a": b"value-h/a", **nested}
        count = await _raw_item(store, key, layout.counter_sk("h/a"))
        assert count is not None
        assert "gn" not in count
        assert "np" not in count


async def test_a_rebuilt_run_item_looks_under_every_item(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str]
) -> None:
    """Which items have nested items is not in the checkpoints a rebuild reads: the rebuilt
    run item says any may, and reads still find every nested item."""
    run = make_run("nested-rebuilt")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await store.clients()
        await _append_items(store, run, 0, refs=["h/a"], items=[make_item("h/a")])
        await _append_items(store, run, 1, refs=["h/a"], items=[make_item("h/a/0")])
        ddb, _ = await store.clients()
        await ddb.update_item(
            TableName=store.table,
            Key={"PK": {"S": layout.partition(key)}, "SK": {"S": layout.RUN_SK}},
            UpdateExpression="SET bk = :garbage REMOVE nk",
            ExpressionAttributeValues={":garbage": {"B": os.urandom(24)}})
        await store.rebuild_run(key, run, now=T0)
        assert await _listed(store, key) == (set(), True)
        async with opened(provisioned, aws_names, prefix=store.prefix) as other:
            found = await other.read_with_items(key, sequence=None, now=T0)
    assert found is not None
    assert found[2] == {"h/a": b"value-h/a", "h/a/0": b"value-h/a/0"}


async def test_a_removal_ends_when_the_run_item_does_not_list_its_item(
    store: DynamoDBStore,
) -> None:
    """The end of a removal takes the anchor out of the run item's list with the count's
    mark; a run item that does not list it (it says any item may have nested items) leaves
    the mark to go alone."""
    run = make_run("nested-unlisted")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await store.clients()
        await _append_items(store, run, 0, refs=["h/a"], items=[make_item("h/a")])
        ddb, _ = await store.clients()
        await ddb.update_item(
            TableName=store.table,
            Key={"PK": {"S": layout.partition(key)}, "SK": {"S": layout.counter_sk("h/a")}},
            UpdateExpression="SET np = :token", ExpressionAttributeValues={":token": {"S": "t"}})
        with counting(store) as (ended, _):
            await store._end_nesting(key, "h/a", "t", T0 + 5)
        count = await _raw_item(store, key, layout.counter_sk("h/a"))
    assert count is not None
    assert "np" not in count
    assert float(count["xat"]["N"]) == T0 + 5
    assert ended.counts == {"TransactWriteItems": 1, "UpdateItem": 1}
