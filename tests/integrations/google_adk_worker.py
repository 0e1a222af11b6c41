"""An ADK agent on a ``FastSessionService``, and a separate OS process that runs one turn.

    python tests/integrations/google_adk_worker.py MESSAGE URL SESSION [URL SESSION ...]

For each URL and SESSION, runs one turn of the calculator agent (app ``calc``, user ``ada``)
with MESSAGE on session SESSION of the store at URL, and prints one JSON line: what the
model was sent on each call of the turn (``seen``), the texts the agent answered
(``replies``) and the session's state afterwards.
The model is scripted (no network): asked to add, it calls the ``add`` tool; given the
tool's result, it reports the sum; otherwise it says how many messages it was sent.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from google.adk.agents import LlmAgent
from google.adk.models import BaseLlm
from google.adk.models.llm_request import LlmRequest
from google.adk.models.llm_response import LlmResponse
from google.adk.runners import Runner
from google.adk.tools.tool_context import ToolContext
from google.genai import types
from pydantic import Field

from fastcheckpoint.integrations.google_adk import FastSessionService

APP = "calc"
USER = "ada"


class ScriptedModel(BaseLlm):
    """A stand-in for a chat model that answers from the conversation it is sent."""

    model: str = "scripted"
    seen: list[list[str]] = Field(default_factory=list)
    """Per call, each content it was sent, described as ``"role: what"``."""

    async def generate_content_async(
        self, llm_request: LlmRequest, stream: bool = False
    ) -> AsyncGenerator[LlmResponse, None]:
        self.seen.append([describe(content) for content in llm_request.contents])
        part = (llm_request.contents[-1].parts or [types.Part()])[0]
        if part.function_response is not None:
            result = (part.function_response.response or {}).get("result")
            yield reply(types.Part(text=f"The sum is {result}."))
        elif part.text and part.text.startswith("add"):
            call = types.FunctionCall(name="add", args={"a": 2, "b": 3}, id="call-1")
            yield reply(types.Part(function_call=call))
        else:
            yield reply(types.Part(text=f"I was sent {len(llm_request.contents)} messages."))


def reply(part: types.Part) -> LlmResponse:
    return LlmResponse(content=types.Content(role="model", parts=[part]))


def describe(content: types.Content) -> str:
    part = (content.parts or [types.Part()])[0]
    if part.function_call is not None:
        return f"{content.role}: call {part.function_call.name}"
    if part.function_response is not None:
        return f"{content.role}: result {(part.function_response.response or {}).get('result')}"
    return f"{content.role}: {part.text}"


def add(a: int, b: int, tool_context: ToolContext) -> dict[str, int]:
    """Add two integers."""
    tool_context.state["user:additions"] = tool_context.state.get("user:additions", 0) + 1
    tool_context.state["temp:scratch"] = a * b
    return {"result": a + b}


def build_runner(service: FastSessionService | Any) -> tuple[Runner, ScriptedModel]:
    model = ScriptedModel()
    agent = LlmAgent(name="calculator", model=model, instruction="You add numbers.",
                     tools=[add], output_key="last_answer")
    return Runner(app_name=APP, agent=agent, session_service=service), model


async def turn(runner: Runner, session_id: str, message: str) -> list[str]:
    """Run one turn; the texts the agent answered."""
    replies: list[str] = []
    content = types.Content(role="user", parts=[types.Part(text=message)])
    async for event in runner.run_async(user_id=USER, session_id=session_id,
                                        new_message=content):
        if event.content is None or event.author == "user":
            continue
        replies.extend(part.text for part in event.content.parts or [] if part.text)
    return replies


async def main(message: str, targets: list[str]) -> None:
    for url, session_id in zip(targets[::2], targets[1::2], strict=True):
        async with FastSessionService(url) as service:
            runner, model = build_runner(service)
            replies = await turn(runner, session_id, message)
            session = await service.get_session(app_name=APP, user_id=USER,
                                                session_id=session_id)
            state = None if session is None else session.state
            print(json.dumps({"seen": model.seen, "replies": replies, "state": state}),
                  flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:]))
