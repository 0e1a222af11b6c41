"""DynamoDB+S3 store: one table for runs, checkpoints and items; large payloads in a bucket.

Layout (see ``_dynamodb_layout`` and ``docs/stores/dynamodb.md``): one partition per run; the
run item sorts right above the newest checkpoint, so ``latest`` is one descending ``Query``.
The run item carries a small book of the checkpoints it holds (the oldest ones in detail, the
rest counted), so an append computes its pruning without reading anything and commits
checkpoint put, run update and pruning deletes in one ``TransactWriteItems``, conditioned on
the run item's revision. The book has a fixed upper size, so no run ever outgrows DynamoDB's
400 KB item limit. The store remembers the run items it last wrote or read (a bounded cache);
a stale entry only costs one failed transaction, whose cancellation returns the current run
item (``ReturnValuesOnConditionCheckFailure``).

Commits are idempotent: every TransactWriteItems carries a ``ClientRequestToken`` the store
sets (the same on botocore's resends), from which DynamoDB answers a resend of a transaction
that landed. Each append also writes a random token into the run item and the checkpoint
item, and, on services that ignore ``ClientRequestToken`` (``resend_memos``: by default any
endpoint but AWS's own), a memo of itself keyed by that token (``memo#<token>``, create-only,
in the expiry index five minutes on, which is how the cleanup loop removes it), so a
transaction sent again after its reply was lost, and refused because it had been applied, is
recognised as this append's own by the memo's refusal, also when the checkpoint was deleted
or pruned, or the run deleted or started over, in between.
A checkpoint put never replaces a checkpoint of the same incarnation, whatever the run item
says: a run item put back from an older copy makes appends fail as a damaged record instead
of overwriting acknowledged data.

Costs in requests (steady state, one writer per run): append 1, whose transaction also puts
the append's memo, if any (~100 bytes: 2 write units more) (+1 S3 PUT when large, +1 S3
DeleteObjects when a large checkpoint is pruned, +1 Query when a pruned checkpoint owns
items, +1 Query per ``REFILL`` appends in a run holding more than the book details); latest
1 Query (+1 GET when large); get 1 TransactGetItems (+1 GET); headers 1 Query for the first
page, a Query and a GetItem (concurrent) for later pages; list_runs and count_runs one Query
per index shard per page, issued concurrently. append_with_items 1 (the items ride in the
append's transaction); read_with_items of the latest checkpoint 1 TransactGetItems when this
process knows its records, else 1 Query (+1 BatchGetItem for the shared items it names), and
+1 Query (per MB) per named item that the run item lists as having nested items (``nk``),
sent with the rest: no round trip more (+1 GET per value in S3); none for items with nothing
nested. Removing a shared item with nested items (the cleanup loop, once no checkpoint names
it): +1 Query to find them, then per MB a Query and per 99 items a TransactWriteItems, and one
TransactWriteItems ending the removal; a run deleted or purged whole takes them with its
partition.

Three sparse global secondary indexes, each sharded ``INDEX_SHARDS`` ways by run key so no
single index partition takes every active run: ``by_status`` (``<status>#<shard>``),
``by_created`` (``runs#<shard>``) and ``by_expiry`` (``x#<shard>`` by expiry: checkpoints,
items and run items that expire), which ``purge_expired`` reads.

aiobotocore runs on asyncio only: the store says so with a ``ConfigurationError`` on trio.
It builds its clients per event loop; clients it was given are used only in the event loop
they were first used in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import re
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import anyio
import msgspec
from botocore.exceptions import BotoCoreError, ClientError

from fastcheckpoint import _ids
from fastcheckpoint._config import RetryPolicy
from fastcheckpoint._gather import gather, pair
from fastcheckpoint._settle import settled
from fastcheckpoint._validate import shown
from fastcheckpoint.errors import (
    CheckpointError,
    CheckpointNotFound,
    ConfigurationError,
    ConflictError,
    CorruptCheckpointError,
    SequenceConflict,
    SharedItemGone,
    StoreError,
    StoreUnavailableError,
    ValidationError,
)
from fastcheckpoint.stores import _dynamodb_items as items_layout
from fastcheckpoint.stores import _dynamodb_layout as layout
from fastcheckpoint.stores._aws import AwsEndpoint, error_code, open_client, translate
from fastcheckpoint.stores._base import (
    MAX_ITEM_KEY_BYTES,
    NESTING,
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
    check_keys,
    check_labels,
    check_limit,
    check_options,
    check_run_key,
    check_str,
    check_time,
    check_utf8,
    is_live,
    item_key_bytes,
    nested_prefix,
    nesting_under,
    prefix_end,
)
from fastcheckpoint.stores._dynamodb_attrs import Names as _Names
from fastcheckpoint.stores._dynamodb_attrs import b as _b
from fastcheckpoint.stores._dynamodb_attrs import binary as _bytes
from fastcheckpoint.stores._dynamodb_attrs import integer as _int
from fastcheckpoint.stores._dynamodb_attrs import n as _n
from fastcheckpoint.stores._dynamodb_attrs import number as _number
from fastcheckpoint.stores._dynamodb_attrs import s as _s
from fastcheckpoint.stores._dynamodb_attrs import strings as _strings
from fastcheckpoint.stores._dynamodb_attrs import text as _text
from fastcheckpoint.stores._dynamodb_attrs import text_list as _text_list
from fastcheckpoint.stores._dynamodb_items import Value
from fastcheckpoint.stores._dynamodb_layout import Book
from fastcheckpoint.stores._dynamodb_provision import (
    LIFECYCLE_RULE,
    provision_blob_bucket,
    provision_table,
)
from fastcheckpoint.stores._loops import GivenClientLoop, PerLoop, holds_clients
from fastcheckpoint.stores._s3_io import Bucket

if TYPE_CHECKING:
    from aiobotocore.session import AioSession
    from types_aiobotocore_dynamodb import DynamoDBClient
    from types_aiobotocore_s3 import S3Client

__all__ = [
    "DEFAULT_THRESHOLD",
    "LIFECYCLE_RULE",
    "TRANSACTION_ACTIONS",
    "DynamoDBStore",
    "parse_size",
]

logger = logging.getLogger("fastcheckpoint.stores.dynamodb")
_T = TypeVar("_T")

_STORE: Final = "DynamoDBStore"
_DRIVER: Final = "aiobotocore"

DEFAULT_THRESHOLD: Final = 350 * 1024
"""Encoded checkpoints larger than this (bytes) go to S3; DynamoDB's item limit is 400 KB."""
_MAX_THRESHOLD: Final = 400 * 1024 - 2048  # room for the key and the other attributes
_ITEM_OVERHEAD: Final = 200  # attribute names, key, id, numbers: generous, so we never hit 400 KB
_TRANSACTION_LIMIT: Final = 100
_TRANSACTION_BYTES: Final = 4 * 1024 * 1024 - 512 * 1024
"""What the records written by one transaction may weigh: DynamoDB takes 4 MB, and the run
item's update (its book, its details) needs room beside them."""
_ITEM_BLOB_GRACE: Final = 3600.0
"""An item blob younger than this (seconds) may belong to a write still under way: the
sweep of orphaned item blobs spares it."""
_PURGE_BATCH: Final = _TRANSACTION_LIMIT // 2
_BATCH_WRITE_LIMIT: Final = 25
_BATCH_GET_LIMIT: Final = 100
_APPEND_ATTEMPTS: Final = 8
_CACHE_SIZE: Final = 4096
_GONE: Final = float("-inf")
"""The expiry of a checkpoint that is not there: never live."""

TRANSACTION_ACTIONS: Final = frozenset(
    {"PutItem", "UpdateItem", "DeleteItem", "GetItem", "ConditionCheckItem"}
)
"""IAM actions checked for the items inside TransactWriteItems / TransactGetItems."""

# Cancellation reasons that say "try again", not "this cannot be done".
_TRANSIENT_REASONS: Final = frozenset(
    {"TransactionConflict", "ThrottlingError", "ProvisionedThroughputExceeded",
     "RequestLimitExceeded"}
)
_CONDITION_FAILED: Final = "ConditionalCheckFailed"

_UNITS: Final = {"": 1, "B": 1, "KB": 1024, "KIB": 1024, "MB": 1024 * 1024, "MIB": 1024 * 1024}
_SIZE = re.compile(r"\s*([0-9]+)\s*([A-Za-z]*)\s*")
_CURSOR = re.compile(r"[0-9a-f]{16}#[a-z2-7]{1,64}")
_INCARNATION = re.compile(r"[a-z2-7]{8}")
_URL_OPTIONS: Final = frozenset(
    {"bucket", "prefix", "threshold", "region", "endpoint_url", "resend_memos"}
)
_KEYWORD_OPTIONS: Final = frozenset(
    {"bucket", "prefix", "threshold", "region", "endpoint_url", "retry", "dynamodb_client",
     "s3_client", "session", "resend_memos"}
)
_AWS_HOSTS: Final = ("amazonaws.com", "amazonaws.com.cn", "api.aws")
"""Host suffixes of AWS's own DynamoDB endpoints, which honour ``ClientRequestToken``."""
_FLAGS: Final = {"1": True, "true": True, "yes": True, "on": True,
                 "0": False, "false": False, "no": False, "off": False}


# -- the run item --------------------------------------------------------------------------


@dataclass(frozen=True)
class _RunState:
    """A run item as read or written: the record, its revision, book and owners."""

    record: RunRecord
    rev: int
    book: Book
    owners: frozenset[int]
    """Sequences known to own items."""
    owner_floor: int = 0
    """Every sequence below it may own items (the run item stopped listing them)."""
    purging: bool = False
    items_floor: int | None = None
    """Every sequence from it on may own items or name shared items (set by the first
    ``append_with_items``): removing one reads what it owns and names."""
    label_ttl: float | None = None
    """The ``ttl`` the run's label entries carry (``None``: none)."""
    nesting: frozenset[str] = frozenset()
    """Shared items that appends wrote nested items under (``nk``): a read of a checkpoint
    naming one looks for them, and only then (see :func:`_nesting_after`)."""
    nesting_all: bool = False
    """Any shared item may have nested items (``nka``: ``nesting`` outgrew its capacity, or
    the run item was rebuilt): a read looks under every item it names."""
    delete_tokens: tuple[str, ...] = ()
    """The write tokens of the run's latest deletes, newest first (``dwt``, at most
    ``_DELETE_TOKENS``): a delete's resend finds its own there after other writes."""

    def live(self, now: float) -> bool:
        return not self.purging and is_live(self.record.expires_at, now)

    def may_nest(self, key: str) -> bool:
        return self.nesting_all or key in self.nesting

    def may_own(self, sequence: int) -> bool:
        return sequence in self.owners or sequence < self.owner_floor or (
            self.items_floor is not None and sequence >= self.items_floor)


class _DamagedCounter(CorruptCheckpointError):
    """A transaction refused because a count it updates is damaged: nothing was written."""


class _DamagedRun(CorruptCheckpointError):
    """A run item that cannot be used: undecodable, or contradicting the run's log."""

    def __init__(self, problem: str, *, key: str) -> None:
        super().__init__(
            f"the run record cannot be used: {problem}; its checkpoints stay readable; "
            "rebuild it from them with `fastcheckpoint doctor --repair URL RUN_ID`",
            key=key,
        )
        self.problem = problem


def _record_of(item: Mapping[str, Any]) -> RunRecord:
    """The run record in a run item (or an index entry); raises on a malformed one."""
    record = RunRecord(
        run_id=_text(item, "rid"),
        incarnation=_text(item, "inc"),
        status=_text(item, "st"),
        created_at=float(item["ca"]["N"]),
        updated_at=float(item["ua"]["N"]),
        latest_sequence=int(item["ls"]["N"]),
        checkpoint_count=int(item["cnt"]["N"]),
        expires_at=_number(item, "exp"),
        version=int(item["ver"]["N"]),
        data=_bytes(item, "dat"),
        labels=_text_list(item, "lb"),
    )
    if not record.run_id or not record.status or "#" in record.status:
        raise ValueError("run id or status is empty or malformed")
    if not _INCARNATION.fullmatch(record.incarnation):
        raise ValueError(f"incarnation {record.incarnation[:20]!r} is malformed")
    if record.latest_sequence < 0 or record.checkpoint_count < 0 or record.version < 0:
        raise ValueError("negative counters")
    return record


def _record_problem(item: Mapping[str, Any]) -> str | None:
    """Why a run item or index entry does not hold a usable run record, or ``None``: also
    when it sits in another run's partition than its run id's (a record copied over)."""
    try:
        record = _record_of(item)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return f"its record attributes are malformed ({type(exc).__name__}: {exc})"
    pk = item.get("PK", {}).get("S")
    if isinstance(pk, str):
        return _foreign(pk.removeprefix("run#"), record)
    return None


def _foreign(run_key: str, record: RunRecord) -> str | None:
    """Why a run item does not belong at ``run_key`` (copied from another run), or ``None``."""
    problem = _ids.foreign_run(run_key, record.run_id)
    return None if problem is None else f"the run item {problem}"


def _state_of(item: Mapping[str, Any], where: str, run_key: str) -> _RunState:
    """The run item of ``run_key`` as a :class:`_RunState`; :class:`_DamagedRun` if it
    cannot be used (also when it names another run)."""
    try:
        record = _record_of(item)
        book = layout.BOOK_DECODER.decode(_bytes(item, "bk"))
        rev = int(item["rev"]["N"])
        owners = frozenset(int(value) for value in item.get("own", {}).get("NS", ()))
        owner_floor = _int(item, "ofl")
        purging = bool(item.get("pg", {}).get("BOOL", False))
        items_floor = None if "rfl" not in item else _int(item, "rfl")
        label_ttl = _number(item, "lttl")
        nesting = frozenset(item.get("nk", {}).get("SS", ()))
        nesting_all = bool(item.get("nka", {}).get("BOOL", False))
        delete_tokens = _text_list(item, "dwt")
    except (KeyError, TypeError, ValueError, AttributeError, msgspec.DecodeError) as exc:
        raise _DamagedRun(f"it is unreadable ({type(exc).__name__}: {exc})", key=where) from exc
    problem = _foreign(run_key, record) or book.problem(
        record.checkpoint_count, record.latest_sequence)
    if problem is not None:
        raise _DamagedRun(problem, key=where)
    return _RunState(record, rev, book, owners, owner_floor, purging, items_floor, label_ttl,
                     nesting, nesting_all, delete_tokens)


_DELETE_TOKENS: Final = 8
"""Tokens of the latest deletes a run item keeps (``dwt``, about 20 bytes each): a delete whose
reply was lost is recognised when its resend comes after fewer other deletes of the run (any
number of creates and status changes)."""

def _surviving_tokens(item: Mapping[str, Any]) -> tuple[str, ...]:
    """The latest deletes' tokens (``dwt``) of a damaged run item, if they are readable: the
    rebuilt item keeps them, so a delete resent after the rebuild is still recognised."""
    try:
        return _text_list(item, "dwt")[:_DELETE_TOKENS]
    except (KeyError, TypeError, ValueError, AttributeError):
        return ()


_NESTING_CAPACITY: Final = 32
"""Shared items a run item lists as having nested items (``nk``, at most 4 KB of keys);
beyond it the run item says any may (``nka``) and reads look under every item they name."""


def _nesting_after(state: _RunState, keys: Sequence[str]) -> _RunState:
    """``state`` once an append wrote items nested under ``keys`` (items it names)."""
    added = frozenset(keys) - state.nesting
    if state.nesting_all or not added:
        return state
    if len(state.nesting) + len(added) > _NESTING_CAPACITY:
        return dataclasses.replace(state, nesting=frozenset(), nesting_all=True)
    return dataclasses.replace(state, nesting=state.nesting | added)


def _index_attributes(run_key: str, record: RunRecord) -> dict[str, Any]:
    shard = layout.shard_of(run_key)
    return {
        "gst": _s(f"{record.status}#{shard}"),
        "gall": _s(f"runs#{shard}"),
        "gord": _s(layout.created_stamp(record.created_at, run_key)),
    }


def _expiry_attributes(run_key: str, book: Book) -> dict[str, Any]:
    """``exp``/``ttl`` (run expiry) and ``xpk``/``xat`` (its entry in the expiry index, at
    ``EMPTY_RUN`` once the run holds nothing); absent = never. The run item is in the index
    itself because native TTL may remove its expired checkpoints, with their entries, before
    the cleanup loop gets to them: the run, its items and blobs must still be found.
    Checkpoints that expire carry their own ``xpk``/``xat``, so the cleanup loop finds them
    without the run item."""
    attributes: dict[str, Any] = {}
    expires_at = book.expires_at()
    if expires_at is not None:
        attributes["exp"] = _n(expires_at)
        # Native TTL is the backstop: the cleanup loop removes the run (and its items) first.
        attributes["ttl"] = _n(layout.ttl_of(expires_at) + _RUN_TTL_GRACE)
        attributes["xpk"] = _s(f"x#{layout.shard_of(run_key)}")
        attributes["xat"] = _n(expires_at)
    return attributes


_RUN_TTL_GRACE: Final = 7 * 86400
_EXPIRY_ATTRIBUTES: Final = ("exp", "ttl", "xpk", "xat")


def _run_item(
    run_key: str, state: _RunState, token: str
) -> dict[str, Any]:
    record, book = state.record, state.book
    item: dict[str, Any] = {
        "PK": _s(layout.partition(run_key)),
        "SK": _s(layout.RUN_SK),
        "rid": _s(record.run_id),
        "inc": _s(record.incarnation),
        "st": _s(record.status),
        "ca": _n(record.created_at),
        "ua": _n(record.updated_at),
        "ls": _n(record.latest_sequence),
        "cnt": _n(book.count),
        "ver": _n(record.version),
        "dat": _b(record.data),
        "rev": _n(state.rev),
        "bk": _b(layout.BOOK_ENCODER.encode(book)),
        "wt": _s(token),
        **_index_attributes(run_key, record),
        **_expiry_attributes(run_key, book),
    }
    if state.owners:
        item["own"] = {"NS": [str(owner) for owner in sorted(state.owners)]}
    if state.owner_floor:
        item["ofl"] = _n(state.owner_floor)
    if record.labels:
        item["lb"] = _strings(record.labels)
    if state.items_floor is not None:
        item["rfl"] = _n(state.items_floor)
    if state.label_ttl is not None:
        item["lttl"] = _n(state.label_ttl)
    if state.nesting:
        item["nk"] = {"SS": sorted(state.nesting)}
    if state.nesting_all:
        item["nka"] = {"BOOL": True}
    if state.delete_tokens:
        item["dwt"] = _strings(state.delete_tokens)
    return item


def _run_ttl(book: Book) -> float | None:
    """The run item's native ``ttl`` (see :func:`_expiry_attributes`), ``None`` if none."""
    expires_at = book.expires_at()
    return None if expires_at is None else layout.ttl_of(expires_at) + _RUN_TTL_GRACE


def _label_ttl(old: float | None, book: Book, labels: Sequence[str]) -> float | None:
    """The ``ttl`` the run's label entries need after a change leaving ``book``: never
    before the run item's own, moved (rarely, with slack) only when the run outlives it."""
    if not labels:
        return None
    run_ttl = _run_ttl(book)
    if run_ttl is None:
        return None
    if old is not None and old >= run_ttl:
        return old
    return run_ttl + items_layout.LABEL_TTL_SLACK


# -- plans ---------------------------------------------------------------------------------


@dataclass
class _Plan:
    """One append's (or removal's) transaction and what to do once it commits."""

    operations: list[dict[str, Any]]
    state: _RunState
    removed_blobs: list[str]
    overflow: list[dict[str, Any]] = field(default_factory=list)
    """Deletes that did not fit in the transaction (more than 100 operations): done after."""
    pins: list[_Early] = field(default_factory=list)
    """Shared items and raised counts that did not fit: written before the transaction."""
    check: dict[str, Any] | None = None
    """The check of the run item each transaction of ``pins`` carries: the revision the
    transaction's own condition expects (see :func:`_pin_check`)."""
    lowered: list[str] = field(default_factory=list)
    """Shared items whose counts this change lowers (the cleanup loop checks them)."""
    ended: str | None = None
    """The incarnation of the ended life a new life's first append replaces: once the append
    lands, that life's item values no record points to are swept (see :meth:`_finish`)."""
    purged: bool = False
    """A first append's plan made once it removed the ended life whole: there is no run item
    now, and the attempt after its pins plans over none."""
    owner: str | None = None
    """A run's first append (no run item): its write token, which its pins put in the pin
    record and check there (see :func:`_pin_claim`)."""


@dataclass(frozen=True)
class _Early:
    """Writes of one shared item that must land no later than the checkpoint that needs
    them, sent together: its put (``writes``) and/or the raise of its count by ``raising``."""

    operations: list[dict[str, Any]]
    key: str
    raising: int
    writes: bool


@dataclass
class _Additions:
    """What an append writes besides its checkpoint and run item."""

    with_items: bool = False
    """Through ``append_with_items``: the run's later checkpoints may own or name items."""
    refs: Counter[str] = field(default_factory=Counter)
    """The shared items the checkpoint names: each count rises by this much."""
    owned: list[dict[str, Any]] = field(default_factory=list)
    """Puts of the owned items' values and anchors (grouped by key)."""
    shared: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Puts of shared items, by key (each only where no live item is)."""
    blobs: list[str] = field(default_factory=list)
    """S3 blobs written for the append (its payload, large item values)."""
    pinned: Counter[str] = field(default_factory=Counter)
    """Counts already raised before the transaction (see ``_pin``)."""
    pinned_shared: set[str] = field(default_factory=set)
    """Shared items already written before the transaction."""
    pin_dropped: set[str] = field(default_factory=set)
    """Those of ``pinned_shared`` whose put was dropped (a live item there): their values
    are no record's."""
    claimed: bool = False
    """A run's first append whose pins put its write token in the pin record: its later pins
    and its transaction check it is still there (see :func:`_pin_claim`)."""
    nesting: tuple[str, ...] = ()
    """The items it names that it writes nested items under: the run item lists them."""
    life: str = ""
    """The incarnation it appends to: the undo lowers ``pinned`` only while the run item
    is of it (see ``_undo_additions``)."""


@dataclass
class _Removal:
    """What removing checkpoints takes besides their run item's update."""

    targeted: list[dict[str, Any]] = field(default_factory=list)
    """Deletes conditioned on the checkpoint's id (``delete``): they decide the change."""
    deletes: list[dict[str, Any]] = field(default_factory=list)
    refs: Counter[str] = field(default_factory=Counter)
    """Shared items the removed checkpoints named: each count drops by this much."""
    blobs: list[str] = field(default_factory=list)
    anchors: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    """Owned items whose anchors ``deletes`` removes: key -> (owner, the delete)."""


@dataclass
class _Outcome:
    """What an append knows of its transactions: whether one landed (``committed``), and
    whether one was sent without a definite answer (``unknown``: its reply was lost, or the
    call was cancelled while it was under way)."""

    committed: bool = False
    unknown: bool = False


@dataclass(frozen=True)
class _Held:
    """A checkpoint of the log as its item describes it (the back of a book is not detailed)."""

    sequence: int
    expires_at: float | None
    blob: str | None
    """The S3 key of its payload, if large."""


@dataclass(frozen=True)
class _Family:
    """What this process knows of a run's latest checkpoint and the records next to it."""

    sequence: int
    records: int
    """Records next to it (owned values, the guard): how far a Query reading it reaches."""
    checkpoint_id: str = ""
    refs: tuple[str, ...] = ()
    owned: tuple[str, ...] | None = None
    """Keys of every value it owns, when known exactly (it was appended or read whole by
    this process, with no write to it since): then a read of it is one TransactGetItems."""
    guard: str | None = None
    """The write token of its guard (``None``: it has none)."""
    guard_before: str | None = None
    """When this process wrote the guard: the token that write replaced ("" for none), which
    the guard keeps (``pw``); another token there means another write came first."""


class _Superseded(Exception):
    """An S3 object a read's record named is gone because the record is: another process
    removed or replaced it (a newer checkpoint pruned it) between the record's read and the
    object's. The read is made again; it finds what is there now."""


class _Cancelled(Exception):
    """A transaction cancelled because a condition failed (nothing was written)."""

    def __init__(self, reasons: list[dict[str, Any]], *, retried: bool) -> None:
        super().__init__("transaction cancelled")
        self.reasons = reasons
        self.retried = retried
        """Whether the driver sent it more than once: an earlier attempt may have landed."""
        self.operations: list[dict[str, Any]] = []
        """The operations of the cancelled transaction (with their tags)."""

    def failed(self, index: int) -> bool:
        return index < len(self.reasons) and self.reasons[index].get("Code") == _CONDITION_FAILED

    def failed_guard(self) -> bool:
        """Whether a guard's condition failed: items were written to a checkpoint that this
        change removes, after it read what the checkpoint owns. Not a first append's pin
        record (see :func:`_pins_held`): refused by it alone, the append is refused; with
        the run item too, the run item decides."""
        return any(self.failed(index) and operation.get("_fatal")
                   and not operation.get("_overtaken")
                   for index, operation in enumerate(self.operations))

    def item(self, index: int) -> dict[str, Any] | None:
        if index >= len(self.reasons):
            return None
        found: dict[str, Any] | None = self.reasons[index].get("Item") or None
        return found


@dataclass
class _Clients:
    """The clients of one event loop, and the stack that closes those the store built."""

    dynamodb: Any
    s3: Any
    stack: contextlib.AsyncExitStack
    blobs: Bucket | None
    memos: bool = False
    """Whether appends write memos of themselves (see ``DynamoDBStore``'s ``resend_memos``)."""


async def _close_clients(clients: _Clients) -> None:
    await clients.stack.aclose()


@dataclass(frozen=True)
class _Reading:
    """How reads judge a run's checkpoints: by its record, or, when that is damaged, by
    each checkpoint's own item (the newest incarnation's, reported as ``"active"``)."""

    status: str
    incarnation: str | None
    book: Book | None
    latest_sequence: int
    nesting: frozenset[str] | None = None
    """The shared items that may have nested items (``None``: any may)."""

    @classmethod
    def of(cls, state: _RunState) -> _Reading:
        record = state.record
        nesting = None if state.nesting_all else state.nesting
        return cls(record.status, record.incarnation, state.book, record.latest_sequence,
                   nesting)

    def may_nest(self, key: str) -> bool:
        return self.nesting is None or key in self.nesting

    def accepts(self, sequence: int) -> bool:
        if self.book is None or sequence > self.latest_sequence:
            return True  # the item decides (a record behind its log hides nothing)
        return self.book.holds(sequence)

    def status_of(self, sequence: int) -> str:
        """The status reported with checkpoint ``sequence``: ``"active"`` past the record."""
        return "active" if sequence > self.latest_sequence else self.status


_DAMAGED_READING: Final = _Reading("active", None, None, -1)
"""Reads of a run whose record is damaged: ``status_of`` is always ``\"active\"``."""
_DAMAGED_RETRY_SECONDS: Final = 3600.0
"""How long the cleanup loop leaves a run whose records it cannot read before it tries it
again (its expiry index entries move on; repair or ``delete_run`` ends it)."""


# -- the store -----------------------------------------------------------------------------


class DynamoDBStore(ExpiryCleanup):
    """Runs, checkpoints and items in one DynamoDB table; payloads above ``threshold`` in S3.

    Give ``table`` (and ``bucket`` for checkpoints above the threshold), plus ``region`` /
    ``endpoint_url``, and the store builds and owns its clients, one pair per event loop; or
    pass ``dynamodb_client`` (and ``s3_client``), which it uses and never closes, in the event
    loop they were first used in. Create the table and bucket with :meth:`provision`
    (``fastcheckpoint init URL``). Runs on asyncio only.

    ``resend_memos``: whether each append also writes a memo of itself, which recognises a
    resend of its transaction after a lost reply on services that ignore
    ``ClientRequestToken`` (emulators such as moto). ``None`` (the default) decides by the
    DynamoDB client's endpoint: none on AWS's own endpoints (``*.amazonaws.com``,
    ``*.amazonaws.com.cn``, ``*.api.aws``), which answer such a resend from the token; memos
    on any other ``endpoint_url``.
    """

    nested_items = True
    sequence_guard = True

    _book_capacity: int = layout.FRONT_CAPACITY
    """Entries a run item's book details at most (see ``_dynamodb_layout.Book``); tests
    lower it to reach the book's back with a few checkpoints."""

    def __init__(
        self,
        table: str,
        *,
        bucket: str | None = None,
        prefix: str = "",
        threshold: int = DEFAULT_THRESHOLD,
        region: str | None = None,
        endpoint_url: str | None = None,
        retry: RetryPolicy | None = None,
        dynamodb_client: DynamoDBClient | None = None,
        s3_client: S3Client | None = None,
        session: AioSession | None = None,
        resend_memos: bool | None = None,
    ) -> None:
        if not isinstance(table, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{3,255}", table):
            raise ConfigurationError(
                f"DynamoDB table name must be 3-255 characters of A-Z a-z 0-9 _ . -, got {table!r}"
            )
        if isinstance(threshold, bool) or not isinstance(threshold, int) or not (
            0 < threshold <= _MAX_THRESHOLD
        ):
            raise ConfigurationError(
                f"threshold must be between 1 byte and {_MAX_THRESHOLD} bytes (DynamoDB items "
                f"hold at most 400 KB), got {threshold!r}"
            )
        if bucket is not None and not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
            raise ConfigurationError(f"not a valid S3 bucket name: {bucket!r}")
        if resend_memos is not None and not isinstance(resend_memos, bool):
            raise ConfigurationError(
                f"resend_memos must be True, False or None (by endpoint), got {resend_memos!r}")
        self._resend_memos = resend_memos
        self.table = table
        self.bucket = bucket
        self.prefix = prefix
        self.threshold = threshold
        self._endpoint = AwsEndpoint(region=region, endpoint_url=endpoint_url)
        self._retry = retry or RetryPolicy()
        self._session = session
        self._given_dynamodb: Any = dynamodb_client
        self._given_s3: Any = s3_client
        self._given_loop = GivenClientLoop(
            _STORE, _DRIVER, "Create the clients in this loop, or let the store create its own "
            "(open_store(url) or DynamoDBStore(table, region=...)): it creates them per event "
            "loop")
        self._clients: PerLoop[_Clients] = PerLoop(
            self._open_clients, _close_clients, store=_STORE, driver=_DRIVER
        )
        self._cache: OrderedDict[str, _RunState | None] = OrderedDict()
        self._expiries: OrderedDict[str, float | None] = OrderedDict()
        """Checkpoint id -> its ``expires_at`` (which never changes), as last written or read."""
        self._families: OrderedDict[str, _Family] = OrderedDict()
        """Run key -> its latest checkpoint as last written or read (see :class:`_Family`)."""

    @classmethod
    def from_url(cls, url: str, **options: Any) -> DynamoDBStore:
        """``dynamodb://Table?bucket=B&prefix=P&threshold=350KB&region=R&endpoint_url=U``."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "dynamodb" or not parts.netloc:
            raise ConfigurationError(
                f"expected dynamodb://TABLE?bucket=...&region=..., got {url!r}"
            )
        if parts.path not in ("", "/"):
            raise ConfigurationError(
                f"a dynamodb:// URL names only the table; put the bucket in ?bucket= ({url!r})"
            )
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        check_options("the dynamodb:// store URL", query, _URL_OPTIONS)
        check_options("DynamoDBStore.from_url", options, _KEYWORD_OPTIONS)
        endpoint = AwsEndpoint.from_query(query)
        if "threshold" in query:
            options.setdefault("threshold", parse_size(query["threshold"]))
        if "resend_memos" in query:
            options.setdefault("resend_memos", _flag("resend_memos", query["resend_memos"]))
        options.setdefault("bucket", query.get("bucket") or None)
        options.setdefault("prefix", query.get("prefix", ""))
        options.setdefault("region", endpoint.region)
        options.setdefault("endpoint_url", endpoint.endpoint_url)
        return cls(unquote(parts.netloc), **options)

    # -- clients --------------------------------------------------------------------------

    async def _current(self) -> _Clients:
        """The clients of the running event loop (built on first use in each loop)."""
        if self._given_dynamodb is not None or self._given_s3 is not None:
            self._given_loop.check()
        return await self._clients.get()

    async def _open_clients(self) -> _Clients:
        stack = contextlib.AsyncExitStack()
        try:
            dynamodb = self._given_dynamodb
            if dynamodb is None:
                dynamodb = await open_client(
                    stack, "dynamodb", self._endpoint, self._retry, session=self._session
                )
            s3 = self._given_s3
            if s3 is None and self.bucket is not None:
                s3 = await open_client(
                    stack, "s3", self._endpoint, self._retry, session=self._session
                )
        except BaseException:
            await stack.aclose()
            raise
        blobs = None if s3 is None or self.bucket is None else Bucket(s3, self.bucket, self.prefix)
        memos = self._resend_memos
        if memos is None:
            # Judged by where the client sends its requests (botocore also takes an endpoint
            # from AWS_ENDPOINT_URL or the config file, and a given client has its own).
            url = getattr(getattr(dynamodb, "meta", None), "endpoint_url", None)
            if not isinstance(url, str):
                url = self._endpoint.endpoint_url
            memos = not _on_aws(url)
        return _Clients(dynamodb, s3, stack, blobs, memos)

    async def clients(self) -> tuple[Any, Any]:
        """The DynamoDB and S3 clients of this event loop (S3 is ``None`` without a bucket)."""
        current = await self._current()
        return current.dynamodb, current.s3

    async def _bucket(self) -> Bucket:
        blobs = (await self._current()).blobs
        if blobs is None:
            raise ConfigurationError(
                f"this checkpoint is larger than the store's threshold ({self.threshold} "
                "bytes) and needs S3: add ?bucket=... to the dynamodb:// URL"
            )
        return blobs

    async def aclose(self) -> None:
        self._cache.clear()
        self._expiries.clear()
        self._families.clear()
        await self._clients.aclose()

    # -- provisioning ---------------------------------------------------------------------

    @holds_clients
    async def provision(self) -> list[str]:
        """Create what this store needs, idempotently (``fastcheckpoint init URL``): the table
        (on-demand, the three indexes, TTL on ``ttl``) and, with a bucket, the bucket
        (versioning, AES256 encryption, the lifecycle rule). Existing ones are checked and
        completed, never recreated.

        Returns one line per thing checked: ``"created ..."`` (made now), ``"enabled ..."``
        (a setting switched on now) or ``"found ..."`` (in place already).
        """
        current = await self._current()
        done = await provision_table(current.dynamodb, self.table)
        if self.bucket is not None:
            done += await provision_blob_bucket(current.s3, self.bucket, self.prefix)
        return done

    # -- driver calls ---------------------------------------------------------------------

    async def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        """One request on the table (``TableName`` added), its failure translated."""
        return await self._send(operation, TableName=self.table, **params)

    async def _send(self, operation: str, **params: Any) -> dict[str, Any]:
        client = (await self._current()).dynamodb
        try:
            method = getattr(client, _snake(operation))
            response: dict[str, Any] = await method(**params)
        except (ClientError, BotoCoreError) as exc:
            raise translate(exc, f"DynamoDB {operation} on table {self.table}") from exc
        return response

    async def _conditional(
        self, operation: str, **params: Any
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """A conditional single-item write: ``(response, None)``, or ``(None, current item)``
        when the condition failed (``{}`` unless ``ReturnValuesOnConditionCheckFailure``)."""
        client = (await self._current()).dynamodb
        try:
            method = getattr(client, _snake(operation))
            response: dict[str, Any] = await method(TableName=self.table, **params)
        except ClientError as exc:
            if error_code(exc) == "ConditionalCheckFailedException":
                current: dict[str, Any] = cast(Any, exc.response).get("Item") or {}
                return None, current
            raise translate(exc, f"DynamoDB {operation} on table {self.table}") from exc
        except BotoCoreError as exc:
            raise translate(exc, f"DynamoDB {operation} on table {self.table}") from exc
        return response, None

    async def _transact(self, operations: list[dict[str, Any]]) -> None:
        """One TransactWriteItems. A cancellation by a failed condition raises
        :class:`_Cancelled` (nothing was written; the caller knows what the condition meant).
        One by a concurrent transaction or throttling is retried by the retry policy; any
        other reason (an item too large, a malformed request) is raised at once, as ours."""
        client = (await self._current()).dynamodb
        request = [items_layout.strip_tags(operation) for operation in operations]
        for operation in request:
            next(iter(operation.values()))["TableName"] = self.table
        action = f"DynamoDB TransactWriteItems on table {self.table}"
        for attempt in range(self._retry.max_retries + 1):
            # Set here rather than left to botocore: the same on botocore's resends of this
            # request (AWS answers a resend of a transaction that landed from it, for ten
            # minutes), new for each attempt of ours, whose operations may differ.
            try:
                await client.transact_write_items(
                    TransactItems=request, ClientRequestToken=secrets.token_hex(16))
                return
            except ClientError as exc:
                if error_code(exc) != "TransactionCanceledException":
                    if error_code(exc) == "ValidationException":  # of the whole request
                        await self._damaged_counter(
                            request, range(len(request)), str(exc), exc)
                    raise translate(exc, action) from exc
                reasons = cast(
                    list[dict[str, Any]], list(exc.response.get("CancellationReasons") or [])
                )
                codes = {str(reason.get("Code", "None")) for reason in reasons}
                invalid = [index for index, reason in enumerate(reasons)
                           if reason.get("Code") == "ValidationError"]
                if invalid:  # of an operation: AWS names it
                    await self._damaged_counter(request, invalid, " ".join(
                        str(reasons[index].get("Message", "")) for index in invalid), exc)
                if _CONDITION_FAILED in codes:
                    retried = int(exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0))
                    cancelled = _Cancelled(reasons, retried=retried > 0)
                    cancelled.operations = list(operations)
                    raise cancelled from exc
                if codes - _TRANSIENT_REASONS - {"None"} or attempt == self._retry.max_retries:
                    raise _cancellation_error(reasons, action, attempt) from exc
            except BotoCoreError as exc:
                raise translate(exc, action) from exc
            await anyio.sleep(self._retry.delay(attempt))

    async def _damaged_counter(
        self, request: Sequence[Mapping[str, Any]], suspects: Sequence[int], detail: str,
        exc: ClientError,
    ) -> None:
        """A transaction DynamoDB refused as invalid (so it wrote nothing): a count whose
        ``rc`` has another type (edited by hand) makes its ``ADD`` invalid. Those updated are
        read (only now, after the refusal) and the first one damaged raised as
        :class:`_DamagedCounter`; nothing is raised when none is."""
        keys = [update["Key"] for index in suspects if index < len(request)
                and (update := request[index].get("Update")) is not None
                and str(update["Key"]["SK"].get("S", "")).startswith(layout.COUNTER_PREFIX)]
        if not keys or "data type" not in detail:
            return
        try:
            response = await self._send("BatchGetItem", RequestItems={
                self.table: {"Keys": keys[:100], "ConsistentRead": True}})
        except CheckpointError:
            return  # the refusal is reported as it is
        for count in response.get("Responses", {}).get(self.table, []):
            if "rc" in count and "N" not in count["rc"]:
                pk, sort_key = _text(count, "PK"), _text(count, "SK")
                raise _DamagedCounter(
                    "the count of a shared item has an attribute of another type (rc); "
                    "nothing was written", key=f"dynamodb://{self.table}/{pk}/{sort_key}",
                ) from exc

    async def _commit(
        self, operations: list[dict[str, Any]], *, keep: int, checks_alone: bool = True
    ) -> set[str]:
        """TransactWriteItems; conditional operations from index ``keep`` on whose condition
        fails (an owned item rewritten meanwhile, an item that exists already) are dropped,
        with the others of their ``_group``, and the rest retried (not when only condition
        checks are left and not ``checks_alone``: their answer does not matter to the
        caller); returns the groups dropped. A failed condition before
        ``keep``, or of a ``_fatal`` operation, raises :class:`_Cancelled`. An item put
        refused by a damaged item (see :meth:`_refused_by_damage`) is not: it is sent again
        to replace its record (:func:`_over_damaged`), since a damaged item is not live."""
        operations = list(operations)
        dropped_groups: set[str] = set()
        while operations:
            try:
                await self._transact(operations)
                return dropped_groups
            except _Cancelled as cancelled:
                failed = {index for index in range(len(operations)) if cancelled.failed(index)}
                if not failed or min(failed) < keep:
                    raise
                damaged = await self._refused_by_damage(operations, cancelled, keep)
                for index in damaged:
                    operations[index] = _over_damaged(operations[index], cancelled.item(index))
                failed -= damaged
                if not failed:
                    continue
                if any(operations[index].get("_fatal") for index in failed):
                    raise
                groups = {operations[index].get("_group") for index in failed} - {None}
                dropped_groups.update(str(group) for group in groups)
                dropped = [index in failed or op.get("_group") in groups for index, op
                           in enumerate(operations)]
                # A dropped operation may name what replaces it (see ``counter_raise``).
                operations = [op for op, drop in zip(operations, dropped, strict=True)
                              if not drop] + [op["_instead"] for op, drop
                                              in zip(operations, dropped, strict=True)
                                              if drop and "_instead" in op]
                if not checks_alone and all("ConditionCheck" in op for op in operations):
                    break
        return dropped_groups

    async def _refused_by_damage(
        self, operations: Sequence[Mapping[str, Any]], cancelled: _Cancelled, keep: int
    ) -> set[int]:
        """The item puts (from index ``keep`` on) of a cancelled transaction refused by a
        damaged item: its record, as the refusal returned it (see :func:`_damaged_item`), or
        for a put that keeps a live item (``_absent``) refused by a sound anchor, the value
        that anchor points to, damaged or missing, read now (with the run item, in the same
        request), or an anchor left over by a removal of its owner whose deletes were never
        sent (see :func:`_left_over`): only on this path, where a write met an item already
        there. Such a put replaces the anchor; the value the anchor pointed to stays, no
        longer read, until the run goes."""
        refused = {index: old for index in range(keep, len(operations))
                   if cancelled.failed(index) and (old := cancelled.item(index))
                   and _replaceable(operations[index])}
        damaged = {index for index, old in refused.items() if _damaged_item(old)}
        anchors = {index: old for index, old in refused.items() if index not in damaged
                   and "o" in old and operations[index].get("_absent")}
        if not anchors:
            return damaged
        values = {index: layout.owned_sk(_int(old, "o"), _text(old, "SK")[2:])
                  for index, old in anchors.items()}
        pk = _text(next(iter(anchors.values())), "PK")
        found = await self._batch_get_in(pk, [*values.values(), layout.RUN_SK])
        run = _run_of(found, pk.removeprefix(layout.partition("")))
        return damaged | {index for index, sort_key in values.items()
                          if sort_key not in found or _damaged_item(found[sort_key])
                          or _left_over(run, _int(anchors[index], "o"))}

    async def _query_all(self, **params: Any) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        while True:
            response = await self._call("Query", **params)
            items.extend(response.get("Items", []))
            last = response.get("LastEvaluatedKey")
            if not last:
                return items
            params["ExclusiveStartKey"] = last

    async def _partition(self, run_key: str, *attributes: str) -> list[dict[str, Any]]:
        """Every item of the run's partition (``SK`` and ``attributes`` of each)."""
        names = _Names()
        return await self._query_all(
            KeyConditionExpression=f"{names('PK')} = {names.value(_s(layout.partition(run_key)))}",
            ProjectionExpression=", ".join(names(a) for a in ("SK", *attributes)),
            ConsistentRead=True,
            **names.params(),
        )

    def _where(self, run_key: str, sort_key: str) -> str:
        return f"dynamodb://{self.table}/{layout.partition(run_key)}/{sort_key}"

    # -- run items ------------------------------------------------------------------------

    def _remember(self, run_key: str, state: _RunState | None) -> None:
        self._cache[run_key] = state
        self._cache.move_to_end(run_key)
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)

    async def _raw_run_item(self, run_key: str) -> dict[str, Any] | None:
        response = await self._call(
            "GetItem",
            Key={"PK": _s(layout.partition(run_key)), "SK": _s(layout.RUN_SK)},
            ConsistentRead=True,
        )
        item: dict[str, Any] | None = response.get("Item")
        return item

    async def _read_state(self, run_key: str) -> _RunState | None:
        """The run item, read now; :class:`_DamagedRun` if it cannot be used."""
        item = await self._raw_run_item(run_key)
        if item is None:
            self._remember(run_key, None)
            return None
        try:
            state = _state_of(item, self._where(run_key, layout.RUN_SK), run_key)
        except _DamagedRun:
            self._cache.pop(run_key, None)
            raise
        self._remember(run_key, state)
        return state

    # -- checkpoint log: append -------------------------------------------------------------

    @holds_clients
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
        check_run_key(run_key)
        check_append(run_key, record, run)
        return await self._append_checked(run_key, record, run, keep_latest, now, None)

    @holds_clients
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
        check_run_key(run_key)
        check_append(run_key, record, run, items)
        for item in items:
            _check_item(item)
        return await self._append_checked(run_key, record, run, keep_latest, now, items)

    async def _append_checked(
        self,
        run_key: str,
        record: StoredCheckpoint,
        run: RunRecord,
        keep_latest: int | None,
        now: float,
        items: Sequence[Item] | None,
    ) -> str:
        check_run_key(run_key)
        keep_latest = check_keep_latest(keep_latest)
        token = secrets.token_hex(8)
        item = self._checkpoint_item(run_key, record, token)
        blob: str | None = None
        if item and _item_size(item) > self.threshold:
            blob = layout.blob_key(run_key, run.incarnation, record.sequence, secrets.token_hex(4))
            del item["pl"]
            item["bl"] = _s(blob)
            if _item_size(item) > _MAX_THRESHOLD:
                raise ValidationError(
                    f"checkpoint header is {len(record.header)} bytes (with {len(record.refs)} "
                    "refs): too large for a DynamoDB item even with the payload in S3; keep "
                    "tags and step names small"
                )
        outcome = _Outcome()
        additions = _Additions(with_items=items is not None, refs=Counter(record.refs),
                               nesting=nesting_under(record.refs, items or ()),
                               life=run.incarnation)
        try:
            if blob is not None:
                additions.blobs.append(blob)
                await (await self._bucket()).put(blob, record.payload)
            if items:
                room = _TRANSACTION_BYTES - _item_size(item)
                await self._add_items(run_key, run.incarnation, record, items, token, now,
                                      room, additions)
            if record.refs and item:
                # The refs again, in a record without native TTL: if TTL removes the
                # checkpoint before the store does, its removal still lowers their counts.
                additions.owned.append(items_layout.put_op(
                    items_layout.guard_record(run_key, record.sequence, token, record.refs)))
            status = await self._append(
                run_key, record, item, blob, run, keep_latest, now, token, outcome, additions)
            self._remember_expiry(record.checkpoint_id, record.expires_at)
            owned = tuple(layout.owned_key(sort_key) for op in additions.owned
                          if layout.is_owned_sk(sort_key := op["Put"]["Item"]["SK"]["S"]))
            guard = token if record.refs else None
            self._remember_family(run_key, _Family(
                record.sequence, len(additions.owned) - len(owned), record.checkpoint_id,
                tuple(record.refs), owned, guard))
            return status
        finally:
            if not outcome.committed:
                await self._forget_append(run_key, additions, outcome)

    async def _forget_append(self, run_key: str, additions: _Additions, outcome: _Outcome) -> None:
        """What an append that failed wrote before its transaction: blobs and pinned counts.
        Undone when no transaction of it can have landed; kept when one may have (its reply
        lost, the call cancelled meanwhile), since a committed checkpoint would then need
        them. A blob no record points to is an orphan, which the cleanup loop removes; a
        count left too high keeps a shared item until the run goes. The values of the
        shared items it pinned stay when undone (see :meth:`_undo_additions`)."""
        if outcome.unknown:
            if additions.blobs or additions.pinned:
                logger.warning(
                    "an append failed after sending its transaction, which may have landed; "
                    "keeping its %d S3 blobs and %d raised counts (the cleanup loop removes "
                    "blobs no record points to)", len(additions.blobs), len(additions.pinned),
                )
            return
        await settled(self._undo_additions(run_key, additions))  # both, whatever cancels

    async def _undo_additions(self, run_key: str, additions: _Additions) -> None:
        """Delete the blobs a failed append put and lower the counts its pins raised, but
        not the value of a shared item it pinned: between the pin and the failure, another
        append naming the item may have kept that record (its own put dropped, a live item
        being there), and its checkpoint points to the value. The lowered count puts the
        item in the expiry index, where the cleanup loop removes it with its value once no
        checkpoint names it (in one transaction a raise of the count cancels); a value
        whose put was dropped (another item there already) is an orphan, which the run's
        sweeps take.

        A count is lowered only while it is there and the run item is of the append's life
        and not being removed, checked in the same transaction: a removal of the run
        (``delete_run``, the cleanup loop) deletes the counts with the raises, and a new
        life's count at that key holds none of them. Otherwise the counts are left (a
        first append's, whose life never began, too): too high, they keep an item until
        the run goes, never lose one."""
        kept = {value for key in additions.pinned_shared - additions.pin_dropped
                if isinstance(value := additions.shared[key]["Put"]["Item"].get(
                    "vb", {}).get("S"), str)}
        await self._delete_blobs([blob for blob in additions.blobs if blob not in kept])
        if not additions.pinned:
            return
        lowering = [items_layout.counter_change(run_key, key, -count, existing=True)
                    for key, count in additions.pinned.items()]
        life = _life_check(run_key, additions.life)
        try:
            for chunk in _slices(lowering, _TRANSACTION_LIMIT - 1):
                await self._commit([life, *chunk], keep=1)
        except _Cancelled:
            logger.info("run %s: the life an append raised %d counts in ended before its "
                        "undo; they stay until the run goes", run_key, len(lowering))
        except Exception:
            logger.warning("run %s: could not lower %d counts an append raised before it "
                           "failed; their shared items stay until the run goes", run_key,
                           len(lowering), exc_info=True)

    def _checkpoint_item(
        self, run_key: str, record: StoredCheckpoint, token: str
    ) -> dict[str, Any]:
        if record.sequence < 0 or record.sequence > layout.MAX_SEQUENCE:
            return {}
        item: dict[str, Any] = {
            "PK": _s(layout.partition(run_key)),
            "SK": _s(layout.checkpoint_sk(record.sequence)),
            "cid": _s(record.checkpoint_id),
            "ca": _n(record.created_at),
            "hdr": _b(record.header),
            "pl": _b(record.payload),
            "wt": _s(token),
        }
        if record.refs:
            item["rf"] = _strings(record.refs)
        if record.expires_at is not None:
            item["x"] = _n(record.expires_at)
            item["ttl"] = _n(layout.ttl_of(record.expires_at))
            item["xpk"] = _s(f"x#{layout.shard_of(run_key)}")
            item["xat"] = _n(record.expires_at)
        return item

    async def _add_items(
        self,
        run_key: str,
        incarnation: str,
        record: StoredCheckpoint,
        items: Sequence[Item],
        token: str,
        now: float,
        room: int,
        additions: _Additions,
    ) -> None:
        """The records of an append's items (first of each key wins: an item written once is
        never rewritten), values above the threshold (or beyond what one transaction takes)
        put in S3 first."""
        chosen = list({item.key: item for item in reversed(items)}.values())[::-1]
        sort_keys = [layout.owned_sk(record.sequence, item.key) if item.owner is not None
                     else layout.item_sk(item.key) for item in chosen]
        values = await self._store_values(
            run_key, incarnation, list(zip(sort_keys, (item.value for item in chosen),
                                           strict=True)), room, additions.blobs)
        for item, sort_key in zip(chosen, sort_keys, strict=True):
            value = values[sort_key]
            names = _Names()
            # Only where no live item is: a live one is kept as it is.
            absent = _no_live_item(names, now)
            if item.owner is None:
                record_item = items_layout.plain_record(run_key, item.key, value, None, token)
                # Written by an append (not put_items): a new life's first append replaces it.
                record_item["pa"] = _n(_wall_clock())
                additions.shared[item.key] = items_layout.put_op(
                    record_item, absent, names, _group=items_layout.shared_group(item.key),
                    _absent=True)
                continue
            group = f"owned:{item.key}"
            additions.owned += [
                items_layout.put_op(items_layout.owned_record(
                    run_key, item.key, record.sequence, value, record.expires_at, token),
                    _group=group),
                items_layout.put_op(items_layout.anchor_record(
                    run_key, item.key, record.sequence, record.expires_at, token,
                    indexed=False), absent, names, _group=group, _absent=True),
            ]

    async def _store_values(
        self, run_key: str, incarnation: str | None, values: Sequence[tuple[str, bytes]],
        room: int, written: list[str],
    ) -> dict[str, Value]:
        """Item values by the sort key of their record: inline, or in S3 when the record
        would pass the threshold or, largest first, when together they would pass ``room``
        bytes. Blobs put are added to ``written`` (deleted by the caller on failure). S3
        keys name the writer's life, ``incarnation``, when it knows it: the removal of an
        ended life then takes its values by prefix, and spares those of a new life whose
        first transaction has not landed yet (see :meth:`_sweep_item_blobs`)."""
        sizes = {sort_key: _ITEM_OVERHEAD + 2 * len(sort_key) + len(value)
                 for sort_key, value in values}
        blobbed = {sort_key for sort_key, size in sizes.items() if size > self.threshold}
        total = sum(size for sort_key, size in sizes.items() if sort_key not in blobbed)
        for sort_key in sorted(sizes, key=sizes.__getitem__, reverse=True):
            if total <= room:
                break
            if sort_key not in blobbed:
                blobbed.add(sort_key)
                total -= sizes[sort_key]
        result = {sort_key: Value(inline=value) for sort_key, value in values}
        if not blobbed:
            return result
        bucket = await self._bucket()
        stamp = time.time()  # a physical time: the sweep spares blobs of writes under way
        for sort_key in sorted(blobbed):
            key = layout.item_blob_key(run_key, incarnation, sort_key, stamp,
                                       secrets.token_hex(4))
            written.append(key)
            result[sort_key] = Value(blob=key)
        await gather([functools.partial(bucket.put, result[sort_key].blob or "", value)
                      for sort_key, value in values if sort_key in blobbed])
        return result

    async def _append(
        self,
        run_key: str,
        record: StoredCheckpoint,
        item: dict[str, Any],
        blob: str | None,
        seed: RunRecord,
        keep_latest: int | None,
        now: float,
        token: str,
        outcome: _Outcome,
        additions: _Additions,
    ) -> str:
        known = run_key in self._cache
        state = self._cache.get(run_key)
        fresh = False  # ``state`` was read from the table during this call
        for _ in range(_APPEND_ATTEMPTS):
            if not known and record.sequence != 0:
                state, known, fresh = await self._read_state(run_key), True, True
            if not known or state is None or not state.live(now):
                # A first checkpoint is written blind: the transaction's condition finds out
                # whether a run exists, and its cancellation returns that run item.
                if record.sequence != 0 or not item:
                    if not fresh:
                        state, known, fresh = await self._read_state(run_key), True, True
                        continue
                    raise SequenceConflict(latest_sequence=None, incarnation=None)
                previous = state if known else None
                plan = await self._plan_first(
                    run_key, item, blob, seed, previous, now, token, additions)
            else:
                head = state.record
                if not item or record.sequence != head.latest_sequence + 1 or (
                    seed.incarnation != head.incarnation
                ):
                    if not fresh:
                        state, fresh = await self._read_state(run_key), True
                        continue
                    raise SequenceConflict(
                        latest_sequence=head.latest_sequence, incarnation=head.incarnation
                    )
                plan = await self._plan_next(run_key, item, blob, record, state, keep_latest,
                                             now, token, additions)
            if plan is None or plan.pins:
                if plan is None or not await self._pin(
                    run_key, record.sequence, plan, additions
                ) or plan.purged:
                    # It moved on: planned again from the run item the refusal returned
                    # (of its pins, or of its removal of the ended life: ``None``), which is
                    # not read afresh (``fresh``) though. That refusal is not the append's
                    # own, and the run may have moved on again since (a removal of the life
                    # that refused a first append's pins, before that append plans again):
                    # a conflict is raised only on a run item read after it. Or the plan
                    # removed the ended life whole: planned again over no run item (the
                    # removal dropped the life from the cache).
                    state, known, fresh = self._cache.get(run_key), True, False
                continue  # planned again without what the pins wrote
            outcome.unknown = True
            try:
                # The run item, the checkpoint and the memo if any (indexes 0 to 2) decide.
                await self._commit(plan.operations, keep=2 + _memo_slots(plan.operations[:3]))
            except _DamagedCounter:
                outcome.unknown = False  # refused as invalid: none of it landed
                raise
            except _Cancelled as cancelled:
                if _memoed(cancelled):
                    outcome.unknown = False
                    return await self._landed_before(run_key, plan, cancelled, outcome)
                ours = self._applied(run_key, cancelled, token)
                outcome.unknown = False  # nothing of ours landed, or we know it did
                if ours is not None:
                    plan.state = ours
                    return await self._landed(run_key, plan, outcome)
                refused = _items_refused(run_key, record.sequence, cancelled, additions)
                if refused is not None:  # nothing was written, and the values must be sent
                    raise refused from cancelled  # again in any case
                if cancelled.failed_guard():
                    continue  # items were written to a checkpoint it removes: read them too
                if not cancelled.failed(0):
                    raise self._behind_its_log(run_key, record.sequence) from cancelled
                state = self._state_after(run_key, cancelled)
                known = fresh = True
                continue
            return await self._landed(run_key, plan, outcome)
        raise _conflict_with(state, now)

    async def _pin(
        self, run_key: str, sequence: int, plan: _Plan, additions: _Additions
    ) -> bool:
        """Write the shared items and raise the counts that do not fit in an append's
        transaction, before it: a shared item a checkpoint names must never be swept before
        the checkpoint lands. What landed is remembered, so the append does not write it
        again, and undone if the append fails. An item named without being written that the
        cleanup loop removed meanwhile fails the append (:class:`ConflictError`).

        Each transaction also checks the run item's revision as the plan read it
        (``plan.check``, one operation of the 100): a writer whose run moved on (a new life
        began, a removal fenced it, another append landed) writes nothing, so no write of an
        ended life lands after the transaction that ended it. That check failing returns
        ``False``, the run item it returned remembered: the append plans again from it.

        A run's first append (no run item, ``plan.owner``) also takes the pin record with its
        first pin transaction and checks it with each later one (one operation more each,
        see :func:`_pin_claim`): another first append's pins taking it meanwhile, or a
        removal deleting it, refuse the rest (:class:`SharedItemGone`)."""
        check = [] if plan.check is None else [plan.check]
        limit = _TRANSACTION_LIMIT - len(check) - (plan.owner is not None)
        chunks: list[list[_Early]] = [[]]
        for entry in plan.pins:
            if sum(len(unit.operations) for unit in chunks[-1]) + len(entry.operations) > limit:
                chunks.append([])
            chunks[-1].append(entry)
        for chunk in chunks:
            if not chunk:
                continue
            at = _wall_clock()
            claim = [] if plan.owner is None else [
                _pin_claim(run_key, plan.owner, at, held=additions.claimed)]
            try:
                dropped = await self._commit(
                    [*check, *claim, *(items_layout.pin_stamped(op, at) for entry in chunk
                                       for op in entry.operations)],
                    keep=len(check) + len(claim))
            except _Cancelled as cancelled:
                if check and cancelled.failed(0):  # the run moved on: this chunk landed nothing
                    self._state_after(run_key, cancelled)
                    return False
                if _overtaken(cancelled):
                    raise _overtaken_error(run_key, sequence, additions) from cancelled
                raise _gone_error(run_key, sequence, _gone(cancelled)) from cancelled
            except BaseException:
                # No definite answer (its reply lost, the call cancelled): the chunk may have
                # landed, and another append may name what it put. Its values are kept; its
                # raises are not undone (a count too high keeps an item, never loses one).
                additions.pinned_shared.update(entry.key for entry in chunk if entry.writes)
                raise
            additions.claimed = additions.claimed or bool(claim)
            for entry in chunk:
                if entry.raising:
                    additions.pinned[entry.key] += entry.raising
                if entry.writes:
                    additions.pinned_shared.add(entry.key)
                    if items_layout.shared_group(entry.key) in (dropped or ()):
                        additions.pin_dropped.add(entry.key)
        return True

    async def _landed(self, run_key: str, plan: _Plan, outcome: _Outcome) -> str:
        """An append's transaction landed: what it wrote before (its payload blob, its
        counts) is its own now, whatever stops the clean-up of what it replaced."""
        outcome.committed = True
        return await self._committed(run_key, plan)

    async def _committed(self, run_key: str, plan: _Plan) -> str:
        self._remember(run_key, plan.state)
        await self._finish(run_key, plan)
        return plan.state.record.status

    def _applied(
        self, run_key: str, cancelled: _Cancelled, token: str, *, deleted: bool = False
    ) -> _RunState | None:
        """The run item after a transaction that changed it with ``token``, if the cancelled
        one is its resend, refused because the first send was applied (its reply lost).
        ``deleted``: a ``delete``, whose token the run item also keeps among the latest
        deletes' (``dwt``), so it is recognised after other writes landed in between."""
        old = cancelled.item(0)
        if old is None or not cancelled.failed(0):
            return None
        if old.get("wt") != _s(token) and not (deleted and _s(token) in old.get(
                "dwt", {}).get("L", ())):
            return None
        return _state_of(old, self._where(run_key, layout.RUN_SK), run_key)

    async def _landed_before(
        self, run_key: str, plan: _Plan, cancelled: _Cancelled, outcome: _Outcome
    ) -> str:
        """The append's transaction was refused by its own memo: an earlier send of it landed
        (its reply was lost), and the run may have changed since (other appends, deletes,
        pruning, the run deleted or started over). The append is acknowledged as that send
        would have been; the cache takes the run item the refusal returned. Deletes that did
        not fit in the transaction are done only while the run is still the incarnation it
        pruned (they name sequences, which a new incarnation uses again)."""
        outcome.committed = True
        current: _RunState | None = None
        if cancelled.failed(0):
            with contextlib.suppress(_DamagedRun):  # it is dropped from the cache
                current = self._state_after(run_key, cancelled)
        else:
            self._cache.pop(run_key, None)
        planned = plan.state.record
        if current is None or current.record.incarnation != planned.incarnation:
            plan = dataclasses.replace(plan, overflow=[])
        await self._finish(run_key, plan)
        return planned.status

    def _state_after(self, run_key: str, cancelled: _Cancelled) -> _RunState | None:
        """The run item after a transaction cancelled by the run item's condition: the
        cancellation carries it (none when there is no run item)."""
        old = cancelled.item(0)
        try:
            state = None if old is None else _state_of(
                old, self._where(run_key, layout.RUN_SK), run_key)
        except _DamagedRun:
            self._cache.pop(run_key, None)
            raise
        self._remember(run_key, state)
        return state

    def _remember_returned(self, run_key: str, old: Mapping[str, Any]) -> None:
        """Remember the run item a refused single-item write returned (``{}``: none); a
        damaged one is only dropped from the cache (the next read finds it)."""
        try:
            state = _state_of(old, self._where(run_key, layout.RUN_SK), run_key) if old else None
        except _DamagedRun:
            self._cache.pop(run_key, None)
            return
        self._remember(run_key, state)

    def _behind_its_log(self, run_key: str, sequence: int) -> _DamagedRun:
        """The run item let an append through at a sequence its own incarnation already holds
        (only the checkpoint's condition failed): it is older than its log (put back from a
        copy, say). Overwriting would lose an acknowledged checkpoint: it is damaged."""
        self._cache.pop(run_key, None)
        return _DamagedRun(
            f"it is behind its log: checkpoint {sequence} of its incarnation exists already",
            key=self._where(run_key, layout.RUN_SK),
        )

    async def _plan_first(
        self,
        run_key: str,
        item: dict[str, Any],
        blob: str | None,
        seed: RunRecord,
        previous: _RunState | None,
        now: float,
        token: str,
        additions: _Additions,
    ) -> _Plan | None:
        """Create the run (or replace an expired one, removing its leftovers).

        An ended life is removed whole first, as the cleanup loop removes an expired run
        (marked as being purged, then every record in transactions checking the mark, its S3
        objects, its run item last), and the run created as a new one (written blind), when
        that life is being removed already (``delete_run``'s first transaction or the
        cleanup loop's mark: the removal's later transactions, refused once the new life
        replaced the run item, would leave the rest of it, and the new life's leftovers
        would lower counts the removal had deleted), or when the append is too large for one
        transaction (its pins, written before it while that life's run item stands, would be
        that life's removal's to list and delete). ``None`` when that removal was refused
        (the run item changed since ``previous`` was read, or is gone): the append plans
        again from the run item the refusal returned, which the cache holds."""
        if previous is not None and additions.claimed:
            # Its pins were written with no run item: a run item there now (read again, the
            # one known may be gone) is of a life begun since, whose first append wrote over
            # any item an append wrote, its pins too (one with no pins of its own takes no
            # pin record). Landing over it could name that life's values.
            previous = await self._read_state(run_key)
            if previous is not None:
                raise _overtaken_error(run_key, 0, additions)
        purged = False
        if previous is not None and previous.purging:
            # Marked already: no mark to be refused, the removal is finished (its later
            # transactions refused only once another process finished it, or began a new
            # life, whose run item then refuses this append's pins and transaction).
            await self._purge_whole_run(run_key, previous, now)
            previous, purged = None, True
        expires_at = _number(item, "x")
        book = Book()
        book.add(0, expires_at, _suffix(blob), capacity=self._book_capacity)
        head = msgspec.structs.replace(
            seed,
            latest_sequence=0,
            checkpoint_count=1,
            updated_at=now,
            expires_at=book.expires_at(),
        )
        rev = 0 if previous is None else previous.rev + 1
        label_ttl = _label_ttl(None, book, head.labels)
        state = _nesting_after(_RunState(
            head, rev, book, frozenset(), items_floor=0 if additions.with_items else None,
            label_ttl=label_ttl), additions.nesting)
        names = _Names()
        run_put: dict[str, Any] = {"Item": _run_item(run_key, state, token)}
        if previous is None:
            run_put["ConditionExpression"] = f"attribute_not_exists({names('PK')})"
        else:
            run_put["ConditionExpression"] = _same_life(names, previous)
        run_put["ReturnValuesOnConditionCheckFailure"] = "ALL_OLD"
        run_put.update(names.params())
        labels = items_layout.label_puts(run_key, head, label_ttl)
        memo = await self._memo(run_key, token, 0, head.incarnation, now)
        must = [{"Put": run_put}, _checkpoint_put(run_key, item, head.incarnation), *memo,
                *labels, *additions.owned, *_pins_held(run_key, previous, additions, token)]
        removal = _Removal()
        if previous is not None:
            removal = await self._leftovers(run_key, previous)
            removal.deletes += items_layout.label_deletes(run_key, previous.record,
                                                          sparing=labels)
        must = _spared(removal, must)
        early = self._shared_puts(additions)
        spared = _spared(removal, [entry.operations[0] for entry in early])
        early = [dataclasses.replace(entry, operations=[operation])
                 for entry, operation in zip(early, spared, strict=True)]
        check = _pin_check(run_key, previous)
        plan = _over_appended(
            self._assemble(run_key, must, early, removal, state, additions, [], check), now)
        if previous is not None and plan.pins:
            if not (await self._purge_whole_run(run_key, previous, now))[1]:
                return None  # its mark refused: planned again from the run item it returned
            removed = await self._plan_first(run_key, item, blob, seed, None, now, token,
                                             additions)
            if removed is not None:  # always: over no run item, no removal to be refused
                removed.purged = True
            return removed
        if plan.pins and previous is None and not additions.claimed:
            # Room for the delete of its pin record, which its transaction will carry.
            room: dict[str, Any] = {"ConditionCheck": {}}
            plan = _over_appended(self._assemble(
                run_key, [*must, room], early, removal, state, additions, [], check), now)
            plan.operations.remove(room)
        if previous is not None and previous.record.incarnation != head.incarnation:
            plan.ended = previous.record.incarnation
        plan.purged = purged
        plan.owner = token if previous is None else None
        return plan

    async def _leftovers(self, run_key: str, previous: _RunState) -> _Removal:
        """Removal of an expired run's checkpoints, guards and owned items (and its blobs);
        the counts of the shared items its checkpoints named are lowered.

        Owned items come first, so that they ride in the new run's first transaction;
        checkpoint deletes, which may not fit and run after it, are conditioned on the old
        checkpoint id, and the others on their write token: another process may append to the
        new run meanwhile."""
        names = _Names()
        found = await self._query_all(
            KeyConditionExpression=(
                f"{names('PK')} = {names.value(_s(layout.partition(run_key)))} AND "
                f"{names('SK')} BETWEEN {names.value(_s(layout.CHECKPOINT_PREFIX))} "
                f"AND {names.value(_s(layout.CHECKPOINT_END))}"
            ),
            ProjectionExpression=", ".join(names(a) for a in ("SK", "bl", "cid", "rf", "wt", "vb")),
            ConsistentRead=True,
            **names.params(),
        )
        removal = _Removal(blobs=_blob_keys(run_key, previous, previous.book.blobs))
        pk = layout.partition(run_key)
        ours = f"ck-{run_key}-{previous.record.incarnation}-"
        checkpoints: list[dict[str, Any]] = []
        named: dict[int, tuple[str, ...]] = {}
        for entry in found:
            sort_key = _text(entry, "SK")
            with _malformed(self._where(run_key, sort_key)):  # before anything is written
                for attribute in ("bl", "vb"):
                    if attribute in entry:
                        removal.blobs.append(_text(entry, attribute))
                if layout.is_checkpoint_sk(sort_key):
                    cid = _text(entry, "cid")
                    named[layout.sequence_of(sort_key)] = (
                        _text_list(entry, "rf") if cid.startswith(ours) else ())
                    if sort_key != layout.checkpoint_sk(0):  # overwritten by the new run's first
                        checkpoints.append(_delete_if(pk, sort_key, "cid", cid))
                    continue
                if layout.is_guard_sk(sort_key):  # the refs of a checkpoint native TTL removed
                    named.setdefault(layout.sequence_of(sort_key), _text_list(entry, "rf"))
            token = entry.get("wt", _s(""))
            removal.deletes.append(items_layout.delete_when(pk, sort_key, "wt", token))
            if layout.is_owned_sk(sort_key):
                removal.deletes.append(items_layout.delete_when(
                    pk, layout.item_sk(layout.owned_key(sort_key)), "wt", token))
        removal.deletes += checkpoints
        for refs in named.values():
            removal.refs.update(refs)
        removal.blobs = sorted(set(removal.blobs))
        return removal

    async def _plan_next(
        self,
        run_key: str,
        item: dict[str, Any],
        blob: str | None,
        record: StoredCheckpoint,
        state: _RunState,
        keep_latest: int | None,
        now: float,
        token: str,
        additions: _Additions,
    ) -> _Plan:
        book = state.book.copy()
        wanted = book.wanted(now, keep_latest, coming=1)
        if wanted:
            await self._refill(run_key, state, book, wanted)
        book.add(record.sequence, record.expires_at, _suffix(blob), capacity=self._book_capacity)
        before = book.copy()
        removed = [_held_in(run_key, state, before, s) for s in book.prune(now, keep_latest)]
        put = _checkpoint_put(run_key, item, state.record.incarnation)
        memo = await self._memo(run_key, token, record.sequence, state.record.incarnation, now)
        in_back = book.back is not None and record.sequence >= book.back.start
        floor = state.items_floor
        if additions.with_items and (floor is None or floor > record.sequence):
            floor = record.sequence
        return await self._plan_change(
            run_key, state, book, removed, [put, *memo, *additions.owned], now=now, token=token,
            added=[record.expires_at] if in_back else [], additions=additions,
            items_floor=floor, latest_sequence=record.sequence, updated_at=now,
        )

    async def _memo(
        self, run_key: str, token: str, sequence: int, incarnation: str, now: float
    ) -> list[dict[str, Any]]:
        """The put of an append's memo, where appends write them (see ``resend_memos``)."""
        if not (await self._current()).memos:
            return []
        return [_append_memo(run_key, token, sequence, incarnation, now)]

    async def _plan_change(
        self,
        run_key: str,
        state: _RunState,
        book: Book,
        removed: Sequence[_Held],
        operations: list[dict[str, Any]],
        *,
        now: float,
        token: str,
        added: Sequence[float | None] = (),
        additions: _Additions | None = None,
        items_floor: int | None = None,
        checkpoint_ids: Mapping[int, str] | None = None,
        deleting: bool = False,
        **record_changes: Any,
    ) -> _Plan:
        """The transaction taking the run from ``state`` to ``book`` (already without
        ``removed``): run update first, then ``operations``, then what must land with them
        (label entries' expiry, shared items and raised counts), then the removals' deletes
        and lowered counts. ``added``: expiries of the checkpoints this change puts in the
        back of ``book``. ``checkpoint_ids``: removals conditioned on the checkpoint's id.
        ``deleting``: a ``delete``, whose token the run item also keeps among those of the
        latest deletes (``dwt``)."""
        if book.lowers_latest([held.expires_at for held in removed], now):
            excluded = {held.sequence for held in removed}
            await self._rescan_latest(run_key, state, book, excluded, added)
        sequences = [held.sequence for held in removed]
        floor = state.items_floor if items_floor is None else items_floor
        new_state = _changed(state, book, sequences, floor, **record_changes)
        if additions is not None:
            new_state = _nesting_after(new_state, additions.nesting)
        if deleting:
            tokens = (token, *state.delete_tokens)[:_DELETE_TOKENS]
            new_state = dataclasses.replace(new_state, delete_tokens=tokens)
        update = {"Update": _run_update(run_key, state, new_state, sequences, token,
                                        () if additions is None else additions.nesting)}
        removal = await self._removal(run_key, state, sequences, checkpoint_ids or {})
        if additions is not None and removal.anchors:
            dropped = _one_change_per_anchor(
                removal, additions, {held.sequence: held.expires_at for held in removed}, now)
            operations = [operation for operation in operations
                          if operation.get("_group") not in dropped]
        refreshes = []
        if new_state.label_ttl != state.label_ttl:
            refreshes = items_layout.label_refreshes(run_key, state.record, new_state.label_ttl)
        must = [update, *operations, *removal.targeted, *refreshes]
        early = [] if additions is None else self._shared_puts(additions)
        blobs = [held.blob for held in removed if held.blob is not None]
        return self._assemble(run_key, must, early, removal, new_state, additions, blobs,
                              _pin_check(run_key, state))

    def _shared_puts(self, additions: _Additions) -> list[_Early]:
        return [_Early([operation], key, 0, True) for key, operation in additions.shared.items()
                if key not in additions.pinned_shared]

    def _assemble(
        self,
        run_key: str,
        must: list[dict[str, Any]],
        early: list[_Early],
        removal: _Removal,
        state: _RunState,
        additions: _Additions | None,
        blobs: list[str],
        check: dict[str, Any] | None = None,
    ) -> _Plan:
        """One change as a transaction of at most 100 operations: ``must`` (the run item,
        the checkpoint, the append's memo, its owned items) always in it; shared items and
        raised counts in it if they fit, else written before it (pins; an item's put and its
        count's raise stay together); deletes and lowered counts in it if they fit, else
        right after it (overflow). A raised count is checked not to be condemned unless the
        change writes the item (see ``counter_raise``).

        A count both raised and lowered (a first checkpoint naming a key its run's ended life
        named too) changes by the difference only, and is checked to still hold what the
        change lowers and the pins raised (see :func:`_holding`), in the transaction when it
        fits: a removal of the ended life (``delete_run``, the cleanup loop) that deleted the
        count after it was read cancels the change, which then reads the leftovers again."""
        delta: Counter[str] = Counter()
        named: Counter[str] = Counter()
        pinned: Counter[str] = Counter()
        if additions is not None:
            delta = additions.refs - additions.pinned
            named, pinned = additions.refs, additions.pinned
        delta.subtract(removal.refs)
        lowering: dict[str, dict[str, Any]] = {}
        lowered: list[str] = []
        held: dict[str, list[dict[str, Any]]] = {}
        units = {entry.key: entry for entry in early}
        for key in sorted(delta):
            change = delta[key]
            if change > 0:
                put = units.get(key)
                raise_ = items_layout.counter_raise(run_key, key, change, writing=put is not None)
                units[key] = (_Early([raise_], key, change, False) if put is None else
                              _Early([*put.operations, raise_], key, change, True))
            elif change < 0:
                lowering[key] = items_layout.counter_change(run_key, key, change)
                lowered.append(key)
            if named[key] and removal.refs[key]:
                held[key] = _offset_ops(run_key, key, units[key] if change > 0 else None,
                                        lowering.get(key), removal.refs[key] + pinned[key])
        if len(must) > _TRANSACTION_LIMIT:
            raise ValidationError(
                f"a checkpoint with {len(must) - 2 - _memo_slots(must)} records of its own "
                "(owned items count "
                f"two) does not fit in one DynamoDB transaction ({_TRANSACTION_LIMIT} "
                "operations): append fewer items with it and write the rest with "
                "put_owned_items")
        room = _TRANSACTION_LIMIT - len(must)
        inside: list[dict[str, Any]] = []
        checked: set[str] = set()
        for key, operations in held.items():  # those that do not fit go unchecked
            if len(inside) + len(operations) <= room:
                inside += operations
                checked.add(key)
        pins: list[_Early] = []
        for unit in units.values():
            if unit.key in checked and unit.raising:
                continue  # its raise is checked
            if not pins and len(inside) + len(unit.operations) <= room:
                inside += unit.operations
            else:
                pins.append(unit)
        late = removal.deletes + [op for key, op in lowering.items() if key not in checked]
        rest = room - len(inside)
        return _Plan(
            must + inside + late[:rest],
            state,
            blobs + removal.blobs,
            late[rest:],
            pins=pins,
            check=check,
            lowered=lowered,
        )

    async def _refill(self, run_key: str, state: _RunState, book: Book, wanted: int) -> None:
        """Let the front of ``book`` take in the back's oldest checkpoints, read from their
        items (one Query page per MB of items): at least ``wanted``, up to ``REFILL``."""
        back = book.back
        if back is None:
            return
        room = max(self._book_capacity - book.detail, 0)
        limit = max(wanted, min(layout.REFILL, room))
        latest = state.record.latest_sequence
        ours = f"ck-{run_key}-{state.record.incarnation}-"
        names = _Names()
        params: dict[str, Any] = {
            "KeyConditionExpression": (
                f"{names('PK')} = {names.value(_s(layout.partition(run_key)))} AND "
                f"{names('SK')} BETWEEN {names.value(_s(layout.checkpoint_sk(back.start)))} "
                f"AND {names.value(_s(layout.checkpoint_sk(latest)))}"
            ),
            "ProjectionExpression": ", ".join(names(a) for a in ("SK", "cid", "x", "bl")),
            "ConsistentRead": True,
            "Limit": limit,
            **names.params(),
        }
        entries: list[tuple[int, float | None, str | None]] = []
        while True:
            response = await self._call("Query", **params)
            for found in response.get("Items", []):
                if _text(found, "cid").startswith(ours):
                    blob = _text(found, "bl") or None
                    sequence = layout.sequence_of(_text(found, "SK"))
                    entries.append((sequence, _number(found, "x"), _suffix(blob)))
            last = response.get("LastEvaluatedKey")
            # Up to the latest sequence, the back is all taken in, whatever the page says.
            exhausted = not last or (bool(entries) and entries[-1][0] >= latest)
            if exhausted or len(entries) >= limit:
                book.absorb(entries, exhausted=exhausted)
                return
            params["ExclusiveStartKey"] = last

    async def _rescan_latest(
        self, run_key: str, state: _RunState, book: Book, excluded: set[int],
        added: Sequence[float | None],
    ) -> None:
        """Read the latest expiry of the back again, after one holding it was removed early
        (rare: pruning or deleting the checkpoint that expires last). The table holds the
        back up to the run's latest sequence; ``added`` are the expiries of those this
        change writes, which it does not hold yet."""
        back = book.back
        if back is None:
            return
        ours = f"ck-{run_key}-{state.record.incarnation}-"
        names = _Names()
        found = await self._query_all(
            KeyConditionExpression=(
                f"{names('PK')} = {names.value(_s(layout.partition(run_key)))} AND "
                f"{names('SK')} BETWEEN {names.value(_s(layout.checkpoint_sk(back.start)))} "
                f"AND {names.value(_s(layout.checkpoint_sk(state.record.latest_sequence)))}"
            ),
            ProjectionExpression=", ".join(names(a) for a in ("SK", "cid", "x")),
            ConsistentRead=True,
            **names.params(),
        )
        expiries = [
            at for entry in found
            if _text(entry, "cid").startswith(ours)
            and layout.sequence_of(_text(entry, "SK")) not in excluded
            and (at := _number(entry, "x")) is not None
        ]
        expiries += [at for at in added if at is not None]
        back.latest = max(expiries, default=None)

    async def _removal(
        self, run_key: str, state: _RunState, removed: Sequence[int], ids: Mapping[int, str]
    ) -> _Removal:
        """Deletes of checkpoints and of what they own, found (for those that may own items
        or name shared items) with one Query of their families: the owned values, their
        anchors, their blobs, the guard; and the shared items the checkpoints named, whose
        counts drop. A checkpoint in ``ids`` is deleted only while it has that id."""
        pk = layout.partition(run_key)
        removal = _Removal()
        for sequence in removed:
            if sequence in ids:
                removal.targeted.append(_delete_if(
                    pk, layout.checkpoint_sk(sequence), "cid", ids[sequence], fatal=True))
            else:
                removal.deletes.append(_delete(pk, layout.checkpoint_sk(sequence)))
        owning = sorted(sequence for sequence in set(removed) if state.may_own(sequence))
        if not owning:
            return removal
        names = _Names()
        found = await self._query_all(
            KeyConditionExpression=(
                f"{names('PK')} = {names.value(_s(pk))} AND {names('SK')} BETWEEN "
                f"{names.value(_s(layout.family_prefix(owning[0])))} AND "
                f"{names.value(_s(layout.checkpoint_sk(owning[-1])))}"
            ),
            ProjectionExpression=", ".join(names(a) for a in ("SK", "cid", "rf", "wt", "vb")),
            ConsistentRead=True,
            **names.params(),
        )
        chosen = set(owning)
        guarded: set[int] = set()
        ours = f"ck-{run_key}-{state.record.incarnation}-"
        named: dict[int, tuple[str, ...]] = {}
        for entry in found:
            sort_key = _text(entry, "SK")
            owner = layout.sequence_of(sort_key)
            if owner not in chosen:
                continue
            # A record of the wrong type fails the call before anything is written.
            with _malformed(self._where(run_key, sort_key)):
                if layout.is_checkpoint_sk(sort_key):
                    ours_too = _text(entry, "cid").startswith(ours)
                    named[owner] = _text_list(entry, "rf") if ours_too else ()
                elif layout.is_guard_sk(sort_key):
                    removal.deletes.append(
                        items_layout.guard_delete(pk, owner, _text(entry, "wt")))
                    guarded.add(owner)
                    # Its refs count when native TTL removed the checkpoint first.
                    named.setdefault(owner, _text_list(entry, "rf"))
                elif layout.is_owned_sk(sort_key):
                    key = layout.owned_key(sort_key)
                    anchor = _owned_delete(pk, key, owner)
                    removal.deletes += [_delete(pk, sort_key), anchor]
                    removal.anchors[key] = (owner, anchor)
                    if "vb" in entry:
                        removal.blobs.append(_text(entry, "vb"))
        removal.deletes += [items_layout.guard_check(pk, owner) for owner in owning
                            if owner not in guarded]
        for refs in named.values():
            removal.refs.update(refs)
        return removal

    async def _finish(self, run_key: str, plan: _Plan) -> None:
        """After a commit: deletes that did not fit, then blobs of removed checkpoints, then
        (a new life's first append) the ended life's item values no record points to.

        The append (or delete) has happened; a failure here leaves garbage that the cleanup
        loop removes, so it is logged rather than raised.
        """
        try:
            if plan.overflow:
                await self._guarded_deletes(
                    plan.overflow, life=(run_key, plan.state.record.incarnation))
        except Exception:
            logger.warning(
                "run %s: could not remove %d leftover records after commit; the cleanup loop "
                "will retry", run_key, len(plan.overflow), exc_info=True,
            )
        await self._discard_blobs(plan.removed_blobs)
        if plan.ended is not None:
            await self._sweep_ended_life(run_key, plan.ended)

    async def _sweep_ended_life(self, run_key: str, incarnation: str) -> None:
        """The item values of an ended life that no record points to, once a new life's first
        append landed over it, with no grace: an append naming a shared item already there
        writes its value before its transaction keeps the existing one, and a removal of the
        run within the hour would otherwise spare it for good (it spares other lives' recent
        values, which may be a new life's). No write of the ended life lands after the new
        life's transaction (each is conditioned on the run item's revision, which it
        raised, the pins of an append too large for one transaction too: see :meth:`_pin`),
        so a value written before the sweep that no record points to now is an orphan, and
        no record written later points to it; those a record points to (a shared item the
        new life keeps, or one the cleanup loop removes later with its value) stay. A stale
        writer's value put after the sweep goes with a later sweep, as before. Best effort:
        garbage left on a failure goes with those sweeps too."""
        try:
            await self._sweep_item_blobs(run_key, grace=0.0, life=incarnation)
        except Exception:
            logger.warning(
                "run %s: could not sweep the item values of its ended life %s; a later sweep "
                "of the run removes them", run_key, incarnation, exc_info=True,
            )

    async def _discard_blobs(self, keys: Sequence[str]) -> None:
        """:meth:`_delete_blobs`, to its end whatever cancels the caller."""
        if keys:
            await settled(self._delete_blobs(keys))

    async def _delete_blobs(self, keys: Sequence[str]) -> None:
        """Delete S3 blobs, best effort: a failure is logged, orphans go with the cleanup."""
        if not keys:
            return
        try:
            await (await self._bucket()).delete(list(keys))
        except Exception:
            logger.warning(
                "could not delete %d S3 blobs (first %s); purge_expired removes orphans "
                "when it next visits the run", len(keys), keys[0], exc_info=True,
            )

    async def _guarded_deletes(
        self, deletes: list[dict[str, Any]], *, life: tuple[str, str] | None = None
    ) -> None:
        """Deletes in transactions of up to 100, dropping those whose condition fails (a
        guard among them is moot once its checkpoint is gone).

        ``life``: ``(run key, incarnation)`` of the change whose deletes did not fit in its
        transaction and are sent after its commit. They name records by sequence and key,
        which a new life of the run uses again: each transaction also checks that the run
        item is still of that life and not being removed (one operation of the 100,
        :func:`_life_check`), and once one finds it is not (the run was deleted, or started
        over, or a removal has begun since the commit) none of the rest is sent. What the
        ended life left goes with its removal, or with the new life's first append (its
        leftovers): a lowering sent once a removal had deleted its count would create it
        again, below zero, outliving the run."""
        deletes = [{key: value for key, value in operation.items() if key != "_fatal"}
                   for operation in deletes]
        check = [] if life is None else [_life_check(*life)]
        size = _TRANSACTION_LIMIT - len(check)
        for start in range(0, len(deletes), size):
            try:
                await self._commit([*check, *deletes[start : start + size]], keep=len(check))
            except _Cancelled:
                if life is None:
                    raise
                logger.info("run %s: its life %s ended before the deletes sent after a commit "
                            "of it; %d left to its removal", life[0], life[1],
                            len(deletes) - start)
                return

    # -- checkpoint log: reads ----------------------------------------------------------------

    def _reading(
        self, run_key: str, run_item: Mapping[str, Any] | None, now: float,
        *, include_expired: bool = False,
    ) -> _Reading | None:
        """How to judge the run's checkpoints, from its run item; ``None`` when there is no
        (live) run. A damaged run item hides nothing: each checkpoint is judged by its own
        item, and the run is reported ``"active"``."""
        if run_item is None:
            return None
        try:
            state = _state_of(run_item, self._where(run_key, layout.RUN_SK), run_key)
        except _DamagedRun as damage:
            self._cache.pop(run_key, None)
            logger.warning("%s; reading its checkpoints from their own items", damage)
            return _DAMAGED_READING
        self._remember(run_key, state)
        if state.live(now) or (include_expired and not state.purging):
            return _Reading.of(state)
        return None

    @holds_clients
    async def get(
        self, run_key: str, sequence: int, *, now: float
    ) -> tuple[StoredCheckpoint, str] | None:
        check_time("now", now)
        check_run_key(run_key)
        if check_int("sequence", sequence) < 0 or sequence > layout.MAX_SEQUENCE:
            return None
        return await self._afresh(run_key, lambda: self._get(run_key, sequence, now))

    async def _get(
        self, run_key: str, sequence: int, now: float
    ) -> tuple[StoredCheckpoint, str] | None:
        run_item, item = await self._snapshot(run_key, sequence)
        if not item:
            return None
        reading = self._reading(run_key, run_item, now)
        if reading is None or not reading.accepts(sequence):
            return None
        found = await self._checkpoint(run_key, item, reading, now)
        return None if found is None else (found, reading.status_of(sequence))

    async def _afresh(self, run_key: str, read: Callable[[], Awaitable[_T]]) -> _T:
        """``read``, made again while a record it read was removed before the S3 object it
        names was (:class:`_Superseded`): what another process changed meanwhile is read as
        it is now, never reported as damage."""
        for _ in range(self._retry.max_retries + 1):
            try:
                return await read()
            except _Superseded:
                self._unsure(run_key)
        raise StoreError(
            f"run {run_key}: its records kept being replaced while read; try again")

    async def _replaced(self, run_key: str, sort_key: str, attribute: str, blob: str) -> bool:
        """Whether the record at ``sort_key`` no longer names ``blob`` (in ``attribute``): it
        was removed or written anew after it was read (one consistent GetItem)."""
        response = await self._call(
            "GetItem", Key={"PK": _s(layout.partition(run_key)), "SK": _s(sort_key)},
            ConsistentRead=True, ProjectionExpression="#b",
            ExpressionAttributeNames={"#b": attribute},
        )
        record = response.get("Item")
        return record is None or record.get(attribute) != _s(blob)

    async def _snapshot(
        self, run_key: str, sequence: int
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The run item and checkpoint ``sequence``, in one request and one consistent view."""
        run_item, item = await self._snapshot_of(
            run_key, [layout.RUN_SK, layout.checkpoint_sk(sequence)])
        return run_item, item

    async def _snapshot_of(
        self, run_key: str, sort_keys: Sequence[str]
    ) -> list[dict[str, Any] | None]:
        """Records of the run's partition (``None`` where there is none), in one
        TransactGetItems: one consistent view."""
        client = (await self._current()).dynamodb
        pk = _s(layout.partition(run_key))
        request = [{"Get": {"TableName": self.table, "Key": {"PK": pk, "SK": _s(sort_key)}}}
                   for sort_key in sort_keys]
        action = f"DynamoDB TransactGetItems on {self.table}"
        for attempt in range(self._retry.max_retries + 1):
            try:
                response = await client.transact_get_items(TransactItems=request)
            except ClientError as exc:
                # Cancelled by a transaction writing one of the items: read again.
                if error_code(exc) != "TransactionCanceledException":
                    raise translate(exc, action) from exc
                await anyio.sleep(self._retry.delay(attempt))
                continue
            except BotoCoreError as exc:
                raise translate(exc, action) from exc
            responses = response.get("Responses", [])
            return [responses[index].get("Item") if index < len(responses) else None
                    for index in range(len(sort_keys))]
        raise StoreError(
            f"{action}: kept colliding with concurrent writes of the run; try again"
        )

    async def _checkpoint(
        self, run_key: str, item: Mapping[str, Any], reading: _Reading, now: float
    ) -> StoredCheckpoint | None:
        """A live checkpoint of the run's current incarnation from its item, payload loaded;
        :class:`CorruptCheckpointError` for an item that names another checkpoint."""
        where = self._where(run_key, _text(item, "SK"))
        header = _checkpoint_header(run_key, item, where)
        if reading.incarnation is not None and not header.checkpoint_id.startswith(
            f"ck-{run_key}-{reading.incarnation}-"
        ):
            return None  # a leftover of an earlier incarnation of the run
        if not is_live(header.expires_at, now):
            return None
        with _malformed(where):
            payload = _bytes(item, "pl")
            blob = _text(item, "bl") if "bl" in item else None
            refs = _text_list(item, "rf")
        self._remember_expiry(header.checkpoint_id, header.expires_at)
        if blob is not None:
            fetched = await (await self._bucket()).get(blob)
            if fetched is None:
                if await self._replaced(run_key, _text(item, "SK"), "bl", blob):
                    raise _Superseded
                raise CorruptCheckpointError(
                    f"the payload object s3://{self.bucket}/{self.prefix}{blob} is missing",
                    key=where,
                )
            payload = fetched[0]
        return StoredCheckpoint(
            sequence=header.sequence,
            checkpoint_id=header.checkpoint_id,
            created_at=header.created_at,
            expires_at=header.expires_at,
            header=header.header,
            payload=payload,
            key=where,
            refs=refs,
        )

    @holds_clients
    async def latest(self, run_key: str, *, now: float) -> tuple[StoredCheckpoint, str] | None:
        check_time("now", now)
        check_run_key(run_key)
        return await self._afresh(run_key, lambda: self._latest(run_key, now))

    async def _latest(self, run_key: str, now: float) -> tuple[StoredCheckpoint, str] | None:
        # The run item and the newest checkpoint, one Query: all a restore needs.
        found = await self._read_newest(run_key, None, now, family=False)
        if found is None:
            return None
        item, _, reading = found
        checkpoint = await self._checkpoint(run_key, item, reading, now)
        if checkpoint is None:
            return None
        return checkpoint, self._status_of(run_key, reading, checkpoint.sequence)

    def _status_of(self, run_key: str, reading: _Reading, sequence: int) -> str:
        if reading.book is not None and sequence > reading.latest_sequence:
            logger.warning(
                "the run record %s is behind its log (checkpoint %d above its latest sequence "
                "%d); reporting the run active", self._where(run_key, layout.RUN_SK), sequence,
                reading.latest_sequence,
            )
        return reading.status_of(sequence)

    @holds_clients
    async def headers(
        self,
        run_key: str,
        *,
        before: int | None,
        limit: int,
        now: float,
        include_expired: bool = False,
    ) -> tuple[list[CheckpointHeader], str | None]:
        check_time("now", now)
        check_run_key(run_key)
        check_flag("include_expired", include_expired)
        check_limit("limit", limit)
        if before is not None:
            check_int("before", before)
        pk = layout.partition(run_key)
        top = None if before is None or before > layout.MAX_SEQUENCE else before
        if top is not None and top <= 0:
            reading = self._reading(run_key, await self._raw_run_item(run_key), now,
                                    include_expired=include_expired)
            return [], None if reading is None else reading.status
        names = _Names()
        upper = layout.RUN_SK if top is None else layout.checkpoint_sk(top - 1)
        params: dict[str, Any] = {
            "KeyConditionExpression": (
                f"{names('PK')} = {names.value(_s(pk))} AND {names('SK')} BETWEEN "
                f"{names.value(_s(layout.checkpoint_sk(0)))} AND {names.value(_s(upper))}"
            ),
            "ScanIndexForward": False,
            "ConsistentRead": True,
            "Limit": limit + 1,
            **names.params(),
        }
        if top is None:
            # The payload is left out; the run item comes whole (it is small).
            run_item, found, last = await self._header_pages(params, limit, now,
                                                             include_expired)
        else:
            # The run item sorts above every checkpoint, out of reach of a page below
            # ``before``: it is read beside the Query.
            (_, found, last), run_item = await pair(
                lambda: self._header_pages(params, limit, now, include_expired),
                lambda: self._raw_run_item(run_key),
            )
        reading = self._reading(run_key, run_item, now, include_expired=include_expired)
        if reading is None:
            return [], None
        page, pinned = self._filter_headers(run_key, found, reading, now, include_expired,
                                            limit)
        # A page is short only at the end of the run (callers read it so): candidates left
        # out (damaged, of another incarnation) are made up for from further down.
        while len(page) < limit and last:
            params["ExclusiveStartKey"] = last
            _, found, last = await self._header_pages(params, limit - len(page), now,
                                                      include_expired)
            more, pinned = self._filter_headers(run_key, found, pinned, now, include_expired,
                                                limit - len(page))
            page += more
        return page, reading.status

    async def _header_pages(
        self, params: dict[str, Any], limit: int, now: float, include_expired: bool
    ) -> tuple[dict[str, Any] | None, list[dict[str, Any]], dict[str, Any] | None]:
        """Query pages until ``limit`` candidate headers (or the end): the run item (when
        the range reaches it), the checkpoint items, without their payloads, and the key
        to read on from (``None`` at the end)."""
        names = params.setdefault("ExpressionAttributeNames", {})
        wanted = ("SK", "cid", "ca", "x", "hdr", *_RUN_ATTRIBUTES)
        projection: list[str] = []
        for attribute in wanted:
            placeholder = f"#p{len(projection)}"
            names[placeholder] = attribute
            projection.append(placeholder)
        params["ProjectionExpression"] = ", ".join(projection)
        run_item: dict[str, Any] | None = None
        found: list[dict[str, Any]] = []
        candidates = 0
        while True:
            response = await self._call("Query", **params)
            for item in response.get("Items", []):
                if _text(item, "SK") == layout.RUN_SK:
                    run_item = item
                    continue
                if not layout.is_checkpoint_sk(_text(item, "SK")):
                    continue  # an item a checkpoint owns
                found.append(item)
                if include_expired or is_live(_expiry(item), now):
                    candidates += 1
            last = response.get("LastEvaluatedKey")
            if not last or candidates >= limit:
                return run_item, found, last or None
            params["ExclusiveStartKey"] = last

    def _filter_headers(
        self,
        run_key: str,
        found: list[dict[str, Any]],
        reading: _Reading,
        now: float,
        include_expired: bool,
        limit: int,
    ) -> tuple[list[CheckpointHeader], _Reading]:
        """Up to ``limit`` headers of ``found``, and the reading as the items pinned it."""
        result: list[CheckpointHeader] = []
        for item in found:
            sort_key = _text(item, "SK")
            sequence = layout.sequence_of(sort_key)
            if not reading.accepts(sequence):
                continue
            where = self._where(run_key, sort_key)
            try:
                header = _checkpoint_header(run_key, item, where)
            except CorruptCheckpointError as exc:
                logger.warning("skipping a checkpoint item in a listing: %s", exc)
                continue
            reading = _pinned(reading, item)
            if not header.checkpoint_id.startswith(f"ck-{run_key}-{reading.incarnation}-"):
                continue
            if not include_expired and not is_live(header.expires_at, now):
                continue
            result.append(header)
            if len(result) >= limit:
                break
        return result, reading

    # -- checkpoint log: removal ------------------------------------------------------------

    @holds_clients
    async def delete(self, run_key: str, sequence: int, *, checkpoint_id: str) -> bool:
        check_run_key(run_key)
        check_int("sequence", sequence)
        parsed = _ids.parse_checkpoint_id(cast(str, check_str("checkpoint_id", checkpoint_id)))
        if parsed is None or parsed[0] != run_key or parsed[2] != sequence:
            return False
        state = self._cache.get(run_key) if run_key in self._cache else None
        fresh = False
        token = secrets.token_hex(8)
        for _ in range(_APPEND_ATTEMPTS):
            if state is None and not fresh:
                state, fresh = await self._read_state(run_key), True
            plan = None if state is None else await self._plan_delete(
                run_key, state, sequence, checkpoint_id, parsed[1], token)
            if plan is None:
                if not fresh:
                    state, fresh = await self._read_state(run_key), True
                    continue
                return False
            try:
                await self._commit(plan.operations, keep=2)
            except _Cancelled as cancelled:
                applied = self._applied(run_key, cancelled, token, deleted=True)
                if applied is not None:  # our first send did it; its reply was lost
                    plan.state = applied
                    await self._committed(run_key, plan)
                    return True
                if cancelled.failed(1):
                    return False  # the checkpoint at this sequence has another id
                if cancelled.failed_guard():
                    continue  # items were written to it meanwhile: read them too
                state, fresh = self._state_after(run_key, cancelled), True
                continue
            await self._committed(run_key, plan)
            return True
        raise ConflictError(f"run {run_key}: changed concurrently while deleting; try again")

    async def _plan_delete(
        self, run_key: str, state: _RunState, sequence: int, checkpoint_id: str,
        incarnation: str, token: str,
    ) -> _Plan | None:
        """Remove one held checkpoint (with its owned items) and update the run item, in one
        transaction whose checkpoint delete is conditioned on the id; ``None`` if the run
        does not hold it."""
        record = state.record
        if state.purging or record.incarnation != incarnation:
            return None
        if sequence > record.latest_sequence or not state.book.holds(sequence):
            return None
        book = state.book.copy()
        if book.in_front(sequence):
            removed = _held_in(run_key, state, book, sequence)
            book.remove(sequence)
        else:
            found = await self._back_entries(run_key, state, [sequence])
            if not found:
                return None
            removed = found[0]
            book.remove_back(removed.expires_at)
        return await self._plan_change(
            run_key, state, book, [removed], [], now=float("-inf"), token=token,
            checkpoint_ids={sequence: checkpoint_id}, deleting=True)

    async def _back_entries(
        self, run_key: str, state: _RunState, sequences: Sequence[int]
    ) -> list[_Held]:
        """The back checkpoints at ``sequences`` that this incarnation holds, from their items."""
        ours = f"ck-{run_key}-{state.record.incarnation}-"

        async def entry(sequence: int) -> _Held | None:
            names = _Names()
            response = await self._call(
                "GetItem",
                Key={"PK": _s(layout.partition(run_key)),
                     "SK": _s(layout.checkpoint_sk(sequence))},
                ProjectionExpression=", ".join(names(a) for a in ("cid", "x", "bl")),
                ConsistentRead=True,
                **names.params(),
            )
            item = response.get("Item")
            if not item:
                return None
            with _malformed(self._where(run_key, layout.checkpoint_sk(sequence))):
                checkpoint_id, expires_at = _text(item, "cid"), _number(item, "x")
                blob = _text(item, "bl") or None
            return _Held(sequence, expires_at, blob) if checkpoint_id.startswith(ours) else None

        found = await gather([functools.partial(entry, sequence) for sequence in sequences])
        return [held for held in found if held is not None]

    @holds_clients
    async def delete_run(self, run_key: str) -> int:
        check_run_key(run_key)
        # Many requests: a cancellation waits for them all (settled), so a cancelled call
        # leaves the run whole or gone, never partly deleted; a crash midway leaves its run
        # item (marked as being removed: the run reads as gone), and delete_run again, or a
        # new life's first append, finishes it.
        return await settled(self._delete_run(run_key))

    async def _delete_run(self, run_key: str) -> int:
        pk = layout.partition(run_key)
        found = await self._partition(run_key, "inc", "cid", "rev", "bl", "vb", "o", "pa",
                                      *_RECORD_ATTRIBUTES)
        self._cache.pop(run_key, None)
        self._families.pop(run_key, None)
        keys = [_text(entry, "SK") for entry in found]
        run_item = next((entry for entry in found if _text(entry, "SK") == layout.RUN_SK), None)
        # Every delete is conditioned on the run item this call read: sent again by botocore
        # after a dropped connection, the first send may reach DynamoDB late, after the run
        # was started anew (its keys are the same: checkpoint 0 is checkpoint 0), and must
        # then delete nothing. A transaction takes such a condition; a batch write does not.
        guard = _run_guard(pk, run_item)
        # The first transaction also fences the run (see _run_fence): no write of its life
        # lands after it, and those that landed since the Query are found by a second one.
        fence = (_run_fence(pk, run_item)
                 if run_item is not None and _fenceable(run_item) else None)
        doomed = [key for key in keys if key != layout.RUN_SK]
        spared: set[str] = set()  # values of the records the second Query leaves
        stale_before: float | None = None
        if run_item is None:
            # No life to remove: a shared item or count pinned (``pa``) less than the grace
            # ago may be a new life's first append's, written before its transaction (which
            # checks only that no run item is there): it stays, with its value. The rest go,
            # as with every run: the pins of an append that failed or whose life ended, items
            # of put_items, records of a removed life. Each delete of a pinnable record holds
            # only while it is still pinned that long ago (a pin landing meanwhile restamps it).
            stale_before = _wall_clock() - items_layout.PIN_GRACE_SECONDS
            found = _set_aside(found, _young_pins(found, stale_before), spared)
            doomed = [_text(entry, "SK") for entry in found]
        removed = 0
        while doomed:
            fenced = fence is not None
            groups = _deletes_of(pk, found, doomed, stale_before)
            for chunk in _chunks(groups, _TRANSACTION_LIMIT - 1):
                operations = [operation for group in chunk for operation in group]
                try:
                    # Nothing left to delete (every pin refused): the check alone is not sent.
                    kept = await self._commit([fence or guard, *operations], keep=1,
                                              checks_alone=False)
                except _Cancelled:
                    # The run item is no longer the one read: another process deleted the
                    # run, or started it anew over an expired one (which removed these
                    # leftovers).
                    logger.info("run key %s was deleted or started anew while delete_run "
                                "removed it; the rest is not this call's to remove", run_key)
                    return removed
                fence = None
                removed += _checkpoints_deleted(operations)
                # Pinned anew meanwhile: a first append under way may need them.
                found = _set_aside(found, {key for key in doomed if _shared_key(key) in kept},
                                   spared)
            if not fenced:
                break
            # Writes of the run's life that landed between the Query and the fence (an
            # append, put_owned_items) are not in it. Left behind, their values in S3 would
            # go with the life's prefix (below), and a new life's checkpoint of the same
            # sequence would keep its owned item at their key: they are found now, and no
            # other can land.
            # Not the shared items and counts among them, though: from the fence on, a new
            # life's first append may begin, and one too large for its transaction writes
            # those first (pins, which its transaction does not check again). They stay,
            # with the values they point to (spared below): no record of a new life is lost.
            again = await self._partition(run_key, "inc", "cid", "bl", "vb", "o",
                                          *_RECORD_ATTRIBUTES)
            new = [entry for entry in again
                   if (key := _text(entry, "SK")) not in keys and key != layout.RUN_SK]
            doomed = [_text(entry, "SK") for entry in new if not _pinnable(entry)]
            spared.update(_values_of(entry for entry in new if _pinnable(entry)))
            found += [entry for entry in new if _text(entry, "SK") in doomed]
            keys += [_text(entry, "SK") for entry in new]
        # Then the label entries and the blobs of the incarnations listed, then the run item:
        # until it is gone, a retry after a crash finds its incarnation, its labels, its
        # blobs.
        if run_item is not None and _record_problem(run_item) is None:
            await self._guarded_deletes(
                items_layout.label_deletes(run_key, _record_of(run_item)))
        if self.bucket is not None:
            lives = [f"{run_key}/{incarnation}/"
                     for incarnation in sorted(_incarnations(run_key, found))]
            for prefix in lives:
                await self._discard_prefix(prefix, spared.__contains__ if spared else None)
            if pointed := _pointed_to(run_key, found, lives):
                await (await self._bucket()).delete(pointed)  # raised: a retry finds them
            await self._sweep_item_blobs(run_key, grace=0.0)
        if run_item is not None:
            # Conditioned like the records: a late first send must spare a newer run item,
            # and a refused resend of a delete that landed is this call's own.
            check = guard["ConditionCheck"]
            await self._conditional(
                "DeleteItem", Key=check["Key"], ConditionExpression=check["ConditionExpression"],
                ExpressionAttributeNames=check["ExpressionAttributeNames"],
                **({"ExpressionAttributeValues": check["ExpressionAttributeValues"]}
                   if "ExpressionAttributeValues" in check else {}))
        self._cache.pop(run_key, None)
        return removed

    async def _discard_prefix(self, prefix: str, keep: Callable[[str], bool] | None = None) -> int:
        """Delete the blobs under ``prefix`` (except those ``keep`` spares); returns how many."""
        blobs = await self._bucket()
        listed = await blobs.list(prefix)
        doomed = [entry.key for entry in listed if keep is None or not keep(entry.key)]
        if doomed:
            await blobs.delete(doomed)
        return len(doomed)

    async def _batch_write(self, requests: list[dict[str, Any]]) -> None:
        """BatchWriteItem in chunks of 25, resending what DynamoDB left unprocessed."""
        for start in range(0, len(requests), _BATCH_WRITE_LIMIT):
            chunk = requests[start : start + _BATCH_WRITE_LIMIT]
            for attempt in range(self._retry.max_retries + 1):
                response = await self._send("BatchWriteItem", RequestItems={self.table: chunk})
                chunk = response.get("UnprocessedItems", {}).get(self.table, [])
                if not chunk:
                    break
                await anyio.sleep(self._retry.delay(attempt))
            else:
                raise StoreUnavailableError(
                    f"DynamoDB BatchWriteItem on table {self.table}: {len(chunk)} writes still "
                    "unprocessed after retries; the table is throttling, raise its capacity"
                )

    # -- runs -----------------------------------------------------------------------------

    @holds_clients
    async def get_run(self, run_key: str, *, now: float) -> RunRecord | None:
        check_time("now", now)
        check_run_key(run_key)
        state = await self._read_state(run_key)
        return state.record if state is not None and state.live(now) else None

    @holds_clients
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
        check_run_key(run_key)
        status = cast(str, check_utf8("status", status))
        incarnation = cast(str, check_str("incarnation", incarnation))
        check_int("version", version)
        check_bytes("data", data)
        if not isinstance(status, str) or not status or "#" in status:
            raise ValidationError(
                f"run status must be a non-empty string without '#': {shown(status)}")
        guard = check_guard_arg(latest_sequence)
        names = _Names()
        shard = layout.shard_of(run_key)
        condition = (
            f"{names('inc')} = {names.value(_s(incarnation))} AND "
            f"{names('ver')} = {names.value(_n(version))} AND "
            f"attribute_not_exists({names('pg')}) AND "
            f"(attribute_not_exists({names('exp')}) OR {names('exp')} > {names.value(_n(now))})"
        )
        if guard is not None:
            # Every append moves ``ls`` in its transaction, conditioned on the run item's
            # revision: the run item is the authority for the newest sequence.
            condition += f" AND {names('ls')} = {names.value(_n(guard))}"
        token = secrets.token_hex(8)
        # ``wt`` is left to the creates, appends and deletes: a delete whose reply was lost
        # recognises its resend by it (it has no other), also after this change.
        update = (
            f"SET {names('st')} = {names.value(_s(status))}, "
            f"{names('dat')} = {names.value(_b(data))}, "
            f"{names('ver')} = {names.value(_n(version + 1))}, "
            f"{names('ua')} = {names.value(_n(now))}, "
            f"{names('uwt')} = {names.value(_s(token))}, "
            f"{names('gst')} = {names.value(_s(f'{status}#{shard}'))} "
            f"ADD {names('rev')} {names.value(_n(1))}"
        )
        where = self._where(run_key, layout.RUN_SK)
        response, old = await self._conditional(
            "UpdateItem",
            Key={"PK": _s(layout.partition(run_key)), "SK": _s(layout.RUN_SK)},
            UpdateExpression=update,
            ConditionExpression=condition,
            ReturnValues="ALL_NEW",
            ReturnValuesOnConditionCheckFailure="ALL_OLD",
            **names.params(),
        )
        if response is None:
            try:
                state = None if not old else _state_of(old, where, run_key)
            except _DamagedRun:
                self._cache.pop(run_key, None)
                raise
            self._remember(run_key, state)
            if state is not None and old is not None and old.get("uwt") == _s(token):
                # A resend of this very change: the first was applied. ``uwt`` and not
                # ``wt``, which an append landing in between rewrites.
                return state.record
            if state is None or not state.live(now):
                raise CheckpointNotFound(f"no live run with key {run_key}")
            if (state.record.incarnation, state.record.version) == (incarnation, version):
                check_head(run_key, state.record.latest_sequence, guard)
            raise ConflictError(
                f"run changed concurrently (now {state.record.incarnation}/"
                f"{state.record.version}, expected {incarnation}/{version})"
            )
        try:
            state = _state_of(response["Attributes"], where, run_key)
        except _DamagedRun:
            # Only the bookkeeping is damaged (the record matched): the status change stands.
            self._cache.pop(run_key, None)
            return _record_of(response["Attributes"])
        self._remember(run_key, state)
        return state.record

    @holds_clients
    async def list_runs(
        self, *, status: str | None, limit: int, cursor: str | None, now: float
    ) -> tuple[list[RunRecord], str | None]:
        check_time("now", now)
        status = check_utf8("status", status, optional=True)
        cursor = check_str("cursor", cursor, optional=True)
        if cursor is not None and not _CURSOR.fullmatch(cursor):
            raise ValidationError(f"malformed run listing cursor {shown(cursor)}")
        if check_limit("limit", limit) < 1:
            return [], cursor
        return await self._list_runs(status, limit, cursor, now)

    async def _list_runs(
        self, status: str | None, limit: int, cursor: str | None, now: float
    ) -> tuple[list[RunRecord], str | None]:
        """A page of runs. A page is short only at the end (callers read it so): damaged
        records left out are made up for from past the last one read."""
        records: list[RunRecord] = []
        while True:
            found, cursor = await self._run_page(status, limit - len(records), cursor, now)
            records += found
            if cursor is None or len(records) >= limit:
                return records, cursor

    async def _run_page(
        self, status: str | None, limit: int, cursor: str | None, now: float
    ) -> tuple[list[RunRecord], str | None]:
        """One round of the shards' queries: the runs listed (damaged ones left out) and the
        cursor past the last entry read."""
        async def shard_page(shard: int) -> tuple[list[dict[str, Any]], bool]:
            names = _Names()
            index, key, value = self._run_index(status, shard)
            condition = f"{names(key)} = {names.value(_s(value))}"
            if cursor is not None:
                condition += f" AND {names('gord')} < {names.value(_s(cursor))}"
            params: dict[str, Any] = {
                "IndexName": index,
                "KeyConditionExpression": condition,
                "FilterExpression": _live_filter(names, now),
                "ScanIndexForward": False,
                "Limit": limit,
            }
            found: list[dict[str, Any]] = []
            while True:
                response = await self._call("Query", **params, **names.params())
                found += response.get("Items", [])
                last = response.get("LastEvaluatedKey")
                if not last or len(found) >= limit:
                    return found[:limit], bool(last) or len(found) > limit
                params["ExclusiveStartKey"] = last

        pages = await gather([functools.partial(shard_page, shard) for shard in _shards()])
        merged = sorted(
            (item for items, _ in pages for item in items),
            key=lambda item: _text(item, "gord"),
            reverse=True,
        )
        more = len(merged) > limit or any(truncated for _, truncated in pages)
        chosen = merged[:limit]
        records = [record for item in chosen if (record := self._listed(item)) is not None]
        return records, _text(chosen[-1], "gord") if chosen and more else None

    def _listed(self, entry: Mapping[str, Any]) -> RunRecord | None:
        """The run record an index entry shows, or ``None`` (logged) for a damaged one."""
        problem = _record_problem(entry)
        if problem is None:
            return _record_of(entry)
        where = self._where(_text(entry, "PK").removeprefix("run#"), layout.RUN_SK)
        logger.warning("skipping the run record %s in a run listing: %s", where, problem)
        return None

    def _run_index(self, status: str | None, shard: int) -> tuple[str, str, str]:
        if status is None:
            return layout.BY_CREATED, "gall", f"runs#{shard}"
        return layout.BY_STATUS, "gst", f"{status}#{shard}"

    @holds_clients
    async def count_runs(self, *, status: str | None, now: float) -> int:
        check_time("now", now)
        async def shard_count(shard: int) -> int:
            names = _Names()
            index, key, value = self._run_index(status, shard)
            params: dict[str, Any] = {
                "IndexName": index,
                "KeyConditionExpression": f"{names(key)} = {names.value(_s(value))}",
                "FilterExpression": _live_filter(names, now),
                # The record attributes, not a bare count: a damaged record is not counted.
                "ProjectionExpression": ", ".join(names(a) for a in _COUNTED_ATTRIBUTES),
            }
            total = 0
            while True:
                response = await self._call("Query", **params, **names.params())
                total += sum(1 for item in response.get("Items", []) if self._listed(item))
                last = response.get("LastEvaluatedKey")
                if not last:
                    return total
                params["ExclusiveStartKey"] = last

        return sum(await gather([functools.partial(shard_count, shard) for shard in _shards()]))

    # -- items ----------------------------------------------------------------------------

    @holds_clients
    async def put_items(
        self, run_key: str, items: Sequence[Item], *, create_only: bool = False, now: float
    ) -> None:
        check_time("now", now)
        check_run_key(run_key)
        check_items(items)
        for item in items:
            _check_item(item)
        if not items:
            return
        chosen = list({item.key: item for item in items}.values())  # the last write of a key
        owners = sorted({item.owner for item in chosen if item.owner is not None})
        if owners:
            self._unsure(run_key)
            await self._add_owners(run_key, owners)
        token = secrets.token_hex(8)
        written: list[str] = []
        sort_keys = [layout.item_sk(item.key) if item.owner is None
                     else layout.owned_sk(item.owner, item.key) for item in chosen]
        try:
            # No life: the items of a run are not tied to one, and learning the run's
            # would cost a read (see _sweep_item_blobs for how such values are swept).
            values = await self._store_values(
                run_key, None,
                list(zip(sort_keys, (item.value for item in chosen), strict=True)),
                _TRANSACTION_BYTES, written)
            groups = [_put_group(run_key, item, values[sort_key], token, now, create_only)
                      for item, sort_key in zip(chosen, sort_keys, strict=True)]
            await self._write_groups(run_key, groups, token, create_only=create_only, checks=[])
        except _NothingWritten:
            await self._discard_blobs(written)
            raise
        except BaseException:
            # Chunks sent may have landed (their replies lost): their blobs stay; the cleanup
            # loop removes those no item points to.
            raise

    async def _add_owners(self, run_key: str, owners: list[int]) -> None:
        """Record on the run item which checkpoints own items, before writing the items, so
        an append pruning one of them learns it (its transaction checks ``own``). Owners
        below the run item's floor (``ofl``) count as owning already and are not listed."""
        while owners:
            names = _Names()
            owned = {"NS": [str(owner) for owner in owners]}
            response, old = await self._conditional(
                "UpdateItem",
                Key={"PK": _s(layout.partition(run_key)), "SK": _s(layout.RUN_SK)},
                UpdateExpression=f"ADD {names('own')} {names.value(owned)}",
                ConditionExpression=(
                    f"attribute_exists({names('PK')}) AND (attribute_not_exists({names('ofl')})"
                    f" OR {names('ofl')} <= {names.value(_n(owners[0]))})"
                ),
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
                **names.params(),
            )
            if response is not None:
                break
            if not old:
                return  # no run item yet: its items are removed with the run instead
            try:
                floor = _int(old, "ofl")
            except (KeyError, TypeError, ValueError):
                return  # a damaged run item: its rebuild finds the owners from the items
            owners = [owner for owner in owners if owner >= floor]
        cached = self._cache.get(run_key)
        if cached is not None and owners:
            self._remember(run_key, _replace_owners(cached, cached.owners | set(owners)))

    async def _write_groups(
        self,
        run_key: str,
        groups: list[list[dict[str, Any]]],
        token: str,
        *,
        create_only: bool,
        checks: list[dict[str, Any]],
    ) -> bool:
        """Write groups of records (an item: its value, or its owned value and anchor) in
        transactions of up to 100 operations, each beginning with ``checks`` (conditions on
        the owner; ``False`` when one fails: nothing more is written).

        A put refused because a live item is at its key: with ``create_only``, a
        :class:`ConflictError` after undoing the chunks written (:class:`_NothingWritten`);
        an insert-if-absent put (``_group`` tagged ``absent``) is dropped with its group;
        any other is an item owned by another checkpoint, whose value is then deleted with
        the write. A refusal by records carrying ``token`` is this very write, resent after
        its reply was lost: it landed."""
        done: list[list[dict[str, Any]]] = []
        for chunk in _chunks(groups, _TRANSACTION_LIMIT - len(checks)):
            operations = [*checks, *(op for group in chunk for op in group)]
            for _ in range(_APPEND_ATTEMPTS):
                try:
                    await self._commit(operations, keep=len(checks))
                    break
                except _Cancelled as cancelled:
                    if any(cancelled.failed(index) for index in range(len(checks))):
                        return False
                    if _resent(cancelled, token):
                        break
                    if create_only:
                        await self._undo_puts(run_key, done)
                        raise _NothingWritten(_taken(cancelled)) from cancelled
                    operations = _moved_from_other_owners(run_key, cancelled)
            else:
                raise ConflictError(f"run {run_key}: items kept changing while written; retry")
            done.append(operations)
        return True

    async def _undo_puts(self, run_key: str, done: Sequence[Sequence[dict[str, Any]]]) -> None:
        """Take back the records a create-only write put before a later chunk was refused:
        each only while it holds this write's token. A first send delivered late (after its
        retry was answered and the caller wrote a key again) then leaves the newer record."""
        pk = layout.partition(run_key)
        deletes = []
        for operations in done:
            for operation in operations:
                record = operation.get("Put", {}).get("Item")
                if record is None:
                    continue
                sort_key = _text(record, "SK")
                deletes.append(items_layout.delete_when(pk, sort_key, "wt", record["wt"])
                               if "wt" in record else items_layout.delete_op(pk, sort_key))
        await self._guarded_deletes(deletes)

    @holds_clients
    async def get_items(
        self, run_key: str, keys: Sequence[str], *, now: float
    ) -> dict[str, bytes]:
        check_time("now", now)
        check_run_key(run_key)
        wanted = [key for key in dict.fromkeys(check_keys(keys)) if _may_be_item_key(key)]

        async def read() -> dict[str, bytes]:
            return await self._values_of(run_key, await self._live_items(run_key, wanted, now))

        return await self._afresh(run_key, read)

    async def _live_items(
        self, run_key: str, keys: Sequence[str], now: float
    ) -> dict[str, dict[str, Any]]:
        """The live records holding the values of items (an owned item's value next to its
        owner, found through its anchor: a second BatchGetItem), by key."""
        found = await self._batch_get(run_key, [layout.item_sk(key) for key in keys])
        return await self._follow_anchors(run_key, {
            key: record for key in keys
            if (record := found.get(layout.item_sk(key))) is not None
            and self._item_live(run_key, record, now)
        }, now)

    def _item_live(
        self, run_key: str, record: Mapping[str, Any], now: float, *, skip: bool = False
    ) -> bool:
        """Whether an item's record is live. A malformed expiry is a damaged record:
        :class:`CorruptCheckpointError` naming it, or (``skip``: a listing) logged and
        passed over."""
        try:
            with _malformed(self._where(run_key, _text(record, "SK"))):
                return is_live(_number(record, "x"), now)
        except CorruptCheckpointError as exc:
            _skip_damaged(exc, skip)
            return False

    async def _follow_anchors(
        self, run_key: str, records: dict[str, dict[str, Any]], now: float, *,
        skip: bool = False,
    ) -> dict[str, dict[str, Any]]:
        """The records holding the values: an anchor's owned value in its place (a second
        BatchGetItem); one whose owner is malformed raises, or with ``skip`` is left out."""
        anchors: dict[str, str] = {}
        result: dict[str, dict[str, Any]] = {}
        for key, record in records.items():
            if "o" not in record:
                result[key] = record
                continue
            try:
                with _malformed(self._where(run_key, _text(record, "SK"))):
                    anchors[layout.owned_sk(_int(record, "o"), key)] = key
            except CorruptCheckpointError as exc:
                _skip_damaged(exc, skip)
        if not anchors:
            return {key: result[key] for key in records if key in result}
        # The run item rides in the same request: it tells the anchors whose owner was
        # removed, their deletes never sent (see _left_over), which are not live.
        values = await self._batch_get(run_key, [*anchors, layout.RUN_SK])
        run = _run_of(values, run_key)
        for sort_key, key in anchors.items():
            value = values.get(sort_key)
            if value is not None and self._item_live(run_key, value, now, skip=skip) and (
                not _left_over(run, layout.sequence_of(sort_key))
            ):
                result[key] = value
        return {key: result[key] for key in records if key in result}

    async def _batch_get(self, run_key: str, sort_keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Records of the run's partition by sort key: one BatchGetItem per 100, together."""
        return await self._batch_get_in(layout.partition(run_key), sort_keys)

    async def _batch_get_in(
        self, partition: str, sort_keys: Sequence[str], attributes: Sequence[str] = ()
    ) -> dict[str, dict[str, Any]]:
        """``attributes``: only those (with ``PK`` and ``SK``) of each record; all when none."""
        pk = _s(partition)
        names = _Names()
        projection = ({"ProjectionExpression": ", ".join(names(a) for a in
                                                         ("PK", "SK", *attributes)),
                       "ExpressionAttributeNames": names.params()["ExpressionAttributeNames"]}
                      if attributes else {})

        async def chunk(keys: Sequence[str]) -> list[dict[str, Any]]:
            request: dict[str, Any] = {self.table: {
                "Keys": [{"PK": pk, "SK": _s(key)} for key in keys], "ConsistentRead": True,
                **projection}}
            found: list[dict[str, Any]] = []
            for attempt in range(self._retry.max_retries + 2):
                response = await self._send("BatchGetItem", RequestItems=request)
                found += response.get("Responses", {}).get(self.table, [])
                request = response.get("UnprocessedKeys") or {}
                if not request:
                    return found
                await anyio.sleep(self._retry.delay(attempt))
            raise StoreUnavailableError(
                f"DynamoDB BatchGetItem on table {self.table}: keys still unprocessed after "
                "retries; the table is throttling, raise its capacity"
            )

        unique = list(dict.fromkeys(sort_keys))
        pages = await gather([functools.partial(chunk, unique[start : start + _BATCH_GET_LIMIT])
                              for start in range(0, len(unique), _BATCH_GET_LIMIT)])
        return {_text(record, "SK"): record for page in pages for record in page}

    async def _values_of(
        self, run_key: str, records: Mapping[str, Mapping[str, Any]], *, skip: bool = False
    ) -> dict[str, bytes]:
        """The values records hold, by key: inline, or read from S3 (together). A record
        holding no readable value (an attribute of another type, none at all, a missing
        object) raises :class:`CorruptCheckpointError` naming it, or with ``skip`` (a listing)
        is logged and left out."""
        result: dict[str, bytes] = {}
        blobbed: list[tuple[str, str, str]] = []
        for key, record in records.items():
            sort_key = _text(record, "SK")
            where = self._where(run_key, sort_key)
            try:
                with _malformed(where):
                    if "vb" in record:
                        blobbed.append((key, _text(record, "vb"), sort_key))
                    elif "v" in record:
                        result[key] = _bytes(record, "v")
                    else:
                        raise CorruptCheckpointError("the item holds no value", key=where)
            except CorruptCheckpointError as exc:
                _skip_damaged(exc, skip)
        if blobbed:
            bucket = await self._bucket()
            fetched = await gather([functools.partial(bucket.get, blob)
                                    for _, blob, _ in blobbed])
            for (key, blob, sort_key), got in zip(blobbed, fetched, strict=True):
                if got is not None:
                    result[key] = got[0]
                    continue
                if await self._replaced(run_key, sort_key, "vb", blob):
                    if skip:
                        continue  # gone from the listing too
                    raise _Superseded
                _skip_damaged(CorruptCheckpointError(
                    f"the value object s3://{self.bucket}/{self.prefix}{blob} is missing",
                    key=self._where(run_key, sort_key),
                ), skip)
        return {key: result[key] for key in records if key in result}

    @holds_clients
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
        check_time("now", now)
        check_run_key(run_key)
        check_flag("reverse", reverse)
        prefix = cast(str, check_utf8("prefix", prefix))
        start_after = check_utf8("start_after", start_after, optional=True)
        if check_limit("limit", limit) < 1:
            return []
        low = layout.item_sk(prefix)
        end = prefix_end(prefix)
        high = layout.ITEM_END if end is None else layout.item_sk(end)
        if start_after is not None and not reverse:
            low = max(low, layout.item_sk(start_after + "\x00"))  # smallest key after it
        elif start_after is not None:
            high = min(high, layout.item_sk(start_after))
        if low >= high:
            return []
        names = _Names()
        params: dict[str, Any] = {
            "KeyConditionExpression": (
                f"{names('PK')} = {names.value(_s(layout.partition(run_key)))} AND "
                f"{names('SK')} BETWEEN {names.value(_s(low))} AND {names.value(_s(high))}"
            ),
            "ScanIndexForward": not reverse,
            "ConsistentRead": True,
            "Limit": limit + 1,
            **names.params(),
        }
        pk = _s(layout.partition(run_key))
        values: dict[str, bytes] = {}
        ended = False
        # A page is short only at the end (callers read it so): records left out once read
        # (a dangling anchor, a damaged value) are made up for from past the last one read.
        while not ended and len(values) < limit:
            wanted = limit - len(values)
            params["Limit"] = wanted + 1
            found: dict[str, dict[str, Any]] = {}
            while len(found) < wanted:
                response = await self._call("Query", **params)
                items = response.get("Items", [])
                last = response.get("LastEvaluatedKey")
                for index, item in enumerate(items):
                    sort_key = _text(item, "SK")
                    params["ExclusiveStartKey"] = {"PK": pk, "SK": _s(sort_key)}
                    # BETWEEN includes ``high``, which is exclusive here.
                    if sort_key != high and self._item_live(run_key, item, now, skip=True):
                        found[sort_key[2:]] = item
                        if len(found) >= wanted:
                            ended = index + 1 == len(items) and not last
                            break
                else:
                    if not last:
                        ended = True
                        break
                    params["ExclusiveStartKey"] = last
            if not found:
                break
            values.update(await self._values_of(
                run_key, await self._follow_anchors(run_key, found, now, skip=True),
                skip=True))
        return list(values.items())

    @holds_clients
    async def delete_items(self, run_key: str, keys: Sequence[str]) -> int:
        check_run_key(run_key)
        pk = layout.partition(run_key)
        self._unsure(run_key)
        unique = [key for key in dict.fromkeys(check_keys(keys)) if _may_be_item_key(key)]
        if not unique:
            return 0
        # Each delete is conditioned on the write it read (its token): sent again by botocore
        # after a dropped connection, the first send may reach DynamoDB late, after the key
        # was written anew, and must then spare the new value.
        held = await self._batch_get_in(pk, [layout.item_sk(key) for key in unique], ("wt",))

        async def delete_one(key: str) -> int | CorruptCheckpointError:
            # The record goes only if what its removal decodes (its owner, its blob's
            # name) has the right type: a damaged one stays as it is, reported.
            record = held.get(layout.item_sk(key))
            if record is None:
                return 0
            names = _Names()
            written = (f"{names('wt')} = {names.value(record['wt'])}" if "wt" in record else
                       f"attribute_exists({names('PK')}) AND attribute_not_exists({names('wt')})")
            where = self._where(run_key, layout.item_sk(key))
            try:
                response = await self._call(
                    "DeleteItem",
                    Key={"PK": _s(pk), "SK": _s(layout.item_sk(key))},
                    ConditionExpression=(
                        f"{written} AND "
                        f"(attribute_not_exists({names('o')}) OR "
                        f"attribute_type({names('o')}, {names.value(_s('N'))})) AND "
                        f"(attribute_not_exists({names('vb')}) OR "
                        f"attribute_type({names('vb')}, {names.value(_s('S'))}))"),
                    ReturnValues="ALL_OLD",
                    ReturnValuesOnConditionCheckFailure="ALL_OLD",
                    **names.params(),
                )
            except StoreError as exc:
                if exc.__cause__ is None or (
                        error_code(exc.__cause__) != "ConditionalCheckFailedException"):
                    raise
                current = cast(Any, exc.__cause__).response.get("Item")
                if not current or current.get("wt") != record.get("wt"):
                    return 0  # removed or written anew since it was read: not this call's
                return CorruptCheckpointError(
                    "the item has a malformed attribute (its owner or the name of its value "
                    "object has another type); it was left as it is", key=where)
            old = response.get("Attributes")
            if not old:
                return 0
            try:
                with _malformed(where):  # a number that is no integer passes the condition
                    _int(old, "o")
            except CorruptCheckpointError as exc:
                await self._put_back(old, where)
                return exc
            try:
                await self._release_item(pk, key, old, where)
            except CorruptCheckpointError as exc:
                return exc
            return 1

        # Two requests per item (its record, then its owned value): a cancellation waits for
        # them all (settled), never leaving an owned value that reads return without its item.
        # A damaged item fails its own delete only, reported once all have ended.
        outcomes = await settled(gather([functools.partial(delete_one, key) for key in unique]))
        for outcome in outcomes:
            if isinstance(outcome, CorruptCheckpointError):
                raise outcome
        return sum(cast(list[int], outcomes))

    async def _put_back(self, old: dict[str, Any], where: str) -> None:
        """Write back an item record deleted before its owner was found damaged (no condition
        can tell a number that is no integer), unless the key was written again meanwhile:
        the record and its owned value are left as they were."""
        names = _Names()
        _, refused = await self._conditional(
            "PutItem", Item=old, ConditionExpression=f"attribute_not_exists({names('PK')})",
            **names.params())
        if refused is not None:
            logger.warning("%s: a damaged item record was written over while its delete was "
                           "undone; the value its owner holds stays until that owner goes",
                           where)

    async def _release_item(
        self, pk: str, key: str, old: Mapping[str, Any], where: str
    ) -> None:
        """After an item's record was deleted: its owned value (written with the same token)
        and its blob."""
        blobs = [_text(old, "vb")] if "vb" in old else []
        if "o" in old:
            with _malformed(where):  # checked by the caller already
                owner = _int(old, "o")
            names = _Names()
            response, _ = await self._conditional(
                "DeleteItem",
                Key={"PK": _s(pk), "SK": _s(layout.owned_sk(owner, key))},
                ConditionExpression=f"{names('wt')} = {names.value(old.get('wt', _s('')))}",
                ReturnValues="ALL_OLD",
                **names.params(),
            )
            value = {} if response is None else response.get("Attributes") or {}
            blob = value.get("vb", {}).get("S")
            blobs += [blob] if isinstance(blob, str) and blob else []
        await self._discard_blobs(blobs)

    # -- shared items (SupportsSharedItems) --------------------------------------------------

    @holds_clients
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
        check_time("now", now)
        check_run_key(run_key)
        check_flag("if_absent", if_absent)
        check_int("owner", owner)
        checkpoint_id = cast(str, check_str("checkpoint_id", checkpoint_id))
        check_items(items)
        for item in items:
            _check_item(item)
            if item.owner != owner:
                raise ValidationError(
                    f"item {item.key[:40]!r} is owned by {item.owner}, not by checkpoint {owner}")
        parsed = _ids.parse_checkpoint_id(checkpoint_id)
        if parsed is None or parsed[0] != run_key or parsed[2] != owner:
            return False
        expires_at = await self._expiry_of(run_key, owner, checkpoint_id)
        if expires_at is _GONE or not is_live(expires_at, now):
            return False
        # A resend keeps the first value of a key with ``if_absent``, else the last.
        ordered = list(items) if if_absent else list(reversed(items))
        chosen = list({item.key: item for item in reversed(ordered)}.values())
        token = secrets.token_hex(8)
        written: list[str] = []
        sort_keys = [layout.owned_sk(owner, item.key) for item in chosen]
        values = await self._store_values(
            run_key, parsed[1], list(zip(sort_keys, (item.value for item in chosen),
                                         strict=True)), _TRANSACTION_BYTES, written)
        groups = [_owned_group(run_key, item, values[sort_key], expires_at, token, now,
                               if_absent=if_absent)
                  for item, sort_key in zip(chosen, sort_keys, strict=True)]
        for _ in range(2):
            checks = [_owner_covered(run_key, owner), _checkpoint_live(run_key, owner,
                                                                         checkpoint_id, now),
                      items_layout.guard_touch(run_key, owner, token)]
            try:
                wrote = await self._write_groups(run_key, groups, token, create_only=False,
                                                 checks=checks)
            except BaseException:
                raise  # blobs of chunks that may have landed stay; the cleanup loop sweeps
            if wrote or not await self._cover_owner(run_key, owner):
                break
        if not wrote:
            await self._discard_blobs(written)
            return False
        self._grow_family(run_key, owner, [item.key for item in chosen], token)
        return True

    async def _cover_owner(self, run_key: str, owner: int) -> bool:
        """After a refused ``put_owned_items``: if the run item did not count ``owner`` among
        the checkpoints that may own items (appended by ``append``), list it there and say
        so (the write is then retried); ``False`` when it did (the checkpoint is gone)."""
        state = await self._read_state(run_key)
        if state is None or state.may_own(owner):
            return False
        await self._add_owners(run_key, [owner])
        return True

    async def _expiry_of(self, run_key: str, sequence: int, checkpoint_id: str) -> float | None:
        """The ``expires_at`` of a checkpoint (exact: an id's expiry never changes), from
        memory or read; ``_GONE`` when there is no such checkpoint."""
        if checkpoint_id in self._expiries:
            return self._expiries[checkpoint_id]
        names = _Names()
        response = await self._call(
            "GetItem",
            Key={"PK": _s(layout.partition(run_key)), "SK": _s(layout.checkpoint_sk(sequence))},
            ProjectionExpression=f"{names('cid')}, {names('x')}",
            ConsistentRead=True,
            **names.params(),
        )
        item = response.get("Item")
        if not item or _text(item, "cid") != checkpoint_id:
            return _GONE
        expires_at = _expiry(item)
        self._remember_expiry(checkpoint_id, expires_at)
        return expires_at

    def _remember_expiry(self, checkpoint_id: str, expires_at: float | None) -> None:
        self._expiries[checkpoint_id] = expires_at
        self._expiries.move_to_end(checkpoint_id)
        while len(self._expiries) > _CACHE_SIZE:
            self._expiries.popitem(last=False)

    def _grow_family(
        self, run_key: str, sequence: int, keys: Sequence[str], token: str
    ) -> None:
        """After ``put_owned_items`` wrote ``keys`` to the run's latest checkpoint with
        ``token``: remember how many records sit next to it, so a read of it asks for as
        many, and which (a read checks, by the guard, that no other write came between)."""
        known = self._families.get(run_key)
        if known is None or known.sequence != sequence:
            return
        owned = None if known.owned is None else tuple(dict.fromkeys((*known.owned, *keys)))
        self._remember_family(run_key, dataclasses.replace(
            known, records=known.records + len(keys) + 1, owned=owned, guard=token,
            guard_before=known.guard or ""))

    def _unsure(self, run_key: str) -> None:
        """Forget which records the run's latest checkpoint owns (not how many there were:
        the next read still asks for as many)."""
        known = self._families.get(run_key)
        if known is not None and known.owned is not None:
            self._families[run_key] = dataclasses.replace(known, owned=None)

    def _remember_family(self, run_key: str, family: _Family) -> None:
        self._families[run_key] = family
        self._families.move_to_end(run_key)
        while len(self._families) > _CACHE_SIZE:
            self._families.popitem(last=False)

    @holds_clients
    async def read_with_items(
        self, run_key: str, *, sequence: int | None, now: float
    ) -> tuple[StoredCheckpoint, str, dict[str, bytes]] | None:
        check_time("now", now)
        check_run_key(run_key)
        if sequence is not None and not 0 <= check_int("sequence", sequence) <= layout.MAX_SEQUENCE:
            return None
        return await self._afresh(
            run_key, lambda: self._read_with_items(run_key, sequence, now))

    async def _read_with_items(
        self, run_key: str, sequence: int | None, now: float
    ) -> tuple[StoredCheckpoint, str, dict[str, bytes]] | None:
        known = self._families.get(run_key)
        if known is not None and sequence in (None, known.sequence):
            fast = await self._read_known(run_key, known, now)
            if fast is not None:
                return fast
            known = self._families.get(run_key)
        if sequence is None or (known is not None and known.sequence == sequence):
            found = await self._read_newest(run_key, sequence, now)
        else:
            found = await self._read_at(run_key, sequence, now)
        if found is None:
            return None
        item, family, reading = found
        sequence = layout.sequence_of(_text(item, "SK"))
        owned = {layout.owned_key(_text(record, "SK")): record for record in family
                 if layout.is_owned_sk(_text(record, "SK"))
                 and self._item_live(run_key, record, now)}
        with _malformed(self._where(run_key, _text(item, "SK"))):
            named = _text_list(item, "rf")
        refs = [key for key in dict.fromkeys(named) if key not in owned]
        checkpoint, (shared, nested) = await pair(
            lambda: self._checkpoint(run_key, item, reading, now),
            lambda: pair(lambda: self._live_items(run_key, refs, now),
                         lambda: self._nested_records(
                             run_key, [key for key in named if reading.may_nest(key)], now)),
        )
        if checkpoint is None:
            return None
        if sequence >= reading.latest_sequence:
            # A guard's token of another type is remembered as none: the fast read then
            # finds it stale and reads as usual.
            guard = next((record.get("wt", {}).get("S") for record in family
                          if layout.is_guard_sk(_text(record, "SK"))), None)
            self._remember_family(run_key, _Family(
                sequence, len(family), checkpoint.checkpoint_id, checkpoint.refs,
                tuple(layout.owned_key(_text(record, "SK")) for record in family
                      if layout.is_owned_sk(_text(record, "SK"))), guard))
        values = await self._values_of(run_key, {**nested, **owned, **shared})
        return checkpoint, self._status_of(run_key, reading, sequence), values

    async def _nested_records(
        self, run_key: str, refs: Sequence[str], now: float
    ) -> dict[str, dict[str, Any]]:
        """The live records holding the values of the unowned items nested under each of
        ``refs``: one Query per ref (``begins_with`` on ``i#<ref>/``, paged by the MB), all at
        once. Owned items are left out (an anchor): a checkpoint's own are read with it, and
        other checkpoints' are not returned. Callers pass only the refs the run item lists as
        having nested items (``nk``)."""
        prefixes = [layout.item_sk(nested_prefix(key)) for key in dict.fromkeys(refs)
                    if _may_be_item_key(nested_prefix(key))]
        if not prefixes:
            return {}
        pk = _s(layout.partition(run_key))

        async def under(prefix: str) -> list[dict[str, Any]]:
            names = _Names()
            return await self._query_all(
                KeyConditionExpression=(
                    f"{names('PK')} = {names.value(pk)} AND "
                    f"begins_with({names('SK')}, {names.value(_s(prefix))})"),
                ConsistentRead=True,
                **names.params(),
            )

        pages = await gather([functools.partial(under, prefix) for prefix in prefixes])
        return {_text(record, "SK")[2:]: record for page in pages for record in page
                if "o" not in record and self._item_live(run_key, record, now)}

    async def _read_known(
        self, run_key: str, known: _Family, now: float
    ) -> tuple[StoredCheckpoint, str, dict[str, bytes]] | None:
        """The run's latest checkpoint with its items in one TransactGetItems, when this
        process knows exactly which records they are (it appended it, or read it whole): the
        run item, the checkpoint, its guard, the values it owns and the items it names, in
        one consistent snapshot. ``None`` when that knowledge proves stale (a newer or
        removed checkpoint, a write to its items since: the guard or the run item's owners
        tell), or when the snapshot would be too large: the caller then reads as usual."""
        if known.owned is None or 3 + len(known.owned) + len(known.refs) > _TRANSACTION_LIMIT:
            return None
        owned = [layout.owned_sk(known.sequence, key) for key in known.owned]
        named = [layout.item_sk(key) for key in dict.fromkeys(known.refs)]
        sort_keys = [layout.RUN_SK, layout.checkpoint_sk(known.sequence),
                     layout.guard_sk(known.sequence), *owned, *named]
        # The items this process last saw with nested items are looked under with the
        # snapshot; the run item in it says whether any other must be (after it).
        cached = self._cache.get(run_key)
        eager = [] if cached is None else [key for key in dict.fromkeys(known.refs)
                                           if cached.may_nest(key)]
        found, nested = await pair(lambda: self._snapshot_of(run_key, sort_keys),
                                   lambda: self._nested_records(run_key, eager, now))
        run_item, item, guard = found[0], found[1], found[2]
        if run_item is None or item is None:
            self._unsure(run_key)
            return None
        try:
            state = _state_of(run_item, self._where(run_key, layout.RUN_SK), run_key)
        except _DamagedRun:
            self._unsure(run_key)
            return None  # the usual read reports it
        record = state.record
        try:
            stale = (
                not state.live(now)
                or record.latest_sequence != known.sequence
                or known.sequence in state.owners
                or known.sequence < state.owner_floor
                or _text(item, "cid") != known.checkpoint_id
                or _text_list(item, "rf") != known.refs
                or (None if guard is None else _text(guard, "wt")) != known.guard
                or (guard is not None and known.guard_before is not None
                    and _text(guard, "pw") != known.guard_before)
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            stale = True  # a record edited by hand: the usual read reports it
        if stale:
            self._unsure(run_key)
            return None
        self._remember(run_key, state)
        reading = _Reading.of(state)
        checkpoint = await self._checkpoint(run_key, item, reading, now)
        if checkpoint is None:
            self._unsure(run_key)
            return None
        values = {layout.owned_key(sort_key): got
                  for sort_key, got in zip(owned, found[3 : 3 + len(owned)], strict=True)
                  if got is not None and self._item_live(run_key, got, now)}
        shared = {key: got
                  for key, got in zip(dict.fromkeys(known.refs), found[3 + len(owned):],
                                      strict=True)
                  if got is not None and self._item_live(run_key, got, now)
                  and key not in values}
        late = [key for key in dict.fromkeys(known.refs)
                if state.may_nest(key) and key not in eager]
        shared, more = await pair(lambda: self._follow_anchors(run_key, shared, now),
                                  lambda: self._nested_records(run_key, late, now))
        items = await self._values_of(run_key, {**nested, **more, **values, **shared})
        return checkpoint, self._status_of(run_key, reading, known.sequence), items

    async def _read_newest(
        self, run_key: str, sequence: int | None, now: float, *, family: bool = True
    ) -> tuple[dict[str, Any], list[dict[str, Any]], _Reading] | None:
        """The newest live checkpoint (or checkpoint ``sequence``, believed the newest), with
        the records of its family (unless ``family`` is false: then none) and the reading of
        its run, from one descending Query from the run item: exactly as many records as the
        family held when last seen."""
        known = self._families.get(run_key) if family else None
        lower = layout.family_prefix(0 if known is None else known.sequence)
        names = _Names()
        params: dict[str, Any] = {
            "KeyConditionExpression": (
                f"{names('PK')} = {names.value(_s(layout.partition(run_key)))} AND "
                f"{names('SK')} BETWEEN {names.value(_s(lower))} "
                f"AND {names.value(_s(layout.RUN_SK))}"
            ),
            "ScanIndexForward": False,
            "ConsistentRead": True,
            # The run item, the checkpoint, its family and one more (the end of the range).
            "Limit": 3 + known.records if known is not None else 2,
            **names.params(),
        }
        reading: _Reading | None = None
        chosen: dict[str, Any] | None = None
        records: list[dict[str, Any]] = []
        while True:
            response = await self._call("Query", **params)
            for item in response.get("Items", []):
                sort_key = _text(item, "SK")
                if sort_key == layout.RUN_SK:
                    reading = self._reading(run_key, item, now)
                    if reading is None:
                        return None
                    continue
                if reading is None:
                    return None  # no run item: checkpoints here are leftovers
                if chosen is not None:
                    if not family or (
                        layout.sequence_of(sort_key) != layout.sequence_of(_text(chosen, "SK"))
                    ):
                        return chosen, records, reading
                    records.append(item)
                    continue
                if not layout.is_checkpoint_sk(sort_key):
                    continue  # the family of a checkpoint passed over
                found = layout.sequence_of(sort_key)
                if sequence is not None and found != sequence:
                    if found < sequence:
                        return None
                    continue
                if reading.accepts(found) and self._usable(run_key, item, reading, now):
                    reading = _pinned(reading, item)
                    chosen = item
            last = response.get("LastEvaluatedKey")
            if chosen is not None and reading is not None:
                if last and family:
                    records += await self._family_after(run_key, chosen, last)
                return chosen, records, reading
            if not last:
                if known is None or sequence is not None:
                    return None
                # The newest live checkpoint is older than the one remembered (deleted or
                # expired since): read the run from the top.
                self._families.pop(run_key, None)
                return await self._read_newest(run_key, None, now)
            params["ExclusiveStartKey"] = last
            params["Limit"] = 16

    async def _family_after(
        self, run_key: str, checkpoint: Mapping[str, Any], last: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        """The rest of a checkpoint's family, below ``last`` (a key a Query stopped at)."""
        prefix = layout.family_prefix(layout.sequence_of(_text(checkpoint, "SK")))
        names = _Names()
        params: dict[str, Any] = {
            "KeyConditionExpression": (
                f"{names('PK')} = {names.value(_s(layout.partition(run_key)))} AND "
                f"begins_with({names('SK')}, {names.value(_s(prefix))})"
            ),
            "ScanIndexForward": False,
            "ConsistentRead": True,
            **names.params(),
        }
        if _text(last, "SK").startswith(prefix):
            params["ExclusiveStartKey"] = dict(last)
        return [item for item in await self._query_all(**params)
                if not layout.is_checkpoint_sk(_text(item, "SK"))]

    async def _read_at(
        self, run_key: str, sequence: int, now: float
    ) -> tuple[dict[str, Any], list[dict[str, Any]], _Reading] | None:
        """Checkpoint ``sequence`` with its family (one Query) and the run item (a GetItem
        sent with it)."""
        names = _Names()
        prefix = layout.family_prefix(sequence)
        (found, run_item) = await pair(
            lambda: self._query_all(
                KeyConditionExpression=(
                    f"{names('PK')} = {names.value(_s(layout.partition(run_key)))} AND "
                    f"begins_with({names('SK')}, {names.value(_s(prefix))})"
                ),
                ScanIndexForward=False,
                ConsistentRead=True,
                **names.params(),
            ),
            lambda: self._raw_run_item(run_key),
        )
        reading = self._reading(run_key, run_item, now)
        if not found or reading is None or not reading.accepts(sequence):
            return None
        item, family = found[0], found[1:]
        if not layout.is_checkpoint_sk(_text(item, "SK")):
            return None
        reading = _pinned(reading, item)
        return (item, family, reading) if self._usable(run_key, item, reading, now) else None

    def _usable(
        self, run_key: str, item: Mapping[str, Any], reading: _Reading, now: float
    ) -> bool:
        """Whether a checkpoint item is a live checkpoint of the run's incarnation (a
        malformed one raises, as on every read)."""
        header = _checkpoint_header(run_key, item, self._where(run_key, _text(item, "SK")))
        incarnation = _pinned(reading, item).incarnation
        ours = header.checkpoint_id.startswith(f"ck-{run_key}-{incarnation}-")
        return ours and is_live(header.expires_at, now)

    # -- labels (SupportsLabels) ----------------------------------------------------------------

    @holds_clients
    async def runs_with_label(
        self, label: str, *, limit: int, cursor: str | None, now: float
    ) -> tuple[list[RunRecord], str | None]:
        check_time("now", now)
        check_labels((label,))
        cursor = check_str("cursor", cursor, optional=True)
        if cursor is not None and not _CURSOR.fullmatch(cursor):
            raise ValidationError(f"malformed label listing cursor {shown(cursor)}")
        if check_limit("limit", limit) < 1:
            return [], cursor
        names = _Names()
        condition = f"{names('PK')} = {names.value(_s(layout.label_partition(label)))}"
        if cursor is not None:
            condition += f" AND {names('SK')} < {names.value(_s(cursor))}"
        params: dict[str, Any] = {
            "KeyConditionExpression": condition,
            "ScanIndexForward": False,
            "ConsistentRead": True,
            "Limit": limit,
            **names.params(),
        }
        found: list[RunRecord] = []
        while True:
            response = await self._call("Query", **params)
            entries = response.get("Items", [])
            records = await self._labelled_runs(label, entries, now)
            for index, entry in enumerate(entries):
                record = records.get(_text(entry, "SK"))
                if record is None:
                    continue
                found.append(record)
                if len(found) >= limit:
                    more = index + 1 < len(entries) or bool(response.get("LastEvaluatedKey"))
                    return found, _text(entry, "SK") if more else None
            last = response.get("LastEvaluatedKey")
            if not last:
                return found, None
            params["ExclusiveStartKey"] = last

    async def _labelled_runs(
        self, label: str, entries: Sequence[Mapping[str, Any]], now: float
    ) -> dict[str, RunRecord]:
        """The live runs ``label``'s entries name (their run items, one BatchGetItem per
        100), by the entry's sort key; an entry of another incarnation, of a run without the
        label (an entry copied from another label), of an expired, purging or damaged run is
        left out."""
        wanted: dict[str, Mapping[str, Any]] = {}
        for entry in entries:
            run_key = entry.get("rk", {}).get("S")
            if isinstance(run_key, str) and run_key:
                wanted[layout.partition(run_key)] = entry
            else:
                logger.warning("skipping the label entry %r %r of dynamodb://%s in a "
                               "listing: its run key is malformed", _text(entry, "PK"),
                               _text(entry, "SK"), self.table)
        names = _Names()
        projection = ", ".join(names(a) for a in (*_COUNTED_ATTRIBUTES, "dat", "pg", "lb"))
        keys = [{"PK": _s(pk), "SK": _s(layout.RUN_SK)} for pk in wanted]
        items: list[dict[str, Any]] = []
        for start in range(0, len(keys), _BATCH_GET_LIMIT):
            request: dict[str, Any] = {self.table: {
                "Keys": keys[start : start + _BATCH_GET_LIMIT], "ConsistentRead": True,
                "ProjectionExpression": projection, **names.params()}}
            for attempt in range(self._retry.max_retries + 2):
                response = await self._send("BatchGetItem", RequestItems=request)
                items += response.get("Responses", {}).get(self.table, [])
                request = response.get("UnprocessedKeys") or {}
                if not request:
                    break
                await anyio.sleep(self._retry.delay(attempt))
            else:
                raise StoreUnavailableError(
                    f"DynamoDB BatchGetItem on table {self.table}: keys still unprocessed after "
                    "retries; the table is throttling, raise its capacity")
        records: dict[str, RunRecord] = {}
        for item in items:
            named = wanted.get(_text(item, "PK"))
            record = self._listed(item)
            if named is None or record is None or "pg" in item:
                continue
            if (record.incarnation == named.get("inc", {}).get("S")
                    and label in record.labels and is_live(record.expires_at, now)):
                records[_text(named, "SK")] = record
        return records

    # -- maintenance ----------------------------------------------------------------------

    @holds_clients
    async def purge_expired(self, *, now: float, limit: int) -> tuple[int, bool]:
        check_time("now", now)
        limit = max(1, check_limit("limit", limit))
        pages = await gather(
            [functools.partial(self._due_in_shard, shard, now, limit) for shard in _shards()]
        )
        due = sorted(
            (item for items, _ in pages for item in items),
            key=lambda item: (_number(item, "xat") or 0.0, _text(item, "PK"), _text(item, "SK")),
        )
        more = len(due) > limit or any(truncated for _, truncated in pages)
        by_run: dict[str, list[str]] = {}
        counts: dict[str, list[str]] = {}
        memos: list[dict[str, Any]] = []
        for entry in due[:limit]:
            pk, sort_key = _text(entry, "PK"), _text(entry, "SK")
            if pk.startswith(layout.MEMO_PREFIX):  # an append's memo, past its use
                memos.append({"DeleteRequest": {"Key": {"PK": _s(pk), "SK": _s(sort_key)}}})
            elif sort_key.startswith(layout.ITEM_PREFIX):
                await self._purge_item(pk, sort_key, now)
            elif sort_key.startswith(layout.COUNTER_PREFIX):
                counts.setdefault(pk.removeprefix("run#"), []).append(sort_key[2:])
            else:
                by_run.setdefault(pk.removeprefix("run#"), []).append(sort_key)
        removed = 0
        for run_key, sort_keys in by_run.items():
            try:
                count, finished, lowered = await self._purge_run(run_key, sort_keys, now, limit)
            except CorruptCheckpointError as exc:
                # One damaged record must not stop the cleanup of every other run: its due
                # entries come back later (repair, or a delete of the run, ends it).
                logger.warning("cleanup: run %s holds a damaged record (%s); its expired "
                               "checkpoints wait for repair, tried again in %g s",
                               self._where(run_key, layout.RUN_SK), exc, _DAMAGED_RETRY_SECONDS)
                await self._defer(run_key, sort_keys, now)
                continue
            removed += count
            more = more or not finished
            if lowered:  # swept now: this purge completes after the removal that lowered them
                counts.setdefault(run_key, []).extend(lowered)
        for run_key, keys in counts.items():
            await self._sweep_shared(run_key, list(dict.fromkeys(keys)), now)
        await self._batch_write(memos)
        return removed, not more

    async def _defer(self, run_key: str, sort_keys: Sequence[str], now: float) -> None:
        """Move a run's due expiry index entries :data:`_DAMAGED_RETRY_SECONDS` on, each only
        while it is still due (a writer that set it since keeps its own)."""
        async def defer(sort_key: str) -> None:
            names = _Names()
            await self._conditional(
                "UpdateItem",
                Key={"PK": _s(layout.partition(run_key)), "SK": _s(sort_key)},
                UpdateExpression=(f"SET {names('xat')} = "
                                  f"{names.value(_n(now + _DAMAGED_RETRY_SECONDS))}"),
                ConditionExpression=f"{names('xat')} <= {names.value(_n(now))}",
                **names.params(),
            )

        await gather([functools.partial(defer, sort_key) for sort_key in sort_keys])

    async def _due_in_shard(
        self, shard: int, now: float, limit: int
    ) -> tuple[list[dict[str, Any]], bool]:
        names = _Names()
        response = await self._call(
            "Query",
            IndexName=layout.BY_EXPIRY,
            KeyConditionExpression=(
                f"{names('xpk')} = {names.value(_s(f'x#{shard}'))} AND "
                f"{names('xat')} <= {names.value(_n(now))}"
            ),
            Limit=limit + 1,
            **names.params(),
        )
        items: list[dict[str, Any]] = response.get("Items", [])
        return items, len(items) > limit or bool(response.get("LastEvaluatedKey"))

    async def _purge_item(self, pk: str, sort_key: str, now: float) -> None:
        names = _Names()
        response, _ = await self._conditional(
            "DeleteItem",
            Key={"PK": _s(pk), "SK": _s(sort_key)},
            ConditionExpression=f"{names('x')} <= {names.value(_n(now))}",
            ReturnValues="ALL_OLD",
            **names.params(),
        )
        # No response: rewritten with a later expiry, or already removed by another worker.
        old = {} if response is None else response.get("Attributes") or {}
        if old:
            try:
                await self._release_item(
                    pk, sort_key[2:], old, f"dynamodb://{self.table}/{pk}/{sort_key}")
            except CorruptCheckpointError as exc:
                logger.warning("purged an item whose owned value cannot be found: %s", exc)

    async def _sweep_shared(self, run_key: str, keys: Sequence[str], now: float) -> None:
        """Remove the shared items whose counts reached zero, each in one transaction that
        holds only while the count is still zero: an append naming the item raises the count
        first and the removal is cancelled. The count stays, *condemned*, for
        ``CONDEMNED_SECONDS``: an append that names the item without writing it (its writer
        saw it before the removal) is refused rather than acknowledged without it; then the
        mark goes. Counts above zero leave the expiry index (only while as read: a removal
        lowering one again puts it back). A key nested under one whose own removal is due
        is left to that removal, which goes first (see ``parent_check``)."""
        pk = layout.partition(run_key)
        records = await self._batch_get(
            run_key, [sort_key for key in keys
                      for sort_key in (layout.counter_sk(key), layout.item_sk(key),
                                       *map(layout.counter_sk, _parents(key)))])
        swept: set[str] = set()
        # A key above others in ``keys`` first: when its removal is due, it takes them (they
        # are left to it then), and is not taken a second time from counts read before.
        for key in sorted(keys, key=lambda key: len(_parents(key))):
            swept.add(key)
            count = records.get(layout.counter_sk(key))
            if count is None:
                continue
            names = _Names()
            zero = "np" not in count and "gn" not in count and _int(count, "rc") <= 0
            if zero and any(_int(records.get(layout.counter_sk(parent), {}), "rc") > 0
                            for parent in _parents(key)):
                # Nested under a key a held checkpoint names: it stays, with what is nested
                # under it, for that key's rules to decide; only the count goes.
                await self._drop_count(run_key, key)
                continue
            due = next((parent for parent in _parents(key)
                        if _removal_due(records.get(layout.counter_sk(parent)))), None)
            if zero and due is not None:
                # Removed alone, it could leave an append naming that key acknowledged
                # without it (see ``parent_check``): the outermost such key's removal goes
                # first and takes it with the rest, condemning its count (a day on in the
                # expiry index), or, named meanwhile, makes the next pass drop the count.
                if due not in swept:
                    swept.add(due)
                    await self._sweep_shared(run_key, [due], now)
                continue
            if "np" in count:  # a removal interrupted before its nested items were all gone
                await self._remove_nested(run_key, key, _text(count, "np"),
                                          (_number(count, "gn") or now) + layout.CONDEMNED_SECONDS)
                continue
            if "gn" in count:
                if (_number(count, "xat") or 0.0) > now:
                    continue
                fenced = _number(count, "nf")
                if fenced is not None and fenced + layout.CONDEMNED_SECONDS > now:
                    # A fence (it may have landed on a count already due) lasts its day:
                    # the count stays in the expiry index until then, not deleted with it.
                    await self._conditional(
                        "UpdateItem",
                        Key={"PK": _s(pk), "SK": _s(layout.counter_sk(key))},
                        UpdateExpression=(f"SET {names('xat')} = "
                                          f"{names.value(_n(fenced + layout.CONDEMNED_SECONDS))}"),
                        ConditionExpression=f"{names('nf')} = {names.value(count['nf'])}",
                        **names.params(),
                    )
                    continue
                # Only while no fence landed since the read (a later one keeps it).
                fence = (f"attribute_not_exists({names('nf')})" if fenced is None
                         else f"{names('nf')} = {names.value(count['nf'])}")
                await self._conditional(
                    "DeleteItem",
                    Key={"PK": _s(pk), "SK": _s(layout.counter_sk(key))},
                    ConditionExpression=(
                        f"{names('gn')} = {names.value(count['gn'])} AND "
                        f"attribute_not_exists({names('np')}) AND {fence} AND "
                        f"(attribute_not_exists({names('rc')}) OR "
                        f"{names('rc')} <= {names.value(_n(0))})"),
                    **names.params(),
                )
                continue
            if _int(count, "rc") > 0:
                await self._conditional(
                    "UpdateItem",
                    Key={"PK": _s(pk), "SK": _s(layout.counter_sk(key))},
                    UpdateExpression=f"REMOVE {names('xpk')}, {names('xat')}",
                    ConditionExpression=(
                        f"{names('rc')} > {names.value(_n(0))} AND "
                        f"{names('xat')} = {names.value(count.get('xat', _n(0)))}"),
                    **names.params(),
                )
                continue
            await self._remove_shared(run_key, key, records.get(layout.item_sk(key)), now)

    async def _remove_shared(
        self, run_key: str, key: str, item: Mapping[str, Any] | None, now: float
    ) -> None:
        """Remove a shared item whose count is zero, and the items nested under its key
        (also when the item is owned, it goes with its owner, or gone): the item and the
        count's mark in one transaction (which a raise of the count cancels), then, if a
        Query found nested items, those (see :meth:`_remove_nested`). The checks of the keys
        it is nested under that do not fit in that transaction are fences sent before it."""
        pk = layout.partition(run_key)
        nesting: str | None = None
        until = now + layout.CONDEMNED_SECONDS
        shared = item is not None and "o" not in item
        # Nested items found now are removed after the mark; any written later by an append
        # naming the key raise its count, which cancels the removal.
        if (await self._nested_page(run_key, key, limit=1))[0]:
            nesting = secrets.token_hex(8)
        if shared or nesting is not None:
            operations = [items_layout.condemn(run_key, key, now, until, nesting, gone=shared)]
            if item is not None and shared:
                # The item and the mark together, only while the item is the one read (else
                # the count stays in the expiry index and the next pass reads it again).
                operations.append(items_layout.delete_when(
                    pk, layout.item_sk(key), "wt", item.get("wt", _s(""))))
            # Only while no key it is nested under is named (an append may have started
            # naming one since the counts were read: else it stays, and the next pass
            # drops the count alone) or due for its own removal (the next pass leaves it
            # to that one).
            parents = _parents(key)
            cut = max(0, len(operations) + len(parents) - _TRANSACTION_LIMIT)
            fences = [items_layout.fence(run_key, parent, now, until) for parent in parents[:cut]]
            operations += [items_layout.parent_check(run_key, parent) for parent in parents[cut:]]
        else:  # no item, or one owned by a checkpoint (it goes with it): only the count
            fences, operations = [], [_count_delete(run_key, key)]
        try:
            for chunk in _slices(fences, _TRANSACTION_LIMIT):
                await self._transact(chunk)
            await self._commit(operations, keep=len(operations))
        except _Cancelled:
            return  # named again meanwhile: it stays
        if item is not None and shared and "vb" in item:
            await self._discard_blobs([_text(item, "vb")])
        if nesting is not None:
            await self._remove_nested(run_key, key, nesting, until)

    async def _drop_count(self, run_key: str, key: str) -> None:
        """Delete a shared item's count, only while it is still zero and not fenced."""
        await self._conditional("DeleteItem", **_count_delete(run_key, key)["Delete"])

    async def _nested_page(
        self, run_key: str, key: str, *, limit: int | None = None,
        start: Mapping[str, Any] | None = None,
    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """One Query page of the records of the items nested under ``key`` (what deleting
        them needs: key, owner, token, blob), and where the next page starts."""
        names = _Names()
        params: dict[str, Any] = {
            "KeyConditionExpression": (
                f"{names('PK')} = {names.value(_s(layout.partition(run_key)))} AND "
                f"begins_with({names('SK')}, "
                f"{names.value(_s(layout.item_sk(nested_prefix(key))))})"),
            "ProjectionExpression": ", ".join(names(a) for a in ("SK", "o", "wt", "vb")),
            "ConsistentRead": True,
            **names.params(),
        }
        if limit is not None:
            params["Limit"] = limit
        if start is not None:
            params["ExclusiveStartKey"] = dict(start)
        response = await self._call("Query", **params)
        return response.get("Items", []), response.get("LastEvaluatedKey")

    async def _remove_nested(self, run_key: str, key: str, token: str, until: float) -> None:
        """Delete the loose items nested under the removed shared item ``key`` (a Query page
        per MB), then end the removal. Spared: owned items (they go with their owner) and
        what a held checkpoint names or is nested under a key one names (a Query of the
        counts under ``key`` and a read of its parents', with the first page; see
        :meth:`_delete_nested` for a naming after that read). Interrupted, the mark stays in
        the expiry index, due: the next cleanup pass calls this again."""
        named, (records, start) = await pair(lambda: self._named_around(run_key, key),
                                             lambda: self._nested_page(run_key, key))
        while True:
            if not await self._delete_nested(run_key, key, token, records, named, until):
                return  # done by another worker: the item may be written anew since
            if start is None:
                break
            records, start = await self._nested_page(run_key, key, start=start)
        await self._end_nesting(run_key, key, token, until)

    async def _delete_nested(
        self, run_key: str, key: str, token: str, records: Sequence[Mapping[str, Any]],
        named: set[str], until: float,
    ) -> bool:
        """Delete one page of nested ``records`` in transactions of up to 100 operations,
        each checking that the removal marked ``token`` is still under way, and, for each
        record, that the counts of its key, of the keys between it and ``key`` and of the
        keys ``key`` is nested under are still zero (for the latter, and not due for their
        own removal, see ``parent_check``): an append that started naming one after
        ``named`` was read raises its count, which cancels the transaction; the keys
        whose checks failed join ``named`` and the rest is sent again. The counts of the
        keys under ``key`` are condemned with the check, until ``until``: an append naming
        one after the delete is refused. A record rewritten since the page was read (written
        after the removal) is spared. ``False`` when the removal is no longer this one's
        (another worker finished it)."""
        pending = [record for record in records if "o" not in record]
        while True:
            pending = [record for record in pending
                       if not _named_or_under(_text(record, "SK")[2:], named)]
            if not pending:
                break
            transactions, taken = _nested_deletes(run_key, key, token, pending, until)
            try:
                for operations in transactions:
                    await self._transact(operations)
            except _Cancelled as cancelled:
                if cancelled.failed(0):
                    return False
                failed = {_target(op)[1] for index, op in enumerate(cancelled.operations)
                          if cancelled.failed(index)}
                named.update(sort_key[len(layout.COUNTER_PREFIX):] for sort_key in failed
                             if sort_key.startswith(layout.COUNTER_PREFIX))
                pending = [record for record in pending if _text(record, "SK") not in failed]
                continue
            pending = pending[taken:]
        # The blobs of spared records stay with them (a rewritten one points elsewhere now).
        await self._discard_blobs([
            _text(record, "vb") for record in records
            if "vb" in record and "o" not in record
            and not _named_or_under(_text(record, "SK")[2:], named)])
        return True

    async def _named_around(self, run_key: str, key: str) -> set[str]:
        """The keys held checkpoints name (count above zero) among those nested under ``key``
        (a Query of their counts, ``begins_with`` on ``c#<key>/``) and the keys ``key`` is
        nested under (a BatchGetItem, only if there are any), with the latter whose own
        removal is due (it takes what is nested under them)."""
        names = _Names()
        counts, parents = await pair(
            lambda: self._query_all(
                KeyConditionExpression=(
                    f"{names('PK')} = {names.value(_s(layout.partition(run_key)))} AND "
                    f"begins_with({names('SK')}, "
                    f"{names.value(_s(layout.counter_sk(nested_prefix(key))))})"),
                ProjectionExpression=f"{names('SK')}, {names('rc')}",
                ConsistentRead=True,
                **names.params(),
            ),
            lambda: self._batch_get(run_key, [layout.counter_sk(parent)
                                              for parent in _parents(key)]),
        )
        found = [count for count in counts if _int(count, "rc") > 0]
        found += [count for count in parents.values()
                  if _int(count, "rc") > 0 or _removal_due(count)]
        return {_text(count, "SK")[len(layout.COUNTER_PREFIX):] for count in found}

    async def _end_nesting(self, run_key: str, key: str, token: str, until: float) -> None:
        """End a removal whose nested items are all gone: the count loses its mark and the
        run item stops listing ``key`` among the items with nested items (``nk``), together,
        only while the mark is this removal's. While it stands no append can name ``key``,
        so none can have listed it again meanwhile."""
        done = items_layout.nesting_done(run_key, key, token, until)
        names = _Names()
        listed = names.value({"SS": [key]})
        unlist = {"Update": {
            "Key": {"PK": _s(layout.partition(run_key)), "SK": _s(layout.RUN_SK)},
            "UpdateExpression": f"DELETE {names('nk')} {listed}",
            "ConditionExpression": f"contains({names('nk')}, {names.value(_s(key))})",
            **names.params(),
        }}
        try:
            await self._transact([{"Update": dict(done)}, unlist])  # it adds the table
        except _Cancelled as cancelled:
            if cancelled.failed(0):
                return  # another worker ended it
            # The run item does not list it (it says any item may have nested items, or the
            # run is going): only the mark.
            await self._conditional("UpdateItem", **done)

    async def _purge_run(
        self, run_key: str, sort_keys: Sequence[str], now: float, budget: int
    ) -> tuple[int, bool, list[str]]:
        """Remove what of one run expired, prompted by its due index entries (checkpoints,
        or the run item itself): ``(checkpoints removed, finished, shared items whose counts
        it lowered)``."""
        due = sorted(
            layout.sequence_of(key) for key in sort_keys
            if key.startswith(layout.CHECKPOINT_PREFIX)
        )
        for _ in range(_APPEND_ATTEMPTS):
            try:
                state = await self._read_state(run_key)
            except _DamagedRun as damage:
                return (*await self._purge_damaged(run_key, due, sort_keys, now, damage), [])
            if state is None:
                await self._purge_unheld(run_key, due, now)
                return 0, True, []
            if state.purging or not is_live(state.record.expires_at, now):
                return (*await self._purge_whole_run(run_key, state, now), [])
            unheld = [s for s in due if s > state.record.latest_sequence or not state.book.holds(s)]
            await self._purge_unheld(run_key, unheld, now)
            planned = await self._plan_expired(run_key, state, due, now, budget)
            if planned is None:
                return 0, True, []  # a run item due but live: the index is behind, it catches up
            plan, count, finished = planned
            try:
                await self._commit(plan.operations, keep=1)
            except _Cancelled as cancelled:
                self._state_after(run_key, cancelled)
                continue
            await self._committed(run_key, plan)
            await self._reconcile_blobs(run_key, plan.state)
            await self._sweep_item_blobs(run_key, grace=_ITEM_BLOB_GRACE)
            return count, finished, plan.lowered
        return 0, False, []

    async def _plan_expired(
        self, run_key: str, state: _RunState, due: Sequence[int], now: float, budget: int
    ) -> tuple[_Plan, int, bool] | None:
        """Removal of a live run's expired checkpoints (a transaction's worth): the front's
        from the book, the back's from their items; ``(plan, removed, all removed)``."""
        room = max(1, min(budget, _PURGE_BATCH))
        book = state.book.copy()
        expired = book.expired(now)
        removed = [_held_in(run_key, state, book, sequence) for sequence in expired[:room]]
        for held in removed:
            book.remove(held.sequence)
        back = state.book.back
        candidates = [] if back is None else [
            s for s in due if back.start <= s <= state.record.latest_sequence
        ]
        chosen = candidates[: room - len(removed)]
        for held in await self._back_entries(run_key, state, chosen):
            if not is_live(held.expires_at, now):
                book.remove_back(held.expires_at)
                removed.append(held)
        if not removed:
            return None
        plan = await self._plan_change(run_key, state, book, removed, [], now=now,
                                       token=secrets.token_hex(8))
        finished = len(expired) <= room and len(chosen) == len(candidates)
        return plan, len(removed), finished

    async def _purge_unheld(self, run_key: str, sequences: Sequence[int], now: float) -> None:
        """Delete expired checkpoint items that no run item holds (leftovers, or those of a
        damaged run item), so the cleanup loop does not meet them again."""
        pk = layout.partition(run_key)
        deletes = []
        for sequence in sequences:
            names = _Names()
            operation = _delete(pk, layout.checkpoint_sk(sequence))
            operation["Delete"]["ConditionExpression"] = f"{names('x')} <= {names.value(_n(now))}"
            operation["Delete"].update(names.params())
            deletes.append(operation)
        await self._guarded_deletes(deletes)

    async def _purge_damaged(
        self, run_key: str, due: Sequence[int], sort_keys: Sequence[str], now: float,
        damage: _DamagedRun,
    ) -> tuple[int, bool]:
        """A damaged run item is left for repair; its expired checkpoints still go, and the
        run item leaves the expiry index, so the cleanup loop moves on."""
        logger.warning("cleanup: %s; removing only its expired checkpoint items", damage)
        await self._purge_unheld(run_key, due, now)
        if layout.RUN_SK in sort_keys:
            await self._leave_expiry_index(run_key)
        return 0, True

    async def _leave_expiry_index(self, run_key: str) -> None:
        """Take a damaged run item, which the cleanup loop cannot act on, out of the expiry
        index, so that the loop moves past it."""
        names = _Names()
        await self._conditional(
            "UpdateItem",
            Key={"PK": _s(layout.partition(run_key)), "SK": _s(layout.RUN_SK)},
            UpdateExpression=f"REMOVE {names('xpk')}, {names('xat')}",
            ConditionExpression=f"attribute_exists({names('PK')})",
            **names.params(),
        )

    async def _purge_whole_run(
        self, run_key: str, state: _RunState, now: float
    ) -> tuple[int, bool]:
        """Mark the run as being purged (the one worker whose mark lands counts it), then
        remove its records, the run item last."""
        counted = 0
        if not state.purging:
            names = _Names()
            token = secrets.token_hex(8)
            marked, old = await self._conditional(
                "UpdateItem",
                Key={"PK": _s(layout.partition(run_key)), "SK": _s(layout.RUN_SK)},
                UpdateExpression=(
                    f"SET {names('pg')} = {names.value({'BOOL': True})}, "
                    f"{names('wt')} = {names.value(_s(token))} "
                    f"ADD {names('rev')} {names.value(_n(1))}"
                ),
                ConditionExpression=_same_life(names, state),
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
                **names.params(),
            )
            # Refused, unless as the resend of this very mark (its reply lost): then it is ours.
            if marked is None and (old or {}).get("wt") != _s(token):
                # Changed meanwhile (another purger, the run restarted or removed): the run
                # item as the refusal returned it is remembered, for the caller to act on.
                self._remember_returned(run_key, old or {})
                return 0, False
            counted = state.book.count
        self._cache.pop(run_key, None)
        await self._remove_marked(run_key, state.record)
        return counted, True

    async def _remove_marked(self, run_key: str, record: RunRecord) -> None:
        """Delete everything of a run marked for purging (its label entries too), in
        transactions that each check the mark still stands: a run restarted meanwhile (a new
        incarnation, its checkpoints and items) is left alone, and its own first append
        removes what is left of the old one."""
        pk = layout.partition(run_key)
        incarnation = record.incarnation
        found = await self._partition(run_key, "bl", "vb")
        deletes = [_delete(pk, key) for entry in found
                   if (key := _text(entry, "SK")) != layout.RUN_SK]
        deletes += items_layout.label_deletes(run_key, record)
        chunk_size = _TRANSACTION_LIMIT - 1
        for start in range(0, len(deletes), chunk_size):
            chunk = deletes[start : start + chunk_size]
            try:
                await self._commit([_purge_guard(run_key, incarnation), *chunk], keep=1)
            except _Cancelled:
                logger.info("cleanup: run %s started over while being purged; leaving it", pk)
                return
        if self.bucket is not None:
            life = f"{run_key}/{incarnation}/"
            await self._discard_prefix(life)
            if pointed := _pointed_to(run_key, found, [life]):
                await (await self._bucket()).delete(pointed)
            await self._sweep_item_blobs(run_key, grace=0.0)
        names = _Names()
        # Conditional: a run restarted meanwhile keeps its new run item.
        await self._conditional(
            "DeleteItem",
            Key={"PK": _s(pk), "SK": _s(layout.RUN_SK)},
            ConditionExpression=f"{names('inc')} = {names.value(_s(incarnation))}",
            **names.params(),
        )

    async def _reconcile_blobs(self, run_key: str, state: _RunState) -> None:
        """Delete blobs of the run that no checkpoint points to (an append that crashed
        between its S3 PUT and its item write, a delete whose blob removal failed).

        Only blobs the front details are known: blobs of the back, and above the run's
        latest sequence (an append still in flight), are spared; those of a finished
        incarnation are not.
        """
        if self.bucket is None:
            return
        record = state.record
        referenced = set(_blob_keys(run_key, state, state.book.blobs))
        back = state.book.back
        spared_from = record.latest_sequence + 1 if back is None else back.start

        def keep(key: str) -> bool:
            if key in referenced or layout.item_blob_sort_key(key) is not None:
                return True  # item blobs have a sweep of their own
            sequence = layout.blob_sequence(key)
            if sequence is None or key.split("/")[1] != record.incarnation:
                return False
            return sequence >= spared_from

        removed = await self._discard_prefix(f"{run_key}/", keep)
        if removed:
            logger.info("run %s: removed %d orphaned S3 blobs", run_key, removed)

    async def _sweep_item_blobs(
        self, run_key: str, *, grace: float, life: str | None = None
    ) -> None:
        """Delete the run's item blobs that their item does not point to (a write that
        failed or crashed after its S3 PUT, a value replaced), sparing those written less
        than ``grace`` seconds ago (a write may still be under way). Each blob names its
        item, so this reads one record per blob, not the run.

        A blob that names its life is always spared for ``_ITEM_BLOB_GRACE`` at least: a
        removal of an ended life, which sweeps with no grace, takes that life's blobs by
        prefix before, and must spare those a new life's first append put before its
        transaction (which lands once the removal is done). So the blobs of a life left
        after its removal (a stale writer's, put after it, whose transaction's outcome it
        never learned) go with the next sweep of the run an hour on: the cleanup loop's
        removal of expired checkpoints of a later life, or a later removal of the run.
        Blobs that name no life (``put_items``, and writes before values were kept by life)
        go at once on a removal, as they always did.

        ``life``: only the values of that life, an ended one (no new life of the run writes
        under its prefix), with ``grace`` alone (see :meth:`_sweep_ended_life`)."""
        if self.bucket is None:
            return
        bucket = await self._bucket()
        prefix = "" if life is None else f"{life}/{layout.ITEM_BLOBS}/"
        listed = await bucket.list(f"{run_key}/{prefix}")
        now = time.time()
        candidates: dict[str, str] = {}
        for entry in listed:
            parsed = layout.item_blob_sort_key(entry.key)
            if parsed is None:
                if entry.key.split("/")[1:2] == [layout.ITEM_BLOBS]:
                    candidates[entry.key] = ""  # no item's: nothing points to it
                continue  # else a checkpoint's payload: see _reconcile_blobs
            sort_key, written_at, named = parsed
            # Listing one ended life, ``grace`` alone; else a life's values wait the hour.
            spare = grace if named is None or life is not None else max(grace, _ITEM_BLOB_GRACE)
            if written_at <= now - spare:
                candidates[entry.key] = sort_key
        if not candidates:
            return
        records = await self._batch_get(run_key, sorted({sk for sk in candidates.values() if sk}))
        doomed = [blob for blob, sort_key in candidates.items()
                  if _text(records.get(sort_key, {}), "vb") != blob]
        if doomed:
            await bucket.delete(doomed)
            logger.info("run %s: removed %d orphaned item blobs", run_key, len(doomed))

    # -- repair -----------------------------------------------------------------------------

    @holds_clients
    async def damaged_runs(
        self, *, run_key: str | None = None, now: float
    ) -> list[RunDamage]:
        check_time("now", now)
        if run_key is not None:
            check_run_key(run_key)
        if run_key is not None:
            found = await self._damage_of(run_key, await self._raw_run_item(run_key))
            return [] if found is None else [found]
        items = await self._run_items()
        damages = await gather([
            functools.partial(self._damage_of, _text(item, "PK").removeprefix("run#"), item)
            for item in items
        ])
        return sorted((d for d in damages if d is not None), key=lambda d: d.run_key)

    async def _run_items(self) -> list[dict[str, Any]]:
        """Every run item of the table, readable or not (a Scan: an operator's tool)."""
        names = _Names()
        params: dict[str, Any] = {
            "FilterExpression": f"{names('SK')} = {names.value(_s(layout.RUN_SK))}",
            **names.params(),
        }
        items: list[dict[str, Any]] = []
        while True:
            response = await self._call("Scan", **params)
            items.extend(response.get("Items", []))
            last = response.get("LastEvaluatedKey")
            if not last:
                return items
            params["ExclusiveStartKey"] = last

    async def _damage_of(
        self, run_key: str, run_item: dict[str, Any] | None
    ) -> RunDamage | None:
        """What is wrong with a run item (undecodable, or behind its log), or ``None``."""
        if run_item is None:
            return None
        where = self._where(run_key, layout.RUN_SK)
        try:
            state = _state_of(run_item, where, run_key)
        except _DamagedRun as damage:
            problem = damage.problem
        else:
            found = await self._newest_above(run_key, state)
            if found is None:
                return None
            problem = (f"it is behind its log: checkpoint {found} exists above its latest "
                       f"sequence, {state.record.latest_sequence}")
        log = await self._log(run_key)
        newest = log[-1] if log else None
        return RunDamage(
            run_key=run_key, key=where, problem=problem, checkpoints=len(log),
            newest=None if newest is None else _header(newest),
        )

    async def _newest_above(self, run_key: str, state: _RunState) -> int | None:
        """The newest checkpoint of the run's incarnation above its latest sequence, if any."""
        names = _Names()
        record = state.record
        response = await self._call(
            "Query",
            KeyConditionExpression=(
                f"{names('PK')} = {names.value(_s(layout.partition(run_key)))} AND "
                f"{names('SK')} BETWEEN "
                f"{names.value(_s(layout.checkpoint_sk(record.latest_sequence + 1)))} AND "
                f"{names.value(_s(layout.checkpoint_sk(layout.MAX_SEQUENCE)))}"
            ),
            ProjectionExpression=f"{names('SK')}, {names('cid')}",
            ScanIndexForward=False,
            ConsistentRead=True,
            **names.params(),
        )
        ours = f"ck-{run_key}-{record.incarnation}-"
        for item in response.get("Items", []):
            if _text(item, "cid").startswith(ours):
                return layout.sequence_of(_text(item, "SK"))
        return None

    async def _log(self, run_key: str) -> list[dict[str, Any]]:
        """The intact checkpoint items of the run's newest incarnation, ascending (no
        payloads): what a rebuilt run item describes."""
        names = _Names()
        found = await self._query_all(
            KeyConditionExpression=(
                f"{names('PK')} = {names.value(_s(layout.partition(run_key)))} AND "
                f"{names('SK')} BETWEEN {names.value(_s(layout.checkpoint_sk(0)))} AND "
                f"{names.value(_s(layout.checkpoint_sk(layout.MAX_SEQUENCE)))}"
            ),
            ProjectionExpression=", ".join(
                names(a) for a in ("SK", "cid", "ca", "x", "bl", "hdr", "rf")),
            ConsistentRead=True,
            **names.params(),
        )
        intact = []
        for item in found:
            parsed = _ids.parse_checkpoint_id(_text(item, "cid"))
            sequence = layout.sequence_of(_text(item, "SK"))
            if parsed is not None and parsed[0] == run_key and parsed[2] == sequence:
                intact.append((parsed[1], item))
        if not intact:
            return []
        newest = intact[-1][0]
        return [item for incarnation, item in intact if incarnation == newest]

    @holds_clients
    async def rebuild_run(self, run_key: str, seed: RunRecord, *, now: float) -> RunRecord:
        check_time("now", now)
        check_run_key(run_key)
        if not isinstance(seed, RunRecord):
            raise ValidationError(f"seed must be a RunRecord, got {type(seed).__name__}")
        run_item = await self._raw_run_item(run_key)
        if await self._damage_of(run_key, run_item) is None:
            raise ConflictError(
                f"the run record {self._where(run_key, layout.RUN_SK)} is "
                f"{'absent' if run_item is None else 'not damaged'}: nothing to rebuild"
            )
        log = await self._log(run_key)
        if not log:
            raise CheckpointNotFound(
                f"no intact checkpoint of run key {run_key} is left to rebuild its record from"
            )
        previous = run_item or {}
        state = await self._rebuilt_state(run_key, log, seed, now, _surviving_tokens(previous))
        names = _Names()
        unchanged = " AND ".join(
            f"{names(name)} = {names.value(previous[name])}" if name in previous
            else f"attribute_not_exists({names(name)})"
            for name in ("rev", "bk")
        )
        written, _ = await self._conditional(
            "PutItem",
            Item=_run_item(run_key, state, secrets.token_hex(8)),
            ConditionExpression=f"attribute_exists({names('PK')}) AND {unchanged}",
            **names.params(),
        )
        self._cache.pop(run_key, None)
        if written is None:
            raise ConflictError(
                f"the run record {self._where(run_key, layout.RUN_SK)} changed while it was "
                "being rebuilt; check it again"
            )
        return state.record

    async def _rebuilt_state(
        self, run_key: str, log: list[dict[str, Any]], seed: RunRecord, now: float,
        delete_tokens: tuple[str, ...],
    ) -> _RunState:
        book = Book()
        for item in log:
            book.add(
                layout.sequence_of(_text(item, "SK")), _number(item, "x"),
                _suffix(_text(item, "bl") or None), capacity=self._book_capacity,
            )
        newest = _ids.parse_checkpoint_id(_text(log[-1], "cid"))
        assert newest is not None  # _log keeps only parsed ids
        record = RunRecord(
            run_id=seed.run_id,
            incarnation=newest[1],
            status=seed.status,
            created_at=_number(log[0], "ca") or now,
            updated_at=now,
            latest_sequence=newest[2],
            checkpoint_count=book.count,
            expires_at=book.expires_at(),
            version=0,
            data=seed.data,
            labels=check_labels(seed.labels),
        )
        owners = await self._owners(run_key)
        floor = 0
        if len(owners) > layout.OWNERS_CAPACITY:
            floor = sorted(owners)[len(owners) - layout.OWNERS_CAPACITY]
            owners = {owner for owner in owners if owner >= floor}
        naming = [layout.sequence_of(_text(item, "SK")) for item in log if "rf" in item]
        # A fresh random revision: no process's cached copy of the old item can pass for it.
        rev = secrets.randbits(48)
        # Which items have nested items is not in the log: reads look under every one.
        return _RunState(record, rev, book, frozenset(owners), floor,
                         items_floor=min(naming, default=None), nesting_all=True,
                         delete_tokens=delete_tokens)

    async def _owners(self, run_key: str) -> set[int]:
        """The sequences that own items (or have a guard), from the records next to them."""
        names = _Names()
        found = await self._query_all(
            KeyConditionExpression=(
                f"{names('PK')} = {names.value(_s(layout.partition(run_key)))} AND "
                f"{names('SK')} BETWEEN {names.value(_s(layout.CHECKPOINT_PREFIX))} "
                f"AND {names.value(_s(layout.CHECKPOINT_END))}"
            ),
            ProjectionExpression=names("SK"),
            ConsistentRead=True,
            **names.params(),
        )
        return {layout.sequence_of(sort_key) for entry in found
                if not layout.is_checkpoint_sk(sort_key := _text(entry, "SK"))}


# -- helpers -------------------------------------------------------------------------------

_RUN_ATTRIBUTES: Final = (
    "rid", "inc", "st", "ua", "ls", "cnt", "exp", "ver", "dat", "rev", "bk", "own", "ofl", "pg",
    "lb", "rfl", "lttl",
)
"""What a read needs of the run item besides ``SK`` and ``ca``."""
_COUNTED_ATTRIBUTES: Final = ("PK", "rid", "inc", "st", "ca", "ua", "ls", "cnt", "exp", "ver")
_RECORD_ATTRIBUTES: Final = ("rid", "st", "ca", "ua", "ls", "cnt", "exp", "ver", "dat", "lb")
"""The run record's attributes besides ``inc`` (the run indexes copy them)."""


def _conflict_with(state: _RunState | None, now: float) -> SequenceConflict:
    """The conflict of an append that gave up with the run as ``state`` holds it: its head
    only while that life is live at ``now`` (a ``SequenceConflict`` names the live run; an
    ended life's, say the last of several removals refused, would have the caller propose
    the next checkpoint of a life that ended)."""
    head = None if state is None or not state.live(now) else state.record
    return SequenceConflict(latest_sequence=None if head is None else head.latest_sequence,
                            incarnation=None if head is None else head.incarnation)


def _cancellation_error(
    reasons: list[dict[str, Any]], action: str, retries: int
) -> CheckpointError:
    """Our error for a transaction cancelled for a reason other than a failed condition."""
    failing = [
        (index, reason) for index, reason in enumerate(reasons)
        if reason.get("Code", "None") != "None"
    ]
    index, reason = failing[0] if failing else (0, {})
    code = str(reason.get("Code", "unknown"))
    detail = (f"{action}: cancelled, operation {index + 1} of {len(reasons)}: {code}: "
              f"{reason.get('Message', 'no message')}")
    if code == "ValidationError":
        return ValidationError(f"{detail} (a record too large, or one DynamoDB cannot take)")
    if code == "TransactionConflict":
        return ConflictError(
            f"{detail}; still conflicting with concurrent transactions after {retries} "
            "retries: try again"
        )
    if code in _TRANSIENT_REASONS:
        return StoreUnavailableError(
            f"{detail}; still throttled after {retries} retries: lower the request rate or "
            "raise the retry policy's max_retries"
        )
    return StoreError(detail)


def _suffix(blob: str | None) -> str | None:
    return None if blob is None else layout.blob_suffix(blob)


def _blob_keys(run_key: str, state: _RunState, suffixes: Mapping[int, str]) -> list[str]:
    incarnation = state.record.incarnation
    return [
        layout.blob_key(run_key, incarnation, sequence, suffix)
        for sequence, suffix in suffixes.items()
    ]


def _held_in(run_key: str, state: _RunState, book: Book, sequence: int) -> _Held:
    """A checkpoint of the front of ``book``, as a removal needs it."""
    suffix = book.blobs.get(sequence)
    blob = None if suffix is None else layout.blob_key(
        run_key, state.record.incarnation, sequence, suffix)
    return _Held(sequence, book.expiry_of(sequence), blob)


def _checkpoint_header(run_key: str, item: Mapping[str, Any], where: str) -> CheckpointHeader:
    """The header of a checkpoint item; :class:`CorruptCheckpointError` when it names another
    run or another sequence than the key it was read from (a record copied over), or when an
    attribute is malformed."""
    sequence = layout.sequence_of(_text(item, "SK"))
    with _malformed(where):
        checkpoint_id = _text(item, "cid")
        header = CheckpointHeader(
            sequence=sequence,
            checkpoint_id=checkpoint_id,
            created_at=_number(item, "ca") or 0.0,
            expires_at=_number(item, "x"),
            header=_bytes(item, "hdr"),
        )
    parsed = _ids.parse_checkpoint_id(checkpoint_id)
    if parsed is None or parsed[0] != run_key or parsed[2] != sequence:
        raise CorruptCheckpointError(
            f"the checkpoint item names another checkpoint ({checkpoint_id[:80]!r})", key=where
        )
    return header


def _skip_damaged(error: CorruptCheckpointError, skip: bool) -> None:
    """A damaged record met by a read: raised, or (``skip``: a listing) logged."""
    if not skip:
        raise error
    logger.warning("skipping a damaged item in a listing: %s", error)


@contextlib.contextmanager
def _malformed(where: str) -> Iterator[None]:
    """Attributes of the wrong type (a record edited by hand): a damaged record, not a crash."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptCheckpointError(
            f"the item has a malformed attribute ({type(exc).__name__}: {exc})", key=where
        ) from exc


def _expiry(item: Mapping[str, Any]) -> float | None:
    """An item's expiry; ``None`` for a malformed one (its reader reports it)."""
    try:
        return _number(item, "x")
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _incarnations(run_key: str, found: Sequence[Mapping[str, Any]]) -> set[str]:
    """The incarnations a run's records name: its run item's, and its checkpoints' (a
    damaged record's attribute of another type names none)."""
    seen: set[str] = set()
    for item in found:
        incarnation = item.get("inc", {}).get("S")
        if isinstance(incarnation, str) and _INCARNATION.fullmatch(incarnation):
            seen.add(incarnation)
        parsed = _ids.parse_checkpoint_id(item.get("cid", {}).get("S"))
        if parsed is not None and parsed[0] == run_key:
            seen.add(parsed[1])
    return seen


def _pinnable(entry: Mapping[str, Any]) -> bool:
    """Whether a record is one an append may write before its transaction (a pin): a
    shared item (an item record that names no owner), a count, or the pin record."""
    sort_key = _text(entry, "SK")
    return sort_key.startswith(layout.COUNTER_PREFIX) or sort_key == layout.PIN_SK or (
        sort_key.startswith(layout.ITEM_PREFIX) and "o" not in entry)


def _young_pins(found: Sequence[Mapping[str, Any]], before: float) -> set[str]:
    """The sort keys of the pinnable records pinned since ``before``, and of the items whose
    count was: a first append under way may name an item it found, raising its count."""
    young = {_text(entry, "SK") for entry in found
             if _pinnable(entry) and not _pinned_before(entry, before)}
    young.update(layout.item_sk(key[len(layout.COUNTER_PREFIX):]) for key in list(young)
                 if key.startswith(layout.COUNTER_PREFIX))
    return young


def _pinned_before(entry: Mapping[str, Any], before: float) -> bool:
    """Whether a record was pinned (``pa``) before ``before``, or never (no pin wrote it)."""
    stamp = entry.get("pa", {}).get("N")
    if not isinstance(stamp, str):
        return True
    try:
        return float(stamp) < before
    except ValueError:
        return True


def _delete_stale_pin(pk: str, sort_key: str, before: float) -> dict[str, Any]:
    """The delete of a pinnable record (see :func:`_pinnable`) only while it is a stale pin
    (see :func:`_stale_pin_check`); refused, it is dropped with the rest of its key's group
    (see :func:`_deletes_of`)."""
    names = _Names()
    operation = _delete(pk, sort_key)
    operation["Delete"]["ConditionExpression"] = _stale_pin(names, before)
    operation["Delete"].update(names.params())
    operation["_group"] = _shared_key(sort_key)
    return operation


def _stale_pin_check(pk: str, key: str, before: float) -> dict[str, Any]:
    """The check, in the transaction deleting shared item ``key`` found with no count, that
    its count is still absent or pinned before ``before``: a first append under way that
    names the item without writing it raises the count (stamped now) before its
    transaction, and the item must then stay. A condition on the item cannot see the count,
    and a delete of an absent count would cost a write: a ``ConditionCheck`` it is."""
    names = _Names()
    return {"ConditionCheck": {
        "Key": {"PK": _s(pk), "SK": _s(layout.counter_sk(key))},
        "ConditionExpression": _stale_pin(names, before),
        **names.params(),
    }, "_group": _shared_key(layout.counter_sk(key))}


def _stale_pin(names: _Names, before: float) -> str:
    """The condition that a record was pinned (``pa``) before ``before``, or never (no pin
    wrote it, or it is absent)."""
    return f"attribute_not_exists({names('pa')}) OR {names('pa')} < {names.value(_n(before))}"


def _shared_key(sort_key: str) -> str:
    """The shared item a count's or an item's record is of (``c#k``, ``i#k``: ``#k``); any
    other sort key as it is."""
    for prefix in (layout.COUNTER_PREFIX, layout.ITEM_PREFIX):
        if sort_key.startswith(prefix):
            return "#" + sort_key[len(prefix):]
    return sort_key


def _values_of(entries: Iterable[Mapping[str, Any]]) -> set[str]:
    """The S3 keys of the item values the records hold (``vb``)."""
    return {blob for entry in entries if isinstance(blob := entry.get("vb", {}).get("S"), str)}


def _set_aside(
    found: list[dict[str, Any]], kept: set[str], spared: set[str]
) -> list[dict[str, Any]]:
    """``found`` without the records at the sort keys ``kept``, whose values join ``spared``."""
    spared.update(_values_of(entry for entry in found if _text(entry, "SK") in kept))
    return [entry for entry in found if _text(entry, "SK") not in kept]


def _deletes_of(
    pk: str, found: Sequence[Mapping[str, Any]], doomed: Sequence[str],
    stale_before: float | None,
) -> list[list[dict[str, Any]]]:
    """``delete_run``'s deletes of ``doomed``, in groups one transaction takes whole. With
    ``stale_before`` (no run item), those of pinnable records only while they are stale pins,
    one group per shared key: the count's delete (or, when none was found, the check that
    none was pinned since, :func:`_stale_pin_check`) and the item's, so that a pin raising
    the count before their transaction keeps both, and one after it finds neither."""
    if stale_before is None:
        return [[_delete(pk, key)] for key in doomed]
    pinnable = {_text(entry, "SK") for entry in found if _pinnable(entry)}
    groups: dict[str, list[dict[str, Any]]] = {}
    for key in doomed:
        if key not in pinnable:
            groups[key] = [_delete(pk, key)]
            continue
        group = groups.setdefault(_shared_key(key), [])
        if key.startswith(layout.ITEM_PREFIX) and layout.counter_sk(
                shared := key[len(layout.ITEM_PREFIX):]) not in pinnable:
            group.append(_stale_pin_check(pk, shared, stale_before))
        group.append(_delete_stale_pin(pk, key, stale_before))
    return list(groups.values())


def _checkpoints_deleted(operations: Iterable[Mapping[str, Any]]) -> int:
    """How many checkpoint records ``operations`` delete."""
    return sum(1 for operation in operations if "Delete" in operation
               and layout.is_checkpoint_sk(_text(operation["Delete"]["Key"], "SK")))


def _pointed_to(
    run_key: str, found: Sequence[Mapping[str, Any]], discarded: Sequence[str]
) -> list[str]:
    """The S3 objects of the run that records a removal deleted pointed to (``bl``, ``vb``),
    but for those under the prefixes it discarded: values of other lives (an ended life's
    shared item that a new life kept) and of none (``put_items``). The sweep spares other
    lives' values for an hour (they may be a new life's, put before its first transaction):
    such a value, whose record the removal deleted, is known to be no longer needed, and
    left to the sweep it stayed for good when the run was removed within that hour. Only
    keys under the run's own prefix: a record copied from another run names its objects."""
    blobs = {blob for entry in found for attribute in ("bl", "vb")
             if isinstance(blob := entry.get(attribute, {}).get("S"), str)
             and blob.startswith(f"{run_key}/") and not blob.startswith(tuple(discarded))}
    return sorted(blobs)


def _pinned(reading: _Reading, item: Mapping[str, Any]) -> _Reading:
    """A damaged run's reading takes the incarnation of the newest checkpoint it meets."""
    if reading.incarnation is not None:
        return reading
    parsed = _ids.parse_checkpoint_id(_text(item, "cid"))
    if parsed is None:
        return reading
    return dataclasses.replace(reading, incarnation=parsed[1])


def _header(item: Mapping[str, Any]) -> CheckpointHeader:
    return CheckpointHeader(
        sequence=layout.sequence_of(_text(item, "SK")),
        checkpoint_id=_text(item, "cid"),
        created_at=_number(item, "ca") or 0.0,
        expires_at=_number(item, "x"),
        header=_bytes(item, "hdr"),
    )


def _changed(
    state: _RunState, book: Book, removed: Sequence[int], items_floor: int | None,
    **record_changes: Any,
) -> _RunState:
    """The run state once ``book`` (already updated) no longer holds ``removed``;
    ``record_changes`` go into the run record. Owners beyond the run item's capacity are
    folded under its floor."""
    head = msgspec.structs.replace(
        state.record,
        checkpoint_count=book.count,
        expires_at=book.expires_at(),
        **record_changes,
    )
    owners = state.owners - set(removed)
    floor = state.owner_floor
    if len(owners) > layout.OWNERS_CAPACITY:
        floor = sorted(owners)[len(owners) - layout.OWNERS_CAPACITY // 2]
        owners = frozenset(owner for owner in owners if owner >= floor)
    return _RunState(head, state.rev + 1, book, owners, floor, items_floor=items_floor,
                     label_ttl=_label_ttl(state.label_ttl, book, head.labels),
                     nesting=state.nesting, nesting_all=state.nesting_all,
                     delete_tokens=state.delete_tokens)


def _shards() -> range:
    return range(layout.INDEX_SHARDS)


def _snake(operation: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", operation).lower()


def _live_filter(names: _Names, now: float) -> str:
    return (
        f"(attribute_not_exists({names('exp')}) OR {names('exp')} > {names.value(_n(now))}) "
        f"AND attribute_not_exists({names('pg')})"
    )


def _delete(pk: str, sort_key: str) -> dict[str, Any]:
    return {"Delete": {"Key": {"PK": _s(pk), "SK": _s(sort_key)}}}


def _run_guard(pk: str, run_item: Mapping[str, Any] | None) -> dict[str, Any]:
    """A ``ConditionCheck`` that the run item is still the one read (its incarnation, even
    one of another type; none when it had none), or still absent."""
    names = _Names()
    if run_item is None:
        condition = f"attribute_not_exists({names('PK')})"
    elif "inc" in run_item:
        condition = f"{names('inc')} = {names.value(run_item['inc'])}"
    else:
        condition = f"attribute_exists({names('PK')}) AND attribute_not_exists({names('inc')})"
    return {"ConditionCheck": {"Key": {"PK": _s(pk), "SK": _s(layout.RUN_SK)},
                               "ConditionExpression": condition, **names.params()}}


def _same_life(names: _Names, state: _RunState) -> str:
    """The condition that the run item is still ``state`` as this process read it: its
    revision, run id and life (incarnation). Every change of the run raises the revision,
    but a removal deletes the run item, and a new life then counts from 0 again (with the
    same run id): only the incarnation tells it from the ended life at the same revision.
    The run id tells a run item copied over from another run."""
    return (f"{names('rev')} = {names.value(_n(state.rev))} AND "
            f"{names('rid')} = {names.value(_s(state.record.run_id))} AND "
            f"{names('inc')} = {names.value(_s(state.record.incarnation))}")


def _pin_check(run_key: str, state: _RunState | None) -> dict[str, Any]:
    """The ``ConditionCheck`` of the run item in each of an append's pin transactions (see
    ``DynamoDBStore._pin``): what the append's own transaction expects of it, the run item
    as read (``state``: its revision and life, see :func:`_same_life`), or no run item
    (``None``: a first checkpoint written blind). Every change of the run raises the
    revision (an append, a ``delete``, a status change, a new life, the marks of
    ``delete_run`` and of the cleanup loop), and a life begun after a removal has another
    incarnation: a pin of a writer whose run moved on lands nothing. The refusal returns
    the run item, from which the append plans again."""
    names = _Names()
    if state is None:
        condition = f"attribute_not_exists({names('PK')})"
    else:
        condition = _same_life(names, state)
    return {"ConditionCheck": {
        "Key": {"PK": _s(layout.partition(run_key)), "SK": _s(layout.RUN_SK)},
        "ConditionExpression": condition,
        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        **names.params(),
    }}


def _fenceable(run_item: Mapping[str, Any]) -> bool:
    """Whether ``delete_run`` can fence the run item it read (see :func:`_run_fence`): one
    whose record and revision are sound (a damaged one is only checked, as its ``rev`` may
    not take an ``ADD``)."""
    return (_record_problem(run_item) is None
            and isinstance(run_item.get("rev", {}).get("N"), str))


def _run_fence(pk: str, run_item: Mapping[str, Any]) -> dict[str, Any]:
    """``delete_run``'s first transaction's hold on the run item it read (its incarnation,
    as :func:`_run_guard` checks): marked as being purged, its revision raised, so that no
    write of its life lands after it (appends are conditioned on the revision, owned item
    writes on the mark) while a new life may still replace it. The write token stays: an
    append whose reply was lost still finds its own there."""
    names = _Names()
    return {"Update": {
        "Key": {"PK": _s(pk), "SK": _s(layout.RUN_SK)},
        "UpdateExpression": (f"SET {names('pg')} = {names.value({'BOOL': True})} "
                             f"ADD {names('rev')} {names.value(_n(1))}"),
        "ConditionExpression": f"{names('inc')} = {names.value(run_item['inc'])}",
        **names.params(),
    }}


def _delete_if(
    pk: str, sort_key: str, attribute: str, value: str, *, fatal: bool = False
) -> dict[str, Any]:
    """Delete a record only while ``attribute`` still holds ``value`` (or it is gone);
    ``fatal``: a failed condition cancels the whole change."""
    names = _Names()
    operation = _delete(pk, sort_key)
    if fatal:
        operation["_fatal"] = True
    operation["Delete"]["ConditionExpression"] = (
        f"attribute_not_exists({names('PK')}) OR {names(attribute)} = {names.value(_s(value))}"
    )
    operation["Delete"].update(names.params())
    return operation


def _one_change_per_anchor(
    removal: _Removal, additions: _Additions, expiries: Mapping[int, float | None], now: float
) -> set[str]:
    """An append that writes an owned item at the key of one that a checkpoint it removes
    owns (a transaction takes one operation per record). Owned by a live checkpoint (pruned
    by ``keep_latest``), that item is held: the append's is not written (its condition keeps
    a live one) and the removal takes it, as on every store. Owned by an expired checkpoint,
    it is absent: the append's replaces it, and the removal leaves the key alone. Returns
    the groups of the append's operations left out."""
    dropped: set[str] = set()
    for key, (owner, anchor) in removal.anchors.items():
        group = f"owned:{key}"
        if not any(operation.get("_group") == group for operation in additions.owned):
            continue
        if owner not in expiries or is_live(expiries[owner], now):
            dropped.add(group)
        else:
            removal.deletes = [operation for operation in removal.deletes
                               if operation is not anchor]
    additions.owned = [operation for operation in additions.owned
                       if operation.get("_group") not in dropped]
    return dropped


def _owned_delete(pk: str, key: str, owner: int) -> dict[str, Any]:
    """Delete an item only while it still belongs to ``owner`` (it may have been rewritten)."""
    names = _Names()
    operation = _delete(pk, layout.item_sk(key))
    operation["Delete"]["ConditionExpression"] = f"{names('o')} = {names.value(_n(owner))}"
    operation["Delete"].update(names.params())
    return operation


def _checkpoint_put(run_key: str, item: dict[str, Any], incarnation: str) -> dict[str, Any]:
    """Put a checkpoint, never over one of the same incarnation: whatever the run item says,
    an acknowledged checkpoint is not overwritten (a leftover of an earlier incarnation is)."""
    names = _Names()
    ours = names.value(_s(f"ck-{run_key}-{incarnation}-"))
    return {"Put": {
        "Item": item,
        "ConditionExpression": (
            f"attribute_not_exists({names('PK')}) OR NOT begins_with({names('cid')}, {ours})"
        ),
        **names.params(),
    }}


def _append_memo(
    run_key: str, token: str, sequence: int, incarnation: str, now: float
) -> dict[str, Any]:
    """Put the memo of the append writing ``token`` (create-only): a resend of its transaction
    is refused by it, and the refusal returns it (see :func:`_memoed`). It is in the expiry
    index, due ``MEMO_SECONDS`` after ``now``: the cleanup loop removes it, native TTL or not."""
    names = _Names()
    return {"_memo": True, "Put": {
        "Item": {
            "PK": _s(layout.memo_partition(token)),
            "SK": _s(layout.partition(run_key)),
            "wt": _s(token),
            "seq": _n(sequence),
            "inc": _s(incarnation),
            "xpk": _s(f"x#{layout.shard_of(run_key)}"),
            "xat": _n(now + layout.MEMO_SECONDS),
            layout.TTL_ATTRIBUTE: _n(layout.ttl_of(time.time() + layout.MEMO_SECONDS)),
        },
        "ConditionExpression": f"attribute_not_exists({names('PK')})",
        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        **names.params(),
    }}


def _memo_slots(operations: Sequence[Mapping[str, Any]]) -> int:
    """How many of ``operations`` are memo puts (0 or 1)."""
    return sum(1 for operation in operations if operation.get("_memo"))


def _on_aws(endpoint_url: str | None) -> bool:
    """Whether a client with this ``endpoint_url`` (``None``: its region's) talks to AWS."""
    if not endpoint_url:
        return True
    host = (urlsplit(endpoint_url).hostname or "").lower().rstrip(".")
    return any(host == suffix or host.endswith(f".{suffix}") for suffix in _AWS_HOSTS)


def _flag(name: str, value: str) -> bool:
    """A boolean store URL option."""
    try:
        return _FLAGS[value.lower()]
    except KeyError:
        raise ConfigurationError(
            f"dynamodb:// URL option {name}={value!r} is not a boolean (true or false)"
        ) from None


def _memoed(cancelled: _Cancelled) -> bool:
    """Whether an append's transaction was refused by its own memo: an earlier send of it
    landed. The memo found must be the one it puts (same token, run, sequence, incarnation)."""
    for index, operation in enumerate(cancelled.operations):
        if operation.get("_memo") and cancelled.failed(index):
            found = cancelled.item(index) or {}
            ours = operation["Put"]["Item"]
            return all(found.get(name) == ours[name] for name in ("SK", "wt", "seq", "inc"))
    return False


def _offset_ops(
    run_key: str, key: str, unit: _Early | None, lowering: dict[str, Any] | None, at_least: int
) -> list[dict[str, Any]]:
    """The writes of shared item ``key``'s count in a first append that also lowers it (the
    ended life's checkpoints named the key): its raise with the item's put (``unit``), its
    lowering, or, when they cancel out, a check of it; each made to hold only while the count
    is ``at_least`` (see :func:`_holding`)."""
    if unit is not None:
        return [*unit.operations[:-1], _holding(unit.operations[-1], at_least)]
    if lowering is not None:
        return [_holding(lowering, at_least)]
    check = {"ConditionCheck": {"Key": {"PK": _s(layout.partition(run_key)),
                                        "SK": _s(layout.counter_sk(key))}}}
    return [_holding(check, at_least)]


def _holding(operation: dict[str, Any], at_least: int) -> dict[str, Any]:
    """``operation`` on a shared item's count, made to hold only while the count is at least
    ``at_least`` (it exists): the counts a first append reads from the ended life it replaces
    and offsets against its own. A removal of that life that deleted the count meanwhile
    fails the condition, which cancels the whole transaction (``_fatal``, not ``_gone``:
    nothing was condemned, the append reads the leftovers again); so does the raise sent
    instead of a writing one (``_instead``) whose item put was dropped."""
    action_name = next(name for name in operation if not name.startswith("_"))
    action = dict(operation[action_name])
    names = dict(action.get("ExpressionAttributeNames", {}))
    values = dict(action.get("ExpressionAttributeValues", {}))
    names["#held"], values[":held"] = "rc", _n(at_least)
    condition = "#held >= :held"
    if "ConditionExpression" in action:
        condition = f"({action['ConditionExpression']}) AND {condition}"
    action.update(ConditionExpression=condition, ExpressionAttributeNames=names,
                  ExpressionAttributeValues=values)
    held = {name: value for name, value in operation.items() if name != "_gone"}
    held.update({action_name: action, "_fatal": True})
    if "_instead" in operation:
        held["_instead"] = _holding(operation["_instead"], at_least)
    return held


def _life_check(run_key: str, incarnation: str) -> dict[str, Any]:
    """A transaction's check that the run item is of life ``incarnation`` and not being
    removed (no ``pg``)."""
    names = _Names()
    return {"ConditionCheck": {
        "Key": {"PK": _s(layout.partition(run_key)), "SK": _s(layout.RUN_SK)},
        "ConditionExpression": (f"{names('inc')} = {names.value(_s(incarnation))} AND "
                                f"attribute_not_exists({names('pg')})"),
        **names.params(),
    }}


def _pin_claim(run_key: str, token: str, at: float, *, held: bool) -> dict[str, Any]:
    """The pin record's operation in a pin transaction of a run's first append (no run item,
    see ``DynamoDBStore._pin``). Its first pin transaction takes the record, whatever it
    holds: a put of the append's write token, stamped ``pa`` (``at``) like the pins, so that
    ``delete_run`` keeps it as long as their pins and takes it with the first of them
    (no later pin restamps it). Each later one (``held``) checks it still holds that token.
    So the pins of another first append, under way or failed, are no obstacle: this one
    writes over them (see :func:`_over_appended`), and that one, whose record is taken,
    lands nothing more (its pins and its transaction check the record). No clock decides
    which append's values are at the keys an append lands naming.

    The record carries native TTL at the grace after that pin (``PIN_GRACE_SECONDS``, after
    which ``delete_run`` takes it for stale too): it matters only until a life of the run
    begins, and a first append that pins nothing neither reads nor deletes it, so a run
    removed by native TTL alone (no cleanup loop) would otherwise keep it forever. Removed
    under a first append still under way, it refuses that append, never lands it wrong."""
    key = {"PK": _s(layout.partition(run_key)), "SK": _s(layout.PIN_SK)}
    if not held:
        ttl = layout.ttl_of(at + items_layout.PIN_GRACE_SECONDS)
        return {"Put": {"Item": {**key, "wt": _s(token), "pa": _n(at), "ttl": _n(ttl)}}}
    names = _Names()
    return {"ConditionCheck": {
        "Key": key, "ConditionExpression": f"{names('wt')} = {names.value(_s(token))}",
        **names.params(),
    }, "_fatal": True, "_overtaken": True}


def _pins_held(
    run_key: str, previous: _RunState | None, additions: _Additions, token: str
) -> list[dict[str, Any]]:
    """A first append's delete, over no run item, of the pin record its pins took, only
    while it still holds its write token (see :func:`_pin_claim`): another first append's
    pins took it since (they may have written over this one's), or a removal of the run
    deleted it with this one's pins (a life created and removed since the pins, or
    ``delete_run`` taking them for stale). Refused, nothing is written
    (:class:`SharedItemGone`: append it again with the values). Landed, no pin record is
    left. Over a run item, the pins checked it as the transaction does (see
    :func:`_same_life`): none is needed."""
    if previous is not None or not additions.claimed:
        return []
    names = _Names()
    return [{"Delete": {
        "Key": {"PK": _s(layout.partition(run_key)), "SK": _s(layout.PIN_SK)},
        "ConditionExpression": f"{names('wt')} = {names.value(_s(token))}", **names.params(),
    }, "_fatal": True, "_overtaken": True}]


def _overtaken(cancelled: _Cancelled) -> bool:
    """Whether a first append's check of its pin record refused a cancelled transaction."""
    return any(operation.get("_overtaken") and cancelled.failed(index)
               for index, operation in enumerate(cancelled.operations))


def _items_refused(
    run_key: str, sequence: int, cancelled: _Cancelled, additions: _Additions
) -> SharedItemGone | None:
    """The error of an append's transaction refused for its shared items: its pin record
    taken (unless the run item refused it too: a life began, which decides), or items it
    names without writing them removed (whatever else failed too)."""
    if not cancelled.failed(0) and _overtaken(cancelled):
        return _overtaken_error(run_key, sequence, additions)
    gone = _gone(cancelled)
    return _gone_error(run_key, sequence, gone) if gone else None


def _overtaken_error(run_key: str, sequence: int, additions: _Additions) -> SharedItemGone:
    keys = tuple(sorted(set(additions.pinned) | additions.pinned_shared))
    return SharedItemGone(
        f"run {run_key}: checkpoint {sequence} wrote {len(keys)} shared items before its "
        "transaction, and another first append of the run wrote over them since, or a "
        "removal of the run took them; nothing was acknowledged: append it again with "
        "their values", keys=keys)


def _purge_guard(run_key: str, incarnation: str) -> dict[str, Any]:
    """A transaction's check that the run item is still the one marked for purging."""
    names = _Names()
    return {"ConditionCheck": {
        "Key": {"PK": _s(layout.partition(run_key)), "SK": _s(layout.RUN_SK)},
        "ConditionExpression": (
            f"{names('inc')} = {names.value(_s(incarnation))} AND "
            f"{names('pg')} = {names.value({'BOOL': True})}"
        ),
        **names.params(),
    }}


def _run_update(
    run_key: str, old: _RunState, new: _RunState, removed: Sequence[int], token: str,
    nesting: Sequence[str] = (),
) -> dict[str, Any]:
    """The run item's update in an append or removal: conditioned on its revision and run id,
    and on no removed checkpoint having gained owned items we do not know about.
    ``nesting``: the items the append writes nested items under, added to ``nk`` (unless
    ``nka``)."""
    names = _Names()
    head = new.record
    assignments = {
        "ls": _n(head.latest_sequence),
        "cnt": _n(new.book.count),
        "ua": _n(head.updated_at),
        "rev": _n(new.rev),
        "bk": _b(layout.BOOK_ENCODER.encode(new.book)),
        "wt": _s(token),
        **_expiry_attributes(run_key, new.book),
    }
    if new.owner_floor != old.owner_floor:
        assignments["ofl"] = _n(new.owner_floor)
    if new.items_floor is not None and new.items_floor != old.items_floor:
        assignments["rfl"] = _n(new.items_floor)
    if new.label_ttl is not None:
        assignments["lttl"] = _n(new.label_ttl)
    if new.nesting_all and not old.nesting_all:
        assignments["nka"] = {"BOOL": True}
    if new.delete_tokens != old.delete_tokens:
        assignments["dwt"] = _strings(new.delete_tokens)
    sets = ", ".join(f"{names(k)} = {names.value(v)}" for k, v in assignments.items())
    gone = [name for name in (*_EXPIRY_ATTRIBUTES, "lttl") if name not in assignments]
    if "nka" in assignments:
        gone.append("nk")
    expression = f"SET {sets}"
    if gone:
        expression += " REMOVE " + ", ".join(names(name) for name in gone)
    # Added every time, never set from this process's copy: the cleanup loop takes keys out
    # without a new revision (see ``_end_nesting``), so the copy may list more than the item.
    if nesting and not new.nesting_all:
        listed = {"SS": sorted(set(nesting))}
        expression += f" ADD {names('nk')} {names.value(listed)}"
    dropped = sorted(old.owners - new.owners)
    if dropped:
        expression += f" DELETE {names('own')} {names.value({'NS': [str(s) for s in dropped]})}"
    # And on its run id and life: a run item copied over from another run, or a new life
    # begun after a removal, may carry the same revision.
    condition = _same_life(names, old)
    for sequence in sorted(set(removed)):
        if not old.may_own(sequence):
            condition += f" AND NOT contains({names('own')}, {names.value(_n(sequence))})"
    return {
        "Key": {"PK": _s(layout.partition(run_key)), "SK": _s(layout.RUN_SK)},
        "UpdateExpression": expression,
        "ConditionExpression": condition,
        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        **names.params(),
    }


def _replace_owners(state: _RunState, owners: frozenset[int]) -> _RunState:
    return dataclasses.replace(state, owners=owners)


def _target(operation: Mapping[str, Any]) -> tuple[str, str]:
    """``(PK, SK)`` of the record a transaction operation writes or checks."""
    action = next(value for name, value in operation.items() if not name.startswith("_"))
    record = action.get("Item") or action["Key"]
    return record["PK"]["S"], record["SK"]["S"]


def _spared(removal: _Removal, writes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``writes`` of a run's first checkpoint without the deletes of leftovers at the same
    records (a transaction names each record once): those writes replace the leftovers, so
    their condition (no live record there) is dropped."""
    doomed = {_target(operation) for operation in removal.deletes}
    written = {_target(operation) for operation in writes}
    removal.deletes = [op for op in removal.deletes if _target(op) not in written]
    spared: list[dict[str, Any]] = []
    for operation in writes:
        put = operation.get("Put")
        if put is None or "ConditionExpression" not in put or _target(operation) not in doomed:
            spared.append(operation)
            continue
        bare = {name: value for name, value in put.items() if name not in (
            "ConditionExpression", "ReturnValuesOnConditionCheckFailure",
            "ExpressionAttributeNames", "ExpressionAttributeValues")}
        spared.append({**operation, "Put": bare})
    return spared


def _item_size(item: Mapping[str, Any]) -> int:
    size = _ITEM_OVERHEAD
    for name, value in item.items():
        size += len(name) + _value_size(value)
    return size


def _value_size(value: Mapping[str, Any]) -> int:
    inner = next(iter(value.values()))
    if isinstance(inner, (bytes, str)):
        return len(inner.encode() if isinstance(inner, str) else inner)
    if isinstance(inner, list):
        return 3 + sum(1 + _value_size(entry) for entry in inner)
    return 8


def _check_item(item: Item) -> None:
    """What this store takes of an item beyond ``check_items``: an owner it can key."""
    if item.owner is not None and not 0 <= item.owner <= layout.MAX_SEQUENCE:
        raise ValidationError(f"item owner must be a checkpoint sequence, got {item.owner!r:.40}")


def _may_be_item_key(key: object) -> bool:
    """Whether an item could be stored at ``key`` (reads of other keys find nothing)."""
    try:
        item_key_bytes(key, MAX_ITEM_KEY_BYTES, "an item key")
    except ValidationError:
        return False
    return True


def _gone(cancelled: _Cancelled) -> list[str]:
    """Shared items a cancelled append named without writing them that the cleanup loop
    removed (their counts are condemned, see ``counter_raise``)."""
    return [operation["_gone"] for index, operation in enumerate(cancelled.operations)
            if "_gone" in operation and cancelled.failed(index)]


def _gone_error(run_key: str, sequence: int, keys: Sequence[str]) -> SharedItemGone:
    shown = ", ".join(repr(key[:40]) for key in keys[:3]) + (" ..." if len(keys) > 3 else "")
    return SharedItemGone(
        f"run {run_key}: checkpoint {sequence} names shared items a removal (the cleanup "
        f"loop's, or the run's) took since they were written ({shown}); nothing was "
        "written: append it again with their values", keys=tuple(keys))


class _NothingWritten(ConflictError):
    """A create-only write refused by a live item at one of its keys; nothing stays."""


def _taken(cancelled: _Cancelled) -> str:
    keys = [_text(operation["Put"]["Item"], "SK")[2:]
            for index, operation in enumerate(cancelled.operations)
            if cancelled.failed(index) and "Put" in operation]
    return f"item {keys[0] if keys else '?'!r} already exists"


def _resent(cancelled: _Cancelled, token: str) -> bool:
    """Whether a transaction was refused only because an earlier send of it landed (its
    reply lost): every refused record carries its write token."""
    failed = [index for index in range(len(cancelled.operations)) if cancelled.failed(index)]
    return cancelled.retried and bool(failed) and all(
        (cancelled.item(index) or {}).get("wt") == _s(token) for index in failed)


def _put_group(
    run_key: str, item: Item, value: Value, token: str, now: float, create_only: bool
) -> list[dict[str, Any]]:
    """The records of one ``put_items`` item, conditioned so that nothing is overwritten
    unseen: with ``create_only`` a live item; otherwise an item owned by another live
    checkpoint (whose value, next to that checkpoint, must go with the write)."""
    names = _Names()
    if create_only:
        condition = _no_live_item(names, now)
    elif item.owner is None:
        condition = f"attribute_not_exists({names('o')}) OR {names('x')} <= {names.value(_n(now))}"
    else:
        condition = _same_owner(names, item.owner, now)
    if item.owner is None:
        record = items_layout.plain_record(run_key, item.key, value, item.expires_at, token)
        return [items_layout.put_op(record, condition, names, _fatal=True, _absent=create_only)]
    anchor = items_layout.anchor_record(run_key, item.key, item.owner, item.expires_at, token,
                                        indexed=item.expires_at is not None)
    return [
        items_layout.put_op(items_layout.owned_record(
            run_key, item.key, item.owner, value, item.expires_at, token)),
        items_layout.put_op(anchor, condition, names, _fatal=True, _absent=create_only),
    ]


def _owned_group(
    run_key: str, item: Item, value: Value, expires_at: float | None, token: str, now: float,
    *, if_absent: bool,
) -> list[dict[str, Any]]:
    """The records of one ``put_owned_items`` item (its checkpoint's expiry): with
    ``if_absent`` dropped, value and anchor, where a live item is."""
    assert item.owner is not None
    names = _Names()
    anchor = items_layout.anchor_record(run_key, item.key, item.owner, expires_at, token,
                                        indexed=False)
    value_put = items_layout.put_op(items_layout.owned_record(
        run_key, item.key, item.owner, value, expires_at, token))
    if if_absent:
        group = f"owned:{item.key}"
        return [{**value_put, "_group": group},
                items_layout.put_op(anchor, _no_live_item(names, now), names, _group=group,
                                    _absent=True)]
    return [value_put, items_layout.put_op(anchor, _same_owner(names, item.owner, now), names,
                                           _fatal=True)]


def _no_live_item(names: _Names, now: float) -> str:
    """No item at the key, or an expired one: the condition of the puts that keep a live
    item (create-only, insert-if-absent), tagged ``_absent``: refused by an anchor, such a put
    also replaces it when the value it points to is damaged (see ``DynamoDBStore._commit``)."""
    return f"attribute_not_exists({names('PK')}) OR {names('x')} <= {names.value(_n(now))}"


def _wall_clock() -> float:
    """The clock pins are stamped and judged by (``pa``, see ``PIN_GRACE_SECONDS``): a
    physical time, as several processes compare it, and ``delete_run`` takes no ``now``."""
    return time.time()


def _over_appended(plan: _Plan, now: float) -> _Plan:
    """A first append's puts of shared items, each also over an item an append wrote
    (``pa``), not only where no live item is: with no run item, or an ended life's, no held
    checkpoint names it. In the transaction and in its pins alike, whatever its age: it is an
    ended or removed life's, a failed append's pin, or the pin of another first append
    under way, which lands nothing more once this one took the pin record (see
    :func:`_pin_claim`) or once this one lands (a first append's transaction needs no run
    item, its pins none). Items of ``put_items`` (no ``pa``) are kept, as by every write."""
    pins = [dataclasses.replace(entry, operations=[
        _put_over_appended(operation, now) for operation in entry.operations])
        for entry in plan.pins]
    operations = [_put_over_appended(operation, now) for operation in plan.operations]
    return dataclasses.replace(plan, operations=operations, pins=pins)


def _put_over_appended(operation: dict[str, Any], now: float) -> dict[str, Any]:
    """``operation`` again, when it is the conditional put of a shared item, over an item
    an append wrote too. A put that replaces a leftover record the change deletes carries no
    condition (see :func:`_spared`)."""
    group = operation.get("_group")
    if "ConditionExpression" not in operation.get("Put", {}) or not (
            isinstance(group, str) and group.startswith(items_layout.shared_group(""))):
        return operation
    names = _Names()
    put = {name: value for name, value in operation["Put"].items()
           if not name.startswith("Expression")}
    put["ConditionExpression"] = (f"{_no_live_item(names, now)} OR "
                                  f"attribute_exists({names('pa')})")
    put.update(names.params())
    return {**operation, "Put": put}


def _same_owner(names: _Names, owner: int, now: float) -> str:
    """No live item at the key, or one of the same owner: anything else is owned elsewhere."""
    return (f"attribute_not_exists({names('o')}) OR {names('o')} = {names.value(_n(owner))} "
            f"OR {names('x')} <= {names.value(_n(now))}")


def _moved_from_other_owners(run_key: str, cancelled: _Cancelled) -> list[dict[str, Any]]:
    """The operations of a cancelled item write, again, now replacing the items owned by
    other checkpoints that refused it: the put accepts that very record, and the value it
    leaves next to its former owner is deleted with it (only while unchanged)."""
    pk = layout.partition(run_key)
    operations = list(cancelled.operations)
    for index, operation in enumerate(cancelled.operations):
        old = cancelled.item(index)
        if not cancelled.failed(index) or "Put" not in operation or not old:
            continue
        if _replaceable(operation) and _damaged_item(old):
            operations[index] = _over_damaged(operation, old)
            continue
        if "o" not in old:
            continue
        key = _text(old, "SK")[2:]
        token = old.get("wt", _s(""))
        names = _Names()
        put = {name: value for name, value in operation["Put"].items()
               if name not in ("ExpressionAttributeNames", "ExpressionAttributeValues")}
        put["ConditionExpression"] = (
            f"{names('o')} = {names.value(old['o'])} AND {names('wt')} = {names.value(token)}")
        put.update(names.params())
        operations[index] = {**operation, "Put": put}
        operations.append(items_layout.delete_when(
            pk, layout.owned_sk(_int(old, "o"), key), "wt", token))
    return operations


def _run_of(records: Mapping[str, Mapping[str, Any]], run_key: str) -> _RunState | None:
    """The run item among ``records`` (read with them), ``None`` when absent or damaged:
    then no owner is taken for removed (see :func:`_left_over`)."""
    item = records.get(layout.RUN_SK)
    if item is None:
        return None
    try:
        return _state_of(item, layout.RUN_SK, run_key)
    except CorruptCheckpointError:
        return None


def _left_over(run: _RunState | None, owner: int) -> bool:
    """Whether items owned by checkpoint ``owner`` are leftovers of its removal: a removal
    whose deletes did not fit in its transaction sends the rest after it, and a process
    stopped in between leaves them. The run item (``run``, read after the anchor) no longer
    holds the owner although its sequence was taken (sequences are never used twice in a
    life): such an anchor is not live. An owner in the back of a long run's book, which
    counts its checkpoints without detailing them, is taken as held; so is any owner when
    the run item is absent or damaged."""
    if run is None or owner > run.record.latest_sequence:
        return False
    return not run.book.holds(owner)


def _damaged_item(record: Mapping[str, Any]) -> bool:
    """Whether an item record (at ``i#<key>``) is one that reads report as damaged (see
    ``DynamoDBStore._item_live``, ``_follow_anchors``, ``_values_of``): an expiry, owner or
    value of another type, or no value at all."""
    try:
        with _malformed(_text(record, "SK")):
            _number(record, "x")
            if "o" in record:
                _int(record, "o")
            elif "vb" in record:
                _text(record, "vb")
            elif "v" in record:
                _bytes(record, "v")
            else:
                return True
    except CorruptCheckpointError:
        return True
    return False


def _replaceable(operation: Mapping[str, Any]) -> bool:
    """Whether an operation is an item put that may replace a damaged record (one not sent
    again over one already: that record changed meanwhile, handled as usual)."""
    put = operation.get("Put")
    return (put is not None and not operation.get("_over_damage")
            and _text(put["Item"], "SK").startswith(layout.ITEM_PREFIX))


def _over_damaged(operation: dict[str, Any], old: Mapping[str, Any] | None) -> dict[str, Any]:
    """A put refused by a damaged record, again, now replacing that record: only while it is
    still the record read (its write token: every write of the store brings a new one, so a
    concurrent write is never overwritten) or gone. What the record pointed to (an owned
    value, a blob) stays: an owned value goes with its checkpoint, a blob with the sweep of
    those no item names."""
    names = _Names()
    put = {name: value for name, value in operation["Put"].items()
           if name not in ("ExpressionAttributeNames", "ExpressionAttributeValues")}
    token = (old or {}).get("wt")
    read = (f"attribute_not_exists({names('wt')})" if token is None
            else f"{names('wt')} = {names.value(token)}")
    put["ConditionExpression"] = f"attribute_not_exists({names('PK')}) OR {read}"
    put.update(names.params())
    return {**operation, "Put": put, "_over_damage": True}


def _owner_covered(run_key: str, owner: int) -> dict[str, Any]:
    """A check that the run item counts ``owner`` among the checkpoints that may own items
    (so removing it reads what it owns) and is not being purged."""
    names = _Names()
    at = names.value(_n(owner))
    return {"ConditionCheck": {
        "Key": {"PK": _s(layout.partition(run_key)), "SK": _s(layout.RUN_SK)},
        "ConditionExpression": (
            f"attribute_not_exists({names('pg')}) AND ("
            f"(attribute_exists({names('rfl')}) AND {names('rfl')} <= {at}) OR "
            f"contains({names('own')}, {at}) OR "
            f"(attribute_exists({names('ofl')}) AND {names('ofl')} > {at}))"
        ),
        **names.params(),
    }}


def _checkpoint_live(run_key: str, sequence: int, checkpoint_id: str, now: float
                     ) -> dict[str, Any]:
    names = _Names()
    return {"ConditionCheck": {
        "Key": {"PK": _s(layout.partition(run_key)), "SK": _s(layout.checkpoint_sk(sequence))},
        "ConditionExpression": (
            f"{names('cid')} = {names.value(_s(checkpoint_id))} AND "
            f"(attribute_not_exists({names('x')}) OR {names('x')} > {names.value(_n(now))})"
        ),
        **names.params(),
    }}


def _count_delete(run_key: str, key: str) -> dict[str, Any]:
    """The delete of shared item ``key``'s count, only while it is zero and not fenced (a
    fenced count, condemned too, goes when its fence's day is up: see ``_sweep_shared``)."""
    names = _Names()
    return {"Delete": {
        "Key": {"PK": _s(layout.partition(run_key)), "SK": _s(layout.counter_sk(key))},
        "ConditionExpression": (f"attribute_not_exists({names('nf')}) AND "
                                f"(attribute_not_exists({names('rc')}) OR "
                                f"{names('rc')} <= {names.value(_n(0))})"),
        **names.params(),
    }}


def _nested_deletes(
    run_key: str, key: str, token: str, records: Sequence[Mapping[str, Any]], until: float
) -> tuple[list[list[dict[str, Any]]], int]:
    """The transactions deleting the first of ``records`` (loose items nested under ``key``,
    whose removal marked ``token``) that fit in one, and how many: each checks the mark
    first; the last one then checks that the count of each key ``key`` is nested under is
    zero and not due (see ``parent_check``) and condemns the count of each key it deletes
    and of each key between such a key and ``key`` (each once), only while zero, until
    ``until``, then deletes, each only while its record is the one read. The checks and
    marks beyond one transaction (keys nested that deep), outermost first, are fences
    (see ``fence``) sent before it, in their own."""
    pk = layout.partition(run_key)
    check = items_layout.nesting_check(run_key, key, token)
    since = until - layout.CONDEMNED_SECONDS  # when the removal began
    above = _parents(key)
    under = nested_prefix(key)
    between: dict[str, None] = {}  # in order, outermost first
    deletes: list[dict[str, Any]] = []
    for record in records:
        sort_key = _text(record, "SK")
        item_key = sort_key[len(layout.ITEM_PREFIX):]
        new = [k for k in (*_parents(item_key), item_key) if k.startswith(under)
               and k not in between]
        if deletes and 1 + len(above) + len(between) + len(new) + len(deletes) + 1 > (
                _TRANSACTION_LIMIT):
            break
        between.update(dict.fromkeys(new))
        deletes.append(items_layout.delete_when(pk, sort_key, "wt", record.get("wt", _s(""))))
    cut = max(0, 1 + len(above) + len(between) + len(deletes) - _TRANSACTION_LIMIT)
    guarded = [*above, *between]
    fences = [items_layout.fence(run_key, k, since, until) for k in guarded[:cut]]
    last = [check,
            *(items_layout.parent_check(run_key, k) for k in above[cut:]),
            *(items_layout.condemn_unnamed(run_key, k, since, until)
              for k in list(between)[max(0, cut - len(above)):]),
            *deletes]
    return [*([check, *chunk] for chunk in _slices(fences, _TRANSACTION_LIMIT - 1)), last], len(
        deletes)


def _parents(key: str) -> list[str]:
    """The keys ``key`` is nested under (each key before a ``/``, none empty), shortest
    first."""
    return [key[:cut] for cut, char in enumerate(key) if char == NESTING and cut]


def _removal_due(count: Mapping[str, Any] | None) -> bool:
    """Whether a count says its key's own removal is due: at zero, lowered since the key was
    last removed (the count's expiry-index entry at 0), no removal under way or done."""
    return (count is not None and "gn" not in count and "np" not in count
            and _int(count, "rc") <= 0 and not (_number(count, "xat") or 0.0) > 0)


def _slices(operations: Sequence[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    """``operations`` in consecutive lists of at most ``size``."""
    return [list(operations[start:start + size]) for start in range(0, len(operations), size)]


def _named_or_under(key: str, named: set[str]) -> bool:
    """Whether ``key`` is in ``named`` or nested under a key in it."""
    return bool(named) and (key in named or any(parent in named for parent in _parents(key)))


def _chunks(groups: Sequence[list[dict[str, Any]]], size: int) -> list[list[list[dict[str, Any]]]]:
    """Groups of operations in chunks of at most ``size`` operations and of the records one
    transaction takes, a group never split."""
    chunks: list[list[list[dict[str, Any]]]] = [[]]
    count = weight = 0
    for group in groups:
        heavy = sum(_item_size(op["Put"]["Item"]) for op in group if "Put" in op)
        if chunks[-1] and (count + len(group) > size or weight + heavy > _TRANSACTION_BYTES):
            chunks.append([])
            count = weight = 0
        chunks[-1].append(group)
        count += len(group)
        weight += heavy
    return [chunk for chunk in chunks if chunk]


def parse_size(text: str) -> int:
    """``350KB``, ``1MB``, ``200000``: bytes (KB = 1,024 bytes, as DynamoDB counts)."""
    match = _SIZE.fullmatch(text)
    unit = match[2].upper() if match else ""
    if match is None or unit not in _UNITS:
        raise ConfigurationError(f"threshold must be a size such as 350KB or 300000, got {text!r}")
    return int(match[1]) * _UNITS[unit]
