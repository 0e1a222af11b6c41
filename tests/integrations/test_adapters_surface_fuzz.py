"""Every public call of every adapter, fuzzed: hostile arguments mixed with valid ones.

The adapters promise that a call raises only ``CheckpointError`` subclasses (or the error the
framework's own interface names for that case) and that a call that raises leaves the store
as it was. Each test here finds an adapter's public methods by introspection (a method added
later is fuzzed too; one the fuzz cannot call sensibly is in ``EXCLUDED`` with its reason),
then calls them in a random order with arguments drawn, parameter by parameter, from a pool
of hostile values (wrong types, huge ints, NaN, 1 MB strings, lone surrogates, NUL, a
``str`` whose ``__eq__`` and ``__hash__`` raise, non-str keys, 10**5 levels of nesting,
self-referencing containers, objects whose ``__repr__`` raises) and of valid values made as
the adapter's own tests make them (so calls reach deep code), sometimes with an unexpected
keyword argument.

Each call must return, or raise an allowed error; an error from anywhere else is a leak
when a frame of ``fastcheckpoint`` raised or passed it on (a ``TypeError`` Python raises
for an unexpected keyword argument, before the method runs, is the caller's). After any
raise, everything the store holds (each run's record, checkpoints and items, read through
the store's own interface) must be what it held before the call.

Memory and file stores. CrewAI is fuzzed in its own lane (it needs its own virtualenv):
not here. CI runs a few fixed (derandomized) examples per adapter and store; hunt with
``ADFUZZ_EXAMPLES=2000`` (random examples per adapter and store).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import os
import secrets
import sys
import traceback
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import fastcheckpoint
from fastcheckpoint import _ids
from fastcheckpoint.errors import CheckpointError, ConfigurationError, ValidationError
from fastcheckpoint.stores import CheckpointStore
from fastcheckpoint.stores.file import _RUN_KEY, FileStore
from fastcheckpoint.stores.memory import MemoryStore
from tests._helpers import FakeClock, make_config
from tests._hostile import (
    DEEP,
    BadStr,
    Boom,
    looped_dict,
    looped_list,
    nested_dict,
    nested_list,
)

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

HUNT = os.environ.get("ADFUZZ_EXAMPLES")
"""Random examples per adapter and store when hunting; unset, CI's few fixed ones."""
EXAMPLES = 10
CALLS = 8
"""Calls per example."""
PACKAGE = str(Path(fastcheckpoint.__file__).resolve().parent)
KINDS = ("memory", "file")


def fuzz_settings() -> settings:
    return settings(
        max_examples=int(HUNT) if HUNT else EXAMPLES,
        derandomize=not HUNT,
        database=None,
        deadline=None,
        # No shrinking: a failure's drawn labels name each call and argument already, and
        # shrinking examples that build 1 MB strings and 10**5 levels takes minutes.
        phases=(Phase.explicit, Phase.reuse, Phase.generate),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                               HealthCheck.data_too_large],
    )


# -- the hostile values -------------------------------------------------------------------------


class BadEq(str):
    """A ``str`` that hashes as a ``str`` but cannot be compared: a dict key."""

    def __eq__(self, other: object) -> bool:
        raise Boom("__eq__")

    def __ne__(self, other: object) -> bool:
        raise Boom("__ne__")

    __hash__ = str.__hash__


class BadRepr:
    """An object whose ``repr`` and ``str`` raise."""

    def __repr__(self) -> str:
        raise Boom("__repr__")

    __str__ = __repr__






HOSTILE: dict[str, Callable[[], Any]] = {
    "None": lambda: None,
    "zero": lambda: 0,
    "minus one": lambda: -1,
    "True": lambda: True,
    "huge int": lambda: 10**400,
    "nan": lambda: float("nan"),
    "inf": lambda: float("inf"),
    "-inf": lambda: float("-inf"),
    "bytes": lambda: b"t1",
    "empty list": lambda: [],
    "list of ints": lambda: [1, 2],
    "empty dict": lambda: {},
    "object": object,
    "empty str": lambda: "",
    "1 MB str": lambda: "x" * 1_000_000,
    "lone surrogate": lambda: "a\ud800",
    "NUL and controls": lambda: "t\x00\x01\x1b\n",
    "BadStr": lambda: BadStr("t1"),
    "BadRepr": BadRepr,
    "non-str keys": lambda: {1: "a", None: "b", (1, 2): "c"},
    "BadEq key": lambda: {BadEq("k"): 1},
    "deep list": lambda: nested_list(DEEP),
    "deep dict": lambda: nested_dict(DEEP),
    "looped list": looped_list,
    "looped dict": looped_dict,
    "list of BadRepr": lambda: [BadRepr()],
    "list of surrogates": lambda: ["\udfff"],
    "list of BadStr": lambda: [BadStr("t1")],
    "dict of hostile values": lambda: {"configurable": {"thread_id": BadStr("t"),
                                                        "checkpoint_ns": 10**400}},
}
UNEXPECTED = "unexpected_keyword"


# -- what the store holds -----------------------------------------------------------------------


def _run_keys(store: CheckpointStore) -> list[str]:
    if isinstance(store, MemoryStore):
        return sorted(set(store._runs) | set(store._items))
    assert isinstance(store, FileStore)
    return sorted(name for name in os.listdir(store._runs) if _RUN_KEY.fullmatch(name))


async def contents(store: CheckpointStore, now: float) -> dict[str, Any]:
    """Every run's record, checkpoints (with their ids) and items, as the store reads them."""
    held: dict[str, Any] = {}
    for key in _run_keys(store):
        headers, status = await store.headers(key, before=None, limit=1_000_000, now=now,
                                              include_expired=True)
        checkpoints = [(header, await store.get(key, header.sequence, now=now))
                       for header in headers]
        items: list[tuple[str, bytes]] = []
        while True:
            page = await store.scan_items(key, start_after=items[-1][0] if items else None,
                                          limit=1000, now=now)
            items += page
            if len(page) < 1000:
                break
        found = (await store.get_run(key, now=now), status, checkpoints, items)
        if found != (None, None, [], []):  # a key with nothing left (an emptied item space)
            held[key] = found
    return held


# -- the fuzz -----------------------------------------------------------------------------------


Factory = Callable[["Context"], Any]
"""A valid value, made from the example's context (it may be a coroutine: awaited)."""


@dataclass
class Context:
    """One example: its store, its clock, the adapter's objects, what seeding left."""

    store: CheckpointStore
    clock: FakeClock
    objects: dict[str, Any] = field(default_factory=dict)
    known: dict[str, Any] = field(default_factory=dict)


@dataclass
class Surface:
    """An adapter's public classes, how to build them over a store, valid values by parameter
    name, and what errors its framework's interface names."""

    classes: tuple[type, ...]
    build: Callable[[Context], Awaitable[None]]
    valid: dict[str, list[Factory]]
    excluded: dict[str, str]
    excluded_bases: dict[type, str] = field(default_factory=dict)
    """Classes (a framework's base) whose own methods are not fuzzed, with the reason; a
    method the adapter overrides is fuzzed all the same."""
    allowed: tuple[type[BaseException], ...] = ()
    allowed_in: dict[str, tuple[type[BaseException], ...]] = field(default_factory=dict)
    """Errors the framework's interface names for one method (by its name)."""
    blocking: frozenset[str] = frozenset()
    """Methods that block (run in a worker thread)."""
    indexes: frozenset[str] = frozenset()
    """Run keys of indexes the adapter writes ahead of a save on purpose (so that a crash
    between the two never leaves a checkpoint its index does not find): a save the store
    refuses afterwards leaves the entry, and the comparison skips these keys."""


def public_methods(cls: type) -> list[str]:
    """The public methods of ``cls`` and of what it inherits (a framework's base class)."""
    found = []
    for name in dir(cls):
        if name.startswith("_"):
            continue
        attribute = inspect.getattr_static(cls, name)
        if isinstance(attribute, (property, type)):
            continue
        if callable(getattr(cls, name)):
            found.append(name)
    return found


def fuzzed_methods(surface: Surface) -> list[tuple[type, str]]:
    return [(cls, name) for cls in surface.classes for name in public_methods(cls)
            if f"{cls.__name__}.{name}" not in surface.excluded
            and _owner(cls, name) not in surface.excluded_bases]


def _owner(cls: type, name: str) -> type:
    return next(base for base in cls.__mro__ if name in vars(base))


def check_exclusions(surface: Surface) -> None:
    every = {f"{cls.__name__}.{name}" for cls in surface.classes for name in public_methods(cls)}
    gone = sorted(set(surface.excluded) - every)
    assert not gone, f"EXCLUDED names methods that no longer exist: {gone}"
    unused = [base.__name__ for base in surface.excluded_bases
              if not any(issubclass(cls, base) for cls in surface.classes)]
    assert not unused, f"the adapter no longer inherits from {unused}"


def _ours(error: BaseException) -> bool:
    """Whether a frame of fastcheckpoint raised ``error`` or passed it on (also for an
    exception group's members and the causes chained to it)."""
    frames = traceback.extract_tb(error.__traceback__)
    if any(frame.filename.startswith(PACKAGE) for frame in frames):
        return True
    if isinstance(error, BaseExceptionGroup):
        return any(_ours(inner) for inner in error.exceptions)
    return False


def _allowed(surface: Surface, name: str, error: BaseException) -> bool:
    if isinstance(error, BaseExceptionGroup):
        return False
    if isinstance(error, (CheckpointError, *surface.allowed, *surface.allowed_in.get(name, ()))):
        return True
    return not _ours(error)  # the framework's own code, or Python refusing the arguments


async def _argument(
    data: st.DataObject, surface: Surface, context: Context, parameter: inspect.Parameter,
    label: str,
) -> tuple[str, Any]:
    valid = surface.valid.get(parameter.name, [])
    names = [f"valid {index}" for index in range(len(valid))] * 2 + sorted(HOSTILE)
    choice = data.draw(st.sampled_from(names), label=f"{label}.{parameter.name}")
    if choice.startswith("valid "):
        value = valid[int(choice.split()[1])](context)
        if inspect.isawaitable(value):
            value = await value
        return choice, value
    return choice, HOSTILE[choice]()


async def _call(
    data: st.DataObject, surface: Surface, context: Context, cls: type, name: str, step: int,
) -> None:
    target = context.objects[cls.__name__]
    method = getattr(target, name)
    signature = inspect.signature(method)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    label = f"{step}:{cls.__name__}.{name}"
    for parameter in signature.parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.default is not parameter.empty and data.draw(
                st.booleans(), label=f"{label}.{parameter.name} omitted"):
            continue
        _, value = await _argument(data, surface, context, parameter, label)
        if parameter.kind is parameter.KEYWORD_ONLY:
            kwargs[parameter.name] = value
        else:
            args.append(value)
    if data.draw(st.integers(0, 9), label=f"{label} unexpected keyword") == 0:
        kwargs[UNEXPECTED] = data.draw(st.sampled_from(sorted(HOSTILE)), label="its value")
    now = context.clock()
    before = await contents(context.store, now)
    try:
        if name in surface.blocking:
            result = await anyio.to_thread.run_sync(lambda: method(*args, **kwargs))
        else:
            result = method(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            elif inspect.isasyncgen(result):
                result = [found async for found in result]
            elif isinstance(result, Iterator):
                result = list(result)
    except Exception as exc:
        if not _allowed(surface, name, exc):
            raise AssertionError(
                f"{label} leaked {type(exc).__name__}: {_text(exc)}") from exc
        if _without(await contents(context.store, now), surface.indexes) != \
                _without(before, surface.indexes):
            raise AssertionError(
                f"{label} raised {type(exc).__name__} and changed the store") from exc
    else:
        if name == "from_env":  # a new object, on a store it opened
            closing = getattr(result, "aclose", None)
            if closing is not None:
                await closing()


def _without(held: dict[str, Any], keys: frozenset[str]) -> dict[str, Any]:
    return {key: found for key, found in held.items() if key not in keys}


def _text(error: BaseException) -> str:
    try:
        return str(error)[:300]
    except Exception:  # a hostile value in the message
        return "<unprintable>"


def _store(kind: str, root: Path) -> CheckpointStore:
    if kind == "memory":
        return MemoryStore()
    return FileStore(root / secrets.token_hex(4), fsync=False)


def fuzz(surface: Surface, kind: str, tmp_path: Path) -> None:
    check_exclusions(surface)
    methods = fuzzed_methods(surface)

    @fuzz_settings()
    @given(st.data())
    def example(data: st.DataObject) -> None:
        async def run() -> None:
            context = Context(store=_store(kind, tmp_path), clock=FakeClock())
            try:
                await surface.build(context)
                for step in range(CALLS):
                    cls, name = data.draw(st.sampled_from(methods), label=f"call {step}")
                    await _call(data, surface, context, cls, name, step)
            finally:
                for target in context.objects.values():
                    with contextlib.suppress(CheckpointError):
                        if hasattr(target, "aclose"):
                            await target.aclose()
                        else:  # a blocking adapter
                            await anyio.to_thread.run_sync(target.close)
                await context.store.aclose()

        anyio.run(run, backend="asyncio")

    limit = sys.getrecursionlimit()
    try:
        example()
    finally:
        sys.setrecursionlimit(limit)


def _values(*values: Any) -> list[Factory]:
    return [lambda _, value=value: value for value in values]


MEMORY_ENV = {"FASTCHECKPOINT_URL": "memory://"}


def _fresh(*values: Any) -> list[Factory]:
    """Factories of deep copies of ``values`` (a call may keep or change what it is given)."""
    return [lambda _, value=value: copy.deepcopy(value) for value in values]


# -- OpenAI Agents ------------------------------------------------------------------------------


def openai_surface() -> Surface:
    pytest.importorskip("agents")
    from agents import Agent, RunContextWrapper, RunState

    from fastcheckpoint.integrations.openai_agents import FastSession, RunStateStore

    items = [{"role": "user", "content": "Héllo \u0000"},
             {"type": "function_call_output", "call_id": "c1", "output": "found"}]
    agent = Agent(name="assistant")

    async def build(context: Context) -> None:
        config = make_config(context.clock)
        session = FastSession("chat-1", context.store, config=config)
        await session.add_items(copy.deepcopy(items))
        context.objects["FastSession"] = session
        context.objects["RunStateStore"] = RunStateStore(context.store, config=config)

    return Surface(
        classes=(FastSession, RunStateStore),
        build=build,
        valid={
            "session_id": _fresh("chat-1", "chat-2"),
            "environ": _fresh(MEMORY_ENV),
            "ttl_seconds": _fresh(None, 60),
            "session_settings": _fresh(None, {"limit": 2}),
            "limit": _fresh(None, 1, 3),
            "items": _fresh(items, items[:1], []),
            "run_id": _fresh("run-1", "run-2"),
            "result": [lambda _: RunState(RunContextWrapper(context={}), "hi", agent)],
            "context_serializer": _fresh(None),
            "agent": [lambda _: agent],
            "context_override": _fresh(None),
            "context_deserializer": _fresh(None),
            "error": _fresh("it failed", ""),
        },
        excluded={},
    )


@pytest.mark.parametrize("kind", KINDS)
def test_openai_agents_surface(kind: str, tmp_path: Path) -> None:
    fuzz(openai_surface(), kind, tmp_path)


# -- Pydantic AI --------------------------------------------------------------------------------


def pydantic_ai_surface() -> Surface:
    pytest.importorskip("pydantic_ai")
    from pydantic_ai.conversation import Conversation
    from pydantic_ai.conversation_store import ConversationConflict
    from pydantic_ai.exceptions import UserError
    from pydantic_ai.messages import ModelRequest, ModelResponse, TextPart, UserPromptPart

    from fastcheckpoint.integrations.pydantic_ai import FastConversationStore

    def turns(*texts: str) -> list[Any]:
        return [message for text in texts for message in (
            ModelRequest(parts=[UserPromptPart(content=text)]),
            ModelResponse(parts=[TextPart(content=f"re: {text}")]))]

    async def build(context: Context) -> None:
        conversations = FastConversationStore(context.store, clock=context.clock)
        context.objects["FastConversationStore"] = conversations
        await conversations.save(Conversation(conversation_id="chat",
                                              messages=turns("one", "two")), scope="alice")

    def conversations(context: Context) -> Any:
        return context.objects["FastConversationStore"]

    async def record(context: Context) -> Any:
        return await conversations(context).read_record("chat")

    async def revision(context: Context) -> Any:
        found = await record(context)
        return None if found is None else found.revision

    async def entry_id(context: Context) -> Any:
        found = await conversations(context).load_entries("chat")
        return found[-1].id if found else "no-such-entry"

    async def loaded(context: Context) -> Any:
        found = await conversations(context).load("chat")
        if found is not None:
            found.messages += turns("more")
        return found

    async def entries(context: Context) -> Any:
        found = await conversations(context).load_entries("chat")
        return tuple(found or ())

    return Surface(
        classes=(FastConversationStore,),
        build=build,
        valid={
            "conversation_id": _fresh("chat", "other"),
            "new_conversation_id": _fresh("fork", None),
            "scope": _fresh(None, "alice"),
            "source_scope": _fresh(None, "alice"),
            "limit": _fresh(None, 1, 3),
            "at": _fresh(None, 1, 2),
            "from_entry": [entry_id, lambda _: None],
            "entry_id": [entry_id],
            "head_id": [entry_id, lambda _: None],
            "expected_revision": [revision, lambda _: None],
            "conversation": [loaded, lambda _: Conversation(conversation_id="other",
                                                            messages=turns("x"))],
            "record": [record],
            "new_entries": [entries, lambda _: ()],
            "title": _fresh("a title", None),
            "expected_title": _fresh(None, "a title"),
            "metadata": _fresh({"k": 1}, None),
            "details": _fresh({"title": "t"}, {"metadata": {"k": [1]}}),
            "expected": _fresh(None, {"title": None}),
            "batch_size": _fresh(1, 500),
            "environ": _fresh(MEMORY_ENV),
        },
        excluded={},
        # Pydantic AI's interface: a stale revision, a negative limit; read_entry raises
        # KeyError for an id the store does not have (as its in-memory store does, and as
        # its read_history expects).
        allowed=(ConversationConflict, UserError),
        allowed_in={"read_entry": (KeyError,)},
    )


@pytest.mark.parametrize("kind", KINDS)
def test_pydantic_ai_surface(kind: str, tmp_path: Path) -> None:
    fuzz(pydantic_ai_surface(), kind, tmp_path)


# -- Agent Framework ----------------------------------------------------------------------------


def agent_framework_surface() -> Surface:
    pytest.importorskip("agent_framework")
    from agent_framework import WorkflowCheckpoint

    from fastcheckpoint.integrations.agent_framework import FastCheckpointStorage

    def checkpoint(workflow: str = "orders") -> Any:
        return WorkflowCheckpoint(workflow_name=workflow, graph_signature_hash="hash",
                                  state={"n": 1, "nested": {"deep": [1.5, None, True]}},
                                  iteration_count=1, metadata={"superstep": 1})

    async def build(context: Context) -> None:
        storage = FastCheckpointStorage(context.store, clock=context.clock)
        context.objects["FastCheckpointStorage"] = storage
        context.known["ids"] = [await storage.save(checkpoint())]

    return Surface(
        classes=(FastCheckpointStorage,),
        build=build,
        valid={
            "checkpoint": [lambda _: checkpoint(), lambda _: checkpoint("other")],
            "checkpoint_id": [lambda context: context.known["ids"][0],
                              lambda _: "no-such-id"],
            "workflow_name": _fresh("orders", "other"),
            "environ": _fresh(MEMORY_ENV),
            "checkpoint_types": _fresh(()),
        },
        excluded={},
    )


@pytest.mark.parametrize("kind", KINDS)
def test_agent_framework_surface(kind: str, tmp_path: Path) -> None:
    fuzz(agent_framework_surface(), kind, tmp_path)


# -- Google ADK ---------------------------------------------------------------------------------


def google_adk_surface() -> Surface:
    pytest.importorskip("google.adk")
    from google.adk.errors import StaleSessionError
    from google.adk.errors.already_exists_error import AlreadyExistsError
    from google.adk.errors.session_not_found_error import SessionNotFoundError
    from google.adk.events.event import Event
    from google.adk.events.event_actions import EventActions
    from google.adk.sessions.base_session_service import GetSessionConfig
    from google.genai import types

    from fastcheckpoint.integrations.google_adk import FastSessionService

    def event(delta: dict[str, Any]) -> Event:
        return Event(author="agent", invocation_id="inv",
                     content=types.Content(role="model", parts=[types.Part(text="hi")]),
                     actions=EventActions(state_delta=delta))

    async def build(context: Context) -> None:
        service = FastSessionService(context.store, clock=context.clock)
        context.objects["FastSessionService"] = service
        context.known["session"] = await service.create_session(
            app_name="app", user_id="u1", session_id="s1",
            state={"topic": "maths", "app:model": "m1", "user:lang": "en"})

    async def fresh_session(context: Context) -> Any:
        return await context.objects["FastSessionService"].get_session(
            app_name="app", user_id="u1", session_id="s1")

    return Surface(
        classes=(FastSessionService,),
        build=build,
        valid={
            "app_name": _fresh("app"),
            "user_id": _fresh("u1", "u2", None),
            "session_id": _fresh("s1", "s2", None),
            "state": _fresh({"k": 1, "app:a": 2, "user:u": [3], "temp:t": 4}, None),
            "config": [lambda _: GetSessionConfig(num_recent_events=1), lambda _: None],
            "session": [lambda context: context.known["session"], fresh_session],
            "event": [lambda _: event({"k": 2, "app:a": 5}), lambda _: event({})],
            "batch_size": _fresh(1, 500),
        },
        excluded={},
        # ADK's interface names these: an id taken, a session gone, a session overtaken.
        allowed=(AlreadyExistsError, SessionNotFoundError, StaleSessionError),
    )


@pytest.mark.parametrize("kind", KINDS)
def test_google_adk_surface(kind: str, tmp_path: Path) -> None:
    fuzz(google_adk_surface(), kind, tmp_path)


# -- LangGraph ----------------------------------------------------------------------------------


def langgraph_surface() -> Surface:
    pytest.importorskip("langgraph")
    from langgraph.checkpoint.base import empty_checkpoint

    from fastcheckpoint.integrations import _langgraph_records as records
    from fastcheckpoint.integrations.langgraph import FastCheckpointSaver

    def config(thread: str, ns: str = "", checkpoint_id: str | None = None) -> dict[str, Any]:
        configurable = {"thread_id": thread, "checkpoint_ns": ns}
        if checkpoint_id is not None:
            configurable["checkpoint_id"] = checkpoint_id
        return {"configurable": configurable}

    def checkpoint(saver: FastCheckpointSaver) -> Any:
        made = empty_checkpoint()
        made["channel_values"] = {"a": 1, "b": ["x", {"y": 2.5}]}
        made["channel_versions"] = {"a": saver.get_next_version(None, None),
                                    "b": saver.get_next_version(None, None)}
        return made

    async def build(context: Context) -> None:
        saver = FastCheckpointSaver(context.store, config=make_config(context.clock))
        context.objects["FastCheckpointSaver"] = saver
        first = checkpoint(saver)
        saved = await saver.aput(config("t1"), first, {"source": "loop", "step": 0,
                                                       "run_id": "r1"},
                                 first["channel_versions"])
        await saver.aput_writes(saved, [("a", 2), ("b", "z")], "task-1")
        context.known["ids"] = [saved["configurable"]["checkpoint_id"]]

    def saver(context: Context) -> Any:
        return context.objects["FastCheckpointSaver"]

    def known(context: Context) -> str:
        ids: list[str] = context.known["ids"]
        return ids[0]

    return Surface(
        classes=(FastCheckpointSaver,),
        build=build,
        valid={
            "config": [lambda context: config("t1", "", known(context)),
                       lambda _: config("t1"), lambda _: config("t2", "sub:1"),
                       lambda context: config("t2", "", known(context))],
            "before": [lambda context: config("t1", "", known(context)), lambda _: None],
            "checkpoint": [lambda context: checkpoint(saver(context))],
            "metadata": _fresh({"source": "loop", "step": 1, "run_id": "r2"}, {}),
            "new_versions": [lambda context: {"a": saver(context).get_next_version(None, None)},
                             lambda _: {}],
            "writes": _fresh([("a", 3)], [("b", {"k": [1, 2]}), ("a", None)], []),
            "task_id": _fresh("task-1", "task-2"),
            "task_path": _fresh("", "~1"),
            "thread_id": _fresh("t1", "t2", None),
            "source_thread_id": _fresh("t1", "t2"),
            "target_thread_id": _fresh("t3", "t1"),
            "thread_ids": _fresh(["t1"], ["t2", "t3"]),
            "run_ids": _fresh(["r1"], []),
            "strategy": _fresh("keep_latest", "delete"),
            "filter": _fresh(None, {"source": "loop"}),
            "limit": _fresh(None, 1),
            "channels": _fresh(["a"], []),
            "current": _fresh(None, "00000000000000000000000000000001.5"),
            "channel": _fresh(None),
            "environ": _fresh(MEMORY_ENV),
            "serde": _fresh(None),
            "extra_allowlist": _fresh([("tests", "Thing")]),
        },
        excluded={
            "FastCheckpointSaver.with_allowlist": "LangGraph's own: it returns a copy of the "
            "saver with another serializer, and calls nothing of ours",
        },
        # The LangGraph run index (for delete_for_runs): written before a run's first save
        # in a namespace, left when the store then refuses the save.
        indexes=frozenset({_ids.run_key(records.REGISTRY_RUN_ID)}),
        blocking=frozenset({"get", "get_tuple", "put", "put_writes", "list", "delete_thread",
                            "delete_for_runs", "copy_thread", "prune",
                            "get_delta_channel_history", "close"}),
    )


@pytest.mark.parametrize("kind", KINDS)
def test_langgraph_surface(kind: str, tmp_path: Path) -> None:
    fuzz(langgraph_surface(), kind, tmp_path)


def test_an_exclusion_of_a_method_that_is_gone_fails() -> None:
    surface = Surface(classes=(MemoryStore,), build=_no_build, valid={},
                      excluded={"MemoryStore.no_such_method": "gone"})
    with pytest.raises(AssertionError, match="no_such_method"):
        check_exclusions(surface)


async def _no_build(context: Context) -> None:
    pass


# -- what the fuzz found ------------------------------------------------------------------------


def _adapters_from_env() -> list[Callable[[Any], Any]]:
    made: list[Callable[[Any], Any]] = []
    if importlib.util.find_spec("agents") is not None:
        from fastcheckpoint.integrations.openai_agents import FastSession, RunStateStore

        made += [lambda environ: FastSession.from_env("chat", environ), RunStateStore.from_env]
    if importlib.util.find_spec("langgraph") is not None:
        from fastcheckpoint.integrations.langgraph import FastCheckpointSaver

        made.append(FastCheckpointSaver.from_env)
    if importlib.util.find_spec("agent_framework") is not None:
        from fastcheckpoint.integrations.agent_framework import FastCheckpointStorage

        made.append(FastCheckpointStorage.from_env)
    if importlib.util.find_spec("pydantic_ai") is not None:
        from fastcheckpoint.integrations.pydantic_ai import FastConversationStore

        made.append(FastConversationStore.from_env)
    return made


@pytest.mark.parametrize("environ", [1.5, "FASTCHECKPOINT_URL=memory://", [("a", "b")],
                                     {1: "memory://"}, {"FASTCHECKPOINT_URL": 5}],
                         ids=["float", "str", "list", "int key", "int value"])
def test_from_env_refuses_an_environ_that_is_not_a_mapping_of_str(environ: object) -> None:
    """Was AttributeError (``environ.items``, ``name.startswith``) from the config's reader."""
    for from_env in _adapters_from_env():
        with pytest.raises(ConfigurationError, match="environ must "):
            from_env(environ)


def test_from_env_reads_an_environ_whose_strings_are_subclasses() -> None:
    """Their own ``__eq__`` and ``__hash__`` never run: the environ is copied as plain str."""
    for from_env in _adapters_from_env():
        made = from_env({BadEq("FASTCHECKPOINT_URL"): BadStr("memory://")})
        anyio.run(made.aclose, backend="asyncio")


async def _raises(call: Callable[[], Any], error: type[BaseException] = CheckpointError) -> None:
    with pytest.raises(error):
        await _completed(call)


async def _completed(call: Callable[[], Any]) -> None:
    result = call()
    if inspect.isawaitable(result):
        await result
    elif inspect.isasyncgen(result):
        async for _ in result:
            pass


@pytest.mark.anyio
@pytest.mark.parametrize("value", ["BadRepr", "deep list"])
async def test_refusals_show_a_value_whose_repr_fails(value: str) -> None:
    """Each message showed the bad value with ``repr``, which raised (a ``__repr__`` that
    raises, RecursionError for 10**5 levels) in place of the refusal."""
    pytest.importorskip("langgraph")
    pytest.importorskip("agents")
    pytest.importorskip("google.adk")
    pytest.importorskip("pydantic_ai")
    pytest.importorskip("agent_framework")
    from fastcheckpoint.integrations.agent_framework import FastCheckpointStorage
    from fastcheckpoint.integrations.google_adk import FastSessionService
    from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
    from fastcheckpoint.integrations.openai_agents import FastSession
    from fastcheckpoint.integrations.pydantic_ai import FastConversationStore

    bad = HOSTILE[value]
    store = MemoryStore()
    saver = FastCheckpointSaver(store)
    config = {"configurable": {"thread_id": "t", "checkpoint_ns": "", "checkpoint_id": "c"}}
    await _raises(lambda: FastSession(bad(), store))
    await _raises(lambda: FastSessionService(store).cleanup_expired(batch_size=bad()))
    await _raises(lambda: FastConversationStore(store).cleanup_expired(batch_size=bad()))
    await _raises(lambda: FastCheckpointStorage(store, checkpoint_types=[bad()]))
    await _raises(lambda: saver.aprune(["t"], strategy=bad()))
    await _raises(lambda: saver.get_next_version(bad(), None))
    await _raises(lambda: saver.aput_writes(config, [bad()], "task"))
    await _raises(lambda: saver.alist(None, limit=bad()))
    await _raises(lambda: saver.adelete_thread(bad()))


@pytest.mark.anyio
async def test_ids_that_are_str_subclasses_are_used_as_plain_str() -> None:
    """A ``str`` subclass whose ``__eq__`` and ``__hash__`` raise reached the run-key cache,
    the adapters' caches and the encoder of the run's header (which refuses subclasses)."""
    pytest.importorskip("langgraph")
    pytest.importorskip("agents")
    pytest.importorskip("pydantic_ai")
    from agents import Agent, RunContextWrapper, RunState

    from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
    from fastcheckpoint.integrations.openai_agents import RunStateStore
    from fastcheckpoint.integrations.pydantic_ai import FastConversationStore

    store = MemoryStore()
    approvals = RunStateStore(store)
    assert await approvals.fail(BadStr("run-1")) is None
    state = RunState(RunContextWrapper(context={}), "hi", Agent(name="assistant"))
    recorded = await approvals.record(BadStr("run-1"), state)
    assert type(recorded.run_id) is str
    conversations = FastConversationStore(store)
    assert await conversations.read_record(BadStr("chat")) is None
    with pytest.raises(KeyError):
        await conversations.read_entry(BadStr("entry"))
    with pytest.raises(ValidationError):
        await conversations.delete_record(["chat"], expected_revision="r")  # type: ignore[arg-type]
    saver = FastCheckpointSaver(store)
    await saver.adelete_thread(BadStr("t"))
    await saver.aprune([BadStr("t")], strategy=BadStr("delete"))
    history = await saver.aget_delta_channel_history(
        config={"configurable": {"thread_id": "t"}}, channels=[BadStr("a")])
    assert [type(channel) for channel in history] == [str]
    config = {"configurable": {"thread_id": "t", "checkpoint_ns": "", "checkpoint_id": "c"}}
    await saver.aput_writes(config, [("a", 1)], BadStr("task"), BadStr("path"))


@pytest.mark.anyio
async def test_langgraph_refuses_arguments_it_raised_python_errors_for() -> None:
    pytest.importorskip("langgraph")
    from langgraph.checkpoint.base import empty_checkpoint

    from fastcheckpoint.integrations.langgraph import FastCheckpointSaver

    saver = FastCheckpointSaver(MemoryStore())
    for thread in ("a\ud800", "\udfff"):  # was UnicodeEncodeError
        await _raises(lambda thread=thread: saver.adelete_thread(thread), ValidationError)
        await _raises(lambda thread=thread: saver.acopy_thread(thread, "t"), ValidationError)
    for current in (float("inf"), float("nan"), 10**400, "²", "1" * 5000 + ".5"):
        # were OverflowError, ValueError (too many digits to print or parse, a digit int()
        # does not take)
        await _raises(lambda current=current: saver.get_next_version(current, None),
                      ValidationError)
    config = {"configurable": {"thread_id": "t", "checkpoint_ns": ""}}
    checkpoint = empty_checkpoint()
    checkpoint["channel_values"] = {"a": 1}
    checkpoint["channel_versions"] = {"a": saver.get_next_version(None, None)}
    for versions in ({"a": nested_dict(DEEP)}, {"a": [1]}):  # was RecursionError
        await _raises(lambda versions=versions: saver.aput(config, checkpoint, {}, versions),
                      ValidationError)
    config["configurable"]["checkpoint_id"] = checkpoint["id"]
    for writes in (None, 1.5, object()):  # was TypeError
        await _raises(lambda writes=writes: saver.aput_writes(config, writes, "task"),
                      ValidationError)


@pytest.mark.anyio
async def test_pydantic_ai_refuses_arguments_it_raised_python_errors_for() -> None:
    pytest.importorskip("pydantic_ai")
    from fastcheckpoint.integrations.pydantic_ai import FastConversationStore

    conversations = FastConversationStore(MemoryStore())
    for limit in ("1", float("inf"), float("nan"), -1):  # were TypeError
        await _raises(lambda limit=limit: conversations.read_records(limit=limit),
                      ValidationError)
        await _raises(lambda limit=limit: conversations.read_history("e", limit=limit),
                      ValidationError)
    for details in (None, ["title"], "title"):  # were TypeError
        await _raises(lambda details=details: conversations.write_details(
            "chat", details, expected_revision="r"), ValidationError)
    await _raises(lambda: conversations.write_details(  # was Boom, from its __hash__
        "chat", {"title": "t"}, expected_revision="r", expected=[BadStr("x")]), ValidationError)
    for record in (None, "chat", {"conversation_id": "chat"}):  # were AttributeError
        await _raises(lambda record=record: conversations.write_record(
            record, expected_revision=None), ValidationError)


def test_agent_framework_refuses_checkpoint_types_that_are_not_classes() -> None:
    pytest.importorskip("agent_framework")
    from fastcheckpoint.integrations.agent_framework import FastCheckpointStorage

    for types in (None, 1.5, "orders.Order", b"x"):  # were TypeError, AttributeError
        with pytest.raises(ConfigurationError, match="checkpoint_types"):
            FastCheckpointStorage(MemoryStore(), checkpoint_types=types)  # type: ignore[arg-type]
