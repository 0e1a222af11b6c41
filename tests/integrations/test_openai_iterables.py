"""``FastSession.add_items`` takes any iterable of items, as the SDK's own sessions do (its
``SQLiteSession`` stores a generator's or a tuple's items), reading it once and storing
nothing of a batch with a bad item anywhere."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest

pytest.importorskip("agents")

from agents import SQLiteSession

from fastcheckpoint import MemoryStore
from fastcheckpoint.errors import SerializationError, ValidationError
from fastcheckpoint.integrations.openai_agents import FastSession

pytestmark = pytest.mark.anyio

DEADLINE = 20
ITEMS: list[Any] = [{"role": "user", "content": f"message {number}"} for number in range(4)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the SDK's sessions run on asyncio


class Once:
    """An iterable that can be read once, counting how often it is asked to be."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items
        self.reads = 0

    def __iter__(self) -> Iterator[Any]:
        self.reads += 1
        if self.reads > 1:
            raise AssertionError("read twice")
        yield from self.items


@pytest.mark.parametrize("kind", ["generator", "tuple", "once", "dict values"])
async def test_any_iterable_of_items_is_added_as_the_sdk_adds_it(kind: str) -> None:
    made: Callable[[], Any] = {
        "generator": lambda: (item for item in ITEMS), "tuple": lambda: tuple(ITEMS),
        "once": lambda: Once(ITEMS), "dict values": lambda: dict(enumerate(ITEMS)).values(),
    }[kind]
    nothing: Any = iter(())  # an empty one adds nothing
    ours = FastSession("s", MemoryStore())
    theirs = SQLiteSession("s")
    try:
        with anyio.fail_after(DEADLINE):
            for session in (ours, theirs):
                await session.add_items(made())
                await session.add_items(nothing)
            assert await ours.get_items() == await theirs.get_items() == ITEMS
    finally:
        theirs.close()


async def test_a_bad_item_anywhere_in_a_generator_adds_nothing() -> None:
    """The generator is read to its end before anything is stored."""
    session = FastSession("s", MemoryStore())
    with anyio.fail_after(DEADLINE):
        await session.add_items(item for item in ITEMS[:1])
        for bad in ({"t": (1, 2)}, "not a dict", {"x": object()}):
            with pytest.raises(SerializationError, match="item 3"):
                await session.add_items(item for item in [*ITEMS[1:], bad])
        assert await session.get_items() == ITEMS[:1]


async def test_an_error_of_the_generator_itself_propagates_and_adds_nothing() -> None:
    def failing() -> Iterator[Any]:
        yield ITEMS[0]
        raise LookupError("the caller's own failure")

    session = FastSession("s", MemoryStore())
    with anyio.fail_after(DEADLINE):
        with pytest.raises(LookupError, match="own failure"):
            await session.add_items(failing())
        assert await session.get_items() == []


@pytest.mark.parametrize("items", [None, 1, "hi", b"hi", {"role": "user", "content": "hi"}])
async def test_one_item_or_no_iterable_is_refused_with_a_hint(items: Any) -> None:
    """A str or a mapping is iterable, but it is one item where a list belongs (the SDK's
    session would store its characters or keys)."""
    session = FastSession("s", MemoryStore())
    with anyio.fail_after(DEADLINE):
        with pytest.raises(ValidationError, match="items must be a list"):
            await session.add_items(items)
        assert await session.get_items() == []
