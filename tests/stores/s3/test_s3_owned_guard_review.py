"""S3 store: review of the owned-item removals by ETag: a create finding a withdrawn
create's item at its own sequence, and what a process keeps of the items its checkpoints
own."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import pytest

from fastcheckpoint.errors import StoreUnavailableError
from fastcheckpoint.stores import _s3_io
from fastcheckpoint.stores import _s3_layout as layout
from fastcheckpoint.stores import s3 as s3_module
from fastcheckpoint.stores.s3 import S3Store
from fastcheckpoint.testing import T0, key_of, make_checkpoint, make_item, make_run
from fastcheckpoint.testing._adapter import _append_items
from tests.stores._moto import moto_endpoint
from tests.stores.s3.test_s3 import DEADLINE
from tests.stores.s3.test_s3_killed_append import _Killed, anyio_backend, stores

__all__ = ["anyio_backend", "moto_endpoint", "stores"]

pytestmark = pytest.mark.anyio

_OWNED = ("o/a", "o/b")


@pytest.mark.parametrize("expires_at", [None, T0 + 3600], ids=["same-expiry", "another"])
async def test_a_create_does_not_take_a_withdrawn_creates_items_at_its_sequence(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
    expires_at: float | None,
) -> None:
    """A create of 1 fails on one of its items and is taken back (its slot removed); its
    process stops before removing the item it did write (``o/a``). Another process then
    creates another checkpoint at 1 owning ``o/a`` and ``o/b`` (the bundled adapters'
    owned keys carry the owner's sequence, so they are the same keys), with the same
    expiry (none) or another: acknowledged, it must read with both, its own values."""
    writer, other = stores
    run = make_run(f"withdrawn-leftover-{expires_at}")
    key = key_of(run)
    landed = layout.item_object(key, layout.hex_item_key("o/a"))
    failing = layout.item_object(key, layout.hex_item_key("o/b"))
    original = _s3_io.Bucket.put
    written = anyio.Event()

    async def put(bucket: Any, name: str, *args: Any, **kwargs: Any) -> Any:
        if bucket.client is writer_client and name == failing:
            await written.wait()
            raise StoreUnavailableError("injected: the item's PUT failed")
        etag = await original(bucket, name, *args, **kwargs)
        if name == landed:
            written.set()
        return etag

    async def stopped(*args: Any, **kwargs: Any) -> None:
        raise _Killed

    with anyio.fail_after(DEADLINE):
        await _append_items(writer, run, 0, refs=[], items=[make_item("o/0", owner=0)])
        writer_client = await writer.client()
        monkeypatch.setattr(_s3_io.Bucket, "put", put)
        monkeypatch.setattr(writer, "_withdraw_owned", stopped)
        with pytest.raises((StoreUnavailableError, _Killed)):
            await _append_items(writer, run, 1, refs=[],
                                items=[make_item(name, b"withdrawn", owner=1)
                                       for name in _OWNED])
        monkeypatch.undo()
        record = msgspec.structs.replace(
            make_checkpoint(run, 1, created_at=T0 + 1, expires_at=expires_at),
            checkpoint_id="another-checkpoint-at-1")
        await other.append_with_items(
            key, record, run=run, keep_latest=None, now=T0 + 1,
            items=[make_item(name, owner=1) for name in _OWNED])
        found = await other.read_with_items(key, sequence=1, now=T0 + 1)

    assert found is not None
    assert found[0].checkpoint_id == "another-checkpoint-at-1"
    assert found[2] == {name: b"value-" + name.encode() for name in _OWNED}


async def test_what_a_process_knows_of_owned_items_is_bounded_by_its_log(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without ``keep_latest`` nothing is pruned, and the log forgets all but its newest
    checkpoints (``_LOG_SPARE``, 2 here): the items those own, with their ETags, must be
    forgotten with them, not kept for the life of the run. A pruning append then removes
    the forgotten checkpoints' items all the same (from a listing, reading each first)."""
    writer, _ = stores
    run = make_run("owned-memory")
    key = key_of(run)
    monkeypatch.setattr(s3_module, "_LOG_SPARE", 2)
    with anyio.fail_after(DEADLINE):
        for sequence in range(8):
            await _append_items(writer, run, sequence, refs=[],
                                items=[make_item(f"o/{sequence}", owner=sequence)])
        known = sorted(writer._cache[key].owned)
        await _append_items(writer, run, 8, refs=[], keep_latest=1,
                            items=[make_item("o/8", owner=8)])
        left = await writer.get_items(key, [f"o/{sequence}" for sequence in range(9)],
                                      now=T0)

    assert len(known) <= 3, known
    assert left == {"o/8": b"value-o/8"}
