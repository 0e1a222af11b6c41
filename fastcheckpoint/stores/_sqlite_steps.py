"""The SQLite store's statements, and the steps its write transactions are made of.

Every step runs on the writer connection inside a transaction that the store opened
(``BEGIN IMMEDIATE``); a step never commits. Expiries are ``None`` for "never".
"""

from __future__ import annotations

import collections
import functools
import logging
import re
import sqlite3
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import msgspec

from fastcheckpoint.stores._base import (
    EMPTY_RUN,
    Item,
    RunRecord,
    StoredCheckpoint,
    key_successor,
    nested_prefix,
)

INT64 = 2**63 - 1
_IN_SIZES = (1, 4, 16, 64, 256, 500)
"""Lengths of ``IN (...)`` lists: keys are padded up to one, so few statements are prepared."""

# -- statements -------------------------------------------------------------------------------

_NESTING = nested_prefix("")
_BEYOND = key_successor(_NESTING)


def _nested_range(key: str) -> str:
    """The items ``i`` nested under the item key ``key`` (an SQL expression): the range
    ``[nested_prefix(K), key_successor(nested_prefix(K)))`` of the item key index, ``K || '/'``
    to ``K || '0'`` (the successor changes only the last character); SQLite compares UTF-8 text
    bytewise, which is code point order, as in ``scan_items``."""
    return f"i.key >= {key} || '{_NESTING}' AND i.key < {key} || '{_BEYOND}'"


RUN_COLUMNS = (
    "r.run_id, r.incarnation, r.status, r.created_at, r.updated_at, r.latest_sequence, "
    "r.checkpoint_count, r.expires_at, r.version, r.data, r.labels"
)
_CHECKPOINT_COLUMNS = (
    "c.sequence, c.checkpoint_id, c.created_at, c.expires_at, c.refs, c.header, c.payload, "
    "r.status, r.expires_at, r.run_key IS NOT NULL"
)
_LIVE = "(expires_at IS NULL OR expires_at > ?)"

HEAD = (
    "SELECT incarnation, status, latest_sequence, checkpoint_count, immortal, expires_at, due, "
    "run_id FROM fc_runs WHERE run_key = ?"
)
HAS_CHECKPOINTS = "SELECT EXISTS (SELECT 1 FROM fc_checkpoints WHERE run_key = ?)"
HAS_LIVE_CHECKPOINT = (
    "SELECT EXISTS (SELECT 1 FROM fc_checkpoints WHERE run_key = ?1 "
    "AND (expires_at IS NULL OR expires_at > ?2))"
)
INSERT_CHECKPOINT = (
    "INSERT INTO fc_checkpoints (run_key, sequence, checkpoint_id, created_at, expires_at, refs, "
    "header, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_RUN = (
    "INSERT INTO fc_runs (run_key, run_id, incarnation, status, created_at, updated_at, "
    "latest_sequence, checkpoint_count, immortal, expires_at, due, version, labels, data) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_LABEL = (
    "INSERT OR IGNORE INTO fc_labels (run_key, label, created_at, position) VALUES (?, ?, ?, ?)"
)
# The index on ``due`` changes only when ``due`` does: the common append leaves it alone.
UPDATE_HEAD = (
    "UPDATE fc_runs SET latest_sequence = ?, checkpoint_count = ?, immortal = ?, "
    "updated_at = ?, expires_at = ? WHERE run_key = ?"
)
UPDATE_HEAD_DUE = (
    "UPDATE fc_runs SET latest_sequence = ?, checkpoint_count = ?, immortal = ?, "
    "updated_at = ?, expires_at = ?, due = ? WHERE run_key = ?"
)
UPDATE_HOLDINGS = (
    "UPDATE fc_runs SET checkpoint_count = ?, immortal = ?, expires_at = ?, due = ? "
    "WHERE run_key = ?"
)
_EXPIRY_RANGE = (
    "SELECT (SELECT max(expires_at) FROM fc_checkpoints WHERE run_key = ?1 AND expires_at "
    "IS NOT NULL), (SELECT min(expires_at) FROM fc_checkpoints WHERE run_key = ?1 AND "
    "expires_at IS NOT NULL)"
)
# Only when the range above met an expiry of another type (written with the checks off; text
# and blobs sort above every number): the range of the real ones, reading every expiry of the
# run. A checkpoint whose expiry is unreadable is left to expire with its run.
_REAL_EXPIRY_RANGE = (
    "SELECT max(expires_at), min(expires_at) FROM fc_checkpoints WHERE run_key = ?1 "
    "AND typeof(expires_at) = 'real'"
)
_EXPIRED_CHECKPOINTS = (
    "SELECT sequence, expires_at, refs FROM fc_checkpoints WHERE run_key = ? "
    "AND expires_at <= ? ORDER BY expires_at LIMIT ?"
)
_OLDEST_CHECKPOINTS = (
    "SELECT sequence, expires_at, refs FROM fc_checkpoints WHERE run_key = ? "
    "ORDER BY sequence LIMIT ?"
)
# Pruning never reaches the ``keep_latest`` newest checkpoints held, whatever the run row
# counts (a count raised by hand, or a row put back from an older copy, would otherwise take
# them): only sequences below the ``keep_latest``-th newest one in place. A bound by sequence
# numbers (``newest - keep_latest``) let a row put back from before a delete take one of them
# (deleted sequences are gaps). The subquery walks ``keep_latest`` entries of the primary key
# index, once per pruning create.
_PRUNABLE_CHECKPOINTS = (
    "SELECT sequence, expires_at, refs FROM fc_checkpoints WHERE run_key = ?1 AND sequence < ("
    "SELECT sequence FROM fc_checkpoints WHERE run_key = ?1 ORDER BY sequence DESC "
    "LIMIT 1 OFFSET ?2) ORDER BY sequence LIMIT ?3"
)
CHECKPOINT = "SELECT sequence, expires_at, refs, checkpoint_id FROM fc_checkpoints " \
    "WHERE run_key = ? AND sequence = ?"
# Deleting a checkpoint row removes its owned items (the trigger of the schema).
_DELETE_CHECKPOINT = "DELETE FROM fc_checkpoints WHERE run_key = ? AND sequence = ?"
_DELETE_UP_TO = "DELETE FROM fc_checkpoints WHERE run_key = ? AND sequence <= ?"
_ADD_REF = (
    "INSERT INTO fc_item_refs (run_key, key, holders) VALUES (?, ?, 1) "
    "ON CONFLICT (run_key, key) DO UPDATE SET holders = holders + 1"
)
_DROP_REF = "UPDATE fc_item_refs SET holders = holders - ? WHERE run_key = ? AND key = ?"
# Owned items go with their owner, never with a reference: only loose items are removed when
# a key's last reference goes.
_DELETE_LOOSE = "DELETE FROM fc_items WHERE run_key = ? AND key = ? AND owner IS NULL"
_DELETE_LOOSE_RANGE = (
    "DELETE FROM fc_items WHERE run_key = ? AND key >= ? AND key < ? AND owner IS NULL"
)
_NAMED_UNDER = (
    f"SELECT key FROM fc_item_refs WHERE run_key = ?1 AND key >= ?2 || '{_NESTING}' "
    f"AND key < ?2 || '{_BEYOND}' AND holders > 0"
)
_DELETE_ZERO_REF = "DELETE FROM fc_item_refs WHERE run_key = ? AND key = ? AND holders <= 0"
_DELETE_REF = "DELETE FROM fc_item_refs WHERE run_key = ? AND key = ?"
_CLAMP_REF = "UPDATE fc_item_refs SET holders = 0 WHERE run_key = ? AND key = ? AND holders < 0"
_RUN_REFS = "SELECT refs FROM fc_checkpoints WHERE run_key = ? AND refs IS NOT NULL"
_RUN_REF_COUNTS = "SELECT key, holders FROM fc_item_refs WHERE run_key = ?"
_COUNTS_REFS = "SELECT 1 FROM fc_item_refs WHERE run_key = ? LIMIT 1"
_IMMORTAL = "SELECT count(*) FROM fc_checkpoints WHERE run_key = ? AND expires_at IS NULL"
_HELD = "SELECT count(*), count(*) - count(expires_at) FROM fc_checkpoints WHERE run_key = ?"
# A count taken again for a key that had none (its row lost with damage) records no removal
# the store made: one whose item row is missing is taken for a removal (it reads as absent),
# as schema version 2 did for the counts it found.
_SET_REF = (
    "INSERT INTO fc_item_refs (run_key, key, holders, removed) VALUES (?1, ?2, ?3, NOT EXISTS "
    "(SELECT 1 FROM fc_items WHERE run_key = ?1 AND key = ?2)) "
    "ON CONFLICT (run_key, key) DO UPDATE SET holders = excluded.holders"
)
UPSERT_ITEM = (
    "INSERT INTO fc_items (run_key, key, owner, expires_at, value) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (run_key, key) DO UPDATE SET owner = excluded.owner, "
    "expires_at = excluded.expires_at, value = excluded.value"
)
INSERT_ITEM_IF_ABSENT = (
    "INSERT INTO fc_items (run_key, key, owner, expires_at, value) VALUES (?1, ?2, ?3, ?4, ?5) "
    "ON CONFLICT (run_key, key) DO UPDATE SET owner = excluded.owner, "
    "expires_at = excluded.expires_at, value = excluded.value "
    "WHERE fc_items.expires_at IS NOT NULL AND fc_items.expires_at <= ?6"
)
# Leftovers of an expired run that starts over: unowned items no checkpoint named stay,
# unless nested under a key one named.
_DROP_LEFTOVERS = (
    "DELETE FROM fc_items WHERE run_key = ?1 AND owner IS NULL AND key IN "
    "(SELECT key FROM fc_item_refs WHERE run_key = ?1)",
    "DELETE FROM fc_items WHERE rowid IN (SELECT i.rowid FROM fc_item_refs f CROSS JOIN "
    f"fc_items i ON i.run_key = f.run_key AND {_nested_range('f.key')} WHERE f.run_key = ?1)",
    "DELETE FROM fc_item_refs WHERE run_key = ?1",
    "DELETE FROM fc_checkpoints WHERE run_key = ?1",
    "DELETE FROM fc_labels WHERE run_key = ?1",
    "DELETE FROM fc_runs WHERE run_key = ?1",
)
_DROP_ITEMS = "DELETE FROM fc_items WHERE run_key = ?1"
_DROP_CHECKPOINTS = "DELETE FROM fc_checkpoints WHERE run_key = ?1"
_DROP_RECORD = (
    "DELETE FROM fc_item_refs WHERE run_key = ?1",
    "DELETE FROM fc_labels WHERE run_key = ?1",
    "DELETE FROM fc_runs WHERE run_key = ?1",
)
GET = (
    f"SELECT {_CHECKPOINT_COLUMNS} FROM fc_checkpoints c LEFT JOIN fc_runs r "
    "ON r.run_key = c.run_key WHERE c.run_key = ?1 AND c.sequence = ?2"
)
LATEST = (
    f"SELECT {_CHECKPOINT_COLUMNS} FROM fc_checkpoints c LEFT JOIN fc_runs r "
    "ON r.run_key = c.run_key WHERE c.run_key = ?1 "
    "AND (c.expires_at IS NULL OR c.expires_at > ?2) ORDER BY c.sequence DESC LIMIT 1"
)
RUN_STATUS = "SELECT status, expires_at FROM fc_runs WHERE run_key = ?"
HEADERS = (
    "SELECT sequence, checkpoint_id, created_at, expires_at, header FROM fc_checkpoints "
    "WHERE run_key = ?1 AND sequence < ?2 ORDER BY sequence DESC LIMIT ?3"
)
LIVE_HEADERS = (
    "SELECT sequence, checkpoint_id, created_at, expires_at, header FROM fc_checkpoints "
    "WHERE run_key = ?1 AND sequence < ?2 AND (expires_at IS NULL OR expires_at > ?4) "
    "ORDER BY sequence DESC LIMIT ?3"
)
# One statement, so that "no row" and "checkpoints in place" are seen in one snapshot.
GET_RUN = (
    f"SELECT {RUN_COLUMNS}, r.run_key IS NULL AND EXISTS "
    "(SELECT 1 FROM fc_checkpoints WHERE run_key = ?1) "
    "FROM (SELECT 1) LEFT JOIN fc_runs r ON r.run_key = ?1"
)
RUN = f"SELECT {RUN_COLUMNS} FROM fc_runs r WHERE r.run_key = ?"
# Every run row, its details left out (an empty blob in their place): only by repair.
RUN_SUMMARIES = (
    "SELECT r.run_id, r.incarnation, r.status, r.created_at, r.updated_at, r.latest_sequence, "
    "r.checkpoint_count, r.expires_at, r.version, x'', r.labels, r.run_key FROM fc_runs r"
)
UPDATE_RUN = (
    "UPDATE fc_runs SET status = ?, data = ?, version = ?, updated_at = ? WHERE run_key = ?"
)
LIST_RUNS = (
    f"SELECT {RUN_COLUMNS}, r.run_key FROM fc_runs r WHERE (r.created_at, r.run_key) < (?1, ?2) "
    "AND (r.expires_at IS NULL OR r.expires_at > ?3) "
    "ORDER BY r.created_at DESC, r.run_key DESC LIMIT ?4"
)
LIST_RUNS_BY_STATUS = (
    f"SELECT {RUN_COLUMNS}, r.run_key FROM fc_runs r WHERE r.status = ?5 "
    "AND (r.created_at, r.run_key) < (?1, ?2) AND (r.expires_at IS NULL OR r.expires_at > ?3) "
    "ORDER BY r.created_at DESC, r.run_key DESC LIMIT ?4"
)
RUNS_WITH_LABEL = (
    f"SELECT {RUN_COLUMNS}, r.run_key FROM fc_labels l JOIN fc_runs r "
    "ON r.run_key = l.run_key AND r.created_at = l.created_at WHERE l.label = ?5 "
    "AND (l.created_at, l.run_key) < (?1, ?2) AND (r.expires_at IS NULL OR r.expires_at > ?3) "
    "ORDER BY l.created_at DESC, l.run_key DESC LIMIT ?4"
)
# All runs minus the expired ones not purged yet; only runs due by now can be expired (unary
# + keeps the planner on the ``due`` index).
COUNT_RUNS = (
    "SELECT (SELECT count(*) FROM fc_runs) - "
    "(SELECT count(*) FROM fc_runs WHERE due <= ?1 AND expires_at <= ?1)"
)
COUNT_RUNS_BY_STATUS = (
    "SELECT (SELECT count(*) FROM fc_runs WHERE status = ?2) - "
    "(SELECT count(*) FROM fc_runs WHERE due <= ?1 AND expires_at <= ?1 AND +status = ?2)"
)
OWNED_ITEMS = f"SELECT key, value FROM fc_items WHERE run_key = ? AND owner = ? AND {_LIVE}"
OWNER = (
    "SELECT c.checkpoint_id, c.expires_at, r.expires_at FROM fc_checkpoints c JOIN fc_runs r "
    "ON r.run_key = c.run_key WHERE c.run_key = ? AND c.sequence = ?"
)
DELETE_ITEM = "DELETE FROM fc_items WHERE run_key = ? AND key = ?"
# The store's removal of an item a held checkpoint names, recorded on the key's count (which
# goes when no held checkpoint names the key any more): reads take the item as removed, not
# as a row deleted behind the store's back. The owner trigger records the removal of owned
# items the same way.
RECORD_REMOVAL = "UPDATE fc_item_refs SET removed = 1 WHERE run_key = ? AND key = ?"
DUE_RUNS = (
    "SELECT run_key, expires_at, checkpoint_count, immortal FROM fc_runs WHERE due <= ? "
    "ORDER BY due LIMIT ?"
)
# Items a held checkpoint names are kept: referenced items live by their references.
_UNREFERENCED_EXPIRED = (
    "FROM fc_items i WHERE i.expires_at <= ?1 AND NOT EXISTS "
    "(SELECT 1 FROM fc_item_refs f WHERE f.run_key = i.run_key AND f.key = i.key)"
)
EXPIRED_ITEMS = f"SELECT i.rowid {_UNREFERENCED_EXPIRED} LIMIT ?2"
DELETE_ITEM_ROW = "DELETE FROM fc_items WHERE rowid = ?"
ANYTHING_DUE = (
    "SELECT EXISTS (SELECT 1 FROM fc_runs WHERE due <= ?1) "
    f"OR EXISTS (SELECT 1 {_UNREFERENCED_EXPIRED})"
)
HAS_RUN = "SELECT 1 FROM fc_runs WHERE run_key = ?"
DELETE_RUN_ROW = "DELETE FROM fc_runs WHERE run_key = ?"
CLEAR_DUE = "UPDATE fc_runs SET due = NULL WHERE run_key = ?"
_NEXT_LOGGED_RUN = (
    "SELECT run_key FROM fc_checkpoints WHERE run_key > ? ORDER BY run_key LIMIT 1"
)
LOG_SUMMARY = (
    "SELECT count(*), min(sequence), count(*) - count(expires_at), max(expires_at), "
    "min(expires_at) FROM fc_checkpoints WHERE run_key = ?"
)
NEWEST_ID = (
    "SELECT sequence, checkpoint_id, expires_at FROM fc_checkpoints WHERE run_key = ? "
    "ORDER BY sequence DESC LIMIT 1"
)
# Read lazily, newest first, until a checkpoint whose id is the run's own (the first one,
# unless one of another run was swapped in): only by repair.
NEWEST_FIRST = (
    "SELECT sequence, checkpoint_id, created_at, expires_at, header FROM fc_checkpoints "
    "WHERE run_key = ? ORDER BY sequence DESC"
)
CREATED_AT = "SELECT created_at FROM fc_checkpoints WHERE run_key = ? AND sequence = ?"
COUNT_CHECKPOINTS = "SELECT count(*) FROM fc_checkpoints WHERE run_key = ?"
DELETE_LABELS = "DELETE FROM fc_labels WHERE run_key = ?"
LABELS = "SELECT label FROM fc_labels WHERE run_key = ? ORDER BY position"


@functools.lru_cache(maxsize=64)
def _items_in(size: int, columns: str = "key, value") -> str:
    marks = ", ".join("?" * size)
    return f"SELECT {columns} FROM fc_items WHERE run_key = ? AND {_LIVE} AND key IN ({marks})"


@functools.lru_cache(maxsize=16)
def _counts_in(size: int, holders: str) -> str:
    """The keys among ``size`` keys whose reference count meets ``holders``."""
    marks = ", ".join("?" * size)
    return (f"SELECT key FROM fc_item_refs WHERE run_key = ? AND holders {holders} "
            f"AND key IN ({marks})")


@functools.lru_cache(maxsize=16)
def _unrecorded_in(size: int) -> str:
    """The keys among ``size`` keys that a held checkpoint names, whose item row is missing
    although the store recorded no removal of it (a ``removed`` other than 1, written with
    the checks off, records none)."""
    marks = ", ".join("?" * size)
    return (f"SELECT f.key FROM fc_item_refs f WHERE f.run_key = ?1 AND f.key IN ({marks}) "
            "AND f.removed IS NOT 1 AND NOT EXISTS "
            "(SELECT 1 FROM fc_items i WHERE i.run_key = ?1 AND i.key = f.key)")


@functools.lru_cache(maxsize=16)
def _refs_in(size: int) -> str:
    """The items ``size`` keys name and the loose items nested under them (another
    checkpoint's owned items are its own): one probe and one range of the item key index per
    key (``?3``...; ``NULL`` pads, matching nothing)."""
    keys = ", ".join(f"(?{number})" for number in range(3, size + 3))
    live = "(i.expires_at IS NULL OR i.expires_at > ?2)"
    return (
        f"WITH r (key) AS (VALUES {keys}) "
        "SELECT i.key, i.value FROM r CROSS JOIN fc_items i ON i.run_key = ?1 "
        f"AND i.key = r.key WHERE {live} UNION ALL "
        "SELECT i.key, i.value FROM r CROSS JOIN fc_items i ON i.run_key = ?1 "
        f"AND {_nested_range('r.key')} WHERE {live} AND i.owner IS NULL"
    )


@functools.lru_cache(maxsize=64)
def scan_statement(bounds: tuple[bool, bool, bool], reverse: bool) -> str:
    """A scan with a lower prefix bound, an upper prefix bound and a ``start_after`` bound."""
    low, high, after = bounds
    terms = ["run_key = ?", _LIVE]
    terms += ["key >= ?"] if low else []
    terms += ["key < ?"] if high else []
    terms += (["key < ?"] if reverse else ["key > ?"]) if after else []
    order = "DESC" if reverse else "ASC"
    where = " AND ".join(terms)
    return f"SELECT key, value FROM fc_items WHERE {where} ORDER BY key {order} LIMIT ?"


# -- values -----------------------------------------------------------------------------------


class Head(NamedTuple):
    """What an append needs of the run row."""

    incarnation: str
    status: str
    latest_sequence: int
    held: int
    immortal: int
    """Held checkpoints that never expire."""
    expires_at: float | None
    due: float | None
    """The earliest expiry among held checkpoints (``EMPTY_RUN`` when none is held)."""
    run_id: str
    new: bool = False


class Removed(NamedTuple):
    """What a removal of checkpoints took away."""

    checkpoints: int = 0
    immortal: int = 0

    @property
    def mortal(self) -> bool:
        """Whether a checkpoint that expires was among them."""
        return self.checkpoints > self.immortal


logger = logging.getLogger("fastcheckpoint")

_ESCAPED = re.compile(r"\\(.)", re.DOTALL)


def join(values: Sequence[str]) -> str | None:
    """Strings as one text column: newline-separated, ``\\`` and newline escaped.

    Every text decodes (there is no invalid form), so a row edited by hand can hold wrong
    labels but never an undecodable record."""
    if not values:
        return None
    return "\n".join(value.replace("\\", "\\\\").replace("\n", "\\n") for value in values)


NO_REFS = "\\"
"""The ``refs`` of a checkpoint that names no items: a lone backslash, which :func:`join`
never writes (it escapes every backslash). ``NULL`` refs are what schema version 1 stores of
an earlier release wrote for such a checkpoint, and what refs overwritten with ``NULL`` look
like: what the checkpoint named is unknown (see :func:`remove`)."""


def join_refs(refs: Sequence[str]) -> str:
    text = join(refs)
    return NO_REFS if text is None else text  # never '' for none: that is the key ''


def split_refs(text: str | None) -> tuple[str, ...]:
    return () if text == NO_REFS else split(text)


def split(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    return tuple(
        _ESCAPED.sub(_unescape, part) if "\\" in part else part for part in text.split("\n")
    )


def _unescape(match: re.Match[str]) -> str:
    return "\n" if match[1] == "n" else match[1]


_OPTIONAL_REAL = (float, type(None))
_OPTIONAL_TEXT = (str, type(None))
RUN_TYPES = (
    ("run_id", str), ("incarnation", str), ("status", str), ("created_at", float),
    ("updated_at", float), ("latest_sequence", int), ("checkpoint_count", int),
    ("expires_at", _OPTIONAL_REAL), ("version", int), ("data", bytes), ("labels", _OPTIONAL_TEXT),
)
"""The Python types of the columns of :data:`RUN_COLUMNS`, in order."""
HEAD_TYPES = (
    ("incarnation", str), ("status", str), ("latest_sequence", int), ("checkpoint_count", int),
    ("immortal", int), ("expires_at", _OPTIONAL_REAL), ("due", _OPTIONAL_REAL),
    ("run_id", str),
)
"""Those of :data:`HEAD`."""
CHECKPOINT_TYPES = (
    ("sequence", int), ("checkpoint_id", str), ("created_at", float),
    ("expires_at", _OPTIONAL_REAL), ("refs", _OPTIONAL_TEXT), ("header", bytes),
    ("payload", bytes),
)
"""Those of a checkpoint row as :data:`GET` and :data:`LATEST` select it (the run's columns
follow); the headers of a listing are its first five, and ``header``."""
HEADER_TYPES = (*CHECKPOINT_TYPES[:4], ("header", bytes))
"""Those of :data:`HEADERS` and :data:`LIVE_HEADERS`."""
JOINED_RUN_TYPES = (("status", _OPTIONAL_TEXT), ("expires_at", _OPTIONAL_REAL))
"""Those of the run's columns of :data:`GET` and :data:`LATEST`, and of :data:`RUN_STATUS`."""
NEWEST_TYPES = (("sequence", int), ("checkpoint_id", str), ("expires_at", _OPTIONAL_REAL))
"""Those of :data:`NEWEST_ID`, and of :data:`NEWEST_FIRST` with its ``created_at`` left out."""
DUE_TYPES = (("run_key", str), ("expires_at", _OPTIONAL_REAL), ("checkpoint_count", int),
             ("immortal", int))
"""Those of :data:`DUE_RUNS`."""
OWNER_TYPES = (("checkpoint_id", str), ("expires_at", _OPTIONAL_REAL),
               ("run expires_at", _OPTIONAL_REAL))
"""Those of :data:`OWNER`."""


def wrong_type(row: Sequence[Any], types: Sequence[tuple[str, Any]]) -> str | None:
    """What a column of ``row`` holds that its type in ``types`` is not, or ``None``. Every
    column is typed by a ``CHECK``: only a row written with the checks off (``PRAGMA
    ignore_check_constraints``) fails this; the store then takes it for damage, never
    failing with ``TypeError`` somewhere later."""
    for value, (name, kind) in zip(row, types, strict=False):  # other columns may follow
        if not isinstance(value, kind):
            return f"its column {name} holds {type(value).__name__} {value!r:.40}"
    return None


def run_of(row: Sequence[Any]) -> RunRecord:
    """The record of a row selected with :data:`RUN_COLUMNS`; call :func:`wrong_type` with
    :data:`RUN_TYPES` first."""
    return RunRecord(
        run_id=row[0], incarnation=row[1], status=row[2], created_at=row[3], updated_at=row[4],
        latest_sequence=row[5], checkpoint_count=row[6], expires_at=row[7], version=row[8],
        data=row[9], labels=split(row[10]),
    )


def earliest(first: float | None, second: float | None) -> float | None:
    """The earlier of two expiries, where ``None`` (never) loses."""
    if first is None:
        return second
    if second is None:
        return first
    return min(first, second)


def _chunks(keys: Sequence[str]) -> Iterator[tuple[list[str], int]]:
    """``keys`` in chunks of at most 500, each with the size of :data:`_IN_SIZES` it fits."""
    for start in range(0, len(keys), _IN_SIZES[-1]):
        chunk = list(keys[start:start + _IN_SIZES[-1]])
        yield chunk, next(size for size in _IN_SIZES if size >= len(chunk))


def _padded(keys: Sequence[str]) -> Iterator[list[str]]:
    """``keys`` in chunks of at most 500, each padded (repeating its last key) to a size of
    :data:`_IN_SIZES`."""
    for chunk, size in _chunks(keys):
        yield chunk + [chunk[-1]] * (size - len(chunk))


# -- reads ------------------------------------------------------------------------------------


def read_items(
    db: sqlite3.Connection, run_key: str, keys: Sequence[str], now: float
) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for chunk in _padded(keys):
        found.update(db.execute(_items_in(len(chunk)), (run_key, now, *chunk)).fetchall())
    return found


def read_refs(
    db: sqlite3.Connection, run_key: str, keys: Sequence[str], now: float
) -> list[tuple[str, bytes]]:
    """The live items ``keys`` name and the live items nested under them
    (:class:`~fastcheckpoint.stores.SupportsNestedItems`), one statement per 500 keys."""
    found: list[tuple[str, bytes]] = []
    for chunk, size in _chunks(keys):
        padding = [None] * (size - len(chunk))
        found += db.execute(_refs_in(size), (run_key, now, *chunk, *padding)).fetchall()
    return found


def deleted_behind(
    db: sqlite3.Connection, run_key: str, keys: Sequence[str]
) -> list[str]:
    """The ``keys`` (distinct, named by a checkpoint, found with no live item) whose item row
    is gone without a removal the store recorded: deleted behind its back, in their order.
    Asked only when a read misses an item a checkpoint names, so an intact read costs
    nothing; a key whose item row is there (expired) or that has no count is not one."""
    gone: set[str] = set()
    for chunk in _padded(keys):
        gone.update(key for key, in db.execute(_unrecorded_in(len(chunk)), (run_key, *chunk)))
    return [key for key in dict.fromkeys(keys) if key in gone]


def first_live_item(
    db: sqlite3.Connection, run_key: str, keys: Sequence[str], now: float
) -> str | None:
    for chunk in _padded(keys):
        row = db.execute(_items_in(len(chunk)), (run_key, now, *chunk)).fetchone()
        if row is not None:
            return str(row[0])
    return None


def unheld(
    db: sqlite3.Connection, run_key: str, keys: Sequence[str], now: float
) -> list[str]:
    """The ``keys`` (distinct) that name no live item of the run, in their order; reads keys
    only, never values."""
    held: set[str] = set()
    for chunk in _padded(keys):
        rows = db.execute(_items_in(len(chunk), "key"), (run_key, now, *chunk))
        held.update(key for key, in rows)
    return [key for key in keys if key not in held]


def logged_runs(db: sqlite3.Connection) -> list[str]:
    """Every run key of the checkpoint table, one index probe each (a skip scan)."""
    keys: list[str] = []
    row = db.execute(_NEXT_LOGGED_RUN, ("",)).fetchone()
    while row is not None:
        keys.append(row[0])
        row = db.execute(_NEXT_LOGGED_RUN, (row[0],)).fetchone()
    return keys


# -- write steps ------------------------------------------------------------------------------


def insert_run(db: sqlite3.Connection, run_key: str, run: RunRecord, immortal: int,
               due: float | None) -> None:
    db.execute(_INSERT_RUN, (
        run_key, run.run_id, run.incarnation, run.status, run.created_at, run.updated_at,
        run.latest_sequence, run.checkpoint_count, immortal, run.expires_at, due, run.version,
        join(run.labels), bytes(run.data),
    ))
    db.executemany(_INSERT_LABEL, [
        (run_key, label, run.created_at, position) for position, label in enumerate(run.labels)
    ])


def insert_first(
    db: sqlite3.Connection, run_key: str, seed: RunRecord, record: StoredCheckpoint, *,
    held: int, immortal: int, expires_at: float | None, due: float | None, now: float,
) -> None:
    """The row of a run created by its first checkpoint: the seed, with the log's counters."""
    run = msgspec.structs.replace(
        seed, latest_sequence=record.sequence, checkpoint_count=held, updated_at=now,
        expires_at=expires_at,
    )
    insert_run(db, run_key, run, immortal, due)


def drop_leftovers(db: sqlite3.Connection, run_key: str) -> None:
    for statement in _DROP_LEFTOVERS:
        db.execute(statement, (run_key,))


def drop_run(db: sqlite3.Connection, run_key: str) -> int:
    """Remove everything of the run; returns how many checkpoints it held."""
    db.execute(_DROP_ITEMS, (run_key,))
    removed = db.execute(_DROP_CHECKPOINTS, (run_key,)).rowcount
    for statement in _DROP_RECORD:
        db.execute(statement, (run_key,))
    return int(removed)


def add_refs(db: sqlite3.Connection, run_key: str, refs: Iterable[str]) -> None:
    keys = dict.fromkeys(refs)
    if keys:
        db.executemany(_ADD_REF, [(run_key, key) for key in keys])


def _drop_refs(
    db: sqlite3.Connection, run_key: str, encoded: Iterable[str], kept: Collection[str] = ()
) -> None:
    """Count down the references of removed checkpoints; remove items no checkpoint names,
    with the items nested under them. ``kept``: keys a checkpoint the run holds is known to
    name (the one an append just wrote, which its pruning never removes).

    A removed checkpoint's ``refs`` that the counts contradict (a key with no count, a count
    going below zero, text that was not UTF-8) were damaged after they were counted: what
    they named then is unknown, so the run's counts are taken again from the refs of the
    checkpoints it still holds (:func:`_recount`) instead of trusting them. So are counts
    that fall to zero for a key of ``kept``: lowered or deleted by hand, they would free an
    item the checkpoint just acknowledged names."""
    texts = list(encoded)
    counts = collections.Counter(
        key for text in texts for key in dict.fromkeys(split_refs(text)))
    counted = db.executemany(
        _DROP_REF, [(count, run_key, key) for key, count in counts.items()]).rowcount
    keys = [(run_key, key) for key in counts]
    below_zero = db.executemany(_CLAMP_REF, keys).rowcount
    if counted != len(counts) or below_zero or any("\ufffd" in text for text in texts):
        _recount(db, run_key, damaged=True)
        return
    down = _counted(db, run_key, list(counts), "<= 0")
    if not set(kept).isdisjoint(down):
        _recount(db, run_key, damaged=True)
        return
    _free_unnamed(db, run_key, list(counts), down)


def _free_unnamed(
    db: sqlite3.Connection, run_key: str, keys: Sequence[str], down: Sequence[str] | None = None
) -> None:
    """Remove the items of ``keys`` whose count is down to zero, with what is nested under
    them, and those counts; but not what a held checkpoint still names or is nested under a
    key one names, nor owned items (they go with their owner). Per key whose count is down:
    a probe of the keys it is nested under, one range of the counts under it, and a range
    delete per gap between the keys still named there, never a statement per item. ``down``:
    those of ``keys`` whose count is down to zero, if known already."""
    for key in _counted(db, run_key, keys, "<= 0") if down is None else down:
        if _counted(db, run_key, _enclosing(key), "> 0"):
            continue  # nested under a key still named: it stays, with what is nested under it
        db.execute(_DELETE_LOOSE, (run_key, key))
        named = [name for name, in db.execute(_NAMED_UNDER, (run_key, key))]
        prefix = nested_prefix(key)
        for low, high in _gaps(prefix, key_successor(prefix), named):
            db.execute(_DELETE_LOOSE_RANGE, (run_key, low, high))
    db.executemany(_DELETE_ZERO_REF, [(run_key, key) for key in keys])


def _counted(
    db: sqlite3.Connection, run_key: str, keys: Sequence[str], holders: str
) -> list[str]:
    """The ``keys`` (distinct) whose reference count meets ``holders``, in their order."""
    found: set[str] = set()
    for chunk in _padded(keys):
        found.update(key for key, in db.execute(_counts_in(len(chunk), holders),
                                                (run_key, *chunk)))
    return [key for key in dict.fromkeys(keys) if key in found]


def _enclosing(key: str) -> list[str]:
    """The keys ``key`` is nested under: its prefixes ending before a ``/``."""
    cuts = [at for at, character in enumerate(key) if character == _NESTING]
    return [key[:at] for at in cuts]


def _gaps(low: str, high: str, named: Sequence[str]) -> Iterator[tuple[str, str]]:
    """The ranges ``[a, b)`` of ``[low, high)`` that hold neither a key of ``named`` nor a
    key nested under one (``key + "\\0"`` is the least key after ``key``)."""
    taken = sorted([(key, key + "\0") for key in named]
                   + [(nested_prefix(key), key_successor(nested_prefix(key))) for key in named])
    for start, end in taken:
        if low < start:
            yield low, start
        low = max(low, end)
    if low < high:
        yield low, high


def _recount(db: sqlite3.Connection, run_key: str, *, damaged: bool) -> None:
    """Set the run's reference counts to what the checkpoints it holds name, and remove the
    items no held checkpoint names any more. Reads the refs of every checkpoint of the run
    (O(n)): only after damage was found, or may have been (``damaged``: it was; else it is
    logged only if the counts were wrong). A key still named keeps its item, whatever the
    counts said; a count that only damaged refs held goes, with its item."""
    named = collections.Counter(
        key for text, in db.execute(_RUN_REFS, (run_key,)) if isinstance(text, str)
        for key in dict.fromkeys(split_refs(text)))
    counted = _text_keyed(db, run_key, db.execute(_RUN_REF_COUNTS, (run_key,)).fetchall())
    unnamed = [key for key in counted if key not in named]
    wrong = [(run_key, key, holders) for key, holders in named.items()
             if counted.get(key) != holders]
    if damaged or wrong or unnamed:
        logger.warning(
            "the refs of a checkpoint removed from run key %s contradict the run's reference "
            "counts (damaged after they were written); counts taken again from the %d key(s) "
            "its checkpoints name", run_key, len(named))
    db.executemany(_SET_REF, [*wrong, *((run_key, key, 0) for key in unnamed)])
    _free_unnamed(db, run_key, unnamed)


def _text_keyed(
    db: sqlite3.Connection, run_key: str, counts: Iterable[tuple[Any, int]]
) -> dict[str, int]:
    """The reference counts whose key is text; the others are removed: written by hand (the
    table does not check the key's type), they name no item, and what is nested under a key
    cannot be found for them."""
    found = dict(counts)
    untyped = [key for key in found if not isinstance(key, str)]
    if untyped:
        logger.warning("run key %s counts references of %d key(s) that are not text (written "
                       "by hand); those counts are removed: %r", run_key, len(untyped),
                       untyped[:3])
        db.executemany(_DELETE_REF, [(run_key, key) for key in untyped])
    return {key: holders for key, holders in found.items() if isinstance(key, str)}


def put_appended_items(
    db: sqlite3.Connection, run_key: str, record: StoredCheckpoint, items: Sequence[Item],
    now: float,
) -> None:
    """Items written with their checkpoint, each only where no live item is: owned ones
    expire with it, shared ones have no expiry of their own (whatever the caller gave: the
    checkpoints naming them decide their life)."""
    if not items:
        return
    db.executemany(INSERT_ITEM_IF_ABSENT, [
        (run_key, item.key, item.owner, None if item.owner is None else record.expires_at,
         item.value, now)
        for item in items
    ])


def remove(
    db: sqlite3.Connection, run_key: str, rows: Sequence[Sequence[Any]], *, oldest: bool = False,
    kept: Collection[str] = (),
) -> Removed:
    """Remove checkpoints ``(sequence, expires_at, refs)`` with their owned items and
    references; ``oldest``: they are the run's oldest, in order (one range delete); ``kept``:
    keys a checkpoint the run keeps names (see :func:`_drop_refs`)."""
    if not rows:
        return Removed()
    if oldest:
        db.execute(_DELETE_UP_TO, (run_key, rows[-1][0]))
    else:
        db.executemany(_DELETE_CHECKPOINT, [(run_key, row[0]) for row in rows])
    # Refs that are not text can only be written with the schema's checks off: as unknown
    # as NULL ones.
    unknown = any(not isinstance(row[2], str) for row in rows)
    encoded = [row[2] for row in rows if isinstance(row[2], str) and row[2] != NO_REFS]
    if unknown and db.execute(_COUNTS_REFS, (run_key,)).fetchone():
        # NULL refs in a run that counts some: written by an earlier release for a checkpoint
        # that names none, or overwritten with NULL; what it named is unknown (its counts
        # would never go). A checkpoint written as naming none (NO_REFS) costs nothing here.
        _recount(db, run_key, damaged=False)
    elif encoded:
        _drop_refs(db, run_key, encoded, kept)
    return Removed(len(rows), sum(1 for row in rows if row[1] is None))


def immortal_left(db: sqlite3.Connection, run_key: str, immortal: int) -> int:
    """The run's count of never-expiring checkpoints, ``immortal`` as the run row and the
    removed rows make it; counted again when it goes below zero (a removed checkpoint's
    ``expires_at`` was overwritten with NULL: it was counted as expiring)."""
    if immortal >= 0:
        return immortal
    logger.warning("a checkpoint removed from run key %s had lost its expiry (damaged after "
                   "it was written); its never-expiring checkpoints are counted again", run_key)
    return int(db.execute(_IMMORTAL, (run_key,)).fetchone()[0])


def prune(
    db: sqlite3.Connection, run_key: str, *, held: int, due: float | None,
    keep_latest: int | None, now: float, kept: Collection[str] = (),
) -> Removed:
    """Remove the run's expired checkpoints, then the oldest beyond ``keep_latest``, never one
    of the ``keep_latest`` newest the run holds (the one just written included): ``held``, the
    run row's count, may be too high (raised by hand, or the row put back from an older copy,
    also from before a delete), and is then found too high (fewer checkpoints to prune than it
    says). ``kept``: the keys the checkpoint just written names."""
    removed = Removed()
    if due is not None and due <= now:
        removed = remove(db, run_key, db.execute(
            _EXPIRED_CHECKPOINTS, (run_key, now, INT64)).fetchall(), kept=kept)
    excess = 0 if keep_latest is None else held - removed.checkpoints - keep_latest
    if keep_latest is None or excess <= 0:
        return removed
    oldest = remove(db, run_key, db.execute(
        _PRUNABLE_CHECKPOINTS, (run_key, keep_latest - 1, excess)).fetchall(), oldest=True,
        kept=kept)
    return Removed(removed.checkpoints + oldest.checkpoints, removed.immortal + oldest.immortal)


def held_again(db: sqlite3.Connection, run_key: str) -> tuple[int, int]:
    """``(checkpoints, never-expiring checkpoints)`` the run holds, counted (``O(n)``): only
    after pruning found its row counting more than it holds."""
    logger.warning("the run row of run key %s counts more checkpoints than it holds (raised "
                   "by hand, or put back from an older copy); they are counted again", run_key)
    held, immortal = db.execute(_HELD, (run_key,)).fetchone()
    return int(held), int(immortal)


def holdings(
    db: sqlite3.Connection, run_key: str, immortal: int
) -> tuple[float | None, float | None]:
    """``(expires_at, due)`` of a run from the checkpoints it holds; ``EMPTY_RUN`` for both
    once it holds none."""
    latest, first = db.execute(_EXPIRY_RANGE, (run_key,)).fetchone()
    if not isinstance(latest, (float, type(None))) or not isinstance(first, (float, type(None))):
        logger.warning("a checkpoint of run key %s holds an expiry of another type (written "
                       "with the checks off); the run's expiry is taken from the others",
                       run_key)
        latest, first = db.execute(_REAL_EXPIRY_RANGE, (run_key,)).fetchone()
    if immortal > 0:
        return None, first
    if latest is None:
        return EMPTY_RUN, EMPTY_RUN
    return latest, first


def purge_run(db: sqlite3.Connection, run_key: str, held: int, budget: int) -> int:
    """Remove up to ``budget`` checkpoints of an expired run, and the run once none is left."""
    rows = db.execute(_OLDEST_CHECKPOINTS, (run_key, budget + 1)).fetchall()
    if len(rows) <= budget:
        return drop_run(db, run_key)
    remove(db, run_key, rows[:budget], oldest=True)
    db.execute("UPDATE fc_runs SET checkpoint_count = ? WHERE run_key = ?",
               (max(held - budget, 0), run_key))
    return budget


def purge_checkpoints(
    db: sqlite3.Connection, run_key: str, *, held: int, immortal: int, now: float, budget: int
) -> int:
    """Remove up to ``budget`` expired checkpoints of a live run."""
    removed = remove(db, run_key, db.execute(
        _EXPIRED_CHECKPOINTS, (run_key, now, budget)).fetchall())
    expires_at, due = holdings(db, run_key, immortal)
    db.execute(UPDATE_HOLDINGS,
               (max(held - removed.checkpoints, 0), immortal, expires_at, due, run_key))
    return removed.checkpoints
