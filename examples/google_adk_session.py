"""A Google ADK agent whose sessions live in a fastcheckpoint store.

    python examples/google_adk_session.py                         # the whole story
    python examples/google_adk_session.py URL SESSION "MESSAGE"   # one turn of one session

Needs ``pip install 'fastcheckpoint[google-adk]'``; no network: the "model" is a stand-in
that asks for the ``add`` tool when a message starts with "add", reports the sum when the
tool answers, and otherwise says how many messages of the conversation it was sent.

The whole story runs two turns of one session, the second one on a new service object (as
a restarted process would), over a file store in a temporary directory: the model is sent
the whole conversation. With URL, each call is one turn, so separate processes (or
machines) continue the same session:

    python examples/google_adk_session.py file:///tmp/agents ticket-42 "add 2 and 3"
    python examples/google_adk_session.py file:///tmp/agents ticket-42 "anything else?"
    fastcheckpoint runs --url file:///tmp/agents     # google-adk:calc/ada/ticket-42
"""

import asyncio
import sys
import tempfile
from collections.abc import AsyncGenerator

from google.adk.agents import LlmAgent
from google.adk.models import BaseLlm
from google.adk.models.llm_request import LlmRequest
from google.adk.models.llm_response import LlmResponse
from google.adk.runners import Runner
from google.adk.tools.tool_context import ToolContext
from google.genai import types

from fastcheckpoint.integrations.google_adk import FastSessionService

APP, USER = "calc", "ada"


class StandInModel(BaseLlm):
    """Answers from the conversation it is sent, like a (very small) chat model."""

    model: str = "stand-in"

    async def generate_content_async(
        self, llm_request: LlmRequest, stream: bool = False
    ) -> AsyncGenerator[LlmResponse, None]:
        part = (llm_request.contents[-1].parts or [types.Part()])[0]
        if part.function_response is not None:
            result = (part.function_response.response or {}).get("result")
            yield answer(types.Part(text=f"The sum is {result}."))
        elif part.text and part.text.startswith("add"):
            call = types.FunctionCall(name="add", args={"a": 2, "b": 3})
            yield answer(types.Part(function_call=call))
        else:
            count = len(llm_request.contents)
            yield answer(types.Part(text=f"I remember all {count} messages of this session."))


def answer(part: types.Part) -> LlmResponse:
    # Real models report their token usage; ADK logs a warning for a response without it.
    usage = types.GenerateContentResponseUsageMetadata(
        prompt_token_count=1, candidates_token_count=1, total_token_count=2)
    return LlmResponse(content=types.Content(role="model", parts=[part]), usage_metadata=usage)


def add(a: int, b: int, tool_context: ToolContext) -> dict[str, int]:
    """Add two integers."""
    # user: state is shared by all of this user's sessions in the app.
    tool_context.state["user:additions"] = tool_context.state.get("user:additions", 0) + 1
    return {"result": a + b}


def runner_on(service: FastSessionService) -> Runner:
    agent = LlmAgent(name="calculator", model=StandInModel(), instruction="You add numbers.",
                     tools=[add], output_key="last_answer")
    return Runner(app_name=APP, agent=agent, session_service=service,
                  auto_create_session=True)


async def turn(service: FastSessionService, session_id: str, message: str) -> None:
    print(f"user:  {message}")
    content = types.Content(role="user", parts=[types.Part(text=message)])
    async for event in runner_on(service).run_async(user_id=USER, session_id=session_id,
                                                    new_message=content):
        for part in (event.content.parts or []) if event.content else []:
            if part.text and event.author != "user":
                print(f"agent: {part.text}")


async def story() -> None:
    with tempfile.TemporaryDirectory() as directory:
        url = f"file://{directory}"
        async with FastSessionService(url) as service:
            await turn(service, "ticket-42", "add 2 and 3")
        async with FastSessionService(url) as service:  # a new process, say
            await turn(service, "ticket-42", "what do you remember?")
            session = await service.get_session(app_name=APP, user_id=USER,
                                                session_id="ticket-42")
            assert session is not None
            print(f"\n{len(session.events)} events; state: {session.state}")
            listed = await service.list_sessions(app_name=APP, user_id=USER)
            print("sessions of ada:", [found.id for found in listed.sessions])


async def one_turn(url: str, session_id: str, message: str) -> None:
    async with FastSessionService(url) as service:
        await turn(service, session_id, message)


if __name__ == "__main__":
    if len(sys.argv) == 4:
        asyncio.run(one_turn(*sys.argv[1:]))
    elif len(sys.argv) == 1:
        asyncio.run(story())
    else:
        sys.exit(__doc__)
