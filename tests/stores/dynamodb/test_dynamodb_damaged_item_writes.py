"""Writers of the DynamoDB store meeting an item record damaged by hand (an attribute of
another type, no value): a damaged item is not live, so every writer that brings a value for
its key replaces it, and the new value reads back (also in the checkpoint that wrote it)."""

from __future__ import annotations

import secrets

import anyio
import pytest

from fastcheckpoint import _ids
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

DAMAGES = {
    "owner-string": ("SET o = :v", {":v": {"S": "x"}}),
    "value-number": ("SET v = :v", {":v": {"N": "3"}}),
    "expiry-string": ("SET x = :v", {":v": {"S": "soon"}}),
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
