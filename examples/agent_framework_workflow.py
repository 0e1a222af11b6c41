"""An Agent Framework workflow that checkpoints to fastcheckpoint and resumes after a crash.

    python examples/agent_framework_workflow.py          # the whole story in one process
    python examples/agent_framework_workflow.py run      # run until the "power cut"
    python examples/agent_framework_workflow.py resume   # resume from the latest checkpoint

Needs ``pip install 'fastcheckpoint[agent-framework]'``; no network, no model: the executors
are plain Python. ``Parse`` turns an order into a ``PickList`` and ``Pick`` picks one item per
superstep (what it picked so far is executor state), so every superstep ends in a checkpoint.
The first run stops at the third item, as a process killed there would; a workflow built
anew resumes from the latest checkpoint and finishes with the output an uninterrupted run
gives.

``run`` and ``resume`` are separate processes sharing only the store: set
``FASTCHECKPOINT_URL`` (e.g. ``sqlite:///tmp/orders.db``) and look at the checkpoints with
``fastcheckpoint runs`` and ``fastcheckpoint show agent-framework:<checkpoint id>``. The
one-process story uses a temporary SQLite database.
"""

import asyncio
import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Any

from agent_framework import Executor, Workflow, WorkflowBuilder, WorkflowContext, handler

from fastcheckpoint.integrations.agent_framework import FastCheckpointStorage

ORDER = "tea, biscuits, jam, bread"
WORKFLOW = "pick-order"


@dataclasses.dataclass
class PickList:
    """A message between executors: stored by its fields (named in checkpoint_types)."""

    items: tuple[str, ...]
    next: int


class PowerCut(Exception):
    """Stands in for the process dying mid-run."""


class Parse(Executor):
    @handler
    async def parse(self, order: str, ctx: WorkflowContext[PickList]) -> None:
        items = tuple(item.strip() for item in order.split(","))
        await ctx.send_message(PickList(items, 0))


class Pick(Executor):
    def __init__(self, *, cut_power_at: int | None = None) -> None:
        super().__init__(id="pick")
        self.picked: list[str] = []
        self.cut_power_at = cut_power_at

    @handler
    async def pick(self, todo: PickList, ctx: WorkflowContext[PickList, str]) -> None:
        if todo.next == self.cut_power_at:
            raise PowerCut(f"power cut before picking {todo.items[todo.next]!r}")
        self.picked.append(todo.items[todo.next])
        print(f"  picked {todo.items[todo.next]}")
        if todo.next + 1 < len(todo.items):
            await ctx.send_message(PickList(todo.items, todo.next + 1), target_id=self.id)
        else:
            await ctx.yield_output(f"packed: {', '.join(self.picked)}")

    async def on_checkpoint_save(self) -> dict[str, Any]:
        return {"picked": list(self.picked)}

    async def on_checkpoint_restore(self, state: dict[str, Any]) -> None:
        self.picked = list(state["picked"])


def build(storage: FastCheckpointStorage, *, cut_power_at: int | None = None) -> Workflow:
    parse, pick = Parse(id="parse"), Pick(cut_power_at=cut_power_at)
    return (WorkflowBuilder(start_executor=parse, checkpoint_storage=storage, name=WORKFLOW)
            .add_edge(parse, pick).add_edge(pick, pick).build())


async def run(storage: FastCheckpointStorage) -> None:
    print("run: picking until the power goes out")
    try:
        await build(storage, cut_power_at=2).run(ORDER)
    except Exception as exc:  # the workflow stops with the executor's error
        print(f"  stopped: {exc}")
    ids = await storage.list_checkpoint_ids(workflow_name=WORKFLOW)
    print(f"  {len(ids)} checkpoints saved")


async def resume(storage: FastCheckpointStorage) -> str:
    latest = await storage.get_latest(workflow_name=WORKFLOW)
    if latest is None:
        raise SystemExit("nothing to resume: run first")
    print(f"resume: from checkpoint {latest.checkpoint_id} (iteration {latest.iteration_count})")
    result = await build(storage).run(checkpoint_id=latest.checkpoint_id)
    [output] = result.get_outputs()
    print(f"  {output}")
    return str(output)


async def story() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        url = f"sqlite:///{Path(scratch) / 'orders.db'}"
        async with FastCheckpointStorage(url, checkpoint_types=[PickList]) as storage:
            await run(storage)
        # A new storage on the same database: what a restarted process would open.
        async with FastCheckpointStorage(url, checkpoint_types=[PickList]) as storage:
            resumed = await resume(storage)
        async with FastCheckpointStorage("memory://", checkpoint_types=[PickList]) as storage:
            [uninterrupted] = (await build(storage).run(ORDER)).get_outputs()
    assert resumed == uninterrupted, (resumed, uninterrupted)
    print("the resumed run gave what an uninterrupted run gives")


async def main(mode: str | None) -> None:
    if mode is None:
        await story()
        return
    async with FastCheckpointStorage.from_env(checkpoint_types=[PickList]) as storage:
        await (run(storage) if mode == "run" else resume(storage))


if __name__ == "__main__":
    if len(sys.argv) > 2 or sys.argv[1:] not in ([], ["run"], ["resume"]):
        raise SystemExit(__doc__)
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None))
