"""CheckpointManager: every rule about checkpoints lives here; stores only persist bytes."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import math
from collections import OrderedDict
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Coroutine,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

import anyio
import anyio.lowlevel
import msgspec

from fastcheckpoint import _export, _ids
from fastcheckpoint._codec import Codec, Header, Payload, RunData, to_json_text
from fastcheckpoint._config import (
    MAX_TTL_SECONDS,
    CheckpointConfig,
    RetryPolicy,
    environment,
    ttl_setting,
)
from fastcheckpoint._history import Histories, Written
from fastcheckpoint._logs import LogGap, Read
from fastcheckpoint._model import (
    Checkpoint,
    CheckpointMetadata,
    CheckpointStatus,
    RepairReport,
    RunInfo,
    StatusChange,
)
from fastcheckpoint._settle import settled
from fastcheckpoint._threads import in_worker_thread
from fastcheckpoint._urls import store_url_from_env, ttl_seconds_from_days
from fastcheckpoint._validate import (
    count_arg,
    list_arg,
    lookup_id,
    mapping_arg,
    request_arg,
    sequence_arg,
    shown,
    status_arg,
    tags_arg,
    text_arg,
)
from fastcheckpoint.errors import (
    CheckpointError,
    CheckpointNotFound,
    ConfigurationError,
    ConflictError,
    CorruptCheckpointError,
    SequenceConflict,
    SerializationError,
    SharedItemGone,
    ValidationError,
)
from fastcheckpoint.stores import (
    CheckpointHeader,
    CheckpointStore,
    RunDamage,
    RunRecord,
    StoredCheckpoint,
    SupportsAppendNext,
    SupportsDefaultTTL,
    SupportsRepair,
    never_suspends,
    offers_nested_items,
    offers_sequence_guard,
    open_store,
    purge_all,
)
from fastcheckpoint.stores._loops import running_library

__all__ = ["CheckpointManager", "RunPage"]

logger = logging.getLogger("fastcheckpoint")

_HINT_CAPACITY = 10_000

# Sequence conflicts are contention, not failure: the store names the head it holds, so a
# retry is well informed and the first few go at once. Writers that keep colliding (several
# processes on one run) then pause with full jitter from 1 ms, doubling up to the retry
# policy's cap: short pauses keep throughput (the policy's 100 ms base would idle every loser
# for a whole round), and the growth keeps a writer that loses again and again from running
# out of attempts while the others are still busy.
_FREE_RETRIES = 3
_DISCARD_SECONDS = 5.0
"""How long a create waits for the removal of the log parts its merge replaced, which no
cancellation of the caller cuts short (a removal given up is tried again at the next merge)."""
_RESUME_SECONDS = 5.0
"""How long a create on a FAILED run waits for the run to be made ACTIVE again, which no
cancellation of the caller cuts short (a change given up leaves the run FAILED; its next create
tries again)."""
_CONTENTION_BASE = 0.001
_ESTIMATE_NODES = 256
_ESTIMATE_DEPTH = 6
_PRUNE_PAGE = 500
"""Checkpoint headers listed per store read by :meth:`CheckpointManager.prune`."""
_LOST_DETAILS = (
    "status history",
    "approval requests and decisions",
    "error of a failed run",
    "run metadata",
)
"""What rebuilt run details cannot recover: it lived only in the damaged details."""
_LOST_IN_REPAIR = ("status (the run is active again)", *_LOST_DETAILS)
"""What a rebuilt run record cannot recover: it lived only in the damaged record."""
_REPAIR_PAGE = 500
"""Run records listed per store read by :meth:`CheckpointManager.repair` of a whole store."""
_TERMINAL = frozenset({CheckpointStatus.COMPLETED, CheckpointStatus.FAILED,
                       CheckpointStatus.REJECTED})


@dataclass
class _Hint:
    """What this process last saw of a run: a guess that saves a read, never the truth."""

    latest_sequence: int
    incarnation: str
    payload_size: int


@dataclass(eq=False)
class _Claim:
    """A create's claim on its run's throttling interval, told apart by identity: two creates
    may read the same time from the clock."""

    at: float


@dataclass
class _Turn:
    """The creates of one run in this process wait here for their turn to append."""

    lock: anyio.Lock
    users: int = 0


class RunPage(msgspec.Struct, frozen=True):
    """One page of :meth:`CheckpointManager.list_runs`; iterate it for the runs."""

    runs: list[RunInfo]
    next_cursor: str | None
    """Pass as ``cursor=`` for the next page; ``None`` on the last page."""

    def __iter__(self) -> Iterator[RunInfo]:
        return iter(self.runs)

    def __len__(self) -> int:
        return len(self.runs)


def resumed_note(checkpoint_id: str) -> str:
    """The note of the status change by which a create resumed a FAILED run."""
    return f"resumed: checkpoint {checkpoint_id} created"


def _parent(key: str, header: Header, incarnation: str, sequence: int) -> str | None:
    """A checkpoint's parent: the one the caller named, else the run's previous one."""
    if header.parent_id is not None or sequence == 0:
        return header.parent_id
    return _ids.checkpoint_id(key, incarnation, sequence - 1)


class CheckpointManager:
    """Creates and restores checkpoints of agent runs on any :class:`CheckpointStore`.

    Use ``async with CheckpointManager(store) as manager:`` (or ``start()`` and ``stop()``) to
    run the cleanup loop; every other method works without it.
    """

    def __init__(self, store: CheckpointStore, config: CheckpointConfig | None = None) -> None:
        if not isinstance(cast(object, store), CheckpointStore):
            hint = " (build one with open_store(url))" if isinstance(store, str) else ""
            raise ConfigurationError(
                f"store must implement CheckpointStore, got {type(store).__name__}{hint}")
        if config is not None and not isinstance(cast(object, config), CheckpointConfig):
            raise ConfigurationError(
                f"config must be a CheckpointConfig, got {type(config).__name__}")
        self._store = store
        self.config = config or CheckpointConfig()
        self._codec = Codec(
            enc_hook=self.config.enc_hook,
            dec_hook=self.config.dec_hook,
            compress_min_bytes=self.config.compress_min_bytes,
        )
        # FastAgentic's store-level TTL, applied when the config sets none.
        self._store_ttl = store.default_ttl_seconds if isinstance(
            store, SupportsDefaultTTL) else None
        cap = self.config.retry.max_delay
        self._contention = RetryPolicy(base_delay=min(_CONTENTION_BASE, cap), max_delay=cap)
        self._hints: OrderedDict[str, _Hint] = OrderedDict()
        self._nested = store if offers_nested_items(store) else None
        self._next = store if isinstance(store, SupportsAppendNext) else None
        self._histories = Histories(
            self._codec, min_entries=self.config.history_min_entries,
            enabled=self._nested is not None)
        self._last_create: OrderedDict[str, _Claim] = OrderedDict()
        self._writers: dict[str, _Turn] = {}
        self._cleanup: tuple[anyio.CancelScope, anyio.Event] | None = None
        self._cleanup_task: object = None  # keeps an asyncio task referenced while it runs

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CheckpointManager:
        """Store from ``FASTCHECKPOINT_URL``, config from ``FASTCHECKPOINT_*`` variables.

        Also accepts the deployment-style ``CHECKPOINT_MODE=development`` (memory store, when
        ``FASTCHECKPOINT_URL`` is unset) and ``CHECKPOINT_TTL_DAYS`` (default TTL, unless
        ``FASTCHECKPOINT_DEFAULT_TTL_SECONDS`` is set).
        """
        env = environment(environ)
        config = CheckpointConfig.from_env(env)
        ttl_days = env.get("CHECKPOINT_TTL_DAYS")
        if ttl_days and "FASTCHECKPOINT_DEFAULT_TTL_SECONDS" not in env:
            ttl = ttl_seconds_from_days(ttl_days)
            config = dataclasses.replace(config, default_ttl_seconds=ttl)
        return cls(open_store(store_url_from_env(env), retry=config.retry), config=config)

    @property
    def store(self) -> CheckpointStore:
        return self._store

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the cleanup loop in the background (idempotent).

        Unlike a task group, this may be called from any task and stopped from another (as
        FastAgentic allowed); :meth:`stop` cancels the loop and waits until it has ended. A
        loop that ended with its event loop (an ``asyncio.run()`` that returned without
        :meth:`stop`) is started again in the current one.
        """
        if self._cleanup is not None and not self._cleanup[1].is_set() and \
                not _loop_closed(self._cleanup_task):
            return
        scope, finished = anyio.CancelScope(), anyio.Event()

        async def run() -> None:
            try:
                with scope:
                    await self._cleanup_loop()
            finally:
                finished.set()

        self._cleanup = (scope, finished)
        self._cleanup_task = _spawn(run)

    async def stop(self) -> None:
        """Stop the cleanup loop and wait for it; no task outlives this call."""
        cleanup, self._cleanup = self._cleanup, None
        if cleanup is None:
            return
        scope, finished = cleanup
        if _loop_closed(self._cleanup_task):
            self._cleanup_task = None  # its event loop was closed with it: nothing runs it
            return
        scope.cancel()
        try:
            await settled(finished.wait())
        finally:
            self._cleanup_task = None

    async def aclose(self) -> None:
        """Stop the cleanup loop and close the store (which closes only what it created),
        also when the call is cancelled meanwhile."""
        try:
            await self.stop()
        finally:
            await settled(self._store.aclose())

    async def __aenter__(self) -> CheckpointManager:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _cleanup_loop(self) -> None:
        refused = None  # the configuration error last logged
        while True:
            try:
                removed = await self.cleanup_expired()
            except ConfigurationError as exc:
                # A store that cannot run here (a driver needing asyncio under trio, missing
                # permissions) fails each pass the same way: said once, without a traceback
                # the caller's own calls already show, until the reason changes.
                if str(exc) != refused:
                    logger.error("checkpoint cleanup cannot run: %s; trying again every %ss",
                                 exc, self.config.cleanup_interval)
                refused = str(exc)
            except Exception:
                logger.exception("checkpoint cleanup failed; trying again in %ss",
                                 self.config.cleanup_interval)
            else:
                refused = None  # the store ran: the same refusal later is news again
                if removed:
                    logger.info("checkpoint cleanup removed %d expired checkpoints", removed)
            await anyio.sleep(self.config.cleanup_interval)

    # -- create ---------------------------------------------------------------------------

    async def create(
        self,
        run_id: str,
        state: Mapping[str, Any],
        *,
        messages: Sequence[Any] | None = None,
        tool_calls: Sequence[Any] | None = None,
        context: Mapping[str, Any] | None = None,
        step_name: str = "",
        parent_id: str | None = None,
        tags: Sequence[str] | None = None,
        ttl_seconds: float | None = None,
        force: bool = False,
        expected_sequence: int | None = None,
    ) -> Checkpoint | None:
        """Append a checkpoint to the run; ``None`` only when throttled by the interval.

        The sequence is the run's next one as the store sees it (unique and gap-free across
        processes); ``parent_id`` defaults to the run's latest checkpoint and, when given,
        must name a live checkpoint of the same run.

        ``expected_sequence``: the sequence this checkpoint must take, that is the
        ``latest_sequence + 1`` of the run as the caller read it (``get_run``), or 0 for a
        run that must not exist yet. Should another create have taken it first (or the run
        be gone), :class:`ConflictError`, with nothing written: for writers that must not
        put their state over a state they have not seen.
        """
        key = _ids.key_of(run_id)
        run_id = _ids.plain_str(run_id)  # what is encoded: a str subclass is not
        body = Payload(
            mapping_arg("state", state),
            list_arg("messages", messages),
            list_arg("tool_calls", tool_calls),
            mapping_arg("context", context),
        )
        step = text_arg("step_name", step_name)
        tag_list = tags_arg(tags)
        expected = None if expected_sequence is None else sequence_arg(
            "expected_sequence", expected_sequence)
        if not isinstance(force, bool):
            raise ValidationError(f"force must be True or False, got {shown(force)}")
        now = self.config.clock()
        ttl = self._ttl(ttl_seconds, now)
        hint = self._hints.get(key)
        if not force and self._throttled(key, now):
            return None
        with self._throttle_slot(key, now):
            if parent_id is not None:
                parent_id = await self._require_parent(key, parent_id)
            content: Payload | bytes = body
            if not self._histories.enabled:
                content = await self._encode_payload(body, hint)
            expires_at = None if ttl is None else now + ttl
            header = Header(run_id, step, parent_id, tag_list, ttl)
            record, parent, status = await self._append(
                key, header, content, now=now, expires_at=expires_at, expected=expected)
        if status == CheckpointStatus.FAILED.value:
            status = await self._resume(run_id, record.checkpoint_id)
        metadata = CheckpointMetadata(
            run_id=run_id,
            checkpoint_id=record.checkpoint_id,
            sequence=record.sequence,
            created_at=now,
            status=_reported_status(status, record.checkpoint_id),
            step_name=step,
            parent_id=parent,
            tags=tag_list,
            ttl_seconds=ttl,
            expires_at=expires_at,
        )
        return Checkpoint(metadata, body.state, body.messages, body.tool_calls, body.context)

    async def _append(
        self,
        key: str,
        header: Header,
        content: Payload | bytes,
        *,
        now: float,
        expires_at: float | None,
        new_run: bool = False,
        expected: int | None = None,
    ) -> tuple[StoredCheckpoint, str | None, str]:
        """Propose the next sequence, retrying on conflicts; the store decides who wins.

        ``content`` is the encoded payload, or the body when its lists may be stored as logs
        (what is written then depends on the sequence each attempt proposes). Returns the
        record written, its parent id and the run status. Creates of one run in this process
        take turns: racing each other would only burn retries, and a log is extended only by
        the create after the one that wrote it. With ``new_run`` the checkpoint must start
        the run (sequence 0 of a new incarnation, or of a run the store holds without any
        checkpoint yet): an existing run is a :class:`ConflictError`, not a race to retry.
        With ``expected`` the checkpoint must
        take that sequence: 0 is ``new_run``; otherwise a run whose head is not the sequence
        before it (or no run) is a :class:`ConflictError`, and so is losing it to another
        writer.
        """
        async with self._writer(key):
            if expected == 0:
                new_run, expected = True, None
            return await self._append_turn(
                key, header, content, now=now, expires_at=expires_at, new_run=new_run,
                expected=expected)

    @contextlib.asynccontextmanager
    async def _writer(self, key: str) -> AsyncIterator[None]:
        turn = self._writers.get(key)
        if turn is None:
            turn = self._writers[key] = _Turn(anyio.Lock())
        turn.users += 1
        try:
            async with turn.lock:
                yield
        finally:
            turn.users -= 1
            if turn.users == 0:
                del self._writers[key]

    async def _append_turn(
        self,
        key: str,
        header: Header,
        content: Payload | bytes,
        *,
        now: float,
        expires_at: float | None,
        new_run: bool,
        expected: int | None,
    ) -> tuple[StoredCheckpoint, str | None, str]:
        hint = None if new_run else self._hints.get(key)
        guess = None if hint is None else (hint.latest_sequence, hint.incarnation)
        if expected is not None and (guess is None or guess[0] + 1 != expected):
            run = await self._store.get_run(key, now=now)
            guess = None if run is None else (run.latest_sequence, run.incarnation)
            _check_expected(header.run_id, expected, guess)
        extend = not new_run
        for attempt in range(self.config.max_sequence_retries):
            sequence, incarnation = (0, _ids.new_incarnation()) if guess is None else (
                guess[0] + 1, guess[1])
            written = await self._written(
                key, content, sequence=sequence, incarnation=incarnation, extend=extend,
                hint=hint)
            if not written.parts:
                content = written.payload  # no logs: the same bytes for every attempt

            stamped = functools.partial(
                self._stamped, key, header, incarnation, now=now, expires_at=expires_at,
                payload=written.payload, refs=written.refs)
            record = stamped(sequence)
            seed = RunRecord(
                run_id=header.run_id, incarnation=incarnation, status=CheckpointStatus.ACTIVE.value,
                created_at=now, updated_at=now, latest_sequence=sequence, checkpoint_count=1,
                expires_at=expires_at,
            )
            try:
                if written.refs and self._nested is not None:
                    status = await self._nested.append_with_items(
                        key, record, run=seed, keep_latest=self.config.keep_latest, now=now,
                        items=written.items)
                elif (self._next is not None and not new_run and not written.parts
                      and expected is None):
                    # The payload holds no log: the same at any sequence. Should other
                    # writers have moved the run on, the store stamps it at the next one.
                    status, record = await self._next.append_next(
                        key, record, run=seed, keep_latest=self.config.keep_latest, now=now,
                        renumber=stamped)
                    sequence = record.sequence
                else:
                    status = await self._store.append(
                        key, record, run=seed, keep_latest=self.config.keep_latest, now=now
                    )
            except SharedItemGone:
                # Another process removed the log this create extended (it deleted or pruned
                # its last holder): the same sequence again, with new logs.
                self._histories.forget(key)
                extend = False
                continue
            except SequenceConflict as conflict:
                joined = conflict.joining if new_run else None
                if joined is not None:
                    # A run without a checkpoint yet (its creator may have died before
                    # its first one): sequence 0 there is still the run's start, and the
                    # store's create-only write of it decides against a live creator.
                    guess = (-1, joined)
                    continue
                if new_run:
                    raise ConflictError(f"run {header.run_id!r} exists already") from conflict
                guess = await self._observed_head(key, conflict, now)
                if expected is not None:
                    _check_expected(header.run_id, expected, guess)
                last = attempt + 1 == self.config.max_sequence_retries
                if attempt >= _FREE_RETRIES and not last:
                    await anyio.sleep(self._contention.delay(attempt - _FREE_RETRIES))
                continue
            self._histories.remember(key, written, sequence=sequence, incarnation=incarnation)
            self._remember(key, _Hint(sequence, incarnation, written.size))
            await self._discard_merged(key, written)
            return record, _parent(key, header, incarnation, sequence), status
        raise ConflictError(
            f"could not append to run {header.run_id!r}: lost the sequence race "
            f"{self.config.max_sequence_retries} times in a row"
        )

    def _stamped(
        self, key: str, header: Header, incarnation: str, sequence: int, *, now: float,
        expires_at: float | None, payload: bytes, refs: tuple[str, ...],
    ) -> StoredCheckpoint:
        """The record of a create at ``sequence`` (its id and parent follow from it)."""
        parent = _parent(key, header, incarnation, sequence)
        return StoredCheckpoint(
            sequence=sequence,
            checkpoint_id=_ids.checkpoint_id(key, incarnation, sequence),
            created_at=now,
            expires_at=expires_at,
            header=self._codec.encode_header(msgspec.structs.replace(header, parent_id=parent)),
            payload=payload,
            refs=refs,
        )

    async def _discard_merged(self, key: str, written: Written) -> None:
        """Remove the log parts an acknowledged create merged into its own (readers that
        still look for them use the merged part). The create is stored already, so this
        never makes it fail: the removal runs to its end (at most
        :data:`_DISCARD_SECONDS`) whatever cancels the caller meanwhile, and the parts stay
        recorded for the run's next merge until it succeeded (a failure, a removal cut short
        or a process that died here costs only space). anyio's and trio's cancellations
        wait for the caller's next checkpoint; asyncio's own (``task.cancel()``,
        ``wait_for``) cannot be held back and are raised once the removal ended."""
        discard = written.discard
        if not discard:
            return
        with anyio.CancelScope(shield=True):
            removed = await settled(self._removed(key, discard),
                                    instant=never_suspends(self._store))
        if removed:
            self._histories.discarded(key, written)

    async def _removed(self, key: str, discard: list[str]) -> bool:
        with anyio.move_on_after(_DISCARD_SECONDS):
            try:
                await self._store.delete_items(key, discard)
            except CheckpointError as exc:
                logger.warning("could not remove %d merged log parts of run key %s (%s); the "
                               "run's next merge tries again", len(discard), key, exc)
                return False
            return True
        logger.warning("removing %d merged log parts of run key %s took over %ss; the run's "
                       "next merge tries again", len(discard), key, _DISCARD_SECONDS)
        return False

    async def _observed_head(
        self, key: str, conflict: SequenceConflict, now: float
    ) -> tuple[int, str] | None:
        if conflict.incarnation is not None and conflict.latest_sequence is not None:
            return conflict.latest_sequence, conflict.incarnation
        run = await self._store.get_run(key, now=now)
        return None if run is None else (run.latest_sequence, run.incarnation)

    def _remember(self, key: str, hint: _Hint) -> None:
        self._hints[key] = hint
        self._hints.move_to_end(key)
        if len(self._hints) > _HINT_CAPACITY:
            self._hints.popitem(last=False)

    def _throttled(self, key: str, now: float) -> bool:
        interval = self.config.checkpoint_interval
        if interval <= 0:
            return False
        last = self._last_create.get(key)
        return last is not None and now - last.at < interval

    @contextlib.contextmanager
    def _throttle_slot(self, key: str, now: float) -> Iterator[None]:
        """Claim the run's throttling interval before any I/O, so that concurrent creates of
        one run in this process see it at once; a create that fails gives it back."""
        if self.config.checkpoint_interval <= 0:
            yield
            return
        previous = self._last_create.get(key)
        claim = self._last_create[key] = _Claim(now)
        self._last_create.move_to_end(key)
        if len(self._last_create) > _HINT_CAPACITY:
            self._last_create.popitem(last=False)
        try:
            yield
        except BaseException:
            if self._last_create.get(key) is claim:  # else a later create holds the interval
                if previous is None:
                    del self._last_create[key]
                else:
                    self._last_create[key] = previous
            raise

    async def _resume(self, run_id: str, checkpoint_id: str) -> str:
        """A create on a FAILED run resumes it: ACTIVE again, recorded in the history.

        The checkpoint is already written, so this never fails the create (a caller retrying
        a create that raised would write it twice): if another worker changed the status
        meanwhile, the run's status as it is now is reported; if the store failed, the run
        stays FAILED, the failure is logged, and the run's next create tries again. Nor does
        a cancellation of the caller cut it short: the change runs to its end (at most
        :data:`_RESUME_SECONDS`, then it is given up as a failure is); anyio's and trio's
        cancellations wait for the caller's next checkpoint, asyncio's own are raised once
        the change ended (as :meth:`_discard_merged`)."""
        with anyio.CancelScope(shield=True):
            status = await settled(self._resumed(run_id, checkpoint_id),
                                   instant=never_suspends(self._store))
        return status  # noqa: RET504 (a cancel scope may swallow what its body raised)

    async def _resumed(self, run_id: str, checkpoint_id: str) -> str:
        with anyio.move_on_after(_RESUME_SECONDS):
            try:
                info = await self._make_active(run_id, checkpoint_id)
            except CheckpointError:
                logger.warning("run %r: checkpoint %s was created, but the failed run could "
                               "not be made active again; its next create tries again",
                               run_id, checkpoint_id, exc_info=True)
                return CheckpointStatus.FAILED.value
            return CheckpointStatus.FAILED.value if info is None else info.status.value
        logger.warning("run %r: checkpoint %s was created, but making the failed run active "
                       "again took over %ss; its next create tries again", run_id,
                       checkpoint_id, _RESUME_SECONDS)
        return CheckpointStatus.FAILED.value

    async def _make_active(
        self, run_id: str, checkpoint_id: str, *, note: str | None = None
    ) -> RunInfo | None:
        """Resume the FAILED episode the checkpoint's append saw, in the run it was created
        in. Should other workers have resumed the run and failed it again meanwhile, or
        another process have deleted it and started the run id again, that failure is not
        this one to resume: the status, and the error the run failed with, stay as they are.
        ``note`` is the history entry's (default: which checkpoint resumed the run)."""
        _, incarnation, sequence = _ids.require_checkpoint_id(checkpoint_id)

        def clear_error(data: RunData, now: float) -> None:
            data.error = None

        def same_episode(record: RunRecord) -> bool:
            if record.incarnation != incarnation:
                return False
            # The change that failed the run as the append saw it read the run before the
            # append: below this checkpoint. A later failure comes after a change that ended
            # that episode (each compare-and-sets the version the one before bumped), so after
            # the append: it read this checkpoint or a newer one.
            failed_after = self._codec.decode_run_data(record.data, run_id).failed_after
            return failed_after is None or failed_after < sequence

        try:
            return await self._transition(
                run_id, CheckpointStatus.ACTIVE, allowed={CheckpointStatus.FAILED},
                note=note or resumed_note(checkpoint_id), update=clear_error,
                still=same_episode)
        except ConflictError:
            return await self.get_run(run_id)  # another worker changed the status meanwhile

    def _ttl(self, ttl_seconds: object, now: float) -> float | None:
        if ttl_seconds is None:
            return self._default_ttl(now)
        ttl = _ids.plain_float(ttl_seconds)
        if ttl is None:
            raise ValidationError(f"ttl_seconds must be a number, got {shown(ttl_seconds)}")
        if not math.isfinite(ttl) or ttl <= 0 or now + ttl <= now or ttl > MAX_TTL_SECONDS:
            raise ValidationError(
                "ttl_seconds must be a finite, positive number of seconds up to "
                f"{MAX_TTL_SECONDS:.0f} (or None for the configured default_ttl_seconds), "
                f"got {shown(ttl_seconds)}"
            )
        return ttl

    def _default_ttl(self, now: float) -> float | None:
        """The config's ``default_ttl_seconds`` as it is now (FastAgentic reads its config at
        every create), else the store's; checked again, as the config may have changed."""
        default = self.config.default_ttl_seconds
        if default is None:
            default = self._store_ttl
            if default is None:
                return None
        return ttl_setting(default, "default_ttl_seconds", now)  # numpy, IntEnum too

    async def _require_parent(self, key: str, parent_id: str) -> str:
        """``parent_id`` as a plain ``str``, if it names a live checkpoint of the run."""
        parsed = lookup_id(parent_id, "parent_id")
        if parsed is None:
            raise CheckpointNotFound(
                f"parent_id {parent_id[:80]!r} does not exist (it is not a checkpoint id "
                "returned by create)")
        parent_id = _ids.plain_str(parent_id)
        parent_key, _, sequence = parsed
        if parent_key != key:
            raise CheckpointNotFound(f"parent_id {parent_id!r} belongs to another run")
        if await self._header_at(key, sequence, parent_id) is None:
            raise CheckpointNotFound(f"parent_id {parent_id!r} does not exist (or expired)")
        return parent_id

    async def _written(
        self, key: str, content: Payload | bytes, *, sequence: int, incarnation: str,
        extend: bool, hint: _Hint | None,
    ) -> Written:
        """What an attempt at ``sequence`` writes: the payload, and the logs' new entries."""
        if isinstance(content, bytes):
            return Written(content, [], (), [])
        body = content

        def write() -> Written:
            parts = self._histories.plan(
                key, body, sequence=sequence, incarnation=incarnation, extend=extend)
            return self._histories.encode(body, parts)

        # Large when this process has not written the run yet (the whole body), or when the
        # last write or the logs' prefix compared before extending them are.
        size = _estimated_size(body) if hint is None else max(
            hint.payload_size, self._histories.kept_bytes(key))
        if size >= self.config.offload_min_bytes:
            return await in_worker_thread(write)
        return write()

    async def _encode_payload(self, body: Payload, hint: _Hint | None) -> bytes:
        args = (body.state, body.messages, body.tool_calls, body.context)
        size = _estimated_size(body) if hint is None else hint.payload_size
        if size >= self.config.offload_min_bytes:
            return await in_worker_thread(self._codec.encode_payload, *args)
        return self._codec.encode_payload(*args)

    # -- read -----------------------------------------------------------------------------

    async def restore(self, run_id: str) -> Checkpoint | None:
        """The run's newest live checkpoint, or ``None``."""
        key = _ids.key_of(run_id)
        found = await self._read(key, None, self.config.clock())
        return None if found is None else await self._decode(key, *found, latest=True)

    async def restore_from(self, checkpoint_id: str) -> Checkpoint | None:
        """The checkpoint with this id if it is live, else ``None``. One direct store read.

        An id that is not one of ours (a FastAgentic ``ckpt-...`` id, say) is not found.
        """
        found = await self._get_by_id(checkpoint_id)
        return None if found is None else await self._decode(found[0], *found[1])

    async def _read(
        self, key: str, sequence: int | None, now: float
    ) -> tuple[StoredCheckpoint, str, dict[str, bytes]] | None:
        """The latest live checkpoint (``sequence`` ``None``) or the one at ``sequence``, its
        run status, and the items its logs are kept in: one store read."""
        if self._nested is not None:
            return await self._nested.read_with_items(key, sequence=sequence, now=now)
        found = await (self._store.latest(key, now=now) if sequence is None
                       else self._store.get(key, sequence, now=now))
        return None if found is None else (*found, {})

    async def _get_by_id(
        self, checkpoint_id: str
    ) -> tuple[str, tuple[StoredCheckpoint, str, dict[str, bytes]]] | None:
        """The run key and the live record with this id, if there is one."""
        parsed = lookup_id(checkpoint_id)
        if parsed is None:
            return None
        checkpoint_id = _ids.plain_str(checkpoint_id)  # compared: a subclass's own __eq__ not
        key, _, sequence = parsed
        found = await self._read(key, sequence, self.config.clock())
        if found is None:
            return None
        _check_located(key, found[0], sequence)
        if found[0].checkpoint_id != checkpoint_id:
            return None  # the same place in a later incarnation of the run: not this one
        return key, found

    async def _decode(
        self, key: str, stored: StoredCheckpoint, status: str, items: dict[str, bytes], *,
        latest: bool = False,
    ) -> Checkpoint:
        """The checkpoint read; ``latest``: it is the run's latest, which the next create may
        extend the logs of (a create at the sequence after it, checked by the store)."""
        header = self._codec.decode_header(stored.header, stored.key)
        _check_located(key, stored)
        _check_owner(key, stored, header)
        metadata = self._metadata(stored, header, _reported_status(status, stored.key))
        body, logs = await self._decode_body(key, stored, items)
        incarnation = _incarnation(stored)
        if latest and incarnation is not None:
            self._histories.adopt(key, logs, sequence=stored.sequence, incarnation=incarnation)
            hint = self._hints.get(key)
            if hint is None or hint.incarnation != incarnation or \
                    hint.latest_sequence < stored.sequence:
                size = len(stored.payload) + sum(map(len, items.values()))
                self._remember(key, _Hint(stored.sequence, incarnation, size))
        return Checkpoint(metadata, body.state, body.messages, body.tool_calls, body.context)

    async def _decode_body(
        self, key: str, stored: StoredCheckpoint, items: dict[str, bytes]
    ) -> tuple[Payload, dict[str, Read]]:
        """The body, its logged lists rebuilt from ``items`` (in a worker thread when large),
        and those logs as read. A log part missing is read once more: on a store whose reads
        are not atomic, another process may have merged it away between the listing and the
        reading of the parts."""
        def decode(items: dict[str, bytes]) -> tuple[Payload, dict[str, Read]]:
            payload = self._codec.decode_payload(stored.payload, stored.key)
            return self._histories.resolve(payload, items, stored.key)

        async def decoded(items: dict[str, bytes]) -> tuple[Payload, dict[str, Read]]:
            size = len(stored.payload) + sum(map(len, items.values()))
            if size >= self.config.offload_min_bytes:
                return await in_worker_thread(decode, items)
            return decode(items)

        try:
            return await decoded(items)
        except LogGap:
            again = await self._read(key, stored.sequence, self.config.clock())
            if again is None or again[0].checkpoint_id != stored.checkpoint_id:
                raise
            return await decoded(again[2])

    def _metadata(
        self, stored: CheckpointHeader, header: Header, status: CheckpointStatus
    ) -> CheckpointMetadata:
        return CheckpointMetadata(
            run_id=header.run_id,
            checkpoint_id=stored.checkpoint_id,
            sequence=stored.sequence,
            created_at=stored.created_at,
            status=status,
            step_name=header.step_name,
            parent_id=header.parent_id,
            tags=header.tags,
            ttl_seconds=header.ttl_seconds,
            expires_at=stored.expires_at,
        )

    async def list_checkpoints(
        self,
        run_id: str,
        limit: int = 100,
        *,
        before: str | None = None,
        tags: Sequence[str] | None = None,
        step_name: str | None = None,
        include_expired: bool = False,
    ) -> list[CheckpointMetadata]:
        """Metadata of the run's checkpoints, newest first; never reads payloads.

        Page with ``before=<checkpoint_id of the last item>``; a page shorter than ``limit``
        is the last. ``tags`` keeps checkpoints that carry all of them; ``step_name`` keeps
        exact matches. A corrupt header is logged and skipped so it never hides the others:
        the store is read on until the page is full or the run's checkpoints end.
        """
        key = _ids.key_of(run_id)
        limit = count_arg("limit", limit, 0)
        cursor, incarnation = (None, None) if before is None else self._before(key, before)
        wanted = set(tags_arg(tags))
        step = None if step_name is None else text_arg("step_name", step_name)
        now = self.config.clock()
        result: list[CheckpointMetadata] = []
        while len(result) < limit:
            page, status = await self._store.headers(
                key, before=cursor, limit=limit, now=now, include_expired=include_expired
            )
            # The incarnation of the first header whose id is readable (a damaged one says
            # nothing about the run).
            seen = next((found for stored in page
                         if (found := _incarnation(stored)) is not None), None)
            if incarnation is not None and seen is not None and seen != incarnation:
                break  # the run was deleted (and started again) since ``before`` was read
            run_status = _listed_status(status, run_id)
            for stored in page:
                metadata = self._listed(key, stored, run_status, now)
                if metadata is not None and wanted.issubset(metadata.tags) and (
                    step is None or metadata.step_name == step
                ):
                    result.append(metadata)
            if len(page) < limit:
                break  # the run's checkpoints end here
            cursor, incarnation = page[-1].sequence, seen or incarnation
        return result[:limit]

    def _before(self, key: str, before: str) -> tuple[int, str]:
        before_key, incarnation, sequence = _ids.require_checkpoint_id(before, "before")
        if before_key != key:
            raise ValidationError(f"before={before!r} is a checkpoint of another run")
        return sequence, incarnation

    def _listed(
        self, run_key: str, stored: CheckpointHeader, run_status: CheckpointStatus, now: float
    ) -> CheckpointMetadata | None:
        key = f"{stored.checkpoint_id} (header)"
        try:
            header = self._codec.decode_header(stored.header, key)
            _check_located(run_key, stored)
            _check_owner(run_key, stored, header)
        except CorruptCheckpointError:
            logger.warning("skipping corrupt checkpoint header %s", key, exc_info=True)
            return None
        expired = stored.expires_at is not None and now >= stored.expires_at
        return self._metadata(stored, header, CheckpointStatus.EXPIRED if expired else run_status)

    async def _header_at(
        self, key: str, sequence: int, checkpoint_id: str
    ) -> CheckpointMetadata | None:
        """The live checkpoint with this id, read without its payload."""
        now = self.config.clock()
        page, status = await self._store.headers(key, before=sequence + 1, limit=1, now=now)
        if not page or page[0].checkpoint_id != checkpoint_id:
            return None
        return self._listed(key, page[0], _listed_status(status, checkpoint_id), now)

    async def lineage(self, checkpoint_id: str) -> list[CheckpointMetadata]:
        """The checkpoint and its ancestors, newest first, as far as retention kept them.

        Follows ``parent_id`` across forks into the source run. An unknown id gives ``[]``.
        """
        if lookup_id(checkpoint_id) is None:
            return []
        chain: list[CheckpointMetadata] = []
        seen: set[str] = set()
        current: str | None = _ids.plain_str(checkpoint_id)
        while current is not None and current not in seen:
            seen.add(current)
            parsed = _ids.parse_checkpoint_id(current)
            if parsed is None:
                break
            metadata = await self._header_at(parsed[0], parsed[2], current)
            if metadata is None:
                break
            chain.append(metadata)
            current = metadata.parent_id
        return chain

    # -- delete and cleanup -----------------------------------------------------------------

    async def delete(self, checkpoint_id: str) -> bool:
        """Delete one checkpoint; ``False`` if it did not exist (or is not one of our ids)."""
        parsed = lookup_id(checkpoint_id)
        if parsed is None:
            return False
        key, _, sequence = parsed
        return await self._store.delete(
            key, sequence, checkpoint_id=_ids.plain_str(checkpoint_id))

    async def delete_run(self, run_id: str) -> int:
        """Delete the run with all its checkpoints and records; returns checkpoints deleted."""
        key = _ids.key_of(run_id)
        self._hints.pop(key, None)
        deleted = await self._store.delete_run(key)
        self._last_create.pop(key, None)  # a run started again under this id is a new run
        return deleted

    async def prune(self, run_id: str, keep: int) -> int:
        """Delete all but the newest ``keep`` live checkpoints of the run; returns how many.

        For a one-off change of retention (after lowering ``max_checkpoints_per_run``, or for
        a run written without a limit); creates prune as they go. It lists the run a page at
        a time (twice: to find the surplus, then a page of it at a time to delete it) and
        deletes each surplus checkpoint with one store call, so it costs in proportion to what
        it removes. It deletes oldest first, and each delete runs to its end even if the call
        is cancelled meanwhile: a prune cut short has removed the oldest part of the surplus
        and left the rest (a contiguous stretch below the ``keep`` newest), never a gap, and
        running it again finishes the work. Checkpoints created meanwhile are newer and kept;
        expired ones are left to :meth:`cleanup_expired`; a checkpoint whose header cannot be
        read is skipped and not counted.
        """
        keep = count_arg("keep", keep, 1, " (delete_run removes a whole run)")
        key = _ids.key_of(run_id)
        bounds = await self._surplus_bounds(key, keep)
        lowers: list[str | None] = [*bounds[1:], None] if bounds else []
        removed = 0
        for upper, lower in reversed(list(zip(bounds, lowers, strict=True))):
            removed += await self._prune_slice(key, upper, lower)
        return removed

    async def _surplus_bounds(self, key: str, keep: int) -> list[str]:
        """Ids cutting the run's surplus below its ``keep`` newest live checkpoints into
        slices of at most a page, newest first: slice ``i`` is what lies below ``bounds[i]``
        down to ``bounds[i + 1]`` included, the last one down to the oldest. Empty when
        nothing is surplus. Holds one id per page of surplus, not the surplus itself."""
        bounds: list[str] = []
        seen = 0
        cursor: int | None = None
        incarnation: str | None = None
        while True:
            page, cursor, incarnation = await self._prunable_page(key, cursor, incarnation)
            for _, checkpoint_id in page:
                seen += 1
                if seen >= keep and (seen - keep) % _PRUNE_PAGE == 0:
                    bounds.append(checkpoint_id)
            if cursor is None:
                return bounds if seen > keep else []

    async def _prune_slice(self, key: str, upper: str, lower: str | None) -> int:
        """Delete the live checkpoints below ``upper`` down to ``lower`` included (down to
        the oldest when ``None``), oldest first, each delete settled; returns how many."""
        _, incarnation, top = _ids.require_checkpoint_id(upper, "upper")
        floor = -1 if lower is None else _ids.require_checkpoint_id(lower, "lower")[2]
        doomed: list[tuple[int, str]] = []
        cursor: int | None = top
        while cursor is not None and cursor > floor:
            page, cursor, _ = await self._prunable_page(key, cursor, incarnation)
            doomed.extend(entry for entry in page if entry[0] >= floor)
        instant = never_suspends(self._store)
        removed = 0
        for sequence, checkpoint_id in reversed(doomed):
            change = self._store.delete(key, sequence, checkpoint_id=checkpoint_id)
            if await settled(change, instant=instant):
                removed += 1
        return removed

    async def _prunable_page(
        self, key: str, before: int | None, incarnation: str | None
    ) -> tuple[list[tuple[int, str]], int | None, str | None]:
        """One store page of the run's live checkpoints below ``before``, newest first, as
        (sequence, id) pairs, without those whose header cannot be read; with the ``before``
        of the next page (``None`` at the end) and the incarnation read. A checkpoint of
        another incarnation than ``incarnation`` (the run was deleted and started again
        meanwhile) ends the listing: what prune found surplus is gone already."""
        now = self.config.clock()
        page, _ = await self._store.headers(key, before=before, limit=_PRUNE_PAGE, now=now)
        found: list[tuple[int, str]] = []
        for stored in page:
            if self._listed(key, stored, CheckpointStatus.ACTIVE, now) is None:
                continue
            if incarnation is None:
                incarnation = _incarnation(stored)
            elif _incarnation(stored) != incarnation:
                return found, None, incarnation
            found.append((stored.sequence, stored.checkpoint_id))
        more = len(page) == _PRUNE_PAGE
        return found, page[-1].sequence if more else None, incarnation

    async def cleanup_expired(self) -> int:
        """Remove expired checkpoints, items and runs in bounded batches; returns checkpoints."""
        return await purge_all(
            self._store, clock=self.config.clock, batch_size=self.config.cleanup_batch_size)

    # -- repair ---------------------------------------------------------------------------

    async def repair(self, run_id: str | None = None) -> list[RepairReport]:
        """Rebuild damaged run records from their runs' checkpoint logs; one report each.

        With ``run_id`` only that run is checked; without, every run of the store (this reads
        every run record: an operator's tool, not for hot paths). A damaged record (failing its
        checksum, unreadable, contradicting the log) never hides intact checkpoints, but it
        blocks creates and status changes until it is rebuilt. The rebuilt record takes what
        the log holds (incarnation, latest sequence, count, expiry) and starts ACTIVE with a
        history entry saying so; what lived only in the damaged record is listed in
        :attr:`RepairReport.lost`. A record the store reads but whose run details (history,
        approval, error) or status cannot be decoded is reset in place the same way, keeping a
        readable status. An empty list means nothing was damaged. Raises
        :class:`ConfigurationError` when the store cannot rebuild run records.
        """
        key = None if run_id is None else _ids.key_of(run_id)
        store = self._store
        if not isinstance(store, SupportsRepair):
            raise ConfigurationError(
                f"{type(store).__name__} cannot rebuild damaged run records (it does not "
                "implement SupportsRepair)")
        now = self.config.clock()
        found = await store.damaged_runs(run_key=key, now=now)
        reports = [await self._rebuild(store, damage, now) for damage in found]
        if key is not None and found:
            return reports  # the store's own record was damaged: rebuilt or reported already
        async for record in self._run_records(key, now):
            report = await self._reset_details(record, now)
            if report is not None:
                reports.append(report)
        return reports

    async def _run_records(self, key: str | None, now: float) -> AsyncIterator[RunRecord]:
        """The live run record at ``key``, or every live run record of the store."""
        if key is not None:
            record = await self._store.get_run(key, now=now)
            if record is not None and _ids.run_key(record.run_id) == key:
                yield record
            return
        cursor: str | None = None
        while True:
            records, cursor = await self._store.list_runs(
                status=None, limit=_REPAIR_PAGE, cursor=cursor, now=now)
            for record in records:
                yield record
            if cursor is None:
                return

    async def _reset_details(self, record: RunRecord, now: float) -> RepairReport | None:
        """Reset a run record whose details or status only the manager finds damaged (the
        store keeps them as opaque bytes, so its own repair sees nothing wrong); compare-and-set,
        so a record changed meanwhile is left alone. ``None`` if nothing is wrong."""
        key = _ids.run_key(record.run_id)
        where = f"run record of run key {key}"
        problem = self._details_problem(record, where)
        if problem is None:
            return None
        status_kept = _run_status(record.status) is not None
        status = record.status if status_kept else CheckpointStatus.ACTIVE.value
        data = RunData(history=[(status, now, "repair", f"run details rebuilt ({problem})")])
        report = functools.partial(RepairReport, run_id=record.run_id, key=where,
                                   problem=problem, checkpoints=record.checkpoint_count)
        try:
            await self._store.update_run(
                key, incarnation=record.incarnation, version=record.version, status=status,
                data=self._codec.encode_run_data(data), now=now)
        except (ConflictError, CheckpointNotFound):
            return report(outcome="not damaged", detail="the record changed meanwhile "
                          "(another process rewrote, repaired or deleted it)")
        return report(outcome="rebuilt",
                      lost=list(_LOST_DETAILS if status_kept else _LOST_IN_REPAIR))

    def _details_problem(self, record: RunRecord, where: str) -> str | None:
        if _run_status(record.status) is None:
            return f"unknown run status {record.status[:40]!r}"
        try:
            self._codec.decode_run_data(record.data, where)
        except CorruptCheckpointError as exc:
            return f"run details cannot be read: {exc}"
        return None

    async def _rebuild(
        self, store: SupportsRepair, damage: RunDamage, now: float
    ) -> RepairReport:
        run_id = self._run_id_of(damage)
        report = functools.partial(
            RepairReport, run_id=run_id, key=damage.key, problem=damage.problem,
            checkpoints=damage.checkpoints)
        if run_id is None:
            return report(outcome="unrecoverable", detail="no intact checkpoint names the run; "
                          "nothing to rebuild from (delete_run removes what is left)")
        note = f"run record rebuilt from {damage.checkpoints} checkpoints ({damage.problem})"
        data = RunData(history=[(CheckpointStatus.ACTIVE.value, now, "repair", note)])
        seed = RunRecord(
            run_id=run_id, incarnation="", status=CheckpointStatus.ACTIVE.value,
            created_at=now, updated_at=now, latest_sequence=0, checkpoint_count=0,
            expires_at=None, data=self._codec.encode_run_data(data),
        )
        try:
            rebuilt = await store.rebuild_run(damage.run_key, seed, now=now)
        except ConflictError:
            return report(outcome="not damaged", detail="the record is readable again "
                          "(another process repaired, rewrote or deleted it)")
        except CheckpointNotFound:
            return report(outcome="unrecoverable",
                          detail="no intact checkpoint is left to rebuild from")
        except (CorruptCheckpointError, ValidationError) as exc:
            # What the store found damaged beyond rebuilding is this run's report: it must
            # not end the repair of the runs after it (nor lose the reports before it).
            logger.warning("run %r (%s): the record could not be rebuilt", run_id, damage.key,
                           exc_info=True)
            return report(outcome="unrecoverable", detail=f"the store could not rebuild it: {exc}")
        if rebuilt.data != seed.data:
            # The store kept the record's own details (the run record was intact; what was
            # damaged lay beside it, as an S3 slot without its marker): nothing was lost.
            return report(outcome="rebuilt")
        return report(outcome="rebuilt", lost=list(_LOST_IN_REPAIR))

    def _run_id_of(self, damage: RunDamage) -> str | None:
        """The run id the newest intact checkpoint names, if it belongs to this run key."""
        if damage.newest is None:
            return None
        try:
            header = self._codec.decode_header(damage.newest.header, damage.key)
        except CorruptCheckpointError:
            return None
        if _ids.run_key(header.run_id) != damage.run_key:
            return None
        return header.run_id

    # -- branching ------------------------------------------------------------------------

    async def fork(
        self,
        checkpoint_id: str,
        new_run_id: str | None = None,
        *,
        ttl_seconds: float | None = None,
    ) -> Checkpoint:
        """Start ``new_run_id`` (default: a fresh id) from a copy of a checkpoint.

        The new run's first checkpoint has the source's payload, step name and tags, and
        ``parent_id`` = the source, so :meth:`lineage` leads back into the source run.
        Raises :class:`CheckpointNotFound` for an unknown source and :class:`ConflictError`
        when ``new_run_id`` already exists.
        """
        found = await self._get_by_id(checkpoint_id)
        if found is None:
            raise CheckpointNotFound(
                f"checkpoint {checkpoint_id[:80]!r} does not exist (or expired)")
        key, (source, _, items) = found
        checkpoint_id = _ids.plain_str(checkpoint_id)  # the new run's parent, encoded
        now = self.config.clock()
        header = self._codec.decode_header(source.header, source.key)
        _check_owner(key, source, header)
        # Read before anything is written: a source that cannot be restored is not copied.
        body, _ = await self._decode_body(key, source, items)
        if new_run_id is None:
            new_run_id = _ids.derived_run_id(header.run_id, f"-fork-{_ids.new_incarnation()}")
        new_key = _ids.key_of(new_run_id)
        new_run_id = _ids.plain_str(new_run_id)
        ttl = self._ttl(ttl_seconds, now)
        expires_at = None if ttl is None else now + ttl
        new_header = Header(new_run_id, header.step_name, checkpoint_id, header.tags, ttl)
        try:
            # A payload naming logs is written again: they are items of the source run.
            record, _, status = await self._append(
                new_key, new_header, body if source.refs else source.payload, now=now,
                expires_at=expires_at, new_run=True)
        except ConflictError as exc:
            raise ConflictError(f"cannot fork into {new_run_id!r}: that run exists") from exc
        metadata = self._metadata(record, new_header,
                                  _reported_status(status, record.checkpoint_id))
        return Checkpoint(metadata, body.state, body.messages, body.tool_calls, body.context)

    # -- runs -----------------------------------------------------------------------------

    async def get_run(self, run_id: str) -> RunInfo | None:
        key = _ids.key_of(run_id)
        record = await self._read_run(key)
        return None if record is None else self._run_info(record)

    async def _read_run(self, key: str, now: float | None = None) -> RunRecord | None:
        """The live run record at ``key``; a record of another run found there is corrupt."""
        record = await self._store.get_run(key, now=self.config.clock() if now is None else now)
        if record is not None and _ids.run_key(record.run_id) != key:
            raise CorruptCheckpointError(
                f"the run record found here belongs to run {record.run_id[:80]!r}",
                key=f"run record of run key {key}")
        return record

    async def list_runs(
        self,
        status: CheckpointStatus | str | None = None,
        *,
        limit: int = 100,
        cursor: str | None = None,
    ) -> RunPage:
        """Live runs, newest created first, optionally of one status; page with the cursor."""
        limit = count_arg("limit", limit, 1)
        if cursor is not None and not isinstance(cursor, str):
            raise ValidationError(f"cursor must be a str from a previous page, got {shown(cursor)}")
        wanted = None if status is None else status_arg(status).value
        records, next_cursor = await self._store.list_runs(
            status=wanted, limit=limit, cursor=cursor, now=self.config.clock()
        )
        return RunPage([info for info in map(self._listed_run, records) if info is not None],
                       next_cursor)

    def _listed_run(self, record: RunRecord) -> RunInfo | None:
        """The run for a listing; a record that cannot be read is logged and skipped, so it
        never hides the others (:meth:`repair` rebuilds it)."""
        try:
            return self._run_info(record)
        except CorruptCheckpointError:
            logger.warning("skipping run %r in a listing: its record cannot be read (repair "
                           "rebuilds it)", record.run_id[:80], exc_info=True)
            return None

    async def count_runs(self, status: CheckpointStatus | str | None = None) -> int:
        wanted = None if status is None else status_arg(status).value
        return await self._store.count_runs(status=wanted, now=self.config.clock())

    # -- audit export -----------------------------------------------------------------------

    def export_run(
        self,
        run_id: str,
        format: str = "json",
        *,
        include_state: bool = False,
        page_size: int = 100,
    ) -> AsyncGenerator[str, None]:
        """The run's history as text, streamed: ``async for chunk in manager.export_run(...)``.

        First the run (status, times, error, approval, every status change with who and when),
        then every checkpoint the store holds, newest first, ``page_size`` headers per store
        read (expired ones not yet purged too, with status EXPIRED). With ``include_state``
        each checkpoint's content is read as well, one checkpoint at a time. ``format`` is
        ``"json"`` (one document), ``"csv"`` (one row per record) or ``"markdown"``.

        Arguments are checked at once; a run that does not exist raises
        :class:`CheckpointNotFound` when iteration starts. The export reads the run, then its
        checkpoints page by page: checkpoints created meanwhile may be missing, and ones pruned
        meanwhile may be missing or (with ``include_state``) shown without content.
        """
        render = _export.renderer(format)
        _ids.key_of(run_id)
        if not isinstance(include_state, bool):
            raise ValidationError(f"include_state must be a bool, got {shown(include_state)}")
        page_size = count_arg("page_size", page_size, 1)
        return self._export(run_id, render, include_state, page_size)

    async def _export(
        self, run_id: str, render: _export.Renderer, include_state: bool, page_size: int
    ) -> AsyncGenerator[str, None]:
        run = await self.get_run(run_id)
        if run is None:
            raise CheckpointNotFound(f"run {run_id!r} does not exist (or expired)")

        async def entries() -> AsyncGenerator[_export.Entry, None]:
            before: str | None = None
            while True:
                page = await self.list_checkpoints(
                    run_id, page_size, before=before, include_expired=True)
                for metadata in page:
                    yield metadata, (await self._readable(metadata.checkpoint_id)
                                     if include_state else None)
                if len(page) < page_size:
                    return
                before = page[-1].checkpoint_id

        async with contextlib.aclosing(entries()) as listed, contextlib.aclosing(
            render(run, listed, include_state)
        ) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _readable(self, checkpoint_id: str) -> Checkpoint | str | None:
        """The checkpoint for an export, or why it cannot be read: one bad record must not
        end the export of the others."""
        try:
            return await self.restore_from(checkpoint_id)
        except (CorruptCheckpointError, SerializationError) as exc:
            logger.warning("export: cannot read %s: %s", checkpoint_id, exc)
            return f"{type(exc).__name__}: {exc}"

    async def mark_completed(self, run_id: str) -> RunInfo | None:
        """Set the run COMPLETED (from ACTIVE or PAUSED); ``None`` if there is no such run."""
        return await self._transition(
            run_id, CheckpointStatus.COMPLETED,
            allowed={CheckpointStatus.ACTIVE, CheckpointStatus.PAUSED},
        )

    async def mark_failed(self, run_id: str, error: str = "") -> RunInfo | None:
        """Set the run FAILED with ``error`` (from ACTIVE or PAUSED); ``None`` if no such run."""
        error = text_arg("error", error)

        def record_error(data: RunData, now: float) -> None:
            data.error = error

        return await self._transition(
            run_id, CheckpointStatus.FAILED,
            allowed={CheckpointStatus.ACTIVE, CheckpointStatus.PAUSED},
            note=error, update=record_error,
        )

    # -- human in the loop ------------------------------------------------------------------

    async def pause(
        self,
        run_id: str,
        request: Mapping[str, Any] | None = None,
        *,
        latest_sequence: int | None = None,
    ) -> RunInfo:
        """Ask for a human decision: record ``request`` and set the run PAUSED (from ACTIVE).

        Checkpoints nothing by itself. ``RunInfo.approval`` then holds ``{"request": ...,
        "requested_at": ...}``; ``list_runs(status=PAUSED)`` is the queue of pending requests.
        :class:`CheckpointNotFound` if there is no such run; :class:`ConflictError` if it is
        not ACTIVE (a paused run already waits for a decision).

        ``latest_sequence``: pause only while the run's newest checkpoint is still this one
        (the sequence of the checkpoint the request is about, ``metadata.sequence`` of what
        ``create`` returned). Should another process have created a checkpoint since,
        :class:`ConflictError` saying the run has newer checkpoints, and the run is left as
        it is: the request is about a state the run went past. The store decides it with
        the status change, atomically; a store that cannot
        (:class:`~fastcheckpoint.stores.SupportsSequenceGuard`) raises
        :class:`ConfigurationError`.
        """
        asked = request_arg(request)
        newest = None if latest_sequence is None else sequence_arg(
            "latest_sequence", latest_sequence)

        def record_request(data: RunData, now: float) -> None:
            data.approval = {"request": asked, "requested_at": now}

        return _found(await self._transition(
            run_id, CheckpointStatus.PAUSED, allowed={CheckpointStatus.ACTIVE},
            note=to_json_text(asked), update=record_request, must_exist=True,
            refusal="cannot be paused: it is {status}, and only an active run can be",
            latest_sequence=newest,
        ))

    async def approve(
        self,
        run_id: str,
        *,
        approver: str,
        comment: str = "",
        requested_at: float | None = None,
    ) -> RunInfo:
        """Approve the pending request: the run becomes ACTIVE again, the decision recorded.

        ``RunInfo.approval`` gains ``decision="approved"``, ``decided_by``, ``decided_at`` and
        ``comment``; the status history names the approver. Pass the ``requested_at`` of the
        request the approver saw to make sure that is the one approved (else
        :class:`ConflictError`). :class:`CheckpointNotFound` if there is no such run;
        :class:`ConflictError` if the run is not PAUSED, unless this very approval (same
        approver, comment and request) is the one recorded: a call made again after its
        reply was lost returns the run as it is.
        """
        return await self._decide(run_id, CheckpointStatus.ACTIVE, "approved", approver,
                                  "comment", text_arg("comment", comment), requested_at)

    async def reject(
        self,
        run_id: str,
        *,
        approver: str,
        reason: str = "",
        requested_at: float | None = None,
    ) -> RunInfo:
        """Reject the pending request: the run becomes REJECTED (final), the decision recorded.

        Like :meth:`approve`, with ``decision="rejected"`` and ``reason``. Rejecting a run that
        is already REJECTED returns it unchanged (a retried call); any other status that is not
        PAUSED is a :class:`ConflictError`; a missing run is :class:`CheckpointNotFound`.
        """
        return await self._decide(run_id, CheckpointStatus.REJECTED, "rejected", approver,
                                  "reason", text_arg("reason", reason), requested_at)

    async def _decide(
        self,
        run_id: str,
        target: CheckpointStatus,
        decision: str,
        approver: object,
        note_name: str,
        note: str,
        requested_at: float | None,
    ) -> RunInfo:
        who = text_arg("approver", approver)
        if not who:
            raise ValidationError("approver must name who decides, got an empty string")
        if requested_at is not None:
            requested_at = _time_arg(requested_at)

        def same_request(data: RunData) -> None:
            pending = (data.approval or {}).get("requested_at")
            if pending != requested_at:
                raise ConflictError(
                    f"run {run_id!r} holds the request made at {pending}, not the one made "
                    f"at {shown(requested_at)}; read the run again before deciding")

        def made_before(data: RunData) -> bool:
            # This very decision is recorded (same approver, note and request): a call made
            # again after its reply was lost, answered as it would have been.
            approval = data.approval or {}
            return (approval.get("decision"), approval.get("decided_by"),
                    approval.get(note_name)) == (decision, who, note) and (
                requested_at is None or approval.get("requested_at") == requested_at)

        def record_decision(data: RunData, now: float) -> None:
            approval = dict(data.approval or {})
            approval.update(
                {"decision": decision, "decided_by": who, "decided_at": now, note_name: note})
            data.approval = approval

        return _found(await self._transition(
            run_id, target, allowed={CheckpointStatus.PAUSED}, actor=who, note=note,
            update=record_decision, guard=None if requested_at is None else same_request,
            made=made_before, must_exist=True, refusal="is not awaiting approval (it is {status})",
        ))

    async def _transition(
        self,
        run_id: str,
        target: CheckpointStatus,
        *,
        allowed: set[CheckpointStatus],
        actor: str | None = None,
        note: str = "",
        update: Callable[[RunData, float], None] | None = None,
        guard: Callable[[RunData], None] | None = None,
        made: Callable[[RunData], bool] | None = None,
        still: Callable[[RunRecord], bool] | None = None,
        refusal: str = "",
        must_exist: bool = False,
        latest_sequence: int | None = None,
    ) -> RunInfo | None:
        """Compare-and-set the run's status; re-read and re-check on a lost race.

        The change goes into the status history with ``actor`` and ``note``; ``update`` records
        the rest (error, approval) in the run details, at the time of the change. ``guard``
        sees the run details first, before even a repeated final status returns the run
        unchanged, and raises to refuse. ``made`` says from them that this very change is
        recorded already (a call made again after its reply was lost): the run is returned
        as it is, and so does ``still`` saying from the run as read that the change no longer
        applies (the run went on since the caller decided it). ``refusal`` continues "run 'r' "
        to explain a status
        not in ``allowed`` (``{status}`` is replaced by the run's status). A missing run gives
        ``None``, or :class:`CheckpointNotFound` with ``must_exist``. ``latest_sequence``: the
        change applies only while the run's newest checkpoint is that one, decided by the
        store with the compare-and-set (else :class:`ConflictError`).
        """
        key = _ids.key_of(run_id)
        on_newest = self._sequence_guard(latest_sequence)
        for _ in range(self.config.max_sequence_retries):
            now = self.config.clock()
            record = await self._read_run(key, now)
            if record is None:
                _missing_run(run_id, must_exist)
                return None
            current = _status(record.status, key)
            data = self._codec.decode_run_data(record.data, key)
            if guard is not None:
                guard(data)
            if (current == target and target in _TERMINAL) or (
                    made is not None and made(data)) or (still is not None and not still(record)):
                return self._run_info(record)
            if current not in allowed:
                why = refusal or "is {status}; it cannot become " + target.value
                raise ConflictError(f"run {run_id!r} " + why.format(status=current.value))
            _check_newest(run_id, record, latest_sequence, target)
            data.history.append((target.value, now, actor, note))
            condition = on_newest
            if target is CheckpointStatus.FAILED:
                data.failed_after = record.latest_sequence  # tells this episode from later ones
                if not condition and _checks_status_apart(self._store):
                    # Exactly so where the store's appends do not read the status in their
                    # own atomic step (S3): a checkpoint landing meanwhile makes it read again.
                    condition = {"latest_sequence": record.latest_sequence}
            if update is not None:
                update(data, now)
            try:
                updated = await self._store.update_run(
                    key, incarnation=record.incarnation, version=record.version,
                    status=target.value,
                    data=self._codec.encode_run_data(data), now=now, **condition,
                )
            except CheckpointNotFound:
                _missing_run(run_id, must_exist)
                return None  # expired or deleted since read
            except ConflictError:
                continue
            return self._run_info(updated)
        raise ConflictError(f"run {run_id!r} kept changing; status change to {target} gave up")

    def _sequence_guard(self, latest_sequence: int | None) -> dict[str, int]:
        """The keyword a guarded status change passes to ``update_run`` (none without a
        guard, so stores written for the older signature are called as before), or
        :class:`ConfigurationError` when the store cannot take it."""
        if latest_sequence is None:
            return {}
        if not offers_sequence_guard(self._store):
            raise ConfigurationError(
                f"{type(self._store).__name__} cannot change a run's status on the condition "
                "that its newest checkpoint is unchanged (its update_run takes no "
                "latest_sequence; see SupportsSequenceGuard): call without latest_sequence, "
                "or use a store that offers it")
        return {"latest_sequence": latest_sequence}

    def _run_info(self, record: RunRecord) -> RunInfo:
        key = f"run {record.run_id!r}"
        data = self._codec.decode_run_data(record.data, key)
        return RunInfo(
            run_id=record.run_id,
            status=_status(record.status, key),
            created_at=record.created_at,
            updated_at=record.updated_at,
            latest_sequence=record.latest_sequence,
            checkpoint_count=record.checkpoint_count,
            expires_at=record.expires_at,
            error=data.error,
            approval=data.approval,
            metadata=data.metadata,
            history=[
                StatusChange(status=_status(status, key), at=at, actor=actor, note=note)
                for status, at, actor, note in data.history
            ],
        )


def _checks_status_apart(store: object) -> bool:
    """Whether ``store``'s appends report the run's status from a read made beside their
    write rather than in its atomic step (``appends_check_status_apart``, S3), and it offers
    the sequence guard: a failure then records the newest checkpoint it came after only when
    guarded. Elsewhere an append landing between the failure's read and its write read the
    run active, so the failure's count needs no guard (and a guard could only make a failure
    give up against a run that keeps being appended to)."""
    return getattr(store, "appends_check_status_apart", False) is True and \
        offers_sequence_guard(store)


def _check_newest(
    run_id: str, record: RunRecord, latest_sequence: int | None, target: CheckpointStatus
) -> None:
    """:class:`ConflictError` when a status change must find the run's newest checkpoint at
    ``latest_sequence`` and the run as read went past it (the store checks it again, with the
    change)."""
    if latest_sequence is not None and record.latest_sequence != latest_sequence:
        raise ConflictError(
            f"run {run_id!r} has newer checkpoints: its latest is {record.latest_sequence}, not "
            f"{latest_sequence}; it was not made {target.value} (read the run again)")


def _check_expected(run_id: str, expected: int, head: tuple[int, str] | None) -> None:
    """:class:`ConflictError` unless the run's head (``None``: no run) is the sequence just
    before ``expected``. (The same head in another incarnation, after this process's memory
    of the run went stale, passes: the next attempt proposes it there.)"""
    if head is None or head[0] + 1 != expected:
        now = "does not exist" if head is None else f"is at sequence {head[0]}"
        raise ConflictError(
            f"run {run_id!r} {now}: checkpoint {expected} was expected to be its next; "
            "another create came first, or the run is gone (read the run again)")


def _estimated_size(body: Payload) -> int:
    """A cheap lower bound of the encoded size: two levels deep, strings and bytes counted.

    Used only before this process has seen the run's real payload size, to decide whether
    encoding goes to a worker thread.
    """
    total = 0
    budget = _ESTIMATE_NODES
    stack: list[tuple[object, int]] = [(part, 0) for part in
                                        (body.state, body.messages, body.tool_calls, body.context)]
    while stack and budget > 0:
        value, depth = stack.pop()
        budget -= 1
        if isinstance(value, (str, bytes, bytearray)):
            total += len(value)
        elif isinstance(value, (dict, list, tuple)):
            total += 16 * len(value)  # each element costs at least a few bytes
            if depth < _ESTIMATE_DEPTH:
                children = value.values() if isinstance(value, dict) else value
                stack.extend((child, depth + 1) for child in itertools.islice(children, 64))
    return total


def _time_arg(value: object) -> float:
    """``requested_at`` as the ``float`` of epoch seconds the run records (an ``int``, or a
    numpy number read from a table, names the same time), or :class:`ValidationError`."""
    at = _ids.plain_float(value)
    if at is None or not math.isfinite(at):
        raise ValidationError(
            f"requested_at must be a time in epoch seconds (the request's "
            f"approval['requested_at']), got {shown(value)}")
    return at


def _incarnation(stored: CheckpointHeader) -> str | None:
    parsed = _ids.parse_checkpoint_id(stored.checkpoint_id)
    return None if parsed is None else parsed[1]


def _spawn(run: Callable[[], Coroutine[Any, Any, None]]) -> object:
    """Start ``run`` as a background task of the current event loop; return a handle to keep."""
    library = running_library()
    if library == "trio":
        import trio

        trio.lowlevel.spawn_system_task(run)
        return None
    if library != "asyncio":
        raise ConfigurationError(f"unsupported async library {library!r}")
    import asyncio

    return asyncio.get_running_loop().create_task(run())


def _loop_closed(task: object) -> bool:
    """Whether ``task`` (what :func:`_spawn` returned) belongs to an asyncio event loop that
    was closed without ending it (``loop.close()`` with tasks pending)."""
    import asyncio

    return isinstance(task, asyncio.Task) and task.get_loop().is_closed()


def _status(value: str, key: str) -> CheckpointStatus:
    try:
        return CheckpointStatus(value)
    except ValueError as exc:
        raise CorruptCheckpointError(f"unknown run status {value!r}", key=key) from exc


def _reported_status(value: str, where: str) -> CheckpointStatus:
    """The run status to report with a checkpoint read or just written (``where``).

    A status no run can have (a damaged run record) is logged and reported ACTIVE, as stores
    report a run whose record they cannot read: the run's intact checkpoints stay readable,
    and a create whose checkpoint is written never raises (its caller would write it twice).
    """
    status = _run_status(value)
    if status is not None:
        return status
    logger.warning("the run of %s holds the unknown status %r, reported as active until "
                   "repair resets its record", where, value[:40])
    return CheckpointStatus.ACTIVE


def _listed_status(value: str | None, where: str) -> CheckpointStatus:
    """The run status a listing reports: EXPIRED when no live run holds the checkpoints."""
    return CheckpointStatus.EXPIRED if value is None else _reported_status(value, where)


def _run_status(value: str) -> CheckpointStatus | None:
    """A run record's status, or ``None`` if it is none a run can have."""
    try:
        status = CheckpointStatus(value)
    except ValueError:
        return None
    return None if status is CheckpointStatus.EXPIRED else status


def _where(run_key: str, stored: CheckpointHeader) -> str:
    key = getattr(stored, "key", "")
    return key or f"run key {run_key}, sequence {stored.sequence}"


def _check_located(run_key: str, stored: CheckpointHeader, sequence: int | None = None) -> None:
    """A record read from ``run_key`` (at ``sequence``) must say it lives there: a record
    copied in from another run or slot is corrupt, never another run's data."""
    parsed = _ids.parse_checkpoint_id(stored.checkpoint_id)
    if (
        parsed is None
        or parsed[0] != run_key
        or parsed[2] != stored.sequence
        or (sequence is not None and stored.sequence != sequence)
    ):
        raise CorruptCheckpointError(
            f"the record found here belongs elsewhere: it names checkpoint "
            f"{stored.checkpoint_id[:80]!r} at sequence {stored.sequence}",
            key=_where(run_key, stored),
        )


def _check_owner(run_key: str, stored: CheckpointHeader, header: Header) -> None:
    """The run id inside a checkpoint must be the run it was read from."""
    if _ids.run_key(header.run_id) != run_key:
        raise CorruptCheckpointError(
            f"the record found here belongs to run {header.run_id[:80]!r}",
            key=_where(run_key, stored),
        )


def _missing_run(run_id: str, must_exist: bool) -> None:
    """Raise :class:`CheckpointNotFound` for a missing run where the caller must name one."""
    if must_exist:
        raise CheckpointNotFound(f"run {run_id[:80]!r} does not exist (or expired)")


def _found(info: RunInfo | None) -> RunInfo:
    """The result of a transition made with ``must_exist``, which never gives ``None``."""
    assert info is not None
    return info
