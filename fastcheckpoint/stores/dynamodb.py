"""DynamoDB+S3 store: one table for runs, checkpoints and items; large payloads in a bucket.

Layout (see ``_dynamodb_layout`` and ``docs/stores/dynamodb.md``): one partition per run; the
run item sorts right above the newest checkpoint, so ``latest`` is one descending ``Query``.
The run item carries a small book of the checkpoints it holds (ranges of sequences, expiries
of expiring ones, blob keys), so an append computes its pruning without reading anything and
commits checkpoint put, run update and pruning deletes in one ``TransactWriteItems``,
conditioned on the run item's revision. The store remembers the run items it last wrote or
read (a bounded cache); a stale entry only costs one failed transaction, whose cancellation
returns the current run item (``ReturnValuesOnConditionCheckFailure``).

Costs in requests (steady state, one writer per run): append 1 (+1 S3 PUT when large, +1 S3
DeleteObjects when a large checkpoint is pruned, +1 Query when a pruned checkpoint owns
items); latest 1 Query (+1 GET when large); get 1 TransactGetItems (+1 GET); headers 1 Query
for the first page, a Query and a GetItem (concurrent) for later pages; list_runs and
count_runs one Query per index shard per page, issued concurrently.

Three sparse global secondary indexes, each sharded ``INDEX_SHARDS`` ways by run key so no
single index partition takes every active run: ``by_status`` (``<status>#<shard>``),
``by_created`` (``runs#<shard>``) and ``by_expiry`` (``x#<shard>`` by due time: run items
whose oldest held checkpoint expires, and expiring items), which ``purge_expired`` reads.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import anyio
import msgspec
from botocore.exceptions import BotoCoreError, ClientError

from fastcheckpoint import _ids
from fastcheckpoint._config import RetryPolicy
from fastcheckpoint.errors import (
    CheckpointNotFound,
    ConfigurationError,
    ConflictError,
    CorruptCheckpointError,
    SequenceConflict,
    StoreError,
    ValidationError,
)
from fastcheckpoint.stores import _dynamodb_layout as layout
from fastcheckpoint.stores._aws import AwsEndpoint, error_code, open_client, translate
from fastcheckpoint.stores._base import (
    CheckpointHeader,
    Item,
    RunRecord,
    StoredCheckpoint,
    check_keep_latest,
    is_live,
    item_key_bytes,
    key_successor,
)
from fastcheckpoint.stores._dynamodb_layout import Book
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

_T = TypeVar("_T")

DEFAULT_THRESHOLD: Final = 350 * 1024
"""Encoded checkpoints larger than this (bytes) go to S3; DynamoDB's item limit is 400 KB."""
_MAX_THRESHOLD: Final = 400 * 1024 - 2048  # room for the key and the other attributes
_ITEM_OVERHEAD: Final = 160  # attribute names, key, id, numbers: generous, so we never hit 400 KB
_MAX_VALUE_BYTES: Final = 390 * 1024
_TRANSACTION_LIMIT: Final = 100
_BATCH_WRITE_LIMIT: Final = 25
_BATCH_GET_LIMIT: Final = 100
_APPEND_ATTEMPTS: Final = 8
_CACHE_SIZE: Final = 4096

TRANSACTION_ACTIONS: Final = frozenset({"PutItem", "UpdateItem", "DeleteItem", "GetItem"})
"""IAM actions checked for the items inside TransactWriteItems / TransactGetItems."""

_UNITS: Final = {"": 1, "B": 1, "KB": 1024, "KIB": 1024, "MB": 1024 * 1024, "MIB": 1024 * 1024}
_SIZE = re.compile(r"\s*([0-9]+)\s*([A-Za-z]*)\s*")
_CURSOR = re.compile(r"[0-9a-f]{16}#[a-z2-7]{1,64}")
_URL_OPTIONS: Final = frozenset({"bucket", "prefix", "threshold", "region", "endpoint_url"})


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
        placeholder = f"#a{len(self.names)}"
        for known, name in self.names.items():
            if name == attribute:
                return known
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
    purging: bool

    def live(self, now: float) -> bool:
        return not self.purging and is_live(self.record.expires_at, now)


def _record_of(item: Mapping[str, Any]) -> RunRecord:
    return RunRecord(
        run_id=_text(item, "rid"),
        incarnation=_text(item, "inc"),
        status=_text(item, "st"),
        created_at=_number(item, "ca") or 0.0,
        updated_at=_number(item, "ua") or 0.0,
        latest_sequence=_int(item, "ls"),
        checkpoint_count=_int(item, "cnt"),
        expires_at=_number(item, "exp"),
        version=_int(item, "ver"),
        data=_bytes(item, "dat"),
    )


def _state_of(item: Mapping[str, Any], where: str) -> _RunState:
    try:
        book = layout.BOOK_DECODER.decode(_bytes(item, "bk"))
    except msgspec.DecodeError as exc:
        raise CorruptCheckpointError(f"unreadable run bookkeeping: {exc}", key=where) from exc
    owners = frozenset(int(value) for value in item.get("own", {}).get("NS", ()))
    return _RunState(
        record=_record_of(item),
        rev=_int(item, "rev"),
        book=book,
        owners=owners,
        purging=bool(item.get("pg", {}).get("BOOL", False)),
    )


def _index_attributes(run_key: str, record: RunRecord) -> dict[str, Any]:
    shard = layout.shard_of(run_key)
    return {
        "gst": _s(f"{record.status}#{shard}"),
        "gall": _s(f"runs#{shard}"),
        "gord": _s(layout.created_stamp(record.created_at, run_key)),
    }


def _expiry_attributes(run_key: str, book: Book) -> dict[str, Any]:
    """``exp``/``ttl`` (run expiry) and ``xpk``/``xat`` (due time) of a run item; absent = never."""
    attributes: dict[str, Any] = {}
    expires_at = book.expires_at()
    if expires_at is not None:
        attributes["exp"] = _n(expires_at)
        # Native TTL is the backstop: the cleanup loop removes the run (and its items) first.
        attributes["ttl"] = _n(layout.ttl_of(expires_at) + _RUN_TTL_GRACE)
    due = book.due()
    if due is not None:
        attributes["xpk"] = _s(f"x#{layout.shard_of(run_key)}")
        attributes["xat"] = _n(due)
    return attributes


_RUN_TTL_GRACE: Final = 7 * 86400
_EXPIRY_ATTRIBUTES: Final = ("exp", "ttl", "xpk", "xat")


def _run_item(run_key: str, record: RunRecord, rev: int, book: Book) -> dict[str, Any]:
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
        "rev": _n(rev),
        "bk": _b(layout.BOOK_ENCODER.encode(book)),
        **_index_attributes(run_key, record),
        **_expiry_attributes(run_key, book),
    }
    return item


# -- the store -----------------------------------------------------------------------------


@dataclass
class _Plan:
    """One append's transaction and what to do once it commits."""

    operations: list[dict[str, Any]]
    state: _RunState
    removed_blobs: list[str]
    overflow: list[dict[str, Any]]
    """Deletes that did not fit in the transaction (more than 100 operations): done after."""


class _Cancelled(Exception):
    def __init__(self, reasons: list[dict[str, Any]]) -> None:
        super().__init__("transaction cancelled")
        self.reasons = reasons


class DynamoDBStore:
    """Runs, checkpoints and items in one DynamoDB table; payloads above ``threshold`` in S3.

    Give ``table`` (and ``bucket`` for checkpoints above the threshold), plus ``region`` /
    ``endpoint_url``, and the store builds and owns its clients; or pass ``dynamodb_client``
    (and ``s3_client``), which it uses and never closes. Create the table and bucket with
    :func:`provision` (``fastcheckpoint init URL``).
    """

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
        self._ddb: Any = dynamodb_client
        self._s3: Any = s3_client
        self._blobs: Bucket | None = None
        self._stack = contextlib.AsyncExitStack()
        self._opening = anyio.Lock()
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
        unknown = sorted(set(query) - _URL_OPTIONS)
        if unknown:
            raise ConfigurationError(
                f"unknown dynamodb:// option(s) {unknown} in {url!r}; known: {sorted(_URL_OPTIONS)}"
            )
        endpoint = AwsEndpoint.from_query(query)
        if "threshold" in query:
            options.setdefault("threshold", parse_size(query["threshold"]))
        return cls(
            unquote(parts.netloc),
            bucket=query.get("bucket") or None,
            prefix=query.get("prefix", ""),
            region=endpoint.region,
            endpoint_url=endpoint.endpoint_url,
            **options,
        )

    # -- clients --------------------------------------------------------------------------

    async def _client(self) -> Any:
        if self._ddb is None or (self.bucket is not None and self._s3 is None):
            async with self._opening:
                if self._ddb is None:
                    self._ddb = await open_client(
                        self._stack, "dynamodb", self._endpoint, self._retry, session=self._session
                    )
                if self.bucket is not None and self._s3 is None:
                    self._s3 = await open_client(
                        self._stack, "s3", self._endpoint, self._retry, session=self._session
                    )
        return self._ddb

    async def clients(self) -> tuple[Any, Any]:
        """The DynamoDB and S3 clients in use (S3 is ``None`` without a bucket); opens them."""
        await self._client()
        return self._ddb, self._s3

    def _bucket(self) -> Bucket:
        if self._blobs is None:
            if self.bucket is None or self._s3 is None:
                raise ConfigurationError(
                    f"this checkpoint is larger than the store's threshold ({self.threshold} "
                    "bytes) and needs S3: add ?bucket=... to the dynamodb:// URL"
                )
            self._blobs = Bucket(self._s3, self.bucket, self.prefix)
        return self._blobs

    async def provision(self) -> None:
        """Create what this store needs, idempotently (``fastcheckpoint init URL``): the table
        (on-demand, the three indexes, TTL on ``ttl``) and, with a bucket, the bucket
        (versioning, AES256 encryption, the lifecycle rule). Existing ones are checked and
        completed, never recreated."""
        ddb, s3 = await self.clients()
        await _provision_table(ddb, self.table)
        if self.bucket is not None:
            await _provision_bucket(s3, self.bucket, self.prefix, self._endpoint.region)

    async def aclose(self) -> None:
        self._cache.clear()
        await self._stack.aclose()

    # -- driver calls ---------------------------------------------------------------------

    async def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        client = await self._client()
        try:
            method = getattr(client, _snake(operation))
            response: dict[str, Any] = await method(TableName=self.table, **params)
        except ClientError as exc:
            raise translate(exc, f"DynamoDB {operation} on table {self.table}") from exc
        except BotoCoreError as exc:
            raise translate(exc, f"DynamoDB {operation} on table {self.table}") from exc
        return response

    async def _transact(self, operations: list[dict[str, Any]]) -> None:
        """One TransactWriteItems; a cancellation raises :class:`_Cancelled` with the reasons."""
        client = await self._client()
        for operation in operations:
            next(iter(operation.values()))["TableName"] = self.table
        try:
            await client.transact_write_items(TransactItems=operations)
        except ClientError as exc:
            if error_code(exc) == "TransactionCanceledException":
                reasons = exc.response.get("CancellationReasons") or []
                raise _Cancelled(cast(list[dict[str, Any]], list(reasons))) from exc
            raise translate(exc, f"DynamoDB TransactWriteItems on table {self.table}") from exc
        except BotoCoreError as exc:
            raise translate(exc, f"DynamoDB TransactWriteItems on table {self.table}") from exc

    async def _query_all(self, **params: Any) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        while True:
            response = await self._call("Query", **params)
            items.extend(response.get("Items", []))
            last = response.get("LastEvaluatedKey")
            if not last:
                return items
            params["ExclusiveStartKey"] = last

    def _where(self, run_key: str, sort_key: str) -> str:
        return f"dynamodb://{self.table}/{layout.partition(run_key)}/{sort_key}"

    # -- run items ------------------------------------------------------------------------

    def _remember(self, run_key: str, state: _RunState | None) -> None:
        self._cache[run_key] = state
        self._cache.move_to_end(run_key)
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)

    async def _read_state(self, run_key: str) -> _RunState | None:
        response = await self._call(
            "GetItem",
            Key={"PK": _s(layout.partition(run_key)), "SK": _s(layout.RUN_SK)},
            ConsistentRead=True,
        )
        item = response.get("Item")
        state = None if item is None else _state_of(item, self._where(run_key, layout.RUN_SK))
        self._remember(run_key, state)
        return state

    # -- checkpoint log -------------------------------------------------------------------

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
        item = self._checkpoint_item(run_key, record)
        blob: str | None = None
        if _item_size(item) > self.threshold:
            blob = f"{run_key}/{run.incarnation}/{record.sequence:020d}-{secrets.token_hex(4)}"
            del item["pl"]
            item["bl"] = _s(blob)
            if _item_size(item) > _MAX_THRESHOLD:
                raise ValidationError(
                    f"checkpoint header is {len(record.header)} bytes: too large for a DynamoDB "
                    "item even with the payload in S3; keep tags and step names small"
                )
            await self._client()
            await self._bucket().put(blob, record.payload)
        committed = False
        try:
            status = await self._append(run_key, record, item, blob, run, keep_latest, now)
            committed = True
            return status
        finally:
            if blob is not None and not committed:
                await self._discard_blobs([blob])

    def _checkpoint_item(self, run_key: str, record: StoredCheckpoint) -> dict[str, Any]:
        if record.sequence < 0 or record.sequence > layout.MAX_SEQUENCE:
            return {}
        item: dict[str, Any] = {
            "PK": _s(layout.partition(run_key)),
            "SK": _s(layout.checkpoint_sk(record.sequence)),
            "cid": _s(record.checkpoint_id),
            "ca": _n(record.created_at),
            "hdr": _b(record.header),
            "pl": _b(record.payload),
        }
        if record.expires_at is not None:
            item["x"] = _n(record.expires_at)
            item["ttl"] = _n(layout.ttl_of(record.expires_at))
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
    ) -> str:
        known = run_key in self._cache
        state = self._cache.get(run_key)
        fresh = False  # ``state`` was read from the table during this call
        for attempt in range(_APPEND_ATTEMPTS):
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
                plan = await self._plan_first(run_key, item, blob, record, seed, previous, now)
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
                plan = await self._plan_next(run_key, item, blob, record, state, keep_latest, now)
            try:
                await self._commit(plan.operations, keep=2)
            except _Cancelled as cancelled:
                known, state = self._after_cancel(run_key, cancelled)
                fresh = known
                if not known and attempt >= 1:
                    await anyio.sleep(self._retry.delay(attempt - 1))
                continue
            self._remember(run_key, plan.state)
            await self._finish(run_key, plan)
            return plan.state.record.status
        head_record = None if state is None else state.record
        raise SequenceConflict(
            latest_sequence=None if head_record is None else head_record.latest_sequence,
            incarnation=None if head_record is None else head_record.incarnation,
        )

    async def _commit(self, operations: list[dict[str, Any]], *, keep: int) -> None:
        """TransactWriteItems; conditional deletes from index ``keep`` on whose condition
        fails (an owned item rewritten meanwhile) are dropped and the rest retried. Other
        cancellations raise :class:`_Cancelled`."""
        operations = list(operations)
        while operations:
            try:
                await self._transact(operations)
                return
            except _Cancelled as cancelled:
                failed = {
                    index for index, reason in enumerate(cancelled.reasons)
                    if reason.get("Code") == "ConditionalCheckFailed"
                }
                if not failed or min(failed) < keep:
                    raise
                operations = [op for index, op in enumerate(operations) if index not in failed]

    def _after_cancel(
        self, run_key: str, cancelled: _Cancelled
    ) -> tuple[bool, _RunState | None]:
        """``(known, run item)`` after a cancelled transaction whose first operation was
        the run item's: its condition failed, so the cancellation carries the current item
        (or none, when there is no run item). Any other cancellation (a concurrent
        transaction) leaves it unknown, to be read again."""
        reason = cancelled.reasons[0] if cancelled.reasons else {}
        if reason.get("Code") != "ConditionalCheckFailed":
            self._cache.pop(run_key, None)
            return False, None
        old = reason.get("Item")
        state = None if not old else _state_of(old, self._where(run_key, layout.RUN_SK))
        self._remember(run_key, state)
        return True, state

    async def _plan_first(
        self,
        run_key: str,
        item: dict[str, Any],
        blob: str | None,
        record: StoredCheckpoint,
        seed: RunRecord,
        previous: _RunState | None,
        now: float,
    ) -> _Plan:
        """Create the run (or replace an expired one, removing its leftovers)."""
        book = Book()
        book.add(0, record.expires_at, blob)
        head = msgspec.structs.replace(
            seed,
            latest_sequence=0,
            checkpoint_count=1,
            updated_at=now,
            expires_at=book.expires_at(),
        )
        names = _Names()
        rev = 0 if previous is None else previous.rev + 1
        run_put: dict[str, Any] = {"Item": _run_item(run_key, head, rev, book)}
        if previous is None:
            run_put["ConditionExpression"] = f"attribute_not_exists({names('PK')})"
        else:
            run_put["ConditionExpression"] = f"{names('rev')} = {names.value(_n(previous.rev))}"
        run_put["ReturnValuesOnConditionCheckFailure"] = "ALL_OLD"
        run_put.update(names.params())
        operations: list[dict[str, Any]] = [{"Put": run_put}, {"Put": {"Item": item}}]
        removed_blobs: list[str] = []
        cleanup: list[dict[str, Any]] = []
        if previous is not None:
            cleanup, removed_blobs = await self._leftovers(run_key, previous)
        room = _TRANSACTION_LIMIT - len(operations)
        state = _RunState(record=head, rev=rev, book=book, owners=frozenset(), purging=False)
        return _Plan(operations + cleanup[:room], state, removed_blobs, cleanup[room:])

    async def _leftovers(
        self, run_key: str, previous: _RunState
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """Deletes of an expired run's checkpoints, markers and owned items; its blobs."""
        names = _Names()
        found = await self._query_all(
            KeyConditionExpression=(
                f"{names('PK')} = {names.value(_s(layout.partition(run_key)))} AND "
                f"{names('SK')} BETWEEN {names.value(_s(layout.MARKER_PREFIX))} "
                f"AND {names.value(_s(layout.CHECKPOINT_END))}"
            ),
            ProjectionExpression=f"{names('SK')}, {names('bl')}",
            ConsistentRead=True,
            **names.params(),
        )
        deletes: list[dict[str, Any]] = []
        blobs = list(previous.book.blobs.values())
        pk = layout.partition(run_key)
        owned: dict[str, int] = {}
        for entry in found:
            sort_key = _text(entry, "SK")
            if sort_key == layout.checkpoint_sk(0):
                continue  # overwritten by the new run's first checkpoint in the same transaction
            if "bl" in entry:
                blobs.append(_text(entry, "bl"))
            deletes.append(_delete(pk, sort_key))
            if sort_key.startswith(layout.MARKER_PREFIX):
                owned.setdefault(layout.marker_item_key(sort_key), layout.sequence_of(sort_key))
        # One operation per item in a transaction: an item with two markers is deleted once.
        deletes += [_owned_delete(pk, key, owner) for key, owner in owned.items()]
        return deletes, sorted(set(blobs))

    async def _plan_next(
        self,
        run_key: str,
        item: dict[str, Any],
        blob: str | None,
        record: StoredCheckpoint,
        state: _RunState,
        keep_latest: int | None,
        now: float,
    ) -> _Plan:
        book = state.book.copy()
        book.add(record.sequence, record.expires_at, blob)
        removed = book.prune(now, keep_latest)
        new_state, removed_blobs = _after_removal(
            state, book, removed, latest_sequence=record.sequence, updated_at=now
        )
        run_update = _run_update(run_key, state, new_state, removed)
        operations: list[dict[str, Any]] = [{"Update": run_update}, {"Put": {"Item": item}}]
        deletes = await self._removal_deletes(run_key, state, removed)
        room = _TRANSACTION_LIMIT - len(operations)
        return _Plan(operations + deletes[:room], new_state, removed_blobs, deletes[room:])

    async def _removal_deletes(
        self, run_key: str, state: _RunState, removed: Sequence[int]
    ) -> list[dict[str, Any]]:
        """Deletes of checkpoints and of the items they own (found by their markers)."""
        pk = layout.partition(run_key)
        deletes = [_delete(pk, layout.checkpoint_sk(sequence)) for sequence in removed]
        owning = sorted(set(removed) & state.owners)
        if owning:
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
            for marker in markers:
                sort_key = _text(marker, "SK")
                owner = layout.sequence_of(sort_key)
                if owner in owning:
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
                await self._bucket().delete(list(keys))
            except Exception:
                logger.warning(
                    "could not delete %d S3 blobs (first %s); purge_expired removes orphans "
                    "when it next visits the run", len(keys), keys[0], exc_info=True,
                )

    async def _guarded_deletes(self, deletes: list[dict[str, Any]]) -> None:
        """Deletes in transactions of up to 100, dropping those whose condition fails."""
        for start in range(0, len(deletes), _TRANSACTION_LIMIT):
            chunk = deletes[start : start + _TRANSACTION_LIMIT]
            for attempt in range(self._retry.max_retries + 1):
                try:
                    await self._commit(chunk, keep=0)
                    break
                except _Cancelled:  # a concurrent transaction on one of the items
                    await anyio.sleep(self._retry.delay(attempt))
            else:
                raise StoreError(
                    f"DynamoDB TransactWriteItems on table {self.table}: deletes kept "
                    "conflicting with concurrent transactions; try again"
                )

    async def get(
        self, run_key: str, sequence: int, *, now: float
    ) -> tuple[StoredCheckpoint, str] | None:
        if sequence < 0 or sequence > layout.MAX_SEQUENCE:
            return None
        client = await self._client()
        pk = _s(layout.partition(run_key))
        sort_key = layout.checkpoint_sk(sequence)
        keys = [{"PK": pk, "SK": _s(layout.RUN_SK)}, {"PK": pk, "SK": _s(sort_key)}]
        request = [{"Get": {"TableName": self.table, "Key": key}} for key in keys]
        for attempt in range(self._retry.max_retries + 1):
            try:
                # One request for a consistent snapshot of the checkpoint and the run status.
                response = await client.transact_get_items(TransactItems=request)
                break
            except ClientError as exc:
                # Cancelled by a transaction writing one of the two items: read again.
                if error_code(exc) != "TransactionCanceledException":
                    raise translate(exc, f"DynamoDB TransactGetItems on {self.table}") from exc
                await anyio.sleep(self._retry.delay(attempt))
            except BotoCoreError as exc:
                raise translate(exc, f"DynamoDB TransactGetItems on {self.table}") from exc
        else:
            raise StoreError(
                f"DynamoDB TransactGetItems on {self.table}: kept colliding with concurrent "
                "writes of the run; try again"
            )
        responses = response.get("Responses", [])
        run_item = responses[0].get("Item") if responses else None
        item = responses[1].get("Item") if len(responses) > 1 else None
        if not run_item or not item:
            return None
        state = _state_of(run_item, self._where(run_key, layout.RUN_SK))
        self._remember(run_key, state)
        if not state.live(now) or not state.book.holds(sequence):
            return None
        found = await self._checkpoint(run_key, item, state.record, now)
        return None if found is None else (found, state.record.status)

    async def _checkpoint(
        self, run_key: str, item: Mapping[str, Any], run: RunRecord, now: float
    ) -> StoredCheckpoint | None:
        """A live checkpoint of the run's current incarnation from its item, payload loaded."""
        sort_key = _text(item, "SK")
        checkpoint_id = _text(item, "cid")
        if not checkpoint_id.startswith(f"ck-{run_key}-{run.incarnation}-"):
            return None  # a leftover of an earlier incarnation of the run
        expires_at = _number(item, "x")
        if not is_live(expires_at, now):
            return None
        where = self._where(run_key, sort_key)
        payload = _bytes(item, "pl")
        if "bl" in item:
            blob = _text(item, "bl")
            await self._client()
            fetched = await self._bucket().get(blob)
            if fetched is None:
                raise CorruptCheckpointError(
                    f"the payload object s3://{self.bucket}/{self.prefix}{blob} is missing",
                    key=where,
                )
            payload = fetched[0]
        return StoredCheckpoint(
            sequence=layout.sequence_of(sort_key),
            checkpoint_id=checkpoint_id,
            created_at=_number(item, "ca") or 0.0,
            expires_at=expires_at,
            header=_bytes(item, "hdr"),
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
        state: _RunState | None = None
        while True:
            response = await self._call("Query", **params)
            for item in response.get("Items", []):
                sort_key = _text(item, "SK")
                if sort_key == layout.RUN_SK:
                    state = _state_of(item, self._where(run_key, sort_key))
                    self._remember(run_key, state)
                    if not state.live(now):
                        return None
                    continue
                if state is None:
                    return None  # no run item: checkpoints here are leftovers
                if not state.book.holds(layout.sequence_of(sort_key)):
                    continue
                found = await self._checkpoint(run_key, item, state.record, now)
                if found is not None:
                    return found, state.record.status
            last = response.get("LastEvaluatedKey")
            if not last:
                return None
            params["ExclusiveStartKey"] = last
            params["Limit"] = 16

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
            return [], self._visible_status(await self._read_state(run_key), now, include_expired)
        names = _Names()
        upper = layout.RUN_SK if top is None else layout.checkpoint_sk(top - 1)
        params: dict[str, Any] = {
            "KeyConditionExpression": (
                f"{names('PK')} = {names.value(_s(pk))} AND {names('SK')} BETWEEN "
                f"{names.value(_s(layout.checkpoint_sk(0)))} AND {names.value(_s(upper))}"
            ),
            "ProjectionExpression": ", ".join(
                names(a) for a in ("SK", "cid", "ca", "x", "hdr", "inc", "st", "exp", "pg", "bk")
            ),
            "ScanIndexForward": False,
            "ConsistentRead": True,
            "Limit": limit + 1,
            **names.params(),
        }
        if top is None:
            found = await self._header_pages(params, limit, now, include_expired, run_key)
            run = next((entry for entry in found if isinstance(entry, _RunState)), None)
        else:
            # The run item sorts above every checkpoint, out of reach of a page below
            # ``before``: it is read beside the Query.
            found, run = await pair(
                lambda: self._header_pages(params, limit, now, include_expired, run_key),
                lambda: self._read_state(run_key),
            )
        status = self._visible_status(run, now, include_expired)
        if run is None or status is None:
            return [], None
        return _filter_headers(found, run, now, include_expired, limit), status

    async def _header_pages(
        self,
        params: dict[str, Any],
        limit: int,
        now: float,
        include_expired: bool,
        run_key: str,
    ) -> list[Any]:
        """Query pages until ``limit`` candidate headers (or the end); the run item first."""
        found: list[Any] = []
        candidates = 0
        while True:
            response = await self._call("Query", **params)
            for item in response.get("Items", []):
                sort_key = _text(item, "SK")
                if sort_key == layout.RUN_SK:
                    found.append(_state_of(item, self._where(run_key, sort_key)))
                    continue
                found.append(item)
                if include_expired or is_live(_number(item, "x"), now):
                    candidates += 1
            last = response.get("LastEvaluatedKey")
            if not last or candidates >= limit:
                return found
            params["ExclusiveStartKey"] = last

    @staticmethod
    def _visible_status(run: _RunState | None, now: float, include_expired: bool) -> str | None:
        if run is None:
            return None
        if run.live(now) or (include_expired and not run.purging):
            return run.record.status
        return None

    async def delete(self, run_key: str, sequence: int, *, checkpoint_id: str) -> bool:
        parsed = _ids.parse_checkpoint_id(checkpoint_id)
        if parsed is None or parsed[0] != run_key or parsed[2] != sequence:
            return False
        state = self._cache.get(run_key) if run_key in self._cache else None
        fresh = False
        for _ in range(_APPEND_ATTEMPTS):
            if state is None and not fresh:
                state, fresh = await self._read_state(run_key), True
            if state is None or state.purging or state.record.incarnation != parsed[1]:
                if not fresh:
                    state, fresh = await self._read_state(run_key), True
                    continue
                return False
            if not state.book.holds(sequence):
                if not fresh:
                    state, fresh = await self._read_state(run_key), True
                    continue
                return False
            plan = await self._plan_removal(run_key, state, [sequence], checkpoint_id)
            try:
                await self._commit(plan.operations, keep=2)
            except _Cancelled as cancelled:
                reasons = cancelled.reasons
                if len(reasons) > 1 and reasons[1].get("Code") == "ConditionalCheckFailed":
                    return False  # the checkpoint at this sequence has another id
                known, state = self._after_cancel(run_key, cancelled)
                fresh = known
                continue
            self._remember(run_key, plan.state)
            await self._finish(run_key, plan)
            return True
        raise ConflictError(f"run {run_key}: changed concurrently while deleting; try again")

    async def _plan_removal(
        self,
        run_key: str,
        state: _RunState,
        sequences: Sequence[int],
        checkpoint_id: str | None = None,
    ) -> _Plan:
        """Remove held checkpoints (with owned items) and update the run item: one transaction."""
        book = state.book.copy()
        removed = [sequence for sequence in sequences if book.remove(sequence)]
        new_state, removed_blobs = _after_removal(state, book, removed)
        run_update = _run_update(run_key, state, new_state, removed)
        deletes = await self._removal_deletes(run_key, state, removed)
        if checkpoint_id is not None:
            names = _Names()
            deletes[0]["Delete"]["ConditionExpression"] = (
                f"attribute_not_exists({names('PK')}) OR "
                f"{names('cid')} = {names.value(_s(checkpoint_id))}"
            )
            deletes[0]["Delete"].update(names.params())
        operations = [{"Update": run_update}, *deletes]
        return _Plan(
            operations[:_TRANSACTION_LIMIT], new_state, removed_blobs,
            operations[_TRANSACTION_LIMIT:],
        )

    async def delete_run(self, run_key: str) -> int:
        pk = layout.partition(run_key)
        names = _Names()
        found = await self._query_all(
            KeyConditionExpression=f"{names('PK')} = {names.value(_s(pk))}",
            ProjectionExpression=f"{names('SK')}, {names('bl')}",
            ConsistentRead=True,
            **names.params(),
        )
        self._cache.pop(run_key, None)
        keys = [_text(entry, "SK") for entry in found]
        removed = sum(1 for key in keys if key.startswith(layout.CHECKPOINT_PREFIX))
        # The run item goes last: until then the run is visible and a retry finds the rest.
        ordered = [key for key in keys if key != layout.RUN_SK]
        ordered += [key for key in keys if key == layout.RUN_SK]
        await self._batch_write(
            [{"DeleteRequest": {"Key": {"PK": _s(pk), "SK": _s(key)}}} for key in ordered]
        )
        self._cache.pop(run_key, None)
        if self.bucket is not None:
            await self._client()
            await self._discard_prefix(f"{run_key}/")
        return removed

    async def _discard_prefix(self, prefix: str, keep: Callable[[str], bool] | None = None) -> int:
        """Delete the blobs under ``prefix`` (except those ``keep`` spares); returns how many."""
        blobs = self._bucket()
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
                client = await self._client()
                try:
                    response = await client.batch_write_item(RequestItems={self.table: chunk})
                except (ClientError, BotoCoreError) as exc:
                    raise translate(exc, f"DynamoDB BatchWriteItem on table {self.table}") from exc
                chunk = response.get("UnprocessedItems", {}).get(self.table, [])
                if not chunk:
                    break
                await anyio.sleep(self._retry.delay(attempt))
            else:
                raise StoreError(
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
        update = (
            f"SET {names('st')} = {names.value(_s(status))}, "
            f"{names('dat')} = {names.value(_b(data))}, "
            f"{names('ver')} = {names.value(_n(version + 1))}, "
            f"{names('ua')} = {names.value(_n(now))}, "
            f"{names('gst')} = {names.value(_s(f'{status}#{shard}'))} "
            f"ADD {names('rev')} {names.value(_n(1))}"
        )
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
            state = None if not old else _state_of(old, self._where(run_key, layout.RUN_SK))
            self._remember(run_key, state)
            if state is None or not state.live(now):
                raise CheckpointNotFound(f"no live run with key {run_key}")
            raise ConflictError(
                f"run changed concurrently (now {state.record.incarnation}/"
                f"{state.record.version}, expected {incarnation}/{version})"
            )
        state = _state_of(response["Attributes"], self._where(run_key, layout.RUN_SK))
        self._remember(run_key, state)
        return state.record

    async def _conditional(
        self, operation: str, **params: Any
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """A conditional single-item write: ``(response, None)``, or ``(None, current item)``
        when the condition failed (``{}`` unless ``ReturnValuesOnConditionCheckFailure``)."""
        client = await self._client()
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

        pages = await gather([_bind(shard_page, shard) for shard in _shards()])
        merged = sorted(
            (item for items, _ in pages for item in items),
            key=lambda item: _text(item, "gord"),
            reverse=True,
        )
        more = len(merged) > limit or any(truncated for _, truncated in pages)
        chosen = merged[:limit]
        records = [_record_of(item) for item in chosen]
        next_cursor = _text(chosen[-1], "gord") if chosen and more else None
        return records, next_cursor

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
                "Select": "COUNT",
            }
            total = 0
            while True:
                response = await self._call("Query", **params, **names.params())
                total += int(response.get("Count", 0))
                last = response.get("LastEvaluatedKey")
                if not last:
                    return total
                params["ExclusiveStartKey"] = last

        return sum(await gather([_bind(shard_count, shard) for shard in _shards()]))

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
        an append pruning one of them learns it (its transaction checks ``own``)."""
        names = _Names()
        owned = {"NS": [str(owner) for owner in owners]}
        response, _ = await self._conditional(
            "UpdateItem",
            Key={"PK": _s(layout.partition(run_key)), "SK": _s(layout.RUN_SK)},
            UpdateExpression=f"ADD {names('own')} {names.value(owned)}",
            ConditionExpression=f"attribute_exists({names('PK')})",
            **names.params(),
        )
        if response is None:
            return  # no run item yet: its items are removed with the run instead
        cached = self._cache.get(run_key)
        if cached is not None:
            self._remember(run_key, _replace_owners(cached, cached.owners | set(owners)))

    async def _put_create_only(
        self,
        pk: str,
        records: list[dict[str, Any]],
        markers: list[dict[str, Any]],
        now: float,
    ) -> None:
        operations: list[dict[str, Any]] = []
        for record in records:
            names = _Names()
            operations.append({"Put": {
                "Item": record,
                "ConditionExpression": (
                    f"attribute_not_exists({names('PK')}) OR {names('x')} <= {names.value(_n(now))}"
                ),
                **names.params(),
            }})
        operations += [{"Put": {"Item": marker}} for marker in markers]
        written: list[dict[str, Any]] = []
        for start in range(0, len(operations), _TRANSACTION_LIMIT):
            chunk = operations[start : start + _TRANSACTION_LIMIT]
            try:
                await self._transact(chunk)
            except _Cancelled as cancelled:
                taken = [
                    _text(chunk[index]["Put"]["Item"], "SK")[2:]
                    for index, reason in enumerate(cancelled.reasons)
                    if reason.get("Code") == "ConditionalCheckFailed"
                ]
                if written:  # undo earlier chunks: all or nothing
                    await self._batch_write([
                        {"DeleteRequest": {"Key": {"PK": _s(pk), "SK": item["SK"]}}}
                        for item in written
                    ])
                if taken:
                    raise ConflictError(f"item {taken[0]!r} already exists") from cancelled
                raise ConflictError(
                    "items changed concurrently while writing them create-only; try again"
                ) from cancelled
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
                client = await self._client()
                try:
                    response = await client.batch_get_item(RequestItems=request)
                except (ClientError, BotoCoreError) as exc:
                    raise translate(exc, f"DynamoDB BatchGetItem on table {self.table}") from exc
                for item in response.get("Responses", {}).get(self.table, []):
                    if is_live(_number(item, "x"), now):
                        result[_text(item, "SK")[2:]] = _bytes(item, "v")
                request = response.get("UnprocessedKeys") or {}
                if not request:
                    break
                await anyio.sleep(self._retry.delay(attempt))
            else:
                raise StoreError(
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

        return sum(await gather([_bind(delete_one, key) for key in unique]))

    # -- maintenance ----------------------------------------------------------------------

    async def purge_expired(self, *, now: float, limit: int) -> tuple[int, bool]:
        limit = max(1, limit)

        async def shard_due(shard: int) -> tuple[list[dict[str, Any]], bool]:
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
            items = response.get("Items", [])
            return items, len(items) > limit or bool(response.get("LastEvaluatedKey"))

        pages = await gather([_bind(shard_due, shard) for shard in _shards()])
        due = sorted(
            (item for items, _ in pages for item in items),
            key=lambda item: (_number(item, "xat") or 0.0, _text(item, "PK"), _text(item, "SK")),
        )
        more = len(due) > limit or any(truncated for _, truncated in pages)
        removed = 0
        for entry in due[:limit]:
            pk, sort_key = _text(entry, "PK"), _text(entry, "SK")
            run_key = pk.removeprefix("run#")
            if sort_key == layout.RUN_SK:
                count, finished = await self._purge_run(run_key, now, limit)
                removed += count
                more = more or not finished
            else:
                await self._purge_item(pk, sort_key, now)
        return removed, not more

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

    async def _purge_run(self, run_key: str, now: float, budget: int) -> tuple[int, bool]:
        """Remove what of one run expired: ``(checkpoints removed, finished)``."""
        for _ in range(_APPEND_ATTEMPTS):
            state = await self._read_state(run_key)
            if state is None:
                return 0, True
            if state.purging or not is_live(state.record.expires_at, now):
                return await self._purge_whole_run(run_key, state, now)
            expired = state.book.expired(now)
            if not expired:
                return 0, True
            chosen = expired[: min(budget, _TRANSACTION_LIMIT // 2)]
            plan = await self._plan_removal(run_key, state, chosen)
            try:
                await self._commit(plan.operations, keep=1)
            except _Cancelled as cancelled:
                self._after_cancel(run_key, cancelled)
                continue
            self._remember(run_key, plan.state)
            await self._finish(run_key, plan)
            await self._reconcile_blobs(run_key, plan.state)
            return len(chosen), len(chosen) == len(expired)
        return 0, False

    async def _purge_whole_run(
        self, run_key: str, state: _RunState, now: float
    ) -> tuple[int, bool]:
        """Mark the run as being purged (the one worker whose mark lands counts it), then
        remove its checkpoints, markers, items and blobs, the run item last."""
        counted = 0
        pk = layout.partition(run_key)
        if not state.purging:
            names = _Names()
            marked, _ = await self._conditional(
                "UpdateItem",
                Key={"PK": _s(pk), "SK": _s(layout.RUN_SK)},
                UpdateExpression=(
                    f"SET {names('pg')} = {names.value({'BOOL': True})} "
                    f"ADD {names('rev')} {names.value(_n(1))}"
                ),
                ConditionExpression=f"{names('rev')} = {names.value(_n(state.rev))}",
                **names.params(),
            )
            if marked is None:
                return 0, False  # changed meanwhile (another purger, or the run restarted)
            counted = state.book.count
        self._cache.pop(run_key, None)
        names = _Names()
        found = await self._query_all(
            KeyConditionExpression=f"{names('PK')} = {names.value(_s(pk))}",
            ProjectionExpression=f"{names('SK')}, {names('cid')}",
            ConsistentRead=True,
            **names.params(),
        )
        incarnation = state.record.incarnation
        checkpoints: list[dict[str, Any]] = []
        others: list[dict[str, Any]] = []
        for entry in found:
            sort_key = _text(entry, "SK")
            if sort_key == layout.RUN_SK:
                continue
            if sort_key.startswith(layout.CHECKPOINT_PREFIX):
                # Only this incarnation's: a run restarted meanwhile keeps its checkpoints.
                guard = _Names()
                operation = _delete(pk, sort_key)
                ours = guard.value(_s(f"ck-{run_key}-{incarnation}-"))
                operation["Delete"]["ConditionExpression"] = f"begins_with({guard('cid')}, {ours})"
                operation["Delete"].update(guard.params())
                checkpoints.append(operation)
            else:
                others.append({"DeleteRequest": {"Key": {"PK": _s(pk), "SK": _s(sort_key)}}})
        await self._guarded_deletes(checkpoints)
        await self._batch_write(others)
        if self.bucket is not None:
            await self._client()
            await self._discard_prefix(f"{run_key}/{incarnation}/")
        names = _Names()
        # Conditional: a run restarted meanwhile keeps its new run item.
        await self._conditional(
            "DeleteItem",
            Key={"PK": _s(pk), "SK": _s(layout.RUN_SK)},
            ConditionExpression=f"{names('inc')} = {names.value(_s(incarnation))}",
            **names.params(),
        )
        return counted, True

    async def _reconcile_blobs(self, run_key: str, state: _RunState) -> None:
        """Delete blobs of the run that no checkpoint points to (an append that crashed
        between its S3 PUT and its item write, a delete whose blob removal failed).

        A blob above the run's latest sequence may belong to an append still in flight, so
        it is spared; one of a finished incarnation is not.
        """
        if self.bucket is None:
            return
        referenced = set(state.book.blobs.values())
        incarnation = state.record.incarnation
        latest = state.record.latest_sequence

        def keep(key: str) -> bool:
            if key in referenced:
                return True
            parts = key.split("/")
            if len(parts) != 3 or parts[1] != incarnation:
                return False
            return int(parts[2][: layout.SEQUENCE_DIGITS] or "0") > latest

        await self._client()
        removed = await self._discard_prefix(f"{run_key}/", keep)
        if removed:
            logger.info("run %s: removed %d orphaned S3 blobs", run_key, removed)


# -- helpers -------------------------------------------------------------------------------


def _bind(function: Callable[[Any], Awaitable[_T]], argument: Any) -> Callable[[], Awaitable[_T]]:
    async def call() -> _T:
        return await function(argument)

    return call


def _after_removal(
    state: _RunState, book: layout.Book, removed: Sequence[int], **record_changes: Any
) -> tuple[_RunState, list[str]]:
    """The run state once ``book`` (already updated) no longer holds ``removed``, and the S3
    keys of the removed checkpoints' payloads; ``record_changes`` go into the run record."""
    head = msgspec.structs.replace(
        state.record,
        checkpoint_count=book.count,
        expires_at=book.expires_at(),
        **record_changes,
    )
    new_state = _RunState(
        record=head,
        rev=state.rev + 1,
        book=book,
        owners=state.owners - set(removed),
        purging=False,
    )
    return new_state, [state.book.blobs[s] for s in removed if s in state.book.blobs]


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


def _owned_delete(pk: str, key: str, owner: int) -> dict[str, Any]:
    """Delete an item only while it still belongs to ``owner`` (it may have been rewritten)."""
    names = _Names()
    operation = _delete(pk, layout.item_sk(key))
    operation["Delete"]["ConditionExpression"] = f"{names('o')} = {names.value(_n(owner))}"
    operation["Delete"].update(names.params())
    return operation


def _run_update(
    run_key: str, old: _RunState, new: _RunState, removed: Sequence[int]
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
        **_expiry_attributes(run_key, new.book),
    }
    sets = ", ".join(f"{names(k)} = {names.value(v)}" for k, v in assignments.items())
    gone = [name for name in _EXPIRY_ATTRIBUTES if name not in assignments]
    expression = f"SET {sets}"
    if gone:
        expression += " REMOVE " + ", ".join(names(name) for name in gone)
    dropped = sorted(set(removed) & old.owners)
    if dropped:
        expression += f" DELETE {names('own')} {names.value({'NS': [str(s) for s in dropped]})}"
    condition = f"{names('rev')} = {names.value(_n(old.rev))}"
    for sequence in sorted(set(removed) - old.owners):
        condition += f" AND NOT contains({names('own')}, {names.value(_n(sequence))})"
    return {
        "Key": {"PK": _s(layout.partition(run_key)), "SK": _s(layout.RUN_SK)},
        "UpdateExpression": expression,
        "ConditionExpression": condition,
        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        **names.params(),
    }


def _replace_owners(state: _RunState, owners: frozenset[int]) -> _RunState:
    return _RunState(
        record=state.record, rev=state.rev, book=state.book, owners=owners, purging=state.purging
    )


def _conflicting(cancelled: _Cancelled) -> bool:
    return any(reason.get("Code") == "TransactionConflict" for reason in cancelled.reasons)


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


def _filter_headers(
    found: list[Any], run: _RunState, now: float, include_expired: bool, limit: int
) -> list[CheckpointHeader]:
    result: list[CheckpointHeader] = []
    for item in found:
        if isinstance(item, _RunState):
            continue
        sequence = layout.sequence_of(_text(item, "SK"))
        checkpoint_id = _text(item, "cid")
        parsed = _ids.parse_checkpoint_id(checkpoint_id)
        if parsed is None or parsed[1] != run.record.incarnation or not run.book.holds(sequence):
            continue
        expires_at = _number(item, "x")
        if not include_expired and not is_live(expires_at, now):
            continue
        result.append(
            CheckpointHeader(
                sequence=sequence,
                checkpoint_id=checkpoint_id,
                created_at=_number(item, "ca") or 0.0,
                expires_at=expires_at,
                header=_bytes(item, "hdr"),
            )
        )
        if len(result) >= limit:
            break
    return result


def parse_size(text: str) -> int:
    """``350KB``, ``1MB``, ``200000``: bytes (KB = 1,024 bytes, as DynamoDB counts)."""
    match = _SIZE.fullmatch(text)
    unit = match[2].upper() if match else ""
    if match is None or unit not in _UNITS:
        raise ConfigurationError(f"threshold must be a size such as 350KB or 300000, got {text!r}")
    return int(match[1]) * _UNITS[unit]


# -- provisioning --------------------------------------------------------------------------


async def _provision_table(client: Any, table: str) -> None:
    action = f"provisioning DynamoDB table {table}"
    try:
        try:
            described = await client.describe_table(TableName=table)
        except ClientError as exc:
            if error_code(exc) != "ResourceNotFoundException":
                raise
            await client.create_table(TableName=table, **layout.TABLE_DEFINITION)
            described = None
        if described is not None:
            present = {
                index["IndexName"]
                for index in described["Table"].get("GlobalSecondaryIndexes", [])
            }
            indexes = layout.TABLE_DEFINITION["GlobalSecondaryIndexes"]
            wanted = {index["IndexName"] for index in indexes}
            missing = sorted(wanted - present)
            if missing:
                raise ConfigurationError(
                    f"table {table} exists without the indexes {missing}; add them as in "
                    "stores/dynamodb/table.json or use a new table"
                )
        waiter = client.get_waiter("table_exists")
        await waiter.wait(TableName=table, WaiterConfig={"Delay": 1, "MaxAttempts": 120})
        ttl = await client.describe_time_to_live(TableName=table)
        status = ttl.get("TimeToLiveDescription", {})
        if status.get("TimeToLiveStatus") not in ("ENABLED", "ENABLING"):
            await client.update_time_to_live(
                TableName=table,
                TimeToLiveSpecification={"Enabled": True, "AttributeName": layout.TTL_ATTRIBUTE},
            )
        elif status.get("AttributeName") != layout.TTL_ATTRIBUTE:
            raise ConfigurationError(
                f"table {table} has TTL on {status.get('AttributeName')!r}; this store needs "
                f"TTL on {layout.TTL_ATTRIBUTE!r}"
            )
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, action) from exc


LIFECYCLE_RULE: Final[dict[str, Any]] = {
    "ID": "fastcheckpoint-blobs",
    "Status": "Enabled",
    "Filter": {"Prefix": ""},
    # Deleted blobs stay as noncurrent versions under versioning: keep them 30 days for
    # recovery, then let S3 remove them, with the delete markers left behind.
    "NoncurrentVersionExpiration": {"NoncurrentDays": 30},
    "Expiration": {"ExpiredObjectDeleteMarker": True},
    "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
}


async def _provision_bucket(client: Any, bucket: str, prefix: str, region: str | None) -> None:
    action = f"provisioning S3 bucket {bucket}"
    try:
        try:
            await client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            if error_code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise
            params: dict[str, Any] = {"Bucket": bucket}
            if region and region != "us-east-1":
                params["CreateBucketConfiguration"] = {"LocationConstraint": region}
            await client.create_bucket(**params)
        await client.put_bucket_versioning(
            Bucket=bucket, VersioningConfiguration={"Status": "Enabled"}
        )
        await client.put_bucket_encryption(
            Bucket=bucket,
            ServerSideEncryptionConfiguration={
                "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
            },
        )
        rule = {**LIFECYCLE_RULE, "Filter": {"Prefix": prefix}}
        await client.put_bucket_lifecycle_configuration(
            Bucket=bucket, LifecycleConfiguration={"Rules": [rule]}
        )
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, action) from exc
