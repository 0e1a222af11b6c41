"""S3 store: every ``DeleteObjects`` batch but ``delete_run``'s (which
``test_s3_delete_run.py`` covers) applied key by key, as S3 applies it, in several orders,
with another process reading the run before each key and after the last.

The batches: pruning (an append with ``keep_latest``; the manager's creates with
``max_checkpoints_per_run``), ``delete`` of one checkpoint (the manager's ``prune`` deletes
that way), the cleanup loop (expired checkpoints, tombstones, leftovers of a run whose
``delete_run`` stopped, dead runs), and ``delete_items``. Each read must return what it
returned before the batch or what it returns after, and once it returns the latter, never
the former again (a removed checkpoint does not come back); never a checkpoint without an
item it owns or names, never an error. A checkpoint another process creates meanwhile
stays restorable with its items. A batch cut short (a connection error part way) leaves
what reads consistently, and the cleanup loop finishes it."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import anyio
import msgspec
import pytest
from botocore.exceptions import EndpointConnectionError

from fastcheckpoint import CheckpointConfig, CheckpointManager
from fastcheckpoint._gather import gather
from fastcheckpoint.errors import StoreUnavailableError
from fastcheckpoint.stores import _s3_layout as layout
from fastcheckpoint.stores.s3 import S3Store
from fastcheckpoint.testing import (
    T0,
    checkpoint_id_of,
    key_of,
    make_checkpoint,
    make_item,
    make_run,
)
from tests.stores._moto import REGION, moto_endpoint, unique_name
from tests.stores.s3.test_s3 import DEADLINE, SESSION
from tests.stores.s3.test_s3_delete_run import (
    _items_first,
    _piecewise,
    _reversed,
    _shuffled,
    reader,
    writer,
)
from tests.stores.s3.test_s3_safety import _keys

__all__ = ["moto_endpoint", "reader", "writer"]

pytestmark = pytest.mark.anyio

HUNT = bool(os.environ.get("FC_HUNT"))
"""``FC_HUNT=1``: every read of every sequence, every case in every key order (3, and 20
more shuffled)."""


def _seeded(seed: int) -> Callable[[list[Any]], list[Any]]:
    def shuffled(objects: list[Any]) -> list[Any]:
        random.Random(seed).shuffle(objects)
        return objects
    return shuffled


_ORDERS = {"reversed": _reversed, "shuffled": _shuffled, "items-first": _items_first,
           **{f"seed-{n}": _seeded(n) for n in range(20)}}


def _orders(*chosen: str) -> pytest.MarkDecorator:
    """Parametrize ``order``: the key orders ``chosen`` (every one with ``FC_HUNT``)."""
    names = list(_ORDERS) if HUNT else list(chosen)
    return pytest.mark.parametrize("order", [_ORDERS[name] for name in names], ids=names)


def _cases(name: str, values: list[Any], chosen: list[tuple[Any, str]]) -> pytest.MarkDecorator:
    """Parametrize ``name`` and ``order``: the ``chosen`` pairs of a value and a key order
    (with ``FC_HUNT``, each value with every order)."""
    pairs = [(value, order) for value in values for order in _ORDERS] if HUNT else chosen
    return pytest.mark.parametrize(
        (name, "order"), [(value, _ORDERS[order]) for value, order in pairs],
        ids=[f"{value}-{order}" for value, order in pairs])


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


@pytest.fixture
async def s3_store(moto_endpoint: str) -> AsyncIterator[S3Store]:
    """A store on a bucket of its own, not versioned: moto lists a bucket by scanning every
    version of every key, and these tests list often (the session's bucket is versioned,
    and grows with every test)."""
    store = S3Store(unique_name("batches"), "p", region=REGION, endpoint_url=moto_endpoint,
                    session=SESSION)
    await (await store.client()).create_bucket(Bucket=store.bucket)
    yield store
    with anyio.fail_after(10):
        await store.aclose()


async def _append(store: S3Store, run: Any, sequence: int, *, keep_latest: int | None = None,
                  expires_at: float | None = None, shared: str | None = None) -> None:
    """Checkpoint ``sequence``, owning ``w/<sequence>`` (expiring with it) and naming the
    shared ``b/<sequence>`` (or ``shared``)."""
    shared = f"b/{sequence}" if shared is None else shared
    record = msgspec.structs.replace(make_checkpoint(run, sequence, expires_at=expires_at),
                                     refs=(shared,))
    items = [make_item(shared, f"b{sequence}".encode()),
             make_item(f"w/{sequence}", f"w{sequence}".encode(), owner=sequence,
                       expires_at=expires_at)]
    await store.append_with_items(key_of(run), record, run=run, keep_latest=keep_latest,
                                  now=T0, items=items)


def _whole(run: Any, sequence: int) -> tuple[str, dict[str, bytes]]:
    """What a read with items of checkpoint ``sequence`` written by ``_append`` returns."""
    return checkpoint_id_of(run, sequence), {f"b/{sequence}": f"b{sequence}".encode(),
                                             f"w/{sequence}": f"w{sequence}".encode()}


async def _store_views(store: S3Store, run_key: str, now: float,
                       sequences: Sequence[int]) -> dict[str, Any]:
    """What every read of the store returns for the run, sent concurrently: of checkpoints
    ``sequences`` and of their items (of 0-4 with ``FC_HUNT``)."""
    if HUNT:
        sequences = range(5)
    names: list[str] = []
    calls: list[Callable[[], Awaitable[Any]]] = []

    def read(name: str, call: Callable[[], Awaitable[Any]]) -> None:
        names.append(name)
        calls.append(call)

    async def got(sequence: int) -> str | None:
        found = await store.get(run_key, sequence, now=now)
        return None if found is None else found[0].checkpoint_id

    async def with_items(sequence: int | None) -> tuple[str, dict[str, bytes]] | None:
        found = await store.read_with_items(run_key, sequence=sequence, now=now)
        return None if found is None else (found[0].checkpoint_id, found[2])

    async def latest() -> str | None:
        found = await store.latest(run_key, now=now)
        return None if found is None else found[0].checkpoint_id

    async def headers(before: int | None, limit: int) -> list[int]:
        page = (await store.headers(run_key, before=before, limit=limit, now=now))[0]
        return [header.sequence for header in page]

    async def items(key: str) -> bytes | None:
        return (await store.get_items(run_key, [key], now=now)).get(key)

    async def runs() -> list[tuple[str, int, int]]:
        page = (await store.list_runs(status=None, limit=10, cursor=None, now=now))[0]
        return [(run.run_id, run.checkpoint_count, run.latest_sequence) for run in page]

    for sequence in sequences:
        read(f"get {sequence}", lambda s=sequence: got(s))
        read(f"read_with_items {sequence}", lambda s=sequence: with_items(s))
    read("latest", latest)
    read("read_with_items latest", lambda: with_items(None))
    read("headers", lambda: headers(None, 10))
    read("headers before 3", lambda: headers(3, 10))
    for key in [f"w/{sequence}" for sequence in sequences]:
        # One key a call: a batch of several keys is no atomic removal.
        read(f"get_items {key}", lambda k=key: items(k))
    read("list_runs", runs)
    read("count_runs", lambda: store.count_runs(status=None, now=now))
    return dict(zip(names, await gather(calls), strict=True))


class _Watch:
    """Reads before each key of every batch and after the last; first does something
    (another process's create, a connection cut) when ``at`` keys of a batch are done: at 0,
    a create lands after the batch was decided and before any of its keys is applied."""

    def __init__(self, read: Callable[[], Awaitable[dict[str, Any]]], *, at: int = -1,
                 then: Callable[[], Awaitable[Any]] | None = None) -> None:
        self.read, self.at, self.then = read, at, then
        self.seen: list[dict[str, Any]] = []
        self.done: list[Any] = []
        # Batches may be sent concurrently: one at a time here, so no read is made while
        # ``then`` (another process's create) is under way, half made (its slot committed,
        # its owned items not written yet): the reads judge removals, not a create in flight.
        self._turn = anyio.Lock()

    async def __call__(self, done: list[str]) -> None:
        async with self._turn:
            then, self.then = (self.then, None) if len(done) == self.at else (None, self.then)
            if then is not None:  # once
                self.done.append(await then())
            self.seen.append(await self.read())


async def _after_first(
    store: S3Store, method: str, matches: Callable[[str, Any], bool],
    change: Callable[[], Awaitable[Any]], monkeypatch: pytest.MonkeyPatch,
) -> list[str]:
    """Make ``change`` (by another store) follow the first ``method`` call of ``store``'s
    objects (``list``, ``delete_if``...) whose key and result ``matches`` accepts; the list
    returned records that it did."""
    io = await store._objects()
    original = getattr(io, method)
    ran: list[str] = []

    async def then_change(name: str, *args: Any, **kwargs: Any) -> Any:
        result = await original(name, *args, **kwargs)
        if not ran and matches(name, result):
            ran.append("changed")
            await change()
        return result

    monkeypatch.setattr(io, method, then_change)
    return ran


async def _stopped(**_: Any) -> Any:
    """A request the connection drops."""
    raise EndpointConnectionError(endpoint_url="http://s3")


_OF_CHECKPOINTS = ("get ", "read_with_items ", "get_items ")
"""The reads of one checkpoint (or item), not of the run's listing."""


def _consistent(seen: list[dict[str, Any]], before: dict[str, Any], after: dict[str, Any],
                *, only: tuple[str, ...] | None = None) -> None:
    """Each read (those whose name starts with one of ``only``, if given) returned what it
    returned before or what it returns after, and once after (when that differs), never
    before again."""
    assert seen
    for name, was in before.items():
        if only is not None and not name.startswith(only):
            continue
        moved = False
        for n, view in enumerate(seen):
            found = view[name]
            assert found in (was, after[name]), (n, name, found, was, after[name])
            if moved:
                assert found == after[name], (n, name, "came back", found)
            moved = moved or (found == after[name] and found != was)


# -- pruning ------------------------------------------------------------------------------------


@_cases("pruned", [1, 2], [(1, "items-first"), (2, "shuffled")])
async def test_reads_during_a_piecewise_pruning_find_each_checkpoint_whole_or_gone(
    s3_store: S3Store, reader: S3Store, writer: S3Store, monkeypatch: pytest.MonkeyPatch,
    order: Callable[[list[Any]], list[Any]], pruned: int,
) -> None:
    """Checkpoints 0-2; the append of 3 with ``keep_latest`` prunes 0 (or 0 and 1): slots,
    markers, owned items. Meanwhile another process appends 4: it stays with its items.
    Before the fix the slots went in the same batch as the items: a read of checkpoint 0
    found its item gone and its slot still there, and returned it without the item.

    Pruning one checkpoint (the steady state), every read is as before or after. Of two,
    each is whole or gone, but a listing may show one of them gone before the other (the
    slots go in one batch)."""
    run = make_run("pruned")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        for sequence in range(3):
            await _append(s3_store, run, sequence)
        seen = [0, 4] if pruned == 1 else [0, 1]
        watch = _Watch(lambda: _store_views(reader, key, T0, seen), at=0,
                       then=lambda: _append(writer, run, 4))
        batches = await _piecewise(s3_store, monkeypatch, order, watch)
        await _append(s3_store, run, 3, keep_latest=4 - pruned)
        monkeypatch.undo()
        after = await _store_views(reader, key, T0, [0, 1, 4])

    assert watch.done == [None]
    first = watch.seen[0]  # 3 and 4 appended, nothing pruned yet
    assert [first[f"read_with_items {n}"] for n in seen] == [_whole(run, n) for n in seen]
    assert [after[f"read_with_items {n}"] for n in (0, 1, 4)] == [
        None if n < pruned else _whole(run, n) for n in (0, 1, 4)]
    assert after["read_with_items latest"] == _whole(run, 4)
    _consistent(watch.seen, first, after, only=None if pruned == 1 else _OF_CHECKPOINTS)
    # The slots, then the owned items and their markers (the marker of a checkpoint naming
    # shared items stays until the sweep).
    assert batches == [pruned, 2 * pruned]


async def _manager_views(manager: CheckpointManager, run_id: str,
                         ids: Sequence[str]) -> dict[str, Any]:
    """What the manager's reads return for the run: ``restore``, ``restore_from`` of each
    of ``ids``, ``list_checkpoints``, ``list_runs``."""

    async def restored(checkpoint_id: str | None) -> tuple[str, Any] | None:
        found = await (manager.restore(run_id) if checkpoint_id is None
                       else manager.restore_from(checkpoint_id))
        return None if found is None else (found.checkpoint_id, found.state)

    async def listed() -> list[str]:
        return [meta.checkpoint_id for meta in await manager.list_checkpoints(run_id)]

    async def runs() -> list[tuple[str, int]]:
        return [(run.run_id, run.checkpoint_count) for run in await manager.list_runs()]

    calls = [lambda: restored(None), listed, runs,
             *[lambda cid=checkpoint_id: restored(cid) for checkpoint_id in ids]]
    found = await gather(calls)
    return dict(zip(["restore", "list_checkpoints", "list_runs", *ids], found, strict=True))


@_cases("how", ["create", "prune"], [("create", "reversed")])
async def test_manager_reads_during_a_piecewise_pruning_find_each_checkpoint_or_none(
    s3_store: S3Store, reader: S3Store, monkeypatch: pytest.MonkeyPatch,
    order: Callable[[list[Any]], list[Any]], how: str,
) -> None:
    """Through a manager: a create with ``max_checkpoints_per_run=2`` prunes the oldest of 3
    (one batch), or ``prune(run_id, 1)`` deletes the older two (a tombstone, then a batch,
    each)."""
    manager = CheckpointManager(s3_store, config=CheckpointConfig(max_checkpoints_per_run=2))
    by_reader = CheckpointManager(reader)
    with anyio.fail_after(DEADLINE):
        made = [await manager.create("managed", {"n": n}) for n in range(2)]
        ids = [checkpoint.checkpoint_id for checkpoint in made]
        watch = _Watch(lambda: _manager_views(by_reader, "managed", ids))
        batches = await _piecewise(s3_store, monkeypatch, order, watch)
        if how == "create":
            made.append(await manager.create("managed", {"n": 2}))
        else:
            assert await manager.prune("managed", 1) == 1
        monkeypatch.undo()
        after = await _manager_views(by_reader, "managed", ids)

    assert batches
    assert after[ids[0]] is None
    assert after[ids[1]] == (ids[1], {"n": 1})
    _consistent(watch.seen, watch.seen[0], after)


# -- delete of one checkpoint -----------------------------------------------------------------


@_cases("deleted", [1, 2], [(1, "items-first")])
async def test_reads_during_a_piecewise_delete_find_the_checkpoint_whole_or_gone(
    s3_store: S3Store, reader: S3Store, writer: S3Store, monkeypatch: pytest.MonkeyPatch,
    order: Callable[[list[Any]], list[Any]], deleted: int,
) -> None:
    """``delete`` of checkpoint 1 (or of the newest, 2) buries its slot, then removes its
    marker and what it owns in one batch. Meanwhile another process appends 3."""
    run = make_run("deleted")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        for sequence in range(3):
            await _append(s3_store, run, sequence)
        watch = _Watch(lambda: _store_views(reader, key, T0, [deleted]), at=0,
                       then=lambda: _append(writer, run, 3))
        await _piecewise(s3_store, monkeypatch, order, watch)
        assert await s3_store.delete(key, deleted, checkpoint_id=checkpoint_id_of(run, deleted))
        monkeypatch.undo()
        after = await _store_views(reader, key, T0, [deleted, 3])

    assert watch.done == [None]
    assert after[f"read_with_items {deleted}"] is None
    assert after["read_with_items 3"] == _whole(run, 3)
    _consistent(watch.seen, watch.seen[0], after)


# -- delete_items --------------------------------------------------------------------------------


@_orders("reversed")
async def test_reads_during_a_piecewise_delete_items_find_the_item_or_none(
    s3_store: S3Store, reader: S3Store, monkeypatch: pytest.MonkeyPatch,
    order: Callable[[list[Any]], list[Any]],
) -> None:
    """``delete_items`` of the item checkpoint 1 owns removes the item and its marker in one
    batch: reads of checkpoint 1 find it with the item, or without."""
    run = make_run("items-deleted")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        for sequence in range(2):
            await _append(s3_store, run, sequence)
        watch = _Watch(lambda: _store_views(reader, key, T0, [1]))
        batches = await _piecewise(s3_store, monkeypatch, order, watch)
        assert await s3_store.delete_items(key, ["w/1"]) == 1
        monkeypatch.undo()
        after = await _store_views(reader, key, T0, [1])

    assert batches == [1, 1]  # the item, then its marker
    assert watch.seen[0]["read_with_items 1"] == _whole(run, 1)
    assert after["read_with_items 1"] == (checkpoint_id_of(run, 1), {"b/1": b"b1"})
    _consistent(watch.seen, watch.seen[0], after)


# -- the cleanup loop ---------------------------------------------------------------------------


@_orders("items-first")
async def test_reads_during_a_piecewise_purge_of_expired_checkpoints(
    s3_store: S3Store, reader: S3Store, writer: S3Store, monkeypatch: pytest.MonkeyPatch,
    order: Callable[[list[Any]], list[Any]],
) -> None:
    """Checkpoint 0 expired, 1 deleted (a tombstone), 2 live: the cleanup loop removes 0,
    the tombstone and what they owned (marked items one by one, the rest in a batch).
    Meanwhile another process appends 3."""
    run = make_run("expiring")
    key = key_of(run)
    now = T0 + 100
    with anyio.fail_after(DEADLINE):
        await _append(s3_store, run, 0, expires_at=T0 + 50)
        for sequence in (1, 2):
            await _append(s3_store, run, sequence)
        client = await s3_store.client()
        monkeypatch.setattr(client, "delete_objects", _stopped)  # the delete leaves w/1
        with pytest.raises(StoreUnavailableError):
            await s3_store.delete(key, 1, checkpoint_id=checkpoint_id_of(run, 1))
        monkeypatch.undo()
        watch = _Watch(lambda: _store_views(reader, key, now, [1]), at=0,
                       then=lambda: _append(writer, run, 3))
        batches = await _piecewise(s3_store, monkeypatch, order, watch)
        removed, finished = await s3_store.purge_expired(now=now, limit=100)
        monkeypatch.undo()
        after = await _store_views(reader, key, now, [0, 1, 3])
        keys = await _keys(s3_store)

    assert (removed, finished) == (1, True)
    assert watch.done == [None]
    assert sum(batches) >= 4
    assert [after[f"read_with_items {n}"] for n in (0, 1, 3)] == [None, None, _whole(run, 3)]
    assert _left_of(keys, key, 0) == _left_of(keys, key, 1) == []
    _consistent(watch.seen, watch.seen[0], after)


@_cases("stopped", ["delete_run", "dead"], [("delete_run", "reversed"),
                                             ("dead", "items-first")])
async def test_a_new_life_begun_during_a_purge_of_an_ended_run_keeps_its_items(
    s3_store: S3Store, reader: S3Store, writer: S3Store, monkeypatch: pytest.MonkeyPatch,
    order: Callable[[list[Any]], list[Any]], stopped: str,
) -> None:
    """The cleanup loop removes what an ended run left: a ``delete_run`` stopped after the
    run object, or a dead run (its checkpoints expired; its run object goes first). Once
    it has listed the run, another process starts the run over, writing checkpoint 0 with
    items at the keys the old life used: it stays restorable with them. Before the fix the
    cleanup deleted the items by key, the new life's with them. (The new life names a
    shared item of its own: see the next test.)"""
    run = make_run("ended", expires_at=T0 + 50 if stopped == "dead" else None)
    key = key_of(run)
    again = make_run("ended")
    now = T0 + 100
    with anyio.fail_after(DEADLINE):
        for sequence in range(2):
            await _append(s3_store, run, sequence,
                          expires_at=T0 + 50 if stopped == "dead" else None)
        if stopped == "delete_run":
            client = await s3_store.client()
            monkeypatch.setattr(client, "delete_objects", _stopped)
            with pytest.raises(StoreUnavailableError):
                await s3_store.delete_run(key)
            monkeypatch.undo()
        # Once the cleanup loop listed the runs (the run object gone), or deleted the dead
        # run's run object.
        ran = await _after_first(
            s3_store, "list" if stopped == "delete_run" else "delete_if",
            lambda name, done: name == "runs/" or (name.endswith("/a") and done is True),
            lambda: _append(writer, again, 0, shared="b/again"), monkeypatch)
        watch = _Watch(lambda: _store_views(reader, key, now, [0]))
        await _piecewise(s3_store, monkeypatch, order, watch)
        await s3_store.purge_expired(now=now, limit=100)
        monkeypatch.undo()
        after = await _store_views(reader, key, now, [0, 1])

    assert ran == ["changed"]
    new_life = (checkpoint_id_of(again, 0), {"b/again": b"b0", "w/0": b"w0"})
    assert watch.seen[0]["read_with_items 0"] == new_life
    assert after["read_with_items 0"] == new_life
    assert after["read_with_items latest"] == new_life
    assert after["get_items w/1"] is None
    _consistent(watch.seen, watch.seen[0], after)


@pytest.mark.parametrize("ended", ["dead", "delete_run"])
async def test_a_new_life_begun_during_the_removal_of_an_ended_run_keeps_a_shared_item_it_found(
    s3_store: S3Store, reader: S3Store, writer: S3Store, monkeypatch: pytest.MonkeyPatch,
    ended: str,
) -> None:
    """As above, the run dead (the cleanup loop purges it) or deleted (``delete_run``), but
    the new life names the shared item ``b/0`` its old life wrote too, with the same value,
    and begins once the removal deleted the run object: its create-only PUT finds the item
    in place. Before the fix it kept it, and the removal, which listed it before, deleted
    it (its ETag unchanged): the acknowledged checkpoint read without it. Now it writes it
    again as its own (another ETag), which the removal leaves; the old life's other shared
    item goes."""
    run = make_run(ended, expires_at=T0 + 50 if ended == "dead" else None)
    key = key_of(run)
    again = make_run(ended)
    with anyio.fail_after(DEADLINE):
        for sequence in range(2):
            await _append(s3_store, run, sequence,
                          expires_at=T0 + 50 if ended == "dead" else None)
        ran = await _after_first(s3_store, "delete_if",
                                 lambda name, done: name.endswith("/a") and done is True,
                                 lambda: _append(writer, again, 0), monkeypatch)
        if ended == "dead":
            await s3_store.purge_expired(now=T0 + 100, limit=100)
        else:
            assert await s3_store.delete_run(key) == 2
        monkeypatch.undo()
        found = await reader.read_with_items(key, sequence=0, now=T0 + 100)
        left = await reader.get_items(key, ["b/0", "b/1"], now=T0 + 100)

    assert ran == ["changed"]
    assert found is not None
    assert (found[0].checkpoint_id, found[2]) == _whole(again, 0)
    assert left == {"b/0": b"b0"}


# -- batches cut short ---------------------------------------------------------------------------


def _left_of(keys: list[str], run_key: str, sequence: int) -> list[str]:
    """The objects of checkpoint ``sequence`` (slot, markers) and of the items it owns."""
    slot = layout.slot_key(run_key, sequence)
    item = layout.item_object(run_key, layout.hex_item_key(f"w/{sequence}"))
    return [key for key in keys if key in (slot, item) or key.startswith(slot + "/")]


@pytest.mark.parametrize(("batch", "at"), [
    ("pruning", 1), ("delete newest", 2), ("delete_items", 1),
    *([("delete older", 1), ("delete older", 2), ("delete newest", 1)] if HUNT else [])])
async def test_a_batch_cut_short_reads_consistently_and_the_cleanup_loop_finishes_it(
    s3_store: S3Store, reader: S3Store, monkeypatch: pytest.MonkeyPatch, batch: str, at: int,
) -> None:
    """The connection drops once ``at`` keys of the batch (reversed) are applied (pruning and
    ``delete_items``: once the slot, or the item, went; the markers not): pruning goes on
    (the next append prunes again), the other calls raise. Each read made then is as
    before the call or as after it; the cleanup loop then removes what the batch left, and
    reads are as after it."""
    run = make_run(f"cut-{batch.replace(' ', '-')}")
    key = key_of(run)
    target = {"pruning": 0, "delete older": 1, "delete newest": 2, "delete_items": 1}[batch]
    with anyio.fail_after(DEADLINE):
        for sequence in range(3):
            await _append(s3_store, run, sequence)
        watch = _Watch(lambda: _store_views(reader, key, T0, [target]), at=at, then=_stopped)
        await _piecewise(s3_store, monkeypatch, _reversed, watch)
        if batch == "pruning":
            await _append(s3_store, run, 3, keep_latest=3)
        elif batch == "delete_items":
            with pytest.raises(StoreUnavailableError):
                await s3_store.delete_items(key, ["w/1"])
        else:
            with pytest.raises(StoreUnavailableError):
                await s3_store.delete(key, target, checkpoint_id=checkpoint_id_of(run, target))
        monkeypatch.undo()
        left = await _store_views(reader, key, T0, [target])
        await reader.purge_expired(now=T0, limit=100)
        after = await _store_views(reader, key, T0, [target])
        keys = await _keys(s3_store)

    gone = None if batch != "delete_items" else (checkpoint_id_of(run, 1), {"b/1": b"b1"})
    before = watch.seen[0]  # once the call began (the append made, the slot buried)
    assert before[f"read_with_items {target}"] == (
        gone if batch.startswith("delete ") else _whole(run, target))
    assert after[f"read_with_items {target}"] == gone
    _consistent([*watch.seen, left, after], before, after)
    left_over = _left_of(keys, key, target)
    if batch == "delete_items":
        assert after["get_items w/1"] is None
    elif batch == "delete newest":  # its tombstone stays (slot and marker), nothing else
        assert [entry.rpartition("/")[2][:1] for entry in left_over] == ["9", "t"], left_over
    else:  # what the cut left of the checkpoint removed is gone
        assert left_over == []


@pytest.mark.parametrize("author", ["remover", "another"])
@pytest.mark.parametrize("remover", ["delete", "pruning"])
async def test_an_item_taken_over_during_a_removal_stays_with_its_new_owner(
    s3_store: S3Store, reader: S3Store, writer: S3Store, monkeypatch: pytest.MonkeyPatch,
    remover: str, author: str,
) -> None:
    """Checkpoint 0 owns ``w/0``; while a ``delete`` of checkpoint 0 (or an append of 3
    pruning 0 and 1) is applied, another process gives ``w/0`` to checkpoint 1 (or 2)
    with ``put_owned_items`` (acknowledged). The removal deletes each item only while it
    is the object the removed checkpoint owned: its ETag as the removing process wrote it
    (``author`` "remover"), or as read before the batch (written by ``another`` process).
    The new owner keeps ``w/0`` with its marker; the rest of what was removed is gone."""
    run = make_run(f"taken-over-{author}")
    key = key_of(run)
    owner = 1 if remover == "delete" else 2
    hex_key = layout.hex_item_key("w/0")
    with anyio.fail_after(DEADLINE):
        for sequence in range(owner + 1):
            await _append(s3_store if author == "remover" else writer, run, sequence)
        moved: list[bool] = []

        async def between(done: list[str]) -> None:
            if not moved:
                moved.append(await writer.put_owned_items(
                    key, [make_item("w/0", b"moved", owner=owner)], owner=owner,
                    checkpoint_id=checkpoint_id_of(run, owner), if_absent=False, now=T0))

        await _piecewise(s3_store, monkeypatch, _reversed, between)
        if remover == "delete":
            assert await s3_store.delete(key, 0, checkpoint_id=checkpoint_id_of(run, 0))
        else:
            await _append(s3_store, run, 3, keep_latest=2)
        monkeypatch.undo()
        found = await reader.read_with_items(key, sequence=owner, now=T0)
        keys = await _keys(s3_store)

    assert moved == [True]
    assert found is not None
    assert found[2] == {**_whole(run, owner)[1], "w/0": b"moved"}
    markers = [entry for entry in keys if f"/w{hex_key}/" in entry]
    assert [entry.startswith(layout.slot_key(key, owner) + "/") for entry in markers] == [True]
    removed = [layout.slot_key(key, sequence) for sequence in range(owner)]
    left = [entry for entry in keys if entry.startswith(tuple(removed))]
    # A delete leaves its tombstone (slot and marker); pruning the markers of checkpoints
    # naming shared items (until a sweep); nothing else of what they owned.
    kinds = [entry.rpartition("/")[2][:1] for entry in left]
    assert kinds == (["9", "t"] if remover == "delete" else ["m", "m"]), left
    # ``w/1``: the new owner's own item after a delete, a pruned checkpoint's after pruning.
    assert (layout.item_object(key, layout.hex_item_key("w/1")) in keys) == (remover == "delete")
