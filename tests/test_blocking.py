"""The blocking facade: every manager coroutine has a blocking twin with the same signature,
usable from plain threads, from threads beside a running asyncio loop, and refused on that
loop's own thread."""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import anyio
import pytest

from fastcheckpoint import (
    CheckpointConfig,
    CheckpointManager,
    CheckpointStatus,
    CheckpointStore,
    FileStore,
)
from fastcheckpoint.blocking import BlockingManager
from fastcheckpoint.errors import (
    CheckpointError,
    ConfigurationError,
    StoreError,
    ValidationError,
)
from tests._helpers import FakeClock, ForwardingStore

_T = TypeVar("_T")

_NOT_MIRRORED = {"aclose"}  # close() instead: see _RENAMED
_RENAMED = {
    # A blocking close(), as synchronous resources name it; it also stops the facade's own
    # loop thread. (Likewise `with` stands for `async with`, but leaving it closes the store.)
    "aclose": "close",
}
_BLOCKING_ONLY = {
    "manager": "the async manager underneath, for async code beside the facade",
}


def _coroutine_methods() -> list[str]:
    return sorted(
        name for name, member in inspect.getmembers(CheckpointManager)
        if not name.startswith("_") and name not in _NOT_MIRRORED
        and (inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member)
             or name == "export_run"))


@pytest.mark.parametrize("name", _coroutine_methods())
def test_every_manager_coroutine_has_a_blocking_twin(name: str) -> None:
    ours = inspect.signature(getattr(BlockingManager, name))
    theirs = inspect.signature(getattr(CheckpointManager, name))
    assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == [
        (p.name, p.kind, p.default) for p in theirs.parameters.values()]


def test_a_program_without_an_event_loop(tmp_path: Path) -> None:
    clock = FakeClock()
    with BlockingManager(f"file://{tmp_path}", config=CheckpointConfig(clock=clock)) as manager:
        first = manager.create("run-1", {"step": 1}, step_name="plan")
        assert first is not None
        manager.create("run-1", {"step": 2}, step_name="act", force=True)
        restored = manager.restore("run-1")
        assert restored is not None
        assert restored.state == {"step": 2}
        assert [m.step_name for m in manager.list_checkpoints("run-1")] == ["act", "plan"]
        info = manager.pause("run-1", {"question": "ship it?"})
        assert info.status is CheckpointStatus.PAUSED
        assert [run.run_id for run in manager.list_runs(CheckpointStatus.PAUSED)] == ["run-1"]
        manager.approve("run-1", approver="ops")
        exported = json.loads("".join(manager.export_run("run-1")))
        assert exported["run"]["run_id"] == "run-1"
        assert manager.count_runs() == 1
        assert manager.delete_run("run-1") == 2
        assert manager.restore("run-1") is None
        with pytest.raises(ValidationError):
            manager.create("", {"x": 1})
    manager.close()  # twice is harmless


def test_threads_share_one_facade(tmp_path: Path) -> None:
    manager = BlockingManager(FileStore(tmp_path))
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for step in range(5):
                manager.create(f"run-{index}", {"step": step}, force=True)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        for index in range(4):
            restored = manager.restore(f"run-{index}")
            assert restored is not None
            assert restored.state == {"step": 4}
    finally:
        manager.close()


def test_beside_a_running_loop_it_runs_on_that_loop(tmp_path: Path) -> None:
    async def main() -> None:
        manager = BlockingManager(CheckpointManager(FileStore(tmp_path)))
        # From another thread: runs on this loop while it awaits the thread.
        created = await asyncio.to_thread(manager.create, "run", {"a": 1})
        assert created is not None
        # On the loop's own thread it would wait for itself: refused, with the way out.
        with pytest.raises(ConfigurationError, match="another thread"):
            manager.restore("run")
        restored = await manager.manager.restore("run")
        assert restored is not None
        assert restored.state == {"a": 1}
        await manager.manager.aclose()

    asyncio.run(main())


def test_config_with_a_manager_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        BlockingManager(CheckpointManager(FileStore(tmp_path)), config=CheckpointConfig())
    with pytest.raises(CheckpointError):
        BlockingManager("nosuchscheme://x")


def test_own_loop_serves_calls_made_on_a_running_loops_thread(tmp_path: Path) -> None:
    """As CrewAI does: a synchronous interface called from the framework's loop thread."""

    async def main() -> None:
        manager = BlockingManager(FileStore(tmp_path), own_loop=True)
        try:
            created = manager.create("run", {"a": 1})  # blocks this loop: its own loop runs it
            assert created is not None
            restored = manager.restore("run")
            assert restored is not None
            assert restored.state == {"a": 1}
        finally:
            manager.close()

    asyncio.run(main())


def test_a_loop_thread_that_cannot_start_is_a_store_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process at its thread limit: the blocking call raises ``StoreError`` (not the
    ``RuntimeError`` of ``Thread.start``), and works once a thread can start again."""
    manager = BlockingManager(FileStore(tmp_path))
    real = threading.Thread.start

    def refused(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refused)
    with pytest.raises(StoreError, match=r"could not start .* event loop thread: can't start"):
        manager.create("run", {"a": 1})
    monkeypatch.setattr(threading.Thread, "start", real)
    try:
        assert manager.create("run", {"a": 1}) is not None
        restored = manager.restore("run")
        assert restored is not None
        assert restored.state == {"a": 1}
    finally:
        manager.close()


def _public_names(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def test_every_public_name_of_the_manager_has_a_blocking_counterpart() -> None:
    """Methods, properties and class methods alike; the exceptions are listed above, each
    with its reason, so a new manager method cannot be left out unnoticed."""
    expected = {_RENAMED.get(name, name) for name in _public_names(CheckpointManager)}
    assert _public_names(BlockingManager) - set(_BLOCKING_ONLY) == expected


class _HeldCleanup(ForwardingStore):
    """A cleanup pass that waits until it is cancelled, and says when it started and ended."""

    def __init__(self, inner: CheckpointStore) -> None:
        super().__init__(inner)
        self.passes = 0
        self.started = threading.Event()
        self.ended = threading.Event()

    async def purge_expired(self, *, now: float, limit: int) -> tuple[int, bool]:
        self.passes += 1
        self.ended.clear()
        self.started.set()
        try:
            await anyio.sleep_forever()
        finally:
            self.ended.set()
        raise AssertionError("not reached")


def _within(seconds: float, call: Callable[[], _T]) -> _T:
    """``call()`` on a thread of its own, failing the test if it has not returned in time."""
    results: list[_T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(call())
        except BaseException as exc:  # re-raised below, on the test's thread
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{call} did not return within {seconds}s"
    if errors:
        raise errors[0]
    return results[0]


def test_stop_ends_the_cleanup_loop_and_leaves_the_store_open(tmp_path: Path) -> None:
    """``start()`` runs the cleanup loop; ``stop()`` cancels it and returns once it has
    ended, without closing the store: the facade goes on working and can start again."""
    store = _HeldCleanup(FileStore(tmp_path))
    manager = BlockingManager(CheckpointManager(store))
    try:
        _within(5, manager.start)
        assert store.started.wait(5)
        _within(5, manager.stop)
        assert store.ended.is_set()  # the pass was cancelled before stop() returned
        _within(5, manager.stop)  # stopping a stopped loop is harmless
        assert _within(5, lambda: manager.create("run", {"a": 1})) is not None
        store.started.clear()
        _within(5, manager.start)
        assert store.started.wait(5)
        assert store.passes == 2
    finally:
        _within(10, manager.close)
    assert store.ended.is_set()
