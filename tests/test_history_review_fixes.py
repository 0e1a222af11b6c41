"""The manager's histories (messages stored as logs) under cancellation and turn-taking writers.

* A create whose merge replaced log parts removes them once the store acknowledged it; a
  cancellation of the caller meanwhile never turns the stored checkpoint into a failure (on
  anyio's and trio's cancellations the create returns it), and a removal that fails, is cut
  short or gives up leaves the parts to the run's next merge.
* Managers that take turns on one run, each restoring the run before its create (requests
  served by different workers), extend one log as a single writer does, instead of storing the
  whole list again at every create.
"""

from __future__ import annotations

import asyncio
import copy
import random
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
from tests._helpers import FakeClock, make_config, make_store

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


# -- writers taking turns -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "file"])
async def test_writers_taking_turns_extend_one_log(
    clock: FakeClock, kind: str, tmp_path: Any
) -> None:
    """Two managers (two workers) take turns on one run, each restoring it before its
    create: the logs hold what one writer's would, not a copy of the list per create."""
    steps = 5 * FANOUT
    sizes = []
    for writers in (1, 2):
        store = make_store(kind, tmp_path / f"w{writers}", fsync=False)
        try:
            managers = [_manager_of(store, clock) for _ in range(writers)]
            messages: list[Any] = [_message(index) for index in range(MIN - 1)]
            created: list[tuple[str, list[Any]]] = []
            for step in range(steps):
                manager = managers[step % writers]
                latest = await manager.restore("turns")
                assert (latest.messages if latest else []) == (messages if step else [])
                messages.append(_message(len(messages)))
                checkpoint = await manager.create("turns", {"step": step}, messages=messages)
                assert checkpoint is not None
                assert checkpoint.metadata.sequence == step
                created.append((checkpoint.metadata.checkpoint_id, list(messages)))
            reader = _manager_of(store, clock)
            for checkpoint_id, expected in created:
                restored = await reader.restore_from(checkpoint_id)
                assert restored is not None
                assert restored.messages == expected
            logged = await _log_items(store, "turns")
            sizes.append((len(logged), sum(map(len, logged.values()))))
        finally:
            await store.aclose()
    (one_items, one_bytes), (two_items, two_bytes) = sizes
    assert two_items == one_items
    assert two_bytes <= one_bytes * 1.05
    assert one_items <= 1 + 2 * (FANOUT - 1)


async def test_a_restored_latest_is_extended_with_one_append(clock: FakeClock) -> None:
    """A manager that restores a run another one wrote, then creates: one read, one append
    that writes only the new entries (no sequence race with its own stale guess)."""
    store = _Store()
    first, second = _manager_of(store, clock), _manager_of(store, clock)
    messages = [_message(index) for index in range(MIN)]
    await _grow(second, messages, 1)
    await _grow(first, messages, 3)
    store.take()
    before = await _log_items(store, "run")

    assert await second.restore("run") is not None
    await _grow(second, messages, 1)
    assert store.take() == {"read_with_items": 1, "append_with_items": 1}
    added = {
        key: value for key, value in (await _log_items(store, "run")).items() if key not in before
    }
    assert len(added) == 1
    (part,) = added.values()
    newest = f"message {len(messages) - 1}".encode()
    assert newest in part
    assert b"message 0" not in part  # the new message, not the list again


async def test_restoring_an_older_checkpoint_is_not_taken_for_the_latest(
    clock: FakeClock,
) -> None:
    """``restore_from`` an older checkpoint neither begins a log from it nor forgets the
    latest one this manager restored: its next create still extends the latest."""
    store = _Store()
    first, second = _manager_of(store, clock), _manager_of(store, clock)
    messages = [_message(index) for index in range(MIN)]
    await _grow(first, messages, 1)
    old = await first.restore("run")
    assert old is not None
    await _grow(first, messages, 3)
    assert await second.restore("run") is not None
    restored = await second.restore_from(old.metadata.checkpoint_id)
    assert restored is not None
    assert restored.messages == messages[: MIN + 1]
    before = await _log_items(store, "run")
    await _grow(second, messages, 1)
    after = await _log_items(store, "run")
    assert len(after) == len(before) + 1
    assert sum(key.count("/") == 2 for key in after) == 1  # one anchor: no new log
    latest = await first.restore("run")
    assert latest is not None
    assert latest.messages == messages


async def test_a_write_between_the_restore_and_the_create_begins_a_new_log(
    clock: FakeClock,
) -> None:
    """Another writer's create between this manager's restore and its create takes the
    sequence: the store refuses this create, which begins a new log; both lines restore
    exactly."""
    store = _Store()
    first, second = _manager_of(store, clock), _manager_of(store, clock)
    messages = [_message(index) for index in range(MIN)]
    await _grow(first, messages, 2)
    assert await second.restore("run") is not None
    theirs = [*messages, _message(100)]
    mine = [*messages, _message(200)]
    by_first = await first.create("run", {}, messages=theirs)
    by_second = await second.create("run", {}, messages=mine)
    assert by_first is not None
    assert by_second is not None
    assert by_second.metadata.sequence == by_first.metadata.sequence + 1
    anchors = [key for key in await _log_items(store, "run") if key.count("/") == 2]
    assert len(anchors) == 2  # the second create wrote its list whole, as a new log
    for checkpoint, expected in ((by_first, theirs), (by_second, mine)):
        restored = await first.restore_from(checkpoint.metadata.checkpoint_id)
        assert restored is not None
        assert restored.messages == expected


@pytest.mark.parametrize("seed", range(6))
async def test_random_turns_restore_exactly(clock: FakeClock, seed: int) -> None:
    """Three managers restore, create (appending or editing), delete and prune one run in
    random turns, over enough creates to merge parts; every live checkpoint restores what its
    create was given after every step."""
    rng = random.Random(seed)
    store = _Store()
    managers = [_manager_of(store, clock) for _ in range(3)]
    messages: list[Any] = [_message(index) for index in range(MIN)]
    expected: dict[str, list[Any]] = {}
    for _ in range(4 * FANOUT):
        manager = rng.choice(managers)
        roll = rng.random()
        if roll < 0.6:
            await manager.restore("random")
        elif roll < 0.7 and expected:
            await manager.delete(rng.choice(sorted(expected)))
        elif roll < 0.75:
            await manager.prune("random", rng.randint(1, 5))
        elif roll < 0.8 and expected:
            await manager.restore_from(rng.choice(sorted(expected)))
        if rng.random() < 0.1 and messages:
            messages[rng.randrange(len(messages))] = _message(rng.randrange(1000))
        messages += [_message(len(messages)) for _ in range(rng.randint(0, 2))]
        checkpoint = await manager.create("random", {}, messages=messages)
        assert checkpoint is not None
        expected[checkpoint.metadata.checkpoint_id] = copy.deepcopy(messages)
        for checkpoint_id, lists in list(expected.items()):
            restored = await managers[0].restore_from(checkpoint_id)
            if restored is None:
                del expected[checkpoint_id]
                continue
            assert restored.messages == lists, (seed, checkpoint_id)
    assert expected
