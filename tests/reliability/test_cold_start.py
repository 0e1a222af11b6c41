"""Several processes making their first contact with a fresh backend at the same moment, on
every durable store: a new file-store directory, a new SQLite file, a Redis prefix (and a
server that holds no scripts), a new PostgreSQL schema, a new S3 prefix and a new DynamoDB
prefix. Each process opens the store only once they all go, creates the same new run's
checkpoint at sequence 0 (one wins, the others are told ``ConflictError``), then creates more.

Afterwards nobody failed otherwise, exactly one create holds sequence 0, and every create a
process acknowledged is restorable with its content at its sequence, sequences unique and
gap-free.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
import redis

from fastcheckpoint import CheckpointConfig, CheckpointManager
from tests.reliability._audit import Ack, audit_run
from tests.reliability._stores import Target, redis_target
from tests.stores._redis_servers import PrivateRedis
from tests.stores.conftest import private_redis

__all__ = ["private_redis"]

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("cold_worker.py")
WRITERS = 3
CREATES = 3
"""Creates per writer after its first (at sequence 0)."""
STARTUP_SECONDS = 60.0


def _together(url: str, run_id: str) -> list[list[str]]:
    """Start the writers, let them go at once, and return what each reported."""
    writers = [
        subprocess.Popen(
            [sys.executable, str(WORKER), url, run_id, f"w{index}", str(CREATES)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        for index in range(WRITERS)
    ]
    try:
        for writer in writers:
            assert writer.stdout is not None
            assert writer.stdout.readline() == b"ready\n", writer.communicate()[1].decode()
        for writer in writers:
            assert writer.stdin is not None
            writer.stdin.write(b"go\n")
            writer.stdin.flush()
        outputs = [writer.communicate(timeout=STARTUP_SECONDS) for writer in writers]
    finally:
        for writer in writers:
            writer.kill()
            writer.wait()
    for writer, (_, errors) in zip(writers, outputs, strict=True):
        assert writer.returncode == 0, errors.decode()[-3000:]
    return [out.decode().splitlines() for out, _ in outputs]


def _acks(reports: list[list[str]]) -> list[Ack]:
    acks = []
    for line in (line for report in reports for line in report if line != "conflict"):
        sequence, checkpoint_id, token = line.split(" ")
        acks.append(Ack(token, int(sequence), checkpoint_id))
    return acks


async def _check(target: Target, run_id: str) -> None:
    reports = await anyio.to_thread.run_sync(_together, target.url, run_id)
    acks = _acks(reports)
    firsts = [ack for ack in acks if ack.token.endswith("/first")]
    assert [ack.sequence for ack in firsts] == [0], reports
    assert sum(report.count("conflict") for report in reports) == WRITERS - 1, reports
    store = target.store()
    try:
        manager = CheckpointManager(store, config=CheckpointConfig(max_checkpoints_per_run=None))
        audit = await audit_run(manager, run_id, acks, set())
    finally:
        await store.aclose()
    assert not audit.problems(), audit.problems()
    assert audit.listed == len(acks) == 1 + WRITERS * CREATES


async def test_processes_meeting_a_fresh_store_create_one_new_run(
    durable_target: Target,
) -> None:
    with anyio.fail_after(STARTUP_SECONDS * 2):
        await _check(durable_target, "cold-start")


async def test_processes_meeting_a_redis_server_without_scripts(
    private_redis: PrivateRedis,
) -> None:
    """Every script call first meets NOSCRIPT: each process loads the scripts, at once."""
    client = redis.Redis.from_url(private_redis.url)
    try:
        client.script_flush()
        target = redis_target(private_redis.url, "cold")
        with anyio.fail_after(STARTUP_SECONDS * 2):
            await _check(target, "cold-start")
        target.tamperer.close()
    finally:
        client.close()
