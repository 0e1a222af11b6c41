"""A process of its own for the Pydantic AI conversation store tests.

``continue URL CONVERSATION_ID``: loads the conversation, prints its messages as JSON, runs a
``TestModel`` agent on it and saves the result.

``race URL CONVERSATION_ID TAG``: reads the conversation's record, prints ``ready``, waits
for a line on stdin, then writes the revision ``<read revision>+TAG`` expecting the one it
read, and prints ``won`` or ``conflict``.
"""

from __future__ import annotations

import dataclasses
import sys

import anyio
from pydantic_ai.conversation_store import ConversationConflict

from fastcheckpoint.integrations.pydantic_ai import FastConversationStore


async def _continue(url: str, conversation_id: str) -> None:
    from pydantic_ai import Agent  # only this mode runs an agent
    from pydantic_ai.messages import ModelMessagesTypeAdapter
    from pydantic_ai.models.test import TestModel

    async with FastConversationStore(url) as store:
        conversation = await store.load(conversation_id)
        if conversation is None:
            raise SystemExit(f"conversation {conversation_id!r} not found")
        print(ModelMessagesTypeAdapter.dump_json(conversation.messages).decode(), flush=True)
        result = await Agent(TestModel(custom_output_text="second answer")).run(
            "and then?", conversation=conversation)
        await store.save(result)


async def _race(url: str, conversation_id: str) -> None:
    async with FastConversationStore(url) as store:
        record = await store.read_record(conversation_id)
        if record is None:
            raise SystemExit(f"conversation {conversation_id!r} not found")
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)
        changed = dataclasses.replace(record, revision=f"{record.revision}+{sys.argv[4]}")
        try:
            await store.write_record(changed, expected_revision=record.revision)
        except ConversationConflict:
            print("conflict", flush=True)
            return
        print("won", flush=True)


def main() -> None:
    mode, url, conversation_id = sys.argv[1:4]
    work = {"continue": _continue, "race": _race}[mode]
    anyio.run(work, url, conversation_id)


if __name__ == "__main__":
    main()
