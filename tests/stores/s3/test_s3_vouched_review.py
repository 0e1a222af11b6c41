"""Review of an append's pruning writing the marker of a kept checkpoint below the floor
(``S3Store._vouched``, beside the cleanup loop's ``_heal``): an acknowledged create whose
own pruning raised the floor beside its failed marker PUT is a slot below the floor without
its marker, read as a checkpoint only while the run goes on from it (the slot after it
names its token). Whoever removes that next slot must write its marker first, also a
process that does not know the slot (it knows the run from its head), and nobody may remove
a damaged next slot, which readers take as "the run goes on from it" (it cannot tell)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from fastcheckpoint import CheckpointConfig, CheckpointManager
from fastcheckpoint.errors import StoreUnavailableError
from fastcheckpoint.stores import _s3_io
from fastcheckpoint.stores import _s3_layout as layout
from fastcheckpoint.stores import s3 as s3_module
from fastcheckpoint.stores._base import RunRecord
from fastcheckpoint.stores.s3 import S3Store
from fastcheckpoint.testing import T0, checkpoint_id_of, key_of, make_checkpoint, make_run
from tests.stores._moto import moto_endpoint
from tests.stores.s3.test_s3 import DEADLINE
from tests.stores.s3.test_s3_cancel_fix_review import _raiser_without_marker, _seen
from tests.stores.s3.test_s3_cancel_review import _floor, _marker_fails
from tests.stores.s3.test_s3_damage_fixes import _put
from tests.stores.s3.test_s3_sequence_guard import stores

__all__ = ["moto_endpoint", "stores"]

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


async def test_an_unlimited_manager_pruning_the_expired_next_one_keeps_the_floor_raiser(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The writer keeps three: checkpoint 3's create prunes 0 and raises the floor to 4; its
    marker PUT fails (acknowledged). 4 gets a short ttl, 5 a long one. Another process that
    keeps every checkpoint (no ``max_checkpoints_per_run``, so its pruning lists nothing
    below what it knows) joins the run through the manager, which lists it whole (3 below
    the floor without its marker), and its append prunes the expired 4: 3 has not expired.
    A guard (passes before the review's fixes): the pruning writes 3's marker first."""
    writer_store, other_store = stores
    now = [T0]
    writer = CheckpointManager(writer_store, config=CheckpointConfig(
        clock=lambda: now[0], max_checkpoints_per_run=3))
    other = CheckpointManager(other_store, config=CheckpointConfig(
        clock=lambda: now[0], max_checkpoints_per_run=None))

    with anyio.fail_after(DEADLINE):
        bare = await _raiser_without_marker(writer, "unlimited", 3, monkeypatch, 1000)
        await writer.create("unlimited", {"n": 4}, ttl_seconds=10)
        await writer.create("unlimited", {"n": 5}, ttl_seconds=1000)
        now[0] = T0 + 20
        await other.create("unlimited", {"n": 6}, ttl_seconds=1000)
        floor, listed, by_id = await _seen(other, other_store, "unlimited", bare)

    assert floor > 3
    assert [item.sequence for item in listed] == [6, 5, 3]
    assert by_id is not None
    assert by_id.state == {"n": 3}


async def _raised_beside_failed_marker(
    store: S3Store, run_id: str, monkeypatch: pytest.MonkeyPatch, *,
    keep_latest: int | None = None, last: int = 5,
) -> tuple[RunRecord, int]:
    """Through ``store``, checkpoints 0 to ``last`` of ``run_id``; 0 expires at ``T0 + 5``, 4
    at ``T0 + 10``, the others at ``T0 + 1000``; 0 to 2 are appended at ``T0``, the others at
    ``T0 + 6``: 3's append prunes the expired 0 and raises the floor to 4 while its marker's
    PUT fails (acknowledged all the same). Returns the run and 3."""
    run = make_run(run_id)
    expiry = {0: T0 + 5, 4: T0 + 10}
    for sequence in range(last + 1):
        if sequence == 3:
            _marker_fails(monkeypatch, key_of(run), 3)
        await store.append(key_of(run), make_checkpoint(
            run, sequence, expires_at=expiry.get(sequence, T0 + 1000)),
            run=run, keep_latest=keep_latest, now=T0 if sequence < 3 else T0 + 6)
        if sequence == 3:
            monkeypatch.undo()
    return run, 3


async def _readable(store: S3Store, run: RunRecord, sequence: int,
                    now: float) -> tuple[int, list[int], bool]:
    """The run's floor, the sequences its listing shows and whether ``get`` finds
    ``sequence``, read by ``store``."""
    key = key_of(run)
    floor = await _floor(store, key)
    listed = [header.sequence for header in
              (await store.headers(key, before=None, limit=20, now=now))[0]]
    return floor, listed, await store.get(key, sequence, now=now) is not None


async def test_a_process_keeping_all_pruning_the_expired_next_one_keeps_the_floor_raiser(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another process, which keeps every checkpoint (``keep_latest=None``), joins the run
    from its head (a listing of the newest: it knows 4 and 5, not 3 and below) and its
    append prunes the expired 4: 3 has not expired, and must still read."""
    writer_store, other_store = stores
    run, bare = await _raised_beside_failed_marker(writer_store, "all", monkeypatch)
    with anyio.fail_after(DEADLINE):
        await other_store.append(key_of(run), make_checkpoint(run, 6, expires_at=T0 + 1000),
                                 run=run, keep_latest=None, now=T0 + 20)
        floor, listed, found = await _readable(other_store, run, bare, T0 + 20)

    assert floor > bare
    assert listed == [6, 5, 3, 2, 1]
    assert found


async def test_an_append_pruning_a_damaged_expired_next_slot_keeps_the_floor_raiser(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As above, but the slot of the expired 4 is damaged (its marker intact, so listings
    show its expiry). Readers read 3 all the same (a damaged neighbour hides no checkpoint).
    Another process (five kept) prunes the expired 4 with its append: what the slot after
    3 named cannot be told, and once it is gone the slot after that names 4, not 3."""
    writer_store, other_store = stores
    run, bare = await _raised_beside_failed_marker(writer_store, "damaged", monkeypatch)
    with anyio.fail_after(DEADLINE):
        await _put(writer_store, layout.slot_key(key_of(run), 4), b"\x01not a slot")
        before = await _readable(other_store, run, bare, T0 + 20)
        await other_store.append(key_of(run), make_checkpoint(run, 6, expires_at=T0 + 1000),
                                 run=run, keep_latest=5, now=T0 + 20)
        floor, listed, found = await _readable(other_store, run, bare, T0 + 20)

    assert before[2]
    assert floor > bare
    assert listed == [6, 5, 3, 2, 1]
    assert found


async def test_the_cleanup_loop_removing_a_damaged_expired_next_slot_keeps_the_floor_raiser(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same damaged, expired 4, removed by another process's cleanup loop."""
    writer_store, other_store = stores
    run, bare = await _raised_beside_failed_marker(writer_store, "damaged-loop", monkeypatch)
    with anyio.fail_after(DEADLINE):
        await _put(writer_store, layout.slot_key(key_of(run), 4), b"\x01not a slot")
        before = await _readable(other_store, run, bare, T0 + 20)
        await other_store.purge_expired(now=T0 + 20, limit=100)
        floor, listed, found = await _readable(other_store, run, bare, T0 + 20)

    assert before[2]
    assert floor > bare
    assert listed == [5, 3, 2, 1]
    assert found


async def _late_slot_at_2(store: S3Store, run_id: str) -> RunRecord:
    """Four kept: checkpoints 0 to 4, 2 expiring at ``T0 + 10``; 5's append (at ``T0 + 20``)
    prunes 0 and the expired 2 and raises the floor to 6. A create of sequence 2 cancelled
    long before lands now in the freed key (written here directly: a slot without marker,
    of another token). Returns the run."""
    run = make_run(run_id)
    key = key_of(run)
    for sequence in range(6):
        await store.append(key, make_checkpoint(
            run, sequence, expires_at=T0 + (10 if sequence == 2 else 1000)),
            run=run, keep_latest=4, now=T0 if sequence < 5 else T0 + 20)
    late = layout.Slot(run.incarnation, 2, "ck-late", T0, T0 + 1000, T0, b"late",
                       b"late", token=b"lateslot", run_key=key)
    await _put(store, layout.slot_key(key, 2), layout.encode(late))
    return run


async def test_a_late_slot_takes_no_place_of_an_acknowledged_checkpoint_in_the_kept_ones(
    stores: tuple[S3Store, S3Store],
) -> None:
    """The late slot at 2 of :func:`_late_slot_at_2`. Another process keeping five appends 6:
    the five newest checkpoints are 6, 5, 4, 3 and 1; the late slot is none (no read shows
    it), and goes."""
    writer_store, other_store = stores
    with anyio.fail_after(DEADLINE):
        run = await _late_slot_at_2(writer_store, "late-kept")
        before = await _readable(other_store, run, 2, T0 + 20)
        await other_store.append(key_of(run), make_checkpoint(run, 6, expires_at=T0 + 1000),
                                 run=run, keep_latest=5, now=T0 + 20)
        floor, listed, _ = await _readable(other_store, run, 2, T0 + 20)
        left = await (await writer_store._objects()).get(layout.slot_key(key_of(run), 2))

    assert floor > 2
    assert before[1] == [5, 4, 3, 1]
    assert not before[2]
    assert listed == [6, 5, 4, 3, 1]
    assert left is None


async def test_a_late_slot_below_what_the_pruning_knows_takes_no_place_in_the_kept_ones(
    stores: tuple[S3Store, S3Store],
) -> None:
    """The late slot at 2 as above, below what the other process knows: its first append (of
    6, keeping all) listed the run's head only (5 and 4). Its next append (7, keeping six)
    prunes below that (it lists 3, the late 2 and 1): the six newest checkpoints are 7 to 3
    and 1; the late slot goes."""
    writer_store, other_store = stores
    with anyio.fail_after(DEADLINE):
        run = await _late_slot_at_2(writer_store, "late-below")
        key = key_of(run)
        await other_store.append(key, make_checkpoint(run, 6, expires_at=T0 + 1000),
                                 run=run, keep_latest=None, now=T0 + 20)
        log = other_store._cached(key).log
        assert log is not None
        assert log.known_from > 2
        await other_store.append(key, make_checkpoint(run, 7, expires_at=T0 + 1000),
                                 run=run, keep_latest=6, now=T0 + 20)
        floor, listed, found = await _readable(other_store, run, 2, T0 + 20)
        left = await (await writer_store._objects()).get(layout.slot_key(key, 2))

    assert floor > 2
    assert listed == [7, 6, 5, 4, 3, 1]
    assert not found
    assert left is None


def _one_list_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next LIST fails, as a network would; the ones after it go through."""
    original = _s3_io.Bucket.list
    failed: list[bool] = []

    async def listing(bucket: Any, *args: Any, **kwargs: Any) -> Any:
        if not failed:
            failed.append(True)
            raise StoreUnavailableError("injected: the LIST failed")
        return await original(bucket, *args, **kwargs)

    monkeypatch.setattr(_s3_io.Bucket, "list", listing)


async def _four_deleted_under_five(store: S3Store, run: RunRecord) -> None:
    """Through ``store`` (keeping every checkpoint): 4 and 5 appended, then 4 deleted (its
    tombstone carries what 4 named, 5 names 4)."""
    key = key_of(run)
    for sequence in (4, 5):
        await store.append(key, make_checkpoint(run, sequence, expires_at=T0 + 1000),
                           run=run, keep_latest=None, now=T0 + 20)
    assert await store.delete(key, 4, checkpoint_id=checkpoint_id_of(run, 4))


async def test_a_log_forgetting_the_floor_raiser_beside_a_tombstone_keeps_it(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """3 without its marker below the floor (see :func:`_raised_beside_failed_marker`, 0 to 3
    only). Another process keeping every checkpoint appends 4 and 5, then deletes 4: the
    tombstone at 4 carries 3's token (the chain readers follow), 5 names 4. Its append of 6
    would remove that tombstone, writing 3's marker first, but the check of 3 fails (its
    LIST): nothing is removed, and its log (two kept in memory here) forgets 1 to 3. Its
    append of 7 removes the tombstone: 3 must still read (the process lists it first)."""
    writer_store, other_store = stores
    run, bare = await _raised_beside_failed_marker(writer_store, "forgot", monkeypatch, last=3)
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await _four_deleted_under_five(other_store, run)
        monkeypatch.setattr(s3_module, "_LOG_SPARE", 2)
        _one_list_fails(monkeypatch)
        await other_store.append(key, make_checkpoint(run, 6, expires_at=T0 + 1000),
                                 run=run, keep_latest=None, now=T0 + 20)
        log = other_store._cached(key).log
        assert log is not None
        assert 4 in log.garbage
        assert bare not in log.held
        await other_store.append(key, make_checkpoint(run, 7, expires_at=T0 + 1000),
                                 run=run, keep_latest=None, now=T0 + 20)
        monkeypatch.undo()
        floor, listed, found = await _readable(other_store, run, bare, T0 + 20)

    assert floor > bare
    assert listed == [7, 6, 5, 3, 2, 1]
    assert found
