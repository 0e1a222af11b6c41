"""A separate OS process running a LangGraph graph on a store, for the SIGKILL tests.

    python tests/integrations/langgraph_worker.py URL THREAD STEPS
    python tests/integrations/langgraph_worker.py URL THREAD die-before-pausing
    python tests/integrations/langgraph_worker.py URL THREAD read

The first runs the step loop of ``tests/integrations/_langgraph_support.py`` on thread THREAD
(from the start, or from the thread's latest checkpoint when it has one), printing ``step N``
as step N starts (with ``durability="sync"``: steps before it are saved) and ``done [0, 1,
...]`` with the final state at the end.

``die-before-pausing`` runs ``examples/langgraph_approval.py``'s agent on THREAD until its
``interrupt()``, and the process kills itself with SIGKILL as the saver is about to change
the thread's status, the interrupt stored: what a crash between the two leaves. ``read``
reads the thread's latest checkpoint, as a process that looks at it or resumes it does, and
prints its pending writes' channels.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fastcheckpoint import open_store
from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
from tests.integrations._langgraph_support import step_loop

ROOT = Path(__file__).resolve().parents[2]
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


async def die_before_pausing(url: str, thread_id: str) -> None:
    spec = importlib.util.spec_from_file_location(
        "langgraph_approval", ROOT / "examples" / "langgraph_approval.py")
    assert spec is not None
    assert spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # LangGraph reads the state's type hints from there
    spec.loader.exec_module(example)
    store = open_store(url)

    async def killed(*_: Any, **__: Any) -> Any:
        os.kill(os.getpid(), signal.SIGKILL)

    store.update_run = killed  # type: ignore[method-assign]
    async with FastCheckpointSaver(store) as saver:
        await example.ask(saver, thread_id)
    print("not killed", flush=True)


async def read(url: str, thread_id: str) -> None:
    async with FastCheckpointSaver(url) as saver:
        found = await saver.aget_tuple({"configurable": {"thread_id": thread_id}})
        print(json.dumps(None if found is None else
                         [channel for _, channel, _ in found.pending_writes]), flush=True)


if __name__ == "__main__":
    if sys.argv[3] == "die-before-pausing":
        asyncio.run(die_before_pausing(sys.argv[1], sys.argv[2]))
    elif sys.argv[3] == "read":
        asyncio.run(read(sys.argv[1], sys.argv[2]))
    else:
        asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
