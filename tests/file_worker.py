"""A separate OS process appending to a FileStore, for tests/stores/file/test_file_specific.py.

    python file_worker.py append ROOT RUN_ID COUNT WORKER   append COUNT checkpoints, then exit
    python file_worker.py append-items ROOT RUN_ID COUNT WORKER
                                                            the same with append_with_items
                                                            (items_for, keep_latest=3)
    python file_worker.py forever ROOT RUN_ID               append until killed
    python file_worker.py crash ROOT RUN_ID N               append 3, then SIGKILL itself just
                                                            before the N-th file-system change
                                                            of the 4th append (keep_latest=2)
    python file_worker.py crash-items ROOT RUN_ID N         the same with append_with_items
    python file_worker.py crash-owned ROOT RUN_ID N         append 3 with items, put one owned
                                                            item on checkpoint 2 (prints "put"),
                                                            then SIGKILL itself just before the
                                                            N-th file-system change of putting
                                                            owned_batch(2, "q") on it
    python file_worker.py crash-delete ROOT RUN_ID N        append 3, then SIGKILL itself just
                                                            before the N-th file-system change
                                                            of deleting checkpoint 1
    python file_worker.py crash-rebuild ROOT RUN_ID N       append 3, damage run.rec, then
                                                            SIGKILL itself just before the N-th
                                                            file-system change of rebuild_run

With N = 0 a crash mode kills nothing: after ``survived`` it prints ``changes=K``, the number
of file-system changes the operation made (the crash points are 1..K).

Each acknowledged append prints its sequence on a line of its own, after ``append`` returned.
Appends with items write ``items_for(sequence)`` and name ``refs_for(sequence)``: a shared item
of their own, the previous checkpoint's and one all checkpoints share, and an owned item.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec

from fastcheckpoint import _ids
from fastcheckpoint.errors import SequenceConflict
from fastcheckpoint.stores import Item, RunRecord, StoredCheckpoint
from fastcheckpoint.stores.file import FileStore
from tests._file_records import run_record


def header_for(sequence: int, worker: str) -> bytes:
    return f"header {worker} {sequence}".encode()


def payload_for(sequence: int, worker: str) -> bytes:
    """Deterministic, of varying size up to ~256 KiB, so a torn write would show."""
    size = random.Random(sequence).randrange(1 << 18)
    return worker.encode() + random.Random(f"{worker}/{sequence}").randbytes(size)


def item_value(key: str) -> bytes:
    """Deterministic, of varying size up to ~64 KiB, so a torn item would show."""
    size = random.Random(key).randrange(1 << 16)
    return key.encode() + random.Random(f"value/{key}").randbytes(size)


def refs_for(sequence: int) -> tuple[str, ...]:
    return ("b/all", *(f"b/{shared}" for shared in (sequence - 1, sequence) if shared >= 0))


def items_for(sequence: int) -> list[Item]:
    """What checkpoint ``sequence`` is appended with: the shared items it may be the first to
    name (``b/all`` is kept as first written), and one item it owns."""
    shared = [Item(key=key, value=item_value(key)) for key in ("b/all", f"b/{sequence}")]
    return [*shared, Item(key=f"w/{sequence}", value=item_value(f"w/{sequence}"), owner=sequence)]


def expected_items(sequence: int) -> dict[str, bytes]:
    """What ``read_with_items`` returns for checkpoint ``sequence`` (before owned puts)."""
    return {key: item_value(key) for key in (*refs_for(sequence), f"w/{sequence}")}


def owned_batch(sequence: int, tag: str, count: int) -> list[Item]:
    keys = [f"w/{sequence}/{tag}{index}" for index in range(count)]
    return [Item(key=key, value=item_value(key), owner=sequence) for key in keys]


_changes = itertools.count(1)
"""Numbers the calls that change the file system once ``_die_before_change`` wrapped them."""


def _die_before_change(number: int) -> None:
    """SIGKILL this process right before its ``number``-th call that changes the file system
    (never with 0: ``_survived`` then prints how many calls were made)."""

    def wrap(change: Callable[..., Any]) -> Callable[..., Any]:
        def killing(*args: Any, **kwargs: Any) -> Any:
            if next(_changes) == number:
                os.kill(os.getpid(), signal.SIGKILL)
            return change(*args, **kwargs)

        return killing

    for name in ("open", "write", "pwrite", "fsync", "fdatasync", "ftruncate", "replace",
                 "rename", "unlink", "mkdir", "rmdir"):
        setattr(os, name, wrap(getattr(os, name)))


def _survived(number: int) -> None:
    """The operation killed before its ``number``-th change returned: it made fewer."""
    print("survived", flush=True)
    if number == 0:
        print(f"changes={next(_changes) - 1}", flush=True)


async def _append_next(
    store: FileStore,
    run_id: str,
    worker: str,
    keep_latest: int | None = None,
    *,
    with_items: bool = False,
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
        if with_items:
            record = msgspec.structs.replace(record, refs=refs_for(sequence))
            await store.append_with_items(
                key, record, run=run, keep_latest=keep_latest, now=now, items=items_for(sequence)
            )
        else:
            await store.append(key, record, run=run, keep_latest=keep_latest, now=now)
    except SequenceConflict:
        return None
    return sequence


async def _crash(root: str, run_id: str, number: int, *, with_items: bool = False) -> None:
    store = FileStore(root)
    for _ in range(3):
        print(await _append_next(store, run_id, "forever", with_items=with_items), flush=True)
    _die_before_change(number)
    await _append_next(store, run_id, "forever", keep_latest=2, with_items=with_items)
    _survived(number)


async def _crash_items(root: str, run_id: str, number: int) -> None:
    await _crash(root, run_id, number, with_items=True)


async def _crash_owned(root: str, run_id: str, number: int) -> None:
    store = FileStore(root)
    for _ in range(3):
        print(await _append_next(store, run_id, "forever", with_items=True), flush=True)
    key = _ids.run_key(run_id)
    run = await store.get_run(key, now=time.time())
    assert run is not None
    owner = _ids.checkpoint_id(key, run.incarnation, 2)
    for tag, count in (("p", 1), ("q", 3)):
        if tag == "q":
            _die_before_change(number)
        assert await store.put_owned_items(
            key, owned_batch(2, tag, count), owner=2, checkpoint_id=owner, if_absent=True,
            now=time.time(),
        )
        if tag == "p":
            print("put", flush=True)
        else:
            _survived(number)


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
    _survived(number)


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


def damage_run_record(root: str, key: str) -> None:
    """Replace the run's ``run.rec`` with one whose last bytes differ: its checksum no longer
    matches."""
    record = run_record(Path(root), key)
    record.write_bytes(record.read_bytes()[:-3] + b"zzz")


async def _crash_rebuild(root: str, run_id: str, number: int) -> None:
    store = FileStore(root)
    for _ in range(3):
        print(await _append_next(store, run_id, "forever"), flush=True)
    key = _ids.run_key(run_id)
    damage_run_record(root, key)
    _die_before_change(number)
    await store.rebuild_run(key, rebuild_seed(run_id), now=time.time())
    _survived(number)


async def _main(mode: str, root: str, run_id: str, count: int, worker: str) -> None:
    crashes = {
        "crash": _crash,
        "crash-items": _crash_items,
        "crash-owned": _crash_owned,
        "crash-delete": _crash_delete,
        "crash-rebuild": _crash_rebuild,
    }
    if mode in crashes:
        await crashes[mode](root, run_id, count)
        return
    store = FileStore(root)
    appended = 0
    with_items = mode == "append-items"
    keep_latest = 3 if with_items else None
    while mode == "forever" or appended < count:
        sequence = await _append_next(store, run_id, worker, keep_latest, with_items=with_items)
        if sequence is not None:
            print(sequence, flush=True)
            appended += 1
    await store.aclose()


if __name__ == "__main__":
    mode, root, run_id = sys.argv[1:4]
    count = int(sys.argv[4]) if mode != "forever" else 0
    worker = sys.argv[5] if mode in ("append", "append-items") else "forever"
    anyio.run(_main, mode, root, run_id, count, worker)
