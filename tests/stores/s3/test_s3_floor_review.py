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
from fastcheckpoint.stores.s3 import S3Store
from fastcheckpoint.testing import T0, make_item, make_run
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

