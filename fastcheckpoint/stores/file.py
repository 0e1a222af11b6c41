"""File store: one directory on a local filesystem, crash-safe, shared by processes of one host.

Layout under the root (directories 0700, files 0600)::

    runs/<run key>/log              the run's records, appended in commits (``_file_log``):
                                    ``run.rec`` (run record + bookkeeping, msgpack, CRC-32),
                                    ``c/<sequence>`` (one per checkpoint: framing, metadata
                                    with its refs and the run's labels, header, payload),
                                    one entry per item (framing, key, owner, expiry, entry
                                    number, value) and the count of item entries handed out
    runs/<run key>/idx              where each record's newest entry is (a checked cache)
    index/s<status>/<stamp>-<run key>        empty markers: runs by status, newest created first
    index/l<label hash>/<stamp>-<run key>    the same by label (base32hex of a BLAKE2b hash)
    locks/<run key>                 flock(2) file of the run, outside its directory
    tmp/<run key>.<random>          files being written (under the run lock)
    trash/<run key>.<random>        run directories being removed

A commit of the run's log is its only commit point: an append commits its checkpoint, the new
``run.rec`` and the removal of the checkpoints it prunes together, with one write and one
``fdatasync``; status changes, deletions and purges commit a new ``run.rec`` the same way.
``run.rec`` also holds what keeps pruning O(1): the count of checkpoints that never expire and
a sorted index of ``(expires_at, sequence)`` of the ones that do, so expired checkpoints and
the run's own expiry are found without reading checkpoint records.

Items are records of the log too: a write of items (with an append, or alone) commits one
entry per item (numbered from a count the same commit advances) and the removal of the entries
they replace; every removal of items (``delete_items``, expiry, and what goes with a removed
checkpoint or a dropped shared item) is the removal of their entries, in the commit of the
operation that removes them. So a write or removal of any number of items costs one sync, and
the log holds each batch whole or not at all. The log keys an item's entry by its number, so
each process keeps an index of a run's items (key, owner and expiry of each, and where its
entry is), made by one scan of the log the first time it reads the run's items, and brought up
to date from the commits appended since whenever it reads them again (their envelopes and the
new items' metadata): an item is found by its key in a dictionary and read with one ``pread``,
and the item index is never written anywhere (nothing to repair after a crash). A run that
never held an item costs nothing more than one look for the count of item entries. A
compaction (a new log) makes the index be made again. ``fsync=False`` skips every sync.

Shared items (``SupportsSharedItems``): the reference count of a shared item is how many
checkpoint records of the log name it in their ``refs``, and the item index keeps those counts
too (each checkpoint's refs read from its head as the index takes in the commit that adds it),
so nothing stores them and an append costs the same however many shared items the run holds.
An append commits its items' entries with the checkpoint, so a checkpoint that can be seen has
its items in place. A removed checkpoint's refs are released in the same commit, and the items
none names any more, the items it owned and the items nested under the keys none names any
more (but those a held checkpoint names or owns) are removed by it too.

Nested items (``SupportsNestedItems``): the items whose keys start with ``K + "/"`` are one
range of the item index's sorted keys, so ``read_with_items`` finds those nested under each ref
with one bisection, and the commit that releases the last ref to ``K`` removes them.

The checkpoint records are the run's log and ``run.rec`` summarises it. Commits keep the two
in step, so a record behind its log, or a damaged one, comes from damage or tampering, not
from a crash; the store still reads such a run by its checkpoints. An intact checkpoint of the
run's incarnation at ``latest_sequence + 1`` means the record is behind (an old ``run.rec``
was put back): readers see it, and the run's next writer brings ``run.rec`` up to date first.
A ``run.rec`` is damaged when it cannot be decoded, is missing while checkpoints are in place,
or belongs to another incarnation than the checkpoint at ``latest_sequence + 1``: reads go by
the log, writers refuse until :meth:`FileStore.rebuild_run` replaces it. Only checkpoint 0
alone, with no record or an expired one, is adopted by an append. Before a run is discarded
as expired, every checkpoint record is looked at, so an old record put back never gets live
checkpoints removed.

Writers of a run hold its lock, so sequences stay unique and gap-free across processes; readers
take no lock (except to read a run whose record is damaged or behind) and read through a
directory descriptor, so a concurrent ``delete_run`` (a rename into ``trash/``) cannot mix two
incarnations of a run into one answer. POSIX only (``fcntl.flock``); one host (no NFS).
"""

from __future__ import annotations

import base64
import bisect
import collections
import contextlib
import enum
import errno
import fcntl
import functools
import hashlib
import logging
import os
import re
import secrets
import struct
import threading
import time
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, ParamSpec, TypeVar, cast
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import anyio
import anyio.lowlevel
import anyio.to_thread
import msgspec

from fastcheckpoint import _ids
from fastcheckpoint._threads import in_worker_thread
from fastcheckpoint._validate import shown
from fastcheckpoint.errors import (
    CheckpointError,
    CheckpointNotFound,
    ConfigurationError,
    ConflictError,
    CorruptCheckpointError,
    SequenceConflict,
    StoreError,
    ValidationError,
)
from fastcheckpoint.stores._base import (
    EMPTY_RUN,
    MAX_ITEM_KEY_BYTES,
    NESTING,
    CheckpointHeader,
    ExpiryCleanup,
    Item,
    RunDamage,
    RunRecord,
    StoredCheckpoint,
    check_append,
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
    item_key_bytes,
    nested_prefix,
    prefix_range,
    refs_to_find,
    renumbered,
    unheld_refs,
)
from fastcheckpoint.stores._file_log import (
    LOG,
    MAX_DATA,
    MIN_KEY,
    RUN,
    CachedReadsUnsupported,
    CommitLeftInLog,
    Located,
    LogView,
    LogWriter,
    Record,
    WouldWait,
    affordable,
    cached_only,
    cached_reads_supported,
    in_use,
    no_waiting,
    open_view,
    take,
)

__all__ = ["MAX_ITEM_KEY_BYTES", "FileCheckpointStore", "FileStore", "parse_file_url"]

logger = logging.getLogger("fastcheckpoint.stores.file")

_P = ParamSpec("_P")
_T = TypeVar("_T")
_MAX_STATUS_BYTES = 64

_RUN_KEY = re.compile(r"[a-z2-7]{24}")
_MARKER = re.compile(r"([0-9]{20})-([a-z2-7]{24})")
_TEMP = re.compile(r"([a-z2-7]{24})\.[0-9a-f]{16}")
_STAMP_MAX = 10**20 - 1

_RUN_FILE = "run.rec"
_CHECKPOINTS = "c"
_ITEMS = "i"

# Frame: magic, version, reserved, meta/head/body lengths | CRC of fixed+meta+head, CRC of body.
_FIXED = struct.Struct("<4sHHIIQ")
_CRCS = struct.Struct("<II")
_PREFIX = _FIXED.size + _CRCS.size
_VERSION = 1
_PEEK_BYTES = 4096
_MAX_RECORD = MAX_DATA - (1 << 20)
"""Header plus payload of a checkpoint (its metadata and framing fit in the rest)."""
_LATEST_ATTEMPTS = 3
_CHECKPOINT_MAGIC = b"FCck"
_RUN_MAGIC = b"FCrn"
_ITEM_MAGIC = b"FCit"
_ITEMS_MADE = -2
"""Log key of how many item entries the run's log has handed out (8 bytes)."""
_FIRST_ITEM = -3
"""Log key of the first item entry: the ``n``-th is keyed ``_FIRST_ITEM - n``."""
_COUNT = struct.Struct("<Q")

_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
_DIR_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK
"""A directory inside the store (a run's, or one in ``trash/``): a symbolic link in its place
fails to open (``ENOTDIR`` or ``ELOOP``), never followed, and a FIFO never blocks the open."""
_STORE_DIR_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY
"""The root, the directories above it and those it holds: an operator may link them."""
_LINK_ERRORS = (errno.ENOTDIR, errno.ELOOP)
_MARKER_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
_RECENT_RUNS = 4096
_RECENT_SECONDS = 30.0
"""Reads of a run this process used within this many seconds (one of the last
``_RECENT_RUNS``) are tried on the event loop's thread: its directory entries and inodes are
then most likely in the kernel's caches, so opening its files does not wait for the disk."""
_BATCH_PATIENCE = 0.002
"""How long the leader of a batch of writes waits for a write of its run that this process
started and that has not reached its worker thread yet (a thread hop takes 0.1-0.7 ms here),
before it syncs without it."""
_INDEXED_ITEMS = 1 << 18
"""How many items this process keeps indexed for the runs it read lately (beyond it, the least
recently used runs' indexes are dropped; the last one used is always kept)."""


class _RunState(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What ``run.rec`` holds: the run record and what keeps appends and purges cheap."""

    run: RunRecord | None = None
    """``None`` while the run directory holds only items."""
    low: int = 0
    """Every checkpoint below this sequence has been removed."""
    immortal: int = 0
    """Held checkpoints that never expire."""
    expiring: tuple[tuple[float, int], ...] = ()
    """``(expires_at, sequence)`` of every held checkpoint that expires, ascending: the next to
    expire first, the latest expiry last. ``checkpoint_count == immortal + len(expiring)``."""
    items_next_expiry: float | None = None
    """No item expires before this (a lower bound; ``None``: none expires)."""
    gaps: tuple[int, ...] = ()
    """Sequences from ``low`` to the latest whose checkpoints were removed, ascending, when
    they are all listed (``immortal + len(expiring) + len(gaps)`` fills the range; a record
    of an earlier version, or one with more than :data:`_MAX_GAPS` of them, lists none): with
    them, ``run.rec`` tells which never-expiring checkpoints are held."""


_MAX_GAPS = 1024


class _CheckpointMeta(msgspec.Struct, frozen=True, array_like=True):
    sequence: int
    checkpoint_id: str
    created_at: float
    expires_at: float | None
    refs: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    """The run's labels, so that a run record rebuilt from the log keeps them."""


class _Head(CheckpointHeader, frozen=True, kw_only=True):
    """A checkpoint's head as this store reads it, with what its metadata carries besides."""

    refs: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()


class _ItemMeta(msgspec.Struct, frozen=True, array_like=True):
    key: str
    owner: int | None
    expires_at: float | None
    entry: int
    """The log key of the entry that holds this item."""


_ENCODER = msgspec.msgpack.Encoder()
_STATE_DECODER = msgspec.msgpack.Decoder(_RunState)
_CHECKPOINT_DECODER = msgspec.msgpack.Decoder(_CheckpointMeta)
_ITEM_DECODER = msgspec.msgpack.Decoder(_ItemMeta)


class _Entries(NamedTuple):
    """What a commit holds for the items an operation writes and removes: an entry per item
    written and the count of entries handed out, the removal of the entries they replace and
    of those of the items removed."""

    puts: list[tuple[int, bytes]]
    removes: list[int]
    made: dict[int, _Change]
    """What the item index takes from the puts (:func:`_read_change`), known as they are
    made: each item's metadata and the count of entries handed out."""



class _Frame(NamedTuple):
    meta: bytes
    head: bytes
    body: bytes | None
    """``None`` when only the head was read."""


# -- names ------------------------------------------------------------------------------------


def parse_file_url(url: str) -> tuple[str, list[tuple[str, str]]]:
    """The directory and the query options of ``file:///abs/path?...`` or of a plain path."""
    if "://" not in url:
        return url, []
    parts = urlsplit(url)
    if parts.scheme.lower() != "file" or parts.netloc not in ("", "localhost"):
        raise ConfigurationError(f"not a file store URL (file:///abs/path): {url!r}")
    return unquote(parts.path), parse_qsl(parts.query, keep_blank_values=True)


def _check_run_key(run_key: object) -> str:
    """The stores' run-key rule, and 24 characters: the file store's names of run files and
    its listing order are made for the manager's keys, which all have that length."""
    key = check_run_key(run_key)
    if len(key) != 24:
        raise ValidationError(
            f"not a run key of the file store: {key!r} (it takes the manager's keys, 24 "
            "characters of [a-z2-7])")
    return key


def _b32hex(raw: bytes) -> str:
    # base32hex keeps byte order (its alphabet is ascending), so names sort like UTF-8 keys,
    # i.e. in code point order; lowercase so case-insensitive filesystems cannot collide them.
    return base64.b32hexencode(raw).decode("ascii").rstrip("=").lower()


def _check_item_key(key: object) -> str:
    item_key_bytes(key, MAX_ITEM_KEY_BYTES, "the file store")
    assert isinstance(key, str)
    return key


def _sequence_name(sequence: int) -> str:
    return f"{sequence:020d}"


def _status_dir_name(status: str) -> str:
    return "s" + _b32hex(status.encode("utf-8"))


def _label_dir_name(label: str) -> str:
    # A hash: labels take up to 256 bytes, too long for a file name once encoded. Listings
    # check the run's own labels, so a collision would only cost a record read.
    return "l" + _b32hex(hashlib.blake2b(label.encode("utf-8"), digest_size=20).digest())


def _check_status(status: object) -> str:
    status = check_str("run status", status)
    assert status is not None
    try:
        size = len(status.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValidationError(f"run status {status!r:.80} is not valid unicode") from exc
    if size > _MAX_STATUS_BYTES:
        raise ValidationError(f"run status is {size} bytes; the limit is {_MAX_STATUS_BYTES}")
    return status


def _marker_name(run_key: str, run: RunRecord) -> str:
    """Sorts newest-created first: the stamp counts down from the creation microsecond."""
    micros = min(max(round(run.created_at * 1_000_000), 0), _STAMP_MAX)
    return f"{_STAMP_MAX - micros:020d}-{run_key}"


_KEY_ALPHABET = "234567abcdefghijklmnopqrstuvwxyz"
_DESCENDING = str.maketrans(_KEY_ALPHABET, _KEY_ALPHABET[::-1])


def _listing_key(marker: str) -> tuple[str, str]:
    """Listing order of a marker: newest created first, and among runs created in the same
    microsecond the greater run key first, as every store lists them."""
    return marker[:20], marker[21:].translate(_DESCENDING)


def _marker_paths(run_key: str, run: RunRecord) -> set[str]:
    """The run's index markers, relative to ``index/``: by status, and one per label."""
    marker = _marker_name(run_key, run)
    directories = [_status_dir_name(run.status), *map(_label_dir_name, run.labels)]
    return {os.path.join(directory, marker) for directory in directories}


# -- expiry arithmetic (None means never) -----------------------------------------------------


def _earliest(first: float | None, second: float | None) -> float | None:
    if first is None:
        return second
    if second is None:
        return first
    return min(first, second)


def _due(next_expiry: float | None, now: float) -> bool:
    return next_expiry is not None and next_expiry <= now


class _Ledger:
    """A run's bookkeeping while a writer changes it under the run lock.

    ``removed`` collects the checkpoints this operation removes; ``state()`` is the ``run.rec``
    to commit, with the count and the run's expiry recomputed from what the run still holds.
    The shared items' reference counts are the item index's (``index``: the counts of the
    checkpoints in the log, ``None`` for a run that holds no item, or for a new life, which
    counts nothing of the earlier one's), changed by what the operation adds and removes.
    """

    def __init__(self, state: _RunState, run: RunRecord, index: _ItemIndex | None) -> None:
        self.base = state
        self.run = run
        self.low = state.low
        self.immortal = state.immortal
        self.expiring = list(state.expiring)
        self.removed: list[int] = []
        """Checkpoints this operation removes: their records go in its commit."""
        self.erase: list[int] = []
        """Records of an earlier life's checkpoints, removed by the same commit."""
        self._counts: dict[str, int] = {} if index is None else index.counts
        self._refs: dict[int, tuple[str, ...]] = {} if index is None else index.refs
        self._changed: dict[str, int] = {}
        """Per key named by what the operation adds or removes: the change of its count."""

    @property
    def held(self) -> int:
        return self.immortal + len(self.expiring)

    def _count(self, key: str) -> int:
        return self._counts.get(key, 0) + self._changed.get(key, 0)

    def add(self, sequence: int, expires_at: float | None, refs: Sequence[str] = ()) -> None:
        if expires_at is None:
            self.immortal += 1
        else:
            bisect.insort(self.expiring, (expires_at, sequence))
        for key in dict.fromkeys(refs):
            self._changed[key] = self._changed.get(key, 0) + 1

    def _released(self) -> dict[str, int]:
        """Per key the removed checkpoints name: how many of them name it."""
        released: dict[str, int] = {}
        for sequence in dict.fromkeys(self.removed):
            for key in self._refs.get(sequence, ()):
                released[key] = released.get(key, 0) + 1
        return released

    def dropped_keys(self) -> list[str]:
        """The shared items the removed checkpoints named and no held checkpoint names any
        more (the new one's refs counted first): they go in the same commit."""
        return [key for key, count in self._released().items() if self._count(key) - count <= 0]

    def names(self) -> Callable[[str], bool]:
        """Whether a checkpoint held once the operation is done names a key."""
        released = self._released()
        return lambda key: self._count(key) - released.get(key, 0) > 0

    def remove(self, sequence: int, expires_at: float | None) -> None:
        if expires_at is None:
            self.immortal = max(self.immortal - 1, 0)
        else:
            index = bisect.bisect_left(self.expiring, (expires_at, sequence))
            if index < len(self.expiring) and self.expiring[index] == (expires_at, sequence):
                del self.expiring[index]
        self.removed.append(sequence)

    def remove_expired(self, now: float, limit: int | None = None) -> None:
        """The held checkpoints expired at ``now`` (up to ``limit``), soonest first."""
        count = 0
        while count < len(self.expiring) and self.expiring[count][0] <= now:
            if limit is not None and count >= limit:
                break
            count += 1
        self.removed += [sequence for _, sequence in self.expiring[:count]]
        del self.expiring[:count]

    def state(self) -> _RunState:
        gone = set(self.removed).union(self.base.gaps)
        low = self.low
        while low in gone:
            low += 1
        if self.immortal == 0:
            # Only checkpoints that expire are held, and the index knows all of them.
            lowest = min((sequence for _, sequence in self.expiring), default=None)
            low = max(low, self.run.latest_sequence + 1 if lowest is None else lowest)
        latest = self.run.latest_sequence
        gaps = tuple(sorted(sequence for sequence in gone if low <= sequence <= latest))
        if self.held + len(gaps) != latest - low + 1 or len(gaps) > _MAX_GAPS:
            gaps = ()  # not all known (a record of an earlier version left them out)
        run = msgspec.structs.replace(
            self.run,
            checkpoint_count=self.held,
            expires_at=_held_expiry(self.immortal, self.expiring),
        )
        return msgspec.structs.replace(
            self.base,
            run=run,
            low=low,
            immortal=self.immortal,
            expiring=tuple(self.expiring),
            gaps=gaps,
        )


def _known_held(state: _RunState, sequence: int) -> bool:
    """Whether ``run.rec`` (``state``) tells that the log holds checkpoint ``sequence``: one
    it lists as expiring, or any of its range when the count of held checkpoints fills it
    (none was deleted inside it) or fills it with the gaps it lists, but those. Asked only of
    a slot of ``idx`` found zeroed: O(held)."""
    run = state.run
    if run is None or not state.low <= sequence <= run.latest_sequence:
        return False
    held = state.immortal + len(state.expiring)
    size = run.latest_sequence - state.low + 1
    if held == size:
        return True
    if any(expiring == sequence for _, expiring in state.expiring):
        return True
    return held + len(state.gaps) == size and sequence not in state.gaps


def _held_expiry(immortal: int, expiring: Sequence[tuple[float, int]]) -> float | None:
    """A run's expiry from what it holds: never while one never expires, else the latest."""
    if immortal:
        return None
    return expiring[-1][0] if expiring else EMPTY_RUN


# -- record files -----------------------------------------------------------------------------


def _frame(magic: bytes, meta: bytes, head: bytes = b"", body: bytes = b"") -> bytes:
    fixed = _FIXED.pack(magic, _VERSION, 0, len(meta), len(head), len(body))
    head_crc = zlib.crc32(head, zlib.crc32(meta, zlib.crc32(fixed)))
    return b"".join((fixed, _CRCS.pack(head_crc, zlib.crc32(body)), meta, head, body))


def _checkpoint_bytes(record: StoredCheckpoint, labels: tuple[str, ...]) -> bytes:
    meta = _CheckpointMeta(
        sequence=record.sequence,
        checkpoint_id=record.checkpoint_id,
        created_at=record.created_at,
        expires_at=record.expires_at,
        refs=record.refs,
        labels=labels,
    )
    return _frame(_CHECKPOINT_MAGIC, _ENCODER.encode(meta), record.header, record.payload)


def _run_bytes(state: _RunState) -> bytes:
    """``run.rec``: the state as metadata."""
    return _frame(_RUN_MAGIC, _ENCODER.encode(state))


def _item_bytes(meta: _ItemMeta, value: bytes) -> bytes:
    """An item (``meta``, ``value``) as its log entry holds it."""
    return _frame(_ITEM_MAGIC, _ENCODER.encode(meta), b"", value)


def _parse_frame(
    data: bytes,
    size: int,
    path: str,
    magic: bytes,
    *,
    whole: bool,
    more: Callable[[int], bytes],
    what: str = "file",
) -> _Frame:
    """Check and split a record of ``size`` bytes from ``data``, its first bytes (all of them
    when ``whole``); ``more(n)`` returns its first ``n`` bytes when the head needs them."""
    if size < _PREFIX:
        raise CorruptCheckpointError(f"{what} shorter than its framing (truncated)", key=path)
    found, version, _, meta_len, head_len, body_len = _FIXED.unpack_from(data)
    head_crc, body_crc = _CRCS.unpack_from(data, _FIXED.size)
    if found != magic:
        raise CorruptCheckpointError(f"not a record of this store (magic {found!r})", key=path)
    if version != _VERSION:
        raise CorruptCheckpointError(f"unsupported record format version {version}", key=path)
    head_end = _PREFIX + meta_len + head_len
    if size != head_end + body_len:
        raise CorruptCheckpointError(
            f"{what} is {size} bytes, its framing says {head_end + body_len}", key=path
        )
    if len(data) < head_end:
        data = more(head_end)
    if zlib.crc32(data[_PREFIX:head_end], zlib.crc32(data[: _FIXED.size])) != head_crc:
        raise CorruptCheckpointError("header checksum mismatch", key=path)
    body = data[head_end:] if whole else None
    if body is not None and zlib.crc32(body) != body_crc:
        raise CorruptCheckpointError("payload checksum mismatch", key=path)
    meta = data[_PREFIX : _PREFIX + meta_len]
    return _Frame(meta=meta, head=data[_PREFIX + meta_len : head_end], body=body)


_UNDECODABLE = (msgspec.DecodeError, UnicodeDecodeError)
"""What decoding damaged metadata raises: msgspec raises ``UnicodeDecodeError``, not a
``DecodeError``, for a string that is no UTF-8."""


def _decode(decoder: msgspec.msgpack.Decoder[_T], data: bytes, path: str) -> _T:
    try:
        return decoder.decode(data)
    except _UNDECODABLE as exc:
        raise CorruptCheckpointError(f"undecodable record metadata: {exc}", key=path) from exc


class _Unsettled(Exception):
    """A reader without the run lock met a log it cannot read items of as it is (a commit not
    covered by ``idx``, or one made since its view opened): it reads again under the lock.
    Never leaves the store."""


class _Recent:
    """Run keys this process opened lately, each with when (bounded, oldest out first)."""

    def __init__(self, limit: int, seconds: float) -> None:
        self._limit = limit
        self._seconds = seconds
        self._at: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._lock = threading.Lock()

    def touch(self, key: str) -> None:
        with self._lock:
            self._at[key] = time.monotonic()
            self._at.move_to_end(key)
            if len(self._at) > self._limit:
                self._at.popitem(last=False)

    def lately(self, key: str) -> bool:
        """Whether ``key`` was touched within the time this keeps keys for."""
        at = self._at.get(key)
        return at is not None and time.monotonic() - at < self._seconds


class _Queued:
    """A write waiting in a batch (:meth:`FileStore._batched`) and, once made, its outcome."""

    def __init__(self, call: Callable[[], object]) -> None:
        self._call = call
        self.done = threading.Event()
        self.settled = False
        """Whether its outcome stands even if the batch's sync fails."""
        self._result: object = None
        self._error: BaseException | None = None

    def make(self) -> None:
        try:
            self._result = self._call()
        except Exception as exc:  # this write's own failure: the batch goes on
            self._error = exc

    def fail(self, exc: BaseException) -> None:
        """The batch failed (``exc``) before this write's outcome could stand: it fails too,
        with an error of its own (each waiting thread raises its own), unless it was made and
        :attr:`settled`."""
        if self.settled:
            return
        own: BaseException
        if isinstance(exc, OSError):
            # Commits the batch could not cut off again keep saying so: their outcome is unknown.
            own = (CommitLeftInLog if isinstance(exc, CommitLeftInLog) else _BatchFailed)(
                *exc.args)
            if exc.filename is not None:
                own.filename = exc.filename
        else:
            own = StoreError(f"file store: the writes made together with this one failed: "
                             f"{exc!r}")
        own.__cause__ = exc
        self._result = None
        self._error = self._error or own

    def outcome(self) -> object:
        self.done.wait()
        if self._error is not None:
            raise self._error
        return self._result


class _BatchFailed(OSError):
    """The OS error that failed a whole batch of writes, once for each of them."""


class _Batch:
    def __init__(self) -> None:
        self.queued: list[_Queued] = []


class _Coming:
    """A write of a run started on its way to a worker thread (:meth:`_Batches.coming`)."""

    def __init__(self, run_key: str) -> None:
        self.run_key = run_key
        self.arrived = False


class _Batches:
    """The batches of writes of this process's threads, one open per run at most: a write
    that finds one joins it, else it opens one and leads it. A leader whose batch is empty
    waits a little for the writes of its run that are on their way to a worker thread
    (started, not arrived), rather than sync without them and have them sync again."""

    def __init__(self, patience: float) -> None:
        self._patience = patience
        self._changed = threading.Condition(threading.Lock())
        self._open: dict[str, _Batch] = {}
        self._coming: collections.Counter[str] = collections.Counter()

    def coming(self, run_key: str) -> _Coming:
        """A write of ``run_key`` is on its way (then :meth:`join`, or :meth:`gone`)."""
        with self._changed:
            self._coming[run_key] += 1
        return _Coming(run_key)

    def gone(self, coming: _Coming) -> None:
        """The write will not arrive (it failed or was cancelled before its thread ran)."""
        with self._changed:
            if not coming.arrived:
                self._arrived(coming)
                self._changed.notify_all()

    def _arrived(self, coming: _Coming) -> None:
        coming.arrived = True
        self._coming[coming.run_key] -= 1
        if not self._coming[coming.run_key]:
            del self._coming[coming.run_key]

    def join(self, coming: _Coming, queued: _Queued) -> _Batch | None:
        """Queue a write; the batch when the caller leads it (else it waits for its outcome)."""
        run_key = coming.run_key
        with self._changed:
            if not coming.arrived:  # else its task gave it up (:meth:`gone`) as it started
                self._arrived(coming)
            batch = self._open.get(run_key)
            if batch is not None:
                batch.queued.append(queued)
                self._changed.notify_all()
                return None
            batch = self._open[run_key] = _Batch()
            batch.queued.append(queued)
            return batch

    def take(self, run_key: str, batch: _Batch) -> list[_Queued]:
        """The writes queued since the last call, after waiting up to the patience for one
        while writes of the run are on their way; none closes the batch (a later write opens
        the next one)."""
        with self._changed:
            deadline = time.monotonic() + self._patience
            while not batch.queued and self._coming[run_key]:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            queued, batch.queued = batch.queued, []
            if not queued and self._open.get(run_key) is batch:
                del self._open[run_key]
            return queued

    def close(self, run_key: str, batch: _Batch) -> list[_Queued]:
        """Close the batch at once; returns the writes still queued in it."""
        with self._changed:
            queued, batch.queued = batch.queued, []
            if self._open.get(run_key) is batch:
                del self._open[run_key]
            return queued


class _HeldLog:
    """The log of a run whose lock this thread holds: opened once for the operation, and
    again after each of its commits."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._view: LogView | None = None
        self._opened = False
        self.compact_due = False
        """Whether a commit of the operation left the log due for compaction (done once the
        operation has released the lock)."""
        self.batch = False
        """Whether the hold makes a batch of writes (:meth:`FileStore._batched`): their
        commits are synced once, at its end."""
        self.unsynced_from: int | None = None
        """Where the first commit the batch has not synced yet starts."""

    def view(self) -> LogView | None:
        if not self._opened:
            self._view, self._opened = open_view(self.path, writable=True), True
        return self._view

    def forget(self) -> None:
        """Close the view (opened anew when next needed). Forgotten before it is closed: a
        close that fails has released the descriptor all the same, and closing it again
        could close another file that took its number meanwhile."""
        view, self._view, self._opened = self._view, None, False
        if view is not None:
            view.close()


class _HeldLogs(threading.local):
    def __init__(self) -> None:
        self.by_path: dict[str, _HeldLog] = {}


_HELD = _HeldLogs()
"""Per thread: the logs of the runs whose lock it holds (an operation runs in one thread)."""


class _Dir:
    """A run directory to read from: the records of its log (``run.rec``, one per checkpoint,
    and its items). Through an open descriptor when one is given; then the log is opened once
    and held until :meth:`close`. Under the run's lock the log the operation holds is used."""

    def __init__(self, path: str, fd: int | None = None) -> None:
        self.path = path
        self.fd = fd
        self._view: LogView | None = None
        self._opened = False

    def close(self) -> None:
        if self._view is not None:
            self._view.close()
        self._view, self._opened = None, False

    def refresh(self) -> None:
        """Read the log anew from here on (a held view is a snapshot of its commits past
        ``idx``, and of the log file itself if a compaction replaced it since)."""
        self.close()
        held = _HELD.by_path.get(self.path) if self.fd is None else None
        if held is not None:
            held.forget()

    def settled(self) -> bool:
        """Whether ``idx`` covers every commit of the log as read (or there is no log): not
        so while a writer is between its commit and its ``idx`` update, or when its commit
        failed and is being cut off, or after a crash there (then a reader waits for the
        run's lock)."""
        view, temporary = self._log()
        try:
            return view is None or view.settled
        finally:
            if temporary and view is not None:
                view.close()

    def unchanged(self) -> bool:
        """Whether the log read through this directory's descriptor is still its log and no
        commit was made to it since it was read: commits only append to a log (after cutting
        off a torn tail, so a read that saw none), and compaction replaces it."""
        view = self._view
        if self.fd is None or view is None or view.size != view.end:
            return False
        try:
            named = os.stat(LOG, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        read = os.fstat(view.fd)
        return os.path.samestat(named, read) and read.st_size == view.size

    def _log(self) -> tuple[LogView | None, bool]:
        """The log as this read sees it, and whether the caller must close it (it is neither
        the operation's held log nor this directory's own, opened once)."""
        if self.fd is not None:
            if not self._opened:
                self._view, self._opened = open_view(self.path, self.fd), True
            return self._view, False
        held = _HELD.by_path.get(self.path)
        if held is not None:
            return held.view(), False
        return open_view(self.path), True

    def record_key(self, key: int) -> str:
        """How errors and logs name a record of the run's log."""
        return f"{self.path}/{LOG}:{_record_name(key)}"

    def record(self, key: int, magic: bytes, *, whole: bool) -> _Frame | None:
        """Record ``key`` of the log (``RUN`` or a sequence), ``None`` if the log holds none;
        only its head area unless ``whole``."""
        view, temporary = self._log()
        if view is None:
            return None
        try:
            found = view.read_sized(key, None if whole else _PEEK_BYTES)
            if found is None:
                return None
            return _frame_of(view, key, found, self.record_key(key), magic, whole=whole)
        finally:
            if temporary:
                view.close()

    def has_record(self, key: int) -> bool:
        view, temporary = self._log()
        if view is None:
            return False
        try:
            return view.find(key) is not None
        finally:
            if temporary:
                view.close()

    def sequences(self) -> list[int]:
        """Sequences of the checkpoint records in the log, newest first (a scan of the log)."""
        view, temporary = self._log()
        if view is None:
            return []
        try:
            return sorted((key for key in view.held_keys() if key >= 0), reverse=True)
        finally:
            if temporary:
                view.close()

    def state(self, *, foreign: bool = False) -> _RunState | None:
        """``run.rec``; the log read through this directory from then on takes the
        checkpoints it knows to be held for present (:attr:`LogView.expected`). A record
        whose run id is not of this directory's run key (another run's log or directory
        copied in) is damage, unless ``foreign``."""
        frame = self.record(RUN, _RUN_MAGIC, whole=False)
        if frame is None:
            return None
        state = _decode(_STATE_DECODER, frame.meta, self.record_key(RUN))
        if not foreign and state.run is not None:
            _check_own_run(state.run, os.path.basename(self.path), self.record_key(RUN))
        held = _HELD.by_path.get(self.path) if self.fd is None else None
        view = self._view if held is None else held.view()
        if view is not None:
            view.expected = functools.partial(_known_held, state)
        return state

    def _checkpoint_frame(
        self, sequence: int, now: float, *, whole: bool, include_expired: bool
    ) -> tuple[_CheckpointMeta, _Frame] | None:
        frame = self.record(sequence, _CHECKPOINT_MAGIC, whole=whole)
        if frame is None:
            return None
        path = self.record_key(sequence)
        meta = _decode(_CHECKPOINT_DECODER, frame.meta, path)
        if meta.sequence != sequence:
            raise CorruptCheckpointError(f"holds sequence {meta.sequence}", key=path)
        if not include_expired and not is_live(meta.expires_at, now):
            return None
        return meta, frame

    def head(self, sequence: int, now: float, *, include_expired: bool = False) -> _Head | None:
        """The head of checkpoint ``sequence`` if present (and live unless
        ``include_expired``): its first 4 KiB, never the payload."""
        found = self._checkpoint_frame(sequence, now, whole=False, include_expired=include_expired)
        if found is None:
            return None
        meta, frame = found
        return _Head(
            sequence=meta.sequence,
            checkpoint_id=meta.checkpoint_id,
            created_at=meta.created_at,
            expires_at=meta.expires_at,
            header=frame.head,
            refs=meta.refs,
            labels=meta.labels,
        )

    def checkpoint(self, sequence: int, now: float) -> StoredCheckpoint | None:
        """Checkpoint ``sequence`` with its payload, if present and live."""
        found = self._checkpoint_frame(sequence, now, whole=True, include_expired=False)
        if found is None:
            return None
        meta, frame = found
        return StoredCheckpoint(
            sequence=meta.sequence,
            checkpoint_id=meta.checkpoint_id,
            created_at=meta.created_at,
            expires_at=meta.expires_at,
            header=frame.head,
            payload=frame.body or b"",
            key=self.record_key(sequence),
            refs=meta.refs,
        )

    def items(self) -> tuple[LogView, _ItemIndex] | None:
        """The run's items as the log this read sees holds them: the view to read their
        entries from and the item index, brought up to date with it; ``None`` when the run
        has no log or never held an item (the count of item entries is absent: one slot of
        ``idx`` read, so operations of runs without items never scan for them). Without the
        run lock, only a settled log (:meth:`settled`) that has not moved on since it was
        opened is read so: else :class:`_Unsettled` (the caller reads under the lock)."""
        view, temporary = self._log()
        assert not temporary, "items are read through a descriptor or under the run lock"
        if view is None:
            return None
        seen = (view.end, view.size, view.indexed)
        if view.find(_ITEMS_MADE) is None:
            return None
        if self.fd is not None and ((view.end, view.size, view.indexed) != seen or
                                    not view.settled):
            # The look moved the view on (a commit made since it opened), or met a commit
            # idx does not cover, or a damaged slot: what was read before it may not match.
            raise _Unsettled
        index = _INDEXES.of(self.path, view.log_id)
        with take(index.lock):
            index.catch_up(view, view.end, self.record_key)
        return view, index

    def value(self, view: LogView, found: _Indexed) -> bytes:
        """The value of an item of the index (its entry read and checked)."""
        entry = found.meta.entry
        where = self.record_key(entry)
        if found.damaged:
            raise CorruptCheckpointError(
                "damaged item: its log entry fails its checks, or unreadable bytes follow it",
                key=where)
        record = view.read_sized(entry, at=found.at)
        assert record is not None  # an entry named by where it is: read, or raises
        return _frame_of(view, entry, record, where, _ITEM_MAGIC, whole=True).body or b""

    def read_items(
        self, pick: Callable[[_ItemIndex], Sequence[_Indexed]], *, skip_corrupt: bool = False
    ) -> list[tuple[str, bytes]]:
        """``(key, value)`` of the items ``pick(index)`` chooses (under the index's lock; the
        values are read after). A damaged item raises, or is logged and left out with
        ``skip_corrupt``."""
        got = self.items()
        if got is None:
            return []
        view, index = got
        with take(index.lock):
            if self.fd is not None and index.end is not None and index.end > view.end:
                # The index took in commits this read does not see: maybe a batch's that
                # are not synced yet (:meth:`FileStore._batched`), which no reader may see.
                raise _Unsettled
            chosen = pick(index)
        affordable(sum(item.at.size for item in chosen))
        found: list[tuple[str, bytes]] = []
        for item in chosen:
            try:
                found.append((item.meta.key, self.value(view, item)))
            except CorruptCheckpointError as exc:
                with take(index.lock):
                    index.damaged(item)
                if not skip_corrupt:
                    raise
                logger.warning("file store: skipping corrupt item %s: %s", exc.key, exc)
        return found


class _Indexed(NamedTuple):
    """An item as the run's log holds it."""

    meta: _ItemMeta
    at: Located
    """Where its entry is in the log."""
    damaged: bool
    """The log holds unreadable bytes after its entry (a newer one may be lost there), or a
    read of its entry in this process found it damaged: a read of it raises, and it is not
    live for writers (:meth:`_Plan.live`)."""

    def live(self, now: float) -> bool:
        return is_live(self.meta.expires_at, now)


class _Unknown(NamedTuple):
    """An item entry whose metadata is damaged, as the item index keeps it."""

    claim: _Claim | None
    """What its metadata says anyway (:class:`_DamagedItem`)."""
    bound: int | None
    """The latest checkpoint the log held when it was indexed (``None``: being indexed)."""


class _ItemIndex:
    """The items of one log of a run (its log id), as of its commits up to :attr:`end`.

    The log keys an item's entry by its number, so finding an item by its key, the items a
    checkpoint owns or those nested under a key would each take a scan of the log. This is
    that scan, made once per process and log, then brought up to date from the commits
    appended since (O(their bytes)). Entries never move within one log (it only grows until a
    compaction makes a new one), so an index ahead of a reader's view still reads right
    through it. Hold :attr:`lock` while using it.
    """

    def __init__(self, log_id: bytes) -> None:
        self.log_id = log_id
        self.lock = threading.Lock()
        self._clear()

    def _clear(self) -> None:
        self.end: int | None = None
        """Where the commits it covers end (``None``: not made yet)."""
        self.made = 0
        """Item entries the log has handed out (the next one is numbered so)."""
        self.items: dict[str, _Indexed] = {}
        self.keys: list[str] = []
        """The items' keys, ascending (code point order, as ``scan_items`` pages them)."""
        self.owned: dict[int, set[str]] = {}
        """Owner sequence -> keys of the items it owns."""
        self.refs: dict[int, tuple[str, ...]] = {}
        """Sequence of each checkpoint in the log that has refs -> its refs (each key once)."""
        self.counts: dict[str, int] = {}
        """Key -> how many checkpoints in the log name it: the shared items' reference
        counts (a checkpoint is in the log from the commit that adds it to the one that
        removes it, so these are the held checkpoints')."""
        self._by_entry: dict[int, str] = {}
        self.held: set[int] = set()
        """Sequence of each checkpoint in the log."""
        self.unknown: dict[int, _Unknown] = {}
        """Item entry -> an item entry whose metadata is damaged (its key and owner unknown)."""

    def catch_up(
        self, view: LogView, end: int, name: Callable[[int], str],
        known: Mapping[int, _Change] | None = None,
    ) -> None:
        """Cover the commits of ``view`` up to ``end`` (``name`` names a log key in logs;
        ``known``: what :func:`_read_change` would read of the entries of a commit this
        process just made, by key, taken as it is)."""
        if self.end is not None and self.end >= end:
            return
        changes = view.changes(self.end, end)
        clear = bool(changes.gaps) and self.end is not None
        if clear:
            # Unreadable bytes: whose entries they held cannot be known, so the whole log is
            # read as a first scan reads it (entries before them read as damaged).
            changes = view.changes(None, end)
            known = None
        known = known or {}
        # Every entry is read before the index changes: a read that fails (or would wait for
        # the disk) leaves it as it was, and the next catch-up reads (and warns) again.
        steps = [(key, at, False, known[key] if at is not None and key in known
                  else _read_change(view, key, at, name))
                 for key, at in changes.found.items()]
        steps += [(key, at, True, _read_change(view, key, at, name))
                  for key, at in changes.damaged.items()]
        if clear:
            self._clear()
        for key, at, damaged, read in steps:
            if key == _ITEMS_MADE:  # damaged or not: a count never above the true one
                if isinstance(read, int):
                    self.made = max(self.made, read)
            elif key <= _FIRST_ITEM:
                if not damaged:
                    self.made = max(self.made, _FIRST_ITEM - key + 1)
                self._drop(key)
                if at is not None:
                    self._add(key, at, read, damaged=damaged)
            elif key >= 0:
                self._release(key)
                if at is not None:
                    self._hold(key, read)
        latest = max(self.held, default=-1)
        for entry, unknown in self.unknown.items():
            if unknown.bound is None:
                claim = unknown.claim
                if claim is not None:
                    claim = claim.owned_by(self.held, latest)
                self.unknown[entry] = _Unknown(claim, latest)
        self.end = changes.end

    def _hold(self, sequence: int, read: _Change) -> None:
        """Count the refs of a checkpoint record (as :func:`_read_change` read them)."""
        self.held.add(sequence)
        if isinstance(read, CorruptCheckpointError):
            logger.warning("file store: checkpoint %s is unreadable; the shared items it names "
                           "are not counted for it: %s", read.key, _problem(read))
            return
        assert isinstance(read, _CheckpointRefs)
        sequence, refs = read
        if refs:
            self.refs[sequence] = refs
            for key in refs:
                self.counts[key] = self.counts.get(key, 0) + 1

    def _release(self, sequence: int) -> None:
        self.held.discard(sequence)
        for key in self.refs.pop(sequence, ()):
            count = self.counts[key] - 1
            if count:
                self.counts[key] = count
            else:
                del self.counts[key]

    def _add(self, entry: int, at: Located, read: _Change, *, damaged: bool) -> None:
        """Index an item entry (its metadata as :func:`_read_change` read it)."""
        self.made = max(self.made, _FIRST_ITEM - entry + 1)
        if isinstance(read, _DamagedItem):
            # Metadata that fails its checksum may name another key or owner than its own:
            # trusted, it could shadow an intact item, so the entry is not indexed as one.
            # It is kept as unknown: reads of the checkpoints it may belong to raise, and it
            # goes once they are all gone.
            logger.warning("file store: item entry %s is unreadable; its item is lost: %s",
                           read.error.key, _problem(read.error))
            self.unknown[entry] = _Unknown(read.claim, None)
            return
        assert isinstance(read, _ItemMeta)
        meta = read
        old = self.items.get(meta.key)
        if old is not None and old.meta.entry < entry:
            return  # the log holds a newer entry of the key (numbers go down)
        self._by_entry[entry] = meta.key
        if old is None:
            bisect.insort(self.keys, meta.key)
        elif old.meta.owner is not None:
            self.owned[old.meta.owner].discard(meta.key)
        self.items[meta.key] = _Indexed(meta, at, damaged)
        if meta.owner is not None:
            self.owned.setdefault(meta.owner, set()).add(meta.key)

    def damaged(self, found: _Indexed) -> None:
        """Take in that a read of the entry of ``found`` failed its checks (unless the key
        has a newer entry since): a damaged item is not live, so writers treat its key as
        free and appends naming it are refused, without reading it again."""
        current = self.items.get(found.meta.key)
        if current is not None and current.meta.entry == found.meta.entry:
            self.items[found.meta.key] = current._replace(damaged=True)

    def _drop(self, entry: int) -> None:
        self.unknown.pop(entry, None)
        key = self._by_entry.pop(entry, None)
        found = None if key is None else self.items.get(key)
        if key is None or found is None or found.meta.entry != entry:
            return
        del self.items[key]
        del self.keys[bisect.bisect_left(self.keys, key)]
        if found.meta.owner is not None:
            owned = self.owned[found.meta.owner]
            owned.discard(key)
            if not owned:
                del self.owned[found.meta.owner]

    def _suspects(self, unknown: _Unknown) -> set[int]:
        """The held checkpoints an unknown item entry may belong to (as an owned item, or a
        shared one they name): those held when it was indexed (``bound``; its owner, or the
        checkpoint that brought it, came before it), narrowed by what its metadata claims
        (:meth:`_Claim.owned_by`). A claimed owner is taken as it reads when it is one of
        them; none when its checksum proves it is no longer held (:meth:`orphaned`); all of
        them otherwise (it came after them, and no owner comes after its items; or it is
        gone, and damage may have made a held owner's number into it). A claimed shared item
        may be one of their refs not indexed, or nested under one."""
        bound = -1 if unknown.bound is None else unknown.bound
        candidates = {sequence for sequence in self.held if sequence <= bound}
        if unknown.claim is None:
            return candidates
        claim = unknown.claim.meta
        if claim.owner is not None:
            if claim.owner in candidates:
                return {claim.owner}
            return set() if self.orphaned(unknown) else candidates

        def may_name(ref: str) -> bool:
            return ref not in self.items or claim.key == ref or \
                claim.key.startswith(nested_prefix(ref))

        return {sequence for sequence in candidates
                if any(may_name(ref) for ref in self.refs.get(sequence, ()))}

    def suspected(self, sequence: int) -> int | None:
        """An unknown item entry that checkpoint ``sequence`` may hold (``None``: none)."""
        for entry, unknown in self.unknown.items():
            if sequence in self._suspects(unknown):
                return entry
        return None

    def orphaned(self, unknown: _Unknown) -> bool:
        """Whether an unknown item entry's owner, as its checksum proves it
        (:attr:`_Claim.checked`), is one the log held once but no longer holds (it was
        removed since, the entry left behind): no held checkpoint's. An unchecked claim of a
        removed owner is no proof: damage to the owner and to other bytes may have turned a
        held owner's number into it."""
        if unknown.claim is None or unknown.bound is None or not unknown.claim.checked:
            return False
        owner = unknown.claim.meta.owner
        return owner is not None and owner <= unknown.bound and owner not in self.held

    def orphans(self) -> list[int]:
        """The unknown item entries no held checkpoint owns (:meth:`orphaned`)."""
        return [entry for entry, unknown in self.unknown.items() if self.orphaned(unknown)]

    def unneeded(self, removed: Collection[int]) -> list[int]:
        """The unknown item entries that only checkpoints of ``removed`` may hold, and those
        no held checkpoint owns."""
        wanted = set(removed)
        return [entry for entry, unknown in self.unknown.items()
                if self.orphaned(unknown) or (
                    (suspects := self._suspects(unknown)) and suspects <= wanted)]

    def nested(self, key: str) -> list[str]:
        """Keys of the items nested under ``key``, ascending."""
        low, high = prefix_range(self.keys, nested_prefix(key))
        return self.keys[low:high]

    def page(
        self, prefix: str, start_after: str | None, limit: int, reverse: bool, now: float
    ) -> list[_Indexed]:
        """Up to ``limit`` live items of ``scan_items``'s page."""
        keys = self.keys
        low, high = prefix_range(keys, prefix)
        if start_after is not None and reverse:
            high = min(high, bisect.bisect_left(keys, start_after, lo=low))
        elif start_after is not None:
            low = max(low, bisect.bisect_right(keys, start_after, lo=low))
        found: list[_Indexed] = []
        for position in range(high - 1, low - 1, -1) if reverse else range(low, high):
            if len(found) >= limit:
                break
            item = self.items[keys[position]]
            if item.live(now):
                found.append(item)
        return found


def _named(key: str, names: Callable[[str], bool]) -> bool:
    """Whether ``names`` names ``key`` or a key it is nested under."""
    if names(key):
        return True
    cut = key.find(NESTING)
    while cut != -1:
        if names(key[:cut]):
            return True
        cut = key.find(NESTING, cut + 1)
    return False


class _ItemIndexes:
    """This process's item indexes, one per log of a run directory (a compaction, or the run
    deleted and written again, makes a new log: readers still on the old one keep theirs); the
    least recently used are dropped once a new one finds them indexing more than ``limit``
    items in all."""

    def __init__(self, limit: int) -> None:
        self._by_log: collections.OrderedDict[tuple[str, bytes], _ItemIndex] = \
            collections.OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def of(self, path: str, log_id: bytes) -> _ItemIndex:
        with self._lock:
            index = self._by_log.get((path, log_id))
            if index is None:
                index = self._by_log[path, log_id] = _ItemIndex(log_id)
                self._trim()  # never the one just made: it is the most recently used
            else:
                self._by_log.move_to_end((path, log_id))
            return index

    def known(self, path: str, log_id: bytes) -> _ItemIndex | None:
        """The index of the log, if this process made one."""
        with self._lock:
            return self._by_log.get((path, log_id))

    def forget(self, path: str) -> None:
        with self._lock:
            for key in [key for key in self._by_log if key[0] == path]:
                del self._by_log[key]

    def _trim(self) -> None:
        total = sum(len(index.items) for index in self._by_log.values())
        while len(self._by_log) > 1 and total > self._limit:
            _, dropped = self._by_log.popitem(last=False)
            total -= len(dropped.items)


class _Plan:
    """What one commit does to a run's items, worked out against its item index under the
    run lock: the items it writes (the last of each key) and those it removes, each step
    seeing the earlier ones done, as the memory store would apply them one by one. Used
    before the commit only: once it is made, readers may bring the index forward."""

    def __init__(
        self, index: _ItemIndex | None, read: Callable[[_Indexed], bytes] | None = None
    ) -> None:
        self.index = index
        """The run's item index (``None``: the run holds no item)."""
        self._read = read
        """Reads and checks an indexed item's value (:meth:`_Dir.value`)."""
        self._items: dict[str, _Indexed] = {} if index is None else index.items
        self.writes: dict[str, Item] = {}
        self.removed: set[str] = set()
        """Keys of indexed items this commit removes (or replaces)."""
        self.released: set[int] = set()
        """Checkpoints this commit removes."""

    def named(self) -> list[str]:
        """The keys the checkpoints in the log name (before this commit)."""
        return [] if self.index is None else list(self.index.counts)

    def found(self, key: str) -> _Indexed | None:
        """The indexed item at ``key``, unless this plan removes it."""
        return None if key in self.removed else self._items.get(key)

    def live(self, key: str, now: float) -> bool:
        """Whether a live item is at ``key`` once the plan so far is done (a damaged one is
        not: it is written anew)."""
        written = self.writes.get(key)
        if written is not None:
            return is_live(written.expires_at, now)
        found = self.found(key)
        return found is not None and not found.damaged and found.live(now)

    def kept(self, key: str, now: float) -> bool:
        """Whether a write that brings a value for ``key`` (an append's item, a create-only
        or if-absent one) finds a live item it must leave there: :meth:`live`, with the value
        of an indexed item read and checked (only such a write pays that read). A damaged
        one is not live: the index takes it in, and the write replaces it."""
        if not self.live(key, now):
            return False
        found = self.found(key)
        if key in self.writes or found is None:
            return True
        assert self.index is not None  # found: indexed, so read with the index
        assert self._read is not None
        try:
            self._read(found)
        except CorruptCheckpointError as exc:
            logger.warning("file store: item %r is damaged; it is written anew: %s", key, exc)
            with take(self.index.lock):
                self.index.damaged(found)
            return False
        return True

    def write(self, item: Item) -> None:
        self.writes.pop(item.key, None)  # the last of a key counts, in batch order
        self.writes[item.key] = item

    def remove(self, key: str) -> bool:
        """Remove the item at ``key``; whether there was one."""
        written = self.writes.pop(key, None) is not None
        if self.found(key) is None:
            return written
        self.removed.add(key)
        return True

    def _owner(self, key: str) -> tuple[bool, int | None]:
        written = self.writes.get(key)
        if written is not None:
            return True, written.owner
        found = self.found(key)
        return found is not None, None if found is None else found.meta.owner

    def release(
        self, owners: Iterable[int], dropped: Iterable[str],
        names: Callable[[str], bool],
    ) -> None:
        """What removed checkpoints take with them: the items owned by ``owners``, and each
        shared item of ``dropped`` (an owned one stays with its owner) with the loose items
        nested under its key (also when an owner or ``delete_items`` took the item), except
        what a checkpoint held afterwards ``names`` or is nested under a key it names (one
        check per item of its key and of each of its prefixes ending before a ``/``)."""
        index_owned = {} if self.index is None else self.index.owned
        wanted = set(owners)
        self.released |= wanted
        if wanted:
            candidates = [key for owner in wanted for key in index_owned.get(owner, ())]
            candidates += [key for key, item in self.writes.items() if item.owner in wanted]
            for key in sorted(set(candidates)):
                present, owner = self._owner(key)
                if present and owner in wanted:
                    self.remove(key)
        for key in dropped:
            if _named(key, names):
                continue  # nested under a key still named: it stays, with what is under it
            present, owner = self._owner(key)
            if present and owner is None:
                self.remove(key)
            prefix = nested_prefix(key)
            nested = [] if self.index is None else self.index.nested(key)
            nested += [written for written in self.writes if written.startswith(prefix)]
            for inner in nested:
                present, owner = self._owner(inner)
                if present and owner is None and not _named(inner, names):
                    self.remove(inner)

    def remove_expired(self, now: float, budget: _Budget) -> float | None:
        """Remove expired items (up to the budget); returns the new lower bound of item
        expiry."""
        expired: list[str] = []
        remaining: list[float | None] = []
        for key, found in self._items.items():
            if key in self.removed or key in self.writes:
                continue
            if found.live(now):
                remaining.append(found.meta.expires_at)
            elif len(expired) < budget.left:
                expired.append(key)
            else:
                remaining.append(now)  # not removed this time: it may be due
        for key in expired:
            self.remove(key)
        budget.spend(len(expired))
        return _min_expiry(remaining)

    def holds_items(self) -> bool:
        """Whether the run holds items once the plan is done."""
        return bool(self.writes) or any(key not in self.removed for key in self._items)

    def entries(self, run_key: str) -> _Entries:
        """What the commit holds: an entry per item written (numbered on from the count of
        entries handed out, which it advances), and the removal of the entries of the items
        it replaces or removes. Checks each item's size first: nothing is written when one
        is too large."""
        made = 0 if self.index is None else self.index.made
        puts: list[tuple[int, bytes]] = []
        known: dict[int, _Change] = {}
        for item in self.writes.values():
            entry = _FIRST_ITEM - made
            if entry < MIN_KEY:
                raise StoreError(f"run {run_key} has used up its item entries")
            made += 1
            meta = _ItemMeta(item.key, item.owner, item.expires_at, entry)
            data = _item_bytes(meta, item.value)
            if len(data) > MAX_DATA:
                raise ValidationError(
                    f"item {item.key!r:.80} is {len(data)} bytes framed; the file store holds "
                    f"items up to {MAX_DATA} bytes")
            puts.append((entry, data))
            known[entry] = meta
        if puts:
            puts.append((_ITEMS_MADE, _COUNT.pack(made)))
            known[_ITEMS_MADE] = made
        removes = [self._items[key].meta.entry
                   for key in (*self.removed, *self.writes) if key in self._items]
        if self.index is not None and self.index.unknown:
            removes += self.index.unneeded(self.released)
        return _Entries(puts, removes, known)


_INDEXES = _ItemIndexes(_INDEXED_ITEMS)


def _frame_of(
    view: LogView, key: int, found: Record, where: str, magic: bytes, *, whole: bool
) -> _Frame:
    """Check and split the record ``found`` read from key ``key``'s entry (all of it when
    ``whole``, else its first bytes: more of the same entry is read if its head needs it)."""
    def more(wanted: int) -> bytes:  # the same entry, further (its bytes never change)
        again = view.read_sized(key, wanted, at=found.at)
        assert again is not None
        return again.data

    return _parse_frame(found.data, found.size, where, magic, whole=whole, more=more,
                        what="record")


def _head_at(view: LogView, key: int, at: Located, where: str, magic: bytes) -> _Frame:
    """The head of the record in key ``key``'s entry at ``at``, checked."""
    found = view.read_sized(key, _PEEK_BYTES, at=at)
    assert found is not None  # an entry named by where it is: read, or raises
    return _frame_of(view, key, found, where, magic, whole=False)


def _entry_meta(view: LogView, entry: int, at: Located, where: str) -> _ItemMeta:
    """The metadata of the item entry ``entry`` at ``at`` (its head read and checked)."""
    meta = _decode(_ITEM_DECODER, _head_at(view, entry, at, where, _ITEM_MAGIC).meta, where)
    if meta.entry != entry:
        raise CorruptCheckpointError(f"holds the item of entry {meta.entry}", key=where)
    return meta


def _checkpoint_refs(view: LogView, sequence: int, at: Located, where: str) -> tuple[str, ...]:
    """The refs of the checkpoint record ``sequence`` at ``at``, each key once."""
    frame = _head_at(view, sequence, at, where, _CHECKPOINT_MAGIC)
    return tuple(dict.fromkeys(_decode(_CHECKPOINT_DECODER, frame.meta, where).refs))


class _CheckpointRefs(NamedTuple):
    sequence: int
    refs: tuple[str, ...]


class _Claim(NamedTuple):
    """What the metadata of a damaged item entry says, with what its checksum covers."""

    meta: _ItemMeta
    raw: bytes
    """The metadata's bytes as the entry holds them."""
    covered: bytes
    """The bytes its checksum covers before the metadata (the framing's fixed part)."""
    checksum: int
    """The checksum of the framing and metadata, as the entry holds it."""
    checked: bool = False
    """Its metadata passes that checksum (as read, or with the owner :meth:`owned_by` found):
    its owner is the one the entry was written with."""

    def passes(self, meta: _ItemMeta) -> bool:
        """Whether ``meta`` is the metadata the entry's checksum was made of."""
        raw = _ENCODER.encode(meta)
        return len(raw) == _FIXED.unpack(self.covered)[3] and \
            zlib.crc32(raw, zlib.crc32(self.covered)) == self.checksum

    def owned_by(self, held: Collection[int], bound: int) -> _Claim:
        """The claim with the owner that makes its metadata pass its checksum, when the owner
        is all the damage changed (:attr:`checked`): one of the ``held`` checkpoints, a shared
        item's (none), or a checkpoint removed since (a number up to ``bound``, the latest
        held: an entry left behind by its owner's removal) whose metadata differs from the
        bytes the entry holds in one byte of the owner's encoding (:meth:`_removed_near`); the
        claim as it is otherwise. Damage to the owner and to other bytes leaves its owner
        unchecked.

        A removed owner makes the entry an orphan that writes delete, so only those few are
        tried: every number up to ``bound`` (a million in a long run) gave doubly damaged
        metadata as many chances to pass with one by accident, deleting a held checkpoint's
        item, and cost an encoding and CRC each. Costs an encoding and CRC per held
        checkpoint, plus at most 255 per byte of the owner's encoding (about 530 when the
        latest held is a million, 1,786 at most below 2**32: a chance pass of metadata
        damaged further below 1 in 2.4 million), whatever the run's length."""
        if self.checked:
            return self
        for owner in (*sorted(held), None):
            if owner == self.meta.owner:
                continue
            owned = msgspec.structs.replace(self.meta, owner=owner)
            if self.passes(owned):
                return self._replace(meta=owned, checked=True)
        for owned in self._removed_near(held, bound):
            if self.passes(owned):
                return self._replace(meta=owned, checked=True)
        return self

    def _removed_near(self, held: Collection[int], bound: int) -> Iterator[_ItemMeta]:
        """The metadata the entry may have been written with, owned by a number up to
        ``bound`` not ``held``, that differs from the bytes it holds (:attr:`raw`) in one byte
        of the owner's encoding alone: a byte of it overwritten or zeroed. The type byte is
        one of them, and its damage can change how many bytes the owner takes (``05`` made
        ``cf`` reads the expiry's first 8 bytes as the owner): each width is tried whose
        rest of the metadata (expiry, entry) reads as the entry's."""
        start = 1 + len(_ENCODER.encode(self.meta.key))  # the array's header, the key
        head = self.raw[:start]
        for width, kind, least in _NUMBER_ENCODINGS:
            sample = head + _ENCODER.encode(least) + self.raw[start + width:]
            try:
                rest = _ITEM_DECODER.decode(sample)
            except _UNDECODABLE:
                continue
            if rest.key != self.meta.key or rest.entry != self.meta.entry or \
                    _ENCODER.encode(rest) != sample:  # not as the entry was written
                continue
            for owner in _one_byte_from(self.raw[start:start + width], kind, least, bound):
                if owner not in held:
                    yield msgspec.structs.replace(rest, owner=owner)


_NUMBER_ENCODINGS = ((1, -1, 0), (2, 0xCC, 1 << 7), (3, 0xCD, 1 << 8), (5, 0xCE, 1 << 16),
                     (9, 0xCF, 1 << 32))
"""How the encoder writes a number at least 0, by size: the encoding's width, its type byte
(none for the smallest, whose one byte is the number) and the least number written so."""


def _one_byte_from(found: bytes, kind: int, least: int, bound: int) -> Iterator[int]:
    """The numbers from ``least`` up to ``bound`` whose encoding (of ``found``'s width, type
    byte ``kind``) differs from ``found`` in one byte."""
    if kind < 0:
        yield from (owner for owner in range(min(bound, 0x7F) + 1) if owner != found[0])
        return
    value = int.from_bytes(found[1:], "big")
    if found[0] != kind:  # the type byte is the damaged one
        if least <= value <= bound:
            yield value
        return
    for shift in range(0, 8 * (len(found) - 1), 8):
        base = value & ~(0xFF << shift)
        if base > bound:
            continue
        for byte in range(min(0xFF, (bound - base) >> shift) + 1):
            owner = base | byte << shift
            if owner != value and owner >= least:
                yield owner


class _DamagedItem(NamedTuple):
    """An item entry whose metadata fails its checks."""

    error: CorruptCheckpointError
    claim: _Claim | None
    """What its metadata says anyway, when it decodes and names the entry itself (``None``
    otherwise): a hint of whose it is, never trusted for a read."""


def _claimed_meta(view: LogView, entry: int, at: Located) -> _Claim | None:
    """The metadata of a damaged item entry, read without its checksum."""
    try:
        found = view.read_sized(entry, _PEEK_BYTES, at=at)
        if found is None or len(found.data) < _PREFIX:
            return None
        meta_len = _FIXED.unpack_from(found.data)[3]
        meta = _ITEM_DECODER.decode(found.data[_PREFIX:_PREFIX + meta_len])
    except (CorruptCheckpointError, *_UNDECODABLE):
        return None
    if meta.entry != entry:
        return None
    claim = _Claim(meta, bytes(found.data[_PREFIX:_PREFIX + meta_len]), found.data[:_FIXED.size],
                   _CRCS.unpack_from(found.data, _FIXED.size)[0])
    return claim._replace(checked=claim.passes(meta))


_Change = int | _ItemMeta | _CheckpointRefs | _DamagedItem | CorruptCheckpointError | None
"""What :func:`_read_change` read of a log entry for the item index."""


def _read_change(
    view: LogView, key: int, at: Located | None, name: Callable[[int], str]
) -> _Change:
    """What the item index takes from the log entry of ``key`` at ``at``: the count of item
    entries handed out, an item's metadata or a checkpoint's refs (or why they are
    unreadable); ``None`` for a removal or another record."""
    if at is None:
        return None
    if key == _ITEMS_MADE:
        return _items_made(view, at)
    if key <= _FIRST_ITEM:
        try:
            return _entry_meta(view, key, at, name(key))
        except CorruptCheckpointError as exc:
            return _DamagedItem(exc, _claimed_meta(view, key, at))
    try:
        if key >= 0:
            return _CheckpointRefs(key, _checkpoint_refs(view, key, at, name(key)))
    except CorruptCheckpointError as exc:
        return exc
    return None


def _items_made(view: LogView, at: Located) -> int:
    """The count of item entries handed out, as the log holds it at ``at`` (0 when damaged:
    the entries found then count instead)."""
    try:
        record = view.read_sized(_ITEMS_MADE, at=at, check=True)
    except CorruptCheckpointError:
        return 0
    if record is None or len(record.data) != _COUNT.size:
        return 0
    return int(_COUNT.unpack(record.data)[0])


# -- how reads see a run ----------------------------------------------------------------------

_UNKNOWN_STATUS = "active"
"""Reported for a run read by its log alone: its real status lived in the damaged record."""


class _View(NamedTuple):
    """What a read goes by: the range ``run.rec`` describes (extended over checkpoints it is
    behind), or the checkpoint records in the log when there is no usable record."""

    status: str
    top: int
    low: int
    listed: tuple[int, ...] | None = None
    """Sequences of the checkpoint records, newest first, when the read goes by the log alone."""

    def candidates(self, before: int | None = None) -> Iterator[int]:
        """Sequences that may hold a checkpoint, newest first, below ``before``."""
        if self.listed is not None:
            return (s for s in self.listed if before is None or s < before)
        top = self.top if before is None else min(before - 1, self.top)
        return iter(range(top, self.low - 1, -1))

    def holds(self, sequence: int) -> bool:
        if self.listed is not None:
            return sequence in self.listed
        return self.low <= sequence <= self.top


def _place_of(found: CheckpointHeader) -> tuple[str, str] | None:
    """``(run key, incarnation)`` a checkpoint's id names, if it names its own sequence."""
    parsed = _ids.parse_checkpoint_id(found.checkpoint_id)
    if parsed is None or parsed[2] != found.sequence:
        return None
    return parsed[0], parsed[1]


def _record_name(key: int) -> str:
    """``run.rec``, ``c/<sequence>`` or ``i#<n>``: how a record of a run's log is named."""
    if key == RUN:
        return _RUN_FILE
    if key <= _FIRST_ITEM:
        return f"{_ITEMS}#{_FIRST_ITEM - key}"
    return f"{_CHECKPOINTS}/{_sequence_name(key)}" if key >= 0 else f"#{key}"


def _check_own_run(run: RunRecord, run_key: str, where: str) -> None:
    """Raise :class:`CorruptCheckpointError` naming ``where`` unless ``run`` is of
    ``run_key``: a record of another run read as this one's would hand out checkpoint ids of
    this key in the other run's incarnation, and list the other run in its place."""
    problem = _ids.foreign_run(run_key, run.run_id)
    if problem is not None:
        raise CorruptCheckpointError(
            f"run.rec of run key {run_key} {problem} (another run's log or directory copied "
            "in)", key=where)


def _problem(exc: CorruptCheckpointError) -> str:
    """The message of a corrupt-record error without the key it names."""
    return str(exc).removesuffix(f" (store key: {exc.key})")


def _trusted_view(
    files: _Dir, now: float, *, include_expired: bool = False, locked: bool = False
) -> tuple[bool, _View | None]:
    """The view ``run.rec`` gives (``None``: no live run), and whether it can be trusted.

    It cannot when it is damaged, or missing while checkpoints are in place, or behind its log:
    a checkpoint at ``latest_sequence + 1`` is one the record does not know about, or one of
    another incarnation of the run (an old record put back). Nor, unless the reader holds the
    run's lock, when ``idx`` does not cover every commit read: a commit may be one being cut
    off again because it failed.
    """
    if not locked and not files.settled():
        return False, None
    try:
        state = files.state()
    except CorruptCheckpointError:
        return False, None
    if state is None or state.run is None:
        # No run record: normally no checkpoint record either (a run of items only).
        return not files.sequences(), None
    run = state.run
    if files.has_record(run.latest_sequence + 1):
        return False, None
    if not include_expired and not is_live(run.expires_at, now):
        return True, None
    return True, _View(run.status, run.latest_sequence, state.low)


class _Slot(enum.Enum):
    """What the log holds at a checkpoint's sequence, as seen by a run record."""

    EMPTY = "no file"
    OURS = "an intact checkpoint of the record's incarnation"
    OTHER_LIFE = "an intact checkpoint of another incarnation of the run"
    UNUSABLE = "a torn file, or another run's"


def _slot(files: _Dir, run_key: str, run: RunRecord, sequence: int) -> _Slot:
    """What is in place at ``sequence`` for the record ``run``."""
    if not files.has_record(sequence):
        return _Slot.EMPTY  # the common answer
    try:
        found = files.head(sequence, 0.0, include_expired=True)
    except CorruptCheckpointError:
        return _Slot.UNUSABLE
    if found is None:
        return _Slot.EMPTY
    place = _place_of(found)
    if place is None or place[0] != run_key:
        return _Slot.UNUSABLE
    return _Slot.OURS if place[1] == run.incarnation else _Slot.OTHER_LIFE


def _other_life(files: _Dir, run: RunRecord, sequence: int) -> CorruptCheckpointError:
    """The problem of a record whose run's checkpoints belong to another incarnation."""
    return CorruptCheckpointError(
        f"run.rec names incarnation {run.incarnation!r:.20}, but checkpoint {sequence} in place "
        "is of another incarnation of the run (an old copy of run.rec put back?)",
        key=files.record_key(RUN),
    )


def _log_view(
    files: _Dir, run_key: str, now: float, *, include_expired: bool = False
) -> _View | None:
    """The view of a run whose record cannot be trusted as it is; under the run lock.

    A readable record is extended over the intact checkpoints of its incarnation in place
    above it (what its next writer will adopt); without a usable record the run is read by
    the checkpoint records in the log, reported active.
    """
    trusted, view = _trusted_view(files, now, include_expired=include_expired, locked=True)
    if trusted:
        return view  # a writer brought the record up to date while we waited for the lock
    damaged = False
    try:
        state = files.state()
    except CorruptCheckpointError as exc:
        logger.warning(
            "file store: %s is damaged (%s); reading the run by its checkpoints",
            exc.key,
            _problem(exc),
        )
        state, damaged = None, True
    run = state.run if state is not None else None
    if run is not None and _slot(files, run_key, run, run.latest_sequence + 1) is _Slot.OTHER_LIFE:
        problem = _other_life(files, run, run.latest_sequence + 1)
        logger.warning(
            "file store: %s is damaged (%s); reading the run by its checkpoints",
            problem.key,
            _problem(problem),
        )
        state, run, damaged = None, None, True  # its range and hidden ones are another life's
    if state is not None and run is not None:
        top = run.latest_sequence
        while _slot(files, run_key, run, top + 1) is _Slot.OURS:
            top += 1
        if top == run.latest_sequence and not include_expired and not is_live(run.expires_at, now):
            return None
        return _View(run.status, top, state.low)
    low = state.low if state is not None else 0
    listed = tuple(s for s in files.sequences() if s >= low)
    if not listed:
        return None
    if not damaged:
        logger.warning(
            "file store: %s is missing or holds no run; reading the run by its checkpoints",
            files.record_key(RUN),
        )
    return _View(_UNKNOWN_STATUS, listed[0], low, listed)


def _newest_live(files: _Dir, view: _View, now: float) -> tuple[StoredCheckpoint, str] | None:
    for sequence in view.candidates():
        # Past a deleted or expired newest checkpoint, heads first: no payload of a dead one.
        if sequence < view.top and files.head(sequence, now) is None:
            continue
        found = files.checkpoint(sequence, now)
        if found is not None:
            return found, view.status
    return None


# -- small file-system helpers ----------------------------------------------------------------


def _discard(path: str, *, at: tuple[int, str] | None = None) -> bool:
    """Unlink a file (``at``: by its name in an open directory, ``path`` naming it in logs);
    ``False`` if it was already gone. A directory in its place is logged."""
    try:
        if at is None:
            os.unlink(path)
        else:
            os.unlink(at[1], dir_fd=at[0])
    except FileNotFoundError:
        return False  # removed by an earlier, interrupted cleanup or a concurrent one
    except IsADirectoryError:
        logger.warning("file store: left foreign directory %s in place", path)
        return False
    return True


def _remove_tree(path: str, *, at: tuple[int, str] | None = None) -> None:
    """Remove a directory tree (``at``: by its name in an open directory); concurrent removers
    are fine. A symbolic link, anywhere in it or in its place, is unlinked itself: what it
    points to is never touched. Each directory is opened without following a link and read
    through its descriptor, so one swapped for a link meanwhile is not entered either."""
    try:
        fd = os.open(path, _DIR_FLAGS) if at is None else \
            os.open(at[1], _DIR_FLAGS, dir_fd=at[0])
    except FileNotFoundError:
        return  # another remover got here first
    except OSError as exc:
        if exc.errno not in _LINK_ERRORS:
            raise
        _discard(path, at=at)  # a link or a file: itself, not what it names
        return
    try:
        with os.scandir(fd) as listing:
            names = [entry.name for entry in listing]
        for name in names:
            _remove_tree(os.path.join(path, name), at=(fd, name))
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):  # another remover got here first
        if at is None:
            os.rmdir(path)
        else:
            os.rmdir(at[1], dir_fd=at[0])


def _symbolic_link(path: str) -> CorruptCheckpointError:
    """The error of an operation on a run whose directory is a symbolic link."""
    return CorruptCheckpointError(
        "the run directory is a symbolic link; the store never follows one (delete_run "
        "removes the link, never what it points to)", key=path)


def _refuse_link(path: str) -> None:
    """Raise :func:`_symbolic_link` if ``path`` is a symbolic link."""
    if os.path.islink(path):
        raise _symbolic_link(path)


def _log_leftover(path: str, exc: OSError) -> None:
    logger.warning(
        "file store: cleanup of %s failed after the commit, left for a later sweep: %s",
        exc.filename or path,
        exc.strerror or exc,
    )


@contextlib.contextmanager
def _after_commit(path: str) -> Iterator[None]:
    """Cleanup past a commit point: a failure is logged, never reported as the operation's."""
    try:
        yield
    except OSError as exc:
        _log_leftover(path, exc)


@contextlib.contextmanager
def _close_logged(path: str) -> Iterator[None]:
    """Closing what an operation opened, once it is done: a failure is logged (the descriptor
    is released all the same), never reported as the operation's."""
    try:
        yield
    except OSError as exc:
        logger.warning("file store: closing %s failed: %s", path, exc.strerror or exc)


def _remove_empty_dir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError as exc:
        # A marker arrived meanwhile, or a concurrent sweep got here first.
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
            raise


def _mkdir(path: str) -> bool:
    """Create a 0700 directory; ``False`` if it already existed."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return False
    return True


def _missing_directories(path: str) -> list[str]:
    """``path`` and those of its ancestors that do not exist (yet)."""
    missing: list[str] = []
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _directory_of(path: object) -> str:
    """The store's directory as a ``str`` path (``ConfigurationError`` for anything else)."""
    try:
        directory = os.fspath(path)  # type: ignore[call-overload]
    except TypeError as exc:
        raise ConfigurationError(f"file store path must be a str or a path: {shown(path)}") from exc
    if not isinstance(directory, str) or "\0" in directory:
        raise ConfigurationError(f"not a usable file store path: {directory!r:.80}")
    if not directory:  # not the working directory by accident: "." says so
        raise ConfigurationError("file store path is empty (give a directory, or '.')")
    absolute = os.path.abspath(directory)
    if os.path.dirname(absolute) == absolute:  # "/" (a bare file:///), or a drive's root
        raise ConfigurationError(
            f"file store path {directory!r} is the filesystem's root: give the store a "
            "directory of its own")
    try:
        os.fsencode(directory)  # what the system is given: undecodable bytes pass, as given
    except UnicodeEncodeError as exc:
        raise ConfigurationError(
            f"file store path {directory[:80]!r} is not valid unicode (it has a lone "
            "surrogate)") from exc
    return directory


def _parse_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"file store option {name}={shown(value)} is not a boolean")


class _Budget:
    """Work left in one ``purge_expired`` call."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def spend(self, amount: int) -> None:
        self.left -= amount

    @property
    def exhausted(self) -> bool:
        return self.left <= 0


# -- the store --------------------------------------------------------------------------------


class FileStore(ExpiryCleanup):
    """Checkpoints in a directory tree; see the module docstring for the layout.

    Costs (``n`` = checkpoints held by the run, ``k`` = requested count): ``append`` appends one
    commit to the run's log (the checkpoint, ``run.rec``, the removal of what it prunes) with
    one write and one ``fdatasync``, and updates ``idx`` unsynced; plus one head read per pruned
    checkpoint that never expires. The run's first append makes the log (its file and directory
    synced). An append that finds the log's dead bytes above its live ones (and 256 KiB)
    compacts it once it has released the run lock: O(live bytes), amortised O(1), other writers
    waiting only for the commits made during the copy to be added. ``run.rec`` grows by about 15
    bytes per held checkpoint that expires: at most ``keep_latest`` of them with pruning, else
    the live ones (expired ones leave it on the next append). ``get`` and ``latest`` read
    ``run.rec`` and one checkpoint through ``idx`` (``latest`` walks down only past deleted or
    expired newest ones); ``headers`` reads ``run.rec`` and the first 4 KiB of about ``k``
    checkpoint records, never payloads. Writers, ``get``, ``latest``, ``headers`` and
    ``get_run`` also look up ``idx``'s slot beyond ``latest_sequence``; a run whose record is
    behind costs its next writer one head read per checkpoint, and a damaged run (or a missing
    ``idx``) is read by scanning its log. Starting an expired run over, and purging one, read
    the head of each of its checkpoints first. ``update_run`` commits a new ``run.rec`` (and
    moves one index marker on a status change); ``list_runs`` and ``runs_with_label`` list one
    index directory and read ``run.rec`` of the runs they return; ``count_runs`` reads
    ``run.rec`` of every indexed run; ``scan_items`` lists the run's items. ``purge_expired``
    reads every ``run.rec`` and only the files of runs with something due.

    Adapter capabilities (``r`` = refs of the checkpoint, ``i`` = items written, ``s`` = shared
    items the run's held checkpoints name, ``t`` = items of the run): every operation on items
    goes by this process's item index of the run (see the module docstring), which costs one
    scan of the log (O(log bytes)) the first time a process reads the run's items and after a
    compaction, and otherwise a read of the commits other processes appended since it last
    looked (its own are taken in as it makes them, with nothing read back).
    ``append_with_items`` looks up each of its ``i`` items in the index (a live one is kept) and
    commits the new ones' entries with the checkpoint (still one write and one sync); the refs
    of the checkpoints it prunes and their shared items' counts are the index's, so the items a
    pruned checkpoint was the last to name (or owned) go in the same commit, with no read, and
    nothing in the append grows with ``s``. ``put_items``, ``put_owned_items`` and
    ``delete_items`` are one commit each (one sync, however many items). ``read_with_items``
    costs ``get`` or ``latest``, one ``pread`` per owned item, per ref and per item nested under
    a ref (found by one bisection per ref), then two ``stat`` calls (log and run directory) and,
    only if a commit was made meanwhile, ``run.rec``'s first 4 KiB again: O(owned + r + nested),
    not O(n), O(s) or O(t). ``get_items`` is one ``pread`` per key; ``scan_items`` bisects to
    its page. ``put_owned_items`` reads ``run.rec`` and the owner's head under the run lock.
    Expired items are found by ``purge_expired`` walking the index: O(t) for a run whose items
    are due.

    Group commit: ``append``, ``append_with_items``, ``append_next`` and ``put_owned_items``
    of one run that threads of this process start while one of them holds the run's lock are
    made by that thread, each its own commit, with one sync for them all (see
    :meth:`_batched`).

    Thread hops: one per operation, except for ``get``, ``latest``, ``read_with_items`` and
    ``get_run`` of a run this store used in the last 30 seconds, which are first tried on the
    event loop's thread from the page cache only (``RWF_NOWAIT``), and handed to a worker
    thread as soon as they would wait for the disk, a lock or more than 1 MiB of reading.

    Limits: item keys up to :data:`MAX_ITEM_KEY_BYTES` UTF-8 bytes, statuses up to 64. A
    write of items is one commit, so the log holds a batch whole or not at all; an append's
    items are committed with its checkpoint. The item index of the runs a process read lately
    holds about 2^18 items before the least recently used runs' indexes are dropped (and made
    again when read).
    """

    nested_items = True
    sequence_guard = True

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self._root = os.path.abspath(_directory_of(path))
        self._fsync = fsync
        self._runs = os.path.join(self._root, "runs")
        self._locks = os.path.join(self._root, "locks")
        self._index = os.path.join(self._root, "index")
        self._tmp = os.path.join(self._root, "tmp")
        self._trash = os.path.join(self._root, "trash")
        self._cached_reads = cached_reads_supported()
        self._recent = _Recent(_RECENT_RUNS, _RECENT_SECONDS)
        self._batches = _Batches(_BATCH_PATIENCE)
        try:
            self._make_directories()
        except OSError as exc:
            raise StoreError(f"cannot create the file store at {self._root}: {exc}") from exc

    def _make_directories(self) -> None:
        """Create the store's directories, and sync the names of those that may be new.

        A commit syncs its log and the run's directory, and the run's first one ``runs``; the
        names above that (``runs`` in the root, the root in its parent, and any directory the
        root was created in) must be on disk before anything is acknowledged, or a power cut
        could take every run with them. Another process may have just created them and not
        synced them yet, so the root and its parent are synced whoever made them (a sync of
        a directory with nothing new to write costs little)."""
        created = _missing_directories(self._root)
        os.makedirs(self._root, mode=0o700, exist_ok=True)
        for directory in (self._runs, self._locks, self._index, self._tmp, self._trash):
            _mkdir(directory)
        for directory in sorted({self._root, *map(os.path.dirname, [self._root, *created])},
                                key=len, reverse=True):
            try:
                self._sync_dir(directory)
            except PermissionError:
                # A directory one may enter but not read cannot be opened to be synced.
                logger.debug("file store: cannot sync the directory %s", directory)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> FileStore:
        """``file:///abs/path?fsync=false`` or a plain path; ``fsync`` may also be an option."""
        path, query = parse_file_url(url)
        settings: dict[str, object] = dict(query)
        settings.update(options)
        check_options("the file:// store", settings, {"fsync"})
        if not path:
            raise ConfigurationError(f"file store URL without a path: {url!r}")
        return cls(path, fsync=_parse_bool("fsync", settings.get("fsync", True)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._root!r}, fsync={self._fsync})"

    # -- plumbing -----------------------------------------------------------------------------

    async def _call(self, func: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run one whole operation in a worker thread: the only thread hop of a method."""
        call = functools.partial(self._translated, func, *args, **kwargs)
        return await in_worker_thread(call)

    async def _write(
        self, run_key: str, func: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
    ) -> _T:
        """Run a write of ``run_key`` in a worker thread, in a batch (:meth:`_batched`)."""
        coming = self._batches.coming(run_key)
        try:
            return await self._call(
                self._batched, coming, functools.partial(func, *args, **kwargs))
        finally:
            self._batches.gone(coming)

    def _batched(self, coming: _Coming, call: Callable[[], _T]) -> _T:
        """Make a write of a run (``call``: an operation that takes the run lock) in a
        batch with the writes of the run that other threads of this process start meanwhile
        (group commit): the first holds the lock and makes them all in turn, each its own
        commit as if alone, then syncs the log once, before any of them returns. A write
        that fails fails alone; a sync that fails fails them all, their commits cut off."""
        queued = _Queued(call)
        batch = self._batches.join(coming, queued)
        if batch is not None:
            self._lead(coming.run_key, batch)
        return cast(_T, queued.outcome())

    def _lead(self, run_key: str, batch: _Batch) -> None:
        """Make the writes of ``batch`` (see :meth:`_batched`); every one of them has its
        outcome when this returns, handed out once the log is synced (before the lock is
        released and the log compacted, if due)."""
        taken: list[_Queued] = []
        try:
            with self._locked(run_key, links=True):  # each write refuses a link alone
                held = _HELD.by_path[self._run_dir(run_key)]
                held.batch = True
                try:
                    while queued := self._batches.take(run_key, batch):
                        taken += queued
                        for write in queued:
                            write.make()
                            # Made before any commit waits for the sync (none, or the log's
                            # first, synced at once): its outcome stands whatever follows.
                            write.settled = held.unsynced_from is None
                    held.batch = False
                    self._sync_batch(run_key, held)
                except BaseException:
                    held.batch = False
                    self._cut_batch(run_key, held)
                    raise
                for write in taken:
                    write.done.set()
        except BaseException as exc:
            taken += self._batches.close(run_key, batch)
            for write in taken:
                if not write.done.is_set():
                    write.fail(exc)
                    write.done.set()
            if not isinstance(exc, Exception):
                raise

    def _sync_batch(self, run_key: str, held: _HeldLog) -> None:
        """Sync the commits of a batch and put them in ``idx`` (raises if the sync fails)."""
        if held.unsynced_from is None:
            return
        self._log_writer(run_key).flush(held.view())
        held.unsynced_from = None

    def _cut_batch(self, run_key: str, held: _HeldLog) -> None:
        """Cut the unsynced commits of a failed batch off the log again, and forget what this
        process's item index read of them."""
        start, held.unsynced_from = held.unsynced_from, None
        if start is None:
            return
        _INDEXES.forget(self._run_dir(run_key))
        self._log_writer(run_key).cut(start)

    def _log_writer(self, run_key: str) -> LogWriter:
        return LogWriter(self._run_dir(run_key), functools.partial(self._temp_path, run_key),
                         fsync=self._fsync)

    async def _read(
        self, run_key: str, func: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
    ) -> _T:
        """Run a read-only operation of ``run_key``: on this thread when this process used
        the run lately and the operation can be done from the page cache, without waiting for
        the disk, a lock or much reading (a worker-thread hop costs more than such a read),
        and no worker thread is busy (each of the read's system calls gives up the GIL, and
        taking it back from a busy thread can take milliseconds); else, or when it would
        wait, in a worker thread. Either way the call is a checkpoint of the event loop:
        other tasks run, and a cancellation is taken, before it reads."""
        if self._cached_reads and self._recent.lately(run_key) and \
                not anyio.to_thread.current_default_thread_limiter().borrowed_tokens:
            await anyio.lowlevel.checkpoint()
            try:
                with cached_only():
                    return self._translated(func, *args, **kwargs)
            except CachedReadsUnsupported:
                self._cached_reads = False
            except WouldWait:
                pass
        return await self._call(func, *args, **kwargs)

    def _translated(self, func: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return func(*args, **kwargs)
        except CommitLeftInLog as exc:
            raise StoreError(
                f"outcome unknown: the write failed and its commit could not be cut off "
                f"{exc.filename or 'the log'} again ({exc.strerror or exc}): it may have "
                "landed (readers may find it). Read the run before writing it again: a create "
                "made again without looking may be stored twice") from exc
        except OSError as exc:
            where = exc.filename or self._root
            raise StoreError(f"file store I/O failed on {where}: {exc.strerror or exc}") from exc

    def _run_dir(self, run_key: str) -> str:
        return self._runs + os.sep + run_key  # a checked key: letters and digits only

    @contextlib.contextmanager
    def _reader(self, run_key: str) -> Iterator[_Dir | None]:
        try:
            fd = os.open(self._run_dir(run_key), _DIR_FLAGS)
        except FileNotFoundError:
            fd = None  # no such run
        except OSError as exc:
            if exc.errno in _LINK_ERRORS and os.path.islink(self._run_dir(run_key)):
                raise _symbolic_link(self._run_dir(run_key)) from exc
            raise
        if fd is None:
            yield None
            return
        self._recent.touch(run_key)
        files = _Dir(self._run_dir(run_key), fd)
        try:
            yield files
        finally:
            # As after a hold of the run's lock: a close that fails is logged, and never keeps
            # the directory's descriptor open.
            with _close_logged(files.path):
                files.close()
            with _close_logged(files.path):
                os.close(fd)

    @contextlib.contextmanager
    def _locked(
        self, run_key: str, *, blocking: bool = True, links: bool = False
    ) -> Iterator[bool]:
        """Hold the run's lock; yields ``False`` if not ``blocking`` and it is busy. Within a
        batch of writes this thread makes for the run, the batch's hold is the operation's.
        A run directory that is a symbolic link is refused (:func:`_symbolic_link`), unless
        ``links``: the caller then neither reads nor writes through it."""
        no_waiting()
        outer = _HELD.by_path.get(self._run_dir(run_key))
        if outer is not None and outer.batch:
            if not links:
                _refuse_link(self._run_dir(run_key))
            yield True
            return
        path = os.path.join(self._locks, run_key)
        fd = self._acquire(path, blocking)
        if fd is None:
            yield False
            return
        self._recent.touch(run_key)
        run_dir = self._run_dir(run_key)
        # A thread never holds a run's lock twice (flock would wait on itself).
        held = _HELD.by_path[run_dir] = _HeldLog(run_dir)
        try:
            if not links:
                _refuse_link(run_dir)
            yield True
            # A run without a directory needs no lock file. Removed while held: whoever
            # waits on it finds its inode gone from the path and locks a new file.
            if not os.path.lexists(run_dir):
                with _after_commit(path):
                    _discard(path)
        finally:
            # The operation is done either way: a close that fails is logged, and never
            # keeps the lock's descriptor open (the run would stay locked for good).
            del _HELD.by_path[run_dir]
            with _close_logged(run_dir):
                held.forget()
            with _close_logged(path):
                os.close(fd)
        if held.compact_due:  # the operation succeeded: compact, holding the lock briefly
            self._compact(run_key)

    def _compact(self, run_key: str) -> None:
        """Compact the run's log once a commit left it due: most of the copy without the run
        lock, so writers wait only for the commits made meanwhile to be copied. The commit
        stands whatever happens here; a failure is logged and the next commit tries again."""
        writer = self._log_writer(run_key)
        try:
            writer.compact(locked=functools.partial(self._locked, run_key))
        except (OSError, CheckpointError) as exc:
            logger.warning("file store: compacting %s failed: %s", writer.path, exc)

    @staticmethod
    def _acquire(path: str, blocking: bool) -> int | None:
        flags = fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, flags)
                held = os.fstat(fd)
                current = os.stat(path, follow_symlinks=False)
                if (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino):
                    return fd
            except BlockingIOError:
                os.close(fd)
                return None
            except FileNotFoundError:
                pass  # the holder removed the lock file (delete_run): lock the new one
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def _sync_dir(self, path: str) -> None:
        if not self._fsync:
            return
        fd = os.open(path, _STORE_DIR_FLAGS)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _ensure_dir(self, path: str) -> None:
        if _mkdir(path):
            self._sync_dir(os.path.dirname(path))

    def _temp_path(self, run_key: str) -> str:
        return os.path.join(self._tmp, f"{run_key}.{secrets.token_hex(8)}")

    def _commit(
        self,
        run_key: str,
        state: _RunState | None,
        *,
        checkpoint: tuple[int, bytes] | None = None,
        erase: Iterable[int] = (),
        items: _Entries | None = None,
        refs: Sequence[str] = (),
    ) -> None:
        """Commit ``run.rec`` (unless ``None``; with a new checkpoint, naming ``refs``, the
        removal of the records of ``erase``, and the item entries of ``items``) to the run's
        log: one write and one sync."""
        run_dir = self._run_dir(run_key)
        writer = self._log_writer(run_key)
        puts = [] if checkpoint is None else [checkpoint]
        removes = list(erase)
        if items is not None:
            puts += items.puts
            removes += items.removes
        if state is not None:
            puts.append((RUN, _run_bytes(state)))
        held = _HELD.by_path[run_dir]  # every commit is made under the run lock
        view = held.view()
        try:
            # A batch's commits are synced at its end; the log's first commit is at once.
            deferred = held.batch and view is not None
            start = None if view is None else view.end
            due = writer.commit(puts, removes, view=view, sync=not deferred)
            if deferred and held.unsynced_from is None:
                held.unsynced_from = start
        except BaseException:
            with _close_logged(run_dir):  # the commit's error is the one raised
                held.forget()  # what the commit left is read anew
            raise
        if view is not None:
            # The view took the commit in (LogView.committed): it reads as the log is, and
            # the item index takes the commit from its memory, not the file.
            index = _INDEXES.known(run_dir, view.log_id)
            if index is not None:
                # A catch-up that fails changes nothing: the next read of the items does it.
                known: dict[int, _Change] = {} if items is None else dict(items.made)
                known[RUN] = None  # not an item nor a checkpoint
                if checkpoint is not None:
                    known[checkpoint[0]] = _CheckpointRefs(
                        checkpoint[0], tuple(dict.fromkeys(refs)))
                with take(index.lock), contextlib.suppress(OSError, CheckpointError):
                    if index.end == start:
                        index.catch_up(view, view.end, _Dir(run_dir).record_key, known)
        if view is None or not view.indexed:
            # The commit made the log, or the view reads a log without a usable idx (or met
            # damage): opened anew when next read, through idx where there is one. Past the
            # commit: a close that fails is logged, never the write's failure.
            with _close_logged(run_dir):
                held.forget()
        held.compact_due = held.compact_due or due

    def _read_state(self, run_key: str) -> _RunState | None:
        return _Dir(self._run_dir(run_key)).state()

    # -- checkpoint log -----------------------------------------------------------------------

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
        return await self.append_with_items(
            run_key, record, run=run, keep_latest=keep_latest, now=now, items=()
        )

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
        keep_latest = _check_append(run_key, record, run, keep_latest, items)
        appended = _appended_items(record, items)
        status, _ = await self._write(
            run_key, self._append, run_key, record, run, keep_latest, now, appended)
        return status

    async def append_next(
        self,
        run_key: str,
        record: StoredCheckpoint,
        *,
        run: RunRecord,
        keep_latest: int | None,
        now: float,
        renumber: Callable[[int], StoredCheckpoint],
    ) -> tuple[str, StoredCheckpoint]:
        check_time("now", now)
        keep_latest = _check_append(run_key, record, run, keep_latest)
        if record.refs:
            raise ValidationError("append_next takes checkpoints that name no items")
        return await self._write(
            run_key, self._append, run_key, record, run, keep_latest, now, [],
            renumber=renumber)

    def _append(
        self,
        run_key: str,
        record: StoredCheckpoint,
        seed: RunRecord,
        keep_latest: int | None,
        now: float,
        items: list[Item],
        renumber: Callable[[int], StoredCheckpoint] | None = None,
    ) -> tuple[str, StoredCheckpoint]:
        with self._locked(run_key):
            state = self._current_state(run_key, seed, now)
            stored = state.run if state is not None else None
            current = stored if stored is not None and is_live(stored.expires_at, now) else None
            if current is not None and current.run_id != seed.run_id:
                raise self._damaged(CorruptCheckpointError(
                    "run.rec is the record of another run id than the one appended to",
                    key=_Dir(self._run_dir(run_key)).record_key(RUN)))
            if renumber is not None and current is not None and \
                    seed.incarnation == current.incarnation and \
                    record.sequence != current.latest_sequence + 1:
                record = _renumbered(renumber, current.latest_sequence + 1, seed)
            _check_sequence(run_key, record, seed, current)
            plan = self._plan(run_key)
            find = refs_to_find(record, items)
            if state is None or stored is None or current is None:
                # A new life holds the loose items of its key, not what the checkpoints of an
                # earlier one named (they go with them).
                _check_refs_held(run_key, record.sequence, plan, find, now, new_life=True,
                                 gone=plan.named())
                ledger = self._start_run(run_key, state, seed, plan)
            else:
                ledger = _Ledger(state, current, plan.index)
                _check_refs_held(run_key, record.sequence, plan, find, now)
            ledger.run = msgspec.structs.replace(
                ledger.run, latest_sequence=record.sequence, updated_at=now
            )
            for item in items:
                if not plan.kept(item.key, now):  # a live value is never replaced
                    plan.write(item)
            # Counted before pruning: an item the new checkpoint names is never released by
            # the checkpoints it replaces.
            ledger.add(record.sequence, record.expires_at, record.refs)
            committed = self._write_and_commit(
                run_key, record, ledger, keep_latest, now, new_run=current is None, plan=plan
            )
            assert committed.run is not None
            if stored is not None and current is None:
                self._unindex(run_key, stored, keep=committed.run)
            return committed.run.status, record

    def _write_and_commit(
        self,
        run_key: str,
        record: StoredCheckpoint,
        ledger: _Ledger,
        keep_latest: int | None,
        now: float,
        *,
        new_run: bool,
        plan: _Plan,
    ) -> _RunState:
        """Prune, and commit the checkpoint with ``run.rec``, the items ``plan`` writes, the
        removal of the pruned checkpoints and of the items that go with them, in one commit
        of the run's log; returns what it committed."""
        ledger.remove_expired(now)
        if keep_latest is not None:
            self._remove_oldest(run_key, ledger, keep_latest)
        committed = ledger.state()
        assert committed.run is not None
        plan.release(ledger.removed, ledger.dropped_keys(), ledger.names())
        entries = plan.entries(run_key)
        if new_run:
            self._add_markers(_marker_paths(run_key, committed.run))
        self._commit(
            run_key, committed,
            checkpoint=(record.sequence, _checkpoint_bytes(record, ledger.run.labels)),
            erase=[*ledger.erase, *ledger.removed], items=entries, refs=record.refs)
        return committed

    def _plan(self, run_key: str) -> _Plan:
        """A plan of what the operation does to the run's items; under the run lock."""
        files = _Dir(self._run_dir(run_key))
        got = files.items()
        if got is None:
            return _Plan(None)
        view, index = got
        return _Plan(index, functools.partial(files.value, view))

    def _start_run(
        self, run_key: str, state: _RunState | None, seed: RunRecord, plan: _Plan
    ) -> _Ledger:
        """Clear what an expired or emptied run left (its checkpoints' records, the items they
        owned and the shared items they named, all removed by the append's commit); ``seed``
        becomes the record, uncommitted. A key's value in the earlier life is not this
        life's."""
        self._ensure_dir(self._run_dir(run_key))
        earlier: list[int] = []
        if state is not None and state.run is not None:
            earlier = _Dir(self._run_dir(run_key)).sequences()
            plan.release(earlier, plan.named(), names=lambda key: False)
        fresh = _RunState(items_next_expiry=state.items_next_expiry if state is not None else None)
        ledger = _Ledger(fresh, seed, None)
        ledger.erase = earlier
        return ledger

    # -- damaged run records, and records behind their log --------------------------------------

    def _damaged(self, exc: CorruptCheckpointError) -> CorruptCheckpointError:
        """The error of a write refused because the run's record is damaged, with the remedy."""
        url = "file://" + quote(self._root)
        return CorruptCheckpointError(
            f"the run record is damaged ({_problem(exc)}); the run's checkpoints can still be "
            "restored, but it takes no new checkpoint, deletion or status change until the "
            f"record is rebuilt: run `fastcheckpoint doctor --repair {url} RUN` (RUN: the run "
            "id) or `await manager.repair(run_id)`; `delete_run` removes the whole run",
            key=exc.key,
        )

    def _state_for_write(self, run_key: str) -> _RunState | None:
        """``run.rec`` (with its body) for a writer; a damaged one is refused."""
        try:
            return self._read_state(run_key)
        except CorruptCheckpointError as exc:
            raise self._damaged(exc) from exc

    def _current_state(
        self, run_key: str, seed: RunRecord | None, now: float | None
    ) -> _RunState | None:
        """``run.rec`` for a writer holding the run lock, first brought up to date with the log
        when it is behind it (status and run data kept); a damaged record is refused.

        ``seed`` (an append's) becomes the run record of what a crash between a run's first
        checkpoint and its commit leaves: checkpoint 0 alone, with no record or an expired one.
        """
        state = self._state_for_write(run_key)
        files = _Dir(self._run_dir(run_key))
        try:
            adoption = self._adoption(run_key, files, state, seed, now)
        except CorruptCheckpointError as exc:
            raise self._damaged(exc) from exc
        if adoption is None:
            return state
        run = state.run if state is not None else None
        rebuilt = self._rebuilt(run_key, files, adoption[0], adoption[1], now)
        if rebuilt is None or rebuilt.run is None:
            return state
        logger.warning(
            "file store: %s was behind its log (latest sequence %s, checkpoint %d in place: an "
            "interrupted write, or an old copy put back); brought it up to date",
            files.record_key(RUN),
            "none" if run is None else run.latest_sequence,
            rebuilt.run.latest_sequence,
        )
        self._commit_rebuilt(run_key, run, rebuilt)
        return rebuilt

    def _adoption(
        self,
        run_key: str,
        files: _Dir,
        state: _RunState | None,
        seed: RunRecord | None,
        now: float | None,
    ) -> tuple[_RunState | None, RunRecord] | None:
        """``None`` when the record counts every checkpoint in place, else what to rebuild it
        from (the record to keep, if any, and the run fields). Raises
        :class:`CorruptCheckpointError` when the record is damaged: undecodable, missing while
        checkpoints are in place, or of another incarnation than they are.

        Looks at ``latest_sequence + 1`` only, unless the record is expired at ``now``: its
        run would be discarded, so then every checkpoint record is looked at.
        """
        run = state.run if state is not None else None
        if state is None or run is None:
            left = self._first_create_left(run_key, files, state, seed)
            return (state, seed) if left and seed is not None else None
        if self._log_ahead(run_key, files, run):
            return state, run
        if now is None or is_live(run.expires_at, now):
            return None
        ours, others = self._live_unknown(run_key, files, state, run, now)
        if not others:
            return (state, run) if ours else None
        if ours or len(others) > 1 or others[0][0] != 0 or seed is None:
            raise _other_life(files, run, others[-1][0])
        # The first checkpoint of the run's next life, cut before its commit: adopted alone.
        life = msgspec.structs.replace(seed, incarnation=others[0][1])
        kept = _RunState(run=life, items_next_expiry=state.items_next_expiry)
        return kept, seed

    def _log_ahead(self, run_key: str, files: _Dir, run: RunRecord) -> bool:
        """Whether an intact checkpoint of the record's incarnation is in place at
        ``latest_sequence + 1``; raises :class:`CorruptCheckpointError` for one of another
        incarnation. Anything else there is logged, and replaced by the next append."""
        sequence = run.latest_sequence + 1
        slot = _slot(files, run_key, run, sequence)
        if slot is _Slot.OTHER_LIFE:
            raise _other_life(files, run, sequence)
        if slot is _Slot.UNUSABLE:
            logger.warning(
                "file store: %s is no intact checkpoint of this run; its next append replaces it",
                files.record_key(sequence),
            )
        return slot is _Slot.OURS

    def _first_create_left(
        self, run_key: str, files: _Dir, state: _RunState | None, seed: RunRecord | None
    ) -> bool:
        """Whether a run without a record holds checkpoint 0 alone, which an interrupted first
        create leaves and an append (``seed``) adopts. Any other checkpoint in place means the
        record was lost: :class:`CorruptCheckpointError`, as for a damaged one."""
        if not files.sequences():
            return False  # the common case: a run's first append, or a run of items only
        heads = self._log_heads(run_key, files, state)
        if not heads:
            return False  # torn or foreign files only: the append replaces or ignores them
        if seed is not None and [head.sequence for head in heads] == [0]:
            return True
        missing = "run.rec is missing" if state is None else "run.rec holds no run record"
        raise CorruptCheckpointError(missing, key=files.record_key(RUN))

    def _live_unknown(
        self, run_key: str, files: _Dir, state: _RunState, run: RunRecord, now: float
    ) -> tuple[bool, list[tuple[int, str]]]:
        """Live checkpoints in place that an expired record does not hold: whether some are of
        its incarnation (it was put back after its successor was pruned), and ``(sequence,
        incarnation)`` of those of other incarnations, ascending.

        Costs a head read per checkpoint record: only for a run about to be discarded, whose
        files are all removed next anyway.
        """
        ours = False
        others: list[tuple[int, str]] = []
        for sequence in reversed(files.sequences()):
            try:
                found = files.head(sequence, now)
            except CorruptCheckpointError:
                continue  # says nothing about the record; removed with the run
            place = None if found is None else _place_of(found)
            if place is None or place[0] != run_key:
                continue
            if place[1] != run.incarnation:
                others.append((sequence, place[1]))
            elif sequence >= state.low:
                ours = True
        return ours, others

    def _log_heads(self, run_key: str, files: _Dir, keep: _RunState | None) -> list[_Head]:
        """Intact checkpoints in place of the run's incarnation, oldest first.

        The incarnation is that of ``keep`` (a readable record) if it holds a run, else of the
        newest intact checkpoint; those below ``keep``'s ``low`` are gone. Corrupt files are
        logged,
        and files of other runs or incarnations left out: reads still report them as corrupt.
        """
        low = keep.low if keep is not None else 0
        heads: list[_Head] = []
        incarnation = keep.run.incarnation if keep is not None and keep.run is not None else None
        for sequence in files.sequences():
            if sequence < low:
                continue
            try:
                head = files.head(sequence, 0.0, include_expired=True)
            except CorruptCheckpointError as exc:
                no_waiting()  # on the event loop: warn once, from the worker thread
                logger.warning("file store: skipping corrupt checkpoint %s: %s", exc.key, exc)
                continue
            place = None if head is None else _place_of(head)
            if head is None or place is None or place[0] != run_key:
                continue
            incarnation = place[1] if incarnation is None else incarnation
            if place[1] == incarnation:
                heads.append(head)
        heads.reverse()
        return heads

    def _rebuilt(
        self,
        run_key: str,
        files: _Dir,
        keep: _RunState | None,
        base: RunRecord,
        now: float | None,
    ) -> _RunState | None:
        """The ``run.rec`` the log implies, or ``None`` when it holds no intact checkpoint.

        ``base`` gives ``run_id``, ``status`` and ``data``; ``created_at``, ``version`` and
        ``labels`` too when it is ``keep``'s own run, else they come from the log (oldest
        checkpoint, 0, newest checkpoint). ``updated_at`` becomes ``now`` (kept when ``None``).
        """
        heads = self._log_heads(run_key, files, keep)
        if not heads:
            return None
        oldest, newest = heads[0], heads[-1]
        place = _place_of(newest)
        assert place is not None
        immortal = sum(1 for head in heads if head.expires_at is None)
        expiring = sorted(
            (head.expires_at, head.sequence) for head in heads if head.expires_at is not None
        )
        own = keep is not None and keep.run is base
        run = msgspec.structs.replace(
            base,
            incarnation=place[1],
            latest_sequence=newest.sequence,
            checkpoint_count=len(heads),
            expires_at=_held_expiry(immortal, expiring),
            created_at=base.created_at if own else oldest.created_at,
            version=base.version if own else 0,
            updated_at=base.updated_at if now is None else now,
            labels=base.labels if own else newest.labels,
        )
        return _RunState(
            run=run,
            low=oldest.sequence,
            immortal=immortal,
            expiring=tuple(expiring),
            # Item expiries are unknown without a record: purge_expired looks at every item.
            items_next_expiry=keep.items_next_expiry if keep is not None else 0.0,
        )

    def _commit_rebuilt(self, run_key: str, old: RunRecord | None, state: _RunState) -> None:
        """Commit a rebuilt ``run.rec``; the run's index markers follow it. The markers of an
        unreadable record are left to ``purge_expired``, which then finds them stale."""
        assert state.run is not None
        markers = _marker_paths(run_key, state.run)
        self._add_markers(markers if old is None else markers - _marker_paths(run_key, old))
        self._commit(run_key, state)
        if old is not None:
            self._unindex(run_key, old, keep=state.run)

    def _remove_oldest(self, run_key: str, ledger: _Ledger, keep_latest: int) -> None:
        """Remove the oldest held checkpoints beyond ``keep_latest``, walking up from ``low``.

        Each sequence is passed once (``low`` moves past it); the index names the ones that
        expire, so only a checkpoint that never expires has its head read.
        """
        if ledger.held <= keep_latest:
            return
        expiring = {sequence: expires_at for expires_at, sequence in ledger.expiring}
        removed = set(ledger.removed)
        sequence = ledger.low
        # Never the newest: it was just written and is always kept.
        while ledger.held > keep_latest and sequence < ledger.run.latest_sequence:
            if sequence in expiring:
                ledger.remove(sequence, expiring[sequence])
            elif sequence not in removed:
                head = self._peek(run_key, sequence)
                if head is True or (isinstance(head, _Head) and head.expires_at is None):
                    ledger.remove(sequence, None)  # never expires (or unreadable: counted so)
                elif isinstance(head, _Head):
                    ledger.removed.append(sequence)  # expiring but unindexed: not held, a leftover
            sequence += 1
        ledger.low = max(ledger.low, sequence)

    def _peek(self, run_key: str, sequence: int) -> _Head | bool:
        """The head of a checkpoint for cleanup; else whether a (corrupt, logged) file is there."""
        files = _Dir(self._run_dir(run_key))
        try:
            found = files.head(sequence, 0.0, include_expired=True)
        except CorruptCheckpointError as exc:
            no_waiting()  # on the event loop: warn once, from the worker thread
            logger.warning("file store: skipping corrupt checkpoint %s: %s", exc.key, exc)
            return True
        return False if found is None else found

    async def get(
        self, run_key: str, sequence: int, *, now: float
    ) -> tuple[StoredCheckpoint, str] | None:
        sequence = check_sequence(sequence)
        check_time("now", now)
        _check_run_key(run_key)
        return await self._read(run_key, self._get, run_key, sequence, now)

    def _view(
        self,
        run_key: str,
        files: _Dir,
        now: float,
        *,
        include_expired: bool = False,
    ) -> _View | None:
        """How to read the run: by ``run.rec``, or by its log (waiting for the run's writer)
        when the record is damaged or behind."""
        trusted, view = _trusted_view(files, now, include_expired=include_expired)
        if trusted:
            return view
        with self._locked(run_key):
            self._settle(run_key, files)
            return _log_view(files, run_key, now, include_expired=include_expired)

    def _settle(self, run_key: str, files: _Dir) -> None:
        """Under the run lock: bring ``idx`` up to date with the log when a crash (or a
        reboot) left it behind, so later readers need not wait; then read the log anew."""
        writer = self._log_writer(run_key)
        try:
            writer.reindex()
        except OSError as exc:  # reads still go by the log; the next writer tries again
            logger.warning("file store: could not rewrite %s: %s",
                           os.path.join(writer.directory, "idx"), exc.strerror or exc)
        files.refresh()

    def _get(self, run_key: str, sequence: int, now: float) -> tuple[StoredCheckpoint, str] | None:
        def locked(files: _Dir) -> tuple[StoredCheckpoint, str] | None:
            view = _log_view(files, run_key, now)
            return None if view is None else _held_checkpoint(files, view, sequence, now)

        return self._read_settled(
            run_key, lambda files: self._get_in(run_key, files, sequence, now), locked)

    def _read_settled(
        self, run_key: str, read: Callable[[_Dir], _T], locked: Callable[[_Dir], _T]
    ) -> _T:
        """``read(files)`` lock-free when ``idx`` covers every commit the read saw, before
        and after it (its view may move forward into a commit made meanwhile, maybe one that
        fails and is cut off again); else ``locked(files)`` under the run's lock, once
        ``idx`` is brought up to date."""
        with self._reader(run_key) as files:
            if files is None:
                return read(_Dir(self._run_dir(run_key)))  # no such run: nothing to wait for
            if files.settled():
                result = read(files)
                if files.settled():
                    return result
        with self._locked(run_key):
            files = _Dir(self._run_dir(run_key))
            self._settle(run_key, files)
            return locked(files)

    def _get_in(
        self, run_key: str, files: _Dir, sequence: int, now: float
    ) -> tuple[StoredCheckpoint, str] | None:
        view = self._view(run_key, files, now)
        return None if view is None else _held_checkpoint(files, view, sequence, now)

    async def latest(self, run_key: str, *, now: float) -> tuple[StoredCheckpoint, str] | None:
        check_time("now", now)
        _check_run_key(run_key)
        return await self._read(run_key, self._latest, run_key, now)

    def _latest(self, run_key: str, now: float) -> tuple[StoredCheckpoint, str] | None:
        def locked(files: _Dir) -> tuple[StoredCheckpoint, str] | None:
            view = _log_view(files, run_key, now)
            return None if view is None else _newest_live(files, view, now)

        return self._read_settled(
            run_key, lambda files: self._latest_in(run_key, files, now), locked)

    def _latest_in(
        self, run_key: str, files: _Dir, now: float
    ) -> tuple[StoredCheckpoint, str] | None:
        previous: _View | None = None
        for attempt in range(_LATEST_ATTEMPTS):
            if attempt:
                files.refresh()
            view = self._view(run_key, files, now)
            # A concurrent append may have pruned what a view pointed at: only an unchanged
            # run.rec makes "no live checkpoint" the answer.
            if view is None or view == previous:
                return None
            found = _newest_live(files, view, now)
            if found is not None or view.listed is not None:
                return found
            previous = view
        # Appends kept moving the run under us: read it once while writers wait.
        with self._locked(run_key):
            files = _Dir(self._run_dir(run_key))
            self._settle(run_key, files)
            view = _log_view(files, run_key, now)
            return None if view is None else _newest_live(files, view, now)

    async def read_with_items(
        self, run_key: str, *, sequence: int | None, now: float
    ) -> tuple[StoredCheckpoint, str, dict[str, bytes]] | None:
        """The checkpoint read as by ``get`` or ``latest``, then its owned items, the items
        its refs name and those nested under them (by the item index), then ``run.rec`` again
        unless nothing was committed meanwhile: a checkpoint still held there had all its
        items in place while they were read."""
        if sequence is not None:
            sequence = check_sequence(sequence)
        check_time("now", now)
        _check_run_key(run_key)
        return await self._read(run_key, self._read_with_items, run_key, sequence, now)

    def _read_with_items(
        self, run_key: str, sequence: int | None, now: float
    ) -> tuple[StoredCheckpoint, str, dict[str, bytes]] | None:
        with self._reader(run_key) as files:
            if files is None:
                return None
            for _ in range(_LATEST_ATTEMPTS):
                if sequence is None:
                    found = self._latest_in(run_key, files, now)
                else:
                    found = self._get_in(run_key, files, sequence, now)
                if found is None:
                    return None
                if not files.settled():
                    break
                try:
                    items = _items_of(files, found[0], now)
                except _Unsettled:
                    files.refresh()
                    continue
                if self._still_held(run_key, files, found[0], now) and files.settled():
                    return found[0], found[1], items
        # Writers kept removing what we read (or the record is behind or damaged, or a commit
        # is not settled yet): read it once while they wait.
        with self._locked(run_key):
            files = _Dir(self._run_dir(run_key))
            self._settle(run_key, files)
            view = _log_view(files, run_key, now)
            if view is None:
                return None
            if sequence is None:
                found = _newest_live(files, view, now)
            else:
                found = _held_checkpoint(files, view, sequence, now)
            return None if found is None else (found[0], found[1], _items_of(files, found[0], now))

    def _still_held(
        self, run_key: str, files: _Dir, record: StoredCheckpoint, now: float
    ) -> bool:
        """Whether ``run.rec`` still holds ``record`` and the run directory read through
        ``files`` is still the run's (``delete_run`` renames it away whole, then removes its
        files in any order). When no commit was made since the read, it is."""
        if not files.unchanged():
            files.refresh()
            trusted, view = _trusted_view(files, now)
            if not trusted or view is None or not view.holds(record.sequence):
                return False
            # Deleted since (its record left the log with its items), or another life's
            # checkpoint at the same sequence now.
            head = files.head(record.sequence, now)
            if head is None or head.checkpoint_id != record.checkpoint_id:
                return False
        assert files.fd is not None
        try:
            here = os.stat(self._run_dir(run_key), follow_symlinks=False)
        except FileNotFoundError:
            return False
        return os.path.samestat(here, os.fstat(files.fd))

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
        """One commit, with the check of the owner: the batch is written whole or not at
        all."""
        checkpoint_id = cast(str, check_str("checkpoint_id", checkpoint_id))
        check_flag("if_absent", if_absent)
        check_int("owner", owner)
        check_time("now", now)
        check_items(items)
        _check_run_key(run_key)
        owned = _owned_items(items, owner)
        return await self._write(
            run_key, self._put_owned_items, run_key, owned, owner, checkpoint_id, if_absent,
            now)

    def _live_owner(
        self, run_key: str, owner: int, checkpoint_id: str, now: float
    ) -> _Head | None:
        """Checkpoint ``owner`` if the run holds it live with id ``checkpoint_id``; under the
        run lock."""
        state = self._current_state(run_key, None, now)
        run = _live_run(state, now)
        if state is None or run is None or not state.low <= owner <= run.latest_sequence:
            return None
        head = _Dir(self._run_dir(run_key)).head(owner, now)
        return head if head is not None and head.checkpoint_id == checkpoint_id else None

    def _put_owned_items(
        self,
        run_key: str,
        items: list[Item],
        owner: int,
        checkpoint_id: str,
        if_absent: bool,
        now: float,
    ) -> bool:
        with self._locked(run_key):
            head = self._live_owner(run_key, owner, checkpoint_id, now)
            if head is None:
                return False
            plan = self._plan(run_key)
            for item in items:
                if if_absent and plan.kept(item.key, now):
                    continue
                # Everything of a checkpoint expires together.
                plan.write(msgspec.structs.replace(item, expires_at=head.expires_at))
            self._commit(run_key, None, items=plan.entries(run_key))
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
        if before is not None:
            check_int("before", before)
        check_limit("limit", limit)
        check_flag("include_expired", include_expired)
        check_time("now", now)
        _check_run_key(run_key)
        return await self._call(self._headers, run_key, before, limit, now, include_expired)

    def _headers(
        self, run_key: str, before: int | None, limit: int, now: float, include_expired: bool
    ) -> tuple[list[CheckpointHeader], str | None]:
        def headers(files: _Dir, view: _View | None) -> tuple[list[CheckpointHeader], str | None]:
            if view is None:
                return [], None
            found: list[CheckpointHeader] = []
            for sequence in view.candidates(before):
                if len(found) >= limit:
                    break
                try:
                    header = files.head(sequence, now, include_expired=include_expired)
                except CorruptCheckpointError as exc:
                    logger.warning("file store: skipping corrupt checkpoint %s: %s", exc.key, exc)
                    continue
                if header is not None:
                    found.append(header_of(header))
            return found, view.status

        return self._read_settled(
            run_key,
            lambda files: headers(
                files, self._view(run_key, files, now, include_expired=include_expired)),
            lambda files: headers(
                files, _log_view(files, run_key, now, include_expired=include_expired)))

    async def delete(self, run_key: str, sequence: int, *, checkpoint_id: str) -> bool:
        sequence = check_sequence(sequence)
        checkpoint_id = cast(str, check_str("checkpoint_id", checkpoint_id))
        _check_run_key(run_key)
        return await self._call(self._delete, run_key, sequence, checkpoint_id)

    def _delete(self, run_key: str, sequence: int, checkpoint_id: str) -> bool:
        with self._locked(run_key):
            state = self._current_state(run_key, None, None)
            if state is None or state.run is None:
                return False
            if not state.low <= sequence <= state.run.latest_sequence:
                return False
            files = _Dir(self._run_dir(run_key))
            found = files.head(sequence, 0.0, include_expired=True)
            if found is None or found.checkpoint_id != checkpoint_id:
                return False
            plan = self._plan(run_key)
            ledger = _Ledger(state, state.run, plan.index)
            ledger.remove(sequence, found.expires_at)
            committed = ledger.state()
            plan.release(ledger.removed, ledger.dropped_keys(), ledger.names())
            self._commit(run_key, committed, erase=ledger.removed, items=plan.entries(run_key))
            return True

    async def delete_run(self, run_key: str) -> int:
        _check_run_key(run_key)
        return await self._call(self._delete_run, run_key)

    def _delete_run(self, run_key: str) -> int:
        with self._locked(run_key, links=True):
            if os.path.islink(self._run_dir(run_key)):
                self._remove_link(self._run_dir(run_key))
                return 0
            try:
                state = self._read_state(run_key)
            except CorruptCheckpointError as exc:
                logger.warning("file store: deleting run with corrupt record %s: %s", exc.key, exc)
                state = None
            trash = self._move_to_trash(run_key)
            if state is not None and state.run is not None:
                self._unindex(run_key, state.run)
        if trash is not None:
            with _after_commit(trash):
                _remove_tree(trash)
        return _held(state)

    def _remove_link(self, path: str) -> None:
        """Remove a symbolic link in place of a run directory, never what it points to."""
        logger.warning("file store: removing %s, a symbolic link in place of a run directory "
                       "(what it points to is left alone)", path)
        os.unlink(path)
        self._sync_dir(self._runs)

    def _move_to_trash(self, run_key: str) -> str | None:
        """Take the run directory out of ``runs/`` in one rename: the commit of a removal."""
        trash = os.path.join(self._trash, f"{run_key}.{secrets.token_hex(8)}")
        try:
            os.rename(self._run_dir(run_key), trash)
        except FileNotFoundError:
            return None  # no such run
        _INDEXES.forget(self._run_dir(run_key))
        try:
            self._sync_dir(self._runs)
        except OSError:
            # Not known to be durable: put back, so that the failure leaves the run as it was.
            try:
                os.rename(trash, self._run_dir(run_key))
            except OSError as back:
                _log_leftover(trash, back)
                return trash  # out of runs/ for good: the removal stands
            raise
        return trash

    # -- runs ---------------------------------------------------------------------------------

    async def get_run(self, run_key: str, *, now: float) -> RunRecord | None:
        check_time("now", now)
        _check_run_key(run_key)
        return await self._read(run_key, self._get_run, run_key, now)

    def _get_run(self, run_key: str, now: float) -> RunRecord | None:
        def read(files: _Dir) -> _RunState | None:
            return self._checked_state(run_key, None, files=files)

        try:
            state = self._read_settled(run_key, read, read)
        except CorruptCheckpointError:
            # Decided again under the run's lock: a writer in the middle of a commit, or damage.
            with self._locked(run_key):
                files = _Dir(self._run_dir(run_key))
                self._settle(run_key, files)
                try:
                    state = read(files)
                except CorruptCheckpointError as exc:
                    raise self._damaged(exc) from exc
        return _live_run(state, now)

    def _checked_state(
        self, run_key: str, now: float | None, *, files: _Dir | None = None
    ) -> _RunState | None:
        """``run.rec`` unless it is damaged as writers see it (:class:`CorruptCheckpointError`
        naming it): undecodable, missing while checkpoints are in place, or of another
        incarnation than they are. Without ``now`` the files of an expired run are not read."""
        files = _Dir(self._run_dir(run_key)) if files is None else files
        state = files.state()
        self._adoption(run_key, files, state, None, now)
        return state

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
        _check_run_key(run_key)
        status = _check_status(status)
        check_guard_arg(latest_sequence)
        incarnation = cast(str, check_str("incarnation", incarnation))
        return await self._call(self._update_run, run_key, incarnation, version, status, data,
                                now, latest_sequence)

    def _update_run(
        self, run_key: str, incarnation: str, version: int, status: str, data: bytes, now: float,
        latest_sequence: int | None,
    ) -> RunRecord:
        with self._locked(run_key):
            # Appends commit under the same lock, with run.rec: its latest_sequence is the
            # log's (a record behind its log is brought up to date by _current_state).
            state = self._current_state(run_key, None, now)
            run = _live_run(state, now)
            if state is None or run is None:
                raise CheckpointNotFound(f"no live run with key {run_key}")
            if (run.incarnation, run.version) != (incarnation, version):
                raise ConflictError(
                    f"run {run_key} changed concurrently (now {run.incarnation}/{run.version}, "
                    f"expected {incarnation}/{version})"
                )
            check_head(run_key, run.latest_sequence, latest_sequence)
            updated = msgspec.structs.replace(
                run, status=status, data=data, version=version + 1, updated_at=now
            )
            # New marker before the commit, old one after: a crash or a failed unlink leaves a
            # stale marker (filtered by list_runs, removed by purge_expired), never a run
            # without one.
            self._add_markers(_marker_paths(run_key, updated) - _marker_paths(run_key, run))
            self._commit(run_key, msgspec.structs.replace(state, run=updated))
            self._unindex(run_key, run, keep=updated)
            return updated

    def _add_markers(self, markers: Iterable[str]) -> None:
        """Create index markers (paths relative to ``index/``), durably: before a commit."""
        for relative in sorted(markers):
            directory, name = os.path.split(os.path.join(self._index, relative))
            while True:
                self._ensure_dir(directory)
                try:
                    os.close(os.open(os.path.join(directory, name), _MARKER_FLAGS, 0o600))
                    break
                except FileNotFoundError:
                    continue  # purge_expired removed the empty label directory meanwhile
            self._sync_dir(directory)

    def _unindex(self, run_key: str, run: RunRecord, *, keep: RunRecord | None = None) -> None:
        """Remove the markers of ``run`` that ``keep`` (what replaced it) does not have.

        After a commit: a failure leaves a stale marker (logged), which listings skip and
        ``purge_expired`` removes, never a run without one.
        """
        stale = _marker_paths(run_key, run)
        if keep is not None:
            stale -= _marker_paths(run_key, keep)
        for relative in sorted(stale):
            marker = os.path.join(self._index, relative)
            with _after_commit(marker):
                _discard(marker)

    def _index_directories(self, kind: str | None = None) -> list[str]:
        """The index's directories (``"s"``: by status, ``"l"``: by label, ``None``: both)."""
        directories = []
        for name in os.listdir(self._index):
            if name.startswith(("s", "l")):
                if kind is None or name.startswith(kind):
                    directories.append(name)
            else:
                path = os.path.join(self._index, name)
                logger.warning("file store: skipping foreign entry %s", path)
        return directories

    def _markers(self, directories: Iterable[str]) -> list[tuple[str, str]]:
        """``(marker, directory)`` of the runs indexed there, newest created first."""
        markers: list[tuple[str, str]] = []
        for directory in directories:
            try:
                names = os.listdir(os.path.join(self._index, directory))
            except FileNotFoundError:
                continue  # no run ever had this status or label
            for name in names:
                if _MARKER.fullmatch(name):
                    markers.append((name, directory))
                else:
                    path = os.path.join(self._index, directory, name)
                    logger.warning("file store: skipping foreign file %s", path)
        markers.sort(key=lambda found: _listing_key(found[0]))
        return markers

    def _indexed_run(self, marker: str, directory: str, now: float) -> RunRecord | None:
        """The live run a marker stands for, or ``None`` if the marker is stale."""
        run_key = marker[21:]

        def read(files: _Dir) -> _RunState | None:
            return files.state()

        try:
            run = _live_run(self._read_settled(run_key, read, read), now)
        except CorruptCheckpointError as exc:
            logger.warning("file store: skipping run with corrupt record %s: %s", exc.key, exc)
            return None
        if run is None or os.path.join(directory, marker) not in _marker_paths(run_key, run):
            return None
        return run

    async def list_runs(
        self, *, status: str | None, limit: int, cursor: str | None, now: float
    ) -> tuple[list[RunRecord], str | None]:
        check_time("now", now)
        if status is not None:
            status = _check_status(status)
        _check_page(limit, cursor)
        return await self._call(self._list_runs, status, limit, cursor, now)

    def _list_runs(
        self, status: str | None, limit: int, cursor: str | None, now: float
    ) -> tuple[list[RunRecord], str | None]:
        return self._page(self._status_directories(status), limit, cursor, now)

    async def runs_with_label(
        self, label: str, *, limit: int, cursor: str | None, now: float
    ) -> tuple[list[RunRecord], str | None]:
        """Lists ``index/l<hash of the label>/`` and reads ``run.rec`` of the runs it returns
        (and of the stale markers it passes), like ``list_runs``."""
        check_time("now", now)
        check_labels((label,))
        _check_page(limit, cursor)
        return await self._call(self._page, [_label_dir_name(label)], limit, cursor, now)

    def _status_directories(self, status: str | None) -> list[str]:
        return self._index_directories("s") if status is None else [_status_dir_name(status)]

    def _page(
        self, directories: list[str], limit: int, cursor: str | None, now: float
    ) -> tuple[list[RunRecord], str | None]:
        """Live runs indexed in ``directories``, newest created first, after ``cursor``."""
        found: list[RunRecord] = []
        last = ""
        for marker, directory in self._markers(directories):
            if cursor is not None and _listing_key(marker) <= _listing_key(cursor):
                continue
            run = self._indexed_run(marker, directory, now)
            if run is None:
                continue
            if len(found) == limit:
                return found, last  # one more live run exists: hand out a cursor
            found.append(run)
            last = marker
        return found, None

    async def count_runs(self, *, status: str | None, now: float) -> int:
        check_time("now", now)
        if status is not None:
            status = _check_status(status)
        return await self._call(self._count_runs, status, now)

    def _count_runs(self, status: str | None, now: float) -> int:
        markers = self._markers(self._status_directories(status))
        return sum(self._indexed_run(marker, folder, now) is not None for marker, folder in markers)

    # -- items --------------------------------------------------------------------------------

    async def put_items(
        self, run_key: str, items: Sequence[Item], *, create_only: bool = False, now: float
    ) -> None:
        check_flag("create_only", create_only)
        check_time("now", now)
        check_items(items)
        _check_run_key(run_key)
        if items:
            await self._call(self._put_items, run_key, list(items), create_only, now)

    def _put_items(
        self, run_key: str, items: list[Item], create_only: bool, now: float
    ) -> None:
        with self._locked(run_key):
            state = self._state_for_write(run_key)
            plan = self._plan(run_key)
            if create_only:
                taken = [item.key for item in items if plan.kept(item.key, now)]
                if taken:
                    raise ConflictError(f"item {taken[0]!r:.80} already exists in run {run_key}")
            for item in items:
                plan.write(item)
            entries = plan.entries(run_key)
            self._ensure_dir(self._run_dir(run_key))
            # The hint is committed with the items, so purge_expired always finds them.
            earliest = _min_expiry([item.expires_at for item in items])
            hint = earliest if state is None else _earliest(state.items_next_expiry, earliest)
            base = state if state is not None else _RunState()
            updated = msgspec.structs.replace(base, items_next_expiry=hint)
            self._commit(run_key, updated if state is None or updated != state else None,
                         items=entries)

    async def get_items(self, run_key: str, keys: Sequence[str], *, now: float) -> dict[str, bytes]:
        keys = check_keys(keys)
        check_time("now", now)
        _check_run_key(run_key)
        for key in keys:
            _check_item_key(key)
        if not keys:
            return {}
        return await self._call(self._get_items, run_key, list(keys), now)

    def _get_items(self, run_key: str, keys: list[str], now: float) -> dict[str, bytes]:
        def pick(index: _ItemIndex) -> list[_Indexed]:
            found = (index.items.get(key) for key in dict.fromkeys(keys))
            return [item for item in found if item is not None and item.live(now)]

        return dict(self._read_items(run_key, pick))

    def _read_items(
        self, run_key: str, pick: Callable[[_ItemIndex], Sequence[_Indexed]], *,
        skip_corrupt: bool = False,
    ) -> list[tuple[str, bytes]]:
        """The items ``pick`` chooses (:meth:`_Dir.read_items`): lock-free when ``idx`` covers
        every commit of the log, else under the run lock."""
        with self._reader(run_key) as files:
            if files is None:
                return []
            if files.settled():
                with contextlib.suppress(_Unsettled):
                    return files.read_items(pick, skip_corrupt=skip_corrupt)
        with self._locked(run_key):
            files = _Dir(self._run_dir(run_key))
            self._settle(run_key, files)
            return files.read_items(pick, skip_corrupt=skip_corrupt)

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
        check_flag("reverse", reverse)
        prefix = cast(str, check_str("prefix", prefix))
        start_after = check_str("start_after", start_after, optional=True)
        check_limit("limit", limit)
        check_time("now", now)
        _check_run_key(run_key)
        return await self._call(self._scan_items, run_key, prefix, start_after, limit, reverse, now)

    def _scan_items(
        self,
        run_key: str,
        prefix: str,
        start_after: str | None,
        limit: int,
        reverse: bool,
        now: float,
    ) -> list[tuple[str, bytes]]:
        found: list[tuple[str, bytes]] = []
        picked: list[str] = []
        after = start_after

        def pick(index: _ItemIndex) -> list[_Indexed]:
            page = index.page(prefix, after, limit - len(found), reverse, now)
            picked[:] = [item.meta.key for item in page]
            return page

        while True:
            want = limit - len(found)
            read = self._read_items(run_key, pick, skip_corrupt=True)
            found += read
            if len(picked) < want or len(read) == len(picked):
                return found  # no more items, or the page is full
            after = picked[-1]  # damaged items were skipped: fill the page past them

    async def delete_items(self, run_key: str, keys: Sequence[str]) -> int:
        keys = check_keys(keys)
        _check_run_key(run_key)
        for key in keys:
            _check_item_key(key)
        if not keys:
            return 0
        return await self._call(self._delete_items, run_key, list(keys))

    def _delete_items(self, run_key: str, keys: list[str]) -> int:
        with self._locked(run_key):
            plan = self._plan(run_key)
            removed = sum(plan.remove(key) for key in dict.fromkeys(keys))
            self._commit(run_key, None, items=plan.entries(run_key))
            return removed

    # -- maintenance --------------------------------------------------------------------------

    async def purge_expired(self, *, now: float, limit: int) -> tuple[int, bool]:
        check_limit("limit", limit)
        check_time("now", now)
        if limit < 1:
            raise ValidationError(f"limit must be at least 1, got {limit}")
        return await self._call(self._purge_expired, now, limit)

    def _purge_expired(self, now: float, limit: int) -> tuple[int, bool]:
        budget = _Budget(limit)
        self._sweep_trash(budget)
        self._sweep_temp(budget)
        removed = 0
        indexed: dict[str, set[str]] = {}
        for name in sorted(os.listdir(self._runs)):
            if budget.exhausted:
                return removed, False
            if not _RUN_KEY.fullmatch(name):
                logger.warning("file store: skipping foreign entry %s", self._run_dir(name))
                continue
            removed += self._purge_run(name, now, budget, indexed)
        if budget.exhausted:
            return removed, False
        self._sweep_index(indexed, budget)
        return removed, not budget.exhausted

    def _sweep_trash(self, budget: _Budget) -> None:
        """Finish removals that a crash (or a concurrent ``delete_run``) left in ``trash/``."""
        for name in os.listdir(self._trash):
            if budget.exhausted:
                return
            path = os.path.join(self._trash, name)
            try:
                _remove_tree(path)
            except OSError as exc:  # one entry never stops the others, nor the purge
                logger.warning("file store: removing %s failed, left for a later sweep: %s",
                               exc.filename or path, exc.strerror or exc)
            budget.spend(1)

    def _sweep_temp(self, budget: _Budget) -> None:
        """Remove temp files of crashed writers: a temp file whose run lock is free is stale."""
        for name in os.listdir(self._tmp):
            if budget.exhausted:
                return
            path = os.path.join(self._tmp, name)
            match = _TEMP.fullmatch(name)
            if match is None:
                logger.warning("file store: skipping foreign file %s", path)
                continue
            with self._locked(match[1], blocking=False, links=True) as locked:
                if not locked or in_use(path):
                    continue  # a writer of that run is at work (a compaction copies unlocked)
                if _discard(path):
                    logger.warning("file store: removed %s left by an interrupted write", path)
                    budget.spend(1)

    def _purge_run(
        self, run_key: str, now: float, budget: _Budget, indexed: dict[str, set[str]]
    ) -> int:
        """Purge one run; returns checkpoints removed. Records the markers of a live run."""
        if os.path.islink(self._run_dir(run_key)):
            logger.warning("file store: skipping %s, a symbolic link in place of a run "
                           "directory (never followed; delete_run removes it)",
                           self._run_dir(run_key))
            return 0
        try:
            state = self._read_state(run_key)
        except CorruptCheckpointError as exc:
            logger.warning("file store: skipping run with corrupt record %s: %s", exc.key, exc)
            return 0
        run = _live_run(state, now)
        if run is not None:
            indexed[run_key] = _marker_paths(run_key, run)
        if state is not None and not self._purge_due(run_key, state, now):
            return 0
        # Due, or a directory without run.rec: decide again under the lock, by a record that
        # counts every checkpoint in place (an old one might call live ones expired).
        with self._locked(run_key):
            try:
                state = self._current_state(run_key, None, now)
            except CorruptCheckpointError as exc:
                logger.warning("file store: skipping run with corrupt record %s: %s", exc.key, exc)
                return 0
            if state is None or (state.run is not None and not is_live(state.run.expires_at, now)):
                return self._purge_whole_run(run_key, state, budget)
            if not self._purge_due(run_key, state, now):
                return 0
            return self._purge_inside_run(run_key, state, now, budget)

    def _purge_due(self, run_key: str, state: _RunState, now: float) -> bool:
        """Something of the run expired."""
        if state.run is not None and not is_live(state.run.expires_at, now):
            return True
        if state.run is not None and state.expiring and state.expiring[0][0] <= now:
            return True
        return _due(state.items_next_expiry, now)

    def _purge_whole_run(self, run_key: str, state: _RunState | None, budget: _Budget) -> int:
        """Remove an expired or emptied run, or a run directory that no write ever committed
        (one with checkpoints but no record is refused earlier, by ``_current_state``)."""
        trash = self._move_to_trash(run_key)
        if state is not None and state.run is not None:
            self._unindex(run_key, state.run)
        if trash is None:
            return 0  # removed by a concurrent purge or delete_run
        if state is None:
            logger.warning("file store: removed %s left by an interrupted first write", trash)
        with _after_commit(trash):
            _remove_tree(trash)
        removed = _held(state)
        budget.spend(max(removed, 1))
        return removed

    def _purge_inside_run(self, run_key: str, state: _RunState, now: float, budget: _Budget) -> int:
        """Remove the due checkpoints and items of a live run (or of an items-only one), in
        one commit."""
        plan = self._plan(run_key)
        removed: list[int] = []
        committed = state
        if state.run is not None:
            ledger = _Ledger(state, state.run, plan.index)
            ledger.remove_expired(now, limit=budget.left)
            budget.spend(len(ledger.removed))
            removed = ledger.removed
            committed = ledger.state()
            plan.release(removed, ledger.dropped_keys(), ledger.names())
        if _due(committed.items_next_expiry, now) and not budget.exhausted:
            hint = plan.remove_expired(now, budget)
            committed = msgspec.structs.replace(committed, items_next_expiry=hint)
        entries = plan.entries(run_key)
        emptied = committed.run is None and not plan.holds_items()  # before readers move on
        if committed != state or entries.removes:
            self._commit(run_key, committed if committed != state else None, erase=removed,
                         items=entries)
        if emptied:
            self._purge_whole_run(run_key, committed, budget)  # an items-only run, now empty
        return len(removed)

    def _sweep_index(self, indexed: dict[str, set[str]], budget: _Budget) -> None:
        """Remove markers that a crash (in update_run, or between a run's first marker and
        its commit), or an unreadable deleted run, left; and empty label directories, which
        would otherwise pile up with every label ever used."""
        directories = self._index_directories()
        markers = self._markers(directories)
        used = {directory for _, directory in markers}
        for directory in directories:
            if budget.exhausted:
                return
            if directory.startswith("l") and directory not in used:
                budget.spend(1)
                _remove_empty_dir(os.path.join(self._index, directory))
        for marker, directory in markers:
            run_key = marker[21:]
            if budget.exhausted:
                return
            if os.path.join(directory, marker) in indexed.get(run_key, ()):
                continue
            with self._locked(run_key, links=True):
                if self._marker_is_stale(run_key, marker, directory):
                    _discard(os.path.join(self._index, directory, marker))
                    budget.spend(1)

    def _marker_is_stale(self, run_key: str, marker: str, directory: str) -> bool:
        if os.path.islink(self._run_dir(run_key)):
            return False  # logged by the run pass; its marker stays until it is removed
        try:
            state = self._read_state(run_key)
        except CorruptCheckpointError:
            return False  # logged by the run pass; its marker stays until it is repaired
        run = state.run if state is not None else None
        return run is None or os.path.join(directory, marker) not in _marker_paths(run_key, run)

    # -- repair -------------------------------------------------------------------------------

    async def damaged_runs(self, *, run_key: str | None = None, now: float) -> list[RunDamage]:
        """Runs whose ``run.rec`` cannot be decoded, is missing (or holds no run) while
        checkpoints are in place, or belongs to another incarnation than they do. A record
        behind its log is not damaged: the run's next writer brings it up to date. Reads every
        ``run.rec``, every checkpoint head of a damaged or expired run, and the items of every
        run, whose item entries no held checkpoint owns it removes (:meth:`_remove_orphans`)."""
        check_time("now", now)
        if run_key is not None:
            _check_run_key(run_key)
        return await self._call(self._damaged_runs, run_key, now)

    def _damaged_runs(self, run_key: str | None, now: float) -> list[RunDamage]:
        if run_key is not None:
            keys = [run_key]
        else:
            keys = sorted(name for name in os.listdir(self._runs) if _RUN_KEY.fullmatch(name))
        found: list[RunDamage] = []
        for key in keys:
            if os.path.islink(self._run_dir(key)):
                found.append(RunDamage(
                    run_key=key, key=self._run_dir(key), problem=_problem(
                        _symbolic_link(self._run_dir(key))), checkpoints=0, newest=None))
                continue
            self._remove_orphans(key)
            if self._damage(key, now) is None:
                continue  # the common case, decided without waiting for the run's writer
            with self._locked(key):
                damage = self._damage(key, now)
            if damage is not None:
                found.append(damage)
        return found

    def _remove_orphans(self, run_key: str) -> None:
        """Remove the item entries of the run whose metadata is damaged and names an owner
        the log no longer holds (:meth:`_ItemIndex.orphaned`): no checkpoint can read them.
        Looked for without the run lock; removed in one commit holding it."""
        with self._reader(run_key) as files:
            if files is None:
                return
            try:
                got = files.items()
            except _Unsettled:
                pass  # looked for under the lock
            except CorruptCheckpointError:
                return  # the log itself is unreadable (:meth:`_damage` reports it)
            else:
                if got is None:
                    return
                with take(got[1].lock):
                    if not got[1].orphans():
                        return
        with self._locked(run_key):
            try:
                plan = self._plan(run_key)
            except CorruptCheckpointError:
                return
            orphans = [] if plan.index is None else plan.index.orphans()
            if not orphans:
                return
            self._commit(run_key, None, items=plan.entries(run_key))
        files = _Dir(self._run_dir(run_key))
        for entry in orphans:
            logger.warning("file store: removed item entry %s: its metadata is damaged and "
                           "names a checkpoint the run no longer holds", files.record_key(entry))

    def _damage(self, run_key: str, now: float) -> RunDamage | None:
        files = _Dir(self._run_dir(run_key))
        try:
            keep = self._checked_state(run_key, now)
        except CorruptCheckpointError as exc:
            keep, problem = None, _problem(exc)
        else:
            if keep is not None and keep.run is not None:
                return None
            problem = "run.rec is missing" if keep is None else "run.rec holds no run record"
        try:
            heads = self._log_heads(run_key, files, keep)
        except CorruptCheckpointError as exc:  # the log itself (its header) is unreadable
            return RunDamage(run_key=run_key, key=exc.key, problem=_problem(exc), checkpoints=0,
                             newest=None)
        if not heads and (keep is not None or not files.has_record(RUN)):
            return None  # a run of items only, or no run at all
        return RunDamage(
            run_key=run_key,
            key=files.record_key(RUN),
            problem=problem,
            checkpoints=len(heads),
            newest=header_of(heads[-1]) if heads else None,
        )

    async def rebuild_run(self, run_key: str, seed: RunRecord, *, now: float) -> RunRecord:
        """Commits a new ``run.rec`` (and adds the index marker); checkpoints are only read."""
        if not isinstance(seed, RunRecord):  # its incarnation is the log's, not the seed's
            raise ValidationError(f"seed must be a RunRecord, got {type(seed).__name__}")
        check_time("now", now)
        _check_run_key(run_key)
        _check_status(seed.status)
        return await self._call(self._rebuild_run, run_key, seed, now)

    def _rebuild_run(self, run_key: str, seed: RunRecord, now: float) -> RunRecord:
        with self._locked(run_key):
            files = _Dir(self._run_dir(run_key))
            keep: _RunState | None = None
            old: RunRecord | None = None
            try:
                keep = self._checked_state(run_key, now)
            except CorruptCheckpointError:  # damaged: the log alone decides
                with contextlib.suppress(CorruptCheckpointError):
                    # Readable: another life's or run's, whose marker goes.
                    damaged = files.state(foreign=True)
                    old = damaged.run if damaged is not None else None
            if keep is not None and keep.run is not None:
                raise ConflictError(f"the run record of run key {run_key} is not damaged")
            rebuilt = self._rebuilt(run_key, files, keep, seed, now)
            if rebuilt is None or rebuilt.run is None:
                raise CheckpointNotFound(
                    f"run key {run_key} holds no intact checkpoint to rebuild its record from"
                )
            self._commit_rebuilt(run_key, old, rebuilt)
            logger.info(
                "file store: rebuilt %s from %d checkpoints",
                files.record_key(RUN),
                rebuilt.run.checkpoint_count,
            )
            return rebuilt.run

    async def aclose(self) -> None:
        """Nothing to release: the store holds no descriptor between operations."""


def _check_append(
    run_key: str, record: StoredCheckpoint, seed: RunRecord, keep_latest: int | None,
    items: Sequence[Item] = (),
) -> int | None:
    """What every append checks before it takes the run's lock; ``keep_latest`` as a plain
    ``int``."""
    _check_run_key(run_key)
    check_append(run_key, record, seed, items)
    _check_status(seed.status)
    keep_latest = check_keep_latest(keep_latest)
    _check_record_size(record, seed)
    return keep_latest


def _check_record_size(record: StoredCheckpoint, seed: RunRecord) -> None:
    size = len(record.header) + len(record.payload) + sum(
        len(name.encode()) for name in (*record.refs, *seed.labels))
    if size > _MAX_RECORD:
        raise ValidationError(
            f"checkpoint of {size} bytes: the file store holds at most {_MAX_RECORD} per "
            "checkpoint")


def _renumbered(
    renumber: Callable[[int], StoredCheckpoint], sequence: int, seed: RunRecord
) -> StoredCheckpoint:
    """The checkpoint ``renumber`` makes for ``sequence``, checked as an append's is."""
    record = renumbered(renumber, sequence)
    _check_record_size(record, seed)
    return record


def _check_sequence(
    run_key: str, record: StoredCheckpoint, seed: RunRecord, current: RunRecord | None
) -> None:
    if current is None:
        if record.sequence != 0:
            raise SequenceConflict(
                f"run {run_key} has no live record: only sequence 0 can start it",
                latest_sequence=None,
                incarnation=None,
            )
        return
    if record.sequence != current.latest_sequence + 1 or seed.incarnation != current.incarnation:
        raise SequenceConflict(
            f"run {run_key} is at sequence {current.latest_sequence}",
            latest_sequence=current.latest_sequence,
            incarnation=current.incarnation,
        )


def _check_page(limit: int, cursor: str | None) -> None:
    if cursor is not None and (type(cursor) is not str or not _MARKER.fullmatch(cursor)):
        raise ValidationError(f"not a run listing cursor of the file store: {shown(cursor)}")
    check_limit("limit", limit, minimum=1)


def _appended_items(record: StoredCheckpoint, items: Sequence[Item]) -> list[Item]:
    """The items appended with ``record``, the first of each key; owned ones expire with it,
    shared ones live while a checkpoint names them."""
    appended: dict[str, Item] = {}
    for item in items:
        _check_item_key(item.key)
        expires_at = record.expires_at if item.owner is not None else None
        appended.setdefault(item.key, msgspec.structs.replace(item, expires_at=expires_at))
    return list(appended.values())


def _owned_items(items: Sequence[Item], owner: int) -> list[Item]:
    for item in items:
        _check_item_key(item.key)
        if item.owner != owner:
            raise ValidationError(
                f"item {item.key[:40]!r} is owned by {item.owner}, not by checkpoint {owner}"
            )
    return list(items)


def _check_refs_held(
    run_key: str, sequence: int, plan: _Plan, keys: Sequence[str], now: float, *,
    gone: Collection[str] = (), new_life: bool = False,
) -> None:
    """Refuse (before anything is written) refs naming items the run does not hold: a key in
    ``gone`` (going with an earlier life), or with no live item in place (for a new life, no
    live loose item), is not held."""
    def held(key: str) -> bool:
        found = plan.found(key)
        return (key not in gone and found is not None and not found.damaged
                and found.live(now) and not (new_life and found.meta.owner is not None))

    missing = [key for key in keys if not held(key)]
    if missing:
        raise unheld_refs(run_key, sequence, missing)


def _held_checkpoint(
    files: _Dir, view: _View, sequence: int, now: float
) -> tuple[StoredCheckpoint, str] | None:
    if not view.holds(sequence):
        return None
    found = files.checkpoint(sequence, now)
    return None if found is None else (found, view.status)


def _items_of(files: _Dir, record: StoredCheckpoint, now: float) -> dict[str, bytes]:
    """The live items ``record`` owns, those its refs name and those nested under them: one
    bisection per ref in the item index, and one read per item."""
    def pick(index: _ItemIndex) -> list[_Indexed]:
        unknown = index.suspected(record.sequence)
        if unknown is not None:
            raise CorruptCheckpointError(
                "an item entry whose metadata is damaged may be one of this checkpoint's "
                "items (its key and owner cannot be trusted)", key=files.record_key(unknown))
        keys = [*sorted(index.owned.get(record.sequence, ())), *record.refs]
        for ref in dict.fromkeys(record.refs):
            keys += [key for key in index.nested(ref) if index.items[key].meta.owner is None]
        found = (index.items.get(key) for key in dict.fromkeys(keys))
        return [item for item in found if item is not None and item.live(now)]

    return dict(files.read_items(pick))


def _live_run(state: _RunState | None, now: float) -> RunRecord | None:
    if state is None or state.run is None or not is_live(state.run.expires_at, now):
        return None
    return state.run


def _min_expiry(expiries: Sequence[float | None]) -> float | None:
    earliest: float | None = None
    for expiry in expiries:
        earliest = _earliest(earliest, expiry)
    return earliest


def _held(state: _RunState | None) -> int:
    return 0 if state is None or state.run is None else state.run.checkpoint_count


class FileCheckpointStore(FileStore):
    """FastAgentic's name and constructor for the file store: ``FileCheckpointStore(base_path)``."""

    def __init__(self, base_path: str | os.PathLike[str], **options: Any) -> None:
        super().__init__(base_path, **options)

    @property
    def base_path(self) -> Path:
        """The store's directory, as FastAgentic's store exposes it."""
        return Path(self._root)
