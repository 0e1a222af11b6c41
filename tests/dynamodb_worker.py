"""A separate OS process appending to a DynamoDBStore, for tests/stores/dynamodb/test_dynamodb.py.

    python dynamodb_worker.py ENDPOINT TABLE BUCKET PREFIX RUN_ID COUNT WORKER

appends COUNT checkpoints to RUN_ID (payload ``WORKER/<sequence>``), proposing the run's next
sequence as the manager does and re-reading after a lost race, then exits. Each acknowledged
append prints its sequence on a line of its own, after ``append`` returned.
"""

from __future__ import annotations

import sys
import time

import anyio

from fastcheckpoint import _ids
from fastcheckpoint.errors import SequenceConflict
from fastcheckpoint.stores import RunRecord, StoredCheckpoint
from fastcheckpoint.stores.dynamodb import DynamoDBStore


async def _append_next(store: DynamoDBStore, run_id: str, worker: str) -> int | None:
    """Append the run's next checkpoint; ``None`` if another writer took that sequence."""
    key = _ids.run_key(run_id)
    now = time.time()
    run = await store.get_run(key, now=now)
    if run is None:
        run = RunRecord(
            run_id=run_id,
            incarnation=_ids.new_incarnation(),
            status="active",
            created_at=now,
            updated_at=now,
            latest_sequence=0,
            checkpoint_count=0,
            expires_at=None,
        )
        sequence = 0
    else:
        sequence = run.latest_sequence + 1
    record = StoredCheckpoint(
        sequence=sequence,
        checkpoint_id=_ids.checkpoint_id(key, run.incarnation, sequence),
        created_at=now,
        expires_at=None,
        header=f"header {worker}".encode(),
        payload=f"{worker}/{sequence}".encode(),
    )
    try:
        await store.append(key, record, run=run, keep_latest=None, now=now)
    except SequenceConflict:
        return None
    return sequence


async def _main(
    endpoint: str, table: str, bucket: str, prefix: str, run_id: str, count: int, worker: str
) -> None:
    store = DynamoDBStore(
        table, bucket=bucket, prefix=prefix, region="us-east-1", endpoint_url=endpoint
    )
    try:
        appended = 0
        while appended < count:
            sequence = await _append_next(store, run_id, worker)
            if sequence is not None:
                print(sequence, flush=True)
                appended += 1
    finally:
        await store.aclose()


if __name__ == "__main__":
    endpoint, table, bucket, prefix, run_id, count, worker = sys.argv[1:8]
    anyio.run(_main, endpoint, table, bucket, prefix, run_id, int(count), worker)
