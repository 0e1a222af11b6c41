"""A review of the entry log's retry tokens: a change whose store call failed without telling
whether it was stored, made again on the same object after other things happened in between
(the window's edges, a pop whose item came back, a writer of the previous release, another
session object or a read of the same ADK service, a cancelled retry)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import msgspec
import pytest

pytest.importorskip("agents")
pytest.importorskip("google.adk")

from google.adk.events.event import Event
from google.adk.events.event_actions import EventActions
from google.adk.platform import time as platform_time
from google.genai import types

from fastcheckpoint.errors import CheckpointError, ConflictError, StoreUnavailableError
from fastcheckpoint.integrations import _entrylog
from fastcheckpoint.integrations._entrylog import RECENT_TOKENS, EntryLog, StaleLog
from fastcheckpoint.integrations.google_adk import FastSessionService
from fastcheckpoint.integrations.openai_agents import FastSession
from fastcheckpoint.stores.memory import MemoryStore
from tests._helpers import FakeClock
from tests.integrations.conftest import FreshStore
from tests.integrations.test_entrylog_retries import _LostThenBlind

pytestmark = pytest.mark.anyio

DEADLINE = 30
STORES = pytest.mark.parametrize("kind", ["memory", "file", "sqlite", "redis"])


def _item(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def _event(text: str) -> Event:
    return Event(author="agent", invocation_id="inv",
                 content=types.Content(role="model", parts=[types.Part(text=text)]),
                 actions=EventActions())


def _texts(events: list[Event]) -> list[str]:
    return [str(item.content.parts[0].text) for item in events
            if item.content and item.content.parts]


@pytest.fixture
def adk_clock(clock: FakeClock) -> Iterator[FakeClock]:
    platform_time.set_time_provider(clock)
    yield clock
    platform_time.reset_time_provider()


# -- the window's edges -----------------------------------------------------------------------


@pytest.mark.parametrize(("others", "refused"), [
    (RECENT_TOKENS - 1, False), (RECENT_TOKENS, False), (RECENT_TOKENS + 1, True)])
async def test_a_change_not_stored_is_made_while_within_reach(
    clock: FakeClock, others: int, refused: bool
) -> None:
    """Not stored (its request failed before the store), then ``others`` changes: the head at
    revision ``others`` carries the tokens of revisions ``others - 15`` to ``others``, so the
    change's revision 1 is within reach up to 16 others (its absence says it was not stored),
    refused from 17 (nothing written)."""
    store = _LostThenBlind(MemoryStore())
    log = EntryLog(store, "run", clock=clock)  # type: ignore[arg-type]
    await log.append([b"first"])
    store.fail_before()
    with pytest.raises(StoreUnavailableError):
        await log.append([b"mine"])
    writer = EntryLog(store, "run", clock=clock)  # type: ignore[arg-type]
    for index in range(others):
        await writer.append([f"other-{index}".encode()])
    if refused:
        with pytest.raises(StaleLog):
            await log.append([b"mine"])
    else:
        await log.append([b"mine"])
    view = await writer.read()
    assert view is not None
    assert view.entries.count(b"mine") == (0 if refused else 1)
    assert len(view.entries) == others + (1 if refused else 2)


async def test_a_landed_change_followed_by_more_than_the_window_is_refused(
    clock: FakeClock
) -> None:
    store = _LostThenBlind(MemoryStore())
    log = EntryLog(store, "run", clock=clock)  # type: ignore[arg-type]
    await log.append([b"first"])
    store.lose()
    with pytest.raises(StoreUnavailableError):
        await log.pop()
    writer = EntryLog(store, "run", clock=clock)  # type: ignore[arg-type]
    for index in range(RECENT_TOKENS + 1):
        await writer.append([f"other-{index}".encode()])
    with pytest.raises(StaleLog):
        await log.pop()
    view = await writer.read()
    assert view is not None
    assert len(view.entries) == RECENT_TOKENS + 1  # "first" popped once, nothing more


# -- pop ---------------------------------------------------------------------------------------


@STORES
async def test_pop_item_retried_after_its_item_was_added_again(fresh_store: FreshStore) -> None:
    """The first pop removed ``b``; another writer added an equal ``b``: the retry returns the
    first pop's item and removes nothing more."""
    with anyio.fail_after(DEADLINE):
        async with fresh_store() as inner:
            store = _LostThenBlind(inner)
            mine = FastSession("s", store)  # type: ignore[arg-type]
            await mine.add_items([_item("a"), _item("b")])
            store.lose()
            with pytest.raises(CheckpointError):
                await mine.pop_item()
            await FastSession("s", inner).add_items([_item("b")])
            assert await mine.pop_item() == _item("b")
            assert await FastSession("s", inner).get_items() == [_item("a"), _item("b")]


@STORES
async def test_pop_item_not_stored_retried_after_another_writer_removes_the_newest(
    fresh_store: FreshStore,
) -> None:
    """The first pop was not stored and another writer popped meanwhile: the retry pops the
    newest item now, once."""
    with anyio.fail_after(DEADLINE):
        async with fresh_store() as inner:
            store = _LostThenBlind(inner)
            mine = FastSession("s", store)  # type: ignore[arg-type]
            await mine.add_items([_item("a"), _item("b")])
            store.fail_before()
            with pytest.raises(CheckpointError):
                await mine.pop_item()
            assert await FastSession("s", inner).pop_item() == _item("b")
            assert await mine.pop_item() == _item("a")
            assert await FastSession("s", inner).get_items() == []


# -- other writers -----------------------------------------------------------------------------


class _PreviousLayout(msgspec.Struct, array_like=True, frozen=True):
    segments: list[_entrylog._Segment]
    state: bytes
    created_at: float


async def test_a_writer_of_the_previous_release_in_between_makes_the_retry_refused(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer of the previous release drops the tokens: the head then tells nothing about
    the change, which is refused, never made a second time."""
    store = _LostThenBlind(MemoryStore())
    log = EntryLog(store, "run", clock=clock)  # type: ignore[arg-type]
    await log.append([b"first"])
    store.lose()
    with pytest.raises(StoreUnavailableError):
        await log.append([b"mine"])
    with monkeypatch.context() as patched:
        patched.setattr(_entrylog, "_Layout", lambda segments, state, created_at, _recent:
                        _PreviousLayout(segments, state, created_at))
        await EntryLog(store, "run", clock=clock).append([b"old"])  # type: ignore[arg-type]
    await EntryLog(store, "run", clock=clock).append([b"new"])  # type: ignore[arg-type]
    with pytest.raises(StaleLog):
        await log.append([b"mine"])
    view = await log.read()
    assert view is not None
    assert view.entries == [b"first", b"mine", b"old", b"new"]


@STORES
async def test_two_sessions_on_one_id_each_retry_their_own_change(
    fresh_store: FreshStore,
) -> None:
    with anyio.fail_after(DEADLINE):
        async with fresh_store() as inner:
            one, two = _LostThenBlind(inner), _LostThenBlind(inner)
            first = FastSession("s", one)  # type: ignore[arg-type]
            second = FastSession("s", two)  # type: ignore[arg-type]
            await first.add_items([_item("a")])
            one.lose()
            with pytest.raises(CheckpointError):
                await first.add_items([_item("b")])
            two.fail_before()
            with pytest.raises(CheckpointError):
                await second.add_items([_item("b")])
            await second.add_items([_item("b")])  # not stored: made
            await first.add_items([_item("b")])  # stored: recognised
            assert await FastSession("s", inner).get_items() == [
                _item("a"), _item("b"), _item("b")]


# -- ADK: the service's other callers ----------------------------------------------------------


@STORES
@pytest.mark.parametrize("stored", [True, False])
async def test_append_event_retried_after_the_service_read_the_session(
    fresh_store: FreshStore, adk_clock: FakeClock, stored: bool
) -> None:
    """The event was stored (its reply lost) or not (its request failed); another task of
    the same service read the session; the retry on the first session object stores it
    once (before: StaleSessionError when it was stored, the read had forgotten it)."""
    with anyio.fail_after(DEADLINE):
        async with fresh_store() as inner:
            store = _LostThenBlind(inner)
            service = FastSessionService(store, clock=adk_clock)  # type: ignore[arg-type]
            session = await service.create_session(app_name="a", user_id="u", session_id="s")
            await service.append_event(session, _event("one"))
            retried = _event("two")
            if stored:
                store.lose()
            else:
                store.fail_before()
            with pytest.raises(CheckpointError):
                await service.append_event(session, retried)
            read = await service.get_session(app_name="a", user_id="u", session_id="s")
            assert read is not None
            await service.append_event(session, retried)
            assert _texts(session.events) == ["one", "two"]
            stored = await FastSessionService(inner, clock=adk_clock).get_session(
                app_name="a", user_id="u", session_id="s")
            assert stored is not None
            assert _texts(stored.events) == ["one", "two"]


async def test_append_event_retried_after_another_object_of_the_session_was_refused(
    adk_clock: FakeClock,
) -> None:
    """The event was stored (its reply lost); another object of that session in the same
    service then appended and was refused (stale: the event is ahead of it), storing
    nothing; the retry on the first object is recognised, not StaleSessionError."""
    with anyio.fail_after(DEADLINE):
        store = _LostThenBlind(MemoryStore())
        service = FastSessionService(store, clock=adk_clock)  # type: ignore[arg-type]
        session = await service.create_session(app_name="a", user_id="u", session_id="s")
        other = await service.get_session(app_name="a", user_id="u", session_id="s")
        assert other is not None
        retried = _event("two")
        store.lose()
        with pytest.raises(CheckpointError):
            await service.append_event(session, retried)
        with pytest.raises(Exception, match="modified") as raised:
            await service.append_event(other, _event("theirs"))
        assert type(raised.value).__name__ == "StaleSessionError"
        await service.append_event(session, retried)
        stored = await service.get_session(app_name="a", user_id="u", session_id="s")
        assert stored is not None
        assert _texts(stored.events) == ["two"]


async def test_a_refused_change_in_between_keeps_the_unknown_one(clock: FakeClock) -> None:
    """Another change of the object that wrote nothing (a compare-and-set refused) does not
    forget the change whose outcome was unknown: made again, it is recognised (before: it was
    made a second time)."""
    store = _LostThenBlind(MemoryStore())
    log = EntryLog(store, "run", clock=clock)  # type: ignore[arg-type]
    await log.append([b"first"])
    store.lose()
    with pytest.raises(StoreUnavailableError):
        await log.append([b"mine"])
    with pytest.raises(StaleLog):
        await log.append([b"other"], expect=0)
    await log.append([b"mine"])
    view = await log.read()
    assert view is not None
    assert view.entries == [b"first", b"mine"]


async def test_a_change_made_in_between_forgets_the_unknown_one(clock: FakeClock) -> None:
    """Another change of the object that is made forgets the one whose outcome was unknown:
    the same change made after it is a new one, made (never swallowed as a retry)."""
    store = _LostThenBlind(MemoryStore())
    log = EntryLog(store, "run", clock=clock)  # type: ignore[arg-type]
    await log.append([b"first"])
    store.lose()
    with pytest.raises(StoreUnavailableError):
        await log.append([b"mine"])
    await log.append([b"other"])
    await log.append([b"mine"])
    view = await log.read()
    assert view is not None
    assert view.entries == [b"first", b"mine", b"other", b"mine"]


async def test_a_log_that_keeps_the_unknown_change_recognises_it_after_reads_and_changes(
    clock: FakeClock,
) -> None:
    """``keep_unsettled``: neither a read nor another change made forgets the change whose
    outcome was unknown; the retry is recognised once and then forgotten (the same change
    made after it is a new one). By default both forget it."""
    for keep in (True, False):
        store = _LostThenBlind(MemoryStore())
        log = EntryLog(store, "run", clock=clock, keep_unsettled=keep)  # type: ignore[arg-type]
        await log.append([b"first"])
        store.lose()
        with pytest.raises(StoreUnavailableError):
            await log.append([b"mine"])
        assert await log.read() is not None
        await log.append([b"other"])
        store.take()
        await log.append([b"mine"])
        await log.append([b"mine"])
        view = await log.read()
        assert view is not None
        expected = [b"first", b"mine", b"other", b"mine"]
        assert view.entries == (expected if keep else [*expected, b"mine"])


# -- cancellation ------------------------------------------------------------------------------


class _Slow(_LostThenBlind):
    """The store call ``slow`` names takes a while (long enough for the caller to be
    cancelled): ``read_with_items`` (a retry's look at whether the change was stored) or
    ``append_with_items`` (the change itself)."""

    slow: str | None = None

    async def _lag(self, call: str) -> None:
        if self.slow == call:
            await anyio.sleep(0.05)

    async def read_with_items(self, *args: Any, **kwargs: Any) -> Any:
        await self._lag("read_with_items")
        return await super().read_with_items(*args, **kwargs)  # type: ignore[misc]

    async def append_with_items(self, *args: Any, **kwargs: Any) -> Any:
        await self._lag("append_with_items")
        return await super().append_with_items(*args, **kwargs)


async def test_add_items_retried_again_after_a_cancelled_retry_adds_once() -> None:
    """The first call failed (stored, its reply lost); the caller's retry was cancelled
    while it looked; the caller retries again: the items are stored once."""
    with anyio.fail_after(DEADLINE):
        store = _Slow(MemoryStore())
        mine = FastSession("s", store)  # type: ignore[arg-type]
        await mine.add_items([_item("a")])
        store.lose()
        with pytest.raises(CheckpointError):
            await mine.add_items([_item("b")])
        store.slow = "read_with_items"
        with anyio.move_on_after(0.01) as scope:
            await mine.add_items([_item("b")])
        assert scope.cancelled_caught
        store.slow = None
        await mine.add_items([_item("b")])
        assert await FastSession("s", store).get_items() == [_item("a"), _item("b")]  # type: ignore[arg-type]


async def test_add_items_cancelled_while_it_landed_then_made_again_adds_once() -> None:
    """A call cancelled (a timeout) while its append was under way: the append lands, the
    caller sees only the cancellation, and the same call made again adds nothing more."""
    with anyio.fail_after(DEADLINE):
        store = _Slow(MemoryStore())
        mine = FastSession("s", store)  # type: ignore[arg-type]
        await mine.add_items([_item("a")])
        store.slow = "append_with_items"
        with anyio.move_on_after(0.01) as scope:
            await mine.add_items([_item("b")])
        assert scope.cancelled_caught
        store.slow = None
        await mine.add_items([_item("b")])
        assert await FastSession("s", store).get_items() == [_item("a"), _item("b")]  # type: ignore[arg-type]
        await mine.add_items([_item("b")])  # a new change: the caller saw the last one end
        assert await mine.get_items() == [_item("a"), _item("b"), _item("b")]


async def test_pop_item_cancelled_while_it_landed_returns_its_item_when_made_again() -> None:
    """The item a cancelled pop removed reached nobody: the next pop of the object returns
    it, and removes nothing more."""
    with anyio.fail_after(DEADLINE):
        store = _Slow(MemoryStore())
        mine = FastSession("s", store)  # type: ignore[arg-type]
        await mine.add_items([_item("a"), _item("b")])
        store.slow = "append_with_items"
        with anyio.move_on_after(0.01) as scope:
            await mine.pop_item()
        assert scope.cancelled_caught
        store.slow = None
        assert await mine.pop_item() == _item("b")
        assert await mine.get_items() == [_item("a")]
        assert await mine.pop_item() == _item("a")  # the next pop is a new one
        assert await mine.pop_item() is None


async def test_a_read_after_a_cancelled_call_forgets_its_change() -> None:
    """The caller who reads the session after a cancelled call has seen its outcome: the
    same call made next is a new change."""
    with anyio.fail_after(DEADLINE):
        store = _Slow(MemoryStore())
        mine = FastSession("s", store)  # type: ignore[arg-type]
        store.slow = "append_with_items"
        with anyio.move_on_after(0.01) as scope:
            await mine.add_items([_item("a")])
        assert scope.cancelled_caught
        store.slow = None
        assert await mine.get_items() == [_item("a")]
        await mine.add_items([_item("a")])
        assert await mine.get_items() == [_item("a"), _item("a")]


async def test_a_refused_retry_raises_a_conflict_error_of_the_session() -> None:
    with anyio.fail_after(DEADLINE):
        store = _LostThenBlind(MemoryStore())
        mine = FastSession("s", store)  # type: ignore[arg-type]
        await mine.add_items([_item("a")])
        store.lose()
        with pytest.raises(CheckpointError):
            await mine.add_items([_item("b")])
        other = FastSession("s", store)  # type: ignore[arg-type]
        for index in range(RECENT_TOKENS):
            await other.add_items([_item(f"o{index}")])
        with pytest.raises(ConflictError):
            await mine.add_items([_item("b")])
        items = await other.get_items()
        assert items.count(_item("b")) == 1


async def test_append_event_retried_again_after_a_cancelled_retry_stores_once(
    adk_clock: FakeClock,
) -> None:
    """ADK: the cancelled retry, run to its end, put the event in the session object, which
    holds it: the next retry stores nothing."""
    with anyio.fail_after(DEADLINE):
        store = _Slow(MemoryStore())
        service = FastSessionService(store, clock=adk_clock)  # type: ignore[arg-type]
        session = await service.create_session(app_name="a", user_id="u", session_id="s")
        retried = _event("two")
        store.lose()
        with pytest.raises(CheckpointError):
            await service.append_event(session, retried)
        store.slow = "read_with_items"
        with anyio.move_on_after(0.01) as scope:
            await service.append_event(session, retried)
        assert scope.cancelled_caught
        store.slow = None
        await service.append_event(session, retried)
        stored = await FastSessionService(store, clock=adk_clock).get_session(  # type: ignore[arg-type]
            app_name="a", user_id="u", session_id="s")
        assert stored is not None
        assert _texts(stored.events) == ["two"]


async def test_append_event_retried_after_another_object_of_the_service_appended(
    adk_clock: FakeClock,
) -> None:
    """Another session object of the same service read the session (holding the event) and
    appended: the retry on the first object is recognised (before: StaleSessionError)."""
    with anyio.fail_after(DEADLINE):
        store = _LostThenBlind(MemoryStore())
        service = FastSessionService(store, clock=adk_clock)  # type: ignore[arg-type]
        session = await service.create_session(app_name="a", user_id="u", session_id="s")
        retried = _event("two")
        store.lose()
        with pytest.raises(CheckpointError):
            await service.append_event(session, retried)
        other = await service.get_session(app_name="a", user_id="u", session_id="s")
        assert other is not None
        await service.append_event(other, _event("three"))
        await service.append_event(session, retried)
        stored = await service.get_session(app_name="a", user_id="u", session_id="s")
        assert stored is not None
        assert _texts(stored.events) == ["two", "three"]


async def test_append_event_not_stored_retried_after_another_object_appended_is_stale(
    adk_clock: FakeClock,
) -> None:
    """The event was not stored and another session object appended meanwhile: the retry on
    the first object is stale (nothing stored), as any append of an object behind the store."""
    with anyio.fail_after(DEADLINE):
        store = _LostThenBlind(MemoryStore())
        service = FastSessionService(store, clock=adk_clock)  # type: ignore[arg-type]
        session = await service.create_session(app_name="a", user_id="u", session_id="s")
        other = await service.get_session(app_name="a", user_id="u", session_id="s")
        assert other is not None
        retried = _event("two")
        store.fail_before()
        with pytest.raises(CheckpointError):
            await service.append_event(session, retried)
        await service.append_event(other, _event("three"))
        with pytest.raises(Exception, match="modified") as raised:
            await service.append_event(session, retried)
        assert type(raised.value).__name__ == "StaleSessionError"
        stored = await service.get_session(app_name="a", user_id="u", session_id="s")
        assert stored is not None
        assert _texts(stored.events) == ["three"]
