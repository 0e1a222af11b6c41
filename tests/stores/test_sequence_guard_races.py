"""A guarded status change (``update_run(..., latest_sequence=)``) racing another process's
append, on the stores that decide the guard themselves (``check_head`` between their read of
the run and their write): the file store under the run's lock, SQLite in one write
transaction.

The race is held open: while the update sits between its read and its write, a second store
object on the same files (its own lock descriptors, its own connection: what another process
has) appends in a thread. That append must wait until the update is done, so the update is
decided on the run's newest sequence as it stands when it writes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from fastcheckpoint.stores import file as file_module
from fastcheckpoint.stores import sqlite as sqlite_module
from fastcheckpoint.stores._base import CheckpointStore, check_head
from fastcheckpoint.stores.file import FileStore
from fastcheckpoint.stores.sqlite import SQLiteStore
from fastcheckpoint.testing._builders import T0, key_of, make_checkpoint, make_run

pytestmark = pytest.mark.anyio

HOLD = 0.5
"""How long the update stays between its read and its write (seconds)."""


def _opened(kind: str, path: Path) -> CheckpointStore:
    """A store of ``kind`` over ``path``: every call opens what another process would."""
    if kind == "file":
        return FileStore(path / "files", fsync=False)
    return SQLiteStore(path / "runs.db")


_MODULES = {"file": file_module, "sqlite": sqlite_module}


@pytest.mark.parametrize("kind", ["file", "sqlite"])
async def test_an_append_from_another_process_waits_for_a_guarded_update(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed = make_run("guard-race")
    key = key_of(seed)
    ours, theirs = _opened(kind, tmp_path), _opened(kind, tmp_path)
    appended: list[float] = []
    held: list[tuple[float, float]] = []

    def other_append() -> None:
        anyio.run(lambda: theirs.append(key, make_checkpoint(seed, 1), run=seed,
                                        keep_latest=None, now=T0 + 1))
        appended.append(time.monotonic())

    def held_open(checked: Callable[[str, int, int | None], None]) -> Callable[..., None]:
        def check(run_key: str, latest: int, latest_sequence: int | None) -> None:
            started = time.monotonic()
            thread = threading.Thread(target=other_append)
            thread.start()
            thread.join(HOLD)  # the other process's append, while we hold the run
            held.append((started, time.monotonic()))
            checked(run_key, latest, latest_sequence)
        return check

    try:
        with anyio.fail_after(30):
            await ours.append(key, make_checkpoint(seed, 0), run=seed, keep_latest=None,
                              now=T0)
            monkeypatch.setattr(_MODULES[kind], "check_head", held_open(check_head))
            updated = await ours.update_run(key, incarnation=seed.incarnation, version=0,
                                            status="paused", data=b"ask", now=T0 + 1,
                                            latest_sequence=0)
            monkeypatch.undo()
            for _ in range(300):
                if appended:
                    break
                await anyio.sleep(0.01)
            run = await theirs.get_run(key, now=T0 + 1)
    finally:
        await ours.aclose()
        await theirs.aclose()

    assert len(held) == 1
    assert appended, "the other append never ran"
    assert appended[0] > held[0][1], "the append landed while the guarded update held the run"
    assert (updated.status, updated.latest_sequence) == ("paused", 0)
    assert run is not None
    assert (run.status, run.version, run.latest_sequence) == ("paused", 1, 1)
