"""A change whose store call failed without telling whether it was stored (its reply lost
after the store applied it, and the read that would tell failed too), then another writer's
change, then the same change made again on the same object: applied exactly once, for the
OpenAI Agents session (``add_items``, ``pop_item``), the ADK service (``append_event``) and
the entry log under both. Each of the adapter tests failed before the heads carried the
tokens of their recent changes (the retry was recognised only while its change was the head).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import msgspec
import pytest

pytest.importorskip("agents")
pytest.importorskip("google.adk")

from google.adk.errors import StaleSessionError
from google.adk.events.event import Event
from google.adk.events.event_actions import EventActions
from google.adk.platform import time as platform_time
from google.genai import types

from fastcheckpoint.errors import CheckpointError, StoreUnavailableError
from fastcheckpoint.integrations import _entrylog
from fastcheckpoint.integrations._entrylog import RECENT_TOKENS, EntryLog, StaleLog
from fastcheckpoint.integrations.google_adk import FastSessionService
from fastcheckpoint.integrations.openai_agents import FastSession
from fastcheckpoint.stores.memory import MemoryStore
from tests._helpers import FakeClock
from tests.integrations._langgraph_support import CountingStore
from tests.integrations.conftest import FreshStore

pytestmark = pytest.mark.anyio

DEADLINE = 30
STORES = pytest.mark.parametrize("kind", ["memory", "file", "sqlite", "redis"])


class _LostThenBlind(CountingStore):
    """After ``lose()``, the next ``append_with_items`` is applied and then raises as if its
    reply were lost; after ``fail_before()``, it raises without being applied. Either way the
    next ``get`` (the adapter's look at whether it landed) fails too."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.losing = self.failing = self.blind = False

    def lose(self) -> None:
        self.losing = True

    def fail_before(self) -> None:
        self.failing = True

    async def append_with_items(self, *args: Any, **kwargs: Any) -> Any:
        if self.failing:
            self.failing, self.blind = False, True
            raise StoreUnavailableError("injected: the request never reached the store")
        status = await super().append_with_items(*args, **kwargs)  # type: ignore[misc]
        if self.losing:
            self.losing, self.blind = False, True
            raise StoreUnavailableError("injected: the reply was lost")
        return status

    async def get(self, *args: Any, **kwargs: Any) -> Any:
        if self.blind:
            self.blind = False
            self.calls["get"] += 1
            raise StoreUnavailableError("injected: the store went away")
        return await super().get(*args, **kwargs)  # type: ignore[misc]


def _item(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


@STORES
async def test_add_items_retried_after_another_writer_adds_once(fresh_store: FreshStore) -> None:
    with anyio.fail_after(DEADLINE):
        async with fresh_store() as inner:
            store = _LostThenBlind(inner)
            mine = FastSession("s", store)  # type: ignore[arg-type]
            await mine.add_items([_item("a")])
            store.lose()
            with pytest.raises(CheckpointError):
                await mine.add_items([_item("b")])
            await FastSession("s", inner).add_items([_item("c")])  # another process
            store.take()
            await mine.add_items([_item("b")])  # the caller's retry
            assert store.take() == {"read_with_items": 1}
            assert await FastSession("s", inner).get_items() == [
                _item("a"), _item("b"), _item("c")]


@STORES
async def test_pop_item_retried_after_another_writer_pops_once(fresh_store: FreshStore) -> None:
    with anyio.fail_after(DEADLINE):
        async with fresh_store() as inner:
            store = _LostThenBlind(inner)
            mine = FastSession("s", store)  # type: ignore[arg-type]
            await mine.add_items([_item("a"), _item("b")])
            store.lose()
            with pytest.raises(CheckpointError):
                await mine.pop_item()
            await FastSession("s", inner).add_items([_item("c")])
            store.take()
            assert await mine.pop_item() == _item("b")  # what the first call removed
            assert store.take() == {"read_with_items": 1}
            assert await FastSession("s", inner).get_items() == [_item("a"), _item("c")]


@pytest.fixture
def adk_clock(clock: FakeClock) -> Iterator[FakeClock]:
    platform_time.set_time_provider(clock)
    yield clock
    platform_time.reset_time_provider()


def _event(text: str, delta: dict[str, Any] | None = None) -> Event:
    return Event(author="agent", invocation_id="inv",
                 content=types.Content(role="model", parts=[types.Part(text=text)]),
                 actions=EventActions(state_delta=dict(delta or {})))


def _texts(events: list[Event]) -> list[str]:
    return [str(item.content.parts[0].text) for item in events
            if item.content and item.content.parts]


@STORES
async def test_append_event_retried_after_another_writer_stores_it_once(
    fresh_store: FreshStore, adk_clock: FakeClock
) -> None:
    with anyio.fail_after(DEADLINE):
        async with fresh_store() as inner:
            store = _LostThenBlind(inner)
            mine = FastSessionService(store, clock=adk_clock)  # type: ignore[arg-type]
            session = await mine.create_session(app_name="a", user_id="u", session_id="s")
            await mine.append_event(session, _event("one"))
            retried = _event("two", {"n": 2, "seen": True})
            store.lose()
            with pytest.raises(CheckpointError):
                await mine.append_event(session, retried)
            other = FastSessionService(inner, clock=adk_clock)  # another process
            theirs = await other.get_session(app_name="a", user_id="u", session_id="s")
            assert theirs is not None
            adk_clock.advance(1)
            await other.append_event(theirs, _event("three", {"n": 3}))
            store.take()
            await mine.append_event(session, retried)  # the caller's retry: returns
            assert store.take() == {"read_with_items": 1}
            stored = await other.get_session(app_name="a", user_id="u", session_id="s")
            assert stored is not None
            assert _texts(stored.events) == ["one", "two", "three"]
            assert stored.state == {"n": 3, "seen": True}
            # The object reflects the session at its event: the other writer's makes it stale.
            assert _texts(session.events) == ["one", "two"]
            with pytest.raises(StaleSessionError):
                await mine.append_event(session, _event("four"))


@STORES
async def test_append_event_with_shared_state_retried_is_stale_and_stored_once(
    fresh_store: FreshStore, adk_clock: FakeClock
) -> None:
    """An event that changes app or user state draws a new id for that change on every call,
    so the call made again is another change: it raises ``StaleSessionError`` (the event is
    stored), and the session read again holds the event, which appended again stores
    nothing."""
    with anyio.fail_after(DEADLINE):
        async with fresh_store() as inner:
            store = _LostThenBlind(inner)
            mine = FastSessionService(store, clock=adk_clock)  # type: ignore[arg-type]
            session = await mine.create_session(app_name="a", user_id="u", session_id="s")
            retried = _event("two", {"user:k": 1})
            store.lose()
            with pytest.raises(CheckpointError):
                await mine.append_event(session, retried)
            other = FastSessionService(inner, clock=adk_clock)
            theirs = await other.get_session(app_name="a", user_id="u", session_id="s")
            assert theirs is not None
            adk_clock.advance(1)
            await other.append_event(theirs, _event("three"))
            with pytest.raises(StaleSessionError):
                await mine.append_event(session, retried)
            again = await mine.get_session(app_name="a", user_id="u", session_id="s")
            assert again is not None
            await mine.append_event(again, retried)
            assert _texts(again.events) == ["two", "three"]
            stored = await other.get_session(app_name="a", user_id="u", session_id="s")
            assert stored is not None
            assert _texts(stored.events) == ["two", "three"]
            assert stored.state == {"user:k": 1}


async def _unsettled_append(clock: FakeClock) -> tuple[EntryLog, EntryLog]:
    """A log whose append of ``b"mine"`` has an unknown outcome (it landed), and another
    writer's log object on the same run."""
    store = _LostThenBlind(MemoryStore())
    log = EntryLog(store, "run", clock=clock)  # type: ignore[arg-type]
    await log.append([b"first"])
    store.lose()
    with pytest.raises(StoreUnavailableError):
        await log.append([b"mine"])
    return log, EntryLog(store, "run", clock=clock)  # type: ignore[arg-type]


async def test_a_change_is_recognised_while_the_head_carries_its_token(clock: FakeClock) -> None:
    """Followed by ``RECENT_TOKENS - 1`` other changes the retry is recognised; by one more,
    the token has left the head: the retry is refused (it cannot be told whether the change
    was stored), never made a second time, and the call after it is made (the limit the pages
    state)."""
    for others, refused in ((RECENT_TOKENS - 1, False), (RECENT_TOKENS, True)):
        log, writer = await _unsettled_append(clock)
        for index in range(others):
            await writer.append([f"other-{index}".encode()])
        if refused:
            with pytest.raises(StaleLog, match="unknown") as raised:
                await log.append([b"mine"])
            assert raised.value.revision == others + 1
        else:
            await log.append([b"mine"])
        view = await writer.read()
        assert view is not None
        assert view.entries.count(b"mine") == 1
        assert len(view.entries) == others + 2
        await log.append([b"later"])  # the unknown change is forgotten: the next is made
        view = await writer.read()
        assert view is not None
        assert view.entries[-1] == b"later"


async def test_a_change_not_stored_is_made_on_retry_after_other_writers(
    clock: FakeClock
) -> None:
    """The change was not stored (its request failed before the store applied it) and other
    writers' changes followed, fewer than the head's tokens cover: the retry makes it, once."""
    store = _LostThenBlind(MemoryStore())
    log = EntryLog(store, "run", clock=clock)  # type: ignore[arg-type]
    await log.append([b"first"])
    store.fail_before()
    with pytest.raises(StoreUnavailableError):
        await log.append([b"mine"])
    writer = EntryLog(store, "run", clock=clock)  # type: ignore[arg-type]
    for index in range(3):
        await writer.append([f"other-{index}".encode()])
    await log.append([b"mine"])
    view = await writer.read()
    assert view is not None
    assert view.entries == [b"first", b"other-0", b"other-1", b"other-2", b"mine"]


async def test_an_ended_life_does_not_make_the_change_look_applied(clock: FakeClock) -> None:
    """The change landed, then the log was cleared and written again: the retry is made in the
    new life (tokens are carried within one life only)."""
    log, writer = await _unsettled_append(clock)
    await writer.clear()
    await writer.append([b"new life"])
    await log.append([b"mine"])
    view = await writer.read()
    assert view is not None
    assert view.entries == [b"new life", b"mine"]


class _PreviousLayout(msgspec.Struct, array_like=True, frozen=True):
    """The head layout of the previous release: no tokens."""

    segments: list[_entrylog._Segment]
    state: bytes
    created_at: float


async def test_heads_of_the_previous_release_read_and_carry_tokens_on(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _LostThenBlind(MemoryStore())
    with monkeypatch.context() as patched:
        patched.setattr(_entrylog, "_Layout", lambda segments, state, created_at, _recent:
                        _PreviousLayout(segments, state, created_at))
        await EntryLog(store, "run", clock=clock).append([b"a", b"b"], state=b"s")  # type: ignore[arg-type]
    log = EntryLog(store, "run", clock=clock)  # type: ignore[arg-type]
    view = await log.read()
    assert view is not None
    assert (view.entries, view.state) == ([b"a", b"b"], b"s")
    store.lose()
    with pytest.raises(StoreUnavailableError):
        await log.pop()
    await EntryLog(store, "run", clock=clock).append([b"c"])  # type: ignore[arg-type]
    assert await log.pop() == b"b"
    view = await log.read()
    assert view is not None
    assert view.entries == [b"a", b"c"]
