"""S3 store: a damaged item stays within itself (scans skip it, reads that ask for it name
it), and a process that appends into a run without seeing its damaged slot loses nothing
to the repair."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from fastcheckpoint import CheckpointConfig, CheckpointManager, _ids
from fastcheckpoint.errors import CorruptCheckpointError
from fastcheckpoint.stores import _s3_layout as layout
from fastcheckpoint.stores._aws import RequestCounter
from fastcheckpoint.stores.s3 import S3Store
from fastcheckpoint.testing import T0, key_of, make_item, make_run
from fastcheckpoint.testing._adapter import _append_items
from tests.stores._moto import moto_endpoint
from tests.stores.s3.test_s3 import DEADLINE, s3_bucket, s3_store
from tests.stores.s3.test_s3_damage_fixes import _copy, _create, _keys, _put, _unreadable_bare_slot

__all__ = ["moto_endpoint", "s3_bucket", "s3_store"]

pytestmark = pytest.mark.anyio

LATER = T0 + 1e9  # the manager runs on the wall clock; the store calls below read at it
_LOGGER = "fastcheckpoint.stores.s3"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


def _object(run_key: str, item_key: str) -> str:
    return layout.item_object(run_key, layout.hex_item_key(item_key))


async def _raw(store: S3Store, key: str) -> bytes:
    client = await store.client()
    response = await client.get_object(Bucket=store.bucket, Key=store.prefix + key)
    async with response["Body"] as stream:
        return bytes(await stream.read())


Damage = Callable[[S3Store, str, str], Awaitable[None]]


async def _truncated(store: S3Store, run_key: str, item_key: str) -> None:
    key = _object(run_key, item_key)
    await _put(store, key, (await _raw(store, key))[:-3])


async def _unframed(store: S3Store, run_key: str, item_key: str) -> None:
    """The record without its format byte: framing of no format of ours."""
    key = _object(run_key, item_key)
    await _put(store, key, (await _raw(store, key))[1:])


async def _overwritten(store: S3Store, run_key: str, item_key: str) -> None:
    """Well framed bytes of another kind of record (the run's index entry is empty; a run
    object is not at hand in a run without checkpoints): a sweep lease."""
    lease = layout.SweepLease(False, b"t", 0.0, ())
    await _put(store, _object(run_key, item_key), layout.encode(lease))


async def _copied(store: S3Store, run_key: str, item_key: str) -> None:
    """The object of another item of the run copied over this one: intact bytes that say
    they belong at another key."""
    await _copy(store, _object(run_key, "c"), _object(run_key, item_key))


async def _copied_from_another_run(store: S3Store, run_key: str, item_key: str) -> None:
    other = _ids.key_of("another-run")
    await store.put_items(other, [make_item(item_key, b"foreign")], now=T0)
    await _copy(store, _object(other, item_key), _object(run_key, item_key))


DAMAGES = [_truncated, _unframed, _overwritten, _copied, _copied_from_another_run]


async def _five_items(store: S3Store, name: str) -> str:
    run_key = _ids.key_of(name)
    await store.put_items(run_key, [make_item(key, key.encode()) for key in "abcde"], now=T0)
    return run_key


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda damage: damage.__name__.strip("_"))
async def test_scans_skip_a_damaged_item_and_fill_their_pages_past_it(
    s3_store: S3Store, damage: Damage, caplog: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(DEADLINE):
        run_key = await _five_items(s3_store, "scanned")
        await damage(s3_store, run_key, "b")
        with caplog.at_level(logging.WARNING, logger=_LOGGER):
            forward = await s3_store.scan_items(run_key, limit=2, now=T0)
            rest = await s3_store.scan_items(run_key, start_after="c", limit=2, now=T0)
            backward = await s3_store.scan_items(run_key, start_after="d", limit=2,
                                                 reverse=True, now=T0)
            nested = await s3_store.scan_items(run_key, prefix="b", now=T0)

    # Full pages past the damaged item: a short page would read as the end.
    assert forward == [("a", b"a"), ("c", b"c")]
    assert rest == [("d", b"d"), ("e", b"e")]
    assert backward == [("c", b"c"), ("a", b"a")]
    assert nested == []
    where = f"s3://{s3_store.bucket}/{s3_store.prefix}{_object(run_key, 'b')}"
    assert any(where in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda damage: damage.__name__.strip("_"))
async def test_get_items_names_the_damaged_item_and_reads_the_others(
    s3_store: S3Store, damage: Damage
) -> None:
    """As on the other stores: a damaged item among the keys asked for is an error naming
    it (the caller asked for its value); keys without it read as usual."""
    with anyio.fail_after(DEADLINE):
        run_key = await _five_items(s3_store, "got")
        await damage(s3_store, run_key, "b")
        with pytest.raises(CorruptCheckpointError) as raised:
            await s3_store.get_items(run_key, ["a", "b", "d"], now=T0)
        others = await s3_store.get_items(run_key, ["a", "d", "e"], now=T0)

    assert raised.value.key == f"s3://{s3_store.bucket}/{s3_store.prefix}{_object(run_key, 'b')}"
    assert others == {"a": b"a", "d": b"d", "e": b"e"}


@pytest.mark.parametrize("damage", [_truncated, _copied], ids=["truncated", "copied"])
async def test_a_restore_with_items_names_a_damaged_item_its_checkpoint_uses(
    s3_store: S3Store, damage: Damage
) -> None:
    """A checkpoint whose shared item is damaged cannot be restored whole: the read names
    the item. A checkpoint that does not use it restores as usual."""
    run = make_run("restored")
    run_key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await s3_store.put_items(run_key, [make_item("c")], now=T0)
        await _append_items(s3_store, run, 0, refs=["b"], items=[make_item("b")])
        await _append_items(s3_store, run, 1, refs=["d"], items=[make_item("d")])
        await damage(s3_store, run_key, "b")
        with pytest.raises(CorruptCheckpointError) as raised:
            await s3_store.read_with_items(run_key, sequence=0, now=T0)
        intact = await s3_store.read_with_items(run_key, sequence=1, now=T0)

    assert raised.value.key == f"s3://{s3_store.bucket}/{s3_store.prefix}{_object(run_key, 'b')}"
    assert intact is not None
    assert intact[2] == {"d": b"value-d"}


async def test_items_written_before_their_key_was_recorded_still_read(s3_store: S3Store) -> None:
    """Item objects of earlier versions say nothing of their run and key: read as before."""
    run_key = _ids.key_of("earlier")
    body = layout.encode(layout.ItemBody(b"old", None, None, b"token"))
    with anyio.fail_after(DEADLINE):
        await _put(s3_store, _object(run_key, "a"), body)
        assert await s3_store.get_items(run_key, ["a"], now=T0) == {"a": b"old"}
        assert await s3_store.scan_items(run_key, now=T0) == [("a", b"old")]


async def test_scans_with_nothing_damaged_cost_one_list_and_a_get_per_item(
    s3_store: S3Store,
) -> None:
    """Skipping damaged items costs nothing while there are none: one LIST of the run's
    items, then one GET per item of the page (a full page: no more)."""
    with anyio.fail_after(DEADLINE):
        run_key = await _five_items(s3_store, "counted")
        client = await s3_store.client()
        with RequestCounter.attached(client) as whole:
            everything = await s3_store.scan_items(run_key, now=T0)
        with RequestCounter.attached(client) as page:
            first = await s3_store.scan_items(run_key, limit=2, now=T0)
        with RequestCounter.attached(client) as backward:
            last = await s3_store.scan_items(run_key, limit=2, reverse=True, now=T0)

    assert whole.counts == {"ListObjectsV2": 1, "GetObject": 5}
    assert page.counts == backward.counts == {"ListObjectsV2": 1, "GetObject": 2}
    assert [key for key, _ in everything] == list("abcde")
    assert [key for key, _ in first] == ["a", "b"]
    assert [key for key, _ in last] == ["e", "d"]


# -- a process that knows the run appends past a damaged slot ------------------------------------


def _fresh(store: S3Store, client: Any) -> CheckpointManager:
    """A manager on a store that knows nothing of any run (another process)."""
    return CheckpointManager(S3Store(store.bucket, store.prefix, client=client))


async def test_a_checkpoint_acknowledged_past_a_damaged_slot_survives_the_repair(
    s3_store: S3Store,
) -> None:
    """A process that knows the run (it wrote it) appends without a LIST, so it does not see
    an older slot that lost its marker and its bytes. What it acknowledges then is a
    checkpoint like any other: the repair's floor goes above it (floors only bound later
    appends), its tombstone goes on the damaged slot alone, and the cleanup that removes
    that slot leaves it."""
    with anyio.fail_after(DEADLINE):
        warm = CheckpointManager(s3_store)
        for n in range(3):
            await _create(warm, "warm", n)
        run_key = _ids.key_of("warm")
        bad = await _unreadable_bare_slot(s3_store, run_key, 1)
        client = await s3_store.client()
        with RequestCounter.attached(client) as unseen:
            acknowledged = await _create(warm, "warm", 3)
        assert unseen.counts == {"PutObject": 2, "GetObject": 2}  # no LIST: damage unseen

        other = _fresh(s3_store, client)
        with pytest.raises(CorruptCheckpointError):
            await other.create("warm", {"n": 99})  # a process that lists the run refuses
        [report] = await other.repair()
        assert report.outcome == "rebuilt"
        for manager in (warm, other):
            latest = await manager.restore("warm")
            assert latest is not None
            assert (latest.checkpoint_id, latest.state) == (acknowledged.checkpoint_id, {"n": 3})
        again = await other.restore_from(acknowledged.checkpoint_id)
        assert again is not None
        assert again.state == {"n": 3}

        # Both go on above it, and the cleanup removes the damaged slot, not it.
        assert (await _create(warm, "warm", 4)).metadata.sequence == 4
        assert (await _create(other, "warm", 5)).metadata.sequence == 5
        await s3_store.purge_expired(now=LATER, limit=100)
        assert await _keys(s3_store, bad) == []
        listed = await other.list_checkpoints("warm")
        assert [header.sequence for header in listed] == [5, 4, 3, 2, 0]
        assert acknowledged.checkpoint_id in {header.checkpoint_id for header in listed}


async def test_a_checkpoint_acknowledged_during_the_repair_stays_above_its_floor(
    s3_store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The warm process commits while the repair runs: after the repair's listing (which
    does not show the checkpoint) and before its compare-and-set. The floor the repair sets
    is then the checkpoint's own sequence: no later append reuses it and none is refused
    for it."""
    with anyio.fail_after(DEADLINE):
        warm = CheckpointManager(s3_store)
        for n in range(3):
            await _create(warm, "racing", n)
        run_key = _ids.key_of("racing")
        await _unreadable_bare_slot(s3_store, run_key, 1)
        repairing = S3Store(s3_store.bucket, s3_store.prefix,
                            client=await s3_store.client())
        listed_by_repair = repairing._load
        during: list[str] = []

        async def load_then_append(*args: Any) -> Any:
            found = await listed_by_repair(*args)
            if not during:  # the repair's listing (later calls read the run it rebuilt)
                during.append((await _create(warm, "racing", 3)).checkpoint_id)
            return found

        monkeypatch.setattr(repairing, "_load", load_then_append)
        [report] = await CheckpointManager(repairing).repair()
        assert report.outcome == "rebuilt"
        assert len(during) == 1
        state = layout.decode_run(await _raw(s3_store, layout.run_object(run_key)), "")
        assert state.floor == 3

        fresh = _fresh(s3_store, await s3_store.client())
        latest = await fresh.restore("racing")
        assert latest is not None
        assert latest.checkpoint_id == during[0]
        assert (await _create(warm, "racing", 4)).metadata.sequence == 4
        assert (await _create(fresh, "racing", 5)).metadata.sequence == 5
        assert [header.sequence for header in await fresh.list_checkpoints("racing")] == [
            5, 4, 3, 2, 0]


async def test_an_unreadable_slot_at_the_proposed_sequence_refuses_the_warm_append(
    s3_store: S3Store,
) -> None:
    """The damaged slot a warm process can meet: at the sequence it proposes. The slot PUT
    is refused (412), and so is the retry, which lists the run and sees the damage."""
    with anyio.fail_after(DEADLINE):
        warm = CheckpointManager(s3_store)
        for n in range(2):
            await _create(warm, "ahead", n)
        run_key = _ids.key_of("ahead")
        await _put(s3_store, layout.slot_key(run_key, 2), b"\x01not a slot")
        with pytest.raises(CorruptCheckpointError):
            await warm.create("ahead", {"n": 2})
        [damage] = await s3_store.damaged_runs(run_key=run_key, now=LATER)
        assert damage.key.endswith(layout.slot_key(run_key, 2))


async def test_pruning_by_the_warm_process_removes_an_unreadable_slot(s3_store: S3Store) -> None:
    """The unreadable slot the warm process knew goes like any checkpoint beyond
    ``max_checkpoints_per_run``: the run is whole again, with every checkpoint it keeps."""
    with anyio.fail_after(DEADLINE):
        warm = CheckpointManager(s3_store, config=CheckpointConfig(max_checkpoints_per_run=2))
        await _create(warm, "pruned", 0)
        await _create(warm, "pruned", 1)
        run_key = _ids.key_of("pruned")
        await _unreadable_bare_slot(s3_store, run_key, 0)
        assert len(await s3_store.damaged_runs(run_key=run_key, now=LATER)) == 1
        await _create(warm, "pruned", 2)
        assert await s3_store.damaged_runs(run_key=run_key, now=LATER) == []
        fresh = _fresh(s3_store, await s3_store.client())
        assert [header.sequence for header in await fresh.list_checkpoints("pruned")] == [2, 1]
        assert (await _create(fresh, "pruned", 3)).metadata.sequence == 3
        latest = await fresh.restore("pruned")
        assert latest is not None
        assert latest.state == {"n": 3}
