"""File store: one directory on a local filesystem, crash-safe, shared by processes of one host.

Layout under the root (directories 0700, files 0600)::

    runs/<run key>/log              the run's records, appended in commits (``_file_log``):
                                    ``run.rec`` (run record + bookkeeping, msgpack, CRC-32;
                                    its body: the reference counts of shared items),
                                    ``c/<sequence>`` (one per checkpoint: framing, metadata
                                    with its refs and the run's labels, header, payload),
                                    one entry per item (framing, key, owner, expiry, entry
                                    number, value) and the count of item entries handed out
    runs/<run key>/idx              where each record's newest entry is (a checked cache)
    runs/<run key>/i/k<key>         a copy of each item's entry; <key> is base32hex of the
                                    UTF-8 key
    runs/<run key>/o/<sequence:020>/k<key>   empty markers: items owned by that checkpoint
    runs/<run key>/n/k<K>/k<nested key>  empty markers: items nested under the item <K>
    runs/<run key>/items.state      1 while a writer changes the three above, else 0
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
they replace; a removal of items commits the removal of their entries. The item files and the
markers are copies for reads, written before the commit (files in ``tmp/``, renamed into
place) and never synced, so a write of any number of items costs one sync. After a crash of
the machine they may be lost, torn or old; ``idx`` names the boot it was written in, and the
first holder of the run lock that finds it not written in this boot (or missing, or damaged)
makes them all again from the log before it writes a new one (O(items of the run), once).
So it does when ``items.state`` (one byte, set by a writer before it touches the files and
cleared when its operation ends well) says a writer died among them. Readers of items that
find either read through that lock. Writers also take an item file for the run's item only
when the log holds the entry it names. ``fsync=False`` skips every sync.

Shared items (``SupportsSharedItems``): ``run.rec``'s body counts, per item key, the held
checkpoints whose ``refs`` name it, and lists the held checkpoints that have refs; writers read
it, readers never do. An append writes its items' files first (owner markers, item files),
then commits their entries with the checkpoint: a checkpoint that can be seen has its items in
place. A removed checkpoint's refs, read from its head before the commit, are released in the
same commit; keys no held checkpoint names any more are listed as ``dropping`` and removed
afterwards (again by the next writer or ``purge_expired`` if that failed). So are the owned
items of removed checkpoints (``removing`` lists those whose items may be left). The counts
are rebuilt from the checkpoints' refs whenever ``run.rec`` is.

Nested items (``SupportsNestedItems``): an item written under ``K + "/"`` while ``K`` holds an
item (in place or in the same batch) gets an empty marker ``n/k<K>/<its name>`` (before the
item) for each such ``K`` its key is under; keys that hold no item
(``w/<sequence>/...``) get none. Reads look for the marker directory of each ref (one
``faccessat``) and list only those, so a read never lists the run's items. Removing a shared
item removes what its markers name in the same cleanup after the commit, markers last, so a
marker left keeps the key in ``dropping`` for the next writer or ``purge_expired``; a dropped
key written again first loses what was left under it; ``delete_items`` removes an item, then
its markers. Items written under ``K + "/"`` before ``K`` holds an item are not marked until
the first marker under ``K`` is made, which marks them too (base32hex names sort like the keys
they encode, so they are one slice of the run's sorted item names).

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
import binascii
import bisect
import contextlib
import enum
import errno
import fcntl
import functools
import hashlib
import logging
import math
import os
import re
import secrets
import stat
import struct
import threading
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, ParamSpec, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import anyio
import anyio.to_thread
import msgspec

from fastcheckpoint import _ids
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
    check_keep_latest,
    check_labels,
    check_options,
    check_shared_items,
    header_of,
    is_live,
    item_key_bytes,
    key_successor,
    nested_prefix,
    refs_to_find,
    unheld_refs,
)
from fastcheckpoint.stores._file_log import (
    LOG,
    MAX_DATA,
    MIN_KEY,
    RUN,
    CommitLeftInLog,
    LogView,
    LogWriter,
    in_use,
    open_view,
    pread,
)

__all__ = ["MAX_ITEM_KEY_BYTES", "FileCheckpointStore", "FileStore", "parse_file_url"]

logger = logging.getLogger("fastcheckpoint.stores.file")

_P = ParamSpec("_P")
_T = TypeVar("_T")
_ItemsUse = Literal["need", "try", "skip"]

# MAX_ITEM_KEY_BYTES (128) also keeps an item's base32hex file name within 255 bytes.
_MAX_STATUS_BYTES = 64

_RUN_KEY = re.compile(r"[a-z2-7]{24}")
_MARKER = re.compile(r"([0-9]{20})-([a-z2-7]{24})")
_TEMP = re.compile(r"([a-z2-7]{24})\.[0-9a-f]{16}")
_STAMP_MAX = 10**20 - 1

_RUN_FILE = "run.rec"
_CHECKPOINTS = "c"
_ITEMS = "i"
_ITEMS_STATE = "items.state"
"""One byte, unsynced: 1 while a writer changes item files (left so when it dies), else 0."""
_CLEAN, _DIRTY = b"\0", b"\1"
_OWNERS = "o"
_NESTED = "n"

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
_DIR_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY
_MARKER_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
# A symlink or a file where a directory belongs: the layout was tampered with, not an I/O fault.
_LAYOUT_ERRNOS = frozenset({errno.ELOOP, errno.ENOTDIR})


class _Shared(msgspec.Struct, frozen=True, kw_only=True):
    """The body of ``run.rec``: what keeps the run's shared items exact. Only writers read it,
    so a run naming many shared items costs its readers nothing."""

    counts: dict[str, int] = msgspec.field(default_factory=dict)
    """Key of each shared item named by held checkpoints -> how many of them name it."""
    referring: tuple[int, ...] = ()
    """Held checkpoints with ``refs``, ascending: only their heads are read when removed."""


_NO_SHARED = _Shared()


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
    removing: tuple[int, ...] = ()
    """Removed checkpoints whose files may still be there: hidden from reads, unlinked after
    the commit, and again by the next writer if that failed."""
    items_next_expiry: float | None = None
    """No item expires before this (a lower bound; ``None``: none expires)."""
    dropping: tuple[str, ...] = ()
    """Keys of shared items no held checkpoint names any more, whose files may still be
    there: unlinked after the commit, and again by the next writer if that failed."""
    shared: _Shared | None = None
    """The record's body, as writers read it; ``None`` as readers see the record (they never
    read the body). Never encoded with the rest."""


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
    """The log key of the entry that holds this item (its file is a copy of it)."""


_ENCODER = msgspec.msgpack.Encoder()
_STATE_DECODER = msgspec.msgpack.Decoder(_RunState)
_SHARED_DECODER = msgspec.msgpack.Decoder(_Shared)
_CHECKPOINT_DECODER = msgspec.msgpack.Decoder(_CheckpointMeta)
_ITEM_DECODER = msgspec.msgpack.Decoder(_ItemMeta)


class _Entries(NamedTuple):
    """What a commit holds for the items an operation writes (their files already in place):
    an entry per item and the count of entries handed out, the removal of the entries they
    replace, and, per item, the entry its key held before (``None``: none), to put back."""

    puts: list[tuple[int, bytes]]
    removes: list[int]
    replaced: list[tuple[str, int | None]]


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
    if not isinstance(run_key, str) or not _RUN_KEY.fullmatch(run_key):
        raise ValidationError(f"not a run key (24 characters of [a-z2-7]): {run_key!r:.80}")
    return run_key


def _b32hex(raw: bytes) -> str:
    # base32hex keeps byte order (its alphabet is ascending), so names sort like UTF-8 keys,
    # i.e. in code point order; lowercase so case-insensitive filesystems cannot collide them.
    return base64.b32hexencode(raw).decode("ascii").rstrip("=").lower()


def _item_name(key: object) -> str:
    return "k" + _b32hex(item_key_bytes(key, MAX_ITEM_KEY_BYTES, "the file store"))


def _key_of_name(name: str) -> str | None:
    """The item key a file name encodes, or ``None`` for a name this store never writes."""
    if not name.startswith("k"):
        return None
    encoded = name[1:]
    try:
        raw = base64.b32hexdecode(encoded.upper() + "=" * (-len(encoded) % 8))
        key = raw.decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    return key if "k" + _b32hex(raw) == name else None


def _nested_names(names: Sequence[str], key: str) -> Sequence[str]:
    """The names among ``names`` (sorted) that encode keys nested under ``key``: names sort
    like the keys they encode, so the key range ``[K + "/", successor)`` is one slice."""
    prefix = nested_prefix(key)
    low = "k" + _b32hex(prefix.encode("utf-8"))
    high = "k" + _b32hex(key_successor(prefix).encode("utf-8"))
    start = bisect.bisect_left(names, low)
    return names[start : bisect.bisect_left(names, high, lo=start)]


def _prefixes(key: str) -> Iterator[str]:
    """The keys ``key`` is nested under if items hold them: each part before a ``"/"``."""
    end = key.find(NESTING)
    while end != -1:
        yield key[:end]
        end = key.find(NESTING, end + 1)


def _sequence_name(sequence: int) -> str:
    return f"{sequence:020d}"


def _sequence_of_name(name: str) -> int | None:
    return int(name) if len(name) == 20 and name.isascii() and name.isdigit() else None


def _status_dir_name(status: str) -> str:
    return "s" + _b32hex(status.encode("utf-8"))


def _label_dir_name(label: str) -> str:
    # A hash: labels take up to 256 bytes, too long for a file name once encoded. Listings
    # check the run's own labels, so a collision would only cost a record read.
    return "l" + _b32hex(hashlib.blake2b(label.encode("utf-8"), digest_size=20).digest())


def _check_status(status: object) -> str:
    if not isinstance(status, str):
        raise ValidationError(f"run status must be a str, got {type(status).__name__}")
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
    to commit, with the count and the run's expiry recomputed from what the run still holds,
    and the shared items' reference counts after the added and released checkpoints.
    """

    def __init__(
        self,
        state: _RunState,
        run: RunRecord,
        leftovers: Sequence[int],
        dropping: Sequence[str] = (),
    ) -> None:
        assert state.shared is not None, "a writer's run.rec is read with its body"
        self.base = state
        self.run = run
        self.low = state.low
        self.immortal = state.immortal
        self.expiring = list(state.expiring)
        self.removed: list[int] = []
        """Checkpoints this operation removes: their records go in its commit."""
        self.erase: list[int] = []
        """Records of an earlier life's checkpoints, removed by the same commit."""
        self.owning: set[int] = set()
        """Those of ``removed`` that own items: carried in ``removing`` until they are gone."""
        self.leftovers = list(leftovers)
        """Removed earlier, owned items still there: carried in ``removing`` until they are
        gone."""
        self.counts = dict(state.shared.counts)
        self.referring = set(state.shared.referring)
        self.dropping = set(dropping)
        """Shared items dropped earlier whose files are still there (a failed unlink)."""
        self.dropped: list[str] = []
        """Shared items this operation drops: unlinked after its commit."""

    @property
    def held(self) -> int:
        return self.immortal + len(self.expiring)

    def hidden(self) -> set[int]:
        return {*self.removed, *self.leftovers}

    def add(self, sequence: int, expires_at: float | None, refs: Sequence[str] = ()) -> None:
        if expires_at is None:
            self.immortal += 1
        else:
            bisect.insort(self.expiring, (expires_at, sequence))
        if refs:
            self.referring.add(sequence)
        for key in dict.fromkeys(refs):
            self.counts[key] = self.counts.get(key, 0) + 1
            self.dropping.discard(key)

    def releasing(self) -> list[int]:
        """Removed checkpoints whose refs are still counted: :meth:`release` each."""
        return [sequence for sequence in self.removed if sequence in self.referring]

    def release(self, sequence: int, refs: Sequence[str]) -> None:
        """A removed checkpoint's refs no longer count; items none names any more drop."""
        self.referring.discard(sequence)
        for key in dict.fromkeys(refs):
            count = self.counts.get(key, 0) - 1
            if count > 0:
                self.counts[key] = count
            elif self.counts.pop(key, None) is not None:
                self.dropped.append(key)

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
        gone = set(self.removed)
        low = self.low
        while low in gone:
            low += 1
        if self.immortal == 0:
            # Only checkpoints that expire are held, and the index knows all of them.
            lowest = min((sequence for _, sequence in self.expiring), default=None)
            low = max(low, self.run.latest_sequence + 1 if lowest is None else lowest)
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
            removing=tuple(sorted({*self.leftovers, *self.owning})),
            dropping=tuple(sorted({*self.dropping, *self.dropped} - self.counts.keys())),
            shared=_Shared(counts=self.counts, referring=tuple(sorted(self.referring))),
        )


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
    """``run.rec``: the state as metadata, the shared items' bookkeeping as the body."""
    assert state.shared is not None, "a run.rec read without its body is never written back"
    meta = _ENCODER.encode(msgspec.structs.replace(state, shared=None))
    shared = state.shared
    body = _ENCODER.encode(shared) if shared.counts or shared.referring else b""
    return _frame(_RUN_MAGIC, meta, b"", body)


def _item_bytes(item: Item, entry: int) -> bytes:
    """An item as its log entry ``entry`` and its file hold it."""
    meta = _ENCODER.encode(_ItemMeta(item.key, item.owner, item.expires_at, entry))
    return _frame(_ITEM_MAGIC, meta, b"", item.value)


def _pread_exact(fd: int, size: int, offset: int, path: str) -> bytes:
    data = pread(fd, size, offset)
    if len(data) < size:
        raise CorruptCheckpointError("file ends early (truncated)", key=path)
    return data


def _read_frame(fd: int, path: str, magic: bytes, *, whole: bool) -> _Frame:
    """Check and split a record file; reads only the head area unless ``whole``."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise CorruptCheckpointError("not a regular file", key=path)
    data = _pread_exact(fd, info.st_size if whole else min(info.st_size, _PEEK_BYTES), 0, path)
    return _parse_frame(
        data, info.st_size, path, magic, whole=whole,
        more=lambda size: data + _pread_exact(fd, size - len(data), len(data), path))


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


def _decode(decoder: msgspec.msgpack.Decoder[_T], data: bytes, path: str) -> _T:
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise CorruptCheckpointError(f"undecodable record metadata: {exc}", key=path) from exc


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
        self.items_changing = False
        """Whether the operation marked the item files as being changed (cleared when it
        ends well)."""
        self.items_failed = False
        """Whether the item files could not be made again from the log when the lock was
        taken: they stay marked, and nothing may go by them."""

    def view(self) -> LogView | None:
        if not self._opened:
            self._view, self._opened = open_view(self.path, writable=True), True
        return self._view

    def forget(self) -> None:
        if self._view is not None:
            self._view.close()
        self._view, self._opened = None, False


class _HeldLogs(threading.local):
    def __init__(self) -> None:
        self.by_path: dict[str, _HeldLog] = {}


_HELD = _HeldLogs()
"""Per thread: the logs of the runs whose lock it holds (an operation runs in one thread)."""


class _Dir:
    """A run directory to read from: its item files, and the records of its log (``run.rec``
    and one per checkpoint). Through an open descriptor when one is given; then the log is
    opened once and held until :meth:`close`. Under the run's lock the log the operation
    holds is used."""

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

    def path_of(self, relative: str) -> str:
        return os.path.join(self.path, relative)

    def record_key(self, key: int) -> str:
        """How errors and logs name a record of the run's log."""
        return f"{self.path}/{LOG}:{_record_name(key)}"

    def open(self, relative: str) -> int | None:
        """A read descriptor for a file of the run directory (an item's), ``None`` if
        absent."""
        target = relative if self.fd is not None else self.path_of(relative)
        try:
            return os.open(target, _READ_FLAGS, dir_fd=self.fd)
        except FileNotFoundError:
            return None  # absent items are normal: never written, removed or deleted
        except OSError as exc:
            if exc.errno in _LAYOUT_ERRNOS:
                raise CorruptCheckpointError(
                    f"not a record file ({os.strerror(exc.errno)})", key=self.path_of(relative)
                ) from exc
            raise

    def read(self, relative: str, magic: bytes, *, whole: bool) -> _Frame | None:
        fd = self.open(relative)
        if fd is None:
            return None
        try:
            return _read_frame(fd, self.path_of(relative), magic, whole=whole)
        finally:
            os.close(fd)

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

            def more(wanted: int) -> bytes:  # the same entry, further (its bytes never change)
                assert view is not None
                assert found is not None
                again = view.read_sized(key, wanted, at=found.at)
                assert again is not None
                return again.data

            return _parse_frame(found.data, found.size, self.record_key(key), magic,
                                whole=whole, more=more, what="record")
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

    def items_current(self) -> bool:
        """Whether the item files and markers can be read as they are: written unsynced, they
        are known to copy the log only where ``idx`` was written since this boot (a writer
        makes them again from the log before it writes an ``idx`` that was not) and no writer
        died while it changed them or failed to make them again (``items.state``)."""
        if self.items_changing():
            return False
        view, temporary = self._log()
        try:
            return view is None or view.current
        finally:
            if temporary and view is not None:
                view.close()

    def items_changing(self) -> bool:
        """Whether ``items.state`` says a writer is changing the item files (or died doing
        so, or could not make them again)."""
        fd = self.open(_ITEMS_STATE)
        if fd is None:
            return False
        try:
            return os.pread(fd, 1, 0) == _DIRTY
        finally:
            os.close(fd)

    def committed_item(self, name: str) -> _ItemMeta | None:
        """The item file ``name``, if the log holds the entry it copies: a writer's check
        (under the run lock), since a crash between an item's file and the commit of its
        entry leaves a file that is not the run's item. ``None`` for a corrupt file too."""
        try:
            found = self.item(name, whole=False)
        except CorruptCheckpointError as exc:
            logger.warning("file store: replacing corrupt item %s: %s", exc.key, exc)
            return None
        if found is None:
            return None
        meta = found[0]
        try:
            frame = self.record(meta.entry, _ITEM_MAGIC, whole=False)
            logged = None if frame is None else _decode(
                _ITEM_DECODER, frame.meta, self.record_key(meta.entry))
        except CorruptCheckpointError:
            return None  # damaged in the log: written anew, so it is again
        return meta if logged == meta else None

    def listdir(self, relative: str) -> list[str]:
        """Names in a subdirectory; empty when it does not exist."""
        try:
            if self.fd is None:
                return os.listdir(self.path_of(relative))
            fd = os.open(relative, _DIR_FLAGS, dir_fd=self.fd)
        except FileNotFoundError:
            return []  # created lazily: no item was ever written there
        try:
            return os.listdir(fd)
        finally:
            os.close(fd)

    def exists(self, relative: str) -> bool:
        # faccessat: a miss (the common answer) raises no exception, a third of a failed stat.
        target = relative if self.fd is not None else self.path_of(relative)
        return os.access(target, os.F_OK, dir_fd=self.fd, follow_symlinks=False)

    def state(self, *, whole: bool = False) -> _RunState | None:
        """``run.rec``; with its body (the shared items' bookkeeping) only when ``whole``."""
        frame = self.record(RUN, _RUN_MAGIC, whole=whole)
        if frame is None:
            return None
        path = self.record_key(RUN)
        state = _decode(_STATE_DECODER, frame.meta, path)
        if frame.body is None:
            return state
        shared = _decode(_SHARED_DECODER, frame.body, path) if frame.body else _NO_SHARED
        return msgspec.structs.replace(state, shared=shared)

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

    def item(self, name: str, *, whole: bool) -> tuple[_ItemMeta, bytes | None] | None:
        relative = f"{_ITEMS}/{name}"
        frame = self.read(relative, _ITEM_MAGIC, whole=whole)
        if frame is None:
            return None
        path = self.path_of(relative)
        meta = _decode(_ITEM_DECODER, frame.meta, path)
        if _item_name(meta.key) != name:
            raise CorruptCheckpointError(f"holds item {meta.key!r:.80}", key=path)
        return meta, frame.body


# -- how reads see a run ----------------------------------------------------------------------

_UNKNOWN_STATUS = "active"
"""Reported for a run read by its log alone: its real status lived in the damaged record."""


class _View(NamedTuple):
    """What a read goes by: the range ``run.rec`` describes (extended over checkpoints it is
    behind), or the checkpoint records in the log when there is no usable record."""

    status: str
    top: int
    low: int
    hidden: tuple[int, ...]
    listed: tuple[int, ...] | None = None
    """Sequences of the checkpoint records, newest first, when the read goes by the log alone."""

    def candidates(self, before: int | None = None) -> Iterator[int]:
        """Sequences that may hold a checkpoint, newest first, below ``before``."""
        if self.listed is not None:
            return (s for s in self.listed if before is None or s < before)
        top = self.top if before is None else min(before - 1, self.top)
        return (s for s in range(top, self.low - 1, -1) if s not in self.hidden)

    def holds(self, sequence: int) -> bool:
        if self.listed is not None:
            return sequence in self.listed
        return self.low <= sequence <= self.top and sequence not in self.hidden


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
    return True, _View(run.status, run.latest_sequence, state.low, state.removing)


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
        return _View(run.status, top, state.low, state.removing)
    low, hidden = (state.low, state.removing) if state is not None else (0, ())
    listed = tuple(s for s in files.sequences() if s >= low and s not in hidden)
    if not listed:
        return None
    if not damaged:
        logger.warning(
            "file store: %s is missing or holds no run; reading the run by its checkpoints",
            files.record_key(RUN),
        )
    return _View(_UNKNOWN_STATUS, listed[0], low, hidden, listed)


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


def _discard(path: str) -> bool:
    """Unlink a file; ``False`` if it was already gone. A directory in its place is logged."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False  # removed by an earlier, interrupted cleanup or a concurrent one
    except IsADirectoryError:
        logger.warning("file store: left foreign directory %s in place", path)
        return False
    return True


def _remove_tree(path: str) -> None:
    """Remove a directory tree without following links; concurrent removers are fine."""
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return  # another remover got here first
    except NotADirectoryError:
        _discard(path)
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            _remove_tree(entry.path)
        else:
            _discard(entry.path)
    with contextlib.suppress(FileNotFoundError):  # another remover got here first
        os.rmdir(path)


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


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _directory_of(path: object) -> str:
    """The store's directory as a ``str`` path (``ConfigurationError`` for anything else)."""
    try:
        directory = os.fspath(path)  # type: ignore[call-overload]
    except TypeError as exc:
        raise ConfigurationError(f"file store path must be a str or a path: {path!r:.80}") from exc
    if not isinstance(directory, str) or "\0" in directory:
        raise ConfigurationError(f"not a usable file store path: {directory!r:.80}")
    return directory


def _parse_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"file store option {name}={value!r} is not a boolean")


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
    items the run's held checkpoints name): ``append_with_items`` also looks for each of its
    ``i`` items (a file in place costs a head read and a read of the entry it names, to keep a
    live one), writes the new ones' files unsynced and commits their entries with the
    checkpoint (still one sync), and commits the ``s`` counts in ``run.rec``'s body (a few
    bytes plus the key per shared item); each pruned checkpoint with refs costs one head read,
    and the items it was the last to name (or owned) are removed in the same commit, their
    files unlinked after it. The first checkpoint of a run adds one marker per label.
    ``put_items``, ``put_owned_items`` and ``delete_items`` are one commit each (one sync),
    plus a file per item; every operation under the run lock reads ``items.state``.
    ``read_with_items`` costs ``get`` or ``latest``, one listing of ``o/<sequence>/``, one read
    per owned item and per ref, ``run.rec``'s first 4 KiB again and one ``stat``: O(owned +
    r), not O(n) or O(s).

    Nested items (``m`` = items nested under the refs, ``t`` = items of the run):
    ``read_with_items`` also looks for each ref's nesting marker (one ``faccessat``), and for
    refs that have one lists the run's items once and reads each nested item: O(owned + r +
    m) reads and one O(t) listing. Writing items whose keys hold a ``/`` costs, per distinct
    ``/``-prefix of them, one ``faccessat`` (does it hold an item?) and, where it does, one
    more for its marker. Removing a shared item looks for its marker; with one, the removal
    lists the run's items and markers once, commits the removal of each nested item's entry
    and unlinks its file: one O(t) listing plus O(m) unlinks. ``put_owned_items`` reads
    ``run.rec`` and the owner's head under the run lock, then writes like ``put_items``.
    After a restart of the machine, the run's first writer (or a reader, through the lock)
    makes the item files and markers again from the log: O(t) once.

    Limits: item keys up to :data:`MAX_ITEM_KEY_BYTES` UTF-8 bytes, statuses up to 64. A
    write of items is one commit, so the log holds a batch whole or not at all, and a write
    that fails with an error puts back the files it replaced. An append's items are all in
    place before its checkpoint shows. A ``kill -9`` among a write's files leaves
    ``items.state`` set: the files are made again from the log before anyone reads them.
    """

    nested_items = True

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self._root = os.path.abspath(_directory_of(path))
        self._fsync = fsync
        self._runs = os.path.join(self._root, "runs")
        self._locks = os.path.join(self._root, "locks")
        self._index = os.path.join(self._root, "index")
        self._tmp = os.path.join(self._root, "tmp")
        self._trash = os.path.join(self._root, "trash")
        try:
            os.makedirs(self._root, mode=0o700, exist_ok=True)
            for directory in (self._runs, self._locks, self._index, self._tmp, self._trash):
                _mkdir(directory)
        except OSError as exc:
            raise StoreError(f"cannot create the file store at {self._root}: {exc}") from exc

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
        return await anyio.to_thread.run_sync(call)

    def _translated(self, func: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return func(*args, **kwargs)
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
        if fd is None:
            yield None
            return
        files = _Dir(self._run_dir(run_key), fd)
        try:
            yield files
        finally:
            files.close()
            os.close(fd)

    @contextlib.contextmanager
    def _locked(
        self, run_key: str, *, blocking: bool = True, items: _ItemsUse = "need"
    ) -> Iterator[bool]:
        """Hold the run's lock; yields ``False`` if not ``blocking`` and it is busy.

        ``items``: the operation reads or changes items (``need``: the item files are first
        made to copy the log, see :meth:`_check_items`, or the operation fails); it only may
        commit (``try``: the same, but a failure to make them is logged and left marked for
        the next holder); it neither (``skip``)."""
        path = os.path.join(self._locks, run_key)
        fd = self._acquire(path, blocking)
        if fd is None:
            yield False
            return
        run_dir = self._run_dir(run_key)
        # A thread never holds a run's lock twice (flock would wait on itself).
        held = _HELD.by_path[run_dir] = _HeldLog(run_dir)
        try:
            if items != "skip":
                self._check_items(run_key, held, need=items == "need")
            yield True
            # A run without a directory needs no lock file. Removed while held: whoever
            # waits on it finds its inode gone from the path and locks a new file.
            if not os.path.lexists(run_dir):
                _discard(path)
            elif held.items_changing and not held.items_failed:
                try:
                    self._mark_items(run_key, _CLEAN)  # the operation ended well
                except OSError as exc:  # it stands: the next holder makes the files again
                    _log_leftover(os.path.join(run_dir, _ITEMS_STATE), exc)
        finally:
            held.forget()
            del _HELD.by_path[run_dir]
            os.close(fd)
        if held.compact_due:  # the operation succeeded: compact, holding the lock briefly
            self._compact(run_key)

    def _check_items(self, run_key: str, held: _HeldLog, *, need: bool) -> None:
        """Make the item files again from the log when they may not copy it: ``idx`` was not
        written since this boot (or is missing or damaged), or ``items.state`` says a writer
        died while it changed them. A log that cannot be read is left to the operation (it
        reports it, or does without). Without ``need``, a failure is logged and the files
        stay marked, so readers keep away from them and the next holder tries again."""
        files = _Dir(held.path)
        try:
            changing = files.items_changing()
            view = held.view()
        except CorruptCheckpointError:
            return
        try:
            if view is None:
                if changing:  # a first write died before its log was made: nothing is held
                    _clear_item_copies(files)
                    self._mark_items(run_key, _CLEAN)
            elif changing or not view.current:
                self._rebuild_items(run_key, held)
        except OSError as exc:
            held.items_failed = True
            with contextlib.suppress(OSError):
                self._mark_items(run_key, _DIRTY)
            if need:
                raise
            logger.warning("file store: could not make the item files of run %s again from "
                           "its log (the next holder of its lock tries again): %s",
                           run_key, exc.strerror or exc)

    def _mark_items(self, run_key: str, state: bytes) -> None:
        """Write ``items.state`` (unsynced): a crash of the machine makes every run's item
        files be made again anyway."""
        path = os.path.join(self._run_dir(run_key), _ITEMS_STATE)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.pwrite(fd, state, 0)
        finally:
            os.close(fd)

    def _items_changing(self, run_key: str) -> None:
        """Mark the item files as being changed by this operation, once, before it touches
        them: a holder of the lock after a ``kill -9`` makes them again from the log."""
        held = _HELD.by_path[self._run_dir(run_key)]
        if not held.items_changing:
            self._mark_items(run_key, _DIRTY)
            held.items_changing = True

    def _rebuild_items(self, run_key: str, held: _HeldLog) -> None:
        """Make the run's item files and markers again from its log, then a new ``idx``: what
        the first holder of the run lock does when ``idx`` was not written since this boot (or
        is missing or damaged). The files are written without syncs, so a crash of the
        machine may have lost, torn or put back any of them; the log holds every item, each
        synced by the commit that wrote it. O(items of the run), once per boot."""
        view = held.view()
        assert view is not None
        files = _Dir(self._run_dir(run_key))
        staged: dict[str, tuple[str, Item, bytes]] = {}
        # Oldest entry first: if the log holds two of one key, the newer is what counts.
        for key in sorted(view.held_keys(), reverse=True):
            if key > _FIRST_ITEM:
                continue
            try:
                data = view.read(key, check=True)
                if data is None:
                    continue
                frame = _parse_frame(data, len(data), files.record_key(key), _ITEM_MAGIC,
                                     whole=True, more=lambda _: b"", what="record")
                meta = _decode(_ITEM_DECODER, frame.meta, files.record_key(key))
            except CorruptCheckpointError as exc:
                logger.warning("file store: item %s is damaged in the log; it is lost: %s",
                               exc.key, _problem(exc))
                continue
            if meta.entry != key:
                logger.warning("file store: %s holds another entry's item; skipping it",
                               files.record_key(key))
                continue
            item = Item(key=meta.key, value=b"", owner=meta.owner, expires_at=meta.expires_at)
            staged[meta.key] = (_item_name(meta.key), item, data)
        # From nothing: files of items removed since, or never committed, go too.
        self._mark_items(run_key, _DIRTY)
        _clear_item_copies(files)
        self._write_item_files(run_key, list(staged.values()))
        logger.info("file store: made the %d item files of run %s again from its log",
                    len(staged), run_key)
        writer = LogWriter(self._run_dir(run_key), functools.partial(self._temp_path, run_key),
                           fsync=self._fsync)
        try:
            writer.reindex()
        except OSError as exc:  # the next holder of the lock makes them again
            logger.warning("file store: could not rewrite %s: %s",
                           os.path.join(writer.directory, "idx"), exc.strerror or exc)
        self._mark_items(run_key, _CLEAN)
        held.forget()

    def _compact(self, run_key: str) -> None:
        """Compact the run's log once a commit left it due: most of the copy without the run
        lock, so writers wait only for the commits made meanwhile to be copied. The commit
        stands whatever happens here; a failure is logged and the next commit tries again."""
        writer = LogWriter(self._run_dir(run_key), functools.partial(self._temp_path, run_key),
                           fsync=self._fsync)
        try:
            writer.compact(locked=functools.partial(self._locked, run_key, items="try"))
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
        fd = os.open(path, _DIR_FLAGS)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _ensure_dir(self, path: str) -> None:
        if _mkdir(path):
            self._sync_dir(os.path.dirname(path))

    def _write_file(self, run_key: str, target: str, data: bytes) -> None:
        """Write ``data`` to ``target`` atomically, unsynced: a copy of what the log holds."""
        temp = os.path.join(self._tmp, f"{run_key}.{secrets.token_hex(8)}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                _write_all(fd, data)
            finally:
                os.close(fd)
            # Replace, not link: under the run lock a file already there is a leftover.
            os.replace(temp, target)
        except BaseException:
            _discard(temp)
            raise

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
    ) -> None:
        """Commit ``run.rec`` (unless ``None``; with a new checkpoint, the removal of the
        records of ``erase``, and the item entries of ``items``) to the run's log: one write
        and one sync."""
        run_dir = self._run_dir(run_key)
        writer = LogWriter(run_dir, functools.partial(self._temp_path, run_key), fsync=self._fsync)
        puts = [] if checkpoint is None else [checkpoint]
        removes = list(erase)
        if items is not None:
            puts += items.puts
            removes += items.removes
        if state is not None:
            puts.append((RUN, _run_bytes(state)))
        held = _HELD.by_path[run_dir]  # every commit is made under the run lock
        try:
            due = writer.commit(puts, removes, view=held.view())
        finally:
            held.forget()  # the log moved on: read it anew
        held.compact_due = held.compact_due or due

    def _read_state(self, run_key: str, *, whole: bool = False) -> _RunState | None:
        return _Dir(self._run_dir(run_key)).state(whole=whole)

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
        _check_append(run_key, record, run, keep_latest)
        check_shared_items(record, items)
        named = _appended_items(record, items)
        status, _ = await self._call(self._append, run_key, record, run, keep_latest, now, named)
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
        _check_append(run_key, record, run, keep_latest)
        if record.refs:
            raise ValidationError("append_next takes checkpoints that name no items")
        return await self._call(
            self._append, run_key, record, run, keep_latest, now, [], renumber=renumber)

    def _append(
        self,
        run_key: str,
        record: StoredCheckpoint,
        seed: RunRecord,
        keep_latest: int | None,
        now: float,
        named: list[tuple[str, Item]],
        renumber: Callable[[int], StoredCheckpoint] | None = None,
    ) -> tuple[str, StoredCheckpoint]:
        with self._locked(run_key):
            state = self._current_state(run_key, seed, now)
            stored = state.run if state is not None else None
            current = stored if stored is not None and is_live(stored.expires_at, now) else None
            if renumber is not None and current is not None and \
                    seed.incarnation == current.incarnation and \
                    record.sequence != current.latest_sequence + 1:
                record = _renumbered(renumber, current.latest_sequence + 1, seed)
            _check_sequence(run_key, record, seed, current)
            find = refs_to_find(record, [item for _, item in named])
            if state is None or stored is None or current is None:
                if find:
                    # A new life holds the loose items of its key, not what the checkpoints
                    # of an earlier one named (they go with them).
                    earlier = state.shared if state is not None and state.shared else None
                    self._check_refs_held(
                        run_key, record.sequence, find, now, new_life=True,
                        gone={*(earlier.counts if earlier else ()),
                              *(state.dropping if state is not None else ())})
                ledger = self._start_run(run_key, state, seed)
            else:
                ledger = self._ledger(run_key, state, current)
                self._check_refs_held(run_key, record.sequence, find, now, gone=ledger.dropping)
            ledger.run = msgspec.structs.replace(
                ledger.run, latest_sequence=record.sequence, updated_at=now
            )
            written = self._absent_items(run_key, ledger, named, now)
            # Counted before pruning: an item the new checkpoint names is never released by
            # the checkpoints it replaces.
            ledger.add(record.sequence, record.expires_at, record.refs)
            committed = self._write_and_commit(
                run_key, record, ledger, keep_latest, now, new_run=current is None, items=written
            )
            assert committed.run is not None
            if stored is not None and current is None:
                self._unindex(run_key, stored, keep=committed.run)
            self._remove_checkpoints(run_key, sorted(ledger.owning))
            self._drop_shared(run_key, committed.dropping)
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
        items: list[tuple[str, Item]],
    ) -> _RunState:
        """Write the items, prune, and commit the checkpoint with ``run.rec`` (and the removal
        of the pruned checkpoints) in one commit of the run's log; returns what it committed.

        The items come first: once the checkpoint is in the log readers see it, so everything
        it names must be there already. They are withdrawn again when the commit fails: a
        caller that got an error never finds its checkpoint, nor the items it wrote.
        """
        entries: _Entries | None = None
        try:
            entries = self._item_entries(run_key, items)
            ledger.remove_expired(now)
            if keep_latest is not None:
                self._remove_oldest(run_key, ledger, keep_latest)
            committed = self._settled(run_key, ledger)
            assert committed.run is not None
            if new_run:
                self._add_markers(_marker_paths(run_key, committed.run))
            entries.removes.extend(self._doomed(run_key, ledger.owning, committed.dropping))
            self._commit(
                run_key, committed,
                checkpoint=(record.sequence, _checkpoint_bytes(record, ledger.run.labels)),
                erase=[*ledger.erase, *ledger.removed], items=entries)
        except CommitLeftInLog:
            logger.error(
                "file store: a failed append to run %s could not be cut off its log; the "
                "items it wrote stay, and readers may find its checkpoint", run_key)
            raise
        except BaseException:
            if entries is not None:
                self._withdraw_items(run_key, entries)
            raise
        return committed

    def _item_entries(self, run_key: str, named: Sequence[tuple[str, Item]]) -> _Entries:
        """Write the files of ``named`` (and their markers), unsynced, and return what the
        commit that makes them durable holds; under the run lock. Each item gets a new log
        entry; the entry its key held (if the log holds it: a file a crash left before its
        commit is no item of the run) is removed by the same commit."""
        if not named:
            return _Entries([], [], [])
        self._items_changing(run_key)
        files = _Dir(self._run_dir(run_key))
        made = _items_made(_HELD.by_path[files.path].view())
        latest: dict[str, Item] = dict(named)  # the last of each key, as a batch of renames
        entries = _Entries([], [], [])
        staged: list[tuple[str, Item, bytes]] = []
        for name, item in latest.items():
            old = files.committed_item(name)
            entry = _FIRST_ITEM - made
            if entry < MIN_KEY:
                raise StoreError(f"run {run_key} has used up its item entries")
            made += 1
            data = _item_bytes(item, entry)
            if len(data) > MAX_DATA:
                raise ValidationError(
                    f"item {item.key!r:.80} is {len(data)} bytes framed; the file store holds "
                    f"items up to {MAX_DATA} bytes")
            staged.append((name, item, data))
            entries.puts.append((entry, data))
            entries.replaced.append((name, None if old is None else old.entry))
            if old is not None:
                entries.removes.append(old.entry)
        entries.puts.append((_ITEMS_MADE, _COUNT.pack(made)))
        try:
            self._write_item_files(run_key, staged)
        except BaseException:
            self._withdraw_items(run_key, entries)
            raise
        return entries

    def _withdraw_items(self, run_key: str, entries: _Entries) -> None:
        """Put back the item files a failed operation replaced (from the log, which still
        holds them), and remove those it added: the store is left as it was."""
        files = _Dir(self._run_dir(run_key))
        for name, old in entries.replaced:
            path = files.path_of(f"{_ITEMS}/{name}")
            try:
                data = None
                if old is not None:
                    with contextlib.suppress(CorruptCheckpointError):
                        view = _HELD.by_path[files.path].view()
                        data = None if view is None else view.read(old, check=True)
                if data is None:
                    _discard(path)
                else:
                    self._write_file(run_key, path, data)
            except OSError as exc:
                logger.error(
                    "file store: could not put back %s after a failed write (%s); it differs "
                    "from the run's log until the machine restarts",
                    path,
                    exc.strerror or exc,
                )

    def _start_run(self, run_key: str, state: _RunState | None, seed: RunRecord) -> _Ledger:
        """Clear what an expired or emptied run left; ``seed`` becomes the record, uncommitted.

        The earlier life's shared items go too: a key's value there is not this life's.
        """
        self._ensure_dir(self._run_dir(run_key))
        failed: list[str] = []
        earlier: list[int] = []
        if state is not None and state.run is not None:
            earlier = self._discard_checkpoints(run_key)
            shared = state.shared if state.shared is not None else _NO_SHARED
            failed = self._drop_shared(run_key, {*shared.counts, *state.dropping})
        fresh = _RunState(
            items_next_expiry=state.items_next_expiry if state is not None else None,
            shared=_NO_SHARED,
        )
        ledger = _Ledger(fresh, seed, (), failed)
        ledger.erase = earlier
        return ledger

    def _ledger(self, run_key: str, state: _RunState, run: RunRecord) -> _Ledger:
        """The ledger of a writer of a live run, once the removals that earlier operations
        committed but could not finish are retried."""
        leftovers = self._retry_removals(run_key, state)
        return _Ledger(state, run, leftovers, self._drop_shared(run_key, state.dropping))

    def _settled(self, run_key: str, ledger: _Ledger) -> _RunState:
        """The ``run.rec`` to commit, once the checkpoints removed release their refs (read
        from their heads: before the commit their records are still in the log). Those that
        own items stay in ``removing`` until their items are gone."""
        files = _Dir(self._run_dir(run_key))
        ledger.owning = {
            sequence for sequence in ledger.removed
            if files.exists(f"{_OWNERS}/{_sequence_name(sequence)}")}
        for sequence in ledger.releasing():
            try:
                head = files.head(sequence, 0.0, include_expired=True)
            except CorruptCheckpointError as exc:
                logger.warning(
                    "file store: the shared items %s names stay until its run goes: %s",
                    exc.key,
                    _problem(exc),
                )
                head = None
            ledger.release(sequence, () if head is None else head.refs)
        return ledger.state()

    def _absent_items(
        self, run_key: str, ledger: _Ledger, named: list[tuple[str, Item]], now: float
    ) -> list[tuple[str, Item]]:
        """The appended items to write: those whose key holds no live item. A key dropped
        earlier whose file is still there (a failed unlink) counts as free, once the items
        nested under it are gone."""
        files = _Dir(self._run_dir(run_key))
        absent: list[tuple[str, Item]] = []
        for name, item in named:
            if item.key in ledger.dropping:
                self._clear_nested(run_key, [item.key])
                ledger.dropping.discard(item.key)
            elif _holds_live_item(files, name, now):
                continue  # written once per key: a live value is never replaced
            absent.append((name, item))
        return absent

    def _check_refs_held(
        self, run_key: str, sequence: int, keys: Sequence[str], now: float, *,
        gone: Collection[str], new_life: bool = False,
    ) -> None:
        """Refuse (before anything is written) refs naming items the run does not hold: a key
        in ``gone`` (being dropped), or with no live item in place (for a new life, no live
        loose item), is not held."""
        if not keys:
            return
        files = _Dir(self._run_dir(run_key))

        def held(key: str) -> bool:
            if key in gone:
                return False
            # A corrupt item is replaced if this append wrote it; refused as missing here.
            found = files.committed_item(_item_name(key))
            return (found is not None and is_live(found.expires_at, now)
                    and not (new_life and found.owner is not None))

        missing = [key for key in keys if not held(key)]
        if missing:
            raise unheld_refs(run_key, sequence, missing)

    def _drop_shared(self, run_key: str, keys: Iterable[str]) -> list[str]:
        """Unlink shared items that no held checkpoint names, and the items nested under them
        (an owned item stays with its owner, and what is nested under it); returns the keys
        whose unlinks failed (logged), to be tried again."""
        files = _Dir(self._run_dir(run_key))
        gone: list[str] = []
        for key in keys:
            try:
                found = files.item(_item_name(key), whole=False)
            except CorruptCheckpointError as exc:
                logger.warning("file store: skipping corrupt item %s: %s", exc.key, exc)
                continue
            if found is None or found[0].owner is None:
                gone.append(key)  # or gone already: a retry finishes what is nested under it
        try:
            self._remove_items(run_key, [_item_name(key) for key in gone])
        except OSError as exc:
            _log_leftover(files.path_of(_ITEMS), exc)
            return gone
        return self._remove_nested(run_key, gone)

    def _doomed(self, run_key: str, owners: Iterable[int], dropped: Iterable[str]) -> list[int]:
        """The entries of the items that removing the checkpoints ``owners`` (the items they
        own) and dropping the shared items ``dropped`` (and what is nested under them) take
        with them: removed by the same commit, so that it costs no commit of its own; their
        files go after it (:meth:`_remove_checkpoints`, :meth:`_drop_shared`)."""
        files = _Dir(self._run_dir(run_key))
        entries: list[int] = []

        def add(name: str, owner: int | None) -> None:
            if _key_of_name(name) is None:
                return
            meta = files.committed_item(name)
            if meta is not None and (owner is None or meta.owner == owner):
                entries.append(meta.entry)

        for sequence in owners:
            for name in files.listdir(f"{_OWNERS}/{_sequence_name(sequence)}"):
                add(name, sequence)
        for key in dropped:
            meta = files.committed_item(_item_name(key))
            if meta is not None and meta.owner is not None:
                continue  # an owned item stays with its owner, and what is nested under it
            if meta is not None:
                entries.append(meta.entry)
            anchor = f"{_NESTED}/{_item_name(key)}"
            for name in files.listdir(anchor) if files.exists(anchor) else ():
                add(name, None)
        if entries:
            self._items_changing(run_key)  # their files go after the commit
        return list(dict.fromkeys(entries))

    def _remove_items(self, run_key: str, names: Collection[str]) -> int:
        """Remove the items at ``names``: the removal of the entries the log holds for them in
        one commit, then their files (unsynced); returns how many files went. Under the run
        lock."""
        files = _Dir(self._run_dir(run_key))
        present = [name for name in names if files.exists(f"{_ITEMS}/{name}")]
        if not present:
            return 0  # a file removed is an entry removed first
        self._items_changing(run_key)
        entries = [meta.entry for meta in map(files.committed_item, present) if meta is not None]
        if entries:
            self._commit(run_key, None, items=_Entries([], entries, []))
        return sum(_discard(files.path_of(f"{_ITEMS}/{name}")) for name in present)

    def _remove_nested(self, run_key: str, keys: Iterable[str]) -> list[str]:
        """Unlink the items nested under ``keys`` (whose items are gone), then their nesting
        markers; returns the keys where an unlink failed (logged), to be tried again.

        Only keys with a marker directory have any: one ``faccessat`` each. Each of those
        lists its own markers (every item nested under it, at any depth); the nested items'
        entries go in one commit, then each costs one unlink. The markers go last: a marker
        left means the removal is unfinished.
        """
        files = _Dir(self._run_dir(run_key))
        anchors = [k for k in dict.fromkeys(keys) if files.exists(f"{_NESTED}/{_item_name(k)}")]
        if not anchors:
            return []
        items, markers = files.path_of(_ITEMS), files.path_of(_NESTED)
        listed: dict[str, list[str]] = {}
        failed: list[str] = []
        for key in anchors:
            try:
                listed[key] = files.listdir(f"{_NESTED}/{_item_name(key)}")
            except OSError as exc:
                _log_leftover(markers, exc)
                failed.append(key)
        nested = {name for names in listed.values() for name in names
                  if _key_of_name(name) is not None}
        try:
            self._remove_items(run_key, sorted(nested))
        except OSError as exc:
            _log_leftover(items, exc)
            return anchors
        for key in anchors:
            if key in failed:
                continue
            try:
                # The marker directories of keys nested under ``key`` too: every item under
                # them is among ``key``'s, gone.
                for name in [*listed[key], _item_name(key)]:
                    _remove_tree(os.path.join(markers, name))
            except OSError as exc:
                _log_leftover(markers, exc)
                failed.append(key)
        return failed

    def _clear_nested(self, run_key: str, keys: Collection[str]) -> None:
        """Finish removing what is nested under dropped ``keys`` about to be written again (a
        failed unlink left it), so the new items start with nothing under them; before any
        write, so a failure fails the operation."""
        failed = self._remove_nested(run_key, keys) if keys else []
        if failed:
            raise StoreError(
                f"file store: could not remove the items nested under {failed[0]!r:.80}, "
                f"dropped earlier, in {self._run_dir(run_key)}; see the log"
            )

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
            return self._read_state(run_key, whole=True)
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
        # The earlier life's shared bookkeeping is kept so that the rebuild drops its items.
        kept = _RunState(
            run=life,
            items_next_expiry=state.items_next_expiry,
            dropping=state.dropping,
            shared=state.shared,
        )
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
        hidden = set(state.removing)
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
            elif sequence >= state.low and sequence not in hidden:
                ours = True
        return ours, others

    def _log_heads(self, run_key: str, files: _Dir, keep: _RunState | None) -> list[_Head]:
        """Intact checkpoints in place of the run's incarnation, oldest first.

        The incarnation is that of ``keep`` (a readable record) if it holds a run, else of the
        newest intact checkpoint. What ``keep`` hides stays hidden. Corrupt files are logged,
        and files of other runs or incarnations left out: reads still report them as corrupt.
        """
        low, hidden = (keep.low, set(keep.removing)) if keep is not None else (0, set())
        heads: list[_Head] = []
        incarnation = keep.run.incarnation if keep is not None and keep.run is not None else None
        for sequence in files.sequences():
            if sequence < low or sequence in hidden:
                continue
            try:
                head = files.head(sequence, 0.0, include_expired=True)
            except CorruptCheckpointError as exc:
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
        The shared items' counts come from the refs of the checkpoints in place; the items
        ``keep`` counted that none of them names are dropped.
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
        shared = _shared_of(heads)
        dropped: set[str] = set()
        if keep is not None:
            dropped = {*(keep.shared or _NO_SHARED).counts, *keep.dropping} - shared.counts.keys()
        return _RunState(
            run=run,
            low=oldest.sequence,
            immortal=immortal,
            expiring=tuple(expiring),
            removing=keep.removing if keep is not None else (),
            # Item expiries are unknown without a record: purge_expired looks at every item.
            items_next_expiry=keep.items_next_expiry if keep is not None else 0.0,
            dropping=tuple(sorted(dropped)),
            shared=shared,
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
        self._drop_shared(run_key, state.dropping)

    def _remove_oldest(self, run_key: str, ledger: _Ledger, keep_latest: int) -> None:
        """Remove the oldest held checkpoints beyond ``keep_latest``, walking up from ``low``.

        Each sequence is passed once (``low`` moves past it); the index names the ones that
        expire, so only a checkpoint that never expires has its head read.
        """
        if ledger.held <= keep_latest:
            return
        expiring = {sequence: expires_at for expires_at, sequence in ledger.expiring}
        hidden = ledger.hidden()
        sequence = ledger.low
        # Never the newest: it was just written and is always kept.
        while ledger.held > keep_latest and sequence < ledger.run.latest_sequence:
            if sequence in expiring:
                ledger.remove(sequence, expiring[sequence])
            elif sequence not in hidden:
                head = self._peek(run_key, sequence)
                if head is True or (isinstance(head, _Head) and head.expires_at is None):
                    ledger.remove(sequence, None)  # never expires (or unreadable: counted so)
                    if isinstance(head, _Head) and sequence in ledger.referring:
                        ledger.release(sequence, head.refs)  # read now, not again
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
            logger.warning("file store: skipping corrupt checkpoint %s: %s", exc.key, exc)
            return True
        return False if found is None else found

    def _retry_removals(self, run_key: str, state: _RunState) -> list[int]:
        """Finish removing the owned items of checkpoints removed earlier (a failure after
        their commit left them); returns those still unfinished."""
        return self._remove_checkpoints(run_key, state.removing) if state.removing else []

    def _remove_checkpoints(self, run_key: str, sequences: Sequence[int]) -> list[int]:
        """Remove the owned items of committed removals (their records went in the commit);
        returns those where that failed (logged).

        Runs after a commit, so a failure never fails the operation: the checkpoint stays in
        ``removing`` until its items are gone.
        """
        failed: list[int] = []
        for sequence in sequences:
            try:
                self._remove_owned_items(run_key, sequence)
            except OSError as exc:
                _log_leftover(os.path.join(self._run_dir(run_key), _OWNERS), exc)
                failed.append(sequence)
        return failed

    def _remove_owned_items(self, run_key: str, sequence: int) -> int:
        run_dir = self._run_dir(run_key)
        owner_dir = os.path.join(run_dir, _OWNERS, _sequence_name(sequence))
        try:
            names = os.listdir(owner_dir)
        except FileNotFoundError:
            return 0  # the checkpoint owns no items
        files = _Dir(run_dir)
        owned: list[str] = []
        for name in names:
            try:
                found = files.item(name, whole=False) if _key_of_name(name) is not None else None
            except CorruptCheckpointError as exc:
                logger.warning("file store: skipping corrupt item %s: %s", exc.key, exc)
                found = None
            # The marker may be stale: the item was since rewritten with another owner.
            if found is not None and found[0].owner == sequence:
                owned.append(name)
        removed = self._remove_items(run_key, owned)
        for name in names:
            _discard(os.path.join(owner_dir, name))
        try:
            os.rmdir(owner_dir)
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY:
                raise
            logger.warning("file store: left %s in place: it holds foreign entries", owner_dir)
        return removed

    def _discard_checkpoints(self, run_key: str) -> list[int]:
        """Remove the owned items of every checkpoint of an expired run about to start over;
        returns the checkpoints, whose records its next commit removes."""
        files = _Dir(self._run_dir(run_key))
        for name in files.listdir(_OWNERS):
            sequence = _sequence_of_name(name)
            if sequence is not None:
                self._remove_owned_items(run_key, sequence)
        return files.sequences()

    async def get(
        self, run_key: str, sequence: int, *, now: float
    ) -> tuple[StoredCheckpoint, str] | None:
        _check_run_key(run_key)
        return await self._call(self._get, run_key, sequence, now)

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
        with self._locked(run_key, items="try"):
            self._settle(run_key, files)
            return _log_view(files, run_key, now, include_expired=include_expired)

    def _settle(self, run_key: str, files: _Dir) -> None:
        """Under the run lock: bring ``idx`` up to date with the log when a crash (or a
        reboot) left it behind, so later readers need not wait; then read the log anew."""
        writer = LogWriter(
            self._run_dir(run_key), functools.partial(self._temp_path, run_key),
            fsync=self._fsync)
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
        with self._locked(run_key, items="try"):
            files = _Dir(self._run_dir(run_key))
            self._settle(run_key, files)
            return locked(files)

    def _get_in(
        self, run_key: str, files: _Dir, sequence: int, now: float
    ) -> tuple[StoredCheckpoint, str] | None:
        view = self._view(run_key, files, now)
        return None if view is None else _held_checkpoint(files, view, sequence, now)

    async def latest(self, run_key: str, *, now: float) -> tuple[StoredCheckpoint, str] | None:
        _check_run_key(run_key)
        return await self._call(self._latest, run_key, now)

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
        with self._locked(run_key, items="try"):
            files = _Dir(self._run_dir(run_key))
            self._settle(run_key, files)
            view = _log_view(files, run_key, now)
            return None if view is None else _newest_live(files, view, now)

    async def read_with_items(
        self, run_key: str, *, sequence: int | None, now: float
    ) -> tuple[StoredCheckpoint, str, dict[str, bytes]] | None:
        """The checkpoint read as by ``get`` or ``latest``, then its owned items (listed
        under ``o/<sequence>/``) and the items its refs name, then ``run.rec`` again: a
        checkpoint still held there had all its items in place while they were read."""
        _check_run_key(run_key)
        return await self._call(self._read_with_items, run_key, sequence, now)

    def _read_with_items(
        self, run_key: str, sequence: int | None, now: float
    ) -> tuple[StoredCheckpoint, str, dict[str, bytes]] | None:
        with self._reader(run_key) as files:
            if files is None:
                return None
            for _ in range(_LATEST_ATTEMPTS if files.items_current() else 0):
                if sequence is None:
                    found = self._latest_in(run_key, files, now)
                else:
                    found = self._get_in(run_key, files, sequence, now)
                if found is None:
                    return None
                items = _items_of(files, found[0], now)
                if self._still_held(run_key, files, found[0].sequence, now) and \
                        files.settled():
                    return found[0], found[1], items
        # Writers kept removing what we read (or the record is behind or damaged, or the item
        # files are to be made again from the log): read it once while they wait.
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

    def _still_held(self, run_key: str, files: _Dir, sequence: int, now: float) -> bool:
        """Whether ``run.rec`` still holds checkpoint ``sequence`` and the run directory read
        through ``files`` is still the run's (``delete_run`` renames it away whole, then
        removes its files in any order). When no commit was made since the read, it is."""
        if not files.unchanged():
            files.refresh()
            trusted, view = _trusted_view(files, now)
            if not trusted or view is None or not view.holds(sequence):
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
        """Writes each item like ``put_items`` (owner markers first): a crash in the middle of
        a batch can leave part of it written."""
        _check_run_key(run_key)
        named = _owned_items(items, owner)
        return await self._call(
            self._put_owned_items, run_key, named, owner, checkpoint_id, if_absent, now
        )

    def _live_owner(
        self, run_key: str, owner: int, checkpoint_id: str, now: float
    ) -> _Head | None:
        """Checkpoint ``owner`` if the run holds it live with id ``checkpoint_id``; under the
        run lock."""
        state = self._current_state(run_key, None, now)
        run = _live_run(state, now)
        if state is None or run is None or owner in state.removing:
            return None
        if not state.low <= owner <= run.latest_sequence:
            return None
        head = _Dir(self._run_dir(run_key)).head(owner, now)
        return head if head is not None and head.checkpoint_id == checkpoint_id else None

    def _put_owned_items(
        self,
        run_key: str,
        named: list[tuple[str, Item]],
        owner: int,
        checkpoint_id: str,
        if_absent: bool,
        now: float,
    ) -> bool:
        with self._locked(run_key):
            head = self._live_owner(run_key, owner, checkpoint_id, now)
            if head is None:
                return False
            files = _Dir(self._run_dir(run_key))
            chosen: dict[str, Item] = {}
            for name, item in named:
                if if_absent and (name in chosen or _holds_live_item(files, name, now)):
                    continue
                # Everything of a checkpoint expires together.
                chosen[name] = msgspec.structs.replace(item, expires_at=head.expires_at)
            self._commit_items(run_key, None, self._item_entries(run_key, list(chosen.items())))
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
        _check_run_key(run_key)
        return await self._call(self._delete, run_key, sequence, checkpoint_id)

    def _delete(self, run_key: str, sequence: int, checkpoint_id: str) -> bool:
        with self._locked(run_key):
            state = self._current_state(run_key, None, None)
            if state is None or state.run is None:
                return False
            if not state.low <= sequence <= state.run.latest_sequence:
                return False
            if sequence in state.removing:
                return False
            files = _Dir(self._run_dir(run_key))
            found = files.head(sequence, 0.0, include_expired=True)
            if found is None or found.checkpoint_id != checkpoint_id:
                return False
            ledger = self._ledger(run_key, state, state.run)
            ledger.remove(sequence, found.expires_at)
            # The record goes in the commit; owned items after it (``removing`` until gone).
            committed = self._settled(run_key, ledger)
            self._commit(run_key, committed, erase=ledger.removed, items=_Entries(
                [], self._doomed(run_key, ledger.owning, committed.dropping), []))
            self._remove_checkpoints(run_key, sorted(ledger.owning))
            self._drop_shared(run_key, committed.dropping)
            return True

    async def delete_run(self, run_key: str) -> int:
        _check_run_key(run_key)
        return await self._call(self._delete_run, run_key)

    def _delete_run(self, run_key: str) -> int:
        with self._locked(run_key, items="skip"):
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

    def _move_to_trash(self, run_key: str) -> str | None:
        """Take the run directory out of ``runs/`` in one rename: the commit of a removal."""
        trash = os.path.join(self._trash, f"{run_key}.{secrets.token_hex(8)}")
        try:
            os.rename(self._run_dir(run_key), trash)
        except FileNotFoundError:
            return None  # no such run
        self._sync_dir(self._runs)
        return trash

    # -- runs ---------------------------------------------------------------------------------

    async def get_run(self, run_key: str, *, now: float) -> RunRecord | None:
        _check_run_key(run_key)
        return await self._call(self._get_run, run_key, now)

    def _get_run(self, run_key: str, now: float) -> RunRecord | None:
        def read(files: _Dir) -> _RunState | None:
            return self._checked_state(run_key, None, files=files)

        try:
            state = self._read_settled(run_key, read, read)
        except CorruptCheckpointError:
            # Decided again under the run's lock: a writer in the middle of a commit, or damage.
            with self._locked(run_key, items="try"):
                files = _Dir(self._run_dir(run_key))
                self._settle(run_key, files)
                try:
                    state = read(files)
                except CorruptCheckpointError as exc:
                    raise self._damaged(exc) from exc
        return _live_run(state, now)

    def _checked_state(
        self, run_key: str, now: float | None, *, whole: bool = False, files: _Dir | None = None
    ) -> _RunState | None:
        """``run.rec`` unless it is damaged as writers see it (:class:`CorruptCheckpointError`
        naming it): undecodable, missing while checkpoints are in place, or of another
        incarnation than they are. Without ``now`` the files of an expired run are not read;
        without ``whole`` neither is the record's body (the shared items' counts)."""
        files = _Dir(self._run_dir(run_key)) if files is None else files
        state = files.state(whole=whole)
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
    ) -> RunRecord:
        _check_run_key(run_key)
        _check_status(status)
        return await self._call(self._update_run, run_key, incarnation, version, status, data, now)

    def _update_run(
        self, run_key: str, incarnation: str, version: int, status: str, data: bytes, now: float
    ) -> RunRecord:
        with self._locked(run_key, items="try"):
            state = self._current_state(run_key, None, now)
            run = _live_run(state, now)
            if state is None or run is None:
                raise CheckpointNotFound(f"no live run with key {run_key}")
            if (run.incarnation, run.version) != (incarnation, version):
                raise ConflictError(
                    f"run {run_key} changed concurrently (now {run.incarnation}/{run.version}, "
                    f"expected {incarnation}/{version})"
                )
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
        if status is not None:
            _check_status(status)
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
        if status is not None:
            _check_status(status)
        return await self._call(self._count_runs, status, now)

    def _count_runs(self, status: str | None, now: float) -> int:
        markers = self._markers(self._status_directories(status))
        return sum(self._indexed_run(marker, folder, now) is not None for marker, folder in markers)

    # -- items --------------------------------------------------------------------------------

    async def put_items(
        self, run_key: str, items: Sequence[Item], *, create_only: bool = False, now: float
    ) -> None:
        _check_run_key(run_key)
        named = [(_item_name(item.key), item) for item in items]
        if named:
            await self._call(self._put_items, run_key, named, create_only, now)

    def _put_items(
        self, run_key: str, named: list[tuple[str, Item]], create_only: bool, now: float
    ) -> None:
        run_dir = self._run_dir(run_key)
        with self._locked(run_key):
            state = self._state_for_write(run_key)
            if create_only:
                self._check_absent(run_key, named, now)
            self._ensure_dir(run_dir)
            # The hint is committed before the items so purge_expired always finds them, and
            # so is a key taken out of ``dropping``: a dropped key written again is no leftover.
            earliest = _min_expiry([item.expires_at for _, item in named])
            hint = earliest if state is None else _earliest(state.items_next_expiry, earliest)
            base = state if state is not None else _RunState(shared=_NO_SHARED)
            keys = {item.key for _, item in named}
            self._clear_nested(run_key, keys.intersection(base.dropping))
            updated = msgspec.structs.replace(
                base,
                items_next_expiry=hint,
                dropping=tuple(key for key in base.dropping if key not in keys),
            )
            self._commit_items(run_key, updated if state is None or updated != state else None,
                               self._item_entries(run_key, named))

    def _commit_items(self, run_key: str, state: _RunState | None, entries: _Entries) -> None:
        """Commit the entries of items whose files are in place (with ``run.rec``, unless
        ``None``; nothing when there is nothing to commit); a commit that fails puts the
        files back (but not one that stays in the log: its items may be read)."""
        try:
            self._commit(run_key, state, items=entries)
        except CommitLeftInLog:
            raise
        except BaseException:
            self._withdraw_items(run_key, entries)
            raise

    def _write_item_files(self, run_key: str, staged: Sequence[tuple[str, Item, bytes]]) -> None:
        """Write item files (owner and nesting markers first), unsynced: the log holds what
        they copy, and a writer makes them again from it after a crash of the machine."""
        if not staged:
            return
        named = [(name, item) for name, item, _ in staged]
        self._mark_owners(run_key, named)
        self._mark_nesting(run_key, named)
        directory = os.path.join(self._run_dir(run_key), _ITEMS)
        _mkdir(directory)
        for name, _, data in staged:
            self._write_file(run_key, os.path.join(directory, name), data)

    def _check_absent(self, run_key: str, named: list[tuple[str, Item]], now: float) -> None:
        files = _Dir(self._run_dir(run_key))
        for name, item in named:
            if _holds_live_item(files, name, now):
                raise ConflictError(f"item {item.key!r:.80} already exists in run {run_key}")

    def _mark_owners(self, run_key: str, named: Sequence[tuple[str, Item]]) -> None:
        """Record owned items under their owner, before the items themselves."""
        owners: dict[int, list[str]] = {}
        for name, item in named:
            if item.owner is not None:
                owners.setdefault(item.owner, []).append(name)
        if not owners:
            return
        root = os.path.join(self._run_dir(run_key), _OWNERS)
        _mkdir(root)
        for owner, names in owners.items():
            directory = os.path.join(root, _sequence_name(owner))
            _mkdir(directory)
            self._make_markers(directory, names)

    def _mark_nesting(self, run_key: str, named: Sequence[tuple[str, Item]]) -> None:
        """Mark, before the items, each item being written under a key that holds an
        item (in place or in the batch): an empty ``n/k<K>/<item name>`` for each such key
        ``K`` it is nested under. Reads naming ``K`` list that directory, and the removal of
        ``K``'s item removes what it lists, so neither lists the run's items. Keys that hold
        no item get no marker, so keys like ``w/<sequence>/<task>/<index>`` leave none
        behind. The first marker under ``K`` also marks the items written under it before it
        held an item (one listing of the run's items, once per key)."""
        files = _Dir(self._run_dir(run_key))
        batch = {item.key for _, item in named}
        holds: dict[str, bool] = {}
        wanted: dict[str, list[str]] = {}
        for name, item in named:
            for prefix in _prefixes(item.key):
                held = holds.get(prefix)
                if held is None:
                    held = holds[prefix] = prefix in batch or files.exists(
                        f"{_ITEMS}/{_item_name(prefix)}")
                if held:
                    wanted.setdefault(prefix, []).append(name)
        if not wanted:
            return
        root = files.path_of(_NESTED)
        _mkdir(root)
        listed: list[str] | None = None
        for key, written in wanted.items():
            directory = os.path.join(root, _item_name(key))
            if files.exists(f"{_NESTED}/{_item_name(key)}"):
                self._make_markers(directory, written)
                continue
            # A key's first markers are made aside and renamed into place, so a directory in
            # place always marks what was under the key before it (a crash leaves none).
            if listed is None:
                listed = sorted(files.listdir(_ITEMS))
            aside = os.path.join(root, "." + _item_name(key))
            _remove_tree(aside)  # what a crash left
            os.mkdir(aside, 0o700)
            self._make_markers(aside, [*_nested_names(listed, key), *written])
            os.rename(aside, directory)

    @staticmethod
    def _make_markers(directory: str, names: Iterable[str]) -> None:
        for name in names:
            os.close(os.open(os.path.join(directory, name), _MARKER_FLAGS, 0o600))

    async def get_items(self, run_key: str, keys: Sequence[str], *, now: float) -> dict[str, bytes]:
        _check_run_key(run_key)
        named = [(_item_name(key), key) for key in keys]
        if not named:
            return {}
        return await self._call(self._get_items, run_key, named, now)

    def _get_items(
        self, run_key: str, named: list[tuple[str, str]], now: float
    ) -> dict[str, bytes]:
        return dict(self._read_items(run_key, functools.partial(_live_items, named=named,
                                                                 now=now)))

    def _read_items(self, run_key: str, read: Callable[[_Dir], list[_T]]) -> list[_T]:
        """``read(files)`` of the run's item files, lock-free where they are current, else
        once the run lock's first holder has made them again from the log."""
        with self._reader(run_key) as files:
            if files is None:
                return []
            if files.items_current():
                return read(files)
        with self._locked(run_key):
            return read(_Dir(self._run_dir(run_key)))

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
        def read(files: _Dir) -> list[tuple[str, bytes]]:
            found: list[tuple[str, bytes]] = []
            for key, name in _scan_order(files, prefix, start_after, reverse):
                if len(found) >= limit:
                    break
                try:
                    item = files.item(name, whole=True)
                except CorruptCheckpointError as exc:
                    logger.warning("file store: skipping corrupt item %s: %s", exc.key, exc)
                    continue
                if item is not None and is_live(item[0].expires_at, now):
                    found.append((key, item[1] or b""))
            return found

        return self._read_items(run_key, read)

    async def delete_items(self, run_key: str, keys: Sequence[str]) -> int:
        _check_run_key(run_key)
        names = [_item_name(key) for key in keys]
        if not names:
            return 0
        return await self._call(self._delete_items, run_key, names)

    def _delete_items(self, run_key: str, names: list[str]) -> int:
        run_dir = self._run_dir(run_key)
        with self._locked(run_key):
            # Owner markers of deleted items go when their owner does (they are re-checked).
            removed = self._remove_items(run_key, sorted(set(names)))
            # Then their nesting markers: a marker left without its item is skipped by reads.
            files = _Dir(run_dir)
            for name in set(names):
                key = _key_of_name(name)
                for prefix in () if key is None else _prefixes(key):
                    anchor = f"{_NESTED}/{_item_name(prefix)}"
                    if files.exists(anchor):
                        _discard(os.path.join(files.path_of(anchor), name))
            return removed

    # -- maintenance --------------------------------------------------------------------------

    async def purge_expired(self, *, now: float, limit: int) -> tuple[int, bool]:
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
            _remove_tree(os.path.join(self._trash, name))
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
            with self._locked(match[1], blocking=False, items="skip") as locked:
                if not locked or in_use(path):
                    continue  # a writer of that run is at work (a compaction copies unlocked)
                if _discard(path):
                    logger.warning("file store: removed %s left by an interrupted write", path)
                    budget.spend(1)

    def _purge_run(
        self, run_key: str, now: float, budget: _Budget, indexed: dict[str, set[str]]
    ) -> int:
        """Purge one run; returns checkpoints removed. Records the markers of a live run."""
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
        with self._locked(run_key, items="try"):
            try:
                state = self._current_state(run_key, None, now)
            except CorruptCheckpointError as exc:
                logger.warning("file store: skipping run with corrupt record %s: %s", exc.key, exc)
                return 0
            if state is None or (state.run is not None and not is_live(state.run.expires_at, now)):
                return self._purge_whole_run(run_key, state, budget)
            if _HELD.by_path[self._run_dir(run_key)].items_failed:
                return 0  # the item files are not the log's: logged, tried again next round
            if not self._purge_due(run_key, state, now):
                return 0
            return self._purge_inside_run(run_key, state, now, budget)

    def _purge_due(self, run_key: str, state: _RunState, now: float) -> bool:
        """Something of the run expired, or a removal is unfinished."""
        if state.run is not None and not is_live(state.run.expires_at, now):
            return True
        if state.run is not None and state.expiring and state.expiring[0][0] <= now:
            return True
        if _due(state.items_next_expiry, now):
            return True
        run_dir = self._run_dir(run_key)
        owners = os.path.join(run_dir, _OWNERS)
        if any(os.path.lexists(os.path.join(owners, _sequence_name(s))) for s in state.removing):
            return True
        return any(
            os.path.lexists(os.path.join(run_dir, directory, _item_name(key)))
            for key in state.dropping
            for directory in (_ITEMS, _NESTED)  # a marker left: nested items may be too
        )

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
        """Remove the due checkpoints and items of a live run (or of an items-only one)."""
        leftovers = self._retry_removals(run_key, state)
        failed = self._drop_shared(run_key, state.dropping)
        removed: list[int] = []
        owning: list[int] = []
        committed = msgspec.structs.replace(
            state, removing=tuple(leftovers), dropping=tuple(sorted(failed))
        )
        if state.run is not None:
            ledger = _Ledger(state, state.run, leftovers, failed)
            ledger.remove_expired(now, limit=budget.left)
            budget.spend(len(ledger.removed))
            removed = ledger.removed
            committed = self._settled(run_key, ledger)
            owning = sorted(ledger.owning)
        items: list[str] = []
        if _due(committed.items_next_expiry, now) and not budget.exhausted:
            hint, items = self._expired_items(run_key, now, budget)
            committed = msgspec.structs.replace(committed, items_next_expiry=hint)
        doomed = self._doomed(run_key, owning, committed.dropping)
        files = _Dir(self._run_dir(run_key))
        doomed += [meta.entry for meta in map(files.committed_item, items) if meta is not None]
        if committed != state or doomed:
            self._commit(run_key, committed if committed != state else None, erase=removed,
                         items=_Entries([], doomed, []))
        self._remove_checkpoints(run_key, owning)
        self._drop_shared(run_key, committed.dropping)
        with _after_commit(os.path.join(self._run_dir(run_key), _ITEMS)):
            self._remove_items(run_key, items)
        if committed.run is None and not self._has_items(run_key):
            self._purge_whole_run(run_key, committed, budget)  # an items-only run, now empty
        return len(removed)

    def _expired_items(
        self, run_key: str, now: float, budget: _Budget
    ) -> tuple[float | None, list[str]]:
        """Expired item files (up to the budget) and the new lower bound of item expiry."""
        files = _Dir(self._run_dir(run_key))
        expired: list[str] = []
        remaining: list[float | None] = []
        for name in files.listdir(_ITEMS):
            if len(expired) >= budget.left:
                remaining.append(now)  # unread: assume it may be due
                continue
            path = files.path_of(f"{_ITEMS}/{name}")
            try:
                found = files.item(name, whole=False) if _key_of_name(name) is not None else None
            except CorruptCheckpointError as exc:
                logger.warning("file store: skipping corrupt item %s: %s", exc.key, exc)
                continue
            if found is None:
                logger.warning("file store: skipping foreign file %s", path)
            elif is_live(found[0].expires_at, now):
                remaining.append(found[0].expires_at)
            else:
                expired.append(name)
        budget.spend(len(expired))
        return _min_expiry(remaining), expired

    def _has_items(self, run_key: str) -> bool:
        return bool(_Dir(self._run_dir(run_key)).listdir(_ITEMS))

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
            with self._locked(run_key, items="skip"):
                if self._marker_is_stale(run_key, marker, directory):
                    _discard(os.path.join(self._index, directory, marker))
                    budget.spend(1)

    def _marker_is_stale(self, run_key: str, marker: str, directory: str) -> bool:
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
        ``run.rec``, every checkpoint head of a damaged or expired run."""
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
            if self._damage(key, now) is None:
                continue  # the common case, decided without waiting for the run's writer
            with self._locked(key, items="try"):
                damage = self._damage(key, now)
            if damage is not None:
                found.append(damage)
        return found

    def _damage(self, run_key: str, now: float) -> RunDamage | None:
        files = _Dir(self._run_dir(run_key))
        try:
            keep = self._checked_state(run_key, now, whole=True)
        except CorruptCheckpointError as exc:
            keep, problem = None, _problem(exc)
        else:
            if keep is not None and keep.run is not None:
                return None
            problem = "run.rec is missing" if keep is None else "run.rec holds no run record"
        heads = self._log_heads(run_key, files, keep)
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
        _check_run_key(run_key)
        _check_status(seed.status)
        return await self._call(self._rebuild_run, run_key, seed, now)

    def _rebuild_run(self, run_key: str, seed: RunRecord, now: float) -> RunRecord:
        with self._locked(run_key):
            files = _Dir(self._run_dir(run_key))
            keep: _RunState | None = None
            old: RunRecord | None = None
            try:
                keep = self._checked_state(run_key, now, whole=True)
            except CorruptCheckpointError:  # damaged: the log alone decides
                with contextlib.suppress(CorruptCheckpointError):
                    damaged = files.state()  # readable: another life's, whose marker goes
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
    run_key: str, record: StoredCheckpoint, seed: RunRecord, keep_latest: int | None
) -> None:
    """What every append checks before it takes the run's lock."""
    _check_run_key(run_key)
    _check_status(seed.status)
    if not math.isfinite(seed.created_at):
        raise ValidationError(f"run created_at must be finite, got {seed.created_at}")
    check_keep_latest(keep_latest)
    check_labels(seed.labels)
    _check_record_size(record, seed)


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
    record = renumber(sequence)
    if not isinstance(record, StoredCheckpoint) or record.sequence != sequence or record.refs:
        raise ValidationError(
            f"renumber({sequence}) must return a checkpoint at sequence {sequence} that names "
            "no items")
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
    if cursor is not None and (not isinstance(cursor, str) or not _MARKER.fullmatch(cursor)):
        raise ValidationError(f"not a run listing cursor of the file store: {cursor!r:.80}")
    if limit < 1:
        raise ValidationError(f"limit must be at least 1, got {limit}")


def _appended_items(record: StoredCheckpoint, items: Sequence[Item]) -> list[tuple[str, Item]]:
    """``(file name, item)`` of the items appended with ``record``, the first of each key;
    owned ones expire with it, shared ones live while a checkpoint names them."""
    named: dict[str, Item] = {}
    for item in items:
        expires_at = record.expires_at if item.owner is not None else None
        named.setdefault(_item_name(item.key), msgspec.structs.replace(item, expires_at=expires_at))
    return list(named.items())


def _owned_items(items: Sequence[Item], owner: int) -> list[tuple[str, Item]]:
    named: list[tuple[str, Item]] = []
    for item in items:
        name = _item_name(item.key)
        if item.owner != owner:
            raise ValidationError(
                f"item {item.key[:40]!r} is owned by {item.owner}, not by checkpoint {owner}"
            )
        named.append((name, item))
    return named


def _holds_live_item(files: _Dir, name: str, now: float) -> bool:
    """Whether the run holds a live item at ``name`` (its entry in the log); a corrupt one
    (logged) is not. Under the run lock."""
    found = files.committed_item(name)
    return found is not None and is_live(found.expires_at, now)


def _clear_item_copies(files: _Dir) -> None:
    """Remove the run's item files and markers (copies of its log: made again from it)."""
    for directory in (_ITEMS, _OWNERS, _NESTED):
        _remove_tree(files.path_of(directory))


def _live_items(
    files: _Dir, *, named: Sequence[tuple[str, str]], now: float
) -> list[tuple[str, bytes]]:
    """``(key, value)`` of the live items among ``named`` (``(file name, key)``)."""
    found: list[tuple[str, bytes]] = []
    for name, key in named:
        item = files.item(name, whole=True)
        if item is not None and is_live(item[0].expires_at, now):
            found.append((key, item[1] or b""))
    return found


def _items_made(view: LogView | None) -> int:
    """How many item entries the log has handed out; past every item key it holds when that
    count is damaged (a scan of the log)."""
    if view is None:
        return 0
    try:
        data = view.read(_ITEMS_MADE, check=True)
    except CorruptCheckpointError:
        data = b""
    if data is None:
        return 0  # no item yet: once written, the count is never removed
    if len(data) == _COUNT.size:
        return int(_COUNT.unpack(data)[0])
    keys = [key for key in view.held_keys() if key <= _FIRST_ITEM]
    return _FIRST_ITEM - min(keys) + 1 if keys else 0


def _held_checkpoint(
    files: _Dir, view: _View, sequence: int, now: float
) -> tuple[StoredCheckpoint, str] | None:
    if not view.holds(sequence):
        return None
    found = files.checkpoint(sequence, now)
    return None if found is None else (found, view.status)


def _items_of(files: _Dir, record: StoredCheckpoint, now: float) -> dict[str, bytes]:
    """The live items ``record`` owns, those its refs name and those nested under them:
    O(owned + refs) reads, plus, for a ref with nested items, one listing of its nesting
    markers and a read per nested item."""
    found = _owned_and_named(files, record, now)
    anchors = [key for key in dict.fromkeys(record.refs)
               if files.exists(f"{_NESTED}/{_item_name(key)}")]
    if not anchors:
        return found
    done = {_item_name(key) for key in found}  # read already, as a ref or an owned item
    for anchor in anchors:
        for name in files.listdir(f"{_NESTED}/{_item_name(anchor)}"):
            item = None if name in done else _nested_item(files, name)
            done.add(name)  # refs nested in one another mark the same items
            if item is not None and is_live(item[0].expires_at, now):
                found[item[0].key] = item[1] or b""
    return found


def _nested_item(files: _Dir, name: str) -> tuple[_ItemMeta, bytes | None] | None:
    """The item at ``name`` (its key checked against the name as it is read); a foreign
    file is skipped (logged), a corrupt item raises as any item of a read does."""
    try:
        return files.item(name, whole=True)
    except CorruptCheckpointError:
        if _key_of_name(name) is not None:
            raise
        logger.warning("file store: skipping foreign file %s", files.path_of(f"{_ITEMS}/{name}"))
        return None


def _owned_and_named(files: _Dir, record: StoredCheckpoint, now: float) -> dict[str, bytes]:
    """The live items ``record`` owns and those its refs name."""
    found: dict[str, bytes] = {}
    for name in files.listdir(f"{_OWNERS}/{_sequence_name(record.sequence)}"):
        key = _key_of_name(name)
        item = None if key is None else files.item(name, whole=True)
        if key is None or item is None or not is_live(item[0].expires_at, now):
            continue
        # A marker outlives an item rewritten with another owner: the item's owner decides.
        if item[0].owner == record.sequence:
            found[key] = item[1] or b""
    for key in record.refs:
        item = None if key in found else files.item(_item_name(key), whole=True)
        if item is not None and is_live(item[0].expires_at, now):
            found[key] = item[1] or b""
    return found


def _shared_of(heads: Sequence[_Head]) -> _Shared:
    """The shared items' bookkeeping of a log: what ``run.rec`` keeps, rebuilt."""
    counts: dict[str, int] = {}
    for head in heads:
        for key in dict.fromkeys(head.refs):
            counts[key] = counts.get(key, 0) + 1
    referring = tuple(sorted(head.sequence for head in heads if head.refs))
    return _Shared(counts=counts, referring=referring)


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


def _scan_order(
    files: _Dir, prefix: str, start_after: str | None, reverse: bool
) -> list[tuple[str, str]]:
    """``(key, file name)`` of the run's items in scan order, before expiry filtering."""
    keyed: list[tuple[str, str]] = []
    for name in files.listdir(_ITEMS):
        key = _key_of_name(name)
        if key is None:
            path = files.path_of(f"{_ITEMS}/{name}")
            logger.warning("file store: skipping foreign file %s", path)
        elif key.startswith(prefix) and (
            start_after is None or (key < start_after if reverse else key > start_after)
        ):
            keyed.append((key, name))
    keyed.sort(reverse=reverse)
    return keyed


class FileCheckpointStore(FileStore):
    """FastAgentic's name and constructor for the file store: ``FileCheckpointStore(base_path)``."""

    def __init__(self, base_path: str | os.PathLike[str], **options: Any) -> None:
        super().__init__(base_path, **options)

    @property
    def base_path(self) -> Path:
        """The store's directory, as FastAgentic's store exposes it."""
        return Path(self._root)
