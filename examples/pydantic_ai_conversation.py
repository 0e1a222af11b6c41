"""A Pydantic AI agent whose conversation lives in a fastcheckpoint store.

Runs offline (Pydantic AI's ``TestModel`` stands in for a model):

    python examples/pydantic_ai_conversation.py [STORE_URL]

Each turn loads the conversation, runs the agent on it and saves what the run added. The
store object is rebuilt between turns, as a new process would; a SQLite file in a temporary
directory is the default store. Then a turn is regenerated with ``branch`` and an
alternative explored with ``fork``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import anyio
from pydantic_ai import Agent
from pydantic_ai.conversation import Conversation
from pydantic_ai.models.test import TestModel

from fastcheckpoint.integrations.pydantic_ai import FastConversationStore

agent = Agent(TestModel(custom_output_text="noted"), instructions="Be brief.")


async def turn(url: str, conversation_id: str, prompt: str) -> None:
    async with FastConversationStore(url) as store:
        conversation = await store.load(conversation_id, scope="alice") or Conversation(
            conversation_id=conversation_id)
        result = await agent.run(prompt, conversation=conversation)
        saved = await store.save(result, scope="alice")
        print(f"{prompt!r}: {len(saved)} new messages stored")


async def main(url: str) -> None:
    for prompt in ("My name is Alice.", "I like tea.", "What do I like?"):
        await turn(url, "support-42", prompt)

    async with FastConversationStore(url) as store:
        conversation = await store.load("support-42")
        assert conversation is not None
        print(f"stored: {len(conversation.messages)} messages, "
              f"{conversation.usage.requests} model requests")
        # Regenerate the last turn: keep the first two turns, the rest stays as a branch.
        branched = await store.branch("support-42", at=4,
                                      expected_revision=conversation.revision)
        result = await agent.run("What do I like, again?", conversation=branched)
        await store.save(result)
        # Explore from the first turn in a new conversation that shares its messages.
        fork = await store.fork("support-42", at=2, new_conversation_id="support-42-alt")
        result = await agent.run("Call me Al.", conversation=fork)
        await store.save(result)
        for record in await store.list_conversations(scope="alice"):
            print(f"{record.conversation_id}: {len(record.branches)} branch(es) left, "
                  f"forked from {record.forked_from}")
        await store.delete("support-42")
        still = await store.load("support-42-alt")
        assert still is not None
        print(f"after deleting the original, the fork still has {len(still.messages)} messages")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as scratch:
        target = sys.argv[1] if len(sys.argv) > 1 else f"sqlite:///{Path(scratch) / 'chat.db'}"
        anyio.run(main, target)
