"""A writer process of the kill -9 tests (tests/reliability/test_kill.py).

    python tests/reliability/worker.py URL RUN_ID NAME

Opens ``open_store(URL)``, reads the run once (so imports and the connection are done),
prints ``ready`` and waits for a line on stdin; then creates checkpoints of RUN_ID through a
CheckpointManager until it is killed. Create number ``k`` writes ``state_for("NAME/k")``;
after it returns, and before the next create begins, the worker writes
``<sequence> <checkpoint id> NAME/k`` on a line of its own to stdout and flushes: a line
means acknowledged.
"""

from __future__ import annotations

import itertools
import sys

import anyio
import anyio.to_thread

from fastcheckpoint import CheckpointConfig, CheckpointManager, open_store
from tests.reliability._audit import state_for


async def main(url: str, run_id: str, name: str) -> None:
    store = open_store(url)
    # Several writers share one run: generous retries for lost sequence races.
    config = CheckpointConfig(max_checkpoints_per_run=None, max_sequence_retries=1000)
    manager = CheckpointManager(store, config=config)
    await manager.get_run(run_id)
    print("ready", flush=True)
    await anyio.to_thread.run_sync(sys.stdin.readline)  # all writers start together
    for step in itertools.count():
        token = f"{name}/{step}"
        created = await manager.create(run_id, state_for(token), force=True)
        assert created is not None
        # One write of one short line: a pipe delivers it whole or not at all.
        sys.stdout.write(f"{created.metadata.sequence} {created.checkpoint_id} {token}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    url_arg, run_arg, name_arg = sys.argv[1:4]
    anyio.run(main, url_arg, run_arg, name_arg)
