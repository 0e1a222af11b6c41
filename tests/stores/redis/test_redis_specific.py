"""RedisStore beyond the contract: round trips, key layout, real expiry, faults, processes."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from redis.crc import key_slot

from fastcheckpoint import CheckpointConfig, CheckpointManager
from fastcheckpoint._config import RetryPolicy
from fastcheckpoint.errors import (
    ConfigurationError,
    SharedItemGone,
    StoreError,
    StoreUnavailableError,
    ValidationError,
)
from fastcheckpoint.stores._redis_lua import INDEX, INTENT, SCRIPTS
from fastcheckpoint.stores.redis import RedisCheckpointStore, RedisStore, redis_retry
from fastcheckpoint.testing import (
    T0,
    checkpoint_id_of,
    key_of,
    make_checkpoint,
    make_item,
    make_run,
)
from tests.stores._redis_servers import PrivateCluster, PrivateRedis, free_port, redis_binary
from tests.stores._redis_support import (
    FAST_RETRY,
    CuttingProxy,
    append,
    append_with_items,
    counting_connection_class,
    host_and_port,
    keys_under,
    load_scripts,
    make_store,
    real_server,
    round_trips,
)
from tests.stores.conftest import RedisTarget

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[3]
KIT = ROOT / "stores" / "redis"
ACL_FILE = KIT / "users.acl"
WORKER = ROOT / "tests" / "redis_worker.py"


@pytest.fixture
def anyio_backend() -> str:
    # redis.asyncio runs on asyncio only.
    return "asyncio"


# -- round trips --------------------------------------------------------------------------


async def _exercise(store: RedisStore, run: Any) -> None:
    """Every operation once, so that scripts are loaded and connections open."""
    key = key_of(run)
    await append_with_items(store, run, 0, expires_at=T0 + 100, refs=["b/a"],
                            items=[make_item("b/a"), make_item("w/0", owner=0)],
                            labels=("thread:exercise",))
    await append(store, run, 1, keep_latest=5)
    await store.read_with_items(key, sequence=None, now=T0)
    await store.read_with_items(key, sequence=0, now=T0)
    await store.put_owned_items(key, [make_item("w/1", owner=1)], owner=1,
                                checkpoint_id=checkpoint_id_of(run, 1), if_absent=True, now=T0)
    await store.runs_with_label("thread:exercise", limit=10, cursor=None, now=T0)
    await store.get(key, 0, now=T0)
    await store.latest(key, now=T0)
    await store.headers(key, before=None, limit=10, now=T0)
    await store.get_run(key, now=T0)
    await store.update_run(key, incarnation=run.incarnation, version=0, status="active",
                           data=b"", now=T0)
    await store.put_items(key, [make_item("a", owner=1)], now=T0)
    await store.get_items(key, ["a"], now=T0)
    await store.scan_items(key, now=T0)
    await store.delete_items(key, ["a"])
    await store.list_runs(status=None, limit=10, cursor=None, now=T0)
    await store.count_runs(status=None, now=T0)
    await store.damaged_runs(run_key=key, now=T0)
    await store.damaged_runs(now=T0)
    await store.delete(key, 1, checkpoint_id=make_checkpoint(run, 1).checkpoint_id)
    await store.delete_run(key)
    await store.purge_expired(now=T0, limit=10)


@pytest.mark.parametrize("cluster_path", [False, True], ids=["plain", "cluster-code-path"])
async def test_round_trips_per_operation(
    prefixed: tuple[RedisTarget, str], cluster_path: bool
) -> None:
    target, prefix = prefixed
    real_server(target)
    counter = counting_connection_class()
    client = aioredis.Redis.from_url(target.url, connection_class=counter)
    store = RedisStore(client, prefix=prefix, cluster=cluster_path)
    with anyio.fail_after(30):
        await load_scripts(client)
        await _exercise(store, make_run("warm-up"))
        run = make_run("counted", status="active")
        key = key_of(run)
        own = checkpoint_id_of(run, 3)
        # On a cluster, a call that may add a run to the indexes or move it between them first
        # records its intent in the index slot, then applies the change there.
        index_calls = 2 if cluster_path else 0
        expected = {
            "first append, labelled": (lambda: append_with_items(
                store, run, 0, expires_at=T0 + 100, labels=("thread:t", "app:a")),
                1 + index_calls),
            "append": (lambda: append(store, run, 1, expires_at=T0 + 101), 1),
            "append with pruning": (
                lambda: append(store, run, 2, expires_at=T0 + 102, keep_latest=2), 1),
            # LangGraph's save, its pending writes and its load: one round trip each.
            "append with items and refs, pruning": (lambda: append_with_items(
                store, run, 3, expires_at=T0 + 103, keep_latest=2, refs=["b/a", "b/b"],
                items=[make_item("b/a"), make_item("b/b"), make_item("w/3/x", owner=3)]), 1),
            "put_owned_items": (lambda: store.put_owned_items(
                key, [make_item("w/3/y", owner=3)], owner=3, checkpoint_id=own,
                if_absent=True, now=T0), 1),
            "read_with_items, latest": (
                lambda: store.read_with_items(key, sequence=None, now=T0), 1),
            "read_with_items, by sequence": (
                lambda: store.read_with_items(key, sequence=3, now=T0), 1),
            "runs_with_label": (lambda: store.runs_with_label(
                "thread:t", limit=10, cursor=None, now=T0), 2),
            "get": (lambda: store.get(key, 2, now=T0), 1),
            "latest": (lambda: store.latest(key, now=T0), 1),
            "headers": (lambda: store.headers(key, before=None, limit=50, now=T0), 1),
            "get_run": (lambda: store.get_run(key, now=T0), 1),
            "update_run, status kept": (lambda: store.update_run(
                key, incarnation=run.incarnation, version=0, status="active", data=b"x",
                now=T0), 1 + index_calls),
            "update_run, status changed": (lambda: store.update_run(
                key, incarnation=run.incarnation, version=1, status="paused", data=b"y",
                now=T0), 1 + index_calls),
            "put_items": (lambda: store.put_items(key, [make_item("k")], now=T0), 1),
            "get_items": (lambda: store.get_items(key, ["k"], now=T0), 1),
            "scan_items": (lambda: store.scan_items(key, now=T0), 1),
            "delete": (lambda: store.delete(
                key, 2, checkpoint_id=make_checkpoint(run, 2).checkpoint_id), 1),
            "list_runs": (lambda: store.list_runs(status=None, limit=10, cursor=None, now=T0), 2),
            "count_runs": (lambda: store.count_runs(status="paused", now=T0), 1),
        }
        counted = {name: await round_trips(counter, action)
                   for name, (action, _) in expected.items()}
        await client.aclose()
    assert counted == {name: trips for name, (_, trips) in expected.items()}


async def test_steady_state_appends_cost_one_round_trip_each(
    prefixed: tuple[RedisTarget, str],
) -> None:
    """Also on the cluster code path: same-TTL appends never touch the global indexes."""
    target, prefix = prefixed
    real_server(target)
    counter = counting_connection_class()
    client = aioredis.Redis.from_url(target.url, connection_class=counter)
    store = RedisStore(client, prefix=prefix, cluster=True)
    run = make_run("steady")
    with anyio.fail_after(30):
        await load_scripts(client)
        await append(store, run, 0, expires_at=T0 + 3600)
        before = counter.round_trips
        for sequence in range(1, 51):
            await append(store, run, sequence, now=T0 + sequence,
                          expires_at=T0 + 3600 + sequence, keep_latest=10)
        trips = counter.round_trips - before
        headers, _ = await store.headers(key_of(run), before=None, limit=100, now=T0 + 60)
        await client.aclose()
    assert trips == 50
    assert [header.sequence for header in headers] == list(range(50, 40, -1))


async def test_an_expiry_too_far_ahead_is_refused_before_anything_is_written(
    prefixed: tuple[RedisTarget, str]
) -> None:
    """Redis counts a key's lifetime in milliseconds and its scripts write numbers exactly
    only below 10^17: an expiry beyond what every store keeps is refused before the script,
    so the run is not left half-written (a later create of it works)."""
    target, prefix = prefixed
    store = make_store(target, prefix)
    run = make_run("far-ahead")
    try:
        with anyio.fail_after(30):
            with pytest.raises(ValidationError, match="expiry at most"):
                await append(store, run, 0, expires_at=T0 + 1e16)
            assert await store.get_run(key_of(run), now=T0) is None
            assert await keys_under(store._client, prefix) == []
            await append(store, run, 0, expires_at=T0 + 1e13)
            found = await store.get(key_of(run), 0, now=T0)
            # An item: its run's keys are not deleted, nor is the item written.
            other = make_run("far-ahead-items")
            await store.put_items(key_of(other), [make_item("a", expires_at=T0 + 3600)],
                                  now=T0)
            with pytest.raises(ValidationError, match="expiry at most"):
                await store.put_items(key_of(other), [make_item("b", expires_at=T0 + 1e16)],
                                      now=T0)
            items = await store.get_items(key_of(other), ["a", "b"], now=T0)
    finally:
        await store.aclose()
    assert found is not None
    assert items == {"a": b"value-a"}


async def test_scripts_fall_back_to_loading_after_noscript(private_redis: PrivateRedis) -> None:
    """EVALSHA first; a server without the script answers NOSCRIPT, redis-py loads it and
    retries. SCRIPT FLUSH is global, so only on a server of our own."""
    counter = counting_connection_class()
    client = aioredis.Redis.from_url(private_redis.url, connection_class=counter)
    store = RedisStore(client, prefix="noscript")
    run = make_run("noscript")
    with anyio.fail_after(30):
        await append(store, run, 0)
        await client.script_flush()
        counter.commands.clear()
        trips = await round_trips(counter, lambda: store.latest(key_of(run), now=T0))
        sent = [command[0] for command in counter.commands]
        again = await round_trips(counter, lambda: store.latest(key_of(run), now=T0))
        found = await store.latest(key_of(run), now=T0)
        await client.flushall()
        await client.aclose()
    assert sent == [b"EVALSHA", b"SCRIPT", b"EVALSHA"]
    assert (trips, again) == (3, 1)
    assert found is not None
    assert found[0].sequence == 0


# -- key layout ---------------------------------------------------------------------------


async def test_every_script_call_touches_one_slot(prefixed: tuple[RedisTarget, str]) -> None:
    target, prefix = prefixed
    real_server(target)
    counter = counting_connection_class()
    client = aioredis.Redis.from_url(target.url, connection_class=counter)
    store = RedisStore(client, prefix=prefix, cluster=True)
    with anyio.fail_after(30):
        await _exercise(store, make_run("slots"))
        await append(store, make_run("kept"), 0, expires_at=T0 + 100)
        keys = await keys_under(client, prefix)
        await client.aclose()
    calls = [command for command in counter.commands if command[0] == b"EVALSHA"]
    assert calls
    for command in calls:
        declared = command[3:3 + int(command[2])]
        assert len({key_slot(key) for key in declared}) == 1, declared
    run_tag = key_of(make_run("kept")).encode()
    slots = {key_slot(key) for key in keys}
    # The deleted run left only the memos of its deletes (for retries; they expire).
    deleted = [key for key in keys if key_of(make_run("slots")).encode() in key]
    assert deleted
    assert all(b":op:" in key for key in deleted), deleted
    assert slots == {key_slot(run_tag), key_slot(f"idx:{prefix}".encode()),
                     key_slot(key_of(make_run("slots")).encode())}
    pattern = re.compile(
        rb"^" + re.escape(prefix.encode()) + rb":\{([a-z2-7]{24}|idx:" + re.escape(prefix.encode())
        + rb")\}:(run|seq|exp|due|ik|iv|io|ie|ir|cr|c:\d+|op:[0-9a-f]{16}"
        rb"|all|s:\w+|statuses|fix|ver|lab|l:[\w:]+)$"
    )
    assert all(pattern.match(key) for key in keys), keys


async def test_cluster_keyslot_agrees_with_the_layout(redis_cluster: PrivateCluster) -> None:
    store = RedisStore.from_url(f"{redis_cluster.url}?prefix=slots")
    run = make_run("slot-check")
    key = key_of(run)
    with anyio.fail_after(30):
        await append_with_items(store, run, 0, expires_at=T0 + 100, refs=["i"],
                                items=[make_item("i"), make_item("w", owner=0)])
        await store.put_items(key, [make_item("e", expires_at=T0 + 50)], now=T0)
        names = [f"slots:{{{key}}}:{suffix}" for suffix in
                 ("run", "seq", "exp", "due", "ik", "iv", "io", "ie", "ir", "cr", "c:0")]
        slots = {await store._client.cluster_keyslot(name) for name in names}
        exists = await store._client.exists(*names)
        for node in store._client.get_primaries():
            await store._client.execute_command("FLUSHALL", target_nodes=node)
        await store.aclose()
    assert slots == {key_slot(key.encode())}
    assert exists == len(names)


# -- expiry -------------------------------------------------------------------------------


async def test_half_second_ttl_really_expires(prefixed: tuple[RedisTarget, str]) -> None:
    """The server's native expiry, not just the manager's clock: waits 0.6 s for real."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix)
    run = make_run("brief", created_at=time.time())
    key = key_of(run)
    checkpoint_key = f"{prefix}:{{{key}}}:c:1"
    with anyio.fail_after(30):
        now = time.time()
        await append(store, run, 0, now=now)
        await append(store, run, 1, now=now, expires_at=now + 0.5)
        ttl_ms = await store._client.pttl(checkpoint_key)
        await anyio.sleep(0.6)
        exists = await store._client.exists(checkpoint_key)
        now = time.time()
        latest = await store.latest(key, now=now)
        headers, _ = await store.headers(key, before=None, limit=10, now=now,
                                         include_expired=True)
        logged = await store._client.zrange(f"{prefix}:{{{key}}}:seq", 0, -1)
        record = await store.get_run(key, now=now)
        await store.aclose()
    assert 0 < ttl_ms <= 500
    assert exists == 0
    assert latest is not None
    assert latest[0].sequence == 0
    assert [header.sequence for header in headers] == [0]
    assert logged == [b"0"], "the stale log entry of the expired checkpoint was not removed"
    assert record is not None
    assert record.checkpoint_count == 1


async def test_status_change_never_extends_a_ttl(prefixed: tuple[RedisTarget, str]) -> None:
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix)
    run = make_run("ttl-kept")
    key = key_of(run)
    names = [f"{prefix}:{{{key}}}:c:0", f"{prefix}:{{{key}}}:run", f"{prefix}:{{{key}}}:seq"]
    with anyio.fail_after(30):
        await append(store, run, 0, expires_at=T0 + 100)
        before = [await store._client.pttl(name) for name in names]
        for version, status in enumerate(["paused", "active", "completed"]):
            await store.update_run(key, incarnation=run.incarnation, version=version,
                                   status=status, data=b"", now=T0 + 50)
        after = [await store._client.pttl(name) for name in names]
        await store.aclose()
    assert all(ttl > 0 for ttl in after)
    assert all(late <= early for early, late in zip(before, after, strict=True))


async def test_checkpoint_ttl_is_exact_and_run_keys_outlive_it(
    prefixed: tuple[RedisTarget, str],
) -> None:
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix)
    run = make_run("lifetimes")
    key = key_of(run)
    with anyio.fail_after(30):
        await append(store, run, 0, expires_at=T0 + 30.25)
        data_ttl = await store._client.pttl(f"{prefix}:{{{key}}}:c:0")
        run_ttls = [await store._client.pttl(f"{prefix}:{{{key}}}:{name}")
                    for name in ("run", "seq", "exp", "due")]
        await append(store, run, 1)  # one that never expires: the run keys persist
        persisted = [await store._client.pttl(f"{prefix}:{{{key}}}:{name}")
                     for name in ("run", "seq", "exp")]
        still = await store._client.pttl(f"{prefix}:{{{key}}}:c:0")
        await store.aclose()
    assert 30_000 < data_ttl <= 30_250
    assert all(ttl > data_ttl for ttl in run_ttls)
    assert persisted == [-1, -1, -1]
    assert 0 < still <= data_ttl


async def test_evicted_checkpoint_is_dropped_from_the_log(
    prefixed: tuple[RedisTarget, str],
) -> None:
    """A checkpoint key that vanished (native expiry, eviction) leaves no dangling entry."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix)
    run = make_run("evicted")
    key = key_of(run)
    with anyio.fail_after(30):
        for sequence in range(4):
            await append(store, run, sequence)
        await store._client.unlink(f"{prefix}:{{{key}}}:c:3", f"{prefix}:{{{key}}}:c:1")
        latest = await store.latest(key, now=T0)
        headers, _ = await store.headers(key, before=None, limit=10, now=T0)
        record = await store.get_run(key, now=T0)
        await store.aclose()
    assert latest is not None
    assert latest[0].sequence == 2
    assert [header.sequence for header in headers] == [2, 0]
    assert record is not None
    assert (record.checkpoint_count, record.latest_sequence) == (2, 3)


@pytest.mark.parametrize("cluster_path", [False, True], ids=["plain", "cluster-code-path"])
async def test_runs_whose_keys_vanished_leave_the_indexes(
    prefixed: tuple[RedisTarget, str], cluster_path: bool
) -> None:
    """Run keys gone (native expiry while no cleanup ran): listings skip and drop the
    entries, counts exclude them, purging forgets the due entry."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix, cluster=cluster_path)
    gone, kept = make_run("vanished", created_at=T0 + 1), make_run("kept", created_at=T0)
    with anyio.fail_after(30):
        await append(store, kept, 0)
        await append(store, gone, 0, expires_at=T0 + 10)
        run_keys = [key async for key in store._client.scan_iter(
            match=f"{prefix}:{{{key_of(gone)}}}:*")]
        await store._client.unlink(*run_keys)
        # Read once the run has expired, as its keys would only vanish after that.
        counted = await store.count_runs(status=None, now=T0 + 10)
        runs, _ = await store.list_runs(status=None, limit=10, cursor=None, now=T0 + 10)
        indexed = await store._client.zcard(f"{prefix}:{{idx:{prefix}}}:all")
        purged = await store.purge_expired(now=T0 + 10, limit=10)
        due = await store._client.zcard(f"{prefix}:{{idx:{prefix}}}:due")
        await store.aclose()
    assert counted == 1
    assert [run.run_id for run in runs] == ["kept"]
    assert indexed == 1
    assert purged == (0, True)
    # On Redis Cluster the listing's forget leaves the run's tombstone, due an hour later.
    assert due == (1 if cluster_path else 0)


async def test_purge_walks_only_what_is_due(prefixed: tuple[RedisTarget, str]) -> None:
    """purge_expired reads the due index up to now, not every run: O(expired)."""
    target, prefix = prefixed
    real_server(target)
    counter = counting_connection_class()
    client = aioredis.Redis.from_url(target.url, connection_class=counter)
    store = RedisStore(client, prefix=prefix)
    with anyio.fail_after(60):
        await load_scripts(client)
        for index in range(30):
            await append(store, make_run(f"forever-{index}"), 0)
        expiring = make_run("expiring")
        await append(store, expiring, 0, expires_at=T0 + 10)
        trips = await round_trips(counter, lambda: store.purge_expired(now=T0 + 10, limit=100))
        count = await store.count_runs(status=None, now=T0 + 10)
        await client.aclose()
    assert trips == 3  # due range, one run's purge, the "anything left?" count
    assert count == 30


# -- shared items -------------------------------------------------------------------------


@pytest.mark.parametrize("cluster", [False, True], ids=["plain", "cluster-code-path"])
async def test_a_new_incarnation_holds_only_what_outlives_the_old_one(
    prefixed: tuple[RedisTarget, str], cluster: bool
) -> None:
    """A run appended again after it expired starts from what the old incarnation leaves:
    the items its checkpoints named go with it, so naming one without its value is refused
    (no key changes, no run is created); an item no checkpoint named stays and may be named."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix, cluster=cluster)
    old = make_run("reborn", expires_at=T0 + 10)
    key = key_of(old)
    later = T0 + 20
    new = make_run("reborn", created_at=later)
    with anyio.fail_after(30):
        await append_with_items(store, old, 0, expires_at=T0 + 10, refs=["b/named"],
                                items=[make_item("b/named")])
        await store.put_items(key, [make_item("b/loose")], now=T0)
        before = await keys_under(store._client, prefix)
        with pytest.raises(SharedItemGone) as refused:
            await append_with_items(store, new, 0, now=later, refs=["b/loose", "b/named"])
        after = await keys_under(store._client, prefix)
        refused_run = await store.get_run(key, now=later)
        await append_with_items(store, new, 0, now=later, refs=["b/loose"])
        found = await store.read_with_items(key, sequence=0, now=later)
        await store.aclose()
    assert refused.value.keys == ("b/named",)
    assert after == before
    assert refused_run is None
    assert found is not None
    assert found[2] == {"b/loose": b"value-b/loose"}


# -- bad input and faults ---------------------------------------------------------------


async def test_oversized_payload_is_refused_before_writing(
    prefixed: tuple[RedisTarget, str],
) -> None:
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix, max_payload_bytes=1000)
    run = make_run("big")
    with anyio.fail_after(30):
        with pytest.raises(ValidationError, match="max_payload_bytes"):
            await append(store, run, 0, payload=b"x" * 2000)
        with pytest.raises(ValidationError, match="max_payload_bytes"):
            await store.put_items(key_of(run), [make_item("ok"), make_item("big", b"x" * 1001)],
                                  now=T0)
        written = await keys_under(store._client, prefix)
        await append(store, run, 0, payload=b"x" * 900)
        await store.aclose()
    assert written == []


async def _garbage_server(reply: bytes) -> tuple[asyncio.AbstractServer, int]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_a_server_that_is_not_redis_is_named() -> None:
    server, port = await _garbage_server(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    store = RedisStore.from_url(f"redis://127.0.0.1:{port}/0", retry=FAST_RETRY)
    try:
        with anyio.fail_after(30), pytest.raises(StoreUnavailableError) as caught:
            await store.get_run(key_of(make_run("x")), now=T0)
    finally:
        await store.aclose()
        server.close()
        await server.wait_closed()
    assert "Redis" in str(caught.value)
    assert "points at a Redis server" in str(caught.value)
    assert isinstance(caught.value.__cause__, redis_errors.RedisError)


async def test_postgresql_is_not_redis() -> None:
    try:
        with socket_open("127.0.0.1", 5432):
            pass
    except OSError:
        pytest.skip("nothing listens on 127.0.0.1:5432")
    store = RedisStore.from_url("redis://127.0.0.1:5432/0", retry=FAST_RETRY)
    try:
        with anyio.fail_after(30), pytest.raises(StoreUnavailableError) as caught:
            await store.latest(key_of(make_run("x")), now=T0)
    finally:
        await store.aclose()
    assert "Redis server" in str(caught.value)
    assert isinstance(caught.value.__cause__, redis_errors.RedisError)


def socket_open(host: str, port: int) -> Any:
    import socket

    return socket.create_connection((host, port), timeout=1)


async def test_connection_refused_is_unavailable_after_retries() -> None:
    port = free_port()
    store = RedisStore.from_url(f"redis://127.0.0.1:{port}/0", retry=FAST_RETRY)
    try:
        with anyio.fail_after(30), pytest.raises(StoreUnavailableError) as caught:
            await append(store, make_run("nowhere"), 0)
    finally:
        await store.aclose()
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert "is running" in str(caught.value)
    assert isinstance(caught.value.__cause__, redis_errors.ConnectionError)


async def test_server_restart_is_survived(private_redis: PrivateRedis) -> None:
    """Down: a typed error after the retries. Back (empty script cache): works again."""
    store = RedisStore.from_url(f"{private_redis.url}?prefix=restart", retry=FAST_RETRY)
    run = make_run("restarted")
    try:
        with anyio.fail_after(60):
            await append(store, run, 0)
            private_redis.stop()
            with pytest.raises(StoreUnavailableError):
                await store.get_run(key_of(run), now=T0)
            private_redis.start()
            await append(store, run, 0)  # the restarted server kept nothing (no persistence)
            found = await store.latest(key_of(run), now=T0)
    finally:
        await store.aclose()
        if private_redis.process is None:
            private_redis.start()
    assert found is not None


async def test_missing_acl_permission_says_what_to_grant(private_redis: PrivateRedis) -> None:
    admin = aioredis.Redis.from_url(private_redis.url)
    await admin.execute_command(
        "ACL", "SETUSER", "reader", "on", ">pw", "~*", "+@read", "+@connection")
    store = RedisStore.from_url(
        f"redis://reader:pw@127.0.0.1:{private_redis.port}/0?prefix=acl", retry=FAST_RETRY)
    try:
        with anyio.fail_after(30), pytest.raises(StoreError) as caught:
            await append(store, make_run("denied"), 0)
    finally:
        await store.aclose()
        await admin.execute_command("ACL", "DELUSER", "reader")
        await admin.aclose()
    assert "users.acl" in str(caught.value)
    assert isinstance(caught.value.__cause__, redis_errors.NoPermissionError)


async def test_wrong_password_is_a_configuration_error(private_redis: PrivateRedis) -> None:
    admin = aioredis.Redis.from_url(private_redis.url)
    await admin.execute_command("ACL", "SETUSER", "locked", "on", ">right", "~*", "+@all")
    store = RedisStore.from_url(
        f"redis://locked:wrong@127.0.0.1:{private_redis.port}/0", retry=FAST_RETRY)
    try:
        with anyio.fail_after(30), pytest.raises(ConfigurationError, match="password"):
            await store.get_run(key_of(make_run("x")), now=T0)
    finally:
        await store.aclose()
        await admin.execute_command("ACL", "DELUSER", "locked")
        await admin.aclose()


# -- the ops kit's ACL --------------------------------------------------------------------


def _acl_rules() -> list[str]:
    lines = [line.strip() for line in ACL_FILE.read_text().splitlines()]
    users = [line for line in lines if line.startswith("user fastcheckpoint ")]
    assert len(users) == 1, "users.acl must define the user 'fastcheckpoint' once"
    return users[0].split()[2:]


def _acl_commands() -> set[str]:
    return {rule[1:].lower() for rule in _acl_rules() if rule.startswith("+")}


def _script_commands() -> set[str]:
    found: set[str] = set()
    for text in [*SCRIPTS.values(), INDEX, INTENT]:
        found |= {name.lower() for name in re.findall(r"redis\.call\('([A-Z]+)'", text)}
    return found


async def test_acl_example_lists_exactly_the_commands_the_store_sends(
    prefixed: tuple[RedisTarget, str],
) -> None:
    """Commands sent on the connection plus those the scripts call = the ACL's grants."""
    target, prefix = prefixed
    real_server(target)
    counter = counting_connection_class()
    client = aioredis.Redis.from_url(target.url, connection_class=counter)
    store = RedisStore(client, prefix=prefix)
    with anyio.fail_after(30):
        await _exercise(store, make_run("acl"))
        await store.purge_expired(now=T0 + 1e9, limit=10)
        await client.aclose()
    sent = set()
    for command in counter.commands:
        name = command[0].decode().lower()
        if name in ("client", "script", "config", "acl", "cluster"):
            name += "|" + command[1].decode().lower()
        sent.add(name)
    # redis-py's connection handshake varies with its version and the server's (HELLO,
    # CLIENT SETINFO / MAINT_NOTIFICATIONS, which it tolerates being denied); the ACL grants
    # only what a connection needs: HELLO for RESP3, SELECT for a db other than 0, and Redis
    # Cluster's slot discovery. SCRIPT LOAD serves the NOSCRIPT fallback.
    sent -= {"hello", "client|setinfo", "client|maint_notifications", "select"}
    connection = {"hello", "select", "cluster|slots", "cluster|shards"}
    assert _acl_commands() == sent | _script_commands() | connection | {"script|load"}


async def test_ops_kit_files_load_and_the_acl_is_enough() -> None:
    """redis-server accepts stores/redis/redis.conf and users.acl as they are, and the ACL's
    user can run every operation, including SCRIPT LOAD after NOSCRIPT, on its prefix only."""
    if redis_binary() is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(free_port(), config=KIT / "redis.conf",
                          extra=("--aclfile", str(KIT / "users.acl")))
    server.start()
    admin = aioredis.Redis.from_url(
        f"redis://fastcheckpoint:change-me@127.0.0.1:{server.port}/0")
    store = RedisStore.from_url(
        f"redis://fastcheckpoint:change-me@127.0.0.1:{server.port}/0?prefix=fastcheckpoint",
        retry=FAST_RETRY)
    # The Redis Cluster code path calls more inside its scripts (intents, stamps).
    cluster_path = RedisStore(aioredis.Redis.from_url(
        f"redis://fastcheckpoint:change-me@127.0.0.1:{server.port}/0"),
        prefix="fastcheckpoint", cluster=True, owns_client=True)
    try:
        with anyio.fail_after(30):
            await _exercise(cluster_path, make_run("least-privilege-cluster"))
            await _exercise(store, make_run("least-privilege"))
            await append(store, make_run("other"), 0, expires_at=T0 + 5)
            purged = await store.purge_expired(now=T0 + 5, limit=10)
            with pytest.raises(redis_errors.NoPermissionError):
                await admin.set("elsewhere", "x")  # outside the prefix: denied
            with pytest.raises(redis_errors.NoPermissionError):
                await admin.flushall()
    finally:
        await store.aclose()
        await cluster_path.aclose()
        await admin.aclose()
        server.stop()
    assert purged == (1, True)


# -- connection cuts ----------------------------------------------------------------------


async def test_cut_connections_leave_no_half_written_checkpoint(
    prefixed: tuple[RedisTarget, str],
) -> None:
    """A proxy drops requests before the server sees them and drops replies after it ran
    them. redis-py retries; the append script recognises a retry of itself, so every
    acknowledged checkpoint is restorable, none is duplicated, and none is half-written."""
    target, prefix = prefixed
    real_server(target)
    plan = ["pass", "drop", "pass", "lose-reply"] * 15
    proxy = CuttingProxy(*host_and_port(target), plan)
    await proxy.start()
    policy = RetryPolicy(base_delay=0.001, max_delay=0.01, max_retries=5)
    store = RedisStore.from_url(f"redis://127.0.0.1:{proxy.port}/0?prefix={prefix}",
                                retry=policy)
    manager = CheckpointManager(store, config=CheckpointConfig(max_checkpoints_per_run=None))
    acknowledged = []
    try:
        with anyio.fail_after(60):
            for step in range(40):
                created = await manager.create("cut", state={"step": step}, force=True)
                assert created is not None
                acknowledged.append(created)
            direct = make_store(target, prefix)
            restored = [await manager.restore_from(c.checkpoint_id) for c in acknowledged]
            key = key_of(make_run("cut"))
            headers, _ = await direct.headers(key, before=None, limit=1000, now=time.time())
            full = [await direct.get(key, header.sequence, now=time.time())
                    for header in headers]
            record = await direct.get_run(key, now=time.time())
            await direct.aclose()
    finally:
        await store.aclose()
        await proxy.stop()
    assert proxy.cuts >= 10
    assert [c.metadata.sequence for c in acknowledged] == list(range(40))
    assert [r.state if r else None for r in restored] == [{"step": s} for s in range(40)]
    assert [header.sequence for header in headers] == list(range(39, -1, -1))
    assert all(found is not None and found[0].payload for found in full)
    assert record is not None
    assert (record.latest_sequence, record.checkpoint_count) == (39, 40)


# -- processes ----------------------------------------------------------------------------


async def test_processes_get_unique_gap_free_sequences(
    prefixed: tuple[RedisTarget, str],
) -> None:
    target, prefix = prefixed
    real_server(target)
    url = f"{target.url}?prefix={prefix}"
    workers, each = 4, 25

    def run_workers() -> list[str]:
        processes = [
            subprocess.Popen([sys.executable, str(WORKER), url, "shared-run", str(each),
                              f"w{index}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             cwd=ROOT)
            for index in range(workers)
        ]
        outputs = []
        for process in processes:
            out, err = process.communicate(timeout=120)
            assert process.returncode == 0, err.decode()
            outputs.append(out.decode())
        return outputs

    with anyio.fail_after(150):
        outputs = await anyio.to_thread.run_sync(run_workers)
        store = make_store(target, prefix)
        record = await store.get_run(key_of(make_run("shared-run")), now=time.time())
        await store.aclose()
    sequences = sorted(int(line) for out in outputs for line in out.split())
    assert sequences == list(range(workers * each))
    assert record is not None
    assert (record.latest_sequence, record.checkpoint_count) == (99, 100)


# -- construction -------------------------------------------------------------------------


async def test_url_options(prefixed: tuple[RedisTarget, str]) -> None:
    target, prefix = prefixed
    real_server(target)
    base = target.url.rsplit("/", 1)[0]
    store = RedisStore.from_url(
        f"{base}/3?prefix={prefix}&max_payload_bytes=77&default_ttl_seconds=60&socket_timeout=5",
        retry=RetryPolicy(max_retries=2),
    )
    kwargs = store._client.get_connection_kwargs()
    try:
        assert (kwargs["db"], kwargs["socket_timeout"]) == (3, 5.0)
        assert kwargs["retry"].get_retries() == 2
        assert (store.max_payload_bytes, store.default_ttl_seconds) == (77, 60.0)
        assert store._ns == f"{prefix}:"
        assert not store._cluster
        cluster = RedisStore.from_url("redis://127.0.0.1:1/0?cluster=true")
        assert cluster._cluster
        await cluster.aclose()
    finally:
        await store.aclose()


@pytest.mark.parametrize(("url", "message"), [
    ("http://127.0.0.1/0", "starts with redis://"),
    ("redis://127.0.0.1/0?cluster=maybe", "cluster="),
    ("redis://127.0.0.1/0?max_payload_bytes=lots", "integer"),
    ("redis://127.0.0.1/0?prefix=a{b}", "hash tags"),
    ("redis://127.0.0.1/notanumber", "database number"),
])
def test_bad_urls_are_configuration_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RedisStore.from_url(url)


async def test_given_client_is_never_closed(prefixed: tuple[RedisTarget, str]) -> None:
    target, prefix = prefixed
    real_server(target)
    client = aioredis.Redis.from_url(target.url)
    store = RedisStore(client, prefix=prefix)
    await store.aclose()
    with anyio.fail_after(10):
        assert await client.ping() is True
        await client.aclose()


def test_clients_that_decode_responses_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="decode_responses=False"):
        RedisStore(aioredis.Redis(decode_responses=True))
    with pytest.raises(ConfigurationError, match=r"redis\.asyncio"):
        RedisStore(object())


def test_retry_policy_maps_onto_redis_py_full_jitter() -> None:
    retry = redis_retry(RetryPolicy(base_delay=0.2, max_delay=1.0, max_retries=4))
    backoff = retry._backoff
    assert retry.get_retries() == 4
    assert all(0 <= backoff.compute(failures) <= min(1.0, 0.2 * 2 ** failures)
               for failures in range(8) for _ in range(50))
    assert max(backoff.compute(6) for _ in range(200)) > 0.5  # capped at 1.0, not at base


async def test_fastagentic_shape_applies_its_ttl(prefixed: tuple[RedisTarget, str]) -> None:
    """FastAgentic's store-level ``ttl_seconds`` reaches checkpoints through the manager, so
    what ``create`` returns, what ``restore`` reads and the key's real TTL all agree."""
    target, prefix = prefixed
    real_server(target)
    client = aioredis.Redis.from_url(target.url)
    default = RedisCheckpointStore(client)
    assert default._ns == "fastagentic:checkpoint:"
    store = RedisCheckpointStore(client, prefix=f"{prefix}:", ttl_seconds=30)
    manager = CheckpointManager(store)
    with anyio.fail_after(30):
        created = await manager.create("fa", {"n": 1})
        restored = await manager.restore("fa")
        ttl = await client.pttl(f"{prefix}:{{{key_of(make_run('fa'))}}}:c:0")
        overridden = await manager.create("fa", {"n": 2}, ttl_seconds=5)
        await manager.aclose()
        assert await client.ping() is True
        await client.aclose()
    assert created is not None
    assert restored is not None
    assert overridden is not None
    assert created.metadata.ttl_seconds == 30
    assert created.metadata.expires_at == restored.metadata.expires_at
    assert created.metadata.expires_at == created.metadata.created_at + 30
    assert 29_000 < ttl <= 30_000
    assert overridden.metadata.ttl_seconds == 5
