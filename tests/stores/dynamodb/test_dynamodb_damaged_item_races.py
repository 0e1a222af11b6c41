"""DynamoDB: a put refused by a damaged item record is sent again to replace it, but only
while the record is still the one the refusal returned (its write token, ``wt``): a good
value another writer put in between is kept, and the late writer gets the conflict."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from fastcheckpoint.errors import ConflictError
from fastcheckpoint.stores.dynamodb import DynamoDBStore
from fastcheckpoint.testing._builders import T0, make_item
from tests.stores._moto import moto_endpoint
from tests.stores.dynamodb.test_dynamodb import (
    DEADLINE,
    atomic_moto,
    aws_names,
    provisioned,
    store,
)
from tests.stores.dynamodb.test_dynamodb_damaged_item_writes import DAMAGES, _loose

__all__ = ["atomic_moto", "aws_names", "moto_endpoint", "provisioned", "store"]

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


@pytest.mark.parametrize("damage", list(DAMAGES))
async def test_a_good_value_written_between_the_refusal_and_the_resend_is_kept(
    store: DynamoDBStore, damage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """b is damaged. A create-only put of b is refused by it; before the put is sent again
    over the damaged record, another create-only put writes a good b. The resend finds the
    record changed: the good b stays and the late put raises ConflictError."""
    transact = DynamoDBStore._transact
    raced: list[bool] = []

    async def another_writes_first(self: DynamoDBStore, operations: list[dict[str, Any]]) -> None:
        if any(op.get("_over_damage") for op in operations) and not raced:
            raced.append(True)
            await self.put_items(key, [make_item("b", b"good")], create_only=True, now=T0)
        await transact(self, operations)

    with anyio.fail_after(DEADLINE):
        key = await _loose(store, damage)
        monkeypatch.setattr(DynamoDBStore, "_transact", another_writes_first)
        with pytest.raises(ConflictError):
            await store.put_items(key, [make_item("b", b"late")], create_only=True, now=T0)
        monkeypatch.undo()
        assert raced == [True]
        assert await store.get_items(key, ["a", "b"], now=T0) == {"a": b"A", "b": b"good"}
