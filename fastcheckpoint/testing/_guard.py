"""The capability contract of ``SupportsSequenceGuard``: run updates that apply only while the
run's newest checkpoint is the one the caller saw."""

from __future__ import annotations

import msgspec
import pytest

from fastcheckpoint.errors import CheckpointNotFound, ConflictError, ValidationError
from fastcheckpoint.stores._base import CheckpointStore, RunRecord, offers_sequence_guard
from fastcheckpoint.testing._builders import T0, key_of, make_run
from fastcheckpoint.testing._contract import (
    ContractBase,
    _append,
    _append_many,
    _delete,
    _snapshot,
)

__all__ = ["SequenceGuardContract"]


async def _guarded(
    store: CheckpointStore,
    run: RunRecord,
    *,
    version: int,
    latest_sequence: object,
    status: str = "paused",
    data: bytes = b"ask",
    now: float = T0,
) -> RunRecord:
    """``update_run`` of ``run``'s incarnation with ``latest_sequence=``, as the manager's
    guarded pause calls it."""
    assert offers_sequence_guard(store)
    return await store.update_run(
        key_of(run), incarnation=run.incarnation, version=version, status=status, data=data,
        now=now, latest_sequence=latest_sequence)  # type: ignore[arg-type]


class SequenceGuardContract(ContractBase):
    """``SupportsSequenceGuard``: ``update_run(..., latest_sequence=s)`` applies only while the
    run's ``latest_sequence`` is ``s``; otherwise :class:`ConflictError` and nothing changes.
    ``None`` is the plain compare-and-set."""

    async def test_store_offers_the_sequence_guard(self, store: CheckpointStore) -> None:
        assert offers_sequence_guard(store)

    async def test_a_guarded_update_applies_while_the_latest_is_unchanged(
        self, store: CheckpointStore
    ) -> None:
        seed = make_run("guard-holds")
        key = key_of(seed)
        await _append_many(store, seed, [0, 1], expires_at=T0 + 100)
        before = await store.get_run(key, now=T0)
        assert before is not None

        updated = await _guarded(store, seed, version=0, latest_sequence=1, now=T0 + 5)

        assert updated == msgspec.structs.replace(
            before, status="paused", data=b"ask", version=1, updated_at=T0 + 5)
        assert await store.get_run(key, now=T0 + 5) == updated
        assert await store.count_runs(status="paused", now=T0 + 5) == 1

    async def test_a_guarded_update_after_another_append_changes_nothing(
        self, store: CheckpointStore
    ) -> None:
        seed = make_run("guard-refuses")
        await _append_many(store, seed, [0, 1])
        seen = await store.get_run(key_of(seed), now=T0)
        assert seen is not None
        await _append(store, seed, 2, now=T0 + 1)  # another process goes on meanwhile
        before = await _snapshot(store, seed, now=T0 + 1)

        with pytest.raises(ConflictError, match="newer checkpoints"):
            await _guarded(store, seed, version=seen.version,
                           latest_sequence=seen.latest_sequence, now=T0 + 2)

        assert await _snapshot(store, seed, now=T0 + 1) == before
        assert await store.count_runs(status="paused", now=T0 + 2) == 0
        assert (await store.list_runs(status="active", limit=10, cursor=None, now=T0 + 2))[0] \
            == [before[0]]

    async def test_the_guard_follows_the_newest_sequence_after_pruning(
        self, store: CheckpointStore
    ) -> None:
        seed = make_run("guard-pruned")
        await _append_many(store, seed, [0, 1, 2, 3], keep_latest=1)

        for stale in (0, 2, 4):
            with pytest.raises(ConflictError):
                await _guarded(store, seed, version=0, latest_sequence=stale)
        updated = await _guarded(store, seed, version=0, latest_sequence=3)

        assert (updated.status, updated.version, updated.latest_sequence) == ("paused", 1, 3)

    async def test_the_guard_is_the_newest_sequence_appended_after_deleting_it(
        self, store: CheckpointStore
    ) -> None:
        """Deleting the newest checkpoint leaves the run's ``latest_sequence`` where it was
        (the next append still takes the sequence after it), and the guard goes by it on
        every store: a caller comparing with the sequence its append returned gets the
        same answer whichever store it runs on."""
        seed = make_run("guard-deleted")
        await _append_many(store, seed, [0, 1, 2])
        assert await _delete(store, seed, 2) is True

        with pytest.raises(ConflictError, match="newer checkpoints"):
            await _guarded(store, seed, version=0, latest_sequence=1)
        updated = await _guarded(store, seed, version=0, latest_sequence=2)

        assert (updated.status, updated.latest_sequence, updated.checkpoint_count) == (
            "paused", 2, 2)

    async def test_without_a_guard_the_update_is_the_plain_compare_and_set(
        self, store: CheckpointStore
    ) -> None:
        seed = make_run("guard-none")
        await _append_many(store, seed, [0, 1])
        await _append(store, seed, 2, now=T0 + 1)

        updated = await _guarded(store, seed, version=0, latest_sequence=None, now=T0 + 2)

        assert (updated.status, updated.version, updated.latest_sequence) == ("paused", 1, 2)
        with pytest.raises(ConflictError):  # the version still decides
            await _guarded(store, seed, version=0, latest_sequence=None, now=T0 + 3)

    async def test_a_stale_version_conflicts_even_when_the_latest_matches(
        self, store: CheckpointStore
    ) -> None:
        seed = make_run("guard-version")
        await _append(store, seed, 0)
        await _guarded(store, seed, version=0, latest_sequence=0, status="active", now=T0 + 1)
        before = await _snapshot(store, seed, now=T0 + 1)

        with pytest.raises(ConflictError):
            await _guarded(store, seed, version=0, latest_sequence=0, now=T0 + 2)

        assert await _snapshot(store, seed, now=T0 + 1) == before

    async def test_a_guarded_update_of_an_absent_or_expired_run(
        self, store: CheckpointStore
    ) -> None:
        with pytest.raises(CheckpointNotFound):
            await _guarded(store, make_run("guard-absent"), version=0, latest_sequence=0)
        seed = make_run("guard-expired")
        await _append(store, seed, 0, expires_at=T0 + 10)
        with pytest.raises(CheckpointNotFound):
            await _guarded(store, seed, version=0, latest_sequence=0, now=T0 + 10)

    async def test_a_guard_that_is_not_a_sequence_is_refused(
        self, store: CheckpointStore
    ) -> None:
        seed = make_run("guard-invalid")
        await _append(store, seed, 0)
        before = await _snapshot(store, seed, now=T0)

        for value in ("0", 0.0, True):
            with pytest.raises(ValidationError):
                await _guarded(store, seed, version=0, latest_sequence=value)

        assert await _snapshot(store, seed, now=T0) == before
