"""Contracts of the capabilities adapters build on: ``SupportsLabels``,
``SupportsSharedItems`` and ``SupportsNestedItems`` (see their docstrings in
:mod:`fastcheckpoint.stores`).

A backend's test class subclasses the mixin of each capability it offers, with the same
``store`` fixture as :class:`~fastcheckpoint.testing.StoreContract`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import ClassVar

import anyio
import msgspec
import pytest

from fastcheckpoint.errors import SequenceConflict, SharedItemGone, ValidationError
from fastcheckpoint.stores._base import (
    MAX_ITEM_KEY_BYTES,
    MAX_LABEL_BYTES,
    CheckpointStore,
    Item,
    RunRecord,
    StoredCheckpoint,
    SupportsLabels,
    SupportsNestedItems,
    SupportsSharedItems,
    nested_prefix,
    offers_nested_items,
)
from fastcheckpoint.testing._builders import (
    T0,
    checkpoint_id_of,
    key_of,
    make_checkpoint,
    make_item,
    make_run,
    without_key,
)
from fastcheckpoint.testing._contract import (
    ContractBase,
    _append,
    _delete,
    _refuses_not_run_keys,
    _sequences,
)

__all__ = ["LabelsContract", "NestedItemsContract", "SharedItemsContract"]


async def _labelled(
    store: CheckpointStore, run_id: str, labels: tuple[str, ...], *, now: float = T0,
    expires_at: float | None = None,
) -> RunRecord:
    run = make_run(run_id, created_at=now)
    seed = msgspec.structs.replace(run, labels=labels)
    await _append(store, seed, 0, now=now, expires_at=expires_at)
    return seed


async def _all_with(store: SupportsLabels, label: str, *, now: float, limit: int = 2) -> list[str]:
    """Run ids carrying ``label``, every page read with ``limit`` runs per page."""
    found: list[str] = []
    cursor: str | None = None
    while True:
        page, cursor = await store.runs_with_label(label, limit=limit, cursor=cursor, now=now)
        found += [record.run_id for record in page]
        if cursor is None:
            return found


class LabelsContract(ContractBase):
    """``SupportsLabels``: runs carry labels from their creation and are found by them."""

    async def test_store_offers_labels(self, store: CheckpointStore) -> None:
        assert isinstance(store, SupportsLabels)

    async def test_labels_are_kept_and_returned(self, store: CheckpointStore) -> None:
        seed = await _labelled(store, "kept", ("thread:t1", "app:a"))

        record = await store.get_run(key_of(seed), now=T0)
        assert record is not None
        assert record.labels == ("thread:t1", "app:a")
        runs, _ = await store.list_runs(status=None, limit=10, cursor=None, now=T0)
        assert [found.labels for found in runs] == [("thread:t1", "app:a")]

    async def test_runs_are_found_by_each_label_newest_first(
        self, store: CheckpointStore
    ) -> None:
        assert isinstance(store, SupportsLabels)
        for index in range(5):
            labels = ("thread:t1",) if index % 2 == 0 else ("thread:t2",)
            await _labelled(store, f"run-{index}", (*labels, "all"), now=T0 + index)

        assert await _all_with(store, "thread:t1", now=T0 + 10) == ["run-4", "run-2", "run-0"]
        assert await _all_with(store, "thread:t2", now=T0 + 10) == ["run-3", "run-1"]
        assert await _all_with(store, "all", now=T0 + 10, limit=1) == [
            f"run-{index}" for index in (4, 3, 2, 1, 0)
        ]
        assert await _all_with(store, "nobody", now=T0 + 10) == []

    async def test_a_listing_by_a_label_no_run_can_carry_is_refused(
        self, store: CheckpointStore
    ) -> None:
        """What a seed's labels may not be, a listing may not ask for: an empty label, one
        that is not a ``str`` or not valid unicode, one over the byte limit."""
        assert isinstance(store, SupportsLabels)
        for label in ("", 7, "lone \ud800", "x" * (MAX_LABEL_BYTES + 1)):
            with pytest.raises(ValidationError):
                await store.runs_with_label(label, limit=5, cursor=None,  # type: ignore[arg-type]
                                            now=T0)

    async def test_appends_do_not_change_labels(self, store: CheckpointStore) -> None:
        assert isinstance(store, SupportsLabels)
        seed = await _labelled(store, "fixed", ("first",))
        later = msgspec.structs.replace(seed, labels=("second",))
        await _append(store, later, 1, now=T0 + 1)

        assert await _all_with(store, "first", now=T0 + 2) == ["fixed"]
        assert await _all_with(store, "second", now=T0 + 2) == []

    async def test_a_deleted_or_expired_run_leaves_its_labels(
        self, store: CheckpointStore
    ) -> None:
        assert isinstance(store, SupportsLabels)
        deleted = await _labelled(store, "deleted", ("gone",))
        await _labelled(store, "expiring", ("gone",), expires_at=T0 + 10)
        await _labelled(store, "staying", ("gone",))
        await store.delete_run(key_of(deleted))

        assert await _all_with(store, "gone", now=T0 + 5) == ["staying", "expiring"]
        assert await _all_with(store, "gone", now=T0 + 10) == ["staying"]
        await store.purge_expired(now=T0 + 10, limit=1000)
        assert await _all_with(store, "gone", now=T0 + 5) == ["staying"]

    async def test_a_new_incarnation_takes_its_seeds_labels(
        self, store: CheckpointStore
    ) -> None:
        assert isinstance(store, SupportsLabels)
        first = await _labelled(store, "reborn", ("old",))
        await store.delete_run(key_of(first))
        await _labelled(store, "reborn", ("new",), now=T0 + 1)

        assert await _all_with(store, "old", now=T0 + 2) == []
        assert await _all_with(store, "new", now=T0 + 2) == ["reborn"]

    @pytest.mark.parametrize(
        "labels",
        [("",), ("x" * 257,), tuple(f"l{index}" for index in range(17)), ("ok", 7)],
        ids=["empty", "too-long", "too-many", "not-str"],
    )
    async def test_invalid_labels_are_refused_and_nothing_is_written(
        self, store: CheckpointStore, labels: tuple[object, ...]
    ) -> None:
        seed = msgspec.structs.replace(make_run("refused"), labels=labels)

        with pytest.raises(ValidationError):
            await _append(store, seed, 0)
        assert await store.get_run(key_of(seed), now=T0) is None


def _with_refs(
    run: RunRecord, sequence: int, refs: Sequence[str], *, created_at: float,
    expires_at: float | None,
) -> StoredCheckpoint:
    record = make_checkpoint(run, sequence, created_at=created_at, expires_at=expires_at)
    return msgspec.structs.replace(record, refs=tuple(refs))


async def _append_items(
    store: CheckpointStore,
    run: RunRecord,
    sequence: int,
    *,
    refs: Sequence[str] = (),
    items: Sequence[Item] = (),
    now: float = T0,
    expires_at: float | None = None,
    keep_latest: int | None = None,
) -> StoredCheckpoint:
    assert isinstance(store, SupportsSharedItems)
    record = _with_refs(run, sequence, refs, created_at=now, expires_at=expires_at)
    seed = msgspec.structs.replace(run, expires_at=expires_at)
    await store.append_with_items(
        key_of(run), record, run=seed, keep_latest=keep_latest, now=now, items=items
    )
    return record


async def _read(
    store: CheckpointStore, run: RunRecord, sequence: int | None, *, now: float = T0
) -> tuple[StoredCheckpoint, str, dict[str, bytes]] | None:
    assert isinstance(store, SupportsSharedItems)
    return await store.read_with_items(key_of(run), sequence=sequence, now=now)


async def _stored(store: CheckpointStore, run: RunRecord, keys: Sequence[str], *, now: float
                  = T0) -> dict[str, bytes]:
    return await store.get_items(key_of(run), list(keys), now=now)


class SharedItemsContract(ContractBase):
    """``SupportsSharedItems``: checkpoints with their items, shared items, owned writes."""

    refs_checked_when_appended: ClassVar[bool] = True
    """Whether the store refuses a ref naming an item that was never written (it reads every
    ref in the append's atomic step); every store refuses a ref to an item a removal took."""

    async def test_a_read_of_a_sequence_that_is_no_int_is_refused(
        self, store: CheckpointStore
    ) -> None:
        seed = make_run("typed-read")
        await _append_items(store, seed, 0)
        for wrong in ("0", 0.0, True, 2**64):
            with pytest.raises(ValidationError):
                await _read(store, seed, wrong)  # type: ignore[arg-type]
        assert await _read(store, seed, 2**62) is None
        assert await _read(store, seed, -1) is None

    async def test_store_offers_shared_items(self, store: CheckpointStore) -> None:
        assert isinstance(store, SupportsSharedItems)

    async def test_append_writes_the_checkpoint_and_its_items_together(
        self, store: CheckpointStore
    ) -> None:
        run = make_run("together")
        record = await _append_items(
            store, run, 0, refs=["b/a", "b/b"],
            items=[make_item("b/a"), make_item("b/b"), make_item("w/0/x", owner=0)],
        )

        found = await _read(store, run, 0)
        assert found is not None
        checkpoint, status, items = found
        assert without_key(checkpoint) == record
        assert checkpoint.refs == ("b/a", "b/b")
        assert status == "active"
        assert items == {"b/a": b"value-b/a", "b/b": b"value-b/b", "w/0/x": b"value-w/0/x"}
        assert await _read(store, run, None) == found

    async def test_an_item_written_once_is_never_rewritten(self, store: CheckpointStore) -> None:
        run = make_run("written-once")
        await _append_items(store, run, 0, refs=["b/a"], items=[make_item("b/a", b"first")])
        await _append_items(store, run, 1, refs=["b/a"], items=[make_item("b/a", b"second")])

        found = await _read(store, run, 1)
        assert found is not None
        assert found[2] == {"b/a": b"first"}

    async def test_an_item_past_its_own_expiry_is_written_anew_when_named(
        self, store: CheckpointStore
    ) -> None:
        run = make_run("expired-loose")
        await _append_items(store, run, 0)
        await store.put_items(key_of(run), [make_item("b/a", b"old", expires_at=T0 + 10)],
                              now=T0)
        later = T0 + 20  # expired, not purged: absent
        if self.refs_checked_when_appended:
            with pytest.raises(SharedItemGone):
                await _append_items(store, run, 1, refs=["b/a"], now=later)
        await _append_items(store, run, 1, refs=["b/a"], items=[make_item("b/a", b"new")],
                            now=later)

        found = await _read(store, run, 1, now=later)
        assert found is not None
        assert found[2] == {"b/a": b"new"}
        assert await _stored(store, run, ["b/a"], now=later + 1000) == {"b/a": b"new"}

    async def test_a_shared_item_written_with_an_expiry_lives_while_named(
        self, store: CheckpointStore
    ) -> None:
        # Written unowned with its checkpoint, an expiry given with it: shared items have
        # none of their own, the checkpoints naming them decide their life.
        run = make_run("named-given-expiry")
        await _append_items(store, run, 0, refs=["b/a"],
                            items=[make_item("b/a", b"a", expires_at=T0 + 10),
                                   make_item("b/a/1", b"n", expires_at=T0 + 10)])
        assert isinstance(store, SupportsSharedItems)
        await store.purge_expired(now=T0 + 20, limit=100)
        found = await _read(store, run, 0, now=T0 + 20)
        assert found is not None
        assert found[2]["b/a"] == b"a"
        assert await _stored(store, run, ["b/a", "b/a/1"], now=T0 + 20) == {
            "b/a": b"a", "b/a/1": b"n"}

    async def test_an_owned_key_of_a_checkpoint_the_append_removes(
        self, store: CheckpointStore
    ) -> None:
        # Owned by a live checkpoint that keep_latest prunes: the item is held when the
        # append writes (a live value is never replaced), then goes with its owner.
        run = make_run("owned-pruned")
        await _append_items(store, run, 0, items=[make_item("o", b"of 0", owner=0)])
        await _append_items(store, run, 1)
        await _append_items(store, run, 2, items=[make_item("o", b"of 2", owner=2)],
                            keep_latest=2)
        found = await _read(store, run, 2)
        assert found is not None
        assert found[2] == {}
        # Owned by a checkpoint that expired: the append is made (what the key then holds
        # is the store's to say: an owned key is its owner's, see SupportsSharedItems).
        run = make_run("owned-expired")
        await _append_items(store, run, 0, items=[make_item("o", b"of 0", owner=0)],
                            expires_at=T0 + 10)
        await _append_items(store, run, 1, now=T0 + 1)
        await _append_items(store, run, 2, items=[make_item("o", b"of 2", owner=2)],
                            now=T0 + 20)
        found = await _read(store, run, 2, now=T0 + 20)
        assert found is not None
        assert found[0].sequence == 2

    async def test_later_checkpoints_share_items_of_earlier_ones(
        self, store: CheckpointStore
    ) -> None:
        run = make_run("sharing")
        await _append_items(store, run, 0, refs=["b/a1", "b/b1"],
                            items=[make_item("b/a1"), make_item("b/b1")])
        await _append_items(store, run, 1, refs=["b/a2", "b/b1"], items=[make_item("b/a2")])

        first, second = await _read(store, run, 0), await _read(store, run, 1)
        assert first is not None
        assert second is not None
        assert set(first[2]) == {"b/a1", "b/b1"}
        assert set(second[2]) == {"b/a2", "b/b1"}

    async def test_a_shared_item_lives_while_a_held_checkpoint_names_it(
        self, store: CheckpointStore
    ) -> None:
        run = make_run("pruned-sharing")
        await _append_items(store, run, 0, refs=["b/a", "b/old"],
                            items=[make_item("b/a"), make_item("b/old")])
        await _append_items(store, run, 1, refs=["b/a", "b/new"], items=[make_item("b/new")],
                            keep_latest=1)
        await store.purge_expired(now=T0, limit=1000)

        assert await _sequences(store, run, now=T0) == [1]
        found = await _read(store, run, 1)
        assert found is not None
        assert found[2] == {"b/a": b"value-b/a", "b/new": b"value-b/new"}
        assert await _stored(store, run, ["b/old"]) == {}

    async def test_items_named_by_no_held_checkpoint_are_removed(
        self, store: CheckpointStore
    ) -> None:
        run = make_run("unreferenced")
        first = await _append_items(store, run, 0, refs=["b/a"], items=[make_item("b/a")])
        await _append_items(store, run, 1, refs=["b/a", "b/b"], items=[make_item("b/b")])
        await _delete(store, run, 1)
        await store.purge_expired(now=T0, limit=1000)
        assert await _stored(store, run, ["b/a", "b/b"]) == {"b/a": b"value-b/a"}

        assert await store.delete(key_of(run), 0, checkpoint_id=first.checkpoint_id)
        await store.purge_expired(now=T0, limit=1000)
        assert await _stored(store, run, ["b/a", "b/b"]) == {}

    async def test_items_of_expired_checkpoints_go_with_them(
        self, store: CheckpointStore
    ) -> None:
        run = make_run("expiring-items")
        await _append_items(store, run, 0, refs=["b/a"], expires_at=T0 + 10,
                            items=[make_item("b/a"), make_item("w/0", owner=0)])
        await _append_items(store, run, 1, refs=["b/a", "b/b"], expires_at=T0 + 20,
                            items=[make_item("b/b"), make_item("w/1", owner=1)])

        later = await _read(store, run, 1, now=T0 + 15)
        assert later is not None
        assert set(later[2]) == {"b/a", "b/b", "w/1"}
        assert await _read(store, run, 0, now=T0 + 15) is None
        await store.purge_expired(now=T0 + 20, limit=1000)
        assert await _stored(store, run, ["b/a", "b/b", "w/0", "w/1"], now=T0) == {}

    async def test_a_run_deleted_takes_its_shared_items(self, store: CheckpointStore) -> None:
        run = make_run("deleted-with-items")
        await _append_items(store, run, 0, refs=["b/a"], items=[make_item("b/a")])
        await store.delete_run(key_of(run))

        assert await _stored(store, run, ["b/a"]) == {}

    async def test_a_ref_to_an_item_a_removal_took_is_refused(
        self, store: CheckpointStore
    ) -> None:
        """A writer that believes an item is still held (another process pruned its last
        holder meanwhile) names it without its value: the append is refused, nothing is
        written, and sending the value makes it."""
        run = make_run("stale-ref")
        await _append_items(store, run, 0, refs=["b/a"], items=[make_item("b/a")])
        await _append_items(store, run, 1, refs=["b/b"], items=[make_item("b/b")],
                            keep_latest=1)
        await store.purge_expired(now=T0, limit=1000)
        assert await _stored(store, run, ["b/a"]) == {}

        with pytest.raises(SharedItemGone):
            await _append_items(store, run, 2, refs=["b/a", "b/b"], items=[make_item("w/2",
                                owner=2)])
        found = await _read(store, run, None)
        assert found is not None
        assert (found[0].sequence, found[2]) == (1, {"b/b": b"value-b/b"})
        assert await _stored(store, run, ["b/a", "w/2"]) == {}

        await _append_items(store, run, 2, refs=["b/a", "b/b"], items=[make_item("b/a")])
        found = await _read(store, run, None)
        assert found is not None
        assert (found[0].sequence, found[2]) == (2, {"b/a": b"value-b/a",
                                                     "b/b": b"value-b/b"})

    async def test_a_ref_to_an_item_never_written_is_refused(
        self, store: CheckpointStore
    ) -> None:
        """Stores that read every ref in the append's atomic step refuse one naming an item
        the run does not hold (and the append does not write); S3 and DynamoDB check refs
        against the removals they remember instead (``refs_checked_when_appended``)."""
        if not self.refs_checked_when_appended:
            pytest.skip("this store checks refs against the removals it remembers")
        run = make_run("dangling")
        await _append_items(store, run, 0, refs=["b/here"], items=[make_item("b/here")])

        with pytest.raises(SharedItemGone) as refused:
            await _append_items(store, run, 1, refs=["b/missing", "b/here", "b/new"],
                                items=[make_item("b/new")])
        assert refused.value.keys in ((), ("b/missing",))
        assert await _sequences(store, run, now=T0) == [0]
        assert await _stored(store, run, ["b/new"]) == {}

        with pytest.raises(SharedItemGone):
            await _append_items(store, make_run("dangling-new"), 0, refs=["b/missing"])
        assert await store.get_run(key_of(make_run("dangling-new")), now=T0) is None

    async def test_a_new_life_of_a_run_holds_only_its_loose_items(
        self, store: CheckpointStore
    ) -> None:
        """A run appended again after it expired does not hold what the checkpoints of its
        earlier life named (they go with them): naming one without its value is refused and
        creates nothing; an item put with ``put_items`` outlives them and may be named."""
        if not self.refs_checked_when_appended:
            pytest.skip("this store checks refs against the removals it remembers")
        old = make_run("reborn")
        await _append_items(store, old, 0, refs=["b/named"], items=[make_item("b/named")],
                            expires_at=T0 + 10)
        await store.put_items(key_of(old), [make_item("b/loose")], now=T0)
        later = T0 + 20
        new = msgspec.structs.replace(make_run("reborn"), created_at=later)

        with pytest.raises(SharedItemGone) as refused:
            await _append_items(store, new, 0, refs=["b/loose", "b/named"], now=later)
        assert refused.value.keys in ((), ("b/named",))
        assert await store.get_run(key_of(new), now=later) is None

        await _append_items(store, new, 0, refs=["b/loose"], now=later)
        found = await _read(store, new, 0, now=later)
        assert found is not None
        assert found[2] == {"b/loose": b"value-b/loose"}

    async def test_read_latest_skips_expired_and_missing(self, store: CheckpointStore) -> None:
        run = make_run("latest-read")
        assert await _read(store, run, None) is None
        await _append_items(store, run, 0, refs=["b/a"], items=[make_item("b/a")])
        await _append_items(store, run, 1, refs=["b/b"], items=[make_item("b/b")],
                            expires_at=T0 + 5)

        found = await _read(store, run, None, now=T0 + 5)
        assert found is not None
        assert found[0].sequence == 0
        assert found[2] == {"b/a": b"value-b/a"}
        assert await _read(store, run, 7) is None

    async def test_a_refused_append_writes_no_item(self, store: CheckpointStore) -> None:
        assert isinstance(store, SupportsSharedItems)
        run = make_run("refused-items")
        await _append_items(store, run, 0)

        with pytest.raises(SequenceConflict):
            await _append_items(store, run, 5, refs=["b/x"],
                                items=[make_item("b/x"), make_item("w/5", owner=5)])
        assert await _stored(store, run, ["b/x", "w/5"]) == {}

    @pytest.mark.parametrize(
        ("refs", "items"),
        [
            ((), [Item(key="w/x", value=b"v", owner=3)]),
            (("x" * (MAX_ITEM_KEY_BYTES + 1),), []),
            ((), [Item(key="y" * (MAX_ITEM_KEY_BYTES + 1), value=b"v")]),
            ((), [Item(key="w/x", value="text")]),  # type: ignore[arg-type]
            ((), [Item(key="w/x", value=b"v", expires_at=math.nan)]),
            ((), ["w/x"]),
            ((), [Item(key=7, value=b"v")]),  # type: ignore[arg-type]
        ],
        ids=["foreign-owner", "long-ref", "long-key", "text-value", "nan-expiry", "not-an-item",
             "int-key"],
    )
    async def test_invalid_items_are_refused_and_nothing_is_written(
        self, store: CheckpointStore, refs: tuple[str, ...], items: list[Item]
    ) -> None:
        run = make_run("invalid-items")

        with pytest.raises(ValidationError):
            await _append_items(store, run, 0, refs=refs, items=items)
        assert await store.get_run(key_of(run), now=T0) is None

    async def test_owned_items_of_the_wrong_type_are_refused_and_nothing_is_written(
        self, store: CheckpointStore
    ) -> None:
        assert isinstance(store, SupportsSharedItems)
        run = make_run("owned-typed")
        await _append_items(store, run, 0)
        key = key_of(run)
        for bad in (Item(key="w/b", value="text", owner=0),  # type: ignore[arg-type]
                    Item(key="w/b", value=b"v", owner=0, expires_at=math.inf)):
            with pytest.raises(ValidationError):
                await store.put_owned_items(
                    key, [make_item("w/a", owner=0), bad], owner=0,
                    checkpoint_id=checkpoint_id_of(run, 0), if_absent=False, now=T0)
        assert await store.get_items(key, ["w/a", "w/b"], now=T0) == {}

    async def test_owned_items_are_written_only_to_a_live_checkpoint(
        self, store: CheckpointStore
    ) -> None:
        assert isinstance(store, SupportsSharedItems)
        run = make_run("owned")
        await _append_items(store, run, 0, expires_at=T0 + 10)
        key = key_of(run)
        own = checkpoint_id_of(run, 0)

        assert await store.put_owned_items(key, [make_item("w/a", owner=0)], owner=0,
                                           checkpoint_id=own, if_absent=False, now=T0)
        assert not await store.put_owned_items(key, [make_item("w/b", owner=0)], owner=0,
                                               checkpoint_id=own, if_absent=False,
                                               now=T0 + 10)
        other_life = checkpoint_id_of(make_run("owned"), 0)
        assert not await store.put_owned_items(key, [make_item("w/c", owner=0)], owner=0,
                                               checkpoint_id=other_life, if_absent=False,
                                               now=T0)
        found = await _read(store, run, 0)
        assert found is not None
        assert found[2] == {"w/a": b"value-w/a"}

    async def test_owned_items_if_absent_keep_the_first_value(
        self, store: CheckpointStore
    ) -> None:
        assert isinstance(store, SupportsSharedItems)
        run = make_run("first-wins")
        await _append_items(store, run, 0)
        key, own = key_of(run), checkpoint_id_of(run, 0)

        for value, if_absent in ((b"one", True), (b"two", True), (b"three", False)):
            assert await store.put_owned_items(
                key, [make_item("w/a", value, owner=0), make_item(f"w/{value!r}", owner=0)],
                owner=0, checkpoint_id=own, if_absent=if_absent, now=T0)
        found = await _read(store, run, 0)
        assert found is not None
        assert found[2]["w/a"] == b"three"
        assert len(found[2]) == 4

    async def test_owned_items_go_with_their_checkpoint(self, store: CheckpointStore) -> None:
        assert isinstance(store, SupportsSharedItems)
        run = make_run("owned-pruned")
        await _append_items(store, run, 0)
        assert await store.put_owned_items(
            key_of(run), [make_item("w/0", owner=0)], owner=0,
            checkpoint_id=checkpoint_id_of(run, 0), if_absent=True, now=T0)
        await _append_items(store, run, 1, keep_latest=1)
        await store.purge_expired(now=T0, limit=1000)

        assert await _stored(store, run, ["w/0"]) == {}

    async def test_owned_items_must_name_their_owner(self, store: CheckpointStore) -> None:
        assert isinstance(store, SupportsSharedItems)
        run = make_run("owner-mismatch")
        await _append_items(store, run, 0)

        with pytest.raises(ValidationError):
            await store.put_owned_items(
                key_of(run), [make_item("w/0", owner=1)], owner=0,
                checkpoint_id=checkpoint_id_of(run, 0), if_absent=True, now=T0)
        assert await _stored(store, run, ["w/0"]) == {}

    async def test_an_append_racing_a_removal_keeps_what_it_names(
        self, store: CheckpointStore
    ) -> None:
        # Checkpoint 0 names b/a; checkpoint 1 names it again (not rewriting it) while 0 is
        # pruned and purged: b/a must survive for 1.
        run = make_run("racing")
        await _append_items(store, run, 0, refs=["b/a"], items=[make_item("b/a")])

        async def prune_and_purge() -> None:
            await _append_items(store, run, 1, refs=["b/a"], keep_latest=1)
            await store.purge_expired(now=T0, limit=1000)

        async def purge() -> None:
            await store.purge_expired(now=T0, limit=1000)

        async with anyio.create_task_group() as group:
            group.start_soon(prune_and_purge)
            group.start_soon(purge)
        found = await _read(store, run, 1)
        assert found is not None
        assert found[2] == {"b/a": b"value-b/a"}

    async def test_shared_item_calls_refuse_what_is_not_a_run_key(
        self, store: CheckpointStore
    ) -> None:
        assert isinstance(store, SupportsSharedItems)
        seed, new = make_run("addressed"), make_run("never-created")
        await _append_items(store, seed, 0, refs=["shared"],
                             items=[make_item("shared"), make_item("mine", owner=0)])

        await _refuses_not_run_keys(store, seed, lambda value: store.append_with_items(
            value, make_checkpoint(new, 0), run=new, keep_latest=None, now=T0,
            items=[make_item("new")]))
        for sequence in (None, 0):
            await _refuses_not_run_keys(
                store, seed, functools.partial(store.read_with_items, sequence=sequence, now=T0))
        await _refuses_not_run_keys(store, seed, lambda value: store.put_owned_items(
            value, [make_item("owned", owner=0)], owner=0,
            checkpoint_id=checkpoint_id_of(seed, 0), if_absent=False, now=T0))


async def _nested(store: CheckpointStore, run: RunRecord, anchor: str, *, now: float = T0
                  ) -> list[str]:
    """Keys of the live items nested under ``anchor``, as a scan pages them."""
    keys: list[str] = []
    after: str | None = None
    while True:
        page = await store.scan_items(key_of(run), prefix=nested_prefix(anchor),
                                      start_after=after, limit=50, now=now)
        keys += [key for key, _ in page]
        if len(page) < 50:
            return keys
        after = page[-1][0]


async def _purged(store: CheckpointStore) -> None:
    """``purge_expired`` at ``T0`` until it says it is done."""
    for _ in range(20):
        if (await store.purge_expired(now=T0, limit=1000))[1]:
            return
    raise AssertionError("purge_expired never said it was done")


class NestedItemsContract(ContractBase):
    """``SupportsNestedItems``: items nested under a shared item live and are read with it."""

    async def test_store_offers_nested_items(self, store: CheckpointStore) -> None:
        assert isinstance(store, SupportsNestedItems)
        assert offers_nested_items(store)

    async def test_nested_items_are_read_with_their_shared_item(
        self, store: CheckpointStore
    ) -> None:
        """Only keys under ``K + "/"`` are nested: ``K.x``, ``Kx`` and ``K0`` (``"0"`` follows
        ``"/"``) are other items, not read with ``K``."""
        run = make_run("nested-read")
        await store.put_items(key_of(run), [make_item(key) for key in (
            "h/a.x", "h/ab", "h/a0", "h/b/1")], now=T0)
        await _append_items(store, run, 0, refs=["h/a"],
                            items=[make_item("h/a"), make_item("h/a/0")])
        await _append_items(store, run, 1, refs=["h/a"],
                            items=[make_item("h/a/1"), make_item("h/a/1/deeper")])

        for sequence in (0, 1, None):
            found = await _read(store, run, sequence)
            assert found is not None
            assert found[2] == {key: f"value-{key}".encode() for key in (
                "h/a", "h/a/0", "h/a/1", "h/a/1/deeper")}
        assert await _nested(store, run, "h/a") == ["h/a/0", "h/a/1", "h/a/1/deeper"]

    async def test_many_nested_items_come_back_in_one_read(
        self, store: CheckpointStore
    ) -> None:
        run = make_run("nested-many")
        await _append_items(store, run, 0, refs=["h/log"], items=[make_item("h/log")])
        for sequence in range(1, 7):
            await _append_items(store, run, sequence, refs=["h/log"], items=[
                make_item(f"h/log/{sequence:03}{index:03}") for index in range(50)])

        found = await _read(store, run, None)
        assert found is not None
        assert len(found[2]) == 301
        assert found[2]["h/log/006049"] == b"value-h/log/006049"
        assert len(await _nested(store, run, "h/log")) == 300

    async def test_nested_items_outlive_the_checkpoint_that_wrote_them(
        self, store: CheckpointStore
    ) -> None:
        run = make_run("nested-pruned")
        await _append_items(store, run, 0, refs=["h/a"],
                            items=[make_item("h/a"), make_item("h/a/0")])
        await _append_items(store, run, 1, refs=["h/a"], items=[make_item("h/a/1")])
        await _append_items(store, run, 2, refs=["h/a"], items=[make_item("h/a/2")],
                            keep_latest=1)
        await store.purge_expired(now=T0, limit=1000)

        assert await _sequences(store, run, now=T0) == [2]
        found = await _read(store, run, 2)
        assert found is not None
        assert set(found[2]) == {"h/a", "h/a/0", "h/a/1", "h/a/2"}

    async def test_nested_items_go_when_their_shared_item_does(
        self, store: CheckpointStore
    ) -> None:
        """Pruned, deleted, expired: whichever removal takes ``K`` takes what is under it,
        and leaves what is nested under another item."""
        run = make_run("nested-removed")
        await _append_items(store, run, 0, refs=["h/a"],
                            items=[make_item("h/a"), make_item("h/a/0")])
        await _append_items(store, run, 1, refs=["h/a"], items=[make_item("h/a/1")])
        await _append_items(store, run, 2, refs=["h/b"],
                            items=[make_item("h/b"), make_item("h/b/0")], keep_latest=1)
        await store.purge_expired(now=T0, limit=1000)
        assert await _nested(store, run, "h/a") == []
        assert await _stored(store, run, ["h/a", "h/a/0", "h/a/1"]) == {}

        await _append_items(store, run, 3, refs=["h/c"], expires_at=T0 + 10,
                            items=[make_item("h/c"), make_item("h/c/0")])
        await _delete(store, run, 2)
        await store.purge_expired(now=T0, limit=1000)
        assert await _nested(store, run, "h/b") == []
        assert await _nested(store, run, "h/c") == ["h/c/0"]

        await store.purge_expired(now=T0 + 10, limit=1000)
        assert await _nested(store, run, "h/c", now=T0) == []
        assert await _stored(store, run, ["h/c", "h/c/0"], now=T0) == {}

    async def test_a_deleted_run_takes_its_nested_items(self, store: CheckpointStore) -> None:
        run = make_run("nested-deleted-run")
        await _append_items(store, run, 0, refs=["h/a"],
                            items=[make_item("h/a"), make_item("h/a/0")])
        await store.delete_run(key_of(run))
        assert await _nested(store, run, "h/a") == []

    async def test_a_new_life_holds_no_nested_item_of_the_old(
        self, store: CheckpointStore
    ) -> None:
        run = make_run("nested-reborn")
        await _append_items(store, run, 0, refs=["h/a"], expires_at=T0 + 10,
                            items=[make_item("h/a"), make_item("h/a/0")])
        later = T0 + 20
        new = msgspec.structs.replace(make_run("nested-reborn"), created_at=later)
        await _append_items(store, new, 0, refs=["h/b"], now=later,
                            items=[make_item("h/b"), make_item("h/b/0")])
        await store.purge_expired(now=later, limit=1000)

        found = await _read(store, new, 0, now=later)
        assert found is not None
        assert found[2] == {"h/b": b"value-h/b", "h/b/0": b"value-h/b/0"}
        assert await _nested(store, run, "h/a", now=later) == []

    async def test_nested_items_live_while_their_key_is_named_whoever_holds_its_item(
        self, store: CheckpointStore
    ) -> None:
        """An item at ``K`` owned by a checkpoint goes with its owner, and one removed with
        ``delete_items`` goes at once; what is nested under ``K`` stays while a held checkpoint
        names ``K`` (read with it), and goes with the last one: never left behind."""
        run = make_run("nested-owned-anchor")
        await _append_items(store, run, 0, items=[make_item("h/a", owner=0)])
        await _append_items(store, run, 1, refs=["h/a"], items=[make_item("h/a/0")])
        await _delete(store, run, 0)
        await store.purge_expired(now=T0, limit=1000)
        found = await _read(store, run, 1)
        assert found is not None
        assert found[2] == {"h/a/0": b"value-h/a/0"}
        assert await _nested(store, run, "h/a") == ["h/a/0"]
        await _append_items(store, run, 2, refs=["h/b"], keep_latest=1,
                            items=[make_item("h/b"), make_item("h/b/0")])
        await store.delete_items(key_of(run), ["h/b"])
        await store.purge_expired(now=T0, limit=1000)
        assert await _nested(store, run, "h/a") == []
        assert await _nested(store, run, "h/b") == ["h/b/0"]

        await _append_items(store, run, 3, keep_latest=1)
        await store.purge_expired(now=T0, limit=1000)
        assert await _nested(store, run, "h/b") == []

    async def test_nested_items_go_with_the_last_name_while_an_owner_holds_the_key(
        self, store: CheckpointStore
    ) -> None:
        """The item at ``K`` owned by a live checkpoint stays with it, what is nested under
        ``K`` goes with the last checkpoint naming ``K``, and a later append may name ``K``
        again (its owner is live)."""
        run = make_run("nested-owner-live")
        await _append_items(store, run, 0, items=[make_item("h/a", owner=0)])
        await _append_items(store, run, 1, refs=["h/a"], items=[make_item("h/a/0")])
        await _delete(store, run, 1)
        await store.purge_expired(now=T0, limit=1000)
        assert await _nested(store, run, "h/a") == []
        assert await _stored(store, run, ["h/a"]) == {"h/a": b"value-h/a"}

        await _append_items(store, run, 2, refs=["h/a"], items=[make_item("h/a/1")])
        found = await _read(store, run, 2)
        assert found is not None
        assert found[2] == {"h/a": b"value-h/a", "h/a/1": b"value-h/a/1"}

    async def test_an_owned_item_expires_with_its_owner_while_named(
        self, store: CheckpointStore
    ) -> None:
        """Named by a checkpoint that lives on, an owned item still expires with its owner
        (what is nested under its key stays while the key is named)."""
        run = make_run("nested-owner-expired")
        await _append_items(store, run, 0, expires_at=T0 + 10,
                            items=[make_item("h/a", owner=0)])
        await _append_items(store, run, 1, refs=["h/a"], items=[make_item("h/a/0")])
        found = await _read(store, run, 1, now=T0 + 15)
        assert found is not None
        assert found[2] == {"h/a/0": b"value-h/a/0"}
        assert await _stored(store, run, ["h/a"], now=T0 + 15) == {}

    async def test_nested_items_go_with_the_last_name_when_the_owner_goes_with_it(
        self, store: CheckpointStore
    ) -> None:
        """The owner of ``K``'s item and the last checkpoint naming ``K`` removed in one
        step (pruned together, or the run starting over): nothing nested under ``K`` stays."""
        run = make_run("nested-owned-together")
        await _append_items(store, run, 0, items=[make_item("h/a", owner=0)])
        await _append_items(store, run, 1, refs=["h/a"], items=[make_item("h/a/0")])
        await _append_items(store, run, 2, keep_latest=1)
        await store.purge_expired(now=T0, limit=1000)
        assert await _nested(store, run, "h/a") == []

        run = make_run("nested-owned-reborn")
        await _append_items(store, run, 0, expires_at=T0 + 10,
                            items=[make_item("h/a", owner=0)])
        await _append_items(store, run, 1, refs=["h/a"], expires_at=T0 + 10,
                            items=[make_item("h/a/0")])
        later = T0 + 20
        new = msgspec.structs.replace(make_run("nested-owned-reborn"), created_at=later)
        await _append_items(store, new, 0, now=later, items=[make_item("h/b")])
        await store.purge_expired(now=later, limit=1000)
        assert await _nested(store, run, "h/a", now=later) == []

    async def test_what_others_name_or_own_under_a_key_stays_when_its_last_holder_goes(
        self, store: CheckpointStore
    ) -> None:
        """Keys nest by prefix (``a/b`` is nested under ``a``), but a key a held checkpoint
        names or owns is that checkpoint's: the removal of the last checkpoint naming ``a``
        takes neither ``a/b`` nor ``a/`` (and what is nested under them) while others name
        them, nor ``a/w`` while its owner is held; they go once nothing names or owns them."""
        assert isinstance(store, SupportsSharedItems)
        run = make_run("nested-named-under")
        key = key_of(run)
        await _append_items(store, run, 0, refs=["a"], items=[make_item("a"), make_item("a/x")])
        await _append_items(store, run, 1, refs=["a/b"], items=[make_item("a/b")])
        await _append_items(store, run, 2, refs=["a/"],
                            items=[make_item("a/"), make_item("a//z")])
        await _append_items(store, run, 3, refs=["a/c/d"],
                            items=[make_item("a/c/d"), make_item("a/c/d/e")])
        await _append_items(store, run, 4, items=[make_item("a/w", owner=4)])
        assert await store.put_owned_items(key, [make_item("a/v", owner=4)], owner=4,
                                           checkpoint_id=checkpoint_id_of(run, 4),
                                           if_absent=False, now=T0)
        await _delete(store, run, 0)
        await _purged(store)
        for sequence, keys in ((1, ["a/b"]), (2, ["a/", "a//z"]), (3, ["a/c/d", "a/c/d/e"]),
                               (4, ["a/v", "a/w"])):
            found = await _read(store, run, sequence)
            assert found is not None
            assert found[2] == {name: f"value-{name}".encode() for name in keys}, sequence
        assert await _nested(store, run, "a") == [
            "a/", "a//z", "a/b", "a/c/d", "a/c/d/e", "a/v", "a/w"]

        for sequence in (1, 2, 3, 4):
            await _delete(store, run, sequence)
        await _purged(store)
        assert await _nested(store, run, "a") == []

    async def test_a_read_leaves_out_what_other_checkpoints_own_under_a_ref(
        self, store: CheckpointStore
    ) -> None:
        assert isinstance(store, SupportsSharedItems)
        run = make_run("nested-owned-by-others")
        await _append_items(store, run, 0, refs=["a"], items=[make_item("a"), make_item("a/x")])
        await _append_items(store, run, 1, refs=["a"], items=[make_item("a/w", owner=1)])
        assert await store.put_owned_items(key_of(run), [make_item("a/v", owner=1)], owner=1,
                                           checkpoint_id=checkpoint_id_of(run, 1),
                                           if_absent=False, now=T0)
        found = await _read(store, run, 0)
        assert found is not None
        assert sorted(found[2]) == ["a", "a/x"]
        found = await _read(store, run, 1)
        assert found is not None
        assert sorted(found[2]) == ["a", "a/v", "a/w", "a/x"]

    async def test_an_append_naming_a_removed_item_writes_nothing_under_it(
        self, store: CheckpointStore
    ) -> None:
        run = make_run("nested-stale")
        await _append_items(store, run, 0, refs=["h/a"],
                            items=[make_item("h/a"), make_item("h/a/0")])
        await _append_items(store, run, 1, refs=["h/b"], items=[make_item("h/b")],
                            keep_latest=1)
        await store.purge_expired(now=T0, limit=1000)

        with pytest.raises(SharedItemGone):
            await _append_items(store, run, 2, refs=["h/a"], items=[make_item("h/a/1")])
        assert await _nested(store, run, "h/a") == []
        assert await _sequences(store, run, now=T0) == [1]
