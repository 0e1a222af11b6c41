"""S3 store: no manifest; a create-only slot object per checkpoint is the commit.

Layout, request counts, costs and limits: ``docs/stores/s3.md``; keys: ``_s3_layout``.

Why two objects per checkpoint. S3 conditions a write on its own key only, and a listing
returns keys, never metadata. A sequence must be claimed at a key fixed by the sequence alone
(so two writers collide), while what a listing shows (expiry, step name, tags...) must be in
a key. So a checkpoint is a *slot* (``c/<inv seq>``, create-only, holds everything: the
commit, and the one object ``get`` reads) plus a *marker* (``c/<inv seq>/m<listing>``, empty,
written right after). A slot without its marker (a crash between the two PUTs) is still a
committed checkpoint: readers fetch its listing from the slot itself.

Run state. The run object holds what changes rarely (status, version, data, incarnation,
floor); ``latest_sequence``, ``checkpoint_count`` and ``expires_at`` are derived from the
run's listing, so an append does not rewrite it (only pruning raises the floor, rarely).
Runs are created by a compare-and-set on the run object (create-only, or ``IfMatch`` over a
dead run's), which also decides among writers racing for a run's first checkpoint; the
others join the incarnation it created.

Costs independent of the run's length. Keys list newest first, right after the run object,
so readers LIST only the head of a run (``MaxKeys`` sized to what they need, continuing only
past expired checkpoints, tombstones and leftovers). Appends do not LIST at all in steady
state: each process keeps what it knows of a run's log (``_Log``: built from one listing,
then from its own writes), proposes from it, and lets the create-only slot PUT catch other
writers; a 412 is resolved by listing the head. The same round trip reads the run object
unless it still has the ETag this process knows (a 304): an append into a run that was
deleted or started over meanwhile is taken back and refused, never acknowledged. Pruning
deletes keys the process knows, in one ``DeleteObjects`` (two when they own items: the slots
first); below what it knows it lists once, and what it lists it deletes.

Sequences are never handed out twice. A create-only PUT only collides with a slot that is
still there, so the run object carries a *floor*: slot keys are deleted only below it
(pruning raises it first, once per ``keep_latest`` + 1 appends), the newest checkpoint is
never deleted outright (a tombstone replaces it), and an append below the floor (from
knowledge older than another process's pruning) is taken back by the check. A dead run is
*sealed* (its next sequence claimed create-only) before it is started over or purged, so
an append from a process that does not know it died is refused or keeps it alive.

Reads that race a removal. A read takes several requests (the head, the slot, the items);
what one found may be removed or written again by another process before the next. A slot
listed but gone, or of another write than listed (ETags, tokens), and an item missing while
the slot changed (a conditional GET, only then), make the read start over (``_afresh``): it
returns the state before the change or after it, never a mix.

Exact removal. Deletes that must be counted (``delete``, purging) are conditional
(``IfMatch`` on the ETag listed), so concurrent workers never both count one checkpoint.

Nested items (``SupportsNestedItems``). The items nested under a shared item ``K`` are the
objects under one key prefix (see ``_s3_layout``). The run object lists the refs appends
nested items under (the first such append writes it before its commit: 1 PUT and a round trip
more, once per ref; at most 32, then "any ref"), and each slot those its own append did. A read
with items lists that prefix for each listed ref only, with the reads of the refs (one LIST per
such ref, per 1,000 nested items), then reads what it lists concurrently: one more round trip
when there are any; refs nothing was nested under (the LangGraph saver's) cost nothing. They are
removed by the sweep that removes ``K`` (an item nested under a named one is held), the
deepest first, so a sweep that stops part way leaves ``K`` until all of them are gone and
the next sweep completes it; the sweep's lease guards them as it guards ``K``, and the sweep
then takes ``K`` off the run object's list (1 PUT).
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import heapq
import logging
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import parse_qsl, urlsplit

import msgspec

from fastcheckpoint._config import RetryPolicy, check_setting_text
from fastcheckpoint._gather import gather, pair
from fastcheckpoint._settle import settled
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
from fastcheckpoint.stores import _s3_layout as layout
from fastcheckpoint.stores._aws import AwsEndpoint, counting_sends, open_client
from fastcheckpoint.stores._base import (
    EMPTY_RUN,
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
    check_sequence,
    check_str,
    check_time,
    check_utf8,
    is_live,
    latest_expiry,
    nesting_under,
)
from fastcheckpoint.stores._loops import GivenClientLoop, PerLoop, holds_clients
from fastcheckpoint.stores._s3_io import (
    PAGE,
    UNCHANGED,
    WIDE,
    Bucket,
    Listed,
    Unchanged,
)
from fastcheckpoint.stores._s3_layout import (
    ItemBody,
    ItemMeta,
    Listing,
    Removed,
    RunState,
    Slot,
    SweepLease,
)
from fastcheckpoint.stores._s3_provision import own_rules, provision_bucket, rule_id

if TYPE_CHECKING:
    from aiobotocore.session import AioSession
    from types_aiobotocore_s3 import S3Client

__all__ = ["S3CheckpointStore", "S3Store", "lifecycle_rules"]

logger = logging.getLogger("fastcheckpoint.stores.s3")
_T = TypeVar("_T")

CREATION_GRACE_SECONDS = 60.0
"""A run object without any checkpoint is a run being created: the next first append joins
it at once (whether its creator is still writing or crashed). The cleanup loop leaves it
alone for this long, then removes it as a crash leftover."""
_RUN_CACHE = 1024
"""Runs this process keeps knowledge of (run object, log, owned items), least recently used
first out; a forgotten run costs one LIST on its next append."""
_LOG_SPARE = 256
"""Checkpoints a log keeps beyond ``keep_latest`` (all of an unpruned run's, up to this): what
bounds its memory. Older ones are forgotten; only the cleanup loop then removes them on expiry."""
_URL_OPTIONS = frozenset({"region", "endpoint_url"})
_KEYWORD_OPTIONS = frozenset({"client", "session"})
_TOKEN_BYTES = 8
_SLOT_TAIL = 4096
"""Bytes of a slot's end read to learn what it names as its predecessor (``Slot.after``):
what follows the payload (token, run key, the refs and nests, the flags), whatever the
payload's size."""
_FLOOR_RACES = 3
"""Tries of a status change whose compare-and-set loses to writers raising the floor."""
_NOT_HELD = ("t", "g", "p")
"""Kinds of slot views that hold no checkpoint to read: tombstones (and seals), guards,
pending slots (see ``Slot.owns``)."""
_GUARD_BREAKS = 8
"""Guards an append breaks at its sequence before it gives up (each is another status
change guarded by the run's newest checkpoint, begun while the append was retried)."""
SWEEP_LEASE_SECONDS = 60.0
"""A sweep lease older than this was left by a worker that stopped: the next sweep takes it."""
REMOVED_SECONDS = 3600.0
"""How long the run's sweep lease remembers a shared item a sweep removed: meanwhile an
append naming it without writing it (its writer saw it before the removal) is refused
rather than acknowledged without it."""
_READ_PAGE = 100
"""``MaxKeys`` of the listing behind ``read_with_items(sequence=None)``: the newest
checkpoints with the items they own, in one LIST."""
_SLOT_PAGE = 4
"""``MaxKeys`` of the listing behind ``put_owned_items``'s owner check: the slot and its
marker, and room for a leftover duplicate, before the markers of the items it owns."""
_REFS_CACHE = 4096
"""Slots whose refs this process remembers for sweeps (a slot never changes under its ETag)."""
_STORE = "S3Store"
_DRIVER = "aiobotocore"


def lifecycle_rules(prefix: str = "", *, backstop_days: int | None = None) -> list[dict[str, Any]]:
    """The lifecycle rules ``provision()`` sets for a store under ``prefix``.

    * ``fastcheckpoint-noncurrent``: the bucket is versioned, so a delete leaves a noncurrent
      version; remove it after a day, clear expired delete markers and stale uploads.
    * ``fastcheckpoint-backstop`` (with ``backstop_days``): delete any current object that
      many days after it was written, in case no cleanup loop ever runs. S3 counts whole days
      (rounded up to midnight UTC), so choose more than your longest TTL in days, plus one.

    Under a prefix other than ``""`` each id carries the prefix (``rule_id``), so stores under
    other prefixes of one bucket keep each their own rules.
    """
    scope = {"Prefix": prefix}
    rules: list[dict[str, Any]] = [
        {
            "ID": rule_id("fastcheckpoint-noncurrent", prefix),
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
                "ID": rule_id("fastcheckpoint-backstop", prefix),
                "Status": "Enabled",
                "Filter": dict(scope),
                "Expiration": {"Days": backstop_days},
            }
        )
    return rules


# -- the derived view of one run ----------------------------------------------------------------


@dataclass
class _ItemMarker:
    key: str
    hex_key: str
    meta: ItemMeta
    etag: str = ""  # as listed, or as its PUT answered
    item_etag: str = ""
    """The ETag of the item object, known to the process that wrote it (as its PUT answered);
    ``""``: unknown (a listing shows the markers, not the items)."""


@dataclass
class _SlotView:
    sequence: int
    slot_etag: str | None = None
    marker: str | None = None  # key of the marker, relative to the store prefix
    kind: str = ""  # "m", "l" (long header), "t" (tombstone); no marker: "g" (a guard), "p"
    listing: Listing | None = None
    extra: list[str] = field(default_factory=list)  # duplicate markers (crash leftovers)
    missing: bool = False  # a slot without its marker: ``marker`` is the key it should have
    owned: list[_ItemMarker] = field(default_factory=list)  # markers of the items it owns
    damage: CorruptCheckpointError | None = None  # a slot without marker that cannot be read
    gone: bool = False  # a slot without marker listed, removed by the time it was read
    guards: str = ""  # a guard's: the run object's ETag its status change replaces
    told_apart: bool = False  # markers of more than one write, its own found (_read_mixed)

    @property
    def names_items(self) -> bool:
        """Its checkpoint names shared items (or may: a slot not read yet)."""
        if self.listing is None:
            return self.slot_etag is not None
        return self.kind != "t" and self.listing.refs


@dataclass
class _Listed:
    """One run's objects as a listing shows them."""

    run_etag: str | None = None
    slots: dict[int, _SlotView] = field(default_factory=dict)
    item_markers: list[_ItemMarker] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)  # unparseable keys: removed with the run
    sweep_due: str | None = None  # ETag of the object asking for a sweep
    lease: str | None = None  # ETag of a sweep's lease

    def sweep_keys(self, run_key: str) -> list[str]:
        return ([layout.sweep_due(run_key)] if self.sweep_due is not None else []) + (
            [layout.sweep_lease(run_key)] if self.lease is not None else [])


@dataclass
class _Run:
    state: RunState | None
    etag: str | None
    listed: _Listed
    damage: CorruptCheckpointError | None = None
    """Set when the run object cannot be decoded: ``state`` is then made up from the log
    (the newest checkpoint's incarnation, status active) so that readers still find the
    intact checkpoints; writers refuse with this error."""
    held: list[_SlotView] = field(default_factory=list)  # ascending
    tombstones: list[_SlotView] = field(default_factory=list)
    orphans: list[_SlotView] = field(default_factory=list)  # other incarnations, bare markers
    guards: list[_SlotView] = field(default_factory=list)  # of status changes (see _guarded)
    pending: list[_SlotView] = field(default_factory=list)
    """Slots whose owned items may not all be written yet (``Slot.owns``, no marker): no
    checkpoint to read, but their sequences are taken and their writers may be alive, so
    the run lives while they do (a start-over would lose a create about to return)."""

    def __post_init__(self) -> None:
        incarnation = None if self.state is None else self.state.incarnation
        for sequence in sorted(self.listed.slots):
            view = self.listed.slots[sequence]
            mine = view.listing is not None and view.listing.incarnation == incarnation
            if view.slot_etag is None or not mine:
                self.orphans.append(view)
            elif view.kind == "g":
                self.guards.append(view)
            elif view.kind == "p":
                self.pending.append(view)
            elif view.kind == "t":
                self.tombstones.append(view)
            else:
                self.held.append(view)

    @classmethod
    def damaged(cls, listed: _Listed, damage: CorruptCheckpointError) -> _Run:
        """The run as its log shows it, when its run object cannot be read: the incarnation
        of the newest checkpoint (tombstones and seals may be an ended run's)."""
        views = [view for view in listed.slots.values() if view.slot_etag is not None
                 and view.listing is not None and view.kind not in _NOT_HELD]
        if not views:
            return cls(None, listed.run_etag, listed, damage)
        newest = max(views, key=lambda view: (_listing(view).appended_at, view.sequence))
        state = RunState("", _listing(newest).incarnation, "active", 0.0, 0.0, 0, b"",
                         nesting_all=True)
        return cls(state, listed.run_etag, listed, damage)

    @property
    def latest_sequence(self) -> int:
        tops = [view.sequence for view in (*self.held[-1:], *self.tombstones[-1:],
                                           *self.pending[-1:])]
        return max(tops, default=-1)

    @property
    def expires_at(self) -> float | None:
        if not self.held and not self.pending:
            return EMPTY_RUN
        return functools.reduce(latest_expiry, [_listing(view).expires_at
                                                for view in (*self.held, *self.pending)])

    def live(self, now: float) -> bool:
        return self.state is not None and bool(self.held or self.pending) and is_live(
            self.expires_at, now)

    def being_created(self) -> bool:
        """A run object without any checkpoint of its own: its creator has not written the
        first slot yet, or crashed before it did. The next first append joins it. Not one
        whose floor was raised: it had checkpoints (all gone, the newest a create taken
        back after the cleanup loop raised the floor past it), so it is dead."""
        return (self.state is not None and not self.held and not self.tombstones
                and not self.pending and self.state.floor == 0)

    def abandoned(self, now: float) -> bool:
        """Being created for longer than any creator takes: a crash leftover to purge."""
        return (
            self.being_created()
            and self.state is not None
            and now - self.state.updated_at >= CREATION_GRACE_SECONDS
        )

    def record(self) -> RunRecord:
        assert self.state is not None
        state = self.state
        head = max((*self.held[-1:], *self.tombstones[-1:], *self.pending[-1:]),
                   key=lambda v: v.sequence, default=None)
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
            labels=state.labels,
        )

    @property
    def next_sequence(self) -> int:
        """The sequence the next append takes: after the newest, and at or above the floor
        (keys below it may have been freed). The floor is above the newest only when the
        newest slot the cleanup loop raised it past was then taken back (its create failed):
        its key was never acknowledged, nor are those between."""
        floor = 0 if self.state is None else self.state.floor
        return max(self.latest_sequence + 1, floor)

    def conflict(self, now: float) -> SequenceConflict:
        """What the manager must propose next: the live run's next sequence; sequence 0 in
        the incarnation of a run being created (``latest_sequence`` -1: joining it); else a
        new run."""
        if self.state is not None and self.live(now):
            return SequenceConflict(
                latest_sequence=self.next_sequence - 1, incarnation=self.state.incarnation
            )
        if self.state is not None and self.being_created():
            return SequenceConflict(
                latest_sequence=self.latest_sequence, incarnation=self.state.incarnation
            )
        return SequenceConflict(latest_sequence=None, incarnation=None)


@dataclass
class _Entry:
    """A checkpoint this process knows: its expiry, the keys pruning deletes by key (slot,
    marker), and the markers of the items a listing showed it owns (those this process
    wrote are in ``_Cached.owned``, with their items' ETags)."""

    expires_at: float | None
    keys: list[str]
    owned: list[_ItemMarker] = field(default_factory=list)
    token: bytes = b""  # its slot's write token (empty where unknown)
    bare: Listing | None = None
    """What a listing shows of it, while this process knows it has no marker (its PUT
    failed, or a listing at or above the floor showed none): written before this process
    raises the floor over it (see ``S3Store._stands``)."""
    unvouched: Listing | None = None
    """What a listing below the floor shows of it without its marker: a checkpoint while the
    run goes on from it, or a commit that landed late. Before this process prunes another
    checkpoint of the run, it writes the marker when the run goes on from it (a removal
    after it may break that chain)."""
    late: bool = False
    """Told to be a commit that landed late (the run does not go on from it, which never
    changes): no checkpoint, and pruning asks no more."""


@dataclass
class _Log:
    """What this process knows of one incarnation's log, so that an append needs no LIST.

    Every checkpoint of the run with ``sequence >= known_from`` is in ``held`` (ascending);
    older ones are unknown unless ``known_from == 0``. Built from a listing, then kept up to
    date by this process's own appends and deletes. It goes stale when another process
    writes the run: the create-only slot PUT and the check of the run object sent with it
    catch that (see "Stale knowledge" in ``docs/stores/s3.md``).
    """

    latest: int  # held or tombstone, -1 for none
    held: dict[int, _Entry]
    garbage: dict[int, list[str]]  # tombstones and leftovers: removed once a newer slot exists
    known_from: int
    expiring: list[tuple[float, int]] = field(default_factory=list)  # heap of (expiry, sequence)
    pending: dict[int, bytes] = field(default_factory=dict)
    """Write tokens of the pending slots the listing showed (see ``Slot.owns``): not
    checkpoints yet, but an append right after one names it as its predecessor
    (``Slot.after``), as it is the one its writer will make a checkpoint of."""
    unsure_below: bool = False
    """Whether a checkpoint below ``known_from`` may lack its marker below the floor
    unbeknown to this process (never listed, or forgotten while known to lack it): a
    pruning without ``keep_latest`` that removes the lowest slot this process knows first
    lists below it (see ``S3Store._just_below``), and then knows what it needs to."""
    buried: dict[int, bytes] = field(default_factory=dict)
    """The newest tombstone the listing showed (its marker's token) or this process's
    ``delete`` wrote, with the ``after`` it carries: an append right after it names that
    (``Slot.after``), so that the chain of predecessors goes through the deleted checkpoint
    once pruning removed its tombstone."""

    def named_before(self, sequence: int) -> bytes:
        """What an append at ``sequence`` names as its predecessor (``Slot.after``): the
        checkpoint before it, a pending slot there, or what a tombstone there names; empty
        when this process knows none of them."""
        before = self.held.get(sequence - 1)
        if before is not None:
            return before.token
        return self.pending.get(sequence - 1, self.buried.get(sequence - 1, b""))

    def add(self, sequence: int, entry: _Entry) -> None:
        self.held[sequence] = entry
        if entry.expires_at is not None:
            heapq.heappush(self.expiring, (entry.expires_at, sequence))

    def live(self, now: float) -> bool:
        """Whether a checkpoint it knows is live; newest first, so usually the first one."""
        return any(is_live(entry.expires_at, now) for entry in reversed(self.held.values()))

    def trim(self, limit: int) -> None:
        """Forget the oldest checkpoints beyond ``limit``: memory stays bounded. What it
        knows starts right above the last one forgotten, not at the next checkpoint: a
        tombstone between them (garbage not removed yet) is the slot after it, whose
        removal lists it first (see ``unsure_below``). One forgotten without its marker
        keeps the log unsure also when others forgotten after it have theirs: a tombstone
        above it whose removal failed may still be the slot after it."""
        while len(self.held) > limit:
            sequence = next(iter(self.held))
            forgotten = self.held.pop(sequence)
            self.known_from = sequence + 1
            self.unsure_below = self.unsure_below or forgotten.bare is not None or (
                forgotten.unvouched is not None and not forgotten.late)
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
        self.unsure_below = False


@dataclass
class _SharedWrite:
    """The shared items an append wrote or found in place: the ETag of the object at each
    hex key, and those this append created (what it may withdraw when refused)."""

    etags: dict[str, str] = field(default_factory=dict)
    created: dict[str, str] = field(default_factory=dict)


@dataclass
class _Guard:
    """A guard of a status change (see ``S3Store._guarded``): its key, body and ETag."""

    key: str
    slot: Slot
    etag: str = ""


@dataclass(frozen=True)
class _Broken:
    """A status change's guard held the append's sequence: broken (see
    ``S3Store._break_guard``), so the commit is sent again, checked against the run object
    as the break left it (``etag``, ``state``)."""

    etag: str
    state: RunState


@dataclass(frozen=True)
class _Deleted:
    """A create's own slot, applied although its reply was lost, then deleted by another
    process (its tombstone names the slot's token) before the PUT was sent again."""

    status: str | None  # the run's, when the head listed shows the run still of its incarnation


@dataclass
class _Cached:
    """One run as this process knows it: the run object as last read (valid while listings
    show the same ETag), the log, and owned items it wrote or listed (owner -> hex -> marker,
    with the ETags of marker and item where known: a removal deletes each only while it has
    them, see :func:`_owned_removals`)."""

    etag: str | None = None
    state: RunState | None = None
    log: _Log | None = None
    owned: dict[int, dict[str, _ItemMarker]] = field(default_factory=dict)
    raised_floor: int = -1  # the floor this process's last floor raise set


_Accepted = tuple[StoredCheckpoint, str, tuple[str, ...], str]
"""A checkpoint read, its run's status, the refs that may have items nested under them, and
the ETag of its slot."""


class _Superseded(Exception):
    """What a read found in one request was removed or replaced by another process before a
    later request of the read (a newer checkpoint pruned the slot it listed, the run was
    deleted or started over, the checkpoint whose items it was reading went). The read is
    made again: it finds what is there now, never a mix of the two."""


def _nesting_refs(slot: Slot, state: RunState) -> tuple[str, ...]:
    """The refs of ``slot`` a read with items looks under: those the run object lists as
    having nested items, and those the slot's own append wrote nested items under (it
    lists them in the run object before its commit, but a read of the run object sent with
    the read of the slot may be served before that)."""
    return tuple(ref for ref in dict.fromkeys(slot.refs)
                 if state.may_nest(ref) or ref in slot.nests)


def _accepts(cached: _Cached, sequence: int, incarnation: str, now: float) -> bool:
    """Whether this process's knowledge admits the append without a LIST: it follows the
    latest sequence known, of the incarnation known, and a known checkpoint is live (so the
    run is). The create-only PUT of the slot still decides against other writers, and the
    run object read with it against a deleted or restarted run."""
    log, state = cached.log, cached.state
    return (
        log is not None
        and state is not None
        and sequence == log.latest + 1
        and sequence >= state.floor
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
            view.listing is None
            or (view.kind not in _NOT_HELD and is_live(view.listing.expires_at, now))
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
    finds a slot without its marker writes exactly the marker its writer would have. A
    tombstone's carries, as its token, what the tombstone names as its predecessor
    (``Slot.after``, see :func:`_listing_of`)."""
    if kind == "t":
        short = msgspec.structs.replace(listing, header=None, refs=False)
        return layout.marker_key(run_key, sequence, "t", short), b""
    key = layout.marker_key(run_key, sequence, "m", listing)
    if len((prefix + key).encode("utf-8")) <= layout.MAX_KEY_BYTES:
        return key, b""
    short = msgspec.structs.replace(listing, header=None)
    return layout.marker_key(run_key, sequence, "l", short), listing.header or b""


def _owned_of(cached: _Cached, log: _Log, owners: Iterable[int]) -> list[_ItemMarker]:
    """The markers of the items this process knows to be owned by ``owners``, from its log
    and its writes (removed by :func:`_owned_removals`: one another checkpoint took over
    since stays with it)."""
    found: list[_ItemMarker] = []
    for owner in owners:
        entry = log.held.get(owner)
        found += _owned_markers(cached, owner, [] if entry is None else entry.owned)
    return found


def _owned_markers(
    cached: _Cached | None, owner: int, listed: Iterable[_ItemMarker]
) -> list[_ItemMarker]:
    """The markers of the items ``owner`` owns, as a listing showed them (``listed``) and as
    this process wrote them: those carry the ETags of their items, and win."""
    markers = {marker.key: marker for marker in listed}
    if cached is not None:
        markers.update((marker.key, marker) for marker in cached.owned.get(owner, {}).values())
    return list(markers.values())


def _learn_owned(cached: _Cached, views: Iterable[_SlotView]) -> None:
    """Take the items a listing shows ``views`` own (tombstones, leftovers) as known to be
    owned by them: the append that prunes them removes those too."""
    for view in views:
        for marker in view.owned:
            cached.owned.setdefault(view.sequence, {}).setdefault(marker.hex_key, marker)


def _as_listed(current: _Run) -> _Run:
    """``current`` for a read, unless a slot it listed without its marker was gone when read
    for its listing: removed since the LIST (pruned, the run deleted), so the listing no
    longer shows the run, whose newest checkpoint may be one it did not list
    (:class:`_Superseded`)."""
    if any(view.gone for view in current.listed.slots.values()):
        raise _Superseded
    return current


def _written_over(listed: _SlotView, slot: Slot, etag: str) -> bool:
    """Whether ``slot`` (read with ``etag``) is another write than the one ``listed`` shows:
    the key was written again since the listing, and the markers of the items listed under
    it are another checkpoint's. The listing of the run shows the slot's ETag; that of its
    markers alone (``_read_at``) does not, and then no marker must carry its write token (a
    marker of an earlier release, with none, proves nothing)."""
    if listed.slot_etag is not None:
        return listed.slot_etag != etag
    if listed.missing or listed.marker is None:
        return False
    tokens = _marker_tokens(listed)
    return bool(tokens) and b"" not in tokens and slot.token not in tokens


def _marker_of_key(key: str) -> tuple[str, Listing] | None:
    """The kind and listing a checkpoint marker's or tombstone marker's key carries."""
    marker = key.rpartition("/")[2]
    listing = layout.parse_listing(marker[1:]) if marker[:1] in ("m", "l", "t") else None
    return None if listing is None else (marker[0], listing)


def _mixed(view: _SlotView) -> bool:
    """Whether a slot is listed with markers of more than one write: of two lives, or two
    checkpoint markers of different write tokens. One is then a leftover whose PUT landed
    after the slot it marked was removed (the run deleted, or pruned past it), beside a
    later slot at that key, and a listing would take the first in key order for the
    slot's: an ended life's marker would make a checkpoint of the run's life an ended
    life's leftover, which the cleanup loop removes. A tombstone's marker beside the
    checkpoint marker it replaced (a ``delete`` cut short) is no such case."""
    if view.slot_etag is None or view.marker is None or not view.extra:
        return False
    listings = _marker_listings(view)
    tokens = {listing.token for kind, listing in listings if kind != "t" and listing.token}
    return len(_lives(view)) > 1 or len(tokens) > 1


def _lone_leftovers(current: _Run) -> list[_SlotView]:
    """Slots listed below the head of the run's life with one marker, of another life, not
    told apart yet: an ended life's leftover (a start-over that stopped before removing
    it), or that life's marker whose PUT landed after its slot was removed, beside a slot
    of this life that has no marker of its own (its marker's PUT failed). Taken for the
    leftover, the checkpoint would be missing from listings and removed by the cleanup
    loop; :meth:`S3Store._read_mixed` tells them apart (1 GET each, a round trip after the
    run object's: neither is there in the steady state, where a life's writers replace
    every leftover below its head and an ended life's seal stands above it)."""
    if current.state is None:
        return []
    head = current.latest_sequence
    return [view for view in current.orphans
            if view.sequence < head and view.slot_etag is not None and view.marker is not None
            and not view.told_apart and not view.missing and view.listing is not None
            and view.listing.incarnation != current.state.incarnation]


def _marker_listings(view: _SlotView) -> list[tuple[str, Listing]]:
    found = [_marker_of_key(key) for key in (view.marker, *view.extra) if key is not None]
    return [marker for marker in found if marker is not None]


def _lives(view: _SlotView) -> set[str]:
    """The incarnations of the markers listed at a slot's key (a leftover's among them,
    see :func:`_mixed`)."""
    return {listing.incarnation for _, listing in _marker_listings(view)}


def _leftover_markers(view: _SlotView) -> list[str]:
    """The markers listed beside a checkpoint's own that are another write's, once its slot
    told them apart (see :func:`_mixed`): the cleanup loop removes them, so that listings
    stop reading the slot to tell them apart."""
    if view.listing is None or not view.told_apart:
        return []
    own = view.listing
    left = []
    for key in view.extra:
        found = _marker_of_key(key)
        if found is not None and (found[1].incarnation != own.incarnation or (
                found[0] != "t" and found[1].token and own.token
                and found[1].token != own.token)):
            left.append(key)
    return left


def _marks(key: str, slot: Slot) -> int:
    """Whether the marker at ``key`` is ``slot``'s own: 2 when it carries its token, 1 for
    one of an earlier release (no token: its life, checkpoint and kind tell), else 0."""
    found = _marker_of_key(key)
    if found is None:
        return 0
    kind, listing = found
    if (listing.incarnation != slot.incarnation or listing.checkpoint_id != slot.checkpoint_id
            or (kind == "t") != slot.tombstone):
        return 0
    if listing.token == _listing_of(slot).token:
        return 2
    return 1 if not listing.token else 0


def _marked(listed: _SlotView, slot: Slot) -> bool:
    """Whether a marker listed at the slot's key is ``slot``'s own (carries its write
    token): only that one makes a slot owning items a checkpoint. A marker of another write
    at the key (an ended life's, left by a removal stopped between the slots and their
    markers, or a taken-back create's whose removal failed) does not: the slot is pending."""
    return slot.token in _marker_tokens(listed)


def _marker_tokens(listed: _SlotView) -> set[bytes]:
    """The write tokens the checkpoint markers listed at a slot's key carry (empty bytes for
    a marker of an earlier release, which carries none)."""
    tokens: set[bytes] = set()
    for key in (listed.marker, *listed.extra):
        marker = "" if key is None else key.rpartition("/")[2]
        listing = layout.parse_listing(marker[1:]) if marker[:1] in ("m", "l") else None
        if listing is not None:
            tokens.add(listing.token)
    return tokens


def _listing_of(slot: Slot) -> Listing:
    """What a listing shows of ``slot``. A tombstone's token is what it names as its
    predecessor (``Slot.after``; empty in those of earlier releases, whose markers have no
    token): its own identifies no checkpoint, and an append right after it names that, so
    that the chain of predecessors goes through the deleted checkpoint (see
    ``S3Store._follows``)."""
    token = slot.after if slot.tombstone else slot.token
    return Listing(slot.incarnation, slot.checkpoint_id, slot.created_at, slot.expires_at,
                   slot.appended_at, slot.header, token, bool(slot.refs))


def _listing(view: _SlotView) -> Listing:
    assert view.listing is not None
    return view.listing


def _floor_of(current: _Run) -> int:
    return 0 if current.state is None else current.state.floor


def _entry_of(run_key: str, view: _SlotView, floor: int) -> _Entry:
    """A checkpoint a listing showed. Without its marker at or above the floor, it is no
    commit that landed late (those land below it only): its marker is written before the
    floor is raised over it (see ``S3Store._stands``)."""
    listing = _listing(view)
    bare = listing if view.missing and view.sequence >= floor else None
    unvouched = listing if view.missing and view.sequence < floor else None
    return _Entry(listing.expires_at, _prunable_keys(run_key, view), view.owned,
                  listing.token, bare, unvouched)


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
                listed.item_markers.append(_ItemMarker(entry.key, hex_key, meta, entry.etag))
        elif rest == "sweep/due":
            listed.sweep_due = entry.etag
        elif rest == "sweep/lease":
            listed.lease = entry.etag
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
    if marker.startswith("w"):
        _parse_owned(listed, view, entry, marker[1:])
        return
    listing = layout.parse_listing(marker[1:])
    if marker[0] not in "mlt" or listing is None:
        listed.stray.append(entry.key)
    elif view.marker is not None and not _buries(view, marker[0], listing):
        view.extra.append(entry.key)
    else:
        if view.marker is not None:
            view.extra.append(view.marker)
        view.marker, view.kind, view.listing = entry.key, marker[0], listing


def _buries(view: _SlotView, kind: str, listing: Listing) -> bool:
    """Whether a tombstone marker is the view's, over the marker it has: that of the same
    checkpoint, a ``delete`` stopped after the tombstone and before the batch removing the
    old marker (the slot is the tombstone now)."""
    known = view.listing
    return (kind == "t" and view.kind in ("m", "l") and known is not None
            and known.checkpoint_id == listing.checkpoint_id
            and known.incarnation == listing.incarnation)


def _parse_owned(listed: _Listed, view: _SlotView, entry: Listed, rest: str) -> None:
    """The marker of an item the view's checkpoint owns: ``<hex key>/<meta>``."""
    hex_key, _, encoded = rest.partition("/")
    meta = layout.parse_item_meta(encoded)
    if meta is None or meta.owner != view.sequence or layout.item_key_of(hex_key) is None:
        listed.stray.append(entry.key)
        return
    marker = _ItemMarker(entry.key, hex_key, meta, entry.etag)
    view.owned.append(marker)
    listed.item_markers.append(marker)


# -- the store ------------------------------------------------------------------------------------


@dataclass
class _Built:
    """A client the store created for one event loop, with what closes it."""

    io: Bucket
    stack: contextlib.AsyncExitStack


class S3Store(ExpiryCleanup):
    """Checkpoints in an S3 bucket (or an S3-compatible service) under a key prefix.

    Build it from a URL (``s3://bucket/prefix?region=...&endpoint_url=...``), from an
    aiobotocore ``session`` (the store then creates, owns and closes its clients), or around
    an existing ``client``, which it never closes and whose retry configuration it leaves
    alone. ``retry`` configures the clients the store creates.

    Runs on asyncio only (aiobotocore needs it); on trio every call raises
    :class:`ConfigurationError` before sending anything. A store that creates its clients
    creates one per event loop, so one store serves several ``asyncio.run()`` calls; a
    ``client`` passed in belongs to the loop it was first used in, and a call from another
    loop raises :class:`ConfigurationError` before sending anything.
    """

    nested_items = True
    sequence_guard = True
    appends_check_status_apart = True
    """An append reports the run's status from a GET sent beside its slot, not read in the
    same atomic step: the manager guards the status changes that record the run's newest
    sequence (a failure), see "Guarded status changes" in docs/stores/s3.md."""

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
        self._session = session
        self._endpoint = AwsEndpoint.from_query(
            {"region": region or "", "endpoint_url": endpoint_url or ""}
        )
        self._retry = retry if retry is not None else RetryPolicy()
        self._given: Bucket | None = None if client is None else Bucket(
            client, bucket, self._prefix)
        self._given_loop = GivenClientLoop(
            _STORE, _DRIVER, "Create the client in this loop, or let the store create its own "
            "(open_store(url) or S3Store(bucket, session=...)): it creates one per event loop")
        self._built: PerLoop[_Built] = PerLoop(
            self._build, _close_built, store=_STORE, driver=_DRIVER)
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._refs: OrderedDict[tuple[str, int, str], frozenset[str]] = OrderedDict()
        self._verdicts: OrderedDict[tuple[str, str, str], str] = OrderedDict()

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
        check_options("the s3:// store URL", query, _URL_OPTIONS)
        check_options("S3Store.from_url", options, _KEYWORD_OPTIONS)
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
        """The client in use in this event loop (created on first use unless one was given)."""
        return (await self._objects()).client

    async def _objects(self) -> Bucket:
        if self._given is None:
            return (await self._built.get()).io
        self._given_loop.check()
        return self._given

    async def _build(self) -> _Built:
        stack = contextlib.AsyncExitStack()
        client = await open_client(
            stack, "s3", self._endpoint, self._retry, session=self._session
        )
        return _Built(Bucket(client, self._bucket_name, self._prefix), stack)

    async def aclose(self) -> None:
        await self._built.aclose()

    # -- provisioning -----------------------------------------------------------------------

    @holds_clients
    async def provision(self, *, backstop_days: int | None = None) -> list[str]:
        """Create what is missing: the bucket, versioning, AES256 default encryption (a
        bucket's own default encryption is kept) and the lifecycle rules of
        :func:`lifecycle_rules` (rules of others are kept). Idempotent.

        Returns one line per thing checked, saying what was done: ``"created ..."``,
        ``"enabled ..."``, ``"updated ..."`` (a rule of ours with other settings),
        ``"removed ..."`` (the backstop rule, when ``backstop_days`` is no longer given, or a
        rule of this prefix under the fixed id of earlier versions) or ``"found ..."`` (in
        place already).
        """
        io = await self._objects()
        rules = lifecycle_rules(self._prefix, backstop_days=backstop_days)
        ours = own_rules(("fastcheckpoint-noncurrent", "fastcheckpoint-backstop"), self._prefix)
        return await provision_bucket(io.client, self._bucket_name, rules, retired=ours)

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
            cached.raised_floor = -1
        cached.etag, cached.state = etag, state

    def _adopt(self, run_key: str, current: _Run, known_from: int) -> None:
        """Take what a listing showed as this process's knowledge of the run's log."""
        if current.state is None or current.etag is None or current.damage is not None:
            self._forget(run_key)
            return
        # The pair (ETag, state) is consistent even if older than the cache's: re-set it, as
        # another task may have dropped the run since the listing was read.
        self._remember(run_key, current.etag, current.state)
        cached = self._cached(run_key)
        if cached.log is not None and cached.log.latest > current.latest_sequence:
            return  # an append of ours finished after that listing was taken: keep the newer
        log = _Log(current.latest_sequence, {}, {}, known_from, unsure_below=known_from > 0)
        for view in current.held:
            log.add(view.sequence, _entry_of(run_key, view, _floor_of(current)))
        for view in (*current.tombstones, *current.orphans):
            log.garbage[view.sequence] = _prunable_keys(run_key, view)
        _learn_owned(cached, (*current.tombstones, *current.orphans))
        log.pending = {view.sequence: view.listing.token for view in current.pending
                       if view.listing is not None}
        log.buried = {view.sequence: view.listing.token for view in current.tombstones[-1:]
                      if view.listing is not None and view.listing.token}
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
        state = layout.decode_run_of(found[0], io.where(key), run_key=run_key)
        self._remember(run_key, found[1], state)
        return state, found[1]

    async def _load(self, io: Bucket, run_key: str) -> _Run:
        """The whole run: one LIST per 1,000 objects (+ the run object unless cached; + 1
        LIST confirming it after a listing of several pages, see :meth:`_confirmed`)."""
        for _ in range(self._retry.max_retries + 1):
            entries = await io.list(layout.run_prefix(run_key))
            listed = _parse_run_listing(run_key, entries)
            if len(entries) <= PAGE or await self._confirmed(io, run_key, listed):
                return await self._resolve(io, run_key, listed)
        raise _changing(run_key)

    async def _confirmed(self, io: Bucket, run_key: str, listed: _Listed) -> bool:
        """Whether a listing of several pages shows the run as it was at one moment: the
        run object still has the ETag its first page showed. S3 deletes the keys of a
        ``DeleteObjects`` batch one by one, so a later page may show some of a run's keys
        gone that an earlier one listed whole; ``delete_run`` removes the run object before
        anything else, so it is gone by then. Gone now: the listing is taken as the run's
        leftovers (no run). Changed: False, list again."""
        if listed.run_etag is None:
            return True
        etag = await self._run_etag(io, run_key)
        if etag is None:
            listed.run_etag = None
        return etag is None or etag == listed.run_etag

    async def _load_as_listed(self, io: Bucket, run_key: str) -> _Run:
        """The whole run, for a read: :class:`_Superseded` when a slot listed without its
        marker was removed before it was read (see :func:`_as_listed`)."""
        return _as_listed(await self._load(io, run_key))

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

        def satisfied(entries: list[Listed]) -> bool:
            last = entries[-1].key
            if last != run_object and not last.startswith(slots):
                return True  # past the slots: only item markers follow
            return enough(cut(entries, False)[0])

        if before is None and first < PAGE:
            # A small first page for the newest few; when it is not enough, list again from
            # the start in whole pages rather than go on from it: one page shows the run at
            # one moment, two pages may not (see _confirmed), and this costs the same LISTs.
            entries, ended = await io.scan(prefix, first=first, until=lambda _: True)
            if not entries:
                return _Listed(), 0
            if ended or satisfied(entries):
                return cut(entries, ended)
            first = PAGE

        pages = [1]

        def until(entries: list[Listed]) -> bool:
            if satisfied(entries):
                return True
            pages[0] += 1
            return False

        for _ in range(self._retry.max_retries + 1):
            pages[0] = 1
            entries, ended = await io.scan(prefix, start_after=start_after, first=first,
                                           until=until)
            if not entries:
                return _Listed(), 0
            listed, known_from = cut(entries, ended)
            if pages[0] == 1 or before is not None or await self._confirmed(io, run_key,
                                                                            listed):
                return listed, known_from
        raise _changing(run_key)

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
        mixed = [view for view in listed.slots.values() if _mixed(view)]
        state, _ = await pair(
            functools.partial(_damage_as_value, self._state, io, run_key, listed.run_etag),
            functools.partial(gather, [
                *[functools.partial(self._read_bare, io, run_key, view) for view in bare],
                *[functools.partial(self._read_mixed, io, run_key, view) for view in mixed]]),
        )
        if isinstance(state, CorruptCheckpointError):
            logger.warning("run object %s is damaged (%s): its checkpoints are read as active "
                           "and it refuses changes until it is rebuilt (rebuild_run)",
                           state.key, state)
            return _Run.damaged(listed, state)
        current = _Run(None if state is None else state[0], None if state is None else state[1],
                       listed)
        suspects = _lone_leftovers(current)
        if suspects:
            await gather([functools.partial(self._read_mixed, io, run_key, view)
                          for view in suspects])
            bare += suspects
        unreadable = next((view.damage for view in bare if view.damage is not None), None)
        if unreadable is not None:
            # Its listing is unknown, so the run's head is: writing could reuse its sequence
            # or hide it. The other checkpoints stay readable.
            logger.warning("checkpoint %s has no marker and cannot be read (%s): the run "
                           "refuses changes until it is repaired (rebuild_run)",
                           unreadable.key, unreadable)
        return _Run(None if state is None else state[0], None if state is None else state[1],
                    listed, unreadable)

    async def _read_mixed(self, io: Bucket, run_key: str, view: _SlotView) -> None:
        """A slot listed with the markers of more than one write (see :func:`_mixed`): its
        own is the one its body matches (one GET). None of them: read as a slot without
        its marker (:meth:`_read_bare`, one GET more)."""
        key = layout.slot_key(run_key, view.sequence)
        found = await io.get(key)
        if found is None or found[1] != view.slot_etag:
            return  # removed or written again since the listing: as for any slot listed
        try:
            slot = layout.decode_slot(found[0], io.where(key), run_key=run_key,
                                      sequence=view.sequence)
        except CorruptCheckpointError:
            return  # which marker is its own, nobody can tell: as listed
        markers = [key for key in (view.marker, *view.extra) if key is not None]
        best = max(markers, key=lambda key: _marks(key, slot))
        own = best if _marks(best, slot) else None
        view.extra = [key for key in markers if key != own]
        view.told_apart = True
        if own is None:
            view.marker, view.kind, view.listing = None, "", None
            await self._read_bare(io, run_key, view)
            return
        found_marker = _marker_of_key(own)
        assert found_marker is not None
        view.marker, (view.kind, view.listing) = own, found_marker

    async def _read_bare(self, io: Bucket, run_key: str, view: _SlotView) -> None:
        """A slot without a marker (its writer stopped between the two PUTs, or is between
        them right now): read its listing from the slot itself."""
        key = layout.slot_key(run_key, view.sequence)
        found = await io.get(key)
        if found is None:
            view.slot_etag = None
            view.gone = True
            return
        try:
            slot = layout.decode_slot(found[0], io.where(key), run_key=run_key,
                                      sequence=view.sequence)
        except CorruptCheckpointError as exc:
            view.damage = exc
            return
        if (slot.guards or slot.owns) and found[1] != view.slot_etag:
            # Written again since the listing (the run started over, a guard renewed): the
            # listing no longer shows the run; a read is made again (see _as_listed).
            view.slot_etag = None
            view.gone = True
            return
        if slot.guards:
            # A status change's guard: no checkpoint, and no marker to write for it.
            view.kind, view.listing, view.guards = "g", _listing_of(slot), slot.guards
            return
        if slot.owns and not slot.tombstone:
            # Pending: its writer has not written all it owns yet (or was killed before it
            # did); its marker, written after them, makes it a checkpoint.
            view.kind, view.listing = "p", _listing_of(slot)
            return
        self._remember_refs(run_key, view.sequence, found[1], slot)
        view.kind = "t" if slot.tombstone else "m"
        view.listing = _listing_of(slot)
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
            refs=slot.refs,
        )

    # -- checkpoint log -------------------------------------------------------------------------

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
        check_run_key(run_key)
        check_time("now", now)
        return await self._append(run_key, record, run, keep_latest, now, ())

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
        shared, owned = _appended_items(record, items)
        nests = nesting_under(record.refs, items)
        io = await self._objects()
        cached = self._cache.get(run_key)
        if cached is None or not _accepts(cached, record.sequence, run.incarnation, now):
            cached = await self._prepare(io, run_key, record, run, keep_latest, now, nests)
        assert cached.state is not None
        log = cached.log
        after = b"" if log is None else log.named_before(record.sequence)
        slot = Slot(cached.state.incarnation, record.sequence, record.checkpoint_id,
                    record.created_at, record.expires_at, now, record.header, record.payload,
                    token=secrets.token_bytes(_TOKEN_BYTES), run_key=run_key,
                    refs=tuple(record.refs), nests=nests, owns=bool(owned),
                    after=after)
        if not all(cached.state.may_nest(key) for key in nests):
            cached = await self._note_nesting(io, run_key, slot, now)
        write = self._write(io, run_key, cached, slot, shared, owned, keep_latest, now)
        if shared:
            write = self._swept_if_failed(io, run_key, write)
        # With owned items a cancellation waits for every request (settled): the commit
        # lands before them, and a checkpoint must never stand without them. Otherwise it
        # cuts the call short where it is, as the caller's deadline asks: stopped before the
        # commit the run is as it was (shared items written by then wait for a sweep),
        # after it the checkpoint stands and its pruning is finished by the next append.
        return await (settled(write) if owned else write)

    async def _swept_if_failed(self, io: Bucket, run_key: str, write: Awaitable[str]) -> str:
        try:
            return await write
        except CheckpointError:
            # Its shared items may be in place, named by nothing: the next sweep removes
            # them (best effort: when this fails too, they wait for the run's deletion).
            await self._ask_for_sweep(io, run_key)
            raise

    async def _write(
        self,
        io: Bucket,
        run_key: str,
        cached: _Cached,
        slot: Slot,
        shared: dict[str, Item],
        owned: dict[str, Item],
        keep_latest: int | None,
        now: float,
    ) -> str:
        """The append, once this process's knowledge admits it: two round trips (see
        "Requests per operation" in ``docs/stores/s3.md``)."""
        state, log, etag = cached.state, cached.log, cached.etag
        assert state is not None
        assert log is not None
        assert etag is not None
        # The shared items first, in a round trip of their own: a checkpoint is committed
        # only once every value it writes is in place, so a writer stopped between the two
        # (cancelled, killed) never leaves a committed checkpoint that reads as damaged.
        # Each is named by its key, so one written by an append that then loses the
        # sequence is the value the winner names too (and one named by no checkpoint goes
        # with the next sweep).
        written = _SharedWrite() if not shared else await self._put_shared(
            io, run_key, slot, shared, now)
        for _ in range(_GUARD_BREAKS):
            # The commit (create-only at the sequence: the check against other writers) and,
            # in the same round trip, the check against the run: is its object still the one
            # this process knows? An unchanged one costs a 304 without a body.
            (written_etag, resent), seen = await pair(
                functools.partial(self._commit, io, run_key, slot),
                functools.partial(_error_as_value, io.get_if_changed,
                                  layout.run_object(run_key), etag),
            )
            slot_etag = written_etag if written_etag is not None else await self._taken(
                io, run_key, slot, keep_latest, now, resent=resent)
            if not isinstance(slot_etag, _Broken):
                break
            # A status change's guard held the sequence: broken, its key is free again.
            etag, state = slot_etag.etag, slot_etag.state
        else:
            raise ConflictError(
                f"run {run_key}: status changes guarded by its newest checkpoint kept taking "
                f"sequence {slot.sequence} while checkpoint {slot.checkpoint_id} was appended; "
                "nothing was written, append it again")
        if isinstance(slot_etag, _Deleted):
            # Acknowledged, never written again: another process deleted it, as it may
            # delete any checkpoint once written. Its shared items are named by nothing.
            if shared:
                await self._ask_for_sweep(io, run_key)
            return slot_etag.status or state.status
        status = await self._confirm(io, run_key, slot, slot_etag, seen, state, keep_latest, now,
                                     resent=resent)
        checked = seen[1] if isinstance(seen, tuple) else etag
        prune = functools.partial(self._prune, io, run_key, cached, log, slot, keep_latest, now)
        if slot.refs or owned:
            entry = await self._complete(
                io, run_key, cached, slot, slot_etag, owned, written,
                functools.partial(self._landed_and_followed, io, run_key, slot, checked,
                                  resent, keep_latest),
                now)
            # Pruning only once the append is sure to stand: its items may still fail, and
            # a checkpoint taken back must not have pruned the ones it replaced.
            await prune()
        else:
            # Pruning only now: keys this process knows may belong to a newer run if the
            # run was started over, and the check above has just ruled that out. Beside it,
            # the check after the commit: pruning may not wait for it (a round trip more),
            # and need not: refused, the slot landed below a floor another process raised,
            # so that process's newest checkpoints are above it, and what this pruning
            # removes (below this process's older view of the run) is older than those.
            raised = cached.raised_floor  # by an earlier append of this process, if any
            (entry, above), _ = await pair(
                functools.partial(pair, functools.partial(self._write_marker, io, run_key, slot),
                                  functools.partial(self._landed_above_floor, io, run_key, slot,
                                                    checked)),
                prune)
            if above is False:
                # This append's own pruning raised the floor above the slot (from the run
                # object the commit's check accepted: no other floor came between), or
                # another append did: another process's, or another of this process's at
                # the same sequence (whose raise was before this one's pruning).
                own = cached.raised_floor != raised and cached.raised_floor == slot.sequence + 1
                above = own or await self._follows(io, run_key, slot.sequence,
                                                    _listing_of(slot), resent, keep_latest)
            if above is not True:
                await self._refuse_landed(io, run_key, slot, slot_etag, above, owned={})
        log.latest = max(log.latest, slot.sequence)
        log.garbage.pop(slot.sequence, None)  # a leftover our slot replaced: its key is ours now
        log.add(slot.sequence, entry)
        log.trim(_LOG_SPARE + (keep_latest or 0))
        return status

    async def _complete(
        self,
        io: Bucket,
        run_key: str,
        cached: _Cached,
        slot: Slot,
        slot_etag: str,
        owned: dict[str, Item],
        shared: _SharedWrite,
        landed: Callable[[], Awaitable[bool | CheckpointError]],
        now: float,
    ) -> _Entry:
        """The round trips of an append with items after its commit: the owned items (only
        now: a slot that lost its sequence must not have written items the winner owns),
        the check of the run object after the commit (``landed``, see
        :meth:`_landed_above_floor`) and the check against a sweep of the shared items the
        checkpoint names or nests under what it names (``shared``: those it wrote or found
        in place); the marker with them,
        or, when the checkpoint owns items, once they are all written: until then its slot
        is *pending* (``Slot.owns`` without a marker), which readers leave out, so a writer
        stopped (killed) before its items leaves no checkpoint read without them. When the
        items fail, or a sweep is deleting or removed what the checkpoint relies on, the slot
        is taken back, with the items it created nested under what it names."""
        marked = None if owned else functools.partial(self._write_marker, io, run_key, slot)
        (entry, above), (markers, allowed) = await pair(
            functools.partial(pair, marked or _nothing, landed),
            functools.partial(
                pair,
                functools.partial(_error_as_value, self._put_owned, io, run_key, slot, owned,
                                  now),
                functools.partial(_error_as_value, self._sweep_allows, io, run_key, slot.refs,
                                  shared.etags),
            ),
        )
        if above is False:
            await self._refuse_landed(io, run_key, slot, slot_etag, above, owned=owned)
        failure = next((found for found in (above, markers, allowed)
                        if isinstance(found, CheckpointError)), None)
        refused = failure is None and allowed is False
        if refused:
            failure = SharedItemGone(
                f"a cleanup of run {run_key} is removing (or removed) shared items checkpoint "
                f"{slot.checkpoint_id} names; nothing was written: append it again with "
                "their values")
        if failure is None and entry is None:
            # The marker is what makes a pending slot a checkpoint (no one writes it for
            # it): a create whose marker is not known to be written is not acknowledged.
            marked_now = await _error_as_value(self._write_marker, io, run_key, slot, True)
            if isinstance(marked_now, CheckpointError):
                failure = marked_now
            else:
                entry = marked_now
        if failure is None:
            assert isinstance(markers, dict)
            assert entry is not None
            if markers:
                cached.owned[slot.sequence] = markers
            return entry
        if not await self._withdraw(io, run_key, slot, slot_etag):
            raise _left_standing(run_key, slot, failure) from failure
        marker = _marker_of(io.prefix, run_key, slot.sequence, "m", _listing_of(slot))[0]
        nested = _created_under(slot.refs, shared) if refused else {}
        await gather([
            functools.partial(_forget_keys, io, [marker]),
            functools.partial(self._withdraw_owned, io, run_key, slot, owned),
            functools.partial(_forget_created, io, run_key, nested),
        ])
        raise failure

    async def _commit(self, io: Bucket, run_key: str, slot: Slot) -> tuple[str | None, bool]:
        """Write the slot create-only; its ETag, or None when the key is taken (see
        :meth:`_taken`), and whether the PUT was sent again after a send whose answer was not
        heard (a botocore retry or an aiohttp resend): the answer may then be to a copy sent
        after the first was applied."""
        key = layout.slot_key(run_key, slot.sequence)
        with counting_sends() as sends:
            try:
                written = await io.put(key, layout.encode(slot), if_none_match=True)
            except StoreError as exc:
                # Applied or not: a reply lost and every retry refused leaves it unknown. The
                # create fails, so it must not leave a checkpoint a retrying caller would
                # repeat.
                if not await self._withdraw(io, run_key, slot):
                    raise _left_standing(run_key, slot, exc) from exc
                raise
        return written, sends.resent

    async def _landed_above_floor(
        self, io: Bucket, run_key: str, slot: Slot, etag: str
    ) -> bool | CheckpointError:
        """The check of the run object read after the commit's answer (``etag``: the one the
        check sent with the commit accepted). That one may have been answered before the
        slot landed: a PUT held in the network (or sent again after an unheard send) can
        land after another process took the sequence, appended past it and pruned it, in
        the key the pruning freed; the slot would then be acknowledged with the checkpoint
        id that process was given. Every pruning raises the run's floor above the keys it
        frees before it frees them, so a floor still at or below the slot, read now, clears
        it (so does a run deleted since: the create is ordered before the delete): True. A
        floor above it (False) is also what a pruning or cleanup raising it over this very
        slot leaves, this append's own pruning included: :meth:`_follows` tells them apart.
        Or the error that kept the run object from being read."""
        seen = await _error_as_value(io.get_if_changed, layout.run_object(run_key), etag)
        if seen is UNCHANGED or seen is None:
            return True
        if isinstance(seen, CheckpointError):
            return seen
        try:
            current = layout.decode_run_of(seen[0], io.where(layout.run_object(run_key)),
                                           run_key=run_key)
        except CorruptCheckpointError as exc:
            return exc
        return current.incarnation != slot.incarnation or slot.sequence >= current.floor

    async def _landed_and_followed(
        self, io: Bucket, run_key: str, slot: Slot, etag: str, resent: bool,
        keep_latest: int | None,
    ) -> bool | CheckpointError:
        """:meth:`_landed_above_floor`, and where it finds the floor above the slot,
        :meth:`_follows` (a round trip more, on that rare path only)."""
        above = await self._landed_above_floor(io, run_key, slot, etag)
        if above is not False:
            return above
        return await self._follows(io, run_key, slot.sequence, _listing_of(slot), resent,
                                   keep_latest)

    async def _follows(
        self, io: Bucket, run_key: str, sequence: int, slot: Listing, resent: bool,
        keep_latest: int | None,
    ) -> bool | CheckpointError:
        """:meth:`_told`, without whether a False holds for good."""
        return (await self._told(io, run_key, sequence, slot, resent, keep_latest))[0]

    async def _told(
        self, io: Bucket, run_key: str, sequence: int, slot: Listing, resent: bool,
        keep_latest: int | None,
    ) -> tuple[bool | CheckpointError, bool]:
        """Whether the run goes on from the slot at ``sequence`` (``slot``: what a listing
        shows of it), whose key lies below the run's floor now:
        True when no slot of its life stands above it (the floor was raised over it as the
        newest; an ended life's seal may stand above until this life reaches it), the slot
        after it was written after it (it names its token: a tombstone too, which carries
        what the slot it replaced named), or is a guard standing as the newest; False when
        that slot follows another checkpoint (the key's earlier occupant). When that slot is
        gone while newer ones stand, the lowest of them tells (one GET more): it names this
        slot only through the tombstones of checkpoints deleted after it (see
        ``Slot.after``), which pruning removed since; any other removal (pruning, expiry)
        breaks the chain, and a key freed so may be the one this slot landed in (False).
        One LIST (of the newest keys) and one GET, sent together, on this rare path only. A
        PUT sent again after an unheard send (``resent``) whose first send landed, was
        built on and was pruned since brings back that very checkpoint, and the next slot
        names its token all the same: after a resend, ``keep_latest`` (this process's) or
        more slots above it mean it may have been pruned so (False). No other checkpoint's
        id is given to it either way.

        Why a slot naming this one proves it landed first: had it landed late in a freed
        key, only a writer that listed the run after it landed could know its random
        token, and such a writer proposes a sequence above the one right after it (once a
        key is freed the floor is above it, and the key after it is taken, or below the
        floor, until the floor is above that one too). A slot names the token of the slot
        before it, or what the tombstone before it carries, itself copied from the slot
        that tombstone replaced: by induction, never a late slot's token."""
        page = 8  # the newest keys: room for a few ended lives' seals (slot and marker each)
        following = sequence + 1
        found = await _error_as_value(
            pair, functools.partial(io.list, layout.slots_prefix(run_key), limit=page),
            functools.partial(io.get, layout.slot_key(run_key, following)))
        if isinstance(found, CheckpointError):
            return found, False
        newest, after = found
        listed = _parse_run_listing(run_key, newest)
        standing = [view.sequence for view in listed.slots.values()
                    if view.slot_etag is not None
                    and (view.listing is None or slot.incarnation in _lives(view))]
        if not standing and len(newest) >= page:
            return False, False  # only other lives' slots listed: where its head is, unknown
        head = max(standing, default=-1)
        if head <= sequence:
            return True, False
        if after is None:
            own = listed.slots.get(sequence)
            if own is None or own.slot_etag is None:
                return False, False  # the slots between it and the head are not all listed
            # Gone while newer ones stand: the lowest of them (all of them listed, as this
            # slot is) names what came before it through the deleted checkpoints.
            following = min(above for above in standing if above > sequence)
            after = await _error_as_value(io.get, layout.slot_key(run_key, following))
            if isinstance(after, CheckpointError):
                return after, False
            if after is None:
                return False, False
        try:
            occupant = layout.decode_slot(after[0], io.where(layout.slot_key(run_key, following)),
                                          run_key=run_key, sequence=following)
        except CorruptCheckpointError as exc:
            return exc, False  # which slot it follows, nobody can tell: not "the run ends"
        if occupant.guards:
            # A status change's guard, no checkpoint. Standing as the newest, right after
            # this slot, it shows that no checkpoint came after it: a pruning that freed
            # this key had one above it, and the newest is never removed outright (nor is a
            # key a guard could take while a checkpoint holds it).
            return head == following == sequence + 1, False
        if occupant.after != slot.token:
            return False, True
        return not resent or keep_latest is None or head - sequence < keep_latest, False

    async def _refuse_landed(
        self,
        io: Bucket,
        run_key: str,
        slot: Slot,
        slot_etag: str,
        above: bool | CheckpointError,
        *,
        owned: dict[str, Item],
    ) -> None:
        """Raise for a create whose check after the commit (:meth:`_landed_above_floor`)
        did not accept it. Below the floor, the slot and what it wrote are taken back, also
        when another writer appended after it (that writer's checkpoint follows the one
        whose key this slot took): the outcome is unknown, as it may have been applied and
        pruned since. A check that could not be read (an append without items: its
        pruning ran beside the check and may have removed what the slot replaced) leaves
        the slot, and the outcome is unknown too."""
        if isinstance(above, CheckpointError):
            raise StoreUnavailableError(
                f"outcome unknown: checkpoint {slot.checkpoint_id} (run {run_key}, sequence "
                f"{slot.sequence}) was written, but the run could not be read after it to "
                f"check that no pruning had freed its key ({above}): read the run before "
                "creating it again") from above
        marker = _marker_of(io.prefix, run_key, slot.sequence, "m", _listing_of(slot))[0]
        await gather([
            functools.partial(_take_back, io, run_key, slot, slot_etag),
            functools.partial(_forget_keys, io, [marker]),
            functools.partial(self._withdraw_owned, io, run_key, slot, owned),
        ])
        raise StoreUnavailableError(
            f"outcome unknown: checkpoint {slot.checkpoint_id} (run {run_key}, sequence "
            f"{slot.sequence}) landed while another process pruned the run past that "
            "sequence: it may have been applied and pruned since, or have landed after the "
            "pruning freed its key (its request held in the network, or sent again after a "
            "lost reply). It was taken back and not written again: read the run before "
            "creating it again")

    async def _ours(self, io: Bucket, run_key: str, slot: Slot) -> str | None:
        """The ETag of ``slot``'s key if it holds this very write (its token): a write that
        was applied although its reply was lost, found by the retry's 412."""
        found = await self._own_write(io, run_key, slot)
        return found if isinstance(found, str) else None

    async def _own_write(self, io: Bucket, run_key: str, slot: Slot) -> str | bool | None:
        """What ``slot``'s key holds of this very write: its ETag when it holds the slot
        (its token), True when it holds the tombstone of a delete that replaced it."""
        key = layout.slot_key(run_key, slot.sequence)
        found = await io.get(key)
        if found is None:
            return None
        try:
            stored = layout.decode_slot(found[0], io.where(key), run_key=run_key,
                                        sequence=slot.sequence)
        except CorruptCheckpointError:
            return None  # not ours: ours decodes
        if stored.token == slot.token:
            return found[1]
        if stored.tombstone and stored.replaced == slot.token:
            return True
        return None

    async def _withdraw(
        self, io: Bucket, run_key: str, slot: Slot, etag: str | None = None
    ) -> bool:
        """Best effort, for a create that fails: remove its slot if it was written (``etag``
        if known). Unless another writer appended after it meanwhile: then the slot is part
        of the run's history, and removing it would leave a gap. Whether the slot is gone."""
        key = layout.slot_key(run_key, slot.sequence)
        try:
            ours = etag if etag is not None else await self._ours(io, run_key, slot)
            if ours is None:
                return True  # never written
            if not await self._appended_after(io, run_key, slot.sequence):
                await io.delete_if(key, ours)
                return True
            why = "another writer appended after it"
        except CheckpointError as exc:
            why = str(exc)
        logger.warning("a failed create left checkpoint %s behind at %s: %s",
                       slot.checkpoint_id, io.where(key), why)
        return False

    async def _appended_after(self, io: Bucket, run_key: str, sequence: int) -> bool:
        """Whether a slot stands at ``sequence + 1``. A guard there (a slot without marker
        that reads as one) is no append: it is broken, so that its change, guarded by the
        slot at ``sequence``, cannot apply once that slot is taken back."""
        after = layout.slot_key(run_key, sequence + 1)
        listed = await io.list(after, limit=2)
        if [entry.key for entry in listed] != [after]:
            return bool(listed)  # nothing there, or a slot with its marker
        found = await io.get(after)
        if found is None:
            return False
        try:
            occupant = layout.decode_slot(found[0], io.where(after), run_key=run_key,
                                          sequence=sequence + 1)
        except CorruptCheckpointError:
            return True
        if not occupant.guards:
            return True  # a checkpoint whose writer has not written its marker yet
        await self._break_guard(io, run_key, sequence + 1, found[1], occupant.guards)
        return False

    async def _confirm(
        self,
        io: Bucket,
        run_key: str,
        slot: Slot,
        slot_etag: str,
        seen: tuple[bytes, str] | Unchanged | CheckpointError | None,
        state: RunState,
        keep_latest: int | None,
        now: float,
        *,
        resent: bool = False,
    ) -> str:
        """Accept the committed slot if the run object (``seen`` in the commit's round trip)
        is still of the slot's incarnation, with the slot at or above its floor, and return
        the run's status; otherwise take the slot back and refuse: an acknowledged
        checkpoint is always one readers find, at a sequence never handed out before."""
        current: RunState | None = state
        if isinstance(seen, CheckpointError):
            # Unchecked: a create that fails leaves no checkpoint behind (if it can).
            if not await self._withdraw(io, run_key, slot, slot_etag):
                raise _left_standing(run_key, slot, seen) from seen
            raise seen
        if seen is None:
            current = None
        elif seen is not UNCHANGED:
            try:
                current = layout.decode_run_of(seen[0], io.where(layout.run_object(run_key)),
                                               run_key=run_key)
            except CorruptCheckpointError as exc:
                if not await self._withdraw(io, run_key, slot, slot_etag):
                    raise _left_standing(run_key, slot, exc) from exc
                raise
            self._remember(run_key, seen[1], current)  # the LIST below need not read it again
        if (
            current is not None
            and current.incarnation == slot.incarnation
            and slot.sequence >= current.floor
        ):
            return current.status  # at most its status, data or floor changed
        # Deleted, or deleted and started over, since this process last read it; or another
        # process pruned past what this one knew, and the slot's key had been freed.
        await _take_back(io, run_key, slot, slot_etag)
        if resent:
            # The PUT was sent again: the first may have been applied, to the run as it was.
            raise _outcome_unknown(run_key, slot, "deleted the run or pruned it")
        run, known_from = await self._head(io, run_key, live_wanted=keep_latest or 1, now=now)
        self._adopt(run_key, run, known_from)
        raise run.conflict(now)

    async def _prepare(
        self,
        io: Bucket,
        run_key: str,
        record: StoredCheckpoint,
        seed: RunRecord,
        keep_latest: int | None,
        now: float,
        nests: Sequence[str] = (),
    ) -> _Cached:
        """What this process knows does not admit the append: list the run's head, then
        accept, refuse (``SequenceConflict``), join a run being created, or start the run
        over (a run object written on the way lists ``nests``, see :meth:`_note_nesting`)."""
        current, known_from = await self._head(io, run_key, live_wanted=keep_latest or 1, now=now)
        if current.damage is not None:
            raise current.damage
        self._adopt(run_key, current, known_from)
        sequence = record.sequence
        mine = current.state is not None and seed.incarnation == current.state.incarnation
        if current.live(now):
            if sequence != current.next_sequence or not mine:
                raise current.conflict(now)
            return self._cached(run_key)
        if current.being_created():
            # Its creator may have crashed before the first slot: whoever comes next writes
            # that slot in the creator's incarnation (and the index entries it may lack), at
            # once. If the creator is alive, the slot's create-only PUT decides between them.
            if sequence != 0 or not mine:
                raise current.conflict(now)
            await self._join(io, run_key, current, now, nests)
            return self._cached(run_key)
        if sequence != 0:
            raise current.conflict(now)
        # A dead or absent run: _head listed all of it, leftovers included.
        state, etag = await self._start_over(io, run_key, current, seed, now, nests)
        self._remember(run_key, etag, state)
        cached = self._cached(run_key)
        cached.log = _Log(-1, {}, {}, 0)
        cached.owned = {}
        return cached

    async def _join(
        self, io: Bucket, run_key: str, current: _Run, now: float, nests: Sequence[str]
    ) -> None:
        """Finish a run's creation for its creator: write the index entries it may lack, and
        touch the run object (compare-and-set ``updated_at``), so that a cleanup worker that
        judged the creation abandoned cannot remove it under this append."""
        assert current.state is not None
        assert current.etag is not None
        touched = layout.nesting_after(
            msgspec.structs.replace(current.state, updated_at=now), nests)
        etag = await io.put(layout.run_object(run_key), layout.encode(touched),
                            if_match=current.etag)
        if etag is None:
            raise (await self._load(io, run_key)).conflict(now)
        self._remember(run_key, etag, touched)
        await gather([functools.partial(io.put, key, b"")
                      for key in layout.index_keys(run_key, touched)])

    async def _start_over(
        self, io: Bucket, run_key: str, current: _Run, seed: RunRecord, now: float,
        nests: Sequence[str],
    ) -> tuple[RunState, str]:
        """Take the run key for a new run: compare-and-set the run object, then clear the
        leftovers of the previous run (checkpoints, owned items, index entries)."""
        state = layout.nesting_after(
            RunState(seed.run_id, seed.incarnation, layout.check_status(seed.status),
                     seed.created_at, now, seed.version, seed.data, labels=seed.labels), nests)
        if current.state is not None and not await self._seal(io, run_key, current, now):
            raise (await self._load(io, run_key)).conflict(now)  # it lives again
        key = layout.run_object(run_key)
        etag = await io.put(key, layout.encode(state), if_none_match=current.etag is None,
                            if_match=current.etag)
        if etag is None:
            etag = await self._written(io, run_key, state)
        if etag is None:
            raise (await self._load(io, run_key)).conflict(now)
        self._remember(run_key, etag, state)
        views = [view for view in current.listed.slots.values() if not _fresh_seal(view, now)]
        leftovers = [key for view in views for key in _own_markers(view)]
        leftovers += current.listed.stray
        owned = [marker for marker in current.listed.item_markers if marker.meta.owner is not None]
        if current.state is not None:
            leftovers += layout.index_keys(run_key, current.state)
        # Shared items stay (as unowned items do) until a sweep finds them named by none of
        # the new run's checkpoints.
        await gather([
            functools.partial(_delete_leftovers, io, run_key, views, leftovers),
            functools.partial(_remove_marked, io, run_key, owned, current.listed),
            functools.partial(_put_empty, io, layout.index_keys(run_key, state)),
            functools.partial(self._ask_for_sweep, io, run_key,
                              any(view.names_items for view in views)),
        ])
        return state, etag

    async def _note_nesting(self, io: Bucket, run_key: str, slot: Slot, now: float) -> _Cached:
        """Before the commit of an append writing items nested under shared items the run
        object does not list yet (``slot.nests``): list them there (compare-and-set). Reads
        then look under those refs, for every checkpoint naming them, whatever happens to
        the append; done after the commit, a crash between the two would hide the items
        from the reads of other checkpoints. Once per shared item: 1 PUT, 1 round trip."""
        for _ in range(_FLOOR_RACES):
            cached = self._cached(run_key)
            state, etag = cached.state, cached.etag
            if (state is None or etag is None or cached.log is None
                    or state.incarnation != slot.incarnation):
                break  # the run changed under this process's knowledge: propose again
            if all(state.may_nest(key) for key in slot.nests):
                return cached
            if await self._cas_run(io, run_key, etag, layout.nesting_after(state, slot.nests)):
                return self._cached(run_key)
            if self._cached(run_key).etag == etag:
                await self._read_state(io, run_key)  # the check after the CAS could not read it
        raise (await self._load(io, run_key)).conflict(now)

    async def _seal(self, io: Bucket, run_key: str, current: _Run, now: float) -> bool:
        """Before a dead run is started over or purged: claim its next sequence (after its
        last one, at or above its floor), create-only, with an empty tombstone (a *seal*).
        Whether the run is dead was judged from a listing; a process that does not know it
        died (its checkpoints were deleted or expired by others) may be appending right now,
        at exactly that sequence (every lower key it could propose is taken or below the
        floor, where its check refuses it). Whichever PUT lands first wins: that
        append is refused (412), or the seal is, and the run, alive again, is left alone.
        False when the seal was refused.

        The seal stays: an append's upload may land long after it was sent. The new run's
        writers replace it when they reach its sequence; the cleanup loop removes it once it
        is below the new run's head, or a while after the run was purged. So the key may
        hold what another life of the run left: its seal (it ended before the cleanup loop
        came by), or its checkpoint (a process that began the dead life died before it
        removed them). While the run object is still the dead life's (the ETag this process
        read), no newer life has begun (one begins by replacing it), so that is an earlier
        life's leftover, which no writer of the dead run can land on: the seal replaces it
        (``IfMatch``; one more GET of the run object). A seal of the dead run itself
        (another process sealing it at the same moment) seals it too. A checkpoint of the
        dead run, anything there once the run object changed, or anything unreadable, is
        left alone: the run lives (or lives again)."""
        assert current.state is not None
        dead = current.state.incarnation
        sequence = current.next_sequence
        seal = Slot(dead, sequence, "", now, None, now, b"", b"",
                    tombstone=True, token=secrets.token_bytes(_TOKEN_BYTES), run_key=run_key)
        key, body = layout.slot_key(run_key, sequence), layout.encode(seal)
        etag = await io.put(key, body, if_none_match=True)
        for _ in range(_FLOOR_RACES):
            if etag is not None:
                break
            found = await io.get(key)
            if found is None:  # removed meanwhile (by the cleanup loop): claim it again
                etag = await io.put(key, body, if_none_match=True)
                continue
            try:
                occupant = layout.decode_slot(
                    found[0], io.where(key), run_key=run_key, sequence=sequence)
            except CorruptCheckpointError:
                return False
            if occupant.token == seal.token:
                etag = found[1]  # this very seal, applied although its reply was lost
            elif occupant.guards:
                # A status change's guard: an append breaks it rather than stop, so it seals
                # nothing. Broken (its change, on a dead run, fails), and claimed again.
                await self._break_guard(io, run_key, sequence, found[1], occupant.guards)
                etag = await io.put(key, body, if_none_match=True)
            elif occupant.incarnation == dead:
                # Sealed by another process; else the dead run appended: it lives.
                return occupant.tombstone and not occupant.checkpoint_id
            else:
                run = await io.get(layout.run_object(run_key))
                if run is None or run[1] != current.etag:
                    return False  # a newer life began (or the run went): not this seal's
                # An earlier life's: its marker goes first, so that no listing takes the
                # key for that life's once the seal is there.
                kind = "t" if occupant.tombstone else "m"
                await io.delete([_marker_of(io.prefix, run_key, sequence, kind,
                                            _listing_of(occupant))[0]])
                etag = await io.put(key, body, if_match=found[1])
        if etag is None:
            return False
        await self._put_marker(io, run_key, sequence, "t", _listing_of(seal))
        return True

    async def _taken(
        self,
        io: Bucket,
        run_key: str,
        slot: Slot,
        keep_latest: int | None,
        now: float,
        *,
        resent: bool = False,
    ) -> str | _Deleted | _Broken:
        """The slot's key is taken. By this very write (its reply was lost, the retry got
        412): the slot carries our token, so it is ours; or a tombstone names our token
        (another process deleted it before the retry): ``_Deleted``, never written again.
        By a guard of a status change of the run's life: broken (``_Broken``: send the
        commit again). By a leftover of another incarnation (a writer of a run that ended):
        replaced with ``IfMatch``. Otherwise another writer got the sequence: raise the
        conflict, after writing any marker a writer left out (safe: a marker is a function
        of its slot) and learning the run's head for the retry. Returns the ETag of our
        slot."""
        current, known_from = await self._head(io, run_key, live_wanted=keep_latest or 1, now=now)
        await self._heal(io, run_key, current)
        occupant = current.listed.slots.get(slot.sequence)
        ours: str | bool | None = None
        if occupant is None or occupant.slot_etag is None:
            # Not in the head: others appended above it meanwhile, so read it to tell.
            ours = await self._own_write(io, run_key, slot)
        elif occupant.listing is not None and occupant.listing.token == slot.token:
            return occupant.slot_etag
        elif (
            occupant.kind == "t"
            and occupant.listing is not None
            and occupant.listing.checkpoint_id == slot.checkpoint_id
        ):
            # The tombstone of a checkpoint at our sequence: its slot may have been ours.
            ours = await self._own_write(io, run_key, slot)
        elif (
            occupant.kind == "g"
            and occupant.listing is not None
            and occupant.listing.incarnation == slot.incarnation
        ):
            broken = await self._break_guard(io, run_key, slot.sequence, occupant.slot_etag,
                                             occupant.guards)
            if broken is not None:
                return _Broken(broken[1], broken[0])
            current, known_from = await self._head(
                io, run_key, live_wanted=keep_latest or 1, now=now
            )
        if isinstance(ours, str):
            return ours
        if ours:
            self._adopt(run_key, current, known_from)
            state = current.state
            return _Deleted(state.status if state is not None
                            and state.incarnation == slot.incarnation else None)
        if (
            (current.live(now) or current.being_created())
            and current.damage is None
            and current.state is not None
            and current.state.incarnation == slot.incarnation
            and current.next_sequence == slot.sequence
            and occupant is not None
            and occupant.slot_etag is not None
            and occupant.listing is not None
            and occupant.listing.incarnation != slot.incarnation
        ):
            key = layout.slot_key(run_key, slot.sequence)
            # The leftover's own markers first, as a seal does: another writer listing the
            # key with them beside our slot would take our slot for the leftover and replace
            # it (``IfMatch`` on the ETag it listed, ours).
            await io.delete(_own_markers(occupant))
            etag = await io.put(key, layout.encode(slot), if_match=occupant.slot_etag)
            if etag is None:  # replaced by another writer, or by this one (a lost reply)
                etag = await self._ours(io, run_key, slot)
            if etag is not None:
                # What the leftover owned goes only while it is the leftover's: a checkpoint
                # of this life may own an item at one of those keys now.
                await _remove_marked(io, run_key, occupant.owned, current.listed)
                return etag
            current, known_from = await self._head(
                io, run_key, live_wanted=keep_latest or 1, now=now
            )
        self._adopt(run_key, current, known_from)
        if resent and (current.state is None or current.state.incarnation != slot.incarnation):
            # Sent more than once, refused by a run started since: the first send may have
            # been applied to the run as it was, before it was deleted.
            raise _outcome_unknown(run_key, slot, "deleted the run and started it over")
        raise current.conflict(now)

    async def _break_guard(
        self, io: Bucket, run_key: str, sequence: int, etag: str, guards: str
    ) -> tuple[RunState, str] | None:
        """Free ``sequence`` from the guard at its key (``etag``; ``guards``: the ETag of the
        run object its status change replaces, see :meth:`_guarded`). While the run object
        still has that ETag, the change may yet apply: it is made unable to (the run object
        rewritten with ``broken_guards`` one more, compare-and-set), so that it fails and
        reads the run again, finding what the breaker then appends. Then the guard is
        removed (``IfMatch``; one its holder renewed meanwhile is broken again). Returns the
        run object as left (``None``: gone)."""
        key = layout.slot_key(run_key, sequence)
        run: tuple[RunState, str] | None = None
        for _ in range(_FLOOR_RACES):
            run = await self._read_state(io, run_key)
            if run is not None and run[1] == guards:
                touched = msgspec.structs.replace(run[0], broken_guards=run[0].broken_guards + 1)
                written = await io.put(layout.run_object(run_key), layout.encode(touched),
                                       if_match=guards)
                if written is None:
                    continue  # changed meanwhile (by the change itself, or this very write)
                self._remember(run_key, written, touched)
                run = touched, written
            if await io.delete_if(key, etag):
                return run
            found = await io.get(key)
            if found is None:
                return run  # removed by its holder, or by another breaker
            try:
                occupant = layout.decode_slot(found[0], io.where(key), run_key=run_key,
                                              sequence=sequence)
            except CorruptCheckpointError:
                return run  # not a guard: the append's retry finds it and says what it is
            if not occupant.guards:
                return run  # a checkpoint now (another breaker appended): the retry finds it
            etag, guards = found[1], occupant.guards  # renewed by its holder
        raise ConflictError(
            f"run {run_key}: a status change kept renewing its guard at sequence {sequence} "
            "while an append broke it; nothing was written, try again")

    async def _heal(self, io: Bucket, run_key: str, current: _Run) -> bool:
        """Write the markers writers left out; False when one at or above the floor could
        not be written (the floor must not be raised over it: see :meth:`_stands`), or one
        below it that the run goes on from (a removal after it would hide it). A slot
        without marker below the floor may be a commit that landed late in a freed key: its
        marker would make it read as a checkpoint, so it gets one only when the slot after
        it names its token (:meth:`_follows`, one LIST and one GET per such slot, on this
        rare path only): an acknowledged create whose own pruning raised the floor beside
        its failed marker PUT, which nobody else remembers. Otherwise it stays bare. One
        beside a damaged slot stays bare too, and readers read it while that slot stands:
        False then as well (the loop removes only the newest, which a tombstone replaces)."""
        floor = _floor_of(current)
        missing = [view for view in (*current.held, *current.tombstones)
                   if view.missing and (view.kind == "t" or view.sequence >= floor)]
        damaged = False
        for view in [view for view in current.held if view.missing and view.sequence < floor]:
            follows = await self._follows(io, run_key, view.sequence, _listing(view), False, None)
            if isinstance(follows, CorruptCheckpointError):
                damaged = True  # a damaged next slot tells nothing: it stays as it is
                continue
            if isinstance(follows, CheckpointError):
                return False
            if follows:
                missing.append(view)
        written = await self._mark(io, run_key, [(view.sequence, view.kind, _listing(view))
                                                 for view in missing])
        for view, done in zip(missing, written, strict=True):
            view.missing = not done
        return not damaged and all(done for view, done in zip(missing, written, strict=True)
                                   if view.kind != "t")

    async def _mark(
        self, io: Bucket, run_key: str, markers: Sequence[tuple[int, str, Listing]]
    ) -> list[bool]:
        """Write ``markers`` (sequence, kind, listing) together; whether each was written
        (a failure is logged: the slot is read instead)."""
        return [not isinstance(result, CheckpointError) for result in await gather([
            functools.partial(_error_as_value, self._put_marker, io, run_key, sequence, kind,
                              listing, True)
            for sequence, kind, listing in markers
        ])]

    async def _put_marker(
        self, io: Bucket, run_key: str, sequence: int, kind: str, listing: Listing,
        strict: bool = False,
    ) -> str:
        """Write a marker; a failure is logged (the slot is read instead), or raised when
        ``strict`` (a pending slot's: without it no read finds the checkpoint)."""
        key, body = _marker_of(io.prefix, run_key, sequence, kind, listing)
        try:
            await io.put(key, body)
        except CheckpointError:
            # The slot is the commit and is readable; listings fall back to reading it.
            logger.warning("checkpoint %s committed without its listing marker %s",
                           listing.checkpoint_id, io.where(key), exc_info=True)
            if strict:
                raise
        return key

    async def _write_marker(
        self, io: Bucket, run_key: str, slot: Slot, strict: bool = False
    ) -> _Entry:
        listing = _listing_of(slot)
        written = await _error_as_value(self._put_marker, io, run_key, slot.sequence, "m",
                                        listing, True)
        if strict and isinstance(written, CheckpointError):
            raise written
        marker = _marker_of(io.prefix, run_key, slot.sequence, "m", listing)[0]
        keys = [layout.slot_key(run_key, slot.sequence)]
        # Pruned, a checkpoint naming shared items leaves its marker: the cleanup loop's cue
        # to sweep what only it named. Without its marker, it gets one before this process
        # raises the floor over it (see _raise_floor).
        bare = listing if isinstance(written, CheckpointError) else None
        return _Entry(slot.expires_at, keys if slot.refs else [*keys, marker],
                      token=slot.token, bare=bare)

    # -- items written with a checkpoint ----------------------------------------------------------

    async def _put_shared(
        self, io: Bucket, run_key: str, slot: Slot, shared: dict[str, Item], now: float
    ) -> _SharedWrite:
        """Write the shared items where no live item is: the ETag of the object now at each
        key (this write's, or the live item's kept), and which of them this write created
        (or wrote again over another life's, see :meth:`_put_item`)."""
        bodies = {hex_key: ItemBody(item.value, None, None, slot.token, shared=True,
                                    run_key=run_key, key=item.key,
                                    incarnation=slot.incarnation)
                  for hex_key, item in shared.items()}
        results = await gather([functools.partial(self._put_item, io, run_key, hex_key, body,
                                                  now) for hex_key, body in bodies.items()])
        done = _SharedWrite()
        for hex_key, (etag, kept) in zip(bodies, results, strict=True):
            if etag is not None:
                done.etags[hex_key] = etag
                if kept is None:
                    done.created[hex_key] = etag
        return done

    async def _put_owned(
        self, io: Bucket, run_key: str, slot: Slot, owned: dict[str, Item], now: float
    ) -> dict[str, _ItemMarker]:
        """Write the items the new checkpoint owns (each with its marker, in one round trip);
        the markers of those it owns now, by hex key."""
        meta = ItemMeta(slot.sequence, slot.expires_at)

        async def put(hex_key: str, item: Item) -> _ItemMarker | None:
            body = ItemBody(item.value, slot.sequence, slot.expires_at, slot.token,
                            checkpoint_id=slot.checkpoint_id, run_key=run_key, key=item.key)
            marker = layout.item_marker_key(run_key, hex_key, meta)
            (etag, kept), marker_etag = await pair(
                functools.partial(self._put_own_item, io, run_key, hex_key, body, now,
                                  marker),
                functools.partial(io.put, marker, slot.token),
            )
            if kept is not None:
                await io.delete([marker])  # the live item kept there is another owner's
                return None
            return _ItemMarker(marker, hex_key, meta, marker_etag or "", etag or "")

        markers = await gather([functools.partial(put, hex_key, item)
                                for hex_key, item in owned.items()])
        return {hex_key: marker for hex_key, marker in zip(owned, markers, strict=True)
                if marker is not None}

    async def _put_own_item(
        self, io: Bucket, run_key: str, hex_key: str, body: ItemBody, now: float, marker: str
    ) -> tuple[str | None, ItemBody | None]:
        """:meth:`_put_item` for an item a create owns: a live item of the same owner found
        at the key is another write's (a create at this sequence taken back by a process
        that stopped before removing its items, or another life's): it is replaced,
        ``IfMatch`` its ETag, not kept as this checkpoint's. One of another owner is kept."""
        key = layout.item_object(run_key, hex_key)
        for _ in range(_FLOOR_RACES):
            etag, kept = await self._put_item(io, run_key, hex_key, body, now, marker=marker)
            if kept is None or kept.owner != body.owner or etag is None:
                return etag, kept
            written = await io.put(key, layout.encode(body), if_match=etag)
            if written is not None:
                return written, None
        raise ConflictError(f"item {io.where(key)} kept changing while it was written")

    async def _put_item(
        self,
        io: Bucket,
        run_key: str,
        hex_key: str,
        body: ItemBody,
        now: float,
        existing: tuple[bytes, str] | None = None,
        *,
        marker: str | None = None,
    ) -> tuple[str | None, ItemBody | None]:
        """Write ``body`` unless a live item has the key (``existing``: the object as just
        read, if it was): ``(its ETag, None)``, or ``(the ETag of the live item kept, that
        item)``. A key taken by this very write (its token: a retry after a lost reply)
        counts as written. A shared item another life of the run wrote with the same value
        is written again, ``IfMatch`` its ETag (see :func:`_of_another_life`), by a writer
        of the life the run object names (one GET of it, on that path only). A damaged
        item is not live: the markers it left go first (but ``marker``, the one the caller
        writes for ``body``), then it is replaced like an expired one, ``IfMatch`` its
        ETag: a good value written meanwhile is kept, and its marker put back if this call
        had deleted it."""
        key = layout.item_object(run_key, hex_key)
        encoded = layout.encode(body)
        cleared: list[str] = []
        for _ in range(_FLOOR_RACES):
            if existing is None:
                etag = await io.put(key, encoded, if_none_match=True)
                if etag is not None:
                    return etag, None
                existing = await io.get(key)
                if existing is None:
                    continue  # deleted in between: create it again
            stored = _intact_item(run_key, hex_key, existing)
            if stored is not None and stored.token == body.token:
                return existing[1], None
            kept = stored is not None and is_live(stored.expires_at, now)
            if kept and stored is not None and _of_another_life(stored, body):
                # Written again only by a writer of the run's life now: one of an ended
                # life that does not know it ended would change the object under the
                # appends of the new life that found it, which rely on its ETag (a sweep
                # removing the object written again would be no loss to them).
                run = await io.get(layout.run_object(run_key))
                kept = run is None or layout.decode_run_of(
                    run[0], io.where(layout.run_object(run_key)), run_key=run_key,
                ).incarnation != body.incarnation
            if kept and stored is not None:
                await _restore_marker(io, run_key, hex_key, stored, cleared)
                return existing[1], stored
            if stored is None:
                cleared += await self._clear_damaged(io, run_key, hex_key, marker)
            etag = await io.put(key, encoded, if_match=existing[1])
            if etag is not None:
                return etag, None
            existing = await io.get(key)
        raise ConflictError(f"item {io.where(key)} kept changing while it was written")

    async def _clear_damaged(
        self, io: Bucket, run_key: str, hex_key: str, marker: str | None
    ) -> list[str]:
        """Before a damaged item at ``hex_key`` is replaced: delete the markers it left
        (its owner cannot be read from its bytes, and pruning that owner would delete the
        new item by them), but ``marker``, the new item's, and forget what this process
        knew of its owner, for the same reason; the markers deleted. Done before the
        replacing write, so a failure here leaves the damaged item to a retry and a marker
        a concurrent writer puts after the LIST is never touched. One LIST of the run:
        damage is rare."""
        logger.warning("replacing a damaged item at %s",
                       io.where(layout.item_object(run_key, hex_key)))
        listed = _parse_run_listing(run_key, await io.list(layout.run_prefix(run_key)))
        cached = self._cache.get(run_key)
        for owned in [] if cached is None else cached.owned.values():
            owned.pop(hex_key, None)
        stale = [found.key for found in listed.item_markers
                 if found.hex_key == hex_key and found.key != marker]
        await io.delete(stale)
        return stale

    async def _clear_if_damaged(
        self,
        io: Bucket,
        run_key: str,
        hex_key: str,
        stored: tuple[bytes, str] | None,
        marker: str | None,
    ) -> None:
        """Before an unconditional write over ``stored``: what replacing it needs first if
        it is damaged (see :meth:`_clear_damaged`)."""
        if stored is not None and _intact_item(run_key, hex_key, stored) is None:
            await self._clear_damaged(io, run_key, hex_key, marker)

    async def _sweep_allows(
        self, io: Bucket, run_key: str, refs: Sequence[str], shared: Mapping[str, str]
    ) -> bool:
        """After the commit: may the checkpoint stand? Not when a sweep that did not see it
        is deleting, or removed lately (the lease remembers), what it relies on: the items
        its ``refs`` name, unless this append wrote them again (``shared``: the ETag of the
        object at each key this append wrote or found in place; a removal of another object
        is no loss), and the very objects it wrote or found in place nested under what it
        names. A sweep still collecting any of those (or anything nested under what it
        names) is stopped instead (its lease rewritten without what it would delete: it
        then deletes nothing). See "Shared items" in ``docs/stores/s3.md``."""
        if not refs:
            return True
        named = {layout.hex_item_key(ref) for ref in refs}

        def lost(hex_key: str, etag: str | None) -> bool:
            relied = shared.get(hex_key)
            if hex_key in named:
                return relied is None or not etag or etag == relied
            return relied is not None and layout.nested_under(hex_key, named) and (
                not etag or etag == relied)

        key = layout.sweep_lease(run_key)
        for _ in range(_FLOOR_RACES):
            found = await io.get(key)
            if found is None:
                return True
            lease = _lease_of(found[0], io.where(key))
            if lease is None:
                return True
            if any(lost(gone.hex_key, gone.etag) for gone in lease.removed):
                return False
            if lease.deleting:
                etags: Sequence[str | None] = lease.etags or [None] * len(lease.doomed)
                return not any(lost(hex_key, etag)
                               for hex_key, etag in zip(lease.doomed, etags, strict=False))
            if not any(_held(hex_key, named) for hex_key in lease.doomed):
                return True
            stopped = msgspec.structs.replace(lease, doomed=(), etags=())
            if await io.put(key, layout.encode(stopped), if_match=found[1]) is not None:
                return True
        return False

    async def _ask_for_sweep(self, io: Bucket, run_key: str, needed: bool = True) -> None:
        """Best effort: ask the cleanup loop to sweep the run's shared items (if ``needed``)."""
        if not needed:
            return
        key = layout.sweep_due(run_key)
        try:
            await io.put(key, secrets.token_bytes(_TOKEN_BYTES))
        except CheckpointError:
            logger.warning("could not ask for a sweep of run %s at %s: shared items named by "
                           "no checkpoint may stay until the run is deleted", run_key,
                           io.where(key), exc_info=True)

    async def _withdraw_owned(
        self, io: Bucket, run_key: str, slot: Slot, owned: dict[str, Item]
    ) -> None:
        """Best effort, for an append taken back: remove the owned items it wrote (those
        carrying its token) and their markers."""
        if not owned:
            return
        meta = ItemMeta(slot.sequence, slot.expires_at)
        try:
            found = await self._bodies(io, run_key, list(owned))
            markers: list[str] = []
            bodies: list[tuple[str, str]] = []
            for hex_key, got in zip(owned, found, strict=True):
                if got is not None and got[0].token != slot.token:
                    continue  # not written by this append
                markers.append(layout.item_marker_key(run_key, hex_key, meta))
                if got is not None:
                    bodies.append((layout.item_object(run_key, hex_key), got[1]))
            await pair(
                functools.partial(gather, [functools.partial(io.delete_if, key, etag)
                                           for key, etag in bodies]),
                functools.partial(io.delete, markers),
            )
        except CheckpointError:
            logger.warning("a failed create of checkpoint %s left items behind in run %s",
                           slot.checkpoint_id, run_key, exc_info=True)

    async def _bodies(
        self, io: Bucket, run_key: str, hex_keys: Sequence[str], *, wide: bool = False
    ) -> list[tuple[ItemBody, str] | None]:
        """The items at ``hex_keys`` with their ETags (None where there is none), read
        concurrently (``WIDE`` at a time if ``wide``: a batch that may be long)."""

        async def read(hex_key: str) -> tuple[ItemBody, str] | None:
            key = layout.item_object(run_key, hex_key)
            found = await io.get(key)
            if found is None:
                return None
            item = layout.decode_item(found[0], io.where(key), run_key=run_key, hex_key=hex_key)
            return item, found[1]

        calls = [functools.partial(read, hex_key) for hex_key in hex_keys]
        return await (gather(calls, parallel=WIDE) if wide else gather(calls))

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
        leftovers below the new slot. Costs one ``DeleteObjects`` when there is anything, two
        (:func:`_slots_first`) when what goes owns items, each of which goes only while it is
        the object this process wrote (:func:`_owned_removals`; + 1 GET per item it knows
        from a listing only, sent with the floor's PUT: a round trip more when the floor is
        above them already)."""
        # The items of checkpoints the log forgot (it keeps the newest few) go with them, or
        # a run that is never pruned would hold every item it ever owned: pruning those
        # checkpoints lists them (``_older``) and reads their items first.
        for sequence in [sequence for sequence in cached.owned
                         if sequence < log.known_from and sequence not in log.garbage]:
            del cached.owned[sequence]
        newest = slot.sequence
        doomed: set[int] = set()
        popped: list[tuple[float, int]] = []
        while log.expiring and log.expiring[0][0] <= now:
            popped.append(heapq.heappop(log.expiring))
            if popped[-1][1] in log.held and popped[-1][1] < newest:
                doomed.add(popped[-1][1])
        need = 0
        told: dict[int, bool | CheckpointError] = {}
        if keep_latest is not None:
            need = keep_latest - 1 if is_live(slot.expires_at, now) else keep_latest
            doomed, need = await self._counted(io, run_key, log, newest, doomed, need, told, now)
        garbage = [sequence for sequence in log.garbage if sequence < newest]
        keys = [key for sequence in doomed for key in log.held[sequence].keys]
        keys += [key for sequence in garbage for key in log.garbage[sequence]]
        owned = _owned_of(cached, log, (*doomed, *garbage))
        opened = max((*doomed, *garbage), default=-1)  # the highest slot key deleted
        additions: dict[int, _Entry] = {}

        # Below what this process knows, ``_older`` lists only to prune by count.
        below = [] if keep_latest is not None else _unknown_below(
            log, _slot_sequences(run_key, keys))

        async def floor_raised() -> bool:
            if not keys:
                return True
            bare = await self._vouched(io, run_key, cached, [
                (sequence, entry) for sequence, entry in (*log.held.items(), *additions.items())
                if sequence not in doomed], keys, below, told)
            return bare is not None and await self._raise_floor(io, run_key, cached, opened,
                                                                newest + 1, bare)

        try:
            if keep_latest is not None and log.known_from > 0:
                older, older_owned, additions = await self._older(io, run_key, cached, log,
                                                                  need, told, now)
                keys += older
                owned += older_owned
                opened = max(opened, log.known_from - 1 if older else -1)
            # The items' ETags this process does not know are read with the floor's PUT.
            raised, (objects, markers) = await pair(
                floor_raised, functools.partial(_owned_removals, io, run_key, owned, _Listed()))
            if not raised:
                for entry in popped:
                    heapq.heappush(log.expiring, entry)
                return  # the run object changed meanwhile: the next append prunes
            removed = [Listed(key, "") for key in keys] + markers + objects
            for batch in _slots_first(run_key, removed):
                await io.delete_listed(batch)
        except CheckpointError:
            # Committed already, so the append must not fail: the next one prunes what this
            # one could not.
            logger.warning("pruning run %s failed", run_key, exc_info=True)
            for entry in popped:
                heapq.heappush(log.expiring, entry)
            return
        # A removal by this process meanwhile (the cleanup loop, a delete) may have taken
        # some of them out of the log already.
        for sequence in doomed:
            log.held.pop(sequence, None)
            cached.owned.pop(sequence, None)
        for sequence in garbage:
            log.garbage.pop(sequence, None)
            cached.owned.pop(sequence, None)
        if keep_latest is not None and log.known_from > 0:
            log.merge_older(additions)
        if any(sequence >= log.known_from for sequence in below):
            # What lies right below the lowest slot it knew is told: the slots it knows
            # now have that one, or each other, right below them.
            log.unsure_below = False

    async def _counted(
        self, io: Bucket, run_key: str, log: _Log, newest: int, expired: set[int], need: int,
        told: dict[int, bool | CheckpointError], now: float,
    ) -> tuple[set[int], int]:
        """The checkpoints a pruning by count removes from the log (with ``expired``, those
        below ``newest`` that expired) and how many more it keeps below what the log knows:
        the newest ``need`` live ones stay. A slot below the floor without its marker is no
        checkpoint when the run does not go on from it (a commit that landed late in a freed
        key, see :meth:`_stands`): it goes, and counts for nothing. That is told (in
        ``told``, for :meth:`_vouched`) only of such slots the count would keep while it
        removes another (or lists below the log): a LIST and a GET each, on this rare path
        only."""
        while True:
            doomed, left, counted = set(expired), need, []
            for sequence in reversed(log.held):
                entry = log.held[sequence]
                if sequence >= newest or sequence in doomed:
                    continue
                if not is_live(entry.expires_at, now) or entry.late or (
                        told.get(sequence) is False):
                    doomed.add(sequence)
                elif left > 0:
                    left -= 1
                    counted.append(sequence)
                else:
                    doomed.add(sequence)
            unknown = [sequence for sequence in counted if sequence not in told
                       and log.held[sequence].unvouched is not None]
            if not unknown or (doomed <= expired and log.known_from == 0):
                return doomed, left
            for sequence in unknown:
                told[sequence] = await self._late(io, run_key, sequence, log.held[sequence])

    async def _late(
        self, io: Bucket, run_key: str, sequence: int, entry: _Entry
    ) -> bool | CheckpointError:
        """:meth:`_follows` for a slot listed below the floor without its marker, as a
        pruning asks it (False: a commit that landed late). An answer False for good is
        kept on ``entry`` (``late``): a process whose log holds it asks once."""
        assert entry.unvouched is not None
        follows, for_good = await self._told(io, run_key, sequence, entry.unvouched, False, None)
        entry.late = entry.late or for_good
        return follows

    async def _vouched(
        self, io: Bucket, run_key: str, cached: _Cached, kept: Sequence[tuple[int, _Entry]],
        keys: Sequence[str], below: Sequence[int] = (),
        told: Mapping[int, bool | CheckpointError] | None = None,
    ) -> list[tuple[int, _Entry, Listing]] | None:
        """Before a pruning removes ``keys``: write the marker of each ``kept`` checkpoint
        below the floor without one from which the run goes on (the slot after it names its
        token; see :meth:`_follows`), as the cleanup loop does (:meth:`_heal`), since the
        removal may take that slot. A commit that landed late gets
        none, nor does one beside a damaged slot, which readers read as a checkpoint while
        that slot stands: then no slot above it is removed (``None``). Returns the kept ones
        known to lack their marker at or above the floor (for :meth:`_raise_floor`); ``None``
        when it cannot be told or a marker cannot be written: nothing is removed now. Costs
        nothing unless such a checkpoint is kept (a LIST and a GET each, then its marker's
        PUT). ``below``: slots among those removed right below which this process does
        not know what stands (see :func:`_unknown_below`); the checkpoint found there is
        listed first (:meth:`_just_below`: a LIST each, and a GET when it has no marker)."""
        removed = _slot_sequences(run_key, keys)
        for sequence in below:
            found = await self._just_below(io, run_key, cached, sequence)
            kept = [*[(other, entry) for other, entry in found if other not in removed], *kept]
        for sequence, entry in kept:
            if entry.unvouched is None or entry.late:
                continue
            follows = (told[sequence] if told is not None and sequence in told
                       else await self._late(io, run_key, sequence, entry))
            if isinstance(follows, CorruptCheckpointError):
                if any(other > sequence for other in removed):
                    return None  # a removal above it may take the damaged slot readers see
                continue
            if follows is False:
                continue
            if isinstance(follows, CheckpointError):
                return None
            if not (await self._mark(io, run_key, [(sequence, "m", entry.unvouched)]))[0]:
                return None
            entry.unvouched = None
        return [(sequence, entry, entry.bare) for sequence, entry in kept
                if entry.bare is not None]

    async def _just_below(
        self, io: Bucket, run_key: str, cached: _Cached, sequence: int
    ) -> list[tuple[int, _Entry]]:
        """The checkpoint that stands first below ``sequence`` (keys between may be empty:
        a tombstone removed, a slot removed alone) as this process now lists it, for
        :meth:`_vouched` before a pruning removes the slot at ``sequence``: one LIST (of
        that slot's keys, past empty ones), and a GET of its slot when it has no marker;
        none when a tombstone stands there, or nothing."""
        listed = _parse_run_listing(run_key, await _first_slot_below(io, run_key, sequence))
        listed.run_etag = cached.etag
        current = await self._resolve(io, run_key, listed)
        return [(view.sequence, _entry_of(run_key, view, _floor_of(current)))
                for view in current.held]

    async def _raise_floor(
        self, io: Bucket, run_key: str, cached: _Cached, opened: int, floor: int,
        bare: Sequence[tuple[int, _Entry, Listing]],
    ) -> bool:
        """Before slot keys up to ``opened`` are deleted: make sure the run object's floor is
        above them (compare-and-set to ``floor``, this process's next sequence, so that this
        is needed once per ``keep_latest`` + 1 appends). The markers of the checkpoints kept
        that this process knows are ``bare`` are written first: below the floor, a slot
        without one reads as a commit that landed late unless the run goes on from it (see
        :meth:`_stands`), which a removal after it may break. False when one of them could
        not be written, or the run object changed since this process read it (a status
        change): the keys must stay for now."""
        state, etag = cached.state, cached.etag
        assert state is not None
        assert etag is not None
        if opened < state.floor:
            return True
        marked = await self._mark(io, run_key, [(sequence, "m", listing)
                                                for sequence, _, listing in bare])
        for (_, entry, _), done in zip(bare, marked, strict=True):
            if done:
                entry.bare = None
        if not all(marked):
            return False
        raised = msgspec.structs.replace(state, floor=floor)
        written = await io.put(layout.run_object(run_key), layout.encode(raised), if_match=etag)
        if written is not None:
            cached.raised_floor = floor  # this process's write (see _write)
            self._remember(run_key, written, raised)
            return True
        # Refused: this process's write whose reply was lost, or another process's raise
        # to the same state (the same object): the floor is as wanted, whoever wrote it.
        written = await self._written(io, run_key, raised)
        if written is None:
            return False
        self._remember(run_key, written, raised)
        return True

    async def _cas_run(self, io: Bucket, run_key: str, etag: str, new: RunState) -> bool:
        """Compare-and-set the run object from ``etag`` to ``new``; False when another write
        got there first. Recognises its own write after a lost reply."""
        written = await io.put(layout.run_object(run_key), layout.encode(new), if_match=etag)
        if written is None:
            written = await self._written(io, run_key, new)
        if written is None:
            return False
        self._remember(run_key, written, new)
        return True

    async def _older(
        self, io: Bucket, run_key: str, cached: _Cached, log: _Log, need: int,
        told: dict[int, bool | CheckpointError], now: float,
    ) -> tuple[list[str], list[_ItemMarker], dict[int, _Entry]]:
        """Pruning below what this process knows (it joined a run written by others, or
        forgot): list the slots older than ``known_from``; the newest ``need`` live ones
        stay, every other key goes (the keys, and the markers of the items they own, for
        :func:`_owned_removals`). Each listed key is then deleted, except at most
        ``keep_latest``, so the listing is paid for by the creates that wrote them. A slot
        below the floor without its marker that would stay is asked first whether it landed
        late (:meth:`_late`, in ``told``): then it goes and counts for nothing."""
        entries = await io.list(
            layout.slots_prefix(run_key), start_after=layout.older_than(run_key, log.known_from)
        )
        listed = _parse_run_listing(run_key, entries)
        listed.run_etag = cached.etag
        current = await self._resolve(io, run_key, listed)
        keys: list[str] = []
        owned: list[_ItemMarker] = []
        kept: dict[int, _Entry] = {}
        for view in reversed(current.held):
            entry = _entry_of(run_key, view, _floor_of(current))
            wanted = len(kept) < need and is_live(entry.expires_at, now)
            if wanted and entry.unvouched is not None and view.sequence not in told:
                told[view.sequence] = await self._late(io, run_key, view.sequence, entry)
            if wanted and told.get(view.sequence) is not False:
                kept[view.sequence] = entry
            else:
                keys += _prunable_keys(run_key, view)
                owned += _owned_markers(cached, view.sequence, view.owned)
        for view in (*current.tombstones, *current.orphans):
            keys += _prunable_keys(run_key, view)
            owned += _owned_markers(cached, view.sequence, view.owned)
        keys += listed.stray
        return keys, owned, kept

    @holds_clients
    async def get(
        self, run_key: str, sequence: int, *, now: float
    ) -> tuple[StoredCheckpoint, str] | None:
        check_run_key(run_key)
        check_time("now", now)
        sequence = check_sequence(sequence)
        if not layout.valid_sequence(sequence):
            return None
        io = await self._objects()
        key = layout.slot_key(run_key, sequence)
        # The run object is read every time (concurrently): the status must be current and
        # a GET cannot check another object's ETag.
        found, state = await pair(
            functools.partial(io.get, key),
            functools.partial(_damage_as_value, self._read_state, io, run_key),
        )
        accepted = await self._accept_read(io, run_key, sequence, found, state, now)
        if accepted is None:
            return None
        assert found is not None
        if layout.decode_slot(found[0], io.where(key), run_key=run_key, sequence=sequence).owns:
            # Pending until its marker is there (see Slot.owns): a GET cannot tell, a LIST of
            # the slot's keys does (one round trip more, for checkpoints owning items only).
            listed = await self._afresh(run_key, functools.partial(
                self._read_at, io, run_key, sequence, now, set()))
            return None if listed is None else listed[:2]
        return accepted[:2]

    async def _accept_read(
        self,
        io: Bucket,
        run_key: str,
        sequence: int,
        found: tuple[bytes, str] | None,
        state: tuple[RunState, str] | CorruptCheckpointError | None,
        now: float,
        listed: _SlotView | None = None,
        seen: set[str] | None = None,
    ) -> _Accepted | None:
        """What ``get`` returns, from the slot and the run object read together, with the
        refs that may have items nested under them (see :func:`_nesting_refs`) and the
        slot's ETag. ``listed``, ``seen``: see :meth:`_accept`."""
        if found is None or state is None:
            return None
        if isinstance(state, CorruptCheckpointError):
            # Which incarnation is current only the log can tell now: its head says.
            run = (await self._head(io, run_key, live_wanted=1, now=now))[0].state
            if run is None:
                return None
        else:
            run = state[0]
        accepted = self._accept(io, run_key, sequence, found, run, now, listed, seen)
        if accepted is None or await self._stands(io, run_key, sequence, found, run, listed):
            return accepted
        return None

    async def _stands(
        self,
        io: Bucket,
        run_key: str,
        sequence: int,
        found: tuple[bytes, str],
        state: RunState,
        listed: _SlotView | None,
    ) -> bool:
        """Whether the slot read at ``sequence`` (``found``) is a checkpoint, not a create's
        commit PUT that landed late, in a key a pruning had freed, with nobody left to check
        it (its create cancelled or killed while the PUT was held in the network): such a
        slot lies below the floor (raised before the key was freed) and has no marker of its
        own (written only after the commit's answer). A slot at or above the floor, or with
        its marker (``listed``: the listing of its keys, read with it; otherwise listed now,
        a round trip more), stands. One without, below the floor (its writer is between its
        two PUTs, or its marker's PUT failed), stands when the run goes on from it (see
        :meth:`_follows`: the slot after it names its token)."""
        if sequence >= state.floor:
            return True
        key = layout.slot_key(run_key, sequence)
        slot = layout.decode_slot(found[0], io.where(key), run_key=run_key, sequence=sequence)
        if slot.owns and listed is None:
            return True  # get reads it again with its listing (is it pending?), checked then
        if listed is None:
            listed = _parse_run_listing(run_key, await _slot_markers(io, key)).slots.get(sequence)
        if listed is not None and not listed.missing and _marked(listed, slot):
            return True
        return await self._goes_on_from(io, run_key, sequence, _listing_of(slot))

    async def _goes_on_from(self, io: Bucket, run_key: str, sequence: int, slot: Listing) -> bool:
        """:meth:`_follows` for a reader, which knows nothing of how the slot was sent. A
        damaged slot after it tells nothing: the slot stands (a damaged neighbour must not
        hide an acknowledged checkpoint; a late commit beside it is read, as before the
        check)."""
        follows = await self._follows(io, run_key, sequence, slot, False, None)
        if isinstance(follows, CorruptCheckpointError):
            logger.warning("run %s: the slot after sequence %d is damaged (%s): the slot is "
                           "read as a checkpoint", run_key, sequence, follows)
            return True
        if isinstance(follows, CheckpointError):
            raise follows
        return follows

    @holds_clients
    async def latest(self, run_key: str, *, now: float) -> tuple[StoredCheckpoint, str] | None:
        check_run_key(run_key)
        check_time("now", now)
        io = await self._objects()
        found = await self._afresh(run_key, functools.partial(
            self._latest, io, run_key, now, first=_page_for(2), seen=set()))
        return None if found is None else found[:2]

    async def _afresh(self, run_key: str, read: Callable[[], Awaitable[_T]]) -> _T:
        """``read``, made again while what it found in one request was removed or replaced
        by another process before a later one (:class:`_Superseded`): the read returns the
        state before that change or after it, never a mix of the two. Bounded: a run whose
        checkpoints keep going faster than they are read fails with ``StoreError``."""
        for _ in range(self._retry.max_retries + 1):
            try:
                return await read()
            except _Superseded:
                continue
        raise StoreError(
            f"run {run_key}: its checkpoints kept being removed or replaced while read; "
            "try again")

    async def _latest(
        self, io: Bucket, run_key: str, now: float, *, first: int, seen: set[str]
    ) -> tuple[StoredCheckpoint, str, tuple[str, ...], str, _SlotView] | None:
        """The newest live checkpoint, its run's status, the refs that may have items nested
        under them, its slot's ETag, and its view in the listing read (with the markers of
        the items it owns). ``first``: ``MaxKeys`` of the first LIST. :class:`_Superseded`
        when a slot listed is gone (or written again) by the time it is read: the listing
        no longer shows the run, whose newest checkpoint may be one it did not list
        (``seen``: see :meth:`_accept`)."""

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

        listed, known_from = await self._scan(io, run_key, first=first, enough=found)
        if listed.run_etag is None:
            self._forget(run_key)  # deleted: what this process knew of it is void
            return None
        # Guess the newest live checkpoint before knowing the incarnation for sure, so the
        # run object (when its ETag changed) and the slot are read at once; check afterwards.
        guess = _newest_live(listed.slots.values(), now, incarnation(listed))
        if guess is not None and not any(
            view.listing is None for view in listed.slots.values() if view.sequence > guess.sequence
        ):
            got, state = await pair(
                functools.partial(io.get, layout.slot_key(run_key, guess.sequence)),
                functools.partial(_damage_as_value, self._state, io, run_key, listed.run_etag),
            )
            if state is None:
                return None
            if got is None:
                raise _Superseded  # pruned, or the run deleted, since it was listed
            if not isinstance(state, CorruptCheckpointError):
                accepted = self._accept(io, run_key, guess.sequence, got, state[0], now, guess,
                                        seen)
                if accepted is not None and await self._stands(
                    io, run_key, guess.sequence, got, state[0], guess
                ):
                    return *accepted, guess
        result = await self._first_live(
            io, run_key, _as_listed(await self._resolve(io, run_key, listed)), now, seen)
        if result is None and known_from:
            result = await self._first_live(io, run_key, await self._load_as_listed(io, run_key),
                                            now, seen)
        return result

    async def _first_live(
        self, io: Bucket, run_key: str, current: _Run, now: float, seen: set[str]
    ) -> tuple[StoredCheckpoint, str, tuple[str, ...], str, _SlotView] | None:
        if current.state is None:
            return None
        for view in reversed(current.held):
            if not is_live(_listing(view).expires_at, now):
                continue
            got = await io.get(layout.slot_key(run_key, view.sequence))
            if got is None:
                # Removed since it was listed (pruned, purged, the run deleted): the
                # listing no longer shows the run, whose newest may be one it did not list.
                raise _Superseded
            result = self._accept(io, run_key, view.sequence, got, current.state, now, view,
                                  seen)
            if result is not None and await self._stands(io, run_key, view.sequence, got,
                                                         current.state, view):
                return *result, view
        return None

    def _accept(
        self,
        io: Bucket,
        run_key: str,
        sequence: int,
        found: tuple[bytes, str],
        state: RunState,
        now: float,
        listed: _SlotView | None = None,
        seen: set[str] | None = None,
    ) -> _Accepted | None:
        """The checkpoint in a slot's body, if it is a live one of the run's incarnation.
        ``listed``: the slot as a listing of the same read showed it; a slot of another
        write than the one listed (its ETag, or its marker's token, differs: the run was
        started over, the key written again, between the LIST and the GET) makes the read
        :class:`_Superseded`, as the items listed under it are not this checkpoint's.
        ``seen``: the slots (ETags) an earlier try of the read found so: found so again,
        the marker is a leftover its writer did not remove (it stopped), not a race, and the
        read goes on."""
        where = io.where(layout.slot_key(run_key, sequence))
        slot = layout.decode_slot(found[0], where, run_key=run_key, sequence=sequence)
        if slot.tombstone or slot.incarnation != state.incarnation or not is_live(
            slot.expires_at, now
        ):
            return None
        if listed is not None and _written_over(listed, slot, found[1]) and (
            seen is None or found[1] not in seen
        ):
            if seen is not None:
                seen.add(found[1])
            raise _Superseded
        if slot.owns and listed is not None and not _marked(listed, slot):
            # Pending: its items may not all be written (see Slot.owns). Checked after the
            # race above: a slot written again since the listing may have its marker now.
            return None
        return (self._located(io, run_key, slot), state.status, _nesting_refs(slot, state),
                found[1])

    # -- checkpoints with their items ------------------------------------------------------------

    @holds_clients
    async def read_with_items(
        self, run_key: str, *, sequence: int | None, now: float
    ) -> tuple[StoredCheckpoint, str, dict[str, bytes]] | None:
        check_run_key(run_key)
        check_time("now", now)
        if sequence is not None:
            sequence = check_sequence(sequence)
        io = await self._objects()
        return await self._afresh(run_key, functools.partial(
            self._read_with_items, io, run_key, sequence, now, set()))

    async def _read_with_items(
        self, io: Bucket, run_key: str, sequence: int | None, now: float, seen: set[str]
    ) -> tuple[StoredCheckpoint, str, dict[str, bytes]] | None:
        if sequence is None:
            latest = await self._latest(io, run_key, now, first=_READ_PAGE, seen=seen)
            if latest is None:
                return None
            record, status, nesting, etag, view = latest
            owned = [marker.hex_key for marker in view.owned]
        else:
            found = await self._read_at(io, run_key, sequence, now, seen)
            if found is None:
                return None
            record, status, nesting, etag, owned = found
        return record, status, await self._items_of(io, run_key, record, etag, owned, nesting,
                                                    now)

    async def _read_at(
        self, io: Bucket, run_key: str, sequence: int, now: float, seen: set[str],
        *, owned: bool = True,
    ) -> tuple[StoredCheckpoint, str, tuple[str, ...], str, list[str]] | None:
        """What ``get`` returns, with the refs that may have items nested under them, the
        slot's ETag and the hex keys of the items the checkpoint owns (their markers are
        under its slot key: listed in the same round trip). Without ``owned`` the listing
        stops at those markers (see :func:`_slot_markers`) and no hex keys are returned."""
        if not layout.valid_sequence(sequence):
            return None
        slot = layout.slot_key(run_key, sequence)
        (found, state), entries = await pair(
            functools.partial(
                pair,
                functools.partial(io.get, slot),
                functools.partial(_damage_as_value, self._read_state, io, run_key),
            ),
            functools.partial(io.list, slot) if owned else functools.partial(
                _slot_markers, io, slot),
        )
        view = _parse_run_listing(run_key, entries).slots.get(sequence)
        if found is not None and (view is None or view.slot_etag is None):
            # Written after the LIST, or removed before it (with its markers, maybe): the
            # markers listed are not those of the slot read.
            raise _Superseded
        accepted = await self._accept_read(io, run_key, sequence, found, state, now, view,
                                           seen)
        if accepted is None:
            return None
        return *accepted, [] if view is None else [marker.hex_key for marker in view.owned]

    async def _items_of(
        self,
        io: Bucket,
        run_key: str,
        record: StoredCheckpoint,
        etag: str,
        owned: Sequence[str],
        nesting: Sequence[str],
        now: float,
    ) -> dict[str, bytes]:
        """The live items ``record`` names and those it owns (``owned``: hex keys of its item
        markers), read concurrently with a listing of what is nested under each of
        ``nesting`` (the names that may have nested items); then the nested items,
        concurrently (a round trip only when there are any). An item at an owned key that
        another checkpoint (or another life of this one) owns now is not this checkpoint's,
        nor is one nested under a ref that another checkpoint owns.

        An item it names, owns or lists found missing (or owned by another) may have gone
        with the checkpoint since its slot was read (``etag``): then the read is
        :class:`_Superseded`. While the slot stands, what is missing is absent."""
        named = {layout.hex_item_key(key): key for key in record.refs}
        wanted = list(dict.fromkeys([*named, *owned]))
        found, listings = await pair(
            functools.partial(self._bodies, io, run_key, wanted),
            functools.partial(gather, [
                functools.partial(io.list, layout.nested_items_prefix(run_key, hex_key))
                for hex_key in dict.fromkeys(map(layout.hex_item_key, nesting))]),
        )
        values: dict[str, bytes] = {}
        gone = False
        for hex_key, stored in zip(wanted, found, strict=True):
            if stored is None:
                gone = True
                continue
            if not is_live(stored[0].expires_at, now):
                continue
            key = named.get(hex_key) if hex_key in named else (
                layout.item_key_of(hex_key) if _owned_by(stored[0], record) else None)
            if key is not None:
                values[key] = stored[0].value
            else:
                gone = True  # owned by another now: taken over, or this one was removed
        read = dict(zip(wanted, found, strict=True))
        base = len(layout.items_prefix(run_key))
        nested = list(dict.fromkeys(entry.key[base:] for listed in listings for entry in listed))
        nested = [hex_key for hex_key in nested if layout.item_key_of(hex_key) is not None]
        unread = [hex_key for hex_key in nested if hex_key not in read]
        read.update(zip(unread, await self._bodies(io, run_key, unread, wide=True),
                        strict=True))
        for hex_key in nested:
            stored = read[hex_key]
            key = layout.item_key_of(hex_key)
            if stored is None:
                gone = True
                continue
            if key is None or not is_live(stored[0].expires_at, now):
                continue
            if stored[0].owner is None or _owned_by(stored[0], record):
                values[key] = stored[0].value
        if gone and await io.get_if_changed(
            layout.slot_key(run_key, record.sequence), etag
        ) is not UNCHANGED:
            raise _Superseded  # the checkpoint went (or was replaced) while read
        return values

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
        check_run_key(run_key)
        check_flag("if_absent", if_absent)
        check_int("owner", owner)
        checkpoint_id = cast(str, check_str("checkpoint_id", checkpoint_id))
        check_time("now", now)
        check_items(items)
        given = _owned_batch(items, owner, if_absent)
        if not layout.valid_sequence(owner):
            return False
        io = await self._objects()
        # The owner check and what the keys hold now, in one round trip; then every write in
        # another. The check is a read of the checkpoint, as ``get`` makes it: the slot and
        # the run object, and a LIST of the slot's keys beside them. A GET cannot tell a
        # pending slot (owning items, its marker not written yet: its create may still be
        # taken back) from a checkpoint; the listing shows its marker missing, and the call
        # then writes nothing, as for an owner that is gone. Checking before writing is what
        # keeps this call from ever deleting what it wrote: a take-back of items written
        # for a pending owner could not tell them from those of the owner's own create,
        # which may be acknowledged by then.
        accepted, stored = await pair(
            functools.partial(self._afresh, run_key, functools.partial(
                self._read_at, io, run_key, owner, now, set(), owned=False)),
            functools.partial(self._stored_items, io, run_key, list(given)),
        )
        if accepted is None or accepted[0].checkpoint_id != checkpoint_id:
            return False
        record = accepted[0]
        token = secrets.token_bytes(_TOKEN_BYTES)
        # A request per item and marker: a cancellation waits for them all (settled), so a
        # cancelled call never stores some of the items and not the others.
        markers = await settled(gather([
            functools.partial(self._put_owned_item, io, run_key, hex_key, item, record, token,
                              if_absent, current, now)
            for (hex_key, item), current in zip(given.items(), stored, strict=True)
        ]))
        known = self._cached(run_key).owned.setdefault(owner, {})
        known.update({hex_key: marker for hex_key, marker in zip(given, markers, strict=True)
                      if marker is not None})
        return True

    async def _put_owned_item(
        self,
        io: Bucket,
        run_key: str,
        hex_key: str,
        item: Item,
        record: StoredCheckpoint,
        token: bytes,
        if_absent: bool,
        stored: tuple[bytes, str] | None,
        now: float,
    ) -> _ItemMarker | None:
        """Write one item owned by ``record`` and its marker; the marker when the item is
        owned by ``record`` afterwards (None: a live item of another owner was kept)."""
        body = ItemBody(item.value, record.sequence, record.expires_at, token,
                        checkpoint_id=record.checkpoint_id, run_key=run_key, key=item.key)
        meta = ItemMeta(record.sequence, record.expires_at)
        marker = layout.item_marker_key(run_key, hex_key, meta)
        old = None if stored is None else _marker_of_stored(run_key, hex_key, stored)
        if not if_absent:
            key = layout.item_object(run_key, hex_key)
            stale = [old] if old is not None and old != marker else []
            await self._clear_if_damaged(io, run_key, hex_key, stored, marker)
            (etag, marker_etag), _ = await pair(
                functools.partial(gather, [functools.partial(io.put, key, layout.encode(body)),
                                           functools.partial(io.put, marker, token)]),
                functools.partial(io.delete, stale),
            )
            return _ItemMarker(marker, hex_key, meta, marker_etag or "", etag or "")
        (etag, kept), marker_etag = await pair(
            functools.partial(self._put_item, io, run_key, hex_key, body, now, stored,
                              marker=marker),
            functools.partial(io.put, marker, token),
        )
        if kept is None:
            if old is not None and old != marker:
                await io.delete([old])  # the expired item it replaced
            return _ItemMarker(marker, hex_key, meta, marker_etag or "", etag or "")
        if _marker_for(run_key, hex_key, kept.owner, kept.expires_at) != marker:
            await io.delete([marker])  # the live item kept there is not this checkpoint's
            return None
        return _ItemMarker(marker, hex_key, meta, marker_etag or "", etag or "")

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
        check_run_key(run_key)
        check_flag("include_expired", include_expired)
        check_time("now", now)
        check_limit("limit", limit)
        if before is not None:
            check_int("before", before)
        io = await self._objects()
        if before is not None and before >= layout.SEQUENCE_SPAN:
            before = None
        return await self._afresh(run_key, functools.partial(
            self._headers, io, run_key, before, limit, now, include_expired))

    async def _headers(
        self,
        io: Bucket,
        run_key: str,
        before: int | None,
        limit: int,
        now: float,
        include_expired: bool,
    ) -> tuple[list[CheckpointHeader], str | None]:
        def wanted(view: _SlotView) -> bool:
            listing = view.listing
            return view.slot_etag is not None and (before is None or view.sequence < before) and (
                listing is None
                or (view.kind not in _NOT_HELD
                    and (include_expired or is_live(listing.expires_at, now)))
            )

        def enough(listed: _Listed) -> bool:
            return sum(1 for view in listed.slots.values() if wanted(view)) >= limit

        listed, known_from = await self._page(io, run_key, before, _page_for(limit), enough)
        current = await self._without_late(io, run_key, await self._resolve(io, run_key, listed))
        chosen = _chosen(current, before, limit, now, include_expired)
        if len(chosen) < limit and known_from:
            # Leftovers of another incarnation filled the page: take the rest of the run.
            listed, known_from = await self._page(
                io, run_key, before, layout.SEQUENCE_SPAN, lambda _: False
            )
            current = await self._without_late(io, run_key,
                                               await self._resolve(io, run_key, listed))
            chosen = _chosen(current, before, limit, now, include_expired)
        if current.state is None:
            return [], None
        if not include_expired and not chosen:
            # An empty page of a run read to its end from the top: no live checkpoint, so no
            # live run. Otherwise a newer checkpoint may be live: look at the head.
            alive = (before is not None or known_from > 0) and _as_listed(
                (await self._head(io, run_key, live_wanted=1, now=now))[0]).live(now)
            if not alive:
                return [], None
        headers = await gather([functools.partial(self._header, io, view) for view in chosen])
        if None in headers:
            raise _Superseded  # a long header's marker removed since it was listed
        return [header for header in headers if header is not None], current.state.status

    async def _without_late(self, io: Bucket, run_key: str, current: _Run) -> _Run:
        """``current`` for a read (see :func:`_as_listed`), without the slots read for want
        of a marker that lie below the floor and from which the run does not go on: commits
        that landed late in a freed key (see :meth:`_stands`). Costs nothing unless such a
        slot is listed."""
        current = _as_listed(current)
        floor = 0 if current.state is None else current.state.floor
        for view in [view for view in current.held if view.missing and view.sequence < floor]:
            if not await self._goes_on_from(io, run_key, view.sequence, _listing(view)):
                current.held.remove(view)
        return current

    async def _page(
        self,
        io: Bucket,
        run_key: str,
        before: int | None,
        first: int,
        enough: Callable[[_Listed], bool],
    ) -> tuple[_Listed, int]:
        """The slots below ``before`` and the run object's ETag: one LIST from the top, or
        (below ``before``) a LIST from there, then one of the run object."""
        if before is None:
            return await self._scan(io, run_key, first=first, enough=enough)
        if before <= 0:
            return _Listed(run_etag=await self._run_etag(io, run_key)), 0
        # The run object after the slots, not beside them: a run deleted meanwhile (its run
        # object goes first) is then found gone, not listed with part of its slots.
        listed, known_from = await self._scan(io, run_key, first=first, enough=enough,
                                              before=before)
        listed.run_etag = await self._run_etag(io, run_key)
        return listed, known_from

    async def _run_etag(self, io: Bucket, run_key: str) -> str | None:
        key = layout.run_object(run_key)
        found = await io.list(key, limit=1)
        return found[0].etag if found and found[0].key == key else None

    async def _header(self, io: Bucket, view: _SlotView) -> CheckpointHeader | None:
        """The header a listing shows; None when it is a long header (in the marker's body)
        whose marker was removed since it was listed."""
        listing = _listing(view)
        header = listing.header
        if header is None:  # a long header: in the marker's body
            assert view.marker is not None
            found = await io.get(view.marker)
            if found is None:
                return None
            header = found[0]
        return CheckpointHeader(
            sequence=view.sequence,
            checkpoint_id=listing.checkpoint_id,
            created_at=listing.created_at,
            expires_at=listing.expires_at,
            header=header,
        )

    @holds_clients
    async def delete(self, run_key: str, sequence: int, *, checkpoint_id: str) -> bool:
        check_run_key(run_key)
        sequence = check_sequence(sequence)
        checkpoint_id = cast(str, check_str("checkpoint_id", checkpoint_id))
        if not layout.valid_sequence(sequence):
            return False
        io = await self._objects()
        # The slot's last bytes with the listing (one round trip): its tombstone carries
        # what it names as its predecessor (``Slot.after``, after the payload).
        current, read = await pair(functools.partial(self._load, io, run_key),
                                   functools.partial(io.get_tail,
                                                     layout.slot_key(run_key, sequence),
                                                     _SLOT_TAIL))
        if current.damage is not None:
            raise current.damage
        self._adopt(run_key, current, 0)
        view = next((v for v in current.held if v.sequence == sequence), None)
        if view is None or _listing(view).checkpoint_id != checkpoint_id:
            return False
        assert view.slot_etag is not None
        listing = msgspec.structs.replace(_listing(view), header=None, token=b"")
        buried = await self._buried(io, run_key, view, listing, current, read)
        if buried is None:
            return False
        tombstone_keys, after = buried
        cached = self._cache.get(run_key)
        if cached is not None and cached.log is not None:
            cached.log.garbage[sequence] = tombstone_keys
        self._learn_buried(run_key, view, after)
        return True

    def _learn_buried(self, run_key: str, view: _SlotView, after: bytes) -> None:
        """Take the tombstone this process wrote over ``view`` (``delete``, or the cleanup
        loop burying an expired newest), carrying ``after``, as the one an append right
        after it names through (``_Log.buried``): an append made from this process's
        knowledge lists nothing, and would otherwise name no predecessor."""
        cached = self._cache.get(run_key)
        if (cached is not None and cached.log is not None and cached.state is not None
                and cached.state.incarnation == _listing(view).incarnation
                and view.sequence >= cached.log.latest):
            cached.log.buried = {view.sequence: after}

    async def _buried(
        self, io: Bucket, run_key: str, view: _SlotView, listing: Listing, current: _Run,
        read: tuple[bytes, str, bool] | None,
    ) -> tuple[list[str], bytes] | None:
        """The checkpoint replaced by a tombstone (:meth:`_bury`, ``read``: its slot as read
        with the listing), and what it owned or marked removed (each item only while it is
        the one it owned: see :func:`_owned_removals`); the tombstone's keys and the
        ``after`` it carries, or None when another delete won. Cut short (cancelled, killed)
        after the tombstone, its owned items outlive it until the delete is made again, the
        cleanup loop runs or an append prunes."""
        sequence = view.sequence
        after = await self._bury(io, run_key, view, listing, read)
        if after is None:
            return None
        listing = msgspec.structs.replace(listing, token=after)  # see _listing_of
        # The tombstone keeps the slot's key taken: a writer whose knowledge of the run is
        # older than this delete proposes this sequence at most, and must collide. Pruning
        # removes it later, once the run's floor is above it.
        owned = _owned_markers(self._cache.get(run_key), sequence, view.owned)
        tombstone_marker, (objects, markers) = await pair(
            functools.partial(self._put_marker, io, run_key, sequence, "t", listing),
            functools.partial(_owned_removals, io, run_key, owned, current.listed),
        )
        tombstone_keys = [layout.slot_key(run_key, sequence), tombstone_marker]
        own = [Listed(key, "") for key in _own_markers(view)]
        await pair(
            functools.partial(io.delete_listed, [*own, *markers, *objects]),
            functools.partial(self._ask_for_sweep, io, run_key, view.names_items),
        )
        self._discard(run_key, [sequence])
        return tombstone_keys, after

    async def _bury(
        self, io: Bucket, run_key: str, view: _SlotView, listing: Listing,
        read: tuple[bytes, str, bool] | None = None,
    ) -> bytes | None:
        """Replace a checkpoint's slot by a tombstone (``IfMatch`` on the slot listed): the
        removal that decides between concurrent deletes. Returns the ``after`` the tombstone
        carries (empty when unknown), or None when another delete won. A tombstone carries a
        write token, so a delete whose reply was lost recognises its own tombstone when the
        retry gets 412.

        The tombstone carries what the slot it replaces names as its predecessor
        (``Slot.after``): a create whose slot is that predecessor, checking after its
        commit that the run went on from it (:meth:`_follows`), must still find itself
        named once the checkpoint after it is deleted. So the slot's last bytes are read
        first (``read``: ``Bucket.get_tail``, when the caller read them with its listing;
        1 ranged GET otherwise): ``after`` is at the end, after the payload, which is not
        downloaded. When they do not show it (a slot naming many shared items, or whose
        marker shows no token), the whole slot is read (1 GET more). One that is not the
        slot listed any more (another ETag, or gone) is one the ``IfMatch`` would refuse:
        another delete won."""
        assert view.slot_etag is not None
        key = layout.slot_key(run_key, view.sequence)
        if read is None or read[1] != view.slot_etag:
            read = await io.get_tail(key, _SLOT_TAIL)
        if read is None or read[1] != view.slot_etag:
            return None
        after = None if read[2] else layout.after_in_tail(read[0], _listing(view).token,
                                                          run_key)
        if after is None and not read[2]:
            whole = await io.get(key)
            if whole is None or whole[1] != view.slot_etag:
                return None
            read = (whole[0], whole[1], True)
        if after is None:
            try:
                after = layout.decode_slot(read[0], io.where(key), run_key=run_key,
                                           sequence=view.sequence).after
            except CorruptCheckpointError:
                after = b""  # a damaged slot names nothing that can be told: buried all the same
        token = secrets.token_bytes(_TOKEN_BYTES)
        tombstone = Slot(listing.incarnation, view.sequence, listing.checkpoint_id,
                         listing.created_at, listing.expires_at, listing.appended_at, b"", b"",
                         tombstone=True, token=token, run_key=run_key,
                         replaced=_listing(view).token, after=after)
        etag = await io.put(key, layout.encode(tombstone), if_match=view.slot_etag)
        if etag is not None:
            return after
        found = await io.get(key)
        if found is None:
            return None
        slot = layout.decode_slot(found[0], io.where(key), run_key=run_key,
                                  sequence=view.sequence)
        return after if slot.tombstone and slot.token == token else None

    @holds_clients
    async def delete_run(self, run_key: str) -> int:
        check_run_key(run_key)
        io = await self._objects()
        current, listed = await self._unlinked(io, run_key)
        self._forget(run_key)
        slots = [entry for entry in listed if _is_slot(run_key, entry.key)]
        rest = [entry for entry in listed if not _is_slot(run_key, entry.key)]
        if current.damage is not None:
            index = await self._index_entries_of(io, run_key)  # the record cannot name them
        elif current.state is not None:
            index = layout.index_keys(run_key, current.state)
        else:
            index = []  # an earlier delete_run stopped part way: list_runs drops the entries
        rest += [Listed(key, "") for key in index]  # an incarnation's own: never reused
        # Each listed object only if unchanged: once the run object is gone a new life of
        # the run may begin, and it reuses slot keys. The slots before the rest: a reader
        # that finds an item or marker gone checks that its checkpoint's slot stands.
        await io.delete_listed(slots)
        await io.delete_listed(rest)
        return len(current.held)

    async def _unlinked(self, io: Bucket, run_key: str) -> tuple[_Run, list[Listed]]:
        """List the run and its items, then delete its run object, alone, on the condition
        that it is the one listed (else list again): S3 applies a ``DeleteObjects`` batch
        key by key, in no promised order, and a reader that sees any of the run's keys gone
        must find no run. Returns the run and what else was listed."""
        run_object = layout.run_object(run_key)
        tried: tuple[_Run, list[Listed]] | None = None
        for _ in range(_FLOOR_RACES):
            entries, items = await pair(
                functools.partial(io.list, layout.run_prefix(run_key)),
                functools.partial(io.list, layout.items_prefix(run_key)),
            )
            current = await self._resolve(io, run_key, _parse_run_listing(run_key, entries))
            rest = [entry for entry in [*entries, *items] if entry.key != run_object]
            if tried is not None and _life_ended(tried[0], current):
                # The life listed before lost its run object: to the delete just tried, its
                # reply lost (the driver's resend found it gone), or to another process's
                # delete, maybe followed by a new life. Finish that life as listed then: the
                # ETags spare a new life's objects at the same keys.
                return tried
            etag = current.listed.run_etag
            if etag is None:
                return current, rest
            if await io.delete_if(run_object, etag):
                return current, rest
            tried = current, rest
        raise StoreUnavailableError(
            f"delete_run of run {run_key}: its run object kept changing while it was deleted "
            "(status changes); its checkpoints were left as they were, try again")

    async def _index_entries_of(self, io: Bucket, run_key: str) -> list[str]:
        """Every index entry of the run, found by listing the whole index (a repair path)."""
        return [entry.key for entry in await io.list("index/")
                if layout.indexed_run_key(entry.key) == run_key]

    # -- runs ---------------------------------------------------------------------------------

    @holds_clients
    async def get_run(self, run_key: str, *, now: float) -> RunRecord | None:
        check_time("now", now)
        check_run_key(run_key)
        io = await self._objects()
        current = await self._afresh(run_key,
                                     functools.partial(self._load_as_listed, io, run_key))
        if current.damage is not None:
            raise current.damage
        self._adopt(run_key, current, 0)
        return current.record() if current.live(now) else None

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
        status = layout.check_status(status)
        incarnation = cast(str, check_str("incarnation", incarnation))
        check_int("version", version)
        check_bytes("data", data)
        check_time("now", now)
        latest_sequence = check_guard_arg(latest_sequence)
        io = await self._objects()
        current = await self._load(io, run_key)
        if current.damage is not None:
            raise current.damage
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
        check_head(run_key, current.latest_sequence, latest_sequence)
        new = msgspec.structs.replace(old, status=status, data=bytes(data), version=version + 1,
                                      updated_at=now)
        change = (self._change_status(io, run_key, old, current.etag, new)
                  if latest_sequence is None else self._guarded(io, run_key, current, new, now))
        # Several requests: a cancellation waits for them all (settled).
        new = await settled(change)
        current.state = new
        return current.record()

    async def _guarded(
        self, io: Bucket, run_key: str, current: _Run, new: RunState, now: float
    ) -> RunState:
        """A status change that applies only while the run's newest checkpoint is the one
        listed (``SupportsSequenceGuard``). S3 conditions a write on its own key only, and
        an append writes its slot, not the run object: so the change first claims the
        sequence after the newest with a *guard* (create-only, where the next append's slot
        goes), then compare-and-sets the run object, then removes the guard. An append that
        finds the guard at its sequence breaks it (:meth:`_break_guard`): while the run
        object is the one the guard names, it rewrites it first, so the change fails and
        reads the run again (finding the append); once the change applied, the append is
        ordered after it. 2 requests more than an unguarded change."""
        assert current.state is not None
        assert current.etag is not None
        sequence = current.next_sequence
        guard = _Guard(layout.slot_key(run_key, sequence), Slot(
            current.state.incarnation, sequence, "", now, None, now, b"", b"", tombstone=True,
            token=secrets.token_bytes(_TOKEN_BYTES), run_key=run_key, guards=current.etag))
        await self._place_guard(io, run_key, current, guard)
        try:
            return await self._change_status(io, run_key, current.state, current.etag, new,
                                             guard)
        finally:
            try:
                # Gone already if an append broke it (after the change applied, or making
                # it fail); one left (this call stopped) is broken by the next append.
                await io.delete_if(guard.key, guard.etag)
            except CheckpointError as exc:
                logger.warning("could not remove the guard %s of a status change (%s): the "
                               "next append at its sequence removes it", io.where(guard.key),
                               exc)

    async def _place_guard(self, io: Bucket, run_key: str, current: _Run, guard: _Guard) -> None:
        """Write ``guard`` create-only at its sequence. Taken by a checkpoint of the run's
        life: :class:`ConflictError` (newer checkpoints). By another status change's guard:
        broken (that change fails); when that took rewriting the run object, this change
        conflicts too (read the run again). By a leftover of an ended life of the run:
        replaced as a seal replaces one (its marker first, ``IfMatch`` on it), while the run
        object is still the one listed; else (a newer life may have written it) a
        conflict."""
        sequence = guard.slot.sequence
        body = layout.encode(guard.slot)
        await self._unmark_guard_key(io, run_key, current.listed, sequence)
        for _ in range(_FLOOR_RACES):
            written = await io.put(guard.key, body, if_none_match=True)
            found = None if written is not None else await io.get(guard.key)
            if found is not None:
                occupant = layout.decode_slot(found[0], io.where(guard.key), run_key=run_key,
                                              sequence=sequence)
                if occupant.token == guard.slot.token:
                    written = found[1]  # this very guard, its reply lost
                elif occupant.guards:
                    broken = await self._break_guard(io, run_key, sequence, found[1],
                                                     occupant.guards)
                    if broken is None or broken[1] != current.etag:
                        break
                    continue
                elif occupant.incarnation == guard.slot.incarnation:
                    check_head(run_key, sequence, sequence - 1)  # another process appended
                else:
                    run = await io.get(layout.run_object(run_key))
                    if run is None or run[1] != current.etag:
                        break  # a newer life may have begun: it is not a leftover then
                    # Its marker first, as a seal does: an append that listed the guard
                    # beside it would take the key for the leftover and replace the guard
                    # without breaking it.
                    kind = "t" if occupant.tombstone else "m"
                    await io.delete([_marker_of(io.prefix, run_key, sequence, kind,
                                                _listing_of(occupant))[0]])
                    written = await io.put(guard.key, body, if_match=found[1])
                    if written is not None:
                        left = current.listed.slots.get(sequence)
                        if left is not None:
                            await pair(
                                functools.partial(io.delete, _own_markers(left)),
                                functools.partial(_remove_marked, io, run_key, left.owned,
                                                  current.listed))
            if written is not None:
                guard.etag = written
                return
        raise ConflictError(f"run {run_key} changed concurrently; read it again and retry")

    async def _unmark_guard_key(
        self, io: Bucket, run_key: str, listed: _Listed, sequence: int
    ) -> None:
        """Before a guard is written at ``sequence``: remove the markers the change's listing
        showed there without their slot (a create taken back by a process that stopped
        before removing its marker). Listed beside the guard, such a marker would make it
        read as that checkpoint: readers would count it, and an append would take the key
        for it and go on past it without breaking the guard. A marker is written only after
        the slot it names (by its write token) was written or read, so one listed without
        that slot names a write that is gone, which no create still relies on (a PUT of the
        slot sent again and landing later leaves a slot without marker, which readers read).
        One naming shared items is a sweep's cue: the run's ``sweep/due`` takes its place
        first (a failure raises before anything else is written)."""
        view = listed.slots.get(sequence)
        if view is None or view.slot_etag is not None or view.marker is None:
            return
        if view.names_items and listed.sweep_due is None:
            await io.put(layout.sweep_due(run_key), secrets.token_bytes(_TOKEN_BYTES))
        await io.delete(_own_markers(view))

    async def _renew_guard(self, io: Bucket, guard: _Guard, etag: str) -> bool:
        """Make ``guard`` name the run object's new ``etag`` (a writer raised the floor or
        listed nested items meanwhile) before the change is tried on it: whether it still
        stood (an append broke it: the change must not apply)."""
        renewed = msgspec.structs.replace(guard.slot, guards=etag)
        body = layout.encode(renewed)
        written = await io.put(guard.key, body, if_match=guard.etag)
        if written is None:
            found = await io.get(guard.key)  # this very write, its reply lost?
            if found is None or found[0] != body:
                return False
            written = found[1]
        guard.slot, guard.etag = renewed, written
        return True

    async def _change_status(
        self, io: Bucket, run_key: str, old: RunState, etag: str, new: RunState,
        guard: _Guard | None = None,
    ) -> RunState:
        """:meth:`_change_run`, then the by-status index follows the run object (readers
        check entries against it). The new status's entry is written even when the status
        is unchanged: a call that failed, or a process killed, once the run object changed
        left it missing, and the call made again (same status by then) puts it back."""
        new = await self._change_run(io, run_key, old, etag, new, guard)
        await io.put(layout.status_entry(run_key, new), b"")
        if new.status != old.status:
            await io.delete([layout.status_entry(run_key, old)])
        return new

    async def _change_run(
        self, io: Bucket, run_key: str, old: RunState, etag: str, new: RunState,
        guard: _Guard | None = None,
    ) -> RunState:
        """Compare-and-set the run object from ``old`` (at ``etag``) to ``new``. A writer
        raising the floor or changing which items have nested items meanwhile is no
        conflict: the higher floor and the other writer's list are kept, and the write tried
        again (a ``guard``, see :meth:`_guarded`, renewed first to name the new ETag)."""
        key = layout.run_object(run_key)
        for _ in range(_FLOOR_RACES):
            written = await io.put(key, layout.encode(new), if_match=etag)
            if written is not None:
                self._remember(run_key, written, new)
                return new
            found = await _damage_as_value(self._read_state, io, run_key)
            if not isinstance(found, tuple):
                break
            latest, etag = found
            if latest == new:
                return new  # applied, its reply lost: the retry found our own write
            if msgspec.structs.replace(latest, floor=old.floor, nesting=old.nesting,
                                       nesting_all=old.nesting_all) != old:
                break
            new = msgspec.structs.replace(new, floor=max(new.floor, latest.floor),
                                          nesting=latest.nesting,
                                          nesting_all=latest.nesting_all)
            if guard is not None and (latest.floor > guard.slot.sequence
                                      or not await self._renew_guard(io, guard, etag)):
                # A floor above the guard's key: appends pruned past it (the run has newer
                # checkpoints), and the key may have been free when the guard took it.
                break
        raise ConflictError(f"run {run_key} changed concurrently; read it again and retry")

    async def _written(self, io: Bucket, run_key: str, state: RunState) -> str | None:
        """After a failed compare-and-set: the ETag if the run object holds ``state`` anyway
        (the write was applied, its reply lost, and the retry found its own write)."""
        found = await _damage_as_value(self._read_state, io, run_key)
        if isinstance(found, tuple) and found[0] == state:
            return found[1]
        return None

    @holds_clients
    async def list_runs(
        self, *, status: str | None, limit: int, cursor: str | None, now: float
    ) -> tuple[list[RunRecord], str | None]:
        if status is not None:
            status = layout.check_status(status)
        io = await self._objects()
        return await self._page_index(io, layout.index_prefix(status), status, limit, cursor,
                                      now)

    @holds_clients
    async def runs_with_label(
        self, label: str, *, limit: int, cursor: str | None, now: float
    ) -> tuple[list[RunRecord], str | None]:
        check_labels((label,))
        io = await self._objects()
        return await self._page_index(io, layout.label_prefix(label), None, limit, cursor, now,
                                      label=label)

    async def _page_index(
        self,
        io: Bucket,
        prefix: str,
        status: str | None,
        limit: int,
        cursor: str | None,
        now: float,
        label: str | None = None,
    ) -> tuple[list[RunRecord], str | None]:
        """A page of the live runs indexed under ``prefix`` (newest created first)."""
        cursor = check_str("cursor", cursor, optional=True)
        limit = check_limit("limit", limit)
        check_time("now", now)
        start_after = None if cursor is None else _decode_cursor(cursor, prefix)
        result: list[RunRecord] = []
        page_size = min(max(limit, 50), 1000)
        if limit <= 0:
            return [], cursor
        while True:
            page = await io.list(prefix, start_after=start_after, limit=page_size)
            records = await self._indexed(io, page, prefix, status, now, label)
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
        self,
        io: Bucket,
        page: Sequence[Listed],
        prefix: str,
        status: str | None,
        now: float,
        label: str | None = None,
    ) -> list[RunRecord | None]:
        """The live run of each index entry (None for an entry of no live run, or of a run
        without ``status`` or ``label``). Entries of runs that were deleted or started over
        are removed on the way: their incarnation never lives again."""
        stale: list[str] = []

        async def record(entry: Listed) -> RunRecord | None:
            parsed = layout.parse_index_entry(entry.key, prefix)
            if parsed is None:
                return None
            run_key, incarnation = parsed
            current = await self._afresh(run_key,
                                         functools.partial(self._load_as_listed, io, run_key))
            if current.damage is not None:
                return None  # logged by _resolve
            state = current.state
            if state is None or state.incarnation != incarnation:
                stale.append(entry.key)
                return None
            if not current.live(now):
                return None  # expired: the cleanup loop removes its entries with it
            if status is not None and state.status != status:
                return None  # a stale entry: the status moved on
            if label is not None and label not in state.labels:
                return None  # an entry copied from another label's: not the run's own
            return current.record()

        records = await gather([functools.partial(record, entry) for entry in page])
        if stale:
            try:
                await io.delete(stale)
            except CheckpointError:
                logger.warning("could not remove %d index entries of deleted runs under %s",
                               len(stale), io.where(prefix), exc_info=True)
        return records

    @holds_clients
    async def count_runs(self, *, status: str | None, now: float) -> int:
        check_time("now", now)
        if status is not None:
            status = layout.check_status(status)
        io = await self._objects()
        prefix = layout.index_prefix(status)
        entries = await io.list(prefix)
        records = await self._indexed(io, entries, prefix, status, now)
        return sum(1 for record in records if record is not None)

    # -- repair ---------------------------------------------------------------------------------

    @holds_clients
    async def damaged_runs(
        self, *, run_key: str | None = None, now: float
    ) -> list[RunDamage]:
        if run_key is not None:
            check_run_key(run_key)
        check_time("now", now)
        io = await self._objects()
        if run_key is not None:
            groups = [(run_key, await io.list(layout.run_prefix(run_key)))]
        else:
            groups = list(_by_run(await io.list("runs/")))
        found = await gather([functools.partial(self._damage_of, io, key, entries)
                              for key, entries in groups])
        return [damage for damage in found if damage is not None]

    async def _damage_of(
        self, io: Bucket, run_key: str, entries: list[Listed]
    ) -> RunDamage | None:
        listed = _parse_run_listing(run_key, entries)
        if listed.run_etag is None:
            return None
        current = await self._resolve(io, run_key, listed)
        damage = current.damage
        if damage is None:
            return None
        newest = await self._header(io, current.held[-1]) if current.held else None
        if current.held and newest is None:
            marker = current.held[-1].marker
            raise StoreError(f"listing marker {io.where(marker or '')} vanished while read")
        return RunDamage(
            run_key=run_key,
            key=damage.key,
            problem=str(damage).removesuffix(f" (store key: {damage.key})"),
            checkpoints=len(current.held),
            newest=newest,
        )

    @holds_clients
    async def rebuild_run(self, run_key: str, seed: RunRecord, *, now: float) -> RunRecord:
        check_run_key(run_key)
        check_time("now", now)
        if not isinstance(seed, RunRecord):
            raise ValidationError(f"seed must be a RunRecord, got {type(seed).__name__}")
        status = layout.check_status(seed.status)
        labels = check_labels(seed.labels)
        io = await self._objects()
        current = await self._load(io, run_key)
        where = io.where(layout.run_object(run_key))
        if current.damage is None:
            raise ConflictError(f"the run record {where} is not damaged: nothing to rebuild")
        if current.state is None or current.etag is None or not current.held:
            raise CheckpointNotFound(
                f"the run record {where} is damaged and its log holds no intact checkpoint "
                "to rebuild it from; delete the run"
            )
        unreadable = [view for view in current.orphans if view.damage is not None]
        # Which keys were freed before is lost with the damaged object: none at or above the
        # next sequence was. An unreadable slot's sequence is never handed out again.
        floor = max([current.latest_sequence, *(view.sequence for view in unreadable)]) + 1
        if any(view.damage is current.damage for view in unreadable):
            # Only a slot is damaged: the run object is intact and keeps what it holds.
            old = current.state
            state = msgspec.structs.replace(old, floor=max(old.floor, floor))
        else:
            oldest = _listing(current.held[0])
            state = RunState(seed.run_id, current.state.incarnation, status, oldest.created_at,
                             now, 0, bytes(seed.data), floor=floor, labels=labels,
                             nesting_all=True)
        # Compare-and-set over the damaged bytes: a concurrent repair or writer wins alone.
        etag = await io.put(layout.run_object(run_key), layout.encode(state),
                            if_match=current.etag)
        if etag is None:
            etag = await self._written(io, run_key, state)
        if etag is None:
            raise ConflictError(f"the run record {where} changed while it was rebuilt")
        self._remember(run_key, etag, state)
        wanted = layout.index_keys(run_key, state)
        stale = [key for key in await self._index_entries_of(io, run_key) if key not in wanted]
        # An unreadable slot is kept (as evidence) and marked deleted: its sequence is taken.
        dead = Listing(state.incarnation, "", now, None, now)
        buried = [_marker_of(io.prefix, run_key, view.sequence, "t", dead)[0]
                  for view in unreadable]
        await pair(
            functools.partial(gather, [functools.partial(io.put, key, b"")
                                       for key in (*wanted, *buried)]),
            functools.partial(io.delete, stale),
        )
        for view in unreadable:
            view.kind, view.listing, view.damage = "t", dead, None
        return _Run(state, etag, current.listed).record()

    # -- items ----------------------------------------------------------------------------------

    @holds_clients
    async def put_items(
        self, run_key: str, items: Sequence[Item], *, create_only: bool = False, now: float
    ) -> None:
        check_run_key(run_key)
        check_flag("create_only", create_only)
        check_time("now", now)
        check_items(items)
        latest: dict[str, Item] = {}
        for item in items:
            latest[layout.hex_item_key(item.key)] = item
        if not latest:
            return
        io = await self._objects()
        # What each key holds now: the marker to replace is found from it, and create_only
        # is checked against it before anything is written.
        found = dict(zip(latest, await self._stored_items(io, run_key, list(latest)),
                         strict=True))
        if create_only:
            for hex_key, stored in found.items():
                if stored is not None and _live_item(run_key, hex_key, stored, now):
                    raise ConflictError(f"item {latest[hex_key].key!r} already exists")
        # A request per item, then per marker: a cancellation waits for them all (settled),
        # so a cancelled call never stores some of the items and not the others.
        await settled(self._put_latest(io, run_key, latest, found, create_only, now))

    async def _put_latest(
        self,
        io: Bucket,
        run_key: str,
        latest: dict[str, Item],
        found: dict[str, tuple[bytes, str] | None],
        create_only: bool,
        now: float,
    ) -> None:
        token = secrets.token_bytes(_TOKEN_BYTES)
        etags = await gather([
            functools.partial(self._put_given, io, run_key, hex_key, item, token, create_only,
                              found[hex_key], now)
            for hex_key, item in latest.items()
        ])
        wanted = {hex_key: marker for hex_key, item in latest.items()
                  if (marker := _marker_for(run_key, hex_key, item.owner, item.expires_at))
                  is not None}
        old = {hex_key: None if stored is None else _marker_of_stored(run_key, hex_key, stored)
               for hex_key, stored in found.items()}
        marker_etags, _ = await pair(
            functools.partial(gather, [functools.partial(io.put, marker, token)
                                       for marker in wanted.values()]),
            functools.partial(io.delete, [marker for hex_key, marker in old.items()
                                          if marker is not None
                                          and marker != wanted.get(hex_key)]),
        )
        written = dict(zip(latest, etags, strict=True))
        markers: list[_ItemMarker] = []
        for (hex_key, marker), marker_etag in zip(wanted.items(), marker_etags, strict=True):
            meta = ItemMeta(latest[hex_key].owner, latest[hex_key].expires_at)
            markers.append(_ItemMarker(marker, hex_key, meta, marker_etag or "",
                                       written[hex_key]))
        self._know_owners(run_key, found, markers)

    async def _put_given(
        self,
        io: Bucket,
        run_key: str,
        hex_key: str,
        item: Item,
        token: bytes,
        create_only: bool,
        stored: tuple[bytes, str] | None,
        now: float,
    ) -> str:
        """Write one item; the ETag of the object written."""
        body = ItemBody(item.value, item.owner, item.expires_at, token, run_key=run_key,
                        key=item.key)
        marker = _marker_for(run_key, hex_key, item.owner, item.expires_at)
        if not create_only:
            await self._clear_if_damaged(io, run_key, hex_key, stored, marker)
            etag = await io.put(layout.item_object(run_key, hex_key), layout.encode(body))
            return etag or ""
        etag, kept = await self._put_item(io, run_key, hex_key, body, now, stored,
                                          marker=marker)
        if kept is not None:
            raise ConflictError(f"item {item.key!r} was created concurrently")
        return etag or ""

    def _know_owners(
        self,
        run_key: str,
        found: dict[str, tuple[bytes, str] | None],
        markers: Sequence[_ItemMarker],
    ) -> None:
        """Keep what this process knows of owned items (pruning removes them by it) in step
        with a ``put_items`` (``markers``: those of the items it wrote)."""
        owned = self._cached(run_key).owned
        for hex_key in found:
            for items in owned.values():
                items.pop(hex_key, None)
        for marker in markers:
            if marker.meta.owner is not None:
                owned.setdefault(marker.meta.owner, {})[marker.hex_key] = marker

    async def _stored_items(
        self, io: Bucket, run_key: str, hex_keys: Sequence[str]
    ) -> list[tuple[bytes, str] | None]:
        return await gather([functools.partial(io.get, layout.item_object(run_key, hex_key))
                             for hex_key in hex_keys])

    @holds_clients
    async def get_items(
        self, run_key: str, keys: Sequence[str], *, now: float
    ) -> dict[str, bytes]:
        check_run_key(run_key)
        check_time("now", now)
        wanted = list(dict.fromkeys(check_keys(keys)))
        if not wanted:
            return {}
        io = await self._objects()
        hex_keys = [layout.hex_item_key(key) for key in wanted]
        bodies = await self._read_items(io, run_key, hex_keys, now)
        return {key: body for key, body in zip(wanted, bodies, strict=True) if body is not None}

    async def _read_items(
        self, io: Bucket, run_key: str, hex_keys: Sequence[str], now: float, *,
        skip_damaged: bool = False,
    ) -> list[bytes | None]:
        """The live values at ``hex_keys`` (None where there is none). A damaged item raises
        :class:`CorruptCheckpointError` naming it, or with ``skip_damaged`` (a scan) is
        logged and read as absent."""

        async def read(hex_key: str) -> bytes | None:
            key = layout.item_object(run_key, hex_key)
            found = await io.get(key)
            if found is None:
                return None
            try:
                item = layout.decode_item(found[0], io.where(key), run_key=run_key,
                                          hex_key=hex_key)
            except CorruptCheckpointError as exc:
                if not skip_damaged:
                    raise
                logger.warning("skipping a damaged item in a scan: %s", exc)
                return None
            return item.value if is_live(item.expires_at, now) else None

        return await gather([functools.partial(read, hex_key) for hex_key in hex_keys])

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
        check_run_key(run_key)
        check_flag("reverse", reverse)
        prefix = cast(str, check_utf8("prefix", prefix))
        start_after = check_utf8("start_after", start_after, optional=True)
        check_time("now", now)
        if check_limit("limit", limit) <= 0:
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
        # An object whose name is no item key of ours (put there by something else) is skipped.
        named = {hex_key: layout.item_key_of(hex_key) for hex_key in candidates}
        candidates = [hex_key for hex_key in candidates if named[hex_key] is not None]
        result: list[tuple[str, bytes]] = []
        # A page is short only at the end (callers read it so): what a chunk left out
        # (expired or damaged items) is made up for from the next chunk.
        for start in range(0, len(candidates), limit):
            chunk = candidates[start : start + limit]
            values = await self._read_items(io, run_key, chunk, now, skip_damaged=True)
            for hex_key, value in zip(chunk, values, strict=True):
                item_key = named[hex_key]
                if value is not None and item_key is not None and len(result) < limit:
                    result.append((item_key, value))
            if len(result) >= limit:
                break
        return result

    @holds_clients
    async def delete_items(self, run_key: str, keys: Sequence[str]) -> int:
        check_run_key(run_key)
        wanted = list({layout.hex_item_key(key): None for key in check_keys(keys)})
        if not wanted:
            return 0
        io = await self._objects()
        found = await self._stored_items(io, run_key, wanted)
        present = {hex_key: stored for hex_key, stored in zip(wanted, found, strict=True)
                   if stored is not None}
        if not present:
            return 0
        # The items, then their markers: cut short in between, a checkpoint that lists an
        # item whose object is gone reads it absent, as after the call (its marker gone
        # first, the item would stay, read by get_items and not with its checkpoint).
        markers = [marker for hex_key, stored in present.items()
                   if (marker := _marker_of_stored(run_key, hex_key, stored)) is not None]
        await io.delete([layout.item_object(run_key, hex_key) for hex_key in present])
        await io.delete(markers)
        cached = self._cache.get(run_key)
        if cached is not None:
            for items in cached.owned.values():
                for hex_key in present:
                    items.pop(hex_key, None)
        return len(present)

    # -- maintenance ----------------------------------------------------------------------------

    @holds_clients
    async def purge_expired(self, *, now: float, limit: int) -> tuple[int, bool]:
        check_time("now", now)
        check_limit("limit", limit)
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
            try:
                checkpoints, things, more = await self._purge_run(
                    io, run_key, listed, now, limit - work
                )
            except (CorruptCheckpointError, ConflictError) as exc:
                # One damaged record, or a run whose status changes kept renewing a guard
                # the cleanup broke, must not stop the cleanup of every other run.
                logger.warning("cleanup skipped run %s: %s", run_key, exc)
                continue
            removed += checkpoints
            work += things
            left = left or more
        return removed, not left

    async def _purge_run(
        self, io: Bucket, run_key: str, listed: _Listed, now: float, budget: int
    ) -> tuple[int, int, bool]:
        """Purge one run: ``(checkpoints removed, things removed, more left)``."""
        current = await self._resolve(io, run_key, listed)
        if current.damage is not None:
            return 0, 0, False  # logged by _resolve; rebuild_run repairs it, then it is purged
        if current.state is not None and not current.live(now):
            if current.being_created() and not current.abandoned(now):
                return 0, 0, False
            return await self._purge_dead_run(io, run_key, current, now)
        healed = await self._heal(io, run_key, current)
        for view in current.guards:
            # A status change that stopped between its guard and removing it: broken once it
            # is older than any change takes (a live one then fails and reads the run again).
            if view.slot_etag is not None and now - _listing(view).appended_at \
                    >= CREATION_GRACE_SECONDS:
                await self._break_guard(io, run_key, view.sequence, view.slot_etag, view.guards)
        removed = 0
        things = 0
        keys: list[str] = []
        gone: list[int] = []
        expired = [v for v in current.held if not is_live(_listing(v).expires_at, now)]
        more = len(expired) > budget
        head = current.latest_sequence
        batch = expired[:budget]
        # Tombstones below the newest (deleted checkpoints) go too, once the floor allows.
        buried = [view for view in current.tombstones if view.sequence < head]
        if not healed or not await self._floor_above(io, run_key, current, [*batch, *buried]):
            # A marker at or above the floor could not be written (the floor stays below
            # it), one below it sits beside a damaged slot (readers read it while that slot
            # stands), or the run object changed since it was listed: only the newest (it stays
            # as a tombstone) goes now; the next pass removes the others.
            more = more or len(batch) > 1
            batch = [view for view in batch if view.sequence == head]
            buried = []
        sweep = False  # whether a checkpoint naming shared items is gone
        for view in batch:
            things += 1
            if await self._remove_expired(io, run_key, view, newest=view.sequence == head):
                removed += 1
                gone.append(view.sequence)
                sweep = sweep or view.names_items
                keys += [*([view.marker] if view.marker else []), *view.extra]
                keys += _owned_keys(run_key, listed, {view.sequence})
        orphans = [view for view in current.orphans
                   if (current.state is None or view.sequence < head)
                   and not _fresh_seal(view, now)]
        for view in orphans:
            gone.append(view.sequence)
            sweep = sweep or view.names_items  # e.g. the marker a pruned checkpoint left
            keys += _own_markers(view)
        for view in buried:
            gone.append(view.sequence)
            keys += _marker_keys_of(view)
        keys += [key for view in current.tombstones[-1:] if view.sequence == head
                 for key in view.extra]  # the newest stays; what a delete cut short left goes
        for view in current.held:
            left = _leftover_markers(view)
            keys += left
            sweep = sweep or any(found[1].refs for found in map(_marker_of_key, left) if found)
        marked, expired_items = _marked_for_purge(current, orphans, head, now)
        things += expired_items
        if current.state is None:
            keys += listed.sweep_keys(run_key)  # the run is gone, its items with it
        elif sweep or listed.sweep_due is not None or listed.lease is not None:
            swept, unfinished = await self._sweep_run(io, run_key, listed, set(gone), now,
                                                      max(budget - things, 1))
            things += swept
            more = more or unfinished
        await pair(
            functools.partial(_delete_leftovers, io, run_key, [*orphans, *buried], keys),
            functools.partial(_remove_marked, io, run_key, marked, listed),
        )
        self._discard(run_key, gone)
        return removed, things, more

    async def _sweep_run(
        self, io: Bucket, run_key: str, listed: _Listed, gone: set[int], now: float,
        budget: int,
    ) -> tuple[int, bool]:
        """Sweep the run's shared items: ``(items removed, more left)``. When the sweep
        cannot finish now (another runs, an append stopped it, the budget ran out), the run
        is marked for the next pass, so no cue for it is lost with the markers deleted now."""
        removed, completed, more = await self._sweep(io, run_key, listed, gone, now, budget)
        if not completed:
            if listed.sweep_due is None:
                await self._ask_for_sweep(io, run_key)
        elif listed.sweep_due is not None:
            await io.delete_if(layout.sweep_due(run_key), listed.sweep_due)
        return removed, more

    async def _sweep(
        self, io: Bucket, run_key: str, listed: _Listed, gone: set[int], now: float,
        budget: int,
    ) -> tuple[int, bool, bool]:
        """Remove the shared items that no checkpoint the run holds names, nor nests under
        an item it names, with what is nested under them (mark and sweep): ``(items
        removed, completed, more left)``.

        The doomed items are published in a lease object before anything is deleted. An
        append naming one of them checks the lease after its commit: while the sweep still
        collects, the append rewrites the lease without them and the sweep deletes nothing;
        once it deletes, the append is taken back. The sweep lists the run's newest
        checkpoints again after taking the lease, so an append that landed before that keeps
        what it names, and one that lands after it finds the lease. Once done, the lease
        stays, without doomed items, remembering what was removed for ``REMOVED_SECONDS``:
        an append landing after the sweep, naming an item it removed, is taken back too."""
        held = [view for view in listed.slots.values()
                if view.slot_etag is not None and view.sequence not in gone]
        named = await self._named(io, run_key, held)
        doomed, more = _within(await self._unnamed(io, run_key, listed, named), budget)
        if not doomed:
            if listed.lease is not None:
                await self._drop_stale_lease(io, run_key, now)
            return 0, True, False
        token = secrets.token_bytes(_TOKEN_BYTES)
        taken = await self._take_lease(
            io, run_key, SweepLease(False, token, now, tuple(doomed), tuple(doomed.values())),
            now, exists=listed.lease is not None)
        if taken is None:
            return 0, False, False  # another sweep runs: it removes what this one would
        etag, lease = taken
        fresh = await self._named_since(io, run_key, listed)
        doomed = _spared(doomed, {hex_key for hex_key in doomed if _held(hex_key, fresh)})
        deleting = msgspec.structs.replace(lease, deleting=True, doomed=tuple(doomed),
                                           etags=tuple(doomed.values()))
        written = await self._put_lease(io, run_key, deleting, if_match=etag)
        if written is None:
            return 0, False, False  # an append naming a doomed item stopped it
        deleted = await self._delete_nested_first(io, run_key, doomed)
        removed = tuple(Removed(hex_key, item_etag, now) for hex_key, item_etag
                        in doomed.items() if hex_key in deleted)
        done = msgspec.structs.replace(deleting, deleting=False, doomed=(), etags=(),
                                       removed=(*deleting.removed, *removed))
        await self._unnest(io, run_key, listed.run_etag,
                           {key for key in map(layout.item_key_of, deleted) if key is not None})
        if await self._put_lease(io, run_key, done, if_match=written) is None:
            logger.warning("run %s: a sweep's lease changed under it; appends naming the "
                           "items it removed are refused until the lease is taken over",
                           run_key)
        return len(deleted), not more, more

    async def _unnest(
        self, io: Bucket, run_key: str, etag: str | None, removed: set[str]
    ) -> None:
        """Once the sweep removed shared items (with what was nested under them), the run
        object stops listing them as having nested items (compare-and-set; 1 PUT, only when
        it listed one). Best effort: a key left listed costs reads of checkpoints naming it
        (none is held now) a LIST each, and counts towards the capacity."""
        try:
            found = await self._state(io, run_key, etag)
            for _ in range(_FLOOR_RACES):
                if found is None or not any(key in found[0].nesting for key in removed):
                    return
                state, etag = found
                if await self._cas_run(io, run_key, etag,
                                       layout.nesting_without(state, removed)):
                    return
                found = await self._read_state(io, run_key)
        except CheckpointError as exc:
            failure: CheckpointError | None = exc
        else:
            failure = None
        logger.warning("run %s: its run object still lists removed items as having nested "
                       "items (reads of checkpoints naming them list what is under them)",
                       run_key, exc_info=failure)

    async def _delete_nested_first(
        self, io: Bucket, run_key: str, doomed: Mapping[str, str]
    ) -> set[str]:
        """Delete the doomed items (each ``IfMatch`` its ETag), the deepest nested first, one
        round trip per level: an item is deleted only once every doomed item nested under it
        is, so a sweep that stops part way never leaves an item of a removed anchor to be
        read with a new item at that key. The hex keys deleted."""
        levels: dict[int, list[str]] = {}
        keys = set(doomed)
        for hex_key in doomed:
            depth = sum(1 for anchor in layout.anchors_of(hex_key) if anchor in keys)
            levels.setdefault(depth, []).append(hex_key)
        deleted: set[str] = set()
        for depth in sorted(levels, reverse=True):
            level = levels[depth]
            results = await gather([
                functools.partial(io.delete_if, layout.item_object(run_key, hex_key),
                                  doomed[hex_key])
                for hex_key in level
            ], parallel=WIDE)
            deleted.update(hex_key for hex_key, done in zip(level, results, strict=True) if done)
        return deleted

    async def _named(
        self, io: Bucket, run_key: str, views: Iterable[_SlotView]
    ) -> set[str]:
        """Hex keys of the items the checkpoints of ``views`` name (their slots are read,
        once per process: a slot never changes under its ETag)."""

        async def refs_of(view: _SlotView) -> frozenset[str]:
            assert view.slot_etag is not None
            known = self._refs.get((run_key, view.sequence, view.slot_etag))
            if known is not None:
                return known
            key = layout.slot_key(run_key, view.sequence)
            found = await io.get(key)
            if found is None:
                return frozenset()  # removed since it was listed: it names nothing now
            slot = layout.decode_slot(found[0], io.where(key), run_key=run_key,
                                      sequence=view.sequence)
            return self._remember_refs(run_key, view.sequence, found[1], slot)

        found = await gather([functools.partial(refs_of, view) for view in views
                              if view.names_items])
        return set().union(*found)

    def _remember_refs(self, run_key: str, sequence: int, etag: str, slot: Slot) -> frozenset[str]:
        refs = frozenset(layout.hex_item_key(ref) for ref in slot.refs)
        self._refs[(run_key, sequence, etag)] = refs
        while len(self._refs) > _REFS_CACHE:
            self._refs.popitem(last=False)
        return refs

    async def _unnamed(
        self, io: Bucket, run_key: str, listed: _Listed, named: set[str]
    ) -> dict[str, str]:
        """What the sweep removes, with ETags, in key order: the run's shared items neither
        in ``named`` nor nested under an item in it, and the loose items (``put_items``,
        no owner, no expiry) nested under a shared item it removes. Items with a marker
        (owned or expiring) are neither; others are read once per process to tell."""
        base = layout.items_prefix(run_key)
        marked = {marker.hex_key for marker in listed.item_markers}
        candidates = {entry.key[len(base):]: entry.etag for entry in await io.list(base)}
        candidates = {hex_key: etag for hex_key, etag in candidates.items()
                      if hex_key not in marked and not _held(hex_key, named)
                      and layout.item_key_of(hex_key) is not None}
        unknown = [hex_key for hex_key, etag in candidates.items()
                   if (run_key, hex_key, etag) not in self._verdicts]
        found = await self._stored_items(io, run_key, unknown)
        for hex_key, stored in zip(unknown, found, strict=True):
            if stored is not None and stored[1] == candidates[hex_key]:
                self._verdicts[(run_key, hex_key, stored[1])] = _kind(run_key, hex_key, stored)
        while len(self._verdicts) > _REFS_CACHE:
            self._verdicts.popitem(last=False)
        kinds = {hex_key: self._verdicts.get((run_key, hex_key, etag), "")
                 for hex_key, etag in candidates.items()}
        shared = {hex_key for hex_key, kind in kinds.items() if kind == "shared"}
        return {hex_key: etag for hex_key, etag in candidates.items()
                if hex_key in shared
                or (kinds[hex_key] == "loose" and layout.nested_under(hex_key, shared))}

    async def _named_since(self, io: Bucket, run_key: str, listed: _Listed) -> set[str]:
        """Hex keys of the items named by checkpoints that landed since ``listed`` was
        read: the run's newest slots are listed down to one that was there already."""
        before = {sequence: view.slot_etag for sequence, view in listed.slots.items()
                  if view.slot_etag is not None}

        def reached(seen: _Listed) -> bool:
            return any(view.slot_etag is not None and before.get(sequence) == view.slot_etag
                       for sequence, view in seen.slots.items())

        seen, _ = await self._scan(io, run_key, first=_page_for(2), enough=reached)
        fresh = [view for sequence, view in seen.slots.items()
                 if view.slot_etag is not None and before.get(sequence) != view.slot_etag]
        return await self._named(io, run_key, fresh)

    async def _take_lease(
        self, io: Bucket, run_key: str, lease: SweepLease, now: float, *, exists: bool
    ) -> tuple[str, SweepLease] | None:
        """The run's sweep lease for ``lease``: its ETag and the lease written (with what the
        lease in place remembers), or None while another sweep holds it. A lease without a
        sweep in progress is taken over, and one left by a sweep that stopped once it is
        stale. ``exists``: a lease was listed (no create-only PUT is tried then)."""
        if not exists:
            etag = await self._put_lease(io, run_key, lease)
            if etag is not None:
                return etag, lease
        key = layout.sweep_lease(run_key)
        found = await io.get(key)
        if found is None:
            etag = await self._put_lease(io, run_key, lease)
            return None if etag is None else (etag, lease)
        held = _lease_of(found[0], io.where(key))
        if held is not None and held.doomed and now < held.since + SWEEP_LEASE_SECONDS:
            return None
        lease = msgspec.structs.replace(lease, removed=_remembered(held, now))
        etag = await self._put_lease(io, run_key, lease, if_match=found[1])
        return None if etag is None else (etag, lease)

    async def _put_lease(
        self, io: Bucket, run_key: str, lease: SweepLease, *, if_match: str | None = None
    ) -> str | None:
        """Write the lease, create-only or over ``if_match``; its ETag, or None when the
        condition failed (also recognises its own write after a lost reply)."""
        key = layout.sweep_lease(run_key)
        etag = await io.put(key, layout.encode(lease), if_none_match=if_match is None,
                            if_match=if_match)
        if etag is not None:
            return etag
        found = await io.get(key)
        if found is not None and _lease_of(found[0], io.where(key)) == lease:
            return found[1]
        return None

    async def _drop_stale_lease(self, io: Bucket, run_key: str, now: float) -> None:
        """Clear a lease left by a sweep that stopped (what it may have removed is
        remembered), and remove the lease once it remembers nothing recent."""
        key = layout.sweep_lease(run_key)
        found = await io.get(key)
        if found is None:
            return
        held = _lease_of(found[0], io.where(key))
        if held is not None and held.doomed and now < held.since + SWEEP_LEASE_SECONDS:
            return  # a sweep in progress
        removed = _remembered(held, now)
        if not removed:
            await io.delete_if(key, found[1])
        elif held is None or held.doomed or removed != held.removed:
            idle = SweepLease(False, secrets.token_bytes(_TOKEN_BYTES), now, (), (), removed)
            await io.put(key, layout.encode(idle), if_match=found[1])

    async def _floor_above(
        self, io: Bucket, run_key: str, current: _Run, views: Sequence[_SlotView]
    ) -> bool:
        """Before the slots of ``views`` are deleted (the newest is never: it is buried):
        make sure the run's floor is above them. False when the run object changed since
        it was listed."""
        head = current.latest_sequence
        opened = max((view.sequence for view in views if view.sequence != head), default=-1)
        state, etag = current.state, current.etag
        if opened < 0 or state is None or opened < state.floor:
            return True
        assert etag is not None
        raised = msgspec.structs.replace(state, floor=head + 1)
        return await self._cas_run(io, run_key, etag, raised)

    async def _remove_expired(
        self, io: Bucket, run_key: str, view: _SlotView, *, newest: bool
    ) -> bool:
        """Remove an expired checkpoint exactly (``IfMatch`` on the slot listed). The run's
        newest keeps its slot as a tombstone, as in :meth:`delete`: the run's latest
        sequence is derived from its slots, so removing it would hand its sequence (and so
        its checkpoint id) out again."""
        assert view.slot_etag is not None
        if not newest:
            return await io.delete_if(layout.slot_key(run_key, view.sequence), view.slot_etag)
        listing = msgspec.structs.replace(_listing(view), header=None, token=b"")
        after = await self._bury(io, run_key, view, listing)
        if after is None:
            return False
        self._learn_buried(run_key, view, after)
        await self._put_marker(io, run_key, view.sequence, "t",
                               msgspec.structs.replace(listing, token=after))  # see _listing_of
        return True

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
        self, io: Bucket, run_key: str, current: _Run, now: float
    ) -> tuple[int, int, bool]:
        assert current.state is not None
        assert current.etag is not None
        if not await self._seal(io, run_key, current, now):
            return 0, 0, False  # an append made it live again since it was listed
        # Listed while the run object stands: once it is gone, a new life of the run may
        # write items at the keys this one used, and they must stay.
        items = await io.list(layout.items_prefix(run_key))
        # The conditional delete of the run object elects one purging worker per run.
        if not await io.delete_if(layout.run_object(run_key), current.etag):
            return 0, 0, False
        self._forget(run_key)
        views = list(current.listed.slots.values())
        markers = current.listed.item_markers
        keys = [key for view in views for key in _own_markers(view)]
        keys += current.listed.stray + current.listed.sweep_keys(run_key)
        keys += layout.index_keys(run_key, current.state)
        marked = {layout.item_object(run_key, marker.hex_key) for marker in markers}
        await gather([
            functools.partial(_delete_leftovers, io, run_key, views, keys),
            functools.partial(io.delete_listed,
                              [entry for entry in items if entry.key not in marked]),
            functools.partial(_remove_marked, io, run_key, markers, current.listed),
        ])
        return len(current.held), len(current.held) + 1, False


class S3CheckpointStore(S3Store):
    """FastAgentic's S3 store name and constructor: ``S3CheckpointStore(client, bucket=...)``.

    Works with a stock aiobotocore or aioboto3 client, which it never closes.
    """

    def __init__(self, client: Any, bucket: str, prefix: str = "checkpoints/") -> None:
        super().__init__(bucket, prefix, client=client)


# -- helpers ------------------------------------------------------------------------------------


async def _nothing() -> None:
    return None


async def _close_built(built: _Built) -> None:
    await built.stack.aclose()


async def _error_as_value(
    call: Callable[..., Awaitable[_T]], *args: Any
) -> _T | CheckpointError:
    """``call(*args)``, with our error returned rather than raised (so that a request sent
    alongside it is not cancelled half-way)."""
    try:
        return await call(*args)
    except CheckpointError as exc:
        return exc


async def _damage_as_value(
    read: Callable[..., Awaitable[tuple[RunState, str] | None]], *args: Any
) -> tuple[RunState, str] | CorruptCheckpointError | None:
    """A read of the run object, with an undecodable one returned rather than raised."""
    try:
        return await read(*args)
    except CorruptCheckpointError as exc:
        return exc


def _changing(run_key: str) -> StoreError:
    return StoreError(f"run {run_key}: its run object kept changing while the run was "
                      "listed; try again")


def _left_standing(run_key: str, slot: Slot, failure: CheckpointError) -> StoreUnavailableError:
    """The error of a create that failed (``failure``) after its slot was written, when the
    slot could not be taken back (another writer appended after it, or the removal failed
    too): the checkpoint may stand, so a caller must not write it again unread."""
    return StoreUnavailableError(
        f"outcome unknown: the create of checkpoint {slot.checkpoint_id} (run {run_key}, "
        f"sequence {slot.sequence}) failed ({failure}), but its slot was written and could "
        "not be taken back (another writer appended after it, or its removal failed): it "
        "may stand. Read the run before creating it again")


def _outcome_unknown(run_key: str, slot: Slot, how: str) -> StoreUnavailableError:
    return StoreUnavailableError(
        f"outcome unknown: the create of checkpoint {slot.checkpoint_id} (run {run_key}, "
        f"sequence {slot.sequence}) was sent again after a lost reply, and another process "
        f"{how} meanwhile: it may have been applied before that. It was not written again: "
        "read the run before creating it again")


async def _take_back(io: Bucket, run_key: str, slot: Slot, etag: str) -> None:
    """Remove a committed slot whose create is refused (best effort: if this fails too, the
    slot stays, and the failure is logged)."""
    try:
        await io.delete_if(layout.slot_key(run_key, slot.sequence), etag)
    except CheckpointError:
        logger.warning("a refused create of run %s left checkpoint %s behind", run_key,
                       slot.checkpoint_id, exc_info=True)


def _normalized_prefix(prefix: object) -> str:
    if not isinstance(prefix, str):
        raise ConfigurationError(f"S3 prefix must be a str, got {type(prefix).__name__}")
    prefix = prefix.strip("/")
    if not prefix:
        return ""
    check_setting_text("S3 prefix", prefix)
    if "//" in prefix or len(prefix.encode("utf-8")) > layout.MAX_PREFIX_BYTES:
        raise ConfigurationError(
            f"S3 prefix {prefix[:60]!r} must be at most {layout.MAX_PREFIX_BYTES} bytes "
            "without empty segments ('//')"
        )
    return prefix + "/"


async def _delete_leftovers(
    io: Bucket, run_key: str, views: Sequence[_SlotView], keys: Sequence[str]
) -> None:
    """Delete what a run no longer needs: ``keys`` by key, the slots of ``views`` each only
    if it still has the ETag listed. A slot key is the one key a new incarnation of the run
    reuses (its writers replace leftovers with ``IfMatch``), so it is never deleted blindly."""
    slots = [(layout.slot_key(run_key, view.sequence), view.slot_etag)
             for view in views if view.slot_etag is not None]
    await pair(
        functools.partial(gather, [functools.partial(io.delete_if, key, etag)
                                   for key, etag in slots]),
        functools.partial(io.delete, keys),
    )


async def _remove_marked(
    io: Bucket, run_key: str, markers: Sequence[_ItemMarker], listed: _Listed
) -> None:
    """Remove the items of ``markers`` (expired, or of checkpoints gone) and the markers,
    each item only while its object is the one its marker describes: its owner and expiry,
    and its owner's checkpoint id when ``listed`` shows the owner (``IfMatch`` on the ETag
    read). Since the listing, its key may have been written again: by a new life of the
    run (begun once the run object went), or by a writer replacing an expired item. That
    item stays, and so does the marker when it is that item's own (same owner and expiry):
    a checkpoint acknowledged meanwhile keeps its items. 1 GET per marker."""
    objects, doomed = await _owned_removals(io, run_key, markers, listed)
    await pair(
        functools.partial(gather, [functools.partial(io.delete_if, entry.key, entry.etag)
                                   for entry in objects], parallel=WIDE),
        functools.partial(io.delete_listed, doomed),
    )


async def _owned_removals(
    io: Bucket, run_key: str, markers: Sequence[_ItemMarker], listed: _Listed
) -> tuple[list[Listed], list[Listed]]:
    """What removes the items of ``markers`` (of checkpoints removed) and the markers: the
    items, then the markers, each to delete only while it has the ETag given (each marker
    as listed or written). An item whose ETag this process knows (it wrote the item) goes
    only while it is that write: one given to another checkpoint meanwhile
    (``put_owned_items``) has another ETag and stays with its new owner, and one written
    again for the same owner stays with its marker (written again too) for the cleanup
    loop. The others are read first (1 GET each, at once): one that is not what its
    marker describes stays (see :func:`_remove_marked`)."""
    unknown = [marker for marker in markers if not marker.item_etag]
    found = await gather([functools.partial(io.get, layout.item_object(run_key, marker.hex_key))
                          for marker in unknown], parallel=WIDE)
    objects: list[Listed] = []
    doomed: list[Listed] = []
    for marker in markers:
        if marker.item_etag:
            objects.append(Listed(layout.item_object(run_key, marker.hex_key), marker.item_etag))
            doomed.append(Listed(marker.key, marker.etag))
    for marker, stored in zip(unknown, found, strict=True):
        body = None if stored is None else _intact_item(run_key, marker.hex_key, stored)
        if body is not None and not _as_marked(body, marker, listed):
            if _marker_for(run_key, marker.hex_key, body.owner, body.expires_at) != marker.key:
                doomed.append(Listed(marker.key, marker.etag))
            continue
        doomed.append(Listed(marker.key, marker.etag))
        if stored is not None:  # as marked, or damaged
            objects.append(Listed(layout.item_object(run_key, marker.hex_key), stored[1]))
    return objects, doomed


def _marked_for_purge(
    current: _Run, orphans: Sequence[_SlotView], head: int, now: float
) -> tuple[list[_ItemMarker], int]:
    """The item markers a purge removes with their items (:func:`_remove_marked`): those of
    the orphans and of the newest checkpoint if buried, the expired ones (counted), and
    those of owners a process pruned without knowing of them."""
    marked = {marker.key: marker for view in orphans for marker in view.owned}
    marked.update((marker.key, marker) for view in current.tombstones[-1:]
                  if view.sequence == head for marker in view.owned)
    # A pending slot's items stay: its writer may still write its marker (see Slot.owns).
    held = {view.sequence for view in (*current.held, *current.pending)}
    expired = 0
    for marker in current.listed.item_markers:
        owner = marker.meta.owner
        if not is_live(marker.meta.expires_at, now):
            expired += 1
            marked[marker.key] = marker
        elif owner is not None and owner < head and owner not in held:
            # Its owner was pruned by a process that did not know of the item.
            marked[marker.key] = marker
    return list(marked.values()), expired


def _as_marked(body: ItemBody, marker: _ItemMarker, listed: _Listed) -> bool:
    """Whether ``body`` is the item ``marker`` describes (see :func:`_remove_marked`)."""
    meta = marker.meta
    if body.owner != meta.owner or body.expires_at != meta.expires_at:
        return False
    owner = None if meta.owner is None else listed.slots.get(meta.owner)
    if owner is None or owner.listing is None:
        return True
    return body.checkpoint_id in ("", owner.listing.checkpoint_id)


def _life_ended(before: _Run, after: _Run) -> bool:
    """Whether the life of the run listed in ``before`` has ended by ``after``: its run
    object is gone, or another incarnation's stands (a status change keeps the incarnation)."""
    if after.listed.run_etag is None:
        return True
    was = None if before.state is None else before.state.incarnation
    now = None if after.state is None else after.state.incarnation
    return was is not None and now is not None and was != now


def _is_slot(run_key: str, key: str) -> bool:
    """Whether ``key`` (of the run's listing) is a slot: ``c/<inv seq>``, nothing after."""
    prefix = layout.slots_prefix(run_key)
    return key.startswith(prefix) and layout.parse_sequence(key[len(prefix):]) is not None


def _slots_first(run_key: str, keys: Sequence[Listed]) -> list[list[Listed]]:
    """The batches that remove ``keys``, one after the other. S3 applies a batch key by key,
    in no promised order, and a reader that finds an item gone checks that its checkpoint's
    slot stands: when items go, the slots go first, in a batch of their own."""
    slots = [entry for entry in keys if _is_slot(run_key, entry.key)]
    rest = [entry for entry in keys if not _is_slot(run_key, entry.key)]
    items = layout.items_prefix(run_key)
    if not slots or not any(entry.key.startswith(items) for entry in rest):
        return [list(keys)] if keys else []
    return [slots, rest]


def _unknown_below(log: _Log, removed: set[int]) -> list[int]:
    """The slots among ``removed`` right below which a checkpoint may stand that ``log``
    does not know, without its marker (see ``_Log.unsure_below``): the lowest slot it knows
    at or above ``known_from``, if the log is unsure; a tombstone left below ``known_from``
    (its removal failed until the log forgot what is below it), always, unless the key
    right below it is one the log knows."""
    known = sorted({*log.held, *log.garbage, *log.pending})
    unknown = []
    for sequence in sorted(removed):
        lower = known[:bisect.bisect_left(known, sequence)]
        if sequence < log.known_from:
            if not lower or lower[-1] != sequence - 1:
                unknown.append(sequence)
        elif log.unsure_below and (not lower or lower[-1] < log.known_from):
            unknown.append(sequence)
    return unknown


async def _first_slot_below(io: Bucket, run_key: str, sequence: int) -> list[Listed]:
    """The keys of the first slot that stands below ``sequence`` (its slot object, its
    markers: not those of the items it owns), past keys without a slot object (a marker
    left without it); one LIST unless many such keys come first."""
    slots = layout.slots_prefix(run_key)

    def first_slot(entries: Sequence[Listed]) -> str | None:
        return next((entry.key for entry in entries if _is_slot(run_key, entry.key)), None)

    def enough(entries: Sequence[Listed]) -> bool:
        slot = first_slot(entries)
        last = entries[-1].key
        return slot is not None and (not last.startswith(slot) or last >= f"{slot}/w")

    found, _ = await io.scan(slots, start_after=layout.older_than(run_key, sequence),
                             first=_SLOT_PAGE, until=enough)
    slot = first_slot(found)
    if slot is None:
        return []
    return [entry for entry in found
            if (entry.key == slot or entry.key.startswith(f"{slot}/"))
            and entry.key < f"{slot}/w"]


def _slot_sequences(run_key: str, keys: Iterable[str]) -> set[int]:
    """The sequences of the slots among ``keys`` (not of their markers)."""
    prefix = layout.slots_prefix(run_key)
    return {sequence for key in keys if _is_slot(run_key, key)
            for sequence in [layout.parse_sequence(key[len(prefix):])] if sequence is not None}


def _own_markers(view: _SlotView) -> list[str]:
    """The view's own markers (not those of the items it owns)."""
    return ([view.marker] if view.marker is not None else []) + view.extra


def _marker_keys_of(view: _SlotView) -> list[str]:
    """The view's markers, its own and those of the items it owns (not the items)."""
    return _own_markers(view) + [marker.key for marker in view.owned]


def _prunable_keys(run_key: str, view: _SlotView) -> list[str]:
    """What pruning deletes of the view by key: its slot and its own markers, but the marker
    of a checkpoint naming shared items, which stays (without its slot) until a sweep has
    removed what only it named. The items it owns go by :func:`_owned_removals`."""
    keys = [layout.slot_key(run_key, view.sequence)] if view.slot_etag is not None else []
    keys += _own_markers(view)
    if view.names_items and view.marker is not None:
        keys.remove(view.marker)
    return keys


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
        if view.slot_etag is None or listing is None or view.kind in _NOT_HELD:
            continue
        if incarnation is not None and listing.incarnation != incarnation:
            continue
        if is_live(listing.expires_at, now):
            return view
    return None


def _fresh_seal(view: _SlotView, now: float) -> bool:
    """A seal (see ``S3Store._seal``) written less than the grace ago: an append it stops
    may still be on its way."""
    listing = view.listing
    return (
        view.kind == "t"
        and listing is not None
        and not listing.checkpoint_id
        and now - listing.appended_at < CREATION_GRACE_SECONDS
    )


def _may_need_purge(listed: _Listed, now: float) -> bool:
    """From the listing alone: does this run have anything expired, dead or stray?"""
    if listed.run_etag is None and listed.slots:
        return True  # leftovers of a deleted run (a delete_run or purge that stopped)
    if listed.sweep_due is not None or listed.lease is not None:
        return True  # shared items to sweep, or a sweep's lease to check
    if any(not is_live(marker.meta.expires_at, now) for marker in listed.item_markers):
        return True
    views = list(listed.slots.values())
    if any(view.slot_etag is None or view.listing is None for view in views):
        return True
    held = [view for view in views if view.kind not in _NOT_HELD]
    if any(not is_live(_listing(view).expires_at, now) for view in held):
        return True
    if listed.run_etag is not None and not held:
        return True  # emptied, or a creation that never wrote its first checkpoint
    slotted = {view.sequence for view in held}
    top = max((view.sequence for view in views), default=-1)
    if any(marker.meta.owner is not None and marker.meta.owner < top
           and marker.meta.owner not in slotted for marker in listed.item_markers):
        return True  # items whose owner was pruned by a process that did not know of them
    if any(view.kind == "t" and (view.sequence < top or view.extra or view.owned)
           for view in views):
        return True  # tombstones of deleted checkpoints below the newest, or part deleted
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




def _appended_items(
    record: StoredCheckpoint, items: Sequence[Item]
) -> tuple[dict[str, Item], dict[str, Item]]:
    """The shared and the owned items of an append (checked by ``check_append``) by hex key
    (of one key given twice, the first: the second would find it in place)."""
    shared: dict[str, Item] = {}
    owned: dict[str, Item] = {}
    for item in items:
        hex_key = layout.hex_item_key(item.key)
        if hex_key not in shared and hex_key not in owned:
            (shared if item.owner is None else owned)[hex_key] = item
    return shared, owned


def _owned_batch(items: Sequence[Item], owner: int, if_absent: bool) -> dict[str, Item]:
    """Check the owners of what ``put_owned_items`` is given (``check_items`` checked the
    rest); the items by hex key (of one key given twice: with ``if_absent`` the first, which
    the second would find in place; else the last, which overwrites it)."""
    batch: dict[str, Item] = {}
    for item in items:
        hex_key = layout.hex_item_key(item.key)
        if item.owner != owner or isinstance(item.owner, bool):
            raise ValidationError(
                f"item {item.key[:40]!r} is owned by {item.owner!r}, not by checkpoint {owner}")
        if not if_absent or hex_key not in batch:
            batch[hex_key] = item
    return batch


def _remembered(held: SweepLease | None, now: float) -> tuple[Removed, ...]:
    """What a lease in place remembers of removed items, still recent at ``now``, with what
    its sweep may have removed if it stopped while deleting."""
    if held is None:
        return ()
    removed = [gone for gone in held.removed if now < gone.at + REMOVED_SECONDS]
    if held.deleting:
        etags: Sequence[str] = held.etags or [""] * len(held.doomed)
        removed += [Removed(hex_key, etag, held.since)
                    for hex_key, etag in zip(held.doomed, etags, strict=False)]
    return tuple(removed)


def _lease_of(blob: bytes, where: str) -> SweepLease | None:
    """A sweep lease, or None for an object that is not one (nothing to respect)."""
    try:
        return layout.decode_lease(blob, where)
    except CorruptCheckpointError:
        logger.warning("ignoring undecodable sweep lease %s", where)
        return None


def _within(doomed: dict[str, str], budget: int) -> tuple[dict[str, str], bool]:
    """At most ``budget`` of the doomed items, and whether more are left: the most deeply
    nested first, so an item is taken only with every doomed item nested under it (see
    ``S3Store._delete_nested_first``), and a pass always removes something."""
    if len(doomed) <= budget:
        return doomed, False
    keys = set(doomed)
    order = sorted(doomed, key=lambda hex_key: -sum(
        1 for anchor in layout.anchors_of(hex_key) if anchor in keys))
    chosen = {hex_key: doomed[hex_key] for hex_key in order[:budget]}
    return _spared(chosen, set(order[budget:])), True


def _spared(doomed: dict[str, str], spared: set[str]) -> dict[str, str]:
    """``doomed`` without ``spared`` and without the items they are nested under: an item
    is removed only with everything nested under it."""
    anchors = {anchor for hex_key in spared for anchor in layout.anchors_of(hex_key)}
    return {hex_key: etag for hex_key, etag in doomed.items()
            if hex_key not in spared and hex_key not in anchors}


def _held(hex_key: str, named: set[str] | frozenset[str]) -> bool:
    """Whether the item ``hex_key`` is named, or nested under an item that is."""
    return hex_key in named or layout.nested_under(hex_key, named)


async def _slot_markers(io: Bucket, slot: str) -> list[Listed]:
    """The keys under ``slot`` up to its own markers: the slot, its listing marker (or
    tombstone) and leftover duplicates, which sort before the markers of the items the
    checkpoint owns (``w``). The LIST stops at the first of those, so a checkpoint owning
    many items costs one request all the same; they are left out of what is returned."""
    owned = f"{slot}/w"
    found, _ = await io.scan(slot, first=_SLOT_PAGE,
                             until=lambda entries: entries[-1].key >= owned)
    return [entry for entry in found if entry.key < owned]


def _owned_by(body: layout.ItemBody, record: StoredCheckpoint) -> bool:
    """Whether the item ``body`` is owned by ``record`` (not by another checkpoint, nor by
    another life of this one)."""
    return body.owner == record.sequence and body.checkpoint_id in ("", record.checkpoint_id)


def _created_under(refs: Sequence[str], shared: _SharedWrite) -> dict[str, str]:
    """The items an append created nested under what it names: ``{hex key: ETag}``, what
    it withdraws when a sweep refuses it (it must leave nothing under a removed item)."""
    named = {layout.hex_item_key(ref) for ref in refs}
    return {hex_key: etag for hex_key, etag in shared.created.items()
            if layout.nested_under(hex_key, named)}


async def _forget_created(io: Bucket, run_key: str, created: Mapping[str, str]) -> None:
    """Best effort: remove the items a refused append created (each only while it is the
    object it wrote), so that it leaves nothing nested under what it lost."""
    try:
        await gather([functools.partial(io.delete_if, layout.item_object(run_key, hex_key), etag)
                      for hex_key, etag in created.items()], parallel=WIDE)
    except CheckpointError:
        logger.warning("a refused append left %d nested items behind in run %s (the next "
                       "sweep removes them)", len(created), run_key, exc_info=True)


async def _put_empty(io: Bucket, keys: Sequence[str]) -> None:
    await gather([functools.partial(io.put, key, b"") for key in keys])


async def _forget_keys(io: Bucket, keys: Sequence[str]) -> None:
    """Best effort delete of what a failed operation wrote (logged when it fails)."""
    try:
        await io.delete(keys)
    except CheckpointError:
        logger.warning("a failed operation left %d objects behind in s3://%s", len(keys),
                       io.bucket, exc_info=True)


def _marker_for(
    run_key: str, hex_key: str, owner: int | None, expires_at: float | None
) -> str | None:
    """The marker an item with this owner and expiry has (None: it has none)."""
    if owner is None and expires_at is None:
        return None
    return layout.item_marker_key(run_key, hex_key, ItemMeta(owner, expires_at))


def _intact_item(run_key: str, hex_key: str, stored: tuple[bytes, str]) -> ItemBody | None:
    """The item in an object as read; None for a damaged one, which no writer counts as
    live (see "Damaged items" in ``docs/stores/s3.md``)."""
    try:
        return layout.decode_item(stored[0], "", run_key=run_key, hex_key=hex_key)
    except CorruptCheckpointError:
        return None


async def _restore_marker(
    io: Bucket, run_key: str, hex_key: str, kept: ItemBody, cleared: list[str]
) -> None:
    """A live item another writer put while this one replaced a damaged item is kept: put
    back its marker if this writer's clearing had deleted it (it was listed before that
    writer's object landed)."""
    marker = _marker_for(run_key, hex_key, kept.owner, kept.expires_at)
    if marker is not None and marker in cleared:
        await io.put(marker, kept.token)


def _marker_of_stored(run_key: str, hex_key: str, stored: tuple[bytes, str]) -> str | None:
    """The marker of the item in an object as read (None for one that is not an item)."""
    body = _intact_item(run_key, hex_key, stored)
    return None if body is None else _marker_for(run_key, hex_key, body.owner, body.expires_at)


def _kind(run_key: str, hex_key: str, stored: tuple[bytes, str]) -> str:
    """What the sweep makes of an object: ``"shared"`` (a shared item, which it removes once
    nothing names it), ``"loose"`` (a ``put_items`` item without owner or expiry, removed
    only nested under a shared item it removes), or ``""`` (neither)."""
    body = _intact_item(run_key, hex_key, stored)
    if body is None:
        return ""
    if body.owner is not None or body.expires_at is not None:
        return ""
    return "shared" if body.shared else "loose"


def _of_another_life(stored: ItemBody, body: ItemBody) -> bool:
    """Whether the shared item ``body``, finding the live shared item ``stored`` in place,
    writes it again: when another life of the run wrote it (or it was stored before items
    recorded their life) with the same value. A removal of an ended life deletes each
    object it listed ``IfMatch`` the ETag listed: the object written again has another, so
    the removal leaves it to the new life's checkpoints naming it. Not with another value:
    a writer of the ended life that does not know it ended (refused only at its commit)
    must not replace the new life's value."""
    return (body.shared and stored.shared and stored.incarnation != body.incarnation
            and stored.value == body.value)


def _live_item(run_key: str, hex_key: str, stored: tuple[bytes, str], now: float) -> bool:
    item = _intact_item(run_key, hex_key, stored)
    return item is not None and is_live(item.expires_at, now)


def _encode_cursor(key: str) -> str:
    return key.encode("utf-8").hex()


def _decode_cursor(cursor: str, prefix: str) -> str:
    try:
        key = bytes.fromhex(cursor).decode("utf-8")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValidationError(f"malformed run listing cursor {cursor[:40]!r}") from exc
    if not key.startswith(prefix):
        raise ValidationError("run listing cursor belongs to another listing (status or label)")
    return key
