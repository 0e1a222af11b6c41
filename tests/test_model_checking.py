"""Model checking: hypothesis drives a CheckpointManager against a reference model.

A ``RuleBasedStateMachine`` runs random sequences of creates (with message lists long enough
to be stored as logs, ``expected_sequence``, explicit parents), forks, restores, deletes,
prunes, status changes and approvals, clock moves and cleanups on a real manager (over
MemoryStore or a FileStore in a fresh directory) and on a small pure-Python model of the
semantics docs/concepts.md states (sequencing, ids, expiry, pruning, parents, status, logs),
and checks after every step that both agree on what ``restore``, ``restore_from``,
``list_checkpoints``, ``lineage``, ``list_runs``, ``count_runs`` and ``get_run`` report. Three
rules run two calls at once (creates of one run, a create and a ``delete_run``, a completion
racing a failure) and check the outcome against the model in the order the store decided.
Each machine keeps one blocking portal (an event loop in a thread) for its
lifetime; every step is one call through it.

A machine may open several stores over one backing (:meth:`ManagerMachine.open_stores`), one
manager each: every rule then goes to the manager its ``process`` argument names, and the
invariants ask every manager, as separate processes sharing one store would
(tests/test_model_checking_stores.py runs them on the file, SQLite, Redis and PostgreSQL
stores). The model stays one logical store.
"""

from __future__ import annotations

import copy
import functools
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
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
    CheckpointError,
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
PAUSED = CheckpointStatus.PAUSED
REJECTED = CheckpointStatus.REJECTED
EXPIRED = CheckpointStatus.EXPIRED

states = st.dictionaries(
    st.sampled_from(["a", "b", "c"]),
    st.integers(-3, 3) | st.text(max_size=3) | st.lists(st.booleans(), max_size=2),
    max_size=3,
)
ttls = st.none() | st.sampled_from([1.0, 5.0, 10.0])
tag_lists = st.lists(st.sampled_from(["x", "y"]), max_size=2, unique=True)
clock_steps = st.sampled_from([0.5, 1.0, 5.0, 10.0])
processes = st.integers(0, 1)
"""Which manager a step goes to, modulo the machine's number of managers."""
checkpoint_ids = Bundle("checkpoint_ids")
NOT_AN_ID = "ck-no-such-checkpoint"
"""What a rule whose create is refused puts in the bundle: every rule adds exactly one id
(or two, for a race), so which calls a race's outcome makes fail never changes what
hypothesis draws afterwards. A string that is no checkpoint id names nothing."""


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
    messages: list[Any] = field(default_factory=list)


@dataclass
class ModelRun:
    """One incarnation of a run, and the checkpoints the store physically holds for it."""

    status: CheckpointStatus = ACTIVE
    latest_sequence: int = -1
    expires_at: float | None = None
    held: dict[int, ModelCheckpoint] = field(default_factory=dict)
    ids: dict[int, str] = field(default_factory=dict)  # every id this incarnation handed out
    decision: str | None = None  # of the latest approval request: "approved", "rejected"
    error: str | None = None
    history: list[CheckpointStatus] = field(default_factory=list)

    def change(self, status: CheckpointStatus, error: str | None = None) -> None:
        """A status change: recorded in the history; a failure records its error, and
        any other change keeps the error there is (only a resume clears it)."""
        self.status = status
        self.history.append(status)
        if status is FAILED:
            self.error = error

    def expiry(self) -> float | None:
        """The run's ``expires_at``: the latest of those it holds, ``None`` while one of
        them never expires."""
        if any(c.expires_at is None for c in self.held.values()):
            return None
        return max((c.expires_at for c in self.held.values() if c.expires_at is not None),
                   default=None)

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

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
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

    def append(self, checkpoint: ModelCheckpoint, keep_latest: int | None) -> None:
        """``keep_latest``: the limit of the manager that creates it."""
        now = self.clock.now
        run = self.live_run(checkpoint.run_id)
        if run is None:  # a new run, or a new incarnation replacing an expired one
            run = self.runs[checkpoint.run_id] = ModelRun(expires_at=checkpoint.expires_at)
        if run.status is FAILED:
            run.change(ACTIVE)  # a create resumes a failed run
            run.error = None
        run.latest_sequence = checkpoint.sequence
        run.expires_at = _later(run.expires_at, checkpoint.expires_at)
        run.held[checkpoint.sequence] = checkpoint
        run.ids[checkpoint.sequence] = checkpoint.checkpoint_id
        self.checkpoints[checkpoint.checkpoint_id] = checkpoint
        for sequence, held in list(run.held.items()):
            if not _live(held.expires_at, now):
                del run.held[sequence]
        if keep_latest is not None:
            while len(run.held) > keep_latest:
                del run.held[min(run.held)]

    def restore(self, run_id: str) -> ModelCheckpoint | None:
        run = self.live_run(run_id)
        if run is None:
            return None
        live = run.live_checkpoints(self.clock.now)
        return live[0] if live else None

    def find(self, checkpoint_id: str) -> tuple[ModelRun, ModelCheckpoint] | None:
        """The run incarnation physically holding this checkpoint, if any."""
        checkpoint = self.checkpoints.get(checkpoint_id)
        if checkpoint is None:
            return None
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
    """Subclasses pick the store, how many managers share it, and the event loop."""

    STORE_KIND = "memory"
    BACKEND = "asyncio"
    TIME_SCALE = 1.0
    """Every TTL and clock move is multiplied by it (see :meth:`open_stores`)."""

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
        self.stores: list[CheckpointStore] = []
        try:
            self.stores = self.open_stores()
        except BaseException:
            self._exit.close()  # hypothesis calls teardown only on a machine it got
            raise
        self.limits: list[int | None] = [100, 100]
        self.managers = self.make_managers()
        self.model = Model(self.clock)
        self.said = 0  # messages written so far: each new one says its number

    def open_stores(self) -> list[CheckpointStore]:
        """The stores the managers use, one each, all over one backing. Callbacks it puts on
        ``self._exit`` (removing the backing) run after the stores are closed. A store whose
        expiry runs on a clock other than the manager's sets :attr:`TIME_SCALE` so that the
        other clock never gets there while a machine runs."""
        return [make_store(self.STORE_KIND, self.directory, fsync=False)]

    def make_managers(self, cleanup_batch_size: int = 500) -> list[CheckpointManager]:
        """One manager per store, with its pruning limit; message lists of two entries or
        more are stored as logs."""
        return [
            CheckpointManager(
                store,
                config=make_config(
                    self.clock,
                    history_min_entries=2,
                    max_checkpoints_per_run=limit,
                    cleanup_batch_size=cleanup_batch_size,
                ),
            )
            for store, limit in zip(self.stores, self.limits, strict=False)
        ]

    def manager(self, process: int) -> CheckpointManager:
        return self.managers[process % len(self.managers)]

    def limit(self, process: int) -> int | None:
        """The pruning limit of the manager ``process`` names."""
        return self.limits[process % len(self.managers)]

    def call(self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        return self.portal.call(functools.partial(func, *args, **kwargs))

    def call_both(self, *calls: Callable[[], Awaitable[Any]]) -> list[Any]:
        """Run the calls at once (tasks of one task group): what each returned, or the
        ``CheckpointError`` it raised."""
        results: list[Any] = [None] * len(calls)

        async def one(index: int) -> None:
            try:
                results[index] = await calls[index]()
            except CheckpointError as exc:
                results[index] = exc

        async def run_all() -> None:
            async with anyio.create_task_group() as group:
                for index in range(len(calls)):
                    group.start_soon(one, index)

        self.call(run_all)
        return results

    def teardown(self) -> None:
        try:
            for store in self.stores:
                self.call(store.aclose)
        finally:
            self._exit.close()

    # -- setup ------------------------------------------------------------------------------

    @initialize(
        limit=st.sampled_from([None, 1, 2, 3, 5]),
        other_limit=st.none() | st.sampled_from([1, 2, 3, 5]),
        cleanup_batch_size=st.sampled_from([1, 2, 500]),
    )
    def configure(
        self, limit: int | None, other_limit: int | None, cleanup_batch_size: int
    ) -> None:
        """Pruning limits (a second manager's may differ: processes configured apart) and
        the cleanup's batch size (small ones make it loop)."""
        self.limits = [limit, other_limit if other_limit is not None else limit]
        self.managers = self.make_managers(cleanup_batch_size)

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
        assert actual.messages == expected.messages

    def append(
        self,
        process: int,
        run_id: str,
        state: dict[str, Any],
        ttl: float | None,
        tags: list[str],
        parent_id: str | None = None,
        messages: list[Any] | None = None,
        expected_sequence: int | None = None,
    ) -> str:
        sequence, default_parent, status = self.model.next_append(run_id)
        ttl = None if ttl is None else ttl * self.TIME_SCALE
        created = self.call(
            self.manager(process).create,
            run_id,
            state,
            messages=messages,
            ttl_seconds=ttl,
            tags=tags,
            parent_id=parent_id,
            expected_sequence=expected_sequence,
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
                messages=[] if messages is None else copy.deepcopy(messages),
            ),
            self.limit(process),
        )
        return created.checkpoint_id

    # -- rules ------------------------------------------------------------------------------

    @rule(
        target=ids,
        process=processes,
        run_id=st.sampled_from(RUN_IDS),
        state=states,
        ttl=ttls,
        tags=tag_lists,
    )
    def create(
        self, process: int, run_id: str, state: dict[str, Any], ttl: float | None, tags: list[str]
    ) -> str:
        return self.append(process, run_id, state, ttl, tags)

    @rule(
        target=ids,
        process=processes,
        run_id=st.sampled_from(RUN_IDS),
        restore_first=st.booleans(),
        added=st.integers(0, 3),
        change=st.sampled_from(["none", "edit", "drop"]),
        ttl=ttls,
    )
    def converse(
        self,
        process: int,
        run_id: str,
        restore_first: bool,
        added: int,
        change: str,
        ttl: float | None,
    ) -> str:
        """Create with the messages of the run's latest checkpoint and a few more (a
        conversation going on), or with one of them changed: long lists are stored as logs,
        extended only when the manager may."""
        if restore_first:
            self.restore(process, run_id)
        latest = self.model.restore(run_id)
        messages = [] if latest is None else copy.deepcopy(latest.messages)
        if messages and change == "edit":
            messages[0] = {"edited": self.said}
        elif messages and change == "drop":
            del messages[-1]
        for _ in range(added):
            messages.append({"n": self.said, "text": "x" * (self.said % 3)})
            self.said += 1
        return self.append(process, run_id, {}, ttl, [], messages=messages)

    @rule(
        target=ids,
        process=processes,
        run_id=st.sampled_from(RUN_IDS),
        turns=st.sampled_from([8, 17]),
        alternate=st.booleans(),
    )
    def long_conversation(self, process: int, run_id: str, turns: int, alternate: bool) -> str:
        """A conversation of many turns, each restoring the run and adding one message
        (through the two managers in turn, or one): enough parts of one log to merge them
        (16) and remove the merged ones."""
        created = ""
        for turn in range(turns):
            created = self.converse(process + turn * alternate, run_id, True, 1, "none", None)
        return created

    @rule(process=processes, run_id=st.sampled_from(RUN_IDS))
    def restore(self, process: int, run_id: str) -> None:
        actual = self.call(self.manager(process).restore, run_id)
        self.check_checkpoint(actual, self.model.restore(run_id))

    @rule(process=processes, checkpoint_id=ids)
    def restore_from(self, process: int, checkpoint_id: str) -> None:
        actual = self.call(self.manager(process).restore_from, checkpoint_id)
        self.check_checkpoint(actual, self.model.restore_from(checkpoint_id))

    @rule(process=processes, checkpoint_id=ids)
    def delete(self, process: int, checkpoint_id: str) -> None:
        found = self.model.find(checkpoint_id)
        deleted = self.call(self.manager(process).delete, checkpoint_id)
        if found is None:
            assert deleted is False
            return
        # Expired but still held (not purged yet) is there to delete: every store says so.
        run, checkpoint = found
        assert deleted is True
        del run.held[checkpoint.sequence]

    @rule(process=processes, run_id=st.sampled_from(RUN_IDS))
    def delete_run(self, process: int, run_id: str) -> None:
        run = self.model.runs.pop(run_id, None)
        expected = 0 if run is None else len(run.held)
        assert self.call(self.manager(process).delete_run, run_id) == expected

    @rule(
        process=processes,
        run_id=st.sampled_from(RUN_IDS),
        tag=st.none() | st.sampled_from(["x", "y"]),
        limit=st.sampled_from([1, 2, 100]),
    )
    def list_checkpoints(self, process: int, run_id: str, tag: str | None, limit: int) -> None:
        tags = None if tag is None else [tag]
        listed = self.call(self.manager(process).list_checkpoints, run_id, limit, tags=tags)
        run = self.model.live_run(run_id)
        expected = [] if run is None else run.live_checkpoints(self.clock.now)
        expected = [c for c in expected if tag is None or tag in c.tags][:limit]
        assert [m.checkpoint_id for m in listed] == [c.checkpoint_id for c in expected]
        assert [m.sequence for m in listed] == [c.sequence for c in expected]
        if run is not None:
            assert all(m.status is run.status for m in listed)

    @rule(
        process=processes,
        run_id=st.sampled_from(RUN_IDS),
        tag=st.none() | st.sampled_from(["x", "y"]),
        limit=st.sampled_from([1, 2]),
    )
    def list_pages(self, process: int, run_id: str, tag: str | None, limit: int) -> None:
        """Every page of the run's live checkpoints, ``before`` the last of each."""
        run = self.model.live_run(run_id)
        expected = [] if run is None else run.live_checkpoints(self.clock.now)
        expected = [c for c in expected if tag is None or tag in c.tags]
        listed: list[str] = []
        before: str | None = None
        for _ in range(len(expected) // limit + 2):
            page = self.call(
                self.manager(process).list_checkpoints,
                run_id,
                limit,
                before=before,
                tags=None if tag is None else [tag],
            )
            listed += [metadata.checkpoint_id for metadata in page]
            if len(page) < limit:
                break
            before = page[-1].checkpoint_id
        assert listed == [c.checkpoint_id for c in expected]

    @rule(process=processes, checkpoint_id=ids)
    def lineage(self, process: int, checkpoint_id: str) -> None:
        """Parents followed while they live, across forks."""
        expected: list[str] = []
        current: str | None = checkpoint_id
        while current is not None and current not in expected:
            checkpoint = self.model.restore_from(current)
            if checkpoint is None:
                break
            expected.append(current)
            current = checkpoint.parent_id
        chain = self.call(self.manager(process).lineage, checkpoint_id)
        assert [metadata.checkpoint_id for metadata in chain] == expected

    @rule(process=processes, run_id=st.sampled_from(RUN_IDS))
    def mark_completed(self, process: int, run_id: str) -> None:
        self.change_status(process, run_id, COMPLETED)

    @rule(process=processes, run_id=st.sampled_from(RUN_IDS), error=st.sampled_from(["", "boom"]))
    def mark_failed(self, process: int, run_id: str, error: str) -> None:
        self.change_status(process, run_id, FAILED, error)

    def change_status(
        self, process: int, run_id: str, target: CheckpointStatus, error: str = ""
    ) -> None:
        run = self.model.live_run(run_id)
        manager = self.manager(process)
        if target is COMPLETED:
            change: Callable[[], Awaitable[Any]] = functools.partial(
                manager.mark_completed, run_id
            )
        else:
            change = functools.partial(manager.mark_failed, run_id, error)
        if run is None:
            assert self.call(change) is None
            return
        if run.status not in (ACTIVE, PAUSED, target):
            with pytest.raises(ConflictError):
                self.call(change)
            return
        info = self.call(change)
        assert info is not None
        assert info.status is target
        if run.status is not target:
            run.change(target, error)

    @rule(process=processes, run_id=st.sampled_from(RUN_IDS), guard=st.sampled_from(
        ["none", "latest", "stale"]))
    def pause(self, process: int, run_id: str, guard: str) -> None:
        run = self.model.live_run(run_id)
        latest = None
        if run is not None and guard != "none":
            latest = run.latest_sequence + (guard == "stale")  # "stale": not the newest
        pause = functools.partial(
            self.manager(process).pause, run_id, {"q": 1}, latest_sequence=latest
        )
        if run is None:
            with pytest.raises(CheckpointNotFound):
                self.call(pause)
            return
        if run.status is not ACTIVE or guard == "stale":
            with pytest.raises(ConflictError):
                self.call(pause)
            return
        assert self.call(pause).status is PAUSED
        run.change(PAUSED)
        run.decision = None

    @rule(process=processes, run_id=st.sampled_from(RUN_IDS), approve=st.booleans())
    def decide(self, process: int, run_id: str, approve: bool) -> None:
        manager = self.manager(process)
        if approve:
            decide: Callable[[], Awaitable[Any]] = functools.partial(
                manager.approve, run_id, approver="ana"
            )
        else:
            decide = functools.partial(manager.reject, run_id, approver="ana")
        decision, target = ("approved", ACTIVE) if approve else ("rejected", REJECTED)
        run = self.model.live_run(run_id)
        if run is None:
            with pytest.raises(CheckpointNotFound):
                self.call(decide)
            return
        if run.decision == decision:  # this very decision again: the run as it is
            assert self.call(decide).status is run.status
            return
        if run.status is not PAUSED:
            with pytest.raises(ConflictError):
                self.call(decide)
            return
        assert self.call(decide).status is target
        run.change(target)
        run.decision = decision

    @rule(process=processes, run_id=st.sampled_from(RUN_IDS), keep=st.integers(1, 2))
    def prune(self, process: int, run_id: str, keep: int) -> None:
        run = self.model.live_run(run_id)
        doomed = [] if run is None else run.live_checkpoints(self.clock.now)[keep:]
        assert self.call(self.manager(process).prune, run_id, keep) == len(doomed)
        for checkpoint in doomed:
            assert run is not None
            del run.held[checkpoint.sequence]

    @rule(
        target=ids,
        process=processes,
        run_id=st.sampled_from(RUN_IDS),
        offset=st.sampled_from([0, 0, -1, 1]),
        state=states,
    )
    def create_expecting(
        self, process: int, run_id: str, offset: int, state: dict[str, Any]
    ) -> str:
        """Create with ``expected_sequence``: the run's next one, or one that is not."""
        sequence = self.model.next_append(run_id)[0] + offset
        if offset == 0:
            return self.append(process, run_id, state, None, [], expected_sequence=sequence)
        if sequence >= 0:
            with pytest.raises(ConflictError):
                self.call(
                    self.manager(process).create, run_id, state, expected_sequence=sequence
                )
        return NOT_AN_ID

    @rule(
        target=ids,
        process=processes,
        source=ids,
        new_run_id=st.sampled_from(RUN_IDS),
        ttl=ttls,
    )
    def fork(
        self, process: int, source: str, new_run_id: str, ttl: float | None
    ) -> str:
        original = self.model.restore_from(source)
        ttl = None if ttl is None else ttl * self.TIME_SCALE
        fork = functools.partial(
            self.manager(process).fork, source, new_run_id, ttl_seconds=ttl
        )
        if original is None:
            with pytest.raises(CheckpointNotFound):
                self.call(fork)
            return NOT_AN_ID
        if self.model.live_run(new_run_id) is not None:
            with pytest.raises(ConflictError):
                self.call(fork)
            return NOT_AN_ID
        forked = self.call(fork)
        metadata = forked.metadata
        assert (metadata.sequence, metadata.parent_id, metadata.status) == (0, source, ACTIVE)
        assert metadata.expires_at == (None if ttl is None else self.clock.now + ttl)
        assert forked.state == original.state
        assert forked.messages == original.messages
        assert metadata.tags == original.tags
        self.model.append(
            ModelCheckpoint(
                checkpoint_id=forked.checkpoint_id,
                run_id=new_run_id,
                sequence=0,
                state=copy.deepcopy(original.state),
                tags=list(original.tags),
                parent_id=source,
                expires_at=metadata.expires_at,
                messages=copy.deepcopy(original.messages),
            ),
            self.limit(process),
        )
        return forked.checkpoint_id

    @rule(
        process=processes,
        status=st.none() | st.sampled_from([ACTIVE, PAUSED, COMPLETED, FAILED, REJECTED]),
        limit=st.sampled_from([1, 2, 100]),
    )
    def list_runs(self, process: int, status: CheckpointStatus | None, limit: int) -> None:
        manager = self.manager(process)
        listed: list[str] = []
        cursor: str | None = None
        for _ in range(len(RUN_IDS) + 2):
            page = self.call(manager.list_runs, status, limit=limit, cursor=cursor)
            listed += [info.run_id for info in page]
            cursor = page.next_cursor
            if cursor is None:
                break
        expected = [
            run_id
            for run_id in RUN_IDS
            if (run := self.model.live_run(run_id)) is not None
            and (status is None or run.status is status)
        ]
        assert sorted(listed) == sorted(expected), (listed, cursor)
        assert self.call(manager.count_runs, status) == len(expected)

    @rule(
        process=processes,
        run_id=st.sampled_from(RUN_IDS),
        limit=st.sampled_from([1, 2, 100]),
    )
    def list_with_expired(self, process: int, run_id: str, limit: int) -> None:
        """``include_expired=True``, paged with ``before``: what the store holds."""
        manager = self.manager(process)
        run = self.model.runs.get(run_id)
        held = [] if run is None else sorted(run.held.values(), key=lambda c: -c.sequence)
        listed: list[Any] = []
        before: str | None = None
        for _ in range(len(held) // limit + 2):  # a page more than needed, and one empty
            page = self.call(
                manager.list_checkpoints, run_id, limit, before=before, include_expired=True
            )
            listed += page
            if len(page) < limit:
                break
            before = page[-1].checkpoint_id
        assert [m.checkpoint_id for m in listed] == [c.checkpoint_id for c in held]
        for metadata, checkpoint in zip(listed, held, strict=True):
            assert run is not None
            expired = not _live(checkpoint.expires_at, self.clock.now)
            assert metadata.status is (EXPIRED if expired else run.status), metadata

    @rule(
        target=ids,
        run_id=st.sampled_from(RUN_IDS),
        first=states,
        second=states,
        ttl=ttls,
    )
    def race_creates(
        self, run_id: str, first: dict[str, Any], second: dict[str, Any], ttl: float | None
    ) -> MultipleResults[str]:
        """Two creates of one run at once, one through each manager: both land, at the
        run's next two sequences, in some order (checked in that order)."""
        ttl = None if ttl is None else ttl * self.TIME_SCALE
        calls = [
            functools.partial(self.manager(process).create, run_id, state, ttl_seconds=ttl)
            for process, state in ((0, first), (1, second))
        ]
        created = self.call_both(*calls)
        assert all(isinstance(result, Checkpoint) for result in created), created
        landed = sorted(
            zip(created, (first, second), (0, 1), strict=True),
            key=lambda made: made[0].metadata.sequence,
        )
        for checkpoint, state, process in landed:
            sequence, parent, status = self.model.next_append(run_id)
            metadata = checkpoint.metadata
            assert (metadata.sequence, metadata.parent_id) == (sequence, parent), created
            assert metadata.status is status, created
            assert metadata.expires_at == (None if ttl is None else self.clock.now + ttl)
            self.model.append(
                ModelCheckpoint(
                    checkpoint_id=checkpoint.checkpoint_id,
                    run_id=run_id,
                    sequence=sequence,
                    state=state,
                    tags=[],
                    parent_id=parent,
                    expires_at=metadata.expires_at,
                ),
                self.limit(process),
            )
        return multiple(*(checkpoint.checkpoint_id for checkpoint in created))

    @rule(target=ids, run_id=st.sampled_from(RUN_IDS), state=states)
    def race_create_and_delete_run(self, run_id: str, state: dict[str, Any]) -> str:
        """A create and a ``delete_run`` of one run at once, through the two managers: the
        run left over says which came first (none: the create; a run at sequence 0: the
        delete), and both answers must be that order's."""
        created, deleted = self.call_both(
            functools.partial(self.manager(0).create, run_id, state),
            functools.partial(self.manager(1).delete_run, run_id),
        )
        assert isinstance(created, Checkpoint), created
        assert isinstance(deleted, int), deleted
        delete_first = self.call(self.manager(0).get_run, run_id) is not None
        if delete_first:
            run = self.model.runs.pop(run_id, None)
            assert deleted == (0 if run is None else len(run.held))
        sequence, parent, status = self.model.next_append(run_id)
        metadata = created.metadata
        assert (metadata.sequence, metadata.parent_id) == (sequence, parent), created
        failed = (run := self.model.live_run(run_id)) is not None and run.status is FAILED
        # A create that resumes a failed run makes it active after its append: when the
        # delete comes in between, there is no run to resume, and it reports the failure its
        # append saw (docs/concepts.md, "A failed run is resumable").
        assert metadata.status is status or (failed and not delete_first), created
        self.model.append(
            ModelCheckpoint(
                checkpoint_id=created.checkpoint_id,
                run_id=run_id,
                sequence=sequence,
                state=state,
                tags=[],
                parent_id=parent,
                expires_at=None,
            ),
            self.limit(0),
        )
        if not delete_first:
            assert deleted == len(self.model.runs.pop(run_id).held)
        return created.checkpoint_id

    @rule(run_id=st.sampled_from(RUN_IDS))
    def race_status(self, run_id: str) -> None:
        """``mark_completed`` and ``mark_failed`` at once, through the two managers: one
        wins, the other is refused (or returns the run unchanged if it already was so)."""
        completed, failed = self.call_both(
            functools.partial(self.manager(0).mark_completed, run_id),
            functools.partial(self.manager(1).mark_failed, run_id, "raced"),
        )
        run = self.model.live_run(run_id)
        if run is None:
            assert (completed, failed) == (None, None)
            return
        outcomes = {COMPLETED: completed, FAILED: failed}
        if run.status in (ACTIVE, PAUSED):
            winners = [status for status, result in outcomes.items()
                       if not isinstance(result, CheckpointError)]
            assert len(winners) == 1, outcomes
            run.change(winners[0], "raced")
        for status, result in outcomes.items():
            if status is run.status:
                assert not isinstance(result, CheckpointError), outcomes
                assert result.status is status
            else:
                assert isinstance(result, ConflictError), outcomes

    @rule(seconds=clock_steps)
    def advance_clock(self, seconds: float) -> None:
        self.clock.advance(seconds * self.TIME_SCALE)

    @rule(process=processes)
    def cleanup_expired(self, process: int) -> None:
        assert self.call(self.manager(process).cleanup_expired) == self.model.cleanup()

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def runs_agree(self) -> None:
        live = sum(1 for run_id in RUN_IDS if self.model.live_run(run_id) is not None)
        for manager in self.managers:
            for run_id in RUN_IDS:
                info = self.call(manager.get_run, run_id)
                run = self.model.live_run(run_id)
                if run is None:
                    assert info is None, f"{run_id!r} should not be live: {info}"
                    continue
                assert info is not None, f"{run_id!r} should be live"
                assert info.status is run.status
                assert info.latest_sequence == run.latest_sequence
                assert info.checkpoint_count == len(run.held)
                assert info.expires_at == run.expiry()
                assert info.error == run.error
                assert [change.status for change in info.history] == run.history
            assert self.call(manager.count_runs) == live

    @invariant()
    def latest_agrees(self) -> None:
        for manager in self.managers:
            for run_id in RUN_IDS:
                actual = self.call(manager.restore, run_id)
                self.check_checkpoint(actual, self.model.restore(run_id))


MACHINE_SETTINGS = settings(
    max_examples=30,  # 40 before the rules grew: about the same time as then
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
        process=processes,
        run_id=st.sampled_from(RUN_IDS),
        parent_id=checkpoint_ids,
        state=states,
    )
    def create_with_parent(
        self, process: int, run_id: str, parent_id: str, state: dict[str, Any]
    ) -> str:
        parent = self.model.restore_from(parent_id)
        if parent is None or parent.run_id != run_id:
            before = self.model.next_append(run_id)
            with pytest.raises(CheckpointNotFound):
                self.call(self.manager(process).create, run_id, state, parent_id=parent_id)
            assert self.model.next_append(run_id) == before
            return NOT_AN_ID
        return self.append(process, run_id, state, None, [], parent_id=parent_id)


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
