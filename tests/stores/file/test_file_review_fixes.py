"""FileStore against what a review found: another run's log or directory copied in over a
run's, and symbolic links in ``runs/`` and ``trash/``, and a failed create whose bytes could
not be cut off the log again."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import anyio
import pytest

from fastcheckpoint import CheckpointManager
from fastcheckpoint._ids import run_key
from fastcheckpoint.errors import CorruptCheckpointError
from fastcheckpoint.stores.file import FileStore
from fastcheckpoint.testing import T0, key_of, make_checkpoint, make_run

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
        with pytest.raises(CorruptCheckpointError, match="another run id"):
            await store.append(key, make_checkpoint(other, 1), run=other, keep_latest=None,
                               now=T0)
        assert (root / "runs" / key / "log").read_bytes() == before
        got = await store.get_run(key, now=T0)
        assert got is not None
        assert (got.run_id, got.latest_sequence) == ("A", 0)
