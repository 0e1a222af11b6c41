"""A parent saved after its child (LangGraph's ``durability="async"`` lets saves race) and
the LangGraph saver's check that a checkpoint reads back whole: ``alist(before=...)`` starts
at the ``before`` checkpoint's own header, below the late parent, and listed the child as
short (a parent missing from the headers read taken for gone) where ``aget_tuple`` and a
full ``alist()`` returned it. The parent not among the headers read is now looked up by id."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from fastcheckpoint import MemoryStore
from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
from tests._helpers import FakeClock, make_config
from tests.integrations._langgraph_support import (
    CountingStore,
    checkpoint,
    config,
    metadata,
    put,
)

pytestmark = pytest.mark.anyio

DEADLINE = 20


def _saver(store: Any, **options: Any) -> FastCheckpointSaver:
    return FastCheckpointSaver(store, config=make_config(FakeClock()), **options)


def _counted(steps: int) -> dict[str, Any]:
    return {"counters_since_delta_snapshot": {"x": [1, steps]}}


async def _late_parent(
    saver: FastCheckpointSaver,
    length: int,
    child_steps: int,
    *,
    descendants: FastCheckpointSaver | None = None,
) -> dict[str, str]:
    """c0 (the delta channel's snapshot) to c<length-1>, each the child of the one before;
    then P (the last one's child), C (P's child), X (C's child) and Y (X's child), stored in
    the order C, X, Y, P (X and Y by ``descendants``). Their names by LangGraph id."""
    ids = [await put(saver, "t", values={"x": ["a"]}, versions={"x": 1}, **_counted(0))]
    for number in range(1, length):
        ids.append(await put(saver, "t", parent=ids[-1], step=number, **_counted(number % 5)))
    late, child, grandchild, newest = (checkpoint({}, {"x": 1}) for _ in range(4))
    assert late["id"] < child["id"] < grandchild["id"] < newest["id"]
    await saver.aput(
        config("t", late["id"]), child, metadata(length + 1, **_counted(child_steps)), {}
    )
    for made, parent, step in ((grandchild, child, 2), (newest, grandchild, 3)):
        await (descendants or saver).aput(
            config("t", parent["id"]),
            made,
            metadata(length + step, **_counted(child_steps + step - 1)),
            {},
        )
    await saver.aput(config("t", ids[-1]), late, metadata(length, **_counted(1)), {})
    return {
        late["id"]: "P",
        child["id"]: "C",
        grandchild["id"]: "X",
        newest["id"]: "Y",
        **{checkpoint_id: f"c{number}" for number, checkpoint_id in enumerate(ids)},
    }


async def _listed(
    saver: FastCheckpointSaver, names: dict[str, str], before: str | None = None
) -> list[str]:
    at = None if before is None else config("t", before)
    return [names[found.checkpoint["id"]] async for found in saver.alist(config("t"), before=at)]


@pytest.mark.parametrize(
    ("length", "child_steps", "keep_latest"),
    [
        (1, 2, None),  # the read-ahead reaches the bottom before the child's supersteps end
        (20, 21, None),
        (3, 3, None),  # it stops early: the parent was looked up (listed before too)
        (20, 3, None),
        (1, 2, 5),  # X and Y saved under keep_latest: X's floor is 0 (C's header names none)
        (20, 21, 5),
    ],
)
async def test_a_listing_below_a_late_parent_lists_the_child_that_reads_whole(
    length: int,
    child_steps: int,
    keep_latest: int | None,
) -> None:
    store = CountingStore(MemoryStore())
    saver = _saver(store)
    # keep_latest: X's save records how far back its channel reaches (to 0: C's header does
    # not say), so the listing walks X's floors, not its supersteps.
    keeping = None if keep_latest is None else _saver(store, keep_latest=keep_latest)
    with anyio.fail_after(DEADLINE):
        names = await _late_parent(saver, length, child_steps, descendants=keeping)
        ids = {name: checkpoint_id for checkpoint_id, name in names.items()}
        lister = keeping or saver  # it knows where Y is: the listing starts at Y's header
        full = await _listed(lister, names)
        by_id = [
            name
            for name in ("C", "X")
            if await lister.aget_tuple(config("t", ids[name])) is not None
        ]
        store.take()
        before = await _listed(lister, names, before=ids["Y"])
        calls = store.take()
    older = [f"c{number}" for number in reversed(range(length))]
    assert full == ["P", "Y", "X", "C", *older]
    assert by_id == ["C", "X"]
    # C (and X) hidden before. P's id sorts before Y's, but it lies above the headers a
    # listing from Y's own reads: not this check's matter.
    assert [name for name in before if name != "P"] == ["X", "C", *older]
    # The headers from Y's down, P's index item and its headers (a page), a read per
    # checkpoint listed.
    assert calls.get("headers", 0) <= 2
    assert calls.get("get_items", 0) <= 1
    assert calls.get("read_with_items", 0) == len(before)


async def test_a_listing_below_a_late_parent_still_hides_a_child_whose_parent_is_gone() -> None:
    """The parent looked up and not there: the child reads short, hidden as before (for one
    index-item read)."""
    store = CountingStore(MemoryStore())
    saver = _saver(store)
    with anyio.fail_after(DEADLINE):
        ids = [await put(saver, "t", values={"x": ["a"]}, versions={"x": 1}, **_counted(0))]
        never_saved, child, grandchild = (checkpoint({}, {"x": 1}) for _ in range(3))
        await saver.aput(config("t", never_saved["id"]), child, metadata(2, **_counted(2)), {})
        await saver.aput(config("t", child["id"]), grandchild, metadata(3, **_counted(3)), {})
        store.take()
        before = [
            found.checkpoint["id"]
            async for found in saver.alist(config("t"), before=config("t", grandchild["id"]))
        ]
        calls = store.take()
        by_id = await saver.aget_tuple(config("t", child["id"]))
    assert before == ids
    assert by_id is None
    assert calls.get("get_items", 0) <= 1  # the missing parent's index item (none before)


@pytest.mark.parametrize("keep_latest", [None, 5])
async def test_a_full_listing_lists_a_child_whose_parent_was_saved_a_page_later(
    keep_latest: int | None,
) -> None:
    """The listing forgets the headers more than a page above the one it checks: a parent
    saved 101 checkpoints after its child is looked up, not taken for gone."""
    store = MemoryStore()
    saver = _saver(store)
    keeping = None if keep_latest is None else _saver(store, keep_latest=keep_latest)
    with anyio.fail_after(DEADLINE):
        first = await put(saver, "t", values={"x": ["a"]}, versions={"x": 1}, **_counted(0))
        late, child, grandchild = (checkpoint({}, {"x": 1}) for _ in range(3))
        await saver.aput(config("t", late["id"]), child, metadata(2, **_counted(2)), {})
        # keep_latest: X's floor is 0 (C's header names none), its check walks the floors.
        await (keeping or saver).aput(
            config("t", child["id"]), grandchild, metadata(3, **_counted(3)), {}
        )
        others = [
            await put(saver, "t", parent=first, step=number)  # no delta channel
            for number in range(1, 102)
        ]
        await saver.aput(config("t", first), late, metadata(1, **_counted(1)), {})
        lister = keeping or saver
        listed = [found.checkpoint["id"] async for found in lister.alist(config("t"))]
        by_id = await lister.aget_tuple(config("t", grandchild["id"]))
    assert listed == [late["id"], *reversed(others), grandchild["id"], child["id"], first]
    assert by_id is not None
