"""A complete third-party store in plain dicts, using only public names: read it first.

It keeps bytes and judges expiry by the ``now`` it is handed, never by a clock of its own. No
method yields to the event loop, so each is atomic (a networked store gets that from transactions
or conditional writes). Every call scans a run's dicts, O(n), where a real store keeps indexes.
``tests/test_third_party_store.py`` runs the shipped ``StoreContract`` on it; run this file to
see it registered as ``dict://`` and used through ``open_store`` and a ``CheckpointManager``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import anyio
import msgspec

from fastcheckpoint import (
    CheckpointManager,
    CheckpointNotFound,
    ConflictError,
    SequenceConflict,
    ValidationError,
)
from fastcheckpoint.stores import (
    EMPTY_RUN,
    CheckpointHeader,
    ExpiryCleanup,
    Item,
    RunRecord,
    StoredCheckpoint,
    check_append,
    check_head,
    check_items,
    check_keep_latest,
    check_options,
    check_run_key,
    check_sequence,
    header_of,
    is_live,
    latest_expiry,
    open_store,
    register_store,
)

replace = msgspec.structs.replace
_Key = TypeVar("_Key")
_Expiring = RunRecord | StoredCheckpoint | Item


class DictStore(ExpiryCleanup):  # ExpiryCleanup adds cleanup_expired(), as every store has
    """Runs, checkpoints and items in dicts of this process."""

    sequence_guard = True  # update_run takes latest_sequence= (SupportsSequenceGuard)

    def __init__(self) -> None:
        self._runs: dict[str, RunRecord] = {}  # run key -> run record
        self._logs: dict[str, dict[int, StoredCheckpoint]] = {}  # run key -> sequence -> record
        self._items: dict[str, dict[str, Item]] = {}  # run key -> item key -> item

    @classmethod
    def from_url(cls, url: str, **options: Any) -> DictStore:
        """``dict://``: it takes no options, in the URL or as keywords."""
        query = parse_qsl(urlsplit(url).query, keep_blank_values=True)
        check_options("the dict:// store", [*(name for name, _ in query), *options], ())
        return cls()

    # -- the checkpoint log -------------------------------------------------------------------

    async def append(
        self, run_key: str, record: StoredCheckpoint, *, run: RunRecord,
        keep_latest: int | None, now: float,
    ) -> str:
        check_run_key(run_key)  # every check before the first change: a run id is refused
        check_keep_latest(keep_latest)
        check_append(run_key, record, run)  # the types of what it is given
        current = self._live_run(run_key, now)
        if current is None:  # only sequence 0 creates a run, over what an expired one left
            if record.sequence != 0:
                raise SequenceConflict(latest_sequence=None, incarnation=None)
            self._remove_run(run_key, keep_unowned_items=True)
            current = replace(run, data=bytes(run.data))  # the seed; counters set below
        elif record.sequence != current.latest_sequence + 1 or (
            run.incarnation != current.incarnation
        ):
            raise SequenceConflict(
                latest_sequence=current.latest_sequence, incarnation=current.incarnation)
        log = self._logs.setdefault(run_key, {})
        # A copy: a bytearray or a list the caller passed may change after the call.
        log[record.sequence] = replace(record, header=bytes(record.header),
                                       payload=bytes(record.payload), refs=tuple(record.refs))
        self._runs[run_key] = replace(
            current, latest_sequence=record.sequence, checkpoint_count=len(log),
            updated_at=now, expires_at=_held_expiry(log))
        for sequence in _expired(log, now):  # pruning: the expired, then the oldest
            self._remove(run_key, sequence)
        if keep_latest is not None:
            for sequence in sorted(log)[:-keep_latest]:
                self._remove(run_key, sequence)
        return self._runs[run_key].status

    async def get(
        self, run_key: str, sequence: int, *, now: float
    ) -> tuple[StoredCheckpoint, str] | None:
        check_run_key(run_key)
        sequence = check_sequence(sequence)  # a str or a float is the caller's mistake
        run = self._live_run(run_key, now)
        record = self._logs.get(run_key, {}).get(sequence)
        if run is None or record is None or not is_live(record.expires_at, now):
            return None
        return replace(record, key=f"dict://{run_key}/{sequence}"), run.status  # for messages

    async def latest(self, run_key: str, *, now: float) -> tuple[StoredCheckpoint, str] | None:
        check_run_key(run_key)
        log = self._logs.get(run_key, {})
        live = [sequence for sequence, record in log.items() if is_live(record.expires_at, now)]
        return await self.get(run_key, max(live), now=now) if live else None

    async def headers(
        self, run_key: str, *, before: int | None, limit: int, now: float,
        include_expired: bool = False,
    ) -> tuple[list[CheckpointHeader], str | None]:
        check_run_key(run_key)
        run = self._runs.get(run_key) if include_expired else self._live_run(run_key, now)
        if run is None:
            return [], None
        log = self._logs.get(run_key, {})
        found = [header_of(log[sequence]) for sequence in sorted(log, reverse=True)
                 if (before is None or sequence < before)
                 and (include_expired or is_live(log[sequence].expires_at, now))]
        return found[:limit], run.status

    async def delete(self, run_key: str, sequence: int, *, checkpoint_id: str) -> bool:
        check_run_key(run_key)
        sequence = check_sequence(sequence)
        record = self._logs.get(run_key, {}).get(sequence)
        if record is None or record.checkpoint_id != checkpoint_id:
            return False  # an id of a deleted run never deletes a checkpoint of a later one
        self._remove(run_key, sequence)
        return True

    async def delete_run(self, run_key: str) -> int:
        check_run_key(run_key)
        return self._remove_run(run_key, keep_unowned_items=False)

    # -- runs ---------------------------------------------------------------------------------

    async def get_run(self, run_key: str, *, now: float) -> RunRecord | None:
        check_run_key(run_key)
        return self._live_run(run_key, now)

    async def update_run(
        self, run_key: str, *, incarnation: str, version: int, status: str, data: bytes,
        now: float, latest_sequence: int | None = None,
    ) -> RunRecord:
        check_run_key(run_key)
        if latest_sequence is not None and (
                isinstance(latest_sequence, bool) or not isinstance(latest_sequence, int)):
            raise ValidationError(f"latest_sequence must be an int, got {latest_sequence!r:.40}")
        run = self._live_run(run_key, now)
        if run is None:
            raise CheckpointNotFound(f"no live run with key {run_key}")
        if (run.incarnation, run.version) != (incarnation, version):
            raise ConflictError(f"run {run_key} changed since {incarnation}/{version}")
        check_head(run_key, run.latest_sequence, latest_sequence)  # SupportsSequenceGuard
        run = self._runs[run_key] = replace(
            run, status=status, data=bytes(data), version=version + 1, updated_at=now)
        return run

    async def list_runs(
        self, *, status: str | None, limit: int, cursor: str | None, now: float
    ) -> tuple[list[RunRecord], str | None]:
        # Newest created first; the cursor is the (created_at, run key) of the last one given.
        order = sorted(((run.created_at, key) for key, run in self._live_runs(status, now)),
                       reverse=True)
        if cursor is not None:
            after = _parse_cursor(cursor)
            order = [position for position in order if position < after]
        page = order[:limit]
        next_cursor = f"{page[-1][0]!r}/{page[-1][1]}" if page and len(order) > limit else None
        return [self._runs[key] for _, key in page], next_cursor

    async def count_runs(self, *, status: str | None, now: float) -> int:
        return sum(1 for _ in self._live_runs(status, now))

    # -- items --------------------------------------------------------------------------------

    async def put_items(
        self, run_key: str, items: Sequence[Item], *, create_only: bool = False, now: float
    ) -> None:
        check_run_key(run_key)
        check_items(items)  # keys, values, owners and expiries of the right types
        space = self._items.get(run_key, {})
        for item in items:
            if create_only and item.key in space and is_live(space[item.key].expires_at, now):
                raise ConflictError(f"item {item.key!r} already exists")
        self._items.setdefault(run_key, {}).update((item.key, item) for item in items)

    async def get_items(self, run_key: str, keys: Sequence[str], *, now: float) -> dict[str, bytes]:
        check_run_key(run_key)
        space = self._items.get(run_key, {})
        return {key: space[key].value for key in keys
                if key in space and is_live(space[key].expires_at, now)}

    async def scan_items(
        self, run_key: str, *, prefix: str = "", start_after: str | None = None,
        limit: int = 100, reverse: bool = False, now: float,
    ) -> list[tuple[str, bytes]]:
        check_run_key(run_key)
        space = self._items.get(run_key, {})
        keys = sorted((key for key, item in space.items()  # str order is code point order
                       if key.startswith(prefix) and is_live(item.expires_at, now)),
                      reverse=reverse)
        if start_after is not None:
            keys = [key for key in keys if (key < start_after if reverse else key > start_after)]
        return [(key, space[key].value) for key in keys[:limit]]

    async def delete_items(self, run_key: str, keys: Sequence[str]) -> int:
        check_run_key(run_key)
        space = self._items.get(run_key, {})
        return sum(1 for key in keys if space.pop(key, None) is not None)

    # -- maintenance --------------------------------------------------------------------------

    async def purge_expired(self, *, now: float, limit: int) -> tuple[int, bool]:
        removed = work = 0
        for run_key in list(self._runs.keys() | self._items.keys()):
            if work >= limit:
                break
            run = self._runs.get(run_key)
            if run is not None and not is_live(run.expires_at, now):
                count = self._remove_run(run_key, keep_unowned_items=False)
                removed, work = removed + count, work + count + 1
                continue
            for sequence in _expired(self._logs.get(run_key, {}), now)[: limit - work]:
                self._remove(run_key, sequence)
                removed, work = removed + 1, work + 1
            space = self._items.get(run_key, {})
            for key in _expired(space, now)[: limit - work]:
                del space[key]
                work += 1
        spaces: list[Mapping[Any, _Expiring]] = [
            self._runs, *self._logs.values(), *self._items.values()]
        return removed, not any(_expired(space, now) for space in spaces)  # done?

    async def aclose(self) -> None:
        return None  # holds no connection or file

    # -- helpers ------------------------------------------------------------------------------

    def _live_run(self, run_key: str, now: float) -> RunRecord | None:
        run = self._runs.get(run_key)
        return run if run is not None and is_live(run.expires_at, now) else None

    def _live_runs(self, status: str | None, now: float) -> list[tuple[str, RunRecord]]:
        return [(key, run) for key, run in self._runs.items()
                if is_live(run.expires_at, now) and (status is None or run.status == status)]

    def _remove(self, run_key: str, sequence: int) -> None:
        """Remove a checkpoint and the items it owns. The run's expiry becomes the latest of
        the checkpoints left, so the record never outlives its data nor expires before it."""
        log = self._logs[run_key]
        del log[sequence]
        space = self._items.get(run_key, {})
        for key in [key for key, item in space.items() if item.owner == sequence]:
            del space[key]
        self._runs[run_key] = replace(
            self._runs[run_key], checkpoint_count=len(log), expires_at=_held_expiry(log))

    def _remove_run(self, run_key: str, *, keep_unowned_items: bool) -> int:
        """Remove the run's record, its checkpoints and the items they own, and its other items
        unless kept; return how many checkpoints went."""
        self._runs.pop(run_key, None)
        log = self._logs.pop(run_key, {})
        space = self._items.pop(run_key, {})
        if keep_unowned_items:
            self._items[run_key] = {k: item for k, item in space.items() if item.owner not in log}
        return len(log)


def _expired(records: Mapping[_Key, _Expiring], now: float) -> list[_Key]:
    """The keys of the records that expired by ``now``."""
    return [key for key, record in records.items() if not is_live(record.expires_at, now)]


def _held_expiry(log: dict[int, StoredCheckpoint]) -> float | None:
    """A run's ``expires_at``: the latest of its checkpoints' (``None``, never, wins), and
    ``EMPTY_RUN`` once it holds none, so an emptied run goes like an expired one."""
    if not log:
        return EMPTY_RUN
    return functools.reduce(latest_expiry, (record.expires_at for record in log.values()))


def _parse_cursor(cursor: str) -> tuple[float, str]:
    created_at, _, run_key = cursor.partition("/")
    try:
        return float(created_at), run_key
    except ValueError as exc:
        raise ValidationError(f"malformed run listing cursor {cursor!r:.60}") from exc


async def main() -> None:
    # open_store imports "module:Class" when a dict:// URL is first used (run as a script,
    # this file's folder is on sys.path: the module is "dict_store").
    register_store("dict", "dict_store:DictStore")
    manager = CheckpointManager(open_store("dict://"))
    try:
        await manager.create("run-1", {"step": 1}, step_name="plan")
        await manager.create("run-1", {"step": 2}, step_name="act")
        restored = await manager.restore("run-1")
        print(f"restored {restored and restored.state} from {type(manager.store).__name__}")
    finally:
        await manager.aclose()


if __name__ == "__main__":
    anyio.run(main)
