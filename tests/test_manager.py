"""CheckpointManager semantics (API, sequencing, ids, expiry, pruning, status, serialization)
on every bundled store.

Each test runs against MemoryStore and FileStore, on asyncio and on trio. Time is a fake clock
moved by hand; nothing sleeps to wait for expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime as dt
import functools
import io
import json
import math
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest

from fastcheckpoint import (
    Checkpoint,
    CheckpointConfig,
    CheckpointManager,
    CheckpointMetadata,
    CheckpointNotFound,
    CheckpointStatus,
    CheckpointStore,
    ConfigurationError,
    ConflictError,
    CorruptCheckpointError,
    FileCheckpointStore,
    FileStore,
    InMemoryCheckpointStore,
    MemoryStore,
    RunInfo,
    SequenceConflict,
    SerializationError,
    StoreUnavailableError,
    ValidationError,
    _export,
    _ids,
    open_store,
)
from fastcheckpoint.stores import CheckpointHeader, RunRecord, StoredCheckpoint
from tests._helpers import STORE_KINDS, FakeClock, ForwardingStore, make_config, make_store

pytestmark = pytest.mark.anyio

RUN = "run-1"
OTHER = "run-2"


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(params=STORE_KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
async def store(store_kind: str, store_path: Path) -> AsyncIterator[CheckpointStore]:
    store = make_store(store_kind, store_path)
    yield store
    with anyio.fail_after(10):
        await store.aclose()


@pytest.fixture
async def reopen(
    store: CheckpointStore, store_kind: str, store_path: Path
) -> AsyncIterator[Callable[[], CheckpointStore]]:
    """Another handle on the same data, as a second process would have (memory: the same)."""
    opened: list[CheckpointStore] = []

    def open_again() -> CheckpointStore:
        if store_kind == "memory":
            return store
        again = make_store(store_kind, store_path)
        opened.append(again)
        return again

    yield open_again
    with anyio.fail_after(10):
        for again in opened:
            await again.aclose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def manager(store: CheckpointStore, clock: FakeClock) -> CheckpointManager:
    return CheckpointManager(store, config=make_config(clock))


def manager_with(store: CheckpointStore, clock: FakeClock, **settings: Any) -> CheckpointManager:
    return CheckpointManager(store, config=make_config(clock, **settings))


async def create(manager: CheckpointManager, run_id: str = RUN, **kwargs: Any) -> Checkpoint:
    """``manager.create`` for a call that must not be throttled."""
    kwargs.setdefault("state", {"n": 0})
    checkpoint = await manager.create(run_id, **kwargs)
    assert checkpoint is not None
    return checkpoint


async def sequences(manager: CheckpointManager, run_id: str = RUN, **kwargs: Any) -> list[int]:
    listed = await manager.list_checkpoints(run_id, limit=kwargs.pop("limit", 1000), **kwargs)
    return [metadata.sequence for metadata in listed]


def other_sequence(checkpoint_id: str, sequence: int) -> str:
    """The id ``checkpoint_id`` would have at another sequence of the same run incarnation."""
    return f"{checkpoint_id.rsplit('-', 1)[0]}-{sequence}"


# -- basics and FastAgentic-compatible usage ---------------------------------------------------


async def test_create_returns_first_checkpoint_at_sequence_zero_with_metadata(
    manager: CheckpointManager, clock: FakeClock
) -> None:
    with anyio.fail_after(10):
        checkpoint = await manager.create(
            RUN,
            {"step": 1},
            messages=[{"role": "user", "content": "hi"}],
            tool_calls=[{"name": "search", "args": {"q": "x"}}],
            context={"user": "ada"},
            step_name="plan",
            tags=["a", "b"],
        )

    assert isinstance(checkpoint, Checkpoint)
    metadata = checkpoint.metadata
    assert metadata.sequence == 0
    assert metadata.run_id == RUN == checkpoint.run_id
    assert metadata.checkpoint_id == checkpoint.checkpoint_id
    assert re.fullmatch(r"[A-Za-z0-9._~-]+", checkpoint.checkpoint_id)
    assert metadata.created_at == clock.now
    assert metadata.status is CheckpointStatus.ACTIVE
    assert metadata.step_name == "plan"
    assert metadata.parent_id is None
    assert metadata.tags == ["a", "b"]
    assert metadata.ttl_seconds is None
    assert metadata.expires_at is None
    assert checkpoint.state == {"step": 1}
    assert checkpoint.messages == [{"role": "user", "content": "hi"}]
    assert checkpoint.tool_calls == [{"name": "search", "args": {"q": "x"}}]
    assert checkpoint.context == {"user": "ada"}


async def test_checkpoint_ids_are_unique_across_runs(manager: CheckpointManager) -> None:
    with anyio.fail_after(10):
        first = await create(manager, RUN)
        second = await create(manager, OTHER)
        third = await create(manager, RUN)

    ids = {first.checkpoint_id, second.checkpoint_id, third.checkpoint_id}
    assert len(ids) == 3


async def test_restore_returns_newest_checkpoint(manager: CheckpointManager) -> None:
    with anyio.fail_after(10):
        for step in range(3):
            newest = await create(manager, state={"step": step}, step_name=f"s{step}")
        restored = await manager.restore(RUN)

    assert restored == newest
    assert restored.metadata.sequence == 2
    assert restored.state == {"step": 2}


async def test_restore_of_unknown_run_returns_none(manager: CheckpointManager) -> None:
    with anyio.fail_after(10):
        await create(manager, OTHER)
        assert await manager.restore(RUN) is None


async def test_restore_from_returns_that_checkpoint(manager: CheckpointManager) -> None:
    with anyio.fail_after(10):
        first = await create(manager, state={"step": 0}, messages=[{"m": 0}], context={"c": 0})
        await create(manager, state={"step": 1})
        restored = await manager.restore_from(first.checkpoint_id)

    assert restored == first


async def test_restore_from_unknown_id_returns_none(manager: CheckpointManager) -> None:
    with anyio.fail_after(10):
        checkpoint = await create(manager)
        assert await manager.restore_from(other_sequence(checkpoint.checkpoint_id, 7)) is None


FOREIGN_IDS = ["", "nope", "ckpt-abc123", "ck-abc-def-1", "ck-" + "a" * 24 + "-aaaaaaaa-x"]


@pytest.mark.parametrize("foreign", FOREIGN_IDS)
async def test_foreign_id_strings_are_not_found(manager: CheckpointManager, foreign: str) -> None:
    # FastAgentic's docs call restore_from("ckpt-abc123"); migrating users hold such ids.
    with anyio.fail_after(10):
        await create(manager)
        assert await manager.restore_from(foreign) is None
        assert await manager.delete(foreign) is False
        assert await manager.lineage(foreign) == []
        with pytest.raises(CheckpointNotFound):
            await manager.fork(foreign, "forked")
        with pytest.raises(CheckpointNotFound):
            await manager.create(RUN, {"n": 1}, parent_id=foreign)
        await _assert_nothing_written(manager, [0])


@pytest.mark.parametrize("bad_id", [42, None, b"ck-x", 1.5])
async def test_non_str_ids_raise_validation_error(
    manager: CheckpointManager, bad_id: Any
) -> None:
    with anyio.fail_after(10):
        for call in (manager.restore_from, manager.delete, manager.lineage, manager.fork):
            with pytest.raises(ValidationError):
                await call(bad_id)
        if bad_id is not None:  # parent_id=None means "the latest"
            with pytest.raises(ValidationError):
                await manager.create(RUN, {"n": 1}, parent_id=bad_id)


async def test_list_checkpoints_newest_first_with_limit(manager: CheckpointManager) -> None:
    with anyio.fail_after(10):
        created = [await create(manager, state={"i": i}) for i in range(5)]
        listed = await manager.list_checkpoints(RUN)
        limited = await manager.list_checkpoints(RUN, limit=2)

    assert listed == [checkpoint.metadata for checkpoint in reversed(created)]
    assert [metadata.sequence for metadata in limited] == [4, 3]


async def test_delete_removes_only_that_checkpoint(manager: CheckpointManager) -> None:
    with anyio.fail_after(10):
        created = [await create(manager, state={"i": i}) for i in range(3)]
        assert await manager.delete(created[1].checkpoint_id) is True
        assert await manager.restore_from(created[1].checkpoint_id) is None
        assert await sequences(manager) == [2, 0]
        assert await manager.delete(created[1].checkpoint_id) is False
        assert await manager.restore_from(created[0].checkpoint_id) == created[0]


async def test_delete_run_returns_count_and_removes_the_run(manager: CheckpointManager) -> None:
    with anyio.fail_after(10):
        for i in range(3):
            await create(manager, state={"i": i})
        kept = await create(manager, OTHER)

        assert await manager.delete_run(RUN) == 3
        assert await manager.restore(RUN) is None
        assert await manager.get_run(RUN) is None
        assert await manager.list_checkpoints(RUN) == []
        assert await manager.delete_run(RUN) == 0
        assert await manager.restore(OTHER) == kept


async def test_mark_completed_and_mark_failed_set_the_run_status(
    manager: CheckpointManager,
) -> None:
    with anyio.fail_after(10):
        await create(manager, RUN)
        await create(manager, OTHER)
        completed = await manager.mark_completed(RUN)
        failed = await manager.mark_failed(OTHER, error="tool crashed")
        completed_run = await manager.get_run(RUN)
        failed_run = await manager.get_run(OTHER)

    assert completed is not None
    assert completed.status is CheckpointStatus.COMPLETED
    assert failed is not None
    assert failed.status is CheckpointStatus.FAILED
    assert completed_run is not None
    assert completed_run.status is CheckpointStatus.COMPLETED
    assert failed_run is not None
    assert failed_run.status is CheckpointStatus.FAILED
    assert failed_run.error == "tool crashed"


async def test_mark_completed_of_unknown_run_returns_none(manager: CheckpointManager) -> None:
    with anyio.fail_after(10):
        assert await manager.mark_completed(RUN) is None
        assert await manager.mark_failed(RUN, "x") is None
        assert await manager.get_run(RUN) is None


async def test_checkpoint_json_round_trip(manager: CheckpointManager) -> None:
    with anyio.fail_after(10):
        await create(manager)
        checkpoint = await create(
            manager,
            state={"plan": ["a", "b"], "n": 1.5, "ok": True, "none": None},
            messages=[{"role": "assistant", "content": "é🚀"}],
            step_name="act",
            tags=["t"],
            ttl_seconds=60,
        )
        restored = await manager.restore(RUN)

    assert Checkpoint.from_json(checkpoint.to_json()) == checkpoint
    assert restored is not None
    assert Checkpoint.from_json(restored.to_json()) == restored


async def test_metadata_is_expired_follows_the_wall_clock(store: CheckpointStore) -> None:
    clock = FakeClock(time.time() - 7200)  # two hours ago
    manager = manager_with(store, clock)
    with anyio.fail_after(10):
        short = await create(manager, ttl_seconds=60)
        long = await create(manager, ttl_seconds=4 * 3600)
        forever = await create(manager)
        restored_long = await manager.restore_from(long.checkpoint_id)

    assert short.metadata.is_expired is True
    assert long.metadata.is_expired is False
    assert forever.metadata.is_expired is False
    assert restored_long is not None
    assert restored_long.metadata.is_expired is False


def test_fastagentic_style_metadata_reports_is_expired() -> None:
    # FastAgentic builds metadata with created_at + ttl_seconds and no expires_at.
    stale = CheckpointMetadata(run_id=RUN, created_at=time.time() - 100, ttl_seconds=10)
    fresh = CheckpointMetadata(run_id=RUN, created_at=time.time(), ttl_seconds=3600)

    assert stale.is_expired is True
    assert fresh.is_expired is False


async def test_fastagentic_names_and_call_shapes_work() -> None:
    assert InMemoryCheckpointStore is MemoryStore
    assert issubclass(FileCheckpointStore, FileStore)
    manager = CheckpointManager(
        InMemoryCheckpointStore(),
        config=CheckpointConfig(
            auto_checkpoint=True,
            checkpoint_interval=0.0,
            max_checkpoints_per_run=100,
            default_ttl_seconds=None,
            cleanup_interval=300.0,
        ),
    )
    with anyio.fail_after(10):
        created = await manager.create(
            run_id="run-123",
            state={"step": "processing"},
            messages=[{"role": "user", "content": "Hello"}],
        )
        assert created is not None
        restored = await manager.restore("run-123")
        again = await manager.restore_from(created.checkpoint_id)
        listed = await manager.list_checkpoints("run-123", limit=10)
        await manager.mark_completed("run-123")
        completed = await manager.restore("run-123")
        deleted = await manager.delete_run("run-123")

    assert restored is not None
    assert restored.state == {"step": "processing"}
    assert restored.messages == [{"role": "user", "content": "Hello"}]
    assert again == restored
    assert [metadata.checkpoint_id for metadata in listed] == [created.checkpoint_id]
    assert completed is not None
    assert completed.metadata.status is CheckpointStatus.COMPLETED
    assert deleted == 1


# -- sequencing --------------------------------------------------------------------------------


async def test_twenty_concurrent_creates_on_one_manager_get_gap_free_unique_sequences(
    manager: CheckpointManager,
) -> None:
    results: list[Checkpoint] = []

    async def one(index: int) -> None:
        results.append(await create(manager, state={"i": index}))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as task_group:
            for index in range(20):
                task_group.start_soon(one, index)
        listed = await sequences(manager)
        run = await manager.get_run(RUN)

    assert sorted(checkpoint.metadata.sequence for checkpoint in results) == list(range(20))
    assert len({checkpoint.checkpoint_id for checkpoint in results}) == 20
    assert listed == list(range(19, -1, -1))
    assert run is not None
    assert run.latest_sequence == 19


async def test_twenty_concurrent_creates_from_two_managers_sharing_a_store(
    store: CheckpointStore, reopen: Callable[[], CheckpointStore], clock: FakeClock
) -> None:
    first = manager_with(store, clock)
    second = manager_with(reopen(), clock)
    results: list[Checkpoint] = []

    async def one(manager: CheckpointManager, index: int) -> None:
        results.append(await create(manager, state={"i": index}))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as task_group:
            for index in range(20):
                task_group.start_soon(one, first if index % 2 else second, index)
        listed = await sequences(first)

    assert sorted(checkpoint.metadata.sequence for checkpoint in results) == list(range(20))
    assert len({checkpoint.checkpoint_id for checkpoint in results}) == 20
    assert listed == list(range(19, -1, -1))
    restored = {checkpoint.metadata.sequence: checkpoint.state["i"] for checkpoint in results}
    with anyio.fail_after(10):
        for checkpoint in results:
            again = await second.restore_from(checkpoint.checkpoint_id)
            assert again is not None
            assert again.state["i"] == restored[checkpoint.metadata.sequence]


async def test_second_manager_continues_a_run_at_latest_plus_one(
    manager: CheckpointManager, reopen: Callable[[], CheckpointStore], clock: FakeClock
) -> None:
    with anyio.fail_after(10):
        for i in range(3):
            last = await create(manager, state={"i": i})
        fresh = manager_with(reopen(), clock)  # a new process: no memory of the run
        continued = await create(fresh, state={"i": 3})
        back = await create(manager, state={"i": 4})  # the first one's hint is now stale

    assert continued.metadata.sequence == 3
    assert continued.metadata.parent_id == last.checkpoint_id
    assert back.metadata.sequence == 4
    assert back.metadata.parent_id == continued.checkpoint_id


async def test_stale_manager_continues_a_run_another_manager_deleted_and_recreated(
    manager: CheckpointManager, reopen: Callable[[], CheckpointStore], clock: FakeClock
) -> None:
    other = manager_with(reopen(), clock)
    with anyio.fail_after(10):
        for i in range(3):
            old = await create(manager, state={"i": i})  # this manager remembers sequence 2
        assert await other.delete_run(RUN) == 3
        restarted = await create(other, state={"run": "new"})
        continued = await create(manager, state={"run": "new", "i": 1})
        listed = await manager.list_checkpoints(RUN)

    assert restarted.metadata.sequence == 0
    assert continued.metadata.sequence == 1
    assert continued.metadata.parent_id == restarted.checkpoint_id
    assert continued.metadata.parent_id != old.checkpoint_id
    assert [m.checkpoint_id for m in listed] == [continued.checkpoint_id, restarted.checkpoint_id]


async def test_failed_create_consumes_no_sequence(manager: CheckpointManager) -> None:
    with anyio.fail_after(10):
        await create(manager)
        with pytest.raises(SerializationError):
            await manager.create(RUN, {"bad": object()})
        with pytest.raises(ValidationError):
            await manager.create(RUN, {"n": 1}, ttl_seconds=-1)
        after = await create(manager)

    assert after.metadata.sequence == 1


class AlwaysTaken(ForwardingStore):
    """Refuses every append, naming a head that keeps moving: a writer that always loses."""

    calls = 0

    async def append(
        self,
        run_key: str,
        record: StoredCheckpoint,
        *,
        run: RunRecord,
        keep_latest: int | None,
        now: float,
    ) -> str:
        self.calls += 1
        raise SequenceConflict(latest_sequence=self.calls, incarnation="aaaaaaaa")


async def test_sequence_conflicts_past_the_retry_limit_raise_conflict_error(
    store: CheckpointStore, clock: FakeClock
) -> None:
    taken = AlwaysTaken(store)
    manager = manager_with(taken, clock, max_sequence_retries=4)

    with anyio.fail_after(10), pytest.raises(ConflictError) as caught:
        await manager.create(RUN, {"n": 1})

    assert not isinstance(caught.value, SequenceConflict)
    assert taken.calls == 4
    with anyio.fail_after(10):
        assert await manager.get_run(RUN) is None


async def test_sequence_conflicts_retry_at_once_then_pause_briefly(
    store: CheckpointStore, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store names the head, so the first retries go at once; colliding writers then
    pause from a millisecond up, doubling, never past the retry policy's cap."""

    pauses: list[float] = []

    async def record_pause(seconds: float) -> None:
        pauses.append(seconds)

    monkeypatch.setattr("fastcheckpoint._manager.anyio.sleep", record_pause)
    taken = AlwaysTaken(store)
    manager = manager_with(taken, clock, max_sequence_retries=8)

    with anyio.fail_after(10), pytest.raises(ConflictError):
        await manager.create(RUN, {"n": 1})

    assert taken.calls == 8
    assert len(pauses) == 4  # attempts 3..6 pause; the first three and the last do not
    ceilings = [0.001 * 2**n for n in range(4)]  # 1, 2, 4, 8 ms: far below 100 ms
    assert all(0 <= pause <= ceiling for pause, ceiling in zip(pauses, ceilings, strict=True))


# -- parents -----------------------------------------------------------------------------------


async def test_parent_id_defaults_to_the_previous_checkpoint(manager: CheckpointManager) -> None:
    with anyio.fail_after(10):
        created = [await create(manager, state={"i": i}) for i in range(3)]
        restored = await manager.restore(RUN)

    assert created[0].metadata.parent_id is None
    assert created[1].metadata.parent_id == created[0].checkpoint_id
    assert created[2].metadata.parent_id == created[1].checkpoint_id
    assert restored is not None
    assert restored.metadata.parent_id == created[1].checkpoint_id


async def test_explicit_parent_id_of_the_same_run_is_recorded(manager: CheckpointManager) -> None:
    with anyio.fail_after(10):
        root = await create(manager, state={"i": 0})
        await create(manager, state={"i": 1})
        branch = await create(manager, state={"i": 2}, parent_id=root.checkpoint_id)
        restored = await manager.restore_from(branch.checkpoint_id)
        lineage = await manager.lineage(branch.checkpoint_id)

    assert branch.metadata.parent_id == root.checkpoint_id
    assert restored is not None
    assert restored.metadata.parent_id == root.checkpoint_id
    assert [metadata.checkpoint_id for metadata in lineage] == [
        branch.checkpoint_id,
        root.checkpoint_id,
    ]


async def _assert_nothing_written(manager: CheckpointManager, expected: list[int]) -> None:
    assert await sequences(manager) == expected
    run = await manager.get_run(RUN)
    if not expected:
        assert run is None
        return
    assert run is not None
    assert run.latest_sequence == expected[0]


async def test_unknown_parent_id_raises_checkpoint_not_found_and_writes_nothing(
    manager: CheckpointManager,
) -> None:
    with anyio.fail_after(10):
        checkpoint = await create(manager)
        missing = other_sequence(checkpoint.checkpoint_id, 5)
        with pytest.raises(CheckpointNotFound):
            await manager.create(RUN, {"n": 1}, parent_id=missing)
        await _assert_nothing_written(manager, [0])


async def test_parent_id_of_another_run_raises_checkpoint_not_found(
    manager: CheckpointManager,
) -> None:
    with anyio.fail_after(10):
        await create(manager)
        foreign = await create(manager, OTHER)
        with pytest.raises(CheckpointNotFound):
            await manager.create(RUN, {"n": 1}, parent_id=foreign.checkpoint_id)
        await _assert_nothing_written(manager, [0])


async def test_parent_id_for_a_run_without_checkpoints_raises_checkpoint_not_found(
    manager: CheckpointManager,
) -> None:
    key = _ids.run_key(RUN)
    with anyio.fail_after(10):
        with pytest.raises(CheckpointNotFound):
            await manager.create(RUN, {"n": 1}, parent_id=_ids.checkpoint_id(key, "aaaaaaaa", 0))
        await _assert_nothing_written(manager, [])


@pytest.mark.parametrize("bad_parent", [17, ["ck"]])
async def test_non_str_parent_id_raises_validation_error(
    manager: CheckpointManager, bad_parent: Any
) -> None:
    with anyio.fail_after(10):
        await create(manager)
        with pytest.raises(ValidationError):
            await manager.create(RUN, {"n": 1}, parent_id=bad_parent)
        await _assert_nothing_written(manager, [0])


async def test_deleted_parent_id_raises_checkpoint_not_found(manager: CheckpointManager) -> None:
    with anyio.fail_after(10):
        await create(manager)
        latest = await create(manager)
        assert await manager.delete(latest.checkpoint_id) is True
        with pytest.raises(CheckpointNotFound):
            await manager.create(RUN, {"n": 2}, parent_id=latest.checkpoint_id)
        assert await sequences(manager) == [0]


async def test_expired_parent_id_raises_checkpoint_not_found(
    manager: CheckpointManager, clock: FakeClock
) -> None:
    with anyio.fail_after(10):
        parent = await create(manager, ttl_seconds=10)
        clock.advance(10)
        with pytest.raises(CheckpointNotFound):
            await manager.create(RUN, {"n": 1}, parent_id=parent.checkpoint_id)
        assert await manager.restore(RUN) is None


# -- TTL and expiry ----------------------------------------------------------------------------


async def test_ttl_seconds_per_create_sets_expires_at(
    manager: CheckpointManager, clock: FakeClock
) -> None:
    with anyio.fail_after(10):
        checkpoint = await create(manager, ttl_seconds=30)
        restored = await manager.restore_from(checkpoint.checkpoint_id)

    assert checkpoint.metadata.ttl_seconds == 30
    assert checkpoint.metadata.expires_at == clock.now + 30
    assert restored == checkpoint


async def test_default_ttl_comes_from_config_and_per_create_ttl_overrides_it(
    store: CheckpointStore, clock: FakeClock
) -> None:
    manager = manager_with(store, clock, default_ttl_seconds=60.0)
    with anyio.fail_after(10):
        defaulted = await create(manager)
        explicit = await create(manager, ttl_seconds=5)

    assert defaulted.metadata.ttl_seconds == 60
    assert defaulted.metadata.expires_at == clock.now + 60
    assert explicit.metadata.ttl_seconds == 5
    assert explicit.metadata.expires_at == clock.now + 5


async def test_a_default_ttl_changed_on_the_config_applies_to_the_next_create(
    manager: CheckpointManager, clock: FakeClock
) -> None:
    """FastAgentic reads its config at every create; so does the manager (and checks it
    again: a value set after the config was built was never checked)."""
    with anyio.fail_after(10):
        before = await create(manager)
        manager.config.default_ttl_seconds = 60.0
        after = await create(manager)
        manager.config.default_ttl_seconds = -1.0
        with pytest.raises(ConfigurationError, match="default_ttl_seconds"):
            await create(manager)

    assert before.metadata.ttl_seconds is None
    assert after.metadata.expires_at == clock.now + 60
    assert [c.sequence for c in await manager.list_checkpoints(RUN)] == [1, 0]


async def test_a_default_ttl_below_the_clocks_resolution_refuses_every_create(
    store: CheckpointStore, clock: FakeClock
) -> None:
    """A default that a timestamp of the manager's clock cannot hold (``now + ttl == now``)
    would expire every checkpoint as it is written: each create is refused instead, nothing
    written, as an explicit ``ttl_seconds`` that small is refused. (The config cannot tell:
    a clock at 0 holds it.)"""
    manager = manager_with(store, clock, default_ttl_seconds=1e-7)
    with anyio.fail_after(10):
        with pytest.raises(ConfigurationError, match="resolution"):
            await create(manager)
        manager.config.default_ttl_seconds = None
        with pytest.raises(ValidationError):
            await create(manager, ttl_seconds=1e-7)
        assert await manager.get_run(RUN) is None
        kept = await create(manager, ttl_seconds=60)

    assert await manager.restore(RUN) == kept


async def test_a_store_level_default_ttl_applies_unless_the_config_sets_one(
    store: CheckpointStore, clock: FakeClock
) -> None:
    """FastAgentic-style stores carry a default TTL (SupportsDefaultTTL); the manager applies
    it, so the returned and the restored checkpoint report the same expiry."""

    class WithDefaultTTL(ForwardingStore):
        default_ttl_seconds: float | None = 30.0

    from_store = manager_with(WithDefaultTTL(store), clock)
    from_config = manager_with(WithDefaultTTL(store), clock, default_ttl_seconds=90.0)
    with anyio.fail_after(10):
        created = await create(from_store)
        restored = await from_store.restore(RUN)
        configured = await create(from_config)

    assert created.metadata.ttl_seconds == 30
    assert restored is not None
    assert restored.metadata.expires_at == created.metadata.expires_at == clock.now + 30
    assert configured.metadata.ttl_seconds == 90


@pytest.mark.parametrize("bad_ttl", [0, 0.0, -1, -0.5, math.nan, math.inf, True, False, "10",
                                     1e300, 10**400])
async def test_invalid_ttl_raises_validation_error_and_writes_nothing(
    manager: CheckpointManager, bad_ttl: Any
) -> None:
    with anyio.fail_after(10):
        with pytest.raises(ValidationError):
            await manager.create(RUN, {"n": 1}, ttl_seconds=bad_ttl)
        await _assert_nothing_written(manager, [])
        await create(manager)
        with pytest.raises(ValidationError):
            await manager.create(RUN, {"n": 1}, ttl_seconds=bad_ttl)
        await _assert_nothing_written(manager, [0])


async def test_restore_returns_the_newest_live_checkpoint_when_newer_ones_expired(
    manager: CheckpointManager, clock: FakeClock
) -> None:
    with anyio.fail_after(10):
        durable = await create(manager, state={"i": 0}, ttl_seconds=1000)
        await create(manager, state={"i": 1}, ttl_seconds=10)
        await create(manager, state={"i": 2}, ttl_seconds=20)
        clock.advance(20)  # expiry is inclusive: at expires_at the checkpoint is gone
        restored = await manager.restore(RUN)

    assert restored == durable


async def test_restore_from_an_expired_checkpoint_returns_none(
    manager: CheckpointManager, clock: FakeClock
) -> None:
    with anyio.fail_after(10):
        checkpoint = await create(manager, ttl_seconds=10)
        clock.advance(9.5)
        assert await manager.restore_from(checkpoint.checkpoint_id) == checkpoint
        clock.advance(0.5)
        assert await manager.restore_from(checkpoint.checkpoint_id) is None


async def test_list_checkpoints_omits_expired_unless_include_expired(
    manager: CheckpointManager, clock: FakeClock
) -> None:
    with anyio.fail_after(10):
        await create(manager)
        await create(manager, ttl_seconds=10)
        await create(manager)
        clock.advance(11)
        live = await manager.list_checkpoints(RUN)
        everything = await manager.list_checkpoints(RUN, include_expired=True)

    assert [metadata.sequence for metadata in live] == [2, 0]
    assert [(m.sequence, m.status) for m in everything] == [
        (2, CheckpointStatus.ACTIVE),
        (1, CheckpointStatus.EXPIRED),
        (0, CheckpointStatus.ACTIVE),
    ]


async def test_run_whose_checkpoints_all_expired_disappears_from_run_listings(
    manager: CheckpointManager, clock: FakeClock
) -> None:
    with anyio.fail_after(10):
        await create(manager, RUN, ttl_seconds=10)
        await create(manager, RUN, ttl_seconds=5)
        await create(manager, OTHER)
        assert await manager.count_runs() == 2
        clock.advance(10)
        assert await manager.get_run(RUN) is None
        assert await manager.restore(RUN) is None
        assert [run.run_id for run in await manager.list_runs()] == [OTHER]
        assert await manager.count_runs() == 1
        assert await manager.count_runs(CheckpointStatus.ACTIVE) == 1


async def test_run_created_again_after_expiry_starts_fresh_and_old_ids_stay_dead(
    manager: CheckpointManager, clock: FakeClock
) -> None:
    with anyio.fail_after(10):
        old = await create(manager, ttl_seconds=10)
        clock.advance(10)
        new = await create(manager, state={"n": "new"})
        assert new.metadata.sequence == 0
        assert new.checkpoint_id != old.checkpoint_id
        assert new.metadata.parent_id is None
        assert await manager.restore_from(old.checkpoint_id) is None
        assert await manager.restore(RUN) == new


async def test_cleanup_expired_removes_expired_checkpoints_and_returns_the_count(
    manager: CheckpointManager, clock: FakeClock
) -> None:
    with anyio.fail_after(10):
        await create(manager, RUN, ttl_seconds=10)
        await create(manager, RUN, ttl_seconds=10)
        kept = await create(manager, OTHER)
        await create(manager, OTHER, ttl_seconds=10)
        assert await manager.cleanup_expired() == 0
        clock.advance(10)
        assert await manager.cleanup_expired() == 3
        assert await manager.list_checkpoints(RUN, include_expired=True) == []
        assert await manager.list_checkpoints(OTHER, include_expired=True) == [kept.metadata]
        assert await manager.cleanup_expired() == 0
        assert await manager.restore(OTHER) == kept


# -- pruning -----------------------------------------------------------------------------------


async def test_max_checkpoints_per_run_keeps_the_newest_n(
    store: CheckpointStore, clock: FakeClock
) -> None:
    manager = manager_with(store, clock, max_checkpoints_per_run=3)
    with anyio.fail_after(10):
        created = [await create(manager, state={"i": i}) for i in range(6)]
        listed = await sequences(manager, include_expired=True)
        run = await manager.get_run(RUN)
        assert await manager.restore_from(created[2].checkpoint_id) is None
        assert await manager.restore_from(created[3].checkpoint_id) == created[3]

    assert listed == [5, 4, 3]
    assert run is not None
    assert run.checkpoint_count == 3
    assert run.latest_sequence == 5


async def test_lowered_limit_converges_on_the_next_create(
    store: CheckpointStore, reopen: Callable[[], CheckpointStore], clock: FakeClock
) -> None:
    generous = manager_with(store, clock, max_checkpoints_per_run=10)
    with anyio.fail_after(10):
        for i in range(8):
            await create(generous, state={"i": i})
        strict = manager_with(reopen(), clock, max_checkpoints_per_run=3)
        await create(strict, state={"i": 8})
        assert await sequences(generous, include_expired=True) == [8, 7, 6]
        assert await sequences(strict, include_expired=True) == [8, 7, 6]


@pytest.mark.parametrize("unlimited", [None, 0])
async def test_no_pruning_when_the_limit_is_none_or_zero(
    store: CheckpointStore, clock: FakeClock, unlimited: int | None
) -> None:
    manager = manager_with(store, clock, max_checkpoints_per_run=unlimited)
    with anyio.fail_after(20):
        for i in range(105):
            await create(manager, state={"i": i})
        listed = await sequences(manager, limit=1000)

    assert listed == list(range(104, -1, -1))


async def test_prune_keeps_the_newest_live_checkpoints_across_listing_pages(
    store: CheckpointStore, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("fastcheckpoint._manager._PRUNE_PAGE", 4)  # several pages
    manager = manager_with(store, clock, max_checkpoints_per_run=None)
    with anyio.fail_after(20):
        await create(manager, state={"i": 0}, ttl_seconds=5)  # expires: cleanup's, not prune's
        for i in range(1, 12):
            await create(manager, state={"i": i})
        clock.advance(6)
        removed = await manager.prune(RUN, 3)
        again = await manager.prune(RUN, 3)
        live = await sequences(manager)
        held = await sequences(manager, include_expired=True)
        latest = await manager.restore(RUN)

    assert removed == 8
    assert again == 0
    assert live == [11, 10, 9]
    assert held == [11, 10, 9, 0]
    assert latest is not None
    assert latest.state == {"i": 11}


@pytest.mark.parametrize("keep", [0, -1, True, 2.5, "3"])
async def test_prune_refuses_a_keep_that_is_not_a_positive_integer(
    manager: CheckpointManager, keep: Any
) -> None:
    with anyio.fail_after(10):
        await create(manager)
        with pytest.raises(ValidationError, match="keep"):
            await manager.prune(RUN, keep)
        assert await sequences(manager) == [0]


class _CutPrune(ForwardingStore):
    """Suspends before and after each listing and delete it forwards; the ``at``-th of those
    suspensions (counted from 0) runs ``cut`` first. Counts deletes begun and ended."""

    def __init__(self, inner: CheckpointStore, at: int, cut: Callable[[], object]) -> None:
        super().__init__(inner)
        self.at, self.cut = at, cut
        self.points = self.begun = self.ended = 0

    async def _point(self) -> None:
        if self.points == self.at:
            self.cut()
        self.points += 1
        await anyio.lowlevel.checkpoint()

    async def headers(
        self, run_key: str, *, before: int | None, limit: int, now: float,
        include_expired: bool = False,
    ) -> tuple[list[CheckpointHeader], str | None]:
        await self._point()
        page = await super().headers(run_key, before=before, limit=limit, now=now,
                                     include_expired=include_expired)
        await self._point()
        return page

    async def delete(self, run_key: str, sequence: int, *, checkpoint_id: str) -> bool:
        self.begun += 1
        await self._point()
        deleted = await super().delete(run_key, sequence, checkpoint_id=checkpoint_id)
        await self._point()
        self.ended += 1
        return deleted


async def _cut_prune(store: _CutPrune, manager: CheckpointManager, how: str) -> bool:
    """Prune ``RUN`` to 3 with ``store`` cutting it by ``how``; whether it was cut."""
    if how == "task.cancel":
        task = asyncio.ensure_future(manager.prune(RUN, 3))
        store.cut = task.cancel
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return task.cancelled()
    with anyio.CancelScope() as scope:
        store.cut = scope.cancel
        await manager.prune(RUN, 3)
    return scope.cancelled_caught


@pytest.mark.parametrize("how", ["cancel scope", "task.cancel"])
async def test_a_prune_cut_short_anywhere_removed_the_oldest_surplus_and_no_half_delete(
    store: CheckpointStore, clock: FakeClock, monkeypatch: pytest.MonkeyPatch,
    anyio_backend: str, how: str,
) -> None:
    """Whatever point a cancellation reaches, the checkpoints left are the newest ones in an
    unbroken stretch (the surplus goes oldest first), every delete begun has ended, and a
    second prune finishes the work."""
    if how == "task.cancel" and anyio_backend != "asyncio":
        pytest.skip("asyncio's own cancellation")
    monkeypatch.setattr("fastcheckpoint._manager._PRUNE_PAGE", 4)  # several slices
    with anyio.fail_after(60):
        at = 0
        while True:
            await manager_with(store, clock).delete_run(RUN)
            for i in range(12):
                await create(manager_with(store, clock, max_checkpoints_per_run=None),
                             state={"i": i})
            cutting = _CutPrune(store, at, lambda: None)
            cut = await _cut_prune(cutting, manager_with(cutting, clock), how)
            left = await sequences(manager_with(store, clock))
            assert cutting.begun == cutting.ended, f"cut at point {at}: a delete was cut short"
            assert left == list(range(11, 11 - len(left), -1)), f"cut at point {at}: {left}"
            assert len(left) >= 3
            assert await manager_with(store, clock).prune(RUN, 3) == len(left) - 3
            assert await sequences(manager_with(store, clock)) == [11, 10, 9]
            if not cut:
                break
            at += 1
    assert at > 9 * 2  # every delete's two points were reached


# -- expected sequence ------------------------------------------------------------------------


async def test_expected_sequence_takes_the_next_or_writes_nothing(
    manager: CheckpointManager, reopen: Callable[[], CheckpointStore], clock: FakeClock
) -> None:
    """Two writers that read the run at sequence 0: the first create expecting 1 lands, the
    second is refused with nothing written, also from another process whose memory of the
    run went stale (the file store would otherwise stamp it at the next sequence)."""
    other = manager_with(reopen(), clock)
    with anyio.fail_after(10):
        first = await create(other, expected_sequence=0)  # it remembers the run at 0
        landed = await create(manager, state={"n": 1}, expected_sequence=1)
        with pytest.raises(ConflictError, match="is at sequence 1"):
            await other.create(RUN, {"n": 2}, expected_sequence=1)
        with pytest.raises(ConflictError, match="is at sequence 1"):
            await manager.create(RUN, {"n": 2}, expected_sequence=1)  # its own, in memory
        assert await sequences(manager) == [1, 0]
        restored = await other.restore(RUN)
        again = await create(other, state={"n": 3}, expected_sequence=2)
    assert first.metadata.sequence == 0
    assert restored is not None
    assert restored.checkpoint_id == landed.checkpoint_id
    assert restored.state == {"n": 1}
    assert again.metadata.sequence == 2
    assert again.metadata.parent_id == landed.checkpoint_id


async def test_expected_sequence_zero_needs_a_new_run_and_others_a_live_one(
    manager: CheckpointManager,
) -> None:
    with anyio.fail_after(10):
        with pytest.raises(ConflictError, match="does not exist"):
            await manager.create(RUN, {"n": 0}, expected_sequence=3)
        await create(manager, expected_sequence=0)
        with pytest.raises(ConflictError, match="exists already"):
            await manager.create(RUN, {"n": 1}, expected_sequence=0)
        assert await manager.delete_run(RUN) == 1
        with pytest.raises(ConflictError, match="does not exist"):
            await manager.create(RUN, {"n": 1}, expected_sequence=1)  # it was deleted
        assert await manager.get_run(RUN) is None
        restarted = await create(manager, expected_sequence=0)
    assert restarted.metadata.sequence == 0


@pytest.mark.parametrize("value", [True, -1, 1.0, "1", 2**63])
async def test_expected_sequence_must_be_a_sequence(
    manager: CheckpointManager, value: object
) -> None:
    with anyio.fail_after(10), pytest.raises(ValidationError, match="expected_sequence"):
        await manager.create(RUN, {"n": 0}, expected_sequence=value)  # type: ignore[arg-type]
    assert await manager.get_run(RUN) is None


# -- throttling ---------------------------------------------------------------------------------


async def test_checkpoint_interval_throttles_and_force_bypasses_it(
    store: CheckpointStore, clock: FakeClock
) -> None:
    manager = manager_with(store, clock, checkpoint_interval=5.0)
    with anyio.fail_after(10):
        await create(manager)
        clock.advance(1)
        assert await manager.create(RUN, {"n": 1}) is None
        assert await sequences(manager) == [0]
        forced = await manager.create(RUN, {"n": 2}, force=True)
        assert forced is not None
        assert forced.metadata.sequence == 1
        other = await manager.create(OTHER, {"n": 3})  # throttling is per run
        assert other is not None
        clock.advance(10)
        later = await manager.create(RUN, {"n": 4})
        assert later is not None
        assert later.metadata.sequence == 2


async def test_a_run_deleted_and_started_again_is_not_throttled_by_the_deleted_one(
    store: CheckpointStore, clock: FakeClock
) -> None:
    manager = manager_with(store, clock, checkpoint_interval=60.0)
    with anyio.fail_after(10):
        await create(manager)
        assert await manager.create(RUN, {"n": 1}) is None
        assert await manager.delete_run(RUN) == 1
        again = await manager.create(RUN, {"n": 2})
    assert again is not None
    assert again.metadata.sequence == 0


# -- ids of deleted runs -----------------------------------------------------------------------


async def test_restore_from_id_of_a_deleted_run_never_returns_the_reused_runs_checkpoint(
    manager: CheckpointManager, reopen: Callable[[], CheckpointStore], clock: FakeClock
) -> None:
    with anyio.fail_after(10):
        old = await create(manager, state={"run": "old"})
        assert await manager.delete_run(RUN) == 1
        new = await create(manager, state={"run": "new"})
        bystander = manager_with(reopen(), clock)

        assert new.metadata.sequence == 0
        assert new.checkpoint_id != old.checkpoint_id
        assert await manager.restore_from(old.checkpoint_id) is None
        assert await bystander.restore_from(old.checkpoint_id) is None
        assert await manager.delete(old.checkpoint_id) is False
        assert await manager.restore_from(new.checkpoint_id) == new


# -- isolation ---------------------------------------------------------------------------------


async def test_mutating_inputs_after_create_never_changes_what_is_restored(
    manager: CheckpointManager,
) -> None:
    state: dict[str, Any] = {"plan": ["a"], "nested": {"k": 1}}
    messages: list[Any] = [{"role": "user", "content": "hi"}]
    context: dict[str, Any] = {"c": [1]}
    with anyio.fail_after(10):
        await manager.create(RUN, state, messages=messages, context=context)
        state["plan"].append("b")
        state["nested"]["k"] = 2
        messages[0]["content"] = "changed"
        messages.append({"role": "tool"})
        context["c"].append(2)
        restored = await manager.restore(RUN)

    assert restored is not None
    assert restored.state == {"plan": ["a"], "nested": {"k": 1}}
    assert restored.messages == [{"role": "user", "content": "hi"}]
    assert restored.context == {"c": [1]}


async def test_mutating_a_restored_checkpoint_never_changes_the_next_restore(
    manager: CheckpointManager,
) -> None:
    with anyio.fail_after(10):
        created = await create(manager, state={"plan": ["a"]}, messages=[{"m": 1}])
        first = await manager.restore(RUN)
        assert first is not None
        first.state["plan"].append("mutated")
        first.messages[0]["m"] = 99
        first.tool_calls.append("x")
        second = await manager.restore(RUN)
        third = await manager.restore_from(created.checkpoint_id)

    assert second is not None
    assert second.state == {"plan": ["a"]}
    assert second.messages == [{"m": 1}]
    assert second.tool_calls == []
    assert third == second


async def test_mutating_the_checkpoint_create_returned_never_changes_the_store(
    manager: CheckpointManager,
) -> None:
    with anyio.fail_after(10):
        created = await create(manager, state={"plan": ["a"]})
        created.state["plan"].append("mutated")
        created.messages.append({"m": 1})
        restored = await manager.restore(RUN)

    assert restored is not None
    assert restored.state == {"plan": ["a"]}
    assert restored.messages == []


# -- serialization -----------------------------------------------------------------------------


class Opaque:
    """A type no codec knows."""


async def test_unserializable_state_raises_serialization_error_naming_the_path(
    manager: CheckpointManager,
) -> None:
    state = {"tools": [1, "two", {"three": 3}, {"client": Opaque()}]}
    with anyio.fail_after(10):
        await create(manager)
        with pytest.raises(SerializationError) as caught:
            await manager.create(RUN, state)
        await _assert_nothing_written(manager, [0])
        run = await manager.get_run(RUN)

    assert caught.value.path == "state['tools'][3]['client']"
    assert "state['tools'][3]['client']" in str(caught.value)
    assert run is not None
    assert run.checkpoint_count == 1


@pytest.mark.parametrize(
    ("field", "value", "path"),
    [
        ("messages", [{"role": "user"}, {"content": Opaque()}], "messages[1]['content']"),
        ("tool_calls", [{"args": [0, Opaque()]}], "tool_calls[0]['args'][1]"),
        ("context", {"db": {"conn": Opaque()}}, "context['db']['conn']"),
    ],
)
async def test_unserializable_messages_tool_calls_or_context_name_their_path(
    manager: CheckpointManager, field: str, value: Any, path: str
) -> None:
    with anyio.fail_after(10):
        with pytest.raises(SerializationError) as caught:
            await manager.create(RUN, {"ok": 1}, **{field: value})
        await _assert_nothing_written(manager, [])
        assert await manager.count_runs() == 0
        assert len(await manager.list_runs()) == 0

    assert caught.value.path == path


async def test_datetime_bytes_uuid_and_int_keyed_dicts_round_trip_exactly(
    manager: CheckpointManager,
) -> None:
    when = dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone.utc)
    ident = uuid.uuid4()
    state = {
        "when": when,
        "blob": b"\x00\xff binary",
        "id": ident,
        "ids": [uuid.uuid4(), {"nested": uuid.uuid4()}],
        "by_step": {1: "one", 2: {3: "three"}, -4: [b"x"]},
    }
    messages = [{"at": when, "raw": b"\x01"}]
    tool_calls = [{"call_id": ident}]
    context = {"counts": {7: 8}}
    with anyio.fail_after(10):
        await manager.create(RUN, state, messages=messages, tool_calls=tool_calls, context=context)
        restored = await manager.restore(RUN)

    assert restored is not None
    assert restored.state == state
    assert type(restored.state["when"]) is dt.datetime
    assert type(restored.state["blob"]) is bytes
    assert type(restored.state["id"]) is uuid.UUID
    assert type(restored.state["ids"][1]["nested"]) is uuid.UUID
    assert list(restored.state["by_step"]) == [1, 2, -4]
    assert restored.messages == messages
    assert restored.tool_calls == tool_calls
    assert restored.context == context


class Point:
    """A plain user class: only the hooks know how to store it."""

    def __init__(self, x: int, y: int) -> None:
        self.x = x
        self.y = y

    def __eq__(self, other: object) -> bool:
        return type(other) is Point and (other.x, other.y) == (self.x, self.y)

    def __hash__(self) -> int:
        return hash((self.x, self.y))

    def __repr__(self) -> str:
        return f"Point({self.x}, {self.y})"


@dataclass(frozen=True)
class Span:
    """A dataclass: msgspec could flatten it to a dict on its own, which would not round trip."""

    start: int
    end: int


def encode_user_types(obj: Any) -> Any:
    if isinstance(obj, Point):
        return [obj.x, obj.y]
    if isinstance(obj, Span):
        return [obj.start, obj.end]
    raise NotImplementedError


def decode_user_types(type_name: str, value: Any) -> Any:
    if type_name.endswith(".Point"):
        return Point(*value)
    if type_name.endswith(".Span"):
        return Span(*value)
    return value


async def test_enc_hook_and_dec_hook_round_trip_a_custom_class(
    store: CheckpointStore, clock: FakeClock
) -> None:
    manager = manager_with(store, clock, enc_hook=encode_user_types, dec_hook=decode_user_types)
    state = {"origin": Point(0, 0), "path": [Point(1, 2), {"end": Point(3, 4)}]}
    with anyio.fail_after(10):
        created = await create(manager, state=state, messages=[Point(5, 6)])
        restored = await manager.restore_from(created.checkpoint_id)

    assert restored is not None
    assert restored.state == state
    assert restored.messages == [Point(5, 6)]


async def test_enc_hook_and_dec_hook_round_trip_a_dataclass(
    store: CheckpointStore, clock: FakeClock
) -> None:
    manager = manager_with(store, clock, enc_hook=encode_user_types, dec_hook=decode_user_types)
    state = {"span": Span(1, 5), "spans": [Span(6, 9)]}
    with anyio.fail_after(10):
        created = await create(manager, state=state)
        restored = await manager.restore_from(created.checkpoint_id)

    assert restored is not None
    assert restored.state == state


@pytest.mark.parametrize("offload_min_bytes", [1024, 512 * 1024 * 1024])
async def test_large_state_round_trips(
    store: CheckpointStore, clock: FakeClock, offload_min_bytes: int
) -> None:
    manager = manager_with(
        store, clock, offload_min_bytes=offload_min_bytes, compress_min_bytes=1024
    )
    compressible = {"text": "agent memory " * (2 * 1024 * 1024 // 13), "i": 0}
    incompressible = {"raw": os.urandom(2 * 1024 * 1024), "i": 1}
    with anyio.fail_after(20):
        first = await create(manager, state=compressible)
        second = await create(manager, state=incompressible)
        restored_first = await manager.restore_from(first.checkpoint_id)
        restored_second = await manager.restore(RUN)

    assert restored_first is not None
    assert restored_first.state == compressible
    assert restored_second is not None
    assert restored_second.state == incompressible
    assert restored_second.checkpoint_id == second.checkpoint_id


class Marker:
    """Goes through the hooks, so the hooks can report which thread encodes and decodes."""


def _recording_hooks() -> tuple[list[int], list[int], Callable[[Any], Any], Callable[..., Any]]:
    encoded_on: list[int] = []
    decoded_on: list[int] = []

    def enc_hook(obj: Any) -> Any:
        if isinstance(obj, Marker):
            encoded_on.append(threading.get_ident())
            return "marker"
        raise NotImplementedError

    def dec_hook(type_name: str, value: Any) -> Any:
        decoded_on.append(threading.get_ident())
        return Marker()

    return encoded_on, decoded_on, enc_hook, dec_hook


async def test_encoding_a_large_state_runs_off_the_event_loop(
    store: CheckpointStore, clock: FakeClock
) -> None:
    encoded_on, _, enc_hook, dec_hook = _recording_hooks()
    manager = manager_with(
        store, clock, offload_min_bytes=64 * 1024, enc_hook=enc_hook, dec_hook=dec_hook
    )
    with anyio.fail_after(20):
        # The first create of the run in this process: no earlier payload size to go by.
        await create(manager, state={"raw": os.urandom(2 * 1024 * 1024), "marker": Marker()})

    assert encoded_on
    assert threading.get_ident() not in encoded_on


async def test_decoding_a_large_state_runs_off_the_event_loop(
    store: CheckpointStore, clock: FakeClock
) -> None:
    _, decoded_on, enc_hook, dec_hook = _recording_hooks()
    manager = manager_with(
        store, clock, offload_min_bytes=64 * 1024, enc_hook=enc_hook, dec_hook=dec_hook
    )
    with anyio.fail_after(20):
        await create(manager, state={"raw": os.urandom(2 * 1024 * 1024), "marker": Marker()})
        restored = await manager.restore(RUN)

    assert restored is not None
    assert isinstance(restored.state["marker"], Marker)
    assert decoded_on
    assert threading.get_ident() not in decoded_on


# -- run ids --------------------------------------------------------------------------------------


INVALID_RUN_IDS = [
    pytest.param("", id="empty"),
    pytest.param(123, id="int"),
    pytest.param(None, id="none"),
    pytest.param(b"run", id="bytes"),
    pytest.param("a\ud800b", id="lone-surrogate"),
    pytest.param("x" * 4097, id="4097-bytes"),
    pytest.param("é" * 2049, id="4098-bytes-of-utf8"),
]


@pytest.mark.parametrize("run_id", INVALID_RUN_IDS)
async def test_invalid_run_ids_raise_validation_error(
    manager: CheckpointManager, run_id: Any
) -> None:
    with anyio.fail_after(10):
        with pytest.raises(ValidationError):
            await manager.create(run_id, {"n": 1})
        with pytest.raises(ValidationError):
            await manager.restore(run_id)
        with pytest.raises(ValidationError):
            await manager.list_checkpoints(run_id)
        with pytest.raises(ValidationError):
            await manager.get_run(run_id)
        with pytest.raises(ValidationError):
            await manager.delete_run(run_id)
        with pytest.raises(ValidationError):
            await manager.mark_completed(run_id)
        assert await manager.count_runs() == 0


async def test_run_id_of_exactly_4096_bytes_is_accepted(manager: CheckpointManager) -> None:
    run_id = "é" * 2048
    with anyio.fail_after(10):
        created = await create(manager, run_id)
        assert await manager.restore(run_id) == created


def entries(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


HOSTILE_RUN_IDS = [
    "../x",
    "../../etc/passwd",
    "/etc/passwd",
    "a\x00b",
    "a",
    "A",
    ".",
    "..",
    "a/b",
    "a\\b",
    "CON",
    "nul.txt",
    " ",
    "ünïcødé 🚀 名前",
    "\u0301\u200b\ufeff",
    "k" * 1024,
    "ü" * 512,
]


async def test_hostile_run_ids_work_and_stay_distinct(
    manager: CheckpointManager, tmp_path: Path
) -> None:
    with anyio.fail_after(20):
        for index, run_id in enumerate(HOSTILE_RUN_IDS):
            await create(manager, run_id, state={"index": index, "run_id": run_id})
        for index, run_id in enumerate(HOSTILE_RUN_IDS):
            restored = await manager.restore(run_id)
            assert restored is not None
            assert restored.state == {"index": index, "run_id": run_id}
            assert restored.run_id == run_id
            assert restored.metadata.sequence == 0
            run = await manager.get_run(run_id)
            assert run is not None
            assert run.run_id == run_id
        listed = {run.run_id for run in await manager.list_runs(limit=100)}

    assert listed == set(HOSTILE_RUN_IDS)
    assert entries(tmp_path) in ([], ["store"])  # nothing escaped the store's directory


# -- status ------------------------------------------------------------------------------------


async def test_mark_completed_twice_is_fine(manager: CheckpointManager) -> None:
    with anyio.fail_after(10):
        await create(manager)
        first = await manager.mark_completed(RUN)
        second = await manager.mark_completed(RUN)

    assert first is not None
    assert second is not None
    assert second.status is CheckpointStatus.COMPLETED


async def test_completed_run_cannot_be_marked_failed(manager: CheckpointManager) -> None:
    with anyio.fail_after(10):
        await create(manager)
        await manager.mark_completed(RUN)
        with pytest.raises(ConflictError):
            await manager.mark_failed(RUN, "too late")
        run = await manager.get_run(RUN)

    assert run is not None
    assert run.status is CheckpointStatus.COMPLETED
    assert run.error is None


async def test_failed_run_cannot_be_marked_completed(manager: CheckpointManager) -> None:
    with anyio.fail_after(10):
        await create(manager)
        await manager.mark_failed(RUN, "boom")
        with pytest.raises(ConflictError):
            await manager.mark_completed(RUN)
        run = await manager.get_run(RUN)

    assert run is not None
    assert run.status is CheckpointStatus.FAILED


async def race(
    **changes: Callable[[], Awaitable[RunInfo | None]]
) -> dict[str, CheckpointStatus | None]:
    """Run status changes at once; each one's resulting status, or None if it lost."""
    outcomes: dict[str, CheckpointStatus | None] = {}

    async def attempt(name: str, change: Callable[[], Awaitable[RunInfo | None]]) -> None:
        try:
            info = await change()
        except ConflictError:
            outcomes[name] = None
        else:
            assert info is not None
            outcomes[name] = info.status

    async with anyio.create_task_group() as task_group:
        for name, change in changes.items():
            task_group.start_soon(attempt, name, change)
    return outcomes


async def test_concurrent_complete_and_fail_from_two_managers_let_exactly_one_win(
    store: CheckpointStore, reopen: Callable[[], CheckpointStore], clock: FakeClock
) -> None:
    first = manager_with(store, clock)
    second = manager_with(reopen(), clock)

    with anyio.fail_after(10):
        await create(first)
        outcomes = await race(complete=functools.partial(first.mark_completed, RUN),
                              fail=functools.partial(second.mark_failed, RUN, "x"))
        run = await first.get_run(RUN)

    winners = [status for status in outcomes.values() if status is not None]
    assert len(outcomes) == 2
    assert len(winners) == 1
    assert run is not None
    assert run.status is winners[0]
    assert len(run.history) == 1


async def test_every_checkpoint_read_after_mark_completed_reports_completed(
    manager: CheckpointManager,
) -> None:
    with anyio.fail_after(10):
        created = [await create(manager, state={"i": i}) for i in range(3)]
        await manager.mark_completed(RUN)
        latest = await manager.restore(RUN)
        by_id = [await manager.restore_from(c.checkpoint_id) for c in created]
        listed = await manager.list_checkpoints(RUN)
        lineage = await manager.lineage(created[2].checkpoint_id)

    assert latest is not None
    assert latest.metadata.status is CheckpointStatus.COMPLETED
    assert [c.metadata.status if c else None for c in by_id] == [CheckpointStatus.COMPLETED] * 3
    assert [m.status for m in listed] == [CheckpointStatus.COMPLETED] * 3
    assert [m.status for m in lineage] == [CheckpointStatus.COMPLETED] * 3


async def test_status_change_never_alters_checkpoints_or_their_expiry(
    manager: CheckpointManager, clock: FakeClock
) -> None:
    with anyio.fail_after(10):
        created = await create(manager, state={"k": "v"}, ttl_seconds=100, tags=["x"])
        clock.advance(1)
        await manager.mark_failed(RUN, "boom")
        after = await manager.restore_from(created.checkpoint_id)
        assert after is not None
        assert after.metadata == msgspec.structs.replace(
            created.metadata, status=CheckpointStatus.FAILED
        )
        assert after.state == created.state
        clock.advance(99)
        assert await manager.restore_from(created.checkpoint_id) is None
        assert await manager.get_run(RUN) is None


async def test_get_run_reports_its_fields(manager: CheckpointManager, clock: FakeClock) -> None:
    started = clock.now
    with anyio.fail_after(10):
        await create(manager)
        clock.advance(5)
        await create(manager)
        clock.advance(2)
        fresh = await manager.get_run(RUN)
        clock.advance(3)
        await manager.mark_failed(RUN, error="tool crashed")
        failed = await manager.get_run(RUN)

    assert fresh is not None
    assert fresh.run_id == RUN
    assert fresh.status is CheckpointStatus.ACTIVE
    assert fresh.created_at == started
    assert fresh.updated_at == started + 5
    assert fresh.latest_sequence == 1
    assert fresh.checkpoint_count == 2
    assert fresh.error is None
    assert failed is not None
    assert failed.status is CheckpointStatus.FAILED
    assert failed.created_at == started
    assert failed.updated_at == started + 10
    assert failed.latest_sequence == 1
    assert failed.checkpoint_count == 2
    assert failed.error == "tool crashed"
    assert failed.history[-1].status is CheckpointStatus.FAILED
    assert failed.history[-1].at == started + 10
    assert failed.history[-1].note == "tool crashed"


# -- human in the loop -------------------------------------------------------------------------


async def test_pause_records_the_request_and_queues_the_run_without_checkpointing(
    manager: CheckpointManager, clock: FakeClock
) -> None:
    request = {"action": "refund", "amount": 120.5, "lines": [{"sku": "A-1", "qty": 2}]}
    with anyio.fail_after(10):
        created = await create(manager)
        await create(manager, OTHER)
        clock.advance(5)
        paused = await manager.pause(RUN, request=request)
        request["amount"] = 0  # the caller's dict is copied, not kept
        run = await manager.get_run(RUN)
        queue = await manager.list_runs(status=CheckpointStatus.PAUSED)
        pending = await manager.count_runs(CheckpointStatus.PAUSED)
        latest = await manager.restore(RUN)

    assert paused is not None
    assert paused == run
    assert run.status is CheckpointStatus.PAUSED
    assert run.approval == {
        "request": {"action": "refund", "amount": 120.5, "lines": [{"sku": "A-1", "qty": 2}]},
        "requested_at": clock.now,
    }
    assert run.latest_sequence == created.metadata.sequence  # pausing checkpoints nothing
    assert run.checkpoint_count == 1
    assert [(c.status, c.at, c.actor, c.note) for c in run.history] == [
        (CheckpointStatus.PAUSED, clock.now, None,
         '{"action":"refund","amount":120.5,"lines":[{"sku":"A-1","qty":2}]}')]
    assert [info.run_id for info in queue] == [RUN]
    assert pending == 1
    assert latest is not None
    assert latest.metadata.status is CheckpointStatus.PAUSED


async def test_approve_reactivates_the_run_and_records_who_when_and_why(
    manager: CheckpointManager, clock: FakeClock
) -> None:
    with anyio.fail_after(10):
        await create(manager)
        await manager.pause(RUN, request={"question": "send the email?"})
        paused_at = clock.now
        clock.advance(60)
        approved = await manager.approve(RUN, approver="ana@example.com", comment="looks right")
        queue = await manager.list_runs(status=CheckpointStatus.PAUSED)
        after = await create(manager)

    assert approved is not None
    assert approved.status is CheckpointStatus.ACTIVE
    assert approved.approval == {
        "request": {"question": "send the email?"}, "requested_at": paused_at,
        "decision": "approved", "decided_by": "ana@example.com", "decided_at": clock.now,
        "comment": "looks right",
    }
    assert [(c.status, c.actor, c.note) for c in approved.history] == [
        (CheckpointStatus.PAUSED, None, '{"question":"send the email?"}'),
        (CheckpointStatus.ACTIVE, "ana@example.com", "looks right"),
    ]
    assert approved.history[-1].at == clock.now
    assert list(queue) == []
    assert after.metadata.status is CheckpointStatus.ACTIVE


async def test_reject_ends_the_run_and_a_retried_reject_returns_it_unchanged(
    manager: CheckpointManager, clock: FakeClock
) -> None:
    with anyio.fail_after(10):
        await create(manager)
        await manager.pause(RUN)
        clock.advance(1)
        rejected = await manager.reject(RUN, approver="bo", reason="amount too high")
        clock.advance(1)
        again = await manager.reject(RUN, approver="someone else", reason="x")
        with pytest.raises(ConflictError):
            await manager.approve(RUN, approver="bo")
        with pytest.raises(ConflictError):
            await manager.pause(RUN)
        latest = await manager.restore(RUN)

    assert rejected is not None
    assert rejected.status is CheckpointStatus.REJECTED
    assert rejected.approval == {
        "request": {}, "requested_at": clock.now - 2, "decision": "rejected",
        "decided_by": "bo", "decided_at": clock.now - 1, "reason": "amount too high",
    }
    assert again == rejected
    assert latest is not None
    assert latest.metadata.status is CheckpointStatus.REJECTED


class _LosesAnUpdateReply(ForwardingStore):
    """The next ``update_run`` is applied, then fails as if its reply was lost."""

    lose = False

    async def update_run(self, run_key: str, **options: Any) -> RunRecord:
        updated: RunRecord = await self.inner.update_run(run_key, **options)
        if self.lose:
            self.lose = False
            raise StoreUnavailableError("the reply was lost")
        return updated


@pytest.mark.parametrize("with_request", [False, True])
async def test_a_decision_made_again_after_its_reply_was_lost_returns_the_run(
    clock: FakeClock, with_request: bool
) -> None:
    """The approval landed but its caller saw an error: the same call again (same approver,
    comment and request) returns the run as decided, once in its history; another
    approver's approval is refused."""
    store = _LosesAnUpdateReply(MemoryStore())
    manager = CheckpointManager(store, config=make_config(clock))  # type: ignore[arg-type]
    with anyio.fail_after(10):
        await create(manager)
        paused = await manager.pause(RUN, request={"amount": 5})
        assert paused is not None
        assert paused.approval is not None
        seen = paused.approval["requested_at"] if with_request else None
        store.lose = True
        with pytest.raises(StoreUnavailableError):
            await manager.approve(RUN, approver="ana", comment="ok", requested_at=seen)
        again = await manager.approve(RUN, approver="ana", comment="ok", requested_at=seen)
        with pytest.raises(ConflictError, match="not awaiting approval"):
            await manager.approve(RUN, approver="bo", comment="ok", requested_at=seen)
    assert again.status is CheckpointStatus.ACTIVE
    assert again.approval is not None
    assert (again.approval["decided_by"], again.approval["comment"]) == ("ana", "ok")
    assert [entry.status for entry in again.history] == [
        CheckpointStatus.PAUSED, CheckpointStatus.ACTIVE]


async def test_every_request_stays_in_the_history_and_a_decision_can_name_its_request(
    manager: CheckpointManager, clock: FakeClock
) -> None:
    with anyio.fail_after(10):
        await create(manager)
        first = await manager.pause(RUN, request={"amount": 1})
        assert first is not None
        assert first.approval is not None
        seen = first.approval["requested_at"]
        await manager.approve(RUN, approver="ana", requested_at=seen)
        clock.advance(5)
        await manager.pause(RUN, request={"amount": 9999})
        with pytest.raises(ConflictError, match="read the run again"):
            await manager.approve(RUN, approver="ana", requested_at=seen)  # a stale screen
        run = await manager.get_run(RUN)

    assert run is not None
    assert run.status is CheckpointStatus.PAUSED
    assert [(c.status, c.note) for c in run.history] == [
        (CheckpointStatus.PAUSED, '{"amount":1}'),
        (CheckpointStatus.ACTIVE, ""),
        (CheckpointStatus.PAUSED, '{"amount":9999}'),
    ]
    with anyio.fail_after(10):
        assert run.approval is not None
        current = run.approval["requested_at"]
        rejected = await manager.reject(RUN, approver="bo", requested_at=current)
        again = await manager.reject(RUN, approver="bo", requested_at=current)  # a retry
        with pytest.raises(ConflictError, match="read the run again"):
            await manager.reject(RUN, approver="ana", requested_at=seen)  # decided, not hers
    assert again == rejected


@pytest.mark.parametrize("decide", ["approve", "reject"])
async def test_deciding_on_a_run_that_is_not_paused_is_a_conflict(
    manager: CheckpointManager, decide: str
) -> None:
    with anyio.fail_after(10):
        await create(manager)
        with pytest.raises(ConflictError, match=r"is not awaiting approval \(it is active\)"):
            await getattr(manager, decide)(RUN, approver="ana")
        run = await manager.get_run(RUN)

    assert run is not None
    assert run.status is CheckpointStatus.ACTIVE
    assert run.approval is None
    assert run.history == []


async def test_a_paused_or_finished_run_cannot_be_paused(manager: CheckpointManager) -> None:
    with anyio.fail_after(10):
        await create(manager)
        await create(manager, OTHER)
        await manager.pause(RUN, request={"n": 1})
        with pytest.raises(ConflictError, match="paused"):
            await manager.pause(RUN, request={"n": 2})
        await manager.mark_completed(OTHER)
        with pytest.raises(ConflictError, match="completed"):
            await manager.pause(OTHER)
        run = await manager.get_run(RUN)

    assert run is not None
    assert run.approval is not None
    assert run.approval["request"] == {"n": 1}  # the pending request was not replaced


async def test_a_pause_on_the_latest_sequence_pauses_while_no_checkpoint_came_after(
    manager: CheckpointManager,
) -> None:
    with anyio.fail_after(10):
        await create(manager)
        asked = await create(manager, state={"n": 1})
        paused = await manager.pause(RUN, {"n": 1}, latest_sequence=asked.metadata.sequence)

    assert paused.status is CheckpointStatus.PAUSED
    assert paused.latest_sequence == asked.metadata.sequence == 1


async def test_a_pause_on_the_latest_sequence_is_refused_after_a_newer_checkpoint(
    manager: CheckpointManager,
) -> None:
    with anyio.fail_after(10):
        asked = await create(manager)
        await create(manager, state={"n": 1})  # another worker went on
        before = await manager.get_run(RUN)
        with pytest.raises(ConflictError, match="newer checkpoints: its latest is 1, not 0"):
            await manager.pause(RUN, {"n": 0}, latest_sequence=asked.metadata.sequence)
        after = await manager.get_run(RUN)

    assert after == before
    assert after is not None
    assert (after.status, after.approval, after.history) == (CheckpointStatus.ACTIVE, None, [])


class _CreatesAfterTheRead(MemoryStore):
    """A store where another worker's checkpoint lands between the manager's read of a run
    and its status change: the interleaving only the store can see."""

    def __init__(self) -> None:
        super().__init__()
        self.between: Callable[[], Awaitable[object]] | None = None

    async def get_run(self, run_key: str, *, now: float) -> RunRecord | None:
        record = await super().get_run(run_key, now=now)
        between, self.between = self.between, None
        if between is not None:
            await between()
        return record


async def test_a_checkpoint_landing_between_the_read_and_the_pause_is_seen_by_the_store(
    clock: FakeClock,
) -> None:
    store = _CreatesAfterTheRead()
    manager = CheckpointManager(store, config=make_config(clock))
    other = CheckpointManager(store, config=make_config(clock))
    with anyio.fail_after(10):
        asked = await create(manager)
        store.between = functools.partial(create, other, state={"n": 1})
        with pytest.raises(ConflictError, match="newer checkpoints"):
            await manager.pause(RUN, {"n": 0}, latest_sequence=asked.metadata.sequence)
        run = await manager.get_run(RUN)

    assert run is not None
    assert (run.status, run.latest_sequence, run.history) == (CheckpointStatus.ACTIVE, 1, [])


class _OlderUpdateRun(MemoryStore):
    """A store written for the ``update_run`` signature without ``latest_sequence``."""

    async def update_run(  # type: ignore[override]
        self, run_key: str, *, incarnation: str, version: int, status: str, data: bytes,
        now: float,
    ) -> RunRecord:
        return await super().update_run(run_key, incarnation=incarnation, version=version,
                                        status=status, data=data, now=now)


@pytest.mark.parametrize("older", [_OlderUpdateRun, ForwardingStore])
async def test_a_store_without_the_guard_refuses_it_with_a_configuration_error(
    clock: FakeClock, older: Any
) -> None:
    store = older() if older is _OlderUpdateRun else older(MemoryStore())
    manager = CheckpointManager(store, config=make_config(clock))
    with anyio.fail_after(10):
        asked = await create(manager)
        with pytest.raises(ConfigurationError, match="SupportsSequenceGuard"):
            await manager.pause(RUN, {"n": 0}, latest_sequence=asked.metadata.sequence)
        unchanged = await manager.get_run(RUN)
        paused = await manager.pause(RUN, {"n": 0})  # without the guard, as before

    assert unchanged is not None
    assert unchanged.status is CheckpointStatus.ACTIVE
    assert paused.status is CheckpointStatus.PAUSED


@pytest.mark.parametrize("value", [-1, "0", 1.0, True])
async def test_a_pause_on_a_latest_sequence_that_is_not_one_is_refused(
    manager: CheckpointManager, value: Any
) -> None:
    with anyio.fail_after(10):
        await create(manager)
        with pytest.raises(ValidationError, match="latest_sequence"):
            await manager.pause(RUN, {"n": 0}, latest_sequence=value)
        run = await manager.get_run(RUN)

    assert run is not None
    assert run.status is CheckpointStatus.ACTIVE


async def test_human_in_the_loop_calls_on_an_unknown_run_raise_not_found(
    manager: CheckpointManager,
) -> None:
    with anyio.fail_after(10):
        with pytest.raises(CheckpointNotFound, match="does not exist"):
            await manager.pause(RUN, request={"a": 1})
        with pytest.raises(CheckpointNotFound):
            await manager.approve(RUN, approver="ana")
        with pytest.raises(CheckpointNotFound):
            await manager.reject(RUN, approver="ana")
        assert await manager.get_run(RUN) is None


@pytest.mark.parametrize(
    "request_value",
    [
        pytest.param(["not", "a", "dict"], id="list"),
        pytest.param({1: "int key"}, id="int-key"),
        pytest.param({"steps": ("a", "b")}, id="tuple"),
        pytest.param({"id": uuid.UUID(int=1)}, id="uuid"),
        pytest.param({"when": dt.date(2024, 1, 1)}, id="date"),
        pytest.param({"blob": b"x"}, id="bytes"),
        pytest.param({"obj": object()}, id="object"),
    ],
)
async def test_a_request_that_is_not_json_is_refused_and_nothing_changes(
    manager: CheckpointManager, request_value: Any
) -> None:
    with anyio.fail_after(10):
        await create(manager)
        with pytest.raises(ValidationError, match="request"):
            await manager.pause(RUN, request=request_value)
        run = await manager.get_run(RUN)

    assert run is not None
    assert run.status is CheckpointStatus.ACTIVE
    assert run.approval is None


async def test_a_refused_request_names_the_path_of_the_bad_value(
    manager: CheckpointManager,
) -> None:
    with anyio.fail_after(10):
        await create(manager)
        with pytest.raises(ValidationError, match=r"request\['steps'\]\[1\] is a builtins.tuple"):
            await manager.pause(RUN, request={"steps": [1, ("a", "b")]})


@pytest.mark.parametrize("approver", ["", None, 7])
async def test_a_decision_needs_an_approver(manager: CheckpointManager, approver: Any) -> None:
    with anyio.fail_after(10):
        await create(manager)
        await manager.pause(RUN)
        with pytest.raises(ValidationError, match="approver"):
            await manager.approve(RUN, approver=approver)
        run = await manager.get_run(RUN)

    assert run is not None
    assert run.status is CheckpointStatus.PAUSED


async def test_concurrent_approve_and_reject_from_two_managers_let_exactly_one_decide(
    store: CheckpointStore, reopen: Callable[[], CheckpointStore], clock: FakeClock
) -> None:
    first = manager_with(store, clock)
    second = manager_with(reopen(), clock)

    with anyio.fail_after(10):
        await create(first)
        await first.pause(RUN, request={"q": 1})
        outcomes = await race(approve=functools.partial(first.approve, RUN, approver="ana"),
                              reject=functools.partial(second.reject, RUN, approver="bo"))
        run = await first.get_run(RUN)

    winners = [status for status in outcomes.values() if status is not None]
    assert len(outcomes) == 2
    assert len(winners) == 1
    assert run is not None
    assert run.status is winners[0]
    assert run.approval is not None
    assert run.approval["decided_by"] == ("ana" if winners[0] is CheckpointStatus.ACTIVE
                                          else "bo")
    assert [change.status for change in run.history] == [CheckpointStatus.PAUSED, winners[0]]


# -- audit export ------------------------------------------------------------------------------


async def export(manager: CheckpointManager, run_id: str = RUN, **options: Any) -> list[str]:
    with anyio.fail_after(10):
        return [chunk async for chunk in manager.export_run(run_id, **options)]


async def reviewed_run(manager: CheckpointManager, clock: FakeClock, steps: int = 3) -> None:
    """A run with ``steps`` checkpoints, paused for a refund and approved."""
    with anyio.fail_after(10):
        for step in range(steps):
            clock.advance(1)
            await manager.create(RUN, {"step": step, "order": uuid.UUID(int=17)},
                                 messages=[{"role": "user", "content": f"turn {step}"}],
                                 step_name=f"step {step}", tags=["refund"], force=True)
        clock.advance(1)
        await manager.pause(RUN, request={"action": "refund", "amount": 120.5})
        clock.advance(1)
        await manager.approve(RUN, approver="ana@example.com", comment="within policy")


async def test_json_export_holds_the_run_and_every_checkpoint_newest_first(
    manager: CheckpointManager, clock: FakeClock
) -> None:
    await reviewed_run(manager, clock)

    document = json.loads("".join(await export(manager)))
    run = await manager.get_run(RUN)
    listed = await manager.list_checkpoints(RUN)

    assert run is not None
    expected_run = json.loads(json.dumps(run.to_dict()))
    for name in ("created_at", "updated_at"):
        expected_run[name] = _export.when(expected_run[name])
    for change in expected_run["history"]:
        change["at"] = _export.when(change["at"])
    for name in ("requested_at", "decided_at"):
        expected_run["approval"][name] = _export.when(expected_run["approval"][name])
    assert document["run"] == expected_run
    assert document["run"]["created_at"].endswith("Z")
    assert document["run"]["approval"]["decided_by"] == "ana@example.com"
    assert [c["status"] for c in document["run"]["history"]] == ["paused", "active"]
    assert document["checkpoints"] == [
        {**metadata.to_dict(), "created_at": _export.when(metadata.created_at)}
        for metadata in listed
    ]
    assert [c["sequence"] for c in document["checkpoints"]] == [2, 1, 0]
    assert "content" not in document["checkpoints"][0]


async def test_json_export_with_state_carries_each_checkpoint_content(
    manager: CheckpointManager, clock: FakeClock
) -> None:
    await reviewed_run(manager, clock, steps=2)

    document = json.loads("".join(await export(manager, include_state=True)))

    assert [c["content"] for c in document["checkpoints"]] == [
        {"state": {"step": step, "order": str(uuid.UUID(int=17))},
         "messages": [{"role": "user", "content": f"turn {step}"}],
         "tool_calls": [], "context": {}}
        for step in (1, 0)
    ]


async def test_export_streams_one_chunk_per_checkpoint_and_reads_in_pages(
    manager: CheckpointManager, clock: FakeClock
) -> None:
    await reviewed_run(manager, clock, steps=7)

    chunks = await export(manager, page_size=3)
    document = json.loads("".join(chunks))

    assert [c["sequence"] for c in document["checkpoints"]] == [6, 5, 4, 3, 2, 1, 0]
    assert len(chunks) == 7 + 2  # the run, each checkpoint, the closing bracket
    assert max(len(chunk) for chunk in chunks[1:-1]) < 1_000


async def test_csv_export_has_the_run_its_status_changes_and_its_checkpoints(
    manager: CheckpointManager, clock: FakeClock
) -> None:
    await reviewed_run(manager, clock, steps=2)

    rows = list(csv.DictReader(io.StringIO("".join(await export(manager, format="csv",
                                                                  include_state=True)))))

    assert [row["record"] for row in rows] == [
        "run", "status_change", "status_change", "checkpoint", "checkpoint"]
    assert rows[0]["status"] == "active"
    assert json.loads(rows[0]["data"])["approval"]["request"] == {
        "action": "refund", "amount": 120.5}
    assert (rows[2]["status"], rows[2]["actor"], rows[2]["note"]) == (
        "active", "ana@example.com", "within policy")
    assert rows[2]["at"].endswith("Z")
    assert [row["sequence"] for row in rows[3:]] == ["1", "0"]
    assert [row["step_name"] for row in rows[3:]] == ["step 1", "step 0"]
    assert json.loads(rows[3]["tags"]) == ["refund"]
    assert json.loads(rows[3]["data"])["state"]["step"] == 1


async def test_markdown_export_escapes_table_cells_and_fences_content(
    manager: CheckpointManager,
) -> None:
    with anyio.fail_after(10):
        await manager.create(RUN, {"note": "a ``` fence and a | pipe"},
                             step_name="plan | draft\nnext", tags=["a|b"])
        await manager.mark_failed(RUN, "tool | crashed")

    table = "".join(await export(manager, format="markdown"))
    detailed = "".join(await export(manager, format="markdown", include_state=True))

    assert table.startswith(f"# Run `{RUN}`\n")
    assert "| status | failed |" in table
    assert "| error | tool \\| crashed |" in table
    assert "| `plan \\| draft\\nnext` |" in table  # a code span, the line break escaped
    assert "| `a\\|b` |" in table
    assert "### Checkpoint 0" in detailed
    assert "````json\n" in detailed  # longer than the ``` inside the state
    assert '"note": "a ``` fence and a | pipe"' in detailed


async def test_expired_checkpoints_still_held_are_exported_as_expired(
    manager: CheckpointManager, clock: FakeClock
) -> None:
    with anyio.fail_after(10):
        await manager.create(RUN, {"n": 0}, ttl_seconds=10)
        await manager.create(RUN, {"n": 1}, force=True)
        clock.advance(11)

    document = json.loads("".join(await export(manager, include_state=True)))

    assert [(c["sequence"], c["status"]) for c in document["checkpoints"]] == [
        (1, "active"), (0, "expired")]
    assert document["checkpoints"][1]["content"] is None


async def test_export_goes_on_past_a_corrupt_checkpoint_and_content_json_cannot_say(
    store: CheckpointStore, clock: FakeClock
) -> None:
    manager = manager_with(store, clock)
    with anyio.fail_after(10):
        await manager.create(RUN, {(1, 2): "tuple key", "n": 0, uuid.UUID(int=7): "uuid key"})
        await manager.create(RUN, {"n": 1}, force=True)
        await manager.create(RUN, {"n": 2}, force=True)

    class OneCorrupt(ForwardingStore):
        async def get(self, run_key: str, sequence: int, *, now: float) -> Any:
            if sequence == 1:
                raise CorruptCheckpointError("payload checksum mismatch", key="runs/x/c/1")
            return await self.inner.get(run_key, sequence, now=now)

    reader = manager_with(OneCorrupt(store), clock)
    document = json.loads("".join(await export(reader, include_state=True)))

    assert [c["sequence"] for c in document["checkpoints"]] == [2, 1, 0]
    assert document["checkpoints"][1]["content"]["unreadable"].startswith(
        "CorruptCheckpointError: payload checksum mismatch")
    assert document["checkpoints"][2]["content"]["state"] == {
        "(1, 2)": "tuple key", "n": 0, "00000000-0000-0000-0000-000000000007": "uuid key"}


async def test_export_keeps_every_entry_of_a_dict_whose_keys_read_alike(
    manager: CheckpointManager,
) -> None:
    """``1`` and ``"1"`` both come out as ``"1"``, also when other content (a tuple key)
    makes the export write JSON piece by piece."""
    with anyio.fail_after(10):
        await manager.create(RUN, {"k": {1: "int", "1": "str"}, "other": {(1, 2): "tuple"}})
        text = "".join(await export(manager, include_state=True))

    pairs: list[list[tuple[str, Any]]] = []
    json.loads(text, object_pairs_hook=lambda found: pairs.append(found) or dict(found))
    assert [("1", "int"), ("1", "str")] in pairs
    assert [("(1, 2)", "tuple")] in pairs


async def test_export_of_an_unknown_run_raises_checkpoint_not_found(
    manager: CheckpointManager,
) -> None:
    chunks = manager.export_run("no-such-run")
    with anyio.fail_after(10), pytest.raises(CheckpointNotFound, match="no-such-run"):
        await chunks.__anext__()


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"format": "xml"}, id="format"),
        pytest.param({"format": None}, id="format-none"),
        pytest.param({"page_size": 0}, id="page-size"),
        pytest.param({"page_size": True}, id="page-size-bool"),
        pytest.param({"include_state": "yes"}, id="include-state"),
    ],
)
async def test_bad_arguments_are_refused_before_anything_is_read(
    manager: CheckpointManager, options: dict[str, Any]
) -> None:
    with pytest.raises(ValidationError):
        manager.export_run(RUN, **options)


async def test_stopping_early_closes_the_export(
    manager: CheckpointManager, clock: FakeClock
) -> None:
    await reviewed_run(manager, clock, steps=5)

    with anyio.fail_after(10):
        async with contextlib.aclosing(manager.export_run(RUN, page_size=2)) as chunks:
            first = [chunk async for chunk in _take(chunks, 2)]

    assert first[0].startswith('{"run": ')
    assert '"sequence":4' in first[1]
    run = await manager.get_run(RUN)
    assert run is not None
    assert run.status is CheckpointStatus.ACTIVE


async def _take(chunks: AsyncIterator[str], count: int) -> AsyncIterator[str]:
    async for chunk in chunks:
        yield chunk
        count -= 1
        if count == 0:
            return


# -- run listings -------------------------------------------------------------------------------


async def test_list_runs_pages_with_a_cursor_visit_every_run_once(
    manager: CheckpointManager, clock: FakeClock
) -> None:
    run_ids = [f"run-{index:02}" for index in range(23)]
    with anyio.fail_after(20):
        for index, run_id in enumerate(run_ids):
            if index % 3 == 0:
                clock.advance(1)  # some runs share a creation time
            await create(manager, run_id)
        seen: list[str] = []
        created_at: list[float] = []
        cursor: str | None = None
        for _ in range(len(run_ids) + 2):
            page = await manager.list_runs(limit=5, cursor=cursor)
            assert len(page) <= 5
            seen.extend(run.run_id for run in page)
            created_at.extend(run.created_at for run in page)
            cursor = page.next_cursor
            if cursor is None:
                break

    assert cursor is None
    assert sorted(seen) == run_ids
    assert created_at == sorted(created_at, reverse=True)


async def test_list_runs_filters_by_status(manager: CheckpointManager) -> None:
    with anyio.fail_after(10):
        for run_id in ("a", "b", "c", "d"):
            await create(manager, run_id)
        await manager.mark_completed("a")
        await manager.mark_completed("c")
        await manager.mark_failed("d", "x")
        completed = await manager.list_runs(status=CheckpointStatus.COMPLETED)
        completed_by_name = await manager.list_runs(status="completed")
        active = await manager.list_runs(status=CheckpointStatus.ACTIVE)
        failed = await manager.list_runs(status="failed")
        paused = await manager.list_runs(status=CheckpointStatus.PAUSED)

    assert sorted(run.run_id for run in completed) == ["a", "c"]
    assert sorted(run.run_id for run in completed_by_name) == ["a", "c"]
    assert [run.run_id for run in active] == ["b"]
    assert [run.run_id for run in failed] == ["d"]
    assert list(paused) == []


@pytest.mark.parametrize("bad_status", ["bogus", "ACTIVE ", 3])
async def test_bad_status_filter_raises_validation_error(
    manager: CheckpointManager, bad_status: Any
) -> None:
    with anyio.fail_after(10):
        with pytest.raises(ValidationError):
            await manager.list_runs(status=bad_status)
        with pytest.raises(ValidationError):
            await manager.count_runs(status=bad_status)


async def test_count_runs_counts_live_runs_by_status(manager: CheckpointManager) -> None:
    with anyio.fail_after(10):
        assert await manager.count_runs() == 0
        for run_id in ("a", "b", "c"):
            await create(manager, run_id)
        await create(manager, "a")  # a second checkpoint is not a second run
        await manager.mark_completed("b")

        assert await manager.count_runs() == 3
        assert await manager.count_runs(CheckpointStatus.ACTIVE) == 2
        assert await manager.count_runs("completed") == 1
        assert await manager.count_runs(CheckpointStatus.FAILED) == 0
        await manager.delete_run("a")
        assert await manager.count_runs() == 2


# -- fork and lineage --------------------------------------------------------------------------


async def test_fork_starts_a_new_run_from_a_copy_of_the_checkpoint(
    manager: CheckpointManager,
) -> None:
    with anyio.fail_after(10):
        await create(manager, state={"i": 0})
        source = await create(
            manager,
            state={"i": 1},
            messages=[{"m": 1}],
            tool_calls=[{"t": 1}],
            context={"c": 1},
            step_name="act",
            tags=["keep"],
        )
        await create(manager, state={"i": 2})
        forked = await manager.fork(source.checkpoint_id, "branch")
        restored = await manager.restore("branch")
        run = await manager.get_run("branch")

    assert forked.run_id == "branch"
    assert forked.metadata.sequence == 0
    assert forked.metadata.parent_id == source.checkpoint_id
    assert forked.checkpoint_id != source.checkpoint_id
    assert forked.state == source.state
    assert forked.messages == source.messages
    assert forked.tool_calls == source.tool_calls
    assert forked.context == source.context
    assert forked.metadata.step_name == "act"
    assert forked.metadata.tags == ["keep"]
    assert restored == forked
    assert run is not None
    assert run.status is CheckpointStatus.ACTIVE


async def test_fork_lineage_crosses_into_the_source_run(manager: CheckpointManager) -> None:
    with anyio.fail_after(10):
        root = await create(manager, state={"i": 0})
        source = await create(manager, state={"i": 1})
        forked = await manager.fork(source.checkpoint_id, "branch")
        child = await create(manager, "branch", state={"i": 2})
        lineage = await manager.lineage(child.checkpoint_id)

    assert [metadata.checkpoint_id for metadata in lineage] == [
        child.checkpoint_id,
        forked.checkpoint_id,
        source.checkpoint_id,
        root.checkpoint_id,
    ]
    assert [metadata.run_id for metadata in lineage] == ["branch", "branch", RUN, RUN]


async def test_fork_without_a_run_id_makes_a_fresh_run(manager: CheckpointManager) -> None:
    with anyio.fail_after(10):
        source = await create(manager)
        forked = await manager.fork(source.checkpoint_id)
        run = await manager.get_run(forked.run_id)

    assert forked.run_id != RUN
    assert run is not None
    assert run.latest_sequence == 0


async def test_fork_without_a_run_id_of_a_run_at_the_size_limit(
    manager: CheckpointManager,
) -> None:
    """The made-up run id keeps within the limit: the source's id is cut (at a character)."""
    long_id = "é" * 2047 + "x" * 2  # 4,096 bytes of UTF-8, the limit
    with anyio.fail_after(10):
        source = await manager.create(long_id, {"n": 0})
        forked = await manager.fork(source.checkpoint_id)
        restored = await manager.restore(forked.run_id)

    assert len(forked.run_id.encode()) <= 4096
    assert forked.run_id.startswith("é" * 2040)
    assert "-fork-" in forked.run_id
    assert restored is not None
    assert restored.state == {"n": 0}


async def test_fork_into_an_existing_run_raises_conflict_error(
    manager: CheckpointManager,
) -> None:
    with anyio.fail_after(10):
        source = await create(manager)
        existing = await create(manager, OTHER, state={"mine": True})
        with pytest.raises(ConflictError):
            await manager.fork(source.checkpoint_id, OTHER)
        assert await manager.restore(OTHER) == existing
        assert await sequences(manager, OTHER) == [0]


async def test_fork_of_an_unknown_checkpoint_raises_checkpoint_not_found(
    manager: CheckpointManager,
) -> None:
    with anyio.fail_after(10):
        source = await create(manager)
        with pytest.raises(CheckpointNotFound):
            await manager.fork(other_sequence(source.checkpoint_id, 9), "branch")
        assert await manager.delete(source.checkpoint_id) is True
        with pytest.raises(CheckpointNotFound):
            await manager.fork(source.checkpoint_id, "branch")
        assert await manager.get_run("branch") is None


async def test_lineage_stops_at_pruned_ancestors(store: CheckpointStore, clock: FakeClock) -> None:
    manager = manager_with(store, clock, max_checkpoints_per_run=2)
    with anyio.fail_after(10):
        created = [await create(manager, state={"i": i}) for i in range(4)]
        lineage = await manager.lineage(created[3].checkpoint_id)

    assert [metadata.checkpoint_id for metadata in lineage] == [
        created[3].checkpoint_id,
        created[2].checkpoint_id,
    ]


@pytest.mark.parametrize("sequence", [2**63 - 1, 2**63, 10**19 - 1])
async def test_an_id_naming_a_sequence_no_store_holds_names_no_checkpoint(
    manager: CheckpointManager, tmp_path: Path, sequence: int
) -> None:
    """Well-formed but beyond 64 bits (or its successor): never made, so not found, as any
    unknown id, on every store (SQLite refused the sequence after it as out of range)."""
    sqlite = CheckpointManager(open_store(f"sqlite:///{tmp_path}/runs.db"))
    for each in (manager, sqlite):
        await _unknown_beyond(each, sequence)
    await sqlite.aclose()


async def _unknown_beyond(manager: CheckpointManager, sequence: int) -> None:
    with anyio.fail_after(10):
        made = await create(manager)
        stem = made.checkpoint_id.rsplit("-", 1)[0]
        unknown = f"{stem}-{sequence}"
        assert await manager.lineage(unknown) == []
        assert await manager.restore_from(unknown) is None
        with pytest.raises(CheckpointNotFound):
            await manager.create(RUN, {"n": 1}, parent_id=unknown)


# -- listing filters and paging -----------------------------------------------------------------


async def test_list_checkpoints_filters_by_tags_and_step_name(
    manager: CheckpointManager,
) -> None:
    with anyio.fail_after(10):
        for index in range(12):
            tags = ["even"] if index % 2 == 0 else ["odd"]
            if index % 3 == 0:
                tags.append("third")
            step = "plan" if index % 4 == 0 else "act"
            await create(manager, state={"i": index}, tags=tags, step_name=step)

        assert await sequences(manager, tags=["odd"]) == [11, 9, 7, 5, 3, 1]
        assert await sequences(manager, tags=["even", "third"]) == [6, 0]
        assert await sequences(manager, step_name="plan") == [8, 4, 0]
        assert await sequences(manager, tags=["even"], step_name="act") == [10, 6, 2]
        assert await sequences(manager, tags=["third"], limit=2) == [9, 6]
        assert await sequences(manager, tags=["missing"]) == []


async def test_list_checkpoints_before_pages_through_the_run(manager: CheckpointManager) -> None:
    with anyio.fail_after(10):
        for index in range(7):
            await create(manager, state={"i": index})
        pages: list[list[int]] = []
        before: str | None = None
        for _ in range(5):
            page = await manager.list_checkpoints(RUN, limit=3, before=before)
            if not page:
                break
            pages.append([metadata.sequence for metadata in page])
            before = page[-1].checkpoint_id

    assert pages == [[6, 5, 4], [3, 2, 1], [0]]


async def test_list_checkpoints_before_an_id_of_another_run_raises_validation_error(
    manager: CheckpointManager,
) -> None:
    with anyio.fail_after(10):
        await create(manager)
        foreign = await create(manager, OTHER)
        with pytest.raises(ValidationError):
            await manager.list_checkpoints(RUN, before=foreign.checkpoint_id)


# -- corrupt records ---------------------------------------------------------------------------


async def append_raw(
    store: CheckpointStore, clock: FakeClock, run_id: str, *, header: bytes, payload: bytes
) -> str:
    """Append a record with these bytes straight through the store protocol; return its id."""
    key = _ids.run_key(run_id)
    run = await store.get_run(key, now=clock())
    assert run is not None
    sequence = run.latest_sequence + 1
    checkpoint_id = _ids.checkpoint_id(key, run.incarnation, sequence)
    record = StoredCheckpoint(
        sequence=sequence,
        checkpoint_id=checkpoint_id,
        created_at=clock(),
        expires_at=None,
        header=header,
        payload=payload,
    )
    await store.append(key, record, run=run, keep_latest=None, now=clock())
    return checkpoint_id


async def test_corrupt_header_is_skipped_by_listing_and_named_by_restore_from(
    manager: CheckpointManager, store: CheckpointStore, clock: FakeClock
) -> None:
    with anyio.fail_after(10):
        first = await create(manager, state={"i": 0})
        second = await create(manager, state={"i": 1})
        junk = await append_raw(store, clock, RUN, header=b"\x00junk header", payload=b"junk")
        after = await create(manager, state={"i": 3})
        expiring = await create(manager, state={"i": 4}, ttl_seconds=10)

        assert await sequences(manager) == [4, 3, 1, 0]
        with pytest.raises(CorruptCheckpointError) as caught:
            await manager.restore_from(junk)
        assert caught.value.key
        assert caught.value.key in str(caught.value)
        assert await manager.restore_from(first.checkpoint_id) == first
        assert await manager.restore_from(second.checkpoint_id) == second
        assert await manager.restore(RUN) == expiring

        clock.advance(10)
        assert await manager.cleanup_expired() == 1
        assert await manager.restore(RUN) == after
        assert await sequences(manager) == [3, 1, 0]


async def test_corrupt_payload_raises_corrupt_checkpoint_error_naming_the_key(
    manager: CheckpointManager, store: CheckpointStore, clock: FakeClock
) -> None:
    with anyio.fail_after(10):
        first = await create(manager, state={"i": 0})
        found = await store.get(_ids.run_key(RUN), 0, now=clock())
        assert found is not None
        good_header = found[0].header
        junk = await append_raw(store, clock, RUN, header=good_header, payload=b"FC\x01garbage")
        after = await create(manager, state={"i": 2})

        with pytest.raises(CorruptCheckpointError) as caught:
            await manager.restore_from(junk)
        assert caught.value.key
        assert caught.value.key in str(caught.value)
        assert [m.sequence for m in await manager.list_checkpoints(RUN)] == [2, 1, 0]
        assert await manager.restore(RUN) == after
        assert await manager.restore_from(first.checkpoint_id) == first
        assert await manager.delete_run(RUN) == 3


# -- misc ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"state": ["not", "a", "dict"]}, id="state-list"),
        pytest.param({"state": None}, id="state-none"),
        pytest.param({"state": {}, "messages": "text"}, id="messages-str"),
        pytest.param({"state": {}, "tags": "tag"}, id="tags-str"),
        pytest.param({"state": {}, "tags": [1]}, id="tags-int"),
        pytest.param({"state": {}, "step_name": None}, id="step-none"),
    ],
)
async def test_malformed_create_arguments_raise_validation_error(
    manager: CheckpointManager, bad: dict[str, Any]
) -> None:
    with anyio.fail_after(10):
        with pytest.raises(ValidationError):
            await manager.create(RUN, **bad)
        await _assert_nothing_written(manager, [])


async def test_error_texts_say_what_to_do(manager: CheckpointManager) -> None:
    @dataclass
    class Msg:
        text: str

    with anyio.fail_after(10):
        with pytest.raises(ValidationError, match=r"None for the configured default_ttl_seconds"):
            await manager.create(RUN, {"n": 1}, ttl_seconds=0)
        with pytest.raises(ValidationError, match=r"got Msg; convert it first .*asdict"):
            await manager.create(RUN, Msg("hi"))  # type: ignore[arg-type]


async def test_prune_reads_past_a_corrupt_header_to_the_oldest_surplus(
    store: CheckpointStore, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A header prune cannot read is neither counted nor deleted, and a store page it
    shortened is not taken for the last one."""
    monkeypatch.setattr("fastcheckpoint._manager._PRUNE_PAGE", 4)
    manager = manager_with(store, clock, max_checkpoints_per_run=None)
    with anyio.fail_after(20):
        for i in range(6):
            await create(manager, state={"i": i})
        junk = await append_raw(store, clock, RUN, header=b"\x00junk header", payload=b"junk")
        for i in range(7, 10):
            await create(manager, state={"i": i})
        removed = await manager.prune(RUN, 2)
        with pytest.raises(CorruptCheckpointError):
            await manager.restore_from(junk)  # still there
        left = await sequences(manager)

    assert removed == 7
    assert left == [9, 8]
