"""Review of what the late-slot review left: a checkpoint without its marker below the floor
lower than the one right below what a log knows (an empty key between), a log that
forgets such a checkpoint twice while a tombstone above it waits to be removed, the
question "did it land late?" asked again at every pruning, and a marker left without its
slot by a removal that raced its PUT."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest

from fastcheckpoint.errors import StoreUnavailableError
from fastcheckpoint.stores import _s3_io
from fastcheckpoint.stores import _s3_layout as layout
from fastcheckpoint.stores import s3 as s3_module
from fastcheckpoint.stores._aws import RequestCounter
from fastcheckpoint.stores._base import RunRecord
from fastcheckpoint.stores.s3 import S3Store
from fastcheckpoint.testing import T0, checkpoint_id_of, key_of, make_checkpoint, make_run
from tests.stores._moto import moto_endpoint
from tests.stores.s3.test_s3 import DEADLINE
from tests.stores.s3.test_s3_sequence_guard import stores
from tests.stores.s3.test_s3_vouched_review import (
    _four_deleted_under_five,
    _late_slot_at_2,
    _raised_beside_failed_marker,
    _readable,
)

__all__ = ["moto_endpoint", "stores"]

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


def _lists_fail(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """The next ``count`` LISTs fail, as a network would; the ones after them go through."""
    original = _s3_io.Bucket.scan
    left = [count]

    async def scan(bucket: Any, *args: Any, **kwargs: Any) -> Any:
        if left[0] > 0:
            left[0] -= 1
            raise StoreUnavailableError("injected: the LIST failed")
        return await original(bucket, *args, **kwargs)

    monkeypatch.setattr(_s3_io.Bucket, "scan", scan)


async def _remove_raw(store: S3Store, key: str) -> None:
    """Every object under ``key`` removed, as a remover that checks nothing would."""
    client = await store.client()
    listed = await client.list_objects_v2(Bucket=store.bucket, Prefix=store.prefix + key)
    keys = [{"Key": entry["Key"]} for entry in listed.get("Contents", [])]
    assert keys
    await client.delete_objects(Bucket=store.bucket, Delete={"Objects": keys})


async def test_a_log_forgetting_twice_beside_a_tombstone_keeps_the_floor_raiser(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """3 without its marker below the floor. Another process keeping every checkpoint
    appends 4 and 5 and deletes 4: the tombstone at 4 carries 3's token, 5 names 4. The
    removal of the tombstone fails twice (a LIST each time): the first time the log (two
    kept in memory here) forgets 3 and knows it may lack its marker; the second time it
    forgets 5, which has its marker. The third append removes the tombstone: 3 must still
    read (the log must still know that something below it may lack its marker)."""
    writer_store, other_store = stores
    run, bare = await _raised_beside_failed_marker(writer_store, "twice", monkeypatch, last=3)
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await _four_deleted_under_five(other_store, run)
        monkeypatch.setattr(s3_module, "_LOG_SPARE", 2)
        for sequence in (6, 7):
            _lists_fail(monkeypatch, 1)
            await other_store.append(key, make_checkpoint(run, sequence, expires_at=T0 + 1000),
                                     run=run, keep_latest=None, now=T0 + 20)
        log = other_store._cached(key).log
        assert log is not None
        assert 4 in log.garbage
        assert log.known_from == 6
        await other_store.append(key, make_checkpoint(run, 8, expires_at=T0 + 1000),
                                 run=run, keep_latest=None, now=T0 + 20)
        monkeypatch.undo()
        tombstone = await (await other_store._objects()).get(layout.slot_key(key, 4))
        floor, listed, found = await _readable(other_store, run, bare, T0 + 20)

    assert tombstone is None
    assert floor > bare
    assert listed == [8, 7, 6, 5, 3, 2, 1]
    assert found


async def test_a_pruning_above_an_empty_key_keeps_the_floor_raiser_below_it(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """3 without its marker below the floor. Another process appends 4 and deletes it (the
    newest: its tombstone carries 3's token), then appends 5 (expiring at ``T0 + 30``),
    which names 3 through the tombstone; its pruning of the tombstone fails (a LIST).
    The tombstone is then removed without 3's marker written (as a remover that lost
    track of 3 did: see the test above). 3 still reads (5 names it). A process that keeps
    every checkpoint lists the run whole, appends 6, and forgets 3 (its log keeps two):
    it knows the run from 4, an empty key. Its append of 7 (after 5 expired) removes 5,
    the lowest slot it knows: it must list below it first, past the empty key, and write
    3's marker, or 3 would be hidden (the slot after it gone, the lowest above it naming
    5)."""
    writer_store, other_store = stores
    run, bare = await _raised_beside_failed_marker(writer_store, "gap", monkeypatch, last=3)
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await other_store.append(key, make_checkpoint(run, 4, expires_at=T0 + 1000),
                                 run=run, keep_latest=None, now=T0 + 20)
        assert await other_store.delete(key, 4, checkpoint_id=checkpoint_id_of(run, 4))
        _lists_fail(monkeypatch, 1)
        await other_store.append(key, make_checkpoint(run, 5, expires_at=T0 + 30),
                                 run=run, keep_latest=None, now=T0 + 20)
        monkeypatch.undo()
        await _remove_raw(writer_store, layout.slot_key(key, 4) + "/")
        await _remove_raw(writer_store, layout.slot_key(key, 4))
        before = await _readable(other_store, run, bare, T0 + 20)

        writer_store._forget(key)  # the writer now acts as a process that never saw the run
        monkeypatch.setattr(s3_module, "_LOG_SPARE", 2)
        await writer_store.append(key, make_checkpoint(run, 6, expires_at=T0 + 1000),
                                  run=run, keep_latest=None, now=T0 + 20)
        log = writer_store._cached(key).log
        assert log is not None
        assert (log.known_from, list(log.held)) == (4, [5, 6])
        await writer_store.append(key, make_checkpoint(run, 7, expires_at=T0 + 1000),
                                  run=run, keep_latest=None, now=T0 + 40)
        monkeypatch.undo()
        floor, listed, found = await _readable(other_store, run, bare, T0 + 40)

    assert before[1:] == ([5, 3, 2, 1], True)
    assert floor > bare
    assert listed == [7, 6, 3, 2, 1]
    assert found


async def test_a_late_slot_in_the_log_is_asked_about_once(
    stores: tuple[S3Store, S3Store],
) -> None:
    """The late slot at 2 of :func:`_late_slot_at_2`, in the log of another process that
    keeps every checkpoint (it read the run whole). Its appends of 7 to 9 each prune the
    one before (expired by then): the first asks whether the run goes on from the late
    slot (a LIST and a GET: it does not, so it gets no marker); the ones after it remember
    the answer, and cost what the same pruning costs without a late slot."""
    writer_store, other_store = stores
    with anyio.fail_after(DEADLINE):
        run = await _late_slot_at_2(writer_store, "late-once")
        key = key_of(run)
        assert await other_store.get_run(key, now=T0 + 20) is not None
        log = other_store._cached(key).log
        assert log is not None
        assert log.held[2].unvouched is not None
        client = await other_store.client()
        counts = []
        for sequence in range(6, 10):
            with RequestCounter.attached(client) as counter:
                await other_store.append(key, make_checkpoint(
                    run, sequence, expires_at=T0 + 5 + 10 * sequence),
                    run=run, keep_latest=None, now=T0 + 10 * sequence)
            counts.append(counter.counts)
        _, listed, found = await _readable(other_store, run, 2, T0 + 100)

    assert "DeleteObjects" not in counts[0]  # nothing expired yet
    assert (counts[1]["ListObjectsV2"], counts[1]["DeleteObjects"]) == (1, 1)
    # As without a late slot: the slot with the run object's 304 GET, the marker with the
    # check after the commit, the expired one's keys removed (and every other time the
    # floor raised over it first: once per two appends here).
    assert counts[2] == {"PutObject": 2, "GetObject": 2, "DeleteObjects": 1}
    assert counts[3] == {"PutObject": 3, "GetObject": 2, "DeleteObjects": 1}
    assert not found
    assert 2 not in listed


async def _marker_keys(store: S3Store, key: str, sequence: int) -> list[str]:
    client = await store.client()
    listed = await client.list_objects_v2(
        Bucket=store.bucket, Prefix=store.prefix + layout.slot_key(key, sequence) + "/")
    return [entry["Key"] for entry in listed.get("Contents", [])]


async def _leftover_beside_next_life(
    stores: tuple[S3Store, S3Store], name: str, old: str, new: str,
    before_next: Callable[[], None] = lambda: None,
) -> tuple[str, RunRecord, str]:
    """Checkpoints 0 to 2 of a run's life ``old`` (through the first store), expiring at
    ``T0 + 10``; the marker of 1 lands again (its PUT held in the network) once the run
    started over as ``new`` at ``T0 + 20`` (its 0 written through the other store), before
    ``before_next`` and the new life's 1 and 2: ``(run key, new life, leftover marker)``."""
    writer_store, other_store = stores
    first = make_run(name, incarnation=old)
    key = key_of(first)
    for sequence in range(3):
        await writer_store.append(key, make_checkpoint(first, sequence, expires_at=T0 + 10),
                                  run=first, keep_latest=None, now=T0)
    client = await writer_store.client()
    [leftover] = await _marker_keys(writer_store, key, 1)
    body = await (await client.get_object(Bucket=writer_store.bucket, Key=leftover))[
        "Body"].read()
    second = make_run(name, incarnation=new, created_at=T0 + 20)
    await other_store.append(key, make_checkpoint(
        second, 0, created_at=T0 + 20, expires_at=T0 + 1000), run=second,
        keep_latest=None, now=T0 + 20)
    await client.put_object(Bucket=writer_store.bucket, Key=leftover, Body=body)
    before_next()
    for sequence in (1, 2):
        await other_store.append(key, make_checkpoint(
            second, sequence, created_at=T0 + 20, expires_at=T0 + 1000), run=second,
            keep_latest=None, now=T0 + 20)
    return key, second, leftover


async def _around_cleanup(stores: tuple[S3Store, S3Store], key: str) -> tuple[
    list[str], list[int], list[int], Any, list[str]
]:
    """The markers at 1 and the run's listing (first store) before the cleanup loop passes
    at ``T0 + 30``, then the listing and 1 (other store) and the markers at 1 after it."""
    writer_store, other_store = stores
    markers = await _marker_keys(writer_store, key, 1)
    listed = [header.sequence for header in
              (await writer_store.headers(key, before=None, limit=10, now=T0 + 30))[0]]
    await writer_store.purge_expired(now=T0 + 30, limit=100)
    after = [header.sequence for header in
             (await other_store.headers(key, before=None, limit=10, now=T0 + 30))[0]]
    found = await other_store.get(key, 1, now=T0 + 30)
    return markers, listed, after, found, await _marker_keys(writer_store, key, 1)


@pytest.mark.parametrize(("old", "new"), [("inc-a", "inc-z"), ("inc-z", "inc-a")],
                         ids=["leftover-first", "leftover-last"])
async def test_an_ended_lifes_marker_landing_late_hides_no_checkpoint_of_the_next(
    stores: tuple[S3Store, S3Store], old: str, new: str,
) -> None:
    """Checkpoints 0 to 2 of a run's life, expiring at ``T0 + 10``; the marker PUT of 1 (a
    create's held in the network, or one a pruning or the cleanup loop wrote while another
    process removed the slot) lands only after the run started over at ``T0 + 20`` (its
    first checkpoint written, which removed the ended life's keys). The new life's 1 then
    has two markers, and listings took the first in key order (``leftover-first``: the
    ended life's) for its own: 1 was listed as the ended life's leftover, and the cleanup
    loop removed it. Now every listing shows 1, the cleanup loop keeps it and removes the
    leftover marker."""
    with anyio.fail_after(DEADLINE):
        key, second, leftover = await _leftover_beside_next_life(stores, "leftover", old, new)
        markers, listed, after, found, left = await _around_cleanup(stores, key)

    assert len(markers) == 2
    assert (markers[0] == leftover) == (old == "inc-a")  # the order each case is about
    assert listed == after == [2, 1, 0]
    assert found is not None
    assert found[0].checkpoint_id == checkpoint_id_of(second, 1)
    assert left == [marker for marker in markers if marker != leftover]
