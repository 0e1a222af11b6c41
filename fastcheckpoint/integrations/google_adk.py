"""A Google ADK session service on any fastcheckpoint store.

``FastSessionService`` is a ``google.adk.sessions.BaseSessionService``: pass it as
``Runner(session_service=...)``. A session is one entry log (see
``fastcheckpoint.integrations._entrylog``): its events are the entries, each ADK ``Event`` as
its own JSON, and its state (without ``app:``, ``user:`` and ``temp:`` keys) is the log's
state. App state and user state are one log each, holding only a state, changed by
compare-and-set.

An event's changes of app and user state cannot be written in the event's store call (they
live in other logs): the session's state carries them as *pending*, each with a random id,
written atomically with the event, and they are applied to the app's and the user's state
after it. Those states keep the ids of the last ``_APPLIED_KEPT`` changes applied to them,
and per key the order of the change that set it (the service's clock, or just above the
highest order its process saw for the key). The writer applies its own change at once, as
the last compare-and-set wins: every key, ordered above the key's order, unless the id
shows the change applied already. Whoever else finds a change pending (the next
``get_session`` or ``append_event`` of the session, in any process, also when a process
failed or died in between) applies it unless its id is there, and then only to keys whose
order is lower than the change's: a late change never undoes one ordered after it. A key's
order never goes down, so a change applied once changes nothing when applied again by that
rule, also after its id has left the list. A slow writer whose change a reader applied
applies it again only when ``_APPLIED_KEPT`` other changes of that state came in between
(see the guide).
An append drops from the session what it knows to have been applied.

Sessions appear in ``fastcheckpoint runs`` and ``show`` under the run id
``google-adk:<app>/<user>/<session>`` (names percent-encoded; see
``fastcheckpoint.integrations._google_adk_names``).

Costs in store calls, in steady state (a process appending to a session it created, read or
appended to before): ``append_event`` 1, whatever the session's length (the event, plus the
session state when the event changes it), plus 1 for app state and 1 for user state when the
event changes them; ``get_session`` 3 (session, app state, user state, read concurrently);
``create_session`` 3 (the same); ``list_sessions`` 1 per page of ``page_size`` sessions, and
never reads events or state; ``delete_session`` 1; ``get_user_state`` 1. Applying a change
found pending costs 1 write of the app's or the user's state (and a read first in
``append_event`` when this process has not seen that state); one found applied costs nothing.
In processor time too an append costs the new event, not the session's history: the events a
session object holds are indexed by id once (see ``_HeldEvents``).

Needs ``pip install 'fastcheckpoint[google-adk]'`` and a store with labels and shared items
(every bundled store).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import secrets
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from types import TracebackType
from typing import Any, NamedTuple, cast

import anyio
import msgspec

from fastcheckpoint._config import CheckpointConfig
from fastcheckpoint._gather import gather
from fastcheckpoint._settle import settled
from fastcheckpoint._validate import shown
from fastcheckpoint.errors import (
    ConfigurationError,
    ConflictError,
    CorruptCheckpointError,
    SerializationError,
    StoreError,
    ValidationError,
)
from fastcheckpoint.integrations import _google_adk_names as names
from fastcheckpoint.integrations._adapter import adapter_ttl, capable_store
from fastcheckpoint.integrations._entrylog import EntryLog, LogHead, LogView, StaleLog
from fastcheckpoint.stores import (
    CheckpointStore,
    SupportsLabels,
    purge_all,
)

try:
    import pydantic
    import pydantic_core
    from google.adk.errors import StaleSessionError
    from google.adk.errors.already_exists_error import AlreadyExistsError
    from google.adk.errors.session_not_found_error import SessionNotFoundError
    from google.adk.events.event import Event
    from google.adk.events.event_actions import EventActions
    from google.adk.platform import uuid as platform_uuid
    from google.adk.sessions import BaseSessionService, Session, State
    from google.adk.sessions.base_session_service import GetSessionConfig, ListSessionsResponse
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ConfigurationError(
        "fastcheckpoint.integrations.google_adk needs the Google Agent Development Kit: "
        "pip install 'fastcheckpoint[google-adk]'") from exc

__all__ = ["FastSessionService"]

_PAGE_SIZE = 100
_REMEMBERED = 1024
"""Logs whose last seen head the service keeps (least recently used go first)."""
_SHARED_ATTEMPTS = 64
_STALE_MESSAGE = ("The session has been modified in storage since it was loaded. "
                  "Please reload the session before appending more events.")
_MARKER = "fastcheckpoint:"
_FRAMEWORK = "google-adk"
_EMPTY_STATE = b"{}"
_APPLIED_KEPT = 128
"""Ids of the changes last applied to an app's or a user's state that it keeps: a writer
whose change a reader applied, slower than this many other changes of that state, applies
its change again."""


class _Stamp(msgspec.Struct):
    """What ``get_session`` and the stale check read of a stored event without decoding it."""

    id: str = ""
    timestamp: float = 0.0


_stamp_decoder = msgspec.json.Decoder(_Stamp)


class _Deltas(NamedTuple):
    """A state change split by scope (``temp:`` keys dropped), keys without their prefix."""

    app: dict[str, Any]
    user: dict[str, Any]
    session: dict[str, Any]


class _Pending(NamedTuple):
    """A change of app and user state that a stored session carries: written with its
    event, atomically, and applied to the app's and the user's state after it."""

    order: float
    """Where the change falls among all changes of those keys for whoever applies it late
    (per key, the highest order wins): the service's clock, or just above the latest order
    its process saw."""
    app: dict[str, Any]
    user: dict[str, Any]
    id: str
    """Random; ``""`` for a change recorded before changes had ids."""


class _Change(NamedTuple):
    """A pending change of one app's or one user's state."""

    id: str
    order: float
    delta: dict[str, Any]


class _Session(NamedTuple):
    """A session's stored state: its own keys, and changes of shared state it carries."""

    state: dict[str, Any]
    pending: list[_Pending]


class _Shared(NamedTuple):
    """An app's or a user's stored state, with the order of the change that set each key
    (keys written before orders were kept have none: any change orders after them) and the
    ids of the changes last applied to it, oldest first."""

    state: dict[str, Any]
    orders: dict[str, float]
    applied: list[str]


class _Head(NamedTuple):
    """A log's head as this process saw it: the revision within the log's life (a deleted
    session created again under its id is a new life, its revisions starting at 0)."""

    revision: int
    incarnation: str


class _OldMark(NamedTuple):
    """A head as the previous release marked it, by the time its life began: two lives
    begun at one clock reading look the same."""

    revision: int
    created_at: float


_ABSENT = _Head(-1, "")


@dataclasses.dataclass(eq=False)
class _Tracked:
    """A log and what this process last saw of it."""

    log: EntryLog
    head: _Head | None = None
    """``None``: unknown; revision -1: the log did not exist."""
    state: bytes | None = None
    """The stored state at ``head`` (``None``: unknown)."""
    tried: tuple[_Head, bytes] | None = None
    """The head and state of the session's last append whose store call failed: the same
    event made again on a session object at that head makes the same change, which the log
    recognises, whatever this process read or appended of the session meanwhile."""

    def saw(self, head: _Head, state: bytes | None) -> None:
        self.head, self.state = head, state

    def saw_view(self, view: LogView | None) -> tuple[_Head, bytes]:
        head = _ABSENT if view is None else _Head(view.revision, view.incarnation)
        state = _EMPTY_STATE if view is None else view.state or _EMPTY_STATE
        self.head, self.state = head, state
        return head, state

    def known(self) -> tuple[_Head, bytes] | None:
        if self.head is None or self.state is None:
            return None
        return self.head, self.state

    def forget(self) -> None:
        self.head, self.state = None, None


class _HeldEvents:
    """Where each event a session object holds sits in its ``events``, by id: what an
    append reads to find an event held already (a call made again), so that it does not walk
    the session's history. Built once per session object (walking its events, each checked to
    be an ``Event``); it describes ``events`` while that is the same list with as many items
    as the index has seen (appends through the service keep it so). A list replaced or
    changed in length by its caller is indexed again; an item replaced or changed in place
    (pydantic checks no assignment) is not, and is checked when an append reads it."""

    def __init__(self, events: list[Any]) -> None:
        self._events = events
        self._count = 0
        self._positions: dict[str, list[int]] = {}
        for held in events:
            self._add(_checked_held(held))

    def describes(self, events: list[Any]) -> bool:
        return events is self._events and len(events) == self._count

    def holds(self, event: Event) -> bool:
        """Whether an event equal to ``event`` (its id and fields) is held."""
        positions = self._positions.get(event.id, ()) if isinstance(event.id, str) else ()
        return any(_checked_held(self._events[position]) == event for position in positions)

    def added(self, events: list[Any], event: Event) -> None:
        """Record ``event``, just appended to ``events``; an index that no longer describes
        them (the caller changed them meanwhile) is left to be built again."""
        if events is self._events and len(events) == self._count + 1:
            self._add(event)
        else:
            self._count = -1

    def _add(self, event: Event) -> None:
        if isinstance(event.id, str):  # one of another type cannot equal a valid event
            self._positions.setdefault(event.id, []).append(self._count)
        self._count += 1


def _checked_held(held: object) -> Event:
    if not isinstance(held, Event):
        raise ValidationError("session.events must be a list of ADK Events")
    return held


def _forget_held(
    table: dict[int, tuple[weakref.ref[Session], _HeldEvents]], key: int,
    ref: weakref.ref[Session],
) -> None:
    """Drop the index of a session object that is gone (unless one of a newer object that
    took its ``id`` replaced it)."""
    if (entry := table.get(key)) is not None and entry[0] is ref:
        del table[key]


@dataclasses.dataclass(eq=False)
class _Lock:
    lock: anyio.Lock
    users: int = 0


class FastSessionService(BaseSessionService):
    """An ADK session service on a fastcheckpoint store (or a store URL).

    ``ttl_seconds``: a session expires that long after its last change (creation or
    ``append_event``; ``None``: the store's default TTL, else never); an expired session is
    absent everywhere. App state and user state never expire. ``page_size``: sessions
    ``list_sessions`` reads per store call. ``clock``: epoch seconds, for timestamps and
    expiry (tests move it by hand).

    Raises what ADK's session services raise where its interface says so
    (``AlreadyExistsError``, ``SessionNotFoundError``, ``StaleSessionError``); everything else
    is a :class:`fastcheckpoint.errors.CheckpointError`. ``async with`` (or :meth:`aclose`)
    closes the store when the service opened it from a URL; a store object stays open.
    """

    def __init__(
        self,
        store: CheckpointStore | str,
        *,
        ttl_seconds: float | None = None,
        page_size: int = _PAGE_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = capable_store(store, CheckpointConfig().retry, "the ADK session service")
        self._owns_store = isinstance(store, str)
        self._ttl = adapter_ttl(ttl_seconds, self._store)
        self._page_size = _page_size(page_size)
        if not callable(clock):
            raise ConfigurationError(f"clock must be callable, got {type(clock).__name__}")
        self._clock = clock
        self._tracked: OrderedDict[str, _Tracked] = OrderedDict()
        self._locks: dict[str, _Lock] = {}
        self._held: dict[int, tuple[weakref.ref[Session], _HeldEvents]] = {}
        """The index of each live session object's events, by the object's ``id`` (a
        ``Session`` is not hashable); an object's entry goes with it."""
        self._last_order = -math.inf

    @property
    def store(self) -> CheckpointStore:
        return self._store

    @property
    def ttl_seconds(self) -> float | None:
        return self._ttl

    async def __aenter__(self) -> FastSessionService:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the store if this service opened it (from a URL)."""
        self._tracked.clear()
        if self._owns_store:
            await self._store.aclose()

    async def cleanup_expired(self, *, batch_size: int = 500) -> int:
        """Remove what expired (sessions past their TTL) from the store now; returns how many
        checkpoints were removed. Expired sessions are absent whether or not this runs."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValidationError(f"batch_size must be a positive integer, got {shown(batch_size)}")
        return await purge_all(self._store, clock=self._clock, batch_size=batch_size)

    # -- sessions ---------------------------------------------------------------------------

    async def create_session(
        self,
        *,
        app_name: str,
        user_id: str,
        state: dict[str, Any] | None = None,
        session_id: str | None = None,
    ) -> Session:
        """Create a session (a fresh id unless ``session_id``); ``app:`` and ``user:`` keys
        of ``state`` go to the app's and the user's state, ``temp:`` keys are dropped.

        Raises ``google.adk.errors.already_exists_error.AlreadyExistsError`` when a live
        session has that id. Spaces around an id are dropped (here and in ``get_session``
        and ``delete_session``), as ADK's in-memory service does.
        """
        session_id = _session_id(session_id) or platform_uuid.new_uuid()
        deltas = _split(_state_arg("state", state))
        tracked = self._session_log(app_name, user_id, session_id)
        app, user = self._app_log(app_name), self._user_log(app_name, user_id)
        _check_shared(deltas)
        pending = self._pending(app, user, deltas)
        encoded = _encode_session(deltas.session, pending)
        # The session (with its app: and user: changes as pending), then the app's and the
        # user's state: all of it whatever cancels the caller once it is under way (settled).
        created = await settled(self._created(tracked, encoded, app, user, pending))
        if created is None:
            raise AlreadyExistsError(f"Session with id {session_id} already exists.")
        head, app_state, user_state = created
        session = Session(
            id=session_id, app_name=app_name, user_id=user_id,
            state=_merged(_decode_session(encoded, tracked.log.run_id).state, app_state,
                          user_state),
            last_update_time=head.updated_at)
        _mark(session, _head(head))
        self._held_events(session)
        return session

    async def _created(
        self, tracked: _Tracked, encoded: bytes, app: _Tracked, user: _Tracked,
        pending: list[_Pending],
    ) -> tuple[Any, dict[str, Any], dict[str, Any]] | None:
        """The new session's log head and the app's and user's states after its pending
        changes; ``None`` when a live session has the id."""
        try:
            head = await tracked.log.append((), state=encoded, expect=-1)
        except StaleLog:
            tracked.forget()
            return None
        tracked.saw(_head(head), encoded)
        own = pending[0].id if pending else None
        app_state, user_state = await self._shared_states(app, user, pending, own=own)
        return head, app_state, user_state

    async def get_session(
        self,
        *,
        app_name: str,
        user_id: str,
        session_id: str,
        config: GetSessionConfig | None = None,
    ) -> Session | None:
        """The session with its events (``config`` keeps those at or after
        ``after_timestamp``, then the ``num_recent_events`` newest of them) and its state
        merged with the app's and the user's; ``None`` when there is no live session. A
        change of app or user state that the session's events carry and that has not reached
        that state (its writer failed or died in between) is applied first: one write, only
        then."""
        session_id = _session_id(session_id)
        if config is not None and not isinstance(config, GetSessionConfig):
            raise ValidationError(
                f"config must be a GetSessionConfig or None, got {type(config).__name__}")
        tracked = self._session_log(app_name, user_id, session_id)
        app_log, user_log = self._app_log(app_name), self._user_log(app_name, user_id)
        view, app_view, user_view = await _read_all(tracked.log, app_log.log, user_log.log)
        tracked.saw_view(view)
        app_log.saw_view(app_view)
        user_log.saw_view(user_view)
        if view is None:
            return None
        where = tracked.log.run_id
        stored = _decode_session(view.state, where)
        # Changes of app and user state this session's events carry but that may not have
        # reached them (a process that failed or died in between) are applied now: to
        # the views just read, without a store call, when they hold them already.
        app_state, user_state = await self._shared_states(
            app_log, user_log, stored.pending, known=True)
        events = [_decode_event(entry, where)
                  for entry in _selected(view.entries, config, where)]
        session = Session(
            id=session_id, app_name=app_name, user_id=user_id,
            state=_merged(stored.state, app_state, user_state),
            events=events, last_update_time=view.updated_at)
        _mark(session, _Head(view.revision, view.incarnation))
        self._held_events(session)  # the events are walked here anyway (decoded)
        return session

    async def list_sessions(
        self, *, app_name: str, user_id: str | None = None
    ) -> ListSessionsResponse:
        """The app's sessions (of one user when ``user_id`` is given), oldest update first.

        As ``ListSessionsResponse`` documents, the sessions carry no events and no state
        (``get_session`` returns both): the listing reads the stores' label index, one call
        per ``page_size`` sessions, and no session's content.
        """
        if user_id is None:
            label, wanted = names.app_label(app_name), None
        else:
            label, wanted = names.user_label(app_name, user_id), user_id
        sessions: list[Session] = []
        cursor: str | None = None
        while True:
            page, cursor = await cast(SupportsLabels, self._store).runs_with_label(
                label, limit=self._page_size, cursor=cursor, now=self._clock())
            for record in page:
                found = names.parse_session_run_id(record.run_id)
                if found is None or found.app_name != app_name or (
                        wanted is not None and found.user_id != wanted):
                    continue
                sessions.append(Session(id=found.session_id, app_name=app_name,
                                        user_id=found.user_id,
                                        last_update_time=record.updated_at))
            if cursor is None:
                break
        sessions.sort(key=lambda session: (session.last_update_time, session.user_id,
                                           session.id))
        return ListSessionsResponse(sessions=sessions)

    async def delete_session(self, *, app_name: str, user_id: str, session_id: str) -> None:
        """Remove the session with its events (nothing happens when there is none)."""
        session_id = _session_id(session_id)
        run_id = names.session_run_id(app_name, user_id, session_id)
        tracked = self._session_log(app_name, user_id, session_id)
        await tracked.log.clear()
        self._tracked.pop(run_id, None)

    async def get_user_state(self, *, app_name: str, user_id: str) -> dict[str, Any]:
        """The user's state, keys without the ``user:`` prefix (``{}`` when none)."""
        tracked = self._user_log(app_name, user_id)
        tracked.saw_view(await tracked.log.read())
        return _shared_of(tracked).state

    async def append_event(self, session: Session, event: Event) -> Event:
        """Store ``event`` after the session's last one and apply its state change (to the
        session, and to the app's or the user's state for ``app:`` and ``user:`` keys;
        ``temp:`` keys only to this ``session`` object). Partial events are not stored, nor
        is an event equal to one ``session`` holds (the same id and fields: a call made
        again), as with ADK's in-memory service.

        A cancelled call raises its cancellation before anything is stored or once the
        event, its state changes and ``session`` are all updated: never in between.

        Raises ``google.adk.errors.StaleSessionError`` when the session changed in the
        store since ``session`` was read or last appended to (by another process or
        another session object), and
        ``google.adk.errors.session_not_found_error.SessionNotFoundError`` when it is gone.
        Then nothing is stored, and neither the event nor its state change reaches
        ``session`` (its ``temp:`` keys do, as with ADK's database service).

        A failure to change the app's or the user's state once the event is stored is
        raised, and ``session`` is left as it was; the event stays stored with that change
        pending, which the session's next read or append applies (read it again: appending
        the same event to it then stores nothing).
        """
        _check_append(session, event)
        self._held_events(session)  # a non-Event held: ValidationError, before any store call
        if event.partial:
            return event
        self._apply_temp_state(session, event)
        event = self._trim_temp_delta_state(event)
        tracked = self._session_log(session.app_name, session.user_id, session.id)
        async with self._serialized(tracked.log.run_id):
            return await settled(self._append(session, event, tracked))

    # -- the session's log ------------------------------------------------------------------

    async def _append(self, session: Session, event: Event, tracked: _Tracked) -> Event:
        deltas = _split(event.actions.state_delta)
        _check_shared(deltas)
        app, user = self._app_log(session.app_name), self._user_log(session.app_name,
                                                                    session.user_id)
        appended = await self._append_entry(session, event, tracked, deltas, app, user)
        if appended is None:
            return event
        head, pending, own = appended
        # The event is stored with its app: and user: changes as pending: from here a
        # failure or a dead process leaves them for the session's next read or append.
        for tracked_shared, changes in _changes(app, user, pending):
            if changes:
                await self._shared_state(tracked_shared, changes, own=own)
        session.last_update_time = head.updated_at
        _mark(session, _head(head))
        committed = self._commit_event_to_session(session, event)
        self._held_added(session, committed)
        return committed

    async def _append_entry(
        self, session: Session, event: Event, tracked: _Tracked, deltas: _Deltas,
        app: _Tracked, user: _Tracked,
    ) -> tuple[LogHead, list[_Pending], str | None] | None:
        """The session's head after storing ``event`` with its session delta applied to the
        session's state, the changes of app and user state the stored session now carries
        as pending (the event's, and those of earlier events this process does not know to
        have landed), and the id of the event's (``None``: it has none). ``None`` when
        ``session`` holds that event already."""
        # An event held already stores nothing, but only once the store shows the session
        # there at the head the object reflects: the head this process remembers may have
        # been deleted or overtaken by another process since (a retry must not report a
        # success on a session that is gone, nor hide that the object is stale).
        again = self._held_events(session).holds(event)
        expected, stored_state = await self._expected_head(session, tracked, read=again)
        if again:
            return None
        entry = _encode_event(event)
        stored = _decode_session(stored_state, tracked.log.run_id)
        carried = [change for change in stored.pending
                   if not (_landed(app, change.id, change.order, change.app)
                           and _landed(user, change.id, change.order, change.user))]
        own = self._pending(app, user, deltas)
        pending = carried + own
        state: bytes | None = None
        if deltas.session or pending != stored.pending:
            state = _encode_session({**stored.state, **deltas.session}, pending)
        try:
            head = await tracked.log.append((entry,), state=state, expect=expected.revision)
        except StaleLog as stale:
            tracked.forget()
            if stale.revision == -1:
                raise _not_found(session) from None
            raise StaleSessionError(_STALE_MESSAGE) from None
        except StoreError:  # maybe stored: see _Tracked.tried
            tracked.tried = expected, stored_state
            raise
        tracked.saw(_head(head), stored_state if state is None else state)
        return head, pending, own[0].id if own else None

    async def _expected_head(
        self, session: Session, tracked: _Tracked, *, read: bool = False
    ) -> tuple[_Head, bytes]:
        """The stored head ``session`` reflects, with the stored state there.

        A session this service handed out carries its head: when this process saw that head
        last, nothing is read (the append's compare-and-set catches a later change), unless
        ``read`` (no compare-and-set follows: an event held already). Else the log is read:
        it must be at that head; for a session without one (built by hand, or by another
        service) the stored events must end with the session's last event, as ADK's
        database service checks. A head marked by the previous release (which cannot
        tell apart two lives begun at one clock reading) must match, and the session must
        hold the stored newest event too: event ids are unique where clock readings are not.
        """
        marked = _marked_head(session)
        if not read and isinstance(marked, _Head):
            for known in (tracked.known(), tracked.tried):
                if known is not None and known[0] == marked:
                    return known
        view = await tracked.log.read()
        head, state = tracked.saw_view(view)
        if view is None:
            raise _not_found(session)
        if not _reflects(session, marked, view, tracked.log.run_id):
            raise StaleSessionError(_STALE_MESSAGE)
        return head, state

    def _held_events(self, session: Session) -> _HeldEvents:
        """The index of ``session``'s events: the one kept while it describes them, else a
        new one (walking them once; :class:`ValidationError` for an item not an ``Event``)."""
        key = id(session)
        entry = self._held.get(key)
        if entry is not None and entry[0]() is session and entry[1].describes(session.events):
            return entry[1]
        held = _HeldEvents(session.events)
        self._held[key] = (weakref.ref(session, functools.partial(_forget_held, self._held,
                                                                    key)), held)
        return held

    def _held_added(self, session: Session, event: Event) -> None:
        """Record ``event``, just appended to ``session.events``, in their index (stored
        already: nothing here raises)."""
        entry = self._held.get(id(session))
        if entry is not None and entry[0]() is session:
            entry[1].added(session.events, event)

    @contextlib.asynccontextmanager
    async def _serialized(self, run_id: str) -> AsyncIterator[None]:
        """One ``append_event`` at a time per session in this process (ADK's parallel agents
        share a session object: each append must see the head the previous one left)."""
        held = self._locks.setdefault(run_id, _Lock(anyio.Lock()))
        held.users += 1
        try:
            async with held.lock:
                yield
        finally:
            held.users -= 1
            if not held.users:
                del self._locks[run_id]

    # -- app and user state -----------------------------------------------------------------

    def _pending(self, app: _Tracked, user: _Tracked, deltas: _Deltas) -> list[_Pending]:
        """The change of app and user state in ``deltas`` as a pending change (none when
        there is none), ordered after every change of those keys this process has seen and
        after the last change it made."""
        if not deltas.app and not deltas.user:
            return []
        order = max(self._clock(), math.nextafter(self._last_order, math.inf))
        for tracked, delta in ((app, deltas.app), (user, deltas.user)):
            orders = _shared_of(tracked).orders if delta and tracked.known() else {}
            seen = max((orders.get(key, -math.inf) for key in delta), default=-math.inf)
            order = max(order, math.nextafter(seen, math.inf))
        self._last_order = order
        return [_Pending(order, deltas.app, deltas.user, secrets.token_urlsafe(12))]

    async def _shared_states(
        self, app: _Tracked, user: _Tracked, pending: list[_Pending], *,
        own: str | None = None, known: bool = False,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The app's and the user's state with ``pending`` applied, the change ``own`` as its
        writer applies it (read concurrently when neither changes, unless ``known``: then
        the views last seen are taken as current)."""
        if not known and not pending:
            app_view, user_view = await _read_all(app.log, user.log)
            app.saw_view(app_view)
            user.saw_view(user_view)
            return _shared_of(app).state, _shared_of(user).state
        (_, app_changes), (_, user_changes) = _changes(app, user, pending)
        return (await self._shared_state(app, app_changes, own=own, known=known),
                await self._shared_state(user, user_changes, own=own, known=known))

    async def _shared_state(
        self, tracked: _Tracked, changes: list[_Change], *, own: str | None = None,
        known: bool = False,
    ) -> dict[str, Any]:
        """The app's or the user's state after applying ``changes`` to it (see
        :func:`_applied`; ``own``: the id of the change its writer applies now). Only read
        when nothing changes (and not even then when ``known``). A compare-and-set on the
        state, retried on the new state when another session changed it first: concurrent
        changes all land, and a change found applied there is not applied again."""
        if not changes and not known:
            tracked.saw_view(await tracked.log.read())
        where = tracked.log.run_id
        for _ in range(_SHARED_ATTEMPTS):
            seen = tracked.known() or tracked.saw_view(await tracked.log.read())
            shared = _decode_shared(seen[1], where)
            changed = _applied(shared, changes, own)
            if changed is None:
                return shared.state
            encoded = _encode_shared(changed)
            try:
                head = await tracked.log.append((), state=encoded, expect=seen[0].revision)
            except StaleLog:
                tracked.forget()
                continue
            tracked.saw(_head(head), encoded)
            return changed.state
        raise ConflictError(f"could not change {where!r:.80}: other sessions changed it "
                            f"first {_SHARED_ATTEMPTS} times in a row")

    # -- logs -------------------------------------------------------------------------------

    def _session_log(self, app_name: str, user_id: str, session_id: str) -> _Tracked:
        run_id = names.session_run_id(app_name, user_id, session_id)
        return self._track(run_id, lambda: EntryLog(
            self._store, run_id,
            labels=(names.app_label(app_name), names.user_label(app_name, user_id)),
            metadata={"framework": _FRAMEWORK, "app_name": app_name, "user_id": user_id,
                      "session_id": session_id},
            # An event made again is told apart by its id: a retry of one whose store call
            # failed is recognised after reads and other session objects' appends too.
            ttl_seconds=self._ttl, clock=self._clock, keep_unsettled=True))

    def _app_log(self, app_name: str) -> _Tracked:
        run_id = names.app_state_run_id(app_name)
        return self._track(run_id, lambda: EntryLog(
            self._store, run_id,
            metadata={"framework": _FRAMEWORK, "app_name": app_name, "holds": "app state"},
            clock=self._clock))

    def _user_log(self, app_name: str, user_id: str) -> _Tracked:
        run_id = names.user_state_run_id(app_name, user_id)
        return self._track(run_id, lambda: EntryLog(
            self._store, run_id,
            metadata={"framework": _FRAMEWORK, "app_name": app_name, "user_id": user_id,
                      "holds": "user state"},
            clock=self._clock))

    def _track(self, run_id: str, build: Callable[[], EntryLog]) -> _Tracked:
        tracked = self._tracked.get(run_id)
        if tracked is None:
            tracked = self._tracked[run_id] = _Tracked(build())
            if len(self._tracked) > _REMEMBERED:
                self._tracked.popitem(last=False)
        else:
            self._tracked.move_to_end(run_id)
        return tracked


# -- construction -------------------------------------------------------------------------------


def _session_id(session_id: Any) -> Any:
    """A session id as ADK's in-memory service keys it: without spaces around it (what is
    not a ``str`` goes on to the names' own checks)."""
    return session_id.strip() if isinstance(session_id, str) else session_id


def _page_size(page_size: object) -> int:
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ConfigurationError(f"page_size must be an integer >= 1, got {page_size!r:.40}")
    return page_size


# -- reads --------------------------------------------------------------------------------------


async def _read_all(*logs: EntryLog) -> list[LogView | None]:
    """Read logs concurrently; a failure is raised alone (not in a group)."""
    return await gather([log.read for log in logs])


def _selected(
    entries: list[bytes], config: GetSessionConfig | None, where: str
) -> list[bytes]:
    """The stored events ``config`` keeps, in their stored order: every one at or after
    ``after_timestamp`` (events appended out of timestamp order too), then the
    ``num_recent_events`` newest of those (ADK's services' order)."""
    if config is None:
        return entries
    picked = entries
    if config.after_timestamp is not None:
        after = config.after_timestamp
        picked = [entry for entry in picked if _stamp(entry, where).timestamp >= after]
    if config.num_recent_events is not None:
        picked = picked[max(0, len(picked) - config.num_recent_events):]
    return picked


def _reflects(
    session: Session, marked: _Head | _OldMark | None, view: LogView, where: str
) -> bool:
    """Whether ``session``, marked ``marked``, reflects the stored session ``view``."""
    if isinstance(marked, _Head):
        return marked == (view.revision, view.incarnation)
    if isinstance(marked, _OldMark):
        return (marked == (view.revision, view.created_at) and bool(view.entries)
                and _has_seen(session, view, where))
    return view.updated_at <= session.last_update_time or _has_seen(session, view, where)


def _has_seen(session: Session, view: LogView, where: str) -> bool:
    """Whether ``session`` holds the stored session's newest event (or both hold none)."""
    if not view.entries:
        return not session.events
    return (bool(session.events)
            and _stamp(view.entries[-1], where).id == _checked_held(session.events[-1]).id)


def _stamp(entry: bytes, where: str) -> _Stamp:
    """A stored event's id and timestamp, read without decoding the rest of it."""
    try:
        return _stamp_decoder.decode(entry)
    except msgspec.DecodeError as exc:
        raise CorruptCheckpointError(f"undecodable ADK event: {exc}", key=where) from exc


def _shared_of(tracked: _Tracked) -> _Shared:
    """The app's or the user's state as ``tracked`` last saw it (empty when unknown)."""
    known = tracked.known()
    return _decode_shared(_EMPTY_STATE if known is None else known[1], tracked.log.run_id)


def _changes(
    app: _Tracked, user: _Tracked, pending: list[_Pending]
) -> tuple[tuple[_Tracked, list[_Change]], ...]:
    """``pending`` split into the changes of the app's and the user's state."""
    return ((app, [_Change(change.id, change.order, change.app)
                   for change in pending if change.app]),
            (user, [_Change(change.id, change.order, change.user)
                    for change in pending if change.user]))


def _landed(tracked: _Tracked, change_id: str, order: float, delta: Mapping[str, Any]) -> bool:
    """Whether applying the change ``change_id``, ``order``, ``delta`` late would leave the
    app's or the user's state as this process last saw it unchanged (then it does so in the
    store too: a key's order never goes down, and a listed change's keys are all ordered at
    or after it)."""
    if not delta:
        return True
    if tracked.known() is None:
        return False
    shared = _shared_of(tracked)
    return _was_applied(shared, change_id) or all(
        shared.orders.get(key, -math.inf) >= order for key in delta)


# -- state and events ---------------------------------------------------------------------------


def _state_arg(name: str, state: object) -> Mapping[str, Any]:
    """``state`` (``None``: empty) if it is a mapping with str keys, else
    :class:`ValidationError` naming ``name``."""
    if state is None:
        return {}
    if not isinstance(state, Mapping):
        raise ValidationError(f"{name} must be a mapping or None, got {type(state).__name__}")
    for key in state:
        if not isinstance(key, str):
            raise ValidationError(f"{name} keys must be str, got {key!r:.40}")
    return state


def _check_append(session: object, event: object) -> None:
    if not isinstance(session, Session):
        raise ValidationError(f"session must be an ADK Session, got {type(session).__name__}")
    if not isinstance(session.state, dict):
        raise ValidationError(f"session.state must be a dict, got {type(session.state).__name__}")
    # Its items are checked where they are read (see _HeldEvents): not all on every append.
    if not isinstance(session.events, list):
        raise ValidationError("session.events must be a list of ADK Events")
    if not isinstance(event, Event):
        raise ValidationError(f"event must be an ADK Event, got {type(event).__name__}")
    if not isinstance(event.actions, EventActions):
        raise ValidationError(
            f"event.actions must be EventActions, got {type(event.actions).__name__}")
    if event.actions.state_delta is None:
        raise ValidationError("event.actions.state_delta must be a mapping, got None")
    _state_arg("event.actions.state_delta", event.actions.state_delta)


def _split(state: Mapping[str, Any]) -> _Deltas:
    deltas = _Deltas({}, {}, {})
    for key, value in state.items():
        if key.startswith(State.APP_PREFIX):
            deltas.app[key.removeprefix(State.APP_PREFIX)] = value
        elif key.startswith(State.USER_PREFIX):
            deltas.user[key.removeprefix(State.USER_PREFIX)] = value
        elif not key.startswith(State.TEMP_PREFIX):
            deltas.session[key] = value
    return deltas


def _check_shared(deltas: _Deltas) -> None:
    """Raise :class:`SerializationError` for an ``app:`` or ``user:`` value JSON cannot hold,
    naming it, before the session's log (which carries the change as pending) is written."""
    _encode_state({**{State.APP_PREFIX + key: value for key, value in deltas.app.items()},
                   **{State.USER_PREFIX + key: value for key, value in deltas.user.items()}})


def _merged(
    session_state: dict[str, Any], app_state: Mapping[str, Any], user_state: Mapping[str, Any]
) -> dict[str, Any]:
    merged = dict(session_state)
    merged.update((State.APP_PREFIX + key, value) for key, value in app_state.items())
    merged.update((State.USER_PREFIX + key, value) for key, value in user_state.items())
    return merged


def _encode_state(state: Mapping[str, Any]) -> bytes:
    try:
        return pydantic_core.to_json(state)
    except pydantic_core.PydanticSerializationError as exc:
        bad = next((key for key, value in state.items() if not _encodable(value)), None)
        raise SerializationError(f"session state value cannot be stored as JSON: {exc}",
                                 path=None if bad is None else f"state[{bad!r}]") from exc


def _encodable(value: object) -> bool:
    try:
        pydantic_core.to_json(value)
    except pydantic_core.PydanticSerializationError:
        return False
    return True


def _decode_json(data: bytes, where: str) -> Any:
    try:
        return pydantic_core.from_json(data)
    except ValueError as exc:
        raise CorruptCheckpointError(f"undecodable ADK state: {exc}", key=where) from exc


def _not_state(found: object, where: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"ADK state is a {type(found).__name__}, not an object", key=where)


def _encode_session(state: Mapping[str, Any], pending: list[_Pending]) -> bytes:
    """A session's stored state: the JSON object of its keys, as before pending changes
    were kept, or ``[state, [[order, app delta, user delta, id], ...]]`` while it carries
    some (an array, so neither reads as the other; a change without its id was written
    before changes had ids)."""
    encoded = _encode_state(state)  # a value JSON cannot hold: SerializationError
    if not pending:
        return encoded
    changes = pydantic_core.to_json([[change.order, change.app, change.user, change.id]
                                     for change in pending])  # checked: _check_shared
    return b"[" + encoded + b"," + changes + b"]"


def _decode_session(data: bytes, where: str) -> _Session:
    found = _decode_json(data, where) if data else {}
    if isinstance(found, dict):
        return _Session(found, [])
    if not (isinstance(found, list) and len(found) == 2 and isinstance(found[0], dict)
            and isinstance(found[1], list)):
        raise _not_state(found, where)
    return _Session(found[0], [_decoded_pending(change, where) for change in found[1]])


def _decoded_pending(change: object, where: str) -> _Pending:
    if (isinstance(change, list) and len(change) in (3, 4) and _is_order(change[0])
            and isinstance(change[1], dict) and isinstance(change[2], dict)
            and isinstance(change_id := change[3] if len(change) == 4 else "", str)):
        return _Pending(float(change[0]), change[1], change[2], change_id)
    raise CorruptCheckpointError(f"ADK session holds a malformed pending change "
                                 f"{change!r:.60}", key=where)


def _encode_shared(shared: _Shared) -> bytes:
    """An app's or a user's stored state: ``[state, {key: order}, [applied id, ...]]`` (the
    JSON object of the state alone, as written before orders were kept, reads as a state
    without orders; ``[state, {key: order}]``, as written before ids were kept, as one
    without ids)."""
    return pydantic_core.to_json([shared.state, shared.orders, shared.applied])


def _decode_shared(data: bytes, where: str) -> _Shared:
    found = _decode_json(data, where) if data else {}
    if isinstance(found, dict):
        return _Shared(found, {}, [])
    if not (isinstance(found, list) and len(found) in (2, 3) and isinstance(found[0], dict)
            and isinstance(found[1], dict) and all(map(_is_order, found[1].values()))):
        raise _not_state(found, where)
    applied = found[2] if len(found) == 3 else []
    if not (isinstance(applied, list) and all(isinstance(item, str) for item in applied)):
        raise _not_state(found, where)
    return _Shared(found[0], {key: float(order) for key, order in found[1].items()}, applied)


def _is_order(value: object) -> bool:
    """Whether a stored order is one: a finite number (an infinite one would hold its key
    forever; an integer too large for a float cannot be compared as one)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _applied(shared: _Shared, changes: list[_Change], own: str | None) -> _Shared | None:
    """``shared`` with ``changes`` applied; ``None`` when that changes nothing. A change
    whose id ``shared`` lists is applied already and changes nothing. The change ``own``
    is its writer's, made now: it sets every key, as the last compare-and-set. Any other
    is applied late (its writer failed or died, or has not come to it yet): it sets a key
    only when it is ordered after the change that set it (the first of equal ones wins),
    so it never undoes a change ordered after it. Either way a key's order never goes
    down, and the id of a change that sets any key is listed."""
    state, orders, applied = dict(shared.state), dict(shared.orders), list(shared.applied)
    for change in changes:
        if change.id and change.id in applied:
            continue
        mine = own is not None and change.id == own
        setting = [key for key in change.delta
                   if mine or orders.get(key, -math.inf) < change.order]
        for key in setting:
            state[key] = change.delta[key]
            orders[key] = max(change.order, math.nextafter(orders.get(key, -math.inf),
                                                           math.inf))
        if setting and change.id:
            applied.append(change.id)
    if orders == shared.orders:
        return None
    return _Shared(state, orders, applied[-_APPLIED_KEPT:])


def _was_applied(shared: _Shared, change_id: str) -> bool:
    return bool(change_id) and change_id in shared.applied


def _encode_event(event: Event) -> bytes:
    try:
        data = event.model_dump_json(exclude_none=True, warnings=False).encode()
    except pydantic_core.PydanticSerializationError as exc:
        raise SerializationError(f"ADK event {event.id!r} cannot be stored as JSON: {exc}",
                                 path="event") from exc
    # A field set to a value of another type after the event was built (pydantic does not
    # check assignments) is written as it is: every later read of the session would fail.
    try:
        Event.model_validate_json(data)
    except pydantic.ValidationError as exc:
        raise ValidationError(
            f"ADK event {event.id!r:.80} would not read back (a field of the wrong type): "
            f"{str(exc)[:300]}") from exc
    return data


def _decode_event(entry: bytes, where: str) -> Event:
    try:
        return Event.model_validate_json(entry)
    except pydantic.ValidationError as exc:
        raise CorruptCheckpointError(f"undecodable ADK event: {exc}", key=where) from exc


# -- the stale-session marker -------------------------------------------------------------------


def _head(head: LogHead) -> _Head:
    return _Head(head.revision, head.incarnation)


def _mark(session: Session, head: _Head) -> None:
    """Record on ``session`` the head it reflects, in the field ADK keeps for it."""
    session._storage_update_marker = f"{_MARKER}{head.revision}/{head.incarnation}"


def _marked_head(session: Session) -> _Head | _OldMark | None:
    """The head ``session`` is marked with: ``<revision>/<incarnation>``, or the previous
    release's ``<revision>@<created_at>``; ``None`` when unmarked (or marked by another
    service)."""
    marker = session._storage_update_marker
    if not marker or not marker.startswith(_MARKER):
        return None
    body = marker[len(_MARKER):]
    revision, slash, incarnation = body.partition("/")
    try:
        if slash:
            return _Head(int(revision), incarnation)
        revision, _, created_at = body.partition("@")
        return _OldMark(int(revision), float(created_at))
    except ValueError:
        return None


def _not_found(session: Session) -> SessionNotFoundError:
    return SessionNotFoundError(f"Session {session.id} not found.")
