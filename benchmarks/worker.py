"""One W6 writer process: ``python -m benchmarks.worker URL RUN_ID CREATES STATE_BYTES MESSAGES``.

Prints ``ready`` once loaded, waits for a line on stdin, appends CREATES checkpoints to RUN_ID,
then prints one JSON line: the sequences it got, each create's latency, and its start and end
on the system-wide monotonic clock (so the parent can take the wall time across processes).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import anyio

from benchmarks.content import make_content
from fastcheckpoint import CheckpointError, CheckpointManager, open_store


async def _write(url: str, run_id: str, creates: int, state_bytes: int, messages: int) -> None:
    content = make_content(state_bytes, messages)
    manager = CheckpointManager(open_store(url))
    print("ready", flush=True)
    await anyio.to_thread.run_sync(sys.stdin.readline)
    report: dict[str, Any] = {"sequences": [], "latencies_ns": [], "errors": 0}
    report["start_ns"] = time.monotonic_ns()
    for step in range(creates):
        content.state["step"] = step
        began = time.monotonic_ns()
        try:
            checkpoint = await manager.create(run_id, content.state, messages=content.messages)
        except CheckpointError:
            logging.getLogger("benchmarks").exception("W6 create failed")
            report["errors"] += 1
            continue
        report["latencies_ns"].append(time.monotonic_ns() - began)
        assert checkpoint is not None  # no checkpoint_interval: never throttled
        report["sequences"].append(checkpoint.metadata.sequence)
    report["end_ns"] = time.monotonic_ns()
    await manager.aclose()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    url, run_id, creates, state_bytes, messages = sys.argv[1:6]
    anyio.run(_write, url, run_id, int(creates), int(state_bytes), int(messages))
