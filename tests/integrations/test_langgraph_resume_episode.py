"""A save on a FAILED thread resumes the failure its append saw, never a later one.

The saver's save appends, then makes a FAILED, PAUSED or REJECTED thread ACTIVE again. Should
other workers have resumed the thread and failed it again in between (another save, then
``mark_failed``), or failed a thread the append saw PAUSED, that failure was made after the
append: the thread stays FAILED with its error. A save nobody overtakes still resumes the
thread, at the cost it always had (its append, one run read, one status change).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from fastcheckpoint import CheckpointStatus, MemoryStore, StoreError
from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
from tests._helpers import FakeClock, make_config
from tests.integrations._langgraph_support import CountingStore, put

pytestmark = pytest.mark.anyio

THREAD = "resume-episode"
ACTIVE, FAILED, PAUSED = CheckpointStatus.ACTIVE, CheckpointStatus.FAILED, CheckpointStatus.PAUSED


class _Interleaved(CountingStore):
    """Runs ``between`` once, right after the append of the save under test, before its
    status change: as another worker would."""

    def __init__(self, inner: Any, between: Callable[[], Awaitable[None]] | None) -> None:
        super().__init__(inner)
        self.between = between

    async def append_with_items(self, *args: Any, **kwargs: Any) -> Any:
        self.calls["append_with_items"] += 1
        status = await self.inner.append_with_items(*args, **kwargs)
        if self.between is not None:
            between, self.between = self.between, None
            await between()
        return status


def _saver(store: Any, clock: FakeClock) -> FastCheckpointSaver:
    return FastCheckpointSaver(store, config=make_config(clock))


async def test_a_late_resume_leaves_a_failure_made_after_its_append() -> None:
    clock, inner = FakeClock(), MemoryStore()
    other = _saver(inner, clock)  # workers B and C
    first: list[str] = []
    by_b: list[str] = []

    async def resume_and_fail_again() -> None:
        by_b.append(await put(other, THREAD, parent=first[0], values={"by": "B"},
                              versions={"by": 1}))
        resumed = await other.manager.get_run(THREAD)
        assert resumed is not None
        assert resumed.status is ACTIVE
        await other.manager.mark_failed(THREAD, error="E2")

    with anyio.fail_after(5):
        first.append(await put(other, THREAD, values={"step": 0}, versions={"step": 1}))
        await other.manager.mark_failed(THREAD, error="E1")
        late = _saver(_Interleaved(inner, resume_and_fail_again), clock)
        await put(late, THREAD, parent=first[0], values={"by": "A"}, versions={"by": 1})
        run = await other.manager.get_run(THREAD)

    assert len(by_b) == 1  # the other workers did act in between
    assert run is not None
    assert run.latest_sequence == 2  # A's checkpoint at 1, B's at 2
    assert run.status is FAILED
    assert run.error == "E2"
    assert [change.status for change in run.history] == [FAILED, ACTIVE, FAILED]
    assert [change.note for change in run.history][::2] == ["E1", "E2"]


async def test_a_save_that_saw_the_thread_paused_leaves_a_later_failure() -> None:
    clock, inner = FakeClock(), MemoryStore()
    other = _saver(inner, clock)

    async def fail() -> None:
        await other.manager.mark_failed(THREAD, error="E2")

    with anyio.fail_after(5):
        first = await put(other, THREAD, values={"step": 0}, versions={"step": 1})
        await other.manager.pause(THREAD, {"question": "go on?"})
        late = _saver(_Interleaved(inner, fail), clock)
        await put(late, THREAD, parent=first, values={"step": 1}, versions={"step": 2})
        run = await other.manager.get_run(THREAD)

    assert run is not None
    assert run.status is FAILED
    assert run.error == "E2"
    assert [change.status for change in run.history] == [PAUSED, FAILED]


async def test_a_save_nobody_overtakes_resumes_the_failed_thread_at_its_usual_cost() -> None:
    clock = FakeClock()
    store = _Interleaved(MemoryStore(), None)
    saver = _saver(store, clock)
    with anyio.fail_after(5):
        first = await put(saver, THREAD, values={"step": 0}, versions={"step": 1})
        await saver.manager.mark_failed(THREAD, error="E1")
        store.take()
        second = await put(saver, THREAD, parent=first, values={"step": 1},
                           versions={"step": 2})
        calls = store.take()
        run = await saver.manager.get_run(THREAD)

    assert run is not None
    assert run.status is ACTIVE
    assert run.error is None
    assert [change.status for change in run.history] == [FAILED, ACTIVE]
    assert run.history[-1].note == f"resumed: LangGraph checkpoint {second} saved after failed"
    assert calls == {"append_with_items": 1, "get_run": 1, "update_run": 1}


class _NoStatusChange(CountingStore):
    """A worker whose store refuses status changes: its saves append and leave a FAILED thread
    FAILED (the saver logs the status change it could not make)."""

    async def update_run(self, *args: Any, **kwargs: Any) -> Any:
        raise StoreError("status changes are down")


async def test_checkpoints_appended_meanwhile_do_not_stop_the_resume() -> None:
    """Another save appending (without resuming) after this save's append leaves the failure
    as it was: this save still resumes it."""
    clock, inner = FakeClock(), MemoryStore()
    other = _saver(inner, clock)
    appender = _saver(_NoStatusChange(inner), clock)
    first: list[str] = []

    async def append_only() -> None:
        await put(appender, THREAD, parent=first[0], values={"by": "B"}, versions={"by": 1})
        still = await other.manager.get_run(THREAD)
        assert still is not None
        assert still.status is FAILED

    store = _Interleaved(inner, append_only)
    with anyio.fail_after(5):
        first.append(await put(other, THREAD, values={"step": 0}, versions={"step": 1}))
        await other.manager.mark_failed(THREAD, error="E1")
        await put(_saver(store, clock), THREAD, parent=first[0], values={"by": "A"},
                  versions={"by": 1})
        run = await other.manager.get_run(THREAD)

    assert store.between is None
    assert run is not None
    assert run.latest_sequence == 2
    assert run.status is ACTIVE
    assert run.error is None
    assert [change.status for change in run.history] == [FAILED, ACTIVE]
