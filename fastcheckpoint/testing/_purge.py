"""The store contract: ``purge_expired``."""

from __future__ import annotations

import anyio

from fastcheckpoint.stores._base import CheckpointStore, RunRecord
from fastcheckpoint.testing._builders import T0, key_of, make_item, make_run
from fastcheckpoint.testing._contract import ContractBase, _append, _append_many, _sequences

__all__ = ["PurgeContract"]


class PurgeContract(ContractBase):
    """``purge_expired``: removes what expired, in bounded batches.

    Expired checkpoints go with their owned items, expired items go, and runs whose record
    expired go whole; a call does about ``limit`` things and says when nothing expired is left;
    workers may purge at the same time; nothing live is touched.
    """

    # -- purge --------------------------------------------------------------------------------

    async def _expiring_world(self, store: CheckpointStore) -> tuple[RunRecord, ...]:
        """Three runs at T0; at T0 + 10, 12 checkpoints have expired (8 of them a whole run)."""
        gone = make_run("purge-gone")
        mixed = make_run("purge-mixed")
        live = make_run("purge-live")
        await _append_many(store, gone, range(8), expires_at=T0 + 10)
        await store.put_items(
            key_of(gone),
            [make_item("owned", owner=3), make_item("free"), make_item("brief", expires_at=T0 + 5)],
            now=T0,
        )
        await _append_many(store, mixed, range(3), expires_at=T0 + 10)
        await _append(store, mixed, 3)
        await _append(store, mixed, 4, expires_at=T0 + 10)
        await _append(store, mixed, 5, expires_at=T0 + 1000)
        await store.put_items(
            key_of(mixed),
            [
                make_item("kept"),
                make_item("owned-by-expired", owner=0),
                make_item("owned-by-live", owner=3),
                make_item("expiring", expires_at=T0 + 10),
                make_item("later", expires_at=T0 + 1000),
            ],
            now=T0,
        )
        await _append_many(store, live, range(3))
        await store.put_items(key_of(live), [make_item("kept")], now=T0)
        return gone, mixed, live

    async def _assert_purged(self, store: CheckpointStore, runs: tuple[RunRecord, ...]) -> None:
        gone, mixed, live = runs
        # Read at T0, when everything was live: what was expired is gone, not just hidden.
        assert await store.get_run(key_of(gone), now=T0) is None
        assert await store.get(key_of(gone), 7, now=T0) is None
        assert await store.get_items(key_of(gone), ["owned", "free", "brief"], now=T0) == {}
        assert await _sequences(store, mixed, now=T0, include_expired=True) == [5, 3]
        assert await store.get_items(
            key_of(mixed),
            ["kept", "owned-by-expired", "owned-by-live", "expiring", "later"],
            now=T0,
        ) == {
            "kept": b"value-kept",
            "owned-by-live": b"value-owned-by-live",
            "later": b"value-later",
        }
        mixed_run = await store.get_run(key_of(mixed), now=T0 + 10)
        assert mixed_run is not None
        assert (mixed_run.latest_sequence, mixed_run.checkpoint_count) == (5, 2)
        assert await _sequences(store, live, now=T0 + 10) == [2, 1, 0]
        assert await store.get_items(key_of(live), ["kept"], now=T0 + 10) == {"kept": b"value-kept"}
        assert await store.count_runs(status=None, now=T0) == 2
        assert await store.purge_expired(now=T0 + 10, limit=100) == (0, True)

    async def test_purge_expired_in_bounded_batches(self, store: CheckpointStore) -> None:
        runs = await self._expiring_world(store)

        calls: list[tuple[int, bool]] = []
        for _ in range(100):
            calls.append(await store.purge_expired(now=T0 + 10, limit=3))
            if calls[-1][1]:
                break

        assert calls[0][1] is False, "one call with limit=3 purged everything"
        assert calls[-1][1] is True, f"purge_expired never reported done: {calls}"
        assert sum(removed for removed, _ in calls) == 12
        await self._assert_purged(store, runs)

    async def test_purge_expired_from_concurrent_workers(self, store: CheckpointStore) -> None:
        runs = await self._expiring_world(store)
        removed: list[int] = []

        async def worker() -> None:
            for _ in range(100):
                count, done = await store.purge_expired(now=T0 + 10, limit=2)
                removed.append(count)
                if done:
                    return
            raise AssertionError("purge_expired never reported done")

        async with anyio.create_task_group() as group:
            for _ in range(4):
                group.start_soon(worker)

        assert sum(removed) == 12
        await self._assert_purged(store, runs)

    async def test_purge_expired_with_nothing_expired(self, store: CheckpointStore) -> None:
        assert await store.purge_expired(now=T0, limit=10) == (0, True)
        seed = make_run("purge-nothing")
        await _append_many(store, seed, range(3), expires_at=T0 + 10)
        await store.put_items(key_of(seed), [make_item("a", expires_at=T0 + 10)], now=T0)

        assert await store.purge_expired(now=T0 + 9, limit=10) == (0, True)

        assert await _sequences(store, seed, now=T0 + 9) == [2, 1, 0]
        assert await store.get_items(key_of(seed), ["a"], now=T0 + 9) == {"a": b"value-a"}

