"""FileStore with damaged, stale or tampered records: a damaged ``run.rec`` hides no checkpoint
and is rebuilt from the log, an old ``run.rec`` put back costs no checkpoint, a checkpoint file
in place is never replaced, and a file swapped in from another run reads as corrupt."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from fastcheckpoint import CheckpointManager
from fastcheckpoint.errors import (
    CheckpointNotFound,
    ConflictError,
    CorruptCheckpointError,
    SequenceConflict,
    StoreError,
)
from fastcheckpoint.stores import CheckpointStore, RunDamage, RunRecord, SupportsRepair
from fastcheckpoint.stores.file import FileStore
from fastcheckpoint.testing import (
    T0,
    DamageRunRecord,
    RepairContract,
    checkpoint_id_of,
    header_of,
    key_of,
    make_checkpoint,
    make_run,
    without_key,
)
from tests._file_records import LogRecord, checkpoint_record, new_boot, run_record
from tests._helpers import FakeClock, make_config

pytestmark = pytest.mark.anyio

LOGGER = "fastcheckpoint.stores.file"


def _payload(sequence: int) -> bytes:
    return b"payload-%d-" % sequence * 50


async def _append(
    store: FileStore,
    run: RunRecord,
    sequence: int,
    *,
    now: float = T0,
    expires_at: float | None = None,
    keep_latest: int | None = None,
    payload: bytes | None = None,
) -> None:
    payload = _payload(sequence) if payload is None else payload
    record = make_checkpoint(run, sequence, created_at=now, expires_at=expires_at, payload=payload)
    seed = msgspec.structs.replace(run, expires_at=expires_at)
    await store.append(key_of(run), record, run=seed, keep_latest=keep_latest, now=now)


async def _run_of(store: FileStore, name: str, count: int) -> RunRecord:
    seed = make_run(name)
    for sequence in range(count):
        await _append(store, seed, sequence)
    return seed


def _record(root: Path, run: RunRecord) -> LogRecord:
    return run_record(root, key_of(run))


def _checkpoint_file(root: Path, run: RunRecord, sequence: int) -> LogRecord:
    return checkpoint_record(root, key_of(run), sequence)


def _damage(path: LogRecord) -> None:
    path.write_bytes(path.read_bytes()[:-3] + b"zzz")  # the header checksum no longer matches


def _warnings(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(
        record.getMessage()
        for record in caplog.records
        if record.name == LOGGER and record.levelno >= logging.WARNING
    )


def _listing(root: Path) -> dict[str, bytes]:
    """Every file under the store's runs/ and index/, with its content: to prove nothing
    changed."""
    found: dict[str, bytes] = {}
    for top in ("runs", "index"):
        for directory, _, names in os.walk(root / top):
            for name in names:
                path = Path(directory) / name
                found[str(path.relative_to(root))] = path.read_bytes()
    return found


class TestFileStoreRepair(RepairContract):
    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[CheckpointStore]:
        store = FileStore(tmp_path)
        yield store
        with anyio.fail_after(10):
            await store.aclose()

    @pytest.fixture
    def damage_run_record(self, tmp_path: Path) -> DamageRunRecord:
        async def damage(store: CheckpointStore, run_key: str) -> None:
            _damage(run_record(tmp_path, run_key))

        return damage


# -- a damaged run record ---------------------------------------------------------------------


async def test_damaged_run_record_hides_no_checkpoint(
    root: Path, store: FileStore, caplog: pytest.LogCaptureFixture
) -> None:
    """One damaged run.rec used to make every checkpoint of its run unreadable (0 of 10)."""
    with anyio.fail_after(30):
        broken = await _run_of(store, "broken", 10)
        await _run_of(store, "fine", 3)
        key = key_of(broken)
        _damage(_record(root, broken))
        caplog.set_level(logging.WARNING, logger=LOGGER)

        readable = [await store.get(key, sequence, now=T0) for sequence in range(10)]
        assert [without_key(found[0]) for found in readable if found is not None] == [
            make_checkpoint(broken, sequence, payload=_payload(sequence)) for sequence in range(10)
        ]
        assert {found[1] for found in readable if found is not None} == {"active"}
        latest = await store.latest(key, now=T0)
        assert latest is not None
        assert (latest[0].sequence, latest[1]) == (9, "active")
        found, status = await store.headers(key, before=8, limit=3, now=T0)
        assert ([header.sequence for header in found], status) == ([7, 6, 5], "active")
        assert await store.get(key, 10, now=T0) is None
    assert f"{_record(root, broken)} is damaged (header checksum mismatch)" in _warnings(caplog)


async def test_damaged_run_record_refuses_writes_and_changes_nothing(
    root: Path, store: FileStore, caplog: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(30):
        broken = await _run_of(store, "broken", 3)
        await _run_of(store, "fine", 3)
        key = key_of(broken)
        record = _record(root, broken)
        _damage(record)
        before = _listing(root)
        caplog.set_level(logging.WARNING, logger=LOGGER)

        writes: list[Any] = [
            _append(store, broken, 3),
            store.update_run(
                key, incarnation=broken.incarnation, version=0, status="paused", data=b"", now=T0
            ),
            store.delete(key, 1, checkpoint_id=checkpoint_id_of(broken, 1)),
            store.get_run(key, now=T0),
        ]
        for write in writes:
            with pytest.raises(CorruptCheckpointError) as caught:
                await write
            assert caught.value.key == str(record)
            assert "header checksum mismatch" in str(caught.value)
            assert f"fastcheckpoint doctor --repair file://{root} RUN" in str(caught.value)
        assert _listing(root) == before

        runs, _ = await store.list_runs(status=None, limit=10, cursor=None, now=T0)
        assert [run.run_id for run in runs] == ["fine"]
        assert await store.count_runs(status=None, now=T0) == 1
        assert await store.purge_expired(now=T0, limit=100) == (0, True)
        assert _listing(root) == before
        assert f"skipping run with corrupt record {record}" in _warnings(caplog)

        # delete_run still removes a run whose record is damaged, checkpoints and all.
        assert await store.delete_run(key) == 0
        assert not record.parent.exists()
        assert await store.latest(key, now=T0) is None


async def test_damaged_runs_reports_what_can_be_rebuilt(root: Path, store: FileStore) -> None:
    assert isinstance(store, SupportsRepair)
    with anyio.fail_after(30):
        broken = await _run_of(store, "broken", 4)
        fine = await _run_of(store, "fine", 2)
        emptied = await _run_of(store, "emptied", 1)
        assert await store.damaged_runs(now=T0) == []

        _damage(_record(root, broken))
        _checkpoint_file(root, broken, 0).write_bytes(b"rot")  # corrupt ones are not counted
        await store.delete(key_of(emptied), 0, checkpoint_id=checkpoint_id_of(emptied, 0))
        _damage(_record(root, emptied))

        newest = header_of(make_checkpoint(broken, 3, payload=_payload(3)))
        expected = [
            RunDamage(
                run_key=key_of(broken),
                key=str(_record(root, broken)),
                problem="header checksum mismatch",
                checkpoints=3,
                newest=newest,
            ),
            RunDamage(
                run_key=key_of(emptied),
                key=str(_record(root, emptied)),
                problem="header checksum mismatch",
                checkpoints=0,
                newest=None,
            ),
        ]
        found = await store.damaged_runs(now=T0)
        assert sorted(found, key=lambda damage: damage.checkpoints, reverse=True) == expected
        assert await store.damaged_runs(run_key=key_of(broken), now=T0) == expected[:1]
        assert await store.damaged_runs(run_key=key_of(fine), now=T0) == []
        assert await store.damaged_runs(run_key=key_of(make_run("absent")), now=T0) == []

        with pytest.raises(CheckpointNotFound):
            await store.rebuild_run(key_of(emptied), make_run("emptied"), now=T0)
        with pytest.raises(ConflictError):
            await store.rebuild_run(key_of(fine), make_run("fine"), now=T0)


async def test_rebuild_takes_the_log_and_creates_continue(root: Path, store: FileStore) -> None:
    seed = make_run("rebuilt", data=b"approvals")
    key = key_of(seed)
    with anyio.fail_after(30):
        # Checkpoints 1..5 held (0 pruned), 3 deleted; the odd ones expire at T0 + 100.
        for sequence in range(6):
            expires_at = T0 + 100 if sequence % 2 else None
            await _append(
                store, seed, sequence, now=T0 + sequence, expires_at=expires_at, keep_latest=5
            )
        assert await store.delete(key, 3, checkpoint_id=checkpoint_id_of(seed, 3))
        await store.update_run(
            key, incarnation=seed.incarnation, version=0, status="paused", data=b"", now=T0 + 6
        )
        _damage(_record(root, seed))

        fresh = make_run("rebuilt", incarnation="", created_at=T0 + 50, data=b"rebuilt")
        rebuilt = await store.rebuild_run(key, fresh, now=T0 + 50)

        assert rebuilt == RunRecord(
            run_id="rebuilt",
            incarnation=seed.incarnation,
            status="active",
            created_at=T0 + 1,
            updated_at=T0 + 50,
            latest_sequence=5,
            checkpoint_count=4,
            expires_at=None,
            version=0,
            data=b"rebuilt",
        )
        assert await store.get_run(key, now=T0 + 50) == rebuilt
        assert await store.damaged_runs(now=T0 + 50) == []
        with pytest.raises(ConflictError):
            await store.rebuild_run(key, fresh, now=T0 + 50)
        assert await store.list_runs(status="active", limit=10, cursor=None, now=T0) == (
            [rebuilt],
            None,
        )
        assert await store.list_runs(status="paused", limit=10, cursor=None, now=T0) == ([], None)
        assert await store.count_runs(status=None, now=T0) == 1

        # The expiry index was rebuilt: purging removes exactly the two that expire.
        assert await store.purge_expired(now=T0 + 100, limit=100) == (2, True)
        found, _ = await store.headers(key, before=None, limit=10, now=T0 + 100)
        assert [header.sequence for header in found] == [4, 2]
        with pytest.raises(SequenceConflict):
            await _append(store, seed, 5, now=T0 + 100)
        await _append(store, seed, 6, now=T0 + 100, keep_latest=2)
        found, _ = await store.headers(key, before=None, limit=10, now=T0 + 100)
        assert [header.sequence for header in found] == [6, 4]
        run = await store.get_run(key, now=T0 + 100)
        assert run is not None
        assert (run.latest_sequence, run.checkpoint_count, run.status) == (6, 2, "active")
        # The marker of the damaged record (paused) went with the sweep: one marker left.
        index = root / "index"
        assert sum(len(os.listdir(index / status)) for status in os.listdir(index)) == 1


async def test_manager_restores_all_ten_and_repairs(root: Path) -> None:
    clock = FakeClock()
    manager = CheckpointManager(FileStore(root), make_config(clock))
    with anyio.fail_after(30):
        created = [await manager.create("agent", {"step": step}) for step in range(10)]
        ids = [checkpoint.checkpoint_id for checkpoint in created if checkpoint is not None]
        _damage(run_record(root, key_of(make_run("agent"))))

        restored = [await manager.restore_from(checkpoint_id) for checkpoint_id in ids]
        assert [c.state["step"] for c in restored if c is not None] == list(range(10))
        latest = await manager.restore("agent")
        assert latest is not None
        assert latest.state == {"step": 9}
        with pytest.raises(CorruptCheckpointError, match="doctor --repair"):
            await manager.create("agent", {"step": 10})

        (report,) = await manager.repair("agent")
        assert (report.run_id, report.repaired, report.checkpoints) == ("agent", True, 10)
        assert await manager.repair("agent") == []
        created_after = await manager.create("agent", {"step": 10})
        assert created_after is not None
        assert created_after.metadata.sequence == 10
        info = await manager.get_run("agent")
        assert info is not None
        assert (info.latest_sequence, info.checkpoint_count) == (10, 11)


async def test_a_log_whose_header_is_damaged_stops_no_repair_of_the_other_runs(
    root: Path,
) -> None:
    """One run's log header fails its checksum (its records cannot be read at all): the store
    wide repair reports it, unrecoverable, and rebuilds another run's damaged record. The
    listing of damaged runs raised ``CorruptCheckpointError`` for that one run, so no run of
    the store could be repaired."""
    clock = FakeClock()
    manager = CheckpointManager(FileStore(root), make_config(clock))
    with anyio.fail_after(30):
        for run_id in ("unreadable", "repairable"):
            await manager.create(run_id, {"step": 0})
        log = root / "runs" / key_of(make_run("unreadable")) / "log"
        _flip_byte(log, 20)  # inside the log id
        _damage(run_record(root, key_of(make_run("repairable"))))
        reports = {report.outcome: report for report in await manager.repair()}
    assert set(reports) == {"rebuilt", "unrecoverable"}
    assert reports["rebuilt"].run_id == "repairable"
    assert (reports["unrecoverable"].key, reports["unrecoverable"].checkpoints) == (str(log), 0)
    assert "header checksum mismatch" in reports["unrecoverable"].problem


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([byte ^ 0x40]))


async def test_missing_run_record_is_damage_not_an_empty_run(
    root: Path, store: FileStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Without run.rec the run's checkpoints used to be invisible, and purge_expired removed
    them as the leftovers of an interrupted first write; then a create adopted them, dropping
    the lost record's status and history without a report."""
    seed = await _run_of(store, "lost-record", 3)
    key = key_of(seed)
    record = _record(root, seed)
    record.unlink()
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with anyio.fail_after(30):
        assert await store.purge_expired(now=T0, limit=100) == (0, True)
        latest = await store.latest(key, now=T0)
        assert latest is not None
        assert (latest[0].sequence, latest[1]) == (2, "active")
        (damage,) = await store.damaged_runs(now=T0)
        assert (damage.run_key, damage.problem, damage.checkpoints) == (
            key,
            "run.rec is missing",
            3,
        )
        before = _listing(root)
        writes: list[Any] = [
            _append(store, seed, 3),
            _append(store, make_run("lost-record"), 0),
            store.update_run(
                key, incarnation=seed.incarnation, version=0, status="paused", data=b"", now=T0
            ),
            store.delete(key, 1, checkpoint_id=checkpoint_id_of(seed, 1)),
            store.get_run(key, now=T0),
        ]
        for write in writes:
            with pytest.raises(CorruptCheckpointError, match="doctor --repair") as caught:
                await write
            assert caught.value.key == str(record)
            assert "(run.rec is missing)" in str(caught.value)
        assert _listing(root) == before

        rebuilt = await store.rebuild_run(key, make_run("lost-record"), now=T0)
        assert (rebuilt.incarnation, rebuilt.latest_sequence) == (seed.incarnation, 2)
        await _append(store, seed, 3)
        run = await store.get_run(key, now=T0)
        assert run is not None
        assert (run.latest_sequence, run.checkpoint_count) == (3, 4)
    assert f"skipping run with corrupt record {record}" in _warnings(caplog)


async def test_a_first_create_cut_before_its_commit_counts_as_made(
    tmp_path: Path, root: Path, store: FileStore
) -> None:
    """A crash between a run's first checkpoint file and its first run.rec leaves checkpoint 0
    alone: readers see it, and the run's next create adopts it and goes on after it."""
    seed = make_run("first")
    key = key_of(seed)
    elsewhere = FileStore(tmp_path / "elsewhere")
    await _append(elsewhere, seed, 0)
    _checkpoint_file(root, seed, 0).write_bytes(
        _checkpoint_file(tmp_path / "elsewhere", seed, 0).read_bytes()
    )
    with anyio.fail_after(30):
        latest = await store.latest(key, now=T0)
        assert latest is not None
        assert (latest[0].sequence, latest[1]) == (0, "active")
        with pytest.raises(SequenceConflict) as caught:
            await _append(store, make_run("first"), 0)
        assert (caught.value.latest_sequence, caught.value.incarnation) == (0, seed.incarnation)
        await _append(store, seed, 1)
        run = await store.get_run(key, now=T0)
        assert run is not None
        assert (run.latest_sequence, run.checkpoint_count) == (1, 2)
        assert await store.damaged_runs(now=T0) == []
        assert await store.list_runs(status=None, limit=10, cursor=None, now=T0) == ([run], None)


async def test_a_restart_cut_before_its_commit_counts_as_made(
    tmp_path: Path, root: Path, store: FileStore
) -> None:
    """A run that expired starts over: its old checkpoints are removed, checkpoint 0 of the new
    incarnation is renamed into place, and a crash comes before the commit. The expired record
    must neither discard that checkpoint nor block the run."""
    first = make_run("restarted")
    key = key_of(first)
    with anyio.fail_after(30):
        for sequence in range(2):
            await _append(store, first, sequence, expires_at=T0 + 10)
        for sequence in range(2):
            _checkpoint_file(root, first, sequence).unlink()
        second = make_run("restarted")
        elsewhere = FileStore(tmp_path / "elsewhere")
        await _append(elsewhere, second, 0, now=T0 + 20)
        cut = _checkpoint_file(tmp_path / "elsewhere", second, 0).read_bytes()
        _checkpoint_file(root, second, 0).write_bytes(cut)

        # Without a seed nobody can adopt it: the cleanup loop leaves it, repair would rebuild.
        assert await store.purge_expired(now=T0 + 20, limit=100) == (0, True)
        (damage,) = await store.damaged_runs(now=T0 + 20)
        assert (damage.checkpoints, damage.newest) == (
            1,
            header_of(make_checkpoint(second, 0, created_at=T0 + 20, payload=_payload(0))),
        )
        with pytest.raises(SequenceConflict) as caught:
            await _append(store, make_run("restarted"), 0, now=T0 + 20)
        assert (caught.value.latest_sequence, caught.value.incarnation) == (0, second.incarnation)
        await _append(store, second, 1, now=T0 + 20)
        found, status = await store.headers(key, before=None, limit=10, now=T0 + 20)
        assert ([header.sequence for header in found], status) == ([1, 0], "active")
        assert await store.damaged_runs(now=T0 + 20) == []


# -- a record behind its log: an old run.rec put back, or a crash before the commit -----------


async def test_an_old_run_record_put_back_costs_no_checkpoint(root: Path) -> None:
    """Creates used to overwrite the checkpoints the old record did not know about."""
    clock = FakeClock()
    store = FileStore(root)
    manager = CheckpointManager(store, make_config(clock))
    with anyio.fail_after(30):
        ids = [await manager.create("replayed", {"step": step}) for step in range(3)]
        record = run_record(root, key_of(make_run("replayed")))
        old = record.read_bytes()
        for step in range(3, 10):
            ids.append(await manager.create("replayed", {"step": step}))
        record.write_bytes(old)

        # Readers see every checkpoint at once, a fresh manager (no cached sequence) too.
        fresh = CheckpointManager(FileStore(root), make_config(clock))
        latest = await fresh.restore("replayed")
        assert latest is not None
        assert latest.state == {"step": 9}
        created = await fresh.create("replayed", {"step": 10})
        assert created is not None
        assert created.metadata.sequence == 10
        for step, checkpoint in enumerate(ids):
            assert checkpoint is not None
            restored = await fresh.restore_from(checkpoint.checkpoint_id)
            assert restored is not None
            assert restored.state == {"step": step}
        info = await fresh.get_run("replayed")
        assert info is not None
        assert (info.latest_sequence, info.checkpoint_count) == (10, 11)


async def test_old_record_makes_the_append_conflict_with_the_true_head(
    root: Path, store: FileStore
) -> None:
    seed = await _run_of(store, "stale", 3)
    key = key_of(seed)
    old = _record(root, seed).read_bytes()
    with anyio.fail_after(30):
        for sequence in range(3, 8):
            await _append(store, seed, sequence)
        _record(root, seed).write_bytes(old)
        stale = await store.get_run(key, now=T0)
        assert stale is not None
        assert stale.latest_sequence == 2
        found, _ = await store.headers(key, before=None, limit=20, now=T0)
        assert [header.sequence for header in found] == list(range(7, -1, -1))
        got = await store.get(key, 6, now=T0)
        assert got is not None
        assert got[0].payload == _payload(6)

        with pytest.raises(SequenceConflict) as caught:
            await _append(store, seed, 3, payload=b"would overwrite 3")
        assert (caught.value.latest_sequence, caught.value.incarnation) == (7, seed.incarnation)
        await _append(store, seed, 8)
        for sequence in range(9):
            got = await store.get(key, sequence, now=T0)
            assert got is not None
            assert got[0].payload == _payload(sequence)
        run = await store.get_run(key, now=T0)
        assert run is not None
        assert (run.latest_sequence, run.checkpoint_count) == (8, 9)


async def test_old_expired_record_put_back_does_not_discard_live_checkpoints(
    root: Path, store: FileStore
) -> None:
    seed = make_run("expired-copy")
    key = key_of(seed)
    with anyio.fail_after(30):
        await _append(store, seed, 0, expires_at=T0 + 10)
        old = _record(root, seed).read_bytes()
        for sequence in range(1, 4):
            await _append(store, seed, sequence)  # these never expire
        _record(root, seed).write_bytes(old)

        # By the old record the run expired at T0 + 10: its first append would start over.
        latest = await store.latest(key, now=T0 + 20)
        assert latest is not None
        assert latest[0].sequence == 3
        with pytest.raises(SequenceConflict) as caught:
            await _append(store, make_run("expired-copy"), 0, now=T0 + 20)
        assert caught.value.latest_sequence == 3
        assert await store.purge_expired(now=T0 + 20, limit=100) == (1, True)
        found, _ = await store.headers(key, before=None, limit=10, now=T0 + 20)
        assert [header.sequence for header in found] == [3, 2, 1]


async def test_checkpoint_in_place_before_its_commit_counts_as_made(
    tmp_path: Path, root: Path, store: FileStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A crash between renaming checkpoint 3 into place and committing run.rec leaves c/…3:
    it may as well be an acknowledged checkpoint whose record is old, so it is never
    replaced. It used to be hidden, and overwritten by the next append."""
    seed = await _run_of(store, "crashed", 3)
    key = key_of(seed)
    elsewhere = FileStore(tmp_path / "elsewhere")
    with anyio.fail_after(30):
        for sequence in range(4):
            await _append(elsewhere, seed, sequence, payload=b"before the crash")
        leftover = _checkpoint_file(tmp_path / "elsewhere", seed, 3).read_bytes()
        _checkpoint_file(root, seed, 3).write_bytes(leftover)
        caplog.set_level(logging.WARNING, logger=LOGGER)

        for read in (store.get(key, 3, now=T0), store.latest(key, now=T0)):
            found = await read
            assert found is not None
            assert without_key(found[0]) == make_checkpoint(seed, 3, payload=b"before the crash")
        found_headers, _ = await store.headers(key, before=None, limit=10, now=T0)
        assert [header.sequence for header in found_headers] == [3, 2, 1, 0]

        with pytest.raises(SequenceConflict) as caught:
            await _append(store, seed, 3, payload=b"after the crash")
        assert caught.value.latest_sequence == 3
        got = await store.get(key, 3, now=T0)
        assert got is not None
        assert got[0].payload == b"before the crash"
        await _append(store, seed, 4)
        run = await store.get_run(key, now=T0)
        assert run is not None
        assert (run.latest_sequence, run.checkpoint_count) == (4, 5)
    assert "was behind its log (latest sequence 2, checkpoint 3 in place" in _warnings(caplog)


@pytest.mark.parametrize("kind", ["torn", "another run's"])
async def test_unusable_file_above_the_latest_is_invisible_and_replaced(
    root: Path, store: FileStore, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    seed = await _run_of(store, "leftover", 3)
    other = await _run_of(store, "other", 4)
    key = key_of(seed)
    whole = _checkpoint_file(root, other, 3).read_bytes()
    _checkpoint_file(root, seed, 3).write_bytes(
        whole[: len(whole) // 2] if kind == "torn" else whole
    )
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with anyio.fail_after(30):
        assert await store.get(key, 3, now=T0) is None
        latest = await store.latest(key, now=T0)
        assert latest is not None
        assert latest[0].sequence == 2
        found, _ = await store.headers(key, before=None, limit=10, now=T0)
        assert [header.sequence for header in found] == [2, 1, 0]

        await _append(store, seed, 3, payload=b"acknowledged")
        got = await store.get(key, 3, now=T0)
        assert got is not None
        assert without_key(got[0]) == make_checkpoint(seed, 3, payload=b"acknowledged")
    path = _checkpoint_file(root, seed, 3)
    assert f"{path} is no intact checkpoint of this run; its next append replaces it" in (
        _warnings(caplog)
    )


async def test_a_failed_commit_leaves_no_checkpoint_to_adopt(
    root: Path, store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller got an error and will retry: its checkpoint must not stay to be adopted as a
    duplicate of the retry."""
    seed = await _run_of(store, "commit-fails", 3)
    key = key_of(seed)
    def no_space(fd: int) -> None:  # the commit's sync: its write did not make it to disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with anyio.fail_after(30):
        monkeypatch.setattr(os, "fdatasync", no_space)
        with pytest.raises(StoreError, match="No space left"):
            await _append(store, seed, 3, payload=b"first try")
        monkeypatch.undo()

        assert not _checkpoint_file(root, seed, 3).exists()
        latest = await store.latest(key, now=T0)
        assert latest is not None
        assert latest[0].sequence == 2
        await _append(store, seed, 3, payload=b"retry")
        found, _ = await store.headers(key, before=None, limit=10, now=T0)
        assert [header.sequence for header in found] == [3, 2, 1, 0]
        got = await store.get(key, 3, now=T0)
        assert got is not None
        assert got[0].payload == b"retry"


# -- checkpoint files swapped in --------------------------------------------------------------


async def test_checkpoint_swapped_in_from_another_run_is_corrupt(root: Path) -> None:
    clock = FakeClock()
    manager = CheckpointManager(FileStore(root), make_config(clock))
    with anyio.fail_after(30):
        mine = [await manager.create("run-a", {"owner": "a"}) for _ in range(3)]
        for _ in range(3):
            await manager.create("run-b", {"owner": "b"})
        a, b = make_run("run-a"), make_run("run-b")
        # Same place in another run: the copy names run B's key.
        _checkpoint_file(root, a, 2).write_bytes(_checkpoint_file(root, b, 2).read_bytes())
        # Another place in the same run: the store refuses a file holding another sequence.
        _checkpoint_file(root, a, 1).write_bytes(_checkpoint_file(root, a, 0).read_bytes())

        with pytest.raises(CorruptCheckpointError) as caught:
            await manager.restore("run-a")
        assert str(_checkpoint_file(root, a, 2)) in str(caught.value)
        for index, path in ((2, _checkpoint_file(root, a, 2)), (1, _checkpoint_file(root, a, 1))):
            checkpoint = mine[index]
            assert checkpoint is not None
            with pytest.raises(CorruptCheckpointError) as caught:
                await manager.restore_from(checkpoint.checkpoint_id)
            assert str(path) in str(caught.value)
        first = mine[0]
        assert first is not None
        restored = await manager.restore_from(first.checkpoint_id)
        assert restored is not None
        assert restored.state == {"owner": "a"}


# -- an old record put back: what it must never destroy ---------------------------------------


@pytest.mark.parametrize("first", ["create", "cleanup"])
async def test_an_old_record_of_a_deleted_incarnation_overwrites_and_purges_nothing(
    root: Path, caplog: pytest.LogCaptureFixture, first: str
) -> None:
    """The run id was deleted and started again; then the first life's run.rec was put back.
    Its next create used to overwrite the live life's checkpoint 2 (the conflict named the old
    incarnation), and the cleanup loop, believing the old record's expiry, removed the run."""
    clock = FakeClock()
    manager = CheckpointManager(FileStore(root), make_config(clock))
    record = _record(root, make_run("reused"))
    with anyio.fail_after(30):
        for step in range(2):
            await manager.create("reused", {"life": 1, "step": step}, ttl_seconds=10)
        old = record.read_bytes()
        await manager.delete_run("reused")
        again = [await manager.create("reused", {"life": 2, "step": step}) for step in range(4)]
        record.write_bytes(old)
        clock.advance(20)  # the old record's run has expired, the live one never does
        caplog.set_level(logging.WARNING, logger=LOGGER)

        fresh = CheckpointManager(FileStore(root), make_config(clock))
        for action in [first, *{"create", "cleanup"} - {first}]:
            if action == "cleanup":
                assert await fresh.cleanup_expired() == 0
                continue
            with pytest.raises(CorruptCheckpointError, match="doctor --repair"):
                await fresh.create("reused", {"life": 2, "step": 4})
        with pytest.raises(CorruptCheckpointError, match="another incarnation"):
            await fresh.get_run("reused")
        latest = await fresh.restore("reused")
        assert latest is not None
        assert latest.state == {"life": 2, "step": 3}
        for step, checkpoint in enumerate(again):
            assert checkpoint is not None
            restored = await fresh.restore_from(checkpoint.checkpoint_id)
            assert restored is not None
            assert restored.state == {"life": 2, "step": step}

        (report,) = await fresh.repair("reused")
        assert (report.repaired, report.checkpoints) == (True, 4)
        created = await fresh.create("reused", {"life": 2, "step": 4})
        assert created is not None
        assert created.metadata.sequence == 4
        assert created.metadata.parent_id == again[3].checkpoint_id  # type: ignore[union-attr]
        second = await fresh.restore_from(again[2].checkpoint_id)  # type: ignore[union-attr]
        assert second is not None
        assert second.state == {"life": 2, "step": 2}
    assert "another incarnation" in _warnings(caplog)


@pytest.mark.parametrize("writer", ["purge", "create"])
async def test_an_old_expired_record_whose_successor_was_pruned_discards_nothing_live(
    root: Path, store: FileStore, writer: str
) -> None:
    """The checkpoint after the old record's latest was pruned, so nothing marks the record as
    behind: by its expiry the run is over. The cleanup loop used to remove the run, and a
    create to start it over, deleting the live checkpoints 3..5."""
    seed = make_run("pruned-copy")
    key = key_of(seed)
    with anyio.fail_after(30):
        await _append(store, seed, 0, expires_at=T0 + 10)
        old = _record(root, seed).read_bytes()
        for sequence in range(1, 6):
            await _append(store, seed, sequence, keep_latest=3)  # these never expire
        _record(root, seed).write_bytes(old)

        if writer == "purge":
            assert await store.purge_expired(now=T0 + 20, limit=100) == (0, True)
        else:
            with pytest.raises(SequenceConflict) as caught:
                await _append(store, make_run("pruned-copy"), 0, now=T0 + 20)
            assert (caught.value.latest_sequence, caught.value.incarnation) == (
                5,
                seed.incarnation,
            )
        found, _ = await store.headers(key, before=None, limit=10, now=T0 + 20)
        assert [header.sequence for header in found] == [5, 4, 3]
        await _append(store, seed, 6, now=T0 + 20, keep_latest=3)
        found, _ = await store.headers(key, before=None, limit=10, now=T0 + 20)
        assert [header.sequence for header in found] == [6, 5, 4]


def _zero_page(path: Path, page: int) -> None:
    with open(path, "r+b") as file:
        file.seek(page * 4096)
        file.write(bytes(4096))


@pytest.mark.parametrize("held", ["never expire", "expire, one deleted",
                                  "never expire, one deleted"])
@pytest.mark.parametrize("reboot", [False, True])
async def test_a_zeroed_page_of_idx_hides_no_checkpoint(
    root: Path, store: FileStore, monkeypatch: pytest.MonkeyPatch, held: str, reboot: bool
) -> None:
    """The second 4 KiB page of ``idx`` (the slots of checkpoints 126 to 253) filled with
    zeros, as a power loss leaves pages on some file systems (``idx`` of an earlier boot is
    not used), or damage in this boot: a zeroed slot of a checkpoint ``run.rec`` knows to be
    held is damage to ``idx``, never a deleted checkpoint. Every checkpoint reads, the newest
    is restored, listings hold them all, and the next create continues after them; repair
    and cleanup find nothing to do. In this boot they read as absent (``latest`` gave 125);
    never-expiring ones still did after a deletion inside the run's range (``run.rec`` did not
    list its gaps)."""
    seed = make_run("zeroed-idx")
    key = key_of(seed)
    expires_at = None if held.startswith("never expire") else T0 + 100
    with anyio.fail_after(60):
        for sequence in range(200):
            await _append(store, seed, sequence, expires_at=expires_at)
        kept = set(range(200))
        if held.endswith("one deleted"):
            assert await store.delete(key, 150, checkpoint_id=checkpoint_id_of(seed, 150))
            kept.remove(150)
        _zero_page(root / "runs" / key / "idx", 1)
        if reboot:
            new_boot(monkeypatch)
        fresh = FileStore(root)
        read = {sequence for sequence in range(200)
                if await fresh.get(key, sequence, now=T0) is not None}
        latest = await fresh.latest(key, now=T0)
        listed, _ = await fresh.headers(key, before=None, limit=300, now=T0)
        assert await fresh.damaged_runs(now=T0) == []
        assert await fresh.purge_expired(now=T0, limit=100) == (0, True)
        await _append(fresh, seed, 200, expires_at=expires_at)
        found = await fresh.get(key, 199, now=T0)
    assert read == kept
    assert latest is not None
    assert latest[0].sequence == 199
    assert {header.sequence for header in listed} == kept
    assert found is not None
