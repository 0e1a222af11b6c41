"""The store protocol: the few atomic primitives every backend offers the manager.

The manager owns every rule about checkpoints (sequencing, ids, TTL policy, pruning policy,
status transitions, serialization). A store persists opaque bytes it is handed and offers:

* an append-only, per-run log of checkpoints with a create-only write at the run's next
  sequence, folded into one atomic operation with the run record update and pruning;
* ordered reads of that log (one entry, the newest live entry, a page of headers);
* a run record per run with compare-and-set status updates and a listing by status;
* a sorted key/value space per run ("items") for side records of adapters (LangGraph's
  pending writes and channel values), optionally owned by one checkpoint;
* bounded purging of expired data.

Addressing. Runs are addressed by ``run_key``: a short string of ``[a-z2-7]`` that the manager
derives from the run id (a hash, so hostile or 1 KB run ids never reach a path or key). The
real ``run_id`` travels inside the records. A checkpoint lives at ``(run_key, sequence)``.
A run key is 1-64 characters of ``[a-z2-7]`` (the manager's are 24): every method that takes
one raises :class:`ValidationError` for anything else (a run id, ``""``, a key with ``/``, a
non-``str``) and changes nothing; :func:`check_run_key` is that check. A store never answers
such a value as if it named a run it does not hold (``None``, ``0``, ``[]``: that would hide a
caller passing run ids) and never builds a path or key from it.

Time. Every method that must decide whether something has expired takes ``now`` (epoch
seconds, from the manager's clock). A record with ``expires_at <= now`` is absent for every
operation: reads skip it, create-only writes may replace it, listings omit it (unless asked).

Errors. Stores raise only :mod:`fastcheckpoint.errors` types; driver exceptions are chained.
An argument of the wrong type (a ``now`` that is no finite number, a ``limit`` or sequence
that is no ``int``, a flag that is no ``bool``, keys that are no sequence of ``str``) is a
:class:`ValidationError`, raised before anything changes; a ``str`` subclass is taken for
its text, or refused as a run key or item key.
"""

from __future__ import annotations

import bisect
import difflib
import math
import re
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Protocol, TypeGuard, cast, runtime_checkable

import anyio.lowlevel
import msgspec

from fastcheckpoint import _ids
from fastcheckpoint._validate import shown
from fastcheckpoint.errors import (
    ConfigurationError,
    ConflictError,
    CorruptCheckpointError,
    SharedItemGone,
    ValidationError,
)

__all__ = [
    "EMPTY_RUN",
    "MAX_ITEM_KEY_BYTES",
    "MAX_LABELS",
    "MAX_LABEL_BYTES",
    "CheckpointHeader",
    "CheckpointStore",
    "ExpiryCleanup",
    "Item",
    "RunDamage",
    "RunRecord",
    "StoredCheckpoint",
    "SupportsAppendNext",
    "SupportsDefaultTTL",
    "SupportsLabels",
    "SupportsNestedItems",
    "SupportsProvision",
    "SupportsRepair",
    "SupportsSequenceGuard",
    "SupportsSharedItems",
    "check_head",
    "check_keep_latest",
    "check_labels",
    "check_options",
    "check_run_key",
    "check_sequence",
    "check_shared_items",
    "header_of",
    "is_live",
    "is_run_key",
    "item_key_bytes",
    "key_successor",
    "latest_expiry",
    "nested_prefix",
    "nesting_under",
    "never_suspends",
    "offers_nested_items",
    "offers_sequence_guard",
    "purge_all",
]


class CheckpointHeader(msgspec.Struct, frozen=True, kw_only=True):
    """What a listing returns for one checkpoint: never the payload."""

    sequence: int
    checkpoint_id: str
    created_at: float
    expires_at: float | None
    header: bytes
    """Manager-encoded metadata (small: step name, tags, parent id...). Opaque to stores."""


class StoredCheckpoint(CheckpointHeader, frozen=True, kw_only=True):
    """One checkpoint as a store holds it."""

    payload: bytes
    """Manager-encoded body (state, messages...). Opaque to stores, never read by listings."""
    key: str = ""
    """Where the store keeps it (a path, a key): filled by stores on reads, for error messages."""
    refs: tuple[str, ...] = ()
    """Keys of the run's shared items this checkpoint uses (:class:`SupportsSharedItems`):
    each stays while a held checkpoint lists it. Stores without the capability leave it empty."""


class RunRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The run record: created with a run's first checkpoint, removed by ``delete_run``."""

    run_id: str
    incarnation: str
    """Random per creation of the run: ids of a deleted run never resolve in a reused one."""
    status: str
    created_at: float
    updated_at: float
    latest_sequence: int
    checkpoint_count: int
    """Checkpoints held (expired ones count until purged)."""
    expires_at: float | None
    """The latest ``expires_at`` of the checkpoints it holds (``None`` if one never expires);
    ``EMPTY_RUN`` (0.0, long past) once it holds none, so an emptied run counts as expired."""
    version: int = 0
    """Bumped by every ``update_run``; with ``incarnation`` the compare-and-set token. Appends
    leave it alone."""
    data: bytes = b""
    """Manager-encoded run details (error, approvals, history). Opaque to stores."""
    labels: tuple[str, ...] = ()
    """Set from the seed when the run is created, never changed afterwards; runs are found by
    them with :class:`SupportsLabels` (at most :data:`MAX_LABELS`, each a non-empty ``str`` of at
    most :data:`MAX_LABEL_BYTES` UTF-8 bytes). Stores without the capability ignore them."""


class Item(msgspec.Struct, frozen=True, kw_only=True):
    """A side record in a run's sorted key/value space."""

    key: str
    value: bytes
    owner: int | None = None
    """Sequence of the checkpoint this item belongs to: deleted whenever that checkpoint is."""
    expires_at: float | None = None


MAX_ITEM_KEY_BYTES = 128
"""The longest item key, in UTF-8 bytes, that every store takes (adapters hash longer names)."""
MAX_LABELS = 16
MAX_LABEL_BYTES = 256

EMPTY_RUN = 0.0
"""``RunRecord.expires_at`` of a run whose last checkpoint was removed: expired since 1970."""


_RUN_KEY = re.compile(r"[a-z2-7]{1,64}")


def is_run_key(value: object) -> bool:
    """Whether ``value`` is a run key: a ``str`` of 1-64 characters of ``[a-z2-7]``. For
    reading back what a store wrote (a listing, a cursor); a method given a run key calls
    :func:`check_run_key`."""
    return isinstance(value, str) and _RUN_KEY.fullmatch(value) is not None


def check_run_key(run_key: object) -> str:
    """``run_key``, or :class:`ValidationError` when it is not a run key (1-64 characters of
    ``[a-z2-7]``, a plain ``str``): the one check every store method taking a run key makes
    before anything else. A run id is refused: the manager's methods take run ids, a store's
    take the keys it derives from them. So is a ``str`` subclass, whose own ``__eq__`` and
    ``__hash__`` would run where the store looks the key up."""
    if type(run_key) is str and _RUN_KEY.fullmatch(run_key) is not None:
        return run_key
    what = repr(run_key[:80]) if isinstance(run_key, str) else type(run_key).__name__
    raise ValidationError(
        f"not a run key: {what} (a run key is 1-64 characters of [a-z2-7], which the manager "
        "derives from the run id; store methods take run keys, not run ids)")


def is_live(expires_at: float | None, now: float) -> bool:
    """The one expiry rule every store applies: live while ``now < expires_at``."""
    return expires_at is None or now < expires_at


def latest_expiry(first: float | None, second: float | None) -> float | None:
    """A run's expiry after appending: the later of the two, where ``None`` (never) wins."""
    if first is None or second is None:
        return None
    return max(first, second)


def check_keep_latest(keep_latest: int | None) -> int | None:
    """The one validation of ``append``'s ``keep_latest``: ``None`` or an int >= 1, returned
    as a plain ``int`` (what to hand a driver: an ``int`` subclass's text may be no number)."""
    if keep_latest is None:
        return None
    if not isinstance(keep_latest, int) or isinstance(keep_latest, bool) or keep_latest < 1:
        raise ValidationError(f"keep_latest must be None or an int >= 1, got {shown(keep_latest)}")
    return int.__int__(keep_latest)


def item_key_bytes(key: object, limit: int, why: str) -> bytes:
    """The UTF-8 of an item key, or :class:`ValidationError` when it is not a valid ``str`` of
    at most ``limit`` bytes; ``why`` names the backend's reason for the limit."""
    if type(key) is not str:  # a subclass's own __eq__ and __hash__ would run in the store
        raise ValidationError(f"item key must be a str, got {type(key).__name__}")
    try:
        raw = key.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValidationError(f"item key {key[:40]!r} is not valid unicode") from exc
    if len(raw) > limit:
        raise ValidationError(f"item key is {len(raw)} bytes of UTF-8; {why} allows {limit}")
    return raw


def key_successor(prefix: str) -> str:
    """The smallest string greater than every string that starts with ``prefix`` (code point
    order): the exclusive upper bound of a prefix scan over item keys. A prefix made of
    U+10FFFF only has none (every longer run of it sorts higher): ``"\U0010ffff" * 2`` is
    returned, a bound only for keys that do not start with two such characters; use
    :func:`prefix_end` for a bound of any prefix."""
    while prefix and prefix[-1] == "\U0010ffff":
        prefix = prefix[:-1]
    if not prefix:
        return "\U0010ffff" * 2
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def prefix_end(prefix: str) -> str | None:
    """The exclusive upper bound of the keys that start with ``prefix`` (code point order);
    ``None`` when no string bounds them (``prefix`` empty, or U+10FFFF only)."""
    return key_successor(prefix) if prefix.strip("\U0010ffff") else None


def prefix_range(keys: Sequence[str], prefix: str) -> tuple[int, int]:
    """``(low, high)``: the keys of the sorted ``keys`` that start with ``prefix`` are
    ``keys[low:high]``."""
    low = bisect.bisect_left(keys, prefix)
    end = prefix_end(prefix)
    return low, len(keys) if end is None else bisect.bisect_left(keys, end, lo=low)


def header_of(record: CheckpointHeader) -> CheckpointHeader:
    """The listing view of a stored checkpoint: everything but the payload."""
    return CheckpointHeader(
        sequence=record.sequence,
        checkpoint_id=record.checkpoint_id,
        created_at=record.created_at,
        expires_at=record.expires_at,
        header=record.header,
    )


@runtime_checkable
class CheckpointStore(Protocol):
    """The contract every backend implements, tested by :mod:`fastcheckpoint.testing`.

    Checkpoint log
    --------------
    ``append(record, run=seed, keep_latest=N, now=t)`` is one atomic operation:

    1. If the run has a live record ``R`` (present and ``is_live(R.expires_at, now)``), the
       append is accepted only when ``record.sequence == R.latest_sequence + 1`` and
       ``seed.incarnation == R.incarnation``. If the run has no live record, only sequence 0 is
       accepted; leftovers of an expired run (its checkpoints and their owned items, its record)
       are removed and ``seed`` becomes the run record (its ``run_id``, ``incarnation``,
       ``status``, ``created_at``, ``version`` and ``data`` are used; the counters and
       ``expires_at`` come from step 2 as if starting from no checkpoints, so
       ``expires_at = record.expires_at``); unowned items stay, as an adapter may have written
       them just before the run's first checkpoint. Otherwise :class:`SequenceConflict` is
       raised carrying ``R.latest_sequence`` and ``R.incarnation`` (or ``None``), and nothing
       changes; ``-1`` with an incarnation means the run is being created and sequence 0 of
       that incarnation is the one to propose (:attr:`SequenceConflict.joining`).
    2. The record is written; the run record gets ``latest_sequence = record.sequence``,
       ``checkpoint_count + 1``, ``updated_at = now`` and ``expires_at = max(R.expires_at,
       record.expires_at)`` where ``None`` (never) wins.
    3. Pruning: expired checkpoints of the run are removed, then while more than
       ``keep_latest`` (``None`` or >= 1) remain the oldest are removed (``None`` keeps all
       live ones; expired ones are still removed). Owned items go with
       their checkpoint. Afterwards the run holds at most ``keep_latest`` live checkpoints and
       they are its newest live ones. Work is amortised O(1) per append; payloads are never read.

    Whenever checkpoints are removed (pruning, ``delete``, purging) the run's ``expires_at`` is
    kept equal to the latest expiry among the checkpoints it still holds (``None`` if one never
    expires), and becomes ``EMPTY_RUN`` when it holds none: a run never outlives its data, and
    one whose checkpoints are all gone disappears like an expired one.

    Returns the run's status after the append. Either all of this happens or none of it.

    ``get`` / ``latest`` return ``(checkpoint, run_status)`` for a live checkpoint, ``None``
    otherwise; ``latest`` returns the newest live one even when newer ones expired.
    ``headers`` returns up to ``limit`` headers (filled with live ones unless
    ``include_expired``, so a short page means the end) newest first with ``sequence < before``
    (all when ``before`` is ``None``), and the run status (``None`` when there is no run;
    with ``include_expired`` the record of an expired, not yet purged run still counts).
    ``delete`` removes the checkpoint at ``sequence`` (and its owned items) only if its
    ``checkpoint_id`` equals the one given (an id of a deleted run never deletes a checkpoint of
    a later run with the same key), returning whether it removed one;
    ``delete_run`` removes everything of the run (checkpoints, items, record) and returns
    how many checkpoints it removed.

    Runs
    ----
    ``get_run`` returns the live run record or ``None``. ``update_run`` replaces ``status`` and
    ``data`` only if the record's ``incarnation`` and ``version`` still equal the ones given
    (else :class:`ConflictError`; ``CheckpointNotFound`` when no live run), bumps ``version``, sets
    ``updated_at = now``, and never touches checkpoints or their expiry. Appends leave
    ``version`` alone, so this compare-and-set does not see checkpoints appended since the
    caller read the run; a store offering :class:`SupportsSequenceGuard` also takes
    ``latest_sequence=`` to refuse the update then. ``list_runs`` pages
    live runs newest-created first, filtered by status, with an opaque cursor; ``count_runs``
    counts live runs. Neither reads checkpoints.

    Items
    -----
    A sorted (by key, code point order) key/value space per run. ``put_items`` validates
    everything before writing anything, so an error writes nothing (each item is written
    atomically; a crash mid-batch may leave part of the batch); with ``create_only`` it raises
    :class:`ConflictError` if any key holds a live item.
    ``scan_items`` returns live ``(key, value)`` pairs whose key starts with ``prefix``, after
    ``start_after`` in scan order (descending when ``reverse``), up to ``limit``. Items are
    removed by ``delete_items``, with their owner checkpoint, with the run, or on expiry.

    Maintenance
    -----------
    ``purge_expired(now=t, limit=n)`` removes up to about ``n`` expired things (checkpoints with
    their owned items, items, whole runs whose record expired) and returns
    ``(checkpoints_removed, done)``; ``done`` is true when nothing expired is left. Safe to run
    from many workers at once. ``aclose`` releases what the store created (never a client it was
    given).
    """

    async def append(
        self,
        run_key: str,
        record: StoredCheckpoint,
        *,
        run: RunRecord,
        keep_latest: int | None,
        now: float,
    ) -> str: ...

    async def get(
        self, run_key: str, sequence: int, *, now: float
    ) -> tuple[StoredCheckpoint, str] | None: ...

    async def latest(self, run_key: str, *, now: float) -> tuple[StoredCheckpoint, str] | None: ...

    async def headers(
        self,
        run_key: str,
        *,
        before: int | None,
        limit: int,
        now: float,
        include_expired: bool = False,
    ) -> tuple[list[CheckpointHeader], str | None]: ...

    async def delete(self, run_key: str, sequence: int, *, checkpoint_id: str) -> bool: ...

    async def delete_run(self, run_key: str) -> int: ...

    async def get_run(self, run_key: str, *, now: float) -> RunRecord | None: ...

    async def update_run(
        self,
        run_key: str,
        *,
        incarnation: str,
        version: int,
        status: str,
        data: bytes,
        now: float,
    ) -> RunRecord: ...

    async def list_runs(
        self, *, status: str | None, limit: int, cursor: str | None, now: float
    ) -> tuple[list[RunRecord], str | None]: ...

    async def count_runs(self, *, status: str | None, now: float) -> int: ...

    async def put_items(
        self, run_key: str, items: Sequence[Item], *, create_only: bool = False, now: float
    ) -> None: ...

    async def get_items(
        self, run_key: str, keys: Sequence[str], *, now: float
    ) -> dict[str, bytes]: ...

    async def scan_items(
        self,
        run_key: str,
        *,
        prefix: str = "",
        start_after: str | None = None,
        limit: int = 100,
        reverse: bool = False,
        now: float,
    ) -> list[tuple[str, bytes]]: ...

    async def delete_items(self, run_key: str, keys: Sequence[str]) -> int: ...

    async def purge_expired(self, *, now: float, limit: int) -> tuple[int, bool]: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class SupportsProvision(Protocol):
    """A store that can create what it needs on its backend (``fastcheckpoint init URL``).

    ``provision()`` is idempotent: it creates what is missing (tables, indexes, buckets, TTL
    and lifecycle settings), leaves what exists, and raises :class:`ConfigurationError` when
    something exists but is set up incompatibly. It returns one line per thing it checked,
    for people, saying what it did: ``"created table T"``, ``"found bucket B"``, ``"enabled
    TTL on T"``. Stores that need nothing do not offer it.
    """

    async def provision(self) -> list[str]: ...


@runtime_checkable
class SupportsDefaultTTL(Protocol):
    """A store configured with a default expiry (FastAgentic's ``ttl_seconds=`` on a store).

    The manager applies it, as if it were ``CheckpointConfig.default_ttl_seconds``, when the
    config sets none: expiry is computed in one place, so the checkpoint ``create`` returns and
    the one ``restore`` reads report the same ``expires_at``. Stores never invent expiries.
    """

    default_ttl_seconds: float | None


class RunDamage(msgspec.Struct, frozen=True, kw_only=True):
    """A run whose record cannot be used, as :meth:`SupportsRepair.damaged_runs` reports it."""

    run_key: str
    key: str
    """Where the damaged record lives (a path, a store key), for people to read."""
    problem: str
    """Why it cannot be used, e.g. "fails its checksum"."""
    checkpoints: int
    """Intact checkpoints the run's log still holds."""
    newest: CheckpointHeader | None
    """The newest intact checkpoint (its manager-encoded header names the run id), ``None``
    when the log holds none: then nothing can be rebuilt."""


@runtime_checkable
class SupportsRepair(Protocol):
    """A store that can rebuild a damaged run record from the run's checkpoint log.

    A run record is damaged when it cannot be decoded (checksum, framing, foreign bytes), is
    missing while checkpoints of the run are in place, or contradicts the log it describes
    (e.g. it belongs to another incarnation than the checkpoints in place). A damaged record
    never hides intact checkpoints: ``get``, ``latest`` and ``headers`` still return them,
    judged live by their own ``expires_at`` and reported with status ``"active"`` (the real
    status is unknown; the store logs a warning naming the record). ``get_run``, ``append``,
    ``update_run`` and ``delete`` on such a run raise :class:`CorruptCheckpointError` naming
    the record, and change nothing; ``delete_run`` still removes the whole run; ``list_runs``
    and ``count_runs`` skip the run (logged). What an interrupted first create leaves (the
    run's checkpoint 0 in place, its record not yet written) is not damage: a store may let
    the next ``append`` adopt it.

    ``damaged_runs(run_key=None, now=t)`` finds damaged runs: the one run when ``run_key`` is
    given (``[]`` if its record is fine or absent), else every run of the store (this reads
    every run record; meant for an operator's repair, not for hot paths).

    ``rebuild_run(run_key, seed, now=t)`` replaces the damaged record by one derived from the
    log: ``incarnation`` (from the newest intact checkpoint's id), ``latest_sequence``,
    ``checkpoint_count`` and ``expires_at`` from the intact checkpoints, ``created_at`` from
    the oldest of them; ``run_id``, ``status`` and ``data`` from ``seed``; ``version`` 0 and
    ``updated_at = now``. Indexes (runs by status) follow the new record. Returns the new
    record. Raises :class:`ConflictError` when the record is not damaged (any more), and
    :class:`CheckpointNotFound` when the log holds no intact checkpoint. Checkpoints and
    items are never changed.
    """

    async def damaged_runs(
        self, *, run_key: str | None = None, now: float
    ) -> list[RunDamage]: ...

    async def rebuild_run(self, run_key: str, seed: RunRecord, *, now: float) -> RunRecord: ...


async def purge_all(
    store: CheckpointStore, *, clock: Callable[[], float], batch_size: int
) -> int:
    """Run ``purge_expired`` in batches of ``batch_size`` until nothing expired is left.

    Returns the checkpoints removed. The one loop behind ``CheckpointManager.cleanup_expired``
    and every store's own ``cleanup_expired``; other tasks run between batches.
    """
    removed = 0
    while True:
        count, done = await store.purge_expired(now=clock(), limit=batch_size)
        removed += count
        if done:
            return removed
        await anyio.lowlevel.checkpoint()


class ExpiryCleanup:
    """``await store.cleanup_expired()``, FastAgentic's call on a store, for every store class.

    The same work as ``CheckpointManager.cleanup_expired()`` by the wall clock: expired
    checkpoints (with their items), expired items and emptied runs are removed in bounded
    batches; returns how many checkpoints were removed.
    """

    async def cleanup_expired(self: CheckpointStore, *, batch_size: int = 500) -> int:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValidationError(f"batch_size must be a positive integer, got {shown(batch_size)}")
        return await purge_all(self, clock=time.time, batch_size=batch_size)


def check_options(where: str, given: Iterable[str], known: Collection[str]) -> None:
    """Refuse options a store does not know, naming the nearest known one.

    ``where`` names the store for the message (e.g. ``"the redis:// store"``); ``given`` are
    the option names found in the URL query and keyword options.
    """
    unknown = sorted(set(given) - set(known))
    if not unknown:
        return
    name = unknown[0]
    more = f" (and {', '.join(map(repr, unknown[1:]))})" if len(unknown) > 1 else ""
    message = f"unknown option {name!r}{more} for {where}"
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    message += f"; did you mean {close[0]!r}?" if close else "."
    listed = ", ".join(sorted(known)) or "none"
    raise ConfigurationError(f"{message} Known options: {listed}.")


@runtime_checkable
class SupportsAppendNext(Protocol):
    """Appends that take the run's next sequence when other writers took the one proposed:
    what keeps several processes appending to one run from losing sequence races.

    ``append_next(run_key, record, run=seed, keep_latest=n, now=t, renumber=f)`` is
    ``append(run_key, record, ...)`` with one difference: when the run has a live record ``R``
    of the seed's incarnation and ``record.sequence != R.latest_sequence + 1``, the store calls
    ``f(R.latest_sequence + 1)`` and appends the checkpoint it returns instead (at that
    sequence, naming no items), in the same atomic operation, so the append never fails with
    :class:`SequenceConflict` for that reason. Every other conflict (no live run and a sequence
    other than 0, another incarnation) raises as ``append`` does, without calling ``f``.
    ``record`` names no items (``ValidationError`` otherwise), nor may the one ``f`` returns.

    ``f`` runs while the store holds the run (maybe in a worker thread): it must be quick,
    must not block, and must not call the store. Returns the run's status after the append
    and the checkpoint written (``record`` or ``f``'s).
    """

    async def append_next(
        self,
        run_key: str,
        record: StoredCheckpoint,
        *,
        run: RunRecord,
        keep_latest: int | None,
        now: float,
        renumber: Callable[[int], StoredCheckpoint],
    ) -> tuple[str, StoredCheckpoint]: ...


@runtime_checkable
class SupportsSequenceGuard(Protocol):
    """Run updates that apply only while the run's newest checkpoint is the one the caller
    saw: a status change (a pause for a human decision) that another process's append made
    stale is refused instead of recorded over a run that went on.

    ``update_run(..., latest_sequence=s)`` is ``update_run`` with one more condition, decided
    in the same atomic step as the compare-and-set on ``incarnation`` and ``version``: the live
    run's ``latest_sequence`` must be ``s``. When it is not (another append landed since the
    caller read the run), :class:`ConflictError` saying the run has newer checkpoints, and
    nothing changes. ``latest_sequence=None`` (the default) is ``update_run`` as it always
    was. An update whose reply was lost and that is sent again is recognised as before, also
    when a checkpoint was appended in between (it was applied: its condition held then).

    ``sequence_guard`` is ``True`` on a store that offers this (a class attribute, declared
    by the class that defines the ``update_run`` taking the keyword: a subclass that
    overrides ``update_run`` declares it again, see :func:`offers_sequence_guard`). Stores
    written for the older ``update_run`` signature do not declare it, and the manager refuses
    a guarded change on them with :class:`ConfigurationError` rather than call them with a
    keyword they do not take. :func:`check_head` is the check, for stores that read the run
    and write it under one lock or transaction.
    """

    sequence_guard: bool

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
    ) -> RunRecord: ...


def offers_sequence_guard(store: object) -> TypeGuard[SupportsSequenceGuard]:
    """Whether ``store``'s ``update_run`` takes ``latest_sequence=``
    (:class:`SupportsSequenceGuard`): it says ``sequence_guard = True``, and no subclass below
    the class saying so defines ``update_run`` again without saying it too (a subclass written
    for the older signature must not inherit the claim). A wrapper that passes attributes
    through (``__getattr__``) hands out the wrapped store's ``update_run``: that store is the
    one judged."""
    if getattr(store, "sequence_guard", False) is not True:
        return False
    provider = getattr(getattr(store, "update_run", None), "__self__", store)
    if provider is not store:
        return offers_sequence_guard(provider)
    classes = type(store).__mro__
    declared = next((n for n, cls in enumerate(classes) if "sequence_guard" in vars(cls)), None)
    defined = next((n for n, cls in enumerate(classes) if "update_run" in vars(cls)), None)
    return declared is None or defined is None or declared <= defined


def check_head(run_key: str, latest: int, latest_sequence: int | None) -> None:
    """The one refusal of ``update_run(..., latest_sequence=s)`` (:class:`SupportsSequenceGuard`)
    by a run whose newest checkpoint is ``latest``: :class:`ConflictError` unless ``s`` is
    ``None`` or ``latest``. Also what a store whose backend decides the condition raises,
    with the sequence its backend reports."""
    if latest_sequence is not None and latest != latest_sequence:
        raise ConflictError(
            f"run {run_key} has newer checkpoints: its latest is {latest}, not "
            f"{latest_sequence} as the caller saw; nothing was changed (read the run again)")


def check_guard_arg(latest_sequence: object) -> int | None:
    """``update_run``'s ``latest_sequence``, checked: ``None`` or a 64-bit ``int``."""
    return None if latest_sequence is None else check_int("latest_sequence", latest_sequence)


@runtime_checkable
class SupportsLabels(Protocol):
    """Runs found by labels: a thread's runs, an app's or a user's sessions.

    A run's ``labels`` come from the seed of the ``append`` that creates it (also a new
    incarnation after expiry or ``delete_run``) and never change; ``get_run`` and listings
    return them. Invalid labels (more than :data:`MAX_LABELS`, empty, not ``str``, longer than
    :data:`MAX_LABEL_BYTES`) make that ``append`` raise :class:`ValidationError` and change
    nothing.

    ``runs_with_label(label, limit=n, cursor=c, now=t)`` pages the live runs carrying
    ``label``, newest created first like ``list_runs``, with an opaque cursor (``None`` after
    the last page); a run that expires or is deleted leaves every label listing with it. It
    never reads checkpoints.
    """

    async def runs_with_label(
        self, label: str, *, limit: int, cursor: str | None, now: float
    ) -> tuple[list[RunRecord], str | None]: ...


@runtime_checkable
class SupportsSharedItems(Protocol):
    """A checkpoint written together with its side items, items shared by several
    checkpoints, and one read that returns a checkpoint with all of them: what an adapter
    needs to store a framework's checkpoint (channel values written once per version, pending
    writes owned by their checkpoint) at one request per save and per load.

    ``append_with_items(run_key, record, run=seed, keep_latest=n, now=t, items=[...])`` is
    ``append`` with ``items`` written in the same atomic operation, each only if no live item
    has its key (a live one is kept as it is: a value written once per version is never
    rewritten). An item whose ``owner`` is ``record.sequence`` belongs to the new checkpoint;
    any other owner is a :class:`ValidationError`. Either all of it happens or none of it.

    Shared items. An item named in the ``refs`` of a held checkpoint (one the store still
    holds, live or expired but not yet purged) is *referenced*: it is never removed (not by
    expiry, pruning or purging) while any held checkpoint of the run names it, and it is
    removed once none does: with the removal of the last checkpoint that named it, or at the
    latest by the ``purge_expired`` that completes after that removal (a store may sweep). An
    append racing a removal never loses an item its record names: every ref must name an item
    the run holds or the same call writes, and an append naming one that a removal took (a
    writer that believed it still held, while another process pruned its last holder) is
    refused with :class:`~fastcheckpoint.errors.SharedItemGone`, nothing written: append again
    with those values. Stores that read every ref in the append's atomic step (memory, file,
    SQLite, Redis, PostgreSQL) refuse any ref naming no live item, also one never written
    (:func:`refs_to_find` and :func:`unheld_refs` give the keys to look up and the error); S3
    and DynamoDB check refs against the removals they remember, so callers name only items
    they wrote. A new life of a run (sequence 0 after it expired or was deleted) holds only the
    loose items of its key (``put_items``), not what the earlier life's checkpoints named or
    owned; on S3 and DynamoDB only once the cleanup loop has removed those, so a new life that
    writes a key its earlier life named may find the earlier value kept (the manager and the
    bundled adapters put the incarnation or a random part in such keys). Keys follow the item
    rules (at most :data:`MAX_ITEM_KEY_BYTES`). Shared items carry no expiry of their own
    (``expires_at`` ``None``): the checkpoints naming them decide their life; owned items are
    given their checkpoint's ``expires_at``, so everything of a checkpoint expires
    together. An owned
    item's key is its owner's: write owned items at keys no other checkpoint's owned item
    holds (the manager and the bundled adapters put the owner's sequence in the key). One
    written at a key a live checkpoint owns is not written (that item is kept, and goes with
    its owner); at a key an expired checkpoint owned, the store may remove it with that
    checkpoint. An owned item goes with its owner also while other checkpoints name it in
    their ``refs`` (their reads then lack it): name shared items.

    ``read_with_items(run_key, sequence=s, now=t)`` returns what ``get`` (``sequence`` given)
    or ``latest`` (``None``) would, plus, in one atomic read, the live items the checkpoint
    owns and the items its ``refs`` name, as ``{key: value}``; ``None`` when there is no such
    live checkpoint. The record comes back with its ``refs``.

    Damaged items. An item whose stored record the store finds unreadable (a checksum that
    fails, the record of another key or run, a value gone while its key is listed) is not live.
    Reads that ask for it (``get_items``, ``read_with_items``) raise
    :class:`~fastcheckpoint.errors.CorruptCheckpointError` naming it, never a result without
    it; ``scan_items`` skips it (logged) and fills its page past it. Writers treat its key as
    free: ``put_items`` (``create_only`` too), an append bringing a value for the key and
    ``put_owned_items`` (``if_absent`` too) write the new value over it, guarded so that a good
    value another writer put there meanwhile is kept; ``delete_items`` removes it (the DynamoDB
    store refuses to delete a record whose owner it cannot read, until a write has replaced
    it). An append that only names it in ``refs`` is refused with
    :class:`~fastcheckpoint.errors.SharedItemGone` where the store knows of the damage, so the
    caller sends the value again. What a store can see differs: one that keeps no checksum of
    item values cannot tell changed value bytes, and one that cannot tell a record deleted
    behind its back from its own removals reads it as absent (each store's page says which). A
    record of a format version the store does not know counts as damaged: during a rolling
    upgrade an older release writes its own value over a newer release's item of the same key.

    ``put_owned_items(run_key, items, owner=s, checkpoint_id=c, if_absent=b, now=t)`` writes
    items that belong to checkpoint ``s`` (every ``item.owner`` must be ``s``, else
    :class:`ValidationError`) only if that checkpoint is live and its id is ``c``, atomically
    with that check; with ``if_absent`` a live item already at a key is kept. Returns whether
    it wrote (``False``: the checkpoint is gone, nothing was written; a write for a deleted
    run never brings it back).
    """

    async def append_with_items(
        self,
        run_key: str,
        record: StoredCheckpoint,
        *,
        run: RunRecord,
        keep_latest: int | None,
        now: float,
        items: Sequence[Item],
    ) -> str: ...

    async def read_with_items(
        self, run_key: str, *, sequence: int | None, now: float
    ) -> tuple[StoredCheckpoint, str, dict[str, bytes]] | None: ...

    async def put_owned_items(
        self,
        run_key: str,
        items: Sequence[Item],
        *,
        owner: int,
        checkpoint_id: str,
        if_absent: bool,
        now: float,
    ) -> bool: ...


NESTING = "/"
"""What follows a shared item's key in the keys of the items nested under it."""


def nested_prefix(key: str) -> str:
    """The prefix of the keys of the items nested under the shared item ``key``
    (:class:`SupportsNestedItems`): ``key + "/"``."""
    return key + NESTING


@runtime_checkable
class SupportsNestedItems(SupportsSharedItems, Protocol):
    """Items nested under a shared item, living and read with it: what a log that grows needs
    (a conversation stored as what each checkpoint adds, not as a copy per checkpoint).

    An item is *nested* under the shared item ``K`` when its key starts with
    :func:`nested_prefix` ``(K)`` (``K + "/"``). Nested items are written by
    ``append_with_items`` like any item (each only where no live item has its key; loose, owner
    ``None``, no expiry of their own), normally in an append whose record names ``K``. They
    live exactly as long as a held checkpoint names ``K`` (for a shared ``K``, as long as its
    item): the removal of the last one (pruned, deleted or expired, the run deleted or started
    over) removes the items nested under ``K`` in the same step or, at the latest, in the
    ``purge_expired`` that completes it; never before. That holds whoever holds ``K``'s own
    item: one owned by a checkpoint goes with its owner (also while named), and
    ``delete_items`` removes only the keys it is given; what is nested under ``K`` stays while
    ``K`` is named either way, and is never left behind. So checkpoints that all name only
    ``K`` share every item nested under it, however many there are, at the cost of one ref
    each. The removal of ``K``'s last holder leaves alone what another held checkpoint still
    names (a key ``K/b`` it names itself, and what is nested under such a key) or owns: the
    rules of that key decide, as if ``K`` were not there.

    ``read_with_items`` returns, with the item of each ref ``K``, every live item nested under
    ``K`` but the items that other checkpoints own, in the same atomic read. An append naming
    a ``K`` that a removal took is refused (:class:`~fastcheckpoint.errors.SharedItemGone`)
    like any stale ref, and writes none of its nested items.
    ``scan_items(prefix=nested_prefix(K))`` pages them in key order.

    ``nested_items`` is ``True`` on a store that offers this (a class attribute; a wrapper
    that forwards attributes may expose ``False``).
    """

    nested_items: bool


def nesting_under(refs: Sequence[str], items: Sequence[Item]) -> tuple[str, ...]:
    """The keys among ``refs`` that ``items`` writes nested items under, in ``refs`` order:
    what a store that remembers which shared items have nested items records for an append
    (each item key's prefixes up to a ``/`` are looked up: linear in the keys' length)."""
    named = set(refs)
    found: set[str] = set()
    for item in items:
        cut = item.key.find(NESTING)
        while cut != -1:
            if item.key[:cut] in named:
                found.add(item.key[:cut])
            cut = item.key.find(NESTING, cut + 1)
    return tuple(key for key in dict.fromkeys(refs) if key in found)


def offers_nested_items(store: object) -> TypeGuard[SupportsNestedItems]:
    """Whether ``store`` keeps nested items with their shared item
    (:class:`SupportsNestedItems`)."""
    return isinstance(store, SupportsNestedItems) and store.nested_items is True


def never_suspends(store: object) -> bool:
    """Whether every call of ``store`` completes without suspending (it awaits nothing that
    yields to the event loop, so no cancellation can cut it short): the store's own class
    sets ``never_suspends = True`` (the memory store does). A subclass does not inherit the
    claim (its methods may await): it makes it again if they do not. An instance attribute
    ``never_suspends = False`` withdraws it. Callers then make a change of several calls
    without a task of its own to shield it (``settled(..., instant=True)``)."""
    return vars(type(store)).get("never_suspends") is True and getattr(
        store, "never_suspends", False) is True


def check_labels(labels: object) -> tuple[str, ...]:
    """The one validation of a seed's ``labels``; :class:`ValidationError` saying why."""
    if not isinstance(labels, tuple):
        raise ValidationError(f"labels must be a tuple of str, got {type(labels).__name__}")
    if len(labels) > MAX_LABELS:
        raise ValidationError(f"a run takes at most {MAX_LABELS} labels, got {len(labels)}")
    for label in labels:
        if type(label) is not str or not label:
            raise ValidationError(f"a label must be a non-empty str, got {shown(label)}")
        item_key_bytes(label, MAX_LABEL_BYTES, "a label")
    return labels


INT64 = 2**63 - 1
"""The largest sequence, owner or time a store takes (what every backend can hold). The Redis
store takes a checkpoint's or item's expiry at most ``MAX_TTL_SECONDS`` (10^13 s) ahead:
it counts lifetimes in milliseconds."""


def check_int(name: str, value: object) -> int:
    """``value``, checked to be a 64-bit ``int`` (not a ``bool``), as a plain ``int``."""
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > INT64:
        raise ValidationError(f"{name} must be a 64-bit int, got {shown(value)}")
    return int.__int__(value)


def check_sequence(sequence: object) -> int:
    """The sequence a read or a delete is given (``get``, ``delete``, ``read_with_items``): a
    64-bit ``int`` (not a ``bool``), returned as a plain ``int``; anything else is the
    caller's mistake, a :class:`ValidationError`. An ``int`` no checkpoint holds (negative,
    past the newest) is no error: it finds nothing."""
    return check_int("sequence", sequence)


def check_time(name: str, value: object, *, optional: bool = False) -> None:
    """``value`` is a finite number of epoch seconds (or ``None`` when ``optional``)."""
    if value is None and optional:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or abs(value) > INT64  # before isfinite, which cannot take an int this large
        or not math.isfinite(value)
    ):
        raise ValidationError(
            f"{name} must be a finite number of epoch seconds, got {shown(value)}")


def check_flag(name: str, value: object) -> bool:
    """``value``, checked to be ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValidationError(f"{name} must be True or False, got {shown(value)}")
    return value


def check_limit(name: str, value: object, *, minimum: int = 0) -> int:
    """``value``, checked to be an ``int`` (not a ``bool``) from ``minimum`` to the 64-bit
    maximum, as a plain ``int``."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= INT64:
        raise ValidationError(
            f"{name} must be an int from {minimum} to {INT64}, got {shown(value)}")
    return int.__int__(value)


def check_str(name: str, value: object, *, optional: bool = False) -> str | None:
    """``value`` as a plain ``str`` (the text of a ``str`` subclass, whose own ``__eq__`` and
    ``__hash__`` then never run in the store), or ``None`` when ``optional``."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ValidationError(f"{name} must be a str, got {shown(value)}")
    return value if type(value) is str else str.__str__(value)


def check_utf8(name: str, value: object, *, optional: bool = False) -> str | None:
    """``value`` as by :func:`check_str`, checked to be text a driver can send (UTF-8: no lone
    surrogate)."""
    text = check_str(name, value, optional=optional)
    if text is not None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError(f"{name} is not valid unicode: {shown(text)}") from None
    return text


def check_keys(keys: object) -> list[str]:
    """The item keys a read or a delete is given: a sequence of ``str``, as plain ``str``."""
    if not isinstance(keys, Sequence) or isinstance(keys, (str, bytes, bytearray)):
        raise ValidationError(f"keys must be a sequence of str, got {shown(keys)}")
    return [cast(str, check_str("item key", key)) for key in keys]


def check_bytes(name: str, value: object) -> None:
    """``value`` is ``bytes``, a ``bytearray`` or a contiguous, unreleased ``memoryview``
    (what every backend can store as it is)."""
    if isinstance(value, (bytes, bytearray)):
        return
    if not isinstance(value, memoryview):
        raise ValidationError(f"{name} must be bytes, got {type(value).__name__}")
    try:
        contiguous = value.c_contiguous
    except ValueError:  # released
        raise ValidationError(f"{name} is a released memoryview") from None
    if not contiguous:
        raise ValidationError(f"{name} must be contiguous bytes, got a strided memoryview")


def check_text(name: str, value: object) -> None:
    """``value`` is a non-empty ``str`` that UTF-8 can encode (no lone surrogates)."""
    if not isinstance(value, str) or not str.__len__(value):
        raise ValidationError(f"{name} must be a non-empty str, got {shown(value)}")
    check_utf8(name, value)


def check_record(record: StoredCheckpoint) -> None:
    """The one check of the fields of a checkpoint a store is given to append (before
    anything is written): their types and ranges; the keys its refs name are checked by
    :func:`check_shared_items`."""
    if not isinstance(record, StoredCheckpoint):
        raise ValidationError(f"record must be a StoredCheckpoint, got {type(record).__name__}")
    check_int("sequence", record.sequence)
    check_text("checkpoint_id", record.checkpoint_id)
    check_time("created_at", record.created_at)
    check_time("expires_at", record.expires_at, optional=True)
    check_bytes("header", record.header)
    check_bytes("payload", record.payload)
    if not isinstance(record.refs, (tuple, list)):
        raise ValidationError(
            f"refs must be a tuple or list of item keys, got {type(record.refs).__name__}")


def check_seed(seed: RunRecord) -> None:
    """The one check of the run record an append is given (what a new run takes from it)."""
    if not isinstance(seed, RunRecord):
        raise ValidationError(f"run must be a RunRecord, got {type(seed).__name__}")
    check_text("run_id", seed.run_id)
    check_text("incarnation", seed.incarnation)
    check_text("status", seed.status)
    check_time("created_at", seed.created_at)
    check_int("version", seed.version)
    check_bytes("data", seed.data)
    check_labels(seed.labels)


def check_items(items: object) -> None:
    """The one check of the items a store is given to write: a sequence of :class:`Item`
    with valid keys, ``bytes`` values (not a ``bytearray`` or ``memoryview``, which a caller
    could change after the call), int owners and finite expiries."""
    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)):
        raise ValidationError(f"items must be a sequence of Item values, got {shown(items)}")
    for item in items:
        if not isinstance(item, Item):
            raise ValidationError(f"items must be Item values, got {type(item).__name__}")
        item_key_bytes(item.key, MAX_ITEM_KEY_BYTES, "an item key")
        if not isinstance(item.value, bytes):
            raise ValidationError(f"item value must be bytes, got {type(item.value).__name__}")
        if item.owner is not None:
            check_int("item owner", item.owner)
        check_time("item expires_at", item.expires_at, optional=True)


def renumbered(renumber: Callable[[int], StoredCheckpoint], sequence: int) -> StoredCheckpoint:
    """The checkpoint ``append_next``'s ``renumber`` makes for ``sequence``
    (:class:`SupportsAppendNext`), checked as an append's is: at that sequence, naming no
    items."""
    record = renumber(sequence)
    if not isinstance(record, StoredCheckpoint) or record.sequence != sequence or record.refs:
        raise ValidationError(
            f"renumber({sequence}) must return a checkpoint at sequence {sequence} that names "
            "no items")
    check_record(record)
    return record


def check_append(run_key: str, record: StoredCheckpoint, seed: RunRecord,
                 items: Sequence[Item] = ()) -> None:
    """The one check of what an append is given (``append``, ``append_with_items``,
    ``append_next``), before anything is written: the run key, the checkpoint, the run record
    (its run id must be one of ``run_key``: a record naming another run is what every store
    reads as damage), the items and the refs."""
    check_run_key(run_key)
    check_record(record)
    check_seed(seed)
    if _ids.foreign_run(run_key, seed.run_id) is not None:
        raise ValidationError(
            f"run {run_key}: the run record names run {shown(seed.run_id)}, whose key is "
            "another (a run's key is derived from its run id: fastcheckpoint.testing.key_of)")
    check_items(items)
    check_shared_items(record, items)


def check_shared_items(record: StoredCheckpoint, items: Sequence[Item]) -> None:
    """The one validation of ``append_with_items``' items and refs (before anything is
    written): owners are the new checkpoint or none, keys are valid item keys."""
    for key in record.refs:
        item_key_bytes(key, MAX_ITEM_KEY_BYTES, "an item key")
    for item in items:
        item_key_bytes(item.key, MAX_ITEM_KEY_BYTES, "an item key")
        if item.owner is not None and item.owner != record.sequence:
            raise ValidationError(
                f"item {item.key[:40]!r} is owned by checkpoint {shown(item.owner)}; items "
                f"appended with checkpoint {record.sequence} belong to it or to no checkpoint")


def refs_to_find(record: StoredCheckpoint, items: Sequence[Item]) -> tuple[str, ...]:
    """The keys ``record.refs`` names that ``items`` do not write, each once, in order: the
    items ``append_with_items`` must find held by the run."""
    written = {item.key for item in items}
    return tuple(key for key in dict.fromkeys(record.refs) if key not in written)


def unheld_refs(run_key: str, sequence: int, keys: Sequence[str]) -> SharedItemGone:
    """The one refusal of an append whose refs name items the run does not hold."""
    listed = ", ".join(repr(key[:40]) for key in keys[:5])
    more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
    return SharedItemGone(
        f"run {run_key}: checkpoint {sequence} names shared items the run does not hold "
        f"({listed}{more}); nothing was written: append it again with their values",
        keys=tuple(keys))


def items_deleted_behind(
    run_key: str, sequence: int, keys: Sequence[str], where: str
) -> CorruptCheckpointError:
    """The one error of a read whose checkpoint names item rows missing although the store
    recorded no removal of them (deleted behind its back); ``where`` locates the first."""
    listed = ", ".join(repr(key) for key in keys[:3])
    more = " and more" if len(keys) > 3 else ""
    return CorruptCheckpointError(
        f"checkpoint {sequence} of run key {run_key} names item(s) whose row is missing "
        f"although the store did not remove them (deleted behind its back): {listed}{more}",
        key=where)
