"""A LangGraph checkpoint saver on any fastcheckpoint store.

``FastCheckpointSaver`` is a ``langgraph.checkpoint.base.BaseCheckpointSaver``: pass it as
``StateGraph.compile(checkpointer=...)``. Each LangGraph thread namespace is one
fastcheckpoint run (the root namespace's run id is the thread id), so threads appear in
``fastcheckpoint runs``, ``show``, ``history`` and ``export``, an interrupted thread is
PAUSED in the approval queue, and TTL, retention and the cleanup loop apply. The layout is
described in ``fastcheckpoint.integrations._langgraph_records``; long list values (a growing
``messages``) are stored as logs of what each version adds
(``fastcheckpoint.integrations._langgraph_logs``).

Costs in store calls, in steady state (one process per thread, which it has read or
written before): ``aput`` 1 (the checkpoint with its changed channel values), ``aput_writes``
1 (2 when a batch mixes special and regular writes; 0 when the writes arrive before their
checkpoint's save, which then takes them along), ``aget_tuple`` 1 (latest, or by an id this
process has seen) else 2. The first save of a LangGraph run (``metadata["run_id"]``) in a
namespace adds 1 call, to index it for ``delete_for_runs``. ``aget_delta_channel_history``
(delta channels): 2 per 100 headers (read again after the writes), 1 per ancestor holding a
seed, 1 per 1,000 writes after it. A save whose parent this process has not seen and which
keeps values unchanged adds 1 or 2 (the parent's header: which of those values are logs).
Under ``keep_latest``, a save of a thread with delta channels adds 1 per 100 headers when
this process does not know its newest checkpoints (its first save of the thread, or one
after another process saved to it), and 1 or 2 for a parent it has not seen or read.
``aget_tuple`` by id of a thread with delta channels adds 1 per 100 headers back to where
the checkpoint's delta channels reach (it returns ``None`` for one whose ancestors there
were pruned), and 1 or 2 for an ancestor not among them (a fork's parent further back, one
removed, or a parent saved after its child: its index item, then its header and those
below it). ``alist`` reads its header pages that far ahead, and adds as much for such an
ancestor of a checkpoint it checks.

Needs ``pip install 'fastcheckpoint[langgraph]'`` and a store with labels and shared items
(every bundled store).
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
import functools
import logging
import math
import os
import random
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import Any, NamedTuple, Protocol, cast

import anyio
import msgspec

from fastcheckpoint import _ids
from fastcheckpoint._bridge import LoopBridge
from fastcheckpoint._codec import Codec, Header, RunData
from fastcheckpoint._config import CheckpointConfig, RetryPolicy
from fastcheckpoint._ids import plain_str
from fastcheckpoint._logs import LogGap
from fastcheckpoint._manager import _DISCARD_SECONDS, CheckpointManager
from fastcheckpoint._model import CheckpointStatus
from fastcheckpoint._settle import settled
from fastcheckpoint._threads import in_worker_thread
from fastcheckpoint._validate import count_arg, shown
from fastcheckpoint.errors import (
    CheckpointError,
    ConfigurationError,
    ConflictError,
    CorruptCheckpointError,
    SequenceConflict,
    SerializationError,
    SharedItemGone,
    ValidationError,
)
from fastcheckpoint.integrations import _langgraph_records as records
from fastcheckpoint.integrations._adapter import (
    adapter_config,
    adapter_ttl,
    capable_store,
    checked_keep_latest,
)
from fastcheckpoint.integrations._langgraph_logs import ChannelLogs, Planned
from fastcheckpoint.integrations._langgraph_records import (
    LANGGRAPH_LABEL,
    ChannelLog,
    ItemCodec,
    LangGraphHeader,
    Located,
    RegistryEntry,
    StoredWrite,
    Typed,
)
from fastcheckpoint.integrations._langgraph_state import Parked, SaverState, Signal, Window
from fastcheckpoint.stores import (
    CheckpointHeader,
    CheckpointStore,
    Item,
    RunRecord,
    StoredCheckpoint,
    SupportsLabels,
    SupportsSharedItems,
    nested_prefix,
    never_suspends,
    offers_nested_items,
)

try:
    from langchain_core.runnables import RunnableConfig
    from langgraph.checkpoint.base import (
        WRITES_IDX_MAP,
        BaseCheckpointSaver,
        ChannelVersions,
        Checkpoint,
        CheckpointMetadata,
        CheckpointTuple,
        DeltaChannelHistory,
        PendingWrite,
        get_checkpoint_metadata,
        writes_sort_key,
    )
    from langgraph.checkpoint.serde.base import SerializerProtocol
    from langgraph.checkpoint.serde.types import _DeltaSnapshot

    from fastcheckpoint.integrations._langgraph_lists import ListMemo  # LangGraph's serde
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ConfigurationError(
        "fastcheckpoint.integrations.langgraph needs LangGraph's checkpoint package: "
        "pip install 'fastcheckpoint[langgraph]'") from exc

__all__ = ["FastCheckpointSaver"]

logger = logging.getLogger("fastcheckpoint.langgraph")

_PAGE = 100
_CLEAR_KINDS = frozenset({"msgpack", "json"})
"""The kinds of LangGraph's serde output that hold a metadata key's name as it is."""
_COUNTERS_KEY = b"counters_since_delta_snapshot"
_WRITES_PAGE = 1000
"""Writes per scan of a delta channel's history (they are all read: pages only bound one
reply)."""
"""Checkpoint headers or runs read per store call by listings, deletes and copies."""
_PARKED_SECONDS = 30.0
"""How long writes for a checkpoint this process has not saved yet wait for its save (it
waits behind the previous save); then the store is asked, and writes to a checkpoint that
never came are dropped. The save releases them as soon as it ends, stored or not; only a
save that never starts (LangGraph skips the saves after one that failed) costs the wait."""
_UNSEEN_SECONDS = 0.05
"""How long writes parked for a checkpoint of a run this process knows wait, with no save of
the run on its way here, before the store is asked whether another process saved it (they
are stored at once then). LangGraph starts a queued save within moments of the one before
it ending, so writes of this process's own graph run are rarely asked about."""
_FREE_RETRIES = 3
_CONTENTION_BASE = 0.001
_FIRST_SAVE_SECONDS = 2.0
"""How long writes to a checkpoint of a run this process has not seen wait for its first
save (a blocking ``put`` and ``put_writes`` may reach the loop in either order). Not while
a save of the run is on its way here (a graph run's first save, which LangGraph's next saves
queue behind): the writes wait for it, then as for a run this process knows."""
_RELISTS = 3
"""How many times a thread's delete lists its namespaces again, for those started meanwhile."""
_REGISTRY_KEY = _ids.run_key(records.REGISTRY_RUN_ID)
_NO_RUN = object()
_QUEUEABLE = frozenset({CheckpointStatus.ACTIVE.value, CheckpointStatus.PAUSED.value})
"""Statuses of a thread whose latest checkpoint's interrupts a read queues for approval (a
PAUSED one only when its request is the graph's, about another checkpoint)."""
_REACTIVATED = frozenset({CheckpointStatus.PAUSED.value, CheckpointStatus.FAILED.value,
                          CheckpointStatus.REJECTED.value})
"""Statuses a root-namespace save ends: the graph went on after the interrupt or error (a
rejection answers one request; the thread goes on, and may ask again)."""


class _Where(NamedTuple):
    """One thread namespace and the run that holds it."""

    thread_id: str
    checkpoint_ns: str
    run_id: str
    key: str


class _Taken(NamedTuple):
    """What a save stores of LangGraph's objects, serialized when it begins."""

    checkpoint_id: str
    versions: dict[str, Any]
    """The checkpoint's ``channel_versions`` (a copy)."""
    changed: dict[str, tuple[Any, Typed]]
    """Channel -> (its new version, its value serialized) for the values the save writes."""
    bare: Typed
    """The checkpoint without its channel values, serialized."""
    metadata: Typed
    step_name: str
    stored: tuple[str, ...]
    """The channels with a value at this checkpoint."""


class _Encoded(NamedTuple):
    """A checkpoint ready to append, whatever sequence it gets."""

    checkpoint_id: str
    payload: bytes
    extra: LangGraphHeader
    step_name: str
    blobs: list[Item]
    refs: tuple[str, ...]
    size: int
    planned: list[Planned]
    """The logged values it writes (remembered once the save is acknowledged)."""
    log_life: str | None
    """The life (incarnation) of the run the logs it extends or keeps belong to: it may be
    appended only in that life (``None``: it names no earlier log)."""


@dataclasses.dataclass(eq=False)
class _Shared:
    """What the saver and its copies (``copy.copy``, ``with_allowlist``) share."""

    store: CheckpointStore
    manager: CheckpointManager
    codec: Codec
    items: ItemCodec
    ttl_seconds: float | None
    keep_latest: int | None
    bridge: LoopBridge
    state: SaverState
    logs: ChannelLogs
    lists: ListMemo
    instant: bool
    """The store's calls never suspend: a change of several is never cut (no task needed)."""


class FastCheckpointSaver(BaseCheckpointSaver[str]):
    """A LangGraph checkpointer on a fastcheckpoint store (or a store URL).

    ``ttl_seconds``: every checkpoint expires that long after it is saved, together with its
    pending writes and the channel values no other live checkpoint uses (``None``: the
    store's default TTL, else never). ``keep_latest``: each thread namespace keeps its newest
    N checkpoints, pruned by every save (``None`` keeps all). ``config``: the clock, retry
    policy and cleanup loop settings (its retention fields are not used: the two arguments
    above are). ``serde``: LangGraph's serializer (default ``JsonPlusSerializer``); values it
    tags ``"pickle"`` are refused, when saved and when loaded.

    Use ``async with FastCheckpointSaver(...) as saver:`` to run the cleanup loop (removes
    expired checkpoints) and close the store at the end, or call :meth:`aclose`. The blocking
    methods (``graph.invoke``) run on the event loop the saver was built or entered on, from
    another thread; see :meth:`close`.
    """

    def __init__(
        self,
        store: CheckpointStore | str,
        *,
        serde: SerializerProtocol | None = None,
        ttl_seconds: float | None = None,
        keep_latest: int | None = None,
        config: CheckpointConfig | None = None,
    ) -> None:
        super().__init__(serde=serde)
        settings = adapter_config(config, CheckpointConfig(max_checkpoints_per_run=None))
        capable = capable_store(store, settings.retry, "the LangGraph saver")
        ttl = adapter_ttl(ttl_seconds, capable)
        keep_latest = checked_keep_latest(keep_latest)
        manager = CheckpointManager(capable, config=dataclasses.replace(
            settings, default_ttl_seconds=ttl, max_checkpoints_per_run=keep_latest))
        codec = Codec(compress_min_bytes=settings.compress_min_bytes)
        self._shared = _Shared(
            store=capable, manager=manager, codec=codec,
            items=ItemCodec(codec),
            ttl_seconds=ttl, keep_latest=keep_latest, bridge=LoopBridge("the saver"),
            state=SaverState(), logs=ChannelLogs(
                settings.history_min_entries if offers_nested_items(capable) else None),
            lists=ListMemo(), instant=never_suspends(capable))
        self._shared.bridge.bind()

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        serde: SerializerProtocol | None = None,
    ) -> FastCheckpointSaver:
        """The store and settings ``CheckpointManager.from_env`` reads.

        ``FASTCHECKPOINT_URL`` (or ``CHECKPOINT_MODE=development`` for memory,
        ``CHECKPOINT_MODE=production`` with ``CHECKPOINT_TABLE_NAME`` and
        ``CHECKPOINT_S3_BUCKET`` for DynamoDB+S3), ``CHECKPOINT_TTL_DAYS`` or
        ``FASTCHECKPOINT_DEFAULT_TTL_SECONDS`` for ``ttl_seconds``, and
        ``FASTCHECKPOINT_MAX_CHECKPOINTS_PER_RUN`` for ``keep_latest`` (only when set: a
        LangGraph thread keeps its whole history by default).
        """
        manager = CheckpointManager.from_env(environ)
        env = os.environ if environ is None else environ
        keep = (manager.config.keep_latest
                if "FASTCHECKPOINT_MAX_CHECKPOINTS_PER_RUN" in env else None)
        return cls(manager.store, serde=serde, ttl_seconds=manager.config.default_ttl_seconds,
                   keep_latest=keep, config=manager.config)

    # -- what the saver is built on -------------------------------------------------------

    @property
    def store(self) -> CheckpointStore:
        return self._shared.store

    @property
    def manager(self) -> CheckpointManager:
        """A manager over the same store: runs, approvals (``approve``/``reject``), exports."""
        return self._shared.manager

    @property
    def ttl_seconds(self) -> float | None:
        return self._shared.ttl_seconds

    @property
    def keep_latest(self) -> int | None:
        return self._shared.keep_latest

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> FastCheckpointSaver:
        self._shared.bridge.bind()
        await self._shared.manager.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Wait for the saves and writes under way (a graph run cut short by a timeout leaves
        them running), then stop the cleanup loop, close the store and the saver's own loop
        thread (if the blocking methods started one). Copies share all three."""
        try:
            await self._settled_close()
        finally:
            await in_worker_thread(self._shared.bridge.stop)

    async def drain(self, thread_id: str | None = None) -> None:
        """Wait for the saves and writes under way in this process, of one thread or (no
        ``thread_id``) of all, and those they lead LangGraph to start: a graph run cut short
        by ``asyncio.timeout`` or ``asyncio.wait_for`` can return before LangGraph's calls to
        the saver end (LangGraph does not wait for them). Reads of a namespace and
        :meth:`aclose` wait for them by themselves. Without a thread, on a process that
        keeps saving, it returns once nothing is under way."""
        thread = None if thread_id is None else records.checked_thread_id(thread_id)
        await self._state.settle(thread_id=thread)

    def close(self) -> None:
        """:meth:`aclose` for programs without an event loop (blocking)."""
        try:
            self._shared.bridge.call(self._settled_close, "close")
        finally:
            self._shared.bridge.stop()

    async def _settled_close(self) -> None:
        await self._state.settle()
        await self._shared.manager.aclose()

    # -- reads ----------------------------------------------------------------------------

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """The checkpoint ``config`` names (its ``checkpoint_id``, else the namespace's
        latest), with its channel values and pending writes; ``None`` if there is none."""
        where = _where(config)
        checkpoint_id = _checkpoint_id(config)
        # A read sees what this process's saves and writes of the namespace under way store
        # (a graph run cut short by a timeout leaves them running: LangGraph does not wait).
        await self._state.settle(key=where.key)
        now = self._now()
        self._state.failed.pop(where.key)  # a graph run starts here: its saves may come
        if checkpoint_id is None:
            latest = await self._store.read_with_items(where.key, sequence=None, now=now)
            return None if latest is None else await self._tuple(where, *latest, head=True)
        found = await self._read_by_id(where, checkpoint_id, now)
        if found is None or not await self._rebuilds_whole(where, found[0]):
            return None
        return await self._tuple(where, *found)

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        """Checkpoints newest first (in save order) of one namespace, of every namespace of a
        thread (a config without ``checkpoint_ns``), or of every thread (``None``).

        ``filter`` keeps checkpoints whose metadata has all those values (a missing key
        matches ``None``), ``before`` those whose id sorts before its ``checkpoint_id``
        (LangGraph's ids sort by time), ``limit`` counts what is returned. Metadata is read
        from the headers: only matching checkpoints are read whole, one store call each.
        A checkpoint that cannot be read (a damaged record, value or write) is logged and
        skipped, and the listing goes on: the older ones are what a user resumes from then
        (``aget_tuple`` of it still raises ``CorruptCheckpointError``).
        """
        wanted = _filter(filter)
        before_id = None if before is None else _checkpoint_id(before)
        remaining = _limit(limit)
        only_id = None if config is None else _checkpoint_id(config)
        if remaining == 0:
            return
        async for where in self._listed_runs(config):
            async for found in self._listed(where, wanted, before_id, only_id):
                yield found
                remaining = None if remaining is None else remaining - 1
                if remaining == 0:
                    return

    # -- writes ---------------------------------------------------------------------------

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Save ``checkpoint`` with the channel values that changed (``new_versions``) in one
        store call; unchanged values are shared with earlier checkpoints, never rewritten.

        A save that names a parent (``config``'s ``checkpoint_id``) in a thread namespace
        that no longer exists is dropped: a deleted thread is never brought back by a save
        still in flight. Saving an id this process saved already changes nothing.
        """
        where = _where(config)
        checkpoint_id = _new_checkpoint_id(checkpoint)
        saved = _config_of(where, checkpoint_id)
        slot = (where.key, checkpoint_id)
        state = self._state
        while (running := state.saving.get(slot)) is not None:
            await running.wait()  # the same save, running: its outcome, unless it failed
        if self._saved_here(slot):
            return saved
        signal = state.saving[slot] = Signal()
        try:
            with state.under_way(where.key, where.thread_id):
                await self._save(where, config, checkpoint, metadata, new_versions)
        except BaseException:
            # LangGraph makes no save of the thread after one that failed or was cancelled
            # (each waits for the previous): writes parked for later checkpoints would wait
            # for nothing. (A cancelled save may have landed: the writes look it up.)
            state.failed_save(where.key, checkpoint_id)
            raise
        finally:
            del state.saving[slot]
            signal.set()
            # Writes parked for this checkpoint that the save did not take (it failed or was
            # dropped before it got to them) learn it now, not when their wait runs out.
            left = state.parked.pop(slot, None)
            if left is not None:
                left.done.set()
        return saved

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Store a task's writes on the checkpoint ``config`` names, owned by it (they go
        when it goes). A write already stored for the same task and index is kept, except
        special writes (errors, interrupts, resumes), which replace it. Writes to a
        checkpoint that is gone are dropped. An interrupt written in the root namespace
        pauses the thread's run with the interrupts as its approval request.
        """
        where = _where(config)
        checkpoint_id = _required_checkpoint_id(config)
        pending = self._pending_writes(writes, task_id, task_path)
        if not pending:
            return
        with self._state.under_way(where.key, where.thread_id):  # also while it waits
            await self._store_writes(where, checkpoint_id, pending)

    # -- thread operations ----------------------------------------------------------------

    # Each is several store calls (a namespace, a checkpoint at a time): a cancellation of
    # the caller waits for them all (settled), so it never leaves a thread half deleted,
    # half copied or half pruned (a thread that lists but cannot be read, a paused root
    # whose subgraph checkpoint is gone, a copy that is neither there nor paused).

    async def adelete_thread(self, thread_id: str) -> None:
        """Delete every namespace of the thread, with all checkpoints, writes and values."""
        await settled(self._delete_thread(records.checked_thread_id(thread_id)))

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Delete the checkpoints (with their writes) whose metadata ``run_id`` is one of
        ``run_ids``, in every thread and namespace; values other checkpoints use stay. A
        thread then waits for approval exactly when its latest checkpoint left holds
        interrupts that no resume answered and no decision was made about."""
        for run_id in _texts("run_ids", run_ids):
            await settled(self._delete_langgraph_run(run_id))

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copy every namespace of a thread, oldest checkpoint first, with the same
        checkpoint ids, metadata, pending writes and values, into a thread that has none
        (else :class:`ConflictError`). A paused source leaves the copy paused too."""
        source = records.checked_thread_id(source_thread_id)
        target = records.checked_thread_id(target_thread_id)
        await settled(self._copy_thread(source, target))

    async def aprune(
        self, thread_ids: Sequence[str], *, strategy: str = "keep_latest"
    ) -> None:
        """``"keep_latest"``: keep each namespace's newest checkpoint (and the ancestors a
        delta channel rebuilds from); ``"delete"``: delete the threads."""
        strategy = plain_str(strategy) if isinstance(strategy, str) else strategy
        if strategy not in ("keep_latest", "delete"):
            raise ValidationError(
                f"strategy must be 'keep_latest' or 'delete', got {shown(strategy)}")
        for thread_id in _texts("thread_ids", thread_ids):
            thread = records.checked_thread_id(thread_id)
            await settled(self._delete_thread(thread) if strategy == "delete"
                          else self._keep_latest_of(thread))

    async def aget_delta_channel_history(
        self, *, config: RunnableConfig, channels: Sequence[str]
    ) -> Mapping[str, DeltaChannelHistory]:
        """What each of ``channels`` (LangGraph's delta channels, beta) needs to rebuild its
        value at the checkpoint ``config`` names (else the namespace's latest): the writes
        of its ancestors, oldest first, back to the nearest one that stores the channel's
        value, which is the ``seed``. Ancestors follow parent ids, not save order.

        A few store calls however long the chain (LangGraph's default reads every ancestor
        whole): the run's headers, a page of 100 per call, say which ancestors store which
        values; each ancestor holding seeds is read once, with its writes; the writes of the
        others come from one scan of their sequence range, a page of 1,000 writes per call;
        then the headers again, to be sure no ancestor went meanwhile. A chain with headers of
        an older release (they do not say which values they store), a parent saved after its
        child, a target found elsewhere than this process remembers, or an ancestor or seed
        removed meanwhile is walked the default way.
        """
        wanted = _texts("channels", channels)
        if not wanted:
            return {}
        found = await self._delta_history(_where(config), _checkpoint_id(config), wanted)
        if found is None:
            walking = _WALKING_ANCESTORS.set(True)
            try:
                return await super().aget_delta_channel_history(config=config, channels=channels)
            finally:
                _WALKING_ANCESTORS.reset(walking)
        return found

    def get_next_version(self, current: str | None, channel: None) -> str:
        """``"<counter, 32 digits>.<random>"``: increasing, and different on every branch of
        a forked thread (so their channel values never share a stored version)."""
        value = cast(object, current)  # LangGraph's own int versions come here too
        if value is None:
            counter = 0
        elif isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValidationError(f"a channel version must be a str or int, got {shown(value)}")
        elif isinstance(value, str):
            counter = _version_counter(value)
        elif not _COUNTABLE[0] <= value < _COUNTABLE[1]:  # also NaN
            raise ValidationError(f"a channel version must be an integer count, got {shown(value)}")
        else:
            counter = int(value)
        return f"{counter + 1:032}.{random.random():016}"

    # -- blocking methods -------------------------------------------------------------------

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return self._shared.bridge.call(lambda: self.aget_tuple(config), "get_tuple")

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        return self._shared.bridge.call(
            lambda: self.aput(config, checkpoint, metadata, new_versions), "put")

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        self._shared.bridge.call(
            lambda: self.aput_writes(config, writes, task_id, task_path), "put_writes")

    def delete_thread(self, thread_id: str) -> None:
        self._shared.bridge.call(lambda: self.adelete_thread(thread_id), "delete_thread")

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        self._shared.bridge.call(lambda: self.adelete_for_runs(run_ids), "delete_for_runs")

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self._shared.bridge.call(
            lambda: self.acopy_thread(source_thread_id, target_thread_id), "copy_thread")

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        self._shared.bridge.call(lambda: self.aprune(thread_ids, strategy=strategy), "prune")

    def get_delta_channel_history(
        self, *, config: RunnableConfig, channels: Sequence[str]
    ) -> Mapping[str, Any]:
        return self._shared.bridge.call(
            lambda: self.aget_delta_channel_history(config=config, channels=channels),
            "get_delta_channel_history")

    # -- internals: shared state ----------------------------------------------------------------

    @property
    def _store(self) -> _Capable:
        return cast(_Capable, self._shared.store)

    @property
    def _state(self) -> SaverState:
        return self._shared.state

    def _now(self) -> float:
        return self._shared.manager.config.clock()

    # -- internals: serialization -----------------------------------------------------------

    def _dumps(self, value: object, what: str) -> Typed:
        try:
            kind, data = self.serde.dumps_typed(value)
        except Exception as exc:
            raise SerializationError(
                f"LangGraph's serializer cannot serialize {what}: {exc}", path=what) from exc
        if not isinstance(kind, str) or not isinstance(data, (bytes, bytearray, memoryview)):
            raise SerializationError(
                f"the serializer returned {type(kind).__name__}/{type(data).__name__} for "
                f"{what}; expected (str, bytes)", path=what)
        if _is_pickle(kind):
            raise SerializationError(
                f"the serializer pickled {what}; the saver stores no pickles (a store that "
                "someone can write to must not be able to run code on load): register the "
                "type with the serializer instead", path=what)
        return kind, bytes(data)

    def _dumps_value(self, where: _Where, channel: str, value: object) -> Typed:
        """A channel's value serialized, a list's unchanged leading entries not again
        (:mod:`~fastcheckpoint.integrations._langgraph_lists`)."""
        what = f"channel_values[{channel!r}]"
        return self._shared.lists.dumps(
            self.serde, where.key, channel, value,
            lambda entries: self._dumps(entries, what)) or self._dumps(value, what)

    def _loads(self, typed: Typed, where: str) -> Any:
        if _is_pickle(typed[0]):
            raise SerializationError(
                f"refusing to load a pickled value from {where}: pickle can run code")
        try:
            return self.serde.loads_typed(typed)
        except Exception as exc:
            raise SerializationError(
                f"LangGraph's serializer cannot load the {typed[0]!r} value at {where}: "
                f"{exc}") from exc

    def _pending_writes(
        self, writes: Sequence[tuple[str, Any]], task_id: str, task_path: str
    ) -> list[StoredWrite]:
        task = _text("task_id", task_id)
        path = _text("task_path", task_path)
        pending: list[StoredWrite] = []
        given = cast(object, writes)
        if isinstance(given, (str, bytes)) or not isinstance(given, Sequence):
            raise ValidationError(
                f"writes must be a sequence of (channel, value) pairs, got {type(given).__name__}")
        for position, write in enumerate(writes):
            channel, value = _write_pair(write)
            idx = WRITES_IDX_MAP.get(channel, position)
            pending.append(StoredWrite(task, path, channel, idx,
                                       self._dumps(value, f"writes[{position}]")))
        return pending

    # -- internals: reading -------------------------------------------------------------------

    async def _read_by_id(
        self, where: _Where, checkpoint_id: str, now: float
    ) -> tuple[StoredCheckpoint, str, dict[str, bytes]] | None:
        slot = (where.key, checkpoint_id)
        located = self._state.located.get(slot)
        if located is not None:
            found = await self._read_at(where, located, now)
            if found is not None:
                return found
            self._state.located.pop(slot)  # gone, or another life of the run: ask the store
        located = await self._lookup(where, checkpoint_id, now)
        return None if located is None else await self._read_at(where, located, now)

    async def _rebuilds_whole(self, where: _Where, stored: StoredCheckpoint) -> bool:
        """Whether a checkpoint read by id rebuilds its delta channels whole: not one kept
        only for what newer ones rebuild from, whose own channels reach into what was pruned
        (for a checkpoint with delta channels, a headers read per 100 back to where its
        channels reach, and 1 or 2 for an ancestor not among them: a fork's parent, one
        removed; none otherwise). LangGraph's own walk of the ancestors reads such ones too."""
        if _WALKING_ANCESTORS.get():
            return True
        place = stored.key or f"run {where.run_id[:80]!r} sequence {stored.sequence}"
        extra = self._headers_of(where, stored, place)[1]
        reach = (stored.sequence - _lowest(stored.sequence, extra.delta) if extra.delta
                 else self._supersteps_of(where, extra) if extra.delta is None else 0)
        if reach <= 0:
            return True
        below = self._headers(where.key, before=stored.sequence, limit=min(_PAGE, reach))
        # Only the headers below are read: a parent saved after its child is looked up too.
        ahead = _Ahead(self._decoded_headers(where, below),
                       functools.partial(self._supersteps_of, where),
                       functools.partial(self._headers_at, where), from_newest=False)
        return await ahead.rebuilds_whole(stored.sequence, extra)

    async def _headers_at(
        self, where: _Where, checkpoint_id: str, count: int
    ) -> list[tuple[CheckpointHeader, LangGraphHeader]]:
        """The headers from a LangGraph checkpoint's own down, ``count`` at most (a page);
        none when it is not there. One store call where this process knows where it is, else
        two (its index item first)."""
        now = self._now()
        slot = (where.key, checkpoint_id)
        known = self._state.located.get(slot)
        if known is not None:
            found = await self._headers_below(where, known, count, now)
            if found:
                return found
            self._state.located.pop(slot)  # gone, or another life of the run: ask the store
        located = await self._lookup(where, checkpoint_id, now)
        return [] if located is None else await self._headers_below(where, located, count, now)

    async def _headers_below(
        self, where: _Where, located: Located, count: int, now: float
    ) -> list[tuple[CheckpointHeader, LangGraphHeader]]:
        """The headers from ``located`` down, ``count`` at most (a page); none when the
        checkpoint there is not the one ``located`` names."""
        page, _ = await self._store.headers(where.key, before=located.sequence + 1,
                                            limit=max(1, min(_PAGE, count)), now=now)
        expected = _ids.checkpoint_id(where.key, located.incarnation, located.sequence)
        if not page or page[0].checkpoint_id != expected:
            return []
        return [found async for found in self._decoded_headers(where, _each(page))]

    def _supersteps_of(self, where: _Where, extra: LangGraphHeader) -> int:
        """How many ancestors a checkpoint whose header records no ``delta`` rebuilds its
        delta channels from (0 in a thread without delta channels). Metadata LangGraph's
        serde wrote in the clear without the counters is not decoded (the key would be
        there as it is)."""
        if extra.delta is not None:
            return 0
        kind, data = extra.metadata
        if kind in _CLEAR_KINDS and _COUNTERS_KEY not in data:
            return 0
        return _supersteps(self._loads(extra.metadata, f"run {where.run_id[:80]!r}"))

    async def _read_at(
        self, where: _Where, located: Located, now: float
    ) -> tuple[StoredCheckpoint, str, dict[str, bytes]] | None:
        found = await self._store.read_with_items(where.key, sequence=located.sequence, now=now)
        expected = _ids.checkpoint_id(where.key, located.incarnation, located.sequence)
        if found is None or found[0].checkpoint_id != expected:
            return None
        return found

    async def _lookup(self, where: _Where, checkpoint_id: str, now: float) -> Located | None:
        """Where a LangGraph checkpoint lives, from the run's index item (one store call)."""
        key = records.index_key(checkpoint_id)
        found = (await self._store.get_items(where.key, [key], now=now)).get(key)
        if found is None:
            return None
        located = self._shared.items.decode(found, Located, f"run {where.run_id[:80]!r} item {key}")
        self._state.located.put((where.key, checkpoint_id), located)
        self._state.lives.put((where.key, checkpoint_id), located.incarnation)
        return located

    async def _tuple(
        self,
        where: _Where,
        stored: StoredCheckpoint,
        status: str,
        items: dict[str, bytes],
        *,
        head: bool = False,
    ) -> CheckpointTuple:
        """Decode a checkpoint read; ``head``: it is the run's latest (a hint for saves). A
        log part missing is read once more: on a store whose reads are not atomic, another
        process may have merged it away between the listing and the reading of the parts."""
        try:
            found = await self._decode_read(where, stored, items, head)
        except LogGap:
            again = await self._store.read_with_items(
                where.key, sequence=stored.sequence, now=self._now())
            if again is None or again[0].checkpoint_id != stored.checkpoint_id:
                raise
            found = await self._decode_read(where, stored, again[2], head)
        located = _located_of(where, stored)
        self._state.remember(where.key, found.checkpoint["id"], located, head=head)
        if head and not where.checkpoint_ns and status in _QUEUEABLE:
            await self._queue_interrupts(where, found, located,
                                         paused=status == CheckpointStatus.PAUSED.value)
        return found

    async def _queue_interrupts(
        self, where: _Where, found: CheckpointTuple, located: Located, *, paused: bool
    ) -> None:
        """Queue for approval the interrupts of a thread's latest checkpoint that its run does
        not ask about: storing them and pausing the run are two store calls, and a process
        that died between them (or a status change that failed) left the thread out of the
        approval queue. One read of the run, once per checkpoint in this process (while the
        record asks about it); a run that went on meanwhile is left as it is, and so is a
        request of the checkpoint (pending or decided) or one made by hand."""
        interrupts = [(channel, value) for _, channel, value in found.pending_writes or ()
                      if channel == records.INTERRUPT]
        if not interrupts:
            return
        checkpoint_id = found.checkpoint["id"]
        asked = records.approval_request(checkpoint_id, interrupts)
        if records.asks_about(self._state.queued.get((where.key, checkpoint_id)), asked):
            return
        await self._pause(where, checkpoint_id, interrupts, life=located.incarnation,
                          at=located, paused=paused)

    async def _decode_read(
        self, where: _Where, stored: StoredCheckpoint, items: dict[str, bytes], head: bool
    ) -> CheckpointTuple:
        size = len(stored.payload) + sum(map(len, items.values()))
        if size >= self._shared.manager.config.offload_min_bytes:
            return await in_worker_thread(self._decoded, where, stored, items, head)
        return self._decoded(where, stored, items, head)

    def _decoded(
        self, where: _Where, stored: StoredCheckpoint, items: dict[str, bytes], head: bool
    ) -> CheckpointTuple:
        place = stored.key or f"run {where.run_id[:80]!r} sequence {stored.sequence}"
        _, extra = self._headers_of(where, stored, place)
        life = _located_of(where, stored).incarnation
        self._state.logs.put((where.key, extra.checkpoint_id), (life, extra.logs or {}))
        if extra.delta is not None:  # a save continuing from it need not read its header
            self._state.floors.put((where.key, extra.checkpoint_id),
                                   (life, stored.sequence, extra.delta))
        checkpoint = self._bare_checkpoint(stored, place)
        values: dict[str, Any] = {}
        for channel, version in checkpoint["channel_versions"].items():
            typed = self._value_of(where, extra, channel, version, items, place,
                                   keep=life if head else None)
            if typed is not None:
                values[channel] = self._loads(typed, place)
        checkpoint["channel_values"] = values
        return CheckpointTuple(
            config=_config_of(where, extra.checkpoint_id),
            checkpoint=cast(Checkpoint, checkpoint),
            metadata=self._loads(extra.metadata, place),
            parent_config=(None if extra.parent_checkpoint_id is None
                           else _config_of(where, extra.parent_checkpoint_id)),
            pending_writes=self._writes_of(stored.sequence, items, place),
        )

    def _headers_of(
        self, where: _Where, stored: CheckpointHeader, place: str
    ) -> tuple[Header, LangGraphHeader]:
        header = self._shared.codec.decode_header(stored.header, place)
        if header.run_id != where.run_id:
            raise CorruptCheckpointError(
                f"the record found here belongs to run {header.run_id[:80]!r}", key=place)
        return header, records.decode_header(header.extra, place)

    def _value_of(
        self,
        where: _Where,
        extra: LangGraphHeader,
        channel: str,
        version: object,
        items: Mapping[str, bytes],
        place: str,
        *,
        keep: str | None,
    ) -> Typed | None:
        """The stored value of ``channel`` at ``version`` as the serde wrote it (from its log
        or its blob); ``None`` if the checkpoint stores none. ``keep``: the incarnation of the
        run's latest, read here: its logged values may be extended by the next save."""
        log = None if extra.logs is None else extra.logs.get(channel)
        if log is not None and log.version == version:
            return self._shared.logs.read(where.key, channel, log, items, place, keep=keep)
        blob = items.get(records.blob_key(channel, version))
        return None if blob is None else self._shared.items.typed(blob, place)

    def _known_logs(
        self,
        where: _Where,
        checkpoint: Checkpoint,
        new_versions: ChannelVersions,
        parent_id: str | None,
    ) -> _Logs | None:
        """The logs among the parent's values this save keeps unchanged, with the life of the
        run they belong to, when known without a read (``None``: :meth:`_read_logs`). Known
        when this process saved or read the parent (LangGraph reads what it continues from),
        or when the save changes every value."""
        if parent_id is None:
            return _NO_LOGS
        known = self._state.logs.get((where.key, parent_id))
        if known is not None:
            return known
        values = checkpoint.get("channel_values")
        changed = new_versions if isinstance(new_versions, Mapping) else {}
        if not isinstance(values, Mapping) or all(name in changed for name in values):
            return _NO_LOGS
        return None

    async def _read_logs(self, where: _Where, parent_id: str, now: float) -> _Logs | None:
        """:meth:`_known_logs` read from the parent's header (also with logs off here:
        another process may have written them); ``None`` when the parent is gone: the save
        then sends every value."""
        found = await self._read_header(where, parent_id, now)
        if found is None:
            return None
        located, header = found
        place = f"run {where.run_id[:80]!r} sequence {located.sequence} (header)"
        logs = (located.incarnation, self._headers_of(where, header, place)[1].logs or {})
        self._state.logs.put((where.key, parent_id), logs)
        return logs

    async def _read_header(
        self, where: _Where, checkpoint_id: str, now: float
    ) -> tuple[Located, CheckpointHeader] | None:
        """A checkpoint's header, found by its id (1 or 2 store calls); ``None`` if gone."""
        located = self._state.located.get((where.key, checkpoint_id))
        if located is None:
            located = await self._lookup(where, checkpoint_id, now)
        if located is None:
            return None
        page, _ = await self._store.headers(where.key, before=located.sequence + 1, limit=1,
                                            now=now)
        expected = _ids.checkpoint_id(where.key, located.incarnation, located.sequence)
        if not page or page[0].checkpoint_id != expected:
            return None
        return located, page[0]

    def _writes_of(
        self, sequence: int, items: dict[str, bytes], place: str
    ) -> list[PendingWrite]:
        return [(write.task_id, write.channel, self._loads(write.value, place))
                for write in self._stored_writes(sequence, items, place)]

    def _stored_writes(
        self, sequence: int, items: dict[str, bytes], place: str
    ) -> list[StoredWrite]:
        """The writes among a checkpoint's items, in the order LangGraph applies them."""
        prefix = records.writes_prefix(sequence)
        writes = [self._shared.items.decode(value, StoredWrite, place)
                  for key, value in items.items() if key.startswith(prefix)]
        writes.sort(key=lambda write: writes_sort_key(write.task_path, write.task_id, write.idx))
        return writes

    # -- internals: listing --------------------------------------------------------------------

    async def _listed_runs(self, config: RunnableConfig | None) -> AsyncIterator[_Where]:
        """The namespaces a listing covers, as runs: one, a thread's, or every thread's."""
        if config is None:
            async for record in self._labelled(LANGGRAPH_LABEL):
                where = _where_of_run(record.run_id)
                if where is not None:
                    yield where
            return
        where = _where(config)
        if _names_namespace(config):
            yield where
            return
        async for record in self._thread_runs(where.thread_id):
            found = _where_of_run(record.run_id)
            if found is not None:
                yield found

    async def _listed(
        self,
        where: _Where,
        wanted: dict[str, Any],
        before_id: str | None,
        only_id: str | None,
    ) -> AsyncIterator[CheckpointTuple]:
        # From ``before``'s own header when this process knows where it is: a parent saved
        # after its child may lie above.
        ahead = _Ahead(self._decoded_headers(where, self._headers_from(where, before_id)),
                       functools.partial(self._supersteps_of, where),
                       functools.partial(self._headers_at, where),
                       from_newest=before_id is None)
        while (listed := await ahead.next()) is not None:
            stored, extra = listed
            place = f"run {where.run_id[:80]!r} sequence {stored.sequence} (header)"
            if (before_id is not None and extra.checkpoint_id >= before_id) or (
                only_id is not None and extra.checkpoint_id != only_id
            ):
                continue
            if wanted and not _matches(self._loads(extra.metadata, place), wanted):
                continue
            if not await ahead.rebuilds_whole(stored.sequence, extra):
                continue  # kept only for what newer checkpoints rebuild from: it reads short
            found = await self._listed_tuple(where, stored, extra)
            if found is not None:
                yield found

    async def _listed_tuple(
        self, where: _Where, stored: CheckpointHeader, extra: LangGraphHeader
    ) -> CheckpointTuple | None:
        """A listed checkpoint read whole; ``None`` when it was pruned since its header was
        read, or is damaged (its payload, a value or write it holds): logged, as one
        checkpoint (a value several share: each of them) must not hide the others from
        ``aget_state_history``, which a user reads precisely then. Only this read is
        guarded: an error of the header pages read ahead would end them, and with them the
        listing, as if the run's checkpoints ended there."""
        try:
            found = await self._store.read_with_items(
                where.key, sequence=stored.sequence, now=self._now())
            return None if found is None else await self._tuple(where, *found)
        except CorruptCheckpointError as exc:
            _skipped(where, stored, exc, extra.checkpoint_id)
            return None

    async def _decoded_headers(
        self, where: _Where, headers: AsyncIterator[CheckpointHeader]
    ) -> AsyncIterator[tuple[CheckpointHeader, LangGraphHeader]]:
        async for stored in headers:
            place = f"run {where.run_id[:80]!r} sequence {stored.sequence} (header)"
            try:
                _, extra = self._headers_of(where, stored, place)
            except CorruptCheckpointError as exc:
                _skipped(where, stored, exc)
                continue
            yield stored, extra

    async def _headers_from(
        self, where: _Where, before_id: str | None
    ) -> AsyncIterator[CheckpointHeader]:
        """The run's headers from ``before_id``'s own, when this process knows where it is
        and it is still there (else all): the older ones are those before it. Known from
        another life of the run (deleted and started again or copied into since), its
        sequence says nothing."""
        located = None if before_id is None else self._state.located.get((where.key, before_id))
        if located is not None:
            expected = _ids.checkpoint_id(where.key, located.incarnation, located.sequence)
            confirmed = False
            async for stored in self._headers(where.key, before=located.sequence + 1):
                if not confirmed and stored.checkpoint_id != expected:
                    break
                confirmed = True
                yield stored
            if confirmed:
                return
        async for stored in self._headers(where.key):
            yield stored

    async def _headers(
        self, key: str, *, before: int | None = None, limit: int = _PAGE
    ) -> AsyncIterator[CheckpointHeader]:
        """The run's live checkpoint headers, newest first, a page per store call (the first
        of ``limit``)."""
        cursor = before
        while True:
            page, _ = await self._store.headers(key, before=cursor, limit=limit, now=self._now())
            for header in page:
                yield header
            if len(page) < limit:
                return
            cursor, limit = page[-1].sequence, _PAGE

    async def _labelled(self, label: str) -> AsyncIterator[RunRecord]:
        cursor: str | None = None
        while True:
            page, cursor = await self._store.runs_with_label(
                label, limit=_PAGE, cursor=cursor, now=self._now())
            for record in page:
                yield record
            if cursor is None:
                return

    async def _thread_runs(self, thread_id: str) -> AsyncIterator[RunRecord]:
        """The runs of every namespace of the thread."""
        async for record in self._labelled(records.thread_label(thread_id)):
            where = _where_of_run(record.run_id)
            if where is not None and where.thread_id == thread_id:
                yield record

    # -- internals: saving ---------------------------------------------------------------------

    async def _save(
        self,
        where: _Where,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> None:
        now = self._now()
        parent_id = _checkpoint_id(config)
        full = get_checkpoint_metadata(config, _metadata(metadata))
        taken = self._take(where, checkpoint, full, new_versions)
        inherited = self._known_logs(where, checkpoint, new_versions, parent_id)
        if inherited is None and parent_id is not None:
            # The parent's header is read first, and if the parent is gone every value is
            # sent: serialized now, before that read, as the changed ones were.
            every = self._take(where, checkpoint, full, _every_version(checkpoint), taken)
            inherited = await self._read_logs(where, parent_id, now)
            if inherited is None:  # which unchanged values are logs is unknown: send all
                taken = every
        encoded = await self._encode(where, taken, parent_id, inherited or _NO_LOGS)
        langgraph_run = full.get("run_id")
        indexed = isinstance(langgraph_run, str) and bool(langgraph_run)
        if indexed:
            await self._register(where, cast(str, langgraph_run), now)

        async def with_every_value() -> _Encoded:
            # A value this save named is gone: every value is sent, logs begin anew.
            self._shared.logs.forget(where.key)
            every = self._take(where, checkpoint, full, _every_version(checkpoint), taken)
            return await self._encode(where, every, parent_id, _NO_LOGS)

        needs = (None if self._shared.keep_latest is None
                 else _delta_needs(full, taken, checkpoint))
        async with self._state.turn(where.key):
            await self._append(where, encoded, parent_id, now, with_every_value,
                               root_id=_root_checkpoint_id(full), needs=needs)
        if indexed:
            await self._registered_in_life(where, cast(str, langgraph_run), now)

    def _take(
        self,
        where: _Where,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
        taken: _Taken | None = None,
    ) -> _Taken:
        """What the save stores of LangGraph's objects, serialized now, on the caller's
        thread, as the save begins (``taken``: what it serialized already).

        With durability="async" the next step's nodes run while the save is written: they
        must change nothing it stores, and what may run in a worker thread (:meth:`_encode`)
        handles bytes and strings only (the serde's C encoder crashes the process when a
        container it reads, a list inside a channel's dict say, changes under it)."""
        values = _mapping("checkpoint['channel_values']", checkpoint.get("channel_values"))
        done = {} if taken is None else taken.changed
        snapshots = [(channel, version, _snapshot(values[channel]))  # all, then serialized
                     for channel, version in _versions(new_versions).items()
                     if channel in values and channel not in done]
        changed = {**done, **{channel: (version, self._dumps_value(where, channel, value))
                              for channel, version, value in snapshots}}
        if taken is not None:
            return taken._replace(changed=changed)
        versions = _every_version(checkpoint)
        return _Taken(
            checkpoint_id=checkpoint["id"], versions=versions, changed=changed,
            bare=self._dumps({name: part for name, part in checkpoint.items()
                              if name != "channel_values"}, "checkpoint"),
            metadata=self._dumps(metadata, "metadata"), step_name=_step_name(metadata),
            # A channel without a value (empty at this checkpoint, or a delta channel between
            # its snapshots) has no blob to name: stores refuse refs to items they do not hold.
            stored=tuple(channel for channel in versions if channel in values))

    async def _encode(
        self, where: _Where, taken: _Taken, parent_id: str | None, inherited: _Logs
    ) -> _Encoded:
        """The save's records: in a worker thread when the run's saves are large."""
        hint = self._state.runs.get(where.key)
        encode = self._encoder(where, taken, parent_id, inherited)
        if hint is not None and hint.payload_size >= self._shared.manager.config.offload_min_bytes:
            return await in_worker_thread(encode)
        return encode()

    def _encoder(
        self, where: _Where, taken: _Taken, parent_id: str | None, inherited: _Logs
    ) -> Callable[[], _Encoded]:
        versions, stored = taken.versions, taken.stored

        def encode() -> _Encoded:
            blobs: list[Item] = []
            planned: list[Planned] = []
            written: dict[str, str] = {}  # channel -> its blob's key, when it is versions'
            for channel, (version, typed) in taken.changed.items():
                plan = self._shared.logs.plan(where.key, channel, version, typed)
                if plan is None:
                    key = records.blob_key(channel, version)
                    if versions.get(channel) is version:
                        written[channel] = key
                    blobs.append(Item(key=key, value=self._shared.items.encode(typed)))
                    continue
                planned.append(plan)
                if plan.write is not None:
                    blobs.append(Item(key=plan.write.key, value=plan.write.value))
            # The ids are there for people (``fastcheckpoint show``); the saver reads the rest.
            payload = self._shared.codec.encode_flat(
                {"checkpoint": list(taken.bare),
                 "checkpoint_id": taken.checkpoint_id, "checkpoint_ns": where.checkpoint_ns})
            # Logged values: the new ones, and the unchanged ones the parent recorded.
            logs = {channel: log for channel, log in inherited[1].items()
                    if channel in stored and versions[channel] == log.version}
            lives = {inherited[0]} if logs else set()
            lives.update(plan.extends for plan in planned if plan.extends is not None)
            logs.update((plan.channel, plan.log) for plan in planned)
            extra = LangGraphHeader(
                checkpoint_id=taken.checkpoint_id, parent_checkpoint_id=parent_id,
                thread_id=where.thread_id, checkpoint_ns=where.checkpoint_ns,
                metadata=taken.metadata, values=stored, logs=logs or None)
            return _Encoded(
                checkpoint_id=taken.checkpoint_id, payload=payload, extra=extra,
                step_name=taken.step_name, blobs=blobs,
                refs=tuple(dict.fromkeys(
                    logs[channel].anchor if channel in logs
                    else written.get(channel) or records.blob_key(channel, versions[channel])
                    for channel in stored)),
                # What was serialized (a logged value whole): large saves encode off the loop.
                size=len(payload) + sum(len(blob.value) for blob in blobs) + sum(
                    len(plan.entries) for plan in planned),
                planned=planned,
                log_life=None if not lives else lives.pop() if len(lives) == 1 else _MIXED,
            )

        return encode

    async def _register(self, where: _Where, langgraph_run: str, now: float) -> None:
        """Index the run under the LangGraph run id, for ``delete_for_runs`` (once per
        process, LangGraph run and namespace; again before an expiring entry runs out)."""
        slot = (langgraph_run, where.key)
        known = self._state.registered.get(slot)
        if known is not None and now < known[0]:
            return
        hint = self._state.runs.get(where.key)
        await self._write_registry_entry(where, langgraph_run, now,
                                         None if hint is None else hint.incarnation)

    async def _registered_in_life(self, where: _Where, langgraph_run: str, now: float) -> None:
        """Index the run again when the save landed in another life of it than the one its
        entry was written for: ``delete_for_runs`` removed the entry with the run's last
        checkpoints meanwhile (in another process), and a later one must find this save."""
        hint = self._state.runs.get(where.key)
        known = self._state.registered.get((langgraph_run, where.key))
        if hint is None or known is None or known[1] == hint.incarnation:
            return
        if known[1] is None:  # written before the run's first save here: for this life
            self._state.registered.put((langgraph_run, where.key), (known[0], hint.incarnation))
            return
        await self._write_registry_entry(where, langgraph_run, now, hint.incarnation)

    async def _write_registry_entry(
        self, where: _Where, langgraph_run: str, now: float, life: str | None
    ) -> None:
        ttl = self._shared.ttl_seconds
        entry = Item(
            key=records.registry_key(langgraph_run, where.key),
            value=self._shared.items.encode(RegistryEntry(where.run_id)),
            # An entry outlives every checkpoint saved while it is known (refreshed after ttl).
            expires_at=None if ttl is None else now + 2 * ttl,
        )
        await self._store.put_items(_REGISTRY_KEY, [entry], now=now)
        self._state.registered.put((langgraph_run, where.key),
                                   (math.inf if ttl is None else now + ttl, life))

    async def _append(
        self,
        where: _Where,
        encoded: _Encoded,
        parent_id: str | None,
        now: float,
        with_every_value: Callable[[], Awaitable[_Encoded]],
        *,
        root_id: str | None = None,
        needs: frozenset[str] | None = None,
    ) -> None:
        """Append at the run's next sequence as this process knows it; on a conflict the
        store names the head and the next attempt proposes what follows it. A store that
        finds a shared value this save names (and did not send, as unchanged) removed
        meanwhile refuses it; the save is then sent once more with every value. ``needs``:
        the delta channels the checkpoint rebuilds from ancestors (``None``: it shows no
        delta channel)."""
        state = self._state
        guess = await self._head(where, parent_id, now)
        if guess is _NO_RUN:
            self._dropped(where, encoded.checkpoint_id)
            return
        delta = None
        if self._shared.keep_latest is not None and (
                needs is not None or state.windows.get(where.key) is not None):
            delta = await self._delta_floors(where, guess, parent_id, needs or frozenset(), now)
        slot = (where.key, encoded.checkpoint_id)
        parked = state.parked.pop(slot, None)
        expires_at = None if self._shared.ttl_seconds is None else now + self._shared.ttl_seconds
        settings = self._shared.manager.config
        contention: RetryPolicy | None = None
        resent = False
        try:
            for attempt in range(settings.max_sequence_retries):
                sequence, incarnation = ((0, _ids.new_incarnation()) if guess is None
                                         else (guess[0] + 1, guess[1]))
                if guess is not None and parent_id is not None and not await self._in_life(
                        where, parent_id, incarnation, now):
                    self._dropped(where, encoded.checkpoint_id)
                    return
                if guess is None and await self._root_gone(
                        where, root_id, ended=attempt > 0, now=now):
                    self._dropped(where, encoded.checkpoint_id)
                    return
                if encoded.log_life is not None and encoded.log_life != incarnation:
                    # Its logs are of another life of the run (deleted or expired since):
                    # a store may not tell that their anchors are gone. Write them anew.
                    encoded = await with_every_value()
                if delta is not None and encoded.extra.delta is None:
                    encoded = encoded._replace(
                        extra=msgspec.structs.replace(encoded.extra, delta=delta))
                located = Located(incarnation, sequence, expires_at)
                record, items = self._record(where, encoded, parent_id, located, parked, now)
                try:
                    await settled(self._commit(where, encoded, record, items, located, parked,
                                               now), instant=self._shared.instant)
                except SharedItemGone:
                    if resent:
                        raise
                    encoded, resent = await with_every_value(), True
                    continue
                except SequenceConflict as conflict:
                    guess = _conflict_head(conflict)
                    if guess is None and parent_id is not None:
                        self._dropped(where, encoded.checkpoint_id)
                        return
                    if attempt >= _FREE_RETRIES:
                        if contention is None:
                            contention = RetryPolicy(
                                base_delay=min(_CONTENTION_BASE, settings.retry.max_delay),
                                max_delay=settings.retry.max_delay)
                        await anyio.sleep(contention.delay(attempt - _FREE_RETRIES))
                    continue
                return
        finally:
            if parked is not None:
                parked.done.set()
        raise ConflictError(
            f"could not save to thread {where.thread_id[:80]!r}: lost the sequence race "
            f"{settings.max_sequence_retries} times in a row")

    async def _commit(
        self,
        where: _Where,
        encoded: _Encoded,
        record: StoredCheckpoint,
        items: list[Item],
        located: Located,
        parked: Parked | None,
        now: float,
    ) -> None:
        """The append and what follows it once it landed (what this process remembers, the
        log parts it merged away, the thread's status: PAUSED for an interrupt among the
        writes parked for it, ACTIVE again after one), all of it whatever cancels the caller
        once it is under way (:meth:`_append` calls it through ``settled``)."""
        status = await self._store.append_with_items(
            where.key, record, run=self._seed(where, located, now),
            keep_latest=self._kept(where, located, encoded.extra.delta), now=now, items=items)
        self._saved(where, encoded, located)
        await self._discard_merged(where, encoded)
        if parked is not None:
            parked.stored = True
            await self._pause_for(where, encoded.checkpoint_id, located,
                                  parked.writes.values())
        if status in _REACTIVATED and not where.checkpoint_ns:
            await self._reactivate(where, status, encoded.checkpoint_id, located)

    # A delta channel rebuilds from the writes of ancestors back to its snapshot: under
    # keep_latest each save records how far back its channels reach (``delta`` in its header),
    # and keeps what the newest checkpoints name. The floors come from the parent's (memo,
    # else its header) and the window of newest ones from this process's saves, else from one
    # read of the newest headers.

    async def _delta_floors(
        self, where: _Where, guess: Any, parent_id: str | None, needs: frozenset[str],
        now: float,
    ) -> dict[str, int]:
        """The checkpoint's ``delta``: per channel it rebuilds from ancestors, the lowest
        sequence read (the parent's floor, else the parent itself); learns the window of
        newest checkpoints first when this process does not know it."""
        if guess is None:
            return {}  # the run's first checkpoint: no ancestors
        life = guess[1]
        await self._learn_window(where, guess, now)
        if not needs or parent_id is None:
            return {}
        known = self._state.floors.get((where.key, parent_id))
        if known is None or known[0] != life:
            known = await self._read_floors(where, parent_id, now)
        if known is None or known[0] != life:
            return {}  # the parent is gone: the rebuild ends there whatever is kept
        _, sequence, floors = known
        if floors is None:  # an older release's header, or no delta channel: keep them all
            return dict.fromkeys(needs, 0)
        return {channel: floors.get(channel, sequence) for channel in needs}

    async def _learn_window(self, where: _Where, guess: tuple[int, str], now: float) -> None:
        """Read the lowest sequence each of the newest ``keep_latest - 1`` checkpoints needs
        (a store call per 100), unless this process knows it."""
        newest, life = guess
        keep = cast(int, self._shared.keep_latest)
        start = max(0, newest + 2 - keep)
        window = self._state.windows.get(where.key)
        if window is not None and window.covers(life, start, newest):
            return
        learned = Window(life, known_from=start, newest=newest)
        if start > newest:  # keep_latest=1: the save keeps no older one of its own accord
            self._state.windows.put(where.key, learned)
            return
        learned.newest = -1
        before: int | None = None
        while True:
            limit = min(_PAGE, max(1, (newest if before is None else before - 1) - start + 1))
            page, _ = await self._store.headers(where.key, before=before, limit=limit, now=now)
            for stored in page:
                if learned.newest < 0:
                    learned.newest = stored.sequence
                if stored.sequence >= start:
                    learned.lowest[stored.sequence] = self._lowest_of(where, stored, life)
            if len(page) < limit or not page or page[-1].sequence <= start:
                break
            before = page[-1].sequence
        self._state.windows.put(where.key, learned)

    def _lowest_of(self, where: _Where, stored: CheckpointHeader, life: str) -> int:
        """The lowest sequence a checkpoint's delta channels rebuild from (0: unknown)."""
        place = f"run {where.run_id[:80]!r} sequence {stored.sequence} (header)"
        try:
            extra = self._headers_of(where, stored, place)[1]
        except CorruptCheckpointError:
            return 0
        self._state.floors.put((where.key, extra.checkpoint_id),
                               (life, stored.sequence, extra.delta))
        if extra.delta is None:
            return 0
        return _lowest(stored.sequence, extra.delta)

    async def _read_floors(
        self, where: _Where, checkpoint_id: str, now: float
    ) -> tuple[str, int, dict[str, int] | None] | None:
        """A checkpoint's ``delta`` from its header; ``None`` if gone."""
        found = await self._read_header(where, checkpoint_id, now)
        if found is None:
            return None
        located, header = found
        self._lowest_of(where, header, located.incarnation)
        return self._state.floors.get((where.key, checkpoint_id))

    def _kept(self, where: _Where, located: Located, delta: dict[str, int] | None) -> int | None:
        """How many checkpoints the save keeps: ``keep_latest``, and with delta channels as
        many more as the oldest thing the newest ``keep_latest`` need (``None``, all, when
        what some of them need is unknown here)."""
        keep = self._shared.keep_latest
        if keep is None or delta is None:
            return keep
        sequence = located.sequence
        lowest = _lowest(sequence, delta)
        if sequence > 0:
            window = self._state.windows.get(where.key)
            start = max(0, sequence + 1 - keep)
            if window is None or not window.covers(located.incarnation, start, sequence - 1):
                return None  # others saved meanwhile: what they need is unknown here
            older = window.lowest_from(start)
            lowest = lowest if older is None else min(lowest, older)
        return max(keep, sequence - lowest + 1)

    async def _in_life(
        self, where: _Where, parent_id: str, incarnation: str, now: float
    ) -> bool:
        """Whether a save's parent may be in life ``incarnation`` of the run: not when this
        process saw it in another life (the thread was deleted, and started again or copied
        into since), unless the store finds it in this one (a copy keeps LangGraph's ids).
        A save continuing an earlier life must not mix its state into the new one. Costs a
        store call only then."""
        life = self._state.lives.get((where.key, parent_id))
        if life is None or life == incarnation:
            return True
        found = await self._lookup(where, parent_id, now)
        return found is not None and found.incarnation == incarnation

    async def _root_gone(
        self, where: _Where, root_id: str | None, *, ended: bool, now: float
    ) -> bool:
        """Whether a save that would start a subgraph namespace belongs to a thread deleted
        meanwhile (a graph run that outlives the delete starts its subgraphs' namespaces
        afresh), from the root checkpoint it runs under (``root_id``, from its metadata):
        that checkpoint's save was dropped here, or (``ended``: the namespace's life this
        process knew is gone) the root's life it was saved in is over (one store call).
        A root checkpoint this process has not saved is a new graph run's (with
        ``durability="exit"`` the root saves after its subgraphs)."""
        if not where.checkpoint_ns or root_id is None:
            return False
        root = _where_from(where.thread_id, "")
        # Its save may be on its way here (durability="async" does not wait for it).
        while (saving := self._state.saving_in(root.key)) is not None:
            await saving.wait()
        life = self._state.lives.get((root.key, root_id))
        if life == _NO_LIFE:
            return True
        if life is None or not ended:
            return False
        record = await self._store.get_run(root.key, now=now)
        return record is None or record.incarnation != life

    async def _head(self, where: _Where, parent_id: str | None, now: float) -> Any:
        """The run's ``(latest sequence, incarnation)`` as this process knows it, read when a
        save names a parent and the run is unknown here; ``None`` for no run yet, and
        :data:`_NO_RUN` when a save names a parent in a run that does not exist (it must not
        create one)."""
        hint = self._state.runs.get(where.key)
        if hint is not None:
            return hint.latest_sequence, hint.incarnation
        if parent_id is None:
            return None
        record = await self._store.get_run(where.key, now=now)
        if record is None:
            return _NO_RUN
        return record.latest_sequence, record.incarnation

    def _record(
        self,
        where: _Where,
        encoded: _Encoded,
        parent_id: str | None,
        located: Located,
        parked: Parked | None,
        now: float,
    ) -> tuple[StoredCheckpoint, list[Item]]:
        parent = None if parent_id is None else self._state.located.get((where.key, parent_id))
        parent_ck = (_ids.checkpoint_id(where.key, parent.incarnation, parent.sequence)
                     if parent is not None and parent.incarnation == located.incarnation
                     else None)
        header = Header(where.run_id, encoded.step_name, parent_ck, [],
                        self._shared.ttl_seconds, extra=records.encode_header(encoded.extra))
        record = StoredCheckpoint(
            sequence=located.sequence,
            checkpoint_id=_ids.checkpoint_id(where.key, located.incarnation, located.sequence),
            created_at=now, expires_at=located.expires_at,
            header=self._shared.codec.encode_header(header), payload=encoded.payload,
            refs=encoded.refs)
        owned = [Item(key=records.index_key(encoded.checkpoint_id),
                      value=self._shared.items.encode(located), owner=located.sequence,
                      expires_at=located.expires_at)]
        if parked is not None:
            owned += self._write_items(located, list(parked.writes.values()))
        return record, [*encoded.blobs, *owned]

    def _seed(self, where: _Where, located: Located, now: float) -> RunRecord:
        data, labels = self._seed_parts(where)
        return RunRecord(
            run_id=where.run_id, incarnation=located.incarnation,
            status=CheckpointStatus.ACTIVE.value, created_at=now, updated_at=now,
            latest_sequence=located.sequence, checkpoint_count=1,
            expires_at=located.expires_at, data=data, labels=labels)

    def _seed_parts(self, where: _Where) -> tuple[bytes, tuple[str, ...]]:
        """A new run's details and labels (the same for every save of a namespace)."""
        seeds = self._state.seeds
        found = seeds.get(where.key)
        if found is not None and found[0] == where.run_id:
            return found[1], found[2]
        details = RunData(metadata={"framework": "langgraph", "thread_id": where.thread_id,
                                    "checkpoint_ns": where.checkpoint_ns})
        data = self._shared.codec.encode_run_data(details)
        labels = (LANGGRAPH_LABEL, records.thread_label(where.thread_id))
        seeds.put(where.key, (where.run_id, data, labels))
        return data, labels

    def _saved_here(self, slot: tuple[str, str]) -> bool:
        """Whether this process saved or read the checkpoint in the run's current life."""
        located = self._state.located.get(slot)
        hint = self._state.runs.get(slot[0])
        return located is not None and hint is not None and (
            located.incarnation == hint.incarnation)

    def _saved(self, where: _Where, encoded: _Encoded, located: Located) -> None:
        state = self._state
        state.deleted.pop(where.key)
        state.failed.pop(where.key)
        state.remember(where.key, encoded.checkpoint_id, located, head=True,
                       payload_size=encoded.size)
        state.logs.put((where.key, encoded.checkpoint_id),
                       (located.incarnation, encoded.extra.logs or {}))
        delta = encoded.extra.delta
        if delta is not None:
            state.floors.put((where.key, encoded.checkpoint_id),
                             (located.incarnation, located.sequence, delta))
            window = state.windows.get(where.key)
            if window is None or window.incarnation != located.incarnation:
                window = Window(located.incarnation, known_from=located.sequence)
                state.windows.put(where.key, window)
            window.add(located.sequence, _lowest(located.sequence, delta),
                       cast(int, self._shared.keep_latest))
        for plan in encoded.planned:
            self._shared.logs.remember(where.key, plan, located.incarnation)

    async def _discard_merged(self, where: _Where, encoded: _Encoded) -> None:
        """Remove the log parts an acknowledged save merged into its own (loads that still
        look for them read the merged part). The save is stored already, so this never makes
        it fail: it runs under :meth:`_commit`'s ``settled``, whatever cancels the caller, for
        at most :data:`~fastcheckpoint._manager._DISCARD_SECONDS`, and the parts stay
        recorded for the log's next merge until the removal succeeded (a failure, a removal
        given up or a process that died here costs only space)."""
        merging = [plan for plan in encoded.planned if plan.write and plan.write.discard]
        if not merging:
            return
        # :meth:`_saved` recorded them already (``ChannelLogs.remember``), as the manager's
        # histories do: whatever cuts the removal short leaves them to the log's next merge.
        discard = [key for plan in merging if plan.write for key in plan.write.discard]
        if not await self._removed(where, discard):
            return
        for plan in merging:
            self._shared.logs.discarded(where.key, plan)

    async def _removed(self, where: _Where, discard: list[str]) -> bool:
        with anyio.move_on_after(_DISCARD_SECONDS):
            try:
                await self._store.delete_items(where.key, discard)
            except CheckpointError as exc:
                logger.warning("could not remove %d merged log parts of thread %r (%s); the "
                               "log's next merge tries again", len(discard),
                               where.thread_id[:80], exc)
                return False
            return True
        logger.warning("removing %d merged log parts of thread %r took over %ss; the log's "
                       "next merge tries again", len(discard), where.thread_id[:80],
                       _DISCARD_SECONDS)
        return False

    def _dropped(self, where: _Where, checkpoint_id: str) -> None:
        self._state.forget_run(where.key)
        # In no life of the run: the saves LangGraph makes after it are dropped too.
        self._state.lives.put((where.key, checkpoint_id), _NO_LIFE)
        self._shared.logs.forget(where.key)
        logger.info("checkpoint %s of thread %r was not saved: its thread namespace no longer "
                    "exists, or holds another life of it (deleted while the save was on its "
                    "way)", checkpoint_id, where.thread_id[:80])

    # -- internals: pending writes -------------------------------------------------------------

    async def _store_writes(
        self, where: _Where, checkpoint_id: str, writes: list[StoredWrite]
    ) -> bool:
        """Store ``writes`` on their checkpoint; ``False`` if it is gone (or never came)."""
        state = self._state
        slot = (where.key, checkpoint_id)
        asked = False
        while True:
            saving = state.saving.get(slot)
            if saving is not None:
                await saving.wait()
            located = state.located.get(slot)
            if located is not None or asked or state.runs.get(where.key) is not None:
                break
            located, asked = await self._lookup(where, checkpoint_id, self._now()), True
            if located is not None:
                break
            # The lookup awaited the store: the checkpoint's save may have started (and
            # taken what was parked for it) or ended meanwhile, so look again before parking.
        # No await from the checks above to parking: a save that starts later takes the writes.
        released = False
        if located is None and self._may_still_come(where.key, checkpoint_id):
            if await self._park(where, slot, writes, asked=asked):
                return True
            located, released = state.located.get(slot), True
        if located is None and (released or not asked):
            # Parked writes released unstored: their checkpoint's save failed, was cancelled
            # (it may have landed all the same) or never came. The store tells.
            located = await self._lookup(where, checkpoint_id, self._now())
        if located is None:
            logger.info("pending writes for checkpoint %s of thread %r were dropped: that "
                        "checkpoint does not exist (deleted, pruned or expired)",
                        checkpoint_id, where.thread_id[:80])
            return False
        return await self._put_owned(where, checkpoint_id, located, writes)

    def _may_still_come(self, key: str, checkpoint_id: str) -> bool:
        """Whether this process may still save the checkpoint: newer than any it has seen
        in the run (LangGraph's ids sort by time), or the run's first, in a run it did not
        delete."""
        failed = self._state.failed.get(key)
        if failed is not None and checkpoint_id >= failed:
            return False
        hint = self._state.runs.get(key)
        if hint is None:
            return self._state.deleted.get(key) is None
        return hint.newest_id is not None and checkpoint_id > hint.newest_id

    async def _park(
        self, where: _Where, slot: tuple[str, str], writes: list[StoredWrite], *, asked: bool
    ) -> bool:
        """Hand ``writes`` to the coming save of their checkpoint; whether it stored them.

        They wait :data:`_PARKED_SECONDS` from now, or :data:`_FIRST_SAVE_SECONDS` while this
        process does not know the run, and for as long as a save of the run is on its way
        here: LangGraph queues a graph run's saves one behind the other and sends each
        step's writes at once, so a slow first save (a new store client, a new run) holds
        back the checkpoints those writes belong to. Given up on, they would be dropped
        although their checkpoint is saved right after (a delta channel then reads back
        short for good). Unless the store was ``asked`` already, it is asked once no save of
        the run has been on its way here for :data:`_UNSEEN_SECONDS`: a checkpoint another
        process saved (its writes sent from here) is not kept waiting for a save that never
        comes here."""
        state = self._state
        parked = state.parked.get(slot)
        if parked is None:
            parked = state.parked[slot] = Parked()
        parked.add(writes)
        parked.waiting += 1
        try:
            return await self._parked(where, slot, parked, asked=asked)
        finally:
            parked.waiting -= 1
            if not parked.waiting and not parked.done.is_set and \
                    state.parked.get(slot) is parked:
                # Every call that parked them was cancelled: no one looks for them again.
                del state.parked[slot]

    async def _parked(
        self, where: _Where, slot: tuple[str, str], parked: Parked, *, asked: bool
    ) -> bool:
        try:
            return await self._parked_until_stored(where, slot, parked, asked=asked)
        except anyio.get_cancelled_exc_class():
            if self._state.parked.get(slot) is not parked and not parked.done.is_set:
                # A save took them and is storing them: the call ends once they landed (or
                # not), as a write stored by the call itself does.
                await settled(parked.done.wait())
            raise

    async def _parked_until_stored(
        self, where: _Where, slot: tuple[str, str], parked: Parked, *, asked: bool
    ) -> bool:
        state = self._state
        key = slot[0]
        since = anyio.current_time()
        while True:
            budget = _PARKED_SECONDS if state.runs.get(key) is not None else _FIRST_SAVE_SECONDS
            left = since + budget - anyio.current_time()
            saving = None if left > 0 else state.saving_in(key)
            if left > 0:
                with anyio.move_on_after(left if asked else min(left, _UNSEEN_SECONDS)):
                    await parked.done.wait()
            elif saving is not None:
                await saving.wait()  # the checkpoint's save may come behind it
            if parked.done.is_set or state.parked.get(slot) is not parked:
                break  # stored, failed, or taken by a save that is still running
            if left > 0 and not asked and state.saving_in(key) is None:
                asked = True
                if await self._saved_elsewhere(where, slot, parked):
                    return False  # each call stores its own writes where the lookup found
                continue
            if left <= 0 and saving is None:
                del state.parked[slot]  # no save came
                parked.done.set()  # other calls that parked writes with these: neither
                return False
            # Look again: the run may be known now, or another save on its way.
        if not parked.done.is_set:
            await parked.done.wait()
        return parked.stored

    async def _saved_elsewhere(
        self, where: _Where, slot: tuple[str, str], parked: Parked
    ) -> bool:
        """Whether the store holds the checkpoint writes are parked for (saved by another
        process); if so, and no save here took them meanwhile, they are released."""
        try:
            found = await self._lookup(where, slot[1], self._now())
        except CheckpointError as exc:
            logger.warning("could not look up checkpoint %s of thread %r for the writes "
                           "waiting for it (%s); they wait for its save", slot[1],
                           where.thread_id[:80], exc)
            return False
        if found is None or parked.done.is_set or self._state.parked.get(slot) is not parked:
            return False
        del self._state.parked[slot]
        parked.done.set()  # other calls that parked writes with these store theirs too
        return True

    async def _put_owned(
        self, where: _Where, checkpoint_id: str, located: Located, writes: list[StoredWrite]
    ) -> bool:
        """Store ``writes`` on their checkpoint and pause the thread for the interrupts among
        them: all of it, whatever cancels the caller once it is under way (regular and
        special writes are two store calls; a single call without an interrupt in the root
        namespace leaves nothing to follow, and skips that cost)."""
        stored = self._put_owned_now(where, checkpoint_id, located, writes)
        groups = {write.idx >= 0 for write in writes}
        if len(groups) == 1 and (where.checkpoint_ns or all(
                write.channel != records.INTERRUPT for write in writes)):
            return await stored
        return await settled(stored, instant=self._shared.instant)

    async def _put_owned_now(
        self, where: _Where, checkpoint_id: str, located: Located, writes: list[StoredWrite]
    ) -> bool:
        if not await self._put_owned_at(where, located, writes):
            # Gone from where this process saw it; another process may have put the thread
            # back meanwhile (copied away and back): the checkpoint is there again.
            found = await self._lookup(where, checkpoint_id, self._now())
            if found is None or found == located or not await self._put_owned_at(
                    where, found, writes):
                self._state.located.pop((where.key, checkpoint_id))
                logger.info("pending writes for checkpoint %s of thread %r were dropped: "
                            "the checkpoint is gone", checkpoint_id, where.thread_id[:80])
                return False
            located = found
        await self._pause_for(where, checkpoint_id, located, writes)
        return True

    async def _put_owned_at(
        self, where: _Where, located: Located, writes: list[StoredWrite]
    ) -> bool:
        owner = _ids.checkpoint_id(where.key, located.incarnation, located.sequence)
        regular = [write for write in writes if write.idx >= 0]
        special = [write for write in writes if write.idx < 0]
        for group, if_absent in ((regular, True), (special, False)):
            if group and not await self._store.put_owned_items(
                where.key, self._write_items(located, group), owner=located.sequence,
                checkpoint_id=owner, if_absent=if_absent, now=self._now()
            ):
                return False
        return True

    async def _pause_for(
        self, where: _Where, checkpoint_id: str, located: Located,
        writes: Iterable[StoredWrite], *, still: Callable[[RunRecord], bool] | None = None,
    ) -> None:
        """:meth:`_pause` for the interrupts among stored ``writes`` (root namespace only)."""
        interrupts = [write for write in writes if write.channel == records.INTERRUPT]
        if not interrupts or where.checkpoint_ns:
            return
        place = f"thread {where.thread_id[:80]!r} checkpoint {checkpoint_id[:80]}"
        try:
            values = [(write.channel, self._loads(write.value, place)) for write in interrupts]
        except CheckpointError:
            logger.warning("thread %r was interrupted at %s, but its interrupts could not be "
                           "read for the approval request", where.thread_id[:80],
                           checkpoint_id, exc_info=True)
            return
        await self._pause(where, checkpoint_id, values, life=located.incarnation, still=still)

    def _write_items(self, located: Located, writes: list[StoredWrite]) -> list[Item]:
        prefixes: dict[str, str] = {}  # task id -> its writes' key prefix: one digest each
        items: list[Item] = []
        for write in writes:
            prefix = prefixes.get(write.task_id)
            if prefix is None:
                prefix = prefixes[write.task_id] = records.task_writes_prefix(
                    located.sequence, write.task_id)
            items.append(Item(key=f"{prefix}{write.idx}", value=self._shared.items.encode(write),
                              owner=located.sequence, expires_at=located.expires_at))
        return items

    # -- internals: status ---------------------------------------------------------------------

    async def _pause(
        self, where: _Where, checkpoint_id: str, writes: Sequence[tuple[str, Any]],
        *, life: str, at: Located | None = None, paused: bool = False,
        still: Callable[[RunRecord], bool] | None = None,
    ) -> None:
        """PAUSED, with the interrupts as the approval request (merged with those of the
        same checkpoint already pending). Never fails the write: it is stored already.
        ``life``: the incarnation of the run the checkpoint is in; a later life of the run
        (another process deleted the thread and started it again meanwhile) is left as it is.

        ``at``: the run's latest checkpoint, holding ``writes``, as a read found it; the run
        then changes only if its approval record does not ask about them already (pending or
        decided) and it has not gone on since. ``paused``: the read found the run PAUSED, so
        a request that names no checkpoint (made by hand) is one to leave as it is.
        ``still``: whether the run as read is still one to pause (else: as ``at`` or
        ``life`` say)."""
        asked = records.approval_request(checkpoint_id, writes)
        approval: dict[str, Any] = {}  # the run's approval record once this is done
        made: Callable[[RunData], bool] | None = None

        def applies(record: RunRecord) -> bool:
            if still is not None:
                return still(record)
            if at is not None:
                return (record.incarnation, record.latest_sequence) == (
                    at.incarnation, at.sequence)
            return record.incarnation == life

        if at is not None:
            def made(data: RunData) -> bool:
                approval.update(data.approval or {})
                return records.asks_about(data.approval, asked) or (
                    paused and records.by_hand(data.approval))

        def record_request(data: RunData, now: float) -> None:
            pending = data.approval or {}
            undecided = pending if "decision" not in pending else {}
            request = records.merged_request(undecided.get("request"), asked)
            same = request is not asked
            data.approval = {"request": request,
                             "requested_at": undecided.get("requested_at", now) if same else now}
            approval.clear()
            approval.update(data.approval)

        try:
            await self._shared.manager._transition(
                where.run_id, CheckpointStatus.PAUSED,
                allowed={CheckpointStatus.ACTIVE, CheckpointStatus.PAUSED},
                note=f"interrupted at LangGraph checkpoint {checkpoint_id}",
                update=record_request, made=made, still=applies)
            if records.asks_about(approval, asked):
                self._state.queued.put((where.key, checkpoint_id), approval)
        except ConflictError as exc:
            logger.info("thread %r was interrupted but is not queued for approval: %s",
                        where.thread_id[:80], exc)
        except CheckpointError:
            logger.warning("thread %r was interrupted at %s, but its run could not be set "
                           "PAUSED", where.thread_id[:80], checkpoint_id, exc_info=True)

    async def _unpause(
        self, where: _Where, checkpoint_id: str, unchanged: Callable[[RunRecord], bool]
    ) -> None:
        """ACTIVE again: the checkpoint the thread was paused about was deleted. Left as it is
        when its request changed meanwhile (or the run went on)."""

        def other_request(data: RunData) -> bool:
            found = (data.approval or {}).get("request")
            return not isinstance(found, Mapping) or found.get("checkpoint_id") != checkpoint_id

        try:
            await self._shared.manager._transition(
                where.run_id, CheckpointStatus.ACTIVE, allowed={CheckpointStatus.PAUSED},
                note=f"LangGraph checkpoint {checkpoint_id} it was paused at was deleted "
                     "(delete_for_runs)",
                made=other_request, still=unchanged)
        except ConflictError as exc:
            logger.info("thread %r stays as it is: %s", where.thread_id[:80], exc)

    async def _reactivate(
        self, where: _Where, status: str, checkpoint_id: str, located: Located
    ) -> None:
        """ACTIVE again once the graph goes on after an interrupt, an error or a decision,
        in the life of the run the checkpoint landed in (a later one, started by another
        process meanwhile, keeps its status). A FAILED thread is resumed as a create resumes
        a run: only the failure the append saw, so one made after it (by ``mark_failed``,
        after another save resumed the thread) keeps its status and error. Never fails the
        save: the checkpoint is written."""

        def clear_error(data: RunData, now: float) -> None:
            data.error = None

        try:
            if status == CheckpointStatus.FAILED.value:
                await self._shared.manager._make_active(
                    where.run_id,
                    _ids.checkpoint_id(where.key, located.incarnation, located.sequence),
                    note=f"resumed: LangGraph checkpoint {checkpoint_id} saved after {status}")
                return
            # Not from FAILED: the append did not see that failure, so it came after the
            # append and stands (as a create resumes no failure its append did not see).
            await self._shared.manager._transition(
                where.run_id, CheckpointStatus.ACTIVE,
                allowed={CheckpointStatus.PAUSED, CheckpointStatus.REJECTED},
                note=f"resumed: LangGraph checkpoint {checkpoint_id} saved after {status}",
                update=clear_error,
                still=lambda record: record.incarnation == located.incarnation)
        except ConflictError:
            pass  # another worker changed the status meanwhile: it stands
        except CheckpointError:
            logger.warning("thread %r went on after being %s, but its run could not be set "
                           "active again", where.thread_id[:80], status, exc_info=True)

    # -- internals: delete_for_runs, copy, prune ------------------------------------------------

    async def _delete_thread(self, thread: str) -> None:
        # The root first: a reader (another process's graph run, a copy) that finds it finds
        # every namespace still there, and one that does not sees no thread.
        keys = {_ids.run_key(thread): None}
        async for record in self._thread_runs(thread):
            keys[_ids.run_key(record.run_id)] = None
        await self._delete_runs(list(keys))
        # A subgraph namespace started meanwhile (by a graph run in another process that
        # did not know yet) is found by the listing again.
        for _ in range(_RELISTS):
            again = [_ids.run_key(record.run_id) async for record in self._thread_runs(thread)]
            if not again:
                return
            await self._delete_runs(again)

    async def _delete_runs(self, keys: list[str]) -> None:
        for key in keys:
            self._state.forget_run(key)
            self._shared.logs.forget(key)
            self._shared.lists.forget(key)
            await self._store.delete_run(key)

    async def _copy_thread(self, source: str, target: str) -> None:
        """Every namespace of ``source`` (also those started while it copies), then a check
        that none was deleted or started again meanwhile, and that no other writer wrote
        into the copy; else (or when a store
        call fails) the checkpoints copied are removed again and the call raises. A thread
        without its root namespace (being deleted: the root goes first) copies as none."""
        async for _ in self._thread_runs(target):
            raise ConflictError(
                f"cannot copy into thread {target[:80]!r}: it has checkpoints already")
        runs = [record async for record in self._thread_runs(source)]
        root = next((record for record in runs if record.run_id == source), None)
        if root is None:
            return
        made: list[tuple[str, int, str]] = []  # (run key, sequence, record id) of each copy
        try:
            for record in runs:
                await self._copy_run(record, target, made)
            # Namespaces the source's graph run started meanwhile (a subgraph the root's
            # newest checkpoint copied may wait in) are copied too.
            for _ in range(_RELISTS):
                copied = {record.run_id for record in runs}
                more = [record async for record in self._thread_runs(source)
                        if record.run_id not in copied]
                if not more:
                    break
                for record in more:
                    await self._copy_run(record, target, made)
                runs += more
            await self._check_copy(source, target, runs, made)
            root_copy = _where_from(target, "")
            if any(key == root_copy.key for key, _, _ in made):
                await self._copy_request(root, root_copy)
        except CheckpointError:
            await self._undo_copy(target, made)
            raise

    async def _check_copy(
        self, source: str, target: str, runs: list[RunRecord], made: list[tuple[str, int, str]]
    ) -> None:
        now = self._now()
        for record in runs:
            found = await self._store.get_run(_ids.run_key(record.run_id), now=now)
            if found is None or found.incarnation != record.incarnation:
                raise ConflictError(
                    f"thread {source[:80]!r} was deleted or started again while being copied")
        last = {key: (sequence, record_id) for key, sequence, record_id in made}
        for key, (sequence, record_id) in last.items():
            found = await self._store.get_run(key, now=now)
            if found is None or found.latest_sequence != sequence or \
                    _ids.checkpoint_id(key, found.incarnation, sequence) != record_id:
                raise ConflictError(
                    f"thread {target[:80]!r} was written to while being copied into")

    async def _undo_copy(self, target: str, made: list[tuple[str, int, str]]) -> None:
        """Remove the checkpoints a failed copy made (only those: another writer's stay)."""
        try:
            for key, sequence, record_id in reversed(made):
                await self._store.delete(key, sequence, checkpoint_id=record_id)
        except CheckpointError:
            logger.warning("a failed copy into thread %r could not remove what it copied",
                           target[:80], exc_info=True)
        for key in dict.fromkeys(key for key, _, _ in made):
            self._state.forget_run(key)

    async def _keep_latest_of(self, thread: str) -> None:
        async for record in self._thread_runs(thread):
            await self._keep_latest(record)

    async def _delete_langgraph_run(self, langgraph_run: str) -> None:
        now = self._now()
        prefix = records.registry_prefix(langgraph_run)
        entries = await self._registry_entries(prefix, now)
        gone: list[tuple[str, _Where | None]] = []
        for item_key, value in entries:
            entry = self._shared.items.decode(value, RegistryEntry, item_key)
            where = _where_of_run(entry.run_id)
            if where is not None:
                await self._delete_matching(where, langgraph_run)
                if not where.checkpoint_ns:
                    await self._requeue(where)
                # A namespace still there may get more of the run's checkpoints from a saver
                # that indexed it already (and does not write its entry again): keep it.
                if await self._store.get_run(where.key, now=self._now()) is not None:
                    continue
            gone.append((item_key, where))
        await self._store.delete_items(_REGISTRY_KEY, [item_key for item_key, _ in gone])
        for item_key, where in gone:
            self._state.registered.pop((langgraph_run, item_key[len(prefix):]))
            if where is not None and await self._store.get_run(
                    where.key, now=self._now()) is not None:
                # Started again meanwhile: the save that did it may have indexed the run
                # before the removal above.
                await self._write_registry_entry(where, langgraph_run, self._now(), None)

    async def _registry_entries(self, prefix: str, now: float) -> list[tuple[str, bytes]]:
        entries: list[tuple[str, bytes]] = []
        after: str | None = None
        while True:
            page = await self._store.scan_items(
                _REGISTRY_KEY, prefix=prefix, start_after=after, limit=_PAGE, now=now)
            entries += page
            if len(page) < _PAGE:
                return entries
            after = page[-1][0]

    async def _delete_matching(self, where: _Where, langgraph_run: str) -> None:
        async for stored in self._headers(where.key):
            place = f"run {where.run_id[:80]!r} sequence {stored.sequence} (header)"
            try:
                _, extra = self._headers_of(where, stored, place)
                metadata = self._loads(extra.metadata, place)
            except (CorruptCheckpointError, SerializationError):
                logger.warning("delete_for_runs skipped an unreadable checkpoint header",
                               exc_info=True)
                continue
            if isinstance(metadata, dict) and metadata.get("run_id") == langgraph_run:
                self._state.located.pop((where.key, extra.checkpoint_id))
                await self._store.delete(where.key, stored.sequence,
                                         checkpoint_id=stored.checkpoint_id)

    async def _requeue(self, where: _Where) -> None:
        """The thread's place in the approval queue once ``delete_for_runs`` removed some of
        its root checkpoints: it waits for approval when its latest checkpoint left holds
        interrupts that no resume answered and no decision was made about; a pause about a
        deleted checkpoint goes (the thread is ACTIVE again, or paused about the latest
        checkpoint's interrupts). A request made by hand stays, and so does a thread that
        went on meanwhile. (Not from what this call deleted: a call made again after one
        that failed midway puts the thread right.)"""
        now = self._now()
        record = await self._store.get_run(where.key, now=now)
        latest = None if record is None else await self._store.read_with_items(
            where.key, sequence=None, now=now)
        if record is None or latest is None or record.status not in _QUEUEABLE:
            return  # no checkpoint left: the thread is listed nowhere
        stored, _, items = latest
        place = stored.key or f"run {where.run_id[:80]!r} sequence {stored.sequence}"
        checkpoint_id = self._headers_of(where, stored, place)[1].checkpoint_id
        writes = self._stored_writes(stored.sequence, items, place)
        approval = self._shared.codec.decode_run_data(record.data, place).approval or {}
        paused = record.status == CheckpointStatus.PAUSED.value

        seen = (record.incarnation, record.latest_sequence)

        def unchanged(run: RunRecord) -> bool:
            return (run.incarnation, run.latest_sequence) == seen

        if any(write.channel == records.INTERRUPT for write in writes) and all(
                write.channel != records.RESUME for write in writes):
            asked = records.approval_request(checkpoint_id, [])
            if (records.asks_about(approval, asked) and (paused or "decision" in approval)) or (
                    paused and records.by_hand(approval)):
                return
            located = _located_of(where, stored)
            await self._pause_for(where, checkpoint_id, located, writes, still=unchanged)
            return
        request = approval.get("request")
        about = request.get("checkpoint_id") if paused and isinstance(request, Mapping) else None
        if isinstance(about, str) and about != checkpoint_id and (
                await self._lookup(where, about, now) is None):
            await self._unpause(where, about, unchanged)

    async def _copy_run(
        self, source: RunRecord, target_thread: str, made: list[tuple[str, int, str]]
    ) -> None:
        origin = _where_of_run(source.run_id)
        if origin is None:
            return
        target = _where_from(target_thread, origin.checkpoint_ns)
        oldest_first = [stored async for stored in self._headers(origin.key)][::-1]
        copied: dict[str, str] = {}  # source record id -> copy's record id
        numbered: dict[int, int] = {}  # source sequence -> copy's sequence
        indexed: set[str] = set()  # the LangGraph runs indexed for the copy
        incarnation = _ids.new_incarnation()
        for stored in oldest_first:
            found = await self._store.read_with_items(
                origin.key, sequence=stored.sequence, now=self._now())
            if found is not None:
                located = Located(incarnation, len(copied), self._expiry())
                await self._copy_checkpoint(origin, target, found[0], found[2], located,
                                            copied, numbered, indexed)
                made.append((target.key, located.sequence, copied[found[0].checkpoint_id]))

    async def _copy_checkpoint(
        self,
        origin: _Where,
        target: _Where,
        stored: StoredCheckpoint,
        items: dict[str, bytes],
        located: Located,
        copied: dict[str, str],
        numbered: dict[int, int],
        indexed: set[str],
    ) -> None:
        place = stored.key or f"run {origin.run_id[:80]!r} sequence {stored.sequence}"
        header, extra = self._headers_of(origin, stored, place)
        # The copy is indexed under its LangGraph run, as the save it copies was, before it
        # lands: ``delete_for_runs`` deletes a run's checkpoints in every thread, copies too.
        metadata = self._loads(extra.metadata, place)
        langgraph_run = metadata.get("run_id") if isinstance(metadata, dict) else None
        if isinstance(langgraph_run, str) and langgraph_run and langgraph_run not in indexed:
            await self._write_registry_entry(target, langgraph_run, self._now(),
                                             located.incarnation)
            indexed.add(langgraph_run)
        # The copy's sequences are not the source's: each floor becomes the copy of the
        # checkpoint there; one not copied (pruned) becomes a floor below every sequence, so
        # the copy's walk ends at the missing ancestor as the source's did.
        delta = None if extra.delta is None else {
            channel: numbered.get(floor, -1) for channel, floor in extra.delta.items()}
        extra = msgspec.structs.replace(extra, thread_id=target.thread_id, delta=delta)
        record_id = _ids.checkpoint_id(target.key, located.incarnation, located.sequence)
        parent = None if header.parent_id is None else copied.get(header.parent_id)
        header = msgspec.structs.replace(
            header, run_id=target.run_id, parent_id=parent,
            ttl_seconds=self._shared.ttl_seconds, extra=records.encode_header(extra))
        record = StoredCheckpoint(
            sequence=located.sequence, checkpoint_id=record_id, created_at=self._now(),
            expires_at=located.expires_at, header=self._shared.codec.encode_header(header),
            # Only the values the source holds (a checkpoint saved by an older release may
            # name channels that never had one): stores refuse refs to items they lack.
            payload=stored.payload, refs=tuple(key for key in stored.refs if key in items))
        writes = records.writes_prefix(stored.sequence)
        owned = [Item(key=records.writes_prefix(located.sequence) + key[len(writes):],
                      value=value, owner=located.sequence, expires_at=located.expires_at)
                 for key, value in items.items() if key.startswith(writes)]
        owned.append(Item(key=records.index_key(extra.checkpoint_id),
                          value=self._shared.items.encode(located), owner=located.sequence,
                          expires_at=located.expires_at))
        shared = [Item(key=key, value=items[key]) for key in record.refs]
        # A log's parts, nested under its anchor, go with it.
        nests = tuple(nested_prefix(anchor) for anchor in _anchors(extra))
        if nests:
            shared += [Item(key=key, value=value) for key, value in items.items()
                       if key.startswith(nests)]
        try:
            await self._store.append_with_items(
                target.key, record, run=self._seed(target, located, record.created_at),
                keep_latest=self._shared.keep_latest if delta is None else None,
                now=record.created_at, items=[*shared, *owned])
        except SequenceConflict as exc:
            raise ConflictError(
                f"thread {target.thread_id[:80]!r} was written to while being copied into"
            ) from exc
        copied[stored.checkpoint_id] = record_id
        numbered[stored.sequence] = located.sequence
        self._state.remember(target.key, extra.checkpoint_id, located, head=True)

    async def _copy_request(self, source: RunRecord, target: _Where) -> None:
        """The copy of a thread awaiting approval awaits it too, with the same request; that
        of one whose request was decided (and the graph not gone on yet) keeps the decision,
        so that a read of the copy does not ask about its interrupts again."""
        details = self._shared.codec.decode_run_data(source.data, f"run {source.run_id!r}")
        approval = dict(details.approval or {})
        if source.status == CheckpointStatus.PAUSED.value:
            def record_request(data: RunData, now: float) -> None:
                data.approval = {"request": approval.get("request", {}), "requested_at": now}

            await self._shared.manager._transition(
                target.run_id, CheckpointStatus.PAUSED, allowed={CheckpointStatus.ACTIVE},
                note=f"copied from thread {source.run_id[:80]!r} while awaiting approval",
                update=record_request)
        elif "decision" in approval:
            def record_decision(data: RunData, now: float) -> None:
                data.approval = approval

            await self._shared.manager._transition(
                target.run_id, CheckpointStatus.ACTIVE, allowed={CheckpointStatus.ACTIVE},
                note=f"copied from thread {source.run_id[:80]!r} with its decided request",
                update=record_decision)

    async def _keep_latest(self, record: RunRecord) -> None:
        """Keep the newest checkpoint with the ancestors its delta channels rebuild from, and
        those of every checkpoint saved while this runs (a fork from an older checkpoint
        needs its own): before each removal, the newest header says whether one came."""
        where = _where_of_run(record.run_id)
        if where is None:
            return
        headers = [stored async for stored in self._headers(where.key)]
        if not headers:
            return
        newest = headers[0].sequence
        kept = self._delta_chains(where, headers, since=newest)
        for stored in headers:
            if stored.sequence in kept:
                continue
            page, _ = await self._store.headers(where.key, before=None, limit=1,
                                                now=self._now())
            if page and page[0].sequence > newest:
                again = [header async for header in self._headers(where.key)]
                kept |= self._delta_chains(where, again, since=newest + 1)
                newest = again[0].sequence if again else newest
                if stored.sequence in kept:
                    continue
            await self._store.delete(where.key, stored.sequence,
                                     checkpoint_id=stored.checkpoint_id)

    def _delta_chains(
        self, where: _Where, newest_first: list[CheckpointHeader], *, since: int
    ) -> set[int]:
        """The checkpoints from sequence ``since`` on, each with the ancestors its delta
        channels rebuild from (the supersteps since their last snapshot, from its
        metadata)."""
        parsed: dict[str, tuple[int, LangGraphHeader]] = {}
        for stored in newest_first:
            place = f"run {where.run_id[:80]!r} sequence {stored.sequence} (header)"
            try:
                parsed[stored.checkpoint_id] = (
                    stored.sequence, self._headers_of(where, stored, place)[1])
            except CorruptCheckpointError:
                continue
        by_id = {extra.checkpoint_id: sequence for sequence, extra in parsed.values()}
        extras = dict(parsed.values())
        kept: set[int] = set()
        for stored in newest_first:
            if stored.sequence < since:
                break
            kept.add(stored.sequence)
            current = extras.get(stored.sequence)
            if current is None:
                continue
            for _ in range(_supersteps(self._loads(current.metadata, where.run_id))):
                parent = current.parent_checkpoint_id
                sequence = None if parent is None else by_id.get(parent)
                if sequence is None:
                    break
                kept.add(sequence)
                current = extras[sequence]
        return kept

    # -- internals: delta channel history ---------------------------------------------------

    async def _delta_history(
        self, where: _Where, checkpoint_id: str | None, wanted: list[str]
    ) -> dict[str, DeltaChannelHistory] | None:
        """``aget_delta_channel_history`` from headers and a range scan; ``None`` where only
        the default walk can answer."""
        now = self._now()
        chain = await self._delta_chain_of(where, checkpoint_id, wanted, now)
        if chain is None or isinstance(chain, dict):
            return chain
        writes: dict[int, list[StoredWrite]] = {}
        seeds: dict[str, Typed] = {}
        for sequence in sorted(set(chain.seeds.values())):
            found = await self._store.read_with_items(where.key, sequence=sequence, now=now)
            if found is None or found[0].checkpoint_id != chain.record_ids[sequence]:
                return None  # removed since its header was read
            stored, _, items = found
            place = stored.key or f"run {where.run_id[:80]!r} sequence {sequence}"
            versions = self._bare_checkpoint(stored, place)["channel_versions"]
            extra = self._headers_of(where, stored, place)[1]
            for channel in (name for name, at in chain.seeds.items() if at == sequence):
                version = versions.get(channel)
                try:
                    typed = None if version is None else self._value_of(
                        where, extra, channel, version, items, place, keep=None)
                except LogGap:
                    return None  # a log part merged away during the read: the walk reads again
                if typed is None:
                    return None
                seeds[channel] = typed
            writes[sequence] = self._stored_writes(sequence, items, place)
        others = {sequence for sequence, _ in chain.visited} - writes.keys()
        if others:
            writes.update(await self._scanned_writes(where, others, now))
            if not await self._still_held(where, chain, now):
                return None  # an ancestor went meanwhile: its writes may be missing
        size = sum(len(write.value[1]) for found in writes.values() for write in found)
        size += sum(len(typed[1]) for typed in seeds.values())
        build = functools.partial(self._history_of, where, wanted, chain, writes, seeds)
        if size >= self._shared.manager.config.offload_min_bytes:
            return await in_worker_thread(build)
        return build()

    async def _delta_chain_of(
        self, where: _Where, checkpoint_id: str | None, wanted: list[str], now: float
    ) -> _DeltaChain | dict[str, DeltaChannelHistory] | None:
        """The target's ancestors, newest first, each with the channels whose writes it
        gives, and where each channel's seed is; empty histories when there is no target;
        ``None`` for the default walk."""
        before: int | None = None
        expected: tuple[int, str] | None = None
        if checkpoint_id is not None:
            located = self._state.located.get((where.key, checkpoint_id))
            if located is None:
                located = await self._lookup(where, checkpoint_id, now)
            if located is None:
                return _empty_histories(wanted)
            before = located.sequence + 1
            expected = (located.sequence,
                        _ids.checkpoint_id(where.key, located.incarnation, located.sequence))
        chain = _DeltaChain(remaining=set(wanted))
        cursor: str | None = None
        target_seen = False
        while True:
            page, _ = await self._store.headers(where.key, before=before, limit=_PAGE, now=now)
            for stored in page:
                place = f"run {where.run_id[:80]!r} sequence {stored.sequence} (header)"
                if not target_seen:
                    if expected is not None and (stored.sequence, stored.checkpoint_id) != expected:
                        return None  # gone, or moved to another life: the default walk knows
                    target_seen = True
                    cursor = self._headers_of(where, stored, place)[1].parent_checkpoint_id
                elif cursor is not None:
                    extra = self._headers_of(where, stored, place)[1]
                    if extra.checkpoint_id != cursor:
                        continue
                    if extra.values is None:
                        return None
                    chain.visit(stored, extra.values)
                    cursor = extra.parent_checkpoint_id
                if cursor is None or not chain.remaining:
                    return chain
            if len(page) < _PAGE:
                break
            before = page[-1].sequence
        if not target_seen:
            return _empty_histories(wanted)
        # The parent is not among the older headers: removed (the chain ends there, as in
        # the default walk), or saved after its child (only the default walk finds it).
        return None if await self._lookup(where, cast(str, cursor), now) is not None else chain

    def _bare_checkpoint(self, stored: StoredCheckpoint, place: str) -> dict[str, Any]:
        """The LangGraph checkpoint in the payload, without channel values."""
        body = self._shared.codec.decode_payload(stored.payload, place).state.get("checkpoint")
        if not isinstance(body, list) or len(body) != 2:
            raise CorruptCheckpointError("not a LangGraph checkpoint payload", key=place)
        checkpoint = self._loads(_typed(body, place), place)
        versions = checkpoint.get("channel_versions") if isinstance(checkpoint, dict) else None
        if not isinstance(versions, dict):
            raise CorruptCheckpointError("a LangGraph checkpoint without channel_versions",
                                         key=place)
        return cast(dict[str, Any], checkpoint)

    async def _still_held(self, where: _Where, chain: _DeltaChain, now: float) -> bool:
        """Whether every ancestor the walk visited is still held (after its writes were
        read), by the run's headers again."""
        wanted = dict(chain.record_ids)
        before = max(wanted) + 1
        while wanted:
            page, _ = await self._store.headers(where.key, before=before, limit=_PAGE, now=now)
            for stored in page:
                if wanted.get(stored.sequence) == stored.checkpoint_id:
                    del wanted[stored.sequence]
            # A short page is the last; past the oldest one wanted, the rest cannot hold it.
            if len(page) < _PAGE or page[-1].sequence <= min(wanted, default=0):
                break
            before = page[-1].sequence
        return not wanted

    async def _scanned_writes(
        self, where: _Where, sequences: set[int], now: float
    ) -> dict[int, list[StoredWrite]]:
        """The writes of the checkpoints at ``sequences``, by one scan of their range."""
        last = max(sequences)
        start_after = records.writes_prefix(min(sequences))[:-1]
        found: dict[int, list[StoredWrite]] = {}
        while True:
            page = await self._store.scan_items(where.key, prefix=records.WRITES,
                                                start_after=start_after, limit=_WRITES_PAGE,
                                                now=now)
            for key, value in page:
                sequence = records.write_sequence(key)
                if sequence is None or sequence not in sequences:
                    if sequence is not None and sequence > last:
                        return found
                    continue
                place = f"run {where.run_id[:80]!r} item {key}"
                found.setdefault(sequence, []).append(
                    self._shared.items.decode(value, StoredWrite, place))
            if len(page) < _WRITES_PAGE:
                return found
            start_after = page[-1][0]

    def _history_of(
        self,
        where: _Where,
        wanted: list[str],
        chain: _DeltaChain,
        writes: dict[int, list[StoredWrite]],
        seeds: dict[str, Typed],
    ) -> dict[str, DeltaChannelHistory]:
        histories: dict[str, DeltaChannelHistory] = {
            channel: {"writes": []} for channel in wanted}
        for sequence, channels in reversed(chain.visited):  # oldest first
            place = f"run {where.run_id[:80]!r} sequence {sequence} (writes)"
            ordered = sorted(writes.get(sequence, ()), key=lambda write: writes_sort_key(
                write.task_path, write.task_id, write.idx))
            for write in ordered:
                if write.channel in channels:
                    histories[write.channel]["writes"].append(
                        (write.task_id, write.channel, self._loads(write.value, place)))
        for channel, typed in seeds.items():
            histories[channel]["seed"] = self._loads(
                typed, f"run {where.run_id[:80]!r} sequence {chain.seeds[channel]} ({channel})")
        return histories

    def _expiry(self) -> float | None:
        ttl = self._shared.ttl_seconds
        return None if ttl is None else self._now() + ttl

    # Last: below it, ``list`` in the class body would name this method.
    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        return self._shared.bridge.iterate(
            self.alist(config, filter=filter, before=before, limit=limit), "list")


_WALKING_ANCESTORS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "_WALKING_ANCESTORS", default=False)
"""Set while LangGraph's default walk reads a checkpoint's ancestors through ``aget_tuple``:
it reads those kept only for what newer checkpoints rebuild from as well."""


class _Ahead:
    """A run's headers newest first, read ahead as far as needed to tell whether a
    checkpoint's delta channels rebuild whole: every ancestor they rebuild from is still
    there. Under ``keep_latest`` that is each ancestor back to the lowest sequence its header
    names (``LangGraphHeader.delta``); in a header without it (saved without
    ``keep_latest``), the supersteps its metadata counts since the channels' snapshots, the
    ancestors ``aprune`` and ``adelete_for_runs`` keep. Both keep older checkpoints only for
    what newer ones rebuild from; such a checkpoint's own channels may reach further back,
    into what was pruned.

    The headers are read no further than those channels reach (a chain saved in a row: as
    many as the supersteps); an ancestor not among them (a fork's parent, further back, or
    one gone) is looked up by id with ``at``: the headers from its own down (as many as the
    supersteps left), none when it is gone. A parent may be saved after its child (saves
    race): unless ``from_newest`` (the headers start at the run's newest, not at ``alist``'s
    ``before`` nor below a checkpoint read by id) and none read above was forgotten since, one
    missing from the headers read is looked up too (a gone one costs the look-up)."""

    def __init__(
        self,
        headers: AsyncIterator[tuple[CheckpointHeader, LangGraphHeader]],
        supersteps: Callable[[LangGraphHeader], int],
        at: Callable[[str, int], Awaitable[list[tuple[CheckpointHeader, LangGraphHeader]]]],
        *,
        from_newest: bool,
    ):
        self._headers = headers
        self._supersteps = supersteps
        self._at = at
        self._whole_above = from_newest  # every header above those read is among them
        self._pending: collections.deque[tuple[CheckpointHeader, LangGraphHeader]] = (
            collections.deque())
        # The headers read that may still be a parent, newest first: none more than a page
        # above the one handed out or checked last (a parent is saved before its child, or
        # soon after it when saves race).
        self._seen: collections.OrderedDict[str, tuple[int, str | None]] = (
            collections.OrderedDict())
        # Ancestors looked up by id (None: gone), for the next checks (a fork's children
        # share them); a few pages at most.
        self._looked_up: dict[str, tuple[int, str | None] | None] = {}
        self._lowest: int | None = None
        self._done = False

    async def next(self) -> tuple[CheckpointHeader, LangGraphHeader] | None:
        if not self._pending and not await self._read():
            return None
        stored, extra = self._pending.popleft()
        self._forget_above(stored.sequence + _PAGE)  # what is checked from now on is older
        return stored, extra

    async def rebuilds_whole(self, sequence: int, extra: LangGraphHeader) -> bool:
        if extra.delta is not None:
            if not extra.delta:
                return True  # stores its delta channels
            floor, hops = _lowest(sequence, extra.delta), None
            bound = floor
        else:
            floor, hops = -1, self._supersteps(extra)
            if hops <= 0:
                return True  # no delta channel, or each snapshotted here
            bound = sequence - hops  # as far as a chain saved in a row reaches
        seen = self._recording(sequence, extra)
        parent, walked = extra.parent_checkpoint_id, 0
        while parent is not None and (hops is None or walked < hops):
            while parent not in seen and not self._done and (
                    self._lowest is None or self._lowest > bound):
                await self._read()
            found = seen.get(parent)
            if found is None:
                # Further back than the headers read (a fork's parent), gone, or saved after
                # its child, above the headers read.
                if self._read_all_it_could_be_among(hops):
                    return False  # gone
                found = await self._look_up(parent, _PAGE if hops is None else hops - walked)
                if found is None:
                    return False
            if hops is None and found[0] <= floor:
                return True
            parent, walked = found[1], walked + 1
        return True  # reached the run's first checkpoint, or as far as the channels reach

    async def _look_up(self, checkpoint_id: str, count: int) -> tuple[int, str | None] | None:
        if checkpoint_id not in self._looked_up:
            if len(self._looked_up) > 4 * _PAGE:
                self._looked_up.clear()
            found = await self._at(checkpoint_id, count)
            self._looked_up[checkpoint_id] = None  # gone, unless among those found
            self._looked_up.update((extra.checkpoint_id, (stored.sequence,
                                                          extra.parent_checkpoint_id))
                                   for stored, extra in found)
        return self._looked_up[checkpoint_id]

    def _recording(
        self, sequence: int, checked: LangGraphHeader
    ) -> collections.OrderedDict[str, tuple[int, str | None]]:
        if checked.checkpoint_id not in self._seen:  # read by id, not among the headers
            self._seen[checked.checkpoint_id] = (sequence, checked.parent_checkpoint_id)
            self._seen.move_to_end(checked.checkpoint_id, last=False)
        self._forget_above(sequence + _PAGE)
        return self._seen

    def _read_all_it_could_be_among(self, hops: int | None) -> bool:
        """Whether a parent missing from the headers read is gone: every header above them
        is among them, and those read reach the bottom, or (under ``keep_latest``) the
        floor: no ancestor a header's floors lead to lies below it."""
        return self._whole_above and (hops is None or self._done)

    def _forget_above(self, sequence: int) -> None:
        while self._seen and next(iter(self._seen.values()))[0] > sequence:
            self._seen.popitem(last=False)
            self._whole_above = False  # a parent saved that much later is looked up

    async def _read(self) -> bool:
        if self._done:
            return False
        try:
            stored, extra = await anext(self._headers)
        except StopAsyncIteration:
            self._done = True
            return False
        self._pending.append((stored, extra))
        self._seen[extra.checkpoint_id] = (stored.sequence, extra.parent_checkpoint_id)
        self._lowest = stored.sequence
        return True


@dataclasses.dataclass
class _DeltaChain:
    """A delta channel history's walk: the ancestors visited, newest first, each with the
    channels it gives writes to; where each channel's seed is; the channels still walking."""

    remaining: set[str]
    visited: list[tuple[int, frozenset[str]]] = dataclasses.field(default_factory=list)
    seeds: dict[str, int] = dataclasses.field(default_factory=dict)
    record_ids: dict[int, str] = dataclasses.field(default_factory=dict)

    def visit(self, stored: CheckpointHeader, values: tuple[str, ...]) -> None:
        self.visited.append((stored.sequence, frozenset(self.remaining)))
        self.record_ids[stored.sequence] = stored.checkpoint_id
        for channel in self.remaining.intersection(values):
            self.seeds[channel] = stored.sequence
        self.remaining.difference_update(values)


_Logs = tuple[str, Mapping[str, ChannelLog]]
"""Logged values with the life (incarnation) of the run they belong to."""
_NO_LOGS: _Logs = ("", {})
_NO_LIFE = ""
"""The life of a checkpoint whose save was dropped: no incarnation of a run is empty."""
_MIXED = "\x00"
"""A save naming logs of different lives: never a life of the run (it is written anew)."""


def _anchors(extra: LangGraphHeader) -> set[str]:
    return set() if extra.logs is None else {log.anchor for log in extra.logs.values()}


def _empty_histories(channels: list[str]) -> dict[str, DeltaChannelHistory]:
    return {channel: {"writes": []} for channel in channels}


class _Capable(CheckpointStore, SupportsLabels, SupportsSharedItems, Protocol):
    """A store with both capabilities the saver needs (for type checking only)."""


# -- configs and arguments -------------------------------------------------------------------


def _skipped(
    where: _Where, stored: CheckpointHeader, error: CorruptCheckpointError,
    langgraph_id: str | None = None,
) -> None:
    """Log a checkpoint a read of several passes over, as the manager's listings do."""
    logger.warning(
        "skipping damaged checkpoint %s (LangGraph checkpoint %s, thread %r, namespace "
        "%r): %s", stored.checkpoint_id[:120], langgraph_id or "unknown",
        where.thread_id[:80], where.checkpoint_ns[:80], error)


def _where(config: object) -> _Where:
    configurable = _configurable(config)
    if "thread_id" not in configurable:
        raise ValidationError(
            "config['configurable']['thread_id'] is required (LangGraph's checkpointers key "
            "every checkpoint by thread)")
    namespace = configurable.get("checkpoint_ns") or ""
    if not isinstance(namespace, str):
        raise ValidationError(
            f"checkpoint_ns must be a str, got {type(namespace).__name__}")
    return _where_from(records.checked_thread_id(configurable["thread_id"]), namespace)


@functools.lru_cache(maxsize=4096)  # every call names its namespace: a few, named often
def _where_from(thread_id: str, checkpoint_ns: str) -> _Where:
    run_id = records.run_id_of(thread_id, checkpoint_ns)
    return _Where(thread_id, checkpoint_ns, run_id, _ids.key_of(run_id))


def _where_of_run(run_id: str) -> _Where | None:
    """The namespace a run holds, ``None`` for a run that is no LangGraph thread's."""
    thread_id, _, namespace = run_id.partition(records.SEPARATOR)
    if not thread_id:
        return None
    return _Where(thread_id, namespace, run_id, _ids.run_key(run_id))


def _configurable(config: object) -> Mapping[str, Any]:
    if type(config) is not dict and not isinstance(config, Mapping):
        raise ValidationError(
            f"config must be a dict like {{'configurable': {{'thread_id': ...}}}}, got "
            f"{type(config).__name__}")
    configurable = config.get("configurable")
    if type(configurable) is not dict and not isinstance(configurable, Mapping):
        raise ValidationError("config['configurable'] must be a dict naming the thread_id")
    return configurable


def _names_namespace(config: object) -> bool:
    return _configurable(config).get("checkpoint_ns") is not None


def _checkpoint_id(config: object) -> str | None:
    value = _configurable(config).get("checkpoint_id")
    if value is None or value == "":
        return None
    return _text("checkpoint_id", value)


def _required_checkpoint_id(config: object) -> str:
    checkpoint_id = _checkpoint_id(config)
    if checkpoint_id is None:
        raise ValidationError(
            "config['configurable']['checkpoint_id'] is required: writes belong to a "
            "checkpoint")
    return checkpoint_id


def _new_checkpoint_id(checkpoint: object) -> str:
    if type(checkpoint) is not dict and not isinstance(checkpoint, Mapping):
        raise ValidationError(f"checkpoint must be a dict, got {type(checkpoint).__name__}")
    value = checkpoint.get("id")
    if not isinstance(value, str) or not value:
        raise ValidationError("checkpoint['id'] must be a non-empty str")
    return _text("checkpoint['id']", value)


def _config_of(where: _Where, checkpoint_id: str) -> RunnableConfig:
    return {"configurable": {"thread_id": where.thread_id, "checkpoint_ns": where.checkpoint_ns,
                             "checkpoint_id": checkpoint_id}}


def _located_of(where: _Where, stored: StoredCheckpoint) -> Located:
    parsed = _ids.parse_checkpoint_id(stored.checkpoint_id)
    if parsed is None or parsed[0] != where.key or parsed[2] != stored.sequence:
        raise CorruptCheckpointError(
            f"the record found here names checkpoint {stored.checkpoint_id[:80]!r}",
            key=stored.key or f"run {where.run_id[:80]!r}")
    return Located(parsed[1], stored.sequence, stored.expires_at)


def _text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{name} must be a str, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValidationError(f"{name} must be valid unicode (it has a lone surrogate)") from exc
    return plain_str(value)


def _texts(name: str, values: object) -> list[str]:
    if isinstance(values, str) or not isinstance(values, (Sequence, set, frozenset)):
        raise ValidationError(f"{name} must be a list of str, got {type(values).__name__}")
    return [_text(f"{name}[]", value) for value in values]


def _write_pair(write: object) -> tuple[str, Any]:
    if not isinstance(write, (tuple, list)) or len(write) != 2:
        raise ValidationError(f"each write must be a (channel, value) pair, got {shown(write)}")
    return _text("a write's channel", write[0]), write[1]


def _every_version(checkpoint: Checkpoint) -> dict[str, Any]:
    """A copy of the checkpoint's ``channel_versions``."""
    return dict(_mapping("checkpoint['channel_versions']", checkpoint.get("channel_versions")))


def _snapshot(value: object) -> object:
    """A channel value as it is now: a list or dict copied (one C-level call, atomic under
    the GIL). LangGraph hands over the channel's own object, which a node running in a
    thread of its own (a plain ``def`` node) may change while the save serializes it; the
    list memo must not see a list change under it, and ormsgpack crashes when a list's items
    are removed while its ``default`` hook runs Python code. Containers inside are not
    copied: the save serializes them on the caller's thread (see ``_take``)."""
    if type(value) is list:
        return list(value)
    if type(value) is dict:
        return dict(value)
    return value


def _mapping(name: str, value: object) -> Mapping[str, Any]:
    if type(value) is not dict and not isinstance(value, Mapping):
        raise ValidationError(f"{name} must be a dict, got {type(value).__name__}")
    return value


def _versions(new_versions: object) -> Mapping[str, Any]:
    """``new_versions`` checked: LangGraph's channel versions are str, int or float."""
    versions = _mapping("new_versions", new_versions)
    for version in versions.values():
        if isinstance(version, bool) or not isinstance(version, (str, int, float)):
            raise ValidationError(
                f"new_versions holds a version of type {type(version).__name__}; a channel "
                "version is a str, int or float")
    return versions


def _metadata(metadata: object) -> CheckpointMetadata:
    # No copy: ``get_checkpoint_metadata`` makes the one the save keeps.
    return cast(CheckpointMetadata, _mapping("metadata", metadata))


def _filter(filter: object) -> dict[str, Any]:
    if filter is None:
        return {}
    return dict(_mapping("filter", filter))


def _limit(limit: object) -> int | None:
    """``None``, or ``limit`` as a plain ``int`` >= 0 (a numpy integer too, which LangGraph's
    own savers take)."""
    return None if limit is None else count_arg("limit", limit, 0, " or None")


def _matches(metadata: object, wanted: dict[str, Any]) -> bool:
    if not isinstance(metadata, dict):
        return False
    return all(metadata.get(name) == value for name, value in wanted.items())


def _root_checkpoint_id(metadata: Mapping[str, Any]) -> str | None:
    """The root namespace's checkpoint a subgraph's checkpoint runs under (LangGraph's
    ``parents`` metadata)."""
    parents = metadata.get("parents")
    found = parents.get("") if isinstance(parents, Mapping) else None
    return found if isinstance(found, str) and found else None


def _step_name(metadata: Mapping[str, Any]) -> str:
    """What ``fastcheckpoint history`` shows in its STEP column: ``loop 3``, ``input -1``."""
    source, step = metadata.get("source"), metadata.get("step")
    return " ".join(str(part) for part in (source, step) if part is not None)[:200]


def _supersteps(metadata: object) -> int:
    """The most supersteps any delta channel of the checkpoint went since its snapshot."""
    counters = metadata.get("counters_since_delta_snapshot") if isinstance(
        metadata, dict) else None
    if not isinstance(counters, dict):
        return 0
    steps = [int(value[1]) for value in counters.values()
             if isinstance(value, (list, tuple)) and len(value) == 2
             and isinstance(value[1], int)]
    return max(steps, default=0)


def _delta_needs(
    metadata: Mapping[str, Any], taken: _Taken, checkpoint: Checkpoint
) -> frozenset[str] | None:
    """The delta channels a checkpoint rebuilds from its ancestors (those LangGraph counts
    since their snapshot, with a version and no value here); ``None`` when it shows no delta
    channel (no counter, no snapshot)."""
    counters = metadata.get("counters_since_delta_snapshot")
    named = counters if isinstance(counters, dict) else {}
    if not named:
        values = checkpoint.get("channel_values")
        if not isinstance(values, Mapping) or not any(
                isinstance(value, _DeltaSnapshot) for value in values.values()):
            return None
    return frozenset(channel for channel in named
                     if channel in taken.versions and channel not in taken.stored)


def _lowest(sequence: int, delta: Mapping[str, int]) -> int:
    return min(sequence, min(delta.values(), default=sequence))


async def _each(values: Iterable[CheckpointHeader]) -> AsyncIterator[CheckpointHeader]:
    for value in values:
        yield value


_COUNTABLE = (0, 10**32 - 1)
"""The counters of the versions this saver makes (32 digits), and LangGraph's own."""


def _version_counter(current: str) -> int:
    head = current.split(".", 1)[0]
    if not (head.isascii() and head.isdigit()) or len(head) > 32:
        raise ValidationError(f"not a channel version this saver made: {current!r:.60}")
    return int(head)


def _typed(value: list[Any], where: str) -> Typed:
    kind, data = value
    if not isinstance(kind, str) or not isinstance(data, bytes):
        raise CorruptCheckpointError("not a serialized LangGraph value", key=where)
    return kind, data


def _is_pickle(kind: str) -> bool:
    # "+" joins an encrypted value's tag and cipher.
    return kind == "pickle" or kind.startswith("pickle+")


def _conflict_head(conflict: SequenceConflict) -> tuple[int, str] | None:
    if conflict.incarnation is None or conflict.latest_sequence is None:
        return None
    return conflict.latest_sequence, conflict.incarnation


# -- construction ------------------------------------------------------------------------------


