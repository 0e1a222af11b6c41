"""FileStore against what a review found: another run's log or directory copied in over a
run's, and symbolic links in ``runs/`` and ``trash/``, and a failed create whose bytes could
not be cut off the log again."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import anyio
import pytest

from fastcheckpoint import CheckpointManager, CheckpointStatus
from fastcheckpoint._ids import run_key
from fastcheckpoint.errors import CorruptCheckpointError, StoreError, ValidationError
from fastcheckpoint.stores import file as file_store
from fastcheckpoint.stores.file import FileStore
from fastcheckpoint.testing import T0, key_of, make_checkpoint, make_item, make_run
from tests._helpers import FakeClock, make_config

pytestmark = pytest.mark.anyio

LOGGER = "fastcheckpoint.stores.file"


def _run_dir(root: Path, run_id: str) -> Path:
    return root / "runs" / run_key(run_id)


async def _two_runs(root: Path) -> CheckpointManager:
    manager = CheckpointManager(FileStore(root))
    for i in range(3):
        await manager.create("A", state={"i": i})
    for b in range(2):
        await manager.create("B", state={"b": b})
    return manager


# -- another run's log or directory copied in --------------------------------------------------


async def test_a_log_copied_in_from_another_run_refuses_writes_and_is_reported(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(30):
        await _two_runs(root)
        a, b = _run_dir(root, "A"), _run_dir(root, "B")
        shutil.copyfile(b / "log", a / "log")  # B's log renamed in over A's
        (a / "idx").unlink()
        copied = (a / "log").read_bytes()
        store = FileStore(root)
        manager = CheckpointManager(store)
        with pytest.raises(CorruptCheckpointError):
            await manager.get_run("A")
        with pytest.raises(CorruptCheckpointError, match="another run") as refused:
            await manager.create("A", state={"i": 9})
        assert refused.value.key.endswith(f"{run_key('A')}/log:run.rec")
        assert (a / "log").read_bytes() == copied  # refused without writing
        with pytest.raises(CorruptCheckpointError):
            await manager.mark_completed("A")
        caplog.set_level(logging.WARNING, logger=LOGGER)
        listed = await manager.list_runs()
        assert [run.run_id for run in listed.runs] == ["B"]  # A skipped, not listed as B
        assert "another run" in caplog.text
        damage = await store.damaged_runs(now=T0 + 10**9)
        assert [found.run_key for found in damage] == [run_key("A")]
        reports = await manager.repair()
        assert [(report.key, report.outcome) for report in reports] == [
            (damage[0].key, "unrecoverable")]
        assert (await manager.restore("B")) is not None  # B untouched
        assert (await manager.delete_run("A")) == 0  # a damaged run can still be removed
        created = await manager.create("A", state={"i": 0})
        assert created is not None
        assert created.metadata.sequence == 0


async def test_a_directory_copied_in_as_a_new_run_is_not_taken_for_either(
    root: Path,
) -> None:
    with anyio.fail_after(30):
        manager = CheckpointManager(FileStore(root))
        await manager.create("B", state={"b": 0})
        await manager.create("B", state={"b": 1})
        shutil.copytree(_run_dir(root, "B"), _run_dir(root, "A"))  # A never existed
        manager = CheckpointManager(FileStore(root))
        with pytest.raises(CorruptCheckpointError, match="another run"):
            await manager.create("A", state={"a": 0})
        assert not list(_run_dir(root, "A").glob("tmp*"))
        listed = await manager.list_runs()
        assert [run.run_id for run in listed.runs] == ["B"]
        assert await manager.count_runs() == 1
        assert [report.outcome for report in await manager.repair()] == ["unrecoverable"]
        latest = await manager.restore("B")
        assert latest is not None
        assert latest.state == {"b": 1}


async def test_an_append_whose_seed_names_another_run_id_than_the_record_writes_nothing(
    root: Path, store: FileStore
) -> None:
    run = make_run("A")
    key = key_of(run)
    with anyio.fail_after(30):
        await store.append(key, make_checkpoint(run, 0), run=run, keep_latest=None, now=T0)
        before = (root / "runs" / key / "log").read_bytes()
        other = make_run("not A", incarnation=run.incarnation)  # as if its key were A's
        with pytest.raises(ValidationError, match="names run 'not A', whose key is another"):
            await store.append(key, make_checkpoint(other, 1), run=other, keep_latest=None,
                               now=T0)
        assert (root / "runs" / key / "log").read_bytes() == before
        got = await store.get_run(key, now=T0)
        assert got is not None
        assert (got.run_id, got.latest_sequence) == ("A", 0)


# -- symbolic links in runs/ and trash/ ---------------------------------------------------------


async def test_a_link_in_runs_to_a_directory_outside_is_skipped_by_cleanup(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("x")
    root = tmp_path / "store"
    clock = FakeClock()
    store = FileStore(root)
    manager = CheckpointManager(store, config=make_config(clock))
    link = _run_dir(root, "A")
    link.symlink_to(outside)  # a link where a run directory would be
    with anyio.fail_after(30):
        await manager.create("D", state={}, ttl_seconds=10)
        clock.advance(20)
        caplog.set_level(logging.WARNING, logger=LOGGER)
        await manager.cleanup_expired()
        await manager.cleanup_expired()  # again: nothing in trash/ stops it
        assert (outside / "precious.txt").read_text() == "x"
        assert not _run_dir(root, "D").exists()  # expiry went on for the rest of the store
        assert link.is_symlink()
        assert list((root / "trash").iterdir()) == []
        assert "symbolic link" in caplog.text
        damage = await store.damaged_runs(now=clock())
        assert [(found.run_key, found.checkpoints) for found in damage] == [(run_key("A"), 0)]
        assert [report.outcome for report in await manager.repair()] == ["unrecoverable"]
        with pytest.raises(CorruptCheckpointError, match="symbolic link"):
            await manager.restore("A")
        assert await manager.delete_run("A") == 0  # the link goes, not what it names
        assert not link.is_symlink()
        assert (outside / "precious.txt").read_text() == "x"


async def test_a_run_directory_linked_to_another_runs_is_never_written_through(
    root: Path, store: FileStore
) -> None:
    manager = CheckpointManager(store)
    with anyio.fail_after(30):
        await manager.create("B", state={"r": "B"})
        b = _run_dir(root, "B")
        before = (b / "log").read_bytes()
        _run_dir(root, "A").symlink_to(b)
        with pytest.raises(CorruptCheckpointError, match="symbolic link"):
            await manager.create("A", state={"r": "A"})
        with pytest.raises(CorruptCheckpointError, match="symbolic link"):
            await store.put_items(run_key("A"), [make_item("k")], now=T0)
        assert (b / "log").read_bytes() == before
        assert await manager.count_runs() == 1


async def test_delete_run_of_a_run_directory_linked_to_another_runs_removes_the_link_alone(
    root: Path, store: FileStore
) -> None:
    manager = CheckpointManager(store)
    with anyio.fail_after(30):
        await manager.create("B", state={"r": "B"})
        b = _run_dir(root, "B")
        before = (b / "log").read_bytes()
        _run_dir(root, "A").symlink_to(b)
        assert await manager.delete_run("A") == 0
        assert (b / "log").read_bytes() == before  # not removed through the link
        assert not _run_dir(root, "A").is_symlink()
        assert list((root / "trash").iterdir()) == []
        got = await manager.restore("B")
        assert got is not None
        assert got.state == {"r": "B"}
        created = await manager.create("A", state={"r": "A"})  # a run of its own now
        assert created is not None
        assert (b / "log").read_bytes() == before


async def test_links_in_trash_are_removed_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "precious.txt").write_text("x")
    (outside / "sub" / "deep.txt").write_text("y")
    root = tmp_path / "store"
    store = FileStore(root)
    trash = root / "trash"
    (trash / f"{'q' * 24}.0123456789abcdef").symlink_to(outside)  # an entry that is a link
    held = trash / f"{'r' * 24}.0123456789abcdef"  # a run directory holding links
    (held / "nested").mkdir(parents=True)
    (held / "log").write_bytes(b"log")
    (held / "to-outside").symlink_to(outside)
    (held / "nested" / "to-sub").symlink_to(outside / "sub")
    (trash / "stray-file").write_text("z")
    with anyio.fail_after(30):
        assert await store.purge_expired(now=T0, limit=1000) == (0, True)
    assert list(trash.iterdir()) == []
    assert (outside / "precious.txt").read_text() == "x"
    assert (outside / "sub" / "deep.txt").read_text() == "y"


async def test_an_entry_of_trash_that_cannot_be_removed_stops_no_purge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "store"
    clock = FakeClock()
    manager = CheckpointManager(FileStore(root), config=make_config(clock))
    stuck = root / "trash" / f"{'q' * 24}.0123456789abcdef"
    (stuck / "c").mkdir(parents=True)
    other = root / "trash" / f"{'r' * 24}.0123456789abcdef"
    other.mkdir()
    removing = file_store._remove_tree

    def remove(path: str, **kwargs: Any) -> None:
        if path == str(stuck):
            raise PermissionError(errno.EACCES, "injected", path)
        removing(path, **kwargs)

    monkeypatch.setattr(file_store, "_remove_tree", remove)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with anyio.fail_after(30):
        await manager.create("D", state={}, ttl_seconds=10)
        clock.advance(20)
        assert await manager.cleanup_expired() == 1
        assert await manager.cleanup_expired() == 0
    assert not _run_dir(root, "D").exists()
    assert not other.exists()
    assert stuck.exists()
    assert f"removing {stuck} failed" in caplog.text


# -- a failed write whose commit could not be cut off -------------------------------------------


def _fail(*args: object) -> None:
    raise OSError(errno.EIO, "injected")


async def test_a_create_whose_sync_and_cut_fail_is_an_outcome_unknown(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = CheckpointManager(FileStore(root))
    with anyio.fail_after(30):
        await manager.create("r", state={"i": 0})
        monkeypatch.setattr(os, "fdatasync", _fail)  # the batch's sync fails ...
        monkeypatch.setattr(os, "truncate", _fail)  # ... and so does cutting it off again
        with pytest.raises(StoreError, match=r"^outcome unknown: ") as raised:
            await manager.create("r", state={"i": 1})
        assert "before writing it again" in str(raised.value)
        monkeypatch.undo()
        # Why it is not called a failure: its commit stayed in the log, and is found.
        latest = await CheckpointManager(FileStore(root)).restore("r")
        assert latest is not None
        assert latest.state == {"i": 1}


async def test_a_status_change_whose_sync_and_cut_fail_is_an_outcome_unknown(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = CheckpointManager(FileStore(root))
    with anyio.fail_after(30):
        await manager.create("r", state={"i": 0})
        monkeypatch.setattr(os, "fdatasync", _fail)
        monkeypatch.setattr(os, "ftruncate", _fail)  # a lone commit is cut through its fd
        with pytest.raises(StoreError, match=r"^outcome unknown: "):
            await manager.mark_completed("r")
        monkeypatch.undo()
        run = await CheckpointManager(FileStore(root)).get_run("r")
        assert run is not None
        assert run.status == CheckpointStatus.COMPLETED


async def test_a_create_whose_sync_fails_but_is_cut_off_is_a_plain_failure(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = CheckpointManager(FileStore(root))
    with anyio.fail_after(30):
        await manager.create("r", state={"i": 0})
        monkeypatch.setattr(os, "fdatasync", _fail)
        with pytest.raises(StoreError) as raised:
            await manager.create("r", state={"i": 1})
        assert "outcome unknown" not in str(raised.value)
        monkeypatch.undo()
        latest = await CheckpointManager(FileStore(root)).restore("r")
        assert latest is not None
        assert latest.state == {"i": 0}
