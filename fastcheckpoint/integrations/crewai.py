"""CrewAI flows: flow state and pending human feedback on any fastcheckpoint store.

``FastFlowPersistence`` is a ``crewai.flow.persistence.FlowPersistence``: pass it to
``@persist(...)`` or ``Flow(persistence=...)``. A flow is one fastcheckpoint run whose run id
is the flow's id (``state.id``), so ``fastcheckpoint show <flow id>``, ``history`` and
``export`` read it. Each ``save_state`` is one checkpoint named after the method that
finished; ``load_state`` restores the newest live one.

A flow that pauses for human feedback (``@human_feedback`` with a provider that raises
``HumanFeedbackPending``) is PAUSED in the approval queue, with the feedback request as its
approval request: ``fastcheckpoint runs --status paused`` lists it, and ``approve`` or
``reject`` decide it. ``Flow.from_pending(flow_id, persistence)`` loads it back (before or
after a decision) until the resumed flow has gone on; :meth:`FastFlowPersistence.feedback`
turns a reviewer's decision into the text for ``Flow.resume``. A flow resumed without a
reviewer (``flow.resume(text)`` from your own handler) leaves the queue approved by
``crewai``.

Every call blocks on :class:`fastcheckpoint.blocking.BlockingManager`. Costs in store calls:
``save_state`` 1 (2 the first time this object writes a flow, or after another process
did), ``load_state`` 1, ``save_pending_feedback`` 4 (the run read, the checkpoint, then the
status change: read and update; 5 on a store without ``SupportsSequenceGuard``, where the run
is read once more just before the pause), ``load_pending_feedback`` 2,
``clear_pending_feedback`` 1, plus 2 when the run is still PAUSED and 2 when the resumed
method saved no checkpoint of its own.

Needs ``pip install 'fastcheckpoint[crewai]'``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import date
from typing import Any, NoReturn, cast

from fastcheckpoint._codec import json_copy
from fastcheckpoint._config import CheckpointConfig, environment
from fastcheckpoint._ids import plain_str
from fastcheckpoint._manager import CheckpointManager
from fastcheckpoint._model import CheckpointStatus, RunInfo
from fastcheckpoint.blocking import BlockingManager
from fastcheckpoint.errors import (
    CheckpointNotFound,
    ConfigurationError,
    ConflictError,
    CorruptCheckpointError,
    SerializationError,
    ValidationError,
)
from fastcheckpoint.integrations._adapter import (
    checked_keep_latest,
    checked_ttl,
)
from fastcheckpoint.stores import CheckpointStore, offers_sequence_guard

try:
    from crewai.flow.async_feedback.types import (  # type: ignore[import-not-found, unused-ignore]
        PendingFeedbackContext,
    )
    from crewai.flow.persistence.base import (  # type: ignore[import-not-found, unused-ignore]
        FlowPersistence,
    )
    from pydantic import BaseModel, Field, PrivateAttr
    from pydantic import ValidationError as PydanticValidationError
    from pydantic_core import PydanticSerializationError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ConfigurationError(
        "fastcheckpoint.integrations.crewai needs CrewAI: "
        "pip install 'fastcheckpoint[crewai]'") from exc

__all__ = [
    "ANSWERED_TAG", "FRAMEWORK", "REQUESTED_TAG", "FastFlowPersistence",
    "FeedbackRequestOvertaken",
]

FRAMEWORK = "crewai"
"""``framework`` of the approval requests this module makes, and the approver it records
when a flow is resumed without a reviewer."""
REQUESTED_TAG = "crewai:feedback-requested"
"""Tag of the checkpoint saved with a feedback request (the state the flow resumes from)."""
ANSWERED_TAG = "crewai:feedback-answered"
"""Tag of the checkpoint that ends a request when the resumed method saved none."""
_ANSWERED_COMMENT = "feedback given through Flow.resume"
_SUPERSEDED_COMMENT = "superseded by a newer feedback request of the flow"


class FeedbackRequestOvertaken(ConflictError):
    """``save_pending_feedback`` found the flow gone past its request: another worker of the
    flow saved a newer state between the request's checkpoint and the pause. The request was
    not queued, and the run is as that worker left it (its checkpoint the newest, the run
    not paused for this request): the flow goes on from the newer state. An older request
    that was waiting stays waiting, unless the newer state was saved after this call had
    superseded it: then it stays approved as superseded (the flow went past it too)."""


class FastFlowPersistence(FlowPersistence):  # type: ignore[misc, unused-ignore]
    """CrewAI flow persistence on a fastcheckpoint store (or a store URL).

    ``ttl_seconds``: every checkpoint expires that long after it is saved, and a flow with
    it (``None``: the config's ``default_ttl_seconds``, else the store's default, else
    never). ``keep_latest``: each flow keeps its newest N checkpoints (``None`` keeps all).
    ``config``: clock, retry policy and the other manager settings.

    Built from a URL, the persistence serializes as that URL (CrewAI's flow definitions
    rebuild it from ``{"persistence_type": "FastFlowPersistence", "url": ...}``); rebuilt
    without one, it opens the store ``FASTCHECKPOINT_URL`` names. :meth:`close` closes the
    store (a store closes only what it created).

    Errors are :class:`~fastcheckpoint.CheckpointError` subclasses; a state that is neither
    a dict nor a pydantic model is a :class:`~fastcheckpoint.ValidationError`, which is a
    ``ValueError`` as CrewAI's own backends raise. Inside a flow CrewAI wraps a failed
    ``save_state`` in its ``RuntimeError``.
    """

    persistence_type: str = Field(default="FastFlowPersistence")
    url: str | None = Field(default=None, repr=False,
                            description="the store URL, when built from one")
    ttl_seconds: float | None = Field(default=None)
    keep_latest: int | None = Field(default=None)
    _blocking: BlockingManager | None = PrivateAttr(default=None)
    _config: CheckpointConfig | None = PrivateAttr(default=None)
    _closed: bool = PrivateAttr(default=False)

    def __init__(
        self,
        store: CheckpointStore | str | None = None,
        /,
        *,
        ttl_seconds: float | None = None,
        keep_latest: int | None = None,
        config: CheckpointConfig | None = None,
        **fields: Any,
    ) -> None:
        checked_ttl(ttl_seconds)
        checked_keep_latest(keep_latest)
        if config is not None and not isinstance(config, CheckpointConfig):
            raise ConfigurationError(
                f"config must be a CheckpointConfig, got {type(config).__name__}")
        if isinstance(store, str):
            fields["url"] = store
        try:
            super().__init__(ttl_seconds=ttl_seconds, keep_latest=keep_latest, **fields)
        except PydanticValidationError as exc:
            raise ConfigurationError(f"invalid FastFlowPersistence settings: {exc}") from exc
        self._config = config
        if store is None or isinstance(store, str):
            self.init_db()
        else:
            self._blocking = BlockingManager(
                store, config=self._settings(config or CheckpointConfig()), own_loop=True)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> FastFlowPersistence:
        """The store and settings ``CheckpointManager.from_env`` reads: ``FASTCHECKPOINT_URL``
        (or ``CHECKPOINT_MODE``), ``CHECKPOINT_TTL_DAYS`` or
        ``FASTCHECKPOINT_DEFAULT_TTL_SECONDS`` for ``ttl_seconds``, and
        ``FASTCHECKPOINT_MAX_CHECKPOINTS_PER_RUN`` for ``keep_latest`` (only when set: a
        flow keeps its whole history by default)."""
        env = environment(environ)
        manager = CheckpointManager.from_env(env)
        keep = (manager.config.keep_latest
                if "FASTCHECKPOINT_MAX_CHECKPOINTS_PER_RUN" in env else None)
        return cls(manager.store, ttl_seconds=manager.config.default_ttl_seconds,
                   keep_latest=keep, config=manager.config)

    @property
    def manager(self) -> BlockingManager:
        """The blocking manager over the store: ``get_run``, ``list_runs``, ``approve``,
        ``reject``, ``export_run``."""
        return self._opened()

    def close(self) -> None:
        """Close the store and stop the manager's loop thread; later calls raise
        :class:`ConfigurationError`. Safe to call twice."""
        self._closed = True
        blocking, self._blocking = self._blocking, None
        if blocking is not None:
            blocking.close()

    def __deepcopy__(self, memo: dict[int, Any]) -> FastFlowPersistence:
        # A handle on a store, like a connection: copies of a flow share it.
        return self

    # -- FlowPersistence ------------------------------------------------------------------

    def init_db(self) -> None:
        """Open the store: the URL given, else the one ``FASTCHECKPOINT_URL`` names. Nothing
        is created here; provision a store with ``fastcheckpoint init URL``."""
        self._opened()

    def save_state(
        self, flow_uuid: str, method_name: str, state_data: dict[str, Any] | BaseModel
    ) -> None:
        """One checkpoint of the flow's run, named after the method that finished."""
        self._opened().create(_plain(flow_uuid), _state_dict(state_data),
                              step_name=_plain(method_name), force=True)

    def load_state(self, flow_uuid: str) -> dict[str, Any] | None:
        """The state of the flow's newest live checkpoint, or ``None``."""
        checkpoint = self._opened().restore(flow_uuid)
        return None if checkpoint is None else checkpoint.state

    def save_pending_feedback(
        self,
        flow_uuid: str,
        context: PendingFeedbackContext,
        state_data: dict[str, Any] | BaseModel,
    ) -> None:
        """Checkpoint the state, then PAUSE the run with the feedback request (the context
        as JSON, with the checkpoint's id) as its approval request.

        A request still waiting is superseded (approved by ``crewai``, then paused again).
        :class:`ConflictError` if the run was rejected: a rejection ends the run in the
        approval queue, so the flow cannot wait there again. The run is read first, so such
        a refusal comes before anything is written.

        The pause applies only while the request's checkpoint is the run's newest (decided by
        the store with the status change, where the store offers it:
        :class:`~fastcheckpoint.stores.SupportsSequenceGuard`). Should another worker of the
        flow save a state in between, the flow went past the request:
        :class:`FeedbackRequestOvertaken`, and the run is left as that worker left it.
        """
        blocking = self._opened()
        flow_uuid = _plain(flow_uuid)
        request = _request_of(context)
        state = _state_dict(state_data)
        _check_pausable(flow_uuid, blocking.get_run(flow_uuid))
        checkpoint = blocking.create(flow_uuid, state, step_name=_plain(context.method_name),
                                     tags=[REQUESTED_TAG], force=True)
        assert checkpoint is not None  # forced: never throttled
        request.update(framework=FRAMEWORK, checkpoint_id=checkpoint.checkpoint_id,
                       sequence=checkpoint.metadata.sequence)
        self._pause(flow_uuid, request)

    def load_pending_feedback(
        self, flow_uuid: str
    ) -> tuple[dict[str, Any], PendingFeedbackContext] | None:
        """The state saved with the flow's feedback request and its context, while the
        request waits or is decided but the resumed flow has not gone on; else ``None``."""
        blocking = self._opened()
        run = blocking.get_run(flow_uuid)
        request = _pending_request(run)
        if request is None:
            return None
        checkpoint = blocking.restore_from(request["checkpoint_id"])
        if checkpoint is None:
            raise CheckpointNotFound(
                f"flow {flow_uuid!r}: the state saved with its feedback request is gone")
        try:
            context = PendingFeedbackContext.from_dict(_context_dict(request))
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(f"not a CrewAI feedback request: {exc}",
                                         key=f"run {flow_uuid!r}") from exc
        return checkpoint.state, context

    def clear_pending_feedback(self, flow_uuid: str) -> None:
        """End the flow's feedback request: a run still PAUSED is approved by ``crewai``, and
        a checkpoint tagged ``crewai:feedback-answered`` marks the request answered when the
        resumed method saved none."""
        blocking = self._opened()
        run = blocking.get_run(flow_uuid)
        request = _crewai_request(run)
        if run is None or request is None:
            return
        _pending_request(run)  # one naming no checkpoint is corrupt: refused before a change
        if run.status is CheckpointStatus.PAUSED:
            run = self._answered(flow_uuid, run)
        pending = _pending_request(run)
        if pending is None:
            return
        checkpoint = blocking.restore_from(pending["checkpoint_id"])
        if checkpoint is not None:
            blocking.create(flow_uuid, checkpoint.state, step_name=checkpoint.metadata.step_name,
                            tags=[ANSWERED_TAG], force=True)

    # -- reviewers ------------------------------------------------------------------------

    def feedback(self, flow_uuid: str) -> str | None:
        """A reviewer's decision on the flow's pending request, as the text to pass to
        ``Flow.resume``: ``"approved"`` or ``"rejected"``, followed by ``": "`` and the
        comment or reason when one was given. ``None`` while the request waits for a
        decision, or when the flow has no pending request. This adapter's own approval (the
        flow was resumed with its feedback, and clearing the request did not finish) is no
        reviewer's decision: ``None`` too."""
        run = self._opened().get_run(flow_uuid)
        if run is None or _pending_request(run) is None:
            return None
        approval = run.approval or {}
        decision = approval.get("decision")
        if decision not in ("approved", "rejected") or approval.get("decided_by") == FRAMEWORK:
            return None
        note = approval.get("comment" if decision == "approved" else "reason") or ""
        return f"{decision}: {note}" if note else str(decision)

    # -- internals ------------------------------------------------------------------------

    def _opened(self) -> BlockingManager:
        if self._closed:
            raise ConfigurationError("this FastFlowPersistence is closed")
        if self._blocking is None:
            if self.url is None:
                manager = CheckpointManager.from_env()
                self._blocking = BlockingManager(
                    manager.store, config=self._settings(manager.config), own_loop=True)
            else:
                self._blocking = BlockingManager(
                    self.url, config=self._settings(self._config or CheckpointConfig()),
                    own_loop=True)
        return self._blocking

    def _settings(self, base: CheckpointConfig) -> CheckpointConfig:
        """``base`` with this object's TTL (when set) and pruning limit."""
        ttl = checked_ttl(self.ttl_seconds)
        return dataclasses.replace(
            base,
            default_ttl_seconds=base.default_ttl_seconds if ttl is None else ttl,
            max_checkpoints_per_run=checked_keep_latest(self.keep_latest))

    def _pause(self, flow_uuid: str, request: dict[str, Any]) -> None:
        """Pause the run with ``request`` while its checkpoint is the run's newest: a request
        still waiting is superseded first; one the flow went past is never queued."""
        blocking = self._opened()
        for _ in range(_SUPERSEDE_ATTEMPTS):
            try:
                self._pause_on_newest(flow_uuid, request)
                return
            except ConflictError as exc:
                waiting = blocking.get_run(flow_uuid)
                if waiting is None:
                    _refuse(flow_uuid, "gone", exc)
                _check_pausable(flow_uuid, waiting, exc)
                if waiting.status is CheckpointStatus.PAUSED:
                    _check_not_newer(flow_uuid, waiting, request, exc)
                _check_not_overtaken(flow_uuid, waiting, request, exc)
                if waiting.status is not CheckpointStatus.PAUSED:
                    raise  # active at our checkpoint: the change kept losing races
            # The request waiting is older than ours, which the flow has not gone past.
            try:
                blocking.approve(flow_uuid, approver=FRAMEWORK, comment=_SUPERSEDED_COMMENT,
                                 requested_at=(waiting.approval or {}).get("requested_at"))
            except ConflictError:
                continue  # a reviewer decided it meanwhile: look at the run again
            try:
                self._pause_on_newest(flow_uuid, request)
            except ConflictError as exc:
                # A state saved between the approval and the pause: the superseded request
                # stays approved (the flow went past it too), ours is not queued.
                _check_not_overtaken(flow_uuid, blocking.get_run(flow_uuid), request, exc)
                raise
            return
        raise ConflictError(
            f"flow {flow_uuid!r}: its waiting feedback requests kept being decided or "
            f"replaced while this one superseded them ({_SUPERSEDE_ATTEMPTS} tries); nothing "
            "of this request is pending (ask again)")

    def _pause_on_newest(self, flow_uuid: str, request: dict[str, Any]) -> None:
        """``pause``, on the condition that the request's checkpoint is still the run's
        newest where the store can decide that with the pause; elsewhere unconditioned (the
        run is read just before, which leaves a short window)."""
        blocking = self._opened()
        if offers_sequence_guard(blocking.store):
            blocking.pause(flow_uuid, request, latest_sequence=request["sequence"])
            return
        _check_not_overtaken(flow_uuid, blocking.get_run(flow_uuid), request)
        blocking.pause(flow_uuid, request)

    def _answered(self, flow_uuid: str, run: RunInfo) -> RunInfo:
        """The run after approving its waiting request for the flow that was resumed; a
        reviewer who decided meanwhile wins."""
        blocking = self._opened()
        try:
            return blocking.approve(flow_uuid, approver=FRAMEWORK, comment=_ANSWERED_COMMENT,
                                    requested_at=(run.approval or {}).get("requested_at"))
        except ConflictError:
            now = blocking.get_run(flow_uuid)
            if now is None or now.status is CheckpointStatus.PAUSED:
                raise
            return now


_SUPERSEDE_ATTEMPTS = 8
"""How often a feedback request looks at the run again when the waiting request it was
superseding was decided (or replaced) meanwhile."""

_PAUSABLE = frozenset({CheckpointStatus.ACTIVE, CheckpointStatus.FAILED})
"""Statuses a run can be paused from after a checkpoint (which makes a FAILED run active)."""


def _check_pausable(flow_uuid: str, run: RunInfo | None, cause: Exception | None = None) -> None:
    """:class:`ConflictError` unless the flow's run (``None``: not started) can wait for a
    new feedback request: it is active, or it waits for an earlier request of the flow."""
    if run is None or run.status in _PAUSABLE:
        return
    if run.status is CheckpointStatus.PAUSED and _crewai_request(run) is not None:
        return
    _refuse(flow_uuid, run.status.value, cause)


def _refuse(flow_uuid: str, status: str, cause: Exception | None) -> NoReturn:
    raise ConflictError(
        f"flow {flow_uuid!r} cannot wait for feedback in the approval queue: its run is "
        f"{status}, and only an active run (or one waiting for an earlier request of the "
        "flow) can be paused; a rejected run is finished there") from cause


def _check_not_newer(
    flow_uuid: str, waiting: RunInfo, request: dict[str, Any], cause: Exception
) -> None:
    """:class:`ConflictError` if the request waiting was saved after ``request`` (another
    worker of the flow paused it meanwhile): superseding it would queue a request the flow
    has gone past, and drop the newer one."""
    queued = (_crewai_request(waiting) or {}).get("sequence")
    ours = request["sequence"]
    if isinstance(queued, int) and queued > ours:
        raise ConflictError(
            f"flow {flow_uuid!r}: a newer feedback request of the flow (saved with checkpoint "
            f"{queued}) waits in the approval queue; this one (checkpoint {ours}) was not "
            "queued") from cause


def _check_not_overtaken(
    flow_uuid: str, run: RunInfo | None, request: dict[str, Any], cause: Exception | None = None
) -> None:
    """:class:`FeedbackRequestOvertaken` if the run's newest checkpoint is not the one saved
    with ``request``: another worker of the flow saved a newer state meanwhile."""
    if run is not None and run.latest_sequence != request["sequence"]:
        raise FeedbackRequestOvertaken(
            f"flow {flow_uuid!r} went past its feedback request: the request was saved with "
            f"checkpoint {request['sequence']}, and another worker of the flow saved a newer "
            f"state (checkpoint {run.latest_sequence}) before the run was paused; the request "
            "was not queued, and the flow goes on from the newer state") from cause


def _crewai_request(run: RunInfo | None) -> dict[str, Any] | None:
    """The run's latest approval request, if this module made it."""
    request = None if run is None or run.approval is None else run.approval.get("request")
    if isinstance(request, dict) and request.get("framework") == FRAMEWORK:
        return request
    return None


def _pending_request(run: RunInfo | None) -> dict[str, Any] | None:
    """The run's feedback request while the flow has not gone on past it: no checkpoint
    came after the one saved with it."""
    request = _crewai_request(run)
    if run is None or request is None or run.latest_sequence != request.get("sequence"):
        return None
    if not isinstance(request.get("checkpoint_id"), str):
        raise CorruptCheckpointError("a CrewAI feedback request without its checkpoint id",
                                     key=f"run {run.run_id!r}")
    return request


def _plain(text: object) -> str:
    """A ``str`` argument as plain text (the manager checks it): a subclass's own methods
    never run in the library, and the encoder takes only plain ``str``."""
    return plain_str(text) if isinstance(text, str) else cast(str, text)


def _state_dict(state_data: object) -> dict[str, Any]:
    """The state as CrewAI's backends store it: a model as its JSON dump, a dict as is."""
    if isinstance(state_data, BaseModel):
        try:
            try:
                return state_data.model_dump(mode="json")
            except (PydanticSerializationError, ValueError):
                # as CrewAI's SQLite backend falls back; ValueError: bytes that are not
                # UTF-8 (UnicodeDecodeError), which the Python dump keeps as bytes
                return state_data.model_dump()
        except (PydanticSerializationError, ValueError, RecursionError) as exc:
            raise SerializationError(f"the flow state cannot be stored: {exc}") from exc
    if isinstance(state_data, dict):
        return state_data
    raise ValidationError(
        f"state_data must be a pydantic BaseModel or a dict, got {type(state_data).__name__}")


def _request_of(context: object) -> dict[str, Any]:
    """The feedback context as an approval request, checked as the run's details will check
    it (so a context that cannot be stored fails before anything is written). Its trace ids
    are 128-bit integers, which JSON readers cannot all hold: they are kept as decimal
    text."""
    if not isinstance(context, PendingFeedbackContext):
        raise ValidationError(
            f"context must be a CrewAI PendingFeedbackContext, got {type(context).__name__}")
    try:
        context_dict = context.to_dict()
    except (PydanticSerializationError, ValueError, TypeError, AttributeError,
            RecursionError) as exc:
        raise SerializationError(f"the feedback context cannot be stored: {exc}") from exc
    request = _json_value(context_dict, "the feedback context")
    trace = request.get("trace_context")
    if isinstance(trace, list):
        request["trace_context"] = [str(part) for part in trace]
    checked: dict[str, Any] = json_copy(request, "the feedback context")
    return checked


def _context_dict(request: dict[str, Any]) -> dict[str, Any]:
    """What ``PendingFeedbackContext.from_dict`` reads, from an approval request."""
    trace = request.get("trace_context")
    if isinstance(trace, list) and all(isinstance(part, str) for part in trace):
        return {**request, "trace_context": [int(part) for part in trace]}
    return request


def _json_value(value: dict[str, Any], what: str) -> dict[str, Any]:
    """``value`` as JSON values (approval requests hold nothing else), written as CrewAI's
    SQLite backend writes it, so ``load_pending_feedback`` returns what that backend does:
    keys as JSON text (``True`` as ``"true"``, ``None`` as ``"null"``), models as their JSON
    dump, tuples and sets as lists, dates as ISO text, anything else as its ``str()``. A
    float that is not finite has no JSON form and is refused (that backend keeps it as
    JSON's non-standard ``NaN``, which an approval request cannot hold), never turned into
    ``null``."""
    try:
        decoded: dict[str, Any] = json.loads(json.dumps(value, default=_jsonable,
                                                        allow_nan=False))
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise SerializationError(f"{what} cannot be written as JSON: {exc}") from exc
    return decoded


def _jsonable(value: Any) -> Any:
    """The JSON form of what ``json`` has none for, as CrewAI's SQLite backend makes it."""
    if isinstance(value, BaseModel):
        try:
            return value.model_dump(mode="json")
        except (PydanticSerializationError, ValueError):
            return value.model_dump()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, date):  # datetime too
        return value.isoformat()
    return str(value)
