"""Key layout, run bookkeeping and table definition of the DynamoDB store: no I/O here.

One partition per run (``PK = run#<run key>``); sort keys order the partition as::

    i#<item key>                 items (code point order = UTF-8 byte order, as DynamoDB sorts)
    j#<owner:020>#<item key>     markers: items owned by checkpoint <owner>
    k#<sequence:020>             checkpoints
    r                            the run item, right above the newest checkpoint

so one descending ``Query`` from ``r`` returns the run item and then the newest checkpoints.
"""

from __future__ import annotations

import math
import struct
import zlib
from bisect import bisect_right, insort
from typing import Any, Final

import msgspec

from fastcheckpoint.stores._base import EMPTY_RUN

__all__ = [
    "BY_CREATED",
    "BY_EXPIRY",
    "BY_STATUS",
    "INDEX_SHARDS",
    "MAX_ITEM_KEY_BYTES",
    "TABLE_DEFINITION",
    "Book",
    "checkpoint_sk",
    "created_stamp",
    "item_sk",
    "marker_sk",
    "partition",
    "sequence_of",
    "shard_of",
    "ttl_of",
]

RUN_SK: Final = "r"
CHECKPOINT_PREFIX: Final = "k#"
ITEM_PREFIX: Final = "i#"
MARKER_PREFIX: Final = "j#"
# One past every key of a family ('#' + 1 == '$'): exclusive upper bounds of range queries.
CHECKPOINT_END: Final = "k$"
ITEM_END: Final = "i$"
MARKER_END: Final = "j$"

SEQUENCE_DIGITS: Final = 20
MAX_SEQUENCE: Final = 10**SEQUENCE_DIGITS - 1

MAX_ITEM_KEY_BYTES: Final = 1000
"""Longest item key in UTF-8 bytes: a marker's sort key (24 bytes + key) must fit in 1,024."""

INDEX_SHARDS: Final = 8
"""Shards of each run index. Every client of a table must use the same number."""

BY_STATUS: Final = "by_status"
BY_CREATED: Final = "by_created"
BY_EXPIRY: Final = "by_expiry"

# Attributes the run indexes copy, so a listing page is built from the index alone.
RUN_PROJECTION: Final = ["rid", "inc", "st", "ca", "ua", "ls", "cnt", "exp", "ver", "dat", "pg"]

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


def checkpoint_sk(sequence: int) -> str:
    return f"{CHECKPOINT_PREFIX}{sequence:0{SEQUENCE_DIGITS}d}"


def sequence_of(sort_key: str) -> int:
    """The sequence in a checkpoint's or a marker's sort key."""
    return int(sort_key[2 : 2 + SEQUENCE_DIGITS])


def item_sk(key: str) -> str:
    return f"{ITEM_PREFIX}{key}"


def marker_sk(owner: int, key: str) -> str:
    return f"{MARKER_PREFIX}{owner:0{SEQUENCE_DIGITS}d}#{key}"


def marker_item_key(sort_key: str) -> str:
    return sort_key[3 + SEQUENCE_DIGITS :]


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


class Book(msgspec.Struct, array_like=True):
    """What the run item knows about the checkpoints it holds, so pruning reads nothing.

    Size is O(held checkpoints that expire + gaps + large ones), not O(payload).
    """

    held: list[tuple[int, int]] = msgspec.field(default_factory=list)
    """Disjoint ``[start, end)`` ranges of held sequences, ascending."""
    expiring: list[tuple[float, int]] = msgspec.field(default_factory=list)
    """``(expires_at, sequence)`` of held checkpoints that expire, ascending."""
    immortal: int = 0
    """Held checkpoints that never expire."""
    blobs: dict[int, str] = msgspec.field(default_factory=dict)
    """Sequence -> S3 key of held checkpoints whose payload lives in the bucket."""

    def copy(self) -> Book:
        return Book(list(self.held), list(self.expiring), self.immortal, dict(self.blobs))

    @property
    def count(self) -> int:
        return sum(end - start for start, end in self.held)

    def holds(self, sequence: int) -> bool:
        index = bisect_right(self.held, (sequence, MAX_SEQUENCE + 1)) - 1
        return index >= 0 and self.held[index][0] <= sequence < self.held[index][1]

    def sequences(self) -> list[int]:
        return [sequence for start, end in self.held for sequence in range(start, end)]

    def add(self, sequence: int, expires_at: float | None, blob: str | None) -> None:
        """Record a new newest checkpoint (``sequence`` above every held one)."""
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

    def expired(self, now: float) -> list[int]:
        return sorted(sequence for expires_at, sequence in self.expiring if expires_at <= now)

    def prune(self, now: float, keep_latest: int | None) -> list[int]:
        """Remove expired checkpoints, then the oldest beyond ``keep_latest``; return them."""
        removed = self.expired(now)
        for sequence in removed:
            self.remove(sequence)
        if keep_latest is not None:
            excess = self.count - keep_latest
            while excess > 0:
                oldest = self.held[0][0]
                self.remove(oldest)
                removed.append(oldest)
                excess -= 1
        return removed

    def expires_at(self) -> float | None:
        """The run's expiry: latest held expiry, ``None`` if one never expires, else EMPTY_RUN."""
        if not self.held:
            return EMPTY_RUN
        if self.immortal:
            return None
        return max(expires_at for expires_at, _ in self.expiring)

    def due(self) -> float | None:
        """When ``purge_expired`` must first look at the run (``None``: nothing ever expires)."""
        if not self.held:
            return EMPTY_RUN
        return self.expiring[0][0] if self.expiring else None


BOOK_ENCODER = msgspec.msgpack.Encoder()
BOOK_DECODER = msgspec.msgpack.Decoder(Book)
