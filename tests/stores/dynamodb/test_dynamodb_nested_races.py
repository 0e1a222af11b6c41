"""The removal of items nested under a shared item, raced by an append that starts naming one
of them (or a key they are nested under) after the removal read which keys are named and
before it deletes: the append is acknowledged, so what it names stays."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from fastcheckpoint.errors import SharedItemGone
from fastcheckpoint.stores import Item
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
from tests.stores.dynamodb.test_dynamodb_nested import _list, _release

__all__ = ["atomic_moto", "aws_names", "moto_endpoint", "provisioned", "store"]

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


async def _scan(store: DynamoDBStore, key: str, prefix: str) -> list[str]:
    found = await store.scan_items(key, prefix=prefix, start_after=None, limit=100,
                                   reverse=False, now=T0)
    return [found_key for found_key, _ in found]


NESTED = ["h/a/0", "h/a/1", "h/a/1/x", "h/a/2"]


@pytest.mark.parametrize(("named", "kept", "transactions"), [
    # A key nested under the removed one stays with what is nested under it; the others go
    # in a second transaction.
    ("h/a/1", ["h/a/1", "h/a/1/x"], 2),
    # The key the removed one is nested under: all of them stay.
    ("h", NESTED, 1),
])
async def test_an_append_naming_a_nested_key_during_the_removal_keeps_it(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch, named: str, kept: list[str], transactions: int,
) -> None:
    """The removal of ``h/a`` has read the counts of the keys nested under it (and of ``h``)
    when an append naming ``named``, unnamed until then, is acknowledged; then the removal
    deletes. Its delete of each nested item holds only while that item's count (and the
    counts of the keys it is nested under) are still zero, so the named items stay; the
    transaction refused, it goes on without them. The others go."""
    run = make_run(f"nested-named-meanwhile-{named}")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await store.clients()
        await _append_items(store, run, 0, refs=["h/a"], items=[make_item("h/a")])
        await store.put_items(key, [Item(key=k, value=k.encode()) for k in NESTED], now=T0)
        await _list(store, key, "h/a")
        await _release(store, run, "h/a")

        real_named = store._named_around
        raced = 0

        async def named_then_raced(*args: Any) -> set[str]:
            nonlocal raced
            found = await real_named(*args)
            if not raced:  # the other process's append lands after the read
                raced += 1
                await _append_items(other, run, 2, refs=[named])
            return found

        monkeypatch.setattr(store, "_named_around", named_then_raced)
        async with opened(provisioned, aws_names, prefix=store.prefix) as other:
            with counting(store) as (dynamo, _):
                await store._sweep_shared(key, ["h/a"], T0)
        monkeypatch.setattr(store, "_named_around", real_named)
        assert raced == 1

        left = await _scan(store, key, "h/")
        assert left == kept
        stored = await store.get_items(key, kept, now=T0)
        assert stored == {k: k.encode() for k in kept}
        count = await _raw_item(store, key, layout.counter_sk("h/a"))
        assert count is not None
        assert "np" not in count  # the removal ended
    # No second read: the refused transaction said which count was raised.
    assert dynamo.counts["Query"] == 1 + 1 + 1  # anything nested; counts under h/a; page
    # The item; the refused transaction (and the one after it); the end of the removal.
    assert dynamo.counts["TransactWriteItems"] == 1 + transactions + 1


async def test_an_append_naming_the_key_above_before_the_removal_commits_keeps_the_item(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cleanup loop read the count of ``h/a`` (zero) and of ``h`` (none) and is about to
    take ``h/a``, when an append naming ``h`` is acknowledged: ``h/a`` is now nested under a
    named key, so the transaction taking it (which checks that ``h`` is still unnamed) is
    refused and it stays, with what is nested under it; the next pass drops its count."""
    run = make_run("nested-parent-named-meanwhile")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await store.clients()
        await _append_items(store, run, 0, refs=["h/a"],
                            items=[make_item("h/a"), make_item("h/a/0")])
        await _release(store, run, "h/a")

        real_page = store._nested_page
        raced = 0

        async def page_then_raced(*args: Any, **kwargs: Any) -> Any:
            nonlocal raced
            found = await real_page(*args, **kwargs)
            if not raced:  # the look for nested items, after the counts were read
                raced += 1
                await _append_items(other, run, 2, refs=["h"])
            return found

        monkeypatch.setattr(store, "_nested_page", page_then_raced)
        async with opened(provisioned, aws_names, prefix=store.prefix) as other:
            await store._sweep_shared(key, ["h/a"], T0)
        monkeypatch.setattr(store, "_nested_page", real_page)
        assert raced == 1

        assert await _scan(store, key, "h") == ["h/a", "h/a/0"]
        count = await _raw_item(store, key, layout.counter_sk("h/a"))
        assert count is not None
        assert "gn" not in count
        assert "np" not in count
        await store._sweep_shared(key, ["h/a"], T0)  # the next pass: the count alone goes
        assert await _raw_item(store, key, layout.counter_sk("h/a")) is None
        assert await _scan(store, key, "h") == ["h/a", "h/a/0"]


@pytest.mark.parametrize(("named", "ended"), [
    ("h/a/2", False),  # while the removal's mark on h/a still stands
    ("h/a/2", True),
    ("h/a/1/x", True),  # nested under a nested key
])
async def test_an_append_naming_a_nested_key_the_removal_took_is_refused(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch, named: str, ended: bool,
) -> None:
    """The removal of ``h/a`` has deleted ``named`` (unnamed then) when an append whose writer
    saw it before names it without writing it: the append must be refused, nothing written,
    not acknowledged without the item; written again with its value, it is taken."""
    run = make_run(f"nested-named-after-{named}-{ended}")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await store.clients()
        await _append_items(store, run, 0, refs=["h/a"], items=[make_item("h/a")])
        await store.put_items(key, [Item(key=k, value=k.encode()) for k in NESTED], now=T0)
        await _list(store, key, "h/a")
        await _release(store, run, "h/a")

        real_end = store._end_nesting
        refused: list[SharedItemGone] = []

        async def append_then_end(*args: Any) -> None:
            if not ended:  # the nested items are gone, the removal not yet over
                refused.extend(await _refused(store, run, named))
            await real_end(*args)

        monkeypatch.setattr(store, "_end_nesting", append_then_end)
        await store._sweep_shared(key, ["h/a"], T0)
        monkeypatch.setattr(store, "_end_nesting", real_end)
        assert await _scan(store, key, "h/") == []
        if ended:
            refused.extend(await _refused(store, run, named))
        assert [error.keys for error in refused] == [(named,)]
        assert await store.read_with_items(key, sequence=2, now=T0) is None

        await _append_items(store, run, 2, refs=[named], items=[make_item(named)])
        found = await store.read_with_items(key, sequence=2, now=T0)
        assert found is not None
        assert found[2] == {named: f"value-{named}".encode()}
        # The marks go with the cleanup pass after they lapse; the named key's count stays.
        while not (await store.purge_expired(now=T0 + layout.CONDEMNED_SECONDS, limit=100))[1]:
            pass
        assert [k for k in NESTED
                if await _raw_item(store, key, layout.counter_sk(k)) is not None] == [named]


async def _refused(store: DynamoDBStore, run: Any, named: str) -> list[SharedItemGone]:
    try:
        await _append_items(store, run, 2, refs=[named])
    except SharedItemGone as error:
        return [error]
    return []


async def test_an_append_naming_a_key_above_the_removed_one_after_the_removal_is_refused(
    store: DynamoDBStore,
) -> None:
    """Checkpoint 0 named ``h`` (an item of its own) and ``h/a``, both unnamed now; a read of
    a checkpoint naming ``h`` returns what is nested under it. The cleanup loop reaches the
    count of ``h/a`` first: with ``h``'s own removal due, that removal goes first and takes
    ``h/a`` with the rest, condemning ``h``, so an append naming ``h`` without writing it
    afterwards (its writer saw ``h/a``) is refused, nothing written, not acknowledged
    reading back without ``h/a``."""
    run = make_run("nested-parent-after")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await store.clients()
        await _append_items(store, run, 0, refs=["h/a", "h"],
                            items=[make_item(k) for k in ["h", "h/a", "h/a/0"]])
        found = await store.read_with_items(key, sequence=0, now=T0)
        assert found is not None
        assert sorted(found[2]) == ["h", "h/a", "h/a/0"]
        await _release(store, run, "h/a")
        await store._sweep_shared(key, ["h/a"], T0)

        assert await _scan(store, key, "h") == []
        assert [error.keys for error in await _refused(store, run, "h")] == [("h",)]
        assert await store.read_with_items(key, sequence=2, now=T0) is None
        count = await _raw_item(store, key, layout.counter_sk("h/a"))
        assert count is not None
        assert "gn" in count  # condemned by h's removal: its entry moved a day on


@pytest.mark.parametrize(("removed", "nested", "fenced"), [
    # A key under 110 others (``k``, ``k/``, ``k//``...: 112 bytes), an item nested under it.
    ("k" + "/" * 110 + "x", "k" + "/" * 110 + "x/0", "k"),
    # ``k``, an item nested under it 110 keys deep: the marks of the keys between.
    ("k", "k" + "/" * 110 + "x", "k/"),
])
async def test_a_removal_of_a_key_nested_deeper_than_a_transaction_holds(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch, removed: str, nested: str,
    fenced: str,
) -> None:
    """The checks of the keys above the removed item (or the marks of the keys between it
    and an item nested under it) do not fit in the transaction taking the item (nor in the
    one taking the nested item), so those that do not fit are fences sent first, in their
    own; every transaction holds at most 100 operations, the removal completes, and the
    outermost keys are fenced (an append naming ``fenced`` is refused)."""
    deep = removed
    run = make_run(f"nested-deep-{len(removed)}")
    key = key_of(run)
    sizes: list[int] = []
    real_transact = store._transact

    async def measured(operations: list[dict[str, Any]], *args: Any, **kwargs: Any) -> Any:
        sizes.append(len(operations))
        return await real_transact(operations, *args, **kwargs)

    with anyio.fail_after(DEADLINE):
        await store.clients()
        await _append_items(store, run, 0, refs=[deep],
                            items=[make_item(deep), make_item(nested)])
        await _release(store, run, deep)
        monkeypatch.setattr(store, "_transact", measured)
        await store._sweep_shared(key, [deep], T0)
        monkeypatch.setattr(store, "_transact", real_transact)

        assert sizes
        assert max(sizes) <= 100
        assert await _scan(store, key, "k") == []
        count = await _raw_item(store, key, layout.counter_sk(deep))
        assert count is not None
        assert "np" not in count  # the removal ended
        assert "gn" in count
        assert [error.keys for error in await _refused(store, run, fenced)] == [(fenced,)]
