"""FileStore beyond the shared contract: layout, permissions, hostile keys, corruption, crash
leftovers, thread hops, O(1) latest, several processes on one directory, and ``kill -9``."""

from __future__ import annotations

import base64
import errno
import fcntl
import importlib.util
import logging
import os
import random
import stat
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import anyio.to_thread
import msgspec
import pytest

import fastcheckpoint
from fastcheckpoint import _ids
from fastcheckpoint.errors import (
    ConfigurationError,
    CorruptCheckpointError,
    SequenceConflict,
    StoreError,
    ValidationError,
)
from fastcheckpoint.stores import Item, RunRecord, open_store
from fastcheckpoint.stores import _file_log as file_log
from fastcheckpoint.stores import file as file_store
from fastcheckpoint.stores.file import MAX_ITEM_KEY_BYTES, FileCheckpointStore, FileStore
from fastcheckpoint.testing import (
    T0,
    checkpoint_id_of,
    key_of,
    make_checkpoint,
    make_item,
    make_run,
    without_key,
)
from tests import _sweeps as sweeps
from tests._file_records import (
    LogRecord,
    checkpoint_record,
    checkpoint_sequences,
    count_calls,
    count_pread_bytes,
    fail_first_sync_while,
    forget_items,
)
from tests._helpers import acks_of_workers, acks_until_killed, count_hops

pytestmark = pytest.mark.anyio

LOGGER = "fastcheckpoint.stores.file"
WORKER = Path(__file__).resolve().parents[2] / "file_worker.py"


def _load_worker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("file_worker", WORKER)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker()


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
    record = make_checkpoint(run, sequence, created_at=now, expires_at=expires_at, payload=payload)
    seed = msgspec.structs.replace(run, expires_at=expires_at)
    await store.append(key_of(run), record, run=seed, keep_latest=keep_latest, now=now)


def _checkpoint_file(root: Path, run: RunRecord, sequence: int) -> LogRecord:
    return checkpoint_record(root, key_of(run), sequence)


def _files(root: Path) -> Iterator[Path]:
    for directory, subdirectories, names in os.walk(root):
        for name in subdirectories + names:
            yield Path(directory) / name


def _warnings(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(
        record.getMessage()
        for record in caplog.records
        if record.name == LOGGER and record.levelno >= logging.WARNING
    )


def _assert_only_crash_warnings(caplog: pytest.LogCaptureFixture) -> None:
    """What a kill -9 may leave: temp files (removed by purge_expired)."""
    for line in _warnings(caplog).splitlines():
        assert line.endswith("left by an interrupted write"), line


# -- construction -----------------------------------------------------------------------------


def test_from_url_forms(tmp_path: Path) -> None:
    absolute = tmp_path / "from url"
    by_url = FileStore.from_url(f"file://{absolute.as_posix().replace(' ', '%20')}?fsync=false")
    assert repr(by_url) == f"FileStore({str(absolute)!r}, fsync=False)"
    assert absolute.is_dir()
    plain = open_store(str(tmp_path / "plain"))
    assert isinstance(plain, FileStore)
    assert repr(plain) == f"FileStore({str(tmp_path / 'plain')!r}, fsync=True)"
    localhost = FileStore.from_url(f"file://localhost{tmp_path}/l", fsync="0")
    assert repr(localhost).endswith("fsync=False)")


async def test_fastagentic_constructor_shape(tmp_path: Path) -> None:
    by_keyword = FileCheckpointStore(base_path=tmp_path / "fa")
    positional = FileCheckpointStore(str(tmp_path / "fa"), fsync=False)
    assert isinstance(by_keyword, FileStore)
    assert by_keyword.base_path == positional.base_path == tmp_path / "fa"
    assert isinstance(by_keyword.base_path, Path)
    assert repr(positional) == f"FileCheckpointStore({str(tmp_path / 'fa')!r}, fsync=False)"
    with pytest.raises(TypeError):
        FileCheckpointStore(base_path=tmp_path / "fa", compress=True)
    seed = make_run("fastagentic")
    with anyio.fail_after(30):
        await _append(by_keyword, seed, 0)
        found = await positional.get(key_of(seed), 0, now=T0)
    assert found is not None
    assert without_key(found[0]) == make_checkpoint(seed, 0)


@pytest.mark.parametrize(
    ("query", "options", "name"), [("?fsnyc=false", {}, "fsnyc"), ("", {"fsyn": 0}, "fsyn")]
)
def test_unknown_options_name_the_nearest_known_one(
    tmp_path: Path, query: str, options: dict[str, Any], name: str
) -> None:
    expected = f"unknown option '{name}' for the file:// store; did you mean 'fsync'?"
    with pytest.raises(ConfigurationError) as caught:
        open_store(f"file://{tmp_path}{query}", **options)
    assert str(caught.value) == expected + " Known options: fsync."


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("file://relative/path", {}),
        ("redis://localhost/0", {}),
        ("file:///tmp/x?sync=false", {}),
        ("file:///tmp/x?fsync=maybe", {}),
        ("file:///tmp/x", {"compress": True}),
        ("file://", {}),
    ],
)
def test_from_url_rejects(url: str, options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        FileStore.from_url(url, **options)


@pytest.mark.parametrize(
    "make",
    [
        lambda: open_store("file:///tmp/a%00b"),
        lambda: FileStore("/tmp/a\0b"),
        lambda: FileStore(3),  # type: ignore[arg-type]
        lambda: FileStore(""),
        lambda: FileStore("/"),
        lambda: open_store("file:///"),
        lambda: open_store("file://localhost/"),
    ],
)
def test_an_unusable_path_is_a_configuration_error(make: Callable[[], object]) -> None:
    """A NUL in a URL used to escape as a raw ValueError (and a non-path as a TypeError); an
    empty path made the store's directories in the working directory, and ``file:///`` made
    them in the filesystem's root."""
    with pytest.raises(ConfigurationError, match="file store path"):
        make()


def test_root_that_is_a_file_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(fastcheckpoint.errors.StoreError, match="file"):
        FileStore(tmp_path / "file")


def _synced_directories(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The directories ``os.fsync`` is called on from now on (by their path)."""
    synced: list[Path] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_a_new_store_syncs_the_names_of_the_directories_it_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run's first commit syncs only up to runs/: without these, a power cut after the first
    # acknowledged create could take runs/ (or the whole store) with it.
    synced = _synced_directories(monkeypatch)
    root = tmp_path / "a" / "b" / "store"
    FileStore(root)
    assert {tmp_path, tmp_path / "a", tmp_path / "a" / "b", root} <= set(synced)


def test_a_store_another_process_just_made_syncs_its_names_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The other process may not have synced them yet when this one acknowledges a create.
    root = tmp_path / "store"
    (root / "runs").mkdir(parents=True)
    synced = _synced_directories(monkeypatch)
    FileStore(root)
    assert {tmp_path, root} <= set(synced)
    synced.clear()
    FileStore(root, fsync=False)
    assert synced == []


# -- layout and permissions -------------------------------------------------------------------


async def test_files_0600_directories_0700_even_with_umask_0(root: Path) -> None:
    previous = os.umask(0)
    try:
        with anyio.fail_after(30):
            store = FileStore(root)
            seed = make_run("perms")
            await _append(store, seed, 0)
            await _append(store, seed, 1)
            await store.put_items(key_of(seed), [make_item("k", owner=1)], now=T0)
            await store.update_run(
                key_of(seed),
                incarnation=seed.incarnation,
                version=0,
                status="paused",
                data=b"",
                now=T0,
            )
    finally:
        os.umask(previous)
    _assert_private(root)


def _assert_private(root: Path) -> None:
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    checked = 0
    for path in _files(root):
        info = path.lstat()
        expected = 0o700 if stat.S_ISDIR(info.st_mode) else 0o600
        assert stat.S_IMODE(info.st_mode) == expected, f"{path} has mode {info.st_mode:o}"
        checked += 1
    assert checked > 10


def _assert_inside(root: Path) -> None:
    for path in _files(root):
        assert path.resolve().is_relative_to(root.resolve()), path
        assert not path.is_symlink(), path


async def test_layout_stays_under_root_and_is_cleaned(tmp_path: Path, root: Path) -> None:
    store = FileStore(root)
    seed = make_run("../../escape/\x00/" + "é" * 300)
    with anyio.fail_after(30):
        await _append(store, seed, 0)
        items = [make_item("../../x"), make_item("/etc/passwd")]
        await store.put_items(key_of(seed), items, now=T0)
        assert sorted(os.listdir(tmp_path)) == ["store"]
        assert sorted(os.listdir(root)) == ["index", "locks", "runs", "tmp", "trash"]
        _assert_inside(root)
        assert os.listdir(root / "tmp") == []
        assert os.listdir(root / "locks") == [key_of(seed)]

        assert await store.delete_run(key_of(seed)) == 1

    assert os.listdir(root / "runs") == []
    assert os.listdir(root / "trash") == []
    assert os.listdir(root / "locks") == []
    assert all(not os.listdir(root / "index" / status) for status in os.listdir(root / "index"))


@pytest.mark.parametrize("bad", ["", "A" * 24, "a" * 23, "a" * 25, "../" * 8, "a1" * 12, 7])
async def test_run_keys_are_validated(store: FileStore, bad: Any) -> None:
    with anyio.fail_after(30):
        with pytest.raises(ValidationError):
            await store.get(bad, 0, now=T0)
        with pytest.raises(ValidationError):
            await store.delete_run(bad)
        with pytest.raises(ValidationError):
            await store.put_items(bad, [make_item("k")], now=T0)


HOSTILE_KEYS = [
    "",
    ".",
    "..",
    "../x",
    "../../../../etc/passwd",
    "/abs",
    "a/b/../../c",
    "nul\x00byte",
    "\\windows\\path",
    "CON",
    "A",
    "a",
    "é",
    "\U0001f600" * 32,  # exactly 128 bytes of UTF-8
    "z" * MAX_ITEM_KEY_BYTES,
    "\u202eright-to-left",
    "new\nline",
]


async def test_hostile_item_keys_round_trip_in_code_point_order(root: Path) -> None:
    store = FileStore(root)
    seed = make_run("hostile")
    key = key_of(seed)
    with anyio.fail_after(30):
        await _append(store, seed, 0)
        await store.put_items(key, [make_item(item) for item in HOSTILE_KEYS], now=T0)

        assert await store.get_items(key, HOSTILE_KEYS, now=T0) == {
            item: f"value-{item}".encode() for item in HOSTILE_KEYS
        }
        scanned = await store.scan_items(key, limit=100, now=T0)
        assert [item for item, _ in scanned] == sorted(HOSTILE_KEYS)
        forget_items(root, key)  # a new process scans the log for them
        assert await store.scan_items(key, limit=100, now=T0) == scanned
        assert sorted(os.listdir(root / "runs" / key)) == ["idx", "log"]
        assert await store.delete_items(key, HOSTILE_KEYS) == len(HOSTILE_KEYS)
        assert await store.scan_items(key, limit=100, now=T0) == []

    _assert_inside(root)
    assert sorted(os.listdir(root / "runs" / key)) == ["idx", "log"]


@pytest.mark.parametrize("bad", ["x" * (MAX_ITEM_KEY_BYTES + 1), "é" * 65, "lone \ud800", None])
async def test_unacceptable_item_keys_are_validation_errors(store: FileStore, bad: Any) -> None:
    seed = make_run("bad-keys")
    with anyio.fail_after(30):
        await _append(store, seed, 0)
        hostile = Item(key=bad, value=b"v")
        with pytest.raises(ValidationError):
            await store.put_items(key_of(seed), [make_item("ok"), hostile], now=T0)
        with pytest.raises(ValidationError):
            await store.get_items(key_of(seed), [bad], now=T0)
        assert await store.scan_items(key_of(seed), now=T0) == []


# -- corruption and foreign files -------------------------------------------------------------


async def _five(store: FileStore, name: str = "damaged") -> RunRecord:
    seed = make_run(name)
    for sequence in range(5):
        await _append(store, seed, sequence, payload=b"payload-%d" % sequence * 100)
    return seed


async def test_corrupt_and_foreign_files_are_skipped_by_listings(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = FileStore(root)
    with anyio.fail_after(30):
        seed = await _five(store)
        other = await _five(store, "healthy")
        await _append(store, make_run("expiring"), 0, expires_at=T0 + 10)
        key = key_of(seed)
        flipped = _checkpoint_file(root, seed, 1)
        data = bytearray(flipped.read_bytes())
        data[40] ^= 0xFF  # inside the metadata: the header checksum no longer matches
        flipped.write_bytes(bytes(data))
        truncated = _checkpoint_file(root, seed, 2)
        truncated.write_bytes(truncated.read_bytes()[:10])
        junk = _checkpoint_file(root, seed, 3)
        junk.write_bytes(random.Random(3).randbytes(5000))
        (root / "runs" / "notes.txt").write_text("hello")
        (root / "tmp" / "notes.txt").write_text("hello")
        (root / "index" / "notes.txt").write_text("hello")
        caplog.set_level(logging.WARNING, logger=LOGGER)

        found, status = await store.headers(key, before=None, limit=10, now=T0)
        assert ([header.sequence for header in found], status) == ([4, 0], "active")
        assert await store.scan_items(key, now=T0) == []
        runs, _ = await store.list_runs(status=None, limit=10, cursor=None, now=T0)
        assert sorted(run.run_id for run in runs) == ["damaged", "expiring", "healthy"]
        assert await store.count_runs(status="active", now=T0) == 3
        assert await store.purge_expired(now=T0 + 10, limit=100) == (1, True)
        latest = await store.latest(key, now=T0)
        assert latest is not None
        assert latest[0].sequence == 4

        for path in (flipped, truncated, junk):
            with pytest.raises(CorruptCheckpointError) as caught:
                await store.get(key, path.key, now=T0)
            assert caught.value.key == str(path)
        assert (await store.get(key_of(other), 1, now=T0)) is not None

    logged = _warnings(caplog)
    for path in (flipped, truncated, junk):
        assert f"skipping corrupt checkpoint {path}:" in logged
    for foreign in (
        "runs/notes.txt",
        "tmp/notes.txt",
        "index/notes.txt",
    ):
        assert f"{root / foreign}\n" in logged + "\n"


async def test_a_directory_where_the_log_belongs(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = FileStore(root)
    with anyio.fail_after(30):
        seed = await _five(store)
        await _five(store, "healthy")
        log = root / "runs" / key_of(seed) / "log"
        log.unlink()
        log.mkdir()
        caplog.set_level(logging.WARNING, logger=LOGGER)

        with pytest.raises(CorruptCheckpointError, match="not a regular file") as caught:
            await store.latest(key_of(seed), now=T0)
        assert caught.value.key == str(log)
        runs, _ = await store.list_runs(status=None, limit=10, cursor=None, now=T0)
        assert [run.run_id for run in runs] == ["healthy"]
        assert await store.purge_expired(now=T0, limit=10) == (0, True)
    assert str(log) in _warnings(caplog)


# -- crash leftovers --------------------------------------------------------------------------


async def test_purge_leaves_a_compaction_copy_alone_while_it_is_made(root: Path) -> None:
    """A compaction copies a run's log into tmp/ without the run lock; the sweep of crashed
    writers' temporary files must not remove the copy then, only once nobody holds it."""
    store = FileStore(root)
    seed = make_run("copying")
    key = key_of(seed)
    with anyio.fail_after(30):
        await _append(store, seed, 0)
        copy = root / "tmp" / f"{key}.0123456789abcdef"
        fd = os.open(copy, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # as a compaction holds its copy
            assert await store.purge_expired(now=T0, limit=100) == (0, True)
            assert copy.exists()
        finally:
            os.close(fd)
        assert await store.purge_expired(now=T0, limit=100) == (0, True)
    assert not copy.exists()


async def test_purge_removes_stale_temp_files_trash_and_markers(root: Path) -> None:
    store = FileStore(root)
    seed = make_run("sweep")
    key = key_of(seed)
    with anyio.fail_after(30):
        await _append(store, seed, 0)
        stale_temp = root / "tmp" / f"{key}.0123456789abcdef"
        stale_temp.write_bytes(b"half a checkpoint")
        orphan_temp = root / "tmp" / f"{'q' * 24}.0123456789abcdef"
        orphan_temp.write_bytes(b"of a run that never committed")
        (root / "trash" / f"{key}.feedfacefeedface" / "c").mkdir(parents=True)
        (root / "trash" / f"{key}.feedfacefeedface" / "c" / "x").write_bytes(b"x")
        uncommitted = root / "runs" / ("r" * 24) / "c"
        uncommitted.mkdir(parents=True)
        (uncommitted / f"{0:020d}").write_bytes(b"first write, then kill -9")
        # A crash in update_run between the new marker and the commit leaves this behind.
        paused = "s" + base64.b32hexencode(b"paused").decode().rstrip("=").lower()
        (marker,) = _marker_names(root)
        (root / "index" / paused).mkdir()
        (root / "index" / paused / marker).touch()

        assert await store.list_runs(status="paused", limit=10, cursor=None, now=T0) == ([], None)
        assert await store.count_runs(status=None, now=T0) == 1

        assert await store.purge_expired(now=T0, limit=100) == (0, True)

    assert os.listdir(root / "tmp") == []
    assert os.listdir(root / "trash") == []
    assert os.listdir(root / "runs") == [key]
    assert os.listdir(root / "index" / paused) == []
    assert os.listdir(root / "locks") == [key]


def _marker_names(root: Path) -> list[str]:
    index = root / "index"
    return [name for status in os.listdir(index) for name in os.listdir(index / status)]


async def test_items_only_run_disappears_when_its_items_expire(root: Path) -> None:
    store = FileStore(root)
    key = key_of(make_run("items-only"))
    with anyio.fail_after(30):
        await store.put_items(key, [make_item("a", expires_at=T0 + 5)], now=T0)
        assert await store.get_items(key, ["a"], now=T0) == {"a": b"value-a"}
        assert await store.get_run(key, now=T0) is None
        assert await store.purge_expired(now=T0 + 5, limit=10) == (0, True)
    assert os.listdir(root / "runs") == []
    assert os.listdir(root / "locks") == []


# -- failures after the commit point ---------------------------------------------------------


def _failing_unlink(monkeypatch: pytest.MonkeyPatch, refuse: Callable[[str], bool]) -> list[str]:
    """Make ``os.unlink`` fail with EIO on the paths ``refuse`` picks; returns those it refused."""
    refused: list[str] = []
    real = os.unlink

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        text = os.fsdecode(path)
        if refuse(text):
            refused.append(text)
            raise OSError(errno.EIO, os.strerror(errno.EIO), text)
        real(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    return refused


async def test_failed_marker_move_after_commit_does_not_fail_update_run(
    root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = FileStore(root)
    seed = make_run("marker-stays")
    key = key_of(seed)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with anyio.fail_after(30):
        await _append(store, seed, 0)
        (old_marker,) = _marker_names(root)
        refused = _failing_unlink(monkeypatch, lambda path: old_marker in path)

        updated = await store.update_run(
            key, incarnation=seed.incarnation, version=0, status="paused", data=b"", now=T0
        )

        assert (updated.status, updated.version) == ("paused", 1)
        assert len(refused) == 1
        assert f"cleanup of {refused[0]} failed after the commit" in _warnings(caplog)
        assert await store.get_run(key, now=T0) == updated
        assert await store.list_runs(status="active", limit=10, cursor=None, now=T0) == ([], None)
        assert await store.list_runs(status="paused", limit=10, cursor=None, now=T0) == (
            [updated],
            None,
        )
        assert await store.count_runs(status="active", now=T0) == 0
        assert await store.count_runs(status=None, now=T0) == 1

        monkeypatch.undo()
        assert await store.purge_expired(now=T0, limit=10) == (0, True)
    assert len(_marker_names(root)) == 1


def _lock_is_free(root: Path, key: str) -> bool:
    """Whether nothing holds the run's lock (any open description of the lock file would)."""
    fd = os.open(root / "locks" / key, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


async def test_a_close_that_fails_after_a_write_neither_fails_it_nor_keeps_the_lock(
    root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``close`` failing (EIO, the descriptor released all the same) once a write's commit is
    synced: the write stands and reports success, and the run's lock is released (a close
    that raised used to skip closing the lock's descriptor: the run stayed locked for good)."""
    store = FileStore(root)
    seed = make_run("close-fails")
    key = key_of(seed)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with anyio.fail_after(30):
        await _append(store, seed, 0)
        synced: list[int] = []
        real_sync, real_close = os.fdatasync, os.close

        def fdatasync(fd: int) -> None:
            real_sync(fd)
            synced.append(fd)

        def close(fd: int) -> None:
            real_close(fd)
            if synced:
                raise OSError(errno.EIO, os.strerror(errno.EIO))

        monkeypatch.setattr(os, "fdatasync", fdatasync)
        monkeypatch.setattr(os, "close", close)
        await store.put_items(key, [make_item("a")], now=T0)
        await store.delete_items(key, ["a"])
        monkeypatch.undo()
        assert synced
        assert "closing" in _warnings(caplog)
        assert _lock_is_free(root, key)
        await store.put_items(key, [make_item("b")], now=T0)
        assert await store.get_items(key, ["a", "b"], now=T0) == {"b": b"value-b"}


async def test_delete_run_whose_lock_file_cannot_be_removed_still_succeeds(
    root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The lock file is removed after the run left ``runs/``: a failure there is cleanup,
    logged, never the deletion's error (it raised though the run was gone)."""
    store = FileStore(root)
    seed = make_run("lock-file-stays")
    key = key_of(seed)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with anyio.fail_after(30):
        await _append(store, seed, 0)
        refused = _failing_unlink(monkeypatch, lambda path: f"{os.sep}locks{os.sep}" in path)
        assert await store.delete_run(key) == 1
        monkeypatch.undo()
        assert refused
        assert f"cleanup of {refused[0]} failed after the commit" in _warnings(caplog)
        assert await store.get_run(key, now=T0) is None
        assert await store.latest(key, now=T0) is None


async def test_delete_run_whose_directory_sync_fails_leaves_the_run(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rename that takes a run out of ``runs/`` is durable only once the directory is
    synced: when that sync fails, ``delete_run`` raises and the run is put back, whole (it
    raised with the run gone)."""
    store = FileStore(root)
    seed = make_run("sync-fails")
    key = key_of(seed)
    with anyio.fail_after(30):
        for sequence in range(2):
            await _append(store, seed, sequence)
        before = await store.get_run(key, now=T0)

        def fsync(fd: int) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        monkeypatch.setattr(os, "fsync", fsync)
        with pytest.raises(StoreError):
            await store.delete_run(key)
        monkeypatch.undo()
        assert await store.get_run(key, now=T0) == before
        latest = await store.latest(key, now=T0)
        assert latest is not None
        assert latest[0].sequence == 1
        assert await store.delete_run(key) == 2
        assert await store.get_run(key, now=T0) is None
        assert os.listdir(root / "trash") == []


async def test_a_run_whose_idx_was_cut_short_is_neither_absent_nor_started_again(
    root: Path,
) -> None:
    """``idx`` cut short past its header (its slots, ``run.rec``'s first): every reader still
    finds the run and its checkpoints, so a create that would start the run again at 0 is a
    conflict (the run read as absent, and such a create buried checkpoint 0 under another
    incarnation's), and the next create continues the run."""
    store = FileStore(root)
    seed = make_run("idx-cut")
    key = key_of(seed)
    with anyio.fail_after(30):
        for sequence in range(3):
            await _append(store, seed, sequence)
        run = await store.get_run(key, now=T0)
        index = root / "runs" / key / "idx"
        intact = index.read_bytes()
        for length in range(file_log._INDEX_START, len(intact), 8):
            index.write_bytes(intact[:length])
            assert await store.get_run(key, now=T0) == run, length
            latest = await store.latest(key, now=T0)
            assert latest is not None
            assert latest[0].sequence == 2
        again = make_run("idx-cut")
        with pytest.raises(SequenceConflict):
            await store.append(key, make_checkpoint(again, 0), run=again, keep_latest=None,
                               now=T0)
        assert run is not None
        await store.append(key, make_checkpoint(run, 3), run=run, keep_latest=None, now=T0)
        for sequence in range(4):
            got = await store.get(key, sequence, now=T0)
            assert got is not None
            assert got[0].checkpoint_id == checkpoint_id_of(seed, sequence)


async def test_a_first_commit_whose_idx_cannot_be_written_stands_and_reports_success(
    root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A run's first log is in place (renamed, directory synced) before its ``idx`` is
    written: an ``idx`` that cannot be written is logged, and the create succeeds (it raised
    with checkpoint 0 in place: a retry then took sequence 1 for the same state)."""
    store = FileStore(root)
    seed = make_run("first-idx-fails")
    key = key_of(seed)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    real = os.replace

    def replace(source: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        if os.path.basename(os.fsdecode(target)) == "idx":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), target)
        real(source, target, *args, **kwargs)

    with anyio.fail_after(30):
        monkeypatch.setattr(os, "replace", replace)
        await _append(store, seed, 0)
        await store.put_items(key_of(make_run("items-only")), [make_item("a")], now=T0)
        monkeypatch.undo()
        assert "idx failed after a commit" in _warnings(caplog)
        run = await store.get_run(key, now=T0)
        assert run is not None
        assert run.latest_sequence == 0
        assert await store.get_items(key_of(make_run("items-only")), ["a"], now=T0) == {
            "a": b"value-a"}
        await store.append(key, make_checkpoint(run, 1), run=run, keep_latest=None, now=T0)
        assert [h.sequence for h in (await store.headers(
            key, before=None, limit=10, now=T0))[0]] == [1, 0]


async def test_a_first_commit_whose_directory_sync_fails_leaves_nothing(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rename that puts a run's first log in place is durable once the run directory is
    synced: when that sync fails, the write raises and the log is taken away again, so the
    run holds nothing (it raised with the items in place), and the write can be made again."""
    store = FileStore(root)
    key = key_of(make_run("first-sync-fails"))
    run_dir = root / "runs" / key
    real = os.fsync

    def fsync(fd: int) -> None:
        if run_dir.is_dir() and os.path.samestat(os.fstat(fd), run_dir.stat()):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    with anyio.fail_after(30):
        monkeypatch.setattr(os, "fsync", fsync)
        with pytest.raises(StoreError):
            await store.put_items(key, [make_item("a")], now=T0)
        monkeypatch.undo()
        assert await store.get_items(key, ["a"], now=T0) == {}
        assert await store.scan_items(key, limit=10, now=T0) == []
        await store.put_items(key, [make_item("a")], now=T0)
        assert await store.get_items(key, ["a"], now=T0) == {"a": b"value-a"}


# -- costs ------------------------------------------------------------------------------------


async def test_a_create_costs_one_sync_and_no_file_of_its_own(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a run has its log, an append (pruning included) is one write and one
    ``fdatasync`` of the log: no file created, renamed or removed, no directory synced. Once
    the pruned records' dead bytes exceed the live ones (and 256 KiB), the append that
    commits also compacts: the copy synced (without the lock), then (with it) synced again
    with what was committed meanwhile and renamed in place, the directory synced, a new idx
    renamed in place."""
    store = FileStore(root)
    seed = make_run("one-sync")
    with anyio.fail_after(30):
        await _append(store, seed, 0, keep_latest=3)
        calls = count_calls(monkeypatch, "fsync", "fdatasync", "replace", "rename", "unlink",
                            "mkdir")
        compactions = 0
        for sequence in range(1, 40):
            calls.clear()
            await _append(store, seed, sequence, keep_latest=3, payload=b"p" * 15_000)
            if calls != ["fdatasync"]:
                assert calls == [
                    "fdatasync", "fdatasync", "fsync", "replace", "fsync", "replace"], calls
                compactions += 1
        found, _ = await store.headers(key_of(seed), before=None, limit=10, now=T0)
    assert [header.sequence for header in found] == [39, 38, 37]
    assert 1 <= compactions <= 39 * 15_000 // (256 << 10) + 1


@pytest.mark.parametrize("name", ["idx", "log"])
async def test_a_file_that_cannot_be_opened_for_writing_fails_only_what_writes_it(
    root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    """``idx`` is a cache: one that cannot be written (permissions, an immutable flag) costs
    a warning, never the commit. A log that cannot be written fails the commit (nothing
    else can keep it), but reads, locked ones included, still work."""
    store = FileStore(root, fsync=False)
    seed = make_run(f"read-only-{name}")
    key = key_of(seed)
    real = file_log._open

    def refused(directory_fd: Any, directory: str, opened: str, flags: int) -> Any:
        if opened == name and flags & os.O_RDWR:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return real(directory_fd, directory, opened, flags)

    with anyio.fail_after(30):
        await _append(store, seed, 0)
        monkeypatch.setattr(file_log, "_open", refused)
        monkeypatch.setattr(os, "open", _refusing_os_open(os.open, name))
        caplog.set_level(logging.WARNING, logger=LOGGER)
        if name == "idx":
            await _append(store, seed, 1)
            assert "failed after a commit" in caplog.text
        else:
            with pytest.raises(StoreError, match="not permitted"):
                await _append(store, seed, 1)
        latest = await store.latest(key, now=T0)
        assert latest is not None
        assert latest[0].sequence == (1 if name == "idx" else 0)
        run = await store.get_run(key, now=T0)
        assert run is not None


def _refusing_os_open(real: Callable[..., int], name: str) -> Callable[..., int]:
    """``os.open`` that refuses to open files called ``name`` for writing."""
    def refusing(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if os.path.basename(os.fsdecode(path)) == name and flags & (os.O_RDWR | os.O_WRONLY) \
                and not flags & os.O_CREAT:
            raise PermissionError(errno.EPERM, "Operation not permitted", path)
        return real(path, flags, *args, **kwargs)

    return refusing


async def test_writers_wait_only_for_the_end_of_a_compaction(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The append that leaves the log due compacts it after releasing the run lock: another
    writer's append completes while the live records are copied, and is carried over."""
    store = FileStore(root, fsync=False)
    seed = make_run("compacting")
    key = key_of(seed)
    real = file_log.LogWriter._copy_live
    appended = [-1]
    started: list[bool] = []
    other_done: list[bool] = []

    def copy_live(writer: file_log.LogWriter, view: Any, scan: Any, new: Any) -> Any:
        if not started:
            started.append(True)
            other = threading.Thread(target=store._translated, args=(
                # the append that compacts (appended[0] + 1) has committed, lock released
                store._append, key, make_checkpoint(seed, appended[0] + 2), seed, 3, T0, []))
            other.start()
            other.join(10)
            other_done.append(not other.is_alive())  # it got the lock meanwhile
        return real(writer, view, scan, new)

    monkeypatch.setattr(file_log.LogWriter, "_copy_live", copy_live)
    with anyio.fail_after(30):
        while not other_done and appended[0] < 100:
            await _append(store, seed, appended[0] + 1, keep_latest=3, payload=b"p" * 15_000)
            appended[0] += 1
        assert other_done == [True]
        last = appended[0] + 1  # the other writer's
        found, _ = await store.headers(key, before=None, limit=10, now=T0)
        assert [header.sequence for header in found] == [last, last - 1, last - 2]
        latest = await store.latest(key, now=T0)
    assert latest is not None
    assert latest[0].sequence == last
    # Compacted, with the append made meanwhile: about the three records held.
    assert (root / "runs" / key / "log").stat().st_size < 4 * 16_000


@pytest.mark.parametrize("cached", [True, False], ids=["cached-reads", "no-cached-reads"])
async def test_one_thread_hop_per_operation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cached: bool
) -> None:
    """One worker-thread hop per operation; none for a read of a run used lately, served
    from the page cache on the loop's thread (where the platform can read so)."""
    if not cached:
        monkeypatch.setattr(file_store, "cached_reads_supported", lambda: False)
    store = FileStore(tmp_path / "store")
    hops = count_hops(monkeypatch)
    seed = msgspec.structs.replace(make_run("hops"), labels=("thread",))
    key = key_of(seed)
    # The reads of a run used lately that may take no hop.
    cached_reads: list[Callable[[], Awaitable[object]]] = [
        lambda: store.get(key, 1, now=T0),
        lambda: store.latest(key, now=T0),
        lambda: store.get_run(key, now=T0),
        lambda: store.read_with_items(key, sequence=2, now=T0),
        lambda: store.read_with_items(key, sequence=None, now=T0),
    ]
    operations: list[Callable[[], Awaitable[object]]] = [
        lambda: _append(store, seed, 0),
        lambda: _append(store, seed, 1, keep_latest=1),
        cached_reads[0],
        cached_reads[1],
        lambda: store.headers(key, before=None, limit=10, now=T0),
        cached_reads[2],
        lambda: store.update_run(
            key, incarnation=seed.incarnation, version=0, status="paused", data=b"", now=T0
        ),
        lambda: store.list_runs(status="paused", limit=10, cursor=None, now=T0),
        lambda: store.count_runs(status=None, now=T0),
        lambda: store.put_items(key, [make_item("a"), make_item("b", owner=1)], now=T0),
        lambda: store.get_items(key, ["a", "b"], now=T0),
        lambda: store.scan_items(key, now=T0),
        lambda: store.delete_items(key, ["a"]),
        lambda: store.append_with_items(
            key, msgspec.structs.replace(make_checkpoint(seed, 2), refs=("s",)), run=seed,
            keep_latest=None, now=T0, items=[make_item("s"), make_item("w", owner=2)],
        ),
        lambda: store.put_owned_items(
            key, [make_item("o", owner=2)], owner=2, checkpoint_id=checkpoint_id_of(seed, 2),
            if_absent=True, now=T0,
        ),
        cached_reads[3],
        cached_reads[4],
        lambda: store.runs_with_label("thread", limit=10, cursor=None, now=T0),
        lambda: store.delete(key, 1, checkpoint_id=checkpoint_id_of(seed, 1)),
        lambda: store.purge_expired(now=T0, limit=10),
        lambda: store.delete_run(key),
    ]
    with anyio.fail_after(30):
        for operation in operations:
            before = len(hops)
            await operation()
            hop = 0 if cached and operation in cached_reads else 1
            assert len(hops) == before + hop, (operations.index(operation), hops[before:])
        await store.aclose()
    assert len(hops) == len(operations) - (len(cached_reads) if cached else 0)


async def test_latest_is_o1_without_listing(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    small, large = make_run("small"), make_run("large")
    with anyio.fail_after(30):
        for sequence in range(3):
            await _append(store, small, sequence)
        for sequence in range(300):
            await _append(store, large, sequence)

        opened: list[str] = []
        real_open = os.open

        def forbidden(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("latest listed a directory")

        real_access = os.access

        def counting_open(path: Any, *args: Any, **kwargs: Any) -> int:
            opened.append(os.fsdecode(path))
            return real_open(path, *args, **kwargs)

        def counting_access(path: Any, *args: Any, **kwargs: Any) -> bool:
            opened.append("access " + os.fsdecode(path))
            return real_access(path, *args, **kwargs)

        monkeypatch.setattr(os, "listdir", forbidden)
        monkeypatch.setattr(os, "scandir", forbidden)
        monkeypatch.setattr(os, "open", counting_open)
        monkeypatch.setattr(os, "access", counting_access)
        counts = []
        for seed in (small, large):
            opened.clear()
            found = await store.latest(key_of(seed), now=T0)
            assert found is not None
            counts.append(len(opened))
        # The run directory, run.rec, the newest checkpoint, and a look for one beyond it.
        assert counts[0] == counts[1] <= 4, opened


@pytest.mark.parametrize("keep_latest", [None, 8])
async def test_pruning_mixed_ttls_reads_o1_checkpoint_heads(
    store: FileStore, monkeypatch: pytest.MonkeyPatch, keep_latest: int | None
) -> None:
    """Checkpoints alternate never-expiring and expiring 3 s after creation, one append a
    second: most appends find something expired, among ever more checkpoints held."""
    seed = make_run("mixed-ttl")
    heads: list[str] = []
    real_frame_of = file_store._frame_of

    def counting_frame_of(view: Any, key: int, found: Any, where: str, magic: bytes, *,
                          whole: bool) -> Any:
        if magic == file_store._CHECKPOINT_MAGIC and not whole:
            heads.append(where)
        return real_frame_of(view, key, found, where, magic, whole=whole)

    monkeypatch.setattr(file_store, "_frame_of", counting_frame_of)
    per_append: list[int] = []
    with anyio.fail_after(60):
        for sequence in range(200):
            now = T0 + sequence
            expires_at = None if sequence % 2 == 0 else now + 3
            before = len(heads)
            await _append(
                store, seed, sequence, now=now, expires_at=expires_at, keep_latest=keep_latest
            )
            per_append.append(len(heads) - before)
        run = await store.get_run(key_of(seed), now=T0 + 199)

    assert run is not None
    # Without pruning: 100 that never expire, and odd sequences 197 and 199, still live.
    assert run.checkpoint_count == (102 if keep_latest is None else keep_latest)
    assert max(per_append) <= 1, per_append  # a head read only to prune one that never expires


async def test_headers_read_no_payload(store: FileStore, monkeypatch: pytest.MonkeyPatch) -> None:
    seed = make_run("big")
    with anyio.fail_after(30):
        for sequence in range(3):
            await _append(store, seed, sequence, payload=os.urandom(1 << 20))
        read = count_pread_bytes(monkeypatch)
        found, _ = await store.headers(key_of(seed), before=None, limit=10, now=T0)
        assert [header.sequence for header in found] == [2, 1, 0]
        assert sum(read) < 3 * 4096 + 1024, read


async def test_latest_never_misses_while_appends_prune(store: FileStore) -> None:
    """Each append with keep_latest=1 removes the checkpoint a reader may be about to open."""
    seed = make_run("churn")
    key = key_of(seed)
    await _append(store, seed, 0)
    writing = True
    reads = 0

    async def writer() -> None:
        nonlocal writing
        for sequence in range(1, 300):
            await _append(store, seed, sequence, keep_latest=1)
        writing = False

    async def reader() -> None:
        nonlocal reads
        while writing:
            found = await store.latest(key, now=T0)
            assert found is not None
            reads += 1

    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            group.start_soon(writer)
            for _ in range(3):
                group.start_soon(reader)
    assert reads > 0


async def test_expired_newest_falls_back_to_older_live(root: Path, store: FileStore) -> None:
    seed = make_run("fallback")
    key = key_of(seed)
    with anyio.fail_after(30):
        await _append(store, seed, 0)
        for sequence in range(1, 20):
            await _append(store, seed, sequence, expires_at=T0 + 10)
        await _append(store, seed, 20)
        assert await store.delete(key, 20, checkpoint_id=checkpoint_id_of(seed, 20)) is True
        latest = await store.latest(key, now=T0 + 10)
        assert latest is not None
        assert latest[0].sequence == 0
        # Without its one checkpoint that never expires, the run expires with the others.
        assert await store.delete(key, 0, checkpoint_id=checkpoint_id_of(seed, 0)) is True
        assert await store.latest(key, now=T0 + 10) is None
        assert await store.get_run(key, now=T0 + 10) is None
        with pytest.raises(SequenceConflict):
            await _append(store, seed, 21, now=T0 + 10)
        reborn = make_run("fallback")
        await _append(store, reborn, 0, now=T0 + 10, keep_latest=5)
        latest = await store.latest(key, now=T0 + 10)
        assert latest is not None
        assert latest[0].checkpoint_id == checkpoint_id_of(reborn, 0)
        found, _ = await store.headers(key, before=None, limit=50, now=T0, include_expired=True)
        assert [header.sequence for header in found] == [0]
    assert checkpoint_sequences(root, key) == [0]


# -- several processes ------------------------------------------------------------------------


def _worker_command(*args: str) -> list[str]:
    return [sys.executable, str(WORKER), *args]


def _worker_env() -> dict[str, str]:
    package_root = str(Path(fastcheckpoint.__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": package_root + (os.pathsep + path if path else "")}


async def test_four_processes_append_to_one_run(root: Path) -> None:
    FileStore(root)
    run_id = "shared by four processes"
    commands = {f"w{index}": _worker_command("append", str(root), run_id, "25", f"w{index}")
                for index in range(4)}

    with anyio.fail_after(60):
        acknowledged = await acks_of_workers(commands, _worker_env())
        assert sorted(acknowledged) == list(range(100))
        store = FileStore(root)
        key = _ids.run_key(run_id)
        run = await store.get_run(key, now=T0)
        assert run is not None
        assert (run.latest_sequence, run.checkpoint_count) == (99, 100)
        found, _ = await store.headers(key, before=None, limit=1000, now=T0)
        assert [header.sequence for header in found] == list(range(99, -1, -1))
        for sequence, name in acknowledged.items():
            got = await store.get(key, sequence, now=T0)
            assert got is not None
            assert got[0].header == worker.header_for(sequence, name)
            assert got[0].payload == worker.payload_for(sequence, name)
            assert got[0].checkpoint_id == _ids.checkpoint_id(key, run.incarnation, sequence)


async def test_managers_sharing_a_run_take_turns_without_losing_sequence_races(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Managers on their own stores (as processes would be) creating on one run at once: the
    store stamps a create whose sequence another took at the run's next one, so no create is
    retried for a lost race, and the ids and parents chain without a gap."""
    appends: list[int] = []
    real = FileStore._append

    def counted(self: FileStore, *args: Any, **kwargs: Any) -> Any:
        appends.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FileStore, "_append", counted)
    managers = [fastcheckpoint.CheckpointManager(FileStore(root)) for _ in range(4)]
    run_id = "one run, four writers"
    await managers[0].create(run_id, {"writer": -1})
    appends.clear()

    async def writer(number: int) -> None:
        for step in range(10):
            await managers[number].create(run_id, {"writer": number, "step": step})

    with anyio.fail_after(60):
        async with anyio.create_task_group() as group:
            for number in range(4):
                group.start_soon(writer, number)
    # One store append per create, none lost to another writer; the three managers new to
    # the run each learn its incarnation from one refused append first.
    assert len(appends) == 40 + 3
    history = await managers[0].list_checkpoints(run_id, limit=100)
    assert [item.sequence for item in history] == list(range(40, -1, -1))
    by_sequence = {item.sequence: item for item in history}
    for sequence in range(1, 41):
        assert by_sequence[sequence].parent_id == by_sequence[sequence - 1].checkpoint_id
    states = [(await managers[0].restore_from(item.checkpoint_id)) for item in history[:-1]]
    assert sorted((c.state["writer"], c.state["step"]) for c in states if c is not None) == \
        sorted((number, step) for number in range(4) for step in range(10))
    for manager in managers:
        await manager.aclose()


async def _append_until_killed(root: Path, run_id: str, delay: float, log: Path) -> list[int]:
    """Start a writer, SIGKILL it ``delay`` seconds after its first acknowledgement."""
    command = _worker_command("forever", str(root), run_id)
    return await acks_until_killed(command, _worker_env(), log, delay)


async def test_kill_9_loses_no_acknowledged_checkpoint(
    tmp_path: Path, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    FileStore(root)
    delays = random.Random(9).sample([0.03, 0.08, 0.15, 0.25, 0.4], 4)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    for attempt, delay in enumerate(delays):
        run_id = f"killed-{attempt}"
        with anyio.fail_after(30):
            acknowledged = await _append_until_killed(
                root, run_id, delay, tmp_path / f"stderr-{attempt}.txt"
            )
            assert acknowledged == list(range(len(acknowledged)))
            await _check_survivors(root, run_id, acknowledged)
    # purge_expired removed the temp files of the writes the kills interrupted; nothing was torn.
    _assert_only_crash_warnings(caplog)


SWEEP_STRIDE = {"asyncio": 3, "trio": 9}
"""Every how many crash points a sweep runs by default (see ``tests/_sweeps.py``; all of
them with ``FC_HUNT=1``). The worker crashes on asyncio whatever loop the test runs on, and
the store makes each read of what the crash left in one worker thread, so on trio (only this
process's reads) a sparser part runs."""


@dataclass(frozen=True)
class _Crashes:
    changes: int
    """The file-system changes the operation made: the crash points are 1..``changes``."""
    run_ids: list[str]
    """The runs the sweep wrote: the run without a kill and one per crash point it ran."""


async def _crash_each_step(
    root: Path, mode: str, backend: str, check: Callable[[str, list[str]], Awaitable[None]]
) -> _Crashes:
    """Run ``file_worker.py MODE`` once without a kill, to count the operation's file-system
    changes, then once per crash point the sweep runs (the first and the last always), four
    at a time; ``check(run_id, printed lines)`` after each. A worker that did not print
    ``survived`` was killed."""
    limiter = anyio.CapacityLimiter(4)
    counted: list[int] = []

    async def crash_at(number: int) -> None:
        run_id = f"{mode}-{number}"
        async with limiter:
            done = await anyio.run_process(
                _worker_command(mode, str(root), run_id, str(number)),
                env=_worker_env(),
                check=False,
            )
        lines = done.stdout.decode().split()
        try:
            assert lines[:3] == ["0", "1", "2"], done.stderr.decode()
            if number == 0:
                assert done.returncode == 0, done.stderr.decode()
                assert lines[-1].startswith("changes="), lines
                counted.append(int(lines.pop().removeprefix("changes=")))
            if lines[-1:] != ["survived"]:
                assert done.returncode == -9, done.stderr.decode()
            await check(run_id, lines)
        except Exception as error:
            error.add_note(f"crash point {number} of {mode} ({run_id}; 0: no kill)")
            raise

    await crash_at(0)
    points = range(1, counted[0] + 1)
    name = f"{mode} on {backend}"
    ran = sweeps.chosen(name, points, SWEEP_STRIDE[backend], always=(1, counted[0]))
    try:
        async with anyio.create_task_group() as group:
            for number in ran:
                group.start_soon(crash_at, number)
    except Exception as error:
        error.add_note(sweeps.replay(name, ran, points))
        raise
    return _Crashes(counted[0], [f"{mode}-{number}" for number in (0, *ran)])


def _killed(lines: list[str]) -> bool:
    return lines[-1:] != ["survived"]


async def test_kill_9_before_every_file_system_change_of_an_append(
    root: Path, caplog: pytest.LogCaptureFixture, anyio_backend: str
) -> None:
    """Crash points made exact: the writer SIGKILLs itself before its N-th open, write, fsync,
    rename or unlink inside an append that also prunes, for each N up to the number of changes
    the append makes (a rotating part of them by default, see ``_crash_each_step``)."""
    FileStore(root)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    committed: list[str] = []

    async def check(run_id: str, lines: list[str]) -> None:
        if _killed(lines):
            latest = await FileStore(root).latest(_ids.run_key(run_id), now=T0)
            if latest is not None and latest[0].sequence == 3:
                committed.append(run_id)
        await _check_survivors(root, run_id, [0, 1, 2], pruned_to=2)

    with anyio.fail_after(120):
        crashes = await _crash_each_step(root, "crash", anyio_backend, check)
    assert crashes.changes >= 8, f"an append made only {crashes.changes} file-system changes"
    _assert_only_crash_warnings(caplog)
    # Some kill fell after the commit's write, before the append returned: the checkpoint
    # was kept (the log's page cache outlives the process).
    assert committed, "no kill fell after the commit"


async def test_kill_9_before_every_file_system_change_of_a_delete(
    root: Path, caplog: pytest.LogCaptureFixture, anyio_backend: str
) -> None:
    """Deleting checkpoint 1 of three, killed before each of its file-system changes: the
    checkpoint is then either still there and counted, or gone for good."""
    FileStore(root)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    deleted: list[str] = []

    async def check(run_id: str, lines: list[str]) -> None:
        store = FileStore(root)
        key = _ids.run_key(run_id)
        run = await store.get_run(key, now=T0)
        assert run is not None
        found, _ = await store.headers(key, before=None, limit=10, now=T0, include_expired=True)
        sequences = [header.sequence for header in found]
        assert (sequences, run.checkpoint_count) in (([2, 1, 0], 3), ([2, 0], 2))
        if sequences == [2, 0]:
            assert await store.get(key, 1, now=T0) is None
            if _killed(lines):
                deleted.append(run_id)
        await store.append(key, make_checkpoint(run, 3), run=run, keep_latest=None, now=T0)
        assert await store.purge_expired(now=T0, limit=100) == (0, True)
        assert (1 in checkpoint_sequences(root, key)) == (sequences == [2, 1, 0])

    with anyio.fail_after(120):
        await _crash_each_step(root, "crash-delete", anyio_backend, check)
    assert deleted, "no kill fell after the commit"
    for line in _warnings(caplog).splitlines():
        assert line.endswith("left by an interrupted write"), line


async def test_kill_9_before_every_file_system_change_of_a_rebuild(
    root: Path, caplog: pytest.LogCaptureFixture, anyio_backend: str
) -> None:
    """Rebuilding a damaged run.rec, killed before each of its file-system changes: the run is
    then still damaged (and the rebuild can be run again) or rebuilt, its checkpoints always
    readable, and creates continue after them."""
    FileStore(root)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    rebuilt: list[str] = []

    async def check(run_id: str, lines: list[str]) -> None:
        store = FileStore(root)
        key = _ids.run_key(run_id)
        for sequence in range(3):
            got = await store.get(key, sequence, now=T0)
            assert got is not None
            assert got[0].payload == worker.payload_for(sequence, "forever")
        damage = await store.damaged_runs(run_key=key, now=T0)
        if damage:
            assert [d.checkpoints for d in damage] == [3]
            await store.rebuild_run(key, worker.rebuild_seed(run_id), now=T0)
        elif _killed(lines):
            rebuilt.append(run_id)
        run = await store.get_run(key, now=T0)
        assert run is not None
        assert (run.latest_sequence, run.checkpoint_count, run.data) == (2, 3, b"rebuilt")
        await store.append(key, make_checkpoint(run, 3), run=run, keep_latest=None, now=T0)

    with anyio.fail_after(120):
        crashes = await _crash_each_step(root, "crash-rebuild", anyio_backend, check)
    assert rebuilt, "no kill fell after the commit of a rebuild"
    store = FileStore(root)
    with anyio.fail_after(30):
        assert await store.purge_expired(now=T0, limit=1000) == (0, True)
        assert await store.damaged_runs(now=T0) == []
        runs, _ = await store.list_runs(status="active", limit=100, cursor=None, now=T0)
    assert len(runs) == len(crashes.run_ids)
    assert os.listdir(root / "tmp") == []


async def _read_all_items(store: FileStore, key: str) -> dict[int, dict[str, bytes]]:
    """The items ``read_with_items`` returns for each held checkpoint, newest first."""
    found, _ = await store.headers(key, before=None, limit=100, now=T0)
    read: dict[int, dict[str, bytes]] = {}
    for header in found:
        got = await store.read_with_items(key, sequence=header.sequence, now=T0)
        assert got is not None, f"checkpoint {header.sequence} listed but unreadable"
        assert got[0].refs == worker.refs_for(header.sequence)
        read[header.sequence] = got[2]
    return read


async def _append_after_crash(store: FileStore, key: str, keep_latest: int) -> list[int]:
    """Append the run's next checkpoint with its items; the sequences then held."""
    run = await store.get_run(key, now=T0)
    latest = await store.latest(key, now=T0)
    assert run is not None
    assert latest is not None
    after = latest[0].sequence + 1  # the record may be behind a checkpoint in place
    record = msgspec.structs.replace(make_checkpoint(run, after), refs=worker.refs_for(after))
    await store.append_with_items(
        key, record, run=run, keep_latest=keep_latest, now=T0, items=worker.items_for(after)
    )
    assert await store.purge_expired(now=T0, limit=1000) == (0, True)
    found, _ = await store.headers(key, before=None, limit=100, now=T0)
    return [header.sequence for header in found]


async def _assert_temp_files_swept(store: FileStore, root: Path, key: str) -> None:
    """Purging removes the temp files a killed writer of run ``key`` left. Writers of other
    runs may be at work, and a sweep skips a temp file whose run lock is busy: another
    process's sweep, or a child being spawned that holds a copy of the lock until its exec,
    can hold it for a moment; a later purge removes the file."""
    for _ in range(20):
        assert await store.purge_expired(now=T0, limit=1000) == (0, True)
        left = [name for name in os.listdir(root / "tmp") if name.startswith(key)]
        if not left:
            return
        await anyio.sleep(0.05)
    assert left == [], "temp files of a killed writer are never swept"


async def _stored_keys(store: FileStore, key: str) -> set[str]:
    return {item for item, _ in await store.scan_items(key, limit=1000, now=T0)}


async def test_kill_9_before_every_file_system_change_of_an_append_with_items(
    root: Path, caplog: pytest.LogCaptureFixture, anyio_backend: str
) -> None:
    """The 4th append (a new shared item, two shared ones of earlier checkpoints, an owned
    one; pruning to 2 drops a shared item and two owned ones) killed before each of its
    file-system changes (opens, the commit's write and sync, the updates of ``idx``): every
    checkpoint that shows has all its items, acknowledged ones always show, the run holds
    exactly the items of the checkpoints that show (what the append writes and removes is
    one commit), and so does it after the next append."""
    FileStore(root)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    shown: set[int] = set()

    async def check(run_id: str, lines: list[str]) -> None:
        store = FileStore(root)
        key = _ids.run_key(run_id)
        read = await _read_all_items(store, key)
        assert 2 in read, "an acknowledged checkpoint is lost"
        for sequence, items in read.items():
            assert items == worker.expected_items(sequence), f"checkpoint {sequence} half shown"
        assert await _stored_keys(store, key) == {item for items in read.values()
                                                  for item in items}
        if _killed(lines):
            shown.add(max(read))
        held = await _append_after_crash(store, key, keep_latest=2)
        assert held == [held[0], held[0] - 1]
        expected = {item for sequence in held for item in worker.expected_items(sequence)}
        assert await _stored_keys(store, key) == expected
        await _assert_temp_files_swept(store, root, key)

    with anyio.fail_after(180):
        crashes = await _crash_each_step(root, "crash-items", anyio_backend, check)
    assert crashes.changes >= 15, f"an append made only {crashes.changes} changes"
    assert shown == {2, 3}, "no kill fell before and one after the commit's write"
    _assert_only_crash_warnings(caplog)


async def test_kill_9_before_every_file_system_change_of_a_put_owned_items(
    root: Path, caplog: pytest.LogCaptureFixture, anyio_backend: str
) -> None:
    """Owned items put on a live checkpoint, killed before each file-system change: the
    items of the appends and of the acknowledged put are all there, the cut batch is there
    whole or not at all (one commit), and putting the batch again completes it."""
    FileStore(root)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    batch = {item.key: item.value for item in worker.owned_batch(2, "q", 3)}
    cuts: list[int] = []

    async def check(run_id: str, lines: list[str]) -> None:
        assert lines[3:4] == ["put"]
        store = FileStore(root)
        key = _ids.run_key(run_id)
        read = await _read_all_items(store, key)
        acknowledged = {**worker.expected_items(2), "w/2/p0": worker.item_value("w/2/p0")}
        cut = {item: value for item, value in read[2].items() if item not in acknowledged}
        assert read[2].items() >= acknowledged.items()
        assert cut.items() <= batch.items(), "a torn or foreign owned item"
        if _killed(lines):
            cuts.append(len(cut))
        run = await store.get_run(key, now=T0)
        assert run is not None
        assert await store.put_owned_items(
            key, worker.owned_batch(2, "q", 3), owner=2,
            checkpoint_id=checkpoint_id_of(run, 2), if_absent=True, now=T0,
        )
        again = await store.read_with_items(key, sequence=2, now=T0)
        assert again is not None
        assert again[2] == {**acknowledged, **batch}
        held = await _append_after_crash(store, key, keep_latest=1)
        assert held == [3]
        assert await _stored_keys(store, key) == set(worker.expected_items(3))

    with anyio.fail_after(180):
        await _crash_each_step(root, "crash-owned", anyio_backend, check)
    assert set(cuts) == {0, len(batch)}, cuts
    _assert_only_crash_warnings(caplog)


async def test_four_processes_append_with_shared_items(root: Path) -> None:
    """Reference counts stay exact across processes: whoever appends, whoever prunes, the
    items left are exactly those the held checkpoints name or own."""
    FileStore(root)
    run_id = "items shared by four processes"

    async def run_worker(name: str) -> None:
        await anyio.run_process(
            _worker_command("append-items", str(root), run_id, "10", name), env=_worker_env()
        )

    with anyio.fail_after(60):
        async with anyio.create_task_group() as group:
            for index in range(4):
                group.start_soon(run_worker, f"w{index}")
        store = FileStore(root)
        key = _ids.run_key(run_id)
        read = await _read_all_items(store, key)
        assert sorted(read) == [37, 38, 39]
        for sequence, items in read.items():
            assert items == worker.expected_items(sequence)
        assert await store.purge_expired(now=T0, limit=1000) == (0, True)
        expected = {item for sequence in read for item in worker.expected_items(sequence)}
        assert await _stored_keys(store, key) == expected


async def _check_survivors(
    root: Path, run_id: str, acknowledged: list[int], *, pruned_to: int | None = None
) -> None:
    store = FileStore(root)
    key = _ids.run_key(run_id)
    run = await store.get_run(key, now=T0)
    assert run is not None
    for sequence in acknowledged:
        got = await store.get(key, sequence, now=T0)
        if got is None and pruned_to is not None and run.latest_sequence > acknowledged[-1]:
            continue  # pruned by the append that committed
        assert got is not None, f"acknowledged checkpoint {sequence} lost"
        assert got[0].header == worker.header_for(sequence, "forever")
        assert got[0].payload == worker.payload_for(sequence, "forever")
    latest = await store.latest(key, now=T0)
    assert latest is not None
    # The append in flight at the kill may have committed without being acknowledged: its
    # commit (checkpoint, run record and pruning together) is then in the log.
    newest = latest[0].sequence
    assert newest in (acknowledged[-1], acknowledged[-1] + 1)
    assert latest[0].payload == worker.payload_for(newest, "forever")
    found, _ = await store.headers(key, before=None, limit=10_000, now=T0)
    oldest = {0}
    if pruned_to is not None and newest > acknowledged[-1]:
        oldest.add(newest - pruned_to + 1)
    sequences = [header.sequence for header in found]
    assert sequences in [list(range(newest, low - 1, -1)) for low in oldest]
    after = newest + 1
    record = make_checkpoint(run, after)
    with pytest.raises(SequenceConflict):
        await store.append(key, make_checkpoint(run, after + 1), run=run, keep_latest=None, now=T0)
    await store.append(key, record, run=run, keep_latest=None, now=T0)
    assert (await store.latest(key, now=T0)) is not None
    await _assert_temp_files_swept(store, root, key)
    assert os.listdir(root / "trash") == []


# -- readers racing writers on the run's log --------------------------------------------------


def _appender(store: FileStore, run: RunRecord) -> Callable[[int], None]:
    def append(sequence: int) -> None:
        """Checkpoint ``sequence`` with an item it owns and one only it names."""
        record = msgspec.structs.replace(make_checkpoint(run, sequence), refs=(f"b/{sequence}",))
        items = file_store._appended_items(
            record, [make_item(f"w/{sequence}", owner=sequence), make_item(f"b/{sequence}")])
        store._translated(store._append, key_of(run), record, run, None, T0, items)

    return append


@pytest.mark.parametrize("sequence", [None, 1])
def test_read_with_items_never_returns_a_checkpoint_without_the_items_it_had(
    root: Path, monkeypatch: pytest.MonkeyPatch, sequence: int | None
) -> None:
    """The reader reads checkpoint 1; before it reads its items, another thread deletes it
    (with the item it owns and the one only it names) and a read of items brings this
    process's item index up to date: the reader returns checkpoint 1 with both items, or
    what it would return after the delete, never checkpoint 1 without them."""
    store = FileStore(root, fsync=False)
    run = make_run("stale-held")
    key = key_of(run)
    append = _appender(store, run)
    for each in range(2 if sequence is None else 3):
        append(each)
    deleted: list[bool] = []
    real_items_of = file_store._items_of

    def delete_and_read_items() -> None:
        deleted.append(store._translated(store._delete, key, 1, checkpoint_id_of(run, 1)))
        store._translated(store._get_items, key, ["b/0"], T0)

    def items_of(files: Any, record: Any, now: float) -> dict[str, bytes]:
        if record.sequence == 1 and not deleted:
            other = threading.Thread(target=delete_and_read_items)
            other.start()
            other.join(10)  # (a reader holding the run lock would make it wait: not here)
        return real_items_of(files, record, now)

    monkeypatch.setattr(file_store, "_items_of", items_of)
    found = store._translated(store._read_with_items, key, sequence, T0)
    assert deleted == [True]

    def whole(held: int) -> tuple[int, dict[str, bytes]]:
        return held, {f"b/{held}": f"value-b/{held}".encode(),
                      f"w/{held}": f"value-w/{held}".encode()}

    read = None if found is None else (found[0].sequence, found[2])
    assert read in ([whole(1), whole(0)] if sequence is None else [whole(1), None])


def test_a_large_head_is_read_from_the_entry_found_though_a_delete_removes_it(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A head over 4 KiB is read in two steps; a delete between them must not make the
    record look changed (its entry's bytes stay where they were)."""
    store = FileStore(root, fsync=False)
    run = make_run("big-head")
    key = key_of(run)
    for sequence in range(3):
        record = make_checkpoint(run, sequence, header=b"h" * 5000)
        store._translated(store._append, key, record, run, None, T0, [])
    store._translated(store._delete, key, 2, checkpoint_id_of(run, 2))
    real = file_log.LogView.read_sized
    fired = [False]

    def read_sized(view: file_log.LogView, key_: int, limit: int | None = None,
                   **options: Any) -> Any:
        found = real(view, key_, limit, **options)
        if key_ == 1 and limit == file_store._PEEK_BYTES and not fired[0]:
            fired[0] = True
            store._translated(store._delete, key, 1, checkpoint_id_of(run, 1))
        return found

    monkeypatch.setattr(file_log.LogView, "read_sized", read_sized)
    latest = store._translated(store._latest, key, T0)
    assert fired[0]
    assert latest is not None
    assert latest[0].sequence in (0, 1)


def test_a_create_whose_sync_fails_is_never_seen_by_readers(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its commit is in the log until it is cut off again: a reader in that window waits for
    the run's writer, then finds the run as it was."""
    store = FileStore(root, fsync=False)
    run = make_run("failed-sync")
    key = key_of(run)
    store._translated(store._append, key, make_checkpoint(run, 0), run, None, T0, [])
    seen: list[Any] = []
    readers = fail_first_sync_while(
        monkeypatch, lambda: seen.append(store._translated(store._latest, key, T0)))
    with pytest.raises(StoreError, match="fdatasync failed"):
        store._translated(store._append, key, make_checkpoint(run, 1, payload=b"first try"),
                          run, None, T0, [])
    readers[0].join(10)
    assert seen
    assert seen[0] is not None
    assert seen[0][0].sequence == 0
    store._translated(store._append, key, make_checkpoint(run, 1, payload=b"retry"),
                      run, None, T0, [])
    latest = store._translated(store._latest, key, T0)
    assert latest is not None
    assert latest[0].payload == b"retry"


def test_a_record_too_large_for_the_log_is_a_validation_error(store: FileStore) -> None:
    run = make_run("huge")

    class Huge(bytes):
        def __len__(self) -> int:
            return file_log.MAX_DATA

    record = msgspec.structs.replace(make_checkpoint(run, 0), payload=Huge(b"x"))
    with pytest.raises(ValidationError, match="at most"):
        anyio.run(lambda: store.append(key_of(run), record, run=run, keep_latest=None, now=T0))
