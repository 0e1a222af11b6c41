"""Worker-thread hops: a thread that cannot start is a ``StoreError`` and changes nothing, on
every path that hops (the file and SQLite stores' operations, the manager's large encodes and
decodes); what the function itself raises passes through; the package hops one way only."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from fastcheckpoint import CheckpointManager
from fastcheckpoint._threads import in_worker_thread
from fastcheckpoint.errors import StoreError
from fastcheckpoint.stores import open_store
from tests._helpers import FakeClock, make_config

pytestmark = pytest.mark.anyio

PACKAGE = Path(__file__).resolve().parent.parent / "fastcheckpoint"


@pytest.fixture
def no_threads(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """From the call on, no worker thread starts (a process at its thread limit); the
    returned function lets them start again."""
    real = anyio.to_thread.run_sync

    async def refused(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("can't start new thread")

    def start_refusing() -> None:
        monkeypatch.setattr(anyio.to_thread, "run_sync", refused)

    def allow() -> None:
        monkeypatch.setattr(anyio.to_thread, "run_sync", real)

    start_refusing.allow = allow  # type: ignore[attr-defined]
    return start_refusing


async def test_a_thread_that_cannot_start_is_a_store_error(
    no_threads: Callable[[], None],
) -> None:
    no_threads()
    with pytest.raises(StoreError, match="could not start a worker thread: can't start"):
        await in_worker_thread(lambda: 1)


async def test_what_the_function_raises_passes_through() -> None:
    def broken() -> None:
        raise RuntimeError("the function's own")

    with pytest.raises(RuntimeError, match="the function's own"):
        await in_worker_thread(broken)
    assert await in_worker_thread(lambda a, b: a + b, 2, 3) == 5


@pytest.mark.parametrize("url", ["file", "sqlite", "memory-large"])
async def test_no_thread_fails_a_create_that_changes_nothing(
    tmp_path: Path, no_threads: Callable[[], None], url: str
) -> None:
    """On the file and SQLite stores every operation hops; on memory only a large payload's
    encode does (it is above ``offload_min_bytes``)."""
    store_url = {"file": f"file://{tmp_path}/files", "sqlite": f"sqlite:///{tmp_path}/db",
                 "memory-large": "memory://"}[url]
    large = url == "memory-large"  # (the run's earlier payload sizes it up: large too)
    before, state = ({"blob": "x" * 4096}, {"blob": "y" * 4096}) if large else ({"n": 0}, {"n": 1})
    manager = CheckpointManager(open_store(store_url),
                                config=make_config(FakeClock(), offload_min_bytes=1024))
    async with manager:
        first = await manager.create("kept", before)
        no_threads()
        with pytest.raises(StoreError, match="could not start a worker thread"):
            await manager.create("kept", state)
        with pytest.raises(StoreError, match="could not start a worker thread"):
            await manager.create("new", state)
        no_threads.allow()  # type: ignore[attr-defined]
        kept = await manager.restore("kept")
        assert kept is not None
        assert (kept.checkpoint_id, kept.state) == (first.checkpoint_id, before)
        assert await manager.restore("new") is None


def test_the_package_hops_one_way() -> None:
    """Every hop goes through ``in_worker_thread`` (which turns a thread that cannot start
    into a ``StoreError``)."""
    found = [
        f"{path.relative_to(PACKAGE)}: {line.strip()}"
        for path in PACKAGE.rglob("*.py") if path.name != "_threads.py"
        for line in path.read_text(encoding="utf-8").splitlines()
        if re.search(r"to_thread\.run_sync\(|run_in_executor\(", line)
    ]
    assert found == []


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_asyncios_own_cancellation_waits_for_a_thread_that_began(
    anyio_backend: str,
) -> None:
    """``task.cancel()`` reaches the caller once the function has finished, not while it
    goes on in its thread (anyio's shield does not hold asyncio's own cancellations)."""
    began, go, ended = threading.Event(), threading.Event(), threading.Event()

    def work() -> None:
        began.set()
        go.wait(10)
        ended.set()

    task = asyncio.create_task(in_worker_thread(work))
    while not began.is_set():  # noqa: ASYNC110 (set by a worker thread)
        await asyncio.sleep(0.001)
    task.cancel()
    await asyncio.sleep(0.05)
    task.cancel()  # cancelled again while it waits: still waits
    await asyncio.sleep(0.05)
    assert not task.done()
    go.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ended.is_set()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_function_cancelled_before_its_thread_began_never_runs(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[int] = []
    real = anyio.to_thread.run_sync
    held = asyncio.Event()

    async def late(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        await held.wait()  # the hop has not begun
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", late)
    task = asyncio.create_task(in_worker_thread(lambda: ran.append(1)))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    assert ran == []
