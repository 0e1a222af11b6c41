"""Differential model checking: ``FastSession`` against the SDK's own ``SQLiteSession``.

A hypothesis ``RuleBasedStateMachine`` applies the same random sequences of ``add_items``,
``get_items`` (with and without ``limit``, and with ``session_settings``), ``pop_item`` and
``clear_session`` to several sessions of a ``FastSession`` store (MemoryStore, or a FileStore
in a fresh directory) and to the SDK's reference ``SQLiteSession`` (in-memory database), and
compares everything a caller sees after every step: the items returned, their exact JSON
types (``1`` is not ``1.0`` nor ``True``), their key order, and what each session holds.

Each session id has two ``FastSession`` objects on the one store (another process, in
effect: each object knows only the changes it made or read), steps may use a new object, and
one reference session (``SQLiteSession``'s behaviour does not depend on the object used).
Sessions have a TTL and the clock moves: an expired session is cleared in the reference
(the documented "expired means absent"; ``SQLiteSession`` has no TTL).

Normalizations, each a documented difference (docs/integrations/openai-agents.md, "Limits"):

- Items ``json.dumps`` would change (a tuple, a non-``str`` key, NaN, an infinity) are
  stored by ``SQLiteSession`` in their changed form (or, for NaN, as a value unequal to
  itself), while ``FastSession`` raises ``SerializationError`` and stores nothing of the
  call. Such calls are checked against that rule and not given to the reference.
- A string holding a lone surrogate is refused the same way (``SQLiteSession`` stores it as
  a ``\\ud800`` escape).
- A negative ``limit`` (or ``session_settings.limit``) returns no items, as the SDK's
  ``RedisSession`` does; ``SQLiteSession`` returns them all (SQLite's ``LIMIT -1``).
- Anything other than a list of dicts (one dict, a ``str``) raises ``ValidationError`` or
  ``SerializationError`` in ``FastSession``; ``SQLiteSession`` stores whatever ``json.dumps``
  takes. Those calls are likewise checked alone.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest

pytest.importorskip("agents")

from agents import SQLiteSession
from agents.memory import SessionSettings
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from fastcheckpoint.errors import SerializationError, ValidationError
from fastcheckpoint.integrations.openai_agents import FastSession
from fastcheckpoint.stores import CheckpointStore
from tests._helpers import FakeClock, make_config, make_store

T = TypeVar("T")

SESSION_IDS = ("s1", "s2", "ü/é:3 ")
HANDLES = (0, 1)
TTL = 10.0
ANY_HANDLE = st.sampled_from([*HANDLES, None])
"""Which object a step uses: one of each session's two, or (``None``) a new one that never
looked at the session."""

texts = st.text(max_size=8) | st.sampled_from(
    ["", "Héllo ✓", "\u0000", "\u2028\u2029", "😀", "\"quoted\" \\ back", "x" * 300])
json_scalars = (
    st.none() | st.booleans() | texts
    | st.integers(-(2 ** 70), 2 ** 70) | st.sampled_from([0, -1, 2 ** 63 - 1, 2 ** 64])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([0.0, -0.0, 1.0, 0.1, 1e16, 5e-324, 1.7976931348623157e308])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
call_ids = st.sampled_from(["call-1", "call-2", "call_ü"])
messages = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "developer"]),
     "content": texts | st.lists(st.fixed_dictionaries(
         {"type": st.sampled_from(["input_text", "output_text"]), "text": texts}), max_size=2)},
    optional={"id": texts, "status": st.sampled_from(["completed", "in_progress"])})
function_calls = st.fixed_dictionaries(
    {"type": st.just("function_call"), "call_id": call_ids, "name": texts,
     "arguments": json_values.map(json.dumps)}, optional={"id": texts})
function_outputs = st.fixed_dictionaries(
    {"type": st.just("function_call_output"), "call_id": call_ids,
     "output": texts | json_values.map(json.dumps)})
reasoning = st.fixed_dictionaries(
    {"type": st.just("reasoning"), "id": texts,
     "summary": st.lists(st.fixed_dictionaries(
         {"type": st.just("summary_text"), "text": texts}), max_size=2)},
    optional={"encrypted_content": texts, "content": st.lists(json_values, max_size=2)})
nested = st.dictionaries(texts, json_values, max_size=4)
items = st.one_of(messages, function_calls, function_outputs, reasoning, nested)
batches = st.lists(items, max_size=4)
# Items ``json.dumps`` changes or cannot round-trip: FastSession refuses them (documented).
refused_items = st.sampled_from([
    {"role": "user", "content": ("a", "b")},
    {"type": "x", "nested": {1: "int key"}},
    {"type": "x", "value": math.nan},
    {"type": "x", "value": [math.inf]},
    {"type": "x", "nested": {"ok": {"deep": (1,)}}},
    {"role": "user", "content": "half a pair: \ud83d"},
])
limits = st.none() | st.sampled_from([0, 1, 2, 3, 5, 100])
settings_limits = st.none() | st.sampled_from([0, 1, 2, 4])


def typed(value: Any) -> Any:
    """``value`` with every JSON type spelled out, so that ``1``, ``1.0`` and ``True`` (equal
    in Python) differ, as do ``-0.0`` and ``0.0``, and dict key order counts."""
    if isinstance(value, dict):
        return ("object", [(key, typed(item)) for key, item in value.items()])
    if isinstance(value, list):
        return ("array", [typed(item) for item in value])
    if isinstance(value, float):
        return ("float", value.hex())
    return (type(value).__name__, value)


def feed(kind: str, batch: list[Any]) -> Iterable[Any]:
    """``batch`` as the iterable ``kind`` names (the SDK's sessions take any iterable)."""
    if kind == "tuple":
        return tuple(batch)
    if kind == "generator":
        def generate() -> Iterator[Any]:
            yield from batch
        return generate()
    return list(batch)


class SessionMachine(RuleBasedStateMachine):
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
        self.directory = Path(tempfile.mkdtemp(prefix="fastcheckpoint-openai-diff-"))
        self._exit.callback(shutil.rmtree, self.directory, ignore_errors=True)
        self.stores: list[CheckpointStore] = []
        try:
            self.stores = self.open_stores()
        except BaseException:
            self._exit.close()  # hypothesis calls teardown only on a machine it got
            raise
        self.store = self.stores[0]
        self.ttl = TTL * self.TIME_SCALE
        self.clock = FakeClock()
        self.config = make_config(self.clock)
        self.ours = {(session_id, handle): self.new_session(session_id, handle)
                     for session_id in SESSION_IDS for handle in HANDLES}
        self.opened = itertools.count()
        self.renewed: dict[str, float | None] = dict.fromkeys(SESSION_IDS)
        """When each session last changed (its TTL counts from there); ``None``: empty."""
        self.reference = {session_id: SQLiteSession(session_id)
                          for session_id in SESSION_IDS}
        for session in self.reference.values():
            self._exit.callback(session.close)

    def open_stores(self) -> list[CheckpointStore]:
        """The stores the sessions use, all over one backing: handle ``n`` uses store ``n``
        (modulo their number), so with two each object of a session is another process's.
        Callbacks it puts on ``self._exit`` (removing the backing) run after the stores are
        closed."""
        return [make_store(self.STORE_KIND, self.directory, fsync=False)]

    def new_session(self, session_id: str, process: int) -> FastSession:
        return FastSession(session_id, self.stores[process % len(self.stores)],
                           ttl_seconds=self.ttl, config=self.config)

    def session(self, session_id: str, handle: int | None) -> FastSession:
        if handle is None:
            return self.new_session(session_id, next(self.opened))
        return self.ours[session_id, handle]

    def renew(self, session_id: str) -> None:
        self.renewed[session_id] = self.clock.now

    def call(self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        return self.portal.call(functools.partial(func, *args, **kwargs))

    def teardown(self) -> None:
        try:
            for store in self.stores:
                self.call(store.aclose)
        finally:
            self._exit.close()

    @initialize(limit=settings_limits)
    def give_one_handle_settings(self, limit: int | None) -> None:
        # The second object of each session has a session_settings.limit of its own.
        for session_id in SESSION_IDS:
            self.ours[session_id, 1].session_settings = SessionSettings(limit=limit)

    # -- rules ------------------------------------------------------------------------------

    @rule(session_id=st.sampled_from(SESSION_IDS), handle=ANY_HANDLE,
          batch=batches, kind=st.sampled_from(["list", "tuple", "generator"]))
    def add_items(self, session_id: str, handle: int | None, batch: list[Any], kind: str) -> None:
        self.call(self.session(session_id, handle).add_items, feed(kind, batch))
        self.call(self.reference[session_id].add_items, feed(kind, batch))
        if batch:
            self.renew(session_id)

    @rule(session_id=st.sampled_from(SESSION_IDS), first=batches, second=batches,
          pops=st.integers(0, 2))
    def concurrent_changes(
        self, session_id: str, first: list[Any], second: list[Any], pops: int
    ) -> None:
        """Two objects (two processes) add a batch each, and pop, at the same time: the
        outcome is the reference's for one order of the calls (each one atomic)."""
        before = self.call(self.reference[session_id].get_items, None)
        popped: list[Any] = []

        async def together() -> None:
            async def pop(handle: int) -> None:
                popped.append(await self.ours[session_id, handle].pop_item())

            async with anyio.create_task_group() as group:
                group.start_soon(self.ours[session_id, 0].add_items, list(first))
                group.start_soon(self.ours[session_id, 1].add_items, list(second))
                for index in range(pops):
                    group.start_soon(pop, index % 2)

        self.portal.call(together)
        after = typed(self.call(self.ours[session_id, 0].get_items, 1_000_000))
        # Every item of the two batches and the session before, in a serial order: each batch
        # kept together, pops taking from the end. Replay the order that matches.
        for order in ((first, second), (second, first)):
            for pops_before in itertools.product(range(pops + 1), repeat=3):
                if sum(pops_before) != pops:
                    continue
                model = list(before)
                taken: list[Any] = []
                for index, batch in enumerate(order):
                    taken += [model.pop() if model else None
                              for _ in range(pops_before[index])]
                    model += batch
                taken += [model.pop() if model else None for _ in range(pops_before[2])]
                if typed(model) == after and sorted(map(repr, map(typed, taken))) == sorted(
                        map(repr, map(typed, popped))):
                    self.replace_reference(session_id, model)
                    if first or second or any(item is not None for item in popped):
                        self.renew(session_id)
                    return
        raise AssertionError(f"no serial order gives {after!r:.300} and pops {popped!r:.300}")

    def replace_reference(self, session_id: str, items: list[Any]) -> None:
        self.call(self.reference[session_id].clear_session)
        self.call(self.reference[session_id].add_items, items)

    @rule(session_id=st.sampled_from(SESSION_IDS), handle=ANY_HANDLE,
          good=batches, bad=refused_items, at=st.integers(0, 4))
    def add_refused_items(
        self, session_id: str, handle: int | None, good: list[Any], bad: Any, at: int
    ) -> None:
        # Documented: FastSession raises SerializationError and stores nothing of the call.
        before = self.call(self.ours[session_id, 0].get_items, None)
        batch = [*good[:at], bad, *good[at:]]
        with pytest.raises(SerializationError):
            self.call(self.session(session_id, handle).add_items, batch)
        assert typed(self.call(self.ours[session_id, 0].get_items, None)) == typed(before)

    @rule(session_id=st.sampled_from(SESSION_IDS), handle=ANY_HANDLE,
          batch=st.sampled_from([{"role": "user", "content": "one"}, "text", b"bytes", 7]))
    def add_one_item_not_a_batch(self, session_id: str, handle: int | None, batch: Any) -> None:
        with pytest.raises(ValidationError):
            self.call(self.session(session_id, handle).add_items, batch)

    @rule(session_id=st.sampled_from(SESSION_IDS), handle=ANY_HANDLE,
          limit=limits)
    def get_items(self, session_id: str, handle: int | None, limit: int | None) -> None:
        ours = self.session(session_id, handle)
        reference = self.reference[session_id]
        # The reference is one object per id: give it the settings of the object compared.
        reference.session_settings = ours.session_settings
        try:
            expected = self.call(reference.get_items, limit)
        finally:
            reference.session_settings = SessionSettings()
        assert typed(self.call(ours.get_items, limit)) == typed(expected)

    @rule(session_id=st.sampled_from(SESSION_IDS), handle=ANY_HANDLE,
          limit=st.sampled_from([-1, -3]), through_settings=st.booleans())
    def get_items_with_a_negative_limit(
        self, session_id: str, handle: int | None, limit: int, through_settings: bool
    ) -> None:
        ours = self.session(session_id, handle)
        if not through_settings:
            assert self.call(ours.get_items, limit) == []
            return
        kept = ours.session_settings
        ours.session_settings = SessionSettings(limit=limit)
        try:
            assert self.call(ours.get_items, None) == []
        finally:
            ours.session_settings = kept

    @rule(session_id=st.sampled_from(SESSION_IDS), handle=ANY_HANDLE)
    def pop_item(self, session_id: str, handle: int | None) -> None:
        expected = self.call(self.reference[session_id].pop_item)
        assert typed(self.call(self.session(session_id, handle).pop_item)) == typed(expected)
        if expected is not None:
            self.renew(session_id)

    @rule(session_id=st.sampled_from(SESSION_IDS), handle=ANY_HANDLE)
    def clear_session(self, session_id: str, handle: int | None) -> None:
        self.call(self.session(session_id, handle).clear_session)
        self.call(self.reference[session_id].clear_session)
        self.renewed[session_id] = None

    @rule(seconds=st.sampled_from([0.75, 4.5, 12.0]))
    def advance_clock(self, seconds: float) -> None:
        """Time passes: a session unchanged for ``TTL`` seconds expires, all its items
        together ("expired means absent"; the reference is cleared then). The steps never
        sum to a TTL exactly, so no expiry falls on a boundary."""
        self.clock.advance(seconds * self.TIME_SCALE)
        for session_id, renewed in self.renewed.items():
            if renewed is not None and self.clock.now >= renewed + self.ttl:
                self.call(self.reference[session_id].clear_session)
                self.renewed[session_id] = None

    @rule(session_id=st.sampled_from(SESSION_IDS), handle=st.sampled_from(HANDLES),
          limit=settings_limits)
    def change_settings(self, session_id: str, handle: int, limit: int | None) -> None:
        self.ours[session_id, handle].session_settings = SessionSettings(limit=limit)

    @invariant()
    def every_session_holds_the_same(self) -> None:
        for session_id in SESSION_IDS:
            expected = typed(self.call(self.reference[session_id].get_items, None))
            for handle in HANDLES:
                assert typed(self.call(self.session(session_id, handle).get_items,
                                       1_000_000)) == expected


@pytest.mark.parametrize("given", [None, {"limit": 2}, SessionSettings(limit=0), {}])
def test_session_settings_are_the_sdks(given: Any, tmp_path: Path) -> None:
    """The Session protocol's attributes: ``session_id``, and ``session_settings`` built
    from what the SDK's sessions take."""
    ours = FastSession("s", make_store("memory", tmp_path))
    built = FastSession("s", make_store("memory", tmp_path), session_settings=given)
    reference = SQLiteSession("s", session_settings=given)
    try:
        assert (ours.session_id, built.session_settings) == (
            reference.session_id, reference.session_settings)
        assert ours.session_settings == SQLiteSession("s").session_settings
    finally:
        reference.close()


MACHINE_SETTINGS = settings(
    max_examples=10,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class MemorySessionMachine(SessionMachine):
    STORE_KIND = "memory"


class FileSessionMachine(SessionMachine):
    STORE_KIND = "file"


TestFastSessionOnMemoryStore = MemorySessionMachine.TestCase
TestFastSessionOnMemoryStore.settings = MACHINE_SETTINGS
TestFastSessionOnFileStore = FileSessionMachine.TestCase
TestFastSessionOnFileStore.settings = MACHINE_SETTINGS
