"""S3 store: a floor above the run's newest slot (the cleanup loop raised it past a newest
slot whose create then failed and took it back). Whatever the run looks like then, no
create is refused for good, and the sequence a process that does not know the run died
may append at is the one a seal claims."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from fastcheckpoint import CheckpointConfig, CheckpointManager
from fastcheckpoint.errors import StoreUnavailableError
from fastcheckpoint.stores import _s3_io
from fastcheckpoint.stores import _s3_layout as layout
from fastcheckpoint.stores.s3 import S3Store
from fastcheckpoint.testing import T0, key_of, make_item, make_run
from fastcheckpoint.testing._adapter import _append_items
from tests.stores._moto import moto_endpoint
from tests.stores.s3.test_s3 import DEADLINE
from tests.stores.s3.test_s3_killed_append import anyio_backend, stores

__all__ = ["anyio_backend", "moto_endpoint", "stores"]

pytestmark = pytest.mark.anyio


async def _floor_past_a_taken_back_head(
    writer: S3Store, cleaner: S3Store, run: Any, monkeypatch: pytest.MonkeyPatch, *,
    first_expires_at: float | None,
) -> None:
    """Checkpoint 0 (expiring at ``first_expires_at``), 1 (expiring at T0 + 5), then a
    create of 2 owning items during which the cleanup loop removes 1 and raises the floor
    to 3, and whose items then fail: its slot is taken back."""
    await _append_items(writer, run, 0, refs=[], items=[], expires_at=first_expires_at)
    await _append_items(writer, run, 1, refs=[], items=[], expires_at=T0 + 5)

    async def cleaned_then_failed(*args: Any, **kwargs: Any) -> Any:
        await cleaner.purge_expired(now=T0 + 10, limit=100)
        raise StoreUnavailableError("the items could not be written")

    monkeypatch.setattr(writer, "_put_owned", cleaned_then_failed)
    with pytest.raises(StoreUnavailableError):
        await _append_items(writer, run, 2, refs=[], items=[make_item("o/2", owner=2)])
    monkeypatch.undo()


async def test_a_run_left_without_slots_above_a_raised_floor_takes_creates(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Checkpoint 0 expired too, so the cleanup removed it outright (the pending slot 2 was
    the newest): the run object is left with no slot at all and a floor of 3. It is no run
    being created (that has never had a slot): a create starts the run over."""
    writer, other = stores
    run = make_run("floor-no-slots")
    with anyio.fail_after(DEADLINE):
        await _floor_past_a_taken_back_head(writer, other, run, monkeypatch,
                                            first_expires_at=T0 + 5)
        manager = CheckpointManager(other, CheckpointConfig(clock=lambda: T0 + 10))
        created = await manager.create(run.run_id, {"n": 3})
        restored = await manager.restore(run.run_id)

    assert restored is not None
    assert restored.checkpoint_id == created.checkpoint_id


async def test_a_seal_claims_the_sequence_an_append_above_the_newest_takes(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The run lives on checkpoint 0 under a floor of 3, so a create takes sequence 3. The
    cleanup loop, by a clock at which 0 has expired, lists the run dead before that slot
    lands, seals it and purges it; the create's check reads the run object before the
    purge removes it. The seal must take the sequence the create takes, so that one of the
    two is refused: never a create acknowledged into a run purged under it."""
    writer, cleaner = stores
    run = make_run("floor-seal")
    purging = anyio.Event()
    checked = anyio.Event()
    purged = anyio.Event()
    with anyio.fail_after(DEADLINE):
        await _floor_past_a_taken_back_head(writer, cleaner, run, monkeypatch,
                                            first_expires_at=T0 + 50)
        cleaner_client = await cleaner.client()
        delete_if = _s3_io.Bucket.delete_if

        async def held_delete_if(bucket: Any, key: str, *args: Any, **kwargs: Any) -> Any:
            if bucket.client is cleaner_client and key == layout.run_object(key_of(run)):
                purging.set()
                await checked.wait()  # the run object goes only once the create checked it
            return await delete_if(bucket, key, *args, **kwargs)

        async def purge() -> None:
            await cleaner.purge_expired(now=T0 + 100, limit=100)
            purged.set()

        commit, confirm = writer._commit, writer._confirm

        async def commit_while_purging(io: Any, run_key: str, slot: Any) -> Any:
            if slot.sequence == 3 and not purging.is_set():
                tasks.start_soon(purge)
                await purging.wait()  # listed dead and sealed, not removed yet
            written = await commit(io, run_key, slot)
            if written[0] is None:
                checked.set()  # refused: no check to wait for
            return written

        async def confirm_then_purged(*args: Any, **kwargs: Any) -> Any:
            checked.set()
            await purged.wait()
            return await confirm(*args, **kwargs)

        monkeypatch.setattr(_s3_io.Bucket, "delete_if", held_delete_if)
        monkeypatch.setattr(writer, "_commit", commit_while_purging)
        monkeypatch.setattr(writer, "_confirm", confirm_then_purged)
        manager = CheckpointManager(writer, CheckpointConfig(clock=lambda: T0 + 20))
        async with anyio.create_task_group() as tasks:
            created = await manager.create(run.run_id, {"n": 3})
        monkeypatch.undo()
        reader = CheckpointManager(cleaner, CheckpointConfig(clock=lambda: T0 + 20))
        found = await reader.restore_from(created.checkpoint_id)

    assert found is not None
    assert found.state == {"n": 3}


async def test_a_newest_create_taken_back_after_the_cleanup_raised_the_floor_past_it(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Checkpoint 0 stays: the run's newest is now below the floor. The next create goes to
    the floor (the keys below it may have been freed), never round a loop of refusals."""
    writer, other = stores
    run = make_run("floor-past-head")
    with anyio.fail_after(DEADLINE):
        await _floor_past_a_taken_back_head(writer, other, run, monkeypatch,
                                            first_expires_at=None)
        manager = CheckpointManager(other, CheckpointConfig(clock=lambda: T0 + 10))
        created = await manager.create(run.run_id, {"n": 3})
        restored = await manager.restore(run.run_id)

    assert created.metadata.sequence >= 2
    assert restored is not None
    assert restored.checkpoint_id == created.checkpoint_id
