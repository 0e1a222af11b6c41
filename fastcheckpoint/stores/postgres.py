"""PostgreSQL store: one server-side function call per operation, through asyncpg.

Layout and locking: see :mod:`fastcheckpoint.stores._postgres_sql` (tables ``<prefix>runs``,
``checkpoints``, ``items``, ``refs``, ``labels``, ``ops``, ``migrations`` in one schema).

Costs in round trips (steady state, asyncpg's statement cache on): every operation is one call
of a store function, so one round trip each: append (with pruning, expiry bookkeeping, items
and shared-item references), get, latest, read with items, a page of headers, a page of runs
(by status or label), count, update, delete, delete_run, every items call, and each
``purge_expired`` batch. A statement's first use on a connection costs one more round trip
(asyncpg prepares it); with ``statement_cache_size=0`` (PgBouncer in transaction mode before
1.21) every call costs two (an unnamed prepare, then the execution), and nothing is kept in
the server session. Items nested under a shared item (``SupportsNestedItems``) are one
primary-key range of the items table: a read with items returns them in its one call (one
range scan per distinct ref, however many items), and whatever removes the shared item
deletes them in the same transaction (one range delete).

Damaged run rows. Every write changes a run row and its checkpoints in one transaction, so only
something outside the store makes them disagree: a row put back from an older copy (it knows
fewer sequences, another incarnation), edited by hand, or a run id that is not UTF-8. Each call
that uses the row checks it against the newest checkpoint in place (one primary-key probe, in
the same function): reads return intact checkpoints with status ``active``, writes refuse with
:class:`CorruptCheckpointError`, listings and counts leave the run out, and
:meth:`PostgresStore.rebuild_run` derives a new row from the log (``SupportsRepair``).

Lost replies. A connection that breaks after the server committed leaves the client unsure:
the call is retried with the same write token, and the server recognises its own earlier
write (the checkpoint's token, the run's last update token, or a five-minute memo of the
result of an append, a delete, an items delete or a create-only items write) and reports what
happened instead of failing or writing twice: an append whose checkpoint was deleted or
pruned before its retry arrived is acknowledged, not written again.

Runs on asyncio only (asyncpg); one connection pool per event loop for pools it builds.
See ``docs/stores/postgres.md`` for URL options, schema, migrations, PgBouncer and grants.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, NoReturn, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import asyncpg
import asyncpg.exceptions as pg_errors

from fastcheckpoint import _ids
from fastcheckpoint._config import RetryPolicy, check_default_ttl
from fastcheckpoint._urls import redacted
from fastcheckpoint._validate import shown
from fastcheckpoint.errors import (
    CheckpointNotFound,
    ConfigurationError,
    ConflictError,
    CorruptCheckpointError,
    SequenceConflict,
    StoreError,
    StoreUnavailableError,
    ValidationError,
)
from fastcheckpoint.stores._base import (
    MAX_ITEM_KEY_BYTES,
    CheckpointHeader,
    ExpiryCleanup,
    Item,
    RunDamage,
    RunRecord,
    StoredCheckpoint,
    check_append,
    check_flag,
    check_guard_arg,
    check_head,
    check_int,
    check_items,
    check_keep_latest,
    check_keys,
    check_labels,
    check_options,
    check_run_key,
    check_sequence,
    check_str,
    check_time,
    is_run_key,
    item_key_bytes,
    items_deleted_behind,
    unheld_refs,
)
from fastcheckpoint.stores._loops import GivenClientLoop, PerLoop, require_asyncio
from fastcheckpoint.stores._postgres_schema import SchemaState, provision, schema_state
from fastcheckpoint.stores._postgres_sql import MIGRATIONS, Names, Statements

__all__ = ["PostgresStore"]

_log = logging.getLogger(__name__)

DEFAULT_SCHEMA = "public"
DEFAULT_TABLE_PREFIX = "fc_"
DEFAULT_MAX_PAYLOAD_BYTES = 256 * 1024 * 1024
"""Header plus payload of one checkpoint (or one item value). PostgreSQL refuses values over
1 GB; one this large already takes seconds to write and to read."""

_URL_SCHEMES = {"postgresql", "postgres"}
_MAX_BIGINT = 2**63 - 1
_LATEST = MIGRATIONS[-1].version

# Store options (URL query or keywords) and the pool options they map to.
_STORE_OPTIONS = frozenset({
    "schema", "table_prefix", "max_payload_bytes", "default_ttl_seconds", "min_size",
    "max_size", "statement_cache_size", "connect_timeout", "command_timeout",
})
# libpq connection parameters asyncpg reads from the URL query; others would become server
# settings of every session (session state that PgBouncer may refuse), so they are refused.
_DRIVER_QUERY_OPTIONS = frozenset({
    "host", "port", "user", "password", "passfile", "dbname", "database", "sslmode",
    "sslcert", "sslkey", "sslrootcert", "sslcrl", "sslpassword", "sslnegotiation",
    "ssl_min_protocol_version", "ssl_max_protocol_version", "target_session_attrs",
    "krbsrvname", "gsslib", "service", "application_name",
})
_DRIVER_KEYWORD_OPTIONS = frozenset({
    "ssl", "direct_tls", "server_settings", "max_inactive_connection_lifetime",
    "max_queries", "max_cached_statement_lifetime", "max_cacheable_statement_size",
    "password", "passfile",
})

# Failures after which the same call may simply be sent again: the connection broke (the
# server may or may not have run it: write tokens tell), the server is starting, stopping or
# out of connection slots, or it rolled the transaction back (serialization, deadlock).
_TRANSIENT_SERVER = (
    pg_errors.SerializationError,
    pg_errors.DeadlockDetectedError,
    pg_errors.TooManyConnectionsError,
    pg_errors.CannotConnectNowError,
    pg_errors.AdminShutdownError,
    pg_errors.CrashShutdownError,
    pg_errors.PostgresConnectionError,
)
_TRANSIENT = (
    *_TRANSIENT_SERVER,
    pg_errors.ConnectionDoesNotExistError,
    OSError,
    asyncio.TimeoutError,
)
_STUCK = "cannot switch to state"
"""asyncpg's InternalClientError for a pooled connection whose server process was killed
while the connection was being made: the pool hands it out once more and it refuses the
statement before sending it (the pool then replaces it), so trying again is safe."""
# InternalClientError: asyncpg's protocol errors and its stale type cache after a schema
# change under a running application (OutdatedSchemaCacheError).
_DRIVER_ERRORS = (pg_errors.PostgresError, pg_errors.InterfaceError,
                  pg_errors.InternalClientError, OSError, asyncio.TimeoutError, RuntimeError)

_POOL_ONLY = frozenset({"min_size", "max_size", "max_queries",
                        "max_inactive_connection_lifetime"})
_CORRUPT_LOG = "FC001"
_ITEM_TAKEN = "FC002"
_DAMAGED_ROW = "FC003"
_REFS_UNHELD = "FC004"
_REPAIR_PAGE = 500
_REMEDY = ("`fastcheckpoint doctor --repair URL` rebuilds it from the run's checkpoints "
           "(delete_run removes the run)")


def _token() -> str:
    """A write token: how a store function recognises a retry of the call that carried it."""
    return os.urandom(8).hex()


def _bigint(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{what} must be an int, got {type(value).__name__}")
    if not -_MAX_BIGINT - 1 <= value <= _MAX_BIGINT:
        raise ValidationError(f"{what} {value} is outside PostgreSQL's bigint range")
    return value


def _text_arg(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{what} must be a str, got {type(value).__name__}")
    if "\x00" in value:
        raise ValidationError(f"{what} must not contain NUL characters: PostgreSQL text cannot")
    _utf8(value, what)
    return value


def _utf8(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise ValidationError(f"{what} must be a str, got {type(value).__name__}")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValidationError(f"{what} must be valid unicode (it has a lone surrogate)") from exc


def _key_bytes(key: object) -> bytes:
    return item_key_bytes(key, MAX_ITEM_KEY_BYTES, "the item-key limit of every store")


def _decoded(raw: bytes | None, what: str, where: str) -> str:
    if not isinstance(raw, bytes):  # a NULL in an array, written behind the store's back
        raise CorruptCheckpointError(f"{what} is NULL", key=where)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptCheckpointError(f"{what} is not UTF-8 text", key=where) from exc


def _out_of_range(exc: StoreError) -> bool:
    """Whether ``exc`` is a bigint counter of a run row that cannot go up (a version or
    count written behind the store's back: no create or status change reaches the limit)."""
    return isinstance(exc.__cause__, pg_errors.NumericValueOutOfRangeError)


def _scan_bounds(prefix: str, start_after: str | None, reverse: bool) -> tuple[bytes, bytes]:
    """``[low, high)`` in UTF-8 byte order (which is code point order) for a prefix scan that
    starts after ``start_after``. ``b"\\xff"`` is above every UTF-8 string."""
    low = _utf8(prefix, "prefix")
    high = b"\xff"
    stripped = low.rstrip(b"\xff")
    if stripped:
        high = stripped[:-1] + bytes([stripped[-1] + 1])
    if start_after is not None:
        after = _utf8(start_after, "start_after")
        if reverse:
            high = min(high, after)
        else:
            low = max(low, after + b"\x00")  # the smallest string above ``after``
    return low, high


def _cursor_of(created_at: float, run_key: str) -> str:
    return f"{float(created_at).hex()}:{run_key}"


def _parse_cursor(cursor: str | None) -> tuple[float, str]:
    if cursor is None:
        return math.inf, ""
    created, _, run_key = cursor.partition(":") if isinstance(cursor, str) else ("", "", "")
    try:
        value = float.fromhex(created)
    except ValueError:
        value = math.nan
    if math.isnan(value) or not is_run_key(run_key):
        raise ValidationError(f"malformed run listing cursor {shown(cursor)}")
    return value, run_key


def _storable(text: object) -> bool:
    """Whether ``text`` is a ``str`` a text column can hold (no NUL, UTF-8): one that is not
    matches nothing stored."""
    if not isinstance(text, str) or "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _page_size(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise ValidationError(f"limit must be an int, got {type(limit).__name__}")
    return max(0, min(limit, 2**31 - 2))


def _transient(exc: BaseException) -> bool:
    """Whether trying ``exc``'s statement again may succeed (see :data:`_TRANSIENT`)."""
    return isinstance(exc, _TRANSIENT) or (
        isinstance(exc, pg_errors.InternalClientError) and str(exc).startswith(_STUCK))


class PostgresStore(ExpiryCleanup):
    """Checkpoints in PostgreSQL 13+ (tested on 15), through asyncpg.

    Build it with :meth:`from_url` (``postgresql://user@host:5432/db?schema=s&table_prefix=p``,
    also ``postgres://``) or hand it an ``asyncpg.Pool``; a pool you pass is never closed by
    the store (build it with ``reset=`` a coroutine that does nothing: asyncpg's default reset
    costs a round trip each time the store releases a connection). The schema is created and
    upgraded by :meth:`provision` (``fastcheckpoint init URL``); a store whose schema is
    missing, older or newer than this version of fastcheckpoint raises
    :class:`ConfigurationError` saying what to run.

    Runs on asyncio only: under trio the first call raises :class:`ConfigurationError`. A store
    built by :meth:`from_url` opens one pool per event loop, so it works from several
    ``asyncio.run()`` calls; a pool you pass belongs to the event loop that first uses the
    store, and a call from another loop raises :class:`ConfigurationError` before anything
    is sent.

    ``retry`` (default :class:`RetryPolicy()`): transient failures (broken connections, a
    server starting or out of connection slots, serialization failures, deadlocks) are
    retried with its backoff; the write token of each call makes a retry safe.
    ``max_payload_bytes`` bounds header plus payload of one checkpoint and each item value.
    ``default_ttl_seconds`` is FastAgentic's store-level TTL (:class:`SupportsDefaultTTL`).
    A run row damaged behind the store's back is found and rebuilt from the run's checkpoints
    by :meth:`damaged_runs` and :meth:`rebuild_run` (:class:`SupportsRepair`, what
    ``manager.repair()`` and ``fastcheckpoint doctor --repair`` use).
    """

    nested_items = True
    sequence_guard = True

    def __init__(
        self,
        pool: asyncpg.Pool | None = None,
        *,
        schema: str = DEFAULT_SCHEMA,
        table_prefix: str = DEFAULT_TABLE_PREFIX,
        retry: RetryPolicy | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        default_ttl_seconds: float | None = None,
    ) -> None:
        if pool is not None and not isinstance(pool, asyncpg.Pool):
            raise ConfigurationError(
                f"PostgresStore needs an asyncpg.Pool, got {type(pool).__name__}; or build it "
                "with PostgresStore.from_url(...) or open_store(...)")
        try:
            self._names = Names(schema, table_prefix)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from exc
        if len(table_prefix) > 24 or len(schema) > 63:
            raise ConfigurationError(
                "table_prefix takes at most 24 characters and schema 63 (PostgreSQL names are "
                f"63 bytes long at most), got {table_prefix!r} and {schema!r}")
        _check_positive_int("max_payload_bytes", max_payload_bytes)
        check_default_ttl(default_ttl_seconds)
        self._sql = Statements(self._names)
        self._retry = retry if retry is not None else RetryPolicy()
        self.max_payload_bytes = max_payload_bytes
        self.default_ttl_seconds = default_ttl_seconds
        self._given = pool
        self._given_loop = GivenClientLoop(
            "PostgresStore", "asyncpg", "Build the store with PostgresStore.from_url(...) or "
            "open_store(...) (one pool per event loop), or give each event loop its own store")
        self._factory: Callable[[], Coroutine[Any, Any, asyncpg.Pool]] | None = None
        self._connect: Callable[[], Coroutine[Any, Any, asyncpg.Connection]] | None = None
        self._where = "PostgreSQL"
        self._pools: PerLoop[asyncpg.Pool] = PerLoop(
            self._build_pool, self._close_pool, store="PostgresStore", driver="asyncpg")

    @classmethod
    def from_url(
        cls, url: str, *, retry: RetryPolicy | None = None, **options: Any
    ) -> PostgresStore:
        """``postgresql://[user[:password]@]host[:port]/database?schema=s&table_prefix=p``.

        Store options (URL query or keyword): ``schema`` (default ``public``),
        ``table_prefix`` (default ``fc_``), ``max_payload_bytes``, ``default_ttl_seconds``;
        pool options ``min_size`` (default 1), ``max_size`` (default 10),
        ``statement_cache_size`` (default 100; ``0`` for PgBouncer in transaction mode
        before 1.21), ``connect_timeout`` (seconds, default 10), ``command_timeout`` (seconds,
        default none). The libpq connection parameters asyncpg understands (``sslmode``,
        ``sslrootcert``, ``passfile``, ``target_session_attrs``, ``application_name``...) go to
        it; keyword options may also set asyncpg's ``ssl``, ``server_settings`` and pool
        settings. Any other option is a :class:`ConfigurationError` naming it.
        """
        parts = _split_url(url)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        scheme = parts.scheme.lower()
        check_options(f"the {scheme}:// store (URL query)", query,
                      _STORE_OPTIONS | _DRIVER_QUERY_OPTIONS)
        check_options(f"the {scheme}:// store (keyword options)", options,
                      _STORE_OPTIONS | _DRIVER_KEYWORD_OPTIONS)
        store_options = {name: options.pop(name, query.pop(name, None))
                         for name in ("schema", "table_prefix", "max_payload_bytes",
                                      "default_ttl_seconds")}
        pool_options = _pool_options(query, options)
        store = cls(retry=retry, **_typed_store_options(store_options))
        dsn = urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(query), ""))
        store._where = f"PostgreSQL at {_describe(parts)}"

        connect_options = {name: value for name, value in pool_options.items()
                           if name not in _POOL_ONLY}

        async def build() -> asyncpg.Pool:
            return await asyncpg.create_pool(dsn, reset=_keep_session, **pool_options)

        async def connect() -> asyncpg.Connection:
            return await asyncpg.connect(dsn, **connect_options)

        store._factory, store._connect = build, connect
        return store

    # -- pools per event loop ----------------------------------------------------------------

    async def _build_pool(self) -> asyncpg.Pool:
        """The running loop's pool: a new one per loop for a store built from a URL, else the
        pool handed in (for its first loop only). Checks the schema version once per pool."""
        if self._factory is None:
            self._given_loop.check()
            pool = self._given_pool()
        else:
            pool = await self._factory()
        try:
            # Refused too (no schema yet, say: processes starting before init has run), the
            # pool is closed: each call builds a new one, and kept, they held a connection each.
            self._check_schema(await schema_state(pool, self._names))
        except BaseException:
            if self._factory is not None:
                pool.terminate()
            raise
        return pool

    def _given_pool(self) -> asyncpg.Pool:
        if self._given is None:
            raise ConfigurationError(
                "PostgresStore() was built without a pool: pass an asyncpg.Pool, or build it "
                "with PostgresStore.from_url(...) or open_store(...)")
        return self._given

    async def _close_pool(self, pool: asyncpg.Pool) -> None:
        if self._factory is not None:
            await pool.close()

    def _check_schema(self, state: SchemaState) -> None:
        where = f"{self._where} (schema {self._names.schema!r}, prefix " \
                f"{self._names.prefix!r})"
        if state.version is None:
            raise ConfigurationError(
                f"{where} holds no fastcheckpoint tables; create them with: "
                "fastcheckpoint init URL (or await store.provision())")
        if state.version < _LATEST:
            raise ConfigurationError(
                f"{where} is at schema version {state.version}; this fastcheckpoint needs "
                f"version {_LATEST}: upgrade it with: fastcheckpoint init URL")
        if state.version > _LATEST:
            raise ConfigurationError(
                f"{where} was migrated by a newer fastcheckpoint (schema version "
                f"{state.version}; this one knows up to {_LATEST}): upgrade fastcheckpoint")

    # -- plumbing --------------------------------------------------------------------------

    async def _fetch(self, what: str, sql: str, *args: Any) -> list[asyncpg.Record]:
        """Run one statement, retrying transient failures with the retry policy; translate
        every driver error."""
        attempt = 0
        while True:
            try:
                pool = await self._pools.get()
                rows: list[asyncpg.Record] = await pool.fetch(sql, *args)
                return rows
            except ConfigurationError:
                raise
            except _DRIVER_ERRORS as exc:
                if not _transient(exc) or attempt >= self._retry.max_retries:
                    self._raise(exc, what)
                _log.info("%s: %s failed (%s); retrying", self._where, what, exc)
                await anyio.sleep(self._retry.delay(attempt))
                attempt += 1

    async def _row(self, what: str, sql: str, *args: Any) -> asyncpg.Record | None:
        rows = await self._fetch(what, sql, *args)
        return rows[0] if rows else None

    async def _value(self, what: str, sql: str, *args: Any) -> Any:
        row = await self._row(what, sql, *args)
        return None if row is None else row[0]

    def _raise(self, exc: BaseException, what: str) -> NoReturn:
        """Translate a driver error into ours, saying what to fix; the driver's is chained."""
        where = self._where
        if isinstance(exc, (pg_errors.InvalidAuthorizationSpecificationError,
                            pg_errors.InvalidPasswordError)):
            raise ConfigurationError(
                f"{where} refused the credentials ({exc}); put the right user and password in "
                "the URL (postgresql://user:password@host:5432/db) or a passfile") from exc
        if isinstance(exc, pg_errors.ClientConfigurationError):
            raise ConfigurationError(f"{where}: {exc}; fix the URL or the options") from exc
        if isinstance(exc, pg_errors.InvalidCatalogNameError):
            raise ConfigurationError(
                f"{where}: {exc}; create the database first (CREATE DATABASE ...)") from exc
        if isinstance(exc, (pg_errors.UndefinedTableError, pg_errors.UndefinedFunctionError)):
            raise ConfigurationError(
                f"{where} lacks the store's tables or functions during {what} ({exc}); create "
                "or upgrade them with: fastcheckpoint init URL") from exc
        if isinstance(exc, pg_errors.InsufficientPrivilegeError):
            raise StoreError(
                f"{where} denied {what}: {exc}. The store's role needs the grants in "
                "stores/postgres/grants.sql (see docs/stores/postgres.md#grants)") from exc
        if isinstance(exc, pg_errors.PostgresError) and exc.sqlstate == _DAMAGED_ROW:
            run_key = getattr(exc, "detail", None) or "?"
            raise CorruptCheckpointError(
                f"{getattr(exc, 'message', exc)}; {_REMEDY}",
                key=f"{self._names['runs']} ({run_key})") from exc
        if isinstance(exc, pg_errors.PostgresError) and exc.sqlstate == _CORRUPT_LOG:
            raise CorruptCheckpointError(
                f"the checkpoint log contradicts its run row: {getattr(exc, 'message', exc)}; "
                f"{_REMEDY}", key=f"{self._names['checkpoints']}") from exc
        if isinstance(exc, pg_errors.ProgramLimitExceededError):
            raise ValidationError(f"{where} refused {what}: {exc}") from exc
        if _transient(exc):
            raise StoreUnavailableError(
                f"{where} is unavailable during {what} after {self._retry.max_retries} "
                f"retries ({type(exc).__name__}: {exc}); check that the server is running and "
                "reachable at the URL's host and port, and that it has connection slots free"
            ) from exc
        if isinstance(exc, pg_errors.InterfaceError) and "closed" in str(exc):
            raise StoreUnavailableError(f"{where}: the connection closed during {what}: {exc}") \
                from exc
        if isinstance(exc, RuntimeError) and "loop" in str(exc):
            raise ConfigurationError(
                f"asyncpg failed during {what} ({exc}): the pool belongs to an event loop that "
                "is gone; build the store with PostgresStore.from_url(...) or open_store(...) "
                "(one pool per event loop)") from exc
        raise StoreError(f"{where} failed during {what}: {type(exc).__name__}: {exc}") from exc

    def _check_size(self, what: str, size: int) -> None:
        if size > self.max_payload_bytes:
            raise ValidationError(
                f"{what} is {size} bytes; this PostgreSQL store accepts at most "
                f"{self.max_payload_bytes} (max_payload_bytes)")

    def _key(self, run_key: str, sequence: int) -> str:
        return f"{self._names['checkpoints']} ({run_key}, {sequence})"

    def _checkpoint(self, run_key: str, row: asyncpg.Record) -> StoredCheckpoint:
        """``row`` = sequence, checkpoint_id, created_at, expires_at, header, payload, refs."""
        where = self._key(run_key, row[0])
        refs = row[6] or ()
        return StoredCheckpoint(
            sequence=row[0],
            checkpoint_id=row[1],
            created_at=row[2],
            expires_at=row[3],
            header=bytes(row[4]),
            payload=bytes(row[5]),
            refs=tuple(_decoded(ref, "a ref", where) for ref in refs),
            key=where,
        )

    def _run_record(self, row: asyncpg.Record | Sequence[Any]) -> RunRecord:
        """``row`` = the run columns in ``RUN_COLUMNS`` order."""
        where = f"{self._names['runs']} ({row[11]})"
        return RunRecord(
            run_id=_decoded(row[0], "the run id", where),
            incarnation=row[1],
            status=row[2],
            created_at=row[3],
            updated_at=row[4],
            latest_sequence=row[5],
            checkpoint_count=row[6],
            expires_at=row[7],
            version=row[8],
            data=bytes(row[9]),
            labels=tuple(_decoded(label, "a label", where) for label in row[10]),
        )

    def _owned_run(self, row: asyncpg.Record) -> RunRecord:
        """The run record of ``row`` (run columns), :class:`CorruptCheckpointError` when the
        row names another run than its run key's (the run key is a hash of the run id, which
        the server cannot compute: the store checks it on every row it reads for a run)."""
        record = self._run_record(row)
        problem = _ids.foreign_run(row[11], record.run_id)
        if problem is not None:
            raise CorruptCheckpointError(
                f"the run row of run key {row[11]} {problem}; {_REMEDY}",
                key=f"{self._names['runs']} ({row[11]})")
        return record

    def _counter_overflow(self, run_key: str, what: str, exc: StoreError) -> NoReturn:
        raise CorruptCheckpointError(
            f"the run row of run key {run_key} holds a counter that {what} cannot raise "
            f"({exc.__cause__}); {_REMEDY}", key=f"{self._names['runs']} ({run_key})",
        ) from exc.__cause__

    # -- checkpoint log --------------------------------------------------------------------

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
        return await self._append(run_key, record, run, keep_latest, now, ())

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
        return await self._append(run_key, record, run, keep_latest, now, items)

    async def _append(
        self,
        run_key: str,
        record: StoredCheckpoint,
        run: RunRecord,
        keep_latest: int | None,
        now: float,
        items: Sequence[Item],
    ) -> str:
        check_run_key(run_key)
        keep_latest = check_keep_latest(keep_latest)
        check_append(run_key, record, run, items)
        labels = [_utf8(label, "a label") for label in run.labels]
        self._check_size("checkpoint header plus payload",
                         len(record.header) + len(record.payload))
        refs = [_key_bytes(ref) for ref in record.refs]
        keys, values, owners, expiries = self._item_columns(
            items, first_wins=True, checkpoint_expiry=(record.expires_at,))
        sequence = _bigint(record.sequence, "sequence")
        row = await self._append_row(
            run_key, sequence,
            run_key, sequence, _text_arg(record.checkpoint_id, "checkpoint_id"),
            record.created_at, record.expires_at, record.header, record.payload,
            refs or None, _token(), _utf8(run.run_id, "run_id"),
            _text_arg(run.incarnation, "incarnation"), _text_arg(run.status, "status"),
            run.created_at, _bigint(run.version, "version"), run.data, labels,
            keep_latest, now, keys or None, values or None, owners or None, expiries or None,
        )
        assert row is not None
        if row[0] == "ok":
            status: str = row[1]
            return status
        raise SequenceConflict(
            f"sequence {record.sequence} is not the next of run key {run_key}",
            latest_sequence=row[2], incarnation=row[3])

    async def _append_row(
        self, run_key: str, sequence: int, *args: Any
    ) -> asyncpg.Record | None:
        """The append call (``args``: the function's, from ``run_key`` on). A refusal because
        the log contradicts the run row names the run row, where the damage is; refs naming
        items the run does not hold are refused with their keys (hex in the error's detail)."""
        try:
            return await self._row("append", self._sql.append, *args)
        except StoreError as exc:
            cause = exc.__cause__
            if isinstance(cause, pg_errors.PostgresError) and cause.sqlstate == _REFS_UNHELD:
                detail = getattr(cause, "detail", None) or ""
                keys = [bytes.fromhex(key).decode("utf-8") for key in detail.split(",") if key]
                raise unheld_refs(run_key, sequence, keys) from cause
            if _out_of_range(exc):
                self._counter_overflow(run_key, "a create", exc)
            raise
        except CorruptCheckpointError as exc:
            where = f"{self._names['runs']} ({run_key})"
            if exc.key == where:
                raise
            cause = exc.__cause__
            raise CorruptCheckpointError(
                f"the checkpoint log contradicts its run row: "
                f"{getattr(cause, 'message', cause)}; {_REMEDY}", key=where) from cause

    def _item_columns(
        self, items: Iterable[Item], *, first_wins: bool,
        checkpoint_expiry: tuple[float | None] | None = None,
    ) -> tuple[list[bytes], list[bytes], list[int | None], list[float | None]]:
        """Validated item columns, one entry per key (the first or the last of a key wins),
        sorted by key so concurrent writers lock rows in one order. Items appended with a
        checkpoint (``checkpoint_expiry`` holds its expiry): the owned ones expire with it,
        the shared ones never expire by themselves."""
        chosen: dict[bytes, Item] = {}
        for item in items:
            if not isinstance(item, Item):
                raise ValidationError(f"items must be Item values, got {type(item).__name__}")
            if not isinstance(item.value, bytes):
                raise ValidationError("an item needs a bytes value")
            key = _key_bytes(item.key)
            self._check_size(f"item {item.key[:80]!r}", len(item.value))
            if item.owner is not None:
                _bigint(item.owner, "item owner")
            if first_wins and key in chosen:
                continue
            chosen[key] = item
        keys = sorted(chosen)
        values = [chosen[key].value for key in keys]
        owners = [chosen[key].owner for key in keys]
        if checkpoint_expiry is None:
            expiries = [chosen[key].expires_at for key in keys]
        else:
            expiries = [checkpoint_expiry[0] if chosen[key].owner is not None else None
                        for key in keys]
        return keys, values, owners, expiries

    async def get(
        self, run_key: str, sequence: int, *, now: float
    ) -> tuple[StoredCheckpoint, str] | None:
        check_time("now", now)
        check_run_key(run_key)
        sequence = check_sequence(sequence)
        if sequence < 0:
            return None
        row = await self._row("get", self._sql.get, run_key, sequence, now)
        return None if row is None else (self._checkpoint(run_key, row),
                                         self._status(run_key, row[7]))

    async def latest(self, run_key: str, *, now: float) -> tuple[StoredCheckpoint, str] | None:
        check_time("now", now)
        row = await self._row("latest", self._sql.latest, check_run_key(run_key), now)
        return None if row is None else (self._checkpoint(run_key, row),
                                         self._status(run_key, row[7]))

    def _status(self, run_key: str, status: str | None) -> str:
        """The run status a read reports: ``active`` when the run row is damaged (the store
        functions send ``NULL`` then), logged."""
        if status is not None:
            return status
        _log.warning("%s: the run row %s (%s) is damaged; reading its checkpoints with status "
                     "'active' (fastcheckpoint doctor --repair rebuilds it)", self._where,
                     self._names["runs"], run_key)
        return "active"

    async def read_with_items(
        self, run_key: str, *, sequence: int | None, now: float
    ) -> tuple[StoredCheckpoint, str, dict[str, bytes]] | None:
        check_time("now", now)
        check_run_key(run_key)
        if sequence is not None:
            sequence = check_sequence(sequence)
            if sequence < 0:
                return None
        row = await self._row("read_with_items", self._sql.read_with_items, run_key, sequence,
                              now, True)
        if row is None:
            return None
        checkpoint = self._checkpoint(run_key, row)
        pairs = [(_decoded(key, "an item key", checkpoint.key), value)
                 for key, value in zip(row[8] or (), row[9] or (), strict=True)]
        # A named item whose row is missing with no removal the store recorded comes with
        # no value: deleted behind the store's back.
        lost = [key for key, value in pairs if value is None]
        if lost:
            raise items_deleted_behind(run_key, checkpoint.sequence, lost,
                                       f"{self._names['items']} ({run_key}, {lost[0]})")
        return checkpoint, self._status(run_key, row[7]), {
            key: bytes(value) for key, value in pairs}

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
        upper = _MAX_BIGINT if before is None else max(
            min(check_int("before", before), _MAX_BIGINT), -1)
        rows = await self._fetch("headers", self._sql.headers, run_key, upper,
                                 _page_size(limit), now, bool(include_expired))
        if not rows:
            return [], None
        found = [
            CheckpointHeader(sequence=row[1], checkpoint_id=row[2], created_at=row[3],
                             expires_at=row[4], header=bytes(row[5]))
            for row in rows if row[1] is not None
        ]
        return found, self._status(run_key, rows[0][0])

    async def delete(self, run_key: str, sequence: int, *, checkpoint_id: str) -> bool:
        check_run_key(run_key)
        sequence = check_sequence(sequence)
        checkpoint_id = cast(str, check_str("checkpoint_id", checkpoint_id))
        if sequence < 0 or not _storable(checkpoint_id):
            return False
        removed = await self._value("delete", self._sql.delete, run_key, sequence,
                                    checkpoint_id, _token())
        return bool(removed)

    async def delete_run(self, run_key: str) -> int:
        removed = await self._value("delete_run", self._sql.delete_run,
                                    check_run_key(run_key), _token())
        return int(removed)

    # -- runs ------------------------------------------------------------------------------

    async def get_run(self, run_key: str, *, now: float) -> RunRecord | None:
        check_time("now", now)
        row = await self._row("get_run", self._sql.get_run, check_run_key(run_key), now)
        if row is None:
            return None
        if row[12] is not None:
            raise CorruptCheckpointError(
                f"the run row of run key {run_key} {row[12]}; {_REMEDY}",
                key=f"{self._names['runs']} ({run_key})")
        return self._owned_run(row)

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
        try:
            row = await self._row(
                "update_run", self._sql.update_run, check_run_key(run_key),
                _text_arg(incarnation, "incarnation"), _bigint(version, "version"),
                _text_arg(status, "status"), data, now, _token(),
                check_guard_arg(latest_sequence))
        except StoreError as exc:
            if _out_of_range(exc):
                self._counter_overflow(run_key, "a status change", exc)
            raise
        assert row is not None
        if row[0] == "missing":
            raise CheckpointNotFound(f"no live run with key {run_key}")
        record = self._run_record(row[1:])
        if row[0] == "newer":
            check_head(run_key, record.latest_sequence, latest_sequence)
        if row[0] != "ok":
            # 'conflict', or 'newer' from a row that matches after all: the row was deleted
            # and put back while this update waited for it, and nothing was changed.
            raise ConflictError(
                f"run changed concurrently (now {record.incarnation}/{record.version}, "
                f"expected {incarnation}/{version})")
        return record

    async def list_runs(
        self, *, status: str | None, limit: int, cursor: str | None, now: float
    ) -> tuple[list[RunRecord], str | None]:
        check_time("now", now)
        created_at, after = _parse_cursor(cursor)
        size = _page_size(limit)
        if status is not None:
            _text_arg(status, "status")
        rows = await self._fetch("list_runs", self._sql.list_runs, status, size + 1,
                                 created_at, after, now)
        return self._page(rows, size)

    async def runs_with_label(
        self, label: str, *, limit: int, cursor: str | None, now: float
    ) -> tuple[list[RunRecord], str | None]:
        check_time("now", now)
        created_at, after = _parse_cursor(cursor)
        size = _page_size(limit)
        raw = _utf8(check_labels((label,))[0], "label")
        rows = await self._fetch("runs_with_label", self._sql.runs_with_label, raw,
                                 size + 1, created_at, after, now)
        return self._page(rows, size)

    def _page(self, rows: list[asyncpg.Record], size: int) -> tuple[list[RunRecord], str | None]:
        """A page of run records; a row that cannot be read (text that is not UTF-8, written
        behind the store's back) is left out and logged, so it hides no other run."""
        page = []
        for row in rows[:size]:
            if row[12]:
                _log.warning("%s: run listing skips the damaged run row %s (%s) "
                             "(fastcheckpoint doctor --repair rebuilds it)", self._where,
                             self._names["runs"], row[11])
                continue
            try:
                page.append(self._owned_run(row))
            except CorruptCheckpointError as exc:
                _log.warning("%s: run listing skips a damaged run row: %s (%s)", self._where,
                             exc.key, exc)
        if len(rows) <= size or size == 0:
            return page, None
        last = rows[size - 1]
        return page, _cursor_of(last[3], last[11])

    async def count_runs(self, *, status: str | None, now: float) -> int:
        check_time("now", now)
        if status is not None:
            _text_arg(status, "status")
        return int(await self._value("count_runs", self._sql.count_runs, status, now))

    # -- items -----------------------------------------------------------------------------

    async def put_items(
        self, run_key: str, items: Sequence[Item], *, create_only: bool = False, now: float
    ) -> None:
        check_time("now", now)
        check_items(items)
        check_run_key(run_key)
        check_flag("create_only", create_only)
        keys, values, owners, expiries = self._item_columns(items, first_wins=False)
        if not keys:
            return
        try:
            await self._fetch("put_items", self._sql.put_items, run_key, keys, values, owners,
                              expiries, bool(create_only), now, _token())
        except StoreError as exc:
            cause = exc.__cause__
            if isinstance(cause, pg_errors.PostgresError) and cause.sqlstate == _ITEM_TAKEN:
                taken = bytes.fromhex(str(cause.args[0]) if cause.args else "")
                name = taken.decode("utf-8", "replace") or "of the batch"
                raise ConflictError(f"item {name!r} already exists") from cause
            raise

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
        check_items(items)
        check_run_key(run_key)
        check_flag("if_absent", if_absent)
        _bigint(owner, "owner")
        for item in items:
            if isinstance(item, Item) and item.owner != owner:
                raise ValidationError(
                    f"item {item.key[:40]!r} names owner {item.owner}, not checkpoint {owner}")
        keys, values, _, _ = self._item_columns(items, first_wins=bool(if_absent))
        checkpoint_id = cast(str, check_str("checkpoint_id", checkpoint_id))
        if not _storable(checkpoint_id):
            return False
        wrote = await self._value("put_owned_items", self._sql.put_owned_items, run_key, owner,
                                  checkpoint_id, keys, values, bool(if_absent), now, _token())
        return bool(wrote)

    async def get_items(
        self, run_key: str, keys: Sequence[str], *, now: float
    ) -> dict[str, bytes]:
        check_time("now", now)
        check_run_key(run_key)
        wanted = sorted({_key_bytes(key) for key in check_keys(keys)})
        if not wanted:
            return {}
        rows = await self._fetch("get_items", self._sql.get_items, run_key, wanted, now)
        return {row[0].decode("utf-8"): bytes(row[1]) for row in rows}

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
        size = _page_size(limit)
        low, high = _scan_bounds(prefix, start_after, bool(reverse))
        if size == 0 or low >= high:
            return []
        wanted = size
        while True:
            rows = await self._fetch("scan_items", self._sql.scan_items, run_key, low, high,
                                     size, bool(reverse), now)
            found: list[tuple[str, bytes]] = []
            for key, value in rows:
                try:
                    found.append((_decoded(key, "an item key", f"run {run_key}"), bytes(value)))
                except CorruptCheckpointError as exc:  # written behind the store's back
                    _log.warning("postgres store: skipping an item of %s: %s", exc.key, exc)
            if len(found) >= wanted or len(rows) < size:
                return found[:wanted]
            # Skipped rows are not counted in the page: a short page reads as the end.
            size += len(rows) - len(found)

    async def delete_items(self, run_key: str, keys: Sequence[str]) -> int:
        check_run_key(run_key)
        wanted = sorted({_key_bytes(key) for key in check_keys(keys)})
        if not wanted:
            return 0
        return int(await self._value("delete_items", self._sql.delete_items, run_key, wanted,
                                     _token()))

    # -- maintenance -----------------------------------------------------------------------

    async def purge_expired(self, *, now: float, limit: int) -> tuple[int, bool]:
        check_time("now", now)
        row = await self._row("purge_expired", self._sql.purge, now, max(_page_size(limit), 1))
        assert row is not None
        return int(row[0]), bool(row[1])

    # -- repair (SupportsRepair) -------------------------------------------------------------

    async def damaged_runs(self, *, run_key: str | None = None, now: float) -> list[RunDamage]:
        """Run rows that cannot be used: a run id or label that is not UTF-8, a row copied
        over from another run, a row that contradicts its log (fewer sequences or another
        incarnation than the newest of the run's own checkpoints in place, other counts,
        another expiry), or a creation time, latest sequence or version out of range.
        ``newest`` is the newest checkpoint whose id is the run's. Without ``run_key`` this
        judges every run row of the store, in pages of 500 (one call each, reading the
        checkpoint table's rows but never a payload): an operator's tool, not for hot
        paths."""
        check_time("now", now)
        if run_key is not None:
            check_run_key(run_key)
        found: list[RunDamage] = []
        after = ""
        while True:
            rows = await self._fetch("damaged_runs", self._sql.damaged_runs, run_key, after,
                                     _REPAIR_PAGE)
            found.extend(damage for damage in map(self._damage, rows) if damage is not None)
            if run_key is not None or len(rows) < _REPAIR_PAGE:
                return found
            after = rows[-1][0]

    def _damage(self, row: asyncpg.Record) -> RunDamage | None:
        """``row`` of ``damaged_runs`` as a :class:`RunDamage`, ``None`` when intact. A row
        copied over from another run says so first (the server cannot tell; its incarnation
        differs from the run's checkpoints, when it holds any, and then the newest comes)."""
        problem = row[1]
        if isinstance(row[8], bytes):
            with contextlib.suppress(UnicodeDecodeError):  # the server reports that
                problem = _ids.foreign_run(row[0], row[8].decode("utf-8")) or problem
        if problem is None:
            return None
        newest = None if row[3] is None else CheckpointHeader(
            sequence=row[3], checkpoint_id=row[4], created_at=row[5],
            expires_at=row[6], header=bytes(row[7]))
        return RunDamage(
            run_key=row[0], key=f"{self._names['runs']} ({row[0]})",
            problem=f"the run row {problem}", checkpoints=int(row[2]), newest=newest)

    async def rebuild_run(self, run_key: str, seed: RunRecord, *, now: float) -> RunRecord:
        """Replace a damaged run row by one derived from the log, in one transaction (see
        :class:`SupportsRepair`): incarnation, latest sequence, counts, expiry and creation
        time from the checkpoints in place; labels from the seed, else the run's label rows;
        shared-item reference counts recounted; run id, status and data from ``seed``."""
        check_time("now", now)
        check_run_key(run_key)
        if not isinstance(seed, RunRecord):
            raise ValidationError(f"seed must be a RunRecord, got {type(seed).__name__}")
        labels = [_utf8(label, "a label") for label in check_labels(seed.labels)]
        if not isinstance(seed.run_id, str) or not isinstance(seed.data, bytes):
            raise ValidationError("the seed needs a str run_id and bytes data")
        if _ids.foreign_run(run_key, seed.run_id) is not None:
            # The function takes the seed's run id for the run's own (a row naming another
            # is damage it rebuilds).
            raise ValidationError(
                f"the seed names run {seed.run_id[:80]!r}, not one of run key {run_key}")
        row = await self._row(
            "rebuild_run", self._sql.rebuild_run, run_key, _utf8(seed.run_id, "run_id"),
            _text_arg(seed.status, "status"), seed.data, labels, now)
        assert row is not None
        where = f"{self._names['runs']} ({run_key})"
        if row[0] in ("missing", "empty"):
            raise CheckpointNotFound(
                f"run key {run_key} holds no checkpoint to rebuild a run row from")
        if row[0] == "intact":
            raise ConflictError(f"the run row {where} is not damaged")
        if row[0] == "foreign":
            # Not a failure of the store: the run has nothing to rebuild from, like a run
            # without checkpoints, and a repair reports it and goes on with the others.
            raise CheckpointNotFound(
                f"no checkpoint of run key {run_key} has an id of that run: nothing to "
                "rebuild the run row from")
        rebuilt = self._run_record(row[1:])
        _log.info("%s: rebuilt the run row %s from %d checkpoints", self._where, where,
                  rebuilt.checkpoint_count)
        return rebuilt

    async def provision(self) -> list[str]:
        """Create the schema's tables and functions, or upgrade them to this version.

        Idempotent, safe to run from several processes at once (they take turns); refuses
        (:class:`ConfigurationError`) a database migrated by a newer fastcheckpoint. Returns
        what it did, one line per step: ``"created schema s"``, ``"applied migration 1:
        ..."``, ``"found schema s at version 1"``.
        """
        attempt = 0
        while True:
            try:
                return await self._provision_once()
            except ConfigurationError:
                raise
            except _DRIVER_ERRORS as exc:
                if not _transient(exc) or attempt >= self._retry.max_retries:
                    self._raise(exc, "provision")
                await anyio.sleep(self._retry.delay(attempt))
                attempt += 1

    async def _provision_once(self) -> list[str]:
        """One connection of its own (the pools check the schema this creates)."""
        if self._connect is None:
            self._given_loop.check()
            async with self._given_pool().acquire() as given:
                return await provision(given, self._names)
        require_asyncio("PostgresStore", "asyncpg")
        connection = await self._connect()
        try:
            return await provision(connection, self._names)
        finally:
            await connection.close()

    async def aclose(self) -> None:
        await self._pools.aclose()


async def _keep_session(connection: asyncpg.Connection) -> None:
    """The pool's reset on release: nothing to undo. The store sets no session state (no SET,
    LISTEN, advisory lock or cursor), and asyncpg's default reset would cost a round trip per
    call."""


def _split_url(url: str) -> Any:
    if not isinstance(url, str):
        raise ConfigurationError(f"store URL must be a string, got {type(url).__name__}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise ConfigurationError(f"malformed PostgreSQL URL {redacted(url)}: {exc}") from exc
    if parts.scheme.lower() not in _URL_SCHEMES:
        raise ConfigurationError(
            f"a PostgreSQL store URL starts with postgresql:// or postgres://, got "
            f"{redacted(url)}")
    if not parts.path.strip("/"):
        raise ConfigurationError(
            f"a PostgreSQL URL names its database (postgresql://user@host:5432/db), got "
            f"{redacted(url)}")
    return parts


def _describe(parts: Any) -> str:
    host = parts.hostname or "localhost"
    port = parts.port or 5432
    return f"{host}:{port}{parts.path}"


def _typed_store_options(raw: dict[str, Any]) -> dict[str, Any]:
    typed: dict[str, Any] = {}
    for name, value in raw.items():
        if value is None:
            continue
        if name == "max_payload_bytes":
            typed[name] = _int_value(name, value)
        elif name == "default_ttl_seconds":
            typed[name] = None if value == "none" else _float_value(name, value)
        else:
            typed[name] = value
    return typed


def _pool_options(query: dict[str, str], options: dict[str, Any]) -> dict[str, Any]:
    """asyncpg pool and connection options from the URL query and the keyword options
    (keywords win); the libpq parameters stay in the query for asyncpg to read."""
    pool: dict[str, Any] = {"min_size": 1, "max_size": 10, "timeout": 10.0}
    for name, target, convert in (
        ("min_size", "min_size", _int_value), ("max_size", "max_size", _int_value),
        ("statement_cache_size", "statement_cache_size", _int_value),
        ("connect_timeout", "timeout", _float_value),
        ("command_timeout", "command_timeout", _float_value),
    ):
        value = options.pop(name, query.pop(name, None))
        if value is not None:
            pool[target] = convert(name, value)
    if pool["min_size"] < 0 or pool["max_size"] < 1 or pool["min_size"] > pool["max_size"]:
        raise ConfigurationError(
            f"pool sizes need 0 <= min_size <= max_size and max_size >= 1, got "
            f"min_size={pool['min_size']} max_size={pool['max_size']}")
    pool.update(options)
    return pool


def _int_value(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigurationError(f"{name} must be an integer, got {value!r}") from exc
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ConfigurationError(f"{name} must be an integer, got {value!r}")
    return number


def _float_value(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigurationError(
            f"{name} must be a number of seconds, got {value!r:.40}") from exc
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
        raise ConfigurationError(f"{name} must be a positive number of seconds, got {value!r}")
    return number


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a positive int, got {value!r}")
