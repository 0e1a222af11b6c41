"""Fixes from a review of the session adapters: a Pydantic AI write retried after a lost
reply, damaged Agent Framework checkpoints in listings, arguments of the wrong type given to
the ADK and OpenAI Agents adapters. Each test failed before its fix."""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio
import msgspec
import pytest

pytest.importorskip("pydantic_ai")
pytest.importorskip("agent_framework")
pytest.importorskip("google.adk")
pytest.importorskip("agents")

from agent_framework import WorkflowCheckpoint, WorkflowEvent
from agent_framework._workflows._runner_context import WorkflowMessage
from agents.memory import SessionSettings
from google.adk.events.event import Event
from google.adk.events.event_actions import EventActions
from google.adk.sessions.base_session_service import GetSessionConfig
from pydantic_ai.conversation_store import (
    ConversationConflict,
    ConversationEntry,
    ConversationRecord,
)
from pydantic_ai.messages import ModelRequest, UserPromptPart

from fastcheckpoint import _ids
from fastcheckpoint._codec import Codec
from fastcheckpoint.errors import (
    CheckpointError,
    CorruptCheckpointError,
    SerializationError,
    StoreError,
    ValidationError,
)
from fastcheckpoint.integrations import _pydantic_ai_records as records
from fastcheckpoint.integrations import agent_framework as af
from fastcheckpoint.integrations.agent_framework import FastCheckpointStorage
from fastcheckpoint.integrations.google_adk import FastSessionService
from fastcheckpoint.integrations.openai_agents import FastSession
from fastcheckpoint.integrations.pydantic_ai import FastConversationStore
from fastcheckpoint.stores.memory import MemoryStore
from tests._helpers import FakeClock

pytestmark = pytest.mark.anyio

DEADLINE = 5


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


# -- Pydantic AI: a write whose reply was lost ------------------------------------------------


class LostReply(MemoryStore):
    """``lose_reply``: the next append is applied, then fails as if its reply were lost.
    ``reads_fail``: that many reads of one checkpoint (``get``) fail meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.lose_reply = False
        self.reads_fail = 0
        self.calls: Counter[str] = Counter()

    async def append(self, *args: Any, **kwargs: Any) -> Any:
        self.calls["append"] += 1
        status = await super().append(*args, **kwargs)
        if self.lose_reply:
            self.lose_reply = False
            raise StoreError("connection reset after the write")
        return status

    async def get(self, *args: Any, **kwargs: Any) -> Any:
        self.calls["get"] += 1
        if self.reads_fail:
            self.reads_fail -= 1
            raise StoreError("connection refused")
        return await super().get(*args, **kwargs)


def _entry(text: str, parent: ConversationEntry | None = None) -> ConversationEntry:
    return ConversationEntry(parent_id=None if parent is None else parent.id,
                             message=ModelRequest(parts=[UserPromptPart(content=text)]))


def _texts(entries: list[ConversationEntry] | None) -> list[str]:
    assert entries is not None
    return [str(part.content) for entry in entries for part in entry.message.parts
            if isinstance(part, UserPromptPart)]


async def _started(store: FastConversationStore) -> tuple[ConversationEntry, ConversationRecord]:
    first = _entry("hi")
    record = ConversationRecord(conversation_id="c", head_id=first.id)
    await store.write_record(record, new_entries=[first], expected_revision=None)
    return first, record


async def test_a_write_whose_reply_was_lost_is_recognised_by_one_read() -> None:
    backing = LostReply()
    with anyio.fail_after(DEADLINE):
        async with FastConversationStore(backing) as store:
            first, r0 = await _started(store)
            turn = _entry("two", first)
            r1 = ConversationRecord(conversation_id="c", head_id=turn.id)
            backing.lose_reply = True
            backing.calls.clear()
            await store.write_record(r1, new_entries=[turn], expected_revision=r0.revision)
            assert backing.calls == {"append": 1, "get": 1}
            assert _texts(await FastConversationStore(backing).load_entries("c")) == ["hi", "two"]


async def test_a_retried_write_whose_first_call_landed_succeeds_and_keeps_its_entries() -> None:
    backing = LostReply()
    with anyio.fail_after(DEADLINE):
        async with FastConversationStore(backing) as store:
            first, r0 = await _started(store)
            turn = _entry("two", first)
            r1 = ConversationRecord(conversation_id="c", head_id=turn.id)
            backing.lose_reply, backing.reads_fail = True, 1
            with pytest.raises(StoreError):
                await store.write_record(r1, new_entries=[turn], expected_revision=r0.revision)
            await store.write_record(r1, new_entries=[turn], expected_revision=r0.revision)
            fresh = FastConversationStore(backing)
            stored = await fresh.read_record("c")
            assert stored is not None
            assert stored.revision == r1.revision
            assert await fresh.read_entry(turn.id) == turn
            assert _texts(await fresh.load_entries("c")) == ["hi", "two"]


async def test_a_retried_new_conversation_keeps_its_entries_in_the_stored_family() -> None:
    """The retry registered a family of its own and wrote the entries into it: the family
    goes, the entries stay with the stored record's family (``cleanup_expired`` would
    otherwise release the retry's empty family and the entries with it)."""
    backing, clock = LostReply(), FakeClock()
    with anyio.fail_after(DEADLINE):
        async with FastConversationStore(backing, clock=clock) as store:
            first = _entry("hi")
            record = ConversationRecord(conversation_id="c", head_id=first.id)
            backing.lose_reply, backing.reads_fail = True, 1
            with pytest.raises(StoreError):
                await store.write_record(record, new_entries=[first], expected_revision=None)
            await store.write_record(record, new_entries=[first], expected_revision=None)
            families = await backing.scan_items(records.FAMILIES_KEY, limit=10, now=clock())
            assert len(families) == 1
            clock.advance(2 * 3600)
            assert await store.cleanup_expired() == 0
            fresh = FastConversationStore(backing, clock=clock)
            assert _texts(await fresh.load_entries("c")) == ["hi"]
            fork = ConversationRecord(conversation_id="f", head_id=first.id)
            await fresh.write_record(fork, expected_revision=None)  # joins the stored family
            stored = await fresh.read_record("c")
            assert stored is not None
            await fresh.delete_record("c", expected_revision=stored.revision)
            assert _texts(await fresh.load_entries("f")) == ["hi"]


async def test_a_retry_that_loses_after_an_uncertain_call_leaves_the_entries() -> None:
    """The first call landed, unseen; another writer then saved over it. The retry loses,
    and the entries it wrote are the stored record's history: they stay."""
    backing = LostReply()
    with anyio.fail_after(DEADLINE):
        async with FastConversationStore(backing) as store:
            first, r0 = await _started(store)
            turn = _entry("two", first)
            r1 = ConversationRecord(conversation_id="c", head_id=turn.id)
            backing.lose_reply, backing.reads_fail = True, 1
            with pytest.raises(StoreError):
                await store.write_record(r1, new_entries=[turn], expected_revision=r0.revision)
            other = FastConversationStore(backing)
            later = _entry("three", turn)
            r2 = ConversationRecord(conversation_id="c", head_id=later.id)
            await other.write_record(r2, new_entries=[later], expected_revision=r1.revision)
            with pytest.raises(ConversationConflict):
                await store.write_record(r1, new_entries=[turn], expected_revision=r0.revision)
            fresh = FastConversationStore(backing)
            assert _texts(await fresh.load_entries("c")) == ["hi", "two", "three"]


async def test_a_stored_record_written_again_is_a_conflict_that_keeps_its_entries() -> None:
    """Pydantic AI's contract: writing a stored record again, with no earlier call of it
    that failed, is a conflict. Its entries are the stored record's: they stay, in its
    family (not in the family the repeated write registered, which goes)."""
    backing, clock = LostReply(), FakeClock()
    with anyio.fail_after(DEADLINE):
        async with FastConversationStore(backing, clock=clock) as store:
            first, r0 = await _started(store)
            with pytest.raises(ConversationConflict):
                await store.write_record(r0, new_entries=[first], expected_revision=None)
            with pytest.raises(ConversationConflict):
                await store.write_record(r0, new_entries=[first], expected_revision="other")
            families = await backing.scan_items(records.FAMILIES_KEY, limit=10, now=clock())
            assert len(families) == 1
            clock.advance(2 * 3600)
            assert await store.cleanup_expired() == 0
            assert _texts(await FastConversationStore(backing).load_entries("c")) == ["hi"]


async def test_a_write_that_loses_a_race_still_removes_its_entries() -> None:
    backing = LostReply()
    with anyio.fail_after(DEADLINE):
        async with FastConversationStore(backing) as store:
            first, r0 = await _started(store)
            winner, loser = _entry("win", first), _entry("lose", first)
            await FastConversationStore(backing).write_record(
                ConversationRecord(conversation_id="c", head_id=winner.id),
                new_entries=[winner], expected_revision=r0.revision)
            with pytest.raises(ConversationConflict):
                await store.write_record(
                    ConversationRecord(conversation_id="c", head_id=loser.id),
                    new_entries=[loser], expected_revision=r0.revision)
            with pytest.raises(LookupError):
                await FastConversationStore(backing).read_entry(loser.id)


async def test_a_record_whose_history_is_gone_is_a_corrupt_checkpoint() -> None:
    backing = LostReply()
    with anyio.fail_after(DEADLINE):
        async with FastConversationStore(backing) as store:
            first, _ = await _started(store)
            await backing.delete_items(records.entries_run_key(first.id),
                                       [records.entry_key(first.id)])
            fresh = FastConversationStore(backing)
            with pytest.raises(CorruptCheckpointError):
                await fresh.load("c")
            with pytest.raises(CorruptCheckpointError):
                await fresh.load_entries("c")
            with pytest.raises(CorruptCheckpointError):
                await fresh.fork("c", at=1, new_conversation_id="f")
            assert await fresh.read_record("f") is None


# -- Agent Framework: damaged checkpoints ------------------------------------------------------


@dataclasses.dataclass
class Ticket:
    item: str
    count: int


class Level(enum.Enum):
    LOW = 1


class DamagedLatest(MemoryStore):
    """Reads of the runs in ``damaged`` return the payload given there instead."""

    def __init__(self) -> None:
        super().__init__()
        self.damaged: dict[str, bytes] = {}

    async def latest(self, run_key: str, *, now: float) -> Any:
        found = await super().latest(run_key, now=now)
        if found is None or run_key not in self.damaged:
            return found
        return msgspec.structs.replace(found[0], payload=self.damaged[run_key]), found[1]


def _planted(fields: dict[str, Any], stored_as: Any = None) -> bytes:
    """A payload of ``fields`` as another writer could have stored it: each value of the
    framework's or the application's classes stored as ``stored_as`` (its fields, damaged)."""
    return Codec(enc_hook=lambda value: stored_as).encode_payload(fields, [], [], {})


_DAMAGE: dict[str, Callable[[WorkflowCheckpoint], bytes]] = {
    "checkpoint_id not a str": lambda cp: _planted({**cp.to_dict(), "checkpoint_id": 7}),
    "workflow_name not a str": lambda cp: _planted({**cp.to_dict(), "workflow_name": None}),
    "an event without data": lambda cp: _planted(
        {**cp.to_dict(), "pending_request_info_events": {"r": WorkflowEvent("data", 1)}},
        {"type": "data"}),
    "an event of an unknown origin": lambda cp: _planted(
        {**cp.to_dict(), "pending_request_info_events": {"r": WorkflowEvent("data", 1)}},
        {"type": "data", "data": 1, "origin": "elsewhere"}),
    "an event that is not a mapping": lambda cp: _planted(
        {**cp.to_dict(), "pending_request_info_events": {"r": WorkflowEvent("data", 1)}}, [1]),
    "a message without source_id": lambda cp: _planted(
        {**cp.to_dict(), "messages": {"a": [WorkflowMessage(data=1, source_id="a")]}},
        {"data": 1}),
    "a declared dataclass without a field": lambda cp: _planted(
        {**cp.to_dict(), "state": {"t": Ticket("tea", 1)}}, {"item": "tea"}),
    "a declared Enum of an unknown value": lambda cp: _planted(
        {**cp.to_dict(), "state": {"l": Level.LOW}}, 99),
}


@pytest.mark.parametrize("damage", list(_DAMAGE))
async def test_a_damaged_agent_framework_checkpoint_is_corrupt_and_left_out_of_listings(
    damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = DamagedLatest()
    storage = FastCheckpointStorage(store, checkpoint_types=[Ticket, Level])
    saved = [WorkflowCheckpoint("wf", "h", timestamp=f"2026-01-0{day}T00:00:00+00:00")
             for day in (1, 2)]
    with anyio.fail_after(DEADLINE):
        for checkpoint in saved:
            await storage.save(checkpoint)
        newest = _ids.key_of(af.RUN_PREFIX + saved[1].checkpoint_id)
        store.damaged[newest] = _DAMAGE[damage](saved[1])
        with caplog.at_level(logging.WARNING, logger="fastcheckpoint"):
            listed = await storage.list_checkpoints(workflow_name="wf")
        assert [cp.checkpoint_id for cp in listed] == [saved[0].checkpoint_id]
        assert "skipping damaged checkpoint" in caplog.text
        with pytest.raises(CorruptCheckpointError):
            await storage.load(saved[1].checkpoint_id)
        with pytest.raises(CorruptCheckpointError):
            await storage.get_latest(workflow_name="wf")


async def test_a_checkpoint_of_an_undeclared_type_is_still_a_serialization_error() -> None:
    store = MemoryStore()
    saved = WorkflowCheckpoint("wf", "h", state={"t": Ticket("tea", 1)})
    with anyio.fail_after(DEADLINE):
        await FastCheckpointStorage(store, checkpoint_types=[Ticket]).save(saved)
        with pytest.raises(SerializationError, match="checkpoint_types"):
            await FastCheckpointStorage(store).load(saved.checkpoint_id)


# -- the codec: what a dec_hook raises ----------------------------------------------------------


class _Opaque:
    pass


@pytest.mark.parametrize(("raised", "expected"), [
    (CorruptCheckpointError("a damaged value", key="k"), CorruptCheckpointError),
    (ValidationError("a value out of range"), ValidationError),
    (KeyError("field"), SerializationError),
    (ValueError("bad"), SerializationError),
])
def test_a_dec_hook_raises_checkpoint_errors_as_they_are(
    raised: Exception, expected: type[Exception]
) -> None:
    def dec_hook(type_name: str, value: Any) -> Any:
        raise raised

    codec = Codec(enc_hook=lambda value: {"x": 1}, dec_hook=dec_hook)
    blob = codec.encode_payload({"o": _Opaque()}, [], [], {})
    with pytest.raises(expected) as caught:
        codec.decode_payload(blob, "key")
    if expected is not SerializationError:
        assert caught.value is raised


# -- ADK and OpenAI Agents: arguments of the wrong type -------------------------------------------


@pytest.mark.parametrize("state", [{1: "x"}, {"k": 1, ("t",): 2}, [1], "x", 3])
async def test_adk_create_session_takes_a_mapping_with_str_keys(state: Any) -> None:
    service = FastSessionService(MemoryStore())
    with anyio.fail_after(DEADLINE):
        with pytest.raises(ValidationError, match="state"):
            await service.create_session(app_name="a", user_id="u", state=state)
        assert (await service.list_sessions(app_name="a")).sessions == []


@pytest.mark.parametrize("config", ["x", {"num_recent_events": 1}, 3])
async def test_adk_get_session_takes_a_get_session_config(config: Any) -> None:
    service = FastSessionService(MemoryStore())
    with anyio.fail_after(DEADLINE):
        await service.create_session(app_name="a", user_id="u", session_id="s")
        with pytest.raises(ValidationError, match="config"):
            await service.get_session(app_name="a", user_id="u", session_id="s", config=config)
        found = await service.get_session(app_name="a", user_id="u", session_id="s",
                                          config=GetSessionConfig(num_recent_events=1))
        assert found is not None


def _bad_delta_key(event: Event) -> None:
    event.actions.state_delta[1] = "x"  # type: ignore[index]


def _no_delta(event: Event) -> None:
    event.actions.state_delta = None  # type: ignore[assignment]


def _no_actions(event: Event) -> None:
    event.actions = None  # type: ignore[assignment]


@pytest.mark.parametrize("spoil", [_bad_delta_key, _no_delta, _no_actions])
async def test_adk_append_event_refuses_an_event_spoiled_after_it_was_built(
    spoil: Callable[[Event], None]
) -> None:
    service = FastSessionService(MemoryStore())
    with anyio.fail_after(DEADLINE):
        session = await service.create_session(app_name="a", user_id="u", session_id="s")
        event = Event(author="x", actions=EventActions(state_delta={"k": 1}))
        spoil(event)
        with pytest.raises(ValidationError, match="actions"):
            await service.append_event(session, event)
        stored = await service.get_session(app_name="a", user_id="u", session_id="s")
        assert stored is not None
        assert (stored.events, stored.state) == ([], {})


async def test_adk_append_event_takes_a_session_and_an_event() -> None:
    service = FastSessionService(MemoryStore())
    with anyio.fail_after(DEADLINE):
        session = await service.create_session(app_name="a", user_id="u", session_id="s")
        with pytest.raises(ValidationError, match="session"):
            await service.append_event({"id": "s"}, Event(author="x"))  # type: ignore[arg-type]
        with pytest.raises(ValidationError, match="event"):
            await service.append_event(session, {"author": "x"})  # type: ignore[arg-type]
        stored = await service.get_session(app_name="a", user_id="u", session_id="s")
        assert stored is not None
        assert stored.events == []


@pytest.mark.parametrize(("field", "value"), [
    ("timestamp", "noon"), ("id", 7), ("invocation_id", 5)])
async def test_adk_append_event_refuses_an_event_that_would_not_read_back(
    field: str, value: Any
) -> None:
    """Pydantic does not check assignments: an event given a field of the wrong type was
    stored as it was, and every later read of its session raised CorruptCheckpointError."""
    service = FastSessionService(MemoryStore())
    with anyio.fail_after(DEADLINE):
        session = await service.create_session(app_name="a", user_id="u", session_id="s")
        event = Event(author="x")
        setattr(event, field, value)
        with pytest.raises(ValidationError, match="read back"):
            await service.append_event(session, event)
        stored = await service.get_session(app_name="a", user_id="u", session_id="s")
        assert stored is not None
        assert stored.events == []


@pytest.mark.parametrize(("field", "value"), [
    ("state", [1]), ("events", None), ("events", [1])])
async def test_adk_append_event_refuses_a_session_spoiled_after_it_was_built(
    field: str, value: Any
) -> None:
    service = FastSessionService(MemoryStore())
    with anyio.fail_after(DEADLINE):
        session = await service.create_session(app_name="a", user_id="u", session_id="s")
        setattr(session, field, value)
        with pytest.raises(ValidationError, match=f"session.{field}"):
            await service.append_event(session, Event(author="x"))
        stored = await service.get_session(app_name="a", user_id="u", session_id="s")
        assert stored is not None
        assert stored.events == []


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the SDK's sessions run on asyncio
@pytest.mark.parametrize("limit", ["3", 1.5, True])
async def test_openai_get_items_takes_an_int_limit(limit: Any) -> None:
    session = FastSession("s", MemoryStore())
    with anyio.fail_after(DEADLINE):
        await session.add_items([{"role": "user", "content": "hi"}])
        with pytest.raises(ValidationError, match="limit"):
            await session.get_items(limit=limit)
        assert session.session_settings is not None
        session.session_settings.limit = limit  # the SDK's settings take it unchecked
        with pytest.raises(ValidationError, match="session_settings"):
            await session.get_items()
        for spoiled in ({"limit": "many"}, "3"):
            session.session_settings = spoiled  # type: ignore[assignment]
            with pytest.raises(CheckpointError, match="session_settings"):
                await session.get_items()
        session.session_settings = SessionSettings(limit=1)
        assert await session.get_items() == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("items", [None, 1, "hi", {"role": "user", "content": "hi"}])
async def test_openai_add_items_takes_a_list(items: Any) -> None:
    session = FastSession("s", MemoryStore())
    with anyio.fail_after(DEADLINE):
        with pytest.raises(ValidationError, match="items"):
            await session.add_items(items)
        assert await session.get_items() == []
