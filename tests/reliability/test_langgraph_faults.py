"""The LangGraph saver under network faults (Redis, PostgreSQL, S3 and DynamoDB on moto).

A small ``StateGraph`` (a node that appends one message with ``add_messages`` and bumps a step
counter, looping ``STEPS`` times; a variant asks with ``interrupt()`` halfway and is resumed
with ``Command(resume=...)``) runs on ``FastCheckpointSaver`` over a store whose connection
goes through a :class:`~tests.reliability.faults.FaultProxy` at ``test_faults``'s rate. The
step loop keeps the suite's driver retries; the interrupt variant's drivers never retry, so
faults reach the saver and LangGraph. A graph run that fails raises a ``CheckpointError``
(nothing else); the thread is then resumed with ``ainvoke(None)``, faults continuing, until
the graph ends. Then, without faults:

* the final state holds steps 1..N once each, in order (no step lost or run twice), and the
  thread's run is ACTIVE;
* ``aget_tuple`` is the newest of ``alist``, whose parent chain is whole, and every
  checkpoint's messages are the steps up to its counter;
* no checkpoint holds a pending write twice.

Below that, the store calls the saver makes (``append_with_items``, ``put_owned_items``,
``put_items(create_only=True)``) with the reply of each of their writing requests lost in
turn (a sweep: deterministic, every such request of the call meets the fault once): the
store's own retry recognises its own applied write, never reports it as taken by another
(``ConflictError``, ``SharedItemGone``), and never stores it twice. A caller that sends the
call again after a ``CheckpointError`` may find an append taken (the outcome was unknown;
S3 takes its slot back, the other stores keep it), never stored twice.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypedDict

import anyio
import pytest
from langchain_core.messages import AIMessage, AnyMessage
from langgraph.errors import EmptyInputError
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Command, interrupt

from fastcheckpoint import CheckpointError, CheckpointStatus, ConflictError, _ids
from fastcheckpoint._config import CheckpointConfig, RetryPolicy
from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
from fastcheckpoint.stores import CheckpointStore, Item, RunRecord, StoredCheckpoint
from tests import _sweeps as sweeps
from tests.reliability._audit import Figures
from tests.reliability._stores import FAST_RETRY, Target
from tests.reliability.faults import (
    HTTP,
    INJECTED,
    Fault,
    FaultPlan,
    FaultProxy,
    Wire,
    postgres_running,
)

pytestmark = pytest.mark.anyio

STEPS = 15
ASKS_AT = 7
"""The step whose node asks (``interrupt``) in the variant that is resumed with a Command."""
FAULT_RATE = 0.08
OPENING_PASSES = 2
"""Passes per kind of fault in the plan's opening: a Redis run of the graph makes as few as
about 20 requests, so the opening's faults all land (with 6, the last could miss it)."""
ATTEMPTS = 60
"""Graph runs (the first, then resumes) before a thread is taken for stuck."""
DEADLINE = 40.0
CONFIG = CheckpointConfig(retry=FAST_RETRY, history_min_entries=4)
"""``messages`` stored as a log past 4 entries: the items nested under it meet faults too."""


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]
    step: int


def _graph(saver: FastCheckpointSaver, *, asks: bool) -> CompiledStateGraph[Any, Any, Any, Any]:
    """The step loop. Messages carry no id: ``add_messages`` gives each a new one, so a step
    run twice shows as two messages instead of one replacing the other."""

    def step(state: State) -> dict[str, Any]:
        number = state["step"] + 1
        content = f"step {number}"
        if asks and number == ASKS_AT:
            content += f" {interrupt({'step': number})}"
        return {"messages": [AIMessage(content)], "step": number}

    def more(state: State) -> str:
        return "step" if state["step"] < STEPS else END

    graph = StateGraph(State)
    graph.add_node("step", step)
    graph.add_edge(START, "step")
    graph.add_conditional_edges("step", more, ["step", END])
    return graph.compile(checkpointer=saver)


def _expected(number: int, *, asks: bool) -> str:
    return f"step {number} yes" if asks and number == ASKS_AT else f"step {number}"


def _config(thread_id: str) -> Any:
    return {"configurable": {"thread_id": thread_id}}


def _described(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"[:300]


def _foreign(exc: BaseException) -> list[BaseException]:
    """What of ``exc`` is not a ``CheckpointError`` (an exception group is looked into)."""
    if isinstance(exc, CheckpointError):
        return []
    parts = getattr(exc, "exceptions", None)  # an exception group (Python 3.10: backported)
    if isinstance(parts, tuple):
        return [inner for part in parts for inner in _foreign(part)]
    return [exc]


async def _run_to_the_end(
    graph: CompiledStateGraph[Any, Any, Any, Any], thread_id: str, *, asks: bool
) -> tuple[int, list[str]]:
    """Run the graph, resuming after every failure and answering its question, until it
    ends; the failures, and those that were not ``CheckpointError``s."""
    config = _config(thread_id)
    start = {"messages": [], "step": 0}
    given: Any = start
    failures: list[str] = []
    foreign: list[str] = []
    for _ in range(ATTEMPTS):
        try:
            result = await graph.ainvoke(given, config)
        except EmptyInputError:  # resumed before the input's checkpoint was stored
            given = start
            continue
        except Exception as exc:  # what is under test: only CheckpointErrors escape
            failures.append(_described(exc))
            foreign.extend(_described(part) for part in _foreign(exc))
            given = None
            continue
        if "__interrupt__" in result:
            assert asks, f"an interrupt nobody asked for: {result['__interrupt__']}"
            given = Command(resume="yes")
            continue
        if result.get("step") == STEPS:
            return len(failures), foreign
        given = None  # ended short of the last step: a save failed after its node ran
    raise AssertionError(f"not done after {ATTEMPTS} runs; failures: {failures[-5:]}")


async def _audit(target: Target, thread_id: str, *, asks: bool) -> list[str]:
    """What is wrong with the thread, read without faults."""
    problems: list[str] = []
    async with FastCheckpointSaver(target.store(), config=CONFIG) as saver:
        graph = _graph(saver, asks=asks)
        config = _config(thread_id)
        state = await graph.aget_state(config)
        contents = [message.content for message in state.values["messages"]]
        wanted = [_expected(n, asks=asks) for n in range(1, STEPS + 1)]
        if contents != wanted or state.values["step"] != STEPS or state.next:
            problems.append(f"final state: step {state.values['step']}, next {state.next}, "
                            f"messages {contents}")
        run = await saver.manager.get_run(thread_id)
        if run is None or run.status is not CheckpointStatus.ACTIVE:
            problems.append(f"the finished thread's run is {run and run.status}")
        listed = [found async for found in saver.alist(config)]
        latest = await saver.aget_tuple(config)
        ids = [found.config["configurable"]["checkpoint_id"] for found in listed]
        if latest is None or not ids or latest.config["configurable"]["checkpoint_id"] != ids[0]:
            problems.append(f"aget_tuple {latest and latest.config} is not alist's newest")
        if len(set(ids)) != len(ids):
            problems.append(f"alist repeats checkpoints: {Counter(ids).most_common(3)}")
        problems.extend(_chain_problems(listed, ids, asks=asks))
    return problems


def _chain_problems(listed: list[Any], ids: list[str], *, asks: bool) -> list[str]:
    problems: list[str] = []
    for index, found in enumerate(listed):
        checkpoint_id = ids[index]
        parent = found.parent_config
        parent_id = None if parent is None else parent["configurable"]["checkpoint_id"]
        if index + 1 < len(listed) and parent_id not in ids[index + 1:]:
            problems.append(f"{checkpoint_id}: parent {parent_id} is not listed before it")
        if index + 1 == len(listed) and parent_id is not None:
            problems.append(f"the first checkpoint {checkpoint_id} has parent {parent_id}")
        values = found.checkpoint["channel_values"]
        step = values.get("step", 0)
        contents = [message.content for message in values.get("messages", [])]
        if contents != [_expected(n, asks=asks) for n in range(1, step + 1)]:
            problems.append(f"{checkpoint_id} at step {step} holds messages {contents}")
        writes = Counter((task_id, channel) for task_id, channel, _ in found.pending_writes)
        twice = [write for write, count in writes.items() if count > 1]
        if twice:
            problems.append(f"{checkpoint_id} holds pending writes twice: {twice}")
    return problems


NO_RETRY = RetryPolicy(base_delay=0.001, max_delay=0.01, max_retries=0)
"""Drivers that never retry: a fault the store cannot absorb by itself fails the graph run."""


@pytest.mark.parametrize(("asks", "retry"), [
    pytest.param(False, FAST_RETRY, id="steps-store-retries"),
    pytest.param(True, NO_RETRY, id="interrupt-no-retries"),
])
async def test_a_graph_run_through_faults_keeps_every_step_once(
    network_target: Target, seed: int, figures: Figures, asks: bool, retry: RetryPolicy
) -> None:
    assert network_target.upstream is not None
    assert network_target.wire is not None
    thread_id = f"lg-faults-{seed}"
    plan = FaultPlan.opening(seed, rate=FAULT_RATE, passes=OPENING_PASSES)
    with FaultProxy(network_target.upstream, network_target.wire, plan) as proxy:
        store = network_target.store(proxy.endpoint, retry)
        saver = FastCheckpointSaver(store, config=CONFIG)
        try:
            with anyio.fail_after(DEADLINE):
                failed, foreign = await _run_to_the_end(
                    _graph(saver, asks=asks), thread_id, asks=asks)
        finally:
            with anyio.move_on_after(10):
                await saver.aclose()
    replay = f"{figures.replay}, faults {dict(proxy.counts)}"
    with anyio.fail_after(DEADLINE):
        problems = await _audit(network_target, thread_id, asks=asks)
    figures.add("lg-faults", network_target.name, steps=STEPS, faults=proxy.injected,
                failed_runs=failed, problems=len(problems))
    assert not foreign, f"{replay}: graph runs raised non-CheckpointErrors: {foreign}"
    assert not problems, f"{replay}: {problems}"
    assert proxy.injected >= len(INJECTED) * 2


# -- the saver's store calls, the reply of each request lost in turn ---------------------------


ITEMS = [Item(key="v/a", value=b"alpha"), Item(key="v/b", value=b"beta")]
"""The shared items the run's first checkpoint writes and names."""
CALLER_TRIES = 3
"""How often a caller sends a call again that raised (a fault on each try fails it)."""
STORE_FUNCTIONS = b'"fc_'
"""How the PostgreSQL store's function calls read in its statements: there, only those meet
the lost reply (each call is one of them; connecting and preparing are not swept)."""


def _seed(run_id: str, now: float) -> RunRecord:
    return RunRecord(run_id=run_id, incarnation=_ids.new_incarnation(), status="active",
                     created_at=now, updated_at=now, latest_sequence=0, checkpoint_count=1,
                     expires_at=None)


def _record(run_key: str, incarnation: str, sequence: int, now: float,
            refs: tuple[str, ...]) -> StoredCheckpoint:
    return StoredCheckpoint(
        sequence=sequence, checkpoint_id=_ids.checkpoint_id(run_key, incarnation, sequence),
        created_at=now, expires_at=None, header=b"h%d" % sequence, payload=b"p%d" % sequence,
        refs=refs)


async def _append(store: CheckpointStore, run_key: str, run: RunRecord, sequence: int,
                  refs: tuple[str, ...], items: list[Item]) -> None:
    now = time.time()
    await store.append_with_items(  # type: ignore[attr-defined]
        run_key, _record(run_key, run.incarnation, sequence, now, refs), run=run,
        keep_latest=None, now=now, items=items)


async def _put_owned(store: CheckpointStore, run_key: str, run: RunRecord,
                     items: list[Item], *, if_absent: bool) -> None:
    written = await store.put_owned_items(  # type: ignore[attr-defined]
        run_key, items, owner=0, checkpoint_id=_ids.checkpoint_id(run_key, run.incarnation, 0),
        if_absent=if_absent, now=time.time())
    assert written is True, "put_owned_items found its live checkpoint gone"


Call = Callable[[CheckpointStore, str, RunRecord], Awaitable[None]]
OWNED = [Item(key=f"w/0/{n}", value=b"write-%d" % n, owner=0) for n in range(2)]
SPECIAL = [Item(key="w/0/s", value=b"interrupt", owner=0)]
NEW = [Item(key="v/c", value=b"gamma"), Item(key="w/1/0", value=b"owned", owner=1)]
NESTED = [Item(key="v/a/0", value=b"first"), Item(key="v/a/1", value=b"second")]


@dataclass(frozen=True)
class Case:
    call: Call
    written: list[Item]
    """What the call writes (the run holds these and ``ITEMS`` afterwards)."""
    checkpoints: int
    """How many checkpoints the run holds afterwards."""
    first: bool = False
    """Whether the call makes the run's first checkpoint (else it is made beforehand)."""
    idempotent: bool = False
    """Whether the call sent again after it was applied succeeds by contract. An append or a
    create-only put carries nothing that tells the store its second sending from another
    writer's: after a try whose outcome is unknown, the next may find the write taken (the
    store's own retry can tell: it knows what it sent)."""


CASES = {
    "append_with_items-first": Case(
        lambda store, key, run: _append(store, key, run, 0, ("v/a", "v/b"), ITEMS),
        [], 1, first=True),
    "append_with_items": Case(
        lambda store, key, run: _append(store, key, run, 1, ("v/a", "v/b", "v/c"), NEW),
        NEW, 2),
    "append_with_items-refs": Case(
        lambda store, key, run: _append(store, key, run, 1, ("v/a", "v/b"), []), [], 2),
    "append_with_items-nested": Case(
        lambda store, key, run: _append(store, key, run, 1, ("v/a",), NESTED), NESTED, 2),
    "put_owned_items": Case(
        lambda store, key, run: _put_owned(store, key, run, OWNED, if_absent=True), OWNED, 1,
        idempotent=True),
    "put_owned_items-special": Case(
        lambda store, key, run: _put_owned(store, key, run, SPECIAL, if_absent=False),
        SPECIAL, 1, idempotent=True),
    "put_items-create_only": Case(
        lambda store, key, run: store.put_items(key, [Item(key="loose", value=b"ours")],
                                                create_only=True, now=time.time()),
        [Item(key="loose", value=b"ours")], 1),
}


HTTP_WRITES = Wire("http-writes", lambda chunk: chunk.startswith((b"PUT ", b"POST ", b"DELETE ")),
                   HTTP.interim)
"""HTTP where only requests that may change something meet the lost reply (DynamoDB's reads
are POSTs too): a read sent again is harmless, and the sweep stays short."""


def _wire(target: Target) -> Wire:
    """Where the sweep loses replies: the requests of the call that may write."""
    if target.name == "postgres":
        return postgres_running(STORE_FUNCTIONS)
    if target.wire is HTTP:
        return HTTP_WRITES
    assert target.wire is not None
    return target.wire


async def _tried(target: Target, plan: FaultPlan, retry: RetryPolicy, case: Case,
                 run_key: str, run: RunRecord) -> tuple[int, list[BaseException]]:
    """Make the call through a proxy with ``plan`` on a new store, sending it again (same
    store) after each ``CheckpointError`` but a conflict; the requests the proxy saw, and what
    each try raised."""
    assert target.upstream is not None
    raised: list[BaseException] = []
    with FaultProxy(target.upstream, _wire(target), plan) as proxy:
        store = target.store(proxy.endpoint, retry)
        try:
            with anyio.fail_after(10):
                for _ in range(CALLER_TRIES):
                    try:
                        await case.call(store, run_key, run)
                    except Exception as exc:  # judged by the caller
                        raised.append(exc)
                        if isinstance(exc, CheckpointError) and not isinstance(
                                exc, ConflictError):
                            continue
                    break
        finally:
            await store.aclose()
    return sum(proxy.counts.values()), raised


def _acceptable(raised: list[BaseException], case: Case) -> bool:
    """Whether the tries raised only what a write whose reply was lost may: nothing, or
    ``CheckpointError``s that are not conflicts, but for a conflict on a later try of a
    call that is not idempotent (after a try whose outcome is unknown)."""
    if any(not isinstance(exc, CheckpointError) for exc in raised):
        return False
    conflicts = [index for index, exc in enumerate(raised) if isinstance(exc, ConflictError)]
    return not conflicts or (not case.idempotent and conflicts == [len(raised) - 1] > [0])


async def _held(store: CheckpointStore, run_key: str) -> tuple[dict[str, bytes], list[str]]:
    """The run's items and its checkpoints' ids, oldest first."""
    now = time.time()
    items = dict(await store.scan_items(run_key, prefix="", start_after=None, limit=100,
                                        reverse=False, now=now))
    headers, _ = await store.headers(run_key, before=None, limit=100, now=now)
    return items, [header.checkpoint_id for header in reversed(headers)]


LOST_REPLY_STRIDE = 2
"""Every how many of a call's requests lose their reply by default (all with ``FC_HUNT=1``)."""

SWEEPS = [
    *[pytest.param(name, FAST_RETRY, id=f"{name}-store-retries") for name in CASES],
    *[pytest.param(name, NO_RETRY, id=f"{name}-caller-retries")
      for name in ("append_with_items", "put_owned_items")],
]
"""Every call with the driver's retries; with the caller's, the two the saver sends again
(a graph run that failed and is resumed saves its step and writes its tasks' writes anew)."""


@pytest.mark.parametrize(("name", "retry"), SWEEPS)
async def test_a_saver_write_whose_reply_is_lost_is_recognised_as_its_own(
    network_target: Target, name: str, retry: RetryPolicy
) -> None:
    """Every request of the call in turn has its reply lost (after the server applied it).
    The store's retry (``store-retries``), else the caller's (``caller-retries``: a driver
    that never retries, the call sent again after a ``CheckpointError``), recognises the
    write as its own: never a conflict, and the run holds what one call writes, once. By
    default every other request, from an offset the session's seed picks (``FC_HUNT=1``:
    every one; see ``tests/_sweeps.py``)."""
    case = CASES[name]
    direct = network_target.store()
    wrong: list[str] = []
    try:
        async def prepared(suffix: str) -> tuple[str, RunRecord]:
            run_id = f"lg-calls-{name}-{suffix}-{secrets.token_hex(4)}"
            run_key, run = _ids.key_of(run_id), _seed(run_id, time.time())
            if not case.first:
                await _append(direct, run_key, run, 0, ("v/a", "v/b"), ITEMS)
            return run_key, run

        run_key, run = await prepared("count")
        requests, raised = await _tried(network_target, FaultPlan(), retry, case, run_key, run)
        assert not raised, [_described(exc) for exc in raised]
        sweep = f"lost replies of {network_target.name} {name} {retry.max_retries}"
        # The last request always: a call of one request would sweep none in half the sessions.
        ran = sweeps.chosen(sweep, range(requests), LOST_REPLY_STRIDE, always=(requests - 1,))
        for lost in ran:
            run_key, run = await prepared(str(lost))
            plan = FaultPlan(script=[*[Fault.PASS] * lost, Fault.LOSE_REPLY])
            _, raised = await _tried(network_target, plan, retry, case, run_key, run)
            where = f"reply of request {lost + 1} of {requests} lost"
            if not _acceptable(raised, case):
                wrong.append(f"{where}: raised {[_described(exc) for exc in raised]}")
                continue
            if len(raised) == CALLER_TRIES:
                wrong.append(f"{where}: every try raised: {_described(raised[-1])}")
                continue
            items, ids = await _held(direct, run_key)
            expected = {item.key: item.value for item in [*ITEMS, *case.written]}
            if items != expected or len(ids) != case.checkpoints:
                wrong.append(f"{where}: holds items {items} and checkpoints {ids}")
    finally:
        await direct.aclose()
    assert not wrong, (wrong, sweeps.replay(sweep, ran, range(requests)))
