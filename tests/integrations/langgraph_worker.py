"""A separate OS process running a LangGraph step loop on a store, for the SIGKILL test.

    python tests/integrations/langgraph_worker.py URL THREAD STEPS

Runs the step loop of ``tests/integrations/_langgraph_support.py`` on thread THREAD (from
the start, or from the thread's latest checkpoint when it has one), printing ``step N`` as
step N starts (with ``durability="sync"``: steps before it are saved) and ``done [0, 1, ...]``
with the final state at the end.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
from tests.integrations._langgraph_support import step_loop

STEP_SECONDS = 0.002


def report(step: int) -> None:
    print(f"step {step}", flush=True)
    time.sleep(STEP_SECONDS)  # a step takes a moment: a kill may land anywhere


async def main(url: str, thread_id: str, steps: int) -> None:
    async with FastCheckpointSaver(url) as saver:
        graph = step_loop(saver, steps, on_step=report)
        config: Any = {"configurable": {"thread_id": thread_id}}
        started = await saver.aget_tuple(config) is not None
        # Each step's checkpoint is written before the next step starts: "step N" on stdout
        # means steps 0..N-1 are durable, whatever moment the kill lands on.
        result = await graph.ainvoke(None if started else {"done": []}, config,
                                     durability="sync")
        print("done", json.dumps(result["done"]), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
