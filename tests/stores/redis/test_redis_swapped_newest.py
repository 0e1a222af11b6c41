"""RedisStore when a run's newest checkpoint hash is one of another run swapped in (same
sequence, the other run's bytes): that checkpoint alone is damaged. It never contradicts the
run record, creates go on at the next sequence, and a repair of a record damaged for another
reason rebuilds it from the run's own newest checkpoint."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from fastcheckpoint import Checkpoint, CheckpointConfig, CheckpointManager
from fastcheckpoint._ids import parse_checkpoint_id
from fastcheckpoint.errors import CorruptCheckpointError
from fastcheckpoint.stores.redis import RedisStore
from fastcheckpoint.testing import T0, key_of, make_run
from tests.stores._redis_support import make_store, real_server
from tests.stores.conftest import RedisTarget

pytestmark = pytest.mark.anyio

_DEADLINE = 20
_HELD = 5  # checkpoints 0..4 of each run


@pytest.fixture
def anyio_backend() -> str:
    # redis.asyncio runs on asyncio only.
    return "asyncio"


def _manager(store: RedisStore) -> CheckpointManager:
    config = CheckpointConfig(max_checkpoints_per_run=None, clock=lambda: T0)
    return CheckpointManager(store, config=config)


def _key(prefix: str, run_id: str, name: str) -> str:
    return f"{prefix}:{{{key_of(make_run(run_id))}}}:{name}"


def _incarnation(checkpoint: Checkpoint) -> str:
    parsed = parse_checkpoint_id(checkpoint.checkpoint_id)
    assert parsed is not None
    return parsed[1]


async def _swap_newest(store: RedisStore, prefix: str) -> tuple[list[Checkpoint], str]:
    """Runs a and b with checkpoints 0..4 each, then their checkpoint hashes 4 swapped
    (DUMP/RESTORE: across slots). Returns a's checkpoints and a's swapped key."""
    manager = _manager(store)
    ours = [await manager.create("a", {"run": "a", "n": n}) for n in range(_HELD)]
    for n in range(_HELD):
        await manager.create("b", {"run": "b", "n": n})
    mine, theirs = _key(prefix, "a", f"c:{_HELD - 1}"), _key(prefix, "b", f"c:{_HELD - 1}")
    client: Any = store._client
    mine_bytes, theirs_bytes = await client.dump(mine), await client.dump(theirs)
    await client.restore(mine, 0, theirs_bytes, replace=True)
    await client.restore(theirs, 0, mine_bytes, replace=True)
    assert all(checkpoint is not None for checkpoint in ours)
    return [checkpoint for checkpoint in ours if checkpoint is not None], mine


@pytest.mark.parametrize("cluster_path", [False, True], ids=["plain", "cluster-code-path"])
async def test_creates_go_on_past_a_newest_checkpoint_of_another_run(
    prefixed: tuple[RedisTarget, str], cluster_path: bool
) -> None:
    """The swapped-in newest is refused where it is read; the run record stands, a create
    (from a manager that knows nothing, like another process) lands at the next sequence,
    older checkpoints restore, and the new checkpoint is the run's newest. So for both runs."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix, cluster=cluster_path)
    with anyio.fail_after(_DEADLINE):
        ours, swapped = await _swap_newest(store, prefix)
        manager = _manager(store)
        with pytest.raises(CorruptCheckpointError) as refused:
            await manager.restore("a")
        created = await manager.create("a", {"run": "a", "n": _HELD})
        theirs = await manager.create("b", {"run": "b", "n": _HELD})
        older = await manager.restore_from(ours[2].checkpoint_id)
        newest = await manager.restore("a")
        listed = await manager.list_checkpoints("a")
        info = await manager.get_run("a")
        await store.aclose()
    assert refused.value.key == swapped
    assert created is not None
    assert theirs is not None
    assert (created.metadata.sequence, theirs.metadata.sequence) == (_HELD, _HELD)
    assert _incarnation(created) == _incarnation(ours[0])
    assert older is not None
    assert older.state == {"run": "a", "n": 2}
    assert newest is not None
    assert (newest.checkpoint_id, newest.state) == (created.checkpoint_id, {"run": "a", "n": 5})
    assert [meta.sequence for meta in listed] == [5, 3, 2, 1, 0]
    assert info is not None
    assert info.latest_sequence == _HELD


async def _remove(store: RedisStore, run_hash: str) -> None:
    await store._client.delete(run_hash)


async def _replace_with_text(store: RedisStore, run_hash: str) -> None:
    await store._client.set(run_hash, "not a hash")


@pytest.mark.parametrize("damage", [_remove, _replace_with_text], ids=["gone", "foreign-value"])
@pytest.mark.parametrize("cluster_path", [False, True], ids=["plain", "cluster-code-path"])
async def test_repair_rebuilds_the_run_from_its_own_newest_checkpoint(
    prefixed: tuple[RedisTarget, str], cluster_path: bool, damage: Any
) -> None:
    """With the run record damaged too, damaged_runs names the run's own newest checkpoint
    (3, not the swapped-in 4), and the repair rebuilds the record with the incarnation of the
    run's checkpoints: never 'unrecoverable'. Creates then go on at the next sequence."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix, cluster=cluster_path)
    with anyio.fail_after(_DEADLINE):
        ours, swapped = await _swap_newest(store, prefix)
        await damage(store, _key(prefix, "a", "run"))
        manager = _manager(store)
        with pytest.raises(CorruptCheckpointError):
            await manager.create("a", {"run": "a", "n": _HELD})
        found = await store.damaged_runs(run_key=key_of(make_run("a")), now=T0)
        reports = await manager.repair("a")
        record = await store.get_run(key_of(make_run("a")), now=T0)
        created = await manager.create("a", {"run": "a", "n": _HELD})
        newest = await manager.restore("a")
        await store.aclose()
    assert [(damage.checkpoints, damage.newest and damage.newest.checkpoint_id)
            for damage in found] == [(_HELD, ours[3].checkpoint_id)]
    assert f"{swapped} has an id of another run" in found[0].problem
    assert [(report.outcome, report.run_id) for report in reports] == [("rebuilt", "a")]
    assert record is not None
    assert (record.incarnation, record.latest_sequence) == (_incarnation(ours[0]), _HELD - 1)
    assert record.created_at == ours[0].metadata.created_at
    assert created is not None
    assert created.metadata.sequence == _HELD
    assert newest is not None
    assert newest.checkpoint_id == created.checkpoint_id


async def test_a_record_of_another_incarnation_is_still_damage_past_the_swapped_newest(
    prefixed: tuple[RedisTarget, str],
) -> None:
    """The record is judged by the run's own newest checkpoint below the swapped-in one: a
    record naming another incarnation than the run's checkpoints is refused, and repaired."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix)
    run_hash = _key(prefix, "a", "run")
    with anyio.fail_after(_DEADLINE):
        ours, _ = await _swap_newest(store, prefix)
        own = _incarnation(ours[0])
        other = "a" * len(own) if own != "a" * len(own) else "b" * len(own)
        member = (await store._client.hget(run_hash, "m")).decode()
        await store._client.hset(run_hash, mapping={"inc": other,
                                                    "m": member[: -len(own)] + other})
        manager = _manager(store)
        with pytest.raises(CorruptCheckpointError, match=f"belongs to {own}") as refused:
            await manager.create("a", {"run": "a", "n": _HELD})
        reports = await manager.repair("a")
        created = await manager.create("a", {"run": "a", "n": _HELD})
        await store.aclose()
    assert refused.value.key == run_hash
    assert [report.outcome for report in reports] == ["rebuilt"]
    assert created is not None
    assert (created.metadata.sequence, _incarnation(created)) == (_HELD, own)
