"""Review of the readers' late-slot check (``S3Store._stands`` and ``_follows``): acknowledged
checkpoints whose marker PUT failed, below the run's floor, that reads no longer return
because the slot after them cannot vouch for them (expired and removed alone, damaged,
or deleted after the next one was written).
Each test is a strict xfail: it documents an open defect of the check."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from fastcheckpoint import Checkpoint, CheckpointConfig, CheckpointManager
from fastcheckpoint._ids import key_of as key_of_run
from fastcheckpoint.errors import StoreUnavailableError
from fastcheckpoint.stores import _s3_io
from fastcheckpoint.stores import _s3_layout as layout
from fastcheckpoint.stores.s3 import S3Store
from fastcheckpoint.testing import T0
from tests.stores._moto import moto_endpoint
from tests.stores.s3.test_s3 import DEADLINE
from tests.stores.s3.test_s3_sequence_guard import stores

__all__ = ["moto_endpoint", "stores"]

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


def _marker_fails(monkeypatch: pytest.MonkeyPatch, key: str, sequence: int) -> None:
    """Every PUT under the slot's key (its marker) fails from now on, as a network would."""
    original = _s3_io.Bucket.put

    async def put(bucket: Any, target: str, *args: Any, **kwargs: Any) -> Any:
        if target.startswith(layout.slot_key(key, sequence) + "/"):
            raise StoreUnavailableError("injected: the marker's PUT failed")
        return await original(bucket, target, *args, **kwargs)

    monkeypatch.setattr(_s3_io.Bucket, "put", put)


async def _bare_at_one(writer: CheckpointManager, run_id: str, monkeypatch: pytest.MonkeyPatch,
                       ttl_seconds: float | None = None) -> Checkpoint:
    """Checkpoints 0 and 1 of ``run_id``; 1 acknowledged although its marker's PUT failed."""
    await writer.create(run_id, {"n": 0}, ttl_seconds=ttl_seconds)
    _marker_fails(monkeypatch, key_of_run(run_id), 1)
    bare = await writer.create(run_id, {"n": 1}, ttl_seconds=ttl_seconds)
    monkeypatch.undo()
    assert bare is not None
    return bare


async def _floor(store: S3Store, key: str) -> int:
    state = await store._read_state(await store._objects(), key)
    assert state is not None
    return state[0].floor


@pytest.mark.xfail(strict=True, reason=(
    "an acknowledged checkpoint without its marker, below the floor, "
    "is hidden once the checkpoint after it (a shorter ttl) expired and was removed alone"))
async def test_an_acknowledged_create_outlives_the_shorter_ttl_of_the_next_one(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Checkpoint 1 is acknowledged although its marker's PUT failed (a create without
    owned items goes on without it). Checkpoint 2 is given a short ttl, 3 a long one, whose
    pruning (three kept) removes 0 and raises the floor over 1. The cleanup loop (another
    process) removes the expired 2 alone. 1 has not expired: every read must still return
    it. Before the late-slot check, the cleanup loop wrote 1's marker (it no longer does
    below the floor), and 1 read as it was."""
    writer_store, other_store = stores
    now = [T0]
    writer = CheckpointManager(writer_store, config=CheckpointConfig(
        clock=lambda: now[0], max_checkpoints_per_run=3))
    other = CheckpointManager(other_store, config=CheckpointConfig(clock=lambda: now[0]))
    key = key_of_run("ttl")

    with anyio.fail_after(DEADLINE):
        bare = await _bare_at_one(writer, "ttl", monkeypatch, ttl_seconds=1000)
        await writer.create("ttl", {"n": 2}, ttl_seconds=10)
        last = await writer.create("ttl", {"n": 3}, ttl_seconds=1000)  # prunes 0: floor 4
        now[0] = T0 + 20
        assert await other.cleanup_expired() == 1  # checkpoint 2
        floor = await _floor(other_store, key)
        by_id = await other.restore_from(bare.checkpoint_id)
        listed = await other.list_checkpoints("ttl")

    assert last is not None
    assert floor > 1  # the case: 1 lies below the floor without its marker
    assert [item.checkpoint_id for item in listed][:2] == [last.checkpoint_id,
                                                          bare.checkpoint_id]
    assert by_id is not None
    assert by_id.state == {"n": 1}


@pytest.mark.xfail(strict=True, reason=(
    "an acknowledged checkpoint without its marker, below the floor, is hidden when the "
    "slot after it is damaged: the check reads the damage as 'the run does not go on from it'"))
async def test_an_acknowledged_create_survives_a_damaged_next_slot(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Checkpoint 1 is acknowledged although its marker's PUT failed; 2 and 3 follow, 3's
    pruning (three kept) removes 0 and raises the floor over 1. Then the object of
    checkpoint 2 is damaged (a bad disk, an operator's copy): a damaged neighbouring record
    must not take 1 with it. Before the late-slot check, 1 read as it was."""
    writer_store, other_store = stores
    writer = CheckpointManager(writer_store,
                               config=CheckpointConfig(max_checkpoints_per_run=3))
    other = CheckpointManager(other_store)
    key = key_of_run("damaged")

    with anyio.fail_after(DEADLINE):
        bare = await _bare_at_one(writer, "damaged", monkeypatch)
        await writer.create("damaged", {"n": 2})
        await writer.create("damaged", {"n": 3})  # prunes 0: the floor goes to 4
        floor = await _floor(other_store, key)
        client = await other_store.client()
        await client.put_object(Bucket=other_store.bucket,
                                 Key=other_store.prefix + layout.slot_key(key, 2),
                                 Body=b"\x01not a slot")
        by_id = await other.restore_from(bare.checkpoint_id)
        got = await other_store.get(key, 1, now=T0)

    assert floor > 1  # the case: 1 lies below the floor without its marker
    assert by_id is not None
    assert by_id.state == {"n": 1}
    assert got is not None


@pytest.mark.xfail(strict=True, reason=(
    "an acknowledged checkpoint without its marker is hidden once a checkpoint after it, "
    "deleted after the next one was created, has its tombstone removed by a later append"))
async def test_an_acknowledged_create_survives_the_deletion_of_a_checkpoint_after_it(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Checkpoint 1 is acknowledged although its marker's PUT failed; 2 and 3 follow
    (3 names 2). Another process deletes 2 (its tombstone carries what 2 named: 1) and
    creates 4, whose append removes the tombstone below it and raises the floor over 1.
    Nothing pruned or expired 1: every read must still return it. The lowest slot above 1
    now is 3, which names 2, not 1 (it was written before 2 was deleted)."""
    writer_store, other_store = stores
    writer = CheckpointManager(writer_store)
    other = CheckpointManager(other_store)
    key = key_of_run("middle")

    with anyio.fail_after(DEADLINE):
        bare = await _bare_at_one(writer, "middle", monkeypatch)
        middle = await writer.create("middle", {"n": 2})
        await writer.create("middle", {"n": 3})
        assert middle is not None
        assert await other.delete(middle.checkpoint_id)
        await other.create("middle", {"n": 4})
        floor = await _floor(other_store, key)
        by_id = await other.restore_from(bare.checkpoint_id)
        listed = await other.list_checkpoints("middle")

    assert floor > 1  # the case: 1 lies below the floor without its marker
    assert [item.sequence for item in listed] == [4, 3, 1, 0]
    assert by_id is not None
    assert by_id.state == {"n": 1}
