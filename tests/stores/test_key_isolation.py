"""Distinct names never share data, on every store: run ids, labels, item keys and store
prefixes that are prefixes of each other, differ only in case or in Unicode normalization,
carry the characters that glob patterns, SQL ``LIKE``, S3 prefixes or DynamoDB
``begins_with`` treat specially, look like paths or percent-encodings, hold control
characters, or are as long as allowed.

Each test writes every name of a family, then reads, lists, deletes and cleans up some of
them and checks that every other name still holds exactly its own data and that no listing
returns another name's.
"""

from __future__ import annotations

import unicodedata
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastcheckpoint import CheckpointManager
from fastcheckpoint.stores import (
    CheckpointStore,
    SupportsLabels,
    SupportsRepair,
)
from fastcheckpoint.testing import (
    T0,
    key_of,
    make_checkpoint,
    make_item,
    make_run,
)
from tests._helpers import FakeClock, make_config
from tests.stores._every_store import KINDS, PREFIXED_KINDS, StorePlace
from tests.stores._moto import moto_endpoint
from tests.stores.conftest import redis_target
from tests.stores.s3.test_s3 import s3_bucket

__all__ = ["moto_endpoint", "redis_target", "s3_bucket"]

pytestmark = pytest.mark.anyio

DEADLINE = 40

_NFC = unicodedata.normalize("NFC", "caf\u00e9")
_NFD = unicodedata.normalize("NFD", "caf\u00e9")
_PATTERN_CHARS = ("*", "?", "[", "]", "%", "_", "\\", "^", "-", "{", "}")

RUN_IDS = (
    "a", "a:", "a:b", "a/b", "a\x1fb", "a#1", "A", "Run", "run", "RUN", _NFC, _NFD,
    *_PATTERN_CHARS, "a*", "a?", "a[b]", "a%", "a_", "a\\", "a\\b", "[a-z]*",
    "..", ".", "/", "a/", "//", "a//b", "../a", "a%2Fb", "a%2fb",
    "a\x00", "a\x00b", "\x00", "\x01", "a\n", "a\r\n", " a", "a ", "\u200b", "a\ufeff",
    "x" * 4096, "x" * 4095 + "y", "x" * 4095, "\u00e9" * 2048,
)
"""Run ids that look alike; ``x`` * 4096 is the longest a run id may be (in UTF-8 bytes)."""

EXPIRING = ("a", "*", "%", "..", "a\x00", "x" * 4096, _NFC)
DELETED = ("a:", "Run", "_", "/", "a%2Fb", "a\x1fb", "x" * 4095, _NFD)

LABELS = (
    "a", "a:", "a:b", "a/b", "a/", "A", "Run", "run", _NFC, _NFD,
    *_PATTERN_CHARS, "a*", "a?", "a%", "a_", "a\\", "[a]", "a\x00", "a\x1fb", "..", "l" * 256,
    "l" * 255,
)
"""Labels that look alike; ``l`` * 256 is the longest a label may be."""
UNUSED_LABELS = ("a*b", "b", "a\x00b", "l" * 254, "ru", "%a")

ITEM_KEYS = (
    "a", "a:", "a:b", "a/", "a/b", "a//", "a//b", "a#1", "A", "Run", "run", _NFC, _NFD,
    *_PATTERN_CHARS, "a*", "a*b", "a?", "a[", "a[b]", "a]", "a%", "a%b", "a%2Fb", "a_", "a_b",
    "a\\", "a\\b", "..", ".", "/", "a\x00", "a\x00b", "a\x01", "a\x1fb", "a\x7f", "a\uffff",
    "a\U0010ffff", "a\U0010ffffb", "\U0010ffff", "k" * 128, "k" * 127, "\u00e9" * 64,
)
"""Item keys that look alike; ``k`` * 128 is the longest an item key may be."""
ITEM_PREFIXES = (*ITEM_KEYS, "a\\_", "a%_", "[a-z]", "a.", "\U0010ffff\U0010ffff", "k" * 5)


SLOW_KINDS = ("s3", "dynamodb")
"""moto answers a request in tens of milliseconds: these get every fourth name of a family,
so the file stays within a minute."""


def _family(place: StorePlace, names: Sequence[str]) -> list[str]:
    return list(names[::4] if place.kind in SLOW_KINDS else names)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore and redis-py run on asyncio


@pytest.fixture(params=KINDS)
def unopened(request: pytest.FixtureRequest, tmp_path: Path) -> StorePlace:
    return StorePlace(request.param, request, tmp_path)


@pytest.fixture(params=PREFIXED_KINDS)
def unopened_shared(request: pytest.FixtureRequest, tmp_path: Path) -> StorePlace:
    return StorePlace(request.param, request, tmp_path)


@pytest.fixture
async def place(unopened: StorePlace) -> AsyncIterator[StorePlace]:
    yield unopened
    await unopened.aclose()


@pytest.fixture
async def shared_place(unopened_shared: StorePlace) -> AsyncIterator[StorePlace]:
    yield unopened_shared
    await unopened_shared.aclose()


def _state(run_id: str, where: str = "") -> dict[str, str]:
    return {"run_id": run_id, "where": where}


async def _listed(manager: CheckpointManager) -> list[str]:
    """Every run id ``list_runs`` pages through (duplicates kept)."""
    found: list[str] = []
    cursor = None
    while True:
        page = await manager.list_runs(limit=7, cursor=cursor)
        found += [run.run_id for run in page.runs]
        cursor = page.next_cursor
        if cursor is None:
            return found


async def _holds_exactly(
    manager: CheckpointManager, alive: Sequence[str], gone: Sequence[str], where: str = ""
) -> None:
    """Each run of ``alive`` holds its own checkpoint and nothing else; those of ``gone`` hold
    nothing; listings name ``alive`` once each."""
    for run_id in alive:
        restored = await manager.restore(run_id)
        assert restored is not None, f"run {run_id!r:.40} lost its checkpoint"
        assert (restored.run_id, restored.state) == (run_id, _state(run_id, where))
        listed = await manager.list_checkpoints(run_id)
        assert [(meta.run_id, meta.checkpoint_id) for meta in listed] == [
            (run_id, restored.checkpoint_id)]
    for run_id in gone:
        assert await manager.restore(run_id) is None, f"run {run_id!r:.40} is still there"
        assert await manager.get_run(run_id) is None
    assert sorted(await _listed(manager)) == sorted(alive)
    assert await manager.count_runs() == len(alive)


async def test_run_ids_that_look_alike_keep_their_own_checkpoints(place: StorePlace) -> None:
    assert len(set(RUN_IDS)) == len(RUN_IDS)
    run_ids = _family(place, RUN_IDS)
    expiring = [run_id for run_id in run_ids if run_id in EXPIRING]
    deleted = [run_id for run_id in run_ids if run_id in DELETED]
    clock = FakeClock()
    with anyio.fail_after(DEADLINE):
        manager = CheckpointManager(await place.store(), make_config(clock))
        for run_id in run_ids:
            await manager.create(run_id, _state(run_id),
                                 ttl_seconds=10 if run_id in expiring else None)
        await _holds_exactly(manager, run_ids, [])

        clock.advance(20)
        assert await manager.cleanup_expired() == len(expiring)
        alive = [run_id for run_id in run_ids if run_id not in expiring]
        await _holds_exactly(manager, alive, expiring)

        for run_id in deleted:
            assert await manager.delete_run(run_id) == 1
        alive = [run_id for run_id in alive if run_id not in deleted]
        await _holds_exactly(manager, alive, deleted)


async def _labelled(store: CheckpointStore, label: str) -> list[str]:
    assert isinstance(store, SupportsLabels)
    found: list[str] = []
    cursor = None
    while True:
        runs, cursor = await store.runs_with_label(label, limit=3, cursor=cursor, now=T0)
        found += [run.run_id for run in runs]
        if cursor is None:
            return found


async def test_labels_that_look_alike_find_only_their_own_runs(place: StorePlace) -> None:
    assert len(set(LABELS)) == len(LABELS)
    labels = _family(place, LABELS)
    removed_labels = [label for label in ("a", "*", "%", "_", "Run", _NFC) if label in labels]
    with anyio.fail_after(DEADLINE):
        store = await place.store()
        if not isinstance(store, SupportsLabels):
            pytest.skip(f"{type(store).__name__} does not offer labels")
        carrying: dict[str, list[str]] = {label: [] for label in labels}
        for number, label in enumerate(labels):
            # Each label on a run of its own, and on a run that carries the one before too.
            for run_id, carried in ((f"one {number}", (label,)),
                                    (f"two {number}", (label, labels[number - 1]))):
                run = msgspec.structs.replace(make_run(run_id), labels=carried)
                await store.append(key_of(run), make_checkpoint(run, 0), run=run,
                                   keep_latest=None, now=T0)
                for each in carried:
                    carrying[each].append(run_id)
        for label, run_ids in carrying.items():
            assert sorted(await _labelled(store, label)) == sorted(run_ids), repr(label)
        for label in UNUSED_LABELS:
            assert await _labelled(store, label) == [], repr(label)

        removed = {f"one {labels.index(label)}" for label in removed_labels}
        for run_id in sorted(removed):
            assert await store.delete_run(key_of(make_run(run_id))) == 1
        for label, run_ids in carrying.items():
            expected = sorted(set(run_ids) - removed)
            assert sorted(await _labelled(store, label)) == expected, repr(label)


def _value(run: str, key: str) -> bytes:
    return f"{run}:{key}".encode()


async def _scan(
    store: CheckpointStore, run_key: str, *, prefix: str = "", start_after: str | None = None,
    reverse: bool = False,
) -> list[tuple[str, bytes]]:
    found: list[tuple[str, bytes]] = []
    while True:
        page = await store.scan_items(run_key, prefix=prefix, start_after=start_after,
                                      limit=50, reverse=reverse, now=T0)
        found += page
        if len(page) < 50:
            return found
        start_after = page[-1][0]


async def test_item_keys_that_look_alike_are_scanned_apart(place: StorePlace) -> None:
    assert len(set(ITEM_KEYS)) == len(ITEM_KEYS)
    keys = _family(place, ITEM_KEYS)
    removed = [key for key in ("a", "*", "%", "_", "a\\", _NFC, "a\x00", "k" * 128,
                               "a\U0010ffff") if key in keys]
    ordered = sorted(keys)  # code point order: the order of every store
    with anyio.fail_after(DEADLINE):
        store = await place.store()
        ours, theirs = key_of(make_run("items a")), key_of(make_run("items b"))
        for run_key in (ours, theirs):
            await store.put_items(run_key, [make_item(key, _value(run_key, key))
                                            for key in keys], now=T0)

        def expected(keys: Sequence[str]) -> list[tuple[str, bytes]]:
            return [(key, _value(ours, key)) for key in keys]

        for prefix in _family(place, ITEM_PREFIXES):
            under = [key for key in ordered if key.startswith(prefix)]
            assert await _scan(store, ours, prefix=prefix) == expected(under), repr(prefix)
            assert await _scan(store, ours, prefix=prefix, reverse=True) == \
                expected(under[::-1]), repr(prefix)
        for number, key in enumerate(ordered):
            assert await _scan(store, ours, start_after=key) == \
                expected(ordered[number + 1:]), repr(key)
            assert await _scan(store, ours, start_after=key, reverse=True) == \
                expected(ordered[:number][::-1]), repr(key)
        assert await store.get_items(ours, keys, now=T0) == dict(expected(keys))

        assert await store.delete_items(ours, removed) == len(removed)
        kept = [key for key in ordered if key not in removed]
        assert await _scan(store, ours) == expected(kept)
        assert await store.get_items(ours, removed, now=T0) == {}
        await store.delete_run(ours)
        assert await _scan(store, ours) == []
        assert await _scan(store, theirs) == [(key, _value(theirs, key)) for key in ordered]



_TRICKY = "ab/:%_*?[]\\^\x00\x1f\u00e9\u0301A\uffff\U0010ffff"
"""Characters that patterns, ranges and byte orders may treat specially."""


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keys=st.lists(st.text(_TRICKY, min_size=1, max_size=5), min_size=1, max_size=10,
                     unique=True),
       prefix=st.text(_TRICKY, max_size=3), after=st.text(_TRICKY, max_size=3))
async def test_item_scans_return_exactly_the_keys_a_prefix_and_bound_select(
    place: StorePlace, keys: list[str], prefix: str, after: str
) -> None:
    if place.kind in SLOW_KINDS:
        pytest.skip("the examples above cover the moto stores")
    store = await place.first()
    run_key = key_of(make_run(f"scan {keys!r} {prefix!r} {after!r}"))
    with anyio.fail_after(DEADLINE):
        await store.put_items(run_key, [make_item(key, _value(run_key, key)) for key in keys],
                              now=T0)
        under = sorted(key for key in keys if key.startswith(prefix))
        expected = [(key, _value(run_key, key)) for key in under if key > after]
        found = await store.scan_items(run_key, prefix=prefix, start_after=after, limit=100,
                                       now=T0)
        assert found == expected
        backwards = [(key, _value(run_key, key)) for key in reversed(under) if key < after]
        found = await store.scan_items(run_key, prefix=prefix, start_after=after or None,
                                       limit=100, reverse=True, now=T0)
        assert found == (backwards if after else expected[::-1])
        await store.delete_run(run_key)


PREFIX_PAIRS = (("p", "pp"), ("p", "p_"), ("p:", "p::"), ("", "p"), ("", ":p"), ("", "/runs"))
"""Prefixes of two stores in one place (appended to the place's own prefix)."""
ONE_STORE = {"redis": ("p", "p:"), "s3": ("p", "p/")}
"""Prefixes that name one namespace: two stores with them are one store."""


def _prefix_pair(kind: str, first: str, second: str) -> None:
    """Skip a pair that a kind does not take or that says nothing new on it."""
    if kind == "postgres" and not all(
        character.isalnum() or character == "_" for character in first + second
    ):
        pytest.skip("PostgreSQL table prefixes are letters, digits and _")
    if kind == "s3" and (":" in first + second or second in ("p_", "p")):
        pytest.skip("S3 treats ':' and '_' like any letter: ('p', 'pp') covers them")


@pytest.mark.parametrize(("first", "second"), PREFIX_PAIRS)
async def test_stores_with_prefixes_that_look_alike_share_nothing(
    shared_place: StorePlace, first: str, second: str
) -> None:
    _prefix_pair(shared_place.kind, first, second)
    clocks = [FakeClock(), FakeClock()]
    with anyio.fail_after(DEADLINE):
        stores = [await shared_place.store(first), await shared_place.store(second)]
        managers = [CheckpointManager(store, make_config(clock))
                    for store, clock in zip(stores, clocks, strict=True)]
        names = ("first", "second")
        for manager, name in zip(managers, names, strict=True):
            for run_id in ("shared", "expiring", f"only {name}"):
                await manager.create(run_id, _state(run_id, name),
                                     ttl_seconds=10 if run_id == "expiring" else None)
        for manager, name, other in ((managers[0], "first", "second"),
                                     (managers[1], "second", "first")):
            await _holds_exactly(manager, ["shared", "expiring", f"only {name}"],
                                 [f"only {other}"], name)

        # The first store deletes, cleans up and looks for damage: the second is untouched.
        assert await managers[0].delete_run("shared") == 1
        clocks[0].advance(20)
        assert await managers[0].cleanup_expired() == 1
        if isinstance(stores[0], SupportsRepair):
            assert await stores[0].damaged_runs(now=clocks[0]()) == []
        await _holds_exactly(managers[0], ["only first"], ["shared", "expiring"], "first")
        await _holds_exactly(managers[1], ["shared", "expiring", "only second"], [], "second")


async def test_prefixes_that_name_one_namespace_are_one_store(shared_place: StorePlace) -> None:
    """Never half of one: what one writes, the other reads and lists, and deletes."""
    if shared_place.kind not in ONE_STORE:
        pytest.skip(f"no two {shared_place.kind} prefixes name one namespace")
    first, second = ONE_STORE[shared_place.kind]
    with anyio.fail_after(DEADLINE):
        stores = [await shared_place.store(first), await shared_place.store(second)]
        managers = [CheckpointManager(store, make_config(FakeClock())) for store in stores]
        await managers[0].create("made by the first", _state("made by the first"))
        await managers[1].create("made by the second", _state("made by the second"))
        for manager in managers:
            await _holds_exactly(manager, ["made by the first", "made by the second"], [])
        assert await managers[1].delete_run("made by the first") == 1
        for manager in managers:
            await _holds_exactly(manager, ["made by the second"], ["made by the first"])


THREAD_IDS = (
    "a", "A", "a:b", "a/b", "a=b", "a#1", _NFC, _NFD, "*", "a*", "%", "a%", "_", "a_",
    "langgraph", "langgraph run index", "a\x00", "t" * 300, "t" * 301,
)
"""LangGraph thread ids that look alike; past 200 bytes the saver's thread label is hashed."""


async def test_langgraph_threads_that_look_alike_keep_their_own_checkpoints(
    place: StorePlace,
) -> None:
    if place.kind in SLOW_KINDS:
        pytest.skip("the saver calls what the label and item tests check on moto, at ~10 s")
    pytest.importorskip("langgraph")
    from fastcheckpoint.errors import ValidationError
    from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
    from tests.integrations._langgraph_support import config, put

    threads = THREAD_IDS
    deleted = ("a", "*", "%", "_", _NFC)
    with anyio.fail_after(DEADLINE):
        store = await place.store()
        if not isinstance(store, SupportsLabels):
            pytest.skip(f"{type(store).__name__} does not offer labels")
        saver = FastCheckpointSaver(store, config=make_config(FakeClock()))
        with pytest.raises(ValidationError):
            await put(saver, "a\x1fsub", values={"who": "a\x1fsub"}, versions={"who": 1})
        for thread in threads:
            for ns in ("", "sub", "sub\x1fdeeper"):
                await put(saver, thread, ns=ns, values={"who": f"{thread}|{ns}"},
                          versions={"who": 1})

        async def holds_exactly(alive: Sequence[str], gone: Sequence[str]) -> None:
            for thread in alive:
                for ns in ("", "sub", "sub\x1fdeeper"):
                    found = await saver.aget_tuple(config(thread, ns=ns))
                    assert found is not None, (thread, ns)
                    assert found.checkpoint["channel_values"] == {"who": f"{thread}|{ns}"}
                listed = [item.config["configurable"] async for item in saver.alist(
                    {"configurable": {"thread_id": thread}})]
                assert sorted((each["thread_id"], each["checkpoint_ns"]) for each in listed) \
                    == [(thread, ""), (thread, "sub"), (thread, "sub\x1fdeeper")]
            for thread in gone:
                assert await saver.aget_tuple(config(thread)) is None
                assert [item async for item in saver.alist(
                    {"configurable": {"thread_id": thread}})] == []
            everything = [item.config["configurable"]["thread_id"]
                          async for item in saver.alist(None)]
            assert sorted(everything) == sorted(3 * list(alive))

        await holds_exactly(threads, [])
        for thread in deleted:
            await saver.adelete_thread(thread)
        await holds_exactly([thread for thread in threads if thread not in deleted], deleted)
