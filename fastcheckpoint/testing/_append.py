"""The store contract, part one: ``append``, the one write of the checkpoint log."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable

import anyio
import msgspec
import pytest

from fastcheckpoint.errors import SequenceConflict, ValidationError
from fastcheckpoint.stores._base import (
    CheckpointStore,
    RunRecord,
    StoredCheckpoint,
    SupportsAppendNext,
)
from fastcheckpoint.testing._builders import (
    RELEASED,
    T0,
    key_of,
    make_checkpoint,
    make_item,
    make_run,
    without_key,
)
from fastcheckpoint.testing._contract import (
    ContractBase,
    _append,
    _append_many,
    _expected_run,
    _refuses_not_run_keys,
    _sequences,
    _snapshot,
    _update,
)

__all__ = ["AppendContract", "AppendNextContract"]


class _Keep(int, enum.Enum):
    """A limit whose ``str`` is ``_Keep.TWO``, not ``2``."""

    TWO = 2


class AppendContract(ContractBase):
    """``append``: the one write of a run's checkpoint log.

    A run is created by its sequence 0; each next sequence is accepted once, like a commit, and
    anything else is a ``SequenceConflict`` that changes nothing; a run that expired starts over
    at 0; the run's ``expires_at`` is the latest of its checkpoints'; pruning removes the
    expired, then the oldest beyond ``keep_latest``; of concurrent writers exactly one wins. The
    tests read back with ``get_run``, ``get``, ``latest`` and ``headers``, and use items owned
    by pruned checkpoints.
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

    async def test_a_run_that_ends_again_and_again_starts_over_each_time(
        self, store: CheckpointStore
    ) -> None:
        # Lives of 1, 1, 3, 1 and 2 checkpoints, each expired before the next starts, and no
        # cleanup between them: what one life leaves must never stop the next.
        now = T0
        for life, length in enumerate((1, 1, 3, 1, 2)):
            run = make_run("again", created_at=now, data=f"life {life}".encode())
            await _append_many(store, run, range(length), now=now, expires_at=now + 10)
            found = await store.get_run(key_of(run), now=now)
            assert found is not None
            assert (found.incarnation, found.latest_sequence) == (
                run.incarnation, length - 1)
            now += 20
        assert await store.get_run(key_of(run), now=now) is None

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

    async def test_keep_latest_of_an_int_subclass_is_its_value(
        self, store: CheckpointStore
    ) -> None:
        """An ``int`` subclass (an ``IntEnum``, an ``int``-mixin enum whose ``str`` is its
        name) keeps what its value says: the store hands a driver the plain ``int``."""
        seed = make_run("pruned-enum")
        for sequence in range(4):
            await _append(store, seed, sequence, keep_latest=_Keep.TWO)
        assert await _sequences(store, seed, now=T0, include_expired=True) == [3, 2]

    @pytest.mark.parametrize("keep_latest", [0, -1, True, 2.5, "3"])
    async def test_a_bad_keep_latest_is_refused_before_any_change(
        self, store: CheckpointStore, keep_latest: object
    ) -> None:
        seed = make_run("bad-keep")
        await _append(store, seed, 0)

        with pytest.raises(ValidationError):
            await _append(store, seed, 1, keep_latest=keep_latest)  # type: ignore[arg-type]

        assert await _sequences(store, seed, now=T0, include_expired=True) == [0]

    @pytest.mark.parametrize(
        ("part", "field", "value"),
        [
            ("record", "payload", None), ("record", "header", "text"), ("record", "refs", None),
            ("record", "refs", (7,)), ("record", "refs", "abc"), ("record", "created_at", "now"),
            ("record", "expires_at", math.nan), ("record", "sequence", "1"),
            ("record", "checkpoint_id", 7), ("run", "run_id", 5), ("run", "incarnation", None),
            ("run", "status", 3), ("run", "data", "text"), ("run", "version", 1.5),
            ("run", "created_at", math.inf), ("run", "labels", "abc"),
            ("record", "payload", memoryview(b"abcdefgh")[::2]),
            ("record", "header", RELEASED), ("run", "data", memoryview(b"abcdefgh")[::2]),
        ],
    )
    async def test_fields_of_the_wrong_type_are_refused_before_any_change(
        self, store: CheckpointStore, part: str, field: str, value: object
    ) -> None:
        """What a caller other than the manager may pass: refused with ``ValidationError``,
        for a new run (none is made) and an existing one (its log unchanged), never stored
        for a later read to trip over."""
        run = make_run("typed")
        await _append_many(store, run, range(1))
        before = await _snapshot(store, run, now=T0)
        fresh = make_run("typed-new")
        for target, sequence in ((run, 1), (fresh, 0)):
            record = make_checkpoint(target, sequence)
            seed = target
            if part == "record":
                record = msgspec.structs.replace(record, **{field: value})
            else:
                seed = msgspec.structs.replace(target, **{field: value})
            with pytest.raises(ValidationError):
                await store.append(key_of(target), record, run=seed, keep_latest=None, now=T0)
        assert await _snapshot(store, run, now=T0) == before
        assert await store.get_run(key_of(fresh), now=T0) is None

    async def test_a_run_record_of_another_run_is_refused_before_any_change(
        self, store: CheckpointStore
    ) -> None:
        """A run record whose run id is not the run key's (a caller's mix-up) is refused with
        ``ValidationError``: stored, every later read would find a record that names another
        run, which is damage."""
        run = make_run("own")
        await _append_many(store, run, range(1))
        before = await _snapshot(store, run, now=T0)
        fresh = make_run("own-new")
        for target, sequence in ((run, 1), (fresh, 0)):
            seed = msgspec.structs.replace(target, run_id="another-run")
            with pytest.raises(ValidationError, match="another"):
                await store.append(key_of(target), make_checkpoint(target, sequence), run=seed,
                                   keep_latest=None, now=T0)
        assert await _snapshot(store, run, now=T0) == before
        assert await store.get_run(key_of(fresh), now=T0) is None

    async def test_bytes_given_as_a_bytearray_are_stored_as_they_were(
        self, store: CheckpointStore
    ) -> None:
        header, payload, data = bytearray(b"header"), bytearray(b"payload"), bytearray(b"d0")
        run = make_run("copied")
        key = key_of(run)
        record = msgspec.structs.replace(make_checkpoint(run, 0), header=header, payload=payload)
        await store.append(key, record, run=msgspec.structs.replace(run, data=data),
                           keep_latest=None, now=T0)
        header[:], payload[:], data[:] = b"XXXXXX", b"XXXXXXX", b"XX"
        changed = bytearray(b"d1")
        await _update(store, run, version=0, status="paused", data=changed)  # type: ignore[arg-type]
        changed[:] = b"XX"

        found = await store.get(key, 0, now=T0)
        assert found is not None
        assert (found[0].header, found[0].payload) == (b"header", b"payload")
        stored = await store.get_run(key, now=T0)
        assert stored is not None
        assert (stored.status, stored.data) == ("paused", b"d1")

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

    async def test_append_refuses_what_is_not_a_run_key(self, store: CheckpointStore) -> None:
        seed, new = make_run("addressed"), make_run("never-created")
        await _append_many(store, seed, range(2))

        await _refuses_not_run_keys(store, seed, lambda value: store.append(
            value, make_checkpoint(new, 0), run=new, keep_latest=None, now=T0))
        await _refuses_not_run_keys(store, seed, lambda value: store.append(
            value, make_checkpoint(seed, 2), run=seed, keep_latest=1, now=T0))



class AppendNextContract(ContractBase):
    """``SupportsAppendNext``: an append whose sequence others took is renumbered to the
    run's next one (by the caller's ``renumber``) instead of failing; every other conflict
    fails as ``append``'s does, without calling it."""

    @staticmethod
    def _renumber(run: RunRecord, calls: list[int], *, payload: bytes = b"same payload"
                  ) -> Callable[[int], StoredCheckpoint]:
        def renumber(sequence: int) -> StoredCheckpoint:
            calls.append(sequence)
            return make_checkpoint(run, sequence, payload=payload)

        return renumber

    async def test_store_offers_append_next(self, store: CheckpointStore) -> None:
        assert isinstance(store, SupportsAppendNext)

    async def test_a_taken_sequence_is_renumbered_to_the_next(
        self, store: CheckpointStore
    ) -> None:
        assert isinstance(store, SupportsAppendNext)
        run = make_run("renumbered")
        await _append_many(store, run, range(3))
        calls: list[int] = []

        status, written = await store.append_next(
            key_of(run), make_checkpoint(run, 1, payload=b"same payload"), run=run,
            keep_latest=None, now=T0, renumber=self._renumber(run, calls))

        assert (status, calls) == ("active", [3])
        assert written == make_checkpoint(run, 3, payload=b"same payload")
        found = await store.latest(key_of(run), now=T0)
        assert found is not None
        assert (without_key(found[0]), found[1]) == (written, "active")
        assert await _sequences(store, run, now=T0) == [3, 2, 1, 0]
        stored = await store.get_run(key_of(run), now=T0)
        assert stored is not None
        assert (stored.latest_sequence, stored.checkpoint_count) == (3, 4)

    async def test_the_next_sequence_is_appended_as_given(self, store: CheckpointStore) -> None:
        assert isinstance(store, SupportsAppendNext)
        run = make_run("in-turn")
        await _append_many(store, run, range(2))
        calls: list[int] = []
        record = make_checkpoint(run, 2)

        _, written = await store.append_next(
            key_of(run), record, run=run, keep_latest=1, now=T0,
            renumber=self._renumber(run, calls))

        assert (written, calls) == (record, [])
        assert await _sequences(store, run, now=T0) == [2]

    async def test_a_new_run_starts_at_zero_without_renumbering(
        self, store: CheckpointStore
    ) -> None:
        assert isinstance(store, SupportsAppendNext)
        run = make_run("fresh")
        calls: list[int] = []
        _, written = await store.append_next(
            key_of(run), make_checkpoint(run, 0), run=run, keep_latest=None, now=T0,
            renumber=self._renumber(run, calls))
        assert (written.sequence, calls) == (0, [])
        other_life = make_run("fresh", incarnation="another")
        with pytest.raises(SequenceConflict):
            await store.append_next(
                key_of(run), make_checkpoint(other_life, 5), run=other_life, keep_latest=None,
                now=T0, renumber=self._renumber(other_life, calls))
        absent = make_run("absent")
        with pytest.raises(SequenceConflict):
            await store.append_next(
                key_of(absent), make_checkpoint(absent, 4), run=absent, keep_latest=None,
                now=T0, renumber=self._renumber(absent, calls))
        assert calls == []
        assert await _sequences(store, run, now=T0) == [0]
        assert await store.get_run(key_of(absent), now=T0) is None

    async def test_bad_records_are_refused_and_nothing_is_written(
        self, store: CheckpointStore
    ) -> None:
        assert isinstance(store, SupportsAppendNext)
        run = make_run("refused")
        await _append_many(store, run, range(2))
        before = await _snapshot(store, run, now=T0)
        with_refs = msgspec.structs.replace(make_checkpoint(run, 2), refs=("shared/a",))
        with pytest.raises(ValidationError):
            await store.append_next(
                key_of(run), with_refs, run=run, keep_latest=None, now=T0,
                renumber=self._renumber(run, []))

        def elsewhere(sequence: int) -> StoredCheckpoint:
            return make_checkpoint(run, sequence + 7)

        with pytest.raises(ValidationError):
            await store.append_next(
                key_of(run), make_checkpoint(run, 0), run=run, keep_latest=None, now=T0,
                renumber=elsewhere)
        assert await _snapshot(store, run, now=T0) == before

    async def test_append_next_refuses_what_is_not_a_run_key(
        self, store: CheckpointStore
    ) -> None:
        assert isinstance(store, SupportsAppendNext)
        seed, new = make_run("addressed"), make_run("never-created")
        await _append_many(store, seed, range(2))
        calls: list[int] = []

        await _refuses_not_run_keys(store, seed, lambda value: store.append_next(
            value, make_checkpoint(new, 0), run=new, keep_latest=None, now=T0,
            renumber=self._renumber(new, calls)))
        await _refuses_not_run_keys(store, seed, lambda value: store.append_next(
            value, make_checkpoint(seed, 1), run=seed, keep_latest=None, now=T0,
            renumber=self._renumber(seed, calls)))
        assert calls == []

    async def test_concurrent_writers_all_land_once_in_order(
        self, store: CheckpointStore
    ) -> None:
        """Writers that all propose the same sequence: none fails, each lands exactly once,
        and the sequences are gap-free."""
        assert isinstance(store, SupportsAppendNext)
        run = make_run("crowd")
        await _append(store, run, 0)
        payloads: list[bytes] = []

        async def writer(number: int) -> None:
            payload = f"writer-{number}".encode()
            _, written = await store.append_next(
                key_of(run), make_checkpoint(run, 1, payload=payload), run=run,
                keep_latest=None, now=T0,
                renumber=self._renumber(run, [], payload=payload))
            payloads.append(written.payload)

        async with anyio.create_task_group() as group:
            for number in range(8):
                group.start_soon(writer, number)

        assert sorted(payloads) == sorted(f"writer-{n}".encode() for n in range(8))
        assert await _sequences(store, run, now=T0) == list(range(8, -1, -1))
        found = [await store.get(key_of(run), s, now=T0) for s in range(1, 9)]
        assert sorted(f[0].payload for f in found if f is not None) == sorted(payloads)
