"""FileStore items in the run's log: every write or removal of items is one commit (one sync)
and makes no file; each process indexes a run's items by one scan of the log, then catches up
from the commits appended since, so reads answer the same after a restart, a compaction or
another process's writes; a failed commit changes nothing; a damaged entry fails the reads of
its own item only."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from fastcheckpoint.errors import (
    ConflictError,
    CorruptCheckpointError,
    SequenceConflict,
    StoreError,
)
from fastcheckpoint.stores import RunRecord
from fastcheckpoint.stores import _file_log as file_log
from fastcheckpoint.stores import file as file_store
from fastcheckpoint.stores._file_log import RUN
from fastcheckpoint.stores.file import FileStore
from fastcheckpoint.stores.memory import MemoryStore
from fastcheckpoint.testing import T0, checkpoint_id_of, key_of, make_item, make_run
from tests._file_records import (
    LogRecord,
    Process,
    all_items,
    count_calls,
    count_pread_bytes,
    fail_first_sync_while,
    forget_items,
    item_record,
    new_boot,
    snapshot,
)
from tests._file_records import append_with_refs as _append

pytestmark = pytest.mark.anyio

LOGGER = "fastcheckpoint.stores.file"


def _restart(monkeypatch: pytest.MonkeyPatch, root: Path, run_key: str) -> None:
    """A new process after a restart of the machine: no item index, no current ``idx``."""
    forget_items(root, run_key)
    new_boot(monkeypatch)


def _values(*keys: str) -> dict[str, bytes]:
    return {key: f"value-{key}".encode() for key in keys}


def _log_id(root: Path, run_key: str) -> bytes:
    return (root / "runs" / run_key / "log").read_bytes()[8:24]


async def test_every_item_write_and_removal_costs_one_sync(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Appends with items, pruning appends, owned and loose writes, deletes of items and of
    checkpoints, and a purge of expired items: one commit each (one ``fdatasync``), however
    many items it writes or removes, and no file made, renamed or removed."""
    store = FileStore(root)
    run = make_run("one-sync-items")
    key = key_of(run)
    with anyio.fail_after(30):
        first = await _append(store, run, 0)
        calls = count_calls(monkeypatch, "fsync", "fdatasync", "replace", "rename", "unlink")

        async def one_sync(operation: Awaitable[Any]) -> Any:
            calls.clear()
            result = await operation
            assert calls == ["fdatasync"]
            return result

        await one_sync(_append(store, run, 1, refs=["h/a"], items=[
            make_item("h/a"), make_item("h/a/0"), make_item("w/1", owner=1),
            make_item("w/1/x", owner=1)]))
        assert await one_sync(store.put_owned_items(
            key, [make_item("w/0", owner=0), make_item("w/0/y", owner=0)], owner=0,
            checkpoint_id=first.checkpoint_id, if_absent=False, now=T0))
        await one_sync(store.put_items(key, [
            make_item("loose"), make_item("loose/x"), make_item("e/1", expires_at=T0 + 5),
            make_item("e/2", expires_at=T0 + 5)], now=T0))
        assert await one_sync(store.delete_items(key, ["loose", "loose/x", "absent"])) == 2
        # Prunes 0 and 1: their owned items, h/a and what is nested under it.
        await one_sync(_append(store, run, 2, refs=["h/b"], keep_latest=1,
                               items=[make_item("h/b"), make_item("h/b/0")]))
        assert await all_items(store, key) == _values("e/1", "e/2", "h/b", "h/b/0")
        await _append(store, run, 3, refs=["h/c"], items=[
            make_item("h/c"), make_item("h/c/0"), make_item("w/3", owner=3)])
        assert await one_sync(store.delete(key, 3, checkpoint_id=checkpoint_id_of(run, 3)))
        await _append(store, run, 4, refs=["h/d"], expires_at=T0 + 5, items=[
            make_item("h/d"), make_item("h/d/0"), make_item("w/4", owner=4)])
        assert await one_sync(store.purge_expired(now=T0 + 5, limit=100)) == (1, True)
        assert await snapshot(store, key, now=T0 + 5) == (
            _values("h/b", "h/b/0"), {2: _values("h/b", "h/b/0")})


async def test_a_write_never_reads_back_what_it_commits(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The log view and the item index of the writer that made a commit take it in from
    memory: neither the write (its sync and ``idx`` update) nor the next one reads its
    entries back from the file, and a new process reads the same items."""
    store = FileStore(root)
    run = make_run("no-read-back")
    key = key_of(run)
    big = 256 * 1024
    values = {"h/a": os.urandom(big), "w/1": b"one", "w/1/x": os.urandom(big)}
    with anyio.fail_after(30):
        first = await _append(store, run, 0)
        assert await all_items(store, key) == {}  # this process indexes the run's items
        read = count_pread_bytes(monkeypatch)
        await _append(store, run, 1, refs=["h/a"], items=[
            make_item("h/a", values["h/a"]), make_item("w/1", values["w/1"], owner=1)])
        assert sum(read) < big // 8, read
        read.clear()
        assert await store.put_owned_items(
            key, [make_item("w/1/x", values["w/1/x"], owner=1)], owner=1,
            checkpoint_id=checkpoint_id_of(run, 1), if_absent=False, now=T0)
        assert sum(read) < big // 8, read
        read.clear()
        await _append(store, run, 2, refs=["h/a"])
        assert sum(read) < big // 8, read
        monkeypatch.undo()
        assert first.sequence == 0
        assert await all_items(store, key) == values
        forget_items(root, key)  # a new process scans the log
        assert await all_items(store, key) == values
        assert await snapshot(store, key) == (
            values, {2: {"h/a": values["h/a"]}, 1: values, 0: {}})


async def test_the_writers_item_index_takes_its_commits_as_made(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The item index of the process that commits takes in what it wrote (each item's
    metadata, the checkpoint's refs, the count of entries) without parsing the entries back,
    and holds what an index made by scanning the log holds."""
    store = FileStore(root)
    run = make_run("taken-as-made")
    key = key_of(run)
    parsed: list[int] = []
    real = file_store._read_change

    def read_change(view: Any, entry: int, at: Any, name: Any) -> Any:
        if at is not None and entry != RUN:  # an entry that holds an item or checkpoint
            parsed.append(entry)
        return real(view, entry, at, name)

    with anyio.fail_after(30):
        await _append(store, run, 0)
        await store.put_items(key, [make_item("seed")], now=T0)
        assert await all_items(store, key) == _values("seed")  # the process indexes them
        monkeypatch.setattr(file_store, "_read_change", read_change)
        await _append(store, run, 1, refs=["h/a"], items=[
            make_item("h/a"), make_item("h/a/0"), make_item("w/1", owner=1)])
        assert await store.put_owned_items(
            key, [make_item("w/1/x", owner=1)], owner=1,
            checkpoint_id=checkpoint_id_of(run, 1), if_absent=False, now=T0)
        await _append(store, run, 2, refs=["h/a"], keep_latest=1)  # prunes 0 and 1
        assert parsed == []
        monkeypatch.undo()
        seen = await snapshot(store, key)
        path = store._run_dir(key)
        made = next(index for (at, _), index in file_store._INDEXES._by_log.items()
                    if at == path)
        forget_items(root, key)  # a new process scans the log
        assert await snapshot(store, key) == seen == (
            _values("h/a", "h/a/0", "seed"), {2: _values("h/a", "h/a/0")})
        scanned = next(index for (at, _), index in file_store._INDEXES._by_log.items()
                       if at == path)
        assert (made.end, made.made, made.items, made.keys, made.owned, made.refs,
                made.counts) == (scanned.end, scanned.made, scanned.items, scanned.keys,
                                 scanned.owned, scanned.refs, scanned.counts)


async def test_items_read_the_same_after_a_restart(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new process indexes the run's items by a scan of the log: rewritten, deleted, owned,
    nested and pruned items read as they did, also once ``idx`` is gone; items written after
    the scan take new entries."""
    run = make_run("restart")
    key = key_of(run)
    run_dir = root / "runs" / key
    with anyio.fail_after(30):
        store = FileStore(root)
        await _append(store, run, 0, refs=["h/a"], items=[
            make_item("h/a"), make_item("h/a/0"), make_item("own", owner=0)])
        await store.put_items(key, [make_item("loose", b"v1")], now=T0)
        await store.put_items(key, [make_item("loose", b"v2"), make_item("gone")], now=T0)
        assert await store.delete_items(key, ["gone"]) == 1
        assert await store.put_owned_items(key, [make_item("own/1", owner=0)], owner=0,
                                           checkpoint_id=checkpoint_id_of(run, 0),
                                           if_absent=True, now=T0)
        await _append(store, run, 1, refs=["h/a", "b/1"], items=[
            make_item("b/1"), make_item("h/a/1")])
        await _append(store, run, 2, refs=["b/2"], keep_latest=2, items=[
            make_item("b/2"), make_item("w/2", owner=2)])  # prunes 0: own and own/1 go
        before = await snapshot(store, key)
        assert before == (
            {**_values("b/1", "b/2", "h/a", "h/a/0", "h/a/1"), "loose": b"v2",
             **_values("w/2")},
            {1: _values("b/1", "h/a", "h/a/0", "h/a/1"), 2: _values("b/2", "w/2")})

        for lose_idx in (False, True):
            _restart(monkeypatch, root, key)
            if lose_idx:
                (run_dir / "idx").unlink()
            assert await snapshot(FileStore(root), key) == before

        forget_items(root, key)
        await FileStore(root).put_items(key, [make_item("new"), make_item("h/a/2")], now=T0)
        _restart(monkeypatch, root, key)
        after = await snapshot(FileStore(root), key)
    assert after[0] == {**before[0], **_values("new", "h/a/2")}
    assert after[1][1] == {**before[1][1], **_values("h/a/2")}


async def test_another_process_sees_what_one_wrote(root: Path) -> None:
    """Each process's item index catches up from the commits the other appended: rewrites,
    deletions, and what a pruning append removed (owned and nested items)."""
    run = make_run("two-processes")
    key = key_of(run)
    other = Process()
    with anyio.fail_after(30):
        here = FileStore(root)
        await _append(here, run, 0, refs=["h/a"], items=[
            make_item("h/a"), make_item("h/a/0"), make_item("w/0", owner=0)])
        await here.put_items(key, [make_item("k", b"v1"), make_item("gone")], now=T0)
        assert (await snapshot(here, key))[0] == {
            **_values("h/a", "h/a/0", "w/0", "gone"), "k": b"v1"}
        with other:
            there = FileStore(root)
            assert await snapshot(there, key) == await snapshot(here, key)
            await there.put_items(key, [make_item("k", b"v2"), make_item("new")], now=T0)
            assert await there.delete_items(key, ["gone"]) == 1
            await _append(there, run, 1, refs=["b/1"], items=[make_item("b/1")],
                          keep_latest=1)
            theirs = await snapshot(there, key)
        assert theirs == ({**_values("b/1", "new"), "k": b"v2"}, {1: _values("b/1")})
        assert await snapshot(here, key) == theirs

        await here.put_items(key, [make_item("k", b"v3"), make_item("h/a")], now=T0)
        assert await here.delete_items(key, ["new"]) == 1
        await _append(here, run, 2, refs=["h/a"], items=[make_item("h/a/1")])
        mine = await snapshot(here, key)
        with other:
            assert await snapshot(there, key) == mine
    assert mine == ({**_values("b/1", "h/a", "h/a/1"), "k": b"v3"},
                    {1: _values("b/1"), 2: _values("h/a", "h/a/1")})


async def test_items_outlive_compaction(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rewriting an item leaves its old entry dead in the log, and compaction makes a new log
    without them: an item index of the old log (another process's) is made again from the new
    one, and items are read, removed and written as before."""
    run = make_run("compacted-items")
    key = key_of(run)
    log = root / "runs" / key / "log"
    other = Process()
    with anyio.fail_after(60):
        store = FileStore(root)
        await _append(store, run, 0, refs=["kept"], items=[
            make_item("kept"), make_item("kept/0"), make_item("w/0", owner=0)])
        await store.put_items(key, [make_item("gone")], now=T0)
        with other:
            assert (await snapshot(store, key))[0] == _values("gone", "kept", "kept/0", "w/0")
        old_log = _log_id(root, key)
        for round_ in range(40):
            await store.put_items(key, [make_item("big", b"%d:" % round_ + b"x" * 20_000)],
                                  now=T0)
        assert _log_id(root, key) != old_log
        assert log.stat().st_size < 300_000  # 800 KB written, most of it dead and dropped
        expected = ({**_values("gone", "kept", "kept/0", "w/0"),
                     "big": b"39:" + b"x" * 20_000}, {0: _values("kept", "kept/0", "w/0")})
        with other:
            assert await snapshot(store, key) == expected
        assert await snapshot(store, key) == expected

        assert await store.delete_items(key, ["gone"]) == 1
        await store.put_items(key, [make_item("kept/1")], now=T0)
        _restart(monkeypatch, root, key)
        found = await snapshot(FileStore(root), key)
    items = {key: value for key, value in expected[0].items() if key != "gone"}
    assert found[0] == {**items, **_values("kept/1")}
    assert found[1] == {0: _values("kept", "kept/0", "kept/1", "w/0")}


# -- failed commits ---------------------------------------------------------------------------


async def _failing_setup(store: FileStore | MemoryStore, run: RunRecord) -> None:
    """Checkpoint 0 (never expires) names ``h/a`` with two nested items, ``b/0`` and owns
    ``w/0``; checkpoint 1 (expiring) names ``h/a`` and ``h/b`` (with one nested); loose items,
    one of them expiring."""
    await _append(store, run, 0, refs=["h/a", "b/0"], items=[
        make_item("h/a"), make_item("h/a/0"), make_item("h/a/1"), make_item("b/0"),
        make_item("w/0", owner=0)])
    await _append(store, run, 1, refs=["h/a", "h/b"], expires_at=T0 + 5, items=[
        make_item("h/b"), make_item("h/b/0"), make_item("w/1", owner=1)])
    await store.put_items(key_of(run), [
        make_item("loose"), make_item("e", expires_at=T0 + 5)], now=T0)


def _operation(
    name: str, store: FileStore | MemoryStore, run: RunRecord
) -> Callable[[], Awaitable[object]]:
    key = key_of(run)
    return {
        "put_items": lambda: store.put_items(key, [
            make_item("loose", b"new"), make_item("new"), make_item("h/a/2")], now=T0),
        "put_owned_items": lambda: store.put_owned_items(
            key, [make_item("w/0", b"new", owner=0), make_item("w/0/x", owner=0)], owner=0,
            checkpoint_id=checkpoint_id_of(run, 0), if_absent=False, now=T0),
        "delete_items": lambda: store.delete_items(key, ["loose", "h/a/0", "w/1"]),
        "pruning append": lambda: _append(store, run, 2, refs=["b/2"], keep_latest=1, items=[
            make_item("b/2"), make_item("w/2", owner=2), make_item("h/a/new")]),
        "delete": lambda: store.delete(key, 0, checkpoint_id=checkpoint_id_of(run, 0)),
        "purge": lambda: store.purge_expired(now=T0 + 5, limit=100),
    }[name]


def _fail_once(monkeypatch: pytest.MonkeyPatch, fault: str, log: Path) -> list[str]:
    """Make the next commit to ``log`` fail: its ``fdatasync`` (its bytes written), or its
    ``pwrite`` (half written, then the disk full)."""
    failed: list[str] = []

    def of_log(fd: int) -> bool:
        return os.path.samestat(os.fstat(fd), os.stat(log))

    if fault == "sync":
        def fdatasync(fd: int) -> None:
            assert of_log(fd)
            failed.append(fault)
            monkeypatch.undo()
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        monkeypatch.setattr(os, "fdatasync", fdatasync)
        return failed
    real = os.pwrite

    def pwrite(fd: int, data: Any, offset: int) -> int:
        assert of_log(fd)
        if not failed:
            failed.append("half")
            return real(fd, bytes(data)[: len(data) // 2], offset)
        failed.append(fault)
        monkeypatch.undo()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", pwrite)
    return failed


@pytest.mark.parametrize("fault", ["sync", "write"])
@pytest.mark.parametrize("operation", [
    "put_items", "put_owned_items", "delete_items", "pruning append", "delete", "purge"])
async def test_a_failed_commit_changes_no_item(
    root: Path, monkeypatch: pytest.MonkeyPatch, operation: str, fault: str
) -> None:
    """The commit of an operation on items fails: the log is cut back to where it was, every
    item and checkpoint reads as before (in this process and in a new one), and the same
    operation then does what the memory store does."""
    run = make_run("failed-commit")
    key = key_of(run)
    log = root / "runs" / key / "log"
    store, memory = FileStore(root), MemoryStore()
    with anyio.fail_after(30):
        for each in (store, memory):
            await _failing_setup(each, run)
        before, size = await snapshot(store, key), log.stat().st_size
        assert before == await snapshot(memory, key)

        failed = _fail_once(monkeypatch, fault, log)
        with pytest.raises(StoreError):
            await _operation(operation, store, run)()
        assert failed == (["sync"] if fault == "sync" else ["half", "write"])
        assert log.stat().st_size == size
        assert await snapshot(store, key) == before
        forget_items(root, key)
        assert await snapshot(store, key) == before

        await _operation(operation, store, run)()
        await _operation(operation, memory, run)()
        after = await snapshot(store, key)
        assert after != before
        assert after == await snapshot(memory, key)
        forget_items(root, key)
        assert await snapshot(store, key) == after


def test_a_write_of_items_whose_sync_fails_is_never_seen_by_readers(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its commit is in the log until it is cut off again: readers of items in that window
    wait for the run's writer, then find the items as they were."""
    store = FileStore(root, fsync=False)
    run = make_run("failed-item-sync")
    key = key_of(run)
    store._translated(store._put_items, key, [make_item("k", b"old")], False, T0)
    seen: list[object] = []

    def read() -> None:
        seen.append(store._translated(store._get_items, key, ["k", "new"], T0))
        seen.append(store._translated(store._scan_items, key, "", None, 10, False, T0))

    readers = fail_first_sync_while(monkeypatch, read)
    with pytest.raises(StoreError, match="fdatasync failed"):
        store._translated(store._put_items, key, [make_item("k", b"lost"), make_item("new")],
                          False, T0)
    readers[0].join(10)
    assert seen == [{"k": b"old"}, [("k", b"old")]]
    store._translated(store._put_items, key, [make_item("k", b"retry")], False, T0)
    assert store._translated(store._get_items, key, ["k", "new"], T0) == {"k": b"retry"}


# -- damage -----------------------------------------------------------------------------------


async def test_a_damaged_item_fails_its_reads_and_scans_skip_it(
    root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bad byte in an item's value: reads of it raise naming its entry, whether this process
    indexed it before or scans the log anew; scans skip it with a warning; the other items
    read; writing it again replaces it."""
    run = make_run("damaged-item")
    key = key_of(run)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with anyio.fail_after(30):
        store = FileStore(root)
        await _append(store, run, 0, refs=["b/a", "b/b"], items=[make_item("b/a"),
                                                                  make_item("b/b")])
        await store.put_items(key, [make_item("loose")], now=T0)  # later commits follow
        record = item_record(root, key, "b/a")
        record.flip(-1)
        for restarted in (False, True):
            if restarted:
                _restart(monkeypatch, root, key)
            caplog.clear()
            with pytest.raises(CorruptCheckpointError) as caught:
                await store.get_items(key, ["b/b", "b/a"], now=T0)
            assert caught.value.key == str(record)
            with pytest.raises(CorruptCheckpointError):
                await store.read_with_items(key, sequence=0, now=T0)
            assert await store.get_items(key, ["b/b", "loose"], now=T0) == _values(
                "b/b", "loose")
            assert await all_items(store, key) == _values("b/b", "loose")
            assert f"skipping corrupt item {record}" in caplog.text
        await store.put_items(key, [make_item("b/a", b"again")], now=T0)
        found = await store.read_with_items(key, sequence=0, now=T0)
    assert found is not None
    assert found[2] == {"b/a": b"again", "b/b": b"value-b/b"}


async def test_a_scan_fills_its_page_past_a_damaged_item(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A skipped item does not count against ``limit``: a short page still means the end."""
    key = key_of(make_run("full-page"))
    caplog.set_level(logging.ERROR, logger=LOGGER)
    with anyio.fail_after(30):
        store = FileStore(root)
        for index in range(5):
            await store.put_items(key, [make_item(f"k{index}")], now=T0)
        item_record(root, key, "k1").flip(-1)
        page = await store.scan_items(key, limit=3, now=T0)
    assert [item for item, _ in page] == ["k0", "k2", "k3"]


async def test_unreadable_bytes_in_the_log_make_the_items_before_them_read_as_damaged(
    root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A commit whose entry is unreadable: the items written before it may have a newer entry
    (or a removal) there, so their reads raise and scans skip them, never their older value;
    what that commit wrote is lost; items written after it read. A damaged item is not live:
    writing it again (even ``create_only``) replaces it."""
    run = make_run("unreadable")
    key = key_of(run)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with anyio.fail_after(30):
        store = FileStore(root)
        await _append(store, run, 0, refs=["b/a"], items=[make_item("b/a")])
        await store.put_items(key, [make_item("early")], now=T0)
        await store.put_items(key, [make_item("lost")], now=T0)
        lost = item_record(root, key, "lost")
        await _append(store, run, 1, refs=["b/late"], items=[make_item("b/late")])
        lost.flip(9, envelope=True)  # its commit's first entry
        _restart(monkeypatch, root, key)

        store = FileStore(root)
        for damaged in ("b/a", "early"):
            with pytest.raises(CorruptCheckpointError, match="unreadable bytes"):
                await store.get_items(key, [damaged], now=T0)
        assert await store.get_items(key, ["lost", "b/late"], now=T0) == _values("b/late")
        assert await all_items(store, key) == _values("b/late")
        assert caplog.text.count("skipping corrupt item") == 2
        found = await store.read_with_items(key, sequence=1, now=T0)
        assert found is not None
        assert found[2] == _values("b/late")

        await store.put_items(key, [make_item("early", b"again")], create_only=True, now=T0)
        with pytest.raises(ConflictError):
            await store.put_items(key, [make_item("b/late")], create_only=True, now=T0)
        assert await all_items(store, key) == {"b/late": b"value-b/late", "early": b"again"}


async def test_an_item_entry_whose_metadata_is_unreadable_is_lost(
    root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An entry whose key cannot be read cannot be indexed: a process that scans the log
    after the damage logs the item as lost, and every other item reads."""
    run = make_run("unreadable-meta")
    key = key_of(run)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with anyio.fail_after(30):
        store = FileStore(root)
        await store.put_items(key, [make_item("a"), make_item("b"), make_item("c")], now=T0)
        await store.put_items(key, [make_item("d")], now=T0)
        record = item_record(root, key, "b")
        record.flip(file_store._PREFIX)  # the first byte of its metadata
        with pytest.raises(CorruptCheckpointError):  # indexed before the damage
            await store.get_items(key, ["b"], now=T0)
        _restart(monkeypatch, root, key)
        assert await all_items(FileStore(root), key) == _values("a", "c", "d")
        assert await store.get_items(key, ["a", "b"], now=T0) == _values("a")
    assert f"item entry {record} is unreadable; its item is lost" in caplog.text


async def _three_checkpoints_with_owned_items(store: FileStore, run: RunRecord) -> None:
    """Checkpoints 0 and 1 (expiring at ``T0 + 10``) own items, 1 also an item written after
    it; 2 names the shared item ``shared/a``, which 1 brought."""
    key = key_of(run)
    await _append(store, run, 0, items=[make_item("pending/0/a", owner=0)], expires_at=T0 + 10)
    await _append(store, run, 1, refs=["shared/a"], expires_at=T0 + 10,
                  items=[make_item("pending/1/a", owner=1), make_item("shared/a")])
    await store.put_owned_items(key, [make_item("pending/1/b", owner=1)], owner=1,
                                checkpoint_id=checkpoint_id_of(run, 1), if_absent=False, now=T0)
    await _append(store, run, 2, refs=["shared/a"])


async def _remove_checkpoint_1(store: FileStore, run: RunRecord, how: str) -> None:
    if how == "prune":  # with 0; 2 keeps the shared item
        await _append(store, run, 3, refs=["shared/a"], keep_latest=2)
    elif how == "delete":
        assert await store.delete(key_of(run), 1, checkpoint_id=checkpoint_id_of(run, 1))
    else:  # with 0, both expired
        assert (await store.purge_expired(now=T0 + 20, limit=100))[0] == 2


@pytest.mark.parametrize("how", ["prune", "delete", "expire"])
async def test_an_owned_item_whose_metadata_is_damaged_fails_its_owners_reads_and_goes_with_it(
    root: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """A pending write of checkpoint 1 whose key is damaged, seen by a process that indexes
    the log after the damage: reading 1 with its items raises naming the entry (it returned
    checkpoint 1 without it, as if complete), the other checkpoints read as before, and the
    entry goes with its owner (it stayed in the log for good)."""
    run = make_run("owned-meta")
    key = key_of(run)
    with anyio.fail_after(30):
        await _three_checkpoints_with_owned_items(FileStore(root), run)
        record = item_record(root, key, "pending/1/b")
        record.flip(file_store._PREFIX + 10)  # inside its key: "pending/1/b" -> "pending/q/b"
        _restart(monkeypatch, root, key)
        store = FileStore(root)
        with pytest.raises(CorruptCheckpointError, match="metadata is damaged") as caught:
            await store.read_with_items(key, sequence=1, now=T0)
        assert caught.value.key == str(record)
        for sequence, items in ((0, _values("pending/0/a")), (2, _values("shared/a"))):
            found = await store.read_with_items(key, sequence=sequence, now=T0)
            assert found is not None
            assert found[2] == items
        await _remove_checkpoint_1(store, run, how)
        assert not record.exists()
        assert await store.get_items(key, ["shared/a"], now=T0 + 20) == _values("shared/a")


async def test_an_item_entry_whose_metadata_is_unreadable_fails_the_reads_that_may_hold_it(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Metadata that does not decode says nothing of whose the item is: every checkpoint
    held when the entry was indexed may own or name it, so their reads with items raise;
    a checkpoint appended after reads; the entry goes once they have all gone."""
    run = make_run("undecodable-meta")
    key = key_of(run)
    with anyio.fail_after(30):
        await _three_checkpoints_with_owned_items(FileStore(root), run)
        record = item_record(root, key, "shared/a")
        record.flip(file_store._PREFIX)  # the first byte of its metadata
        _restart(monkeypatch, root, key)
        store = FileStore(root)
        for sequence in range(3):
            with pytest.raises(CorruptCheckpointError) as caught:
                await store.read_with_items(key, sequence=sequence, now=T0)
            assert caught.value.key == str(record)
        await _append(store, run, 3, items=[make_item("pending/3/a", owner=3)], keep_latest=2)
        found = await store.read_with_items(key, sequence=3, now=T0)
        assert found is not None
        assert found[2] == _values("pending/3/a")
        assert record.exists()  # checkpoint 2 may still name it
        await _append(store, run, 4, keep_latest=2)
        assert not record.exists()


def _put_byte(record: LogRecord, index: int, value: int) -> None:
    """Write ``value`` over byte ``index`` of the record's data in place in the log (its
    checksums left as they were: damage, not a write)."""
    view = file_log.open_view(str(record.run_dir))
    assert view is not None
    with view:
        at = view.find(record.key)
    assert at is not None, f"{record} is not in the log"
    with open(record.run_dir / "log", "r+b") as log:
        log.seek(at.offset + file_log._ENTRY + index)
        log.write(bytes([value]))


_OWNER_BYTE = file_store._PREFIX + 2 + len("pending/1/a")
"""Where the owner of the item ``pending/1/a`` is in its entry's data (after the array and
string markers and its key)."""


async def test_damage_that_makes_an_owned_item_name_another_held_owner_fails_its_real_owners_read(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner of checkpoint 1's item turned into 0, another held checkpoint's number: the
    metadata fails its checksum, and as it reads it names 0, which read fine without it while
    1 read without it as if complete. Only the owner is wrong when the metadata with another
    held owner passes the checksum: 1 is the owner, its read raises naming the entry, 0 reads
    its own items, and the entry goes with 1."""
    run = make_run("owner-damaged")
    key = key_of(run)
    with anyio.fail_after(30):
        await _three_checkpoints_with_owned_items(FileStore(root), run)
        record = item_record(root, key, "pending/1/a")
        assert record.read_bytes()[_OWNER_BYTE] == 1
        _put_byte(record, _OWNER_BYTE, 0)
        _restart(monkeypatch, root, key)
        store = FileStore(root)
        with pytest.raises(CorruptCheckpointError, match="metadata is damaged") as caught:
            await store.read_with_items(key, sequence=1, now=T0)
        assert caught.value.key == str(record)
        found = await store.read_with_items(key, sequence=0, now=T0)
        assert found is not None
        assert found[2] == _values("pending/0/a")
        assert await store.delete(key, 1, checkpoint_id=checkpoint_id_of(run, 1))
        assert not record.exists()


@pytest.mark.parametrize("how", ["repair", "write"])
async def test_a_damaged_owned_item_whose_owner_is_gone_blames_no_checkpoint_and_goes(
    root: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Checkpoint 1's item, its owner damaged into 0, left in the log when 1 was removed (a
    writer that did not know the entry, as before damaged entries were kept). Only held
    owners (and none) were tried against its checksum, so its owner was not found: 0's read
    raised for it, and 0 held it in the log. With 1, removed, the metadata passes: the entry
    is no held checkpoint's. 0 and 2 read as before, and the store's repair scan or the
    run's next write removes the entry."""
    run = make_run("owner-gone")
    key = key_of(run)
    with anyio.fail_after(30):
        await _three_checkpoints_with_owned_items(FileStore(root), run)
        record = item_record(root, key, "pending/1/a")
        assert record.read_bytes()[_OWNER_BYTE] == 1
        _put_byte(record, _OWNER_BYTE, 0)
        _restart(monkeypatch, root, key)
        with monkeypatch.context() as patched:
            patched.setattr(file_store._ItemIndex, "unneeded", lambda *_: [])
            store = FileStore(root)
            assert await store.delete(key, 1, checkpoint_id=checkpoint_id_of(run, 1))
        assert record.exists()
        _restart(monkeypatch, root, key)
        store = FileStore(root)
        for sequence, items in ((0, _values("pending/0/a")), (2, _values("shared/a"))):
            found = await store.read_with_items(key, sequence=sequence, now=T0)
            assert found is not None
            assert found[2] == items
        if how == "repair":
            assert await store.damaged_runs(now=T0) == []
        else:
            await _append(store, run, 3)
        assert not record.exists()
        found = await store.read_with_items(key, sequence=0, now=T0)
        assert found is not None
        assert found[2] == _values("pending/0/a")


@pytest.mark.parametrize("how", ["repair", "write"])
async def test_damage_that_makes_an_owned_item_name_a_removed_owner_still_fails_its_owners_read(
    root: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The owner of checkpoint 0's item turned into 1, removed, and a byte of its key
    damaged too: no owner makes the metadata pass its checksum, so the removed owner it
    names proves nothing. It was taken as no held checkpoint's: 0 read without it as if
    complete, and the next write (or repair) removed it. 0 and 2, held when it was indexed,
    may own it: their reads raise naming it, through writes and repairs, and the entry goes
    with the last of them."""
    run = make_run("owner-and-key")
    key = key_of(run)
    with anyio.fail_after(30):
        store = FileStore(root)
        await _three_checkpoints_with_owned_items(store, run)
        assert await store.delete(key, 1, checkpoint_id=checkpoint_id_of(run, 1))
        record = item_record(root, key, "pending/0/a")
        assert record.read_bytes()[_OWNER_BYTE] == 0
        _put_byte(record, _OWNER_BYTE, 1)
        record.flip(file_store._PREFIX + 10)  # inside its key: "pending/0/a" -> "pending/p/a"
        _restart(monkeypatch, root, key)
        store = FileStore(root)
        if how == "repair":
            assert await store.damaged_runs(now=T0) == []
        else:
            await _append(store, run, 3)
        assert record.exists()
        for sequence in (0, 2):
            with pytest.raises(CorruptCheckpointError, match="metadata is damaged") as caught:
                await store.read_with_items(key, sequence=sequence, now=T0)
            assert caught.value.key == str(record)
        assert await store.delete(key, 0, checkpoint_id=checkpoint_id_of(run, 0))
        assert record.exists()
        assert await store.delete(key, 2, checkpoint_id=checkpoint_id_of(run, 2))
        assert not record.exists()


@pytest.mark.parametrize("entry", ["run.rec", "checkpoint"])
async def test_damage_in_the_newest_commit_idx_covers_is_not_a_torn_tail(
    root: Path, entry: str
) -> None:
    """A damaged envelope in the run's newest commit, which ``idx`` covers (so it was synced
    and acknowledged), is damage, as it is anywhere else: checkpoint 2 reads as damaged
    (never as absent), a damaged ``run.rec`` refuses writes until it is repaired, and the
    commit is never cut off the log. It was taken for a torn tail: checkpoint 2 read as
    absent, the run as back at sequence 1, and the next append of 2 cut the commit off."""
    store = FileStore(root)
    seed = make_run("newest-damaged")
    key = key_of(seed)
    with anyio.fail_after(30):
        for sequence in range(3):
            await _append(store, seed, sequence, ["shared"], [make_item("shared")])
        log_path = root / "runs" / key / "log"
        checkpoint_at, run_at = _entries_of_last_commit(log_path)
        at = run_at if entry == "run.rec" else checkpoint_at
        raw = bytearray(log_path.read_bytes())
        raw[at + 20] ^= 0x01  # the envelope's data length
        log_path.write_bytes(bytes(raw))
        with Process():
            fresh = FileStore(root)
            with pytest.raises(CorruptCheckpointError):
                await fresh.get(key, 2, now=T0)
            if entry == "run.rec":
                with pytest.raises(CorruptCheckpointError, match="run record is damaged"):
                    await _append(fresh, seed, 2, ["shared"], [make_item("shared")])
                assert log_path.read_bytes() == bytes(raw)
                return
            with pytest.raises(SequenceConflict):
                await _append(fresh, seed, 2, ["shared"], [make_item("shared")])
            await _append(fresh, seed, 3, ["shared"], [make_item("shared")])
            read = await fresh.read_with_items(key, sequence=3, now=T0)
        assert read is not None
        assert read[2] == {"shared": b"value-shared"}
        assert log_path.read_bytes().startswith(bytes(raw))


def _entries_of_last_commit(log_path: Path) -> list[int]:
    """Where the envelopes of the log's newest commit are."""
    raw = log_path.read_bytes()
    view = file_log.open_view(str(log_path.parent))
    assert view is not None
    with view:
        seed = view.seed
    offset = file_log._LOG_HEADER.size
    commit: list[int] = []
    while offset < len(raw):
        envelope = file_log._envelope(raw[offset:offset + file_log._ENTRY], seed)
        assert envelope is not None
        if envelope.first:
            commit = []
        commit.append(offset)
        offset += file_log._ENTRY + envelope.size
    return commit
