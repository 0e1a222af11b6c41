"""DynamoDB+S3 review of the pin record (``SK = a``) of a run's first append too large for one
transaction: its pins are written with no run item, and another first append may begin the
run's life before its own transaction. Whatever that other append did to its pins, the first
one lands only reading back its own values at every key, or is refused; and a refusal of its
transaction by both the run item and the pin record tells the run as it is, at once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from fastcheckpoint.errors import SequenceConflict, SharedItemGone
from fastcheckpoint.stores import _dynamodb_layout as layout
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
from tests.stores.dynamodb.test_dynamodb_grace_review import _first_transaction
from tests.stores.dynamodb.test_dynamodb_stale_pins import _emptied, anyio_backend

__all__ = ["anyio_backend", "atomic_moto", "aws_names", "moto_endpoint", "provisioned",
           "store"]

pytestmark = pytest.mark.anyio

# 47 fit in a first append's transaction: the other 63 take two pin transactions (49, 14).
MANY = [f"m/{index:03}" for index in range(110)]


async def _held_before_its_transaction(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch, first: Callable[[], Awaitable[Any]],
    meanwhile: Callable[[], Awaitable[Any]], sent: list[list[dict[str, Any]]],
) -> None:
    """``first`` (an append through ``store``) held once its pins landed, before its own
    transaction, while ``meanwhile`` runs (to its end); the transactions ``first`` sends from
    its own on are added to ``sent``."""
    transact = store._transact

    async def held(operations: Any, *args: Any, **kwargs: Any) -> Any:
        if _first_transaction(operations) and not sent:
            await meanwhile()
        if _first_transaction(operations) or sent:
            sent.append(list(operations))
        return await transact(operations, *args, **kwargs)

    monkeypatch.setattr(store, "_transact", held)
    try:
        await first()
    finally:
        monkeypatch.setattr(store, "_transact", transact)


async def test_a_first_append_does_not_land_over_an_expired_life_that_wrote_over_its_pins(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch, provisioned: str,
    aws_names: tuple[str, str],
) -> None:
    """A first append of 110 items pins 63 of them (no run item) and is held before its own
    transaction. Meanwhile another process's first append of the run, small (no pins: the
    pin record is untouched), writes 20 of those keys in its transaction, over the pins
    (any item an append wrote), with a checkpoint expiring at once. The first append's
    transaction is refused by that run item, and plans again over the expired life: with a
    run item, no check of the pin record was made, and it landed, reading back the other's
    values at the 20 keys it pinned. Its pins were written before that life began, which
    may have written over them: it is refused (``SharedItemGone``: append it again)."""
    run = make_run("pin-record-expired-over")
    key = key_of(run)
    life = make_run("pin-record-expired-over")  # another life (incarnation) of the run key
    overlapping = MANY[-1:]
    try:
        with anyio.fail_after(DEADLINE):
            await _emptied(store, key, monkeypatch)
            async with opened(provisioned, aws_names) as other:

                async def first() -> None:
                    await _append_items(store, run, 0, refs=MANY, now=T0 + 100, items=[
                        make_item(name, b"first") for name in MANY])

                async def meanwhile() -> None:
                    await _append_items(other, life, 0, refs=overlapping, now=T0,
                                        expires_at=T0 + 10, items=[
                                            make_item(name, b"other") for name in overlapping])

                landed = True
                try:
                    await _held_before_its_transaction(store, monkeypatch, first, meanwhile,
                                                       [])
                except SharedItemGone:
                    landed = False
            if landed:  # on main: it landed, reading the other's values
                store._families.pop(key, None)
                read = await _read(store, run, None, now=T0 + 100)
                assert read is not None
                assert read[2] == dict.fromkeys(MANY, b"first")
            assert not landed
    finally:
        await _emptied(store, key, monkeypatch)


async def test_a_first_append_refused_by_the_run_item_and_its_pin_record_tells_the_run(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch, provisioned: str,
    aws_names: tuple[str, str],
) -> None:
    """A first append of 110 items pins 63 of them and is held before its own transaction,
    while another process's first append of the same 110 keys pins over them (taking the
    pin record) and lands. The first's transaction is refused by both the run item and the
    pin record (deleted by the other's landing). Before, the record's delete counted as a
    guard: the same transaction was sent again, attempt after attempt, over the run item it
    never read, and the conflict told no run (``latest_sequence`` ``None``). Now the run
    item the refusal returned decides: a conflict with checkpoint 0, after that one
    transaction."""
    run = make_run("pin-record-both-refuse")
    key = key_of(run)
    try:
        with anyio.fail_after(DEADLINE):
            await _emptied(store, key, monkeypatch)
            async with opened(provisioned, aws_names) as other:

                async def first() -> None:
                    await _append_items(store, run, 0, refs=MANY, items=[
                        make_item(name, b"first") for name in MANY])

                async def meanwhile() -> None:
                    await _append_items(other, run, 0, refs=MANY, items=[
                        make_item(name, b"other") for name in MANY])

                sent: list[list[dict[str, Any]]] = []
                with pytest.raises(SequenceConflict) as raised:
                    await _held_before_its_transaction(store, monkeypatch, first, meanwhile,
                                                       sent)
            # Its own transaction once (then the undo of its raises, in the other's life).
            own = [operations for operations in sent if _first_transaction(operations)]
            assert (raised.value.latest_sequence, len(own)) == (0, 1)
            assert await _raw_item(store, key, layout.PIN_SK) is None
            store._families.pop(key, None)
            read = await _read(store, run, None)
            assert read is not None
            assert read[2] == dict.fromkeys(MANY, b"other")
    finally:
        await _emptied(store, key, monkeypatch)
