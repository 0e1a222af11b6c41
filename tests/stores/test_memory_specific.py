"""MemoryStore beyond the contract: bookkeeping stays proportional to what is held, not to
history; options are refused by name; repair finds nothing to rebuild."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from fastcheckpoint import CheckpointConfig, CheckpointManager, MemoryStore
from fastcheckpoint.errors import CheckpointNotFound, ConfigurationError, ConflictError
from fastcheckpoint.stores import SupportsRepair, open_store
from fastcheckpoint.testing import key_of, make_run
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
