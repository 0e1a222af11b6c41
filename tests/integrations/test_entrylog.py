"""The entry log the session adapters share, on every store: appends, pops, compare-and-set,
writers with stale views, sliding TTL, costs and the segments it leaves behind."""

from __future__ import annotations

import math
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastcheckpoint import _ids
from fastcheckpoint.errors import (
    ConfigurationError,
    CorruptCheckpointError,
    SequenceConflict,
    StoreUnavailableError,
    ValidationError,
)
from fastcheckpoint.integrations._entrylog import SEAL_BYTES, EntryLog, StaleLog
from fastcheckpoint.stores import CheckpointStore, SupportsSharedItems
from fastcheckpoint.stores.memory import MemoryStore
from tests._helpers import FakeClock
from tests.integrations._langgraph_support import CountingStore
from tests.integrations.conftest import FreshStore

pytestmark = pytest.mark.anyio


def _entries(count: int, start: int = 0) -> list[bytes]:
    return [f"entry-{index}".encode() for index in range(start, start + count)]


async def test_append_read_pop_and_clear(fresh_store: FreshStore, clock: FakeClock) -> None:
    async with fresh_store() as store:
        log = EntryLog(store, "session-1", labels=("app:demo",), clock=clock)
        assert await log.read() is None
        assert await log.pop() is None
        first = await log.append(_entries(2), state=b"s1")
        assert first.revision == 0
        clock.advance(1)
        second = await log.append(_entries(1, 2))
        assert second.revision == 1
        assert second.created_at == first.created_at < second.updated_at
        view = await EntryLog(store, "session-1", clock=clock).read()
        assert view is not None
        assert view.entries == _entries(3)
        assert view.state == b"s1"  # kept when a change gives none
        assert (view.revision, view.updated_at) == (1, second.updated_at)
        assert await log.pop() == b"entry-2"
        await log.append([b"late"], state=b"s2")
        view = await log.read()
        assert view is not None
        assert view.entries == [b"entry-0", b"entry-1", b"late"]
        assert view.state == b"s2"
        assert await log.clear() is True
        assert await log.read() is None
        assert await log.clear() is False
        await log.append([b"again"])
        view = await log.read()
        assert view is not None
        assert view.entries == [b"again"]
        assert view.revision == 0


async def test_compare_and_set(fresh_store: FreshStore, clock: FakeClock) -> None:
    async with fresh_store() as store:
        log = EntryLog(store, "cas", clock=clock)
        with pytest.raises(StaleLog) as absent:
            await log.append([b"x"], expect=0)
        assert absent.value.revision == -1
        await log.append([b"a"], expect=-1)
        other = EntryLog(store, "cas", clock=clock)
        with pytest.raises(StaleLog) as exists:
            await other.append([b"b"], expect=-1)
        assert exists.value.revision == 0
        await other.append([b"b"], expect=0)
        # ``log`` still believes the log is at revision 0: the store refuses, nothing written.
        with pytest.raises(StaleLog) as stale:
            await log.append([b"c"], expect=0)
        assert stale.value.revision == 1
        view = await log.read()
        assert view is not None
        assert view.entries == [b"a", b"b"]
        with pytest.raises(ValidationError):
            await log.append([b"x"], expect=-2)
        with pytest.raises(ValidationError):
            await log.append(["text"])  # type: ignore[list-item]


async def test_an_expectation_holds_for_one_life_of_the_log(
    fresh_store: FreshStore, clock: FakeClock
) -> None:
    """A log cleared and created again starts again at revision 0: an object that saw
    revision 0 of the old log must not take the new one's revision 0 for it."""
    async with fresh_store() as store:
        old = EntryLog(store, "lives", clock=clock)
        await old.append([b"old"])
        other = EntryLog(store, "lives", clock=clock)
        assert await other.clear() is True
        await other.append([b"new"])
        with pytest.raises(StaleLog, match="recreated"):
            await old.append([b"late"], expect=0)
        view = await other.read()
        assert view is not None
        assert view.entries == [b"new"]


async def test_writers_with_stale_views_lose_nothing(
    fresh_store: FreshStore, clock: FakeClock
) -> None:
    """Several objects (as in several processes) append to one log in turns, each with a view
    the others made stale: every entry is there once, in the order acknowledged."""
    async with fresh_store() as store:
        logs = [EntryLog(store, "shared", clock=clock) for _ in range(3)]
        expected: list[bytes] = []
        for step in range(24):
            entry = f"{step}".encode()
            await logs[step % 3].append([entry])
            expected.append(entry)
            if step % 5 == 4:
                popped = await logs[(step + 1) % 3].pop()
                assert popped == expected.pop()
        view = await logs[0].read()
        assert view is not None
        assert view.entries == expected


async def test_concurrent_pops_never_share_an_entry(
    fresh_store: FreshStore, clock: FakeClock
) -> None:
    async with fresh_store() as store:
        await EntryLog(store, "stack", clock=clock).append(_entries(12))
        popped: list[bytes | None] = []

        async def popper() -> None:
            log = EntryLog(store, "stack", clock=clock)
            for _ in range(4):
                popped.append(await log.pop())

        with anyio.fail_after(60):
            async with anyio.create_task_group() as group:
                for _ in range(4):
                    group.start_soon(popper)
        taken = [entry for entry in popped if entry is not None]
        assert sorted(taken) == sorted(_entries(12))
        assert popped.count(None) == 4
        assert await EntryLog(store, "stack", clock=clock).read() is not None


class _Failing(MemoryStore):
    """The next ``append_with_items`` fails with a store error, after applying the change
    (``applied``: a reply lost once the store's own retries ran out) or without it."""

    def __init__(self) -> None:
        super().__init__()
        self.fail: str | None = None  # "applied" or "not applied", once

    async def append_with_items(self, *args: Any, **kwargs: Any) -> str:
        how, self.fail = self.fail, None
        if how == "not applied":
            raise StoreUnavailableError("the store did not answer")
        status = await super().append_with_items(*args, **kwargs)
        if how == "applied":
            raise StoreUnavailableError("the reply was lost")
        return status


async def test_a_change_whose_reply_was_lost_is_made_once(clock: FakeClock) -> None:
    """The store applied a change and then failed: the call finds its change stored and
    returns (a retry of the caller's would make it twice); a change the store did not apply
    raises, and made again is stored once."""
    store = _Failing()
    log = EntryLog(store, "session-1", clock=clock)
    await log.append(_entries(1))
    store.fail = "applied"
    head = await log.append(_entries(2, 1))
    assert head.revision == 1
    store.fail = "applied"
    assert await log.pop() == b"entry-2"
    store.fail = "not applied"
    with pytest.raises(StoreUnavailableError):
        await log.append(_entries(1, 3))
    await log.append(_entries(1, 3))
    store.fail = "not applied"
    with pytest.raises(StoreUnavailableError):
        await log.pop()
    view = await EntryLog(store, "session-1", clock=clock).read()
    assert view is not None
    assert view.entries == [b"entry-0", b"entry-1", b"entry-3"]


async def test_ttl_slides_and_expiry_leaves_nothing(
    fresh_store: FreshStore, clock: FakeClock
) -> None:
    async with fresh_store() as store:
        log = EntryLog(store, "ttl", ttl_seconds=100, clock=clock)
        await log.append([b"a"])
        clock.advance(60)
        await log.append([b"b"])
        clock.advance(60)  # 120 s after the first change, 60 s after the last
        view = await log.read()
        assert view is not None
        assert view.entries == [b"a", b"b"]
        clock.advance(41)
        assert await log.read() is None
        head = await log.append([b"fresh"])
        assert head.revision == 0
        view = await log.read()
        assert view is not None
        assert view.entries == [b"fresh"]


async def test_segments_stay_few_and_none_is_orphaned(
    fresh_store: FreshStore, kind: str, clock: FakeClock
) -> None:
    steps = 40 if kind in ("s3", "dynamodb") else 200  # moto takes ~0.2 s per append
    async with fresh_store() as store:
        assert isinstance(store, SupportsSharedItems)
        log = EntryLog(store, "long", clock=clock)
        for step in range(steps):
            await log.append([f"{step:04d}".encode() * 8])
        key = _ids.key_of("long")
        found = await store.read_with_items(key, sequence=None, now=clock())
        assert found is not None
        refs = found[0].refs
        assert len(refs) <= math.ceil(math.log2(steps)) + 1
        view = await log.read()
        assert view is not None
        assert view.entries == [f"{step:04d}".encode() * 8 for step in range(steps)]
        for _ in range(20):  # stores may sweep unreferenced segments while purging
            _, done = await store.purge_expired(now=clock(), limit=1000)
            if done:
                break
        held = await store.scan_items(key, prefix="s/", limit=1000, now=clock())
        assert sorted(item_key for item_key, _ in held) == sorted(refs)


async def test_costs_one_store_call(fresh_store: FreshStore, clock: FakeClock) -> None:
    async with fresh_store() as store:
        counting = CountingStore(store)
        log = EntryLog(counting, "costs", clock=clock)  # type: ignore[arg-type]
        await log.append([b"first"])
        assert counting.take() == {"append_with_items": 1}  # a new log: no read first
        for _ in range(3):
            await log.append([b"more"])
            assert counting.take() == {"append_with_items": 1}
        await log.read()
        assert counting.take() == {"read_with_items": 1}
        await log.pop()
        assert counting.take() == {"append_with_items": 1}
        fresh = EntryLog(counting, "costs-new", clock=clock)  # type: ignore[arg-type]
        await fresh.append([b"a"])
        await fresh.pop()  # it created the log: it knows the head
        await fresh.append([b"b"], expect=1)
        assert counting.take() == {"append_with_items": 3}
        await EntryLog(store, "costs", clock=clock).append([b"elsewhere"])
        await log.append([b"stale"])  # refused once, read, appended
        assert counting.take() == {"append_with_items": 2, "read_with_items": 1}


async def test_a_missing_segment_is_a_typed_error(clock: FakeClock) -> None:
    store = MemoryStore()
    log = EntryLog(store, "damaged", clock=clock)
    await log.append([b"a"])
    await log.append([b"b" * 10])  # the older segment is smaller: not merged
    key = _ids.key_of("damaged")
    found = await store.read_with_items(key, sequence=None, now=clock())
    assert found is not None
    await store.delete_items(key, [found[0].refs[0]])
    with pytest.raises(CorruptCheckpointError, match="missing"):
        await log.read()


def test_refuses_a_store_without_shared_items() -> None:
    class Plain:
        pass

    with pytest.raises(ConfigurationError, match="shared items"):
        EntryLog(Plain(), "x")  # type: ignore[arg-type]


class _Model:
    """What the log must hold: a list and a state."""

    def __init__(self) -> None:
        self.entries: list[bytes] = []
        self.state = b""
        self.exists = False


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 2), st.integers(0, 3), st.booleans()),
        st.tuples(st.just("pop"), st.integers(0, 2), st.just(0), st.just(False)),
        st.tuples(st.just("clear"), st.integers(0, 2), st.just(0), st.just(False)),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_OPS, sizes=st.lists(st.integers(1, 300), min_size=4, max_size=4))
def test_random_changes_from_stale_writers_restore_exactly(
    ops: list[tuple[str, int, int, bool]], sizes: list[int]
) -> None:
    async def scenario() -> None:
        store: CheckpointStore = MemoryStore()
        clock = FakeClock()
        logs = [EntryLog(store, "model", clock=clock) for _ in range(3)]
        model = _Model()
        counter = 0
        for op, writer, count, with_state in ops:
            log = logs[writer]
            if op == "append":
                batch = []
                for _ in range(count):
                    batch.append(f"{counter}:".encode() + b"x" * sizes[counter % 4])
                    counter += 1
                state = f"state-{counter}".encode() if with_state else None
                await log.append(batch, state=state)
                model.entries += batch
                model.state = state if state is not None else (
                    model.state if model.exists else b"")
                model.exists = True
            elif op == "pop":
                popped = await log.pop()
                assert popped == (model.entries.pop() if model.entries else None)
            else:
                assert await log.clear() is model.exists
                model.__init__()  # type: ignore[misc]
            view = await logs[(writer + 1) % 3].read()
            if not model.exists:
                assert view is None
            else:
                assert view is not None
                assert view.entries == model.entries
                assert view.state == model.state

    anyio.run(scenario)


async def test_an_append_writes_its_entries_plus_a_bounded_merge(clock: FakeClock) -> None:
    """Bytes written per append do not grow with the log: at most the new entries plus one
    merge of at most SEAL_BYTES; the segments named stay one per SEAL_BYTES plus a few."""
    counting = CountingStore(MemoryStore())
    log = EntryLog(counting, "growing", clock=clock)  # type: ignore[arg-type]
    entry = b"m" * 1000
    most = 0
    for _ in range(1500):  # about 1.5 MB: several sealed segments
        await log.append([entry])
        (_key, record), options = counting.last["append_with_items"]
        written = sum(len(item.value) for item in options["items"])
        most = max(most, written)
        refs = len(record.refs)
    assert most <= SEAL_BYTES + len(entry) + 4096  # msgpack framing of the entries
    total = 1500 * len(entry)
    assert refs <= total // SEAL_BYTES + 1 + math.ceil(math.log2(SEAL_BYTES / len(entry))) + 1
    view = await log.read()
    assert view is not None
    assert view.entries == [entry] * 1500


class _BeingCreatedElsewhere(MemoryStore):
    """The first append is told another process is creating the run (life ``other``); the
    join then fails without landing; later appends go through."""

    def __init__(self, other: str) -> None:
        super().__init__()
        self.other, self.calls = other, 0

    async def append_with_items(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == 1:
            raise SequenceConflict(latest_sequence=-1, incarnation=self.other)
        if self.calls == 2:
            raise StoreUnavailableError("the store did not answer")
        return await super().append_with_items(*args, **kwargs)


async def test_a_later_life_never_reuses_the_incarnation_a_failed_call_joined(
    clock: FakeClock,
) -> None:
    """A first append joins a run another process is creating, and fails; the log is then
    cleared, and the next append begins a new life: with an incarnation of its own (it
    reused the joined one, whose ids and index entries belong to the life that ended)."""
    other = _ids.new_incarnation()
    store = _BeingCreatedElsewhere(other)
    log = EntryLog(store, "session-1", clock=clock)
    with pytest.raises(StoreUnavailableError):
        await log.append(_entries(1))
    await log.clear()
    head = await log.append(_entries(1))
    assert head.incarnation != other
