"""The OpenAI Agents SDK adapter: ``FastSession`` on every store (the Session protocol, TTL,
atomic pops across tasks and processes, real agent runs continued in another process), its
store-call costs, and ``RunStateStore`` (interrupted runs in the approval queue, decided with
the ``fastcheckpoint`` command line in another process, then resumed)."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import anyio.streams.text
import pytest

pytest.importorskip("agents")

from agents import Agent, RunConfig, Runner, function_tool
from agents.memory import Session, SessionSettings
from agents.testing import ScriptedModel, assistant_message, function_call

from fastcheckpoint import CheckpointManager, CheckpointStatus, MemoryStore, open_store
from fastcheckpoint.errors import (
    CheckpointNotFound,
    ConfigurationError,
    ConflictError,
    SerializationError,
    StoreError,
    ValidationError,
)
from fastcheckpoint.integrations.openai_agents import (
    FRAMEWORK,
    FastSession,
    RunStateStore,
    session_run_id,
)
from tests._helpers import FakeClock, ForwardingStore, make_config
from tests.integrations.conftest import FreshStore

pytestmark = pytest.mark.anyio

DEADLINE = 20
STORE_DEADLINE = 60
"""For the tests that run on every kind of store (S3 and DynamoDB on moto are slow)."""
ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("openai_agents_worker.py")
QUIET = RunConfig(tracing_disabled=True)
ITEMS: list[Any] = [
    {"role": "user", "content": "Héllo ✓ \u0000 \"quoted\""},
    {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": "{\"id\":7}",
     "id": "fc-1"},
    {"type": "function_call_output", "call_id": "c1", "output": "found"},
    {"role": "assistant", "content": [{"type": "output_text", "text": "x" * 3000,
                                       "annotations": [], "logprobs": []}],
     "n": 2 ** 63 - 1, "f": 0.1, "neg": -1.5e-300, "flag": False, "none": None},
]


def _session(store: Any, session_id: str = "chat-1", **options: Any) -> FastSession:
    return FastSession(session_id, store, config=make_config(FakeClock()), **options)


# -- the Session protocol on every store ------------------------------------------------------


async def test_session_protocol(fresh_store: FreshStore) -> None:
    with anyio.fail_after(STORE_DEADLINE):
        async with fresh_store() as store:
            session = _session(store, session_settings=SessionSettings(limit=3))
            other = _session(store, "chat-2")
            assert isinstance(session, Session)
            assert await session.get_items() == []
            assert await session.pop_item() is None
            await session.add_items(ITEMS[:2])
            await session.add_items([])
            await session.add_items(ITEMS[2:])
            await other.add_items([{"role": "user", "content": "elsewhere"}])

            assert await session.get_items(limit=100) == ITEMS  # exact round trip
            assert await session.get_items(limit=2) == ITEMS[2:]
            assert await session.get_items() == ITEMS[1:]  # session_settings.limit
            assert await session.get_items(limit=0) == []
            assert await _session(store).get_items(limit=1) == ITEMS[3:]  # another object

            assert await session.pop_item() == ITEMS[3]
            assert await session.get_items(limit=100) == ITEMS[:3]
            await session.add_items([ITEMS[3]])
            assert await session.get_items(limit=100) == ITEMS

            run = await CheckpointManager(store).get_run(session.run_id)
            assert run is not None
            assert run.run_id == session_run_id("chat-1")
            assert run.metadata == {"framework": FRAMEWORK, "session_id": "chat-1"}

            await session.clear_session()
            assert await session.get_items() == []
            assert await session.pop_item() is None
            assert await CheckpointManager(store).get_run(session.run_id) is None
            assert await other.get_items() == [{"role": "user", "content": "elsewhere"}]
            await session.add_items(ITEMS[:1])  # a cleared session starts again
            assert await _session(store).get_items() == ITEMS[:1]


async def test_session_ttl_slides(fresh_store: FreshStore) -> None:
    clock = FakeClock()
    with anyio.fail_after(STORE_DEADLINE):
        async with fresh_store() as store:
            session = FastSession("ttl", store, ttl_seconds=60, config=make_config(clock))
            forever = FastSession("forever", store, config=make_config(clock))
            await session.add_items(ITEMS[:2])
            await forever.add_items(ITEMS[:1])
            clock.advance(50)
            await session.add_items(ITEMS[2:3])  # renews the whole session
            clock.advance(50)
            assert await session.get_items() == ITEMS[:3]
            assert await session.pop_item() == ITEMS[2]  # a pop renews it too
            clock.advance(59)
            assert await session.get_items() == ITEMS[:2]
            clock.advance(1)
            assert await session.get_items() == []
            assert await session.pop_item() is None
            assert await FastSession("ttl", store, config=make_config(clock)).get_items() == []
            await session.add_items(ITEMS[3:])  # expired means absent: a new session
            assert await session.get_items() == ITEMS[3:]
            clock.advance(10 ** 6)
            assert await forever.get_items() == ITEMS[:1]


async def test_concurrent_pops_return_each_item_once(fresh_store: FreshStore) -> None:
    items: list[Any] = [{"role": "user", "content": f"m{n}"} for n in range(16)]
    with anyio.fail_after(STORE_DEADLINE):
        async with fresh_store() as store:
            await _session(store, "shared").add_items(items)
            shared = _session(store, "shared")
            popped: list[Any] = []

            async def pop_all(session: FastSession) -> None:
                while (item := await session.pop_item()) is not None:
                    popped.append(item)

            async with anyio.create_task_group() as group:
                for n in range(8):  # half share one object, half have their own
                    group.start_soon(pop_all, shared if n % 2 else _session(store, "shared"))
            assert sorted(item["content"] for item in popped) == sorted(
                item["content"] for item in items)
            assert await shared.get_items() == []


@pytest.mark.parametrize("kind", ["file", "sqlite"])
async def test_another_process_continues_and_pops(kind: str, tmp_path: Path) -> None:
    url = _url(kind, tmp_path)
    model = ScriptedModel([[assistant_message("Hello Ana!", item_id="msg-1")]])
    agent = Agent(name="assistant", instructions="Be brief.", model=model)
    items: list[Any] = [{"role": "user", "content": f"m{n}"} for n in range(30)]
    mine: list[Any] = []
    # One store for both sessions: two SQLiteStore objects on one file in one process lose
    # SQLite's locks (see the report), and sharing one store is the recommended use anyway.
    store = open_store(url)
    chat, queue = FastSession("user-7", store), FastSession("procs", store)
    try:
        result = await Runner.run(agent, "My name is Ana.", session=chat, run_config=QUIET)
        assert result.final_output == "Hello Ana!"
        await queue.add_items(items)
        # A process of its own imports the SDK first: seconds on a loaded machine.
        with anyio.fail_after(STORE_DEADLINE):
            async with await anyio.open_process([sys.executable, str(WORKER), url],
                                                cwd=ROOT, stderr=None) as worker:
                assert worker.stdin is not None
                assert worker.stdout is not None
                lines = _Lines(worker.stdout)
                received = json.loads(await lines.next())
                assert await lines.next() == "ready"
                await worker.stdin.send(b"go\n")
                while (item := await queue.pop_item()) is not None:
                    mine.append(item)
                theirs = json.loads(await lines.next())
                assert await worker.wait() == 0
        # the other process's model saw the whole conversation
        assert [_text(item) for item in received] == [
            "My name is Ana.", "Hello Ana!", "What is my name?"]
        assert [_text(item) for item in await chat.get_items()] == [
            "My name is Ana.", "Hello Ana!", "What is my name?", "noted"]
        # the two processes popped every item once, each the newest of what was left
        assert sorted(item["content"] for item in mine + theirs) == sorted(
            item["content"] for item in items)
        for popped in (mine, theirs):
            numbers = [int(item["content"][1:]) for item in popped]
            assert numbers == sorted(numbers, reverse=True)
        assert await queue.get_items() == []
    finally:
        await store.aclose()


async def test_store_calls_per_turn() -> None:
    store: Any = CountingStore(MemoryStore())
    model = ScriptedModel([[assistant_message("one")], [assistant_message("two")]])
    agent = Agent(name="assistant", model=model)
    session = _session(store)
    with anyio.fail_after(DEADLINE):
        await Runner.run(agent, "first", session=session, run_config=QUIET)
        store.take()
        await Runner.run(agent, "second", session=session, run_config=QUIET)
        # the history (1 read), the new input (1 write), the answer (1 write)
        assert store.take() == {"read_with_items": 1, "append_with_items": 2}
        await _session(store).add_items(ITEMS[:1])  # a fresh object: its guess fails first
        assert store.take() == {"append_with_items": 2, "read_with_items": 1}
        await session.pop_item()  # a stale head: refused, read, then the change
        assert store.take() == {"append_with_items": 2, "read_with_items": 1}
        await session.pop_item()
        assert store.take() == {"append_with_items": 1}
        assert await _session(store).pop_item() is not None  # never looked: read, change
        assert store.take() == {"read_with_items": 1, "append_with_items": 1}
        await session.clear_session()
        assert store.take() == {"delete_run": 1}


async def test_cancelled_add_items_lands_whole() -> None:
    store = MemoryStore()
    session = _session(store)
    release = anyio.Event()
    entered = anyio.Event()
    real_append = session._log.append

    async def slow_append(entries: Any, **options: Any) -> Any:
        entered.set()
        await release.wait()
        return await real_append(entries, **options)

    session._log.append = slow_append  # type: ignore[method-assign]
    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as group:
            scope = anyio.CancelScope()

            async def add() -> None:
                with scope:
                    await session.add_items(ITEMS)

            group.start_soon(add)
            await entered.wait()
            scope.cancel()
            release.set()
        assert scope.cancelled_caught
        assert await session.get_items() == ITEMS


async def test_session_arguments() -> None:
    store = MemoryStore()
    with pytest.raises(ValidationError):
        FastSession("", store)
    with pytest.raises(ConfigurationError):
        FastSession("s", store, ttl_seconds=0)
    with pytest.raises(ConfigurationError):
        FastSession("s", store, ttl_seconds=float("nan"))
    with pytest.raises(ConfigurationError):
        FastSession("s", object())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        FastSession("s", store, session_settings={"limit": "many"})
    assert FastSession("s", store, session_settings={"limit": 2}).session_settings == (
        SessionSettings(limit=2))
    session = FastSession("s", store)
    with pytest.raises(SerializationError):
        await session.add_items([{"ok": 1}, {"bad": object()}])  # type: ignore[list-item]
    with pytest.raises(SerializationError):
        await session.add_items(["not a dict"])  # type: ignore[list-item]
    for changed in ({"t": (1, 2)}, {"x": float("nan")}, {"x": float("inf")}, {1: "a"}):
        with pytest.raises(SerializationError, match="would not come back"):
            await session.add_items([{"ok": 1}, changed])  # type: ignore[list-item]
    deep: dict[str, Any] = {"x": 1}
    for _ in range(5000):  # deeper than the encoder (or the comparison) recurses
        deep = {"x": deep}
    with pytest.raises(SerializationError, match="RecursionError"):
        await session.add_items([{"ok": 1}, deep])  # type: ignore[list-item]
    assert await session.get_items() == []  # nothing of a refused batch was added


def test_without_the_sdk_the_import_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "agents", None)  # as if not installed
    spec = importlib.util.spec_from_file_location(
        "openai_agents_without_sdk", ROOT / "fastcheckpoint/integrations/openai_agents.py")
    assert spec is not None
    assert spec.loader is not None
    with pytest.raises(ConfigurationError, match=r"pip install 'fastcheckpoint\[openai-agents\]'"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


async def test_store_ownership(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'store'}"
    shared = MemoryStore()
    async with FastSession("a", shared) as session:
        await session.add_items(ITEMS[:1])
    assert await FastSession("a", shared).get_items() == ITEMS[:1]  # not closed
    session = FastSession.from_env("b", {"FASTCHECKPOINT_URL": url,
                                         "FASTCHECKPOINT_DEFAULT_TTL_SECONDS": "30"})
    assert session._log._ttl == 30
    await session.add_items(ITEMS[:1])
    closed: list[bool] = []
    real_close = session.store.aclose

    async def counted_close() -> None:
        closed.append(True)
        await real_close()

    session.store.aclose = counted_close  # type: ignore[method-assign]
    await session.aclose()
    await session.aclose()
    assert closed == [True]
    async with FastSession("b", url) as reopened:
        assert await reopened.get_items() == ITEMS[:1]


# -- approvals -------------------------------------------------------------------------------


def _refund_agent(refunds: list[str], *answers: str) -> tuple[Agent[Any], ScriptedModel]:
    @function_tool(needs_approval=True)
    def refund(order: str, amount: float) -> str:
        """Refund an order."""
        refunds.append(order)
        return f"refunded {amount} on {order}"

    model = ScriptedModel([
        [function_call("refund", {"order": "A-17", "amount": 12.5}, call_id="call-1")],
        *([assistant_message(answer)] for answer in answers),
    ])
    return Agent(name="support", instructions="Help.", model=model, tools=[refund]), model


@pytest.mark.parametrize("kind", ["file", "sqlite"])
async def test_approved_with_the_cli_in_another_process(
    kind: str, tmp_path: Path
) -> None:
    url = _url(kind, tmp_path)
    refunds: list[str] = []
    agent, model = _refund_agent(refunds, "Refunded.")
    with anyio.fail_after(DEADLINE):
        async with FastSession("ticket-42", url) as session, RunStateStore(url) as approvals:
            result = await Runner.run(agent, "Refund A-17", session=session, run_config=QUIET)
            run = await approvals.record("ticket-42", result)
            assert run.status is CheckpointStatus.PAUSED
            assert refunds == []
            request = (run.approval or {})["request"]
            assert request["tool_calls"] == [{"tool": "refund", "call_id": "call-1",
                                              "agent": "support",
                                              "arguments": {"order": "A-17", "amount": 12.5}}]
            assert await approvals.resume("ticket-42", agent) is None  # still waiting

        queue = json.loads(await _cli("runs", "--status", "paused", "--url", url, "--json"))
        assert "ticket-42" in json.dumps(queue)
        await _cli("approve", "ticket-42", "--approver", "ana", "--url", url)

        async with FastSession("ticket-42", url) as session, RunStateStore(url) as approvals:
            state = await approvals.resume("ticket-42", agent)
            assert state is not None
            with pytest.raises(ConflictError, match="resumed already"):
                await approvals.resume("ticket-42", agent)
            result = await Runner.run(agent, state, session=session, run_config=QUIET)
            assert result.final_output == "Refunded."
            assert refunds == ["A-17"]
            run = await approvals.record("ticket-42", result)
            assert run.status is CheckpointStatus.COMPLETED
            assert [change.status for change in run.history][-3:] == [
                CheckpointStatus.ACTIVE, CheckpointStatus.ACTIVE, CheckpointStatus.COMPLETED]
            assert run.history[-3].actor == "ana"
            checkpoint = await approvals.manager.restore("ticket-42")
            assert checkpoint is not None
            assert checkpoint.state["final_output"] == "Refunded."
            history = await session.get_items()
        assert model.last_call is not None
        outputs = [item for item in model.last_call.input
                   if item.get("type") == "function_call_output"]
        assert [item["output"] for item in outputs] == ["refunded 12.5 on A-17"]
        assert [item.get("type", item.get("role")) for item in history] == [
            "user", "function_call", "function_call_output", "message"]


async def test_rejected_with_the_cli_tells_the_model_why(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'store'}"
    refunds: list[str] = []
    agent, model = _refund_agent(refunds, "Sorry, I cannot refund that.")
    with anyio.fail_after(DEADLINE):
        async with RunStateStore(url) as approvals:
            result = await Runner.run(agent, "Refund A-17", run_config=QUIET)
            await approvals.record("ticket-43", result)
        await _cli("reject", "ticket-43", "--approver", "bo", "--reason", "over the limit",
                   "--url", url)
        async with RunStateStore(url) as approvals:
            state = await approvals.resume("ticket-43", agent)
            assert state is not None
            result = await Runner.run(agent, state, run_config=QUIET)
            assert refunds == []
            assert model.last_call is not None
            outputs = [item["output"] for item in model.last_call.input
                       if item.get("type") == "function_call_output"]
            assert outputs == ["over the limit"]
            run = await approvals.record("ticket-43", result)
            assert run.status is CheckpointStatus.COMPLETED
            assert CheckpointStatus.REJECTED in [change.status for change in run.history]
            assert (run.approval or {})["decision"] == "rejected"


async def test_asked_again_after_a_decision() -> None:
    refunds: list[str] = []
    agent, _ = _refund_agent(refunds)
    model = ScriptedModel([
        [function_call("refund", {"order": "A-17", "amount": 1}, call_id="call-1")],
        [function_call("refund", {"order": "B-2", "amount": 2}, call_id="call-2")],
        [assistant_message("Both done.")],
    ])
    agent = agent.clone(model=model)
    approvals = RunStateStore(MemoryStore(), config=make_config(FakeClock()))
    with anyio.fail_after(DEADLINE):
        await approvals.record("r", await Runner.run(agent, "Refund both", run_config=QUIET))
        await approvals.manager.approve("r", approver="ana")
        state = await approvals.resume("r", agent)
        assert state is not None
        result = await Runner.run(agent, state, run_config=QUIET)
        run = await approvals.record("r", result)  # the second tool call asks again
        assert run.status is CheckpointStatus.PAUSED
        assert refunds == ["A-17"]
        assert [call["call_id"] for call in (run.approval or {})["request"]["tool_calls"]] == [
            "call-2"]
        await approvals.manager.approve("r", approver="ana")
        state = await approvals.resume("r", agent)
        assert state is not None
        run = await approvals.record("r", await Runner.run(agent, state, run_config=QUIET))
        assert run.status is CheckpointStatus.COMPLETED
        assert refunds == ["A-17", "B-2"]


async def test_failed_resume_can_be_resumed_again() -> None:
    refunds: list[str] = []
    agent, _ = _refund_agent(refunds, "Refunded.")
    approvals = RunStateStore(MemoryStore())
    with anyio.fail_after(DEADLINE):
        await approvals.record("r", await Runner.run(agent, "Refund", run_config=QUIET))
        await approvals.manager.approve("r", approver="ana")
        assert await approvals.resume("r", agent) is not None
        failed = await approvals.fail("r", "the worker crashed")
        assert failed is not None
        assert failed.status is CheckpointStatus.FAILED
        assert failed.error == "the worker crashed"
        state = await approvals.resume("r", agent)
        assert state is not None
        run = await approvals.record("r", await Runner.run(agent, state, run_config=QUIET))
        assert run.status is CheckpointStatus.COMPLETED
        assert refunds == ["A-17"]
        assert await approvals.fail("missing") is None


async def test_approval_store_calls() -> None:
    store: Any = CountingStore(MemoryStore())
    agent, _ = _refund_agent([], "Refunded.")
    with anyio.fail_after(DEADLINE):
        result = await Runner.run(agent, "Refund", run_config=QUIET)
        await RunStateStore(store).record("r", result)
        # the run, the checkpoint, then the status change (a read and an update)
        assert store.take() == {"append": 1, "get_run": 2, "update_run": 1}
        await RunStateStore(store).record("r", result)  # a retry: the run, the state it names
        assert store.take() == {"get_run": 1, "get": 1}
        await CheckpointManager(store).approve("r", approver="ana")
        store.take()
        approvals = RunStateStore(store)
        state = await approvals.resume("r", agent)
        # the run, the checkpoint, then the claim (a read and an update)
        assert store.take() == {"get_run": 2, "get": 1, "update_run": 1}
        assert state is not None
        result = await Runner.run(agent, state, run_config=QUIET)
        store.take()
        # Not written by this manager yet: 1 more, a read of the run's head (the checkpoint
        # must take the sequence after the one record read).
        await approvals.record("r", result)
        assert store.take() == {"append": 1, "get_run": 3, "update_run": 1}


async def test_approval_refusals() -> None:
    refunds: list[str] = []
    agent, _ = _refund_agent(refunds, "Refunded.")
    approvals = RunStateStore(MemoryStore(), ttl_seconds=3600)
    with anyio.fail_after(DEADLINE):
        with pytest.raises(CheckpointNotFound):
            await approvals.resume("missing", agent)
        result = await Runner.run(agent, "Refund", run_config=QUIET)
        run = await approvals.record("r", result)
        assert run.expires_at is not None
        again = await approvals.record("r", result)  # a retried call: the run as it is
        assert again.approval == run.approval
        assert again.checkpoint_count == 1
        other = Agent(name="someone-else", model=ScriptedModel([]))
        await approvals.manager.approve("r", approver="ana")
        with pytest.raises(SerializationError, match="someone-else"):
            await approvals.resume("r", other)
        assert await approvals.resume("r", agent) is not None  # the failed load claimed nothing

        done = await Runner.run(Agent(name="a", model=ScriptedModel([[assistant_message("hi")]])),
                                "hello", run_config=QUIET)
        finished = await approvals.record("plain", done)
        assert finished.status is CheckpointStatus.COMPLETED
        with pytest.raises(ConflictError, match="no decision"):
            await approvals.resume("plain", agent)
    with pytest.raises(ConfigurationError):
        RunStateStore(MemoryStore(), ttl_seconds=-1)
    with pytest.raises(ConfigurationError):
        RunStateStore(CheckpointManager(MemoryStore()), config=make_config(FakeClock()))


async def test_refused_record_writes_nothing() -> None:
    refunds: list[str] = []
    agent, _ = _refund_agent(refunds, "Refunded.")

    def other() -> Agent[Any]:  # asks for another refund
        return agent.clone(model=ScriptedModel([
            [function_call("refund", {"order": "B-2", "amount": 99}, call_id="call-9")]]))

    # One checkpoint kept per run: a refused record that wrote one would prune the state
    # the pending request names.
    approvals = RunStateStore(MemoryStore(),
                              config=make_config(FakeClock(), max_checkpoints_per_run=1))
    with anyio.fail_after(DEADLINE):
        run = await approvals.record("r", await Runner.run(agent, "Refund", run_config=QUIET))
        for _ in range(2):  # a worker retrying after a timeout
            with pytest.raises(ConflictError, match="waits for a decision"):
                await approvals.record("r", await Runner.run(other(), "Refund",
                                                             run_config=QUIET))
        after = await approvals.manager.get_run("r")
        assert after is not None
        assert (after.approval, after.checkpoint_count, after.latest_sequence) == (
            run.approval, 1, run.latest_sequence)
        await approvals.manager.approve("r", approver="ana")
        state = await approvals.resume("r", agent)
        assert state is not None
        done = await approvals.record("r", await Runner.run(agent, state, run_config=QUIET))
        assert done.status is CheckpointStatus.COMPLETED
        assert refunds == ["A-17"]


@pytest.mark.parametrize("started", [False, True])
async def test_two_records_at_once_keep_the_winners_state(started: bool) -> None:
    """Two workers record one run at the same moment, one checkpoint kept per run: the one
    whose create comes second writes nothing (it would prune the state the winner's request
    names) and raises ConflictError; the winner's request is resumed with its state. Both on
    a new run and on one a finished resume made ACTIVE again."""
    refunds: list[str] = []
    agent, _ = _refund_agent(refunds, "Refunded.")
    store = _Hooks(MemoryStore())
    first = RunStateStore(store, config=make_config(FakeClock(), max_checkpoints_per_run=1))
    second = RunStateStore(store, config=make_config(FakeClock(), max_checkpoints_per_run=1))

    def other() -> Agent[Any]:  # asks for another refund
        return agent.clone(model=ScriptedModel([
            [function_call("refund", {"order": "B-2", "amount": 5}, call_id="call-2")]]))

    with anyio.fail_after(DEADLINE):
        if started:
            await first.record("r", await Runner.run(agent, "Refund", run_config=QUIET))
            await first.manager.approve("r", approver="ana")
            state = await first.resume("r", agent)
            assert state is not None
            await Runner.run(agent, state, run_config=QUIET)  # refunds A-17
            await first.manager.mark_failed("r", "the worker went away")
        losing = await Runner.run(agent.clone(model=ScriptedModel([[function_call(
            "refund", {"order": "C-3", "amount": 7}, call_id="call-3")]])), "Refund",
            run_config=QUIET)
        winning = await Runner.run(other(), "Refund", run_config=QUIET)
        store.on_append = lambda: second.record("r", winning)
        with pytest.raises(ConflictError):
            await first.record("r", losing)
        run = await first.manager.get_run("r")
        assert run is not None
        assert run.status is CheckpointStatus.PAUSED
        assert run.checkpoint_count == 1
        await first.manager.approve("r", approver="ana")
        finisher = agent.clone(model=ScriptedModel([[assistant_message("Refunded.")]]))
        state = await first.resume("r", finisher)
        assert state is not None
        done = await first.record("r", await Runner.run(finisher, state, run_config=QUIET))
    assert done.status is CheckpointStatus.COMPLETED
    assert refunds == (["A-17", "B-2"] if started else ["B-2"])


async def test_finished_run_is_not_recorded_again() -> None:
    def chat(answer: str) -> Agent[Any]:
        return Agent(name="a", model=ScriptedModel([[assistant_message(answer)]]))

    refunds: list[str] = []
    agent, _ = _refund_agent(refunds, "Sorry.")
    approvals = RunStateStore(MemoryStore(), config=make_config(FakeClock()))
    with anyio.fail_after(DEADLINE):
        first = await Runner.run(chat("one"), "hi", run_config=QUIET)
        run = await approvals.record("t", first)
        assert run.status is CheckpointStatus.COMPLETED
        assert await approvals.record("t", first) == run  # a retried call: the run as it is
        with pytest.raises(ConflictError, match="is completed"):
            await approvals.record("t", await Runner.run(chat("two"), "hi", run_config=QUIET))
        checkpoint = await approvals.manager.restore("t")
        assert checkpoint is not None
        assert checkpoint.state["final_output"] == "one"
        assert await approvals.manager.get_run("t") == run

        asked = await Runner.run(agent, "Refund", run_config=QUIET)
        await approvals.record("r", asked)
        rejected = await approvals.manager.reject("r", approver="bo", reason="no")
        for result in (asked, first):  # rejected and not resumed: finished
            with pytest.raises(ConflictError, match="is rejected"):
                await approvals.record("r", result)
        assert await approvals.manager.get_run("r") == rejected


class _LostReply(ForwardingStore):
    """Applies the next status change, then raises ``lose`` as if its reply were lost; or
    fails it with ``fail`` before applying it."""

    lose: Exception | None = None
    fail: Exception | None = None

    async def update_run(self, run_key: str, **change: Any) -> Any:
        failed, self.fail = self.fail, None
        if failed is not None:
            raise failed
        updated = await self.inner.update_run(run_key, **change)
        lost, self.lose = self.lose, None
        if lost is not None:
            raise lost
        return updated


# StoreError: the worker sees the failure and calls again. ConflictError: what the store's own
# retry of the update sees (the version moved on), so the status change is read again.
@pytest.mark.parametrize("lost", [StoreError("no reply"), ConflictError("version moved on")])
async def test_record_retried_after_a_lost_reply(lost: Exception) -> None:
    store = _LostReply(MemoryStore())
    agent, _ = _refund_agent([], "Refunded.")
    approvals = RunStateStore(store, config=make_config(FakeClock()))

    async def record(result: Any) -> Any:
        store.lose = lost
        if isinstance(lost, StoreError):
            with pytest.raises(StoreError):
                await approvals.record("r", result)
        return await approvals.record("r", result)

    with anyio.fail_after(DEADLINE):
        result = await Runner.run(agent, "Refund", run_config=QUIET)
        run = await record(result)
        assert run.status is CheckpointStatus.PAUSED
        assert run.checkpoint_count == 1
        await approvals.manager.approve("r", approver="ana")
        state = await approvals.resume("r", agent)
        assert state is not None
        run = await record(await Runner.run(agent, state, run_config=QUIET))
        assert run.status is CheckpointStatus.COMPLETED
        assert run.checkpoint_count == 2


async def test_record_whose_status_change_fails_writes_nothing() -> None:
    store = _LostReply(MemoryStore())
    agent, _ = _refund_agent([], "Refunded.")
    approvals = RunStateStore(store, config=make_config(FakeClock()))
    with anyio.fail_after(DEADLINE):
        result = await Runner.run(agent, "Refund", run_config=QUIET)
        store.fail = StoreError("down")
        with pytest.raises(StoreError):
            await approvals.record("r", result)
        assert await approvals.manager.get_run("r") is None  # its only checkpoint withdrawn
        await approvals.record("r", result)
        await approvals.manager.approve("r", approver="ana")
        state = await approvals.resume("r", agent)
        assert state is not None
        before = await approvals.manager.get_run("r")
        assert before is not None
        result = await Runner.run(agent, state, run_config=QUIET)
        store.fail = StoreError("down")
        with pytest.raises(StoreError):
            await approvals.record("r", result)
        after = await approvals.manager.get_run("r")
        assert after is not None
        assert (after.status, after.checkpoint_count) == (before.status, 1)
        run = await approvals.record("r", result)
        assert (run.status, run.checkpoint_count) == (CheckpointStatus.COMPLETED, 2)


class _Hooks(ForwardingStore):
    """Runs ``on_append`` before the next append, ``on_delete`` before the next delete, and
    ``on_update(status)`` before each status change until it returns true (it may raise)."""

    on_append: Any = None
    on_delete: Any = None
    on_update: Any = None

    async def append(self, run_key: str, record: Any, **options: Any) -> str:
        change, self.on_append = self.on_append, None
        if change is not None:
            await change()
        return await self.inner.append(run_key, record, **options)

    async def delete(self, run_key: str, sequence: int, *, checkpoint_id: str) -> bool:
        change, self.on_delete = self.on_delete, None
        if change is not None:
            await change()
        return await self.inner.delete(run_key, sequence, checkpoint_id=checkpoint_id)

    async def update_run(self, run_key: str, **change: Any) -> Any:
        if self.on_update is not None and await self.on_update(change["status"]):
            self.on_update = None
        return await self.inner.update_run(run_key, **change)


@pytest.mark.parametrize("change", ["pause", "complete"])
async def test_record_refused_when_the_run_changes_meanwhile(change: str) -> None:
    store = _Hooks(MemoryStore())
    agent, _ = _refund_agent([], "Refunded.")
    approvals = RunStateStore(store, config=make_config(FakeClock()))
    other = CheckpointManager(store, make_config(FakeClock()))
    with anyio.fail_after(DEADLINE):
        await approvals.record("r", await Runner.run(agent, "Refund", run_config=QUIET))
        await approvals.manager.approve("r", approver="ana")
        state = await approvals.resume("r", agent)
        assert state is not None
        before = await approvals.manager.restore("r")
        assert before is not None
        result = await Runner.run(agent, state, run_config=QUIET)
        if change == "pause":
            store.on_append = lambda: other.pause("r", request={"why": "by hand"})
        else:
            store.on_append = lambda: other.mark_completed("r")
        with pytest.raises(ConflictError, match="nothing was recorded"):
            await approvals.record("r", result)
        run = await approvals.manager.get_run("r")
        assert run is not None
        assert run.checkpoint_count == 1
        latest = await approvals.manager.restore("r")
        assert latest is not None
        assert latest.checkpoint_id == before.checkpoint_id


@pytest.mark.parametrize("decision", ["approve", "approve-then-fail"])
async def test_record_keeps_a_decision_not_yet_resumed(decision: str) -> None:
    """Approved (the run is ACTIVE again), then maybe failed, but not resumed: a retried
    record of the state the request names returns the run as it is, another state is
    refused; the decision stays, nothing is written. Also when the decision lands between
    the record's read and its status change (the guard)."""
    store = _Hooks(MemoryStore())
    refunds: list[str] = []
    agent, _ = _refund_agent(refunds, "Refunded.")
    approvals = RunStateStore(store, config=make_config(FakeClock()))
    other = CheckpointManager(store, make_config(FakeClock()))
    with anyio.fail_after(DEADLINE):
        asked = await Runner.run(agent, "Refund", run_config=QUIET)
        await approvals.record("r", asked)
        decided = await approvals.manager.approve("r", approver="ana")
        if decision != "approve":
            decided = await approvals.manager.mark_failed("r", "crashed before resuming")
        assert decided is not None
        assert await approvals.record("r", asked) == decided  # a retry: the run as it is
        later = await Runner.run(agent.clone(model=ScriptedModel([[function_call(
            "refund", {"order": "B-2", "amount": 5}, call_id="call-2")]])), "Refund",
            run_config=QUIET)
        with pytest.raises(ConflictError, match="not yet resumed"):
            await approvals.record("r", later)
        assert await approvals.manager.get_run("r") == decided

    if decision != "approve":
        return
    # A decision made after the record read the run, before its status change (paused and
    # approved by another manager): the record is refused and withdraws its checkpoint.

    async def paused_and_approved() -> None:
        await other.pause("r", request={"why": "by hand"})
        await other.approve("r", approver="cy")

    with anyio.fail_after(DEADLINE):
        state = await approvals.resume("r", agent)
        assert state is not None
        resumed = await approvals.manager.get_run("r")
        assert resumed is not None
        store.on_append = paused_and_approved
        with pytest.raises(ConflictError, match="decided since it was read"):
            await approvals.record("r", later)
        run = await approvals.manager.get_run("r")
        assert run is not None
        assert run.approval is not None
        assert (run.approval["decision"], run.approval["request"]) == (
            "approved", {"why": "by hand"})
        assert run.checkpoint_count == resumed.checkpoint_count


async def test_record_refused_after_a_failure_meanwhile_leaves_the_run_failed() -> None:
    """A worker fails the resumed run (handing its decision back) after record read it: the
    record's create resumes the FAILED run, its status change is refused, and withdrawing the
    checkpoint makes the run FAILED again, with its error (helper-105's race)."""
    store = _Hooks(MemoryStore())
    agent, _ = _refund_agent([], "Refunded.")
    approvals = RunStateStore(store, config=make_config(FakeClock()))
    watchdog = RunStateStore(store, config=make_config(FakeClock()))
    with anyio.fail_after(DEADLINE):
        await approvals.record("r", await Runner.run(agent, "Refund", run_config=QUIET))
        await approvals.manager.approve("r", approver="ana")
        state = await approvals.resume("r", agent)
        assert state is not None
        result = await Runner.run(agent, state, run_config=QUIET)
        failed: list[Any] = []

        async def fail_meanwhile() -> None:
            failed.append(await watchdog.fail("r", "worker timed out"))

        store.on_append = fail_meanwhile
        with pytest.raises(ConflictError, match="nothing was recorded"):
            await approvals.record("r", result)
        run = await approvals.manager.get_run("r")

    assert run is not None
    assert (run.status, run.error) == (CheckpointStatus.FAILED, "worker timed out")
    assert run.approval == failed[0].approval  # the decision handed back, still to resume
    assert run.checkpoint_count == failed[0].checkpoint_count


async def test_a_withdrawn_record_leaves_a_run_others_moved_on_as_it_is() -> None:
    """The run is failed again only while nothing else happened to it (helper-107): not when
    another worker resumed the handed-back decision before the withdrawal, nor when another
    worker checkpointed the run meanwhile."""
    store = _Hooks(MemoryStore())
    agent, _ = _refund_agent([], "Refunded.", "Refunded again.")
    a = RunStateStore(store, config=make_config(FakeClock()))
    b = RunStateStore(store, config=make_config(FakeClock()))
    other = CheckpointManager(store, make_config(FakeClock()))
    with anyio.fail_after(DEADLINE):
        await a.record("r", await Runner.run(agent, "Refund", run_config=QUIET))
        await a.manager.approve("r", approver="ana")
        state = await a.resume("r", agent)
        assert state is not None
        result = await Runner.run(agent, state, run_config=QUIET)
        store.on_append = lambda: b.fail("r", "worker timed out")
        claimed: list[Any] = []

        async def b_resumes() -> None:
            claimed.append(await b.resume("r", agent))

        store.on_delete = b_resumes
        with pytest.raises(ConflictError):
            await a.record("r", result)
        resumed = await a.manager.get_run("r")

        await other.create("q", {"step": 0})
        await other.mark_failed("q", "boom")
        asking, _ = _refund_agent([], "Refunded.")
        interrupted = await Runner.run(asking, "Refund", run_config=QUIET)

        async def newer_then_fail(status: str) -> bool:
            if status != CheckpointStatus.PAUSED.value:
                return False
            await other.create("q", {"step": "newer"}, force=True)
            raise StoreError("transient")

        store.on_update = newer_then_fail
        with pytest.raises(StoreError):
            await a.record("q", interrupted)
        store.on_update = None
        newer = await other.get_run("q")
        latest = await other.restore("q")

    assert claimed[0] is not None
    assert resumed is not None
    assert resumed.status is CheckpointStatus.ACTIVE
    assert newer is not None
    assert newer.status is CheckpointStatus.ACTIVE
    assert latest is not None
    assert latest.state == {"step": "newer"}


async def test_record_takes_only_results_and_states() -> None:
    approvals = RunStateStore(MemoryStore())
    for result in (None, "done", {"run_state": {}}):
        with pytest.raises(ValidationError, match="RunResult"):
            await approvals.record("r", result)  # type: ignore[arg-type]
    assert await approvals.manager.get_run("r") is None


async def test_approvals_share_a_manager_and_from_env(tmp_path: Path) -> None:
    manager = CheckpointManager(MemoryStore())
    async with RunStateStore(manager) as approvals:
        assert approvals.manager is manager
    assert await manager.list_runs() is not None  # the store stays open
    approvals = RunStateStore.from_env({"FASTCHECKPOINT_URL": f"file://{tmp_path / 's'}"})
    await approvals.aclose()
    await approvals.aclose()


# -- the example -----------------------------------------------------------------------------


def _example() -> Any:
    spec = importlib.util.spec_from_file_location(
        "openai_agents_approval_example", ROOT / "examples" / "openai_agents_approval.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_the_examples_story_runs(capsys: pytest.CaptureFixture[str]) -> None:
    with anyio.fail_after(DEADLINE):
        await _example().story()
    assert capsys.readouterr().out.splitlines() == [
        "ticket-42 waits for approval: refund({'order': 'A-17', 'amount': 12.5})",
        "queue: ticket-42 asks [{'tool': 'refund', 'arguments': {'order': 'A-17', "
        "'amount': 12.5}, 'call_id': 'call-1', 'agent': 'support'}]",
        "ticket-42 (approved, completed): Done: refunded 12.50 EUR on order A-17.",
    ]


async def test_the_example_asks_waits_and_resumes_a_rejection(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = _example()
    url = f"file://{tmp_path / 'store'}"
    with anyio.fail_after(DEADLINE):
        async with RunStateStore(url) as approvals:
            await example.ask(approvals, "t-1")
            assert await example.resume(approvals, "t-1") == example.EXIT_WAITING
            await approvals.manager.reject("t-1", approver="bo", reason="over the limit")
            assert await example.resume(approvals, "t-1") == 0
            session = FastSession("t-1", approvals.manager.store)
            assert len(await session.get_items()) == 4
    assert capsys.readouterr().out.splitlines()[-1] == (
        "t-1 (rejected, completed): Done: over the limit.")


# -- helpers ---------------------------------------------------------------------------------


class CountingStore:
    """Forwards every store call to ``inner`` and counts them by method."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def take(self) -> dict[str, int]:
        """The calls counted since the last ``take``."""
        counted = dict(self.calls)
        self.calls.clear()
        return counted


def _counted(name: str) -> Any:
    async def forward(self: CountingStore, *args: Any, **kwargs: Any) -> Any:
        self.calls[name] += 1
        return await getattr(self.inner, name)(*args, **kwargs)

    forward.__name__ = name
    return forward


for _name in ("append", "get", "latest", "headers", "delete", "delete_run", "get_run",
              "update_run", "list_runs", "count_runs", "put_items", "get_items", "scan_items",
              "delete_items", "purge_expired", "aclose", "runs_with_label",
              "append_with_items", "read_with_items", "put_owned_items"):
    setattr(CountingStore, _name, _counted(_name))


def _url(kind: str, tmp_path: Path) -> str:
    """The URL of a new file or SQLite store, for this process and others."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}?synchronous=normal"
    return f"file://{tmp_path / 'store'}?fsync=false"


class _Lines:
    """A process's output, line by line."""

    def __init__(self, stream: Any) -> None:
        self._chunks = anyio.streams.text.TextReceiveStream(stream)
        self._buffer = ""

    async def next(self) -> str:
        while "\n" not in self._buffer:
            self._buffer += await self._chunks.receive()
        line, self._buffer = self._buffer.split("\n", 1)
        return line


async def _cli(*args: str) -> str:
    done = await anyio.run_process([sys.executable, "-m", "fastcheckpoint.cli", *args],
                                   cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr.decode() + done.stdout.decode()
    return done.stdout.decode()


def _text(item: Any) -> str:
    content = item["content"]
    return content if isinstance(content, str) else content[0]["text"]

