"""Redis store: one server-side Lua script per operation, native expiry, Redis Cluster ready.

Layout (``<ns>`` is the prefix ending in one more ``:`` unless it ends in one already, so
prefixes ``p`` and ``p:`` are one store; ``<name>`` is ``<ns>`` without that ``:``; every key
of a run carries the hash tag ``{<run key>}``, so each script touches a single slot)::

    <ns>{<rk>}:run        hash   the run record
    <ns>{<rk>}:seq        zset   the checkpoint log (sequence -> sequence)
    <ns>{<rk>}:exp        zset   expiring checkpoints (sequence -> expires_at)
    <ns>{<rk>}:c:<seq>    hash   one checkpoint: id, created, expiry, header, payload, sequence
    <ns>{<rk>}:ik/iv/io/ie       items: keys (lex), values, owners, expiries
    <ns>{<rk>}:ir         hash   shared items: item key -> held checkpoints naming it
    <ns>{<rk>}:cr         hash   sequence -> that checkpoint's refs
    <ns>{<rk>}:due        hash   what the global due index holds for this run
    <ns>{<rk>}:op:<token> string a retried operation's remembered reply (5 minutes)
    <ns>{idx:<name>}:all / :s:<status> / :l:<label> / :lab / :due / :statuses / :damaged /
                       :fix / :ver    the global indexes (:fix and :ver on Redis Cluster only)

Costs in round trips: append (also with items), get, latest, read_with_items, a page of
headers (one more per call whose page held a corrupt checkpoint, skipped), get_run,
update_run, delete, delete_run and each items call are one script call
(``EVALSHA``; a server that lost its scripts answers ``NOSCRIPT`` and redis-py loads the script
and retries once). On Redis Cluster the global indexes live in another slot: a call that
creates or re-statuses a run first records its intent in the index slot, then runs, then
applies the index change (three calls); a call that deletes a run or schedules its first
expiry costs one more call; steady-state appends stay at one. Index changes carry the run
server's time, so one that lands late never undoes a newer one, and a failed index call never
fails the operation it follows (the intent repairs it).
``list_runs``, ``runs_with_label`` and ``count_runs`` read the global index and then the run
records in one pipeline (two round trips). ``purge_expired`` costs one call per run due plus two.

Shared items. ``append_with_items`` checks inside its script, before writing anything, that each
ref it does not write names an item the run holds and that is live at ``now``; otherwise it
raises ``SharedItemGone`` naming those keys and leaves the run as it was (a new run is not
created). The check adds no round trip.

Nested items (``nested_items = True``). ``read_with_items`` stays one script call: per distinct
ref ``K`` it adds one ``ZRANGEBYLEX`` of the item keys over ``[K + "/", K + "0")`` (byte order,
which is code point order) and reads their values in batches, O(log n + nested) per ref. The
script that removes ``K`` (pruning, ``delete``, purging, ``delete_run``, a new life of the run, a
read dropping a vanished log entry) removes the items nested under it in the same call, a page
of 256 keys at a time: a few commands per page, no extra round trip.

Expiry. Checkpoint keys get native millisecond expiry, anchored at the manager's ``now``
(``PEXPIRE`` of ``expires_at - now``) rather than at the server's clock, so a manager with an
injected or skewed clock keeps the lifetime it asked for. Run-level keys expire with the run
plus a grace (they index the data, so they must not vanish first); index entries of data Redis
expired are dropped by the next read that meets them and by ``purge_expired``, which walks a
global due index (O(expired)). Every decision about liveness uses the manager's ``now``, and a
run's expiry and latest sequence are derived from its log, never trusted from the run hash.

Runs on asyncio only (redis-py); one connection pool per event loop for clients it builds,
with socket timeouts (a server that silently drops packets fails a call instead of hanging it).

See ``docs/stores/redis.md`` for URL options, memory per checkpoint and the ACL the store needs.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
import re
import struct
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio.lowlevel
import msgspec
import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import (
    URL_QUERY_ARGUMENT_PARSERS,
    AbstractConnection,
    ConnectionPool,
    SSLConnection,
)
from redis.asyncio.retry import Retry
from redis.backoff import FullJitterBackoff

from fastcheckpoint._config import (
    MAX_TTL_SECONDS,
    RetryPolicy,
    check_default_ttl,
    check_setting_text,
)
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
    INT64,
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
    check_text,
    check_time,
    check_utf8,
    is_run_key,
    unheld_refs,
)
from fastcheckpoint.stores._loops import GivenClientLoop, PerLoop, holds_clients
from fastcheckpoint.stores._redis_lua import INDEX, INTENT, SCRIPTS, without_flags

__all__ = ["RedisCheckpointStore", "RedisStore", "redis_retry"]

_log = logging.getLogger(__name__)

DEFAULT_PREFIX = "fastcheckpoint"
DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
"""Header plus payload of one checkpoint (or one item value): Redis keeps it all in memory,
and a single value this large already blocks the server for tens of milliseconds."""

DEFAULT_SOCKET_TIMEOUT = 10.0
"""Seconds a store built from a URL waits for a reply before redis-py treats the connection as
broken (and retries): longer than Redis's 5-second busy-script threshold, so a slow server is
not abandoned, yet a server that silently drops packets fails the call instead of hanging it."""
DEFAULT_SOCKET_CONNECT_TIMEOUT = 5.0
"""Seconds a store built from a URL waits for a connection (TCP and, for rediss://, TLS)."""

# Run-level keys (record, log, items) outlive the run's expiry by this much, so that writers
# whose clocks disagree by less than this never see them vanish before the data they index.
# Liveness never depends on it: every read compares expires_at with the manager's now.
_GRACE_MS = 60_000
# Redis Cluster: an index intent older than this (by the manager's clock) belongs to a client
# that died between a run script and its index call; the cleanup loop then re-derives the
# run's index entries from the run record.
_INTENT_GRACE_S = _GRACE_MS / 1000

# What a driver call may raise: redis-py's errors, its cluster errors (not RedisErrors), and
# asyncio's RuntimeError when a passed client's connections belong to an event loop that is gone.
_DRIVER_ERRORS = (redis_errors.RedisError, redis_errors.RedisClusterException, RuntimeError)

# A run the cleanup loop cannot purge (a run-level key of another type) is due again this
# much later: retried, without every pass meeting it.
_DAMAGED_RETRY_S = 3600

# Run scripts of the cleanup loop (see RedisStore._complete_index).
_MAINTENANCE = frozenset({"purge_run", "reindex"})

# The fixed keys of a run, in the order the scripts take them (KEYS[1..10]).
_RUN_KEYS = ("run", "seq", "exp", "due", "ik", "iv", "io", "ie", "ir", "cr")
_MEMBER = re.compile(rb"([0-9a-f]{16})([a-z2-7]{1,64})\.([a-z2-7]{1,64})")
_INTENT = re.compile(rb"([a-z2-7]{1,64})\.[0-9a-f]{16}")
_URL_SCHEMES = {"redis", "rediss", "redis+cluster", "rediss+cluster"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_STORE_OPTIONS = frozenset({"prefix", "cluster", "max_payload_bytes", "default_ttl_seconds"})
# Query options redis-py's from_url hands to the connection as text, unparsed; the typed ones
# are the keys of its URL_QUERY_ARGUMENT_PARSERS.
_TEXT_QUERY_OPTIONS = frozenset({
    "client_name", "username", "password", "lib_name", "lib_version", "ssl_keyfile",
    "ssl_certfile", "ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_data", "ssl_ca_path",
    "ssl_ciphers", "ssl_password",
})


def _parameters(*functions: Callable[..., Any]) -> frozenset[str]:
    names: set[str] = set()
    for function in functions:
        names |= {name for name, parameter in inspect.signature(function).parameters.items()
                  if parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD)}
    return frozenset(names - {"self"})


# What redis-py accepts: its connection classes' keyword arguments (which a URL query or
# keyword options reach), and for keyword options also the client's and the pool's.
_CONNECTION_PARAMETERS = _parameters(AbstractConnection.__init__, SSLConnection.__init__)
_QUERY_OPTIONS = frozenset(URL_QUERY_ARGUMENT_PARSERS) | (
    _TEXT_QUERY_OPTIONS & _CONNECTION_PARAMETERS)
_KEYWORD_OPTIONS = _CONNECTION_PARAMETERS | _parameters(
    aioredis.Redis.__init__, RedisCluster.__init__, ConnectionPool.__init__)


def redis_retry(policy: RetryPolicy) -> Retry:
    """redis-py's own retry machinery configured from the one retry policy.

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


def _sequence(name: str, value: object, *, optional: bool = False) -> int | None:
    return None if value is None and optional else check_int(name, value)


def _expiry_arg(value: float | None) -> str:
    return "" if value is None else _float_arg(value)


def _check_ahead(expires_at: float | None, now: float) -> None:
    """Refuse, before a script runs, an expiry more than :data:`MAX_TTL_SECONDS` ahead: the
    run's keys live in milliseconds until then, and the scripts write numbers exactly only
    below 10^17 (beyond, a ``PEXPIRE`` fails halfway, or deletes the keys at once)."""
    if expires_at is not None and expires_at - now > MAX_TTL_SECONDS:
        raise ValidationError(
            f"expires_at is {expires_at - now:.3g} seconds ahead; the Redis store keeps an "
            f"expiry at most {MAX_TTL_SECONDS:.0f} seconds (about 317,000 years) ahead")


def _ttl_ms(expires_at: float, now: float) -> int:
    """The native lifetime of a run's keys (checked: :func:`_check_ahead`)."""
    _check_ahead(expires_at, now)
    # Never 0 or below: PEXPIRE would delete at once, before the log entry is written.
    return max(1, math.ceil((expires_at - now) * 1000))


def _cancellations() -> int:
    """Cancellations requested of the running asyncio task and not yet handled (0 where
    Python does not count them: before 3.11)."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no asyncio loop running
        return 0
    cancelling = getattr(task, "cancelling", None)
    return 0 if cancelling is None else int(cancelling())


def _token() -> str:
    """A write token: how a script recognises a redis-py retry of the call that carried it."""
    return os.urandom(8).hex()


_LIST_ENCODER = msgspec.json.Encoder()
_LIST_DECODER = msgspec.json.Decoder(tuple[str, ...])


def _json_list(values: Sequence[str]) -> bytes:
    """Labels or refs as the scripts keep them ('' for none): a JSON list of strings."""
    return _LIST_ENCODER.encode(tuple(values)) if values else b""


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def _shown(value: Any) -> str:
    """A stored value for a message or a key name: never fails, whatever an editor left."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


_CREDENTIAL_REFUSALS = ("invalid username-password pair", "wrongpass", "noauth",
                        "authentication required", "already authenticated")


def _refused_credentials(exc: BaseException) -> bool:
    """Whether a cluster's failed discovery was the nodes refusing the credentials (its error
    carries only the last node's answer as text, possibly chained)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, redis_errors.AuthenticationError):
            return True
        if any(words in str(seen).lower() for words in _CREDENTIAL_REFUSALS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _lex_successor(prefix: bytes) -> bytes | None:
    """The smallest byte string above every string that starts with ``prefix``."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


class _Stale:
    """What :meth:`RedisStore._records_of` gives for an index entry whose run is gone."""


_STALE = _Stale()


class RedisStore(ExpiryCleanup):
    """Checkpoints in Redis 7+ (or Redis Cluster, or any server that speaks it, e.g. Valkey).

    Build it with :meth:`from_url` (``redis://host:6379/0?prefix=fc``, ``rediss://`` for TLS,
    ``redis+cluster://`` or ``?cluster=true`` for a cluster) or hand it an existing
    ``redis.asyncio.Redis`` / ``RedisCluster`` created with ``decode_responses=False``; a client
    you pass is never closed by the store.

    Runs on asyncio only: under trio the first call raises :class:`ConfigurationError`. A store
    built by :meth:`from_url` opens one connection pool per event loop, so it works from
    several ``asyncio.run()`` calls; a client you pass belongs to the event loop the store
    first uses it in, and a call from another loop raises :class:`ConfigurationError` before
    anything is sent.

    ``retry``, when given, replaces the client's retry with :func:`redis_retry` of it.
    ``max_payload_bytes`` bounds header plus payload of one checkpoint and each item value.
    ``default_ttl_seconds`` is FastAgentic's store-level TTL: a manager whose config sets no
    ``default_ttl_seconds`` applies it to checkpoints created without ``ttl_seconds``
    (:class:`SupportsDefaultTTL`). ``owns_client=True`` hands the client to the store, which
    then closes it in :meth:`aclose`. ``script_flags=False`` leaves out the ``#!lua`` flags
    line of the scripts, for servers that cannot parse it (fakeredis); Redis 7 should keep it.
    """

    nested_items = True
    sequence_guard = True

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
        _check_client(client)
        _check_prefix(prefix)
        if isinstance(max_payload_bytes, bool) or not isinstance(max_payload_bytes, int) or (
            max_payload_bytes < 1
        ):
            raise ConfigurationError(
                f"max_payload_bytes must be a positive int, got {max_payload_bytes!r}")
        check_default_ttl(default_ttl_seconds)
        if retry is not None:
            client.set_retry(redis_retry(retry))
        self._seed = client
        # The event loop the client above belongs to: the first one that used the store.
        self._seed_loop = GivenClientLoop(
            "RedisStore", "redis-py", "Build the store with RedisStore.from_url(...) or "
            "open_store(...) (one connection pool per event loop), or give each event loop its "
            "own store")
        self._factory: Callable[[], Any] | None = None
        self._owns_client = owns_client
        self._clients: PerLoop[Any] = PerLoop(
            self._build_client, self._close_client, store="RedisStore",
            driver="redis-py (redis.asyncio)")
        self._cluster = isinstance(client, RedisCluster) if cluster is None else cluster
        self._prefix = prefix
        self._ns = prefix if not prefix or prefix.endswith(":") else prefix + ":"
        # Named after the namespace, not the prefix as given: "p" and "p:" are one namespace,
        # so they must be one store (its run keys and its indexes), never half of one.
        self._global = f"{self._ns}{{idx:{self._ns.removesuffix(':')}}}:"
        self.max_payload_bytes = max_payload_bytes
        self.default_ttl_seconds = default_ttl_seconds
        shape = (lambda text: text) if script_flags else without_flags
        self._scripts = {
            name: client.register_script(shape(text)) for name, text in SCRIPTS.items()
        }
        self._index = client.register_script(shape(INDEX))
        self._intent = client.register_script(shape(INTENT))

    @classmethod
    def from_url(
        cls, url: str, *, retry: RetryPolicy | None = None, **options: Any
    ) -> RedisStore:
        """``redis://[user:password@]host:6379/0?prefix=fc``; also ``rediss://`` (TLS),
        ``redis+cluster://`` / ``rediss+cluster://`` or ``?cluster=true`` (Redis Cluster).

        Query options of the store: ``prefix``, ``cluster``, ``max_payload_bytes``,
        ``default_ttl_seconds``; the query options redis-py's ``from_url`` understands
        (``socket_timeout``, ``ssl_cert_reqs``...) go to it, as do keyword ``options``. Any
        other option is a :class:`ConfigurationError` naming it. ``socket_timeout`` defaults
        to :data:`DEFAULT_SOCKET_TIMEOUT` and ``socket_connect_timeout`` to
        :data:`DEFAULT_SOCKET_CONNECT_TIMEOUT` (whatever redis-py's own defaults are).
        """
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in _URL_SCHEMES:
            raise ConfigurationError(
                f"a Redis store URL starts with redis://, rediss://, redis+cluster:// or "
                f"rediss+cluster://, got {url!r}"
            )
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        check_options(f"the {scheme}:// store (URL query)", query, _STORE_OPTIONS | _QUERY_OPTIONS)
        check_options(f"the {scheme}:// store (keyword options)", options,
                      _STORE_OPTIONS | _KEYWORD_OPTIONS)
        if parts.path.strip("/") and not parts.path.strip("/").isdigit():
            raise ConfigurationError(
                f"the path of a Redis URL is the database number (redis://host:6379/0), "
                f"got {parts.path!r} in {redacted(url)}"
            )
        store_options = _store_options(scheme, query, options)
        driver_url = urlunsplit(
            (scheme.removesuffix("+cluster"), parts.netloc, parts.path, urlencode(query), "")
        )
        policy = retry if retry is not None else RetryPolicy()
        options.setdefault("retry", redis_retry(policy))
        for name, seconds in (("socket_timeout", DEFAULT_SOCKET_TIMEOUT),
                              ("socket_connect_timeout", DEFAULT_SOCKET_CONNECT_TIMEOUT)):
            if name not in query:
                options.setdefault(name, seconds)
        options["decode_responses"] = False
        driver = RedisCluster if store_options["cluster"] else aioredis.Redis

        def build() -> Any:
            return driver.from_url(driver_url, **options)

        try:
            client = build()
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(
                f"cannot build a Redis client from {redacted(url)}: {exc}") from exc
        store = cls(client, owns_client=True, **store_options)
        store._factory = build
        return store

    # -- clients per event loop --------------------------------------------------------------

    @property
    def _client(self) -> Any:
        """The running loop's client once built, else the one the store was made with."""
        return self._clients.current() or self._seed

    async def _build_client(self) -> Any:
        """The client for the running loop. A store built from a URL gives every loop a new
        client (the one ``from_url`` made is never connected, so no loop's connections
        outlive it); a passed client serves the first loop that uses the store, others are
        refused."""
        if self._factory is not None:
            client = self._factory()
        else:
            self._seed_loop.check()
            client = self._seed
        if isinstance(client, RedisCluster):
            # redis-py (8.1) races when concurrent first commands discover the slots, tearing
            # down connections other tasks use: discover once, before anyone sends.
            try:
                await client.initialize()
            except _DRIVER_ERRORS as exc:
                self._raise(exc, "cluster discovery")
        return client

    async def _close_client(self, client: Any) -> None:
        if self._owns_client:
            await client.aclose()

    # -- plumbing --------------------------------------------------------------------------

    def _base(self, run_key: str) -> str:
        """The key base of a run whose key ``_run_keys`` checked (for replies and messages:
        one check per call)."""
        return f"{self._ns}{{{run_key}}}:"

    def _run_keys(self, run_key: str) -> tuple[list[str], str]:
        base = self._base(check_run_key(run_key))
        return [base + name for name in _RUN_KEYS], base

    async def _run(
        self,
        name: str,
        run_key: str,
        now: float | None,
        args: Sequence[Any],
        *,
        checkpoint: int | None = None,
        intent: bool = False,
    ) -> list[Any]:
        """Call script ``name`` on the run's slot, apply any index operations it returned.

        ``intent``: the call may add the run to the indexes or move it between them. On Redis
        Cluster that change is applied by a second call, so the intent is recorded first (in
        the index slot): if this process dies in between, ``purge_expired`` finds the intent
        and re-derives the run's index entries from its record.
        """
        keys, base = self._run_keys(run_key)
        if checkpoint is not None:
            keys.append(f"{base}c:{checkpoint}")
        client = await self._clients.get()
        marker = None
        if intent and self._cluster and now is not None:
            marker = f"{run_key}.{_token()}"
            await self._call(
                client, self._intent, [self._global + "all"],
                [self._global, "intend", marker, _float_arg(now + _INTENT_GRACE_S), ""],
                what=f"{name} (index intent)")
        inline = "" if self._cluster else self._global
        argv = [base, "" if now is None else _float_arg(now), _GRACE_MS, inline, *args]
        result, ops = await self._call(client, self._scripts[name], keys, argv, what=name)
        ops = list(ops)
        if ops and not self._cluster:  # the script's index update failed (see _redis_lua)
            _log.warning("%s of run key %s is done, but its index update failed (%s): a key "
                         "under the prefix %r holds data of another type; give the store a "
                         "prefix of its own", name, run_key, _text(ops[1]), self._prefix)
            return list(result)
        if marker is not None:
            ops += ["done", marker, "", ""]
        if ops:
            await self._complete_index(client, ops, name, run_key)
        return list(result)

    async def _complete_index(
        self, client: Any, ops: Sequence[Any], name: str, run_key: str
    ) -> None:
        """Redis Cluster: apply the index changes of a run script that has already run.

        Its change is made, so a failure here must not report the operation as failed: a
        caller retrying a create would write its checkpoint twice. The run keeps its intent,
        so the cleanup loop re-derives its index entries; a run that left the indexes stays
        listed until a listing finds it gone. The cleanup loop's own calls do fail, so that
        it backs off; its next pass states the run's index entries again.
        """
        if name in _MAINTENANCE:
            await self._apply_index_ops(client, ops)
            return
        try:
            await self._apply_index_ops(client, ops)
        except StoreError as exc:
            _log.warning("%s of run key %s is done, but its index update failed (%s); the "
                         "cleanup loop repairs the index", name, run_key, exc)

    async def _apply_index_ops(self, client: Any, ops: Sequence[Any]) -> None:
        """Redis Cluster only: the run's slot changed; bring the global index along."""
        await self._call(
            client, self._index, [self._global + "all"], [self._global, *ops],
            what="index update")

    async def _call(self, client: Any, script: Any, keys: Sequence[str], args: Sequence[Any],
                    *, what: str) -> Any:
        return await self._driver(what, script(keys=keys, args=args, client=client), client)

    async def _driver(self, what: str, awaitable: Any, client: Any) -> Any:
        """``awaitable``, a call of the driver on ``client``: its errors made ours, and a
        cancellation of the caller that it dropped raised once it returned.

        redis-py sends each command through ``asyncio.wait_for`` (when ``socket_timeout`` is
        set, as it is here), which before Python 3.12 returns the command's reply and drops
        the cancellation that came as the send ended: the caller's ``asyncio.timeout`` or
        task group would then wait for a cancellation that never comes. The command has
        run; its caller is cancelled after it, as one cancelled after a store call is."""
        pending = _cancellations()
        try:
            result = await awaitable
        except _DRIVER_ERRORS as exc:
            self._raise(exc, what)
        if _cancellations() > pending:
            # anyio's own first (a cancel scope recognises only the cancellation it sends).
            await anyio.lowlevel.checkpoint_if_cancelled()
            raise asyncio.CancelledError
        return result

    def _describe(self) -> str:
        try:
            kwargs = self._seed.get_connection_kwargs()
        except Exception:  # pragma: no cover - a foreign client without connection kwargs
            return "the Redis server"
        host = kwargs.get("host") or kwargs.get("path")
        port = kwargs.get("port")
        if host is None:  # a cluster client: its connection settings name no node
            nodes = getattr(getattr(self._seed, "nodes_manager", None), "startup_nodes", {})
            return f"Redis Cluster at {', '.join(nodes) or '?'}"
        return f"Redis at {host}:{port}" if port else f"Redis at {host}"

    def _raise(self, exc: Exception, what: str) -> NoReturn:
        """Translate a driver error into ours, saying what to fix; the driver's is chained."""
        where = self._describe()
        message = str(exc)
        if isinstance(exc, redis_errors.RedisClusterException):
            self._raise_cluster(exc, where, what)
        if isinstance(exc, RuntimeError) and "loop" in message:
            raise ConfigurationError(
                f"the redis client failed during {what} ({message}): its connections belong "
                "to an event loop that is gone, as when a client you passed to RedisStore was "
                "used in another event loop first. The call may have reached the server. Give "
                "the store a client no other event loop used, or build it with "
                "RedisStore.from_url(...) or open_store(...) (one connection pool per event loop)"
            ) from exc
        if isinstance(exc, redis_errors.AuthenticationError):
            raise ConfigurationError(
                f"{where} refused the credentials ({message}); put the right user and password "
                "in the URL (redis://user:password@host:6379/0)"
            ) from exc
        if isinstance(exc, redis_errors.NoPermissionError) or message.startswith("NOPERM") or (
            "can't run this command" in message  # a script's call the ACL denies
        ):
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
        if isinstance(exc, redis_errors.OutOfMemoryError) or "maxmemory" in message:
            raise StoreError(
                f"{where} is out of memory (maxmemory reached) and refused {what}; nothing was "
                "written. Reads and deletes keep working: free memory by deleting runs or "
                "checkpoints you no longer need (delete_run, delete, prune) or by running "
                "cleanup_expired, lower max_checkpoints_per_run or the TTLs, or raise "
                "maxmemory"
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

    def _raise_cluster(
        self, exc: redis_errors.RedisClusterException, where: str, what: str
    ) -> NoReturn:
        message = str(exc)
        if "Cluster mode is not enabled" in message:
            raise ConfigurationError(
                f"{where} is not a Redis Cluster (cluster support is disabled there); use a "
                "redis:// or rediss:// URL without +cluster or cluster=true"
            ) from exc
        if "cannot be connected" in message and _refused_credentials(exc):
            raise ConfigurationError(
                f"{where} refused the credentials ({message}); put the right user and password "
                "in the URL (redis+cluster://user:password@host:6379/0)"
            ) from exc
        if "cannot be connected" in message:
            raise StoreUnavailableError(
                f"{where} is unavailable during {what} ({message}); check that the cluster's "
                "nodes are running and reachable at the URL's host and port"
            ) from exc
        raise StoreError(f"{where} (Redis Cluster) failed during {what}: {message}") from exc

    def _check_size(self, what: str, size: int) -> None:
        if size > self.max_payload_bytes:
            raise ValidationError(
                f"{what} is {size} bytes; this Redis store accepts at most "
                f"{self.max_payload_bytes} (max_payload_bytes). Raise the limit or keep large "
                "state elsewhere (e.g. the S3 store)"
            )

    def _damaged(self, run_key: str, problem: Any) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"the run record {_text(problem)}; the run's checkpoints are still readable, and "
            "CheckpointManager.repair(run_id) (fastcheckpoint doctor --repair) rebuilds the "
            "record from them", key=self._base(run_key) + "run")

    def _warn_damaged(self, run_key: str, problem: Any) -> None:
        if problem:
            _log.warning("run record %s %s; reporting its checkpoints with status 'active' "
                         "until it is repaired", self._base(run_key) + "run", _text(problem))

    def _checkpoint(self, run_key: str, fields: Sequence[Any]) -> tuple[StoredCheckpoint, str]:
        """``fields`` = status, sequence, id, created, expires, header, payload, stored
        sequence, problem of the run record, refs (the scripts' checkpoint_reply())."""
        self._warn_damaged(run_key, fields[8])
        base = self._base(run_key)
        key = f"{base}c:{_shown(fields[1])}"
        _check_checkpoint_hash(fields[2], key)
        _check_stored_sequence(fields[1], fields[7], key)
        try:
            record = StoredCheckpoint(
                sequence=int(fields[1]),
                checkpoint_id=_text(fields[2]),
                created_at=float(fields[3]),
                expires_at=float(fields[4]) if fields[4] else None,
                header=bytes(fields[5] or b""),
                payload=bytes(fields[6] or b""),
                key=key,
                refs=_LIST_DECODER.decode(fields[9]) if fields[9] else (),
            )
        except (TypeError, ValueError, UnicodeDecodeError, msgspec.DecodeError) as exc:
            raise CorruptCheckpointError(f"unreadable checkpoint fields: {exc}", key=key) from exc
        return record, _text(fields[0])

    def _header(self, base: str, fields: Sequence[Any]) -> CheckpointHeader:
        """``fields`` = sequence, id, created, expires, header, stored sequence."""
        key = f"{base}c:{_shown(fields[0])}"
        _check_checkpoint_hash(fields[1], key)
        _check_stored_sequence(fields[0], fields[5], key)
        try:
            return CheckpointHeader(
                sequence=int(fields[0]),
                checkpoint_id=_text(fields[1]),
                created_at=float(fields[2]),
                expires_at=float(fields[3]) if fields[3] else None,
                header=bytes(fields[4] or b""),
            )
        except (TypeError, ValueError, UnicodeDecodeError) as exc:
            raise CorruptCheckpointError(f"unreadable checkpoint fields: {exc}", key=key) from exc

    def _run_record(self, run_key: str, fields: Sequence[Any]) -> RunRecord:
        """``fields`` = rid inc st ct ut latest exp v d count labels (the scripts'
        run_fields())."""
        key = self._base(run_key) + "run"
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
                labels=_LIST_DECODER.decode(fields[10]) if fields[10] else (),
            )
        except (TypeError, ValueError, UnicodeDecodeError, msgspec.DecodeError) as exc:
            raise CorruptCheckpointError(f"unreadable run record: {exc}", key=key) from exc

    # -- checkpoint log --------------------------------------------------------------------

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
        return await self.append_with_items(
            run_key, record, run=run, keep_latest=keep_latest, now=now, items=())

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
        check_run_key(run_key)
        check_time("now", now)
        keep_latest = check_keep_latest(keep_latest)
        check_append(run_key, record, run, items)
        for item in items:
            self._check_item(item)
        self._check_size("checkpoint header plus payload", len(record.header) + len(record.payload))
        expires_at = record.expires_at
        member = f"{_sortable(run.created_at)}{run_key}.{run.incarnation}"
        distinct = list(dict.fromkeys(record.refs))
        item_args: list[Any] = []
        for item in items:
            item_args += [item.key, item.value, "" if item.owner is None else "1"]
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
                _token(),
                run.run_id,
                run.incarnation,
                run.status,
                _float_arg(run.created_at),
                str(run.version),
                run.data,
                member,
                # Labels matter only to the append that creates the run: always sequence 0.
                _json_list(run.labels) if record.sequence == 0 else b"",
                _json_list(record.refs),
                str(len(distinct)),
                *distinct,
                *item_args,
            ],
            checkpoint=record.sequence,
            intent=record.sequence == 0,
        )
        if reply[0] == b"damaged":
            raise self._damaged(run_key, reply[1])
        if reply[0] == b"corrupt":
            raise _foreign_key(reply[1:])
        if reply[0] == b"conflict":
            latest = int(reply[1]) if reply[1] else None
            incarnation = _text(reply[2]) if reply[2] else None
            raise SequenceConflict(
                f"sequence {record.sequence} is not the next of run key {run_key}",
                latest_sequence=latest,
                incarnation=incarnation,
            )
        if reply[0] == b"gone":
            raise unheld_refs(run_key, record.sequence, [_text(key) for key in reply[1:]])
        return _text(reply[1])

    @holds_clients
    async def get(
        self, run_key: str, sequence: int, *, now: float
    ) -> tuple[StoredCheckpoint, str] | None:
        check_run_key(run_key)
        check_time("now", now)
        sequence = check_int("sequence", sequence)
        reply = await self._run("get", run_key, now, [str(sequence)], checkpoint=sequence)
        return self._checkpoint(run_key, reply[1:]) if reply[0] == 1 else None

    @holds_clients
    async def latest(self, run_key: str, *, now: float) -> tuple[StoredCheckpoint, str] | None:
        check_time("now", now)
        reply = await self._run("latest", run_key, now, [])
        if reply[0] == b"corrupt":
            raise _foreign_key(reply[1:])
        return self._checkpoint(run_key, reply[1:]) if reply[0] == 1 else None

    @holds_clients
    async def read_with_items(
        self, run_key: str, *, sequence: int | None, now: float
    ) -> tuple[StoredCheckpoint, str, dict[str, bytes]] | None:
        check_run_key(run_key)
        check_time("now", now)
        sequence = _sequence("sequence", sequence, optional=True)
        reply = await self._run(
            "read_with_items", run_key, now, ["" if sequence is None else str(sequence)],
            checkpoint=sequence)
        if reply[0] == b"corrupt":
            raise _foreign_key(reply[1:])
        if reply[0] == b"lost":
            raise self._values_lost(run_key, reply[1:])
        if reply[0] != 1:
            return None
        record, status = self._checkpoint(run_key, reply[1:11])
        items: dict[str, bytes] = {}
        for index in range(11, len(reply), 2):
            key = self._item_key(run_key, reply[index], "read_with_items")
            if key is not None:
                items[key] = bytes(reply[index + 1])
        return record, status, items

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
        check_flag("include_expired", include_expired)
        check_run_key(run_key)
        check_time("now", now)
        before = _sequence("before", before, optional=True)
        if check_limit("limit", limit) < 1:
            return [], (await self._status_of(run_key, now, include_expired))
        found: list[CheckpointHeader] = []
        status: str | None = None
        # A page short of `limit` ends the listing for the caller: a corrupt record skipped
        # here is made up for by reading on (one more call per page that had one).
        while len(found) < limit:
            want = limit - len(found)
            reply = await self._run(
                "headers", run_key, now,
                ["" if before is None else str(before), str(want),
                 "1" if include_expired else "0"],
            )
            if reply[0] == b"corrupt":
                raise _foreign_key(reply[1:])
            if reply[0] != 1:
                break
            if status is None:
                self._warn_damaged(run_key, reply[2])
                status = _text(reply[1])
            entries = [reply[index:index + 6] for index in range(3, len(reply), 6)]
            found += self._readable_headers(run_key, entries)
            before = _sequence_of(entries[-1][0]) if len(entries) == want else None
            if before is None:
                break
        return found, status

    def _readable_headers(
        self, run_key: str, entries: Sequence[Sequence[Any]]
    ) -> list[CheckpointHeader]:
        base = self._base(run_key)
        found: list[CheckpointHeader] = []
        for fields in entries:
            try:
                found.append(self._header(base, fields))
            except CorruptCheckpointError:
                # One bad record must not hide the others: reading it names the key.
                _log.warning("skipping a corrupt checkpoint in the listing of %s", base,
                             exc_info=True)
        return found

    async def _status_of(self, run_key: str, now: float, include_expired: bool) -> str | None:
        fields = await self._run("get_run", run_key, now, [])
        if fields[0] is None:
            if len(fields) > 11 and fields[11]:
                self._warn_damaged(run_key, fields[11])
                return "active"
            return None
        record = self._run_record(run_key, fields)
        if not include_expired and not _live(record.expires_at, now):
            return None
        return record.status

    @holds_clients
    async def delete(self, run_key: str, sequence: int, *, checkpoint_id: str) -> bool:
        check_run_key(run_key)
        sequence = check_int("sequence", sequence)
        checkpoint_id = cast(str, check_utf8("checkpoint_id", checkpoint_id))
        reply = await self._run(
            "delete", run_key, None, [str(sequence), checkpoint_id, _token()],
            checkpoint=sequence,
        )
        if reply[0] == b"damaged":
            raise self._damaged(run_key, reply[1])
        if reply[0] == b"corrupt":
            raise _foreign_key(reply[1:])
        return bool(reply[0])

    @holds_clients
    async def delete_run(self, run_key: str) -> int:
        reply = await self._run("delete_run", run_key, None, [_token()])
        return int(reply[0])

    # -- runs ------------------------------------------------------------------------------

    @holds_clients
    async def get_run(self, run_key: str, *, now: float) -> RunRecord | None:
        check_time("now", now)
        fields = await self._run("get_run", run_key, now, [])
        if fields[0] is None:
            if len(fields) > 11 and fields[11]:
                raise self._damaged(run_key, fields[11])
            return None
        record = self._run_record(run_key, fields)
        return record if _live(record.expires_at, now) else None

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
        check_run_key(run_key)
        incarnation = cast(str, check_utf8("incarnation", incarnation))
        version = check_int("version", version)
        check_text("status", status)
        check_bytes("data", data)
        check_time("now", now)
        guard = "" if check_guard_arg(latest_sequence) is None else str(latest_sequence)
        reply = await self._run(
            "update_run", run_key, now,
            [incarnation, str(version), status, data, _token(), guard], intent=True,
        )
        if reply[0] == b"damaged":
            raise self._damaged(run_key, reply[1])
        if reply[0] == b"missing":
            raise CheckpointNotFound(f"no live run with key {run_key}")
        if reply[0] == b"conflict":
            raise ConflictError(
                f"run changed concurrently (now {_text(reply[1])}/{_text(reply[2])}, "
                f"expected {incarnation}/{version})"
            )
        if reply[0] == b"newer":
            check_head(run_key, int(reply[1]), latest_sequence)
        return self._run_record(run_key, reply[1:])

    def _index_key(self, status: str | None) -> str:
        return self._global + ("all" if status is None else f"s:{status}")

    @holds_clients
    async def list_runs(
        self, *, status: str | None, limit: int, cursor: str | None, now: float
    ) -> tuple[list[RunRecord], str | None]:
        status = check_utf8("status", status, optional=True)
        return await self._page_runs(self._index_key(status), status, limit, cursor, now)

    @holds_clients
    async def runs_with_label(
        self, label: str, *, limit: int, cursor: str | None, now: float
    ) -> tuple[list[RunRecord], str | None]:
        check_labels((label,))
        return await self._page_runs(self._global + "l:" + label, None, limit, cursor, now)

    async def _page_runs(
        self, index: str, status: str | None, limit: int, cursor: str | None, now: float
    ) -> tuple[list[RunRecord], str | None]:
        """A page of live runs from the index sorted set ``index``, newest created first; with
        ``status``, only runs whose record has it (the index may lag behind on a cluster)."""
        limit = check_limit("limit", limit)
        check_time("now", now)
        if cursor is not None and (
            not isinstance(cursor, str) or not cursor.isascii()
            or _MEMBER.fullmatch(cursor.encode()) is None
        ):
            raise ValidationError(f"malformed run listing cursor {shown(cursor)}")
        client = await self._clients.get()
        upper = b"+" if cursor is None else b"(" + cursor.encode()
        found: list[RunRecord] = []
        while len(found) < limit:
            want = limit - len(found)
            members: list[bytes] = await self._driver(
                "list_runs", client.zrevrangebylex(index, upper, b"-", start=0, num=want + 1),
                client)
            page = members[:want]
            records = await self._records_of(client, page, now)
            stale: list[bytes] = []
            damaged: list[bytes] = []
            for member, record in zip(page, records, strict=True):
                if record is _STALE:
                    stale.append(member)
                elif record is None:
                    damaged.append(member)
                elif isinstance(record, RunRecord) and status in (None, record.status) and (
                    _live(record.expires_at, now)
                ):
                    found.append(record)
            await self._tidy(client, stale, damaged)
            if len(members) <= want:
                return found, None
            upper = b"(" + page[-1]
        return found, upper[1:].decode()

    async def _records_of(
        self, client: Any, members: Sequence[bytes], now: float
    ) -> list[RunRecord | _Stale | None]:
        """The run records that index members name, read in one pipeline by the get_run
        script: a record, ``_STALE`` for a member whose run incarnation is gone (or that is
        malformed), ``None`` for a run whose record is damaged (skipped, logged). Expired
        records are returned as they are."""
        parsed = [_parse_member(member) for member in members]
        wanted = [(index, run_key) for index, run_key in enumerate(parsed) if run_key]
        replies = await self._get_runs(client, [run_key for _, run_key in wanted], now)
        records: list[RunRecord | _Stale | None] = [_STALE] * len(members)
        for (index, run_key), fields in zip(wanted, replies, strict=True):
            records[index] = self._listed_record(run_key, members[index], fields)
        return records

    def _listed_record(
        self, run_key: str, member: bytes, fields: Sequence[Any]
    ) -> RunRecord | _Stale | None:
        result, _ = fields
        if result[0] is None:
            if len(result) > 11 and result[11]:
                _log.warning("skipping run %s in the run listing: its record %s", run_key,
                             _text(result[11]))
                return None
            return _STALE
        if result[12] != member:
            return _STALE
        try:
            return self._run_record(run_key, result)
        except CorruptCheckpointError:
            _log.warning("skipping run %s in the run listing", run_key, exc_info=True)
            return None

    async def _get_runs(self, client: Any, run_keys: Sequence[str], now: float) -> list[Any]:
        """The get_run script's reply for each run, in one pipeline (a second one, once, if
        the server answered NOSCRIPT after losing its scripts)."""
        if not run_keys:
            return []
        script = self._scripts["get_run"]
        if isinstance(client, RedisCluster):
            # redis-py refuses scripts in cluster pipelines: concurrent calls instead.
            return list(await asyncio.gather(*(
                self._call(client, script, *self._get_run_call(run_key, now), what="list_runs")
                for run_key in run_keys)))
        replies = await self._pipelined(client, script.sha, run_keys, now)
        if any(isinstance(reply, redis_errors.NoScriptError) for reply in replies):
            script.sha = await self._driver(
                "list_runs", client.script_load(script.script), client)
            replies = await self._pipelined(client, script.sha, run_keys, now)
        for reply in replies:
            if isinstance(reply, redis_errors.RedisError):
                self._raise(reply, "list_runs")
        return replies

    def _get_run_call(self, run_key: str, now: float) -> tuple[list[str], list[Any]]:
        keys, base = self._run_keys(run_key)
        return keys, [base, _float_arg(now), _GRACE_MS, ""]

    async def _pipelined(
        self, client: Any, sha: str, run_keys: Sequence[str], now: float
    ) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        for run_key in run_keys:
            keys, args = self._get_run_call(run_key, now)
            pipe.evalsha(sha, len(keys), *keys, *args)
        return list(await self._driver("list_runs", pipe.execute(raise_on_error=False), client))

    async def _tidy(
        self, client: Any, stale: Sequence[bytes], damaged: Sequence[bytes] = ()
    ) -> None:
        """Drops index entries whose run incarnation no longer exists, and records runs whose
        record is damaged, so that counts skip them until they are repaired or removed.

        A member names one incarnation, so one that is gone is gone for good: on Redis
        Cluster its forget leaves a tombstone, as delete_run's does (stamped with the index
        server's clock), so that a late index call of that incarnation cannot bring it back.
        Plain Redis has no late index calls: the run scripts update the indexes themselves.
        """
        ops: list[Any] = []
        for member in stale:
            _log.info("dropping the stale entry %r from the run index", member)
            ops += ["forget", member, "", "now" if self._cluster else ""]
        for member in damaged:
            ops += ["damaged", member, "", ""]
        if ops:
            await self._apply_index_ops(client, ops)

    @holds_clients
    async def count_runs(self, *, status: str | None, now: float) -> int:
        status = check_utf8("status", status, optional=True)
        check_time("now", now)
        client = await self._clients.get()
        index = self._index_key(status)
        damaged = self._global + "damaged"
        pipe = client.pipeline(transaction=False)
        pipe.zcard(index)
        pipe.zrangebyscore(self._global + "due", "-inf", _float_arg(now))
        pipe.zintercard(2, [index, damaged])
        total, due, known_damaged = await self._driver("count_runs", pipe.execute(), client)
        candidates = [member for member in due if not member.startswith((b"~", b"-"))]
        if not candidates:
            return int(total) - int(known_damaged)
        # Only runs due by now can be indexed yet expired: O(expired), not O(runs).
        pipe = client.pipeline(transaction=False)
        for member in candidates:
            pipe.zscore(index, member)
            pipe.zscore(damaged, member)
        scores = await self._driver("count_runs", pipe.execute(), client)
        members = [member for member, indexed, marked
                   in zip(candidates, scores[0::2], scores[1::2], strict=True)
                   if indexed is not None and marked is None]
        records = await self._records_of(client, members, now)
        gone = sum(1 for record in records
                   if not isinstance(record, RunRecord) or not _live(record.expires_at, now))
        return int(total) - int(known_damaged) - gone

    # -- items -----------------------------------------------------------------------------

    @holds_clients
    async def put_items(
        self, run_key: str, items: Sequence[Item], *, create_only: bool = False, now: float
    ) -> None:
        check_flag("create_only", create_only)
        check_run_key(run_key)
        check_time("now", now)
        check_items(items)
        # Remembered under its token: a retry of a create-only write is answered as the first
        # try was, and a first try of any write delivered late (after its retry and a newer
        # write of a key) writes nothing.
        args: list[Any] = ["1" if create_only else "0", _token()]
        for item in items:
            self._check_item(item)
            _check_ahead(item.expires_at, now)
            args += [
                item.key,
                item.value,
                "" if item.owner is None else str(item.owner),
                _expiry_arg(item.expires_at),
            ]
        if not items:
            check_run_key(run_key)  # what _run checks on every other path
            return
        reply = await self._run("put_items", run_key, now, args)
        if reply[0] == b"corrupt":
            raise _foreign_key(reply[1:])
        if reply[0] == b"conflict":
            raise ConflictError(f"item {_text(reply[1])!r} already exists")

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
        check_flag("if_absent", if_absent)
        check_run_key(run_key)
        check_time("now", now)
        check_items(items)
        if isinstance(owner, bool) or not isinstance(owner, int) or not 0 <= owner <= INT64:
            raise ValidationError(f"owner must be a checkpoint sequence, got {shown(owner)}")
        checkpoint_id = cast(str, check_utf8("checkpoint_id", checkpoint_id))
        args: list[Any] = [str(owner), checkpoint_id, "1" if if_absent else "0", _token()]
        for item in items:
            self._check_item(item)
            if item.owner != owner:
                raise ValidationError(
                    f"item {item.key[:40]!r} is owned by {item.owner}, not by checkpoint {owner}")
            args += [item.key, item.value]
        reply = await self._run("put_owned_items", run_key, now, args, checkpoint=owner)
        if reply[0] == b"corrupt":
            raise _foreign_key(reply[1:])
        return bool(reply[0])

    def _check_item(self, item: Item) -> None:
        """What this store takes of an item beyond ``check_items``: a value within its size
        limit."""
        self._check_size(f"item {item.key[:80]!r}", len(item.value))

    @holds_clients
    async def get_items(
        self, run_key: str, keys: Sequence[str], *, now: float
    ) -> dict[str, bytes]:
        check_run_key(run_key)
        check_time("now", now)
        keys = [cast(str, check_utf8("item key", key)) for key in check_keys(keys)]
        if not keys:
            return {}
        reply = await self._run("get_items", run_key, now, list(keys))
        found: dict[str, bytes] = {}
        lost: list[str] = []
        for key, value, expires, gone in zip(
                keys, reply[0::3], reply[1::3], reply[2::3], strict=True):
            if gone:
                lost.append(key)
            elif value is not None and _live(float(expires) if expires else None, now):
                found[key] = bytes(value)
        if lost:
            raise self._values_lost(run_key, lost)
        return found

    def _values_lost(self, run_key: str, keys: Sequence[Any]) -> CorruptCheckpointError:
        """Items the run lists whose values are gone: damaged, so a read that asks for them
        raises rather than answer without them (writers replace them, ``delete_items``
        removes them)."""
        named = ", ".join(repr(_shown(key)) for key in keys[:5])
        more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
        return CorruptCheckpointError(
            f"damaged item {named}{more} of run key {run_key}: its key is listed but its value "
            "is gone; write the item again (or delete_items it)",
            key=self._base(run_key) + "iv")

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
        check_flag("reverse", reverse)
        check_run_key(run_key)
        prefix = cast(str, check_utf8("prefix", prefix))
        start_after = check_utf8("start_after", start_after, optional=True)
        check_time("now", now)
        if check_limit("limit", limit) < 1:
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
        found: list[tuple[str, bytes]] = []
        for index in range(0, len(reply), 2):
            # The script flags a damaged entry with no value (and fills the page past it).
            key = self._item_key(run_key, reply[index], "scan_items")
            if key is None:
                continue
            if reply[index + 1] is None:
                _log.warning("scan_items skips the item %r of %s: its value is gone", key,
                             self._base(run_key) + "iv")
                continue
            found.append((key, bytes(reply[index + 1])))
        return found

    def _item_key(self, run_key: str, key: bytes, what: str) -> str | None:
        """An item key as text, or ``None`` (logged) for a key that is not UTF-8: no call
        could have written it, an editor did."""
        try:
            return key.decode("utf-8")
        except UnicodeDecodeError:
            _log.warning("%s skips the item key %r of %s: it is not UTF-8 text", what, key,
                         self._base(run_key) + "ik")
            return None

    @holds_clients
    async def delete_items(self, run_key: str, keys: Sequence[str]) -> int:
        check_run_key(run_key)
        keys = [cast(str, check_utf8("item key", key)) for key in check_keys(keys)]
        if not keys:
            return 0
        reply = await self._run("delete_items", run_key, None, [_token(), *keys])
        if reply[0] == b"corrupt":
            raise _foreign_key(reply[1:])
        return int(reply[0])

    # -- maintenance -----------------------------------------------------------------------

    @holds_clients
    async def purge_expired(self, *, now: float, limit: int) -> tuple[int, bool]:
        check_time("now", now)
        check_limit("limit", limit)
        client = await self._clients.get()
        due, intents = await self._due(client, now, max(limit, 1))
        removed, budget = 0, limit
        for member in due:
            if budget <= 0:
                break
            if member.startswith(b"-"):
                # Redis Cluster: a deleted run's tombstone whose time is up (see _redis_lua).
                await self._apply_index_ops(client, ["bury", member[1:], "", ""])
                budget -= 1
                continue
            run_key = _run_key_of(member)
            if run_key is None:
                _log.warning("dropping a malformed entry %r from the due index %s",
                             member, self._global + "due")
                await self._tidy(client, [member])
                continue
            reply = await self._run(
                "purge_run", run_key, now, [str(budget), member, _token(), _DAMAGED_RETRY_S]
            )
            if reply[0] == b"corrupt":
                # One damaged run must not stop expiry for every other run of the store.
                _log.warning("cleanup skipped run key %s, tried again in %d s: %s",
                             run_key, _DAMAGED_RETRY_S, _foreign_key(reply[1:]))
                budget -= 1
                continue
            checkpoints, work = reply
            removed += int(checkpoints)
            budget -= max(int(work), 1)
        for intent in intents[:max(budget, 0)]:
            await self._reindex(client, intent, now)
        return removed, await self._nothing_due(client, now)

    async def _due(self, client: Any, now: float, limit: int) -> tuple[list[bytes], list[bytes]]:
        """Runs due for purging and, on Redis Cluster, index intents older than their grace."""
        upto = _float_arg(now)
        pipe = client.pipeline(transaction=False)
        pipe.zrangebyscore(self._global + "due", "-inf", upto, start=0, num=limit)
        if self._cluster:
            pipe.zrangebyscore(self._global + "fix", "-inf", upto, start=0, num=limit)
        replies = await self._driver("purge_expired", pipe.execute(), client)
        return list(replies[0]), list(replies[1]) if self._cluster else []

    async def _reindex(self, client: Any, intent: bytes, now: float) -> None:
        """A client died between a run script and its index call: re-derive the run's index
        entries from its record."""
        match = _INTENT.fullmatch(intent)
        if match is None:
            _log.warning("dropping a malformed entry %r from the index intents", intent)
            await self._apply_index_ops(client, ["done", intent, "", ""])
            return
        _log.info("re-deriving the index entries of run key %s (a client stopped between "
                  "its run update and its index update)", match[1].decode())
        reply = await self._run("reindex", match[1].decode(), now, [intent])
        if reply[0] == b"corrupt":
            _log.warning("dropped the index intent %r: %s", intent, _foreign_key(reply[1:]))

    async def _nothing_due(self, client: Any, now: float) -> bool:
        upto = _float_arg(now)
        pipe = client.pipeline(transaction=False)
        pipe.zcount(self._global + "due", "-inf", upto)
        if self._cluster:
            pipe.zcount(self._global + "fix", "-inf", upto)
        counts = await self._driver("purge_expired", pipe.execute(), client)
        return sum(int(count) for count in counts) == 0

    # -- repair ----------------------------------------------------------------------------

    @holds_clients
    async def damaged_runs(
        self, *, run_key: str | None = None, now: float
    ) -> list[RunDamage]:
        if run_key is not None:
            check_run_key(run_key)
        check_time("now", now)
        run_keys = [run_key] if run_key is not None else await self._all_run_keys()
        found: list[RunDamage] = []
        for key in run_keys:
            damage = await self._inspect(key, now)
            if damage is not None:
                found.append(damage)
        return found

    async def _all_run_keys(self) -> list[str]:
        """Every run key with a record or a log under the prefix (SCAN: O(keys))."""
        client = await self._clients.get()
        # One pattern for both suffixes: ':run' and ':seq'.
        pattern = f"{_glob_escape(self._ns)}{{*}}:[rs][ue][nq]"
        found: set[str] = set()
        try:
            async for key in client.scan_iter(match=pattern, count=1000):
                match = re.fullmatch(rb".*\{([a-z2-7]{1,64})\}:(?:run|seq)", key)
                if match is not None:
                    found.add(match[1].decode())
        except _DRIVER_ERRORS as exc:
            self._raise(exc, "damaged_runs")
        return sorted(found)

    async def _inspect(self, run_key: str, now: float) -> RunDamage | None:
        """The run's damage, if any. A newest checkpoint that is corrupt, or one of another
        run swapped in, is named in the problem, and the newest readable one of the run's own
        is reported instead (``None`` when none is): one run's damage never fails the search
        for the others."""
        reply = await self._run("inspect", run_key, now, [])
        if not reply[0] and len(reply) > 11:
            # The record is fine, but the cleanup loop skips the run while a key holds another
            # type: reported here so that someone deletes it.
            foreign = _foreign_key(reply[11:])
            return RunDamage(run_key=run_key, key=foreign.key, problem=str(foreign),
                             checkpoints=0, newest=None)
        if not reply[0]:
            return None
        keys, base = self._run_keys(run_key)
        problem = f"the run record {_text(reply[0])}"
        newest = None
        if len(reply) > 11 and not reply[10]:
            problem += f"; nothing can be rebuilt from the run's log: {_foreign_key(reply[11:])}"
        elif int(reply[1]) > 0:
            problem += self._passed_over(run_key, base, reply)
            newest = self._readable_newest(base, reply)
        return RunDamage(run_key=run_key, key=keys[0], problem=problem,
                         checkpoints=int(reply[1]), newest=newest)

    def _passed_over(self, run_key: str, base: str, reply: Sequence[Any]) -> str:
        """Why the inspect script passed over the newest checkpoint in the log for the
        newest readable one of the run's own (``''`` when it did not)."""
        if reply[10] == reply[2]:
            return ""
        try:
            header = self._header(base, [reply[2], *reply[3:8]])
        except CorruptCheckpointError as exc:
            return f"; its newest checkpoint is corrupt too: {exc}"
        where = f"{base}c:{_shown(reply[2])}"
        if not header.checkpoint_id.startswith(f"ck-{run_key}-"):
            return (f"; its newest checkpoint {where} has an id of another run "
                    f"({header.checkpoint_id[:80]!r}: swapped in from it), passed over")
        return f"; its newest checkpoint {where} has fields a rebuild cannot read, passed over"

    def _readable_newest(self, base: str, reply: Sequence[Any]) -> CheckpointHeader | None:
        """The newest checkpoint of the run's own whose header the inspect script found
        readable, or ``None`` when none is."""
        if not reply[10]:
            return None
        fields = reply[2:8] if reply[10] == reply[2] else [reply[10], *reply[11:16]]
        try:
            return self._header(base, fields)
        except CorruptCheckpointError:  # the script's rule is the stricter; never expected
            _log.warning("no readable checkpoint to rebuild %s from", base, exc_info=True)
            return None

    @holds_clients
    async def rebuild_run(self, run_key: str, seed: RunRecord, *, now: float) -> RunRecord:
        check_run_key(run_key)
        check_time("now", now)
        if not isinstance(seed, RunRecord):
            raise ValidationError(f"seed must be a RunRecord, got {type(seed).__name__}")
        for _ in range(8):
            reply = await self._run("inspect", run_key, now, [])
            if len(reply) > 11 and not reply[10]:
                raise _foreign_key(reply[11:])
            if not reply[0]:
                raise ConflictError(f"the run record of run key {run_key} is not damaged")
            if int(reply[1]) == 0:
                raise CheckpointNotFound(
                    f"run key {run_key} holds no intact checkpoint to rebuild its record from")
            keys, _ = self._run_keys(run_key)
            incarnation, oldest = _text(reply[9]), reply[8]
            if not incarnation:
                # Not a failure of the store: like a run without checkpoints, nothing is left
                # to rebuild from, and a repair reports the run and goes on with the others.
                newest_id = bytes(reply[3]).decode("utf-8", "replace")
                raise CheckpointNotFound(
                    f"no checkpoint of run key {run_key} has an id of that run (the newest "
                    f"is {newest_id[:80]!r}) to rebuild its record from")
            if not oldest or not reply[10]:
                raise CorruptCheckpointError(
                    f"no intact checkpoint of run key {run_key} has a readable creation time "
                    "and header fields to rebuild its record from", key=keys[0])
            member = f"{_sortable(float(oldest))}{run_key}.{incarnation}"
            result = await self._run(
                "rebuild", run_key, now,
                [seed.run_id, seed.status, seed.data, incarnation, reply[2], oldest, member,
                 _json_list(check_labels(seed.labels))],
                intent=True,
            )
            if result[0] == b"ok":
                return self._run_record(run_key, result[1:])
            if result[0] == b"corrupt":
                raise _foreign_key(result[1:])
            if result[0] == b"fine":
                raise ConflictError(f"the run record of run key {run_key} is not damaged")
            if result[0] == b"empty":
                raise CheckpointNotFound(
                    f"run key {run_key} holds no intact checkpoint to rebuild its record from")
        raise ConflictError(f"run key {run_key} kept changing while its record was rebuilt")

    async def aclose(self) -> None:
        await self._clients.aclose()


def _check_client(client: Any) -> None:
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


def _check_prefix(prefix: Any) -> None:
    if isinstance(prefix, str):
        check_setting_text("Redis key prefix", prefix)
    if not isinstance(prefix, str) or "{" in prefix or "}" in prefix:
        raise ConfigurationError(
            f"Redis key prefix must be a string without '{{' or '}}' (they would break "
            f"the hash tags that keep a run's keys in one cluster slot), got {prefix!r}"
        )


def _check_checkpoint_hash(checkpoint_id: Any, key: str) -> None:
    """The scripts read a value of another type at a checkpoint's key as id ``''``."""
    if checkpoint_id == b"":
        raise CorruptCheckpointError(
            "the key holds a value of another type than a checkpoint (a hash); another "
            "application shares the prefix, or the key was edited", key=key)


def _check_stored_sequence(sequence: Any, stored: Any, key: str) -> None:
    """The sequence a checkpoint hash records must be the one its key names: a record copied
    to another slot is corrupt. Records written before the field existed have none."""
    if stored is not None and stored != sequence:
        raise CorruptCheckpointError(
            f"the record found here was written at sequence {_shown(stored)[:20]}, not at "
            f"{_shown(sequence)}", key=key)


def _foreign_key(reply: Sequence[Any]) -> CorruptCheckpointError:
    """A script's answer that a run-level key holds another type (key, type expected): it
    wrote nothing."""
    key = bytes(reply[0]).decode("utf-8", "replace")
    return CorruptCheckpointError(
        f"a key of the run holds a value of another type than the {_text(reply[1])} the store "
        "keeps there; nothing was written. Another application shares the prefix (give the "
        "store a prefix of its own), or the key was edited: delete_run removes the run",
        key=key)


def _sequence_of(member: Any) -> int | None:
    """A log entry's sequence, or ``None`` for one an editor made unreadable."""
    try:
        return int(member)
    except (TypeError, ValueError):
        return None


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _live(expires_at: float | None, now: float) -> bool:
    return expires_at is None or now < expires_at


def _parse_member(member: bytes) -> str | None:
    """The run key an index member names, or ``None`` (logged) when it is malformed."""
    match = _MEMBER.fullmatch(member)
    if match is None:
        _log.warning("skipping the malformed entry %r of the run index", member)
        return None
    return match[2].decode()


def _run_key_of(member: bytes) -> str | None:
    if member.startswith(b"~"):
        run_key = member[1:].decode("ascii", "replace")
        return run_key if is_run_key(run_key) else None
    match = _MEMBER.fullmatch(member)
    return None if match is None else match[2].decode()


def _store_options(scheme: str, query: dict[str, str], options: dict[str, Any]) -> dict[str, Any]:
    """The store's own options, taken out of the URL query and the keyword options (keywords
    win); what is left of both goes to redis-py."""
    cluster_flag = query.pop("cluster", "").lower()
    if cluster_flag not in _TRUE | _FALSE:
        raise ConfigurationError(f"cluster= must be true or false, got {cluster_flag!r}")
    found: dict[str, Any] = {
        "prefix": options.pop("prefix", query.pop("prefix", DEFAULT_PREFIX)),
        "cluster": bool(options.pop("cluster", scheme.endswith("+cluster")
                                    or cluster_flag in _TRUE)),
        "max_payload_bytes": options.pop(
            "max_payload_bytes", _int_option(query, "max_payload_bytes")),
        "default_ttl_seconds": options.pop(
            "default_ttl_seconds", _float_option(query, "default_ttl_seconds")),
    }
    return {name: value for name, value in found.items() if value is not None}


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
