"""Differential model checking: the LangGraph saver against LangGraph's own ``InMemorySaver``.

A hypothesis ``RuleBasedStateMachine`` applies the same random sequences of saves, writes,
reads, listings, deletes, copies and prunes to ``InMemorySaver`` (plus the thread operations it
lacks, written from LangGraph's docstrings: :class:`ReferenceSaver`) and to
``FastCheckpointSaver`` over a memory, file or SQLite store, and checks that callers observe
the same thing. Checkpoints are built as LangGraph's loop builds them: each saver's own
``get_next_version``, ``new_versions`` naming the channels that changed, parents from the
previous save or an older one (forks). The ``messages`` channel is a list of langchain messages
that grows and is edited between saves, the same list object mutated in place or replaced by
equal copies, to exercise the saver's list memo and channel logs (``history_min_entries``).

Differences that docs/integrations/langgraph.md documents as deliberate are normalized (see
the comments where they are): channel versions (each saver draws its own random part), the
order of namespaces and threads in a listing across namespaces, saves dropped after a delete,
writes to a checkpoint that is gone, and ``acopy_thread`` into a thread with checkpoints.

CI runs a few fixed (derandomized) examples per store, within 30 s for the file. Hunt with
random ones: ``LGDIFF_EXAMPLES=400`` (examples per store).
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langgraph._internal._constants import ERROR, INTERRUPT, RESUME
from langgraph.checkpoint.base import Checkpoint, CheckpointTuple
from langgraph.checkpoint.base.id import uuid6
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.serde.types import _DeltaSnapshot
from langgraph.types import Interrupt

from fastcheckpoint import FileStore, MemoryStore, _logs
from fastcheckpoint.errors import ConflictError
from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
from fastcheckpoint.stores.sqlite import SQLiteStore
from tests._helpers import FakeClock, make_config

T = TypeVar("T")

THREADS = ("t0", "t1", "t2")
CHILD = "child:1f0c2a9e-7b1d-6a3c-8000-0123456789ab"
NAMESPACES = ("", CHILD)
RUN_IDS = ("run-a", "run-b", "run-c")
TASKS = ("task-1", "task-2")
PATHS = ("", "~__pregel_pull, agent", "~__pregel_pull, tools")
DROPPED = -1
"""The life of a checkpoint whose save the saver dropped."""


# -- the reference ---------------------------------------------------------------------------


class ReferenceSaver(InMemorySaver):
    """``InMemorySaver`` with the thread operations LangGraph specifies but it lacks, written
    from ``BaseCheckpointSaver``'s docstrings and the conformance suite."""

    def put_writes(
        self,
        config: Any,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        # Documented difference: writes to a checkpoint that is gone are dropped
        # (InMemorySaver keeps them aside, where only a checkpoint copied back under the same
        # id would see them).
        conf = config["configurable"]
        if conf["checkpoint_id"] not in self.storage[conf["thread_id"]][conf["checkpoint_ns"]]:
            return
        super().put_writes(config, writes, task_id, task_path)

    def drop(self, thread_id: str, checkpoint_ns: str, checkpoint_id: str) -> None:
        del self.storage[thread_id][checkpoint_ns][checkpoint_id]
        self.writes.pop((thread_id, checkpoint_ns, checkpoint_id), None)

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        for thread_id, namespaces in self.storage.items():
            for checkpoint_ns, saved in namespaces.items():
                for checkpoint_id, (_, metadata, _) in list(saved.items()):
                    if self.serde.loads_typed(metadata).get("run_id") in run_ids:
                        self.drop(thread_id, checkpoint_ns, checkpoint_id)

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        for checkpoint_ns, saved in list(self.storage[source_thread_id].items()):
            for checkpoint_id, entry in saved.items():
                self.storage[target_thread_id][checkpoint_ns][checkpoint_id] = entry
                writes = self.writes.get((source_thread_id, checkpoint_ns, checkpoint_id))
                if writes:
                    self.writes[(target_thread_id, checkpoint_ns, checkpoint_id)] = dict(writes)
        for (thread_id, checkpoint_ns, channel, version), blob in list(self.blobs.items()):
            if thread_id == source_thread_id:
                self.blobs[(target_thread_id, checkpoint_ns, channel, version)] = blob

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        for thread_id in thread_ids:
            if strategy == "delete":
                self.delete_thread(thread_id)
                continue
            for checkpoint_ns, saved in self.storage[thread_id].items():
                for checkpoint_id in sorted(saved)[:-1]:
                    self.drop(thread_id, checkpoint_ns, checkpoint_id)

    def ids(self, thread_id: str, checkpoint_ns: str) -> list[str]:
        return sorted(self.storage.get(thread_id, {}).get(checkpoint_ns, {}))

    def holds(self, thread_id: str) -> bool:
        return any(self.storage.get(thread_id, {}).values())


# -- what callers observe, normalized -----------------------------------------------------------


def _counter(version: object) -> object:
    """Documented difference: each saver draws its own random part of a version (and may be
    handed the other's); both count the same way, so versions compare by their counter."""
    if isinstance(version, str) and "." in version:
        return int(version.split(".")[0])
    return version


def observed(value: Any) -> Any:
    """A value as comparable data: messages by class and every field, exceptions by class and
    arguments (they do not compare equal)."""
    if isinstance(value, BaseMessage):
        return ("message", type(value).__name__, observed(value.model_dump()))
    if isinstance(value, BaseException):
        return ("exception", type(value).__name__, observed(list(value.args)))
    if isinstance(value, dict):
        return {key: observed(item) for key, item in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # _DeltaSnapshot
        return (type(value).__name__, [observed(item) for item in value])
    if isinstance(value, (list, tuple)):
        return type(value)(observed(item) for item in value)
    return value


def observed_checkpoint(checkpoint: Checkpoint) -> dict[str, Any]:
    found = observed(dict(checkpoint))
    found["channel_versions"] = {
        channel: _counter(version) for channel, version in checkpoint["channel_versions"].items()}
    found["versions_seen"] = {
        node: {channel: _counter(version) for channel, version in seen.items()}
        for node, seen in checkpoint["versions_seen"].items()}
    return found


def observed_tuple(found: CheckpointTuple | None) -> Any:
    if found is None:
        return None
    conf = found.config["configurable"]
    parent = None if found.parent_config is None else found.parent_config["configurable"]
    return {
        "at": (conf["thread_id"], conf["checkpoint_ns"], conf["checkpoint_id"]),
        "checkpoint": observed_checkpoint(found.checkpoint),
        "metadata": observed(found.metadata),
        "parent": None if parent is None else (
            parent["thread_id"], parent["checkpoint_ns"], parent["checkpoint_id"]),
        "pending_writes": observed(list(found.pending_writes or [])),
    }


def grouped(listed: list[Any]) -> dict[tuple[str, str], list[Any]]:
    groups: dict[tuple[str, str], list[Any]] = {}
    for found in listed:
        groups.setdefault(found["at"][:2], []).append(found)
    return groups


# -- the machine ---------------------------------------------------------------------------------


@dataclass
class Saved:
    """A checkpoint the machine saved: the values it was saved with (for forks from it)."""

    values: dict[str, Any]
    ref_versions: dict[str, str]
    our_versions: dict[str, str]
    step: int
    counters: dict[str, tuple[int, int]]


@dataclass
class Branch:
    """The graph state a namespace's next save continues: live objects, changed in place."""

    values: dict[str, Any] = field(default_factory=dict)
    ref_versions: dict[str, str] = field(default_factory=dict)
    our_versions: dict[str, str] = field(default_factory=dict)
    parent: str | None = None
    step: int = -1
    counters: dict[str, tuple[int, int]] = field(default_factory=dict)
    """LangGraph's (updates, supersteps) since each delta channel's snapshot."""
    stored_messages: list[BaseMessage] | None = None
    """The list as stored at its version, once edited in place without a new version."""


_message_counter = iter(range(10**9))


def new_message(kind: int) -> BaseMessage:
    number = next(_message_counter)
    text = f"message {number}"
    message_id = f"m{number}"
    if kind == 0:
        return HumanMessage(text, id=message_id)
    if kind == 1:
        call = {"name": "add", "args": {"a": number, "b": 1}, "id": f"call-{number}",
                "type": "tool_call"}
        return AIMessage(text, id=message_id, tool_calls=[call],
                         response_metadata={"model": "stand-in"})
    if kind == 2:
        return ToolMessage(str(number), id=message_id, tool_call_id=f"call-{number}")
    if kind == 3:
        return SystemMessage(text, id=message_id, additional_kwargs={"k": [number]})
    return AIMessage(text, id=message_id)


appends = st.tuples(st.just("append"), st.integers(1, 3), st.integers(0, 4))
edits = st.one_of(
    appends, appends, appends,
    st.tuples(st.just("replace"), st.integers(0, 40), st.integers(0, 4)),
    st.tuples(st.just("content"), st.integers(0, 40)),
    st.tuples(st.just("kwargs"), st.integers(0, 40)),
    st.tuples(st.just("remove"), st.integers(0, 40)),
    st.tuples(st.just("swap"), st.integers(0, 40), st.integers(0, 40)),
    st.tuples(st.just("equal_copy")),
    st.tuples(st.just("new_list")),
    st.tuples(st.just("count"), st.integers(-5, 5)),
    st.tuples(st.just("note"), st.text(max_size=4)),
    st.tuples(st.just("note_empty")),
    st.tuples(st.just("data"), st.integers(0, 3)),
    st.tuples(st.just("data_in_place"), st.integers(0, 3)),
    st.tuples(st.just("branch_none")),
    st.tuples(st.just("extra_gone")),
    st.tuples(st.just("replay"), st.integers(0, 50), st.integers(0, 3)),
)
in_place_edits = st.one_of(
    st.tuples(st.just("append"), st.integers(1, 2), st.integers(0, 4)),
    st.tuples(st.just("content"), st.integers(0, 40)),
    st.tuples(st.just("kwargs"), st.integers(0, 40)),
    st.tuples(st.just("swap"), st.integers(0, 40), st.integers(0, 40)),
)
"""Changes LangGraph's loop would not see (a node editing the state in place): never a channel
that gains or loses its value, which LangGraph always versions."""


GRAPH_RUN: dict[str, Any] = {
    "thread_id": st.sampled_from(THREADS),
    "checkpoint_ns": st.sampled_from(NAMESPACES),
    "steps": st.lists(st.tuples(
        st.lists(edits, min_size=1, max_size=3),
        st.lists(in_place_edits, max_size=1),
        st.sampled_from(["messages", "count", INTERRUPT, ERROR, None, None])),
        min_size=1, max_size=8),
    "run_id": st.sampled_from(RUN_IDS),
    "config_extra": st.sampled_from([{}, {"user_id": "u1"}, {"run_in_config": True}]),
    "delta": st.integers(0, 5) | st.integers(0, 5) | st.none(),
}
"""A graph run's saves: each step's edits, in-place edits, and a write after it."""


@dataclass
class Knowledge:
    """What one saver (a process) knows of the threads."""

    lives: dict[tuple[str, str, str], int] = field(default_factory=dict)
    """The life of its namespace each checkpoint was saved or read in, or DROPPED."""
    hinted: set[tuple[str, str]] = field(default_factory=set)
    """The namespaces it saved in or read the latest of."""


class DifferentialMachine(RuleBasedStateMachine):
    STORE_KIND = "memory"
    PROCESSES = 1
    DELTA = False
    """A delta channel (LangGraph's ``DeltaChannel``, beta): snapshots, updates, histories."""
    FANOUT: int | None = None
    """Parts of a log merged at once (fewer than the saver's: merges within a few saves)."""

    def __init__(self) -> None:
        super().__init__()
        self._exit = ExitStack()
        self.portal: BlockingPortal = self._exit.enter_context(
            start_blocking_portal(backend="asyncio"))
        self.directory = Path(tempfile.mkdtemp(prefix="fastcheckpoint-lgdiff-"))
        self._exit.callback(shutil.rmtree, self.directory, ignore_errors=True)
        self.ref = ReferenceSaver()
        self.savers: list[FastCheckpointSaver] = []
        self.knowledge: list[Knowledge] = []
        self.by = 0  # the saver ("process") making the calls
        self.store: Any = None
        self.saved: dict[str, Saved] = {}
        self.known: dict[tuple[str, str], list[str]] = {}  # every id saved per namespace
        self.branches: dict[tuple[str, str], Branch] = {}
        self.life: dict[tuple[str, str], int] = {}  # a namespace's current life
        self.last_id = ""
        self.keep_latest: int | None = None
        self.eager = True
        self.slot = ("", "")  # the namespace being saved
        if self.FANOUT is not None:
            self._exit.callback(setattr, _logs, "FANOUT", _logs.FANOUT)
            _logs.FANOUT = self.FANOUT

    def call(self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        return self.portal.call(functools.partial(func, *args, **kwargs))

    @property
    def ours(self) -> FastCheckpointSaver | None:
        return self.savers[self.by] if self.savers else None

    @property
    def saver(self) -> FastCheckpointSaver:
        return self.savers[self.by]

    @property
    def lives(self) -> dict[tuple[str, str, str], int]:
        return self.knowledge[self.by].lives

    @property
    def hinted(self) -> set[tuple[str, str]]:
        return self.knowledge[self.by].hinted

    @hinted.setter
    def hinted(self, value: set[tuple[str, str]]) -> None:
        self.knowledge[self.by].hinted = value

    def close(self) -> None:
        try:
            for saver in self.savers:
                self.call(saver.aclose)
        finally:
            self._exit.close()

    def _store(self) -> Any:
        if self.STORE_KIND == "memory":  # a process's store object: the same memory
            if self.store is None:
                self.store = MemoryStore()
            return self.store
        if self.STORE_KIND == "file":
            return FileStore(self.directory / "store", fsync=False)
        return SQLiteStore(self.directory / "store.db", synchronous="normal")

    @initialize(history_min_entries=st.sampled_from([None, 2, 2, 32]),
                keep_latest=st.sampled_from([None, None, 1, 3]), eager=st.booleans())
    def build(self, history_min_entries: int | None, keep_latest: int | None,
              eager: bool) -> None:
        # Not eager: no reads but those the rules make, so saves follow saves (as in a graph
        # run) with nothing read between them to refresh what the saver remembers.
        keep_latest = None if self.DELTA else keep_latest  # as aprune: see prune
        self.keep_latest = keep_latest
        self.eager = eager

        async def built() -> FastCheckpointSaver:
            return FastCheckpointSaver(self._store(), keep_latest=keep_latest, config=make_config(
                FakeClock(), history_min_entries=history_min_entries))

        for _ in range(self.PROCESSES):
            self.savers.append(self.call(built))
            self.knowledge.append(Knowledge())

    @precondition(lambda self: self.PROCESSES > 1)
    @rule(by=st.integers(0, 1))
    def switch_process(self, by: int) -> None:
        """The calls that follow come from another saver on the same store (another
        process): it knows only what it saved or read."""
        self.by = by

    def landed(self, thread_id: str, checkpoint_ns: str, checkpoint_id: str) -> bool:
        """Whether the store holds the checkpoint: asked by a saver that knows nothing."""
        async def probe() -> bool:
            fresh = FastCheckpointSaver(self._store(), config=make_config(FakeClock()))
            found = await fresh.aget_tuple({"configurable": {
                "thread_id": thread_id, "checkpoint_ns": checkpoint_ns,
                "checkpoint_id": checkpoint_id}})
            if self.STORE_KIND != "memory":
                await fresh.aclose()
            return found is not None

        return self.call(probe)

    # -- helpers ------------------------------------------------------------------------------

    def held(self, thread_id: str, checkpoint_ns: str) -> bool:
        return bool(self.ref.ids(thread_id, checkpoint_ns))

    def new_checkpoint_id(self, step: int) -> str:
        while True:  # LangGraph's ids sort by time: keep them increasing (see alist's docs)
            made = str(uuid6(clock_seq=step))
            if made > self.last_id:
                self.last_id = made
                return made

    def branch_from(self, checkpoint_id: str) -> Branch:
        """The state LangGraph loads to go on from a checkpoint: fresh objects, as stored
        (a checkpoint gone: as it was saved, to see the save dropped or refused)."""
        saved = self.saved[checkpoint_id]
        values = copy.deepcopy(saved.values)
        if checkpoint_id in self.ref.ids(*self.slot):
            found = self.ref.get_tuple({"configurable": {
                "thread_id": self.slot[0], "checkpoint_ns": self.slot[1],
                "checkpoint_id": checkpoint_id}})
            assert found is not None
            values = found.checkpoint["channel_values"]
        return Branch(values, dict(saved.ref_versions), dict(saved.our_versions),
                      checkpoint_id, saved.step, dict(saved.counters))

    def edit(self, branch: Branch, edit: tuple[Any, ...]) -> set[str]:
        """Apply one edit to the branch's live values; the channels it changed."""
        values = branch.values
        messages: list[BaseMessage] | None = values.get("messages")
        name = edit[0]
        if name == "append":
            if messages is None:
                messages = values["messages"] = []
            messages.extend(new_message((edit[2] + n) % 5) for n in range(edit[1]))
            return {"messages"}
        if name == "replay":
            return self.replay(values, edit[1], edit[2])
        if name == "equal_copy":  # equal messages, other objects
            if messages is None:
                return set()
            values["messages"] = copy.deepcopy(messages)
            return {"messages"}
        if name == "new_list":  # the same messages, another list
            if messages is None:
                return set()
            values["messages"] = list(messages)
            return {"messages"}
        if name not in ("replace", "content", "kwargs", "remove", "swap"):
            return self.edit_other(values, edit)
        if not messages:
            return set()
        index = edit[1] % len(messages)
        if name == "replace":  # the same id, other content, a new object
            old = messages[index]
            messages[index] = new_message(edit[2]).model_copy(update={"id": old.id})
        elif name == "content":  # changed in place
            messages[index].content = f"{messages[index].content}!"
        elif name == "kwargs":
            messages[index].additional_kwargs["edited"] = \
                messages[index].additional_kwargs.get("edited", 0) + 1
        elif name == "remove":
            del messages[index]
        else:
            other = edit[2] % len(messages)
            messages[index], messages[other] = messages[other], messages[index]
        return {"messages"}

    def delta_step(self, branch: Branch, delta: int | None) -> set[str]:
        """A delta channel's step, as LangGraph's loop counts it: updated (no value stored),
        a snapshot (its value stored), or not updated (``None``)."""
        updates, supersteps = branch.counters.get("delta", (0, 0))
        if delta is None:
            if "delta" in branch.counters:
                branch.counters["delta"] = (updates, supersteps + 1)
            return set()
        if delta % 3 == 0:
            branch.values["delta"] = _DeltaSnapshot([delta, supersteps])
            branch.counters["delta"] = (0, 0)
        else:
            branch.values.pop("delta", None)
            branch.counters["delta"] = (updates + 1, supersteps + 1)
        return {"delta"}

    def replay(self, values: dict[str, Any], pick: int, more: int) -> set[str]:
        """A replay from an older checkpoint that makes again the messages a later one of the
        namespace holds (the same ids: a deterministic node), then ``more`` new ones: the
        list extends the log of another branch."""
        messages = values.get("messages") or []
        have = observed(messages)
        later = [saved.values["messages"] for checkpoint_id in self.known.get(self.slot, [])
                 if len((saved := self.saved[checkpoint_id]).values.get("messages") or [])
                 > len(messages)]
        later = [found for found in later if observed(found[:len(messages)]) == have]
        if not later:
            return set()
        values["messages"] = messages + copy.deepcopy(later[pick % len(later)][len(messages):])
        values["messages"].extend(new_message(n) for n in range(more))
        return {"messages"}

    @staticmethod
    def edit_other(values: dict[str, Any], edit: tuple[Any, ...]) -> set[str]:
        name = edit[0]
        if name == "count":
            values["count"] = values.get("count", 0) + edit[1]
            return {"count"}
        if name == "note":
            values["note"] = edit[1]
            return {"note"}
        if name == "note_empty":  # the channel has no value now (its version moves on)
            values.pop("note", None)
            return {"note"}
        if name == "data":
            values["data"] = {"key": edit[1], "nested": [edit[1]] * edit[1]}
            return {"data"}
        if name == "data_in_place":
            data = values.setdefault("data", {})
            data[f"k{edit[1]}"] = data.get(f"k{edit[1]}", 0) + 1
            return {"data"}
        if name == "branch_none":
            values["branch:to:agent"] = None
            return {"branch:to:agent"}
        if name == "extra_gone":  # a channel's value and version both go
            values.pop("branch:to:agent", None)
            return {"-branch:to:agent"}
        raise AssertionError(name)

    def expect_dropped(self, thread_id: str, checkpoint_ns: str, parent: str | None,
                       root_id: str | None) -> bool | None:
        """Documented: a save is dropped when it names a parent in a namespace that does not
        exist, or one this process saw in an earlier life of the namespace (not found in the
        current one), or when it starts a subgraph namespace under a root checkpoint whose
        save was dropped."""
        held = self.held(thread_id, checkpoint_ns)
        if parent is not None:
            if not held:
                return True
            life = self.lives.get((thread_id, checkpoint_ns, parent))
            return life is not None and life != self.life.get((thread_id, checkpoint_ns)) \
                and parent not in self.ref.ids(thread_id, checkpoint_ns)
        if not checkpoint_ns or held or root_id is None:
            return False
        root_life = self.lives.get((thread_id, "", root_id))
        if root_life == DROPPED:
            return True
        # Or the namespace this process knew is gone (``adelete_for_runs`` emptied it) and
        # the root checkpoint's life is over: whether the saver still knew the namespace
        # (not the machine's business) decides, so the store is asked (``None``).
        if root_life is None or (
                self.held(thread_id, "") and root_life == self.life.get((thread_id, ""))):
            return False
        return None if (thread_id, checkpoint_ns) in self.hinted else False

    def record_life(self, thread_id: str, checkpoint_ns: str, checkpoint_id: str,
                    was_held: bool) -> None:
        slot = (thread_id, checkpoint_ns)
        if not was_held:
            self.life[slot] = self.life.get(slot, 0) + 1
        self.lives[(thread_id, checkpoint_ns, checkpoint_id)] = self.life[slot]

    # -- saves --------------------------------------------------------------------------------

    @rule(
        thread_id=st.sampled_from(THREADS),
        checkpoint_ns=st.sampled_from(NAMESPACES),
        parent_mode=st.sampled_from(["continue"] * 5 + ["fork", "fork", "none"]),
        fork_index=st.integers(0, 50),
        changes=st.lists(edits, min_size=0, max_size=4),
        unversioned=st.lists(in_place_edits, max_size=1),
        run_id=st.sampled_from(RUN_IDS),
        source=st.sampled_from(["input", "loop", "loop", "fork"]),
        config_extra=st.sampled_from([{}, {"user_id": "u1"}, {"run_in_config": True}]),
        delta=st.integers(0, 5) | st.integers(0, 5) | st.none(),
    )
    def put(
        self,
        thread_id: str,
        checkpoint_ns: str,
        parent_mode: str,
        fork_index: int,
        changes: list[tuple[Any, ...]],
        unversioned: list[tuple[Any, ...]],
        run_id: str,
        source: str,
        config_extra: dict[str, Any],
        delta: int | None = None,
    ) -> None:
        slot = self.slot = (thread_id, checkpoint_ns)
        branch = self.branches.get(slot)
        known = self.known.get(slot, [])
        if parent_mode == "fork" and known:
            branch = self.branch_from(known[fork_index % len(known)])
        elif parent_mode == "none" or branch is None:
            latest = self.ref.ids(thread_id, checkpoint_ns)
            branch = self.branch_from(latest[-1]) if latest and parent_mode != "none" \
                else Branch()
        self.branches[slot] = branch
        changed: set[str] = set()
        for change in changes:
            changed |= self.edit(branch, change)
        # LangGraph stores no change its version does not show. (Unless the value is gone
        # from the store: documented, the save then sends every value as it is now; so only
        # on a parent still there, whose values are then too.) Checkpoints record the list
        # as stored at its version: a fork from one once it is pruned sends what LangGraph
        # would have loaded, not an edit no store took.
        if "messages" in changed:
            branch.stored_messages = None
        for change in unversioned:
            if branch.values.get("messages") and "messages" not in changed and \
                    branch.parent in self.ref.ids(thread_id, checkpoint_ns):
                if branch.stored_messages is None:
                    branch.stored_messages = copy.deepcopy(branch.values["messages"])
                self.edit(branch, change)
        if branch.stored_messages is not None and branch.parent is not None and \
                branch.parent not in self.ref.ids(thread_id, checkpoint_ns):
            # A list edited in place at an earlier save, its parent gone now (deleted by its
            # run, say): whether the save finds a value it names removed, and sends every
            # value as it is now, depends on what else still names them. The node returns
            # the list this time, which leaves no doubt.
            changed.add("messages")
            branch.stored_messages = None
        if self.DELTA:
            changed |= self.delta_step(branch, delta)
        for channel in [name[1:] for name in changed if name.startswith("-")]:
            changed.discard("-" + channel)
            changed.discard(channel)
            branch.ref_versions.pop(channel, None)
            branch.our_versions.pop(channel, None)
        seen_ref = dict(branch.ref_versions)
        seen_ours = dict(branch.our_versions)
        new_ref = {channel: self.ref.get_next_version(branch.ref_versions.get(channel), None)
                   for channel in sorted(changed)}
        new_ours = {channel: self.saver.get_next_version(branch.our_versions.get(channel), None)
                    for channel in sorted(changed)}
        branch.ref_versions.update(new_ref)
        branch.our_versions.update(new_ours)
        step = branch.step + 1
        checkpoint_id = self.new_checkpoint_id(step)
        ts = datetime.now(timezone.utc).isoformat()

        def made(versions: dict[str, str], seen: dict[str, str]) -> Checkpoint:
            return Checkpoint(
                v=4, id=checkpoint_id, ts=ts, channel_values=branch.values,
                channel_versions=dict(versions), versions_seen={"agent": seen, "__input__": {}},
                updated_channels=sorted(changed))

        root_id = None
        if checkpoint_ns:
            root = self.branches.get((thread_id, ""))
            root_id = None if root is None else root.parent
        metadata: dict[str, Any] = {"source": source, "step": step,
                                    "parents": {} if root_id is None else {"": root_id}}
        if self.DELTA:
            metadata["counters_since_delta_snapshot"] = dict(branch.counters)
        configurable: dict[str, Any] = {"thread_id": thread_id, "checkpoint_ns": checkpoint_ns}
        if branch.parent is not None:
            configurable["checkpoint_id"] = branch.parent
        config: dict[str, Any] = {"configurable": configurable}
        if config_extra.get("run_in_config"):
            config["metadata"] = {"run_id": run_id}
        else:
            metadata["run_id"] = run_id
            configurable.update(config_extra)

        dropped = self.expect_dropped(thread_id, checkpoint_ns, branch.parent, root_id)
        was_held = self.held(thread_id, checkpoint_ns)
        ours = self.call(self.saver.aput, copy.deepcopy(config),
                         made(branch.our_versions, seen_ours), copy.deepcopy(metadata),
                         new_ours)
        expected_config = {"thread_id": thread_id, "checkpoint_ns": checkpoint_ns,
                           "checkpoint_id": checkpoint_id}
        assert ours["configurable"] == expected_config
        if dropped is None:
            dropped = not self.landed(thread_id, checkpoint_ns, checkpoint_id)
        if dropped:
            self.lives[(thread_id, checkpoint_ns, checkpoint_id)] = DROPPED
            self.hinted.discard(slot)
        else:
            # Documented: a save naming values removed meanwhile (its parent gone: another
            # process deleted the thread this one never saw) sends every value again, as it
            # is now. The reference gets those it no longer holds.
            resent = {channel: version for channel, version in branch.ref_versions.items()
                      if channel in branch.values and channel not in new_ref
                      and (thread_id, checkpoint_ns, channel, version) not in self.ref.blobs}
            ref = self.call(self.ref.aput, copy.deepcopy(config),
                            made(branch.ref_versions, seen_ref), copy.deepcopy(metadata),
                            {**new_ref, **resent})
            assert ref["configurable"] == expected_config
            self.record_life(thread_id, checkpoint_ns, checkpoint_id, was_held)
            self.hinted.add(slot)
            if self.keep_latest is not None:  # every save prunes its namespace
                for older in self.ref.ids(thread_id, checkpoint_ns)[:-self.keep_latest]:
                    self.ref.drop(thread_id, checkpoint_ns, older)
        values = copy.deepcopy(branch.values)
        if branch.stored_messages is not None:
            values["messages"] = copy.deepcopy(branch.stored_messages)
        self.saved[checkpoint_id] = Saved(values,
                                          dict(branch.ref_versions), dict(branch.our_versions),
                                          step, dict(branch.counters))
        self.known.setdefault(slot, []).append(checkpoint_id)
        branch.parent = checkpoint_id
        branch.step = step
        if self.eager:
            self.compare_get(thread_id, checkpoint_ns, None)

    @rule(**GRAPH_RUN)
    def another_graph_run(self, **drawn: Any) -> None:
        """Graph runs twice as often as the other rules: namespaces grow deep."""
        self.graph_run(**drawn)

    @rule(**GRAPH_RUN)
    def graph_run(
        self,
        thread_id: str,
        checkpoint_ns: str,
        steps: list[tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], str | None]],
        run_id: str,
        config_extra: dict[str, Any],
        delta: int | None,
    ) -> None:
        """Saves as a graph run makes them, each continuing the last, a task's writes between."""
        for number, (changes, unversioned, written) in enumerate(steps):
            self.put(thread_id, checkpoint_ns, "continue", 0, changes, unversioned, run_id,
                     "input" if number == 0 else "loop", config_extra,
                     None if delta is None else delta + number)
            channel = "delta" if self.DELTA and written in (None, "count") else written
            if channel is not None:
                self.put_writes(thread_id, checkpoint_ns, 0, True, TASKS[number % 2],
                                PATHS[number % 3], [(channel, number)])

    # -- writes -------------------------------------------------------------------------------

    @rule(
        thread_id=st.sampled_from(THREADS),
        checkpoint_ns=st.sampled_from(NAMESPACES),
        pick=st.integers(0, 50),
        latest=st.booleans(),
        task_id=st.sampled_from(TASKS),
        task_path=st.sampled_from(PATHS),
        writes=st.lists(st.tuples(
            st.sampled_from(["messages", "count", "note", "delta", ERROR, INTERRUPT, RESUME]),
            st.integers(0, 9)), min_size=1, max_size=3),
    )
    def put_writes(
        self,
        thread_id: str,
        checkpoint_ns: str,
        pick: int,
        latest: bool,
        task_id: str,
        task_path: str,
        writes: list[tuple[str, int]],
    ) -> None:
        known = self.known.get((thread_id, checkpoint_ns), [])
        held = self.ref.ids(thread_id, checkpoint_ns)
        if latest and held:
            checkpoint_id = held[-1]
        elif known:
            checkpoint_id = known[pick % len(known)]
        else:
            return
        if checkpoint_id not in held and \
                (thread_id, checkpoint_ns, checkpoint_id) not in self.lives:
            # A process that never saw a checkpoint the store lacks waits 30 s for its save
            # (documented): a write LangGraph sends before the save it follows.
            return
        config = {"configurable": {"thread_id": thread_id, "checkpoint_ns": checkpoint_ns,
                                   "checkpoint_id": checkpoint_id}}
        sent = [(channel, self.write_value(channel, value)) for channel, value in writes]
        self.call(self.saver.aput_writes, config, sent, task_id, task_path)
        self.call(self.ref.aput_writes, config, sent, task_id, task_path)
        if self.eager:
            self.compare_get(thread_id, checkpoint_ns, checkpoint_id)

    @staticmethod
    def write_value(channel: str, value: int) -> Any:
        if channel == INTERRUPT:
            return [Interrupt(value={"question": value}, id=f"interrupt-{value}")]
        if channel == ERROR:
            return ValueError(f"failed {value}")
        if channel == "messages":
            return [new_message(value % 5)]
        if channel == "note":
            return str(value)
        return value

    # -- reads --------------------------------------------------------------------------------

    def compare_get(self, thread_id: str, checkpoint_ns: str, checkpoint_id: str | None) -> None:
        configurable = {"thread_id": thread_id, "checkpoint_ns": checkpoint_ns}
        if checkpoint_id is not None:
            configurable["checkpoint_id"] = checkpoint_id
        config = {"configurable": configurable}
        ours = observed_tuple(self.call(self.saver.aget_tuple, copy.deepcopy(config)))
        ref = observed_tuple(self.call(self.ref.aget_tuple, copy.deepcopy(config)))
        assert ours == ref
        if ours is not None:
            self.learn([ours], head=checkpoint_id is None)

    def learn(self, read: list[Any], *, head: bool = False) -> None:
        """What a read teaches the saver: the life each checkpoint is in; the latest read
        tells it the namespace too."""
        for found in read:
            thread_id, checkpoint_ns, checkpoint_id = found["at"]
            self.lives[(thread_id, checkpoint_ns, checkpoint_id)] = \
                self.life[(thread_id, checkpoint_ns)]
            if head:
                self.hinted.add((thread_id, checkpoint_ns))

    @rule(
        thread_id=st.sampled_from(THREADS),
        checkpoint_ns=st.sampled_from(NAMESPACES),
        pick=st.none() | st.integers(0, 50),
    )
    def get_tuple(self, thread_id: str, checkpoint_ns: str, pick: int | None) -> None:
        known = self.known.get((thread_id, checkpoint_ns), [])
        if pick is not None and pick >= 45:  # an id of another namespace or thread
            known = [checkpoint_id for ids in self.known.values() for checkpoint_id in ids]
        checkpoint_id = None if pick is None or not known else known[pick % len(known)]
        self.compare_get(thread_id, checkpoint_ns, checkpoint_id)

    @precondition(lambda self: self.DELTA)
    @rule(
        thread_id=st.sampled_from(THREADS),
        checkpoint_ns=st.sampled_from(NAMESPACES),
        pick=st.none() | st.integers(0, 50),
        channels=st.lists(st.sampled_from(["delta", "messages", "count", "absent"]),
                          max_size=3, unique=True),
    )
    def delta_history(self, thread_id: str, checkpoint_ns: str, pick: int | None,
                      channels: list[str]) -> None:
        known = self.known.get((thread_id, checkpoint_ns), [])
        channels = ["delta", *(channel for channel in channels if channel != "delta")]
        configurable = {"thread_id": thread_id, "checkpoint_ns": checkpoint_ns}
        if pick is not None and known:
            configurable["checkpoint_id"] = known[pick % len(known)]
        config = {"configurable": configurable}
        ours = self.call(self.saver.aget_delta_channel_history, config=copy.deepcopy(config),
                         channels=channels)
        ref = self.call(self.ref.aget_delta_channel_history, config=copy.deepcopy(config),
                        channels=channels)
        assert observed(dict(ours)) == observed(dict(ref))

    def listed(self, saver: Any, config: Any, **options: Any) -> list[Any]:
        async def collect() -> list[Any]:
            return [observed_tuple(found)
                    async for found in saver.alist(copy.deepcopy(config), **options)]

        return self.portal.call(collect)

    def compare_list(self, config: Any, **options: Any) -> None:
        ours = self.listed(self.saver, config, **options)
        self.learn(ours)
        limit = options.pop("limit", None)
        ref = self.listed(self.ref, config, **options)  # all, to judge a limited listing
        single = config is not None and "checkpoint_ns" in config["configurable"]
        if single:
            assert ours == ref[:limit]
            return
        # Documented difference: the order of threads and namespaces in a listing across
        # them is not LangGraph's (each namespace's own is newest first in both).
        expected = grouped(ref)
        if limit is None:
            assert grouped(ours) == expected
            return
        assert len(ours) == min(limit, len(ref))
        for at, found in grouped(ours).items():
            assert found == expected.get(at, [])[:len(found)], at

    @rule(
        scope=st.sampled_from(["all", "thread", "namespace", "checkpoint"]),
        thread_id=st.sampled_from(THREADS),
        checkpoint_ns=st.sampled_from(NAMESPACES),
        pick=st.integers(0, 50),
        wanted=st.sampled_from([None, {"source": "loop"}, {"run_id": "run-a"}, {"step": 1},
                                {"user_id": "u1"}, {"absent": None}, {"parents": {}},
                                {"source": "fork", "run_id": "run-b"}]),
        before=st.none() | st.integers(0, 50),
        limit=st.sampled_from([None, None, 1, 2, 5]),
    )
    def list_checkpoints(
        self,
        scope: str,
        thread_id: str,
        checkpoint_ns: str,
        pick: int,
        wanted: dict[str, Any] | None,
        before: int | None,
        limit: int | None,
    ) -> None:
        every = [checkpoint_id for ids in self.known.values() for checkpoint_id in ids]
        config: Any = None
        if scope != "all":
            config = {"configurable": {"thread_id": thread_id}}
        if scope in ("namespace", "checkpoint"):
            config["configurable"]["checkpoint_ns"] = checkpoint_ns
        if scope == "checkpoint" and every:
            config["configurable"]["checkpoint_id"] = every[pick % len(every)]
        before_config = None
        if before is not None and every:
            before_config = {"configurable": {"thread_id": thread_id,
                                              "checkpoint_id": every[before % len(every)]}}
        self.compare_list(config, filter=wanted, before=before_config, limit=limit)

    # -- thread operations --------------------------------------------------------------------

    @rule(thread_id=st.sampled_from(THREADS))
    def delete_thread(self, thread_id: str) -> None:
        held = self.forget(thread_id)
        self.call(self.saver.adelete_thread, thread_id)
        self.call(self.ref.adelete_thread, thread_id)
        self.hinted -= held

    def forget(self, thread_id: str) -> set[tuple[str, str]]:
        """The namespaces a delete of the thread forgets: those it finds, and the root."""
        return {(thread_id, checkpoint_ns) for checkpoint_ns in NAMESPACES
                if not checkpoint_ns or self.held(thread_id, checkpoint_ns)}

    @rule(run_ids=st.lists(st.sampled_from(RUN_IDS), max_size=2, unique=True))
    def delete_for_runs(self, run_ids: list[str]) -> None:
        if self.DELTA:
            # Documented: a checkpoint whose delta channels reach an ancestor removed is
            # gone too (read or listed); InMemorySaver returns it unrebuildable.
            return
        self.call(self.saver.adelete_for_runs, run_ids)
        self.call(self.ref.adelete_for_runs, run_ids)

    @rule(source=st.sampled_from(THREADS), into=st.sampled_from(THREADS))
    def copy_thread(self, source: str, into: str) -> None:
        if source == into:
            return
        if self.ref.holds(into):
            # Documented: a copy goes into a thread without checkpoints only.
            with pytest.raises(ConflictError):
                self.call(self.saver.acopy_thread, source, into)
            return
        self.call(self.saver.acopy_thread, source, into)
        if not self.held(source, ""):
            return  # documented: a thread whose root namespace is gone copies as none
        self.call(self.ref.acopy_thread, source, into)
        for checkpoint_ns in NAMESPACES:
            ids = self.ref.ids(into, checkpoint_ns)
            if ids:
                self.life[(into, checkpoint_ns)] = self.life.get((into, checkpoint_ns), 0) + 1
                self.hinted.add((into, checkpoint_ns))
            for checkpoint_id in ids:
                self.lives[(into, checkpoint_ns, checkpoint_id)] = \
                    self.life[(into, checkpoint_ns)]
                self.known.setdefault((into, checkpoint_ns), []).append(checkpoint_id)

    @rule(thread_ids=st.lists(st.sampled_from(THREADS), max_size=2, unique=True),
          strategy=st.sampled_from(["keep_latest", "delete"]))
    def prune(self, thread_ids: list[str], strategy: str) -> None:
        if self.DELTA and strategy == "keep_latest":
            return  # documented: it keeps the ancestors delta channels rebuild from
        held = {slot for thread_id in thread_ids for slot in self.forget(thread_id)}
        self.call(self.saver.aprune, thread_ids, strategy=strategy)
        self.call(self.ref.aprune, thread_ids, strategy=strategy)
        if strategy == "delete":
            self.hinted -= held

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def everything_lists_alike(self) -> None:
        if self.ours is not None and self.eager:
            self.compare_list(None)

    def teardown(self) -> None:
        try:
            if self.ours is not None:
                self.compare_list(None)  # what the rules did not read: in the end
        finally:
            self.close()


HUNT = os.environ.get("LGDIFF_EXAMPLES")
"""Examples per store when hunting (random); unset, CI's few fixed examples per store."""


def machine_settings(examples: int) -> settings:
    return settings(
        max_examples=int(HUNT) if HUNT else examples,
        derandomize=not HUNT,
        stateful_step_count=40,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


class MemoryMachine(DifferentialMachine):
    STORE_KIND = "memory"


class MergingMachine(DifferentialMachine):
    STORE_KIND = "memory"
    FANOUT = 2


class TwoProcessMachine(DifferentialMachine):
    STORE_KIND = "memory"
    PROCESSES = 2


class DeltaMachine(DifferentialMachine):
    STORE_KIND = "memory"
    DELTA = True


class FileMachine(DifferentialMachine):
    STORE_KIND = "file"


class SQLiteMachine(DifferentialMachine):
    STORE_KIND = "sqlite"


TestDifferentialOnMemoryStore = MemoryMachine.TestCase
TestDifferentialOnMemoryStore.settings = machine_settings(18)
TestDifferentialWithLogMerges = MergingMachine.TestCase
TestDifferentialWithLogMerges.settings = machine_settings(20)
TestDifferentialWithTwoProcesses = TwoProcessMachine.TestCase
TestDifferentialWithTwoProcesses.settings = machine_settings(20)
TestDifferentialWithDeltaChannels = DeltaMachine.TestCase
TestDifferentialWithDeltaChannels.settings = machine_settings(20)
TestDifferentialOnFileStore = FileMachine.TestCase
TestDifferentialOnFileStore.settings = machine_settings(12)
TestDifferentialOnSQLiteStore = SQLiteMachine.TestCase
TestDifferentialOnSQLiteStore.settings = machine_settings(12)
