"""SQLiteStore: a run row that contradicts its checkpoints in expiry or count never costs a
live checkpoint (a create refuses or prunes within the newest ``keep_latest``, the cleanup
leaves the run), and a checkpoint that names no items is pruned in O(1) in a run whose other
checkpoints name some."""

from __future__ import annotations

import contextlib
import functools
import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from fastcheckpoint.errors import CorruptCheckpointError
from fastcheckpoint.stores import RunRecord
from fastcheckpoint.stores import _sqlite_steps as steps
from fastcheckpoint.stores.sqlite import SQLiteStore
from fastcheckpoint.testing import (
    T0,
    checkpoint_id_of,
    key_of,
    make_checkpoint,
    make_item,
    make_run,
)

pytestmark = pytest.mark.anyio

LATER = T0 + 100


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "checkpoints.db")
    yield store
    with anyio.fail_after(10):
        await store.aclose()


def _query(database: Path, sql: str, *parameters: Any) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        return db.execute(sql, parameters).fetchall()


async def _sql(store: SQLiteStore, sql: str, *parameters: Any) -> list[tuple[Any, ...]]:
    return await anyio.to_thread.run_sync(_query, store.path, sql, *parameters)


async def _append(
    store: SQLiteStore,
    run: RunRecord,
    sequence: int,
    *,
    now: float = T0,
    expires_at: float | None = None,
    keep_latest: int | None = None,
    refs: tuple[str, ...] = (),
    items: tuple[str, ...] = (),
) -> None:
    record = msgspec.structs.replace(
        make_checkpoint(run, sequence, created_at=now, expires_at=expires_at), refs=refs
    )
    seed = msgspec.structs.replace(run, expires_at=expires_at)
    await store.append_with_items(
        key_of(run),
        record,
        run=seed,
        keep_latest=keep_latest,
        now=now,
        items=[make_item(key) for key in items],
    )


async def _held(store: SQLiteStore, run: RunRecord, now: float = T0) -> list[int]:
    found, _ = await store.headers(key_of(run), before=None, limit=100, now=now)
    return [header.sequence for header in found]


# -- a run row that says the run expires before its newest checkpoint -------------------------


@pytest.mark.parametrize("edit", ["expired", "expires before the newest"])
async def test_a_row_edited_to_expire_before_its_checkpoints_is_damage_never_a_fresh_start(
    store: SQLiteStore,
    caplog: pytest.LogCaptureFixture,
    edit: str,
) -> None:
    """Three checkpoints that never expire (or expire at ``LATER + 50``), then the row's
    ``expires_at`` edited to a time before that. A create neither starts the run over (which
    dropped every checkpoint) nor appends; the cleanup loop, with the row due, leaves the run
    alone (it removed all three); ``damaged_runs`` reports it and a repair makes it writable."""
    run = make_run("edited expiry")
    key = key_of(run)
    expires_at = None if edit == "expired" else LATER + 50
    row_expiry = T0 + 1 if edit == "expired" else LATER + 10
    with anyio.fail_after(30):
        for sequence in range(3):
            await _append(store, run, sequence, expires_at=expires_at)
        await _sql(
            store,
            "UPDATE fc_runs SET expires_at = ?, due = ? WHERE run_key = ?",
            row_expiry,
            row_expiry,
            key,
        )
        # An expired row: what a create does is start the run over at 0; a live one: append 3.
        with pytest.raises(CorruptCheckpointError, match="before checkpoint 2 in place") as caught:
            await _append(store, run, 0 if edit == "expired" else 3, now=LATER)
        assert caught.value.key == f"{store.path}#fc_runs/{key}"
        assert await store.purge_expired(now=LATER + 20, limit=100) == (0, True)
        held = await _held(store, run, now=LATER)
        [damage] = await store.damaged_runs(now=LATER)
        rebuilt = await store.rebuild_run(key, run, now=LATER)
        await _append(store, run, 3, now=LATER, expires_at=expires_at)
        after = await _held(store, run, now=LATER)
    assert held == [2, 1, 0]
    assert damage.run_key == key
    assert "before checkpoint 2 in place" in damage.problem
    assert (rebuilt.latest_sequence, rebuilt.expires_at) == (2, expires_at)
    assert after == [3, 2, 1, 0]
    assert "cleanup leaves run key" in caplog.text


async def test_an_expired_run_whose_row_agrees_still_starts_over(store: SQLiteStore) -> None:
    """The check takes nothing from a run that expired with its checkpoints."""
    run = make_run("expired whole")
    with anyio.fail_after(30):
        for sequence in range(3):
            await _append(store, run, sequence, expires_at=T0 + 10 + sequence)
        assert await store.damaged_runs(now=LATER) == []
        await _append(store, run, 0, now=LATER)
        held = await _held(store, run, now=LATER)
    assert held == [0]


# -- a run row that counts more checkpoints than the run holds --------------------------------


async def _raise_count(store: SQLiteStore, run: RunRecord) -> None:
    await _sql(
        store,
        "UPDATE fc_runs SET checkpoint_count = 50, immortal = 50 WHERE run_key = ?",
        key_of(run),
    )


async def _put_back_after_deleting_all(store: SQLiteStore, run: RunRecord) -> None:
    """The row put back from a copy taken before every checkpoint was deleted."""
    key = key_of(run)
    saved = await _sql(store, "SELECT * FROM fc_runs WHERE run_key = ?", key)
    for sequence in await _held(store, run):
        assert await store.delete(key, sequence, checkpoint_id=checkpoint_id_of(run, sequence))
    marks = ", ".join("?" * len(saved[0]))
    await _sql(store, f"INSERT OR REPLACE INTO fc_runs VALUES ({marks})", *saved[0])


@pytest.mark.parametrize("damage", [_raise_count, _put_back_after_deleting_all])
async def test_pruning_after_a_row_that_counts_too_many_keeps_what_it_just_wrote(
    store: SQLiteStore,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[SQLiteStore, RunRecord], Awaitable[None]],
) -> None:
    """With ``keep_latest=5``, a create pruned as many of the oldest as the row's count said
    were too many: the checkpoint it had just written too, and it was still acknowledged. Now
    it never prunes one of the newest five sequences, and counts the run again."""
    run = make_run("counted too many")
    key = key_of(run)
    with anyio.fail_after(30):
        for sequence in range(5):
            await _append(store, run, sequence, keep_latest=5)
        await damage(store, run)
        before = await _held(store, run)
        await _append(store, run, 5, keep_latest=5)
        latest = await store.latest(key, now=T0)
        held = await _held(store, run)
        row = await store.get_run(key, now=T0)
        await _append(store, run, 6, keep_latest=5)
        then = await _held(store, run)
        counts = await _sql(store, "SELECT checkpoint_count, immortal FROM fc_runs")
    assert latest is not None
    assert latest[0].sequence == 5
    assert held == [5, *before][:5]
    assert row is not None
    assert row.checkpoint_count == len(held)
    assert then == [6, *held][:5]
    assert counts == [(len(then), len(then))]
    assert "counts more checkpoints than it holds" in caplog.text


@pytest.mark.parametrize("deleted", [2, 1])
async def test_a_row_put_back_from_before_a_delete_never_prunes_one_of_the_newest_held(
    store: SQLiteStore, caplog: pytest.LogCaptureFixture, deleted: int
) -> None:
    """Checkpoints 0, 1 and 2 (``keep_latest=3``), a copy of the row taken, checkpoint
    ``deleted`` deleted, the copy put back (it counts 3, and agrees with the newest in place).
    Pruning bounded by sequence numbers (at most ``3 - keep_latest``) took checkpoint 0, one of
    the three newest the run held, without a word; it is bounded by the third newest held
    now, and the row counted again."""
    run = make_run("put back over a gap")
    key = key_of(run)
    with anyio.fail_after(30):
        for sequence in range(3):
            await _append(store, run, sequence, keep_latest=3)
        [saved] = await _sql(store, "SELECT * FROM fc_runs WHERE run_key = ?", key)
        assert await store.delete(key, deleted, checkpoint_id=checkpoint_id_of(run, deleted))
        marks = ", ".join("?" * len(saved))
        await _sql(store, f"INSERT OR REPLACE INTO fc_runs VALUES ({marks})", *saved)
        await _append(store, run, 3, keep_latest=3)
        warned = "counts more checkpoints than it holds" in caplog.text
        held = await _held(store, run)
        counts = await _sql(store, "SELECT checkpoint_count, immortal FROM fc_runs")
        await _append(store, run, 4, keep_latest=3)
        then = await _held(store, run)
    kept = [sequence for sequence in (2, 1, 0) if sequence != deleted]
    assert held == [3, *kept]
    assert counts == [(3, 3)]
    assert then == [4, 3, kept[0]]
    assert warned


async def test_pruning_with_gaps_in_the_sequences_keeps_the_newest(store: SQLiteStore) -> None:
    """The bound on pruned sequences leaves ordinary pruning as it was."""
    run = make_run("gaps")
    key = key_of(run)
    with anyio.fail_after(30):
        for sequence in range(8):
            await _append(store, run, sequence)
        for sequence in (4, 5, 6):
            assert await store.delete(key, sequence, checkpoint_id=checkpoint_id_of(run, sequence))
        await _append(store, run, 8, keep_latest=3)
        held = await _held(store, run)
        row = await store.get_run(key, now=T0)
    assert held == [8, 7, 3]
    assert row is not None
    assert row.checkpoint_count == 3


# -- checkpoints that name no items -----------------------------------------------------------


class _Statements:
    """Counts the SQLite virtual machine steps of the store's statements, each statement's
    apart (the steps from its start to the next one's), and records them (as run: parameters
    expanded)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.steps = 0
        self.run: list[tuple[int, str]] = []
        real = SQLiteStore._connect

        def traced(store: SQLiteStore) -> sqlite3.Connection:
            db = real(store)
            db.set_progress_handler(self._step, 1)
            db.set_trace_callback(lambda sql: self.run.append((self.steps, sql)))
            return db

        monkeypatch.setattr(SQLiteStore, "_connect", traced)

    def _step(self) -> int:
        self.steps += 1
        return 0

    async def of(self, call: Callable[[], Awaitable[object]]) -> list[tuple[int, str]]:
        """``(steps, statement)`` of each statement ``call`` ran."""
        run_before = len(self.run)
        await call()
        ran = self.run[run_before:]
        ends = [start for start, _ in ran[1:]] + [self.steps]
        return [(end - start, sql) for (start, sql), end in zip(ran, ends, strict=True)]


def _is(sql: str, statement: str) -> bool:
    """Whether ``sql``, as run (parameters expanded), is ``statement``."""
    pattern = re.sub(r"\\\?\d*", ".+?", re.escape(statement))
    return re.fullmatch(pattern, sql, re.DOTALL) is not None


async def _append_mixed(store: SQLiteStore, run: RunRecord, sequence: int, keep: int) -> None:
    """Odd checkpoints name the shared item ``log``, even ones name none."""
    named = sequence % 2 == 1
    await _append(
        store,
        run,
        sequence,
        keep_latest=keep,
        refs=("log",) if named else (),
        items=("log",) if sequence == 1 else (),
    )


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # steps of SQLite, not of the loop
async def test_pruning_a_checkpoint_that_names_none_costs_the_same_in_a_long_run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pruning a checkpoint that names no items, in a run whose other checkpoints name a
    shared item, read the refs of every checkpoint of the run (``O(keep_latest)`` rows) to
    take the run's counts again; it now costs what pruning one in a run of 10 does, but for
    the walk of the bound on what pruning may take (``keep_latest`` index entries)."""
    statements = _Statements(monkeypatch)
    store = SQLiteStore(tmp_path / "checkpoints.db")
    costs: dict[int, int] = {}
    with anyio.fail_after(60):
        for keep in (10, 1000):
            run = make_run(f"mixed {keep}")
            for sequence in range(keep):
                await _append_mixed(store, run, sequence, keep)
            # keep is even: this create prunes checkpoint 0, which names none
            ran = await statements.of(functools.partial(_append_mixed, store, run, keep, keep))
            assert not [sql for _, sql in ran if _is(sql, steps._RUN_REFS)]
            # The bound on pruning walks keep_latest entries of the primary key (3 steps each)
            [bound] = [n for n, sql in ran if _is(sql, steps._PRUNABLE_CHECKPOINTS)]
            assert bound <= 3 * keep + 100, bound
            costs[keep] = sum(n for n, _ in ran) - bound
            assert await _held(store, run) == list(range(keep, 0, -1))[:100]
            found = await store.read_with_items(key_of(run), sequence=keep - 1, now=T0)
            assert found is not None
            assert found[2] == {"log": b"value-log"}
        await store.aclose()
    assert costs[1000] <= costs[10] * 1.2 + 10, costs


async def test_refs_that_name_none_are_told_from_refs_overwritten_with_null(
    store: SQLiteStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A checkpoint that names none is stored as such, apart from one that names the key
    ``\\``; NULL refs (what an earlier release wrote for one that names none) still read as
    naming none, and their removal takes the run's counts again, silently as they were right."""
    run = make_run("none or null")
    key = key_of(run)
    with anyio.fail_after(30):
        await _append(store, run, 0)
        await _append(store, run, 1, refs=("log",), items=("log",))
        await _append(store, run, 2, refs=("\\",), items=("\\",))
        await _append(store, run, 3)
        stored = await _sql(store, "SELECT sequence, refs FROM fc_checkpoints ORDER BY sequence")
        await _sql(store, "UPDATE fc_checkpoints SET refs = NULL WHERE sequence = 0")
        found = [await store.read_with_items(key, sequence=n, now=T0) for n in range(4)]
        for sequence in (0, 3, 1):
            assert await store.delete(key, sequence, checkpoint_id=checkpoint_id_of(run, sequence))
        left = await store.scan_items(key, now=T0)
    assert stored == [(0, steps.NO_REFS), (1, "log"), (2, "\\\\"), (3, steps.NO_REFS)]
    assert [found_[0].refs for found_ in found if found_ is not None] == [(), ("log",), ("\\",), ()]
    assert [item for item, _ in left] == ["\\"]
    assert "contradict" not in caplog.text
