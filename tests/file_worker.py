"""A separate OS process appending to a FileStore, for tests/stores/test_file_specific.py.

    python file_worker.py append ROOT RUN_ID COUNT WORKER   append COUNT checkpoints, then exit
    python file_worker.py forever ROOT RUN_ID               append until killed
    python file_worker.py crash ROOT RUN_ID N               append 3, then SIGKILL itself just
                                                            before the N-th file-system change
                                                            of the 4th append (keep_latest=2)
    python file_worker.py crash-delete ROOT RUN_ID N        append 3, then SIGKILL itself just
                                                            before the N-th file-system change
                                                            of deleting checkpoint 1
    python file_worker.py crash-rebuild ROOT RUN_ID N       append 3, damage run.rec, then
                                                            SIGKILL itself just before the N-th
                                                            file-system change of rebuild_run

Each acknowledged append prints its sequence on a line of its own, after ``append`` returned.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio

from fastcheckpoint import _ids
from fastcheckpoint.errors import SequenceConflict
from fastcheckpoint.stores import RunRecord, StoredCheckpoint
from fastcheckpoint.stores.file import FileStore


def header_for(sequence: int, worker: str) -> bytes:
    return f"header {worker} {sequence}".encode()


def payload_for(sequence: int, worker: str) -> bytes:
    """Deterministic, of varying size up to ~256 KiB, so a torn write would show."""
    size = random.Random(sequence).randrange(1 << 18)
    return worker.encode() + random.Random(f"{worker}/{sequence}").randbytes(size)


def _die_before_change(number: int) -> None:
    """SIGKILL this process right before its ``number``-th call that changes the file system."""
    calls = itertools.count(1)

    def wrap(change: Callable[..., Any]) -> Callable[..., Any]:
        def killing(*args: Any, **kwargs: Any) -> Any:
            if next(calls) == number:
                os.kill(os.getpid(), signal.SIGKILL)
            return change(*args, **kwargs)

        return killing

    for name in ("open", "write", "fsync", "replace", "rename", "unlink", "mkdir", "rmdir"):
        setattr(os, name, wrap(getattr(os, name)))


async def _append_next(
    store: FileStore, run_id: str, worker: str, keep_latest: int | None = None
) -> int | None:
    """Append the run's next checkpoint; ``None`` if another writer took that sequence."""
    key = _ids.run_key(run_id)
    now = time.time()
    run = await store.get_run(key, now=now)
    if run is None:
        sequence = 0
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
    else:
        sequence = run.latest_sequence + 1
    record = StoredCheckpoint(
        sequence=sequence,
        checkpoint_id=_ids.checkpoint_id(key, run.incarnation, sequence),
        created_at=now,
        expires_at=None,
        header=header_for(sequence, worker),
        payload=payload_for(sequence, worker),
    )
    try:
        await store.append(key, record, run=run, keep_latest=keep_latest, now=now)
    except SequenceConflict:
        return None
    return sequence


async def _crash(root: str, run_id: str, number: int) -> None:
    store = FileStore(root)
    for _ in range(3):
        print(await _append_next(store, run_id, "forever"), flush=True)
    _die_before_change(number)
    await _append_next(store, run_id, "forever", keep_latest=2)
    print("survived", flush=True)


async def _crash_delete(root: str, run_id: str, number: int) -> None:
    store = FileStore(root)
    for _ in range(3):
        print(await _append_next(store, run_id, "forever"), flush=True)
    key = _ids.run_key(run_id)
    run = await store.get_run(key, now=time.time())
    assert run is not None
    checkpoint_id = _ids.checkpoint_id(key, run.incarnation, 1)
    _die_before_change(number)
    assert await store.delete(key, 1, checkpoint_id=checkpoint_id)
    print("survived", flush=True)


def rebuild_seed(run_id: str) -> RunRecord:
    """What the manager hands ``rebuild_run``: the run fields a rebuilt record starts with."""
    return RunRecord(
        run_id=run_id,
        incarnation="",
        status="active",
        created_at=0.0,
        updated_at=0.0,
        latest_sequence=0,
        checkpoint_count=0,
        expires_at=None,
        data=b"rebuilt",
    )


def damage_run_record(path: str) -> None:
    """Overwrite the last bytes of a ``run.rec`` in place: its checksum no longer matches."""
    with open(path, "r+b") as damaged:
        damaged.seek(-3, os.SEEK_END)
        damaged.write(b"zzz")


async def _crash_rebuild(root: str, run_id: str, number: int) -> None:
    store = FileStore(root)
    for _ in range(3):
        print(await _append_next(store, run_id, "forever"), flush=True)
    key = _ids.run_key(run_id)
    damage_run_record(os.path.join(root, "runs", key, "run.rec"))
    _die_before_change(number)
    await store.rebuild_run(key, rebuild_seed(run_id), now=time.time())
    print("survived", flush=True)


async def _main(mode: str, root: str, run_id: str, count: int, worker: str) -> None:
    crashes = {"crash": _crash, "crash-delete": _crash_delete, "crash-rebuild": _crash_rebuild}
    if mode in crashes:
        await crashes[mode](root, run_id, count)
        return
    store = FileStore(root)
    appended = 0
    while mode == "forever" or appended < count:
        sequence = await _append_next(store, run_id, worker)
        if sequence is not None:
            print(sequence, flush=True)
            appended += 1
    await store.aclose()


if __name__ == "__main__":
    mode, root, run_id = sys.argv[1:4]
    count = int(sys.argv[4]) if mode != "forever" else 0
    worker = sys.argv[5] if mode == "append" else "forever"
    anyio.run(_main, mode, root, run_id, count, worker)
