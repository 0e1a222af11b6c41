"""S3 store: a status change guarded by the run's newest checkpoint
(``update_run(..., latest_sequence=s)``, ``pause(latest_sequence=...)``) against appends of
other processes landing at every point of it. The change claims sequence ``s + 1`` with a
guard, compare-and-sets the run object, then removes the guard; an append that finds the
guard breaks it. Whatever the interleaving: every acknowledged append is restorable, and a
change acknowledged on the condition that ``s`` is the newest was applied while it was (an
append acknowledged after it reports the new status); a guard left by a change that stopped
never hides, blocks or stands for a checkpoint."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import msgspec
import pytest

from fastcheckpoint import CheckpointConfig, CheckpointManager, CheckpointStatus
from fastcheckpoint.errors import ConflictError
from fastcheckpoint.stores import _s3_layout as layout
from fastcheckpoint.stores._aws import RequestCounter
from fastcheckpoint.stores._base import RunRecord
from fastcheckpoint.stores.s3 import CREATION_GRACE_SECONDS, S3Store
from fastcheckpoint.testing import T0, key_of, make_checkpoint, make_run
from tests.stores._moto import REGION, moto_endpoint, unique_name
from tests.stores.s3.test_s3 import DEADLINE, SESSION

__all__ = ["moto_endpoint"]

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


@pytest.fixture
async def stores(moto_endpoint: str) -> AsyncIterator[tuple[S3Store, S3Store]]:
    """Two processes' stores on one bucket of its own (not versioned: listed often)."""
    bucket = unique_name("guard")
    made = [S3Store(bucket, "p", region=REGION, endpoint_url=moto_endpoint, session=SESSION)
            for _ in range(2)]
    await (await made[0].client()).create_bucket(Bucket=bucket)
    yield made[0], made[1]
    with anyio.fail_after(10):
        for store in made:
            await store.aclose()


async def _append(store: S3Store, run: RunRecord, sequence: int, *,
                  expires_at: float | None = None, now: float = T0) -> str:
    return await store.append(key_of(run), make_checkpoint(run, sequence, expires_at=expires_at),
                              run=run, keep_latest=None, now=now)


async def _pause(store: S3Store, run: RunRecord, latest_sequence: int, *,
                 now: float = T0 + 1) -> RunRecord:
    found = await store.get_run(key_of(run), now=now)
    assert found is not None
    return await store.update_run(key_of(run), incarnation=found.incarnation,
                                  version=found.version, status="paused", data=b"ask",
                                  now=now, latest_sequence=latest_sequence)


def _around_change(store: S3Store, monkeypatch: pytest.MonkeyPatch, *,
                   before: Callable[[], Awaitable[None]] | None = None,
                   after: Callable[[], Awaitable[None]] | None = None) -> None:
    """Run ``before`` between the guard and the run object's compare-and-set of ``store``'s
    next guarded change, ``after`` between that and the guard's removal."""
    change = store._change_status
    calls: list[int] = []

    async def hooked(*args: Any, **kwargs: Any) -> Any:
        first = not calls
        calls.append(1)
        if first and before is not None:
            await before()
        result = await change(*args, **kwargs)
        if first and after is not None:
            await after()
        return result

    monkeypatch.setattr(store, "_change_status", hooked)


async def _objects(store: S3Store) -> list[str]:
    client = await store.client()
    found = await client.list_objects_v2(Bucket=store.bucket, Prefix=store.prefix)
    return [entry["Key"][len(store.prefix):] for entry in found.get("Contents", [])]


async def _guard_keys(store: S3Store, run: RunRecord) -> list[str]:
    slots = layout.slots_prefix(key_of(run))
    return [key for key in await _objects(store)
            if key.startswith(slots) and "/" not in key[len(slots):]
            and layout.parse_sequence(key[len(slots):]) is not None
            and await _is_guard(store, run, key)]


async def _is_guard(store: S3Store, run: RunRecord, key: str) -> bool:
    client = await store.client()
    got = await client.get_object(Bucket=store.bucket, Key=store.prefix + key)
    body = await got["Body"].read()
    sequence = layout.parse_sequence(key[len(layout.slots_prefix(key_of(run))):])
    assert sequence is not None
    return bool(layout.decode_slot(body, key, run_key=key_of(run), sequence=sequence).guards)


async def _leave_guard(store: S3Store, run: RunRecord, sequence: int, *,
                       now: float = T0 + 1) -> None:
    """What a guarded change that stopped after its guard leaves: the guard at
    ``sequence``, naming the run object as it is now."""
    client = await store.client()
    run_object = store.prefix + layout.run_object(key_of(run))
    etag = (await client.head_object(Bucket=store.bucket, Key=run_object))["ETag"]
    guard = layout.Slot(run.incarnation, sequence, "", now, None, now, b"", b"",
                        tombstone=True, token=b"stopped!", run_key=key_of(run), guards=etag)
    await client.put_object(Bucket=store.bucket,
                            Key=store.prefix + layout.slot_key(key_of(run), sequence),
                            Body=layout.encode(guard))


async def _state(store: S3Store, run: RunRecord, now: float = T0 + 2) -> tuple[str, int, int]:
    found = await store.get_run(key_of(run), now=now)
    assert found is not None
    return found.status, found.latest_sequence, found.checkpoint_count


async def test_an_append_landing_before_the_change_is_applied_refuses_it(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    holder, other = stores
    run = make_run("guard-append-first")
    with anyio.fail_after(DEADLINE):
        await _append(holder, run, 0)
        await _append(holder, run, 1)
        reported: list[str] = []

        async def append_meanwhile() -> None:
            reported.append(await _append(other, run, 2, now=T0 + 1))

        _around_change(holder, monkeypatch, before=append_meanwhile)
        with pytest.raises(ConflictError):
            await _pause(holder, run, 1)

        assert reported == ["active"]
        assert await _state(other, run) == ("active", 2, 3)
        found = await other.get(key_of(run), 2, now=T0 + 2)
        assert found is not None
        assert found[0].checkpoint_id == make_checkpoint(
            run, 2).checkpoint_id
        assert await _guard_keys(other, run) == []
        # The change, read again, now sees the append: refused for what it is.
        with pytest.raises(ConflictError, match="newer checkpoints"):
            await _pause(holder, run, 1, now=T0 + 3)
        assert (await _pause(holder, run, 2, now=T0 + 3)).status == "paused"


async def test_an_append_landing_after_the_change_is_ordered_after_it(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    holder, other = stores
    run = make_run("guard-change-first")
    with anyio.fail_after(DEADLINE):
        await _append(holder, run, 0)
        await _append(other, run, 1)  # the other process knows the run, as a worker would
        reported: list[str] = []

        async def append_meanwhile() -> None:
            reported.append(await _append(other, run, 2, now=T0 + 1))

        _around_change(holder, monkeypatch, after=append_meanwhile)
        paused = await _pause(holder, run, 1)

        assert (paused.status, paused.latest_sequence) == ("paused", 1)
        assert reported == ["paused"]  # it came after the pause, and says so
        assert await _state(holder, run) == ("paused", 2, 3)
        assert await _guard_keys(holder, run) == []


async def test_a_change_racing_a_floor_raise_renews_its_guard(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A writer raising the floor between the guard and the change: the guard is made to
    name the new run object first, and the change applies (an append breaking the renewed
    guard would still refuse it)."""
    holder, other = stores
    run = make_run("guard-floor")
    with anyio.fail_after(DEADLINE):
        for sequence in range(3):
            await _append(holder, run, sequence)

        async def raise_floor() -> None:
            client = await other.client()
            key = other.prefix + layout.run_object(key_of(run))
            got = await client.get_object(Bucket=other.bucket, Key=key)
            state = layout.decode_run(await got["Body"].read(), key)
            await client.put_object(
                Bucket=other.bucket, Key=key, IfMatch=got["ETag"],
                Body=layout.encode(msgspec.structs.replace(state, floor=1)))

        _around_change(holder, monkeypatch, before=raise_floor)
        paused = await _pause(holder, run, 2)

        assert paused.status == "paused"
        assert await _state(other, run) == ("paused", 2, 3)
        assert await _guard_keys(other, run) == []
        assert await _append(other, run, 3, now=T0 + 2) == "paused"


async def test_two_guarded_changes_at_once_apply_once(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another pause between the guard and the change: it breaks the guard (it cannot tell
    a change under way from one that stopped), so the first fails; the manager reads the
    run again and finds it paused."""
    holder, other = stores
    run_id = "guard-two-pauses"
    config = CheckpointConfig(max_sequence_retries=8)
    first = CheckpointManager(holder, config)
    second = CheckpointManager(other, config)
    with anyio.fail_after(DEADLINE):
        created = await first.create(run_id, {"n": 0})
        sequence = created.metadata.sequence

        async def pause_meanwhile() -> None:
            await second.pause(run_id, {"who": "second"}, latest_sequence=sequence)

        _around_change(holder, monkeypatch, before=pause_meanwhile)
        with pytest.raises(ConflictError, match="cannot be paused"):
            await first.pause(run_id, {"who": "first"}, latest_sequence=sequence)

        info = await first.get_run(run_id)
        assert info is not None
        assert info.status is CheckpointStatus.PAUSED
        assert info.approval is not None
        assert info.approval["request"] == {"who": "second"}
        assert await _guard_keys(holder, make_run(run_id)) == []


async def test_a_guard_left_behind_hides_nothing_and_the_next_append_breaks_it(
    stores: tuple[S3Store, S3Store],
) -> None:
    writer, reader = stores
    run = make_run("guard-left")
    with anyio.fail_after(DEADLINE):
        await _append(writer, run, 0)
        await _append(writer, run, 1)
        await _leave_guard(writer, run, 2)

        assert await _state(reader, run) == ("active", 1, 2)
        latest = await reader.latest(key_of(run), now=T0 + 2)
        assert latest is not None
        assert latest[0].sequence == 1
        assert await reader.get(key_of(run), 2, now=T0 + 2) is None
        headers, _ = await reader.headers(key_of(run), before=None, limit=10, now=T0 + 2)
        assert [header.sequence for header in headers] == [1, 0]

        # A process that knows the run (no listing) and one that does not: both append.
        assert await _append(writer, run, 2, now=T0 + 2) == "active"
        await _leave_guard(writer, run, 3)
        assert await _append(reader, run, 3, now=T0 + 3) == "active"

        assert await _state(reader, run, now=T0 + 4) == ("active", 3, 4)
        assert await _guard_keys(reader, run) == []
        # The broken guard's change can no longer apply: the run object was rewritten.
        assert (await _pause(writer, run, 3, now=T0 + 5)).status == "paused"


async def test_the_cleanup_loop_breaks_a_guard_left_behind(
    stores: tuple[S3Store, S3Store],
) -> None:
    writer, cleaner = stores
    run = make_run("guard-cleaned")
    with anyio.fail_after(DEADLINE):
        await _append(writer, run, 0)
        await _leave_guard(writer, run, 1)

        await cleaner.purge_expired(now=T0 + 2, limit=100)
        assert len(await _guard_keys(cleaner, run)) == 1  # it may be a change under way

        await cleaner.purge_expired(now=T0 + 1 + CREATION_GRACE_SECONDS, limit=100)
        assert await _guard_keys(cleaner, run) == []
        assert await _state(cleaner, run, now=T0 + 70) == ("active", 0, 1)
        assert await _append(writer, run, 1, now=T0 + 70) == "active"


async def test_a_guard_does_not_seal_a_dead_run(stores: tuple[S3Store, S3Store]) -> None:
    """A run that died with a guard at the sequence after its newest: whoever starts it
    over breaks the guard and seals that sequence (an append of the dead life would break
    a guard, never a seal)."""
    writer, restarter = stores
    run = make_run("guard-dead")
    with anyio.fail_after(DEADLINE):
        await _append(writer, run, 0, expires_at=T0 + 10)
        await _leave_guard(writer, run, 1)

        manager = CheckpointManager(restarter, CheckpointConfig(clock=lambda: T0 + 20))
        created = await manager.create(run.run_id, {"n": 1})

        assert created.metadata.sequence == 0
        assert await _guard_keys(restarter, run) == []  # a seal holds its key now
        restored = await manager.restore(run.run_id)
        assert restored is not None
        assert restored.state == {"n": 1}
        # The dead life's append at the guard's sequence is refused: the key is sealed.
        with pytest.raises(ConflictError):
            await _append(writer, run, 1, now=T0 + 21)


async def test_what_a_guard_costs(stores: tuple[S3Store, S3Store]) -> None:
    """A guarded change: an unguarded one's requests, + the guard's PUT and DELETE. An
    append meeting a guard left behind: its commit, the head listed (the guard read), the
    run object read and rewritten, the guard deleted, its commit again, its marker."""
    writer, changer = stores
    run, unguarded = make_run("guard-cost"), make_run("guard-cost-plain")
    client = await changer.client()
    with anyio.fail_after(DEADLINE):
        for each in (run, unguarded):
            await _append(writer, each, 0)
            assert await changer.get_run(key_of(each), now=T0) is not None
        with RequestCounter.attached(client) as plain:
            await changer.update_run(key_of(unguarded), incarnation=unguarded.incarnation,
                                     version=0, status="paused", data=b"", now=T0 + 1)
        with RequestCounter.attached(client) as guarded:
            await changer.update_run(key_of(run), incarnation=run.incarnation, version=0,
                                     status="paused", data=b"", now=T0 + 1, latest_sequence=0)
        assert await _append(writer, run, 1, now=T0 + 2) == "paused"  # learns the change
        await _leave_guard(writer, run, 2, now=T0 + 2)
        with RequestCounter.attached(await writer.client()) as breaking:
            assert await _append(writer, run, 2, now=T0 + 3) == "paused"

    more = dict(plain.counts)
    more["PutObject"] += 1
    more["DeleteObject"] = more.get("DeleteObject", 0) + 1
    assert guarded.counts == more
    assert breaking.counts == {"PutObject": 1 + 1 + 1 + 1, "GetObject": 1 + 2 + 1 + 1,
                               "ListObjectsV2": 1, "DeleteObject": 1}


async def test_a_run_whose_guard_cannot_be_broken_does_not_stop_the_cleanup(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Breaking a guard gives up (``ConflictError``) when its change keeps renewing it: the
    cleanup skips that run this time and goes on with the others."""
    writer, cleaner = stores
    busy, expired = make_run("guard-busy"), make_run("guard-expired")
    with anyio.fail_after(DEADLINE):
        await _append(writer, busy, 0)
        await _leave_guard(writer, busy, 1)
        await _append(writer, expired, 0, expires_at=T0 + 5)
        await _append(writer, expired, 1)

        async def renewed_meanwhile(*args: Any, **kwargs: Any) -> Any:
            raise ConflictError("a status change kept renewing its guard")

        monkeypatch.setattr(cleaner, "_break_guard", renewed_meanwhile)
        removed, _ = await cleaner.purge_expired(now=T0 + 1 + CREATION_GRACE_SECONDS,
                                                 limit=100)

    assert removed == 1
    assert await _state(cleaner, expired, now=T0 + 70) == ("active", 1, 1)


async def test_a_failure_counts_a_checkpoint_landing_between_its_listing_and_its_write(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``mark_failed`` records the newest checkpoint it failed the run after (a later create
    resumes only a failure that came before it). Here the status change reads that from a
    listing, then writes the run object: a checkpoint landing in between is made to count
    (the change is guarded, so it reads the run again), never left out."""
    failing, creating = stores
    run_id = "guard-failure"
    key = key_of(make_run(run_id))
    manager = CheckpointManager(failing)
    other = CheckpointManager(creating)
    with anyio.fail_after(DEADLINE):
        await manager.create(run_id, {"n": 0})

        async def create_meanwhile() -> None:
            await other.create(run_id, {"n": 1})

        _around_change(failing, monkeypatch, before=create_meanwhile)
        failed = await manager.mark_failed(run_id, "it broke")
        record = await creating.get_run(key, now=T0 + 10 ** 9)

    assert failed is not None
    assert failed.status is CheckpointStatus.FAILED
    assert record is not None
    assert record.latest_sequence == 1
    assert manager._codec.decode_run_data(record.data, key).failed_after == 1
