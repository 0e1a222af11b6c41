"""The manager's own defences, on every bundled store: records that belong elsewhere are
corrupt (never another run's data), and throttling holds for concurrent creates.

Stores are tampered with through a forwarding wrapper that answers reads of one run with
records of another, the way a copied file, key or item would; each store's own tamper tests
(tests/stores/) do it on the backend itself.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from fastcheckpoint import (
    CheckpointManager,
    CheckpointStatus,
    CheckpointStore,
    CorruptCheckpointError,
    SerializationError,
    StoreUnavailableError,
    ValidationError,
    _ids,
)
from fastcheckpoint._codec import json_copy
from fastcheckpoint.stores import RunRecord, StoredCheckpoint
from fastcheckpoint.stores._loops import PerLoop
from tests._helpers import STORE_KINDS, T0, FakeClock, ForwardingStore, make_config, make_store

pytestmark = pytest.mark.anyio

VICTIM = "run-a"
SOURCE = "run-b"


class Swapping(ForwardingStore):
    """Reads of ``VICTIM`` return what the inner store holds for ``SOURCE`` at ``sequence``."""

    def __init__(self, inner: CheckpointStore) -> None:
        super().__init__(inner)
        self.swap_runs = False

    async def get(
        self, run_key: str, sequence: int, *, now: float
    ) -> tuple[StoredCheckpoint, str] | None:
        if run_key == _ids.run_key(VICTIM):
            return await self.inner.get(_ids.run_key(SOURCE), sequence, now=now)
        return await self.inner.get(run_key, sequence, now=now)

    async def latest(self, run_key: str, *, now: float) -> tuple[StoredCheckpoint, str] | None:
        if run_key == _ids.run_key(VICTIM):
            return await self.inner.latest(_ids.run_key(SOURCE), now=now)
        return await self.inner.latest(run_key, now=now)

    async def get_run(self, run_key: str, *, now: float) -> RunRecord | None:
        if self.swap_runs and run_key == _ids.run_key(VICTIM):
            return await self.inner.get_run(_ids.run_key(SOURCE), now=now)
        return await self.inner.get_run(run_key, now=now)


@pytest.fixture(params=STORE_KINDS)
async def swapping(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Swapping]:
    store = Swapping(make_store(request.param, tmp_path / "store"))
    yield store
    with anyio.fail_after(10):
        await store.aclose()


@pytest.fixture
def manager(swapping: Swapping) -> CheckpointManager:
    return CheckpointManager(swapping, config=make_config(FakeClock()))


async def test_a_record_of_another_run_is_corrupt_not_returned(
    manager: CheckpointManager,
) -> None:
    with anyio.fail_after(10):
        victim = await manager.create(VICTIM, {"owner": "a"})
        await manager.create(SOURCE, {"owner": "b"})
        assert victim is not None
        with pytest.raises(CorruptCheckpointError, match="belongs elsewhere") as restored:
            await manager.restore(VICTIM)
        with pytest.raises(CorruptCheckpointError, match="belongs elsewhere"):
            await manager.restore_from(victim.checkpoint_id)
        with pytest.raises(CorruptCheckpointError):
            await manager.fork(victim.checkpoint_id, "forked")

    assert restored.value.key


async def test_a_forged_record_naming_this_run_but_another_owner_is_corrupt(
    manager: CheckpointManager, swapping: Swapping,
) -> None:
    # The record's id is rewritten to point here, but the run id inside it is the other run's.
    class Forging(Swapping):
        async def latest(
            self, run_key: str, *, now: float
        ) -> tuple[StoredCheckpoint, str] | None:
            found = await super().latest(run_key, now=now)
            if found is None or run_key != _ids.run_key(VICTIM):
                return found
            record, status = found
            parsed = _ids.parse_checkpoint_id(record.checkpoint_id)
            assert parsed is not None
            forged_id = _ids.checkpoint_id(run_key, parsed[1], record.sequence)
            return msgspec.structs.replace(record, checkpoint_id=forged_id), status

    forging = CheckpointManager(Forging(swapping.inner), config=manager.config)
    with anyio.fail_after(10):
        await forging.create(VICTIM, {"owner": "a"})
        await forging.create(SOURCE, {"owner": "b"})
        with pytest.raises(CorruptCheckpointError, match="belongs to run 'run-b'"):
            await forging.restore(VICTIM)


async def test_a_run_record_of_another_run_is_corrupt(
    manager: CheckpointManager, swapping: Swapping
) -> None:
    with anyio.fail_after(10):
        await manager.create(VICTIM, {"owner": "a"})
        await manager.create(SOURCE, {"owner": "b"})
        swapping.swap_runs = True
        with pytest.raises(CorruptCheckpointError, match="belongs to run 'run-b'"):
            await manager.get_run(VICTIM)
        with pytest.raises(CorruptCheckpointError):
            await manager.mark_completed(VICTIM)
        swapping.swap_runs = False
        source = await manager.get_run(SOURCE)

    assert source is not None
    assert source.status.value == "active"


async def test_listing_skips_a_header_that_belongs_elsewhere(tmp_path: Path) -> None:
    class Mixed(ForwardingStore):
        async def headers(self, run_key: str, **kwargs: object) -> tuple[list, str | None]:  # type: ignore[override, type-arg]
            own, status = await self.inner.headers(run_key, **kwargs)  # type: ignore[arg-type]
            if run_key != _ids.run_key(VICTIM):
                return own, status
            foreign, _ = await self.inner.headers(_ids.run_key(SOURCE), **kwargs)  # type: ignore[arg-type]
            return sorted([*own, *foreign], key=lambda h: -h.sequence), status

    store = Mixed(make_store("memory", tmp_path))
    manager = CheckpointManager(store, config=make_config(FakeClock()))
    with anyio.fail_after(10):
        for step in range(2):
            await manager.create(VICTIM, {"step": step})
            await manager.create(SOURCE, {"step": step})
        listed = await manager.list_checkpoints(VICTIM)

    assert [metadata.run_id for metadata in listed] == [VICTIM, VICTIM]
    assert [metadata.sequence for metadata in listed] == [1, 0]


@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_checkpoint_interval_holds_for_concurrent_creates(kind: str, tmp_path: Path) -> None:
    store = make_store(kind, tmp_path / "store")
    clock = FakeClock()
    manager = CheckpointManager(store, config=make_config(clock, checkpoint_interval=60.0))
    results: list[object] = []

    async def create(step: int) -> None:
        results.append(await manager.create(VICTIM, {"step": step}))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            for step in range(50):
                group.start_soon(create, step)
        listed = await manager.list_checkpoints(VICTIM)
        clock.advance(60.0)
        later = await manager.create(VICTIM, {"step": 50})
        await store.aclose()

    assert sum(result is not None for result in results) == 1
    assert len(listed) == 1
    assert later is not None


async def test_a_failed_create_gives_its_throttling_slot_back(tmp_path: Path) -> None:
    class FailsOnce(ForwardingStore):
        failed = False

        async def append(self, run_key: str, record: StoredCheckpoint, **kwargs: object) -> str:  # type: ignore[override]
            if not self.failed:
                self.failed = True
                raise CorruptCheckpointError("refused once", key="test")
            return await self.inner.append(run_key, record, **kwargs)  # type: ignore[arg-type]

    manager = CheckpointManager(
        FailsOnce(make_store("memory", tmp_path)),
        config=make_config(FakeClock(), checkpoint_interval=60.0),
    )
    with anyio.fail_after(10):
        with pytest.raises(CorruptCheckpointError):
            await manager.create(VICTIM, {"step": 0})
        retried = await manager.create(VICTIM, {"step": 0})
        throttled = await manager.create(VICTIM, {"step": 1})

    assert retried is not None
    assert throttled is None


@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_many_concurrent_creates_of_one_run_in_one_process_all_land(
    kind: str, tmp_path: Path
) -> None:
    # Without taking turns, each round of the race lets one create win: the 33rd would run
    # out of retries (ConflictError) although nothing else writes the run.
    store = make_store(kind, tmp_path / "store")
    manager = CheckpointManager(store, config=make_config(FakeClock()))
    created: list[int] = []

    async def create(step: int) -> None:
        checkpoint = await manager.create(VICTIM, {"step": step})
        assert checkpoint is not None
        created.append(checkpoint.metadata.sequence)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as group:
            for step in range(100):
                group.start_soon(create, step)
        await store.aclose()

    assert sorted(created) == list(range(100))


@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_store_cleanup_expired_removes_what_expired_by_the_wall_clock(
    kind: str, tmp_path: Path
) -> None:
    # FastAgentic documents ``await store.cleanup_expired()`` on a store, without a manager.
    store = make_store(kind, tmp_path / "store")
    past = FakeClock(time.time() - 3600.0)
    manager = CheckpointManager(store, config=make_config(past))
    with anyio.fail_after(10):
        for step in range(3):
            await manager.create(VICTIM, {"step": step}, ttl_seconds=60.0)
        await manager.create(SOURCE, {"step": 0})
        removed = await store.cleanup_expired()
        again = await store.cleanup_expired(batch_size=1)
        kept = await store.count_runs(status=None, now=time.time())
        with pytest.raises(ValidationError):
            await store.cleanup_expired(batch_size=0)
        await store.aclose()

    assert (removed, again, kept) == (3, 0, 1)


# -- creates that resume a failed run ---------------------------------------------------------


async def test_a_resume_the_store_refuses_does_not_fail_the_written_create(
    tmp_path: Path,
) -> None:
    # The checkpoint is written before the run is made active again: a create that raised
    # then would be retried by its caller and written twice.
    class StatusUpdateFailsOnce(ForwardingStore):
        refused = False

        async def update_run(self, run_key: str, **kwargs: Any) -> RunRecord:
            if kwargs["status"] == "active" and not self.refused:
                self.refused = True
                raise StoreUnavailableError("connection reset")
            return await self.inner.update_run(run_key, **kwargs)

    store = StatusUpdateFailsOnce(make_store("memory", tmp_path))
    manager = CheckpointManager(store, config=make_config(FakeClock()))
    with anyio.fail_after(10):
        await manager.create(VICTIM, {"step": 0})
        await manager.mark_failed(VICTIM, "tool crashed")
        resumed = await manager.create(VICTIM, {"step": 1})
        still_failed = await manager.get_run(VICTIM)
        again = await manager.create(VICTIM, {"step": 2})
        run = await manager.get_run(VICTIM)
        listed = await manager.list_checkpoints(VICTIM)

    assert resumed is not None
    assert resumed.metadata.status is CheckpointStatus.FAILED
    assert still_failed is not None
    assert still_failed.status is CheckpointStatus.FAILED
    assert again is not None
    assert again.metadata.status is CheckpointStatus.ACTIVE
    assert run is not None
    assert run.status is CheckpointStatus.ACTIVE
    assert [metadata.sequence for metadata in listed] == [2, 1, 0]


# -- fork reads its source before writing ----------------------------------------------------


class Damaging(ForwardingStore):
    """Reads of ``VICTIM`` by sequence return the record with its payload's last byte flipped."""

    async def get(
        self, run_key: str, sequence: int, *, now: float
    ) -> tuple[StoredCheckpoint, str] | None:
        found = await self.inner.get(run_key, sequence, now=now)
        if found is None or run_key != _ids.run_key(VICTIM):
            return found
        record, status = found
        damaged = record.payload[:-1] + bytes([record.payload[-1] ^ 1])
        return msgspec.structs.replace(record, payload=damaged), status


async def test_fork_of_a_source_that_cannot_be_read_writes_nothing(tmp_path: Path) -> None:
    manager = CheckpointManager(Damaging(make_store("memory", tmp_path)),
                                config=make_config(FakeClock()))
    with anyio.fail_after(10):
        source = await manager.create(VICTIM, {"step": 0})
        assert source is not None
        with pytest.raises(CorruptCheckpointError):
            await manager.fork(source.checkpoint_id, "forked")
        assert await manager.get_run("forked") is None
        assert await manager.restore("forked") is None


async def test_fork_that_dec_hook_refuses_writes_nothing(tmp_path: Path) -> None:
    def refuse(type_name: str, value: Any) -> Any:
        raise ValueError(f"cannot rebuild {type_name}")

    store = make_store("memory", tmp_path)
    writer = CheckpointManager(store, config=make_config(FakeClock(), enc_hook=repr))
    reader = CheckpointManager(store, config=make_config(FakeClock(), dec_hook=refuse))
    with anyio.fail_after(10):
        source = await writer.create(VICTIM, {"when": complex(1, 2)})
        assert source is not None
        with pytest.raises(SerializationError):
            await reader.fork(source.checkpoint_id, "forked")
        assert await reader.get_run("forked") is None


# -- the throttling claim ---------------------------------------------------------------------


async def test_a_failed_create_leaves_the_claim_of_a_create_made_since(tmp_path: Path) -> None:
    # Both creates read the same time (an injected clock; a coarse one does the same): the
    # failing one must give back only its own claim, not the forced create's that succeeded.
    parent_read = anyio.Event()
    go_on = anyio.Event()

    class SlowParentCheck(ForwardingStore):
        async def headers(self, run_key: str, **kwargs: Any) -> Any:
            if kwargs["limit"] == 1 and not parent_read.is_set():
                parent_read.set()
                await go_on.wait()
                raise StoreUnavailableError("connection reset")
            return await self.inner.headers(run_key, **kwargs)

    clock = FakeClock()
    manager = CheckpointManager(SlowParentCheck(make_store("memory", tmp_path)),
                                config=make_config(clock, checkpoint_interval=60.0))
    with anyio.fail_after(10):
        first = await manager.create(VICTIM, {"step": 0})
        assert first is not None
        clock.advance(60.0)

        async def branch() -> None:
            with pytest.raises(StoreUnavailableError):
                await manager.create(VICTIM, {"step": 1}, parent_id=first.checkpoint_id)

        async with anyio.create_task_group() as group:
            group.start_soon(branch)
            await parent_read.wait()
            forced = await manager.create(VICTIM, {"step": 2}, force=True)
            go_on.set()
        throttled = await manager.create(VICTIM, {"step": 3})

    assert forced is not None
    assert throttled is None



async def test_a_create_cancelled_while_appending_frees_its_turn_and_its_claim(
    tmp_path: Path,
) -> None:
    appending = anyio.Event()

    class HangsOnce(ForwardingStore):
        hung = False

        async def append(self, run_key: str, record: StoredCheckpoint, **kwargs: Any) -> str:  # type: ignore[override]
            if not self.hung:
                self.hung = True
                appending.set()
                await anyio.sleep_forever()
            return await self.inner.append(run_key, record, **kwargs)

    manager = CheckpointManager(HangsOnce(make_store("memory", tmp_path)),
                                config=make_config(FakeClock(), checkpoint_interval=60.0))
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(manager.create, VICTIM, {"step": 0})
            await appending.wait()
            group.cancel_scope.cancel()
        created = await manager.create(VICTIM, {"step": 1})
        throttled = await manager.create(VICTIM, {"step": 2})

    assert created is not None
    assert created.metadata.sequence == 0
    assert throttled is None
    assert manager._writers == {}

# -- approval requests --------------------------------------------------------------------------


def test_a_request_copied_near_the_recursion_limit_is_a_serialization_error() -> None:
    nested: Any = "leaf"
    for _ in range(100):
        nested = [nested]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(_frames()) + 120)
    try:
        with pytest.raises(SerializationError, match="call stack"):
            json_copy({"steps": nested}, "request")
    finally:
        sys.setrecursionlimit(limit)


def _frames() -> list[object]:
    frames: list[object] = []
    frame: Any = sys._getframe()
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    return frames


# -- per-event-loop clients (stores._loops.PerLoop) ---------------------------------------------


def _counting_per_loop() -> tuple[PerLoop[object], list[object]]:
    built: list[object] = []

    async def build() -> object:
        built.append(object())
        return built[-1]

    async def close(resource: object) -> None:
        pass

    return PerLoop(build, close, store="TestStore", driver="a driver"), built


def test_per_loop_lets_go_of_the_clients_of_closed_loops() -> None:
    # A module-level store used by one asyncio.run() per request: each closed loop's client
    # (its connection pool) must not be kept for ever.
    clients, built = _counting_per_loop()

    async def use() -> None:
        await clients.get()

    for _ in range(3):
        asyncio.run(use())

    assert len(built) == 3
    assert len(clients._by_loop) <= 1


def test_per_loop_builds_again_after_a_failed_build_nobody_waited_for() -> None:
    attempts: list[int] = []

    async def build() -> object:
        attempts.append(len(attempts))
        if len(attempts) == 1:
            await asyncio.sleep(0.01)
            raise OSError("connection refused")
        return "client"

    async def close(resource: object) -> None:
        pass

    clients: PerLoop[object] = PerLoop(build, close, store="TestStore", driver="a driver")

    async def main() -> object:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(clients.get(), 0.001)  # the caller gives up; the build goes on
        await asyncio.sleep(0.05)  # the build fails with nobody waiting for it
        return await asyncio.wait_for(clients.get(), 5)

    assert asyncio.run(main()) == "client"
    assert attempts == [0, 1]


def test_start_in_a_new_event_loop_runs_the_cleanup_loop_again(tmp_path: Path) -> None:
    # A module-level manager started in each asyncio.run(): the loop of the first run ended
    # with its event loop, so "already started" must not keep the second from cleaning up.
    class Watched(ForwardingStore):
        purged: anyio.Event | None = None

        async def purge_expired(self, *, now: float, limit: int) -> tuple[int, bool]:
            if self.purged is not None:
                self.purged.set()
            return await self.inner.purge_expired(now=now, limit=limit)

    store = Watched(make_store("memory", tmp_path))
    manager = CheckpointManager(store, config=make_config(FakeClock()))

    async def serve() -> bool:
        store.purged = anyio.Event()
        with anyio.move_on_after(5):
            await manager.start()
            await store.purged.wait()
        return store.purged.is_set()  # and ends without stop(), as a request handler may

    assert asyncio.run(serve())
    assert asyncio.run(serve())


# -- run details only the manager can read -----------------------------------------------------


async def _tamper_run(store: CheckpointStore, run_id: str, *, status: str, data: bytes) -> None:
    """Rewrite a run record's status and details through the store, as a bug or a person
    editing a Redis hash or a DynamoDB item would: the store's own checks see nothing wrong."""
    key = _ids.run_key(run_id)
    record = await store.get_run(key, now=T0)
    assert record is not None
    await store.update_run(key, incarnation=record.incarnation, version=record.version,
                           status=status, data=data, now=T0)


@pytest.mark.parametrize("kind", STORE_KINDS)
@pytest.mark.parametrize(("status", "data", "kept"), [
    ("paused", b"not a framed record", "paused"),
    ("bogus", b"", "active"),
])
async def test_run_details_only_the_manager_finds_damaged_are_skipped_and_repaired(
    kind: str, status: str, data: bytes, kept: str, tmp_path: Path
) -> None:
    store = make_store(kind, tmp_path / "store")
    manager = CheckpointManager(store, config=make_config(FakeClock()))
    with anyio.fail_after(10):
        for run_id in (VICTIM, SOURCE):
            await manager.create(run_id, {"step": 0})
        await _tamper_run(store, VICTIM, status=status, data=data)
        listed = await manager.list_runs()
        with pytest.raises(CorruptCheckpointError):
            await manager.mark_completed(VICTIM)
        [report] = await manager.repair()
        again = await manager.repair(VICTIM)
        run = await manager.get_run(VICTIM)
        completed = await manager.mark_completed(VICTIM)
        await store.aclose()

    assert [info.run_id for info in listed] == [SOURCE]
    assert (report.run_id, report.outcome, report.checkpoints) == (VICTIM, "rebuilt", 1)
    assert "status history" in report.lost
    assert ("status (the run is active again)" in report.lost) is (kept == "active")
    assert again == []
    assert run is not None
    assert run.status.value == kept
    assert [change.actor for change in run.history] == ["repair"]
    assert completed is not None
    assert completed.status is CheckpointStatus.COMPLETED


@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_a_create_written_to_a_run_of_unknown_status_is_not_an_error(
    kind: str, tmp_path: Path
) -> None:
    store = make_store(kind, tmp_path / "store")
    manager = CheckpointManager(store, config=make_config(FakeClock()))
    with anyio.fail_after(10):
        await manager.create(VICTIM, {"step": 0})
        await _tamper_run(store, VICTIM, status="bogus", data=b"")
        written = await manager.create(VICTIM, {"step": 1})
        listed = await manager.list_checkpoints(VICTIM, include_expired=True)
        await store.aclose()

    assert written is not None
    assert written.metadata.status is CheckpointStatus.ACTIVE
    assert [metadata.sequence for metadata in listed] == [1, 0]


def test_per_loop_closes_a_client_that_was_being_built_when_closed() -> None:
    closed: list[object] = []

    async def main() -> None:
        built = asyncio.Event()

        async def build() -> object:
            await built.wait()
            return "client"

        async def close(resource: object) -> None:
            closed.append(resource)

        clients: PerLoop[object] = PerLoop(build, close, store="TestStore", driver="a driver")
        user = asyncio.create_task(clients.get())
        await asyncio.sleep(0)  # the user starts the build
        closing = asyncio.create_task(clients.aclose())
        await asyncio.sleep(0)
        built.set()
        await asyncio.wait_for(asyncio.gather(user, closing), 5)

    asyncio.run(main())
    assert closed == ["client"]


def test_per_loop_closes_each_loops_client_when_that_loop_shuts_down() -> None:
    # asyncio.run() finalizes async generators before closing its loop: the client of each
    # run is closed in its own loop, not left for the garbage collector (unclosed sockets).
    closed: list[tuple[int, bool]] = []

    async def build() -> int:
        return len(closed)

    async def close(resource: int) -> None:
        closed.append((resource, asyncio.get_running_loop().is_running()))

    clients: PerLoop[int] = PerLoop(build, close, store="TestStore", driver="a driver")

    async def use() -> int:
        return await clients.get()

    first = asyncio.run(use())
    after_first = list(closed)
    second = asyncio.run(use())

    assert (first, second) == (0, 1)
    assert after_first == [(0, True)]
    assert closed == [(0, True), (1, True)]


def test_per_loop_aclose_closes_the_client_once() -> None:
    closed: list[object] = []

    async def build() -> str:
        return "client"

    async def close(resource: object) -> None:
        closed.append(resource)

    clients: PerLoop[str] = PerLoop(build, close, store="TestStore", driver="a driver")

    async def main() -> None:
        await clients.get()
        await clients.aclose()

    asyncio.run(main())
    assert closed == ["client"]
