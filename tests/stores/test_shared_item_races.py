"""An append that names a shared item without rewriting it, racing the removal of the last
other checkpoint naming that item and the cleanup loop's removal of the item itself.

The race is injected deterministically: the append of process A (which read that the item
exists) is held just before its commit while process B removes the other checkpoint and
runs the cleanup loop to completion; on S3 also between A's commit and its check of the
sweep, and the other way round (A lands while B's sweep collects). Whatever the order, an
acknowledged append is readable with every item its refs name, a refused one
(``SharedItemGone``) leaves nothing behind and succeeds when made again with the value, and
the item goes once no checkpoint names it.

The memory, file and Redis stores have no such window inside a call (one lock or one
script per append); a removal completed before the append's call is the caller's stale
knowledge there, and such an append is acknowledged with the ref naming nothing.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import anyio
import msgspec
import pytest

from fastcheckpoint.errors import SharedItemGone
from fastcheckpoint.stores import _dynamodb_layout as layout
from fastcheckpoint.stores._base import Item, RunRecord, StoredCheckpoint, SupportsSharedItems
from fastcheckpoint.stores.dynamodb import DynamoDBStore
from fastcheckpoint.stores.s3 import S3Store
from fastcheckpoint.testing._builders import T0, checkpoint_id_of, key_of, make_checkpoint, make_run
from tests.stores._moto import moto_endpoint
from tests.stores.dynamodb.test_dynamodb import (
    _raw_item,
    atomic_moto,
    aws_names,
    opened,
    provisioned,
)
from tests.stores.s3.test_s3 import s3_bucket, s3_store

__all__ = ["atomic_moto", "aws_names", "moto_endpoint", "provisioned", "s3_bucket", "s3_store"]

pytestmark = pytest.mark.anyio

VALUE = b"the value of K, written once"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


def _fresh_run() -> RunRecord:
    return make_run(f"shared-race-{secrets.token_hex(4)}")


async def _append(
    store: Any, run: RunRecord, sequence: int, refs: Sequence[str] = (),
    items: Sequence[Item] = (),
) -> StoredCheckpoint:
    assert isinstance(store, SupportsSharedItems)
    record = msgspec.structs.replace(make_checkpoint(run, sequence, created_at=T0),
                                     refs=tuple(refs))
    await store.append_with_items(key_of(run), record, run=run, keep_latest=None, now=T0,
                                  items=items)
    return record


async def _purge(store: Any) -> None:
    for _ in range(50):
        _, done = await store.purge_expired(now=T0, limit=1000)
        if done:
            return
    raise AssertionError("purge_expired never reported done")


async def _race(
    a: Any, b: Any, run: RunRecord, key: str, hold: Callable[[Callable[[], Awaitable[None]]],
                                                              None],
) -> bool:
    """Checkpoint 0 names ``key`` (written with it), checkpoint 1 names nothing; A then
    appends checkpoint 2 naming ``key`` without its value, after reading that it exists,
    while ``hold`` runs B's removal of checkpoint 0 and its cleanup right before A's
    commit. Whether A's append was acknowledged; the invariants are checked either way."""
    run_key = key_of(run)
    await _append(a, run, 0, refs=[key], items=[Item(key=key, value=VALUE)])
    await _append(a, run, 1)
    found = await a.read_with_items(run_key, sequence=0, now=T0)  # A sees K in place
    assert found is not None
    assert found[2] == {key: VALUE}

    async def removal() -> None:
        assert await b.delete(run_key, 0, checkpoint_id=checkpoint_id_of(run, 0))
        await _purge(b)
        assert await b.get_items(run_key, [key], now=T0) == {}  # B's removal completed

    hold(removal)
    try:
        await _append(a, run, 2, refs=[key])
    except SharedItemGone:  # the one refusal allowed: any other error fails the test
        acknowledged = False
    else:
        acknowledged = True
    if acknowledged:
        read = await a.read_with_items(run_key, sequence=2, now=T0)
        assert read is not None
        assert read[2] == {key: VALUE}, "an acknowledged checkpoint lost an item it names"
    else:
        # Nothing half-written: no checkpoint 2, the run at 1, and the append can be made
        # again with the value.
        assert await a.get(run_key, 2, now=T0) is None
        assert await b.get(run_key, 2, now=T0) is None
        record = await b.get_run(run_key, now=T0)
        assert record is not None
        assert record.latest_sequence == 1
        await _append(a, run, 2, refs=[key], items=[Item(key=key, value=VALUE)])
        read = await b.read_with_items(run_key, sequence=2, now=T0)
        assert read is not None
        assert read[2] == {key: VALUE}
    # Once no checkpoint names it, the item goes.
    assert await b.delete(run_key, 2, checkpoint_id=checkpoint_id_of(run, 2))
    await _purge(b)
    assert await b.get_items(run_key, [key], now=T0) == {}
    return acknowledged


# -- DynamoDB -----------------------------------------------------------------------------------


@pytest.fixture
async def dynamodb_pair(
    provisioned: str, aws_names: tuple[str, str]
) -> AsyncIterator[tuple[DynamoDBStore, DynamoDBStore]]:
    """Two processes on one table: A appends, B removes and cleans up."""
    async with opened(provisioned, aws_names) as a, opened(
        provisioned, aws_names, prefix=a.prefix
    ) as b:
        yield a, b


def _before_first_transaction(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch
) -> Callable[[Callable[[], Awaitable[None]]], None]:
    """``hold(work)``: run ``work`` to completion right before the store's next
    ``TransactWriteItems`` is sent (once)."""

    def hold(work: Callable[[], Awaitable[None]]) -> None:
        client = store._clients.current()
        assert client is not None
        original = client.dynamodb.transact_write_items
        pending = [work]

        async def racing(**params: Any) -> Any:
            if pending:
                await pending.pop()()
            return await original(**params)

        monkeypatch.setattr(client.dynamodb, "transact_write_items", racing)

    return hold


async def test_dynamodb_an_append_racing_the_sweep_of_what_it_names(
    dynamodb_pair: tuple[DynamoDBStore, DynamoDBStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = dynamodb_pair
    await a.clients()
    acknowledged = await _race(a, b, _fresh_run(), "b/k",
                               _before_first_transaction(a, monkeypatch))
    assert not acknowledged  # the item was gone when A committed: A must have been refused


async def test_dynamodb_a_sweep_racing_an_append_keeps_what_it_names(
    dynamodb_pair: tuple[DynamoDBStore, DynamoDBStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other order: B's cleanup has read the count at zero when A's append lands."""
    a, b = dynamodb_pair
    run = _fresh_run()
    run_key = key_of(run)
    await _append(a, run, 0, refs=["b/k"], items=[Item(key="b/k", value=VALUE)])
    await _append(a, run, 1)
    assert await b.delete(run_key, 0, checkpoint_id=checkpoint_id_of(run, 0))
    await b.clients()
    appended: list[bool] = []

    async def append_now() -> None:
        await _append(a, run, 2, refs=["b/k"])
        appended.append(True)

    # B's first transaction of the cleanup is its removal of the item (the count read 0).
    _before_first_transaction(b, monkeypatch)(append_now)
    await _purge(b)
    assert appended == [True]
    read = await a.read_with_items(run_key, sequence=2, now=T0)
    assert read is not None
    assert read[2] == {"b/k": VALUE}
    assert await a.delete(run_key, 2, checkpoint_id=checkpoint_id_of(run, 2))
    await _purge(b)
    assert await b.get_items(run_key, ["b/k"], now=T0) == {}


async def test_dynamodb_removed_items_named_beyond_one_transaction(
    dynamodb_pair: tuple[DynamoDBStore, DynamoDBStore],
) -> None:
    """Refs too many for the append's transaction are raised before it: those raises are
    checked the same way, and a refused append leaves no count raised."""
    a, b = dynamodb_pair
    run = _fresh_run()
    run_key = key_of(run)
    keys = [f"b/{index:03}" for index in range(130)]
    await _append(a, run, 0, refs=keys, items=[Item(key=key, value=VALUE) for key in keys])
    await _append(a, run, 1, refs=keys)  # names them all without writing them
    found = await a.read_with_items(run_key, sequence=1, now=T0)
    assert found is not None
    assert found[2] == dict.fromkeys(keys, VALUE)
    await _append(a, run, 2)
    for sequence in (0, 1):
        assert await b.delete(run_key, sequence, checkpoint_id=checkpoint_id_of(run, sequence))
    await _purge(b)
    assert await b.get_items(run_key, keys, now=T0) == {}

    with pytest.raises(SharedItemGone, match="append it again with their values"):
        await _append(a, run, 3, refs=keys)
    assert await a.get(run_key, 3, now=T0) is None
    await _append(a, run, 3, refs=keys, items=[Item(key=key, value=VALUE) for key in keys])
    found = await b.read_with_items(run_key, sequence=3, now=T0)
    assert found is not None
    assert found[2] == dict.fromkeys(keys, VALUE)
    assert await b.delete(run_key, 3, checkpoint_id=checkpoint_id_of(run, 3))
    await _purge(b)
    assert await b.get_items(run_key, keys, now=T0) == {}


async def test_dynamodb_the_mark_of_a_removed_item_goes_after_a_day(
    dynamodb_pair: tuple[DynamoDBStore, DynamoDBStore],
) -> None:
    a, b = dynamodb_pair
    run = _fresh_run()
    run_key = key_of(run)
    await _append(a, run, 0, refs=["b/k"], items=[Item(key="b/k", value=VALUE)])
    await _append(a, run, 1)
    assert await b.delete(run_key, 0, checkpoint_id=checkpoint_id_of(run, 0))
    await _purge(b)
    mark = await _raw_item(b, run_key, layout.counter_sk("b/k"))
    assert mark is not None
    assert "gn" in mark
    for _ in range(50):
        _, done = await b.purge_expired(now=T0 + layout.CONDEMNED_SECONDS, limit=1000)
        if done:
            break
    assert await _raw_item(b, run_key, layout.counter_sk("b/k")) is None
    # A ref naming an item that is not there is then accepted again (reads return what is).
    await _append(a, run, 2, refs=["b/k"])
    found = await a.read_with_items(run_key, sequence=2, now=T0)
    assert found is not None
    assert found[2] == {}


# -- S3 -----------------------------------------------------------------------------------------


@pytest.fixture
async def s3_pair(s3_store: S3Store) -> tuple[S3Store, S3Store]:
    """Two processes on one bucket and prefix: A appends, B removes and cleans up."""
    return s3_store, S3Store(s3_store.bucket, s3_store.prefix, client=await s3_store.client())


def _before_the_commit(
    store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> Callable[[Callable[[], Awaitable[None]]], None]:
    """``hold(work)``: run ``work`` to completion right before the store's next slot PUT
    (the commit of an append), once."""

    def hold(work: Callable[[], Awaitable[None]]) -> None:
        original = store._commit
        pending = [work]

        async def racing(*args: Any, **kwargs: Any) -> str:
            if pending:
                await pending.pop()()
            return await original(*args, **kwargs)

        monkeypatch.setattr(store, "_commit", racing)

    return hold


async def test_s3_an_append_racing_the_sweep_of_what_it_names(
    s3_pair: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = s3_pair
    with anyio.fail_after(60):
        acknowledged = await _race(a, b, _fresh_run(), "b/k", _before_the_commit(a, monkeypatch))
    assert not acknowledged  # the item was gone when A committed: A must have been refused


async def test_s3_a_sweep_deleting_between_an_appends_commit_and_its_check(
    s3_pair: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    """B's sweep has listed the run again (without A's checkpoint) when A's slot lands; it
    deletes the item and finishes before A checks the sweep's lease: A must be refused."""
    a, b = s3_pair
    run = _fresh_run()
    run_key = key_of(run)
    await _append(a, run, 0, refs=["b/k"], items=[Item(key="b/k", value=VALUE)])
    await _append(a, run, 1)
    assert await b.delete(run_key, 0, checkpoint_id=checkpoint_id_of(run, 0))
    rescanned, committed, swept = anyio.Event(), anyio.Event(), anyio.Event()
    commit, check, rescan = a._commit, a._sweep_allows, b._named_since

    async def a_commit(*args: Any, **kwargs: Any) -> str:
        await rescanned.wait()
        etag = await commit(*args, **kwargs)
        committed.set()
        return etag

    async def a_check(*args: Any, **kwargs: Any) -> bool:
        await swept.wait()
        return await check(*args, **kwargs)

    async def b_rescan(*args: Any, **kwargs: Any) -> set[str]:
        found = await rescan(*args, **kwargs)
        rescanned.set()
        await committed.wait()
        return found

    monkeypatch.setattr(a, "_commit", a_commit)
    monkeypatch.setattr(a, "_sweep_allows", a_check)
    monkeypatch.setattr(b, "_named_since", b_rescan)
    outcome: list[bool] = []

    async def append() -> None:
        try:
            await _append(a, run, 2, refs=["b/k"])
        except SharedItemGone:
            outcome.append(False)
        else:
            outcome.append(True)

    async def clean() -> None:
        await _purge(b)
        swept.set()

    with anyio.fail_after(60):
        async with anyio.create_task_group() as group:
            group.start_soon(append)
            group.start_soon(clean)
    monkeypatch.undo()
    assert await b.get_items(run_key, ["b/k"], now=T0) == {}  # the sweep did delete it
    assert outcome == [False]
    assert await a.get(run_key, 2, now=T0) is None
    assert await b.get(run_key, 2, now=T0) is None
    await _append(a, run, 2, refs=["b/k"], items=[Item(key="b/k", value=VALUE)])
    read = await b.read_with_items(run_key, sequence=2, now=T0)
    assert read is not None
    assert read[2] == {"b/k": VALUE}
    assert await b.delete(run_key, 2, checkpoint_id=checkpoint_id_of(run, 2))
    await _purge(b)
    assert await b.get_items(run_key, ["b/k"], now=T0) == {}


async def test_s3_a_sweep_racing_an_append_keeps_what_it_names(
    s3_pair: tuple[S3Store, S3Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other order: A's slot lands before B's sweep lists the run again."""
    a, b = s3_pair
    run = _fresh_run()
    run_key = key_of(run)
    await _append(a, run, 0, refs=["b/k"], items=[Item(key="b/k", value=VALUE)])
    await _append(a, run, 1)
    assert await b.delete(run_key, 0, checkpoint_id=checkpoint_id_of(run, 0))
    rescan = b._named_since

    async def b_rescan(*args: Any, **kwargs: Any) -> set[str]:
        await _append(a, run, 2, refs=["b/k"])  # lands while B's sweep collects
        return await rescan(*args, **kwargs)

    monkeypatch.setattr(b, "_named_since", b_rescan)
    with anyio.fail_after(60):
        await _purge(b)
    monkeypatch.undo()
    read = await a.read_with_items(run_key, sequence=2, now=T0)
    assert read is not None
    assert read[2] == {"b/k": VALUE}
    assert await a.delete(run_key, 2, checkpoint_id=checkpoint_id_of(run, 2))
    await _purge(b)
    assert await b.get_items(run_key, ["b/k"], now=T0) == {}
