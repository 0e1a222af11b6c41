"""Review of s3-cancel-fix: an acknowledged create whose own pruning raised the floor over it
(the raise is sent beside its marker PUT, so nobody knows the marker is missing when the
floor goes up) and whose marker PUT failed. Before the cleanup loop breaks the chain above
it (the next checkpoint expired alone, or deleted and its tombstone removed), it writes the
marker of such a slot below the floor when the run goes on from it, and so does an append's
pruning (another process's too) before it removes anything; otherwise the late-slot check
would hide it from every read."""

from __future__ import annotations

import anyio
import pytest

from fastcheckpoint import Checkpoint, CheckpointConfig, CheckpointManager, CheckpointMetadata
from fastcheckpoint._ids import key_of as key_of_run
from fastcheckpoint.stores.s3 import S3Store
from fastcheckpoint.testing import T0
from tests.stores._moto import moto_endpoint
from tests.stores.s3.test_s3 import DEADLINE
from tests.stores.s3.test_s3_cancel_review import _floor, _marker_fails
from tests.stores.s3.test_s3_sequence_guard import stores

__all__ = ["moto_endpoint", "stores"]

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


async def _raiser_without_marker(manager: CheckpointManager, run_id: str, kept: int,
                                 monkeypatch: pytest.MonkeyPatch,
                                 ttl_seconds: float | None = None) -> Checkpoint:
    """Checkpoints 0 to ``kept`` of ``run_id`` (``kept`` kept): the last one's pruning
    removes 0 and raises the floor over it, and its marker's PUT fails (acknowledged)."""
    for n in range(kept):
        await manager.create(run_id, {"n": n}, ttl_seconds=ttl_seconds)
    _marker_fails(monkeypatch, key_of_run(run_id), kept)
    bare = await manager.create(run_id, {"n": kept}, ttl_seconds=ttl_seconds)
    monkeypatch.undo()
    assert bare is not None
    return bare


async def _seen(manager: CheckpointManager, store: S3Store, run_id: str,
                bare: Checkpoint) -> tuple[int, list[CheckpointMetadata], Checkpoint | None]:
    """The run's floor, its checkpoints listed and ``bare`` restored by its id."""
    floor = await _floor(store, key_of_run(run_id))
    listed = await manager.list_checkpoints(run_id)
    return floor, listed, await manager.restore_from(bare.checkpoint_id)


async def test_a_floor_raising_create_outlives_the_shorter_ttl_of_the_next_one(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One process, four kept. Checkpoint 3's create prunes 0 and raises the floor to 4;
    its marker PUT fails (acknowledged all the same). 4 gets a short ttl, 5 a long one.
    The process's own cleanup loop removes the expired 4. 3 has not expired."""
    store = stores[0]
    now = [T0]
    manager = CheckpointManager(store, config=CheckpointConfig(
        clock=lambda: now[0], max_checkpoints_per_run=3))

    with anyio.fail_after(DEADLINE):
        bare = await _raiser_without_marker(manager, "own-raise", 3, monkeypatch, 1000)
        await manager.create("own-raise", {"n": 4}, ttl_seconds=10)
        last = await manager.create("own-raise", {"n": 5}, ttl_seconds=1000)
        now[0] = T0 + 20
        assert await manager.cleanup_expired() == 1  # checkpoint 4
        floor, listed, by_id = await _seen(manager, store, "own-raise", bare)

    assert bare is not None
    assert last is not None
    assert floor > 3  # the case: 3 lies below the floor
    assert [item.checkpoint_id for item in listed][:2] == [last.checkpoint_id,
                                                          bare.checkpoint_id]
    assert by_id is not None
    assert by_id.state == {"n": 3}


async def test_a_floor_raising_create_survives_the_deletion_of_the_next_one(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As above, no ttl: 5 follows 4, then 4 (not the newest) is deleted; its tombstone
    carries 3's token until the cleanup loop removes it (a tombstone below the newest)."""
    store = stores[0]
    manager = CheckpointManager(store, config=CheckpointConfig(max_checkpoints_per_run=3))

    with anyio.fail_after(DEADLINE):
        bare = await _raiser_without_marker(manager, "own-raise-del", 3, monkeypatch)
        middle = await manager.create("own-raise-del", {"n": 4})
        await manager.create("own-raise-del", {"n": 5})
        assert middle is not None
        assert await manager.delete(middle.checkpoint_id)
        await manager.cleanup_expired()
        floor, listed, by_id = await _seen(manager, store, "own-raise-del", bare)

    assert bare is not None
    assert floor > 3
    assert [item.sequence for item in listed][:2] == [5, 3]
    assert by_id is not None
    assert by_id.state == {"n": 3}


async def test_a_raise_of_the_floor_writes_no_marker_for_a_deleted_checkpoint(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Checkpoint 1 is acknowledged without its marker; another process joins the run and
    lists it without marker at or above the floor (its log holds it bare). The writer
    deletes 1 (a tombstone). The other process's next append raises the floor and first
    writes the marker it remembers for 1, from its old listing: the deleted checkpoint must
    stay deleted."""
    writer_store, other_store = stores
    writer = CheckpointManager(writer_store)
    other = CheckpointManager(other_store, config=CheckpointConfig(max_checkpoints_per_run=3))
    fresh = CheckpointManager(writer_store)
    key = key_of_run("stale")

    with anyio.fail_after(DEADLINE):
        await writer.create("stale", {"n": 0})
        _marker_fails(monkeypatch, key, 1)
        bare = await writer.create("stale", {"n": 1})
        monkeypatch.undo()
        assert bare is not None
        await other.create("stale", {"n": 2})  # joins: lists 1 without its marker
        assert await writer.delete(bare.checkpoint_id)
        await other.create("stale", {"n": 3})  # prunes 0: the floor goes to 4
        floor, listed, by_id = await _seen(fresh, other_store, "stale", bare)
        await fresh.cleanup_expired()
        await other.create("stale", {"n": 4})
        after = await fresh.list_checkpoints("stale")
        again = await fresh.restore_from(bare.checkpoint_id)

    assert floor > 1
    assert [item.sequence for item in listed] == [3, 2]
    assert [item.sequence for item in after] == [4, 3, 2]
    assert again is None
    assert by_id is None


async def test_two_kept_a_floor_raising_create_survives_its_deleted_successor(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two kept. Checkpoint 2's create prunes 0 and raises the floor to 3; its marker PUT
    fails. 3 follows and is deleted as the newest (its tombstone stays); another process
    joins and appends 4, whose pruning removes that tombstone (below the newest now). Two
    kept of 2 and 4: 2 must still read."""
    writer_store, other_store = stores
    writer = CheckpointManager(writer_store, config=CheckpointConfig(max_checkpoints_per_run=2))
    other = CheckpointManager(other_store, config=CheckpointConfig(max_checkpoints_per_run=2))

    with anyio.fail_after(DEADLINE):
        bare = await _raiser_without_marker(writer, "two", 2, monkeypatch)
        gone = await writer.create("two", {"n": 3})
        assert gone is not None
        assert await writer.delete(gone.checkpoint_id)
        await other.create("two", {"n": 4})
        await other.cleanup_expired()
        floor, listed, by_id = await _seen(other, other_store, "two", bare)

    assert bare is not None
    assert floor > 2
    assert [item.sequence for item in listed] == [4, 2]
    assert by_id is not None
    assert by_id.state == {"n": 2}


async def test_a_floor_raising_create_outlives_another_process_pruning_the_next_one(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As the first case, but another process's append, not the cleanup loop, removes the
    expired checkpoint 4 (its pruning keeps 5 and 3 beside its own 6)."""
    writer_store, other_store = stores
    now = [T0]
    config = CheckpointConfig(clock=lambda: now[0], max_checkpoints_per_run=3)
    writer = CheckpointManager(writer_store, config=config)
    other = CheckpointManager(other_store, config=config)

    with anyio.fail_after(DEADLINE):
        bare = await _raiser_without_marker(writer, "other-prunes", 3, monkeypatch, 1000)
        await writer.create("other-prunes", {"n": 4}, ttl_seconds=10)
        await writer.create("other-prunes", {"n": 5}, ttl_seconds=1000)
        now[0] = T0 + 20
        await other.create("other-prunes", {"n": 6}, ttl_seconds=1000)
        floor, listed, by_id = await _seen(other, other_store, "other-prunes", bare)

    assert floor > 3
    assert [item.sequence for item in listed] == [6, 5, 3]
    assert by_id is not None
    assert by_id.state == {"n": 3}
