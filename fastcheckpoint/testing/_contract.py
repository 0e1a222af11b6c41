"""The store contract as one abstract test class: every clause of ``CheckpointStore``'s docstring.

The tests use only the public protocol: no backend checks, no sleeps. Time moves by passing
``now``; expiry is checked at its exact boundary (``expires_at == now`` is expired). Physical
removal is checked by reading again with an earlier ``now``, at which the record would be live.
"""

from __future__ import annotations

import functools
import inspect
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, ClassVar

import anyio
import msgspec
import pytest

from fastcheckpoint.errors import CheckpointNotFound, ConflictError, SequenceConflict
from fastcheckpoint.stores._base import (
    CheckpointHeader,
    CheckpointStore,
    RunRecord,
    StoredCheckpoint,
)
from fastcheckpoint.testing._builders import (
    T0,
    checkpoint_id_of,
    header_of,
    key_of,
    make_checkpoint,
    make_item,
    make_run,
    without_key,
)

__all__ = ["ContractBase", "StoreContract"]

_Snapshot = tuple[
    RunRecord | None,
    tuple[list[CheckpointHeader], str | None],
    tuple[StoredCheckpoint, str] | None,
    list[tuple[str, bytes]],
]


async def _append(
    store: CheckpointStore,
    run: RunRecord,
    sequence: int,
    *,
    now: float = T0,
    expires_at: float | None = None,
    keep_latest: int | None = None,
    header: bytes | None = None,
    payload: bytes | None = None,
) -> StoredCheckpoint:
    """Append checkpoint ``sequence`` of ``run`` created at ``now``; return what was appended."""
    record = make_checkpoint(
        run, sequence, created_at=now, expires_at=expires_at, header=header, payload=payload
    )
    # The seed of a new run carries its first checkpoint's expiry, as the manager's does.
    seed = msgspec.structs.replace(run, expires_at=expires_at)
    await store.append(key_of(run), record, run=seed, keep_latest=keep_latest, now=now)
    return record


async def _append_many(
    store: CheckpointStore,
    run: RunRecord,
    sequences: Sequence[int],
    *,
    now: float = T0,
    expires_at: float | None = None,
    keep_latest: int | None = None,
) -> list[StoredCheckpoint]:
    return [
        await _append(store, run, sequence, now=now, expires_at=expires_at, keep_latest=keep_latest)
        for sequence in sequences
    ]


async def _delete(store: CheckpointStore, run: RunRecord, sequence: int) -> bool:
    """Delete checkpoint ``sequence`` of ``run`` by its id, as the manager does."""
    return await store.delete(key_of(run), sequence, checkpoint_id=checkpoint_id_of(run, sequence))


async def _update(
    store: CheckpointStore,
    run: RunRecord,
    *,
    version: int,
    status: str,
    data: bytes = b"",
    now: float = T0,
) -> RunRecord:
    """Compare-and-set the status of ``run``'s incarnation, as the manager does."""
    return await store.update_run(
        key_of(run),
        incarnation=run.incarnation,
        version=version,
        status=status,
        data=data,
        now=now,
    )


async def _sequences(
    store: CheckpointStore, run: RunRecord, *, now: float, include_expired: bool = False
) -> list[int]:
    found, _ = await store.headers(
        key_of(run), before=None, limit=10_000, now=now, include_expired=include_expired
    )
    return [header.sequence for header in found]


async def _snapshot(store: CheckpointStore, run: RunRecord, *, now: float) -> _Snapshot:
    """Everything the protocol can see of one run at ``now``."""
    key = key_of(run)
    return (
        await store.get_run(key, now=now),
        await store.headers(key, before=None, limit=10_000, now=now, include_expired=True),
        await store.latest(key, now=now),
        await store.scan_items(key, limit=10_000, now=now),
    )


def _expected_run(
    seed: RunRecord,
    *,
    latest_sequence: int,
    checkpoint_count: int,
    updated_at: float,
    expires_at: float | None,
) -> RunRecord:
    return msgspec.structs.replace(
        seed,
        latest_sequence=latest_sequence,
        checkpoint_count=checkpoint_count,
        updated_at=updated_at,
        expires_at=expires_at,
    )


def _with_deadline(test: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    @functools.wraps(test)
    async def run_with_deadline(self: ContractBase, *args: Any, **kwargs: Any) -> None:
        with anyio.fail_after(self.deadline_seconds):
            await test(self, *args, **kwargs)

    run_with_deadline.__dict__["_contract_deadline"] = True
    return run_with_deadline


class ContractBase:
    """What every contract test class shares: the ``anyio`` mark, a deadline on every test,
    and the ``store`` fixture a subclass must provide."""

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.anyio]

    deadline_seconds: ClassVar[float] = 10.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in dir(cls):
            test = getattr(cls, name)
            if (
                name.startswith("test_")
                and inspect.iscoroutinefunction(test)
                and not test.__dict__.get("_contract_deadline", False)
            ):
                setattr(cls, name, _with_deadline(test))

    @pytest.fixture
    def store(self) -> AsyncIterator[CheckpointStore]:
        raise NotImplementedError(
            f"{type(self).__name__} must override the `store` fixture "
            "(an async generator yielding a fresh store and closing it)"
        )


class StoreContract(ContractBase):
    """Subclass once per backend, providing a ``store`` fixture; every test then runs on it.

    ``store`` is an async fixture yielding a fresh, empty store and closing it afterwards::

        class TestMyStore(StoreContract):
            @pytest.fixture
            async def store(self, tmp_path) -> AsyncIterator[CheckpointStore]:
                store = MyStore(tmp_path)
                yield store
                await store.aclose()

    Tests are marked ``anyio``; define an ``anyio_backend`` fixture (in ``conftest.py``) to run
    them on trio as well as asyncio. Every ``test_*`` coroutine, including ones a subclass adds,
    fails after ``deadline_seconds``: raise it for a slow remote backend.
    """

    # -- append: creating a run ---------------------------------------------------------------

    async def test_append_at_zero_creates_run_record(self, store: CheckpointStore) -> None:
        seed = make_run("created", status="paused", created_at=T0, data=b"run-data")

        status = await store.append(
            key_of(seed),
            make_checkpoint(seed, 0, expires_at=T0 + 100),
            run=msgspec.structs.replace(seed, expires_at=T0 + 100),
            keep_latest=None,
            now=T0,
        )

        assert status == "paused"
        assert await store.get_run(key_of(seed), now=T0) == _expected_run(
            seed, latest_sequence=0, checkpoint_count=1, updated_at=T0, expires_at=T0 + 100
        )

    async def test_append_at_zero_on_live_run_conflicts(self, store: CheckpointStore) -> None:
        seed = make_run("live")
        await _append_many(store, seed, [0, 1])
        before = await _snapshot(store, seed, now=T0)
        for rival in (seed, make_run("live")):
            with pytest.raises(SequenceConflict) as caught:
                await _append(store, rival, 0, now=T0 + 1, payload=b"rival")
            assert caught.value.latest_sequence == 1
            assert caught.value.incarnation == seed.incarnation
        assert await _snapshot(store, seed, now=T0) == before

    async def test_append_nonzero_on_absent_run_conflicts(self, store: CheckpointStore) -> None:
        seed = make_run("absent")
        with pytest.raises(SequenceConflict) as caught:
            await _append(store, seed, 1)
        assert caught.value.latest_sequence is None
        assert caught.value.incarnation is None
        assert await store.get_run(key_of(seed), now=T0) is None
        assert await store.get(key_of(seed), 1, now=T0) is None
        assert await store.headers(key_of(seed), before=None, limit=10, now=T0) == ([], None)

    # -- append: the next sequence ------------------------------------------------------------

    async def test_append_next_sequence_updates_run_record(self, store: CheckpointStore) -> None:
        seed = make_run("next", created_at=T0, data=b"d")
        await _append(store, seed, 0, now=T0)
        await _append(store, seed, 1, now=T0 + 5)
        status = await store.append(
            key_of(seed),
            make_checkpoint(seed, 2, created_at=T0 + 9),
            run=seed,
            keep_latest=None,
            now=T0 + 9,
        )

        assert status == "active"
        assert await store.get_run(key_of(seed), now=T0 + 9) == _expected_run(
            seed, latest_sequence=2, checkpoint_count=3, updated_at=T0 + 9, expires_at=None
        )

    async def test_append_keeps_run_fields_other_than_the_log(self, store: CheckpointStore) -> None:
        seed = make_run("kept", created_at=T0)
        await _append(store, seed, 0)
        updated = await _update(store, seed, version=0, status="paused", data=b"ok", now=T0 + 1)
        other_seed = msgspec.structs.replace(
            seed, status="active", data=b"other", created_at=T0 + 2, version=7
        )

        status = await store.append(
            key_of(seed),
            make_checkpoint(seed, 1, created_at=T0 + 2),
            run=other_seed,
            keep_latest=None,
            now=T0 + 2,
        )

        assert status == "paused"
        assert await store.get_run(key_of(seed), now=T0 + 2) == msgspec.structs.replace(
            updated, latest_sequence=1, checkpoint_count=2, updated_at=T0 + 2
        )

    async def test_append_skipping_a_sequence_conflicts(self, store: CheckpointStore) -> None:
        seed = make_run("skip")
        await _append_many(store, seed, [0, 1])
        before = await _snapshot(store, seed, now=T0)
        for sequence in (3, 10, -1):
            with pytest.raises(SequenceConflict) as caught:
                await _append(store, seed, sequence, now=T0 + 1)
            assert caught.value.latest_sequence == 1
            assert caught.value.incarnation == seed.incarnation
        assert await _snapshot(store, seed, now=T0) == before

    async def test_append_existing_sequence_conflicts(self, store: CheckpointStore) -> None:
        seed = make_run("again")
        await _append_many(store, seed, [0, 1, 2])
        before = await _snapshot(store, seed, now=T0)
        for sequence in (1, 2):
            with pytest.raises(SequenceConflict) as caught:
                await _append(store, seed, sequence, now=T0 + 1, payload=b"overwrite")
            assert caught.value.latest_sequence == 2
            assert caught.value.incarnation == seed.incarnation
        assert await _snapshot(store, seed, now=T0) == before

    async def test_append_with_other_incarnation_conflicts(self, store: CheckpointStore) -> None:
        seed = make_run("incarnation")
        await _append_many(store, seed, [0, 1])
        before = await _snapshot(store, seed, now=T0)
        impostor = make_run("incarnation")
        assert impostor.incarnation != seed.incarnation
        with pytest.raises(SequenceConflict) as caught:
            await _append(store, impostor, 2, now=T0 + 1)
        assert caught.value.latest_sequence == 1
        assert caught.value.incarnation == seed.incarnation
        assert await _snapshot(store, seed, now=T0) == before

    # -- append: expired runs -----------------------------------------------------------------

    async def test_append_on_expired_run_starts_over(self, store: CheckpointStore) -> None:
        old = make_run("reborn", created_at=T0)
        key = key_of(old)
        await _append_many(store, old, [0, 1, 2], expires_at=T0 + 10)
        await store.put_items(key, [make_item("old-owned", owner=1)], now=T0)
        new = make_run("reborn", created_at=T0 + 10, status="active", data=b"new")

        status = await store.append(
            key,
            make_checkpoint(new, 0, created_at=T0 + 10),
            run=new,
            keep_latest=None,
            now=T0 + 10,
        )

        assert status == "active"
        assert await store.get_run(key, now=T0 + 10) == _expected_run(
            new, latest_sequence=0, checkpoint_count=1, updated_at=T0 + 10, expires_at=None
        )
        found = await store.get(key, 0, now=T0 + 10)
        assert found is not None
        assert without_key(found[0]) == make_checkpoint(new, 0, created_at=T0 + 10)
        # Read at T0, when the old run was live: its leftovers are gone, not just hidden.
        assert await store.get(key, 1, now=T0) is None
        assert await store.get(key, 2, now=T0) is None
        assert await _sequences(store, new, now=T0, include_expired=True) == [0]
        assert await store.get_items(key, ["old-owned"], now=T0) == {}

    async def test_append_nonzero_on_expired_run_conflicts(self, store: CheckpointStore) -> None:
        seed = make_run("stale")
        await _append_many(store, seed, [0, 1], expires_at=T0 + 10)
        before = await _snapshot(store, seed, now=T0)
        with pytest.raises(SequenceConflict) as caught:
            await _append(store, seed, 2, now=T0 + 10)
        assert caught.value.latest_sequence is None
        assert caught.value.incarnation is None
        assert await _snapshot(store, seed, now=T0) == before
        assert await store.get_run(key_of(seed), now=T0 + 10) is None

    async def test_run_expires_at_is_latest_checkpoint_expiry(self, store: CheckpointStore) -> None:
        seed = make_run("expiry")
        key = key_of(seed)
        expected = [
            (T0 + 100, T0 + 100),
            (T0 + 50, T0 + 100),
            (T0 + 150, T0 + 150),
            (None, None),
            (T0 + 500, None),
        ]
        for sequence, (checkpoint_expiry, run_expiry) in enumerate(expected):
            await _append(store, seed, sequence, expires_at=checkpoint_expiry)
            run = await store.get_run(key, now=T0)
            assert run is not None
            assert run.expires_at == run_expiry, f"after appending {sequence}"

    async def test_run_expires_with_its_last_checkpoint(self, store: CheckpointStore) -> None:
        seed = make_run("fading")
        key = key_of(seed)
        await _append(store, seed, 0, expires_at=T0 + 20)
        await _append(store, seed, 1, expires_at=T0 + 10)

        assert await store.get_run(key, now=T0 + 19) is not None
        assert await store.get_run(key, now=T0 + 20) is None
        assert await store.latest(key, now=T0 + 20) is None
        assert await store.headers(key, before=None, limit=10, now=T0 + 20) == ([], None)

    # -- append: pruning ----------------------------------------------------------------------

    async def test_keep_latest_keeps_newest(self, store: CheckpointStore) -> None:
        seed = make_run("pruned")
        key = key_of(seed)
        for sequence in range(6):
            await _append(store, seed, sequence, keep_latest=3)
            run = await store.get_run(key, now=T0)
            assert run is not None
            assert run.checkpoint_count == min(sequence + 1, 3)
        assert await _sequences(store, seed, now=T0, include_expired=True) == [5, 4, 3]
        for sequence in range(3):
            assert await store.get(key, sequence, now=T0) is None

    async def test_keep_latest_removes_expired_first(self, store: CheckpointStore) -> None:
        seed = make_run("expired-first")
        await _append(store, seed, 0, keep_latest=3)
        await _append(store, seed, 1, keep_latest=3)
        await _append(store, seed, 2, keep_latest=3, expires_at=T0 + 10)

        await _append(store, seed, 3, now=T0 + 10, keep_latest=3)

        assert await _sequences(store, seed, now=T0, include_expired=True) == [3, 1, 0]
        run = await store.get_run(key_of(seed), now=T0 + 10)
        assert run is not None
        assert run.checkpoint_count == 3

    async def test_keep_latest_holds_newest_live(self, store: CheckpointStore) -> None:
        seed = make_run("newest-live")
        await _append(store, seed, 0)
        await _append(store, seed, 1)
        await _append(store, seed, 2, expires_at=T0 + 10)
        await _append(store, seed, 3, expires_at=T0 + 10)

        await _append(store, seed, 4, now=T0 + 10, keep_latest=2)

        assert await _sequences(store, seed, now=T0 + 10) == [4, 1]
        assert await _sequences(store, seed, now=T0, include_expired=True) == [4, 1]

    async def test_lowered_keep_latest_converges_on_next_append(
        self, store: CheckpointStore
    ) -> None:
        seed = make_run("lowered")
        await _append_many(store, seed, range(6), keep_latest=10)

        await _append(store, seed, 6, keep_latest=2)

        assert await _sequences(store, seed, now=T0, include_expired=True) == [6, 5]
        run = await store.get_run(key_of(seed), now=T0)
        assert run is not None
        assert run.checkpoint_count == 2
        assert run.latest_sequence == 6

    async def test_keep_latest_none_keeps_all(self, store: CheckpointStore) -> None:
        seed = make_run("unpruned")
        await _append_many(store, seed, range(25), keep_latest=None)
        assert await _sequences(store, seed, now=T0) == list(range(24, -1, -1))
        run = await store.get_run(key_of(seed), now=T0)
        assert run is not None
        assert run.checkpoint_count == 25

    async def test_append_removes_expired_checkpoints_without_limit(
        self, store: CheckpointStore
    ) -> None:
        seed = make_run("unlimited-expiry")
        await _append(store, seed, 0)
        await _append(store, seed, 1, expires_at=T0 + 10)

        await _append(store, seed, 2, now=T0 + 10, keep_latest=None)

        assert await _sequences(store, seed, now=T0, include_expired=True) == [2, 0]

    async def test_pruning_removes_owned_items(self, store: CheckpointStore) -> None:
        seed = make_run("owned")
        key = key_of(seed)
        await _append_many(store, seed, [0, 1])
        await store.put_items(
            key,
            [make_item("of-0", owner=0), make_item("of-1", owner=1), make_item("free")],
            now=T0,
        )

        await _append(store, seed, 2, keep_latest=1)

        assert await store.get_items(key, ["of-0", "of-1", "free"], now=T0) == {
            "free": b"value-free"
        }

    # -- reads --------------------------------------------------------------------------------

    async def test_get_returns_checkpoint_and_status(self, store: CheckpointStore) -> None:
        seed = make_run("read", status="paused")
        written = await _append_many(store, seed, [0, 1, 2], expires_at=T0 + 50)
        for record in written:
            found = await store.get(key_of(seed), record.sequence, now=T0)
            assert found is not None
            assert without_key(found[0]) == record
            assert found[1] == "paused"

    async def test_reads_fill_the_store_key(self, store: CheckpointStore) -> None:
        seed = make_run("where")
        await _append(store, seed, 0)
        got = await store.get(key_of(seed), 0, now=T0)
        latest = await store.latest(key_of(seed), now=T0)
        assert got is not None
        assert latest is not None
        assert got[0].key
        assert latest[0].key

    async def test_get_missing_returns_none(self, store: CheckpointStore) -> None:
        seed = make_run("missing")
        key = key_of(seed)
        assert await store.get(key, 0, now=T0) is None
        await _append_many(store, seed, [0, 1])
        assert await store.get(key, 2, now=T0) is None
        assert await store.get(key, -1, now=T0) is None
        assert await store.get(key_of(make_run("other")), 0, now=T0) is None

    async def test_get_expired_returns_none(self, store: CheckpointStore) -> None:
        seed = make_run("ageing")
        key = key_of(seed)
        await _append(store, seed, 0)
        await _append(store, seed, 1, expires_at=T0 + 10)
        assert await store.get(key, 1, now=T0 + 9.5) is not None
        assert await store.get(key, 1, now=T0 + 10) is None
        assert await store.get(key, 1, now=T0 + 1000) is None
        assert await store.get(key, 0, now=T0 + 1000) is not None

    async def test_latest_returns_newest(self, store: CheckpointStore) -> None:
        seed = make_run("newest", status="completed")
        key = key_of(seed)
        assert await store.latest(key, now=T0) is None
        for sequence in range(4):
            record = await _append(store, seed, sequence)
            found = await store.latest(key, now=T0)
            assert found is not None
            assert without_key(found[0]) == record
            assert found[1] == "completed"

    async def test_latest_skips_expired_newest(self, store: CheckpointStore) -> None:
        seed = make_run("skip-expired")
        key = key_of(seed)
        await _append(store, seed, 0, expires_at=T0 + 30)
        older = await _append(store, seed, 1, expires_at=T0 + 20)
        await _append(store, seed, 2, expires_at=T0 + 10)
        await _append(store, seed, 3, expires_at=T0 + 10)

        found = await store.latest(key, now=T0 + 10)
        assert found is not None
        assert without_key(found[0]) == older
        assert found[1] == "active"
        found = await store.latest(key, now=T0 + 20)
        assert found is not None
        assert found[0].sequence == 0
        assert await store.latest(key, now=T0 + 30) is None

    async def test_headers_newest_first_without_payload(self, store: CheckpointStore) -> None:
        seed = make_run("listed", status="paused")
        written = await _append_many(store, seed, range(5), expires_at=T0 + 99)

        found, status = await store.headers(key_of(seed), before=None, limit=100, now=T0)

        assert status == "paused"
        assert found == [header_of(record) for record in reversed(written)]
        assert not any(isinstance(header, StoredCheckpoint) for header in found)

    async def test_headers_before_and_limit(self, store: CheckpointStore) -> None:
        seed = make_run("paged")
        key = key_of(seed)
        await _append_many(store, seed, range(10))

        async def page(before: int | None, limit: int) -> list[int]:
            found, _ = await store.headers(key, before=before, limit=limit, now=T0)
            return [header.sequence for header in found]

        assert await page(None, 3) == [9, 8, 7]
        assert await page(7, 3) == [6, 5, 4]
        assert await page(2, 10) == [1, 0]
        assert await page(0, 10) == []
        assert await page(100, 2) == [9, 8]
        assert await page(5, 1) == [4]
        visited: list[int] = []
        before: int | None = None
        for _ in range(10):
            chunk = await page(before, 4)
            if not chunk:
                break
            visited += chunk
            before = chunk[-1]
        assert visited == list(range(9, -1, -1))

    async def test_headers_limit_counts_live_headers(self, store: CheckpointStore) -> None:
        seed = make_run("gaps")
        await _append_many(store, seed, [0, 1, 2])
        await _append_many(store, seed, [3, 4], expires_at=T0 + 10)
        await _append(store, seed, 5)

        found, _ = await store.headers(key_of(seed), before=None, limit=2, now=T0 + 10)

        assert [header.sequence for header in found] == [5, 2]

    async def test_headers_include_expired(self, store: CheckpointStore) -> None:
        seed = make_run("history", status="paused")
        written = await _append_many(store, seed, [0, 1], expires_at=T0 + 10)
        written.append(await _append(store, seed, 2))
        key = key_of(seed)

        live, live_status = await store.headers(key, before=None, limit=10, now=T0 + 10)
        every, every_status = await store.headers(
            key, before=None, limit=10, now=T0 + 10, include_expired=True
        )
        page, _ = await store.headers(key, before=2, limit=1, now=T0 + 10, include_expired=True)

        assert [header.sequence for header in live] == [2]
        assert every == [header_of(record) for record in reversed(written)]
        assert [header.sequence for header in page] == [1]
        assert live_status == every_status == "paused"

    async def test_headers_of_absent_run(self, store: CheckpointStore) -> None:
        seed = make_run("nobody")
        assert await store.headers(key_of(seed), before=None, limit=10, now=T0) == ([], None)
        assert await store.headers(
            key_of(seed), before=None, limit=10, now=T0, include_expired=True
        ) == ([], None)

    async def test_reads_report_current_run_status(self, store: CheckpointStore) -> None:
        seed = make_run("status")
        key = key_of(seed)
        await _append_many(store, seed, [0, 1])

        await _update(store, seed, version=0, status="completed", now=T0 + 1)

        got = await store.get(key, 0, now=T0 + 1)
        latest = await store.latest(key, now=T0 + 1)
        _, listed = await store.headers(key, before=None, limit=10, now=T0 + 1)
        assert got is not None
        assert latest is not None
        assert (got[1], latest[1], listed) == ("completed", "completed", "completed")

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

    # -- items --------------------------------------------------------------------------------

    async def test_put_and_get_items(self, store: CheckpointStore) -> None:
        seed = make_run("items")
        key = key_of(seed)
        await _append(store, seed, 0)
        await store.put_items(key, [make_item("a", b"1"), make_item("b", b"2")], now=T0)
        await store.put_items(key, [make_item("b", b"22"), make_item("c", b"")], now=T0)

        assert await store.get_items(key, ["a", "b", "c", "missing"], now=T0) == {
            "a": b"1",
            "b": b"22",
            "c": b"",
        }
        assert await store.get_items(key, [], now=T0) == {}
        assert await store.get_items(key_of(make_run("other")), ["a"], now=T0) == {}

    async def test_scan_items_in_code_point_order(self, store: CheckpointStore) -> None:
        seed = make_run("ordered")
        key = key_of(seed)
        await _append(store, seed, 0)
        keys = ["b", "a", "B", "ab", "a/b", "a b", "~", "é", "z", "\uff5e", "\U0001f600", "0"]
        await store.put_items(key, [make_item(item_key) for item_key in keys], now=T0)

        forward = await store.scan_items(key, limit=100, now=T0)
        backward = await store.scan_items(key, limit=100, reverse=True, now=T0)

        expected = [(item_key, f"value-{item_key}".encode()) for item_key in sorted(keys)]
        assert forward == expected
        assert backward == expected[::-1]

    async def test_scan_items_by_prefix(self, store: CheckpointStore) -> None:
        seed = make_run("prefixed")
        key = key_of(seed)
        await _append(store, seed, 0)
        keys = ["w/1/a", "w/1/b", "w/10/a", "w/2/a", "w/", "w", "x/1/a", "v/1/a"]
        await store.put_items(key, [make_item(item_key) for item_key in keys], now=T0)

        async def scanned(prefix: str, *, reverse: bool = False) -> list[str]:
            found = await store.scan_items(key, prefix=prefix, reverse=reverse, now=T0)
            return [item_key for item_key, _ in found]

        assert await scanned("w/1/") == ["w/1/a", "w/1/b"]
        assert await scanned("w/1") == ["w/1/a", "w/1/b", "w/10/a"]
        assert await scanned("w/") == ["w/", "w/1/a", "w/1/b", "w/10/a", "w/2/a"]
        assert await scanned("w/1", reverse=True) == ["w/10/a", "w/1/b", "w/1/a"]
        assert await scanned("y") == []
        assert await scanned("") == sorted(keys)

    async def test_scan_items_after_a_key_with_limit(self, store: CheckpointStore) -> None:
        seed = make_run("paged-items")
        key = key_of(seed)
        await _append(store, seed, 0)
        keys = [f"k{index:02}" for index in range(30)]
        await store.put_items(key, [make_item(item_key) for item_key in keys], now=T0)

        async def scanned(start_after: str | None, limit: int, reverse: bool = False) -> list[str]:
            found = await store.scan_items(
                key, start_after=start_after, limit=limit, reverse=reverse, now=T0
            )
            return [item_key for item_key, _ in found]

        assert await scanned(None, 3) == ["k00", "k01", "k02"]
        assert await scanned("k05", 3) == ["k06", "k07", "k08"]
        assert await scanned("k055", 2) == ["k06", "k07"]
        assert await scanned("k28", 10) == ["k29"]
        assert await scanned("k29", 10) == []
        assert await scanned("a", 1) == ["k00"]
        assert await scanned(None, 2, reverse=True) == ["k29", "k28"]
        assert await scanned("k05", 3, reverse=True) == ["k04", "k03", "k02"]
        assert await scanned("k00", 3, reverse=True) == []
        assert await scanned("z", 1, reverse=True) == ["k29"]
        for reverse in (False, True):
            visited: list[str] = []
            start_after: str | None = None
            for _ in range(20):
                chunk = await scanned(start_after, 7, reverse)
                if not chunk:
                    break
                visited += chunk
                start_after = chunk[-1]
            assert visited == (keys[::-1] if reverse else keys)

    async def test_scan_items_with_prefix_and_start_after(self, store: CheckpointStore) -> None:
        seed = make_run("prefix-after")
        key = key_of(seed)
        await _append(store, seed, 0)
        keys = ["a/1", "a/2", "a/3", "b/1", "b/2", "b/3", "c/1"]
        await store.put_items(key, [make_item(item_key) for item_key in keys], now=T0)

        async def scanned(start_after: str, reverse: bool = False) -> list[str]:
            found = await store.scan_items(
                key, prefix="b/", start_after=start_after, reverse=reverse, now=T0
            )
            return [item_key for item_key, _ in found]

        assert await scanned("b/1") == ["b/2", "b/3"]
        assert await scanned("a/9") == ["b/1", "b/2", "b/3"]
        assert await scanned("c") == []
        assert await scanned("b/3", reverse=True) == ["b/2", "b/1"]
        assert await scanned("z", reverse=True) == ["b/3", "b/2", "b/1"]
        assert await scanned("a", reverse=True) == []

    async def test_put_items_create_only_conflict_writes_nothing(
        self, store: CheckpointStore
    ) -> None:
        seed = make_run("create-only")
        key = key_of(seed)
        await _append(store, seed, 0)
        await store.put_items(key, [make_item("taken", b"original")], now=T0)

        with pytest.raises(ConflictError):
            await store.put_items(
                key,
                [make_item("fresh", b"new"), make_item("taken", b"clobbered")],
                create_only=True,
                now=T0,
            )

        assert await store.get_items(key, ["fresh", "taken"], now=T0) == {"taken": b"original"}
        await store.put_items(key, [make_item("fresh", b"new")], create_only=True, now=T0)
        assert await store.get_items(key, ["fresh"], now=T0) == {"fresh": b"new"}

    async def test_put_items_create_only_replaces_expired_item(
        self, store: CheckpointStore
    ) -> None:
        seed = make_run("create-over-expired")
        key = key_of(seed)
        await _append(store, seed, 0)
        await store.put_items(key, [make_item("slot", b"old", expires_at=T0 + 10)], now=T0)

        with pytest.raises(ConflictError):
            await store.put_items(key, [make_item("slot", b"early")], create_only=True, now=T0 + 9)
        await store.put_items(key, [make_item("slot", b"new")], create_only=True, now=T0 + 10)

        assert await store.get_items(key, ["slot"], now=T0 + 10) == {"slot": b"new"}

    async def test_expired_items_are_hidden(self, store: CheckpointStore) -> None:
        seed = make_run("item-expiry")
        key = key_of(seed)
        await _append(store, seed, 0)
        await store.put_items(
            key,
            [
                make_item("a", expires_at=T0 + 10),
                make_item("b"),
                make_item("c", expires_at=T0 + 20),
            ],
            now=T0,
        )

        async def visible(now: float) -> tuple[list[str], list[str], list[str]]:
            got = await store.get_items(key, ["a", "b", "c"], now=now)
            forward = await store.scan_items(key, now=now)
            backward = await store.scan_items(key, reverse=True, now=now)
            return sorted(got), [k for k, _ in forward], [k for k, _ in backward]

        assert await visible(T0 + 9.5) == (["a", "b", "c"], ["a", "b", "c"], ["c", "b", "a"])
        assert await visible(T0 + 10) == (["b", "c"], ["b", "c"], ["c", "b"])
        assert await visible(T0 + 20) == (["b"], ["b"], ["b"])
        page = await store.scan_items(key, limit=1, now=T0 + 10)
        assert page == [("b", b"value-b")]

    async def test_delete_items_returns_count(self, store: CheckpointStore) -> None:
        seed = make_run("delete-items")
        key = key_of(seed)
        await _append(store, seed, 0)
        await store.put_items(key, [make_item(item_key) for item_key in "abcd"], now=T0)

        assert await store.delete_items(key, ["a", "c", "missing"]) == 2
        assert await store.delete_items(key, ["a"]) == 0
        assert await store.delete_items(key, []) == 0
        assert await store.delete_items(key_of(make_run("other")), ["b"]) == 0

        assert await store.get_items(key, list("abcd"), now=T0) == {
            "b": b"value-b",
            "d": b"value-d",
        }
        assert [k for k, _ in await store.scan_items(key, now=T0)] == ["b", "d"]

    async def test_items_survive_appends(self, store: CheckpointStore) -> None:
        seed = make_run("lasting-items")
        key = key_of(seed)
        await _append(store, seed, 0)
        await store.put_items(key, [make_item("free"), make_item("mine", owner=5)], now=T0)

        await _append_many(store, seed, range(1, 6), keep_latest=2)

        assert await store.get_items(key, ["free", "mine"], now=T0) == {
            "free": b"value-free",
            "mine": b"value-mine",
        }

    async def test_items_of_runs_are_separate(self, store: CheckpointStore) -> None:
        first, second = make_run("items-1"), make_run("items-2")
        await _append(store, first, 0)
        await _append(store, second, 0)
        await store.put_items(key_of(first), [make_item("k", b"first")], now=T0)
        await store.put_items(key_of(second), [make_item("k", b"second")], now=T0)

        assert await store.delete_items(key_of(first), ["k"]) == 1

        assert await store.get_items(key_of(first), ["k"], now=T0) == {}
        assert await store.scan_items(key_of(second), now=T0) == [("k", b"second")]

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

    # -- payloads -----------------------------------------------------------------------------

    async def test_large_payload_round_trip(self, store: CheckpointStore) -> None:
        seed = make_run("large")
        payload = random.Random(7).randbytes(1 << 20)
        header = random.Random(8).randbytes(4096)
        written = await _append(store, seed, 0, header=header, payload=payload)

        got = await store.get(key_of(seed), 0, now=T0)
        latest = await store.latest(key_of(seed), now=T0)
        found, _ = await store.headers(key_of(seed), before=None, limit=1, now=T0)

        assert got is not None
        assert latest is not None
        assert got[0].payload == payload
        assert without_key(got[0]) == written
        assert without_key(latest[0]) == written
        assert found == [header_of(written)]

    async def test_empty_and_binary_bytes(self, store: CheckpointStore) -> None:
        seed = make_run("bytes")
        key = key_of(seed)
        empty = await _append(store, seed, 0, header=b"", payload=b"")
        every_byte = bytes(range(256))
        binary = await _append(store, seed, 1, header=every_byte, payload=every_byte * 3)
        await store.put_items(
            key, [make_item("empty", b""), make_item("binary", every_byte)], now=T0
        )

        for record in (empty, binary):
            found = await store.get(key, record.sequence, now=T0)
            assert found is not None
            assert without_key(found[0]) == record
        listed, _ = await store.headers(key, before=None, limit=10, now=T0)
        assert listed == [header_of(binary), header_of(empty)]
        assert await store.get_items(key, ["empty", "binary"], now=T0) == {
            "empty": b"",
            "binary": every_byte,
        }

    # -- concurrency --------------------------------------------------------------------------

    async def test_concurrent_appends_one_winner(self, store: CheckpointStore) -> None:
        seed = make_run("race")
        key = key_of(seed)
        await _append(store, seed, 0)
        winners: list[bytes] = []
        losers: list[SequenceConflict] = []

        async def writer(index: int) -> None:
            payload = f"writer-{index}".encode()
            try:
                await _append(store, seed, 1, now=T0 + 1, payload=payload)
            except SequenceConflict as exc:
                losers.append(exc)
            else:
                winners.append(payload)

        async with anyio.create_task_group() as group:
            for index in range(10):
                group.start_soon(writer, index)

        assert len(winners) == 1
        assert len(losers) == 9
        assert {(exc.latest_sequence, exc.incarnation) for exc in losers} == {(1, seed.incarnation)}
        found = await store.get(key, 1, now=T0 + 1)
        assert found is not None
        assert found[0].payload == winners[0]
        run = await store.get_run(key, now=T0 + 1)
        assert run is not None
        assert (run.latest_sequence, run.checkpoint_count) == (1, 2)

    async def test_concurrent_first_appends_one_winner(self, store: CheckpointStore) -> None:
        seeds = [make_run("first-race", created_at=T0 + index) for index in range(10)]
        winners: list[RunRecord] = []
        losers: list[SequenceConflict] = []

        async def writer(seed: RunRecord) -> None:
            try:
                await _append(store, seed, 0, now=seed.created_at)
            except SequenceConflict as exc:
                losers.append(exc)
            else:
                winners.append(seed)

        async with anyio.create_task_group() as group:
            for seed in seeds:
                group.start_soon(writer, seed)

        assert len(winners) == 1
        assert len(losers) == 9
        winner = winners[0]
        # A loser may see the run between its creation and its first checkpoint: it is then
        # told to join the winner's incarnation at sequence 0 (latest_sequence -1).
        assert {exc.incarnation for exc in losers} == {winner.incarnation}
        assert {exc.latest_sequence for exc in losers} <= {-1, 0}
        assert await store.get_run(key_of(winner), now=T0 + 10) == _expected_run(
            winner,
            latest_sequence=0,
            checkpoint_count=1,
            updated_at=winner.created_at,
            expires_at=None,
        )
        assert await store.count_runs(status=None, now=T0 + 10) == 1

    async def test_runs_are_independent(self, store: CheckpointStore) -> None:
        first, second = make_run("independent-1"), make_run("independent-2")
        await _append_many(store, first, range(3))
        await _append_many(store, second, range(2), keep_latest=1)

        assert await _sequences(store, first, now=T0) == [2, 1, 0]
        assert await _sequences(store, second, now=T0) == [1]
        await _append(store, first, 3, keep_latest=1)
        assert await _sequences(store, second, now=T0) == [1]
        second_run = await store.get_run(key_of(second), now=T0)
        assert second_run is not None
        assert (second_run.latest_sequence, second_run.checkpoint_count) == (1, 1)
