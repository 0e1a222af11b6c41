"""FileStore items in the run's log: every item write is one commit (one sync); the item files
and markers are unsynced copies, made again from the log when ``idx`` was not written since
this boot (a crash of the machine is simulated by a new boot id and by losing, tearing or
putting back files); and a file a crash left before its commit is never taken for an item."""

from __future__ import annotations

import errno
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from fastcheckpoint.errors import StoreError
from fastcheckpoint.stores import RunRecord
from fastcheckpoint.stores import _file_log as file_log
from fastcheckpoint.stores import file as file_store
from fastcheckpoint.stores._file_log import LogWriter, open_view
from fastcheckpoint.stores.file import FileStore
from fastcheckpoint.testing import T0, key_of, make_item, make_run
from tests._file_records import append_with_refs as _append
from tests._file_records import count_calls

pytestmark = pytest.mark.anyio


class _Killed(BaseException):
    """What a ``kill -9`` at that point would leave: nothing after it runs."""


def _name(key: str) -> str:
    return file_store._item_name(key)


def _item_file(root: Path, run: RunRecord, key: str) -> Path:
    return root / "runs" / key_of(run) / "i" / _name(key)


def _kill_at_commits(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """From now on the writer dies as a ``kill -9`` would just before it commits: nothing
    after that point runs (no file is put back). Returns what lets it commit again."""
    real = FileStore._commit

    def killed(*args: Any, **kwargs: Any) -> None:
        raise _Killed

    monkeypatch.setattr(FileStore, "_commit", killed)
    monkeypatch.setattr(FileStore, "_withdraw_items", lambda *args: None)
    return lambda: monkeypatch.setattr(FileStore, "_commit", real)


def _disk_full(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def _restart(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine restarts: a new boot id, so no ``idx`` written before counts as current."""
    boot = secrets.token_bytes(16)
    monkeypatch.setattr(file_log, "_boot", lambda: boot)


async def test_every_item_write_costs_one_sync(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Appends with items, owned writes, loose writes and deletes: one commit of the log each,
    whatever the number of items, markers and directories they make."""
    store = FileStore(root)
    run = make_run("one-sync-items")
    key = key_of(run)
    with anyio.fail_after(30):
        first = await _append(store, run, 0)
        calls = count_calls(monkeypatch, "fsync", "fdatasync")
        items = [make_item("h/a"), make_item("h/a/0"), make_item("w/1", owner=1),
                 make_item("w/1/x", owner=1)]
        second = await _append(store, run, 1, refs=["h/a"], items=items)
        assert calls == ["fdatasync"]
        calls.clear()
        assert await store.put_owned_items(
            key, [make_item("w/0", owner=0), make_item("w/0/y", owner=0)], owner=0,
            checkpoint_id=first.checkpoint_id, if_absent=False, now=T0)
        assert calls == ["fdatasync"]
        calls.clear()
        await store.put_items(key, [make_item("loose"), make_item("loose/x")], now=T0)
        assert calls == ["fdatasync"]
        calls.clear()
        assert await store.delete_items(key, ["loose", "loose/x"]) == 2
        assert calls == ["fdatasync"]
        found = await store.read_with_items(key, sequence=1, now=T0)
    assert found is not None
    assert found[0].checkpoint_id == second.checkpoint_id
    assert sorted(found[2]) == ["h/a", "h/a/0", "w/1", "w/1/x"]


async def test_item_files_are_made_again_from_the_log_after_a_restart(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files written without a sync may be lost, torn or an older version after a crash of the
    machine, and a removed one may be back: the first holder of the run lock after the restart
    makes them all again from the log, and reads wait for it."""
    store = FileStore(root)
    run = make_run("restart")
    key = key_of(run)
    run_dir = root / "runs" / key
    with anyio.fail_after(30):
        await _append(store, run, 0, refs=["h/a"], items=[
            make_item("h/a"), make_item("h/a/0"), make_item("own", owner=0)])
        await store.put_items(key, [make_item("loose", b"v1")], now=T0)
        older = _item_file(root, run, "loose").read_bytes()
        await store.put_items(key, [make_item("loose", b"v2")], now=T0)
        await store.put_items(key, [make_item("gone")], now=T0)
        removed = _item_file(root, run, "gone").read_bytes()
        assert await store.delete_items(key, ["gone"]) == 1
        owned = _item_file(root, run, "own").read_bytes()

        _item_file(root, run, "h/a/0").unlink()
        _item_file(root, run, "own").write_bytes(owned[:10])
        _item_file(root, run, "loose").write_bytes(older)
        _item_file(root, run, "gone").write_bytes(removed)
        shutil.rmtree(run_dir / "o")
        shutil.rmtree(run_dir / "n")
        _restart(monkeypatch)

        fresh = FileStore(root)
        found = await fresh.read_with_items(key, sequence=None, now=T0)
        assert found is not None
        assert found[2] == {"h/a": b"value-h/a", "h/a/0": b"value-h/a/0", "own": b"value-own"}
        assert await fresh.get_items(key, ["loose", "gone"], now=T0) == {"loose": b"v2"}
        scanned = await fresh.scan_items(key, now=T0)
    assert [item for item, _ in scanned] == ["h/a", "h/a/0", "loose", "own"]
    assert _item_file(root, run, "own").read_bytes() == owned
    assert not _item_file(root, run, "gone").exists()
    view = open_view(str(run_dir))
    assert view is not None
    with view:
        assert view.current  # idx written in this boot: later reads take no lock


async def test_a_restart_before_any_reindex_reads_every_item_by_the_log(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that finds ``idx`` of an earlier boot never reads the item files as they are:
    it waits for the run lock, whose first holder makes them again."""
    store = FileStore(root)
    run = make_run("reader-restart")
    key = key_of(run)
    with anyio.fail_after(30):
        await store.put_items(key, [make_item("k", b"logged")], now=T0)
        _item_file(root, run, "k").write_bytes(b"torn")
        _restart(monkeypatch)
        assert await FileStore(root).get_items(key, ["k"], now=T0) == {"k": b"logged"}


async def test_a_writer_killed_among_its_item_files_leaves_them_to_be_made_again(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer killed after some of its item files are in place, before its commit, leaves
    ``items.state`` marked: readers keep away from the files and the next holder of the run
    lock makes them again from the log first. So the killed write never counts: a key it
    rewrote keeps its committed value (and is removed, or rewritten, for good), and the
    killed append's retry writes its item again."""
    store = FileStore(root)
    run = make_run("killed-writer")
    key = key_of(run)
    with anyio.fail_after(30):
        await _append(store, run, 0)
        await store.put_items(key, [make_item("k", b"k1"), make_item("m", b"m1")], now=T0)
        revive = _kill_at_commits(monkeypatch)
        with pytest.raises(_Killed):
            await store.put_items(key, [make_item("k", b"k2"), make_item("m", b"m2"),
                                        make_item("x", b"never committed")], now=T0)
        assert _item_file(root, run, "k").read_bytes().endswith(b"k2")  # in place, uncommitted
        with pytest.raises(_Killed):
            await _append(store, run, 1, refs=["s"], items=[make_item("s")])
        revive()

        assert await store.get_items(key, ["k", "m", "x"], now=T0) == {"k": b"k1", "m": b"m1"}
        await _append(store, run, 1, refs=["s"], items=[make_item("s")])  # the retry
        assert await store.delete_items(key, ["k"]) == 1
        await store.put_items(key, [make_item("m", b"m3")], now=T0)
        _restart(monkeypatch)
        fresh = FileStore(root)
        assert await fresh.get_items(key, ["k", "m", "x"], now=T0) == {"m": b"m3"}
        found = await fresh.read_with_items(key, sequence=1, now=T0)
    assert found is not None
    assert found[2] == {"s": b"value-s"}


async def test_a_first_write_killed_before_its_log_leaves_no_item(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first write of a run makes its log in its commit: killed before it, the files it
    placed are removed by the next holder of the lock, and never read."""
    store = FileStore(root)
    run = make_run("killed-first")
    key = key_of(run)
    with anyio.fail_after(30):
        revive = _kill_at_commits(monkeypatch)
        with pytest.raises(_Killed):
            await store.put_items(key, [make_item("ghost")], now=T0)
        revive()
        assert _item_file(root, run, "ghost").exists()
        assert await store.get_items(key, ["ghost"], now=T0) == {}
        await store.put_items(key, [make_item("real")], now=T0)
        assert await store.scan_items(key, now=T0) == [("real", b"value-real")]
        _restart(monkeypatch)
        assert await FileStore(root).scan_items(key, now=T0) == [("real", b"value-real")]
    assert not _item_file(root, run, "ghost").exists()


async def test_item_files_that_cannot_be_made_again_fail_only_reads_and_writes_of_items(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a restart, a full disk (say) that keeps the item files from being made again
    fails the operations on items, not checkpoint reads nor ``delete_run``; and readers keep
    away from the files until they are made."""
    store = FileStore(root)
    run = make_run("cannot-rebuild")
    other = make_run("deleted-anyway")
    key = key_of(run)

    with anyio.fail_after(30):
        await _append(store, run, 0, refs=["a"], items=[make_item("a")])
        await _append(store, other, 0, refs=["a"], items=[make_item("a")])
        _item_file(root, run, "a").write_bytes(b"torn")
        _restart(monkeypatch)
        fresh = FileStore(root)
        real = FileStore._write_item_files
        monkeypatch.setattr(FileStore, "_write_item_files", _disk_full)
        found = await fresh.latest(key, now=T0)
        assert found is not None
        assert found[0].sequence == 0
        assert await fresh.get_run(key, now=T0) is not None
        with pytest.raises(StoreError, match="No space"):
            await fresh.get_items(key, ["a"], now=T0)
        with pytest.raises(StoreError, match="No space"):
            await fresh.read_with_items(key, sequence=None, now=T0)
        assert await fresh.delete_run(key_of(other)) == 1
        monkeypatch.setattr(FileStore, "_write_item_files", real)
        assert await fresh.get_items(key, ["a"], now=T0) == {"a": b"value-a"}


async def test_pruning_removes_what_the_pruned_checkpoint_held_in_its_own_commit(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append that prunes a checkpoint owning items and naming the last holder of a shared
    item (and what is nested under it) still costs one sync: their entries go in its commit."""
    store = FileStore(root)
    run = make_run("prune-one-sync")
    key = key_of(run)
    with anyio.fail_after(30):
        first = await _append(store, run, 0, refs=["h"], items=[
            make_item("h"), make_item("h/0"), make_item("w", owner=0)])
        assert await store.put_owned_items(key, [make_item("w/1", owner=0)], owner=0,
                                           checkpoint_id=first.checkpoint_id, if_absent=False,
                                           now=T0)
        calls = count_calls(monkeypatch, "fsync", "fdatasync")
        await _append(store, run, 1, keep_latest=1)
        assert calls == ["fdatasync"]
        assert await store.scan_items(key, now=T0) == []
        _restart(monkeypatch)
        assert await FileStore(root).scan_items(key, now=T0) == []


async def test_a_failed_write_puts_back_the_items_it_replaced(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit that fails leaves the items as they were: replaced files are written back from
    the log, new ones removed."""
    store = FileStore(root)
    run = make_run("put-back")
    key = key_of(run)

    def failing(*args: Any, **kwargs: Any) -> bool:
        raise OSError(errno.EIO, "injected")

    with anyio.fail_after(30):
        record = await _append(store, run, 0)
        await store.put_items(key, [make_item("k", b"old")], now=T0)
        assert await store.put_owned_items(
            key, [make_item("w", b"old-w", owner=0)], owner=0,
            checkpoint_id=record.checkpoint_id, if_absent=False, now=T0)
        monkeypatch.setattr(LogWriter, "commit", failing)
        with pytest.raises(StoreError):
            await store.put_items(key, [make_item("k", b"new"), make_item("n")], now=T0)
        with pytest.raises(StoreError):
            await store.put_owned_items(
                key, [make_item("w", b"new-w", owner=0)], owner=0,
                checkpoint_id=record.checkpoint_id, if_absent=False, now=T0)
        monkeypatch.undo()
        assert await store.get_items(key, ["k", "n", "w"], now=T0) == {
            "k": b"old", "w": b"old-w"}
        _restart(monkeypatch)
        assert await FileStore(root).get_items(key, ["k", "n", "w"], now=T0) == {
            "k": b"old", "w": b"old-w"}


async def test_items_outlive_compaction_and_a_restart(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rewriting an item leaves its old entry dead in the log; compaction drops those and keeps
    the entry numbers, so the files still name their entries."""
    store = FileStore(root)
    run = make_run("compacted-items")
    key = key_of(run)
    log = root / "runs" / key / "log"
    with anyio.fail_after(60):
        await _append(store, run, 0, refs=["kept"], items=[make_item("kept")])
        for round_ in range(40):
            await store.put_items(key, [make_item("big", b"%d:" % round_ + b"x" * 20_000)],
                                  now=T0)
        assert log.stat().st_size < 300_000  # 800 KB written, most of it dead and dropped
        await store.delete_items(key, ["missing"])  # a removal after compaction finds entries
        found = await store.read_with_items(key, sequence=0, now=T0)
        assert found is not None
        assert found[2] == {"kept": b"value-kept"}
        _restart(monkeypatch)
        fresh = FileStore(root)
        values = await fresh.get_items(key, ["big", "kept"], now=T0)
    assert values["big"].startswith(b"39:")
    assert values["kept"] == b"value-kept"


async def test_cleanup_leaves_a_run_whose_item_files_cannot_be_made_again(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cleanup loop may be the first holder of a run's lock after a restart: when the
    item files cannot be made again (a full disk), it leaves the run's items alone (not
    taking the missing files for removed items, so not removing the run), and they stay
    marked until they are made."""
    store = FileStore(root)
    run = make_run("purge-cannot-rebuild")
    key = key_of(run)

    with anyio.fail_after(30):
        await store.put_items(key, [make_item("e", b"expiring", expires_at=T0 + 10)], now=T0)
        await store.put_items(key, [make_item("k", b"kept")], now=T0)
        _restart(monkeypatch)
        fresh = FileStore(root)
        real = FileStore._write_file
        monkeypatch.setattr(FileStore, "_write_file", _disk_full)
        assert await fresh.purge_expired(now=T0 + 100, limit=100) == (0, True)
        assert (root / "runs" / key).is_dir()
        assert (root / "runs" / key / "items.state").read_bytes() == b"\1"
        monkeypatch.setattr(FileStore, "_write_file", real)
        assert await fresh.get_items(key, ["e", "k"], now=T0 + 100) == {"k": b"kept"}
        assert await fresh.purge_expired(now=T0 + 100, limit=100) == (0, True)
        assert await fresh.scan_items(key, now=T0) == [("k", b"kept")]
