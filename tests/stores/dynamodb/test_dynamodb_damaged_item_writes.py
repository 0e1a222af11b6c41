"""Writers of the DynamoDB store meeting an item record damaged by hand (an attribute of
another type, no value): a damaged item is not live, so every writer that brings a value for
its key replaces it, and the new value reads back (also in the checkpoint that wrote it)."""

from __future__ import annotations

import secrets

import anyio
import pytest

from fastcheckpoint import _ids
from fastcheckpoint.errors import CorruptCheckpointError
from fastcheckpoint.stores import _dynamodb_layout as layout
from fastcheckpoint.stores.dynamodb import DynamoDBStore
from fastcheckpoint.testing._adapter import _append_items
from fastcheckpoint.testing._builders import T0, key_of, make_item, make_run
from tests.stores._moto import moto_endpoint
from tests.stores.dynamodb.test_dynamodb import (
    DEADLINE,
    atomic_moto,
    aws_names,
    provisioned,
    store,
)
from tests.stores.dynamodb.test_dynamodb_damage_fixes import _edit

__all__ = ["atomic_moto", "aws_names", "moto_endpoint", "provisioned", "store"]

pytestmark = pytest.mark.anyio

# An expiry of another type is damage too, but moto fails a condition comparing it with a
# number (TypeError) where DynamoDB finds it false: not tested here.
DAMAGES = {
    "owner-string": ("SET o = :v", {":v": {"S": "x"}}),
    "value-number": ("SET v = :v", {":v": {"N": "3"}}),
    "no-value": ("REMOVE v", None),
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


def _unique(name: str) -> str:
    return f"{name}-{secrets.token_hex(4)}"


async def _damage(store: DynamoDBStore, run_key: str, sort_key: str, damage: str) -> None:
    expression, values = DAMAGES[damage]
    await _edit(store, layout.partition(run_key), sort_key, expression, values)


async def _items_of(store: DynamoDBStore, run_key: str, sequence: int) -> dict[str, bytes]:
    found = await store.read_with_items(run_key, sequence=sequence, now=T0)
    assert found is not None
    return found[2]


async def _loose(store: DynamoDBStore, damage: str) -> str:
    """A run holding unowned items a and b, b damaged."""
    key = _ids.key_of(_unique("loose"))
    await store.put_items(key, [make_item("a", b"A"), make_item("b", b"B")], now=T0)
    await _damage(store, key, layout.item_sk("b"), damage)
    return key


# -- put_items and put_owned_items over an owner of another type ---------------------------


async def test_put_items_replaces_an_item_whose_owner_has_another_type(
    store: DynamoDBStore,
) -> None:
    with anyio.fail_after(DEADLINE):
        key = await _loose(store, "owner-string")
        await store.put_items(key, [make_item("b", b"NEW")], now=T0)
        assert await store.get_items(key, ["a", "b"], now=T0) == {"a": b"A", "b": b"NEW"}
        # The key is an item like any other again: overwritten and deleted.
        await store.put_items(key, [make_item("b", b"NEWER")], now=T0)
        assert await store.get_items(key, ["b"], now=T0) == {"b": b"NEWER"}
        assert await store.delete_items(key, ["b"]) == 1


async def test_put_owned_items_replaces_an_anchor_whose_owner_has_another_type(
    store: DynamoDBStore,
) -> None:
    with anyio.fail_after(DEADLINE):
        run = make_run(_unique("owned"))
        key = key_of(run)
        record = await _append_items(store, run, 0, items=[make_item("w", b"W0", owner=0)])
        await _damage(store, key, layout.item_sk("w"), "owner-string")
        assert await store.put_owned_items(
            key, [make_item("w", b"NEW", owner=0)], owner=0,
            checkpoint_id=record.checkpoint_id, if_absent=False, now=T0)
        assert await store.get_items(key, ["w"], now=T0) == {"w": b"NEW"}
        assert await _items_of(store, key, 0) == {"w": b"NEW"}


# -- writers that keep a live item replace a damaged one ------------------------------------


@pytest.mark.parametrize("damage", list(DAMAGES))
async def test_a_create_only_put_replaces_a_damaged_item(
    store: DynamoDBStore, damage: str
) -> None:
    with anyio.fail_after(DEADLINE):
        key = await _loose(store, damage)
        await store.put_items(key, [make_item("b", b"NEW")], create_only=True, now=T0)
        assert await store.get_items(key, ["a", "b"], now=T0) == {"a": b"A", "b": b"NEW"}


@pytest.mark.parametrize("damage", list(DAMAGES))
async def test_an_append_bringing_a_value_replaces_a_damaged_item(
    store: DynamoDBStore, damage: str
) -> None:
    with anyio.fail_after(DEADLINE):
        run = make_run(_unique("append"))
        key = key_of(run)
        await _append_items(store, run, 0, refs=["a", "b"],
                            items=[make_item("a", b"A"), make_item("b", b"B0")])
        await _damage(store, key, layout.item_sk("b"), damage)
        # The next checkpoint names both and resends b's value (a LangGraph saver does,
        # once a read reported b damaged): it is written, and the checkpoint reads whole.
        await _append_items(store, run, 1, refs=["a", "b"], items=[make_item("b", b"B1")])
        assert await _items_of(store, key, 1) == {"a": b"A", "b": b"B1"}
        assert await store.get_items(key, ["b"], now=T0) == {"b": b"B1"}


@pytest.mark.parametrize("damage", ["owner-string"])
async def test_an_append_owning_a_key_replaces_a_damaged_anchor(
    store: DynamoDBStore, damage: str
) -> None:
    with anyio.fail_after(DEADLINE):
        run = make_run(_unique("anchor"))
        key = key_of(run)
        await _append_items(store, run, 0, items=[make_item("w", b"W0", owner=0)])
        await _damage(store, key, layout.item_sk("w"), damage)
        await _append_items(store, run, 1, items=[make_item("w", b"W1", owner=1)])
        assert await _items_of(store, key, 1) == {"w": b"W1"}
        assert await store.get_items(key, ["w"], now=T0) == {"w": b"W1"}


@pytest.mark.parametrize("damage", ["owner-string"])
async def test_put_owned_items_if_absent_replaces_a_damaged_anchor(
    store: DynamoDBStore, damage: str
) -> None:
    with anyio.fail_after(DEADLINE):
        run = make_run(_unique("absent"))
        key = key_of(run)
        record = await _append_items(store, run, 0, items=[make_item("w", b"W0", owner=0)])
        await _damage(store, key, layout.item_sk("w"), damage)
        assert await store.put_owned_items(
            key, [make_item("w", b"NEW", owner=0)], owner=0,
            checkpoint_id=record.checkpoint_id, if_absent=True, now=T0)
        assert await _items_of(store, key, 0) == {"w": b"NEW"}
        assert await store.get_items(key, ["w"], now=T0) == {"w": b"NEW"}


async def test_an_append_only_naming_a_damaged_item_is_accepted_and_reads_report_it(
    store: DynamoDBStore,
) -> None:
    # The store does not check the refs an append names in its transaction (that would
    # cost a read per ref): the checkpoint is acknowledged, and its read names the item.
    with anyio.fail_after(DEADLINE):
        run = make_run(_unique("named"))
        key = key_of(run)
        await _append_items(store, run, 0, refs=["b"], items=[make_item("b", b"B0")])
        await _damage(store, key, layout.item_sk("b"), "value-number")
        await _append_items(store, run, 1, refs=["b"])
        with pytest.raises(CorruptCheckpointError) as raised:
            await store.read_with_items(key, sequence=1, now=T0)
        assert (raised.value.key or "").endswith("/i#b")


# -- a sound anchor pointing to a damaged value ---------------------------------------------


@pytest.mark.parametrize("damage", ["value-number", "no-value"])
async def test_put_owned_items_if_absent_replaces_a_damaged_owned_value(
    store: DynamoDBStore, damage: str
) -> None:
    with anyio.fail_after(DEADLINE):
        run = make_run(_unique("value"))
        key = key_of(run)
        record = await _append_items(store, run, 0, items=[make_item("w", b"W0", owner=0),
                                                           make_item("u", b"U0", owner=0)])
        await _damage(store, key, layout.owned_sk(0, "w"), damage)
        # u is sound: kept as it is, as an insert-if-absent keeps every live item.
        assert await store.put_owned_items(
            key, [make_item("w", b"NEW", owner=0), make_item("u", b"NEW", owner=0)],
            owner=0, checkpoint_id=record.checkpoint_id, if_absent=True, now=T0)
        assert await _items_of(store, key, 0) == {"w": b"NEW", "u": b"U0"}


@pytest.mark.parametrize("damage", ["value-number", "no-value"])
async def test_an_append_owning_a_key_replaces_an_anchor_to_a_damaged_value(
    store: DynamoDBStore, damage: str
) -> None:
    with anyio.fail_after(DEADLINE):
        run = make_run(_unique("avalue"))
        key = key_of(run)
        await _append_items(store, run, 0, items=[make_item("w", b"W0", owner=0)])
        await _damage(store, key, layout.owned_sk(0, "w"), damage)
        await _append_items(store, run, 1, refs=["w"], items=[make_item("w", b"W1", owner=1)])
        assert await _items_of(store, key, 1) == {"w": b"W1"}
        assert await store.get_items(key, ["w"], now=T0) == {"w": b"W1"}


# -- a LangGraph thread over a damaged channel value ----------------------------------------


async def test_a_langgraph_save_resending_a_damaged_channel_value_heals_the_thread(
    store: DynamoDBStore,
) -> None:
    from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
    from tests.integrations._langgraph_support import CountingStore, config, put

    with anyio.fail_after(DEADLINE):
        counting = CountingStore(store)
        saver = FastCheckpointSaver(counting)
        thread = _unique("thread")
        first = await put(saver, thread, values={"a": "A1", "b": "B1"},
                          versions={"a": 1, "b": 1})
        run_key = counting.last["append_with_items"][0][0]
        stored = await store.scan_items(run_key, now=T0 + 1e9)
        channel_a = next(key for key, value in stored if b"A1" in value)
        await _damage(store, run_key, layout.item_sk(channel_a), "value-number")
        with pytest.raises(CorruptCheckpointError):
            await saver.aget_tuple(config(thread, first))
        # The next save sends channel a's value again (same version): the damaged record
        # is replaced, and the thread reads on.
        await put(saver, thread, parent=first, values={"a": "A1", "b": "B2"},
                  versions={"a": 1, "b": 2}, new_versions={"a": 1, "b": 2})
        latest = await saver.aget_tuple(config(thread))
        assert latest is not None
        assert latest.checkpoint["channel_values"] == {"a": "A1", "b": "B2"}
