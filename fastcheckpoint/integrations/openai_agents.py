"""OpenAI Agents SDK: a conversation session and a human-approval queue on any store.

``FastSession`` implements the SDK's ``Session`` protocol: pass it as
``Runner.run(agent, input, session=...)``. Each session is one fastcheckpoint run, named
``openai-agents:<session_id>``, whose items are kept as an entry log (see
``fastcheckpoint.integrations._entrylog``): ``fastcheckpoint runs`` and ``show`` list it, and
it expires as a whole ``ttl_seconds`` after its last write.

``RunStateStore`` keeps an interrupted run (a tool with ``needs_approval``) as a PAUSED run in
the approval queue, so ``fastcheckpoint runs --status paused``, ``approve`` and ``reject``
work on it; :meth:`RunStateStore.resume` loads it back with the decision applied to every
pending tool call, ready for ``Runner.run(agent, state)``.

Costs in store calls: ``get_items`` 1; ``add_items`` and ``pop_item`` 1 when this session
object made the last change or read, else 3 (a refused change, a read, the change; a pop by
an object that never looked: 2); ``clear_session`` 1. ``RunStateStore.record`` 4 (the run, a
checkpoint, then the status change: read and update; 5 when its manager has not written the
run before), ``resume`` 4 (the run, the checkpoint, then the claim of the decision: read and
update).

Needs ``pip install 'fastcheckpoint[openai-agents]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, cast

import msgspec

from fastcheckpoint import _ids
from fastcheckpoint._codec import RunData, to_json_text
from fastcheckpoint._config import CheckpointConfig
from fastcheckpoint._ids import plain_str
from fastcheckpoint._manager import CheckpointManager, resumed_note
from fastcheckpoint._model import CheckpointStatus, RunInfo
from fastcheckpoint._validate import request_arg, shown, text_arg
from fastcheckpoint.errors import (
    CheckpointError,
    CheckpointNotFound,
    ConfigurationError,
    ConflictError,
    CorruptCheckpointError,
    SerializationError,
    ValidationError,
)
from fastcheckpoint.integrations._adapter import (
    adapter_config,
    adapter_ttl,
    capable_store,
)
from fastcheckpoint.integrations._entrylog import EntryLog
from fastcheckpoint.stores import CheckpointStore

try:
    from agents import Agent, RunResult, RunResultStreaming, RunState, ToolApprovalItem
    from agents.items import TResponseInputItem
    from agents.memory import SessionSettings
    from agents.memory.session_settings import coerce_session_settings
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ConfigurationError(
        "fastcheckpoint.integrations.openai_agents needs the OpenAI Agents SDK: "
        "pip install 'fastcheckpoint[openai-agents]'") from exc

__all__ = ["FRAMEWORK", "FastSession", "RunStateStore", "session_run_id"]

logger = logging.getLogger("fastcheckpoint.openai_agents")

FRAMEWORK = "openai-agents"
"""``framework`` in a session's run metadata and in every approval request."""
_SESSION_LABEL = "openai-agents:session"
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


def session_run_id(session_id: str) -> str:
    """The fastcheckpoint run that holds a session: what ``fastcheckpoint show`` takes."""
    return f"{FRAMEWORK}:{session_id}"


class FastSession:
    """An Agents SDK session (``agents.memory.Session``) on a fastcheckpoint store.

    ``store``: a store, shared with whatever else uses it (open it once, pass it to every
    session), or a store URL this session opens and :meth:`aclose` closes. ``ttl_seconds``:
    the session expires that long after its last write (``add_items``, ``pop_item``), all
    items together (``None``: the store's default TTL, else never). ``config``: its clock
    and retry policy are used (and its ``default_ttl_seconds`` when ``ttl_seconds`` is
    ``None``).

    Every operation is atomic across processes: concurrent ``add_items`` keep each batch
    together, and no two ``pop_item`` calls return the same item.
    """

    session_settings: SessionSettings | None = None

    def __init__(
        self,
        session_id: str,
        store: CheckpointStore | str,
        *,
        ttl_seconds: float | None = None,
        session_settings: SessionSettings | Mapping[str, Any] | None = None,
        config: CheckpointConfig | None = None,
    ) -> None:
        if not isinstance(session_id, str) or not session_id:
            raise ValidationError(f"session_id must be a non-empty str, got {shown(session_id)}")
        session_id = plain_str(session_id)
        settings = adapter_config(config)
        self._store = capable_store(store, settings.retry, "FastSession")
        self._owns_store = isinstance(store, str)
        self.session_id = session_id
        self.session_settings = _session_settings(session_settings)
        self._log = EntryLog(
            self._store, session_run_id(session_id), labels=(_SESSION_LABEL,),
            metadata={"framework": FRAMEWORK, "session_id": session_id},
            ttl_seconds=_ttl(ttl_seconds, settings, self._store), clock=settings.clock)
        # Changes from this object's tasks take turns instead of racing each other in the
        # store (correct either way; racing only costs retries).
        self._turn = asyncio.Lock()

    @classmethod
    def from_env(
        cls,
        session_id: str,
        environ: Mapping[str, str] | None = None,
        *,
        ttl_seconds: float | None = None,
        session_settings: SessionSettings | Mapping[str, Any] | None = None,
    ) -> FastSession:
        """A session on the store ``CheckpointManager.from_env`` opens (``FASTCHECKPOINT_URL``
        or ``CHECKPOINT_MODE``; ``CHECKPOINT_TTL_DAYS`` or ``FASTCHECKPOINT_DEFAULT_TTL_SECONDS``
        for the TTL). The session owns that store: :meth:`aclose` closes it."""
        manager = CheckpointManager.from_env(environ)
        session = cls(session_id, manager.store, ttl_seconds=ttl_seconds,
                      session_settings=session_settings, config=manager.config)
        session._owns_store = True
        return session

    @property
    def store(self) -> CheckpointStore:
        return self._store

    @property
    def run_id(self) -> str:
        """The fastcheckpoint run holding this session (``session_run_id(session_id)``)."""
        return session_run_id(self.session_id)

    async def get_items(self, limit: int | None = None) -> list[TResponseInputItem]:
        """The latest ``limit`` items (``None``: ``session_settings.limit``, else all), oldest
        first. One store call."""
        wanted = _limit("limit", limit)
        if wanted is None:  # the SDK's rule, with its session_settings checked again:
            # it is a public attribute, which may have been set to anything since
            wanted = _limit("session_settings.limit",
                            _session_settings(self.session_settings).limit)
        view = await self._log.read()
        if view is None or (wanted is not None and wanted <= 0):
            return []
        return self._latest(view.entries, wanted)

    async def add_items(self, items: Iterable[TResponseInputItem]) -> None:
        """Append ``items`` in order, atomically. A cancelled call has added all of them or
        none when the cancellation is raised; made again on this object with the same items,
        it adds them once.

        As with the SDK's own sessions, ``items`` may be any iterable of items (a tuple, a
        generator): it is read once, and every item is checked before anything is stored.
        A ``str``, ``bytes`` or a mapping (one item where a list belongs) is a
        :class:`ValidationError`; an error raised by a generator itself propagates as it is,
        with nothing stored."""
        batch = _items_arg(items)
        if not batch:
            return
        entries = [self._encode(item, index) for index, item in enumerate(batch)]
        async with self._turn:
            await self._log.settle(self._log.append(entries))

    async def pop_item(self) -> TResponseInputItem | None:
        """Remove and return the newest item; ``None`` when the session is empty. A call
        cancelled while the store removes the item raises the cancellation after the removal;
        the next ``pop_item`` of this object returns that item (nobody got it), unless the
        object reads or changes the session first."""
        while True:
            async with self._turn:
                entry = await self._log.settle(self._log.pop())
            if entry is None:
                return None
            item = self._decode(entry)
            if item is not None:
                return item

    async def clear_session(self) -> None:
        """Remove the session and all its items."""
        async with self._turn:
            await self._log.settle(self._log.clear())

    async def aclose(self) -> None:
        """Close the store if this session opened it (a URL, or :meth:`from_env`)."""
        if self._owns_store:
            self._owns_store = False
            await self._store.aclose()

    async def __aenter__(self) -> FastSession:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _latest(self, entries: list[bytes], wanted: int | None) -> list[TResponseInputItem]:
        # Newest first until enough readable items: a limit counts items, not damaged entries.
        items: list[TResponseInputItem] = []
        for entry in reversed(entries):
            if wanted is not None and len(items) >= wanted:
                break
            item = self._decode(entry)
            if item is not None:
                items.append(item)
        items.reverse()
        return items

    def _encode(self, item: object, index: int) -> bytes:
        if not isinstance(item, dict):
            raise SerializationError(
                f"session item {index} must be a dict, got {type(item).__name__}")
        try:
            data = _encoder.encode(item)
            same = _decoder.decode(data) == item
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise SerializationError(
                f"session item {index} is not JSON ({type(exc).__name__}: {exc}); nothing "
                "was added") from exc
        if not same:
            raise SerializationError(
                f"session item {index} would not come back as it is (JSON has no tuples, NaN, "
                f"infinities or non-str keys); nothing was added")
        return data

    def _decode(self, entry: bytes) -> TResponseInputItem | None:
        try:
            item = _decoder.decode(entry)
        except msgspec.DecodeError as exc:
            logger.warning("session %r: skipping an unreadable item: %s",
                           self.session_id[:80], exc)
            return None
        if not isinstance(item, dict):
            logger.warning("session %r: skipping an item that is not a dict",
                           self.session_id[:80])
            return None
        return cast(TResponseInputItem, item)


class RunStateStore:
    """Interrupted Agents SDK runs, kept in fastcheckpoint's approval queue.

    ``store``: a store or store URL (opened here, closed by :meth:`aclose`), or a
    ``CheckpointManager`` to share. ``ttl_seconds``: each recorded state expires that long
    after it is recorded (``None``: the manager's default). The run id is yours: it is what
    ``fastcheckpoint approve RUN`` takes.

    ::

        result = await Runner.run(agent, "Refund order A-17")
        await approvals.record("order-a17", result)      # PAUSED, waiting for a person
        # fastcheckpoint approve order-a17 --approver ana  (or reject ... --reason "...")
        state = await approvals.resume("order-a17", agent)  # None while still waiting
        result = await Runner.run(agent, state)
        await approvals.record("order-a17", result)      # COMPLETED (or PAUSED again)
    """

    def __init__(
        self,
        store: CheckpointStore | str | CheckpointManager,
        *,
        ttl_seconds: float | None = None,
        config: CheckpointConfig | None = None,
    ) -> None:
        if isinstance(store, CheckpointManager):
            if config is not None:
                raise ConfigurationError("pass config to the CheckpointManager, not here")
            self._manager, self._owns_store = store, False
        else:
            settings = adapter_config(config)
            opened = capable_store(store, settings.retry, "RunStateStore", ())
            self._owns_store = isinstance(store, str)
            self._manager = CheckpointManager(opened, settings)
        self._ttl = (None if ttl_seconds is None
                     else adapter_ttl(ttl_seconds, self._manager.store))

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, ttl_seconds: float | None = None
    ) -> RunStateStore:
        """On the store and settings ``CheckpointManager.from_env`` reads; owns the store."""
        approvals = cls(CheckpointManager.from_env(environ),
                        ttl_seconds=ttl_seconds)
        approvals._owns_store = True
        return approvals

    @property
    def manager(self) -> CheckpointManager:
        """The manager over the store: ``get_run``, ``list_runs``, ``approve``, ``reject``."""
        return self._manager

    async def aclose(self) -> None:
        """Close the store if this object opened it."""
        if self._owns_store:
            self._owns_store = False
            await self._manager.aclose()

    async def __aenter__(self) -> RunStateStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def record(
        self,
        run_id: str,
        result: RunResult | RunResultStreaming | RunState[Any, Any],
        *,
        context_serializer: Any = None,
    ) -> RunInfo:
        """Checkpoint ``result``'s state; PAUSED with its pending tool calls as the approval
        request if it was interrupted, else COMPLETED (with ``final_output`` in the
        checkpoint).

        A new run, an ACTIVE one (after :meth:`resume`) and a FAILED one may be recorded.
        :class:`ConflictError`, with nothing written, if the run waits for a decision or is
        finished (COMPLETED, or REJECTED and not resumed), unless this very state is the
        one recorded last: a call made again after its reply was lost returns the run as it
        is. ``context_serializer`` goes to ``RunState.to_json`` (for a context that is not a
        mapping). :class:`ValidationError` if ``result`` is none of the SDK's results or
        states.
        """
        run_id = _plain(run_id)
        state = _state_of(result)
        pending = state.get_interruptions()
        body: dict[str, Any] = {"framework": FRAMEWORK,
                                "run_state": _state_json(state, context_serializer)}
        if not pending and not isinstance(result, RunState):
            body["final_output"] = _output_text(result.final_output)
        run = await self._manager.get_run(run_id)
        if run is not None and await self._recorded_already(run, body):
            return run
        try:
            # Only over the state read: a record that lost the run to another one writes
            # nothing (its write could prune the state the winner's request names).
            checkpoint = await self._manager.create(
                run_id, body, step_name="interrupted" if pending else "finished",
                ttl_seconds=self._ttl, force=True,
                expected_sequence=0 if run is None else run.latest_sequence + 1)
        except ConflictError:
            now = await self._manager.get_run(run_id)
            if now is not None and await self._recorded_already(now, body):
                return now  # this very state, recorded by a call whose reply was lost
            raise
        assert checkpoint is not None  # forced: never throttled
        checkpoint_id = checkpoint.checkpoint_id
        try:
            if pending:
                return await self._pause(run_id, checkpoint_id, pending)
            return await self._complete(run_id, checkpoint_id)
        except CheckpointError:
            # Refused (the run changed status since it was read) or failed: the checkpoint
            # must not stay as the run's latest state, unless the change was stored after all.
            await self._withdraw(run_id, checkpoint_id)
            raise

    async def resume(
        self,
        run_id: str,
        agent: Agent[Any],
        *,
        context_override: Any = None,
        context_deserializer: Any = None,
    ) -> RunState[Any, Agent[Any]] | None:
        """The recorded state with the decision applied to each pending tool call, ready for
        ``Runner.run(agent, state)``; ``None`` while the run still waits for a decision.

        Approved: every pending call is approved. Rejected: every one is rejected, and the
        reviewer's ``reason`` (when given) is what the model is told. The decision is claimed
        once: a second ``resume`` of it raises :class:`ConflictError` (after :meth:`fail`, it
        may be resumed again). :class:`CheckpointNotFound` if there is no such run.
        ``context_override`` and ``context_deserializer`` go to ``RunState.from_json``.
        """
        run_id = _plain(run_id)
        run = await self._manager.get_run(run_id)
        if run is None:
            raise CheckpointNotFound(f"no run {run_id!r}")
        if run.status is CheckpointStatus.PAUSED:
            return None
        approval = _decided(run)
        state = await self._load(run_id, approval, agent, context_override, context_deserializer)
        await self._claim(run_id, approval)
        reason = approval.get("reason") or None
        for item in state.get_interruptions():
            if approval["decision"] == "approved":
                state.approve(item)
            else:
                state.reject(item, rejection_message=reason)
        return state

    async def fail(self, run_id: str, error: str = "") -> RunInfo | None:
        """FAILED with ``error`` (from ACTIVE or PAUSED, like ``mark_failed``): for a resumed
        run that could not finish, whose decision may then be resumed again. ``None`` if
        there is no such run."""
        run_id, error = _plain(run_id), text_arg("error", error)

        def release(data: RunData, now: float) -> None:
            data.error = error
            if data.approval is not None:
                data.approval.pop("resumed_at", None)

        return await self._manager._transition(
            run_id, CheckpointStatus.FAILED,
            allowed={CheckpointStatus.ACTIVE, CheckpointStatus.PAUSED},
            note=error, update=release)

    async def _recorded_already(self, run: RunInfo, body: dict[str, Any]) -> bool:
        """Whether ``run`` holds ``body`` as recorded last (a retried record); ConflictError
        if it may not be recorded now."""
        taking = run.status in (CheckpointStatus.ACTIVE, CheckpointStatus.FAILED)
        if taking and not _untaken(run.approval):
            return False
        if run.status is CheckpointStatus.PAUSED or taking:
            named = ((run.approval or {}).get("request") or {}).get("checkpoint_id")
            recorded = (await self._manager.restore_from(named)
                        if isinstance(named, str) else None)
            why = ("waits for a decision (approve or reject it, then resume it)" if not taking
                   else f"has a decision ({(run.approval or {}).get('decision')}) not yet "
                   f"resumed; resume it before recording it")
        elif run.status is CheckpointStatus.COMPLETED:
            recorded = await self._manager.restore(run.run_id)
            why = "is completed; record another run under a new run id"
        else:
            recorded = None
            why = f"is {run.status.value}; resume its decision before recording it"
        if recorded is not None and _same_json(recorded.state, body):
            return True
        raise ConflictError(f"run {run.run_id!r} {why}; nothing was recorded")

    async def _fail_again(self, run: RunInfo, checkpoint_id: str) -> None:
        """Undo the resume of a FAILED run by the create of a withdrawn checkpoint, only while
        nothing else happened to the run since it was read: the withdrawn checkpoint was its
        latest, no status change followed the resume, no checkpoint was added."""
        history = run.history
        parsed = _ids.parse_checkpoint_id(checkpoint_id)
        if run.status is not CheckpointStatus.ACTIVE or not history or parsed is None or (
                history[-1].note != resumed_note(checkpoint_id)
                or parsed[2] != run.latest_sequence):
            return
        failed = next((change for change in reversed(history[:-1])
                       if change.status is CheckpointStatus.FAILED), None)
        error = "" if failed is None else failed.note
        changes = len(history)

        def restore(data: RunData, now: float) -> None:
            data.error = error

        # A run that moved on meanwhile (paused, completed) is not ours to fail.
        with contextlib.suppress(ConflictError):
            await self._manager._transition(
                run.run_id, CheckpointStatus.FAILED, allowed={CheckpointStatus.ACTIVE},
                note=error, update=restore, made=lambda data: len(data.history) != changes,
                still=lambda record: record.latest_sequence == run.latest_sequence)

    async def _pause(
        self, run_id: str, checkpoint_id: str, pending: list[ToolApprovalItem]
    ) -> RunInfo:
        # The tool calls first: the queue (``fastcheckpoint runs --status paused``) shows the
        # request's beginning.
        asked = request_arg({"tool_calls": [_described(item) for item in pending],
                             "checkpoint_id": checkpoint_id, "framework": FRAMEWORK})

        def ask(data: RunData, now: float) -> None:
            data.approval = {"request": asked, "requested_at": now}

        return _found(await self._manager._transition(
            run_id, CheckpointStatus.PAUSED, allowed={CheckpointStatus.ACTIVE},
            note=to_json_text(asked), update=ask, guard=_no_untaken_decision(run_id),
            must_exist=True, made=lambda data: _requested(data.approval, checkpoint_id),
            refusal="is {status} since it was read; nothing was recorded"))

    async def _complete(self, run_id: str, checkpoint_id: str) -> RunInfo:
        note = _finished_note(checkpoint_id)
        run = _found(await self._manager._transition(
            run_id, CheckpointStatus.COMPLETED, allowed={CheckpointStatus.ACTIVE},
            note=note, guard=_no_untaken_decision(run_id), must_exist=True,
            refusal="is {status} since it was read; nothing was recorded"))
        if not _finished_by(run, checkpoint_id):
            raise ConflictError(
                f"run {run_id!r} was completed by another record meanwhile; nothing was "
                f"recorded")
        return run

    async def _withdraw(self, run_id: str, checkpoint_id: str) -> None:
        """Delete the checkpoint of a record whose status change failed, unless the run names
        it (the change was stored and its reply lost: a retry of the record returns the run).
        A run the checkpoint's create resumed from FAILED (another worker failed it after the
        record read it) is FAILED again, with its error."""
        try:
            run = await self._manager.get_run(run_id)
            if run is not None and (_requested(run.approval, checkpoint_id)
                                    or _finished_by(run, checkpoint_id)):
                return
            await self._manager.delete(checkpoint_id)
            if run is not None:
                await self._fail_again(run, checkpoint_id)
        except CheckpointError:
            logger.warning("run %r: the failed record left its checkpoint %s", run_id[:80],
                           checkpoint_id, exc_info=True)

    async def _load(
        self,
        run_id: str,
        approval: dict[str, Any],
        agent: Agent[Any],
        context_override: Any,
        context_deserializer: Any,
    ) -> RunState[Any, Agent[Any]]:
        request = approval.get("request") or {}
        checkpoint_id = request.get("checkpoint_id")
        checkpoint = (await self._manager.restore_from(checkpoint_id)
                      if isinstance(checkpoint_id, str) else None)
        if checkpoint is None:
            raise CheckpointNotFound(
                f"run {run_id!r}: the state its approval request names is gone "
                f"({checkpoint_id!r:.60})")
        data = checkpoint.state.get("run_state")
        if not isinstance(data, dict):
            raise CorruptCheckpointError("not a recorded Agents SDK run state",
                                         key=checkpoint.checkpoint_id)
        try:
            return await RunState.from_json(
                agent, data, context_override=context_override,
                context_deserializer=context_deserializer)
        except Exception as exc:
            raise SerializationError(
                f"run {run_id!r}: cannot rebuild its RunState with agent {agent.name!r}: "
                f"{exc}") from exc

    async def _claim(self, run_id: str, approval: dict[str, Any]) -> None:
        requested_at = approval.get("requested_at")

        def unclaimed(data: RunData) -> None:
            current = data.approval or {}
            if current.get("requested_at") != requested_at or "decision" not in current:
                raise ConflictError(f"run {run_id!r} changed since it was read; resume again")
            if "resumed_at" in current:
                raise ConflictError(f"run {run_id!r}: its decision was resumed already")

        def claim(data: RunData, now: float) -> None:
            data.approval = {**(data.approval or {}), "resumed_at": now}

        await self._manager._transition(
            run_id, CheckpointStatus.ACTIVE,
            allowed={CheckpointStatus.ACTIVE, CheckpointStatus.REJECTED,
                     CheckpointStatus.FAILED},
            note=f"resumed after the request was {approval['decision']}",
            update=claim, guard=unclaimed, must_exist=True)


# -- helpers -------------------------------------------------------------------------------------


def _plain(run_id: object) -> str:
    """A run id as a plain ``str`` (the manager checks it): a subclass's own methods never
    run in the library."""
    return plain_str(run_id) if isinstance(run_id, str) else cast(str, run_id)


def _ttl(ttl_seconds: object, config: CheckpointConfig, store: CheckpointStore) -> float | None:
    if ttl_seconds is None and config.default_ttl_seconds is not None:
        return config.default_ttl_seconds
    return adapter_ttl(ttl_seconds, store)


def _items_arg(items: object) -> list[object]:
    """``items`` read into a list, once (a generator cannot be read twice)."""
    if isinstance(items, (str, bytes, bytearray, Mapping)):
        raise ValidationError(f"items must be a list of items, got one {type(items).__name__}: "
                              "pass [item]")
    try:
        iterator = iter(items)  # type: ignore[call-overload]
    except TypeError:
        raise ValidationError(
            f"items must be a list (or another iterable) of items, got {type(items).__name__}"
        ) from None
    return list(iterator)


def _limit(name: str, limit: object) -> int | None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
        raise ValidationError(f"{name} must be an int or None, got {type(limit).__name__}")
    return limit


def _session_settings(value: object) -> SessionSettings:
    if value is None:
        return SessionSettings()
    if isinstance(value, SessionSettings):
        return value
    if isinstance(value, Mapping):
        try:
            return coerce_session_settings(dict(value))
        except Exception as exc:
            raise ConfigurationError(f"invalid session_settings: {exc}") from exc
    raise ConfigurationError(
        f"session_settings must be a SessionSettings or a dict, got {type(value).__name__}")


def _state_of(result: object) -> RunState[Any, Any]:
    if isinstance(result, RunState):
        return result
    if isinstance(result, (RunResult, RunResultStreaming)):
        return result.to_state()
    raise ValidationError(
        f"result must be a RunResult, RunResultStreaming or RunState, got "
        f"{type(result).__name__}")


def _state_json(state: RunState[Any, Any], context_serializer: Any) -> dict[str, Any]:
    try:
        data: dict[str, Any] = state.to_json(context_serializer=context_serializer)
    except Exception as exc:
        raise SerializationError(f"cannot serialize the RunState: {exc}") from exc
    return data


def _output_text(output: object) -> str | None:
    if output is None or isinstance(output, str):
        return output
    dump = getattr(output, "model_dump_json", None)
    return dump() if callable(dump) else repr(output)


def _described(item: ToolApprovalItem) -> dict[str, Any]:
    """One pending tool call as a reviewer reads it: the arguments as JSON when they are."""
    return {"tool": item.qualified_name, "arguments": _arguments(item.arguments),
            "call_id": item.call_id, "agent": item.agent.name}


def _arguments(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return request_arg({"arguments": _decoder.decode(text)})["arguments"]
    except (msgspec.DecodeError, ValidationError):
        return text  # not JSON: the reviewer sees the text


def _same_json(stored: Mapping[str, Any], body: dict[str, Any]) -> bool:
    """Whether ``body`` is what ``stored`` holds, compared as JSON (tuples are lists)."""
    try:
        return bool(_decoder.decode(_encoder.encode(body))
                    == _decoder.decode(_encoder.encode(stored)))
    except (TypeError, ValueError, OverflowError, RecursionError):
        return False


def _untaken(approval: Mapping[str, Any] | None) -> bool:
    """Whether ``approval`` holds a decision that no :meth:`RunStateStore.resume` took."""
    approval = approval or {}
    return approval.get("decision") in ("approved", "rejected") and "resumed_at" not in approval


def _no_untaken_decision(run_id: str) -> Callable[[RunData], None]:
    """A status change's guard: a decision made since the run was read is never replaced
    (the record is refused, and withdraws its checkpoint)."""

    def guard(data: RunData) -> None:
        if _untaken(data.approval):
            raise ConflictError(
                f"run {run_id!r} was decided since it was read; resume its decision before "
                f"recording it; nothing was recorded")

    return guard


def _requested(approval: Mapping[str, Any] | None, checkpoint_id: str) -> bool:
    """Whether ``approval`` is the request a record made for ``checkpoint_id``."""
    request = (approval or {}).get("request")
    return isinstance(request, Mapping) and request.get("checkpoint_id") == checkpoint_id


def _finished_note(checkpoint_id: str) -> str:
    return f"finished: checkpoint {checkpoint_id}"


def _finished_by(run: RunInfo, checkpoint_id: str) -> bool:
    """Whether the record of ``checkpoint_id`` completed ``run``."""
    note = _finished_note(checkpoint_id)
    return any(change.status is CheckpointStatus.COMPLETED and change.note == note
               for change in run.history)


def _found(run: RunInfo | None) -> RunInfo:
    # A status change that must find the run raises CheckpointNotFound instead of None.
    assert run is not None
    return run


def _decided(run: RunInfo) -> dict[str, Any]:
    approval = run.approval or {}
    if approval.get("decision") not in ("approved", "rejected"):
        raise ConflictError(
            f"run {run.run_id!r} has no decision to resume (it is {run.status.value}); "
            f"record an interrupted result first")
    if "resumed_at" in approval:
        raise ConflictError(f"run {run.run_id!r}: its decision was resumed already")
    return approval
