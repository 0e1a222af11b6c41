"""An OS process creating checkpoints through PostgresStore (tests/stores/postgres/).

    python postgres_worker.py URL RUN_ID COUNT WORKER

creates COUNT checkpoints of RUN_ID through a CheckpointManager over
``PostgresStore.from_url(URL)`` and prints the sequence of each acknowledged one on a line of
its own, after ``create`` returned. Several of these race on one run: the store alone decides
who gets which sequence.
"""

from __future__ import annotations

import sys

import anyio

from fastcheckpoint import CheckpointConfig, CheckpointManager
from fastcheckpoint.stores.postgres import PostgresStore


async def _main(url: str, run_id: str, count: int, worker: str) -> None:
    store = PostgresStore.from_url(url)
    config = CheckpointConfig(max_checkpoints_per_run=None, max_sequence_retries=500)
    try:
        manager = CheckpointManager(store, config=config)
        for step in range(count):
            created = await manager.create(
                run_id, state={"worker": worker, "step": step}, force=True)
            assert created is not None
            print(created.metadata.sequence, flush=True)
    finally:
        await store.aclose()


if __name__ == "__main__":
    url_arg, run_arg, count_arg, worker_arg = sys.argv[1:5]
    anyio.run(_main, url_arg, run_arg, int(count_arg), worker_arg, backend="asyncio")
