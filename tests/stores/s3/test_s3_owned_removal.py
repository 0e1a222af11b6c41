"""S3 store: what removing a checkpoint that owns items costs. Each item goes only while it
is the object its checkpoint owned (``test_s3_batches.py`` gives one to another checkpoint
during the removal): the process that wrote the items knows their ETags and sends no more
requests for that; one that knows them from a listing reads each item first."""

from __future__ import annotations

import anyio
import pytest

from fastcheckpoint.stores import _s3_layout as layout
from fastcheckpoint.stores._aws import RequestCounter
from fastcheckpoint.stores.s3 import S3Store
from fastcheckpoint.testing import T0, checkpoint_id_of, key_of, make_item, make_run
from fastcheckpoint.testing._adapter import _append_items
from tests.stores._moto import moto_endpoint
from tests.stores.s3.test_s3 import DEADLINE, s3_bucket, s3_store
from tests.stores.s3.test_s3_safety import _keys
from tests.stores.s3.test_s3_superseded_reads import other

__all__ = ["moto_endpoint", "other", "s3_bucket", "s3_store"]

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


async def test_removing_owned_items_reads_only_those_the_process_did_not_write(
    s3_store: S3Store, other: S3Store
) -> None:
    """Checkpoints 0-3 each own two items, written by ``s3_store``. Its delete of 0 and its
    pruning of 1 send no GET for the items; ``other``'s delete of 2 (it knows the run from
    the delete's listing only) reads both items of 2, and so does its pruning of 3, whose
    items it knows from that listing too (in the round trip of the floor's PUT, if any)."""
    run = make_run("owned-removal-costs")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        for sequence in range(5):
            await _append_items(s3_store, run, sequence, items=[
                make_item(f"w/{sequence}/{n}", owner=sequence) for n in range(2)])
        client, elsewhere = await s3_store.client(), await other.client()
        with RequestCounter.attached(client) as deleted:
            assert await s3_store.delete(key, 0, checkpoint_id=checkpoint_id_of(run, 0))
        with RequestCounter.attached(client) as pruned:
            await _append_items(s3_store, run, 5, keep_latest=4)
        with RequestCounter.attached(elsewhere) as deleted_elsewhere:
            assert await other.delete(key, 2, checkpoint_id=checkpoint_id_of(run, 2))
        with RequestCounter.attached(elsewhere) as pruned_elsewhere:
            await _append_items(other, run, 6, keep_latest=3)
        left = await other.get_items(key, [f"w/{s}/{n}" for s in range(5) for n in range(2)],
                                     now=T0)

    # The head of the run (the run object is cached) with the slot (what it names as its
    # predecessor goes into its tombstone), the tombstone and its marker, then the marker,
    # the items and their markers each with the ETag it wrote.
    assert deleted.counts == {"ListObjectsV2": 1, "GetObject": 1, "PutObject": 2,
                              "DeleteObjects": 1}
    # The commit with its 304, the marker with the second 304; the floor; the slot, then
    # what it owned.
    assert pruned.counts == {"PutObject": 3, "GetObject": 2, "DeleteObjects": 2}
    # The slot and the run object (never read by this process), and the 2 items, read with
    # the tombstone's marker PUT.
    assert deleted_elsewhere.counts == {
        "ListObjectsV2": 1, "GetObject": 4, "PutObject": 2, "DeleteObjects": 1}
    # The commit with its 304, the marker with the second 304 (the floor is above 3
    # already), + 2 GET: the items of 3, known from a listing; then the slot, then what it
    # owned.
    assert pruned_elsewhere.counts == {"PutObject": 2, "GetObject": 4, "DeleteObjects": 2}
    assert left == {"w/4/0": b"value-w/4/0", "w/4/1": b"value-w/4/1"}


async def test_an_item_written_again_for_its_pruned_owner_is_left_to_the_cleanup_loop(
    s3_store: S3Store, other: S3Store
) -> None:
    """``other`` writes ``w/0`` again for checkpoint 0 (``put_owned_items``): the ETags
    ``s3_store`` knows of item and marker are stale, so its pruning of 0 leaves both (it
    cannot tell that write from one for another owner without a GET); the cleanup loop
    then finds the marker of a pruned owner and removes both."""
    run = make_run("owned-written-again")
    key = key_of(run)
    item = layout.item_object(key, layout.hex_item_key("w/0"))
    with anyio.fail_after(DEADLINE):
        await _append_items(s3_store, run, 0, items=[make_item("w/0", owner=0)])
        assert await other.put_owned_items(
            key, [make_item("w/0", b"again", owner=0)], owner=0,
            checkpoint_id=checkpoint_id_of(run, 0), if_absent=False, now=T0)
        await _append_items(s3_store, run, 1, keep_latest=1)
        pruned = await _keys(s3_store)
        await s3_store.purge_expired(now=T0, limit=100)
        purged = await _keys(s3_store)

    marker = f"{layout.slot_key(key, 0)}/w{layout.hex_item_key('w/0')}/"
    assert layout.slot_key(key, 0) not in pruned
    assert item in pruned
    assert [entry for entry in pruned if entry.startswith(marker)] != []
    assert item not in purged
    assert [entry for entry in purged if entry.startswith(marker)] == []
