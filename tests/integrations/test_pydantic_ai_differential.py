"""Differential model checking: ``FastConversationStore`` against Pydantic AI's
``InMemoryConversationStore``.

A hypothesis ``RuleBasedStateMachine`` applies the same random operations to a
``FastConversationStore`` (over a MemoryStore, a FileStore in a fresh directory, or SQLite)
and to Pydantic AI's reference in-memory store: ``load`` and ``load_entries`` (with and
without ``scope`` and ``limit``), ``save`` of conversations built by hand, loaded ones grown,
edited, cut, compacted or sent through JSON, and of agent runs' results; ``save`` with a stale
or missing revision and with another scope; ``branch`` (``at``, ``from_entry``, a stale
revision), ``fork`` (``at``, ``from_entry``, a generated or a taken id, ``scope`` and
``source_scope``), ``update`` (``title``, ``metadata``, ``expected_title``),
``list_conversations`` (``scope``, ``limit``), ``delete`` and clock moves. After every step it
compares what a caller sees: the conversations returned (messages with their exact types and
order, usage, pending tool calls, ``new_message_index``), the entries and records (title,
metadata, scope, fork origin, branches, ``updated_at``), the listings in order, and the
exception raised (``ConversationConflict``, ``UserError``), or that there was none.

Identifiers Pydantic AI mints (revisions, entry ids, a fork's generated id) differ between
the two stores by design: each pair seen together is recorded, and every later sighting must
agree with that one-to-one map. Both stores run on one ``now_utc`` (Pydantic AI's replay
clock, a step's time), so ``updated_at`` and message timestamps are compared exactly.

Our side is two ``FastConversationStore`` objects on one store (two processes, each knowing
only what it wrote or read); a step goes through either, or through a new object. Races run
both at once: two saves of one revision (one wins, or none if it is stale), a save and a
delete, a save and an update, a fork and a delete; the outcome must be the reference's for
one order of the two calls. Ours has a TTL and the clock moves: an expired conversation is
deleted from the reference ("expired means absent"; the reference has no TTL). An update
does not extend the TTL.

Normalizations, each a documented difference (docs/integrations/pydantic-ai.md, "Limits" and
"Titles and metadata"):

- Messages, usage and pending tool calls read back from ours are Pydantic AI's JSON read
  back ("stored as Pydantic AI's JSON"): each must equal the reference's, and have exactly
  its types or those of its JSON round trip (an ``int`` in a ``float`` field comes back a
  ``float``). Values JSON lacks (a tuple, bytes, NaN) are pinned apart, below, as are ids
  and scopes a save refuses (a lone surrogate, an id too long for a run id).
- A fork racing a delete of its source may be refused with ``ConversationConflict`` (a
  fork landing while its family is released), leaving no fork.
- An entry no stored conversation reaches is not read (``read_entry``): its family keeps it
  until the family's last conversation goes, where the reference drops it at once
  (``delete`` leaves that to the backend, which documents it).

Not a store difference: a ``ModelResponse``'s ``duration`` is the model call's wall time,
so the two agent runs of a step are given the reference run's.

CI runs a few fixed (derandomized) examples per store. Hunt with random ones:
``PYDIFF_EXAMPLES=400`` (examples per store).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import functools
import math
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar, cast

import anyio
import pydantic
import pytest

pytest.importorskip("pydantic_ai")

from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from pydantic_ai import Agent
from pydantic_ai._utils import override_now_utc
from pydantic_ai.conversation import Conversation, ConversationTypeAdapter
from pydantic_ai.conversation_store import (
    ConversationConflict,
    ConversationEntry,
    ConversationRecord,
    InMemoryConversationStore,
)
from pydantic_ai.exceptions import UserError
from pydantic_ai.messages import (
    ModelMessage,
    ModelMessagesTypeAdapter,
    ModelRequest,
    ModelResponse,
    SystemPromptPart,
    TextPart,
    ThinkingPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.tools import DeferredToolRequests
from pydantic_ai.usage import RequestUsage, RunUsage

from fastcheckpoint.errors import CheckpointError, ValidationError
from fastcheckpoint.integrations.pydantic_ai import FastConversationStore
from fastcheckpoint.stores import CheckpointStore
from fastcheckpoint.stores.sqlite import SQLiteStore
from tests._helpers import FakeClock, make_store

T = TypeVar("T")

CIDS = ("c1", "c2", "ü/é 3", "")
SCOPES = (None, "alice", "bob", "")
SCOPE = st.sampled_from([None, None, None, *SCOPES])
"""A scope a call names: most often none (so that calls get past "not in the store")."""
TTL = 40.1
HANDLES = (0, 1, None)
"""Which of ours a step uses: one of the two objects, or (``None``) a new one."""
HELD = 8
"""Conversation objects kept to continue (the oldest go first)."""
STAMP = datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.timezone.utc)

texts = st.text(max_size=5) | st.sampled_from(["", "héllo ✓", "\u0000", "😀", "x" * 300])
json_scalars = (st.none() | st.booleans() | texts | st.integers(-(2 ** 70), 2 ** 70)
                | st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=2),
    max_leaves=5)
call_ids = st.sampled_from(["call-1", "call-2", "call-ü"])
stamps = st.sampled_from([STAMP, STAMP + datetime.timedelta(seconds=1, microseconds=7)])
request_parts = st.one_of(
    st.builds(UserPromptPart, content=texts, timestamp=stamps),
    st.builds(SystemPromptPart, content=texts, timestamp=stamps),
    st.builds(ToolReturnPart, tool_name=st.just("lookup"), content=json_values,
              tool_call_id=call_ids, timestamp=stamps),
    st.builds(ToolReturnPart, tool_name=st.just("lookup"), content=texts,
              tool_call_id=call_ids, timestamp=stamps, outcome=st.just("retried")),
)
response_parts = st.one_of(
    st.builds(TextPart, content=texts),
    st.builds(ToolCallPart, tool_name=st.just("lookup"),
              args=st.dictionaries(texts, json_values, max_size=2) | texts,
              tool_call_id=call_ids),
    st.builds(ThinkingPart, content=texts),
)
requests = st.builds(ModelRequest, parts=st.lists(request_parts, min_size=1, max_size=2),
                     timestamp=stamps, instructions=st.none() | texts)
responses = st.builds(
    ModelResponse, parts=st.lists(response_parts, min_size=1, max_size=2), timestamp=stamps,
    model_name=st.none() | st.just("m"),
    usage=st.builds(RequestUsage, input_tokens=st.integers(0, 9),
                    output_tokens=st.integers(0, 9)))
messages = st.one_of(requests, responses)
message_lists = st.lists(messages, max_size=4)
usages = st.builds(RunUsage, requests=st.integers(0, 3), input_tokens=st.integers(0, 50),
                   tool_calls=st.integers(0, 2))
deferred = st.none() | st.builds(
    DeferredToolRequests,
    calls=st.lists(st.builds(ToolCallPart, tool_name=st.just("lookup"), args=st.just({"q": 1}),
                             tool_call_id=call_ids), max_size=1),
    approvals=st.lists(st.builds(ToolCallPart, tool_name=st.just("lookup"), args=st.none(),
                                 tool_call_id=call_ids), max_size=1))
limits = st.none() | st.sampled_from([0, 1, 2, 5, -1])
AT = st.integers(0, 3) | st.sampled_from([-1, 7])
HOW = st.sampled_from(["at", "at", "at", "entry", "entry", "neither", "both"])
EDITS = ("none", "append", "replace", "insert", "cut", "drop-first", "compact", "forget-index")


def typed(value: Any) -> Any:
    """``value`` with every type spelled out: ``1``, ``1.0`` and ``True`` differ, as do a
    tuple and a list, ``-0.0`` and ``0.0``, and a datetime's timezone; dict keys in order."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value).__name__, [(field.name, typed(getattr(value, field.name)))
                                       for field in dataclasses.fields(value)])
    if isinstance(value, dict):
        return ("dict", [(typed(key), typed(item)) for key, item in value.items()])
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [typed(item) for item in value])
    if isinstance(value, float):
        return ("float", value.hex())
    if isinstance(value, datetime.datetime):
        return ("datetime", value.isoformat())
    return (type(value).__name__, value)


MESSAGES = ModelMessagesTypeAdapter
USAGE: pydantic.TypeAdapter[RunUsage] = pydantic.TypeAdapter(RunUsage)
PENDING: pydantic.TypeAdapter[DeferredToolRequests | None] = pydantic.TypeAdapter(
    DeferredToolRequests | None)  # type: ignore[arg-type]
RECORD: pydantic.TypeAdapter[ConversationRecord] = pydantic.TypeAdapter(ConversationRecord)


def as_json(adapter: pydantic.TypeAdapter[T], value: T) -> T:
    """``value`` as Pydantic AI's JSON reads it back: what a store that serializes keeps
    (documented: an int in a float field comes back a float, a tuple a list)."""
    return adapter.validate_json(adapter.dump_json(value))


def same(adapter: pydantic.TypeAdapter[T], ours: T, reference: T) -> None:
    """``ours`` is the reference's value, exactly or as Pydantic AI's JSON reads it back;
    for messages, each one (a list may mix messages read back and messages added since)."""
    assert ours == reference
    if adapter is MESSAGES:
        for mine, theirs in zip(cast(list[ModelMessage], ours),
                                cast(list[ModelMessage], reference), strict=True):
            assert typed(mine) in (typed(theirs), typed(as_json(MESSAGES, [theirs])[0]))
        return
    assert typed(ours) in (typed(reference), typed(as_json(adapter, reference)))


def outcome_kind(outcome: object) -> str:
    """What a caller can tell from a call's outcome before looking inside: which exception."""
    if isinstance(outcome, ConversationConflict):
        return "ConversationConflict"
    if isinstance(outcome, UserError):
        return "UserError"
    if isinstance(outcome, BaseException):
        return f"unexpected {type(outcome).__name__}: {outcome}"
    return "returned"


@dataclasses.dataclass(eq=False)
class Held:
    """One conversation object of each store, got from the same step."""

    cid: str
    """The reference's conversation id."""
    reference: Conversation
    ours: Conversation


class Ids:
    """A one-to-one map between the reference's ids and ours, built from pairs seen together."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.to_ours: dict[str, str] = {}
        self.to_reference: dict[str, str] = {}

    def pair(self, reference: str | None, ours: str | None) -> None:
        if reference is None or ours is None:
            assert reference is ours is None, (self.what, reference, ours)
            return
        assert self.to_ours.setdefault(reference, ours) == ours, (self.what, reference, ours)
        assert self.to_reference.setdefault(ours, reference) == reference, (
            self.what, reference, ours)

    def ours(self, reference: str | None) -> str | None:
        return None if reference is None else self.to_ours.get(reference, reference)

    def reference(self, ours: str | None) -> str | None:
        """Ours as the reference's: an id never paired maps to itself (and then differs)."""
        return None if ours is None else self.to_reference.get(ours, f"unpaired {ours}")


def respond(messages_sent: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """A model whose answer depends only on what it is sent: it calls the tool once when the
    prompt asks for it, else answers with what it was sent."""
    last = messages_sent[-1]
    prompt = [part.content for part in last.parts if isinstance(part, UserPromptPart)]
    if prompt and str(prompt[0]).startswith("tool"):
        return ModelResponse(parts=[ToolCallPart("lookup", {"q": str(prompt[0])},
                                                 tool_call_id=f"call-{len(messages_sent)}")])
    return ModelResponse(parts=[TextPart(f"{len(messages_sent)} messages, {prompt!r:.20}")])


class ConversationMachine(RuleBasedStateMachine):
    """Subclasses pick the store."""

    STORE_KIND = "memory"

    def __init__(self) -> None:
        super().__init__()
        self._exit = ExitStack()
        self.portal: BlockingPortal = self._exit.enter_context(
            start_blocking_portal(backend="asyncio"))
        self.directory = Path(tempfile.mkdtemp(prefix="fastcheckpoint-pydantic-ai-diff-"))
        self._exit.callback(shutil.rmtree, self.directory, ignore_errors=True)
        self.clock = FakeClock()
        self.store = self.new_store()
        self.ours = (self.new_ours(), self.new_ours())
        self.reference = InMemoryConversationStore()
        self.entries = Ids("entry")
        self.choices: list[tuple[str, str]] = []
        """Entries to branch or fork from (the reference's id, ours), in the order seen."""
        self.revisions = Ids("revision")
        self.cids = Ids("conversation id")
        for cid in CIDS:
            self.cids.pair(cid, cid)
        self.known: list[str] = list(CIDS)
        """The reference's conversation ids to look at (a fork's generated ones join)."""
        self.saved_at: dict[str, float] = {}
        """When each live conversation's record was last written (its TTL counts from there)."""
        self.held: list[Held] = []
        self.steps = 0
        self.runs = 0
        self.agent = Agent(FunctionModel(respond))

        @self.agent.tool_plain
        def lookup(q: str) -> str:
            return f"found {q}"

    def new_store(self) -> CheckpointStore:
        if self.STORE_KIND == "sqlite":
            return SQLiteStore(self.directory / "store.db", synchronous="normal")
        return make_store(self.STORE_KIND, self.directory, fsync=False)

    def new_ours(self) -> FastConversationStore:
        return FastConversationStore(self.store, ttl_seconds=TTL, clock=self.clock)

    def via(self, handle: int | None) -> FastConversationStore:
        return self.new_ours() if handle is None else self.ours[handle]

    def now_utc(self) -> datetime.datetime:
        """The step's time, Pydantic AI's ``now_utc`` in both stores: the clock, plus a
        microsecond per step so that no two steps' saves tie."""
        return datetime.datetime.fromtimestamp(self.clock.now, datetime.timezone.utc) + (
            datetime.timedelta(microseconds=self.steps))

    def call(self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        async def on_clock() -> T:
            with override_now_utc(self.now_utc):
                return await func(*args, **kwargs)

        return self.portal.call(on_clock)

    def outcome(self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> Any:
        try:
            return self.call(func, *args, **kwargs)
        except Exception as exc:  # compared by the caller
            return exc

    def both(self, name: str, handle: int | None, reference_args: dict[str, Any],
             our_args: dict[str, Any]) -> tuple[Any, Any]:
        """``name`` called on the reference and on ours (through ``handle``), each outcome a
        result or the exception raised; the two must be the same kind."""
        self.steps += 1
        reference = self.outcome(getattr(self.reference, name), **reference_args)
        ours = self.outcome(getattr(self.via(handle), name), **our_args)
        assert outcome_kind(ours) == outcome_kind(reference), (name, ours, reference)
        event(f"{name}: {outcome_kind(reference)}")  # --hypothesis-show-statistics
        if isinstance(ours, BaseException):
            assert isinstance(ours, (ConversationConflict, UserError, CheckpointError)), ours
        return reference, ours

    def teardown(self) -> None:
        try:
            self.call(self.store.aclose)
        finally:
            self._exit.close()

    # -- comparing --------------------------------------------------------------------------

    def check_conversation(self, reference: Conversation, ours: Conversation) -> None:
        self.revisions.pair(reference.revision, ours.revision)
        assert self.cids.reference(ours.conversation_id) == reference.conversation_id
        same(MESSAGES, ours.messages, reference.messages)
        same(USAGE, ours.usage, reference.usage)
        same(PENDING, ours.deferred_tool_requests, reference.deferred_tool_requests)
        assert ours.new_message_index == reference.new_message_index

    def check_entries(self, reference: list[ConversationEntry],
                      ours: list[ConversationEntry], *, choose: bool = True) -> None:
        """``choose``: the entries may be branched or forked from later (how many there are
        must not depend on a race's outcome, for a test case to replay)."""
        assert len(ours) == len(reference)
        for mine, theirs in zip(ours, reference, strict=True):
            self.entries.pair(theirs.id, mine.id)
            if choose and (theirs.id, mine.id) not in self.choices:
                self.choices.append((theirs.id, mine.id))
            self.entries.pair(theirs.parent_id, mine.parent_id)
            assert mine.kind == theirs.kind
            same(MESSAGES, [mine.message], [theirs.message])

    def check_record(self, reference: ConversationRecord, ours: ConversationRecord) -> None:
        self.revisions.pair(reference.revision, ours.revision)
        self.entries.pair(reference.head_id, ours.head_id)
        self.entries.pair(reference.forked_at, ours.forked_at)
        assert len(ours.branches) == len(reference.branches)
        for theirs, mine in zip(reference.branches, ours.branches, strict=True):
            self.entries.pair(theirs, mine)
        assert self.cids.reference(ours.conversation_id) == reference.conversation_id
        assert (self.cids.reference(ours.forked_from) if ours.forked_from is not None
                else None) == reference.forked_from
        as_stored = as_json(RECORD, reference)
        for name in ("usage", "deferred_tool_requests", "scope", "title", "metadata",
                     "updated_at", "format_version"):
            assert getattr(ours, name) == getattr(reference, name), name
            assert typed(getattr(ours, name)) in (typed(getattr(reference, name)),
                                                  typed(getattr(as_stored, name))), name

    def hold(self, cid: str, reference: Conversation, ours: Conversation) -> None:
        self.held.append(Held(cid, reference, ours))
        del self.held[:-HELD]

    def written(self, cid: str) -> None:
        self.saved_at[cid] = self.clock.now

    # -- rules ------------------------------------------------------------------------------

    @rule(data=st.data(), handle=st.sampled_from(HANDLES), limit=limits,
          scope=SCOPE, keep=st.booleans())
    def load(self, data: st.DataObject, handle: int | None, limit: int | None,
             scope: str | None, keep: bool) -> None:
        cid = self.target(data)
        reference, ours = self.both(
            "load", handle, {"conversation_id": cid, "limit": limit, "scope": scope},
            {"conversation_id": self.cids.ours(cid), "limit": limit, "scope": scope})
        if reference is None or ours is None:
            assert reference is ours is None, (reference, ours)
        elif isinstance(reference, Conversation):
            self.check_conversation(reference, ours)
            if keep:
                self.hold(cid, reference, ours)

    @rule(data=st.data(), handle=st.sampled_from(HANDLES), limit=limits,
          scope=SCOPE)
    def load_entries(self, data: st.DataObject, handle: int | None, limit: int | None,
                     scope: str | None) -> None:
        cid = self.target(data)
        reference, ours = self.both(
            "load_entries", handle, {"conversation_id": cid, "limit": limit, "scope": scope},
            {"conversation_id": self.cids.ours(cid), "limit": limit, "scope": scope})
        if reference is None or ours is None:
            assert reference is ours is None, (reference, ours)
        elif isinstance(reference, list):
            self.check_entries(reference, ours)

    @rule(cid=st.sampled_from(CIDS), handle=st.sampled_from(HANDLES), batch=message_lists,
          usage=usages, pending=deferred, scope=SCOPE)
    def save_new(self, cid: str, handle: int | None, batch: list[ModelMessage], usage: RunUsage,
                 pending: DeferredToolRequests | None, scope: str | None) -> None:
        """A conversation built by hand, not loaded: a conflict if the id is taken."""
        def build() -> Conversation:
            return Conversation(conversation_id=cid, messages=list(batch),
                                usage=dataclasses.replace(usage),
                                deferred_tool_requests=pending)

        self.save_both(cid, handle, build(), build(), scope)

    def save_both(self, cid: str, handle: int | None, reference: Conversation,
                  ours: Conversation, scope: str | None, *, hold: bool = True) -> None:
        saved = self.both("save", handle, {"conversation": reference, "scope": scope},
                          {"conversation": ours, "scope": scope})
        if isinstance(saved[0], list):
            self.check_entries(*saved)
            self.check_conversation(reference, ours)
            self.written(cid)
            if hold:
                self.hold(cid, reference, ours)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), handle=st.sampled_from(HANDLES), edit=st.sampled_from(EDITS),
          added=message_lists, at=st.integers(0, 6), scope=SCOPE,
          usage=st.none() | usages)
    def save_held(self, data: st.DataObject, handle: int | None, edit: str,
                  added: list[ModelMessage], at: int, scope: str | None,
                  usage: RunUsage | None) -> None:
        """A conversation loaded, branched, forked or saved before, edited the same way on
        both sides, saved again (perhaps stale: another save or a delete came since)."""
        held = pick(data, self.held)
        for conversation in (held.reference, held.ours):
            edited(conversation, edit, added, at)
            if usage is not None:
                conversation.usage = dataclasses.replace(usage)
        self.save_both(held.cid, handle, held.reference, held.ours, scope, hold=False)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), pairs=st.lists(st.tuples(messages, messages), max_size=3))
    def concurrent_saves(self, data: st.DataObject,
                         pairs: list[tuple[ModelMessage, ModelMessage]]) -> None:
        """Two processes save the same conversation, each with messages of its own (as many
        as the other's), at the same time: at most one wins (none if the revision they
        expect is stale), the other gets ``ConversationConflict``; the reference saved in
        that order agrees."""
        held = pick(data, self.held)
        batches = [[pair[0] for pair in pairs], [pair[1] for pair in pairs]]
        self.steps += 1
        ours = [grown(held.ours, batch) for batch in batches]
        outcomes: list[Any] = [None, None]

        async def together() -> None:
            async def save(index: int) -> None:
                try:
                    outcomes[index] = await self.ours[index].save(ours[index])
                except Exception as exc:  # compared below
                    outcomes[index] = exc

            with override_now_utc(self.now_utc):
                async with anyio.create_task_group() as group:
                    for index in (0, 1):
                        group.start_soon(save, index)

        self.portal.call(together)
        kinds = sorted(map(outcome_kind, outcomes))
        assert kinds in (["ConversationConflict", "returned"],
                         ["ConversationConflict", "ConversationConflict"]), outcomes
        order = [0, 1] if outcome_kind(outcomes[0]) == "returned" else [1, 0]
        reference = [grown(held.reference, batch) for batch in batches]
        for index in order:
            theirs = self.outcome(self.reference.save, reference[index])
            assert outcome_kind(theirs) == outcome_kind(outcomes[index]), (theirs, outcomes)
            if isinstance(theirs, list):
                self.check_entries(theirs, outcomes[index])
                self.check_conversation(reference[index], ours[index])
                self.written(held.cid)
                self.hold(held.cid, reference[index], ours[index])

    def race(self, *calls: Callable[[], Awaitable[Any]]) -> list[Any]:
        """``calls`` run at the same time (each through its own object: processes); their
        outcomes, each a result or the exception raised."""
        self.steps += 1
        outcomes: list[Any] = [None] * len(calls)

        async def together() -> None:
            async def run(index: int) -> None:
                try:
                    outcomes[index] = await calls[index]()
                except Exception as exc:  # compared by the caller
                    outcomes[index] = exc

            with override_now_utc(self.now_utc):
                async with anyio.create_task_group() as group:
                    for index in range(len(calls)):
                        group.start_soon(run, index)

        self.portal.call(together)
        return outcomes

    @precondition(lambda self: self.held and len(self.saved_at) >= 2)
    @rule(data=st.data(), batch=message_lists)
    def save_racing_delete(self, data: st.DataObject, batch: list[ModelMessage]) -> None:
        """One process saves a conversation while another deletes it: the delete always
        ends it (it reads the record again after a conflict); the save lands before it, or
        is refused with ``ConversationConflict``, as the reference in that order."""
        held = pick(data, self.held)
        ours = grown(held.ours, batch)
        saved, deleted = self.race(
            functools.partial(self.ours[0].save, ours),
            functools.partial(self.ours[1].delete, self.cids.ours(held.cid) or ""))
        assert deleted is None, deleted
        reference = grown(held.reference, batch)
        theirs = self.outcome(self.reference.save, reference)
        assert outcome_kind(saved) in ("returned", "ConversationConflict"), saved
        if outcome_kind(saved) == "returned":
            assert isinstance(theirs, list), theirs
            self.check_entries(theirs, saved, choose=False)
            self.check_conversation(reference, ours)
        self.call(self.reference.delete, held.cid)
        self.saved_at.pop(held.cid, None)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), batch=message_lists, title=st.sampled_from([None, "T", "U"]),
          metadata=st.dictionaries(texts, json_scalars, max_size=2))
    def save_racing_update(self, data: st.DataObject, batch: list[ModelMessage],
                           title: str | None, metadata: dict[str, Any]) -> None:
        """One process saves a conversation while another changes its title and metadata:
        neither undoes the other, in either order (an update keeps the revision, a save
        keeps the title), so both outcomes are the reference's."""
        held = pick(data, self.held)
        ours = grown(held.ours, batch)
        saved, updated = self.race(
            functools.partial(self.ours[0].save, ours),
            functools.partial(self.ours[1].update, self.cids.ours(held.cid) or "",
                              title=title, metadata=metadata))
        reference = grown(held.reference, batch)
        theirs = self.outcome(self.reference.save, reference)
        assert outcome_kind(saved) == outcome_kind(theirs), (saved, theirs)
        if isinstance(theirs, list):
            self.check_entries(theirs, saved, choose=False)
            self.check_conversation(reference, ours)
            self.written(held.cid)
            self.hold(held.cid, reference, ours)
        updated_theirs = self.outcome(self.reference.update, held.cid, title=title,
                                      metadata=metadata)
        assert outcome_kind(updated) == outcome_kind(updated_theirs), (updated, updated_theirs)
        if isinstance(updated, ConversationRecord):
            assert (updated.title, updated.metadata) == (title, metadata)

    @precondition(lambda self: len(self.saved_at) >= 2)
    @rule(data=st.data(), at=st.none() | st.integers(0, 3))
    def fork_racing_delete(self, data: st.DataObject, at: int | None) -> None:
        """One process forks a conversation while another deletes it. The fork lands before
        the delete, or fails as after it (``UserError``: not in the store), or (documented)
        is refused with ``ConversationConflict`` when it lands while the family is being
        released, leaving no fork."""
        cid = self.target(data)
        new_cid = f"race-{self.steps}"
        forked, deleted = self.race(
            functools.partial(self.ours[0].fork, self.cids.ours(cid) or "", at=at,
                              new_conversation_id=new_cid),
            functools.partial(self.ours[1].delete, self.cids.ours(cid) or ""))
        assert deleted is None, deleted
        if isinstance(forked, Conversation):
            self.cids.pair(new_cid, new_cid)
            theirs = self.outcome(self.reference.fork, cid, at=at, new_conversation_id=new_cid)
            assert isinstance(theirs, Conversation), theirs
            self.check_conversation(theirs, forked)
            self.check_record(*[self.call(conversations.read_record, new_cid)
                                for conversations in (self.reference, self.ours[1])])
            # Gone again, whoever won: the machine's state (what later steps draw from) is
            # then the same for every outcome of the race, as replaying a test case needs.
            self.call(self.reference.delete, new_cid)
            self.call(self.ours[1].delete, new_cid)
        else:
            assert outcome_kind(forked) in ("UserError", "ConversationConflict"), forked
        assert self.call(self.ours[0].read_record, new_cid) is None
        self.call(self.reference.delete, cid)
        self.saved_at.pop(cid, None)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def serialize_held(self, data: st.DataObject) -> None:
        """A conversation sent through JSON (as between two requests): its index stays, the
        marks of which messages are stored go, so a save compares it with the stored ones."""
        held = pick(data, self.held)
        copies = [ConversationTypeAdapter.validate_json(ConversationTypeAdapter.dump_json(
            conversation)) for conversation in (held.reference, held.ours)]
        self.hold(held.cid, *copies)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), handle=st.sampled_from(HANDLES),
          prompt=st.sampled_from(["hi", "tool please", ""]), save=st.booleans())
    def run_agent(self, data: st.DataObject, handle: int | None, prompt: str,
                  save: bool) -> None:
        """An agent run continuing a held conversation, on each side (one model, one clock,
        one run id: the same messages), and its result saved."""
        held = pick(data, self.held)
        if self.cids.ours(held.cid) != held.cid:
            return  # a fork's generated ids differ by design, and a run writes them in messages
        self.runs += 1
        self.steps += 1
        results = [self.outcome(self.agent.run, prompt, conversation=conversation,
                                run_id=f"run-{self.runs}")
                   for conversation in (held.reference, held.ours)]
        assert outcome_kind(results[1]) == outcome_kind(results[0]), results
        if isinstance(results[0], BaseException):
            return
        reference, ours = results
        for mine, theirs in zip(ours.all_messages(), reference.all_messages(), strict=True):
            if isinstance(mine, ModelResponse) and isinstance(theirs, ModelResponse):
                mine.duration = theirs.duration  # the model call's wall time, not the store's
        same(MESSAGES, ours.all_messages(), reference.all_messages())
        if not save:
            self.hold(held.cid, reference.conversation, ours.conversation)
            return
        saved = self.both("save", handle, {"conversation": reference}, {"conversation": ours})
        if isinstance(saved[0], list):
            self.check_entries(*saved)
            self.written(held.cid)
            continued = (reference.conversation, ours.conversation)
            self.check_conversation(*continued)
            self.hold(held.cid, *continued)

    def target(self, data: st.DataObject) -> str:
        """A conversation id to act on: most often one stored (so that calls get past "not
        in the store"), else any the machine knows."""
        live = [cid for cid in self.known if cid in self.saved_at]
        return pick(data, [*live, *live, *live, *self.known])

    def point(self, data: st.DataObject, at: int, how: str) -> tuple[int | None,
                                                                       tuple[str | None,
                                                                             str | None]]:
        """Where to branch or fork: ``at``, an entry, neither or both (``how``)."""
        entry = self.entry_for(data) if how in ("entry", "both") else (None, None)
        return (at if how in ("at", "both") else None), entry

    def revision_for(self, data: st.DataObject, cid: str) -> tuple[str | None, str | None]:
        """A revision to expect: the stored one (most often), a held object's (perhaps
        stale), or none."""
        choices: list[tuple[str | None, str | None]] = [(None, None), ("bogus", "bogus")]
        record = self.call(self.reference.read_record, cid)
        if record is not None:
            choices += [(record.revision, self.revisions.ours(record.revision))] * 4
        choices += [(held.reference.revision, held.ours.revision) for held in self.held
                    if held.cid == cid]
        return pick(data, choices)

    def entry_for(self, data: st.DataObject) -> tuple[str, str]:
        return pick(data, [*self.choices, ("no-such-entry", "no-such-entry")])

    @rule(data=st.data(), handle=st.sampled_from(HANDLES), at=AT, how=HOW,
          scope=SCOPE)
    def branch(self, data: st.DataObject, handle: int | None, at: int, how: str,
               scope: str | None) -> None:
        cid = self.target(data)
        expected = self.revision_for(data, cid)
        at, entry = self.point(data, at, how)
        reference, ours = self.both(
            "branch", handle,
            {"conversation_id": cid, "at": at, "from_entry": entry[0],
             "expected_revision": expected[0], "scope": scope},
            {"conversation_id": self.cids.ours(cid), "at": at, "from_entry": entry[1],
             "expected_revision": expected[1], "scope": scope})
        if isinstance(reference, Conversation):
            self.check_conversation(reference, ours)
            self.written(cid)
            self.hold(cid, reference, ours)

    @rule(data=st.data(), handle=st.sampled_from(HANDLES), at=AT, how=HOW,
          new_cid=st.none() | st.sampled_from([*CIDS, "f1", "f2"]),
          scope=SCOPE, source_scope=SCOPE)
    def fork(self, data: st.DataObject, handle: int | None, at: int, how: str,
             new_cid: str | None, scope: str | None, source_scope: str | None) -> None:
        cid = self.target(data)
        at, entry = self.point(data, at, how)
        reference, ours = self.both(
            "fork", handle,
            {"conversation_id": cid, "at": at, "from_entry": entry[0],
             "new_conversation_id": new_cid, "scope": scope, "source_scope": source_scope},
            {"conversation_id": self.cids.ours(cid), "at": at, "from_entry": entry[1],
             "new_conversation_id": self.cids.ours(new_cid), "scope": scope,
             "source_scope": source_scope})
        if isinstance(reference, Conversation):
            self.cids.pair(reference.conversation_id, ours.conversation_id)
            if reference.conversation_id not in self.known:
                self.known.append(reference.conversation_id)
            self.check_conversation(reference, ours)
            self.written(reference.conversation_id)
            self.hold(reference.conversation_id, reference, ours)

    @rule(data=st.data(), handle=st.sampled_from(HANDLES),
          title=st.sampled_from(["unset", None, "T", "U"]),
          metadata=st.sampled_from(["unset", None]) | st.dictionaries(texts, json_values,
                                                                      max_size=2),
          expected_title=st.sampled_from(["unset", None, "T", "U"]),
          scope=SCOPE)
    def update(self, data: st.DataObject, handle: int | None, title: Any, metadata: Any,
               expected_title: Any, scope: str | None) -> None:
        cid = self.target(data)
        arguments = {name: value for name, value in (
            ("title", title), ("metadata", metadata), ("expected_title", expected_title))
            if value != "unset"}
        reference, ours = self.both(
            "update", handle, {"conversation_id": cid, "scope": scope, **arguments},
            {"conversation_id": self.cids.ours(cid), "scope": scope, **arguments})
        if isinstance(reference, ConversationRecord):
            self.check_record(reference, ours)

    @rule(handle=st.sampled_from(HANDLES), scope=st.sampled_from([*SCOPES, "nobody"]),
          limit=limits)
    def list_conversations(self, handle: int | None, scope: str | None,
                           limit: int | None) -> None:
        reference, ours = self.both("list_conversations", handle,
                                    {"scope": scope, "limit": limit},
                                    {"scope": scope, "limit": limit})
        if isinstance(reference, list):
            assert [self.cids.reference(record.conversation_id) for record in ours] == [
                record.conversation_id for record in reference]
            for theirs, mine in zip(reference, ours, strict=True):
                self.check_record(theirs, mine)

    @precondition(lambda self: len(self.saved_at) >= 2)
    @rule(data=st.data(), handle=st.sampled_from(HANDLES), scope=SCOPE)
    def delete(self, data: st.DataObject, handle: int | None, scope: str | None) -> None:
        cid = self.target(data)
        self.both("delete", handle, {"conversation_id": cid, "scope": scope},
                  {"conversation_id": self.cids.ours(cid), "scope": scope})
        if self.call(self.reference.read_record, cid) is None:
            self.saved_at.pop(cid, None)

    @rule(seconds=st.sampled_from([0.25, 1.0, 4.0, 12.0]))
    def advance_clock(self, seconds: float) -> None:
        """Time passes: a conversation whose record was last written ``TTL`` ago expires
        ("expired means absent": the reference deletes it). Steps are multiples of 0.25 and
        ``TTL`` is not, so no expiry falls on a boundary."""
        self.clock.advance(seconds)
        for cid, saved_at in list(self.saved_at.items()):
            if self.clock.now >= saved_at + TTL:
                self.call(self.reference.delete, cid)
                del self.saved_at[cid]

    @rule(handle=st.sampled_from(HANDLES))
    def cleanup_expired(self, handle: int | None) -> None:
        """Ours only: removes what expired, and the entries of families wholly expired for
        an hour (when no conversation is stored, an hour passes first); nothing a caller
        sees changes."""
        if not self.saved_at:
            self.clock.advance(3600.0)
        self.call(self.via(handle).cleanup_expired)

    @invariant()
    def every_conversation_reads_the_same(self) -> None:
        for index, cid in enumerate(self.known):
            reference = self.call(self.reference.read_record, cid)
            ours = self.call(self.ours[index % 2].read_record, self.cids.ours(cid))
            if reference is None or ours is None:
                assert reference is ours is None, (cid, reference, ours)
                continue
            self.check_record(reference, ours)
            self.check_entries(self.call(self.reference.load_entries, cid),
                               self.call(self.ours[(index + 1) % 2].load_entries,
                                         self.cids.ours(cid)))


def pick(data: st.DataObject, choices: list[T]) -> T:
    """One of ``choices``, drawn by position: races make how many there are vary between a
    test case and its replay, which a draw bounded by their number would take for flakiness."""
    return choices[data.draw(st.integers(0, 255), label="position") % len(choices)]


def grown(conversation: Conversation, batch: list[ModelMessage]) -> Conversation:
    """A copy of ``conversation`` (its stored messages marked as such) with ``batch`` added."""
    copied = copy.copy(conversation)
    copied.messages = [*conversation.messages, *batch]
    return copied


def edited(conversation: Conversation, edit: str, added: list[ModelMessage], at: int) -> None:
    """Change ``conversation`` as ``edit`` says, replacing messages rather than changing
    them in place (which Pydantic AI's ``save`` does not notice, by its documentation)."""
    held = conversation.messages
    at = min(at, len(held))
    if edit == "append":
        held += added
    elif edit == "replace" and held:
        index = min(at, len(held) - 1)
        held[index] = dataclasses.replace(held[index], parts=[*held[index].parts[:1]] + (
            [TextPart("edited")] if isinstance(held[index], ModelResponse)
            else [UserPromptPart("edited", timestamp=STAMP)]))
    elif edit == "insert":
        held[at:at] = added[:1] or [ModelRequest(parts=[UserPromptPart("inserted",
                                                                        timestamp=STAMP)])]
    elif edit == "cut":
        del held[at:]
    elif edit == "drop-first":
        del held[:at]
    elif edit == "compact":
        held[:at] = [ModelRequest(parts=[SystemPromptPart("summary", timestamp=STAMP)])]
    elif edit == "forget-index":
        conversation.new_message_index = None


HUNT = os.environ.get("PYDIFF_EXAMPLES")
"""Examples per store when hunting (random); unset, CI's few fixed examples per store."""


def machine_settings(examples: int) -> settings:
    return settings(
        max_examples=int(HUNT) if HUNT else examples,
        derandomize=not HUNT,
        # Hunting: report the first failure as found (shrinking these machines takes minutes).
        phases=[phase for phase in Phase if not HUNT or phase != Phase.shrink],
        database=None,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                               HealthCheck.data_too_large],
    )


class MemoryMachine(ConversationMachine):
    STORE_KIND = "memory"


class FileMachine(ConversationMachine):
    STORE_KIND = "file"


class SQLiteMachine(ConversationMachine):
    STORE_KIND = "sqlite"


TestAgainstInMemoryOnMemoryStore = MemoryMachine.TestCase
TestAgainstInMemoryOnMemoryStore.settings = machine_settings(8)
TestAgainstInMemoryOnFileStore = FileMachine.TestCase
TestAgainstInMemoryOnFileStore.settings = machine_settings(4)
TestAgainstInMemoryOnSQLiteStore = SQLiteMachine.TestCase
TestAgainstInMemoryOnSQLiteStore.settings = machine_settings(4)


# -- what the machines found, each pinned by a deterministic test -----------------------------


def store_of(kind: str, tmp_path: Path) -> CheckpointStore:
    if kind == "sqlite":
        return SQLiteStore(tmp_path / "store.db")
    return make_store(kind, tmp_path / "files", fsync=False)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["memory", "file", "sqlite"])
async def test_a_limited_listing_keeps_the_latest_saves_the_store_clock_dates_alike(
    kind: str, tmp_path: Path
) -> None:
    """``list_conversations(limit=n)`` cut the listing at ``n`` by the store's time of each
    save, then ordered the ``n`` by the records' ``updated_at``: saves the store's clock
    dated alike (a coarse clock; here a fixed one) were cut in the label listing's order, so
    the ``n`` returned were not the ``n`` most recently saved, as the reference returns."""
    store = store_of(kind, tmp_path)
    clock = FakeClock()
    try:
        for conversations in (InMemoryConversationStore(),
                              FastConversationStore(store, clock=clock)):
            held = {cid: Conversation(conversation_id=cid) for cid in "abcde"}
            for cid in "abcdeac":
                await conversations.save(held[cid])
            listed = await conversations.list_conversations()
            assert [record.conversation_id for record in listed] == list("caedb")
            for limit in range(6):
                assert [record.conversation_id for record in await conversations.
                        list_conversations(limit=limit)] == list("caedb")[:limit]
            assert [record.conversation_id for record in await conversations.
                    list_conversations(scope=None, limit=2)] == ["c", "a"]
    finally:
        await store.aclose()


@pytest.mark.anyio
async def test_messages_come_back_as_pydantic_ais_json_reads_them(tmp_path: Path) -> None:
    """Documented difference: messages and usage are stored as Pydantic AI's JSON, so values
    of types JSON lacks come back in their JSON form (the reference keeps Python copies),
    and a save comparing messages takes such a message for an edit."""
    content = {"pair": (1, 2), 3: b"x", "day": datetime.date(2024, 1, 1), "nan": math.nan,
               "inf": -math.inf}
    message = ModelRequest(parts=[ToolReturnPart("lookup", content, tool_call_id="call-1")],
                           timestamp=STAMP)
    store = make_store("memory", tmp_path)
    ours, reference = FastConversationStore(store), InMemoryConversationStore()
    try:
        branched = {}
        for conversations in (reference, ours):
            await conversations.save(Conversation(conversation_id="c", messages=[message],
                                                  usage=RunUsage(audio_seconds=0)))
            loaded = await conversations.load("c")
            assert loaded is not None
            part = loaded.messages[0].parts[0]
            assert isinstance(part, ToolReturnPart)
            expected = content if conversations is reference else {
                "pair": [1, 2], "3": "eA==", "day": "2024-01-01", "nan": None, "inf": None}
            assert typed(part.content) == typed(expected)
            assert typed(loaded.usage.audio_seconds) == typed(
                0 if conversations is reference else 0.0)
            # Saved again as a conversation built by hand (no new_message_index): compared.
            again = Conversation(conversation_id="c", messages=[message],
                                 revision=loaded.revision)
            branched[conversations] = len(await conversations.save(again))
        assert (branched[reference], branched[ours]) == (0, 1)
        record = await ours.read_record("c")
        assert record is not None
        assert len(record.branches) == 1
    finally:
        await store.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["memory", "file", "sqlite"])
async def test_a_record_holding_an_integer_beyond_64_bits_is_stored(
    kind: str, tmp_path: Path
) -> None:
    """A record whose JSON holds an integer beyond 64 bits (in metadata, a pending tool
    call's arguments, usage details) is JSON Pydantic AI writes and reads, and the
    reference stores it; the record's body refused it (``SerializationError``), after the
    save had stored its messages."""
    big = 2 ** 70
    pending = DeferredToolRequests(calls=[ToolCallPart("lookup", {"q": big}, "call-1")])
    store = store_of(kind, tmp_path)
    try:
        for conversations in (InMemoryConversationStore(), FastConversationStore(store)):
            conversation = Conversation(
                conversation_id="c", messages=[ModelRequest.user_text_prompt("hi")],
                usage=RunUsage(details={"big": big}), deferred_tool_requests=pending)
            await conversations.save(conversation)
            record = await conversations.update("c", metadata={"n": -big, "m": [big]})
            assert record.metadata == {"n": -big, "m": [big]}
            loaded = await conversations.load("c")
            assert loaded is not None
            assert loaded.deferred_tool_requests == pending
            assert loaded.usage.details == {"big": big}
            assert loaded.messages == conversation.messages
            stored = await conversations.read_record("c")
            assert stored is not None
            assert stored.metadata == {"n": -big, "m": [big]}
    finally:
        await store.aclose()


@pytest.mark.anyio
async def test_reads_of_an_id_or_scope_no_save_can_store_find_nothing(tmp_path: Path) -> None:
    """A conversation id or scope holding a lone surrogate (not Unicode text), or an id
    longer than a run id holds, cannot be stored (documented: the save raises
    ``ValidationError``, where the reference stores it). Reads of one find nothing, as the
    reference's reads of an id it does not have: they raised ``ValidationError``."""
    store = make_store("memory", tmp_path)
    ours, reference = FastConversationStore(store), InMemoryConversationStore()
    try:
        for conversations in (reference, ours):
            await conversations.save(Conversation(conversation_id="c"), scope="alice")
            for cid in ("\ud800", "x" * 4085):
                assert await conversations.load(cid) is None
                assert await conversations.load_entries(cid) is None
                assert await conversations.read_record(cid) is None
                await conversations.delete(cid)
                with pytest.raises(UserError):
                    await conversations.update(cid, title="t")
                with pytest.raises(UserError):
                    await conversations.branch(cid, at=0, expected_revision=None)
                with pytest.raises(UserError):
                    await conversations.fork(cid)
            assert await conversations.list_conversations(scope="\udc00") == []
            assert await conversations.load("c", scope="\udc00") is None
        for cid, scope in (("\ud800", None), ("x" * 4085, None), ("c2", "\udc00")):
            with pytest.raises(ValidationError):
                await ours.save(Conversation(conversation_id=cid), scope=scope)
            await reference.save(Conversation(conversation_id=cid), scope=scope)
        assert [record.conversation_id for record in await ours.list_conversations()] == ["c"]
    finally:
        await store.aclose()
