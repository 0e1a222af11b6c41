"""The run state machine: every status change from every status, as docs/concepts.md states it.

Each case brings a run to a status the way a user would, applies one call, and checks the
status afterwards, the history entry it left (or that it left none), and that the run's
checkpoints were never touched by a status change.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import pytest

from fastcheckpoint import (
    CheckpointManager,
    CheckpointStatus,
    CheckpointStore,
    ConflictError,
    RunInfo,
)
from tests._helpers import STORE_KINDS, FakeClock, make_config, make_store

pytestmark = pytest.mark.anyio

RUN = "state-machine"
ACTIVE, PAUSED, COMPLETED, FAILED, REJECTED = (
    CheckpointStatus.ACTIVE,
    CheckpointStatus.PAUSED,
    CheckpointStatus.COMPLETED,
    CheckpointStatus.FAILED,
    CheckpointStatus.REJECTED,
)
REFUSED = "refused"
SAME = "unchanged"

# status before -> call -> status after, REFUSED (ConflictError, nothing changes) or SAME (the
# run is returned unchanged: a retried final call).
TRANSITIONS: dict[CheckpointStatus, dict[str, CheckpointStatus | str]] = {
    ACTIVE: {"create": ACTIVE, "mark_completed": COMPLETED, "mark_failed": FAILED,
             "pause": PAUSED, "approve": REFUSED, "reject": REFUSED},
    PAUSED: {"create": PAUSED, "mark_completed": COMPLETED, "mark_failed": FAILED,
             "pause": REFUSED, "approve": ACTIVE, "reject": REJECTED},
    COMPLETED: {"create": COMPLETED, "mark_completed": SAME, "mark_failed": REFUSED,
                "pause": REFUSED, "approve": REFUSED, "reject": REFUSED},
    FAILED: {"create": ACTIVE, "mark_completed": REFUSED, "mark_failed": SAME,
             "pause": REFUSED, "approve": REFUSED, "reject": REFUSED},
    REJECTED: {"create": REJECTED, "mark_completed": REFUSED, "mark_failed": REFUSED,
               "pause": REFUSED, "approve": REFUSED, "reject": SAME},
}

CASES = [
    pytest.param(before, call, after, id=f"{before.value}-{call}")
    for before, calls in TRANSITIONS.items()
    for call, after in calls.items()
]


@pytest.fixture(params=STORE_KINDS)
async def manager(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[
    CheckpointManager
]:
    store: CheckpointStore = make_store(request.param, tmp_path / "store")
    yield CheckpointManager(store, config=make_config(FakeClock()))
    with anyio.fail_after(10):
        await store.aclose()


async def bring_to(manager: CheckpointManager, status: CheckpointStatus) -> None:
    await manager.create(RUN, {"step": 0})
    if status is PAUSED or status is REJECTED:
        await manager.pause(RUN, request={"action": "refund"})
    if status is REJECTED:
        await manager.reject(RUN, approver="ana", reason="no")
    if status is COMPLETED:
        await manager.mark_completed(RUN)
    if status is FAILED:
        await manager.mark_failed(RUN, "tool crashed")


def call_of(manager: CheckpointManager, name: str) -> Callable[[], Awaitable[object]]:
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "create": lambda: manager.create(RUN, {"step": 1}),
        "mark_completed": lambda: manager.mark_completed(RUN),
        "mark_failed": lambda: manager.mark_failed(RUN, "again"),
        "pause": lambda: manager.pause(RUN, request={"action": "again"}),
        "approve": lambda: manager.approve(RUN, approver="bo", comment="ok"),
        "reject": lambda: manager.reject(RUN, approver="bo", reason="no"),
    }
    return calls[name]


async def run_of(manager: CheckpointManager) -> RunInfo:
    run = await manager.get_run(RUN)
    assert run is not None
    return run


@pytest.mark.parametrize(("before", "call", "after"), CASES)
async def test_every_edge_of_the_run_state_machine(
    manager: CheckpointManager, before: CheckpointStatus, call: str,
    after: CheckpointStatus | str,
) -> None:
    with anyio.fail_after(10):
        await bring_to(manager, before)
        start = await run_of(manager)
        assert start.status is before
        if after == REFUSED:
            with pytest.raises(ConflictError, match=before.value):
                await call_of(manager, call)()
        else:
            await call_of(manager, call)()
        end = await run_of(manager)
        latest = await manager.restore(RUN)

    expected = before if after in (REFUSED, SAME) else after
    assert end.status is expected
    assert latest is not None
    assert latest.metadata.status is expected
    if expected is before:
        assert end.history == start.history
    else:
        assert end.history[:-1] == start.history
        assert end.history[-1].status is expected
    written = 2 if call == "create" else 1
    assert end.latest_sequence == written - 1
    assert end.checkpoint_count == written


async def test_create_resumes_a_failed_run_and_records_it(manager: CheckpointManager) -> None:
    with anyio.fail_after(10):
        await bring_to(manager, FAILED)
        resumed = await manager.create(RUN, {"step": 1})
        run = await run_of(manager)

    assert resumed is not None
    assert resumed.metadata.status is ACTIVE
    assert run.status is ACTIVE
    assert run.error is None
    assert [change.status for change in run.history] == [FAILED, ACTIVE]
    assert run.history[0].note == "tool crashed"
    assert run.history[1].note == f"resumed: checkpoint {resumed.checkpoint_id} created"


async def test_fastagentic_retry_pattern_fails_then_completes(manager: CheckpointManager) -> None:
    # FastAgentic's "Integration with Agent Runs": the first attempt fails; the retry restores,
    # continues from the last checkpoint and completes the run.
    async def attempt(fail: bool) -> None:
        checkpoint = await manager.restore(RUN)
        first = checkpoint.state["step"] + 1 if checkpoint else 0
        for step in range(first, first + 2):
            await manager.create(RUN, {"step": step}, step_name=f"step-{step}")
            if fail and step == 1:
                await manager.mark_failed(RUN, "tool crashed")
                return
        await manager.mark_completed(RUN)

    with anyio.fail_after(10):
        await attempt(fail=True)
        await attempt(fail=False)
        run = await run_of(manager)
        latest = await manager.restore(RUN)

    assert run.status is COMPLETED
    assert [change.status for change in run.history] == [FAILED, ACTIVE, COMPLETED]
    assert latest is not None
    assert latest.state == {"step": 3}
    assert latest.metadata.status is COMPLETED


async def test_concurrent_creates_on_a_failed_run_resume_it_once(
    manager: CheckpointManager,
) -> None:
    other = CheckpointManager(manager.store, config=manager.config)
    created: list[object] = []

    async def create(by: CheckpointManager, step: int) -> None:
        created.append(await by.create(RUN, {"step": step}))

    with anyio.fail_after(10):
        await bring_to(manager, FAILED)
        async with anyio.create_task_group() as group:
            group.start_soon(create, manager, 1)
            group.start_soon(create, other, 2)
        run = await run_of(manager)
        listed = await manager.list_checkpoints(RUN)

    assert all(checkpoint is not None for checkpoint in created)
    assert [metadata.sequence for metadata in listed] == [2, 1, 0]
    assert run.status is ACTIVE
    assert [change.status for change in run.history] == [FAILED, ACTIVE]


@pytest.mark.parametrize(("before", "call", "message"), [
    (ACTIVE, "approve", f"run {RUN!r} is not awaiting approval (it is active)"),
    (PAUSED, "pause", f"run {RUN!r} cannot be paused: it is paused, and only an active run"),
    (FAILED, "mark_completed", f"run {RUN!r} is failed; it cannot become completed"),
])
async def test_a_refusal_says_which_run_and_why(
    manager: CheckpointManager, before: CheckpointStatus, call: str, message: str
) -> None:
    with anyio.fail_after(10):
        await bring_to(manager, before)
        with pytest.raises(ConflictError) as refused:
            await call_of(manager, call)()

    assert str(refused.value).startswith(message)
