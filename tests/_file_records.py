"""The records of a file-store run's log (``run.rec`` and ``c/<sequence>``), handled the way
tests handled them when they were files: read, replaced, removed, damaged.

Writing a record appends a commit that puts it (what replacing the file did); removing one
appends a commit that removes it. Both go through the store's own log writer, without syncs.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from fastcheckpoint.stores import Item, RunRecord, StoredCheckpoint
from fastcheckpoint.stores._file_log import LOG, RUN, LogWriter, open_view
from fastcheckpoint.stores.file import FileStore
from fastcheckpoint.testing import T0
from fastcheckpoint.testing._adapter import _append_items as append_items


class LogRecord:
    """One record of a run's log, with the part of ``pathlib.Path``'s interface tests use."""

    def __init__(self, run_dir: Path, key: int) -> None:
        self.run_dir = run_dir
        self.key = key

    def __str__(self) -> str:
        """How the store names the record in errors and logs."""
        name = "run.rec" if self.key == RUN else f"c/{self.key:020d}"
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


def run_record(root: Path, run_key: str) -> LogRecord:
    """``run.rec`` of the run ``run_key`` of the file store at ``root``."""
    return LogRecord(root / "runs" / run_key, RUN)


def checkpoint_record(root: Path, run_key: str, sequence: int) -> LogRecord:
    """The record of checkpoint ``sequence`` of the run ``run_key``."""
    return LogRecord(root / "runs" / run_key, sequence)


def checkpoint_sequences(root: Path, run_key: str) -> list[int]:
    """The checkpoint records the run's log holds, ascending."""
    run_dir = root / "runs" / run_key
    view = open_view(str(run_dir)) if run_dir.is_dir() else None
    if view is None:
        return []
    with view:
        return [key for key in view.held_keys() if key >= 0]


async def append_with_refs(
    store: FileStore,
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
