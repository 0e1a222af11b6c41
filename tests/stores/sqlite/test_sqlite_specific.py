"""SQLiteStore beyond the shared contract: URLs and options, the environment and the command
line, WAL and synchronous settings, file permissions, the versioned schema and the ops kit,
error translation (busy, disk full, read-only, corrupt file, a directory), hostile values,
damage from outside (a run row put back from a backup, text that is not UTF-8), thread hops,
O(1) reads, several processes and kill -9."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import random
import re
import shutil
import sqlite3
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import anyio.to_thread
import msgspec
import pytest

import fastcheckpoint
from fastcheckpoint import CheckpointManager, _ids
from fastcheckpoint.cli import main
from fastcheckpoint.errors import (
    CheckpointError,
    ConfigurationError,
    ConflictError,
    CorruptCheckpointError,
    SequenceConflict,
    SharedItemGone,
    StoreError,
    StoreUnavailableError,
    ValidationError,
)
from fastcheckpoint.stores import Item, RunRecord, open_store
from fastcheckpoint.stores import _sqlite_schema as schema
from fastcheckpoint.stores import sqlite as sqlite_store
from fastcheckpoint.stores.memory import MemoryStore
from fastcheckpoint.stores.sqlite import SQLiteStore
from fastcheckpoint.testing import (
    T0,
    checkpoint_id_of,
    key_of,
    make_checkpoint,
    make_item,
    make_run,
    without_key,
)
from tests._helpers import acks_of_workers, acks_until_killed, count_hops

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[3]
KIT = ROOT / "stores" / "sqlite"
WORKER = ROOT / "tests" / "sqlite_worker.py"


def _load_worker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sqlite_worker", WORKER)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker()


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "store" / "checkpoints.db"


@pytest.fixture
async def store(database: Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(database)
    yield store
    with anyio.fail_after(10):
        await store.aclose()


async def _append(
    store: SQLiteStore,
    run: RunRecord,
    sequence: int,
    *,
    now: float = T0,
    expires_at: float | None = None,
    keep_latest: int | None = None,
    payload: bytes | None = None,
) -> None:
    record = make_checkpoint(run, sequence, created_at=now, expires_at=expires_at, payload=payload)
    seed = msgspec.structs.replace(run, expires_at=expires_at)
    await store.append(key_of(run), record, run=seed, keep_latest=keep_latest, now=now)


def _query(database: Path, sql: str, *parameters: Any) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        return db.execute(sql, parameters).fetchall()


# -- URLs and options -------------------------------------------------------------------------


def test_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = open_store("sqlite:///relative/dir/a.db")
    assert isinstance(relative, SQLiteStore)
    assert relative.path == tmp_path / "relative" / "dir" / "a.db"
    absolute = open_store(f"sqlite:///{tmp_path}/with%20space.db?synchronous=NORMAL&timeout=2.5")
    assert isinstance(absolute, SQLiteStore)
    assert absolute.path == tmp_path / "with space.db"
    assert repr(absolute) == (f"SQLiteStore({str(tmp_path / 'with space.db')!r}, "
                              "synchronous='normal', timeout=2.5)")
    keywords = open_store(f"sqlite:///{tmp_path}/k.db", synchronous="normal", timeout=0)
    assert repr(keywords).endswith("synchronous='normal', timeout=0)")
    assert repr(SQLiteStore(tmp_path / "d.db")).endswith("synchronous='full', timeout=5)")
    assert not (tmp_path / "relative").exists(), "opening a store does no I/O"


@pytest.mark.parametrize(
    ("query", "options", "name", "nearest"),
    [("?synchronus=normal", {}, "synchronus", "synchronous"), ("", {"timout": 1}, "timout",
                                                               "timeout")],
)
def test_unknown_options_name_the_nearest_known_one(
    tmp_path: Path, query: str, options: dict[str, Any], name: str, nearest: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        open_store(f"sqlite:///{tmp_path}/x.db{query}", **options)
    assert str(caught.value) == (
        f"unknown option '{name}' for the sqlite:// store; did you mean '{nearest}'? "
        "Known options: synchronous, timeout."
    )


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("sqlite://host/x.db", {}),
        ("sqlite://", {}),
        ("sqlite:///", {}),
        ("sqlite:///:memory:", {}),
        ("sqlite:///file:x.db?mode=memory", {}),
        ("sqlite:///x.db?synchronous=off", {}),
        ("sqlite:///x.db?synchronous=", {}),
        ("sqlite:///x.db?timeout=-1", {}),
        ("sqlite:///x.db?timeout=soon", {}),
        ("sqlite:///x.db", {"timeout": float("nan")}),
        ("sqlite:///x.db", {"synchronous": 2}),
        ("sqlite:///a%00b.db", {}),
    ],
)
def test_bad_urls_are_configuration_errors(url: str, options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        open_store(url, **options)


# -- files, WAL and synchronous ---------------------------------------------------------------


@pytest.mark.parametrize(("synchronous", "level"), [("full", 2), ("normal", 1)])
async def test_wal_mode_and_synchronous_are_applied(
    database: Path, synchronous: str, level: int
) -> None:
    store = SQLiteStore(database, synchronous=synchronous)
    with anyio.fail_after(30):
        await _append(store, make_run("settings"), 0)
        assert store._writer is not None
        assert store._writer.execute("PRAGMA synchronous").fetchone() == (level,)
        assert store._writer.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        await store.aclose()
    assert _query(database, "PRAGMA journal_mode") == [("wal",)]


async def test_files_are_0600_in_a_0700_directory_even_with_umask_0(database: Path) -> None:
    previous = os.umask(0)
    try:
        store = SQLiteStore(database)
        with anyio.fail_after(30):
            await _append(store, make_run("private"), 0)
            assert await store.latest(key_of(make_run("private")), now=T0) is not None
            modes = {path.name: stat.S_IMODE(path.stat().st_mode)
                     for path in database.parent.iterdir()}
            await store.aclose()
    finally:
        os.umask(previous)
    assert stat.S_IMODE(database.parent.stat().st_mode) == 0o700
    assert modes == {"checkpoints.db": 0o600, "checkpoints.db-wal": 0o600,
                     "checkpoints.db-shm": 0o600}


async def test_a_store_serves_several_event_loops_and_reopens_after_aclose(
    database: Path
) -> None:
    store = SQLiteStore(database)
    run = make_run("loops")

    async def append(sequence: int) -> None:
        await _append(store, run, sequence)

    await anyio.to_thread.run_sync(anyio.run, append, 0)
    await anyio.to_thread.run_sync(lambda: anyio.run(append, 1, backend="trio"))
    with anyio.fail_after(30):
        await store.aclose()
        await store.aclose()
        found = await store.latest(key_of(run), now=T0)
        await store.aclose()
    assert found is not None
    assert found[0].sequence == 1


_CHILD_CREATES_AND_CLOSES = """
import sys
import anyio
from fastcheckpoint import CheckpointManager
from fastcheckpoint.stores.sqlite import SQLiteStore

async def main() -> None:
    manager = CheckpointManager(SQLiteStore(sys.argv[1]))
    await manager.create("child", {"n": 1})
    await manager.aclose()  # its last connection: SQLite checkpoints and removes the WAL

anyio.run(main)
"""


async def test_two_stores_on_one_file_in_a_process_keep_their_locks(database: Path) -> None:
    """A second store object on the same file must not release the first one's locks (closing
    any descriptor of a file drops the process's POSIX locks on it): else another process's
    close takes the database for unused and removes the WAL under them, corrupting it."""
    one, two = CheckpointManager(SQLiteStore(database)), CheckpointManager(SQLiteStore(database))
    try:
        await one.create("a", {"n": 0})
        await two.create("b", {"n": 0})
        child = await anyio.run_process(
            [sys.executable, "-c", _CHILD_CREATES_AND_CLOSES, str(database)], check=False)
        assert child.returncode == 0, child.stderr.decode()
        for n in range(1, 30):
            await one.create("a", {"n": n})
            await two.create("b", {"n": n})
        first, second = await one.restore("a"), await two.restore("b")
        assert first is not None
        assert second is not None
        assert (first.state, second.state) == ({"n": 29}, {"n": 29})
    finally:
        await one.aclose()
        await two.aclose()
    with contextlib.closing(sqlite3.connect(database)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


# -- schema versions and the ops kit ----------------------------------------------------------


async def test_schema_is_created_on_first_use_and_provision_reports_it(database: Path) -> None:
    store = SQLiteStore(database)
    with anyio.fail_after(30):
        assert await store.provision() == [
            f"created schema version {schema.SCHEMA_VERSION} in {database}",
            f"journal mode WAL, synchronous=FULL in {database}",
        ]
        assert (await store.provision())[0] == \
            f"found schema version {schema.SCHEMA_VERSION} in {database}: up to date"
        await _append(store, make_run("after-init"), 0)
        await store.aclose()
    assert _query(database, "SELECT version FROM fc_schema_migrations") == [
        (number,) for number, _, _ in schema.MIGRATIONS]


def test_fastcheckpoint_init_creates_the_schema(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/init.db"
    assert main(["init", url]) == 0
    assert main(["init", url]) == 0
    out = capsys.readouterr().out
    assert f"created schema version {schema.SCHEMA_VERSION} in {tmp_path}/init.db" in out
    assert "up to date" in out


async def test_the_environment_selects_the_sqlite_store(database: Path) -> None:
    """FASTCHECKPOINT_URL wins over CHECKPOINT_MODE; a second manager finds what the first
    one wrote."""
    env = {
        "FASTCHECKPOINT_URL": f"sqlite:///{database}?synchronous=normal&timeout=2",
        "CHECKPOINT_MODE": "development",
        "CHECKPOINT_TTL_DAYS": "90",
    }
    with anyio.fail_after(30):
        async with CheckpointManager.from_env(env) as first:
            assert isinstance(first.store, SQLiteStore)
            assert first.store.path == database
            assert repr(first.store).endswith("synchronous='normal', timeout=2)")
            created = await first.create("from env", {"step": 1})
        async with CheckpointManager.from_env(env) as second:
            restored = await second.restore("from env")
    assert created is not None
    assert created.metadata.ttl_seconds == 90 * 86400
    assert restored is not None
    assert restored.state == {"step": 1}
    assert restored.checkpoint_id == created.checkpoint_id


def test_fastcheckpoint_doctor_checks_a_sqlite_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["doctor", f"sqlite:///{tmp_path}/doctor.db"]) == 0
    out = capsys.readouterr().out
    assert out.count(" ok ") >= 5, out
    assert (tmp_path / "doctor.db").exists()
    _write_garbage(tmp_path / "garbage" / "x.db")
    for url, problem in [
        (f"sqlite:///{tmp_path}/garbage/x.db", "CorruptCheckpointError"),
        (f"sqlite:///{tmp_path}", "is a directory"),
    ]:
        assert main(["doctor", url]) != 0
        captured = capsys.readouterr()
        assert problem in captured.out + captured.err
        assert "Traceback" not in captured.out + captured.err


async def test_a_newer_schema_is_refused_and_never_downgraded(database: Path) -> None:
    with anyio.fail_after(30):
        store = SQLiteStore(database)
        await _append(store, make_run("older"), 0)
        await store.aclose()
    _query(database, "INSERT INTO fc_schema_migrations VALUES (99, 'from the future', 0)")

    later = SQLiteStore(database)
    with anyio.fail_after(30):
        with pytest.raises(ConfigurationError, match="schema version 99, newer"):
            await later.latest(key_of(make_run("older")), now=T0)
        with pytest.raises(ConfigurationError, match="never downgraded"):
            await later.provision()
    assert _query(database, "SELECT max(version) FROM fc_schema_migrations") == [(99,)]


async def test_an_older_schema_asks_for_init_which_upgrades_it(
    database: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with anyio.fail_after(30):
        store = SQLiteStore(database)
        await _append(store, make_run("kept"), 0)
        await store.aclose()
    current = schema.SCHEMA_VERSION
    step = (current + 1, "an index for the test",
            ("CREATE INDEX fc_test_next ON fc_items (value)",))
    monkeypatch.setattr(schema, "MIGRATIONS", (*schema.MIGRATIONS, step))
    monkeypatch.setattr(schema, "SCHEMA_VERSION", current + 1)

    upgraded = SQLiteStore(database)
    with anyio.fail_after(30):
        with pytest.raises(ConfigurationError, match=r"older .* fastcheckpoint init"):
            await upgraded.latest(key_of(make_run("kept")), now=T0)
        done = await upgraded.provision()
        found = await upgraded.latest(key_of(make_run("kept")), now=T0)
        await upgraded.aclose()
    assert done[:2] == [
        f"upgraded schema of {database} from version {current} to {current + 1}",
        f"applied schema version {current + 1} (an index for the test) to {database}",
    ]
    assert found is not None
    assert _query(database, "SELECT version FROM fc_schema_migrations") == [
        (number,) for number in range(1, current + 2)]


def _tables(database: Path) -> list[tuple[str, str, str]]:
    with contextlib.closing(sqlite3.connect(database)) as db:
        return schema.tables(db)


def _normalized(sql: str) -> str:
    return " ".join(sql.split())


async def test_the_ops_kit_schema_is_the_schema_the_store_creates(
    database: Path, tmp_path: Path
) -> None:
    with anyio.fail_after(30):
        await SQLiteStore(database).provision()
    by_hand = tmp_path / "by-hand.db"
    with contextlib.closing(sqlite3.connect(by_hand)) as db:
        db.executescript((KIT / "schema.sql").read_text())
    made, kit = (
        [(kind, name, _normalized(sql)) for kind, name, sql in _tables(path)]
        for path in (database, by_hand)
    )
    assert kit == made
    assert _query(by_hand, "SELECT version, description FROM fc_schema_migrations") == [
        (number, description) for number, description, _ in schema.MIGRATIONS
    ]
    assert _query(by_hand, "PRAGMA journal_mode") == [("wal",)]
    with anyio.fail_after(30):
        kit_store = SQLiteStore(by_hand)
        await _append(kit_store, make_run("kit"), 0)
        await kit_store.aclose()


def test_the_ops_kit_readme_names_every_option_and_table() -> None:
    readme = (KIT / "README.md").read_text()
    for option in sqlite_store._OPTIONS:
        assert f"`{option}`" in readme, option
    for _, name, _ in schema.tables(_fresh_schema()):
        assert name in readme, name


def _fresh_schema() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:", isolation_level=None)
    schema.provision(db, ":memory:", upgrade=False)
    return db


# -- errors -----------------------------------------------------------------------------------


async def test_a_writer_holding_the_lock_past_the_timeout_is_unavailable_but_readers_read(
    database: Path
) -> None:
    store = SQLiteStore(database, timeout=0.05)
    run = make_run("locked")
    with anyio.fail_after(30):
        await _append(store, run, 0)
        other = sqlite3.connect(database, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("DELETE FROM fc_checkpoints")  # uncommitted: readers never see it
            with pytest.raises(StoreUnavailableError, match="busy timeout"):
                await _append(store, run, 1)
            found = await store.latest(key_of(run), now=T0)
            assert found is not None
            assert found[0].sequence == 0
            other.execute("ROLLBACK")
        finally:
            other.close()
        await _append(store, run, 1)
        await store.aclose()


@contextlib.contextmanager
def _held_new_database(database: Path) -> Iterator[sqlite3.Connection]:
    """A new, empty database file whose write lock another connection holds (rollback mode,
    as while another process switches it to WAL); the caller commits to release it."""
    database.parent.mkdir()
    other = sqlite3.connect(database, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        yield other
    finally:
        other.close()


async def test_opening_a_new_database_waits_for_a_connection_writing_it_in_rollback_mode(
    database: Path
) -> None:
    # Another process opening the new database at the same moment holds its write lock while
    # it switches the file to WAL: SQLite refuses our switch at once rather than waiting (three
    # processes opening one new database together failed so), so the store waits for it.
    store = SQLiteStore(database, timeout=30)
    with _held_new_database(database) as other, anyio.fail_after(30):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(functools.partial(store.get_run, key_of(make_run("new")), now=T0))
            await anyio.sleep(0.3)
            other.execute("COMMIT")
        with contextlib.closing(sqlite3.connect(database)) as reader:
            assert reader.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        await _append(store, make_run("new"), 0)
    await store.aclose()


async def test_opening_a_new_database_held_past_the_timeout_is_unavailable(
    database: Path
) -> None:
    store = SQLiteStore(database, timeout=0.2)
    with _held_new_database(database) as other, anyio.fail_after(30):
        with pytest.raises(StoreUnavailableError, match="busy timeout"):
            await store.get_run(key_of(make_run("held")), now=T0)
        other.execute("COMMIT")
        await _append(store, make_run("held"), 0)
        assert await store.get_run(key_of(make_run("held")), now=T0) is not None
    await store.aclose()


async def test_a_full_disk_fails_the_append_and_changes_nothing(store: SQLiteStore) -> None:
    run = make_run("full")
    key = key_of(run)
    with anyio.fail_after(30):
        await _append(store, run, 0)
        before = await store.get_run(key, now=T0)
        assert store._writer is not None
        pages = store._writer.execute("PRAGMA page_count").fetchone()[0]
        store._writer.execute(f"PRAGMA max_page_count = {pages}")  # as if the disk were full
        with pytest.raises(StoreError, match="disk is full") as caught:
            await _append(store, run, 1, payload=random.Random(1).randbytes(1 << 20))
        assert not isinstance(caught.value, StoreUnavailableError)
        assert await store.get_run(key, now=T0) == before
        assert await store.get(key, 1, now=T0) is None
        store._writer.execute("PRAGMA max_page_count = 1073741823")
        await _append(store, run, 1, payload=b"after")
        found = await store.latest(key, now=T0)
    assert found is not None
    assert found[0].payload == b"after"


@pytest.mark.skipif(not hasattr(sqlite3.Connection, "setlimit"), reason="Python 3.11+")
async def test_a_value_larger_than_sqlite_takes_is_a_validation_error(
    store: SQLiteStore,
) -> None:
    run = make_run("too big")
    key = key_of(run)
    with anyio.fail_after(30):
        await _append(store, run, 0)
        assert store._writer is not None
        store._writer.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 10_000)  # as if 1 GB were 10 kB
        with pytest.raises(ValidationError, match="larger than the SQLite database"):
            await _append(store, run, 1, payload=b"x" * 20_000)
        with pytest.raises(ValidationError):
            await store.put_items(key, [make_item("big", b"x" * 20_000)], now=T0)
        stored = await store.get_run(key, now=T0)
        await _append(store, run, 1, payload=b"x" * 1000)
    assert stored is not None
    assert stored.latest_sequence == 0


async def test_a_read_only_database_is_a_store_error(store: SQLiteStore) -> None:
    run = make_run("read-only")
    with anyio.fail_after(30):
        await _append(store, run, 0)
        assert store._writer is not None
        store._writer.execute("PRAGMA query_only = ON")  # what a read-only file gives
        with pytest.raises(StoreError, match="read-only"):
            await _append(store, run, 1)
        store._writer.execute("PRAGMA query_only = OFF")
        await _append(store, run, 1)


def _write_garbage(database: Path) -> None:
    database.parent.mkdir()
    database.write_bytes(b"this is not a SQLite database " * 200)


def _damage_pages(database: Path) -> None:
    """Every page but the first (the schema) becomes garbage."""
    size = database.stat().st_size
    with database.open("r+b") as damaged:
        damaged.seek(4096)
        damaged.write(random.Random(0).randbytes(size - 4096))


async def test_a_file_that_is_not_a_database_is_corrupt_naming_it(database: Path) -> None:
    _write_garbage(database)
    store = SQLiteStore(database)
    with anyio.fail_after(30), pytest.raises(CorruptCheckpointError) as caught:
        await store.latest(key_of(make_run("x")), now=T0)
    assert caught.value.key == str(database)
    assert str(database) in str(caught.value)


async def test_damaged_pages_are_corrupt_naming_the_file(database: Path) -> None:
    run = make_run("damaged pages")
    with anyio.fail_after(30):
        store = SQLiteStore(database)
        for sequence in range(20):
            await _append(store, run, sequence, payload=random.Random(sequence).randbytes(9000))
        await store.aclose()
    _damage_pages(database)
    reopened = SQLiteStore(database)
    with anyio.fail_after(30):
        with pytest.raises(CorruptCheckpointError) as caught:
            await reopened.latest(key_of(run), now=T0)
        await reopened.aclose()
    assert caught.value.key == str(database)


async def test_a_path_that_cannot_hold_a_database_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("in the way")
    with anyio.fail_after(30):
        with pytest.raises(StoreError):
            await SQLiteStore(tmp_path / "a-file" / "x.db").latest(key_of(make_run("x")), now=T0)
        with pytest.raises(StoreError, match="is a directory; name a database file in it"):
            await SQLiteStore(tmp_path).latest(key_of(make_run("x")), now=T0)
        with pytest.raises(StoreError, match="is a directory"):
            await SQLiteStore(tmp_path).provision()


def _set_modes(top: Path, database: Path, file_mode: int, directory_mode: int) -> None:
    top.chmod(0o755)
    database.chmod(file_mode)
    database.parent.chmod(directory_mode)


@pytest.mark.parametrize(
    ("file_mode", "directory_mode", "message"),
    [
        (0o444, 0o777, "cannot open .* for reading and writing"),
        (0o666, 0o555, "is read-only here"),  # the -wal and -shm files cannot be created
    ],
    ids=["file-read-only", "directory-read-only"],
)
async def test_a_database_this_user_may_only_read_is_a_store_error(
    file_mode: int, directory_mode: int, message: str, anyio_backend: str
) -> None:
    """Run by a worker process, as user nobody when the tests run as root (root writes any
    file whatever its mode), in a directory nobody can reach."""
    top = Path(tempfile.mkdtemp(prefix="fc-sqlite-ro-"))
    database = top / "store" / "checkpoints.db"
    try:
        with anyio.fail_after(30):
            store = SQLiteStore(database)
            await _append(store, make_run("read only"), 0)
            await store.aclose()
        before = database.read_bytes()
        _set_modes(top, database, file_mode, directory_mode)
        with anyio.fail_after(60):
            done = await anyio.run_process(
                _worker_command("read-only", str(database), "read only"),
                env=_worker_env(anyio_backend),
            )
        lines = done.stdout.decode().splitlines()
        assert [line.split(" ", 2)[:2] for line in lines] == [
            ["latest", "StoreError"], ["append", "StoreError"], ["provision", "StoreError"],
            ["aclose", "ok"],
        ], lines
        assert all(re.search(message, line) for line in lines[:3]), lines
        assert database.read_bytes() == before
    finally:
        database.parent.chmod(0o700)
        shutil.rmtree(top)


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.get_run("../etc/passwd", now=T0),
        lambda s: s.latest("A" * 24, now=T0),
        lambda s: s.put_items(key_of(make_run("k")), [make_item("x" * 129)], now=T0),
        lambda s: s.get_items(key_of(make_run("k")), ["\ud800"], now=T0),
        lambda s: s.delete_items(key_of(make_run("k")), "abc"),
        lambda s: s.list_runs(status=None, limit=10, cursor="nonsense", now=T0),
        lambda s: s.scan_items(key_of(make_run("k")), start_after="\udfff", now=T0),
        lambda s: s.put_items(key_of(make_run("k")), [Item(key="k", value="s")],
                              now=T0),
        lambda s: s.put_items(key_of(make_run("k")), [Item(key="k", value=b"", owner=2**64)],
                              now=T0),
        lambda s: s.purge_expired(now=float("nan"), limit=1),
    ],
)
async def test_bad_arguments_are_validation_errors(
    store: SQLiteStore, call: Callable[[SQLiteStore], Awaitable[object]]
) -> None:
    with anyio.fail_after(30), pytest.raises(ValidationError):
        await call(store)


_SURROGATE = "\ud800"
_HUGE = 2**70


@pytest.mark.parametrize(
    "call",
    [
        lambda s, k: s.latest(k, now=_HUGE),
        lambda s, k: s.get(k, 0, now=float("nan")),
        lambda s, k: s.headers(k, before=None, limit=_HUGE, now=-_HUGE),
        lambda s, k: s.get_run(k, now=float("inf")),
        lambda s, k: s.list_runs(status=_SURROGATE, limit=_HUGE, cursor=None, now=T0),
        lambda s, k: s.list_runs(status=None, limit=_HUGE, cursor=None, now=_HUGE),
        lambda s, k: s.count_runs(status=_SURROGATE, now=T0),
        lambda s, k: s.count_runs(status=None, now=_HUGE),
        lambda s, k: s.runs_with_label(_SURROGATE, limit=5, cursor=None, now=T0),
        lambda s, k: s.put_items(k, [make_item("a", expires_at=_HUGE)], now=T0),
        lambda s, k: s.put_items(k, [make_item("a")], create_only=True, now=_SURROGATE),
        lambda s, k: s.get_items(k, ["a"], now=_HUGE),
        lambda s, k: s.get_items(k, None, now=T0),
        lambda s, k: s.scan_items(k, now=_HUGE),
        lambda s, k: s.delete_items(k, 7),
        lambda s, k: s.read_with_items(k, sequence=None, now=_SURROGATE),
        lambda s, k: s.put_owned_items(k, [], owner=0, checkpoint_id="x", if_absent=True,
                                       now=_HUGE),
        lambda s, k: s.purge_expired(now=_HUGE, limit=_HUGE),
        lambda s, k: s.damaged_runs(now=float("nan")),
        lambda s, k: s.rebuild_run(k, "not a record", now=T0),
        lambda s, k: s.append(k, "not a record", run=make_run("v"), keep_latest=None, now=T0),
        lambda s, k: s.append(k, make_checkpoint(make_run("v"), 1), run=None, keep_latest=None,
                              now=T0),
        lambda s, k: s.append(k, make_checkpoint(make_run("v"), 1), run=make_run("v"),
                              keep_latest="3", now=T0),
        lambda s, k: s.append_with_items(k, make_checkpoint(make_run("v"), 1),
                                         run=make_run("v"), keep_latest=None, now=T0,
                                         items=None),
    ],
)
async def test_hostile_values_raise_only_checkpoint_errors_and_change_nothing(
    store: SQLiteStore, call: Callable[[SQLiteStore, str], Awaitable[object]]
) -> None:
    """Lone surrogates, ints beyond 64 bits and non-finite times, which SQLite cannot bind,
    and values of the wrong type: a typed error (or nothing found), never a driver's."""
    run = make_run("v")
    key = key_of(run)
    with anyio.fail_after(30):
        await _append(store, run, 0)
        before = await store.get_run(key, now=T0)
        with contextlib.suppress(CheckpointError):
            await call(store, key)
        assert await store.get_run(key, now=T0) == before
        assert await store.scan_items(key, now=T0) == []


async def test_a_checkpoint_with_a_nan_expiry_is_refused(store: SQLiteStore) -> None:
    """SQLite stores NaN as NULL: the checkpoint would never expire."""
    run = make_run("nan")
    with anyio.fail_after(30):
        with pytest.raises(ValidationError):
            await _append(store, run, 0, expires_at=float("nan"))
        assert await store.get_run(key_of(run), now=T0) is None


async def test_a_rebuilt_run_keeps_its_labels_and_is_found_by_them(store: SQLiteStore) -> None:
    run = msgspec.structs.replace(make_run("labelled"), labels=("thread:7", "app:a"))
    key = key_of(run)
    with anyio.fail_after(30):
        await _append(store, run, 0)
        await _append(store, run, 1, now=T0 + 5, keep_latest=1)  # the oldest left is newer
        await anyio.to_thread.run_sync(
            _query, store.path, "DELETE FROM fc_runs WHERE run_key = ?", key)
        [damage] = await store.damaged_runs(now=T0 + 6)
        seed = msgspec.structs.replace(run, incarnation="", labels=())
        rebuilt = await store.rebuild_run(damage.run_key, seed, now=T0 + 6)
        found, _ = await store.runs_with_label("thread:7", limit=5, cursor=None, now=T0 + 6)
    assert rebuilt.labels == ("thread:7", "app:a")
    assert rebuilt.created_at == T0 + 5
    assert [record.run_id for record in found] == ["labelled"]


async def test_a_run_row_put_back_from_a_backup_is_damage_that_repair_rebuilds(
    store: SQLiteStore,
) -> None:
    run = make_run("replayed")
    key = key_of(run)
    with anyio.fail_after(30):
        for sequence in range(3):
            await _append(store, run, sequence)
        saved = await anyio.to_thread.run_sync(
            _query, store.path, "SELECT * FROM fc_runs WHERE run_key = ?", key)
        for sequence in range(3, 6):
            await _append(store, run, sequence)
        assert await store.damaged_runs(now=T0) == []
        await _put_back(store, saved)
        with pytest.raises(CorruptCheckpointError, match="doctor --repair") as caught:
            await _append(store, run, 3)
        assert caught.value.key == f"{store.path}#fc_runs/{key}"
        [damage] = await store.damaged_runs(now=T0)
        assert damage.run_key == key
        assert "knows sequences up to 2, but checkpoint 5 is in place" in damage.problem
        assert await store.damaged_runs(run_key=key, now=T0) == [damage]
        rebuilt = await store.rebuild_run(key, run, now=T0 + 1)
        assert (rebuilt.latest_sequence, rebuilt.checkpoint_count) == (5, 6)
        assert await store.damaged_runs(now=T0 + 1) == []
        with pytest.raises(ConflictError):
            await store.rebuild_run(key, run, now=T0 + 1)
        await _append(store, run, 6)
        found = await store.latest(key, now=T0)
    assert found is not None
    assert found[0].sequence == 6


async def _put_back(store: SQLiteStore, saved: list[tuple[Any, ...]]) -> None:
    marks = ", ".join("?" * len(saved[0]))
    await anyio.to_thread.run_sync(
        _query, store.path, f"INSERT OR REPLACE INTO fc_runs VALUES ({marks})", *saved[0])


async def test_an_expired_run_row_put_back_never_loses_the_live_checkpoints(
    store: SQLiteStore,
) -> None:
    """The older copy says the run expired: no create starts the run over, no cleanup removes
    it, reads still find the live checkpoints, and a repair brings the run back."""
    run = make_run("expired copy")
    key = key_of(run)
    later = T0 + 100
    with anyio.fail_after(30):
        for sequence in range(3):
            await _append(store, run, sequence, expires_at=T0 + 10)
        saved = await anyio.to_thread.run_sync(
            _query, store.path, "SELECT * FROM fc_runs WHERE run_key = ?", key)
        for sequence in range(3, 6):
            await _append(store, run, sequence)  # never expire
        await _put_back(store, saved)
        with pytest.raises(CorruptCheckpointError, match="knows sequences up to 2"):
            await _append(store, run, 0, now=later)  # what a create on an expired run does
        assert await store.purge_expired(now=later, limit=100) == (0, True)
        assert await store.purge_expired(now=later, limit=100) == (0, True)
        found = await store.latest(key, now=later)
        listed, status = await store.headers(key, before=None, limit=10, now=later)
        [damage] = await store.damaged_runs(now=later)
        assert damage.run_key == key
        rebuilt = await store.rebuild_run(key, run, now=later)
        await _append(store, run, 6, now=later)
    assert found is not None
    assert (found[0].sequence, found[1]) == (5, "active")
    assert ([header.sequence for header in listed], status) == ([5, 4, 3], "active")
    assert (rebuilt.latest_sequence, rebuilt.checkpoint_count, rebuilt.expires_at) == (5, 6, None)


async def test_a_run_row_of_another_incarnation_put_back_is_damage(store: SQLiteStore) -> None:
    older = make_run("reincarnated", incarnation="older111")
    newer = make_run("reincarnated", incarnation="newer222")
    key = key_of(older)
    with anyio.fail_after(30):
        for sequence in range(3):
            await _append(store, older, sequence)
        saved = await anyio.to_thread.run_sync(
            _query, store.path, "SELECT * FROM fc_runs WHERE run_key = ?", key)
        await store.delete_run(key)
        await _append(store, newer, 0)
        await _put_back(store, saved)
        with pytest.raises(CorruptCheckpointError, match="another incarnation") as caught:
            await _append(store, older, 3)  # what the old row says comes next
        assert caught.value.key == f"{store.path}#fc_runs/{key}"
        with pytest.raises(CorruptCheckpointError):
            await _append(store, newer, 1)
        [damage] = await store.damaged_runs(now=T0)
        assert "incarnation 'older111'" in damage.problem
        rebuilt = await store.rebuild_run(key, newer, now=T0)
        await _append(store, newer, 1)
        found, _ = await store.headers(key, before=None, limit=5, now=T0)
    assert (rebuilt.incarnation, rebuilt.latest_sequence) == ("newer222", 0)
    assert [header.checkpoint_id for header in found] == [
        checkpoint_id_of(newer, 1), checkpoint_id_of(newer, 0)]


def _not_utf8(database: Path, sql: str, *parameters: Any) -> None:
    _query(database, sql, b"\x9b\xff not UTF-8", *parameters)


async def test_a_run_row_with_text_that_is_not_utf8_is_damage_that_repair_rebuilds(
    store: SQLiteStore,
) -> None:
    """One bad row hides no checkpoint and no other run; writes to it refuse until repaired."""
    damaged, other = make_run("bit rot"), make_run("neighbour")
    key = key_of(damaged)
    with anyio.fail_after(30):
        for run in (damaged, other):
            await _append(store, run, 0)
            await _append(store, run, 1)
        await anyio.to_thread.run_sync(
            _not_utf8, store.path, "UPDATE fc_runs SET run_id = CAST(? AS TEXT) "
            "WHERE run_key = ?", key)
        listed, _ = await store.list_runs(status=None, limit=10, cursor=None, now=T0)
        assert [run.run_id for run in listed] == ["neighbour"]
        with pytest.raises(CorruptCheckpointError, match="not UTF-8") as caught:
            await store.get_run(key, now=T0)
        assert caught.value.key == f"{store.path}#fc_runs/{key}"
        with pytest.raises(CorruptCheckpointError):
            await store.update_run(key, incarnation=damaged.incarnation, version=0,
                                   status="completed", data=b"", now=T0)
        found = await store.latest(key, now=T0)
        assert found is not None
        assert found[0].sequence == 1
        [damage] = await store.damaged_runs(now=T0)
        assert (damage.run_key, damage.problem) == (
            key, "the run record holds text that is not UTF-8")
        await store.rebuild_run(key, damaged, now=T0)
        await _append(store, damaged, 2)
        stored = await store.get_run(key, now=T0)
        listed, _ = await store.list_runs(status=None, limit=10, cursor=None, now=T0)
    assert stored is not None
    assert (stored.run_id, stored.latest_sequence) == ("bit rot", 2)
    assert sorted(run.run_id for run in listed) == ["bit rot", "neighbour"]


async def test_a_status_that_is_not_utf8_reads_as_active(store: SQLiteStore) -> None:
    run = make_run("bad status")
    key = key_of(run)
    with anyio.fail_after(30):
        await _append(store, run, 0)
        await anyio.to_thread.run_sync(
            _not_utf8, store.path, "UPDATE fc_runs SET status = CAST(? AS TEXT) "
            "WHERE run_key = ?", key)
        found = await store.get(key, 0, now=T0)
        listed = await store.headers(key, before=None, limit=5, now=T0)
        with pytest.raises(CorruptCheckpointError):
            await _append(store, run, 1)
    assert found is not None
    assert found[1] == "active"
    assert listed[1] == "active"
    assert [header.sequence for header in listed[0]] == [0]


async def test_ids_and_item_keys_that_are_not_utf8_are_corrupt_naming_them(
    store: SQLiteStore, caplog: pytest.LogCaptureFixture,
) -> None:
    run = make_run("bad ids")
    key = key_of(run)
    with anyio.fail_after(30):
        for sequence in range(3):
            await _append(store, run, sequence)
        await store.put_items(key, [make_item("fine")], now=T0)
        await anyio.to_thread.run_sync(
            _not_utf8, store.path, "UPDATE fc_checkpoints SET checkpoint_id = CAST(? AS TEXT) "
            "WHERE run_key = ? AND sequence = 1", key)
        await anyio.to_thread.run_sync(
            _not_utf8, store.path, "INSERT INTO fc_items (run_key, key, value) "
            "VALUES (?2, CAST(?1 AS TEXT), x'00')", key)
        with pytest.raises(CorruptCheckpointError) as caught:
            await store.get(key, 1, now=T0)
        assert caught.value.key == f"{store.path}#fc_checkpoints/{key}/1"
        listed, _ = await store.headers(key, before=None, limit=5, now=T0)
        assert [header.sequence for header in listed] == [2, 0]
        # A listing of items leaves the damaged one out (logged), as listings of runs do,
        # and fills a page it falls in from past it (a short page reads as the end).
        assert await store.scan_items(key, now=T0) == [("fine", b"value-fine")]
        await store.put_items(key, [make_item("é1"), make_item("é2")], now=T0)  # after it
        first = await store.scan_items(key, limit=1, now=T0)
        second = await store.scan_items(key, start_after="fine", limit=2, now=T0)
        assert [found for found, _ in first + second] == ["fine", "é1", "é2"]
        assert "whose key is not UTF-8" in caplog.text
        assert await store.get_items(key, ["fine"], now=T0) == {"fine": b"value-fine"}


async def test_a_page_of_headers_a_left_out_checkpoint_falls_in_is_filled_from_past_it(
    store: SQLiteStore,
) -> None:
    # It came back short, and a short page reads as the end of the run: the manager's
    # listings stopped there and left out every checkpoint older than the damaged one.
    run = make_run("short page")
    key = key_of(run)
    with anyio.fail_after(30):
        for sequence in range(5):
            await _append(store, run, sequence)
        await anyio.to_thread.run_sync(
            _not_utf8, store.path, "UPDATE fc_checkpoints SET checkpoint_id = CAST(? AS TEXT) "
            "WHERE run_key = ? AND sequence = 3", key)
        first, _ = await store.headers(key, before=None, limit=2, now=T0)
        second, _ = await store.headers(key, before=first[-1].sequence, limit=2, now=T0)
        expired_too, _ = await store.headers(key, before=None, limit=2, now=T0,
                                             include_expired=True)
        last, _ = await store.headers(key, before=1, limit=2, now=T0)
    assert [header.sequence for header in first] == [4, 2]
    assert [header.sequence for header in second] == [1, 0]
    assert [header.sequence for header in expired_too] == [4, 2]
    assert [header.sequence for header in last] == [0]


# -- hostile keys and labels ------------------------------------------------------------------


HOSTILE = ["", "\0", "a\nb", "\\n", "\\", "x\\\n", "é" * 64, "\U0001f600", "../../etc", "k" * 128]


async def test_hostile_item_keys_labels_and_refs_round_trip(store: SQLiteStore) -> None:
    run = msgspec.structs.replace(make_run("hostile"), labels=tuple(k for k in HOSTILE if k))
    key = key_of(run)
    record = msgspec.structs.replace(make_checkpoint(run, 0), refs=tuple(HOSTILE))
    with anyio.fail_after(30):
        await store.append_with_items(key, record, run=run, keep_latest=None, now=T0,
                                      items=[make_item(k) for k in HOSTILE])
        found = await store.read_with_items(key, sequence=None, now=T0)
        listed = await store.scan_items(key, limit=100, now=T0)
        stored = await store.get_run(key, now=T0)
        by_label = {label: (await store.runs_with_label(label, limit=5, cursor=None, now=T0))[0]
                    for label in run.labels}
    assert found is not None
    assert found[0].refs == tuple(HOSTILE)
    assert found[2] == {k: f"value-{k}".encode() for k in HOSTILE}
    assert [k for k, _ in listed] == sorted(HOSTILE)
    assert stored is not None
    assert stored.labels == run.labels
    assert all([found.run_id for found in runs] == ["hostile"] for runs in by_label.values())


@pytest.mark.parametrize("prefix", ["\ud7ff", "\U0010ffff", "a\U0010ffff"])
async def test_scans_by_prefix_at_the_edges_of_unicode(store: SQLiteStore, prefix: str) -> None:
    run = make_run("edges")
    key = key_of(run)
    keys = list(dict.fromkeys(
        [prefix, prefix + "\U0010ffff", prefix + "z", "\ue000", "a", "b", "\U0010ffff" * 2]))
    with anyio.fail_after(30):
        await store.put_items(key, [make_item(k) for k in keys], now=T0)
        found = await store.scan_items(key, prefix=prefix, now=T0)
    assert [k for k, _ in found] == sorted(k for k in keys if k.startswith(prefix))


# -- refs an append must find ----------------------------------------------------------------


async def test_refs_beyond_one_in_list_are_all_checked_in_refs_order(store: SQLiteStore) -> None:
    """More refs than one ``IN (...)`` list takes: every chunk is read, the missing keys come
    back once each, in the order the refs name them."""
    run = make_run("many-refs")
    key = key_of(run)
    held = [f"b/{n:04}" for n in range(1200)]
    refs = [*held[:3], "gone/0", *held[3:700], "gone/1", *held[700:], "gone/0"]
    with anyio.fail_after(30):
        await store.append_with_items(
            key, msgspec.structs.replace(make_checkpoint(run, 0), refs=tuple(held)), run=run,
            keep_latest=None, now=T0, items=[make_item(k) for k in held])
        with pytest.raises(SharedItemGone) as refused:
            await store.append_with_items(
                key, msgspec.structs.replace(make_checkpoint(run, 1), refs=tuple(refs)),
                run=run, keep_latest=None, now=T0, items=[])
        await store.append_with_items(
            key, msgspec.structs.replace(make_checkpoint(run, 1), refs=tuple(held)), run=run,
            keep_latest=1, now=T0, items=[])
        found = await store.read_with_items(key, sequence=None, now=T0)
    assert refused.value.keys == ("gone/0", "gone/1")
    assert found is not None
    assert found[0].sequence == 1
    assert len(found[2]) == len(held)


async def test_a_ref_to_what_an_expired_run_left_is_refused_and_the_old_row_stays(
    store: SQLiteStore, database: Path
) -> None:
    """A run starting over after its record expired drops the items the old checkpoints
    named: a ref to one of them is refused, and the refusal rolls back that drop too."""
    old = make_run("over", expires_at=T0 + 5)
    key = key_of(old)
    first = msgspec.structs.replace(make_checkpoint(old, 0, expires_at=T0 + 5), refs=("b/a",))
    again = make_run("over")
    with anyio.fail_after(30):
        await store.append_with_items(key, first, run=old, keep_latest=None, now=T0,
                                      items=[make_item("b/a")])
        with pytest.raises(SharedItemGone) as refused:
            await store.append_with_items(
                key, msgspec.structs.replace(make_checkpoint(again, 0), refs=("b/a",)),
                run=again, keep_latest=None, now=T0 + 10, items=[])
    assert refused.value.keys == ("b/a",)
    assert _query(database, "SELECT incarnation FROM fc_runs") == [(old.incarnation,)]
    assert _query(database, "SELECT key FROM fc_items") == [("b/a",)]
    assert _query(database, "SELECT key, holders FROM fc_item_refs") == [("b/a", 1)]


async def test_a_ref_to_an_expired_owned_item_is_refused(store: SQLiteStore) -> None:
    run = make_run("owned-ref")
    key = key_of(run)
    with anyio.fail_after(30):
        await store.append_with_items(
            key, make_checkpoint(run, 0, expires_at=T0 + 5), run=run, keep_latest=None, now=T0,
            items=[make_item("w/0", owner=0), make_item("w/1", owner=0)])
        await store.append_with_items(key, make_checkpoint(run, 1), run=run, keep_latest=None,
                                      now=T0, items=[])
        with pytest.raises(SharedItemGone) as refused:
            await store.append_with_items(
                key, msgspec.structs.replace(make_checkpoint(run, 2), refs=("w/1", "w/0")),
                run=run, keep_latest=None, now=T0 + 5, items=[])
    assert refused.value.keys == ("w/1", "w/0")


# -- items nested under a shared item --------------------------------------------------------


async def _append_under(
    store: SQLiteStore | MemoryStore, run: RunRecord, sequence: int, anchor: str,
    items: list[Item], *,
    keep_latest: int | None = None, also: tuple[str, ...] = (),
) -> None:
    """Checkpoint ``sequence`` naming only ``anchor`` (and ``also``), written with ``items``."""
    record = msgspec.structs.replace(make_checkpoint(run, sequence), refs=(anchor, *also))
    await store.append_with_items(key_of(run), record, run=run, keep_latest=keep_latest,
                                  now=T0, items=items)


@pytest.mark.parametrize("anchor", ["", "\0", "a\nb", "\\", "\U0010ffff", "a\U0010ffff",
                                    "k" * 123])
async def test_nested_items_are_the_range_of_their_prefix_in_code_point_order(
    store: SQLiteStore, anchor: str
) -> None:
    """What sorts next to ``K + "/"`` but is not under it (``K.``, ``K0``, ``K\\0/``, ``K`` +
    U+10FFFF) is neither read with ``K`` nor removed with it."""
    run = make_run("nested edges")
    key = key_of(run)
    nested = [anchor + "/", anchor + "/x", anchor + "/\0", anchor + "/\U0010ffff"]
    siblings = [anchor + ".", anchor + "0", anchor + "\0/", anchor + "\U0010ffff/"]
    with anyio.fail_after(30):
        await store.put_items(key, [make_item(k) for k in siblings], now=T0)
        await _append_under(store, run, 0, anchor, [make_item(anchor), make_item(nested[0])])
        await _append_under(store, run, 1, anchor, [make_item(k) for k in nested[1:]])
        found = await store.read_with_items(key, sequence=0, now=T0)
        await _append_under(store, run, 2, "~other", [make_item("~other")], keep_latest=1)
        left = await store.scan_items(key, limit=100, now=T0)
    assert found is not None
    assert found[2] == {k: f"value-{k}".encode() for k in [anchor, *nested]}
    assert [k for k, _ in left] == sorted([*siblings, "~other"])


@pytest.mark.parametrize("anchor", ["k", "", "k\0", "k\U0010ffff"])
async def test_what_goes_with_an_anchor_spares_the_keys_others_name_and_nothing_else(
    store: SQLiteStore, anchor: str
) -> None:
    """The removal of the last checkpoint naming ``K`` keeps ``K/b`` (another checkpoint names
    it), what is nested under it and an item another checkpoint owns under ``K/``, and takes
    every other item under ``K/``, also those that sort between ``K/b`` and ``K/b/`` or next
    after what is nested under it: as the memory store does."""
    run = make_run("spared keys")
    key = key_of(run)
    named = anchor + "/b"
    around = [named + "\0", named + "!", named + ".", named + "0", named + "\U0010ffff",
              anchor + "/", anchor + "/a", anchor + "/c"]
    kept = [named, named + "/", named + "/\0", named + "/y", anchor + "/w"]
    memory = MemoryStore()
    with anyio.fail_after(30):
        for each in (store, memory):
            await _append_under(each, run, 0, anchor, [make_item(anchor)])
            await _append_under(each, run, 1, named, [
                make_item(k) for k in [named, *kept[1:-1], *around]])
            await _append_under(each, run, 2, "~other", [
                make_item("~other"), make_item(anchor + "/w", owner=2)])
            assert await each.delete(key, 0, checkpoint_id=checkpoint_id_of(run, 0))
        left = await store.scan_items(key, limit=100, now=T0)
        assert left == await memory.scan_items(key, limit=100, now=T0)
        found = await store.read_with_items(key, sequence=1, now=T0)
    assert [k for k, _ in left] == sorted([*kept, "~other"])
    assert found is not None
    assert sorted(found[2]) == sorted(kept[:-1])


# -- costs ------------------------------------------------------------------------------------


async def test_one_thread_hop_per_operation(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    hops = count_hops(monkeypatch)
    seed = msgspec.structs.replace(make_run("hops"), labels=("thread:1",))
    key = key_of(seed)
    own = checkpoint_id_of(seed, 1)
    operations: list[Callable[[], Awaitable[object]]] = [
        lambda: _append(store, seed, 0),  # the first one also opens the database
        lambda: store.append_with_items(
            key, msgspec.structs.replace(make_checkpoint(seed, 1), refs=("b/a",)), run=seed,
            keep_latest=1, now=T0, items=[make_item("b/a"), make_item("w", owner=1)]),
        lambda: store.read_with_items(key, sequence=None, now=T0),
        lambda: store.put_owned_items(key, [make_item("w2", owner=1)], owner=1,
                                      checkpoint_id=own, if_absent=True, now=T0),
        lambda: store.get(key, 1, now=T0),
        lambda: store.latest(key, now=T0),
        lambda: store.headers(key, before=None, limit=10, now=T0),
        lambda: store.get_run(key, now=T0),
        lambda: store.update_run(
            key, incarnation=seed.incarnation, version=0, status="paused", data=b"", now=T0),
        lambda: store.list_runs(status="paused", limit=10, cursor=None, now=T0),
        lambda: store.runs_with_label("thread:1", limit=10, cursor=None, now=T0),
        lambda: store.count_runs(status=None, now=T0),
        lambda: store.put_items(key, [make_item("a"), make_item("b", owner=1)], now=T0),
        lambda: store.get_items(key, ["a", "b"], now=T0),
        lambda: store.scan_items(key, now=T0),
        lambda: store.delete_items(key, ["a"]),
        lambda: store.delete(key, 1, checkpoint_id=own),
        lambda: store.purge_expired(now=T0, limit=10),
        lambda: store.damaged_runs(now=T0),
        lambda: store.delete_run(key),
        store.provision,
        store.aclose,
    ]
    with anyio.fail_after(30):
        for operation in operations:
            before = len(hops)
            await operation()
            assert len(hops) == before + 1, hops[before:]
        await store.aclose()  # nothing open any more: no hop
    assert len(hops) == len(operations)


class _Steps:
    """Counts the SQLite virtual machine steps of every statement the store runs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = SQLiteStore._connect

        def counted(store: SQLiteStore) -> sqlite3.Connection:
            db = real(store)
            db.set_progress_handler(self._step, 1)
            return db

        monkeypatch.setattr(SQLiteStore, "_connect", counted)

    def _step(self) -> int:
        self.count += 1
        return 0

    async def of(self, call: Callable[[], Awaitable[object]]) -> int:
        before = self.count
        await call()
        return self.count - before


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # steps of SQLite, not of the loop
async def test_reads_and_appends_cost_the_same_in_a_long_run(
    database: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = _Steps(monkeypatch)
    store = SQLiteStore(database)
    costs: dict[int, dict[str, int]] = {}
    run = make_run("growing")
    key = key_of(run)
    with anyio.fail_after(60):
        held = 0
        for size in (10, 2000):
            for sequence in range(held, size - 1):
                await _append(store, run, sequence, payload=b"p")
            held = size
            costs[size] = {
                "append": await steps.of(
                    functools.partial(_append, store, run, size - 1, payload=b"p")),
                "latest": await steps.of(lambda: store.latest(key, now=T0)),
                "get": await steps.of(lambda: store.get(key, 3, now=T0)),
                "headers": await steps.of(
                    lambda: store.headers(key, before=None, limit=10, now=T0)),
                "purge": await steps.of(lambda: store.purge_expired(now=T0, limit=100)),
            }
        await store.aclose()
    for operation, small in costs[10].items():
        assert costs[2000][operation] <= small * 1.2 + 10, (operation, costs)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # steps of SQLite, not of the loop
async def test_pruning_with_expiry_costs_the_same_in_a_long_run(
    database: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = _Steps(monkeypatch)
    store = SQLiteStore(database)
    run = make_run("pruned")
    costs = []
    with anyio.fail_after(60):
        for sequence in range(1500):
            now = T0 + sequence
            cost = await steps.of(functools.partial(
                _append, store, run, sequence, now=now, expires_at=now + 5, keep_latest=3))
            costs.append(cost)
        await store.aclose()
    assert max(costs[1400:]) <= max(costs[10:100]) * 1.2, (costs[10:20], costs[1400:1410])


async def test_pruning_writes_no_freed_page_again(database: Path) -> None:
    """Builds whose SQLite zeroes freed pages (secure_delete on) would write a pruned
    checkpoint's pages to the WAL once more on every append."""
    store = SQLiteStore(database)
    run = make_run("pruned pages")
    payload = random.Random(3).randbytes(40_000)  # ten overflow pages
    with anyio.fail_after(60):
        for sequence in range(20):
            await _append(store, run, sequence, keep_latest=5, payload=payload)
        assert store._writer is not None
        store._writer.execute("PRAGMA wal_autocheckpoint = 0")
        store._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        for sequence in range(20, 40):
            await _append(store, run, sequence, keep_latest=5, payload=payload)
        frames = (database.parent / "checkpoints.db-wal").stat().st_size // 4120
        await store.aclose()
    assert frames / 20 <= 10 + 8, f"{frames / 20} pages written per pruned append"


class _Statements:
    """Records the statements the store's connections run (each execution of an
    ``executemany`` too)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.run: list[str] = []
        real = SQLiteStore._connect

        def traced(store: SQLiteStore) -> sqlite3.Connection:
            db = real(store)
            db.set_trace_callback(self.run.append)
            return db

        monkeypatch.setattr(SQLiteStore, "_connect", traced)

    async def of(self, call: Callable[[], Awaitable[object]]) -> list[str]:
        before = len(self.run)
        await call()
        return self.run[before:]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("spared", [(), ("h/log/0003",)])
async def test_a_thousand_nested_items_are_read_and_removed_by_as_many_statements_as_one(
    database: Path, monkeypatch: pytest.MonkeyPatch, spared: tuple[str, ...]
) -> None:
    """A history of 1,000 items of 1 KB under one anchor: ``read_with_items`` reads it with the
    statements that read 10, and the removal of the anchor's last reference deletes it with the
    statements that delete 10, also around an item under it that a held checkpoint names."""
    statements = _Statements(monkeypatch)
    store = SQLiteStore(database)
    reads: dict[int, list[str]] = {}
    removals: dict[int, list[str]] = {}
    value = random.Random(5).randbytes(1000)
    with anyio.fail_after(60):
        for count in (10, 1000):
            run = make_run(f"history of {count}")
            key = key_of(run)
            await _append_under(store, run, 0, "h/log", [make_item("h/log")])
            step = count // 10
            for sequence in range(1, 11):
                await _append_under(store, run, sequence, "h/log", [
                    make_item(f"h/log/{n:04}", value) for n in range(step * (sequence - 1),
                                                                     step * sequence)
                ])
            found = await store.read_with_items(key, sequence=None, now=T0)  # opens a reader
            reads[count] = await statements.of(
                functools.partial(store.read_with_items, key, sequence=None, now=T0))
            assert found is not None
            assert len(found[2]) == count + 1
            removals[count] = await statements.of(functools.partial(
                _append_under, store, run, 11, "h/next", [make_item("h/next")], keep_latest=1,
                also=spared))
            left = await store.scan_items(key, prefix="h/log", now=T0)
            assert [item for item, _ in left] == list(spared)
        await store.aclose()
    assert len(reads[1000]) == len(reads[10]) == 5, reads[10]  # BEGIN, LATEST, refs, owned, COMMIT
    assert len(removals[1000]) == len(removals[10]), removals[10]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # steps of SQLite, not of the loop
async def test_pruning_what_names_an_anchor_never_walks_what_is_nested_under_it(
    database: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every append prunes a checkpoint naming the anchor while newer ones still name it: it
    costs the same with 10 and with 1,000 items nested under the anchor."""
    steps = _Steps(monkeypatch)
    store = SQLiteStore(database)
    run = make_run("long history")
    costs: dict[int, int] = {}
    with anyio.fail_after(60):
        await _append_under(store, run, 0, "h/log", [make_item("h/log")])
        for sequence in range(1, 1001):
            call = functools.partial(_append_under, store, run, sequence, "h/log",
                                     [make_item(f"h/log/{sequence:04}")], keep_latest=3)
            if sequence in (10, 1000):
                costs[sequence] = await steps.of(call)
            else:
                await call()
        found = await store.read_with_items(key_of(run), sequence=None, now=T0)
        await store.aclose()
    assert found is not None
    assert len(found[2]) == 1001
    assert costs[1000] <= costs[10] * 1.2 + 10, costs


# -- several processes ------------------------------------------------------------------------


def _worker_command(*args: str) -> list[str]:
    return [sys.executable, str(WORKER), *args]


def _worker_env(backend: str) -> dict[str, str]:
    """The workers run their store on the test's event loop library."""
    package_root = str(Path(fastcheckpoint.__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": package_root + (os.pathsep + path if path else ""),
        worker.BACKEND_VARIABLE: backend,
    }


async def test_four_processes_append_to_one_run(database: Path, anyio_backend: str) -> None:
    with anyio.fail_after(30):
        await SQLiteStore(database).provision()
    run_id = "shared by four processes"
    commands = {f"w{index}": _worker_command("append", str(database), run_id, "25", f"w{index}")
                for index in range(4)}

    with anyio.fail_after(120):
        acknowledged = await acks_of_workers(commands, _worker_env(anyio_backend))
        assert sorted(acknowledged) == list(range(100))
        store = SQLiteStore(database)
        key = _ids.run_key(run_id)
        run = await store.get_run(key, now=T0)
        assert run is not None
        assert (run.latest_sequence, run.checkpoint_count) == (99, 100)
        found, _ = await store.headers(key, before=None, limit=1000, now=T0)
        assert [header.sequence for header in found] == list(range(99, -1, -1))
        for sequence, name in acknowledged.items():
            got = await store.read_with_items(key, sequence=sequence, now=T0)
            assert got is not None
            assert got[0].header == worker.header_for(sequence, name)
            assert got[0].payload == worker.payload_for(sequence, name)
            assert got[0].checkpoint_id == _ids.checkpoint_id(key, run.incarnation, sequence)
            assert got[2] == {"shared": b"written once",
                              f"w/{sequence}": worker.item_for(sequence, name).value}
        await store.aclose()
    assert _query(database, "SELECT holders FROM fc_item_refs") == [(100,)]


async def _append_until_killed(
    database: Path, run_id: str, delay: float, keep: int, synchronous: str, log: Path,
    anyio_backend: str,
) -> list[int]:
    """Start a writer, SIGKILL it ``delay`` seconds after its first acknowledgement."""
    command = _worker_command("forever", str(database), run_id, str(keep), synchronous)
    return await acks_until_killed(command, _worker_env(anyio_backend), log, delay)


async def test_kill_9_at_random_instants_loses_no_acknowledged_checkpoint(
    tmp_path: Path, database: Path, anyio_backend: str
) -> None:
    with anyio.fail_after(30):
        await SQLiteStore(database).provision()
    chance = random.Random(15)
    for attempt in range(6):
        run_id = f"killed-{attempt}"
        keep = (0, 3)[attempt % 2]
        synchronous = ("full", "normal")[attempt // 3]  # normal survives a process crash too
        with anyio.fail_after(60):
            acknowledged = await _append_until_killed(
                database, run_id, chance.uniform(0.02, 0.4), keep, synchronous,
                tmp_path / f"err-{attempt}", anyio_backend,
            )
            assert acknowledged == list(range(len(acknowledged)))
            await _check_survivors(database, run_id, acknowledged, keep)
    assert _query(database, "PRAGMA integrity_check") == [("ok",)]


async def _check_survivors(database: Path, run_id: str, acknowledged: list[int],
                           keep: int) -> None:
    """Every acknowledged checkpoint (that pruning kept) is whole; the one in flight at the
    kill committed entirely or not at all; the run takes the next sequence."""
    store = SQLiteStore(database)
    key = _ids.run_key(run_id)
    run = await store.get_run(key, now=T0)
    assert run is not None
    newest = run.latest_sequence
    assert newest in (acknowledged[-1], acknowledged[-1] + 1)
    held = list(range(newest, -1, -1) if keep == 0 else range(newest, newest - keep, -1))
    found, _ = await store.headers(key, before=None, limit=10_000, now=T0)
    assert [header.sequence for header in found] == [s for s in held if s >= 0]
    assert run.checkpoint_count == len(found)
    for sequence in (s for s in held if s >= 0):
        got = await store.read_with_items(key, sequence=sequence, now=T0)
        assert got is not None, f"checkpoint {sequence} lost"
        assert got[0].payload == worker.payload_for(sequence, "forever")
        assert got[2] == {"shared": b"written once",
                          f"w/{sequence}": worker.item_for(sequence, "forever").value}
    with pytest.raises(SequenceConflict):
        await store.append(key, make_checkpoint(run, newest + 2), run=run, keep_latest=None,
                           now=T0)
    await store.append(key, make_checkpoint(run, newest + 1), run=run, keep_latest=None, now=T0)
    found_latest = await store.latest(key, now=T0)
    assert found_latest is not None
    assert without_key(found_latest[0]) == make_checkpoint(run, newest + 1)
    assert await store.purge_expired(now=T0, limit=1000) == (0, True)
    await store.aclose()


# -- damaged refs -----------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["garbage", "empty text", "not UTF-8", "NULL"])
async def test_removing_a_checkpoint_whose_refs_were_damaged_frees_what_no_checkpoint_names(
    store: SQLiteStore, caplog: pytest.LogCaptureFixture, damage: str,
) -> None:
    """Checkpoint 0 named A; its refs are then overwritten. Removing it, then checkpoint 1
    (A and B), frees A (it leaked until the run went), keeps B and what is nested under it for
    checkpoint 2, and the read of the damaged checkpoint raises where it trips."""
    run = make_run("damaged refs")
    key = key_of(run)
    shared = [make_item("A"), make_item("A/1"), make_item("B"), make_item("B/1")]
    named = {0: ("A",), 1: ("A", "B"), 2: ("B",)}
    with anyio.fail_after(30):
        for sequence, refs in named.items():
            record = msgspec.structs.replace(make_checkpoint(run, sequence), refs=refs)
            await store.append_with_items(key, record, run=run, keep_latest=None, now=T0,
                                          items=shared if sequence == 0 else [])
        if damage == "not UTF-8":
            await anyio.to_thread.run_sync(
                _not_utf8, store.path, "UPDATE fc_checkpoints SET refs = CAST(? AS TEXT) "
                "WHERE run_key = ? AND sequence = 0", key)
            with pytest.raises(CorruptCheckpointError):
                await store.read_with_items(key, sequence=0, now=T0)
        else:
            # "": one key, the empty one; NULL: no refs, as a checkpoint that names none
            refs = {"garbage": "no such key", "empty text": "", "NULL": None}[damage]
            await anyio.to_thread.run_sync(
                _query, store.path, "UPDATE fc_checkpoints SET refs = ? "
                "WHERE run_key = ? AND sequence = 0", refs, key)
        await store.delete(key, 0, checkpoint_id=checkpoint_id_of(run, 0))
        await store.delete(key, 1, checkpoint_id=checkpoint_id_of(run, 1))
        found = await store.read_with_items(key, sequence=2, now=T0)
        left = await store.scan_items(key, now=T0)

    assert found is not None
    assert found[2] == {"B": b"value-B", "B/1": b"value-B/1"}
    assert [item for item, _ in left] == ["B", "B/1"]
    assert "contradict the run's reference counts" in caplog.text


async def test_removing_a_checkpoint_whose_expiry_was_erased_leaves_the_run_writable(
    store: SQLiteStore, caplog: pytest.LogCaptureFixture,
) -> None:
    """Checkpoint 0 expires, then its ``expires_at`` is overwritten with NULL: pruning it
    counted it as a never-expiring checkpoint the run row did not count, so the count went
    below zero and every append that pruned it failed (the row's CHECK); now it is counted
    again, and the run expires with its checkpoints."""
    run = make_run("erased expiry", expires_at=T0 + 10)
    key = key_of(run)
    with anyio.fail_after(30):
        for sequence in range(3):
            await store.append(key, make_checkpoint(run, sequence, expires_at=T0 + 10),
                               run=run, keep_latest=None, now=T0)
        await anyio.to_thread.run_sync(
            _query, store.path, "UPDATE fc_checkpoints SET expires_at = NULL "
            "WHERE run_key = ? AND sequence = 0", key)
        await store.append(key, make_checkpoint(run, 3, expires_at=T0 + 10), run=run,
                           keep_latest=2, now=T0)
        held = await store.get_run(key, now=T0)
        assert await store.delete(key, 2, checkpoint_id=checkpoint_id_of(run, 2))
        assert await store.purge_expired(now=T0 + 20, limit=100) == (1, True)
        rows = await anyio.to_thread.run_sync(
            _query, store.path, "SELECT count(*) FROM fc_checkpoints WHERE run_key = ?", key)
    assert held is not None
    assert (held.latest_sequence, held.checkpoint_count, held.expires_at) == (3, 2, T0 + 10)
    assert rows == [(0,)]
    assert "had lost its expiry" in caplog.text
