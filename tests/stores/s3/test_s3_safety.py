"""S3 store data safety against moto: other processes deleting or starting over a run this
process knows, lost replies, half-made first creates, damaged and foreign records, and errors
of concurrent requests."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import secrets
import sys
import threading
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import anyio
import pytest

from fastcheckpoint import CheckpointManager, CheckpointStatus, _ids
from fastcheckpoint._config import RetryPolicy
from fastcheckpoint.errors import (
    CheckpointError,
    ConflictError,
    CorruptCheckpointError,
    SequenceConflict,
    StoreError,
    StoreUnavailableError,
)
from fastcheckpoint.stores import RunRecord, _s3_io, s3
from fastcheckpoint.stores import _s3_layout as layout
from fastcheckpoint.stores._aws import RequestCounter
from fastcheckpoint.stores.s3 import S3Store
from fastcheckpoint.testing import (
    T0,
    checkpoint_id_of,
    key_of,
    make_checkpoint,
    make_item,
    make_run,
)
from fastcheckpoint.testing._adapter import _append_items
from tests.stores._moto import REGION, moto_endpoint
from tests.stores.s3.test_s3 import (
    DEADLINE,
    _FaultyProxy,
    _manager,
    damage_run_object,
    faulty_proxy,
    s3_bucket,
    s3_store,
)

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["faulty_proxy", "moto_endpoint", "s3_bucket", "s3_store"]

pytestmark = pytest.mark.anyio

FAST_RETRIES = RetryPolicy(base_delay=0.001, max_delay=0.002, max_retries=3)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


@pytest.fixture
async def other_store(s3_store: S3Store) -> AsyncIterator[S3Store]:
    """A second store on the same bucket and prefix: another process's view of the runs."""
    other = S3Store(s3_store.bucket, s3_store.prefix, client=await s3_store.client())
    yield other
    await other.aclose()


async def _keys(store: S3Store) -> list[str]:
    client = await store.client()
    found = await client.list_objects_v2(Bucket=store.bucket, Prefix=store.prefix)
    return [entry["Key"][len(store.prefix):] for entry in found.get("Contents", [])]


async def _get(store: S3Store, key: str) -> bytes:
    client = await store.client()
    found = await client.get_object(Bucket=store.bucket, Key=store.prefix + key)
    async with found["Body"] as body:
        return await body.read()


async def _put(store: S3Store, key: str, body: bytes) -> None:
    client = await store.client()
    await client.put_object(Bucket=store.bucket, Key=store.prefix + key, Body=body)


# -- another process deletes or starts over a run this process knows -----------------------------


async def test_a_run_deleted_by_another_process_refuses_a_stale_append(
    s3_store: S3Store, other_store: S3Store
) -> None:
    """This process's knowledge says the run is live; the append must not be acknowledged
    into the deleted run: it starts the run over instead, and everyone can restore it."""
    with anyio.fail_after(DEADLINE):
        writer, deleter = _manager(s3_store), _manager(other_store)
        for n in range(3):
            await writer.create("deleted", {"n": n})
        assert await deleter.delete_run("deleted") == 3
        assert await writer.restore("deleted") is None
        created = await writer.create("deleted", {"n": "after"})
        assert created is not None
        by_writer = await writer.restore_from(created.checkpoint_id)
        by_deleter = await deleter.restore("deleted")

    assert created.metadata.sequence == 0
    assert by_writer is not None
    assert by_deleter is not None
    assert by_writer.state == by_deleter.state == {"n": "after"}


async def test_a_run_started_over_by_another_process_takes_the_stale_append(
    s3_store: S3Store, other_store: S3Store
) -> None:
    """Another process deletes the run and starts it over. The stale append is taken back
    (never acknowledged into the dead run) and continues the new run; the stale knowledge
    never prunes the new run's checkpoints."""
    with anyio.fail_after(DEADLINE):
        stale = _manager(s3_store, max_checkpoints_per_run=3)
        restarter = _manager(other_store, max_checkpoints_per_run=3)
        for n in range(3):
            await stale.create("restarted", {"n": n})
        await restarter.delete_run("restarted")
        first = await restarter.create("restarted", {"by": "restarter", "n": 0})
        second = await restarter.create("restarted", {"by": "restarter", "n": 1})
        client = await s3_store.client()
        with RequestCounter.attached(client) as taken_back:
            created = await stale.create("restarted", {"by": "stale"})
        assert first is not None
        assert second is not None
        assert created is not None
        found = [await restarter.restore_from(ckpt.checkpoint_id)
                 for ckpt in (first, second, created)]
        latest = await stale.restore("restarted")
        listed = await restarter.list_checkpoints("restarted")

    assert created.metadata.sequence == 2
    assert _ids.parse_checkpoint_id(created.checkpoint_id) is not None
    assert created.checkpoint_id.split("-")[2] == first.checkpoint_id.split("-")[2]
    assert [ckpt is not None and ckpt.state for ckpt in found] == [
        {"by": "restarter", "n": 0}, {"by": "restarter", "n": 1}, {"by": "stale"}]
    assert latest is not None
    assert latest.checkpoint_id == created.checkpoint_id
    assert [item.sequence for item in listed] == [2, 1, 0]
    # The stale attempt: slot PUT and the run object read at once (it changed), the slot
    # taken back, one LIST of the head; the retry: slot, 304 check, marker, 304 check.
    assert taken_back.counts == {
        "PutObject": 1 + 2, "GetObject": 1 + 2, "DeleteObject": 1, "ListObjectsV2": 1
    }


async def test_two_writers_and_a_deleter_lose_no_acknowledged_checkpoint(
    s3_store: S3Store,
) -> None:
    """Two processes (stores) append to one run while a third deletes it again and again.
    A create acknowledged while no ``delete_run`` overlapped it and its read-back must be
    restorable by the other processes, unless the other writer's retention pruned it
    meanwhile (three newer checkpoints)."""
    stores = [S3Store(s3_store.bucket, s3_store.prefix, client=await s3_store.client())
              for _ in range(3)]
    writers = [_manager(store, max_checkpoints_per_run=3) for store in stores[:2]]
    deleter, reader = _manager(stores[2]), _manager(s3_store)
    deletes = [0]
    lost: list[str] = []
    acknowledged = [0]

    async def write(manager: CheckpointManager, name: str) -> None:
        for n in range(15):
            started = deletes[0]
            created = await manager.create("raced", {"by": name, "n": n})
            assert created is not None
            acknowledged[0] += 1
            found = await reader.restore_from(created.checkpoint_id)
            if found is not None or started % 2 or deletes[0] != started:
                continue  # found, or a delete was under way at some point (odd: running)
            latest = await reader.restore("raced")
            pruned = latest is not None and latest.sequence >= created.sequence + 3
            if not pruned and deletes[0] == started:
                lost.append(created.checkpoint_id)

    async def delete(done: anyio.Event) -> None:
        while not done.is_set():
            await anyio.sleep(0.03)  # let the writers interleave; not waiting for expiry
            deletes[0] += 1
            await deleter.delete_run("raced")
            deletes[0] += 1

    with anyio.fail_after(120):
        done = anyio.Event()
        async with anyio.create_task_group() as group:
            group.start_soon(delete, done)
            async with anyio.create_task_group() as writing:
                for index, manager in enumerate(writers):
                    writing.start_soon(write, manager, f"w{index}")
            done.set()

    assert acknowledged[0] == 30
    assert deletes[0] >= 4  # the deleter did run between the writers' creates
    assert lost == []


async def test_pruning_writers_racing_on_the_floor_hand_out_each_sequence_once(
    s3_store: S3Store,
) -> None:
    """Three processes append to one run with ``max_checkpoints_per_run=2``: they raise the
    floor against each other and take back appends below it. Every acknowledged sequence is
    unique, none is skipped, and the next create leaves two checkpoints."""
    stores = [S3Store(s3_store.bucket, s3_store.prefix, client=await s3_store.client())
              for _ in range(3)]
    acknowledged: list[int] = []

    async def write(store: S3Store) -> None:
        manager = _manager(store, max_checkpoints_per_run=2, max_sequence_retries=50)
        for n in range(6):
            created = await manager.create("floored", {"n": n})
            assert created is not None
            acknowledged.append(created.metadata.sequence)

    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as group:
            for store in stores:
                group.start_soon(write, store)
        last = await _manager(stores[0], max_checkpoints_per_run=2).create("floored", {})
        listed = await _manager(s3_store).list_checkpoints("floored")

    assert sorted(acknowledged) == list(range(18))
    assert last is not None
    assert [item.sequence for item in listed] == [18, 17]


async def test_a_late_seal_never_replaces_a_checkpoint_of_a_newer_life(
    s3_store: S3Store, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cleanup loop found the run dead; before its seal landed another process started
    the run over and a third, its clock a minute behind, appended twice (the second over the
    dead life's seal). The seal takes no acknowledged checkpoint's place: the run object
    changed, so what is there is a newer life's, and the run is left alone."""
    now = [T0]
    stores = [S3Store(s3_store.bucket, s3_store.prefix, client=await s3_store.client())
              for _ in range(4)]
    old, new, cleaner = (_manager(store, clock=lambda: now[0], max_checkpoints_per_run=None)
                         for store in stores[:3])
    behind = _manager(stores[3], clock=lambda: now[0] - 60, max_checkpoints_per_run=None)
    acknowledged: list[Any] = []
    seal = stores[2]._seal

    async def late_seal(*args: Any) -> bool:
        acknowledged.append(await new.create("reborn", {"life": 2, "n": 0}))
        for n in (1, 2):
            acknowledged.append(await behind.create("reborn", {"life": 2, "n": n}))
        return await seal(*args)

    with anyio.fail_after(DEADLINE):
        await old.create("reborn", {"life": 1}, ttl_seconds=1)
        now[0] += 2  # life 1 ended
        monkeypatch.setattr(stores[2], "_seal", late_seal)
        await cleaner.cleanup_expired()
        monkeypatch.undo()
        fresh = _manager(s3_store, clock=lambda: now[0])
        found = [await fresh.restore_from(made.checkpoint_id) for made in acknowledged]
        latest = await fresh.restore("reborn")

    assert [made.metadata.sequence for made in acknowledged] == [0, 1, 2]
    assert [None if got is None else got.state for got in found] == [
        {"life": 2, "n": n} for n in range(3)]
    assert latest is not None
    assert latest.metadata.sequence == 2


async def test_a_run_whose_new_life_began_in_a_process_that_died_is_sealed_and_purged(
    s3_store: S3Store, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A process took a dead run for a new life and died before it removed the earlier
    life's checkpoints; another went on with the new life, which ended too. What the earlier
    life left at the seal's key is replaced: the run is purged and starts over."""
    now = [T0]

    def manager() -> CheckpointManager:
        store = S3Store(s3_store.bucket, s3_store.prefix, client=s3_client)
        return _manager(store, clock=lambda: now[0], max_checkpoints_per_run=None)

    async def died(*_: Any) -> None:
        raise StoreError("killed before it removed the earlier life's checkpoints")

    s3_client = await s3_store.client()
    with anyio.fail_after(DEADLINE):
        for n in range(4):
            await manager().create("relived", {"life": "A", "n": n}, ttl_seconds=5)
        now[0] += 10
        monkeypatch.setattr(s3, "_delete_leftovers", died)
        with pytest.raises(StoreError):
            await manager().create("relived", {"life": "B"}, ttl_seconds=5)
        monkeypatch.undo()
        joined = manager()
        for n in range(2):
            await joined.create("relived", {"life": "B", "n": n}, ttl_seconds=5)
        now[0] += 10  # life B ended too, at sequence 1: life A's 2 and 3 are still there
        removed = await manager().cleanup_expired()
        again = await manager().create("relived", {"life": "C"})

    assert removed == 2
    assert again is not None
    assert again.metadata.sequence == 0


async def test_a_seal_over_an_earlier_lifes_seal_leaves_one_marker(s3_store: S3Store) -> None:
    """A run that ended twice with no cleanup between: the second seal replaces the first
    at the same key, and its marker goes with it (two markers of one slot made a listing
    take the key for the earlier life's, and a stalled writer append over the seal)."""
    now = [T0]
    manager = _manager(s3_store, clock=lambda: now[0], max_checkpoints_per_run=None)
    key = _ids.run_key("twice")
    with anyio.fail_after(DEADLINE):
        await manager.create("twice", {"life": 1}, ttl_seconds=1)
        now[0] += 2
        await manager.create("twice", {"life": 2}, ttl_seconds=1)  # seals life 1 at 1
        now[0] += 2
        await manager.create("twice", {"life": 3})  # seals life 2 at 1, over life 1's
        keys = await _keys(s3_store)

    markers = [found for found in keys
               if found.startswith(layout.slot_key(key, 1) + "/")]
    assert len(markers) == 1


async def test_a_cleanup_removing_what_a_create_prunes_meanwhile_fails_nothing(
    s3_store: S3Store, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A create's prune of expired checkpoints awaits (the floor, the deletes) after it chose
    them; the cleanup loop of the same process removed the same ones meanwhile. The create
    is acknowledged once (it raised KeyError after its commit, and a retry wrote it twice)."""
    now = [T0]
    manager = _manager(s3_store, clock=lambda: now[0], max_checkpoints_per_run=None)
    pruning, resume = anyio.Event(), anyio.Event()
    raise_floor = s3_store._raise_floor

    async def slow_raise_floor(*args: Any, **kwargs: Any) -> bool:
        raised = await raise_floor(*args, **kwargs)
        pruning.set()
        await resume.wait()
        return raised

    created: list[Any] = []

    async def create() -> None:
        created.append(await manager.create("pruned", {"n": 2}, ttl_seconds=30))

    with anyio.fail_after(DEADLINE):
        await manager.create("pruned", {"n": 0}, ttl_seconds=1)
        now[0] += 0.5
        await manager.create("pruned", {"n": 1}, ttl_seconds=30)
        now[0] += 2  # the first one expired
        monkeypatch.setattr(s3_store, "_raise_floor", slow_raise_floor)
        async with anyio.create_task_group() as group:
            group.start_soon(create)
            await pruning.wait()
            assert await manager.cleanup_expired() == 1
            resume.set()
        monkeypatch.undo()
        listed = await manager.list_checkpoints("pruned")
        after = await manager.create("pruned", {"n": 3})

    [made] = created
    assert made is not None
    assert made.metadata.sequence == 2
    assert [item.sequence for item in listed] == [2, 1]
    assert after is not None
    assert after.metadata.sequence == 3


async def test_a_status_change_by_another_process_is_reported_by_the_next_create(
    s3_store: S3Store, other_store: S3Store
) -> None:
    with anyio.fail_after(DEADLINE):
        writer, approver = _manager(s3_store), _manager(other_store)
        await writer.create("paused", {"n": 0})
        await approver.pause("paused", request={"why": "check"})
        created = await writer.create("paused", {"n": 1})

    assert created is not None
    assert created.metadata.status == CheckpointStatus.PAUSED


# -- lost replies ----------------------------------------------------------------------------------


@pytest.fixture
async def proxied(faulty_proxy: type[_FaultyProxy], s3_bucket: str) -> AsyncIterator[S3Store]:
    store = S3Store(s3_bucket, f"lost-{secrets.token_hex(4)}", region=REGION,
                    endpoint_url=faulty_proxy.address,  # type: ignore[attr-defined]
                    retry=FAST_RETRIES)
    yield store
    with anyio.fail_after(10):
        await store.aclose()


_SLOT_PUT = re.compile(r"^PUT \S*/runs/[a-z2-7]+/c/\d{19}(\?|$)")
_RUN_OBJECT_PUT = re.compile(r"^PUT \S*/runs/[a-z2-7]+/a(\?|$)")


async def test_a_lost_reply_on_the_commit_creates_one_checkpoint(
    faulty_proxy: type[_FaultyProxy], proxied: S3Store
) -> None:
    """The slot PUT is applied but its reply is lost; the retry gets 412 on our own slot,
    which its write token identifies: one checkpoint, at the sequence first proposed."""
    with anyio.fail_after(DEADLINE):
        manager = _manager(proxied)
        await manager.create("lost", {"n": 0})
        faulty_proxy.drop_reply_to = _SLOT_PUT
        created = await manager.create("lost", {"n": 1})
        following = await manager.create("lost", {"n": 2})
        listed = await manager.list_checkpoints("lost")
        keys = await _keys(proxied)

    assert faulty_proxy.dropped == 1
    assert created is not None
    assert following is not None
    assert (created.metadata.sequence, following.metadata.sequence) == (1, 2)
    assert [item.sequence for item in listed] == [2, 1, 0]
    assert sum(1 for key in keys if re.fullmatch(r"runs/[a-z2-7]+/c/\d{19}", key)) == 3


async def test_a_lost_reply_on_a_first_create_takes_the_run(
    faulty_proxy: type[_FaultyProxy], proxied: S3Store
) -> None:
    """The run object's create-only PUT is applied, its reply lost, the retry gets 412: the
    run object is ours, and the create goes on."""
    with anyio.fail_after(DEADLINE):
        manager = _manager(proxied, max_sequence_retries=2)
        faulty_proxy.drop_reply_to = _RUN_OBJECT_PUT
        created = await manager.create("first-lost", {"n": 0})
        restored = await manager.restore("first-lost")

    assert faulty_proxy.dropped == 1
    assert created is not None
    assert created.metadata.sequence == 0
    assert restored is not None
    assert restored.checkpoint_id == created.checkpoint_id


async def test_a_lost_reply_on_a_status_change_reports_the_change(
    faulty_proxy: type[_FaultyProxy], proxied: S3Store
) -> None:
    with anyio.fail_after(DEADLINE):
        manager = _manager(proxied)
        await manager.create("completed", {"n": 0})
        faulty_proxy.drop_reply_to = _RUN_OBJECT_PUT
        info = await manager.mark_completed("completed")

    assert faulty_proxy.dropped == 1
    assert info is not None
    assert info.status == CheckpointStatus.COMPLETED


async def test_a_create_whose_check_fails_leaves_no_checkpoint(
    faulty_proxy: type[_FaultyProxy], proxied: S3Store
) -> None:
    """The slot was written but the run object could not be read to confirm it: the create
    fails and takes its slot back, so the failed create leaves the run as it was."""
    with anyio.fail_after(DEADLINE):
        manager = _manager(proxied)
        await manager.create("unchecked", {"n": 0})
        faulty_proxy.slow_down = re.compile(r"^GET \S*/runs/[a-z2-7]+/a(\?|$)")
        with pytest.raises(StoreUnavailableError, match="throttling"):
            await manager.create("unchecked", {"n": 1})
        faulty_proxy.slow_down = None
        keys = await _keys(proxied)
        following = await manager.create("unchecked", {"n": 2})

    assert sum(1 for key in keys if re.fullmatch(r"runs/[a-z2-7]+/c/\d{19}", key)) == 1
    assert following is not None
    assert following.metadata.sequence == 1


_ITEM_PUT = re.compile(r"^PUT \S*/items/[a-z2-7]+/[0-9a-f]+(\?|$)")


async def test_a_create_stopped_before_its_log_part_landed_leaves_no_checkpoint(
    faulty_proxy: type[_FaultyProxy], proxied: S3Store, direct: S3Store
) -> None:
    """A create whose ``messages`` log part has not landed when its writer stops (killed, or
    cancelled by asyncio) has not committed: the run reads as it was, never as a newest
    checkpoint naming a part that is not there."""
    with anyio.fail_after(DEADLINE):
        manager = _manager(proxied, history_min_entries=2)
        messages = [{"role": "user", "content": f"m{number}"} for number in range(3)]
        await manager.create("stopped", {"n": 0}, messages=messages)
        gate = faulty_proxy.hold(_ITEM_PUT)
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as group:
                group.start_soon(functools.partial(
                    manager.create, "stopped", {"n": 1},
                    messages=[*messages, {"role": "assistant", "content": "m3"}]))
                await gate.reached()
                await anyio.sleep(0.3)  # what was sent alongside the part has landed
                # Another process now (the writer is as good as dead: its part never lands).
                fresh = await _manager(direct).restore("stopped")
                scope.cancel()
        gate.release.set()
        assert fresh is not None
        assert fresh.state == {"n": 0}
        assert fresh.messages == messages
        assert fresh.metadata.sequence == 0
        following = await manager.create(
            "stopped", {"n": 2}, messages=[*messages, {"role": "user", "content": "m4"}])
        assert following.metadata.sequence == 1
        again = await _manager(direct).restore("stopped")
        assert again is not None
        assert again.state == {"n": 2}


async def test_a_failed_create_keeps_its_slot_once_another_writer_appended_after_it(
    faulty_proxy: type[_FaultyProxy], proxied: S3Store, direct: S3Store
) -> None:
    """The slot is written but the check cannot be read; meanwhile another process appended
    after that slot. Taking it back would leave a gap below that checkpoint: it stays."""
    run_object_get = re.compile(r"^GET \S*/runs/[a-z2-7]+/a(\?|$)")
    writer = _manager(proxied)
    with anyio.fail_after(DEADLINE):
        await writer.create("built-on", {"n": 0})
        gate = faulty_proxy.hold(run_object_get)
        written = faulty_proxy.watch(re.compile(r"^PUT \S*/runs/[a-z2-7]+/c/\d{19} 200$"))
        async with anyio.create_task_group() as group:

            async def create_unchecked() -> None:
                with pytest.raises(StoreUnavailableError):
                    await writer.create("built-on", {"n": 1})

            group.start_soon(create_unchecked)
            await gate.reached()  # the check is held...
            await _answered(written)  # ...and the slot written
            other = await _manager(direct).create("built-on", {"n": 2})
            faulty_proxy.slow_down = run_object_get
            gate.release.set()
        faulty_proxy.slow_down = None
        listed = await _manager(direct).list_checkpoints("built-on")

    assert other is not None
    assert other.metadata.sequence == 2
    assert [item.sequence for item in listed] == [2, 1, 0]


async def test_a_lost_reply_on_a_delete_reports_the_delete(
    faulty_proxy: type[_FaultyProxy], proxied: S3Store
) -> None:
    """The tombstone that decides a delete is applied, its reply lost, the retry gets 412:
    its write token shows the delete was ours, so ``delete`` is True."""
    with anyio.fail_after(DEADLINE):
        manager = _manager(proxied)
        created = [await manager.create("deleted", {"n": n}) for n in range(3)]
        results = []
        for ckpt in (created[1], created[2]):  # an older one, then the newest
            assert ckpt is not None
            faulty_proxy.drop_reply_to = _SLOT_PUT
            results.append(await manager.delete(ckpt.checkpoint_id))
        listed = await manager.list_checkpoints("deleted")
        again = await manager.delete(created[2].checkpoint_id)  # type: ignore[union-attr]

    assert results == [True, True]
    assert faulty_proxy.dropped == 2
    assert [item.sequence for item in listed] == [0]
    assert again is False


@pytest.fixture
async def direct(faulty_proxy: type[_FaultyProxy], proxied: S3Store) -> AsyncIterator[S3Store]:
    """Another process on the run ``proxied`` writes, talking to moto without the proxy."""
    store = S3Store(proxied.bucket, proxied.prefix, region=REGION,
                    endpoint_url=faulty_proxy.upstream)
    yield store
    with anyio.fail_after(10):
        await store.aclose()


async def _slot_count(store: S3Store) -> int:
    return sum(1 for key in await _keys(store) if re.fullmatch(r"runs/[a-z2-7]+/c/\d{19}", key))


async def test_a_lost_reply_is_recognised_however_many_writers_appended_since(
    faulty_proxy: type[_FaultyProxy], proxied: S3Store, direct: S3Store
) -> None:
    """The slot PUT is applied and its reply lost; before botocore's retry gets its 412,
    another process appends three checkpoints on top. The retry must still find its own
    slot (below the newest few a listing of the head shows): one checkpoint, never two."""
    slow = _manager(proxied, max_checkpoints_per_run=None)
    fast = _manager(direct, max_checkpoints_per_run=None)
    created: list[Any] = []

    async def create_slowly() -> None:
        created.append(await slow.create("busy", {"by": "slow"}))

    with anyio.fail_after(DEADLINE):
        await slow.create("busy", {"n": 0})
        gate = faulty_proxy.hold(_SLOT_PUT, applied=True)
        async with anyio.create_task_group() as group:
            group.start_soon(create_slowly)
            await gate.reached()
            for n in range(3):
                await fast.create("busy", {"by": "fast", "n": n})
            gate.release.set()
        listed = await fast.list_checkpoints("busy")
        slots = await _slot_count(direct)

    assert faulty_proxy.dropped == 1
    assert created[0].metadata.sequence == 1
    assert [item.sequence for item in listed] == [4, 3, 2, 1, 0]
    assert slots == 5


async def test_a_lost_reply_on_replacing_a_leftover_slot_creates_one_checkpoint(
    faulty_proxy: type[_FaultyProxy], proxied: S3Store
) -> None:
    """The next sequence holds a slot of an ended incarnation; the append replaces it
    (``IfMatch``), that reply is lost and the retry gets 412: the slot is ours."""
    manager = _manager(proxied)
    with anyio.fail_after(DEADLINE):
        first = await manager.create("leftover", {"n": 0})
        assert first is not None
        key = _ids.key_of("leftover")
        ended = _ids.new_incarnation()
        leftover = layout.Slot(ended, 1, _ids.checkpoint_id(key, ended, 1), T0, None, T0,
                               b"", b"", token=b"old", run_key=key)
        await _put(proxied, layout.slot_key(key, 1), layout.encode(leftover))
        faulty_proxy.hold(_SLOT_PUT, applied=True, skip=1).release.set()
        created = await manager.create("leftover", {"n": 1})
        listed = await manager.list_checkpoints("leftover")

    assert faulty_proxy.dropped == 1
    assert created is not None
    assert created.metadata.sequence == 1
    assert [item.sequence for item in listed] == [1, 0]


async def test_a_commit_whose_outcome_is_unknown_leaves_no_checkpoint(
    faulty_proxy: type[_FaultyProxy], proxied: S3Store
) -> None:
    """The slot PUT is applied, its reply lost, and every retry is refused (throttled): the
    create fails, so it must not leave a checkpoint that a retrying caller would duplicate."""
    manager = _manager(proxied)
    with anyio.fail_after(DEADLINE):
        await manager.create("unknown", {"n": 0})
        faulty_proxy.drop_reply_to = _SLOT_PUT
        faulty_proxy.slow_down = _SLOT_PUT
        with pytest.raises(StoreUnavailableError):
            await manager.create("unknown", {"n": 1})
        faulty_proxy.slow_down = None
        slots = await _slot_count(proxied)
        retried = await manager.create("unknown", {"n": 1})
        listed = await manager.list_checkpoints("unknown")

    assert faulty_proxy.dropped == 1
    assert slots == 1
    assert retried is not None
    assert retried.metadata.sequence == 1
    assert [item.sequence for item in listed] == [1, 0]


_OLDER_LIST = re.compile(r"^GET \S*[?&]start-after=")


async def test_a_committed_create_is_acknowledged_when_pruning_fails(
    faulty_proxy: type[_FaultyProxy], proxied: S3Store, direct: S3Store
) -> None:
    """Pruning comes after the commit: when it fails (here the listing of what lies below
    the process's knowledge), the create is still acknowledged, never reported failed
    while its checkpoint stays (a retrying caller would write it twice)."""
    with anyio.fail_after(DEADLINE):
        writer = _manager(direct, max_checkpoints_per_run=None)
        for n in range(8):
            await writer.create("pruned", {"n": n})
        joiner = _manager(proxied, max_checkpoints_per_run=2)
        faulty_proxy.slow_down = _OLDER_LIST
        created = await joiner.create("pruned", {"n": 8})
        faulty_proxy.slow_down = None
        following = await joiner.create("pruned", {"n": 9})
        listed = await joiner.list_checkpoints("pruned")

    assert created is not None
    assert created.metadata.sequence == 8
    assert following is not None
    assert [item.sequence for item in listed] == [9, 8]


# -- ids and sequences are never handed out twice --------------------------------------------------


async def test_purging_an_expired_newest_checkpoint_never_frees_its_sequence(
    s3_store: S3Store, other_store: S3Store
) -> None:
    """The newest checkpoint expires before an older one and the cleanup loop removes it:
    another process must not hand its sequence (and so its id) out again."""
    now = [T0]
    with anyio.fail_after(DEADLINE):
        writer = _manager(s3_store, clock=lambda: now[0])
        await writer.create("reused", {"n": 0}, ttl_seconds=1000)
        expired = await writer.create("reused", {"n": 1}, ttl_seconds=10)
        assert expired is not None
        now[0] = T0 + 20
        purged = await writer.cleanup_expired()
        other = _manager(other_store, clock=lambda: now[0])
        created = await other.create("reused", {"n": 2})
        found = await other.restore_from(expired.checkpoint_id)

    assert purged == 1
    assert created is not None
    assert created.metadata.sequence == 2
    assert found is None


async def test_a_writer_behind_another_ones_pruning_never_reuses_a_sequence(
    s3_store: S3Store, other_store: S3Store
) -> None:
    """Process A appends; process B appends past it and prunes what A last saw, so the key
    of A's next proposal is free again. A's create must not take that sequence: its id was
    B's checkpoint's, and the run has moved on."""
    with anyio.fail_after(DEADLINE):
        first = _manager(s3_store, max_checkpoints_per_run=1)
        second = _manager(other_store, max_checkpoints_per_run=1)
        await first.create("shared", {"by": "first", "n": 0})
        pruned = await second.create("shared", {"by": "second", "n": 1})
        await second.create("shared", {"by": "second", "n": 2})
        late = await first.create("shared", {"by": "first", "n": 3})
        by_old_id = await second.restore_from(pruned.checkpoint_id)  # type: ignore[union-attr]
        latest = await second.restore("shared")

    assert late is not None
    assert late.metadata.sequence == 3
    assert by_old_id is None
    assert latest is not None
    assert latest.checkpoint_id == late.checkpoint_id


async def test_a_writer_behind_a_delete_never_reuses_the_deleted_sequence(
    s3_store: S3Store, other_store: S3Store
) -> None:
    """Process B appends two checkpoints past what A knows and deletes the older one: A's
    next proposal is that sequence, and it must not be handed out again."""
    with anyio.fail_after(DEADLINE):
        first = _manager(s3_store)
        second = _manager(other_store)
        await first.create("holed", {"by": "first", "n": 0})
        deleted = await second.create("holed", {"by": "second", "n": 1})
        await second.create("holed", {"by": "second", "n": 2})
        assert deleted is not None
        assert await second.delete(deleted.checkpoint_id)
        late = await first.create("holed", {"by": "first", "n": 3})
        by_old_id = await second.restore_from(deleted.checkpoint_id)
        listed = await second.list_checkpoints("holed")

    assert late is not None
    assert late.metadata.sequence == 3
    assert by_old_id is None
    assert [item.sequence for item in listed] == [3, 2, 0]


async def test_a_writer_behind_the_purge_of_an_expired_checkpoint_never_reuses_it(
    s3_store: S3Store, other_store: S3Store
) -> None:
    """The cleanup loop removes an expired checkpoint below the run's newest: a writer that
    knows the run only up to the one before must not get that sequence back."""
    now = [T0]
    with anyio.fail_after(DEADLINE):
        first = _manager(s3_store, clock=lambda: now[0])
        second = _manager(other_store, clock=lambda: now[0])
        await first.create("purged", {"by": "first", "n": 0})
        expired = await second.create("purged", {"n": 1}, ttl_seconds=10)
        await second.create("purged", {"n": 2})
        now[0] = T0 + 20
        assert await second.cleanup_expired() == 1
        late = await first.create("purged", {"by": "first", "n": 3})
        by_old_id = await second.restore_from(expired.checkpoint_id)  # type: ignore[union-attr]

    assert late is not None
    assert late.metadata.sequence == 3
    assert by_old_id is None


async def test_a_status_change_is_no_conflict_with_a_writer_raising_the_floor(
    faulty_proxy: type[_FaultyProxy], proxied: S3Store, direct: S3Store
) -> None:
    """Pruning raises the run object's floor (a compare-and-set) while a status change is
    on its way: the status change keeps the higher floor and succeeds at once."""
    key = _ids.key_of("busy")
    writer = _manager(direct, max_checkpoints_per_run=1)
    changed: list[RunRecord] = []

    async def complete(record: RunRecord) -> None:
        changed.append(await proxied.update_run(
            key, incarnation=record.incarnation, version=record.version, status="completed",
            data=record.data, now=T0))

    with anyio.fail_after(DEADLINE):
        await writer.create("busy", {"n": 0})
        record = await proxied.get_run(key, now=T0)
        assert record is not None
        gate = faulty_proxy.hold(_RUN_OBJECT_PUT)
        async with anyio.create_task_group() as group:
            group.start_soon(complete, record)
            await gate.reached()
            await writer.create("busy", {"n": 1})  # prunes 0: raises the floor first
            gate.release.set()
        following = await writer.create("busy", {"n": 2})
        state = layout.decode_run((await _get(direct, layout.run_object(key))), "run object")

    assert changed[0].status == "completed"
    assert following is not None
    assert following.metadata.status == CheckpointStatus.COMPLETED
    assert state.floor == 2  # raised by the writer, kept by the status change


async def test_tombstones_of_deleted_checkpoints_are_removed_by_the_cleanup_loop(
    s3_store: S3Store,
) -> None:
    """``delete`` leaves tombstones; in a run without pruning the cleanup loop removes those
    below the newest (raising the floor first), and the run goes on."""
    key = _ids.key_of("tombs")
    with anyio.fail_after(DEADLINE):
        manager = _manager(s3_store, max_checkpoints_per_run=None)
        created = [await manager.create("tombs", {"n": n}) for n in range(4)]
        for ckpt in created[1:3]:
            assert ckpt is not None
            assert await manager.delete(ckpt.checkpoint_id)
        buried = await _slot_count(s3_store)
        purged = await manager.cleanup_expired()
        left = await _slot_count(s3_store)
        following = await _manager(s3_store).create("tombs", {"n": 4})
        listed = await manager.list_checkpoints("tombs")
        state = layout.decode_run(await _get(s3_store, layout.run_object(key)), "run object")

    assert (buried, purged, left) == (4, 0, 2)
    assert state.floor == 4
    assert following is not None
    assert following.metadata.sequence == 4
    assert [item.sequence for item in listed] == [4, 3, 0]


async def _answered(event: threading.Event) -> None:
    """Until the proxy (a thread) sets ``event``."""
    assert await anyio.to_thread.run_sync(event.wait, DEADLINE)


_RUN_OBJECT_GET = re.compile(r"^GET \S*/runs/[a-z2-7]+/a \d+$")


async def test_a_stale_append_racing_the_restart_of_an_emptied_run_is_never_lost(
    faulty_proxy: type[_FaultyProxy], proxied: S3Store, direct: S3Store
) -> None:
    """Another process deletes the run's checkpoints one by one (the run is then dead) while
    this process appends from stale knowledge, and a third process starts the run over from
    a listing taken before that append landed: the append is either refused or restorable."""
    stale = _manager(proxied)
    deleter = _manager(direct)
    restarter = _manager(S3Store(direct.bucket, direct.prefix, client=await direct.client()))
    created: list[Any] = []

    async def append() -> None:
        created.append(await stale.create("emptied", {"by": "stale"}))

    with anyio.fail_after(DEADLINE):
        for n in range(3):
            ckpt = await stale.create("emptied", {"n": n})
            assert ckpt is not None
            assert await deleter.delete(ckpt.checkpoint_id)
        gate = faulty_proxy.hold(_SLOT_PUT)
        checked = faulty_proxy.watch(_RUN_OBJECT_GET)
        async with anyio.create_task_group() as group:
            group.start_soon(append)
            await gate.reached()  # the slot PUT is on its way...
            await _answered(checked)  # ...and the run object checked
            restarted = await restarter.create("emptied", {"by": "restarter"})
            gate.release.set()
        found = await deleter.restore_from(created[0].checkpoint_id)
        listed = await deleter.list_checkpoints("emptied")

    assert restarted is not None
    assert restarted.metadata.sequence == 0
    assert found is not None
    assert found.state == {"by": "stale"}
    assert [item.checkpoint_id for item in listed] == [created[0].checkpoint_id,
                                                       restarted.checkpoint_id]


async def test_a_stale_append_racing_the_purge_of_its_expired_run_is_never_lost(
    faulty_proxy: type[_FaultyProxy], proxied: S3Store, direct: S3Store
) -> None:
    """By the cleanup worker's clock every checkpoint expired; by the writer's, the run is
    live, and it appends. The purge (listed before that append landed) must not remove a
    run that the append just made live again."""
    writer = _manager(proxied, clock=lambda: T0 + 5.0)
    cleaner = _manager(direct, clock=lambda: T0 + 20.0)
    created: list[Any] = []

    async def append() -> None:
        created.append(await writer.create("expiring", {"by": "writer"}, ttl_seconds=100))

    with anyio.fail_after(DEADLINE):
        for n in range(2):
            await _manager(proxied, clock=lambda: T0).create("expiring", {"n": n},
                                                             ttl_seconds=10)
        await writer.create("expiring", {"n": 2}, ttl_seconds=10)  # knows the run now
        gate = faulty_proxy.hold(_SLOT_PUT)
        checked = faulty_proxy.watch(_RUN_OBJECT_GET)
        async with anyio.create_task_group() as group:
            group.start_soon(append)
            await gate.reached()
            await _answered(checked)
            await cleaner.cleanup_expired()
            gate.release.set()
        found = await cleaner.restore_from(created[0].checkpoint_id)

    assert found is not None
    assert found.state == {"by": "writer"}


async def test_leftovers_of_a_run_whose_run_object_is_gone_are_purged(s3_store: S3Store) -> None:
    """A ``delete_run`` that stopped after removing the run object leaves live-looking
    checkpoints of no run: the cleanup loop removes them."""
    with anyio.fail_after(DEADLINE):
        manager = _manager(s3_store)
        for n in range(3):
            await manager.create("half-deleted", {"n": n})
        await manager.create("kept", {"n": 0})
        key = _ids.key_of("half-deleted")
        client = await s3_store.client()
        await client.delete_object(Bucket=s3_store.bucket,
                                   Key=s3_store.prefix + layout.run_object(key))
        purged = await manager.cleanup_expired()
        keys = await _keys(s3_store)

    assert purged == 0  # no live checkpoint expired; leftovers are not counted
    assert not any(key in entry for entry in keys if entry.startswith("runs/"))
    assert any(_ids.key_of("kept") in entry for entry in keys)


# -- a half-made first create --------------------------------------------------------------------


async def _crashed_creation(store: S3Store, run_id: str, *, at: float) -> str:
    """What a creator that died right after taking the run object leaves: the run object,
    no index entry, no checkpoint. Returns its incarnation."""
    incarnation = _ids.new_incarnation()
    state = layout.RunState(run_id, incarnation, "active", at, at, 0, b"")
    await _put(store, layout.run_object(_ids.key_of(run_id)), layout.encode(state))
    return incarnation


async def test_a_crashed_first_create_is_taken_over_at_once(s3_store: S3Store) -> None:
    with anyio.fail_after(DEADLINE):
        incarnation = await _crashed_creation(s3_store, "crashed", at=T0)
        manager = _manager(s3_store, clock=lambda: T0 + 1.0, max_sequence_retries=3)
        created = await manager.create("crashed", {"n": 0})
        following = await manager.create("crashed", {"n": 1})
        runs = await manager.list_runs()
        purged = await manager.cleanup_expired()
        restored = await manager.restore("crashed")

    assert created is not None
    assert following is not None
    assert (created.metadata.sequence, following.metadata.sequence) == (0, 1)
    assert created.checkpoint_id == _ids.checkpoint_id(_ids.key_of("crashed"), incarnation, 0)
    assert [run.run_id for run in runs] == ["crashed"]
    assert purged == 0
    assert restored is not None
    assert restored.checkpoint_id == following.checkpoint_id


async def test_a_crashed_first_create_is_taken_over_by_creates_that_need_a_new_run(
    s3_store: S3Store,
) -> None:
    """A run whose creator died before its first checkpoint does not exist (get_run says
    so): create(expected_sequence=0) and fork into it take it over at sequence 0 like any
    create, and a second create expecting 0 is refused."""
    with anyio.fail_after(DEADLINE):
        incarnation = await _crashed_creation(s3_store, "crashed", at=T0)
        forked_into = await _crashed_creation(s3_store, "forked", at=T0)
        manager = _manager(s3_store, clock=lambda: T0 + 1.0, max_sequence_retries=3)
        absent = await manager.get_run("crashed")
        created = await manager.create("crashed", {"n": 0}, expected_sequence=0)
        assert created is not None
        with pytest.raises(ConflictError, match="exists already"):
            await manager.create("crashed", {"n": 1}, expected_sequence=0)
        forked = await manager.fork(created.checkpoint_id, new_run_id="forked")
        restored = await manager.restore("crashed")

    assert absent is None
    assert created.checkpoint_id == _ids.checkpoint_id(_ids.key_of("crashed"), incarnation, 0)
    assert forked.checkpoint_id == _ids.checkpoint_id(_ids.key_of("forked"), forked_into, 0)
    assert restored is not None
    assert restored.state == {"n": 0}


async def test_first_creates_racing_with_a_slow_creator_all_land(s3_store: S3Store) -> None:
    """Writers join a run being created instead of waiting for its creator: every create
    is acknowledged once, at its own sequence, and restorable."""
    stores = [S3Store(s3_store.bucket, s3_store.prefix, client=await s3_store.client())
              for _ in range(5)]
    created: list[Any] = []

    async def write(store: S3Store, n: int) -> None:
        created.append(await _manager(store).create("joined", {"n": n}))

    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as group:
            for n, store in enumerate(stores):
                group.start_soon(write, store, n)
        reader = _manager(s3_store)
        found = [await reader.restore_from(ckpt.checkpoint_id) for ckpt in created]

    assert sorted(ckpt.metadata.sequence for ckpt in created) == list(range(5))
    assert [ckpt is not None for ckpt in found] == [True] * 5


async def test_an_abandoned_creation_is_purged_after_the_grace(s3_store: S3Store) -> None:
    """The run object goes once the grace is over; the seal that stops its creator, should
    it still be writing, stays for another grace."""
    key = _ids.key_of("abandoned")
    with anyio.fail_after(DEADLINE):
        await _crashed_creation(s3_store, "abandoned", at=T0)
        within = await _manager(s3_store, clock=lambda: T0 + 30.0).cleanup_expired()
        kept = await _keys(s3_store)
        await _manager(s3_store, clock=lambda: T0 + 61.0).cleanup_expired()
        sealed = await _keys(s3_store)
        await _manager(s3_store, clock=lambda: T0 + 91.0).cleanup_expired()
        still = await _keys(s3_store)
        await _manager(s3_store, clock=lambda: T0 + 122.0).cleanup_expired()
        left = await _keys(s3_store)

    assert within == 0
    assert kept == [layout.run_object(key)]
    assert [entry.rsplit("/", 1)[0] for entry in sealed] == [
        f"runs/{key}/c", f"runs/{key}/c/{layout.inverted(0)}"]
    assert still == sealed
    assert left == []


# -- damaged and foreign records ------------------------------------------------------------------


async def test_a_damaged_run_object_hides_no_checkpoint_from_the_manager(
    s3_store: S3Store, caplog: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(DEADLINE):
        manager = _manager(s3_store)
        created = [await manager.create("damaged", {"n": n}) for n in range(3)]
        await manager.create("healthy", {"n": 0})
        await manager.mark_completed("damaged")
        await damage_run_object(s3_store, _ids.key_of("damaged"))
        before = await _keys(s3_store)
        with caplog.at_level(logging.WARNING, logger="fastcheckpoint.stores.s3"):
            latest = await manager.restore("damaged")
        first = await manager.restore_from(created[0].checkpoint_id)
        listed = await manager.list_checkpoints("damaged")
        lineage = await manager.lineage(created[2].checkpoint_id)
        with pytest.raises(CorruptCheckpointError, match="runs/"):
            await manager.create("damaged", {"n": 3})
        with pytest.raises(CorruptCheckpointError):
            await manager.mark_failed("damaged", "no")
        runs = await manager.list_runs()
        counted = await manager.count_runs()
        purged = await manager.cleanup_expired()
        after = await _keys(s3_store)

    assert latest is not None
    assert latest.state == {"n": 2}
    assert latest.metadata.status == CheckpointStatus.ACTIVE  # the real status is unknown
    assert first is not None
    assert first.state == {"n": 0}
    assert [item.sequence for item in listed] == [2, 1, 0]
    assert [item.sequence for item in lineage] == [2, 1, 0]
    assert [run.run_id for run in runs] == ["healthy"]
    assert (counted, purged) == (1, 0)
    assert after == before  # refused writes changed nothing
    assert any("damaged" in record.getMessage() and "runs/" in record.getMessage()
               for record in caplog.records)


async def test_a_rebuilt_run_object_lists_and_indexes_the_run_again(s3_store: S3Store) -> None:
    with anyio.fail_after(DEADLINE):
        manager = _manager(s3_store)
        created = [await manager.create("repaired", {"n": n}) for n in range(2)]
        await manager.pause("repaired", request={"q": 1})
        key = _ids.key_of("repaired")
        await damage_run_object(s3_store, key)
        [damage] = await s3_store.damaged_runs(now=T0)
        seed = RunRecord(run_id="repaired", incarnation="", status="active", created_at=T0,
                         updated_at=T0, latest_sequence=0, checkpoint_count=0, expires_at=None)
        rebuilt = await s3_store.rebuild_run(key, seed, now=T0)
        with pytest.raises(ConflictError, match="not damaged"):
            await s3_store.rebuild_run(key, seed, now=T0)
        following = await manager.create("repaired", {"n": 2})
        runs = await manager.list_runs(status=CheckpointStatus.ACTIVE)
        paused = await manager.list_runs(status=CheckpointStatus.PAUSED)
        index = [entry for entry in await _keys(s3_store) if entry.startswith("index/")]

    assert damage.run_key == key
    assert damage.key.endswith(f"runs/{key}/a")
    assert damage.checkpoints == 2
    assert damage.newest is not None
    assert damage.newest.checkpoint_id == created[1].checkpoint_id
    assert (rebuilt.latest_sequence, rebuilt.checkpoint_count) == (1, 2)
    assert following is not None
    assert following.metadata.sequence == 2
    assert [run.run_id for run in runs] == ["repaired"]
    assert list(paused) == []
    # The paused entry of the damaged record is gone: one entry per index.
    assert len(index) == 2
    assert all(layout.indexed_run_key(entry) == key for entry in index)


async def test_delete_run_of_a_damaged_run_removes_its_index_entries(s3_store: S3Store) -> None:
    with anyio.fail_after(DEADLINE):
        manager = _manager(s3_store)
        await manager.create("doomed", {"n": 0})
        await manager.create("kept", {"n": 0})
        await damage_run_object(s3_store, _ids.key_of("doomed"))
        removed = await manager.delete_run("doomed")
        keys = await _keys(s3_store)

    assert removed == 1
    assert not any(_ids.key_of("doomed") in key for key in keys)
    assert sum(1 for key in keys if key.startswith("index/")) == 2  # those of "kept"


async def test_a_corrupt_slot_does_not_stop_the_cleanup_of_other_runs(
    s3_store: S3Store, caplog: pytest.LogCaptureFixture
) -> None:
    """A slot that cannot be decoded, and has no marker to list it by, makes its own run
    unreadable there; the cleanup loop logs it and still purges every other run."""
    now = [T0]
    with anyio.fail_after(DEADLINE):
        manager = _manager(s3_store, clock=lambda: now[0])
        for run_id in ("broken", "expiring"):
            await manager.create(run_id, {"n": 0})
            await manager.create(run_id, {"n": 1}, ttl_seconds=10)
        broken = _ids.key_of("broken")
        await _put(s3_store, layout.slot_key(broken, 2), b"\x01not a slot")
        now[0] = T0 + 20
        with caplog.at_level(logging.WARNING, logger="fastcheckpoint.stores.s3"):
            purged = await manager.cleanup_expired()
        left = await manager.list_checkpoints("expiring")

    assert purged == 1  # the expired one of "expiring"
    assert [item.sequence for item in left] == [0]
    assert any(layout.slot_key(broken, 2) in record.getMessage() for record in caplog.records)


async def test_a_slot_copied_from_another_run_reads_as_corrupt(s3_store: S3Store) -> None:
    with anyio.fail_after(DEADLINE):
        manager = _manager(s3_store)
        victim = await manager.create("victim", {"secret": "a"})
        foreign = await manager.create("foreign", {"secret": "b"})
        await manager.create("victim", {"secret": "a2"})
        assert victim is not None
        assert foreign is not None
        client = await s3_store.client()
        victim_key, foreign_key = _ids.key_of("victim"), _ids.key_of("foreign")

        async def copy(source: str, target: str) -> None:
            await client.copy_object(
                Bucket=s3_store.bucket, Key=s3_store.prefix + target,
                CopySource={"Bucket": s3_store.bucket, "Key": s3_store.prefix + source})

        await copy(layout.slot_key(foreign_key, 0), layout.slot_key(victim_key, 1))
        with pytest.raises(CorruptCheckpointError, match=layout.slot_key(victim_key, 1)):
            await manager.restore("victim")
        await copy(layout.slot_key(victim_key, 1), layout.slot_key(victim_key, 0))
        with pytest.raises(CorruptCheckpointError, match=layout.slot_key(victim_key, 0)):
            await manager.restore_from(victim.checkpoint_id)


async def test_a_foreign_object_among_items_is_skipped_by_scans(s3_store: S3Store) -> None:
    """An object under a run's items whose name is no item key (hex) is not one of ours:
    scans skip it, rather than fail reading it as an item or parsing its name."""
    key = _ids.key_of("items")
    with anyio.fail_after(DEADLINE):
        await s3_store.put_items(key, [make_item("a", b"1"), make_item("b", b"2")], now=T0)
        await _put(s3_store, f"{layout.items_prefix(key)}zz-not-hex", b"\x01foreign")
        forward = await s3_store.scan_items(key, now=T0)
        backward = await s3_store.scan_items(key, reverse=True, now=T0)

    assert forward == [("a", b"1"), ("b", b"2")]
    assert backward == [("b", b"2"), ("a", b"1")]


# -- errors of concurrent requests ----------------------------------------------------------------


async def test_failures_of_concurrent_requests_are_one_checkpoint_error(
    moto_endpoint: str,
) -> None:
    """Calls that send requests at once (the slot with the run object, two listings) fail
    with one of our errors, never an ExceptionGroup."""
    store = S3Store(f"fc-test-missing-{secrets.token_hex(4)}", region=REGION,
                    endpoint_url=moto_endpoint)
    manager = CheckpointManager(store)
    checkpoint_id = _ids.checkpoint_id(_ids.key_of("r"), _ids.new_incarnation(), 3)
    calls = [
        lambda: manager.restore_from(checkpoint_id),
        lambda: manager.lineage(checkpoint_id),
        lambda: manager.fork(checkpoint_id, "copy"),
        lambda: manager.list_checkpoints("r", before=checkpoint_id),
        lambda: manager.restore("r"),
        lambda: manager.create("r", {"n": 0}),
    ]
    try:
        with anyio.fail_after(DEADLINE):
            for call in calls:
                with pytest.raises(CheckpointError, match="does not exist") as caught:
                    await call()
                assert not isinstance(caught.value, BaseExceptionGroup)
    finally:
        await store.aclose()


# -- calls cancelled between two of their requests ------------------------------------------


class _CancelledAfterWrites:
    """Runs a store call as a task that is cancelled once ``cut`` of its object writes have
    landed (``Bucket.put`` patched meanwhile); the call raises the cancellation."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.landed = 0

    async def run(self, call: Coroutine[Any, Any, Any], cut: int = 1) -> None:
        put = _s3_io.Bucket.put
        self.landed = 0

        async def cancelling(bucket: Any, *args: Any, **kwargs: Any) -> Any:
            result = await put(bucket, *args, **kwargs)
            self.landed += 1
            if self.landed == cut:
                task.cancel()
            return result

        self.monkeypatch.setattr(_s3_io.Bucket, "put", cancelling)
        task = asyncio.ensure_future(call)
        try:
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            self.monkeypatch.setattr(_s3_io.Bucket, "put", put)


# -- a cancelled write of several items --------------------------------------------------------


@pytest.mark.parametrize("if_absent", [True, False], ids=["put_owned_items", "put_items"])
async def test_a_cancelled_write_of_several_items_stores_them_all(
    s3_store: S3Store, monkeypatch: pytest.MonkeyPatch, if_absent: bool
) -> None:
    """A write of items is a request per item and marker (more than the connection pool
    sends at once): cancelled once the first has landed, it stores every item before its
    caller gets the cancellation, never some of them (a LangGraph task with part of its
    writes stored counts as done, and the rest would be lost)."""
    run = make_run("cancelled-items")
    key = key_of(run)
    items = [make_item(f"w/{n}", owner=0 if if_absent else None) for n in range(12)]
    cut = _CancelledAfterWrites(monkeypatch)
    with anyio.fail_after(DEADLINE):
        await _append_items(s3_store, run, 0, refs=[], items=[])
        await cut.run(s3_store.put_owned_items(key, items, owner=0, if_absent=True, now=T0,
                                               checkpoint_id=checkpoint_id_of(run, 0))
                      if if_absent else s3_store.put_items(key, items, now=T0))
        stored = await s3_store.get_items(key, [item.key for item in items], now=T0)
    assert cut.landed > 1
    assert sorted(stored) == sorted(item.key for item in items)


async def test_a_status_change_cancelled_or_cut_short_keeps_the_run_in_its_listing(
    s3_store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A status change is the run object's compare-and-set, then the by-status entry:
    cancelled once the first landed, it writes the entry before its caller gets the
    cancellation; and when the entry is missing all the same (a process killed between
    the two), the change made again with the same status puts it back. A paused run waiting
    for a human never drops out of ``list_runs(status=PAUSED)``."""
    manager = _manager(s3_store)
    cut = _CancelledAfterWrites(monkeypatch)

    async def paused() -> list[str]:
        runs, _ = await s3_store.list_runs(status="paused", limit=10, cursor=None, now=T0)
        return [run.run_id for run in runs]

    with anyio.fail_after(DEADLINE):
        await manager.create("waiting", {"n": 0})
        key = _ids.key_of("waiting")
        run = await s3_store.get_run(key, now=T0)
        assert run is not None
        await cut.run(s3_store.update_run(
            key, incarnation=run.incarnation, version=run.version, status="paused",
            data=run.data, now=T0))
        listed_after_the_cancellation = await paused()
        # A process killed between the two requests: the entry is missing.
        entries = [name for name in await _keys(s3_store) if name.startswith("index/status/")]
        client = await s3_store.client()
        await client.delete_objects(Bucket=s3_store.bucket, Delete={"Objects": [
            {"Key": s3_store.prefix + name} for name in entries]})
        listed_without_the_entry = await paused()
        run = await s3_store.get_run(key, now=T0)
        assert run is not None
        await s3_store.update_run(key, incarnation=run.incarnation, version=run.version,
                                  status="paused", data=run.data, now=T0)
        listed_after_the_change_again = await paused()
    assert listed_after_the_cancellation == ["waiting"]
    assert listed_without_the_entry == []
    assert listed_after_the_change_again == ["waiting"]


@pytest.mark.parametrize("cut", [1, 2])
async def test_a_cancelled_append_with_owned_items_keeps_them_with_their_checkpoint(
    s3_store: S3Store, monkeypatch: pytest.MonkeyPatch, cut: int
) -> None:
    """An append with owned items is several requests (the commit, then the items and the
    marker): cancelled after the ``cut``-th write, it finishes before its caller gets the
    cancellation, never leaving a checkpoint without its owned items."""
    run = make_run("cancelled-append")
    key = key_of(run)
    owned = [make_item(f"o/{n}", owner=1) for n in range(2)]
    cancelled = _CancelledAfterWrites(monkeypatch)
    with anyio.fail_after(DEADLINE):
        await _append_items(s3_store, run, 0, refs=[], items=[])
        await cancelled.run(_append_items(s3_store, run, 1, refs=[], items=owned), cut)
        appended = await s3_store.read_with_items(key, sequence=1, now=T0)
    assert appended is not None
    assert sorted(appended[2]) == ["o/0", "o/1"]


async def test_a_writer_listing_a_replaced_leftover_never_takes_the_new_slot_for_it(
    s3_store: S3Store, other_store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next sequence holds a slot of an ended incarnation, with its marker. One writer
    replaces the slot (``IfMatch``); another lists the run right after, before the first
    removed the leftover's marker: it must see the first writer's slot, not the leftover
    (which it would replace, losing an acknowledged checkpoint)."""
    run = make_run("leftover-race")
    key = key_of(run)
    ended = _ids.new_incarnation()
    leftover = layout.Slot(ended, 1, _ids.checkpoint_id(key, ended, 1), T0, None, T0, b"",
                           b"", token=b"old", run_key=key)
    raced: list[BaseException | str] = []
    put = _s3_io.Bucket.put
    slot_key = layout.slot_key(key, 1)
    client = await s3_store.client()

    async def then_another_writer(bucket: Any, object_key: str, *args: Any,
                                  **kwargs: Any) -> Any:
        written = await put(bucket, object_key, *args, **kwargs)
        if object_key == slot_key and kwargs.get("if_match") and not raced:
            raced.append("racing")
            try:
                raced[0] = await other_store.append(
                    key, make_checkpoint(run, 1), run=run, keep_latest=None, now=T0)
            except SequenceConflict as exc:
                raced[0] = exc
        return written

    with anyio.fail_after(DEADLINE):
        await s3_store.append(key, make_checkpoint(run, 0), run=run, keep_latest=None,
                              now=T0)
        await _put(s3_store, slot_key, layout.encode(leftover))
        marker = s3._marker_of(s3_store.prefix, key, 1, "m", s3._listing_of(leftover))[0]
        await client.put_object(Bucket=s3_store.bucket, Key=s3_store.prefix + marker,
                                Body=b"")
        monkeypatch.setattr(_s3_io.Bucket, "put", then_another_writer)
        ours = make_checkpoint(run, 1, payload=b"the first writer's")
        await s3_store.append(key, ours, run=run, keep_latest=None, now=T0)
        monkeypatch.undo()
        found = await other_store.get(key, 1, now=T0)

    assert len(raced) == 1
    assert isinstance(raced[0], SequenceConflict)
    assert found is not None
    assert found[0].payload == b"the first writer's"


async def test_replacing_a_leftover_keeps_an_item_the_new_life_owns_at_its_key(
    s3_store: S3Store, other_store: S3Store
) -> None:
    """A leftover slot of an ended life at the next sequence, with the marker of an item it
    owned at a key that a checkpoint of the new life owns now (the new life wrote it over
    the old one). The append replacing the leftover removes what the leftover owned: that
    item only while it is the leftover's, never the new life's."""
    run = make_run("leftover-items")
    key = key_of(run)
    ended = _ids.new_incarnation()
    leftover = layout.Slot(ended, 1, _ids.checkpoint_id(key, ended, 1), T0, None, T0, b"",
                           b"", token=b"old", run_key=key)
    with anyio.fail_after(DEADLINE):
        await _append_items(s3_store, run, 0, refs=[], items=[make_item("k", b"new life's",
                                                                        owner=0)])
        await _put(s3_store, layout.slot_key(key, 1), layout.encode(leftover))
        old_marker = layout.item_marker_key(key, layout.hex_item_key("k"),
                                            layout.ItemMeta(1, None))
        await _put(s3_store, old_marker, b"old")
        await other_store.append(key, make_checkpoint(run, 1), run=run, keep_latest=None,
                                 now=T0)
        found = await other_store.read_with_items(key, sequence=0, now=T0)
        keys = await _keys(s3_store)

    assert found is not None
    assert found[2] == {"k": b"new life's"}
    assert old_marker not in keys
