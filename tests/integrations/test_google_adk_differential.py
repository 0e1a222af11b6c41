"""Differential model checking: ``FastSessionService`` against ADK's ``InMemorySessionService``.

A hypothesis ``RuleBasedStateMachine`` applies the same random sequences of
``create_session`` (with or without an id, with ``app:``, ``user:``, ``temp:`` and plain state
keys), ``get_session`` (with ``GetSessionConfig`` ``num_recent_events`` and
``after_timestamp``), ``list_sessions`` (one user, all users), ``append_event`` (state deltas
of every scope, partial events, events sent again), ``delete_session``, ``get_user_state``
and clock moves to a ``FastSessionService`` (over MemoryStore, or a FileStore in a fresh
directory) and to ADK's reference in-memory service, and compares what a caller sees: the
sessions returned (ids, state merged with app and user state, events, field by field), the
session objects after an append, the events returned, the errors raised, the listings and
the user state.

Two ``FastSessionService`` instances share the store (two processes, each knowing only what
it saw); steps go through either, and two appends to two sessions may run at once (the
outcome must then be the reference's for one order of them).
Sessions have a TTL, and the clock moves: an expired session is deleted from the
reference (the documented "expired means absent"; the in-memory service has no TTL).
Both services run on one clock (ADK's ``platform.time`` and the service's ``clock``) and one
id source for generated session ids.

Normalizations, each a documented difference (docs/integrations/google-adk.md):

- ``last_update_time`` is "the store's time of the session's last change (the service's
  clock)"; the in-memory service takes the appended event's own timestamp. Events here carry
  timestamps a little off the clock (to exercise ``after_timestamp``), so ours is checked
  against the clock reading of the session's last change, and listings against the order
  that time gives ("Sessions come oldest update first"; ties by user id, then session id,
  as the in-memory service sorts).
- Listed sessions "carry no events and no state" here (the in-memory service fills in the
  state): the listing is compared by ids and times only.
- An append to a session deleted meanwhile raises ``SessionNotFoundError`` in both, but the
  event's ``temp:`` keys reach our object ("as with ADK's database service"), not the
  in-memory service's: that object is dropped.
- "Stale session objects refused": an append on a session object another append overtook
  (or whose session was deleted and created again) raises ``StaleSessionError`` here, where
  the in-memory service appends. Such calls are checked against that rule alone (and the
  object, which then holds the event's ``temp:`` keys, is dropped).
- An event sent again is looked for among the events the session object holds, where the
  in-memory service looks among the stored ones (which differ for an object read with a
  ``GetSessionConfig``), and compared without its ``temp:`` keys: so it is sent again here
  only to objects holding it, and with extra ``temp:`` keys it is checked alone.
- Values that are not JSON (a tuple, a datetime) "are stored as their JSON form and read
  back as such, as with ADK's database service": state and events are compared in JSON form.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest

pytest.importorskip("google.adk")

import pydantic_core
from anyio.from_thread import BlockingPortal, start_blocking_portal
from google.adk.errors import StaleSessionError
from google.adk.errors.already_exists_error import AlreadyExistsError
from google.adk.errors.session_not_found_error import SessionNotFoundError
from google.adk.events.event import Event
from google.adk.events.event_actions import EventActions
from google.adk.platform import time as platform_time
from google.adk.platform import uuid as platform_uuid
from google.adk.sessions import InMemorySessionService, Session
from google.adk.sessions.base_session_service import GetSessionConfig
from google.genai import types
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fastcheckpoint.errors import SerializationError
from fastcheckpoint.integrations.google_adk import FastSessionService
from fastcheckpoint.stores import CheckpointStore
from tests._helpers import FakeClock, make_store

T = TypeVar("T")

APPS = ("calc", "a/b:ü")
USERS = ("ada", "bo/%", "ü" * 150)  # the last one's labels are hashes (over 256 bytes)
SESSION_IDS = ("s1", "s2", "ü 3")
Key = tuple[str, str, str]
TTL = 10.1

texts = st.text(max_size=6) | st.sampled_from(["", "Héllo ✓", "\u0000", "😀", "x" * 200])
json_scalars = (st.none() | st.booleans() | texts | st.integers(-(2 ** 70), 2 ** 70)
                | st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=2),
    max_leaves=6)
# Values JSON cannot hold as they are: stored as their JSON form (documented).
values = json_values | st.sampled_from(
    [(1, "two"), datetime.datetime(2024, 5, 1, 12, 30, tzinfo=datetime.timezone.utc)])
state_keys = st.sampled_from(
    ["k", "n", "ü", "app:k", "app:n", "user:k", "user:n", "temp:k", "temp:n", "app:", "user:"])
states = st.dictionaries(state_keys, values, max_size=4)
offsets = st.sampled_from([0.0, 0.0, 0.0, -2.0, -0.5, 1.0])


def jsonish(value: Any) -> Any:
    """``value`` as its JSON form, types spelled out (``1`` is not ``1.0`` nor ``True``)."""
    return typed(pydantic_core.from_json(pydantic_core.to_json(value)))


def typed(value: Any) -> Any:
    if isinstance(value, dict):
        return ("object", sorted((key, typed(item)) for key, item in value.items()))
    if isinstance(value, list):
        return ("array", [typed(item) for item in value])
    if isinstance(value, float):
        return ("float", value.hex())
    return (type(value).__name__, value)


def events_of(session: Session) -> Any:
    return jsonish([event.model_dump(mode="json") for event in session.events])


def contents(session: Session) -> dict[str, Any]:
    """What a caller sees of a session, but its ``last_update_time`` (checked apart)."""
    return {"id": session.id, "app": session.app_name, "user": session.user_id,
            "state": jsonish(session.state), "events": events_of(session)}


@dataclasses.dataclass
class Life:
    """What the model knows of a stored session: which life it is in (a session deleted
    and created again is a new one), how many events it stored in it, when it changed."""

    life: int
    revision: int
    changed_at: float
    events: list[Event] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(eq=False)
class Handle:
    """A session object of each service, got together, and the life and revision it
    reflects."""

    key: Key
    ours: Session
    reference: Session
    life: int
    revision: int


class ServiceMachine(RuleBasedStateMachine):
    """Subclasses pick the store (:meth:`open_stores`)."""

    STORE_KIND = "memory"
    TIME_SCALE = 1.0
    """The TTL and every clock move are multiplied by it: a store whose expiry also runs on
    another clock (Redis's own) sets it so that clock never gets there while a machine
    runs."""

    def __init__(self) -> None:
        super().__init__()
        self._exit = ExitStack()
        self.portal: BlockingPortal = self._exit.enter_context(
            start_blocking_portal(backend="asyncio"))
        self.directory = Path(tempfile.mkdtemp(prefix="fastcheckpoint-adk-diff-"))
        self._exit.callback(shutil.rmtree, self.directory, ignore_errors=True)
        self.clock = FakeClock()
        self.stores: list[CheckpointStore] = []
        try:
            self.stores = self.open_stores()
        except BaseException:
            self._exit.close()  # hypothesis calls teardown only on a machine it got
            raise
        self.store = self.stores[0]
        self.ttl = TTL * self.TIME_SCALE
        # Two services on one store: two processes, each knowing only what it saw.
        self.services = tuple(
            FastSessionService(self.stores[index % len(self.stores)], ttl_seconds=self.ttl,
                               clock=self.clock)
            for index in range(2))
        self.ours = self.services[0]
        self.reference = InMemorySessionService()
        self.lives: dict[Key, Life] = {}
        self.handles: list[Handle] = []
        self.lives_begun = 0
        self.generated = itertools.count()
        self.next_id = "gen"
        """The id both services generate for a session created without one."""
        self.event_ids = itertools.count()

    def call(self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """``func`` in the portal, with ADK's clock (event timestamps, the in-memory
        service's times) on the machine's clock."""

        async def on_clock() -> T:
            platform_time.set_time_provider(self.clock)
            platform_uuid.set_id_provider(lambda: self.next_id)
            return await func(*args, **kwargs)

        return self.portal.call(on_clock)

    def both(self, name: str, *args: Any, via: int = 0, **kwargs: Any) -> tuple[Any, Any]:
        """``name`` called on both services (``via``: which of ours): (ours, reference),
        each a result or the exception it raised."""
        outcomes = []
        for service in (self.services[via], self.reference):
            try:
                outcomes.append(self.call(getattr(service, name), *args, **kwargs))
            except Exception as exc:  # compared below
                outcomes.append(exc)
        return outcomes[0], outcomes[1]

    def open_stores(self) -> list[CheckpointStore]:
        """The stores of the two services, all over one backing (with two, each service
        has a store object of its own, as another process would). Callbacks it puts on
        ``self._exit`` (removing the backing) run after the stores are closed."""
        return [make_store(self.STORE_KIND, self.directory, fsync=False)]

    def teardown(self) -> None:
        try:
            for store in self.stores:
                self.call(store.aclose)
        finally:
            self._exit.close()

    def live(self, key: Key) -> Life | None:
        return self.lives.get(key)

    def check_session(self, ours: Session, reference: Session, key: Key) -> None:
        assert contents(ours) == contents(reference)
        life = self.lives[key]
        assert ours.last_update_time == life.changed_at

    def check_read(self, ours: object, reference: object, key: Key) -> Life | None:
        """Both reads agree with each other and with the model: ``None`` for a session
        that is not (or no longer) live."""
        life = self.live(key)
        if life is None:
            assert (ours, reference) == (None, None)
            return None
        assert isinstance(ours, Session), ours
        assert isinstance(reference, Session), reference
        self.check_session(ours, reference, key)
        return life

    # -- rules ------------------------------------------------------------------------------

    @rule(via=st.sampled_from([0, 1]), app=st.sampled_from(APPS), user=st.sampled_from(USERS),
          session_id=st.none() | st.sampled_from([*SESSION_IDS, "", "  ", " s1 "]),
          state=states)
    def create_session(self, via: int, app: str, user: str, session_id: str | None,
                       state: dict[str, Any]) -> None:
        generated = self.next_id = f"gen-{next(self.generated)}"
        ours, reference = self.both("create_session", via=via, app_name=app, user_id=user,
                                    state=dict(state), session_id=session_id)
        key = (app, user, (session_id or "").strip() or generated)
        if key in self.lives:
            assert isinstance(ours, AlreadyExistsError), ours
            assert isinstance(reference, AlreadyExistsError), reference
            return
        assert isinstance(ours, Session), ours
        assert isinstance(reference, Session), reference
        self.lives_begun += 1
        self.lives[key] = Life(self.lives_begun, 0, self.clock.now)
        self.check_session(ours, reference, key)
        self.handles.append(Handle(key, ours, reference, self.lives_begun, 0))

    def known_keys(self) -> list[Key]:
        return sorted({*self.lives, *(handle.key for handle in self.handles)})

    @precondition(lambda self: self.lives or self.handles)
    @rule(via=st.sampled_from([0, 1]), data=st.data(),
          num_recent=st.none() | st.integers(0, 4),
          after=st.none() | st.sampled_from([-3.0, -1.0, -0.5, 0.0, 0.5]),
          spaces=st.booleans())
    def get_session(self, via: int, data: st.DataObject, num_recent: int | None,
                    after: float | None, spaces: bool) -> None:
        key = data.draw(st.sampled_from(self.known_keys()))
        app, user, session_id = key
        config = None
        if num_recent is not None or after is not None:
            config = GetSessionConfig(
                num_recent_events=num_recent,
                after_timestamp=None if after is None else self.clock.now + after)
        ours, reference = self.both("get_session", via=via, app_name=app, user_id=user,
                                    session_id=f" {session_id} " if spaces else session_id,
                                    config=config)
        life = self.check_read(ours, reference, key)
        if life is not None:
            assert isinstance(ours, Session)
            assert isinstance(reference, Session)
            self.handles.append(Handle(key, ours, reference, life.life, life.revision))

    @rule(app=st.sampled_from(APPS), user=st.sampled_from([*USERS, ""]),
          session_id=st.sampled_from([*SESSION_IDS, "", "  "]))
    def get_missing_or_not(self, app: str, user: str, session_id: str) -> None:
        ours, reference = self.both("get_session", app_name=app, user_id=user,
                                    session_id=session_id)
        self.check_read(ours, reference, (app, user, session_id.strip()))

    @precondition(lambda self: self.handles)
    @rule(via=st.sampled_from([0, 1]), data=st.data(), delta=states, offset=offsets,
          partial=st.booleans(),
          author=st.sampled_from(["user", "agent"]), text=texts,
          again=st.sampled_from(["no", "no", "no", "held", "held-with-temp", "id-only"]))
    def append_event(self, via: int, data: st.DataObject, delta: dict[str, Any], offset: float,
                     partial: bool, author: str, text: str, again: str) -> None:
        handle = data.draw(st.sampled_from(self.handles))
        life = self.live(handle.key)
        held = handle.ours.events
        if again != "no" and held:
            sent = data.draw(st.sampled_from(held)).model_copy(deep=True)
            if again == "held-with-temp":
                sent.actions.state_delta = {**sent.actions.state_delta, "temp:again": 1}
            elif again == "id-only":  # another event that happens to share an id
                sent = sent.model_copy(update={"author": "other", "partial": None})
        else:
            content = types.Content(role="user" if author == "user" else "model",
                                    parts=[types.Part(text=text)])
            sent = Event(id=f"e{next(self.event_ids)}", author=author, invocation_id="inv",
                         content=content, timestamp=self.clock.now + offset,
                         partial=partial or None,
                         actions=EventActions(state_delta=dict(delta)))
        stale = not sent.partial and life is not None and (
            (handle.life, handle.revision) != (life.life, life.revision))
        if stale:
            # Documented: refused here; the in-memory service would append.
            with pytest.raises(StaleSessionError):
                self.call(self.services[via].append_event, handle.ours, sent)
            self.handles.remove(handle)
            return
        if again == "held-with-temp" and held and life is not None and not stale:
            # Documented: an event equal to a held one but for its temp: keys (never
            # stored) is sent again, so stores nothing; the in-memory service compares
            # them too, and stores it a second time. Its temp: keys reach the object.
            returned = self.call(self.services[via].append_event, handle.ours, sent)
            assert returned.actions.state_delta.get("temp:again") is None
            handle.reference.state["temp:again"] = 1
            assert contents(handle.ours) == contents(handle.reference)
            return
        before = len(handle.reference.events)
        ours = self.call_append(self.services[via], handle.ours, sent.model_copy(deep=True))
        reference = self.call_append(self.reference, handle.reference,
                                     sent.model_copy(deep=True))
        if life is None:
            assert isinstance(ours, SessionNotFoundError) or sent.partial, ours
            assert isinstance(reference, SessionNotFoundError) or sent.partial, reference
            if not sent.partial:
                # Documented: the event's temp: keys reach our object (as with ADK's
                # database service); the in-memory service checks the session first.
                self.handles.remove(handle)
            return
        assert isinstance(ours, Event), ours
        assert isinstance(reference, Event), reference
        assert jsonish(ours.model_dump(mode="json")) == jsonish(
            reference.model_dump(mode="json"))
        assert contents(handle.ours) == contents(handle.reference)
        if len(handle.reference.events) > before:  # stored
            life.revision += 1
            life.changed_at = self.clock.now
            life.events.append(ours)
            handle.revision = life.revision
            assert handle.ours.last_update_time == life.changed_at

    def current(self) -> list[Handle]:
        """Handles an append may go through: live sessions, objects at their revision."""
        return [handle for handle in self.handles
                if (life := self.live(handle.key)) is not None
                and (handle.life, handle.revision) == (life.life, life.revision)]

    @precondition(lambda self: len({handle.key for handle in self.current()}) >= 2)
    @rule(data=st.data(), deltas=st.lists(st.dictionaries(
        st.sampled_from(["k", "app:k", "app:n", "user:k", "user:n"]), json_scalars,
        min_size=1, max_size=3), min_size=2, max_size=2))
    def concurrent_appends(self, data: st.DataObject, deltas: list[dict[str, Any]]) -> None:
        """Two processes append to two sessions at the same time: both land, and app and
        user state are the reference's for one order of the two appends."""
        first = data.draw(st.sampled_from(self.current()))
        second = data.draw(st.sampled_from(
            [handle for handle in self.current() if handle.key != first.key]))
        events = [Event(id=f"e{next(self.event_ids)}", author="agent", invocation_id="inv",
                        timestamp=self.clock.now, actions=EventActions(state_delta=delta))
                  for delta in deltas]

        async def together() -> None:
            platform_time.set_time_provider(self.clock)
            async with anyio.create_task_group() as group:
                for via, (handle, sent) in enumerate(zip((first, second), events, strict=True)):
                    group.start_soon(self.services[via].append_event, handle.ours,
                                     sent.model_copy(deep=True))

        self.portal.call(together)
        apps_users = {(handle.key[0], handle.key[1]) for handle in (first, second)}
        seen = {(app, user): jsonish(self.call(self.ours.get_user_state, app_name=app,
                                               user_id=user))
                for app, user in apps_users}
        app_states = {app: jsonish(self.app_state(app)) for app, _ in apps_users}
        for order in ((0, 1), (1, 0)):
            users = {pair: dict(self.call(self.reference.get_user_state, app_name=pair[0],
                                          user_id=pair[1])) for pair in apps_users}
            apps = {app: dict(self.reference.app_state.get(app, {})) for app, _ in apps_users}
            for index in order:
                handle = (first, second)[index]
                for key, value in deltas[index].items():
                    if key.startswith("user:"):
                        users[handle.key[:2]][key.removeprefix("user:")] = value
                    elif key.startswith("app:"):
                        apps[handle.key[0]][key.removeprefix("app:")] = value
            if ({pair: jsonish(state) for pair, state in users.items()} == seen
                    and {app: jsonish(state) for app, state in apps.items()} == app_states):
                for index in order:
                    handle, sent = (first, second)[index], events[index]
                    self.call(self.reference.append_event, handle.reference,
                              sent.model_copy(deep=True))
                    life = self.lives[handle.key]
                    life.revision += 1
                    life.changed_at = self.clock.now
                    life.events.append(sent)
                    handle.revision = life.revision
                assert contents(first.ours) == contents(first.reference)
                assert contents(second.ours) == contents(second.reference)
                return
        raise AssertionError(f"no order of the appends gives {seen!r:.300}, {app_states!r:.300}")

    def app_state(self, app: str) -> dict[str, Any]:
        """The app's state as our service reads it (through any of its sessions)."""
        key = next(key for key in self.lives if key[0] == app)
        session = self.call(self.ours.get_session, app_name=key[0], user_id=key[1],
                            session_id=key[2])
        assert session is not None
        return {key.removeprefix("app:"): value for key, value in session.state.items()
                if key.startswith("app:")}

    def call_append(self, service: Any, session: Session, event: Event) -> Any:
        try:
            return self.call(service.append_event, session, event)
        except Exception as exc:  # compared by the caller
            return exc

    @precondition(lambda self: self.lives or self.handles)
    @rule(via=st.sampled_from([0, 1]), data=st.data(), spaces=st.booleans())
    def delete_session(self, via: int, data: st.DataObject, spaces: bool) -> None:
        app, user, session_id = key = data.draw(st.sampled_from(self.known_keys()))
        ours, reference = self.both("delete_session", via=via, app_name=app, user_id=user,
                                    session_id=f" {session_id}" if spaces else session_id)
        assert (ours, reference) == (None, None)
        self.lives.pop(key, None)

    @rule(via=st.sampled_from([0, 1]), app=st.sampled_from(APPS),
          user=st.none() | st.sampled_from(USERS))
    def list_sessions(self, via: int, app: str, user: str | None) -> None:
        ours, reference = self.both("list_sessions", via=via, app_name=app, user_id=user)
        assert all(session.events == [] and session.state == {} for session in ours.sessions)
        assert all(session.events == [] for session in reference.sessions)
        expected = sorted(
            (self.lives[app, session.user_id, session.id].changed_at, session.user_id,
             session.id) for session in reference.sessions)
        assert [(session.last_update_time, session.user_id, session.id)
                for session in ours.sessions] == expected
        assert all(session.app_name == app for session in ours.sessions)

    @rule(via=st.sampled_from([0, 1]), app=st.sampled_from(APPS), user=st.sampled_from(USERS))
    def get_user_state(self, via: int, app: str, user: str) -> None:
        ours, reference = self.both("get_user_state", via=via, app_name=app, user_id=user)
        assert jsonish(ours) == jsonish(reference)

    @rule(seconds=st.sampled_from([0.0, 0.25, 1.0, 3.0, 12.0]))
    def advance_clock(self, seconds: float) -> None:
        """Time passes: a session unchanged for ``TTL`` seconds expires ("expired means
        absent": the reference deletes it). Steps are multiples of 0.25 and ``TTL`` is
        not, so no expiry falls on a boundary."""
        self.clock.advance(seconds * self.TIME_SCALE)
        for key, life in list(self.lives.items()):
            if self.clock.now >= life.changed_at + self.ttl:
                self.call(self.reference.delete_session, app_name=key[0], user_id=key[1],
                          session_id=key[2])
                del self.lives[key]

    @invariant()
    def every_session_reads_the_same(self) -> None:
        for key in self.known_keys():
            ours, reference = self.both("get_session", via=len(key[2]) % 2, app_name=key[0],
                                        user_id=key[1], session_id=key[2])
            self.check_read(ours, reference, key)


MACHINE_SETTINGS = settings(
    max_examples=10,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class MemoryServiceMachine(ServiceMachine):
    STORE_KIND = "memory"


class FileServiceMachine(ServiceMachine):
    STORE_KIND = "file"


TestFastSessionServiceOnMemoryStore = MemoryServiceMachine.TestCase
TestFastSessionServiceOnMemoryStore.settings = MACHINE_SETTINGS
TestFastSessionServiceOnFileStore = FileServiceMachine.TestCase
TestFastSessionServiceOnFileStore.settings = MACHINE_SETTINGS


# -- regressions found by the machines above --------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["memory", "file"])
async def test_an_event_sent_again_checks_the_session_is_still_there(
    kind: str, tmp_path: Path
) -> None:
    """An event held already was taken as stored on the head this process remembered, with
    no read: after another process deleted the session, the call "succeeded" (the in-memory
    service raises SessionNotFoundError), and on an object another process overtook it did
    not raise StaleSessionError as documented."""
    store = make_store(kind, tmp_path, fsync=False)
    mine, other = FastSessionService(store), FastSessionService(store)  # two processes
    sent = Event(id="e0", author="user", invocation_id="inv")
    try:
        gone = await mine.create_session(app_name="a", user_id="u", session_id="gone")
        await mine.append_event(gone, sent.model_copy(deep=True))
        await other.delete_session(app_name="a", user_id="u", session_id="gone")
        with pytest.raises(SessionNotFoundError):
            await mine.append_event(gone, sent.model_copy(deep=True))

        overtaken = await mine.create_session(app_name="a", user_id="u", session_id="moved")
        await mine.append_event(overtaken, sent.model_copy(deep=True))
        theirs = await other.get_session(app_name="a", user_id="u", session_id="moved")
        assert theirs is not None
        await other.append_event(theirs, Event(id="e1", author="user", invocation_id="inv"))
        with pytest.raises(StaleSessionError):
            await mine.append_event(overtaken, sent.model_copy(deep=True))

        # Still current: sent again, it stores nothing.
        current = await mine.get_session(app_name="a", user_id="u", session_id="moved")
        assert current is not None
        await mine.append_event(current, current.events[0].model_copy(deep=True))
        stored = await other.get_session(app_name="a", user_id="u", session_id="moved")
        assert stored is not None
        assert [event.id for event in stored.events] == ["e0", "e1"]
    finally:
        await store.aclose()


@pytest.mark.anyio
async def test_an_event_sent_again_is_looked_for_among_the_events_the_object_holds(
    tmp_path: Path,
) -> None:
    """Documented difference: the in-memory service finds an event sent again among the
    stored events, this service among those the session object holds. An object read with
    a GetSessionConfig that left the event out stores it a second time."""
    for service in (InMemorySessionService(), FastSessionService(make_store("memory",
                                                                            tmp_path))):
        session = await service.create_session(app_name="a", user_id="u", session_id="s")
        first = Event(id="e0", author="user", invocation_id="inv", timestamp=1.0)
        await service.append_event(session, first.model_copy(deep=True))
        await service.append_event(
            session, Event(id="e1", author="user", invocation_id="inv", timestamp=2.0))
        recent = await service.get_session(app_name="a", user_id="u", session_id="s",
                                           config=GetSessionConfig(num_recent_events=1))
        assert recent is not None
        await service.append_event(recent, first.model_copy(deep=True))
        stored = await service.get_session(app_name="a", user_id="u", session_id="s")
        assert stored is not None
        expected = (["e0", "e1"] if isinstance(service, InMemorySessionService)
                    else ["e0", "e1", "e0"])
        assert [event.id for event in stored.events] == expected


@pytest.mark.anyio
async def test_a_lone_surrogate_is_refused_before_anything_is_stored(tmp_path: Path) -> None:
    """Documented difference: a string holding a lone surrogate (not Unicode text) raises
    SerializationError, in state or in an event, with nothing stored; the in-memory service
    keeps it."""
    service = FastSessionService(make_store("memory", tmp_path))
    with pytest.raises(SerializationError):
        await service.create_session(app_name="a", user_id="u", session_id="s",
                                     state={"user:k": "half a pair: \ud83d"})
    assert await service.get_session(app_name="a", user_id="u", session_id="s") is None
    assert await service.get_user_state(app_name="a", user_id="u") == {}
    session = await service.create_session(app_name="a", user_id="u", session_id="s")
    text = types.Content(role="user", parts=[types.Part(text="\udc00")])
    for sent in (Event(author="user", actions=EventActions(state_delta={"k": "\ud800"})),
                 Event(author="user", content=text)):
        with pytest.raises(SerializationError):
            await service.append_event(session, sent)
    await service.append_event(session, Event(author="user"))  # the object goes on
    stored = await service.get_session(app_name="a", user_id="u", session_id="s")
    assert stored is not None
    assert (len(stored.events), stored.state) == (1, {})
