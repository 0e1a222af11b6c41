"""An Agent Framework workflow run in a process of its own, for the resume tests.

    python agent_framework_worker.py STORE_URL run TEXT [CRASH_AT]
    python agent_framework_worker.py STORE_URL resume

``run`` runs the "shout" workflow on TEXT with checkpoints in the store; with CRASH_AT the
accumulating executor fails on that word, as a process that dies mid-run would stop. ``resume``
builds the workflow anew and resumes it from the latest checkpoint in the store. Each prints
one JSON line: ``{"outputs": [...], "checkpoints": N, "resumed_from": ...}`` or
``{"crashed": "...", "checkpoints": N}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from typing import Any

from agent_framework import Executor, Workflow, WorkflowBuilder, WorkflowContext, handler

from fastcheckpoint.integrations.agent_framework import FastCheckpointStorage

WORKFLOW = "shout"


@dataclasses.dataclass
class Batch:
    """Words still to shout, a dataclass the storage stores by its fields."""

    words: tuple[str, ...]
    position: int


class Split(Executor):
    @handler
    async def split(self, text: str, ctx: WorkflowContext[Batch]) -> None:
        ctx.set_state("total", len(text.split()))
        await ctx.send_message(Batch(tuple(text.split()), 0))


class Shout(Executor):
    """One word per superstep; what it has shouted so far is executor state."""

    def __init__(self, crash_at: int | None = None) -> None:
        super().__init__(id="shout")
        self.shouted: list[str] = []
        self.crash_at = crash_at

    @handler
    async def shout(self, batch: Batch, ctx: WorkflowContext[Batch, str]) -> None:
        if batch.position == self.crash_at:
            raise RuntimeError(f"crashed at word {batch.position}")
        self.shouted.append(batch.words[batch.position].upper())
        if batch.position + 1 < len(batch.words):
            await ctx.send_message(Batch(batch.words, batch.position + 1), target_id=self.id)
            return
        await ctx.yield_output(f"{' '.join(self.shouted)} ({ctx.get_state('total')} words)")

    async def on_checkpoint_save(self) -> dict[str, Any]:
        return {"shouted": list(self.shouted)}

    async def on_checkpoint_restore(self, state: dict[str, Any]) -> None:
        self.shouted = list(state["shouted"])


def build(storage: FastCheckpointStorage, crash_at: int | None = None) -> Workflow:
    split, shout = Split(id="split"), Shout(crash_at)
    return (WorkflowBuilder(start_executor=split, checkpoint_storage=storage, name=WORKFLOW)
            .add_edge(split, shout).add_edge(shout, shout).build())


async def main(url: str, mode: str, args: list[str]) -> dict[str, Any]:
    async with FastCheckpointStorage(url, checkpoint_types=[Batch]) as storage:
        if mode == "run":
            crash_at = int(args[1]) if len(args) > 1 else None
            try:
                result = await build(storage, crash_at).run(args[0])
            except Exception as exc:  # the workflow failed, as a dying process would stop
                count = len(await storage.list_checkpoint_ids(workflow_name=WORKFLOW))
                return {"crashed": str(exc), "checkpoints": count}
            resumed_from = None
        else:
            latest = await storage.get_latest(workflow_name=WORKFLOW)
            assert latest is not None, "no checkpoint to resume from"
            resumed_from = latest.checkpoint_id
            result = await build(storage).run(checkpoint_id=latest.checkpoint_id)
        count = len(await storage.list_checkpoint_ids(workflow_name=WORKFLOW))
        return {"outputs": [str(output) for output in result.get_outputs()],
                "checkpoints": count, "resumed_from": resumed_from}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))))
