"""A failure on the stores whose appends read the run's status in their own atomic step (no
server needed here): the manager does not guard it (only stores that check the status apart,
S3, need that; ``test_s3_sequence_guard.py`` covers them). A checkpoint landing between the
failure's read and its write leaves the failure for a later create to resume, a failure sent
again after its reply was lost is recorded once, and a run that another worker appends to
between every read and write of the failure still fails at once."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from fastcheckpoint import CheckpointManager, CheckpointStatus, StoreError, _ids
from fastcheckpoint.stores import CheckpointStore
from tests._helpers import FakeClock, make_config
from tests.test_resume_episode import inner

__all__ = ["inner"]

pytestmark = pytest.mark.anyio

RUN = "failure-guard"


@pytest.fixture
def store(inner: CheckpointStore) -> CheckpointStore:
    return inner


def _before_updates(monkeypatch: pytest.MonkeyPatch, store: Any, act: Any, times: int) -> None:
    """``act()`` right before each of the next ``times`` status changes reach the store."""
    update_run = store.update_run
    left = [times]

    async def update(*args: Any, **kwargs: Any) -> Any:
        if left[0] > 0:
            left[0] -= 1
            await act()
        return await update_run(*args, **kwargs)

    monkeypatch.setattr(store, "update_run", update)


async def _failed_after(manager: CheckpointManager) -> int | None:
    record = await manager._read_run(_key(), None)
    assert record is not None
    return manager._codec.decode_run_data(record.data, RUN).failed_after


def _key() -> str:
    return _ids.key_of(RUN)


async def test_a_checkpoint_landing_before_the_failure_is_written_leaves_it_to_resume(
    store: CheckpointStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()
    manager = CheckpointManager(store, make_config(clock))
    other = CheckpointManager(store, make_config(clock))
    with anyio.fail_after(10):
        await manager.create(RUN, {"n": 0})

        async def create() -> None:
            await other.create(RUN, {"n": 1})

        _before_updates(monkeypatch, store, create, 1)
        failed = await manager.mark_failed(RUN, "it broke")
        assert failed is not None
        assert failed.status is CheckpointStatus.FAILED
        # A create after the failure resumes it (its append saw it).
        resumed = await other.create(RUN, {"n": 2})
    assert resumed.metadata.status is CheckpointStatus.ACTIVE


async def test_a_failure_sent_again_after_its_reply_was_lost_is_recorded_once(
    store: CheckpointStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()
    manager = CheckpointManager(store, make_config(clock))
    with anyio.fail_after(10):
        await manager.create(RUN, {"n": 0})
        update_run = store.update_run

        async def applied_reply_lost(*args: Any, **kwargs: Any) -> Any:
            await update_run(*args, **kwargs)
            raise StoreError("the reply was lost")

        monkeypatch.setattr(store, "update_run", applied_reply_lost)
        with pytest.raises(StoreError):
            await manager.mark_failed(RUN, "it broke")
        monkeypatch.undo()
        again = await manager.mark_failed(RUN, "it broke")
    assert again is not None
    assert again.status is CheckpointStatus.FAILED
    assert [change.status for change in again.history].count(CheckpointStatus.FAILED) == 1
    assert await _failed_after(manager) == 0


async def test_a_failure_against_an_append_before_every_write_is_recorded(
    store: CheckpointStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()
    manager = CheckpointManager(store, make_config(clock, max_sequence_retries=4))
    other = CheckpointManager(store, make_config(clock))
    with anyio.fail_after(10):
        await manager.create(RUN, {"n": 0})

        async def create() -> None:
            await other.create(RUN, {"n": "meanwhile"})

        _before_updates(monkeypatch, store, create, 4)
        failed = await manager.mark_failed(RUN, "it broke")
    assert failed is not None
    assert failed.status is CheckpointStatus.FAILED
