"""Redis store: one server-side Lua script per operation, native expiry, Redis Cluster ready.

Layout (``<ns>`` is the prefix plus ``:``; every key of a run carries the hash tag
``{<run key>}``, so each script touches a single slot)::

    <ns>{<rk>}:run        hash   the run record
    <ns>{<rk>}:seq        zset   the checkpoint log (sequence -> sequence)
    <ns>{<rk>}:exp        zset   expiring checkpoints (sequence -> expires_at)
    <ns>{<rk>}:c:<seq>    hash   one checkpoint: id, created, expiry, header, payload
    <ns>{<rk>}:ik/iv/io/ie       items: keys (lex), values, owners, expiries
    <ns>{<rk>}:due        hash   what the global due index holds for this run
    <ns>{idx:<prefix>}:all / :s:<status> / :due / :statuses     the global indexes

Costs in round trips: append, get, latest, a page of headers, get_run, update_run, delete,
delete_run and each items call are one script call (``EVALSHA``; a server that lost its
scripts answers ``NOSCRIPT`` and redis-py loads the script and retries once). On Redis Cluster
the global indexes live in another slot: a call that creates, deletes or re-statuses a run, or
schedules its first expiry, costs one more call to apply the index change; steady-state appends
stay at one. ``list_runs`` and ``count_runs`` read the global index and then the run records in
one pipeline (two round trips). ``purge_expired`` costs one call per run due plus two.

Expiry. Checkpoint keys get native millisecond expiry, anchored at the manager's ``now``
(``PEXPIRE`` of ``expires_at - now``) rather than at the server's clock, so a manager with an
injected or skewed clock keeps the lifetime it asked for. Run-level keys expire with the run
plus a grace (they index the data, so they must not vanish first); index entries of data Redis
expired are dropped by the next read that meets them and by ``purge_expired``, which walks a
global due index (O(expired)). Every decision about liveness uses the manager's ``now``.

See ``docs/stores/redis.md`` for URL options, memory per checkpoint and the ACL the store needs.
"""

from __future__ import annotations

import logging
import math
import os
import re
import struct
from collections.abc import Sequence
from typing import Any, NoReturn
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import FullJitterBackoff

from fastcheckpoint._config import RetryPolicy
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
    CheckpointHeader,
    Item,
    RunRecord,
    StoredCheckpoint,
    check_keep_latest,
)
from fastcheckpoint.stores._redis_lua import INDEX, SCRIPTS, without_flags

__all__ = ["RedisCheckpointStore", "RedisStore", "redis_retry"]

_log = logging.getLogger(__name__)

DEFAULT_PREFIX = "fastcheckpoint"
DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
"""Header plus payload of one checkpoint (or one item value): Redis keeps it all in memory,
and a single value this large already blocks the server for tens of milliseconds."""

# Run-level keys (record, log, items) outlive the run's expiry by this much, so that writers
# whose clocks disagree by less than this never see them vanish before the data they index.
# Liveness never depends on it: every read compares expires_at with the manager's now.
_GRACE_MS = 60_000

_RUN_KEY = re.compile(r"[a-z2-7]{1,64}")
_MEMBER = re.compile(rb"([0-9a-f]{16})([a-z2-7]{1,64})\.([a-z2-7]{1,64})")
_URL_SCHEMES = {"redis", "rediss", "redis+cluster", "rediss+cluster"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def redis_retry(policy: RetryPolicy) -> Retry:
    """redis-py's own retry machinery configured from the one retry policy (§3.11).

    Full jitter, ``uniform(0, min(max_delay, base_delay * 2**n))``, on connection errors and
    timeouts (redis-py's defaults for ``Retry``), ``max_retries`` times.
    """
    return Retry(FullJitterBackoff(cap=policy.max_delay, base=policy.base_delay),
                 policy.max_retries)


def _sortable(value: float) -> str:
    """16 hex digits whose byte order is the numeric order of ``value``."""
    (bits,) = struct.unpack(">Q", struct.pack(">d", value))
    bits = bits ^ 0xFFFFFFFFFFFFFFFF if bits >> 63 else bits | 1 << 63
    return f"{bits:016x}"


def _float_arg(value: float) -> str:
    return repr(float(value))


def _expiry_arg(value: float | None) -> str:
    return "" if value is None else _float_arg(value)


def _ttl_ms(expires_at: float, now: float) -> int:
    # Never 0 or below: PEXPIRE would delete at once, before the log entry is written.
    return max(1, math.ceil((expires_at - now) * 1000))


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def _lex_successor(prefix: bytes) -> bytes | None:
    """The smallest byte string above every string that starts with ``prefix``."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


class RedisStore:
    """Checkpoints in Redis 7+ (or Redis Cluster, or any server that speaks it, e.g. Valkey).

    Build it with :meth:`from_url` (``redis://host:6379/0?prefix=fc``, ``rediss://`` for TLS,
    ``redis+cluster://`` or ``?cluster=true`` for a cluster) or hand it an existing
    ``redis.asyncio.Redis`` / ``RedisCluster`` created with ``decode_responses=False``; a client
    you pass is never closed by the store.

    ``retry``, when given, replaces the client's retry with :func:`redis_retry` of it.
    ``max_payload_bytes`` bounds header plus payload of one checkpoint and each item value.
    ``default_ttl_seconds`` is FastAgentic's store-level TTL: a manager whose config sets no
    ``default_ttl_seconds`` applies it to checkpoints created without ``ttl_seconds``
    (:class:`SupportsDefaultTTL`). ``owns_client=True`` hands the client to the store, which
    then closes it in :meth:`aclose`. ``script_flags=False`` leaves out the ``#!lua`` flags
    line of the scripts, for servers that cannot parse it (fakeredis); Redis 7 should keep it.
    """

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = DEFAULT_PREFIX,
        cluster: bool | None = None,
        retry: RetryPolicy | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        default_ttl_seconds: float | None = None,
        owns_client: bool = False,
        script_flags: bool = True,
    ) -> None:
        if not isinstance(client, (aioredis.Redis, RedisCluster)):
            raise ConfigurationError(
                "RedisStore needs a redis.asyncio.Redis or redis.asyncio.RedisCluster client, "
                f"got {type(client).__name__} (a synchronous redis.Redis will not do)"
            )
        if client.get_connection_kwargs().get("decode_responses"):
            raise ConfigurationError(
                "RedisStore needs a client created with decode_responses=False: checkpoints "
                "are bytes, and decoding them as text would corrupt them"
            )
        if not isinstance(prefix, str) or "{" in prefix or "}" in prefix:
            raise ConfigurationError(
                f"Redis key prefix must be a string without '{{' or '}}' (they would break "
                f"the hash tags that keep a run's keys in one cluster slot), got {prefix!r}"
            )
        if isinstance(max_payload_bytes, bool) or not isinstance(max_payload_bytes, int) or (
            max_payload_bytes < 1
        ):
            raise ConfigurationError(
                f"max_payload_bytes must be a positive int, got {max_payload_bytes!r}")
        if default_ttl_seconds is not None and (
            isinstance(default_ttl_seconds, bool)
            or not isinstance(default_ttl_seconds, (int, float))
            or not math.isfinite(default_ttl_seconds)
            or default_ttl_seconds <= 0
        ):
            raise ConfigurationError(
                "default_ttl_seconds must be None or a finite, positive number of seconds, "
                f"got {default_ttl_seconds!r}"
            )
        if retry is not None:
            client.set_retry(redis_retry(retry))
        self._client = client
        self._owns_client = owns_client
        self._cluster = isinstance(client, RedisCluster) if cluster is None else cluster
        self._prefix = prefix
        self._ns = prefix if not prefix or prefix.endswith(":") else prefix + ":"
        self._global = f"{self._ns}{{idx:{prefix}}}:"
        self.max_payload_bytes = max_payload_bytes
        self.default_ttl_seconds = default_ttl_seconds
        # RedisCluster discovers slots lazily, and in redis-py (8.1) concurrent first commands
        # race in that discovery, tearing down connections other tasks are using: do it once.
        self._discovered = not isinstance(client, RedisCluster)
        self._discovery = anyio.Lock()
        shape = (lambda text: text) if script_flags else without_flags
        self._scripts = {
            name: client.register_script(shape(text)) for name, text in SCRIPTS.items()
        }
        self._index = client.register_script(shape(INDEX))

    @classmethod
    def from_url(
        cls, url: str, *, retry: RetryPolicy | None = None, **options: Any
    ) -> RedisStore:
        """``redis://[user:password@]host:6379/0?prefix=fc``; also ``rediss://`` (TLS),
        ``redis+cluster://`` / ``rediss+cluster://`` or ``?cluster=true`` (Redis Cluster).

        Query options of the store: ``prefix``, ``cluster``, ``max_payload_bytes``,
        ``default_ttl_seconds``; every other query option (``socket_timeout``,
        ``ssl_cert_reqs``...) goes to redis-py's ``from_url``, as do keyword ``options``.
        """
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in _URL_SCHEMES:
            raise ConfigurationError(
                f"a Redis store URL starts with redis://, rediss://, redis+cluster:// or "
                f"rediss+cluster://, got {url!r}"
            )
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        prefix = options.pop("prefix", query.pop("prefix", DEFAULT_PREFIX))
        cluster_flag = query.pop("cluster", "").lower()
        if cluster_flag not in _TRUE | _FALSE:
            raise ConfigurationError(f"cluster= must be true or false, got {cluster_flag!r}")
        cluster = scheme.endswith("+cluster") or cluster_flag in _TRUE
        if parts.path.strip("/") and not parts.path.strip("/").isdigit():
            raise ConfigurationError(
                f"the path of a Redis URL is the database number (redis://host:6379/0), "
                f"got {parts.path!r} in {_redacted(url)}"
            )
        store_options: dict[str, Any] = {
            "max_payload_bytes": options.pop(
                "max_payload_bytes", _int_option(query, "max_payload_bytes")),
            "default_ttl_seconds": options.pop(
                "default_ttl_seconds", _float_option(query, "default_ttl_seconds")),
        }
        store_options = {name: value for name, value in store_options.items()
                         if value is not None}
        driver_url = urlunsplit(
            (scheme.removesuffix("+cluster"), parts.netloc, parts.path, urlencode(query), "")
        )
        policy = retry if retry is not None else RetryPolicy()
        options.setdefault("retry", redis_retry(policy))
        options["decode_responses"] = False
        try:
            client: Any = (
                RedisCluster.from_url(driver_url, **options) if cluster
                else aioredis.Redis.from_url(driver_url, **options)
            )
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(
                f"cannot build a Redis client from {_redacted(url)}: {exc}") from exc
        return cls(client, prefix=prefix, cluster=cluster, owns_client=True, **store_options)

    # -- plumbing --------------------------------------------------------------------------

    def _run_keys(self, run_key: str) -> tuple[list[str], str]:
        if not isinstance(run_key, str) or _RUN_KEY.fullmatch(run_key) is None:
            raise ValidationError(
                f"run key must be 1-64 characters of [a-z2-7] (the manager derives it from "
                f"the run id), got {run_key!r}"
            )
        base = f"{self._ns}{{{run_key}}}:"
        return [base + name for name in ("run", "seq", "exp", "due", "ik", "iv", "io", "ie")], base

    async def _run(
        self,
        name: str,
        run_key: str,
        now: float | None,
        args: Sequence[Any],
        *,
        checkpoint: int | None = None,
    ) -> list[Any]:
        """Call script ``name`` on the run's slot, apply any index operations it returned."""
        keys, base = self._run_keys(run_key)
        if checkpoint is not None:
            keys.append(f"{base}c:{checkpoint}")
        inline = "" if self._cluster else self._global
        argv = [base, "" if now is None else _float_arg(now), _GRACE_MS, inline, *args]
        reply = await self._call(self._scripts[name], keys, argv, what=name)
        result, ops = reply
        if ops:
            await self._apply_index_ops(ops)
        return list(result)

    async def _apply_index_ops(self, ops: Sequence[Any]) -> None:
        """Redis Cluster only: the run's slot changed; bring the global index along."""
        await self._call(
            self._index, [self._global + "all"], [self._global, *ops], what="index update"
        )

    async def _discover(self) -> None:
        async with self._discovery:
            if not self._discovered:
                await self._client.initialize()
                self._discovered = True

    async def _call(self, script: Any, keys: Sequence[str], args: Sequence[Any], *,
                    what: str) -> Any:
        try:
            if not self._discovered:
                await self._discover()
            return await script(keys=keys, args=args)
        except redis_errors.RedisError as exc:
            self._raise(exc, what)

    async def _driver(self, what: str, awaitable: Any) -> Any:
        try:
            if not self._discovered:
                await self._discover()
            return await awaitable
        except redis_errors.RedisError as exc:
            self._raise(exc, what)

    def _describe(self) -> str:
        try:
            kwargs = self._client.get_connection_kwargs()
        except Exception:  # pragma: no cover - a foreign client without connection kwargs
            return "the Redis server"
        host = kwargs.get("host") or kwargs.get("path") or "?"
        port = kwargs.get("port")
        return f"Redis at {host}:{port}" if port else f"Redis at {host}"

    def _raise(self, exc: redis_errors.RedisError, what: str) -> NoReturn:
        """Translate a driver error into ours, saying what to fix; the driver's is chained."""
        where = self._describe()
        message = str(exc)
        if isinstance(exc, redis_errors.AuthenticationError):
            raise ConfigurationError(
                f"{where} refused the credentials ({message}); put the right user and password "
                "in the URL (redis://user:password@host:6379/0)"
            ) from exc
        if isinstance(exc, redis_errors.NoPermissionError) or message.startswith("NOPERM"):
            raise StoreError(
                f"{where} denied {what}: {message}. The store's Redis user needs the commands "
                "and key patterns in stores/redis/users.acl (see docs/stores/redis.md#acl)"
            ) from exc
        if isinstance(exc, redis_errors.InvalidResponse):
            raise StoreUnavailableError(
                f"{where} did not answer in the Redis protocol ({message}); check that the URL "
                "points at a Redis server (not, e.g., PostgreSQL or an HTTP port)"
            ) from exc
        if isinstance(exc, (redis_errors.ConnectionError, redis_errors.TimeoutError)):
            hint = ("check that the server is running and reachable at the URL's host and "
                    "port, and for rediss:// that TLS settings match")
            if "closed by server" in message or "Protocol Error" in message:
                hint = ("the endpoint closed the connection: check that the URL points at a "
                        "Redis server and that rediss:// is used when it requires TLS")
            raise StoreUnavailableError(
                f"{where} is unavailable during {what} after retries ({message}); {hint}"
            ) from exc
        if "OOM" in message.split(" ", 1)[0]:
            raise StoreError(
                f"{where} is out of memory (maxmemory reached) and refused {what}; nothing was "
                "written. Raise maxmemory, lower retention, or run the cleanup loop"
            ) from exc
        if "WRONGTYPE" in message:
            raise StoreError(
                f"{where}: a key under the prefix {self._prefix!r} holds data of another type "
                f"during {what} ({message}); another application shares the prefix, so choose "
                "a prefix of its own (?prefix=...)"
            ) from exc
        if "shebang" in message.lower() or "unknown command" in message.lower():
            raise StoreError(
                f"{where} rejected the store's scripts ({message}); the Redis store needs "
                "Redis 7.0 or later (or a compatible server with Lua scripting)"
            ) from exc
        raise StoreError(f"{where} failed during {what}: {message}") from exc

    def _check_size(self, what: str, size: int) -> None:
        if size > self.max_payload_bytes:
            raise ValidationError(
                f"{what} is {size} bytes; this Redis store accepts at most "
                f"{self.max_payload_bytes} (max_payload_bytes). Raise the limit or keep large "
                "state elsewhere (e.g. the S3 store)"
            )

    def _checkpoint(self, run_key: str, fields: Sequence[Any]) -> tuple[StoredCheckpoint, str]:
        """``fields`` = status, sequence, id, created, expires, header, payload."""
        _, base = self._run_keys(run_key)
        key = f"{base}c:{_text(fields[1])}"
        try:
            record = StoredCheckpoint(
                sequence=int(fields[1]),
                checkpoint_id=_text(fields[2]),
                created_at=float(fields[3]),
                expires_at=float(fields[4]) if fields[4] else None,
                header=bytes(fields[5] or b""),
                payload=bytes(fields[6] or b""),
                key=key,
            )
        except (TypeError, ValueError, UnicodeDecodeError) as exc:
            raise CorruptCheckpointError(f"unreadable checkpoint fields: {exc}", key=key) from exc
        return record, _text(fields[0])

    def _run_record(self, run_key: str, fields: Sequence[Any]) -> RunRecord:
        """``fields`` = rid inc st ct ut ls exp v d count (as the scripts' run_fields())."""
        key = self._run_keys(run_key)[0][0]
        try:
            return RunRecord(
                run_id=_text(fields[0]),
                incarnation=_text(fields[1]),
                status=_text(fields[2]),
                created_at=float(fields[3]),
                updated_at=float(fields[4]),
                latest_sequence=int(fields[5]),
                checkpoint_count=int(fields[9]),
                expires_at=float(fields[6]) if fields[6] else None,
                version=int(fields[7]),
                data=bytes(fields[8] or b""),
            )
        except (TypeError, ValueError, UnicodeDecodeError) as exc:
            raise CorruptCheckpointError(f"unreadable run record: {exc}", key=key) from exc

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
        check_keep_latest(keep_latest)
        self._check_size("checkpoint header plus payload", len(record.header) + len(record.payload))
        expires_at = record.expires_at
        member = f"{_sortable(run.created_at)}{run_key}.{run.incarnation}"
        reply = await self._run(
            "append",
            run_key,
            now,
            [
                str(record.sequence),
                record.checkpoint_id,
                _float_arg(record.created_at),
                _expiry_arg(expires_at),
                record.header,
                record.payload,
                "" if expires_at is None else str(_ttl_ms(expires_at, now)),
                "" if keep_latest is None else str(keep_latest),
                os.urandom(8).hex(),
                run.run_id,
                run.incarnation,
                run.status,
                _float_arg(run.created_at),
                str(run.version),
                run.data,
                member,
                run_key,
            ],
            checkpoint=record.sequence,
        )
        if reply[0] == b"conflict":
            latest = int(reply[1]) if reply[1] else None
            incarnation = _text(reply[2]) if reply[2] else None
            raise SequenceConflict(
                f"sequence {record.sequence} is not the next of run key {run_key}",
                latest_sequence=latest,
                incarnation=incarnation,
            )
        return _text(reply[1])

    async def get(
        self, run_key: str, sequence: int, *, now: float
    ) -> tuple[StoredCheckpoint, str] | None:
        reply = await self._run("get", run_key, now, [str(sequence)], checkpoint=sequence)
        return self._checkpoint(run_key, reply[1:]) if reply[0] == 1 else None

    async def latest(self, run_key: str, *, now: float) -> tuple[StoredCheckpoint, str] | None:
        reply = await self._run("latest", run_key, now, [run_key])
        return self._checkpoint(run_key, reply[1:]) if reply[0] == 1 else None

    async def headers(
        self,
        run_key: str,
        *,
        before: int | None,
        limit: int,
        now: float,
        include_expired: bool = False,
    ) -> tuple[list[CheckpointHeader], str | None]:
        if limit < 1:
            return [], (await self._status_of(run_key, now, include_expired))
        reply = await self._run(
            "headers",
            run_key,
            now,
            ["" if before is None else str(before), str(limit), "1" if include_expired else "0",
             run_key],
        )
        if reply[0] != 1:
            return [], None
        _, base = self._run_keys(run_key)
        found: list[CheckpointHeader] = []
        for index in range(2, len(reply), 5):
            sequence, checkpoint_id, created, expires, header = reply[index:index + 5]
            try:
                found.append(CheckpointHeader(
                    sequence=int(sequence),
                    checkpoint_id=_text(checkpoint_id),
                    created_at=float(created),
                    expires_at=float(expires) if expires else None,
                    header=bytes(header or b""),
                ))
            except (TypeError, ValueError, UnicodeDecodeError) as exc:
                raise CorruptCheckpointError(
                    f"unreadable checkpoint fields: {exc}", key=f"{base}c:{_text(sequence)}"
                ) from exc
        return found, _text(reply[1])

    async def _status_of(self, run_key: str, now: float, include_expired: bool) -> str | None:
        fields = await self._run("get_run", run_key, now, [])
        if fields[1] is None:
            return None
        record = self._run_record(run_key, fields)
        if not include_expired and not _live(record.expires_at, now):
            return None
        return record.status

    async def delete(self, run_key: str, sequence: int, *, checkpoint_id: str) -> bool:
        reply = await self._run(
            "delete", run_key, None, [str(sequence), checkpoint_id, run_key], checkpoint=sequence
        )
        return bool(reply[0])

    async def delete_run(self, run_key: str) -> int:
        reply = await self._run("delete_run", run_key, None, [])
        return int(reply[0])

    # -- runs ------------------------------------------------------------------------------

    async def get_run(self, run_key: str, *, now: float) -> RunRecord | None:
        fields = await self._run("get_run", run_key, now, [])
        if fields[1] is None:
            return None
        record = self._run_record(run_key, fields)
        return record if _live(record.expires_at, now) else None

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
        reply = await self._run(
            "update_run", run_key, now,
            [incarnation, str(version), status, data, os.urandom(8).hex()],
        )
        if reply[0] == b"missing":
            raise CheckpointNotFound(f"no live run with key {run_key}")
        if reply[0] == b"conflict":
            raise ConflictError(
                f"run changed concurrently (now {_text(reply[1])}/{_text(reply[2])}, "
                f"expected {incarnation}/{version})"
            )
        return self._run_record(run_key, reply[1:])

    def _index_key(self, status: str | None) -> str:
        return self._global + ("all" if status is None else f"s:{status}")

    async def list_runs(
        self, *, status: str | None, limit: int, cursor: str | None, now: float
    ) -> tuple[list[RunRecord], str | None]:
        if cursor is not None and _MEMBER.fullmatch(cursor.encode()) is None:
            raise ValidationError(f"malformed run listing cursor {cursor!r}")
        index = self._index_key(status)
        upper = b"+" if cursor is None else b"(" + cursor.encode()
        found: list[RunRecord] = []
        while len(found) < limit:
            want = limit - len(found)
            members: list[bytes] = await self._driver(
                "list_runs", self._client.zrevrangebylex(index, upper, b"-", start=0, num=want + 1)
            )
            page = members[:want]
            records = await self._records_of(page, now)
            stale: list[bytes] = []
            for member, record in zip(page, records, strict=True):
                if record is None:
                    stale.append(member)
                elif status in (None, record.status) and _live(record.expires_at, now):
                    found.append(record)
            await self._forget(stale)
            if len(members) <= want:
                return found, None
            upper = b"(" + page[-1]
        return found, upper[1:].decode()

    async def _records_of(self, members: Sequence[bytes], now: float) -> list[RunRecord | None]:
        """The run records that index members name, in one pipeline; ``None`` for a member
        whose run incarnation is gone (stale). Expired records are returned as they are."""
        if not members:
            return []
        parsed = [_parse_member(member) for member in members]
        pipe = self._client.pipeline(transaction=False)
        for _, run_key, _ in parsed:
            keys, _ = self._run_keys(run_key)
            pipe.hmget(keys[0], "rid", "inc", "st", "ct", "ut", "ls", "exp", "v", "d", "m")
            pipe.zcard(keys[1])
        replies = await self._driver("list_runs", pipe.execute())
        records: list[RunRecord | None] = []
        for position, (member, (_, run_key, _)) in enumerate(zip(members, parsed, strict=True)):
            fields, count = replies[2 * position], replies[2 * position + 1]
            if fields[1] is None or fields[9] != member:
                records.append(None)
                continue
            records.append(self._run_record(run_key, [*fields[:9], count]))
        return records

    async def _forget(self, members: Sequence[bytes]) -> None:
        """Drops index entries whose run incarnation no longer exists."""
        if not members:
            return
        ops: list[Any] = []
        for member in members:
            ops += ["forget", member, "", ""]
        await self._apply_index_ops(ops)

    async def count_runs(self, *, status: str | None, now: float) -> int:
        index = self._index_key(status)
        pipe = self._client.pipeline(transaction=False)
        pipe.zcard(index)
        pipe.zrangebyscore(self._global + "due", "-inf", _float_arg(now))
        total, due = await self._driver("count_runs", pipe.execute())
        candidates = [member for member in due if not member.startswith(b"~")]
        if not candidates:
            return int(total)
        # Only runs due by now can be indexed yet expired: O(expired), not O(runs).
        pipe = self._client.pipeline(transaction=False)
        for member in candidates:
            pipe.zscore(index, member)
        indexed = await self._driver("count_runs", pipe.execute())
        members = [member for member, score in zip(candidates, indexed, strict=True)
                   if score is not None]
        records = await self._records_of(members, now)
        gone = sum(1 for record in records if record is None or not _live(record.expires_at, now))
        return int(total) - gone

    # -- items -----------------------------------------------------------------------------

    async def put_items(
        self, run_key: str, items: Sequence[Item], *, create_only: bool = False, now: float
    ) -> None:
        args: list[Any] = ["1" if create_only else "0", run_key]
        for item in items:
            if not isinstance(item, Item):
                raise ValidationError(f"put_items takes Item values, got {type(item).__name__}")
            if not isinstance(item.key, str) or not isinstance(item.value, bytes):
                raise ValidationError("an item needs a str key and a bytes value")
            self._check_size(f"item {item.key[:80]!r}", len(item.value))
            args += [
                item.key,
                item.value,
                "" if item.owner is None else str(item.owner),
                _expiry_arg(item.expires_at),
            ]
        if not items:
            return
        reply = await self._run("put_items", run_key, now, args)
        if reply[0] == b"conflict":
            raise ConflictError(f"item {_text(reply[1])!r} already exists")

    async def get_items(
        self, run_key: str, keys: Sequence[str], *, now: float
    ) -> dict[str, bytes]:
        if not keys:
            return {}
        reply = await self._run("get_items", run_key, now, list(keys))
        found: dict[str, bytes] = {}
        for key, value, expires in zip(keys, reply[0::2], reply[1::2], strict=True):
            if value is not None and _live(float(expires) if expires else None, now):
                found[key] = bytes(value)
        return found

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
        # Redis orders members by bytes; UTF-8 byte order is code point order.
        low_key, after = prefix.encode(), None if start_after is None else start_after.encode()
        successor = _lex_successor(low_key) if prefix else None
        low = b"[" + low_key if prefix else b"-"
        high = b"+" if successor is None else b"(" + successor
        if after is not None and reverse:
            if successor is None or after < successor:
                high = b"(" + after
        elif after is not None and after >= low_key:
            low = b"(" + after
        reply = await self._run(
            "scan_items", run_key, now, [low, high, str(limit), "1" if reverse else "0"]
        )
        return [(_text(reply[index]), bytes(reply[index + 1] or b""))
                for index in range(0, len(reply), 2)]

    async def delete_items(self, run_key: str, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        reply = await self._run("delete_items", run_key, None, list(keys))
        return int(reply[0])

    # -- maintenance -----------------------------------------------------------------------

    async def purge_expired(self, *, now: float, limit: int) -> tuple[int, bool]:
        due_key = self._global + "due"
        members: list[bytes] = await self._driver(
            "purge_expired",
            self._client.zrangebyscore(due_key, "-inf", _float_arg(now), start=0,
                                       num=max(limit, 1)),
        )
        removed, budget = 0, limit
        for member in members:
            if budget <= 0:
                break
            run_key = _run_key_of(member)
            if run_key is None:
                _log.warning("dropping a malformed entry %r from the due index %s",
                             member, due_key)
                await self._forget([member])
                continue
            checkpoints, work = await self._run(
                "purge_run", run_key, now, [str(budget), run_key, member]
            )
            removed += int(checkpoints)
            budget -= max(int(work), 1)
        left = await self._driver(
            "purge_expired", self._client.zcount(due_key, "-inf", _float_arg(now))
        )
        return removed, int(left) == 0

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()


def _live(expires_at: float | None, now: float) -> bool:
    return expires_at is None or now < expires_at


def _parse_member(member: bytes) -> tuple[str, str, str]:
    match = _MEMBER.fullmatch(member)
    if match is None:
        raise StoreError(f"malformed entry {member!r} in the run index")
    return match[1].decode(), match[2].decode(), match[3].decode()


def _run_key_of(member: bytes) -> str | None:
    if member.startswith(b"~"):
        run_key = member[1:].decode("ascii", "replace")
        return run_key if _RUN_KEY.fullmatch(run_key) else None
    match = _MEMBER.fullmatch(member)
    return None if match is None else match[2].decode()


def _int_option(query: dict[str, str], name: str) -> int | None:
    raw = query.pop(name, None)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigurationError(f"{name} must be an integer, got {raw!r}") from exc


def _float_option(query: dict[str, str], name: str) -> float | None:
    raw = query.pop(name, None)
    if raw is None or raw.lower() == "none":
        return None
    try:
        return float(raw)
    except ValueError as exc:
        raise ConfigurationError(f"{name} must be a number of seconds, got {raw!r}") from exc


def _redacted(url: str) -> str:
    """The URL without its password, for error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class RedisCheckpointStore(RedisStore):
    """FastAgentic's shape: ``RedisCheckpointStore(client, prefix=..., ttl_seconds=...)``.

    ``ttl_seconds`` becomes the store's ``default_ttl_seconds``: checkpoints created without a
    TTL expire after it, as in FastAgentic. The client is never closed by the store.
    """

    def __init__(
        self,
        client: Any,
        prefix: str = "fastagentic:checkpoint:",
        ttl_seconds: int | None = None,
    ) -> None:
        super().__init__(client, prefix=prefix, default_ttl_seconds=ttl_seconds)
