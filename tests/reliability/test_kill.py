"""``kill -9`` of writer processes on every durable store (file, SQLite, Redis, PostgreSQL, S3 and
DynamoDB on moto).

Several processes write one run; each is killed at a random instant while writing, round after
round. Afterwards every create a process acknowledged (it reports each one before starting the
next) is restorable with its content at its sequence, the run's sequences are unique and
gap-free, the only checkpoints nobody acknowledged are the creates in flight when a process
died (each at most once), and the run takes new creates at once.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from fastcheckpoint import CheckpointConfig, CheckpointManager
from tests.reliability._audit import Ack, Figures, audit_run, list_all, scaled, state_for
from tests.reliability._stores import Target

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("worker.py")
WRITERS = 3
ROUNDS = 2
KILL_WINDOW = {"file": 0.5, "sqlite": 0.5, "redis": 0.5, "postgres": 0.5, "s3": 2.0,
               "dynamodb": 2.0}
"""Seconds after the writers of a round start together, within which each is killed at a random
instant (possibly during the run's very first create): a few creates' worth on each store."""
STARTUP_SECONDS = 60.0


@dataclass
class Writer:
    """One writer process and the lines it reported."""

    name: str
    process: subprocess.Popen[bytes]
    errors: Path
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    reader: threading.Thread | None = None

    def read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            if raw == b"ready\n":
                self.ready.set()
            else:
                self.lines.append(raw.decode())
        self.ready.set()  # it ended: nobody waits for a line that will not come

    def stderr(self) -> str:
        return self.errors.read_text(errors="replace")[-3000:]

    def acks(self) -> list[Ack]:
        acks = []
        for line in self.lines:
            match = re.fullmatch(r"([0-9]+) (ck-\S+) (\S+)\n", line)
            if match is None:
                raise AssertionError(f"writer {self.name} reported {line!r}:\n{self.stderr()}")
            acks.append(Ack(match[3], int(match[1]), match[2]))
        return acks

    def in_flight(self) -> str:
        """The token of the create the writer was in when it died."""
        return f"{self.name}/{len(self.lines)}"


def _start(target: Target, run_id: str, name: str, scratch: Path) -> Writer:
    errors = scratch / f"{name}.stderr"
    with errors.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(WORKER), target.url, run_id, name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    writer = Writer(name, process, errors)
    writer.reader = threading.Thread(target=writer.read, daemon=True)
    writer.reader.start()
    return writer


def _alive(writer: Writer) -> None:
    if writer.process.poll() is not None:
        raise AssertionError(f"writer {writer.name} ended by itself:\n{writer.stderr()}")


def _kill_round(target: Target, run_id: str, names: list[str], rng: random.Random,
                scratch: Path) -> list[Writer]:
    """Start the writers, let them write together, kill each at a random instant of the
    window, and collect what they reported."""
    writers = [_start(target, run_id, name, scratch) for name in names]
    try:
        for writer in writers:
            if not writer.ready.wait(STARTUP_SECONDS):
                raise AssertionError(f"writer {writer.name} not ready:\n{writer.stderr()}")
            _alive(writer)
        for writer in writers:
            assert writer.process.stdin is not None
            writer.process.stdin.write(b"go\n")
            writer.process.stdin.flush()
        started = time.monotonic()
        window = KILL_WINDOW[target.name]
        for offset, index in sorted((rng.uniform(0, window), i) for i in range(len(writers))):
            time.sleep(max(0.0, started + offset - time.monotonic()))
            _alive(writers[index])
            writers[index].process.send_signal(signal.SIGKILL)
    finally:
        for writer in writers:
            writer.process.kill()
            writer.process.wait()
            if writer.reader is not None:
                writer.reader.join()
            for pipe in (writer.process.stdin, writer.process.stdout):
                if pipe is not None:
                    pipe.close()
    return writers


async def test_acknowledged_creates_survive_kill_9(
    durable_target: Target, seed: int, figures: Figures, tmp_path: Path
) -> None:
    run_id = f"kill-{seed}"
    rng = random.Random(seed)
    rounds = scaled(ROUNDS)
    writers: list[Writer] = []
    with anyio.fail_after(STARTUP_SECONDS * rounds + 120):
        for number in range(rounds):
            names = [f"r{number}w{index}" for index in range(WRITERS)]
            writers += await anyio.to_thread.run_sync(
                _kill_round, durable_target, run_id, names, rng, tmp_path)
        acks = [ack for writer in writers for ack in writer.acks()]
        in_flight = {writer.in_flight() for writer in writers}
        store = durable_target.store()
        try:
            manager = CheckpointManager(store, config=CheckpointConfig(
                max_checkpoints_per_run=None))
            audit = await audit_run(manager, run_id, acks, in_flight)
            after = await manager.create(run_id, state_for("after"), force=True)
            # A killed writer's last commit may still be applied by the server after the
            # audit listed the run (PostgreSQL finishes a COMMIT it received from a client
            # that died since): its checkpoint is one the writer never acknowledged.
            now_listed = await list_all(manager, run_id)
        finally:
            await store.aclose()
    figures.add("kill-9", durable_target.name, kills=len(writers),
                acknowledged=len(acks), in_flight_applied=len(audit.unacknowledged),
                lost=len(audit.lost), duplicated=len(audit.duplicated))
    assert acks, "no writer acknowledged anything before it was killed"
    assert not audit.problems(), f"{figures.replay}: {audit.problems()}"
    assert after is not None
    # The run goes on right after its newest checkpoint: no sequence skipped or reused.
    assert after.metadata.sequence >= audit.listed
    assert after.metadata.sequence == len(now_listed) - 1
    assert now_listed[0].checkpoint_id == after.checkpoint_id
