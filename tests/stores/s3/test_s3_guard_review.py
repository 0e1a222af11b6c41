"""S3 store: guarded status changes (``update_run(..., latest_sequence=s)``) against what
other processes do between the change's listing of the run and its guard: appends that
prune past ``s + 1`` (the guard's key freed, the floor raised), a new life of the run
reaching ``s + 1``, and an append meeting a guard that replaced an earlier life's seal.
Whatever the interleaving, a change acknowledged on the condition that ``s`` is the newest
was applied while it was, and no acknowledged checkpoint is overwritten."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from fastcheckpoint.errors import ConflictError, StoreUnavailableError
from fastcheckpoint.stores import _s3_layout as layout
from fastcheckpoint.stores import s3
from fastcheckpoint.stores.s3 import S3Store
from fastcheckpoint.testing import T0, checkpoint_id_of, key_of, make_checkpoint, make_run
from tests.stores.s3.test_s3 import DEADLINE
from tests.stores.s3.test_s3_sequence_guard import (
    _append,
    _around_change,
    _guard_keys,
    _leave_guard,
    _objects,
    _pause,
    _state,
    moto_endpoint,
    stores,
)

__all__ = ["moto_endpoint", "stores"]

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


def _before_guard(store: S3Store, monkeypatch: pytest.MonkeyPatch,
                  meanwhile: Callable[[], Awaitable[None]]) -> None:
    """Run ``meanwhile`` after ``store``'s next guarded change listed the run, before it
    writes its guard."""
    place = store._place_guard

    async def hooked(*args: Any, **kwargs: Any) -> None:
        await meanwhile()
        await place(*args, **kwargs)

    monkeypatch.setattr(store, "_place_guard", hooked)


async def test_appends_pruning_past_the_guards_key_refuse_the_change(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another process appends 2 and 3 with ``max_checkpoints_per_run`` 1 after the change
    listed the run at 1: its pruning raised the floor and freed key 2 before the guard was
    written there. The guard lands (create-only on a free key), the compare-and-set meets
    the raised floor: that is no mere floor race, the run has newer checkpoints."""
    holder, other = stores
    run = make_run("review-pruned")
    with anyio.fail_after(DEADLINE):
        await _append(holder, run, 0)
        await _append(holder, run, 1)

        async def append_and_prune() -> None:
            for sequence in (2, 3):
                await other.append(key_of(run), make_checkpoint(run, sequence), run=run,
                                   keep_latest=1, now=T0 + 1)

        _before_guard(holder, monkeypatch, append_and_prune)
        with pytest.raises(ConflictError):
            await _pause(holder, run, 1)

        assert await _state(other, run) == ("active", 3, 1)
        assert await _guard_keys(other, run) == []


async def test_a_guard_never_replaces_a_checkpoint_of_a_newer_life(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The run is deleted and started over, and the new life appends 0 and 1, after the
    change listed the old life at 0: key 1 holds the new life's acknowledged checkpoint,
    of another incarnation than the change's. It is no leftover of an ended life: the
    change is refused and the checkpoint stays."""
    holder, other = stores
    old = make_run("review-new-life")
    new = make_run("review-new-life")
    with anyio.fail_after(DEADLINE):
        await _append(holder, old, 0)

        async def start_over() -> None:
            await other.delete_run(key_of(old))
            await _append(other, new, 0, now=T0 + 1)
            await _append(other, new, 1, now=T0 + 1)

        _before_guard(holder, monkeypatch, start_over)
        with pytest.raises(ConflictError):
            await _pause(holder, old, 0)

        found = await other.get(key_of(new), 1, now=T0 + 2)
        assert found is not None
        assert found[0].checkpoint_id == checkpoint_id_of(new, 1)
        assert await _state(other, new) == ("active", 1, 2)
        assert await _guard_keys(other, new) == []


async def test_an_append_meeting_a_guard_over_an_earlier_lifes_seal_breaks_it(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run that died at 0 and started over: the dead life's seal stays at 1. A change
    guarded by the new life's 0 replaces the seal with its guard; an append at 1 landing
    while the seal's marker is still listed must take the key for a guard (break it), not
    for the seal (replace it as a leftover, leaving the change free to apply)."""
    holder, other = stores
    dead = make_run("review-seal")
    alive = make_run("review-seal")
    with anyio.fail_after(DEADLINE):
        await _append(other, dead, 0, expires_at=T0 + 10)
        await _append(other, alive, 0, now=T0 + 20)  # seals the dead life at 1
        seal_marker = layout.slot_key(key_of(alive), 1) + "/t"
        reported: list[str] = []
        io = await holder._objects()
        delete = io.delete

        async def hooked(keys: Any) -> None:
            if not reported and any(key.startswith(seal_marker) for key in keys):
                reported.append(await _append(other, alive, 1, now=T0 + 21))
            await delete(keys)

        monkeypatch.setattr(io, "delete", hooked)
        with pytest.raises(ConflictError):
            await _pause(holder, alive, 0, now=T0 + 21)

        assert reported == ["active"]
        assert await _state(other, alive, now=T0 + 22) == ("active", 1, 2)
        assert await _guard_keys(other, alive) == []


async def test_a_failed_create_is_withdrawn_from_under_a_guard(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A create whose check of the run object fails takes its slot back, unless another
    writer appended after it (removing it would leave a gap). A guard above it (a change
    guarded by it, read meanwhile) is no append: the slot goes, the guard is broken (its
    change can no longer apply over the slot taken back), and the create made again is
    written once."""
    writer, changer = stores
    run = make_run("review-withdrawn")
    with anyio.fail_after(DEADLINE):
        await _append(writer, run, 0)
        io = await writer._objects()
        check = io.get_if_changed
        failed: list[int] = []

        async def failing(key: str, etag: str) -> Any:
            if failed:
                return await check(key, etag)
            failed.append(1)
            await _leave_guard(changer, run, 2)  # a change guarded by 1 is under way
            raise StoreUnavailableError("the check of the run object failed")

        monkeypatch.setattr(io, "get_if_changed", failing)
        with pytest.raises(StoreUnavailableError):
            await _append(writer, run, 1, now=T0 + 1)

        assert await changer.get(key_of(run), 1, now=T0 + 2) is None
        assert await _state(changer, run) == ("active", 0, 1)
        assert await _append(writer, run, 1, now=T0 + 2) == "active"
        assert await _state(changer, run, now=T0 + 3) == ("active", 1, 2)


@pytest.mark.parametrize("names_items", [False, True])
async def test_a_guard_beside_a_withdrawn_creates_marker_is_no_checkpoint(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch, names_items: bool,
) -> None:
    """A create at 1 was withdrawn and its process stopped before removing its marker: the
    marker outlived its slot. A change guarded by 0 removes it before its guard takes key
    1 (listed beside the guard, it made the guard read as that checkpoint). While the guard
    stands, readers find 0 the newest, and an append at 1 breaks the guard, so the change
    fails. A marker naming shared items leaves the run's sweep cue in its place."""
    holder, other = stores
    run = make_run("review-bare-marker")
    with anyio.fail_after(DEADLINE):
        await _append(other, run, 0)
        withdrawn = layout.Slot(run.incarnation, 1, checkpoint_id_of(make_run("gone"), 1), T0,
                                None, T0 + 1, b"h", b"p", token=b"withdrwn", run_key=key_of(run),
                                refs=("ab" * 32,) if names_items else ())
        marker = s3._marker_of(other.prefix, key_of(run), 1, "m", s3._listing_of(withdrawn))
        client = await other.client()
        await client.put_object(Bucket=other.bucket, Key=other.prefix + marker[0], Body=b"")
        seen: list[tuple[str, int, int]] = []
        reported: list[str] = []

        async def read_and_append() -> None:
            seen.append(await _state(other, run))
            reported.append(await _append(other, run, 1, now=T0 + 1))

        _around_change(holder, monkeypatch, before=read_and_append)
        with pytest.raises(ConflictError):
            await _pause(holder, run, 0)

        assert seen == [("active", 0, 1)]
        assert reported == ["active"]
        assert await _state(other, run) == ("active", 1, 2)
        found = await other.get(key_of(run), 1, now=T0 + 2)
        assert found is not None
        assert found[0].checkpoint_id == checkpoint_id_of(run, 1)
        assert await _guard_keys(other, run) == []
        left = await _objects(other)
        assert marker[0] not in left
        assert (layout.sweep_due(key_of(run)) in left) is names_items
