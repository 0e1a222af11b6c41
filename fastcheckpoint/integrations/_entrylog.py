"""An append-only list of entries per run, with a small state beside it: what session-style
framework interfaces store (a conversation's items, a session's events).

Layout. The run holds one checkpoint, its latest (``keep_latest=1``): every change appends the
next one, so the store's sequence check is the compare-and-set that orders writers of every
process, and a change is applied exactly once or not at all. Entries live in *segments*,
shared items of the run (one per append that adds entries, holding those entries); the
checkpoint lists its segments in ``refs`` and, in its payload, how many entries of each it
uses, plus the adapter's state. A segment is written once and never rewritten: removing the
newest entry (``pop``) lowers the count of its segment; segments that no checkpoint names any
more are removed by the store with the checkpoint that named them last.

So an append writes the new entries, not the whole list; small segments are merged as they
accumulate (the newest two while the older one is at most twice the newer's size, as in a
binary counter, up to :data:`SEAL_BYTES`), which keeps their number small and bounds what one
append rewrites by a constant. ``read`` is one ``read_with_items``: the
checkpoint and every segment in one atomic read.

Every change draws a token of its own, and the head carries the tokens of the last
:data:`RECENT_TOKENS` changes of the log's life: a change whose store call failed without
telling whether it was stored is recognised when made again, also after other writers' changes
followed it (:meth:`EntryLog._settled`).

TTL slides: every change gives the new checkpoint ``now + ttl_seconds``, and the run, its
segments and everything else expire together when no change came for that long.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import msgspec

from fastcheckpoint import _ids
from fastcheckpoint._codec import Codec, Header, RunData
from fastcheckpoint._model import CheckpointStatus
from fastcheckpoint._settle import settled
from fastcheckpoint.errors import (
    ConfigurationError,
    ConflictError,
    CorruptCheckpointError,
    SequenceConflict,
    SharedItemGone,
    StoreError,
    ValidationError,
)
from fastcheckpoint.integrations._adapter import RACE_ATTEMPTS, after_lost_race, landed
from fastcheckpoint.stores import (
    CheckpointStore,
    Item,
    RunRecord,
    StoredCheckpoint,
    SupportsLabels,
    SupportsSharedItems,
    check_labels,
)

__all__ = ["RECENT_TOKENS", "SEAL_BYTES", "EntryLog", "LogHead", "LogView", "StaleLog"]

_T = TypeVar("_T")

_SEGMENT_PREFIX = "s/"
SEAL_BYTES = 256 * 1024
"""Segments are merged only while the result stays within this many bytes of entries; larger
ones are sealed, never rewritten. So an append writes its entries plus at most this much, and
a log has one segment per ``SEAL_BYTES`` of entries plus about log2(``SEAL_BYTES``) smaller
ones (their sizes at least halve from one to the next)."""
RECENT_TOKENS = 16
"""How many changes' tokens a head carries (its own and those before it, in the log's life):
a change made again after its outcome was unknown is recognised while at most this many minus
one other changes followed it. A caller's retry comes right after the failure, so the changes
in between are those other writers made meanwhile; 16 tokens of 8 bytes add about 170 bytes
to a head."""
_STATE_KEY = "entry_log"
_TOKEN_BYTES = 8
_SEGMENT_TOKEN_BYTES = 6


class StaleLog(ConflictError):
    """A compare-and-set change found the log at another revision than the one expected."""

    def __init__(self, message: str, *, revision: int) -> None:
        super().__init__(message)
        self.revision = revision
        """The log's revision now (``-1``: it does not exist)."""


class LogHead(msgspec.Struct, frozen=True):
    """The log after a change."""

    revision: int
    """Bumped by every change; ``expect=`` takes it for a compare-and-set."""
    created_at: float
    updated_at: float
    incarnation: str
    """The log's life, unique per store: a log cleared and written again starts a new one
    (and its revisions start again at 0), whatever the clock says."""


class LogView(msgspec.Struct, frozen=True):
    """The whole log as one atomic read found it."""

    entries: list[bytes]
    """Oldest first."""
    state: bytes
    """The adapter's state, as last given (``b""`` when never given)."""
    revision: int
    created_at: float
    updated_at: float
    incarnation: str
    """As in :class:`LogHead`."""


class _Segment(msgspec.Struct, array_like=True, frozen=True):
    key: str
    used: int
    """How many of the segment's entries, from its first, the log holds."""
    size: int
    """Their total size in bytes (what merging compares)."""


class _Layout(msgspec.Struct, array_like=True, frozen=True):
    segments: list[_Segment]
    state: bytes
    created_at: float
    recent: list[bytes] = []
    """The tokens of the last :data:`RECENT_TOKENS` changes of this life, the newest (the
    head's own) last. Heads written by the previous release have none."""


class _Known(msgspec.Struct):
    """The head this object last read or wrote, with its entries per segment."""

    sequence: int
    incarnation: str
    layout: _Layout
    values: list[list[bytes]]
    updated_at: float


class _Unsettled(msgspec.Struct, frozen=True):
    """A change whose store call failed without telling whether it was stored: its reply
    lost, and the look that would tell (:func:`landed`) failed too."""

    token: bytes
    entries: list[bytes]
    state: bytes | None
    expect: int | None
    popped: bytes | None
    """The entry a pop removed (``None``: an append)."""
    head: LogHead


_layout_encoder = msgspec.msgpack.Encoder()
_layout_decoder = msgspec.msgpack.Decoder(_Layout)
_segment_decoder = msgspec.msgpack.Decoder(list[bytes])
_codec = Codec()


class EntryLog:
    """One run's entries and state on a store with labels and shared items.

    Every method is one atomic change or read in the store; writers in any number of
    processes are ordered by the store (a change lost to another writer is retried on the new
    head, unless it was a compare-and-set with ``expect=``). One object per run and task; it
    keeps the head it saw last, so a change costs one store call while nobody else wrote.
    """

    def __init__(
        self,
        store: CheckpointStore,
        run_id: str,
        *,
        labels: Sequence[str] = (),
        metadata: Mapping[str, Any] | None = None,
        ttl_seconds: float | None = None,
        clock: Callable[[], float] = time.time,
        keep_unsettled: bool = False,
    ) -> None:
        if not isinstance(store, SupportsSharedItems) or not isinstance(store, SupportsLabels):
            raise ConfigurationError(
                f"an entry log needs a store with labels and shared items; "
                f"{type(store).__name__} lacks them")
        self._store = store
        self._run_id = run_id
        self._key = _ids.key_of(run_id)
        self._labels = check_labels(tuple(labels))
        self._data = _codec.encode_run_data(RunData(metadata=dict(metadata or {})))
        self._ttl = ttl_seconds
        self._clock = clock
        self._known: _Known | None = None
        self._seen = False
        """Whether ``_known`` is this object's last sight of the head (``None``: absent)."""
        self._unsettled: _Unsettled | None = None
        """This object's last change, if its outcome is unknown: the same change made again
        is recognised while the head carries its token. Forgotten by a read and once this
        object makes another change (the caller who saw the log, or moved on, makes the same
        change next as a new one), unless ``keep_unsettled``: a caller that tells a retry
        from a new change by itself (an ADK event's id) keeps it until made again."""
        self._keeps = keep_unsettled
        self._made: _Unsettled | None = None
        """The change the current call made or recognised as made, for :meth:`settle`."""
        self._joining: str | None = None
        """The incarnation of the run the store holds without a checkpoint yet (a first
        change that failed after the store created the run): the call's next try joins it,
        as a new incarnation's sequence 0 would be refused for ever. Forgotten when a call
        begins and by :meth:`clear`: a later life of the log never reuses an ended one's."""

    @property
    def run_id(self) -> str:
        return self._run_id

    async def settle(self, change: Awaitable[_T]) -> _T:
        """Await ``change``, a call of this log's, to its end whatever cancels the caller
        meanwhile (:func:`settled`). A caller cancelled while it ran never learns its outcome,
        as with a lost reply: the change it made (or recognised as made) is then treated as
        one whose outcome is unknown, so the same change made again is recognised instead of
        made twice (an append not added again, a pop returning the entry it removed)."""
        self._made = None
        try:
            return await settled(change)
        except BaseException:
            self._unsure()
            raise

    def _unsure(self) -> None:
        """The caller of a call that made its change (or recognised it made) gets an error
        all the same (its cancellation): that change's outcome is unknown to it."""
        if self._made is not None:
            self._unsettled = self._made

    # -- reads ------------------------------------------------------------------------------

    async def read(self) -> LogView | None:
        """The whole log, or ``None`` when it does not exist (never written, cleared or
        expired). One store call."""
        if not self._keeps:
            self._unsettled = None  # the caller sees whether a change that failed is there
        known = await self._read()
        if known is None:
            return None
        entries = [entry for values, segment in zip(known.values, known.layout.segments,
                                                     strict=True)
                   for entry in values[:segment.used]]
        return LogView(entries=entries, state=known.layout.state, revision=known.sequence,
                       created_at=known.layout.created_at, updated_at=known.updated_at,
                       incarnation=known.incarnation)

    async def _read(self) -> _Known | None:
        found = await self._store.read_with_items(self._key, sequence=None, now=self._clock())
        self._seen = True
        if found is None:
            self._known = None
            return None
        record, _status, items = found
        where = record.key or f"run {self._run_id!r}"
        layout = _decode_layout(record.payload, where)
        values = [_segment_values(items.get(segment.key), segment, where)
                  for segment in layout.segments]
        parsed = _ids.parse_checkpoint_id(record.checkpoint_id)
        if parsed is None:
            raise CorruptCheckpointError(
                f"entry log holds a checkpoint with a malformed id {record.checkpoint_id!r:.60}",
                key=where)
        self._known = _Known(record.sequence, parsed[1], layout, values, record.created_at)
        return self._known

    # -- changes ----------------------------------------------------------------------------

    async def append(
        self,
        entries: Sequence[bytes],
        *,
        state: bytes | None = None,
        expect: int | None = None,
    ) -> LogHead:
        """Add ``entries`` after the last one and, unless ``state`` is ``None``, replace the
        state; creates the log when it does not exist.

        With ``expect`` (a revision, ``-1`` for "does not exist yet") the change is applied
        only if the log is still at that revision, else :class:`StaleLog`. Costs one store
        call when this object saw the current head last, else two.
        """
        batch = [_checked_entry(entry) for entry in entries]
        if state is not None and not isinstance(state, bytes):
            raise ValidationError(f"state must be bytes, got {type(state).__name__}")
        if expect is not None and (isinstance(expect, bool) or not isinstance(expect, int)
                                   or expect < -1):
            raise ValidationError(f"expect must be a revision (an int >= -1), got {expect!r:.40}")
        again = await self._settled(lambda change: change.popped is None and (
            change.entries, change.state, change.expect) == (batch, state, expect))
        if again is not None:
            return again.head
        self._joining = None  # a run being created is joined within one call's tries only
        # The first try trusts this object's last sight of the head (or, never having looked,
        # guesses that the log is new); a refusal means it was stale, and every later try reads.
        fresh = not (self._seen or expect in (None, -1))
        known = await self._read() if fresh else self._known
        # A revision names a head only within one life of the log (a cleared log starts again
        # at 0): an expectation met by the head this object saw holds for that life only.
        pinned = (known.incarnation if expect is not None and known is not None
                  and known.sequence == expect else None)
        for attempt in range(RACE_ATTEMPTS):
            if expect is not None and not _meets(known, expect, pinned):
                if not fresh:
                    known, fresh = await self._read(), True
                if not _meets(known, expect, pinned):
                    raise StaleLog(
                        f"log {self._run_id!r:.80} is not at revision {expect} any more (now "
                        f"{_revision(known)}{'' if pinned is None else ', maybe recreated'})",
                        revision=_revision(known))
            head = await self._try_change(known, batch, state, expect=expect)
            if head is not None:
                return head
            await after_lost_race(attempt)
            known, fresh = await self._read(), True
        raise ConflictError(f"could not change log {self._run_id!r:.80}: lost the race to "
                            f"other writers {RACE_ATTEMPTS} times in a row")

    async def pop(self) -> bytes | None:
        """Remove and return the newest entry (``None`` when there is none). Atomic: no two
        callers, in any processes, get the same entry."""
        again = await self._settled(lambda change: change.popped is not None)
        if again is not None:
            return again.popped
        fresh = not self._seen
        known = self._known if self._seen else await self._read()
        for attempt in range(RACE_ATTEMPTS):
            if known is None or not known.layout.segments:
                if fresh:
                    return None
                known, fresh = await self._read(), True  # seen empty: look again
                continue
            last = known.layout.segments[-1]
            entry = known.values[-1][last.used - 1]
            if await self._try_change(known, [], None, popped=entry) is not None:
                return entry
            await after_lost_race(attempt)
            known, fresh = await self._read(), True
        raise ConflictError(f"could not pop from log {self._run_id!r:.80}: lost the race to "
                            f"other writers {RACE_ATTEMPTS} times in a row")

    async def clear(self) -> bool:
        """Remove the log, its entries and its state; whether there was one."""
        self._known, self._seen, self._unsettled, self._joining = None, False, None, None
        return await self._store.delete_run(self._key) > 0

    async def _settled(self, same: Callable[[_Unsettled], bool]) -> _Unsettled | None:
        """This object's change whose outcome was unknown, if the store's head carries its
        token (it was applied, maybe followed by other writers' changes) and ``same`` says the
        change asked for now is that one made again (a caller's retry: it is not made twice).
        Forgotten once told apart (one read, only after such a failure; one that fails keeps
        the change for the next try); another change forgets it only once made (one refused,
        or a pop of an empty log, writes nothing). :class:`StaleLog` when the change's revision
        is older than every token the head carries (it cannot be told whether the change was
        stored). Tokens are carried within one life of the log only:
        one cleared and written again holds none of an ended life's."""
        change = self._unsettled
        if change is None:
            return None
        if not same(change):
            if not self._seen:  # another change, on the head read now (as before the failure)
                await self._read()
            return None
        known = await self._read()
        self._unsettled = None
        if known is None or known.incarnation != change.head.incarnation:
            return None
        recent = known.layout.recent
        if change.token in recent:
            self._made = change
            return change
        # The head's tokens are those of the changes at its last len(recent) revisions: one
        # among them that is not this change's says it was not stored. Older than those, the
        # log cannot tell, and making the change again could make it twice.
        if change.head.revision <= known.sequence - len(recent):
            followed = known.sequence - change.head.revision
            raise StaleLog(
                f"entry log {self._run_id!r:.80}: whether this object's earlier change was "
                f"stored is unknown (its reply was lost) and {followed} other changes "
                f"followed it, more than the log tells apart; read the log before making "
                f"the change again (nothing was written)",
                revision=known.sequence)
        return None

    async def _try_change(
        self, known: _Known | None, batch: list[bytes], state: bytes | None, *,
        popped: bytes | None = None, expect: int | None = None,
    ) -> LogHead | None:
        """Propose the next checkpoint after ``known``; ``None`` when another writer got
        there first (this object's head is then unknown)."""
        now = self._clock()
        if known is None:
            sequence, incarnation = 0, self._joining or _ids.new_incarnation()
            segments: list[_Segment] = []
            values: list[list[bytes]] = []
            kept_state, created_at = b"", now
        else:
            sequence, incarnation = known.sequence + 1, known.incarnation
            segments = list(known.layout.segments)
            values = list(known.values)
            kept_state, created_at = known.layout.state, known.layout.created_at
        # A token of its own: on a store without atomic appends (S3) an append that lost
        # this sequence, or failed after writing its segment, leaves it here, and a segment
        # is written only where no item is (the winner would read the loser's entries).
        new_key = (f"{_SEGMENT_PREFIX}{incarnation}/{sequence:x}."
                   f"{secrets.token_hex(_SEGMENT_TOKEN_BYTES)}")
        pop = popped is not None
        if pop:
            last = segments[-1]
            if last.used == 1:
                segments.pop()
                values.pop()
            else:
                size = last.size - len(values[-1][last.used - 1])
                segments[-1] = _Segment(last.key, last.used - 1, size)
        written: list[bytes] | None = None
        if batch:
            segments.append(_Segment(new_key, len(batch), sum(map(len, batch))))
            values.append(batch)
            written = _merged(segments, values, new_key)
        layout = _Layout(segments, kept_state if state is None else state, created_at,
                         tokens := _recent_tokens(known))
        expires_at = None if self._ttl is None else now + self._ttl
        checkpoint_id = _ids.checkpoint_id(self._key, incarnation, sequence)
        parent = (None if sequence == 0
                  else _ids.checkpoint_id(self._key, incarnation, sequence - 1))
        header = Header(self._run_id, "pop" if pop else "append", parent, [], self._ttl)
        record = StoredCheckpoint(
            sequence=sequence, checkpoint_id=checkpoint_id, created_at=now,
            expires_at=expires_at, header=_codec.encode_header(header),
            # The token in the layout makes the change's record its own: after a failed store
            # call, finding it stored says the change was applied (:func:`landed`).
            payload=_codec.encode_payload(
                {_STATE_KEY: _layout_encoder.encode(layout),
                 "entries": sum(segment.used for segment in segments)}, [], [], {}),
            refs=tuple(segment.key for segment in segments))
        items = [] if written is None else [
            Item(key=new_key, value=_layout_encoder.encode(written))]
        seed = RunRecord(
            run_id=self._run_id, incarnation=incarnation, status=CheckpointStatus.ACTIVE.value,
            created_at=now, updated_at=now, latest_sequence=sequence, checkpoint_count=1,
            expires_at=expires_at, data=self._data, labels=self._labels)
        head = LogHead(revision=sequence, created_at=created_at, updated_at=now,
                       incarnation=incarnation)
        try:
            await self._store.append_with_items(
                self._key, record, run=seed, keep_latest=1, now=now, items=items)
        except (SequenceConflict, SharedItemGone) as conflict:
            self._known, self._seen = None, False
            if isinstance(conflict, SequenceConflict):
                self._joining = conflict.joining
            return None
        except StoreError:
            # The store may have applied the change and lost its reply (its own retries ran
            # out): a retry of the caller's would then make it twice. One read tells; when
            # that fails too, the caller's retry is recognised (:meth:`_settled`).
            if not await landed(self._store, self._key, record, self._clock()):
                self._known, self._seen = None, False
                self._unsettled = _Unsettled(tokens[-1], batch, state, expect, popped, head)
                raise
        self._known = _Known(sequence, incarnation, layout, values, now)
        # Another change made forgets an unknown one (unless kept: see ``_unsettled``).
        self._seen, self._joining, self._unsettled, self._made = (
            True, None, self._unsettled if self._keeps else None,
            _Unsettled(tokens[-1], batch, state, expect, popped, head))
        return head


def _recent_tokens(known: _Known | None) -> list[bytes]:
    """The tokens a change after ``known`` carries: a new one of its own, after those of the
    changes before it in this life (``known`` ``None``: a new life, none)."""
    carried = [] if known is None else known.layout.recent[-(RECENT_TOKENS - 1):]
    return [*carried, secrets.token_bytes(_TOKEN_BYTES)]


def _revision(known: _Known | None) -> int:
    return -1 if known is None else known.sequence


def _meets(known: _Known | None, expect: int, pinned: str | None) -> bool:
    """Whether ``known`` is the head an ``expect`` names (in the life ``pinned``, if given)."""
    if known is None:
        return expect == -1
    return known.sequence == expect and (pinned is None or known.incarnation == pinned)


def _merged(segments: list[_Segment], values: list[list[bytes]], new_key: str) -> list[bytes]:
    """Merge the newest segments in place while the older of the last two is at most twice
    the size of the newer and the two fit in :data:`SEAL_BYTES`; returns the values of the
    newest segment, which is the one to write under ``new_key``."""
    while len(segments) >= 2 and (
        segments[-2].size <= 2 * segments[-1].size
        and segments[-2].size + segments[-1].size <= SEAL_BYTES
    ):
        newer, older = segments.pop(), segments.pop()
        newer_values, older_values = values.pop(), values.pop()
        joined = older_values[:older.used] + newer_values[:newer.used]
        segments.append(_Segment(new_key, len(joined), older.size + newer.size))
        values.append(joined)
    return values[-1]


def _checked_entry(entry: object) -> bytes:
    if not isinstance(entry, bytes):
        raise ValidationError(f"an entry must be bytes, got {type(entry).__name__}")
    return entry


def _decode_layout(payload: bytes, where: str) -> _Layout:
    body = _codec.decode_payload(payload, where).state.get(_STATE_KEY)
    if not isinstance(body, bytes):
        raise CorruptCheckpointError("checkpoint holds no entry log head", key=where)
    try:
        layout = _layout_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise CorruptCheckpointError(f"undecodable entry log head: {exc}", key=where) from exc
    for segment in layout.segments:
        if segment.used < 1 or segment.size < 0:
            raise CorruptCheckpointError(
                f"entry log names segment {segment.key!r:.60} with {segment.used} entries",
                key=where)
    return layout


def _segment_values(blob: bytes | None, segment: _Segment, where: str) -> list[bytes]:
    if blob is None:
        raise CorruptCheckpointError(
            f"entry log segment {segment.key!r:.60} is missing", key=where)
    try:
        values = _segment_decoder.decode(blob)
    except msgspec.DecodeError as exc:
        raise CorruptCheckpointError(
            f"undecodable entry log segment {segment.key!r:.60}: {exc}", key=where) from exc
    if len(values) < segment.used:
        raise CorruptCheckpointError(
            f"entry log segment {segment.key!r:.60} holds {len(values)} entries, the log "
            f"uses {segment.used}", key=where)
    return values
