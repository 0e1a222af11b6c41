"""In-process store: the reference implementation of the store protocol.

Holds encoded bytes only, so nothing a caller does to its objects changes what is stored.
Costs: append, get and latest are O(1) amortised (pruning pops from the old end of a sorted
sequence list, expiry uses a heap); headers is O(log n + k); items are a sorted key list.
Every method runs without awaiting, so each is atomic on its event loop.
"""

from __future__ import annotations

import heapq
import itertools
from bisect import bisect_left, bisect_right, insort
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from fastcheckpoint.errors import (
    CheckpointNotFound,
    ConfigurationError,
    ConflictError,
    SequenceConflict,
    ValidationError,
)
from fastcheckpoint.stores._base import (
    CheckpointHeader,
    Item,
    RunRecord,
    StoredCheckpoint,
    header_of,
    is_live,
    latest_expiry,
)

__all__ = ["InMemoryCheckpointStore", "MemoryStore"]

_CHECKPOINT, _ITEM, _RUN = 0, 1, 2


@dataclass
class _Run:
    record: RunRecord
    sequences: list[int] = field(default_factory=list)  # ascending
    checkpoints: dict[int, StoredCheckpoint] = field(default_factory=dict)
    expiring: list[tuple[float, int]] = field(default_factory=list)  # heap of (expires_at, seq)


@dataclass
class _Items:
    keys: list[str] = field(default_factory=list)  # sorted
    items: dict[str, Item] = field(default_factory=dict)
    owned: dict[int, set[str]] = field(default_factory=dict)  # owner sequence -> keys


def _order_key(record: RunRecord, run_key: str) -> tuple[float, str]:
    return (-record.created_at, run_key)


def _make_cursor(order: tuple[float, str]) -> str:
    return f"{-order[0]!r}/{order[1]}"


def _parse_cursor(cursor: str) -> tuple[float, str]:
    created, _, run_key = cursor.partition("/")
    try:
        return (-float(created), run_key)
    except ValueError as exc:
        raise ValidationError(f"malformed run listing cursor {cursor!r}") from exc


def _successor(prefix: str) -> str:
    """The smallest string greater than every string that starts with ``prefix``."""
    while prefix and prefix[-1] == "\U0010ffff":
        prefix = prefix[:-1]
    if not prefix:
        return "\U0010ffff" * 2
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class MemoryStore:
    """Keeps everything in this process; for tests, notebooks and single-process agents."""

    def __init__(self) -> None:
        self._runs: dict[str, _Run] = {}
        self._items: dict[str, _Items] = {}
        self._order: dict[str | None, list[tuple[float, str]]] = {None: []}
        self._expiry: list[tuple[float, int, str, int, Any]] = []
        self._tiebreak = itertools.count()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MemoryStore:
        if options:
            raise ConfigurationError(f"memory:// takes no options, got {sorted(options)}")
        return cls()

    # -- internals ------------------------------------------------------------------------

    def _live_run(self, run_key: str, now: float) -> _Run | None:
        run = self._runs.get(run_key)
        if run is None or not is_live(run.record.expires_at, now):
            return None
        return run

    def _schedule(self, expires_at: float | None, run_key: str, kind: int, ident: Any) -> None:
        if expires_at is not None:
            entry = (expires_at, next(self._tiebreak), run_key, kind, ident)
            heapq.heappush(self._expiry, entry)

    def _index(self, record: RunRecord, run_key: str) -> None:
        order = _order_key(record, run_key)
        insort(self._order[None], order)
        insort(self._order.setdefault(record.status, []), order)

    def _unindex(self, record: RunRecord, run_key: str) -> None:
        order = _order_key(record, run_key)
        for bucket in (self._order[None], self._order.get(record.status, [])):
            index = bisect_left(bucket, order)
            if index < len(bucket) and bucket[index] == order:
                del bucket[index]

    def _drop_checkpoint(self, run_key: str, run: _Run, sequence: int) -> bool:
        if run.checkpoints.pop(sequence, None) is None:
            return False
        del run.sequences[bisect_left(run.sequences, sequence)]
        space = self._items.get(run_key)
        if space is not None:
            for key in list(space.owned.pop(sequence, ())):
                _drop_item(space, key)
        run.record = msgspec.structs.replace(
            run.record, checkpoint_count=run.record.checkpoint_count - 1
        )
        return True

    def _drop_run(self, run_key: str, *, keep_items: bool) -> int:
        """Remove the run's checkpoints (with owned items) and record; all items unless kept."""
        run = self._runs.pop(run_key, None)
        removed = 0
        if run is not None:
            self._unindex(run.record, run_key)
            for sequence in list(run.sequences):
                removed += self._drop_checkpoint(run_key, run, sequence)
        if not keep_items:
            self._items.pop(run_key, None)
        return removed

    def _prune(self, run_key: str, run: _Run, keep_latest: int | None, now: float) -> None:
        while run.expiring and run.expiring[0][0] <= now:
            _, sequence = heapq.heappop(run.expiring)
            self._drop_checkpoint(run_key, run, sequence)
        if keep_latest is None:
            return
        while len(run.sequences) > keep_latest:
            self._drop_checkpoint(run_key, run, run.sequences[0])

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
        current = self._live_run(run_key, now)
        if current is None:
            if record.sequence != 0:
                raise SequenceConflict(latest_sequence=None, incarnation=None)
            self._drop_run(run_key, keep_items=True)
            seed = msgspec.structs.replace(run, latest_sequence=-1, checkpoint_count=0,
                                           expires_at=record.expires_at)
            current = self._runs[run_key] = _Run(record=seed)
            self._index(seed, run_key)
            self._schedule(seed.expires_at, run_key, _RUN, None)
        elif record.sequence != current.record.latest_sequence + 1 or (
            run.incarnation != current.record.incarnation
        ):
            raise SequenceConflict(
                latest_sequence=current.record.latest_sequence,
                incarnation=current.record.incarnation,
            )
        head = current.record
        expires_at = latest_expiry(head.expires_at, record.expires_at)
        current.checkpoints[record.sequence] = msgspec.structs.replace(record, key="")
        current.sequences.append(record.sequence)
        current.record = msgspec.structs.replace(
            head,
            latest_sequence=record.sequence,
            checkpoint_count=head.checkpoint_count + 1,
            updated_at=now,
            expires_at=expires_at,
        )
        if record.expires_at is not None:
            heapq.heappush(current.expiring, (record.expires_at, record.sequence))
            self._schedule(record.expires_at, run_key, _CHECKPOINT, record.sequence)
        if expires_at != head.expires_at:
            self._schedule(expires_at, run_key, _RUN, None)
        self._prune(run_key, current, keep_latest, now)
        return current.record.status

    async def get(
        self, run_key: str, sequence: int, *, now: float
    ) -> tuple[StoredCheckpoint, str] | None:
        run = self._live_run(run_key, now)
        if run is None:
            return None
        record = run.checkpoints.get(sequence)
        if record is None or not is_live(record.expires_at, now):
            return None
        return self._located(run_key, record), run.record.status

    async def latest(self, run_key: str, *, now: float) -> tuple[StoredCheckpoint, str] | None:
        run = self._live_run(run_key, now)
        if run is None:
            return None
        for sequence in reversed(run.sequences):
            record = run.checkpoints[sequence]
            if is_live(record.expires_at, now):
                return self._located(run_key, record), run.record.status
        return None

    async def headers(
        self,
        run_key: str,
        *,
        before: int | None,
        limit: int,
        now: float,
        include_expired: bool = False,
    ) -> tuple[list[CheckpointHeader], str | None]:
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
        run = self._runs.get(run_key)
        if run is None:
            return False
        record = run.checkpoints.get(sequence)
        if record is None or record.checkpoint_id != checkpoint_id:
            return False
        return self._drop_checkpoint(run_key, run, sequence)

    async def delete_run(self, run_key: str) -> int:
        return self._drop_run(run_key, keep_items=False)

    # -- runs -----------------------------------------------------------------------------

    async def get_run(self, run_key: str, *, now: float) -> RunRecord | None:
        run = self._live_run(run_key, now)
        return None if run is None else run.record

    async def update_run(
        self, run_key: str, *, version: int, status: str, data: bytes, now: float
    ) -> RunRecord:
        run = self._live_run(run_key, now)
        if run is None:
            raise CheckpointNotFound(f"no live run with key {run_key}")
        if run.record.version != version:
            raise ConflictError(
                f"run changed concurrently (version {run.record.version}, expected {version})"
            )
        self._unindex(run.record, run_key)
        run.record = msgspec.structs.replace(
            run.record, status=status, data=data, version=version + 1, updated_at=now
        )
        self._index(run.record, run_key)
        return run.record

    async def list_runs(
        self, *, status: str | None, limit: int, cursor: str | None, now: float
    ) -> tuple[list[RunRecord], str | None]:
        bucket = self._order.get(status, [])
        index = 0 if cursor is None else bisect_right(bucket, _parse_cursor(cursor))
        result: list[RunRecord] = []
        while index < len(bucket) and len(result) < limit:
            run = self._live_run(bucket[index][1], now)
            if run is not None:
                result.append(run.record)
            index += 1
        more = index < len(bucket)
        return result, (_make_cursor(bucket[index - 1]) if more else None)

    async def count_runs(self, *, status: str | None, now: float) -> int:
        bucket = self._order.get(status, [])
        return sum(1 for _, run_key in bucket if self._live_run(run_key, now) is not None)

    # -- items ----------------------------------------------------------------------------

    async def put_items(
        self, run_key: str, items: Sequence[Item], *, create_only: bool = False, now: float
    ) -> None:
        space = self._items.setdefault(run_key, _Items())
        if create_only:
            for item in items:
                existing = space.items.get(item.key)
                if existing is not None and is_live(existing.expires_at, now):
                    raise ConflictError(f"item {item.key!r} already exists")
        for item in items:
            _drop_item(space, item.key)
            space.items[item.key] = item
            insort(space.keys, item.key)
            if item.owner is not None:
                space.owned.setdefault(item.owner, set()).add(item.key)
            self._schedule(item.expires_at, run_key, _ITEM, item)

    async def get_items(
        self, run_key: str, keys: Sequence[str], *, now: float
    ) -> dict[str, bytes]:
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
        space = self._items.get(run_key)
        if space is None:
            return []
        keys = space.keys
        low = bisect_left(keys, prefix)
        high = bisect_left(keys, _successor(prefix), lo=low) if prefix else len(keys)
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
        space = self._items.get(run_key)
        if space is None:
            return 0
        return sum(1 for key in keys if _drop_item(space, key))

    # -- maintenance ----------------------------------------------------------------------

    async def purge_expired(self, *, now: float, limit: int) -> tuple[int, bool]:
        removed = 0
        work = 0
        while self._expiry and self._expiry[0][0] <= now and work < limit:
            expires_at, _, run_key, kind, ident = heapq.heappop(self._expiry)
            did_work, checkpoints = self._purge_one(run_key, kind, ident, expires_at)
            work += did_work
            removed += checkpoints
        done = not self._expiry or self._expiry[0][0] > now
        return removed, done

    def _purge_one(
        self, run_key: str, kind: int, ident: Any, expires_at: float
    ) -> tuple[int, int]:
        """Remove one due heap entry if still current: ``(1 if it removed, checkpoints)``."""
        if kind == _ITEM:
            item: Item = ident
            space = self._items.get(run_key)
            if space is None or space.items.get(item.key) is not item:
                return 0, 0
            return int(_drop_item(space, item.key)), 0
        run = self._runs.get(run_key)
        if run is None:
            return 0, 0
        if kind == _RUN:
            if run.record.expires_at != expires_at:
                return 0, 0
            return 1, self._drop_run(run_key, keep_items=False)
        record = run.checkpoints.get(ident)
        if record is None or record.expires_at != expires_at:
            return 0, 0
        return 1, int(self._drop_checkpoint(run_key, run, ident))

    async def aclose(self) -> None:
        return None


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
