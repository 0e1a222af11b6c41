"""SQLite store: one database file in WAL mode, crash-safe, shared by the processes of one host.

Tables (``stores/sqlite/schema.sql``; the schema is versioned, see ``_sqlite_schema``)::

    fc_runs          one row per run: the run record, and ``due``, the earliest expiry of
                     anything it holds (what ``purge_expired`` looks for, on an index)
    fc_checkpoints   one row per checkpoint, keyed (run_key, sequence); payload last, so
                     listings never read it
    fc_items         one row per item, keyed (run_key, key)
    fc_item_refs     per run and item key: how many held checkpoints name the key in their refs
                     (the items nested under the key, ``key/...``, go with its last reference),
                     and whether the store removed its item while they did (``removed``: a
                     named item missing without it was deleted behind the store's back)
    fc_labels        per run and label, indexed by (label, created_at) for runs_with_label

Every write operation is one transaction (``BEGIN IMMEDIATE``): a checkpoint, its run record,
its items, reference counts and pruning commit together or not at all, and SQLite's write lock
orders the writers of every process, so sequences stay unique and gap-free across processes. In
WAL mode a commit appends to the ``-wal`` file and (``synchronous=FULL``, the default) syncs it
once; a ``kill -9`` or power loss loses no committed transaction and exposes no partial one.

Each store keeps one writer connection, used by one worker thread at a time, and a small pool
of reader connections; readers see the last commit and never wait for the writer. Every
operation is one ``anyio.to_thread`` hop, so the store runs on asyncio and trio.

The run row is the authority for its checkpoints (both change in one transaction). The damage
a run can show comes from outside: its row missing while checkpoint rows of the run are in place
(an operator's ``DELETE``, a partial restore), a row copied over from another run (its run id
maps to another key), or a row that contradicts them (an older copy put back: it knows fewer
sequences, another incarnation, or an expiry before the newest checkpoint's). Reads still
return the checkpoints, appends refuse, the cleanup leaves the run, and
:meth:`SQLiteStore.rebuild_run` derives a new row from them. A row's count of checkpoints is
never trusted to prune: pruning stops short of the ``keep_latest`` newest checkpoints held.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeGuard, TypeVar, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import msgspec

from fastcheckpoint import _ids
from fastcheckpoint._config import pauses_within
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
    StoreUnavailableError,
    ValidationError,
)
from fastcheckpoint.stores import _sqlite_schema as schema
from fastcheckpoint.stores import _sqlite_steps as steps
from fastcheckpoint.stores._base import (
    MAX_ITEM_KEY_BYTES,
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
    check_labels,
    check_options,
    check_run_key,
    check_seed,
    check_sequence,
    check_str,
    check_text,
    check_time,
    is_live,
    is_run_key,
    item_key_bytes,
    items_deleted_behind,
    latest_expiry,
    refs_to_find,
    renumbered,
    unheld_refs,
)

__all__ = ["SQLiteStore", "parse_sqlite_url"]

logger = logging.getLogger("fastcheckpoint.stores.sqlite")

_P = ParamSpec("_P")
_T = TypeVar("_T")

_SYNCHRONOUS = {"full": "FULL", "normal": "NORMAL"}
_OPTIONS = ("synchronous", "timeout")
_DEFAULT_TIMEOUT = 5.0
_IDLE_READERS = 8
_JOURNAL_SIZE_LIMIT = 64 << 20
"""Bytes the ``-wal`` file is cut back to after a checkpoint (a burst of large checkpoints
would otherwise leave it at its largest); above the ~4 MB it normally reaches."""

# Primary result codes (sqlite3 names them only from Python 3.11 on).
_BUSY, _LOCKED, _READONLY, _CORRUPT, _FULL, _CANTOPEN, _TOOBIG, _NOTADB = (
    5, 6, 8, 11, 13, 14, 18, 26
)
_CODES_BY_TEXT = (
    ("database is locked", _BUSY),
    ("database table is locked", _LOCKED),
    ("disk is full", _FULL),
    ("malformed", _CORRUPT),
    ("file is not a database", _NOTADB),
    ("could not decode", _CORRUPT),
    ("readonly database", _READONLY),
    ("unable to open", _CANTOPEN),
    ("too big", _TOOBIG),
)

# -- values -----------------------------------------------------------------------------------


def _upper_bound(prefix: str) -> str | None:
    """The smallest valid string above every string that starts with ``prefix``; ``None``
    when every string from ``prefix`` on starts with it (a prefix of U+10FFFF only)."""
    stripped = prefix.rstrip("\U0010ffff")
    if not stripped:
        return None
    following = ord(stripped[-1]) + 1
    if 0xD800 <= following <= 0xDFFF:  # surrogates are no key's characters: skip them
        following = 0xE000
    return stripped[:-1] + chr(following)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Undecodable(str):
    """Text of a row that is not UTF-8 (bit rot, a foreign writer), with U+FFFD for the bad
    bytes: the row it is in is reported as damaged, never taken for what it was."""


def _text(raw: bytes) -> str:
    """The connections' ``text_factory``: one row with bad text must not fail a whole query
    (a listing of runs, say), as SQLite's own decoding would."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return _Undecodable(raw.decode("utf-8", "replace"))


def _undecodable(*texts: object) -> bool:
    return any(isinstance(text, _Undecodable) for text in texts)


def _bad_run_text(run: RunRecord) -> bool:
    return _undecodable(run.run_id, run.incarnation, run.status, *run.labels)


def _foreign(run_key: str, run_id: str) -> str | None:
    """Why a run row does not belong at ``run_key`` (copied over from another run), or
    ``None``."""
    problem = _ids.foreign_run(run_key, run_id)
    return None if problem is None else f"the run record {problem}"


def _unusable(run_key: str, run: RunRecord) -> str | None:
    """Why a run row cannot be used at all (reads and writes refuse it, listings skip it), or
    ``None``."""
    if _bad_run_text(run):
        return "the run record holds text that is not UTF-8"
    return _foreign(run_key, run.run_id)


def _implausible(run: RunRecord) -> str | None:
    """Why a run row holds values no run reaches (edited by hand), or ``None``: they stop the
    run (no next sequence or version can be written) or hide it from listings (a creation
    time beyond every page's bound, or one no cursor can name)."""
    if not math.isfinite(run.created_at):
        return f"the run record's creation time {run.created_at!r} is not finite"
    if not 0 <= run.latest_sequence < _ids.MAX_SEQUENCE:
        return (f"the run record's latest sequence {run.latest_sequence} leaves no sequence "
                "for a next checkpoint")
    if not 0 <= run.version < steps.INT64:
        return f"the run record's version {run.version} leaves no version for a status change"
    return None


def _wrong_type(row: Sequence[Any], types: Sequence[tuple[str, Any]]) -> str | None:
    """Why a row cannot be decoded (a column of another type), or ``None``."""
    wrong = steps.wrong_type(row, types)
    return None if wrong is None else f"the row holds a value of another type: {wrong}"


def _head_problem(run_key: str, head: steps.Head) -> str | None:
    """Why the run row an append, a delete or the cleanup reads cannot be used, or ``None``."""
    wrong = _wrong_type(head, steps.HEAD_TYPES)
    if wrong is not None:
        return wrong
    if _undecodable(head.run_id, head.incarnation, head.status):
        return "the run record holds text that is not UTF-8"
    return _foreign(run_key, head.run_id)


def _row_problem(run_key: str, run: RunRecord) -> str | None:
    """Why a run row is damaged in itself, whatever its checkpoints say, or ``None``."""
    return _unusable(run_key, run) or _implausible(run)


def _own(run_key: str, row: Sequence[Any]) -> bool:
    """Whether a ``(sequence, checkpoint_id, ...)`` row holds an id of this run key and
    sequence: not one of another run swapped in, nor one edited by hand."""
    parsed = _ids.parse_checkpoint_id(row[1])
    return parsed is not None and parsed[0] == run_key and parsed[2] == row[0]


def _newest_own(run_key: str, rows: Iterable[Sequence[Any]]) -> Sequence[Any] | None:
    """The first row of ``rows`` (newest first, as :data:`steps.NEWEST_FIRST`) whose id is
    the run's own, among those of the right types."""
    return next((row for row in rows
                 if steps.wrong_type(row, steps.HEADER_TYPES) is None and _own(run_key, row)),
                None)


def _error_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF
    text = str(exc).lower()
    return next((code for words, code in _CODES_BY_TEXT if words in text), None)


def _finite(value: object) -> TypeGuard[float]:
    return isinstance(value, float) and math.isfinite(value)


# -- validation -------------------------------------------------------------------------------


def _check_append(
    run_key: str, record: StoredCheckpoint, seed: RunRecord, keep_latest: int | None,
    now: float, items: Sequence[Item] = (),
) -> int | None:
    """What an append is given, checked before anything is written; ``keep_latest`` as a
    plain ``int``."""
    check_run_key(run_key)
    check_append(run_key, record, seed, items)
    keep_latest = check_keep_latest(keep_latest)
    if keep_latest is not None:
        check_int("keep_latest", keep_latest)  # SQLite's integers are 64-bit
    check_time("now", now)
    return keep_latest


def _check_keys(keys: Sequence[str]) -> list[str]:
    if not isinstance(keys, Sequence) or isinstance(keys, (str, bytes)):
        raise ValidationError(f"keys must be a sequence of item keys, got {shown(keys)}")
    for key in keys:
        item_key_bytes(key, MAX_ITEM_KEY_BYTES, "an item key")
    return list(keys)


def _check_limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise ValidationError(f"limit must be an int, got {shown(limit)}")
    return max(0, min(limit, steps.INT64 - 1))  # a page asks for one more row than limit


def _contradiction(
    run_key: str, head: steps.Head | RunRecord, newest: Sequence[Any] | None
) -> str | None:
    """How a run row contradicts the ``(sequence, checkpoint_id, expires_at)`` of the newest
    checkpoint in place (a row put back from an older copy, or edited by hand); ``None`` when
    it does not. The leftovers of an expired run agree with its row (it expires with the last
    of its checkpoints), so a row that says the run expired over newer or longer-lived
    checkpoints shows too. A newest checkpoint whose id is not the run's own (one of another
    run swapped in) says nothing of the run's incarnation or expiry: it is damage of its own,
    which reads refuse, and creates go on past it."""
    if newest is None:
        return None
    problem = _unreadable_newest(newest)
    if problem is not None:
        return problem
    newest_sequence, newest_id, newest_expires_at = newest[0], newest[1], newest[2]
    if newest_sequence > head.latest_sequence:
        return (
            f"the run record knows sequences up to {head.latest_sequence}, but checkpoint "
            f"{newest_sequence} is in place (an older copy of the record was put back)"
        )
    if not _own(run_key, newest):
        return None
    parsed = _ids.parse_checkpoint_id(newest_id)
    if parsed is not None and parsed[1] != head.incarnation:
        return (
            f"the run record is of incarnation {head.incarnation!r:.40}, but the newest "
            f"checkpoint in place is of incarnation {parsed[1]!r} (a record of another "
            "incarnation was put back)"
        )
    if head.expires_at is not None and (
            newest_expires_at is None or newest_expires_at > head.expires_at):
        return (
            f"the run record says the run expires at {head.expires_at!r}, before checkpoint "
            f"{newest_sequence} in place does (an older copy of the record was put back, or "
            "it was edited)"
        )
    return None


def _unreadable_newest(newest: Sequence[Any]) -> str | None:
    """Why the ``(sequence, checkpoint_id, expires_at)`` of the newest checkpoint in place
    cannot be compared with the run row (a value of another type, written with the checks
    off: text and blobs sort above every number, so such a sequence is always the newest),
    or ``None``. Nothing can be appended after it, nor the run row rebuilt from it."""
    wrong = _wrong_type(newest, steps.NEWEST_TYPES)
    return None if wrong is None else (
        f"the newest checkpoint row in place (sequence {newest[0]!r:.40}) cannot be read: "
        f"{wrong}")


def _problem(run_key: str, row: Sequence[Any] | None, newest: Sequence[Any] | None) -> str | None:
    """Why the run row (selected with ``RUN_COLUMNS``) is damaged, given the newest checkpoint
    row in place (``sequence, checkpoint_id, created_at, expires_at, ...``), or ``None``."""
    if row is None:
        return None if newest is None else (
            "the run record is missing while checkpoints are in place")
    wrong = _wrong_type(row, steps.RUN_TYPES)
    if wrong is not None:
        return wrong
    run = steps.run_of(row)
    return _row_problem(run_key, run) or _contradiction(
        run_key, run, None if newest is None else (newest[0], newest[1], newest[3]))


def _usable_labels(run_key: str, rows: Iterable[Sequence[Any]]) -> tuple[str, ...]:
    """The labels of a run's label rows that a run can take, in order: a row written by hand
    (``fc_labels`` does not check its types) whose label is not text, not UTF-8 or too long is
    left out, logged, so that it never fails the rebuild of the run (and the repair of the
    other runs with it)."""
    kept: list[str] = []
    for (label,) in rows:
        try:
            check_labels((*kept, label))
        except ValidationError as exc:
            logger.warning("sqlite store: a label row of run key %s is left out: %s",
                           run_key, exc)
            continue
        if _undecodable(label):
            logger.warning("sqlite store: a label row of run key %s is not UTF-8; left out",
                           run_key)
            continue
        kept.append(label)
    return tuple(kept)


def _make_cursor(created_at: float, run_key: str) -> str:
    return f"{created_at!r}/{run_key}"


def _parse_cursor(cursor: str | None) -> tuple[float, str]:
    if cursor is None:
        return math.inf, ""
    if isinstance(cursor, str):
        created, _, run_key = cursor.rpartition("/")
        with contextlib.suppress(ValueError):
            # -inf: a page that ends on a row whose creation time was edited to it (damage,
            # which damaged_runs reports) must not break the listing of the rows after it.
            if is_run_key(run_key) and float(created) < math.inf:
                return float(created), run_key
    raise ValidationError(f"malformed run listing cursor {shown(cursor)}")


# -- URLs -------------------------------------------------------------------------------------


def parse_sqlite_url(url: str) -> tuple[str, list[tuple[str, str]]]:
    """The database path and the query options of a ``sqlite://`` URL.

    As in SQLAlchemy, ``sqlite:///relative/path.db`` names a path relative to the current
    directory and ``sqlite:////absolute/path.db`` an absolute one.
    """
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ConfigurationError(f"malformed sqlite:// URL {url!r}: {exc}") from exc
    if parts.scheme.lower() != "sqlite":
        raise ConfigurationError(f"not a sqlite:// URL: {url!r}")
    if parts.netloc:
        raise ConfigurationError(
            f"a sqlite:// URL names a file, not a host: {url!r} (sqlite:///relative.db or "
            "sqlite:////absolute/path.db)"
        )
    path = unquote(parts.path)[1:]
    if not path:
        raise ConfigurationError(f"sqlite:// URL without a database path: {url!r}")
    if path == ":memory:" or path.startswith("file:"):
        raise ConfigurationError(
            f"the sqlite:// store needs a database file, got {path!r}; for checkpoints kept in "
            "memory use memory://"
        )
    return path, parse_qsl(parts.query, keep_blank_values=True)


def _synchronous(value: object) -> str:
    mode = _SYNCHRONOUS.get(value.lower()) if isinstance(value, str) else None
    if mode is None:
        raise ConfigurationError(
            f"sqlite:// store option synchronous={shown(value)} must be 'full' (the default: "
            "every commit survives power loss) or 'normal' (a commit survives a process crash; "
            "power loss may undo the last ones)"
        )
    return mode


def _timeout(value: object) -> float:
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"sqlite:// store option timeout={shown(value)} is not a "
                                 "number of seconds") from exc
    if isinstance(value, bool) or not math.isfinite(seconds) or seconds < 0:
        raise ConfigurationError(f"sqlite:// store option timeout={shown(value)} must be >= 0 s")
    return seconds


def _create_private(path: str) -> None:
    """Create the database file 0600 if it is missing (SQLite gives the -wal and -shm files
    the database file's permissions).

    Only a file this call creates is opened here: closing any descriptor of a file drops every
    POSIX lock the process holds on it, so opening and closing an existing database would
    release the locks of this process's other connections to it (another store object on the
    same file), and another process could then take the database for unused and checkpoint
    and remove its WAL under them: a corrupt database.
    """
    if os.path.exists(path):
        # What opening it for reading and writing would have said, asked without a descriptor.
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not os.access(path, os.R_OK | os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return  # created meanwhile by another connection
    os.close(fd)


def _database_path(path: object) -> str:
    try:
        text = os.fspath(path)  # type: ignore[call-overload]
    except TypeError as exc:
        raise ConfigurationError(
            f"sqlite store path must be a str or a path: {shown(path)}") from exc
    if not isinstance(text, str) or not text or "\0" in text or not _encodable(text):
        raise ConfigurationError(f"not a usable sqlite store path: {text!r:.80}")
    return os.path.abspath(text)


# -- connections ------------------------------------------------------------------------------


class _Readers:
    """Idle reader connections, handed to one thread at a time; at most a few are kept."""

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        self._idle: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._generation = 0

    @contextlib.contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            generation = self._generation
            db = self._idle.pop() if self._idle else None
        if db is None:
            db = self._connect()
        try:
            yield db
        except BaseException:
            db.close()  # its state is unknown after an error: never reuse it
            raise
        with self._lock:
            keep = generation == self._generation and len(self._idle) < _IDLE_READERS
            if keep:
                self._idle.append(db)
        if not keep:
            db.close()

    @property
    def open(self) -> bool:
        return bool(self._idle)

    def close(self) -> None:
        """Close the idle connections; those in use are closed when given back."""
        with self._lock:
            idle, self._idle = self._idle, []
            self._generation += 1
        for db in idle:
            db.close()


# -- the store --------------------------------------------------------------------------------


class SQLiteStore(ExpiryCleanup):
    """Checkpoints in one SQLite database file; see the module docstring for the tables.

    Costs (``n`` = checkpoints held by the run, ``k`` = requested count, ``r`` = refs of a
    checkpoint): ``append`` is one transaction with one sync of the WAL: a primary-key read of
    the run row, one indexed read of the keys its refs name beyond the items it writes (which
    must all be live items of the run; a statement per 500 such refs), one checkpoint insert,
    one run-row update, plus, when pruning, one select and one delete of the oldest (and a
    statement per expired one), and ``O(r)`` reference-count updates. ``get`` and ``latest``
    are one indexed statement (``latest`` walks down only past expired newest checkpoints);
    ``headers`` two, never reading payloads; ``list_runs`` and ``runs_with_label`` one indexed
    page; ``count_runs`` counts an index (``O(runs)`` index entries, no rows) minus the runs
    due; ``purge_expired`` visits only runs and items whose expiry passed.

    ``read_with_items`` is one snapshot: the checkpoint, one statement per 500 refs that reads,
    for each ref ``K``, its item (a primary-key probe) and every loose item nested under it (one
    range of the primary key, ``m`` rows), and one for the owned items: ``O(r + m)`` rows, never
    a statement per nested item. When pruning, deletion or cleanup drops the last reference to
    ``K``, the same transaction removes what is nested under it with one range delete (its
    ``m`` rows) per gap between the keys under ``K`` that held checkpoints still name; a
    removal that leaves ``K`` named costs one more primary-key probe per ref.
    """

    nested_items = True
    sequence_guard = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "full",
        timeout: float = _DEFAULT_TIMEOUT,
    ) -> None:
        self._path = _database_path(path)
        self._synchronous = _synchronous(synchronous)
        self._timeout = _timeout(timeout)
        self._write_lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        self._readers = _Readers(self._connect_reader)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLiteStore:
        """``sqlite:///relative.db``, ``sqlite:////absolute.db``, with ``?synchronous=normal``
        and ``?timeout=SECONDS`` (both also keyword options)."""
        path, query = parse_sqlite_url(url)
        settings: dict[str, Any] = dict(query)
        settings.update(options)
        check_options("the sqlite:// store", settings, _OPTIONS)
        return cls(
            path,
            synchronous=settings.get("synchronous", "full"),
            timeout=settings.get("timeout", _DEFAULT_TIMEOUT),
        )

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self._path!r}, synchronous="
                f"{self._synchronous.lower()!r}, timeout={self._timeout:g})")

    @property
    def path(self) -> Path:
        """The database file."""
        return Path(self._path)

    # -- plumbing -----------------------------------------------------------------------------

    async def _call(self, func: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run one whole operation in a worker thread: the only thread hop of a method."""
        call = functools.partial(self._translated, func, *args, **kwargs)
        return await in_worker_thread(call)

    def _translated(self, func: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return func(*args, **kwargs)
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        except OSError as exc:
            raise self._os_error(exc) from exc
        except OverflowError as exc:  # a value beyond what SQLite binds (a blob over 2 GB)
            raise ValidationError(f"a value is too large for the sqlite store: {exc}") from exc

    def _os_error(self, exc: OSError) -> StoreError:
        where = exc.filename or self._path
        if isinstance(exc, IsADirectoryError):
            return StoreError(
                f"the sqlite store path {where} is a directory; name a database file in it, "
                f"e.g. sqlite:///{os.path.join(where, 'checkpoints.db')}"
            )
        if isinstance(exc, PermissionError):
            return StoreError(
                f"the sqlite store cannot open {where} for reading and writing: {exc.strerror} "
                "(it needs write access to the database file and to its directory, which holds "
                "the -wal and -shm files)"
            )
        return StoreError(f"sqlite store I/O failed on {where}: {exc.strerror or exc}")

    def _error(self, exc: sqlite3.Error) -> CheckpointError:
        code = _error_code(exc)
        where = self._path
        if code in (_BUSY, _LOCKED):
            return StoreUnavailableError(
                f"the SQLite database {where} stayed locked by another connection for the "
                f"{self._timeout:g} s busy timeout (sqlite:// option timeout): {exc}"
            )
        if code in (_CORRUPT, _NOTADB):
            return CorruptCheckpointError(f"the SQLite database is damaged: {exc}", key=where)
        if code == _TOOBIG:
            return ValidationError(
                f"a value is larger than the SQLite database {where} takes (SQLITE_MAX_LENGTH, "
                f"1 GB by default); nothing was written: {exc}"
            )
        if code == _FULL:
            return StoreError(f"the SQLite database {where} cannot grow: the disk is full "
                              f"(or the database reached its page limit): {exc}")
        if code == _READONLY:
            return StoreError(
                f"the SQLite database {where} is read-only here: {exc} (the store writes the "
                "file and, beside it, the -wal and -shm files: check the permissions of the "
                "file and of its directory)"
            )
        if code == _CANTOPEN:
            return StoreError(f"cannot open the SQLite database {where}: {exc}")
        return StoreError(f"SQLite failed on {where}: {exc}")

    def _connect(self) -> sqlite3.Connection:
        # Autocommit (isolation_level=None): every transaction is begun and ended here.
        db = sqlite3.connect(self._path, timeout=self._timeout, isolation_level=None,
                             check_same_thread=False)
        db.text_factory = _text
        return db

    def _connect_reader(self) -> sqlite3.Connection:
        self._ensure_ready()
        db = self._connect()
        try:
            db.execute("PRAGMA query_only = ON")
        except BaseException:
            db.close()
            raise
        return db

    def _writer_connection(self) -> sqlite3.Connection:
        """The writer connection, opened (and the schema checked) on first use; call it
        holding the write lock."""
        if self._writer is not None:
            return self._writer
        db = self._open_database()
        try:
            version = schema.schema_version(db)
            if version is None:
                schema.provision(db, self._path, upgrade=False)
            else:
                schema.check_version(version, self._path)
        except BaseException:
            db.close()
            raise
        self._writer = db
        return db

    def _open_database(self) -> sqlite3.Connection:
        """A connection to the database, created 0600 (in a 0700 directory) if missing, in WAL
        mode with the store's ``synchronous`` setting."""
        os.makedirs(os.path.dirname(self._path), mode=0o700, exist_ok=True)
        _create_private(self._path)
        db = self._connect()
        try:
            mode = self._into_wal(db)
            if mode.lower() != "wal":
                raise StoreError(
                    f"the SQLite database {self._path} cannot use WAL mode (journal mode "
                    f"{mode!r}); the sqlite:// store needs a local file system"
                )
            db.execute(f"PRAGMA synchronous = {self._synchronous}")
            db.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT}")
            # Some builds zero every freed page, writing a pruned checkpoint's pages again;
            # FAST zeroes what is written anyway (the b-tree pages), not the freed overflow.
            db.execute("PRAGMA secure_delete = FAST")
        except BaseException:
            db.close()
            raise
        return db

    def _into_wal(self, db: sqlite3.Connection) -> str:
        """Switch the connection to WAL mode; returns the journal mode it ends in.

        While another connection switches a new database to WAL or writes it in rollback mode,
        SQLite refuses the switch at once instead of waiting for the busy timeout (several
        processes opening a new database together met this): such a refusal is tried again,
        until the busy timeout has passed."""
        pauses = pauses_within(self._timeout, first=0.001, longest=0.05)
        while True:
            try:
                return str(db.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as exc:
                pause = next(pauses, None)
                if _error_code(exc) != _BUSY or pause is None:
                    raise
                time.sleep(pause)

    def _ensure_ready(self) -> None:
        if self._writer is None:
            with self._write_lock:
                self._writer_connection()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction on the writer connection: committed if the block returns,
        rolled back if it raises."""
        with self._write_lock:
            db = self._writer_connection()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                self._roll_back(db)
                raise

    def _roll_back(self, db: sqlite3.Connection) -> None:
        if not db.in_transaction:
            return  # SQLite already rolled it back (e.g. after SQLITE_FULL)
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            # A connection that cannot roll back is not reused; the next call opens another.
            logger.warning("sqlite store: rolling back on %s failed; reopening", self._path,
                           exc_info=True)
            self._writer = None
            db.close()

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: several statements that see one commit."""
        with self._readers.connection() as db:
            db.execute("BEGIN")
            yield db
            db.execute("COMMIT")

    def _key(self, run_key: str, sequence: int) -> str:
        return f"{self._path}#fc_checkpoints/{run_key}/{sequence}"

    def _missing_record(self, run_key: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"the run record of run key {run_key} is missing while its checkpoints are in "
            "place; `fastcheckpoint doctor --repair URL` rebuilds it from them (delete_run "
            "removes the run)",
            key=f"{self._path}#fc_runs/{run_key}",
        )

    def _damaged_record(self, run_key: str, problem: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"run key {run_key}: {problem}; `fastcheckpoint doctor --repair URL` rebuilds the "
            "run record from the run's checkpoints (delete_run removes the run)",
            key=f"{self._path}#fc_runs/{run_key}",
        )

    def _check_head(self, run_key: str, head: steps.Head) -> steps.Head:
        """The row an append or a delete writes after, refused when it is not the run's."""
        problem = _head_problem(run_key, head)
        if problem is not None:
            raise self._damaged_record(run_key, problem)
        return head

    def _check_damage(self, db: sqlite3.Connection, run_key: str) -> None:
        """Called when the run has no row: refuse if checkpoints are in place without it."""
        if db.execute(steps.HAS_CHECKPOINTS, (run_key,)).fetchone()[0]:
            raise self._missing_record(run_key)

    def _warn_damaged(
        self, run_key: str, why: str = "is missing while its checkpoints are in place"
    ) -> None:
        logger.warning(
            "sqlite store: the run record %s#fc_runs/%s %s; reading them with status 'active' "
            "(fastcheckpoint doctor --repair rebuilds it)", self._path, run_key, why,
        )

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
        keep_latest = _check_append(run_key, record, run, keep_latest, now, items)
        status, _ = await self._call(self._append, run_key, record, run, keep_latest, now,
                                     items)
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
        """``append``, at the run's next sequence when other writers took the one proposed
        (``renumber`` makes the checkpoint for it), in the same transaction: writers of one
        run take turns instead of racing for sequences."""
        keep_latest = _check_append(run_key, record, run, keep_latest, now)
        if record.refs:
            raise ValidationError("append_next takes checkpoints that name no items")
        return await self._call(self._append, run_key, record, run, keep_latest, now, (),
                                renumber)

    def _append(
        self,
        run_key: str,
        record: StoredCheckpoint,
        seed: RunRecord,
        keep_latest: int | None,
        now: float,
        items: Sequence[Item],
        renumber: Callable[[int], StoredCheckpoint] | None = None,
    ) -> tuple[str, StoredCheckpoint]:
        with self._transaction() as db:
            row = db.execute(steps.HEAD, (run_key,)).fetchone()
            head = None if row is None else self._check_head(run_key, steps.Head(*row))
            if head is None or not is_live(head.expires_at, now):
                head = self._start_run(db, run_key, record, seed, head)
            else:
                if renumber is not None and seed.incarnation == head.incarnation and \
                        record.sequence != head.latest_sequence + 1:
                    record = renumbered(renumber, head.latest_sequence + 1)
                self._check_next(db, run_key, head, record, seed)
            # After the leftovers of an expired run went: a ref to one of them is refused too.
            # Raising rolls back, so a refused append leaves even a new run's row unwritten.
            missing = steps.unheld(db, run_key, refs_to_find(record, items), now)
            if missing:
                raise unheld_refs(run_key, record.sequence, missing)
            self._insert_checkpoint(db, run_key, record)
            steps.put_appended_items(db, run_key, record, items, now)
            self._update_head(db, run_key, head, record, seed, keep_latest, now)
            return head.status, record

    def _check_next(
        self,
        db: sqlite3.Connection,
        run_key: str,
        head: steps.Head,
        record: StoredCheckpoint,
        seed: RunRecord,
    ) -> None:
        """``record`` must be the live run's next checkpoint, after a run row that the newest
        checkpoint in place does not contradict."""
        self._check_log(db, run_key, head)
        if record.sequence != head.latest_sequence + 1 or seed.incarnation != head.incarnation:
            raise SequenceConflict(
                f"run {run_key} is at sequence {head.latest_sequence}",
                latest_sequence=head.latest_sequence, incarnation=head.incarnation,
            )

    def _check_log(self, db: sqlite3.Connection, run_key: str, head: steps.Head) -> None:
        """Refuse to write after a run row that the newest checkpoint in place contradicts
        (one more primary-key probe)."""
        newest = db.execute(steps.NEWEST_ID, (run_key,)).fetchone()
        if newest is not None:
            self._check_newest(run_key, newest)
        problem = _contradiction(run_key, head, newest)
        if problem is not None:
            raise self._damaged_record(run_key, problem)

    def _check_newest(self, run_key: str, newest: Sequence[Any]) -> None:
        """Refuse a newest checkpoint row of another type: a repair cannot mend it."""
        problem = _unreadable_newest(newest)
        if problem is not None:
            raise CorruptCheckpointError(
                f"run key {run_key}: {problem}; it was written with the checks off: delete "
                "that row by hand (or delete_run the run)",
                key=self._key(run_key, newest[0]),
            )

    def _start_run(
        self,
        db: sqlite3.Connection,
        run_key: str,
        record: StoredCheckpoint,
        seed: RunRecord,
        head: steps.Head | None,
    ) -> steps.Head:
        """A fresh head for a run that has no live record; leftovers of an expired one go."""
        if head is None:
            self._check_damage(db, run_key)
        else:
            self._check_log(db, run_key, head)  # never drop checkpoints its row does not know
        if record.sequence != 0:
            raise SequenceConflict(
                f"run {run_key} has no live record: only sequence 0 can start it",
                latest_sequence=None, incarnation=None,
            )
        check_seed(seed)
        if head is not None:
            steps.drop_leftovers(db, run_key)
        return steps.Head(seed.incarnation, seed.status, -1, 0, 0, record.expires_at, None,
                          seed.run_id, new=True)

    def _insert_checkpoint(
        self, db: sqlite3.Connection, run_key: str, record: StoredCheckpoint
    ) -> None:
        try:
            db.execute(steps.INSERT_CHECKPOINT, (
                run_key, record.sequence, record.checkpoint_id, record.created_at,
                record.expires_at, steps.join_refs(record.refs), record.header, record.payload,
            ))
        except sqlite3.IntegrityError as exc:
            # Only a row edited by hand puts a checkpoint beyond the run's latest sequence.
            raise CorruptCheckpointError(
                f"a checkpoint already holds sequence {record.sequence}, after the latest "
                "one its run record knows: the run record was put back from an older copy or "
                "edited by hand; `fastcheckpoint doctor --repair URL` rebuilds it from the "
                f"checkpoints ({exc})",
                key=self._key(run_key, record.sequence),
            ) from exc
        steps.add_refs(db, run_key, record.refs)

    def _update_head(
        self,
        db: sqlite3.Connection,
        run_key: str,
        head: steps.Head,
        record: StoredCheckpoint,
        seed: RunRecord,
        keep_latest: int | None,
        now: float,
    ) -> None:
        """The run row after appending ``record``, with pruning done."""
        held = head.held + 1
        immortal = head.immortal + (record.expires_at is None)
        expires_at = latest_expiry(head.expires_at, record.expires_at)
        due = steps.earliest(head.due, record.expires_at)
        removed = steps.prune(db, run_key, held=held, due=due, keep_latest=keep_latest, now=now,
                              kept=record.refs)
        held -= removed.checkpoints
        immortal -= removed.immortal
        recounted = keep_latest is not None and held > keep_latest
        if recounted:
            held, immortal = steps.held_again(db, run_key)
        immortal = steps.immortal_left(db, run_key, immortal)
        if recounted or removed.mortal or (removed.checkpoints and not immortal):
            expires_at, due = steps.holdings(db, run_key, immortal)
        if head.new:
            steps.insert_first(db, run_key, seed, record, held=held, immortal=immortal,
                               expires_at=expires_at, due=due, now=now)
        elif due == head.due:
            db.execute(steps.UPDATE_HEAD,
                       (record.sequence, held, immortal, now, expires_at, run_key))
        else:
            db.execute(steps.UPDATE_HEAD_DUE,
                       (record.sequence, held, immortal, now, expires_at, due, run_key))

    async def get(
        self, run_key: str, sequence: int, *, now: float
    ) -> tuple[StoredCheckpoint, str] | None:
        check_run_key(run_key)
        check_time("now", now)
        sequence = check_sequence(sequence)
        return await self._call(self._get, run_key, sequence, now)

    def _get(self, run_key: str, sequence: int, now: float) -> tuple[StoredCheckpoint, str] | None:
        with self._readers.connection() as db:
            row = db.execute(steps.GET, (run_key, sequence)).fetchone()
        return self._found(run_key, row, now)

    async def latest(self, run_key: str, *, now: float) -> tuple[StoredCheckpoint, str] | None:
        check_run_key(run_key)
        check_time("now", now)
        return await self._call(self._latest, run_key, now)

    def _latest(self, run_key: str, now: float) -> tuple[StoredCheckpoint, str] | None:
        with self._readers.connection() as db:
            row = db.execute(steps.LATEST, (run_key, now)).fetchone()
        return self._found(run_key, row, now)

    def _found(
        self, run_key: str, row: Sequence[Any] | None, now: float
    ) -> tuple[StoredCheckpoint, str] | None:
        """The live checkpoint of a ``GET``/``LATEST`` row with its run's status."""
        if row is None:
            return None
        sequence, checkpoint_id, created_at, expires_at, refs, header, payload = row[:7]
        status, run_expires_at, has_run = row[7:]
        wrong = _wrong_type(row, steps.CHECKPOINT_TYPES)
        if wrong is not None:
            raise CorruptCheckpointError(f"checkpoint {sequence!r:.40} of run key {run_key}: "
                                         f"{wrong}", key=self._key(run_key, sequence))
        if not has_run:
            self._warn_damaged(run_key)
            status = "active"
        elif _wrong_type(row[7:], steps.JOINED_RUN_TYPES) is not None:
            self._warn_damaged(run_key, "holds a value of another type")
            status = "active"
        elif not is_live(run_expires_at, now):
            if not is_live(expires_at, now):
                return None
            # A run outlives its checkpoints: its row is an older copy put back.
            self._warn_damaged(run_key, "says the run expired while live checkpoints are in place")
            status = "active"
        elif _undecodable(status):
            self._warn_damaged(run_key, "holds text that is not UTF-8")
            status = "active"
        if not is_live(expires_at, now):
            return None
        if _undecodable(checkpoint_id, refs):
            raise CorruptCheckpointError(
                f"checkpoint {sequence} of run key {run_key} holds text that is not UTF-8",
                key=self._key(run_key, sequence),
            )
        record = StoredCheckpoint(
            sequence=sequence, checkpoint_id=checkpoint_id, created_at=created_at,
            expires_at=expires_at, header=header, payload=payload,
            key=self._key(run_key, sequence), refs=steps.split_refs(refs),
        )
        return record, status

    async def headers(
        self,
        run_key: str,
        *,
        before: int | None,
        limit: int,
        now: float,
        include_expired: bool = False,
    ) -> tuple[list[CheckpointHeader], str | None]:
        check_flag("include_expired", include_expired)
        check_run_key(run_key)
        check_time("now", now)
        end = steps.INT64 if before is None else max(-1, check_int("before", before))
        limit = _check_limit(limit)
        return await self._call(self._headers, run_key, end, limit, now, include_expired)

    def _headers(
        self, run_key: str, before: int, limit: int, now: float, include_expired: bool
    ) -> tuple[list[CheckpointHeader], str | None]:
        with self._snapshot() as db:
            run = db.execute(steps.RUN_STATUS, (run_key,)).fetchone()
            if run is None:
                if not db.execute(steps.HAS_CHECKPOINTS, (run_key,)).fetchone()[0]:
                    return [], None
                self._warn_damaged(run_key)
                run = ("active", None)
            elif _wrong_type(run, steps.JOINED_RUN_TYPES) is not None:
                self._warn_damaged(run_key, "holds a value of another type")
                run = ("active", None)
            elif not include_expired and not is_live(run[1], now):
                run = self._expired_status(db, run_key, now)
                if run is None:
                    return [], None
            elif _undecodable(run[0]):
                self._warn_damaged(run_key, "holds text that is not UTF-8")
                run = ("active", run[1])
            statement, live = (steps.HEADERS, ()) if include_expired else (
                steps.LIVE_HEADERS, (now,))
            found: list[CheckpointHeader] = []
            while True:
                # A page a left-out checkpoint falls in is filled from past it: a short page
                # reads as the end of the run.
                wanted = limit - len(found)
                rows = db.execute(statement, (run_key, before, wanted, *live)).fetchall()
                found += [
                    CheckpointHeader(sequence=sequence, checkpoint_id=checkpoint_id,
                                     created_at=created_at, expires_at=expires_at, header=header)
                    for sequence, checkpoint_id, created_at, expires_at, header in rows
                    if not self._skipped(run_key, (sequence, checkpoint_id, created_at,
                                                   expires_at, header))
                ]
                if len(rows) < wanted or len(found) == limit:
                    return found, run[0]
                before = rows[-1][0]

    def _expired_status(
        self, db: sqlite3.Connection, run_key: str, now: float
    ) -> tuple[str, float | None] | None:
        """``None`` for a run whose row says it expired, unless live checkpoints are in place
        (a run outlives its checkpoints, so its row is an older copy put back): then they are
        listed, with status ``active``."""
        if db.execute(steps.HAS_LIVE_CHECKPOINT, (run_key, now)).fetchone()[0]:
            self._warn_damaged(run_key, "says the run expired while live checkpoints are in place")
            return "active", None
        return None

    def _skipped(self, run_key: str, row: Sequence[Any]) -> bool:
        """Whether a listing leaves out a checkpoint's header row (logged): its id is not
        UTF-8, or a column holds a value of another type."""
        problem = _wrong_type(row, steps.HEADER_TYPES) or (
            "it holds an id that is not UTF-8" if _undecodable(row[1]) else None)
        if problem is None:
            return False
        logger.warning("sqlite store: %s is left out of the listing: %s",
                       self._key(run_key, row[0]), problem)
        return True

    async def delete(self, run_key: str, sequence: int, *, checkpoint_id: str) -> bool:
        check_run_key(run_key)
        checkpoint_id = cast(str, check_str("checkpoint_id", checkpoint_id))
        sequence = check_sequence(sequence)
        return await self._call(self._delete, run_key, sequence, checkpoint_id)

    def _delete(self, run_key: str, sequence: int, checkpoint_id: str) -> bool:
        with self._transaction() as db:
            row = db.execute(steps.HEAD, (run_key,)).fetchone()
            if row is None:
                self._check_damage(db, run_key)
                return False
            head = self._check_head(run_key, steps.Head(*row))
            found = db.execute(steps.CHECKPOINT, (run_key, sequence)).fetchone()
            if found is None or found[3] != checkpoint_id:
                return False
            removed = steps.remove(db, run_key, [found])
            immortal = steps.immortal_left(db, run_key, head.immortal - removed.immortal)
            expires_at, due = steps.holdings(db, run_key, immortal)
            db.execute(steps.UPDATE_HOLDINGS,
                       (head.held - 1, immortal, expires_at, due, run_key))
            return True

    async def delete_run(self, run_key: str) -> int:
        check_run_key(run_key)
        return await self._call(self._delete_run, run_key)

    def _delete_run(self, run_key: str) -> int:
        with self._transaction() as db:
            return steps.drop_run(db, run_key)

    # -- runs ---------------------------------------------------------------------------------

    async def get_run(self, run_key: str, *, now: float) -> RunRecord | None:
        check_run_key(run_key)
        check_time("now", now)
        return await self._call(self._get_run, run_key, now)

    def _get_run(self, run_key: str, now: float) -> RunRecord | None:
        with self._readers.connection() as db:
            row = db.execute(steps.GET_RUN, (run_key,)).fetchone()
        if row[0] is None:
            if row[-1]:
                raise self._missing_record(run_key)
            return None
        wrong = _wrong_type(row, steps.RUN_TYPES)
        if wrong is not None:
            raise self._damaged_record(run_key, wrong)
        record = steps.run_of(row)
        if not is_live(record.expires_at, now):
            return None
        problem = _unusable(run_key, record)
        if problem is not None:
            raise self._damaged_record(run_key, problem)
        return record

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
        check_run_key(run_key)
        check_text("status", status)
        check_bytes("data", data)
        check_time("now", now)
        check_guard_arg(latest_sequence)
        incarnation = cast(str, check_str("incarnation", incarnation))
        return await self._call(self._update_run, run_key, incarnation, version, status,
                                data, now, latest_sequence)

    def _update_run(
        self, run_key: str, incarnation: str, version: int, status: str, data: bytes, now: float,
        latest_sequence: int | None,
    ) -> RunRecord:
        # One write transaction, as every append's: the row's latest_sequence is the log's.
        with self._transaction() as db:
            row = db.execute(steps.RUN, (run_key,)).fetchone()
            if row is None:
                self._check_damage(db, run_key)
                raise CheckpointNotFound(f"no live run with key {run_key}")
            wrong = _wrong_type(row, steps.RUN_TYPES)
            if wrong is not None:
                raise self._damaged_record(run_key, wrong)
            current = steps.run_of(row)
            if not is_live(current.expires_at, now):
                raise CheckpointNotFound(f"no live run with key {run_key}")
            problem = _unusable(run_key, current)
            if problem is None and current.version >= steps.INT64:
                problem = _implausible(current)  # no version is left for the change
            if problem is not None:
                raise self._damaged_record(run_key, problem)
            if (current.incarnation, current.version) != (incarnation, version):
                raise ConflictError(
                    f"run changed concurrently (now {current.incarnation}/{current.version}, "
                    f"expected {incarnation}/{version})"
                )
            check_head(run_key, current.latest_sequence, latest_sequence)
            db.execute(steps.UPDATE_RUN, (status, bytes(data), version + 1, now, run_key))
        return msgspec.structs.replace(
            current, status=status, data=bytes(data), version=version + 1, updated_at=now
        )

    async def list_runs(
        self, *, status: str | None, limit: int, cursor: str | None, now: float
    ) -> tuple[list[RunRecord], str | None]:
        if status is not None and not isinstance(status, str):
            raise ValidationError(f"status must be a str or None, got {shown(status)}")
        after = _parse_cursor(cursor)
        limit = _check_limit(limit)
        check_time("now", now)
        if status is not None and not _encodable(status):
            return [], None  # no run has a status that is not valid unicode
        if status is None:
            return await self._call(self._page, steps.LIST_RUNS, (*after, now, limit + 1), limit)
        return await self._call(
            self._page, steps.LIST_RUNS_BY_STATUS, (*after, now, limit + 1, status), limit
        )

    async def runs_with_label(
        self, label: str, *, limit: int, cursor: str | None, now: float
    ) -> tuple[list[RunRecord], str | None]:
        check_labels((label,))
        after = _parse_cursor(cursor)
        limit = _check_limit(limit)
        check_time("now", now)
        return await self._call(
            self._page, steps.RUNS_WITH_LABEL, (*after, now, limit + 1, label), limit
        )

    def _page(
        self, query: str, parameters: tuple[Any, ...], limit: int
    ) -> tuple[list[RunRecord], str | None]:
        if limit == 0:
            return [], None
        with self._readers.connection() as db:
            rows = db.execute(query, parameters).fetchall()
        runs = [run for run in map(self._listed, rows[:limit]) if run is not None]
        if len(rows) <= limit:
            return runs, None
        last = rows[limit - 1]
        return runs, _make_cursor(last[3], last[-1])

    def _listed(self, row: Sequence[Any]) -> RunRecord | None:
        """The record of a listing's row; ``None`` (logged) for a damaged one."""
        problem = _wrong_type(row, steps.RUN_TYPES)
        if problem is None:
            run = steps.run_of(row)
            problem = _unusable(row[-1], run)
            if problem is None:
                return run
        logger.warning("sqlite store: the run record %s#fc_runs/%s is left out of the listing: "
                       "%s (fastcheckpoint doctor --repair rebuilds it)", self._path, row[-1],
                       problem)
        return None

    async def count_runs(self, *, status: str | None, now: float) -> int:
        if status is not None and not isinstance(status, str):
            raise ValidationError(f"status must be a str or None, got {shown(status)}")
        check_time("now", now)
        if status is not None and not _encodable(status):
            return 0
        return await self._call(self._count_runs, status, now)

    def _count_runs(self, status: str | None, now: float) -> int:
        with self._readers.connection() as db:
            if status is None:
                return int(db.execute(steps.COUNT_RUNS, (now,)).fetchone()[0])
            return int(db.execute(steps.COUNT_RUNS_BY_STATUS, (now, status)).fetchone()[0])

    # -- items --------------------------------------------------------------------------------

    async def put_items(
        self, run_key: str, items: Sequence[Item], *, create_only: bool = False, now: float
    ) -> None:
        check_flag("create_only", create_only)
        check_run_key(run_key)
        check_items(items)
        check_time("now", now)
        if items:
            await self._call(self._put_items, run_key, list(items), create_only, now)

    def _put_items(
        self, run_key: str, items: list[Item], create_only: bool, now: float
    ) -> None:
        with self._transaction() as db:
            taken = steps.first_live_item(db, run_key, [item.key for item in items], now) \
                if create_only else None
            if taken is not None:
                raise ConflictError(f"item {taken!r:.80} already exists")
            db.executemany(steps.UPSERT_ITEM, [
                (run_key, item.key, item.owner, item.expires_at, item.value) for item in items
            ])

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
        check_flag("if_absent", if_absent)
        check_run_key(run_key)
        check_int("owner", owner)
        checkpoint_id = cast(str, check_str("checkpoint_id", checkpoint_id))
        check_time("now", now)
        check_items(items)
        for item in items:
            if item.owner != owner:
                raise ValidationError(
                    f"item {item.key[:40]!r} is owned by {item.owner!r}, not by checkpoint {owner}"
                )
        return await self._call(self._put_owned_items, run_key, list(items), owner,
                                checkpoint_id, if_absent, now)

    def _put_owned_items(
        self, run_key: str, items: list[Item], owner: int, checkpoint_id: str, if_absent: bool,
        now: float,
    ) -> bool:
        with self._transaction() as db:
            row = db.execute(steps.OWNER, (run_key, owner)).fetchone()
            if row is None or row[0] != checkpoint_id:
                return False
            wrong = _wrong_type(row, steps.OWNER_TYPES)
            if wrong is not None:
                raise CorruptCheckpointError(f"checkpoint {owner} of run key {run_key} or its "
                                             f"run record: {wrong}", key=self._key(run_key, owner))
            expires_at, run_expires_at = row[1], row[2]
            if not (is_live(expires_at, now) and is_live(run_expires_at, now)):
                return False
            statement = steps.INSERT_ITEM_IF_ABSENT if if_absent else steps.UPSERT_ITEM
            db.executemany(statement, [
                (run_key, item.key, owner, steps.earliest(item.expires_at, expires_at),
                 item.value, *((now,) if if_absent else ()))
                for item in items
            ])
            return True

    async def get_items(
        self, run_key: str, keys: Sequence[str], *, now: float
    ) -> dict[str, bytes]:
        check_run_key(run_key)
        wanted = _check_keys(keys)
        check_time("now", now)
        if not wanted:
            return {}
        return await self._call(self._get_items, run_key, wanted, now)

    def _get_items(self, run_key: str, keys: list[str], now: float) -> dict[str, bytes]:
        with self._snapshot() as db:
            return steps.read_items(db, run_key, keys, now)

    async def read_with_items(
        self, run_key: str, *, sequence: int | None, now: float
    ) -> tuple[StoredCheckpoint, str, dict[str, bytes]] | None:
        check_run_key(run_key)
        check_time("now", now)
        if sequence is not None:
            sequence = check_sequence(sequence)
        return await self._call(self._read_with_items, run_key, sequence, now)

    def _read_with_items(
        self, run_key: str, sequence: int | None, now: float
    ) -> tuple[StoredCheckpoint, str, dict[str, bytes]] | None:
        with self._snapshot() as db:
            if sequence is None:
                row = db.execute(steps.LATEST, (run_key, now)).fetchone()
            else:
                row = db.execute(steps.GET, (run_key, sequence)).fetchone()
            found = self._found(run_key, row, now)
            if found is None:
                return None
            record, status = found
            refs = list(dict.fromkeys(record.refs))
            named = steps.read_refs(db, run_key, refs, now)
            owned = db.execute(steps.OWNED_ITEMS, (run_key, record.sequence, now)).fetchall()
            items = dict(self._checked_items(run_key, [*named, *owned]))
            missed = [key for key in refs if key not in items]
            # In the same snapshot, only when the read missed a named item.
            lost = steps.deleted_behind(db, run_key, missed) if missed else []
        if lost:
            raise items_deleted_behind(run_key, record.sequence, lost,
                                       f"{self._path}#fc_items/{run_key}/{lost[0]}")
        return record, status, items

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
        check_run_key(run_key)
        if not isinstance(prefix, str) or (start_after is not None and not isinstance(
                start_after, str)):
            raise ValidationError("prefix and start_after must be str")
        prefix = cast(str, check_str("prefix", prefix))
        start_after = check_str("start_after", start_after, optional=True)
        if start_after is not None and not _encodable(start_after):
            raise ValidationError(f"start_after {start_after[:40]!r} is not valid unicode")
        limit = _check_limit(limit)
        check_time("now", now)
        if limit == 0 or not _encodable(prefix):
            return []  # no key holds a lone surrogate
        return await self._call(self._scan_items, run_key, prefix, start_after, limit,
                                bool(reverse), now)

    def _scan_items(
        self, run_key: str, prefix: str, start_after: str | None, limit: int, reverse: bool,
        now: float,
    ) -> list[tuple[str, bytes]]:
        upper = _upper_bound(prefix) if prefix else None
        bounds = (bool(prefix), upper is not None, start_after is not None)
        parameters: list[Any] = [run_key, now]
        parameters += [prefix] if prefix else []
        parameters += [upper] if upper is not None else []
        parameters += [start_after] if start_after is not None else []
        statement = steps.scan_statement(bounds, reverse)
        size = limit
        with self._readers.connection() as db:
            while True:
                rows = db.execute(statement, (*parameters, size)).fetchall()
                found = [(key, value) for key, value in rows if not _undecodable(key)]
                if len(found) >= limit or len(rows) < size:
                    break
                # A damaged row (its key not UTF-8) is left out, never counted in the page:
                # a short page would read as the end of the listing.
                size += len(rows) - len(found)
        for key, _ in rows:
            if _undecodable(key):
                logger.warning("sqlite store: skipping an item of run key %s whose key is not "
                               "UTF-8: %r", run_key, key[:80])
        return found[:limit]

    def _checked_items(
        self, run_key: str, rows: Iterable[tuple[str, bytes]]
    ) -> list[tuple[str, bytes]]:
        found = [(key, value) for key, value in rows]
        for key, _ in found:
            if _undecodable(key):
                raise CorruptCheckpointError(
                    f"an item key of run key {run_key} is not UTF-8: {key!r:.80}",
                    key=f"{self._path}#fc_items/{run_key}",
                )
        return found

    async def delete_items(self, run_key: str, keys: Sequence[str]) -> int:
        check_run_key(run_key)
        doomed = _check_keys(keys)
        if not doomed:
            return 0
        return await self._call(self._delete_items, run_key, doomed)

    def _delete_items(self, run_key: str, keys: list[str]) -> int:
        with self._transaction() as db:
            # One at a time: a key listed twice is removed (and counted) once. Each removal
            # is recorded on the key's count, where a held checkpoint names it.
            removed = [key for key in keys
                       if db.execute(steps.DELETE_ITEM, (run_key, key)).rowcount]
            db.executemany(steps.RECORD_REMOVAL, [(run_key, key) for key in removed])
            return len(removed)

    # -- maintenance --------------------------------------------------------------------------

    async def purge_expired(self, *, now: float, limit: int) -> tuple[int, bool]:
        check_time("now", now)
        limit = max(1, _check_limit(limit))
        return await self._call(self._purge_expired, now, limit)

    def _purge_expired(self, now: float, limit: int) -> tuple[int, bool]:
        removed = 0
        budget = limit
        with self._transaction() as db:
            for row in db.execute(steps.DUE_RUNS, (now, limit)).fetchall():
                run_key, expires_at, held, immortal = row
                if budget <= 0:
                    break
                wrong = _wrong_type(row, steps.DUE_TYPES)
                if wrong is not None:
                    self._leave_alone(db, run_key, wrong)
                    found = 0
                elif is_live(expires_at, now):
                    found = steps.purge_checkpoints(db, run_key, held=held, immortal=immortal,
                                                    now=now, budget=budget)
                elif self._contradicted(db, run_key):
                    found = 0
                else:
                    found = steps.purge_run(db, run_key, held, budget)
                removed += found
                budget -= max(found, 1)
            if budget > 0:
                expired = db.execute(steps.EXPIRED_ITEMS, (now, budget)).fetchall()
                db.executemany(steps.DELETE_ITEM_ROW, expired)
            done = not db.execute(steps.ANYTHING_DUE, (now,)).fetchone()[0]
        return removed, done

    def _contradicted(self, db: sqlite3.Connection, run_key: str) -> bool:
        """Whether an expired run's row contradicts its newest checkpoint: then the run is not
        removed, and not visited again (``due`` cleared) until a repair rebuilds its row."""
        head = steps.Head(*db.execute(steps.HEAD, (run_key,)).fetchone())
        # A row copied over from another run carries that run's expiry, not this one's.
        problem = _head_problem(run_key, head) or _contradiction(
            run_key, head, db.execute(steps.NEWEST_ID, (run_key,)).fetchone())
        if problem is None:
            return False
        self._leave_alone(db, run_key, problem)
        return True

    def _leave_alone(self, db: sqlite3.Connection, run_key: str, problem: str) -> None:
        """The cleanup leaves a run alone, and does not visit it again (``due`` cleared)
        until a repair rebuilds its row."""
        logger.warning("sqlite store: cleanup leaves run key %s alone in %s: %s (fastcheckpoint "
                       "doctor --repair rebuilds its record)", run_key, self._path, problem)
        db.execute(steps.CLEAR_DUE, (run_key,))

    async def provision(self) -> list[str]:
        """Create the schema in a new database or upgrade an older one (``fastcheckpoint
        init``); a database of a newer release is refused, never downgraded."""
        return await self._call(self._provision)

    def _provision(self) -> list[str]:
        with self._write_lock:
            db = self._open_database()
            try:
                done = schema.provision(db, self._path, upgrade=True)
            finally:
                db.close()
            if self._writer is not None:  # reopened with the schema as it is now
                self._writer.close()
                self._writer = None
        return [*done, f"journal mode WAL, synchronous={self._synchronous} in {self._path}"]

    # -- repair -------------------------------------------------------------------------------

    async def damaged_runs(self, *, run_key: str | None = None, now: float) -> list[RunDamage]:
        """Runs whose row is missing while checkpoint rows are in place, is damaged in itself
        (copied over from another run, text that is not UTF-8), or contradicts the newest of
        them (fewer sequences, another incarnation, an earlier expiry). Without ``run_key``
        this reads every run row (not its details) and visits every run key of the
        checkpoint table (a few primary-key probes each, and a count of the checkpoints of a
        damaged one)."""
        if run_key is not None:
            check_run_key(run_key)
        check_time("now", now)
        return await self._call(self._damaged_runs, run_key)

    def _damaged_runs(self, run_key: str | None) -> list[RunDamage]:
        with self._snapshot() as db:
            keys = [run_key] if run_key is not None else sorted(
                {*steps.logged_runs(db), *self._suspect_rows(db)})
            damages = [self._damage(db, key) for key in keys]
        return [damage for damage in damages if damage is not None]

    def _suspect_rows(self, db: sqlite3.Connection) -> list[str]:
        """The run keys of rows damaged in themselves, also of runs that hold no checkpoint
        (a row copied over one, say): one read of every run row, without its details. A
        latest sequence raised by hand below the limit is not found: it cannot be told from
        the newest checkpoints deleted (sequences are never taken again)."""
        return [row[-1] for row in db.execute(steps.RUN_SUMMARIES)
                if _problem(row[-1], row, None) is not None]

    def _damage(self, db: sqlite3.Connection, run_key: str) -> RunDamage | None:
        row = db.execute(steps.RUN, (run_key,)).fetchone()
        checkpoints = db.execute(steps.NEWEST_FIRST, (run_key,))
        newest = checkpoints.fetchone()
        problem = _problem(run_key, row, newest)
        if problem is None and row is not None:
            # The columns only writers read (``immortal``, ``due``) are damage too.
            problem = _head_problem(
                run_key, steps.Head(*db.execute(steps.HEAD, (run_key,)).fetchone()))
        if problem is None:
            checkpoints.close()
            return None
        # The run id is read from the newest checkpoint that is the run's own.
        own = _newest_own(run_key, itertools.chain([newest] if newest else [], checkpoints))
        checkpoints.close()
        count = db.execute(steps.COUNT_CHECKPOINTS, (run_key,)).fetchone()[0]
        return RunDamage(
            run_key=run_key,
            key=f"{self._path}#fc_runs/{run_key}",
            problem=problem,
            checkpoints=count,
            newest=None if own is None else CheckpointHeader(
                sequence=own[0], checkpoint_id=own[1], created_at=own[2], expires_at=own[3],
                header=own[4]),
        )

    async def rebuild_run(self, run_key: str, seed: RunRecord, *, now: float) -> RunRecord:
        check_run_key(run_key)
        check_time("now", now)
        if not isinstance(seed, RunRecord):
            raise ValidationError(f"seed must be a RunRecord, got {type(seed).__name__}")
        return await self._call(self._rebuild_run, run_key, seed, now)

    def _rebuild_run(self, run_key: str, seed: RunRecord, now: float) -> RunRecord:
        with self._transaction() as db:
            if db.execute(steps.HAS_RUN, (run_key,)).fetchone():
                if self._damage(db, run_key) is None:
                    raise ConflictError(f"the run record of run key {run_key} is not damaged")
                db.execute(steps.DELETE_RUN_ROW, (run_key,))
            count, oldest, immortal, latest, first = db.execute(
                steps.LOG_SUMMARY, (run_key,)).fetchone()
            checkpoints = db.execute(steps.NEWEST_FIRST, (run_key,))
            newest = checkpoints.fetchone()
            own = _newest_own(run_key, itertools.chain([newest] if newest else [], checkpoints))
            checkpoints.close()
            if newest is not None:
                self._check_newest(run_key, (newest[0], newest[1], newest[3]))
            if not count or newest is None or own is None:
                raise CheckpointNotFound(
                    f"run key {run_key} holds no checkpoint of its own to rebuild a record from")
            # The incarnation is the newest own checkpoint's, never that of one of another
            # run swapped in; the latest sequence is the newest in place, whoever's it is, so
            # that the next append takes a free one.
            parsed = _ids.parse_checkpoint_id(own[1])
            assert parsed is not None  # _own parsed it
            # The label rows outlive a run row deleted by hand: the run keeps its labels.
            kept = _usable_labels(run_key, db.execute(steps.LABELS, (run_key,)))
            created_at = db.execute(steps.CREATED_AT, (run_key, oldest)).fetchone()[0]
            rebuilt = RunRecord(
                run_id=seed.run_id, incarnation=parsed[1], status=seed.status,
                created_at=created_at if _finite(created_at) else now,
                updated_at=now, latest_sequence=newest[0], checkpoint_count=count,
                expires_at=None if immortal else latest, version=0, data=bytes(seed.data),
                labels=seed.labels or kept,
            )
            check_seed(rebuilt)
            db.execute(steps.DELETE_LABELS, (run_key,))
            steps.insert_run(db, run_key, rebuilt, immortal, first)
        logger.info("sqlite store: rebuilt the run record %s#fc_runs/%s from %d checkpoints",
                    self._path, run_key, count)
        return rebuilt

    async def aclose(self) -> None:
        """Close the store's connections (a later call opens new ones)."""
        if self._writer is None and not self._readers.open:
            # Nothing to close here and now, but readers lent out to running reads (after
            # provision() closed the writer, say) are closed when given back, not kept.
            self._readers.close()
            return
        await self._call(self._close)

    def _close(self) -> None:
        with self._write_lock:
            writer, self._writer = self._writer, None
            self._readers.close()
            if writer is not None:
                writer.close()
