"""FastFlowPersistence against CrewAI's current release: the FlowPersistence contract on each
store, real flows (restored in a new process), pending feedback through the approval queue
and the command line, TTL on a moved clock, and the errors it raises."""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from crewai.flow.async_feedback.types import HumanFeedbackPending, PendingFeedbackContext
from crewai.flow.flow import Flow, start
from crewai.flow.persistence import FlowPersistence, persist
from crewai.flow.persistence.base import _persistence_registry
from pydantic import BaseModel, ConfigDict

from fastcheckpoint import (
    CheckpointConfig,
    CheckpointError,
    CheckpointStatus,
    ConfigurationError,
    ConflictError,
    CorruptCheckpointError,
    MemoryStore,
    SerializationError,
    StoreUnavailableError,
    ValidationError,
)
from fastcheckpoint.integrations.crewai import (
    ANSWERED_TAG,
    FRAMEWORK,
    REQUESTED_TAG,
    FastFlowPersistence,
    FeedbackRequestOvertaken,
)

from ._support import CountingStore
from .flow_worker import counter_flow, review_flow

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parents[2]
WORKER = HERE / "flow_worker.py"
TRACE = (201640978158458407664287636097305410089, 4293339474153934709)
SUBPROCESS_SECONDS = 120


class Clock:
    """The manager's clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Order(BaseModel):
    id: str = ""
    placed: datetime = datetime(2026, 12, 3, 7, 30, tzinfo=timezone.utc)
    ref: uuid.UUID = uuid.UUID(int=17)
    items: list[str] = []


@pytest.fixture
def persistence(store_url: str) -> Iterator[FastFlowPersistence]:
    opened = FastFlowPersistence(store_url)
    yield opened
    opened.close()


def flow_id() -> str:
    return str(uuid.uuid4())


def feedback_context(flow: str, *, method: str = "review") -> PendingFeedbackContext:
    return PendingFeedbackContext(
        flow_id=flow, flow_class="tests.ReviewFlow", method_name=method,
        method_output={"draft": "refund A-17", "amount": 120.5}, message="Send it?",
        emit=["approved", "rejected"], default_outcome="rejected", metadata={"ticket": 7},
        requested_at=datetime(2026, 12, 3, 9, 0), execution_uuid="exec-1", trace_context=TRACE)


# -- the FlowPersistence contract, on every store ----------------------------------------------


def test_is_a_flow_persistence_registered_by_name(persistence: FastFlowPersistence) -> None:
    assert isinstance(persistence, FlowPersistence)
    assert _persistence_registry["FastFlowPersistence"] is FastFlowPersistence
    assert persistence.persistence_type == "FastFlowPersistence"


def test_save_state_checkpoints_each_method_and_load_state_restores_the_latest(
    persistence: FastFlowPersistence,
) -> None:
    flow = flow_id()
    assert persistence.load_state(flow) is None
    persistence.save_state(flow, "plan", {"id": flow, "step": 1, "raw": b"\x00", "pair": (1, 2)})
    persistence.save_state(flow, "act", {"id": flow, "step": 2, "raw": b"\x01", "pair": (3, 4)})

    assert persistence.load_state(flow) == {"id": flow, "step": 2, "raw": b"\x01",
                                            "pair": (3, 4)}
    listed = persistence.manager.list_checkpoints(flow)
    assert [(item.sequence, item.step_name) for item in listed] == [(1, "act"), (0, "plan")]
    run = persistence.manager.get_run(flow)
    assert run is not None
    assert (run.run_id, run.status) == (flow, CheckpointStatus.ACTIVE)
    assert persistence.load_state(flow_id()) is None


def test_a_model_state_is_stored_as_its_json_dump(persistence: FastFlowPersistence) -> None:
    flow = flow_id()
    persistence.save_state(flow, "place", Order(id=flow, items=["book"]))

    assert persistence.load_state(flow) == {
        "id": flow, "placed": "2026-12-03T07:30:00Z",
        "ref": "00000000-0000-0000-0000-000000000011", "items": ["book"]}
    assert Order.model_validate(persistence.load_state(flow)) == Order(id=flow, items=["book"])


def test_pending_feedback_waits_in_the_approval_queue(persistence: FastFlowPersistence) -> None:
    flow = flow_id()
    persistence.save_state(flow, "write", {"id": flow, "draft": "v1"})
    persistence.save_pending_feedback(flow, feedback_context(flow), {"id": flow, "draft": "v2"})

    run = persistence.manager.get_run(flow)
    assert run is not None
    assert run.status is CheckpointStatus.PAUSED
    assert run.approval is not None
    request = run.approval["request"]
    assert (request["framework"], request["method_name"], request["message"]) == (
        FRAMEWORK, "review", "Send it?")
    assert request["method_output"] == {"draft": "refund A-17", "amount": 120.5}
    queue = persistence.manager.list_runs(status=CheckpointStatus.PAUSED)
    assert flow in [item.run_id for item in queue]
    newest = persistence.manager.list_checkpoints(flow, 1)[0]
    assert (newest.step_name, newest.tags) == ("review", [REQUESTED_TAG])
    assert request["checkpoint_id"] == newest.checkpoint_id

    loaded = persistence.load_pending_feedback(flow)
    assert loaded is not None
    state, context = loaded
    assert state == {"id": flow, "draft": "v2"}
    assert context == feedback_context(flow)
    assert persistence.feedback(flow) is None  # nobody decided yet
    assert persistence.load_state(flow) == {"id": flow, "draft": "v2"}


def test_a_decision_stays_pending_until_the_resumed_flow_goes_on(
    persistence: FastFlowPersistence,
) -> None:
    flow = flow_id()
    persistence.save_pending_feedback(flow, feedback_context(flow), {"id": flow})
    persistence.manager.approve(flow, approver="ana", comment="within policy")

    assert persistence.feedback(flow) == "approved: within policy"
    assert persistence.load_pending_feedback(flow) is not None

    persistence.save_state(flow, "review", {"id": flow, "sent": True})  # the resumed method
    persistence.clear_pending_feedback(flow)

    assert persistence.load_pending_feedback(flow) is None
    assert persistence.feedback(flow) is None
    run = persistence.manager.get_run(flow)
    assert run is not None
    assert (run.status, run.latest_sequence) == (CheckpointStatus.ACTIVE, 1)


def test_clear_without_a_reviewer_approves_as_crewai(persistence: FastFlowPersistence) -> None:
    flow = flow_id()
    persistence.save_pending_feedback(flow, feedback_context(flow), {"id": flow, "n": 1})
    persistence.clear_pending_feedback(flow)

    assert persistence.load_pending_feedback(flow) is None
    run = persistence.manager.get_run(flow)
    assert run is not None
    assert run.status is CheckpointStatus.ACTIVE
    assert run.history[-1].actor == FRAMEWORK
    newest = persistence.manager.list_checkpoints(flow, 1)[0]
    assert (newest.step_name, newest.tags) == ("review", [ANSWERED_TAG])
    assert persistence.load_state(flow) == {"id": flow, "n": 1}
    persistence.clear_pending_feedback(flow)  # nothing pending: nothing written
    assert persistence.manager.get_run(flow).latest_sequence == 1  # type: ignore[union-attr]


def _assert_second_request_waits(
    persistence: FastFlowPersistence, flow: str, *, approved_by: str
) -> None:
    """The flow's second request (``{"id": flow, "n": 2}``) waits, the first having been
    approved by ``approved_by``."""
    loaded = persistence.load_pending_feedback(flow)
    assert loaded is not None
    assert (loaded[0], loaded[1].method_name) == ({"id": flow, "n": 2}, "second")
    run = persistence.manager.get_run(flow)
    assert run is not None
    assert run.status is CheckpointStatus.PAUSED
    assert [(change.status, change.actor) for change in run.history] == [
        (CheckpointStatus.PAUSED, None), (CheckpointStatus.ACTIVE, approved_by),
        (CheckpointStatus.PAUSED, None)]


def test_a_newer_request_supersedes_one_still_waiting(persistence: FastFlowPersistence) -> None:
    flow = flow_id()
    persistence.save_pending_feedback(flow, feedback_context(flow, method="first"), {"id": flow})
    persistence.save_pending_feedback(flow, feedback_context(flow, method="second"),
                                      {"id": flow, "n": 2})

    _assert_second_request_waits(persistence, flow, approved_by=FRAMEWORK)


def test_an_older_request_does_not_supersede_a_newer_one(store_url: str) -> None:
    """Two workers of one flow ask for feedback at once: A checkpoints, B checkpoints and
    pauses, then A pauses. A superseded B's request with its own, older one: B's
    acknowledged request left the queue, and A's named a checkpoint the flow had gone past,
    so nothing was pending. A's call is refused now, and B's request waits."""
    shared: MemoryStore | str = MemoryStore() if store_url == "memory://" else store_url
    first, second = FastFlowPersistence(shared), FastFlowPersistence(shared)
    try:
        flow = flow_id()
        blocking = first._opened()
        real_pause = blocking.pause

        def second_worker_first(*args: Any, **kwargs: Any) -> Any:
            blocking.pause = real_pause  # type: ignore[method-assign]
            second.save_pending_feedback(flow, feedback_context(flow, method="second"),
                                         {"id": flow, "by": "second"})
            return real_pause(*args, **kwargs)

        blocking.pause = second_worker_first  # type: ignore[method-assign]
        with pytest.raises(ConflictError, match="newer feedback request"):
            first.save_pending_feedback(flow, feedback_context(flow, method="first"),
                                        {"id": flow, "by": "first"})
        loaded = first.load_pending_feedback(flow)
        assert loaded is not None
        assert (loaded[0], loaded[1].method_name) == ({"id": flow, "by": "second"}, "second")
        run = first.manager.get_run(flow)
        assert run is not None
        assert run.status is CheckpointStatus.PAUSED
    finally:
        first.close()
        second.close()


def test_a_request_a_reviewer_decided_while_it_was_being_superseded_lets_the_newer_wait(
    persistence: FastFlowPersistence,
) -> None:
    """A request waits; the flow asks again, and a reviewer approves the waiting request just
    before the call supersedes it. The call's approval is refused (decided already): the
    newer request was not queued and the call raised, with the run active at its checkpoint
    and nothing pending for the flow to wait on. It is queued now."""
    flow = flow_id()
    persistence.save_pending_feedback(flow, feedback_context(flow, method="first"), {"id": flow})
    blocking = persistence._opened()
    real_approve = blocking.approve

    def reviewer_first(*args: Any, **kwargs: Any) -> Any:
        blocking.approve = real_approve  # type: ignore[method-assign]
        real_approve(flow, approver="alice")
        return real_approve(*args, **kwargs)

    blocking.approve = reviewer_first  # type: ignore[method-assign]
    persistence.save_pending_feedback(flow, feedback_context(flow, method="second"),
                                      {"id": flow, "n": 2})

    _assert_second_request_waits(persistence, flow, approved_by="alice")


def _with_state_saved_before_the_pause(
    paused_by: FastFlowPersistence, saver: FastFlowPersistence, flow: str
) -> None:
    """The interleaving of two workers of one flow: ``saver``'s ``save_state`` lands after
    ``paused_by`` checkpointed its feedback request and before it pauses the run (once)."""
    blocking = paused_by._opened()
    real_pause = blocking.pause

    def state_saved_first(*args: Any, **kwargs: Any) -> Any:
        blocking.pause = real_pause  # type: ignore[method-assign]
        saver.save_state(flow, "went_on", {"id": flow, "by": "other worker"})
        return real_pause(*args, **kwargs)

    blocking.pause = state_saved_first  # type: ignore[method-assign]


@pytest.mark.parametrize("waiting", [False, True], ids=["active", "earlier-request-waits"])
def test_a_request_the_flow_went_past_before_the_pause_is_not_queued(
    store_url: str, waiting: bool
) -> None:
    """Worker A checkpoints its feedback request; worker B saves the flow's state; A pauses.
    The flow went past A's request, so the run must not wait in the queue for it: A's call
    raises, and the run is as B left it (B's checkpoint the newest, nothing pending)."""
    shared: MemoryStore | str = MemoryStore() if store_url == "memory://" else store_url
    first, second = FastFlowPersistence(shared), FastFlowPersistence(shared)
    try:
        flow = flow_id()
        if waiting:
            first.save_pending_feedback(flow, feedback_context(flow, method="earlier"),
                                        {"id": flow})
        before = first.manager.get_run(flow)
        _with_state_saved_before_the_pause(first, second, flow)

        with pytest.raises(FeedbackRequestOvertaken, match="went past"):
            first.save_pending_feedback(flow, feedback_context(flow), {"id": flow, "by": "A"})

        run = first.manager.get_run(flow)
        assert run is not None
        assert run.latest_sequence == (2 if waiting else 1)
        assert first.load_state(flow) == {"id": flow, "by": "other worker"}
        assert first.load_pending_feedback(flow) is None
        assert first.feedback(flow) is None
        if waiting:  # the earlier request stays as it was, waiting
            assert before is not None
            assert (run.status, run.approval, run.history) == (
                CheckpointStatus.PAUSED, before.approval, before.history)
        else:
            assert (run.status, run.approval, run.history) == (CheckpointStatus.ACTIVE, None, [])
    finally:
        first.close()
        second.close()


class _WithoutSequenceGuard(MemoryStore):
    """A store that cannot pause on the condition that the newest checkpoint is unchanged
    (a third-party store written for the older ``update_run``)."""

    sequence_guard = False


def test_on_a_store_without_the_guard_feedback_still_waits_and_a_saved_state_still_wins() -> (
    None
):
    """The pause goes without the condition there (no ``ConfigurationError``); a state saved
    right after the request's checkpoint is still seen, by the run read just before the
    pause (only what lands between that read and the pause is not)."""
    store = _WithoutSequenceGuard()
    first, second = FastFlowPersistence(store), FastFlowPersistence(store)
    try:
        waiting, overtaken = flow_id(), flow_id()
        first.save_pending_feedback(waiting, feedback_context(waiting), {"id": waiting})
        blocking = first._opened()
        real_create = blocking.create

        def state_saved_right_after(*args: Any, **kwargs: Any) -> Any:
            blocking.create = real_create  # type: ignore[method-assign]
            created = real_create(*args, **kwargs)
            second.save_state(overtaken, "went_on", {"id": overtaken, "by": "other worker"})
            return created

        blocking.create = state_saved_right_after  # type: ignore[method-assign]
        with pytest.raises(FeedbackRequestOvertaken):
            first.save_pending_feedback(overtaken, feedback_context(overtaken),
                                        {"id": overtaken})

        assert first.load_pending_feedback(waiting) is not None
        run = first.manager.get_run(overtaken)
        assert run is not None
        assert (run.status, run.latest_sequence) == (CheckpointStatus.ACTIVE, 1)
    finally:
        first.close()
        second.close()


def test_a_rejection_is_feedback_and_ends_the_run_in_the_queue(
    persistence: FastFlowPersistence,
) -> None:
    flow = flow_id()
    persistence.save_pending_feedback(flow, feedback_context(flow), {"id": flow})
    persistence.manager.reject(flow, approver="ana", reason="needs a manager")

    assert persistence.feedback(flow) == "rejected: needs a manager"
    assert persistence.load_pending_feedback(flow) is not None
    persistence.clear_pending_feedback(flow)
    assert persistence.load_pending_feedback(flow) is None
    persistence.save_state(flow, "rework", {"id": flow, "n": 2})  # the flow goes on
    assert persistence.load_state(flow) == {"id": flow, "n": 2}

    with pytest.raises(ConflictError, match="rejected"):
        persistence.save_pending_feedback(flow, feedback_context(flow), {"id": flow})


def test_a_request_the_run_cannot_take_writes_nothing(tmp_path: Path) -> None:
    """A run rejected, completed or waiting for another adapter's request cannot wait for
    feedback: ``ConflictError`` before the state is checkpointed (which pruned the oldest
    checkpoint under ``keep_latest``)."""
    persistence = FastFlowPersistence(f"sqlite:///{tmp_path / 'refused.db'}", keep_latest=2)
    try:
        rejected, completed, other = flow_id(), flow_id(), flow_id()
        for flow in (rejected, completed, other):
            persistence.save_state(flow, "write", {"id": flow})
        persistence.save_pending_feedback(rejected, feedback_context(rejected), {"id": rejected})
        persistence.manager.reject(rejected, approver="ana")
        persistence.manager.mark_completed(completed)
        persistence.manager.pause(other, request={"framework": "openai-agents"})
        for flow, status in ((rejected, "rejected"), (completed, "completed"), (other, "paused")):
            before = persistence.manager.list_checkpoints(flow)
            with pytest.raises(ConflictError, match=status):
                persistence.save_pending_feedback(flow, feedback_context(flow),
                                                  {"id": flow, "n": 2})
            assert persistence.manager.list_checkpoints(flow) == before
    finally:
        persistence.close()


def test_a_decision_without_a_note_is_the_decision_word(persistence: FastFlowPersistence) -> None:
    flow = flow_id()
    persistence.save_pending_feedback(flow, feedback_context(flow), {"id": flow})
    persistence.manager.approve(flow, approver="ana")
    assert persistence.feedback(flow) == "approved"


def test_approval_requests_of_other_adapters_are_not_feedback(
    persistence: FastFlowPersistence,
) -> None:
    flow = flow_id()
    persistence.manager.create(flow, {"id": flow})
    persistence.manager.pause(flow, request={"framework": "openai-agents", "tool_calls": []})

    assert persistence.load_pending_feedback(flow) is None
    persistence.clear_pending_feedback(flow)
    with pytest.raises(ConflictError, match="paused"):
        persistence.save_pending_feedback(flow, feedback_context(flow), {"id": flow})
    run = persistence.manager.get_run(flow)
    assert run is not None
    assert run.status is CheckpointStatus.PAUSED
    assert run.approval is not None
    assert run.approval["request"]["framework"] == "openai-agents"


def test_copies_of_a_flow_share_the_persistence_and_close_ends_it(store_url: str) -> None:
    persistence = FastFlowPersistence(store_url)
    flow = flow_id()
    persistence.save_state(flow, "plan", {"id": flow})
    assert copy.deepcopy(persistence) is persistence
    persistence.close()
    persistence.close()
    with pytest.raises(ConfigurationError, match="closed"):
        persistence.load_state(flow)


def test_store_calls_per_operation() -> None:
    """What the module docstring states: one store call per save and per load in steady
    state, four for a request, two to load it, and what ending it costs."""
    store = CountingStore(MemoryStore())
    persistence = FastFlowPersistence(store)  # type: ignore[arg-type]
    try:
        flow = flow_id()
        persistence.save_state(flow, "plan", {"id": flow})
        assert sum(store.take().values()) == 1
        persistence.save_state(flow, "act", {"id": flow})
        assert store.take() == {"append": 1}
        persistence.load_state(flow)
        assert store.take() == {"latest": 1}
        persistence.save_pending_feedback(flow, feedback_context(flow), {"id": flow})
        assert store.take() == {"append": 1, "get_run": 2, "update_run": 1}
        persistence.load_pending_feedback(flow)
        assert sum(store.take().values()) == 2
        persistence.feedback(flow)
        assert store.take() == {"get_run": 1}
        persistence.clear_pending_feedback(flow)  # still PAUSED, no checkpoint since
        assert sum(store.take().values()) == 1 + 2 + 2

        other = FastFlowPersistence(store)  # type: ignore[arg-type]
        try:
            other.save_state(flow, "elsewhere", {"id": flow})  # another writer of the flow
            assert sum(store.take().values()) == 2
        finally:
            other.close()
    finally:
        persistence.close()


# -- settings: TTL, pruning, the serialized form ----------------------------------------------


def test_ttl_expires_state_and_pending_feedback_on_the_managers_clock(tmp_path: Path) -> None:
    clock = Clock()
    persistence = FastFlowPersistence(f"sqlite:///{tmp_path / 'ttl.db'}", ttl_seconds=60,
                                      config=CheckpointConfig(clock=clock))
    try:
        flow, waiting = flow_id(), flow_id()
        persistence.save_state(flow, "plan", {"id": flow})
        persistence.save_pending_feedback(waiting, feedback_context(waiting), {"id": waiting})
        clock.now += 59.9
        assert persistence.load_state(flow) == {"id": flow}
        assert persistence.load_pending_feedback(waiting) is not None

        clock.now += 0.1
        assert persistence.load_state(flow) is None
        assert persistence.load_pending_feedback(waiting) is None
        assert persistence.manager.list_runs(status=CheckpointStatus.PAUSED).runs == []
    finally:
        persistence.close()


def test_keep_latest_prunes_each_flow(tmp_path: Path) -> None:
    persistence = FastFlowPersistence(f"file://{tmp_path / 'store'}?fsync=false", keep_latest=2)
    try:
        flow = flow_id()
        for step in range(5):
            persistence.save_state(flow, f"step-{step}", {"id": flow, "step": step})
        listed = persistence.manager.list_checkpoints(flow)
        assert [item.step_name for item in listed] == ["step-4", "step-3"]
        assert persistence.load_state(flow) == {"id": flow, "step": 4}
    finally:
        persistence.close()


def test_keeps_every_checkpoint_by_default(tmp_path: Path) -> None:
    persistence = FastFlowPersistence(f"sqlite:///{tmp_path / 'all.db'}")
    try:
        flow = flow_id()
        for step in range(120):  # more than the manager's default limit of 100
            persistence.save_state(flow, "loop", {"id": flow, "step": step})
        assert len(persistence.manager.list_checkpoints(flow, 200)) == 120
    finally:
        persistence.close()


def test_the_serialized_persistence_reopens_its_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'flows.db'}"
    first = FastFlowPersistence(url, ttl_seconds=3600, keep_latest=5)
    flow = flow_id()
    first.save_state(flow, "plan", {"id": flow, "step": 1})
    dumped = first.model_dump(mode="json")
    first.close()
    assert dumped == {"persistence_type": "FastFlowPersistence", "url": url,
                      "ttl_seconds": 3600.0, "keep_latest": 5}

    # what CrewAI does with a flow definition's persistence config
    rebuilt = _persistence_registry[dumped["persistence_type"]].model_validate(dumped)
    try:
        assert rebuilt.load_state(flow) == {"id": flow, "step": 1}
        rebuilt.save_state(flow, "act", {"id": flow, "step": 2})
        newest = rebuilt.manager.list_checkpoints(flow, 1)[0]
        assert newest.ttl_seconds == 3600.0
    finally:
        rebuilt.close()


def test_from_env_and_a_dict_without_url_open_the_environments_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = f"file://{tmp_path / 'env-store'}?fsync=false"
    monkeypatch.setenv("FASTCHECKPOINT_URL", url)
    monkeypatch.setenv("FASTCHECKPOINT_DEFAULT_TTL_SECONDS", "600")
    from_env = FastFlowPersistence.from_env()
    flow = flow_id()
    try:
        from_env.save_state(flow, "plan", {"id": flow})
        assert from_env.manager.list_checkpoints(flow)[0].ttl_seconds == 600.0
    finally:
        from_env.close()
    rebuilt = FastFlowPersistence.model_validate({"persistence_type": "FastFlowPersistence"})
    try:
        assert rebuilt.load_state(flow) == {"id": flow}
    finally:
        rebuilt.close()


# -- errors -------------------------------------------------------------------------------------


def test_errors_are_checkpoint_errors(persistence: FastFlowPersistence) -> None:
    with pytest.raises(ValidationError, match="BaseModel or a dict"):
        persistence.save_state(flow_id(), "plan", ["not", "a", "state"])  # type: ignore[arg-type]
    assert issubclass(ValidationError, ValueError)  # what CrewAI's backends raise
    with pytest.raises(ValidationError):
        persistence.save_state("", "plan", {"id": ""})
    with pytest.raises(SerializationError, match="state"):
        persistence.save_state(flow_id(), "plan", {"id": "x", "handle": object()})
    for call in (persistence.load_state, persistence.load_pending_feedback,
                 persistence.clear_pending_feedback, persistence.feedback):
        with pytest.raises(CheckpointError):
            call(17)  # type: ignore[arg-type]


class _Holder(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    id: str = ""
    held: object = None


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def test_values_that_cannot_be_stored_are_serialization_errors(
    persistence: FastFlowPersistence,
) -> None:
    """A model state nested deeper than pydantic goes, a feedback context whose output holds
    an object or nests too deep, or refers to itself: ``SerializationError``, nothing
    stored."""
    flow = flow_id()
    with pytest.raises(SerializationError, match=r"flow state|nested more than 100 levels"):
        persistence.save_state(flow, "plan", _Holder(held=_nested(100_000)))
    looped: dict[str, Any] = {}
    looped["self"] = looped
    for output in (_Holder(held=object()), _nested(100_000), looped):
        context = feedback_context(flow)
        context.method_output = output
        with pytest.raises(SerializationError, match="feedback context"):
            persistence.save_pending_feedback(flow, context, {"id": flow})
    assert persistence.manager.get_run(flow) is None


def test_a_context_the_run_details_cannot_hold_fails_before_anything_is_written(
    persistence: FastFlowPersistence,
) -> None:
    """An output JSON can write but the run's details cannot hold (an integer out of the
    64-bit range, nesting below their depth limit) was found only when pausing, after the
    state was checkpointed (and a pruning limit had dropped an older checkpoint)."""
    flow = flow_id()
    for output in ({"amount": 2**70}, _nested(150)):
        context = feedback_context(flow)
        context.method_output = output
        with pytest.raises(SerializationError, match="feedback context"):
            persistence.save_pending_feedback(flow, context, {"id": flow})
    assert persistence.manager.get_run(flow) is None


def test_a_context_that_is_not_one_is_a_validation_error(
    persistence: FastFlowPersistence,
) -> None:
    flow = flow_id()
    for context in (None, feedback_context(flow).to_dict()):
        with pytest.raises(ValidationError, match="PendingFeedbackContext"):
            persistence.save_pending_feedback(flow, context, {"id": flow})  # type: ignore[arg-type]
    broken = feedback_context(flow)
    broken.requested_at = "yesterday"  # type: ignore[assignment]
    with pytest.raises(SerializationError, match="feedback context"):
        persistence.save_pending_feedback(flow, broken, {"id": flow})
    assert persistence.manager.get_run(flow) is None


def test_a_clear_that_failed_midway_is_no_reviewers_decision(
    persistence: FastFlowPersistence, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flow was resumed with its feedback and clearing the request approved the run as
    ``crewai``, then failed: ``feedback`` does not report that approval as a reviewer's (a
    worker would resume the flow with it); clearing again finishes."""
    flow = flow_id()
    persistence.save_pending_feedback(flow, feedback_context(flow), {"id": flow, "n": 1})
    blocking = persistence._opened()
    real_create = blocking.create

    def fails(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailableError("the store did not answer")

    monkeypatch.setattr(blocking, "create", fails)
    with pytest.raises(StoreUnavailableError):
        persistence.clear_pending_feedback(flow)
    run = persistence.manager.get_run(flow)
    assert run is not None
    assert (run.status, (run.approval or {}).get("decided_by")) == (
        CheckpointStatus.ACTIVE, FRAMEWORK)
    assert persistence.feedback(flow) is None
    monkeypatch.setattr(blocking, "create", real_create)
    persistence.clear_pending_feedback(flow)
    assert persistence.load_pending_feedback(flow) is None


def test_a_request_naming_no_checkpoint_is_corrupt_and_clearing_it_changes_nothing(
    persistence: FastFlowPersistence,
) -> None:
    """A request of this adapter's framework without a checkpoint id (written by hand, or
    damaged): clearing it raised ``KeyError`` or ``ValidationError`` after approving the run
    as ``crewai``."""
    for checkpoint_id in (None, 5):
        flow = flow_id()
        persistence.save_state(flow, "write", {"id": flow})
        request: dict[str, Any] = {"framework": FRAMEWORK, "sequence": 0}
        if checkpoint_id is not None:
            request["checkpoint_id"] = checkpoint_id
        persistence.manager.pause(flow, request=request)
        for call in (persistence.load_pending_feedback, persistence.feedback,
                     persistence.clear_pending_feedback):
            with pytest.raises(CorruptCheckpointError, match="checkpoint id"):
                call(flow)
        run = persistence.manager.get_run(flow)
        assert run is not None
        assert (run.status, run.latest_sequence) == (CheckpointStatus.PAUSED, 0)


def test_a_request_cut_between_its_checkpoint_and_the_pause_is_not_pending(
    persistence: FastFlowPersistence, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state is checkpointed, then the store fails before the run is paused (a crash
    there leaves the same): the newer state is the flow's latest, nothing is pending, and a
    decision on the request still in the queue (which the flow went past) is not taken as
    feedback for this one. Calling again pauses the flow with it."""
    flow = flow_id()
    persistence.save_pending_feedback(flow, feedback_context(flow, method="first"),
                                      {"id": flow, "n": 1})
    blocking = persistence._opened()
    real_pause = blocking.pause

    def fails(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailableError("the store did not answer")

    monkeypatch.setattr(blocking, "pause", fails)
    with pytest.raises(StoreUnavailableError):
        persistence.save_pending_feedback(flow, feedback_context(flow, method="second"),
                                          {"id": flow, "n": 2})
    monkeypatch.setattr(blocking, "pause", real_pause)
    assert persistence.load_state(flow) == {"id": flow, "n": 2}
    assert persistence.load_pending_feedback(flow) is None
    persistence.manager.approve(flow, approver="ana", comment="the first one")
    assert persistence.feedback(flow) is None

    persistence.save_pending_feedback(flow, feedback_context(flow, method="second"),
                                      {"id": flow, "n": 2})
    loaded = persistence.load_pending_feedback(flow)
    assert loaded is not None
    assert (loaded[0], loaded[1].method_name) == ({"id": flow, "n": 2}, "second")


@pytest.mark.parametrize(("arguments", "message"), [
    ({"ttl_seconds": 0}, "ttl_seconds"),
    ({"ttl_seconds": float("nan")}, "ttl_seconds"),
    ({"keep_latest": 0}, "keep_latest"),
    ({"keep_latest": True}, "keep_latest"),
    ({"config": {"clock": 1}}, "CheckpointConfig"),
])
def test_bad_settings_are_configuration_errors(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        FastFlowPersistence("memory://", **arguments)


def test_a_bad_store_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        FastFlowPersistence("nosuchscheme://x")
    with pytest.raises(ConfigurationError):
        FastFlowPersistence(object())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="settings"):
        FastFlowPersistence(url=7)  # type: ignore[arg-type]


# -- real flows -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two flows run here on a SQLite store: one finishes, one pauses for feedback, which is
    approved on the command line; then one new process continues the first by its id and
    resumes the second with the decision (one process: importing CrewAI takes seconds)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('flows') / 'flows.db'}"
    persistence = FastFlowPersistence(url)
    try:
        counter = counter_flow(persistence)()
        counter.kickoff()
        review = review_flow(persistence)()
        outcome = review.kickoff()
        steps = [item.step_name for item in persistence.manager.list_checkpoints(counter.state.id)]
    finally:
        persistence.close()
    queue = _cli("runs", "--status", "paused", "--url", url)
    _cli("approve", review.state.id, "--approver", "ana@example.com", "--comment", "ship it",
         "--url", url)
    continued, resumed = _worker(url, "continue", counter.state.id, "resume", review.state.id)
    return {"url": url, "counter": counter.state.model_dump(), "steps": steps,
            "review": review.state.model_dump(), "outcome": outcome, "queue": queue,
            "continued": continued, "resumed": resumed}


def test_a_flow_restored_by_id_in_a_new_process(other_process: dict[str, Any]) -> None:
    first = other_process["counter"]
    assert other_process["steps"] == ["finish", "begin"]
    assert other_process["continued"] == {
        "id": first["id"], "runs": 2, "steps": ["begin-1", "finish-1", "begin-2", "finish-2"]}


def test_an_unstructured_flow_keeps_its_dict_state(tmp_path: Path) -> None:
    persistence = FastFlowPersistence(f"file://{tmp_path / 'store'}?fsync=false")

    @persist(persistence)
    class Notes(Flow):  # type: ignore[type-arg]
        @start()
        def note(self) -> None:
            self.state["notes"] = [*self.state.get("notes", []), "seen"]

    try:
        first = Notes()
        first.kickoff()
        again = Notes()
        again.kickoff(inputs={"id": first.state["id"]})
        assert again.state["notes"] == ["seen", "seen"]
        assert persistence.load_state(first.state["id"]) == {
            "id": first.state["id"], "notes": ["seen", "seen"]}
    finally:
        persistence.close()


def test_a_flow_built_inside_a_running_event_loop(tmp_path: Path) -> None:
    """CrewAI calls its persistence on its event loop's thread: the persistence must not
    run the manager on the loop it was built in."""

    async def main() -> dict[str, Any]:
        persistence = FastFlowPersistence(f"sqlite:///{tmp_path / 'async.db'}")
        try:
            flow = counter_flow(persistence)()
            await flow.kickoff_async()
            again = counter_flow(persistence)()
            await again.kickoff_async(inputs={"id": flow.state.id})
            return again.state.model_dump()
        finally:
            persistence.close()

    state = asyncio.run(main())
    assert (state["runs"], state["steps"][-1]) == (2, "finish-2")


def test_human_feedback_approved_on_the_command_line_resumes_in_a_new_process(
    other_process: dict[str, Any],
) -> None:
    paused = other_process["review"]["id"]
    outcome = other_process["outcome"]
    assert isinstance(outcome, HumanFeedbackPending)
    assert outcome.context.flow_id == paused
    assert paused in other_process["queue"]
    assert other_process["resumed"] == {
        "id": paused, "draft": "refund order A-17", "verdict": "approved: ship it"}

    reopened = FastFlowPersistence(other_process["url"])
    try:
        run = reopened.manager.get_run(paused)
        assert run is not None
        assert run.status is CheckpointStatus.ACTIVE
        assert run.history[-1].actor == "ana@example.com"
        assert reopened.load_pending_feedback(paused) is None
        assert [item.step_name for item in reopened.manager.list_checkpoints(paused)] == [
            "decide", "review", "review", "write"]
        with pytest.raises(ValueError, match="No pending feedback"):
            review_flow(reopened).from_pending(paused, reopened)
    finally:
        reopened.close()


def test_human_feedback_rejected_reaches_the_flow(tmp_path: Path) -> None:
    persistence = FastFlowPersistence(f"file://{tmp_path / 'store'}?fsync=false")
    try:
        started = review_flow(persistence)()
        assert isinstance(started.kickoff(), HumanFeedbackPending)
        paused = started.state.id
        persistence.manager.reject(paused, approver="bo", reason="over the limit")
        flow = review_flow(persistence).from_pending(paused, persistence)
        assert flow.pending_feedback is not None
        assert flow.pending_feedback.message == "Send this refund?"
        flow.resume(persistence.feedback(paused) or "")
        assert flow.state.verdict == "rejected: over the limit"
        run = persistence.manager.get_run(paused)
        assert run is not None
        assert run.status is CheckpointStatus.REJECTED
        assert persistence.load_pending_feedback(paused) is None
    finally:
        persistence.close()


def test_a_flow_resumed_without_a_reviewer_leaves_the_queue(tmp_path: Path) -> None:
    persistence = FastFlowPersistence(f"sqlite:///{tmp_path / 'direct.db'}")
    try:
        started = review_flow(persistence)()
        started.kickoff()
        flow = review_flow(persistence).from_pending(started.state.id, persistence)
        flow.resume("fine by me")
        assert flow.state.verdict == "fine by me"
        assert persistence.manager.list_runs(status=CheckpointStatus.PAUSED).runs == []
        run = persistence.manager.get_run(started.state.id)
        assert run is not None
        assert (run.status, run.history[-1].actor) == (CheckpointStatus.ACTIVE, FRAMEWORK)
    finally:
        persistence.close()


def _worker(*argv: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, str(WORKER), *argv], capture_output=True, text=True,
        timeout=SUBPROCESS_SECONDS, env=os.environ.copy(), cwd=CHECKOUT, check=False)
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, done.args, done.stdout, done.stderr)
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT "), done.stdout[-2000:]
    result: list[dict[str, Any]] = json.loads(last.removeprefix("RESULT "))
    return result


def _cli(*argv: str) -> str:
    script = Path(sys.executable).with_name("fastcheckpoint")
    command = [str(script)] if script.exists() else [
        sys.executable, "-c", "import sys; from fastcheckpoint.cli import main; sys.exit(main())"]
    done = subprocess.run([*command, *argv], capture_output=True, text=True,
                          timeout=SUBPROCESS_SECONDS, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_example_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location(
        "crewai_flow_example", CHECKOUT / "examples" / "crewai_flow.py")
    assert spec is not None
    assert spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    example.main(f"sqlite:///{tmp_path / 'example.db'}")

    printed = capsys.readouterr().out
    assert "waiting: True Send this refund?" in printed
    assert "verdict: approved: within policy" in printed
    assert "checkpoints, newest first: ['settle', 'review', 'review', 'draft']" in printed
