"""Group commit in the file store: the writes of one run that threads of a process start
while another holds the run's lock are made by that thread, each its own commit, and synced
once; a write that fails fails alone, a sync that fails fails them all and cuts their commits
off, and no reader sees a batch's commit before its sync."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from fastcheckpoint.errors import (
    CheckpointError,
    CorruptCheckpointError,
    SequenceConflict,
    StoreError,
)
from fastcheckpoint.stores import RunRecord
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
from tests._file_records import append_plain

pytestmark = pytest.mark.anyio


def _count_syncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    synced: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return synced


async def _together(
    store: FileStore, root: Path, run_key: str, *writes: Callable[[], Awaitable[Any]]
) -> list[Any]:
    """Start ``writes`` one after another while another process holds the run's lock, each
    once the one before is queued, so that all are queued in one batch in this order (the
    first leads it, waiting for the lock); then release the lock. Each one's result or
    ``CheckpointError`` (or, from the leader, whatever aborted the batch), in order."""
    outcomes: list[Any] = [None] * len(writes)

    async def one(position: int) -> None:
        try:
            outcomes[position] = await writes[position]()
        except (CheckpointError, _Abort) as exc:
            outcomes[position] = exc

    with _lock_held_elsewhere(root, run_key) as release:
        async with anyio.create_task_group() as group:
            for position in range(len(writes)):
                group.start_soon(one, position)
                while len(_queued(store, run_key)) <= position:  # noqa: ASYNC110 (threads)
                    await anyio.sleep(0.002)
            release()
    return outcomes


def _queued(store: FileStore, run_key: str) -> list[Any]:
    batch = store._batches._open.get(run_key)
    return [] if batch is None else list(batch.queued)


async def append_with_items(store: FileStore, run: RunRecord, sequence: int) -> None:
    """A checkpoint of a run that holds an item (so the run has an item index)."""
    record = make_checkpoint(run, sequence)
    await store.append_with_items(key_of(run), record, run=run, keep_latest=None, now=T0,
                                  items=[make_item("loose")])


def _own(
    store: FileStore, run: RunRecord, owner: int, key: str
) -> Callable[[], Awaitable[bool]]:
    return lambda: store.put_owned_items(
        key_of(run), [make_item(key, owner=owner)], owner=owner,
        checkpoint_id=checkpoint_id_of(run, owner), if_absent=True, now=T0)


async def test_writes_started_together_share_one_sync(
    root: Path, store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run("together")
    key = key_of(run)
    with anyio.fail_after(30):
        await append_plain(store, run, 0)
        synced = _count_syncs(monkeypatch)
        outcomes = await _together(
            store, root, key,
            lambda: append_plain(store, run, 1),
            _own(store, run, 0, "w/0/a"),
            _own(store, run, 0, "w/0/b"),
        )
        assert outcomes == ["active", True, True]
        assert len(synced) == 1
        found = await store.read_with_items(key, sequence=0, now=T0)
        assert found is not None
        assert found[2] == {"w/0/a": b"value-w/0/a", "w/0/b": b"value-w/0/b"}
        latest = await store.latest(key, now=T0)
        assert latest is not None
        assert latest[0].checkpoint_id == checkpoint_id_of(run, 1)
    # Each was its own commit: a new process reads the same.
    other = FileStore(root)
    found = await other.read_with_items(key, sequence=0, now=T0)
    assert found is not None
    assert sorted(found[2]) == ["w/0/a", "w/0/b"]


async def test_a_write_that_fails_does_not_fail_its_batch(
    root: Path, store: FileStore
) -> None:
    run = make_run("alone")
    key = key_of(run)
    with anyio.fail_after(30):
        await append_plain(store, run, 0)
        outcomes = await _together(
            store, root, key,
            lambda: append_plain(store, run, 0),  # taken
            _own(store, run, 0, "w/0/a"),
            lambda: append_plain(store, run, 1),
        )
        assert isinstance(outcomes[0], SequenceConflict)
        assert outcomes[1:] == [True, "active"]
        assert await store.get_items(key, ["w/0/a"], now=T0) == {"w/0/a": b"value-w/0/a"}
        latest = await store.latest(key, now=T0)
        assert latest is not None
        assert latest[0].sequence == 1


async def test_a_failed_sync_fails_the_whole_batch_and_cuts_it_off(
    root: Path, store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run("cut")
    key = key_of(run)
    log = root / "runs" / key / "log"
    with anyio.fail_after(30):
        await append_with_items(store, run, 0)
        size = log.stat().st_size
        real = file_log.LogWriter._sync
        failed: list[int] = []

        def sync(writer: file_log.LogWriter, fd: int, *, data_only: bool = True) -> None:
            if not failed:
                failed.append(fd)
                raise OSError(errno.EIO, "Input/output error")
            real(writer, fd, data_only=data_only)

        monkeypatch.setattr(file_log.LogWriter, "_sync", sync)
        outcomes = await _together(
            store, root, key,
            _own(store, run, 0, "w/0/a"),
            lambda: append_plain(store, run, 1),
            _own(store, run, 0, "w/0/b"),
        )
        assert len(failed) == 1
        assert all(isinstance(outcome, StoreError) for outcome in outcomes), outcomes
        assert len({id(outcome) for outcome in outcomes}) == 3  # one error each
        assert "Input/output error" in str(outcomes[0])
        assert log.stat().st_size == size  # every commit of the batch cut off
        assert await store.get_items(key, ["w/0/a", "w/0/b"], now=T0) == {}
        latest = await store.latest(key, now=T0)
        assert latest is not None
        assert latest[0].sequence == 0
        # The store goes on: the same writes again, now synced.
        assert await append_plain(store, run, 1) == "active"
        assert await _own(store, run, 0, "w/0/a")() is True
    other = FileStore(root)
    assert await other.get_items(key, ["w/0/a", "w/0/b"], now=T0) == {"w/0/a": b"value-w/0/a"}


async def test_no_reader_sees_a_batch_commit_before_its_sync(
    root: Path, store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader whose view of the log was settled before a batch began, reading an item by
    the process's item index after the batch's second write brought the index past the
    first one's commit (not synced yet), reads again under the lock."""
    run = make_run("unsynced")
    key = key_of(run)
    with anyio.fail_after(30):
        await append_with_items(store, run, 0)
    seen: list[object] = []
    real_flush = file_log.LogWriter.flush

    def pick(index: file_store._ItemIndex) -> list[file_store._Indexed]:
        return [index.items[name] for name in ("w/0/a",) if name in index.items]

    with store._reader(key) as early:
        assert early is not None
        assert early.settled()  # its view opened before the batch

        def flush(writer: file_log.LogWriter, view: file_log.LogView | None = None) -> None:
            # Both writes are committed, unsynced, and the item index holds them.
            try:
                seen.append(early.read_items(pick))
            except file_store._Unsettled:
                seen.append("read again under the lock")
            real_flush(writer, view)

        monkeypatch.setattr(file_log.LogWriter, "flush", flush)
        with anyio.fail_after(30):
            outcomes = await _together(
                store, root, key,
                _own(store, run, 0, "w/0/a"),
                _own(store, run, 0, "w/0/b"),  # its plan brings the index past w/0/a's commit
            )
        assert outcomes == [True, True]
    assert seen == ["read again under the lock"]


def _late_hops(monkeypatch: pytest.MonkeyPatch, delay: float, *, skip: int = 1) -> None:
    """Every worker-thread hop after the first ``skip`` starts ``delay`` seconds late (a busy
    machine)."""
    asked: list[int] = []
    real = anyio.to_thread.run_sync

    async def late(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        asked.append(1)
        if len(asked) > skip:
            await anyio.sleep(delay)
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", late)


@contextmanager
def _lock_held_elsewhere(root: Path, run_key: str) -> Iterator[Callable[[], None]]:
    """Another process holds the run's lock until the yielded function is called."""
    fd: int | None = os.open(root / "locks" / run_key, os.O_RDWR | os.O_CREAT, 0o600)
    assert fd is not None
    fcntl.flock(fd, fcntl.LOCK_EX)

    def release() -> None:
        nonlocal fd
        if fd is not None:
            os.close(fd)
            fd = None

    try:
        yield release
    finally:
        release()


def _coming(store: FileStore, run_key: str) -> int:
    return store._batches._coming[run_key]


async def test_a_leader_waits_for_a_write_on_its_way(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write started while another of the run is being made joins its batch even when its
    worker thread starts late: one sync for both."""
    monkeypatch.setattr(file_store, "_BATCH_PATIENCE", 5.0)
    store = FileStore(root)
    run = make_run("on-its-way")
    key = key_of(run)
    outcomes: list[object] = []

    async def write(call: Callable[[], Awaitable[object]]) -> None:
        outcomes.append(await call())

    with anyio.fail_after(30):
        await append_plain(store, run, 0)
        synced = _count_syncs(monkeypatch)
        with _lock_held_elsewhere(root, key) as release:
            async with anyio.create_task_group() as group:
                group.start_soon(write, lambda: append_plain(store, run, 1))
                while not _queued(store, key):  # noqa: ASYNC110 (a worker thread's state)
                    await anyio.sleep(0.005)
                _late_hops(monkeypatch, 0.2, skip=0)
                group.start_soon(write, _own(store, run, 0, "w/0/a"))
                while not _coming(store, key):  # noqa: ASYNC110 (a worker thread's state)
                    await anyio.sleep(0.005)
                release()  # the leader makes its write, then waits for the one on its way
    assert sorted(map(str, outcomes)) == ["True", "active"]
    assert len(synced) == 1


async def test_a_leader_stops_waiting_for_a_write_that_will_not_come(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(file_store, "_BATCH_PATIENCE", 5.0)
    store = FileStore(root)
    run = make_run("cancelled")
    key = key_of(run)
    done: list[float] = []

    async def lead() -> None:
        assert await _own(store, run, 0, "w/0/a")() is True
        done.append(anyio.current_time())

    with anyio.fail_after(30):
        await append_plain(store, run, 0)
        with _lock_held_elsewhere(root, key) as release:
            async with anyio.create_task_group() as group:
                group.start_soon(lead)
                while not _queued(store, key):  # noqa: ASYNC110 (a worker thread's state)
                    await anyio.sleep(0.005)
                _late_hops(monkeypatch, 10.0, skip=0)
                with anyio.CancelScope() as late:
                    group.start_soon(_cancel_after, late, 0.2)
                    released = anyio.current_time()
                    release()  # the leader makes its write, then waits for the one on its way
                    await append_plain(store, run, 1)  # its hop 10 s late: cancelled at 0.2 s
    assert done[0] - released < 4.0  # not the 5 s of patience: the write went
    assert dict(store._batches._coming) == {}
    assert store._batches._open == {}
    monkeypatch.undo()
    assert await store.get_items(key, ["w/0/a"], now=T0) == {"w/0/a": b"value-w/0/a"}


async def _cancel_after(scope: anyio.CancelScope, delay: float) -> None:
    await anyio.sleep(delay)
    scope.cancel()


def _fail_first_flush(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> list[int]:
    """The next batch's sync fails with ``error``; returns a list holding one element then."""
    failed: list[int] = []
    real = file_log.LogWriter.flush

    def flush(writer: file_log.LogWriter, view: file_log.LogView | None = None) -> None:
        if not failed:
            failed.append(1)
            raise error
        real(writer, view)

    monkeypatch.setattr(file_log.LogWriter, "flush", flush)
    return failed


async def test_a_write_that_made_the_log_stands_when_the_batch_sync_fails(
    root: Path, store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's first write makes its log, synced at once: a later write of its batch whose
    sync fails does not fail it (its checkpoint is there to stay)."""
    run = make_run("first")
    key = key_of(run)
    failed = _fail_first_flush(monkeypatch, OSError(errno.EIO, "Input/output error"))
    with anyio.fail_after(30):
        outcomes = await _together(
            store, root, key,
            lambda: append_plain(store, run, 0),
            _own(store, run, 0, "w/0/a"),
        )
    assert failed == [1]
    assert outcomes[0] == "active"
    assert isinstance(outcomes[1], StoreError)
    other = FileStore(root)
    latest = await other.latest(key, now=T0)
    assert latest is not None
    assert latest[0].sequence == 0
    assert await other.get_items(key, ["w/0/a"], now=T0) == {}


@pytest.mark.parametrize("error", [
    file_log.CommitLeftInLog(None, "no errno"),
    OSError("a message without errno"),
    CorruptCheckpointError("the log changed under its writer", key="log"),
], ids=["errno-less", "bare-oserror", "corrupt"])
async def test_each_write_of_a_failed_batch_gets_an_error_of_its_own(
    root: Path, store: FileStore, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    run = make_run("errors")
    key = key_of(run)
    with anyio.fail_after(30):
        await append_with_items(store, run, 0)
        _fail_first_flush(monkeypatch, error)
        outcomes = await _together(
            store, root, key,
            _own(store, run, 0, "w/0/a"),
            lambda: append_plain(store, run, 1),
            _own(store, run, 0, "w/0/b"),
        )
    assert all(isinstance(outcome, StoreError) for outcome in outcomes), outcomes
    assert len({id(outcome) for outcome in outcomes}) == 3
    for outcome in outcomes:
        assert str(error.args[-1] if error.args else error) in str(outcome)
    latest = await store.latest(key, now=T0)
    assert latest is not None
    assert latest[0].sequence == 0


class _Abort(BaseException):
    """What no write raises of its own accord (a thread told to stop, say)."""


async def test_an_aborted_batch_hands_every_write_an_outcome_and_cuts_its_commits(
    root: Path, store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run("abort")
    key = key_of(run)
    log = root / "runs" / key / "log"
    real = store._put_owned_items

    def put_owned_items(run_key: str, items: list[Any], *args: Any) -> bool:
        if items[0].key == "w/0/b":
            raise _Abort
        return real(run_key, items, *args)

    with anyio.fail_after(30):
        await append_with_items(store, run, 0)
        size = log.stat().st_size
        monkeypatch.setattr(store, "_put_owned_items", put_owned_items)
        outcomes = await _together(
            store, root, key,
            _own(store, run, 0, "w/0/a"),
            _own(store, run, 0, "w/0/b"),
            lambda: append_plain(store, run, 1),
        )
    assert isinstance(outcomes[0], _Abort)  # the leader's
    assert all(isinstance(outcome, (_Abort, StoreError)) for outcome in outcomes), outcomes
    assert log.stat().st_size == size  # the commits made before the abort cut off
    other = FileStore(root)
    assert await other.get_items(key, ["w/0/a"], now=T0) == {}
    latest = await other.latest(key, now=T0)
    assert latest is not None
    assert latest[0].sequence == 0


async def test_a_batch_makes_its_writes_as_one_by_one(
    root: Path, store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each write of a batch sees the ones before it: a sequence taken by an earlier write of
    the batch is stamped at the next (``append_next``), and an append that keeps one
    checkpoint prunes the one the batch appended just before."""
    run = make_run("in-turn")
    key = key_of(run)

    def next_of(sequence: int, keep: int | None) -> Callable[[], Awaitable[Any]]:
        return lambda: store.append_next(
            key, make_checkpoint(run, sequence), run=run, keep_latest=keep, now=T0,
            renumber=lambda at: make_checkpoint(run, at))

    with anyio.fail_after(30):
        await append_plain(store, run, 0)
        synced = _count_syncs(monkeypatch)
        outcomes = await _together(store, root, key, next_of(1, None), next_of(1, 1))
    assert [(status, record.sequence) for status, record in outcomes] == [
        ("active", 1), ("active", 2)]
    assert len(synced) == 1
    other = FileStore(root)
    assert await other.get(key, 1, now=T0) is None  # pruned by the batch's second write
    latest = await other.latest(key, now=T0)
    assert latest is not None
    assert latest[0].sequence == 2


def test_a_write_given_up_as_its_thread_starts_is_counted_once() -> None:
    """asyncio's own cancellation of a task waiting for its worker thread (``task.cancel()``,
    ``asyncio.wait_for``) returns at once, even if the thread has just begun the write: the
    task marks it gone, then the thread joins. Counted twice, the run would stay "a write on
    its way" for good, and every batch of it would wait out the patience."""
    batches = file_store._Batches(5.0)
    coming = batches.coming("run")
    batches.gone(coming)  # the task, cancelled as the thread began
    queued = file_store._Queued(lambda: "made")
    batch = batches.join(coming, queued)  # the thread
    assert batch is not None
    assert dict(batches._coming) == {}
    assert batches.take("run", batch) == [queued]
    assert batches.take("run", batch) == []  # at once: nothing is on its way
    assert batches._open == {}
