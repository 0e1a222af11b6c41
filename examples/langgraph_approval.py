"""Human approval for a LangGraph agent, through fastcheckpoint's approval queue.

    python examples/langgraph_approval.py              # the whole story in one process
    python examples/langgraph_approval.py ask THREAD     # run until the agent asks for approval
    python examples/langgraph_approval.py resume THREAD  # go on with the recorded decision

Needs ``pip install 'fastcheckpoint[langgraph]' langgraph``; no network (the "model" is a
stand-in that asks for a tool call, then answers with its result).

The agent wants to call the ``add`` tool; before it runs, the ``approval`` node calls
LangGraph's ``interrupt()``. The saver records that interrupt as the thread's approval
request and sets the thread PAUSED, so the usual queue works:

    export FASTCHECKPOINT_URL=file:///tmp/agents
    python examples/langgraph_approval.py ask ticket-42
    fastcheckpoint runs --status paused                 # the queue: ticket-42 and its request
    fastcheckpoint approve ticket-42 --approver alice   # or: reject ticket-42 --approver alice
    python examples/langgraph_approval.py resume ticket-42

``ask`` and ``resume`` run in different processes (or machines): everything they share is in
the store. Without ``FASTCHECKPOINT_URL`` they use ``CHECKPOINT_MODE`` (see the docs page
docs/integrations/langgraph.md); the one-process story uses a memory store.
"""

import asyncio
import sys
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.graph.state import CompiledStateGraph
from langgraph.prebuilt import ToolNode
from langgraph.types import Command, interrupt

from fastcheckpoint import CheckpointStatus, MemoryStore
from fastcheckpoint.integrations.langgraph import FastCheckpointSaver

QUESTION = "What is 2 + 3?"
EXIT_WAITING = 3
"""``resume`` of a thread that is still waiting for a decision."""


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def model(state: State) -> dict[str, Any]:
    """A stand-in for a chat model: asks for the tool once, then answers with its result."""
    last = state["messages"][-1]
    if isinstance(last, ToolMessage):
        return {"messages": [AIMessage(content=f"The sum is {last.content}.")]}
    call = {"name": "add", "args": {"a": 2, "b": 3}, "id": "call-1", "type": "tool_call"}
    return {"messages": [AIMessage(content="", tool_calls=[call])]}


def approval(state: State) -> Command[str]:
    """Ask a person before the tool runs; the answer comes back from ``interrupt``."""
    last = state["messages"][-1]
    assert isinstance(last, AIMessage)
    call = last.tool_calls[0]
    decision = interrupt({"question": "Run this tool?", "tool": call["name"],
                          "args": call["args"]})
    if decision == "approve":
        return Command(goto="tools")
    return Command(goto=END, update={"messages": [AIMessage(content="Tool call rejected.")]})


def route(state: State) -> str:
    last = state["messages"][-1]
    return "approval" if isinstance(last, AIMessage) and last.tool_calls else END


def build(saver: FastCheckpointSaver) -> CompiledStateGraph[Any, Any, Any, Any]:
    graph = StateGraph(State)
    graph.add_node("model", model)
    graph.add_node("approval", approval, destinations=("tools", END))
    graph.add_node("tools", ToolNode([add]))
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", route, ["approval", END])
    graph.add_edge("tools", "model")
    return graph.compile(checkpointer=saver)


def config(thread_id: str) -> Any:
    return {"configurable": {"thread_id": thread_id}}


async def ask(saver: FastCheckpointSaver, thread_id: str) -> None:
    """Run the agent until it waits for approval."""
    result = await build(saver).ainvoke({"messages": [HumanMessage(QUESTION)]},
                                        config(thread_id))
    request = result["__interrupt__"][0].value
    print(f"thread {thread_id} waits for approval: {request['question']} "
          f"{request['tool']}({request['args']})")


async def resume(saver: FastCheckpointSaver, thread_id: str) -> int:
    """Go on with the decision a person recorded (``fastcheckpoint approve/reject``)."""
    run = await saver.manager.get_run(thread_id)
    if run is None:
        print(f"no thread {thread_id}", file=sys.stderr)
        return 1
    if run.status is CheckpointStatus.PAUSED:
        print(f"thread {thread_id} still waits for a decision")
        return EXIT_WAITING
    decision = (run.approval or {}).get("decision")
    answer = "approve" if decision == "approved" else "reject"
    result = await build(saver).ainvoke(Command(resume=answer), config(thread_id))
    print(f"thread {thread_id} ({decision}): {result['messages'][-1].content}")
    return 0


async def story() -> None:
    """Ask, approve and resume in one process, on a memory store."""
    async with FastCheckpointSaver(MemoryStore()) as saver:
        await ask(saver, "ticket-42")
        for run in await saver.manager.list_runs(CheckpointStatus.PAUSED):
            request = (run.approval or {})["request"]
            print(f"queue: {run.run_id} asks {request['interrupts'][0]['value']}")
        await saver.manager.approve("ticket-42", approver="alice", comment="looks safe")
        await resume(saver, "ticket-42")


async def main(argv: list[str]) -> int:
    if not argv:
        await story()
        return 0
    if len(argv) != 2 or argv[0] not in ("ask", "resume"):
        print(__doc__, file=sys.stderr)
        return 2
    async with FastCheckpointSaver.from_env() as saver:
        if argv[0] == "ask":
            await ask(saver, argv[1])
            return 0
        return await resume(saver, argv[1])


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
