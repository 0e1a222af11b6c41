"""FileStore's adapter capabilities beyond their contracts: the label index on disk, reference
counts of shared items kept exact through failures and rebuilt runs (they are the checkpoint
records' refs), what reads and appends cost, and hostile keys and labels contained."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from fastcheckpoint.errors import CorruptCheckpointError, StoreError
from fastcheckpoint.stores import CheckpointHeader, RunRecord
from fastcheckpoint.stores._file_log import RUN, LogView, Record
from fastcheckpoint.stores.file import FileStore
from fastcheckpoint.testing import (
    T0,
    checkpoint_id_of,
    key_of,
    make_item,
    make_run,
    without_key,
)
from tests._file_records import all_items, count_item_reads, forget_items, run_record
from tests._file_records import append_with_refs as _append

pytestmark = pytest.mark.anyio


def _labelled(name: str, *labels: str) -> RunRecord:
    return msgspec.structs.replace(make_run(name), labels=labels)


async def _items_of(store: FileStore, run: RunRecord, sequence: int | None) -> dict[str, bytes]:
    found = await store.read_with_items(key_of(run), sequence=sequence, now=T0)
    assert found is not None
    return found[2]


def _label_markers(root: Path) -> dict[str, list[str]]:
    index = root / "index"
    return {
        name: sorted(os.listdir(index / name)) for name in os.listdir(index) if name[0] == "l"
    }


def _assert_inside(root: Path) -> None:
    for directory, subdirectories, names in os.walk(root):
        for name in subdirectories + names:
            path = Path(directory) / name
            assert path.resolve().is_relative_to(root.resolve()), path
            assert not path.is_symlink(), path


# -- labels -----------------------------------------------------------------------------------

HOSTILE_LABELS = ("../../etc/passwd", "nul\x00byte", "é" * 128, "x" * 256, "/", "thread:1")


async def test_labels_are_markers_inside_the_root_and_leave_with_the_run(
    root: Path, store: FileStore
) -> None:
    run = _labelled("hostile-labels", *HOSTILE_LABELS)
    expiring = _labelled("expiring", "thread:1")
    with anyio.fail_after(30):
        await _append(store, run, 0)
        await _append(store, expiring, 0, expires_at=T0 + 10)
        markers = _label_markers(root)
        assert len(markers) == len(HOSTILE_LABELS)
        assert sorted(map(len, markers.values())) == [1] * 5 + [2]
        _assert_inside(root)
        for label in HOSTILE_LABELS:
            page, cursor = await store.runs_with_label(label, limit=10, cursor=None, now=T0)
            shared = {"expiring"} if label == "thread:1" else set()
            assert {found.run_id for found in page} == {"hostile-labels", *shared}
            assert cursor is None

        assert await store.delete_run(key_of(run)) == 1
        assert sorted(map(len, _label_markers(root).values())) == [0] * 5 + [1]
        assert await store.purge_expired(now=T0 + 10, limit=100) == (1, True)
    assert _label_markers(root) == {}  # emptied label directories go too


async def test_a_new_life_moves_the_label_markers(root: Path, store: FileStore) -> None:
    first = _labelled("reborn", "old", "both")
    second = _labelled("reborn", "new", "both")
    with anyio.fail_after(30):
        await _append(store, first, 0, expires_at=T0 + 5)
        await _append(store, second, 0, now=T0 + 5)
        for label, expected in (("old", []), ("new", ["reborn"]), ("both", ["reborn"])):
            page, _ = await store.runs_with_label(label, limit=10, cursor=None, now=T0 + 6)
            assert [found.run_id for found in page] == expected
    assert sorted(map(len, _label_markers(root).values())) == [0, 1, 1]


async def test_a_stale_label_marker_is_skipped_and_swept(root: Path, store: FileStore) -> None:
    """What a crash between a run's first markers and its commit leaves."""
    run = _labelled("stale", "thread:s")
    with anyio.fail_after(30):
        await _append(store, run, 0)
        ((directory, [marker]),) = _label_markers(root).items()
        ghost = marker[:21] + "q" * 24
        (root / "index" / directory / ghost).touch()

        page, _ = await store.runs_with_label("thread:s", limit=1, cursor=None, now=T0)
        assert [found.run_id for found in page] == ["stale"]
        assert await store.purge_expired(now=T0, limit=100) == (0, True)
    assert _label_markers(root) == {directory: [marker]}


# -- shared items: exact through failures -----------------------------------------------------


async def test_refs_are_kept_and_returned_by_every_read(store: FileStore) -> None:
    run = make_run("refs")
    key = key_of(run)
    with anyio.fail_after(30):
        record = await _append(store, run, 0, ["b/x", "b/y"], [make_item("b/x"),
                                                                make_item("b/y")])
        got, latest = await store.get(key, 0, now=T0), await store.latest(key, now=T0)
        read = await store.read_with_items(key, sequence=None, now=T0)
        headers, _ = await store.headers(key, before=None, limit=10, now=T0)
    assert got is not None
    assert latest is not None
    assert read is not None
    for found in (got[0], latest[0], read[0]):
        assert without_key(found) == record
    assert [type(header) for header in headers] == [CheckpointHeader]


async def test_a_failed_append_leaves_no_item_and_keeps_the_shared_ones(
    root: Path, store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append whose commit fails writes none of its items and leaves the shared item it
    names as it was, in this process and in a new one."""
    run = make_run("failed-append")
    with anyio.fail_after(30):
        await _append(store, run, 0, ["b/a"], [make_item("b/a")])
        refused: list[int] = []

        def failing(fd: int) -> None:  # the commit's sync
            refused.append(fd)
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        monkeypatch.setattr(os, "fdatasync", failing)
        with pytest.raises(StoreError):
            await _append(store, run, 1, ["b/a", "b/new"],
                          [make_item("b/a", b"other"), make_item("b/new"),
                           make_item("w/1", owner=1)])
        assert len(refused) == 1
        monkeypatch.undo()
        for restarted in (False, True):
            if restarted:
                forget_items(root, key_of(run))
            assert await all_items(store, key_of(run)) == {"b/a": b"value-b/a"}
            assert await store.get(key_of(run), 1, now=T0) is None
            assert await _items_of(store, run, 0) == {"b/a": b"value-b/a"}

        await _append(store, run, 1, ["b/a", "b/new"], [make_item("b/new")])
        assert await _items_of(store, run, 1) == {"b/a": b"value-b/a", "b/new": b"value-b/new"}


async def test_a_new_life_writes_its_own_shared_items(root: Path, store: FileStore) -> None:
    """An expired run started over drops the earlier life's shared items, so a key written
    again (versions count from 1 in each life) holds this life's value."""
    first, second = make_run("lives"), make_run("lives")
    with anyio.fail_after(30):
        await _append(store, first, 0, ["b/1"], [make_item("b/1", b"first life")],
                      expires_at=T0 + 5)
        await _append(store, second, 0, ["b/1"], [make_item("b/1", b"second life")],
                      now=T0 + 5)
        found = await store.read_with_items(key_of(second), sequence=0, now=T0 + 5)
    assert found is not None
    assert found[2] == {"b/1": b"second life"}


@pytest.mark.parametrize("damage", ["damaged", "lost"])
async def test_a_rebuilt_run_keeps_its_labels_and_exact_counts(
    root: Path, store: FileStore, damage: str
) -> None:
    """A damaged or lost run.rec is rebuilt from the checkpoint records: their labels come
    back, though the manager's seed has none, and the shared items' counts (the records'
    refs) stay exact: pruning then drops exactly what no held checkpoint names."""
    run = _labelled("rebuilt", "thread:r")
    key = key_of(run)
    record = run_record(root, key)
    with anyio.fail_after(30):
        for sequence in range(3):
            await _append(store, run, sequence, ["b/all", f"b/{sequence}"],
                          [make_item("b/all"), make_item(f"b/{sequence}")])
        if damage == "damaged":
            record.write_bytes(record.read_bytes()[:-3] + b"zzz")
        else:
            record.unlink()
        with pytest.raises(CorruptCheckpointError):
            await _append(store, run, 3)
        [found] = await store.damaged_runs(now=T0)
        assert found.checkpoints == 3

        seed = msgspec.structs.replace(make_run("rebuilt"), labels=())
        rebuilt = await store.rebuild_run(key, seed, now=T0)

        assert rebuilt.labels == ("thread:r",)
        page, _ = await store.runs_with_label("thread:r", limit=10, cursor=None, now=T0)
        assert [found.run_id for found in page] == ["rebuilt"]
        assert await _items_of(store, run, 1) == {"b/all": b"value-b/all", "b/1": b"value-b/1"}
        await _append(store, rebuilt, 3, ["b/all"], keep_latest=1)
        assert await store.purge_expired(now=T0, limit=100) == (0, True)
        assert await all_items(store, key) == {"b/all": b"value-b/all"}


# -- costs ------------------------------------------------------------------------------------


async def test_run_rec_stays_small_however_many_shared_items_the_run_holds(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 2,000 shared items named by 100 checkpoints, run.rec is as small as with none (the
    counts are the checkpoint records' refs, counted by the item index), so an append writes
    no more; and get, latest, get_run, headers and read_with_items read at most 4 KiB of
    it."""
    store = FileStore(root, fsync=False)
    run = make_run("many-shared")
    key = key_of(run)
    with anyio.fail_after(60):
        await _append(store, run, 0, ["b/0/0"], [make_item("b/0/0")])
        first = len(run_record(root, key).read_bytes())
        for sequence in range(1, 100):
            keys = [f"b/{sequence}/{index}" for index in range(20)]
            await _append(store, run, sequence, keys, [make_item(key) for key in keys])
        size = len(run_record(root, key).read_bytes())
        assert size <= first + 16  # the latest sequence and times take a few bytes more
        read: list[int] = []
        real = LogView.read_sized

        def counting(
            view: LogView, key: int, limit: int | None = None, **options: Any
        ) -> Record | None:
            found = real(view, key, limit, **options)
            if key == RUN and found is not None:
                read.append(len(found.data))
            return found

        monkeypatch.setattr(LogView, "read_sized", counting)
        await store.get(key, 50, now=T0)
        await store.latest(key, now=T0)
        await store.get_run(key, now=T0)
        await store.headers(key, before=None, limit=5, now=T0)
        await store.read_with_items(key, sequence=None, now=T0)
    assert read
    assert max(read) <= 4096


async def test_read_with_items_reads_what_the_checkpoint_owns_and_names(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each item the checkpoint owns (appended or put later) or names is read once, and none
    of the run's other items."""
    run = make_run("o-owned-plus-refs")
    key = key_of(run)
    with anyio.fail_after(30):
        await store.put_items(key, [make_item(f"other/{index}") for index in range(100)], now=T0)
        await _append(store, run, 0, ["b/a", "b/b", "b/c"],
                      [make_item("b/a"), make_item("b/b"), make_item("b/c"),
                       make_item("w/0", owner=0)])
        assert await store.put_owned_items(key, [make_item("w/1", owner=0)], owner=0,
                                           checkpoint_id=checkpoint_id_of(run, 0),
                                           if_absent=True, now=T0)
        read = count_item_reads(monkeypatch)
        found = await store.read_with_items(key, sequence=0, now=T0)
    assert found is not None
    assert sorted(found[2]) == ["b/a", "b/b", "b/c", "w/0", "w/1"]
    assert sorted(read) == ["b/a", "b/b", "b/c", "w/0", "w/1"]


async def test_hostile_item_keys_in_refs_make_no_file(root: Path, store: FileStore) -> None:
    """Items are entries of the run's log: whatever their keys, the run's directory holds its
    log and ``idx`` only, and the items read back, also in a new process, until pruned."""
    hostile = ["../x", "/etc/passwd", "nul\x00byte", "..", "\U0001f600" * 32, "new\nline",
               "../x/..", "/etc/passwd/../../y"]
    run = make_run("hostile-refs")
    run_dir = root / "runs" / key_of(run)
    with anyio.fail_after(30):
        await _append(store, run, 0, hostile,
                      [make_item(key, owner=0 if index % 2 else None)
                       for index, key in enumerate(hostile)])
        expected = {key: f"value-{key}".encode() for key in hostile}
        assert await _items_of(store, run, 0) == expected
        assert sorted(os.listdir(run_dir)) == ["idx", "log"]
        forget_items(root, key_of(run))
        assert await _items_of(store, run, 0) == expected
        await _append(store, run, 1, keep_latest=1)
        assert await store.purge_expired(now=T0, limit=100) == (0, True)
        assert await all_items(store, key_of(run)) == {}
    _assert_inside(root)
    assert sorted(os.listdir(run_dir)) == ["idx", "log"]
