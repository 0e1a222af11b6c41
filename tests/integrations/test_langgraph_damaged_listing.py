"""The LangGraph saver's listing past a damaged checkpoint: ``alist`` (so
``graph.aget_state_history``, which a user reads to find a checkpoint to resume from when the
newest is damaged) logs and skips a checkpoint it cannot read and lists every other one, a
page filled past it; ``aget_tuple`` of the damaged one, by id or as the latest, still raises
``CorruptCheckpointError`` (never an older checkpoint in its place).

The damage is done behind the store's back: in the memory store's own records, and in the
file store's log (a bit flipped, as a bad disk would)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from fastcheckpoint import FileStore, MemoryStore
from fastcheckpoint.errors import CorruptCheckpointError
from fastcheckpoint.integrations import _langgraph_records as records
from fastcheckpoint.integrations import langgraph as saver_module
from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
from tests._file_records import checkpoint_record, item_record
from tests._helpers import FakeClock, make_config
from tests.integrations._langgraph_support import CountingStore, config, put, step_loop

pytestmark = pytest.mark.anyio

DEADLINE = 20
KEY = saver_module._where_from("t", "").key
"""The run key of thread ``t``'s root namespace."""
TASK = "task"

Damage = Callable[[int], None]
"""Damages what a checkpoint (by sequence) holds: its record, a value, a write."""


def _saver(store: Any) -> FastCheckpointSaver:
    return FastCheckpointSaver(store, config=make_config(FakeClock()))


async def _thread(saver: FastCheckpointSaver) -> list[str]:
    """Checkpoints 0-4 of thread ``t`` (their LangGraph ids, oldest first): channel ``a`` at
    version 1 in 0-2 (one value they share), at 2 in 3-4; ``b`` new in each; a write of
    each."""
    ids: list[str] = []
    for step in range(5):
        a = 1 if step < 3 else 2
        changed = {"b": step + 1} | ({"a": a} if step in (0, 3) else {})
        saved = await put(saver, "t", parent=ids[-1] if ids else None,
                          values={"a": f"a{a}", "b": f"b{step}"},
                          versions={"a": a, "b": step + 1}, new_versions=changed, step=step)
        await saver.aput_writes(config("t", saved), [("b", f"w{step}")], TASK)
        ids.append(saved)
    return ids


async def _listed(saver: FastCheckpointSaver, cfg: Any = None, **options: Any) -> list[str]:
    return [found.checkpoint["id"]
            async for found in saver.alist(cfg or config("t"), **options)]


# -- damage -------------------------------------------------------------------------------


def _memory_damage(store: MemoryStore, what: str) -> Damage:
    def cut(value: bytes) -> bytes:
        return value[: len(value) // 2]

    def damage(sequence: int) -> None:
        if what in ("payload", "header"):
            run = store._runs[KEY]
            record = run.checkpoints[sequence]
            run.checkpoints[sequence] = msgspec.structs.replace(
                record, **{what: cut(getattr(record, what))})
            return
        space = store._items[KEY]
        key = _item_key(what, sequence)
        space.items[key] = msgspec.structs.replace(space.items[key],
                                                    value=cut(space.items[key].value))

    return damage


def _file_damage(root: Path, what: str) -> Damage:
    def damage(sequence: int) -> None:
        if what == "payload":  # its last byte: the payload's (the header's checksum holds)
            checkpoint_record(root, KEY, sequence).flip(-1)
        else:
            item_record(root, KEY, _item_key(what, sequence)).flip(-1)

    return damage


def _item_key(what: str, sequence: int) -> str:
    """The item of checkpoint ``sequence`` that ``what`` damages: its own value of ``b``,
    its write."""
    if what == "value":
        return records.blob_key("b", sequence + 1)
    assert what == "write"
    return records.write_key(sequence, TASK, 0)


CASES = [("memory", "payload"), ("memory", "header"), ("memory", "value"),
         ("memory", "write"), ("file", "payload"), ("file", "value"), ("file", "write")]


def _store(kind: str, tmp_path: Path) -> MemoryStore | FileStore:
    return MemoryStore() if kind == "memory" else FileStore(tmp_path / "store", fsync=False)


def _damage(kind: str, store: Any, tmp_path: Path, what: str) -> Damage:
    return (_memory_damage(store, what) if kind == "memory"
            else _file_damage(tmp_path / "store", what))


# -- tests --------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "what"), CASES)
async def test_alist_skips_a_damaged_newest_checkpoint_and_aget_tuple_still_raises(
    kind: str, what: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = _store(kind, tmp_path)
    with anyio.fail_after(DEADLINE):
        first = _saver(store)
        ids = await _thread(first)
        record_id = (await first.manager.list_checkpoints("t", 1))[0].checkpoint_id
        _damage(kind, store, tmp_path, what)(4)
        saver = _saver(store)  # another process: nothing of the thread known
        with caplog.at_level(logging.WARNING, logger="fastcheckpoint"):
            listed = await _listed(saver)
        with pytest.raises(CorruptCheckpointError) as as_latest:
            await saver.aget_tuple(config("t"))
        with pytest.raises(CorruptCheckpointError) as by_id:
            await saver.aget_tuple(config("t", ids[4]))
        older = await saver.aget_tuple(config("t", ids[3]))
        await store.aclose()
    assert listed == ids[3::-1]
    skipped = [r.getMessage() for r in caplog.records if "skipping damaged" in r.getMessage()]
    assert len(skipped) == 1
    assert record_id in skipped[0]  # the checkpoint's own id ...
    if what != "header":  # ... and, read whole, where the store keeps it
        assert by_id.value.key in skipped[0]
        assert ids[4] in skipped[0]
    assert as_latest.value.key == by_id.value.key
    assert older is not None
    assert older.checkpoint["channel_values"] == {"a": "a2", "b": "b3"}
    assert older.pending_writes == [(TASK, "b", "w3")]


@pytest.mark.parametrize("kind", ["memory", "file"])
async def test_a_damaged_shared_value_skips_each_checkpoint_holding_it(
    kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = _store(kind, tmp_path)
    with anyio.fail_after(DEADLINE):
        ids = await _thread(_saver(store))
        shared = records.blob_key("a", 1)  # held by checkpoints 0-2
        if kind == "memory":
            assert isinstance(store, MemoryStore)
            space = store._items[KEY]
            space.items[shared] = msgspec.structs.replace(space.items[shared], value=b"x")
        else:
            item_record(tmp_path / "store", KEY, shared).flip(-1)
        saver = _saver(store)
        with caplog.at_level(logging.WARNING, logger="fastcheckpoint"):
            listed = await _listed(saver)
        raised = []
        for checkpoint_id in ids[:3]:
            with pytest.raises(CorruptCheckpointError):
                await saver.aget_tuple(config("t", checkpoint_id))
            raised.append(checkpoint_id)
        latest = await saver.aget_tuple(config("t"))
        await store.aclose()
    assert listed == [ids[4], ids[3]]
    skipped = [r.getMessage() for r in caplog.records if "skipping damaged" in r.getMessage()]
    assert [next(i for i in ids if i in message) for message in skipped] == ids[2::-1]
    assert raised == ids[:3]
    assert latest is not None
    assert latest.checkpoint["id"] == ids[4]


async def test_a_page_is_filled_past_a_damaged_checkpoint() -> None:
    """``limit`` counts what is listed: a page holding a damaged checkpoint is read on, so a
    short page still means the end; the damaged one costs its own read, nothing more."""
    memory = MemoryStore()
    store = CountingStore(memory)
    with anyio.fail_after(DEADLINE):
        ids = await _thread(_saver(store))
        _memory_damage(memory, "payload")(3)
        saver = _saver(store)
        store.take()
        first = await _listed(saver, limit=2)
        first_calls = store.take()
        second = await _listed(saver, before=config("t", first[-1]), limit=2)
        third = await _listed(saver, before=config("t", second[-1]), limit=2)
        matching = await _listed(saver, filter={"step": 3})
        others = await _listed(saver, filter={"step": 2})
    assert first == [ids[4], ids[2]]
    assert first_calls == {"headers": 1, "read_with_items": 3}
    assert second == [ids[1], ids[0]]
    assert third == []
    assert matching == []
    assert others == [ids[2]]


async def test_state_history_lists_the_states_behind_a_damaged_newest_checkpoint() -> None:
    """What a user does then: find an older state in the history and go on from it."""
    store = MemoryStore()
    async with FastCheckpointSaver(store, config=make_config(FakeClock())) as saver:
        graph = step_loop(saver, 3)
        with anyio.fail_after(DEADLINE):
            await graph.ainvoke({"done": []}, config("g"))
            before = [state.config async for state in graph.aget_state_history(config("g"))]
            key = saver_module._where_from("g", "").key
            run = store._runs[key]
            newest = run.checkpoints[run.sequences[-1]]
            run.checkpoints[newest.sequence] = msgspec.structs.replace(
                newest, payload=newest.payload[:-8])
            after = [state async for state in graph.aget_state_history(config("g"))]
            with pytest.raises(CorruptCheckpointError):
                await graph.aget_state(config("g"))
            # Going on from an older state by its id reads the latest too (LangGraph checks
            # whether the thread moved past it), and so does a fork of it: the damaged
            # checkpoint is deleted, by the id the warning names.
            with pytest.raises(CorruptCheckpointError):
                await graph.ainvoke(None, after[0].config)
            with pytest.raises(CorruptCheckpointError):
                await graph.aupdate_state(after[0].config, {"done": []})
            assert await saver.manager.delete(newest.checkpoint_id)
            resumed = await graph.ainvoke(None, config("g"))
    assert [state.config for state in after] == before[1:]
    assert after[0].values == {"done": [0, 1]}
    assert resumed == {"done": [0, 1, 2]}
