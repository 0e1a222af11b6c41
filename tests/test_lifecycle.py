"""The cleanup loop: started by start()/async with, structured, logs and keeps going.

Runs on asyncio and trio against both bundled stores. The loop runs every 10 ms; tests wait for
its effect by polling under a deadline, and expiry comes from moving a fake clock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import pytest

from fastcheckpoint import (
    CheckpointManager,
    CheckpointStore,
    ConfigurationError,
    StoreError,
)
from tests._helpers import STORE_KINDS, FakeClock, ForwardingStore, make_config, make_store

pytestmark = pytest.mark.anyio

RUN = "run-1"
FAST_LOOP = 0.01


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[CheckpointStore]:
    store = make_store(request.param, tmp_path / "store")
    yield store
    with anyio.fail_after(10):
        await store.aclose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class CountingStore(ForwardingStore):
    """Counts cleanup passes; the first ``failures`` of them raise, the rest forward."""

    def __init__(self, inner: CheckpointStore, failures: int = 0) -> None:
        super().__init__(inner)
        self.failures = failures
        self.purges = 0
        self.closed = False

    async def purge_expired(self, *, now: float, limit: int) -> tuple[int, bool]:
        self.purges += 1
        if self.purges <= self.failures:
            if self.purges % 2:
                raise StoreError(f"backend unavailable (pass {self.purges})")
            raise RuntimeError(f"unexpected bug (pass {self.purges})")
        return await super().purge_expired(now=now, limit=limit)

    async def aclose(self) -> None:
        self.closed = True
        await super().aclose()


async def wait_until(predicate: Callable[[], Awaitable[bool]]) -> None:
    """Poll until ``predicate`` holds; the caller's deadline bounds the wait."""
    # Polling on purpose: the condition is the store's state, which nothing signals.
    while not await predicate():  # noqa: ASYNC110
        await anyio.sleep(0.005)


def task_ids() -> set[int]:
    return {task.id for task in anyio.get_running_tasks()}


async def held_sequences(manager: CheckpointManager, run_id: str = RUN) -> list[int]:
    """Sequences the store still physically holds, expired or not."""
    listed = await manager.list_checkpoints(run_id, include_expired=True)
    return [metadata.sequence for metadata in listed]


async def test_async_with_runs_the_cleanup_loop_which_removes_expired_checkpoints(
    store: CheckpointStore, clock: FakeClock
) -> None:
    manager = CheckpointManager(store, config=make_config(clock, cleanup_interval=FAST_LOOP))
    with anyio.fail_after(10):
        await manager.create(RUN, {"i": 0})
        await manager.create(RUN, {"i": 1}, ttl_seconds=5)
        await manager.create(RUN, {"i": 2}, ttl_seconds=5)
        await manager.create("gone", {"i": 0}, ttl_seconds=5)
        clock.advance(5)  # everything with a TTL is already past expiry
        assert await held_sequences(manager) == [2, 1, 0]

        async with manager:

            async def cleaned() -> bool:
                return await held_sequences(manager) == [0] and not await held_sequences(
                    manager, "gone"
                )

            await wait_until(cleaned)

        restored = await manager.restore(RUN)

    assert restored is not None
    assert restored.state == {"i": 0}


async def test_start_and_stop_run_the_loop_and_stop_leaves_no_task_running(
    store: CheckpointStore, clock: FakeClock
) -> None:
    counting = CountingStore(store)
    manager = CheckpointManager(counting, config=make_config(clock, cleanup_interval=FAST_LOOP))
    with anyio.fail_after(10):
        before = task_ids()
        await manager.start()
        assert len(task_ids() - before) >= 1

        async def looped_twice() -> bool:
            return counting.purges >= 2

        await wait_until(looped_twice)
        await manager.stop()
        after = task_ids()
        passes = counting.purges
        await anyio.sleep(FAST_LOOP * 5)  # a live loop would run about five more passes

    assert after == before
    assert counting.purges == passes
    assert counting.closed is False  # stop() ends the loop, it does not close the store


async def test_cleanup_loop_logs_each_failure_and_keeps_going(
    store: CheckpointStore, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    failing = CountingStore(store, failures=2)
    manager = CheckpointManager(failing, config=make_config(clock, cleanup_interval=FAST_LOOP))
    caplog.set_level(logging.INFO, logger="fastcheckpoint")
    with anyio.fail_after(10):
        await manager.create(RUN, {"i": 0}, ttl_seconds=5)
        await manager.create(RUN, {"i": 1})
        clock.advance(5)

        async with manager:

            async def recovered() -> bool:
                return failing.purges >= 3 and await held_sequences(manager) == [1]

            await wait_until(recovered)

    failures = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(failures) == 2
    assert all(record.name.startswith("fastcheckpoint") for record in failures)
    assert all(record.exc_info is not None for record in failures)
    raised = [type(record.exc_info[1]) for record in failures if record.exc_info]
    assert raised == [StoreError, RuntimeError]


class RefusingStore(ForwardingStore):
    """Cleanup passes refused as a store that cannot run here refuses them: the first
    ``same`` with one reason, then one with another, then the inner store's."""

    def __init__(self, inner: CheckpointStore, same: int) -> None:
        super().__init__(inner)
        self.same = same
        self.purges = 0

    async def purge_expired(self, *, now: float, limit: int) -> tuple[int, bool]:
        self.purges += 1
        if self.purges <= self.same:
            raise ConfigurationError("RedisStore runs on asyncio only")
        if self.purges == self.same + 1:
            raise ConfigurationError("access denied to the bucket")
        return await super().purge_expired(now=now, limit=limit)


async def test_a_cleanup_the_configuration_refuses_is_logged_once_per_reason(
    store: CheckpointStore, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # Every pass of a store that cannot run here failed the same way, and each logged a full
    # traceback of an error the caller's own calls already showed.
    refusing = RefusingStore(store, same=4)
    manager = CheckpointManager(refusing, config=make_config(clock, cleanup_interval=FAST_LOOP))
    caplog.set_level(logging.INFO, logger="fastcheckpoint")
    with anyio.fail_after(10):
        await manager.create(RUN, {"i": 0}, ttl_seconds=5)
        await manager.create(RUN, {"i": 1})
        clock.advance(5)

        async with manager:

            async def recovered() -> bool:
                return refusing.purges >= 6 and await held_sequences(manager) == [1]

            await wait_until(recovered)

    logged = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert [record.getMessage().split(";")[0] for record in logged] == [
        "checkpoint cleanup cannot run: RedisStore runs on asyncio only",
        "checkpoint cleanup cannot run: access denied to the bucket",
    ]
    assert all(record.exc_info is None for record in logged)


async def test_a_refusal_after_a_round_that_ran_is_logged_again(
    store: CheckpointStore, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # A refusal is said once while it lasts; once a round ran, the same refusal is news.
    outcomes = ["refuse", "run", "refuse"]

    class Flapping(ForwardingStore):
        async def purge_expired(self, *, now: float, limit: int) -> tuple[int, bool]:
            outcome = outcomes.pop(0) if outcomes else "run"
            if outcome == "refuse":
                raise ConfigurationError("RedisStore runs on asyncio only")
            return await super().purge_expired(now=now, limit=limit)

    manager = CheckpointManager(Flapping(store),
                                config=make_config(clock, cleanup_interval=FAST_LOOP))
    caplog.set_level(logging.INFO, logger="fastcheckpoint")
    with anyio.fail_after(10):
        async with manager:

            async def drained() -> bool:
                return not outcomes

            await wait_until(drained)
            await anyio.sleep(FAST_LOOP * 3)  # the round after the last refusal has run

    logged = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(logged) == 2


async def test_start_twice_is_harmless(store: CheckpointStore, clock: FakeClock) -> None:
    manager = CheckpointManager(store, config=make_config(clock, cleanup_interval=FAST_LOOP))
    with anyio.fail_after(10):
        before = task_ids()
        await manager.start()
        once = task_ids() - before
        await manager.start()
        twice = task_ids() - before
        await manager.stop()
        after = task_ids()

    assert once
    assert twice == once
    assert after == before


async def test_stop_without_start_is_harmless(store: CheckpointStore, clock: FakeClock) -> None:
    manager = CheckpointManager(store, config=make_config(clock))
    with anyio.fail_after(10):
        before = task_ids()
        await manager.stop()
        await manager.stop()
        created = await manager.create(RUN, {"i": 0})
        restored = await manager.restore(RUN)

    assert task_ids() == before
    assert created is not None
    assert restored == created


async def test_manager_can_start_again_after_stop(store: CheckpointStore, clock: FakeClock) -> None:
    counting = CountingStore(store)
    manager = CheckpointManager(counting, config=make_config(clock, cleanup_interval=FAST_LOOP))
    with anyio.fail_after(10):
        before = task_ids()
        async with manager:
            pass
        first_round = counting.purges

        async def looped_again() -> bool:
            return counting.purges > first_round

        async with manager:
            await wait_until(looped_again)

    assert task_ids() == before
    assert counting.purges > first_round


async def test_leaving_async_with_by_an_exception_stops_the_loop(
    store: CheckpointStore, clock: FakeClock
) -> None:
    manager = CheckpointManager(store, config=make_config(clock, cleanup_interval=FAST_LOOP))

    class Boom(Exception):
        pass

    with anyio.fail_after(10):
        before = task_ids()
        with pytest.raises(Boom):
            async with manager:
                raise Boom
        after = task_ids()

    assert after == before


async def test_aclose_stops_the_loop_and_closes_the_store(
    store: CheckpointStore, clock: FakeClock
) -> None:
    counting = CountingStore(store)
    manager = CheckpointManager(counting, config=make_config(clock, cleanup_interval=FAST_LOOP))
    with anyio.fail_after(10):
        before = task_ids()
        await manager.start()
        await manager.aclose()

    assert task_ids() == before
    assert counting.closed is True


class _SlowToStop(CountingStore):
    """A cleanup pass that, cancelled, finishes what it does first (a batch in flight)."""

    def __init__(self, inner: CheckpointStore) -> None:
        super().__init__(inner)
        self.purging = anyio.Event()

    async def purge_expired(self, *, now: float, limit: int) -> tuple[int, bool]:
        self.purging.set()
        try:
            await anyio.sleep(10)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.05)
        return 0, True


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_aclose_cancelled_by_asyncio_still_ends_the_loop_and_closes_the_store(
    anyio_backend: str, store: CheckpointStore, clock: FakeClock
) -> None:
    """asyncio's own cancellation (``task.cancel()``, ``wait_for``), which anyio's shields
    do not hold back, arriving while ``aclose`` waits for the loop: the loop has ended and
    the store is closed when the cancellation is raised."""
    slow = _SlowToStop(store)
    manager = CheckpointManager(slow, config=make_config(clock, cleanup_interval=FAST_LOOP))
    with anyio.fail_after(10):
        before = task_ids()
        await manager.start()
        await slow.purging.wait()
        closing = asyncio.ensure_future(manager.aclose())
        await asyncio.sleep(0.01)  # aclose is waiting for the loop to end
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert slow.closed is True
        assert task_ids() == before


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_a_loop_closed_with_the_cleanup_running_neither_stops_nor_blocks_the_manager(
    kind: str, tmp_path: Path, clock: FakeClock
) -> None:
    """An event loop closed with the cleanup loop still pending (``loop.close()`` without
    cancelling its tasks, not ``asyncio.run``): in the next loop the manager starts the
    cleanup loop again, and ``aclose`` ends it and closes the store, raising nothing."""
    counting = CountingStore(make_store(kind, tmp_path / "store"))
    manager = CheckpointManager(counting, config=make_config(clock, cleanup_interval=FAST_LOOP))
    first = asyncio.new_event_loop()
    try:
        first.run_until_complete(manager.start())
    finally:
        first.close()

    async def next_loop() -> int:
        with anyio.fail_after(10):
            passes = counting.purges
            await manager.start()

            async def looped() -> bool:
                return counting.purges > passes

            await wait_until(looped)
            await manager.aclose()
        return counting.purges

    assert asyncio.run(next_loop()) > 0
    assert counting.closed is True
