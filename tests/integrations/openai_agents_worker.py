"""A second OS process on a ``FastSession`` store, for the cross-process tests.

    python tests/integrations/openai_agents_worker.py URL

On the store at URL it runs one agent turn on session ``user-7`` ("What is my name?", a
scripted model that answers "noted") and prints, as one JSON line, the input the model
received. Then it prints ``ready``, waits for a line on stdin, pops session ``procs`` until it
is empty and prints what it popped as one JSON line. (One process for both: starting one that
imports the Agents SDK takes seconds.)
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agents import Agent, RunConfig, Runner
from agents.testing import ScriptedModel, assistant_message

from fastcheckpoint.integrations.openai_agents import FastSession


async def chat(url: str) -> Any:
    model = ScriptedModel([[assistant_message("noted", item_id="msg-2")]])
    agent = Agent(name="assistant", instructions="Be brief.", model=model)
    async with FastSession("user-7", url) as session:
        await Runner.run(agent, "What is my name?", session=session,
                         run_config=RunConfig(tracing_disabled=True))
    assert model.last_call is not None
    return model.last_call.input


async def pop(url: str) -> list[Any]:
    popped: list[Any] = []
    async with FastSession("procs", url) as session:
        await session.get_items(limit=1)
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # the parent pops too, from now on
        while (item := await session.pop_item()) is not None:
            popped.append(item)
    return popped


async def main(url: str) -> None:
    print(json.dumps(await chat(url)), flush=True)
    print(json.dumps(await pop(url)), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
