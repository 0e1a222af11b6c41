"""The record log of a file-store run: its records in one append-only file, and its index.

A run's records (its run record and one record per checkpoint) live in ``log``, the run's
only file that a create writes to::

    log   header (magic, format version, a random log id), then entries, appended in commits
    idx   where the newest entry of each key is: a header (the log id it indexes, how far,
          how many bytes are live) and one 16-byte slot per key, at a fixed place

An entry is an envelope (magic, operation, key, data length, CRC-32 of the data, CRC-32 of
the envelope) and the data. A commit appends its entries with one ``pwrite`` and makes them
durable with one ``fdatasync``; it then updates ``idx`` without syncing it. ``idx`` is a
cache: a reader checks every slot it uses (its CRC, the entry's envelope and key) and reads
the entries appended after what ``idx`` covers (a commit whose ``idx`` update a crash or a
concurrent writer has not made yet); an ``idx`` that is missing, damaged or of another log is
replaced by a scan of the log (the next writer rebuilds it). So a reader reads a record in
O(1) of the run's length, and a create costs one write and one sync.

Torn tails: a commit interrupted by a crash leaves a partial entry at the end. Readers stop at
the first entry that is incomplete or fails its CRCs at the end of the log (it is also what a
commit in progress looks like); the next writer truncates it before appending. A damaged entry
with intact entries after it is skipped by a scan (which looks for the next valid envelope)
and reported as damaged when its key is read.

Compaction: once the dead bytes (entries replaced or removed since) exceed the live ones, a
writer copies the live entries into a new log (new id) in the store's ``tmp/``, syncs it,
renames it over ``log``, syncs the directory, and writes a new ``idx``. A crash leaves either
log whole; readers that opened the old one keep reading it, consistently.

Writers hold the run's lock (the caller's); readers take none.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
import struct
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from fastcheckpoint.errors import CorruptCheckpointError

__all__ = [
    "INDEX",
    "LOG",
    "RUN",
    "LogView",
    "LogWriter",
    "open_view",
]

logger = logging.getLogger("fastcheckpoint.stores.file")

LOG = "log"
INDEX = "idx"
RUN = -1
"""The key of the run record; checkpoints are keyed by their sequence (0 and up)."""

_LOG_MAGIC = b"FClg"
_INDEX_MAGIC = b"FCix"
_ENTRY_MAGIC = b"FCle"
_VERSION = 1
_PUT = 1
_REMOVE = 2
_LAST = 1

# Log header: magic, version, reserved, log id, CRC of the preceding fields, padding.
_LOG_HEADER = struct.Struct("<4sHH16sI4x")
# Entry envelope: magic, operation, flags, reserved (2), key, data length, data CRC |
# envelope CRC. Flag 1: the last entry of its commit.
_ENVELOPE = struct.Struct("<4sBB2xqII")
_ENVELOPE_CRC = struct.Struct("<I")
_ENTRY = _ENVELOPE.size + _ENVELOPE_CRC.size
# Index header: magic, version, reserved, log id, end, live bytes, start of the last commit,
# CRC | padding to 64.
_INDEX_HEADER = struct.Struct("<4sHH16sQQQI")
_INDEX_START = 64
# Slot: entry offset + 1 (0: none), data length, CRC of (key, offset, length).
_SLOT = struct.Struct("<QII")
_SLOT_CRC = struct.Struct("<qQI")

_MAX_KEY = (1 << 56) - 1
_MAX_DATA = (1 << 32) - 1
_SCAN_CHUNK = 1 << 20
_COMPACT_MIN_DEAD = 256 << 10
"""A log is compacted once its dead bytes exceed both this and its live bytes."""
_OPEN_ATTEMPTS = 3

_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
_WRITE_FLAGS = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW


class Located(NamedTuple):
    """Where a key's newest entry is: the envelope's offset and the data's length."""

    offset: int
    size: int


_REMOVED = Located(-1, -1)
_BEYOND = Located(-2, -2)
_BAD = Located(-3, -3)


def _slot_offset(key: int) -> int:
    return _INDEX_START + _SLOT.size * (key + 1)


def _slot_bytes(key: int, found: Located | None) -> bytes:
    if found is None:
        return bytes(_SLOT.size)
    crc = zlib.crc32(_SLOT_CRC.pack(key, found.offset + 1, found.size))
    return _SLOT.pack(found.offset + 1, found.size, crc)


def _check_key(key: int) -> None:
    if not RUN <= key <= _MAX_KEY:
        raise ValueError(f"log key out of range: {key}")


def entry_bytes(key: int, data: bytes | None, *, last: bool) -> bytes:
    """An entry that puts ``data`` under ``key`` (``None``: removes the key); ``last`` marks
    the last entry of its commit."""
    _check_key(key)
    if data is not None and len(data) > _MAX_DATA:
        raise ValueError(f"log entry of {len(data)} bytes is too large")
    body = b"" if data is None else data
    envelope = _ENVELOPE.pack(
        _ENTRY_MAGIC, _REMOVE if data is None else _PUT, _LAST if last else 0, key, len(body),
        zlib.crc32(body),
    )
    return b"".join((envelope, _ENVELOPE_CRC.pack(zlib.crc32(envelope)), body))


def _log_header(log_id: bytes) -> bytes:
    fields = _LOG_HEADER.pack(_LOG_MAGIC, _VERSION, 0, log_id, 0)[:24]
    return _LOG_HEADER.pack(_LOG_MAGIC, _VERSION, 0, log_id, zlib.crc32(fields))


def _index_header(log_id: bytes, end: int, live: int, last: int) -> bytes:
    fields = _INDEX_HEADER.pack(_INDEX_MAGIC, _VERSION, 0, log_id, end, live, last, 0)[:-4]
    crc = zlib.crc32(fields)
    return _INDEX_HEADER.pack(_INDEX_MAGIC, _VERSION, 0, log_id, end, live, last, crc).ljust(
        _INDEX_START, b"\0")


def _pread(fd: int, size: int, offset: int) -> bytes:
    """Up to ``size`` bytes at ``offset`` (fewer only at the end of the file)."""
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


class _Envelope(NamedTuple):
    operation: int
    last: bool
    key: int
    size: int
    crc: int


def _envelope(raw: bytes | memoryview) -> _Envelope | None:
    """The envelope at the start of ``raw`` if it is one (magic, CRC, operation, key)."""
    if len(raw) < _ENTRY:
        return None
    magic, operation, flags, key, size, crc = _ENVELOPE.unpack_from(raw)
    if magic != _ENTRY_MAGIC or operation not in (_PUT, _REMOVE) or flags & ~_LAST or \
            not RUN <= key <= _MAX_KEY:
        return None
    if zlib.crc32(raw[: _ENVELOPE.size]) != _ENVELOPE_CRC.unpack_from(raw, _ENVELOPE.size)[0]:
        return None
    if operation == _REMOVE and size:
        return None
    return _Envelope(operation, bool(flags & _LAST), key, size, crc)


class _Scan(NamedTuple):
    found: dict[int, Located]
    """Newest entry per key over the range scanned (``_REMOVED``: removed there)."""
    end: int
    """Where the last complete commit ends."""
    damaged: dict[int, Located]
    """Keys whose newest entry in the range fails its data CRC, and where it is."""
    live: int


def _scan(fd: int, start: int, size: int) -> _Scan:
    """Read the commits in ``[start, size)``.

    A commit counts once its last entry is in place and intact. A commit left incomplete or
    damaged at the end of the range is a torn tail (or one being written): ignored. An
    entry that fails its data CRC inside a commit followed by others is damage: its key reads
    as damaged, never as an older entry. An unreadable envelope is skipped (the next valid
    one is looked for).
    """
    commits: list[list[tuple[int, Located, bool]]] = []
    ends: list[int] = []
    pending: list[tuple[int, Located, bool]] = []
    offset = start
    buffer = b""
    base = start  # file offset of buffer[0]

    def window(at: int, need: int) -> memoryview:
        nonlocal buffer, base
        if at < base or at + need > base + len(buffer):
            buffer = _pread(fd, max(need, _SCAN_CHUNK), at)
            base = at
        return memoryview(buffer)[at - base : at - base + need]

    while offset + _ENTRY <= size:
        envelope = _envelope(window(offset, _ENTRY))
        if envelope is None:
            pending = []  # a commit missing an entry never counts
            offset = _resync(fd, offset + 1, size)
            continue
        stop = offset + _ENTRY + envelope.size
        if stop > size:
            break  # incomplete: a torn tail, or a commit still being written
        intact = zlib.crc32(window(offset + _ENTRY, envelope.size)) == envelope.crc
        located = Located(offset, envelope.size) if envelope.operation == _PUT else _REMOVED
        pending.append((envelope.key, located, intact))
        offset = stop
        if envelope.last:
            commits.append(pending)
            ends.append(stop)
            pending = []
    if commits and not all(intact for _, _, intact in commits[-1]):
        commits.pop()  # torn: the newest commit's bytes never all reached the disk
        ends.pop()
    found: dict[int, Located] = {}
    damaged: dict[int, Located] = {}
    for commit in commits:
        for key, located, intact in commit:
            if intact:
                found[key] = located
                damaged.pop(key, None)
            else:
                damaged[key] = located
                found.pop(key, None)
    live = sum(_ENTRY + found.size for found in found.values() if found is not _REMOVED)
    return _Scan(found, ends[-1] if ends else start, damaged, live)


def _resync(fd: int, offset: int, size: int) -> int:
    """The offset of the next valid envelope at or after ``offset`` (``size`` if none)."""
    while offset + _ENTRY <= size:
        chunk = _pread(fd, min(_SCAN_CHUNK, size - offset), offset)
        at = chunk.find(_ENTRY_MAGIC)
        while at >= 0:
            if _envelope(_pread(fd, _ENTRY, offset + at)) is not None:
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
    last: int
    """Where the last commit it covers begins (a writer checks that commit before trusting
    ``end``: ``idx`` is not synced, so after a power loss it may be ahead of the log)."""


def _read_index(fd: int, log_id: bytes) -> _Index | None:
    """``idx`` if it is intact and indexes the log ``log_id``."""
    raw = _pread(fd, _INDEX_START, 0)
    if len(raw) < _INDEX_HEADER.size:
        return None
    magic, version, _, found_id, end, live, last, crc = _INDEX_HEADER.unpack_from(raw)
    if magic != _INDEX_MAGIC or version != _VERSION or found_id != log_id:
        return None
    if zlib.crc32(raw[: _INDEX_HEADER.size - 4]) != crc or not _LOG_HEADER.size <= last <= end:
        return None
    return _Index(fd, found_id, end, live, last)


def _read_log_id(fd: int, path: str) -> bytes:
    raw = _pread(fd, _LOG_HEADER.size, 0)
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
        self, path: str, fd: int, log_id: bytes, size: int, index: _Index | None, tail: _Scan
    ) -> None:
        self.path = path
        self.fd = fd
        self.log_id = log_id
        self.size = size
        self.index = index
        self.tail = tail
        """Entries after what ``index`` covers (all of them without an index)."""

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
            if old is not None and old is not _BEYOND:
                live -= _ENTRY + old.size
            if found is not _REMOVED:
                live += _ENTRY + found.size
        return live

    @property
    def indexed(self) -> bool:
        """Whether lookups go through ``idx`` (else the view scanned the whole log)."""
        return self.index is not None

    def close(self) -> None:
        os.close(self.fd)
        self._drop_index()

    def _drop_index(self) -> None:
        if self.index is not None:
            os.close(self.index.fd)
            self.index = None

    def __enter__(self) -> LogView:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _indexed(self, key: int) -> Located | None:
        """``key``'s slot in ``idx`` (``_BEYOND``: a commit made since the view opened,
        ``_BAD``: a slot that does not check)."""
        assert self.index is not None
        raw = _pread(self.index.fd, _SLOT.size, _slot_offset(key))
        if len(raw) < _SLOT.size or raw == bytes(_SLOT.size):
            return None
        stored, size, crc = _SLOT.unpack(raw)
        if zlib.crc32(_SLOT_CRC.pack(key, stored, size)) != crc or stored == 0:
            return _BAD
        found = Located(stored - 1, size)
        return found if found.offset + _ENTRY + found.size <= self.index.end else _BEYOND

    def _advance(self) -> bool:
        """Catch up with commits made since the view opened (idx's header and the log's tail
        read again); ``False`` when ``idx`` no longer describes this log."""
        assert self.index is not None
        size = os.fstat(self.fd).st_size
        index = _read_index(self.index.fd, self.log_id)
        if index is None or index.end > size:
            return False
        self.index, self.size = index, size
        self.tail = _scan(self.fd, index.end, size)
        return True

    def find(self, key: int) -> Located | None:
        """Where ``key``'s newest entry is, ``None`` when the log holds none.

        A slot past what the view has read (a commit made since) moves the view forward; a
        slot that does not check makes it drop ``idx`` and scan the whole log.
        """
        _check_key(key)
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
        return None if found is None else found[0]

    def read_sized(
        self, key: int, limit: int | None = None, *, check: bool = False
    ) -> tuple[bytes, int] | None:
        """``key``'s data (its first ``limit`` bytes) and its whole length, ``None`` when
        absent.

        An entry ``idx`` points at that does not check makes the view scan the whole log and
        look again (``idx`` is not synced: after a crash it may name a commit whose bytes
        never reached the disk); an entry the scan finds damaged raises.
        """
        while True:
            found = self.find(key)
            if found is None:
                return None
            problem = "log entry fails its data checksum" if key in self.tail.damaged else None
            data = b""
            if problem is None:
                want = found.size if limit is None else min(limit, found.size)
                raw = _pread(self.fd, _ENTRY + want, found.offset)
                envelope = _envelope(raw)
                data = raw[_ENTRY:]
                if envelope is None or envelope.key != key or envelope.size != found.size or \
                        envelope.operation != _PUT:
                    problem = "damaged log entry"
                elif len(data) < want:
                    problem = "log ends inside an entry"
                elif check and want == found.size and zlib.crc32(data) != envelope.crc:
                    problem = "log entry fails its data checksum"
            if problem is None:
                return data, found.size
            if not self.indexed:
                raise CorruptCheckpointError(f"{problem} (key {key})", key=self.path)
            self._rescan()

    def _rescan(self) -> None:
        self._drop_index()
        self.size = os.fstat(self.fd).st_size
        self.tail = _scan(self.fd, _LOG_HEADER.size, self.size)

    def scan(self) -> _Scan:
        """Every commit of the log (for repairs, listings and compaction): O(log)."""
        if self.index is None:
            return self.tail  # scanned from the start when the view opened
        return _scan(self.fd, _LOG_HEADER.size, self.size)

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
        raise


def _replaced(directory_fd: int | None, directory: str, info: os.stat_result) -> bool:
    """Whether ``log`` now names another file than the one opened."""
    target = LOG if directory_fd is not None else os.path.join(directory, LOG)
    try:
        now = os.stat(target, dir_fd=directory_fd, follow_symlinks=False)
    except FileNotFoundError:
        return True
    return (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino)


def open_view(directory: str, directory_fd: int | None = None) -> LogView | None:
    """The log of the run directory ``directory`` (through ``directory_fd`` when given),
    ``None`` when it has none."""
    path = os.path.join(directory, LOG)
    for attempt in range(_OPEN_ATTEMPTS):
        fd = _open(directory_fd, directory, LOG, _READ_FLAGS)
        if fd is None:
            return None
        index_fd: int | None = None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise CorruptCheckpointError("record log is not a regular file", key=path)
            log_id = _read_log_id(fd, path)
            index = None
            index_fd = _open(directory_fd, directory, INDEX, _READ_FLAGS)
            if index_fd is not None:
                index = _read_index(index_fd, log_id)
                if index is not None and index.end > info.st_size:
                    index = None  # of a longer log (a tail a writer has truncated since)
                if index is None:
                    os.close(index_fd)
                    index_fd = None
                    if attempt + 1 < _OPEN_ATTEMPTS and _replaced(directory_fd, directory, info):
                        os.close(fd)
                        continue  # compacted between the two opens: open the new pair
            start = index.end if index is not None else _LOG_HEADER.size
            return LogView(path, fd, log_id, info.st_size, index, _scan(fd, start, info.st_size))
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
        self.syncs = 0
        """``fsync``/``fdatasync`` calls made (for cost tests)."""

    def commit(
        self,
        puts: Sequence[tuple[int, bytes]],
        removes: Iterable[int] = (),
        *,
        view: LogView | None = None,
    ) -> None:
        """Append ``puts`` (key, data) and the removal of ``removes`` as one commit: one
        write and one sync (two more, file and directory, when it makes the log). A commit
        that raises leaves the log as it was (its partial bytes are cut off again, or by the
        next writer). ``view``: the log as the caller opened it (left open), else it is
        opened here. Compacts the log afterwards when it is due."""
        removed = [key for key in dict.fromkeys(removes) if key not in dict(puts)]
        if not puts and not removed:
            return
        own = view is None
        if view is None:
            view = open_view(self.directory)
        if view is None:
            if puts:
                self._create(puts)
            return
        try:
            end, live = self._append(view, puts, removed)
        finally:
            if own:
                view.close()
        dead = end - _LOG_HEADER.size - live
        if dead >= _COMPACT_MIN_DEAD and dead > live:
            try:
                self.compact()
            except OSError as exc:  # the commit stands; the next one compacts again
                logger.warning("file store: compacting %s failed: %s", self.path,
                               exc.strerror or exc)

    def _append(
        self, view: LogView, puts: Sequence[tuple[int, bytes]], removed: list[int]
    ) -> tuple[int, int]:
        """Append the commit; returns the log's end and live bytes after it."""
        if view.index is not None and _scan(view.fd, view.index.last, view.index.end).end != \
                view.index.end:
            view._rescan()  # idx names a commit that is not (all) in the log
        operations: list[tuple[int, bytes | None]] = [*puts, *((key, None) for key in removed)]
        live = view.live
        for key, _ in operations:
            old = view.find(key)  # may turn the view into a scan of the whole log
            if old is not None and key not in view.tail.damaged:
                live -= _ENTRY + old.size
        live += sum(_ENTRY + len(data) for _, data in puts)
        # What the view read past idx (everything, without one) gets its slots too.
        located: dict[int, Located | None] = {
            key: None if found is _REMOVED else found for key, found in view.tail.found.items()}
        located.update(view.tail.damaged)
        pieces = []
        offset = start = view.end
        for number, (key, data) in enumerate(operations):
            entry = entry_bytes(key, data, last=number == len(operations) - 1)
            located[key] = None if data is None else Located(offset, len(data))
            pieces.append(entry)
            offset += len(entry)
        fd = os.open(self.path, _WRITE_FLAGS)
        try:
            if not os.path.samestat(os.fstat(fd), os.fstat(view.fd)):
                raise CorruptCheckpointError(
                    "record log replaced while its writer held the run lock", key=self.path)
            if os.fstat(fd).st_size != start:
                os.ftruncate(fd, start)  # a torn tail a crash left
            try:
                _write_at(fd, b"".join(pieces), start)
                self._sync(fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)
        try:
            if view.index is None:
                # No usable idx: every key's place comes from the view's scan of the whole log.
                self._install_index(view.log_id, offset, live, start, located)
            else:
                fd = os.open(os.path.join(self.directory, INDEX), _WRITE_FLAGS)
                try:
                    for key, found in located.items():
                        _write_at(fd, _slot_bytes(key, found), _slot_offset(key))
                    _write_at(fd, _index_header(view.log_id, offset, live, start), 0)
                finally:
                    os.close(fd)
        except OSError as exc:
            # The commit stands: readers find it past what idx covers; the next writer
            # updates idx (or makes a new one).
            logger.warning("file store: updating %s failed after a commit: %s",
                           os.path.join(self.directory, INDEX), exc.strerror or exc)
        return offset, live

    def _sync(self, fd: int, *, data_only: bool = True) -> None:
        if self.fsync:
            (os.fdatasync if data_only else os.fsync)(fd)
            self.syncs += 1

    def _sync_directory(self) -> None:
        if not self.fsync:
            return
        fd = os.open(self.directory, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY)
        try:
            os.fsync(fd)
            self.syncs += 1
        finally:
            os.close(fd)

    def _install_index(
        self, log_id: bytes, end: int, live: int, last: int, entries: dict[int, Located | None]
    ) -> None:
        """A whole new ``idx``, renamed into place (unsynced: readers check what they use)."""
        temp = self.temp_path()
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                _write_at(fd, _index_header(log_id, end, live, last), 0)
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
        self._install(secrets.token_bytes(16), [(key, entry_bytes(
            key, data, last=number == len(puts) - 1)) for number, (key, data) in enumerate(puts)])

    def _install(self, log_id: bytes, entries: Sequence[tuple[int, bytes]]) -> None:
        """Make the log ``log_id`` of ``entries`` (key, whole entry) and its ``idx``."""
        located: dict[int, Located | None] = {}
        offset = last = _LOG_HEADER.size
        for key, entry in entries:
            last = offset
            removal = _ENVELOPE.unpack_from(entry)[1] == _REMOVE
            located[key] = None if removal else Located(offset, len(entry) - _ENTRY)
            offset += len(entry)
        temp = self.temp_path()
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                _write_at(fd, b"".join((_log_header(log_id), *(e for _, e in entries))), 0)
                self._sync(fd, data_only=False)
            finally:
                os.close(fd)
            os.replace(temp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        self._sync_directory()
        self._install_index(log_id, offset, offset - _LOG_HEADER.size, last, located)

    # -- compaction ----------------------------------------------------------------------------

    def compact(self) -> None:
        """Rewrite the log with only its live entries (damaged ones kept as they are)."""
        view = open_view(self.directory)
        if view is None:
            return
        try:
            self._compact(view)
        finally:
            view.close()

    def _compact(self, view: LogView) -> None:
        scan = _scan(view.fd, _LOG_HEADER.size, view.end)
        kept = [(key, found) for key, found in scan.damaged.items()]
        kept += sorted((key, found) for key, found in scan.found.items() if found is not _REMOVED)
        # Each entry becomes a commit of its own. Damaged ones keep their bad data (they still
        # read as damaged) and come first: a damaged last commit would read as a torn tail.
        entries = [(key, _recommitted(_pread(view.fd, _ENTRY + found.size, found.offset)))
                   for key, found in kept]
        if not entries or entries[-1][0] in scan.damaged:
            absent = max((key for key, _ in kept), default=RUN) + 1
            entries.append((absent, entry_bytes(absent, None, last=True)))  # changes nothing
        self._install(secrets.token_bytes(16), entries)


def _recommitted(raw: bytes) -> bytes:
    """An entry as a commit of its own (its last-entry flag set, its envelope CRC redone)."""
    envelope = _envelope(raw)
    assert envelope is not None, "compaction copies entries a scan found"
    header = _ENVELOPE.pack(
        _ENTRY_MAGIC, envelope.operation, _LAST, envelope.key, envelope.size, envelope.crc)
    return b"".join((header, _ENVELOPE_CRC.pack(zlib.crc32(header)), raw[_ENTRY:]))


def _write_at(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
