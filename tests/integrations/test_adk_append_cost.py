"""Google ADK's ``append_event`` does work for the new event, not for the session's history:
counted (items of ``session.events`` read, events encoded, decoded and compared), not timed."""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Iterator
from typing import Any, SupportsIndex

import anyio
import pytest
from google.adk.events.event import Event
from google.adk.sessions import Session

from fastcheckpoint.errors import ValidationError
from fastcheckpoint.integrations.google_adk import FastSessionService
from fastcheckpoint.stores.memory import MemoryStore

pytestmark = pytest.mark.anyio

DEADLINE = 20


class CountingEvents(list[Any]):
    """A session's events that count the items read from them."""

    reads = 0

    def __iter__(self) -> Iterator[Any]:
        for item in super().__iter__():
            self.reads += 1
            yield item

    def __getitem__(self, index: Any) -> Any:
        found = super().__getitem__(index)
        self.reads += len(found) if isinstance(index, slice) else 1
        return found

    def __contains__(self, item: object) -> bool:
        self.reads += len(self)
        return super().__contains__(item)

    def index(self, *args: Any) -> int:
        self.reads += len(self)
        return super().index(*args)

    def count(self, item: object) -> int:
        self.reads += len(self)
        return super().count(item)

    def __reversed__(self) -> Iterator[Any]:
        for item in super().__reversed__():
            self.reads += 1
            yield item

    def pop(self, index: SupportsIndex = -1) -> Any:
        raise AssertionError("an append does not remove events")


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Calls of ``Event``'s encoding, decoding and comparison, by name."""
    counted: Counter[str] = Counter()
    for name in ("model_dump_json", "model_dump", "__eq__", "model_copy"):
        original = getattr(Event, name)

        def wrapper(self: Event, *args: Any, _name: str = name, _original: Any = original,
                    **kwargs: Any) -> Any:
            counted[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Event, name, wrapper)
    for name in ("model_validate_json", "model_validate"):
        original = getattr(Event, name)

        def validate(*args: Any, _name: str = name, _original: Any = original,
                     **kwargs: Any) -> Any:
            counted[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(Event, name, staticmethod(validate))
    return counted


async def _cost(
    service: FastSessionService, session: Session, calls: Counter[str]
) -> tuple[int, dict[str, int]]:
    """Items of ``session.events`` read and ``Event`` calls made by one append of a new
    event that changes the session's state."""
    events = session.events
    assert isinstance(events, CountingEvents)
    events.reads = 0
    calls.clear()
    made = Event(author="agent", invocation_id="inv")
    made.actions.state_delta["n"] = len(events)
    await service.append_event(session, made)
    assert session.events[-1] is made
    return events.reads - 1, dict(calls)  # less the read just above


async def _grow(service: FastSessionService, session: Session, length: int) -> None:
    while len(session.events) < length:
        await service.append_event(session, Event(author="agent", invocation_id="inv"))


async def test_an_append_costs_the_same_at_10_and_at_1000_events(calls: Counter[str]) -> None:
    """It walked every held event twice per append (a type check of each, then a search for
    an equal one), so a session of n events cost O(n) per append."""
    service = FastSessionService(MemoryStore())
    with anyio.fail_after(DEADLINE):
        session = await service.create_session(app_name="a", user_id="u", session_id="s")
        session.events = CountingEvents()  # a list replaced: indexed again, once
        await _grow(service, session, 10)
        at_10 = await _cost(service, session, calls)
        await _grow(service, session, 1000)
        at_1000 = await _cost(service, session, calls)
    assert at_10 == at_1000
    reads, counted = at_1000
    assert reads == 0
    # The new event: encoded once and read back once to check it (nothing else).
    assert counted == {"model_dump_json": 1, "model_validate_json": 1}


async def test_an_append_to_a_session_read_back_costs_the_same_at_10_and_at_1000_events(
    calls: Counter[str],
) -> None:
    """A session from ``get_session`` of another service object (its first append reads
    the stored head) as well: its appends cost the same whatever its length."""
    store = MemoryStore()
    writer = FastSessionService(store)
    costs = []
    with anyio.fail_after(DEADLINE):
        for session_id, length in (("s10", 10), ("s1000", 1000)):
            session = await writer.create_session(app_name="a", user_id="u",
                                                  session_id=session_id)
            await _grow(writer, session, length)
            reader = FastSessionService(store)
            read = await reader.get_session(app_name="a", user_id="u", session_id=session_id)
            assert read is not None
            read.events = CountingEvents(read.events)  # the same items, counted
            await reader.append_event(read, Event(author="agent"))  # indexes the list again
            costs.append(await _cost(reader, read, calls))
    assert costs[0] == costs[1]
    assert costs[1][0] == 0


async def test_an_event_held_anywhere_is_not_stored_again() -> None:
    """The index keeps the guarantee the walk gave: an event equal to any one the session
    holds (not only its last) stores nothing; one that shares only its id is stored."""
    service = FastSessionService(MemoryStore())
    with anyio.fail_after(DEADLINE):
        session = await service.create_session(app_name="a", user_id="u", session_id="s")
        first = Event(author="agent", invocation_id="inv")
        await service.append_event(session, first)
        await _grow(service, session, 5)
        await service.append_event(session, first.model_copy(deep=True))  # a call made again
        assert len(session.events) == 5
        namesake = first.model_copy(update={"author": "other"}, deep=True)
        await service.append_event(session, namesake)
        assert session.events[-1] is namesake
        stored = await service.get_session(app_name="a", user_id="u", session_id="s")
        assert stored is not None
        assert [held.id for held in stored.events] == [held.id for held in session.events]
        # Read back, the session holds the same events: the same rule applies to it.
        await service.append_event(stored, first.model_copy(deep=True))
        assert len(stored.events) == 6


@pytest.mark.parametrize("spoil", ["grown", "replaced in place"])
async def test_a_non_event_the_append_would_read_is_refused_before_anything_is_stored(
    spoil: str,
) -> None:
    service = FastSessionService(MemoryStore())
    with anyio.fail_after(DEADLINE):
        session = await service.create_session(app_name="a", user_id="u", session_id="s")
        first = Event(author="agent", invocation_id="inv")
        await service.append_event(session, first)
        await _grow(service, session, 3)
        if spoil == "grown":
            session.events.append(1)  # type: ignore[arg-type]
            made = Event(author="agent")
        else:
            session.events[0] = 1  # type: ignore[call-overload]
            made = first.model_copy(deep=True)  # the search for it reads that item
        with pytest.raises(ValidationError, match=r"session\.events"):
            await service.append_event(session, made)
        stored = await service.get_session(app_name="a", user_id="u", session_id="s")
        assert stored is not None
        assert len(stored.events) == 3


async def test_the_index_of_a_session_object_goes_with_it() -> None:
    service = FastSessionService(MemoryStore())
    with anyio.fail_after(DEADLINE):
        for number in range(20):
            session = await service.create_session(app_name="a", user_id="u",
                                                   session_id=f"s{number}")
            await service.append_event(session, Event(author="agent"))
        kept = session
        del session
        gc.collect()
        assert len(service._held) == 1  # only the object still referenced
        assert kept is not None
