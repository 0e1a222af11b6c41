"""Review of the late-slot fixes (``_unknown_below``, the ``late`` flag, ``_read_mixed``):
an ended life's marker landing after its slot was removed, beside a checkpoint of the
next life at that key that has no marker of its own (its marker's PUT failed: the create
is acknowledged all the same, its slot read for its listing)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from fastcheckpoint.errors import StoreUnavailableError
from fastcheckpoint.stores import _s3_layout as layout
from fastcheckpoint.stores.s3 import S3Store
from fastcheckpoint.testing import T0, checkpoint_id_of, key_of, make_checkpoint, make_run
from tests.stores._moto import moto_endpoint
from tests.stores.s3.test_s3 import DEADLINE
from tests.stores.s3.test_s3_late_left_review import _marker_keys
from tests.stores.s3.test_s3_sequence_guard import stores

__all__ = ["moto_endpoint", "stores"]

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


def _marker_put_fails(monkeypatch: pytest.MonkeyPatch, sequence: int) -> None:
    """The next marker PUT of a checkpoint at ``sequence`` fails, as a network would."""
    original = S3Store._put_marker
    left = [1]

    async def put_marker(store: S3Store, io: Any, run_key: str, at: int, *args: Any,
                         **kwargs: Any) -> Any:
        if at == sequence and left[0] > 0:
            left[0] -= 1
            raise StoreUnavailableError("injected: the marker PUT failed")
        return await original(store, io, run_key, at, *args, **kwargs)

    monkeypatch.setattr(S3Store, "_put_marker", put_marker)


@pytest.mark.parametrize(("old", "new"), [("inc-a", "inc-z"), ("inc-z", "inc-a")],
                         ids=["leftover-first", "leftover-last"])
async def test_an_ended_lifes_marker_beside_a_checkpoint_without_its_own_hides_nothing(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch, old: str, new: str,
) -> None:
    """Checkpoints 0 to 2 of a run's life, expiring at ``T0 + 10``; the marker PUT of 1 (a
    create's held in the network) lands only after the run started over at ``T0 + 20``.
    The new life's append of 1 is acknowledged with its marker's PUT failed: its slot
    stands beside the ended life's marker alone, which listings took for its own, so 1
    was listed as the ended life's leftover and the cleanup loop removed its slot. Every
    listing must show 1; the cleanup loop keeps it, writes its marker and removes the
    leftover."""
    writer_store, other_store = stores
    first = make_run("leftover-bare", incarnation=old)
    key = key_of(first)
    with anyio.fail_after(DEADLINE):
        for sequence in range(3):
            await writer_store.append(key, make_checkpoint(first, sequence, expires_at=T0 + 10),
                                      run=first, keep_latest=None, now=T0)
        client = await writer_store.client()
        [leftover] = await _marker_keys(writer_store, key, 1)
        body = await (await client.get_object(Bucket=writer_store.bucket, Key=leftover))[
            "Body"].read()
        second = make_run("leftover-bare", incarnation=new, created_at=T0 + 20)
        await other_store.append(key, make_checkpoint(
            second, 0, created_at=T0 + 20, expires_at=T0 + 1000), run=second,
            keep_latest=None, now=T0 + 20)
        await client.put_object(Bucket=writer_store.bucket, Key=leftover, Body=body)
        _marker_put_fails(monkeypatch, 1)
        for sequence in (1, 2):
            await other_store.append(key, make_checkpoint(
                second, sequence, created_at=T0 + 20, expires_at=T0 + 1000), run=second,
                keep_latest=None, now=T0 + 20)
        monkeypatch.undo()
        markers = await _marker_keys(writer_store, key, 1)
        listed = [header.sequence for header in
                  (await writer_store.headers(key, before=None, limit=10, now=T0 + 30))[0]]
        await writer_store.purge_expired(now=T0 + 30, limit=100)
        after = [header.sequence for header in
                 (await other_store.headers(key, before=None, limit=10, now=T0 + 30))[0]]
        found = await other_store.get(key, 1, now=T0 + 30)
        slot = await (await writer_store._objects()).get(layout.slot_key(key, 1))
        left = await _marker_keys(writer_store, key, 1)

    assert markers == [leftover]  # the case this is about: the ended life's marker alone
    assert slot is not None
    assert listed == after == [2, 1, 0]
    assert found is not None
    assert found[0].checkpoint_id == checkpoint_id_of(second, 1)
    assert len(left) == 1  # its own, written by the cleanup loop
    assert leftover not in left
