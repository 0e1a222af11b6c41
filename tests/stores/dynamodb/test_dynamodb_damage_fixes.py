"""The DynamoDB store meeting records edited or copied by hand: an attribute of another type,
a record copied from another run or label. Reads of the damaged record raise
``CorruptCheckpointError`` naming it, listings pass over it (logged) and still fill their
pages, and a write never half-happens on it."""

from __future__ import annotations

import secrets
from typing import Any

import msgspec
import pytest
from botocore.exceptions import ClientError

from fastcheckpoint import _ids
from fastcheckpoint.errors import CorruptCheckpointError
from fastcheckpoint.stores import _dynamodb_layout as layout
from fastcheckpoint.stores.dynamodb import DynamoDBStore
from fastcheckpoint.testing._adapter import _append_items, _read
from fastcheckpoint.testing._builders import T0, checkpoint_id_of, key_of, make_item, make_run
from tests.stores._moto import moto_endpoint
from tests.stores.dynamodb.test_dynamodb import (
    _manager,
    _raw_item,
    atomic_moto,
    aws_names,
    counting,
    provisioned,
    store,
)

__all__ = ["atomic_moto", "aws_names", "moto_endpoint", "provisioned", "store"]

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


def _unique(name: str) -> str:
    return f"{name}-{secrets.token_hex(4)}"


async def _edit(store: DynamoDBStore, pk: str, sort_key: str, expression: str,
                values: dict[str, Any] | None = None) -> None:
    """Change a record by hand, as an operator (or a bug elsewhere) might."""
    ddb, _ = await store.clients()
    await ddb.update_item(
        TableName=store.table, Key={"PK": {"S": pk}, "SK": {"S": sort_key}},
        UpdateExpression=expression,
        **({"ExpressionAttributeValues": values} if values else {}))


# -- item attributes of another type ------------------------------------------------------


async def _damaged_items(store: DynamoDBStore) -> str:
    """Items a..e of a run, a..d damaged: a's expiry is a string, b's value a number, c has
    no value, d's owner is a string."""
    key = _ids.key_of(_unique("items"))
    await store.put_items(key, [make_item(name, name.encode()) for name in "abcde"], now=T0)
    pk = layout.partition(key)
    await _edit(store, pk, layout.item_sk("a"), "SET x = :v", {":v": {"S": "soon"}})
    await _edit(store, pk, layout.item_sk("b"), "SET v = :v", {":v": {"N": "3"}})
    await _edit(store, pk, layout.item_sk("c"), "REMOVE v")
    await _edit(store, pk, layout.item_sk("d"), "SET o = :v", {":v": {"S": "x"}})
    return key


async def test_item_reads_report_a_damaged_item_and_scans_pass_over_it(
    store: DynamoDBStore,
) -> None:
    key = await _damaged_items(store)
    for name in "abcd":
        with pytest.raises(CorruptCheckpointError) as raised:
            await store.get_items(key, [name, "e"], now=T0)
        assert (raised.value.key or "").endswith(f"/i#{name}")
    assert await store.get_items(key, ["e"], now=T0) == {"e": b"e"}
    assert await store.scan_items(key, now=T0) == [("e", b"e")]
    assert await store.scan_items(key, start_after="b", now=T0) == [("e", b"e")]
    assert await store.scan_items(key, reverse=True, now=T0) == [("e", b"e")]


async def test_deleting_a_damaged_item_writes_nothing_for_it(store: DynamoDBStore) -> None:
    run = make_run(_unique("del"))
    key = key_of(run)
    await _append_items(store, run, 0, items=[make_item("w", b"W", owner=0)])
    await store.put_items(key, [make_item("b", b"B")], now=T0)
    pk = layout.partition(key)
    await _edit(store, pk, layout.item_sk("w"), "SET o = :v", {":v": {"S": "0"}})
    with pytest.raises(CorruptCheckpointError) as raised:
        await store.delete_items(key, ["b", "w"])
    assert (raised.value.key or "").endswith("/i#w")
    # The damaged anchor and the value it owns are left as they were; the sound item went.
    assert await _raw_item(store, key, layout.item_sk("w")) is not None
    assert await _raw_item(store, key, layout.owned_sk(0, "w")) is not None
    assert await _raw_item(store, key, layout.item_sk("b")) is None


async def test_restore_reports_an_owned_value_of_another_type(store: DynamoDBStore) -> None:
    run = make_run(_unique("rwi"))
    key = key_of(run)
    await _append_items(store, run, 0, refs=["s"],
                        items=[make_item("s", b"S"), make_item("w", b"W", owner=0)])
    await _edit(store, layout.partition(key), layout.owned_sk(0, "w"), "SET v = :v",
                {":v": {"N": "1"}})
    for sequence in (None, 0):
        with pytest.raises(CorruptCheckpointError) as raised:
            await _read(store, run, sequence)
        assert (raised.value.key or "").endswith(layout.owned_sk(0, "w"))


async def test_a_label_entry_with_a_run_key_of_another_type_hides_only_itself(
    store: DynamoDBStore,
) -> None:
    label = _unique("y")
    runs = [msgspec.structs.replace(make_run(_unique(name), created_at=T0 + step),
                                    labels=(label,))
            for step, name in enumerate(("lb", "lc"))]
    for run in runs:
        await _append_items(store, run, 0)
    ddb, _ = await store.clients()
    found = await ddb.query(
        TableName=store.table, KeyConditionExpression="PK = :p",
        ExpressionAttributeValues={":p": {"S": layout.label_partition(label)}})
    entry = next(item for item in found["Items"] if item["rk"]["S"] == key_of(runs[1]))
    await ddb.put_item(TableName=store.table, Item={**entry, "rk": {"N": "5"}})
    listed, cursor = await store.runs_with_label(label, limit=10, cursor=None, now=T0)
    assert ([record.run_id for record in listed], cursor) == ([runs[0].run_id], None)


# -- a run item copied from another run ---------------------------------------------------


async def test_a_run_item_copied_from_another_run_is_damage_and_repair_heals_it(
    store: DynamoDBStore,
) -> None:
    clock = [T0]
    manager = _manager(store, clock)
    victim, intruder = _unique("victim"), _unique("intruder")
    await manager.create(victim, state={"n": 0})
    await manager.create(intruder, state={"s": 1})
    victim_key = _ids.run_key(victim)
    copied = await _raw_item(store, _ids.run_key(intruder), layout.RUN_SK)
    assert copied is not None
    ddb, _ = await store.clients()
    await ddb.put_item(TableName=store.table,
                       Item={**copied, "PK": {"S": layout.partition(victim_key)}})
    listed = [run.run_id for run in (await manager.list_runs(limit=100)).runs]
    assert intruder in listed
    assert victim not in listed
    assert listed.count(intruder) == 1
    [damage] = await store.damaged_runs(run_key=victim_key, now=T0)
    assert "names another run" in damage.problem
    # Writes refuse; the intruder's record is untouched.
    with pytest.raises(CorruptCheckpointError):
        await manager.create(victim, state={"n": 1})
    assert await _raw_item(store, victim_key, layout.RUN_SK) == {
        **copied, "PK": {"S": layout.partition(victim_key)}}
    [report] = await manager.repair(victim)
    assert report.run_id == victim
    assert await store.damaged_runs(run_key=victim_key, now=T0) == []
    created = await manager.create(victim, state={"n": 1})
    assert created.metadata.sequence == 1
    assert (await manager.get_run(victim)).latest_sequence == 1
    assert (await manager.get_run(intruder)).latest_sequence == 0


# -- pages are short only at the end ------------------------------------------------------


async def test_headers_fill_the_page_past_damaged_checkpoint_items(
    store: DynamoDBStore,
) -> None:
    clock = [T0]
    manager = _manager(store, clock)
    victim, intruder = _unique("victim"), _unique("intruder")
    for step in range(5):
        await manager.create(victim, state={"n": step})
    await manager.create(intruder, state={"s": 1})
    key = _ids.run_key(victim)
    with counting(store) as (dynamo, _):
        page, status = await store.headers(key, before=None, limit=2, now=T0)
    assert ([header.sequence for header in page], status) == ([4, 3], "active")
    assert dynamo.counts == {"Query": 1}  # what a sound page costs, unchanged
    copied = await _raw_item(store, _ids.run_key(intruder), layout.checkpoint_sk(0))
    assert copied is not None
    ddb, _ = await store.clients()
    for sequence in (4, 3):
        await ddb.put_item(TableName=store.table, Item={
            **copied, "PK": {"S": layout.partition(key)},
            "SK": {"S": layout.checkpoint_sk(sequence)}})
    page, status = await store.headers(key, before=None, limit=2, now=T0)
    assert ([header.sequence for header in page], status) == ([2, 1], "active")
    page, _ = await store.headers(key, before=5, limit=2, now=T0)
    assert [header.sequence for header in page] == [2, 1]
    listed = await manager.list_checkpoints(victim, limit=2)
    assert [metadata.sequence for metadata in listed] == [2, 1]


async def test_scan_items_fills_the_page_past_dangling_anchors(store: DynamoDBStore) -> None:
    clock = [T0]
    manager = _manager(store, clock)
    run_id = _unique("own")
    created = await manager.create(run_id, state={"n": 0})
    key = _ids.run_key(run_id)
    assert await store.put_owned_items(
        key, [make_item(name, name.encode(), owner=0) for name in "abc"], owner=0,
        checkpoint_id=created.metadata.checkpoint_id, if_absent=True, now=T0)
    await store.put_items(key, [make_item(name, name.encode()) for name in "de"], now=T0)
    with counting(store) as (dynamo, _):
        assert await store.scan_items(key, limit=2, now=T0) == [("a", b"a"), ("b", b"b")]
    assert dynamo.counts == {"Query": 1, "BatchGetItem": 1}  # unchanged when sound
    ddb, _ = await store.clients()
    for name in "ab":  # their owned values go; the anchors dangle
        await ddb.delete_item(TableName=store.table, Key={
            "PK": {"S": layout.partition(key)}, "SK": {"S": layout.owned_sk(0, name)}})
    assert await store.scan_items(key, limit=2, now=T0) == [("c", b"c"), ("d", b"d")]
    assert await store.scan_items(key, limit=1, now=T0) == [("c", b"c")]
    assert await store.scan_items(key, limit=2, reverse=True, now=T0) == [
        ("e", b"e"), ("d", b"d")]
    assert await store.scan_items(key, now=T0) == [("c", b"c"), ("d", b"d"), ("e", b"e")]


async def test_list_runs_fills_the_page_past_damaged_run_items(store: DynamoDBStore) -> None:
    # Created after every other test's runs: they lead the listing of the shared table.
    clock = [T0 + 10**8]
    manager = _manager(store, clock)
    await manager.create(_unique("older"), state={"n": 0})  # so that a page follows
    names = [_unique(f"r{step}") for step in range(4)]
    for name in names:
        clock[0] += 1
        await manager.create(name, state={"n": 0})
    for name in names[2:]:
        await _edit(store, layout.partition(_ids.run_key(name)), layout.RUN_SK,
                    "SET ver = :v", {":v": {"S": "x"}})
    records, cursor = await store.list_runs(status=None, limit=2, cursor=None, now=clock[0])
    assert [record.run_id for record in records] == [names[1], names[0]]
    assert cursor is not None
    records, _ = await store.list_runs(status=None, limit=1, cursor=None, now=clock[0])
    assert [record.run_id for record in records] == [names[1]]
    records, _ = await store.list_runs(status="active", limit=2, cursor=None, now=clock[0])
    assert [record.run_id for record in records] == [names[1], names[0]]


# -- a label entry copied from another label ----------------------------------------------


async def test_a_label_entry_copied_from_another_label_lists_nothing(
    store: DynamoDBStore,
) -> None:
    x, y = _unique("x"), _unique("y")
    other = msgspec.structs.replace(make_run(_unique("la")), labels=(x,))
    labelled = msgspec.structs.replace(make_run(_unique("lb"), created_at=T0 + 1), labels=(y,))
    for run in (other, labelled):
        await _append_items(store, run, 0)
    ddb, _ = await store.clients()
    found = await ddb.query(
        TableName=store.table, KeyConditionExpression="PK = :p",
        ExpressionAttributeValues={":p": {"S": layout.label_partition(x)}})
    [entry] = found["Items"]
    await ddb.put_item(TableName=store.table,
                       Item={**entry, "PK": {"S": layout.label_partition(y)}})
    with counting(store) as (dynamo, _):
        listed, cursor = await store.runs_with_label(y, limit=10, cursor=None, now=T0)
    assert ([record.run_id for record in listed], cursor) == ([labelled.run_id], None)
    assert dynamo.counts == {"Query": 1, "BatchGetItem": 1}
    listed, _ = await store.runs_with_label(x, limit=10, cursor=None, now=T0)
    assert [record.run_id for record in listed] == [other.run_id]


# -- a checkpoint's refs or guard of another type -----------------------------------------


async def test_restore_reports_refs_of_another_type(store: DynamoDBStore) -> None:
    run = make_run(_unique("rf"))
    key = key_of(run)
    await _append_items(store, run, 0, refs=["s"], items=[make_item("s", b"S")])
    await _edit(store, layout.partition(key), layout.checkpoint_sk(0), "SET rf = :v",
                {":v": {"S": "s"}})
    for sequence in (None, 0, None):  # the first read is this process's fast one
        with pytest.raises(CorruptCheckpointError) as raised:
            await _read(store, run, sequence)
        assert (raised.value.key or "").endswith(layout.checkpoint_sk(0))


async def test_a_guard_token_of_another_type_does_not_stop_restores(
    store: DynamoDBStore,
) -> None:
    run = make_run(_unique("guard"))
    key = key_of(run)
    await _append_items(store, run, 0, refs=["s"], items=[make_item("s", b"S")])
    await _edit(store, layout.partition(key), layout.guard_sk(0), "SET wt = :v",
                {":v": {"N": "1"}})
    for sequence in (None, None, 0):
        found = await _read(store, run, sequence)
        assert found is not None
        assert (found[0].sequence, found[2]) == (0, {"s": b"S"})


# -- removals meeting a checkpoint's refs of another type ---------------------------------


async def _refs_damaged(store: DynamoDBStore, name: str, sort_key: str) -> Any:
    """A run whose checkpoint 0 names shared item ``s`` and owns ``w``, the ``rf`` of its
    record at ``sort_key`` (the checkpoint or its guard) edited to a string."""
    run = make_run(_unique(name))
    await _append_items(store, run, 0, refs=["s"],
                        items=[make_item("s", b"S"), make_item("w", b"W", owner=0)])
    await _edit(store, layout.partition(key_of(run)), sort_key, "SET rf = :v",
                {":v": {"S": "s"}})
    return run


@pytest.mark.parametrize("damaged", [layout.checkpoint_sk(0), layout.guard_sk(0)],
                         ids=["checkpoint", "guard"])
async def test_an_append_pruning_a_checkpoint_with_damaged_refs_writes_nothing(
    store: DynamoDBStore, damaged: str,
) -> None:
    run = await _refs_damaged(store, "prune", damaged)
    key = key_of(run)
    counter = await _raw_item(store, key, layout.counter_sk("s"))
    with pytest.raises(CorruptCheckpointError) as raised:
        await _append_items(store, run, 1, refs=["t"], keep_latest=1,
                            items=[make_item("t", b"T"), make_item("v", b"V", owner=1)])
    assert (raised.value.key or "").endswith(damaged)
    for sort_key in (layout.checkpoint_sk(1), layout.guard_sk(1), layout.item_sk("t"),
                     layout.owned_sk(1, "v"), layout.counter_sk("t")):
        assert await _raw_item(store, key, sort_key) is None
    assert await _raw_item(store, key, layout.counter_sk("s")) == counter
    assert await _raw_item(store, key, layout.owned_sk(0, "w")) is not None
    assert await store.get_items(key, ["s"], now=T0) == {"s": b"S"}


@pytest.mark.parametrize("damaged", [layout.checkpoint_sk(0), layout.guard_sk(0)],
                         ids=["checkpoint", "guard"])
async def test_deleting_a_checkpoint_with_damaged_refs_writes_nothing(
    store: DynamoDBStore, damaged: str,
) -> None:
    run = await _refs_damaged(store, "delrf", damaged)
    key = key_of(run)
    before = {sort_key: await _raw_item(store, key, sort_key) for sort_key in (
        layout.RUN_SK, layout.checkpoint_sk(0), layout.guard_sk(0), layout.owned_sk(0, "w"),
        layout.item_sk("w"), layout.counter_sk("s"))}
    with pytest.raises(CorruptCheckpointError) as raised:
        await store.delete(key, 0, checkpoint_id=checkpoint_id_of(run, 0))
    assert (raised.value.key or "").endswith(damaged)
    for sort_key, item in before.items():
        assert await _raw_item(store, key, sort_key) == item


async def test_a_new_run_over_an_expired_one_with_damaged_refs_writes_nothing(
    store: DynamoDBStore,
) -> None:
    run = make_run(_unique("over"))
    key = key_of(run)
    for sequence in (0, 1):
        await _append_items(store, run, sequence, refs=["s"], expires_at=T0 + 10,
                            items=[make_item("s", b"S")])
    await _edit(store, layout.partition(key), layout.checkpoint_sk(1), "SET rf = :v",
                {":v": {"S": "s"}})
    before = await _raw_item(store, key, layout.checkpoint_sk(0))
    again = msgspec.structs.replace(run, incarnation=_unique("inc"))
    with pytest.raises(CorruptCheckpointError) as raised:
        await _append_items(store, again, 0, now=T0 + 20)
    assert (raised.value.key or "").endswith(layout.checkpoint_sk(1))
    assert await _raw_item(store, key, layout.checkpoint_sk(0)) == before


@pytest.mark.parametrize(("owner", "put_back"), [({"N": "0.5"}, 1), ({"S": "0"}, 0)],
                         ids=["fraction", "string"])
async def test_deleting_an_item_whose_owner_is_no_integer_leaves_it_whole(
    store: DynamoDBStore, owner: dict[str, str], put_back: int,
) -> None:
    run = make_run(_unique("half"))
    key = key_of(run)
    await _append_items(store, run, 0, items=[make_item("w", b"W", owner=0),
                                              make_item("u", b"U", owner=0)])
    await store.put_items(key, [make_item("b", b"B")], now=T0)
    await _edit(store, layout.partition(key), layout.item_sk("w"), "SET o = :v", {":v": owner})
    anchor = await _raw_item(store, key, layout.item_sk("w"))
    with counting(store) as (dynamo, _), pytest.raises(CorruptCheckpointError) as raised:
        await store.delete_items(key, ["b", "w", "u"])
    assert (raised.value.key or "").endswith("/i#w")
    assert await _raw_item(store, key, layout.item_sk("w")) == anchor
    assert await _raw_item(store, key, layout.owned_sk(0, "w")) is not None
    for sort_key in (layout.item_sk("b"), layout.item_sk("u"), layout.owned_sk(0, "u")):
        assert await _raw_item(store, key, sort_key) is None
    # One BatchGetItem of the records' write tokens, then one DeleteItem per record (and u's
    # owned value); a number that is no integer passes the DeleteItem's condition, so that
    # record is written back.
    assert dynamo.counts == {"BatchGetItem": 1, "DeleteItem": 4,
                             **({"PutItem": put_back} if put_back else {})}


# -- a count of another type --------------------------------------------------------------


async def test_a_count_of_another_type_fails_appends_and_deletes_naming_it(
    store: DynamoDBStore,
) -> None:
    run = make_run(_unique("rc"))
    key = key_of(run)
    await _append_items(store, run, 0, refs=["s"], items=[make_item("s", b"S")])
    counter = layout.counter_sk("s")
    await _edit(store, layout.partition(key), counter, "SET rc = :v", {":v": {"S": "x"}})
    before = {sort_key: await _raw_item(store, key, sort_key)
              for sort_key in (layout.RUN_SK, layout.checkpoint_sk(0), counter)}
    with pytest.raises(CorruptCheckpointError) as raised:
        await _append_items(store, run, 1, refs=["s", "t"], items=[make_item("t", b"T")])
    assert (raised.value.key or "").endswith(f"/{counter}")
    with pytest.raises(CorruptCheckpointError) as raised:
        await store.delete(key, 0, checkpoint_id=checkpoint_id_of(run, 0))
    assert (raised.value.key or "").endswith(f"/{counter}")
    for sort_key, item in before.items():
        assert await _raw_item(store, key, sort_key) == item
    for sort_key in (layout.checkpoint_sk(1), layout.item_sk("t"), layout.counter_sk("t")):
        assert await _raw_item(store, key, sort_key) is None


async def test_a_count_of_another_type_named_by_a_cancellation_reason(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """AWS reports an invalid update in a transaction as the cancellation reason of that
    operation (moto refuses the whole request): the count is named either way."""
    run = make_run(_unique("rcaws"))
    key = key_of(run)
    await _append_items(store, run, 0, refs=["s"], items=[make_item("s", b"S")])
    counter = layout.counter_sk("s")
    await _edit(store, layout.partition(key), counter, "SET rc = :v", {":v": {"S": "x"}})
    ddb, _ = await store.clients()

    async def as_aws_answers(**request: Any) -> Any:
        reasons = [{"Code": "ValidationError", "Message": "An operand in the update "
                    "expression has an incorrect data type"}
                   if operation.get("Update", {}).get("Key", {}).get("SK") == {"S": counter}
                   else {"Code": "None"} for operation in request["TransactItems"]]
        response: Any = {"Error": {"Code": "TransactionCanceledException",
                                   "Message": "Transaction cancelled"},
                         "CancellationReasons": reasons}
        raise ClientError(response, "TransactWriteItems")

    monkeypatch.setattr(ddb, "transact_write_items", as_aws_answers)
    with pytest.raises(CorruptCheckpointError) as raised:
        await store.delete(key, 0, checkpoint_id=checkpoint_id_of(run, 0))
    assert (raised.value.key or "").endswith(f"/{counter}")


# -- the cleanup meeting a damaged run ----------------------------------------------------


async def test_the_cleanup_passes_over_a_run_it_cannot_read_and_purges_the_others(
    store: DynamoDBStore, caplog: pytest.LogCaptureFixture,
) -> None:
    # The damaged run's CorruptCheckpointError (before: KeyError) escaped purge_expired, so
    # every pass of the cleanup loop failed there and no other run of the table expired.
    # Live runs whose checkpoint 0 expired; the damaged one's names its items wrongly.
    damaged, healthy = make_run(_unique("stuck")), make_run(_unique("expires"))
    for run in (damaged, healthy):
        await _append_items(store, run, 0, refs=["s"], expires_at=T0 + 10,
                            items=[make_item("s", b"S")])
        await _append_items(store, run, 1, refs=["s"])
    key = key_of(damaged)
    await _edit(store, layout.partition(key), layout.checkpoint_sk(0), "SET rf = :v",
                {":v": {"S": "s"}})
    sort_keys = (layout.RUN_SK, layout.checkpoint_sk(0), layout.checkpoint_sk(1))
    before = {sort_key: await _raw_item(store, key, sort_key) for sort_key in sort_keys}
    while not (await store.purge_expired(now=T0 + 20, limit=100))[1]:
        pass
    assert await _raw_item(store, key_of(healthy), layout.checkpoint_sk(0)) is None
    assert await _raw_item(store, key_of(healthy), layout.checkpoint_sk(1)) is not None
    assert key in caplog.text
    after = {sort_key: await _raw_item(store, key, sort_key) for sort_key in sort_keys}
    for sort_key, item in before.items():  # only their places in the expiry index moved on
        moved = after[sort_key]
        assert moved is not None
        assert item is not None
        if "xat" in item:
            assert float(moved.pop("xat")["N"]) >= T0 + 20 + 3600
            item.pop("xat")
        assert moved == item
    caplog.clear()
    assert (await store.purge_expired(now=T0 + 30, limit=100))[1]
    assert key not in caplog.text  # not tried again before its time
    assert (await store.purge_expired(now=T0 + 20 + 3601, limit=100))[1]
    assert key in caplog.text  # then tried again, and passed over again


async def test_deleting_a_checkpoint_behind_the_front_of_the_book_reports_its_damage(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A checkpoint the run item's book keeps only a count of is read from its own item
    # (its expiry): an attribute of another type there leaked KeyError from delete.
    monkeypatch.setattr(store, "_book_capacity", 2)
    run = make_run(_unique("back"))
    key = key_of(run)
    for sequence in range(6):
        await _append_items(store, run, sequence, expires_at=T0 + 1_000 + sequence)
    raw: Any = await _raw_item(store, key, layout.RUN_SK)
    back = layout.BOOK_DECODER.decode(raw["bk"]["B"]).back
    assert back is not None
    sequence = back.start
    await _edit(store, layout.partition(key), layout.checkpoint_sk(sequence), "SET x = :v",
                {":v": {"S": "later"}})
    with pytest.raises(CorruptCheckpointError) as raised:
        await store.delete(key, sequence, checkpoint_id=checkpoint_id_of(run, sequence))
    assert (raised.value.key or "").endswith(layout.checkpoint_sk(sequence))


async def test_a_run_listing_reads_on_past_any_number_of_damaged_pages(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The listing made up for damaged records by calling itself once per round of the
    # shards' queries: some thousand damaged run items in a row raised RecursionError.
    rounds: list[str | None] = []
    listed = await store.list_runs(status=None, limit=1, cursor=None, now=T0)

    async def damaged_round(
        status: str | None, limit: int, cursor: str | None, now: float,
    ) -> tuple[list[Any], str | None]:
        rounds.append(cursor)
        if len(rounds) < 3_000:
            return [], f"cursor-{len(rounds)}"  # a whole round of damaged records
        return listed[0][:limit], None

    monkeypatch.setattr(store, "_run_page", damaged_round)
    runs, cursor = await store.list_runs(status=None, limit=1, cursor=None, now=T0)
    assert (len(rounds), runs, cursor) == (3_000, listed[0][:1], None)
    assert rounds[:3] == [None, "cursor-1", "cursor-2"]


async def test_delete_items_of_a_record_without_a_token_removed_meanwhile_is_no_damage(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record without a write token (written by hand, or by a release before tokens) that
    another process deletes between ``delete_items``' read of its token and its conditioned
    delete: the condition fails on a record that is gone, which is this call's key removed by
    someone else (0 removed), not damage. Before, the missing token of the gone record
    equalled the missing token read, and the call raised ``CorruptCheckpointError``."""
    key = _ids.key_of(_unique("tokenless"))
    await store.put_items(key, [make_item("a", b"a"), make_item("b", b"b")], now=T0)
    pk = layout.partition(key)
    await _edit(store, pk, layout.item_sk("a"), "REMOVE wt")
    read = store._batch_get_in

    async def read_then_removed(*args: Any, **kwargs: Any) -> Any:
        found = await read(*args, **kwargs)
        ddb, _ = await store.clients()
        await ddb.delete_item(TableName=store.table,
                              Key={"PK": {"S": pk}, "SK": {"S": layout.item_sk("a")}})
        return found

    monkeypatch.setattr(store, "_batch_get_in", read_then_removed)
    removed = await store.delete_items(key, ["a", "b"])
    monkeypatch.undo()

    assert removed == 1
    assert await store.get_items(key, ["a", "b"], now=T0) == {}
