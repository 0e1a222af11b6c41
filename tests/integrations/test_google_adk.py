"""The Google ADK session service on every store: ADK's in-memory service as the reference,
stale sessions, shared state under concurrency, TTL, paging, costs in store calls, and a real
``LlmAgent`` whose session goes on in another process."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from google.adk.errors import StaleSessionError
from google.adk.errors.already_exists_error import AlreadyExistsError
from google.adk.errors.session_not_found_error import SessionNotFoundError
from google.adk.events.event import Event
from google.adk.events.event_actions import EventActions
from google.adk.platform import time as platform_time
from google.adk.platform import uuid as platform_uuid
from google.adk.sessions import BaseSessionService, InMemorySessionService, Session
from google.adk.sessions.base_session_service import GetSessionConfig
from google.genai import types

from fastcheckpoint.errors import (
    ConfigurationError,
    CorruptCheckpointError,
    SerializationError,
    StoreUnavailableError,
)
from fastcheckpoint.integrations import _google_adk_names as names
from fastcheckpoint.integrations._entrylog import EntryLog
from fastcheckpoint.integrations.google_adk import FastSessionService
from fastcheckpoint.stores import MAX_LABEL_BYTES
from fastcheckpoint.stores.memory import MemoryStore
from tests._helpers import FakeClock, cancelled_after
from tests.integrations._langgraph_support import CountingStore
from tests.integrations.conftest import FreshStore
from tests.integrations.google_adk_worker import APP, USER, build_runner, turn

pytestmark = pytest.mark.anyio

DEADLINE = 60
WORKER = Path(__file__).resolve().parent / "google_adk_worker.py"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def adk_clock(clock: FakeClock) -> Iterator[FakeClock]:
    """ADK's own clock (event timestamps, the in-memory service's times) on ``clock``."""
    platform_time.set_time_provider(clock)
    yield clock
    platform_time.reset_time_provider()


def event(delta: dict[str, Any] | None = None, *, author: str = "agent", text: str = "") -> Event:
    content = types.Content(role="user" if author == "user" else "model",
                            parts=[types.Part(text=text or f"from {author}")])
    return Event(author=author, invocation_id="inv", content=content,
                 actions=EventActions(state_delta=dict(delta or {})))


def view(session: Session | None) -> dict[str, Any] | None:
    """Everything a caller can observe of a session, as plain data."""
    if session is None:
        return None
    return {"id": session.id, "app": session.app_name, "user": session.user_id,
            "state": session.state, "time": session.last_update_time,
            "events": [item.model_dump(mode="json") for item in session.events]}


async def error_of(call: Any) -> str:
    try:
        await call
    except Exception as exc:
        return type(exc).__name__
    return "no error"


# -- the contract, against ADK's in-memory service -------------------------------------------


async def scenario(service: BaseSessionService, clock: FakeClock) -> list[Any]:
    """What a caller observes through the whole session interface. Ids come from a counter
    and times from ``clock``, so two correct services observe the same things, except that
    listings of ours carry no state (``ListSessionsResponse`` documents none)."""
    counter = itertools.count()
    platform_uuid.set_id_provider(lambda: f"id-{next(counter)}")
    seen: list[Any] = []
    try:
        await _scenario(service, clock, seen)
    finally:
        platform_uuid.reset_id_provider()
    return seen


async def _scenario(service: BaseSessionService, clock: FakeClock, seen: list[Any]) -> None:
    first = await service.create_session(
        app_name="app", user_id="u1", session_id="s1",
        state={"topic": "maths", "app:model": "m1", "user:lang": "en", "temp:draft": "x"})
    seen.append(view(first))
    clock.advance(1)
    generated = await service.create_session(app_name="app", user_id="u1")
    seen.append(view(generated))
    seen.append(await error_of(service.create_session(app_name="app", user_id="u1",
                                                      session_id="s1")))
    clock.advance(1)
    third = await service.create_session(app_name="app", user_id="u2", session_id="s3")
    elsewhere = await service.create_session(app_name="other", user_id="u1", session_id="s1",
                                             state={"where": "other"})
    seen.extend([view(third), view(elsewhere)])
    deltas: list[dict[str, Any]] = [
        {"count": 0, "temp:scratch": 1}, {"user:lang": "fr", "nested": {"a": [1, None]}},
        {"app:model": "m2", "count": 2}, {}, {"count": None, "user:seen": True}]
    for number, delta in enumerate(deltas):
        clock.advance(1)
        made = event(delta, author="user" if number % 2 else "agent", text=f"message {number}")
        seen.append((await service.append_event(first, made)).model_dump(mode="json"))
    # The same event once more (a call made again): neither stored nor applied twice.
    again = first.events[-1].model_copy(deep=True)
    seen.append((await service.append_event(first, again)).model_dump(mode="json"))
    partial = event({"count": 99}, text="typing")
    partial.partial = True
    await service.append_event(first, partial)
    seen.append(view(first))
    stamps = [item.timestamp for item in first.events]
    for config in (None, GetSessionConfig(num_recent_events=2),
                   GetSessionConfig(num_recent_events=0), GetSessionConfig(num_recent_events=9),
                   GetSessionConfig(after_timestamp=stamps[2]),
                   GetSessionConfig(after_timestamp=stamps[-1] + 1),
                   GetSessionConfig(num_recent_events=3, after_timestamp=stamps[3])):
        seen.append(view(await service.get_session(app_name="app", user_id="u1",
                                                   session_id="s1", config=config)))
    for app, user, session_id in (("app", "u2", "s3"), ("other", "u1", "s1"),
                                  ("app", "u2", "s1"), ("app", "u1", "nope")):
        seen.append(view(await service.get_session(app_name=app, user_id=user,
                                                   session_id=session_id)))
    seen.append(await service.get_user_state(app_name="app", user_id="u1"))
    seen.append(await service.get_user_state(app_name="app", user_id="nobody"))
    seen.append(await listed(service))
    # Spaces around an id are not part of it.
    padded = await service.create_session(app_name="app", user_id="u3", session_id=" pad ")
    seen.append(view(padded))
    seen.append(view(await service.get_session(app_name="app", user_id="u3", session_id="pad")))
    seen.append(await error_of(service.create_session(app_name="app", user_id="u3",
                                                      session_id="pad")))
    await service.delete_session(app_name="app", user_id="u3", session_id="pad  ")
    seen.append(view(await service.get_session(app_name="app", user_id="u3", session_id="pad")))
    clock.advance(1)
    await service.delete_session(app_name="app", user_id="u1", session_id=generated.id)
    await service.delete_session(app_name="app", user_id="u1", session_id=generated.id)
    seen.append(view(await service.get_session(app_name="app", user_id="u1",
                                               session_id=generated.id)))
    seen.append(await error_of(service.append_event(generated, event())))
    seen.append(await listed(service))


async def listed(service: BaseSessionService) -> list[Any]:
    found = []
    for app, user in (("app", None), ("app", "u1"), ("app", "u2"), ("app", "nobody"),
                      ("other", None), ("none", None)):
        response = await service.list_sessions(app_name=app, user_id=user)
        found.append([(session.id, session.app_name, session.user_id,
                       session.last_update_time, session.events)
                      for session in response.sessions])
    return found


async def test_the_service_observes_what_adks_in_memory_service_does(
    fresh_store: FreshStore, adk_clock: FakeClock
) -> None:
    with anyio.fail_after(DEADLINE):
        expected = await scenario(InMemorySessionService(), adk_clock)
        adk_clock.now = FakeClock().now
        async with fresh_store() as store:
            ours = await scenario(FastSessionService(store, clock=adk_clock), adk_clock)
    assert ours == expected
    assert expected[2] == AlreadyExistsError.__name__
    assert expected[-2] == "SessionNotFoundError"


# -- stale sessions and shared state ----------------------------------------------------------


async def test_a_stale_session_is_refused_and_left_unchanged(
    fresh_store: FreshStore, adk_clock: FakeClock
) -> None:
    with anyio.fail_after(DEADLINE):
        async with fresh_store() as store:
            # Two services on one store: two processes, each with its own view.
            ours = FastSessionService(store, clock=adk_clock)
            theirs = FastSessionService(store, clock=adk_clock)
            mine = await ours.create_session(app_name="a", user_id="u", session_id="s",
                                             state={"n": 0})
            other = await theirs.get_session(app_name="a", user_id="u", session_id="s")
            assert other is not None
            adk_clock.advance(1)
            await ours.append_event(mine, event({"n": 1}))
            adk_clock.advance(1)
            before = view(other)
            with pytest.raises(StaleSessionError):
                await theirs.append_event(other, event({"n": 2}))
            assert view(other) == before
            stored = await theirs.get_session(app_name="a", user_id="u", session_id="s")
            assert stored is not None
            assert (len(stored.events), stored.state) == (1, {"n": 1})

            await theirs.append_event(stored, event({"n": 3}))  # reloaded: accepted
            with pytest.raises(StaleSessionError):
                await ours.append_event(mine, event({"n": 4}))

            # A session this service did not hand out: checked against the stored events.
            by_hand = Session(id="s", app_name="a", user_id="u")
            with pytest.raises(StaleSessionError):
                await ours.append_event(by_hand, event({"n": 5}))
            copied = Session.model_validate(stored.model_dump())
            await ours.append_event(copied, event({"n": 6}))
            final = await ours.get_session(app_name="a", user_id="u", session_id="s")
            assert final is not None
            assert [item.actions.state_delta["n"] for item in final.events] == [1, 3, 6]
            assert final.state == {"n": 6}

            # Gone, then back under the same id: the old session objects stay refused.
            await theirs.delete_session(app_name="a", user_id="u", session_id="s")
            with pytest.raises(SessionNotFoundError):
                await ours.append_event(final, event({"n": 7}))
            reborn = await theirs.create_session(app_name="a", user_id="u", session_id="s")
            adk_clock.advance(1)
            await theirs.append_event(reborn, event({"n": 8}))
            with pytest.raises(StaleSessionError):
                await ours.append_event(final, event({"n": 9}))
            again = await ours.get_session(app_name="a", user_id="u", session_id="s")
            assert again is not None
            assert [item.actions.state_delta["n"] for item in again.events] == [8]


async def test_a_session_of_an_earlier_life_is_refused_when_both_began_at_one_instant(
    fresh_store: FreshStore, clock: FakeClock
) -> None:
    """The clock never moves: a session deleted and created again under its id is a new
    session all the same, for the service that made the old one and for any other."""
    ids = {"app_name": "a", "user_id": "u", "session_id": "s"}
    with anyio.fail_after(DEADLINE):
        async with fresh_store() as store:
            maker, deleter, other = (FastSessionService(store, clock=clock) for _ in range(3))
            old = await maker.create_session(**ids)
            await deleter.delete_session(**ids)
            new = await deleter.create_session(**ids, state={"owner": "new"})
            for service in (other, maker):
                with pytest.raises(StaleSessionError):
                    await service.append_event(old, event({"owner": "old"}, author="old"))
            stored = await other.get_session(**ids)
            assert stored is not None
            assert (stored.events, stored.state) == ([], {"owner": "new"})
            await other.append_event(new, event(author="new"))
            stored = await maker.get_session(**ids)
            assert stored is not None
            assert [item.author for item in stored.events] == ["new"]


async def test_a_session_marked_by_the_previous_release_is_checked_by_its_events(
    fresh_store: FreshStore, clock: FakeClock
) -> None:
    """The previous release marked a session ``<revision>@<created_at>``, which a session of
    an earlier life created at the same instant shares. Such a session appends while it is
    at that revision and holds the stored session's newest event; else it is stale."""
    ids = {"app_name": "a", "user_id": "u", "session_id": "s"}

    async def old_marked(service: FastSessionService, revision: int) -> Session:
        session = await service.get_session(**ids)
        assert session is not None
        session._storage_update_marker = f"fastcheckpoint:{revision}@{clock()!r}"
        return session

    with anyio.fail_after(DEADLINE):
        async with fresh_store() as store:
            first, second = (FastSessionService(store, clock=clock) for _ in range(2))
            made = await first.create_session(**ids)
            with pytest.raises(StaleSessionError):  # no event: its life cannot be told
                await second.append_event(await old_marked(first, 0), event(author="early"))
            with pytest.raises(StaleSessionError):  # not at that revision
                await second.append_event(await old_marked(first, 1), event(author="early"))
            await first.append_event(made, event(author="first"))
            mine = await old_marked(second, 1)
            await second.append_event(mine, event(author="second"))
            await second.append_event(mine, event(author="second"))  # marked anew

            earlier = await old_marked(first, 3)
            await first.delete_session(**ids)
            reborn = await first.create_session(**ids)
            for _ in range(3):
                await first.append_event(reborn, event(author="reborn"))
            for service in (first, second):
                with pytest.raises(StaleSessionError):
                    await service.append_event(earlier, event(author="earlier"))
            stored = await second.get_session(**ids)
            assert stored is not None
            assert [item.author for item in stored.events] == ["reborn"] * 3


async def test_user_state_changes_from_two_sessions_all_land(
    fresh_store: FreshStore, adk_clock: FakeClock
) -> None:
    with anyio.fail_after(DEADLINE):
        async with fresh_store() as store:
            first = FastSessionService(store, clock=adk_clock)
            second = FastSessionService(store, clock=adk_clock)
            one = await first.create_session(app_name="a", user_id="u", session_id="one")
            two = await second.create_session(app_name="a", user_id="u", session_id="two")
            # Both services saw the user's state empty; the second writes first, so the
            # first one's compare-and-set fails and is retried on the new state. Per key, the
            # change the clock puts later wins (the first service has not seen the second's).
            await second.append_event(two, event({"user:from_two": 1, "app:seen": "two"}))
            adk_clock.advance(1)
            await first.append_event(one, event({"user:from_one": 1, "app:seen": "one"}))
            assert await first.get_user_state(app_name="a", user_id="u") == {
                "from_two": 1, "from_one": 1}

            async def burst(service: FastSessionService, session: Session, name: str) -> None:
                for number in range(2):
                    await service.append_event(session, event({f"user:{name}{number}": number}))

            async with anyio.create_task_group() as group:
                group.start_soon(burst, first, one, "one")
                group.start_soon(burst, second, two, "two")
            state = await second.get_user_state(app_name="a", user_id="u")
            assert state == {"from_two": 1, "from_one": 1,
                             **{f"{name}{number}": number for name in ("one", "two")
                                for number in range(2)}}
            got = await second.get_session(app_name="a", user_id="u", session_id="one")
            assert got is not None
            assert got.state["app:seen"] == "one"
            assert {key for key in got.state if key.startswith("user:")} == {
                f"user:{key}" for key in state}
            assert len(got.events) == 3


# -- a change of app or user state cut off from its event --------------------------------------


def _before_shared_writes(
    monkeypatch: pytest.MonkeyPatch, before: Callable[[str], Awaitable[None]]
) -> None:
    """Every write of an app's or a user's state awaits ``before(run_id)`` first."""
    real_append = EntryLog.append

    async def hooked(self: EntryLog, entries: Any, **kwargs: Any) -> Any:
        if not entries and self.run_id.startswith((names.APP_STATE_PREFIX,
                                                   names.USER_STATE_PREFIX)):
            await before(self.run_id)
        return await real_append(self, entries, **kwargs)

    monkeypatch.setattr(EntryLog, "append", hooked)


async def _revision(store: Any, run_id: str) -> int:
    found = await EntryLog(store, run_id).read()
    return -1 if found is None else found.revision


async def test_a_shared_change_cut_off_from_its_event_is_applied_by_the_next_read_once(
    fresh_store: FreshStore, adk_clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure between the event's store call and the user state's: the next read of the
    session, in any process, applies the change, once; later changes of the key are not
    undone by reading or appending to the session again."""
    failed: list[str] = []

    async def fail_first_user_write(run_id: str) -> None:
        if run_id.startswith(names.USER_STATE_PREFIX) and len(failed) < 2:
            failed.append(run_id)
            raise StoreUnavailableError("injected: the store went away")

    user_log = names.user_state_run_id("a", "u")
    with anyio.fail_after(DEADLINE):
        async with fresh_store() as store:
            writer = FastSessionService(store, clock=adk_clock)
            session = await writer.create_session(app_name="a", user_id="u", session_id="s")
            _before_shared_writes(monkeypatch, fail_first_user_write)
            with pytest.raises(StoreUnavailableError):
                await writer.append_event(session, event({"n": 1, "app:m": 1, "user:k": 1}))
            with pytest.raises(StoreUnavailableError):  # create_session: the same
                await writer.create_session(app_name="a", user_id="u", session_id="c",
                                            state={"user:c": 1})
            assert len(failed) == 2
            assert await writer.get_user_state(app_name="a", user_id="u") == {}

            counting: Any = CountingStore(store)
            reader = FastSessionService(counting, clock=adk_clock)  # another process
            got = await reader.get_session(app_name="a", user_id="u", session_id="s")
            assert counting.take() == {"read_with_items": 3, "append_with_items": 1}
            assert got is not None
            assert (len(got.events), got.state) == (1, {"n": 1, "app:m": 1, "user:k": 1})
            created = await reader.get_session(app_name="a", user_id="u", session_id="c")
            assert created is not None
            assert created.state == {"app:m": 1, "user:k": 1, "user:c": 1}
            assert await writer.get_user_state(app_name="a", user_id="u") == {"k": 1, "c": 1}
            applied = await _revision(store, user_log)

            # Another session changes the key later: reading the session again, or
            # appending its event again, applies nothing (once, not twice).
            adk_clock.advance(1)
            other = await reader.create_session(app_name="a", user_id="u", session_id="t")
            await reader.append_event(other, event({"user:k": 2}))
            counting.take()
            again = await FastSessionService(counting, clock=adk_clock).get_session(
                app_name="a", user_id="u", session_id="s")
            assert counting.take() == {"read_with_items": 3}
            assert again is not None
            assert again.state["user:k"] == 2
            await reader.append_event(again, again.events[-1].model_copy(deep=True))
            assert counting.take() == {"read_with_items": 1}  # the session is still there
            assert len(again.events) == 1
            # The writer's own next append (on the session read again) writes no user state.
            mine = await writer.get_session(app_name="a", user_id="u", session_id="s")
            assert mine is not None
            await writer.append_event(mine, event({"n": 2}))
            assert await _revision(store, user_log) == applied + 1  # t's change only
            assert await writer.get_user_state(app_name="a", user_id="u") == {"k": 2, "c": 1}
            # That append dropped what the session carried: its stored state is its own.
            stored = await EntryLog(store, names.session_run_id("a", "u", "s")).read()
            assert stored is not None
            assert json.loads(stored.state) == {"n": 2}


async def test_a_pending_change_is_applied_once_by_readers_and_its_slow_writer_at_once(
    fresh_store: FreshStore, adk_clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The event is stored and its writer is slow to change the user's state: two other
    processes read the session at the same time and apply the change, once between them;
    another session then changes the key, and the writer's own write, when it comes,
    neither applies the change again nor undoes the later one."""
    writer_held, release_writer, both_ready = anyio.Event(), anyio.Event(), anyio.Event()
    arrivals: list[str] = []

    async def hold(run_id: str) -> None:
        if not run_id.startswith(names.USER_STATE_PREFIX):
            return
        if not writer_held.is_set():  # the writer's write: wait for the readers
            writer_held.set()
            await release_writer.wait()
            return
        arrivals.append(run_id)  # the readers' writes: both have read before either writes
        if len(arrivals) == 2:
            both_ready.set()
        await both_ready.wait()

    user_log = names.user_state_run_id("a", "u")
    with anyio.fail_after(DEADLINE):
        async with fresh_store() as store:
            writer = FastSessionService(store, clock=adk_clock)
            session = await writer.create_session(app_name="a", user_id="u", session_id="s")
            await writer.create_session(app_name="a", user_id="u", session_id="t")
            _before_shared_writes(monkeypatch, hold)
            readers = [FastSessionService(store, clock=adk_clock) for _ in range(2)]
            seen: list[Any] = []

            async def read(service: FastSessionService) -> None:
                seen.append(await service.get_session(app_name="a", user_id="u",
                                                      session_id="s"))

            async with anyio.create_task_group() as group:
                group.start_soon(writer.append_event, session, event({"user:k": 1}))
                await writer_held.wait()
                try:  # the held writer cannot be cancelled: release it whatever fails
                    before = await _revision(store, user_log)
                    with anyio.fail_after(DEADLINE / 4):
                        async with anyio.create_task_group() as both:
                            for reader in readers:
                                both.start_soon(read, reader)
                    assert [got.state for got in seen] == [{"user:k": 1}] * 2
                    assert await _revision(store, user_log) == before + 1

                    adk_clock.advance(1)
                    other = await readers[0].get_session(app_name="a", user_id="u",
                                                         session_id="t")
                    assert other is not None
                    await readers[0].append_event(other, event({"user:k": 2}))
                finally:
                    release_writer.set()
                    both_ready.set()
            assert session.state == {"user:k": 1}  # the writer's object: its own change
            assert await _revision(store, user_log) == before + 2
            assert await writer.get_user_state(app_name="a", user_id="u") == {"k": 2}


@pytest.mark.parametrize("read_first", [False, True], ids=["unread", "read"])
async def test_a_later_change_from_a_process_whose_clock_lags_is_kept(
    fresh_store: FreshStore, adk_clock: FakeClock, read_first: bool
) -> None:
    """Process B's clock runs 5 s behind A's. A changes ``user:k``, then B changes it a
    second later (B having read the session before A's change, or not): B's change is the
    last compare-and-set of the user's state and is kept, as B's session object says. A
    later read anywhere, even by a process whose clock runs ahead, applies nothing again."""
    ids = {"app_name": "a", "user_id": "u"}
    with anyio.fail_after(DEADLINE):
        async with fresh_store() as store:
            ahead = FastSessionService(store, clock=adk_clock)
            behind = FastSessionService(store, clock=lambda: adk_clock() - 5)
            mine = await ahead.create_session(**ids, session_id="a")
            theirs: Session | None = await behind.create_session(**ids, session_id="b")
            await ahead.append_event(mine, event({"user:k": "old"}))
            adk_clock.advance(10)
            if read_first:
                theirs = await behind.get_session(**ids, session_id="b")
                assert theirs is not None
                assert theirs.state == {"user:k": "old"}
            adk_clock.advance(1)
            await ahead.append_event(mine, event({"user:k": "earlier"}))
            adk_clock.advance(1)
            assert theirs is not None
            await behind.append_event(theirs, event({"user:k": "later"}))
            assert theirs.state == {"user:k": "later"}
            for service in (ahead, behind):
                assert await service.get_user_state(**ids) == {"k": "later"}

            # Session a still carries A's change as pending: found applied, it is skipped.
            counting: Any = CountingStore(store)
            third = FastSessionService(counting, clock=lambda: adk_clock() + 5)
            got = await third.get_session(**ids, session_id="a")
            assert counting.take() == {"read_with_items": 3}
            assert got is not None
            assert got.state == {"user:k": "later"}


async def test_a_slow_writer_whose_change_a_reader_applied_writes_nothing(
    fresh_store: FreshStore, adk_clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer stored its event and is slow to change the user's state; a reader applies
    the change, then a process whose clock runs 5 s behind (and has not seen the user's
    state) changes the key. The writer's compare-and-set, when it comes, finds its change
    applied and writes nothing: the later change stays, and nothing is applied twice."""
    writer_held, release_writer = anyio.Event(), anyio.Event()

    async def hold(run_id: str) -> None:
        if run_id.startswith(names.USER_STATE_PREFIX) and not writer_held.is_set():
            writer_held.set()
            await release_writer.wait()

    ids = {"app_name": "a", "user_id": "u"}
    user_log = names.user_state_run_id("a", "u")
    with anyio.fail_after(DEADLINE):
        async with fresh_store() as store:
            writer = FastSessionService(store, clock=adk_clock)
            session = await writer.create_session(**ids, session_id="s")
            other = await writer.create_session(**ids, session_id="t")
            _before_shared_writes(monkeypatch, hold)
            reader = FastSessionService(store, clock=adk_clock)
            lagging = FastSessionService(store, clock=lambda: adk_clock() - 5)
            async with anyio.create_task_group() as group:
                group.start_soon(writer.append_event, session, event({"user:k": 1}))
                await writer_held.wait()
                try:  # the held writer cannot be cancelled: release it whatever fails
                    before = await _revision(store, user_log)
                    got = await reader.get_session(**ids, session_id="s")
                    assert got is not None
                    assert got.state == {"user:k": 1}
                    adk_clock.advance(1)
                    await lagging.append_event(other, event({"user:k": 2}))
                    assert await _revision(store, user_log) == before + 2
                finally:
                    release_writer.set()
            assert session.state == {"user:k": 1}  # the writer's object: its own change
            assert await _revision(store, user_log) == before + 2
            assert await writer.get_user_state(**ids) == {"k": 2}


async def test_shared_state_keeps_the_last_applied_ids_and_reads_the_earlier_format() -> None:
    """App and user state written without applied ids, and pending changes without an id,
    are read and applied by order; the state then keeps the ids of the last 128 changes
    applied to it, newest last."""
    ids = {"app_name": "a", "user_id": "u"}
    with anyio.fail_after(DEADLINE):
        store = MemoryStore()
        user_log = EntryLog(store, names.user_state_run_id("a", "u"))
        await user_log.append((), state=b'[{"k":1,"j":1},{"k":5,"j":5}]', expect=-1)
        await EntryLog(store, names.session_run_id("a", "u", "s")).append(
            (), state=b'[{"n":1},[[6,{},{"k":2}],[4,{},{"j":2}]]]', expect=-1)
        service = FastSessionService(store, clock=lambda: 10.0)
        got = await service.get_session(**ids, session_id="s")
        assert got is not None
        assert got.state == {"n": 1, "user:k": 2, "user:j": 1}
        for number in range(130):
            await service.append_event(got, event({"user:k": number}))
        stored = await user_log.read()
        session = await EntryLog(store, names.session_run_id("a", "u", "s")).read()
        assert stored is not None
        assert session is not None
        state, orders, applied = json.loads(stored.state)
        assert (state, set(orders)) == ({"k": 129, "j": 1}, {"k", "j"})
        own_state, pending = json.loads(session.state)
        assert len(applied) == len(set(applied)) == 128
        assert (own_state, [change[3] for change in pending]) == ({"n": 1}, applied[-1:])


_KILLED_WRITER = """
import asyncio, os, signal, sys
from google.adk.events.event import Event
from google.adk.events.event_actions import EventActions
from fastcheckpoint.integrations._entrylog import EntryLog
from fastcheckpoint.integrations.google_adk import FastSessionService

real_append = EntryLog.append

async def killed_first(self, entries, **kwargs):
    if not entries and self.run_id.startswith("google-adk-user:"):
        os.kill(os.getpid(), signal.SIGKILL)
    return await real_append(self, entries, **kwargs)

async def main(url):
    service = FastSessionService(url)
    session = await service.create_session(app_name="a", user_id="u", session_id="s")
    EntryLog.append = killed_first
    await service.append_event(session, Event(author="agent", invocation_id="inv",
        actions=EventActions(state_delta={"n": 1, "app:m": 1, "user:k": 1})))

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.parametrize("scheme", ["file", "sqlite"])
async def test_a_process_killed_between_event_and_user_state_loses_no_change(
    tmp_path: Path, scheme: str
) -> None:
    """SIGKILL of a process after it stored the event, before it changed the user's state:
    the next process to read the session applies the change, once."""
    url = (f"file://{tmp_path / 'files'}" if scheme == "file"
           else f"sqlite:///{tmp_path / 'sessions.db'}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with anyio.fail_after(DEADLINE):
        done = await anyio.run_process([sys.executable, "-c", _KILLED_WRITER, url],
                                       env=env, check=False)
        assert done.returncode == -signal.SIGKILL, done.stderr.decode()
        async with FastSessionService(url) as service:
            assert await service.get_user_state(app_name="a", user_id="u") == {}
            got = await service.get_session(app_name="a", user_id="u", session_id="s")
            assert got is not None
            assert (len(got.events), got.state) == (1, {"n": 1, "app:m": 1, "user:k": 1})
            user_log = names.user_state_run_id("a", "u")
            applied = await _revision(service.store, user_log)
            await service.append_event(got, got.events[-1].model_copy(deep=True))
            assert await service.get_session(app_name="a", user_id="u", session_id="s")
            assert await _revision(service.store, user_log) == applied
            assert await service.get_user_state(app_name="a", user_id="u") == {"k": 1}


def _appends_yield(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every log append waits a turn of the event loop before and after it: room for a
    cancellation between the store calls of one service call."""
    real_append = EntryLog.append

    async def yielding(self: EntryLog, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0)
        head = await real_append(self, *args, **kwargs)
        await asyncio.sleep(0)
        return head

    monkeypatch.setattr(EntryLog, "append", yielding)


@pytest.mark.parametrize("kind", ["memory", "file"])
async def test_a_cancelled_append_stores_the_event_and_its_state_changes_or_nothing(
    fresh_store: FreshStore, adk_clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncio's own cancellation (how ADK's runner cancels) at every point of an append
    that changes the session's, the app's and the user's state: the event lands with all
    three changes or with none, and the session object says which (so calling again stores
    it once)."""
    _appends_yield(monkeypatch)
    outcomes = set()
    with anyio.fail_after(DEADLINE):
        async with fresh_store() as store:
            # Step by step through the append, then longer waits until one is not cut
            # short (the file store's worker threads take a varying number of steps).
            for delay in itertools.chain(range(40), (60 * 2 ** power for power in range(12))):
                if ("returned", True) in outcomes:
                    break
                service = FastSessionService(store, clock=adk_clock)
                session_id = f"s{delay}"
                session = await service.create_session(
                    app_name="app", user_id=f"u{delay}", session_id=session_id)
                made = event({"n": delay, "app:last": delay, f"user:seen{delay}": True})
                outcome = await cancelled_after(service.append_event(session, made), delay)
                stored = await FastSessionService(store, clock=adk_clock).get_session(
                    app_name="app", user_id=f"u{delay}", session_id=session_id)
                assert stored is not None
                landed = bool(stored.events)
                outcomes.add((outcome, landed))
                # The app's state is shared by every session of the loop: only its value
                # tells whether this event's change landed.
                changes = (stored.state.get("n"), stored.state.get("app:last"),
                           stored.state.get(f"user:seen{delay}"))
                assert changes == ((delay, delay, True) if landed else
                                   (None, changes[1], None))
                assert landed or changes[1] != delay
                assert len(session.events) == len(stored.events)
                await service.append_event(session, made)  # again: stored once
                stored = await service.get_session(
                    app_name="app", user_id=f"u{delay}", session_id=session_id)
                assert stored is not None
                assert len(stored.events) == 1
    assert outcomes == {("cancelled", False), ("cancelled", True), ("returned", True)}


async def test_a_cancelled_create_makes_the_session_with_all_its_state_or_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cancellation at every point of a ``create_session`` whose state has session, app
    and user keys: the session is there with the three, or not there at all."""
    _appends_yield(monkeypatch)
    store = MemoryStore()
    outcomes = set()
    with anyio.fail_after(DEADLINE):
        for delay in range(16):
            outcome = await cancelled_after(FastSessionService(store).create_session(
                app_name="app", user_id=f"u{delay}", session_id=f"s{delay}",
                state={"topic": delay, "app:plan": delay, f"user:name{delay}": delay}), delay)
            stored = await FastSessionService(store).get_session(
                app_name="app", user_id=f"u{delay}", session_id=f"s{delay}")
            outcomes.add((outcome, stored is not None))
            if stored is not None:
                assert (stored.state["topic"], stored.state["app:plan"],
                        stored.state[f"user:name{delay}"]) == (delay, delay, delay)
    assert outcomes == {("cancelled", False), ("cancelled", True), ("returned", True)}


# -- TTL -----------------------------------------------------------------------------------------


async def test_a_damaged_event_is_a_corrupt_checkpoint_for_every_read_that_meets_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reads that look only at an event's id or timestamp (``after_timestamp``, the stale
    check of a session object) raise ``CorruptCheckpointError`` on a damaged one, as a whole
    read does: never the decoder's own error."""
    service = FastSessionService(MemoryStore())
    session = await service.create_session(app_name="a", user_id="u", session_id="s")
    for text in ("one", "two"):
        await service.append_event(session, event(text=text))
    real = EntryLog.read

    async def damaged(log: EntryLog) -> Any:
        found = await real(log)
        if found is None or not found.entries:
            return found
        newest = found.entries[-1]
        return msgspec.structs.replace(found, entries=[*found.entries[:-1], b"X" + newest[1:]])

    monkeypatch.setattr(EntryLog, "read", damaged)
    stale = Session(id="s", app_name="a", user_id="u", last_update_time=0, events=[event()])
    for call in (
        lambda: service.get_session(app_name="a", user_id="u", session_id="s"),
        lambda: service.get_session(app_name="a", user_id="u", session_id="s",
                                    config=GetSessionConfig(after_timestamp=0)),
        lambda: service.get_session(app_name="a", user_id="u", session_id="s",
                                    config=GetSessionConfig(num_recent_events=1)),
        lambda: service.append_event(stale, event(text="three")),
    ):
        with pytest.raises(CorruptCheckpointError, match="undecodable ADK event"):
            await call()


@pytest.mark.parametrize("order", [b"1" * 400, b"Infinity", b"NaN", b"true"])
async def test_a_damaged_order_of_shared_state_is_a_corrupt_checkpoint(order: bytes) -> None:
    """An order in a session's pending change or in app or user state that is not a finite
    number raises ``CorruptCheckpointError`` (never ``OverflowError``), and an infinite one
    is not taken as one that no change could pass."""
    with anyio.fail_after(DEADLINE):
        store = MemoryStore()
        service = FastSessionService(store)
        session = await service.create_session(app_name="a", user_id="u", session_id="s")
        await EntryLog(store, names.user_state_run_id("a", "u")).append(
            (), state=b'[{"k":1},{"k":' + order + b"}]", expect=-1)
        await EntryLog(store, names.session_run_id("a", "v", "p")).append(
            (), state=b'[{},[[' + order + b',{},{"k":1}]]]', expect=-1)
        with pytest.raises(CorruptCheckpointError):
            await service.get_session(app_name="a", user_id="u", session_id="s")
        with pytest.raises(CorruptCheckpointError):
            await service.append_event(session, event({"user:k": 2}))
        with pytest.raises(CorruptCheckpointError, match="malformed pending change"):
            await service.get_session(app_name="a", user_id="v", session_id="p")


async def test_sessions_expire_after_ttl_seconds_without_a_change(
    fresh_store: FreshStore, adk_clock: FakeClock
) -> None:
    with anyio.fail_after(DEADLINE):
        async with fresh_store() as store:
            service = FastSessionService(store, ttl_seconds=100, clock=adk_clock)
            session = await service.create_session(app_name="a", user_id="u", session_id="s")
            adk_clock.advance(60)
            await service.append_event(session, event({"user:name": "ada"}))
            adk_clock.advance(60)  # 120 s after creation, 60 after the append: alive
            alive = await service.get_session(app_name="a", user_id="u", session_id="s")
            assert alive is not None
            assert len(alive.events) == 1
            assert [found.id for found in
                    (await service.list_sessions(app_name="a")).sessions] == ["s"]

            adk_clock.advance(100)
            assert await service.get_session(app_name="a", user_id="u", session_id="s") is None
            assert (await service.list_sessions(app_name="a", user_id="u")).sessions == []
            with pytest.raises(SessionNotFoundError):
                await service.append_event(alive, event())
            assert await service.cleanup_expired() >= 1
            # User state outlives the session; the id is free again.
            assert await service.get_user_state(app_name="a", user_id="u") == {"name": "ada"}
            fresh = await service.create_session(app_name="a", user_id="u", session_id="s")
            assert (fresh.events, fresh.state) == ([], {"user:name": "ada"})


# -- paging and costs ----------------------------------------------------------------------------


async def test_costs_in_store_calls_and_paged_listing(
    fresh_store: FreshStore, adk_clock: FakeClock
) -> None:
    with anyio.fail_after(DEADLINE):
        async with fresh_store() as store:
            counting: Any = CountingStore(store)
            service = FastSessionService(counting, page_size=2, clock=adk_clock)
            session = await service.create_session(app_name="a", user_id="u1", session_id="s")
            assert counting.take() == {"append_with_items": 1, "read_with_items": 2}
            for number in range(-1, 3):
                adk_clock.advance(1)
                await service.append_event(session, event({"step": number}))
                assert counting.take() == {"append_with_items": 1}
            await service.append_event(session, event({"user:x": 1}))
            assert counting.take() == {"append_with_items": 2}
            await service.append_event(session, event({"app:x": 1, "user:x": 2}))
            assert counting.take() == {"append_with_items": 3}
            partial = event({"step": 99})
            partial.partial = True
            await service.append_event(session, partial)
            assert counting.take() == {}

            # Another process: reads the session, then appends at one call each.
            other = FastSessionService(counting, page_size=2, clock=adk_clock)
            loaded = await other.get_session(app_name="a", user_id="u1", session_id="s")
            assert counting.take() == {"read_with_items": 3}
            assert loaded is not None
            assert len(loaded.events) == 6
            await other.append_event(loaded, event({"step": 100}))
            assert counting.take() == {"append_with_items": 1}

            for user, count in (("u1", 2), ("u2", 2)):
                for number in range(count):
                    adk_clock.advance(1)
                    await service.create_session(app_name="a", user_id=user,
                                                 session_id=f"{user}-{number}")
            await service.create_session(app_name="b", user_id="u1", session_id="elsewhere")
            counting.take()
            everyone = await service.list_sessions(app_name="a")
            assert counting.take() == {"runs_with_label": 3}  # 5 sessions, 2 a page
            assert [found.id for found in everyone.sessions] == [
                "s", "u1-0", "u1-1", "u2-0", "u2-1"]
            assert all(found.events == [] and found.state == {} for found in everyone.sessions)
            mine = await service.list_sessions(app_name="a", user_id="u1")
            assert counting.take() == {"runs_with_label": 2}
            assert [found.id for found in mine.sessions] == ["s", "u1-0", "u1-1"]
            assert counting.last["runs_with_label"][1]["limit"] == 2

            await service.delete_session(app_name="a", user_id="u1", session_id="s")
            assert counting.take() == {"delete_run": 1}


# -- names, limits, configuration ------------------------------------------------------------


async def test_any_names_round_trip_and_long_ones_get_hashed_labels() -> None:
    with anyio.fail_after(DEADLINE):
        service = FastSessionService(MemoryStore())
        app, user = "a/p:p%" + "é" * 200, "user/with:colons"
        label = names.user_label(app, user)
        assert label.startswith("google-adk:user:sha256:")
        assert len(label.encode()) <= MAX_LABEL_BYTES
        for session_id in ("x/y", "x:y", "%2F", "日本"):
            made = await service.create_session(app_name=app, user_id=user,
                                                session_id=session_id)
            await service.append_event(made, event({"k": session_id}))
        await service.create_session(app_name=app, user_id="user", session_id="x/y")
        listed_ids = [(found.user_id, found.id) for found in
                      (await service.list_sessions(app_name=app, user_id=user)).sessions]
        assert listed_ids == [(user, "x/y"), (user, "x:y"), (user, "%2F"), (user, "日本")]
        assert len((await service.list_sessions(app_name=app)).sessions) == 5
        got = await service.get_session(app_name=app, user_id=user, session_id="日本")
        assert got is not None
        assert got.state == {"k": "日本"}
        assert names.parse_session_run_id(names.session_run_id(app, user, "x/y")) == (
            app, user, "x/y")
        assert names.parse_session_run_id("google-adk-user:a/b") is None


async def test_values_json_cannot_hold_are_refused_before_anything_is_written() -> None:
    with anyio.fail_after(DEADLINE):
        service = FastSessionService(MemoryStore())
        session = await service.create_session(app_name="a", user_id="u", session_id="s")
        with pytest.raises(SerializationError):
            await service.append_event(session, event({"callback": print}))
        with pytest.raises(SerializationError):
            await service.create_session(app_name="a", user_id="u", state={"f": print})
        stored = await service.get_session(app_name="a", user_id="u", session_id="s")
        assert stored is not None
        assert stored.events == []


async def test_app_and_user_values_json_cannot_hold_are_refused_before_anything_is_written(
) -> None:
    """The app's and the user's state are written after the session: a value they cannot
    hold must be refused before the session, or the event, is."""
    with anyio.fail_after(DEADLINE):
        service = FastSessionService(MemoryStore())
        for key in ("app:bad", "user:bad"):
            with pytest.raises(SerializationError) as refused:
                await service.create_session(app_name="a", user_id="u", session_id="s",
                                             state={"k": 1, key: object()})
            assert refused.value.path == f"state[{key!r}]"
            assert await service.get_session(app_name="a", user_id="u", session_id="s") is None
        session = await service.create_session(app_name="a", user_id="u", session_id="s",
                                               state={"k": 1})  # the retry: not "exists"
        for key in ("app:bad", "user:bad"):
            with pytest.raises(SerializationError):
                await service.append_event(session, event({"k": 2, key: print}))
            assert (session.events, session.state) == ([], {"k": 1})
            stored = await service.get_session(app_name="a", user_id="u", session_id="s")
            assert stored is not None
            assert (stored.events, stored.state) == ([], {"k": 1})
        await service.append_event(session, event({"k": 3, "user:fine": True}))
        stored = await service.get_session(app_name="a", user_id="u", session_id="s")
        assert stored is not None
        assert (len(stored.events), stored.state) == (1, {"k": 3, "user:fine": True})


async def test_a_session_value_json_cannot_hold_beside_a_shared_change_is_refused() -> None:
    """The session's state carries the app: and user: change as pending: a session value
    JSON cannot hold is refused as such (not as a pydantic error), before anything is
    written."""
    with anyio.fail_after(DEADLINE):
        service = FastSessionService(MemoryStore())
        with pytest.raises(SerializationError) as refused:
            await service.create_session(app_name="a", user_id="u", session_id="s",
                                         state={"bad": object(), "user:k": 1})
        assert refused.value.path == "state['bad']"
        assert await service.get_session(app_name="a", user_id="u", session_id="s") is None
        session = await service.create_session(app_name="a", user_id="u", session_id="s")
        for key in ("app:k", "user:k"):
            with pytest.raises(SerializationError):
                await service.append_event(session, event({"bad": object(), key: 1}))
        stored = await service.get_session(app_name="a", user_id="u", session_id="s")
        assert stored is not None
        assert (stored.events, stored.state) == ([], {})


def test_configuration_errors_name_what_is_wrong() -> None:
    with pytest.raises(ConfigurationError, match="ttl_seconds"):
        FastSessionService(MemoryStore(), ttl_seconds=0)
    with pytest.raises(ConfigurationError, match="page_size"):
        FastSessionService(MemoryStore(), page_size=0)
    with pytest.raises(ConfigurationError, match="CheckpointStore"):
        FastSessionService(object())  # type: ignore[arg-type]


# -- a real agent, continued in another process ------------------------------------------------


async def test_an_agent_session_goes_on_in_a_new_process(tmp_path: Path) -> None:
    urls = {"file": f"file://{tmp_path / 'files'}",
            "sqlite": f"sqlite:///{tmp_path / 'sessions.db'}"}
    with anyio.fail_after(DEADLINE):
        stale: dict[str, Session] = {}
        for kind, url in urls.items():
            async with FastSessionService(url) as service:
                await service.create_session(app_name=APP, user_id=USER, session_id=kind)
                runner, model = build_runner(service)
                assert await turn(runner, kind, "add 2 and 3") == ["The sum is 5."]
                assert model.seen[-1] == ["user: add 2 and 3", "model: call add",
                                          "user: result 5"]
                loaded = await service.get_session(app_name=APP, user_id=USER,
                                                   session_id=kind)
                assert loaded is not None
                stale[kind] = loaded
        results = await _workers(urls)
        for kind, url in urls.items():
            result = results[kind]
            assert result["seen"] == [["user: add 2 and 3", "model: call add", "user: result 5",
                                       "model: The sum is 5.", "user: how many?"]]
            assert result["replies"] == ["I was sent 5 messages."]
            assert result["state"] == {"last_answer": "I was sent 5 messages.",
                                       "user:additions": 1}
            async with FastSessionService(url) as service:
                session = await service.get_session(app_name=APP, user_id=USER,
                                                    session_id=kind)
                assert session is not None
                assert len(session.events) == 6
                assert session.events[1].get_function_calls()[0].args == {"a": 2, "b": 3}
                with pytest.raises(StaleSessionError):  # the other process went on
                    await service.append_event(stale[kind], event())


async def _workers(urls: dict[str, str]) -> dict[str, Any]:
    """Run a turn on each store (session named after its kind) in one new process."""
    targets = [part for kind, url in urls.items() for part in (url, kind)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = await anyio.run_process([sys.executable, str(WORKER), "how many?", *targets],
                                   env=env, check=False)
    assert done.returncode == 0, done.stderr.decode()
    lines = done.stdout.decode().strip().splitlines()[-len(urls):]
    return dict(zip(urls, map(json.loads, lines), strict=True))
