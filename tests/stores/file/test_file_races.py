"""The file store's item index against writers committing mid-read (at a set instant, by a
hook, or in a short storm of threads), a damaged ``idx`` slot or item head, and a run's new
life: each call answers as the store stood at some instant of it, or raises a
``CheckpointError``."""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import pytest

from fastcheckpoint.errors import CheckpointError, CorruptCheckpointError
from fastcheckpoint.stores import StoredCheckpoint
from fastcheckpoint.stores import _file_log as file_log
from fastcheckpoint.stores import file as file_store
from fastcheckpoint.stores.file import FileStore
from fastcheckpoint.stores.memory import MemoryStore
from fastcheckpoint.testing import T0, checkpoint_id_of, key_of, make_item, make_run
from tests._file_records import Process, item_record
from tests._file_records import append_with_refs as _append

pytestmark = pytest.mark.anyio

LOGGER = "fastcheckpoint.stores.file"

Answer = tuple[str, dict[str, bytes]] | None
"""What ``read_with_items`` returned: the checkpoint's id and its items."""


def _values(*keys: str) -> dict[str, bytes]:
    return {key: f"value-{key}".encode() for key in keys}


def _answer(found: tuple[StoredCheckpoint, str, dict[str, bytes]] | None) -> Answer:
    return None if found is None else (found[0].checkpoint_id, found[2])


@pytest.fixture(autouse=True, params=["cached", "threaded"])
def read_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every race both ways a read runs: on the event loop's thread from the page cache (a
    run this process used lately), and in a worker thread."""
    if request.param == "threaded":
        monkeypatch.setattr(file_store, "cached_reads_supported", lambda: False)
    return str(request.param)


def _in_loop(call: Callable[[], Coroutine[Any, Any, Any]]) -> None:
    """From inside a store's operation: another task's call, made and finished right now
    (through the event loop from a worker thread; from the loop's own thread, where a read
    from the page cache runs, in a thread with a loop of its own)."""
    try:
        anyio.from_thread.run(call)
    except anyio.NoEventLoopError:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(anyio.run, call).result()


def _first_call_runs(
    monkeypatch: pytest.MonkeyPatch, owner: object, name: str, meanwhile: Callable[[], None],
    *, when: Callable[..., bool] = lambda *args: True,
) -> list[int]:
    """Run ``meanwhile`` once, just before the first call of ``owner.name`` that ``when``
    accepts; returns a list that holds one element once it ran."""
    real = getattr(owner, name)
    fired: list[int] = []

    def hooked(*args: Any) -> Any:
        if not fired and when(*args):
            fired.append(1)
            meanwhile()
        return real(*args)

    monkeypatch.setattr(owner, name, hooked)
    return fired


def _lock_free(files: file_store._Dir) -> bool:
    return files.fd is not None  # read through a descriptor: without the run lock


def _flip_bit(path: Path, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([byte ^ 1]))


# -- a commit between a reader's checkpoint read and its item read ----------------------------


@pytest.mark.parametrize("sequence", [0, None])
async def test_read_with_items_during_a_pruning_append(
    root: Path, monkeypatch: pytest.MonkeyPatch, sequence: int | None
) -> None:
    """A pruning append with an item commits between the read of checkpoint 0 and that of
    its items: checkpoint 0 with all its items, checkpoint 1 with its own, or ``None``."""
    store = FileStore(root)
    run = make_run("torn-read")
    key = key_of(run)
    with anyio.fail_after(30):
        await _append(store, run, 0, refs=["h"], items=[
            make_item("h"), make_item("h/x"), make_item("w/0", owner=0)])
        fired = _first_call_runs(monkeypatch, file_store, "_items_of", lambda: _in_loop(
            functools.partial(_append, store, run, 1, items=[make_item("n1")], keep_latest=1)))
        found = _answer(await store.read_with_items(key, sequence=sequence, now=T0))
    assert fired
    answers: list[Answer] = [None, (checkpoint_id_of(run, 0), _values("h", "h/x", "w/0"))]
    if sequence is None:
        answers.append((checkpoint_id_of(run, 1), {}))
    assert found in answers


@pytest.mark.parametrize("new_life", ["writes items", "writes none, another reader indexes it"])
@pytest.mark.parametrize("sequence", [0, None])
async def test_read_with_items_during_a_new_life(
    root: Path, monkeypatch: pytest.MonkeyPatch, sequence: int | None, new_life: str
) -> None:
    """A writer at ``T0 + 10`` starts the run's new life (past its expiry) between a reader's
    read at ``T0`` of checkpoint 0 and that of its items: either life's checkpoint 0 with its
    own items, or ``None``."""
    store = FileStore(root)
    old = make_run("new-life-race", expires_at=T0 + 5)
    new = make_run("new-life-race", created_at=T0 + 10)
    key = key_of(old)
    with_items = new_life == "writes items"
    new_items = {"g": b"new-g", "w/0/a": b"new-owned"} if with_items else {}

    def start_new_life() -> None:
        _in_loop(functools.partial(
            _append, store, new, 0, refs=["g"] if with_items else [], now=T0 + 10,
            items=[make_item("g", b"new-g"), make_item("w/0/a", b"new-owned", owner=0)]
            if with_items else []))
        if not with_items:  # another thread of this process brings the index up to date
            _in_loop(functools.partial(store.get_items, key, ["x"], now=T0 + 10))

    with anyio.fail_after(30):
        await _append(store, old, 0, refs=["h"], expires_at=T0 + 5, items=[
            make_item("h", b"old-h"), make_item("h/n", b"old-nested"),
            make_item("w/0/a", b"old-owned", owner=0)])
        fired = _first_call_runs(monkeypatch, file_store, "_items_of", start_new_life)
        found = _answer(await store.read_with_items(key, sequence=sequence, now=T0))
    assert fired
    assert found in [
        None,
        (checkpoint_id_of(old, 0), {"h": b"old-h", "h/n": b"old-nested", "w/0/a": b"old-owned"}),
        (checkpoint_id_of(new, 0), new_items),
    ]


# -- a log idx does not cover, read without the lock -----------------------------------------


async def _read_of(call: str, store: FileStore, run_key: str) -> object:
    if call == "get_items":
        return await store.get_items(run_key, ["a", "b", "c"], now=T0)
    if call == "scan_items":
        return await store.scan_items(run_key, now=T0)
    return _answer(await store.read_with_items(run_key, sequence=0, now=T0))


@pytest.mark.parametrize("call", ["get_items", "scan_items", "read_with_items"])
async def test_item_reads_meeting_a_commit_idx_does_not_cover(
    root: Path, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    """After a lock-free reader checked that ``idx`` covers the log, one writer commits items
    and another commits more without updating ``idx`` yet: the answer is the store before,
    between or after the two writes."""
    store = FileStore(root)
    run = make_run("unsettled")
    key = key_of(run)

    def two_writers() -> None:
        _in_loop(functools.partial(store.put_items, key, [make_item("b")], now=T0))
        with pytest.MonkeyPatch.context() as patch:  # committed, idx not updated yet
            patch.setattr(file_log.LogWriter, "_update_index", lambda *args, **kwargs: None)
            _in_loop(functools.partial(store.put_items, key, [make_item("c")], now=T0))

    with anyio.fail_after(30):
        await _append(store, run, 0, items=[make_item("w/0/a", owner=0)])
        await store.put_items(key, [make_item("a")], now=T0)
        fired = _first_call_runs(monkeypatch, file_store._Dir, "items", two_writers,
                                 when=_lock_free)
        found = await _read_of(call, store, key)
    assert fired
    stages = [_values("a"), _values("a", "b"), _values("a", "b", "c")]
    answers: dict[str, Sequence[object]] = {
        "get_items": stages,
        "scan_items": [sorted({**stage, **_values("w/0/a")}.items()) for stage in stages],
        "read_with_items": [(checkpoint_id_of(run, 0), _values("w/0/a"))],
    }
    assert found in answers[call]


async def test_item_reads_with_a_damaged_idx_slot(root: Path) -> None:
    """A bad byte in ``idx``'s slot of the item-entry count (log key -2): reads answer."""
    store = FileStore(root)
    run = make_run("idx-slot")
    key = key_of(run)
    with anyio.fail_after(30):
        await _append(store, run, 0, items=[make_item("w/0/a", owner=0)])
        slot = file_log._slot_offset(file_store._ITEMS_MADE)
        _flip_bit(root / "runs" / key / "idx", slot + 12)  # in its checksum
        for _ in range(2):
            assert await store.get_items(key, ["w/0/a"], now=T0) == _values("w/0/a")
            assert await store.scan_items(key, now=T0) == list(_values("w/0/a").items())
            assert _answer(await store.read_with_items(key, sequence=0, now=T0)) == (
                checkpoint_id_of(run, 0), _values("w/0/a"))


# -- the indexes of this process --------------------------------------------------------------


@pytest.mark.parametrize("change", ["compaction", "delete_run and a new write"])
async def test_a_new_log_while_the_indexes_are_over_their_limit(
    root: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """Another process gives run A a new log while A's index is the least recently used and
    B's holds more items than the limit: reads of A answer."""
    monkeypatch.setattr(file_store, "_INDEXES", file_store._ItemIndexes(10))
    store = FileStore(root)
    a, b = key_of(make_run("lru-a")), key_of(make_run("lru-b"))
    log = root / "runs" / a / "log"
    with anyio.fail_after(30):
        await store.put_items(a, [make_item("x")], now=T0)
        assert await store.get_items(a, ["x"], now=T0) == _values("x")
        await store.put_items(b, [make_item("b/0")], now=T0)
        assert await store.get_items(b, ["b/0"], now=T0) == _values("b/0")
        await store.put_items(b, [make_item(f"b/{i:02d}") for i in range(1, 20)], now=T0)
        assert len(await store.get_items(b, ["b/01", "b/19"], now=T0)) == 2  # B: 20 items
        old_log = log.read_bytes()[8:24]
        with Process():
            if change == "compaction":
                file_log.LogWriter(str(root / "runs" / a), functools.partial(
                    store._temp_path, a), fsync=False).compact()
                expected = _values("x")
            else:
                await store.delete_run(a)
                await store.put_items(a, [make_item("y")], now=T0)
                expected = _values("y")
        assert log.read_bytes()[8:24] != old_log
        assert await store.get_items(a, ["x", "y"], now=T0) == expected
        assert await store.get_items(b, ["b/00", "b/19"], now=T0) == _values("b/19")


# -- a damaged item head ----------------------------------------------------------------------


async def test_an_item_whose_head_fails_its_checksum(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A process that indexed it before the damage reads it as damaged; one that indexes the
    log after it leaves it out with a warning (its key cannot be trusted) and never takes it
    for another key's item, but reads of the checkpoint that owns it raise; both read the
    other items, and its key is free for writers."""
    run = make_run("damaged-head")
    key = key_of(run)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    store = FileStore(root)
    with anyio.fail_after(30):
        await _append(store, run, 0, items=[make_item("w/0/a", b"x" * 300, owner=0)])
        await store.put_items(key, [make_item("b"), make_item("w/p/a")], now=T0)
        before = Process()
        with before:
            assert await store.get_items(key, ["w/0/a"], now=T0) == {"w/0/a": b"x" * 300}
        record = item_record(root, key, "w/0/a")
        record.flip(file_store._FIXED.size)  # the first byte of its header checksum
        with before:
            with pytest.raises(CorruptCheckpointError) as caught:
                await store.get_items(key, ["b", "w/0/a"], now=T0)
            assert caught.value.key == str(record)
            with pytest.raises(CorruptCheckpointError):
                await store.read_with_items(key, sequence=0, now=T0)
        record.flip(36)  # inside the key: "w/0/a" now reads as "w/p/a"
        with Process():
            caplog.clear()
            assert await store.get_items(key, ["b", "w/0/a", "w/p/a"], now=T0) == \
                _values("b", "w/p/a")
            assert f"item entry {record} is unreadable; its item is lost" in caplog.text
            with pytest.raises(CorruptCheckpointError) as caught:  # its owner, as it claims
                await store.read_with_items(key, sequence=0, now=T0)
            assert caught.value.key == str(record)
            assert await store.scan_items(key, now=T0) == list(_values("b", "w/p/a").items())
            await store.put_items(key, [make_item("w/0/a", b"new")], create_only=True, now=T0)
            assert await store.get_items(key, ["w/0/a"], now=T0) == {"w/0/a": b"new"}
        assert await store.get_items(key, ["w/0/a"], now=T0) == {"w/0/a": b"new"}


# -- a run's new life -------------------------------------------------------------------------


async def test_a_new_life_keeps_items_of_owners_it_does_not_hold(root: Path) -> None:
    """A loose item whose owner is no checkpoint of the old life outlives it, as in the
    memory store."""
    found = []
    with anyio.fail_after(30):
        for store in (MemoryStore(), FileStore(root)):
            run = make_run("loose-owner", expires_at=T0 + 5)
            key = key_of(run)
            await _append(store, run, 0, expires_at=T0 + 5)
            await store.put_items(key, [make_item("x", owner=7), make_item("y", owner=0)],
                                  now=T0)
            await _append(store, make_run("loose-owner", created_at=T0 + 10), 0, now=T0 + 10)
            found.append(await store.scan_items(key, now=T0 + 10))
    assert found[1] == found[0] == list(_values("x").items())


# -- a storm ----------------------------------------------------------------------------------


async def test_reads_during_a_writer_storm(
    root: Path,
) -> None:
    """Two seconds of pruning appends and loose rewrites (the log compacts) against readers:
    checkpoints come with all their items, items with their values, failures are
    ``CheckpointError``s."""
    store = FileStore(root, fsync=False)
    run = make_run("storm")
    key = key_of(run)
    deadline = time.monotonic() + 2
    wrong: list[str] = []
    counts = {"appends": 0, "puts": 0, "reads": 0}

    async def calls(name: str, step: Callable[[int], Awaitable[None]]) -> None:
        turn = 0
        while time.monotonic() < deadline:
            turn += 1
            try:
                await step(turn)
            except CheckpointError:
                pass  # a lost race between writers (ConflictError), a reader waiting too long
            except Exception as exc:  # what the test looks for
                wrong.append(f"{name}: {type(exc).__name__}: {exc}")

    async def append(_: int) -> None:
        current = await store.get_run(key, now=T0)
        sequence = 0 if current is None else current.latest_sequence + 1
        await _append(store, run, sequence, refs=[f"h/{sequence}"], keep_latest=1, items=[
            make_item(f"h/{sequence}"), make_item(f"h/{sequence}/n"),
            make_item(f"w/{sequence}", owner=sequence)])
        counts["appends"] += 1

    def put(writer: int) -> Callable[[int], Awaitable[None]]:
        async def step(turn: int) -> None:
            name = f"loose/{writer}/{turn % 20}"
            await store.put_items(key, [make_item(name, name.encode() * 400)], now=T0)
            counts["puts"] += 1

        return step

    async def read(_: int) -> None:
        found = await store.read_with_items(key, sequence=None, now=T0)
        if found is not None:
            sequence = found[0].sequence
            if found[2] != _values(f"h/{sequence}", f"h/{sequence}/n", f"w/{sequence}"):
                wrong.append(f"checkpoint {sequence} read with {sorted(found[2])}")
        got = await store.get_items(key, ["loose/0/1", "loose/1/2", "h/1"], now=T0)
        page = await store.scan_items(key, prefix="loose/", limit=5, now=T0)
        for name, value in [*got.items(), *page]:
            if value != (name.encode() * 400 if name.startswith("loose/") else
                         f"value-{name}".encode()):
                wrong.append(f"item {name} read as {value[:40]!r}")
        counts["reads"] += 1

    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            for writer in range(2):
                group.start_soon(calls, "append", append)
                group.start_soon(calls, "put_items", put(writer))
            for _ in range(4):
                group.start_soon(calls, "read", read)
    assert wrong == []
    assert min(counts.values()) > 0, counts
