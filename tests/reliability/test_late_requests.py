"""Requests delivered late, after the client gave up on them and went on.

A fault proxy holds a request back (``Fault.LATE``) and closes the client's connection: the
driver sends the request again, which the server applies and answers, and the caller goes on
(starts the run again, writes an item anew, changes the run's status). Only then does the
held request reach the server, on its own connection. A request that is safe to apply late
is one conditioned on what the later operations changed (an incarnation, a version, a
checkpoint id, a write token the server remembers); one that is not would delete a newer
life of the run, an item written after it, or undo a later change. Each case scripts one
late request of one store operation and checks what the later operations left.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncIterator

import anyio
import pytest

from fastcheckpoint import CheckpointConfig, CheckpointManager, _ids
from fastcheckpoint.stores import CheckpointStore, Item
from tests.reliability._audit import state_for
from tests.reliability._stores import FAST_RETRY, Target
from tests.reliability.faults import (
    REDIS,
    Fault,
    FaultPlan,
    FaultProxy,
    Wire,
    http_calling,
    http_line,
    postgres_running,
)

pytestmark = pytest.mark.anyio

CONFIG = CheckpointConfig(max_checkpoints_per_run=None, retry=FAST_RETRY)
DEADLINE = 60.0

STORES = ("redis", "postgres", "dynamodb")


def _unique(name: str) -> str:
    """A run id of this test's own (DynamoDB's table is the session's)."""
    return f"{name}-{secrets.token_hex(4)}"


@pytest.fixture(params=STORES)
def late_target(request: pytest.FixtureRequest) -> Target:
    target: Target = request.getfixturevalue(f"{request.param}_store_target")
    return target


_POSTGRES_FUNCTIONS = {
    "delete_run": b'"fc_delete_run"(',
    "delete": b'"fc_delete"(',
    "put_items": b'"fc_put_items"(',
    "put_owned_items": b'"fc_put_owned_items"(',
    "delete_items": b'"fc_delete_items"(',
    "update_run": b'"fc_update_run"(',
}
_DYNAMODB_REQUESTS: dict[str, tuple[str, ...]] = {
    "delete_run": ("BatchWriteItem", "TransactWriteItems"),  # the records' deletes
    "delete": ("TransactWriteItems",),
    "put_items": ("TransactWriteItems",),
    "put_owned_items": ("TransactWriteItems",),
    "delete_items": ("DeleteItem",),
    "update_run": ("UpdateItem",),
}


def _wire(target: Target, operation: str, request: str | None = None) -> Wire:
    """The wire on which the first request of ``operation`` (for DynamoDB, of the named
    request of it) is the one the plan holds back."""
    if target.name == "redis":
        return REDIS  # one script call per operation
    if target.name == "postgres":
        return postgres_running(_POSTGRES_FUNCTIONS[operation])
    return http_calling(*((request,) if request else _DYNAMODB_REQUESTS[operation]))


@contextlib.asynccontextmanager
async def _held(
    target: Target, wire: Wire, script: tuple[Fault, ...] = (Fault.LATE,)
) -> AsyncIterator[tuple[CheckpointStore, FaultProxy]]:
    """A store whose first request on ``wire`` (or the one ``script`` says) is delivered
    late, and the proxy that holds it (``release_late`` sends it)."""
    assert target.upstream is not None
    with FaultProxy(target.upstream, wire, FaultPlan(script=script)) as proxy:
        store = target.store(proxy.endpoint)
        try:
            yield store, proxy
        finally:
            await store.aclose()


async def _release(proxy: FaultProxy, held: int = 1) -> None:
    """Deliver the held request now; ``held``: how many the operation sent (0 when it sent no
    request of the kind the wire names)."""
    assert proxy.counts[Fault.LATE] == held, dict(proxy.counts)
    assert await anyio.to_thread.run_sync(proxy.release_late) == held


@contextlib.asynccontextmanager
async def _direct(target: Target) -> AsyncIterator[tuple[CheckpointStore, CheckpointManager]]:
    store = target.store()
    try:
        with anyio.fail_after(DEADLINE):
            yield store, CheckpointManager(store, config=CONFIG)
    finally:
        await store.aclose()


async def _late_delete_run_then_new_life(
    target: Target, run_id: str, before: int, request: str | None = None, *,
    wire: Wire | None = None, script: tuple[Fault, ...] = (Fault.LATE,),
) -> None:
    async with _direct(target) as (_, manager):
        for step in range(before):
            await manager.create(run_id, state_for(f"{run_id}/old/{step}"), force=True)
        held = wire or _wire(target, "delete_run", request)
        async with _held(target, held, script) as (store, proxy):
            removed = await CheckpointManager(store, config=CONFIG).delete_run(run_id)
            assert removed == before
            created = await manager.create(run_id, state_for(f"{run_id}/new"), force=True)
            assert created is not None
            await _release(proxy)
        restored = await manager.restore_from(created.checkpoint_id)
        assert restored is not None, "a late delete_run removed the run's next life"
        assert restored.state == state_for(f"{run_id}/new")
        listed = await manager.list_checkpoints(run_id)
        assert [c.checkpoint_id for c in listed] == [created.checkpoint_id]
        again = await manager.create(run_id, state_for(f"{run_id}/next"), force=True)
        assert again is not None
        assert again.metadata.sequence == 1


async def test_a_late_delete_run_spares_the_next_life_of_the_run(late_target: Target) -> None:
    """delete_run, whose first try arrives after its retry removed the run and the run was
    started again: the new life's acknowledged checkpoint stays (and the run goes on)."""
    await _late_delete_run_then_new_life(late_target, _unique("late-delete-run"), 2)


async def test_a_late_delete_run_of_an_absent_run_spares_its_first_life(
    late_target: Target,
) -> None:
    """The same when there was no run to delete (a reset before a start): the retry removed
    nothing, so nothing was remembered for the late first try to find."""
    if late_target.name == "dynamodb":
        pytest.skip("DynamoDB's delete_run of an absent run sends no write to deliver late")
    await _late_delete_run_then_new_life(late_target, _unique("late-delete-absent"), 0)


_S3_BATCH = rb"^POST /[^ ]*[?&]delete"
"""An S3 ``DeleteObjects`` request's first line."""


@pytest.mark.parametrize(("line", "script"), [
    (rb"^DELETE ", (Fault.LATE,)),
    (_S3_BATCH, (Fault.LATE,)),
    (_S3_BATCH, (Fault.PASS, Fault.LATE)),
], ids=["run-object", "slots", "the-rest"])
async def test_a_late_s3_delete_run_request_spares_the_next_life_of_the_run(
    s3_store_target: Target, line: bytes, script: tuple[Fault, ...]
) -> None:
    """S3's delete_run sends the run object's delete, then a batch of the slots, then one of
    the rest; each of them late: its ETag conditions spare the new life's objects at the
    same keys. (Its other requests cannot be held back here: their PUTs wait for the
    server's ``100 Continue``.)"""
    await _late_delete_run_then_new_life(s3_store_target, _unique("late-s3"), 2,
                                         wire=http_line(line), script=script)


async def test_a_late_run_item_delete_spares_the_next_life_of_the_run(
    dynamodb_store_target: Target,
) -> None:
    """DynamoDB's delete_run ends with the run item's delete: that one late."""
    await _late_delete_run_then_new_life(dynamodb_store_target, _unique("late-run-item"), 2,
                                         "DeleteItem")


async def test_a_late_checkpoint_delete_spares_the_next_life_of_the_run(
    late_target: Target,
) -> None:
    """delete of a checkpoint, late after the run was deleted and started again up to the
    same sequence: the checkpoint id it names is the old life's, so nothing goes."""
    run_id = _unique("late-delete")
    async with _direct(late_target) as (_, manager):
        old = [await manager.create(run_id, state_for(f"old/{n}"), force=True) for n in range(2)]
        assert old[1] is not None
        async with _held(late_target, _wire(late_target, "delete")) as (store, proxy):
            assert await CheckpointManager(store, config=CONFIG).delete(old[1].checkpoint_id)
            await manager.delete_run(run_id)
            new = [await manager.create(run_id, state_for(f"new/{n}"), force=True)
                   for n in range(2)]
            await _release(proxy)
        for created in new:
            assert created is not None
            assert await manager.restore_from(created.checkpoint_id) is not None, (
                "a late delete removed a checkpoint of the run's next life")


@pytest.mark.parametrize("held_before", [True, False], ids=["item-held", "item-absent"])
async def test_a_late_items_delete_spares_an_item_written_after_it(
    late_target: Target, held_before: bool
) -> None:
    """delete_items, late after its retry answered and the key was written again: the new
    value stays."""
    run_id = _unique("late-items-delete")
    key = _ids.key_of(run_id)
    async with _direct(late_target) as (direct, manager):
        await manager.create(run_id, state_for("items"), force=True)
        if held_before:
            await direct.put_items(key, [Item(key="k", value=b"old")], now=time.time())
        async with _held(late_target, _wire(late_target, "delete_items")) as (store, proxy):
            assert await store.delete_items(key, ["k"]) == int(held_before)
            await direct.put_items(key, [Item(key="k", value=b"new")], now=time.time())
            # DynamoDB reads the items first: none held, no delete sent.
            await _release(proxy, 0 if late_target.name == "dynamodb" and not held_before else 1)
        assert await direct.get_items(key, ["k"], now=time.time()) == {"k": b"new"}, (
            "a late delete_items removed an item written after it")


async def test_a_late_item_write_does_not_overwrite_a_newer_value(late_target: Target) -> None:
    """put_items (an upsert), late after its retry landed and the key was written again: the
    newer value stays."""
    if late_target.name == "dynamodb":
        pytest.skip("DynamoDB answers a transaction sent again from its ClientRequestToken, "
                    "which moto ignores")
    run_id = _unique("late-items-put")
    key = _ids.key_of(run_id)
    async with _direct(late_target) as (direct, manager):
        await manager.create(run_id, state_for("items"), force=True)
        async with _held(late_target, _wire(late_target, "put_items")) as (store, proxy):
            await store.put_items(key, [Item(key="k", value=b"first")], now=time.time())
            await direct.put_items(key, [Item(key="k", value=b"second")], now=time.time())
            await _release(proxy)
        assert await direct.get_items(key, ["k"], now=time.time()) == {"k": b"second"}, (
            "a late item write overwrote a newer value")


async def test_a_late_owned_item_write_does_not_overwrite_a_newer_value(
    late_target: Target,
) -> None:
    """put_owned_items as an upsert (the LangGraph saver's special writes), late after its
    retry landed and the same checkpoint's item was written again: the newer value stays."""
    if late_target.name == "dynamodb":
        pytest.skip("DynamoDB answers a transaction sent again from its ClientRequestToken, "
                    "which moto ignores")
    run_id = _unique("late-owned-put")
    key = _ids.key_of(run_id)
    async with _direct(late_target) as (direct, manager):
        created = await manager.create(run_id, state_for("owned"), force=True)
        owner, checkpoint_id = created.metadata.sequence, created.checkpoint_id

        async def write(store: CheckpointStore, value: bytes) -> bool:
            return await store.put_owned_items(
                key, [Item(key="k", value=value, owner=owner)], owner=owner,
                checkpoint_id=checkpoint_id, if_absent=False, now=time.time())

        async with _held(late_target, _wire(late_target, "put_owned_items")) as (store, proxy):
            assert await write(store, b"first")
            assert await write(direct, b"second")
            await _release(proxy)
        assert await direct.get_items(key, ["k"], now=time.time()) == {"k": b"second"}, (
            "a late owned-item write overwrote a newer value")


async def test_a_late_status_change_does_not_undo_a_later_one(late_target: Target) -> None:
    """update_run, late after its retry landed and a second change followed: it is
    conditioned on the version it read, so the second change stands."""
    run_id = _unique("late-status")
    key = _ids.key_of(run_id)
    async with _direct(late_target) as (direct, manager):
        await manager.create(run_id, state_for("status"), force=True)
        run = await direct.get_run(key, now=time.time())
        assert run is not None
        async with _held(late_target, _wire(late_target, "update_run")) as (store, proxy):
            first = await store.update_run(key, incarnation=run.incarnation, version=run.version,
                                           status="paused", data=b"first", now=time.time())
            await direct.update_run(key, incarnation=run.incarnation, version=first.version,
                                    status="completed", data=b"second", now=time.time())
            await _release(proxy)
        after = await direct.get_run(key, now=time.time())
        assert after is not None
        assert (after.status, after.data, after.version) == (
            "completed", b"second", run.version + 2), "a late status change undid a later one"


