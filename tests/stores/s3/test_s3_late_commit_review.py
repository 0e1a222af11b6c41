"""Review of the check after the commit's answer (``S3Store._landed_above_floor`` and
``_follows``): creates whose slot landed first, at a sequence another process then built on,
that the check takes back all the same (a gap in the run's history under a checkpoint that
followed them), because the slot after theirs does not name them although it follows them.
See ``test_s3_late_commit.py`` for the late slots the check must take back."""

from __future__ import annotations

import secrets
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import msgspec
import pytest

from fastcheckpoint import Checkpoint, CheckpointConfig, CheckpointManager
from fastcheckpoint._ids import key_of as key_of_run
from fastcheckpoint.errors import (
    CheckpointError,
    SequenceConflict,
    SharedItemGone,
    StoreUnavailableError,
)
from fastcheckpoint.stores import _s3_io
from fastcheckpoint.stores import _s3_layout as layout
from fastcheckpoint.stores._aws import RequestCounter
from fastcheckpoint.stores.s3 import S3Store
from fastcheckpoint.testing import T0, key_of, make_checkpoint, make_item, make_run
from fastcheckpoint.testing._adapter import _append_items, _read
from tests.stores._moto import moto_endpoint
from tests.stores.s3.test_s3 import DEADLINE, _FaultyProxy, faulty_proxy, s3_bucket, s3_store
from tests.stores.s3.test_s3_damage_fixes import _keys as _keys_under
from tests.stores.s3.test_s3_delete_run import _another, reader, writer
from tests.stores.s3.test_s3_late_commit import _append, _before_check, _hold_commit, _slot_keys
from tests.stores.s3.test_s3_lost_reply_removed import _create_across
from tests.stores.s3.test_s3_safety import _SLOT_PUT, direct, proxied
from tests.stores.s3.test_s3_sequence_guard import _append as _append_expiring
from tests.stores.s3.test_s3_sequence_guard import _around_change, _pause, stores

__all__ = ["direct", "faulty_proxy", "moto_endpoint", "proxied", "reader", "s3_bucket", "s3_store",
           "stores", "writer"]

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


async def test_a_resent_commit_another_process_built_on_is_acknowledged(
    faulty_proxy: type[_FaultyProxy], proxied: S3Store, direct: S3Store
) -> None:
    """The commit PUT is applied and its reply lost. Before it is sent again, another process
    (two checkpoints kept) creates after it, naming it, and its pruning of checkpoint 0
    raises the floor over it (it keeps checkpoint 1). The resend's 412 finds the slot ours:
    it was applied before the other create, which built on it, so it stands. Taken back, the
    run's history would have a gap under the other create (and the manager's caller an
    unknown outcome for a create that was applied)."""
    other = CheckpointManager(direct, config=CheckpointConfig(max_checkpoints_per_run=2))
    built_on: dict[str, Any] = {}

    async def build_on_it() -> None:
        built_on["created"] = await other.create("r", {"by": "other"})

    with anyio.fail_after(DEADLINE):
        outcome = await _create_across(faulty_proxy, proxied, build_on_it,
                                       max_checkpoints_per_run=2)
        listed = await other.list_checkpoints("r")
        parent = await other.restore_from(built_on["created"].metadata.parent_id)

    assert built_on["created"].metadata.sequence == 2
    assert len(outcome) == 1
    assert not isinstance(outcome[0], Exception), outcome[0]
    assert outcome[0].metadata.sequence == 1
    assert built_on["created"].metadata.parent_id == outcome[0].checkpoint_id
    assert [item.sequence for item in listed] == [2, 1]
    assert parent is not None
    assert parent.state == {"n": 1}


async def test_a_resent_commit_the_cleanup_loop_raised_the_floor_over_is_acknowledged(
    faulty_proxy: type[_FaultyProxy], proxied: S3Store, direct: S3Store
) -> None:
    """The commit PUT is applied and its reply lost. Before it is sent again, another
    process's cleanup loop removes the expired checkpoint 0, raising the floor over the
    newest it lists: the applied slot 1. The resend's 412 finds the slot ours, and nothing
    stands above it: the run goes on from it, as it would from a first send's. Taken back,
    the run was left with no checkpoint at all (a dead run) after an applied create."""
    now = [T0]
    other = CheckpointManager(direct, config=CheckpointConfig(clock=lambda: now[0]))

    async def clean_up() -> None:
        now[0] = T0 + 20
        assert await other.cleanup_expired() == 1  # checkpoint 0, expired

    with anyio.fail_after(DEADLINE):
        outcome = await _create_across(faulty_proxy, proxied, clean_up, ttl_seconds=1000,
                                       clock=lambda: T0, default_ttl_seconds=10)
        listed = await other.list_checkpoints("r")

    assert len(outcome) == 1
    assert not isinstance(outcome[0], Exception), outcome[0]
    assert outcome[0].metadata.sequence == 1
    assert [item.checkpoint_id for item in listed] == [outcome[0].checkpoint_id]


async def test_a_resent_commit_landing_in_a_key_another_create_had_is_taken_back(
    faulty_proxy: type[_FaultyProxy], proxied: S3Store, direct: S3Store
) -> None:
    """The other side of the rule above: the commit PUT's first send is cut before S3 saw
    it, and while it is held another process (one checkpoint kept) creates at its sequence
    and after it, pruning that one. The resend lands in the freed key with fewer slots above
    it than this process keeps (three), but the slot after it names the other create: taken
    back, the outcome unknown, and the other create's id restores nothing."""
    writer = CheckpointManager(proxied, config=CheckpointConfig(max_checkpoints_per_run=3))
    other = CheckpointManager(direct, config=CheckpointConfig(max_checkpoints_per_run=1))
    created: dict[str, Any] = {}

    async def late() -> None:
        try:
            created["late"] = await writer.create("r", {"who": "late"})
        except StoreUnavailableError as exc:
            created["late"] = exc

    with anyio.fail_after(DEADLINE):
        await writer.create("r", {"who": "start"})
        gate = faulty_proxy.hold(_SLOT_PUT)
        async with anyio.create_task_group() as group:
            group.start_soon(late)
            await gate.reached()
            created["one"] = await other.create("r", {"who": "one"})
            created["two"] = await other.create("r", {"who": "two"})  # prunes "one"
            faulty_proxy.faults = ["reset"]  # the held send: cut, then sent again
            gate.release.set()
        by_one = await other.restore_from(created["one"].checkpoint_id)
        listed = await other.list_checkpoints("r")

    assert faulty_proxy.faults == []  # the held send was cut
    assert created["one"].metadata.sequence == 1
    assert isinstance(created["late"], StoreUnavailableError)
    assert str(created["late"]).startswith("outcome unknown: ")
    assert by_one is None
    assert [item.checkpoint_id for item in listed] == [created["two"].checkpoint_id]


async def _delete(store: S3Store, run: Any, sequence: int) -> None:
    assert await store.delete(key_of(run), sequence,
                              checkpoint_id=make_checkpoint(run, sequence).checkpoint_id)


async def _landed_then(
    monkeypatch: pytest.MonkeyPatch,
    writer: S3Store,
    meanwhile: Callable[[], Awaitable[None]],
    append: Callable[[], Awaitable[str]],
) -> str | StoreUnavailableError:
    """``append`` (``writer``'s) with ``meanwhile`` run after its commit's answer, before the
    check that follows it: its status, or the unknown outcome it raised."""
    _before_check(monkeypatch, writer, meanwhile)
    try:
        return await append()
    except StoreUnavailableError as exc:
        return exc
    finally:
        monkeypatch.undo()


@pytest.fixture
async def third(stores: tuple[S3Store, S3Store], moto_endpoint: str) -> AsyncIterator[S3Store]:
    """A third process on the bucket of ``stores``."""
    store = _another(stores[1], moto_endpoint)
    yield store
    with anyio.fail_after(10):
        await store.aclose()


_DELETED = ["tombstone", "removed", "removed-listed"]
"""The checkpoint after the writer's is deleted: its tombstone stands; or it is removed by
the next append, made by the deleting process, or by another one that listed the run."""


@pytest.mark.parametrize("case", _DELETED)
async def test_a_slot_followed_by_a_deleted_checkpoint_is_acknowledged(
    stores: tuple[S3Store, S3Store], third: S3Store, monkeypatch: pytest.MonkeyPatch,
    case: str,
) -> None:
    """The writer's slot 1 landed first. Before its check, another process appends 2 after
    it (naming it) and 3, and deletes 2 (its slot a tombstone), the floor raised over 1 by a
    pruning of checkpoint 0 (three kept); or deletes 2 before 3 is appended (by the same
    process, or by a third one, which lists the run), whose pruning removes the tombstone
    below it (no ``keep_latest`` needed) and raises the floor over it. 1 is part of the
    run's history (2 and 3 followed it), and is acknowledged; taken back, the run reads 3
    with a gap under it. The tombstone carries what 2 named (1), and so does its marker;
    3 names that through it, from the deleting process's knowledge or from the listing:
    before, the tombstone named nothing, and 3 named nothing either."""
    writer, other = stores
    run = make_run("followed-by-a-tombstone")
    key = key_of(run)

    async def meanwhile() -> None:
        await _append(other, run, 2)
        if case == "tombstone":
            await _append(other, run, 3, keep_latest=3)  # prunes 0: the floor goes to 4
            await _delete(other, run, 2)
        else:
            # The next append removes the tombstone below it (no keep_latest needed),
            # raising the floor over it.
            await _delete(other, run, 2)
            await _append(other if case == "removed" else third, run, 3)

    with anyio.fail_after(DEADLINE):
        await _append(writer, run, 0)
        outcome = await _landed_then(monkeypatch, writer, meanwhile,
                                     lambda: _append(writer, run, 1))
        state = await other.get_run(key, now=T0)
        at_one = await other.get(key, 1, now=T0)
        slots = await _slot_keys(other, run)

    assert state is not None
    assert state.latest_sequence == 3
    assert slots == ([1, 2, 3] if case == "tombstone" else [0, 1, 3])
    assert outcome == "active", outcome
    assert at_one is not None


@pytest.mark.parametrize("case", _DELETED)
async def test_a_late_slot_under_a_deleted_checkpoint_of_another_chain_is_taken_back(
    stores: tuple[S3Store, S3Store], third: S3Store, monkeypatch: pytest.MonkeyPatch,
    case: str,
) -> None:
    """The other side of the test above: the writer's commit at 1 is held in the network
    while another process appends "one" at 1 and goes on from it, its key freed before the
    held PUT lands there. Either 2 (after "one") and 3 are appended, 0 and 1 pruned (two
    kept) and 2 deleted: its tombstone carries what 2 named, "one". Or "one" is deleted and
    its tombstone removed by the append of 2 (the floor raised over it); once the late slot
    landed, 2 is deleted and its tombstone removed by the append of 3: the run's keys are
    then those of the test above (0, 1 and 3, the floor at 4), but 3 names, through the
    deleted 2 and "one", checkpoint 0 (2 appended by the deleting process, or by a third
    one that learned from its listing what the tombstone at 1 carries). Neither names the
    late slot: taken back, the outcome unknown, and "one"'s id restores nothing."""
    writer, other = stores
    run = make_run("late-under-a-tombstone")
    key = key_of(run)
    landing = anyio.Event()
    outcome: list[object] = []

    appender = third if case == "removed-listed" else other

    async def after_landing() -> None:
        if case != "tombstone":
            await _delete(appender, run, 2)
            await _append(appender, run, 3)  # removes the tombstone at 2: the floor goes to 4

    async def late() -> None:
        outcome.append(await _landed_then(monkeypatch, writer, after_landing,
                                          lambda: _append(writer, run, 1)))

    with anyio.fail_after(DEADLINE):
        await _append(writer, run, 0)
        _hold_commit(monkeypatch, writer, landing)
        async with anyio.create_task_group() as group:
            group.start_soon(late)
            await anyio.sleep(0.05)  # the late append's first check went before the others
            await _append(other, run, 1)
            if case != "tombstone":
                await _delete(other, run, 1)
                await _append(appender, run, 2)  # removes the tombstone at 1: floor at 3
            else:
                await _append(other, run, 2)
                await _append(other, run, 3, keep_latest=2)  # prunes 0 and 1: floor at 4
                await _delete(other, run, 2)
            landing.set()
        at_one = await other.get(key, 1, now=T0)
        slots = await _slot_keys(other, run)

    assert len(outcome) == 1
    assert isinstance(outcome[0], StoreUnavailableError), outcome
    assert str(outcome[0]).startswith("outcome unknown: ")
    assert at_one is None
    assert slots == ([2, 3] if case == "tombstone" else [0, 3])


async def test_a_slot_followed_by_a_checkpoint_the_cleanup_loop_buried_is_acknowledged(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The writer's slot 1 landed first. Before its check, another process appends 2 after
    it (naming it, expiring soon); its cleanup loop buries 2 as the run's expired newest
    (the tombstone carries what 2 named: 1), and that process appends 3 from what it knows,
    without a listing; the cleanup loop then removes the tombstone below the newest and
    raises the floor over 1. 3 must name, through the tombstone its own process wrote, what
    that tombstone carries, as after a ``delete``: before, the cleanup loop left it unknown
    to its process, 3 named nothing, and 1 was taken back (a gap under 3)."""
    writer, other = stores
    run = make_run("followed-by-a-buried-expired")
    key = key_of(run)

    async def meanwhile() -> None:
        await _append_expiring(other, run, 2, expires_at=T0 + 10)
        assert await other.purge_expired(now=T0 + 20, limit=100) == (1, True)  # buries 2
        await _append_expiring(other, run, 3, now=T0 + 20)
        assert await other.purge_expired(now=T0 + 20, limit=100) == (0, True)  # floor at 4

    with anyio.fail_after(DEADLINE):
        await _append(writer, run, 0)
        outcome = await _landed_then(monkeypatch, writer, meanwhile,
                                     lambda: _append(writer, run, 1))
        state = await other.get_run(key, now=T0 + 20)
        at_one = await other.get(key, 1, now=T0 + 20)
        slots = await _slot_keys(other, run)

    assert state is not None
    assert state.latest_sequence == 3
    assert slots == [0, 1, 3]
    assert outcome == "active", outcome
    assert at_one is not None


async def test_a_pending_slot_appended_past_is_acknowledged(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The writer's append with an owned item commits at 1 first; while it writes the item
    (its slot pending, left out by readers), another process appends 2 past it (the run's
    next sequence) and prunes checkpoint 0 (one kept), raising the floor over 1. The slot
    took its sequence before anyone else, no other checkpoint was given its id: it is
    acknowledged, as it is when no pruning raised the floor meanwhile."""
    writer, other = stores
    run = make_run("pending-appended-past")
    key = key_of(run)

    async def meanwhile() -> None:
        await _append(other, run, 2, keep_latest=1)

    with anyio.fail_after(DEADLINE):
        await _append(writer, run, 0)
        outcome = await _landed_then(
            monkeypatch, writer, meanwhile,
            lambda: _append_items(writer, run, 1, items=[make_item("o/1", owner=1)]))
        at_one = await other.read_with_items(key, sequence=1, now=T0)
        slots = await _slot_keys(other, run)

    # The other process's slot 2 names the pending slot as its predecessor (its listing
    # showed it pending): before, it named none, and the slot was taken back.
    assert slots == [1, 2]
    assert not isinstance(outcome, StoreUnavailableError), outcome
    assert at_one is not None
    assert at_one[2] == {"o/1": b"value-o/1"}


async def test_a_slot_a_status_change_guards_is_acknowledged_under_a_cleanup_floor(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The writer's slot 1 landed first. Before its check, another process pauses the run
    on the condition that 1 is its newest checkpoint (its guard at 2, held there), and its
    cleanup loop removes the expired checkpoint 0, raising the floor over the newest, 1. A
    guard is no checkpoint, and one standing as the newest shows that none came after 1:
    the create is acknowledged (taken back, the run had no checkpoint left at all, and the
    pause was conditioned on a checkpoint that was not kept)."""
    writer, other = stores
    run = make_run("guarded-under-a-cleanup-floor")
    key = key_of(run)
    guarded, release = anyio.Event(), anyio.Event()
    paused: list[object] = []

    async def hold() -> None:
        guarded.set()
        await release.wait()

    async def pause() -> None:
        try:
            paused.append(await _pause(other, run, 1))
        except CheckpointError as exc:
            paused.append(exc)

    with anyio.fail_after(DEADLINE):
        await _append_expiring(writer, run, 0, expires_at=T0 + 10)
        _around_change(other, monkeypatch, before=hold)
        async with anyio.create_task_group() as group:

            async def meanwhile() -> None:
                group.start_soon(pause)
                await guarded.wait()
                assert await other.purge_expired(now=T0 + 20, limit=100) == (1, True)

            outcome = await _landed_then(monkeypatch, writer, meanwhile,
                                         lambda: _append(writer, run, 1))
            release.set()
        at_one = await other.get(key, 1, now=T0 + 20)
        slots = await _slot_keys(other, run)

    assert outcome == "active", outcome
    assert at_one is not None
    assert slots == [1]
    assert len(paused) == 1
    assert not isinstance(paused[0], CheckpointError), paused[0]  # 1 was the newest


async def test_the_newest_slot_under_a_cleanup_floor_is_acknowledged_below_an_ended_lifes_seal(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run whose first life died (its checkpoints expired) begins again: the seal of the
    ended life stays at its next sequence (4) until the new life reaches it. The writer's
    slot 1 landed first; before its check, the cleanup loop removes the new life's expired
    checkpoint 0, raising the floor over the newest, 1. Nothing of this life stands above
    it (the seal is another life's): acknowledged, as without the seal (taken back, the new
    life had no checkpoint left)."""
    writer, other = stores
    ended, run = make_run("sealed-above"), make_run("sealed-above")
    key = key_of(run)
    assert ended.incarnation != run.incarnation

    async def clean_up() -> None:
        assert await other.purge_expired(now=T0 + 40, limit=100) == (1, True)

    with anyio.fail_after(DEADLINE):
        for sequence in range(4):
            await _append_expiring(writer, ended, sequence, expires_at=T0 + 10)
        await _append_expiring(writer, run, 0, expires_at=T0 + 30, now=T0 + 20)
        sealed = await _slot_keys(other, run)
        outcome = await _landed_then(
            monkeypatch, writer, clean_up,
            lambda: _append_expiring(writer, run, 1, now=T0 + 20))
        at_one = await other.get(key, 1, now=T0 + 40)
        slots = await _slot_keys(other, run)

    assert sealed == [0, 4]
    assert outcome == "active", outcome
    assert at_one is not None
    assert slots == [1, 4]


async def _cancelled_then_landed(
    faulty_proxy: type[_FaultyProxy], proxied: S3Store, direct: S3Store,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[CheckpointManager, Checkpoint, Checkpoint, list[int]]:
    """The writer's commit PUT is held in the network and its create cancelled (the
    caller's deadline: a create without owned items stops where it is). Another process
    (one checkpoint kept) creates "one" at that sequence and "two", pruning "one"; then the
    held PUT reaches S3 and lands in the freed key, and no process checks it. Returns that
    process's manager, "one", "two" and the held PUT's status (once S3 answered it)."""
    writer = CheckpointManager(proxied, config=CheckpointConfig(max_checkpoints_per_run=1))
    other = CheckpointManager(direct, config=CheckpointConfig(max_checkpoints_per_run=1))
    forward = _FaultyProxy._forward
    forwarded = threading.Event()
    landed: list[int] = []

    def forwarding(handler: _FaultyProxy, body: bytes) -> Any:
        if handler.command != "PUT":
            return forward(handler, body)  # the run object's GET sent with the held PUT
        try:
            answer = forward(handler, body)
            landed.append(answer[0].status)
            return answer
        finally:
            forwarded.set()

    await writer.create("r", {"who": "start"})
    monkeypatch.setattr(_FaultyProxy, "_forward", forwarding)
    gate = faulty_proxy.hold(_SLOT_PUT)
    async with anyio.create_task_group() as group:
        group.start_soon(writer.create, "r", {"who": "late"})
        await gate.reached()
        group.cancel_scope.cancel()
    one = await other.create("r", {"who": "one"})
    two = await other.create("r", {"who": "two"})  # prunes "one"
    gate.release.set()
    assert await anyio.to_thread.run_sync(forwarded.wait, DEADLINE)  # the held PUT
    monkeypatch.undo()
    return other, one, two, landed


async def test_a_cancelled_create_landing_in_a_freed_key_gives_its_state_to_no_other_id(
    faulty_proxy: type[_FaultyProxy], proxied: S3Store, direct: S3Store,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The held PUT of a cancelled create lands in the key a pruning freed (see
    :func:`_cancelled_then_landed`): "one"'s id must not restore the cancelled create's
    state (it restores nothing: pruned)."""
    with anyio.fail_after(DEADLINE):
        other, one, _, landed = await _cancelled_then_landed(faulty_proxy, proxied, direct,
                                                             monkeypatch)
        by_one = await other.restore_from(one.checkpoint_id)

    # The case needs the held PUT to land (a machine under load may break its connection).
    assert landed[-1:] == [200], landed
    assert one.metadata.sequence == 1
    assert by_one is None, by_one.state


async def test_a_cancelled_create_landing_in_a_freed_key_is_no_checkpoint_to_any_read(
    faulty_proxy: type[_FaultyProxy], proxied: S3Store, direct: S3Store,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same late slot, read every other way: a plain ``get`` (no listing of its keys
    read with it: below the floor, a LIST of them, then the LIST and GET telling whether
    the slot after it follows it), a listing of the run's checkpoints, the
    cleanup loop (which writes the markers writers left out, and must not write this one's:
    it would make the slot read as "one"), and ``restore`` once "two" is deleted (the late
    slot is then the newest slot of the run that is not a tombstone)."""
    with anyio.fail_after(DEADLINE):
        other, one, two, landed = await _cancelled_then_landed(faulty_proxy, proxied, direct,
                                                               monkeypatch)
        key = key_of_run("r")
        client = await direct.client()
        with RequestCounter.attached(client) as read:
            got = await direct.get(key, 1, now=T0)
        listed = await other.list_checkpoints("r")
        await direct.purge_expired(now=T0, limit=100)
        marked = [entry for entry in await _keys_under(direct, layout.slot_key(key, 1))
                  if entry != layout.slot_key(key, 1)]
        by_one = await other.restore_from(one.checkpoint_id)
        assert await other.delete(two.checkpoint_id)
        latest = await other.restore("r")

    assert landed[-1:] == [200], landed
    assert got is None, got[0]
    assert read.counts == {"GetObject": 3, "ListObjectsV2": 2}, read.counts
    assert [item.checkpoint_id for item in listed] == [two.checkpoint_id]
    assert marked == []
    assert by_one is None, by_one.state
    assert latest is None, latest.state


async def test_an_acknowledged_create_whose_marker_failed_reads_below_the_floor(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The other side of the rule above: a create without owned items is acknowledged when
    its marker's PUT fails (its slot is read instead). Once later creates pruned past it
    and raised the floor above it, it is a slot without marker below the floor, as a late
    one is; the slot after it names it, so every read still finds it, and ``restore`` does
    once the checkpoint after it is deleted (its tombstone names it)."""
    writer_store, other_store = stores
    writer = CheckpointManager(writer_store, config=CheckpointConfig(max_checkpoints_per_run=2))
    other = CheckpointManager(other_store)
    key = key_of_run("kept")
    original = _s3_io.Bucket.put

    async def put(bucket: Any, target: str, *args: Any, **kwargs: Any) -> Any:
        if target.startswith(layout.slot_key(key, 1) + "/"):
            raise StoreUnavailableError("injected: the marker's PUT failed")
        return await original(bucket, target, *args, **kwargs)

    with anyio.fail_after(DEADLINE):
        await writer.create("kept", {"n": 0})
        monkeypatch.setattr(_s3_io.Bucket, "put", put)
        bare = await writer.create("kept", {"n": 1})
        monkeypatch.undo()
        last = await writer.create("kept", {"n": 2})  # prunes 0, raises the floor to 3
        state = (await other_store._read_state(await other_store._objects(), key))
        by_id = await other.restore_from(bare.checkpoint_id)
        got = await other_store.get(key, 1, now=T0)
        listed = await other.list_checkpoints("kept")
        assert await other.delete(last.checkpoint_id)
        latest = await other.restore("kept")

    assert state is not None
    assert state[0].floor == 3
    assert by_id is not None
    assert by_id.state == {"n": 1}
    assert got is not None
    assert got[0].checkpoint_id == bare.checkpoint_id
    assert [item.checkpoint_id for item in listed] == [last.checkpoint_id, bare.checkpoint_id]
    assert latest is not None
    assert latest.checkpoint_id == bare.checkpoint_id


async def test_a_create_between_its_pruning_and_its_marker_is_read_as_the_newest(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One checkpoint kept: a create's pruning removes the checkpoint before it beside the
    marker's PUT. Read in between (or for good, its writer killed there), the new slot has
    no marker and lies below the floor the pruning raised: the run goes on from it
    (nothing stands above it), so every read finds it, never no checkpoint at all."""
    writer_store, other_store = stores
    writer = CheckpointManager(writer_store, config=CheckpointConfig(max_checkpoints_per_run=1))
    other = CheckpointManager(other_store)
    key = key_of_run("between")
    put, delete_listed = _s3_io.Bucket.put, _s3_io.Bucket.delete_listed
    pruned = anyio.Event()
    read: list[Any] = []

    async def deleting(bucket: Any, listed: Any) -> None:
        await delete_listed(bucket, listed)
        pruned.set()

    async def marking(bucket: Any, target: str, *args: Any, **kwargs: Any) -> Any:
        if target.startswith(layout.slot_key(key, 3) + "/"):
            await pruned.wait()
            latest = await other.restore("between")
            listed = await other.list_checkpoints("between")
            read.append((None if latest is None else latest.state,
                         [item.sequence for item in listed],
                         await other_store.get(key, 3, now=T0)))
        return await put(bucket, target, *args, **kwargs)

    with anyio.fail_after(DEADLINE):
        for n in range(3):
            await writer.create("between", {"n": n})
        monkeypatch.setattr(_s3_io.Bucket, "delete_listed", deleting)
        monkeypatch.setattr(_s3_io.Bucket, "put", marking)
        await writer.create("between", {"n": 3})
        monkeypatch.undo()
        state = await other_store._read_state(await other_store._objects(), key)

    assert state is not None
    assert state[0].floor == 4  # raised by the pruning of checkpoint 2: above 3
    assert len(read) == 1
    latest, listed, got = read[0]
    assert latest == {"n": 3}
    assert listed == [3]
    assert got is not None
    assert got[0].sequence == 3


async def test_a_stale_lifes_rewrite_hides_a_sweeps_removal_from_a_new_lifes_append(
    s3_store: S3Store, reader: S3Store, writer: S3Store, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The run's first life is deleted; its writer (``writer``) does not know. The new life
    writes shared item "b/x" with checkpoint 0, then prunes 0: nothing names the item. An
    append of the new life naming it (``s3_store``) finds it in place; before its commit,
    the stale writer appends with the same value (it writes the item again as its own
    life's, then its commit is refused), and a sweep removes the item, named by nothing
    committed. The new life's append, committed after, must be refused (its item is gone)
    or read with the item. Before, the stale writer wrote the item again as its own life's
    (another object, with another ETag), and the sweep's removal of that object was no
    loss to the append, which relied on the object it found: acknowledged, it read
    without the item. Only a writer of the run's life now writes another life's item
    again (it reads the run object to tell)."""
    ended, run = make_run("rewritten"), make_run("rewritten")
    key = key_of(run)
    found, resume = anyio.Event(), anyio.Event()
    put_shared = S3Store._put_shared
    outcome: list[object] = []

    async def held(self: S3Store, *args: Any, **kwargs: Any) -> Any:
        written = await put_shared(self, *args, **kwargs)
        if self is s3_store:
            found.set()
            await resume.wait()
        return written

    async def append_naming_it() -> None:
        try:
            outcome.append(await _append_items(s3_store, run, 2, refs=["b/x"],
                                               items=[make_item("b/x")]))
        except CheckpointError as exc:
            outcome.append(exc)

    with anyio.fail_after(DEADLINE):
        await _append_items(writer, ended, 0, refs=["b/x"], items=[make_item("b/x")])
        assert await reader.delete_run(key) == 1
        await _append_items(reader, run, 0, refs=["b/x"], items=[make_item("b/x")])
        await _append(reader, run, 1, keep_latest=1)  # prunes 0: "b/x" is named by nothing
        monkeypatch.setattr(S3Store, "_put_shared", held)
        async with anyio.create_task_group() as group:
            group.start_soon(append_naming_it)
            await found.wait()
            with pytest.raises(SequenceConflict):
                await _append_items(writer, ended, 1, refs=["b/x"], items=[make_item("b/x")])
            swept = await reader.purge_expired(now=T0, limit=100)
            resume.set()
        read = None if isinstance(outcome[0], CheckpointError) else await _read(reader, run, 2)

    assert swept == (0, True)
    assert isinstance(outcome[0], SharedItemGone) or (
        read is not None and read[2] == {"b/x": b"value-b/x"}), (outcome, read)


async def test_writing_a_shared_item_of_no_known_life_again_costs_a_get_more(
    s3_store: S3Store,
) -> None:
    """What writing a shared item found in place again as this life's costs an append (here
    one stored before items recorded their life; one another life wrote costs the same):
    the item's create-only PUT (412), its GET, a GET of the run object (the writer's life is
    the run's now) and the PUT over it (``IfMatch``); then the slot with its check, the
    marker with the check after the commit, and the sweep lease's GET."""
    run = make_run("rewrite-cost")
    key = key_of(run)
    unrecorded = [b"value-b/x", None, None, secrets.token_bytes(16), True, "", key, "b/x"]
    client = await s3_store.client()
    with anyio.fail_after(DEADLINE):
        await _append_items(s3_store, run, 0, refs=["b/y"], items=[make_item("b/y")])
        await client.put_object(
            Bucket=s3_store.bucket,
            Key=s3_store.prefix + layout.item_object(key, layout.hex_item_key("b/x")),
            Body=b"\x01" + msgspec.msgpack.encode(unrecorded))
        with RequestCounter.attached(client) as appended:
            await _append_items(s3_store, run, 1, refs=["b/x"], items=[make_item("b/x")])
        found = await _read(s3_store, run, 1)

    assert found is not None
    assert found[2] == {"b/x": b"value-b/x"}
    assert appended.counts == {"PutObject": 4, "GetObject": 5}


async def test_a_late_slot_is_not_taken_for_the_floor_another_append_of_its_process_raised(
    stores: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two appends of one process at sequence 1 (two tasks): the first one's commit PUT is
    held in the network. The second one lands, is acknowledged and prunes 0, raising the
    floor to 2 (this process's raise). Another process appends 2 after it and prunes it;
    then the held PUT lands in the freed key. The floor above it was not raised by its own
    pruning: it must not be acknowledged with checkpoint 1's id (the second task's), which
    would then restore its state."""
    writer, other = stores
    run = make_run("same-process")
    key = key_of(run)
    held = anyio.Event()
    outcome: list[object] = []

    async def late() -> None:
        try:
            outcome.append(await _append(writer, run, 1))
        except StoreUnavailableError as exc:
            outcome.append(exc)

    with anyio.fail_after(DEADLINE):
        await _append(writer, run, 0)
        _hold_commit(monkeypatch, writer, held)
        async with anyio.create_task_group() as group:
            group.start_soon(late)
            await anyio.sleep(0.05)  # the late append's check went before the others
            assert await _append(writer, run, 1, keep_latest=1) == "active"
            await _append(other, run, 2, keep_latest=1)  # prunes 1
            held.set()
        monkeypatch.undo()
        at_one = await other.get(key, 1, now=T0)
        slots = await _slot_keys(other, run)

    assert isinstance(outcome[0], StoreUnavailableError), outcome
    assert at_one is None
    assert slots == [2]
