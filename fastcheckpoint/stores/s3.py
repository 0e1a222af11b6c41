"""S3 store: no manifest; a create-only slot object per checkpoint is the commit.

Layout, request counts, costs and limits: ``docs/stores/s3.md``; keys: ``_s3_layout``.

Why two objects per checkpoint. S3 conditions a write on its own key only, and a listing
returns keys, never metadata. A sequence must be claimed at a key fixed by the sequence alone
(so two writers collide), while what a listing shows (expiry, step name, tags...) must be in
a key. So a checkpoint is a *slot* (``c/<inv seq>``, create-only, holds everything: the
commit, and the one object ``get`` reads) plus a *marker* (``c/<inv seq>/m<listing>``, empty,
written right after). A slot without its marker (a crash between the two PUTs) is still a
committed checkpoint: readers fetch its listing from the slot itself.

Run state. The run object holds what changes rarely (status, version, data, incarnation);
``latest_sequence``, ``checkpoint_count`` and ``expires_at`` are derived from the run's
listing, so an append never rewrites it. Runs are created by a compare-and-set on the run
object (create-only, or ``IfMatch`` over a dead run's), which also decides among writers
racing for a run's first checkpoint; the loser sees the new incarnation.

Costs independent of the run's length. Keys list newest first, right after the run object,
so readers LIST only the head of a run (``MaxKeys`` sized to what they need, continuing only
past expired checkpoints, tombstones and leftovers). Appends do not LIST at all in steady
state: each process keeps what it knows of a run's log (``_Log``: built from one listing,
then from its own writes), proposes from it, and lets the create-only slot PUT catch other
writers; a 412 is resolved by listing the head. Pruning deletes keys the process knows, in
one ``DeleteObjects``; below what it knows it lists once, and what it lists it deletes.

Exact removal. Deletes that must be counted (``delete``, purging) are conditional
(``IfMatch`` on the ETag listed), so concurrent workers never both count one checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qsl, urlsplit

import anyio
import msgspec

from fastcheckpoint._config import RetryPolicy
from fastcheckpoint.errors import (
    CheckpointNotFound,
    ConfigurationError,
    ConflictError,
    SequenceConflict,
    StoreError,
    ValidationError,
)
from fastcheckpoint.stores import _s3_layout as layout
from fastcheckpoint.stores._aws import AwsEndpoint, error_code, open_client, translate
from fastcheckpoint.stores._base import (
    EMPTY_RUN,
    CheckpointHeader,
    Item,
    RunRecord,
    StoredCheckpoint,
    check_keep_latest,
    is_live,
)
from fastcheckpoint.stores._s3_io import PAGE, Bucket, Listed, gather, pair
from fastcheckpoint.stores._s3_layout import ItemMeta, Listing, RunState, Slot

if TYPE_CHECKING:
    from aiobotocore.session import AioSession
    from types_aiobotocore_s3 import S3Client

__all__ = ["S3CheckpointStore", "S3Store", "lifecycle_rules"]

logger = logging.getLogger("fastcheckpoint.stores.s3")

CREATION_GRACE_SECONDS = 60.0
"""A run object without any checkpoint is a run being created for this long (its creator
writes the first slot right after); later it is a crash leftover that appends and purging
replace."""
_RUN_CACHE = 1024
"""Runs this process keeps knowledge of (run object, log, owned items), least recently used
first out; a forgotten run costs one LIST on its next append."""
_LOG_SPARE = 256
"""Checkpoints a log keeps beyond ``keep_latest`` (all of an unpruned run's, up to this): what
bounds its memory. Older ones are forgotten; only the cleanup loop then removes them on expiry."""
_URL_OPTIONS = frozenset({"region", "endpoint_url"})


def lifecycle_rules(prefix: str = "", *, backstop_days: int | None = None) -> list[dict[str, Any]]:
    """The lifecycle rules ``provision()`` sets for a store under ``prefix``.

    * ``fastcheckpoint-noncurrent``: the bucket is versioned, so a delete leaves a noncurrent
      version; remove it after a day, clear expired delete markers and stale uploads.
    * ``fastcheckpoint-backstop`` (with ``backstop_days``): delete any current object that
      many days after it was written, in case no cleanup loop ever runs. S3 counts whole days
      (rounded up to midnight UTC), so choose more than your longest TTL in days, plus one.
    """
    scope = {"Prefix": prefix}
    rules: list[dict[str, Any]] = [
        {
            "ID": "fastcheckpoint-noncurrent",
            "Status": "Enabled",
            "Filter": dict(scope),
            "NoncurrentVersionExpiration": {"NoncurrentDays": 1},
            "Expiration": {"ExpiredObjectDeleteMarker": True},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
        }
    ]
    if backstop_days is not None:
        if isinstance(backstop_days, bool) or not isinstance(backstop_days, int) or (
            backstop_days < 1
        ):
            raise ValidationError(f"backstop_days must be a positive int, got {backstop_days!r}")
        rules.append(
            {
                "ID": "fastcheckpoint-backstop",
                "Status": "Enabled",
                "Filter": dict(scope),
                "Expiration": {"Days": backstop_days},
            }
        )
    return rules


# -- the derived view of one run ----------------------------------------------------------------


@dataclass
class _SlotView:
    sequence: int
    slot_etag: str | None = None
    marker: str | None = None  # key of the marker, relative to the store prefix
    kind: str = ""  # "m", "l" (long header) or "t" (tombstone)
    listing: Listing | None = None
    extra: list[str] = field(default_factory=list)  # duplicate markers (crash leftovers)
    missing: bool = False  # a slot without its marker: ``marker`` is the key it should have


@dataclass
class _ItemMarker:
    key: str
    hex_key: str
    meta: ItemMeta


@dataclass
class _Listed:
    """One run's objects as a listing shows them."""

    run_etag: str | None = None
    slots: dict[int, _SlotView] = field(default_factory=dict)
    item_markers: list[_ItemMarker] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)  # unparseable keys: removed with the run


@dataclass
class _Run:
    state: RunState | None
    etag: str | None
    listed: _Listed
    held: list[_SlotView] = field(default_factory=list)  # ascending
    tombstones: list[_SlotView] = field(default_factory=list)
    orphans: list[_SlotView] = field(default_factory=list)  # other incarnations, bare markers

    def __post_init__(self) -> None:
        incarnation = None if self.state is None else self.state.incarnation
        for sequence in sorted(self.listed.slots):
            view = self.listed.slots[sequence]
            mine = view.listing is not None and view.listing.incarnation == incarnation
            if view.slot_etag is None or not mine:
                self.orphans.append(view)
            elif view.kind == "t":
                self.tombstones.append(view)
            else:
                self.held.append(view)

    @property
    def latest_sequence(self) -> int:
        tops = [view.sequence for view in (*self.held[-1:], *self.tombstones[-1:])]
        return max(tops, default=-1)

    @property
    def expires_at(self) -> float | None:
        if not self.held:
            return EMPTY_RUN
        expiries = [_listing(view).expires_at for view in self.held]
        if any(expiry is None for expiry in expiries):
            return None
        return max(expiry for expiry in expiries if expiry is not None)

    def live(self, now: float) -> bool:
        return self.state is not None and bool(self.held) and is_live(self.expires_at, now)

    def being_created(self, now: float) -> bool:
        """A run object whose creator has not written the first slot yet (within the grace)."""
        return (
            self.state is not None
            and not self.held
            and not self.tombstones
            and now - self.state.updated_at < CREATION_GRACE_SECONDS
        )

    def record(self) -> RunRecord:
        assert self.state is not None
        state = self.state
        head = max((*self.held[-1:], *self.tombstones[-1:]), key=lambda v: v.sequence,
                   default=None)
        updated_at = state.updated_at
        if head is not None:
            updated_at = max(updated_at, _listing(head).appended_at)
        return RunRecord(
            run_id=state.run_id,
            incarnation=state.incarnation,
            status=state.status,
            created_at=state.created_at,
            updated_at=updated_at,
            latest_sequence=self.latest_sequence,
            checkpoint_count=len(self.held),
            expires_at=self.expires_at,
            version=state.version,
            data=state.data,
        )

    def conflict(self, now: float) -> SequenceConflict:
        if self.live(now):
            assert self.state is not None
            return SequenceConflict(
                latest_sequence=self.latest_sequence, incarnation=self.state.incarnation
            )
        if self.being_created(now):
            assert self.state is not None
            return SequenceConflict(latest_sequence=0, incarnation=self.state.incarnation)
        return SequenceConflict(latest_sequence=None, incarnation=None)


@dataclass
class _Entry:
    """A checkpoint this process knows: its expiry and every key it occupies."""

    expires_at: float | None
    keys: list[str]


@dataclass
class _Log:
    """What this process knows of one incarnation's log, so that an append needs no LIST.

    Every checkpoint of the run with ``sequence >= known_from`` is in ``held`` (ascending);
    older ones are unknown unless ``known_from == 0``. Built from a listing, then kept up to
    date by this process's own appends and deletes. It goes stale when another process
    writes the run: the create-only slot PUT catches that (see "Stale knowledge" in
    ``docs/stores/s3.md``).
    """

    latest: int  # held or tombstone, -1 for none
    held: dict[int, _Entry]
    garbage: dict[int, list[str]]  # tombstones and leftovers: removed once a newer slot exists
    known_from: int
    expiring: list[tuple[float, int]] = field(default_factory=list)  # heap of (expiry, sequence)

    def add(self, sequence: int, entry: _Entry) -> None:
        self.held[sequence] = entry
        if entry.expires_at is not None:
            heapq.heappush(self.expiring, (entry.expires_at, sequence))

    def live(self, now: float) -> bool:
        """Whether a checkpoint it knows is live; newest first, so usually the first one."""
        return any(is_live(entry.expires_at, now) for entry in reversed(self.held.values()))

    def trim(self, limit: int) -> None:
        """Forget the oldest checkpoints beyond ``limit``: memory stays bounded."""
        while len(self.held) > limit:
            del self.held[next(iter(self.held))]
            self.known_from = next(iter(self.held))
        if len(self.expiring) > 2 * len(self.held) + 16:
            # Entries of forgotten or removed checkpoints: drop them (amortised O(1)).
            self.expiring = [entry for entry in self.expiring if entry[1] in self.held]
            heapq.heapify(self.expiring)

    def merge_older(self, older: dict[int, _Entry]) -> None:
        """Checkpoints found below ``known_from``: now everything is known."""
        merged = dict(sorted({**older, **self.held}.items()))
        self.held = {}
        self.expiring = []
        for sequence, entry in merged.items():
            self.add(sequence, entry)
        self.known_from = 0


@dataclass
class _Cached:
    """One run as this process knows it: the run object as last read (valid while listings
    show the same ETag), the log, and owned items it wrote or listed (owner -> hex -> marker)."""

    etag: str | None = None
    state: RunState | None = None
    log: _Log | None = None
    owned: dict[int, dict[str, str]] = field(default_factory=dict)


def _accepts(cached: _Cached, sequence: int, incarnation: str, now: float) -> bool:
    """Whether this process's knowledge admits the append without a LIST: it follows the
    latest sequence known, of the incarnation known, and a known checkpoint is live (so the
    run is). The create-only PUT of the slot still decides against other writers."""
    log, state = cached.log, cached.state
    return (
        log is not None
        and state is not None
        and sequence == log.latest + 1
        and incarnation == state.incarnation
        and log.live(now)
    )


def _page_for(checkpoints: int) -> int:
    """``MaxKeys`` for a listing that should show ``checkpoints`` checkpoints: the run
    object, two keys (slot and marker) each, and room for a tombstone."""
    return max(1, min(PAGE, 2 * checkpoints + 4))


def _maybe_live(listed: _Listed, now: float) -> int:
    """Checkpoints that may be live: listed live, or slots whose marker is not (yet) there."""
    return sum(
        1
        for view in listed.slots.values()
        if view.slot_etag is not None
        and (
            view.listing is None or (view.kind != "t" and is_live(view.listing.expires_at, now))
        )
    )


def _chosen(
    current: _Run, before: int | None, limit: int, now: float, include_expired: bool
) -> list[_SlotView]:
    chosen: list[_SlotView] = []
    for view in reversed(current.held):
        if len(chosen) >= limit:
            break
        if before is not None and view.sequence >= before:
            continue
        if include_expired or is_live(_listing(view).expires_at, now):
            chosen.append(view)
    return chosen


def _marker_of(
    prefix: str, run_key: str, sequence: int, kind: str, listing: Listing
) -> tuple[str, bytes]:
    """The marker of a checkpoint, key and body: a function of the slot alone, so whoever
    finds a slot without its marker writes exactly the marker its writer would have."""
    if kind == "t":
        short = msgspec.structs.replace(listing, header=None)
        return layout.marker_key(run_key, sequence, "t", short), b""
    key = layout.marker_key(run_key, sequence, "m", listing)
    if len((prefix + key).encode("utf-8")) <= layout.MAX_KEY_BYTES:
        return key, b""
    short = msgspec.structs.replace(listing, header=None)
    return layout.marker_key(run_key, sequence, "l", short), listing.header or b""


def _owned_of(run_key: str, cached: _Cached, owners: Iterable[int]) -> list[str]:
    """Keys of the items this process knows to be owned by ``owners``."""
    keys: list[str] = []
    for owner in owners:
        for hex_key, marker in cached.owned.get(owner, {}).items():
            keys += [marker, layout.item_object(run_key, hex_key)]
    return keys


def _listing(view: _SlotView) -> Listing:
    assert view.listing is not None
    return view.listing


def _parse_run_listing(run_key: str, entries: Iterable[Listed]) -> _Listed:
    listed = _Listed()
    base = layout.run_prefix(run_key)
    for entry in entries:
        rest = entry.key[len(base) :]
        if rest == "a":
            listed.run_etag = entry.etag
        elif rest.startswith("c/"):
            _parse_slot_key(listed, entry, rest[2:])
        elif rest.startswith("o/"):
            hex_key, _, encoded = rest[2:].partition("/")
            meta = layout.parse_item_meta(encoded)
            if meta is None:
                listed.stray.append(entry.key)
            else:
                listed.item_markers.append(_ItemMarker(entry.key, hex_key, meta))
        else:
            listed.stray.append(entry.key)
    return listed


def _parse_slot_key(listed: _Listed, entry: Listed, rest: str) -> None:
    inverted, _, marker = rest.partition("/")
    sequence = layout.parse_sequence(inverted)
    if sequence is None:
        listed.stray.append(entry.key)
        return
    view = listed.slots.setdefault(sequence, _SlotView(sequence))
    if not marker:
        view.slot_etag = entry.etag
        return
    listing = layout.parse_listing(marker[1:])
    if marker[0] not in "mlt" or listing is None:
        listed.stray.append(entry.key)
    elif view.marker is not None:
        view.extra.append(entry.key)
    else:
        view.marker, view.kind, view.listing = entry.key, marker[0], listing


# -- the store ------------------------------------------------------------------------------------


class S3Store:
    """Checkpoints in an S3 bucket (or an S3-compatible service) under a key prefix.

    Build it from a URL (``s3://bucket/prefix?region=...&endpoint_url=...``), from an
    aiobotocore ``session`` (the store then creates, owns and closes its client), or around
    an existing ``client``, which it never closes and whose retry configuration it leaves
    alone. ``retry`` configures the client the store creates.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: S3Client | None = None,
        session: AioSession | None = None,
        region: str | None = None,
        endpoint_url: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        if not isinstance(bucket, str) or not bucket or "/" in bucket:
            raise ConfigurationError(f"S3 bucket must be a bucket name, got {bucket!r}")
        self._bucket_name = bucket
        self._prefix = _normalized_prefix(prefix)
        self._given = client
        self._session = session
        self._endpoint = AwsEndpoint.from_query(
            {"region": region or "", "endpoint_url": endpoint_url or ""}
        )
        self._retry = retry if retry is not None else RetryPolicy()
        self._stack = contextlib.AsyncExitStack()
        self._io: Bucket | None = None if client is None else Bucket(client, bucket, self._prefix)
        self._opening = anyio.Lock()
        self._cache: OrderedDict[str, _Cached] = OrderedDict()

    @classmethod
    def from_url(
        cls, url: str, *, retry: RetryPolicy | None = None, **options: Any
    ) -> S3Store:
        """``s3://bucket/prefix?region=...&endpoint_url=...``; options: ``client``, ``session``."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "s3" or not parts.netloc:
            raise ConfigurationError(
                f"expected s3://bucket/prefix?region=...&endpoint_url=..., got {url!r}"
            )
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = sorted(set(query) - _URL_OPTIONS)
        if unknown:
            raise ConfigurationError(
                f"unknown s3:// URL options {unknown} in {url!r}; known: {sorted(_URL_OPTIONS)}"
            )
        extra = sorted(set(options) - {"client", "session"})
        if extra:
            raise ConfigurationError(f"S3Store.from_url takes client= or session=, got {extra}")
        return cls(
            parts.netloc,
            parts.path.lstrip("/"),
            client=options.get("client"),
            session=options.get("session"),
            region=query.get("region"),
            endpoint_url=query.get("endpoint_url"),
            retry=retry,
        )

    @property
    def bucket(self) -> str:
        return self._bucket_name

    @property
    def prefix(self) -> str:
        return self._prefix

    async def client(self) -> S3Client:
        """The client in use (created on first use unless one was given)."""
        return (await self._objects()).client

    async def _objects(self) -> Bucket:
        if self._io is not None:
            return self._io
        async with self._opening:
            if self._io is None:
                client = await open_client(
                    self._stack, "s3", self._endpoint, self._retry, session=self._session
                )
                self._io = Bucket(client, self._bucket_name, self._prefix)
        return self._io

    async def aclose(self) -> None:
        if self._given is None:
            self._io = None
        await self._stack.aclose()

    # -- provisioning -----------------------------------------------------------------------

    async def provision(self, *, backstop_days: int | None = None) -> None:
        """Create the bucket if needed, with versioning, AES256 default encryption and the
        lifecycle rules of :func:`lifecycle_rules`. Idempotent; rules of others are kept."""
        io = await self._objects()
        client, bucket = io.client, self._bucket_name
        rules = lifecycle_rules(self._prefix, backstop_days=backstop_days)
        try:
            await self._create_bucket(client)
            await client.put_bucket_versioning(
                Bucket=bucket, VersioningConfiguration={"Status": "Enabled"}
            )
            await client.put_bucket_encryption(
                Bucket=bucket,
                ServerSideEncryptionConfiguration={
                    "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
                },
            )
            ours = {rule["ID"] for rule in rules} | {"fastcheckpoint-backstop"}
            kept = [rule for rule in await self._lifecycle(client) if rule.get("ID") not in ours]
            await client.put_bucket_lifecycle_configuration(
                Bucket=bucket, LifecycleConfiguration={"Rules": cast(Any, [*kept, *rules])}
            )
        except Exception as exc:
            if isinstance(exc, StoreError | ConfigurationError):
                raise
            raise translate(exc, f"provisioning s3://{bucket}") from exc

    async def _create_bucket(self, client: S3Client) -> None:
        params: dict[str, Any] = {"Bucket": self._bucket_name}
        region = client.meta.region_name
        if region and region != "us-east-1":
            params["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            await client.create_bucket(**params)
        except Exception as exc:
            if error_code(exc) not in ("BucketAlreadyOwnedByYou",):
                raise

    async def _lifecycle(self, client: S3Client) -> list[dict[str, Any]]:
        try:
            response = await client.get_bucket_lifecycle_configuration(Bucket=self._bucket_name)
        except Exception as exc:
            if error_code(exc) == "NoSuchLifecycleConfiguration":
                return []
            raise
        return [dict(rule) for rule in response.get("Rules", [])]

    # -- what this process knows of runs -------------------------------------------------------

    def _cached(self, run_key: str) -> _Cached:
        cached = self._cache.get(run_key)
        if cached is None:
            cached = self._cache[run_key] = _Cached()
            while len(self._cache) > _RUN_CACHE:
                self._cache.popitem(last=False)
        self._cache.move_to_end(run_key)
        return cached

    def _forget(self, run_key: str) -> None:
        self._cache.pop(run_key, None)

    def _remember(self, run_key: str, etag: str, state: RunState) -> None:
        cached = self._cached(run_key)
        if cached.state is not None and cached.state.incarnation != state.incarnation:
            # The run was deleted or expired and started over: what we knew of its log is void.
            cached.log = None
            cached.owned = {}
        cached.etag, cached.state = etag, state

    def _adopt(self, run_key: str, current: _Run, known_from: int) -> None:
        """Take what a listing showed as this process's knowledge of the run's log."""
        if current.state is None or current.etag is None:
            self._forget(run_key)
            return
        # The pair (ETag, state) is consistent even if older than the cache's: re-set it, as
        # another task may have dropped the run since the listing was read.
        self._remember(run_key, current.etag, current.state)
        cached = self._cached(run_key)
        if cached.log is not None and cached.log.latest > current.latest_sequence:
            return  # an append of ours finished after that listing was taken: keep the newer
        log = _Log(current.latest_sequence, {}, {}, known_from)
        for view in current.held:
            log.add(view.sequence, _Entry(_listing(view).expires_at, _keys_of(run_key, view)))
        for view in (*current.tombstones, *current.orphans):
            log.garbage[view.sequence] = _keys_of(run_key, view)
        cached.log = log

    # -- reading a run ------------------------------------------------------------------------

    async def _state(
        self, io: Bucket, run_key: str, etag: str | None
    ) -> tuple[RunState, str] | None:
        """The run object, from the cache when the listing shows the ETag we last read."""
        if etag is None:
            self._forget(run_key)
            return None
        cached = self._cache.get(run_key)
        if cached is not None and cached.etag == etag and cached.state is not None:
            self._cache.move_to_end(run_key)
            return cached.state, etag
        return await self._read_state(io, run_key)

    async def _read_state(self, io: Bucket, run_key: str) -> tuple[RunState, str] | None:
        key = layout.run_object(run_key)
        found = await io.get(key)
        if found is None:
            self._forget(run_key)
            return None
        state = layout.decode_run(found[0], io.where(key))
        self._remember(run_key, found[1], state)
        return state, found[1]

    async def _load(self, io: Bucket, run_key: str) -> _Run:
        """The whole run: one LIST per 1,000 objects (+ the run object unless cached)."""
        listed = _parse_run_listing(run_key, await io.list(layout.run_prefix(run_key)))
        return await self._resolve(io, run_key, listed)

    async def _scan(
        self,
        io: Bucket,
        run_key: str,
        *,
        first: int,
        enough: Callable[[_Listed], bool],
        before: int | None = None,
    ) -> tuple[_Listed, int]:
        """The newest part of a run's listing (of the slots below ``before`` if given): pages
        until ``enough`` holds or the slots end. Returns it with ``known_from``: every slot at
        or above that sequence (and below ``before``) is in it; 0 when it reached the oldest.
        Without ``before`` the run object comes first, so its ETag is in the first page."""
        slots = layout.slots_prefix(run_key)
        run_object = layout.run_object(run_key)
        if before is None:
            prefix, start_after = layout.run_prefix(run_key), None
        else:
            prefix, start_after = slots, layout.older_than(run_key, before)

        def cut(entries: list[Listed], ended: bool) -> tuple[_Listed, int]:
            known_from = 0
            if not ended and entries[-1].key == run_object:
                known_from = layout.SEQUENCE_SPAN
            elif not ended and entries[-1].key.startswith(slots):
                # The last slot's keys may go on in the next page: count it as unseen.
                inverted = entries[-1].key[len(slots) :].partition("/")[0]
                last = layout.parse_sequence(inverted)
                if last is not None:
                    keep = len(entries)
                    while keep and entries[keep - 1].key.startswith(slots + inverted):
                        keep -= 1
                    entries, known_from = entries[:keep], last + 1
            return _parse_run_listing(run_key, entries), known_from

        def until(entries: list[Listed]) -> bool:
            last = entries[-1].key
            if last != run_object and not last.startswith(slots):
                return True  # past the slots: only item markers follow
            return enough(cut(entries, False)[0])

        entries, ended = await io.scan(prefix, start_after=start_after, first=first, until=until)
        if not entries:
            return _Listed(), 0
        return cut(entries, ended)

    async def _head(self, io: Bucket, run_key: str, *, live_wanted: int, now: float) -> tuple[
        _Run, int
    ]:
        """The run's newest checkpoints, down to ``live_wanted`` live ones (or all of them),
        with the run object: ``(run, known_from)`` as :meth:`_scan` describes."""
        listed, known_from = await self._scan(
            io,
            run_key,
            first=_page_for(live_wanted),
            enough=lambda listed: _maybe_live(listed, now) >= live_wanted,
        )
        current = await self._resolve(io, run_key, listed)
        if known_from and not current.live(now):
            # What looked live belongs to another incarnation: only the whole run can tell.
            return await self._load(io, run_key), 0
        return current, known_from

    async def _resolve(self, io: Bucket, run_key: str, listed: _Listed) -> _Run:
        bare = [view for view in listed.slots.values()
                if view.slot_etag is not None and view.listing is None]
        state, _ = await pair(
            functools.partial(self._state, io, run_key, listed.run_etag),
            functools.partial(gather, [functools.partial(self._read_bare, io, run_key, view)
                                       for view in bare]),
        )
        return _Run(None if state is None else state[0], None if state is None else state[1],
                    listed)

    async def _read_bare(self, io: Bucket, run_key: str, view: _SlotView) -> None:
        """A slot without a marker (its writer stopped between the two PUTs, or is between
        them right now): read its listing from the slot itself."""
        key = layout.slot_key(run_key, view.sequence)
        found = await io.get(key)
        if found is None:
            view.slot_etag = None
            return
        slot = layout.decode_slot(found[0], io.where(key))
        view.kind = "t" if slot.tombstone else "m"
        view.listing = Listing(slot.incarnation, slot.checkpoint_id, slot.created_at,
                               slot.expires_at, slot.appended_at, slot.header)
        view.marker = _marker_of(io.prefix, run_key, view.sequence, view.kind, view.listing)[0]
        view.missing = True

    def _located(self, io: Bucket, run_key: str, slot: Slot) -> StoredCheckpoint:
        return StoredCheckpoint(
            sequence=slot.sequence,
            checkpoint_id=slot.checkpoint_id,
            created_at=slot.created_at,
            expires_at=slot.expires_at,
            header=slot.header,
            payload=slot.payload,
            key=io.where(layout.slot_key(run_key, slot.sequence)),
        )

    # -- checkpoint log -------------------------------------------------------------------------

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
        io = await self._objects()
        cached = self._cache.get(run_key)
        if cached is None or not _accepts(cached, record.sequence, run.incarnation, now):
            cached = await self._prepare(io, run_key, record, run, keep_latest, now)
        state, log = cached.state, cached.log
        assert state is not None
        assert log is not None
        slot = Slot(state.incarnation, record.sequence, record.checkpoint_id, record.created_at,
                    record.expires_at, now, record.header, record.payload)
        key = layout.slot_key(run_key, slot.sequence)
        # The commit, and the only check against other writers: create-only at the sequence.
        if await io.put(key, layout.encode(slot), if_none_match=True) is None:
            await self._taken(io, run_key, slot, keep_latest, now)
        entry, _ = await pair(
            functools.partial(self._write_marker, io, run_key, slot),
            functools.partial(self._prune, io, run_key, cached, log, slot, keep_latest, now),
        )
        log.latest = max(log.latest, slot.sequence)
        log.add(slot.sequence, entry)
        log.trim(_LOG_SPARE + (keep_latest or 0))
        return state.status

    async def _prepare(
        self,
        io: Bucket,
        run_key: str,
        record: StoredCheckpoint,
        seed: RunRecord,
        keep_latest: int | None,
        now: float,
    ) -> _Cached:
        """What this process knows does not admit the append: list the run's head, then
        accept, refuse (``SequenceConflict``) or start the run over."""
        current, known_from = await self._head(io, run_key, live_wanted=keep_latest or 1, now=now)
        self._adopt(run_key, current, known_from)
        sequence = record.sequence
        if current.live(now):
            assert current.state is not None
            if sequence != current.latest_sequence + 1 or (
                seed.incarnation != current.state.incarnation
            ):
                raise current.conflict(now)
            return self._cached(run_key)
        if current.being_created(now) or sequence != 0:
            raise current.conflict(now)
        # A dead or absent run: _head listed all of it, leftovers included.
        state, etag = await self._start_over(io, run_key, current, seed, now)
        self._remember(run_key, etag, state)
        cached = self._cached(run_key)
        cached.log = _Log(-1, {}, {}, 0)
        cached.owned = {}
        return cached

    async def _start_over(
        self, io: Bucket, run_key: str, current: _Run, seed: RunRecord, now: float
    ) -> tuple[RunState, str]:
        """Take the run key for a new run: compare-and-set the run object, then clear the
        leftovers of the previous run (checkpoints, owned items, index entries)."""
        state = RunState(seed.run_id, seed.incarnation, layout.check_status(seed.status),
                         seed.created_at, now, seed.version, seed.data)
        key = layout.run_object(run_key)
        etag = await io.put(key, layout.encode(state), if_none_match=current.etag is None,
                            if_match=current.etag)
        if etag is None:
            raise (await self._load(io, run_key)).conflict(now)
        self._remember(run_key, etag, state)
        leftovers = [key for view in current.listed.slots.values()
                     for key in _keys_of(run_key, view)]
        leftovers += current.listed.stray
        owned = [marker for marker in current.listed.item_markers if marker.meta.owner is not None]
        leftovers += [marker.key for marker in owned]
        leftovers += [layout.item_object(run_key, marker.hex_key) for marker in owned]
        if current.state is not None:
            leftovers += layout.index_keys(run_key, current.state)
        if leftovers:
            await io.delete(leftovers)
        await gather([functools.partial(io.put, key, b"")
                      for key in layout.index_keys(run_key, state)])
        return state, etag

    async def _taken(
        self, io: Bucket, run_key: str, slot: Slot, keep_latest: int | None, now: float
    ) -> None:
        """The slot's key is taken. A leftover of another incarnation (a writer of a run that
        ended) is replaced with ``IfMatch``; otherwise another writer got the sequence: raise
        the conflict, after writing any marker a writer left out (safe: a marker is a
        function of its slot) and learning the run's head for the retry."""
        current, known_from = await self._head(io, run_key, live_wanted=keep_latest or 1, now=now)
        await self._heal(io, run_key, current)
        occupant = current.listed.slots.get(slot.sequence)
        if (
            (current.live(now) or current.being_created(now))
            and current.state is not None
            and current.state.incarnation == slot.incarnation
            and current.latest_sequence + 1 == slot.sequence
            and occupant is not None
            and occupant.slot_etag is not None
            and occupant.listing is not None
            and occupant.listing.incarnation != slot.incarnation
        ):
            key = layout.slot_key(run_key, slot.sequence)
            if await io.put(key, layout.encode(slot), if_match=occupant.slot_etag) is not None:
                stale = [stale for stale in _keys_of(run_key, occupant) if stale != key]
                if stale:
                    await io.delete(stale)
                return
            current, known_from = await self._head(
                io, run_key, live_wanted=keep_latest or 1, now=now
            )
        self._adopt(run_key, current, known_from)
        raise current.conflict(now)

    async def _heal(self, io: Bucket, run_key: str, current: _Run) -> None:
        missing = [view for view in (*current.held, *current.tombstones) if view.missing]
        await gather([
            functools.partial(self._put_marker, io, run_key, view.sequence, view.kind,
                              _listing(view))
            for view in missing
        ])
        for view in missing:
            view.missing = False

    async def _put_marker(
        self, io: Bucket, run_key: str, sequence: int, kind: str, listing: Listing
    ) -> str:
        key, body = _marker_of(io.prefix, run_key, sequence, kind, listing)
        try:
            await io.put(key, body)
        except StoreError:
            # The slot is the commit and is readable; listings fall back to reading it.
            logger.warning("checkpoint %s committed without its listing marker %s",
                           listing.checkpoint_id, io.where(key), exc_info=True)
        return key

    async def _write_marker(self, io: Bucket, run_key: str, slot: Slot) -> _Entry:
        listing = Listing(slot.incarnation, slot.checkpoint_id, slot.created_at, slot.expires_at,
                          slot.appended_at, slot.header)
        marker = await self._put_marker(io, run_key, slot.sequence, "m", listing)
        return _Entry(slot.expires_at, [layout.slot_key(run_key, slot.sequence), marker])

    async def _prune(
        self,
        io: Bucket,
        run_key: str,
        cached: _Cached,
        log: _Log,
        slot: Slot,
        keep_latest: int | None,
        now: float,
    ) -> None:
        """Remove what the append makes surplus, from what this process knows: expired
        checkpoints (a heap by expiry), live ones beyond ``keep_latest``, tombstones and
        leftovers below the new slot. Costs one ``DeleteObjects`` when there is anything."""
        newest = slot.sequence
        doomed: set[int] = set()
        popped: list[tuple[float, int]] = []
        while log.expiring and log.expiring[0][0] <= now:
            popped.append(heapq.heappop(log.expiring))
            if popped[-1][1] in log.held and popped[-1][1] < newest:
                doomed.add(popped[-1][1])
        need = 0
        if keep_latest is not None:
            need = keep_latest - 1 if is_live(slot.expires_at, now) else keep_latest
            for sequence in reversed(log.held):
                if sequence >= newest or sequence in doomed:
                    continue
                if not is_live(log.held[sequence].expires_at, now):
                    doomed.add(sequence)
                elif need > 0:
                    need -= 1
                else:
                    doomed.add(sequence)
        garbage = [sequence for sequence in log.garbage if sequence < newest]
        keys = [key for sequence in doomed for key in log.held[sequence].keys]
        keys += [key for sequence in garbage for key in log.garbage[sequence]]
        keys += _owned_of(run_key, cached, doomed)
        additions: dict[int, _Entry] = {}
        if keep_latest is not None and log.known_from > 0:
            older, additions = await self._older(io, run_key, cached, log, need, now)
            keys += older
        if keys:
            try:
                await io.delete(keys)
            except StoreError:
                # Committed already: the next append prunes what this one could not.
                logger.warning("pruning run %s failed", run_key, exc_info=True)
                for entry in popped:
                    heapq.heappush(log.expiring, entry)
                return
        for sequence in doomed:
            del log.held[sequence]
            cached.owned.pop(sequence, None)
        for sequence in garbage:
            del log.garbage[sequence]
        if keep_latest is not None and log.known_from > 0:
            log.merge_older(additions)

    async def _older(
        self, io: Bucket, run_key: str, cached: _Cached, log: _Log, need: int, now: float
    ) -> tuple[list[str], dict[int, _Entry]]:
        """Pruning below what this process knows (it joined a run written by others, or
        forgot): list the slots older than ``known_from``; the newest ``need`` live ones
        stay, every other key goes. Each listed key is then deleted, except at most
        ``keep_latest``, so the listing is paid for by the creates that wrote them."""
        entries = await io.list(
            layout.slots_prefix(run_key), start_after=layout.older_than(run_key, log.known_from)
        )
        listed = _parse_run_listing(run_key, entries)
        listed.run_etag = cached.etag
        current = await self._resolve(io, run_key, listed)
        keys: list[str] = []
        kept: dict[int, _Entry] = {}
        gone: set[int] = set()
        for view in reversed(current.held):
            expires_at = _listing(view).expires_at
            if len(kept) < need and is_live(expires_at, now):
                kept[view.sequence] = _Entry(expires_at, _keys_of(run_key, view))
            else:
                keys += _keys_of(run_key, view)
                gone.add(view.sequence)
        for view in (*current.tombstones, *current.orphans):
            keys += _keys_of(run_key, view)
        keys += listed.stray
        return keys + _owned_of(run_key, cached, gone), kept

    async def get(
        self, run_key: str, sequence: int, *, now: float
    ) -> tuple[StoredCheckpoint, str] | None:
        if not layout.valid_sequence(sequence):
            return None
        io = await self._objects()
        key = layout.slot_key(run_key, sequence)
        # The run object is read every time (concurrently): the status must be current and
        # a GET cannot check another object's ETag.
        found, state = await pair(
            functools.partial(io.get, key), functools.partial(self._read_state, io, run_key)
        )
        if found is None or state is None:
            return None
        slot = layout.decode_slot(found[0], io.where(key))
        if slot.tombstone or slot.incarnation != state[0].incarnation or not is_live(
            slot.expires_at, now
        ):
            return None
        return self._located(io, run_key, slot), state[0].status

    async def latest(self, run_key: str, *, now: float) -> tuple[StoredCheckpoint, str] | None:
        io = await self._objects()

        def incarnation(listed: _Listed) -> str | None:
            cached = self._cache.get(run_key)
            if cached is None or cached.state is None or cached.etag != listed.run_etag:
                return None
            return cached.state.incarnation

        def found(listed: _Listed) -> bool:
            views = listed.slots.values()
            return _newest_live(views, now, incarnation(listed)) is not None or any(
                view.slot_etag is not None and view.listing is None for view in views
            )

        listed, known_from = await self._scan(io, run_key, first=_page_for(2), enough=found)
        if listed.run_etag is None:
            return None
        # Guess the newest live checkpoint before knowing the incarnation for sure, so the
        # run object (when its ETag changed) and the slot are read at once; check afterwards.
        guess = _newest_live(listed.slots.values(), now, incarnation(listed))
        if guess is not None and not any(
            view.listing is None for view in listed.slots.values() if view.sequence > guess.sequence
        ):
            got, state = await pair(
                functools.partial(io.get, layout.slot_key(run_key, guess.sequence)),
                functools.partial(self._state, io, run_key, listed.run_etag),
            )
            if state is None:
                return None
            result = self._accept(io, run_key, guess, got, state[0], now)
            if result is not None:
                return result
        result = await self._first_live(io, run_key, await self._resolve(io, run_key, listed), now)
        if result is None and known_from:
            result = await self._first_live(io, run_key, await self._load(io, run_key), now)
        return result

    async def _first_live(
        self, io: Bucket, run_key: str, current: _Run, now: float
    ) -> tuple[StoredCheckpoint, str] | None:
        if current.state is None:
            return None
        for view in reversed(current.held):
            if not is_live(_listing(view).expires_at, now):
                continue
            got = await io.get(layout.slot_key(run_key, view.sequence))
            result = self._accept(io, run_key, view, got, current.state, now)
            if result is not None:
                return result
        return None

    def _accept(
        self,
        io: Bucket,
        run_key: str,
        view: _SlotView,
        found: tuple[bytes, str] | None,
        state: RunState,
        now: float,
    ) -> tuple[StoredCheckpoint, str] | None:
        if found is None:
            return None
        slot = layout.decode_slot(found[0], io.where(layout.slot_key(run_key, view.sequence)))
        if slot.tombstone or slot.incarnation != state.incarnation or not is_live(
            slot.expires_at, now
        ):
            return None
        return self._located(io, run_key, slot), state.status

    async def headers(
        self,
        run_key: str,
        *,
        before: int | None,
        limit: int,
        now: float,
        include_expired: bool = False,
    ) -> tuple[list[CheckpointHeader], str | None]:
        io = await self._objects()
        if before is not None and before >= layout.SEQUENCE_SPAN:
            before = None

        def wanted(view: _SlotView) -> bool:
            listing = view.listing
            return view.slot_etag is not None and (before is None or view.sequence < before) and (
                listing is None
                or (view.kind != "t" and (include_expired or is_live(listing.expires_at, now)))
            )

        def enough(listed: _Listed) -> bool:
            return sum(1 for view in listed.slots.values() if wanted(view)) >= limit

        listed, known_from = await self._page(io, run_key, before, _page_for(limit), enough)
        current = await self._resolve(io, run_key, listed)
        chosen = _chosen(current, before, limit, now, include_expired)
        if len(chosen) < limit and known_from:
            # Leftovers of another incarnation filled the page: take the rest of the run.
            listed, known_from = await self._page(
                io, run_key, before, layout.SEQUENCE_SPAN, lambda _: False
            )
            current = await self._resolve(io, run_key, listed)
            chosen = _chosen(current, before, limit, now, include_expired)
        if current.state is None:
            return [], None
        if not include_expired and not chosen:
            # An empty page of a run read to its end from the top: no live checkpoint, so no
            # live run. Otherwise a newer checkpoint may be live: look at the head.
            alive = (before is not None or known_from > 0) and (
                await self._head(io, run_key, live_wanted=1, now=now)
            )[0].live(now)
            if not alive:
                return [], None
        headers = await gather([functools.partial(self._header, io, view) for view in chosen])
        return headers, current.state.status

    async def _page(
        self,
        io: Bucket,
        run_key: str,
        before: int | None,
        first: int,
        enough: Callable[[_Listed], bool],
    ) -> tuple[_Listed, int]:
        """The slots below ``before`` and the run object's ETag: one LIST from the top, or
        (below ``before``) a LIST from there and one of the run object, sent together."""
        if before is None:
            return await self._scan(io, run_key, first=first, enough=enough)
        if before <= 0:
            return _Listed(run_etag=await self._run_etag(io, run_key)), 0
        (listed, known_from), etag = await pair(
            functools.partial(self._scan, io, run_key, first=first, enough=enough, before=before),
            functools.partial(self._run_etag, io, run_key),
        )
        listed.run_etag = etag
        return listed, known_from

    async def _run_etag(self, io: Bucket, run_key: str) -> str | None:
        key = layout.run_object(run_key)
        found = await io.list(key, limit=1)
        return found[0].etag if found and found[0].key == key else None

    async def _header(self, io: Bucket, view: _SlotView) -> CheckpointHeader:
        listing = _listing(view)
        header = listing.header
        if header is None:  # a long header: in the marker's body
            assert view.marker is not None
            found = await io.get(view.marker)
            if found is None:
                raise StoreError(f"listing marker {io.where(view.marker)} vanished while read")
            header = found[0]
        return CheckpointHeader(
            sequence=view.sequence,
            checkpoint_id=listing.checkpoint_id,
            created_at=listing.created_at,
            expires_at=listing.expires_at,
            header=header,
        )

    async def delete(self, run_key: str, sequence: int, *, checkpoint_id: str) -> bool:
        if not layout.valid_sequence(sequence):
            return False
        io = await self._objects()
        current = await self._load(io, run_key)
        self._adopt(run_key, current, 0)
        view = next((v for v in current.held if v.sequence == sequence), None)
        if view is None or _listing(view).checkpoint_id != checkpoint_id:
            return False
        assert view.slot_etag is not None
        key = layout.slot_key(run_key, sequence)
        tombstone_keys: list[str] = []
        if sequence == current.latest_sequence:
            # The newest keeps its slot as a tombstone: its sequence is never handed out again.
            listing = msgspec.structs.replace(_listing(view), header=None)
            tombstone = Slot(listing.incarnation, sequence, listing.checkpoint_id,
                             listing.created_at, listing.expires_at, listing.appended_at,
                             b"", b"", tombstone=True)
            if await io.put(key, layout.encode(tombstone), if_match=view.slot_etag) is None:
                return False
            tombstone_keys = [key, await self._put_marker(io, run_key, sequence, "t", listing)]
        elif not await io.delete_if(key, view.slot_etag):
            return False
        markers = [view.marker] if view.marker is not None else []
        await io.delete([*markers, *view.extra,
                         *_owned_keys(run_key, current.listed, {sequence})])
        self._discard(run_key, [sequence])
        cached = self._cache.get(run_key)
        if tombstone_keys and cached is not None and cached.log is not None:
            cached.log.garbage[sequence] = tombstone_keys
        return True

    async def delete_run(self, run_key: str) -> int:
        io = await self._objects()
        current = await self._load(io, run_key)
        items = await io.list(layout.items_prefix(run_key))
        keys = [key for view in current.listed.slots.values() for key in _keys_of(run_key, view)]
        keys += [marker.key for marker in current.listed.item_markers]
        keys += current.listed.stray + [entry.key for entry in items]
        if current.state is not None:
            keys += [layout.run_object(run_key), *layout.index_keys(run_key, current.state)]
        elif current.listed.run_etag is not None:
            keys.append(layout.run_object(run_key))
        if keys:
            await io.delete(keys)
        self._forget(run_key)
        return len(current.held)

    # -- runs ---------------------------------------------------------------------------------

    async def get_run(self, run_key: str, *, now: float) -> RunRecord | None:
        io = await self._objects()
        current = await self._load(io, run_key)
        self._adopt(run_key, current, 0)
        return current.record() if current.live(now) else None

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
        layout.check_status(status)
        io = await self._objects()
        current = await self._load(io, run_key)
        self._adopt(run_key, current, 0)
        if not current.live(now):
            raise CheckpointNotFound(f"no live run with key {run_key}")
        old = current.state
        assert old is not None
        assert current.etag is not None
        if (old.incarnation, old.version) != (incarnation, version):
            raise ConflictError(
                f"run changed concurrently (now {old.incarnation}/{old.version}, "
                f"expected {incarnation}/{version})"
            )
        new = msgspec.structs.replace(old, status=status, data=bytes(data), version=version + 1,
                                      updated_at=now)
        etag = await io.put(layout.run_object(run_key), layout.encode(new),
                            if_match=current.etag)
        if etag is None:
            raise ConflictError(f"run {run_key} changed concurrently; read it again and retry")
        self._remember(run_key, etag, new)
        if new.status != old.status:
            # The by-status index follows the run object; readers check entries against it.
            await io.put(layout.index_keys(run_key, new)[1], b"")
            await io.delete([layout.index_keys(run_key, old)[1]])
        current.state = new
        return current.record()

    async def list_runs(
        self, *, status: str | None, limit: int, cursor: str | None, now: float
    ) -> tuple[list[RunRecord], str | None]:
        if status is not None:
            layout.check_status(status)
        io = await self._objects()
        prefix = layout.index_prefix(status)
        start_after = None if cursor is None else _decode_cursor(cursor, prefix)
        result: list[RunRecord] = []
        page_size = min(max(limit, 50), 1000)
        if limit <= 0:
            return [], cursor
        while True:
            page = await io.list(prefix, start_after=start_after, limit=page_size)
            records = await self._indexed(io, page, prefix, status, now)
            for entry, record in zip(page, records, strict=True):
                if record is None:
                    continue
                if len(result) == limit:  # one more match exists: the cursor resumes here
                    assert start_after is not None
                    return result, _encode_cursor(start_after)
                result.append(record)
                start_after = entry.key
            if len(page) < page_size:
                return result, None
            if len(result) == limit:
                assert start_after is not None
                return result, _encode_cursor(start_after)
            start_after = page[-1].key

    async def _indexed(
        self, io: Bucket, page: Sequence[Listed], prefix: str, status: str | None, now: float
    ) -> list[RunRecord | None]:
        async def record(entry: Listed) -> RunRecord | None:
            parsed = layout.parse_index_entry(entry.key, prefix)
            if parsed is None:
                return None
            run_key, incarnation = parsed
            current = await self._load(io, run_key)
            state = current.state
            if state is None or state.incarnation != incarnation or not current.live(now):
                return None
            if status is not None and state.status != status:
                return None  # a stale entry: the status moved on
            return current.record()

        return await gather([functools.partial(record, entry) for entry in page])

    async def count_runs(self, *, status: str | None, now: float) -> int:
        if status is not None:
            layout.check_status(status)
        io = await self._objects()
        prefix = layout.index_prefix(status)
        entries = await io.list(prefix)
        records = await self._indexed(io, entries, prefix, status, now)
        return sum(1 for record in records if record is not None)

    # -- items ----------------------------------------------------------------------------------

    async def put_items(
        self, run_key: str, items: Sequence[Item], *, create_only: bool = False, now: float
    ) -> None:
        latest: dict[str, Item] = {}
        for item in items:
            _check_item(item)
            latest[layout.hex_item_key(item.key)] = item
        if not latest:
            return
        io = await self._objects()
        markers = _parse_run_listing(
            run_key, await io.list(layout.item_markers_prefix(run_key))
        ).item_markers
        if create_only:
            await self._put_new_items(io, run_key, latest, now)
        else:
            await gather([
                functools.partial(io.put, layout.item_object(run_key, hex_key), _item_body(item))
                for hex_key, item in latest.items()
            ])
        wanted = {
            layout.item_marker_key(run_key, hex_key, ItemMeta(item.owner, item.expires_at))
            for hex_key, item in latest.items()
            if item.owner is not None or item.expires_at is not None
        }
        existing = {marker.key for marker in markers}
        await gather([functools.partial(io.put, key, b"") for key in sorted(wanted - existing)])
        stale = [m.key for m in markers if m.hex_key in latest and m.key not in wanted]
        if stale:
            await io.delete(stale)
        # The listing above showed every owned item: pruning removes them without a LIST.
        owned: dict[int, dict[str, str]] = {}
        for marker in markers:
            if marker.meta.owner is not None and marker.hex_key not in latest:
                owned.setdefault(marker.meta.owner, {})[marker.hex_key] = marker.key
        for hex_key, item in latest.items():
            if item.owner is not None:
                meta = ItemMeta(item.owner, item.expires_at)
                key = layout.item_marker_key(run_key, hex_key, meta)
                owned.setdefault(item.owner, {})[hex_key] = key
        self._cached(run_key).owned = owned

    async def _put_new_items(
        self, io: Bucket, run_key: str, items: dict[str, Item], now: float
    ) -> None:
        hex_keys = list(items)
        found = await gather([
            functools.partial(io.get, layout.item_object(run_key, hex_key)) for hex_key in hex_keys
        ])
        replace: dict[str, str | None] = {}
        for hex_key, existing in zip(hex_keys, found, strict=True):
            if existing is None:
                replace[hex_key] = None
                continue
            where = io.where(layout.item_object(run_key, hex_key))
            if is_live(layout.decode_item(existing[0], where).expires_at, now):
                raise ConflictError(f"item {items[hex_key].key!r} already exists")
            replace[hex_key] = existing[1]
        for hex_key, etag in replace.items():
            written = await io.put(layout.item_object(run_key, hex_key), _item_body(items[hex_key]),
                                   if_none_match=etag is None, if_match=etag)
            if written is None:
                raise ConflictError(f"item {items[hex_key].key!r} was created concurrently")

    async def get_items(
        self, run_key: str, keys: Sequence[str], *, now: float
    ) -> dict[str, bytes]:
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return {}
        io = await self._objects()
        hex_keys = [layout.hex_item_key(key) for key in wanted]
        bodies = await self._read_items(io, run_key, hex_keys, now)
        return {key: body for key, body in zip(wanted, bodies, strict=True) if body is not None}

    async def _read_items(
        self, io: Bucket, run_key: str, hex_keys: Sequence[str], now: float
    ) -> list[bytes | None]:
        async def read(hex_key: str) -> bytes | None:
            key = layout.item_object(run_key, hex_key)
            found = await io.get(key)
            if found is None:
                return None
            item = layout.decode_item(found[0], io.where(key))
            return item.value if is_live(item.expires_at, now) else None

        return await gather([functools.partial(read, hex_key) for hex_key in hex_keys])

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
        if limit <= 0:
            return []
        io = await self._objects()
        base = layout.items_prefix(run_key)
        hex_prefix = prefix.encode("utf-8").hex()
        after = None if start_after is None else start_after.encode("utf-8").hex()
        if reverse:
            listed = await io.list(base + hex_prefix)
            candidates = [entry.key[len(base):] for entry in reversed(listed)]
            if after is not None:
                candidates = [hex_key for hex_key in candidates if hex_key < after]
        else:
            listed = await io.list(
                base + hex_prefix, start_after=None if after is None else base + after
            )
            candidates = [entry.key[len(base):] for entry in listed]
        result: list[tuple[str, bytes]] = []
        for start in range(0, len(candidates), limit):
            chunk = candidates[start : start + limit]
            values = await self._read_items(io, run_key, chunk, now)
            for hex_key, value in zip(chunk, values, strict=True):
                if value is not None and len(result) < limit:
                    result.append((layout.item_key_of(hex_key), value))
            if len(result) >= limit:
                break
        return result

    async def delete_items(self, run_key: str, keys: Sequence[str]) -> int:
        wanted = {layout.hex_item_key(key) for key in keys}
        if not wanted:
            return 0
        io = await self._objects()
        base = layout.items_prefix(run_key)
        present = {entry.key[len(base):] for entry in await io.list(base)} & wanted
        if not present:
            return 0
        markers = _parse_run_listing(
            run_key, await io.list(layout.item_markers_prefix(run_key))
        ).item_markers
        doomed = [layout.item_object(run_key, hex_key) for hex_key in present]
        doomed += [marker.key for marker in markers if marker.hex_key in present]
        await io.delete(doomed)
        cached = self._cache.get(run_key)
        if cached is not None:
            for items in cached.owned.values():
                for hex_key in present:
                    items.pop(hex_key, None)
        return len(present)

    # -- maintenance ----------------------------------------------------------------------------

    async def purge_expired(self, *, now: float, limit: int) -> tuple[int, bool]:
        io = await self._objects()
        removed = 0
        work = 0
        left = False
        for run_key, entries in _by_run(await io.list("runs/")):
            listed = _parse_run_listing(run_key, entries)
            if not _may_need_purge(listed, now):
                continue
            if work >= limit:
                left = True
                break
            checkpoints, things, more = await self._purge_run(
                io, run_key, listed, now, limit - work
            )
            removed += checkpoints
            work += things
            left = left or more
        return removed, not left

    async def _purge_run(
        self, io: Bucket, run_key: str, listed: _Listed, now: float, budget: int
    ) -> tuple[int, int, bool]:
        """Purge one run: ``(checkpoints removed, things removed, more left)``."""
        current = await self._resolve(io, run_key, listed)
        if current.state is not None and not current.live(now):
            if current.being_created(now):
                return 0, 0, False
            return await self._purge_dead_run(io, run_key, current)
        await self._heal(io, run_key, current)
        removed = 0
        things = 0
        keys: list[str] = []
        gone: list[int] = []
        expired = [v for v in current.held if not is_live(_listing(v).expires_at, now)]
        more = len(expired) > budget
        for view in expired[:budget]:
            assert view.slot_etag is not None
            things += 1
            if await io.delete_if(layout.slot_key(run_key, view.sequence), view.slot_etag):
                removed += 1
                gone.append(view.sequence)
                keys += [*([view.marker] if view.marker else []), *view.extra]
                keys += _owned_keys(run_key, listed, {view.sequence})
        head = current.latest_sequence
        mine = None if current.state is None else current.state.incarnation
        for view in current.orphans:
            if current.state is None or view.sequence < head:
                gone.append(view.sequence)
                keys += _keys_of(run_key, view)
                if view.listing is not None and view.listing.incarnation == mine:
                    keys += _owned_keys(run_key, listed, {view.sequence})
        held = {view.sequence for view in current.held}
        for marker in listed.item_markers:
            owner = marker.meta.owner
            if not is_live(marker.meta.expires_at, now):
                things += 1
                keys += [marker.key, layout.item_object(run_key, marker.hex_key)]
            elif owner is not None and owner < head and owner not in held:
                # Its owner was pruned by a process that did not know of the item.
                keys += [marker.key, layout.item_object(run_key, marker.hex_key)]
        if keys:
            await io.delete(keys)
        self._discard(run_key, gone)
        return removed, things, more

    def _discard(self, run_key: str, sequences: Iterable[int]) -> None:
        """Checkpoints removed by someone else than an append: drop them from the log."""
        cached = self._cache.get(run_key)
        if cached is None:
            return
        for sequence in sequences:
            cached.owned.pop(sequence, None)
            if cached.log is not None:
                cached.log.held.pop(sequence, None)
                cached.log.garbage.pop(sequence, None)

    async def _purge_dead_run(
        self, io: Bucket, run_key: str, current: _Run
    ) -> tuple[int, int, bool]:
        assert current.state is not None
        assert current.etag is not None
        # The conditional delete of the run object elects one purging worker per run.
        if not await io.delete_if(layout.run_object(run_key), current.etag):
            return 0, 0, False
        self._forget(run_key)
        items = await io.list(layout.items_prefix(run_key))
        keys = [key for view in current.listed.slots.values() for key in _keys_of(run_key, view)]
        keys += [marker.key for marker in current.listed.item_markers]
        keys += current.listed.stray + [entry.key for entry in items]
        keys += layout.index_keys(run_key, current.state)
        await io.delete(keys)
        return len(current.held), len(current.held) + 1, False


class S3CheckpointStore(S3Store):
    """FastAgentic's S3 store name and constructor: ``S3CheckpointStore(client, bucket=...)``.

    Works with a stock aiobotocore or aioboto3 client, which it never closes.
    """

    def __init__(self, client: Any, bucket: str, prefix: str = "checkpoints/") -> None:
        super().__init__(bucket, prefix, client=client)


# -- helpers ------------------------------------------------------------------------------------


def _normalized_prefix(prefix: object) -> str:
    if not isinstance(prefix, str):
        raise ConfigurationError(f"S3 prefix must be a str, got {type(prefix).__name__}")
    prefix = prefix.strip("/")
    if not prefix:
        return ""
    if "//" in prefix or len(prefix.encode("utf-8")) > layout.MAX_PREFIX_BYTES:
        raise ConfigurationError(
            f"S3 prefix {prefix[:60]!r} must be at most {layout.MAX_PREFIX_BYTES} bytes "
            "without empty segments ('//')"
        )
    return prefix + "/"


def _keys_of(run_key: str, view: _SlotView) -> list[str]:
    keys = [layout.slot_key(run_key, view.sequence)] if view.slot_etag is not None else []
    if view.marker is not None:
        keys.append(view.marker)
    return keys + view.extra


def _owned_keys(run_key: str, listed: _Listed, owners: set[int]) -> list[str]:
    keys: list[str] = []
    for marker in listed.item_markers:
        if marker.meta.owner is not None and marker.meta.owner in owners:
            keys += [marker.key, layout.item_object(run_key, marker.hex_key)]
    return keys


def _newest_live(
    views: Iterable[_SlotView], now: float, incarnation: str | None
) -> _SlotView | None:
    for view in sorted(views, key=lambda v: -v.sequence):
        listing = view.listing
        if view.slot_etag is None or listing is None or view.kind == "t":
            continue
        if incarnation is not None and listing.incarnation != incarnation:
            continue
        if is_live(listing.expires_at, now):
            return view
    return None


def _may_need_purge(listed: _Listed, now: float) -> bool:
    """From the listing alone: does this run have anything expired, dead or stray?"""
    if any(not is_live(marker.meta.expires_at, now) for marker in listed.item_markers):
        return True
    views = list(listed.slots.values())
    if any(view.slot_etag is None or view.listing is None for view in views):
        return True
    held = [view for view in views if view.kind != "t"]
    if any(not is_live(_listing(view).expires_at, now) for view in held):
        return True
    if listed.run_etag is not None and not held:
        return True  # emptied, or a creation that never wrote its first checkpoint
    slotted = {view.sequence for view in held}
    top = max((view.sequence for view in views), default=-1)
    if any(marker.meta.owner is not None and marker.meta.owner < top
           and marker.meta.owner not in slotted for marker in listed.item_markers):
        return True  # items whose owner was pruned by a process that did not know of them
    incarnations = {_listing(view).incarnation for view in views}
    return len(incarnations) > 1 or bool(listed.stray)


def _by_run(entries: Sequence[Listed]) -> Iterable[tuple[str, list[Listed]]]:
    """Group a listing of ``runs/`` by run key (keys of one run are contiguous)."""
    group: list[Listed] = []
    current: str | None = None
    for entry in entries:
        run_key = entry.key.split("/", 2)[1] if entry.key.count("/") >= 2 else ""
        if run_key != current and group:
            assert current is not None
            yield current, group
            group = []
        current = run_key
        group.append(entry)
    if group and current is not None:
        yield current, group


def _check_item(item: object) -> None:
    if not isinstance(item, Item):
        raise ValidationError(f"put_items takes Item records, got {type(item).__name__}")
    if not isinstance(item.value, bytes):
        raise ValidationError(f"item {item.key!r} value must be bytes")


def _item_body(item: Item) -> bytes:
    return layout.encode(layout.ItemBody(item.value, item.owner, item.expires_at))


def _encode_cursor(key: str) -> str:
    return key.encode("utf-8").hex()


def _decode_cursor(cursor: str, prefix: str) -> str:
    try:
        key = bytes.fromhex(cursor).decode("utf-8")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValidationError(f"malformed run listing cursor {cursor[:40]!r}") from exc
    if not key.startswith(prefix):
        raise ValidationError("run listing cursor belongs to another status filter")
    return key
