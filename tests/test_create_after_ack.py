"""What a create does after the store acknowledged its checkpoint never turns it into a failure.

On a FAILED run the create then makes the run ACTIVE again (a status change, with its own
store calls). A cancellation of the caller meanwhile does not cut that change short: under
anyio's and trio's cancellations the create returns its checkpoint, asyncio's own cancellation
is raised once the change ended. A change the store refuses, or one that never ends (given up
after ``_RESUME_SECONDS``), leaves the run FAILED and the create returns its checkpoint; the
run's next create resumes it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from fastcheckpoint import CheckpointManager, CheckpointStatus, StoreUnavailableError, _manager
from fastcheckpoint.stores.memory import MemoryStore
from tests._helpers import FakeClock, make_config

pytestmark = pytest.mark.anyio

RUN = "run"


class _Store(MemoryStore):
    """A memory store whose ``update_run`` suspends (a subclass does not inherit
    ``never_suspends``), counted; it can cancel a scope or a task first, fail, or never end."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.cancel: anyio.CancelScope | asyncio.Task[Any] | None = None
        self.hang = False
        self.fail = False

    async def update_run(self, *args: Any, **kwargs: Any) -> Any:
        self.calls["update_run"] += 1
        cancel, self.cancel = self.cancel, None
        if cancel is not None:
            cancel.cancel()
        await anyio.lowlevel.checkpoint()  # where a cancellation of the caller arrives
        if self.hang:
            await anyio.sleep_forever()
        if self.fail:
            raise StoreUnavailableError("the store is away")
        return await super().update_run(*args, **kwargs)


async def _failed_run(store: _Store) -> CheckpointManager:
    manager = CheckpointManager(store, make_config(FakeClock()))
    assert await manager.create(RUN, {"step": 0}) is not None
    assert await manager.mark_failed(RUN, "boom") is not None
    store.calls.clear()
    return manager


async def _status(manager: CheckpointManager) -> CheckpointStatus:
    run = await manager.get_run(RUN)
    assert run is not None
    return run.status


async def test_a_create_cancelled_while_it_resumes_a_failed_run_returns_its_checkpoint() -> None:
    """anyio's and trio's cancellations wait for the status change: the create returns the
    stored checkpoint, the run is ACTIVE, and the caller's next checkpoint raises."""
    with anyio.fail_after(5):
        store = _Store()
        manager = await _failed_run(store)
        created = None
        with anyio.CancelScope() as scope:
            store.cancel = scope
            created = await manager.create(RUN, {"step": 1})
            await anyio.lowlevel.checkpoint()
        assert scope.cancelled_caught
        assert created is not None
        assert created.metadata.sequence == 1
        assert created.metadata.status is CheckpointStatus.ACTIVE
        assert store.calls["update_run"] == 1
        run = await manager.get_run(RUN)
        assert run is not None
        assert run.status is CheckpointStatus.ACTIVE
        assert run.history[-1].note == f"resumed: checkpoint {created.checkpoint_id} created"
        restored = await manager.restore(RUN)
        assert restored is not None
        assert restored.checkpoint_id == created.checkpoint_id


async def test_asyncio_cancelling_a_create_while_it_resumes_a_failed_run_resumes_it(
    anyio_backend: str,
) -> None:
    """asyncio's own cancellation cannot be held back: it is raised once the status change
    ended; the checkpoint is stored and the run is ACTIVE."""
    if anyio_backend != "asyncio":
        pytest.skip("asyncio's own cancellation")
    with anyio.fail_after(5):
        store = _Store()
        manager = await _failed_run(store)
        task = asyncio.ensure_future(manager.create(RUN, {"step": 1}))
        store.cancel = task
        with pytest.raises(asyncio.CancelledError):
            await task
        assert store.calls["update_run"] == 1
        assert await _status(manager) is CheckpointStatus.ACTIVE
        restored = await manager.restore(RUN)
        assert restored is not None
        assert restored.metadata.sequence == 1
        assert restored.state == {"step": 1}


async def test_a_status_change_that_never_ends_is_given_up(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """After ``_RESUME_SECONDS`` the create returns its checkpoint, the run FAILED as far
    as it knows, the id logged; the run's next create resumes it."""
    monkeypatch.setattr(_manager, "_RESUME_SECONDS", 0.01, raising=False)
    with anyio.fail_after(2):
        store = _Store()
        manager = await _failed_run(store)
        store.hang = True
        with caplog.at_level(logging.WARNING, logger="fastcheckpoint"):
            created = await manager.create(RUN, {"step": 1})
        assert created is not None
        assert created.metadata.status is CheckpointStatus.FAILED
        assert created.checkpoint_id in caplog.text
        assert await _status(manager) is CheckpointStatus.FAILED
        store.hang = False
        again = await manager.create(RUN, {"step": 2})
        assert again is not None
        assert again.metadata.status is CheckpointStatus.ACTIVE
        assert store.calls["update_run"] == 2
        assert await _status(manager) is CheckpointStatus.ACTIVE


async def test_a_status_change_the_store_refuses_returns_the_checkpoint(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A CheckpointError from the status change does not hide the stored checkpoint: the
    create returns it (status FAILED), the failure is logged with its id, and the run's next
    create resumes the run."""
    with anyio.fail_after(5):
        store = _Store()
        manager = await _failed_run(store)
        store.fail = True
        with caplog.at_level(logging.WARNING, logger="fastcheckpoint"):
            created = await manager.create(RUN, {"step": 1})
        assert created is not None
        assert created.metadata.sequence == 1
        assert created.metadata.status is CheckpointStatus.FAILED
        assert created.checkpoint_id in caplog.text
        assert "could not be made active again" in caplog.text
        restored = await manager.restore(RUN)
        assert restored is not None
        assert restored.checkpoint_id == created.checkpoint_id
        store.fail = False
        again = await manager.create(RUN, {"step": 2})
        assert again is not None
        assert again.metadata.sequence == 2
        assert again.metadata.status is CheckpointStatus.ACTIVE
