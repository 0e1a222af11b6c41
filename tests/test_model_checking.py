"""Model checking: hypothesis drives a CheckpointManager against a reference model.

A ``RuleBasedStateMachine`` runs random sequences of creates, restores, deletes, status
changes, clock moves and cleanups on a real manager (over MemoryStore or a FileStore in a fresh
directory) and on a small pure-Python model of the semantics docs/concepts.md states
(sequencing, ids, expiry, pruning, parents, status), and checks after every step that both
agree on what ``restore``, ``restore_from``, ``list_checkpoints`` and ``get_run`` report.
Each machine keeps one blocking portal (an event loop in a thread) for its
lifetime; every step is one call through it.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
)

from fastcheckpoint import (
    Checkpoint,
    CheckpointManager,
    CheckpointNotFound,
    CheckpointStatus,
    CheckpointStore,
    ConflictError,
)
from tests._helpers import FakeClock, make_config, make_store

T = TypeVar("T")

RUN_IDS = ("alpha", "beta", "../gamma")
ACTIVE = CheckpointStatus.ACTIVE
COMPLETED = CheckpointStatus.COMPLETED
FAILED = CheckpointStatus.FAILED

states = st.dictionaries(
    st.sampled_from(["a", "b", "c"]),
    st.integers(-3, 3) | st.text(max_size=3) | st.lists(st.booleans(), max_size=2),
    max_size=3,
)
ttls = st.none() | st.sampled_from([1.0, 5.0, 10.0])
tag_lists = st.lists(st.sampled_from(["x", "y"]), max_size=2, unique=True)
checkpoint_ids = Bundle("checkpoint_ids")


def _live(expires_at: float | None, now: float) -> bool:
    return expires_at is None or now < expires_at


def _later(first: float | None, second: float | None) -> float | None:
    """The run's expiry after an append: the later of the two, ``None`` (never) wins."""
    if first is None or second is None:
        return None
    return max(first, second)


@dataclass
class ModelCheckpoint:
    checkpoint_id: str
    run_id: str
    sequence: int
    state: dict[str, Any]
    tags: list[str]
    parent_id: str | None
    expires_at: float | None


@dataclass
class ModelRun:
    """One incarnation of a run, and the checkpoints the store physically holds for it."""

    status: CheckpointStatus = ACTIVE
    latest_sequence: int = -1
    expires_at: float | None = None
    held: dict[int, ModelCheckpoint] = field(default_factory=dict)
    ids: dict[int, str] = field(default_factory=dict)  # every id this incarnation handed out

    def live(self, now: float) -> bool:
        """A run lives while a checkpoint it holds does: none held means gone."""
        if not self.held:
            return False
        if any(c.expires_at is None for c in self.held.values()):
            return True
        return now < max(c.expires_at for c in self.held.values() if c.expires_at is not None)

    def live_checkpoints(self, now: float) -> list[ModelCheckpoint]:
        """Newest first."""
        held = sorted(self.held.values(), key=lambda c: c.sequence, reverse=True)
        return [c for c in held if _live(c.expires_at, now)]


class Model:
    """The reference semantics, written as plainly as possible."""

    def __init__(self, clock: FakeClock, keep_latest: int | None) -> None:
        self.clock = clock
        self.keep_latest = keep_latest
        self.runs: dict[str, ModelRun] = {}
        self.checkpoints: dict[str, ModelCheckpoint] = {}

    def live_run(self, run_id: str) -> ModelRun | None:
        run = self.runs.get(run_id)
        return run if run is not None and run.live(self.clock.now) else None

    def next_append(self, run_id: str) -> tuple[int, str | None, CheckpointStatus]:
        """``(sequence, default parent, status)`` the next create of ``run_id`` must report."""
        run = self.live_run(run_id)
        if run is None:
            return 0, None, ACTIVE
        sequence = run.latest_sequence + 1
        return sequence, run.ids.get(sequence - 1), ACTIVE if run.status is FAILED else run.status

    def append(self, checkpoint: ModelCheckpoint) -> None:
        now = self.clock.now
        run = self.live_run(checkpoint.run_id)
        if run is None:  # a new run, or a new incarnation replacing an expired one
            run = self.runs[checkpoint.run_id] = ModelRun(expires_at=checkpoint.expires_at)
        if run.status is FAILED:
            run.status = ACTIVE  # a create resumes a failed run
        run.latest_sequence = checkpoint.sequence
        run.expires_at = _later(run.expires_at, checkpoint.expires_at)
        run.held[checkpoint.sequence] = checkpoint
        run.ids[checkpoint.sequence] = checkpoint.checkpoint_id
        self.checkpoints[checkpoint.checkpoint_id] = checkpoint
        for sequence, held in list(run.held.items()):
            if not _live(held.expires_at, now):
                del run.held[sequence]
        if self.keep_latest is not None:
            while len(run.held) > self.keep_latest:
                del run.held[min(run.held)]

    def restore(self, run_id: str) -> ModelCheckpoint | None:
        run = self.live_run(run_id)
        if run is None:
            return None
        live = run.live_checkpoints(self.clock.now)
        return live[0] if live else None

    def find(self, checkpoint_id: str) -> tuple[ModelRun, ModelCheckpoint] | None:
        """The run incarnation physically holding this checkpoint, if any."""
        checkpoint = self.checkpoints[checkpoint_id]
        run = self.runs.get(checkpoint.run_id)
        if run is None or run.held.get(checkpoint.sequence) is not checkpoint:
            return None
        return run, checkpoint

    def restore_from(self, checkpoint_id: str) -> ModelCheckpoint | None:
        found = self.find(checkpoint_id)
        if found is None:
            return None
        run, checkpoint = found
        now = self.clock.now
        return checkpoint if run.live(now) and _live(checkpoint.expires_at, now) else None

    def status_of(self, checkpoint: ModelCheckpoint) -> CheckpointStatus:
        return self.runs[checkpoint.run_id].status

    def cleanup(self) -> int:
        now = self.clock.now
        removed = 0
        for run_id, run in list(self.runs.items()):
            if not run.live(now):
                removed += len(run.held)
                del self.runs[run_id]
                continue
            for sequence, held in list(run.held.items()):
                if not _live(held.expires_at, now):
                    del run.held[sequence]
                    removed += 1
        return removed


class ManagerMachine(RuleBasedStateMachine):
    """Subclasses pick the store and the event loop."""

    STORE_KIND = "memory"
    BACKEND = "asyncio"

    ids = checkpoint_ids

    def __init__(self) -> None:
        super().__init__()
        self._exit = ExitStack()
        self.portal: BlockingPortal = self._exit.enter_context(
            start_blocking_portal(backend=self.BACKEND)
        )
        self.directory = Path(tempfile.mkdtemp(prefix="fastcheckpoint-model-"))
        self._exit.callback(shutil.rmtree, self.directory, ignore_errors=True)
        self.clock = FakeClock()
        self.store: CheckpointStore = make_store(self.STORE_KIND, self.directory, fsync=False)
        self.manager = CheckpointManager(self.store, config=make_config(self.clock))
        self.model = Model(self.clock, keep_latest=100)

    def call(self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        return self.portal.call(functools.partial(func, *args, **kwargs))

    def teardown(self) -> None:
        try:
            self.call(self.store.aclose)
        finally:
            self._exit.close()

    # -- setup ------------------------------------------------------------------------------

    @initialize(limit=st.sampled_from([None, 1, 2, 3, 5]))
    def choose_pruning_limit(self, limit: int | None) -> None:
        config = make_config(self.clock, max_checkpoints_per_run=limit)
        self.manager = CheckpointManager(self.store, config=config)
        self.model = Model(self.clock, keep_latest=limit)

    # -- helpers ----------------------------------------------------------------------------

    def check_checkpoint(self, actual: Checkpoint | None, expected: ModelCheckpoint | None) -> None:
        if expected is None:
            assert actual is None, f"expected nothing, got {actual}"
            return
        assert actual is not None, f"expected {expected}, got nothing"
        metadata = actual.metadata
        assert actual.checkpoint_id == expected.checkpoint_id
        assert actual.run_id == expected.run_id
        assert metadata.sequence == expected.sequence
        assert actual.state == expected.state
        assert metadata.tags == expected.tags
        assert metadata.parent_id == expected.parent_id
        assert metadata.expires_at == expected.expires_at
        assert metadata.status is self.model.status_of(expected)

    def append(
        self,
        run_id: str,
        state: dict[str, Any],
        ttl: float | None,
        tags: list[str],
        parent_id: str | None = None,
    ) -> str:
        sequence, default_parent, status = self.model.next_append(run_id)
        created = self.call(
            self.manager.create, run_id, state, ttl_seconds=ttl, tags=tags, parent_id=parent_id
        )
        assert created is not None
        metadata = created.metadata
        assert metadata.sequence == sequence
        assert metadata.status is status
        expected_parent = parent_id if parent_id is not None else default_parent
        assert metadata.parent_id == expected_parent
        assert metadata.expires_at == (None if ttl is None else self.clock.now + ttl)
        self.model.append(
            ModelCheckpoint(
                checkpoint_id=created.checkpoint_id,
                run_id=run_id,
                sequence=sequence,
                state=state,
                tags=tags,
                parent_id=expected_parent,
                expires_at=metadata.expires_at,
            )
        )
        return created.checkpoint_id

    # -- rules ------------------------------------------------------------------------------

    @rule(target=ids, run_id=st.sampled_from(RUN_IDS), state=states, ttl=ttls, tags=tag_lists)
    def create(self, run_id: str, state: dict[str, Any], ttl: float | None, tags: list[str]) -> str:
        return self.append(run_id, state, ttl, tags)

    @rule(run_id=st.sampled_from(RUN_IDS))
    def restore(self, run_id: str) -> None:
        self.check_checkpoint(self.call(self.manager.restore, run_id), self.model.restore(run_id))

    @rule(checkpoint_id=ids)
    def restore_from(self, checkpoint_id: str) -> None:
        actual = self.call(self.manager.restore_from, checkpoint_id)
        self.check_checkpoint(actual, self.model.restore_from(checkpoint_id))

    @rule(checkpoint_id=ids)
    def delete(self, checkpoint_id: str) -> None:
        found = self.model.find(checkpoint_id)
        deleted = self.call(self.manager.delete, checkpoint_id)
        if found is None:
            assert deleted is False
            return
        run, checkpoint = found
        if self.model.restore_from(checkpoint_id) is not None:
            assert deleted is True
        # An expired checkpoint the store still holds may or may not count as deleted; the
        # model follows the store's answer so later counts stay exact.
        if deleted:
            del run.held[checkpoint.sequence]

    @rule(run_id=st.sampled_from(RUN_IDS))
    def delete_run(self, run_id: str) -> None:
        run = self.model.runs.pop(run_id, None)
        expected = 0 if run is None else len(run.held)
        assert self.call(self.manager.delete_run, run_id) == expected

    @rule(
        run_id=st.sampled_from(RUN_IDS),
        tag=st.none() | st.sampled_from(["x", "y"]),
        limit=st.sampled_from([1, 2, 100]),
    )
    def list_checkpoints(self, run_id: str, tag: str | None, limit: int) -> None:
        tags = None if tag is None else [tag]
        listed = self.call(self.manager.list_checkpoints, run_id, limit, tags=tags)
        run = self.model.live_run(run_id)
        expected = [] if run is None else run.live_checkpoints(self.clock.now)
        expected = [c for c in expected if tag is None or tag in c.tags][:limit]
        assert [m.checkpoint_id for m in listed] == [c.checkpoint_id for c in expected]
        assert [m.sequence for m in listed] == [c.sequence for c in expected]
        if run is not None:
            assert all(m.status is run.status for m in listed)

    @rule(run_id=st.sampled_from(RUN_IDS))
    def mark_completed(self, run_id: str) -> None:
        self.change_status(run_id, COMPLETED)

    @rule(run_id=st.sampled_from(RUN_IDS), error=st.sampled_from(["", "boom"]))
    def mark_failed(self, run_id: str, error: str) -> None:
        self.change_status(run_id, FAILED, error)

    def change_status(self, run_id: str, target: CheckpointStatus, error: str = "") -> None:
        run = self.model.live_run(run_id)
        if target is COMPLETED:
            change: Callable[[], Awaitable[Any]] = functools.partial(
                self.manager.mark_completed, run_id
            )
        else:
            change = functools.partial(self.manager.mark_failed, run_id, error)
        if run is None:
            assert self.call(change) is None
            return
        if run.status not in (ACTIVE, target):
            with pytest.raises(ConflictError):
                self.call(change)
            return
        info = self.call(change)
        assert info is not None
        assert info.status is target
        run.status = target

    @rule(seconds=st.sampled_from([0.5, 1.0, 5.0, 10.0]))
    def advance_clock(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def cleanup_expired(self) -> None:
        assert self.call(self.manager.cleanup_expired) == self.model.cleanup()

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def runs_agree(self) -> None:
        for run_id in RUN_IDS:
            info = self.call(self.manager.get_run, run_id)
            run = self.model.live_run(run_id)
            if run is None:
                assert info is None, f"{run_id!r} should not be live: {info}"
                continue
            assert info is not None, f"{run_id!r} should be live"
            assert info.status is run.status
            assert info.latest_sequence == run.latest_sequence
            assert info.checkpoint_count == len(run.held)
        live = sum(1 for run_id in RUN_IDS if self.model.live_run(run_id) is not None)
        assert self.call(self.manager.count_runs) == live

    @invariant()
    def latest_agrees(self) -> None:
        for run_id in RUN_IDS:
            actual = self.call(self.manager.restore, run_id)
            self.check_checkpoint(actual, self.model.restore(run_id))


MACHINE_SETTINGS = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class MemoryMachine(ManagerMachine):
    STORE_KIND = "memory"


class FileMachine(ManagerMachine):
    STORE_KIND = "file"


class MemoryTrioMachine(ManagerMachine):
    STORE_KIND = "memory"
    BACKEND = "trio"


class FileTrioMachine(ManagerMachine):
    STORE_KIND = "file"
    BACKEND = "trio"


class ExplicitParentMachine(ManagerMachine):
    """Also creates with explicit ``parent_id`` (live, deleted, expired, of other runs)."""

    STORE_KIND = "memory"

    @rule(
        target=checkpoint_ids,
        run_id=st.sampled_from(RUN_IDS),
        parent_id=checkpoint_ids,
        state=states,
    )
    def create_with_parent(
        self, run_id: str, parent_id: str, state: dict[str, Any]
    ) -> str | MultipleResults[str]:
        parent = self.model.restore_from(parent_id)
        if parent is None or parent.run_id != run_id:
            before = self.model.next_append(run_id)
            with pytest.raises(CheckpointNotFound):
                self.call(self.manager.create, run_id, state, parent_id=parent_id)
            assert self.model.next_append(run_id) == before
            return multiple()
        return self.append(run_id, state, None, [], parent_id=parent_id)


TestManagerOnMemoryStore = MemoryMachine.TestCase
TestManagerOnMemoryStore.settings = MACHINE_SETTINGS
TestManagerOnFileStore = FileMachine.TestCase
TestManagerOnFileStore.settings = MACHINE_SETTINGS
TestManagerOnMemoryStoreWithTrio = MemoryTrioMachine.TestCase
TestManagerOnMemoryStoreWithTrio.settings = MACHINE_SETTINGS
TestManagerOnFileStoreWithTrio = FileTrioMachine.TestCase
TestManagerOnFileStoreWithTrio.settings = MACHINE_SETTINGS
TestManagerWithExplicitParents = ExplicitParentMachine.TestCase
TestManagerWithExplicitParents.settings = MACHINE_SETTINGS
