"""The file store's reads on the event loop's thread: a read of a run this store used lately
is made there from the page cache only (``RWF_NOWAIT``), without a worker-thread hop, and is
handed to a worker thread whenever it would wait (data not cached, the run's lock, a busy
item index, a large read, a platform that cannot read so). Either way it answers the same."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest

from fastcheckpoint.stores import StoredCheckpoint
from fastcheckpoint.stores import _file_log as file_log
from fastcheckpoint.stores import file as file_store
from fastcheckpoint.stores.file import FileStore
from fastcheckpoint.testing import (
    T0,
    checkpoint_id_of,
    key_of,
    make_checkpoint,
    make_item,
    make_run,
)
from tests._file_records import Process, append_plain, append_with_refs, item_record, new_boot
from tests._helpers import count_hops

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not file_log.cached_reads_supported(),
                       reason="the platform cannot read from the page cache only"),
]

LOGGER = "fastcheckpoint.stores.file"


def _cache(
    monkeypatch: pytest.MonkeyPatch, miss: Callable[[int], OSError | None]
) -> list[int]:
    """Reads from the page cache only raise ``miss(n)`` at their ``n``-th call (from 1) when
    it is not ``None``; returns a list holding one element per such read tried."""
    tried: list[int] = []
    real = os.preadv

    def preadv(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        if flags == file_log._NOWAIT:
            tried.append(1)
            error = miss(len(tried))
            if error is not None:
                raise error
        return real(fd, buffers, offset, flags)

    monkeypatch.setattr(os, "preadv", preadv)
    return tried


def _not_cached() -> OSError:
    return BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")


def _cache_misses_after(monkeypatch: pytest.MonkeyPatch, hits: int) -> list[int]:
    """Reads from the page cache only find their data for the first ``hits`` calls, then
    would wait for the disk."""
    return _cache(monkeypatch, lambda n: _not_cached() if n > hits else None)


def _id(found: tuple[StoredCheckpoint, str] | tuple[StoredCheckpoint, str, Any] | None) -> str:
    assert found is not None
    return found[0].checkpoint_id


async def test_a_run_used_lately_is_read_without_a_hop(
    root: Path, store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run("lately")
    key = key_of(run)
    with anyio.fail_after(30):
        await append_with_refs(store, run, 0, refs=["s"], items=[make_item("s"),
                                                                 make_item("w", owner=0)])
        await append_plain(store, run, 1)
        hops = count_hops(monkeypatch)
        assert _id(await store.latest(key, now=T0)) == checkpoint_id_of(run, 1)
        assert _id(await store.get(key, 0, now=T0)) == checkpoint_id_of(run, 0)
        got = await store.read_with_items(key, sequence=0, now=T0)
        assert got is not None
        assert got[2] == {"s": b"value-s", "w": b"value-w"}
        found_run = await store.get_run(key, now=T0)
        assert found_run is not None
        assert found_run.latest_sequence == 1
        assert hops == []
        # Another process (a store of its own over the same directory) has not used the run:
        # its first read hops, the next ones do not.
        other = FileStore(root)
        assert _id(await other.latest(key, now=T0)) == checkpoint_id_of(run, 1)
        assert len(hops) == 1
        assert _id(await other.latest(key, now=T0)) == checkpoint_id_of(run, 1)
        assert len(hops) == 1


async def test_a_run_not_used_lately_is_read_in_a_worker_thread(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(file_store, "_RECENT_RUNS", 2)
    store = FileStore(root)
    runs = [make_run(f"recent-{n}") for n in range(3)]
    with anyio.fail_after(30):
        for run in runs:
            await append_plain(store, run, 0)
        hops = count_hops(monkeypatch)
        assert _id(await store.latest(key_of(runs[0]), now=T0)) == checkpoint_id_of(runs[0], 0)
        assert len(hops) == 1  # out of the last two runs used
        assert _id(await store.latest(key_of(runs[2]), now=T0)) == checkpoint_id_of(runs[2], 0)
        assert len(hops) == 1
    monkeypatch.setattr(file_store, "_RECENT_SECONDS", 0.0)
    store = FileStore(root)
    with anyio.fail_after(30):
        await append_plain(store, runs[1], 1)
        assert _id(await store.latest(key_of(runs[1]), now=T0)) == checkpoint_id_of(runs[1], 1)
        assert len(hops) == 3  # the append, and the read: used too long ago


@pytest.mark.parametrize("hits", [0, 1, 2, 3, 5])
async def test_a_read_whose_data_is_not_cached_runs_in_a_worker_thread(
    store: FileStore, monkeypatch: pytest.MonkeyPatch, hits: int
) -> None:
    run = make_run("uncached")
    key = key_of(run)
    with anyio.fail_after(30):
        await append_with_refs(store, run, 0, refs=["s"], items=[make_item("s"),
                                                                 make_item("w", owner=0)])
        await append_plain(store, run, 1)
        tried = _cache_misses_after(monkeypatch, hits)
        hops = count_hops(monkeypatch)
        found = await store.read_with_items(key, sequence=0, now=T0)
        assert found is not None
        assert _id(found) == checkpoint_id_of(run, 0)
        assert found[2] == {"s": b"value-s", "w": b"value-w"}
        latest = await store.latest(key, now=T0)
        assert latest is not None
        assert (_id(latest), latest[0].payload) == (checkpoint_id_of(run, 1),
                                                    make_checkpoint(run, 1).payload)
    assert len(tried) > hits  # each tried the cache, found it short, and went to a thread
    assert len(hops) == 2


async def test_a_platform_that_cannot_read_the_cache_only_is_not_asked_again(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run("unsupported")
    key = key_of(run)
    with anyio.fail_after(30):
        await append_plain(store, run, 0)
        tried = _cache(monkeypatch, lambda n: OSError(errno.EOPNOTSUPP, "Not supported"))
        hops = count_hops(monkeypatch)
        for _ in range(3):
            assert _id(await store.latest(key, now=T0)) == checkpoint_id_of(run, 0)
    assert len(tried) == 1
    assert len(hops) == 3


async def test_a_cached_read_never_waits_for_the_run_lock(
    root: Path, store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run("lock")
    key = key_of(run)
    with anyio.fail_after(30):
        await append_plain(store, run, 0)
        hops = count_hops(monkeypatch)
        # Another process holds the run's lock (a writer mid-commit): a settled run is read
        # all the same, at once.
        lock = os.open(root / "locks" / key, os.O_RDWR)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with anyio.fail_after(5):
                assert _id(await store.latest(key, now=T0)) == checkpoint_id_of(run, 0)
        finally:
            os.close(lock)
        assert hops == []
        # A run whose idx is not current (written before the machine restarted) is read under
        # the lock: in a worker thread, never on the loop's.
        acquired: list[threading.Thread] = []
        real = FileStore._acquire

        def acquire(path: str, blocking: bool) -> int | None:
            acquired.append(threading.current_thread())
            return real(path, blocking)

        monkeypatch.setattr(FileStore, "_acquire", staticmethod(acquire))
        new_boot(monkeypatch)
        assert _id(await store.latest(key, now=T0)) == checkpoint_id_of(run, 0)
    assert len(hops) == 1
    assert acquired
    assert threading.main_thread() not in acquired
    assert threading.current_thread() not in acquired


async def test_a_large_read_runs_in_a_worker_thread(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run("large")
    key = key_of(run)
    small, large = os.urandom(64 << 10), os.urandom(file_log._CACHED_BUDGET + 1)
    with anyio.fail_after(30):
        await append_plain(store, run, 0, payload=small)
        await append_plain(store, run, 1, payload=large)
        hops = count_hops(monkeypatch)
        found = await store.get(key, 0, now=T0)
        assert found is not None
        assert found[0].payload == small
        assert hops == []
        found = await store.latest(key, now=T0)
        assert found is not None
        assert found[0].payload == large
    assert len(hops) == 1


async def test_a_busy_item_index_hands_the_read_to_a_worker_thread(
    root: Path, store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run("busy-index")
    key = key_of(run)
    run_dir = os.path.join(os.path.abspath(root), "runs", key)  # noqa: ASYNC240
    with anyio.fail_after(30):
        await append_with_refs(store, run, 0, refs=["s"], items=[make_item("s")])
        assert await store.read_with_items(key, sequence=0, now=T0) is not None
        (index,) = [found for (path, _), found in file_store._INDEXES._by_log.items()
                    if path == run_dir]
        hops = count_hops(monkeypatch)
        index.lock.acquire()
        release = threading.Timer(0.2, index.lock.release)
        release.start()
        try:
            found = await store.read_with_items(key, sequence=0, now=T0)
        finally:
            release.join()
    assert found is not None
    assert found[2] == {"s": b"value-s"}
    assert len(hops) == 1


@pytest.mark.parametrize("handed_off", ["no", "while indexing", "once indexed"])
async def test_a_damaged_item_read_on_the_loop_warns_once(
    root: Path, store: FileStore, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, handed_off: str,
) -> None:
    """The item index takes in what a read on the loop's thread found, with its warnings,
    only once it has read every change: handed to a worker thread halfway, the read warns
    from there; handed over after, the index has the damage and nobody warns again."""
    run = make_run("damaged")
    key = key_of(run)
    with anyio.fail_after(30):
        await append_with_refs(store, run, 0, refs=["s"], items=[make_item("s")])
        # One commit: the damaged entry, then another the catch-up reads after it.
        await store.put_items(key, [make_item("loose"), make_item("zz")], now=T0)
        record = item_record(root, key, "loose")
        record.flip(file_store._FIXED.size)  # its metadata fails its checksum
        damage_read: list[int] = []
        real_meta = file_store._entry_meta

        def entry_meta(view: Any, entry: int, at: Any, where: str) -> Any:
            try:
                return real_meta(view, entry, at, where)
            finally:  # the cache misses from right after the damaged entry was read
                if where == str(record):
                    damage_read.append(1)

        def missing() -> bool:
            if handed_off == "while indexing":
                return bool(damage_read)
            return handed_off == "once indexed" and "its item is lost" in caplog.text

        missed: list[int] = []

        def miss(_: int) -> OSError | None:
            if not missing():
                return None
            missed.append(1)
            return _not_cached()

        monkeypatch.setattr(file_store, "_entry_meta", entry_meta)
        _cache(monkeypatch, miss)
        hops = count_hops(monkeypatch)
        with Process(), caplog.at_level(logging.WARNING, logger=LOGGER):
            found = await store.read_with_items(key, sequence=0, now=T0)  # indexes the run
    assert found is not None
    assert found[2] == {"s": b"value-s"}
    warnings = [line for line in caplog.messages if "its item is lost" in line]
    assert len(warnings) == 1, caplog.text
    assert warnings[0].startswith(f"file store: item entry {record} is unreadable")
    handed = handed_off != "no"
    assert (len(hops), bool(missed)) == (int(handed), handed)


async def test_a_cached_read_lets_other_tasks_run(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that needs no hop still yields to the event loop (a loop polling ``restore``
    does not starve the others), and takes a cancellation before it reads."""
    run = make_run("poll")
    key = key_of(run)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    with anyio.fail_after(30):
        await append_plain(store, run, 0)
        hops = count_hops(monkeypatch)
        async with anyio.create_task_group() as group:
            group.start_soon(ticker)
            await anyio.lowlevel.checkpoint()
            before = ticks
            for _ in range(20):
                await store.latest(key, now=T0)
            assert ticks >= before + 10
            group.cancel_scope.cancel()
        with anyio.CancelScope() as scope:
            scope.cancel()
            await store.latest(key, now=T0)
            raise AssertionError("a cancelled read went on")
    assert hops == []


async def test_a_read_while_a_worker_thread_is_busy_runs_in_a_worker_thread(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each system call of a read on the loop's thread would have to take the GIL back from
    the busy thread; the read goes to a thread of its own instead."""
    run = make_run("busy-thread")
    key = key_of(run)
    release = threading.Event()
    with anyio.fail_after(30):
        await append_plain(store, run, 0)
        async with anyio.create_task_group() as group:
            group.start_soon(anyio.to_thread.run_sync, release.wait)
            while not anyio.to_thread.current_default_thread_limiter().borrowed_tokens:  # noqa: ASYNC110
                await anyio.sleep(0.005)
            hops = count_hops(monkeypatch)
            assert _id(await store.latest(key, now=T0)) == checkpoint_id_of(run, 0)
            assert len(hops) == 1
            release.set()
        assert _id(await store.latest(key, now=T0)) == checkpoint_id_of(run, 0)
    assert len(hops) == 1
