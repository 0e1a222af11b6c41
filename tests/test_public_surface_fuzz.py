"""Hypothesis over the whole public surface: every call returns or raises a CheckpointError,
and a call that raises leaves the store as it was.

The surface is found by introspection, so a method added later is fuzzed without editing
this file: every public method of :class:`CheckpointManager`, of the blocking facade and of
each store class (the protocol methods and the capabilities the store offers), the
constructors and ``from_*``/``to_*`` of the model and the configuration, ``open_store`` and
``from_env``. A public name the fuzz cannot call sensibly is in :data:`EXCLUDED` with the
reason, and :func:`test_every_exclusion_names_something_that_exists` fails when one of them is
gone.

Each argument is drawn from a pool of hostile values (wrong types, bools for ints, huge and
non-finite numbers, empty and 1 MB strings, lone surrogates, NUL, a ``str`` subclass whose
``__eq__``/``__hash__``/``__str__``/``__len__`` raise, dicts with non-``str`` keys, lists and
dicts nested 10**5 deep or holding themselves, objects whose ``__repr__`` raises or
recurses, generators) mixed with valid ones (the run ids, checkpoint ids, run keys,
sequences, incarnations and versions the store holds), sometimes with a keyword the method
does not take. Each example opens a fresh store, seeds it with a few runs (checkpoints whose
lists are kept as logs, a paused and a failed run, loose items) and makes a few calls.

What counts as a pass:

* the call returns (an async iterator is consumed), or raises a :class:`CheckpointError`;
* a :class:`TypeError` only when Python refused the call before entering the function
  (wrong arity, an unknown keyword): ``inspect.signature(...).bind`` refuses the same
  arguments and the traceback ends in the frame that made the call, not in our code;
* after a raise, the store reads back exactly as before: every run record, every checkpoint
  (header and payload, through the store and through the manager's listing and restore) and
  every item of every run key the fuzz knows.

CI runs a few examples per store with a fixed seed; ``FUZZ_EXAMPLES=3000`` hunts (random).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import os
import shutil
import sys
import tempfile
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import fastcheckpoint
import fastcheckpoint.stores as stores_module
from fastcheckpoint import (
    Checkpoint,
    CheckpointConfig,
    CheckpointError,
    CheckpointManager,
    CheckpointMetadata,
    CheckpointStatus,
    CheckpointStore,
    ConfigurationError,
    FileStore,
    MemoryStore,
    RetryPolicy,
    ValidationError,
    _ids,
    open_store,
)
from fastcheckpoint.blocking import BlockingManager
from fastcheckpoint.stores import Item, RunRecord, StoredCheckpoint, register_store
from fastcheckpoint.stores._loops import holds_clients
from fastcheckpoint.stores.sqlite import SQLiteStore
from fastcheckpoint.testing import make_checkpoint, make_item
from tests._helpers import T0, FakeClock, make_config
from tests._hostile import (
    DEEP,
    BadStr,
    Boom,
    looped_dict,
    looped_list,
    nested_dict,
    nested_list,
)

HUNT = os.environ.get("FUZZ_EXAMPLES")
"""Examples per test when hunting (random); unset, CI's few fixed examples."""

FUZZ_KINDS = ("memory", "file", "sqlite")
CALLS_PER_EXAMPLE = 4
CALL_SECONDS = 60.0
"""No call may take longer: a hang is a finding too."""


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=int(HUNT) if HUNT else examples,
        derandomize=not HUNT,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        # Examples are slow (a store per example, values 1 MB or 10**5 deep): a failure is
        # reported as found, with the label of every value drawn, unless FUZZ_SHRINK is set.
        phases=list(Phase) if os.environ.get("FUZZ_SHRINK") else [
            Phase.explicit, Phase.reuse, Phase.generate],
    )


# -- hostile values ------------------------------------------------------------------------


class NastyStr(BadStr):
    """A ``str`` whose comparison, hash, conversion and length raise."""

    def __str__(self) -> str:
        raise Boom("__str__")

    def __len__(self) -> int:
        raise Boom("__len__")


class BadRepr:
    def __repr__(self) -> str:
        raise Boom("__repr__")


class RecursiveRepr:
    def __repr__(self) -> str:
        return repr(self)






def _generator() -> Iterator[str]:
    yield "a"
    yield "b"


MEGABYTE = "x" * 1_000_000

HOSTILE: dict[str, Callable[[], Any]] = {
    "None": lambda: None,
    "0": lambda: 0,
    "-1": lambda: -1,
    "1": lambda: 1,
    "True": lambda: True,
    "False": lambda: False,
    "10**400": lambda: 10**400,
    "-10**400": lambda: -(10**400),
    "10**5000": lambda: 10**5000,
    "2**63": lambda: 2**63,
    "2**64": lambda: 2**64,
    "nan": lambda: float("nan"),
    "inf": lambda: float("inf"),
    "-inf": lambda: float("-inf"),
    "-0.0": lambda: -0.0,
    "1e308": lambda: 1e308,
    "0.5": lambda: 0.5,
    "''": lambda: "",
    "1 MB str": lambda: MEGABYTE,
    "lone surrogate": lambda: "\ud800",
    "NUL": lambda: "a\x00b",
    "control chars": lambda: "\x1b[31m\r\n\x7f",
    "'../x'": lambda: "../x",
    "'ck-' garbage": lambda: "ck-" + "a" * 24 + "-zzzzzzzz-99999999999999999999",
    "NastyStr": lambda: NastyStr("alpha"),
    "b''": lambda: b"",
    "b'x'": lambda: b"x",
    "bytearray": lambda: bytearray(b"x"),
    "memoryview": lambda: memoryview(b"xy"),
    "[]": lambda: [],
    "[1, object()]": lambda: [1, object()],
    "['a', 1]": lambda: ["a", 1],
    "('a',)": lambda: ("a",),
    "{}": lambda: {},
    "{1: 2}": lambda: {1: 2},
    "{None: 1}": lambda: {None: 1},
    "{(1, 2): 3}": lambda: {(1, 2): 3},
    "{'a': object()}": lambda: {"a": object()},
    "{'a': {1}}": lambda: {"a": {1}},
    "deep list": lambda: nested_list(DEEP),
    "deep dict": lambda: nested_dict(DEEP),
    "self list": looped_list,
    "self dict": looped_dict,
    "object()": object,
    "class int": lambda: int,
    "class object": lambda: object,
    "BadRepr": BadRepr,
    "RecursiveRepr": RecursiveRepr,
    "[BadRepr]": lambda: [BadRepr()],
    "{'a': BadRepr}": lambda: {"a": BadRepr()},
    "generator": _generator,
    "iterator": lambda: iter(["a", "b"]),
    "set": lambda: {"a"},
    "lambda": lambda: lambda *args, **kwargs: None,
    "raising callable": lambda: _raising,
    "status enum": lambda: CheckpointStatus.PAUSED,
    "Item": lambda: make_item("k"),
    "[Item with NastyStr key]": lambda: [Item(key=NastyStr("k"), value=b"v")],
    "[Item with 10**400 owner]": lambda: [Item(key="k", value=b"v", owner=10**400)],
    "[Item with nan expiry]": lambda: [Item(key="k", value=b"v", expires_at=float("nan"))],
    "[Item with str value]": lambda: [Item(key="k", value="v")],  # type: ignore[arg-type]
}


def _raising(*args: Any, **kwargs: Any) -> Any:
    raise Boom("called")


# -- the store, seeded ---------------------------------------------------------------------


class World:
    """A fresh store of ``kind`` with a manager and a blocking facade over it, seeded with a
    few runs; ``refresh`` reads what it holds now (the valid values the fuzz draws).
    ``store``: a store opened elsewhere (a server store over an empty backing) instead."""

    def __init__(self, kind: str, portal: BlockingPortal, directory: Path,
                 store: CheckpointStore | None = None) -> None:
        self.kind = kind
        self.portal = portal
        self.directory = directory
        self.clock = FakeClock(T0 + 100)
        if store is not None:
            self.store: CheckpointStore = store
        elif kind == "memory":
            self.store = MemoryStore()
        elif kind == "file":
            self.store = FileStore(directory / "store", fsync=False)
        else:
            self.store = SQLiteStore(directory / "runs.db", synchronous="normal")
        self.manager = CheckpointManager(
            self.store, make_config(self.clock, history_min_entries=2))
        self.blocking: BlockingManager = portal.call(_blocking_over, self.manager)
        self.run_ids = ["alpha", "beta", "gamma", "never-created"]
        self.run_keys = [_ids.run_key(run_id) for run_id in self.run_ids] + ["a" * 24]
        self.checkpoint_ids: list[str] = []
        self.records: dict[str, RunRecord] = {}
        self.requested_at: float | None = None
        self.cursor: str | None = None
        portal.call(self._seed)
        self.refresh()

    async def _seed(self) -> None:
        manager = self.manager
        messages: list[Any] = [{"role": "user", "content": "hi"}]
        for step in range(3):
            messages = [*messages, {"role": "assistant", "content": f"step {step}"}]
            await manager.create("alpha", {"step": step}, messages=messages, tags=["t"],
                                 step_name=f"s{step}", ttl_seconds=1000.0 if step == 1 else None)
        await manager.create("beta", {"b": 1}, context={"c": [1, 2]})
        paused = await manager.pause("beta", {"question": "go?"})
        assert paused.approval is not None
        self.requested_at = paused.approval["requested_at"]
        await manager.create("gamma", {"g": True})
        await manager.mark_failed("gamma", "boom")
        await self.store.put_items(self.run_keys[0], [make_item("loose/1")], now=self.clock())
        await self.store.put_items(self.run_keys[-1], [make_item("orphan")], now=self.clock())

    def refresh(self) -> None:
        self.portal.call(self._refresh)

    async def _refresh(self) -> None:
        now = self.clock()
        self.records = {}
        self.checkpoint_ids = []
        for key in self.run_keys:
            record = await _read(self.store.get_run(key, now=now))
            if isinstance(record, RunRecord):
                self.records[key] = record
            headers = await _read(self.store.headers(
                key, before=None, limit=1000, now=now, include_expired=True))
            if isinstance(headers, tuple):
                self.checkpoint_ids += [header.checkpoint_id for header in headers[0]]
        listed = await _read(self.store.list_runs(status=None, limit=1, cursor=None, now=now))
        self.cursor = listed[1] if isinstance(listed, tuple) else None

    def snapshot(self) -> str:
        return self.portal.call(self._snapshot)

    async def _snapshot(self) -> str:
        """What the store holds, read through the store and through the manager, as text
        (``repr``, so that a NaN someone stored compares equal to itself). A read that
        raises a CheckpointError (a record the fuzz made damaged, through the store
        protocol) is recorded as that error."""
        store, manager, now = self.store, self.manager, self.clock()
        seen: list[Any] = []
        records: list[RunRecord] = []
        cursor: str | None = None
        while True:
            listed = await _read(store.list_runs(status=None, limit=50, cursor=cursor, now=now))
            if not isinstance(listed, tuple) or len(listed) != 2:
                seen.append(listed)
                break
            page, cursor = listed
            records += page
            if cursor is None:
                break
        keys = dict.fromkeys([*self.run_keys, *(_ids.run_key(r.run_id) for r in records)])
        seen.append(sorted(map(repr, records)))
        seen.append(await _read(store.count_runs(status=None, now=now)))
        for key in keys:
            seen.append((key, await _read(store.get_run(key, now=now))))
            headers = await _read(store.headers(
                key, before=None, limit=10_000, now=now, include_expired=True))
            seen.append(headers)
            for header in headers[0] if isinstance(headers, tuple) else ():
                seen.append(await _read(store.get(key, header.sequence, now=now)))
            seen.append(await _read(store.scan_items(key, limit=100_000, now=now)))
        runs = await _read(manager.list_runs(limit=1000))
        if not isinstance(runs, fastcheckpoint.RunPage):
            seen.append(runs)
            runs = []
        for info in sorted(runs, key=lambda info: info.run_id):
            listed = await _read(manager.list_checkpoints(info.run_id, 1000, include_expired=True))
            restored = [await _read(manager.restore_from(m.checkpoint_id))
                        for m in (listed if isinstance(listed, list) else [])]
            seen.append((info, listed, restored))
        return repr(seen)

    def close(self) -> None:
        try:
            self.portal.call(self.manager.stop)
            self.blocking.close()  # closes the manager's store too
        finally:
            if self.kind in ("file", "sqlite"):
                shutil.rmtree(self.directory, ignore_errors=True)


async def _read(call: Awaitable[Any]) -> Any:
    """What a read returns, or the CheckpointError it raises (as text)."""
    try:
        return await call
    except CheckpointError as exc:
        return f"raised {type(exc).__name__}: {exc}"


def _blocking_over(manager: CheckpointManager) -> BlockingManager:
    return BlockingManager(manager)  # bound to the portal's loop: called from the test thread


# -- valid values, by parameter name -------------------------------------------------------


def _next_record(world: World, key: str | None = None) -> StoredCheckpoint:
    """The checkpoint that appends to a seeded run (or starts one), as the store takes it."""
    key = key or world.run_keys[0]
    record = world.records.get(key)
    if record is None:
        seed = _seed_for("never-created")
        return make_checkpoint(seed, 0, created_at=world.clock())
    return StoredCheckpoint(
        sequence=record.latest_sequence + 1,
        checkpoint_id=_ids.checkpoint_id(key, record.incarnation, record.latest_sequence + 1),
        created_at=world.clock(), expires_at=None, header=b"h", payload=b"p")


def _seed_for(run_id: str, incarnation: str = "abcdefgh") -> RunRecord:
    return RunRecord(run_id=run_id, incarnation=incarnation, status="active", created_at=T0,
                     updated_at=T0, latest_sequence=0, checkpoint_count=0, expires_at=None)


def _seed_of(world: World) -> RunRecord:
    record = world.records.get(world.run_keys[0])
    return record if record is not None else _seed_for("never-created")


VALID: dict[str, Callable[[World], list[Any]]] = {
    "run_id": lambda w: [*w.run_ids, NastyStr("alpha")],
    "new_run_id": lambda w: [None, "forked", "alpha"],
    "checkpoint_id": lambda w: [*w.checkpoint_ids, *map(NastyStr, w.checkpoint_ids[:1])],
    "parent_id": lambda w: [None, *w.checkpoint_ids, *map(NastyStr, w.checkpoint_ids[-1:])],
    "before": lambda w: [None, *w.checkpoint_ids, *map(NastyStr, w.checkpoint_ids[-1:])],
    "state": lambda w: [{"a": 1}, {}],
    "context": lambda w: [None, {"c": 1}],
    "request": lambda w: [None, {"q": "why?"}],
    "messages": lambda w: [None, [{"role": "user"}] * 3],
    "tool_calls": lambda w: [None, [{"tool": "x"}]],
    "step_name": lambda w: ["", "s1"],
    "tags": lambda w: [None, ["t"]],
    "ttl_seconds": lambda w: [None, 10.0],
    "force": lambda w: [True, False],
    "expected_sequence": lambda w: [None, 0, *(r.latest_sequence + 1
                                            for r in w.records.values())],
    "latest_sequence": lambda w: [None, *(r.latest_sequence for r in w.records.values())],
    "limit": lambda w: [1, 2, 100],
    "keep": lambda w: [1, 2],
    "page_size": lambda w: [1, 100],
    "include_expired": lambda w: [True, False],
    "include_state": lambda w: [True, False],
    "status": lambda w: [None, *CheckpointStatus, "paused", "active", NastyStr("paused")],
    "cursor": lambda w: [None, w.cursor],
    "requested_at": lambda w: [None, w.requested_at],
    "format": lambda w: ["json", "csv", "markdown", NastyStr("json")],
    "error": lambda w: ["", "it broke"],
    "approver": lambda w: ["ana", NastyStr("ana")],
    "comment": lambda w: ["", "ok"],
    "reason": lambda w: ["", "no"],
    # the store protocol
    "run_key": lambda w: [*w.run_keys, NastyStr(w.run_keys[0])],
    "sequence": lambda w: [None, 0, 1, 2],
    "now": lambda w: [w.clock()],
    "record": lambda w: [_next_record(w), _next_record(w, w.run_keys[3])],
    "run": lambda w: [_seed_of(w), _seed_for("never-created")],
    "seed": lambda w: [_seed_of(w), _seed_for("alpha")],
    "keep_latest": lambda w: [None, 2],
    "items": lambda w: [[], [make_item("k1")], [make_item("k2", owner=1)]],
    "keys": lambda w: [[], ["k1", "loose/1"], [NastyStr("loose/1")]],
    "prefix": lambda w: ["", "loose", NastyStr("loose")],
    "start_after": lambda w: [None, "k"],
    "reverse": lambda w: [True, False],
    "create_only": lambda w: [True, False],
    "incarnation": lambda w: [r.incarnation for r in w.records.values()] or ["abcdefgh"],
    "version": lambda w: [r.version for r in w.records.values()] or [0],
    "data": lambda w: [b"", b"d"],
    "owner": lambda w: [0, 1, 2],
    "if_absent": lambda w: [True, False],
    "label": lambda w: ["lbl"],
    "renumber": lambda w: [lambda sequence: msgspec.structs.replace(
        _next_record(w), sequence=sequence)],
    "batch_size": lambda w: [1, 500],
    "environ": lambda w: [None, {}, {"FASTCHECKPOINT_URL": "memory://"}],
}
"""Valid values of each parameter name, read from what the store holds; a name missing
here draws from the hostile pool only."""


class Drawn:
    """One call's arguments, each drawn by label (a 1 MB string or a list nested 10**5 deep
    has no repr hypothesis could print)."""

    def __init__(self) -> None:
        self.args: list[Any] = []
        self.kwargs: dict[str, Any] = {}
        self.labels: list[str] = []


def draw_value(data: st.DataObject, name: str, world: World | None) -> tuple[str, Any]:
    valid = VALID[name](world) if world is not None and name in VALID else []
    if valid and data.draw(st.booleans(), label=f"{name} valid?"):
        index = data.draw(st.integers(0, len(valid) - 1), label=f"{name} valid index")
        return f"{name}=valid[{index}]", valid[index]
    label = data.draw(st.sampled_from(sorted(HOSTILE)), label=f"{name} hostile")
    return f"{name}={label}", HOSTILE[label]()


def draw_call(
    data: st.DataObject, signature: inspect.Signature, world: World | None
) -> Drawn:
    """Arguments for ``signature``: each parameter valid or hostile, an optional one sometimes
    left out, a required one rarely; sometimes a keyword it does not take."""
    drawn = Drawn()
    positional = True
    for parameter in signature.parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        optional = parameter.default is not parameter.empty
        leave_out = data.draw(st.integers(0, 3 if optional else 40), label="leave out")
        if leave_out == 0:
            positional = False
            drawn.labels.append(f"{parameter.name} left out")
            continue
        label, value = draw_value(data, parameter.name, world)
        drawn.labels.append(label)
        if parameter.kind is parameter.KEYWORD_ONLY or not positional:
            drawn.kwargs[parameter.name] = value
        else:
            drawn.args.append(value)
    if data.draw(st.integers(0, 15), label="unexpected keyword") == 0:
        label, value = draw_value(data, "unexpected", world)
        drawn.kwargs["no_such_argument"] = value
        drawn.labels.append(f"no_such_argument: {label}")
    return drawn


# -- calling -------------------------------------------------------------------------------


async def _forwarded() -> None:
    """Nothing: :func:`holds_clients` wraps it to find the code of its forwarding wrapper."""


FORWARDERS = frozenset({holds_clients(_forwarded).__code__})
"""Code of the library's wrappers that pass their arguments on unchanged (a server store's
public calls are wrapped): Python refusing the call there refused it for the method."""


def _refused_by_python(exc: BaseException, signature: inspect.Signature, drawn: Drawn,
                       caller: types.CodeType) -> bool:
    """Whether a TypeError is Python refusing the call (arity, keywords) before it entered the
    function: the signature refuses the arguments too, and the traceback ends in the frame
    that made the call (or in a wrapper of :data:`FORWARDERS` that passed them on)."""
    if not isinstance(exc, TypeError):
        return False
    try:
        signature.bind(*drawn.args, **drawn.kwargs)
    except TypeError:
        pass
    else:
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and (tb.tb_frame.f_code is caller
                               or tb.tb_frame.f_code in FORWARDERS)


async def _invoke(function: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> Any:
    with anyio.fail_after(CALL_SECONDS):
        result = function(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, AsyncIterator):
            result = [chunk async for chunk in result]
        return result


def _invoke_blocking(function: Callable[..., Any], args: list[Any],
                     kwargs: dict[str, Any]) -> Any:
    result = function(*args, **kwargs)
    if isinstance(result, Iterator):
        result = list(result)
    return result


def check_call(
    what: str,
    function: Callable[..., Any],
    drawn: Drawn,
    *,
    portal: BlockingPortal | None = None,
    world: World | None = None,
    signature: inspect.Signature | None = None,
) -> tuple[Any, BaseException | None]:
    """Make the call (on the portal's loop when given); fail unless it returned or raised
    a CheckpointError (or Python refused it), and, with ``world``, unless a raise left the
    store unchanged. Returns what it returned and what it raised."""
    signature = signature or inspect.signature(function)
    before = None if world is None else world.snapshot()
    try:
        if portal is not None:
            result = portal.call(_invoke, function, drawn.args, drawn.kwargs)
        else:
            result = _invoke_blocking(function, drawn.args, drawn.kwargs)
    except CheckpointError as exc:
        raised: BaseException = exc
    except BaseException as exc:
        caller = (_invoke if portal is not None else _invoke_blocking).__code__
        if not _refused_by_python(exc, signature, drawn, caller):
            raise AssertionError(
                f"{what}({', '.join(drawn.labels)}) leaked {type(exc).__name__}: "
                f"{str(exc)[:300]}") from exc
        raised = exc
    else:
        return result, None
    if world is not None:
        after = world.snapshot()
        assert after == before, (
            f"{what}({', '.join(drawn.labels)}) raised {type(raised).__name__} "
            f"({str(raised)[:200]}) and changed the store")
    return None, raised


# -- the surface -----------------------------------------------------------------------------


EXCLUDED: dict[str, str] = {
    "CheckpointManager.aclose": "closes the store every later call of the example uses "
                                "(it takes no argument; World.close calls it)",
    "CheckpointManager.from_env": "fuzzed by test_from_env with variables set by monkeypatch",
    "BlockingManager.close": "closes the store every later call of the example uses "
                             "(it takes no argument; World.close calls it)",
    "BlockingManager.from_env": "fuzzed by test_from_env with variables set by monkeypatch",
    "MemoryStore.aclose": "closes the store (takes no argument)",
    "FileStore.aclose": "closes the store (takes no argument)",
    "SQLiteStore.aclose": "closes the store (takes no argument)",
    "MemoryStore.from_url": "fuzzed through open_store by test_open_store",
    "FileStore.from_url": "fuzzed through open_store by test_open_store",
    "SQLiteStore.from_url": "fuzzed through open_store by test_open_store",
}
"""Public methods the generic fuzz leaves out, with the reason."""

STORE_CLASSES = {"memory": MemoryStore, "file": FileStore, "sqlite": SQLiteStore}


def public_methods(cls: type, excluded: dict[str, str] = EXCLUDED) -> list[str]:
    """The public callables of ``cls`` (methods, class methods), minus ``excluded``."""
    names = []
    for name, value in inspect.getmembers(cls):
        if name.startswith("_") or isinstance(value, property) or not callable(value):
            continue
        if f"{cls.__name__}.{name}" in excluded:
            continue
        names.append(name)
    return names


def test_every_exclusion_names_something_that_exists() -> None:
    classes = {cls.__name__: cls for cls in
               (CheckpointManager, BlockingManager, *STORE_CLASSES.values())}
    for name in EXCLUDED:
        owner, _, attribute = name.partition(".")
        assert callable(getattr(classes[owner], attribute, None)), (
            f"EXCLUDED names {name}, which no longer exists: remove it from the list")


def test_the_surface_is_found() -> None:
    """The enumeration sees the methods the docs name (a sanity check of introspection)."""
    assert {"create", "restore", "fork", "export_run", "pause", "repair"} <= set(
        public_methods(CheckpointManager))
    assert {"create", "export_run", "start", "stop"} <= set(public_methods(BlockingManager))
    for cls in STORE_CLASSES.values():
        assert {"append", "get", "headers", "update_run", "scan_items", "purge_expired",
                "cleanup_expired", "read_with_items"} <= set(public_methods(cls))


@pytest.fixture(scope="module")
def portal() -> Iterator[BlockingPortal]:
    with start_blocking_portal("asyncio") as portal:
        yield portal


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="fuzz-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


_worlds = itertools.count()


def _fuzz_one(kind: str, surface: str, portal: BlockingPortal, scratch: Path,
              data: st.DataObject) -> None:
    directory = scratch / f"w{next(_worlds)}"
    directory.mkdir()
    world = World(kind, portal, directory)
    try:
        fuzz_world(world, surface, portal, data)
    finally:
        world.close()


def fuzz_world(world: World, surface: str, portal: BlockingPortal, data: st.DataObject,
               excluded: dict[str, str] = EXCLUDED) -> None:
    """:data:`CALLS_PER_EXAMPLE` calls of ``surface``'s public methods on ``world``."""
    for _ in range(CALLS_PER_EXAMPLE):
        if surface == "manager":
            target: Any = world.manager
        elif surface == "blocking":
            target = world.blocking
        else:
            target = world.store
        name = data.draw(st.sampled_from(public_methods(type(target), excluded)),
                         label="method")
        method = getattr(target, name)
        signature = inspect.signature(method)
        drawn = draw_call(data, signature, world)
        check_call(f"{type(target).__name__}.{name}", method, drawn, world=world,
                   portal=None if surface == "blocking" else portal,
                   signature=signature)
        world.refresh()


@pytest.mark.parametrize("kind", FUZZ_KINDS)
@fuzz_settings(25)
@given(data=st.data())
def test_manager_methods(kind: str, portal: BlockingPortal, scratch: Path,
                         data: st.DataObject) -> None:
    _fuzz_one(kind, "manager", portal, scratch, data)


@pytest.mark.parametrize("kind", FUZZ_KINDS)
@fuzz_settings(10)
@given(data=st.data())
def test_blocking_facade_methods(kind: str, portal: BlockingPortal, scratch: Path,
                                 data: st.DataObject) -> None:
    _fuzz_one(kind, "blocking", portal, scratch, data)


@pytest.mark.parametrize("kind", FUZZ_KINDS)
@fuzz_settings(25)
@given(data=st.data())
def test_store_methods(kind: str, portal: BlockingPortal, scratch: Path,
                       data: st.DataObject) -> None:
    _fuzz_one(kind, "store", portal, scratch, data)


# -- constructors, the model, configuration, URLs and the environment -------------------------


def _fields_signature(cls: type) -> inspect.Signature:
    """A keyword-only signature of the fields of a dataclass or msgspec struct."""
    if dataclasses.is_dataclass(cls):
        names = [f.name for f in dataclasses.fields(cls)]
    else:
        names = [f.name for f in msgspec.structs.fields(cls)]  # type: ignore[arg-type]
    return inspect.Signature([inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                                default=None) for name in names])


@fuzz_settings(30)
@given(data=st.data())
def test_config_constructors(data: st.DataObject) -> None:
    """``CheckpointConfig(...)``, ``RetryPolicy(...)`` and ``CheckpointConfig.from_env``."""
    for cls in (CheckpointConfig, RetryPolicy):
        drawn = draw_call(data, _fields_signature(cls), None)
        check_call(cls.__name__, cls, drawn, signature=inspect.signature(cls))
    drawn = Drawn()
    label, environ = draw_value(data, "environ", None)
    drawn.args.append(_environ(data, environ))
    drawn.labels.append(label)
    check_call("CheckpointConfig.from_env", CheckpointConfig.from_env, drawn)


ENV_NAMES = [f"FASTCHECKPOINT_{f.name.upper()}" for f in dataclasses.fields(CheckpointConfig)
             ] + ["FASTCHECKPOINT_RETRY_BASE_DELAY", "FASTCHECKPOINT_RETRY_MAX_DELAY",
                  "FASTCHECKPOINT_RETRY_MAX_RETRIES", "FASTCHECKPOINT_NO_SUCH_SETTING",
                  "CHECKPOINT_TTL_DAYS", "CHECKPOINT_MODE", "FASTCHECKPOINT_URL"]


def _environ(data: st.DataObject, given_value: Any) -> Any:
    """The drawn ``environ``, or (when it drew a dict) a dict of variables with hostile
    values under the names the library reads."""
    if not isinstance(given_value, dict) or given_value:
        return given_value
    env: dict[Any, Any] = {}
    for name in data.draw(st.lists(st.sampled_from(ENV_NAMES), max_size=4), label="env"):
        env[name] = _text(data)
    return env


ENV_TEXTS = ["", "none", "0", "-1", "1", "1e400", "nan", "inf", "true", "maybe", "10" * 300,
             "memory://", "redis://", "sqlite:runs.db", "development", "\x1b", "é", " 7 "]


def _text(data: st.DataObject) -> str:
    return data.draw(st.sampled_from(ENV_TEXTS), label="env value")


@fuzz_settings(40)
@given(data=st.data())
def test_from_env(data: st.DataObject, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
                  ) -> None:
    """``CheckpointManager.from_env`` and ``BlockingManager.from_env`` with variables set in
    the environment (values the environment can hold: no NUL, no lone surrogate)."""
    with monkeypatch.context() as patch:
        patch.chdir(tmp_path)
        for name in list(os.environ):
            if name.startswith(("FASTCHECKPOINT_", "CHECKPOINT_")):
                patch.delenv(name)
        for name in data.draw(st.lists(st.sampled_from(ENV_NAMES), max_size=4), label="env"):
            patch.setenv(name, _text(data))
        for cls in (CheckpointManager, BlockingManager):
            built, _ = check_call(f"{cls.__name__}.from_env", cls.from_env, Drawn())
            if isinstance(built, BlockingManager):
                built.close()
            elif built is not None:
                anyio.run(built.aclose)


URLS = ["memory://", "memory://x?y=1", "file://{tmp}/f", "{tmp}/plain", "sqlite:///{tmp}/a.db",
        "sqlite:///{tmp}/a.db?synchronous=normal", "sqlite:///{tmp}/a.db?timeout=-1",
        "sqlite:///{tmp}/a.db?synchronous=bogus", "file:///", "sqlite://", "sqlite:runs.db",
        "nope://x", "redis://[::1", "~no-such-user-fuzz/x", "{tmp}/with\x00nul",
        "{tmp}/" + "d" * 300, "file://{tmp}/\ud800", "sqlite:///{tmp}/\ud800.db",
        "sqlite:///{tmp}/" + "e" * 300 + ".db", "{tmp}/\x1b", "memory://\ud800"]
OPTION_NAMES = ["fsync", "synchronous", "timeout", "retry", "bogus"]


@fuzz_settings(60)
@given(data=st.data())
def test_open_store(data: st.DataObject, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                    ) -> None:
    """``open_store(url, **options)`` (and so each local store's ``from_url``), with
    ``CheckpointManager(store, config)`` and ``BlockingManager(target, ...)`` over it."""
    monkeypatch.chdir(tmp_path)  # a hostile plain path is made here
    drawn = Drawn()
    if data.draw(st.booleans(), label="url from the list?"):
        url = data.draw(st.sampled_from(URLS), label="url").format(tmp=tmp_path)
        drawn.labels.append(f"url={url[:60]!r}")
    else:
        label, url = draw_value(data, "url", None)
        drawn.labels.append(label)
    drawn.args.append(url)
    for name in data.draw(st.lists(st.sampled_from(OPTION_NAMES), max_size=3, unique=True),
                          label="options"):
        label, value = draw_value(data, name, None)
        drawn.kwargs[name] = value
        drawn.labels.append(label)
    store, _ = check_call("open_store", open_store, drawn)
    if store is None:
        return
    try:
        for cls in (CheckpointManager, BlockingManager):
            made = Drawn()
            made.args.append(store)
            label, config = draw_value(data, "config", None)
            made.kwargs["config"] = config
            made.labels += ["store", f"config={label}"]
            check_call(cls.__name__, cls, made)
    finally:
        anyio.run(store.aclose)


REGISTER_VALID: dict[str, list[Any]] = {
    "scheme": ["fuzzstore", "Fuzz+Store.v2", "memory"],
    "target": ["fastcheckpoint.stores.memory:MemoryStore", "no_such_module_fuzz.x:Store",
               "json:JSONDecoder", "fastcheckpoint.stores.memory:NoSuchClass"],
    "extra": [None, "redis", "my-extra"],
    "remote": [False, True],
    "replace": [False, True],
}


@fuzz_settings(60)
@given(data=st.data())
def test_register_store(data: st.DataObject, monkeypatch: pytest.MonkeyPatch) -> None:
    """``register_store(...)`` with each argument valid or hostile: it registers or raises a
    ``CheckpointError`` with the registry unchanged; ``open_store`` of what it registered
    returns a store or raises a ``CheckpointError``."""
    monkeypatch.setattr(stores_module, "_REGISTRY", dict(stores_module._REGISTRY))
    drawn = Drawn()
    for name, valid in REGISTER_VALID.items():
        if data.draw(st.booleans(), label=f"{name} valid?"):
            value = data.draw(st.sampled_from(valid), label=name)
            drawn.labels.append(f"{name}={value!r}")
        else:
            label, value = draw_value(data, name, None)
            drawn.labels.append(label)
        if name in ("scheme", "target"):
            drawn.args.append(value)
        else:
            drawn.kwargs[name] = value
    before = dict(stores_module._REGISTRY)
    _, raised = check_call("register_store", register_store, drawn)
    if raised is not None:
        assert before == stores_module._REGISTRY, drawn.labels
        return
    opened = Drawn()
    opened.args.append(f"{str.lower(drawn.args[0])}://fuzz")
    opened.labels.append(f"url={opened.args[0]!r}")
    store, _ = check_call("open_store", open_store, opened)
    if store is not None:
        anyio.run(store.aclose)


MODEL_METHODS = ("to_dict", "to_json")


@fuzz_settings(40)
@given(data=st.data())
def test_model(data: st.DataObject) -> None:
    """``Checkpoint`` and ``CheckpointMetadata``: constructors, then ``to_dict``/``to_json``
    of what they built, and ``from_dict``/``from_json`` of hostile values and of what
    ``to_dict``/``to_json`` wrote."""
    for cls in (CheckpointMetadata, Checkpoint):
        drawn = draw_call(data, _fields_signature(cls), None)
        if cls is Checkpoint and data.draw(st.booleans(), label="valid metadata?"):
            drawn.kwargs["metadata"] = CheckpointMetadata(run_id="r", checkpoint_id="ck")
        instance, _ = check_call(cls.__name__, cls, drawn, signature=inspect.signature(cls))
        for name in MODEL_METHODS if instance is not None else ():
            written, _ = check_call(f"{cls.__name__}.{name}", getattr(instance, name), Drawn())
            reader = cls.from_dict if name == "to_dict" else getattr(cls, "from_json", None)
            if written is not None and reader is not None:
                again = Drawn()
                again.args.append(written)
                again.labels.append(f"what {name} wrote")
                check_call(f"{cls.__name__}.{reader.__name__}", reader, again)
        for reader_name in ("from_dict", "from_json"):
            reader = getattr(cls, reader_name, None)
            if reader is None:
                continue
            drawn = Drawn()
            label, value = draw_value(data, "data", None)
            if data.draw(st.booleans(), label="wrapped in a checkpoint dict?"):
                value = {"metadata": value, "state": {"a": value}}
                label = f"{{'metadata': {label}}}"
            drawn.args.append(value)
            drawn.labels.append(label)
            check_call(f"{cls.__name__}.{reader_name}", reader, drawn)


def test_hostile_pool_is_what_it_says() -> None:
    """The pool's trick objects do what their names say, so that a pass means something."""
    with pytest.raises(Boom):
        hash(NastyStr("a"))
    with pytest.raises(Boom):
        repr(BadRepr())
    with pytest.raises(RecursionError):
        repr(RecursiveRepr())
    with pytest.raises(RecursionError):
        repr(HOSTILE["deep list"]())
    with pytest.raises(ValueError, match="digits"):
        str(HOSTILE["10**5000"]())
    assert sys.getrecursionlimit() < DEEP
    assert fastcheckpoint.CheckpointError is CheckpointError


# -- what the fuzz found, one deterministic case each --------------------------------------


def test_a_str_subclass_is_taken_for_the_text_it_holds(portal: BlockingPortal,
                                                        scratch: Path) -> None:
    """Run ids and approvers that are ``str`` subclasses with raising ``__hash__``/``__len__``
    (they reached ``lru_cache`` and ``if not who``); JSON text of such a subclass."""
    directory = scratch / "str-subclass"
    directory.mkdir()
    world = World("memory", portal, directory)
    try:
        created = portal.call(world.manager.create, NastyStr("alpha"), {"a": 1})
        assert created is not None
        assert type(created.run_id) is str
        approved = portal.call(functools.partial(
            world.manager.approve, "beta", approver=NastyStr("ana")))
        assert approved.status is CheckpointStatus.ACTIVE
        with pytest.raises(ValidationError, match="force"):
            portal.call(functools.partial(world.manager.create, "alpha", {}, force="yes"))
        manager, newest = world.manager, NastyStr(created.checkpoint_id)
        assert portal.call(manager.restore_from, newest) is not None
        assert portal.call(manager.lineage, newest)[0].checkpoint_id == created.checkpoint_id
        forked = portal.call(manager.fork, newest, "forked")
        assert forked.metadata.parent_id == created.checkpoint_id
        child = portal.call(functools.partial(manager.create, "alpha", {}, parent_id=newest))
        assert child is not None
        assert child.metadata.parent_id == created.checkpoint_id
        assert portal.call(manager.delete, NastyStr(child.checkpoint_id)) is True
        exported = portal.call(_invoke, manager.export_run, ["beta", NastyStr("csv")], {})
        assert exported
    finally:
        world.close()
    text = Checkpoint(CheckpointMetadata("r", "c", created_at=1.0)).to_json()
    assert Checkpoint.from_json(NastyStr(text)).run_id == "r"


@pytest.mark.parametrize("environ", ["", 5, {1: "x"}, {"FASTCHECKPOINT_URL": 5},
                                     {"FASTCHECKPOINT_CLEANUP_INTERVAL": None}])
def test_from_env_refuses_an_environ_that_is_not_one(environ: Any) -> None:
    for read in (CheckpointConfig.from_env, CheckpointManager.from_env):
        with pytest.raises(ConfigurationError, match="environ"):
            read(environ)


@pytest.mark.parametrize("url", ["{tmp}/\ud800", nested_list(DEEP), BadRepr(), NastyStr("")],
                         ids=["lone-surrogate", "deep", "bad-repr", "empty-nasty-str"])
def test_open_store_refuses_what_cannot_be_a_path(url: Any, tmp_path: Path) -> None:
    if isinstance(url, str):
        url = url.format(tmp=tmp_path)
    with pytest.raises(ConfigurationError):
        open_store(url)


@pytest.mark.parametrize(("url", "option"), [
    ("file://{tmp}/f", "fsync"),
    ("sqlite:///{tmp}/a.db", "synchronous"),
    ("sqlite:///{tmp}/a.db", "timeout"),
])
@pytest.mark.parametrize("value", [nested_list(DEEP), BadRepr()], ids=["deep", "bad-repr"])
def test_open_store_refuses_an_option_whose_repr_fails(
    url: str, option: str, value: Any, tmp_path: Path
) -> None:
    with pytest.raises(ConfigurationError, match=option):
        open_store(url.format(tmp=tmp_path), **{option: value})


def test_open_store_takes_a_str_subclass_for_its_text(tmp_path: Path) -> None:
    store = open_store(NastyStr(f"sqlite:///{tmp_path}/a.db"))
    assert isinstance(store, SQLiteStore)
    anyio.run(store.aclose)


@pytest.mark.parametrize(("fields", "field"), [
    ({"run_id": "r", "tags": None}, "tags"),
    ({"run_id": None}, "run_id"),
    ({"run_id": "r", "sequence": True}, "sequence"),
    ({"run_id": "r", "created_at": "now"}, "created_at"),
    ({"run_id": "r", "status": "sleeping"}, "status"),
])
def test_metadata_built_by_hand_is_checked(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        CheckpointMetadata(**fields)


def test_metadata_and_checkpoint_take_a_status_name_and_refuse_a_wrong_payload() -> None:
    assert CheckpointMetadata("r", status="paused").status is CheckpointStatus.PAUSED
    with pytest.raises(ValidationError, match="metadata"):
        Checkpoint(5)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="messages"):
        Checkpoint(CheckpointMetadata("r"), messages=None)  # type: ignore[arg-type]


STORE_CALLS: list[tuple[str, dict[str, Any]]] = [
    ("list_runs", {"status": None, "limit": 0, "cursor": None}),
    ("list_runs", {"status": None, "limit": "2", "cursor": None}),
    ("list_runs", {"status": None, "limit": 5, "cursor": BadRepr()}),
    ("list_runs", {"status": {"a": 1}, "limit": 5, "cursor": None}),
    ("count_runs", {"status": ["paused"]}),
    ("purge_expired", {"limit": 5, "now": 10**400}),
    ("purge_expired", {"limit": "5"}),
    ("headers", {"run_key": "RUN", "before": None, "limit": 5, "include_expired": NastyStr()}),
    ("get", {"run_key": NastyStr("RUN"), "sequence": 0}),
    ("get_items", {"run_key": "RUN", "keys": 5}),
    ("get_items", {"run_key": "RUN", "keys": [NastyStr("loose/1")]}),
    ("delete_items", {"run_key": "RUN", "keys": 5}),
    ("scan_items", {"run_key": "RUN", "prefix": None}),
    ("scan_items", {"run_key": "RUN", "start_after": 5}),
    ("scan_items", {"run_key": "RUN", "reverse": NastyStr()}),
    ("put_items", {"run_key": "RUN", "items": [Item(key=NastyStr("k"), value=b"v")]}),
    ("put_items", {"run_key": "RUN", "items": [make_item("k")], "create_only": NastyStr()}),
    ("put_owned_items", {"run_key": "RUN", "items": [], "owner": BadRepr(),
                         "checkpoint_id": "c", "if_absent": False}),
    ("runs_with_label", {"label": NastyStr("x"), "limit": 5, "cursor": None}),
    ("runs_with_label", {"label": "x", "limit": 5, "cursor": 7}),
    ("cleanup_expired", {"batch_size": nested_list(DEEP)}),
    ("update_run", {"run_key": "RUN", "incarnation": "INC", "version": 0, "status": "active",
                    "data": b"", "latest_sequence": RecursiveRepr()}),
    ("damaged_runs", {"now": BadRepr()}),
    ("update_run", {"run_key": "RUN", "incarnation": NastyStr("INC"), "version": 0,
                    "status": "active", "data": b""}),
    ("update_run", {"run_key": "RUN", "incarnation": "INC", "version": 0, "status": ["a"],
                    "data": b""}),
    ("update_run", {"run_key": "RUN", "incarnation": "INC", "version": 0, "status": "active",
                    "data": "text"}),
    ("get", {"run_key": "RUN", "sequence": "0"}),
    ("headers", {"run_key": "RUN", "before": "3", "limit": 5}),
    ("delete", {"run_key": "RUN", "sequence": 0, "checkpoint_id": NastyStr("c")}),
]
"""Store calls that leaked a TypeError, AttributeError, IndexError, OverflowError,
RecursionError or an error of the value itself (``RUN``: a run key the store holds)."""


def _run_key_for(value: Any, world: World) -> Any:
    """``value``, with ``"RUN"`` and ``"INC"`` (plain or a NastyStr) standing for a run key
    the store holds and its incarnation (so that the call gets past the compare-and-set)."""
    if isinstance(value, str) and str.__str__(value) == "RUN":
        return type(value)(world.run_keys[0])
    if isinstance(value, str) and str.__str__(value) == "INC":
        return type(value)(world.records[world.run_keys[0]].incarnation)
    return value


def fixed_call(world: World, method: str, kwargs: dict[str, Any]) -> Drawn:
    """A fixed call of the store's ``method``: ``kwargs`` with the world's run keys put in
    (see :func:`_run_key_for`) and its clock's ``now`` when the method takes one."""
    arguments = {name: _run_key_for(value, world) for name, value in kwargs.items()}
    parameters = inspect.signature(getattr(world.store, method)).parameters
    if "now" in parameters and "now" not in arguments:
        arguments["now"] = world.clock()
    drawn = Drawn()
    drawn.kwargs = arguments
    drawn.labels = [f"{name}=..." for name in arguments]
    return drawn


@pytest.mark.parametrize("kind", FUZZ_KINDS)
@pytest.mark.parametrize(("method", "kwargs"), STORE_CALLS,
                         ids=[f"{m}-{i}" for i, (m, _) in enumerate(STORE_CALLS)])
def test_a_store_refuses_a_bad_argument_and_changes_nothing_or_takes_it(
    kind: str, method: str, kwargs: dict[str, Any], portal: BlockingPortal, scratch: Path
) -> None:
    directory = scratch / f"refuses-{kind}-{method}-{next(_worlds)}"
    directory.mkdir()
    world = World(kind, portal, directory)
    try:
        _, raised = check_call(f"{kind}.{method}", getattr(world.store, method),
                               fixed_call(world, method, kwargs), portal=portal, world=world)
        # Refused, or taken for what it holds (a str subclass's text; a now a store that
        # decides nothing by it never reads): never another error, never a change.
        assert raised is None or isinstance(raised, ValidationError), raised
    finally:
        world.close()
