"""S3 store: pending slots (an append with owned items between its commit and its marker).
A create is acknowledged only once its checkpoint reads whole, a pending slot's checkpoint
is read by no path (nor written items for: ``put_owned_items`` refuses it), and nothing
removes the items of a pending slot whose writer may still write its marker."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from fastcheckpoint.errors import StoreUnavailableError
from fastcheckpoint.stores import _s3_io
from fastcheckpoint.stores import _s3_layout as layout
from fastcheckpoint.stores._aws import RequestCounter
from fastcheckpoint.stores.s3 import S3Store
from fastcheckpoint.testing import T0, checkpoint_id_of, key_of, make_item, make_run
from fastcheckpoint.testing._adapter import _append_items
from tests.stores._moto import moto_endpoint
from tests.stores.s3.test_s3 import DEADLINE
from tests.stores.s3.test_s3_killed_append import _kill_after, _Killed, anyio_backend, stores

__all__ = ["anyio_backend", "moto_endpoint", "stores"]

pytestmark = pytest.mark.anyio

_OWNED = ("o/a", "o/b")


async def _read(store: S3Store, run: Any, sequence: int | None) -> tuple[int, list[str]] | None:
    found = await store.read_with_items(key_of(run), sequence=sequence, now=T0)
    return None if found is None else (found[0].sequence, sorted(found[2]))


async def _pending_at_1(writer: S3Store, run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoint 0, then an append of 1 whose writer is killed after its owned items,
    before its marker: a pending slot at 1."""
    await _append_items(writer, run, 0, refs=[], items=[make_item("o/0", owner=0)])
    _kill_after(monkeypatch, await writer.client(), 1 + 2 * len(_OWNED))
    try:
        with pytest.raises(_Killed):
            await _append_items(writer, run, 1, refs=[],
                                items=[make_item(name, owner=1) for name in _OWNED])
    finally:
        monkeypatch.undo()


async def _create_1_with(
    writer: S3Store, run: Any, monkeypatch: pytest.MonkeyPatch,
    meanwhile: Callable[[], Awaitable[None]],
) -> None:
    """Checkpoint 0, then checkpoint 1 owning ``_OWNED``, acknowledged: ``meanwhile`` runs
    while 1 is pending (after its owned items, before its marker)."""
    write_marker = writer._write_marker

    async def marker_after(*args: Any, **kwargs: Any) -> Any:
        await meanwhile()
        return await write_marker(*args, **kwargs)

    await _append_items(writer, run, 0, refs=[], items=[make_item("o/0", owner=0)])
    monkeypatch.setattr(writer, "_write_marker", marker_after)
    try:
        await _append_items(writer, run, 1, refs=[],
                            items=[make_item(name, owner=1) for name in _OWNED])
    finally:
        monkeypatch.undo()


async def test_get_leaves_out_a_killed_writers_pending_slot(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Killed after its owned items, before its marker: the create never returned, and
    ``get`` (what the adapters' ``landed`` reads) does not return it either."""
    writer, other = stores
    run = make_run("pending-get")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await _pending_at_1(writer, run, monkeypatch)
        assert await _read(other, run, 1) is None
        assert await other.get(key, 1, now=T0) is None
        found = await other.get(key, 0, now=T0)
        assert found is not None
        assert found[0].sequence == 0


async def test_a_failed_marker_put_is_no_acknowledged_hidden_create(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The marker of a checkpoint owning items is what makes it readable: when its PUT
    fails, the create must fail (not return with the checkpoint hidden for good)."""
    writer, other = stores
    run = make_run("pending-marker")
    marker_prefix = layout.slot_key(key_of(run), 1) + "/m"
    original = _s3_io.Bucket.put

    async def put(bucket: Any, key: str, *args: Any, **kwargs: Any) -> Any:
        if key.startswith(marker_prefix):
            raise StoreUnavailableError("injected: the marker's PUT failed")
        return await original(bucket, key, *args, **kwargs)

    with anyio.fail_after(DEADLINE):
        await _append_items(writer, run, 0, refs=[], items=[make_item("o/0", owner=0)])
        monkeypatch.setattr(_s3_io.Bucket, "put", put)
        try:
            await _append_items(writer, run, 1, refs=[],
                                items=[make_item(name, owner=1) for name in _OWNED])
            acknowledged = True
        except StoreUnavailableError:
            acknowledged = False
        finally:
            monkeypatch.undo()
        latest = await _read(other, run, None)
    if acknowledged:
        assert latest == (1, sorted(_OWNED))
    else:
        assert latest == (0, ["o/0"])


async def test_the_cleanup_loop_keeps_the_items_of_a_pending_slot(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another process appends after a pending slot (its sequence is taken) and the cleanup
    loop runs, all before the pending writer writes its marker: the create is acknowledged
    and must read whole."""
    writer, other = stores
    run = make_run("pending-cleanup")

    async def others_meanwhile() -> None:
        await _append_items(other, run, 2, refs=[], items=[make_item("o/2", owner=2)])
        await other.purge_expired(now=T0, limit=100)

    with anyio.fail_after(DEADLINE):
        await _create_1_with(writer, run, monkeypatch, others_meanwhile)
        assert await _read(other, run, 1) == (1, sorted(_OWNED))
        assert await _read(other, run, None) == (2, ["o/2"])


async def _written_for(store: S3Store, run_key: str, sequence: int, name: str) -> bool:
    """Whether the item ``name`` or a marker of it owned by ``sequence`` is stored."""
    io = await store._objects()
    hex_key = layout.hex_item_key(name)
    markers = await io.list(f"{layout.slot_key(run_key, sequence)}/w{hex_key}/")
    return bool(markers) or await io.get(layout.item_object(run_key, hex_key)) is not None


async def test_put_owned_items_refuses_a_pending_owner(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pending owner (its writer killed before its marker) is no checkpoint: the call
    writes nothing for it, as for an owner that is gone."""
    writer, other = stores
    run = make_run("pending-owner")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await _pending_at_1(writer, run, monkeypatch)
        assert not await other.put_owned_items(
            key, [make_item("o/x", owner=1)], owner=1, checkpoint_id=checkpoint_id_of(run, 1),
            if_absent=True, now=T0)
        assert not await _written_for(other, key, 1, "o/x")
        assert await _read(other, run, None) == (0, ["o/0"])


@pytest.mark.parametrize("if_absent", [True, False])
async def test_put_owned_items_during_a_create_leaves_it_whole(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch, if_absent: bool,
) -> None:
    """Another process writes items for checkpoint 1 while its create is between its items
    and its marker: refused, nothing written (not over the create's own item either), and
    the create, acknowledged after it, reads with exactly its items. Once acknowledged, the
    same call writes."""
    writer, other = stores
    run = make_run("pending-meanwhile")
    key = key_of(run)
    owner_id = checkpoint_id_of(run, 1)
    given = [make_item("o/x", owner=1), make_item("o/a", b"other", owner=1)]
    refused: list[bool] = []

    async def others_meanwhile() -> None:
        refused.append(not await other.put_owned_items(
            key, given, owner=1, checkpoint_id=owner_id, if_absent=if_absent, now=T0))

    with anyio.fail_after(DEADLINE):
        await _create_1_with(writer, run, monkeypatch, others_meanwhile)
        assert refused == [True]
        assert not await _written_for(other, key, 1, "o/x")
        found = await other.read_with_items(key, sequence=1, now=T0)
        assert found is not None
        assert found[2] == {name: make_item(name).value for name in _OWNED}
        assert await other.put_owned_items(key, given, owner=1, checkpoint_id=owner_id,
                                           if_absent=if_absent, now=T0)
        found = await writer.read_with_items(key, sequence=1, now=T0)
        assert found is not None
        assert found[2] == {"o/a": b"value-o/a" if if_absent else b"other",
                            "o/b": b"value-o/b", "o/x": b"value-o/x"}


async def test_put_owned_items_lists_the_slot_beside_its_gets(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The owner check's LIST is sent with the slot's GET, in the same round trip, and it
    stops at the markers of the items the owner owns: one LIST however many it owns."""
    writer, other = stores
    run = make_run("pending-budget")
    key = key_of(run)
    slot = layout.slot_key(key, 1)
    events: list[str] = []

    def traced(name: str) -> None:
        original = getattr(_s3_io.Bucket, name)

        async def send(bucket: Any, prefix: str, *args: Any, **kwargs: Any) -> Any:
            if prefix != slot:
                return await original(bucket, prefix, *args, **kwargs)
            events.append(f"{name} sent")
            try:
                return await original(bucket, prefix, *args, **kwargs)
            finally:
                events.append(f"{name} answered")

        monkeypatch.setattr(_s3_io.Bucket, name, send)

    with anyio.fail_after(DEADLINE):
        await _append_items(writer, run, 0, refs=[], items=[make_item("o/0", owner=0)])
        await _append_items(writer, run, 1, refs=[],
                            items=[make_item(f"o/{n}", owner=1) for n in range(8)])
        traced("get")
        traced("scan")
        client = await other.client()
        with RequestCounter.attached(client) as counted:
            assert await other.put_owned_items(
                key, [make_item("o/x", owner=1)], owner=1,
                checkpoint_id=checkpoint_id_of(run, 1), if_absent=True, now=T0)
        monkeypatch.undo()
    assert sorted(events[:2]) == ["get sent", "scan sent"]
    assert sorted(events[2:]) == ["get answered", "scan answered"]
    assert counted.counts == {"GetObject": 3, "ListObjectsV2": 1, "PutObject": 2}


async def test_a_leftover_marker_of_another_life_does_not_make_a_pending_slot_a_checkpoint(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A marker of another write at the pending slot's key (an ended life's, left by a
    removal stopped between its slots and their markers) is not this slot's marker: the
    slot stays pending, read by no path, and ``put_owned_items`` writes nothing for it."""
    writer, other = stores
    run = make_run("pending-stale-marker")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await _pending_at_1(writer, run, monkeypatch)
        io = await other._objects()
        stale = layout.Listing("ended-life", "ended-life-checkpoint", T0, None, T0,
                               b"header", b"\x01" * 16)
        await io.put(layout.marker_key(key, 1, "m", stale), b"")
        assert await other.get(key, 1, now=T0) is None
        assert await _read(other, run, 1) is None
        assert not await other.put_owned_items(
            key, [make_item("o/x", owner=1)], owner=1, checkpoint_id=checkpoint_id_of(run, 1),
            if_absent=True, now=T0)
        assert not await _written_for(other, key, 1, "o/x")
