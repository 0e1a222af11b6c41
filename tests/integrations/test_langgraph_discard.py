"""The LangGraph saver's removal of the log parts a save merged away, when it is slow or the
caller is cancelled meanwhile: the save is stored and acknowledged all the same, the removal is
given up after ``_DISCARD_SECONDS``, and the parts stay recorded until a later merge removes
them (a thread's log never keeps every part it ever wrote)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest

from fastcheckpoint import MemoryStore
from fastcheckpoint._ids import run_key
from fastcheckpoint._logs import FANOUT
from fastcheckpoint.errors import StoreError
from fastcheckpoint.integrations import _langgraph_logs as logs
from fastcheckpoint.integrations import langgraph
from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
from tests._helpers import T0, FakeClock, make_config
from tests.integrations._langgraph_support import checkpoint, config, metadata

pytestmark = pytest.mark.anyio

MIN = 4
"""``history_min_entries`` here: lists of 4 entries or more are logs."""
SLOW = 2.0
"""How long a slow removal takes: far beyond the bound the tests set (0.01 s)."""


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


@pytest.fixture(autouse=True)
def _short_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(langgraph, "_DISCARD_SECONDS", 0.01, raising=False)


class _Store(MemoryStore):
    """A memory store whose ``delete_items`` suspends (a subclass does not inherit
    ``never_suspends``), can cancel a scope or a task first, and can be slow or fail."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.cancel: anyio.CancelScope | asyncio.Task[Any] | None = None
        self.slow = False
        self.fail = False
        self.keys = 0
        """Keys the last ``delete_items`` named."""

    async def delete_items(self, run_key: str, keys: Sequence[str]) -> int:
        self.calls["delete_items"] += 1
        self.keys = len(keys)
        if self.fail:
            raise StoreError("the removal failed")
        cancel, self.cancel = self.cancel, None
        if cancel is not None:
            cancel.cancel()
        await anyio.lowlevel.checkpoint()  # where a cancellation of the caller arrives
        if self.slow:
            await anyio.sleep(SLOW)
        removed = await super().delete_items(run_key, keys)
        self.calls["removed"] += 1
        return removed


class _Thread:
    """One thread whose ``log`` channel grows by one entry per save."""

    def __init__(self, store: _Store) -> None:
        self.store = store
        self.saver = _saver(store)
        self.entries = [f"entry {index}" for index in range(MIN - 1)]
        self.parent: Any = config("t")

    async def next_save(self) -> Any:
        """Saves the next version; from the moment it is under way, the thread's next save
        continues from it (what its config names), whether it returns or is cancelled."""
        self.entries = [*self.entries, f"entry {len(self.entries)}"]
        version = len(self.entries)
        made = checkpoint({"log": self.entries}, {"log": version})
        parent, self.parent = self.parent, config("t", made["id"])
        return await self.saver.aput(parent, made, metadata(version), {"log": version})

    async def grow(self, saves: int) -> None:
        for _ in range(saves):
            await self.next_save()

    async def log_items(self) -> int:
        """Items under the thread's log anchors (the anchors and their parts)."""
        found = await self.store.scan_items(run_key("t"), prefix=logs.LOGS, limit=10_000, now=T0)
        return len(found)

    async def latest(self) -> Any:
        """The thread's latest checkpoint, as another process loads it (a load by the
        thread's saver would have it continue from what it read)."""
        found = await _saver(self.store).aget_tuple(config("t"))
        assert found is not None
        return found


def _saver(store: _Store) -> FastCheckpointSaver:
    return FastCheckpointSaver(store, config=make_config(FakeClock(), history_min_entries=MIN))


async def _merged_once(thread: _Thread) -> None:
    await thread.grow(FANOUT)  # the anchor, then FANOUT - 1 parts
    assert await thread.log_items() == FANOUT
    assert thread.store.calls["delete_items"] == 0


async def _merged_again(thread: _Thread, *, left: int = FANOUT - 1) -> None:
    """The log's next merge removes its parts and the ``left`` ones left before."""
    thread.store.slow = thread.store.fail = False
    thread.store.calls.clear()
    await thread.grow(FANOUT)
    assert thread.store.calls == {"delete_items": 1, "removed": 1}
    assert thread.store.keys == FANOUT - 1 + left
    assert await thread.log_items() == 3  # the anchor and two merged parts
    assert (await thread.latest()).checkpoint["channel_values"] == {"log": thread.entries}


async def test_a_slow_removal_is_given_up_and_left_to_the_next_merge() -> None:
    with anyio.fail_after(10):
        thread = _Thread(_Store())
        await _merged_once(thread)
        thread.store.slow = True
        saved = await thread.next_save()  # merges; its removal is given up
        assert saved["configurable"]["checkpoint_id"] == (
            await thread.latest()).checkpoint["id"]
        assert thread.store.calls == {"delete_items": 1}  # cut short, nothing removed
        assert await thread.log_items() == FANOUT + 1
        found = await _saver(thread.store).aget_tuple(saved)
        assert found is not None
        assert found.checkpoint["channel_values"] == {"log": thread.entries}
        await _merged_again(thread)


async def test_a_cancellation_while_removing_keeps_the_save_and_leaves_the_parts() -> None:
    """anyio's and trio's cancellations wait for the removal (at most the bound): the save
    is stored, and the parts it could not remove go with the log's next merge."""
    with anyio.fail_after(10):
        thread = _Thread(_Store())
        await _merged_once(thread)
        thread.store.slow = True
        with anyio.CancelScope() as scope:
            thread.store.cancel = scope
            await thread.next_save()
        assert scope.cancelled_caught
        assert thread.store.calls == {"delete_items": 1}
        assert await thread.log_items() == FANOUT + 1
        latest = await thread.latest()
        assert latest.checkpoint["channel_values"] == {"log": thread.entries}
        assert latest.metadata["step"] == len(thread.entries)
        await _merged_again(thread)


async def test_asyncio_cancelling_a_save_while_it_removes_keeps_the_save(
    anyio_backend: str,
) -> None:
    """asyncio's own cancellation (``task.cancel()``) is raised once the removal ended or was
    given up; the save is stored and the next merge removes the parts."""
    if anyio_backend != "asyncio":
        pytest.skip("asyncio's own cancellation")
    with anyio.fail_after(10):
        thread = _Thread(_Store())
        await _merged_once(thread)
        thread.store.slow = True
        task = asyncio.ensure_future(thread.next_save())
        thread.store.cancel = task
        with pytest.raises(asyncio.CancelledError):
            await task
        assert thread.store.calls == {"delete_items": 1}
        assert await thread.log_items() == FANOUT + 1
        latest = await thread.latest()
        assert latest.checkpoint["channel_values"] == {"log": thread.entries}
        await _merged_again(thread)


async def test_a_quick_removal_under_a_cancellation_removes_the_parts_at_once() -> None:
    """A removal that ends within the bound removes the parts even when the caller is
    cancelled meanwhile; the next merge has nothing left over to remove."""
    with anyio.fail_after(10):
        thread = _Thread(_Store())
        await _merged_once(thread)
        with anyio.CancelScope() as scope:
            thread.store.cancel = scope
            await thread.next_save()
        assert scope.cancelled_caught
        assert thread.store.calls == {"delete_items": 1, "removed": 1}
        assert await thread.log_items() == 2  # the anchor and the merged part
        latest = await thread.latest()
        assert latest.checkpoint["channel_values"] == {"log": thread.entries}
        await _merged_again(thread, left=0)


async def test_a_load_between_keeps_the_parts_left_to_the_next_merge() -> None:
    """A load of the thread's latest checkpoint by the same saver (a graph makes one at the
    start of every ``ainvoke``) keeps the parts a failed removal left to the next merge."""
    with anyio.fail_after(10):
        thread = _Thread(_Store())
        await _merged_once(thread)
        thread.store.fail = True
        await thread.next_save()
        assert await thread.saver.aget_tuple(config("t")) is not None  # what a graph does
        await _merged_again(thread)


def test_a_removal_that_succeeded_after_a_load_forgets_the_parts() -> None:
    """``ChannelLogs.discarded`` clears the parts in the log remembered when the removal
    ended, which a load in between (keeping them) may have replaced: the next merge then
    removes only its own. (The saver's own loads of a thread wait for its saves under way,
    so this is the guard, tested on ``ChannelLogs`` directly.)"""
    channel_logs = logs.ChannelLogs(MIN)
    items: dict[str, bytes] = {}
    entries = [f"entry {index}" for index in range(MIN - 1)]

    def save() -> logs.Planned:
        entries.append(f"entry {len(entries)}")
        typed = ("msgpack", msgspec.msgpack.encode(entries))
        planned = channel_logs.plan("run", "log", len(entries), typed)
        assert planned is not None
        assert planned.write is not None
        items[planned.write.key] = planned.write.value
        channel_logs.remember("run", planned, "life")
        return planned

    for _ in range(FANOUT + 1):  # the anchor, FANOUT - 1 parts, then a merge
        merging = save()
    assert merging.write is not None
    assert len(merging.write.discard) == FANOUT - 1
    read = channel_logs.read("run", "log", merging.log, items, "here", keep="life")
    assert msgspec.msgpack.decode(read[1]) == entries
    channel_logs.discarded("run", merging)  # the removal ended after the load
    for _ in range(FANOUT):  # the next merge
        merging = save()
    assert merging.write is not None
    assert len(merging.write.discard) == FANOUT - 1
