"""Human approval for an OpenAI Agents SDK agent, through fastcheckpoint's approval queue.

    python examples/openai_agents_approval.py                # the whole story in one process
    python examples/openai_agents_approval.py ask TICKET     # run until the agent asks
    python examples/openai_agents_approval.py resume TICKET  # go on with the recorded decision

Needs ``pip install 'fastcheckpoint[openai-agents]'``; no network (the model is the SDK's
``ScriptedModel``: it asks for the refund, then answers with the tool's result).

The agent wants to call ``refund``, a tool with ``needs_approval=True``, so the run stops
with an interruption. ``RunStateStore.record`` keeps the run's state as a PAUSED run, with
the pending tool call as the approval request, so the usual queue works:

    export FASTCHECKPOINT_URL=file:///tmp/agents
    python examples/openai_agents_approval.py ask ticket-42
    fastcheckpoint runs --status paused                 # the queue: ticket-42 and its request
    fastcheckpoint approve ticket-42 --approver alice   # or: reject ticket-42 --approver alice
    python examples/openai_agents_approval.py resume ticket-42

``ask`` and ``resume`` run in different processes (or machines): the conversation
(``FastSession``) and the interrupted run are both in the store. Without
``FASTCHECKPOINT_URL`` they use ``CHECKPOINT_MODE`` (see docs/integrations/openai-agents.md);
the one-process story uses a memory store.
"""

import asyncio
import sys
from typing import Any

from agents import Agent, RunConfig, Runner, function_tool
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call

from fastcheckpoint import CheckpointStatus, MemoryStore
from fastcheckpoint.integrations.openai_agents import FastSession, RunStateStore

QUESTION = "Please refund order A-17 (12.50 EUR)."
EXIT_WAITING = 3
"""``resume`` of a run that is still waiting for a decision."""
OFFLINE = RunConfig(tracing_disabled=True)


@function_tool(needs_approval=True)
def refund(order: str, amount: float) -> str:
    """Refund an order."""
    return f"refunded {amount:.2f} EUR on order {order}"


def decide(call: Any) -> Any:
    """A stand-in for a model: asks for the refund, then reports what the tool answered."""
    last = call.input[-1]
    if last.get("type") == "function_call_output":
        return [assistant_message(f"Done: {last['output']}.")]
    return [function_call("refund", {"order": "A-17", "amount": 12.5}, call_id="call-1")]


def support_agent() -> Agent[Any]:
    model = ScriptedModel([ModelStep.respond(decide) for _ in range(4)])
    return Agent(name="support", instructions="Help with orders.", model=model,
                 tools=[refund])


async def ask(approvals: RunStateStore, ticket: str) -> None:
    """Run the agent until it waits for approval."""
    session = FastSession(ticket, approvals.manager.store)
    result = await Runner.run(support_agent(), QUESTION, session=session, run_config=OFFLINE)
    run = await approvals.record(ticket, result)
    (call,) = (run.approval or {})["request"]["tool_calls"]
    print(f"{ticket} waits for approval: {call['tool']}({call['arguments']})")


async def resume(approvals: RunStateStore, ticket: str) -> int:
    """Go on with the decision a person recorded (``fastcheckpoint approve/reject``)."""
    agent = support_agent()
    state = await approvals.resume(ticket, agent)
    if state is None:
        print(f"{ticket} still waits for a decision")
        return EXIT_WAITING
    session = FastSession(ticket, approvals.manager.store)
    result = await Runner.run(agent, state, session=session, run_config=OFFLINE)
    run = await approvals.record(ticket, result)
    decision = (run.approval or {}).get("decision")
    print(f"{ticket} ({decision}, {run.status.value}): {result.final_output}")
    return 0


async def story() -> None:
    """Ask, approve and resume in one process, on a memory store."""
    async with RunStateStore(MemoryStore()) as approvals:
        await ask(approvals, "ticket-42")
        for run in await approvals.manager.list_runs(CheckpointStatus.PAUSED):
            request = (run.approval or {})["request"]
            print(f"queue: {run.run_id} asks {request['tool_calls']}")
        await approvals.manager.approve("ticket-42", approver="alice", comment="within policy")
        await resume(approvals, "ticket-42")


async def main(argv: list[str]) -> int:
    if not argv:
        await story()
        return 0
    if len(argv) != 2 or argv[0] not in ("ask", "resume"):
        print(__doc__, file=sys.stderr)
        return 2
    async with RunStateStore.from_env() as approvals:
        if argv[0] == "ask":
            await ask(approvals, argv[1])
            return 0
        return await resume(approvals, argv[1])


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
