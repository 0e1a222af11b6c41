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

Commits are idempotent: each append writes a random token into the run item and the
checkpoint item, so a transaction retried after its reply was lost, and refused because it
had been applied, is recognised as this append's own. A checkpoint put never replaces a
checkpoint of the same incarnation, whatever the run item says: a run item put back from an
older copy makes appends fail as a damaged record instead of overwriting acknowledged data.

Costs in requests (steady state, one writer per run): append 1 (+1 S3 PUT when large, +1 S3
DeleteObjects when a large checkpoint is pruned, +1 Query when a pruned checkpoint owns
items, +1 Query per ``REFILL`` appends in a run holding more than the book details); latest
1 Query (+1 GET when large); get 1 TransactGetItems (+1 GET); headers 1 Query for the first
page, a Query and a GetItem (concurrent) for later pages; list_runs and count_runs one Query
per index shard per page, issued concurrently.

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
import functools
import logging
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import anyio
import msgspec
from botocore.exceptions import BotoCoreError, ClientError

from fastcheckpoint import _ids
from fastcheckpoint._config import RetryPolicy
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
from fastcheckpoint.stores import _dynamodb_layout as layout
from fastcheckpoint.stores._aws import AwsEndpoint, error_code, open_client, translate
from fastcheckpoint.stores._base import (
    CheckpointHeader,
    ExpiryCleanup,
    Item,
    RunDamage,
    RunRecord,
    StoredCheckpoint,
    check_keep_latest,
    check_options,
    is_live,
    item_key_bytes,
    key_successor,
)
from fastcheckpoint.stores._dynamodb_layout import Book
from fastcheckpoint.stores._dynamodb_provision import (
    LIFECYCLE_RULE,
    provision_blob_bucket,
    provision_table,
)
from fastcheckpoint.stores._loops import GivenClientLoop, PerLoop
from fastcheckpoint.stores._s3_io import Bucket, gather, pair

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

_STORE: Final = "DynamoDBStore"
_DRIVER: Final = "aiobotocore"

DEFAULT_THRESHOLD: Final = 350 * 1024
"""Encoded checkpoints larger than this (bytes) go to S3; DynamoDB's item limit is 400 KB."""
_MAX_THRESHOLD: Final = 400 * 1024 - 2048  # room for the key and the other attributes
_ITEM_OVERHEAD: Final = 200  # attribute names, key, id, numbers: generous, so we never hit 400 KB
_MAX_VALUE_BYTES: Final = 390 * 1024
_TRANSACTION_LIMIT: Final = 100
_PURGE_BATCH: Final = _TRANSACTION_LIMIT // 2
_BATCH_WRITE_LIMIT: Final = 25
_BATCH_GET_LIMIT: Final = 100
_APPEND_ATTEMPTS: Final = 8
_CACHE_SIZE: Final = 4096

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
_URL_OPTIONS: Final = frozenset({"bucket", "prefix", "threshold", "region", "endpoint_url"})
_KEYWORD_OPTIONS: Final = frozenset(
    {"bucket", "prefix", "threshold", "region", "endpoint_url", "retry", "dynamodb_client",
     "s3_client", "session"}
)


# -- attribute values ----------------------------------------------------------------------


def _s(value: str) -> dict[str, Any]:
    return {"S": value}


def _n(value: float) -> dict[str, Any]:
    # repr is the shortest exact decimal of a float; DynamoDB keeps 38 significant digits.
    return {"N": repr(float(value)) if isinstance(value, float) else str(value)}


def _b(value: bytes) -> dict[str, Any]:
    return {"B": value}


def _number(item: Mapping[str, Any], name: str) -> float | None:
    value = item.get(name)
    return None if value is None else float(value["N"])


def _int(item: Mapping[str, Any], name: str, default: int = 0) -> int:
    value = item.get(name)
    return default if value is None else int(value["N"])


def _text(item: Mapping[str, Any], name: str, default: str = "") -> str:
    value = item.get(name)
    return default if value is None else str(value["S"])


def _bytes(item: Mapping[str, Any], name: str) -> bytes:
    value = item.get(name)
    return b"" if value is None else bytes(value["B"])


class _Names:
    """Placeholders for attribute names (``status``, ``data``, ``ttl`` are reserved words)."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}
        self.values: dict[str, Any] = {}

    def __call__(self, attribute: str) -> str:
        for known, name in self.names.items():
            if name == attribute:
                return known
        placeholder = f"#a{len(self.names)}"
        self.names[placeholder] = attribute
        return placeholder

    def value(self, value: dict[str, Any]) -> str:
        placeholder = f":v{len(self.values)}"
        self.values[placeholder] = value
        return placeholder

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if self.names:
            params["ExpressionAttributeNames"] = dict(self.names)
        if self.values:
            params["ExpressionAttributeValues"] = dict(self.values)
        return params


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

    def live(self, now: float) -> bool:
        return not self.purging and is_live(self.record.expires_at, now)

    def may_own(self, sequence: int) -> bool:
        return sequence in self.owners or sequence < self.owner_floor


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
    )
    if not record.run_id or not record.status or "#" in record.status:
        raise ValueError("run id or status is empty or malformed")
    if not _INCARNATION.fullmatch(record.incarnation):
        raise ValueError(f"incarnation {record.incarnation[:20]!r} is malformed")
    if record.latest_sequence < 0 or record.checkpoint_count < 0 or record.version < 0:
        raise ValueError("negative counters")
    return record


def _record_problem(item: Mapping[str, Any]) -> str | None:
    """Why a run item or index entry does not hold a usable run record, or ``None``."""
    try:
        _record_of(item)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return f"its record attributes are malformed ({type(exc).__name__}: {exc})"
    return None


def _state_of(item: Mapping[str, Any], where: str) -> _RunState:
    """The run item as a :class:`_RunState`; :class:`_DamagedRun` if it cannot be used."""
    try:
        record = _record_of(item)
        book = layout.BOOK_DECODER.decode(_bytes(item, "bk"))
        rev = int(item["rev"]["N"])
        owners = frozenset(int(value) for value in item.get("own", {}).get("NS", ()))
        owner_floor = _int(item, "ofl")
        purging = bool(item.get("pg", {}).get("BOOL", False))
    except (KeyError, TypeError, ValueError, AttributeError, msgspec.DecodeError) as exc:
        raise _DamagedRun(f"it is unreadable ({type(exc).__name__}: {exc})", key=where) from exc
    problem = book.problem(record.checkpoint_count, record.latest_sequence)
    if problem is not None:
        raise _DamagedRun(problem, key=where)
    return _RunState(record, rev, book, owners, owner_floor, purging)


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
    return item


# -- plans ---------------------------------------------------------------------------------


@dataclass
class _Plan:
    """One append's (or removal's) transaction and what to do once it commits."""

    operations: list[dict[str, Any]]
    state: _RunState
    removed_blobs: list[str]
    overflow: list[dict[str, Any]] = field(default_factory=list)
    """Deletes that did not fit in the transaction (more than 100 operations): done after."""


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


class _Cancelled(Exception):
    """A transaction cancelled because a condition failed (nothing was written)."""

    def __init__(self, reasons: list[dict[str, Any]], *, retried: bool) -> None:
        super().__init__("transaction cancelled")
        self.reasons = reasons
        self.retried = retried
        """Whether the driver sent it more than once: an earlier attempt may have landed."""

    def failed(self, index: int) -> bool:
        return index < len(self.reasons) and self.reasons[index].get("Code") == _CONDITION_FAILED

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

    @classmethod
    def of(cls, state: _RunState) -> _Reading:
        record = state.record
        return cls(record.status, record.incarnation, state.book, record.latest_sequence)

    def accepts(self, sequence: int) -> bool:
        if self.book is None or sequence > self.latest_sequence:
            return True  # the item decides (a record behind its log hides nothing)
        return self.book.holds(sequence)

    def status_of(self, sequence: int) -> str:
        """The status reported with checkpoint ``sequence``: ``"active"`` past the record."""
        return "active" if sequence > self.latest_sequence else self.status


_DAMAGED_READING: Final = _Reading("active", None, None, -1)
"""Reads of a run whose record is damaged: ``status_of`` is always ``\"active\"``."""


# -- the store -----------------------------------------------------------------------------


class DynamoDBStore(ExpiryCleanup):
    """Runs, checkpoints and items in one DynamoDB table; payloads above ``threshold`` in S3.

    Give ``table`` (and ``bucket`` for checkpoints above the threshold), plus ``region`` /
    ``endpoint_url``, and the store builds and owns its clients, one pair per event loop; or
    pass ``dynamodb_client`` (and ``s3_client``), which it uses and never closes, in the event
    loop they were first used in. Create the table and bucket with :meth:`provision`
    (``fastcheckpoint init URL``). Runs on asyncio only.
    """

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
        return _Clients(dynamodb, s3, stack, blobs)

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
        await self._clients.aclose()

    # -- provisioning ---------------------------------------------------------------------

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
        for operation in operations:
            next(iter(operation.values()))["TableName"] = self.table
        action = f"DynamoDB TransactWriteItems on table {self.table}"
        for attempt in range(self._retry.max_retries + 1):
            try:
                await client.transact_write_items(TransactItems=operations)
                return
            except ClientError as exc:
                if error_code(exc) != "TransactionCanceledException":
                    raise translate(exc, action) from exc
                reasons = cast(
                    list[dict[str, Any]], list(exc.response.get("CancellationReasons") or [])
                )
                codes = {str(reason.get("Code", "None")) for reason in reasons}
                if _CONDITION_FAILED in codes:
                    retried = int(exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0))
                    raise _Cancelled(reasons, retried=retried > 0) from exc
                if codes - _TRANSIENT_REASONS - {"None"} or attempt == self._retry.max_retries:
                    raise _cancellation_error(reasons, action, attempt) from exc
            except BotoCoreError as exc:
                raise translate(exc, action) from exc
            await anyio.sleep(self._retry.delay(attempt))

    async def _commit(self, operations: list[dict[str, Any]], *, keep: int) -> None:
        """TransactWriteItems; conditional deletes from index ``keep`` on whose condition
        fails (an owned item rewritten meanwhile) are dropped and the rest retried. A failed
        condition before ``keep`` raises :class:`_Cancelled`."""
        operations = list(operations)
        while operations:
            try:
                await self._transact(operations)
                return
            except _Cancelled as cancelled:
                failed = {index for index in range(len(operations)) if cancelled.failed(index)}
                if not failed or min(failed) < keep:
                    raise
                operations = [op for index, op in enumerate(operations) if index not in failed]

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
            state = _state_of(item, self._where(run_key, layout.RUN_SK))
        except _DamagedRun:
            self._cache.pop(run_key, None)
            raise
        self._remember(run_key, state)
        return state

    # -- checkpoint log: append -------------------------------------------------------------

    async def append(
        self,
        run_key: str,
        record: StoredCheckpoint,
        *,
        run: RunRecord,
        keep_latest: int | None,
        now: float,
    ) -> str:
        check_keep_latest(keep_latest)
        token = secrets.token_hex(8)
        item = self._checkpoint_item(run_key, record, token)
        blob: str | None = None
        if item and _item_size(item) > self.threshold:
            blob = layout.blob_key(run_key, run.incarnation, record.sequence, secrets.token_hex(4))
            del item["pl"]
            item["bl"] = _s(blob)
            if _item_size(item) > _MAX_THRESHOLD:
                raise ValidationError(
                    f"checkpoint header is {len(record.header)} bytes: too large for a DynamoDB "
                    "item even with the payload in S3; keep tags and step names small"
                )
            await (await self._bucket()).put(blob, record.payload)
        outcome = _Outcome()
        try:
            status = await self._append(
                run_key, record, item, blob, run, keep_latest, now, token, outcome)
            outcome.committed = True
            return status
        finally:
            if blob is not None and not outcome.committed:
                await self._forget_blob(blob, outcome)

    async def _forget_blob(self, blob: str, outcome: _Outcome) -> None:
        """The blob of an append that failed: deleted when no transaction of it can have
        landed; kept when one may have (its reply lost, the call cancelled meanwhile), since
        a committed checkpoint would then point to nothing. A blob no checkpoint points to
        is an orphan, which the cleanup loop removes."""
        if not outcome.unknown:
            await self._discard_blobs([blob])
            return
        logger.warning(
            "an append failed after sending its transaction, which may have landed; keeping "
            "its S3 blob %s (the cleanup loop removes it if no checkpoint points to it)", blob,
        )

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
        if record.expires_at is not None:
            item["x"] = _n(record.expires_at)
            item["ttl"] = _n(layout.ttl_of(record.expires_at))
            item["xpk"] = _s(f"x#{layout.shard_of(run_key)}")
            item["xat"] = _n(record.expires_at)
        return item

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
                plan = await self._plan_first(run_key, item, blob, seed, previous, now, token)
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
                                             now, token)
            outcome.unknown = True
            try:
                await self._commit(plan.operations, keep=2)
            except _Cancelled as cancelled:
                ours = await self._own_commit(run_key, cancelled, record.sequence, token)
                outcome.unknown = False  # nothing of ours landed, or we know it did
                if ours is not None:
                    plan.state = ours
                    return await self._committed(run_key, plan)
                if not cancelled.failed(0):
                    raise self._behind_its_log(run_key, record.sequence) from cancelled
                state = self._state_after(run_key, cancelled)
                known = fresh = True
                continue
            return await self._committed(run_key, plan)
        head_record = None if state is None else state.record
        raise SequenceConflict(
            latest_sequence=None if head_record is None else head_record.latest_sequence,
            incarnation=None if head_record is None else head_record.incarnation,
        )

    async def _committed(self, run_key: str, plan: _Plan) -> str:
        self._remember(run_key, plan.state)
        await self._finish(run_key, plan)
        return plan.state.record.status

    def _applied(self, run_key: str, cancelled: _Cancelled, token: str) -> _RunState | None:
        """The run item after a transaction that changed it with ``token``, if the cancelled
        one is its resend, refused because the first send was applied (its reply lost)."""
        old = cancelled.item(0)
        if old is None or not cancelled.failed(0) or old.get("wt") != _s(token):
            return None
        return _state_of(old, self._where(run_key, layout.RUN_SK))

    async def _own_commit(
        self, run_key: str, cancelled: _Cancelled, sequence: int, token: str
    ) -> _RunState | None:
        """The run item after this append, if the cancelled transaction is a resend of one
        that was applied (its reply was lost): the token it wrote tells."""
        applied = self._applied(run_key, cancelled, token)
        old = cancelled.item(0)
        if applied is not None or old is None or not cancelled.retried:
            return applied
        # Another writer may have appended after our first attempt landed: our checkpoint
        # item still carries the token.
        try:
            state = _state_of(old, self._where(run_key, layout.RUN_SK))
        except _DamagedRun:
            return None
        if state.record.latest_sequence < sequence:
            return None
        names = _Names()
        response = await self._call(
            "GetItem",
            Key={"PK": _s(layout.partition(run_key)), "SK": _s(layout.checkpoint_sk(sequence))},
            ProjectionExpression=names("wt"),
            ConsistentRead=True,
            **names.params(),
        )
        return state if response.get("Item", {}).get("wt") == _s(token) else None

    def _state_after(self, run_key: str, cancelled: _Cancelled) -> _RunState | None:
        """The run item after a transaction cancelled by the run item's condition: the
        cancellation carries it (none when there is no run item)."""
        old = cancelled.item(0)
        try:
            state = None if old is None else _state_of(old, self._where(run_key, layout.RUN_SK))
        except _DamagedRun:
            self._cache.pop(run_key, None)
            raise
        self._remember(run_key, state)
        return state

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
    ) -> _Plan:
        """Create the run (or replace an expired one, removing its leftovers)."""
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
        state = _RunState(head, rev, book, frozenset())
        names = _Names()
        run_put: dict[str, Any] = {"Item": _run_item(run_key, state, token)}
        if previous is None:
            run_put["ConditionExpression"] = f"attribute_not_exists({names('PK')})"
        else:
            run_put["ConditionExpression"] = f"{names('rev')} = {names.value(_n(previous.rev))}"
        run_put["ReturnValuesOnConditionCheckFailure"] = "ALL_OLD"
        run_put.update(names.params())
        operations = [{"Put": run_put}, _checkpoint_put(run_key, item, head.incarnation)]
        cleanup: list[dict[str, Any]] = []
        removed_blobs: list[str] = []
        if previous is not None:
            cleanup, removed_blobs = await self._leftovers(run_key, previous)
        room = _TRANSACTION_LIMIT - len(operations)
        return _Plan(operations + cleanup[:room], state, removed_blobs, cleanup[room:])

    async def _leftovers(
        self, run_key: str, previous: _RunState
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """Deletes of an expired run's checkpoints, markers and owned items; its blobs.

        Markers and owned items come first, so that they ride in the new run's first
        transaction; checkpoint deletes, which may not fit and run after it, are conditioned
        on the old checkpoint id: another process may append to the new run meanwhile."""
        names = _Names()
        found = await self._query_all(
            KeyConditionExpression=(
                f"{names('PK')} = {names.value(_s(layout.partition(run_key)))} AND "
                f"{names('SK')} BETWEEN {names.value(_s(layout.MARKER_PREFIX))} "
                f"AND {names.value(_s(layout.CHECKPOINT_END))}"
            ),
            ProjectionExpression=f"{names('SK')}, {names('bl')}, {names('cid')}",
            ConsistentRead=True,
            **names.params(),
        )
        markers: list[dict[str, Any]] = []
        checkpoints: list[dict[str, Any]] = []
        blobs = _blob_keys(run_key, previous, previous.book.blobs)
        pk = layout.partition(run_key)
        owned: dict[str, int] = {}
        for entry in found:
            sort_key = _text(entry, "SK")
            if sort_key == layout.checkpoint_sk(0):
                continue  # overwritten by the new run's first checkpoint in the same transaction
            if "bl" in entry:
                blobs.append(_text(entry, "bl"))
            if sort_key.startswith(layout.MARKER_PREFIX):
                markers.append(_delete(pk, sort_key))
                owned.setdefault(layout.marker_item_key(sort_key), layout.sequence_of(sort_key))
            else:
                checkpoints.append(_delete_if(pk, sort_key, "cid", _text(entry, "cid")))
        # One operation per item in a transaction: an item with two markers is deleted once.
        items = [_owned_delete(pk, key, owner) for key, owner in owned.items()]
        return markers + items + checkpoints, sorted(set(blobs))

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
    ) -> _Plan:
        book = state.book.copy()
        wanted = book.wanted(now, keep_latest, coming=1)
        if wanted:
            await self._refill(run_key, state, book, wanted)
        book.add(record.sequence, record.expires_at, _suffix(blob), capacity=self._book_capacity)
        before = book.copy()
        removed = [_held_in(run_key, state, before, s) for s in book.prune(now, keep_latest)]
        put = _checkpoint_put(run_key, item, state.record.incarnation)
        in_back = book.back is not None and record.sequence >= book.back.start
        return await self._plan_change(
            run_key, state, book, removed, [put], now=now, token=token,
            added=[record.expires_at] if in_back else [],
            latest_sequence=record.sequence, updated_at=now,
        )

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
        **record_changes: Any,
    ) -> _Plan:
        """The transaction taking the run from ``state`` to ``book`` (already without
        ``removed``): run update first, then ``operations``, then the removals' deletes.
        ``added``: expiries of the checkpoints this change puts in the back of ``book``."""
        if book.lowers_latest([held.expires_at for held in removed], now):
            excluded = {held.sequence for held in removed}
            await self._rescan_latest(run_key, state, book, excluded, added)
        sequences = [held.sequence for held in removed]
        new_state = _changed(state, book, sequences, **record_changes)
        update = {"Update": _run_update(run_key, state, new_state, sequences, token)}
        deletes = await self._removal_deletes(run_key, state, sequences)
        everything = [update, *operations, *deletes]
        return _Plan(
            everything[:_TRANSACTION_LIMIT],
            new_state,
            [held.blob for held in removed if held.blob is not None],
            everything[_TRANSACTION_LIMIT:],
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

    async def _removal_deletes(
        self, run_key: str, state: _RunState, removed: Sequence[int]
    ) -> list[dict[str, Any]]:
        """Deletes of checkpoints and of the items they own (found by their markers)."""
        pk = layout.partition(run_key)
        deletes = [_delete(pk, layout.checkpoint_sk(sequence)) for sequence in removed]
        owning = sorted(sequence for sequence in set(removed) if state.may_own(sequence))
        if not owning:
            return deletes
        names = _Names()
        markers = await self._query_all(
            KeyConditionExpression=(
                f"{names('PK')} = {names.value(_s(pk))} AND {names('SK')} BETWEEN "
                f"{names.value(_s(layout.marker_sk(owning[0], '')))} AND "
                f"{names.value(_s(layout.marker_sk(owning[-1] + 1, '')))}"
            ),
            ProjectionExpression=names("SK"),
            ConsistentRead=True,
            **names.params(),
        )
        owned: dict[str, int] = {}
        chosen = set(owning)
        for marker in markers:
            sort_key = _text(marker, "SK")
            owner = layout.sequence_of(sort_key)
            if owner in chosen:
                deletes.append(_delete(pk, sort_key))
                owned.setdefault(layout.marker_item_key(sort_key), owner)
        deletes += [_owned_delete(pk, key, owner) for key, owner in owned.items()]
        return deletes

    async def _finish(self, run_key: str, plan: _Plan) -> None:
        """After a commit: deletes that did not fit, then blobs of removed checkpoints.

        The append (or delete) has happened; a failure here leaves garbage that the cleanup
        loop removes, so it is logged rather than raised.
        """
        try:
            if plan.overflow:
                await self._guarded_deletes(plan.overflow)
        except Exception:
            logger.warning(
                "run %s: could not remove %d leftover records after commit; the cleanup loop "
                "will retry", run_key, len(plan.overflow), exc_info=True,
            )
        await self._discard_blobs(plan.removed_blobs)

    async def _discard_blobs(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        with anyio.CancelScope(shield=True):
            try:
                await (await self._bucket()).delete(list(keys))
            except Exception:
                logger.warning(
                    "could not delete %d S3 blobs (first %s); purge_expired removes orphans "
                    "when it next visits the run", len(keys), keys[0], exc_info=True,
                )

    async def _guarded_deletes(self, deletes: list[dict[str, Any]]) -> None:
        """Deletes in transactions of up to 100, dropping those whose condition fails."""
        for start in range(0, len(deletes), _TRANSACTION_LIMIT):
            await self._commit(deletes[start : start + _TRANSACTION_LIMIT], keep=0)

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
            state = _state_of(run_item, self._where(run_key, layout.RUN_SK))
        except _DamagedRun as damage:
            self._cache.pop(run_key, None)
            logger.warning("%s; reading its checkpoints from their own items", damage)
            return _DAMAGED_READING
        self._remember(run_key, state)
        if state.live(now) or (include_expired and not state.purging):
            return _Reading.of(state)
        return None

    async def get(
        self, run_key: str, sequence: int, *, now: float
    ) -> tuple[StoredCheckpoint, str] | None:
        if sequence < 0 or sequence > layout.MAX_SEQUENCE:
            return None
        run_item, item = await self._snapshot(run_key, sequence)
        if not item:
            return None
        reading = self._reading(run_key, run_item, now)
        if reading is None or not reading.accepts(sequence):
            return None
        found = await self._checkpoint(run_key, item, reading, now)
        return None if found is None else (found, reading.status_of(sequence))

    async def _snapshot(
        self, run_key: str, sequence: int
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The run item and checkpoint ``sequence``, in one request and one consistent view."""
        client = (await self._current()).dynamodb
        pk = _s(layout.partition(run_key))
        keys = [{"PK": pk, "SK": _s(layout.RUN_SK)},
                {"PK": pk, "SK": _s(layout.checkpoint_sk(sequence))}]
        request = [{"Get": {"TableName": self.table, "Key": key}} for key in keys]
        action = f"DynamoDB TransactGetItems on {self.table}"
        for attempt in range(self._retry.max_retries + 1):
            try:
                response = await client.transact_get_items(TransactItems=request)
            except ClientError as exc:
                # Cancelled by a transaction writing one of the two items: read again.
                if error_code(exc) != "TransactionCanceledException":
                    raise translate(exc, action) from exc
                await anyio.sleep(self._retry.delay(attempt))
                continue
            except BotoCoreError as exc:
                raise translate(exc, action) from exc
            responses = response.get("Responses", [])
            run_item = responses[0].get("Item") if responses else None
            item = responses[1].get("Item") if len(responses) > 1 else None
            return run_item, item
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
        if blob is not None:
            fetched = await (await self._bucket()).get(blob)
            if fetched is None:
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
        )

    async def latest(self, run_key: str, *, now: float) -> tuple[StoredCheckpoint, str] | None:
        names = _Names()
        params: dict[str, Any] = {
            "KeyConditionExpression": (
                f"{names('PK')} = {names.value(_s(layout.partition(run_key)))} AND "
                f"{names('SK')} BETWEEN {names.value(_s(layout.checkpoint_sk(0)))} "
                f"AND {names.value(_s(layout.RUN_SK))}"
            ),
            "ScanIndexForward": False,
            "ConsistentRead": True,
            # The run item and the newest checkpoint: all a restore needs in steady state.
            "Limit": 2,
            **names.params(),
        }
        reading: _Reading | None = None
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
                sequence = layout.sequence_of(sort_key)
                if not reading.accepts(sequence):
                    continue
                reading = _pinned(reading, item)
                found = await self._checkpoint(run_key, item, reading, now)
                if found is not None:
                    return found, self._status_of(run_key, reading, sequence)
            last = response.get("LastEvaluatedKey")
            if not last:
                return None
            params["ExclusiveStartKey"] = last
            params["Limit"] = 16

    def _status_of(self, run_key: str, reading: _Reading, sequence: int) -> str:
        if reading.book is not None and sequence > reading.latest_sequence:
            logger.warning(
                "the run record %s is behind its log (checkpoint %d above its latest sequence "
                "%d); reporting the run active", self._where(run_key, layout.RUN_SK), sequence,
                reading.latest_sequence,
            )
        return reading.status_of(sequence)

    async def headers(
        self,
        run_key: str,
        *,
        before: int | None,
        limit: int,
        now: float,
        include_expired: bool = False,
    ) -> tuple[list[CheckpointHeader], str | None]:
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
            run_item, found = await self._header_pages(params, limit, now, include_expired)
        else:
            # The run item sorts above every checkpoint, out of reach of a page below
            # ``before``: it is read beside the Query.
            (_, found), run_item = await pair(
                lambda: self._header_pages(params, limit, now, include_expired),
                lambda: self._raw_run_item(run_key),
            )
        reading = self._reading(run_key, run_item, now, include_expired=include_expired)
        if reading is None:
            return [], None
        page = self._filter_headers(run_key, found, reading, now, include_expired, limit)
        return page, reading.status

    async def _header_pages(
        self, params: dict[str, Any], limit: int, now: float, include_expired: bool
    ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """Query pages until ``limit`` candidate headers (or the end): the run item (when
        the range reaches it) and the checkpoint items, without their payloads."""
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
                found.append(item)
                if include_expired or is_live(_expiry(item), now):
                    candidates += 1
            last = response.get("LastEvaluatedKey")
            if not last or candidates >= limit:
                return run_item, found
            params["ExclusiveStartKey"] = last

    def _filter_headers(
        self,
        run_key: str,
        found: list[dict[str, Any]],
        reading: _Reading,
        now: float,
        include_expired: bool,
        limit: int,
    ) -> list[CheckpointHeader]:
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
        return result

    # -- checkpoint log: removal ------------------------------------------------------------

    async def delete(self, run_key: str, sequence: int, *, checkpoint_id: str) -> bool:
        parsed = _ids.parse_checkpoint_id(checkpoint_id)
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
                applied = self._applied(run_key, cancelled, token)
                if applied is not None:  # our first send did it; its reply was lost
                    plan.state = applied
                    await self._committed(run_key, plan)
                    return True
                if cancelled.failed(1):
                    return False  # the checkpoint at this sequence has another id
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
        plan = await self._plan_change(
            run_key, state, book, [removed], [], now=float("-inf"), token=token)
        names = _Names()
        target = plan.operations[1]["Delete"]
        target["ConditionExpression"] = (
            f"attribute_not_exists({names('PK')}) OR "
            f"{names('cid')} = {names.value(_s(checkpoint_id))}"
        )
        target.update(names.params())
        return plan

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
            if not item or not _text(item, "cid").startswith(ours):
                return None
            return _Held(sequence, _number(item, "x"), _text(item, "bl") or None)

        found = await gather([functools.partial(entry, sequence) for sequence in sequences])
        return [held for held in found if held is not None]

    async def delete_run(self, run_key: str) -> int:
        pk = layout.partition(run_key)
        found = await self._partition(run_key, "inc", "cid")
        self._cache.pop(run_key, None)
        keys = [_text(entry, "SK") for entry in found]
        removed = sum(1 for key in keys if key.startswith(layout.CHECKPOINT_PREFIX))
        await self._batch_write([
            {"DeleteRequest": {"Key": {"PK": _s(pk), "SK": _s(key)}}}
            for key in keys if key != layout.RUN_SK
        ])
        # Then the blobs of the incarnations listed, then the run item: until it is gone,
        # the run is visible (a retry after a crash finds its incarnation, its blobs) and
        # no new incarnation can start, whose blobs would share the run key's prefix.
        if self.bucket is not None:
            for incarnation in sorted(_incarnations(run_key, found)):
                await self._discard_prefix(f"{run_key}/{incarnation}/")
        if layout.RUN_SK in keys:
            await self._call("DeleteItem", Key={"PK": _s(pk), "SK": _s(layout.RUN_SK)})
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

    async def get_run(self, run_key: str, *, now: float) -> RunRecord | None:
        state = await self._read_state(run_key)
        return state.record if state is not None and state.live(now) else None

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
        if not isinstance(status, str) or not status or "#" in status:
            raise ValidationError(f"run status must be a non-empty string without '#': {status!r}")
        names = _Names()
        shard = layout.shard_of(run_key)
        condition = (
            f"{names('inc')} = {names.value(_s(incarnation))} AND "
            f"{names('ver')} = {names.value(_n(version))} AND "
            f"attribute_not_exists({names('pg')}) AND "
            f"(attribute_not_exists({names('exp')}) OR {names('exp')} > {names.value(_n(now))})"
        )
        token = secrets.token_hex(8)
        update = (
            f"SET {names('st')} = {names.value(_s(status))}, "
            f"{names('dat')} = {names.value(_b(data))}, "
            f"{names('ver')} = {names.value(_n(version + 1))}, "
            f"{names('ua')} = {names.value(_n(now))}, "
            f"{names('wt')} = {names.value(_s(token))}, "
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
                state = None if not old else _state_of(old, where)
            except _DamagedRun:
                self._cache.pop(run_key, None)
                raise
            self._remember(run_key, state)
            if state is not None and old is not None and old.get("wt") == _s(token):
                return state.record  # a resend of this very change: the first was applied
            if state is None or not state.live(now):
                raise CheckpointNotFound(f"no live run with key {run_key}")
            raise ConflictError(
                f"run changed concurrently (now {state.record.incarnation}/"
                f"{state.record.version}, expected {incarnation}/{version})"
            )
        try:
            state = _state_of(response["Attributes"], where)
        except _DamagedRun:
            # Only the bookkeeping is damaged (the record matched): the status change stands.
            self._cache.pop(run_key, None)
            return _record_of(response["Attributes"])
        self._remember(run_key, state)
        return state.record

    async def list_runs(
        self, *, status: str | None, limit: int, cursor: str | None, now: float
    ) -> tuple[list[RunRecord], str | None]:
        if cursor is not None and not _CURSOR.fullmatch(cursor):
            raise ValidationError(f"malformed run listing cursor {cursor!r}")
        if limit < 1:
            return [], cursor

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
        next_cursor = _text(chosen[-1], "gord") if chosen and more else None
        return records, next_cursor

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

    async def count_runs(self, *, status: str | None, now: float) -> int:
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

    async def put_items(
        self, run_key: str, items: Sequence[Item], *, create_only: bool = False, now: float
    ) -> None:
        for item in items:
            _check_item(item)
        if not items:
            return
        pk = layout.partition(run_key)
        owners = sorted({item.owner for item in items if item.owner is not None})
        if owners:
            await self._add_owners(run_key, owners)
        records = [_item_record(pk, run_key, item) for item in items]
        markers = [
            {"PK": _s(pk), "SK": _s(layout.marker_sk(item.owner, item.key))}
            for item in items if item.owner is not None
        ]
        if not create_only:
            await self._batch_write([{"PutRequest": {"Item": r}} for r in records + markers])
            return
        await self._put_create_only(pk, records, markers, now)

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
                return  # a damaged run item: its rebuild finds the owners from the markers
            owners = [owner for owner in owners if owner >= floor]
        cached = self._cache.get(run_key)
        if cached is not None and owners:
            self._remember(run_key, _replace_owners(cached, cached.owners | set(owners)))

    async def _put_create_only(
        self,
        pk: str,
        records: list[dict[str, Any]],
        markers: list[dict[str, Any]],
        now: float,
    ) -> None:
        # The token tells a resend refused because its first send was applied (reply lost).
        token = _s(secrets.token_hex(8))
        operations: list[dict[str, Any]] = []
        for record in records:
            names = _Names()
            operations.append({"Put": {
                "Item": {**record, "wt": token},
                "ConditionExpression": (
                    f"attribute_not_exists({names('PK')}) OR {names('x')} <= {names.value(_n(now))}"
                ),
                "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                **names.params(),
            }})
        operations += [{"Put": {"Item": marker}} for marker in markers]
        written: list[dict[str, Any]] = []
        for start in range(0, len(operations), _TRANSACTION_LIMIT):
            chunk = operations[start : start + _TRANSACTION_LIMIT]
            try:
                await self._transact(chunk)
            except _Cancelled as cancelled:
                failed = [index for index in range(len(chunk)) if cancelled.failed(index)]
                if cancelled.retried and all(
                    (cancelled.item(index) or {}).get("wt") == token for index in failed
                ):
                    written += [op["Put"]["Item"] for op in chunk]
                    continue
                taken = [_text(chunk[index]["Put"]["Item"], "SK")[2:] for index in failed]
                if written:  # undo earlier chunks: all or nothing
                    await self._batch_write([
                        {"DeleteRequest": {"Key": {"PK": _s(pk), "SK": item["SK"]}}}
                        for item in written
                    ])
                raise ConflictError(f"item {taken[0]!r} already exists") from cancelled
            written += [op["Put"]["Item"] for op in chunk]

    async def get_items(
        self, run_key: str, keys: Sequence[str], *, now: float
    ) -> dict[str, bytes]:
        pk = layout.partition(run_key)
        wanted = list(dict.fromkeys(keys))
        result: dict[str, bytes] = {}
        for start in range(0, len(wanted), _BATCH_GET_LIMIT):
            request: dict[str, Any] = {
                self.table: {
                    "Keys": [{"PK": _s(pk), "SK": _s(layout.item_sk(k))} for k in
                             wanted[start : start + _BATCH_GET_LIMIT]],
                    "ConsistentRead": True,
                }
            }
            for attempt in range(self._retry.max_retries + 2):
                response = await self._send("BatchGetItem", RequestItems=request)
                for item in response.get("Responses", {}).get(self.table, []):
                    if is_live(_number(item, "x"), now):
                        result[_text(item, "SK")[2:]] = _bytes(item, "v")
                request = response.get("UnprocessedKeys") or {}
                if not request:
                    break
                await anyio.sleep(self._retry.delay(attempt))
            else:
                raise StoreUnavailableError(
                    f"DynamoDB BatchGetItem on table {self.table}: keys still unprocessed after "
                    "retries; the table is throttling, raise its capacity"
                )
        return result

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
        if limit < 1:
            return []
        low = layout.item_sk(prefix)
        high = layout.item_sk(key_successor(prefix)) if prefix else layout.ITEM_END
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
        result: list[tuple[str, bytes]] = []
        while True:
            response = await self._call("Query", **params)
            for item in response.get("Items", []):
                sort_key = _text(item, "SK")
                # BETWEEN includes ``high``, which is exclusive here.
                if sort_key != high and is_live(_number(item, "x"), now):
                    result.append((sort_key[2:], _bytes(item, "v")))
                    if len(result) >= limit:
                        return result
            last = response.get("LastEvaluatedKey")
            if not last:
                return result
            params["ExclusiveStartKey"] = last

    async def delete_items(self, run_key: str, keys: Sequence[str]) -> int:
        pk = layout.partition(run_key)
        unique = list(dict.fromkeys(keys))

        async def delete_one(key: str) -> int:
            response = await self._call(
                "DeleteItem",
                Key={"PK": _s(pk), "SK": _s(layout.item_sk(key))},
                ReturnValues="ALL_OLD",
            )
            old = response.get("Attributes")
            if not old:
                return 0
            if "o" in old:
                await self._call(
                    "DeleteItem",
                    Key={"PK": _s(pk), "SK": _s(layout.marker_sk(_int(old, "o"), key))},
                )
            return 1

        return sum(await gather([functools.partial(delete_one, key) for key in unique]))

    # -- maintenance ----------------------------------------------------------------------

    async def purge_expired(self, *, now: float, limit: int) -> tuple[int, bool]:
        limit = max(1, limit)
        pages = await gather(
            [functools.partial(self._due_in_shard, shard, now, limit) for shard in _shards()]
        )
        due = sorted(
            (item for items, _ in pages for item in items),
            key=lambda item: (_number(item, "xat") or 0.0, _text(item, "PK"), _text(item, "SK")),
        )
        more = len(due) > limit or any(truncated for _, truncated in pages)
        by_run: dict[str, list[str]] = {}
        for entry in due[:limit]:
            pk, sort_key = _text(entry, "PK"), _text(entry, "SK")
            if sort_key.startswith(layout.ITEM_PREFIX):
                await self._purge_item(pk, sort_key, now)
            else:
                by_run.setdefault(pk.removeprefix("run#"), []).append(sort_key)
        removed = 0
        for run_key, sort_keys in by_run.items():
            count, finished = await self._purge_run(run_key, sort_keys, now, limit)
            removed += count
            more = more or not finished
        return removed, not more

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
        if "o" in old:
            marker = layout.marker_sk(_int(old, "o"), sort_key[2:])
            await self._call("DeleteItem", Key={"PK": _s(pk), "SK": _s(marker)})

    async def _purge_run(
        self, run_key: str, sort_keys: Sequence[str], now: float, budget: int
    ) -> tuple[int, bool]:
        """Remove what of one run expired, prompted by its due index entries (checkpoints,
        or the run item itself): ``(checkpoints removed, finished)``."""
        due = sorted(
            layout.sequence_of(key) for key in sort_keys
            if key.startswith(layout.CHECKPOINT_PREFIX)
        )
        for _ in range(_APPEND_ATTEMPTS):
            try:
                state = await self._read_state(run_key)
            except _DamagedRun as damage:
                return await self._purge_damaged(run_key, due, sort_keys, now, damage)
            if state is None:
                await self._purge_unheld(run_key, due, now)
                return 0, True
            if state.purging or not is_live(state.record.expires_at, now):
                return await self._purge_whole_run(run_key, state, now)
            unheld = [s for s in due if s > state.record.latest_sequence or not state.book.holds(s)]
            await self._purge_unheld(run_key, unheld, now)
            planned = await self._plan_expired(run_key, state, due, now, budget)
            if planned is None:
                return 0, True  # a run item due but live: the index is behind, it catches up
            plan, count, finished = planned
            try:
                await self._commit(plan.operations, keep=1)
            except _Cancelled as cancelled:
                self._state_after(run_key, cancelled)
                continue
            await self._committed(run_key, plan)
            await self._reconcile_blobs(run_key, plan.state)
            return count, finished
        return 0, False

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
                ConditionExpression=f"{names('rev')} = {names.value(_n(state.rev))}",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
                **names.params(),
            )
            # Refused, unless as the resend of this very mark (its reply lost): then it is ours.
            if marked is None and (old or {}).get("wt") != _s(token):
                return 0, False  # changed meanwhile (another purger, or the run restarted)
            counted = state.book.count
        self._cache.pop(run_key, None)
        await self._remove_marked(run_key, state.record.incarnation)
        return counted, True

    async def _remove_marked(self, run_key: str, incarnation: str) -> None:
        """Delete everything of a run marked for purging, in transactions that each check the
        mark still stands: a run restarted meanwhile (a new incarnation, its checkpoints and
        items) is left alone, and its own first append removes what is left of the old one."""
        pk = layout.partition(run_key)
        keys = [key for entry in await self._partition(run_key)
                if (key := _text(entry, "SK")) != layout.RUN_SK]
        chunk_size = _TRANSACTION_LIMIT - 1
        for start in range(0, len(keys), chunk_size):
            chunk = [_delete(pk, key) for key in keys[start : start + chunk_size]]
            try:
                await self._transact([_purge_guard(run_key, incarnation), *chunk])
            except _Cancelled:
                logger.info("cleanup: run %s started over while being purged; leaving it", pk)
                return
        if self.bucket is not None:
            await self._discard_prefix(f"{run_key}/{incarnation}/")
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
            if key in referenced:
                return True
            sequence = layout.blob_sequence(key)
            if sequence is None or key.split("/")[1] != record.incarnation:
                return False
            return sequence >= spared_from

        removed = await self._discard_prefix(f"{run_key}/", keep)
        if removed:
            logger.info("run %s: removed %d orphaned S3 blobs", run_key, removed)

    # -- repair -----------------------------------------------------------------------------

    async def damaged_runs(
        self, *, run_key: str | None = None, now: float
    ) -> list[RunDamage]:
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
            state = _state_of(run_item, where)
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
            ProjectionExpression=", ".join(names(a) for a in ("SK", "cid", "ca", "x", "bl", "hdr")),
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

    async def rebuild_run(self, run_key: str, seed: RunRecord, *, now: float) -> RunRecord:
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
        state = await self._rebuilt_state(run_key, log, seed, now)
        names = _Names()
        previous = run_item or {}
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
        self, run_key: str, log: list[dict[str, Any]], seed: RunRecord, now: float
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
        )
        owners = await self._owners(run_key)
        floor = 0
        if len(owners) > layout.OWNERS_CAPACITY:
            floor = sorted(owners)[len(owners) - layout.OWNERS_CAPACITY]
            owners = {owner for owner in owners if owner >= floor}
        # A fresh random revision: no process's cached copy of the old item can pass for it.
        rev = secrets.randbits(48)
        return _RunState(record, rev, book, frozenset(owners), floor)

    async def _owners(self, run_key: str) -> set[int]:
        """The sequences that own items, from their markers."""
        names = _Names()
        markers = await self._query_all(
            KeyConditionExpression=(
                f"{names('PK')} = {names.value(_s(layout.partition(run_key)))} AND "
                f"begins_with({names('SK')}, {names.value(_s(layout.MARKER_PREFIX))})"
            ),
            ProjectionExpression=names("SK"),
            ConsistentRead=True,
            **names.params(),
        )
        return {layout.sequence_of(_text(marker, "SK")) for marker in markers}


# -- helpers -------------------------------------------------------------------------------

_RUN_ATTRIBUTES: Final = (
    "rid", "inc", "st", "ua", "ls", "cnt", "exp", "ver", "dat", "rev", "bk", "own", "ofl", "pg"
)
"""What a read needs of the run item besides ``SK`` and ``ca``."""
_COUNTED_ATTRIBUTES: Final = ("PK", "rid", "inc", "st", "ca", "ua", "ls", "cnt", "exp", "ver")


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


def _pinned(reading: _Reading, item: Mapping[str, Any]) -> _Reading:
    """A damaged run's reading takes the incarnation of the newest checkpoint it meets."""
    if reading.incarnation is not None:
        return reading
    parsed = _ids.parse_checkpoint_id(_text(item, "cid"))
    if parsed is None:
        return reading
    return _Reading(reading.status, parsed[1], reading.book, reading.latest_sequence)


def _header(item: Mapping[str, Any]) -> CheckpointHeader:
    return CheckpointHeader(
        sequence=layout.sequence_of(_text(item, "SK")),
        checkpoint_id=_text(item, "cid"),
        created_at=_number(item, "ca") or 0.0,
        expires_at=_number(item, "x"),
        header=_bytes(item, "hdr"),
    )


def _changed(
    state: _RunState, book: Book, removed: Sequence[int], **record_changes: Any
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
    return _RunState(head, state.rev + 1, book, owners, floor)


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


def _delete_if(pk: str, sort_key: str, attribute: str, value: str) -> dict[str, Any]:
    """Delete a record only while ``attribute`` still holds ``value`` (or it is gone)."""
    names = _Names()
    operation = _delete(pk, sort_key)
    operation["Delete"]["ConditionExpression"] = (
        f"attribute_not_exists({names('PK')}) OR {names(attribute)} = {names.value(_s(value))}"
    )
    operation["Delete"].update(names.params())
    return operation


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
    run_key: str, old: _RunState, new: _RunState, removed: Sequence[int], token: str
) -> dict[str, Any]:
    """The run item's update in an append or removal: conditioned on its revision, and on
    no removed checkpoint having gained owned items we do not know about."""
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
    sets = ", ".join(f"{names(k)} = {names.value(v)}" for k, v in assignments.items())
    gone = [name for name in _EXPIRY_ATTRIBUTES if name not in assignments]
    expression = f"SET {sets}"
    if gone:
        expression += " REMOVE " + ", ".join(names(name) for name in gone)
    dropped = sorted(old.owners - new.owners)
    if dropped:
        expression += f" DELETE {names('own')} {names.value({'NS': [str(s) for s in dropped]})}"
    condition = f"{names('rev')} = {names.value(_n(old.rev))}"
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
    return _RunState(state.record, state.rev, state.book, owners, state.owner_floor,
                     state.purging)


def _item_size(item: Mapping[str, Any]) -> int:
    size = _ITEM_OVERHEAD
    for name, value in item.items():
        size += len(name)
        inner = next(iter(value.values()))
        size += len(inner) if isinstance(inner, (bytes, str)) else 8
    return size


def _check_item(item: Item) -> None:
    item_key_bytes(item.key, layout.MAX_ITEM_KEY_BYTES, "the DynamoDB store (sort keys)")
    if not isinstance(item.value, bytes):
        raise ValidationError(f"item value must be bytes, got {type(item.value).__name__}")
    if len(item.value) > _MAX_VALUE_BYTES:
        raise ValidationError(
            f"item value is {len(item.value)} bytes; a DynamoDB item holds at most "
            f"{_MAX_VALUE_BYTES} bytes of value"
        )


def _item_record(pk: str, run_key: str, item: Item) -> dict[str, Any]:
    record: dict[str, Any] = {"PK": _s(pk), "SK": _s(layout.item_sk(item.key)), "v": _b(item.value)}
    if item.owner is not None:
        record["o"] = _n(item.owner)
    if item.expires_at is not None:
        record["x"] = _n(item.expires_at)
        record["ttl"] = _n(layout.ttl_of(item.expires_at))
        record["xpk"] = _s(f"x#{layout.shard_of(run_key)}")
        record["xat"] = _n(item.expires_at)
    return record


def parse_size(text: str) -> int:
    """``350KB``, ``1MB``, ``200000``: bytes (KB = 1,024 bytes, as DynamoDB counts)."""
    match = _SIZE.fullmatch(text)
    unit = match[2].upper() if match else ""
    if match is None or unit not in _UNITS:
        raise ConfigurationError(f"threshold must be a size such as 350KB or 300000, got {text!r}")
    return int(match[1]) * _UNITS[unit]
