"""Review of the DynamoDB+S3 pins (each pin transaction checks the run item's revision),
the new life's sweep of its ended life's orphan values, and the undo that keeps pinned
values. Each test is an interleaving that lost or leaked before its fix (each docstring
tells how); they were held as strict xfails until then."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from fastcheckpoint.errors import CheckpointError, SequenceConflict, StoreUnavailableError
from fastcheckpoint.stores import _dynamodb_layout as layout
from fastcheckpoint.stores.dynamodb import DEFAULT_THRESHOLD, DynamoDBStore
from fastcheckpoint.testing._adapter import _append_items
from fastcheckpoint.testing._builders import T0, key_of, make_checkpoint, make_item, make_run
from tests.stores._moto import moto_endpoint
from tests.stores.dynamodb.test_dynamodb import (
    DEADLINE,
    _blob_keys,
    _purge_until_done,
    _raw_item,
    atomic_moto,
    aws_names,
    opened,
    provisioned,
    store,
)

__all__ = ["atomic_moto", "aws_names", "moto_endpoint", "provisioned", "store"]

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


async def test_a_first_append_over_a_removed_life_spares_a_new_life_at_the_same_revision(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
) -> None:
    """Process P appended checkpoints 0..2 of life L1 (revision 2 in its cache); L1 expired.
    Process Q removes the run (``delete_run`` deletes the run item) and creates L2 with
    checkpoints 0..2: L2's run item is at revision 2 again. P now creates a third life over
    what its cache holds (L1, expired): ``_plan_first`` conditions the run item's put (and,
    since 00669c6, each pin, ``_pin_check(run_key, previous.rev)``) on ``rev = 2`` only, no
    run id or incarnation, so it lands on L2: L2's run item is replaced, its checkpoint 0
    overwritten and 1, 2 deleted by the leftovers (conditioned on L2's own ids, read now).
    L2's acknowledged checkpoint 2 is lost."""
    l1 = make_run("rev-aba", expires_at=T0 + 10)
    l2 = make_run("rev-aba", created_at=T0 + 20)
    l3 = make_run("rev-aba", created_at=T0 + 20)
    key = key_of(l1)
    async with opened(provisioned, aws_names, prefix=store.prefix) as other:
        try:
            with anyio.fail_after(DEADLINE):
                for sequence in range(3):
                    await _append_items(store, l1, sequence, expires_at=T0 + 10)
                await other.delete_run(key)
                acknowledged = None
                for sequence in range(3):
                    acknowledged = await _append_items(other, l2, sequence, now=T0 + 20)
                assert acknowledged is not None
                with contextlib.suppress(CheckpointError):  # L2 is live: refused
                    await store.append(key, make_checkpoint(l3, 0, created_at=T0 + 20),
                                       run=l3, keep_latest=None, now=T0 + 20)
                found = await other.get(key, 2, now=T0 + 20)
                assert found is not None
                assert found[0].checkpoint_id == acknowledged.checkpoint_id
        finally:
            await other.delete_run(key)


async def test_a_stale_writer_of_a_removed_life_lands_nothing_in_a_new_life_at_its_revision(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
) -> None:
    """P appended checkpoints 0..2 of L1 (no expiry; revision 2 in its cache). Q removes the
    run and creates L2 with checkpoints 0..2 (revision 2 again, same run id). P appends
    checkpoint 3 of L1 naming 60 new shared items (more than fit: pins): ``_pin_check``
    and ``_run_update`` check ``rev = 2 AND rid = <run id>``, which L2's run item passes.
    P's create of a removed life is acknowledged (the contract: refused, as L2's
    incarnation differs), its pins and its checkpoint land in L2: the run item (L2's
    incarnation) now says latest 3, a checkpoint of L1."""
    l1 = make_run("rev-aba-stale")
    l2 = make_run("rev-aba-stale", created_at=T0 + 20)
    key = key_of(l1)
    names = [f"s/{index}" for index in range(60)]
    async with opened(provisioned, aws_names, prefix=store.prefix) as other:
        try:
            with anyio.fail_after(DEADLINE):
                for sequence in range(3):
                    await _append_items(store, l1, sequence)
                await other.delete_run(key)
                acknowledged = None
                for sequence in range(3):
                    acknowledged = await _append_items(other, l2, sequence, now=T0 + 20)
                assert acknowledged is not None
                with pytest.raises(SequenceConflict):  # its life was removed
                    await _append_items(store, l1, 3, refs=names, now=T0 + 20,
                                        items=[make_item(name) for name in names])
                assert await _raw_item(other, key, layout.counter_sk(names[-1])) is None
                latest = await other.latest(key, now=T0 + 20)
                assert latest is not None
                assert latest[0].checkpoint_id == acknowledged.checkpoint_id
        finally:
            await other.delete_run(key)


async def test_the_cleanup_loop_marks_no_new_life_at_its_ended_life_s_revision(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cleanup loop P reads the run item of L1 (expired, revision 2) to remove it whole.
    Meanwhile Q removes the run and creates L2 with checkpoints 0..2 (revision 2 again).
    P's mark (``pg``, conditioned on the revision it read) must not land on L2: its
    removal would take L2's acknowledged checkpoints."""
    l1 = make_run("rev-aba-purge", expires_at=T0 + 10)
    l2 = make_run("rev-aba-purge", created_at=T0 + 20)
    key = key_of(l1)
    async with opened(provisioned, aws_names, prefix=store.prefix) as other:
        read_state = store._read_state
        acknowledged: list[Any] = []

        async def read_then_new_life(run_key: str) -> Any:
            state = await read_state(run_key)
            if run_key == key and not acknowledged:
                await other.delete_run(key)
                for sequence in range(3):
                    acknowledged.append(
                        await _append_items(other, l2, sequence, now=T0 + 20))
            return state

        try:
            with anyio.fail_after(DEADLINE):
                for sequence in range(3):
                    await _append_items(store, l1, sequence, expires_at=T0 + 10)
                monkeypatch.setattr(store, "_read_state", read_then_new_life)
                await _purge_until_done(store, T0 + 20)
                monkeypatch.undo()
                assert acknowledged
                latest = await other.latest(key, now=T0 + 20)
                assert latest is not None
                assert latest[0].checkpoint_id == acknowledged[-1].checkpoint_id
        finally:
            monkeypatch.undo()
            await other.delete_run(key)


def _after_pins(
    monkeypatch: pytest.MonkeyPatch, store: DynamoDBStore, meanwhile: Callable[[], Awaitable[None]]
) -> None:
    """Make ``store``'s appends run ``meanwhile`` after their pins landed, before their own
    transaction (a slow process)."""
    pin = store._pin

    async def held(*args: Any, **kwargs: Any) -> bool:
        landed = await pin(*args, **kwargs)
        await meanwhile()
        return landed

    monkeypatch.setattr(store, "_pin", held)


def _pin_transaction(operations: list[dict[str, Any]]) -> bool:
    """Whether a transaction is one of an append's pins: it begins with the check of the run
    item (``_pin_check``), where an append's own begins with the run item's write."""
    check = operations[0].get("ConditionCheck", {})
    return bool(check) and check["Key"]["SK"]["S"] == layout.RUN_SK


@pytest.mark.parametrize("answer", ["lost", "cancelled"])
async def test_a_pin_whose_reply_is_lost_keeps_the_values_it_may_have_written(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch, answer: str,
) -> None:
    """P appends checkpoint 1 writing 60 new shared items with large values: those that do
    not fit go in a pin. The pin lands but its reply is lost (a timeout: the store raises
    :class:`StoreUnavailableError`), or P's call is cancelled before the reply reaches it.
    Meanwhile Q appends checkpoint 1 naming one of them (the item is live: Q does not write
    it) and is acknowledged. P's append fails with ``outcome.unknown`` False (set only
    around its own transaction), so ``_undo_additions`` deleted every blob not in
    ``pinned_shared``, which ``_pin`` filled only after a chunk's reply: the value Q's
    checkpoint names was deleted. A chunk with no definite answer now counts as landed for
    the values it put."""
    run = make_run(f"pin-reply-{answer}")
    key = key_of(run)
    names = [f"s/{index}" for index in range(60)]
    values = {name: os.urandom(DEFAULT_THRESHOLD + 1) for name in names}
    async with opened(provisioned, aws_names, prefix=store.prefix) as other:
        commit = store._commit
        scope = anyio.CancelScope()

        async def no_answer(operations: list[dict[str, Any]], *, keep: int) -> None:
            await commit(operations, keep=keep)
            if _pin_transaction(operations):
                await _append_items(other, run, 1, refs=[names[-1]])
                if answer == "lost":
                    raise StoreUnavailableError("the reply to the pin was lost")
                scope.cancel()
                await anyio.lowlevel.checkpoint()

        try:
            with anyio.fail_after(DEADLINE):
                await _append_items(store, run, 0)
                monkeypatch.setattr(store, "_commit", no_answer)
                with scope, (pytest.raises(CheckpointError) if answer == "lost"
                             else contextlib.nullcontext()):
                    await _append_items(store, run, 1, refs=names,
                                        items=[make_item(name, values[name])
                                               for name in names])
                assert scope.cancelled_caught == (answer == "cancelled")
                monkeypatch.undo()
                found = await other.read_with_items(key, sequence=1, now=T0)
                assert found is not None
                assert found[2] == {names[-1]: values[names[-1]]}
        finally:
            monkeypatch.undo()
            await other.delete_run(key)


async def test_a_failed_append_leaves_no_value_its_dropped_pin_put_wrote(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Checkpoint 0 writes 60 shared items with large values. P appends checkpoint 1
    naming and writing them again (new large values put in S3 first); those that do not fit
    are pinned, where their puts are dropped (``_commit`` drops a put refused by a live
    item, with its group) and the raises go. Q then appends checkpoint 1: P's transaction
    is refused, its append fails (``SequenceConflict``) and the undo runs. Since 461d242
    it keeps the value of every key in ``pinned_shared``, which ``_pin`` fills from what
    it planned (``entry.writes``), not from what landed: P's values of the pinned keys
    stay in S3, pointed to by no record (before, they were deleted). They go only with a
    sweep of the run an hour on, or its removal; a run that lives on keeps them."""
    run = make_run("pin-dropped-put")
    key = key_of(run)
    names = [f"s/{index}" for index in range(60)]
    async with opened(provisioned, aws_names, prefix=store.prefix) as other:
        async def overtaken() -> None:
            await _append_items(other, run, 1)

        try:
            with anyio.fail_after(DEADLINE):
                await _append_items(store, run, 0, refs=names, items=[
                    make_item(name, os.urandom(DEFAULT_THRESHOLD + 1)) for name in names])
                before = set(await _blob_keys(store, key))
                _after_pins(monkeypatch, store, overtaken)
                with pytest.raises(SequenceConflict):
                    await _append_items(store, run, 1, refs=names, items=[
                        make_item(name, os.urandom(DEFAULT_THRESHOLD + 1)) for name in names])
                monkeypatch.undo()
                assert set(await _blob_keys(store, key)) == before
        finally:
            monkeypatch.undo()
            await other.delete_run(key)


@pytest.mark.parametrize("new_life", ["before_the_undo", "after_the_undo"])
async def test_an_undo_after_the_run_was_removed_spares_a_new_life_s_item(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch, new_life: str,
) -> None:
    """P appends checkpoint 2 of L1 naming and writing 60 shared items: those that do not
    fit are pinned (put, count at 1). Q's ``delete_run`` then removes the run, items and
    counts included, and Q creates L2, whose checkpoint 0 writes and names one of the
    pinned items (before P's undo, or after it). P's transaction is refused and its undo
    lowers the pinned counts with ``counter_change(-1)``, an ``ADD`` checking nothing
    (``_undo_additions``): it takes L2's count from 1 to 0, or creates it at -1 (due in
    the expiry index at 0) for L2's raise to bring to 0. The cleanup loop then removes the
    item, at zero: L2's acknowledged checkpoint reads without it."""
    l1 = make_run(f"undo-{new_life}")
    l2 = make_run(f"undo-{new_life}", created_at=T0 + 1)
    key = key_of(l1)
    names = [f"s/{index}" for index in range(60)]
    async with opened(provisioned, aws_names, prefix=store.prefix) as other:
        async def create_l2() -> None:
            await _append_items(other, l2, 0, refs=[names[-1]], now=T0 + 1,
                                items=[make_item(names[-1], b"new life")])

        async def removed_meanwhile() -> None:
            await other.delete_run(key)
            if new_life == "before_the_undo":
                await create_l2()

        try:
            with anyio.fail_after(DEADLINE):
                for sequence in range(2):  # L1 at revision 1, above L2's (0)
                    await _append_items(store, l1, sequence)
                _after_pins(monkeypatch, store, removed_meanwhile)
                with pytest.raises(SequenceConflict):
                    await _append_items(store, l1, 2, refs=names,
                                        items=[make_item(name) for name in names])
                monkeypatch.undo()
                if new_life == "after_the_undo":
                    await create_l2()
                await _purge_until_done(other, T0 + 2)
                found = await other.read_with_items(key, sequence=0, now=T0 + 2)
                assert found is not None
                assert found[2] == {names[-1]: b"new life"}
        finally:
            monkeypatch.undo()
            await other.delete_run(key)


@pytest.mark.parametrize("then", ["nothing", "counts_raised_again"])
async def test_a_first_append_keeps_its_pins_when_a_life_comes_and_goes_before_it_lands(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch, then: str,
) -> None:
    """P creates the run (checkpoint 0 writing and naming 60 shared items, no run item
    there): 12 are pinned, each pin checking ``attribute_not_exists`` on the run item.
    Before P's transaction, Q creates the run and removes it (``delete_run`` finds P's
    pinned items and counts and deletes them). P's transaction, conditioned on no run item
    again, landed: its checkpoint was acknowledged naming 12 items that are gone. Now its
    transaction deletes its pin record only while it holds P's write token (the removal
    took it). ``counts_raised_again``: after the life came and went, a third process's
    first append pins the same keys' counts (written directly here, without the items):
    a check of a count alone would pass; that of the pin record does not."""
    run = make_run(f"pins-over-no-run-item-{then}")
    other_life = make_run(f"pins-over-no-run-item-{then}")
    key = key_of(run)
    names = [f"s/{index}" for index in range(60)]
    async with opened(provisioned, aws_names, prefix=store.prefix) as other:
        async def came_and_went() -> None:
            pinned = [layout.counter_sk(name) for name in names
                      if await _raw_item(other, key, layout.counter_sk(name)) is not None]
            await _append_items(other, other_life, 0)
            await other.delete_run(key)
            if then == "counts_raised_again":
                ddb, _ = await other.clients()
                for sort_key in pinned:
                    await ddb.put_item(TableName=other.table, Item={
                        "PK": {"S": layout.partition(key)}, "SK": {"S": sort_key},
                        "rc": {"N": "1"}})

        try:
            with anyio.fail_after(DEADLINE):
                _after_pins(monkeypatch, store, came_and_went)
                try:
                    await _append_items(store, run, 0, refs=names,
                                        items=[make_item(name) for name in names])
                except CheckpointError:
                    return  # refused: sound
                monkeypatch.undo()
                found = await other.read_with_items(key, sequence=0, now=T0)
                assert found is not None
                assert found[2] == {name: f"value-{name}".encode() for name in names}
        finally:
            monkeypatch.undo()
            await other.delete_run(key)
