"""Differential model checking: ``CheckpointManager`` against FastAgentic 1.2.2's own.

A hypothesis ``RuleBasedStateMachine`` applies the same random operations to FastAgentic's
``CheckpointManager`` (on its ``InMemoryCheckpointStore``, or in a second machine its
``FileCheckpointStore`` in a fresh directory) and to fastcheckpoint's (on the stores it
offers under those names): ``create`` (state, messages, tool calls, context, step name, tags,
TTL, an explicit parent, ``force`` under a throttling interval), ``restore``,
``restore_from`` (also of ids deleted, pruned, or of a run id used again), ``list_checkpoints``
with limits, ``delete``, ``delete_run``, ``mark_completed``, ``mark_failed``, changes to each
manager's ``config`` (the pruning limit, the default TTL), clock moves, cleanup of expired
checkpoints, and a restart of ours (a new manager and store over the same data, as another
process). After every step it compares what a caller sees: the checkpoints returned, their
metadata, listing order and length, counts, and the ``to_dict``/``to_json``/``from_json``
round trips of each checkpoint returned, also read by the other library's ``from_json``.

Both run on one fake clock. FastAgentic reads ``time.time()`` through its module's ``time``
name, which the machine points at the clock; its ``CheckpointMetadata`` draws ``created_at``
from a ``time.time`` bound when the class was defined, so the FastAgentic store is wrapped to
stamp each new checkpoint's ``created_at`` from the clock as it is saved (what FastAgentic
would record at that moment). Clock steps are multiples of 0.75 s and TTLs are not, so no
check falls on an expiry boundary (FastAgentic expires at ``now > created_at + ttl``, ours at
``now >= expires_at``: a documented difference).

Normalizations, each a difference docs/migrating-from-fastagentic.md documents, named where
it is applied:

- "Status": status belongs to the run. Each side is checked against its own documented rule
  (FastAgentic's on the newest checkpoint it holds, which a mark re-saves; ours in the run
  record), and the run's is what ours reports on every read.
- "mark_failed error text": FastAgentic writes the error into the newest checkpoint's
  ``context["error"]``; ours leaves checkpoints alone.
- "parent_id": ours defaults to the run's previous checkpoint; an explicit one must be a live
  checkpoint of the same run (other parents are checked against ours alone).
- "list_checkpoints" and "restore(run_id) when the newest checkpoint expired": ours omits
  expired checkpoints and restores the newest live one.
- "Pruning": ours keeps the newest N live checkpoints and removes expired ones first;
  FastAgentic keeps the newest N, expired or not, and deletes at most 10 of the surplus per
  create.
- "A run whose checkpoints are all gone": ours starts it again at sequence 0 (a new run);
  FastAgentic's counter goes on.
- "delete return", "mark_completed / mark_failed return", "Checkpoint ids", "to_json text"
  (one more key, ``expires_at``), "Object identity" (FastAgentic gets copies of the inputs,
  as its in-memory store keeps the caller's objects).
- Refused input ("Argument checks", "ttl_seconds=0", "A run id that is not a non-empty str",
  "restore_from, delete ... with an id that is not a str", "Serialization"): ours raises the
  documented error and writes nothing; such calls are checked against ours alone, and
  FastAgentic is run on a scratch manager to show what it does instead.

CI runs a few fixed (derandomized) examples per store. Hunt with random ones:
``FADIFF_EXAMPLES=400`` (examples per machine).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar
from unittest import mock

import pytest

pytest.importorskip("fastagentic")

import fastagentic.checkpoint.base as fa_base
from anyio.from_thread import BlockingPortal, start_blocking_portal
from fastagentic.checkpoint import Checkpoint as FACheckpoint
from fastagentic.checkpoint import CheckpointConfig as FAConfig
from fastagentic.checkpoint import CheckpointManager as FAManager
from fastagentic.checkpoint import FileCheckpointStore as FAFileStore
from fastagentic.checkpoint import InMemoryCheckpointStore as FAMemoryStore
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from fastcheckpoint import (
    Checkpoint,
    CheckpointConfig,
    CheckpointManager,
    CheckpointMetadata,
    CheckpointNotFound,
    ConflictError,
    FileCheckpointStore,
    InMemoryCheckpointStore,
    SerializationError,
    ValidationError,
)
from tests._helpers import QUICK_RETRY, FakeClock

T = TypeVar("T")

RUN_IDS = ("run-1", "run-2", "ü é:3")
"""Run ids; no ``/``: FastAgentic's file store makes a run id a directory name."""
TTLS = (None, 10.0, 25, 100.0)
"""Not multiples of the clock's 0.75 s steps: no read falls on an expiry boundary. One is an
``int``: ours reports it as a ``float`` ("ttl_seconds=0" row: ``3600`` comes back as
``3600.0``)."""
ACTIVE, COMPLETED, FAILED = "active", "completed", "failed"

texts = st.text(max_size=6) | st.sampled_from(["", "Héllo ✓", "\u0000", "😀", "x" * 100])
scalars = (
    st.none() | st.booleans() | texts
    | st.integers(-(2 ** 63), 2 ** 64 - 1) | st.sampled_from([0, -1, 2 ** 63 - 1, 2 ** 64 - 1])
    | st.floats() | st.sampled_from([0.0, -0.0, 1e16, 5e-324, math.inf, math.nan])
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=6,
)
objects = st.dictionaries(texts, values, max_size=3)
message_lists = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": texts})
    | objects | texts, max_size=3)
tag_lists = st.lists(st.sampled_from(["a", "b", "ü"]), max_size=3)


def typed(value: Any) -> Any:
    """``value`` with every type spelled out, so that ``1``, ``1.0`` and ``True`` differ, as
    do ``-0.0`` and ``0.0``; NaN equals NaN, and dict key order counts."""
    if isinstance(value, dict):
        return ("dict", [(typed(key), typed(item)) for key, item in value.items()])
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [typed(item) for item in value])
    if isinstance(value, float):
        return ("float", value.hex())
    return (type(value).__name__, value)


REFUSED_CREATES: dict[str, tuple[dict[str, Any], type[Exception], bool]] = {
    # case: (arguments, ours' error, whether FastAgentic's file store raises TypeError)
    "state None": ({"state": None}, ValidationError, False),  # "Argument checks"
    "state list": ({"state": [1]}, ValidationError, False),
    "messages str": ({"messages": "abc"}, ValidationError, False),
    "messages dict": ({"messages": {"a": 1}}, ValidationError, False),
    "tool_calls str": ({"tool_calls": "abc"}, ValidationError, False),
    "context list": ({"context": [1]}, ValidationError, False),
    "step_name None": ({"step_name": None}, ValidationError, False),
    "tags str": ({"tags": "abc"}, ValidationError, False),
    "tags ints": ({"tags": [1, 2]}, ValidationError, False),
    "ttl 0": ({"ttl_seconds": 0}, ValidationError, False),  # "ttl_seconds=0"
    "ttl -1": ({"ttl_seconds": -1}, ValidationError, False),
    "ttl nan": ({"ttl_seconds": math.nan}, ValidationError, False),
    "ttl str": ({"ttl_seconds": "5"}, ValidationError, False),
    "ttl True": ({"ttl_seconds": True}, ValidationError, False),
    "run id empty": ({"run_id": ""}, ValidationError, False),  # "A run id that is not ..."
    "run id None": ({"run_id": None}, ValidationError, True),
    "run id int": ({"run_id": 7}, ValidationError, True),
    # "Serialization": outside the rules (64-bit ints, no lone surrogates, plain data).
    "int beyond 64 bits": ({"state": {"v": 2 ** 64}}, SerializationError, False),
    "lone surrogate": ({"state": {"v": "\ud800"}}, SerializationError, False),
    "object": ({"context": {"v": object()}}, SerializationError, True),
}

RUN = object()
"""Stands for the rule's run id in :data:`REFUSED_CALLS`."""
REFUSED_CALLS: dict[str, tuple[str, list[Any], Any, bool]] = {
    # case: (method, arguments, FastAgentic's result (or TypeError, or the ids it lists given
    # the ids it holds, newest first), whether its file store raises TypeError instead)
    "limit -1": ("list_checkpoints", [RUN, -1], lambda held: held[:-1], False),  # all but one
    "limit True": ("list_checkpoints", [RUN, True], lambda held: held[:1], False),
    "limit 2.5": ("list_checkpoints", [RUN, 2.5], TypeError, False),
    "limit str": ("list_checkpoints", [RUN, "3"], TypeError, False),
    "restore None": ("restore", [None], None, True),
    "restore empty": ("restore", [""], None, False),
    "restore_from None": ("restore_from", [None], None, False),
    "restore_from int": ("restore_from", [7], None, False),
    "delete None": ("delete", [None], None, False),
    "delete_run empty": ("delete_run", [""], 0, False),
    "mark_completed None": ("mark_completed", [None], None, True),
    "mark_failed error None": ("mark_failed", [RUN, None], None, False),
    "mark_failed error int": ("mark_failed", [RUN, 3], None, False),
}


@dataclass(eq=False)
class Entry:
    """One checkpoint both libraries created."""

    run_id: str
    fa_id: str
    ours_id: str
    fa_sequence: int
    ours_sequence: int
    created_at: float
    expires_at: float | None
    step_name: str
    tags: list[str]
    ttl_seconds: float | None
    parent: Entry | None
    """The parent passed explicitly, else ``None``."""
    ours_parent: str | None
    """The parent id ours reports: the explicit one, else the run's previous checkpoint."""
    payload: tuple[Any, ...]
    """state, messages, tool_calls, context as passed to ``create``."""
    fa_held: bool = True
    ours_held: bool = True
    fa_status: str = ACTIVE
    """What FastAgentic stored on this checkpoint: a mark re-saves the newest one."""
    fa_error: str | None = None
    """The ``context["error"]`` FastAgentic's ``mark_failed`` wrote into this checkpoint."""
    differs: str | None = None
    """The documented difference that makes one library hold it and the other not."""

    def live(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at


@dataclass
class RunModel:
    """What each library holds of one run id."""

    entries: list[Entry] = field(default_factory=list)
    fa_counter: int = 0
    """FastAgentic's in-process sequence counter (reset by ``delete_run`` only)."""
    ours_next: int = 0
    ours_previous: str | None = None
    """The id of the newest checkpoint ours created in the current run (deleted or not)."""
    status: str | None = None
    """The run's status in ours (``None``: no live run)."""
    last_create: float | None = None
    """When the last create that was not throttled ran (the throttling interval's start)."""

    def ours_live(self, now: float) -> list[Entry]:
        return [e for e in self.entries if e.ours_held and e.live(now)]


class StampingMemoryStore(FAMemoryStore):
    """FastAgentic's in-memory store, stamping ``created_at`` from the machine's clock on a
    checkpoint's first save (see the module docstring)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock

    async def save(self, checkpoint: Any) -> None:
        if checkpoint.checkpoint_id not in self._checkpoints:
            checkpoint.metadata.created_at = self.clock.now
        await super().save(checkpoint)


class StampingFileStore(FAFileStore):
    """FastAgentic's file store, stamping ``created_at`` as :class:`StampingMemoryStore`."""

    def __init__(self, base_path: Path, clock: FakeClock) -> None:
        super().__init__(base_path)
        self.clock = clock
        self.seen: set[str] = set()

    async def save(self, checkpoint: Any) -> None:
        if checkpoint.checkpoint_id not in self.seen:
            self.seen.add(checkpoint.checkpoint_id)
            checkpoint.metadata.created_at = self.clock.now
        await super().save(checkpoint)


class DifferentialMachine(RuleBasedStateMachine):
    """Subclasses pick the stores."""

    STORE_KIND = "memory"

    def __init__(self) -> None:
        super().__init__()
        self._exit = ExitStack()
        self.portal: BlockingPortal = self._exit.enter_context(
            start_blocking_portal(backend="asyncio"))
        self.directory = Path(tempfile.mkdtemp(prefix="fastcheckpoint-fadiff-"))
        self._exit.callback(shutil.rmtree, self.directory, ignore_errors=True)
        self.clock = FakeClock()
        # FastAgentic's base module reads the time as ``time.time()``: the same clock.
        self._exit.enter_context(
            mock.patch.object(fa_base, "time", SimpleNamespace(time=self.clock)))
        self.runs = {run_id: RunModel() for run_id in RUN_IDS}
        self.gone: list[Entry] = []
        """Checkpoints neither library holds any more (deleted, pruned, purged)."""
        self.built = False

    def fa_store(self) -> Any:
        if self.STORE_KIND == "memory":
            return StampingMemoryStore(self.clock)
        return StampingFileStore(self.directory / "fastagentic", self.clock)

    @initialize(limit=st.sampled_from([0, 1, 2, 2, 3, 100]), default_ttl=st.sampled_from(TTLS),
                interval=st.sampled_from([0.0, 0.0, 5.0]))
    def build(self, limit: int, default_ttl: float | None, interval: float) -> None:
        self.limit, self.default_ttl, self.interval = limit, default_ttl, interval
        self.built = True
        self.fa_store_used = self.fa_store()
        self.fa = FAManager(self.fa_store_used, FAConfig(
            max_checkpoints_per_run=limit, default_ttl_seconds=default_ttl,
            checkpoint_interval=interval))
        self.ours_config = CheckpointConfig(
            max_checkpoints_per_run=limit, default_ttl_seconds=default_ttl,
            checkpoint_interval=interval, clock=self.clock, retry=QUICK_RETRY)
        # FastAgentic's names for our stores, as a ported program builds them.
        store = InMemoryCheckpointStore() if self.STORE_KIND == "memory" else \
            FileCheckpointStore(self.directory / "ours", fsync=False)
        self.ours = CheckpointManager(store, self.ours_config)

    @rule(limit=st.sampled_from([-1, 0, 1, 2, 5, 100]), default_ttl=st.sampled_from(TTLS))
    def change_config(self, limit: int, default_ttl: float | None) -> None:
        """Both managers read their config at each call: the same change to each."""
        for config in (self.fa.config, self.ours.config):
            config.max_checkpoints_per_run = limit
            config.default_ttl_seconds = default_ttl
        # Zero or less keeps everything, in both (assigned after construction, ours takes a
        # negative one as FastAgentic did).
        self.limit, self.default_ttl = max(limit, 0), default_ttl

    @rule()
    def ours_restarts(self) -> None:
        """Ours goes on in a new process: a new manager (and file store) over the same data.
        It must go on as FastAgentic's one process does ("Sequence numbers": they come from
        the store). Not under a throttling interval, which is per process in both."""
        if self.interval > 0:
            return
        if self.STORE_KIND == "memory":
            store: Any = self.ours.store
        else:
            self.call(self.ours.aclose)
            store = FileCheckpointStore(self.directory / "ours", fsync=False)
        self.ours = CheckpointManager(store, self.ours.config)

    def call(self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        return self.portal.call(functools.partial(func, *args, **kwargs))

    def teardown(self) -> None:
        try:
            if self.built:
                self.call(self.ours.aclose)
        finally:
            self._exit.close()

    # -- helpers ----------------------------------------------------------------------------

    @property
    def now(self) -> float:
        return self.clock.now

    def entry_of(self, fa_id: str) -> Entry:
        for run in self.runs.values():
            for entry in run.entries:
                if entry.fa_id == fa_id:
                    return entry
        raise AssertionError(f"FastAgentic returned a checkpoint nobody created: {fa_id}")

    def fa_newest(self, run: RunModel) -> Entry | None:
        """The checkpoint FastAgentic's ``load_latest`` finds: the highest sequence it holds,
        expired or not."""
        held = [e for e in run.entries if e.fa_held]
        return max(held, key=lambda e: e.fa_sequence, default=None)

    def all_entries(self) -> list[Entry]:
        return [entry for run in self.runs.values() for entry in run.entries]

    def expected_status(self, entry: Entry) -> str:
        """The status ours reports on a read of ``entry``: the run's ("Status")."""
        status = self.runs[entry.run_id].status
        assert status is not None, f"read a checkpoint of a run that is not live: {entry}"
        return status

    def check_fa(self, got: Any, entry: Entry) -> None:
        """FastAgentic's checkpoint as FastAgentic's own rules say it is."""
        metadata = got.metadata
        assert (metadata.run_id, metadata.checkpoint_id, metadata.sequence,
                metadata.created_at, metadata.step_name, metadata.tags,
                metadata.ttl_seconds) == (
            entry.run_id, entry.fa_id, entry.fa_sequence, entry.created_at, entry.step_name,
            entry.tags, entry.ttl_seconds)
        # FastAgentic's parent is the one passed, or None ("parent_id").
        assert metadata.parent_id == (None if entry.parent is None else entry.parent.fa_id)
        assert metadata.status.value == entry.fa_status  # "Status": on the checkpoint
        state, messages, tool_calls, context = entry.payload
        if entry.fa_error is not None:
            # "mark_failed error text": written into the newest checkpoint's context.
            context = {**context, "error": entry.fa_error}
        assert typed((got.state, got.messages, got.tool_calls, got.context)) == typed(
            (state, messages, tool_calls, context))

    def check_same(self, fa: Any, ours: Any, entry: Entry) -> None:
        """A checkpoint both returned: ours equals FastAgentic's, but for the documented
        differences."""
        self.check_fa(fa, entry)
        assert isinstance(ours, Checkpoint)
        metadata = ours.metadata
        assert (metadata.run_id, metadata.checkpoint_id, metadata.created_at,
                metadata.step_name, metadata.tags, metadata.ttl_seconds,
                metadata.expires_at) == (
            entry.run_id, entry.ours_id, entry.created_at, entry.step_name, entry.tags,
            entry.ttl_seconds, entry.expires_at)
        # Sequences agree but where ours started the run again ("A run whose checkpoints
        # are all gone"): each side is checked against its own count.
        assert metadata.sequence == entry.ours_sequence
        assert metadata.parent_id == entry.ours_parent  # "parent_id"
        assert metadata.status.value == self.expected_status(entry)  # "Status": the run's
        # "mark_failed error text": ours leaves the checkpoint as it was created.
        assert typed((ours.state, ours.messages, ours.tool_calls, ours.context)) == typed(
            entry.payload)
        self.check_round_trips(fa, ours)

    def check_round_trips(self, fa: Any, ours: Checkpoint) -> None:
        assert Checkpoint.from_dict(ours.to_dict()) == ours
        back = Checkpoint.from_json(ours.to_json())
        assert typed(back.to_dict()) == typed(ours.to_dict())
        # Each library reads the other's JSON ("to_json text": ours has one more key).
        from_ours = FACheckpoint.from_json(ours.to_json())
        ours_dict = ours.to_dict()
        del ours_dict["metadata"]["expires_at"]
        assert typed(from_ours.to_dict()) == typed(ours_dict)
        from_fa = Checkpoint.from_json(fa.to_json())
        fa_dict = fa.to_dict()
        expires_at = None if fa_dict["metadata"]["ttl_seconds"] is None else (
            fa_dict["metadata"]["created_at"] + fa_dict["metadata"]["ttl_seconds"])
        fa_dict["metadata"]["expires_at"] = expires_at
        if fa_dict["metadata"]["ttl_seconds"] is not None:  # "ttl_seconds=0": a float
            fa_dict["metadata"]["ttl_seconds"] = float(fa_dict["metadata"]["ttl_seconds"])
        assert typed(from_fa.to_dict()) == typed(fa_dict)
        assert set(json.loads(fa.to_json())) == set(json.loads(ours.to_json()))

    # -- create -----------------------------------------------------------------------------

    @rule(run_id=st.sampled_from(RUN_IDS), state=objects, messages=message_lists,
          tool_calls=st.lists(objects, max_size=2), context=objects,
          step_name=texts, tags=tag_lists, ttl=st.sampled_from(TTLS),
          parent=st.none() | st.integers(0, 50), force=st.booleans(),
          omit=st.booleans())
    def create(self, run_id: str, state: dict[str, Any], messages: list[Any],
               tool_calls: list[Any], context: dict[str, Any], step_name: str,
               tags: list[str], ttl: float | None, parent: int | None, force: bool,
               omit: bool) -> None:
        run = self.runs[run_id]
        now = self.now
        # "parent_id": an explicit parent is a live checkpoint of the run (others: below).
        live = run.ours_live(now)
        parent_entry = None
        if parent is not None and live:
            candidates = [e for e in live if e.fa_held and e.live(now)]
            parent_entry = candidates[parent % len(candidates)] if candidates else None
        kwargs: dict[str, Any] = {
            "messages": messages, "tool_calls": tool_calls, "context": context,
            "step_name": step_name, "tags": tags, "ttl_seconds": ttl, "force": force}
        if omit:  # FastAgentic's defaults, by leaving the arguments out
            kwargs = {"force": force, "ttl_seconds": ttl}
            messages, tool_calls, context, step_name, tags = [], [], {}, "", []
        payload = copy.deepcopy((state, messages, tool_calls, context))
        fa_kwargs = copy.deepcopy(kwargs)  # "Object identity": FastAgentic keeps them
        if parent_entry is not None:
            fa_kwargs["parent_id"], kwargs["parent_id"] = parent_entry.fa_id, parent_entry.ours_id
        fa_state = copy.deepcopy(state)
        fa = self.call(self.fa.create, run_id, fa_state, **fa_kwargs)
        ours = self.call(self.ours.create, run_id, state, **kwargs)
        if fa is not None and ours is not None:
            # Both return the caller's own objects in the checkpoint create returns.
            assert fa.state is fa_state
            assert ours.state is state
            if not omit and messages and context:  # FastAgentic replaces empty ones
                assert fa.messages is fa_kwargs["messages"]
                assert ours.messages is messages
                assert fa.context is fa_kwargs["context"]
                assert ours.context is context
        throttled = (not force and self.interval > 0 and run.last_create is not None
                     and now - run.last_create < self.interval)
        if throttled:
            assert (fa, ours) == (None, None)
            return
        assert fa is not None
        assert ours is not None
        run.last_create = now
        ttl_used = ttl if ttl is not None else self.default_ttl
        if not run.ours_live(now):
            # "A run whose checkpoints are all gone": ours starts a new run at 0, ACTIVE.
            run.ours_next, run.ours_previous, run.status = 0, None, ACTIVE
        elif run.status == FAILED:
            run.status = ACTIVE  # "Status": a create resumes a failed run
        entry = Entry(
            run_id=run_id, fa_id=fa.checkpoint_id, ours_id=ours.checkpoint_id,
            fa_sequence=run.fa_counter, ours_sequence=run.ours_next, created_at=now,
            expires_at=None if ttl_used is None else now + ttl_used, step_name=step_name,
            tags=tags, ttl_seconds=ttl_used, parent=parent_entry,
            ours_parent=parent_entry.ours_id if parent_entry else run.ours_previous,
            payload=payload)
        run.fa_counter += 1
        run.ours_next += 1
        run.ours_previous = ours.checkpoint_id
        run.entries.append(entry)
        self.prune(run)
        self.check_same(fa, ours, entry)

    @rule(run_id=st.sampled_from(RUN_IDS), step=st.integers(0, 3),
          ttl=st.sampled_from([None, 10.0, 10.0, 100.0]), parent=st.none() | st.integers(0, 50))
    def create_small(self, run_id: str, step: int, ttl: float | None,
                     parent: int | None) -> None:
        """A quick create, so that runs grow long enough to prune, expire and restart."""
        self.create(run_id, {"step": step}, [{"role": "user", "content": str(step)}], [], {},
                    f"step-{step}", [], ttl, parent, True, False)

    @rule(run_id=st.sampled_from(RUN_IDS), added=st.integers(1, 30),
          edit=st.none() | st.integers(0, 100), ttl=st.sampled_from([None, None, 10.0]),
          big=st.sampled_from([False, False, False, True]))
    def create_conversation(self, run_id: str, added: int, edit: int | None,
                            ttl: float | None, big: bool) -> None:
        """A create whose messages and tool calls extend those of the run's newest live
        checkpoint, as an agent's do: past 32 entries ours stores them as logs. ``edit``
        changes an earlier entry (not an append); ``big`` makes the state large enough to be
        compressed and encoded in a worker thread."""
        live = self.runs[run_id].ours_live(self.now)
        newest = max(live, key=lambda e: e.ours_sequence) if live else None
        messages = [] if newest is None else list(newest.payload[1])
        tool_calls = [] if newest is None else list(newest.payload[2])
        count = len(messages)
        messages += [{"role": "user", "content": f"message {count + i}"} for i in range(added)]
        tool_calls += [{"name": "search", "arguments": {"n": count + i}}
                       for i in range(added // 2)]
        if edit is not None:
            messages[edit % len(messages)] = {"role": "system", "content": f"edited {edit}"}
        state: dict[str, Any] = {"turn": len(messages)}
        if big:
            state["blob"] = "x" * 600_000
        self.create(run_id, state, messages, tool_calls, {}, "turn", [], ttl, None, True,
                    False)

    # More names for the quick creates: creates are a third of the steps then.
    create_more = create_small
    create_again = create_small
    continue_conversation = create_conversation

    @rule(run_id=st.sampled_from(RUN_IDS), completed=st.booleans())
    def mark_small(self, run_id: str, completed: bool) -> None:
        self.mark(run_id, completed, "boom")

    def prune(self, run: RunModel) -> None:
        now = self.now
        for entry in run.entries:
            if entry.ours_held and not entry.live(now):
                entry.ours_held = False  # "Pruning": ours removes expired ones first
        if self.limit > 0:
            # "Pruning": FastAgentic keeps the newest N it holds, expired or not; ours the
            # newest N live ones.
            # FastAgentic lists N + 10 of them, and deletes those beyond N.
            newest = sorted((e for e in run.entries if e.fa_held), key=lambda e: -e.fa_sequence)
            for entry in newest[self.limit:self.limit + 10]:
                entry.fa_held = False
            for index, entry in enumerate(sorted(
                    (e for e in run.entries if e.ours_held), key=lambda e: -e.ours_sequence)):
                if index >= self.limit:
                    entry.ours_held = False
        for entry in run.entries:
            if entry.fa_held != entry.ours_held and entry.live(now):
                entry.differs = "Pruning"
        self.drop_gone(run)

    def drop_gone(self, run: RunModel) -> None:
        self.gone += [e for e in run.entries if not (e.fa_held or e.ours_held)]
        run.entries = [e for e in run.entries if e.fa_held or e.ours_held]

    @rule(run_id=st.sampled_from(RUN_IDS), which=st.integers(0, 50))
    def create_with_a_parent_ours_refuses(self, run_id: str, which: int) -> None:
        """"parent_id": a parent that is not a live checkpoint of the run is
        ``CheckpointNotFound`` in ours, nothing written (FastAgentic stores any string)."""
        now = self.now
        others = [e.ours_id for e in [*self.all_entries(), *self.gone]
                  if e.run_id != run_id or not e.ours_held or not e.live(now)]
        parent = [*others, "ckpt-0123456789ab", "ck-nothing"][which % (len(others) + 2)]
        with pytest.raises(CheckpointNotFound):
            self.call(self.ours.create, run_id, {"x": 1}, parent_id=parent, force=True)

    @rule(run_id=st.sampled_from(RUN_IDS), case=st.sampled_from(sorted(REFUSED_CREATES)))
    def create_refused(self, run_id: str, case: str) -> None:
        """Input ours refuses with the documented error, writing nothing. FastAgentic, on a
        scratch manager (so that the compared one stays in step), stores it, or raises the
        ``TypeError`` its file store's ``json.dumps`` or path join raises."""
        arguments, error, fa_file_error = REFUSED_CREATES[case]
        arguments = {"run_id": run_id, "state": {"x": 1}, "force": True, **arguments}
        before = self.snapshot()
        with pytest.raises(error):
            self.call(self.ours.create, **copy.deepcopy(arguments))
        assert self.snapshot() == before
        scratch = FAManager(self.fa_store() if self.STORE_KIND == "memory" else
                            FAFileStore(tempfile.mkdtemp(dir=self.directory)))
        if self.STORE_KIND == "file" and fa_file_error:
            with pytest.raises(TypeError):
                self.call(scratch.create, **arguments)
        else:
            assert self.call(scratch.create, **arguments) is not None

    @rule(run_id=st.sampled_from(RUN_IDS), case=st.sampled_from(sorted(REFUSED_CALLS)))
    def call_refused(self, run_id: str, case: str) -> None:
        """The other calls' refused input ("Argument checks", "A run id that is not a
        non-empty str", "restore_from, delete, lineage with an id that is not a str"):
        ``ValidationError``, nothing changed. FastAgentic's outcome, on the compared manager
        where it changes nothing, else on a scratch one: a result or a ``TypeError``."""
        name, arguments, fa_outcome, fa_file_error = REFUSED_CALLS[case]
        arguments = [run_id if a is RUN else a for a in arguments]
        before = self.snapshot()
        with pytest.raises(ValidationError):
            self.call(getattr(self.ours, name), *arguments)
        assert self.snapshot() == before
        if name.startswith(("mark_", "delete")):  # on a scratch manager, as they may change
            fa = FAManager(self.fa_store() if self.STORE_KIND == "memory" else
                           FAFileStore(tempfile.mkdtemp(dir=self.directory)))
        else:
            fa = self.fa
        if fa_outcome is TypeError and self.STORE_KIND == "file":
            # Its file store slices only the runs it has a directory for.
            with contextlib.suppress(TypeError):
                assert self.call(getattr(fa, name), *arguments) == []
        elif fa_outcome is TypeError or (self.STORE_KIND == "file" and fa_file_error):
            with pytest.raises(TypeError):
                self.call(getattr(fa, name), *arguments)
        elif callable(fa_outcome):
            held = sorted((e for e in self.runs[run_id].entries if e.fa_held),
                          key=lambda e: -e.fa_sequence)
            got = self.call(getattr(fa, name), *arguments)
            assert [m.checkpoint_id for m in got] == fa_outcome([e.fa_id for e in held])
        else:
            assert self.call(getattr(fa, name), *arguments) == fa_outcome

    def snapshot(self) -> Any:
        return [typed([m.to_dict() for m in self.call(
            self.ours.list_checkpoints, run_id, 1000, include_expired=True)])
            for run_id in RUN_IDS]

    # -- read -------------------------------------------------------------------------------

    @rule(run_id=st.sampled_from(RUN_IDS))
    def restore(self, run_id: str) -> None:
        run = self.runs[run_id]
        fa = self.call(self.fa.restore, run_id)
        ours = self.call(self.ours.restore, run_id)
        newest = self.fa_newest(run)
        if newest is None or not newest.live(self.now):
            assert fa is None  # FastAgentic: None when its newest checkpoint expired
        else:
            assert fa is not None
            self.check_fa(fa, newest)
        # "restore(run_id) when the newest checkpoint expired": the newest live one.
        live = run.ours_live(self.now)
        if not live:
            assert ours is None
            return
        expected = max(live, key=lambda e: e.ours_sequence)
        assert ours is not None
        assert ours.checkpoint_id == expected.ours_id
        if fa is not None:
            assert fa.checkpoint_id == expected.fa_id
            self.check_same(fa, ours, expected)

    @rule(which=st.integers(0, 200))
    def restore_from(self, which: int) -> None:
        entries = [*self.all_entries(), *self.gone]  # gone: also of a run id used again
        if not entries:
            return
        entry = entries[which % len(entries)]
        fa = self.call(self.fa.restore_from, entry.fa_id)
        ours = self.call(self.ours.restore_from, entry.ours_id)
        live = entry.live(self.now)
        assert (fa is not None) == (entry.fa_held and live)
        assert (ours is not None) == (entry.ours_held and live)
        if fa is not None and ours is not None:
            self.check_same(fa, ours, entry)
        # "Checkpoint ids": an id of the other library's is not found.
        assert self.call(self.ours.restore_from, entry.fa_id) is None

    @rule(run_id=st.sampled_from(RUN_IDS), limit=st.sampled_from([0, 1, 2, 3, 100]),
          default=st.booleans())
    def list_checkpoints(self, run_id: str, limit: int, default: bool) -> None:
        run = self.runs[run_id]
        now = self.now
        args = () if default else (limit,)
        limit = 100 if default else limit
        fa = self.call(self.fa.list_checkpoints, run_id, *args)
        ours = self.call(self.ours.list_checkpoints, run_id, *args)
        fa_held = sorted((e for e in run.entries if e.fa_held), key=lambda e: -e.fa_sequence)
        assert [m.checkpoint_id for m in fa] == [e.fa_id for e in fa_held][:limit]
        # "list_checkpoints": ours omits expired ones, then applies the limit.
        live = sorted(run.ours_live(now), key=lambda e: -e.ours_sequence)[:limit]
        assert [m.checkpoint_id for m in ours] == [e.ours_id for e in live]
        listed_by_fa = {m.checkpoint_id: m for m in fa}
        for metadata, entry in zip(ours, live, strict=True):
            assert isinstance(metadata, CheckpointMetadata)
            assert (metadata.sequence, metadata.created_at, metadata.step_name,
                    metadata.tags, metadata.ttl_seconds, metadata.parent_id,
                    metadata.status.value) == (
                entry.ours_sequence, entry.created_at, entry.step_name, entry.tags,
                entry.ttl_seconds, entry.ours_parent, self.expected_status(entry))
            theirs = listed_by_fa.get(entry.fa_id)
            if theirs is not None:
                assert (theirs.created_at, theirs.step_name, theirs.tags,
                        theirs.ttl_seconds) == (metadata.created_at, metadata.step_name,
                                                metadata.tags, metadata.ttl_seconds)
                assert CheckpointMetadata.from_dict(theirs.to_dict()).to_dict() == {
                    **theirs.to_dict(), "expires_at": entry.expires_at}
        for metadata in fa:
            assert metadata.status.value == self.entry_of(metadata.checkpoint_id).fa_status

    # -- delete -----------------------------------------------------------------------------

    @rule(which=st.integers(0, 200))
    def delete(self, which: int) -> None:
        entries = [*self.all_entries(), *self.gone]
        if not entries:
            return
        entry = entries[which % len(entries)]
        assert self.call(self.fa.delete, entry.fa_id) is None
        # "delete(checkpoint_id)": True if it deleted one; an expired one not yet purged is
        # still held, and deleted.
        assert self.call(self.ours.delete, entry.ours_id) is entry.ours_held
        if entry in self.gone:
            return
        entry.fa_held = entry.ours_held = False
        run = self.runs[entry.run_id]
        run.entries.remove(entry)
        self.gone.append(entry)
        self.forget_run_if_gone(run)

    def forget_run_if_gone(self, run: RunModel) -> None:
        if not run.ours_live(self.now):
            run.status = None  # "A run whose checkpoints are all gone"

    @rule(run_id=st.sampled_from(RUN_IDS))
    def delete_run(self, run_id: str) -> None:
        run = self.runs[run_id]
        fa = self.call(self.fa.delete_run, run_id)
        ours = self.call(self.ours.delete_run, run_id)
        assert fa == sum(e.fa_held for e in run.entries)
        # "Pruning": each counts what it held, expired checkpoints not yet purged included.
        assert ours == sum(e.ours_held for e in run.entries)
        for entry in run.entries:
            entry.fa_held = entry.ours_held = False
        self.drop_gone(run)
        self.runs[run_id] = RunModel()

    @rule(run_id=st.sampled_from(RUN_IDS), completed=st.booleans(), error=texts)
    def mark(self, run_id: str, completed: bool, error: str) -> None:
        run = self.runs[run_id]
        target = COMPLETED if completed else FAILED
        if completed:
            fa = self.call(self.fa.mark_completed, run_id)
        else:
            fa = self.call(self.fa.mark_failed, run_id, error)
        assert fa is None
        newest = self.fa_newest(run)
        if newest is not None:  # "Status": FastAgentic re-saves its newest checkpoint
            newest.fa_status = target
            if not completed:
                newest.fa_error = error
        # "Status": ours changes the run's status, compare-and-set; returns the RunInfo.
        def ours_mark() -> Any:
            if completed:
                return self.call(self.ours.mark_completed, run_id)
            return self.call(self.ours.mark_failed, run_id, error)

        if run.status is None:
            assert ours_mark() is None
            return
        if run.status not in (ACTIVE, target):
            with pytest.raises(ConflictError):
                ours_mark()
            return
        info = ours_mark()
        assert info is not None
        assert info.status.value == target
        run.status = target

    # -- time -------------------------------------------------------------------------------

    @rule(steps=st.sampled_from([1, 6, 16]))
    def advance_clock(self, steps: int) -> None:
        self.clock.advance(0.75 * steps)
        for run in self.runs.values():
            self.forget_run_if_gone(run)

    @rule()
    def cleanup_expired(self) -> None:
        now = self.now
        fa = self.call(self.fa_store_used.cleanup_expired)
        ours = self.call(self.ours.cleanup_expired)
        fa_expired = [e for e in self.all_entries() if e.fa_held and not e.live(now)]
        ours_expired = [e for e in self.all_entries() if e.ours_held and not e.live(now)]
        assert fa == len(fa_expired)
        assert ours == len(ours_expired)
        for entry in fa_expired:
            entry.fa_held = False
        for entry in ours_expired:
            entry.ours_held = False
        for run in self.runs.values():
            self.drop_gone(run)

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def both_hold_what_the_model_says(self) -> None:
        if not self.built:
            return
        for run_id, run in self.runs.items():
            fa = self.call(self.fa.list_checkpoints, run_id, 10_000)
            assert [m.checkpoint_id for m in fa] == [
                e.fa_id for e in sorted(run.entries, key=lambda e: -e.fa_sequence)
                if e.fa_held]
            ours = self.call(self.ours.list_checkpoints, run_id, 10_000, include_expired=True)
            assert [m.checkpoint_id for m in ours] == [
                e.ours_id for e in sorted(run.entries, key=lambda e: -e.ours_sequence)
                if e.ours_held]
            info = self.call(self.ours.get_run, run_id)
            assert (None if info is None else info.status.value) == run.status
            # What a caller sees live agrees on both sides, but for the pruning difference.
            now = self.now
            for entry in run.entries:
                if entry.live(now) and entry.fa_held != entry.ours_held:
                    assert entry.differs == "Pruning", entry


HUNT = os.environ.get("FADIFF_EXAMPLES")
"""Examples per machine when hunting (random); unset, CI's few fixed examples."""


def machine_settings(examples: int) -> settings:
    return settings(
        max_examples=int(HUNT) if HUNT else examples,
        derandomize=not HUNT,
        database=None,
        stateful_step_count=40,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


class MemoryDifferentialMachine(DifferentialMachine):
    STORE_KIND = "memory"


class FileDifferentialMachine(DifferentialMachine):
    STORE_KIND = "file"


TestDifferentialOnMemoryStores = MemoryDifferentialMachine.TestCase
TestDifferentialOnMemoryStores.settings = machine_settings(10)
TestDifferentialOnFileStores = FileDifferentialMachine.TestCase
TestDifferentialOnFileStores.settings = machine_settings(5)


# -- the differences the machine normalizes, one example each --------------------------------


class SideBySide:
    """FastAgentic's manager and ours on one fake clock, each on its library's store of
    ``kind`` (FastAgentic's stamping ``created_at`` from the clock, as in the machine)."""

    def __init__(self, kind: str, directory: Path, **config: Any) -> None:
        self.clock = FakeClock()
        if kind == "memory":
            fa_store: Any = StampingMemoryStore(self.clock)
            ours_store: Any = InMemoryCheckpointStore()
        else:
            fa_store = StampingFileStore(directory / "fastagentic", self.clock)
            ours_store = FileCheckpointStore(directory / "ours", fsync=False)
        self.fa = FAManager(fa_store, FAConfig(**config))
        self.ours = CheckpointManager(ours_store, CheckpointConfig(clock=self.clock, **config))

    def run(self, steps: Callable[[Any], Awaitable[T]]) -> tuple[T, T]:
        """``steps(manager)`` on FastAgentic's manager, then on ours."""
        async def both() -> tuple[T, T]:
            with mock.patch.object(fa_base, "time", SimpleNamespace(time=self.clock)):
                start = self.clock.now
                fa = await steps(self.fa)
                self.clock.now = start
                ours = await steps(self.ours)
            await self.ours.aclose()
            return fa, ours

        with start_blocking_portal(backend="asyncio") as portal:
            return portal.call(both)


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_pruning_keeps_the_newest_live_checkpoints(kind: str, tmp_path: Path) -> None:
    """FastAgentic keeps the newest N checkpoints it holds, expired ones included: a newer
    checkpoint that expired pushes out an older live one. Ours removes expired ones first and
    keeps the newest N live ones."""
    managers = SideBySide(kind, tmp_path, max_checkpoints_per_run=2)

    async def steps(manager: Any) -> tuple[list[int], Any]:
        await manager.create("run-1", {"n": 0})
        await manager.create("run-1", {"n": 1}, ttl_seconds=10)
        managers.clock.advance(12)
        await manager.create("run-1", {"n": 2})
        live = [m for m in await manager.list_checkpoints("run-1")
                if m.ttl_seconds is None or managers.clock.now < m.created_at + m.ttl_seconds]
        return [m.sequence for m in live], await manager.restore_from(live[-1].checkpoint_id)

    (fa_live, fa_oldest), (ours_live, ours_oldest) = managers.run(steps)

    assert fa_live == [2]  # sequence 0 was pruned, 1 expired
    assert ours_live == [2, 0]
    assert ours_oldest is not None
    assert ours_oldest.state == {"n": 0}
    assert fa_oldest.state == {"n": 2}


@pytest.mark.parametrize("kind", ["memory", "file"])
@pytest.mark.parametrize("how", ["deleted", "expired"])
def test_a_run_whose_checkpoints_are_all_gone_starts_again(
    kind: str, how: str, tmp_path: Path
) -> None:
    """FastAgentic's run goes on when its checkpoints are gone: its counter continues, and
    a mark re-saves an expired newest checkpoint. Ours ends the run with its last checkpoint:
    the marks find no run, and the next create starts a new ACTIVE run at sequence 0."""
    managers = SideBySide(kind, tmp_path)

    async def steps(manager: Any) -> tuple[Any, int, str, list[str]]:
        first = await manager.create("run-1", {"n": 0}, ttl_seconds=10)
        second = await manager.create("run-1", {"n": 1}, ttl_seconds=10)
        await manager.mark_completed("run-1")
        if how == "deleted":
            await manager.delete(first.checkpoint_id)
            await manager.delete(second.checkpoint_id)
        else:
            managers.clock.advance(12)
        marked = await manager.mark_failed("run-1", "late")
        third = await manager.create("run-1", {"n": 2})
        listed = await manager.list_checkpoints("run-1")
        statuses = [m.status.value for m in listed]
        return marked, third.metadata.sequence, third.metadata.status.value, statuses

    fa, ours = managers.run(steps)

    # FastAgentic lists expired checkpoints: the newest of them was marked, last FAILED.
    assert fa == (None, 2, "active", ["active"] if how == "deleted" else
                  ["active", "failed", "active"])
    assert ours == (None, 0, "active", ["active"])


@pytest.mark.parametrize("limit", [-1, True, 2.5, "3"])
def test_a_limit_that_is_not_a_non_negative_int_is_refused(limit: Any, tmp_path: Path) -> None:
    """FastAgentic slices its list with the limit: ``-1`` drops the oldest checkpoint,
    ``True`` is 1, others raise ``TypeError``. Ours raises ``ValidationError``."""
    managers = SideBySide("memory", tmp_path)

    async def steps(manager: Any) -> Any:
        for n in range(3):
            await manager.create("run-1", {"n": n})
        try:
            return [m.sequence for m in await manager.list_checkpoints("run-1", limit)]
        except (TypeError, ValidationError) as exc:
            return type(exc)

    fa, ours = managers.run(steps)

    assert fa == {-1: [2, 1], True: [2]}.get(limit, TypeError)
    assert ours is ValidationError


def test_a_create_that_fails_consumes_no_sequence(tmp_path: Path) -> None:
    """FastAgentic counts the sequence before saving: a create its file store cannot write
    (``json.dumps`` raises ``TypeError``) still used a number, and the next checkpoint skips
    it. Ours raises ``SerializationError`` and uses none."""
    managers = SideBySide("file", tmp_path)

    async def steps(manager: Any) -> tuple[type[Exception], int]:
        try:
            await manager.create("run-1", {"client": object()})
        except (TypeError, SerializationError) as exc:
            refused = type(exc)
        created = await manager.create("run-1", {"n": 1})
        return refused, created.metadata.sequence

    assert managers.run(steps) == ((TypeError, 1), (SerializationError, 0))


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_a_lowered_limit_applies_at_the_next_create(kind: str, tmp_path: Path) -> None:
    """FastAgentic's pruning lists N + 10 checkpoints and deletes those beyond N: after the
    limit is lowered, each create removes at most 10 of the surplus. Ours keeps the newest N
    once the next create has finished."""
    managers = SideBySide(kind, tmp_path, max_checkpoints_per_run=0)

    async def steps(manager: Any) -> int:
        for n in range(20):
            await manager.create("run-1", {"n": n})
        manager.config.max_checkpoints_per_run = 2
        await manager.create("run-1", {"n": 20})
        return len(await manager.list_checkpoints("run-1"))

    assert managers.run(steps) == (11, 2)


@pytest.mark.parametrize(("name", "value"), [
    ("state", []), ("state", 0), ("state", ""), ("state", False), ("messages", {}),
    ("messages", 0), ("tool_calls", ""), ("context", []), ("context", 0.0),
])
def test_from_dict_refuses_a_payload_of_the_wrong_type_even_when_empty(
    name: str, value: Any
) -> None:
    """FastAgentic's ``from_dict`` takes a payload of the wrong type as it is ("Bad input to
    from_dict / from_json"); ours raises ``ValidationError``, for an empty or zero value as
    for any other (it used to give ``{}`` or ``[]`` for those, silently)."""
    data = {"metadata": {"run_id": "r", "checkpoint_id": "ckpt-0123456789ab", "sequence": 0,
                         "created_at": 1.0, "status": "active"}, name: value}
    assert getattr(FACheckpoint.from_dict(data), name) == value

    with pytest.raises(ValidationError, match=f"checkpoint {name} must be a"):
        Checkpoint.from_dict(data)
    with pytest.raises(ValidationError):
        Checkpoint.from_json(json.dumps(data))


@pytest.mark.parametrize("name", ["state", "messages", "tool_calls", "context"])
def test_from_dict_reads_a_null_payload_as_empty(name: str) -> None:
    """FastAgentic wrote ``null`` for a payload created as ``None``, which it accepted: read
    as empty, so its files import."""
    data = {"metadata": {"run_id": "r"}, name: None}

    assert getattr(Checkpoint.from_json(json.dumps(data)), name) in ({}, [])
