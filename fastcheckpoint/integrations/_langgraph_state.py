"""What one LangGraph saver remembers in its process: guesses that save store reads, and the
hand-over of pending writes that arrive before their checkpoint.

Nothing here is the truth (the store is): a hint that turns out stale costs a retry or a
read, never a wrong answer.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel

from fastcheckpoint.integrations._langgraph_records import ChannelLog, Located, StoredWrite

_K = TypeVar("_K")
_V = TypeVar("_V")

_RUNS = 10_000
_IDS = 50_000
_SEEDS = 1_000
_WINDOWS = 1_000
_SIGNAL_POLL = 0.05
_QUIET_TURNS = 3
"""Event-loop turns :meth:`SaverState.settle` finds nothing under way before it returns."""


class Lru(Generic[_K, _V]):
    """A bounded mapping that forgets the least recently used entry (thread-safe: blocking
    calls may run on another loop thread than async ones)."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[_K, _V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: _K) -> _V | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: _K, value: _V) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            if len(self._entries) > self._capacity:
                self._entries.popitem(last=False)

    def pop(self, key: _K) -> _V | None:
        with self._lock:
            return self._entries.pop(key, None)


@dataclass
class RunHint:
    """What this process last saw of a run (a thread namespace)."""

    latest_sequence: int
    incarnation: str
    newest_id: str | None
    """The newest LangGraph checkpoint id this process wrote or read in the run."""
    payload_size: int = 0
    """Bytes written by the last save: large saves encode in a worker thread."""


@dataclass
class Window:
    """The lowest sequence each of a run's newest checkpoints rebuilds its delta channels
    from (its own when it needs no ancestor), as far as this process knows: every live
    checkpoint from ``known_from`` to ``newest`` is in ``lowest``."""

    incarnation: str
    known_from: int
    newest: int = -1
    lowest: dict[int, int] = field(default_factory=dict)

    def covers(self, incarnation: str, start: int, newest: int) -> bool:
        return (incarnation == self.incarnation and self.known_from <= start
                and self.newest == newest)

    def lowest_from(self, start: int) -> int | None:
        """The lowest sequence the checkpoints from ``start`` on need."""
        return min((low for sequence, low in self.lowest.items() if sequence >= start),
                   default=None)

    def add(self, sequence: int, lowest: int, keep: int) -> None:
        """Checkpoint ``sequence`` saved (the run's newest); only the newest ``keep`` are
        remembered."""
        if sequence != self.newest + 1:  # saved after others this process did not see
            self.lowest.clear()
            self.known_from = sequence
        self.newest = sequence
        self.lowest[sequence] = lowest
        start = sequence - keep + 1
        if start > self.known_from:
            self.known_from = start
            for old in [old for old in self.lowest if old < start]:
                del self.lowest[old]


class Signal:
    """Set once; awaited from any event loop (a waiter on another loop than the setter's
    polls, so none waits forever). Cheap when nobody waits: the event is made by the first
    waiter."""

    def __init__(self) -> None:
        self._event: anyio.Event | None = None
        self._thread = threading.get_ident()
        self.is_set = False

    def set(self) -> None:
        self.is_set = True
        if self._event is not None and threading.get_ident() == self._thread:
            self._event.set()

    async def wait(self) -> None:
        same_thread = threading.get_ident() == self._thread
        while not self.is_set:
            if same_thread:
                if self._event is None:
                    self._event = anyio.Event()
                with anyio.move_on_after(_SIGNAL_POLL):
                    await self._event.wait()
            else:
                await anyio.sleep(_SIGNAL_POLL / 10)


@dataclass(eq=False)
class Parked:
    """Pending writes for a checkpoint this process has not saved yet: its save takes them
    with it (LangGraph sends a step's writes while the step's checkpoint is still queued
    behind the previous save)."""

    writes: dict[tuple[str, int], StoredWrite] = field(default_factory=dict)
    done: Signal = field(default_factory=Signal)
    stored: bool = False
    waiting: int = 0
    """How many ``aput_writes`` calls wait for them."""

    def add(self, writes: list[StoredWrite]) -> None:
        for write in writes:
            slot = (write.task_id, write.idx)
            # A regular write is kept as first written, a special one (idx < 0) replaced.
            if write.idx < 0 or slot not in self.writes:
                self.writes[slot] = write


class SaverState:
    """The bookkeeping one saver and its copies (``with_allowlist``) share."""

    def __init__(self) -> None:
        self.runs: Lru[str, RunHint] = Lru(_RUNS)
        self.located: Lru[tuple[str, str], Located] = Lru(_IDS)
        self.lives: Lru[tuple[str, str], str] = Lru(_IDS)
        """(run key, LangGraph checkpoint id) -> the incarnation (life) of the run this process
        last saw it in; kept when the checkpoint is gone, unlike ``located``: a save naming it
        as its parent must not land in a later life of the run."""
        self.registered: Lru[tuple[str, str], tuple[float, str | None]] = Lru(_RUNS)
        """(LangGraph run id, run key) -> until when its registry entry is known to last, and
        the life (incarnation) of the run it was written for (``None``: the run was unknown
        here; its next save's life is the one). ``delete_for_runs`` removes the entries of
        runs it finds gone: a save in a later life writes its entry again."""
        self.deleted: Lru[str, bool] = Lru(_RUNS)
        """Runs this process deleted: late writes to them are dropped without a read."""
        self.seeds: Lru[str, tuple[str, bytes, tuple[str, ...]]] = Lru(_SEEDS)
        """Run key -> (run id, encoded details, labels) of the run a save may create."""
        self.logs: Lru[tuple[str, str], tuple[str, Mapping[str, ChannelLog]]] = Lru(_IDS)
        """(run key, LangGraph checkpoint id) -> the incarnation it was seen in and the logged
        values its header records: what a save with that parent keeps of them."""
        self.floors: Lru[tuple[str, str], tuple[str, int, dict[str, int] | None]] = Lru(_IDS)
        """(run key, LangGraph checkpoint id) -> the incarnation and sequence it was seen at,
        and its header's delta channel floors (``LangGraphHeader.delta``)."""
        self.windows: Lru[str, Window] = Lru(_WINDOWS)
        """Run key -> what its newest checkpoints rebuild from, for runs with delta channels
        under ``keep_latest``: a save keeps those ancestors without a read."""
        self.failed: Lru[str, str] = Lru(_RUNS)
        """Run key -> the oldest checkpoint id whose save failed since the run was last saved
        or read: LangGraph saves nothing after it in that graph run."""
        self.queued: Lru[tuple[str, str], dict[str, Any]] = Lru(_IDS)
        """(run key, LangGraph checkpoint id) -> the run's approval record as this process
        last wrote or read it, when it asked about that checkpoint's interrupts."""
        self.saving: dict[tuple[str, str], Signal] = {}
        self.parked: dict[tuple[str, str], Parked] = {}
        self._last_turn: dict[str, Signal] = {}
        self._under_way: dict[str, tuple[str, set[Signal]]] = {}
        """Run key -> its thread id and the ends of the run's saves and writes under way here."""
        self._under_way_lock = threading.Lock()  # blocking calls run on another loop thread

    def under_way(self, key: str, thread_id: str) -> _UnderWay:
        """A save or write of run ``key`` (of thread ``thread_id``) under way: :meth:`settle`
        waits for it (a context manager)."""
        return _UnderWay(self, key, thread_id)

    async def settle(self, *, key: str | None = None, thread_id: str | None = None) -> None:
        """Wait for the saves and writes under way in this process of run ``key``, of every
        run of thread ``thread_id``, or (neither) of every run: those started meanwhile too,
        until none is left after a few turns of the event loop (LangGraph starts a queued
        save once the one before it ended)."""
        quiet = 0
        while quiet < _QUIET_TURNS:
            with self._under_way_lock:
                calls = [signal for run, (thread, signals) in self._under_way.items()
                         if (key is None or run == key)
                         and (thread_id is None or thread == thread_id)
                         for signal in signals]
            if not calls:
                quiet += 1
                await anyio.lowlevel.checkpoint()
                continue
            quiet = 0
            for signal in calls:
                await signal.wait()

    def remember(self, key: str, checkpoint_id: str, where: Located, *, head: bool,
                 payload_size: int | None = None) -> None:
        """A checkpoint of run ``key`` seen at ``where``; ``head``: the run's newest (just
        saved, or read as the latest), so the next save goes after it; ``payload_size``: the
        bytes its save wrote."""
        self.located.put((key, checkpoint_id), where)
        self.lives.put((key, checkpoint_id), where.incarnation)
        hint = self.runs.get(key)
        if hint is None and not head:
            return
        if hint is None or hint.incarnation != where.incarnation or (
            hint.latest_sequence < where.sequence
        ):
            size = 0 if hint is None else hint.payload_size
            hint = RunHint(where.sequence, where.incarnation, checkpoint_id, size)
            self.runs.put(key, hint)
        elif hint.latest_sequence == where.sequence:
            hint.newest_id = checkpoint_id
        if payload_size is not None:
            hint.payload_size = payload_size

    def saving_in(self, key: str) -> Signal | None:
        """The end of a save of run ``key`` on its way in this process, if any."""
        return next((signal for slot, signal in self.saving.items() if slot[0] == key), None)

    def failed_save(self, key: str, checkpoint_id: str) -> None:
        """The save of ``checkpoint_id`` failed: writes parked for it or a later checkpoint
        of the run are released (not stored), and later ones do not wait."""
        known = self.failed.get(key)
        if known is None or checkpoint_id < known:
            self.failed.put(key, checkpoint_id)
        for slot in [slot for slot in self.parked if slot[0] == key and slot[1] >= checkpoint_id]:
            self.parked.pop(slot).done.set()

    def forget_run(self, key: str) -> None:
        self.runs.pop(key)
        self.deleted.put(key, True)

    def turn(self, key: str) -> _Turn:
        """Saves of one run in this process take turns, first come first served: racing
        would only burn retries (so a turn given up by cancellation lets the next one in).
        An async context manager."""
        return _Turn(self._last_turn, key)


class _UnderWay:
    """:meth:`SaverState.under_way`: a class, not a generator, for it is on every save's and
    every write's path (a generator-based context manager costs about 1 µs more a use)."""

    __slots__ = ("_key", "_signal", "_state", "_thread_id")

    def __init__(self, state: SaverState, key: str, thread_id: str) -> None:
        self._state = state
        self._key = key
        self._thread_id = thread_id
        self._signal = Signal()

    def __enter__(self) -> None:
        state = self._state
        with state._under_way_lock:
            found = state._under_way.get(self._key)
            if found is None:
                found = state._under_way[self._key] = (self._thread_id, set())
            found[1].add(self._signal)

    def __exit__(self, *exc: object) -> None:
        self._signal.set()
        state = self._state
        with state._under_way_lock:
            found = state._under_way.get(self._key)
            if found is not None:
                found[1].discard(self._signal)
                if not found[1]:
                    del state._under_way[self._key]


class _Turn:
    """:meth:`SaverState.turn` (a class, like :class:`_UnderWay`)."""

    __slots__ = ("_key", "_last_turn", "_mine")

    def __init__(self, last_turn: dict[str, Signal], key: str) -> None:
        self._last_turn = last_turn
        self._key = key
        self._mine = Signal()

    async def __aenter__(self) -> None:
        previous = self._last_turn.get(self._key)
        self._last_turn[self._key] = self._mine
        if previous is not None:
            try:
                await previous.wait()
            except BaseException:
                self._release()
                raise

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        self._mine.set()
        if self._last_turn.get(self._key) is self._mine:
            del self._last_turn[self._key]
