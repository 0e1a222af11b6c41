"""The framework adapters other than LangGraph under network faults (Redis, PostgreSQL, S3
and DynamoDB on moto).

Each adapter is driven as its framework drives it, over a store whose connection goes through
a :class:`~tests.reliability.faults.FaultProxy` (random cuts, lost replies and delays after an
opening that holds each kind twice) and whose driver never retries, so the faults reach the
adapter: an OpenAI Agents ``FastSession`` (``add_items``, ``pop_item``, ``get_items``), a
Google ADK ``FastSessionService`` (``create_session``, ``append_event`` with session, app and
user state, ``get_session``, ``list_sessions``, ``delete_session``), a Pydantic AI
``FastConversationStore`` (``save`` of turns, ``load``, ``list_conversations``) and an Agent
Framework ``FastCheckpointStorage`` (``save`` of supersteps, ``list_checkpoint_ids``,
``get_latest``), two of each interleaved on one store. A call that fails must raise a
``CheckpointError`` (or the framework's own documented error); the user then does what the
framework's documentation tells: calls again, or reads again and sends what is missing.
Afterwards, without faults, the adapter's own view holds every acknowledged item, event or
message exactly once, in order, nothing of a failed call twice, and nothing of the other
session.

Below that, one adapter call at a time meets a sweep (deterministic): the reply of each of
its writing requests lost in turn, with the store's retries; and, with a driver that never
retries, each of its requests answered and the reply lost, then the next request (the
adapter's look at whether its write landed) cut. The store recognises its own write and the
adapter its own change: the call succeeds or fails whole, and a call made again after a
failure never stores twice. By default the sweeps run on Redis, and on S3 for the first
changes (over the PUTs of the run, where S3 creates a run in several requests);
``FC_HUNT=1`` runs every sweep over every request on every store, and longer workloads.
"""

from __future__ import annotations

import functools
import os
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import pytest

pytest.importorskip("agents")
pytest.importorskip("google.adk")
pytest.importorskip("pydantic_ai")
pytest.importorskip("agent_framework")

from agent_framework import WorkflowCheckpoint
from google.adk.errors import StaleSessionError
from google.adk.errors.already_exists_error import AlreadyExistsError
from google.adk.events.event import Event
from google.adk.events.event_actions import EventActions
from google.adk.sessions import Session
from google.genai import types
from pydantic_ai.conversation import Conversation
from pydantic_ai.conversation_store import ConversationConflict
from pydantic_ai.messages import ModelMessage, ModelRequest, ModelResponse, TextPart, UserPromptPart

from fastcheckpoint._config import RetryPolicy
from fastcheckpoint.integrations.agent_framework import FastCheckpointStorage
from fastcheckpoint.integrations.google_adk import FastSessionService
from fastcheckpoint.integrations.openai_agents import FastSession
from fastcheckpoint.integrations.pydantic_ai import FastConversationStore
from fastcheckpoint.stores import CheckpointStore
from tests.reliability._audit import Figures
from tests.reliability._stores import FAST_RETRY, Target
from tests.reliability.conftest import NETWORK
from tests.reliability.faults import (
    INJECTED,
    Fault,
    FaultPlan,
    FaultProxy,
    Wire,
    http_line,
    postgres_running,
)
from tests.reliability.test_langgraph_faults import (
    HTTP_WRITES,
    NO_RETRY,
    STORE_FUNCTIONS,
    _described,
    _foreign,
)

pytestmark = pytest.mark.anyio

HUNT = os.environ.get("FC_HUNT") == "1"
TURNS = 12 if HUNT else 3
FAULT_RATE = 0.1
OPENING_PASSES = 0
"""No passes in the opening: its six faults fall on the first six requests, which every run
makes (each of its saves is a request at least). With passes among them, a short run (Redis:
about one request per call, and a delayed request succeeds) could end before the opening
did, and fewer faults than the test asks for were injected (CI, Agent Framework on Redis)."""
TRIES = 30
"""How often a user sends a call again (or reads again) before the run is taken for stuck."""
DEADLINE = 120.0 if HUNT else 40.0


class Stuck(AssertionError):
    pass


@dataclass
class User:
    """What a user's calls met: the failures, and those that were not allowed."""

    failures: list[str]
    foreign: list[str]

    async def tried(self, call: Callable[[], Awaitable[Any]],
                    allowed: tuple[type[BaseException], ...] = ()) -> Any:
        """``call()`` until it succeeds, sending it again after each ``CheckpointError``;
        ``allowed`` (the framework's own errors) are raised to the caller."""
        for _ in range(TRIES):
            try:
                return await call()
            except allowed:
                raise
            except Exception as exc:  # what is under test: only CheckpointErrors escape
                self.failures.append(_described(exc))
                self.foreign.extend(_described(part) for part in _foreign(exc))
        raise Stuck(f"a call failed {TRIES} times in a row: {self.failures[-3:]}")


# -- OpenAI Agents sessions -----------------------------------------------------------------


def _item(session: str, turn: int, role: str, n: int = 0) -> dict[str, Any]:
    return {"role": role, "content": f"{session} turn {turn} {role} {n}"}


async def _openai_run(store: CheckpointStore, names: list[str], user: User) -> dict[str, list]:
    """Turns on each session: the input, then two output items; every third turn the user
    takes the last output back (``pop_item``). Every call that fails is made again (the
    session's documented retry); after every turn the history read must be what was
    acknowledged. Returns the acknowledged items per session."""
    sessions = {name: FastSession(name, store) for name in names}
    held: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for turn in range(TURNS):
        for name, session in sessions.items():
            for batch in ([_item(name, turn, "user")],
                          [_item(name, turn, "assistant", n) for n in range(2)]):
                await user.tried(functools.partial(session.add_items, batch))
                held[name].extend(batch)
            if turn % 3 == 2:
                popped = await user.tried(session.pop_item)
                if popped != held[name][-1]:
                    raise AssertionError(f"{name}: pop_item gave {popped}, the newest is "
                                         f"{held[name][-1]}")
                held[name].pop()
            found = await user.tried(session.get_items)
            if found != held[name]:
                raise AssertionError(f"{name} after turn {turn}: {found} != {held[name]}")
    return held


async def _openai_audit(store: CheckpointStore, held: dict[str, list]) -> list[str]:
    problems = []
    for name, items in held.items():
        found = await FastSession(name, store).get_items()
        if found != items:
            problems.append(f"session {name}: holds {found}, acknowledged {items}")
    return problems


# -- Google ADK sessions --------------------------------------------------------------------

def _app(user_id: str) -> str:
    """An app of the test's own: app state is shared by every session of an app in a store
    (a DynamoDB table is shared by the session's tests)."""
    return f"app-{user_id}"


def _event(session: str, turn: int, counter: int) -> Event:
    content = types.Content(role="model", parts=[types.Part(text=f"{session} turn {turn}")])
    return Event(author="agent", invocation_id=f"inv-{turn}", content=content,
                 actions=EventActions(state_delta={
                     "turn": turn, "app:last": f"{session}/{turn}", "user:turns": counter}))


@dataclass
class _AdkModel:
    events: dict[str, list[str]]
    turns: dict[str, int]
    app_last: str = ""
    user_turns: int = 0


async def _adk_session(service: FastSessionService, user_id: str, name: str,
                       user: User) -> Session:
    """Create the session; after a failed create the user looks for it (it may be there) and
    creates it again if it is not."""
    for _ in range(TRIES):
        try:
            return await service.create_session(app_name=_app(user_id), user_id=user_id,
                                                session_id=name, state={"turn": -1})
        except AlreadyExistsError:
            pass  # an earlier try stored it
        except Exception as exc:
            user.failures.append(_described(exc))
            user.foreign.extend(_described(part) for part in _foreign(exc))
        found = await _adk_read(service, user_id, name, user)
        if found is not None:
            return found
    raise Stuck(f"could not create session {name}: {user.failures[-3:]}")


async def _adk_read(service: FastSessionService, user_id: str, name: str,
                    user: User) -> Session | None:
    session: Session | None = await user.tried(
        lambda: service.get_session(app_name=_app(user_id), user_id=user_id, session_id=name))
    return session


async def _adk_append(service: FastSessionService, user_id: str, session: Session,
                      event: Event, user: User) -> Session:
    """Append ``event``; after a failure, ADK's rule: read the session again and append the
    event to it (one held already is not stored again)."""
    for _ in range(TRIES):
        try:
            await service.append_event(session, event)
            return session
        except StaleSessionError:
            pass
        except Exception as exc:
            user.failures.append(_described(exc))
            user.foreign.extend(_described(part) for part in _foreign(exc))
        found = await _adk_read(service, user_id, session.id, user)
        if found is None:
            raise AssertionError(f"session {session.id} is gone")
        session = found
    raise Stuck(f"could not append to {session.id}: {user.failures[-3:]}")


async def _adk_run(store: CheckpointStore, names: list[str], user_id: str,
                   user: User) -> _AdkModel:
    service = FastSessionService(store)
    model = _AdkModel(events={name: [] for name in names}, turns=dict.fromkeys(names, -1))
    sessions = {name: await _adk_session(service, user_id, name, user) for name in names}
    for turn in range(TURNS):
        for name in names:
            model.user_turns += 1
            event = _event(name, turn, model.user_turns)
            sessions[name] = await _adk_append(service, user_id, sessions[name], event, user)
            model.events[name].append(event.id)
            model.turns[name], model.app_last = turn, f"{name}/{turn}"
            if [held.id for held in sessions[name].events] != model.events[name]:
                raise AssertionError(f"{name} after turn {turn}: the session object holds "
                                     f"{[held.id for held in sessions[name].events]}")
    gone = await _adk_session(service, user_id, "doomed", user)
    model.user_turns += 1
    await _adk_append(service, user_id, gone, _event("doomed", 0, model.user_turns), user)
    model.app_last = "doomed/0"
    await user.tried(lambda: service.delete_session(app_name=_app(user_id), user_id=user_id,
                                                    session_id="doomed"))
    return model


async def _adk_audit(store: CheckpointStore, user_id: str, model: _AdkModel) -> list[str]:
    problems = []
    service = FastSessionService(store)
    for name, ids in model.events.items():
        found = await service.get_session(app_name=_app(user_id), user_id=user_id, session_id=name)
        if found is None:
            problems.append(f"session {name} is gone")
            continue
        held = [event.id for event in found.events]
        if held != ids:
            problems.append(f"session {name}: holds events {held}, acknowledged {ids}")
        wanted = {"turn": model.turns[name], "app:last": model.app_last,
                  "user:turns": model.user_turns}
        state = {key: found.state.get(key) for key in wanted}
        if state != wanted:
            problems.append(f"session {name}: state {state}, wanted {wanted}")
    listing = await service.list_sessions(app_name=_app(user_id), user_id=user_id)
    listed = Counter(session.id for session in listing.sessions)
    if listed != Counter(list(model.events)):
        problems.append(f"list_sessions: {dict(listed)}")
    if await service.get_session(app_name=_app(user_id), user_id=user_id, session_id="doomed"):
        problems.append("the deleted session is back")
    return problems


# -- Pydantic AI conversations --------------------------------------------------------------


def _turn(name: str, turn: int) -> list[ModelMessage]:
    return [ModelRequest(parts=[UserPromptPart(content=f"{name} asks {turn}")]),
            ModelResponse(parts=[TextPart(content=f"{name} answers {turn}")])]


def _texts(conversation: Conversation | None) -> list[str]:
    return [] if conversation is None else [
        str(message.parts[0].content) for message in conversation.messages]  # type: ignore[union-attr]


async def _pydantic_save(conversations: FastConversationStore, conversation: Conversation,
                         new: list[ModelMessage], held: list[str], user: User) -> Conversation:
    """Save a turn; after a failure, save again, and on a conflict (an earlier try stored
    it, or not) load the conversation and add the turn to it unless it is there."""
    conversation.messages += new
    wanted = [*held, *(str(message.parts[0].content) for message in new)]
    for _ in range(TRIES):
        try:
            await user.tried(functools.partial(conversations.save, conversation),
                             allowed=(ConversationConflict,))
            return conversation
        except ConversationConflict:
            pass
        loaded = await user.tried(functools.partial(conversations.load,
                                                    conversation.conversation_id))
        texts = _texts(loaded)
        if texts == wanted:
            return loaded
        if texts != held:
            raise AssertionError(f"{conversation.conversation_id}: holds {texts}, "
                                 f"acknowledged {held}")
        conversation = loaded or Conversation(conversation_id=conversation.conversation_id)
        conversation.messages += new
    raise Stuck(f"could not save {conversation.conversation_id}: {user.failures[-3:]}")


async def _pydantic_run(store: CheckpointStore, names: list[str],
                        user: User) -> dict[str, list[str]]:
    conversations = FastConversationStore(store)
    held: dict[str, list[str]] = {name: [] for name in names}
    current = {name: Conversation(conversation_id=name) for name in names}
    for turn in range(TURNS):
        for name in names:
            current[name] = await _pydantic_save(conversations, current[name],
                                                 _turn(name, turn), held[name], user)
            held[name] = _texts(current[name])
    return held


async def _pydantic_audit(store: CheckpointStore, held: dict[str, list[str]]) -> list[str]:
    problems = []
    conversations = FastConversationStore(store)
    for name, texts in held.items():
        found = _texts(await conversations.load(name))
        if found != texts:
            problems.append(f"conversation {name}: holds {found}, acknowledged {texts}")
    listed = Counter(record.conversation_id
                     for record in await conversations.list_conversations())
    if listed != Counter(list(held)):
        problems.append(f"list_conversations: {dict(listed)}")
    return problems


# -- Agent Framework checkpoints ------------------------------------------------------------


def _workflow_checkpoint(workflow: str, iteration: int,
                         previous: str | None) -> WorkflowCheckpoint:
    return WorkflowCheckpoint(workflow_name=workflow, graph_signature_hash="hash",
                              checkpoint_id=f"{workflow}-{iteration}",
                              previous_checkpoint_id=previous, iteration_count=iteration,
                              timestamp=f"2026-01-01T00:00:{iteration:02d}+00:00",
                              state={"step": iteration})


async def _framework_run(store: CheckpointStore, names: list[str],
                         user: User) -> dict[str, list[str]]:
    """Supersteps of two workflows, each saving a checkpoint after the one before (a save
    that failed is made again: a save of an id replaces it)."""
    storage = FastCheckpointStorage(store)
    saved: dict[str, list[str]] = {name: [] for name in names}
    for iteration in range(TURNS):
        for name in names:
            previous = saved[name][-1] if saved[name] else None
            checkpoint = _workflow_checkpoint(name, iteration, previous)
            await user.tried(functools.partial(storage.save, checkpoint))
            saved[name].append(checkpoint.checkpoint_id)
    return saved


async def _framework_audit(store: CheckpointStore, saved: dict[str, list[str]]) -> list[str]:
    problems = []
    storage = FastCheckpointStorage(store)
    for name, ids in saved.items():
        listed = await storage.list_checkpoint_ids(workflow_name=name)
        if listed != ids:
            problems.append(f"workflow {name}: lists {listed}, saved {ids}")
        latest = await storage.get_latest(workflow_name=name)
        if latest is None or latest.checkpoint_id != ids[-1] or latest.state != {
                "step": len(ids) - 1}:
            problems.append(f"workflow {name}: latest {latest and latest.checkpoint_id}")
    return problems


# -- the workloads under random faults ------------------------------------------------------


Run = Callable[[CheckpointStore, str, User], Awaitable[Any]]
Audit = Callable[[CheckpointStore, str, Any], Awaitable[list[str]]]


def _names(tag: str) -> list[str]:
    return [f"{tag}-a", f"{tag}-b"]


WORKLOADS: dict[str, tuple[Run, Audit]] = {
    "openai-agents": (
        lambda store, tag, user: _openai_run(store, _names(tag), user),
        lambda store, tag, held: _openai_audit(store, held)),
    "google-adk": (
        lambda store, tag, user: _adk_run(store, _names("s"), tag, user),
        _adk_audit),
    "pydantic-ai": (
        lambda store, tag, user: _pydantic_run(store, _names(tag), user),
        lambda store, tag, held: _pydantic_audit(store, held)),
    "agent-framework": (
        lambda store, tag, user: _framework_run(store, _names(tag), user),
        lambda store, tag, saved: _framework_audit(store, saved)),
}


@pytest.mark.parametrize("adapter", list(WORKLOADS))
async def test_an_adapter_through_faults_keeps_every_acknowledged_change_once(
    network_target: Target, seed: int, figures: Figures, adapter: str
) -> None:
    assert network_target.upstream is not None
    assert network_target.wire is not None
    run, audit = WORKLOADS[adapter]
    tag = f"af-{adapter}-{secrets.token_hex(3)}"
    user = User([], [])
    plan = FaultPlan.opening(seed, rate=FAULT_RATE, passes=OPENING_PASSES)
    with FaultProxy(network_target.upstream, network_target.wire, plan) as proxy:
        store = network_target.store(proxy.endpoint, NO_RETRY)
        try:
            with anyio.fail_after(DEADLINE):
                model = await run(store, tag, user)
        finally:
            with anyio.move_on_after(10):
                await store.aclose()
    replay = f"{figures.replay}, faults {dict(proxy.counts)}"
    direct = network_target.store()
    try:
        with anyio.fail_after(DEADLINE):
            problems = await audit(direct, tag, model)
    finally:
        await direct.aclose()
    figures.add("adapter-faults", f"{adapter} {network_target.name}", faults=proxy.injected,
                failed_calls=len(user.failures), problems=len(problems))
    assert not user.foreign, f"{replay}: calls raised non-CheckpointErrors: {user.foreign}"
    assert not problems, f"{replay}: {problems}"
    assert proxy.injected >= len(INJECTED) * 2


# -- one adapter call, the reply of each request lost in turn ---------------------------------


@dataclass(frozen=True)
class Sweep:
    prepare: Callable[[CheckpointStore, str], Awaitable[None]]
    """Writes what the call finds, on a store without faults."""
    call: Callable[[CheckpointStore, str, User], Awaitable[None]]
    """The call, made by a user through the faulty store (sent again after a failure)."""
    check: Callable[[CheckpointStore, str], Awaitable[list[str]]]
    """What is wrong afterwards, read without faults."""


def _openai_prepared(items: int) -> Callable[[CheckpointStore, str], Awaitable[None]]:
    async def prepare(store: CheckpointStore, tag: str) -> None:
        await FastSession(tag, store).add_items([_item(tag, 0, "user", n) for n in range(items)])
    return prepare


async def _openai_add(store: CheckpointStore, tag: str, user: User) -> None:
    session = FastSession(tag, store)
    await user.tried(lambda: session.add_items([_item(tag, 1, "assistant", n) for n in range(2)]))


async def _openai_pop(store: CheckpointStore, tag: str, user: User) -> None:
    session = FastSession(tag, store)
    popped = await user.tried(session.pop_item)
    if popped != _item(tag, 0, "user", 2):
        raise AssertionError(f"pop_item gave {popped}")


async def _adk_prepare(store: CheckpointStore, tag: str) -> None:
    service = FastSessionService(store)
    session = await service.create_session(app_name=_app(tag), user_id=tag, session_id="s",
                                           state={"turn": 0})
    await service.append_event(session, _event("s", 0, 1))


async def _adk_call(store: CheckpointStore, tag: str, user: User) -> None:
    service = FastSessionService(store)
    session = await _adk_read(service, tag, "s", user)
    assert session is not None
    await _adk_append(service, tag, session, _event("s", 1, 2), user)


async def _adk_check(store: CheckpointStore, tag: str) -> list[str]:
    found = await FastSessionService(store).get_session(app_name=_app(tag), user_id=tag,
                                                        session_id="s")
    assert found is not None
    texts = [event.content.parts[0].text for event in found.events]  # type: ignore[union-attr,index]
    state = {key: found.state.get(key) for key in ("turn", "user:turns")}
    problems = [] if texts == ["s turn 0", "s turn 1"] else [f"events {texts}"]
    return problems if state == {"turn": 1, "user:turns": 2} else [*problems, f"state {state}"]


async def _pydantic_prepare(store: CheckpointStore, tag: str) -> None:
    await FastConversationStore(store).save(Conversation(conversation_id=tag,
                                                         messages=_turn(tag, 0)))


async def _pydantic_call(store: CheckpointStore, tag: str, user: User) -> None:
    conversations = FastConversationStore(store)
    loaded = await user.tried(lambda: conversations.load(tag))
    await _pydantic_save(conversations, loaded, _turn(tag, 1), _texts(loaded), user)


async def _pydantic_check(store: CheckpointStore, tag: str) -> list[str]:
    found = _texts(await FastConversationStore(store).load(tag))
    wanted = _texts(Conversation(conversation_id=tag, messages=[*_turn(tag, 0), *_turn(tag, 1)]))
    return [] if found == wanted else [f"holds {found}"]


async def _openai_check_add(store: CheckpointStore, tag: str) -> list[str]:
    wanted = [*[_item(tag, 0, "user", n) for n in range(3)],
              *[_item(tag, 1, "assistant", n) for n in range(2)]]
    found = await FastSession(tag, store).get_items()
    return [] if found == wanted else [f"holds {found}"]


async def _openai_check_pop(store: CheckpointStore, tag: str) -> list[str]:
    found = await FastSession(tag, store).get_items()
    wanted = [_item(tag, 0, "user", n) for n in range(2)]
    return [] if found == wanted else [f"holds {found}"]


async def _nothing(store: CheckpointStore, tag: str) -> None:
    pass


async def _openai_first(store: CheckpointStore, tag: str, user: User) -> None:
    session = FastSession(tag, store)
    await user.tried(lambda: session.add_items([_item(tag, 0, "user")]))


async def _openai_check_first(store: CheckpointStore, tag: str) -> list[str]:
    found = await FastSession(tag, store).get_items()
    return [] if found == [_item(tag, 0, "user")] else [f"holds {found}"]


async def _adk_create(store: CheckpointStore, tag: str, user: User) -> None:
    await _adk_session(FastSessionService(store), tag, "s", user)


async def _adk_check_created(store: CheckpointStore, tag: str) -> list[str]:
    found = await FastSessionService(store).get_session(app_name=_app(tag), user_id=tag,
                                                        session_id="s")
    return [] if found is not None and found.state == {"turn": -1} else [f"found {found}"]


async def _pydantic_first(store: CheckpointStore, tag: str, user: User) -> None:
    await _pydantic_save(FastConversationStore(store), Conversation(conversation_id=tag),
                         _turn(tag, 0), [], user)


async def _pydantic_check_first(store: CheckpointStore, tag: str) -> list[str]:
    found = _texts(await FastConversationStore(store).load(tag))
    wanted = _texts(Conversation(conversation_id=tag, messages=_turn(tag, 0)))
    return [] if found == wanted else [f"holds {found}"]


async def _framework_prepare(store: CheckpointStore, tag: str) -> None:
    await FastCheckpointStorage(store).save(_workflow_checkpoint(tag, 0, None))


async def _framework_first(store: CheckpointStore, tag: str, user: User) -> None:
    storage = FastCheckpointStorage(store)
    await user.tried(functools.partial(storage.save, _workflow_checkpoint(tag, 0, None)))


async def _framework_next(store: CheckpointStore, tag: str, user: User) -> None:
    storage = FastCheckpointStorage(store)
    await user.tried(functools.partial(storage.save, _workflow_checkpoint(tag, 1, f"{tag}-0")))


def _framework_holds(count: int) -> Callable[[CheckpointStore, str], Awaitable[list[str]]]:
    async def check(store: CheckpointStore, tag: str) -> list[str]:
        listed = await FastCheckpointStorage(store).list_checkpoint_ids(workflow_name=tag)
        wanted = [f"{tag}-{n}" for n in range(count)]
        return [] if listed == wanted else [f"lists {listed}"]
    return check


SWEEPS = {
    "framework-first": Sweep(_nothing, _framework_first, _framework_holds(1)),
    "framework-save": Sweep(_framework_prepare, _framework_next, _framework_holds(2)),
    "openai-first": Sweep(_nothing, _openai_first, _openai_check_first),
    "adk-create_session": Sweep(_nothing, _adk_create, _adk_check_created),
    "pydantic-first": Sweep(_nothing, _pydantic_first, _pydantic_check_first),
    "openai-add_items": Sweep(_openai_prepared(3), _openai_add, _openai_check_add),
    "openai-pop_item": Sweep(_openai_prepared(3), _openai_pop, _openai_check_pop),
    "adk-append_event": Sweep(_adk_prepare, _adk_call, _adk_check),
    "pydantic-save": Sweep(_pydantic_prepare, _pydantic_call, _pydantic_check),
}


FIRSTS = ("openai-first", "pydantic-first", "framework-first")
"""The first change of a new session (an entry log's, as ADK's ``create_session``) and of a
new conversation: S3 creates a run in several requests, and a first change that fails
between them leaves the run half made."""
S3_PUTS = http_line(rb"^PUT /[^ ]*/runs/")
"""S3's PUTs of a run's objects: where its first-change sweep meets faults in CI (the run
object's reply lost, the next, its first checkpoint's, cut: the run half made)."""


def _in_ci(store: str, name: str, mode: str) -> bool:
    """Whether the sweep runs without ``FC_HUNT=1``: every sweep on Redis (a second or so
    each), and the first changes on S3 over the PUTs of the run, with the caller's retries.
    ``FC_HUNT=1``: every sweep, over every request, on every store (about ten minutes)."""
    return HUNT or store == "redis" or (
        store == "s3" and name in FIRSTS and mode == "caller-retries")


def _writes(target: Target) -> Wire:
    """The requests that may write: where the store-retries sweep loses replies."""
    if target.name == "postgres":
        return postgres_running(STORE_FUNCTIONS)
    if target.name in ("s3", "dynamodb"):
        return HTTP_WRITES
    assert target.wire is not None
    return target.wire


def _every(target: Target) -> Wire:
    """Every request of a call (on PostgreSQL, every store function call)."""
    if target.name == "postgres":
        return postgres_running(STORE_FUNCTIONS)
    assert target.wire is not None
    return target.wire


async def _swept(target: Target, sweep: Sweep, wire: Wire, retry: RetryPolicy,
                 script: list[Fault], tag: str) -> tuple[int, User, list[str]]:
    """Prepare, make the call through a proxy with ``script``, check; the requests the proxy
    saw, what the user met, and what is wrong."""
    assert target.upstream is not None
    direct = target.store()
    user = User([], [])
    try:
        await sweep.prepare(direct, tag)
        with FaultProxy(target.upstream, wire, FaultPlan(script=script)) as proxy:
            store = target.store(proxy.endpoint, retry)
            try:
                with anyio.fail_after(20):
                    await sweep.call(store, tag, user)
            finally:
                await store.aclose()
        problems = await sweep.check(direct, tag)
    finally:
        await direct.aclose()
    return sum(proxy.counts.values()), user, problems


MODES = {
    "store-retries": (FAST_RETRY, _writes, [Fault.LOSE_REPLY]),
    "caller-retries": (NO_RETRY, _every, [Fault.LOSE_REPLY, Fault.CUT]),
}
"""How the sweep fails each request in turn: with the store's retries, its reply lost; with
a driver that never retries (the adapter's own look and the user's call again take over),
its reply lost and the next request (the adapter's look) cut."""


@pytest.fixture
def swept_target(request: pytest.FixtureRequest) -> Target:
    """The store a sweep runs on (of :data:`NETWORK`, by name)."""
    target: Target = request.getfixturevalue(f"{request.param}_store_target")
    return target


@pytest.mark.parametrize(("swept_target", "name", "mode"), [
    pytest.param(store, name, mode, id=f"{store}-{name}-{mode}")
    for store in NETWORK for name in SWEEPS for mode in MODES
    if _in_ci(store, name, mode)], indirect=["swept_target"])
async def test_an_adapter_call_whose_reply_is_lost_is_applied_once(
    swept_target: Target, name: str, mode: str
) -> None:
    network_target = swept_target
    sweep = SWEEPS[name]
    retry, wire_of, faults = MODES[mode]
    wire = wire_of(network_target) if HUNT or network_target.name != "s3" else S3_PUTS
    base = f"af-{name}-{secrets.token_hex(3)}"
    requests, user, problems = await _swept(network_target, sweep, wire, retry, [], base)
    assert not user.failures, user.failures
    assert not problems, problems
    wrong: list[str] = []
    for lost in range(requests):
        script = [*[Fault.PASS] * lost, *faults]
        _, user, problems = await _swept(network_target, sweep, wire, retry, script,
                                         f"{base}-{lost}")
        where = f"reply of request {lost + 1} of {requests} lost"
        if user.foreign:
            wrong.append(f"{where}: raised {user.foreign}")
        if problems:
            wrong.append(f"{where}: {problems} (failures: {user.failures})")
    assert not wrong, wrong
