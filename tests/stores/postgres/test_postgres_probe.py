"""An adversarial probe of PostgresStore, after the SQLite one (test_sqlite_probe.py): a seeded
sweep of edits to one run's rows made with plain SQL (rows deleted, sequences, expiries and
counts changed, NULLs where the schema allows them, bytes damaged, refs changed), each followed
by one store call against that run: every call completes or raises a `CheckpointError`, a write
that raises changes nothing, the neighbouring run is untouched and reads whole, and what
`damaged_runs` reports `rebuild_run` rebuilds (``FC_PROBE_SEEDS`` sweeps more seeds). Then the
cases the sweep found, one test each, and the probes of what held: lost replies and
connections terminated after the server applied a create, creates cancelled at random
instants, two store objects and two processes killed at random instants sharing one run, and
odd arguments to every call."""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import msgspec
import pytest

from fastcheckpoint import RetryPolicy, _ids
from fastcheckpoint.errors import (
    CheckpointError,
    CheckpointNotFound,
    SequenceConflict,
    StoreUnavailableError,
    ValidationError,
)
from fastcheckpoint.stores._postgres_sql import Names
from fastcheckpoint.stores.postgres import PostgresStore
from fastcheckpoint.testing import (
    T0,
    checkpoint_id_of,
    key_of,
    make_checkpoint,
    make_item,
    make_run,
)
from tests._helpers import acks_until_killed
from tests.postgres_worker import append_next
from tests.reliability.faults import Fault, FaultPlan, FaultProxy, postgres_running
from tests.stores._postgres_server import PostgresTarget
from tests.stores._probes import (
    APPENDS,
    READS,
    WRITES,
    seed_run,
    store_calls,
    unreadable_create,
)

pytestmark = pytest.mark.anyio

_SEEDS = range(int(os.environ.get("FC_PROBE_SEEDS", "80")))
_TABLES = ("runs", "checkpoints", "items", "refs", "labels")


class Rows:
    """Plain SQL on one store's tables through a connection of its own (as the owner)."""

    def __init__(self, connection: asyncpg.Connection, schema: str) -> None:
        self.connection = connection
        self.names = Names(schema, "fc_")

    async def execute(self, statement: str, *args: Any) -> str:
        done: str = await self.connection.execute(self.names.render(statement), *args)
        return done

    async def dump(self, run_key: str) -> list[list[Any]]:
        """Every row of the run as text (a NaN equals itself there), table by table, in a
        fixed order."""
        found = []
        for table in _TABLES:
            rows = await self.connection.fetch(self.names.render(
                f"SELECT t::text FROM {{{table}}} t WHERE run_key = $1 ORDER BY 1"), run_key)
            found.append([row[0] for row in rows])
        return found


@pytest.fixture
async def rows(postgres: PostgresTarget, schema: str) -> AsyncIterator[Rows]:
    connection = await asyncpg.connect(postgres.url())
    yield Rows(connection, schema)
    with anyio.fail_after(10):
        await connection.close()


# -- a reference count lowered by hand ------------------------------------------------------

_LOWERED = {
    "count set to 0": "UPDATE {refs} SET holders = 0 WHERE run_key = $1 AND key = 'K'",
    "count deleted": "DELETE FROM {refs} WHERE run_key = $1 AND key = 'K'",
    "count renamed": "UPDATE {refs} SET key = 'gone' WHERE run_key = $1 AND key = 'K'",
}


@pytest.mark.parametrize("keep_latest", [None, 1])
@pytest.mark.parametrize("damage", list(_LOWERED))
async def test_a_create_naming_an_item_whose_count_was_lowered_keeps_it_through_its_pruning(
    store: PostgresStore, rows: Rows, damage: str, keep_latest: int | None,
) -> None:
    """K's count lowered by hand (two checkpoints name it), then a create naming K prunes the
    expired checkpoint 0: the count fell to zero in that transaction, so K's item went, and
    the acknowledged checkpoint read back without it (no error: the count was there or gone,
    and no removal recorded). A count that falls to zero for a key the run's newest
    checkpoint names contradicts it: the counts are taken again, and K stays."""
    run = make_run("lowered")
    key = key_of(run)
    with anyio.fail_after(30):
        await seed_run(store, run)
        await rows.execute(_LOWERED[damage], key)
        third = msgspec.structs.replace(make_checkpoint(run, 2, expires_at=T0 + 9000),
                                        refs=("K",))
        await store.append_with_items(key, third, run=run, keep_latest=keep_latest,
                                      now=T0 + 20, items=[])
        found = await store.read_with_items(key, sequence=2, now=T0 + 20)
        older = None if keep_latest else await store.read_with_items(key, sequence=1,
                                                                     now=T0 + 20)
        counts = await rows.connection.fetch(rows.names.render(
            "SELECT key, holders FROM {refs} WHERE run_key = $1 ORDER BY key"), key)
    assert found is not None
    assert found[2] == {"K": b"value-K"}
    if older is not None:
        assert older[2] == {"K": b"value-K", "P": b"value-P", "P/1": b"value-P/1",
                            "o1": b"value-o1"}
        assert [(bytes(k), n) for k, n in counts] == [(b"K", 2), (b"P", 1)]
    else:
        assert [(bytes(k), n) for k, n in counts] == [(b"K", 1)]


async def test_a_checkpoint_naming_an_item_whose_count_was_lowered_keeps_it_later(
    store: PostgresStore, rows: Rows,
) -> None:
    """K's count lowered to 0 by hand; a create names K (no pruning: the count is now 1 for
    three checkpoints); deleting checkpoint 1 takes it to zero, which the newest checkpoint
    (naming K) contradicts: K stays (SQLite's strict xfail of the same case)."""
    run = make_run("lowered later")
    key = key_of(run)
    with anyio.fail_after(30):
        await seed_run(store, run)
        await rows.execute(_LOWERED["count set to 0"], key)
        third = msgspec.structs.replace(make_checkpoint(run, 2, expires_at=T0 + 9000),
                                        refs=("K",))
        await store.append_with_items(key, third, run=run, keep_latest=None, now=T0, items=[])
        assert await store.delete(key, 1, checkpoint_id=checkpoint_id_of(run, 1))
        found = await store.read_with_items(key, sequence=2, now=T0)
    assert found is not None
    assert found[2] == {"K": b"value-K"}


# -- the sweep -----------------------------------------------------------------------------

# SET clauses per table (the schema's types, NOT NULL and CHECK constraints refuse the rest:
# an edit they refuse is skipped), and rows deleted or added by hand.
_SETS = {
    "runs": [
        "latest_sequence = latest_sequence - 1", "latest_sequence = latest_sequence + 1",
        "latest_sequence = 0", "latest_sequence = 9223372036854775807",
        "checkpoint_count = checkpoint_count + 1", "checkpoint_count = 0",
        "checkpoint_count = checkpoint_count - 1, forever_count = 0", "forever_count = 1",
        "expires_at = NULL", "expires_at = 0", "expires_at = 1700000005",
        "expires_at = 'NaN'", "expires_at = 'Infinity'", "expires_at = '-Infinity'",
        "purge_at = 0", "purge_at = 1700000001", "version = 9223372036854775807",
        "incarnation = 'aaaaaaaa'", "status = ''", "status = 'paused'",
        "run_id = '\\x9bc3'::bytea", "run_id = 'another run'::bytea",
        "labels = ARRAY[]::bytea[]", "labels = ARRAY[NULL]::bytea[]",
        "labels = ARRAY['\\xff'::bytea]",
        "created_at = 'NaN'", "created_at = 'Infinity'", "updated_at = 'NaN'",
        "data = ''::bytea", "update_token = NULL", "update_token = 'x'",
    ],
    "checkpoints": [
        "sequence = 5", "sequence = 7", "checkpoint_id = 'x'", "checkpoint_id = ''",
        "expires_at = NULL", "expires_at = 1700000005", "expires_at = 'NaN'",
        "expires_at = 'Infinity'", "expires_at = '-Infinity'", "created_at = 'NaN'",
        "header = ''::bytea", "header = substring(header FROM 1 FOR 3)",
        "payload = ''::bytea", "payload = '\\x00ff'::bytea",
        "refs = NULL", "refs = ARRAY[]::bytea[]", "refs = ARRAY[NULL]::bytea[]",
        "refs = ARRAY['K'::bytea, 'K'::bytea]", "refs = ARRAY['Z'::bytea]",
        "refs = ARRAY['\\xff'::bytea]", "refs = ARRAY['P/1'::bytea]",
        "refs = ARRAY[ARRAY['K'::bytea], ARRAY['P'::bytea]]", "token = NULL", "token = 'x'",
    ],
    "items": [
        "value = ''::bytea", "owner = NULL", "owner = 1", "owner = 5", "owner = -1",
        "expires_at = NULL", "expires_at = 1700000005", "expires_at = 'NaN'",
        "expires_at = '-Infinity'", "kept = true", "kept = NULL", "kept = false",
        "key = '\\xff'::bytea", "key = 'K/x'::bytea",
    ],
    "refs": [
        "holders = 0", "holders = -1", "holders = 5", "holders = 1", "removed = NULL",
        "removed = true", "key = 'gone'::bytea", "key = '\\xff'::bytea",
    ],
    "labels": ["label = '\\xff'::bytea", "created_at = 'NaN'", "created_at = 0"],
}
_WHERE = {
    "runs": lambda rnd: "TRUE",
    "checkpoints": lambda rnd: f"sequence = {rnd.choice([0, 1])}",
    "items": lambda rnd: f"key = '{rnd.choice(['K', 'P', 'P/1', 'o0', 'o1', 'L'])}'",
    "refs": lambda rnd: f"key = '{rnd.choice(['K', 'P'])}'",
    "labels": lambda rnd: f"label = '{rnd.choice(['l1', 'l2'])}'",
}
_DELETES = {
    "runs": "DELETE FROM {runs} WHERE run_key = $1",
    "checkpoints": "DELETE FROM {checkpoints} WHERE run_key = $1 AND sequence = <s>",
    "items": "DELETE FROM {items} WHERE run_key = $1 AND key = '<k>'",
    "refs": "DELETE FROM {refs} WHERE run_key = $1 AND key = 'K'",
    "labels": "DELETE FROM {labels} WHERE run_key = $1 AND label = 'l1'",
}
_INSERTS = [
    "INSERT INTO {checkpoints} SELECT run_key, 7, checkpoint_id, created_at, expires_at, "
    "header, payload, refs, token FROM {checkpoints} WHERE run_key = $1 AND sequence = 1",
    "INSERT INTO {items} (run_key, key, value, owner) VALUES ($1, 'Z', '', 5)",
    "INSERT INTO {items} (run_key, key, value, expires_at) VALUES ($1, 'K/deep', '', 1)",
    "INSERT INTO {refs} (run_key, key, holders) VALUES ($1, 'Z', -1)",
    "INSERT INTO {refs} (run_key, key, holders, removed) VALUES ($1, 'P/1', 3, true)",
    "INSERT INTO {labels} VALUES ('\\xff'::bytea, 1700000000, $1)",
]

async def _edit(rows: Rows, run_key: str, rnd: random.Random) -> list[str]:
    done: list[str] = []
    for _ in range(rnd.randint(1, 3)):
        table = rnd.choice(_TABLES)
        roll = rnd.random()
        if roll < 0.08:
            sql = rnd.choice(_INSERTS)
        elif roll < 0.2:
            sql = _DELETES[table].replace("<s>", str(rnd.choice([0, 1]))).replace(
                "<k>", rnd.choice(["K", "P", "P/1", "o0", "o1", "L"]))
        else:
            sql = f"UPDATE {{{table}}} SET {rnd.choice(_SETS[table])} " \
                  f"WHERE run_key = $1 AND {_WHERE[table](rnd)}"
        try:
            await rows.execute(sql, run_key)
        except asyncpg.PostgresError as exc:  # a constraint refused it: no edit
            done.append(f"refused: {sql} ({type(exc).__name__})")
        else:
            done.append(sql)
    return done


async def _whole(store: PostgresStore, run: Any, now: float) -> str | None:
    """Why the neighbouring run (seeded as the damaged one, never edited) does not read as
    seeded, or ``None``."""
    key = key_of(run)
    found = await store.read_with_items(key, sequence=1, now=now)
    if found is None or found[2] != {"K": b"value-K", "P": b"value-P", "P/1": b"value-P/1",
                                     "o1": b"value-o1"}:
        return f"checkpoint 1 reads as {found!r:.200}"
    record = await store.get_run(key, now=now)
    if record is None or record.latest_sequence != 1 or record.labels != ("l1", "l2"):
        return f"its run reads as {record!r:.200}"
    if await store.damaged_runs(run_key=key, now=now):
        return "damaged_runs reports it"
    return None


async def _goes_on(store: PostgresStore, record: Any) -> str | None:
    """Why the run of ``record`` does not take its next create (naming K, with its value)
    and read it back with its items, or ``None``."""
    key = key_of(make_run(record.run_id))
    sequence = record.latest_sequence + 1
    next_one = msgspec.structs.replace(
        make_checkpoint(record, sequence, expires_at=T0 + 9000), refs=("K",))
    try:
        await store.append_with_items(key, next_one, run=record, keep_latest=None, now=T0,
                                      items=[make_item("K")])
        found = await store.read_with_items(key, sequence=sequence, now=T0)
    except CheckpointError as exc:
        return f"its next create raised {exc!r:.160}"
    if found is None or "K" not in found[2]:
        return f"its next create reads as {found!r:.160}"
    return None


async def test_no_call_fails_halfway_or_raises_a_foreign_error_after_edits(
    store: PostgresStore, rows: Rows,
) -> None:
    foreign: list[tuple[int, str, str, list[str]]] = []
    halfway: list[tuple[int, str, str, list[str]]] = []
    lost: list[tuple[int, str, str, list[str]]] = []
    neighbour: list[tuple[int, str, str, list[str]]] = []
    repair: list[tuple[int, str, list[str]]] = []
    with anyio.fail_after(60 + len(_SEEDS)):
        for seed in _SEEDS:
            rnd = random.Random(seed)
            run, other = make_run(f"sweep-{seed}"), make_run(f"beside-{seed}")
            await seed_run(store, run)
            await seed_run(store, other)
            edits = await _edit(rows, key_of(run), rnd)
            operation = rnd.choice([*WRITES, *READS])
            now = rnd.choice([T0, T0 + 20, T0 + 5000])
            before = await rows.dump(key_of(run))
            beside = await rows.dump(key_of(other))
            try:
                await store_calls(store, run, now)[operation]()
                if operation in APPENDS:
                    problem = await unreadable_create(store, run, APPENDS[operation],
                                                      now)
                    if problem is not None:
                        lost.append((seed, operation, problem, edits))
            except CheckpointError as exc:
                if operation in WRITES and await rows.dump(key_of(run)) != before:
                    halfway.append((seed, operation, str(exc)[:160], edits))
            except Exception as exc:  # what the probe looks for
                foreign.append((seed, operation, repr(exc)[:200], edits))
            # (The cleanup takes what expired of the neighbour too: its expired checkpoint 0
            # and item L from T0 + 20 on, all of it from T0 + 1000.)
            if operation != "purge" and await rows.dump(key_of(other)) != beside:
                neighbour.append((seed, operation, "its rows changed", edits))
            if operation != "purge" or now < T0 + 1000:
                problem = await _whole(store, other, min(now, T0 + 20))
                if problem is not None:
                    neighbour.append((seed, operation, problem, edits))
            # What damaged_runs reports, rebuild_run rebuilds (or says there is nothing to
            # rebuild from), then it reports nothing, and the run takes the next create.
            for damage in await store.damaged_runs(run_key=key_of(run), now=T0):
                try:
                    rebuilt = await store.rebuild_run(key_of(run), run, now=T0)
                except CheckpointNotFound:
                    continue
                except CheckpointError as exc:
                    repair.append((seed, f"{damage.problem}: rebuild raised {exc!r:.160}",
                                   edits))
                    continue
                again = await store.damaged_runs(run_key=key_of(run), now=T0)
                if again:
                    repair.append((seed, f"{damage.problem}: still {again[0].problem}",
                                   edits))
                    continue
                problem = await _goes_on(store, rebuilt)
                if problem is not None:
                    repair.append((seed, f"{damage.problem}: rebuilt, {problem}", edits))
            # The neighbouring run takes its next create too.
            if operation != "purge" or now < T0 + 1000:
                neighbours = await store.get_run(key_of(other), now=T0)
                problem = "its run is gone" if neighbours is None else await _goes_on(
                    store, neighbours)
                if problem is not None:
                    neighbour.append((seed, operation, problem, edits))
            for key in (key_of(run), key_of(other)):
                await store.delete_run(key)  # removes the run whole, damaged or not
                assert await rows.dump(key) == [[]] * len(_TABLES), (seed, operation, edits)
    assert foreign == [], "\n".join(map(repr, foreign))
    assert halfway == [], "\n".join(map(repr, halfway))
    assert lost == [], "\n".join(map(repr, lost))
    assert neighbour == [], "\n".join(map(repr, neighbour))
    assert repair == [], "\n".join(map(repr, repair))


# -- what the sweep found: a label row that is not UTF-8, taken by a rebuild ---------------------


async def test_a_rebuild_leaves_out_label_rows_that_are_not_utf8(
    store: PostgresStore, rows: Rows,
) -> None:
    """A damaged run row, and one of the run's label rows edited to bytes that are not UTF-8:
    a rebuild from a seed without labels took the label rows as they were, committed a row
    holding the bad label, then raised `CorruptCheckpointError` reading it back (a failed call
    that changed the store, and a row `damaged_runs` still reported). The label rows that are
    not UTF-8 are left out (and removed with the others the rebuild writes anew)."""
    run = make_run("bad label row")
    key = key_of(run)
    with anyio.fail_after(30):
        await seed_run(store, run)
        await rows.execute("UPDATE {runs} SET expires_at = NULL WHERE run_key = $1", key)
        await rows.execute("UPDATE {labels} SET label = '\\xff'::bytea "
                           "WHERE run_key = $1 AND label = 'l2'", key)
        [damage] = await store.damaged_runs(run_key=key, now=T0)
        rebuilt = await store.rebuild_run(key, run, now=T0)
        left = await store.damaged_runs(run_key=key, now=T0)
        labels = await rows.connection.fetch(rows.names.render(
            "SELECT label FROM {labels} WHERE run_key = $1"), key)
        listed, _ = await store.runs_with_label("l1", limit=10, cursor=None, now=T0)
    assert "expires" in damage.problem
    assert rebuilt.labels == ("l1",)
    assert left == []
    assert [bytes(row[0]) for row in labels] == [b"l1"]
    assert [record.run_id for record in listed] == [run.run_id]


# -- what the sweep found: a NULL ref failed every rebuild of its run ----------------------------


async def test_a_rebuild_counts_past_a_null_ref(store: PostgresStore, rows: Rows) -> None:
    """A damaged run row, and a NULL among a checkpoint's refs (written by hand): the rebuild
    counted the NULL as a key and failed on the count table's NOT NULL (`StoreError` with the
    driver's message, nothing rebuilt), so a repair could never fix the run. It now counts
    the keys that are there; the checkpoint with the NULL still reads as corrupt."""
    run = make_run("null ref")
    key = key_of(run)
    with anyio.fail_after(30):
        await seed_run(store, run)
        await rows.execute("UPDATE {runs} SET checkpoint_count = 1 WHERE run_key = $1", key)
        await rows.execute("UPDATE {checkpoints} SET refs = ARRAY['K'::bytea, NULL] "
                           "WHERE run_key = $1 AND sequence = 0", key)
        [damage] = await store.damaged_runs(run_key=key, now=T0)
        rebuilt = await store.rebuild_run(key, run, now=T0)
        left = await store.damaged_runs(run_key=key, now=T0)
        counts = await rows.connection.fetch(rows.names.render(
            "SELECT key, holders FROM {refs} WHERE run_key = $1 ORDER BY key"), key)
        newest = await store.read_with_items(key, sequence=1, now=T0)
    assert "counts 1 checkpoints" in damage.problem
    assert rebuilt.checkpoint_count == 2
    assert left == []
    assert [(bytes(k), n) for k, n in counts] == [(b"K", 2), (b"P", 1)]
    assert newest is not None
    assert newest[2] == {"K": b"value-K", "P": b"value-P", "P/1": b"value-P/1",
                         "o1": b"value-o1"}


@pytest.mark.xfail(strict=True, reason="a count lowered by hand is not found when a removal "
                   "takes it to zero while only an older held checkpoint names the key (finding "
                   "it costs a read of every checkpoint's refs of the run per freed key)")
async def test_an_older_checkpoint_naming_an_item_whose_count_was_lowered_keeps_it(
    store: PostgresStore, rows: Rows,
) -> None:
    """What is left (docs): K's count lowered to 0 by hand, the newest checkpoint names no K,
    and deleting checkpoint 0 frees K while checkpoint 1 names it: checkpoint 1 reads back
    without K, with no error (the count row went with the removal, so no read sees damage)."""
    run = make_run("lowered older")
    key = key_of(run)
    with anyio.fail_after(30):
        await seed_run(store, run)
        await store.append(key, make_checkpoint(run, 2, expires_at=T0 + 9000), run=run,
                           keep_latest=None, now=T0)
        await rows.execute(_LOWERED["count set to 0"], key)
        assert await store.delete(key, 0, checkpoint_id=checkpoint_id_of(run, 0))
        found = await store.read_with_items(key, sequence=1, now=T0)
    assert found is not None
    assert found[2]["K"] == b"value-K"


# -- what held: lost replies, cancellation ---------------------------------------------------

_FAST_RETRY = RetryPolicy(base_delay=0.001, max_delay=0.01, max_retries=5)
_NO_RETRY = RetryPolicy(base_delay=0.001, max_delay=0.01, max_retries=0)


async def _counts_agree(rows: Rows, run_key: str) -> list[Any]:
    """What the run's reference counts say against what its checkpoints' refs name, and
    the run row's counters against its checkpoints: ``[]`` when they agree."""
    found = await rows.connection.fetch(rows.names.render("""
        SELECT 'count', coalesce(f.key, n.key)::text, f.holders, n.holders FROM {refs} f
          FULL JOIN (SELECT u.k AS key, count(*) AS holders
                       FROM {checkpoints} c, LATERAL (SELECT DISTINCT unnest(c.refs)) u(k)
                      WHERE c.run_key = $1 GROUP BY u.k) n ON n.key = f.key
         WHERE (f.run_key = $1 OR f.run_key IS NULL)
           AND f.holders IS DISTINCT FROM n.holders
        UNION ALL
        SELECT 'run', x.run_key, x.checkpoint_count, (SELECT count(*) FROM {checkpoints} c
                                                       WHERE c.run_key = $1)
          FROM {runs} x WHERE x.run_key = $1
           AND (x.checkpoint_count <> (SELECT count(*) FROM {checkpoints} c
                                        WHERE c.run_key = $1)
                OR x.latest_sequence <> (SELECT max(sequence) FROM {checkpoints} c
                                          WHERE c.run_key = $1))"""), run_key)
    return [tuple(row) for row in found]


@pytest.mark.parametrize("retry", ["retried", "not retried"])
async def test_a_create_whose_reply_is_lost_lands_once_with_its_items_and_counts(
    postgres: PostgresTarget, schema: str, rows: Rows, retry: str,
) -> None:
    """Creates with items, refs and pruning whose replies a proxy drops after the server
    committed them (every other create, and at random): retried by the store, each is
    acknowledged and reads back once, with its items; not retried, the call raises a
    `CheckpointError`, the checkpoint is there once, and sending the same create again is a
    `SequenceConflict` (it landed), never a second copy. The reference counts and the run
    row agree with the checkpoints throughout."""
    plan = FaultPlan(rate=0.3, kinds=(Fault.LOSE_REPLY,), seed=5,
                     script=[Fault.LOSE_REPLY, Fault.PASS] * 4)
    run = make_run("lost replies", expires_at=T0 + 9000)
    key = key_of(run)
    policy = _FAST_RETRY if retry == "retried" else _NO_RETRY
    landed: list[int] = []
    refused: list[int] = []
    with FaultProxy((postgres.host, postgres.port), postgres_running(b'"fc_append"('),
                    plan) as proxy:
        url = f"postgresql://postgres@127.0.0.1:{proxy.port}/{postgres.database}"
        # No pool minimum and no TLS probe through the proxy (see tests/reliability/_stores.py:
        # asyncpg's reconnecting task and its cancel request's SSL probe leave futures failed
        # and never read when torn down, which the runner reports as errors of the test).
        store = PostgresStore.from_url(f"{url}?schema={schema}&min_size=0&sslmode=disable",
                                       retry=policy)
        try:
            with anyio.fail_after(60):
                for sequence in range(24):
                    record = msgspec.structs.replace(
                        make_checkpoint(run, sequence, expires_at=T0 + 9000),
                        refs=("K", f"S{sequence % 3}"))
                    items = [make_item("K"), make_item(f"S{sequence % 3}"),
                             make_item(f"o{sequence}", owner=sequence)]
                    call = lambda r=record, i=items: store.append_with_items(  # noqa: E731
                        key, r, run=run, keep_latest=4, now=T0, items=i)
                    try:
                        await call()
                    except CheckpointError:
                        refused.append(sequence)
                        again = "unavailable"
                        while again == "unavailable":  # until a reply comes through
                            try:
                                await call()
                                again = "written twice"
                            except StoreUnavailableError:
                                continue
                            except SequenceConflict:
                                again = "landed"
                        assert again == "landed", sequence
                    landed.append(sequence)
                    found = await store.read_with_items(key, sequence=sequence, now=T0)
                    assert found is not None, sequence
                    assert found[2] == {"K": b"value-K", f"S{sequence % 3}":
                                        f"value-S{sequence % 3}".encode(),
                                        f"o{sequence}": f"value-o{sequence}".encode()}
                    assert await _counts_agree(rows, key) == [], sequence
                headers, _ = await store.headers(key, before=None, limit=100, now=T0)
        finally:
            await store.aclose()
    assert proxy.counts[Fault.LOSE_REPLY] >= 4
    assert [header.sequence for header in headers] == [23, 22, 21, 20]
    assert bool(refused) == (retry == "not retried")
    assert landed == list(range(24))


async def test_cancelled_creates_leave_the_run_row_matching_its_checkpoints(
    store: PostgresStore, rows: Rows,
) -> None:
    """Creates with items, refs and pruning cancelled at random instants (the task is
    cancelled while asyncpg waits for the server): each one either returned (its checkpoint
    is there) or was cancelled (there whole, or not at all), the run row and the reference
    counts agree with the checkpoints after each, and the store goes on."""
    run = make_run("cancelled", expires_at=T0 + 9000)
    key = key_of(run)
    rnd = random.Random(11)
    acknowledged: list[int] = []
    cancelled = landed_anyway = 0
    with anyio.fail_after(120):
        for _ in range(50):
            record_row = await store.get_run(key, now=T0)
            sequence = 0 if record_row is None else record_row.latest_sequence + 1
            checkpoint = msgspec.structs.replace(
                make_checkpoint(run, sequence, expires_at=T0 + 9000), refs=("K",))
            items = [make_item("K"), make_item(f"o{sequence}", owner=sequence)]
            task = asyncio.ensure_future(store.append_with_items(
                key, checkpoint, run=run, keep_latest=3, now=T0, items=items))
            await asyncio.sleep(rnd.uniform(0, 0.006))
            task.cancel()
            try:
                await task
                acknowledged.append(sequence)
            except asyncio.CancelledError:
                cancelled += 1
            found = await store.read_with_items(key, sequence=sequence, now=T0)
            if found is not None:
                assert found[2] == {"K": b"value-K", f"o{sequence}":
                                    f"value-o{sequence}".encode()}
                landed_anyway += sequence not in acknowledged
            else:
                assert sequence not in acknowledged
            assert await _counts_agree(rows, key) == []
        damaged = await store.damaged_runs(run_key=key, now=T0)
        headers, _ = await store.headers(key, before=None, limit=10, now=T0)
        final = await store.get_run(key, now=T0)
    assert damaged == []
    assert final is not None
    held = [header.sequence for header in headers]
    assert held == list(range(final.latest_sequence, final.latest_sequence - len(held), -1))
    assert len(held) == min(3, final.latest_sequence + 1)
    assert {s for s in acknowledged if s > final.latest_sequence - 3} <= set(held)
    assert cancelled
    assert acknowledged


# -- what held: two store objects and two processes killed at random on one run ---------------

_WORKER = Path(__file__).resolve().parents[2] / "postgres_worker.py"
_ROOT = str(Path(__file__).resolve().parents[3])


async def test_two_stores_and_two_killed_processes_pruning_one_run_lose_nothing(
    postgres: PostgresTarget, schema: str, rows: Rows, tmp_path: Path,
) -> None:
    """Two OS processes append to one run through the store (a shared item named, an item
    owned, pruning to three), each killed with SIGKILL at a random instant, while two store
    objects of this process append to it too: the acknowledged sequences are distinct, the
    three newest are in place and nothing below them, gap-free, readable with their items;
    the run row and the counts agree with the checkpoints, and no owned item outlives its
    checkpoint."""
    tag = f"fc-probe-{os.getpid()}-{random.randrange(1 << 30)}"
    url = f"{postgres.url()}?schema={schema}&max_size=2&application_name={tag}"
    chance = random.Random(3)
    env = {**os.environ, "PYTHONPATH": _ROOT}
    mine = f"{postgres.url()}?schema={schema}&max_size=2"  # not waited for by the tag
    stores = [PostgresStore.from_url(mine), PostgresStore.from_url(mine)]
    try:
        for attempt in range(2):
            run_id = f"two killed-{attempt}"
            acknowledged: list[list[int]] = [[], [], [], []]
            command = [sys.executable, str(_WORKER), "forever", url, run_id, "3"]
            stop = anyio.Event()

            async def killed(number: int, acks: list[list[int]] = acknowledged,
                             command: list[str] = command, attempt: int = attempt) -> None:
                acks[number] = await acks_until_killed(
                    command, env, tmp_path / f"err-{attempt}-{number}",
                    chance.uniform(0.05, 0.4))

            async def beside(number: int, acks: list[list[int]] = acknowledged,
                             run_id: str = run_id, stop: anyio.Event = stop) -> None:
                while not stop.is_set():
                    sequence = await append_next(stores[number - 2], run_id, 3)
                    if sequence is not None:
                        acks[number].append(sequence)
                    await anyio.sleep(0.002)

            with anyio.fail_after(90):
                async with anyio.create_task_group() as outer:
                    outer.start_soon(beside, 2)
                    outer.start_soon(beside, 3)
                    async with anyio.create_task_group() as group:
                        group.start_soon(killed, 0)
                        group.start_soon(killed, 1)
                    stop.set()
                await _server_processes_gone(rows, tag)
                key = _ids.run_key(run_id)
                final = await stores[0].get_run(key, now=time.time())
                headers, _ = await stores[0].headers(key, before=None, limit=10,
                                                     now=time.time())
                reads = [await stores[1].read_with_items(key, sequence=h.sequence,
                                                         now=time.time()) for h in headers]
                damaged = await stores[0].damaged_runs(run_key=key, now=time.time())
                disagree = await _counts_agree(rows, key)
                orphans = await rows.connection.fetch(rows.names.render(
                    "SELECT i.key FROM {items} i WHERE i.run_key = $1 AND i.owner IS NOT NULL"
                    " AND NOT EXISTS (SELECT 1 FROM {checkpoints} c WHERE c.run_key = $1"
                    " AND c.sequence = i.owner)"), key)
            every = [sequence for acks in acknowledged for sequence in acks]
            assert all(acknowledged[:2]), acknowledged  # each process acknowledged some
            assert len(every) == len(set(every)), acknowledged
            assert final is not None
            held = [header.sequence for header in headers]
            newest = final.latest_sequence
            assert held == [newest, newest - 1, newest - 2], (held, newest)
            assert max(every) >= newest - 1  # at most the killed calls' landed unacknowledged
            assert [found is not None and set(found[2]) == {"shared", f"w/{h}"}
                    for found, h in zip(reads, held, strict=True)] == [True] * 3
            assert damaged == []
            assert disagree == []
            assert orphans == []
    finally:
        for store in stores:
            await store.aclose()


async def _server_processes_gone(rows: Rows, tag: str) -> None:
    """Wait for the server processes of killed clients to end: one may still be running the
    statement its client sent last, and commit it after the client died."""
    for _ in range(1_200):  # the caller's deadline ends the wait first
        if not await rows.connection.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", tag):
            return
        await anyio.sleep(0.05)
    pytest.fail(f"the server processes of the killed writers ({tag}) did not end")


# -- odd arguments ------------------------------------------------------------------------------

_ODD: list[Any] = [
    "", "\x00", "a\x00b", "\ud800", "x" * 70_000, 2**63, -1, -(2**63) - 1, 1.5,
    float("nan"), float("inf"), True, None, b"bytes", 123, ["list"], object(),
]


def _baselines(run: Any) -> dict[str, tuple[Callable[..., Awaitable[Any]], dict[str, Any]]]:
    """Every public call of the store with arguments it takes, by name (the store is bound
    later): positional arguments are named by ``_0``, ``_1``."""
    key = key_of(run)
    record = msgspec.structs.replace(make_checkpoint(run, 2, expires_at=T0 + 9000), refs=("K",))
    return {
        "append": (PostgresStore.append, {
            "_0": key, "_1": record, "run": run, "keep_latest": 3, "now": T0}),
        "append_with_items": (PostgresStore.append_with_items, {
            "_0": key, "_1": record, "run": run, "keep_latest": 3, "now": T0,
            "items": [make_item("K")]}),
        "get": (PostgresStore.get, {"_0": key, "_1": 1, "now": T0}),
        "latest": (PostgresStore.latest, {"_0": key, "now": T0}),
        "read_with_items": (PostgresStore.read_with_items, {
            "_0": key, "sequence": 1, "now": T0}),
        "headers": (PostgresStore.headers, {
            "_0": key, "before": None, "limit": 10, "now": T0, "include_expired": False}),
        "delete": (PostgresStore.delete, {
            "_0": key, "_1": 0, "checkpoint_id": checkpoint_id_of(run, 0)}),
        "delete_run": (PostgresStore.delete_run, {"_0": make_run("other").run_id}),
        "get_run": (PostgresStore.get_run, {"_0": key, "now": T0}),
        "update_run": (PostgresStore.update_run, {
            "_0": key, "incarnation": run.incarnation, "version": 0, "status": "paused",
            "data": b"d", "now": T0, "latest_sequence": 1}),
        "list_runs": (PostgresStore.list_runs, {
            "status": None, "limit": 10, "cursor": None, "now": T0}),
        "runs_with_label": (PostgresStore.runs_with_label, {
            "_0": "l1", "limit": 10, "cursor": None, "now": T0}),
        "count_runs": (PostgresStore.count_runs, {"status": None, "now": T0}),
        "put_items": (PostgresStore.put_items, {
            "_0": key, "_1": [make_item("N")], "create_only": False, "now": T0}),
        "put_owned_items": (PostgresStore.put_owned_items, {
            "_0": key, "_1": [make_item("w", owner=1)], "owner": 1,
            "checkpoint_id": checkpoint_id_of(run, 1), "if_absent": False, "now": T0}),
        "get_items": (PostgresStore.get_items, {"_0": key, "_1": ["K", "P"], "now": T0}),
        "scan_items": (PostgresStore.scan_items, {
            "_0": key, "prefix": "", "start_after": None, "limit": 10, "reverse": False,
            "now": T0}),
        "delete_items": (PostgresStore.delete_items, {"_0": key, "_1": ["L"]}),
        "purge_expired": (PostgresStore.purge_expired, {"now": T0, "limit": 10}),
        "damaged_runs": (PostgresStore.damaged_runs, {"run_key": key, "now": T0}),
        "rebuild_run": (PostgresStore.rebuild_run, {"_0": key, "_1": run, "now": T0}),
    }


def _variants(run: Any) -> list[tuple[str, str, Callable[..., Awaitable[Any]], dict[str, Any]]]:
    """Each call with one argument, or one field of a record, item or list it takes, made
    odd."""
    found = []
    for name, (method, arguments) in _baselines(run).items():
        for parameter, value in arguments.items():
            odd_values: list[tuple[str, Any]] = [(repr(odd)[:20], odd) for odd in _ODD]
            if isinstance(value, msgspec.Struct):
                for field in value.__struct_fields__:
                    odd_values += [(f".{field}={odd!r:.20}",
                                    msgspec.structs.replace(value, **{field: odd}))
                                   for odd in _ODD]
            if isinstance(value, list):
                odd_values += [(f"[{odd!r:.20}]", [odd]) for odd in _ODD]
                if value and isinstance(value[0], msgspec.Struct):
                    odd_values += [
                        (f"[.{field}={odd!r:.20}]",
                         [msgspec.structs.replace(value[0], **{field: odd})])
                        for field in value[0].__struct_fields__ for odd in _ODD]
            for label, odd in odd_values:
                found.append((name, f"{parameter}{label}", method, {**arguments,
                                                                    parameter: odd}))
    return found


async def _fingerprint(rows: Rows) -> list[str]:
    """A digest of each table of the store (the memos of lost replies included), in one
    statement."""
    digests = ", ".join(
        f"(SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) "
        f"FROM {{{table}}} t)" for table in (*_TABLES, "ops"))
    row = await rows.connection.fetchrow(rows.names.render(f"SELECT {digests}"))
    assert row is not None
    return list(row)


_WRITING = {"append", "append_with_items", "delete", "delete_run", "update_run", "put_items",
            "put_owned_items", "delete_items", "purge_expired", "rebuild_run"}


async def test_odd_arguments_to_every_call_are_typed_errors_that_write_nothing(
    store: PostgresStore, rows: Rows,
) -> None:
    """Every public call with one argument (or one field of a record, item or list it
    takes) replaced by an odd value: an empty string, NUL characters, a lone surrogate, a
    70,000-character string, integers outside bigint, floats that are not finite, a bool,
    None, bytes, a list, an object. Each either completes or raises a `CheckpointError`
    (never TypeError, AttributeError, a driver error...), and a write that raises leaves
    every table as it was."""
    run = make_run("odd")
    foreign: list[tuple[str, str, str]] = []
    halfway: list[tuple[str, str, str]] = []
    with anyio.fail_after(240):
        await seed_run(store, run)
        for name, variant, method, arguments in _variants(run):
            positional = [arguments[f"_{n}"] for n in range(2) if f"_{n}" in arguments]
            keywords = {k: v for k, v in arguments.items() if not k.startswith("_")}
            before = await _fingerprint(rows) if name in _WRITING else None
            try:
                await method(store, *positional, **keywords)
            except CheckpointError as exc:
                if before is not None and await _fingerprint(rows) != before:
                    halfway.append((name, variant, f"{exc!r:.160}"))
            except Exception as exc:  # what the probe looks for
                foreign.append((name, variant, f"{exc!r:.160}"))
    assert foreign == [], "\n".join(map(repr, foreign))
    assert halfway == [], "\n".join(map(repr, halfway))


# -- what odd arguments found: arguments every other store refuses ------------------------------


def _any(value: object) -> Any:
    """``value``, typed to pass where the API takes another type."""
    return value


def _odd_calls(store: PostgresStore, run: Any) -> dict[str, Callable[[], Awaitable[Any]]]:
    key = key_of(run)
    nul = msgspec.structs.replace(make_checkpoint(run, 2), checkpoint_id="ck-\x00")
    return {
        # Not a str: the call found no checkpoint of that id and reported nothing removed
        # or written, where a typo (the sequence passed twice) deserves an error.
        "delete with an int id": lambda: store.delete(key, 1, checkpoint_id=_any(1)),
        "delete with a None id": lambda: store.delete(key, 1, checkpoint_id=_any(None)),
        "owned items with bytes for the id": lambda: store.put_owned_items(
            key, [make_item("w", owner=1)], owner=1,
            checkpoint_id=_any(checkpoint_id_of(run, 1).encode()),
            if_absent=False, now=T0),
        # Not a bool: "" and None wrote as an upsert, "no" as create-only.
        "create_only of an empty string": lambda: store.put_items(
            key, [make_item("N")], create_only=_any(""), now=T0),
        "create_only of a string": lambda: store.put_items(
            key, [make_item("L")], create_only=_any("no"), now=T0),
        "create_only of None": lambda: store.put_items(
            key, [make_item("N")], create_only=_any(None), now=T0),
        # A NUL in a checkpoint id: the driver's error (PostgreSQL text cannot hold it),
        # a StoreError with asyncpg's message, after a round trip.
        "a checkpoint id with a NUL": lambda: store.append(
            key, nul, run=run, keep_latest=None, now=T0),
    }


@pytest.mark.parametrize("case", list(_odd_calls(PostgresStore(), make_run("odd"))))
async def test_arguments_of_another_type_are_validation_errors_that_send_nothing(
    store: PostgresStore, rows: Rows, case: str,
) -> None:
    """What the odd-argument probe found PostgreSQL alone taking (SQLite, the memory store and
    the others refuse each with `ValidationError`): now refused the same, before anything is
    sent."""
    run = make_run("odd")
    with anyio.fail_after(30):
        await seed_run(store, run)
        before = await _fingerprint(rows)
        with pytest.raises(ValidationError):
            await _odd_calls(store, run)[case]()
        after = await _fingerprint(rows)
    assert after == before


async def test_a_recount_clears_the_cleanup_mark_of_an_item_no_checkpoint_names(
    store: PostgresStore, rows: Rows,
) -> None:
    """Counts damaged by hand twice: K's lowered to 0 and one added for the loose item L
    (which the cleanup then marks as named, and passes by). The recount a create's pruning
    makes (K's count fell to zero while the newest checkpoint names K) removes L's count,
    and clears L's mark with it: the next cleanup removes L once it expired."""
    run = make_run("recount marks")
    key = key_of(run)
    with anyio.fail_after(30):
        await seed_run(store, run)
        await rows.execute(_LOWERED["count set to 0"], key)
        await rows.execute("INSERT INTO {refs} (run_key, key, holders) VALUES ($1, 'L', 1)",
                           key)
        await store.purge_expired(now=T0 + 6, limit=100)  # marks L: a count names it
        third = msgspec.structs.replace(make_checkpoint(run, 2, expires_at=T0 + 9000),
                                        refs=("K",))
        await store.append_with_items(key, third, run=run, keep_latest=None, now=T0 + 20,
                                      items=[])
        await store.purge_expired(now=T0 + 20, limit=100)
        left = await rows.connection.fetch(rows.names.render(
            "SELECT key, kept FROM {items} WHERE run_key = $1 ORDER BY key"), key)
    assert [bytes(row[0]).decode() for row in left] == ["K", "P", "P/1", "o1"]


async def test_creates_whose_connections_are_terminated_at_random_land_once_with_their_counts(
    postgres: PostgresTarget, schema: str, rows: Rows,
) -> None:
    """Creates with items, refs and pruning while another session terminates the store's
    server processes (``pg_terminate_backend``) at random instants, before, during or after
    the server applied a create: each create the store acknowledges reads back once with
    its items, one it gave up on (`StoreUnavailableError`) landed once or not at all (the
    same create sent again is acknowledged or a `SequenceConflict`), and after each the
    reference counts and the run row agree with the checkpoints."""
    tag = f"fc-probe-cut-{os.getpid()}-{random.randrange(1 << 30)}"
    url = f"{postgres.url()}?schema={schema}&application_name={tag}"
    # Every other create through a store that does not retry, so some give up.
    stores = [PostgresStore.from_url(url, retry=RetryPolicy(base_delay=0.001, max_delay=0.005,
                                                            max_retries=3)),
              PostgresStore.from_url(url, retry=_NO_RETRY)]
    run = make_run("terminated", expires_at=T0 + 9000)
    key = key_of(run)
    rnd = random.Random(17)
    acknowledged = gave_up = terminated = 0
    try:
        with anyio.fail_after(120):
            for sequence in range(30):
                record = msgspec.structs.replace(
                    make_checkpoint(run, sequence, expires_at=T0 + 9000),
                    refs=("K", f"S{sequence % 2}"))
                items = [make_item("K"), make_item(f"S{sequence % 2}"),
                         make_item(f"o{sequence}", owner=sequence)]

                async def cut(delay: float) -> None:
                    nonlocal terminated
                    await anyio.sleep(delay)
                    terminated += await rows.connection.fetchval(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE application_name = $1", tag)

                outcome = "unavailable"
                store = stores[sequence % 2]
                async with anyio.create_task_group() as group:
                    group.start_soon(cut, rnd.uniform(0, 0.004))
                    try:
                        await store.append_with_items(key, record, run=run, keep_latest=3,
                                                      now=T0, items=items)
                        outcome = "acknowledged"
                    except StoreUnavailableError:
                        pass
                if outcome == "acknowledged":
                    acknowledged += 1
                else:
                    gave_up += 1
                    while outcome == "unavailable":  # sent again until a reply comes
                        try:
                            await store.append_with_items(key, record, run=run, keep_latest=3,
                                                          now=T0, items=items)
                            outcome = "written now"
                        except StoreUnavailableError:
                            continue
                        except SequenceConflict:
                            outcome = "landed before"
                found = await store.read_with_items(key, sequence=sequence, now=T0)
                assert found is not None, (sequence, outcome)
                assert found[2] == {"K": b"value-K", f"S{sequence % 2}":
                                    f"value-S{sequence % 2}".encode(),
                                    f"o{sequence}": f"value-o{sequence}".encode()}
                assert await _counts_agree(rows, key) == [], (sequence, outcome)
            headers, _ = await stores[0].headers(key, before=None, limit=10, now=T0)
    finally:
        for each in stores:
            await each.aclose()
    assert [header.sequence for header in headers] == [29, 28, 27]
    assert acknowledged > 0
    assert terminated > 10
