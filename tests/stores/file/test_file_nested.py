"""FileStore's nested items beyond their contract: the nesting markers on disk, what a read
and a removal list and read, removals that fail half-way and are finished later."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from fastcheckpoint.errors import StoreError
from fastcheckpoint.stores import RunRecord
from fastcheckpoint.stores import file as file_store
from fastcheckpoint.stores.file import FileStore
from fastcheckpoint.testing import (
    T0,
    checkpoint_id_of,
    key_of,
    make_item,
    make_run,
)
from tests._file_records import append_with_refs as _append

pytestmark = pytest.mark.anyio

LOGGER = "fastcheckpoint.stores.file"


async def _items_of(store: FileStore, run: RunRecord, sequence: int | None) -> dict[str, bytes]:
    found = await store.read_with_items(key_of(run), sequence=sequence, now=T0)
    assert found is not None
    return found[2]


def _keys_in(root: Path, run: RunRecord, directory: str) -> set[str]:
    """The keys named by the files of ``runs/<run key>/<directory>/`` (``i``: items in place,
    ``n``: nesting markers)."""
    path = root / "runs" / key_of(run) / directory
    keys = (file_store._key_of_name(name) for name in os.listdir(path)) if path.exists() else ()
    return {key for key in keys if key is not None}


def _values(*keys: str) -> dict[str, bytes]:
    return {key: f"value-{key}".encode() for key in keys}


def _failing_unlink(monkeypatch: pytest.MonkeyPatch, refuse: Callable[[str], bool]) -> list[str]:
    """Make ``os.unlink`` fail with EIO on the paths ``refuse`` picks."""
    refused: list[str] = []
    real = os.unlink

    def failing(path: Any, *args: Any, **kwargs: Any) -> None:
        if refuse(os.fsdecode(path)):
            refused.append(os.fsdecode(path))
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)
        real(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", failing)
    return refused


def _counting(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    """Record the directories a ``_Dir`` lists and the items it reads."""
    listed: list[str] = []
    read: list[str] = []
    real_item, real_listdir = file_store._Dir.item, file_store._Dir.listdir

    def item(self: Any, name: str, *, whole: bool) -> Any:
        read.append(name)
        return real_item(self, name, whole=whole)

    def listdir(self: Any, relative: str) -> list[str]:
        listed.append(relative)
        return real_listdir(self, relative)

    monkeypatch.setattr(file_store._Dir, "item", item)
    monkeypatch.setattr(file_store._Dir, "listdir", listdir)
    return listed, read


# -- markers ----------------------------------------------------------------------------------


async def test_only_keys_that_are_items_get_a_nesting_marker(root: Path, store: FileStore) -> None:
    """Keys like ``w/<sequence>/<task>/<index>`` or ``b/<sequence>/<index>`` name no item at
    their prefixes and leave no marker behind; an item's key (or a key a checkpoint names)
    gets one when an item is written under it, and loses it with its item."""
    run = make_run("markers")
    with anyio.fail_after(30):
        await _append(store, run, 0, ["b/0/1", "h/a"], [
            make_item("b/0/1"), make_item("w/0/t/1", owner=0),
            make_item("h/a"), make_item("h/a/1"), make_item("h/a/1/x")])
        assert _keys_in(root, run, "n") == {"h/a", "h/a/1"}

        await _append(store, run, 1, keep_latest=1)
        assert _keys_in(root, run, "i") == set()
        assert _keys_in(root, run, "n") == set()


async def test_items_put_under_a_loose_item_are_nested_under_it_once_it_is_shared(
    store: FileStore,
) -> None:
    run = make_run("put-first")
    key = key_of(run)
    with anyio.fail_after(30):
        await store.put_items(key, [make_item("h/a")], now=T0)
        await store.put_items(key, [make_item("h/a/0")], now=T0)
        await _append(store, run, 0, ["h/a"])
        assert await store.put_owned_items(key, [make_item("h/a/owned", owner=0)], owner=0,
                                           checkpoint_id=checkpoint_id_of(run, 0),
                                           if_absent=True, now=T0)
        assert await _items_of(store, run, 0) == _values("h/a", "h/a/0", "h/a/owned")

        await _append(store, run, 1, keep_latest=1)
        assert await store.scan_items(key, prefix="h/", now=T0) == []


# -- costs ------------------------------------------------------------------------------------


async def test_a_read_lists_the_markers_of_its_refs_and_reads_each_nested_item_once(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run("read-cost")
    key = key_of(run)
    with anyio.fail_after(60):
        await store.put_items(key, [make_item(f"other/{index}") for index in range(50)], now=T0)
        # h/a/000 is a ref nested under the ref h/a, with an item nested under it.
        await _append(store, run, 0, ["h/a", "h/b", "c/1", "h/a/000"], [
            make_item("h/a"), make_item("h/b"), make_item("c/1"), make_item("w/0", owner=0),
            *[make_item(f"h/a/{index:03}") for index in range(60)], make_item("h/a/000/x"),
            *[make_item(f"h/b/{index:03}") for index in range(40)]])
        listed, read = _counting(monkeypatch)
        found = await _items_of(store, run, 0)
    assert len(found) == 4 + 101
    assert found["h/a/000/x"] == b"value-h/a/000/x"
    # The run's items (50 others among them) are never listed: each ref with nested items
    # lists its own markers, which hold everything under it at any depth.
    assert listed == [f"o/{0:020d}",
                      *(f"n/{file_store._item_name(key)}" for key in ("h/a", "h/b", "h/a/000"))]
    assert len(read) == len(set(read)) == 4 + 101


async def test_refs_without_nested_items_cost_no_listing(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading, and dropping, shared items with nothing nested under them lists no items,
    even in a run that holds an anchor with many nested items."""
    run = make_run("plain-refs")
    with anyio.fail_after(60):
        await _append(store, run, 0, ["h/log", "b/0"], [
            make_item("h/log"), make_item("b/0"),
            *[make_item(f"h/log/{index:03}") for index in range(100)]])
        await _append(store, run, 1, ["b/1"], [make_item("b/1")])
        listed, _ = _counting(monkeypatch)
        assert await _items_of(store, run, 1) == _values("b/1")
        await _append(store, run, 2, ["h/log", "b/2"], [make_item("b/2")], keep_latest=2)
        assert listed == [f"o/{1:020d}"]

        await _append(store, run, 3, ["b/3"], [make_item("b/3")], keep_latest=1)
        # The removal of h/log's nested items lists its markers, not the run's items: once to
        # remove their entries in the append's commit, once to unlink their files after it.
        assert listed[1:] == [f"n/{file_store._item_name('h/log')}"] * 2
        monkeypatch.undo()
        assert await store.scan_items(key_of(run), prefix="h/", now=T0) == []


async def test_deleted_nested_items_take_their_markers_along(
    root: Path, store: FileStore
) -> None:
    """A log's writer removes the parts it merged with ``delete_items``: their markers go
    too, so reads keep listing only what is there."""
    run = make_run("deleted-nested")
    with anyio.fail_after(30):
        await _append(store, run, 0, ["h/a"], [make_item("h/a"), make_item("h/a/0"),
                                               make_item("h/a/1"), make_item("h/a/1/x")])
        markers = root / "runs" / key_of(run) / "n" / file_store._item_name("h/a")
        assert {file_store._key_of_name(name) for name in os.listdir(markers)} == {
            "h/a/0", "h/a/1", "h/a/1/x"}
        assert await store.delete_items(key_of(run), ["h/a/0", "h/a/1/x"]) == 2
        assert {file_store._key_of_name(name) for name in os.listdir(markers)} == {"h/a/1"}
        assert await _items_of(store, run, 0) == _values("h/a", "h/a/1")


async def test_markers_a_crash_left_aside_are_made_again(root: Path, store: FileStore) -> None:
    """A key's first markers are made in ``n/.k<K>`` and renamed into place: a crash before
    the rename leaves that aside, and the next write under the key starts it over."""
    run = make_run("aside")
    key = key_of(run)
    with anyio.fail_after(30):
        await store.put_items(key, [make_item("h/a/early")], now=T0)  # not nested: no h/a
        await store.put_items(key, [make_item("h/a")], now=T0)
        assert _keys_in(root, run, "n") == set()
        aside = root / "runs" / key / "n" / ("." + file_store._item_name("h/a"))
        aside.mkdir(parents=True)
        (aside / "left by a crash").touch()
        await _append(store, run, 0, ["h/a"], [make_item("h/a/0")])
        assert not aside.exists()
        assert _keys_in(root, run, "n") == {"h/a"}
        assert await _items_of(store, run, 0) == _values("h/a", "h/a/early", "h/a/0")


# -- removals that fail half-way --------------------------------------------------------------


async def test_a_nested_item_whose_unlink_failed_is_removed_by_purge(
    root: Path, store: FileStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    run = make_run("nested-unlink-fails")
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with anyio.fail_after(30):
        await _append(store, run, 0, ["h/a"], [make_item("h/a"), make_item("h/a/0"),
                                               make_item("h/a/1")])
        stuck = file_store._item_name("h/a/1")
        refused = _failing_unlink(monkeypatch, lambda path: path.endswith(f"/i/{stuck}"))

        await _append(store, run, 1, keep_latest=1)

        assert refused
        monkeypatch.undo()
        assert "failed after the commit" in caplog.text
        assert _keys_in(root, run, "i") == {"h/a/1"}
        assert _keys_in(root, run, "n") == {"h/a"}  # the removal is unfinished
        assert await store.purge_expired(now=T0, limit=100) == (0, True)
    assert _keys_in(root, run, "i") == set()
    assert _keys_in(root, run, "n") == set()


async def test_a_dropped_anchor_written_again_starts_with_nothing_nested(
    root: Path, store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nested items a failed unlink left are removed before the key is written again; if
    that fails again, the append fails and writes nothing."""
    run = make_run("anchor-again")
    with anyio.fail_after(30):
        await _append(store, run, 0, ["h/a"], [make_item("h/a"), make_item("h/a/0")])
        stuck = file_store._item_name("h/a/0")
        _failing_unlink(monkeypatch, lambda path: path.endswith(f"/i/{stuck}"))
        await _append(store, run, 1, keep_latest=1)

        with pytest.raises(StoreError, match="nested under 'h/a'"):
            await _append(store, run, 2, ["h/a"], [make_item("h/a", b"new"),
                                                   make_item("h/a/1")])
        assert await store.get(key_of(run), 2, now=T0) is None
        assert _keys_in(root, run, "i") == {"h/a/0"}

        monkeypatch.undo()
        await _append(store, run, 2, ["h/a"], [make_item("h/a", b"new"), make_item("h/a/1")])
        assert await _items_of(store, run, 2) == {"h/a": b"new", "h/a/1": b"value-h/a/1"}


async def test_put_items_of_a_dropped_anchor_removes_what_was_nested_under_it(
    root: Path, store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run("put-anchor-again")
    with anyio.fail_after(30):
        await _append(store, run, 0, ["h/a"], [make_item("h/a"), make_item("h/a/0")])
        stuck = file_store._item_name("h/a/0")
        _failing_unlink(monkeypatch, lambda path: path.endswith(f"/i/{stuck}"))
        await _append(store, run, 1, keep_latest=1)
        monkeypatch.undo()

        await store.put_items(key_of(run), [make_item("h/a", b"loose")], now=T0)
        assert _keys_in(root, run, "i") == {"h/a"}
        await _append(store, run, 2, keep_latest=1)
        assert await store.purge_expired(now=T0, limit=100) == (0, True)
        assert await store.get_items(key_of(run), ["h/a"], now=T0) == {"h/a": b"loose"}


# -- layout -----------------------------------------------------------------------------------


async def test_markers_are_in_place_before_the_items(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileStore(root)
    run = make_run("marker-order")
    marker = root / "runs" / key_of(run) / "n" / file_store._item_name("h/a")
    nested = file_store._item_name("h/a/0")
    seen: list[tuple[str, bool]] = []
    real = FileStore._write_file

    def write_file(self: FileStore, run_key: str, target: str, data: bytes) -> None:
        seen.append((os.path.basename(target), (marker / nested).exists()))
        real(self, run_key, target, data)

    monkeypatch.setattr(FileStore, "_write_file", write_file)
    with anyio.fail_after(30):
        await _append(store, run, 0, ["h/a"], [make_item("h/a"), make_item("h/a/0")])
    assert (nested, True) in seen
    assert all(marked for _, marked in seen)


async def test_a_foreign_file_among_nested_items_is_skipped_and_logged(
    root: Path, store: FileStore, caplog: pytest.LogCaptureFixture
) -> None:
    run = make_run("foreign-nested")
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with anyio.fail_after(30):
        await _append(store, run, 0, ["h/a"], [make_item("h/a"), make_item("h/a/0")])
        name = file_store._item_name("h/a/0")
        run_dir = root / "runs" / key_of(run)
        (run_dir / "i" / (name[:-1] + "~")).write_text("not an item")
        assert await _items_of(store, run, 0) == _values("h/a", "h/a/0")  # never looked at
        assert "skipping foreign file" not in caplog.text
        # Marked as nested under h/a (by hand: the store never marks a foreign name).
        (run_dir / "n" / file_store._item_name("h/a") / (name[:-1] + "~")).touch()
        assert await _items_of(store, run, 0) == _values("h/a", "h/a/0")
    assert "skipping foreign file" in caplog.text
