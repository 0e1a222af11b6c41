"""A Pydantic AI conversation store on any fastcheckpoint store.

``FastConversationStore`` is a ``pydantic_ai.conversation_store.ConversationStore``: ``load``
a conversation before a run, ``save`` the run's result after it, ``branch``, ``fork``,
``list_conversations`` and ``delete`` as Pydantic AI documents them. Each conversation is a
fastcheckpoint run (``pydantic-ai:<conversation_id>``), so it appears in ``fastcheckpoint
runs`` and ``show`` and expires with TTL; each message is stored once, as an entry that forks
share. The layout is described in ``fastcheckpoint.integrations._pydantic_ai_records``.

Costs in store calls: ``read_record`` 1; ``read_entry`` 1, or 0 for an entry this process
wrote or read before (entries never change); ``write_record`` 1 (the compare-and-set append),
plus 1 for the family's index and 1 per entries run (usually 1) when it adds entries, plus 1
read when the revision it expects is not the one this process last read or wrote, and 1
read when its append fails or is refused; a new conversation adds 1 (its family), a fork 2
(its anchor entry, the release check);
``delete_record`` 2 (the conditional delete, the family's members), or, for the family's last
conversation, 2 more (a release marker, the members again) and the family's entries;
``read_records`` 1 per 100 conversations listed, then 1 per record returned (and 1 per
other record the store's clock dated like the last one returned);
``write_details`` (``update``: a title, metadata) 2.

Needs ``pip install 'fastcheckpoint[pydantic-ai]'`` and a store with labels (every bundled
store).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Protocol, cast

from fastcheckpoint import _ids
from fastcheckpoint._codec import Codec, Header, RunData
from fastcheckpoint._config import CheckpointConfig
from fastcheckpoint._ids import plain_str
from fastcheckpoint._manager import CheckpointManager
from fastcheckpoint._model import CheckpointStatus
from fastcheckpoint._settle import settled
from fastcheckpoint._validate import count_arg, shown
from fastcheckpoint.errors import (
    ConfigurationError,
    CorruptCheckpointError,
    SequenceConflict,
    StoreError,
    ValidationError,
)
from fastcheckpoint.integrations._adapter import (
    adapter_ttl,
    capable_store,
    landed,
)
from fastcheckpoint.stores import (
    CheckpointStore,
    Item,
    RunRecord,
    StoredCheckpoint,
    SupportsLabels,
    purge_all,
)

try:
    from pydantic_ai.conversation_store import (
        ConversationConflict,
        ConversationEntry,
        ConversationRecord,
        ConversationStore,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ConfigurationError(
        "fastcheckpoint.integrations.pydantic_ai needs Pydantic AI: "
        "pip install 'fastcheckpoint[pydantic-ai]'") from exc

from fastcheckpoint.integrations import _pydantic_ai_records as records
from fastcheckpoint.integrations._pydantic_ai_records import Known, Lru

__all__ = ["FastConversationStore"]

logger = logging.getLogger("fastcheckpoint.pydantic_ai")

_PAGE = 100
"""Runs or items read per store call by listings and releases."""
_CLOSING_SECONDS = 3600.0
"""How long the marker of a family's release stays: a fork that started before the release
and checks after it is refused meanwhile (a release takes a few calls)."""
_FAMILY_GRACE_SECONDS = 3600.0
"""``cleanup_expired`` leaves families younger than this: their first conversation may be
between registering the family and writing its record."""
_KNOWN = 10_000
_SAVE_ATTEMPTS = 16
"""Saves of one revision that a change of the conversation's title or metadata (which
keeps the revision) may overtake in a row before the save is refused."""
_ENTRIES = 4_096
_CACHED_ENTRY_BYTES = 256 * 1024
"""Larger entries (a message with an image, say) are read from the store each time."""


class _Capable(CheckpointStore, SupportsLabels, Protocol):
    """A store with labels (for type checking only)."""


class FastConversationStore(ConversationStore):
    """A Pydantic AI ``ConversationStore`` on a fastcheckpoint store (or a store URL).

    ``ttl_seconds``: a conversation expires that long after its last save (``None``: the
    store's default TTL, else never); its entries go with the last conversation of its family
    (``cleanup_expired``). ``clock``: epoch seconds, for tests.

    The compare-and-set of a revision is the store's own: two writers expecting the same
    revision, in one process or many, cannot both win; the loser gets
    ``ConversationConflict``. ``read_entry`` raises ``KeyError`` (a ``LookupError``, which
    Pydantic AI catches) for an entry the store does not have; every other failure is a
    ``fastcheckpoint.errors.CheckpointError``.
    """

    def __init__(
        self,
        store_or_url: CheckpointStore | str,
        *,
        ttl_seconds: float | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._owns_store = isinstance(store_or_url, str)
        self._store = cast(_Capable, capable_store(
            store_or_url, CheckpointConfig().retry, "the Pydantic AI conversation store",
            (SupportsLabels,)))
        self._ttl_seconds = adapter_ttl(ttl_seconds, self._store)
        self._clock = time.time if clock is None else clock
        self._codec = Codec()
        self._known: Lru[str, Known] = Lru(_KNOWN)
        self._entries: Lru[str, bytes] = Lru(_ENTRIES)
        self._uncertain: Lru[str, tuple[str | None]] = Lru(_KNOWN)
        """The records (by revision) whose write failed without telling whether it was
        stored, with the revision each write expected."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> FastConversationStore:
        """The store and TTL ``CheckpointManager.from_env`` reads (``FASTCHECKPOINT_URL``,
        ``FASTCHECKPOINT_DEFAULT_TTL_SECONDS`` or ``CHECKPOINT_TTL_DAYS``...); the store it
        opens is closed by :meth:`aclose`."""
        manager = CheckpointManager.from_env(environ)
        built = cls(manager.store, ttl_seconds=manager.config.default_ttl_seconds)
        built._owns_store = True
        return built

    @property
    def store(self) -> CheckpointStore:
        return self._store

    @property
    def ttl_seconds(self) -> float | None:
        return self._ttl_seconds

    async def __aenter__(self) -> FastConversationStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the store if this object opened it from a URL (a store given is left open)."""
        if self._owns_store:
            self._owns_store = False
            await self._store.aclose()

    async def cleanup_expired(self, *, batch_size: int = 500) -> int:
        """Remove the entries of families whose conversations have all expired, then what
        expired in the store (``purge_expired`` in batches). Returns the entries removed."""
        batch_size = count_arg("batch_size", batch_size, 1)
        removed = 0
        now = self._now()
        for family, registered_at in await self._families(now):
            if now - registered_at >= _FAMILY_GRACE_SECONDS:
                removed += await self._release_family(family)
        await purge_all(self._store, clock=self._clock, batch_size=batch_size)
        return removed

    # -- the primitives ---------------------------------------------------------------------

    async def read_record(self, conversation_id: str) -> ConversationRecord | None:
        """The record, or ``None``; also for a ``str`` no save can store (a lone surrogate,
        too long for a run id). Anything but a ``str`` is a ``ValidationError``."""
        conversation_id = _plain_id(conversation_id)
        try:
            key = _ids.key_of(records.run_id_of(conversation_id))
        except ValidationError:
            if isinstance(conversation_id, str):
                return None  # no save can store it
            raise
        found = await self._store.latest(key, now=self._now())
        if found is None:
            self._known.pop(conversation_id)
            return None
        record, known = self._decoded(found[0], conversation_id)
        self._known.put(conversation_id, known)
        return record

    async def read_records(
        self, *, scope: str | None = None, limit: int | None = None
    ) -> Sequence[ConversationRecord]:
        limit = _check_limit(limit)
        try:
            label = records.CONVERSATION_LABEL if scope is None else records.scope_label(scope)
        except ValidationError:
            if isinstance(scope, str):
                return []  # no save can store a conversation with that scope
            raise
        runs = await self._runs_with(label)
        runs.sort(key=lambda run: run.updated_at, reverse=True)
        found: list[ConversationRecord] = []
        last_kept: float | None = None
        for run in runs:
            # Saves the store's clock dates alike (a coarse clock, a test's fixed one) are
            # ordered by their records' updated_at: every one tied with the last kept is read.
            if limit is not None and len(found) >= limit and run.updated_at != last_kept:
                break
            conversation_id = records.conversation_id_of(run.run_id)
            record = None if conversation_id is None else await self._listed(conversation_id)
            if record is not None and (scope is None or record.scope == scope):
                found.append(record)
                last_kept = run.updated_at
        found.sort(key=lambda record: record.updated_at, reverse=True)
        return found[:limit]

    async def _listed(self, conversation_id: str) -> ConversationRecord | None:
        """The record, or ``None`` if it is damaged: one damaged record never hides the
        others from a listing (``read_record`` of it raises ``CorruptCheckpointError``)."""
        try:
            return await self.read_record(conversation_id)
        except CorruptCheckpointError as exc:
            logger.warning("skipping the damaged record of conversation %r: %s",
                           conversation_id[:80], exc)
            return None

    async def write_record(
        self,
        record: ConversationRecord,
        *,
        new_entries: Sequence[ConversationEntry] = (),
        expected_revision: str | None,
    ) -> None:
        """Store ``record`` in place of the one with ``expected_revision`` (``None``: a new
        conversation), keeping the stored record's title and metadata (:meth:`write_details`
        changes those, and a save that read the record before does not undo them)."""
        if not isinstance(record, ConversationRecord):
            raise ValidationError(
                f"record must be a ConversationRecord, got {type(record).__name__}")
        entries = cast(object, new_entries)
        if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence) or \
                not all(isinstance(entry, ConversationEntry) for entry in entries):
            raise ValidationError("new_entries must be a sequence of ConversationEntry")
        conversation_id = _plain_id(record.conversation_id)
        expected_revision = _plain_revision(expected_revision)
        # The record and every message are written as JSON before anything is stored: one
        # that cannot be leaves no trace (not even a family registered for it).
        records.check_record(record)
        messages = [records.message_json(entry) for entry in new_entries]
        key = _ids.key_of(records.run_id_of(conversation_id))
        now = self._now()
        joined = False
        known: Known | None = None
        if expected_revision is None:
            family, joined = await self._family_of_new(record, new_entries, now)
            incarnation, sequence = _ids.new_incarnation(), 0
        else:
            known = await self._expecting(conversation_id, expected_revision)
            family, incarnation, sequence = known.family, known.incarnation, known.sequence + 1
        registered = expected_revision is None and not joined  # the family is this write's
        if new_entries:
            await self._put_entries(family, new_entries, messages, now)
        for attempt in range(_SAVE_ATTEMPTS):
            if known is not None:
                record = dataclasses.replace(record, **known.details)
            checkpoint = self._checkpoint(key, record, family, incarnation, sequence, now)
            seed = self._seed(conversation_id, record, family, incarnation, checkpoint)
            stored = Known(record.revision, incarnation, sequence, family,
                           records.details_of(record))
            try:
                # The record, then (a fork) the check that its family is not being released:
                # both, whatever cancels the caller meanwhile (settled), so a fork that a
                # delete of its family overtook never stays behind without its history.
                await settled(self._committed(conversation_id, key, checkpoint, seed, stored,
                                              joined, now))
                return
            except StoreError:
                # Stored or not, nobody knows: a retry of this write must neither take its
                # record for another writer's nor remove entries that record may use.
                self._uncertain.put(record.revision, (expected_revision,))
                raise
            except SequenceConflict as exc:
                self._known.pop(conversation_id)
                await self.read_record(conversation_id)
                fresh = self._known.get(conversation_id)
                ours = fresh is not None and fresh.revision == record.revision
                if fresh is not None and ours and self._retrying(record, expected_revision):
                    # An earlier call of this write stored it and lost its reply.
                    await settled(self._adopted(conversation_id, key, fresh, family, joined,
                                                registered, new_entries, messages, now))
                    return
                if known is not None and attempt + 1 < _SAVE_ATTEMPTS and fresh is not None and (
                        fresh.revision, fresh.incarnation, fresh.family) == (
                        expected_revision, incarnation, family):
                    # A change of the title or metadata keeps the revision and moves the
                    # record on: save over it with what it holds now.
                    known, sequence = fresh, fresh.sequence + 1
                    continue
                creating = exc.joining
                if known is None and fresh is None and creating is not None and (
                        attempt + 1 < _SAVE_ATTEMPTS):
                    # The store holds the run without a record (a first write that failed
                    # midway): its first record goes there, or a new incarnation's would be
                    # refused for ever. The store's create-only write decides against a
                    # live creator.
                    incarnation = creating
                    continue
                await self._lost(record.revision, family, fresh, registered, ours, new_entries,
                                 messages, now)
                raise ConversationConflict(conversation_id) from exc

    def _retrying(self, record: ConversationRecord, expected_revision: str | None) -> bool:
        """Whether a call of this write (the same record, expecting the same revision) failed
        in this process without telling whether it was stored."""
        return self._uncertain.get(record.revision) == (expected_revision,)

    async def _committed(
        self, conversation_id: str, key: str, checkpoint: StoredCheckpoint, seed: RunRecord,
        stored: Known, joined: bool, now: float,
    ) -> None:
        try:
            await self._store.append(key, checkpoint, run=seed, keep_latest=1, now=now)
        except StoreError:
            # The store may have applied the append and lost its reply (its own retries ran
            # out): one read tells.
            if not await landed(self._store, key, checkpoint, self._now()):
                raise
        await self._kept(conversation_id, key, stored, joined, now)

    async def _adopted(
        self, conversation_id: str, key: str, stored: Known, family: str, joined: bool,
        registered: bool, entries: Sequence[ConversationEntry], messages: Sequence[bytes],
        now: float,
    ) -> None:
        """Finish a write whose record an earlier call stored: its entries belong to the
        stored record's family (a retry of a new conversation registered a family of its own
        and wrote them into it; the family goes, the entries stay)."""
        if stored.family != family:
            await self._put_entries(stored.family, entries, messages, now)
            await self._unregister(family, entries, registered)
        await self._kept(conversation_id, key, stored, joined, now)

    async def _kept(
        self, conversation_id: str, key: str, stored: Known, joined: bool, now: float
    ) -> None:
        """The record is stored: remember it; a fork withdraws it if its family is being
        released meanwhile."""
        self._known.put(conversation_id, stored)
        self._uncertain.pop(stored.revision)
        if joined and await self._releasing(stored.family, now):
            self._known.pop(conversation_id)
            await self._delete_checkpoint(key, stored)
            raise ConversationConflict(conversation_id)

    async def write_details(
        self,
        conversation_id: str,
        details: Mapping[str, Any],
        *,
        expected_revision: str,
        expected: Mapping[str, Any] | None = None,
    ) -> ConversationRecord:
        """Replace the record's ``title`` or ``metadata`` (the keys of ``details``), keeping
        its revision and ``updated_at``, if it still has ``expected_revision`` and the values
        of ``expected``; else ``ConversationConflict``. One read and one compare-and-set
        append: a save or another change landing in between refuses it (Pydantic AI's
        ``update`` then reads and tries again). The append is made at the time of the
        record's last save: listings (newest save first) and the TTL go by saves."""
        conversation_id = _plain_id(conversation_id)
        expected_revision = _plain_revision(expected_revision)
        if not isinstance(details, Mapping) or not (expected is None
                                                    or isinstance(expected, Mapping)):
            raise ValidationError("details and expected must be mappings of field names")
        unknown = [name for name in [*details, *(expected or ())]
                   if not (isinstance(name, str) and plain_str(name) in records.DETAILS)]
        if unknown:
            raise ValidationError(
                f"a conversation record has no {shown(unknown[0])} that an update can change")
        key = _ids.key_of(records.run_id_of(conversation_id))
        found = await self._store.latest(key, now=self._now())
        if found is None:
            self._known.pop(conversation_id)
            raise ConversationConflict(conversation_id)
        now = found[0].created_at  # the last save's: the run's last change stays that save
        record, known = self._decoded(found[0], conversation_id)
        self._known.put(conversation_id, known)
        if record.revision != expected_revision or any(
                getattr(record, name) != value for name, value in (expected or {}).items()):
            raise ConversationConflict(conversation_id)
        changed = dataclasses.replace(record, **details)
        sequence = known.sequence + 1
        checkpoint = self._checkpoint(key, changed, known.family, known.incarnation, sequence,
                                      now)
        seed = self._seed(conversation_id, changed, known.family, known.incarnation, checkpoint)
        try:
            await self._store.append(key, checkpoint, run=seed, keep_latest=1, now=now)
        except SequenceConflict as exc:
            self._known.pop(conversation_id)
            raise ConversationConflict(conversation_id) from exc
        stored, seen = self._decoded(checkpoint, conversation_id)  # a copy, as stored
        self._known.put(conversation_id, seen)
        return stored

    async def delete_record(self, conversation_id: str, *, expected_revision: str) -> None:
        """Delete the conversation; its entries stay while another conversation of its family
        (a fork of it, or what it was forked from) is stored, and are deleted with the last."""
        conversation_id = _plain_id(conversation_id)
        expected_revision = _plain_revision(expected_revision)
        known = await self._expecting(conversation_id, expected_revision)
        key = _ids.key_of(records.run_id_of(conversation_id))
        self._known.pop(conversation_id)
        if not await self._delete_checkpoint(key, known):
            raise ConversationConflict(conversation_id)
        await self._release_family(known.family)

    async def read_entry(self, entry_id: str) -> ConversationEntry:
        """The entry; ``KeyError`` if the store does not have it."""
        try:
            item_key = records.entry_key(entry_id)
        except ValidationError:
            raise KeyError(entry_id) from None  # no entry can have that id
        blob = self._entries.get(item_key)
        if blob is None:
            found = await self._entry_blob(entry_id)
            if found is None:
                raise KeyError(entry_id)
            blob = found
            self._remember(item_key, blob)
        return records.decode_entry(self._codec, blob, f"entry {entry_id[:80]!r}")[0]

    async def read_history(
        self, head_id: str | None, *, limit: int | None = None
    ) -> list[ConversationEntry]:
        """The entries up to ``head_id`` (Pydantic AI's walk). An entry of the chain that the
        store does not have is :class:`~fastcheckpoint.errors.CorruptCheckpointError` (also a
        ``LookupError``, which Pydantic AI takes for a record replaced meanwhile and reads
        again): ``load``, ``save``, ``branch`` and ``fork`` raise it for a stored record whose
        history is gone."""
        limit = _check_limit(limit)
        try:
            return await super().read_history(head_id, limit=limit)
        except KeyError as exc:
            where = f"entry {shown(exc.args[0] if exc.args else head_id)}"
            raise _MissingEntry("a conversation's history reaches an entry that is not stored",
                                key=where) from exc

    # -- internals ------------------------------------------------------------------------------

    def _now(self) -> float:
        return self._clock()

    def _expiry(self, now: float) -> float | None:
        return None if self._ttl_seconds is None else now + self._ttl_seconds

    def _decoded(
        self, checkpoint: StoredCheckpoint, conversation_id: str
    ) -> tuple[ConversationRecord, Known]:
        where = checkpoint.key or f"conversation {conversation_id[:80]!r}"
        record, family = records.decode_record(self._codec, checkpoint.payload, where)
        parsed = _ids.parse_checkpoint_id(checkpoint.checkpoint_id)
        if parsed is None or record.conversation_id != conversation_id:
            raise CorruptCheckpointError(
                f"this is not the record of conversation {conversation_id[:80]!r}", key=where)
        return record, Known(record.revision, parsed[1], parsed[2], family,
                             records.details_of(record))

    async def _expecting(self, conversation_id: str, revision: str) -> Known:
        """Where the record with ``revision`` is; ``ConversationConflict`` if it is not the
        stored one. Trusts what this process saw: a stale guess loses the store's own check."""
        known = self._known.get(conversation_id)
        if known is None or known.revision != revision:
            await self.read_record(conversation_id)
            known = self._known.get(conversation_id)
        if known is None or known.revision != revision:
            raise ConversationConflict(conversation_id)
        return known

    async def _family_of_new(
        self, record: ConversationRecord, new_entries: Sequence[ConversationEntry], now: float
    ) -> tuple[str, bool]:
        """The family a new record belongs to, and whether it joins an existing one (a fork):
        the family of the first stored entry it reaches, else a new one, registered."""
        new_ids = {entry.id for entry in new_entries}
        anchor = new_entries[0].parent_id if new_entries else record.head_id
        if anchor is not None and anchor not in new_ids:
            found = await self._entry_blob(anchor)
            if found is None:
                raise ConversationConflict(record.conversation_id)
            where = f"entry {anchor[:80]!r}"
            return records.decode_entry(self._codec, found, where)[1], True
        family = _ids.new_incarnation() + _ids.new_incarnation()
        await self._store.put_items(
            records.FAMILIES_KEY, [Item(key=family, value=repr(now).encode("ascii"))], now=now)
        return family, False

    async def _put_entries(
        self, family: str, entries: Sequence[ConversationEntry], messages: Sequence[bytes],
        now: float,
    ) -> None:
        """Index the entries in their family first, so a crash leaves nothing untracked
        (``messages``: each entry's :func:`~._pydantic_ai_records.message_json`)."""
        by_run: dict[str, list[Item]] = {}
        owned: list[Item] = []
        for entry, message in zip(entries, messages, strict=True):
            run_key, item_key = records.entries_run_key(entry.id), records.entry_key(entry.id)
            blob = records.encode_entry(self._codec, entry, family, message)
            by_run.setdefault(run_key, []).append(Item(key=item_key, value=blob))
            owned.append(Item(key=records.OWNED_PREFIX + item_key, value=run_key.encode("ascii")))
        await self._store.put_items(records.family_key(family), owned, now=now)
        for run_key, items in by_run.items():
            await self._store.put_items(run_key, items, now=now)
        for items in by_run.values():
            for item in items:
                self._remember(item.key, item.value)

    async def _lost(
        self, revision: str, family: str, stored: Known | None, registered: bool, ours: bool,
        entries: Sequence[ConversationEntry], messages: Sequence[bytes], now: float,
    ) -> None:
        """Clean up after a write that lost. Its entries are removed, unless a stored record
        may use them: its own record is the stored one (``ours``: a write repeated), or an
        earlier call of it may have stored it before another writer's replaced it. They then
        stay, in the stored record's family."""
        if not ours and self._uncertain.get(revision) is None:
            await self._discard(family, entries)
            if registered:
                await self._store.delete_items(records.FAMILIES_KEY, [family])
            return
        if stored is not None and stored.family != family:
            await self._put_entries(stored.family, entries, messages, now)
            await self._unregister(family, entries, registered)

    async def _unregister(
        self, family: str, entries: Sequence[ConversationEntry], registered: bool
    ) -> None:
        """Take ``entries`` out of ``family``'s index, leaving them stored, and the family
        out of the registry if this write registered it."""
        await self._store.delete_items(records.family_key(family), [
            records.OWNED_PREFIX + records.entry_key(entry.id) for entry in entries])
        if registered:
            await self._store.delete_items(records.FAMILIES_KEY, [family])

    async def _discard(self, family: str, entries: Sequence[ConversationEntry]) -> None:
        """Remove the entries of a write that lost (its record was not stored)."""
        if not entries:
            return
        by_run: dict[str, list[str]] = {}
        for entry in entries:
            by_run.setdefault(records.entries_run_key(entry.id), []).append(
                records.entry_key(entry.id))
        for run_key, keys in by_run.items():
            self._forget(keys)
            await self._store.delete_items(run_key, keys)
        await self._store.delete_items(
            records.family_key(family),
            [records.OWNED_PREFIX + key for keys in by_run.values() for key in keys])

    def _remember(self, item_key: str, blob: bytes) -> None:
        if len(blob) <= _CACHED_ENTRY_BYTES:
            self._entries.put(item_key, blob)

    def _forget(self, item_keys: list[str]) -> None:
        for item_key in item_keys:
            self._entries.pop(item_key)

    async def _entry_blob(self, entry_id: str) -> bytes | None:
        item_key = records.entry_key(entry_id)
        found = await self._store.get_items(
            records.entries_run_key(entry_id), [item_key], now=self._now())
        return found.get(item_key)

    def _checkpoint(
        self,
        key: str,
        record: ConversationRecord,
        family: str,
        incarnation: str,
        sequence: int,
        now: float,
    ) -> StoredCheckpoint:
        header = Header(run_id=records.run_id_of(record.conversation_id), step_name="save",
                        parent_id=None, tags=[], ttl_seconds=self._ttl_seconds)
        return StoredCheckpoint(
            sequence=sequence, checkpoint_id=_ids.checkpoint_id(key, incarnation, sequence),
            created_at=now, expires_at=self._expiry(now),
            header=self._codec.encode_header(header),
            payload=records.encode_record(self._codec, record, family))

    def _seed(
        self,
        conversation_id: str,
        record: ConversationRecord,
        family: str,
        incarnation: str,
        checkpoint: StoredCheckpoint,
    ) -> RunRecord:
        metadata: dict[str, object] = {"framework": records.FRAMEWORK,
                                       "conversation_id": conversation_id}
        if record.scope is not None:
            metadata["scope"] = record.scope
        if record.forked_from is not None:
            metadata["forked_from"] = record.forked_from
        return RunRecord(
            run_id=records.run_id_of(conversation_id), incarnation=incarnation,
            status=CheckpointStatus.ACTIVE.value, created_at=checkpoint.created_at,
            updated_at=checkpoint.created_at, latest_sequence=checkpoint.sequence,
            checkpoint_count=1, expires_at=checkpoint.expires_at,
            data=self._codec.encode_run_data(RunData(metadata=metadata)),
            labels=records.labels_of(record.scope, family))

    async def _delete_checkpoint(self, key: str, known: Known) -> bool:
        """Delete the record ``known`` names, only if it is still the stored one."""
        return await self._store.delete(
            key, known.sequence,
            checkpoint_id=_ids.checkpoint_id(key, known.incarnation, known.sequence))

    async def _releasing(self, family: str, now: float) -> bool:
        found = await self._store.scan_items(
            records.family_key(family), prefix=records.CLOSING_PREFIX, limit=1, now=now)
        return bool(found)

    async def _release_family(self, family: str) -> int:
        """Delete the family's entries if none of its conversations is stored; returns how
        many. The marker goes before the decisive check and stays: a fork whose record lands
        after that check sees it and withdraws."""
        if await self._has_members(family):
            return 0
        now = self._now()
        family_key = records.family_key(family)
        marker = records.CLOSING_PREFIX + _ids.new_incarnation()
        await self._store.put_items(family_key, [Item(
            key=marker, value=b"", expires_at=now + _CLOSING_SECONDS)], now=now)
        if await self._has_members(family):
            await self._store.delete_items(family_key, [marker])
            return 0
        removed = await self._delete_entries(family_key, now)
        await self._store.delete_items(records.FAMILIES_KEY, [family])
        return removed

    async def _has_members(self, family: str) -> bool:
        members, _ = await self._store.runs_with_label(
            records.family_label(family), limit=1, cursor=None, now=self._now())
        return bool(members)

    async def _delete_entries(self, family_key: str, now: float) -> int:
        removed = 0
        while True:
            page = await self._store.scan_items(
                family_key, prefix=records.OWNED_PREFIX, limit=_PAGE, now=now)
            if not page:
                return removed
            by_run: dict[str, list[str]] = {}
            for owned_key, where in page:
                by_run.setdefault(where.decode("ascii"), []).append(
                    owned_key[len(records.OWNED_PREFIX):])
            for run_key, keys in by_run.items():
                self._forget(keys)
                removed += await self._store.delete_items(run_key, keys)
            await self._store.delete_items(family_key, [owned_key for owned_key, _ in page])

    async def _families(self, now: float) -> list[tuple[str, float]]:
        families: list[tuple[str, float]] = []
        after: str | None = None
        while True:
            page = await self._store.scan_items(
                records.FAMILIES_KEY, start_after=after, limit=_PAGE, now=now)
            families += [(family, _registered_at(value)) for family, value in page]
            if len(page) < _PAGE:
                return families
            after = page[-1][0]

    async def _runs_with(self, label: str) -> list[RunRecord]:
        runs: list[RunRecord] = []
        cursor: str | None = None
        while True:
            page, cursor = await self._store.runs_with_label(
                label, limit=_PAGE, cursor=cursor, now=self._now())
            runs += page
            if cursor is None:
                return runs


def _plain_id(conversation_id: object) -> str:
    """A conversation id as a plain ``str`` (a subclass's own ``__eq__`` and ``__hash__``
    never run in the caches); anything but a ``str`` is a :class:`ValidationError`."""
    if not isinstance(conversation_id, str):
        raise ValidationError(
            f"conversation_id must be a str, got {type(conversation_id).__name__}")
    return plain_str(conversation_id)


def _plain_revision(revision: object) -> Any:
    return plain_str(revision) if isinstance(revision, str) else revision


def _check_limit(limit: object) -> int | None:
    """``None``, or ``limit`` as a plain ``int`` >= 0 (a numpy integer too, which Pydantic
    AI's in-memory store takes)."""
    return None if limit is None else count_arg("limit", limit, 0, " or None")


class _MissingEntry(CorruptCheckpointError, LookupError):
    """An entry that a stored record's history reaches is not stored."""


def _registered_at(value: bytes) -> float:
    try:
        return float(value.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return 0.0  # not ours to date: old enough to be checked
