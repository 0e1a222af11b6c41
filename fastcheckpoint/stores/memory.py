"""In-process store: the reference implementation of the store protocol.

Holds encoded bytes only, so nothing a caller does to its objects changes what is stored.
Every method runs without awaiting, so each is atomic on its event loop.

Costs: append, get and latest are O(1) amortised (plus O(items + refs) for
``append_with_items``); headers is O(log n + k); pruning pops from the old end of a run's
sequence list. Expiry is tracked per run in heaps that are compacted when stale entries
outnumber live ones, and a store-wide heap holds one due time per run, so ``purge_expired`` does
work proportional to what expired. Runs are kept in creation order, so a new run is appended at
the end; a status change moves one entry between per-status lists, and each label has a list of
its runs in the same order. Shared items are reference-counted per run: a removed checkpoint
releases its ``refs`` and an item whose count drops to zero goes with it, in O(refs), with the
items nested under it (a slice of the run's sorted keys).
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, bisect_right, insort
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qsl, urlsplit

import msgspec

from fastcheckpoint.errors import (
    CheckpointNotFound,
    ConflictError,
    SequenceConflict,
    ValidationError,
)
from fastcheckpoint.stores._base import (
    EMPTY_RUN,
    NESTING,
    CheckpointHeader,
    ExpiryCleanup,
    Item,
    RunDamage,
    RunRecord,
    StoredCheckpoint,
    check_append,
    check_bytes,
    check_flag,
    check_guard_arg,
    check_head,
    check_int,
    check_items,
    check_keep_latest,
    check_keys,
    check_labels,
    check_limit,
    check_options,
    check_run_key,
    check_sequence,
    check_str,
    check_time,
    header_of,
    is_live,
    latest_expiry,
    nested_prefix,
    prefix_range,
    refs_to_find,
    unheld_refs,
)

__all__ = ["InMemoryCheckpointStore", "MemoryStore"]

_NEVER = math.inf


@dataclass
class _Run:
    record: RunRecord
    sequences: list[int] = field(default_factory=list)  # ascending
    checkpoints: dict[int, StoredCheckpoint] = field(default_factory=dict)
    expiring: list[tuple[float, int]] = field(default_factory=list)  # heap of (expires_at, seq)
    latest: list[tuple[float, int]] = field(default_factory=list)  # heap of (-expires_at, seq)
    immortal: int = 0  # checkpoints held that never expire

    def latest_finite_expiry(self) -> float:
        """The latest expiry among held checkpoints that expire (pops stale heap entries)."""
        while self.latest:
            negated, sequence = self.latest[0]
            record = self.checkpoints.get(sequence)
            if record is not None and record.expires_at == -negated:
                return -negated
            heapq.heappop(self.latest)
        return EMPTY_RUN


@dataclass
class _Items:
    keys: list[str] = field(default_factory=list)  # sorted
    items: dict[str, Item] = field(default_factory=dict)
    owned: dict[int, set[str]] = field(default_factory=dict)  # owner sequence -> keys
    expiring: list[tuple[float, str]] = field(default_factory=list)  # heap of (expires_at, key)
    refs: dict[str, int] = field(default_factory=dict)  # key -> held checkpoints naming it

    def live(self, key: str, now: float) -> Item | None:
        item = self.items.get(key)
        return item if item is not None and is_live(item.expires_at, now) else None


def _order_key(record: RunRecord, run_key: str) -> tuple[float, str]:
    return (record.created_at, run_key)


def _make_cursor(order: tuple[float, str]) -> str:
    return f"{order[0]!r}/{order[1]}"


def _parse_cursor(cursor: str) -> tuple[float, str]:
    created, _, run_key = cursor.partition("/")
    try:
        return (float(created), run_key)
    except ValueError as exc:
        raise ValidationError(f"malformed run listing cursor {cursor!r}") from exc


class MemoryStore(ExpiryCleanup):
    """Keeps everything in this process; for tests, notebooks and single-process agents."""

    nested_items = True
    sequence_guard = True
    never_suspends = True
    """Its calls await nothing (see :func:`~fastcheckpoint.stores.never_suspends`)."""

    def __init__(self) -> None:
        self._runs: dict[str, _Run] = {}
        self._items: dict[str, _Items] = {}
        self._order: dict[str | None, list[tuple[float, str]]] = {None: []}
        self._labels: dict[str, list[tuple[float, str]]] = {}  # label -> runs, creation order
        self._due: list[tuple[float, str]] = []  # heap: (when something of the run expires, key)
        self._scheduled: dict[str, float] = {}  # run key -> the due time in _due that counts

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MemoryStore:
        """``memory://``: it takes no options, in the URL or as keywords."""
        query = parse_qsl(urlsplit(url).query, keep_blank_values=True)
        check_options("the memory:// store", [*(name for name, _ in query), *options], ())
        return cls()

    def _checked_key(self, run_key: object) -> None:
        """:func:`check_run_key`, skipped for a key the store holds (it passed the check
        when its run or items were written): every call checks its key, most name a run."""
        if type(run_key) is not str or (run_key not in self._runs and run_key not in self._items):
            check_run_key(run_key)

    # -- expiry bookkeeping ---------------------------------------------------------------

    def _live_run(self, run_key: str, now: float) -> _Run | None:
        run = self._runs.get(run_key)
        if run is None or not is_live(run.record.expires_at, now):
            return None
        return run

    def _next_due(self, run_key: str) -> float:
        due = _NEVER
        run = self._runs.get(run_key)
        if run is not None:
            if run.record.expires_at is not None:
                due = run.record.expires_at
            if run.expiring:
                due = min(due, run.expiring[0][0])
        space = self._items.get(run_key)
        if space is not None and space.expiring:
            due = min(due, space.expiring[0][0])
        return due

    def _schedule(self, run_key: str, when: float | None) -> None:
        """Make sure the run is looked at by ``purge_expired`` no later than ``when``."""
        if when is None or when >= self._scheduled.get(run_key, _NEVER):
            return
        self._scheduled[run_key] = when
        heapq.heappush(self._due, (when, run_key))

    def _reschedule(self, run_key: str) -> None:
        self._scheduled.pop(run_key, None)
        due = self._next_due(run_key)
        if due != _NEVER:
            self._schedule(run_key, due)

    def _track_checkpoint_expiry(self, run_key: str, run: _Run, record: StoredCheckpoint) -> None:
        if record.expires_at is None:
            run.immortal += 1
            return
        heapq.heappush(run.expiring, (record.expires_at, record.sequence))
        heapq.heappush(run.latest, (-record.expires_at, record.sequence))
        if len(run.expiring) > 2 * len(run.checkpoints) + 16:
            held = [(r.expires_at, r.sequence) for r in run.checkpoints.values()
                    if r.expires_at is not None]
            run.expiring = held
            run.latest = [(-expires_at, sequence) for expires_at, sequence in held]
            heapq.heapify(run.expiring)
            heapq.heapify(run.latest)
        self._schedule(run_key, record.expires_at)

    def _track_item_expiry(self, run_key: str, space: _Items, item: Item) -> None:
        if item.expires_at is None:
            return
        heapq.heappush(space.expiring, (item.expires_at, item.key))
        if len(space.expiring) > 2 * len(space.items) + 16:
            space.expiring = [
                (i.expires_at, i.key) for i in space.items.values() if i.expires_at is not None
            ]
            heapq.heapify(space.expiring)
        self._schedule(run_key, item.expires_at)

    # -- run index ------------------------------------------------------------------------

    def _index(self, record: RunRecord, run_key: str) -> None:
        order = _order_key(record, run_key)
        insort(self._order[None], order)
        insort(self._order.setdefault(record.status, []), order)

    def _unindex(self, record: RunRecord, run_key: str) -> None:
        order = _order_key(record, run_key)
        for bucket in (self._order[None], self._order.get(record.status, [])):
            _remove_sorted(bucket, order)

    def _index_labels(self, record: RunRecord, run_key: str) -> None:
        order = _order_key(record, run_key)
        for label in dict.fromkeys(record.labels):
            insort(self._labels.setdefault(label, []), order)

    def _unindex_labels(self, record: RunRecord, run_key: str) -> None:
        order = _order_key(record, run_key)
        for label in dict.fromkeys(record.labels):
            bucket = self._labels.get(label, [])
            _remove_sorted(bucket, order)
            if not bucket:
                self._labels.pop(label, None)  # labels come and go with runs: keep no empty ones

    # -- removal --------------------------------------------------------------------------

    def _drop_checkpoint(self, run_key: str, run: _Run, sequence: int) -> bool:
        record = run.checkpoints.pop(sequence, None)
        if record is None:
            return False
        del run.sequences[bisect_left(run.sequences, sequence)]
        space = self._items.get(run_key)
        if space is not None:
            _release(space, record)
        expires_at = run.record.expires_at
        if record.expires_at is None:
            run.immortal -= 1
        if not run.checkpoints:
            expires_at = EMPTY_RUN
        elif run.immortal == 0 and record.expires_at in (None, expires_at):
            expires_at = run.latest_finite_expiry()
        run.record = msgspec.structs.replace(
            run.record, checkpoint_count=run.record.checkpoint_count - 1, expires_at=expires_at
        )
        self._schedule(run_key, expires_at)
        return True

    def _drop_run(self, run_key: str, *, keep_items: bool) -> int:
        """Remove the run's checkpoints (with owned items) and record; all items unless kept."""
        run = self._runs.pop(run_key, None)
        removed = 0
        if run is not None:
            self._unindex(run.record, run_key)
            self._unindex_labels(run.record, run_key)
            space = self._items.get(run_key)
            for sequence in run.sequences:
                removed += 1
                if space is not None:
                    _release(space, run.checkpoints[sequence])
        if not keep_items:
            self._items.pop(run_key, None)
        self._reschedule(run_key)
        return removed

    def _prune(self, run_key: str, run: _Run, keep_latest: int | None, now: float) -> None:
        self._drop_expired_checkpoints(run_key, run, now, limit=None)
        if keep_latest is None:
            return
        while len(run.sequences) > keep_latest:
            self._drop_checkpoint(run_key, run, run.sequences[0])

    def _drop_expired_checkpoints(
        self, run_key: str, run: _Run, now: float, limit: int | None
    ) -> int:
        removed = 0
        while run.expiring and run.expiring[0][0] <= now and (limit is None or removed < limit):
            expires_at, sequence = heapq.heappop(run.expiring)
            record = run.checkpoints.get(sequence)
            if record is not None and record.expires_at == expires_at:
                removed += self._drop_checkpoint(run_key, run, sequence)
        return removed

    def _located(self, run_key: str, record: StoredCheckpoint) -> StoredCheckpoint:
        return msgspec.structs.replace(record, key=f"memory://{run_key}/{record.sequence}")

    # -- checkpoint log -------------------------------------------------------------------

    async def append(
        self,
        run_key: str,
        record: StoredCheckpoint,
        *,
        run: RunRecord,
        keep_latest: int | None,
        now: float,
    ) -> str:
        check_time("now", now)
        return self._append(run_key, record, run, keep_latest, now, ())

    async def append_with_items(
        self,
        run_key: str,
        record: StoredCheckpoint,
        *,
        run: RunRecord,
        keep_latest: int | None,
        now: float,
        items: Sequence[Item],
    ) -> str:
        check_time("now", now)
        return self._append(run_key, record, run, keep_latest, now, items)

    def _append(
        self,
        run_key: str,
        record: StoredCheckpoint,
        run: RunRecord,
        keep_latest: int | None,
        now: float,
        items: Sequence[Item],
    ) -> str:
        self._checked_key(run_key)
        keep_latest = check_keep_latest(keep_latest)
        check_append(run_key, record, run, items)
        current = self._live_run(run_key, now)
        if current is None:
            if record.sequence != 0:
                raise SequenceConflict(latest_sequence=None, incarnation=None)
            self._check_refs_held(run_key, record, items, now, new_life=True)
            self._drop_run(run_key, keep_items=True)
            seed = msgspec.structs.replace(run, latest_sequence=-1, checkpoint_count=0,
                                           expires_at=record.expires_at, data=bytes(run.data))
            current = self._runs[run_key] = _Run(record=seed)
            self._index(seed, run_key)
            self._index_labels(seed, run_key)
        elif record.sequence != current.record.latest_sequence + 1 or (
            run.incarnation != current.record.incarnation
        ):
            raise SequenceConflict(
                latest_sequence=current.record.latest_sequence,
                incarnation=current.record.incarnation,
            )
        else:
            self._check_refs_held(run_key, record, items, now)
        head = current.record
        # Of its own: a list of refs or a bytearray the caller keeps would change what is
        # stored.
        stored = record if record.key == "" and type(record.refs) is tuple and \
            type(record.header) is bytes and type(record.payload) is bytes else (
                msgspec.structs.replace(record, key="", refs=tuple(record.refs),
                                        header=bytes(record.header),
                                        payload=bytes(record.payload)))
        current.checkpoints[record.sequence] = stored
        current.sequences.append(record.sequence)
        current.record = msgspec.structs.replace(
            head,
            latest_sequence=record.sequence,
            checkpoint_count=head.checkpoint_count + 1,
            updated_at=now,
            expires_at=latest_expiry(head.expires_at, record.expires_at),
        )
        if stored.refs or items:
            self._add_shared(run_key, stored, items, now)
        self._track_checkpoint_expiry(run_key, current, record)
        self._prune(run_key, current, keep_latest, now)
        return current.record.status

    def _check_refs_held(
        self, run_key: str, record: StoredCheckpoint, items: Sequence[Item], now: float,
        *, new_life: bool = False,
    ) -> None:
        """Refuse (before any change) refs naming items the run does not hold. A new life
        holds only the loose items (``put_items``) of its run key: what the checkpoints of an
        earlier life named or owned goes with them."""
        space = self._items.get(run_key)

        def held(key: str) -> bool:
            item = None if space is None else space.live(key, now)
            if item is None or space is None:
                return False
            return not new_life or (item.owner is None and space.refs.get(key, 0) == 0)

        missing = [key for key in refs_to_find(record, items) if not held(key)]
        if missing:
            raise unheld_refs(run_key, record.sequence, missing)

    def _add_shared(
        self, run_key: str, record: StoredCheckpoint, items: Sequence[Item], now: float
    ) -> None:
        """Count the new checkpoint's refs, then write its items where no live item is: before
        pruning, so an item it names is never released by the checkpoints it replaces."""
        space = self._space(run_key)
        for key in dict.fromkeys(record.refs):
            space.refs[key] = space.refs.get(key, 0) + 1
        for item in items:
            if space.live(item.key, now) is not None:
                continue  # written once per key: a live value is never replaced
            # Owned items expire with their checkpoint; shared ones live while a checkpoint
            # names them, so they carry no expiry of their own.
            expires_at = record.expires_at if item.owner is not None else None
            self._write_item(run_key, space, _expiring(item, expires_at))

    async def get(
        self, run_key: str, sequence: int, *, now: float
    ) -> tuple[StoredCheckpoint, str] | None:
        sequence = check_sequence(sequence)
        check_time("now", now)
        self._checked_key(run_key)
        return self._get(run_key, sequence, now)

    def _get(self, run_key: str, sequence: int, now: float) -> tuple[StoredCheckpoint, str] | None:
        run = self._live_run(run_key, now)
        record = None if run is None else _live_checkpoint(run, sequence, now)
        if run is None or record is None:
            return None
        return self._located(run_key, record), run.record.status

    async def latest(self, run_key: str, *, now: float) -> tuple[StoredCheckpoint, str] | None:
        check_time("now", now)
        self._checked_key(run_key)
        return self._latest(run_key, now)

    def _latest(self, run_key: str, now: float) -> tuple[StoredCheckpoint, str] | None:
        run = self._live_run(run_key, now)
        if run is None:
            return None
        for sequence in reversed(run.sequences):
            record = run.checkpoints[sequence]
            if is_live(record.expires_at, now):
                return self._located(run_key, record), run.record.status
        return None

    async def read_with_items(
        self, run_key: str, *, sequence: int | None, now: float
    ) -> tuple[StoredCheckpoint, str, dict[str, bytes]] | None:
        if sequence is not None:
            sequence = check_sequence(sequence)
        check_time("now", now)
        self._checked_key(run_key)
        if sequence is None:
            found = self._latest(run_key, now)
        else:
            found = self._get(run_key, sequence, now)
        if found is None:
            return None
        record, status = found
        space = self._items.get(run_key)
        items: dict[str, bytes] = {}
        if space is not None:
            for key in (*space.owned.get(record.sequence, ()), *record.refs):
                item = space.live(key, now)
                if item is not None:
                    items[key] = item.value
            for key in dict.fromkeys(record.refs):
                for nested in _nested_keys(space, key):
                    item = space.live(nested, now)
                    if item is not None and item.owner in (None, record.sequence):
                        items[nested] = item.value
        return record, status, items

    async def put_owned_items(
        self,
        run_key: str,
        items: Sequence[Item],
        *,
        owner: int,
        checkpoint_id: str,
        if_absent: bool,
        now: float,
    ) -> bool:
        check_int("owner", owner)
        checkpoint_id = cast(str, check_str("checkpoint_id", checkpoint_id))
        self._checked_key(run_key)
        check_items(items)
        _check_owned_items(items, owner)
        check_flag("if_absent", if_absent)
        check_time("now", now)
        run = self._live_run(run_key, now)
        record = None if run is None else _live_checkpoint(run, owner, now)
        if record is None or record.checkpoint_id != checkpoint_id:
            return False
        space = self._space(run_key)
        for item in items:
            if if_absent and space.live(item.key, now) is not None:
                continue
            self._write_item(run_key, space, _expiring(item, record.expires_at))
        return True

    async def headers(
        self,
        run_key: str,
        *,
        before: int | None,
        limit: int,
        now: float,
        include_expired: bool = False,
    ) -> tuple[list[CheckpointHeader], str | None]:
        self._checked_key(run_key)
        if before is not None:
            check_int("before", before)
        check_limit("limit", limit)
        check_time("now", now)
        check_flag("include_expired", include_expired)
        run = self._runs.get(run_key) if include_expired else self._live_run(run_key, now)
        if run is None:
            return [], None
        end = len(run.sequences) if before is None else bisect_left(run.sequences, before)
        result: list[CheckpointHeader] = []
        for index in range(end - 1, -1, -1):
            if len(result) >= limit:
                break
            record = run.checkpoints[run.sequences[index]]
            if include_expired or is_live(record.expires_at, now):
                result.append(header_of(record))
        return result, run.record.status

    async def delete(self, run_key: str, sequence: int, *, checkpoint_id: str) -> bool:
        sequence = check_sequence(sequence)
        checkpoint_id = cast(str, check_str("checkpoint_id", checkpoint_id))
        self._checked_key(run_key)
        run = self._runs.get(run_key)
        if run is None:
            return False
        record = run.checkpoints.get(sequence)
        if record is None or record.checkpoint_id != checkpoint_id:
            return False
        return self._drop_checkpoint(run_key, run, sequence)

    async def delete_run(self, run_key: str) -> int:
        self._checked_key(run_key)
        return self._drop_run(run_key, keep_items=False)

    # -- runs -----------------------------------------------------------------------------

    async def get_run(self, run_key: str, *, now: float) -> RunRecord | None:
        check_time("now", now)
        self._checked_key(run_key)
        run = self._live_run(run_key, now)
        return None if run is None else run.record

    async def update_run(
        self,
        run_key: str,
        *,
        incarnation: str,
        version: int,
        status: str,
        data: bytes,
        now: float,
        latest_sequence: int | None = None,
    ) -> RunRecord:
        check_time("now", now)
        self._checked_key(run_key)
        check_guard_arg(latest_sequence)
        incarnation = cast(str, check_str("incarnation", incarnation))
        check_int("version", version)
        status = cast(str, check_str("status", status))
        check_bytes("data", data)
        run = self._live_run(run_key, now)
        if run is None:
            raise CheckpointNotFound(f"no live run with key {run_key}")
        if (run.record.incarnation, run.record.version) != (incarnation, version):
            raise ConflictError(
                f"run changed concurrently (now {run.record.incarnation}/{run.record.version}, "
                f"expected {incarnation}/{version})"
            )
        check_head(run_key, run.record.latest_sequence, latest_sequence)
        self._unindex(run.record, run_key)
        run.record = msgspec.structs.replace(
            run.record, status=status, data=bytes(data), version=version + 1, updated_at=now
        )
        self._index(run.record, run_key)
        return run.record

    async def list_runs(
        self, *, status: str | None, limit: int, cursor: str | None, now: float
    ) -> tuple[list[RunRecord], str | None]:
        check_time("now", now)
        status = check_str("status", status, optional=True)
        return self._page(self._order.get(status, []), limit, cursor, now)

    async def runs_with_label(
        self, label: str, *, limit: int, cursor: str | None, now: float
    ) -> tuple[list[RunRecord], str | None]:
        check_time("now", now)
        check_labels((label,))
        return self._page(self._labels.get(label, []), limit, cursor, now)

    def _page(
        self, bucket: list[tuple[float, str]], limit: int, cursor: str | None, now: float
    ) -> tuple[list[RunRecord], str | None]:
        """Live runs of an index, newest created first, from ``cursor`` on."""
        check_limit("limit", limit, minimum=1)
        cursor = check_str("cursor", cursor, optional=True)
        check_time("now", now)
        index = len(bucket) if cursor is None else bisect_left(bucket, _parse_cursor(cursor))
        result: list[RunRecord] = []
        while index > 0 and len(result) < limit:
            index -= 1
            run = self._live_run(bucket[index][1], now)
            if run is not None:
                result.append(run.record)
        return result, (_make_cursor(bucket[index]) if index > 0 else None)

    async def count_runs(self, *, status: str | None, now: float) -> int:
        status = check_str("status", status, optional=True)
        check_time("now", now)
        # Indexed runs minus those expired but not purged yet; only runs due by now can be.
        expired = sum(
            1 for run_key in self._due_by(now)
            if (run := self._runs.get(run_key)) is not None
            and not is_live(run.record.expires_at, now)
            and status in (None, run.record.status)
        )
        return len(self._order.get(status, [])) - expired

    def _due_by(self, now: float) -> set[str]:
        """Keys of runs scheduled at or before ``now``: a walk of the heap's top, O(due)."""
        due: set[str] = set()
        stack = [0] if self._due else []
        while stack:
            index = stack.pop()
            when, run_key = self._due[index]
            if when > now:
                continue
            if self._scheduled.get(run_key) == when:
                due.add(run_key)
            stack.extend(child for child in (2 * index + 1, 2 * index + 2)
                         if child < len(self._due))
        return due

    # -- items ----------------------------------------------------------------------------

    async def put_items(
        self, run_key: str, items: Sequence[Item], *, create_only: bool = False, now: float
    ) -> None:
        self._checked_key(run_key)
        check_items(items)
        check_flag("create_only", create_only)
        check_time("now", now)
        space = self._space(run_key)
        if create_only:
            for item in items:
                if space.live(item.key, now) is not None:
                    raise ConflictError(f"item {item.key!r} already exists")
        for item in items:
            self._write_item(run_key, space, item)

    def _space(self, run_key: str) -> _Items:
        """The run's items, made when it has none (not built on every call, as
        ``setdefault`` would)."""
        space = self._items.get(run_key)
        if space is None:
            space = self._items[run_key] = _Items()
        return space

    def _write_item(self, run_key: str, space: _Items, item: Item) -> None:
        if item.key in space.items:
            _drop_item(space, item.key)
        space.items[item.key] = item
        insort(space.keys, item.key)
        if item.owner is not None:
            space.owned.setdefault(item.owner, set()).add(item.key)
        if item.expires_at is not None:
            self._track_item_expiry(run_key, space, item)

    async def get_items(
        self, run_key: str, keys: Sequence[str], *, now: float
    ) -> dict[str, bytes]:
        self._checked_key(run_key)
        keys = check_keys(keys)
        check_time("now", now)
        space = self._items.get(run_key)
        if space is None:
            return {}
        result: dict[str, bytes] = {}
        for key in keys:
            item = space.items.get(key)
            if item is not None and is_live(item.expires_at, now):
                result[key] = item.value
        return result

    async def scan_items(
        self,
        run_key: str,
        *,
        prefix: str = "",
        start_after: str | None = None,
        limit: int = 100,
        reverse: bool = False,
        now: float,
    ) -> list[tuple[str, bytes]]:
        self._checked_key(run_key)
        prefix = cast(str, check_str("prefix", prefix))
        start_after = check_str("start_after", start_after, optional=True)
        check_limit("limit", limit)
        check_flag("reverse", reverse)
        check_time("now", now)
        space = self._items.get(run_key)
        if space is None:
            return []
        keys = space.keys
        low, high = prefix_range(keys, prefix)
        if start_after is not None and reverse:
            high = min(high, bisect_left(keys, start_after, lo=low))
        elif start_after is not None:
            low = max(low, bisect_right(keys, start_after))
        indexes = range(high - 1, low - 1, -1) if reverse else range(low, high)
        result: list[tuple[str, bytes]] = []
        for index in indexes:
            if len(result) >= limit:
                break
            item = space.items[keys[index]]
            if is_live(item.expires_at, now):
                result.append((item.key, item.value))
        return result

    async def delete_items(self, run_key: str, keys: Sequence[str]) -> int:
        self._checked_key(run_key)
        keys = check_keys(keys)
        space = self._items.get(run_key)
        if space is None:
            return 0
        return sum(1 for key in keys if _drop_item(space, key))

    # -- maintenance ----------------------------------------------------------------------

    async def purge_expired(self, *, now: float, limit: int) -> tuple[int, bool]:
        check_time("now", now)
        check_limit("limit", limit)
        removed = 0
        work = 0
        while self._due and self._due[0][0] <= now and work < limit:
            due, run_key = heapq.heappop(self._due)
            if self._scheduled.get(run_key) != due:
                continue  # superseded by an earlier schedule
            del self._scheduled[run_key]
            checkpoints, steps = self._purge_run(run_key, now, limit - work)
            removed += checkpoints
            work += max(steps, 1)
            self._reschedule(run_key)
        return removed, not self._due or self._due[0][0] > now

    def _purge_run(self, run_key: str, now: float, budget: int) -> tuple[int, int]:
        """Remove what of this run expired, up to ``budget`` things: (checkpoints, things)."""
        run = self._runs.get(run_key)
        if run is not None and not is_live(run.record.expires_at, now):
            removed = self._drop_run(run_key, keep_items=False)
            return removed, removed + 1
        removed = 0 if run is None else self._drop_expired_checkpoints(run_key, run, now, budget)
        space = self._items.get(run_key)
        items = 0
        while space is not None and space.expiring and space.expiring[0][0] <= now and (
            removed + items < budget
        ):
            expires_at, key = heapq.heappop(space.expiring)
            item = space.items.get(key)
            if item is not None and item.expires_at == expires_at:
                items += _drop_item(space, key)
        if space is not None and not space.items and run is None:
            del self._items[run_key]
        return removed, removed + items

    # -- repair ---------------------------------------------------------------------------

    async def damaged_runs(self, *, run_key: str | None = None, now: float) -> list[RunDamage]:
        """Always ``[]``: run records live as Python objects that no write leaves half done,
        so ``CheckpointManager.repair()`` works here (and finds nothing) as on durable stores."""
        check_time("now", now)
        if run_key is not None:
            self._checked_key(run_key)
        return []

    async def rebuild_run(self, run_key: str, seed: RunRecord, *, now: float) -> RunRecord:
        if not isinstance(seed, RunRecord):  # its incarnation is the log's, not the seed's
            raise ValidationError(f"seed must be a RunRecord, got {type(seed).__name__}")
        check_time("now", now)
        self._checked_key(run_key)
        if run_key in self._runs:
            raise ConflictError(f"the run record of run key {run_key} is not damaged")
        raise CheckpointNotFound(f"run key {run_key} holds no checkpoint to rebuild a record from")

    async def aclose(self) -> None:
        return None


def _live_checkpoint(run: _Run, sequence: int, now: float) -> StoredCheckpoint | None:
    record = run.checkpoints.get(sequence)
    return record if record is not None and is_live(record.expires_at, now) else None


def _expiring(item: Item, expires_at: float | None) -> Item:
    """``item`` expiring at ``expires_at`` (itself when it does: items are frozen)."""
    if item.expires_at == expires_at:
        return item
    return msgspec.structs.replace(item, expires_at=expires_at)


def _remove_sorted(bucket: list[tuple[float, str]], order: tuple[float, str]) -> None:
    index = bisect_left(bucket, order)
    if index < len(bucket) and bucket[index] == order:
        del bucket[index]


def _check_owned_items(items: Sequence[Item], owner: int) -> None:
    """Every item is owned by ``owner`` (their keys are checked by ``check_items``)."""
    for item in items:
        if item.owner != owner:
            raise ValidationError(
                f"item {item.key[:40]!r} is owned by {item.owner}, not by checkpoint {owner}")


def _release(space: _Items, record: StoredCheckpoint) -> None:
    """A checkpoint leaves: its owned items go, and the shared items it was the last to name
    with what is nested under them (also under a key whose item an owner or ``delete_items``
    took), except what a held checkpoint still names or is nested under a key one names, and
    what another checkpoint owns (it goes with its owner)."""
    for key in list(space.owned.pop(record.sequence, ())):
        _drop_item(space, key)
    for key in dict.fromkeys(record.refs):
        count = space.refs.get(key, 0) - 1
        if count > 0:
            space.refs[key] = count
            continue
        space.refs.pop(key, None)
        if _named(space, key):
            continue  # nested under a key still named: it stays, with what is nested under it
        item = space.items.get(key)
        if item is not None and item.owner is None:
            _drop_item(space, key)
        for nested in _nested_keys(space, key):
            if space.items[nested].owner is None and not _named(space, nested):
                _drop_item(space, nested)


def _named(space: _Items, key: str) -> bool:
    """Whether a held checkpoint names ``key`` or a key it is nested under."""
    if key in space.refs:
        return True
    cut = key.find(NESTING)
    while cut != -1:
        if key[:cut] in space.refs:
            return True
        cut = key.find(NESTING, cut + 1)
    return False


def _nested_keys(space: _Items, key: str) -> list[str]:
    """Keys of the items nested under ``key``, ascending."""
    low, high = prefix_range(space.keys, nested_prefix(key))
    return space.keys[low:high]


def _drop_item(space: _Items, key: str) -> bool:
    item = space.items.pop(key, None)
    if item is None:
        return False
    del space.keys[bisect_left(space.keys, key)]
    if item.owner is not None:
        owned = space.owned.get(item.owner)
        if owned is not None:
            owned.discard(key)
    return True


InMemoryCheckpointStore = MemoryStore
"""FastAgentic's name for the in-memory store."""
