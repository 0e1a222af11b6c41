"""A writer process of the cold-start tests (tests/reliability/test_cold_start.py).

    python tests/reliability/cold_worker.py URL RUN_ID NAME COUNT

Imports everything, prints ``ready`` and waits for a line on stdin; only then opens
``open_store(URL)`` (its first contact with the backend) and, through a CheckpointManager,
creates RUN_ID's checkpoint at sequence 0 (``expected_sequence=0``), then COUNT more checkpoints
at whatever sequence is next. Each create that returns is reported on a line of its own:
``<sequence> <checkpoint id> <token>``; a first create another writer won is reported as
``conflict``. Any other failure ends the process with a traceback and exit code 1.
"""

from __future__ import annotations

import sys

import anyio
import anyio.to_thread

from fastcheckpoint import (
    Checkpoint,
    CheckpointConfig,
    CheckpointManager,
    ConflictError,
    open_store,
)
from tests.reliability._audit import state_for


def _report(created: Checkpoint | None, token: str) -> None:
    assert created is not None
    # One write of one short line: a pipe delivers it whole or not at all.
    sys.stdout.write(f"{created.metadata.sequence} {created.checkpoint_id} {token}\n")
    sys.stdout.flush()


async def main(url: str, run_id: str, name: str, count: int) -> None:
    print("ready", flush=True)
    await anyio.to_thread.run_sync(sys.stdin.readline)  # all writers start together
    store = open_store(url)
    config = CheckpointConfig(max_checkpoints_per_run=None, max_sequence_retries=1000)
    manager = CheckpointManager(store, config=config)
    try:
        token = f"{name}/first"
        try:
            _report(await manager.create(run_id, state_for(token), expected_sequence=0), token)
        except ConflictError:
            print("conflict", flush=True)
        for step in range(count):
            token = f"{name}/{step}"
            _report(await manager.create(run_id, state_for(token), force=True), token)
    finally:
        await store.aclose()


if __name__ == "__main__":
    url_arg, run_arg, name_arg, count_arg = sys.argv[1:5]
    anyio.run(main, url_arg, run_arg, name_arg, int(count_arg))
