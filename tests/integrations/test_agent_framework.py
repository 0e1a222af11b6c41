"""The Agent Framework checkpoint storage: the storage protocol on every kind of store (with
TTL and refusals), the behaviours of the framework's own storages (run side by side with
its in-memory storage), request budgets, PAUSED checkpoints, and real workflows resumed in
a new process."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import enum
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pydantic
import pytest
from agent_framework import (
    AgentResponse,
    Content,
    Executor,
    InMemoryCheckpointStorage,
    Message,
    WorkflowBuilder,
    WorkflowCheckpoint,
    WorkflowCheckpointException,
    WorkflowContext,
    WorkflowErrorDetails,
    WorkflowEvent,
    WorkflowRunState,
    handler,
    response_handler,
)
from agent_framework._workflows._runner_context import WorkflowMessage

from fastcheckpoint import CheckpointManager, CheckpointStatus, MemoryStore, _ids
from fastcheckpoint.errors import (
    CheckpointNotFound,
    ConfigurationError,
    CorruptCheckpointError,
    SerializationError,
    ValidationError,
)
from fastcheckpoint.integrations import agent_framework as adapter
from fastcheckpoint.integrations.agent_framework import (
    FastCheckpointStorage,
    WorkflowCheckpointNotFound,
)
from fastcheckpoint.stores import MAX_LABEL_BYTES
from tests._helpers import T0, FakeClock, cancelled_after
from tests.integrations import agent_framework_worker as worker
from tests.integrations._langgraph_support import METHODS, CountingStore
from tests.integrations.conftest import FreshStore

pytestmark = pytest.mark.anyio

DEADLINE = 20
STORE_DEADLINE = 60
"""For the tests that run on every kind of store (S3 and DynamoDB on moto are slow)."""
WORKER = Path(__file__).resolve().parent / "agent_framework_worker.py"
ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class Order:
    item: str
    quantity: int
    placed: dt.datetime


class Priority(enum.Enum):
    LOW = "low"
    HIGH = "high"


class Customer(pydantic.BaseModel):
    name: str
    tags: list[str]


@dataclasses.dataclass
class Unregistered:
    value: int


TYPES: list[type[Any]] = [Order, Priority, Customer]


def _checkpoint(workflow: str = "orders", **fields: Any) -> WorkflowCheckpoint:
    return WorkflowCheckpoint(workflow_name=workflow, graph_signature_hash="hash", **fields)


def _at(seconds: float) -> str:
    return dt.datetime.fromtimestamp(T0 + seconds, dt.timezone.utc).isoformat()


def _rich() -> WorkflowCheckpoint:
    """A checkpoint with the values workflows hold: messages, a pending request, plain and
    typed state, the application's own classes."""
    placed = dt.datetime(2026, 5, 1, 12, 30, tzinfo=dt.timezone.utc)
    order = Order("tea", 3, placed)
    request = WorkflowEvent.request_info("req-1", "approver", order, bool)
    message = WorkflowMessage(data=["a", ("b", 2)], source_id="start", target_id="approver")
    return _checkpoint(
        messages={"start": [message]},
        state={"order": order, "priority": Priority.HIGH, "customer": Customer(
            name="Ada", tags=["vip"]), "ids": frozenset({1, 2}), "pair": (1, "x"),
            "when": placed, "uuid": uuid.UUID(int=7), "nested": {"deep": [1.5, None, True]}},
        pending_request_info_events={"req-1": request},
        iteration_count=3, metadata={"superstep": 3},
    )


def _same(first: WorkflowCheckpoint, second: WorkflowCheckpoint) -> None:
    """The two checkpoints hold the same values, framework objects compared by fields."""
    assert first.to_dict().keys() == second.to_dict().keys()
    for name in ("workflow_name", "graph_signature_hash", "checkpoint_id",
                 "previous_checkpoint_id", "timestamp", "state", "iteration_count",
                 "metadata", "version"):
        assert getattr(first, name) == getattr(second, name), name
    assert {key: [message.to_dict() for message in messages]
            for key, messages in first.messages.items()} == {
        key: [message.to_dict() for message in messages]
        for key, messages in second.messages.items()}
    assert {key: event.to_dict() for key, event in first.pending_request_info_events.items()} == {
        key: event.to_dict() for key, event in second.pending_request_info_events.items()}


@pytest.fixture
async def storage(clock: FakeClock) -> AsyncIterator[FastCheckpointStorage]:
    async with FastCheckpointStorage(MemoryStore(), checkpoint_types=TYPES,
                                     clock=clock) as built:
        yield built


# -- the protocol on every kind of store ---------------------------------------------------


async def test_protocol_on_every_store(fresh_store: FreshStore, clock: FakeClock) -> None:
    with anyio.fail_after(STORE_DEADLINE):
        async with fresh_store() as store:
            storage = FastCheckpointStorage(store, checkpoint_types=TYPES, clock=clock)
            rich = _rich()
            rich.timestamp = _at(2)
            older = _checkpoint(timestamp=_at(1), state={"n": 1})
            newest = _checkpoint(timestamp=_at(3), state={"n": 3})
            other = _checkpoint("other", timestamp=_at(9))
            for saved in (newest, rich, other, older):  # created out of timestamp order
                assert await storage.save(saved) == saved.checkpoint_id
                clock.advance(1)

            _same(await storage.load(rich.checkpoint_id), rich)
            loaded = await storage.load(rich.checkpoint_id)
            assert isinstance(loaded.state["order"], Order)
            assert type(loaded.state["pair"]) is tuple
            assert loaded.pending_request_info_events["req-1"].response_type is bool
            expected = [older.checkpoint_id, rich.checkpoint_id, newest.checkpoint_id]
            assert await storage.list_checkpoint_ids(workflow_name="orders") == expected
            listed = await storage.list_checkpoints(workflow_name="orders")
            assert [found.checkpoint_id for found in listed] == expected
            _same(listed[1], rich)
            latest = await storage.get_latest(workflow_name="orders")
            assert latest is not None
            assert latest.checkpoint_id == newest.checkpoint_id
            assert await storage.get_latest(workflow_name="nobody") is None
            assert await storage.list_checkpoints(workflow_name="nobody") == []

            replaced = _checkpoint("moved", checkpoint_id=newest.checkpoint_id,
                                   timestamp=_at(0), state={"n": "again"})
            await storage.save(replaced)
            assert (await storage.load(newest.checkpoint_id)).state == {"n": "again"}
            assert newest.checkpoint_id not in await storage.list_checkpoint_ids(
                workflow_name="orders")
            assert await storage.list_checkpoint_ids(workflow_name="moved") == [
                newest.checkpoint_id]

            assert await storage.delete(rich.checkpoint_id) is True
            assert await storage.delete(rich.checkpoint_id) is False
            with pytest.raises(WorkflowCheckpointException):
                await storage.load(rich.checkpoint_id)
            with pytest.raises(WorkflowCheckpointException):
                await storage.load("never-saved")
            assert await storage.list_checkpoint_ids(workflow_name="orders") == [
                older.checkpoint_id]


async def test_ttl_on_every_store(fresh_store: FreshStore, clock: FakeClock) -> None:
    with anyio.fail_after(STORE_DEADLINE):
        async with fresh_store() as store:
            storage = FastCheckpointStorage(store, ttl_seconds=10, clock=clock)
            first = _checkpoint(timestamp=_at(0))
            await storage.save(first)
            clock.advance(6)
            second = _checkpoint(timestamp=_at(6))
            await storage.save(second)
            clock.advance(5)  # the first is 11 s old, the second 5 s

            with pytest.raises(WorkflowCheckpointNotFound):
                await storage.load(first.checkpoint_id)
            assert (await storage.load(second.checkpoint_id)).checkpoint_id == \
                second.checkpoint_id
            assert await storage.list_checkpoint_ids(workflow_name="orders") == [
                second.checkpoint_id]
            assert await storage.delete(first.checkpoint_id) is False
            clock.advance(5)
            assert await storage.get_latest(workflow_name="orders") is None
            assert await storage.list_checkpoints(workflow_name="orders") == []
            again = _checkpoint(checkpoint_id=first.checkpoint_id, timestamp=_at(16))
            await storage.save(again)  # an expired id is free again
            assert (await storage.load(first.checkpoint_id)).timestamp == _at(16)


async def test_refusal_writes_nothing_on_every_store(
    fresh_store: FreshStore, clock: FakeClock
) -> None:
    with anyio.fail_after(STORE_DEADLINE):
        async with fresh_store() as store:
            counting = CountingStore(store)
            storage = FastCheckpointStorage(counting, clock=clock)  # type: ignore[arg-type]
            refused = _checkpoint(state={"ok": 1, "lock": {"inner": [object()]}})
            with pytest.raises(SerializationError, match="lock"):
                await storage.save(refused)
            with pytest.raises(SerializationError, match="checkpoint_types"):
                await storage.save(_checkpoint(state={"value": Unregistered(1)}))
            assert counting.take() == {}
            with pytest.raises(WorkflowCheckpointNotFound):
                await storage.load(refused.checkpoint_id)
            assert await storage.list_checkpoint_ids(workflow_name="orders") == []


# -- what the framework's own storages do, side by side with its in-memory storage ----------


Made = Callable[..., Any]


@pytest.fixture(params=["framework", "fastcheckpoint"])
def either(request: pytest.FixtureRequest) -> Made:
    """Builds the framework's in-memory storage or ours (given the application's types)."""
    if request.param == "framework":
        return lambda types=(): InMemoryCheckpointStorage()
    return lambda types=(): FastCheckpointStorage(MemoryStore(), checkpoint_types=types)


async def test_copies_are_the_callers(either: Made) -> None:
    with anyio.fail_after(DEADLINE):
        storage = either()
        message = WorkflowMessage(source_id="a", target_id="b", data={"text": "original"})
        event = WorkflowEvent(type="test", data="original")  # type: ignore[arg-type]
        checkpoint = _checkpoint(state={"nested": {"deep": "original"}},
                                 messages={"a": [message]}, metadata={"m": {"v": "original"}},
                                 pending_request_info_events={"r": event})
        saved = await storage.save(checkpoint)
        assert saved == checkpoint.checkpoint_id
        checkpoint.state["nested"]["deep"] = "mutated"  # after save: not stored
        loaded = await storage.load(saved)
        loaded.messages["a"][0].data["text"] = "mutated"
        loaded.pending_request_info_events["r"].data = "mutated"
        loaded.metadata["m"]["v"] = "mutated"
        latest = await storage.get_latest(workflow_name="orders")
        latest.state["nested"]["deep"] = "mutated"
        listed = await storage.list_checkpoints(workflow_name="orders")
        listed[0].state["nested"]["deep"] = "mutated"

        again = await storage.load(saved)
        assert again.state["nested"]["deep"] == "original"
        assert again.messages["a"][0].data["text"] == "original"
        assert again.pending_request_info_events["r"].data == "original"
        assert again.pending_request_info_events["r"].type == "test"
        assert again.metadata["m"]["v"] == "original"


async def test_filters_latest_and_unknown_ids(either: Made) -> None:
    with anyio.fail_after(DEADLINE):
        storage = either()
        first, second = _checkpoint("w1", timestamp=_at(1)), _checkpoint("w1", timestamp=_at(2))
        third = _checkpoint("w2", timestamp=_at(3))
        for checkpoint in (first, second, third):
            await storage.save(checkpoint)
        assert set(await storage.list_checkpoint_ids(workflow_name="w1")) == {
            first.checkpoint_id, second.checkpoint_id}
        assert [found.workflow_name for found in await storage.list_checkpoints(
            workflow_name="w2")] == ["w2"]
        latest = await storage.get_latest(workflow_name="w1")
        assert latest is not None
        assert latest.checkpoint_id == second.checkpoint_id
        assert await storage.get_latest(workflow_name="unknown") is None
        assert await storage.list_checkpoint_ids(workflow_name="unknown") == []
        with pytest.raises(WorkflowCheckpointException):
            await storage.load("nonexistent-id")
        assert await storage.delete(first.checkpoint_id) is True
        assert await storage.delete(first.checkpoint_id) is False
        with pytest.raises(WorkflowCheckpointException):
            await storage.load(first.checkpoint_id)


async def test_values_round_trip_like_the_framework(either: Made) -> None:
    with anyio.fail_after(DEADLINE):
        storage = either(TYPES)
        rich = _rich()
        await storage.save(rich)
        loaded = await storage.load(rich.checkpoint_id)
        _same(loaded, rich)
        assert type(loaded.state["ids"]) is frozenset
        assert loaded.state["priority"] is Priority.HIGH
        assert isinstance(loaded.state["customer"], Customer)
        assert loaded.messages["start"][0].data == ["a", ("b", 2)]


async def test_framework_objects_round_trip(storage: FastCheckpointStorage) -> None:
    with anyio.fail_after(DEADLINE):
        message = Message(role="user", contents=[Content.from_text("hello")])
        details = WorkflowErrorDetails("ValueError", "bad", executor_id="x")
        failed = WorkflowEvent.executor_failed("x", details)
        saved = _checkpoint(state={"_executor_state": {"agent": {
            "cache": [message], "response": AgentResponse(messages=[message]),
            "failure": failed, "run_state": WorkflowRunState.IDLE}}})
        await storage.save(saved)
        state = (await storage.load(saved.checkpoint_id)).state["_executor_state"]["agent"]
        assert type(state["cache"][0]) is Message
        assert (state["cache"][0].role, state["cache"][0].text) == ("user", "hello")
        assert type(state["response"]) is AgentResponse
        assert state["response"].text == "hello"
        assert state["failure"].type == "executor_failed"
        assert state["failure"].executor_id == "x"
        assert state["failure"].details == details
        assert state["run_state"] is WorkflowRunState.IDLE


# -- errors, refusals and configuration -------------------------------------------------------


async def test_saves_of_one_id_from_many_storages_all_land(clock: FakeClock) -> None:
    """Four storages saving one checkpoint id eight times each, at once: every save lands
    (each replaces the one before, as the framework's own storages overwrite); the last one
    is what loads. Losing writers back off instead of giving up after a few tries."""
    store = MemoryStore()
    storages = [FastCheckpointStorage(store, clock=clock) for _ in range(4)]

    async def saver(index: int) -> None:
        for round_ in range(8):
            await storages[index].save(_checkpoint(checkpoint_id="same",
                                                   state={"by": index, "round": round_}))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            for index in range(4):
                group.start_soon(saver, index)
        loaded = await storages[0].load("same")
        ids = await storages[1].list_checkpoint_ids(workflow_name="orders")

    assert ids == ["same"]
    assert loaded.state["round"] == 7
    run = await CheckpointManager(store).get_run(adapter.RUN_PREFIX + "same")
    assert run is not None
    assert run.checkpoint_count == 1


async def test_unknown_id_is_both_exception_types(storage: FastCheckpointStorage) -> None:
    with anyio.fail_after(DEADLINE):
        with pytest.raises(WorkflowCheckpointException) as caught:
            await storage.load("missing")
        assert isinstance(caught.value, CheckpointNotFound)
        with pytest.raises(WorkflowCheckpointNotFound):
            await storage.load("x" * 5000)  # longer than any run id: nothing stored there
        assert await storage.delete("x" * 5000) is False
        with pytest.raises(ValidationError):
            await storage.load(42)  # type: ignore[arg-type]


async def test_refusals_name_the_value(storage: FastCheckpointStorage) -> None:
    with anyio.fail_after(DEADLINE):
        with pytest.raises(SerializationError, match=r"Unregistered.*checkpoint_types"):
            await storage.save(_checkpoint(messages={"a": [WorkflowMessage(
                data=Unregistered(1), source_id="a")]}))
        with pytest.raises(ValidationError, match="ISO 8601"):
            await storage.save(_checkpoint(timestamp="yesterday"))
        with pytest.raises(ValidationError, match="WorkflowCheckpoint"):
            await storage.save({"checkpoint_id": "x"})  # type: ignore[arg-type]
        assert await storage.list_checkpoint_ids(workflow_name="orders") == []


async def test_loading_needs_the_types(clock: FakeClock) -> None:
    with anyio.fail_after(DEADLINE):
        store = MemoryStore()
        writer = FastCheckpointStorage(store, checkpoint_types=[Order], clock=clock)
        saved = _checkpoint(state={"order": Order("tea", 1, dt.datetime(2026, 1, 1))})
        await writer.save(saved)
        reader = FastCheckpointStorage(store, clock=clock)
        with pytest.raises(SerializationError, match="Order"):
            await reader.load(saved.checkpoint_id)
        assert (await writer.load(saved.checkpoint_id)).state == saved.state


async def test_long_workflow_names_are_hashed(storage: FastCheckpointStorage) -> None:
    with anyio.fail_after(DEADLINE):
        name = "w" * (MAX_LABEL_BYTES + 10)
        assert len(adapter.workflow_label(name).encode()) <= MAX_LABEL_BYTES
        saved = _checkpoint(name, timestamp=_at(1))
        await storage.save(saved)
        await storage.save(_checkpoint(name[:-1] + "x", timestamp=_at(2)))
        assert await storage.list_checkpoint_ids(workflow_name=name) == [saved.checkpoint_id]


def test_configuration_is_checked() -> None:
    for bad in (0, 10**400, 1e300):  # the last two: beyond a float, beyond what stores keep
        with pytest.raises(ConfigurationError, match="ttl_seconds"):
            FastCheckpointStorage(MemoryStore(), ttl_seconds=bad)
    with pytest.raises(ConfigurationError, match="CheckpointStore"):
        FastCheckpointStorage(object())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="not a dataclass"):
        FastCheckpointStorage(MemoryStore(), checkpoint_types=[dict])
    assert FastCheckpointStorage(MemoryStore(), ttl_seconds=5).ttl_seconds == 5.0


async def test_closes_only_the_store_it_opened(tmp_path: Path) -> None:
    with anyio.fail_after(DEADLINE):
        given = CountingStore(MemoryStore())
        async with FastCheckpointStorage(given):  # type: ignore[arg-type]
            pass
        assert given.calls["aclose"] == 0
        url = f"sqlite:///{tmp_path / 'env.db'}"
        environ = {"FASTCHECKPOINT_URL": url, "FASTCHECKPOINT_DEFAULT_TTL_SECONDS": "60"}
        async with FastCheckpointStorage.from_env(environ) as storage:
            assert storage.ttl_seconds == 60.0
            saved = _checkpoint()
            await storage.save(saved)
            closing = CountingStore(storage.store)
            storage._store = closing  # type: ignore[assignment]
        assert closing.calls["aclose"] == 1
        async with FastCheckpointStorage(url) as reopened:
            assert (await reopened.load(saved.checkpoint_id)).checkpoint_id == \
                saved.checkpoint_id


# -- request budgets --------------------------------------------------------------------------


class _Watched(CountingStore):
    """A store whose every call first awaits ``before(method)`` (a reader in between, or
    the process dying there)."""

    def __init__(self, inner: Any, before: Callable[[str], Any]) -> None:
        super().__init__(inner)
        self.before = before


def _watching(name: str) -> Callable[..., Any]:
    async def watched(self: _Watched, *args: Any, **kwargs: Any) -> Any:
        await self.before(name)
        return await getattr(CountingStore, name)(self, *args, **kwargs)

    return watched


for _method in METHODS:
    setattr(_Watched, _method, _watching(_method))


class _Died(Exception):
    """The saving process died before this store call."""


async def test_replacing_a_checkpoint_leaves_the_old_or_the_new_one_at_every_moment(
    fresh_store: FreshStore, clock: FakeClock
) -> None:
    """Between any two store calls of a save over an existing id, a reader finds the old
    checkpoint or the new one (never none), and so does one after the saving process died
    there; the details follow the checkpoint once the save returns."""
    with anyio.fail_after(STORE_DEADLINE):
        async with fresh_store() as store:
            reader = FastCheckpointStorage(store, clock=clock)
            seen: list[Any] = []
            old = _checkpoint(timestamp=_at(1), state={"n": "old"})
            await reader.save(old)

            async def read_between(name: str) -> None:
                seen.append((await reader.load(old.checkpoint_id)).state["n"])

            writer = FastCheckpointStorage(_Watched(store, read_between), clock=clock)
            new = _checkpoint(checkpoint_id=old.checkpoint_id, timestamp=_at(5),
                              state={"n": "new"}, previous_checkpoint_id="parent")
            await writer.save(new)
            assert seen == ["old", "old", "old", "new"]  # before each of its 4 calls
            _same(await reader.load(old.checkpoint_id), new)
            assert await reader.list_checkpoint_ids(workflow_name="orders") == [
                old.checkpoint_id]
            latest = await reader.get_latest(workflow_name="orders")
            assert latest is not None
            assert latest.state == {"n": "new"}

            for dies_at in range(4):
                calls = 0

                async def die(name: str, dies_at: int = dies_at) -> None:
                    nonlocal calls
                    calls += 1
                    if calls > dies_at:
                        raise _Died(name)

                clock.advance(1)
                dying = FastCheckpointStorage(_Watched(store, die), clock=clock)
                again = _checkpoint(checkpoint_id=old.checkpoint_id, timestamp=_at(10),
                                    state={"n": f"died at {dies_at}"})
                with pytest.raises(_Died):
                    await dying.save(again)
                found = (await reader.load(old.checkpoint_id)).state["n"]
                assert found in ("new", f"died at {dies_at - 1}", f"died at {dies_at}")
                await reader.save(new)  # the next round replaces "new" again


class _Yielding(MemoryStore):
    """Every write suspends before and after it: room for a cancellation between calls."""

    async def append(self, run_key: str, record: Any, **options: Any) -> Any:
        await asyncio.sleep(0)
        found = await super().append(run_key, record, **options)
        await asyncio.sleep(0)
        return found

    async def update_run(self, run_key: str, **options: Any) -> Any:  # type: ignore[override]
        await asyncio.sleep(0)
        found = await super().update_run(run_key, **options)
        await asyncio.sleep(0)
        return found


async def test_a_cancelled_replacement_leaves_the_old_checkpoint_or_the_new_one_described(
    clock: FakeClock,
) -> None:
    """Saving over an id, cancelled at every point: the stored checkpoint is the old one
    with the old details, or the new one with its own (its place in the listing, PAUSED for
    its pending request), never the new one described as the old."""
    outcomes = set()
    with anyio.fail_after(DEADLINE):
        for delay in range(60):
            if ("returned", True) in outcomes:
                break
            store = _Yielding()
            storage = FastCheckpointStorage(store, clock=clock)
            await storage.save(_checkpoint(checkpoint_id="X", timestamp=_at(0), state={"n": 0}))
            await storage.save(_checkpoint(checkpoint_id="Y", timestamp=_at(5)))
            request = WorkflowEvent.request_info("req-1", "approver", "ok?", str)
            outcome = await cancelled_after(storage.save(_checkpoint(
                checkpoint_id="X", timestamp=_at(10), state={"n": 10},
                pending_request_info_events={"req-1": request})), delay)
            reader = FastCheckpointStorage(store, clock=clock)
            replaced = (await reader.load("X")).state == {"n": 10}
            outcomes.add((outcome, replaced))
            latest = await reader.get_latest(workflow_name="orders")
            run = await CheckpointManager(store).get_run(adapter.RUN_PREFIX + "X")
            assert latest is not None
            assert run is not None
            assert (latest.checkpoint_id, run.status) == (
                ("X", CheckpointStatus.PAUSED) if replaced else ("Y", CheckpointStatus.ACTIVE))
    assert outcomes == {("cancelled", False), ("cancelled", True), ("returned", True)}


class _SlowDetails(MemoryStore):
    """The first ``update_run`` after ``arm`` waits until released (a slow process)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.waiting = anyio.Event()
        self.release = anyio.Event()

    async def update_run(self, run_key: str, **options: Any) -> Any:  # type: ignore[override]
        if self.armed:
            self.armed = False
            self.waiting.set()
            await self.release.wait()
        return await super().update_run(run_key, **options)


async def test_two_saves_replacing_one_id_end_as_one_of_them(clock: FakeClock) -> None:
    """A save that replaced a checkpoint and is slow to record its details, overtaken by a
    second save of the id: the id ends as the second save, details included (its listing
    order is its own timestamp's)."""
    store = _SlowDetails()
    slow, quick = (FastCheckpointStorage(store, clock=clock) for _ in range(2))
    with anyio.fail_after(DEADLINE):
        await slow.save(_checkpoint(checkpoint_id="X", timestamp=_at(0), state={"by": "first"}))
        await slow.save(_checkpoint(checkpoint_id="Y", timestamp=_at(5)))
        store.armed = True
        async with anyio.create_task_group() as group:
            group.start_soon(slow.save, _checkpoint(checkpoint_id="X", timestamp=_at(10),
                                                    state={"by": "slow"}))
            await store.waiting.wait()  # its checkpoint is in, its details not yet
            await quick.save(_checkpoint(checkpoint_id="X", timestamp=_at(1),
                                         state={"by": "quick"}))
            store.release.set()
        assert (await quick.load("X")).state == {"by": "quick"}
        assert await quick.list_checkpoint_ids(workflow_name="orders") == ["X", "Y"]
        latest = await quick.get_latest(workflow_name="orders")
        assert latest is not None
        assert latest.checkpoint_id == "Y"


async def test_a_checkpoint_that_cannot_be_read_fails_a_listing_alone(clock: FakeClock) -> None:
    """A listing raises the error of a checkpoint it cannot read (a type this process did
    not declare) as it is, never in an ``ExceptionGroup``."""
    with anyio.fail_after(DEADLINE):
        store = MemoryStore()
        await FastCheckpointStorage(store, checkpoint_types=TYPES, clock=clock).save(
            _checkpoint(state={"order": Order("tea", 1, dt.datetime(2026, 1, 1))}))
        await FastCheckpointStorage(store, clock=clock).save(_checkpoint(state={"n": 1}))
        storage = FastCheckpointStorage(store, clock=clock)
        with pytest.raises(SerializationError):
            await storage.list_checkpoints(workflow_name="orders")


class _DamagedLatest(MemoryStore):
    """Reads of the runs in :attr:`damaged` return their record with a scrambled payload."""

    def __init__(self) -> None:
        super().__init__()
        self.damaged: set[str] = set()

    async def latest(self, run_key: str, *, now: float) -> Any:
        found = await super().latest(run_key, now=now)
        if found is None or run_key not in self.damaged:
            return found
        record, status = found
        return msgspec.structs.replace(record, payload=b"\x00" * len(record.payload)), status


async def test_a_damaged_checkpoint_is_left_out_of_a_listing_with_a_warning(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """As the framework's file storage does: the other checkpoints still list; reading the
    damaged one itself raises ``CorruptCheckpointError``."""
    with anyio.fail_after(DEADLINE):
        store = _DamagedLatest()
        storage = FastCheckpointStorage(store, clock=clock)
        saved = [_checkpoint(timestamp=_at(step), state={"n": step}) for step in range(3)]
        for checkpoint in saved:
            await storage.save(checkpoint)
        store.damaged.add(_ids.key_of(adapter.RUN_PREFIX + saved[0].checkpoint_id))
        listed = await storage.list_checkpoints(workflow_name="orders")
        assert [found.state for found in listed] == [{"n": 1}, {"n": 2}]
        assert "skipping damaged checkpoint" in caplog.text
        with pytest.raises(CorruptCheckpointError):
            await storage.load(saved[0].checkpoint_id)


async def test_latest_among_equal_timestamps_is_the_frameworks_choice(either: Made) -> None:
    """Checkpoints of one superstep share a timestamp: the latest is the lineage's leaf,
    then the greatest id, whatever order they were saved in."""
    with anyio.fail_after(DEADLINE):
        for order in ((0, 1, 2), (2, 1, 0), (1, 2, 0)):
            storage = either()
            parent = _checkpoint(timestamp=_at(5), checkpoint_id="m-parent")
            child = _checkpoint(timestamp=_at(5), checkpoint_id="a-child",
                                previous_checkpoint_id="m-parent")
            sibling = _checkpoint(timestamp=_at(5), checkpoint_id="b-sibling",
                                  previous_checkpoint_id="m-parent")
            older = _checkpoint(timestamp=_at(1), checkpoint_id="z-older")
            for index in order:
                await storage.save((parent, child, sibling)[index])
            await storage.save(older)
            latest = await storage.get_latest(workflow_name="orders")
            assert latest is not None
            assert latest.checkpoint_id == "b-sibling"
            await storage.delete("b-sibling")
            latest = await storage.get_latest(workflow_name="orders")
            assert latest is not None
            assert latest.checkpoint_id == "a-child"


async def test_request_budgets(clock: FakeClock) -> None:
    with anyio.fail_after(DEADLINE):
        store = CountingStore(MemoryStore())
        storage = FastCheckpointStorage(store, checkpoint_types=TYPES,  # type: ignore[arg-type]
                                        clock=clock)
        rich = _rich()
        rich.pending_request_info_events = {}
        await storage.save(rich)
        assert store.take() == {"append": 1}
        await storage.load(rich.checkpoint_id)
        assert store.take() == {"latest": 1}
        with pytest.raises(WorkflowCheckpointNotFound):
            await storage.load("missing")
        assert store.take() == {"latest": 1}
        await storage.list_checkpoint_ids(workflow_name="orders")
        assert store.take() == {"runs_with_label": 1}
        await storage.get_latest(workflow_name="orders")
        assert store.take() == {"runs_with_label": 1, "latest": 1}
        await storage.save(_checkpoint(checkpoint_id=rich.checkpoint_id))
        assert store.take() == {"append": 2, "get_run": 1, "update_run": 1}
        await storage.delete(rich.checkpoint_id)
        assert store.take() == {"get_run": 1, "delete_run": 1}


# -- real workflows ---------------------------------------------------------------------------


@dataclasses.dataclass
class Refund:
    amount: int


class Ask(Executor):
    @handler
    async def ask(self, amount: int, ctx: WorkflowContext) -> None:
        await ctx.request_info(Refund(amount), bool)

    @response_handler
    async def decided(self, request: Refund, approved: bool,
                      ctx: WorkflowContext[int, str]) -> None:
        await ctx.yield_output(f"{request.amount} {'refunded' if approved else 'refused'}")


def _refunds(storage: FastCheckpointStorage) -> Any:
    return WorkflowBuilder(start_executor=Ask(id="ask"), checkpoint_storage=storage,
                           name="refunds").build()


async def test_waiting_for_responses_is_paused(clock: FakeClock) -> None:
    with anyio.fail_after(DEADLINE):
        store = MemoryStore()
        manager = CheckpointManager(store)
        storage = FastCheckpointStorage(store, checkpoint_types=[Refund], clock=clock)
        first = await _refunds(storage).run(40)
        [request] = first.get_request_info_events()
        [paused] = await manager.list_runs(status=CheckpointStatus.PAUSED)
        assert paused.metadata["framework"] == "agent-framework"
        assert paused.metadata["workflow"] == "refunds"
        assert paused.approval is not None
        assert paused.approval["request"]["requests"] == [{
            "request_id": request.request_id, "source_executor_id": "ask",
            "request_type": f"{Refund.__module__}.{Refund.__qualname__}"}]

        # A new storage (another process) resumes from the paused checkpoint: it is answered.
        resumer = FastCheckpointStorage(store, checkpoint_types=[Refund], clock=clock)
        latest = await resumer.get_latest(workflow_name="refunds")
        assert latest is not None
        assert latest.checkpoint_id == paused.run_id.split(":", 1)[1]
        done = await _refunds(resumer).run(checkpoint_id=latest.checkpoint_id,
                                           responses={request.request_id: True})
        assert done.get_outputs() == ["40 refunded"]
        assert (await manager.list_runs(status=CheckpointStatus.PAUSED)).runs == []
        answered = await manager.get_run(paused.run_id)
        assert answered is not None
        assert answered.status == CheckpointStatus.ACTIVE
        assert answered.approval is not None
        assert answered.approval["decided_by"] == "agent-framework"


async def test_workflow_resumes_in_process() -> None:
    with anyio.fail_after(DEADLINE):
        plain = FastCheckpointStorage(MemoryStore(), checkpoint_types=[worker.Batch])
        straight = await worker.build(plain).run("a b c")
        ids = await plain.list_checkpoint_ids(workflow_name=worker.WORKFLOW)
        assert len(ids) == 5  # the entry checkpoint and one per superstep
        chain = await plain.list_checkpoints(workflow_name=worker.WORKFLOW)
        assert [found.previous_checkpoint_id for found in chain] == [None, *ids[:-1]]
        middle = await worker.build(plain).run(checkpoint_id=ids[2])
        assert middle.get_outputs() == straight.get_outputs() == ["A B C (3 words)"]


def _run(env: dict[str, str], *args: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, str(WORKER), *args], env=env, capture_output=True,
                          check=False,
                          text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("kind", ["file", "sqlite"])
def test_workflow_resumes_in_a_new_process(kind: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    url = f"file://{tmp_path / 'store'}" if kind == "file" else f"sqlite:///{tmp_path / 'db'}"
    text = "one small step for a workflow"
    crashed = _run(env, url, "run", text, "3")
    assert crashed["crashed"] == "crashed at word 3"
    assert crashed["checkpoints"] == 5  # entry, split, words 0 to 2 (word 3 failed)
    resumed = _run(env, url, "resume")
    straight = anyio.run(worker.main, "memory://", "run", [text], backend="asyncio")
    assert resumed["outputs"] == straight["outputs"] == [
        "ONE SMALL STEP FOR A WORKFLOW (6 words)"]
    assert resumed["resumed_from"] is not None
    assert resumed["checkpoints"] == straight["checkpoints"]  # one per superstep, as before

