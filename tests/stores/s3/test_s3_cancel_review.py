"""Review of the readers' late-slot check (``S3Store._stands`` and ``_follows``): acknowledged
checkpoints whose marker PUT failed, below the run's floor, where the slot after them
cannot vouch for them (expired and removed alone, damaged, or deleted after the next one
was written). A process raising the floor writes the markers of the checkpoints it knows
have none first (the writer remembers its failed ones; others see them listed), and a
damaged slot after one does not hide it."""

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
from tests.stores.s3.test_s3_damage_fixes import _keys, _put
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


async def _pruned_past_one(
    stores: tuple[S3Store, S3Store], run_id: str, monkeypatch: pytest.MonkeyPatch,
) -> tuple[Checkpoint, int]:
    """Checkpoints 0 to 3 of ``run_id``, three kept: 1 acknowledged without its marker, then
    3's pruning removes 0 and raises the floor over 1. Returns 1 and the floor."""
    writer = CheckpointManager(stores[0], config=CheckpointConfig(max_checkpoints_per_run=3))
    bare = await _bare_at_one(writer, run_id, monkeypatch)
    await writer.create(run_id, {"n": 2})
    await writer.create(run_id, {"n": 3})  # prunes 0: the floor goes to 4
    return bare, await _floor(stores[1], key_of_run(run_id))


async def _floor(store: S3Store, key: str) -> int:
    state = await store._read_state(await store._objects(), key)
    assert state is not None
    return state[0].floor


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
    assert floor > 1  # the case: 1 lies below the floor
    assert [item.checkpoint_id for item in listed][:2] == [last.checkpoint_id,
                                                          bare.checkpoint_id]
    assert by_id is not None
    assert by_id.state == {"n": 1}


async def test_an_acknowledged_create_survives_a_damaged_next_slot(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Checkpoint 1 is acknowledged although its marker's PUT failed; 2 and 3 follow, 3's
    pruning (three kept) removes 0 and raises the floor over 1. Then the object of
    checkpoint 2 is damaged (a bad disk, an operator's copy): a damaged neighbouring record
    must not take 1 with it. Before the late-slot check, 1 read as it was."""
    other_store = stores[1]
    other = CheckpointManager(other_store)
    key = key_of_run("damaged")

    with anyio.fail_after(DEADLINE):
        bare, floor = await _pruned_past_one(stores, "damaged", monkeypatch)
        client = await other_store.client()
        await client.put_object(Bucket=other_store.bucket,
                                 Key=other_store.prefix + layout.slot_key(key, 2),
                                 Body=b"\x01not a slot")
        by_id = await other.restore_from(bare.checkpoint_id)
        got = await other_store.get(key, 1, now=T0)

    assert floor > 1  # the case: 1 lies below the floor
    assert by_id is not None
    assert by_id.state == {"n": 1}
    assert got is not None


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

    assert floor > 1  # the case: 1 lies below the floor
    assert [item.sequence for item in listed] == [4, 3, 1, 0]
    assert by_id is not None
    assert by_id.state == {"n": 1}


async def test_a_damaged_next_slot_hides_no_checkpoint_without_its_marker(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As above, but 1 has no marker below the floor (the writer's raise of the floor wrote
    it; it is removed here, as a process that knew nothing of it would have left it): the
    readers' check reads the slot after it, which is damaged. Which slot that one follows
    nobody can tell, so it must not count as "the run does not go on from 1"."""
    other_store = stores[1]
    other = CheckpointManager(other_store)
    key = key_of_run("unmarked")

    with anyio.fail_after(DEADLINE):
        bare, floor = await _pruned_past_one(stores, "unmarked", monkeypatch)
        markers = [entry for entry in await _keys(other_store, layout.slot_key(key, 1))
                   if entry != layout.slot_key(key, 1)]
        client = await other_store.client()
        await client.delete_objects(Bucket=other_store.bucket, Delete={"Objects": [
            {"Key": other_store.prefix + marker} for marker in markers]})
        await _put(other_store, layout.slot_key(key, 2), b"\x01not a slot")
        by_id = await other.restore_from(bare.checkpoint_id)
        got = await other_store.get(key, 1, now=T0)
        left = await _keys(other_store, layout.slot_key(key, 1))

    assert floor > 1
    assert len(markers) == 1  # written by the raise of the floor, removed by the test
    assert left == [layout.slot_key(key, 1)]  # the case: no marker below the floor
    assert by_id is not None
    assert by_id.state == {"n": 1}
    assert got is not None
    assert got[0].checkpoint_id == bare.checkpoint_id


async def test_the_cleanup_loop_keeps_the_floor_below_a_marker_it_could_not_write(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Checkpoint 1 is acknowledged without its marker, 2 (a short ttl) and 3 follow; no
    pruning, so the floor stays under 1. The cleanup loop would remove the expired 2 alone
    and raise the floor over 1, but 1's marker fails again there: the floor must stay (2
    goes at a later pass), or 1 lies below it without its marker, and the slot after it
    (3) names 2, not 1."""
    writer_store, other_store = stores
    now = [T0]
    writer = CheckpointManager(writer_store, config=CheckpointConfig(clock=lambda: now[0]))
    other = CheckpointManager(other_store, config=CheckpointConfig(clock=lambda: now[0]))
    key = key_of_run("kept")

    with anyio.fail_after(DEADLINE):
        bare = await _bare_at_one(writer, "kept", monkeypatch, ttl_seconds=1000)
        await writer.create("kept", {"n": 2}, ttl_seconds=10)
        await writer.create("kept", {"n": 3}, ttl_seconds=1000)
        now[0] = T0 + 20
        _marker_fails(monkeypatch, key, 1)
        removed = await other.cleanup_expired()
        monkeypatch.undo()
        floor = await _floor(other_store, key)
        by_id = await other.restore_from(bare.checkpoint_id)
        listed = await other.list_checkpoints("kept")
        assert await other.cleanup_expired() == 1  # checkpoint 2, 1's marker written first
        after = await other.restore_from(bare.checkpoint_id)

    assert removed == 0
    assert floor <= 1
    assert by_id is not None
    assert by_id.state == {"n": 1}
    assert [item.sequence for item in listed] == [3, 1, 0]  # 2 expired
    assert after is not None
    assert after.state == {"n": 1}
