"""The DynamoDB store under races, lost replies, replayed and tampered records, and
transactions cancelled for reasons other than a lost race: no acknowledged checkpoint is lost,
duplicated or misattributed, and every failure is one of our errors."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from botocore.exceptions import ClientError, ConnectionClosedError

import fastcheckpoint
from fastcheckpoint import _ids
from fastcheckpoint._config import RetryPolicy
from fastcheckpoint.errors import (
    CheckpointError,
    ConflictError,
    CorruptCheckpointError,
    SequenceConflict,
    StoreUnavailableError,
    ValidationError,
)
from fastcheckpoint.stores import _dynamodb_layout as layout
from fastcheckpoint.stores import dynamodb
from fastcheckpoint.stores.dynamodb import DEFAULT_THRESHOLD, DynamoDBStore
from fastcheckpoint.testing._builders import (
    T0,
    checkpoint_id_of,
    key_of,
    make_checkpoint,
    make_item,
    make_run,
)
from tests.stores._moto import REGION, moto_endpoint, unique_name
from tests.stores.dynamodb.test_dynamodb import (
    DEADLINE,
    _manager,
    _raw_item,
    atomic_moto,
    aws_names,
    counting,
    opened,
    provisioned,
    store,
)
from tests.stores.dynamodb.test_dynamodb_repair import _garble

__all__ = ["atomic_moto", "aws_names", "moto_endpoint", "provisioned", "store"]

pytestmark = pytest.mark.anyio

QUICK = RetryPolicy(base_delay=0.001, max_delay=0.002, max_retries=2)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


async def _purged(store: DynamoDBStore, now: float) -> int:
    removed = 0
    for _ in range(20):
        count, done = await store.purge_expired(now=now, limit=100)
        removed += count
        if done:
            return removed
    raise AssertionError("purge_expired never reported done")


# -- a whole-run purge racing a restart of the run (issue 12, item 2) ----------------------


async def test_purge_racing_a_restart_leaves_the_new_incarnation_alone(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old = make_run("purge-race", expires_at=T0 + 10)
    new = make_run("purge-race", created_at=T0 + 10)
    key = key_of(old)
    async with opened(provisioned, aws_names, prefix=store.prefix) as other:

        async def restart() -> None:
            # Another process starts the run over and writes side items for it.
            await other.append(key, make_checkpoint(new, 0, created_at=T0 + 10), run=new,
                               keep_latest=None, now=T0 + 10)
            await other.put_items(
                key, [make_item("new-free"), make_item("new-owned", owner=0)], now=T0 + 10)

        listing = store._partition

        async def restarted_before_listing(run_key: str, *attributes: str) -> Any:
            # The race: between the purge's mark and its partition query.
            await restart()
            return await listing(run_key, *attributes)

        with anyio.fail_after(DEADLINE):
            await store.append(key, make_checkpoint(old, 0, expires_at=T0 + 10), run=old,
                               keep_latest=None, now=T0)
            await store.put_items(key, [make_item("old-owned", owner=0)], now=T0)
            monkeypatch.setattr(store, "_partition", restarted_before_listing)

            assert await _purged(store, T0 + 10) == 1

            run = await other.get_run(key, now=T0 + 10)
            assert run is not None
            assert run.incarnation == new.incarnation
            latest = await other.latest(key, now=T0 + 10)
            assert latest is not None
            assert latest[0].checkpoint_id == _ids.checkpoint_id(key, new.incarnation, 0)
            assert await other.get_items(key, ["new-free", "new-owned", "old-owned"],
                                         now=T0 + 10) == {
                "new-free": b"value-new-free", "new-owned": b"value-new-owned"}
            assert await _raw_item(store, key, layout.owned_sk(0, "new-owned")) is not None
            await other.delete_run(key)


async def test_a_cancelled_delete_run_leaves_the_run_whole_or_gone(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``delete_run`` takes several requests (a transaction per 99 records, then the run
    item): an asyncio cancellation between two of them is raised once the run is gone, never
    with it partly deleted (its newest checkpoints gone, its record still counting them)."""
    run = make_run("cancelled-delete")
    key = key_of(run)
    written = store._transact
    batch_done = asyncio.Event()

    async def slow_batches(operations: list[dict[str, Any]]) -> None:
        await written(operations)
        batch_done.set()
        await asyncio.sleep(0.05)  # room for the caller's cancellation before the next one

    with anyio.fail_after(DEADLINE):
        for sequence in range(30):
            await store.append(key, make_checkpoint(run, sequence), run=run, keep_latest=None,
                               now=T0)
        monkeypatch.setattr(store, "_transact", slow_batches)
        deleting = asyncio.ensure_future(store.delete_run(key))
        await batch_done.wait()
        deleting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await deleting
        assert await store.get_run(key, now=T0) is None
        assert await store.latest(key, now=T0) is None
        following = make_run("cancelled-delete", created_at=T0 + 1)
        assert await store.append(key, make_checkpoint(following, 0), run=following,
                                  keep_latest=None, now=T0 + 1) == "active"


async def test_delete_run_cut_short_by_another_delete_counts_what_it_removed(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``delete_run`` removes a run's records in transactions conditioned on the run item it
    read; when another process removes the run item before the second one, that one is
    refused, and the call counts the checkpoints the first one removed, not those it did not."""
    run = make_run("cut-short")
    key = key_of(run)
    written = store._transact
    calls: list[int] = []

    async def another_delete_meanwhile(operations: list[dict[str, Any]]) -> None:
        calls.append(len(operations))
        if len(calls) == 2:
            await store._call("DeleteItem", Key={"PK": {"S": layout.partition(key)},
                                                 "SK": {"S": layout.RUN_SK}})
        await written(operations)

    with anyio.fail_after(DEADLINE):
        for sequence in range(3):
            await store.append(key, make_checkpoint(run, sequence), run=run, keep_latest=None,
                               now=T0)
        await store.put_items(key, [make_item(f"k{n:03}") for n in range(120)], now=T0)
        monkeypatch.setattr(store, "_transact", another_delete_meanwhile)
        removed = await store.delete_run(key)
        monkeypatch.undo()
        left = await store._partition(key, "cid")

    still = sum(1 for entry in left if layout.is_checkpoint_sk(entry["SK"]["S"]))
    assert len(calls) == 2
    assert removed == 3 - still


async def test_a_late_undo_of_a_refused_create_only_write_spares_a_newer_write(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A create-only write of more items than one transaction takes: the first transaction
    lands, the second is refused (a key is taken), and the first one's records are taken
    back. That undo delivered late, after the caller wrote the keys again, spares the newer
    records: it deletes a record only while it holds the refused write's token."""
    run = make_run("late-undo")
    key = key_of(run)
    held: list[Any] = []
    undo = store._undo_puts

    async def hold(*args: Any) -> None:
        held.append(args)  # the network holds the request; the caller goes on

    with anyio.fail_after(DEADLINE):
        await store.append(key, make_checkpoint(run, 0), run=run, keep_latest=None, now=T0)
        await store.put_items(key, [make_item("k140", b"taken")], now=T0)
        monkeypatch.setattr(store, "_undo_puts", hold)
        with pytest.raises(ConflictError):
            await store.put_items(key, [make_item(f"k{n:03}", b"first") for n in range(150)],
                                  create_only=True, now=T0)
        monkeypatch.undo()
        await store.put_items(key, [make_item(f"k{n:03}", b"newer") for n in range(100)],
                              now=T0)
        assert len(held) == 1
        await undo(*held[0])  # delivered now
        found = await store.get_items(key, [f"k{n:03}" for n in range(150)], now=T0)

    assert {name: value for name, value in found.items() if name != "k140"} == {
        f"k{n:03}": b"newer" for n in range(100)}
    assert found["k140"] == b"taken"


async def test_a_cancelled_delete_of_owned_items_leaves_none_for_reads(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleting an owned item takes two requests (its record, then its owned value): a
    cancellation after the first is raised once both are gone, never leaving an owned value
    that ``read_with_items`` returns for an item ``get_items`` says is gone (which a
    second delete, finding no record, would never remove)."""
    run = make_run("cancelled-items")
    key = key_of(run)
    call = store._call
    deletes = 0

    async def cancelling_after_the_first_delete(operation: str, **kwargs: Any) -> Any:
        nonlocal deletes
        result = await call(operation, **kwargs)
        if operation == "DeleteItem":
            deletes += 1
            if deletes == 1:
                deleting.cancel()
        return result

    with anyio.fail_after(DEADLINE):
        await store.append_with_items(
            key, make_checkpoint(run, 0), run=run, keep_latest=None, now=T0,
            items=[make_item("o/0", owner=0), make_item("o/1", owner=0)])
        monkeypatch.setattr(store, "_call", cancelling_after_the_first_delete)
        deleting = asyncio.ensure_future(store.delete_items(key, ["o/0", "o/1"]))
        with pytest.raises(asyncio.CancelledError):
            await deleting
        monkeypatch.undo()
        found = await store.read_with_items(key, sequence=0, now=T0)
    assert deletes == 2  # both items' records (their owned values are conditional deletes)
    assert found is not None
    assert found[2] == {}


async def test_delete_run_leaves_the_blobs_of_a_run_started_after_it_alone(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``delete_run`` removes the table's records and the run's S3 blobs. A process that
    starts the run anew meanwhile (refused while the run is still there) keeps its payload."""
    old = make_run("deleted-then-restarted")
    new = make_run("deleted-then-restarted", created_at=T0 + 1)
    key = key_of(old)
    payload = os.urandom(DEFAULT_THRESHOLD + 1)
    async with opened(provisioned, aws_names, prefix=store.prefix) as other:
        discard = store._discard_prefix

        restarted: list[bool] = []

        async def restart() -> None:
            try:
                await other.append(key, make_checkpoint(new, 0, payload=payload), run=new,
                                   keep_latest=None, now=T0 + 1)
            except SequenceConflict:
                return  # the run is still visible: it must be, until its blobs are gone
            restarted.append(True)

        async def restarted_first(prefix: str, *args: Any) -> int:
            await restart()
            return await discard(prefix, *args)

        with anyio.fail_after(DEADLINE):
            await store.append(key, make_checkpoint(old, 0, payload=payload), run=old,
                               keep_latest=None, now=T0)
            monkeypatch.setattr(store, "_discard_prefix", restarted_first)
            assert await store.delete_run(key) == 1
            if not restarted:
                await restart()
            assert restarted

            found = await other.latest(key, now=T0 + 1)
            assert found is not None
            assert found[0].checkpoint_id == _ids.checkpoint_id(key, new.incarnation, 0)
            assert found[0].payload == payload
            blobs = await (await other._bucket()).list(f"{key}/")
            assert [blob.key.split("/")[1] for blob in blobs] == [new.incarnation]
            await other.delete_run(key)


async def test_leftovers_removed_after_a_restart_spare_the_new_incarnation(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run started over an expired one removes the old run's records in its first
    transaction, and what does not fit right after it. Another process appending to the new
    run meanwhile keeps its checkpoints."""
    monkeypatch.setattr(dynamodb, "_TRANSACTION_LIMIT", 6)  # 4 leftovers fit, 2 overflow
    old = make_run("restarted-with-leftovers", expires_at=T0 + 10)
    new = make_run("restarted-with-leftovers", created_at=T0 + 10)
    key = key_of(old)
    async with opened(provisioned, aws_names, prefix=store.prefix) as other:
        overflow = store._guarded_deletes

        async def appended_meanwhile(deletes: list[dict[str, Any]], **options: Any) -> None:
            for sequence in range(1, 7):
                await other.append(key, make_checkpoint(new, sequence), run=new,
                                   keep_latest=None, now=T0 + 10)
            await overflow(deletes, **options)

        with anyio.fail_after(DEADLINE):
            for sequence in range(7):
                await store.append(key, make_checkpoint(old, sequence, expires_at=T0 + 10),
                                   run=old, keep_latest=None, now=T0)
            monkeypatch.setattr(store, "_guarded_deletes", appended_meanwhile)
            await store.append(key, make_checkpoint(new, 0), run=new, keep_latest=None,
                               now=T0 + 10)

            found, _ = await other.headers(key, before=None, limit=10, now=T0 + 10)
            assert [header.sequence for header in found] == list(range(6, -1, -1))
            assert all(header.checkpoint_id == _ids.checkpoint_id(key, new.incarnation,
                                                                  header.sequence)
                       for header in found)
            await other.delete_run(key)


# -- a run item put back from an older copy (issue 12, item 5) -----------------------------


async def test_a_replayed_run_item_never_overwrites_a_checkpoint(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str]
) -> None:
    clock = [T0]
    writer = _manager(store, clock)
    key = _ids.run_key("replayed")
    with anyio.fail_after(DEADLINE):
        acknowledged = [await writer.create("replayed", state={"n": n}) for n in range(2)]
        saved = await _raw_item(store, key, layout.RUN_SK)
        acknowledged += [await writer.create("replayed", state={"n": n}) for n in range(2, 4)]
        ddb, _ = await store.clients()
        await ddb.put_item(TableName=store.table, Item=saved)  # the old run item is back

        async with opened(provisioned, aws_names, prefix=store.prefix) as fresh:
            restarted = _manager(fresh, clock)  # a process that reads the old run item
            for manager in (restarted, writer):
                with pytest.raises(CorruptCheckpointError, match="behind its log"):
                    await manager.create("replayed", state={"n": "late"})
            for checkpoint in acknowledged:
                again = await restarted.restore_from(checkpoint.checkpoint_id)
                assert again is not None
                assert again.state == checkpoint.state
            latest = await restarted.restore("replayed")  # the old run item hides nothing
            assert latest is not None
            assert latest.checkpoint_id == acknowledged[-1].checkpoint_id

            [damage] = await fresh.damaged_runs(run_key=key, now=clock[0])
            assert "behind its log" in damage.problem
            assert damage.checkpoints == 4
            [report] = await restarted.repair("replayed")
            assert report.repaired
            created = await restarted.create("replayed", state={"n": 4})
            assert created is not None
            assert created.metadata.sequence == 4


# -- a lost reply on the commit (issue 12, item 6) -------------------------------------------


class _LoseFirstReply:
    """A ``before-send`` hook: the first matching request reaches the server (which applies
    it), then its connection dies before the reply arrives; the driver sends it again."""

    def __init__(self, client: Any, operation: str,
                 meanwhile: Callable[[], Any] | None = None) -> None:
        self.client = client
        self.event = f"before-send.dynamodb.{operation}"
        self.meanwhile = meanwhile
        self.lost = 0

    async def __call__(self, request: Any, **_: Any) -> None:
        if self.lost:
            return
        self.lost += 1
        response = await self.client._endpoint._send(request)
        await response.content  # the server has answered: the write is applied
        if self.meanwhile is not None:
            await self.meanwhile()
        raise ConnectionClosedError(endpoint_url=request.url)

    def __enter__(self) -> _LoseFirstReply:
        self.client.meta.events.register(self.event, self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.meta.events.unregister(self.event, self)


async def test_a_commit_whose_reply_was_lost_is_written_once(
    provisioned: str, aws_names: tuple[str, str]
) -> None:
    clock = [T0]
    async with opened(provisioned, aws_names, retry=QUICK) as store:
        manager = _manager(store, clock)
        with anyio.fail_after(DEADLINE):
            await manager.create("lost-reply", state={"n": 0})
            ddb, _ = await store.clients()
            with _LoseFirstReply(ddb, "TransactWriteItems") as fault, counting(store) as (
                dynamo, _
            ):
                created = await manager.create("lost-reply", state={"n": 1})
            assert fault.lost == 1
            assert dynamo.counts == {"TransactWriteItems": 2}  # the attempt and its resend
            assert created is not None
            assert created.metadata.sequence == 1
            listed = await manager.list_checkpoints("lost-reply")
            assert [m.sequence for m in listed] == [1, 0]


async def test_a_lost_reply_then_another_writer_is_still_one_checkpoint(
    provisioned: str, aws_names: tuple[str, str]
) -> None:
    seed = make_run("lost-then-raced")
    key = key_of(seed)
    async with opened(provisioned, aws_names, retry=QUICK) as store, opened(
        provisioned, aws_names, prefix="unused/"
    ) as other:
        with anyio.fail_after(DEADLINE):
            await store.append(key, make_checkpoint(seed, 0), run=seed, keep_latest=None, now=T0)

            async def another_append() -> None:  # lands between our write and its resend
                await other.append(key, make_checkpoint(seed, 2), run=seed, keep_latest=None,
                                   now=T0)

            ddb, _ = await store.clients()
            with _LoseFirstReply(ddb, "TransactWriteItems", another_append) as fault:
                await store.append(key, make_checkpoint(seed, 1), run=seed, keep_latest=None,
                                   now=T0)
            assert fault.lost == 1
            found, _ = await store.headers(key, before=None, limit=10, now=T0)
            assert [header.sequence for header in found] == [2, 1, 0]


async def test_a_delete_or_status_change_whose_reply_was_lost_reports_what_happened(
    provisioned: str, aws_names: tuple[str, str]
) -> None:
    seed = make_run("lost-delete")
    key = key_of(seed)
    async with opened(provisioned, aws_names, retry=QUICK) as store:
        with anyio.fail_after(DEADLINE):
            for sequence in range(2):
                await store.append(key, make_checkpoint(seed, sequence), run=seed,
                                   keep_latest=None, now=T0)
            ddb, _ = await store.clients()
            with _LoseFirstReply(ddb, "TransactWriteItems") as lost_delete:
                assert await store.delete(key, 0, checkpoint_id=checkpoint_id_of(seed, 0))
            with _LoseFirstReply(ddb, "UpdateItem") as lost_update:
                run = await store.update_run(key, incarnation=seed.incarnation, version=0,
                                             status="completed", data=b"done", now=T0)
            assert (lost_delete.lost, lost_update.lost) == (1, 1)
            assert (run.status, run.version, run.checkpoint_count) == ("completed", 1, 1)
            found, status = await store.headers(key, before=None, limit=10, now=T0)
            assert ([header.sequence for header in found], status) == ([1], "completed")


@pytest.mark.parametrize("meanwhile", ["create", "delete"])
async def test_a_delete_whose_reply_was_lost_before_another_write_is_reported_applied(
    provisioned: str, aws_names: tuple[str, str], meanwhile: str
) -> None:
    """The delete lands, another process creates or deletes a checkpoint of the run, then
    the driver sends the delete again: refused (moto ignores the idempotency token), it must
    still be reported applied, not ``False``. Either write replaces the run item's write
    token, and a delete the last delete's: the run item keeps the tokens of its latest
    deletes, which tell."""
    seed = make_run(f"lost-delete-{meanwhile}")
    key = key_of(seed)
    others = {"create": 0, "delete": 1}[meanwhile]
    async with opened(provisioned, aws_names, retry=QUICK) as store, opened(
        provisioned, aws_names, prefix=store.prefix
    ) as other:
        with anyio.fail_after(DEADLINE):
            for sequence in range(others + 2):
                await store.append(key, make_checkpoint(seed, sequence), run=seed,
                                   keep_latest=None, now=T0)

            async def another_write() -> None:  # lands between our delete and its resend
                if not others:
                    await other.append(key, make_checkpoint(seed, 2), run=seed,
                                       keep_latest=None, now=T0)
                for sequence in range(2, others + 2):
                    assert await other.delete(key, sequence,
                                              checkpoint_id=checkpoint_id_of(seed, sequence))

            ddb, _ = await store.clients()
            with _LoseFirstReply(ddb, "TransactWriteItems", another_write) as fault:
                deleted = await store.delete(key, 0, checkpoint_id=checkpoint_id_of(seed, 0))
            assert fault.lost == 1
            assert deleted is True
            found, _ = await store.headers(key, before=None, limit=20, now=T0)
            assert [header.sequence for header in found] == ([1] if others else [2, 1])
            # Reported once: sent again now, it finds nothing to delete.
            assert not await store.delete(key, 0, checkpoint_id=checkpoint_id_of(seed, 0))


async def test_a_delete_whose_reply_was_lost_before_a_rebuild_is_reported_applied(
    provisioned: str, aws_names: tuple[str, str]
) -> None:
    """The delete lands, the run item is damaged and rebuilt (``doctor --repair``), then the
    driver sends the delete again: the rebuilt item has a new write token, so only the
    latest deletes' tokens, carried over by the rebuild, tell that the delete was applied."""
    seed = make_run("lost-delete-rebuild")
    key = key_of(seed)
    async with opened(provisioned, aws_names, retry=QUICK) as store, opened(
        provisioned, aws_names, prefix=store.prefix
    ) as other:
        with anyio.fail_after(DEADLINE):
            for sequence in range(2):
                await store.append(key, make_checkpoint(seed, sequence), run=seed,
                                   keep_latest=None, now=T0)

            async def damage_and_rebuild() -> None:  # between our delete and its resend
                await _garble(other, key, ("bk",))
                await other.rebuild_run(key, seed, now=T0 + 1)

            ddb, _ = await store.clients()
            with _LoseFirstReply(ddb, "TransactWriteItems", damage_and_rebuild) as fault:
                deleted = await store.delete(key, 0, checkpoint_id=checkpoint_id_of(seed, 0))
            assert fault.lost == 1
            assert deleted is True
            found, _ = await store.headers(key, before=None, limit=20, now=T0 + 1)
            assert [header.sequence for header in found] == [1]


@pytest.mark.parametrize("guard", [0, None])
async def test_a_status_change_whose_reply_was_lost_before_an_append_is_reported_applied(
    provisioned: str, aws_names: tuple[str, str], guard: int | None
) -> None:
    """The update lands, another process appends, then the driver sends the update again:
    the store must recognise its own change (it was applied while its condition held), not
    call it a conflict. Appends rewrite the run item's write token, so the resend cannot be
    told from the token appends share."""
    seed = make_run(f"lost-update-{guard}")
    key = key_of(seed)
    async with opened(provisioned, aws_names, retry=QUICK) as store, opened(
        provisioned, aws_names, prefix=store.prefix
    ) as other:
        with anyio.fail_after(DEADLINE):
            await store.append(key, make_checkpoint(seed, 0), run=seed, keep_latest=None, now=T0)

            async def another_append() -> None:  # lands between our update and its resend
                await other.append(key, make_checkpoint(seed, 1), run=seed, keep_latest=None,
                                   now=T0 + 1)

            ddb, _ = await store.clients()
            with _LoseFirstReply(ddb, "UpdateItem", another_append) as fault:
                updated = await store.update_run(
                    key, incarnation=seed.incarnation, version=0, status="paused",
                    data=b"ask", now=T0 + 1, latest_sequence=guard)
            assert fault.lost == 1
            assert (updated.status, updated.version, updated.data) == ("paused", 1, b"ask")
            run = await other.get_run(key, now=T0 + 1)
            assert run is not None
            assert (run.status, run.version, run.latest_sequence) == ("paused", 1, 1)


async def test_a_refused_guarded_update_stays_refused_when_sent_again(
    provisioned: str, aws_names: tuple[str, str]
) -> None:
    """A guarded update refused for a newer checkpoint wrote nothing: its resend (the reply
    of the refusal lost) is refused again, and the run stays as it was."""
    seed = make_run("lost-refusal")
    key = key_of(seed)
    async with opened(provisioned, aws_names, retry=QUICK) as store:
        with anyio.fail_after(DEADLINE):
            for sequence in (0, 1):
                await store.append(key, make_checkpoint(seed, sequence), run=seed,
                                   keep_latest=None, now=T0)
            ddb, _ = await store.clients()
            with _LoseFirstReply(ddb, "UpdateItem") as fault, pytest.raises(
                ConflictError, match="newer checkpoints"
            ):
                await store.update_run(key, incarnation=seed.incarnation, version=0,
                                       status="paused", data=b"ask", now=T0,
                                       latest_sequence=0)
            assert fault.lost == 1
            run = await store.get_run(key, now=T0)
            assert run is not None
            assert (run.status, run.version, run.latest_sequence) == ("active", 0, 1)


async def test_a_guarded_pause_whose_reply_was_lost_before_a_create_returns_the_paused_run(
    provisioned: str, aws_names: tuple[str, str]
) -> None:
    """What a caller sees of the resend above: the pause was applied while the checkpoint
    was the newest, so ``pause`` returns the paused run rather than a ConflictError saying
    the run cannot be paused (it is: by this very call)."""
    clock = [T0]
    async with opened(provisioned, aws_names, retry=QUICK) as store, opened(
        provisioned, aws_names, prefix=store.prefix
    ) as other:
        manager, another = _manager(store, clock), _manager(other, clock)
        with anyio.fail_after(DEADLINE):
            created = await manager.create("lost-pause", state={"n": 0})
            assert created is not None

            async def another_create() -> None:
                await another.create("lost-pause", state={"n": 1})

            ddb, _ = await store.clients()
            with _LoseFirstReply(ddb, "UpdateItem", another_create) as fault:
                paused = await manager.pause("lost-pause", {"action": "refund"},
                                             latest_sequence=created.metadata.sequence)
            assert fault.lost == 1
            assert paused.status is fastcheckpoint.CheckpointStatus.PAUSED
            assert paused.approval is not None
            assert paused.approval["request"] == {"action": "refund"}


async def test_a_large_create_whose_outcome_is_unknown_keeps_its_payload(
    provisioned: str, aws_names: tuple[str, str]
) -> None:
    """The reply of the commit is lost and no resend is allowed: the create fails, but the
    transaction may have landed (here it did), so the blob it points to must stay."""
    seed = make_run("unknown-outcome")
    key = key_of(seed)
    payload = os.urandom(DEFAULT_THRESHOLD + 1)
    no_resend = RetryPolicy(base_delay=0.001, max_delay=0.002, max_retries=0)
    async with opened(provisioned, aws_names, retry=no_resend) as store:
        with anyio.fail_after(DEADLINE):
            await store.append(key, make_checkpoint(seed, 0), run=seed, keep_latest=None, now=T0)
            ddb, _ = await store.clients()
            with _LoseFirstReply(ddb, "TransactWriteItems") as fault, pytest.raises(
                StoreUnavailableError
            ):
                await store.append(key, make_checkpoint(seed, 1, payload=payload), run=seed,
                                   keep_latest=None, now=T0)
            assert fault.lost == 1
            found = await store.latest(key, now=T0)  # it landed: readable, payload and all
            assert found is not None
            assert (found[0].sequence, found[0].payload) == (1, payload)


async def test_a_create_only_item_write_whose_reply_was_lost_succeeds(
    provisioned: str, aws_names: tuple[str, str]
) -> None:
    seed = make_run("lost-items")
    key = key_of(seed)
    async with opened(provisioned, aws_names, retry=QUICK) as store:
        with anyio.fail_after(DEADLINE):
            await store.append(key, make_checkpoint(seed, 0), run=seed, keep_latest=None, now=T0)
            ddb, _ = await store.clients()
            with _LoseFirstReply(ddb, "TransactWriteItems") as lost:
                await store.put_items(key, [make_item("a"), make_item("b", owner=0)],
                                      create_only=True, now=T0)
            assert lost.lost == 1
            assert await store.get_items(key, ["a", "b"], now=T0) == {
                "a": b"value-a", "b": b"value-b"}
            with pytest.raises(ConflictError, match="already exists"):  # others still conflict
                await store.put_items(key, [make_item("a")], create_only=True, now=T0)


async def test_a_purge_whose_mark_lost_its_reply_counts_the_run(
    provisioned: str, aws_names: tuple[str, str]
) -> None:
    seed = make_run("lost-mark", expires_at=T0 + 10)
    key = key_of(seed)
    # A table of its own: a purge of the session's table counts other tests' records too.
    names = (unique_name("mark"), aws_names[1])
    async with opened(provisioned, names, retry=QUICK) as store:
        with anyio.fail_after(DEADLINE):
            await store.provision()
            for sequence in range(2):
                await store.append(key, make_checkpoint(seed, sequence, expires_at=T0 + 10),
                                   run=seed, keep_latest=None, now=T0)
            ddb, _ = await store.clients()
            with _LoseFirstReply(ddb, "UpdateItem") as lost_mark:
                assert await _purged(store, T0 + 10) == 2
            assert lost_mark.lost == 1
            assert await _raw_item(store, key, layout.RUN_SK) is None


# -- transactions cancelled for other reasons (issue 12, item 13) --------------------------


def _cancelled(*codes: str) -> ClientError:
    reasons = [{"Code": code, "Message": f"{code} happened"} if code != "None" else
               {"Code": "None"} for code in codes]
    return ClientError(
        {"Error": {"Code": "TransactionCanceledException", "Message": "cancelled"},
         "CancellationReasons": reasons, "ResponseMetadata": {"RetryAttempts": 0}},
        "TransactWriteItems",
    )


class _Cancelling:
    """Stands in for ``transact_write_items``: cancels the first ``times`` calls with
    ``codes``, then sends the real request."""

    def __init__(self, real: Any, codes: tuple[str, ...], times: int) -> None:
        self.real = real
        self.codes = codes
        self.times = times
        self.calls = 0

    async def __call__(self, **params: Any) -> Any:
        self.calls += 1
        if self.calls <= self.times:
            raise _cancelled(*self.codes)
        return await self.real(**params)


@pytest.mark.parametrize(
    ("codes", "error", "calls"),
    [
        (("None", "ValidationError"), ValidationError, 1),  # an item too large: at once
        (("ItemCollectionSizeLimitExceeded", "None"), CheckpointError, 1),
        (("ThrottlingError", "None"), StoreUnavailableError, 3),  # 1 + 2 retries
        (("TransactionConflict", "None"), ConflictError, 3),
    ],
)
async def test_cancellations_other_than_a_lost_race_surface_with_their_reason(
    provisioned: str, aws_names: tuple[str, str], monkeypatch: pytest.MonkeyPatch,
    codes: tuple[str, ...], error: type[Exception], calls: int,
) -> None:
    clock = [T0]
    run_id = f"cancelled-{'-'.join(codes)}"
    async with opened(provisioned, aws_names, retry=QUICK) as store:
        manager = _manager(store, clock)
        with anyio.fail_after(DEADLINE):
            await manager.create(run_id, state={"n": 0})
            ddb, _ = await store.clients()
            fake = _Cancelling(ddb.transact_write_items, codes, times=100)
            monkeypatch.setattr(ddb, "transact_write_items", fake)
            with pytest.raises(error, match=codes[0] if codes[0] != "None" else codes[1]):
                await manager.create(run_id, state={"n": 1})
            assert fake.calls == calls
            monkeypatch.undo()
            run = await manager.get_run(run_id)
            assert run is not None
            assert run.checkpoint_count == 1


async def test_a_throttled_transaction_is_retried_then_commits(
    provisioned: str, aws_names: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [T0]
    async with opened(provisioned, aws_names, retry=QUICK) as store:
        manager = _manager(store, clock)
        with anyio.fail_after(DEADLINE):
            await manager.create("throttled", state={"n": 0})
            ddb, _ = await store.clients()
            fake = _Cancelling(ddb.transact_write_items, ("ThrottlingError", "None"), times=2)
            monkeypatch.setattr(ddb, "transact_write_items", fake)
            created = await manager.create("throttled", state={"n": 1})
            assert fake.calls == 3
            assert created is not None
            assert created.metadata.sequence == 1


# -- tampered records (issue 12, item 8) ------------------------------------------------------


async def test_a_checkpoint_copied_from_another_run_is_corrupt(store: DynamoDBStore) -> None:
    clock = [T0]
    manager = _manager(store, clock)
    with anyio.fail_after(DEADLINE):
        mine = [await manager.create("victim", state={"n": n}) for n in range(2)]
        theirs = await manager.create("intruder", state={"secret": True})
        assert theirs is not None
        source = await _raw_item(store, _ids.run_key("intruder"), layout.checkpoint_sk(0))
        assert source is not None
        ddb, _ = await store.clients()
        victim = _ids.run_key("victim")
        await ddb.put_item(TableName=store.table, Item={
            **source, "PK": {"S": layout.partition(victim)},
            "SK": {"S": layout.checkpoint_sk(1)}})

        with pytest.raises(CorruptCheckpointError) as caught:
            await manager.restore("victim")
        assert layout.checkpoint_sk(1) in caught.value.key
        with pytest.raises(CorruptCheckpointError):
            await manager.restore_from(mine[1].checkpoint_id)
        listed = await manager.list_checkpoints("victim")  # a listing skips it
        assert [m.sequence for m in listed] == [0]


async def test_a_checkpoint_item_with_a_malformed_attribute_is_corrupt(
    store: DynamoDBStore,
) -> None:
    clock = [T0]
    manager = _manager(store, clock)
    with anyio.fail_after(DEADLINE):
        mine = [await manager.create("edited", state={"n": n}) for n in range(2)]
        ddb, _ = await store.clients()
        key = _ids.run_key("edited")
        await ddb.update_item(
            TableName=store.table,
            Key={"PK": {"S": layout.partition(key)}, "SK": {"S": layout.checkpoint_sk(1)}},
            UpdateExpression="SET x = :soon",
            ExpressionAttributeValues={":soon": {"S": "tomorrow"}},
        )
        with pytest.raises(CorruptCheckpointError, match="malformed") as caught:
            await manager.restore("edited")
        assert layout.checkpoint_sk(1) in caught.value.key
        with pytest.raises(CorruptCheckpointError, match="malformed"):
            await manager.restore_from(mine[1].checkpoint_id)
        listed = await manager.list_checkpoints("edited")  # a listing skips it
        assert [m.sequence for m in listed] == [0]


# -- concurrent requests fail with one error (issue 12, item 16) -----------------------------


async def test_concurrent_requests_fail_with_one_of_our_errors(provisioned: str) -> None:
    missing = DynamoDBStore(unique_name("missing"), region=REGION, endpoint_url=provisioned,
                            retry=QUICK)
    manager = fastcheckpoint.CheckpointManager(missing)
    run_key = _ids.run_key("anything")
    calls = {
        "list_runs": lambda: missing.list_runs(status=None, limit=5, cursor=None, now=T0),
        "count_runs": lambda: missing.count_runs(status="active", now=T0),
        "purge_expired": lambda: missing.purge_expired(now=T0, limit=5),
        "cleanup_expired": missing.cleanup_expired,
        "headers": lambda: missing.headers(run_key, before=5, limit=5, now=T0),
        "delete_items": lambda: missing.delete_items(run_key, ["a", "b"]),
        "damaged_runs": lambda: missing.damaged_runs(now=T0),
        "lineage": lambda: manager.lineage(_ids.checkpoint_id(run_key, "aaaaaaaa", 3)),
        "manager.list_runs": manager.list_runs,
    }
    try:
        for name, call in calls.items():
            with anyio.fail_after(DEADLINE):
                try:
                    await call()
                except CheckpointError:
                    continue
                raise AssertionError(f"{name} did not fail")
    finally:
        await missing.aclose()


# -- clean-ups that a cancellation must not cut short (the requests are fakes) -----------------


class _Blobs:
    """An S3 bucket that records deletes and can cancel its caller during one."""

    def __init__(self, cancel_during: str | None = None,
                 cancel: Callable[[], object] | None = None) -> None:
        self.deleted: list[str] = []
        self._cancel_during, self._cancel = cancel_during, cancel

    async def put(self, key: str, body: bytes) -> None:
        pass

    async def delete(self, keys: list[str]) -> None:
        self.deleted.extend(keys)
        if self._cancel is not None and self._cancel_during in keys:
            self._cancel()
        await asyncio.sleep(0)


@pytest.mark.parametrize("how", ["asyncio", "anyio"])
async def test_a_landed_append_keeps_its_blob_when_cancelled_while_it_tidies_up(
    how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append whose transaction landed (its reply lost: the resend finds it) goes on to
    delete what it pruned; a cancellation then must not take it for a failed append and
    delete its own payload blob (its checkpoint would read as damaged)."""
    store = DynamoDBStore("table", bucket="bucket", region=REGION, threshold=1024)
    caller = asyncio.current_task()
    scope = anyio.CancelScope()
    assert caller is not None
    blobs = _Blobs("pruned-blob", caller.cancel if how == "asyncio" else scope.cancel)
    state = SimpleNamespace(record=SimpleNamespace(status="active"))

    async def bucket() -> _Blobs:
        return blobs

    async def no_state(run_key: str) -> None:
        return None

    async def first_plan(*args: Any) -> Any:
        return dynamodb._Plan(operations=[{"Put": {}}], state=state,
                              removed_blobs=["pruned-blob"])

    async def resent(operations: Any, *, keep: int) -> None:
        raise dynamodb._Cancelled([{"Code": "ConditionalCheckFailed"}], retried=True)

    for name, fake in (("_bucket", bucket), ("_read_state", no_state),
                       ("_plan_first", first_plan), ("_commit", resent)):
        monkeypatch.setattr(store, name, fake)
    # The first send was applied (the resend was refused by its memo): it is committed.
    monkeypatch.setattr(dynamodb, "_memoed", lambda cancelled: True)
    monkeypatch.setattr(store, "_remember", lambda run_key, state: None)
    run = make_run("tidy")
    record = make_checkpoint(run, 0, payload=b"x" * 5000)
    cancelled = False
    try:
        with scope:
            await store.append(key_of(run), record, run=run, keep_latest=1, now=T0)
    except asyncio.CancelledError:
        cancelled = caller.uncancel() == 0  # asyncio's own, delivered to this test's task
    assert cancelled if how == "asyncio" else scope.cancelled_caught
    assert blobs.deleted == ["pruned-blob"]  # what it pruned, not its own payload blob


async def test_a_failed_append_cancelled_by_anyio_undoes_its_blobs_and_its_counts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The clean-up of an append that failed before any transaction landed deletes its
    blobs and lowers the counts it raised, both, when the caller's scope is cancelled."""
    store = DynamoDBStore("table", bucket="bucket", region=REGION)
    blobs = _Blobs()
    lowered: list[int] = []

    async def bucket() -> _Blobs:
        return blobs

    async def lower(operations: list[Any], *, keep: int) -> None:
        await anyio.lowlevel.checkpoint()
        lowered.append(len(operations) - keep)  # after the check of the run item's life

    monkeypatch.setattr(store, "_bucket", bucket)
    monkeypatch.setattr(store, "_commit", lower)
    additions = dynamodb._Additions(blobs=["blob"], pinned=Counter({"a": 1, "b": 1}))
    with anyio.fail_after(DEADLINE), anyio.CancelScope() as scope:
        scope.cancel()
        await store._forget_append("run", additions, dynamodb._Outcome())
    assert (blobs.deleted, lowered) == (["blob"], [2])


async def test_a_delete_whose_reply_was_lost_before_a_status_change_is_reported_applied(
    provisioned: str, aws_names: tuple[str, str]
) -> None:
    """The delete lands, another process changes the run's status, then the driver sends the
    delete again: refused (the run item changed, the checkpoint is gone), it must still be
    recognised as this delete's, applied."""
    seed = make_run("lost-delete-then-status")
    key = key_of(seed)
    async with opened(provisioned, aws_names, retry=QUICK) as store, opened(
        provisioned, aws_names, prefix=store.prefix
    ) as other:
        with anyio.fail_after(DEADLINE):
            for sequence in range(2):
                await store.append(key, make_checkpoint(seed, sequence), run=seed,
                                   keep_latest=None, now=T0)

            async def a_status_change() -> None:  # lands between our delete and its resend
                await other.update_run(key, incarnation=seed.incarnation, version=0,
                                       status="paused", data=b"ask", now=T0)

            ddb, _ = await store.clients()
            with _LoseFirstReply(ddb, "TransactWriteItems", a_status_change) as fault:
                deleted = await store.delete(key, 0, checkpoint_id=checkpoint_id_of(seed, 0))
            assert fault.lost == 1
            assert deleted
            found, status = await store.headers(key, before=None, limit=10, now=T0)
            assert ([header.sequence for header in found], status) == ([1], "paused")
            run = await other.get_run(key, now=T0)
            assert run is not None
            assert (run.status, run.version, run.checkpoint_count) == ("paused", 1, 1)
