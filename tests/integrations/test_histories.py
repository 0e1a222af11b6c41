"""Histories: messages and tool calls stored as logs of what each checkpoint adds, on every
store. Every checkpoint restores exactly the lists passed to its create, whatever happened
between: appends, edits in place, shortening, reordering, other writers, deletes, pruning,
expiry, forks."""

from __future__ import annotations

import copy
import random
from typing import Any

import msgspec
import pytest

from fastcheckpoint import CheckpointConfig, CheckpointManager
from fastcheckpoint._logs import LogGap
from fastcheckpoint.errors import CorruptCheckpointError
from fastcheckpoint.stores import CheckpointStore, offers_nested_items
from fastcheckpoint.stores.memory import MemoryStore
from tests._helpers import FakeClock
from tests.integrations._langgraph_support import CountingStore
from tests.integrations.conftest import FreshStore

pytestmark = pytest.mark.anyio

MIN = 4
"""``history_min_entries`` of these tests: lists of 4 entries or more are logs."""


def _manager(store: CheckpointStore, clock: FakeClock, *, keep: int | None = None,
             ttl: float | None = None, min_entries: int | None = MIN) -> CheckpointManager:
    return CheckpointManager(store, CheckpointConfig(
        max_checkpoints_per_run=keep, default_ttl_seconds=ttl, clock=clock,
        history_min_entries=min_entries))


def _message(index: int, text: str = "") -> dict[str, Any]:
    return {"role": "user" if index % 2 else "assistant",
            "content": text or f"message {index} " + "x" * (index % 7)}


async def _log_items(store: CheckpointStore, run_id: str) -> dict[str, bytes]:
    """Every item of the run's logs (anchors ``m/...``, ``t/...`` and what is nested)."""
    from fastcheckpoint import _ids

    found: dict[str, bytes] = {}
    for prefix in ("m/", "t/"):
        after: str | None = None
        while True:
            page = await store.scan_items(_ids.key_of(run_id), prefix=prefix,
                                          start_after=after, limit=100, now=0.0)
            found.update(page)
            if len(page) < 100:
                break
            after = page[-1][0]
    return found


class _Counting(CountingStore):
    """Counts store calls; keeps nested items visible to the manager."""

    @property
    def nested_items(self) -> bool:
        return offers_nested_items(self.inner)


async def test_a_growing_conversation_restores_exactly_and_is_stored_once(
    fresh_store: FreshStore, clock: FakeClock
) -> None:
    async with fresh_store() as store:
        manager = _manager(store, clock)
        messages: list[dict[str, Any]] = []
        tools: list[str] = []
        created: list[tuple[str, list[Any], list[Any]]] = []
        for step in range(40):
            messages += [_message(len(messages)) for _ in range(1 + step % 3)]
            if step % 4 == 0:
                tools.append(f"call-{step}")
            checkpoint = await manager.create("chat", {"step": step}, messages=messages,
                                              tool_calls=tools)
            assert checkpoint is not None
            created.append((checkpoint.metadata.checkpoint_id, copy.deepcopy(messages),
                            list(tools)))

        latest = await manager.restore("chat")
        assert latest is not None
        assert (latest.messages, latest.tool_calls) == (messages, tools)
        for checkpoint_id, expected, expected_tools in created:
            restored = await manager.restore_from(checkpoint_id)
            assert restored is not None
            assert (restored.messages, restored.tool_calls) == (expected, expected_tools)

        if offers_nested_items(store):
            logged = await _log_items(store, "chat")
            whole = len(msgspec.msgpack.encode(messages)) + len(msgspec.msgpack.encode(tools))
            # Every entry once, plus a frame per piece: far below a copy per checkpoint.
            assert sum(map(len, logged.values())) < whole + 40 * 16
            assert sum(key.startswith("m/") and "/" not in key[2:].split("/", 1)[1]
                       for key in logged) == 1  # one messages log: never begun again


async def test_edited_shortened_and_reordered_lists_restore_exactly(
    fresh_store: FreshStore, clock: FakeClock
) -> None:
    async with fresh_store() as store:
        manager = _manager(store, clock)
        messages = [_message(index) for index in range(6)]
        created: list[tuple[str, list[Any]]] = []

        async def create() -> None:
            checkpoint = await manager.create("edits", {}, messages=messages)
            assert checkpoint is not None
            created.append((checkpoint.metadata.checkpoint_id, copy.deepcopy(messages)))

        await create()
        messages.append(_message(6))
        await create()
        messages[2]["content"] = "changed in place"  # the same dict object, mutated
        await create()
        messages[3] = _message(3, "replaced")
        await create()
        del messages[1]
        await create()
        messages.reverse()
        await create()
        messages[:] = messages[:2]  # below the log threshold: stored whole
        await create()
        messages += [_message(100 + index) for index in range(5)]
        await create()
        messages.append(_message(200))
        await create()

        for checkpoint_id, expected in created:
            restored = await manager.restore_from(checkpoint_id)
            assert restored is not None
            assert restored.messages == expected, checkpoint_id
        latest = await manager.restore("edits")
        assert latest is not None
        assert latest.messages == messages


async def test_another_writer_in_between_and_a_removed_log(
    fresh_store: FreshStore, clock: FakeClock
) -> None:
    """Two processes (managers) write one run in turns; then one deletes the checkpoints
    naming the other's log: the other's next create is refused by the store and begins a new
    log (nothing lost, nothing mixed up)."""
    async with fresh_store() as store:
        first, second = _manager(store, clock), _manager(store, clock)
        messages = [_message(index) for index in range(5)]
        created: list[tuple[str, list[Any]]] = []
        for step in range(12):
            messages.append(_message(len(messages)))
            writer = first if step % 3 else second
            checkpoint = await writer.create("shared", {"step": step}, messages=messages)
            assert checkpoint is not None
            created.append((checkpoint.metadata.checkpoint_id, copy.deepcopy(messages)))
        for checkpoint_id, expected in created:
            restored = await second.restore_from(checkpoint_id)
            assert restored is not None
            assert restored.messages == expected

        # ``first`` wrote the last one; ``second`` deletes every checkpoint naming its log.
        for checkpoint_id, _ in created[-2:]:
            assert await second.delete(checkpoint_id)
        messages.append(_message(len(messages)))
        checkpoint = await first.create("shared", {}, messages=messages)
        assert checkpoint is not None
        latest = await second.restore("shared")
        assert latest is not None
        assert latest.metadata.checkpoint_id == checkpoint.metadata.checkpoint_id
        assert latest.messages == messages


async def test_pruning_and_expiry_take_the_logs_no_checkpoint_uses(
    fresh_store: FreshStore, clock: FakeClock
) -> None:
    async with fresh_store() as store:
        manager = _manager(store, clock, keep=3, ttl=100)
        messages = [_message(index) for index in range(4)]
        for step in range(10):
            messages.append(_message(len(messages)))
            await manager.create("pruned", {"step": step}, messages=messages)
            if step == 5:
                messages[0] = _message(0, "edited")  # begins a second log
        latest = await manager.restore("pruned")
        assert latest is not None
        assert latest.messages == messages
        await manager.cleanup_expired()
        if offers_nested_items(store):
            anchors = {key.split("/")[2] for key in await _log_items(store, "pruned")}
            assert len(anchors) == 1  # the first log went with the checkpoints naming it

        clock.advance(101)
        await manager.cleanup_expired()
        assert await manager.restore("pruned") is None
        assert await _log_items(store, "pruned") == {}


async def test_a_fork_restores_exactly_and_outlives_its_source(
    fresh_store: FreshStore, clock: FakeClock
) -> None:
    async with fresh_store() as store:
        manager = _manager(store, clock)
        messages = [_message(index) for index in range(8)]
        source = await manager.create("source", {"a": 1}, messages=messages)
        messages.append(_message(8))
        await manager.create("source", {"a": 2}, messages=messages)
        assert source is not None

        fork = await manager.fork(source.metadata.checkpoint_id, "forked")
        assert fork.messages == messages[:8]
        await manager.delete_run("source")
        restored = await manager.restore("forked")
        assert restored is not None
        assert restored.messages == messages[:8]
        messages[8:] = [_message(80)]
        grown = await manager.create("forked", {}, messages=messages)
        assert grown is not None
        latest = await manager.restore("forked")
        assert latest is not None
        assert latest.messages == messages


async def test_random_histories_restore_exactly(
    fresh_store: FreshStore, clock: FakeClock
) -> None:
    """Random appends, edits (in place, replaced, removed, inserted, reordered), two writers,
    deletes, pruning, expiry and forks; after every step each live checkpoint restores what
    its create was given."""
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    async with fresh_store() as store:
        writers = [_manager(store, clock, keep=6, ttl=50), _manager(store, clock, keep=6, ttl=50)]
        messages: list[Any] = []
        expected: dict[str, list[Any]] = {}
        for _ in range(70):
            roll = rng.random()
            if roll < 0.45:
                messages += [_message(rng.randrange(1000)) for _ in range(rng.randint(0, 3))]
            elif roll < 0.55 and messages:
                rng.choice(messages)["content"] = f"edited {rng.random()}"
            elif roll < 0.6 and messages:
                messages[rng.randrange(len(messages))] = _message(rng.randrange(1000))
            elif roll < 0.65 and messages:
                del messages[rng.randrange(len(messages))]
            elif roll < 0.7:
                messages.insert(rng.randint(0, len(messages)), _message(rng.randrange(1000)))
            elif roll < 0.73:
                rng.shuffle(messages)
            elif roll < 0.78 and expected:
                await rng.choice(writers).delete(rng.choice(sorted(expected)))
            elif roll < 0.82:
                clock.advance(rng.choice([1, 20]))
                await writers[0].cleanup_expired()
            elif roll < 0.85 and expected:
                source = rng.choice(sorted(expected))
                found = await writers[1].restore_from(source)
                if found is not None:
                    fork = await writers[1].fork(source)
                    assert fork.messages == expected[source], seed
            checkpoint = await rng.choice(writers).create(
                "random", {}, messages=messages, force=True)
            assert checkpoint is not None
            expected[checkpoint.metadata.checkpoint_id] = copy.deepcopy(messages)
            for checkpoint_id, lists in list(expected.items()):
                restored = await writers[0].restore_from(checkpoint_id)
                if restored is None:
                    del expected[checkpoint_id]  # pruned, deleted or expired
                    continue
                assert restored.messages == lists, (seed, checkpoint_id)
        assert expected, seed


async def test_one_store_call_per_create_and_per_restore(clock: FakeClock) -> None:
    store = _Counting(MemoryStore())
    manager = _manager(store, clock)  # type: ignore[arg-type]
    messages = [_message(index) for index in range(10)]
    for _ in range(3):
        messages.append(_message(len(messages)))
        await manager.create("counted", {}, messages=messages)
        assert store.take() == {"append_with_items": 1}
        restored = await manager.restore("counted")
        assert restored is not None
        assert restored.messages == messages
        assert store.take() == {"read_with_items": 1}


async def test_a_long_log_merges_its_parts_and_every_checkpoint_restores_exactly(
    fresh_store: FreshStore, clock: FakeClock
) -> None:
    """Parts merge as they accumulate and the merged ones are removed, so a restore reads a
    bounded number of them; checkpoints whose parts were merged away (older ones, and those
    of a second writer that continued an older checkpoint) restore from the merged parts."""
    from fastcheckpoint._logs import FANOUT

    async with fresh_store() as store:
        moto = type(store).__name__ in ("S3Store", "DynamoDBStore")
        steps = 3 * FANOUT if moto else FANOUT * FANOUT + 20
        manager = _manager(store, clock)
        messages = [_message(index) for index in range(MIN)]
        created: list[tuple[str, list[Any]]] = []
        most = 0
        for _ in range(steps):
            messages.append(_message(len(messages)))
            checkpoint = await manager.create("long", {}, messages=messages)
            assert checkpoint is not None
            created.append((checkpoint.metadata.checkpoint_id, list(messages)))
            most = max(most, len(await _log_items(store, "long")))
        # The anchor, then at most FANOUT - 1 parts per level (two levels here).
        assert most <= 1 + 2 * (FANOUT - 1)
        latest = await manager.restore("long")
        assert latest is not None
        assert latest.messages == messages
        every = 1 if not moto else 7
        for checkpoint_id, expected in created[::every]:
            restored = await manager.restore_from(checkpoint_id)
            assert restored is not None
            assert restored.messages == expected
        # Every entry once, plus each part's frame and where the writes it holds end.
        logged = await _log_items(store, "long")
        stored = sum(map(len, logged.values()))
        assert stored < len(msgspec.msgpack.encode(messages)) + 48 * len(logged) + 4 * steps

        # A second process continues from an older checkpoint (a fork in time, as a process
        # with an older hint would) and both lines restore exactly after each other's merges.
        source_id, source = created[FANOUT // 2]
        forked = await manager.fork(source_id, "long-fork")
        assert forked.messages == source
        for checkpoint_id, expected in created[-3:]:
            restored = await _manager(store, clock).restore_from(checkpoint_id)
            assert restored is not None
            assert restored.messages == expected


async def test_merging_costs_one_removal_every_few_creates_and_reads_stay_one_call(
    clock: FakeClock
) -> None:
    from fastcheckpoint._logs import FANOUT

    store = _Counting(MemoryStore())
    manager = _manager(store, clock)  # type: ignore[arg-type]
    messages = [_message(index) for index in range(MIN)]
    removals = []
    for step in range(3 * FANOUT + 1):
        messages.append(_message(len(messages)))
        await manager.create("counted", {}, messages=messages)
        calls = store.take()
        assert calls.pop("append_with_items") == 1
        if calls:
            assert calls == {"delete_items": 1}
            removals.append(step)
        restored = await manager.restore("counted")
        assert restored is not None
        assert restored.messages == messages
        assert store.take() == {"read_with_items": 1}
    # The first create begins the log; every FANOUT-th part after it merges.
    assert removals == [FANOUT, 2 * FANOUT, 3 * FANOUT]


async def test_a_part_merged_away_during_a_read_is_read_again(clock: FakeClock) -> None:
    """On a store whose reads are not atomic, a reader can list a part that another process
    merges away before the reader gets to it: the manager reads the checkpoint once more."""
    from fastcheckpoint._logs import FANOUT

    class Stale(_Counting):
        stale: dict[str, bytes] | None = None

        async def read_with_items(self, *args: Any, **kwargs: Any) -> Any:
            found = await super().read_with_items(*args, **kwargs)
            if self.stale is not None and found is not None:
                items, self.stale = self.stale, None
                return (*found[:2], items)  # what a listing before the merge saw, minus it
            return found

    store = Stale(MemoryStore())
    writer, reader = _manager(store, clock), _manager(store, clock)  # type: ignore[arg-type]
    messages = [_message(index) for index in range(MIN)]
    for _ in range(FANOUT):
        messages.append(_message(len(messages)))
        await writer.create("raced", {}, messages=messages)
    before = await store.inner.read_with_items(
        writer_key := __import__("fastcheckpoint")._ids.key_of("raced"), sequence=None, now=0.0)
    messages.append(_message(len(messages)))
    await writer.create("raced", {}, messages=messages)  # merges, removes what it merged
    after = await store.inner.read_with_items(writer_key, sequence=None, now=0.0)
    assert len(after[2]) < len(before[2])
    store.stale = {key: value for key, value in before[2].items() if key in after[2]}
    store.take()
    restored = await reader.restore_from(before[0].checkpoint_id)
    assert restored is not None
    assert restored.messages == messages[:-1]
    assert store.take() == {"read_with_items": 2}


async def test_a_failed_removal_of_merged_parts_loses_nothing_and_is_retried(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    from fastcheckpoint import _ids
    from fastcheckpoint._logs import FANOUT
    from fastcheckpoint.errors import StoreError

    class Failing(_Counting):
        fail = True

        async def delete_items(self, *args: Any, **kwargs: Any) -> Any:
            if self.fail:
                self.fail = False
                raise StoreError("the removal failed")
            return await super().delete_items(*args, **kwargs)

    store = Failing(MemoryStore())
    manager = _manager(store, clock)  # type: ignore[arg-type]
    messages = [_message(index) for index in range(MIN)]
    counts = []
    for _ in range(2 * FANOUT + 1):
        messages.append(_message(len(messages)))
        assert await manager.create("failing", {}, messages=messages) is not None
        counts.append(len(await _log_items(store.inner, "failing")))
        restored = await manager.restore("failing")
        assert restored is not None
        assert restored.messages == messages
    assert "could not remove" in caplog.text
    # The second merge removed what the first left: the log holds what it would have.
    assert counts[-1] == 3
    assert _ids.key_of("failing")


async def test_short_lists_and_disabled_histories_are_stored_whole(clock: FakeClock) -> None:
    store = MemoryStore()
    short = _manager(store, clock)
    await short.create("short", {}, messages=[1, 2, 3])
    disabled = _manager(store, clock, min_entries=None)
    await disabled.create("off", {}, messages=list(range(50)))
    assert await _log_items(store, "short") == {}
    assert await _log_items(store, "off") == {}

    # A manager with histories off still reads the logs other managers wrote.
    await short.create("logged", {}, messages=list(range(50)))
    restored = await disabled.restore("logged")
    assert restored is not None
    assert restored.messages == list(range(50))


async def test_a_missing_piece_of_a_log_is_reported_as_corrupt(clock: FakeClock) -> None:
    store = MemoryStore()
    manager = _manager(store, clock)
    messages = [_message(index) for index in range(5)]
    await manager.create("damaged", {}, messages=messages)
    messages.append(_message(5))
    await manager.create("damaged", {}, messages=messages)
    from fastcheckpoint import _ids

    pieces = [key for key in await _log_items(store, "damaged") if key.count("/") == 3]
    assert len(pieces) == 1
    await store.delete_items(_ids.key_of("damaged"), pieces)
    with pytest.raises(LogGap, match="is missing"):
        await manager.restore("damaged")


async def test_a_damaged_piece_is_reported_as_corrupt(clock: FakeClock) -> None:
    store = MemoryStore()
    manager = _manager(store, clock)
    messages = [_message(index) for index in range(5)]
    await manager.create("flipped", {}, messages=messages)
    messages.append(_message(5))
    await manager.create("flipped", {}, messages=messages)
    from fastcheckpoint import _ids
    from fastcheckpoint.stores import Item

    key = _ids.key_of("flipped")
    pieces = {name: value for name, value in (await _log_items(store, "flipped")).items()
              if name.count("/") == 3}
    [(name, value)] = pieces.items()
    from fastcheckpoint._logs import LogPart

    part = msgspec.msgpack.decode(value, type=LogPart)
    flipped = part.entries[:-1] + bytes((part.entries[-1] ^ 1,))
    await store.delete_items(key, [name])
    await store.put_items(key, [Item(key=name, value=msgspec.msgpack.encode(
        msgspec.structs.replace(part, entries=flipped)))], now=clock())
    with pytest.raises(CorruptCheckpointError, match="fails its checksum"):
        await manager.restore("flipped")
    await store.delete_items(key, [name])
    await store.put_items(key, [Item(key=name, value=b"\x09" + value[1:])], now=clock())
    with pytest.raises(CorruptCheckpointError, match="is damaged"):
        await manager.restore("flipped")


async def test_a_refused_entry_is_named_by_its_index_and_nothing_is_written(
    clock: FakeClock
) -> None:
    from fastcheckpoint.errors import SerializationError

    store = MemoryStore()
    manager = _manager(store, clock)
    messages: list[Any] = [_message(index) for index in range(6)]
    first = await manager.create("refused", {}, messages=messages)
    assert first is not None
    messages.append(object())
    with pytest.raises(SerializationError, match=r"messages\[6\]"):
        await manager.create("refused", {}, messages=messages)
    messages[6] = _message(6)
    second = await manager.create("refused", {}, messages=messages)
    assert second is not None
    assert second.metadata.sequence == first.metadata.sequence + 1
    restored = await manager.restore("refused")
    assert restored is not None
    assert restored.messages == messages


async def test_a_piece_a_failed_write_left_behind_is_never_used(clock: FakeClock) -> None:
    """On a store without atomic writes, a create that failed may leave its piece of the log
    behind; the next create at the same place writes its own and restores its own entries."""
    from fastcheckpoint import _ids, _logs
    from fastcheckpoint._codec import Codec
    from fastcheckpoint.stores import Item

    store = MemoryStore()
    manager = _manager(store, clock)
    messages = [_message(index) for index in range(5)]
    await manager.create("stray", {}, messages=messages)
    [anchor] = await _log_items(store, "stray")
    codec = Codec()
    base = codec.entries_bytes("messages", messages)
    stray = _logs.extend(_logs.begin(anchor, base, 5).tail(anchor), base, codec.entries_bytes(
        "messages", [_message(5, "from a write that failed")], 5), 1)
    await store.put_items(_ids.key_of("stray"), [Item(key=stray.key, value=stray.value)],
                          now=clock())

    messages.append(_message(5, "the one acknowledged"))
    created = await manager.create("stray", {}, messages=messages)
    assert created is not None
    restored = await manager.restore("stray")
    assert restored is not None
    assert restored.messages == messages


async def test_an_anchor_a_failed_write_left_behind_is_never_used(clock: FakeClock) -> None:
    """A create that begins a log and fails may leave its anchor behind (S3); the create
    that takes its place, with another list, begins a log of its own."""
    store = MemoryStore()
    manager = _manager(store, clock)
    messages = [_message(index) for index in range(5)]
    first = await manager.create("stray-anchor", {}, messages=messages)
    assert first is not None
    [anchor] = await _log_items(store, "stray-anchor")
    assert anchor.startswith("m/")
    assert "." in anchor.rsplit("/", 1)[1]

    other = _manager(store, clock)  # no hint: begins a new log at the next sequence
    messages[0] = _message(0, "edited")
    created = await other.create("stray-anchor", {}, messages=messages)
    assert created is not None
    anchors = [key for key in await _log_items(store, "stray-anchor") if key.count("/") == 2]
    assert len(anchors) == 2
    restored = await other.restore("stray-anchor")
    assert restored is not None
    assert restored.messages == messages
