"""Review of the late-slot fixes (``_unknown_below``, the ``late`` flag, ``_read_mixed``):
an ended life's marker landing after its slot was removed, beside a checkpoint of the
next life at that key that has no marker of its own (its marker's PUT failed: the create
is acknowledged all the same, its slot read for its listing)."""

from __future__ import annotations

import anyio
import pytest

from fastcheckpoint.stores import _s3_layout as layout
from fastcheckpoint.stores.s3 import S3Store
from fastcheckpoint.testing import checkpoint_id_of, key_of, make_run
from tests.stores._moto import moto_endpoint
from tests.stores.s3.test_s3 import DEADLINE
from tests.stores.s3.test_s3_cancel_review import _marker_fails
from tests.stores.s3.test_s3_late_left_review import (
    _around_cleanup,
    _leftover_beside_next_life,
)
from tests.stores.s3.test_s3_sequence_guard import stores

__all__ = ["moto_endpoint", "stores"]

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


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
    with anyio.fail_after(DEADLINE):
        key = key_of(make_run("leftover-bare"))
        key, second, leftover = await _leftover_beside_next_life(
            stores, "leftover-bare", old, new, lambda: _marker_fails(monkeypatch, key, 1))
        monkeypatch.undo()
        markers, listed, after, found, left = await _around_cleanup(stores, key)
        slot = await (await stores[0]._objects()).get(layout.slot_key(key, 1))

    assert markers == [leftover]  # the case this is about: the ended life's marker alone
    assert slot is not None
    assert listed == after == [2, 1, 0]
    assert found is not None
    assert found[0].checkpoint_id == checkpoint_id_of(second, 1)
    assert len(left) == 1  # its own, written by the cleanup loop
    assert leftover not in left
