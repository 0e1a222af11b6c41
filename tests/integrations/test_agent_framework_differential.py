"""Differential model checking of the Agent Framework storage against the framework's own.

A hypothesis ``RuleBasedStateMachine`` applies the same random sequences of ``save``,
``load``, ``delete``, ``list_checkpoints``, ``list_checkpoint_ids`` and ``get_latest`` to
``FastCheckpointStorage`` (over a MemoryStore, or a FileStore in a fresh directory) and to
Agent Framework's ``InMemoryCheckpointStorage``, the reference, and compares everything a
caller can observe after every step: returned ids, the checkpoints' values (types included,
so a tuple that comes back a list is a difference), exceptions, and what each workflow
lists. It also mutates what it saved and what it loaded (both storages promise copies) and
reopens the storage (a new storage object, over a new FileStore on the same directory: what
another process would find). After every step the runs view (``fastcheckpoint runs`` and
``show``) must hold one run per checkpoint the reference holds. A third machine saves with a
TTL and moves the clock; its reference forgets a checkpoint once the TTL has passed (the
page: expired means absent). Ids ``save`` refuses (over 4,080 bytes, a lone surrogate) are
only looked up, where both storages find nothing.

Normalizations, each a difference the Agent Framework page (docs/integrations/agent-framework.md)
documents, so not a finding:

* listings are compared as sets: the framework's storages promise no order ("the framework's
  own storages promise no order"); ours is checked separately to be oldest first by
  ``timestamp``, as the page promises;
* timestamps are always ISO 8601 text: the page says another ``timestamp`` is a
  ``ValidationError`` at ``save`` (the framework's storage accepts it and then fails in
  ``get_latest``);
* values are the ones the page lists as stored exactly (plus the application's classes named
  in ``checkpoint_types``): anything else is refused by design (no pickle), and so are
  integers outside 64 bits, lone surrogates and nesting over 100 levels (the page's limits);
* request events' response types of ``UNNAMED`` are refused (the page: they must be
  classes): such a save is checked to raise ``SerializationError`` and write nothing;
* a ``load`` of an unknown id raises ``WorkflowCheckpointNotFound``, which is the framework's
  ``WorkflowCheckpointException``: compared as that.

``AF_DIFF_EXAMPLES`` sets the examples per machine (hunting: a few thousand); the default
keeps each machine to a few seconds.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import functools
import os
import shutil
import tempfile
import typing
import unicodedata
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import pytest
from agent_framework import (
    Content,
    InMemoryCheckpointStorage,
    Message,
    WorkflowCheckpoint,
    WorkflowCheckpointException,
    WorkflowErrorDetails,
    WorkflowEvent,
    WorkflowRunState,
)
from agent_framework._serialization import SerializationMixin
from agent_framework._workflows._events import WorkflowEventSource
from agent_framework._workflows._runner_context import WorkflowMessage
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fastcheckpoint import CheckpointManager, CheckpointStatus, FileStore, MemoryStore, _ids
from fastcheckpoint.errors import SerializationError
from fastcheckpoint.integrations.agent_framework import RUN_PREFIX, FastCheckpointStorage
from fastcheckpoint.stores import CheckpointStore
from tests._helpers import FakeClock, make_config

T = TypeVar("T")


@dataclasses.dataclass
class Parcel:
    label: str
    weight: float
    sent: dt.datetime | None = None


class Lane(enum.Enum):
    SLOW = "slow"
    FAST = 2


class Address(pydantic.BaseModel):
    street: str
    lines: list[str] = []


TYPES = (Parcel, Lane, Address)

# -- the names the sequences use: few, so that saves overwrite and listings collide -----------

CHECKPOINT_IDS = (
    "a", "A", "", "../b", "caf\u00e9", unicodedata.normalize("NFD", "caf\u00e9"), "x" * 300,
)
WORKFLOWS = ("orders", "Orders", "", "w" * 300, "\u00fcber")
"""``w`` * 300 is over the label size: stored under a hash of the name."""
UNSTORABLE_IDS = ("\ud800", "y" * 4081)
"""Ids ``save`` refuses (a lone surrogate, over the page's 4,080 bytes): looked up only."""
LISTED_WORKFLOWS = (*WORKFLOWS, "\udfffx")

_UTC = dt.timezone.utc
INSTANTS = (
    dt.datetime(2026, 5, 1, 12, 0, tzinfo=_UTC),
    dt.datetime(2026, 5, 1, 12, 0, 0, 1, tzinfo=_UTC),
    dt.datetime(2026, 5, 1, 12, 0, 1, tzinfo=_UTC),
    dt.datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=_UTC),
    dt.datetime(3000, 1, 1, 0, 0, 0, 0, tzinfo=_UTC),
    dt.datetime(3000, 1, 1, 0, 0, 0, 1, tzinfo=_UTC),
    dt.datetime(9999, 12, 30, 0, 0, 0, 999998, tzinfo=_UTC),
    dt.datetime(9999, 12, 30, 0, 0, 0, 999999, tzinfo=_UTC),
)
"""A few instants, so that timestamps tie; pairs a microsecond apart, far from 1970 too."""
ZONES = (None, _UTC, dt.timezone(dt.timedelta(hours=5, minutes=30)),
         dt.timezone(-dt.timedelta(hours=8)))


@st.composite
def timestamps(draw: st.DrawFn) -> str:
    """An instant of ``INSTANTS`` written in one of the ways ISO 8601 allows (naive is UTC)."""
    instant = draw(st.sampled_from(INSTANTS))
    zone = draw(st.sampled_from(ZONES))
    local = instant.replace(tzinfo=None) if zone is None else instant.astimezone(zone)
    text = local.isoformat(timespec=draw(st.sampled_from(["auto", "microseconds"])))
    if zone is _UTC and draw(st.booleans()):
        text = text.replace("+00:00", "Z")
    return text


# -- values: those the page lists as stored exactly -------------------------------------------

texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=4)
zones = st.sampled_from([_UTC, dt.timezone(dt.timedelta(hours=-3), "BRT"),
                         dt.timezone(dt.timedelta(minutes=90))])
hashable_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True), texts, st.binary(max_size=4),
    st.datetimes(timezones=st.none() | zones), st.dates(), st.times(timezones=st.none() | zones),
    st.timedeltas(), st.uuids(), st.decimals(allow_nan=False, places=None),
    st.sampled_from(list(Lane)), st.sampled_from(list(WorkflowRunState)),
)
leaves = hashable_leaves | st.decimals(allow_nan=True) | st.builds(
    bytearray, st.binary(max_size=3)) | st.builds(
    Parcel, texts, st.floats(allow_nan=False), st.none() | st.datetimes(timezones=zones)
) | st.builds(Address, street=texts, lines=st.lists(texts, max_size=2)) | st.builds(
    WorkflowErrorDetails, texts, texts, st.none() | texts)
keys = texts | st.integers(-5, 5) | st.tuples(st.integers(0, 2), texts) | hashable_leaves | \
    st.frozensets(st.integers(0, 3), max_size=2)
framework_objects = st.builds(
    lambda role, text: Message(role=role, contents=[Content.from_text(text)]),
    st.sampled_from(["user", "assistant"]), texts)
values = st.recursive(leaves | framework_objects, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.tuples(inner, inner),
    st.frozensets(hashable_leaves, max_size=3), st.sets(hashable_leaves, max_size=3),
    st.dictionaries(keys, inner, max_size=3)), max_leaves=6)
states = st.dictionaries(texts, values | st.deferred(lambda: events() | messages), max_size=3)


UNNAMED = (list[str], typing.Optional[int], int | None)  # noqa: UP045 - the typing form
"""Response types a name cannot give back: refused by our storage (as by the framework's file
storage), which the page says (requests' types are classes)."""


@st.composite
def events(draw: st.DrawFn) -> WorkflowEvent[Any]:
    kind = draw(st.sampled_from(["request", "request", "custom", "failed", "superstep",
                                 "status"]))
    if kind == "request":
        data = draw(st.sampled_from(["ok?", 3, ("t", 1), None, b"raw", frozenset({1})])
                    | st.sampled_from(list(Lane)) | st.datetimes(timezones=zones) | st.builds(
            Parcel, texts, st.floats(allow_nan=False)) | st.builds(Address, street=texts))
        answer = draw(st.sampled_from([bool, str, int, Parcel, Lane, type(None)])
                      | st.sampled_from(UNNAMED))
        return WorkflowEvent.request_info(draw(texts), draw(texts), data, answer)
    if kind == "custom":
        return WorkflowEvent(draw(st.sampled_from(["output", "data"])), draw(values),  # type: ignore[arg-type]
                             executor_id=draw(st.none() | texts))
    if kind == "status":
        return WorkflowEvent("status", state=draw(st.sampled_from(list(WorkflowRunState))),
                             origin=draw(st.none() | st.sampled_from(list(WorkflowEventSource))))
    if kind == "failed":
        details = WorkflowErrorDetails(draw(texts), draw(texts), executor_id=draw(texts))
        return WorkflowEvent.executor_failed(draw(texts), details)
    return WorkflowEvent.superstep_completed(draw(st.integers(0, 5)), data=draw(values))


messages = st.builds(
    WorkflowMessage, data=values, source_id=texts, target_id=st.none() | texts,
    trace_contexts=st.none() | st.lists(st.dictionaries(texts, texts, max_size=1), max_size=1),
    source_span_ids=st.none() | st.lists(texts, max_size=1),
    original_request_info_event=st.none() | events())


@st.composite
def checkpoints(draw: st.DrawFn) -> WorkflowCheckpoint:
    return WorkflowCheckpoint(
        workflow_name=draw(st.sampled_from(WORKFLOWS)),
        graph_signature_hash=draw(texts),
        checkpoint_id=draw(st.sampled_from(CHECKPOINT_IDS)),
        previous_checkpoint_id=draw(st.none() | st.sampled_from(CHECKPOINT_IDS)),
        timestamp=draw(timestamps()),
        messages=draw(st.dictionaries(texts, st.lists(messages, max_size=2), max_size=2)),
        state=draw(states),
        pending_request_info_events=draw(st.dictionaries(texts, events(), max_size=2)),
        iteration_count=draw(st.integers(0, 2**40)),
        metadata=draw(st.dictionaries(texts, values, max_size=2)),
        version=draw(st.sampled_from(["1.0", "2"])),
    )


# -- comparing what a caller sees --------------------------------------------------------------


def observed(value: Any) -> Any:
    """A hashable picture of ``value`` that differs whenever a caller could tell two values
    apart: types are part of it (a tuple is not a list, 1 is not 1.0 nor True), floats and
    Decimals by their repr (NaN, -0.0), datetimes with their offset, zone name and fold."""
    if isinstance(value, WorkflowCheckpoint):
        return ("WorkflowCheckpoint", tuple(
            (field.name, observed(getattr(value, field.name)))
            for field in dataclasses.fields(value)))
    if isinstance(value, WorkflowEvent):
        return ("WorkflowEvent", tuple(sorted(
            (name, observed(item)) for name, item in vars(value).items())))
    if isinstance(value, SerializationMixin):  # no __eq__: compared by their fields
        return (type(value).__qualname__, observed(value.to_dict()))
    if isinstance(value, type):
        return ("type", value.__module__, value.__qualname__, id(value))
    if isinstance(value, enum.Enum):
        return ("enum", type(value).__qualname__, value.name)
    if dataclasses.is_dataclass(value):
        return (type(value).__qualname__, tuple(
            (field.name, observed(getattr(value, field.name)))
            for field in dataclasses.fields(value)))
    if isinstance(value, pydantic.BaseModel):
        return (type(value).__qualname__, observed(dict(value)))
    kind = type(value).__qualname__
    if isinstance(value, dict):
        # Order is observable (iteration): both storages keep insertion order.
        return (kind, tuple((observed(key), observed(item)) for key, item in value.items()))
    if isinstance(value, (list, tuple)):
        return (kind, tuple(observed(item) for item in value))
    if isinstance(value, (set, frozenset)):
        return (kind, frozenset(observed(item) for item in value))
    if isinstance(value, (float, decimal.Decimal)):
        return (kind, repr(value))
    if isinstance(value, (dt.datetime, dt.time)):
        return (kind, value.isoformat(), value.tzname(), value.fold)
    return (kind, value)


def _unnamed(value: Any) -> bool:
    """Whether a request event anywhere in ``value`` has a response type of ``UNNAMED``."""
    if isinstance(value, WorkflowCheckpoint):
        return _unnamed(value.to_dict())
    if isinstance(value, WorkflowMessage):
        return _unnamed(value.to_dict())
    if isinstance(value, WorkflowEvent):
        unnamed = value.type == "request_info" and any(
            value.response_type is answer for answer in UNNAMED)
        return unnamed or _unnamed(value.data)
    if isinstance(value, dict):
        return any(_unnamed(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_unnamed(item) for item in value)
    return False


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=_UTC)


def _moment(timestamp: str) -> dt.datetime:
    moment = dt.datetime.fromisoformat(timestamp)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=_UTC)


class StorageMachine(RuleBasedStateMachine):
    """``ours`` and ``reference`` get the same calls; every answer must agree."""

    STORE_KIND = "memory"
    TTL: float | None = None
    """With a TTL, the reference forgets a checkpoint that long after its save: the page's
    "expired means absent" (load raises, listings leave it out, delete returns False, the id
    may be saved again)."""
    TIME_SCALE = 1.0
    """The TTL and every clock move are multiplied by it: a store whose expiry also runs on
    another clock (Redis's own) sets it so that clock never gets there while a machine
    runs."""

    def __init__(self) -> None:
        super().__init__()
        self._exit = ExitStack()
        self.portal: BlockingPortal = self._exit.enter_context(
            start_blocking_portal(backend="asyncio"))
        self.directory = Path(tempfile.mkdtemp(prefix="fastcheckpoint-afdiff-"))
        self._exit.callback(shutil.rmtree, self.directory, ignore_errors=True)
        self.clock = FakeClock()
        self.ttl = None if self.TTL is None else self.TTL * self.TIME_SCALE
        self.stores: list[CheckpointStore] = []
        try:
            self.ours = self._open()
        except BaseException:
            self._exit.close()  # hypothesis calls teardown only on a machine it got
            raise
        self.reference = InMemoryCheckpointStorage()
        self.saved: list[WorkflowCheckpoint] = []
        """Checkpoints given to ``save``, which the machine later changes in place."""
        self.saved_at: dict[str, float] = {}
        self.paused: dict[str, bool | None] = {}
        """Whether each checkpoint's run should be PAUSED (``None``: not checked), as the page
        says: while it waits for responses, until a save naming it as the previous checkpoint,
        by a storage object that saved or loaded it while paused (``remembered``)."""
        self.remembered: set[str] = set()

    def open_store(self) -> CheckpointStore:
        """A new store object over the machine's backing (what another process opens).
        Callbacks it puts on ``self._exit`` (removing the backing) run after the stores
        are closed."""
        if self.STORE_KIND == "file":
            return FileStore(self.directory, fsync=False)
        if self.stores:
            return self.stores[0]  # a MemoryStore lives in one process: share it
        return MemoryStore()

    def _open(self) -> FastCheckpointStorage:
        store = self.open_store()
        if store not in self.stores:
            self.stores.append(store)
        return FastCheckpointStorage(store, checkpoint_types=TYPES, clock=self.clock,
                                     ttl_seconds=self.ttl)

    def call(self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        return self.portal.call(functools.partial(func, *args, **kwargs))

    def both(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        """``(ours, reference)``: each side's result, or the exception it raised."""
        self._expire()
        answers: list[Any] = []
        for storage in (self.ours, self.reference):
            try:
                answers.append(self.call(getattr(storage, name), *args, **kwargs))
            except Exception as exc:  # each side's exception is compared
                answers.append(exc)
        return answers[0], answers[1]

    def _expire(self) -> None:
        if self.ttl is None:
            return
        for checkpoint_id, saved_at in list(self.saved_at.items()):
            if saved_at + self.ttl <= self.clock.now:
                del self.saved_at[checkpoint_id]
                self.paused.pop(checkpoint_id, None)
                self.call(self.reference.delete, checkpoint_id)

    def teardown(self) -> None:
        try:
            for store in self.stores:
                self.call(store.aclose)
        finally:
            self._exit.close()

    # -- rules ----------------------------------------------------------------------------------

    @rule(checkpoint=checkpoints())
    def save(self, checkpoint: WorkflowCheckpoint) -> None:
        if _unnamed(checkpoint):
            with pytest.raises(SerializationError):
                self.call(self.ours.save, checkpoint)
            return  # nothing written: the invariants compare with the reference unchanged
        ours, reference = self.both("save", checkpoint)
        assert not isinstance(ours, Exception), f"ours raised {ours!r}"
        assert ours == reference == checkpoint.checkpoint_id
        self.saved.append(checkpoint)
        self.saved_at[checkpoint.checkpoint_id] = self.clock.now
        saved_id, previous = checkpoint.checkpoint_id, checkpoint.previous_checkpoint_id
        waiting = bool(checkpoint.pending_request_info_events)
        self.paused[saved_id] = waiting if previous != saved_id else None
        if waiting:
            self.remembered.add(saved_id)
        if previous in self.remembered and previous != saved_id:
            self.remembered.discard(previous)
            if previous in self.paused:
                self.paused[previous] = False  # approved: the workflow went on from it

    @precondition(lambda self: bool(self.saved))
    @rule(index=st.integers(0, 50), state=states)
    def change_what_was_saved(self, index: int, state: dict[str, Any]) -> None:
        """Both storages stored a snapshot: changing the object afterwards changes nothing."""
        saved = self.saved[index % len(self.saved)]
        saved.state.clear()
        saved.state.update(state)
        saved.metadata["changed"] = True
        for messages in saved.messages.values():
            messages.clear()

    @rule(checkpoint_id=st.sampled_from(CHECKPOINT_IDS + UNSTORABLE_IDS), change=st.booleans())
    def load(self, checkpoint_id: str, change: bool) -> None:
        ours, reference = self.both("load", checkpoint_id)
        if isinstance(reference, WorkflowCheckpointException):
            assert isinstance(ours, WorkflowCheckpointException), f"ours gave {ours!r}"
            return
        assert not isinstance(ours, Exception), f"ours raised {ours!r}"
        assert observed(ours) == observed(reference)
        if self.paused.get(checkpoint_id):
            self.remembered.add(checkpoint_id)
        if change:  # a copy: the next load does not see it
            ours.state["changed"] = True
            ours.metadata.clear()

    @rule(checkpoint_id=st.sampled_from(CHECKPOINT_IDS + UNSTORABLE_IDS))
    def delete(self, checkpoint_id: str) -> None:
        ours, reference = self.both("delete", checkpoint_id)
        assert ours is reference, f"ours {ours!r}, reference {reference!r}"
        self.paused.pop(checkpoint_id, None)

    @rule(workflow=st.sampled_from(LISTED_WORKFLOWS), change=st.booleans())
    def list_checkpoints(self, workflow: str, change: bool) -> None:
        ours, reference = self.both("list_checkpoints", workflow_name=workflow)
        assert not isinstance(ours, Exception), f"ours raised {ours!r}"
        by_id = {checkpoint.checkpoint_id: observed(checkpoint) for checkpoint in ours}
        assert len(by_id) == len(ours), "an id listed twice"
        assert by_id == {checkpoint.checkpoint_id: observed(checkpoint)
                         for checkpoint in reference}
        moments = [_moment(checkpoint.timestamp) for checkpoint in ours]
        assert moments == sorted(moments), "not oldest first by timestamp"
        if change and ours:
            ours[0].state["changed"] = True

    @precondition(lambda self: self.TTL is not None)
    @rule(seconds=st.sampled_from([1.0, 4.0, 10.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds * self.TIME_SCALE)

    @rule()
    def reopen(self) -> None:
        """A new storage object (over a new FileStore on the directory): what another process
        finds."""
        self.ours = self._open()
        self.remembered = set()

    # -- after every step -----------------------------------------------------------------------

    @invariant()
    def listings_agree(self) -> None:
        for workflow in LISTED_WORKFLOWS:
            ours, reference = self.both("list_checkpoint_ids", workflow_name=workflow)
            assert not isinstance(ours, Exception), f"ours raised {ours!r}"
            assert sorted(ours) == sorted(reference), workflow[:20]
            latest, expected = self.both("get_latest", workflow_name=workflow)
            assert not isinstance(latest, Exception), f"ours raised {latest!r}"
            assert observed(latest) == observed(expected), workflow[:20]

    @invariant()
    def runs_agree(self) -> None:
        """What ``fastcheckpoint runs`` and ``show`` see: one run per checkpoint the reference
        holds, naming its workflow, lineage and exact timestamp; PAUSED while it waits for
        responses, until this storage object saves one naming it as the previous checkpoint
        (the page's "Waiting for responses")."""
        self._expire()
        manager = CheckpointManager(self.ours.store, config=make_config(self.clock))
        expected: dict[str, WorkflowCheckpoint] = self.reference._checkpoints
        assert self.call(manager.count_runs) == len(expected)
        for checkpoint_id in CHECKPOINT_IDS:
            run = self.call(manager.get_run, RUN_PREFIX + checkpoint_id)
            checkpoint = expected.get(checkpoint_id)
            if checkpoint is None:
                assert run is None, checkpoint_id[:20]
                continue
            assert run is not None, checkpoint_id[:20]
            assert run.checkpoint_count == 1
            assert run.metadata["workflow"] == checkpoint.workflow_name
            assert run.metadata["previous_checkpoint_id"] == checkpoint.previous_checkpoint_id
            assert run.metadata["timestamp_us"] == (
                _moment(checkpoint.timestamp) - _EPOCH) // dt.timedelta(microseconds=1)
            paused = self.paused[checkpoint_id]
            if paused is not None:
                assert (run.status is CheckpointStatus.PAUSED) is paused, (
                    checkpoint_id[:20], run.status)


def _settings(examples: int) -> settings:
    """``examples`` per machine in CI (each machine about a second on an idle machine), or
    ``AF_DIFF_EXAMPLES``."""
    return settings(
        max_examples=int(os.environ.get("AF_DIFF_EXAMPLES", examples)),
        stateful_step_count=15,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


class FileStorageMachine(StorageMachine):
    STORE_KIND = "file"


class ExpiringStorageMachine(StorageMachine):
    TTL = 10.0


TestAgainstTheFrameworkOnMemoryStore = StorageMachine.TestCase
TestAgainstTheFrameworkOnMemoryStore.settings = _settings(6)
TestAgainstTheFrameworkOnFileStore = FileStorageMachine.TestCase
TestAgainstTheFrameworkOnFileStore.settings = _settings(4)
TestAgainstTheFrameworkWithExpiry = ExpiringStorageMachine.TestCase
TestAgainstTheFrameworkWithExpiry.settings = _settings(6)


# -- what the machine found, each pinned by a deterministic test ---------------------------------


def _both_storages() -> tuple[FastCheckpointStorage, InMemoryCheckpointStorage]:
    return FastCheckpointStorage(MemoryStore(), checkpoint_types=TYPES), \
        InMemoryCheckpointStorage()


def _at(timestamp: str, checkpoint_id: str, workflow: str = "orders") -> WorkflowCheckpoint:
    return WorkflowCheckpoint(workflow, "hash", checkpoint_id=checkpoint_id, timestamp=timestamp)


@pytest.mark.anyio
async def test_timestamps_a_microsecond_apart_far_from_1970_are_ordered() -> None:
    """Epoch seconds as a float hold no microseconds after the year 2242: in the year 3000
    the two timestamps were equal, so ``get_latest`` took the greater id and the listing
    came in save order."""
    for storage in _both_storages():
        await storage.save(_at("3000-01-01T00:00:00.000001+00:00", "a-later"))
        await storage.save(_at("3000-01-01T00:00:00+00:00", "b-earlier"))
        latest = await storage.get_latest(workflow_name="orders")
        assert latest is not None
        assert latest.checkpoint_id == "a-later", type(storage).__name__
    ours = _both_storages()[0]
    await ours.save(_at("9999-12-30T00:00:00.999999", "a-later"))
    await ours.save(_at("9999-12-30T00:00:00.999998", "b-earlier"))
    assert await ours.list_checkpoint_ids(workflow_name="orders") == ["b-earlier", "a-later"]


@pytest.mark.anyio
async def test_runs_saved_with_epoch_seconds_only_still_list_in_order() -> None:
    """A run whose details a release before the exact timestamps wrote (epoch seconds only)
    lists by those seconds."""
    ours = _both_storages()[0]
    for seconds, checkpoint_id in ((2, "a"), (1, "b")):
        await ours.save(_at(f"2026-05-01T12:00:0{seconds}+00:00", checkpoint_id))
    store, codec = ours.store, ours._codec.codec
    for checkpoint_id in ("a", "b"):
        key = _ids.key_of(RUN_PREFIX + checkpoint_id)
        run = await store.get_run(key, now=ours._clock())
        assert run is not None
        details = codec.decode_run_data(run.data, "test")
        del details.metadata["timestamp_us"]
        await store.update_run(key, incarnation=run.incarnation, version=run.version,
                               status=run.status,
                               data=codec.encode_run_data(details), now=ours._clock())
    assert await ours.list_checkpoint_ids(workflow_name="orders") == ["b", "a"]
    latest = await ours.get_latest(workflow_name="orders")
    assert latest is not None
    assert latest.checkpoint_id == "a"


@pytest.mark.anyio
@pytest.mark.parametrize("answer", [typing.Optional[int], list[str]],  # noqa: UP045
                         ids=["Optional", "generic"])
async def test_request_types_their_name_does_not_give_back_are_refused(answer: Any) -> None:
    """``typing.Optional[int]`` was stored as ``typing.Optional``, which names no type: the
    checkpoint was saved and every ``load`` of it raised CorruptCheckpointError; ``list[str]``
    came back ``list``. Both are refused when saved now, and nothing is written."""
    ours = _both_storages()[0]
    request = WorkflowEvent.request_info("r1", "approver", "ok?", answer)
    checkpoint = WorkflowCheckpoint("orders", "hash", pending_request_info_events={"r1": request})
    with pytest.raises(SerializationError, match="response_type"):
        await ours.save(checkpoint)
    with pytest.raises(WorkflowCheckpointException):
        await ours.load(checkpoint.checkpoint_id)
    assert await ours.list_checkpoint_ids(workflow_name="orders") == []


@pytest.mark.anyio
async def test_a_workflow_name_no_save_can_store_has_no_checkpoints() -> None:
    """A name with a lone surrogate raised ValidationError from the listings; the framework
    lists nothing, as ``load`` and ``delete`` of such an id already found nothing."""
    for storage in _both_storages():
        assert await storage.list_checkpoint_ids(workflow_name="\ud800") == []
        assert await storage.list_checkpoints(workflow_name="\ud800") == []
        assert await storage.get_latest(workflow_name="\ud800") is None


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["memory", "file"])
async def test_listings_over_many_pages_agree(kind: str, tmp_path: Path) -> None:
    """Listings read a workflow's runs 100 at a time: 101 checkpoints of a workflow (ties on
    timestamps across pages, replaced ids, another workflow's in between) list as the
    reference does."""
    store = MemoryStore() if kind == "memory" else FileStore(tmp_path, fsync=False)
    ours = FastCheckpointStorage(store)
    reference = InMemoryCheckpointStorage()
    try:
        for index in range(106):
            saved = _at(f"2026-05-01T12:{index % 7:02d}:00+00:00", f"c{index % 104}",
                        "other" if index in (3, 50, 77) else "orders")
            saved.previous_checkpoint_id = f"c{(index * 7) % 104}"
            for storage in (ours, reference):
                await storage.save(saved)
        assert len(await ours.list_checkpoint_ids(workflow_name="orders")) == 101
        for workflow in ("orders", "other"):
            ids = await ours.list_checkpoint_ids(workflow_name=workflow)
            assert sorted(ids) == sorted(
                await reference.list_checkpoint_ids(workflow_name=workflow))
            listed = await ours.list_checkpoints(workflow_name=workflow)
            assert [checkpoint.checkpoint_id for checkpoint in listed] == ids
            moments = [_moment(checkpoint.timestamp) for checkpoint in listed]
            assert moments == sorted(moments)
            latest = await ours.get_latest(workflow_name=workflow)
            expected = await reference.get_latest(workflow_name=workflow)
            assert observed(latest) == observed(expected)
    finally:
        await store.aclose()
