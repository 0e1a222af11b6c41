"""PostgresStore with run and checkpoint rows damaged by plain SQL (schema version 10): a run
row copied over from another run, a checkpoint row of another run swapped in, a run whose
checkpoints all name another run, and a creation time, latest sequence or version out of
range. Each is damaged with asyncpg on the store's tables, then used through the manager."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import asyncpg
import pytest

from fastcheckpoint import CheckpointManager
from fastcheckpoint._ids import run_key
from fastcheckpoint.errors import CheckpointNotFound, CorruptCheckpointError
from fastcheckpoint.stores._base import RunRecord
from fastcheckpoint.stores._postgres_sql import Names
from fastcheckpoint.stores.postgres import PostgresStore
from tests.stores._postgres_server import PostgresTarget

pytestmark = pytest.mark.anyio

RUN_COLUMNS = ("run_id, incarnation, status, created_at, updated_at, latest_sequence, "
               "checkpoint_count, forever_count, expires_at, purge_at, version, data, labels")
MAX_BIGINT = 2**63 - 1


class Rows:
    """Plain SQL on one store's tables (what an operator's UPDATE or a bad restore does)."""

    def __init__(self, postgres: PostgresTarget, schema: str) -> None:
        self._url = postgres.url()
        self.names = Names(schema, "fc_")

    async def fetch(self, statement: str, *args: Any) -> list[asyncpg.Record]:
        connection = await asyncpg.connect(self._url)
        try:
            return await connection.fetch(self.names.render(statement), *args)
        finally:
            await connection.close()

    async def run(self, run_id: str) -> asyncpg.Record:
        [row] = await self.fetch("SELECT * FROM {runs} WHERE run_key = $1", run_key(run_id))
        return row

    async def copy_run_row(self, source: str, target: str) -> None:
        await self.fetch(
            f"UPDATE {{runs}} SET ({RUN_COLUMNS}) = (SELECT {RUN_COLUMNS} FROM {{runs}} "
            "WHERE run_key = $1) WHERE run_key = $2", run_key(source), run_key(target))

    async def set_run(self, run_id: str, column: str, value: Any) -> None:
        await self.fetch(f"UPDATE {{runs}} SET {column} = $1 WHERE run_key = $2", value,
                         run_key(run_id))


@pytest.fixture
async def setup(
    postgres: PostgresTarget, schema: str
) -> AsyncIterator[tuple[PostgresStore, CheckpointManager, Rows]]:
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}")
    yield store, CheckpointManager(store), Rows(postgres, schema)
    with anyio.fail_after(30):
        await store.aclose()


async def _listed(manager: CheckpointManager) -> list[str]:
    return sorted(run.run_id for run in (await manager.list_runs(limit=100)).runs)


# -- a run row copied over from another run -----------------------------------------------


async def test_a_run_row_copied_from_another_run_is_refused_skipped_reported_and_rebuilt(
    setup: tuple[PostgresStore, CheckpointManager, Rows],
) -> None:
    """B's row copied over A (which holds checkpoints) and over C (whose only checkpoint was
    deleted): neither is listed in B's name, C's create is refused (it was acknowledged at
    sequence 3 under B's incarnation), damaged_runs names both, and repair rebuilds A from its
    own checkpoints and reports C, which has none."""
    store, manager, rows = setup
    with anyio.fail_after(30):
        await manager.create("A", {"a": 0})
        await manager.create("A", {"a": 1})
        for n in range(3):
            await manager.create("B", {"b": n})
        only = await manager.create("C", {"c": 0})
        await manager.delete(only.metadata.checkpoint_id)
        incarnation_a = (await rows.run("A"))["incarnation"]
        await rows.copy_run_row("B", "A")
        await rows.copy_run_row("B", "C")
        copy = await rows.run("C")

        listed = await _listed(manager)
        with pytest.raises(CorruptCheckpointError, match="names another run"):
            await manager.get_run("C")
        with pytest.raises(CorruptCheckpointError, match="names another run"):
            await manager.create("C", {"c": 1})
        after_refusal = await rows.run("C")
        held_c = await rows.fetch("SELECT sequence FROM {checkpoints} WHERE run_key = $1",
                                  run_key("C"))
        damaged = await store.damaged_runs(now=0)
        reports = await manager.repair()
        relisted = await _listed(manager)
        next_a = await manager.create("A", {"a": 2})

    assert listed == ["B"]
    assert dict(after_refusal) == dict(copy)
    assert held_c == []
    assert sorted((damage.run_key, damage.problem) for damage in damaged) == sorted([
        (run_key("A"), "the run row names another run ('B'), copied over from it"),
        (run_key("C"), "the run row names another run ('B'), copied over from it"),
    ])
    assert sorted((report.run_id or "", report.outcome) for report in reports) == [
        ("", "unrecoverable"), ("A", "rebuilt")]
    assert relisted == ["A", "B"]
    assert next_a.metadata.sequence == 2
    assert next_a.metadata.checkpoint_id.split("-")[2] == incarnation_a


# -- a checkpoint row of another run swapped in -------------------------------------------


async def _swap_in_b_checkpoint(rows: Rows) -> None:
    """A's checkpoint 1 replaced by B's checkpoint 1 (id, times, header and payload)."""
    await rows.fetch(
        "UPDATE {checkpoints} SET (checkpoint_id, created_at, expires_at, header, payload) = "
        "(SELECT checkpoint_id, created_at, expires_at, header, payload FROM {checkpoints} "
        "WHERE run_key = $1 AND sequence = 1) WHERE run_key = $2 AND sequence = 1",
        run_key("B"), run_key("A"))


async def test_a_checkpoint_swapped_in_from_another_run_does_not_block_its_run(
    setup: tuple[PostgresStore, CheckpointManager, Rows],
) -> None:
    """The swapped checkpoint names B's incarnation: A's row was judged against it, so A
    left the listings, and every create and status change of A raised until delete_run."""
    store, manager, rows = setup
    with anyio.fail_after(30):
        for run_id in ("A", "B"):
            await manager.create(run_id, {"n": 0})
            await manager.create(run_id, {"n": 1})
        incarnation_a = (await rows.run("A"))["incarnation"]
        await _swap_in_b_checkpoint(rows)

        listed = await _listed(manager)
        counted = await manager.count_runs()
        damaged = await store.damaged_runs(now=0)
        created = await manager.create("A", {"n": 2})
        completed = await manager.mark_completed("A")
        restored = await manager.restore("A")

    assert listed == ["A", "B"]
    assert counted == 2
    assert damaged == []
    assert created.metadata.sequence == 2
    assert created.metadata.checkpoint_id.split("-")[2] == incarnation_a
    assert completed is not None
    assert restored is not None
    assert restored.state == {"n": 2}


async def test_repair_rebuilds_a_run_from_its_own_checkpoints_past_a_swapped_one(
    setup: tuple[PostgresStore, CheckpointManager, Rows],
) -> None:
    """A's row damaged besides (its count): damaged_runs offers A's newest own checkpoint (0),
    not B's swapped in at 1, and the rebuild takes A's incarnation from it, its latest
    sequence from the highest in place."""
    store, manager, rows = setup
    with anyio.fail_after(30):
        for run_id in ("A", "B"):
            await manager.create(run_id, {"n": 0})
            await manager.create(run_id, {"n": 1})
        incarnation_a = (await rows.run("A"))["incarnation"]
        await _swap_in_b_checkpoint(rows)
        await rows.set_run("A", "checkpoint_count", 7)

        [damage] = await store.damaged_runs(now=0)
        [report] = await manager.repair()
        rebuilt = await rows.run("A")
        created = await manager.create("A", {"n": 2})

    assert damage.problem == "the run row counts 7 checkpoints, but 2 are in place"
    assert damage.newest is not None
    assert damage.newest.sequence == 0
    assert (report.run_id, report.outcome) == ("A", "rebuilt")
    assert (rebuilt["incarnation"], rebuilt["latest_sequence"],
            rebuilt["checkpoint_count"]) == (incarnation_a, 1, 2)
    assert created.metadata.sequence == 2


# -- a run with no checkpoint of its own ---------------------------------------------------


async def test_a_run_without_a_checkpoint_of_its_own_is_reported_and_repair_goes_on(
    setup: tuple[PostgresStore, CheckpointManager, Rows],
) -> None:
    """A's only checkpoint carries B's id and A's row is damaged (its count); D is damaged
    too. rebuild_run of A raised CorruptCheckpointError, which made repair() raise for the
    whole store (D never rebuilt); now it is CheckpointNotFound, and A is reported."""
    store, manager, rows = setup
    with anyio.fail_after(30):
        await manager.create("A", {"n": 0})
        await manager.create("B", {"n": 0})
        await manager.create("D", {"n": 0})
        await rows.fetch(
            "UPDATE {checkpoints} SET checkpoint_id = (SELECT checkpoint_id FROM {checkpoints} "
            "WHERE run_key = $1 AND sequence = 0) WHERE run_key = $2 AND sequence = 0",
            run_key("B"), run_key("A"))
        await rows.set_run("A", "checkpoint_count", 3)
        await rows.set_run("D", "incarnation", "zzzz")
        seed = RunRecord(run_id="A", incarnation="", status="active", created_at=0.0,
                         updated_at=0.0, latest_sequence=0, checkpoint_count=0,
                         expires_at=None, data=b"")
        with pytest.raises(CheckpointNotFound, match="no checkpoint of run key"):
            await store.rebuild_run(run_key("A"), seed, now=0)
        reports = await manager.repair()
        repaired_d = await manager.get_run("D")

    assert sorted((report.key, report.outcome) for report in reports) == sorted([
        (f"{rows.names['runs']} ({run_key('A')})", "unrecoverable"),
        (f"{rows.names['runs']} ({run_key('D')})", "rebuilt"),
    ])
    assert repaired_d is not None


# -- numbers out of range ------------------------------------------------------------------


async def test_a_latest_sequence_beyond_every_id_is_reported_and_rebuilt(
    setup: tuple[PostgresStore, CheckpointManager, Rows],
) -> None:
    """At 2**63 - 1 every create failed and nothing reported it. A latest sequence above the
    newest checkpoint because the newest was deleted (E) is a gap, not damage."""
    store, manager, rows = setup
    with anyio.fail_after(30):
        for run_id in ("A", "E"):
            await manager.create(run_id, {"n": 0})
            newest = await manager.create(run_id, {"n": 1})
        await manager.delete(newest.metadata.checkpoint_id)
        await rows.set_run("A", "latest_sequence", MAX_BIGINT)

        damaged = await store.damaged_runs(now=0)
        [report] = await manager.repair()
        created = await manager.create("A", {"n": 2})
        after_gap = await manager.create("E", {"n": 2})

    assert [(damage.run_key, damage.problem) for damage in damaged] == [(
        run_key("A"), f"the run row knows sequences up to {MAX_BIGINT}, more than a "
        "checkpoint id can name")]
    assert (report.run_id, report.outcome) == ("A", "rebuilt")
    assert created.metadata.sequence == 2
    assert after_gap.metadata.sequence == 2


@pytest.mark.parametrize("created_at", ["NaN", "Infinity"])
async def test_a_creation_time_that_is_not_finite_is_reported_and_rebuilt(
    setup: tuple[PostgresStore, CheckpointManager, Rows], created_at: str
) -> None:
    """Such a row sorts past the first page's bound: the run was never listed, repaired or
    not. The rebuild takes the creation time of the oldest checkpoint."""
    store, manager, rows = setup
    with anyio.fail_after(30):
        first = await manager.create("A", {"n": 0})
        await manager.create("A", {"n": 1})
        await manager.create("B", {"n": 0})
        await rows.fetch("UPDATE {runs} SET created_at = $1::text::float8 WHERE run_key = $2",
                         created_at, run_key("A"))
        listed = await _listed(manager)
        damaged = await store.damaged_runs(now=0)
        [report] = await manager.repair()
        relisted = await _listed(manager)
        rebuilt = await rows.run("A")

    assert listed == ["B"]
    assert [damage.problem for damage in damaged] == [
        f"the run row says the run was created at {created_at}"]
    assert (report.run_id, report.outcome) == ("A", "rebuilt")
    assert relisted == ["A", "B"]
    assert rebuilt["created_at"] == first.metadata.created_at


async def test_a_version_at_the_limit_fails_status_changes_as_corrupt_and_is_rebuilt(
    setup: tuple[PostgresStore, CheckpointManager, Rows],
) -> None:
    """A status change raised StoreError wrapping NumericValueOutOfRangeError, and nothing
    reported the row."""
    store, manager, rows = setup
    with anyio.fail_after(30):
        await manager.create("A", {"n": 0})
        await rows.set_run("A", "version", MAX_BIGINT)
        before = await rows.run("A")
        with pytest.raises(CorruptCheckpointError, match="cannot raise"):
            await manager.mark_completed("A")
        after = await rows.run("A")
        damaged = await store.damaged_runs(now=0)
        [report] = await manager.repair()
        completed = await manager.mark_completed("A")

    assert dict(after) == dict(before)
    assert [damage.problem for damage in damaged] == [
        f"the run row is at version {MAX_BIGINT}, which no status change can raise"]
    assert (report.run_id, report.outcome) == ("A", "rebuilt")
    assert completed is not None
