"""PostgresStore when things break: a writer process killed with SIGKILL mid-create, and a
server connection terminated in the middle of a create's transaction (``pg_terminate_backend``
while the transaction waits on a row lock, after it wrote the run row and the checkpoint).

Each time: every acknowledged create is restorable exactly once, no checkpoint is half
written or written twice, sequences stay gap-free, and only typed errors leave the store.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.to_thread
import asyncpg
import msgspec
import pytest

from fastcheckpoint import Checkpoint, CheckpointConfig, CheckpointManager, RetryPolicy
from fastcheckpoint.errors import CheckpointError, StoreUnavailableError
from fastcheckpoint.stores import Item
from fastcheckpoint.stores._postgres_sql import Names
from fastcheckpoint.stores.postgres import PostgresStore
from fastcheckpoint.testing import T0, checkpoint_id_of, key_of, make_checkpoint, make_run
from tests.reliability._audit import Ack, audit_run, state_for
from tests.reliability.faults import Fault, FaultPlan, FaultProxy, postgres_running
from tests.stores._postgres_server import (
    PostgresTarget,
)

ROOT = Path(__file__).resolve().parents[3]
WORKER = ROOT / "tests" / "reliability" / "worker.py"
FAST_RETRY = RetryPolicy(base_delay=0.001, max_delay=0.01, max_retries=5)
NO_RETRY = RetryPolicy(base_delay=0.001, max_delay=0.01, max_retries=0)

pytestmark = pytest.mark.anyio


# -- kill -9 ------------------------------------------------------------------------------


class Reports:
    """Lines the writers reported, counted together (one writer may win most sequence races
    while the others back off, so a kill instant is a count of all creates, not of one
    writer's)."""

    def __init__(self) -> None:
        self.total = 0
        self.changed = threading.Condition()

    def add(self) -> None:
        with self.changed:
            self.total += 1
            self.changed.notify_all()

    def wait_for(self, total: int, writers: list[Writer]) -> None:
        with self.changed:
            assert self.changed.wait_for(
                lambda: self.total >= total or any(w.process.poll() is not None
                                                   for w in writers), 60)


@dataclass
class Writer:
    """A process of tests/reliability/worker.py: it reports each acknowledged create as
    ``<sequence> <checkpoint id> <token>`` before it starts the next one."""

    name: str
    process: subprocess.Popen[bytes]
    errors: Path
    reports: Reports
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    reader: threading.Thread | None = None

    def read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            if raw == b"ready\n":
                self.ready.set()
                continue
            self.lines.append(raw.decode())
            self.reports.add()
        self.ready.set()
        self.reports.add()  # it ended: wake the waiter

    def stderr(self) -> str:
        return self.errors.read_text(errors="replace")[-3000:]

    def acks(self) -> list[Ack]:
        acks = []
        for line in self.lines:
            sequence, checkpoint_id, token = line.split()
            acks.append(Ack(token, int(sequence), checkpoint_id))
        return acks


def _start(url: str, run_id: str, name: str, scratch: Path, reports: Reports) -> Writer:
    errors = scratch / f"{name}.stderr"
    with errors.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(WORKER), url, run_id, name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
    writer = Writer(name, process, errors, reports)
    writer.reader = threading.Thread(target=writer.read, daemon=True)
    writer.reader.start()
    return writer


def _kill_writers(url: str, run_id: str, names: list[str], kill_at: list[int],
                  scratch: Path) -> list[Writer]:
    """Start the writers, let them write together, and SIGKILL one (each is always inside a
    create, or backing off between its attempts) as soon as the writers have reported
    ``kill_at[i]`` creates between them."""
    reports = Reports()
    writers = [_start(url, run_id, name, scratch, reports) for name in names]
    try:
        for writer in writers:
            assert writer.ready.wait(60), writer.stderr()
        for writer in writers:
            assert writer.process.stdin is not None
            writer.process.stdin.write(b"go\n")
            writer.process.stdin.flush()
        for writer, total in zip(writers, sorted(kill_at), strict=True):
            reports.wait_for(total, writers)
            for each in writers:
                assert each.process.poll() is None or each.process.returncode == -9, (
                    f"{each.name} ended by itself:\n{each.stderr()}")
            writer.process.send_signal(signal.SIGKILL)
    finally:
        for writer in writers:
            writer.process.kill()
            writer.process.wait()
            if writer.reader is not None:
                writer.reader.join()
            for pipe in (writer.process.stdin, writer.process.stdout):
                if pipe is not None:
                    pipe.close()
    return writers


async def _server_processes_gone(postgres: PostgresTarget, tag: str) -> None:
    """Wait for the server processes of killed clients to end: one may still be running the
    statement its client sent last, and commit it after the client died (a create that lands
    unacknowledged, which the audit must see)."""
    admin = await asyncpg.connect(postgres.url())
    try:
        for _ in range(2_400):  # the caller's deadline ends the wait first
            if not await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", tag):
                return
            await anyio.sleep(0.05)
    finally:
        await admin.close()
    pytest.fail(f"the server processes of the killed writers ({tag}) did not end")


async def test_acknowledged_creates_survive_kill_9_of_writers(
    postgres: PostgresTarget, schema: str, tmp_path: Path
) -> None:
    tag = f"fc-killed-{os.getpid()}-{random.randrange(1 << 30)}"
    url = f"{postgres.url()}?schema={schema}&max_size=2&application_name={tag}"
    rng = random.Random(15)
    run_id = "killed"
    writers: list[Writer] = []
    with anyio.fail_after(180):
        for round_number in range(2):
            names = [f"r{round_number}w{index}" for index in range(3)]
            kill_at = [rng.randint(1, 60) for _ in names]
            writers += await anyio.to_thread.run_sync(
                _kill_writers, url, run_id, names, kill_at, tmp_path)
        await _server_processes_gone(postgres, tag)
        acks = [ack for writer in writers for ack in writer.acks()]
        in_flight = {f"{writer.name}/{len(writer.lines)}" for writer in writers}
        store = PostgresStore.from_url(url)
        try:
            manager = CheckpointManager(store, config=CheckpointConfig(
                max_checkpoints_per_run=None))
            audit = await audit_run(manager, run_id, acks, in_flight)
            after = await manager.create(run_id, state_for("after"), force=True)
        finally:
            await store.aclose()
    assert len(acks) >= 2  # each round's writers acknowledged creates before the kills
    assert not audit.problems(), audit.problems()
    assert len(audit.unacknowledged) <= len(writers)
    assert after is not None
    assert after.metadata.sequence == audit.listed


# -- a connection terminated mid-transaction ----------------------------------------------


async def _blocked_append(admin: asyncpg.Connection, database: str, other_than: int) -> int:
    """The pid of the server process whose append waits on a lock (polled: the wait is
    what the test arranged; no fixed sleep)."""
    while True:
        pid = await admin.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'"
            " AND query LIKE '%fc_append%' AND pid <> $2", database, other_than)
        if pid is not None:
            return int(pid)
        await anyio.sleep(0.005)


async def _committed(admin: asyncpg.Connection, names: Names, run_key: str) -> tuple[
        int, int, list[int]]:
    """What other sessions see of the run: latest sequence, count, sequences held."""
    row = await admin.fetchrow(
        f"SELECT latest_sequence, checkpoint_count FROM {names['runs']} WHERE run_key = $1",
        run_key)
    assert row is not None
    held = await admin.fetch(
        f"SELECT sequence FROM {names['checkpoints']} WHERE run_key = $1 ORDER BY 1", run_key)
    return row[0], row[1], [record[0] for record in held]


async def _hold_oldest(locker: asyncpg.Connection, names: Names, run_key: str) -> None:
    """Lock the run's oldest checkpoint row: the next create (with pruning to two) writes the
    run row and its checkpoint, then waits here to delete that row."""
    await locker.execute("BEGIN")
    await locker.execute(
        f"SELECT 1 FROM {names['checkpoints']} WHERE run_key = $1 AND sequence = 0 FOR UPDATE",
        run_key)


async def test_a_terminated_connection_mid_create_leaves_nothing_and_the_retry_writes_once(
    postgres: PostgresTarget, schema: str
) -> None:
    names = Names(schema, "fc_")
    run_key = key_of(make_run("cut"))
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}", retry=FAST_RETRY)
    manager = CheckpointManager(store, config=CheckpointConfig(max_checkpoints_per_run=2,
                                                               retry=FAST_RETRY))
    admin = await asyncpg.connect(postgres.url())
    locker = await asyncpg.connect(postgres.url())
    created: list[Checkpoint | None] = []
    try:
        with anyio.fail_after(60):
            first = [await manager.create("cut", state_for(f"before/{n}"), force=True)
                     for n in range(2)]
            await _hold_oldest(locker, names, run_key)
            async with anyio.create_task_group() as group:

                async def create() -> None:
                    created.append(await manager.create("cut", state_for("cut"), force=True))

                group.start_soon(create)
                victim = await _blocked_append(admin, postgres.database, 0)
                assert await admin.fetchval("SELECT pg_terminate_backend($1)", victim)
                # The store retries on a new connection with the same write token; that
                # attempt waits on the same lock. The terminated one has rolled back.
                retry = await _blocked_append(admin, postgres.database, victim)
                during = await _committed(admin, names, run_key)
                assert await admin.fetchval("SELECT pg_terminate_backend($1)", retry)
                await _blocked_append(admin, postgres.database, retry)
                await locker.execute("ROLLBACK")
            after = await _committed(admin, names, run_key)
            held = [(await manager.restore_from(m.checkpoint_id), m.sequence)
                    for m in await manager.list_checkpoints("cut")]
    finally:
        await admin.close()
        await locker.close()
        await store.aclose()
    assert during == (1, 2, [0, 1])  # no half-written create: not the run row, nor the log
    assert after == (2, 2, [1, 2])  # written once, pruned to two
    assert created[0] is not None
    assert created[0].metadata.sequence == 2
    assert [(None if c is None else c.state["token"], s) for c, s in held] == [
        ("cut", 2), ("before/1", 1)]
    assert first[1] is not None
    assert held[1][0] is not None
    assert held[1][0].checkpoint_id == first[1].checkpoint_id


async def _overtaken(
    postgres: PostgresTarget, schema: str, function: str, blocker: str, args: tuple[object, ...],
    call: Callable[[PostgresStore], Awaitable[object]],
) -> object:
    """``call``'s outcome when its first try of store function ``function`` is still running
    on the server (it waits on a lock another session holds: ``blocker`` with ``args``) as
    its connection dies: the store's retry, with the same token on a new connection,
    overtakes it. The lock goes once both wait."""
    names = Names(schema, "fc_")
    marker = f'"fc_{function}"('.encode()
    admin = await asyncpg.connect(postgres.url())
    locker = await asyncpg.connect(postgres.url())
    with FaultProxy((postgres.host, postgres.port), postgres_running(marker),
                    FaultPlan(script=[Fault.ABANDON])) as proxy:
        url = f"postgresql://postgres@127.0.0.1:{proxy.port}/{postgres.database}"
        store = PostgresStore.from_url(f"{url}?schema={schema}", retry=FAST_RETRY)
        try:
            with anyio.fail_after(60):
                await locker.execute("BEGIN")
                await locker.execute(blocker.format(**{name: names[name] for name in (
                    "runs", "checkpoints", "items")}), *args)
                async with anyio.create_task_group() as group:
                    outcome: list[object] = []

                    async def make() -> None:
                        try:
                            outcome.append(await call(store))
                        except CheckpointError as exc:
                            outcome.append(exc)

                    group.start_soon(make)
                    first = await _waiting(admin, postgres.database, function, 0)
                    await _waiting(admin, postgres.database, function, first)  # the retry
                    await locker.execute("ROLLBACK")
        finally:
            await store.aclose()
            await locker.close()
            await admin.close()
    assert proxy.counts[Fault.ABANDON] == 1
    return outcome[0]


async def _waiting(admin: asyncpg.Connection, database: str, function: str,
                   other_than: int) -> int:
    """The pid of a server process whose call of ``function`` waits on a lock (polled)."""
    while True:
        pid = await admin.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'"
            " AND query LIKE $2 AND pid <> $3", database, f'%"fc_{function}"(%', other_than)
        if pid is not None:
            return int(pid)
        await anyio.sleep(0.005)


async def test_a_first_append_overtaken_by_its_retry_is_acknowledged_once(
    postgres: PostgresTarget, schema: str
) -> None:
    """A new run's first append waits on a lock when its connection dies; the retry (same
    token) ran its reads before the first try committed and took the run it made for
    another writer's: a conflict with its own checkpoint, which the manager would have
    written again. It waits for the first try now, and acknowledges it."""
    run = make_run("overtaken")
    key = key_of(run)
    record = msgspec.structs.replace(make_checkpoint(run, 0), refs=("shared",))

    async def append(store: PostgresStore) -> object:
        return await store.append_with_items(
            key, record, run=run, keep_latest=None, now=T0,
            items=[Item(key="shared", value=b"ours")])

    outcome = await _overtaken(
        postgres, schema, "append",
        "INSERT INTO {items} (run_key, key, value) VALUES ($1, $2, $3)",
        (key, b"shared", b"another's"), append)
    assert outcome == "active"
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}")
    try:
        headers, _ = await store.headers(key, before=None, limit=10, now=T0)
        got = await store.get_items(key, ["shared"], now=T0)
    finally:
        await store.aclose()
    assert [header.checkpoint_id for header in headers] == [record.checkpoint_id]
    assert got == {"shared": b"ours"}


async def test_a_delete_overtaken_by_its_retry_reports_what_it_removed(
    postgres: PostgresTarget, schema: str
) -> None:
    """The same race for a delete: the retry read the memo of its token before the first try
    committed, then waited for it and found nothing left: it said it removed nothing."""
    run = make_run("overtaken-delete")
    key = key_of(run)
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}")
    try:
        for sequence in (0, 1):
            await store.append(key, make_checkpoint(run, sequence), run=run, keep_latest=None,
                               now=T0)
    finally:
        await store.aclose()

    async def delete(store: PostgresStore) -> object:
        return await store.delete(key, 1, checkpoint_id=checkpoint_id_of(run, 1))

    outcome = await _overtaken(
        postgres, schema, "delete", "SELECT 1 FROM {runs} WHERE run_key = $1 FOR UPDATE",
        (key,), delete)
    assert outcome is True
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}")
    try:
        headers, _ = await store.headers(key, before=None, limit=10, now=T0)
    finally:
        await store.aclose()
    assert [header.sequence for header in headers] == [0]


async def test_a_terminated_connection_without_retries_is_a_typed_error_and_writes_nothing(
    postgres: PostgresTarget, schema: str
) -> None:
    names = Names(schema, "fc_")
    run_key = key_of(make_run("cut-once"))
    store = PostgresStore.from_url(f"{postgres.url()}?schema={schema}", retry=NO_RETRY)
    manager = CheckpointManager(store, config=CheckpointConfig(max_checkpoints_per_run=2,
                                                               retry=NO_RETRY))
    admin = await asyncpg.connect(postgres.url())
    locker = await asyncpg.connect(postgres.url())
    raised: list[BaseException] = []
    try:
        with anyio.fail_after(60):
            for n in range(2):
                await manager.create("cut-once", state_for(f"before/{n}"), force=True)
            await _hold_oldest(locker, names, run_key)
            async with anyio.create_task_group() as group:

                async def create() -> None:
                    try:
                        await manager.create("cut-once", state_for("cut"), force=True)
                    except Exception as exc:  # what is under test: its type
                        raised.append(exc)

                group.start_soon(create)
                victim = await _blocked_append(admin, postgres.database, 0)
                assert await admin.fetchval("SELECT pg_terminate_backend($1)", victim)
            await locker.execute("ROLLBACK")
            after = await _committed(admin, names, run_key)
            again = await manager.create("cut-once", state_for("again"), force=True)
            restored = await manager.restore("cut-once")
    finally:
        await admin.close()
        await locker.close()
        await store.aclose()
    assert len(raised) == 1
    assert isinstance(raised[0], StoreUnavailableError), repr(raised[0])
    assert isinstance(raised[0].__cause__, (asyncpg.PostgresError, asyncpg.InterfaceError,
                                            OSError))
    assert after == (1, 2, [0, 1])
    assert again is not None
    assert again.metadata.sequence == 2  # the failed create consumed no number
    assert restored is not None
    assert restored.state == state_for("again")


async def test_connections_killed_over_and_over_are_retried_and_lose_nothing(
    postgres: PostgresTarget, schema: str
) -> None:
    """Every server process of the store's pool terminated every 20 milliseconds (with a
    pause of 200 milliseconds when no create got through for half a second, so that some
    do on a loaded machine too) while it creates and restores: calls are retried (asyncpg
    hands out a connection whose process died while it was being made, which refuses the
    statement before sending it), so each returns or raises ``StoreUnavailableError``,
    never another error; every acknowledged create restores; once the terminations stop,
    every call succeeds."""
    tag = f"fc-storm-{os.getpid()}-{random.randrange(1 << 30)}"
    store = PostgresStore.from_url(
        f"{postgres.url()}?schema={schema}&application_name={tag}",
        retry=RetryPolicy(base_delay=0.001, max_delay=0.005, max_retries=30))
    manager = CheckpointManager(store)
    admin = await asyncpg.connect(postgres.url())
    unexpected: list[BaseException] = []
    acknowledged: dict[int, Checkpoint] = {}
    terminations = 0
    progress = [anyio.current_time()]  # when a create last got through

    async def terminate(stop: anyio.Event) -> None:
        nonlocal terminations
        while not stop.is_set():
            terminations += await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = $1", tag)
            if anyio.current_time() - progress[0] > 0.5:
                progress[0] = anyio.current_time()
                await anyio.sleep(0.2)
            await anyio.sleep(0.02)

    async def calls(worker: int) -> None:
        number = 0
        # eight calls, and more (at most 60) until one of this worker's is acknowledged
        while number < 8 or (number < 60
                             and not any(key // 100 == worker for key in acknowledged)):
            number += 1
            try:
                made = await manager.create(f"storm-{worker}", state_for(f"{number}"))
                acknowledged[worker * 100 + number] = made
                progress[0] = anyio.current_time()
                await manager.restore(f"storm-{worker}")
            except StoreUnavailableError:
                pass  # retries ran out: allowed, and nothing acknowledged
            except Exception as exc:  # what is under test: no other error
                unexpected.append(exc)

    try:
        with anyio.fail_after(120):
            stop = anyio.Event()
            async with anyio.create_task_group() as killer:
                killer.start_soon(terminate, stop)
                async with anyio.create_task_group() as group:
                    for worker in range(3):
                        group.start_soon(calls, worker)
                stop.set()
            for made in acknowledged.values():
                restored = await manager.restore_from(made.checkpoint_id)
                assert restored.state == made.state
            for worker in range(3):
                await manager.create(f"storm-{worker}", state_for("after"))
    finally:
        await admin.close()
        await store.aclose()
    assert terminations > 10
    assert unexpected == []
    assert acknowledged  # the storm let some calls through: their restores were checked
