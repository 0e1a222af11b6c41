"""The store contract: removing checkpoints and runs, and what removal does to a run's expiry."""

from __future__ import annotations

import pytest

from fastcheckpoint.errors import SequenceConflict, ValidationError
from fastcheckpoint.stores._base import CheckpointStore, RunRecord
from fastcheckpoint.testing._builders import (
    T0,
    checkpoint_id_of,
    key_of,
    make_item,
    make_run,
    without_key,
)
from fastcheckpoint.testing._contract import (
    ContractBase,
    _append,
    _append_many,
    _delete,
    _expected_run,
    _refuses_not_run_keys,
    _sequences,
    _snapshot,
)

__all__ = ["DeleteContract"]


class DeleteContract(ContractBase):
    """``delete`` and ``delete_run``, and a run's expiry after checkpoints are removed.

    ``delete`` removes one checkpoint (with its owned items) only when its id matches, and its
    sequence is never reused; ``delete_run`` removes everything of a run. Whenever checkpoints go
    (``delete`` or pruning), the run's ``expires_at`` stays the latest expiry it still holds, so
    an emptied run disappears like an expired one: from reads, ``list_runs`` and ``count_runs``,
    and for good after ``purge_expired``.
    """

    # -- delete -------------------------------------------------------------------------------

    async def test_delete_returns_whether_it_removed_one(self, store: CheckpointStore) -> None:
        seed = make_run("deleting")
        key = key_of(seed)
        written = await _append_many(store, seed, range(4))

        assert await _delete(store, seed, 1) is True
        assert await _delete(store, seed, 1) is False
        assert await _delete(store, seed, 9) is False
        assert await _delete(store, make_run("elsewhere"), 0) is False

        assert await store.get(key, 1, now=T0) is None
        assert await _sequences(store, seed, now=T0, include_expired=True) == [3, 2, 0]
        for record in (written[0], written[2], written[3]):
            found = await store.get(key, record.sequence, now=T0)
            assert found is not None
            assert without_key(found[0]) == record
        run = await store.get_run(key, now=T0)
        assert run is not None
        assert run.checkpoint_count == 3

    async def test_delete_of_a_sequence_that_is_no_int_is_refused(
        self, store: CheckpointStore
    ) -> None:
        seed = make_run("typed-delete")
        key = key_of(seed)
        written = await _append(store, seed, 0)
        for wrong in ("0", 0.0, True, None, 2**64):
            with pytest.raises(ValidationError):
                await store.delete(key, wrong,  # type: ignore[arg-type]
                                   checkpoint_id=written.checkpoint_id)
        assert await store.get(key, 0, now=T0) is not None
        assert await store.delete(key, -1, checkpoint_id=written.checkpoint_id) is False

    async def test_delete_with_another_id_removes_nothing(self, store: CheckpointStore) -> None:
        seed = make_run("guarded")
        key = key_of(seed)
        await _append_many(store, seed, range(3))
        await store.put_items(key, [make_item("owned", owner=1)], now=T0)
        before = await _snapshot(store, seed, now=T0)
        other_incarnation = make_run("guarded")

        assert await _delete(store, other_incarnation, 1) is False
        assert await store.delete(key, 1, checkpoint_id=checkpoint_id_of(seed, 2)) is False

        assert await _snapshot(store, seed, now=T0) == before

    async def test_delete_with_id_of_a_deleted_run(self, store: CheckpointStore) -> None:
        old = make_run("recycled")
        key = key_of(old)
        await _append_many(store, old, range(2))
        assert await store.delete_run(key) == 2
        new = make_run("recycled")
        await _append_many(store, new, range(2))
        before = await _snapshot(store, new, now=T0)

        assert await _delete(store, old, 0) is False

        assert await _snapshot(store, new, now=T0) == before

    async def test_delete_removes_owned_items(self, store: CheckpointStore) -> None:
        seed = make_run("delete-owned")
        key = key_of(seed)
        await _append_many(store, seed, [0, 1])
        await store.put_items(
            key, [make_item("a", owner=0), make_item("b", owner=1), make_item("c")], now=T0
        )

        assert await _delete(store, seed, 0) is True

        assert await store.get_items(key, ["a", "b", "c"], now=T0) == {
            "b": b"value-b",
            "c": b"value-c",
        }

    async def test_delete_latest_does_not_reuse_its_sequence(self, store: CheckpointStore) -> None:
        seed = make_run("no-reuse")
        await _append_many(store, seed, [0, 1, 2])
        assert await _delete(store, seed, 2) is True

        with pytest.raises(SequenceConflict) as caught:
            await _append(store, seed, 2)
        assert caught.value.latest_sequence == 2
        await _append(store, seed, 3)
        assert await _sequences(store, seed, now=T0) == [3, 1, 0]

    async def test_delete_run_removes_everything(self, store: CheckpointStore) -> None:
        seed = make_run("doomed")
        survivor = make_run("survivor")
        key = key_of(seed)
        await _append_many(store, seed, range(5))
        await _append_many(store, survivor, range(2))
        await store.put_items(key, [make_item("owned", owner=4), make_item("free")], now=T0)
        await store.put_items(key_of(survivor), [make_item("free")], now=T0)

        assert await store.delete_run(key) == 5

        assert await store.get_run(key, now=T0) is None
        assert await store.latest(key, now=T0) is None
        assert await store.get(key, 0, now=T0) is None
        assert await store.headers(key, before=None, limit=10, now=T0, include_expired=True) == (
            [],
            None,
        )
        assert await store.get_items(key, ["owned", "free"], now=T0) == {}
        assert await store.scan_items(key, now=T0) == []
        runs, _ = await store.list_runs(status=None, limit=10, cursor=None, now=T0)
        assert [run.run_id for run in runs] == ["survivor"]
        assert await store.count_runs(status=None, now=T0) == 1
        assert await _sequences(store, survivor, now=T0) == [1, 0]
        assert await store.get_items(key_of(survivor), ["free"], now=T0) == {"free": b"value-free"}

    async def test_delete_run_of_absent_run_returns_zero(self, store: CheckpointStore) -> None:
        assert await store.delete_run(key_of(make_run("never"))) == 0

    async def test_append_after_delete_run_starts_at_zero(self, store: CheckpointStore) -> None:
        old = make_run("reused")
        key = key_of(old)
        await _append_many(store, old, range(3))
        assert await store.delete_run(key) == 3

        with pytest.raises(SequenceConflict) as caught:
            await _append(store, old, 3)
        assert caught.value.latest_sequence is None
        new = make_run("reused", created_at=T0 + 1)
        fresh = await _append(store, new, 0, now=T0 + 1)

        assert await store.get_run(key, now=T0 + 1) == _expected_run(
            new, latest_sequence=0, checkpoint_count=1, updated_at=T0 + 1, expires_at=None
        )
        found = await store.get(key, 0, now=T0 + 1)
        assert found is not None
        assert without_key(found[0]) == fresh
        assert await _sequences(store, new, now=T0 + 1, include_expired=True) == [0]


    # -- run expiry follows the checkpoints the run holds ----------------------------------------

    async def _assert_vanishes(
        self, store: CheckpointStore, run: RunRecord, bystander: RunRecord, *, at: float
    ) -> None:
        """``run`` is absent from ``at`` on, like an expired run, and purging removes it."""
        key = key_of(run)
        assert await store.get_run(key, now=at) is None
        assert await store.latest(key, now=at) is None
        assert await store.headers(key, before=None, limit=10, now=at) == ([], None)
        # Hidden, not yet removed: the record still counts for include_expired.
        _, status = await store.headers(key, before=None, limit=10, now=at, include_expired=True)
        assert status == run.status
        runs, _ = await store.list_runs(status=None, limit=10, cursor=None, now=at)
        assert [listed.run_id for listed in runs] == [bystander.run_id]
        assert await store.count_runs(status=None, now=at) == 1
        assert await store.count_runs(status=run.status, now=at) == int(
            bystander.status == run.status
        )

        for _ in range(100):
            _, done = await store.purge_expired(now=at, limit=10)
            if done:
                break
        else:
            raise AssertionError("purge_expired never reported done")

        # Read at T0, when it was live: the record is gone, not just hidden.
        assert await store.get_run(key, now=T0) is None
        assert await store.headers(key, before=None, limit=10, now=T0, include_expired=True) == (
            [],
            None,
        )
        assert await store.get_run(key_of(bystander), now=at) is not None
        runs, _ = await store.list_runs(status=None, limit=10, cursor=None, now=T0)
        assert [listed.run_id for listed in runs] == [bystander.run_id]

    async def _bystander(self, store: CheckpointStore) -> RunRecord:
        """A run that never expires, created before the run under test."""
        bystander = make_run("bystander", created_at=T0 - 1)
        await _append(store, bystander, 0, now=T0 - 1)
        return bystander

    async def test_pruning_the_only_never_expiring_checkpoint_lets_the_run_expire(
        self, store: CheckpointStore
    ) -> None:
        bystander = await self._bystander(store)
        seed = make_run("no-zombie")
        key = key_of(seed)
        await _append(store, seed, 0)
        await _append(store, seed, 1, expires_at=T0 + 20)
        run = await store.get_run(key, now=T0)
        assert run is not None
        assert run.expires_at is None

        await _append(store, seed, 2, expires_at=T0 + 10, keep_latest=2)

        assert await _sequences(store, seed, now=T0, include_expired=True) == [2, 1]
        assert await store.get_run(key, now=T0) == _expected_run(
            seed, latest_sequence=2, checkpoint_count=2, updated_at=T0, expires_at=T0 + 20
        )
        assert await store.get_run(key, now=T0 + 19) is not None
        await self._assert_vanishes(store, seed, bystander, at=T0 + 20)

    async def test_deleting_the_last_never_expiring_checkpoint_lets_the_run_expire(
        self, store: CheckpointStore
    ) -> None:
        bystander = await self._bystander(store)
        seed = make_run("mortal-again")
        key = key_of(seed)
        await _append(store, seed, 0)
        await _append(store, seed, 1, expires_at=T0 + 20)
        await _append(store, seed, 2)
        await _append(store, seed, 3, expires_at=T0 + 10)

        assert await _delete(store, seed, 2) is True
        run = await store.get_run(key, now=T0)
        assert run is not None
        assert run.expires_at is None, "checkpoint 0 still never expires"

        assert await _delete(store, seed, 0) is True
        assert await store.get_run(key, now=T0) == _expected_run(
            seed, latest_sequence=3, checkpoint_count=2, updated_at=T0, expires_at=T0 + 20
        )
        assert await store.get_run(key, now=T0 + 19) is not None
        await self._assert_vanishes(store, seed, bystander, at=T0 + 20)

    async def test_deleting_every_checkpoint_empties_the_run(self, store: CheckpointStore) -> None:
        bystander = await self._bystander(store)
        seed = make_run("emptied", status="paused")
        key = key_of(seed)
        await _append(store, seed, 0)
        await _append(store, seed, 1, expires_at=T0 + 100)
        await store.put_items(key, [make_item("owned", owner=1)], now=T0)

        assert await _delete(store, seed, 1) is True
        run = await store.get_run(key, now=T0)
        assert run is not None
        assert (run.checkpoint_count, run.expires_at) == (1, None)
        assert await _delete(store, seed, 0) is True

        await self._assert_vanishes(store, seed, bystander, at=T0)
        assert await store.get_items(key, ["owned"], now=T0) == {}

    async def test_append_after_deleting_every_checkpoint_starts_over(
        self, store: CheckpointStore
    ) -> None:
        old = make_run("restarted")
        key = key_of(old)
        await _append_many(store, old, range(3), expires_at=T0 + 100)
        for sequence in range(3):
            assert await _delete(store, old, sequence) is True

        with pytest.raises(SequenceConflict) as caught:
            await _append(store, old, 3, now=T0 + 1)
        assert (caught.value.latest_sequence, caught.value.incarnation) == (None, None)
        assert await store.get_run(key, now=T0 + 1) is None

        new = make_run("restarted", created_at=T0 + 1)
        fresh = await _append(store, new, 0, now=T0 + 1)

        assert await store.get_run(key, now=T0 + 1) == _expected_run(
            new, latest_sequence=0, checkpoint_count=1, updated_at=T0 + 1, expires_at=None
        )
        found = await store.get(key, 0, now=T0 + 1)
        assert found is not None
        assert without_key(found[0]) == fresh
        assert await _sequences(store, new, now=T0, include_expired=True) == [0]
        with pytest.raises(SequenceConflict) as caught:
            await _append(store, old, 3, now=T0 + 1)
        assert (caught.value.latest_sequence, caught.value.incarnation) == (0, new.incarnation)

    async def test_removing_the_latest_expiring_checkpoint_lowers_run_expiry(
        self, store: CheckpointStore
    ) -> None:
        deleted = make_run("lowered-by-delete")
        await _append(store, deleted, 0, expires_at=T0 + 30)
        await _append(store, deleted, 1, expires_at=T0 + 50)
        await _append(store, deleted, 2, expires_at=T0 + 40)

        assert await _delete(store, deleted, 0) is True
        run = await store.get_run(key_of(deleted), now=T0)
        assert run is not None
        assert run.expires_at == T0 + 50, "checkpoint 0 did not hold the latest expiry"
        assert await _delete(store, deleted, 1) is True
        run = await store.get_run(key_of(deleted), now=T0)
        assert run is not None
        assert (run.checkpoint_count, run.expires_at) == (1, T0 + 40)
        assert await store.get_run(key_of(deleted), now=T0 + 39) is not None
        assert await store.get_run(key_of(deleted), now=T0 + 40) is None

        pruned = make_run("lowered-by-pruning")
        await _append(store, pruned, 0, expires_at=T0 + 50)
        await _append(store, pruned, 1, expires_at=T0 + 20)
        await _append(store, pruned, 2, expires_at=T0 + 30, keep_latest=2)
        run = await store.get_run(key_of(pruned), now=T0)
        assert run is not None
        assert (run.checkpoint_count, run.expires_at) == (2, T0 + 30)
        assert await store.get_run(key_of(pruned), now=T0 + 30) is None

        async def listed(now: float) -> tuple[list[str], int]:
            runs, _ = await store.list_runs(status=None, limit=10, cursor=None, now=now)
            return sorted(run.run_id for run in runs), await store.count_runs(status=None, now=now)

        both = ["lowered-by-delete", "lowered-by-pruning"]
        assert await listed(T0 + 29) == (both, 2)
        assert await listed(T0 + 30) == (["lowered-by-delete"], 1)

    async def test_delete_and_delete_run_refuse_what_is_not_a_run_key(
        self, store: CheckpointStore
    ) -> None:
        """A run id given for a run key (FastAgentic code calls ``store.delete_run(run_id)``)
        is an error, never a silent 0."""
        seed = make_run("addressed")
        await _append_many(store, seed, range(2))
        await store.put_items(key_of(seed), [make_item("k")], now=T0)

        await _refuses_not_run_keys(store, seed, lambda value: store.delete(
            value, 0, checkpoint_id=checkpoint_id_of(seed, 0)))
        await _refuses_not_run_keys(store, seed, store.delete_run)
