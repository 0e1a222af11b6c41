"""Key layout, run bookkeeping and table definition of the DynamoDB store: no I/O here.

One partition per run (``PK = run#<run key>``); sort keys order the partition as::

    a                            the pin record: the write token of the run's first append
                                 whose pins (writes before its transaction) are the last
    c#<item key>                 reference count of a shared item
    i#<item key>                 items (code point order = UTF-8 byte order, as DynamoDB sorts);
                                 an item owned by a checkpoint is an anchor here (its owner)
    k#<sequence:020>!            the guard of checkpoint <sequence>'s owned items
    k#<sequence:020>#<item key>  the value of an item owned by checkpoint <sequence>
    k#<sequence:020>$            checkpoint <sequence>
    r                            the run item, right above the newest checkpoint

so one descending ``Query`` from ``r`` returns the run item, the newest checkpoint and then
the items it owns. Labels are entries in partitions of their own (``PK = label#<label>``,
sorted by the run's creation), written in the transaction that creates the run.
Checkpoints, items and run items that expire also carry ``xpk``/``xat``, which put them in
the ``by_expiry`` index the cleanup loop reads (a run item at its expiry, at 0 once it holds
nothing; a reference count at 0 once it may have dropped to zero).

On services that ignore ``ClientRequestToken`` (emulators), every append also writes a memo
of itself in a partition of its own (``PK = memo#<write token>``, ``SK = run#<run key>``): a
resend of the append's transaction after its reply was lost is refused by the memo, which
tells that the first send landed, whatever was removed meanwhile. A memo is in the
``by_expiry`` index (``xpk``/``xat``, due ``MEMO_SECONDS`` after the append), which is how the
cleanup loop removes it; native TTL removes it too where it runs. No listing sees memos.
"""

from __future__ import annotations

import math
import struct
import zlib
from bisect import bisect_right, insort
from collections.abc import Sequence
from typing import Any, Final

import msgspec

from fastcheckpoint.stores._base import EMPTY_RUN, MAX_ITEM_KEY_BYTES

__all__ = [
    "BY_CREATED",
    "BY_EXPIRY",
    "BY_STATUS",
    "CONDEMNED_SECONDS",
    "FRONT_CAPACITY",
    "INDEX_SHARDS",
    "MAX_ITEM_KEY_BYTES",
    "MEMO_PREFIX",
    "MEMO_SECONDS",
    "OWNERS_CAPACITY",
    "REFILL",
    "TABLE_DEFINITION",
    "Back",
    "Book",
    "blob_key",
    "blob_sequence",
    "blob_suffix",
    "checkpoint_sk",
    "counter_sk",
    "created_stamp",
    "family_prefix",
    "guard_sk",
    "is_checkpoint_sk",
    "is_guard_sk",
    "is_owned_sk",
    "item_blob_key",
    "item_blob_sort_key",
    "item_sk",
    "label_partition",
    "memo_partition",
    "owned_key",
    "owned_sk",
    "partition",
    "sequence_of",
    "shard_of",
    "ttl_of",
]

RUN_SK: Final = "r"
PIN_SK: Final = "a"
"""The pin record: which first append of the run (its write token) pinned last. Below every
family, so no range read of checkpoints, items or counts meets it."""
CHECKPOINT_PREFIX: Final = "k#"
ITEM_PREFIX: Final = "i#"
COUNTER_PREFIX: Final = "c#"
# One past every key of a family ('#' + 1 == '$'): exclusive upper bounds of range queries.
CHECKPOINT_END: Final = "k$"
ITEM_END: Final = "i$"

# What follows the sequence in a sort key of the ``k#`` family: the guard and the owned
# values of a checkpoint sort below it, so a descending Query meets the checkpoint first.
GUARD_MARK: Final = "!"
OWNED_MARK: Final = "#"
CHECKPOINT_MARK: Final = "$"

SEQUENCE_DIGITS: Final = 20
MAX_SEQUENCE: Final = 10**SEQUENCE_DIGITS - 1
_FAMILY_LENGTH: Final = len(CHECKPOINT_PREFIX) + SEQUENCE_DIGITS

CONDEMNED_SECONDS: Final = 86400.0
"""How long the count of a shared item the cleanup loop removed stays, marked: meanwhile an
append naming the item without writing it is refused (its writer read that the item exists
before the removal), rather than acknowledged without it."""

INDEX_SHARDS: Final = 8
"""Shards of each run index. Every client of a table must use the same number."""

BY_STATUS: Final = "by_status"
BY_CREATED: Final = "by_created"
BY_EXPIRY: Final = "by_expiry"

# Attributes the run indexes copy, so a listing page is built from the index alone.
RUN_PROJECTION: Final = [
    "rid", "inc", "st", "ca", "ua", "ls", "cnt", "exp", "ver", "dat", "pg", "lb"
]

TABLE_DEFINITION: Final[dict[str, Any]] = {
    "AttributeDefinitions": [
        {"AttributeName": "PK", "AttributeType": "S"},
        {"AttributeName": "SK", "AttributeType": "S"},
        {"AttributeName": "gst", "AttributeType": "S"},
        {"AttributeName": "gall", "AttributeType": "S"},
        {"AttributeName": "gord", "AttributeType": "S"},
        {"AttributeName": "xpk", "AttributeType": "S"},
        {"AttributeName": "xat", "AttributeType": "N"},
    ],
    "KeySchema": [
        {"AttributeName": "PK", "KeyType": "HASH"},
        {"AttributeName": "SK", "KeyType": "RANGE"},
    ],
    "BillingMode": "PAY_PER_REQUEST",
    "GlobalSecondaryIndexes": [
        {
            "IndexName": BY_STATUS,
            "KeySchema": [
                {"AttributeName": "gst", "KeyType": "HASH"},
                {"AttributeName": "gord", "KeyType": "RANGE"},
            ],
            "Projection": {"ProjectionType": "INCLUDE", "NonKeyAttributes": RUN_PROJECTION},
        },
        {
            "IndexName": BY_CREATED,
            "KeySchema": [
                {"AttributeName": "gall", "KeyType": "HASH"},
                {"AttributeName": "gord", "KeyType": "RANGE"},
            ],
            "Projection": {"ProjectionType": "INCLUDE", "NonKeyAttributes": RUN_PROJECTION},
        },
        {
            "IndexName": BY_EXPIRY,
            "KeySchema": [
                {"AttributeName": "xpk", "KeyType": "HASH"},
                {"AttributeName": "xat", "KeyType": "RANGE"},
            ],
            "Projection": {"ProjectionType": "KEYS_ONLY"},
        },
    ],
}
"""``CreateTable`` parameters without ``TableName``; ``stores/dynamodb/table.json`` is this."""

TTL_ATTRIBUTE: Final = "ttl"

_BASE32 = "abcdefghijklmnopqrstuvwxyz234567"


def partition(run_key: str) -> str:
    return f"run#{run_key}"


def family_prefix(sequence: int) -> str:
    """The prefix of every sort key of checkpoint ``sequence``: itself, its guard and its
    owned values."""
    return f"{CHECKPOINT_PREFIX}{sequence:0{SEQUENCE_DIGITS}d}"


def checkpoint_sk(sequence: int) -> str:
    return family_prefix(sequence) + CHECKPOINT_MARK


def guard_sk(sequence: int) -> str:
    return family_prefix(sequence) + GUARD_MARK


def owned_sk(owner: int, key: str) -> str:
    return family_prefix(owner) + OWNED_MARK + key


def sequence_of(sort_key: str) -> int:
    """The sequence in a sort key of the ``k#`` family."""
    return int(sort_key[2 : 2 + SEQUENCE_DIGITS])


def is_checkpoint_sk(sort_key: str) -> bool:
    return len(sort_key) == _FAMILY_LENGTH + 1 and sort_key.endswith(CHECKPOINT_MARK) and (
        sort_key.startswith(CHECKPOINT_PREFIX))


def is_owned_sk(sort_key: str) -> bool:
    return sort_key.startswith(CHECKPOINT_PREFIX) and sort_key[_FAMILY_LENGTH:][:1] == OWNED_MARK


def is_guard_sk(sort_key: str) -> bool:
    return sort_key.startswith(CHECKPOINT_PREFIX) and sort_key[_FAMILY_LENGTH:] == GUARD_MARK


def owned_key(sort_key: str) -> str:
    """The item key in an owned value's sort key."""
    return sort_key[_FAMILY_LENGTH + 1 :]


def item_sk(key: str) -> str:
    return f"{ITEM_PREFIX}{key}"


def counter_sk(key: str) -> str:
    return f"{COUNTER_PREFIX}{key}"


def label_partition(label: str) -> str:
    return f"label#{label}"


MEMO_SECONDS: Final = 300.0
"""How long an append's memo lives: the cleanup loop removes it once this is past (on the
store's clock), native TTL some time after (wall clock), whichever comes first."""

MEMO_PREFIX: Final = "memo#"


def memo_partition(token: str) -> str:
    """The partition of the memo of the append that wrote ``token``."""
    return f"{MEMO_PREFIX}{token}"


def shard_of(run_key: str) -> int:
    """The index shard of a run: spread by the run key, which is already a hash."""
    if run_key and run_key[0] in _BASE32:
        return _BASE32.index(run_key[0]) % INDEX_SHARDS
    return zlib.crc32(run_key.encode()) % INDEX_SHARDS


def created_stamp(created_at: float, run_key: str) -> str:
    """A string that sorts like ``(created_at, run_key)``: the float's bits, order-preserving."""
    (bits,) = struct.unpack(">Q", struct.pack(">d", created_at))
    bits = bits ^ 0xFFFFFFFFFFFFFFFF if bits >> 63 else bits | (1 << 63)
    return f"{bits:016x}#{run_key}"


def ttl_of(expires_at: float) -> int:
    """DynamoDB's TTL attribute: whole epoch seconds, never before the exact expiry."""
    return max(0, math.ceil(expires_at))


class Back(msgspec.Struct, array_like=True):
    """The held checkpoints at and above ``start``: counted, not detailed (their items are)."""

    start: int
    count: int = 0
    immortal: int = 0
    """Of them, how many never expire."""
    latest: float | None = None
    """The latest expiry among them (and among those the front took in from here): exact
    except after one holding it was removed early, when the store reads the back again."""


class Book(msgspec.Struct, array_like=True):
    """What the run item knows about the checkpoints it holds, so an append reads nothing.

    The *front* details the oldest held checkpoints exactly: ranges of held sequences, the
    expiries of those that expire, the blob suffixes of large ones; pruning and expiry take
    them from there. Once the front details ``capacity`` entries, newer checkpoints go to the
    *back*, which only counts them: their own items carry their expiry and blob key, and the
    front takes them in, oldest first, with one ``Query`` when it runs dry. So the book stays
    under a fixed size however many checkpoints a run holds.
    """

    held: list[tuple[int, int]] = msgspec.field(default_factory=list)
    """Disjoint ``[start, end)`` ranges of held sequences in the front, ascending."""
    expiring: list[tuple[float, int]] = msgspec.field(default_factory=list)
    """``(expires_at, sequence)`` of front checkpoints that expire, ascending."""
    immortal: int = 0
    """Front checkpoints that never expire."""
    blobs: dict[int, str] = msgspec.field(default_factory=dict)
    """Sequence -> blob suffix (see :func:`blob_key`) of front checkpoints kept in S3."""
    back: Back | None = None

    def copy(self) -> Book:
        back = None if self.back is None else msgspec.structs.replace(self.back)
        return Book(list(self.held), list(self.expiring), self.immortal, dict(self.blobs), back)

    @property
    def front_count(self) -> int:
        return sum(end - start for start, end in self.held)

    @property
    def count(self) -> int:
        return self.front_count + (0 if self.back is None else self.back.count)

    @property
    def detail(self) -> int:
        """Entries the front details: what ``capacity`` bounds."""
        return len(self.held) + len(self.expiring) + len(self.blobs)

    def in_front(self, sequence: int) -> bool:
        index = bisect_right(self.held, (sequence, MAX_SEQUENCE + 1)) - 1
        return index >= 0 and self.held[index][0] <= sequence < self.held[index][1]

    def holds(self, sequence: int) -> bool:
        """Whether the run holds ``sequence``; in the back, whether it may (its item decides)."""
        if self.back is not None and sequence >= self.back.start:
            return True
        return self.in_front(sequence)

    def sequences(self) -> list[int]:
        """The front's held sequences."""
        return [sequence for start, end in self.held for sequence in range(start, end)]

    def add(
        self, sequence: int, expires_at: float | None, blob: str | None, *, capacity: int
    ) -> None:
        """Record a new newest checkpoint (``sequence`` above every held one)."""
        if self.back is None and self.detail < capacity:
            self._add_front(sequence, expires_at, blob)
            return
        if self.back is None:
            self.back = Back(start=sequence)
        self.back.count += 1
        if expires_at is None:
            self.back.immortal += 1
        elif self.back.latest is None or expires_at > self.back.latest:
            self.back.latest = expires_at

    def _add_front(self, sequence: int, expires_at: float | None, blob: str | None) -> None:
        if self.held and self.held[-1][1] == sequence:
            self.held[-1] = (self.held[-1][0], sequence + 1)
        else:
            self.held.append((sequence, sequence + 1))
        if expires_at is None:
            self.immortal += 1
        else:
            insort(self.expiring, (expires_at, sequence))
        if blob is not None:
            self.blobs[sequence] = blob

    def remove(self, sequence: int) -> bool:
        """Remove a front checkpoint; ``False`` if the front does not hold it."""
        index = bisect_right(self.held, (sequence, MAX_SEQUENCE + 1)) - 1
        if index < 0 or not self.held[index][0] <= sequence < self.held[index][1]:
            return False
        start, end = self.held[index]
        pieces = [(a, b) for a, b in ((start, sequence), (sequence + 1, end)) if a < b]
        self.held[index : index + 1] = pieces
        for position, (_, held_sequence) in enumerate(self.expiring):
            if held_sequence == sequence:
                del self.expiring[position]
                break
        else:
            self.immortal -= 1
        self.blobs.pop(sequence, None)
        return True

    def remove_back(self, expires_at: float | None) -> None:
        """Forget one checkpoint of the back (its item says when it expires)."""
        back = self.back
        if back is None:
            return
        back.count -= 1
        if expires_at is None:
            back.immortal -= 1
        if back.count <= 0:
            self.back = None

    def expiry_of(self, sequence: int) -> float | None:
        """The expiry of a front checkpoint (``None``: never, or not in the front)."""
        return next((at for at, held in self.expiring if held == sequence), None)

    def expired(self, now: float) -> list[int]:
        """Front checkpoints expired at ``now``, ascending."""
        return sorted(sequence for _, sequence in self.expiring[: self._expired_count(now)])

    def _expired_count(self, now: float) -> int:
        return bisect_right(self.expiring, (now, MAX_SEQUENCE + 1))

    def wanted(self, now: float, keep_latest: int | None, *, coming: int = 0) -> int:
        """How many of the back's oldest checkpoints the front must take in before pruning
        (``coming`` checkpoints about to be added): enough for ``keep_latest``, and some
        whenever no live one is left in the front."""
        if self.back is None:
            return 0
        live_front = self.front_count - self._expired_count(now)
        needed = 0 if keep_latest is None else self.count + coming - keep_latest - live_front
        return max(needed, 1 if live_front <= 0 else 0)

    def absorb(
        self, entries: Sequence[tuple[int, float | None, str | None]], exhausted: bool
    ) -> None:
        """Take the back's oldest checkpoints into the front: ``(sequence, expires_at, blob
        suffix)`` ascending from ``back.start``, as the log holds them; ``exhausted`` when
        they are all of the back."""
        back = self.back
        if back is None:
            return
        for sequence, expires_at, blob in entries:
            self._add_front(sequence, expires_at, blob)
            back.count -= 1
            if expires_at is None:
                back.immortal -= 1
        if exhausted or back.count <= 0:
            self.back = None  # what the log holds wins over the count
        elif entries:
            back.start = entries[-1][0] + 1

    def prune(self, now: float, keep_latest: int | None) -> list[int]:
        """Remove expired front checkpoints, then the oldest beyond ``keep_latest``."""
        removed = self.expired(now)
        for sequence in removed:
            self.remove(sequence)
        if keep_latest is not None:
            excess = self.count - keep_latest
            while excess > 0 and self.held:
                oldest = self.held[0][0]
                self.remove(oldest)
                removed.append(oldest)
                excess -= 1
        return removed

    def lowers_latest(self, expiries: Sequence[float | None], now: float) -> bool:
        """Whether having removed checkpoints with these expiries (before they expired) may
        leave ``back.latest`` later than any checkpoint still held: then the store reads the
        back again. Not while the front still holds one expiring as late."""
        back = self.back
        if back is None or back.latest is None:
            return False
        if self.expiring and self.expiring[-1][0] >= back.latest:
            return False
        return any(at is not None and at == back.latest and at > now for at in expiries)

    def expires_at(self) -> float | None:
        """The run's expiry: latest held expiry, ``None`` if one never expires, else EMPTY_RUN."""
        if self.count <= 0:
            return EMPTY_RUN
        back = self.back
        if self.immortal or (back is not None and back.immortal):
            return None
        candidates = [at for at, _ in self.expiring[-1:]]
        if back is not None and back.latest is not None:
            candidates.append(back.latest)
        return max(candidates) if candidates else None

    def problem(self, checkpoint_count: int, latest_sequence: int) -> str | None:
        """Why this book cannot describe a run with these counters, or ``None``."""
        if self.count != checkpoint_count:
            return f"its book counts {self.count} checkpoints, its record {checkpoint_count}"
        top = self.held[-1][1] - 1 if self.held else -1
        if self.back is not None:
            top = max(top, self.back.start)
        if top > latest_sequence:
            return f"its book holds sequence {top} above the latest, {latest_sequence}"
        if self.back is not None and (self.back.count < 1 or self.back.immortal < 0):
            return "its book counts a negative back"
        return None


BOOK_ENCODER = msgspec.msgpack.Encoder()
BOOK_DECODER = msgspec.msgpack.Decoder(Book)

FRONT_CAPACITY: Final = 2048
"""Entries the front of a book details at most (about 15 bytes each in the run item)."""
REFILL: Final = 256
"""Checkpoints the front takes in from the back per ``Query`` when it runs dry."""
OWNERS_CAPACITY: Final = 1024
"""Owning sequences the run item lists at most; below its floor every one counts as owning."""


def blob_key(run_key: str, incarnation: str, sequence: int, suffix: str) -> str:
    """The S3 key (below the store prefix) of a checkpoint's payload."""
    if "/" in suffix:
        return suffix  # a whole key, as books written before suffixes hold them
    return f"{run_key}/{incarnation}/{sequence:0{SEQUENCE_DIGITS}d}-{suffix}"


def blob_suffix(key: str) -> str:
    """The random part of a blob key, which a book keeps instead of the whole key."""
    return key.rsplit("-", 1)[-1]


def blob_sequence(key: str) -> int | None:
    """The sequence a blob key names, ``None`` for a key not of :func:`blob_key`'s shape."""
    parts = key.split("/")
    if len(parts) != 3 or not parts[2][:SEQUENCE_DIGITS].isdigit():
        return None
    return int(parts[2][:SEQUENCE_DIGITS])


ITEM_BLOBS: Final = "i"
"""The folder of item values under a life's blob prefix (no incarnation is one letter); also,
right under the run's prefix, of the values of writes that name no life (``put_items``, and
every item write made before values were kept by life)."""


def item_blob_key(
    run_key: str, incarnation: str | None, sort_key: str, written_at: float, suffix: str
) -> str:
    """The S3 key (below the store prefix) of an item value too large for its item: it names
    the life that wrote it (when the writer knows it), the item that points to it and when
    it was written, so a removal of an ended life takes that life's values by prefix (never a
    new life's, written before its first transaction lands), and a sweep can tell an orphan
    (whose item points elsewhere) from a write still under way (a recent one)."""
    life = "" if incarnation is None else f"{incarnation}/"
    return f"{run_key}/{life}{ITEM_BLOBS}/{sort_key.encode().hex()}/{int(written_at)}-{suffix}"


def item_blob_sort_key(key: str) -> tuple[str, float, str | None] | None:
    """``(sort key of the item, written at, life)`` of an item blob key (life ``None``: a
    write that named none), ``None`` for another key."""
    parts = key.split("/")
    life: str | None = None
    if len(parts) == 5 and parts[2] == ITEM_BLOBS:
        life = parts.pop(1)
    if len(parts) != 4 or parts[1] != ITEM_BLOBS:
        return None
    stamp = parts[3].split("-", 1)[0]
    try:
        return bytes.fromhex(parts[2]).decode(), float(stamp), life
    except (ValueError, UnicodeDecodeError):
        return None
