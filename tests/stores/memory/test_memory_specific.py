"""MemoryStore beyond the contract: bookkeeping stays proportional to what is held, not to
history; options are refused by name; repair finds nothing to rebuild; the one item-key limit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import msgspec
import pytest

from fastcheckpoint import CheckpointConfig, CheckpointManager, MemoryStore
from fastcheckpoint.errors import (
    CheckpointNotFound,
    ConfigurationError,
    ConflictError,
    ValidationError,
)
from fastcheckpoint.stores import RunRecord, StoredCheckpoint, SupportsRepair, open_store
from fastcheckpoint.testing import (
    T0,
    checkpoint_id_of,
    key_of,
    make_checkpoint,
    make_item,
    make_run,
)
from tests._helpers import FakeClock

pytestmark = pytest.mark.anyio


async def test_expiry_heaps_stay_bounded_by_retained_checkpoints() -> None:
    clock = FakeClock()
    store = MemoryStore()
    config = CheckpointConfig(
        max_checkpoints_per_run=10, default_ttl_seconds=90 * 86400, clock=clock
    )
    manager = CheckpointManager(store, config)
    with anyio.fail_after(30):
        for i in range(3_000):
            await manager.create("run", {"i": i})
            clock.advance(1)
    (run,) = store._runs.values()
    assert len(run.checkpoints) == 10
    assert len(run.expiring) <= 2 * 10 + 16
    assert len(store._due) <= 2


async def test_new_runs_are_appended_to_the_run_order_not_inserted_at_the_front() -> None:
    clock = FakeClock()
    store = MemoryStore()
    manager = CheckpointManager(store, CheckpointConfig(clock=clock))
    with anyio.fail_after(30):
        for i in range(50):
            await manager.create(f"run-{i}", {})
            clock.advance(1)
    order = store._order[None]
    assert order == sorted(order)
    assert order[-1][0] == max(created for created, _ in order)
    page = await manager.list_runs(limit=3)
    assert [info.run_id for info in page] == ["run-49", "run-48", "run-47"]


async def test_count_runs_is_exact_without_removing_anything() -> None:
    clock = FakeClock()
    store = MemoryStore()
    manager = CheckpointManager(store, CheckpointConfig(clock=clock))
    with anyio.fail_after(30):
        for i in range(20):
            await manager.create(f"short-{i}", {}, ttl_seconds=10)
            await manager.create(f"long-{i}", {})
        assert await manager.count_runs() == 40
        clock.advance(11)
        assert await manager.count_runs() == 20
        assert await manager.count_runs("active") == 20
        assert len(store._runs) == 40  # a read removes nothing; the cleanup loop does
        await manager.cleanup_expired()
        assert len(store._runs) == 20
        assert await manager.count_runs() == 20


@pytest.mark.parametrize(("url", "options"), [("memory://?x=1", {}), ("memory://", {"x": 1})])
def test_options_are_refused_by_name(url: str, options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError) as caught:
        open_store(url, **options)
    assert str(caught.value) == "unknown option 'x' for the memory:// store. Known options: none."


async def test_repair_finds_nothing_to_rebuild() -> None:
    """Records are Python objects no crash leaves half written: nothing is ever damaged, and
    the manager's repair() answers that instead of refusing the store."""
    clock = FakeClock()
    store = MemoryStore()
    manager = CheckpointManager(store, CheckpointConfig(clock=clock))
    assert isinstance(store, SupportsRepair)
    with anyio.fail_after(30):
        await manager.create("run", {"step": 1})
        assert await store.damaged_runs(now=clock()) == []
        assert await manager.repair() == []
        assert await manager.repair("run") == []
        with pytest.raises(ConflictError):
            await store.rebuild_run(key_of(make_run("run")), make_run("run"), now=clock())
        with pytest.raises(CheckpointNotFound):
            await store.rebuild_run(key_of(make_run("none")), make_run("none"), now=clock())


@pytest.mark.parametrize("value", ["run-abc123", "abc/c/0000", "", "a" * 65, 42])
async def test_repair_refuses_what_is_not_a_run_key(value: Any) -> None:
    """What ``RepairContract`` checks on the stores that can be damaged."""
    store = MemoryStore()
    with anyio.fail_after(10):
        with pytest.raises(ValidationError):
            await store.damaged_runs(run_key=value, now=T0)
        with pytest.raises(ValidationError):
            await store.rebuild_run(value, make_run("run"), now=T0)


# -- adapter capabilities ---------------------------------------------------------------------


def _with_refs(run: RunRecord, sequence: int, refs: Sequence[str]) -> StoredCheckpoint:
    return msgspec.structs.replace(make_checkpoint(run, sequence), refs=refs)


async def _write_item(store: MemoryStore, run: RunRecord, write: str, item_key: str) -> None:
    """Write one item at ``item_key`` by the write path ``write`` (checkpoint 0 is held)."""
    key = key_of(run)
    if write == "put_items":
        await store.put_items(key, [make_item(item_key)], now=T0)
    elif write == "append_with_items":
        await store.append_with_items(key, make_checkpoint(run, 1), run=run, keep_latest=None,
                                      now=T0, items=[make_item(item_key, owner=1)])
    else:
        await store.put_owned_items(key, [make_item(item_key, owner=0)], owner=0,
                                    checkpoint_id=checkpoint_id_of(run, 0), if_absent=False,
                                    now=T0)


@pytest.mark.parametrize("write", ["put_items", "append_with_items", "put_owned_items"])
async def test_item_keys_longer_than_128_bytes_are_refused_everywhere(write: str) -> None:
    """The one item-key limit of every store; memory used to take any length."""
    store = MemoryStore()
    run = make_run("long-keys")
    longest, too_long = "é" * 64, "é" * 64 + "x"  # 128 and 129 bytes of UTF-8
    with anyio.fail_after(10):
        await store.append(key_of(run), make_checkpoint(run, 0), run=run, keep_latest=None,
                           now=T0)
        with pytest.raises(ValidationError, match="129 bytes"):
            await _write_item(store, run, write, too_long)
        assert await store.get_items(key_of(run), [too_long], now=T0) == {}
        run_now = await store.get_run(key_of(run), now=T0)
        assert run_now is not None
        assert run_now.latest_sequence == 0
        await _write_item(store, run, write, longest)
        assert list(await store.get_items(key_of(run), [longest], now=T0)) == [longest]


async def test_label_lists_and_reference_counts_hold_only_what_is_held() -> None:
    """Bookkeeping stays proportional to what is held: labels of deleted and purged runs,
    and the counts and items of pruned checkpoints, leave nothing behind."""
    store = MemoryStore()
    with anyio.fail_after(30):
        for index in range(50):
            run = msgspec.structs.replace(make_run(f"run-{index}"), labels=(f"thread:{index}",))
            await store.append(key_of(run), make_checkpoint(run, 0), run=run, keep_latest=None,
                               now=T0)
            if index % 2:
                await store.delete_run(key_of(run))
        assert len(store._labels) == 25
        run = make_run("long")
        for sequence in range(500):
            refs = ("b/all", f"b/{sequence}", *([f"b/{sequence - 1}"] if sequence else []))
            items = [make_item("b/all"), make_item(f"b/{sequence}"),
                     make_item(f"w/{sequence}", owner=sequence)]
            await store.append_with_items(key_of(run), _with_refs(run, sequence, refs), run=run,
                                          keep_latest=3, now=T0, items=items)
    space = store._items[key_of(run)]
    assert space.refs == {"b/all": 3, "b/496": 1, "b/497": 2, "b/498": 2, "b/499": 1}
    assert sorted(space.items) == sorted([*space.refs, "w/497", "w/498", "w/499"])


async def test_refs_are_copied_not_aliased() -> None:
    store = MemoryStore()
    run = make_run("aliased")
    refs = ["b/a"]
    with anyio.fail_after(10):
        await store.append_with_items(key_of(run), _with_refs(run, 0, refs), run=run,
                                      keep_latest=None, now=T0, items=[make_item("b/a")])
        refs.append("b/b")
        found = await store.read_with_items(key_of(run), sequence=0, now=T0)
    assert found is not None
    assert found[0].refs == ("b/a",)
    assert found[2] == {"b/a": b"value-b/a"}


async def test_a_new_life_of_a_run_reads_its_own_shared_items() -> None:
    """An expired run started over drops the earlier life's shared items, so a key written
    again (versions count from 1 in each life) holds this life's value."""
    store = MemoryStore()
    first, second = make_run("lives"), make_run("lives")
    key = key_of(first)
    with anyio.fail_after(10):
        record = msgspec.structs.replace(_with_refs(first, 0, ["b/1"]), expires_at=T0 + 5)
        await store.append_with_items(key, record, run=first, keep_latest=None, now=T0,
                                      items=[make_item("b/1", b"first life")])
        await store.append_with_items(key, _with_refs(second, 0, ["b/1"]), run=second,
                                      keep_latest=None, now=T0 + 5,
                                      items=[make_item("b/1", b"second life")])
        found = await store.read_with_items(key, sequence=None, now=T0 + 5)
    assert found is not None
    assert found[2] == {"b/1": b"second life"}
