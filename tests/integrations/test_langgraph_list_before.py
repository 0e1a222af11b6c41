"""``alist(before=b)`` of the LangGraph saver is the full listing cut to the ids below ``b``'s.

LangGraph's ids sort by time, but a checkpoint may be saved after another whose id is
higher (by another process, or a fork given an older id), above it in the run. A process
that knew where ``b`` is began the listing at ``b``'s own header and left such checkpoints
out. The listing now starts at the run's newest header whatever it knows; what it knows of
``b`` and of the run's newest sizes its first page, so it pays the store calls it paid
before when no such checkpoint exists.
"""

from __future__ import annotations

import random
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest

from fastcheckpoint import MemoryStore
from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
from fastcheckpoint.stores.sqlite import SQLiteStore
from tests._helpers import FakeClock, make_config
from tests.integrations._langgraph_support import (
    CountingStore,
    checkpoint,
    config,
    metadata,
    put,
)
from tests.integrations.conftest import FreshStore

pytestmark = pytest.mark.anyio

DEADLINE = 20
SEEDS = {"memory": 100, "sqlite": 20}
"""Random save orders per store in the differential test."""
CHECKPOINTS = 12


def _saver(store: Any) -> FastCheckpointSaver:
    return FastCheckpointSaver(store, config=make_config(FakeClock()))


def _below(checkpoint_id: str, by: int) -> str:
    """A LangGraph id ``by`` below ``checkpoint_id`` (same form, sorts before it)."""
    return str(uuid.UUID(int=uuid.UUID(checkpoint_id).int - by))


async def _ids(saver: FastCheckpointSaver, before: str | None = None) -> list[str]:
    at = None if before is None else config("t", before)
    return [found.checkpoint["id"] async for found in saver.alist(config("t"), before=at)]


async def test_a_listing_before_a_known_checkpoint_lists_older_ids_saved_after_it(
    fresh_store: FreshStore,
) -> None:
    """``b`` saved here, then two checkpoints whose ids sort just below ``b``'s: one saved
    here, one by another process. The saver that saved ``b`` knows where it is."""
    async with fresh_store() as inner:
        store = CountingStore(inner)
        saver, other = _saver(store), _saver(store)
        with anyio.fail_after(DEADLINE):
            first = await put(saver, "t")
            b = await put(saver, "t", parent=first, step=1)
            for lower, by in ((_below(b, 1), saver), (_below(b, 2), other)):
                made = checkpoint()
                made["id"] = lower
                await by.aput(config("t", first), made, metadata(1), {})
            full = await _ids(_saver(store))
            store.take()
            before = await _ids(saver, b)
            calls = store.take()
            elsewhere = await _ids(other, b)
    assert full == [_below(b, 2), _below(b, 1), b, first]
    assert before == [_below(b, 2), _below(b, 1), first]  # [first] before
    assert elsewhere == before
    assert calls.get("headers", 0) == 1
    assert calls.get("get_items", 0) == 0


async def _random_thread(
    rng: random.Random, savers: list[FastCheckpointSaver]
) -> dict[str, FastCheckpointSaver]:
    """``CHECKPOINTS`` checkpoints saved by random savers: the lowest id first (a save
    naming a parent in a thread that does not exist is dropped), then the others in a random
    order, each the child of a random one with a lower id (saved before or after it: a
    late parent), in half the threads with a delta channel counted since its snapshot.
    Which saver saved each id."""
    made = [checkpoint() for _ in range(CHECKPOINTS)]
    made.sort(key=lambda one: one["id"])
    delta = rng.random() < 0.5
    saved_by: dict[str, FastCheckpointSaver] = {}
    for position in [0, *rng.sample(range(1, CHECKPOINTS), CHECKPOINTS - 1)]:
        parent = None if position == 0 else made[rng.randrange(position)]["id"]
        counters = ({"counters_since_delta_snapshot": {"x": [1, rng.randrange(4)]}}
                    if delta else {})
        saver = rng.choice(savers)
        await saver.aput(config("t", parent), made[position],
                         metadata(position, **counters), {})
        saved_by[made[position]["id"]] = saver
    return saved_by


def _store(kind: str, tmp_path: Path, seed: int) -> Any:
    if kind == "memory":
        return MemoryStore()
    return SQLiteStore(tmp_path / f"{seed}.db", synchronous="normal")


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_a_listing_before_equals_the_full_listing_cut_over_random_save_orders(
    kind: str, tmp_path: Path
) -> None:
    out_of_order = 0
    with anyio.fail_after(DEADLINE):
        for seed in range(SEEDS[kind]):
            rng = random.Random(seed)
            store = _store(kind, tmp_path, seed)
            try:
                savers = [_saver(store), _saver(store)]
                saved_by = await _random_thread(rng, savers)
                full = await _ids(_saver(store))
                for before in rng.sample(sorted(saved_by), len(saved_by)):
                    knows = saved_by[before]  # it saved ``before``: it knows where it is
                    above = full[:full.index(before)]
                    out_of_order += sum(1 for found in above if found < before)
                    expected = [found for found in full if found < before]
                    assert await _ids(knows, before) == expected, (seed, before)
                    other = savers[1] if knows is savers[0] else savers[0]
                    assert await _ids(other, before) == expected, (seed, before)
            finally:
                await store.aclose()
    assert out_of_order > 0  # the case that was wrong did occur


async def _chain(saver: FastCheckpointSaver, length: int) -> list[str]:
    ids: list[str] = []
    for step in range(length):
        ids.append(await put(saver, "t", parent=ids[-1] if ids else None, step=step))
    return ids


async def _paged(saver: FastCheckpointSaver, store: CountingStore, before: str | None,
                 limit: int) -> tuple[list[str], int]:
    store.take()
    at = None if before is None else config("t", before)
    page = [found.checkpoint["id"]
            async for found in saver.alist(config("t"), before=at, limit=limit)]
    return page, store.take().get("headers", 0)


async def test_a_listing_before_a_known_checkpoint_reads_a_page_in_one_headers_call() -> None:
    """No checkpoint saved out of order: one headers call a page, as from ``before``'s own
    header, for the saver that saved the thread (at any depth) and for another process
    paging through it (it learns the newest from its listings); two when others saved
    since the lister last saw the newest (one before, which read none of theirs)."""
    store = CountingStore(MemoryStore())
    with anyio.fail_after(DEADLINE):
        saver = _saver(store)
        ids = await _chain(saver, 250)
        deep = [await _paged(saver, store, ids[at], 10) for at in (249, 200, 120, 5)]
        lister = _saver(store)
        pages: list[list[str]] = []
        calls: list[int] = []
        before = None
        while not pages or len(pages[-1]) == 10:
            page, count = await _paged(lister, store, before, 10)
            pages.append(page)
            calls.append(count)
            before = page[-1] if page else None
        known = ids[200]
        later = ids + [await put(saver, "t", parent=ids[-1], step=step)
                       for step in range(250, 400)]
        stale, stale_calls = await _paged(lister, store, known, 10)
    assert [page for page, _ in deep] == [ids[239:249][::-1], ids[190:200][::-1],
                                          ids[110:120][::-1], ids[:5][::-1]]
    assert [count for _, count in deep] == [1, 1, 1, 1]
    assert [found for page in pages for found in page] == ids[::-1]
    assert calls == [1] * len(calls)
    assert stale == later[190:200][::-1]
    assert stale_calls == 2  # the newest page, then one from there past ``known``
