"""The records of a file-store run's log (``run.rec``, ``c/<sequence>`` and the item entries
``i#<n>``), handled the way tests handled them when they were files: read, replaced, removed,
damaged; and what a new process starts with (no item index).

Writing a record appends a commit that puts it (what replacing the file did); removing one
appends a commit that removes it. Both go through the store's own log writer, without syncs.
:meth:`LogRecord.flip` damages a record in place, as a bad disk would.
"""

from __future__ import annotations

import errno
import os
import secrets
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from fastcheckpoint.stores import Item, RunRecord, StoredCheckpoint
from fastcheckpoint.stores import _file_log as file_log
from fastcheckpoint.stores import file as file_store
from fastcheckpoint.stores._file_log import LOG, RUN, LogWriter, open_view
from fastcheckpoint.stores.file import FileStore
from fastcheckpoint.stores.memory import MemoryStore
from fastcheckpoint.testing import T0, key_of, make_checkpoint
from fastcheckpoint.testing._adapter import _append_items as append_items

_FIRST_ITEM = -3
"""The log key of a run's first item entry (the n-th is ``-3 - n``)."""


class LogRecord:
    """One record of a run's log, with the part of ``pathlib.Path``'s interface tests use."""

    def __init__(self, run_dir: Path, key: int) -> None:
        self.run_dir = run_dir
        self.key = key

    def __str__(self) -> str:
        """How the store names the record in errors and logs."""
        if self.key == RUN:
            name = "run.rec"
        elif self.key <= _FIRST_ITEM:
            name = f"i#{_FIRST_ITEM - self.key}"
        else:
            name = f"c/{self.key:020d}"
        return f"{self.run_dir}/{LOG}:{name}"

    def __repr__(self) -> str:
        return f"LogRecord({self})"

    def _writer(self) -> LogWriter:
        temp = self.run_dir.parent.parent / "tmp"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return LogWriter(str(self.run_dir), lambda: str(temp / secrets.token_hex(8)), fsync=False)

    @property
    def parent(self) -> Path:
        """The run's directory (the log's)."""
        return self.run_dir

    def exists(self) -> bool:
        view = open_view(str(self.run_dir)) if self.run_dir.is_dir() else None
        if view is None:
            return False
        with view:
            return view.find(self.key) is not None

    def read_bytes(self) -> bytes:
        view = open_view(str(self.run_dir)) if self.run_dir.is_dir() else None
        data = None
        if view is not None:
            with view:
                data = view.read(self.key)
        if data is None:
            raise FileNotFoundError(os.fspath(self.run_dir / LOG), repr(self))
        return data

    def write_bytes(self, data: bytes) -> None:
        self._writer().commit([(self.key, bytes(data))])

    def unlink(self) -> None:
        if not self.exists():
            raise FileNotFoundError(os.fspath(self.run_dir / LOG), repr(self))
        self._writer().commit([], [self.key])

    def flip(self, index: int, *, envelope: bool = False) -> None:
        """Flip a bit of byte ``index`` of the record's data (of its entry's envelope when
        ``envelope``: the entry becomes unreadable bytes) in place in the log."""
        view = open_view(str(self.run_dir))
        assert view is not None
        with view:
            at = view.find(self.key)
        assert at is not None, f"{self} is not in the log"
        offset = at.offset + (index if envelope else file_log._ENTRY + index % at.size)
        with open(self.run_dir / LOG, "r+b") as log:
            log.seek(offset)
            byte = log.read(1)[0]
            log.seek(offset)
            log.write(bytes([byte ^ 0x40]))


def run_record(root: Path, run_key: str) -> LogRecord:
    """``run.rec`` of the run ``run_key`` of the file store at ``root``."""
    return LogRecord(root / "runs" / run_key, RUN)


def checkpoint_record(root: Path, run_key: str, sequence: int) -> LogRecord:
    """The record of checkpoint ``sequence`` of the run ``run_key``."""
    return LogRecord(root / "runs" / run_key, sequence)


def item_record(root: Path, run_key: str, key: str) -> LogRecord:
    """The log entry that holds the item ``key`` of the run ``run_key`` (found by a scan)."""
    run_dir = root / "runs" / run_key
    view = open_view(str(run_dir))
    assert view is not None
    with view:
        for entry in view.held_keys():
            if entry > _FIRST_ITEM:
                continue
            at = view.find(entry)
            assert at is not None
            meta = file_store._entry_meta(view, entry, at, str(LogRecord(run_dir, entry)))
            if meta.key == key:
                return LogRecord(run_dir, entry)
    raise AssertionError(f"no entry of item {key!r} in {run_dir / LOG}")


def forget_items(root: Path, run_key: str) -> None:
    """Drop this process's item index of the run (it had one): what a new process starts
    with. Its next read of the run's items scans the log."""
    path = os.path.join(os.path.abspath(root), "runs", run_key)
    assert any(at == path for at, _ in file_store._INDEXES._by_log), \
        f"no item index of {path} to forget"
    file_store._INDEXES.forget(path)


def new_boot(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine restarts: a new boot id, so no ``idx`` written before is current (readers
    wait for the run lock, whose holder writes it again)."""
    boot = secrets.token_bytes(16)
    monkeypatch.setattr(file_log, "_boot", lambda: boot)


class Process:
    """Another process using the store, as far as items go: item indexes of its own. The
    store's calls made inside ``with process:`` use them (run nothing concurrent meanwhile)."""

    def __init__(self) -> None:
        self.indexes = file_store._ItemIndexes(file_store._INDEXED_ITEMS)
        self._saved: list[file_store._ItemIndexes] = []

    def __enter__(self) -> Process:
        self._saved.append(file_store._INDEXES)
        file_store._INDEXES = self.indexes
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        file_store._INDEXES = self._saved.pop()


async def all_items(
    store: FileStore | MemoryStore, run_key: str, *, now: float = T0
) -> dict[str, bytes]:
    """Every live item of the run, as ``scan_items`` pages them (in order)."""
    found: dict[str, bytes] = {}
    after: str | None = None
    while True:
        page = await store.scan_items(run_key, start_after=after, limit=100, now=now)
        found.update(page)
        if len(page) < 100:
            return found
        after = page[-1][0]


Snapshot = tuple[dict[str, bytes], dict[int, dict[str, bytes]]]
"""Every live item of a run, and what ``read_with_items`` returns for each held checkpoint."""


async def snapshot(store: FileStore | MemoryStore, run_key: str, *, now: float = T0) -> Snapshot:
    """What reads of the run's items return: every live item, and the items read with each
    live checkpoint."""
    headers, _ = await store.headers(run_key, before=None, limit=1000, now=now)
    read: dict[int, dict[str, bytes]] = {}
    for header in headers:
        found = await store.read_with_items(run_key, sequence=header.sequence, now=now)
        assert found is not None, f"checkpoint {header.sequence} listed but unreadable"
        read[header.sequence] = found[2]
    return await all_items(store, run_key, now=now), read


def checkpoint_sequences(root: Path, run_key: str) -> list[int]:
    """The checkpoint records the run's log holds, ascending."""
    run_dir = root / "runs" / run_key
    view = open_view(str(run_dir)) if run_dir.is_dir() else None
    if view is None:
        return []
    with view:
        return [key for key in view.held_keys() if key >= 0]


async def append_plain(
    store: FileStore, run: RunRecord, sequence: int, **options: Any
) -> str:
    """Append checkpoint ``sequence`` of ``run`` (``make_checkpoint``'s ``options``), keeping
    every checkpoint; returns the run's status."""
    record = make_checkpoint(run, sequence, **options)
    return await store.append(key_of(run), record, run=run, keep_latest=None, now=T0)


async def append_with_refs(
    store: FileStore | MemoryStore,
    run: RunRecord,
    sequence: int,
    refs: Sequence[str] = (),
    items: Sequence[Item] = (),
    *,
    now: float = T0,
    expires_at: float | None = None,
    keep_latest: int | None = None,
) -> StoredCheckpoint:
    """Append checkpoint ``sequence`` of ``run``, naming ``refs``, with ``items``."""
    return await append_items(store, run, sequence, refs=refs, items=items, now=now,
                              expires_at=expires_at, keep_latest=keep_latest)


def count_calls(monkeypatch: pytest.MonkeyPatch, *names: str) -> list[str]:
    """A list that gets the name of each call of the ``os`` functions ``names`` from now on."""
    calls: list[str] = []

    def counted(name: str) -> Callable[..., Any]:
        real = getattr(os, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return real(*args, **kwargs)

        return call

    for name in names:
        monkeypatch.setattr(os, name, counted(name))
    return calls


def count_pread_bytes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that gets the length of what each ``os.pread`` returns from now on."""
    read: list[int] = []
    real = os.pread

    def pread(fd: int, size: int, offset: int) -> bytes:
        data = real(fd, size, offset)
        read.append(len(data))
        return data

    monkeypatch.setattr(os, "pread", pread)
    return read


def count_item_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A list that gets the key of each item whose value the store reads from now on."""
    read: list[str] = []
    real = file_store._Dir.value

    def value(self: Any, view: Any, found: Any) -> bytes:
        read.append(found.meta.key)
        return real(self, view, found)

    monkeypatch.setattr(file_store._Dir, "value", value)
    return read


def fail_first_sync_while(
    monkeypatch: pytest.MonkeyPatch, read: Callable[[], None]
) -> list[threading.Thread]:
    """Make the next commit's sync fail with EIO, once ``read`` has run in a thread of its own
    for up to 0.5 s (a reader that waits for the run's lock, held by that writer); returns
    the reader's thread, in a list, to join."""
    readers: list[threading.Thread] = []
    real = file_log.LogWriter._sync

    def sync(writer: file_log.LogWriter, fd: int, *, data_only: bool = True) -> None:
        if not readers:
            reader = threading.Thread(target=read)
            readers.append(reader)
            reader.start()
            reader.join(0.5)
            raise OSError(errno.EIO, "fdatasync failed")
        real(writer, fd, data_only=data_only)

    monkeypatch.setattr(file_log.LogWriter, "_sync", sync)
    return readers
