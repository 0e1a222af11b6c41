"""The DynamoDB+S3 store against the race windows found in the S3 store: a new life of a run
begun while the removal of its ended life is under way, items given to another checkpoint
during a removal, a live item left at a key an append owns, a create sent after its
sequence was taken and pruned, a stale writer's pins landing after its run moved on. Each
test's docstring says what of the window DynamoDB's transactions close."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from fastcheckpoint.errors import SequenceConflict
from fastcheckpoint.stores import _dynamodb_layout as layout
from fastcheckpoint.stores import dynamodb
from fastcheckpoint.stores.dynamodb import DEFAULT_THRESHOLD, DynamoDBStore
from fastcheckpoint.testing._adapter import _append_items
from fastcheckpoint.testing._builders import (
    T0,
    checkpoint_id_of,
    key_of,
    make_checkpoint,
    make_item,
    make_run,
)
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


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


async def _deleted(store: DynamoDBStore, key: str, now: float) -> None:
    await store.delete_run(key)


async def _purged(store: DynamoDBStore, key: str, now: float) -> None:
    await _purge_until_done(store, now)


@pytest.mark.parametrize("removal", [_deleted, _purged], ids=["delete_run", "purge"])
async def test_a_new_life_keeps_the_large_item_values_it_wrote_during_the_removal(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
    removal: Callable[[DynamoDBStore, str, float], Awaitable[None]],
) -> None:
    """The S3 store's window "a new life begun during the removal of an ended run keeps a
    shared item it found", on DynamoDB: the records are safe (every delete of the removal
    is in a transaction checking the run item it read, and a new life replaces or creates
    the run item in its own), but the item blobs are swept by listing, not by life."""
    name = f"new-life-blobs{removal.__name__}"  # the table is the whole session's
    old = make_run(name, expires_at=T0 + 10)
    new = make_run(name, created_at=T0 + 10)
    key = key_of(old)
    shared, owned = os.urandom(DEFAULT_THRESHOLD + 1), os.urandom(DEFAULT_THRESHOLD + 1)
    async with opened(provisioned, aws_names, prefix=store.prefix) as other:
        append = other._append

        async def removed_meanwhile(*args: Any, **kwargs: Any) -> str:
            # The new life's values are in S3; its transaction is not sent yet.
            await removal(store, key, T0 + 10)
            return await append(*args, **kwargs)

        try:
            with anyio.fail_after(DEADLINE):
                await _append_items(store, old, 0, refs=["b/big"], expires_at=T0 + 10,
                                    items=[make_item("b/big", shared)])
                monkeypatch.setattr(other, "_append", removed_meanwhile)
                await _append_items(other, new, 0, refs=["b/big"], now=T0 + 10,
                                    items=[make_item("b/big", shared),
                                           make_item("w/big", owned, owner=0)])
                monkeypatch.undo()

                run = await other.get_run(key, now=T0 + 10)
                assert run is not None
                assert run.incarnation == new.incarnation
                assert await other.get_items(key, ["b/big"], now=T0 + 10) == {"b/big": shared}
                found = await other.read_with_items(key, sequence=0, now=T0 + 10)
                assert found is not None
                assert found[2] == {"b/big": shared, "w/big": owned}
        finally:
            monkeypatch.undo()
            await other.delete_run(key)


async def test_large_item_values_written_before_they_named_their_life_read_and_go(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Values kept in S3 before their keys named the writer's life
    (``<run key>/i/...``) still read, and go with the run: its removal sweeps them with no
    grace, as before."""
    run = make_run("unnamed-life-blobs")
    key = key_of(run)
    big = os.urandom(DEFAULT_THRESHOLD + 1)
    store_values = store._store_values

    async def as_before(run_key: str, incarnation: str | None, *args: Any) -> Any:
        del incarnation
        return await store_values(run_key, None, *args)

    try:
        with anyio.fail_after(DEADLINE):
            monkeypatch.setattr(store, "_store_values", as_before)
            await _append_items(store, run, 0, refs=["b/big"],
                                items=[make_item("b/big", big), make_item("w/big", big, owner=0)])
            monkeypatch.undo()
            keys = await _blob_keys(store, key)
            assert len(keys) == 2
            assert all(layout.item_blob_sort_key(blob) is not None for blob in keys)
            assert all(blob.split("/")[1] == layout.ITEM_BLOBS for blob in keys)
            found = await store.read_with_items(key, sequence=0, now=T0)
            assert found is not None
            assert found[2] == {"b/big": big, "w/big": big}
            await store.delete_run(key)
            assert await _blob_keys(store, key) == []
    finally:
        monkeypatch.undo()
        await store.delete_run(key)


@pytest.mark.parametrize("sweeper", ["delete_run", "purge"])
async def test_large_values_a_stale_writer_left_after_its_life_was_removed_go_later(
    store: DynamoDBStore, sweeper: str,
) -> None:
    """A writer of an ended life whose write outlived the life's removal (its transaction's
    outcome unknown: it keeps its blobs) leaves values under that life's prefix, which no
    record names. The next sweep of the run takes them once an hour old (a removal of a
    later life, or the cleanup loop's removal of its expired checkpoints), and spares
    younger ones: they may be a new life's, put before its first transaction."""
    run = make_run(f"stale-life-blobs-{sweeper}", expires_at=T0 + 10)
    key = key_of(run)
    bucket = await store._bucket()
    stale = "aaaaaaaa" if run.incarnation != "aaaaaaaa" else "bbbbbbbb"
    sort_key = layout.item_sk("b/big")
    old = layout.item_blob_key(key, stale, sort_key, time.time() - 7200, "0ld0")
    young = layout.item_blob_key(key, stale, sort_key, time.time(), "y0ng")
    try:
        with anyio.fail_after(DEADLINE):
            await _append_items(store, run, 0, expires_at=T0 + 10)
            await _append_items(store, run, 1)
            for blob in (old, young):
                await bucket.put(blob, b"orphan")
            if sweeper == "delete_run":
                await store.delete_run(key)
            else:
                await _purge_until_done(store, T0 + 10)
                assert await store.get(key, 1, now=T0 + 10) is not None
            assert await _blob_keys(store, key) == [young]
    finally:
        await store.delete_run(key)
        await bucket.delete([young])


@pytest.mark.parametrize("remover", ["delete", "prune"])
async def test_an_item_taken_over_during_a_removal_stays_with_its_new_owner(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch, remover: str,
) -> None:
    """The S3 store's window "a removal deletes the items the removed checkpoints owned by
    key", on DynamoDB: checkpoint 0 owns ``w/0``; between the removal's read of what 0 owns
    and its transaction (a ``delete`` of 0, or an append of 3 pruning 0 and 1), another
    process gives ``w/0`` to checkpoint 1 (or 2). The removal deletes the anchor only while
    it names owner 0, and the new owner's value sits next to it (``k#<owner>#w/0``): the
    new owner keeps the item."""
    run = make_run(f"taken-over-{remover}")
    key = key_of(run)
    owner = 1 if remover == "delete" else 2
    async with opened(provisioned, aws_names, prefix=store.prefix) as other:
        removal = store._removal
        moved: list[bool] = []

        async def taken_over_meanwhile(*args: Any) -> Any:
            planned = await removal(*args)
            if not moved:
                moved.append(await other.put_owned_items(
                    key, [make_item("w/0", b"moved", owner=owner)], owner=owner,
                    checkpoint_id=checkpoint_id_of(run, owner), if_absent=False, now=T0))
            return planned

        try:
            with anyio.fail_after(DEADLINE):
                for sequence in range(owner + 1):
                    await _append_items(store, run, sequence,
                                        items=[make_item(f"w/{sequence}", owner=sequence)])
                monkeypatch.setattr(store, "_removal", taken_over_meanwhile)
                if remover == "delete":
                    assert await store.delete(key, 0, checkpoint_id=checkpoint_id_of(run, 0))
                else:
                    await _append_items(store, run, 3, keep_latest=2)
                monkeypatch.undo()

                assert moved == [True]
                found = await other.read_with_items(key, sequence=owner, now=T0)
                assert found is not None
                assert found[2] == {f"w/{owner}": f"value-w/{owner}".encode(), "w/0": b"moved"}
                assert await other.get_items(key, ["w/0"], now=T0) == {"w/0": b"moved"}
                assert await other.read_with_items(key, sequence=0, now=T0) is None
        finally:
            monkeypatch.undo()
            await other.delete_run(key)


async def test_a_create_sent_after_its_sequence_was_taken_and_pruned_is_refused(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The S3 store's window "a create landing late, after another process took its sequence
    and pruned it, is acknowledged with that process's checkpoint id", on DynamoDB: the
    create's condition (the run item's ``rev``) and its writes are one transaction, judged
    when it lands, and a refusal is taken for the create's own landing only by the run
    item's token or the create's memo. Between this process's plan of checkpoint 1 and its
    transaction, another takes 1 and 2 and prunes 1 (``keep_latest=1``): the create is
    refused, and the other's checkpoints stay."""
    run = make_run("late-create")
    key = key_of(run)
    async with opened(provisioned, aws_names, prefix=store.prefix) as other:
        commit = store._commit
        raced: list[bool] = []

        async def taken_and_pruned_meanwhile(operations: list[dict[str, Any]], *,
                                             keep: int) -> None:
            if not raced:
                raced.append(True)
                for sequence in (1, 2):
                    await other.append(key, make_checkpoint(run, sequence, payload=b"other"),
                                       run=run, keep_latest=1, now=T0)
            await commit(operations, keep=keep)

        try:
            with anyio.fail_after(DEADLINE):
                await store.append(key, make_checkpoint(run, 0), run=run, keep_latest=None,
                                   now=T0)
                monkeypatch.setattr(store, "_commit", taken_and_pruned_meanwhile)
                with pytest.raises(SequenceConflict):
                    await store.append(key, make_checkpoint(run, 1, payload=b"late"), run=run,
                                       keep_latest=None, now=T0)
                monkeypatch.undo()

                assert raced == [True]
                found, _ = await other.headers(key, before=None, limit=10, now=T0)
                assert [header.sequence for header in found] == [2]
                assert await store.get(key, 1, now=T0) is None
                latest = await store.latest(key, now=T0)
                assert latest is not None
                assert (latest[0].sequence, latest[0].payload) == (2, b"other")
        finally:
            monkeypatch.undo()
            await other.delete_run(key)


async def test_owned_items_left_by_an_unfinished_pruning_are_neither_read_nor_kept(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The S3 store's window "an append with owned items keeps a live item a create taken
    back left at its own sequence" cannot happen on DynamoDB (a create's owned items are in
    its transaction; sequences are never used twice in a life; a new life's first append
    overwrites the leftovers it reads). Its nearest case: leftovers of a pruning whose
    records did not all fit in its transaction (the documented limit says no read shows
    them)."""
    # Beside a pruning append (run item, checkpoint, memo), 5 deletes fit: checkpoint 0,
    # then the value and anchor of w/a and w/b; those of w/c are left for after the commit.
    monkeypatch.setattr(dynamodb, "_TRANSACTION_LIMIT", 8)
    run = make_run("pruned-leftovers")
    key = key_of(run)
    try:
        with anyio.fail_after(DEADLINE):
            await _append_items(store, run, 0, items=[make_item("w/a", owner=0),
                                                      make_item("w/b", owner=0)])
            assert await store.put_owned_items(
                key, [make_item("w/c", owner=0)], owner=0,
                checkpoint_id=checkpoint_id_of(run, 0), if_absent=False, now=T0)

            async def stopped(deletes: list[dict[str, Any]]) -> None:
                del deletes  # the process stops after the commit: the rest is never sent

            monkeypatch.setattr(store, "_guarded_deletes", stopped)
            await _append_items(store, run, 1, keep_latest=1)
            monkeypatch.undo()
            assert await store.read_with_items(key, sequence=0, now=T0) is None
            assert await store.get_items(key, ["w/a", "w/b", "w/c"], now=T0) == {}

            await _append_items(store, run, 2, items=[make_item("w/c", b"new", owner=2)])
            found = await store.read_with_items(key, sequence=2, now=T0)
            assert found is not None
            assert found[2] == {"w/c": b"new"}
    finally:
        monkeypatch.undo()
        await store.delete_run(key)


@pytest.mark.parametrize("ended_names", [1, 2])
@pytest.mark.parametrize("remover", ["delete_run", "purge"])
async def test_a_new_life_begun_during_a_removal_keeps_the_count_of_a_shared_item_it_names(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch, remover: str, ended_names: int,
) -> None:
    """The S3 store's window "a new life begun during the removal of an ended run keeps a
    shared item it found, which the removal deletes", on DynamoDB's counts: the ended life's
    checkpoints (one: the new life's raise and the old lowering cancel out; two: the append
    lowers the count) name ``b/k``; the new life's first append (naming ``b/k`` with the
    same value) reads the leftovers (for a purge: refused by the cleanup loop's mark, it
    finishes that removal itself, and creates the run anew); the removal deletes every
    record; the append commits. Its checkpoint 1 names ``b/k`` too; deleting checkpoint 0
    must leave ``b/k`` to checkpoint 1."""
    name = f"new-life-counts-{remover}-{ended_names}"
    old = make_run(name, expires_at=T0 + 10)
    new = make_run(name, created_at=T0 + 10)
    key = key_of(old)
    async with opened(provisioned, aws_names, prefix=store.prefix) as other:
        read, sweep, remove = other._leftovers, store._sweep_item_blobs, store._remove_marked
        leftovers_read, removed, appended = anyio.Event(), anyio.Event(), anyio.Event()

        async def paused_after_reading(*args: Any) -> Any:
            found = await read(*args)
            leftovers_read.set()
            await removed.wait()
            return found

        async def first_append() -> None:
            await _append_items(other, new, 0, refs=["b/k"], now=T0 + 10,
                                items=[make_item("b/k")])
            appended.set()

        async def new_life_meanwhile(run_key: str, *, grace: float) -> None:
            # The removal's deletes are done; the new life commits before its run item goes.
            removed.set()
            await appended.wait()
            await sweep(run_key, grace=grace)

        end = other._purge_whole_run

        async def paused_before_ending(*args: Any) -> Any:
            leftovers_read.set()
            await removed.wait()
            return await end(*args)

        async def new_life_reads_first(*args: Any) -> None:
            task_group.start_soon(first_append)
            await leftovers_read.wait()
            await remove(*args)

        try:
            with anyio.fail_after(DEADLINE):
                await _append_items(store, old, 0, refs=["b/k"], expires_at=T0 + 10,
                                    items=[make_item("b/k")])
                for sequence in range(1, ended_names):
                    await _append_items(store, old, sequence, refs=["b/k"], expires_at=T0 + 10)
                monkeypatch.setattr(other, "_leftovers", paused_after_reading)
                monkeypatch.setattr(store, "_sweep_item_blobs", new_life_meanwhile)
                async with anyio.create_task_group() as task_group:
                    if remover == "purge":
                        monkeypatch.setattr(store, "_remove_marked", new_life_reads_first)
                        monkeypatch.setattr(other, "_purge_whole_run", paused_before_ending)
                        await _purge_until_done(store, T0 + 10)
                    else:
                        task_group.start_soon(first_append)
                        await leftovers_read.wait()
                        await store.delete_run(key)
                monkeypatch.undo()
                assert appended.is_set()
                run = await other.get_run(key, now=T0 + 10)
                assert run is not None
                assert run.incarnation == new.incarnation

                await _append_items(other, new, 1, refs=["b/k"], now=T0 + 10)
                assert await other.delete(key, 0, checkpoint_id=checkpoint_id_of(new, 0))
                await _purge_until_done(other, T0 + 10)
                found = await other.read_with_items(key, sequence=1, now=T0 + 10)
                assert found is not None
                assert found[2] == {"b/k": b"value-b/k"}
        finally:
            monkeypatch.undo()
            await other.delete_run(key)


@pytest.mark.parametrize("writer", ["append", "put_owned_items"])
@pytest.mark.parametrize("when", ["before_its_first_transaction", "before_its_blobs_go"])
async def test_a_write_of_the_run_landing_during_delete_run_leaves_nothing_behind(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch, writer: str, when: str,
) -> None:
    """A write of the run's own life (an append, ``put_owned_items``) racing ``delete_run``:
    either it is refused, or it lands and ``delete_run`` removes it with the rest. It never
    stays behind without its run: its large values (whose S3 keys name the life, which
    ``delete_run`` takes by prefix) would read as missing, and a new life's checkpoint of
    the same sequence, whose owned item keeps the one at its key, would read it (the
    ended life's value, or "the value object is missing") instead of its own."""
    run = make_run(f"written-during-delete-run-{writer}-{when}")
    new = make_run(run.run_id, created_at=T0 + 1)
    key = key_of(run)
    big = os.urandom(DEFAULT_THRESHOLD + 1)
    async with opened(provisioned, aws_names, prefix=store.prefix) as other:
        outcome: list[object] = []

        async def write() -> None:
            if outcome:
                return
            try:
                if writer == "append":
                    await _append_items(other, run, 1, items=[make_item("w/1", big, owner=1)])
                    outcome.append("landed")
                else:
                    outcome.append(await other.put_owned_items(
                        key, [make_item("w/0", big, owner=0)], owner=0,
                        checkpoint_id=checkpoint_id_of(run, 0), if_absent=True, now=T0))
            except SequenceConflict:
                outcome.append(False)

        if when == "before_its_first_transaction":
            transact = store._transact

            async def written_first(operations: list[dict[str, Any]]) -> None:
                await write()
                await transact(operations)

            monkeypatch.setattr(store, "_transact", written_first)
        else:
            discard = store._discard_prefix

            async def written_first(prefix: str, *args: Any) -> int:  # type: ignore[misc]
                await write()
                return await discard(prefix, *args)

            monkeypatch.setattr(store, "_discard_prefix", written_first)
        try:
            with anyio.fail_after(DEADLINE):
                await _append_items(other, run, 0)
                await store.delete_run(key)
                monkeypatch.undo()
                assert outcome in (["landed"], [True], [False])

                assert await other.get_run(key, now=T0) is None
                assert await other.get_items(key, ["w/0", "w/1"], now=T0) == {}
                assert await _blob_keys(store, key) == []
                await _append_items(other, new, 0, now=T0 + 1,
                                    items=[make_item("w/0", b"new 0", owner=0)])
                await _append_items(other, new, 1, now=T0 + 1,
                                    items=[make_item("w/1", b"new 1", owner=1)])
                for sequence in (0, 1):
                    found = await other.read_with_items(key, sequence=sequence, now=T0 + 1)
                    assert found is not None
                    assert found[2] == {f"w/{sequence}": f"new {sequence}".encode()}
        finally:
            monkeypatch.undo()
            await other.delete_run(key)


@pytest.mark.parametrize("removal", ["delete_run", "purge"])
async def test_a_shared_value_an_ended_life_left_to_a_new_one_goes_with_the_run(
    store: DynamoDBStore, removal: str,
) -> None:
    """A new life begun over an ended one (expired, not yet removed by the cleanup loop)
    keeps the shared items the ended life wrote (it may name them), and their large values,
    whose S3 keys name the ended life. The removal of the run then deletes them with their
    records. Before, only by a sweep that spares the values of lives it does not remove for
    an hour: a run removed within the hour left them in S3 for good (nothing visits the run
    key again)."""
    old = make_run(f"ended-life-shared-{removal}", expires_at=T0 + 10)
    new = make_run(old.run_id, created_at=T0 + 10, expires_at=T0 + 20)
    key = key_of(old)
    big = os.urandom(DEFAULT_THRESHOLD + 1)
    try:
        with anyio.fail_after(DEADLINE):
            await _append_items(store, old, 0, refs=["b/big"], expires_at=T0 + 10,
                                items=[make_item("b/big", big)])
            await _append_items(store, new, 0, now=T0 + 10, expires_at=T0 + 20)
            assert await store.get_items(key, ["b/big"], now=T0 + 10) == {"b/big": big}
            assert [blob.split("/")[1] for blob in await _blob_keys(store, key)] == [
                old.incarnation]
            if removal == "delete_run":
                await store.delete_run(key)
            else:
                await _purge_until_done(store, T0 + 20)
                assert await store.get_run(key, now=T0 + 20) is None
            assert await _blob_keys(store, key) == []
    finally:
        await store.delete_run(key)


async def test_an_ended_life_orphan_value_goes_with_a_run_removed_within_the_hour(
    store: DynamoDBStore,
) -> None:
    """An orphan value of an ended life (no record pointed to it when a new life began over
    it) goes with the run, whenever the run is removed."""
    old = make_run("ended-life-orphan", expires_at=T0 + 10)
    new = make_run(old.run_id, created_at=T0 + 10)
    key = key_of(old)
    big = os.urandom(DEFAULT_THRESHOLD + 1)
    try:
        with anyio.fail_after(DEADLINE):
            for sequence in (0, 1):
                await _append_items(store, old, sequence, refs=["b/big"], expires_at=T0 + 10,
                                    items=[make_item("b/big", big)])
            await _append_items(store, new, 0, now=T0 + 10)
            await store.delete_run(key)
            assert await _blob_keys(store, key) == []
    finally:
        await store.delete_run(key)
        await (await store._bucket()).delete(await _blob_keys(store, key))


async def test_a_new_life_keeps_the_ended_lifes_values_a_record_points_to(
    store: DynamoDBStore,
) -> None:
    """The sweep of the ended life's values after a new life's first append takes only the
    values no record points to: the shared item the new life names (without writing it: a
    first append writing it replaces it) and keeps reads whole, and the first append costs
    one S3 list more (its orphan: one ``BatchGetItem`` and one ``DeleteObjects``)."""
    old = make_run("ended-life-kept", expires_at=T0 + 10)
    new = make_run(old.run_id, created_at=T0 + 10)
    key = key_of(old)
    kept, orphan, mine = (os.urandom(DEFAULT_THRESHOLD + 1) for _ in range(3))
    try:
        with anyio.fail_after(DEADLINE):
            for sequence, value in ((0, kept), (1, orphan)):
                await _append_items(store, old, sequence, refs=["b/big"], expires_at=T0 + 10,
                                    items=[make_item("b/big", value)])
            before = await _blob_keys(store, key)
            assert len(before) == 2
            await store.clients()
            with counting(store) as (dynamo, s3):
                await _append_items(store, new, 0, refs=["b/big", "b/mine"], now=T0 + 10,
                                    items=[make_item("b/mine", mine)])
            assert s3.counts == {"PutObject": 1, "ListObjectsV2": 1, "DeleteObjects": 1}
            assert dynamo.counts["BatchGetItem"] == 1  # the records the listed values name
            found = await store.read_with_items(key, sequence=0, now=T0 + 10)
            assert found is not None
            assert found[2] == {"b/big": kept, "b/mine": mine}
            after = await _blob_keys(store, key)
            assert len([blob for blob in after if blob in before]) == 1
            assert len(after) == 2  # kept, and the new life's own
    finally:
        await store.delete_run(key)
        await (await store._bucket()).delete(await _blob_keys(store, key))


async def test_a_new_life_over_an_ended_life_without_large_values_lists_once(
    store: DynamoDBStore,
) -> None:
    """Over an ended life that wrote no large value, the sweep costs one S3 list alone; the
    first checkpoint of a run never used costs none."""
    old = make_run("ended-life-small", expires_at=T0 + 10)
    new = make_run(old.run_id, created_at=T0 + 10)
    key = key_of(old)
    try:
        with anyio.fail_after(DEADLINE):
            await store.clients()
            with counting(store) as (dynamo, s3):
                await _append_items(store, old, 0, items=[make_item("b/small")],
                                    expires_at=T0 + 10)
            assert (dynamo.counts, s3.counts) == ({"TransactWriteItems": 1}, {})
            with counting(store) as (dynamo, s3):
                await _append_items(store, new, 0, now=T0 + 10)
            assert (dynamo.counts, s3.counts) == (
                {"Query": 1, "TransactWriteItems": 1}, {"ListObjectsV2": 1})
    finally:
        await store.delete_run(key)


async def test_a_new_life_pinning_its_shared_items_during_delete_run_keeps_them(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``delete_run``'s first transaction marks the live run as being removed, so a new
    life's first append may begin at once. One too large for a transaction writes its shared
    items (and raises their counts) before it: those records, landing before ``delete_run``'s
    second ``Query``, are not writes of the life it removes, and the new life's checkpoint,
    acknowledged, must read them."""
    old = make_run("pinned-during-delete-run")
    new = make_run(old.run_id, created_at=T0 + 1)
    key = key_of(old)
    shared = [make_item(f"b/{index:03d}") for index in range(60)]
    async with opened(provisioned, aws_names, prefix=store.prefix) as other:
        transact, pin = store._transact, other._pin
        pinned, removed = anyio.Event(), anyio.Event()
        outcome: list[object] = []

        async def first_append() -> None:
            try:
                await _append_items(other, new, 0, refs=[item.key for item in shared],
                                    items=shared, now=T0 + 1)
                outcome.append("landed")
            except SequenceConflict:
                outcome.append("refused")
            pinned.set()

        async def paused_after_pinning(*args: Any) -> bool:
            landed: bool = await pin(*args)
            pinned.set()
            await removed.wait()
            return landed

        async def new_life_after_the_first(operations: list[dict[str, Any]]) -> None:
            await transact(operations)
            if not pinned.is_set():
                task_group.start_soon(first_append)
                await pinned.wait()

        try:
            with anyio.fail_after(DEADLINE):
                await _append_items(store, old, 0, items=[make_item("o/0", owner=0)])
                monkeypatch.setattr(other, "_pin", paused_after_pinning)
                monkeypatch.setattr(store, "_transact", new_life_after_the_first)
                async with anyio.create_task_group() as task_group:
                    await store.delete_run(key)
                    removed.set()
                monkeypatch.undo()
                assert outcome in (["landed"], ["refused"])
                if outcome == ["landed"]:
                    # Read from a process that did not write it (moto's TransactGetItems
                    # takes 25 records, not 100).
                    found = await store.read_with_items(key, sequence=0, now=T0 + 1)
                    assert found is not None
                    assert found[2] == {item.key: item.value for item in shared}
        finally:
            monkeypatch.undo()
            await other.delete_run(key)



def _many_shared(big: bytes) -> list[Any]:
    """Shared items too many for one transaction (a put and a raise each): an append naming
    them writes them before it (pins). The last one's value is large (in S3)."""
    return [*(make_item(f"b/{index:03d}") for index in range(59)), make_item("b/big", big)]


def _held_pins(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch, *, after: bool = False
) -> tuple[anyio.Event, anyio.Event]:
    """Hold ``store``'s pins before they are sent (``after``: once they landed) until the
    second event is set; the first is set when they are held."""
    pin = store._pin
    held, go = anyio.Event(), anyio.Event()

    async def held_pin(*args: Any) -> Any:
        landed = await pin(*args) if after else None
        held.set()
        await go.wait()
        return landed if after else await pin(*args)

    monkeypatch.setattr(store, "_pin", held_pin)
    return held, go


async def test_a_pin_sent_after_its_run_moved_on_lands_nothing(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An append too large for one transaction writes its shared items and raises their
    counts before it (pins), each pin transaction conditioned on the run item's revision as
    it planned. A stale writer's (here of a life that ended, sent after a new life began
    over it) lands nothing: the append fails as a conflict, and no record or count of it,
    nor its large value, is left. Before, the pins landed unchecked: records of the ended
    life the new one had not written."""
    old = make_run("stale-pin", expires_at=T0 + 10)
    new = make_run(old.run_id, created_at=T0 + 10)
    key = key_of(old)
    shared = _many_shared(os.urandom(DEFAULT_THRESHOLD + 1))
    async with opened(provisioned, aws_names, prefix=store.prefix) as stale:
        refused: list[SequenceConflict] = []

        async def stale_append() -> None:
            try:
                await _append_items(stale, old, 1, refs=[item.key for item in shared],
                                    items=shared, now=T0 + 5, expires_at=T0 + 10)
            except SequenceConflict as exc:
                refused.append(exc)

        try:
            with anyio.fail_after(DEADLINE):
                await _append_items(store, old, 0, expires_at=T0 + 10)
                held, go = _held_pins(stale, monkeypatch)
                async with anyio.create_task_group() as task_group:
                    task_group.start_soon(stale_append)
                    await held.wait()
                    await _append_items(store, new, 0, now=T0 + 10)
                    go.set()
                assert len(refused) == 1
                for item in shared:
                    assert await _raw_item(store, key, layout.item_sk(item.key)) is None
                    assert await _raw_item(store, key, layout.counter_sk(item.key)) is None
                assert await _blob_keys(store, key) == []
        finally:
            monkeypatch.undo()
            await store.delete_run(key)


async def test_a_stale_pin_cannot_point_a_new_life_to_a_value_its_sweep_deleted(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A writer of a life about to end puts a shared item's large value in S3, then is
    held before its pins (its append is too large for one transaction). A new life begins
    over the ended one; its first append sweeps the ended life's values no record points
    to, that one among them. The stale pin, sent then, lands nothing (it would point to the
    swept value), and the stale writer dies undoing nothing. A later checkpoint of the new
    life naming the item writes it, and reads it whole: kept, the stale record would have
    read as "value object missing" (review 252)."""
    old = make_run("stale-pin-swept", expires_at=T0 + 10)
    new = make_run(old.run_id, created_at=T0 + 10)
    key = key_of(old)
    big = os.urandom(DEFAULT_THRESHOLD + 1)
    shared = _many_shared(big)
    async with opened(provisioned, aws_names, prefix=store.prefix) as stale:

        async def died(*args: Any) -> None:
            return None  # the process died before undoing anything

        async def stale_append() -> None:
            with pytest.raises(SequenceConflict):
                await _append_items(stale, old, 1, refs=[item.key for item in shared],
                                    items=shared, now=T0 + 5, expires_at=T0 + 10)

        try:
            with anyio.fail_after(DEADLINE):
                await _append_items(store, old, 0, expires_at=T0 + 10)
                held, go = _held_pins(stale, monkeypatch)
                monkeypatch.setattr(stale, "_forget_append", died)
                async with anyio.create_task_group() as task_group:
                    task_group.start_soon(stale_append)
                    await held.wait()
                    assert len(await _blob_keys(store, key)) == 1  # the stale value
                    await _append_items(store, new, 0, now=T0 + 10)
                    assert await _blob_keys(store, key) == []  # swept
                    go.set()
                await _append_items(store, new, 1, refs=["b/big"], now=T0 + 10,
                                    items=[make_item("b/big", big)])
                found = await store.read_with_items(key, sequence=1, now=T0 + 10)
                assert found is not None
                assert found[2] == {"b/big": big}
        finally:
            monkeypatch.undo()
            await store.delete_run(key)
            await (await store._bucket()).delete(await _blob_keys(store, key))


async def test_a_failed_append_spares_the_pinned_value_another_append_kept(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An append too large for one transaction pins its shared items, one with a large
    value, and is held there. Another process appends the same sequence naming that item:
    its put is dropped (a live item is there) and its checkpoint keeps the pinned record.
    The first append then fails (its sequence is taken) and undoes what it pinned: it
    lowers its counts and must not delete the value the other checkpoint now points to,
    which reads whole. Its items no checkpoint names go with the cleanup loop, values and
    all; the kept one stays."""
    run = make_run("undo-kept-pin")
    key = key_of(run)
    big = os.urandom(DEFAULT_THRESHOLD + 1)
    shared = _many_shared(big)
    async with opened(provisioned, aws_names, prefix=store.prefix) as first:

        async def failing_append() -> None:
            with pytest.raises(SequenceConflict):
                await _append_items(first, run, 1, refs=[item.key for item in shared],
                                    items=shared)

        try:
            with anyio.fail_after(DEADLINE):
                await _append_items(store, run, 0)
                pinned, go = _held_pins(first, monkeypatch, after=True)
                async with anyio.create_task_group() as task_group:
                    task_group.start_soon(failing_append)
                    await pinned.wait()
                    await _append_items(store, run, 1, refs=["b/big"],
                                        items=[make_item("b/big", big)])
                    go.set()
                found = await first.read_with_items(key, sequence=1, now=T0)
                assert found is not None
                assert found[2] == {"b/big": big}
                await _purge_until_done(store, T0)
                assert [item.key for item in shared
                        if await _raw_item(store, key, layout.item_sk(item.key))] == ["b/big"]
                kept = await _raw_item(store, key, layout.item_sk("b/big"))
                assert kept is not None
                # Beside it, the other append's own value, which its dropped put left: an
                # orphan, swept an hour on.
                assert kept["vb"]["S"] in await _blob_keys(store, key)
        finally:
            monkeypatch.undo()
            await store.delete_run(key)
