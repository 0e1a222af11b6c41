"""The manager's histories (messages stored as logs) under cancellation and turn-taking writers.

* A create whose merge replaced log parts removes them once the store acknowledged it; a
  cancellation of the caller meanwhile never turns the stored checkpoint into a failure (on
  anyio's and trio's cancellations the create returns it), and a removal that fails, is cut
  short or gives up leaves the parts to the run's next merge.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from fastcheckpoint import CheckpointManager, _ids, _manager
from fastcheckpoint._logs import FANOUT
from fastcheckpoint.stores import CheckpointStore
from fastcheckpoint.stores.memory import MemoryStore
from tests._helpers import FakeClock, make_config

pytestmark = pytest.mark.anyio

MIN = 4
"""``history_min_entries`` here: lists of 4 entries or more are logs."""


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class _Store(MemoryStore):
    """A memory store whose calls suspend (a subclass does not inherit ``never_suspends``),
    counting them; ``delete_items`` can cancel a scope or a task first, or never end."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.cancel: anyio.CancelScope | asyncio.Task[Any] | None = None
        self.hang = False

    def take(self) -> dict[str, int]:
        taken = dict(self.calls)
        self.calls.clear()
        return taken

    async def append_with_items(self, *args: Any, **kwargs: Any) -> Any:
        self.calls["append_with_items"] += 1
        await anyio.lowlevel.checkpoint()
        return await super().append_with_items(*args, **kwargs)

    async def read_with_items(self, *args: Any, **kwargs: Any) -> Any:
        self.calls["read_with_items"] += 1
        await anyio.lowlevel.checkpoint()
        return await super().read_with_items(*args, **kwargs)

    async def get_run(self, *args: Any, **kwargs: Any) -> Any:
        self.calls["get_run"] += 1
        return await super().get_run(*args, **kwargs)

    async def delete_items(self, run_key: str, keys: Sequence[str]) -> int:
        self.calls["delete_items"] += 1
        cancel, self.cancel = self.cancel, None
        if cancel is not None:
            cancel.cancel()
        await anyio.lowlevel.checkpoint()  # where a cancellation of the caller arrives
        if self.hang:
            await anyio.sleep_forever()
        return await super().delete_items(run_key, keys)


def _manager_of(store: CheckpointStore, clock: FakeClock) -> CheckpointManager:
    return CheckpointManager(store, make_config(clock, history_min_entries=MIN))


def _message(index: int) -> dict[str, Any]:
    return {"role": "user" if index % 2 else "assistant", "content": f"message {index}"}


async def _log_items(store: CheckpointStore, run_id: str) -> dict[str, bytes]:
    """Every item of the run's messages logs (anchors ``m/...`` and what is nested)."""
    page = await store.scan_items(_ids.key_of(run_id), prefix="m/", limit=10_000, now=0.0)
    return dict(page)


async def _grow(
    manager: CheckpointManager, messages: list[Any], steps: int, run_id: str = "run"
) -> None:
    for _ in range(steps):
        messages.append(_message(len(messages)))
        assert await manager.create(run_id, {}, messages=messages) is not None


# -- the removal of merged parts ----------------------------------------------------------


async def test_a_create_cancelled_while_it_removes_merged_parts_returns_its_checkpoint(
    clock: FakeClock,
) -> None:
    """anyio's and trio's cancellations wait for the removal: the create returns the
    checkpoint the store acknowledged, the parts are gone, and the caller's next checkpoint
    raises the cancellation."""
    with anyio.fail_after(5):
        store = _Store()
        manager = _manager_of(store, clock)
        messages = [_message(index) for index in range(MIN)]
        await _grow(manager, messages, FANOUT)  # the anchor, then FANOUT - 1 parts
        assert len(await _log_items(store, "run")) == FANOUT

        messages.append(_message(len(messages)))
        created = None
        with anyio.CancelScope() as scope:
            store.cancel = scope
            created = await manager.create("run", {}, messages=messages)  # merges
            await anyio.lowlevel.checkpoint()
        assert scope.cancelled_caught
        assert created is not None
        assert store.calls["delete_items"] == 1
        assert len(await _log_items(store, "run")) == 2  # the anchor and the merged part
        restored = await manager.restore("run")
        assert restored is not None
        assert restored.metadata.checkpoint_id == created.metadata.checkpoint_id
        assert restored.messages == messages


async def test_asyncio_cancelling_a_create_while_it_removes_merged_parts_removes_them(
    clock: FakeClock,
    anyio_backend: str,
) -> None:
    """asyncio's own cancellation (``task.cancel()``, ``wait_for``) cannot be held back: it
    is raised once the removal ended, the checkpoint is stored and its parts are gone."""
    if anyio_backend != "asyncio":
        pytest.skip("asyncio's own cancellation")
    with anyio.fail_after(5):
        store = _Store()
        manager = _manager_of(store, clock)
        messages = [_message(index) for index in range(MIN)]
        await _grow(manager, messages, FANOUT)
        messages.append(_message(len(messages)))
        task = asyncio.ensure_future(manager.create("run", {}, messages=messages))
        store.cancel = task
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(await _log_items(store, "run")) == 2
        restored = await manager.restore("run")
        assert restored is not None
        assert restored.metadata.sequence == FANOUT
        assert restored.messages == messages


async def test_a_removal_given_up_leaves_the_parts_to_the_next_merge(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A removal that never ends is given up after ``_DISCARD_SECONDS`` (the create returns
    its checkpoint); the parts stay recorded and the run's next merge removes them."""
    monkeypatch.setattr(_manager, "_DISCARD_SECONDS", 0.01, raising=False)
    with anyio.fail_after(5):
        store = _Store()
        manager = _manager_of(store, clock)
        messages = [_message(index) for index in range(MIN)]
        await _grow(manager, messages, FANOUT)
        store.hang = True
        await _grow(manager, messages, 1)  # merges; its removal hangs and is given up
        store.hang = False
        assert len(await _log_items(store, "run")) == FANOUT + 1
        restored = await manager.restore("run")
        assert restored is not None
        assert restored.messages == messages

        store.take()
        await _grow(manager, messages, FANOUT)  # the next merge
        assert store.take() == {"append_with_items": FANOUT, "delete_items": 1}
        assert len(await _log_items(store, "run")) == 3  # the anchor and two merged parts
        restored = await manager.restore("run")
        assert restored is not None
        assert restored.messages == messages
