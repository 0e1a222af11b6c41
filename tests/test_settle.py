"""Changes awaited to their end: a cancellation that arrives while one runs (asyncio's own,
anyio's, trio's) is raised once it has ended, never in between; results and errors pass
through when nothing cancels."""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from fastcheckpoint._settle import settled

pytestmark = pytest.mark.anyio


class _Change:
    """Two steps with a wait between them, recording how far it got."""

    def __init__(self) -> None:
        self.steps: list[str] = []
        self.between = anyio.Event()
        self.go_on = anyio.Event()

    async def run(self) -> str:
        self.steps.append("first")
        self.between.set()
        await self.go_on.wait()
        await anyio.lowlevel.checkpoint()
        self.steps.append("second")
        return "done"


async def test_what_the_change_returns_or_raises_passes_through() -> None:
    async def fails() -> None:
        raise KeyError("the change's own")

    async def returns() -> int:
        await anyio.lowlevel.checkpoint()
        return 7

    assert await settled(returns()) == 7
    with pytest.raises(KeyError, match="the change's own"):
        await settled(fails())


async def test_an_anyio_cancellation_is_raised_once_the_change_has_ended() -> None:
    change = _Change()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            scope = anyio.CancelScope()

            async def caller() -> None:
                with scope:
                    await settled(change.run())

            group.start_soon(caller)
            await change.between.wait()
            scope.cancel()
            await anyio.sleep(0.01)
            assert change.steps == ["first"]  # still running, not cut short
            change.go_on.set()
    assert change.steps == ["first", "second"]
    assert scope.cancelled_caught


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("how", ["task.cancel", "wait_for", "twice"])
async def test_asyncios_own_cancellations_wait_for_the_change(anyio_backend: str, how: str) -> None:
    change = _Change()
    with anyio.fail_after(10):
        if how == "wait_for":
            waiting = asyncio.ensure_future(asyncio.wait_for(settled(change.run()), 0.001))
        else:
            waiting = asyncio.ensure_future(settled(change.run()))
            await change.between.wait()
            waiting.cancel()
            await asyncio.sleep(0.01)
            if how == "twice":
                waiting.cancel()  # a second cancellation is absorbed too
        await change.between.wait()
        await asyncio.sleep(0.01)
        assert change.steps == ["first"]
        assert not waiting.done()
        change.go_on.set()
        with pytest.raises((asyncio.CancelledError, TimeoutError)):
            await waiting
    assert change.steps == ["first", "second"]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_change_that_fails_while_its_caller_is_cancelled_is_logged(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The caller gets its cancellation; the change's own error is not lost without a
    word (nor left for asyncio's "exception was never retrieved")."""
    release = anyio.Event()

    async def fails() -> None:
        await release.wait()
        raise KeyError("the change's own")

    with anyio.fail_after(10), anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:

            async def caller() -> None:
                await settled(fails())

            group.start_soon(caller)
            await anyio.sleep(0.01)
            scope.cancel()
            release.set()
    assert scope.cancelled_caught
    assert "failed while its caller was being cancelled" in caplog.text
    assert "the change's own" in caplog.text


# -- instant changes: calls to a store whose calls never suspend ------------------------------


async def test_an_instant_change_runs_at_once_in_the_callers_task() -> None:
    """No task of its own and no turn of the event loop: what was scheduled before it has
    not run when it returns."""
    ran: list[str] = []
    caller = anyio.get_current_task()

    async def change() -> str:
        ran.append("change")
        assert anyio.get_current_task() == caller
        return "done"

    async def other() -> None:
        ran.append("other")

    async with anyio.create_task_group() as group:
        group.start_soon(other)
        assert await settled(change(), instant=True) == "done"
        assert ran == ["change"]
    assert ran == ["change", "other"]

    async def fails() -> None:
        raise KeyError("the change's own")

    with pytest.raises(KeyError, match="the change's own"):
        await settled(fails(), instant=True)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_instant_change_that_suspends_is_awaited_from_there(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A store that claims wrongly that its calls never suspend: the change still ends with
    its result, with a warning, and a cancellation reaches it as it reaches any await."""
    steps: list[str] = []

    async def suspends(release: asyncio.Event) -> str:
        steps.append("first")
        try:
            await release.wait()
        except asyncio.CancelledError:
            steps.append("cancelled")
            raise
        steps.append("second")
        return "done"

    release = asyncio.Event()
    waiting = asyncio.ensure_future(settled(suspends(release), instant=True))
    await asyncio.sleep(0.01)
    assert steps == ["first"]
    release.set()
    assert await asyncio.wait_for(waiting, 10) == "done"
    assert steps == ["first", "second"]
    assert "expected to complete at once suspended" in caplog.text

    steps.clear()
    waiting = asyncio.ensure_future(settled(suspends(asyncio.Event()), instant=True))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, 10)
    assert steps == ["first", "cancelled"]


async def test_instant_applies_to_coroutines_only() -> None:
    """Any other awaitable is awaited the usual way, shielded."""

    class Later:
        def __await__(self) -> Generator[Any, None, int]:
            yield from anyio.lowlevel.checkpoint().__await__()
            return 3

    assert await settled(Later(), instant=True) == 3
