"""S3 store: a create's commit (its slot's create-only PUT) that lands after another process
took the same sequence, appended past it and pruned it (``keep_latest``): the key was free
again, so the PUT succeeded, and the check of the run object sent beside it had been answered
before any of that. Acknowledged, it would carry the checkpoint id the other create was given
(ids name the sequence), and that id would then restore its state. The store reads the run
object again after the commit's answer: a floor raised past the slot means its key was freed
by a pruning, before the slot landed or after, so the slot is taken back and the outcome is
unknown (``StoreUnavailableError``); never acknowledged, never written a second time."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from fastcheckpoint import CheckpointManager
from fastcheckpoint.errors import StoreError, StoreUnavailableError
from fastcheckpoint.stores import _s3_io
from fastcheckpoint.stores import _s3_layout as layout
from fastcheckpoint.stores._base import RunRecord
from fastcheckpoint.stores.s3 import S3Store
from fastcheckpoint.testing import T0, key_of, make_checkpoint, make_item, make_run
from fastcheckpoint.testing._adapter import _append_items
from tests._helpers import FakeClock, make_config
from tests.stores._moto import moto_endpoint
from tests.stores.s3.test_s3 import DEADLINE
from tests.stores.s3.test_s3_sequence_guard import _objects, stores

__all__ = ["moto_endpoint", "stores"]

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


def _hold_commit(monkeypatch: pytest.MonkeyPatch, store: S3Store, until: anyio.Event) -> None:
    """``store``'s next commit PUT is sent once ``until`` is set (held in the network); the
    check of the run object sent with it goes at once."""
    commit = S3Store._commit
    held: list[int] = []

    async def late(self: S3Store, *args: Any, **kwargs: Any) -> Any:
        if self is store and not held:
            held.append(1)
            await until.wait()
        return await commit(self, *args, **kwargs)

    monkeypatch.setattr(S3Store, "_commit", late)


def _before_check(monkeypatch: pytest.MonkeyPatch, store: S3Store,
                  meanwhile: Callable[[], Awaitable[None]]) -> None:
    """Run ``meanwhile`` after ``store``'s next commit was answered, before the check of the
    run object that follows it is sent."""
    check = S3Store._landed_above_floor
    ran: list[int] = []

    async def delayed(self: S3Store, *args: Any, **kwargs: Any) -> Any:
        if self is store and not ran:
            ran.append(1)
            await meanwhile()
        return await check(self, *args, **kwargs)

    monkeypatch.setattr(S3Store, "_landed_above_floor", delayed)


def _fail_check(monkeypatch: pytest.MonkeyPatch, client: Any) -> list[int]:
    """Every second ``get_if_changed`` of the run object through ``client`` (the check after
    each commit; the first goes with the commit) fails as S3 being unreachable would."""
    original = _s3_io.Bucket.get_if_changed
    calls: list[int] = []

    async def failing(bucket: Any, *args: Any, **kwargs: Any) -> Any:
        if bucket.client is client:
            calls.append(1)
            if len(calls) % 2 == 0:
                raise StoreError("S3 is unreachable (injected)")
        return await original(bucket, *args, **kwargs)

    monkeypatch.setattr(_s3_io.Bucket, "get_if_changed", failing)
    return calls


async def _append(store: S3Store, run: RunRecord, sequence: int, *,
                  keep_latest: int | None = None) -> str:
    return await store.append(key_of(run), make_checkpoint(run, sequence), run=run,
                              keep_latest=keep_latest, now=T0)


async def _slot_keys(store: S3Store, run: RunRecord) -> list[int]:
    """The sequences of the run's slot objects (checkpoints and tombstones)."""
    prefix = layout.slots_prefix(key_of(run))
    found = []
    for key in await _objects(store):
        rest = key[len(prefix):] if key.startswith(prefix) else ""
        sequence = layout.parse_sequence(rest) if rest and "/" not in rest else None
        if sequence is not None:
            found.append(sequence)
    return sorted(found)


async def test_a_create_landing_in_a_key_a_pruning_freed_is_not_acknowledged(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two managers, one checkpoint kept per run. The first one's create is held in the
    network while the second creates "one" at the same sequence and "two" (pruning "one"):
    before, the late create was acknowledged with "one"'s id, and that id restored it."""
    clock = FakeClock()
    first, second = (CheckpointManager(store, config=make_config(
        clock, max_checkpoints_per_run=1)) for store in stores)
    created: dict[str, Any] = {}
    others_done = anyio.Event()

    async def late_create() -> None:
        try:
            created["late"] = await first.create("run", {"who": "late"})
        except StoreUnavailableError as exc:
            created["late"] = exc

    with anyio.fail_after(DEADLINE):
        await first.create("run", {"who": "start"})
        await second.restore("run")
        _hold_commit(monkeypatch, stores[0], others_done)
        async with anyio.create_task_group() as group:
            group.start_soon(late_create)
            created["one"] = await second.create("run", {"who": "one"})
            created["two"] = await second.create("run", {"who": "two"})  # prunes "one"
            others_done.set()
        monkeypatch.undo()
        by_one = await second.restore_from(created["one"].checkpoint_id)
        latest = await first.restore("run")
        listed = await first.list_checkpoints("run")

    assert isinstance(created["late"], StoreUnavailableError)
    assert str(created["late"]).startswith("outcome unknown: ")
    assert created["one"].metadata.sequence == 1
    assert created["two"].metadata.sequence == 2
    assert by_one is None  # pruned: not the late create's state under "one"'s id
    assert latest is not None
    assert latest.state == {"who": "two"}
    # The late slot was taken back: a slot left at 1 would list, under "one"'s id.
    assert [item.checkpoint_id for item in listed] == [created["two"].checkpoint_id]


async def _item_objects(store: S3Store, run: RunRecord) -> list[str]:
    prefix = layout.item_object(key_of(run), "")
    return sorted(key for key in await _objects(store) if key.startswith(prefix))


@pytest.mark.parametrize("owning", [False, True], ids=["refs", "owned items"])
async def test_an_append_with_items_landing_in_a_freed_key_is_taken_back_whole(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch, owning: bool,
) -> None:
    """The same race at the store, for appends with items (their check after the commit goes
    with the items' round trip): the late append is taken back with its marker and the items
    it owned, and the other process's checkpoints read as they were written."""
    writer, other = stores
    run = make_run("late-items")
    key = key_of(run)

    def items(sequence: int) -> list[Any]:
        if owning:
            return [make_item(f"o/{sequence}", b"mine" if sequence == 1 else None,
                              owner=sequence)]
        return [make_item(f"b/{sequence}")]

    def refs(sequence: int) -> list[str]:
        return [] if owning else [f"b/{sequence}"]

    others_done = anyio.Event()
    outcome: list[BaseException] = []

    async def late() -> None:
        try:
            await _append_items(writer, run, 1, refs=refs(1), items=items(1))
        except StoreUnavailableError as exc:
            outcome.append(exc)

    with anyio.fail_after(DEADLINE):
        await _append_items(writer, run, 0, refs=refs(0), items=items(0))
        _hold_commit(monkeypatch, writer, others_done)
        async with anyio.create_task_group() as group:
            group.start_soon(late)
            await anyio.sleep(0.05)  # the late append's check went before the others
            for sequence in (1, 2):
                await _append_items(other, run, sequence, refs=refs(sequence),
                                    items=[make_item(f"o/{sequence}", owner=sequence)
                                           if owning else make_item(f"b/{sequence}")],
                                    keep_latest=1)
            others_done.set()
        monkeypatch.undo()
        newest = await other.read_with_items(key, sequence=None, now=T0)
        at_one = await other.read_with_items(key, sequence=1, now=T0)
        slots = await _slot_keys(other, run)
        left = await _item_objects(other, run)

    assert len(outcome) == 1
    assert str(outcome[0]).startswith("outcome unknown: ")
    assert newest is not None
    assert newest[0].sequence == 2
    assert newest[2] == {("o/2" if owning else "b/2"): b"value-" + (
        b"o/2" if owning else b"b/2")}
    assert at_one is None  # pruned, and the late one taken back
    assert slots == [2]
    if owning:  # o/1 was the other's checkpoint 1's, pruned with it; the late one's taken back
        assert [name for name in left if layout.hex_item_key("o/1") in name] == []


async def test_a_slot_pruned_before_its_check_is_not_written_again(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The commit landed (the sequence was its), and before its check another process
    appended past it and pruned it: acknowledged or refused, neither is sure, so the outcome
    is unknown. A conflict here would have the manager write the create again at the next
    sequence: twice in the run's history (the other process built on the first)."""
    writer, other = stores
    run = make_run("pruned-before-check")
    key = key_of(run)

    async def meanwhile() -> None:
        for sequence in (2, 3):
            await _append(other, run, sequence, keep_latest=1)

    with anyio.fail_after(DEADLINE):
        await _append(writer, run, 0)
        _before_check(monkeypatch, writer, meanwhile)
        with pytest.raises(StoreUnavailableError, match=r"^outcome unknown: .*pruned"):
            await _append(writer, run, 1)
        monkeypatch.undo()
        newest = await other.latest(key, now=T0)
        slots = await _slot_keys(other, run)

    assert newest is not None
    assert newest[0].sequence == 3
    assert slots == [3]


async def test_a_check_that_cannot_be_read_leaves_the_outcome_unknown(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The run object cannot be read after the commit: without items, the pruning sent
    beside the check may have removed what the slot replaced, so the slot stays and the
    create says its outcome is unknown (it reads as the newest checkpoint); with items
    (nothing pruned yet) the append fails and is taken back."""
    writer, other = stores
    run = make_run("check-fails")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await _append(writer, run, 0)
        calls = _fail_check(monkeypatch, await writer.client())
        with pytest.raises(StoreUnavailableError, match=r"^outcome unknown: .*could not be read"):
            await _append(writer, run, 1, keep_latest=1)
        plain = await other.latest(key, now=T0)
        with pytest.raises(StoreError, match="injected"):
            await _append_items(writer, run, 2, items=[make_item("o/2", owner=2)])
        monkeypatch.undo()
        with_items = await other.read_with_items(key, sequence=None, now=T0)

    assert len(calls) == 4
    assert plain is not None
    assert plain[0].sequence == 1
    assert with_items is not None
    assert with_items[0].sequence == 1  # the append with items was taken back


async def test_a_slot_kept_under_a_floor_raised_over_it_is_acknowledged(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before its check, another process appends after the slot and, pruning an older
    checkpoint, raises the floor over it (two kept): the slot after it names it, so the
    create is acknowledged, and the run's history goes on from it without a gap."""
    writer, other = stores
    run = make_run("kept-under-floor")
    key = key_of(run)

    async def meanwhile() -> None:
        await _append(other, run, 2, keep_latest=2)

    with anyio.fail_after(DEADLINE):
        await _append(writer, run, 0)
        _before_check(monkeypatch, writer, meanwhile)
        assert await _append(writer, run, 1) == "active"
        monkeypatch.undo()
        state = await other.get_run(key, now=T0)
        at_one = await other.get(key, 1, now=T0)
        slots = await _slot_keys(other, run)

    assert state is not None
    assert state.latest_sequence == 2
    assert at_one is not None
    assert at_one[0].checkpoint_id == make_checkpoint(run, 1).checkpoint_id
    assert slots == [1, 2]


async def test_a_failed_create_another_process_appended_after_says_its_outcome_is_unknown(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The check sent with the commit fails (S3 unreachable for that request), and before
    the create takes its slot back another process appends after it: the slot is part of
    the run's history now and stays. The create must not raise the check's error as if
    nothing was written (a caller retrying would write the checkpoint twice): its outcome
    is unknown."""
    writer, other = stores
    run = make_run("left-standing")
    key = key_of(run)
    client = await writer.client()
    original = _s3_io.Bucket.get_if_changed
    withdraw = S3Store._withdraw

    async def failing(bucket: Any, *args: Any, **kwargs: Any) -> Any:
        if bucket.client is client:
            raise StoreError("S3 is unreachable (injected)")
        return await original(bucket, *args, **kwargs)

    async def appended_first(self: S3Store, *args: Any, **kwargs: Any) -> Any:
        if self is writer:
            await _append(other, run, 2)
        return await withdraw(self, *args, **kwargs)

    with anyio.fail_after(DEADLINE):
        await _append(writer, run, 0)
        monkeypatch.setattr(_s3_io.Bucket, "get_if_changed", failing)
        monkeypatch.setattr(S3Store, "_withdraw", appended_first)
        with pytest.raises(StoreUnavailableError,
                           match=r"^outcome unknown: .*could not be taken back") as raised:
            await _append(writer, run, 1)
        monkeypatch.undo()
        left = await other.get(key, 1, now=T0)
        newest = await other.latest(key, now=T0)

    assert "injected" in str(raised.value)
    assert left is not None  # it stands, under the checkpoint appended after it
    assert newest is not None
    assert newest[0].sequence == 2
