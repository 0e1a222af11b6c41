"""Real LangGraph graphs on the saver: a tool-calling agent that asks for approval with
``interrupt()``, approved with the ``fastcheckpoint`` command and resumed in another process;
and a step loop killed with SIGKILL and resumed with no step lost or repeated."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest
from langchain_core.messages import HumanMessage
from langgraph.types import Command

from fastcheckpoint import CheckpointStatus, MemoryStore
from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
from tests.integrations._langgraph_support import step_loop

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "langgraph_approval.py"
WORKER = Path(__file__).resolve().parent / "langgraph_worker.py"
DEADLINE = 30
PROCESS_SECONDS = 120


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("langgraph_approval_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # LangGraph reads the state's type hints from there
    spec.loader.exec_module(module)
    return module


def _config(thread_id: str) -> Any:
    return {"configurable": {"thread_id": thread_id}}


# -- in one process, on a memory store -------------------------------------------------------------


async def test_the_examples_story_runs(capsys: pytest.CaptureFixture[str]) -> None:
    with anyio.fail_after(DEADLINE):
        await _example().story()
    assert capsys.readouterr().out.splitlines() == [
        "thread ticket-42 waits for approval: Run this tool? add({'a': 2, 'b': 3})",
        "queue: ticket-42 asks {'question': 'Run this tool?', 'tool': 'add', "
        "'args': {'a': 2, 'b': 3}}",
        "thread ticket-42 (approved): The sum is 5.",
    ]


async def test_a_rejected_tool_call_is_recorded_and_the_thread_goes_on() -> None:
    example = _example()
    async with FastCheckpointSaver(MemoryStore()) as saver:
        with anyio.fail_after(DEADLINE):
            graph = example.build(saver)
            await graph.ainvoke({"messages": [HumanMessage("2+3?")]}, _config("t"))
            paused = await saver.manager.get_run("t")
            waiting = await example.resume(saver, "t")
            await saver.manager.reject("t", approver="bob", reason="no tools today")
            assert await example.resume(saver, "t") == 0
            state = await graph.aget_state(_config("t"))
            after = await saver.manager.get_run("t")
            exported = "".join([chunk async for chunk in saver.manager.export_run("t")])
    assert paused is not None
    assert paused.status is CheckpointStatus.PAUSED
    assert waiting == example.EXIT_WAITING
    assert state.values["messages"][-1].content == "Tool call rejected."
    assert after is not None
    assert after.status is CheckpointStatus.ACTIVE
    audit = json.loads(exported)
    assert audit["run"]["approval"]["decision"] == "rejected"
    assert audit["run"]["approval"]["decided_by"] == "bob"
    assert len(audit["checkpoints"]) == len([s async for s in graph.aget_state_history(
        _config("t"))])


async def test_a_blocking_graph_run_from_a_worker_thread_pauses_and_resumes() -> None:
    example = _example()
    async with FastCheckpointSaver(MemoryStore()) as saver:
        graph = example.build(saver)
        with anyio.fail_after(DEADLINE):
            first = await asyncio.to_thread(
                graph.invoke, {"messages": [HumanMessage("2+3?")]}, _config("t"))
            paused = await saver.manager.get_run("t")
            await saver.manager.approve("t", approver="alice")
            done = await asyncio.to_thread(graph.invoke, Command(resume="approve"), _config("t"))
    assert "__interrupt__" in first
    assert paused is not None
    assert paused.status is CheckpointStatus.PAUSED
    assert done["messages"][-1].content == "The sum is 5."


async def test_a_step_loop_keeps_every_step_once() -> None:
    async with FastCheckpointSaver(MemoryStore()) as saver:
        graph = step_loop(saver, 50)
        with anyio.fail_after(DEADLINE):
            result = await graph.ainvoke({"done": []}, _config("t"))
            history = [state async for state in graph.aget_state_history(_config("t"))]
    assert result["done"] == list(range(50))
    assert len(history) == 52  # the input, then one per step and the last


# -- across processes, on a file store ---------------------------------------------------------


def _environment(url: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("FASTCHECKPOINT_", "CHECKPOINT_"))}
    env["FASTCHECKPOINT_URL"] = url
    env["PYTHONPATH"] = str(ROOT)
    return env


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=PROCESS_SECONDS, check=False)


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return _run(env, "-m", "fastcheckpoint.cli", *args)


def test_a_thread_paused_in_one_process_is_approved_with_the_cli_and_resumed_in_another(
    tmp_path: Path,
) -> None:
    env = _environment(f"file://{tmp_path / 'store'}")

    asked = _run(env, str(EXAMPLE), "ask", "ticket-7")
    queue = _cli(env, "runs", "--status", "paused", "--json")
    approved = _cli(env, "approve", "ticket-7", "--approver", "alice", "--comment", "fine")
    resumed = _run(env, str(EXAMPLE), "resume", "ticket-7")
    history = _cli(env, "history", "ticket-7", "--json")
    shown = _cli(env, "show", "ticket-7", "--json")
    exported = _cli(env, "export", "ticket-7", "--format", "markdown")

    assert asked.returncode == 0, asked.stderr
    assert "ticket-7 waits for approval" in asked.stdout
    assert queue.returncode == 0, queue.stderr
    [run] = json.loads(queue.stdout)["runs"]
    assert run["run_id"] == "ticket-7"
    assert run["approval"]["request"]["interrupts"][0]["value"] == {
        "question": "Run this tool?", "tool": "add", "args": {"a": 2, "b": 3}}
    assert approved.returncode == 0, approved.stderr
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip() == "thread ticket-7 (approved): The sum is 5."
    assert history.returncode == 0, history.stderr
    audit = json.loads(history.stdout)
    assert audit["run"]["status"] == "active"
    assert audit["run"]["approval"]["decided_by"] == "alice"
    assert [change["status"] for change in audit["run"]["history"]] == [
        "paused", "active"]
    assert shown.returncode == 0, shown.stderr
    latest = json.loads(shown.stdout)
    assert latest["metadata"]["run_id"] == "ticket-7"
    assert latest["metadata"]["sequence"] == audit["run"]["latest_sequence"]
    assert latest["state"]["checkpoint_ns"] == ""
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.startswith("# Run `ticket-7`")
    assert '"decided_by": "alice"' in exported.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_a_thread_whose_process_died_before_pausing_it_is_queued_once_read(
    tmp_path: Path,
) -> None:
    url = f"file://{tmp_path / 'store'}"
    env = _environment(url)

    died = _run(env, str(WORKER), url, "ticket-9", "die-before-pausing")
    left = _cli(env, "runs", "--status", "paused", "--json")
    read = _run(env, str(WORKER), url, "ticket-9", "read")
    queue = _cli(env, "runs", "--status", "paused", "--json")
    approved = _cli(env, "approve", "ticket-9", "--approver", "alice")
    resumed = _run(env, str(EXAMPLE), "resume", "ticket-9")

    assert died.returncode == -signal.SIGKILL, died.stdout + died.stderr
    assert left.returncode == 0, left.stderr
    assert json.loads(left.stdout)["runs"] == []  # the interrupt is stored, the run ACTIVE
    assert read.returncode == 0, read.stderr
    assert json.loads(read.stdout) == ["__interrupt__"]
    assert queue.returncode == 0, queue.stderr
    [run] = json.loads(queue.stdout)["runs"]
    assert run["run_id"] == "ticket-9"
    assert run["approval"]["request"]["interrupts"][0]["value"]["tool"] == "add"
    assert approved.returncode == 0, approved.stderr
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip() == "thread ticket-9 (approved): The sum is 5."


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
@pytest.mark.parametrize("scheme", ["file", "sqlite"])
def test_a_run_killed_mid_step_resumes_with_no_step_lost_or_repeated(
    tmp_path: Path, scheme: str
) -> None:
    steps, kill_after = 120, 25
    url = {"file": f"file://{tmp_path / 'store'}",
           "sqlite": f"sqlite:///{tmp_path / 'store.db'}"}[scheme]
    env = _environment(url)
    agent = subprocess.Popen([sys.executable, str(WORKER), url, "loop", str(steps)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert agent.stdout is not None
    started = []
    try:
        for line in agent.stdout:
            started.append(int(line.split()[1]))
            if started[-1] == kill_after:
                agent.send_signal(signal.SIGKILL)
                break
    finally:
        agent.kill()
        agent.wait(PROCESS_SECONDS)
    assert agent.returncode == -signal.SIGKILL, agent.stderr.read() if agent.stderr else ""

    resumed = _run(env, str(WORKER), url, "loop", str(steps))

    assert resumed.returncode == 0, resumed.stderr
    lines = resumed.stdout.splitlines()
    first_again = int(lines[0].split()[1])
    # Every step before the one running when the kill landed was saved: none is lost (the
    # kill may land a step or two later than asked, never earlier).
    assert kill_after <= first_again < steps
    assert lines[:-1] == [f"step {number}" for number in range(first_again, steps)]
    assert lines[-1] == "done " + json.dumps(list(range(steps)))
