"""Microsoft Agent Framework workflow checkpoints on any fastcheckpoint store.

``FastCheckpointStorage`` implements Agent Framework's ``CheckpointStorage`` protocol: pass
it as ``WorkflowBuilder(checkpoint_storage=...)`` or ``workflow.run(...,
checkpoint_storage=...)``. Each framework checkpoint is one fastcheckpoint run (run id
``agent-framework:<checkpoint id>``) holding one checkpoint, labelled with its workflow's
name, so checkpoints appear in ``fastcheckpoint runs``, ``show``, ``history`` and
``export``; one waiting for responses to ``request_info`` requests is PAUSED. TTL applies.
No pickle: see ``fastcheckpoint.integrations._agent_framework_codec`` for what is stored.

Costs in store calls: ``save`` 1 (4 when it replaces a checkpoint of the same id),
``load`` 1, ``delete`` 2, ``list_checkpoint_ids`` 1 per 100 checkpoints of the workflow,
``get_latest`` that plus 1, ``list_checkpoints`` that plus 1 per checkpoint.

Needs ``pip install 'fastcheckpoint[agent-framework]'`` and a store with labels (every
bundled store).
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, NamedTuple, Protocol, cast

from fastcheckpoint import _ids
from fastcheckpoint._codec import Header, RunData
from fastcheckpoint._config import CheckpointConfig
from fastcheckpoint._gather import gather
from fastcheckpoint._manager import CheckpointManager
from fastcheckpoint._model import CheckpointStatus
from fastcheckpoint._settle import settled
from fastcheckpoint.errors import (
    CheckpointError,
    CheckpointNotFound,
    ConfigurationError,
    ConflictError,
    CorruptCheckpointError,
    SequenceConflict,
    ValidationError,
)
from fastcheckpoint.integrations._adapter import (
    RACE_ATTEMPTS,
    adapter_ttl,
    after_lost_race,
    capable_store,
)
from fastcheckpoint.stores import (
    MAX_LABEL_BYTES,
    CheckpointStore,
    RunRecord,
    StoredCheckpoint,
    SupportsLabels,
)

try:
    from agent_framework import WorkflowCheckpoint, WorkflowEvent
    from agent_framework.exceptions import WorkflowCheckpointException

    from fastcheckpoint.integrations._agent_framework_codec import CheckpointCodec
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ConfigurationError(
        "fastcheckpoint.integrations.agent_framework needs Microsoft Agent Framework: "
        "pip install 'fastcheckpoint[agent-framework]'") from exc

__all__ = ["FastCheckpointStorage", "WorkflowCheckpointNotFound"]

logger = logging.getLogger("fastcheckpoint.agent_framework")

FRAMEWORK = "agent-framework"
RUN_PREFIX = "agent-framework:"
"""Run ids are this plus the framework's checkpoint id."""
WORKFLOW_LABEL = "agent-framework:workflow:"
"""A run's label is this plus its workflow's name (hashed when the label would be too long)."""
_HASHED_LABEL = "agent-framework:workflow-sha256:"
_PAGE = 100
_PAUSED_KEPT = 1024
_READERS = 16
"""Checkpoints ``list_checkpoints`` reads at once."""
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
_MICROSECOND = _dt.timedelta(microseconds=1)


class WorkflowCheckpointNotFound(WorkflowCheckpointException, CheckpointNotFound):
    """No checkpoint has the id given to ``load``: Agent Framework's
    ``WorkflowCheckpointException`` (what its callers catch) and fastcheckpoint's
    ``CheckpointNotFound``."""


class _Listed(NamedTuple):
    """A checkpoint as a workflow listing sees it, from its run record alone."""

    checkpoint_id: str
    moment: int
    """The ``timestamp`` in microseconds since the epoch: exact, as the framework compares
    them (epoch seconds as a float merge microseconds after the year 2242)."""
    created_at: float
    key: str
    run_id: str
    previous: str | None


class _Labelled(CheckpointStore, SupportsLabels, Protocol):
    """A store with labels (for type checking only)."""


class FastCheckpointStorage:
    """An Agent Framework ``CheckpointStorage`` on a fastcheckpoint store (or a store URL).

    ``ttl_seconds``: every checkpoint expires that long after it is saved (``None``: the
    store's default TTL, else never). ``checkpoint_types``: the application's own classes
    that workflow state, messages or requests may hold (dataclasses, pydantic models,
    Enums), stored by their fields; plain data, datetime, UUID, tuple, set, Decimal and the
    framework's own objects need no declaring. ``clock``: epoch seconds (for tests).

    Lists come oldest first by the checkpoints' ``timestamp`` (the order a workflow saved
    them in); ``get_latest`` is the newest by ``timestamp``, as the framework's storages
    choose it. Saving an id that exists replaces that checkpoint, as the framework's
    in-memory storage does. ``load`` of an unknown id raises
    :class:`WorkflowCheckpointNotFound`, a ``WorkflowCheckpointException``; everything else
    raises :class:`fastcheckpoint.CheckpointError` subclasses (a value that cannot be
    stored: :class:`SerializationError`, before anything is written).

    ``async with FastCheckpointStorage(...)`` or :meth:`aclose` closes a store the storage
    opened from a URL (a store passed in stays open).
    """

    def __init__(
        self,
        store: CheckpointStore | str,
        *,
        ttl_seconds: float | None = None,
        checkpoint_types: Iterable[type[Any]] = (),
        clock: Callable[[], float] | None = None,
    ) -> None:
        built = cast(_Labelled, capable_store(
            store, CheckpointConfig().retry, "the Agent Framework storage", (SupportsLabels,)))
        self._store = built
        self._owns_store = isinstance(store, str)
        self._ttl_seconds = adapter_ttl(ttl_seconds, built)
        self._clock = time.time if clock is None else _checked_clock(clock)
        self._codec = CheckpointCodec(
            checkpoint_types, compress_min_bytes=CheckpointConfig().compress_min_bytes)
        # Decides a paused checkpoint's request (never closes the store: not entered).
        self._manager = CheckpointManager(built, config=CheckpointConfig(clock=self._clock))
        self._paused: OrderedDict[str, None] = OrderedDict()
        """Ids of PAUSED checkpoints this storage saved or loaded, newest last."""

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        checkpoint_types: Iterable[type[Any]] = (),
    ) -> FastCheckpointStorage:
        """The store and TTL ``CheckpointManager.from_env`` reads: ``FASTCHECKPOINT_URL``
        (or ``CHECKPOINT_MODE=development`` for memory, ``CHECKPOINT_MODE=production`` with
        ``CHECKPOINT_TABLE_NAME`` and ``CHECKPOINT_S3_BUCKET`` for DynamoDB+S3), and
        ``CHECKPOINT_TTL_DAYS`` or ``FASTCHECKPOINT_DEFAULT_TTL_SECONDS``. The storage owns
        that store: :meth:`aclose` closes it."""
        manager = CheckpointManager.from_env(environ)
        storage = cls(manager.store, ttl_seconds=manager.config.default_ttl_seconds,
                      checkpoint_types=checkpoint_types, clock=manager.config.clock)
        storage._owns_store = True
        return storage

    @property
    def store(self) -> CheckpointStore:
        return self._store

    @property
    def ttl_seconds(self) -> float | None:
        return self._ttl_seconds

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> FastCheckpointStorage:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the store if the storage opened it (from a URL or the environment)."""
        if self._owns_store:
            await self._store.aclose()

    # -- the CheckpointStorage protocol ---------------------------------------------------

    async def save(self, checkpoint: WorkflowCheckpoint) -> str:
        """Store a snapshot of ``checkpoint`` (one store call); returns its id. An existing
        checkpoint of that id is replaced (three more calls): the old one or the new one is
        stored at every moment, also for a reader in another process or after a crash."""
        if not isinstance(checkpoint, WorkflowCheckpoint):
            raise ValidationError(
                f"save takes a WorkflowCheckpoint, got {type(checkpoint).__name__}")
        checkpoint_id = _text("checkpoint_id", checkpoint.checkpoint_id)
        run_id = RUN_PREFIX + checkpoint_id
        key = _ids.key_of(run_id)
        workflow = _text("workflow_name", checkpoint.workflow_name)
        moment, micros = _moment(checkpoint.timestamp)
        payload = self._codec.encode(checkpoint)
        now = self._clock()
        expires_at = None if self._ttl_seconds is None else now + self._ttl_seconds
        header = self._codec.codec.encode_header(Header(
            run_id, f"iteration {checkpoint.iteration_count}"[:200], None, [],
            self._ttl_seconds))
        status, data = self._run_details(checkpoint, workflow, moment, micros, now)
        label = workflow_label(workflow)
        joining: str | None = None  # a run the store holds without a checkpoint yet
        for attempt in range(RACE_ATTEMPTS):
            if attempt:
                await after_lost_race(attempt - 1)
            existing = await self._store.get_run(key, now=now) if attempt else None
            incarnation = (joining or _ids.new_incarnation() if existing is None
                           else existing.incarnation)
            sequence = 0 if existing is None else existing.latest_sequence + 1
            record = StoredCheckpoint(
                sequence=sequence, checkpoint_id=_ids.checkpoint_id(key, incarnation, sequence),
                created_at=now, expires_at=expires_at, header=header, payload=payload)
            seed = RunRecord(
                run_id=run_id, incarnation=incarnation, status=status, created_at=now,
                updated_at=now, latest_sequence=sequence, checkpoint_count=1,
                expires_at=expires_at, data=data, labels=(label,))
            if existing is not None and label not in existing.labels:
                # Another workflow's checkpoint had the id: a run's labels never change, so
                # it goes whole and the new one takes its place.
                await self._store.delete_run(key)
                continue
            # Once the append landed, the details and the approval follow whatever cancels
            # the caller meanwhile (settled): never a replaced checkpoint whose run still
            # says what the old one did (its status, order, requests).
            refused = await settled(self._stored(key, record, seed, existing, checkpoint,
                                                 status, data, now))
            if refused is None:
                return checkpoint_id
            # The id is taken, or was replaced meanwhile: look again. A first save that
            # failed midway on a store that creates a run in several requests (S3) left the
            # run without a checkpoint: sequence 0 goes there, as the manager's create does
            # (a new incarnation's would be refused for ever).
            joining = refused.joining
        raise ConflictError(
            f"could not save checkpoint {checkpoint_id[:80]!r}: it was saved concurrently "
            f"{RACE_ATTEMPTS} times in a row")

    async def load(self, checkpoint_id: str) -> WorkflowCheckpoint:
        """The checkpoint of that id (one store call); :class:`WorkflowCheckpointNotFound`
        (a ``WorkflowCheckpointException``) if there is none, or it expired."""
        key = _key_of(checkpoint_id)
        found = None if key is None else await self._store.latest(key, now=self._clock())
        if found is None or key is None:
            raise WorkflowCheckpointNotFound(f"No checkpoint found with ID {checkpoint_id!r:.120}")
        checkpoint = self._decoded(RUN_PREFIX + checkpoint_id, found[0])
        self._remember(checkpoint_id, found[1])
        return checkpoint

    async def list_checkpoints(self, *, workflow_name: str) -> list[WorkflowCheckpoint]:
        """The workflow's checkpoints, oldest first by ``timestamp``. A damaged one is left
        out with a warning (as the framework's file storage does): the others still list."""
        listed = await self._listed(workflow_name)
        found = await gather([functools.partial(self._listed_read, entry) for entry in listed],
                             parallel=_READERS)
        return [checkpoint for checkpoint in found if checkpoint is not None]

    async def delete(self, checkpoint_id: str) -> bool:
        """Remove the checkpoint; whether one of that id existed (two store calls)."""
        key = _key_of(checkpoint_id)
        if key is None:
            return False
        existed = await self._store.get_run(key, now=self._clock()) is not None
        await self._store.delete_run(key)  # also what an expired one left behind
        return existed

    async def get_latest(self, *, workflow_name: str) -> WorkflowCheckpoint | None:
        """The workflow's checkpoint with the newest ``timestamp``, ``None`` if it has none.
        Among several with that ``timestamp`` (saved at one superstep), the framework's
        rule: one no other of them names as its ``previous_checkpoint_id``, then the
        greatest ``checkpoint_id``."""
        for entry in _newest_first(await self._listed(workflow_name)):
            found = await self._read(entry)
            if found is not None:
                return found
        return None

    async def list_checkpoint_ids(self, *, workflow_name: str) -> list[str]:
        """The ids of the workflow's checkpoints, oldest first by ``timestamp``; reads no
        checkpoint."""
        return [entry.checkpoint_id for entry in await self._listed(workflow_name)]

    # -- internals ------------------------------------------------------------------------

    def _run_details(
        self, checkpoint: WorkflowCheckpoint, workflow: str, moment: float, micros: int,
        now: float,
    ) -> tuple[str, bytes]:
        """The new run's status and encoded details: PAUSED, with the requests as its
        approval request, while the workflow waits for responses."""
        details = RunData(metadata={
            "framework": FRAMEWORK, "workflow": workflow,
            "checkpoint_id": checkpoint.checkpoint_id, "timestamp": moment,
            "timestamp_us": micros,
            "previous_checkpoint_id": checkpoint.previous_checkpoint_id,
            "iteration": checkpoint.iteration_count})
        requests = _requests(checkpoint.pending_request_info_events)
        status = CheckpointStatus.ACTIVE
        if requests:
            status = CheckpointStatus.PAUSED
            details.approval = {"request": {"requests": requests}, "requested_at": now}
            details.history.append((status.value, now, FRAMEWORK,
                                    f"waiting for responses to {len(requests)} request(s)"))
        return status.value, self._codec.codec.encode_run_data(details)

    async def _stored(
        self, key: str, record: StoredCheckpoint, seed: RunRecord, existing: RunRecord | None,
        checkpoint: WorkflowCheckpoint, status: str, data: bytes, now: float,
    ) -> SequenceConflict | None:
        """Append ``record`` and describe it; the refusal when its sequence is taken."""
        # A replacement (the id is taken: the framework's storages overwrite it) is the
        # run's next checkpoint, and keep_latest=1 removes the one it replaces in the same
        # atomic append: one of the two is stored whatever happens.
        try:
            await self._store.append(key, record, run=seed, keep_latest=1, now=now)
        except SequenceConflict as refused:
            return refused
        if existing is not None:
            await self._replace_details(key, existing, record.sequence, status, data, now)
        self._remember(checkpoint.checkpoint_id, status)
        await self._answered(checkpoint.previous_checkpoint_id, checkpoint.checkpoint_id)
        return None

    async def _replace_details(
        self, key: str, run: RunRecord, sequence: int, status: str, data: bytes, now: float
    ) -> None:
        """The run whose checkpoint ``sequence`` replaced the one before takes its status and
        details (listing order, lineage, pending requests), whatever changed them meanwhile
        (an approval); not once another save replaced it in turn (they are that one's)."""
        for attempt in range(RACE_ATTEMPTS):
            if attempt:
                await after_lost_race(attempt - 1)
            try:
                await self._store.update_run(
                    key, incarnation=run.incarnation, version=run.version, status=status,
                    data=data, now=now)
                return
            except CheckpointNotFound:
                return  # deleted since: nothing to describe
            except ConflictError:
                found = await self._store.get_run(key, now=now)
                if found is None or found.incarnation != run.incarnation or \
                        found.latest_sequence != sequence:
                    return  # deleted or replaced since: its details are not ours
                run = found
        raise ConflictError(
            f"could not record the details of checkpoint {run.run_id[len(RUN_PREFIX):][:80]!r}: "
            f"they changed concurrently {RACE_ATTEMPTS} times in a row")

    def _remember(self, checkpoint_id: str, status: str) -> None:
        if status != CheckpointStatus.PAUSED.value:
            return
        self._paused[checkpoint_id] = None
        if len(self._paused) > _PAUSED_KEPT:
            self._paused.popitem(last=False)

    async def _answered(self, paused_id: str | None, checkpoint_id: str) -> None:
        """A checkpoint saved after a paused one (the workflow got its responses) ends the
        pause: that run is approved by ``agent-framework`` (two store calls), so
        ``fastcheckpoint runs --status paused`` lists only requests still waiting."""
        if paused_id is None or paused_id not in self._paused:
            return
        del self._paused[paused_id]
        try:
            await self._manager.approve(
                RUN_PREFIX + paused_id, approver=FRAMEWORK,
                comment=f"responses delivered; the workflow went on in checkpoint "
                        f"{checkpoint_id[:80]}")
        except (CheckpointNotFound, ConflictError):
            logger.debug("checkpoint %r was no longer paused", paused_id[:80], exc_info=True)
        except CheckpointError:
            # The save is done; failing it now would make the runner think it was not.
            logger.warning("checkpoint %r stays PAUSED: its approval failed", paused_id[:80],
                           exc_info=True)

    async def _listed(self, workflow_name: str) -> list[_Listed]:
        if not isinstance(workflow_name, str):
            raise ValidationError(
                f"workflow_name must be a str, got {type(workflow_name).__name__}")
        try:
            label = workflow_label(workflow_name)
        except UnicodeEncodeError:
            # A lone surrogate: no save can store that name (as none stores an id ``load``
            # cannot encode), so the workflow has no checkpoints, as in the framework's.
            return []
        listed: list[_Listed] = []
        cursor: str | None = None
        while True:
            page, cursor = await self._store.runs_with_label(
                label, limit=_PAGE, cursor=cursor, now=self._clock())
            listed.extend(entry for record in page
                          if (entry := self._entry(record, workflow_name)) is not None)
            if cursor is None:
                break
        listed.sort(key=lambda entry: (entry.moment, entry.created_at))
        return listed

    def _entry(self, record: RunRecord, workflow: str) -> _Listed | None:
        if not record.run_id.startswith(RUN_PREFIX):
            return None
        try:
            metadata = self._codec.codec.decode_run_data(
                record.data, f"run {record.run_id[:80]!r}").metadata
        except CorruptCheckpointError:
            logger.warning("skipping a run with unreadable details", exc_info=True)
            return None
        moment = _listed_moment(metadata)
        if metadata.get("workflow") != workflow or moment is None:
            return None  # another workflow whose name hashes alike, or not one of ours
        previous = metadata.get("previous_checkpoint_id")
        return _Listed(record.run_id[len(RUN_PREFIX):], moment, record.created_at,
                       _ids.run_key(record.run_id), record.run_id,
                       previous if isinstance(previous, str) else None)

    async def _listed_read(self, entry: _Listed) -> WorkflowCheckpoint | None:
        try:
            return await self._read(entry)
        except CorruptCheckpointError as exc:
            logger.warning("skipping damaged checkpoint %r of the workflow: %s",
                           entry.checkpoint_id[:80], exc)
            return None

    async def _read(self, entry: _Listed) -> WorkflowCheckpoint | None:
        found = await self._store.latest(entry.key, now=self._clock())
        return None if found is None else self._decoded(entry.run_id, found[0])

    def _decoded(self, run_id: str, stored: StoredCheckpoint) -> WorkflowCheckpoint:
        place = stored.key or f"run {run_id[:80]!r}"
        header = self._codec.codec.decode_header(stored.header, place)
        if header.run_id != run_id:
            raise CorruptCheckpointError(
                f"the record found here belongs to run {header.run_id[:80]!r}", key=place)
        checkpoint = self._codec.decode(stored.payload, place)
        if RUN_PREFIX + checkpoint.checkpoint_id != run_id:
            raise CorruptCheckpointError(
                f"the checkpoint stored here is {checkpoint.checkpoint_id[:80]!r}", key=place)
        return checkpoint


def _newest_first(listed: list[_Listed]) -> list[_Listed]:
    """``listed`` (oldest first by timestamp) in the order ``get_latest`` prefers them: by
    timestamp, newest first; among equal ones, first those no other of them names as its
    parent (the lineage's leaves), each group by ``checkpoint_id``, greatest first."""
    parents: dict[int, set[str]] = {}
    for entry in listed:
        if entry.previous is not None:
            parents.setdefault(entry.moment, set()).add(entry.previous)
    return sorted(listed, reverse=True, key=lambda entry: (
        entry.moment, entry.checkpoint_id not in parents.get(entry.moment, ()),
        entry.checkpoint_id))


def workflow_label(workflow_name: str) -> str:
    """The label of a workflow's runs (``fastcheckpoint runs`` does not filter by label;
    the run details name the workflow)."""
    label = WORKFLOW_LABEL + workflow_name
    if len(label.encode("utf-8")) <= MAX_LABEL_BYTES:
        return label
    return _HASHED_LABEL + hashlib.sha256(workflow_name.encode("utf-8")).hexdigest()


def _requests(pending: object) -> list[dict[str, Any]]:
    """What ``fastcheckpoint show`` lists of the requests a checkpoint waits on."""
    if not isinstance(pending, dict):
        return []
    requests: list[dict[str, Any]] = []
    for request_id, event in pending.items():
        entry: dict[str, Any] = {"request_id": str(request_id)}
        if isinstance(event, WorkflowEvent) and event.type == "request_info":
            fields = event.to_dict()
            entry.update((name, fields[name]) for name in ("source_executor_id", "request_type")
                         if isinstance(fields.get(name), str))
        requests.append(entry)
    return requests


def _key_of(checkpoint_id: object) -> str | None:
    """The run key of a checkpoint id, ``None`` for an id nothing can be stored under."""
    if not isinstance(checkpoint_id, str):
        raise ValidationError(f"checkpoint_id must be a str, got {type(checkpoint_id).__name__}")
    try:
        return _ids.key_of(RUN_PREFIX + checkpoint_id)
    except ValidationError:
        return None


def _text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{name} must be a str, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValidationError(f"{name} must be valid unicode (it has a lone surrogate)") from exc
    return value


def _moment(timestamp: object) -> tuple[float, int]:
    """A checkpoint's ``timestamp`` (an ISO 8601 text; naive means UTC) in epoch seconds,
    for people (the run details), and in microseconds since the epoch, exactly, for
    ordering."""
    if not isinstance(timestamp, str):
        raise ValidationError(f"timestamp must be an ISO 8601 str, got {type(timestamp).__name__}")
    try:
        moment = _dt.datetime.fromisoformat(timestamp)
    except ValueError as exc:
        raise ValidationError(f"timestamp {timestamp[:60]!r} is not ISO 8601") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.timezone.utc)
    return moment.timestamp(), (moment - _EPOCH) // _MICROSECOND


def _listed_moment(metadata: Mapping[str, Any]) -> int | None:
    """The ``timestamp`` a run's details hold, in microseconds; from the epoch seconds alone
    for a run saved before the details held the exact value (exact until the year 2242)."""
    micros = metadata.get("timestamp_us")
    if isinstance(micros, int) and not isinstance(micros, bool):
        return micros
    seconds = metadata.get("timestamp")
    if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and \
            math.isfinite(seconds):
        return round(seconds * 1_000_000)
    return None


def _checked_clock(clock: object) -> Callable[[], float]:
    if not callable(clock):
        raise ConfigurationError(f"clock must be callable, got {type(clock).__name__}")
    return cast(Callable[[], float], clock)

