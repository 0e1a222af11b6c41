"""The record log of a file-store run: its records in one append-only file, and its index.

A run's records (its run record, one record per checkpoint, and the items the store keeps for
the run) live in ``log``, the run's only file that a create writes to::

    log   header (magic, format version, a random log id), then entries, appended in commits
    idx   where the newest entry of each key is: a header (the log id it indexes, the boot it
          was written in, how far it covers the log, how many bytes are live, how long it is)
          and one 16-byte slot per key, at a fixed place (keys 0 and up at odd slots,
          negative keys at even ones: the run record's key, -1, first)

An entry is an envelope (magic, operation, flags "first" and "last of its commit", key, data
length, CRC-32 of the data, CRC-32 of the envelope) and the data. A commit appends its
entries with one ``pwrite`` and makes them durable with one ``fdatasync``; it then updates
``idx`` without syncing it. ``idx`` is a cache: a reader checks every slot it uses (its CRC,
the entry's envelope and key) and reads the commits appended after what ``idx`` covers; an
``idx`` that is missing, damaged, cut short, of another log or of an earlier boot (unsynced,
its pages may have reached the disk in any order) is replaced by a scan of the log, and a new
one is written under the run's lock (:meth:`LogWriter.reindex`, or the next commit). So a reader
reads a record in O(1) of the run's length, and a create costs one write and one sync.

Torn tails and damage: a commit counts once all its entries, first to last, are in place with
intact envelopes, and the last commit's data matches its CRCs. A commit left incomplete or
torn at the end is what a crash (or a commit in progress) leaves: readers ignore it, the next
writer cuts it off. Unreadable bytes before a complete commit are damage: whose entry they
held cannot be known, so every key found before them reads as damaged (never as an older
entry, or as absent), and the log is not compacted (the damage stays visible).

Compaction: once the dead bytes (entries replaced or removed since) exceed the live ones and
256 KiB, :meth:`LogWriter.commit` says so, and the store compacts the log once it has
released the run's lock: the live entries of what ``idx`` covers are copied into a new log
(new id) in the store's ``tmp/`` and synced without the lock; holding it, the commits made
since are added whole, the new log is synced, renamed over ``log``, the directory synced, and
a new ``idx`` written. A crash leaves either log whole; readers that opened the old one keep
reading it. The copy's file is made under the lock and holds a ``flock`` on itself, so that
the store's sweep of crashed writers' temporary files (which takes the run lock) leaves it
alone.

Writers hold the run's lock (the caller's); readers take none.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import secrets
import stat
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

from fastcheckpoint.errors import CorruptCheckpointError

__all__ = [
    "INDEX",
    "LOG",
    "MIN_KEY",
    "RUN",
    "CachedReadsUnsupported",
    "Changes",
    "Located",
    "LogView",
    "LogWriter",
    "Record",
    "WouldWait",
    "affordable",
    "cached_only",
    "cached_reads_supported",
    "no_waiting",
    "open_view",
    "pread",
    "take",
]

logger = logging.getLogger("fastcheckpoint.stores.file")

LOG = "log"
INDEX = "idx"
RUN = -1
"""The key of the run record; checkpoints are keyed by their sequence (0 and up), and the
store keys what else it keeps below -1 (:data:`MIN_KEY` and up)."""

_LOG_MAGIC = b"FClg"
_INDEX_MAGIC = b"FCix"
_ENTRY_MAGIC = b"FCle"
_VERSION = 3
"""Of the log format (2: envelope CRCs seeded with the log id; 3: negative keys below the run
record's)."""
_INDEX_VERSION = 4
"""Of the ``idx`` format (3: slots laid out for negative keys; 4: its length in its header). An
``idx`` of another version is rebuilt from the log, as a damaged one is."""
_PUT = 1
_REMOVE = 2
_FIRST = 1
_LAST = 2

# Log header: magic, version, reserved, log id, CRC of the preceding fields, padding.
_LOG_HEADER = struct.Struct("<4sHH16sI4x")
# Entry envelope: magic, operation, flags, reserved (2), key, data length, data CRC |
# envelope CRC. Flags: the first entry of its commit, the last one.
_ENVELOPE = struct.Struct("<4sBB2xqII")
_ENVELOPE_CRC = struct.Struct("<I")
_ENTRY = _ENVELOPE.size + _ENVELOPE_CRC.size
# Index header: magic, version, reserved, log id, boot, end, live bytes, length, CRC | padding
# to 80. The length is how long its writers made it: a slot within it that cannot be read is
# of an idx cut short (damage), not a key without an entry.
_INDEX_HEADER = struct.Struct("<4sHH16s16sQQQI")
_INDEX_START = 80
# Slot: entry offset + 1 (0: none), data length, CRC of (key, offset, length).
_SLOT = struct.Struct("<QII")
_SLOT_CRC = struct.Struct("<qQI")

_MAX_KEY = (1 << 56) - 1
MIN_KEY = -_MAX_KEY
"""The lowest key an entry takes."""
MAX_DATA = (1 << 32) - 2
"""The largest record a log entry holds (its length is 32 bits; one value marks damage)."""
_DAMAGED = (1 << 32) - 1
"""The length a slot gives a key whose newest entry is unreadable (the scan that made the
slot found unreadable bytes after the entry it points at)."""
_SCAN_CHUNK = 64 << 10
_CHANGES_CHUNK = 4 << 10
_COMPACT_MIN_DEAD = 256 << 10
"""A log is compacted once its dead bytes exceed both this and its live bytes."""
_OPEN_ATTEMPTS = 3

_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
_NOATIME: int = getattr(os, "O_NOATIME", 0)
"""Reads leave the files' access times alone where the platform allows it (Linux, files of
the process's own user): no inode write, which a read on the event loop's thread must not
wait for."""
_WRITE_FLAGS = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW


@functools.cache
def _boot() -> bytes:
    """This boot of the machine, as 16 bytes: an ``idx`` written before the last reboot is
    not used (unsynced, its pages may have reached the disk in any order)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as source:
            return uuid.UUID(source.read().strip()).bytes
    except (OSError, ValueError):
        # No boot id (not Linux): the boot time to ten seconds, from a clock that runs while
        # the machine sleeps. A clock step makes readers scan and idx be rebuilt once; a
        # reboot always changes it.
        clock = getattr(time, "CLOCK_MONOTONIC", None)
        since_boot = time.monotonic() if clock is None else time.clock_gettime(clock)
        return struct.pack("<q8x", round((time.time() - since_boot) / 10))


class Located(NamedTuple):
    """Where a key's newest entry is: the envelope's offset and the data's length."""

    offset: int
    size: int


_REMOVED = Located(-1, -1)
_BEYOND = Located(-2, -2)
_BAD = Located(-3, -3)


class Record(NamedTuple):
    """A record read from the log: its data (the first bytes asked for), its whole length,
    and where its entry is (to read more of the same entry)."""

    data: bytes
    size: int
    at: Located


def _slot_offset(key: int) -> int:
    # RUN (-1) first, right after the header (its slot is written with it); then keys 0, -2,
    # 1, -3, ...: both ranges grow without bound and ``idx`` stays as long as they go.
    return _INDEX_START + _SLOT.size * (2 * key + 1 if key >= 0 else -2 * key - 2)


def _slot_bytes(key: int, found: Located | None) -> bytes:
    if found is None:
        return bytes(_SLOT.size)
    crc = zlib.crc32(_SLOT_CRC.pack(key, found.offset + 1, found.size))
    return _SLOT.pack(found.offset + 1, found.size, crc)


def _check_key(key: int) -> None:
    if not MIN_KEY <= key <= _MAX_KEY:
        raise ValueError(f"log key out of range: {key}")


def seed_of(log_id: bytes) -> int:
    """What the envelope CRCs of the log ``log_id`` start from: an entry checks only in its
    own log, so bytes that look like entries (a payload holding a copy of another log, say)
    are never taken for one when a scan looks for the next entry after damage."""
    return zlib.crc32(log_id)


def entry_bytes(
    key: int, data: bytes | None, *, seed: int, first: bool = True, last: bool = True
) -> bytes:
    """An entry that puts ``data`` under ``key`` (``None``: removes the key) in the log whose
    envelopes start from ``seed`` (:func:`seed_of`); ``first`` and ``last`` mark the first and
    last entries of its commit."""
    _check_key(key)
    if data is not None and len(data) > MAX_DATA:
        raise ValueError(f"log entry of {len(data)} bytes is too large")
    body = b"" if data is None else data
    flags = (_FIRST if first else 0) | (_LAST if last else 0)
    envelope = _ENVELOPE.pack(
        _ENTRY_MAGIC, _REMOVE if data is None else _PUT, flags, key, len(body), zlib.crc32(body))
    return b"".join((envelope, _ENVELOPE_CRC.pack(zlib.crc32(envelope, seed)), body))


def _commit_entries(
    operations: Sequence[tuple[int, bytes | None]], start: int, seed: int
) -> tuple[list[bytes], dict[int, Located | None]]:
    """The entries of one commit of ``operations`` written at ``start``, and where each
    key's entry lands (``None``: removed)."""
    pieces: list[bytes] = []
    located: dict[int, Located | None] = {}
    offset = start
    for number, (key, data) in enumerate(operations):
        entry = entry_bytes(
            key, data, seed=seed, first=number == 0, last=number == len(operations) - 1)
        located[key] = None if data is None else Located(offset, len(data))
        pieces.append(entry)
        offset += len(entry)
    return pieces, located


def _log_header(log_id: bytes) -> bytes:
    fields = _LOG_HEADER.pack(_LOG_MAGIC, _VERSION, 0, log_id, 0)[:24]
    return _LOG_HEADER.pack(_LOG_MAGIC, _VERSION, 0, log_id, zlib.crc32(fields))


def _index_header(log_id: bytes, end: int, live: int, length: int) -> bytes:
    fields = _INDEX_HEADER.pack(
        _INDEX_MAGIC, _INDEX_VERSION, 0, log_id, _boot(), end, live, length, 0)[:-4]
    crc = zlib.crc32(fields)
    return _INDEX_HEADER.pack(_INDEX_MAGIC, _INDEX_VERSION, 0, log_id, _boot(), end, live, length,
                              crc).ljust(_INDEX_START, b"\0")


def _index_length(keys: Iterable[int], length: int = _INDEX_START) -> int:
    """How long ``idx`` is once the slots of ``keys`` are written (``length``: before)."""
    return max([length, *(_slot_offset(key) + _SLOT.size for key in keys)])


class WouldWait(Exception):
    """Raised within :func:`cached_only` where the operation would wait: for the disk (its
    data is not in the page cache), for a lock, or for more reading than an event loop should
    be held up by. The caller runs the operation again in a worker thread."""


class CachedReadsUnsupported(WouldWait):
    """The file system (or the platform) cannot read from the page cache only."""


_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)
_CACHED_BUDGET = 1 << 20
"""How many bytes an operation within :func:`cached_only` may read before it is handed to a
worker thread: about a millisecond of checking and decoding at most."""


class _CachedOnly(threading.local):
    def __init__(self) -> None:
        self.active = False
        self.budget = 0


_CACHED = _CachedOnly()


def cached_reads_supported() -> bool:
    """Whether this platform can read without waiting for the disk (Linux ``RWF_NOWAIT``)."""
    return _NOWAIT is not None


@contextlib.contextmanager
def cached_only() -> Iterator[None]:
    """Within: this thread's reads (:func:`pread`) come from the page cache only, up to a
    budget of bytes, and raise :class:`WouldWait` where they would wait for the disk, as
    :func:`no_waiting` does where the caller would take a lock. For a read-only operation
    run on an event loop's own thread (run again in a worker thread where it would wait)."""
    if _NOWAIT is None:
        raise CachedReadsUnsupported
    assert not _CACHED.active, "cached_only does not nest"
    _CACHED.active, _CACHED.budget = True, _CACHED_BUDGET
    try:
        yield
    finally:
        _CACHED.active = False


def affordable(size: int) -> None:
    """Within :func:`cached_only`, raise :class:`WouldWait` at once when ``size`` more bytes
    are beyond the budget (rather than read up to it and hand the operation over then)."""
    if _CACHED.active and size > _CACHED.budget:
        raise WouldWait


def no_waiting() -> None:
    """Raise :class:`WouldWait` within :func:`cached_only`: the caller is about to wait (for a
    lock, say)."""
    if _CACHED.active:
        raise WouldWait


@contextlib.contextmanager
def take(lock: threading.Lock) -> Iterator[None]:
    """Hold ``lock``; within :func:`cached_only`, raise :class:`WouldWait` if it is busy."""
    if not lock.acquire(blocking=not _CACHED.active):
        raise WouldWait
    try:
        yield
    finally:
        lock.release()


def pread(fd: int, size: int, offset: int) -> bytes:
    """Up to ``size`` bytes at ``offset`` (fewer only at the end of the file)."""
    if _CACHED.active:
        return _pread_cached(fd, size, offset)
    data = os.pread(fd, size, offset)
    if len(data) == size or not data:
        return data
    chunks = [data]
    got = len(data)
    while got < size:
        chunk = os.pread(fd, size - got, offset + got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _pread_cached(fd: int, size: int, offset: int) -> bytes:
    """:func:`pread` from the page cache only."""
    assert _NOWAIT is not None
    _CACHED.budget -= size
    if _CACHED.budget < 0:
        raise WouldWait
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        try:
            count = os.preadv(fd, [view[got:]], offset + got, _NOWAIT)
        except BlockingIOError:
            raise WouldWait from None
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                raise CachedReadsUnsupported from None
            raise
        if not count:
            break
        got += count
    view.release()
    if got < size:
        del buffer[got:]
    return bytes(buffer)


class _Envelope(NamedTuple):
    operation: int
    first: bool
    last: bool
    key: int
    size: int
    crc: int


def _envelope(raw: bytes | memoryview, seed: int) -> _Envelope | None:
    """The envelope at the start of ``raw`` if it is one of the log whose envelopes start
    from ``seed`` (magic, CRC, operation, key)."""
    if len(raw) < _ENTRY:
        return None
    magic, operation, flags, key, size, crc = _ENVELOPE.unpack_from(raw)
    if magic != _ENTRY_MAGIC or operation not in (_PUT, _REMOVE) or \
            flags & ~(_FIRST | _LAST) or not MIN_KEY <= key <= _MAX_KEY:
        return None
    if zlib.crc32(raw[: _ENVELOPE.size], seed) != \
            _ENVELOPE_CRC.unpack_from(raw, _ENVELOPE.size)[0]:
        return None
    if operation == _REMOVE and size:
        return None
    return _Envelope(operation, bool(flags & _FIRST), bool(flags & _LAST), key, size, crc)


class _Scan(NamedTuple):
    found: dict[int, Located]
    """Newest entry per key over the range scanned (``_REMOVED``: removed there)."""
    end: int
    """Where the last complete commit ends."""
    damaged: dict[int, Located]
    """Keys whose newest entry may not be the one found: its data fails its CRC, or bytes the
    scan could not read (a damaged entry) follow it. Reading one raises."""
    live: int
    gaps: bool
    """Whether the range holds unreadable bytes before its last complete commit."""


class Changes(NamedTuple):
    """What the commits of a range of the log did (:meth:`LogView.changes`)."""

    found: dict[int, Located | None]
    """Newest entry per key in the range (``None``: removed there)."""
    damaged: dict[int, Located]
    """Keys whose newest entry may not be the one found (unreadable bytes follow it)."""
    end: int
    """Where the range's last complete commit ends."""
    gaps: bool
    """Whether the range holds unreadable bytes before its last complete commit."""


_Entry = tuple[int, Located, int]
"""An entry of a commit being read: key, where (or ``_REMOVED``), data CRC."""


def _scan(
    fd: int, start: int, size: int, seed: int, *, read: bool = False, chunk: int = _SCAN_CHUNK,
    committed: int = 0,
) -> _Scan:
    """Read the commits in ``[start, size)``.

    A commit counts once its entries, from its first to its last, are in place and their
    envelopes intact. A commit left incomplete or damaged at the end of the range is a torn
    tail (or one being written): ignored. Data is checked (CRC) in that last commit only;
    the records' own checksums catch damage elsewhere when they are read. Unreadable bytes
    (a damaged envelope) before a complete commit are damage: every key found before them
    reads as damaged (the bytes may have held a newer entry of it), never as its older entry.
    ``read``: the range holds only commits a scan found whole before (their data is not
    checked again). ``chunk``: how much one ``pread`` reads ahead. ``committed``: where
    commits known to be whole end (what ``idx`` covered): bytes before it that do not read as
    whole commits are damage, never a torn tail, and the entries of a commit cut short by
    unreadable bytes read as damaged, never as absent or as their older entries.
    """
    commits: list[tuple[list[_Entry], bool, int, list[_Entry]]] = []
    pending: list[_Entry] | None = None
    orphans: list[_Entry] = []
    """Entries of commits whose other entries are unreadable (since the last whole commit)."""
    gap = False
    offset = start
    buffer = b""
    base = start  # file offset of buffer[0]

    def window(at: int, need: int) -> bytes:
        nonlocal buffer, base
        if at < base or at + need > base + len(buffer):
            buffer = pread(fd, min(max(need, chunk), size - at), at)
            base = at
        return buffer[at - base : at - base + need]

    while offset + _ENTRY <= size:
        envelope = _envelope(window(offset, _ENTRY), seed)
        if envelope is None:
            orphans += pending or ()
            pending, gap = None, True  # a commit missing an entry never counts
            offset = _resync(fd, offset + 1, size, seed)
            continue
        stop = offset + _ENTRY + envelope.size
        if stop > size:
            break  # incomplete: a torn tail, or a commit still being written
        if envelope.first:
            if pending is not None:
                orphans += pending
                gap = True  # a commit that never got its last entry
            pending = []
        elif pending is None:
            gap = True  # an entry of a commit whose start is unreadable
            located = Located(offset, envelope.size) if envelope.operation == _PUT else _REMOVED
            orphans.append((envelope.key, located, envelope.crc))
            offset = stop
            continue
        located = Located(offset, envelope.size) if envelope.operation == _PUT else _REMOVED
        pending.append((envelope.key, located, envelope.crc))
        offset = stop
        if envelope.last:
            commits.append((pending, gap, stop, orphans))
            pending, gap, orphans = None, False, []
    if commits and not read and commits[-1][2] > committed and \
            not _intact(fd, commits[-1][0]):
        commits.pop()  # torn: the newest commit's bytes never all reached the disk
    lost = [*orphans, *(pending or ())]
    return _scanned(commits, lost, commits[-1][2] if commits else start, min(committed, size))


def _scanned(
    commits: Sequence[tuple[list[_Entry], bool, int, list[_Entry]]], lost: Sequence[_Entry],
    end: int, committed: int,
) -> _Scan:
    """What :func:`_scan` found: the commits read whole, each with the entries of the
    commits cut short before it (``lost``: those after the last), ending at ``end``, of a
    range whose commits are known whole up to ``committed``."""
    found: dict[int, Located] = {}
    damaged: dict[int, Located] = {}
    gaps = False

    def unreadable(entries: Sequence[_Entry]) -> None:
        nonlocal found, gaps
        gaps = True
        damaged.update((key, at) for key, at in found.items() if at is not _REMOVED)
        damaged.update((key, at) for key, at, _ in entries if at is not _REMOVED)
        found = {key: at for key, at in found.items() if at is _REMOVED}

    for entries, gap, _, orphans in commits:
        if gap:
            unreadable(orphans)
        for key, located, _ in entries:
            found[key] = located
            damaged.pop(key, None)
    if end < committed:
        # Whole commits end there: what is between was committed, and is unreadable.
        unreadable(lost)
        end = committed
    live = sum(_ENTRY + at.size for at in found.values() if at is not _REMOVED)
    return _Scan(found, end, damaged, live, gaps)


def _intact(fd: int, entries: Sequence[_Entry]) -> bool:
    """Whether the data of a commit's entries matches their CRCs."""
    for _, located, crc in entries:
        if located is _REMOVED:
            continue
        data = pread(fd, located.size, located.offset + _ENTRY)
        if len(data) != located.size or zlib.crc32(data) != crc:
            return False
    return True


def _resync(fd: int, offset: int, size: int, seed: int) -> int:
    """The offset of the next valid envelope at or after ``offset`` (``size`` if none)."""
    while offset + _ENTRY <= size:
        chunk = pread(fd, min(_SCAN_CHUNK, size - offset), offset)
        if not chunk:
            return size  # the file got shorter (a writer cut a torn tail)
        at = chunk.find(_ENTRY_MAGIC)
        while at >= 0:
            if _envelope(pread(fd, _ENTRY, offset + at), seed) is not None:
                return offset + at
            at = chunk.find(_ENTRY_MAGIC, at + 1)
        # A magic may straddle the chunk's end: look again from its last bytes.
        offset += max(len(chunk) - len(_ENTRY_MAGIC) + 1, 1)
    return size


class _Index(NamedTuple):
    fd: int
    log_id: bytes
    end: int
    live: int
    length: int
    """How long its writers made it (a shorter ``idx`` was cut short)."""


def _read_index(fd: int, log_id: bytes) -> _Index | None:
    """``idx`` if it is intact, indexes the log ``log_id`` and was written since this boot."""
    raw = pread(fd, _INDEX_START, 0)
    if len(raw) < _INDEX_HEADER.size:
        return None
    magic, version, _, found_id, boot, end, live, length, crc = _INDEX_HEADER.unpack_from(raw)
    if magic != _INDEX_MAGIC or version != _INDEX_VERSION or found_id != log_id or \
            boot != _boot():
        return None
    if zlib.crc32(raw[: _INDEX_HEADER.size - 4]) != crc or end < _LOG_HEADER.size:
        return None
    return _Index(fd, found_id, end, live, length)


def _read_log_id(fd: int, path: str) -> bytes:
    raw = pread(fd, _LOG_HEADER.size, 0)
    if len(raw) < _LOG_HEADER.size:
        raise CorruptCheckpointError("record log shorter than its header", key=path)
    magic, version, _, log_id, crc = _LOG_HEADER.unpack(raw)
    if magic != _LOG_MAGIC:
        raise CorruptCheckpointError(f"not a record log (magic {magic!r})", key=path)
    if version != _VERSION:
        raise CorruptCheckpointError(f"unsupported record log version {version}", key=path)
    if zlib.crc32(raw[:24]) != crc:
        raise CorruptCheckpointError("record log header checksum mismatch", key=path)
    return bytes(log_id)


class LogView:
    """A run's log as one operation sees it: open descriptors, closed by :meth:`close`.

    Lookups go through ``idx`` where it is usable; the entries after what it covers come from
    a scan made when the view opens. A slot that does not match the log (a damaged ``idx``)
    turns the view into one that scanned the whole log.
    """

    def __init__(
        self, path: str, fd: int, log_id: bytes, size: int, index: _Index | None, tail: _Scan,
        *, writable: bool = False, index_writable: bool = False,
    ) -> None:
        self.path = path
        self.fd = fd
        self.writable = writable
        """Whether ``fd`` is open for writing too (a view its writer opened under the run
        lock commits through it)."""
        self.index_writable = index_writable
        """The same for the index's descriptor."""
        self.log_id = log_id
        self.seed = seed_of(log_id)
        self.current = index is not None
        """Whether ``idx`` was usable when the view opened: intact, of this log, and written
        since this boot (so what its writers wrote unsynced since is in place)."""
        self.size = size
        self.index = index
        self.known_whole = 0
        """Where commits known whole end, once ``idx`` is dropped (what it covered)."""
        self.tail = tail
        """Entries after what ``index`` covers (all of them without an index)."""
        self._own: list[tuple[int, int, dict[int, Located | None]]] = []
        """The commits its writer appended through the view: start, end, where each key's
        entry went (``None``: removed)."""
        self._written: dict[int, bytes] = {}
        """The data of their entries, by where each entry is: read from here, not the file."""
        self.expected: Callable[[int], bool] | None = None
        """Whether the log holds a key, as far as what the reader read from it so far (its
        run record) tells: a zeroed slot of such a key is damage to ``idx`` (a page of it
        zeroed), not a key without an entry. Forgotten once the view moves on."""

    @property
    def end(self) -> int:
        """Where the last complete commit ends."""
        return self.tail.end

    @property
    def live(self) -> int:
        """Bytes of the live entries (envelopes included)."""
        if self.index is None:
            return self.tail.live
        live = self.index.live
        for key, found in self.tail.found.items():
            old = self._indexed(key)  # the entry the tail replaced, if idx knew it
            if old is _BAD:
                self._rescan()
                return self.tail.live
            if old is not None and old is not _BEYOND and old.size != _DAMAGED:
                live -= _ENTRY + old.size
            if found is not _REMOVED:
                live += _ENTRY + found.size
        return live

    @property
    def indexed(self) -> bool:
        """Whether lookups go through ``idx`` (else the view scanned the whole log)."""
        return self.index is not None

    @property
    def settled(self) -> bool:
        """Whether ``idx`` covers every commit the view saw. Not so while a writer is between
        its commit and the update of ``idx`` (or its commit failed and is being cut off
        again), after a crash there, or without a usable ``idx``: a reader then waits for the
        run's writer (and may write ``idx`` itself, :meth:`LogWriter.reindex`)."""
        return self.index is not None and not self.tail.found and not self.tail.damaged

    def close(self) -> None:
        try:
            os.close(self.fd)
        finally:
            self._drop_index()

    def _drop_index(self) -> None:
        # Dropped before it is closed: a close that fails has released the descriptor all
        # the same, and closing it again could close another file that took its number.
        index, self.index = self.index, None
        if index is not None:
            os.close(index.fd)

    def __enter__(self) -> LogView:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _indexed(self, key: int) -> Located | None:
        """``key``'s slot in ``idx`` (``_BEYOND``: a commit made since the view opened,
        ``_BAD``: a slot that does not check)."""
        assert self.index is not None
        offset = _slot_offset(key)
        raw = pread(self.index.fd, _SLOT.size, offset)
        if len(raw) < _SLOT.size:
            # Past the end of idx: no entry, unless idx was cut short (its header tells).
            return _BAD if offset + _SLOT.size <= self.index.length else None
        if raw == bytes(_SLOT.size):
            return _BAD if self.expected is not None and self.expected(key) else None
        stored, size, crc = _SLOT.unpack(raw)
        if zlib.crc32(_SLOT_CRC.pack(key, stored, size)) != crc or stored == 0:
            return _BAD
        found = Located(stored - 1, size)
        if size == _DAMAGED:
            return found if found.offset < self.index.end else _BEYOND
        return found if found.offset + _ENTRY + found.size <= self.index.end else _BEYOND

    def _advance(self) -> bool:
        """Catch up with commits made since the view opened (idx's header and the log's tail
        read again); ``False`` when ``idx`` no longer describes this log."""
        assert self.index is not None
        index = _read_index(self.index.fd, self.log_id)
        size = os.fstat(self.fd).st_size  # after idx: a commit idx covers is in the log
        if index is None or index.end > size:
            return False
        self.expected = None
        self.index, self.size = index, size
        self.tail = _scan(self.fd, index.end, size, self.seed)
        return True

    def find(self, key: int) -> Located | None:
        """Where ``key``'s newest entry is, ``None`` when the log holds none.

        A slot past what the view has read (a commit made since) moves the view forward; a
        slot that does not check makes it drop ``idx`` and scan the whole log.
        """
        if not MIN_KEY <= key <= _MAX_KEY:
            return None  # no entry can hold it
        for _ in range(_OPEN_ATTEMPTS):
            found = self.tail.found.get(key) or self.tail.damaged.get(key)
            if found is not None:
                return None if found is _REMOVED else found
            if self.index is None:
                return None
            found = self._indexed(key)
            if found is _BAD or (found is _BEYOND and not self._advance()):
                self._rescan()
            elif found is not _BEYOND:
                return found
        self._rescan()  # commits kept coming: read the log as it is now
        found = self.tail.found.get(key) or self.tail.damaged.get(key)
        return None if found is None or found is _REMOVED else found

    def read(self, key: int, *, limit: int | None = None, check: bool = False) -> bytes | None:
        """``key``'s data (its first ``limit`` bytes), ``None`` when absent. ``check`` also
        verifies the data's CRC (callers whose data carries its own checksums skip it)."""
        found = self.read_sized(key, limit, check=check)
        return None if found is None else found.data

    def read_sized(
        self, key: int, limit: int | None = None, *, check: bool = False,
        at: Located | None = None,
    ) -> Record | None:
        """``key``'s data (its first ``limit`` bytes), its whole length and where its entry
        is; ``None`` when absent. ``at``: read that entry (found by an earlier read), not
        the key's newest one.

        An entry ``idx`` points at that does not check makes the view scan the whole log and
        look again; a key the scan found damaged raises.
        """
        while True:
            found = self.find(key) if at is None else at
            if found is None:
                return None
            problem = None
            if at is None and (key in self.tail.damaged or found.size == _DAMAGED):
                problem = "the log holds unreadable bytes after this record's newest entry"
            data = b""
            own = self._written.get(found.offset) if problem is None else None
            if own is not None and len(own) == found.size:
                return Record(own if limit is None else own[:limit], found.size, found)
            if problem is None:
                want = found.size if limit is None else min(limit, found.size)
                raw = pread(self.fd, _ENTRY + want, found.offset)
                envelope = _envelope(raw, self.seed)
                data = raw[_ENTRY:]
                if envelope is None or envelope.key != key or envelope.size != found.size or \
                        envelope.operation != _PUT:
                    problem = "damaged log entry"
                elif len(data) < want:
                    problem = "log ends inside an entry"
                elif check and want == found.size and zlib.crc32(data) != envelope.crc:
                    problem = "log entry fails its data checksum"
            if problem is None:
                return Record(data, found.size, found)
            if at is not None or not self.indexed:
                raise CorruptCheckpointError(f"{problem} (key {key})", key=self.path)
            assert self.index is not None
            covered = found.offset < self.index.end
            self._rescan()
            again = self.find(key)
            if covered and (again is None or again.offset < found.offset):
                # idx (its slot checked) put the key's newest entry in a commit it covers,
                # whose envelope is now unreadable: damage, never an older entry or none.
                raise CorruptCheckpointError(f"{problem} (key {key})", key=self.path)

    def committed(
        self, end: int, placed: dict[int, Located | None], written: Mapping[int, bytes],
    ) -> None:
        """Take in the commit its writer (holding the run lock) just appended through this
        view at :attr:`end`, ending at ``end`` (``placed``: where its keys' entries are,
        ``None`` for a removed key; ``written``: the data of its entries, by where each is):
        the view then reads as one opened after the commit would, and reads the commit's
        entries (:meth:`changes`, :meth:`read_sized`) from memory."""
        self._own.append((self.tail.end, end, placed))
        self._written.update(written)
        found = dict(self.tail.found)
        damaged = dict(self.tail.damaged)
        for key, at in placed.items():
            found[key] = _REMOVED if at is None else at
            damaged.pop(key, None)  # a newer entry than the one damage may hide
        # Counted as a scan counts it (the writer's own count can differ on a damaged log).
        tail_live = sum(_ENTRY + at.size for at in found.values() if at is not _REMOVED)
        self.tail = self.tail._replace(found=found, end=end, damaged=damaged, live=tail_live)
        self.size = end

    def indexed_to(self, end: int, live: int, length: int) -> None:
        """``idx`` now covers every commit up to ``end`` (its writer updated it in place,
        through the file this view reads), with ``live`` bytes live, and is ``length`` long."""
        assert self.index is not None
        self.expected = None
        self.index = self.index._replace(end=end, live=live, length=length)
        self.tail = _Scan({}, end, {}, 0, False)

    def _rescan(self) -> None:
        committed = self.index.end if self.index is not None else self.known_whole
        self._drop_index()
        self.known_whole = committed
        self.size = os.fstat(self.fd).st_size
        self.tail = _scan(self.fd, _LOG_HEADER.size, self.size, self.seed, committed=committed)

    def scan(self) -> _Scan:
        """Every commit of the log (for repairs, listings and compaction): O(log)."""
        if self.index is None:
            return self.tail  # scanned from the start when the view opened
        return _scan(self.fd, _LOG_HEADER.size, self.size, self.seed, committed=self.index.end)

    def changes(self, start: int | None, end: int) -> Changes:
        """What the commits in ``[start, end)`` did (from the first commit when ``start`` is
        ``None``): ``start`` is where a commit begins (the end of an earlier range), ``end``
        at most the view's :attr:`end`, so the range holds commits found whole already. Reads
        the envelopes in 4 KiB windows (a large entry's data is skipped, a small one's read
        with its neighbours'), and checks no data: O(entries in the range)."""
        if end > self.end:
            raise ValueError(f"changes up to {end}, past the view's end {self.end}")
        own = self._own_changes(start, end)
        if own is not None:
            return own
        first = _LOG_HEADER.size if start is None else start
        scan = _scan(self.fd, first, end, self.seed, read=True, chunk=_CHANGES_CHUNK,
                     committed=end)
        found = {key: None if at is _REMOVED else at for key, at in scan.found.items()}
        return Changes(found, scan.damaged, scan.end, scan.gaps)

    def _own_changes(self, start: int | None, end: int) -> Changes | None:
        """:meth:`changes` of a range that is exactly commits made through this view."""
        found: dict[int, Located | None] = {}
        at = start
        for first, last, placed in self._own:
            if at is None or first < at:
                continue
            if first > at:
                return None
            found.update(placed)
            at = last
            if at == end:
                return Changes(found, {}, end, False)
        return None

    def held_keys(self) -> list[int]:
        """Every key the log holds, damaged ones included (a scan of the whole log)."""
        scan = self.scan()
        present = {key for key, found in scan.found.items() if found is not _REMOVED}
        return sorted(present | scan.damaged.keys())


def _open(directory_fd: int | None, directory: str, name: str, flags: int) -> int | None:
    target = name if directory_fd is not None else os.path.join(directory, name)
    try:
        return os.open(target, flags, dir_fd=directory_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise CorruptCheckpointError(
                f"not a record log ({os.strerror(exc.errno)})",
                key=os.path.join(directory, name)) from exc
        if exc.errno == errno.EISDIR:  # opened for writing, a directory in its place
            what = "record log" if name == LOG else "record log index"
            raise CorruptCheckpointError(
                f"{what} is not a regular file", key=os.path.join(directory, name)) from exc
        raise


def _replaced(directory_fd: int | None, directory: str, fd: int) -> bool:
    """Whether ``log`` now names another file than the one open as ``fd``."""
    target = LOG if directory_fd is not None else os.path.join(directory, LOG)
    try:
        now = os.stat(target, dir_fd=directory_fd, follow_symlinks=False)
    except FileNotFoundError:
        return True
    return not os.path.samestat(now, os.fstat(fd))


def _open_view_file(
    directory_fd: int | None, directory: str, name: str, writable: bool
) -> tuple[int | None, bool]:
    """``name`` opened for a view, and whether for writing too."""
    if writable:
        try:
            return _open(directory_fd, directory, name, _WRITE_FLAGS | os.O_NONBLOCK), True
        except PermissionError:
            pass  # read-only here: whoever commits reports that, as before
        except OSError as exc:
            if exc.errno != errno.EROFS:
                raise
    if _NOATIME:
        try:
            return _open(directory_fd, directory, name, _READ_FLAGS | _NOATIME), False
        except PermissionError:
            pass  # another user's file: O_NOATIME is for the owner only
    return _open(directory_fd, directory, name, _READ_FLAGS), False


def open_view(
    directory: str, directory_fd: int | None = None, *, writable: bool = False
) -> LogView | None:
    """The log of the run directory ``directory`` (through ``directory_fd`` when given),
    ``None`` when it has none. ``writable``: its files opened for writing too where they can
    be, for a writer that holds the run lock and commits through the view (a file that
    cannot be is opened read-only, and the writer opens it itself when it commits, as it
    would without this)."""
    path = os.path.join(directory, LOG)
    for attempt in range(_OPEN_ATTEMPTS):
        fd, log_writable = _open_view_file(directory_fd, directory, LOG, writable)
        if fd is None:
            return None
        index_fd: int | None = None
        index_writable = False
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise CorruptCheckpointError("record log is not a regular file", key=path)
            log_id = _read_log_id(fd, path)
            index = None
            index_fd, index_writable = _open_view_file(directory_fd, directory, INDEX, writable)
            if index_fd is not None:
                index = _read_index(index_fd, log_id)
            size = os.fstat(fd).st_size  # after idx: what idx covers is in the log
            if index is not None and index.end > size:
                index = None  # of a longer log (a tail a writer has cut off since)
            if index is None and index_fd is not None:
                os.close(index_fd)
                index_fd = None
                if attempt + 1 < _OPEN_ATTEMPTS and _replaced(directory_fd, directory, fd):
                    os.close(fd)
                    continue  # compacted between the two opens: open the new pair
            start = index.end if index is not None else _LOG_HEADER.size
            return LogView(path, fd, log_id, size, index, _scan(fd, start, size, seed_of(log_id)),
                           writable=log_writable, index_writable=index_writable)
        except BaseException:
            if index_fd is not None:
                os.close(index_fd)
            os.close(fd)
            raise
    raise AssertionError("unreachable")  # pragma: no cover


class LogWriter:
    """Appends commits to a run's log; the caller holds the run's lock.

    ``temp_path()`` names a new file in the store's temporary directory (same filesystem),
    where a new log (the first one, or a compacted one) and a new ``idx`` are made before
    they are renamed in place.
    """

    def __init__(self, directory: str, temp_path: Callable[[], str], *, fsync: bool) -> None:
        self.directory = directory
        self.path = os.path.join(directory, LOG)
        self.temp_path = temp_path
        self.fsync = fsync

    def commit(
        self,
        puts: Sequence[tuple[int, bytes]],
        removes: Iterable[int] = (),
        *,
        view: LogView | None = None,
        sync: bool = True,
    ) -> bool:
        """Append ``puts`` (key, data) and the removal of ``removes`` as one commit: one
        write and one sync (two more, file and directory, when it makes the log). A commit
        that raises leaves the log as it was (its partial bytes are cut off again, or by the
        next writer). ``view``: the log as the caller opened it (left open), else it is
        opened here. Without ``sync`` (an existing log only) the commit is written but neither
        synced nor put in ``idx``: :meth:`flush` does both for every such commit, or
        :meth:`cut` takes them off again; until then readers wait for the run lock. Returns
        whether the log is due for :meth:`compact` (its dead bytes above its live ones and
        :data:`_COMPACT_MIN_DEAD`)."""
        removed = [key for key in dict.fromkeys(removes) if key not in dict(puts)]
        if not puts and not removed:
            return False
        own = view is None
        if view is None:
            view = open_view(self.directory)
        if view is None:
            if puts:
                self._create(puts)
            return False
        try:
            end, live = self._append(view, puts, removed, sync=sync)
        finally:
            if own:
                view.close()
        dead = end - _LOG_HEADER.size - live
        return dead >= _COMPACT_MIN_DEAD and dead > live and view.log_id not in _UNCOMPACTABLE

    def _append(
        self, view: LogView, puts: Sequence[tuple[int, bytes]], removed: list[int], *,
        sync: bool,
    ) -> tuple[int, int]:
        """Append the commit; returns the log's end and live bytes after it."""
        operations: list[tuple[int, bytes | None]] = [*puts, *((key, None) for key in removed)]
        # Each find may turn the view into a scan of the whole log: the live bytes after.
        olds = [(key, view.find(key)) for key, _ in operations]
        live = view.live
        for key, old in olds:
            # A damaged key's entry counts in no live bytes (unreadable bytes follow it).
            if old is not None and old.size != _DAMAGED and key not in view.tail.damaged:
                live -= _ENTRY + old.size
        live += sum(_ENTRY + len(data) for _, data in puts)
        # What the view read past idx (everything, without one) gets its slots too.
        located = _tail_places(view)
        start = view.end
        pieces, placed = _commit_entries(operations, start, view.seed)
        located.update(placed)
        end = start + sum(len(piece) for piece in pieces)
        fd = view.fd if view.writable else os.open(self.path, _WRITE_FLAGS)
        try:
            named = os.stat(self.path, follow_symlinks=False) if view.writable else os.fstat(fd)
            opened = os.fstat(view.fd)
            if not os.path.samestat(named, opened):
                raise CorruptCheckpointError(
                    "record log replaced while its writer held the run lock", key=self.path)
            if opened.st_size != start:
                os.ftruncate(fd, start)  # a torn tail a crash left
            try:
                _write_at(fd, b"".join(pieces), start)
                if sync:
                    self._sync(fd)
            except BaseException as exc:
                try:
                    os.ftruncate(fd, start)
                except OSError as cut:
                    raise CommitLeftInLog(
                        exc.errno if isinstance(exc, OSError) else None,
                        f"the commit failed ({exc}) and could not be cut off the log ({cut})",
                        self.path) from exc
                raise
        finally:
            if fd != view.fd:
                os.close(fd)
        view.committed(end, placed, {
            at.offset: data for key, data in operations
            if data is not None and (at := placed[key]) is not None and at.size == len(data)})
        if sync:
            self._index(view, end, live, located)
        return end, live

    def _index(
        self, view: LogView, end: int, live: int, located: dict[int, Located | None]
    ) -> None:
        """Put the places of a commit's keys (``located``) in ``idx``, once it is synced."""
        try:
            if view.index is None:
                # No usable idx: every key's place comes from the view's scan of the whole log.
                self._install_index(view.log_id, end, live, located)
            else:
                length = self._update_index(view, end, live, located)
                view.indexed_to(end, live, length)
        except OSError as exc:
            # The commit stands: readers find it past what idx covers; the next writer
            # updates idx (or makes a new one).
            logger.warning("file store: updating %s failed after a commit: %s",
                           os.path.join(self.directory, INDEX), exc.strerror or exc)

    def flush(self, view: LogView | None = None) -> None:
        """Sync the commits made without a sync (under the same hold of the run lock), then
        put them in ``idx``: one ``fdatasync`` for them all. Raises if the sync fails (then
        :meth:`cut` them off). ``view``: the log as the writer that made them holds it
        (opened for writing, and taken in each commit), used while it reads through ``idx``;
        else the log is opened here."""
        own = view is None or not view.writable or not view.indexed
        if own:
            view = open_view(self.directory, writable=True)
        if view is None:
            return
        try:
            if view.settled:
                return  # nothing past idx
            self._sync(view.fd)
            live = view.live  # first: it may read the whole log anew (a slot that fails)
            self._index(view, view.end, live, _tail_places(view))
        except BaseException:
            if own:
                with contextlib.suppress(OSError):  # the sync's error is the one raised
                    view.close()
            raise
        if own:
            try:
                view.close()
            except OSError as exc:  # the commits are synced: they stand
                logger.warning("file store: closing %s failed: %s", self.path,
                               exc.strerror or exc)

    def cut(self, start: int) -> None:
        """Cut the log off at ``start`` again: the commits made from there without a sync
        failed (:meth:`flush` raised). Raises :class:`CommitLeftInLog` if it cannot."""
        try:
            os.truncate(self.path, start)
        except OSError as cut:
            raise CommitLeftInLog(
                cut.errno, f"commits whose sync failed could not be cut off the log ({cut})",
                self.path) from cut

    def _update_index(
        self, view: LogView, end: int, live: int, located: dict[int, Located | None]
    ) -> int:
        """Write the slots of a commit's keys, then ``idx``'s header (with ``run.rec``'s slot,
        right after it, in the same write); returns ``idx``'s length."""
        assert view.index is not None
        fd = view.index.fd if view.index_writable else os.open(
            os.path.join(self.directory, INDEX), _WRITE_FLAGS)
        length = _index_length(located, view.index.length)
        try:
            header = _index_header(view.log_id, end, live, length)
            if RUN in located:
                header += _slot_bytes(RUN, located[RUN])
            for key, found in located.items():
                if key != RUN:
                    _write_at(fd, _slot_bytes(key, found), _slot_offset(key))
            _write_at(fd, header, 0)
        finally:
            if fd != view.index.fd:
                os.close(fd)
        return length

    def reindex(self) -> None:
        """Write a whole new ``idx`` when it is missing, stale or behind the log (under the run
        lock: what a reader that found it so does once it holds the lock)."""
        view = open_view(self.directory)
        if view is None:
            return
        try:
            if view.settled:
                return
            if view.indexed:
                view._rescan()
            # Commits past idx may be a killed writer's, made before its sync: they reach the
            # disk before idx calls them committed (readers would otherwise return what a
            # power loss could still take away).
            self._sync(view.fd)
            self._install_index(view.log_id, view.tail.end, view.tail.live, _tail_places(view))
        finally:
            view.close()

    def _sync(self, fd: int, *, data_only: bool = True) -> None:
        if self.fsync:
            (os.fdatasync if data_only else os.fsync)(fd)

    def _sync_directory(self) -> None:
        if not self.fsync:
            return
        fd = os.open(self.directory, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _install_index(
        self, log_id: bytes, end: int, live: int, entries: Mapping[int, Located | None]
    ) -> None:
        """A whole new ``idx``, renamed into place (unsynced: readers check what they use)."""
        temp = self.temp_path()
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                length = _index_length(key for key, at in entries.items() if at is not None)
                _write_at(fd, _index_header(log_id, end, live, length), 0)
                for key, found in entries.items():
                    if found is not None:
                        _write_at(fd, _slot_bytes(key, found), _slot_offset(key))
            finally:
                os.close(fd)
            os.replace(temp, os.path.join(self.directory, INDEX))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise

    def _create(self, puts: Sequence[tuple[int, bytes]]) -> None:
        """The run's first log: written aside, synced, renamed in place, directory synced."""
        log_id = secrets.token_bytes(16)
        pieces, located = _commit_entries(puts, _LOG_HEADER.size, seed_of(log_id))
        new = _NewLog(self.temp_path(), log_id)
        try:
            new.write(pieces)
        except BaseException:
            new.abandon()
            raise
        self._put_in_place(new, located, first=True)

    def _put_in_place(
        self, new: _NewLog, located: dict[int, Located | None], *, first: bool = False
    ) -> None:
        """Sync the new log, rename it over ``log``, sync the directory, and write its ``idx``
        (``located``: where each key's newest entry is, ``None`` for a removed key). ``first``:
        the run's first log, taken away again if the directory sync fails (the commit it
        holds fails). Once the log stands, a failure to write ``idx`` is logged: readers scan
        the log until a writer makes a new one."""
        try:
            self._sync(new.fd, data_only=False)
        except BaseException:
            new.abandon()
            raise
        new.close()
        try:
            os.replace(new.path, self.path)
        except BaseException:
            new.abandon()
            raise
        try:
            self._sync_directory()
        except OSError:
            # Not known to be durable. No reader used the first log: without its idx, a
            # reader waits for the run lock, held here.
            if first and self._taken_away():
                raise
            if first:
                logger.warning("file store: %s stands, though its directory sync failed",
                               self.path)
            else:
                raise
        kept = {key: at for key, at in located.items() if at is not None}
        live = sum(_ENTRY + at.size for at in kept.values())
        try:
            self._install_index(new.log_id, new.size, live, kept)
        except OSError as exc:
            logger.warning("file store: writing %s failed after a commit: %s",
                           os.path.join(self.directory, INDEX), exc.strerror or exc)

    def _taken_away(self) -> bool:
        """Remove the run's first log again; whether it is gone."""
        try:
            os.unlink(self.path)
        except OSError as exc:
            logger.warning("file store: %s could not be removed after its directory sync "
                           "failed: %s", self.path, exc.strerror or exc)
            return False
        return True

    # -- compaction ----------------------------------------------------------------------------

    def compact(
        self, locked: Callable[[], contextlib.AbstractContextManager[object]] | None = None
    ) -> None:
        """Rewrite the log with only its live entries.

        Without ``locked`` the caller holds the run's lock. With it (what takes the lock) the
        caller does not: the live entries of the commits ``idx`` covers are copied and synced
        first, without the lock; then, holding it, the commits made since are added and the
        new log is renamed in place, so writers wait only for that last part. A log holding
        unreadable bytes is left as it is (they are the evidence of the damage its reads
        report), with a warning; so is a log compacted again or replaced meanwhile.
        """
        view = open_view(self.directory)
        if view is None:
            return
        try:
            # Unlocked, only what idx covers is surely committed (later bytes may be a commit
            # being written, or one that fails and is cut off again).
            end = view.end if locked is None or view.index is None else view.index.end
            scan = _scan(view.fd, _LOG_HEADER.size, end, view.seed)
            if scan.gaps:
                self._uncompactable(view.log_id)
                return
            if locked is not None and (view.index is None or scan.end != end):
                # Without idx what is committed is not known; and a last covered commit that
                # fails its data checksum reads as a torn tail here, though it is not one:
                # copied unlocked, it would be dropped. Both are done whole while held.
                with locked():
                    self.compact()
                return
            if locked is None:
                new = self._new_log()
            else:
                # The copy is made (and held) under the lock, so that the sweep of crashed
                # writers' files, which takes it, never finds it not held yet.
                with locked():
                    new = self._new_log()
            copy = self._copy_live(view, scan, new)
        finally:
            view.close()
        if locked is None:
            self._finish_copy(copy)
            return
        try:
            with locked():
                self._finish_copy(copy)
        except BaseException:
            copy.new.abandon()  # if not in place yet (else a no-op)
            raise

    def _new_log(self) -> _NewLog:
        return _NewLog(self.temp_path(), secrets.token_bytes(16))

    def _copy_live(self, view: LogView, scan: _Scan, new: _NewLog) -> _Copy:
        """The live entries ``scan`` found (of the commits it read), each as a commit of its
        own, in the new log ``new`` (synced)."""
        located: dict[int, Located | None] = {}
        try:
            for key, at in sorted(scan.found.items()):
                if at is not _REMOVED:
                    located[key] = Located(new.size, at.size)
                    new.write([_resealed(pread(view.fd, _ENTRY + at.size, at.offset),
                                         view.seed, new.seed)])
            self._sync(new.fd)  # most of the copy reaches the disk before the lock is taken
        except BaseException:
            new.abandon()
            raise
        return _Copy(new, view.log_id, scan.end, located)

    def _finish_copy(self, copy: _Copy) -> None:
        """Holding the run lock: add the commits made since the copy began, whole, then put
        the new log in place; nothing if the log is no longer the one copied."""
        new = copy.new
        try:
            view = open_view(self.directory)
            if view is None or view.log_id != copy.source:
                if view is not None:
                    view.close()
                new.abandon()  # compacted again, or the run deleted
                return
            with view:
                tail = _scan(view.fd, copy.end, view.end, view.seed)
                if tail.gaps:
                    self._uncompactable(view.log_id)
                    new.abandon()
                    return
                at = copy.end
                while at < tail.end:  # every entry in order, with its commit's flags
                    envelope = _envelope(pread(view.fd, _ENTRY, at), view.seed)
                    assert envelope is not None, "the scan found whole commits here"
                    copy.located[envelope.key] = \
                        Located(new.size, envelope.size) if envelope.operation == _PUT else None
                    new.write([_resealed(pread(view.fd, _ENTRY + envelope.size, at),
                                         view.seed, new.seed, whole_commit=False)])
                    at += _ENTRY + envelope.size
            # An entry damaged since it was written keeps its bad data, so it still reads as
            # damaged; a last commit that changes nothing keeps it from reading as a torn tail.
            unused = max(max((key for key, at in copy.located.items() if at is not None),
                             default=RUN) + 1, 0)
            new.write([entry_bytes(unused, None, seed=new.seed)])
        except BaseException:
            new.abandon()
            raise
        self._put_in_place(new, copy.located)

    def _uncompactable(self, log_id: bytes) -> None:
        _UNCOMPACTABLE.add(log_id)  # this process does not scan it again for it
        logger.warning(
            "file store: %s holds unreadable bytes; it is not compacted (reads of the "
            "records before them report damage)", self.path)


class _NewLog:
    """A log being written in the temporary directory (a run's first, or a compacted one).

    It holds an exclusive ``flock`` on the file while it is open: a compaction copies without
    the run lock, and the store's sweep of crashed writers' temporary files leaves a file
    alone while someone holds it (:func:`in_use`).
    """

    def __init__(self, path: str, log_id: bytes) -> None:
        self.path = path
        self.log_id = log_id
        self.seed = seed_of(log_id)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.size = 0
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            self.write([_log_header(log_id)])
        except BaseException:
            self.abandon()
            raise

    def write(self, pieces: Iterable[bytes]) -> None:
        for piece in pieces:
            _write_at(self.fd, piece, self.size)
            self.size += len(piece)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def abandon(self) -> None:
        """Close and remove it: it will not be used."""
        with contextlib.suppress(OSError):
            self.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def in_use(path: str) -> bool:
    """Whether the temporary file ``path`` is held by its writer (a new log being made)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False  # gone already, or not a file to hold
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class _Copy(NamedTuple):
    """A compaction under way."""

    new: _NewLog
    source: bytes
    """The id of the log copied."""
    end: int
    """Where the commits copied end in the log copied."""
    located: dict[int, Located | None]
    """Where each key's newest entry is in the new log (``None``: removed since)."""


_UNCOMPACTABLE: set[bytes] = set()
"""Ids of logs found to hold unreadable bytes, which this process leaves uncompacted."""


def _marked_damaged(damaged: dict[int, Located]) -> dict[int, Located | None]:
    """Slots for keys whose newest entry is unreadable: they read as damaged, never as the
    older entry the slot points at."""
    return {key: Located(at.offset, _DAMAGED) for key, at in damaged.items()}


class CommitLeftInLog(OSError):
    """A commit failed and its bytes could not be cut off the log again: readers may find
    it, so what it names (items written for it) must stay."""


def _tail_places(view: LogView) -> dict[int, Located | None]:
    """Where the keys of the commits the view read past ``idx`` (all, without one) are now,
    ``None`` for a key removed: the slots those commits need in ``idx``."""
    places: dict[int, Located | None] = {
        key: None if found is _REMOVED else found for key, found in view.tail.found.items()}
    places.update(_marked_damaged(view.tail.damaged))
    return places


def _resealed(raw: bytes, seed: int, new_seed: int, *, whole_commit: bool = True) -> bytes:
    """An entry of the log whose envelopes start from ``seed``, for the log whose envelopes
    start from ``new_seed`` (its envelope CRC redone): a commit of its own (both flags set)
    when ``whole_commit``, else with the flags it had."""
    envelope = _envelope(raw, seed)
    assert envelope is not None, "compaction copies entries a scan found"
    flags = _FIRST | _LAST if whole_commit else \
        (_FIRST if envelope.first else 0) | (_LAST if envelope.last else 0)
    header = _ENVELOPE.pack(_ENTRY_MAGIC, envelope.operation, flags, envelope.key,
                            envelope.size, envelope.crc)
    return b"".join((header, _ENVELOPE_CRC.pack(zlib.crc32(header, new_seed)), raw[_ENTRY:]))


def _write_at(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
