"""RedisStore under tampering, lost replies, crashes between calls and a full server: no
acknowledged checkpoint is lost, overwritten or misattributed, and every call says what
happened."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from fastcheckpoint import CheckpointConfig, CheckpointManager, CheckpointStatus
from fastcheckpoint._config import RetryPolicy
from fastcheckpoint.errors import (
    CorruptCheckpointError,
    SequenceConflict,
    StoreError,
    StoreUnavailableError,
)
from fastcheckpoint.stores import redis as redis_store
from fastcheckpoint.stores.redis import RedisStore, redis_retry
from fastcheckpoint.testing import T0, key_of, make_checkpoint, make_item, make_run
from tests.stores._redis_servers import PrivateRedis
from tests.stores._redis_support import (
    CuttingProxy,
    append,
    delete_prefix,
    host_and_port,
    keys_under,
    load_scripts,
    make_store,
    real_server,
)
from tests.stores.conftest import RedisTarget

pytestmark = pytest.mark.anyio

_DEADLINE = 30


@pytest.fixture
def anyio_backend() -> str:
    # redis.asyncio runs on asyncio only.
    return "asyncio"


class Clock:
    """The manager's injected clock: tests move it instead of sleeping."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _manager(store: RedisStore, clock: Clock | None = None) -> CheckpointManager:
    config = CheckpointConfig(max_checkpoints_per_run=None, clock=clock or Clock())
    return CheckpointManager(store, config=config)


def _key(prefix: str, run_id: str, name: str) -> str:
    return f"{prefix}:{{{key_of(make_run(run_id))}}}:{name}"


# -- a replayed run record ------------------------------------------------------------------


@pytest.mark.parametrize("cluster_path", [False, True], ids=["plain", "cluster-code-path"])
async def test_a_replayed_run_record_never_overwrites_acknowledged_checkpoints(
    prefixed: tuple[RedisTarget, str], cluster_path: bool
) -> None:
    """Snapshot the run hash, append more, put the old hash back: later creates (from a
    manager that knows nothing, like another process) neither overwrite nor drop anything
    acknowledged, even when the old record's expiry says the run is over."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix, cluster=cluster_path)
    clock = Clock()
    writer = _manager(store, clock)
    run_hash = _key(prefix, "replayed", "run")
    with anyio.fail_after(_DEADLINE):
        created = [await writer.create("replayed", {"n": n}, ttl_seconds=100, force=True)
                   for n in range(2)]
        snapshot = await store._client.dump(run_hash)
        created += [await writer.create("replayed", {"n": n}, ttl_seconds=1000, force=True)
                    for n in range(2, 5)]
        await store._client.restore(run_hash, 0, snapshot, replace=True)
        clock.now = T0 + 500  # the old record says the run expired at T0 + 100
        other = _manager(store, clock)
        later = await other.create("replayed", {"n": 99}, force=True)
        restored = [await other.restore_from(c.checkpoint_id) for c in created if c]
        listed = await other.list_checkpoints("replayed")
        await store.aclose()
    assert later is not None
    assert later.metadata.sequence == 5
    assert [r.state if r else None for r in restored] == [
        None, None, {"n": 2}, {"n": 3}, {"n": 4}]  # the first two expired at T0 + 100
    assert [m.sequence for m in listed] == [5, 4, 3, 2]


# -- lost replies ---------------------------------------------------------------------------


async def _through_lossy_proxy(
    target: RedisTarget, prefix: str, plan: list[str],
    on_lost_reply: Callable[[], Awaitable[None]] | None = None,
) -> tuple[CuttingProxy, RedisStore]:
    proxy = CuttingProxy(*host_and_port(target), plan, on_lost_reply=on_lost_reply)
    await proxy.start()
    policy = RetryPolicy(base_delay=0.001, max_delay=0.01, max_retries=3)
    store = RedisStore.from_url(f"redis://127.0.0.1:{proxy.port}/0?prefix={prefix}",
                                retry=policy)
    return proxy, store


@pytest.mark.parametrize(("operation", "plan", "expected"), [
    ("delete", ["lose-reply"], True),
    ("delete_run", ["lose-reply"], 3),
    ("prune", ["pass", "lose-reply", "lose-reply"], 2),  # listed, then two deletes
    ("delete_items", ["lose-reply"], 2),
    ("purge_expired", ["lose-reply"], (3, True)),
])
async def test_a_retry_after_a_lost_reply_reports_what_happened(
    prefixed: tuple[RedisTarget, str], operation: str, plan: list[str], expected: Any
) -> None:
    """The server applied the call, the proxy dropped its reply, redis-py retried: the retry
    reports what the first attempt did, not what is left to do."""
    target, prefix = prefixed
    real_server(target)
    direct = make_store(target, prefix)
    clock = Clock()
    created = [await _manager(direct, clock).create("lossy", {"n": n}, ttl_seconds=10)
               for n in range(3)]
    key = key_of(make_run("lossy"))
    await direct.put_items(key, [make_item("a"), make_item("b")], now=T0)
    await load_scripts(direct._client)  # so that the cut hits the call itself, not NOSCRIPT
    proxy, store = await _through_lossy_proxy(target, prefix, plan)
    manager = _manager(store, clock)
    try:
        with anyio.fail_after(_DEADLINE):
            if operation == "delete":
                assert created[0] is not None
                result: Any = await manager.delete(created[0].checkpoint_id)
            elif operation == "delete_run":
                result = await manager.delete_run("lossy")
            elif operation == "prune":
                result = await manager.prune("lossy", keep=1)
            elif operation == "delete_items":
                result = await store.delete_items(key, ["a", "b", "c"])
            else:
                result = await store.purge_expired(now=T0 + 10, limit=100)
    finally:
        await store.aclose()
        await direct.aclose()
        await proxy.stop()
    assert proxy.cuts == plan.count("lose-reply")
    assert result == expected


@pytest.mark.parametrize(("operation", "plan"), [
    ("create", ["pass", "lose-reply"]),  # the intent, the run script
    ("pause", ["pass", "pass", "lose-reply"]),  # the run read, the intent, the run script
])
async def test_a_retry_after_a_lost_reply_keeps_the_index_on_the_cluster_code_path(
    prefixed: tuple[RedisTarget, str], operation: str, plan: list[str]
) -> None:
    """On Redis Cluster a run script returns the index changes it implies; when its reply is
    lost, the retry must return them again, or the run never reaches the index."""
    target, prefix = prefixed
    real_server(target)
    direct = make_store(target, prefix)
    if operation == "pause":
        await _manager(direct).create("lossy", {"n": 0})
    await load_scripts(direct._client)
    proxy = CuttingProxy(*host_and_port(target), plan)
    await proxy.start()
    client = aioredis.Redis.from_url(
        f"redis://127.0.0.1:{proxy.port}/0",
        retry=redis_retry(RetryPolicy(base_delay=0.001, max_delay=0.01, max_retries=3)))
    store = RedisStore(client, prefix=prefix, cluster=True, owns_client=True)
    manager = _manager(store)
    try:
        with anyio.fail_after(_DEADLINE):
            if operation == "create":
                await manager.create("lossy", {"n": 0})
            else:
                await manager.pause("lossy", request={"question": "ok?"})
            wanted = CheckpointStatus.ACTIVE if operation == "create" else CheckpointStatus.PAUSED
            listed = await manager.list_runs(wanted)
    finally:
        await store.aclose()
        await direct.aclose()
        await proxy.stop()
    assert proxy.cuts == 1
    assert [run.run_id for run in listed] == ["lossy"]


async def test_a_guarded_pause_whose_reply_was_lost_before_a_create_returns_the_paused_run(
    prefixed: tuple[RedisTarget, str]
) -> None:
    """The pause was applied while its checkpoint was the newest; another process creates a
    checkpoint before redis-py retries. The retry must report the pause applied (the saved
    answer of its token), not refuse it for the newer checkpoint or call it a conflict."""
    target, prefix = prefixed
    real_server(target)
    direct = make_store(target, prefix)
    clock = Clock()
    created = await _manager(direct, clock).create("lossy", {"n": 0})
    assert created is not None
    await load_scripts(direct._client)

    async def another_create() -> None:
        await _manager(direct, clock).create("lossy", {"n": 1})

    proxy = CuttingProxy(*host_and_port(target), ["pass", "lose-reply"],
                         on_lost_reply=another_create)  # the run read, then the pause
    await proxy.start()
    store = RedisStore.from_url(
        f"redis://127.0.0.1:{proxy.port}/0?prefix={prefix}",
        retry=RetryPolicy(base_delay=0.001, max_delay=0.01, max_retries=3))
    try:
        with anyio.fail_after(_DEADLINE):
            paused = await _manager(store, clock).pause(
                "lossy", {"question": "ok?"}, latest_sequence=created.metadata.sequence)
            run = await _manager(direct, clock).get_run("lossy")
    finally:
        await store.aclose()
        await direct.aclose()
        await proxy.stop()
    assert proxy.cuts == 1
    assert paused.status is CheckpointStatus.PAUSED
    assert run is not None
    assert (run.status, run.latest_sequence) == (CheckpointStatus.PAUSED, 1)


# -- a create sent again after its checkpoint or its run went ---------------------------------

# What another process does between the applied create and redis-py's resend of it.
# "memo_gone": the resend's memo is gone (evicted, or written by an earlier release), the
# checkpoint is not: the token in the checkpoint recognises it.
_MEANWHILE = ["delete", "prune", "delete_run", "restart", "delete_new_run", "memo_gone"]


@pytest.mark.parametrize("cluster_path", [False, True], ids=["plain", "cluster-code-path"])
@pytest.mark.parametrize("meanwhile", _MEANWHILE)
async def test_a_create_sent_again_after_its_checkpoint_went_is_not_written_again(
    prefixed: tuple[RedisTarget, str],
    monkeypatch: pytest.MonkeyPatch,
    meanwhile: str,
    cluster_path: bool,
) -> None:
    """A create is applied and its reply lost. Before redis-py sends it again, another process
    (a store of its own) deletes that checkpoint, prunes it by a create of its own
    (max_checkpoints_per_run=1), deletes the run, or deletes it and starts it again; or the
    create was the run's first and the run is deleted. The resend is acknowledged at the
    sequence written, once: the manager does not write the create again at the next sequence
    (a deleted checkpoint or run came back; a stale state pruned the newer one and restore
    returned it), and on Redis Cluster the resend puts no gone run back into the index."""
    target, prefix = prefixed
    real_server(target)
    clock = Clock()

    def config() -> CheckpointConfig:
        kept = 1 if meanwhile == "prune" else None
        return CheckpointConfig(max_checkpoints_per_run=kept, history_min_entries=None, clock=clock)

    direct = make_store(target, prefix, cluster=cluster_path)
    other = CheckpointManager(direct, config=config())
    await load_scripts(direct._client)  # so that the cut hits the call itself, not NOSCRIPT
    first = meanwhile == "delete_new_run"
    if first:  # the lost one is the run's first create: (intent,) run script
        plan = ["pass", "lose-reply"] if cluster_path else ["lose-reply"]
    else:  # the writer's first create, (intent, run script, index,) then the lost one
        plan = ["pass"] * (3 if cluster_path else 1) + ["lose-reply"]

    async def another_process() -> None:
        if meanwhile == "delete":
            listed = await other.list_checkpoints("r")
            assert await other.delete(listed[0].checkpoint_id)
        elif meanwhile == "prune":
            newer = await other.create("r", {"by": "B", "step": 2})
            assert newer is not None
            assert newer.metadata.sequence == 2
        elif meanwhile == "memo_gone":
            memos = [key for key in await keys_under(direct._client, prefix) if b":op:" in key]
            assert memos
            await direct._client.unlink(*memos)
        else:
            assert await other.delete_run("r") > 0
            if meanwhile == "restart":
                await other.create("r", {"by": "B", "step": 0})

    proxy = CuttingProxy(*host_and_port(target), plan, on_lost_reply=another_process)
    await proxy.start()
    client = aioredis.Redis.from_url(
        f"redis://127.0.0.1:{proxy.port}/0",
        retry=redis_retry(RetryPolicy(base_delay=0.001, max_delay=0.01, max_retries=3)),
    )
    store = RedisStore(client, prefix=prefix, cluster=cluster_path, owns_client=True)
    writer = CheckpointManager(store, config=config())
    try:
        with anyio.fail_after(_DEADLINE):
            if not first:
                await writer.create("r", {"by": "A", "step": 0})
            appends: list[int] = []
            sent = store.append

            async def counted(*args: Any, **kwargs: Any) -> str:
                appends.append(args[1].sequence)
                return await sent(*args, **kwargs)

            monkeypatch.setattr(store, "append", counted)
            created = await writer.create("r", {"by": "A", "step": 1})
            monkeypatch.undo()
            held = [(c.sequence, c.checkpoint_id) for c in await other.list_checkpoints("r")]
            latest = await other.restore("r")
            counted_runs = await other.count_runs()
    finally:
        await store.aclose()
        await direct.aclose()
        await proxy.stop()
    written = 0 if first else 1
    assert proxy.cuts == 1
    assert appends == [written]  # the store was asked once, and redis-py sent it again
    assert created is not None
    assert created.metadata.sequence == written
    if meanwhile == "memo_gone":
        assert [sequence for sequence, _ in held] == [1, 0]
        assert latest is not None
        assert latest.state == {"by": "A", "step": 1}
    elif meanwhile == "delete":
        assert [sequence for sequence, _ in held] == [0]
        assert latest is not None
        assert latest.state == {"by": "A", "step": 0}
    elif meanwhile in ("prune", "restart"):
        assert [sequence for sequence, _ in held] == [2 if meanwhile == "prune" else 0]
        assert latest is not None
        assert latest.state == {"by": "B", "step": held[0][0]}
    else:
        assert (held, latest) == ([], None)
    assert counted_runs == (0 if meanwhile.startswith("delete_") else 1)


async def test_a_create_resent_after_its_memo_and_run_record_were_evicted_is_acknowledged(
    prefixed: tuple[RedisTarget, str],
) -> None:
    """The reply of a run's first create is lost; before redis-py sends it again, an evicting
    server drops the create's memo, its run record and its log, but not its checkpoint. The
    token in the checkpoint recognises the resend, whose reply then held no status: the
    store returned the status "None" (the manager logged it as unknown). It is acknowledged
    with the status the create wrote."""
    target, prefix = prefixed
    real_server(target)
    direct = make_store(target, prefix)
    await load_scripts(direct._client)
    run = make_run("evicted")

    async def evict() -> None:
        names = [b"run", b"seq", b"exp"]
        keys = [key for key in await keys_under(direct._client, prefix)
                if b":op:" in key or key.rsplit(b":", 1)[-1] in names]
        assert len(keys) == 4
        await direct._client.unlink(*keys)

    proxy, store = await _through_lossy_proxy(target, prefix, ["lose-reply"], evict)
    try:
        with anyio.fail_after(_DEADLINE):
            status = await store.append(
                key_of(run), make_checkpoint(run, 0, expires_at=T0 + 100), run=run,
                keep_latest=None, now=T0)
    finally:
        await store.aclose()
        await direct.aclose()
        await proxy.stop()
    assert proxy.cuts == 1
    assert status == run.status


async def test_a_create_leaves_a_memo_of_its_reply_for_five_minutes(
    prefixed: tuple[RedisTarget, str],
) -> None:
    """What lets a resend recognise its create once the checkpoint is gone: one memo per
    create, under the run's hash tag, expiring natively after five minutes (bounded
    storage: about 150 bytes per create of the last five minutes). A refused create leaves
    none."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix)
    run = make_run("memo")
    try:
        with anyio.fail_after(_DEADLINE):
            await append(store, run, 0)
            await append(store, run, 1)
            with pytest.raises(SequenceConflict):
                await append(store, run, 1)
            memos = [key for key in await keys_under(store._client, prefix) if b":op:" in key]
            lives = [await store._client.pttl(key) for key in memos]
    finally:
        await store.aclose()
    assert len(memos) == 2
    assert all(key.startswith(_key(prefix, "memo", "op:").encode()) for key in memos)
    assert all(0 < life <= 300_000 for life in lives), lives


# -- records swapped in from another run -------------------------------------------------------


async def _copy(store: RedisStore, source: str, target: str) -> None:
    """Overwrite ``target`` with a copy of ``source`` (DUMP/RESTORE: works across slots)."""
    await store._client.restore(target, 0, await store._client.dump(source), replace=True)


async def test_a_checkpoint_copied_from_another_run_is_corrupt(
    prefixed: tuple[RedisTarget, str],
) -> None:
    """Copying run B's checkpoint over run A's makes A's reads fail naming the key, never
    return B's checkpoint as A's."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix)
    manager = _manager(store)
    with anyio.fail_after(_DEADLINE):
        ours = [await manager.create("A", {"run": "A", "n": n}) for n in range(2)]
        for n in range(2):
            await manager.create("B", {"run": "B", "n": n})
        swapped = _key(prefix, "A", "c:1")
        await _copy(store, _key(prefix, "B", "c:1"), swapped)
        assert ours[1] is not None
        with pytest.raises(CorruptCheckpointError) as latest:
            await manager.restore("A")
        with pytest.raises(CorruptCheckpointError) as direct:
            await manager.restore_from(ours[1].checkpoint_id)
        await store.aclose()
    assert latest.value.key == swapped
    assert direct.value.key == swapped


async def test_the_store_checks_the_sequence_a_checkpoint_was_written_at(
    prefixed: tuple[RedisTarget, str],
) -> None:
    """A checkpoint hash moved to another slot of its run is corrupt at the store already;
    a listing skips it (logged) so that it hides no other checkpoint."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix)
    run = make_run("moved")
    key = key_of(run)
    with anyio.fail_after(_DEADLINE):
        for sequence in range(3):
            await append(store, run, sequence)
        moved = _key(prefix, "moved", "c:2")
        await _copy(store, _key(prefix, "moved", "c:0"), moved)
        with pytest.raises(CorruptCheckpointError) as read:
            await store.get(key, 2, now=T0)
        with pytest.raises(CorruptCheckpointError) as newest:
            await store.latest(key, now=T0)
        headers, _ = await store.headers(key, before=None, limit=10, now=T0)
        await store.aclose()
    assert read.value.key == moved
    assert newest.value.key == moved
    assert [header.sequence for header in headers] == [1, 0]


# -- Redis Cluster: a crash between the run script and the index call --------------------------


async def test_index_changes_lost_in_a_crash_are_repaired_by_cleanup(
    prefixed: tuple[RedisTarget, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process dies after a run script and before its index call (the call is skipped):
    the run is missing from list_runs / count_runs, a paused run from the approval queue,
    until the cleanup loop re-derives the index from the run records."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix, cluster=True)
    clock = Clock()
    manager = _manager(store, clock)
    applied = store._apply_index_ops

    async def crash_after_the_run_script(client: Any, ops: Any) -> None:
        if ops and ops[0] == "intend":  # before the run script: that call went through
            await applied(client, ops)

    with anyio.fail_after(_DEADLINE):
        await manager.create("kept", {"n": 0})
        monkeypatch.setattr(store, "_apply_index_ops", crash_after_the_run_script)
        await manager.create("crashed", {"n": 0})
        await manager.pause("kept", request={"question": "ok?"})
        monkeypatch.undo()
        before = (await manager.list_runs(), await manager.count_runs(),
                  await manager.list_runs(CheckpointStatus.PAUSED))
        clock.now = T0 + 61  # the intents' grace is over: their clients are gone
        await manager.cleanup_expired()
        after = (await manager.list_runs(), await manager.count_runs(),
                 await manager.list_runs(CheckpointStatus.PAUSED),
                 await manager.count_runs(CheckpointStatus.ACTIVE))
        await store.aclose()
    assert [run.run_id for run in before[0]] == ["kept"]
    assert before[1] == 1
    assert list(before[2]) == []
    assert sorted(run.run_id for run in after[0]) == ["crashed", "kept"]
    assert after[1] == 2
    assert [run.run_id for run in after[2]] == ["kept"]
    assert after[3] == 1


# -- Redis at maxmemory ---------------------------------------------------------------------------


@pytest.fixture
async def full_redis(private_redis: PrivateRedis) -> AsyncIterator[aioredis.Redis]:
    """The private server, at its memory limit for the test; its keys are removed after."""
    admin = aioredis.Redis.from_url(private_redis.url)
    try:
        yield admin
    finally:
        with anyio.fail_after(_DEADLINE):
            await admin.config_set("maxmemory", 0)
            await delete_prefix(admin, "oom")
            await admin.aclose()


async def test_at_maxmemory_reads_and_deletes_work_and_create_says_what_to_do(
    private_redis: PrivateRedis, full_redis: aioredis.Redis
) -> None:
    store = RedisStore.from_url(f"{private_redis.url}?prefix=oom",
                                retry=RetryPolicy(max_retries=0))
    clock = Clock()
    manager = _manager(store, clock)
    with anyio.fail_after(_DEADLINE):
        kept = [await manager.create("kept", {"n": n}) for n in range(3)]
        for n in range(2):
            await manager.create("dropped", {"n": n}, ttl_seconds=10)
        gone = make_run("gone")
        await append(store, gone, 0)  # its keys vanish below: the index entry goes stale
        await store._client.script_flush()  # every script must load again, at the limit
        await full_redis.unlink(*[key async for key in full_redis.scan_iter(
            match=f"oom:{{{key_of(gone)}}}:*")])
        await full_redis.config_set("maxmemory", 1)
        with pytest.raises(StoreError) as refused:
            await manager.create("kept", {"n": 3})
        assert kept[2] is not None
        assert kept[0] is not None
        latest = await manager.restore("kept")
        by_id = await manager.restore_from(kept[2].checkpoint_id)
        listed = await manager.list_checkpoints("kept")
        runs = await manager.list_runs()
        counted = await manager.count_runs()
        deleted = await manager.delete(kept[0].checkpoint_id)
        clock.now = T0 + 10
        purged = await manager.cleanup_expired()
        emptied = await manager.delete_run("kept")
        await store.aclose()
    message = str(refused.value)
    assert "maxmemory" in message
    assert "delete" in message
    assert "cleanup_expired" in message
    assert latest is not None
    assert latest.state == {"n": 2}
    assert by_id is not None
    assert by_id.state == {"n": 2}
    assert [m.sequence for m in listed] == [2, 1, 0]
    assert sorted(run.run_id for run in runs) == ["dropped", "kept"]
    assert counted == 2
    assert (deleted, purged, emptied) == (True, 2, 2)


# -- malformed index entries and run records -----------------------------------------------------


@pytest.mark.parametrize("cluster_path", [False, True], ids=["plain", "cluster-code-path"])
async def test_a_malformed_index_entry_or_run_record_hides_no_other_run(
    prefixed: tuple[RedisTarget, str], cluster_path: bool, caplog: pytest.LogCaptureFixture
) -> None:
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix, cluster=cluster_path)
    runs = [make_run(f"run-{index}", created_at=T0 + index) for index in range(3)]
    index_key = f"{prefix}:{{idx:{prefix}}}:all"
    with anyio.fail_after(_DEADLINE):
        for run in runs:
            await append(store, run, 0, expires_at=T0 + 100)
        await store._client.zadd(index_key, {b"not a member": 0, b"~due-only": 0})
        await store._client.zadd(f"{prefix}:{{idx:{prefix}}}:due", {b"garbage": 0})
        await store._client.hset(_key(prefix, "run-1", "run"), "ct", "yesterday")
        with caplog.at_level(logging.WARNING, logger="fastcheckpoint.stores.redis"):
            counted_first = await store.count_runs(status=None, now=T0 + 1)
            listed, _ = await store.list_runs(status=None, limit=10, cursor=None, now=T0 + 1)
            counted = await store.count_runs(status=None, now=T0 + 1)
            purged = await store.purge_expired(now=T0 + 1, limit=10)
        left = await store._client.zrange(index_key, 0, -1)
        await store.aclose()
    assert [run.run_id for run in listed] == ["run-2", "run-0"]
    # Until a listing meets them, the two malformed entries and the damaged run-1 count.
    assert counted_first == 5
    assert counted == 2
    assert purged == (0, True)
    assert len(left) == 3
    assert "not a member" in caplog.text
    assert f"{key_of(runs[1])} in the run listing: its record has unreadable times" in caplog.text


# -- damaged run records ------------------------------------------------------------------------


async def _replace_with_text(store: RedisStore, run_hash: str) -> None:
    await store._client.delete(run_hash)
    await store._client.set(run_hash, b"\x00not a run record")


async def _remove(store: RedisStore, run_hash: str) -> None:
    await store._client.delete(run_hash)


@pytest.mark.parametrize("damage", [_replace_with_text, _remove], ids=["foreign-value", "gone"])
@pytest.mark.parametrize("cluster_path", [False, True], ids=["plain", "cluster-code-path"])
async def test_a_damaged_run_record_hides_no_checkpoint_and_is_repaired(
    prefixed: tuple[RedisTarget, str], cluster_path: bool, damage: Any
) -> None:
    """A run hash replaced by a foreign value, or gone while the log holds live checkpoints:
    restores still work (status active), creates are refused naming the record, and the
    manager's repair rebuilds the record from the log so that creates continue."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix, cluster=cluster_path)
    manager = _manager(store)
    run_hash = _key(prefix, "damaged", "run")
    with anyio.fail_after(_DEADLINE):
        created = [await manager.create("damaged", {"n": n}) for n in range(3)]
        await manager.mark_completed("damaged")
        await damage(store, run_hash)
        restored = await manager.restore("damaged")
        assert created[0] is not None
        first = await manager.restore_from(created[0].checkpoint_id)
        with pytest.raises(CorruptCheckpointError) as refused:
            await manager.create("damaged", {"n": 3})
        reports = await manager.repair("damaged")
        later = await manager.create("damaged", {"n": 3})
        info = await manager.get_run("damaged")
        runs = await manager.list_runs()
        await store.aclose()
    assert restored is not None
    assert restored.state == {"n": 2}
    assert restored.metadata.status == CheckpointStatus.ACTIVE
    assert first is not None
    assert first.state == {"n": 0}
    assert refused.value.key == run_hash
    assert [report.repaired for report in reports] == [True]
    assert later is not None
    assert later.metadata.sequence == 3
    assert info is not None
    assert (info.status, info.checkpoint_count) == (CheckpointStatus.ACTIVE, 4)
    assert [run.run_id for run in runs] == ["damaged"]


# -- Redis Cluster: the index call after the run script ------------------------------------------


async def test_a_failed_index_call_after_the_run_script_does_not_fail_the_create(
    prefixed: tuple[RedisTarget, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run script wrote the checkpoint; the index slot then cannot be reached. Reporting
    the create as failed would make a retrying caller write it twice: it is acknowledged, and
    the intent it recorded lets the cleanup loop index the run later."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix, cluster=True)
    clock = Clock()
    manager = _manager(store, clock)
    applied = store._apply_index_ops

    async def index_slot_gone_after_the_script(client: Any, ops: Any) -> None:
        if ops and ops[0] != "intend":
            raise StoreUnavailableError("the index slot's node is unreachable")
        await applied(client, ops)

    with anyio.fail_after(_DEADLINE):
        monkeypatch.setattr(store, "_apply_index_ops", index_slot_gone_after_the_script)
        created = await manager.create("unindexed", {"n": 0})
        monkeypatch.undo()
        again = await manager.create("unindexed", {"n": 1})
        clock.now = T0 + 61
        await manager.cleanup_expired()
        listed = await manager.list_runs()
        checkpoints = await manager.list_checkpoints("unindexed")
        await store.aclose()
    assert created is not None
    assert again is not None
    assert (created.metadata.sequence, again.metadata.sequence) == (0, 1)
    assert [m.sequence for m in checkpoints] == [1, 0]
    assert [run.run_id for run in listed] == ["unindexed"]


async def test_cleanup_repairing_an_index_never_undoes_a_later_status_change(
    prefixed: tuple[RedisTarget, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cleanup loop reads a run (active) to repair its index entries from a dead client's
    intent; before it writes them, a live pause completes. The repair must not move the run
    back to active in the index: the approval queue would lose it for good."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix, cluster=True)
    clock = Clock()
    manager = _manager(store, clock)
    applied = store._apply_index_ops
    key = key_of(make_run("raced"))

    async def pause_before_the_repair_lands(client: Any, ops: Any) -> None:
        if any(_text(op).startswith(f"{key}.dead") for op in ops) and "sync" in map(_text, ops):
            monkeypatch.undo()
            await manager.pause("raced", request={"question": "ok?"})
        await applied(client, ops)

    with anyio.fail_after(_DEADLINE):
        await manager.create("raced", {"n": 0})
        # A client that died after recording its intent for this run.
        await applied(store._client, ["intend", f"{key}.deadbeefdeadbeef", _float(T0), ""])
        monkeypatch.setattr(store, "_apply_index_ops", pause_before_the_repair_lands)
        clock.now = T0 + 1
        await manager.cleanup_expired()
        queue = await manager.list_runs(CheckpointStatus.PAUSED)
        active = await manager.count_runs(CheckpointStatus.ACTIVE)
        await store.aclose()
    assert [run.run_id for run in queue] == ["raced"]
    assert active == 0


async def test_index_calls_of_two_status_changes_landing_out_of_order_keep_the_newest(
    prefixed: tuple[RedisTarget, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pause's index call is delayed until after the approval that followed it completed:
    the index must still say what the run record says (active), not the late pause."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix, cluster=True)
    manager = _manager(store)
    applied = store._apply_index_ops

    async def approve_before_the_pause_lands(client: Any, ops: Any) -> None:
        if "paused" in [_text(op) for op in ops]:
            monkeypatch.undo()
            await manager.approve("late", approver="ops")
        await applied(client, ops)

    with anyio.fail_after(_DEADLINE):
        await manager.create("late", {"n": 0})
        monkeypatch.setattr(store, "_apply_index_ops", approve_before_the_pause_lands)
        await manager.pause("late", request={"question": "ok?"})
        info = await manager.get_run("late")
        queue = await manager.list_runs(CheckpointStatus.PAUSED)
        counted = (await manager.count_runs(CheckpointStatus.ACTIVE),
                   await manager.count_runs(CheckpointStatus.PAUSED))
        await store.aclose()
    assert info is not None
    assert info.status == CheckpointStatus.ACTIVE
    assert list(queue) == []
    assert counted == (1, 0)


def _float(value: float) -> str:
    return repr(float(value))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def test_at_maxmemory_a_refused_create_leaves_no_intent_on_the_cluster_code_path(
    private_redis: PrivateRedis, full_redis: aioredis.Redis
) -> None:
    """On Redis Cluster a run's first create records an intent in the index slot before its
    script; at maxmemory that record must be refused too ("nothing was written")."""
    client = aioredis.Redis.from_url(private_redis.url,
                                     retry=redis_retry(RetryPolicy(max_retries=0)))
    store = RedisStore(client, prefix="oom", cluster=True, owns_client=True)
    manager = _manager(store)
    with anyio.fail_after(_DEADLINE):
        await manager.create("first", {"n": 0})  # loads the scripts, creates the index keys
        await full_redis.config_set("maxmemory", 1)
        with pytest.raises(StoreError, match="maxmemory"):
            await manager.create("second", {"n": 0})
        intents = await full_redis.zcard("oom:{idx:oom}:fix")
        await store.aclose()
    assert intents == 0


async def test_a_failed_index_call_of_the_cleanup_loop_is_made_good_by_its_next_pass(
    prefixed: tuple[RedisTarget, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A purge moved a run's next expiry in the run's slot, then its index call failed: the
    next pass must move the due index too, or the run stays due for good and every cleanup
    pass spins on it without ever finishing."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix, cluster=True)
    run = make_run("spinning")
    applied = store._apply_index_ops

    async def index_call_fails(client: Any, ops: Any) -> None:
        raise StoreUnavailableError("the index slot's node is unreachable")

    with anyio.fail_after(_DEADLINE):
        await append(store, run, 0, expires_at=T0 + 10)
        await append(store, run, 1, expires_at=T0 + 100)
        monkeypatch.setattr(store, "_apply_index_ops", index_call_fails)
        with pytest.raises(StoreUnavailableError):
            await store.purge_expired(now=T0 + 10, limit=10)
        monkeypatch.setattr(store, "_apply_index_ops", applied)
        passes = [await store.purge_expired(now=T0 + 10, limit=10) for _ in range(2)]
        due = await store._client.zrange(f"{prefix}:{{idx:{prefix}}}:due", 0, -1,
                                          withscores=True)
        await store.aclose()
    assert passes[-1] == (0, True)
    assert [score for _, score in due] == [T0 + 100]


@pytest.mark.parametrize("cluster_path", [False, True], ids=["plain", "cluster-code-path"])
async def test_a_retried_status_change_is_recognised_after_a_later_one(
    prefixed: tuple[RedisTarget, str], monkeypatch: pytest.MonkeyPatch, cluster_path: bool
) -> None:
    """A pause is applied and its reply lost; an approval lands before redis-py's retry (same
    arguments, same token) arrives. The retry must report the pause as done, not as a
    conflict: the manager would re-read the approved run and pause it again."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix, cluster=cluster_path)
    run = make_run("retried")
    key = key_of(run)

    def pause() -> Any:
        return store.update_run(key, incarnation=run.incarnation, version=0, status="paused",
                                data=b"pause", now=T0)

    with anyio.fail_after(_DEADLINE):
        await append(store, run, 0)
        monkeypatch.setattr(redis_store, "_token", lambda: "0123456789abcdef")
        await pause()
        monkeypatch.undo()
        await store.update_run(key, incarnation=run.incarnation, version=1, status="active",
                               data=b"approve", now=T0)
        monkeypatch.setattr(redis_store, "_token", lambda: "0123456789abcdef")
        retried = await pause()
        monkeypatch.undo()
        listed, _ = await store.list_runs(status="active", limit=10, cursor=None, now=T0)
        await store.aclose()
    assert (retried.status, retried.version, retried.data) == ("active", 2, b"approve")
    assert [record.run_id for record in listed] == ["retried"]


@pytest.mark.parametrize("field", ["st", "rid"])
async def test_a_run_record_field_that_is_not_text_is_damage_the_repair_can_fix(
    prefixed: tuple[RedisTarget, str], field: str
) -> None:
    """Bytes that are not UTF-8 in the record's status or run id: reads still return the
    checkpoints, writes are refused naming the record, and the repair rebuilds it (never a
    bare UnicodeDecodeError, never a record that is unreadable yet "not damaged")."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix)
    manager = _manager(store)
    run_hash = _key(prefix, "not-text", "run")
    with anyio.fail_after(_DEADLINE):
        await manager.create("not-text", {"n": 0})
        await store._client.hset(run_hash, field, b"\xff\xfe")
        restored = await manager.restore("not-text")
        with pytest.raises(CorruptCheckpointError) as refused:
            await manager.create("not-text", {"n": 1})
        reports = await manager.repair("not-text")
        later = await manager.create("not-text", {"n": 1})
        await store.aclose()
    assert restored is not None
    assert restored.state == {"n": 0}
    assert refused.value.key == run_hash
    assert [report.repaired for report in reports] == [True]
    assert later is not None
    assert later.metadata.sequence == 1


# -- a cancellation the driver drops --------------------------------------------------------


class _DroppingCancellation:
    """A run script whose call drops a cancellation of its caller that comes as it ends, as
    redis-py's ``asyncio.wait_for`` around a command's send does before Python 3.12."""

    def __init__(self, script: Any, cancel: Callable[[], Any] | None = None) -> None:
        self.script = script
        self.sha = script.sha
        self.cancel = cancel

    async def __call__(self, **kwargs: Any) -> Any:
        reply = await self.script(**kwargs)
        current = asyncio.current_task()
        assert current is not None
        # The caller is cancelled just as the reply comes: by asyncio, or by a scope.
        (self.cancel or current.cancel)()
        with contextlib.suppress(asyncio.CancelledError):  # the driver drops it
            for _ in range(3):
                await asyncio.sleep(0)
        return reply


async def test_a_cancellation_the_driver_drops_is_raised_after_the_call(
    prefixed: tuple[RedisTarget, str],
) -> None:
    """A store call whose driver dropped the cancellation of its task raises it once the
    call has returned (the write has landed), rather than returning as if never cancelled:
    an ``asyncio.timeout`` or task group around it would wait for it for good."""
    target, prefix = prefixed
    store = make_store(target, prefix)
    run_key = key_of(make_run("dropped"))
    store._scripts["put_items"] = _DroppingCancellation(store._scripts["put_items"])
    with anyio.fail_after(_DEADLINE):
        call = asyncio.ensure_future(store.put_items(run_key, [make_item("k", b"v")], now=T0))
        with pytest.raises(asyncio.CancelledError):
            await call
        found = await store.get_items(run_key, ["k"], now=T0)
        await store.aclose()
    assert call.cancelled()
    assert found == {"k": b"v"}


async def test_a_cancellation_of_an_anyio_scope_the_driver_drops_ends_the_scope(
    prefixed: tuple[RedisTarget, str],
) -> None:
    """The same, the cancellation an anyio scope's (``move_on_after`` whose deadline fires):
    it reaches the scope as anyio's own, so the scope ends there and its caller goes on."""
    target, prefix = prefixed
    store = make_store(target, prefix)
    run_key = key_of(make_run("dropped-scope"))
    scope = anyio.CancelScope()
    store._scripts["put_items"] = _DroppingCancellation(store._scripts["put_items"],
                                                        scope.cancel)
    with anyio.fail_after(_DEADLINE):
        with scope:
            await store.put_items(run_key, [make_item("k", b"v")], now=T0)
        found = await store.get_items(run_key, ["k"], now=T0)
        await store.aclose()
    assert scope.cancelled_caught
    assert found == {"k": b"v"}
