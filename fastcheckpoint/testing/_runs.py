"""The store contract: run records (``get_run``, ``update_run``, ``list_runs``, ``count_runs``)."""

from __future__ import annotations

import msgspec
import pytest

from fastcheckpoint.errors import CheckpointNotFound, ConflictError
from fastcheckpoint.stores._base import CheckpointStore
from fastcheckpoint.testing._builders import T0, key_of, make_run
from fastcheckpoint.testing._contract import (
    ContractBase,
    _append,
    _append_many,
    _refuses_not_run_keys,
    _snapshot,
    _update,
)

__all__ = ["RunsContract"]


class RunsContract(ContractBase):
    """Run records: ``get_run``, ``update_run``, ``list_runs`` and ``count_runs``.

    ``update_run`` is a compare-and-set on incarnation and version that leaves checkpoints and
    expiry alone; ``list_runs`` pages live runs newest created first, by status, with a cursor
    that visits every run once; expired runs are neither listed nor counted.
    """

    # -- runs ---------------------------------------------------------------------------------

    async def test_get_run_absent_or_expired_is_none(self, store: CheckpointStore) -> None:
        seed = make_run("short-lived")
        assert await store.get_run(key_of(seed), now=T0) is None
        await _append(store, seed, 0, expires_at=T0 + 10)
        assert await store.get_run(key_of(seed), now=T0 + 9.5) is not None
        assert await store.get_run(key_of(seed), now=T0 + 10) is None

    async def test_update_run_compare_and_set(self, store: CheckpointStore) -> None:
        seed = make_run("cas", created_at=T0)
        key = key_of(seed)
        await _append_many(store, seed, [0, 1], expires_at=T0 + 100)
        before = await store.get_run(key, now=T0)
        assert before is not None

        first = await _update(store, seed, version=0, status="paused", data=b"ask", now=T0 + 5)
        second = await _update(store, seed, version=1, status="active", data=b"yes", now=T0 + 7)

        assert first == msgspec.structs.replace(
            before, status="paused", data=b"ask", version=1, updated_at=T0 + 5
        )
        assert second == msgspec.structs.replace(
            before, status="active", data=b"yes", version=2, updated_at=T0 + 7
        )
        assert await store.get_run(key, now=T0 + 7) == second

    async def test_update_run_keeps_checkpoints_and_expiry(self, store: CheckpointStore) -> None:
        seed = make_run("untouched")
        key = key_of(seed)
        await _append_many(store, seed, [0, 1], expires_at=T0 + 100)
        before = await _snapshot(store, seed, now=T0)

        await _update(store, seed, version=0, status="done", data=b"x", now=T0 + 5)

        run, (found, _), latest, items = await _snapshot(store, seed, now=T0)
        assert (found, items) == (before[1][0], before[3])
        assert latest is not None
        assert before[2] is not None
        assert latest[0] == before[2][0]
        assert run is not None
        assert run.expires_at == T0 + 100
        assert await store.get_run(key, now=T0 + 100) is None
        assert await store.get(key, 1, now=T0 + 100) is None

    async def test_update_run_with_stale_version_conflicts(self, store: CheckpointStore) -> None:
        seed = make_run("stale-version")
        await _append(store, seed, 0)
        await _update(store, seed, version=0, status="completed", data=b"one", now=T0 + 1)
        before = await _snapshot(store, seed, now=T0 + 1)

        for version in (0, 2, 5):
            with pytest.raises(ConflictError):
                await _update(store, seed, version=version, status="failed", data=b"2", now=T0 + 2)

        assert await _snapshot(store, seed, now=T0 + 1) == before

    async def test_update_run_with_stale_incarnation_conflicts(
        self, store: CheckpointStore
    ) -> None:
        deleted = make_run("deleted-and-recreated")
        await _append_many(store, deleted, [0, 1])
        assert await store.delete_run(key_of(deleted)) == 2
        expired = make_run("expired-and-recreated")
        await _append(store, expired, 0, expires_at=T0 + 10)
        successors = [
            make_run("deleted-and-recreated", created_at=T0 + 10),
            make_run("expired-and-recreated", created_at=T0 + 10),
        ]
        for successor in successors:
            await _append(store, successor, 0, now=T0 + 10)

        for stale, successor in zip((deleted, expired), successors, strict=True):
            before = await _snapshot(store, successor, now=T0 + 10)
            # The same version as the new incarnation's: only the incarnation tells them apart.
            with pytest.raises(ConflictError):
                await _update(store, stale, version=0, status="failed", data=b"x", now=T0 + 11)
            assert await _snapshot(store, successor, now=T0 + 10) == before
            assert await store.count_runs(status="failed", now=T0 + 11) == 0

            updated = await _update(store, successor, version=0, status="completed", now=T0 + 11)
            assert (updated.incarnation, updated.version) == (successor.incarnation, 1)

    async def test_update_run_of_absent_or_expired_run(self, store: CheckpointStore) -> None:
        absent = make_run("no-such-run")
        with pytest.raises(CheckpointNotFound):
            await _update(store, absent, version=0, status="x")
        seed = make_run("expired-run")
        await _append(store, seed, 0, expires_at=T0 + 10)
        with pytest.raises(CheckpointNotFound):
            await _update(store, seed, version=0, status="x", now=T0 + 10)
        assert await store.get_run(key_of(absent), now=T0) is None
        run = await store.get_run(key_of(seed), now=T0)
        assert run is not None
        assert (run.status, run.version) == ("active", 0)

    async def test_appends_leave_version_alone(self, store: CheckpointStore) -> None:
        seed = make_run("versioned")
        key = key_of(seed)
        await _append(store, seed, 0)
        await _update(store, seed, version=0, status="active")
        await _append_many(store, seed, [1, 2])
        run = await store.get_run(key, now=T0)
        assert run is not None
        assert run.version == 1
        updated = await _update(store, seed, version=1, status="paused")
        assert updated.version == 2

    async def test_list_runs_newest_created_first_by_status(self, store: CheckpointStore) -> None:
        statuses = ["active", "paused", "active", "completed", "active"]
        seeds = [
            make_run(f"run-{index}", status=status, created_at=T0 + index)
            for index, status in enumerate(statuses)
        ]
        for seed in reversed(seeds):  # creation order must not be insertion order
            await _append(store, seed, 0, now=seed.created_at)

        async def listed(status: str | None) -> list[str]:
            runs, cursor = await store.list_runs(status=status, limit=100, cursor=None, now=T0)
            assert cursor is None
            return [run.run_id for run in runs]

        assert await listed(None) == ["run-4", "run-3", "run-2", "run-1", "run-0"]
        assert await listed("active") == ["run-4", "run-2", "run-0"]
        assert await listed("paused") == ["run-1"]
        assert await listed("failed") == []
        runs, _ = await store.list_runs(status="completed", limit=10, cursor=None, now=T0)
        assert runs == [await store.get_run(key_of(seeds[3]), now=T0)]

    async def test_list_runs_pages_visit_every_run_once(self, store: CheckpointStore) -> None:
        statuses = ("active", "paused", "completed")
        seeds = [
            make_run(f"page-{index:02}", status=statuses[index % 3], created_at=T0 + index)
            for index in range(25)
        ]
        for seed in seeds:
            await _append(store, seed, 0, now=seed.created_at)

        async def every_page(status: str | None, limit: int) -> list[str]:
            seen: list[str] = []
            cursor: str | None = None
            for _ in range(30):
                runs, cursor = await store.list_runs(
                    status=status, limit=limit, cursor=cursor, now=T0 + 100
                )
                assert len(runs) <= limit
                seen += [run.run_id for run in runs]
                if cursor is None:
                    return seen
            raise AssertionError(f"list_runs still returns a cursor after 30 pages: {seen}")

        newest_first = [seed.run_id for seed in reversed(seeds)]
        assert await every_page(None, 7) == newest_first
        assert await every_page("paused", 3) == [
            seed.run_id for seed in reversed(seeds) if seed.status == "paused"
        ]
        assert await every_page(None, 25) == newest_first
        assert await every_page(None, 1) == newest_first

    async def test_list_runs_pages_through_runs_created_together(
        self, store: CheckpointStore
    ) -> None:
        run_ids = [f"tied-{index}" for index in range(10)]
        for run_id in run_ids:
            await _append(store, make_run(run_id, created_at=T0), 0)
        await _append(store, make_run("older", created_at=T0 - 1), 0, now=T0 - 1)

        seen: list[str] = []
        cursor: str | None = None
        for _ in range(20):
            runs, cursor = await store.list_runs(status=None, limit=3, cursor=cursor, now=T0)
            seen += [run.run_id for run in runs]
            if cursor is None:
                break

        assert sorted(seen[:-1]) == sorted(run_ids)
        assert seen[-1] == "older"

    async def test_list_and_count_runs_exclude_expired(self, store: CheckpointStore) -> None:
        forever = make_run("forever", created_at=T0)
        mortal = make_run("mortal", created_at=T0 + 1)
        dying = make_run("dying", status="paused", created_at=T0 + 2)
        await _append(store, forever, 0, now=T0)
        await _append(store, mortal, 0, now=T0 + 1, expires_at=T0 + 50)
        await _append(store, dying, 0, now=T0 + 2, expires_at=T0 + 10)

        async def listed(status: str | None, now: float) -> list[str]:
            runs, _ = await store.list_runs(status=status, limit=10, cursor=None, now=now)
            return [run.run_id for run in runs]

        assert await listed(None, T0 + 9) == ["dying", "mortal", "forever"]
        assert await listed(None, T0 + 10) == ["mortal", "forever"]
        assert await listed("paused", T0 + 10) == []
        assert await listed(None, T0 + 50) == ["forever"]
        assert await store.count_runs(status=None, now=T0 + 9) == 3
        assert await store.count_runs(status=None, now=T0 + 10) == 2
        assert await store.count_runs(status="paused", now=T0 + 10) == 0
        assert await store.count_runs(status=None, now=T0 + 50) == 1

    async def test_list_and_count_runs_follow_status_changes(self, store: CheckpointStore) -> None:
        first = make_run("first", created_at=T0)
        second = make_run("second", created_at=T0 + 1)
        await _append(store, first, 0, now=T0)
        await _append(store, second, 0, now=T0 + 1)

        await _update(store, first, version=0, status="paused", now=T0 + 2)

        active, _ = await store.list_runs(status="active", limit=10, cursor=None, now=T0 + 2)
        paused, _ = await store.list_runs(status="paused", limit=10, cursor=None, now=T0 + 2)
        assert [run.run_id for run in active] == ["second"]
        assert [(run.run_id, run.version) for run in paused] == [("first", 1)]
        assert await store.count_runs(status="active", now=T0 + 2) == 1
        assert await store.count_runs(status="paused", now=T0 + 2) == 1
        assert await store.count_runs(status=None, now=T0 + 2) == 2

    async def test_list_and_count_runs_of_empty_store(self, store: CheckpointStore) -> None:
        assert await store.list_runs(status=None, limit=10, cursor=None, now=T0) == ([], None)
        assert await store.list_runs(status="active", limit=10, cursor=None, now=T0) == (
            [],
            None,
        )
        assert await store.count_runs(status=None, now=T0) == 0

    async def test_count_runs(self, store: CheckpointStore) -> None:
        for index in range(7):
            seed = make_run(f"counted-{index}", status="active" if index % 2 else "failed")
            await _append(store, seed, 0)
        assert await store.count_runs(status=None, now=T0) == 7
        assert await store.count_runs(status="active", now=T0) == 3
        assert await store.count_runs(status="failed", now=T0) == 4
        assert await store.count_runs(status="paused", now=T0) == 0
        await store.delete_run(key_of(make_run("counted-1")))
        assert await store.count_runs(status="active", now=T0) == 2
        assert await store.count_runs(status=None, now=T0) == 6

    async def test_run_records_refuse_what_is_not_a_run_key(self, store: CheckpointStore) -> None:
        seed = make_run("addressed")
        await _append(store, seed, 0)

        await _refuses_not_run_keys(store, seed, lambda value: store.get_run(value, now=T0))
        await _refuses_not_run_keys(store, seed, lambda value: store.update_run(
            value, incarnation=seed.incarnation, version=0, status="completed", data=b"x",
            now=T0))
