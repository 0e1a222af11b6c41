"""RedisStore against damage an editor or a foreign writer leaves in a run's keys, and the
races and lifetimes a review found wrong: a call either does all it says or writes nothing,
raises only our errors, and a listing or count is not cut short by one damaged entry."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import anyio
import pytest

from fastcheckpoint import CheckpointConfig, CheckpointManager
from fastcheckpoint.errors import CorruptCheckpointError
from fastcheckpoint.stores.redis import RedisStore
from fastcheckpoint.testing import T0, checkpoint_id_of, key_of, make_item, make_run
from tests.stores._redis_support import append, append_with_items, make_store, real_server
from tests.stores.conftest import RedisTarget

pytestmark = pytest.mark.anyio

_DEADLINE = 5


@pytest.fixture
def anyio_backend() -> str:
    # redis.asyncio runs on asyncio only.
    return "asyncio"


def _key(prefix: str, run_key: str, name: str) -> str:
    return f"{prefix}:{{{run_key}}}:{name}"


def _store(prefixed: tuple[RedisTarget, str], **options: object) -> tuple[RedisStore, str]:
    target, prefix = prefixed
    real_server(target)
    return make_store(target, prefix, **options), prefix


# -- a create never stops halfway ------------------------------------------------------------


async def test_a_create_naming_an_item_whose_count_was_edited_counts_it_again(
    prefixed: tuple[RedisTarget, str],
) -> None:
    """A ref count edited into text made the create's HINCRBY fail after its checkpoint was
    written. The count is taken again from the refs of the held checkpoints instead."""
    store, prefix = _store(prefixed)
    run = make_run("recount")
    rk = key_of(run)
    with anyio.fail_after(_DEADLINE):
        await append_with_items(store, run, 0, refs=["K"], items=[make_item("K")])
        await store._client.hset(_key(prefix, rk, "ir"), "K", "not-a-number")
        await append_with_items(store, run, 1, refs=["K"])
        count = await store._client.hget(_key(prefix, rk, "ir"), "K")
        latest = await store.latest(rk, now=T0)
        await store.aclose()
    assert count == b"2"
    assert latest is not None
    assert latest[0].sequence == 1


async def test_pruning_a_checkpoint_whose_item_count_was_edited_counts_it_again(
    prefixed: tuple[RedisTarget, str],
) -> None:
    """keep_latest prunes a checkpoint naming an item whose count is not a number: the create
    completes, the count is what the held checkpoints say, and the item stays while named."""
    store, prefix = _store(prefixed)
    run = make_run("recount-prune")
    rk = key_of(run)
    with anyio.fail_after(_DEADLINE):
        await append_with_items(store, run, 0, refs=["K"], items=[make_item("K")])
        await append_with_items(store, run, 1, refs=["K"])
        await store._client.hset(_key(prefix, rk, "ir"), "K", "1x")
        await append_with_items(store, run, 2, keep_latest=2)
        log = await store._client.zrange(_key(prefix, rk, "seq"), 0, -1)
        count = await store._client.hget(_key(prefix, rk, "ir"), "K")
        items = await store.get_items(rk, ["K"], now=T0)
        await append_with_items(store, run, 3, keep_latest=1)
        after = await store.get_items(rk, ["K"], now=T0)
        counts = await store._client.hgetall(_key(prefix, rk, "ir"))
        await store.aclose()
    assert log == [b"1", b"2"]
    assert count == b"1"
    assert items == {"K": b"value-K"}
    assert after == {}
    assert counts == {}


@pytest.mark.parametrize("name", ["cr", "ir", "ik", "ie", "due"])
async def test_a_create_meeting_a_run_key_of_another_type_writes_nothing(
    prefixed: tuple[RedisTarget, str], name: str,
) -> None:
    """A run-level key replaced by a string made a create fail with WRONGTYPE after its
    checkpoint was in the log. Now it is CorruptCheckpointError naming the key, nothing
    written."""
    store, prefix = _store(prefixed)
    run = make_run("foreign-" + name)
    rk = key_of(run)
    with anyio.fail_after(_DEADLINE):
        await append_with_items(store, run, 0, expires_at=T0 + 100)
        await store._client.delete(_key(prefix, rk, name))
        await store._client.set(_key(prefix, rk, name), "foreign")
        with pytest.raises(CorruptCheckpointError) as caught:
            await append_with_items(store, run, 1, refs=["K"], items=[make_item("K")],
                                    expires_at=T0 + 50)
        log = await store._client.zrange(_key(prefix, rk, "seq"), 0, -1)
        latest = await store._client.hget(_key(prefix, rk, "run"), "ls")
        written = await store._client.exists(_key(prefix, rk, "c:1"))
        await store.aclose()
    assert caught.value.key == _key(prefix, rk, name)
    assert "nothing was written" in str(caught.value)
    assert log == [b"0"]
    assert latest == b"0"
    assert written == 0


# -- one rule for a readable run record ------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("lb", b'["thread-a","us'),
    ("lb", b'[1]'),
    ("lb", b'{"a": "b"}'),
    ("ct", b"0x10"),
    ("ut", b"0x10"),
], ids=["truncated-labels", "labels-not-text", "labels-not-a-list", "hex-created", "hex-updated"])
async def test_a_run_record_the_client_cannot_read_is_damage_nothing_writes_half(
    prefixed: tuple[RedisTarget, str], field: str, value: bytes,
) -> None:
    """The scripts took such a record as usable while the client could not read it: a status
    change was written and then raised, get_run raised for good, the run left the listings
    and damaged_runs reported nothing. Now it is damage: refused before writing, reported,
    and rebuilt by repair."""
    store, prefix = _store(prefixed)
    run = make_run("unreadable-" + field)
    rk = key_of(run)
    run_hash = _key(prefix, rk, "run")
    with anyio.fail_after(_DEADLINE):
        await append_with_items(store, run, 0, labels=("thread-a", "user-b"))
        await store._client.hset(run_hash, field, value)
        with pytest.raises(CorruptCheckpointError) as caught:
            await store.update_run(rk, incarnation=run.incarnation, version=run.version,
                                   status="completed", data=b"", now=T0 + 1)
        status = await store._client.hget(run_hash, "st")
        with pytest.raises(CorruptCheckpointError):
            await store.get_run(rk, now=T0 + 1)
        damage = await store.damaged_runs(run_key=rk, now=T0 + 1)
        rebuilt = await store.rebuild_run(rk, run, now=T0 + 1)
        listed, _ = await store.list_runs(status=None, limit=10, cursor=None, now=T0 + 1)
        counted = await store.count_runs(status=None, now=T0 + 1)
        await store.aclose()
    assert caught.value.key == run_hash
    assert status == b"active"
    assert [d.run_key for d in damage] == [rk]
    assert rebuilt.run_id == run.run_id
    assert [r.run_id for r in listed] == [run.run_id]
    assert counted == 1


# -- bytes that are not UTF-8 ----------------------------------------------------------------


async def test_a_checkpoint_field_that_is_not_utf8_is_corrupt_not_a_decode_error(
    prefixed: tuple[RedisTarget, str],
) -> None:
    """A checkpoint's stored sequence edited into bytes that are not UTF-8: the message naming
    it raised UnicodeDecodeError from list_checkpoints, restore_from and prune."""
    store, prefix = _store(prefixed)
    manager = CheckpointManager(store, config=CheckpointConfig(max_checkpoints_per_run=None))
    rk = key_of(make_run("not-utf8"))
    with anyio.fail_after(_DEADLINE):
        made = [await manager.create("not-utf8", {"n": n}) for n in range(3)]
        await store._client.hset(_key(prefix, rk, "c:1"), "q", b"\xff")
        listed = await manager.list_checkpoints("not-utf8")
        second = made[1]
        assert second is not None
        with pytest.raises(CorruptCheckpointError) as caught:
            await manager.restore_from(second.checkpoint_id)
        await store.aclose()
    assert [c.sequence for c in listed] == [2, 0]
    assert caught.value.key == _key(prefix, rk, "c:1")


async def test_item_keys_that_are_not_utf8_are_skipped_and_logged(
    prefixed: tuple[RedisTarget, str], caplog: pytest.LogCaptureFixture,
) -> None:
    """An item key no client could write (not UTF-8) made scan_items and read_with_items
    raise UnicodeDecodeError. They skip it (logged), and a page of scan_items is still full."""
    store, prefix = _store(prefixed)
    run = make_run("item-not-utf8")
    rk = key_of(run)
    with anyio.fail_after(_DEADLINE):
        await append_with_items(store, run, 0, refs=["K"], items=[make_item("K")])
        await store.put_items(rk, [make_item("a"), make_item("b")], now=T0)
        for bad in (b"a\xff", b"K/\xff"):
            await store._client.zadd(_key(prefix, rk, "ik"), {bad: 0})
            await store._client.hset(_key(prefix, rk, "iv"), bad, b"v")
        with caplog.at_level(logging.WARNING, logger="fastcheckpoint.stores.redis"):
            page = await store.scan_items(rk, prefix="", start_after="K", limit=2, now=T0)
            read = await store.read_with_items(rk, sequence=None, now=T0)
        await store.aclose()
    assert page == [("a", b"value-a"), ("b", b"value-b")]
    assert read is not None
    assert read[2] == {"K": b"value-K"}
    # The scan met both (K/\xff sorts after K), the read the nested one.
    assert sum("not UTF-8" in r.getMessage() for r in caplog.records) == 3


# -- an item whose value is gone -------------------------------------------------------------


async def test_an_item_whose_value_is_gone_is_not_listed_and_deletes_whole(
    prefixed: tuple[RedisTarget, str],
) -> None:
    """Its value removed by hand, an item was listed with b'' (filling a page slot), and
    delete_items removed nothing, leaving its key, owner and expiry entries behind."""
    store, prefix = _store(prefixed)
    rk = key_of(make_run("value-gone"))
    with anyio.fail_after(_DEADLINE):
        await store.put_items(rk, [make_item(key, expires_at=T0 + 100) for key in "abc"],
                              now=T0)
        await store._client.hdel(_key(prefix, rk, "iv"), "a")
        page = await store.scan_items(rk, limit=2, now=T0)
        removed = await store.delete_items(rk, ["a"])
        left = [await store._client.zscore(_key(prefix, rk, name), "a") for name in ("ik", "ie")]
        await store.aclose()
    assert page == [("b", b"value-b"), ("c", b"value-c")]
    assert removed == 1
    assert left == [None, None]


async def test_a_stale_owner_entry_does_not_pass_to_the_next_write_of_the_key(
    prefixed: tuple[RedisTarget, str],
) -> None:
    """An owned item whose value was removed by hand kept its owner entry: a later loose write
    of the key became the old checkpoint's, and went when that checkpoint was deleted."""
    store, prefix = _store(prefixed)
    run = make_run("stale-owner")
    rk = key_of(run)
    with anyio.fail_after(_DEADLINE):
        await append_with_items(store, run, 0, items=[make_item("o", owner=0)])
        await store._client.hdel(_key(prefix, rk, "iv"), "o")
        await store.put_items(rk, [make_item("o", b"loose")], now=T0)
        latest = await store.latest(rk, now=T0)
        assert latest is not None
        await store.delete(rk, 0, checkpoint_id=latest[0].checkpoint_id)
        found = await store.get_items(rk, ["o"], now=T0)
        await store.aclose()
    assert found == {"o": b"loose"}


# -- a listing reads past a corrupt checkpoint -----------------------------------------------


async def test_a_filtered_listing_reads_past_a_corrupt_checkpoint(
    prefixed: tuple[RedisTarget, str],
) -> None:
    """headers skipped a corrupt record and returned a short page, which the manager takes for
    the end of the log: a filtered listing stopped at the damaged checkpoint."""
    store, prefix = _store(prefixed)
    manager = CheckpointManager(store, config=CheckpointConfig(max_checkpoints_per_run=None))
    rk = key_of(make_run("listing"))
    with anyio.fail_after(_DEADLINE):
        for n in range(5):
            await manager.create("listing", {"n": n}, step_name="s", tags=["t"], force=True)
        await store._client.hset(_key(prefix, rk, "c:3"), "t", "not-a-time")
        tagged = await manager.list_checkpoints("listing", limit=2, tags=["t"])
        stepped = await manager.list_checkpoints("listing", limit=2, step_name="s")
        page, status = await store.headers(rk, before=None, limit=2, now=T0)
        await store.aclose()
    assert [c.sequence for c in tagged] == [4, 2]
    assert [c.sequence for c in stepped] == [4, 2]
    assert [h.sequence for h in page] == [4, 2]
    assert status == "active"


# -- Redis Cluster: a deleted run stays out of the indexes -----------------------------------


async def test_a_status_index_call_landing_after_a_delete_does_not_bring_the_run_back(
    prefixed: tuple[RedisTarget, str],
) -> None:
    """Cluster code path: process A's status change ran, its index call was slow; process B
    deleted the run and its index call landed first. `forget` dropped the member's stamp, so
    A's late `sync` put the deleted run back into count_runs, where cleanup left it."""
    target, prefix = prefixed
    real_server(target)
    first = make_store(target, prefix, cluster=True)
    second = make_store(target, prefix, cluster=True)
    config = CheckpointConfig(max_checkpoints_per_run=None)
    writer, deleter = CheckpointManager(first, config=config), CheckpointManager(second,
                                                                                config=config)
    held: list[tuple[object, ...]] = []
    apply = first._complete_index

    async def slow(client: object, ops: Sequence[object], name: str, run_key: str) -> None:
        if name == "update_run":
            held.append((client, ops, name, run_key))
            return
        await apply(client, ops, name, run_key)

    with anyio.fail_after(_DEADLINE):
        await writer.create("late", {"n": 0})
        first._complete_index = slow  # type: ignore[method-assign]
        await writer.mark_completed("late")
        await deleter.delete_run("late")
        await apply(*held[0])  # type: ignore[arg-type]
        counted = (await deleter.count_runs(), await deleter.count_runs("completed"))
        await deleter.cleanup_expired()
        after_cleanup = await deleter.count_runs()
        await first.aclose()
        await second.aclose()
    assert len(held) == 1
    assert counted == (0, 0)
    assert after_cleanup == 0


async def test_tombstones_of_deleted_runs_are_pruned_after_their_time(
    prefixed: tuple[RedisTarget, str],
) -> None:
    """A deleted run's tombstone keeps its member out of the indexes for an hour (by the
    server's clock), then the cleanup loop removes it: one planted with an old time goes,
    a fresh one stays."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix, cluster=True)
    manager = CheckpointManager(store, config=CheckpointConfig(max_checkpoints_per_run=None))
    index = f"{prefix}:{{idx:{prefix}}}:"
    with anyio.fail_after(_DEADLINE):
        await manager.create("doomed", {"n": 0})
        await manager.delete_run("doomed")
        [fresh] = await store._client.hkeys(index + "ver")
        tombstone = await store._client.hget(index + "ver", fresh)
        await store._client.hset(index + "ver", "planted", "-1000000000000000")
        await store._client.zadd(index + "due", {"-planted": 1000})
        server_now, _ = await store._client.time()
        purged = await store.purge_expired(now=float(server_now), limit=10)
        kept = await store._client.hgetall(index + "ver")
        due = await store._client.zrange(index + "due", 0, -1)
        await store.aclose()
    assert tombstone is not None
    assert tombstone.startswith(b"-")
    assert purged == (0, True)
    assert kept == {fresh: tombstone}
    assert due == [b"-" + fresh]


# -- lifetimes -------------------------------------------------------------------------------


async def test_the_due_hash_of_a_run_of_items_only_expires_with_its_other_keys(
    prefixed: tuple[RedisTarget, str],
) -> None:
    """The per-run due hash copied the run record's TTL, and a run of items only has no
    record: it stayed until purge_expired removed it."""
    store, prefix = _store(prefixed)
    rk = key_of(make_run("items-only"))
    with anyio.fail_after(_DEADLINE):
        server_now, _ = await store._client.time()
        await store.put_items(rk, [make_item("a", expires_at=server_now + 100)],
                              now=float(server_now))
        ttls = {name: await store._client.pttl(_key(prefix, rk, name))
                for name in ("ik", "iv", "ie", "due")}
        await store.aclose()
    assert all(ttl > 0 for ttl in ttls.values()), ttls
    # One lifetime for all of them (set in one script, read a moment apart).
    assert ttls["ik"] - 1000 <= ttls["due"] <= ttls["ik"], ttls


async def _delete_checkpoint(store: RedisStore, rk: str) -> object:
    latest = await store.latest(rk, now=T0)
    assert latest is not None
    return await store.delete(rk, 0, checkpoint_id=latest[0].checkpoint_id)


async def _put_owned(store: RedisStore, rk: str) -> object:
    latest = await store.latest(rk, now=T0)
    assert latest is not None
    return await store.put_owned_items(rk, [make_item("n", owner=0)], owner=0,
                                       checkpoint_id=latest[0].checkpoint_id, if_absent=False,
                                       now=T0)


@pytest.mark.parametrize("operation", ["delete", "put_items", "put_owned_items", "delete_items"])
async def test_deletes_and_item_writes_meeting_a_key_of_another_type_write_nothing(
    prefixed: tuple[RedisTarget, str], operation: str,
) -> None:
    """The item owners' key (io) replaced by a string: these calls failed with WRONGTYPE
    halfway (a delete after the log entry went, an item write after its value was written)."""
    store, prefix = _store(prefixed)
    run = make_run("foreign-" + operation)
    rk = key_of(run)
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "delete": lambda: _delete_checkpoint(store, rk),
        "put_items": lambda: store.put_items(rk, [make_item("n")], now=T0),
        "put_owned_items": lambda: _put_owned(store, rk),
        "delete_items": lambda: store.delete_items(rk, ["a"]),
    }
    with anyio.fail_after(_DEADLINE):
        await append_with_items(store, run, 0, items=[make_item("a")])
        before = [await store._client.dump(_key(prefix, rk, name))
                  for name in ("seq", "iv", "ik", "c:0")]
        await store._client.set(_key(prefix, rk, "io"), "foreign")
        with pytest.raises(CorruptCheckpointError) as caught:
            await calls[operation]()
        after = [await store._client.dump(_key(prefix, rk, name))
                 for name in ("seq", "iv", "ik", "c:0")]
        await store.aclose()
    assert caught.value.key == _key(prefix, rk, "io")
    assert after == before


@pytest.mark.parametrize("damage", [b"not-a-number", None], ids=["edited", "missing"])
@pytest.mark.parametrize("operation", ["append", "delete"])
async def test_a_due_record_whose_time_is_unreadable_stops_no_write_halfway(
    prefixed: tuple[RedisTarget, str], operation: str, damage: bytes | None,
) -> None:
    """The run's `due` hash (what the global due index holds for it) with its time edited or
    gone, its member intact: the scripts compared that time as a number after their writes, so
    a create wrote its checkpoint and then failed (StoreError: the caller retries it, and it is
    written twice), and a delete removed the checkpoint and reported failure. Both complete,
    and the due record says when the run is next due again."""
    store, prefix = _store(prefixed)
    run = make_run("due-" + operation)
    rk = key_of(run)
    due = _key(prefix, rk, "due")
    with anyio.fail_after(_DEADLINE):
        for n in range(2):
            await append(store, run, n, expires_at=T0 + 100 + n)
        if damage is None:
            await store._client.hdel(due, "s")
        else:
            await store._client.hset(due, "s", damage)
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "append": lambda: append(store, run, 2, expires_at=T0 + 50),
            "delete": lambda: store.delete(rk, 0, checkpoint_id=checkpoint_id_of(run, 0)),
        }
        await calls[operation]()
        log = [int(s) for s in await store._client.zrange(_key(prefix, rk, "seq"), 0, -1)]
        scheduled = await store._client.hget(due, "s")
        await store.aclose()
    assert log == ([0, 1, 2] if operation == "append" else [1])
    assert scheduled is not None
    assert float(scheduled) == (T0 + 50 if operation == "append" else T0 + 101)


@pytest.mark.parametrize("refs", [b'[{"a": 1}, "K"]', b'[true, "K"]', b'[null, "K"]', b'["K", 5]'])
@pytest.mark.parametrize("operation", ["prune", "delete", "purge"])
async def test_refs_edited_to_hold_a_non_string_stop_no_removal_halfway(
    prefixed: tuple[RedisTarget, str], operation: str, refs: bytes,
) -> None:
    """A held checkpoint's refs (its entry in `cr`) edited into a JSON list holding something
    other than text: removing that checkpoint handed the value to a Redis command after the
    log entry had gone, so a create that pruned it had written its own checkpoint and then
    failed (the caller's retry writes it again), and `delete` and the cleanup loop failed
    halfway. The removal completes and releases the keys it can read; a read of the
    checkpoint names it as corrupt."""
    store, prefix = _store(prefixed)
    run = make_run("refs-" + operation)
    rk = key_of(run)
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "prune": lambda: append_with_items(store, run, 2, keep_latest=2),
        "delete": lambda: store.delete(rk, 0, checkpoint_id=checkpoint_id_of(run, 0)),
        "purge": lambda: store.purge_expired(now=T0 + 20, limit=10),
    }
    with anyio.fail_after(_DEADLINE):
        await append_with_items(store, run, 0, refs=["K"], items=[make_item("K")],
                                expires_at=T0 + 10)
        await append_with_items(store, run, 1)
        await store._client.hset(_key(prefix, rk, "cr"), "0", refs)
        with pytest.raises(CorruptCheckpointError) as caught:
            await store.read_with_items(rk, sequence=0, now=T0)
        await calls[operation]()
        log = [int(s) for s in await store._client.zrange(_key(prefix, rk, "seq"), 0, -1)]
        items = await store.get_items(rk, ["K"], now=T0)
        await store.aclose()
    assert caught.value.key == _key(prefix, rk, "c:0")
    assert log == ([1, 2] if operation == "prune" else [1])
    assert items == {}


@pytest.mark.parametrize("operation", ["read", "create"])
@pytest.mark.parametrize(("member", "score"), [("x", 0.5), ("abc", 100), ("3", 100)])
async def test_an_edited_log_entry_breaks_no_read_and_no_create_halfway(
    prefixed: tuple[RedisTarget, str], member: str, score: float, operation: str,
) -> None:
    """A log entry (`seq`) edited into one whose member is not a sequence, or whose score is
    not its member: the reads paged on from the member (an error), a create that pruned it
    (max_checkpoints_per_run) failed after writing its checkpoint, and one whose entry sorted
    above the create's pruned the checkpoint it had just acknowledged. Reads pass over the
    entry, and the create completes and keeps its checkpoint."""
    store, prefix = _store(prefixed)
    run = make_run("log-" + member)
    rk = key_of(run)
    with anyio.fail_after(_DEADLINE):
        for n in range(2):
            await append_with_items(store, run, n)
        await store._client.zadd(_key(prefix, rk, "seq"), {member: score})
        expected = [1, 0]
        if operation == "create":
            record = await store.get_run(rk, now=T0)
            assert record is not None
            written = record.latest_sequence + 1
            await append_with_items(store, run, written, keep_latest=1)
            expected = [written]
        listed, _ = await store.headers(rk, before=None, limit=10, now=T0)
        latest = await store.latest(rk, now=T0)
        await store.aclose()
    assert [header.sequence for header in listed] == expected
    assert latest is not None
    assert latest[0].sequence == expected[0]


@pytest.mark.parametrize(("index", "operation"), [
    ("all", "create"), ("due", "create"), ("l:x", "create"), ("s:paused", "pause"),
])
async def test_a_global_index_key_of_another_type_fails_no_write_halfway(
    prefixed: tuple[RedisTarget, str], caplog: pytest.LogCaptureFixture, index: str,
    operation: str,
) -> None:
    """On plain Redis the run scripts update the global indexes themselves, after the run's
    writes: a global key of another type (a foreign application under the prefix) failed a
    create after its checkpoint or its run record was written (StoreError: the caller's retry
    writes it again), and a status change after it was made. The change stands and is
    reported done, as on Redis Cluster when the index call fails, and a warning says why."""
    store, prefix = _store(prefixed)
    run = make_run("index-" + operation)
    rk = key_of(run)
    with anyio.fail_after(_DEADLINE):
        if operation == "pause":
            await append_with_items(store, run, 0, expires_at=T0 + 100, labels=("x",))
        await store._client.set(f"{prefix}:{{idx:{prefix}}}:{index}", "foreign")
        with caplog.at_level(logging.WARNING, logger="fastcheckpoint.stores.redis"):
            if operation == "pause":
                await store.update_run(rk, incarnation=run.incarnation, version=run.version,
                                       status="paused", data=b"", now=T0)
            else:
                await append_with_items(store, run, 0, expires_at=T0 + 100, labels=("x",))
        record = await store.get_run(rk, now=T0)
        latest = await store.latest(rk, now=T0)
        await store.aclose()
    assert record is not None
    assert record.status == ("paused" if operation == "pause" else run.status)
    assert latest is not None
    assert latest[0].sequence == 0
    assert "index update failed" in caplog.text


# -- repair ----------------------------------------------------------------------------------


async def test_a_rebuild_passes_over_an_unreadable_creation_time(
    prefixed: tuple[RedisTarget, str],
) -> None:
    """The rebuilt record's created_at comes from the oldest intact checkpoint; an edited one
    there made rebuild_run (and repair) raise ValueError. The oldest readable one is taken,
    and with none, CorruptCheckpointError."""
    store, prefix = _store(prefixed)
    run = make_run("rebuild-times")
    rk = key_of(run)
    with anyio.fail_after(_DEADLINE):
        for n in range(3):
            await append_with_items(store, run, n, now=T0 + n)
        await store._client.hset(_key(prefix, rk, "run"), "lb", b'["x')
        await store._client.hset(_key(prefix, rk, "c:0"), "t", b"bad")
        rebuilt = await store.rebuild_run(rk, run, now=T0 + 5)
        await store._client.hset(_key(prefix, rk, "run"), "lb", b'["x')
        for n in (1, 2):
            await store._client.hset(_key(prefix, rk, f"c:{n}"), "t", b"0x10")
        with pytest.raises(CorruptCheckpointError) as caught:
            await store.rebuild_run(rk, run, now=T0 + 6)
        await store.aclose()
    assert rebuilt.created_at == T0 + 1
    assert rebuilt.latest_sequence == 2
    assert caught.value.key == _key(prefix, rk, "run")


async def test_a_checkpoint_key_of_another_type_is_a_corrupt_checkpoint(
    prefixed: tuple[RedisTarget, str],
) -> None:
    """A checkpoint's key replaced by a string made every read of the run's log (restore,
    list_checkpoints, prune) fail with WRONGTYPE. Reads now report that checkpoint as corrupt
    and a listing skips it; a create at a slot holding one writes nothing."""
    store, prefix = _store(prefixed)
    manager = CheckpointManager(store, config=CheckpointConfig(max_checkpoints_per_run=None))
    rk = key_of(make_run("foreign-checkpoint"))
    with anyio.fail_after(_DEADLINE):
        for n in range(3):
            await manager.create("foreign-checkpoint", {"n": n})
        await store._client.delete(_key(prefix, rk, "c:2"))
        await store._client.set(_key(prefix, rk, "c:2"), b"\x00damaged")
        with pytest.raises(CorruptCheckpointError) as newest:
            await manager.restore("foreign-checkpoint")
        listed = await manager.list_checkpoints("foreign-checkpoint")
        await store._client.set(_key(prefix, rk, "c:3"), b"\x00damaged")
        with pytest.raises(CorruptCheckpointError) as slot:
            await manager.create("foreign-checkpoint", {"n": 3})
        log = await store._client.zrange(_key(prefix, rk, "seq"), 0, -1)
        await store.aclose()
    assert newest.value.key == _key(prefix, rk, "c:2")
    assert [c.sequence for c in listed] == [1, 0]
    assert slot.value.key == _key(prefix, rk, "c:3")
    assert log == [b"0", b"1", b"2"]


# -- repair past a corrupt newest checkpoint -------------------------------------------------


async def test_a_damaged_run_whose_newest_checkpoint_is_corrupt_fails_no_other_run(
    prefixed: tuple[RedisTarget, str],
) -> None:
    """One damaged run whose newest checkpoint was corrupt too made damaged_runs raise
    CorruptCheckpointError for the whole store, so repair found no damaged run at all. That
    run is reported (its problem naming both) and rebuilt from its newest readable checkpoint;
    a run with none readable is reported unrecoverable; the others are rebuilt."""
    store, prefix = _store(prefixed)
    manager = CheckpointManager(store, config=CheckpointConfig(max_checkpoints_per_run=None))
    runs = ("corrupt-newest", "all-corrupt", "plain-damage")
    with anyio.fail_after(_DEADLINE):
        for run_id in runs:
            for n in range(2):
                await manager.create(run_id, {"n": n})
            await store._client.hset(_key(prefix, key_of(make_run(run_id)), "run"), "lb",
                                     b'["x')
        first = key_of(make_run("corrupt-newest"))
        await store._client.hset(_key(prefix, first, "c:1"), "t", b"not-a-time")
        both = key_of(make_run("all-corrupt"))
        for n in range(2):
            await store._client.hset(_key(prefix, both, f"c:{n}"), "q", b"7")
        found = {damage.run_key: damage for damage in await store.damaged_runs(now=T0)}
        reports = {report.key: report for report in await manager.repair()}
        created = await manager.create("corrupt-newest", {"n": 2})
        await store.aclose()
    assert set(found) == {key_of(make_run(run_id)) for run_id in runs}
    assert found[first].problem.startswith("the run record has unreadable labels")
    assert _key(prefix, first, "c:1") in found[first].problem
    newest = found[first].newest
    assert newest is not None
    assert newest.sequence == 0
    assert found[both].newest is None
    outcomes = {key.rsplit("{", 1)[1].split("}")[0]: report.outcome
                for key, report in reports.items()}
    assert outcomes == {first: "rebuilt", both: "unrecoverable",
                        key_of(make_run("plain-damage")): "rebuilt"}
    assert created is not None
    assert created.checkpoint_id.endswith("-2")


# -- maintenance and tidying reads meeting a key of another type -----------------------------



@pytest.mark.parametrize("operation", ["rebuild", "latest", "read_with_items", "headers"])
async def test_purge_rebuild_and_tidying_reads_meeting_a_key_of_another_type_write_nothing(
    prefixed: tuple[RedisTarget, str], operation: str,
) -> None:
    """The item expiries' key (ie) replaced by a string: purging a live run, rebuilding a
    damaged record and the reads that drop a log entry whose key vanished failed with
    WRONGTYPE after their first write (a log entry dropped, the record rewritten). They now
    raise CorruptCheckpointError naming the key, nothing written. (Purging skips such a run
    instead: see test_cleanup_skips_a_live_run_with_a_key_of_another_type_and_purges_the_rest.)"""
    store, prefix = _store(prefixed)
    run = make_run("foreign-" + operation)
    rk = key_of(run)
    index = f"{prefix}:{{idx:{prefix}}}:"
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "rebuild": lambda: store.rebuild_run(rk, run, now=T0 + 1),
        "latest": lambda: store.latest(rk, now=T0 + 1),
        "read_with_items": lambda: store.read_with_items(rk, sequence=None, now=T0 + 1),
        "headers": lambda: store.headers(rk, before=None, limit=10, now=T0 + 1),
    }
    names = ("run", "seq", "exp", "due", "c:0", "c:1")
    with anyio.fail_after(_DEADLINE):
        await append_with_items(store, run, 0, expires_at=T0 + 10)
        await append_with_items(store, run, 1)
        await append_with_items(store, run, 2)
        await store._client.delete(_key(prefix, rk, "c:2"))  # a vanished checkpoint key
        await store._client.set(_key(prefix, rk, "ie"), "foreign")
        if operation == "rebuild":
            await store._client.hset(_key(prefix, rk, "run"), "lb", b'["x')
        before = [await store._client.dump(_key(prefix, rk, name)) for name in names]
        indexes = [await store._client.dump(index + name) for name in ("all", "due")]
        with pytest.raises(CorruptCheckpointError) as caught:
            await calls[operation]()
        after = [await store._client.dump(_key(prefix, rk, name)) for name in names]
        indexes_after = [await store._client.dump(index + name) for name in ("all", "due")]
        damage = await store.damaged_runs(run_key=rk, now=T0 + 1)
        await store.aclose()
    assert caught.value.key == _key(prefix, rk, "ie")
    assert after == before
    assert indexes_after == indexes
    if operation == "rebuild":
        [found] = damage
        assert _key(prefix, rk, "ie") in found.problem
        assert found.newest is None


async def test_a_listing_that_drops_a_stale_run_leaves_a_tombstone_on_a_cluster(
    prefixed: tuple[RedisTarget, str],
) -> None:
    """Cluster code path: a run's keys vanished (expired natively, say) while a status
    change's index call was slow; a listing dropped the stale index entry without a tombstone,
    so the late call put the run back into count_runs until the next listing. The listing's
    forget follows delete_run's rule: a tombstone that refuses the late call."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix, cluster=True)
    manager = CheckpointManager(store, config=CheckpointConfig(max_checkpoints_per_run=None))
    index = f"{prefix}:{{idx:{prefix}}}:"
    rk = key_of(make_run("vanished"))
    held: list[tuple[object, ...]] = []
    apply = store._complete_index

    async def slow(client: object, ops: Sequence[object], name: str, run_key: str) -> None:
        if name == "update_run":
            held.append((client, ops, name, run_key))
            return
        await apply(client, ops, name, run_key)

    with anyio.fail_after(_DEADLINE):
        await manager.create("vanished", {"n": 0})
        [member] = await store._client.zrange(index + "all", 0, -1)
        store._complete_index = slow  # type: ignore[method-assign]
        await manager.mark_completed("vanished")
        await store._client.delete(
            *[key async for key in store._client.scan_iter(match=f"{prefix}:{{{rk}}}:*")])
        listed = await manager.list_runs()
        await apply(*held[0])  # type: ignore[arg-type]
        counted = (await manager.count_runs(), await manager.count_runs("completed"))
        tombstone = await store._client.hget(index + "ver", member)
        due = await store._client.zscore(index + "due", b"-" + member)
        await store.aclose()
    assert len(held) == 1
    assert listed.runs == []
    assert counted == (0, 0)
    assert tombstone is not None
    assert tombstone.startswith(b"-")
    assert due is not None


@pytest.mark.parametrize("cluster_path", [False, True], ids=["plain", "cluster-code-path"])
@pytest.mark.parametrize("name", ["ie", "seq", "exp"])
async def test_cleanup_skips_a_live_run_with_a_key_of_another_type_and_purges_the_rest(
    prefixed: tuple[RedisTarget, str], cluster_path: bool, name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A live run due for purging whose item expiries' key (ie) holds a string made every
    cleanup pass raise CorruptCheckpointError when it reached that run (WRONGTYPE as a
    StoreError for its log, seq or exp, which also failed damaged_runs for the whole store),
    so expiry stopped for every other run of the store. The pass now logs the run naming the
    key, moves its due entry an hour later by the server's clock (so it neither blocks the
    pass nor is met at every pass) and purges the others; nothing else of the run is written,
    it is tried again once the hour has passed, and damaged_runs reports it."""
    store, prefix = _store(prefixed, cluster=cluster_path)
    index = f"{prefix}:{{idx:{prefix}}}:"
    damaged = make_run("damaged-due")
    rk = key_of(damaged)
    expired = [make_run(f"expired-{number}") for number in range(2)]
    names = ("run", "seq", "exp", "due", "ik", "iv", "io", "ie", "ir", "cr", "c:0", "c:1")

    async def dumps() -> list[object]:
        return [await store._client.dump(_key(prefix, rk, name)) for name in names]

    async def due_at() -> float | None:
        entries = await store._client.zrange(index + "due", 0, -1, withscores=True)
        return next((score for member, score in entries if rk.encode() in member), None)

    def skipped() -> int:
        return sum(_key(prefix, rk, name) in record.getMessage() for record in caplog.records)

    caplog.set_level(logging.WARNING, logger="fastcheckpoint")
    with anyio.fail_after(_DEADLINE):
        # Due first, so an error there would stop the pass before the others.
        await append_with_items(store, damaged, 0, expires_at=T0 + 5)
        await append_with_items(store, damaged, 1, refs=["K"], items=[make_item("K")])
        for run in expired:
            await append_with_items(store, run, 0, expires_at=T0 + 10)
        await store._client.set(_key(prefix, rk, name), "foreign")
        before = await dumps()
        seconds, _ = await store._client.time()
        first = await store.purge_expired(now=T0 + 20, limit=10)
        backoff = await due_at()
        skipped_once = skipped()
        early = await store.purge_expired(now=T0 + 20, limit=10)
        skipped_early = skipped()
        gone = [await store.get_run(key_of(run), now=T0) for run in expired]
        assert backoff is not None
        later = await store.purge_expired(now=backoff + 1, limit=10)
        backoff_again = await due_at()
        after = await dumps()
        damage = await store.damaged_runs(now=T0 + 20)
        await store.aclose()
    assert first == (2, True)
    assert gone == [None, None]
    assert skipped_once == 1
    assert seconds + 3600 <= backoff < seconds + 3600 + _DEADLINE
    assert early == (0, True)
    assert skipped_early == 1
    assert later == (0, True)
    assert skipped() == 2
    assert backoff_again is not None
    assert backoff_again >= backoff + 1 + 3600
    assert after == before
    [found] = damage
    assert found.key == _key(prefix, rk, name)
    assert found.newest is None


@pytest.mark.parametrize("foreign", ["ie", "due", "seq"])
async def test_cleanup_drops_the_index_intent_of_a_run_with_a_key_of_another_type(
    prefixed: tuple[RedisTarget, str], foreign: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """Cluster code path: a client died between a new run's script and its index call, and a
    key of that run was then replaced by a string. Re-deriving the run's index entries failed
    with WRONGTYPE at every cleanup pass, so expiry stopped for every run of the store. The
    pass now drops the intent, logs the key and writes nothing of the run."""
    store, prefix = _store(prefixed, cluster=True)
    index = f"{prefix}:{{idx:{prefix}}}:"
    damaged, expired = make_run("intent-damaged"), make_run("intent-expired")
    rk = key_of(damaged)
    names = ("run", "seq", "exp", "due", "ie", "c:0")
    apply = store._complete_index

    async def dies(client: object, ops: Sequence[object], name: str, run_key: str) -> None:
        if run_key != rk:
            await apply(client, ops, name, run_key)

    caplog.set_level(logging.WARNING, logger="fastcheckpoint")
    with anyio.fail_after(_DEADLINE):
        await append_with_items(store, expired, 0, expires_at=T0 + 10)
        store._complete_index = dies  # type: ignore[method-assign]
        await append_with_items(store, damaged, 0)
        store._complete_index = apply  # type: ignore[method-assign]
        intents = await store._client.zcard(index + "fix")
        await store._client.set(_key(prefix, rk, foreign), "foreign")
        before = [await store._client.dump(_key(prefix, rk, key)) for key in names]
        purged = await store.purge_expired(now=T0 + 120, limit=10)
        after = [await store._client.dump(_key(prefix, rk, key)) for key in names]
        left = await store._client.zcard(index + "fix")
        gone = await store.get_run(key_of(expired), now=T0)
        await store.aclose()
    assert intents == 1
    assert purged == (1, True)
    assert left == 0
    assert gone is None
    assert after == before
    assert any(_key(prefix, rk, foreign) in record.getMessage() for record in caplog.records)
