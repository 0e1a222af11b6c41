"""An OS process creating checkpoints through PostgresStore (tests/stores/postgres/).

    python postgres_worker.py URL RUN_ID COUNT WORKER
    python postgres_worker.py forever URL RUN_ID KEEP

The first creates COUNT checkpoints of RUN_ID through a CheckpointManager over
``PostgresStore.from_url(URL)``; the second appends through the store itself until it is
killed (each checkpoint naming a shared item and owning one of its own, pruning the run to KEEP
checkpoints). Each prints the sequence of each acknowledged checkpoint on a line of its own,
after the call returned. Several of these race on one run: the store alone decides who gets
which sequence.
"""

from __future__ import annotations

import os
import sys

import anyio

from fastcheckpoint import CheckpointConfig, CheckpointManager
from fastcheckpoint.stores.postgres import PostgresStore
from tests import _appends as appends


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


async def append_next(store: PostgresStore, run_id: str, keep_latest: int) -> int | None:
    """Append the run's next checkpoint (naming ``shared``, owning ``w/<sequence>``) through
    the store; ``None`` if another writer took that sequence."""
    return await appends.append_next(
        store, run_id, keep_latest=keep_latest,
        header=lambda sequence: f"header {sequence}".encode(),
        payload=lambda sequence: os.urandom(sequence % 4096),
        owned=lambda sequence: f"{sequence}".encode())


async def _forever(url: str, run_id: str, keep: int) -> None:
    store = PostgresStore.from_url(url)
    while True:
        sequence = await append_next(store, run_id, keep)
        if sequence is not None:
            print(sequence, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "forever":
        url_arg, run_arg, keep_arg = sys.argv[2:5]
        anyio.run(_forever, url_arg, run_arg, int(keep_arg), backend="asyncio")
    else:
        url_arg, run_arg, count_arg, worker_arg = sys.argv[1:5]
        anyio.run(_main, url_arg, run_arg, int(count_arg), worker_arg, backend="asyncio")
