"""S3 store damage that must stay within its run: a slot without its marker that cannot be
read, a run object copied from another run, a label index entry copied from another label."""

from __future__ import annotations

import anyio
import msgspec
import pytest

from fastcheckpoint import Checkpoint, CheckpointManager, _ids
from fastcheckpoint.errors import CorruptCheckpointError
from fastcheckpoint.stores import _s3_layout as layout
from fastcheckpoint.stores._aws import RequestCounter
from fastcheckpoint.stores.s3 import S3Store
from fastcheckpoint.testing import T0, key_of, make_checkpoint, make_run
from tests.stores._moto import moto_endpoint
from tests.stores.s3.test_s3 import DEADLINE, s3_bucket, s3_store

__all__ = ["moto_endpoint", "s3_bucket", "s3_store"]

pytestmark = pytest.mark.anyio

LATER = T0 + 1e9  # the manager runs on the wall clock; the store calls below read at it


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


async def _keys(store: S3Store, prefix: str = "") -> list[str]:
    client = await store.client()
    found = await client.list_objects_v2(Bucket=store.bucket, Prefix=store.prefix + prefix)
    return [entry["Key"][len(store.prefix):] for entry in found.get("Contents", [])]


async def _put(store: S3Store, key: str, body: bytes) -> None:
    client = await store.client()
    await client.put_object(Bucket=store.bucket, Key=store.prefix + key, Body=body)


async def _copy(store: S3Store, source: str, target: str) -> None:
    client = await store.client()
    await client.copy_object(Bucket=store.bucket, Key=store.prefix + target,
                             CopySource={"Bucket": store.bucket, "Key": store.prefix + source})


async def _create(manager: CheckpointManager, run_id: str, n: int) -> Checkpoint:
    created = await manager.create(run_id, {"n": n})
    assert created is not None
    return created


async def _unreadable_bare_slot(store: S3Store, run_key: str, sequence: int) -> str:
    """Remove the slot's markers and overwrite it with bytes that do not decode."""
    client = await store.client()
    for key in await _keys(store, layout.slot_key(run_key, sequence) + "/"):
        await client.delete_object(Bucket=store.bucket, Key=store.prefix + key)
    await _put(store, layout.slot_key(run_key, sequence), b"\x01not a slot")
    return layout.slot_key(run_key, sequence)


# -- a slot without its marker that cannot be read ----------------------------------------------


async def test_unreadable_bare_slot_is_reported_and_repaired_and_spares_other_runs(
    s3_store: S3Store,
) -> None:
    with anyio.fail_after(DEADLINE):
        manager = CheckpointManager(s3_store)
        await _create(manager, "good", 0)
        first = await _create(manager, "broken", 0)
        await _create(manager, "broken", 1)
        await manager.pause("broken", request={"amount": 12})
        key = _ids.key_of("broken")
        bad = await _unreadable_bare_slot(s3_store, key, 1)

        assert [run.run_id for run in (await manager.list_runs()).runs] == ["good"]
        assert await manager.count_runs() == 1
        [damage] = await s3_store.damaged_runs(now=LATER)
        assert (damage.run_key, damage.checkpoints) == (key, 1)
        assert damage.key == f"s3://{s3_store.bucket}/{s3_store.prefix}{bad}"
        assert (await manager.restore_from(first.metadata.checkpoint_id)) is not None
        assert [c.checkpoint_id for c in await manager.list_checkpoints("broken")] == [
            first.metadata.checkpoint_id]
        with pytest.raises(CorruptCheckpointError):
            await manager.get_run("broken")
        before = await _keys(s3_store)
        fresh = CheckpointManager(S3Store(s3_store.bucket, s3_store.prefix,
                                          client=await s3_store.client()))
        with pytest.raises(CorruptCheckpointError):
            await fresh.create("broken", {"n": 2})
        assert await _keys(s3_store) == before  # refused: nothing written

        [report] = await manager.repair()
        assert (report.run_id, report.outcome) == ("broken", "rebuilt")
        # The run object was intact and kept: its status and approval request are not lost
        # (the report said they were, as for a rebuilt record).
        assert report.lost == []
        kept_run = await manager.get_run("broken")
        assert kept_run is not None
        assert kept_run.status.value == "paused"
        assert kept_run.approval is not None
        assert kept_run.approval["request"] == {"amount": 12}
        assert await s3_store.damaged_runs(now=LATER) == []
        kept = await _keys(s3_store, bad)  # the slot stays, marked deleted
        assert kept[0] == bad
        assert [key[len(bad) + 1] for key in kept[1:]] == ["t"]
        following = await _create(fresh, "broken", 2)
        assert following.metadata.sequence == 2  # the unreadable slot's sequence stays taken
        run = await manager.get_run("broken")
        assert run is not None
        assert run.checkpoint_count == 2
        assert sorted(run.run_id for run in (await manager.list_runs()).runs) == [
            "broken", "good"]


async def test_unreadable_old_bare_slot_keeps_the_newer_checkpoints_readable(
    s3_store: S3Store,
) -> None:
    with anyio.fail_after(DEADLINE):
        manager = CheckpointManager(s3_store)
        created = [await _create(manager, "old", n) for n in range(3)]
        await _unreadable_bare_slot(s3_store, _ids.key_of("old"), 0)
        fresh = CheckpointManager(S3Store(s3_store.bucket, s3_store.prefix,
                                          client=await s3_store.client()))
        assert [c.sequence for c in await fresh.list_checkpoints("old")] == [2, 1]
        latest = await fresh.restore("old")
        assert latest is not None
        assert latest.metadata.checkpoint_id == created[2].metadata.checkpoint_id
        with pytest.raises(CorruptCheckpointError):
            await fresh.create("old", {"n": 3})
        [report] = await fresh.repair("old")
        assert report.outcome == "rebuilt"
        assert (await _create(fresh, "old", 3)).metadata.sequence == 3


# -- a run object copied from another run -------------------------------------------------------


async def test_run_object_copied_from_another_run_is_damage_and_repaired(
    s3_store: S3Store,
) -> None:
    with anyio.fail_after(DEADLINE):
        manager = CheckpointManager(s3_store)
        first = await _create(manager, "victim", 0)
        await _create(manager, "foreign", 0)
        victim, foreign = _ids.key_of("victim"), _ids.key_of("foreign")
        await _copy(s3_store, layout.run_object(foreign), layout.run_object(victim))
        fresh = CheckpointManager(S3Store(s3_store.bucket, s3_store.prefix,
                                          client=await s3_store.client()))

        [damage] = await s3_store.damaged_runs(now=LATER)
        assert (damage.run_key, damage.checkpoints) == (victim, 1)
        assert "foreign" in damage.problem
        restored = await fresh.restore("victim")
        assert restored is not None
        assert restored.metadata.checkpoint_id == first.metadata.checkpoint_id
        assert await fresh.restore_from(first.metadata.checkpoint_id) is not None
        assert [run.run_id for run in (await fresh.list_runs()).runs] == ["foreign"]
        before = await _keys(s3_store)
        with pytest.raises(CorruptCheckpointError):
            await fresh.create("victim", {"n": 1})
        assert await _keys(s3_store) == before  # refused: nothing written

        [report] = await fresh.repair()
        assert (report.run_id, report.outcome) == ("victim", "rebuilt")
        assert await s3_store.damaged_runs(now=LATER) == []
        run = await fresh.get_run("victim")
        assert run is not None
        assert (run.run_id, run.latest_sequence, run.checkpoint_count) == ("victim", 0, 1)
        assert (await _create(fresh, "victim", 1)).metadata.sequence == 1
        assert await fresh.restore_from(first.metadata.checkpoint_id) is not None
        foreign_run = await fresh.get_run("foreign")
        assert foreign_run is not None
        assert foreign_run.checkpoint_count == 1
        assert sorted(run.run_id for run in (await fresh.list_runs()).runs) == [
            "foreign", "victim"]


# -- a label index entry copied from another label ----------------------------------------------


async def test_label_entry_copied_from_another_label_lists_nothing(s3_store: S3Store) -> None:
    with anyio.fail_after(DEADLINE):
        labelled_x = msgspec.structs.replace(make_run("la"), labels=("x",))
        labelled_y = msgspec.structs.replace(make_run("lb", created_at=T0 + 1), labels=("y",))
        for run in (labelled_x, labelled_y):
            await s3_store.append(key_of(run), make_checkpoint(run, 0), run=run,
                                  keep_latest=None, now=T0)
        [entry] = await _keys(s3_store, layout.label_prefix("x"))
        copied = layout.label_prefix("y") + entry[len(layout.label_prefix("x")):]
        await _copy(s3_store, entry, copied)

        client = await s3_store.client()
        with RequestCounter.attached(client) as counted:
            runs, cursor = await s3_store.runs_with_label("y", limit=10, cursor=None, now=T0)
        assert ([run.run_id for run in runs], cursor) == (["lb"], None)
        with RequestCounter.attached(client) as uncounted:
            await s3_store.runs_with_label("x", limit=10, cursor=None, now=T0)
        assert counted.total == uncounted.total + 1  # the copied entry's run read, nothing more
        runs, _ = await s3_store.runs_with_label("x", limit=10, cursor=None, now=T0)
        assert [run.run_id for run in runs] == ["la"]
