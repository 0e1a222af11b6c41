"""The DynamoDB+S3 store against a new life of a run begun while a long removal of its
ended life is under way: ``delete_run`` of a run of more than 99 records (its deletes take
more than one transaction of 100), the cleanup loop's removal of such an expired run, and a
pruning (``keep_latest``) whose deletes do not fit in its transaction. Each test holds one
interleaving with events at the store's own steps (its first transaction, its pins, the
deletes sent after a commit); what every test checks is the new life's: each create it was
acknowledged reads back with exactly its own state and items, nothing of the ended life
shows in it, and a later ``delete_run`` leaves no record and no S3 object of the run."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import msgspec
import pytest

from fastcheckpoint.stores import _dynamodb_layout as layout
from fastcheckpoint.stores import dynamodb
from fastcheckpoint.stores._base import Item, RunRecord
from fastcheckpoint.stores.dynamodb import DEFAULT_THRESHOLD, DynamoDBStore
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
    atomic_moto,
    aws_names,
    opened,
    provisioned,
    store,
)

__all__ = ["atomic_moto", "aws_names", "moto_endpoint", "provisioned", "store"]

pytestmark = pytest.mark.anyio

DEADLINE = 60.0
"""A bound on a stuck interleaving (each test takes a few seconds; more when moto is busy)."""

SHARED = [f"b/{index:03d}" for index in range(60)]
"""The ended life's shared items. Its first checkpoint names them all and owns ``w/0``: 60
counts (``c#``), 60 items and an anchor (``i#``), its guard, its owned value and itself, 124
records, which ``delete_run`` (and the cleanup loop) reads in key order and deletes 99 a
transaction: the first takes the counts and ``i#b/000`` to ``i#b/038``, the second the rest
(``i#b/039`` to ``i#b/059``, ``i#w/0`` and the checkpoint's family)."""

IN_THE_SECOND = SHARED[48:]
"""Keys whose ended life's items the removal's second transaction deletes, and which a
first append writing all of ``SHARED`` writes before its transaction (pins): beside the
run item, its checkpoint, its memo and its guard, 48 puts with their counts' raises fit."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


async def _append(
    store: DynamoDBStore, run: RunRecord, sequence: int, *, refs: Sequence[str] = (),
    items: Sequence[Item] = (), now: float = T0, expires_at: float | None = None,
    keep_latest: int | None = None, payload: bytes | None = None,
) -> None:
    record = msgspec.structs.replace(
        make_checkpoint(run, sequence, created_at=now, expires_at=expires_at, payload=payload),
        refs=tuple(refs))
    await store.append_with_items(
        key_of(run), record, run=msgspec.structs.replace(run, expires_at=expires_at),
        keep_latest=keep_latest, now=now, items=items)


async def _records(store: DynamoDBStore, run_key: str) -> list[str]:
    """The sort keys of every record in the run's partition."""
    dynamodb, _ = await store.clients()
    params: dict[str, Any] = {
        "TableName": store.table, "ConsistentRead": True,
        "KeyConditionExpression": "PK = :pk",
        "ExpressionAttributeValues": {":pk": {"S": layout.partition(run_key)}},
    }
    found: list[str] = []
    while True:
        response = await dynamodb.query(**params)
        found += [entry["SK"]["S"] for entry in response.get("Items", [])]
        if "LastEvaluatedKey" not in response:
            return found
        params["ExclusiveStartKey"] = response["LastEvaluatedKey"]


async def _objects(store: DynamoDBStore, run_key: str) -> list[str]:
    """The S3 objects under the run's key."""
    return [entry.key for entry in await (await store._bucket()).list(f"{run_key}/")]


async def _purge_all(store: DynamoDBStore, now: float) -> None:
    while not (await store.purge_expired(now=now, limit=100))[1]:
        pass  # the session's table holds other tests' expired records too


async def _long_ended_life(store: DynamoDBStore, run: RunRecord, *,
                           expires_at: float | None = None,
                           values: dict[str, bytes] | None = None) -> None:
    """The ended life: one checkpoint naming (and writing) every key of ``SHARED``, owning
    ``w/0``."""
    values = values or {}
    await _append(store, run, 0, refs=SHARED, expires_at=expires_at,
                  items=[*(make_item(key, values.get(key)) for key in SHARED),
                         make_item("w/0", b"ended", owner=0)])


def _after_the_first_transaction(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch, run_key: str,
    meanwhile: Callable[[], Awaitable[None]], *, method: str = "_transact",
) -> list[int]:
    """Run ``meanwhile`` once right after the first transaction of ``store`` that writes the
    run's partition (``delete_run``'s fence and first 99 deletes, or the cleanup loop's
    first chunk), before the next one is sent. Returns the list of such transactions' sizes
    sent so far (to check the removal took more than one)."""
    original = getattr(store, method)
    pk = layout.partition(run_key)
    sizes: list[int] = []

    async def paused(operations: list[dict[str, Any]], *args: Any, **kwargs: Any) -> None:
        ours = any(next(iter(value for name, value in op.items() if not name.startswith("_")))
                   .get("Key", {}).get("PK", {}).get("S") == pk for op in operations)
        await original(operations, *args, **kwargs)
        if ours:
            sizes.append(len(operations))
            if len(sizes) == 1:
                await meanwhile()

    monkeypatch.setattr(store, method, paused)
    return sizes




async def _removed(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch, remover: str, run_key: str,
    meanwhile: Callable[[], Awaitable[None]], now: float,
) -> list[int]:
    """Remove the run (``delete_run``, or the cleanup loop at ``now`` once it expired), with
    ``meanwhile`` run after the removal's first transaction; returns the sizes of the
    removal's transactions."""
    if remover == "delete_run":
        sizes = _after_the_first_transaction(store, monkeypatch, run_key, meanwhile)
        await store.delete_run(run_key)
    else:
        sizes = _after_the_first_transaction(store, monkeypatch, run_key, meanwhile,
                                             method="_commit")
        await _purge_all(store, now)
    monkeypatch.undo()
    return sizes


def _ended_life_expiry(remover: str) -> float | None:
    """``delete_run`` removes a live run; the cleanup loop one expired at ``T0 + 10``."""
    return None if remover == "delete_run" else T0 + 10


class _SlowFirstAppend:
    """A new life's first append (checkpoint 0 of ``run`` at ``T0 + 10``, writing and naming
    ``keys``) by ``store``, a slow process: it stops once it sent its pins (the shared items
    that do not fit in its transaction, written before it), landed or refused, until
    ``removed`` is set. ``pins`` says how each pin call ended (``True``: landed)."""

    def __init__(self, store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch, run: RunRecord,
                 keys: Sequence[str]) -> None:
        self.pinned, self.removed = anyio.Event(), anyio.Event()
        self.outcome: list[str] = []
        self.pins: list[bool] = []
        self._store, self._run, self._keys = store, run, list(keys)
        pin = store._pin

        async def paused_after_pinning(*args: Any) -> bool:
            landed = await pin(*args)
            self.pins.append(landed)
            self.pinned.set()
            await self.removed.wait()
            return landed

        monkeypatch.setattr(store, "_pin", paused_after_pinning)

    async def run(self) -> None:
        try:
            await _append(self._store, self._run, 0, now=T0 + 10, refs=self._keys,
                          items=[make_item(key) for key in self._keys])
            self.outcome.append("landed")
        finally:
            self.pinned.set()

    async def missing(self, provisioned: str, aws_names: tuple[str, str], prefix: str
                      ) -> list[str]:
        """The keys its checkpoint, acknowledged, reads without (read by a process that
        wrote neither life: moto's TransactGetItems takes 25 records, not 100, and a writer
        knows the checkpoint's records)."""
        assert self.outcome == ["landed"]
        async with opened(provisioned, aws_names, prefix=prefix) as reader:
            found = await reader.read_with_items(key_of(self._run), sequence=0, now=T0 + 10)
        assert found is not None
        assert found[0].checkpoint_id == checkpoint_id_of(self._run, 0)
        assert all(found[2][key] == f"value-{key}".encode() for key in found[2])
        return sorted(set(self._keys) - set(found[2]))


# -- regressions: a new life whose first transaction lands between the removal's ----------------


@pytest.mark.parametrize("remover", ["delete_run", "purge"])
async def test_a_new_life_begun_between_a_long_removals_transactions_keeps_all_it_wrote(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch, remover: str,
) -> None:
    """The removal of a run of 124 records (``delete_run`` of a live run, or the cleanup
    loop's of an expired one): after its first transaction (which marks the run as being
    removed) another process begins the run's new life. Its first append fits in one
    transaction and lands: a shared item the ended life did not have, ``w/0`` (which the
    ended life's checkpoint 0 owned too, and whose records the removal has not reached yet)
    with its value in S3, a payload in S3. Then an owned item written to it
    (``put_owned_items``) and a second checkpoint. The removal's next transaction is refused
    (it checks the run item's incarnation): it deletes nothing of the new life, whose
    checkpoints read back exactly; the new life's removal leaves nothing."""
    old = make_run(f"long-life-between-{remover}", expires_at=_ended_life_expiry(remover))
    new = make_run(old.run_id, created_at=T0 + 10)
    key = key_of(old)
    big = os.urandom(DEFAULT_THRESHOLD + 1)
    async with opened(provisioned, aws_names, prefix=store.prefix) as other:
        async def new_life() -> None:
            await _append(other, new, 0, now=T0 + 10, refs=["b/new"], payload=big,
                          items=[make_item("b/new", b"new"), make_item("w/0", big, owner=0)])
            assert await other.put_owned_items(
                key, [make_item("w/1", b"w/1", owner=0)], owner=0,
                checkpoint_id=checkpoint_id_of(new, 0), if_absent=True, now=T0 + 10)
            await _append(other, new, 1, now=T0 + 10, refs=["b/new"])

        try:
            with anyio.fail_after(DEADLINE):
                await _long_ended_life(store, old, expires_at=old.expires_at)
                sizes = await _removed(store, monkeypatch, remover, key, new_life, T0 + 10)
                assert sizes == [100]  # the next was refused

                run = await store.get_run(key, now=T0 + 10)
                assert run is not None
                assert (run.incarnation, run.latest_sequence) == (new.incarnation, 1)
                latest = await store.latest(key, now=T0 + 10)
                assert latest is not None
                assert latest[0].checkpoint_id == checkpoint_id_of(new, 1)
                first = await store.get(key, 0, now=T0 + 10)
                assert first is not None
                assert (first[0].checkpoint_id, first[0].payload) == (
                    checkpoint_id_of(new, 0), big)
                async with opened(provisioned, aws_names, prefix=store.prefix) as reader:
                    found = await reader.read_with_items(key, sequence=0, now=T0 + 10)
                    assert found is not None
                    assert found[2] == {"b/new": b"new", "w/0": big, "w/1": b"w/1"}
                    found = await reader.read_with_items(key, sequence=1, now=T0 + 10)
                    assert found is not None
                    assert found[2] == {"b/new": b"new"}
                    assert await reader.get_items(key, ["b/new", "w/0", "w/1"],
                                                  now=T0 + 10) == {
                        "b/new": b"new", "w/0": big, "w/1": b"w/1"}
                await other.delete_run(key)
                assert await _records(store, key) == []
                assert await _objects(store, key) == []
        finally:
            monkeypatch.undo()
            await other.delete_run(key)


# -- pins, late deletes and leftovers ----------------------------------------------------------


@pytest.mark.parametrize("remover", ["delete_run", "purge"])
async def test_a_new_life_pinning_between_a_long_removals_transactions_keeps_its_items(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch, remover: str,
) -> None:
    """After the removal's first transaction, the new life's first append writes every key
    of ``SHARED`` (the values the ended life wrote): 48 fit in its transaction, the other 12
    (``IN_THE_SECOND``) are pinned before it, where the ended life's items are still live:
    sent blind, those pins are refused by the run item the removal marked. The append waits
    (a slow process) until the removal ends, then lands (had the removal not ended, it would
    have finished it first): its checkpoint must read with all 60 items."""
    old = make_run(f"long-life-pins-{remover}", expires_at=_ended_life_expiry(remover))
    new = make_run(old.run_id, created_at=T0 + 10)
    key = key_of(old)
    async with opened(provisioned, aws_names, prefix=store.prefix) as other:
        first = _SlowFirstAppend(other, monkeypatch, new, SHARED)

        async def new_life() -> None:
            task_group.start_soon(first.run)
            await first.pinned.wait()

        try:
            with anyio.fail_after(DEADLINE):
                await _long_ended_life(store, old, expires_at=old.expires_at)
                async with anyio.create_task_group() as task_group:
                    sizes = await _removed(store, monkeypatch, remover, key, new_life, T0 + 10)
                    first.removed.set()
                assert sizes[0] == 100
                assert len(sizes) > 1
                assert await first.missing(provisioned, aws_names, store.prefix) == []
        finally:
            monkeypatch.undo()
            await other.delete_run(key)


def _before_the_late_deletes(
    store: DynamoDBStore, other: DynamoDBStore, monkeypatch: pytest.MonkeyPatch, run_key: str,
    new_life: Callable[[], Awaitable[None]],
) -> list[int]:
    """Before the first deletes in the run's partition that ``store`` sends after a commit
    (a slow process), ``other`` deletes the run and runs ``new_life``. Returns the list of
    how many deletes were held."""
    guarded = store._guarded_deletes
    pk = layout.partition(run_key)
    held: list[int] = []

    async def new_life_first(deletes: list[dict[str, Any]], **options: Any) -> None:
        if not held and any(op.get("Delete", {}).get("Key", {}).get("PK", {}).get("S") == pk
                            for op in deletes):
            held.append(len(deletes))
            await other.delete_run(run_key)
            await new_life()
        await guarded(deletes, **options)

    monkeypatch.setattr(store, "_guarded_deletes", new_life_first)
    return held


async def _appended(store: DynamoDBStore, run: RunRecord, sequences: Sequence[int]) -> None:
    for sequence in sequences:
        await store.append(key_of(run), make_checkpoint(run, sequence, created_at=T0 + 1),
                           run=run, keep_latest=None, now=T0 + 1)


async def test_a_pruning_finishing_after_delete_run_spares_the_new_life(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A long run (checkpoints 0 to 99, 0 owning ``w/a``) appends 100 with
    ``keep_latest=1``: 100 checkpoints and their families to delete, of which 97 fit in its
    transaction. Between its commit and the deletes it sends after (a slow process),
    another process deletes the run and begins its new life: checkpoint 0 owning ``w/a``,
    then 1 to 99. Every one of them must read back: the late deletes check that the run
    item is still of the life that pruned (before, they deleted the new life's checkpoints
    97 to 99 and the value and anchor of ``w/a``)."""
    old = make_run("long-life-pruned-late")
    new = make_run(old.run_id, created_at=T0 + 1)
    key = key_of(old)
    async with opened(provisioned, aws_names, prefix=store.prefix) as other:
        async def new_life() -> None:
            await _append(other, new, 0, now=T0 + 1, items=[make_item("w/a", b"new", owner=0)])
            await _appended(other, new, range(1, 100))

        try:
            with anyio.fail_after(DEADLINE):
                await _append(store, old, 0, items=[make_item("w/a", owner=0)])
                for sequence in range(1, 100):
                    await store.append(key, make_checkpoint(old, sequence), run=old,
                                       keep_latest=None, now=T0)
                overflow = _before_the_late_deletes(store, other, monkeypatch, key, new_life)
                await store.append(key, make_checkpoint(old, 100), run=old, keep_latest=1,
                                   now=T0)
                monkeypatch.undo()
                assert overflow
                assert overflow[0] > 0

                headers, _ = await other.headers(key, before=None, limit=200, now=T0 + 1)
                found = await other.read_with_items(key, sequence=0, now=T0 + 1)
                assert found is not None
                missing = sorted({checkpoint_id_of(new, sequence) for sequence in range(100)}
                                 - {header.checkpoint_id for header in headers})
                assert (missing, found[2]) == ([], {"w/a": b"new"})
        finally:
            monkeypatch.undo()
            await other.delete_run(key)


async def test_a_cleanup_finishing_after_delete_run_spares_the_new_life(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same path after the cleanup loop's removal of a live run's expired checkpoints
    (``_plan_expired``): checkpoints 0 to 9 expire at ``T0 + 10``, 10 never does; with
    transactions of 6 operations the removal deletes 0 to 4 in its transaction and 5 to 9
    after it. Between the two another process deletes the run and appends its new life's
    checkpoints 0 to 9: every one of them must read back."""
    monkeypatch.setattr(dynamodb, "_TRANSACTION_LIMIT", 6)
    old = make_run("long-life-purged-late", expires_at=T0 + 10)
    new = make_run(old.run_id, created_at=T0 + 1)
    key = key_of(old)
    async with opened(provisioned, aws_names, prefix=store.prefix) as other:
        try:
            with anyio.fail_after(DEADLINE):
                for sequence in range(10):
                    await store.append(
                        key, make_checkpoint(old, sequence, expires_at=T0 + 10), run=old,
                        keep_latest=None, now=T0)
                await store.append(key, make_checkpoint(old, 10), run=old, keep_latest=None,
                                   now=T0)
                overflow = _before_the_late_deletes(
                    store, other, monkeypatch, key, lambda: _appended(other, new, range(10)))
                await store.purge_expired(now=T0 + 10, limit=100)
                monkeypatch.undo()
                assert overflow == [5]

                headers, _ = await other.headers(key, before=None, limit=200, now=T0 + 1)
                assert sorted(header.checkpoint_id for header in headers) == sorted(
                    checkpoint_id_of(new, sequence) for sequence in range(10))
        finally:
            monkeypatch.undo()
            await other.delete_run(key)


async def _new_life_between_delete_runs_transactions(
    store: DynamoDBStore, other: DynamoDBStore, monkeypatch: pytest.MonkeyPatch,
    old: RunRecord, new: RunRecord, *, values: dict[str, bytes] | None = None,
) -> None:
    """The ended life (``_long_ended_life``, with ``values``), then ``delete_run`` by
    ``store``, with the new life's first append by ``other`` (naming and writing ``b/new``
    only, at ``T0 + 1``) landing after its first transaction."""
    key = key_of(old)

    async def new_life() -> None:
        await _append(other, new, 0, now=T0 + 1, refs=["b/new"],
                      items=[make_item("b/new", b"new")])

    await _long_ended_life(store, old, values=values)
    sizes = await _removed(store, monkeypatch, "delete_run", key, new_life, T0 + 1)
    assert sizes == [100]  # the second was refused
    run = await other.get_run(key, now=T0 + 1)
    assert run is not None
    assert run.incarnation == new.incarnation


async def test_nothing_of_the_ended_life_shows_in_a_new_life_begun_during_delete_run(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``delete_run`` of a live run of 124 records, the new life's first append landing
    after its first transaction: the ended life's items do not show in the new life. The
    append, refused by the run item ``delete_run`` marked as being removed, finishes that
    removal before it plans again (before, ``delete_run``'s later transactions were refused
    once the append replaced the run item, and the append removed only the ended life's
    checkpoints: its shared items ``i#b/039`` to ``i#b/059`` stayed, readable)."""
    old = make_run("long-life-no-leak")
    new = make_run(old.run_id, created_at=T0 + 1)
    key = key_of(old)
    async with opened(provisioned, aws_names, prefix=store.prefix) as other:
        try:
            with anyio.fail_after(DEADLINE):
                await _new_life_between_delete_runs_transactions(
                    store, other, monkeypatch, old, new)
                assert await other.get_items(key, [*SHARED, "w/0"], now=T0 + 1) == {}
        finally:
            monkeypatch.undo()
            await other.delete_run(key)


async def test_a_later_delete_run_leaves_no_s3_object_of_an_ended_life_removed_halfway(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As above, with the values of ``b/000`` (deleted by ``delete_run``'s first
    transaction) and ``b/050`` (not reached) in S3; then the new life's run is deleted:
    no record and no S3 object of the run stays."""
    old = make_run("long-life-no-orphan")
    new = make_run(old.run_id, created_at=T0 + 1)
    key = key_of(old)
    big = os.urandom(DEFAULT_THRESHOLD + 1)
    async with opened(provisioned, aws_names, prefix=store.prefix) as other:
        try:
            with anyio.fail_after(DEADLINE):
                await _new_life_between_delete_runs_transactions(
                    store, other, monkeypatch, old, new, values={"b/000": big, "b/050": big})
                await other.delete_run(key)
                assert (await _records(store, key), await _objects(store, key)) == ([], [])
        finally:
            monkeypatch.undo()
            await other.delete_run(key)
            await (await store._bucket()).delete(await _objects(store, key))


async def test_a_new_life_begun_during_delete_run_keeps_the_items_it_names_later(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As above; then the new life's checkpoint 1 writes and names ``b/010`` (a key of the
    ended life), and the cleanup loop runs: checkpoint 1 still reads with it (before, the
    new life's first append lowered the counts of the ended life's checkpoint, which
    ``delete_run``'s first transaction had deleted: recreated at -1, the count of ``b/010``
    reached 0 only, and the cleanup loop removed the item)."""
    old = make_run("long-life-counts")
    new = make_run(old.run_id, created_at=T0 + 1)
    key = key_of(old)
    async with opened(provisioned, aws_names, prefix=store.prefix) as other:
        try:
            with anyio.fail_after(DEADLINE):
                await _new_life_between_delete_runs_transactions(
                    store, other, monkeypatch, old, new)
                await _append(other, new, 1, now=T0 + 1, refs=["b/010"],
                              items=[make_item("b/010", b"new")])
                await _purge_all(other, T0 + 1)
                async with opened(provisioned, aws_names, prefix=store.prefix) as reader:
                    found = await reader.read_with_items(key, sequence=1, now=T0 + 1)
                    assert found is not None
                    assert found[2] == {"b/010": b"new"}
        finally:
            monkeypatch.undo()
            await other.delete_run(key)


@pytest.mark.parametrize("knows", [False, True], ids=["blind", "read"])
@pytest.mark.parametrize("remover", ["delete_run", "purge"])
async def test_a_new_life_pinning_before_the_removal_reads_the_run_keeps_its_items(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch, remover: str, knows: bool,
) -> None:
    """A new life's first append writing 60 keys the ended life never had (``n/...``) sends
    its pins of 12 of them, then waits (a slow process) while another removes the ended life
    (a short run), then lands: its checkpoint reads with all 60 items. The two outcomes of
    that race, each held:

    - ``blind``: the append's process knows nothing of the run (live for ``delete_run``,
      expired for the cleanup loop). Its pins, written blind (checking that no run item is
      there), are refused by the ended life's, and the append plans again from what it
      reads once the removal is over (before, it raised ``SequenceConflict`` from the ended
      life's run item the refusal had returned).
    - ``read``: the process read the ended life's run item (expired) first. Too large for
      one transaction, the append removes that life whole before it pins (before, its pins,
      checking that life's revision, landed; the removal listed and deleted them, and the
      append landed without them), then pins against no run item; ``delete_run`` then finds
      no run item and leaves the shared items and counts it finds, which may be such pins."""
    expires_at = T0 + 10 if knows else _ended_life_expiry(remover)
    old = make_run(f"long-life-pins-before-{remover}-{knows}", expires_at=expires_at)
    new = make_run(old.run_id, created_at=T0 + 10)
    key = key_of(old)
    fresh = [f"n/{index:03d}" for index in range(60)]
    async with opened(provisioned, aws_names, prefix=store.prefix) as other:
        first = _SlowFirstAppend(other, monkeypatch, new, fresh)
        try:
            with anyio.fail_after(DEADLINE):
                await _append(store, old, 0, expires_at=old.expires_at)
                if knows:
                    assert await other.get_run(key, now=T0 + 10) is None  # read: expired
                async with anyio.create_task_group() as task_group:
                    task_group.start_soon(first.run)
                    await first.pinned.wait()
                    if remover == "delete_run":
                        await store.delete_run(key)
                    else:
                        await _purge_all(store, T0 + 10)
                    first.removed.set()
                assert first.pins[0] is knows
                assert await first.missing(provisioned, aws_names, store.prefix) == []
        finally:
            monkeypatch.undo()
            await other.delete_run(key)
