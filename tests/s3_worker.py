"""A separate OS process creating checkpoints on one S3 run (tests/stores/s3/test_s3.py).

    python s3_worker.py ENDPOINT BUCKET PREFIX RUN_ID COUNT

Creates COUNT checkpoints through ``CheckpointManager`` (which retries lost sequence races)
and prints each acknowledged sequence on a line of its own. AWS credentials come from the
environment (the test's moto fixture sets fake ones).
"""

from __future__ import annotations

import sys

import anyio

from fastcheckpoint import CheckpointConfig, CheckpointManager
from fastcheckpoint.stores.s3 import S3Store


async def main(endpoint: str, bucket: str, prefix: str, run_id: str, count: int) -> None:
    store = S3Store(bucket, prefix, region="us-east-1", endpoint_url=endpoint)
    config = CheckpointConfig(max_checkpoints_per_run=None, max_sequence_retries=200)
    manager = CheckpointManager(store, config=config)
    try:
        for step in range(count):
            created = await manager.create(run_id, {"step": step}, force=True)
            assert created is not None
            print(created.metadata.sequence, flush=True)
    finally:
        await store.aclose()


if __name__ == "__main__":
    endpoint_url, bucket_name, key_prefix, run, how_many = sys.argv[1:6]
    anyio.run(main, endpoint_url, bucket_name, key_prefix, run, int(how_many))
