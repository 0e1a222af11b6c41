"""S3 store, items nested under a shared item: what a read with them costs, and their removal
by the sweep (the deepest first, so a sweep that stops part way is completed by a later one
and never leaves an anchor's items to be read with a new life of it; racing appends keep
what they nest)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from fastcheckpoint.errors import CorruptCheckpointError, SharedItemGone, StoreError
from fastcheckpoint.stores import _s3_layout as layout
from fastcheckpoint.stores import nested_prefix
from fastcheckpoint.stores._aws import RequestCounter
from fastcheckpoint.stores.s3 import (
    SWEEP_LEASE_SECONDS,
    S3Store,
    _Listed,
    _Run,
    _SlotView,
    _within,
)
from fastcheckpoint.testing import T0, checkpoint_id_of, key_of, make_item, make_run
from fastcheckpoint.testing._adapter import _append_items
from tests.stores._moto import moto_endpoint
from tests.stores.s3.test_s3 import DEADLINE, s3_bucket, s3_store

__all__ = ["moto_endpoint", "s3_bucket", "s3_store"]

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


def _pieces(anchor: str, count: int, *, start: int = 0) -> list[Any]:
    return [make_item(f"{nested_prefix(anchor)}{index:04}") for index in range(start,
                                                                               start + count)]


async def _nested(store: S3Store, run_key: str, anchor: str) -> list[str]:
    found = await store.scan_items(run_key, prefix=nested_prefix(anchor), limit=10_000, now=T0)
    return [key for key, _ in found]


async def _purge_until_done(store: S3Store, *, now: float, limit: int = 1000) -> int:
    for passes in range(1, 100):
        if (await store.purge_expired(now=now, limit=limit))[1]:
            return passes
    raise AssertionError("purge_expired never reported done")


async def test_request_counts_of_a_read_with_nested_items(s3_store: S3Store) -> None:
    """A read lists what is nested under each ref with the reads of the refs, then reads
    the nested items at once: one round trip and one GET per nested item more."""
    run = make_run("nested-budget")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await _append_items(s3_store, run, 0, refs=["h/log"],
                            items=[make_item("h/log"), *_pieces("h/log", 60)])
        await _append_items(s3_store, run, 1, refs=["h/log"],
                            items=_pieces("h/log", 60, start=60))
        client = await s3_store.client()
        with RequestCounter.attached(client) as newest:
            latest = await s3_store.read_with_items(key, sequence=None, now=T0)
        with RequestCounter.attached(client) as at:
            first = await s3_store.read_with_items(key, sequence=0, now=T0)

    # The head LIST, the slot; the anchor with the LIST of its prefix; the 120 pieces.
    assert newest.counts == {"ListObjectsV2": 2, "GetObject": 2 + 120}
    # Slot, run object and the owned-item markers; the anchor with the LIST; the pieces.
    assert at.counts == {"ListObjectsV2": 2, "GetObject": 3 + 120}
    assert latest is not None
    assert first is not None
    assert len(latest[2]) == len(first[2]) == 121  # the pieces later checkpoints added too


async def test_removal_costs_one_conditional_delete_per_nested_item(s3_store: S3Store) -> None:
    run = make_run("nested-removal-budget")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await _append_items(s3_store, run, 0, refs=["h/a"],
                            items=[make_item("h/a"), *_pieces("h/a", 40)])
        await _append_items(s3_store, run, 1, refs=["h/b"], items=[make_item("h/b")],
                            keep_latest=1)
        client = await s3_store.client()
        with RequestCounter.attached(client) as swept:
            assert await _purge_until_done(s3_store, now=T0) == 1
        assert await _nested(s3_store, key, "h/a") == []
        assert await s3_store.get_items(key, ["h/a", "h/b"], now=T0) == {"h/b": b"value-h/b"}

    # The anchor and its 40 pieces, each IfMatch the ETag listed (exact, as every removal).
    assert swept.counts["DeleteObject"] == 41


async def test_an_interrupted_removal_is_completed_and_keeps_the_anchor_until_then(
    s3_store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep stops (its worker fails) after deleting some pieces: the anchor is still
    there, an append naming it is refused and leaves nothing under it, and the sweep that
    takes the stale lease over removes the rest."""
    run = make_run("nested-interrupted")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await _append_items(s3_store, run, 0, refs=["h/a"],
                            items=[make_item("h/a"), *_pieces("h/a", 30)])
        await _append_items(s3_store, run, 1, refs=["h/b"],
                            items=[make_item("h/b"), *_pieces("h/b", 3)], keep_latest=1)
        io = await s3_store._objects()
        delete_if = io.delete_if
        calls, done, ten_done = [0], [0], anyio.Event()

        async def failing(object_key: str, etag: str) -> bool:
            calls[0] += 1
            if calls[0] > 10:
                await ten_done.wait()
                raise StoreError("the cleanup worker stopped")
            deleted = await delete_if(object_key, etag)
            done[0] += 1
            if done[0] == 10:
                ten_done.set()
            return deleted

        monkeypatch.setattr(io, "delete_if", failing)
        with pytest.raises(StoreError):
            await s3_store.purge_expired(now=T0, limit=1000)
        monkeypatch.undo()

        left = await _nested(s3_store, key, "h/a")
        assert 0 < len(left) < 30
        assert await s3_store.get_items(key, ["h/a"], now=T0) == {"h/a": b"value-h/a"}
        with pytest.raises(SharedItemGone):
            await _append_items(s3_store, run, 2, refs=["h/a"], items=_pieces("h/a", 1,
                                                                              start=500))
        assert await _nested(s3_store, key, "h/a") == left

        # The lease is held by the stopped sweep: nothing goes until it is stale.
        await s3_store.purge_expired(now=T0 + 1, limit=1000)
        assert await _nested(s3_store, key, "h/a") == left
        await _purge_until_done(s3_store, now=T0 + SWEEP_LEASE_SECONDS + 1)

        assert await _nested(s3_store, key, "h/a") == []
        assert await s3_store.get_items(key, ["h/a"], now=T0) == {}
        found = await s3_store.read_with_items(key, sequence=None, now=T0)
        assert found is not None
        assert found[2] == {name: f"value-{name}".encode()
                            for name in ("h/b", "h/b/0000", "h/b/0001", "h/b/0002")}


async def test_a_small_budget_never_removes_an_anchor_before_what_is_nested_under_it(
    s3_store: S3Store,
) -> None:
    run = make_run("nested-budgeted")
    key = key_of(run)
    deeper = [make_item("h/a/0001/x"), make_item("h/a/0001/x/y")]
    with anyio.fail_after(DEADLINE):
        await _append_items(s3_store, run, 0, refs=["h/a"],
                            items=[make_item("h/a"), *_pieces("h/a", 8), *deeper])
        await _append_items(s3_store, run, 1, refs=[], keep_latest=1)
        for _ in range(20):
            done = (await s3_store.purge_expired(now=T0, limit=3))[1]
            nested = await _nested(s3_store, key, "h/a")
            if not await s3_store.get_items(key, ["h/a"], now=T0):
                assert nested == []  # the anchor goes last
            if "h/a/0001/x/y" in nested:  # deeper items go before what they are under
                assert "h/a/0001/x" in nested
                assert "h/a/0001" in nested
            if done:
                break
        assert await _nested(s3_store, key, "h/a") == []
        assert await s3_store.get_items(key, ["h/a"], now=T0) == {}


async def test_a_sweep_racing_an_append_keeps_what_the_append_nests(s3_store: S3Store,
                                                                    monkeypatch: pytest.MonkeyPatch
                                                                    ) -> None:
    """The anchor's last holder is deleted; while the cleanup loop (another process)
    collects what to sweep, an append naming the anchor lands with a new piece: the anchor
    and every piece stay, and are read with it."""
    run = make_run("nested-race")
    key = key_of(run)
    sweeper = S3Store(s3_store.bucket, s3_store.prefix, client=await s3_store.client())
    with anyio.fail_after(DEADLINE):
        await _append_items(s3_store, run, 0, refs=["h/a"],
                            items=[make_item("h/a"), *_pieces("h/a", 5)])
        await _append_items(s3_store, run, 1)
        assert await s3_store.delete(key, 0, checkpoint_id=checkpoint_id_of(run, 0))
        rescan = sweeper._named_since
        pending = [2]

        async def appended_meanwhile(*args: Any, **kwargs: Any) -> set[str]:
            if pending:
                await _append_items(s3_store, run, pending.pop(), refs=["h/a"],
                                    items=_pieces("h/a", 1, start=5))
            return await rescan(*args, **kwargs)

        monkeypatch.setattr(sweeper, "_named_since", appended_meanwhile)
        await _purge_until_done(sweeper, now=T0)
        monkeypatch.undo()
        assert not pending  # the append landed while the sweep collected

        found = await s3_store.read_with_items(key, sequence=2, now=T0)
        assert found is not None
        assert sorted(found[2]) == ["h/a", *[f"h/a/{index:04}" for index in range(6)]]
        assert await s3_store.delete(key, 2, checkpoint_id=checkpoint_id_of(run, 2))
        await _purge_until_done(sweeper, now=T0)
        assert await _nested(s3_store, key, "h/a") == []


async def test_a_loose_item_nested_under_a_removed_anchor_goes_with_it(
    s3_store: S3Store,
) -> None:
    run = make_run("nested-loose")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await _append_items(s3_store, run, 0, refs=["h/a"],
                            items=[make_item("h/a"), make_item("h/a/0")])
        await s3_store.put_items(key, [make_item("h/a/put"), make_item("h/other")], now=T0)
        found = await s3_store.read_with_items(key, sequence=0, now=T0)
        assert found is not None
        assert set(found[2]) == {"h/a", "h/a/0", "h/a/put"}
        await _append_items(s3_store, run, 1, keep_latest=1)
        await _purge_until_done(s3_store, now=T0)
        assert await s3_store.get_items(key, ["h/a", "h/a/0", "h/a/put", "h/other"],
                                        now=T0) == {
            "h/other": b"value-h/other"}


def test_a_budget_takes_the_deepest_first() -> None:
    hexed = {name: layout.hex_item_key(name) for name in ("k", "k/0", "k/1", "k/1/d", "l")}
    doomed = {hex_key: name for name, hex_key in hexed.items()}
    chosen, more = _within(doomed, 2)
    assert more
    assert set(chosen.values()) == {"k/1/d", "k/0"}
    chosen, more = _within(doomed, 4)
    assert set(chosen.values()) == {"k/1/d", "k/0", "k/1", "k"}  # k with all under it
    assert more
    assert _within(doomed, 5) == (doomed, False)
    assert layout.anchors_of(hexed["k/1/d"]) == [hexed["k"], hexed["k/1"]]


async def _run_state(store: S3Store, run_key: str) -> layout.RunState:
    found = await store._read_state(await store._objects(), run_key)
    assert found is not None
    return found[0]


async def test_only_refs_with_nested_items_are_listed(s3_store: S3Store) -> None:
    """The run object lists the refs appends nested items under (the first such append
    writes it before its commit: 1 PUT more, once per ref); reads of any checkpoint naming
    them, by any process, list what is under those refs and only those."""
    run = make_run("nested-listed")
    key = key_of(run)
    refs = ["h/log", "b/x"]
    with anyio.fail_after(DEADLINE):
        client = await s3_store.client()
        await _append_items(s3_store, run, 0, refs=refs,
                            items=[make_item("h/log"), make_item("b/x")])
        assert (await _run_state(s3_store, key)).nesting == ()
        with RequestCounter.attached(client) as first:
            await _append_items(s3_store, run, 1, refs=refs, items=_pieces("h/log", 1))
        with RequestCounter.attached(client) as later:
            await _append_items(s3_store, run, 2, refs=refs, items=_pieces("h/log", 1, start=1))
        with RequestCounter.attached(client) as plain:
            await _append_items(s3_store, run, 3, refs=refs)
        assert (await _run_state(s3_store, key)).nesting == ("h/log",)
        for sequence in (0, 3, None):
            other = S3Store(s3_store.bucket, s3_store.prefix, client=client)  # no cache
            with RequestCounter.attached(client) as counted:
                found = await other.read_with_items(key, sequence=sequence, now=T0)
            assert found is not None
            assert found[2] == {name: f"value-{name}".encode() for name in (
                "h/log", "b/x", "h/log/0000", "h/log/0001")}
            # The slot, the run object, the 2 refs and the 2 pieces; the slot's owned-item
            # markers (or the head) and one LIST: under h/log only.
            assert counted.counts == {"ListObjectsV2": 2, "GetObject": 6}

    # Round trip 0: the run object lists h/log (compare-and-set). Then as any append: the
    # slot, the run object (304) and the piece; the marker, the run object again (304) and
    # the sweep lease.
    assert first.counts == {"PutObject": 4, "GetObject": 3}
    assert later.counts == {"PutObject": 3, "GetObject": 3}
    assert plain.counts == {"PutObject": 2, "GetObject": 3}


async def test_a_new_run_lists_its_nested_refs_with_its_creation(s3_store: S3Store) -> None:
    run = make_run("nested-created")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await _append_items(s3_store, run, 0, refs=["h/a"],
                            items=[make_item("h/a"), make_item("h/a/0")])
        assert (await _run_state(s3_store, key)).nesting == ("h/a",)


async def test_the_removal_of_an_anchor_unlists_it(s3_store: S3Store) -> None:
    run = make_run("nested-unlisted")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await _append_items(s3_store, run, 0, refs=["h/a", "h/b"],
                            items=[make_item("h/a"), make_item("h/b"), make_item("h/a/0"),
                                   make_item("h/b/0")])
        await _append_items(s3_store, run, 1, refs=["h/b"], keep_latest=1)
        assert (await _run_state(s3_store, key)).nesting == ("h/a", "h/b")
        await _purge_until_done(s3_store, now=T0)
        assert await _nested(s3_store, key, "h/a") == []
        assert (await _run_state(s3_store, key)).nesting == ("h/b",)
        found = await s3_store.read_with_items(key, sequence=1, now=T0)
        assert found is not None
        assert found[2] == {"h/b": b"value-h/b", "h/b/0": b"value-h/b/0"}


async def test_beyond_its_capacity_the_run_object_says_any_ref_may_nest(
    s3_store: S3Store,
) -> None:
    run = make_run("nested-capacity")
    key = key_of(run)
    anchors = [f"h/{index:02}" for index in range(layout.NESTING_CAPACITY + 1)]
    with anyio.fail_after(DEADLINE):
        await _append_items(s3_store, run, 0, refs=["b/x"], items=[make_item("b/x")])
        await _append_items(s3_store, run, 1, refs=anchors, items=[
            item for anchor in anchors for item in (make_item(anchor), *_pieces(anchor, 1))])
        state = await _run_state(s3_store, key)
        assert state.nesting_all
        assert state.nesting == ()
        client = await s3_store.client()
        with RequestCounter.attached(client) as counted:
            found = await s3_store.read_with_items(key, sequence=0, now=T0)
        assert found is not None
        assert found[2] == {"b/x": b"value-b/x"}
        # Any ref may have nested items now: b/x is listed under too.
        assert counted.counts["ListObjectsV2"] == 2


def test_a_damaged_run_object_says_any_ref_may_nest() -> None:
    listed = _Listed()
    view = _SlotView(0, slot_etag="e", kind="m",
                     listing=layout.Listing("inc", "id", T0, None, T0))
    listed.slots[0] = view
    damaged = _Run.damaged(listed, CorruptCheckpointError("damaged", key="k"))
    assert damaged.state is not None
    assert damaged.state.nesting_all
