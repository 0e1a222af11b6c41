"""The ``SupportsRepair`` contract: damaged run records never hide intact checkpoints, and
are rebuilt from the log.

A backend's test class subclasses :class:`RepairContract` and provides, besides ``store``, a
``damage_run_record`` fixture: an async callable ``(store, run_key) -> None`` that makes the
run's record undecodable in place (garbage bytes, a failed checksum), the way a disk or an
operator would.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec
import pytest

from fastcheckpoint.errors import CheckpointNotFound, ConflictError, CorruptCheckpointError
from fastcheckpoint.stores._base import CheckpointStore, RunRecord, SupportsRepair
from fastcheckpoint.testing._builders import T0, checkpoint_id_of, key_of, make_checkpoint, make_run
from fastcheckpoint.testing._contract import (
    ContractBase,
    _append,
    _append_many,
    _not_run_keys,
    _refuses_not_run_keys,
    _sequences,
)

__all__ = ["DamageRunRecord", "RepairContract"]

DamageRunRecord = Callable[[CheckpointStore, str], Awaitable[None]]
"""``await damage(store, run_key)``: make the run's record unreadable in place."""

_LATER = T0 + 100.0


def _seed_for(run: RunRecord, *, status: str = "paused", data: bytes = b"rebuilt") -> RunRecord:
    """What the manager passes to ``rebuild_run``: the run id, a status and new run details."""
    return msgspec.structs.replace(
        run, incarnation="", status=status, data=data, created_at=_LATER, updated_at=_LATER
    )


class RepairContract(ContractBase):
    """Subclass with ``store`` and ``damage_run_record`` fixtures (see the module docstring)."""

    @pytest.fixture
    def damage_run_record(self) -> DamageRunRecord:
        raise NotImplementedError(
            f"{type(self).__name__} must provide a `damage_run_record` fixture: an async "
            "callable (store, run_key) that corrupts the run's record in place"
        )

    async def _damaged(
        self, store: CheckpointStore, damage: DamageRunRecord, name: str, count: int = 3,
        *, expires_at: float | None = None,
    ) -> RunRecord:
        run = make_run(name)
        await _append_many(store, run, range(count), expires_at=expires_at)
        await damage(store, key_of(run))
        return run

    async def test_store_offers_repair(self, store: CheckpointStore) -> None:
        assert isinstance(store, SupportsRepair)

    async def test_damaged_record_hides_no_checkpoint(
        self, store: CheckpointStore, damage_run_record: DamageRunRecord
    ) -> None:
        run = await self._damaged(store, damage_run_record, "hides-nothing")
        key = key_of(run)

        for sequence in range(3):
            found = await store.get(key, sequence, now=T0)
            assert found is not None
            assert found[0].checkpoint_id == checkpoint_id_of(run, sequence)
            assert found[0].payload == make_checkpoint(run, sequence).payload
            assert found[1] == "active"
        latest = await store.latest(key, now=T0)
        assert latest is not None
        assert latest[0].sequence == 2
        assert await _sequences(store, run, now=T0) == [2, 1, 0]

    async def test_damaged_record_keeps_expiry_of_checkpoints(
        self, store: CheckpointStore, damage_run_record: DamageRunRecord
    ) -> None:
        run = await self._damaged(
            store, damage_run_record, "expiring", expires_at=T0 + 10.0)
        key = key_of(run)

        assert await store.get(key, 1, now=T0 + 5.0) is not None
        assert await store.get(key, 1, now=T0 + 10.0) is None
        assert await store.latest(key, now=T0 + 10.0) is None

    async def test_damaged_runs_names_the_run(
        self, store: CheckpointStore, damage_run_record: DamageRunRecord
    ) -> None:
        assert isinstance(store, SupportsRepair)
        intact = make_run("intact")
        await _append_many(store, intact, range(2))
        run = await self._damaged(store, damage_run_record, "named")

        [damage] = await store.damaged_runs(run_key=key_of(run), now=T0)
        assert damage.run_key == key_of(run)
        assert damage.checkpoints == 3
        assert damage.newest is not None
        assert damage.newest.sequence == 2
        assert damage.newest.header == make_checkpoint(run, 2).header
        assert damage.key
        assert damage.problem
        assert await store.damaged_runs(run_key=key_of(intact), now=T0) == []
        everywhere = await store.damaged_runs(now=T0)
        assert [found.run_key for found in everywhere] == [key_of(run)]

    async def test_reading_a_damaged_run_record_is_corrupt(
        self, store: CheckpointStore, damage_run_record: DamageRunRecord
    ) -> None:
        run = await self._damaged(store, damage_run_record, "unreadable")

        with pytest.raises(CorruptCheckpointError):
            await store.get_run(key_of(run), now=T0)

    async def test_writes_to_a_damaged_run_are_refused(
        self, store: CheckpointStore, damage_run_record: DamageRunRecord
    ) -> None:
        run = await self._damaged(store, damage_run_record, "refused")
        key = key_of(run)

        with pytest.raises(CorruptCheckpointError):
            await _append(store, run, 3, now=_LATER)
        with pytest.raises(CorruptCheckpointError):
            await store.update_run(key, incarnation=run.incarnation, version=0,
                                   status="completed", data=b"", now=_LATER)
        with pytest.raises(CorruptCheckpointError):
            await store.delete(key, 1, checkpoint_id=checkpoint_id_of(run, 1))
        assert await _sequences(store, run, now=_LATER) == [2, 1, 0]

    async def test_listings_skip_a_damaged_run(
        self, store: CheckpointStore, damage_run_record: DamageRunRecord
    ) -> None:
        intact = make_run("listed")
        await _append_many(store, intact, range(1))
        await self._damaged(store, damage_run_record, "unlisted")

        runs, _ = await store.list_runs(status=None, limit=100, cursor=None, now=T0)
        assert [record.run_id for record in runs] == ["listed"]
        assert await store.count_runs(status=None, now=T0) == 1

    async def test_rebuild_derives_the_record_from_the_log(
        self, store: CheckpointStore, damage_run_record: DamageRunRecord
    ) -> None:
        assert isinstance(store, SupportsRepair)
        run = await self._damaged(store, damage_run_record, "rebuilt", 4)
        key = key_of(run)

        rebuilt = await store.rebuild_run(key, _seed_for(run), now=_LATER)

        assert rebuilt.run_id == run.run_id
        assert rebuilt.incarnation == run.incarnation
        assert rebuilt.status == "paused"
        assert rebuilt.data == b"rebuilt"
        assert rebuilt.latest_sequence == 3
        assert rebuilt.checkpoint_count == 4
        assert rebuilt.expires_at is None
        assert rebuilt.created_at == T0
        assert rebuilt.updated_at == _LATER
        assert await store.get_run(key, now=_LATER) == rebuilt
        assert await store.damaged_runs(run_key=key, now=_LATER) == []
        runs, _ = await store.list_runs(status="paused", limit=10, cursor=None, now=_LATER)
        assert [record.run_id for record in runs] == [run.run_id]

    async def test_creates_continue_after_a_rebuild(
        self, store: CheckpointStore, damage_run_record: DamageRunRecord
    ) -> None:
        assert isinstance(store, SupportsRepair)
        run = await self._damaged(store, damage_run_record, "continued")
        key = key_of(run)
        rebuilt = await store.rebuild_run(key, _seed_for(run, status="active"), now=_LATER)

        await _append(store, run, 3, now=_LATER)
        updated = await store.update_run(key, incarnation=rebuilt.incarnation,
                                         version=rebuilt.version, status="completed",
                                         data=b"done", now=_LATER)

        assert updated.status == "completed"
        assert await _sequences(store, run, now=_LATER) == [3, 2, 1, 0]
        record = await store.get_run(key, now=_LATER)
        assert record is not None
        assert record.latest_sequence == 3
        assert record.checkpoint_count == 4

    async def test_rebuild_keeps_the_latest_expiry(
        self, store: CheckpointStore, damage_run_record: DamageRunRecord
    ) -> None:
        assert isinstance(store, SupportsRepair)
        run = make_run("rebuilt-expiry")
        await _append(store, run, 0, expires_at=T0 + 50.0)
        await _append(store, run, 1, expires_at=T0 + 500.0)
        await _append(store, run, 2, expires_at=T0 + 200.0)
        await damage_run_record(store, key_of(run))

        rebuilt = await store.rebuild_run(key_of(run), _seed_for(run), now=T0 + 1.0)

        assert rebuilt.expires_at == T0 + 500.0
        assert rebuilt.latest_sequence == 2

    async def test_rebuild_of_an_intact_record_is_a_conflict(
        self, store: CheckpointStore
    ) -> None:
        assert isinstance(store, SupportsRepair)
        run = make_run("intact-record")
        await _append_many(store, run, range(2))
        before = await store.get_run(key_of(run), now=T0)

        with pytest.raises(ConflictError):
            await store.rebuild_run(key_of(run), _seed_for(run), now=_LATER)
        assert await store.get_run(key_of(run), now=T0) == before

    async def test_rebuild_without_a_run_is_not_found(self, store: CheckpointStore) -> None:
        assert isinstance(store, SupportsRepair)
        run = make_run("never-written")

        with pytest.raises((CheckpointNotFound, ConflictError)):
            await store.rebuild_run(key_of(run), _seed_for(run), now=_LATER)
        assert await store.get_run(key_of(run), now=_LATER) is None

    async def test_delete_run_removes_a_damaged_run(
        self, store: CheckpointStore, damage_run_record: DamageRunRecord
    ) -> None:
        assert isinstance(store, SupportsRepair)
        run = await self._damaged(store, damage_run_record, "deleted")
        key = key_of(run)

        await store.delete_run(key)

        assert await store.latest(key, now=T0) is None
        assert await store.damaged_runs(run_key=key, now=T0) == []
        await _append(store, make_run("deleted"), 0)
        assert await store.latest(key, now=T0) is not None

    async def test_repair_refuses_what_is_not_a_run_key(self, store: CheckpointStore) -> None:
        """``run_key=None`` asks for every run; any other value must be a run key."""
        assert isinstance(store, SupportsRepair)
        seed = make_run("addressed")
        await _append_many(store, seed, range(2))
        values = [value for value in _not_run_keys(key_of(seed)) if value is not None]

        await _refuses_not_run_keys(store, seed, lambda value: store.damaged_runs(
            run_key=value, now=T0), values=values)
        await _refuses_not_run_keys(store, seed, lambda value: store.rebuild_run(
            value, _seed_for(seed), now=_LATER))
