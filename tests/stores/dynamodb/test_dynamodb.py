"""The DynamoDB+S3 store against moto in server mode: the contract, request counts, routing
at the size threshold, expiry that moto never applies natively, orphaned blobs, conflicts,
provisioning and the ops kit (stores/dynamodb/)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from aiobotocore.session import get_session

import fastcheckpoint
from fastcheckpoint import _ids
from fastcheckpoint._config import RetryPolicy
from fastcheckpoint.errors import ConfigurationError, ConflictError, SequenceConflict
from fastcheckpoint.stores import CheckpointStore, RunRecord
from fastcheckpoint.stores import _dynamodb_layout as layout
from fastcheckpoint.stores._aws import RequestCounter
from fastcheckpoint.stores._s3_provision import rule_id
from fastcheckpoint.stores.dynamodb import (
    DEFAULT_THRESHOLD,
    TRANSACTION_ACTIONS,
    DynamoDBStore,
    parse_size,
)
from fastcheckpoint.testing import (
    LabelsContract,
    NestedItemsContract,
    SequenceGuardContract,
    SharedItemsContract,
    StoreContract,
)
from fastcheckpoint.testing._adapter import _append_items
from fastcheckpoint.testing._builders import (
    T0,
    checkpoint_id_of,
    key_of,
    make_checkpoint,
    make_item,
    make_run,
)
from tests.stores._capability_calls import capability_calls
from tests.stores._moto import REGION, moto_endpoint, provision_table_alone, unique_name

__all__ = ["moto_endpoint"]

pytestmark = pytest.mark.anyio

REPOSITORY = Path(__file__).resolve().parents[3]
PACKAGE_ROOT = str(Path(fastcheckpoint.__file__).resolve().parent.parent)
KIT = REPOSITORY / "stores" / "dynamodb"
WORKER = REPOSITORY / "tests" / "dynamodb_worker.py"
DEADLINE = 60.0
SESSION = get_session()
"""One aiobotocore session for the stores the tests open: it loads the service models once
(a store with a session of its own loads them for each client it builds)."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


@pytest.fixture(scope="session")
def atomic_moto(moto_endpoint: str) -> str:
    """The session's moto server, which serves one request at a time (see ``_moto``)."""
    return moto_endpoint


@pytest.fixture(scope="session")
def aws_names() -> tuple[str, str]:
    """The table and bucket of this test session."""
    return unique_name("table"), unique_name("bucket")


@pytest.fixture(scope="session")
def provisioned(atomic_moto: str, aws_names: tuple[str, str]) -> str:
    """``atomic_moto`` once the session's table and bucket exist."""
    table, bucket = aws_names

    async def provision() -> None:
        store = DynamoDBStore(table, bucket=bucket, region=REGION, endpoint_url=atomic_moto)
        try:
            await store.provision()
        finally:
            await store.aclose()

    anyio.run(provision, backend="asyncio")
    return atomic_moto


async def new_table(endpoint: str, kind: str) -> str:
    """A new table of this session (its bucket is provisioned once, by ``provisioned``)."""
    table = unique_name(kind)
    await provision_table_alone(table, endpoint, SESSION)
    return table


def _url(endpoint: str, names: tuple[str, str], **extra: str) -> str:
    table, bucket = names
    query = {"bucket": bucket, "region": REGION, "endpoint_url": endpoint, **extra}
    return f"dynamodb://{table}?" + "&".join(f"{k}={v}" for k, v in query.items())


@contextlib.asynccontextmanager
async def opened(endpoint: str, names: tuple[str, str], **options: Any) -> AsyncIterator[
    DynamoDBStore
]:
    table, bucket = names
    store = DynamoDBStore(
        table, bucket=bucket, region=REGION, endpoint_url=endpoint,
        prefix=options.pop("prefix", f"{unique_name('p')}/"),
        session=options.pop("session", SESSION), **options,
    )
    try:
        yield store
    finally:
        with anyio.fail_after(10):
            await store.aclose()


class TestDynamoDBStore(StoreContract, LabelsContract, SharedItemsContract,
                       NestedItemsContract, SequenceGuardContract):
    deadline_seconds = DEADLINE
    # Refs are checked against the removals the store remembers (a key never written is
    # not looked up: that would cost a read per ref).
    refs_checked_when_appended = False

    @pytest.fixture
    async def store(
        self, provisioned: str, aws_names: tuple[str, str]
    ) -> AsyncIterator[CheckpointStore]:
        # A fresh table per test keeps the run listings of one test out of the next.
        table = await new_table(provisioned, "contract")
        async with opened(provisioned, (table, aws_names[1])) as store:
            yield store


# -- helpers of the backend-specific tests ----------------------------------------------------


@pytest.fixture
async def store(provisioned: str, aws_names: tuple[str, str]) -> AsyncIterator[DynamoDBStore]:
    """A store on the session's table and bucket, under a prefix of its own."""
    async with opened(provisioned, aws_names) as store:
        yield store


@contextlib.contextmanager
def counting(store: DynamoDBStore) -> Iterator[tuple[RequestCounter, RequestCounter]]:
    """Count the requests of the store's DynamoDB and S3 clients in this event loop."""
    clients = store._clients.current()
    assert clients is not None, "call `await store.clients()` first"
    assert clients.s3 is not None, "the store has no bucket"
    with RequestCounter.attached(clients.dynamodb) as dynamo, RequestCounter.attached(
        clients.s3
    ) as bucket:
        yield dynamo, bucket


async def _raw_item(store: DynamoDBStore, run_key: str, sort_key: str) -> dict[str, Any] | None:
    ddb, _ = await store.clients()
    response = await ddb.get_item(
        TableName=store.table,
        Key={"PK": {"S": layout.partition(run_key)}, "SK": {"S": sort_key}},
        ConsistentRead=True,
    )
    item: dict[str, Any] | None = response.get("Item")
    return item


async def _blob_keys(store: DynamoDBStore, run_key: str) -> list[str]:
    return [entry.key for entry in await (await store._bucket()).list(f"{run_key}/")]


def _manager(store: DynamoDBStore, clock: list[float], **config: Any) -> Any:
    return fastcheckpoint.CheckpointManager(
        store,
        config=fastcheckpoint.CheckpointConfig(clock=lambda: clock[0], **config),
    )


# -- URL and configuration ----------------------------------------------------------------


def test_from_url_reads_every_option() -> None:
    store = DynamoDBStore.from_url(
        "dynamodb://Checkpoints?bucket=ckpt-blobs&prefix=agents/&threshold=100KB"
        "&region=eu-west-1&endpoint_url=http://127.0.0.1:9",
        retry=RetryPolicy(max_retries=2),
    )
    assert (store.table, store.bucket, store.prefix, store.threshold) == (
        "Checkpoints", "ckpt-blobs", "agents/", 100 * 1024
    )
    assert store._endpoint.region == "eu-west-1"
    assert store._endpoint.endpoint_url == "http://127.0.0.1:9"
    assert store._retry.max_retries == 2
    assert DynamoDBStore.from_url("dynamodb://T-1").threshold == DEFAULT_THRESHOLD


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("dynamodb://T-1?bucket=b-1&colour=red", "unknown option 'colour'.*Known options: bucket"),
        ("dynamodb://T-1?bucket=b&treshold=1", "option 'treshold'.*did you mean 'threshold'"),
        ("dynamodb://T-1?threshold=lots", "threshold must be a size"),
        ("dynamodb://T-1?threshold=401KB", "threshold must be between"),
        ("dynamodb://T-1/bucket", "names only the table"),
        ("dynamodb://?bucket=b-1", "expected dynamodb://TABLE"),
        ("dynamodb://T-1?endpoint_url=localhost:4566", "endpoint_url must start with"),
        ("dynamodb://T-1?bucket=Not_A_Bucket", "not a valid S3 bucket name"),
    ],
)
def test_bad_urls_say_what_to_fix(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        DynamoDBStore.from_url(url)


def test_parse_size() -> None:
    assert parse_size("350KB") == 350 * 1024
    assert parse_size("1mb") == 1024 * 1024
    assert parse_size("300000") == 300_000
    with pytest.raises(ConfigurationError):
        parse_size("3.5KB")


async def test_open_store_builds_it_from_the_url(
    provisioned: str, aws_names: tuple[str, str]
) -> None:
    from fastcheckpoint.stores import register_store

    # The lead registers the scheme in fastcheckpoint/stores/__init__.py; until then, here.
    register_store("dynamodb", "fastcheckpoint.stores.dynamodb:DynamoDBStore", "dynamodb",
                   remote=True)
    store = fastcheckpoint.open_store(_url(provisioned, aws_names), retry=RetryPolicy(0.01, 0.02))
    assert isinstance(store, DynamoDBStore)
    with anyio.fail_after(DEADLINE):
        try:
            seed = make_run("by-url")
            await store.append(key_of(seed), make_checkpoint(seed, 0), run=seed,
                               keep_latest=None, now=T0)
            assert await store.get_run(key_of(seed), now=T0) is not None
            assert await store.delete_run(key_of(seed)) == 1
        finally:
            await store.aclose()


# -- request counts (the one-request budgets) ----------------------------------------------


async def test_small_checkpoints_cost_one_write_and_one_query(store: DynamoDBStore) -> None:
    clock = [T0]
    manager = _manager(store, clock, max_checkpoints_per_run=3)
    state = {"step": 0, "notes": "x" * 2000}
    with anyio.fail_after(DEADLINE):
        await store.clients()
        with counting(store) as (dynamo, s3):
            first = await manager.create("small", state=state)
        assert (dynamo.counts, s3.counts) == ({"TransactWriteItems": 1}, {})
        for step in range(1, 6):  # pruning beyond 3 rides in the same transaction
            with counting(store) as (dynamo, s3):
                await manager.create("small", state={**state, "step": step})
            assert (dynamo.counts, s3.counts) == ({"TransactWriteItems": 1}, {}), step
        with counting(store) as (dynamo, s3):
            restored = await manager.restore("small")
        # On a store with nested items the manager restores through read_with_items: the
        # checkpoint this process wrote is one TransactGetItems (run item, checkpoint, guard).
        assert (dynamo.counts, s3.counts) == ({"TransactGetItems": 1}, {})
        assert restored is not None
        assert restored.state["step"] == 5
        with counting(store) as (dynamo, s3):
            again = await manager.restore_from(restored.checkpoint_id)
        assert (dynamo.counts, s3.counts) == ({"TransactGetItems": 1}, {})
        assert again is not None
        assert again.state == restored.state
        with counting(store) as (dynamo, s3):
            listed = await manager.list_checkpoints("small", limit=10)
        assert (dynamo.counts, s3.counts) == ({"Query": 1}, {})
        assert [m.sequence for m in listed] == [5, 4, 3]
        assert await manager.restore_from(first.checkpoint_id) is None  # pruned


async def _lengthen(store: DynamoDBStore, run_id: str, held: int) -> None:
    """Make a run of one checkpoint hold ``held``, fast: copies of its checkpoint item at the
    next sequences (25 per BatchWriteItem) and a run item that counts them, as ``held``
    appends would leave them."""
    key = _ids.run_key(run_id)
    first = await _raw_item(store, key, layout.checkpoint_sk(0))
    run = await _raw_item(store, key, layout.RUN_SK)
    assert first is not None
    assert run is not None
    incarnation = run["inc"]["S"]
    copies = [
        {**first, "SK": {"S": layout.checkpoint_sk(sequence)},
         "cid": {"S": _ids.checkpoint_id(key, incarnation, sequence)}}
        for sequence in range(1, held)
    ]
    await store._batch_write([{"PutRequest": {"Item": copy}} for copy in copies])
    book = layout.Book(held=[(0, held)], immortal=held)
    ddb, _ = await store.clients()
    await ddb.update_item(
        TableName=store.table,
        Key={"PK": {"S": layout.partition(key)}, "SK": {"S": layout.RUN_SK}},
        UpdateExpression="SET ls = :ls, cnt = :cnt, bk = :bk, rev = rev + :one",
        ExpressionAttributeValues={
            ":ls": {"N": str(held - 1)}, ":cnt": {"N": str(held)}, ":one": {"N": "1"},
            ":bk": {"B": layout.BOOK_ENCODER.encode(book)}},
    )
    store._cache.pop(key, None)


async def test_costs_do_not_grow_with_the_run(store: DynamoDBStore) -> None:
    """The same requests next to 20 checkpoints and next to 500 (no pruning). The long run is
    laid out directly in the table (500 appends take a minute on moto)."""
    clock = [T0]
    manager = _manager(store, clock, max_checkpoints_per_run=None)

    async def steady_costs(run_id: str, held: int) -> dict[str, dict[str, int]]:
        await manager.create(run_id, state={"n": 0})
        await _lengthen(store, run_id, held - 1)
        await manager.create(run_id, state={"n": held - 1})  # the process learns the run
        costs: dict[str, dict[str, int]] = {}
        with counting(store) as (dynamo, s3):
            await manager.create(run_id, state={"n": held})
        costs["create"] = {**dynamo.counts, **s3.counts}
        with counting(store) as (dynamo, s3):
            restored = await manager.restore(run_id)
        assert restored is not None
        assert restored.state == {"n": held}
        costs["restore"] = {**dynamo.counts, **s3.counts}
        with counting(store) as (dynamo, s3):
            assert len(await manager.list_checkpoints(run_id, limit=20)) == 20
        costs["list"] = {**dynamo.counts, **s3.counts}
        return costs

    with anyio.fail_after(DEADLINE):
        await store.clients()
        short = await steady_costs("w5-short", 20)
        long = await steady_costs("w5-long", 500)
        run = await manager.get_run("w5-long")

    assert short == long == {
        "create": {"TransactWriteItems": 1}, "restore": {"TransactGetItems": 1},
        "list": {"Query": 1}}
    assert run is not None
    assert (run.checkpoint_count, run.latest_sequence) == (501, 500)


async def test_large_checkpoints_cost_one_put_and_one_get_more(store: DynamoDBStore) -> None:
    clock = [T0]
    manager = _manager(store, clock, max_checkpoints_per_run=2, compress_min_bytes=None)
    big = os.urandom(DEFAULT_THRESHOLD + 10_000)
    with anyio.fail_after(DEADLINE):
        await store.clients()
        for step in range(2):
            with counting(store) as (dynamo, s3):
                await manager.create("large", state={"blob": big, "step": step})
            assert (dynamo.counts, s3.counts) == ({"TransactWriteItems": 1}, {"PutObject": 1})
        # The third prunes the first: its blob goes in one DeleteObjects after the commit.
        with counting(store) as (dynamo, s3):
            await manager.create("large", state={"blob": big, "step": 2})
        assert dynamo.counts == {"TransactWriteItems": 1}
        assert s3.counts == {"PutObject": 1, "DeleteObjects": 1}
        assert len(await _blob_keys(store, _ids.run_key("large"))) == 2
        with counting(store) as (dynamo, s3):
            restored = await manager.restore("large")
        assert (dynamo.counts, s3.counts) == ({"TransactGetItems": 1}, {"GetObject": 1})
        assert restored is not None
        assert restored.state == {"blob": big, "step": 2}
        with counting(store) as (dynamo, s3):
            again = await manager.restore_from(restored.checkpoint_id)
        assert (dynamo.counts, s3.counts) == ({"TransactGetItems": 1}, {"GetObject": 1})
        assert again is not None
        assert again.state == restored.state
        with counting(store) as (dynamo, s3):
            listed = await manager.list_checkpoints("large")
        assert (dynamo.counts, s3.counts) == ({"Query": 1}, {})
        assert [m.sequence for m in listed] == [2, 1]


async def test_list_runs_is_one_query_per_index_shard(store: DynamoDBStore) -> None:
    table = unique_name("listing")
    async with opened(store._endpoint.endpoint_url or "", (table, store.bucket or "")) as fresh:
        with anyio.fail_after(DEADLINE):
            await fresh.provision()
            for index in range(12):
                seed = make_run(f"listed-{index}", created_at=T0 + index)
                await fresh.append(key_of(seed), make_checkpoint(seed, 0), run=seed,
                                   keep_latest=None, now=T0)
            seen: list[str] = []
            cursor: str | None = None
            pages = 0
            with counting(fresh) as (dynamo, s3):
                while True:
                    runs, cursor = await fresh.list_runs(status="active", limit=5, cursor=cursor,
                                                         now=T0)
                    pages += 1
                    seen += [run.run_id for run in runs]
                    if cursor is None:
                        break
                count = await fresh.count_runs(status=None, now=T0)
            assert seen == [f"listed-{index}" for index in range(11, -1, -1)]
            assert pages == 3
            assert dynamo.counts == {"Query": (pages + 1) * layout.INDEX_SHARDS}
            assert s3.counts == {}
            assert count == 12


# -- size routing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload_size", "in_s3"),
    [
        (DEFAULT_THRESHOLD - 1024, False),  # just under: the whole item stays in DynamoDB
        (DEFAULT_THRESHOLD, True),  # just over, with the header and key
        (420 * 1024, True),  # over DynamoDB's 400 KB item limit
    ],
)
async def test_routing_at_the_threshold(
    store: DynamoDBStore, payload_size: int, in_s3: bool
) -> None:
    seed = make_run(f"routed-{payload_size}")
    key = key_of(seed)
    payload = os.urandom(payload_size)
    with anyio.fail_after(DEADLINE):
        await store.clients()
        with counting(store) as (_, s3):
            await store.append(key, make_checkpoint(seed, 0, payload=payload), run=seed,
                               keep_latest=None, now=T0)
        assert s3.counts == ({"PutObject": 1} if in_s3 else {})
        raw = await _raw_item(store, key, layout.checkpoint_sk(0))
        assert raw is not None
        assert ("bl" in raw, "pl" in raw) == (in_s3, not in_s3)
        for found in (await store.get(key, 0, now=T0), await store.latest(key, now=T0)):
            assert found is not None
            assert found[0].payload == payload
        assert await store.delete_run(key) == 1
        assert await _blob_keys(store, key) == []


async def test_configured_threshold_routes_smaller_payloads(
    provisioned: str, aws_names: tuple[str, str]
) -> None:
    async with opened(provisioned, aws_names, threshold=parse_size("2KB")) as store:
        seed = make_run("low-threshold")
        key = key_of(seed)
        with anyio.fail_after(DEADLINE):
            await store.clients()
            with counting(store) as (_, s3):
                await store.append(key, make_checkpoint(seed, 0, payload=b"a" * 1000), run=seed,
                                   keep_latest=None, now=T0)
                await store.append(key, make_checkpoint(seed, 1, payload=b"b" * 3000), run=seed,
                                   keep_latest=None, now=T0)
            assert s3.counts == {"PutObject": 1}
            found = await store.get(key, 1, now=T0)
            assert found is not None
            assert found[0].payload == b"b" * 3000


async def test_large_checkpoint_without_a_bucket_is_a_configuration_error(
    provisioned: str, aws_names: tuple[str, str]
) -> None:
    store = DynamoDBStore(aws_names[0], region=REGION, endpoint_url=provisioned)
    seed = make_run("no-bucket")
    try:
        with anyio.fail_after(DEADLINE), pytest.raises(ConfigurationError, match="bucket="):
            await store.append(key_of(seed), make_checkpoint(seed, 0, payload=b"x" * 400_000),
                               run=seed, keep_latest=None, now=T0)
        assert await store.get_run(key_of(seed), now=T0) is None
    finally:
        await store.aclose()


# -- shared items: request budget, values above the item limit -------------------------------


async def _purge_until_done(store: DynamoDBStore, now: float) -> None:
    while not (await store.purge_expired(now=now, limit=100))[1]:
        pass  # the session's table holds other tests' expired records too


async def test_checkpoints_with_items_cost_one_transaction_and_one_read(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str]
) -> None:
    """An append with its items is one transaction. A read with its items is one
    TransactGetItems when this process knows which records it needs (it appended the
    checkpoint and wrote to its items, or read it whole, with no other write since): run
    item, checkpoint, guard, owned values and named items in one snapshot. Otherwise one
    Query (the run item, the checkpoint and the values it owns sit together) +1
    BatchGetItem for the shared items it names, which live apart. Nothing is nested under
    the items it names (``b/...`` as the LangGraph saver names them): no Query looks for
    nested items (see ``test_dynamodb_nested.py``)."""
    run = make_run("items-budget")
    key = key_of(run)
    expected = {"b/a": b"value-b/a", "b/c": b"value-b/c", "w/2": b"value-w/2"}
    with anyio.fail_after(DEADLINE):
        await store.clients()
        with counting(store) as (first, _):
            await _append_items(store, run, 0, refs=["b/a", "b/b"], items=[
                make_item("b/a"), make_item("b/b"), make_item("w/0", owner=0)])
        with counting(store) as (plain, _):
            await _append_items(store, run, 1, items=[make_item("w/1", owner=1)])
        with counting(store) as (pruning, _):
            await _append_items(store, run, 2, refs=["b/a", "b/c"], items=[
                make_item("b/c"), make_item("w/2", owner=2)], keep_latest=2)
        with counting(store) as (appended, _):
            assert (await _read_items(store, key)) == expected
        with counting(store) as (owned, _):
            await _own(store, run, "w/x", expected)
        with counting(store) as (after_write, _):
            assert (await _read_items(store, key)) == expected
        with counting(store) as (read_whole, _):
            assert (await _read_items(store, key)) == expected
        async with opened(provisioned, aws_names, prefix=store.prefix) as other:
            await _own(other, run, "w/y", expected)
        with counting(store) as (written_elsewhere, _):
            assert (await _read_items(store, key)) == expected
        with counting(store) as (own_only, _):
            older = await store.read_with_items(key, sequence=1, now=T0)

    assert first.counts == plain.counts == owned.counts == {"TransactWriteItems": 1}
    # Pruning checkpoint 0 reads what it owns and names (one Query of its records).
    assert pruning.counts == {"Query": 1, "TransactWriteItems": 1}
    # This process wrote the checkpoint and what it owns: it knows every record to read.
    assert appended.counts == after_write.counts == read_whole.counts == {
        "TransactGetItems": 1}
    # Another process wrote to them: the snapshot shows its guard changed; then as usual.
    assert written_elsewhere.counts == {"TransactGetItems": 1, "Query": 1, "BatchGetItem": 1}
    # A checkpoint that is not the latest: its records and the run item (sent together).
    assert own_only.counts == {"Query": 1, "GetItem": 1}
    assert older is not None
    assert older[2] == {"w/1": b"value-w/1"}


async def test_an_append_too_large_for_one_transaction_pins_49_items_a_transaction(
    store: DynamoDBStore,
) -> None:
    """Shared items (a put and a raised count each) that do not fit in an append's
    transaction are written before it (pins), 49 items to a transaction: 98 operations and
    the check of the run item's revision the append read, so that a writer whose run moved
    on writes none of them. Here 48 of 98 items fit beside the run item, the checkpoint, its
    memo and its guard: the other 50 take two pin transactions (one before the check)."""
    run = make_run("pins-budget")
    key = key_of(run)
    shared = [make_item(f"b/{index:03d}") for index in range(98)]
    with anyio.fail_after(DEADLINE):
        await _append_items(store, run, 0)
        await store.clients()
        with counting(store) as (dynamo, s3):
            await _append_items(store, run, 1, refs=[item.key for item in shared], items=shared)
        assert (dynamo.counts, s3.counts) == ({"TransactWriteItems": 3}, {})
        assert await _read_items(store, key) == {item.key: item.value for item in shared}
    await store.delete_run(key)


async def test_a_first_append_too_large_for_one_transaction_takes_no_request_more(
    store: DynamoDBStore,
) -> None:
    """A run's first checkpoint with pins also deletes, in its own transaction, its pin
    record, only while it still holds its write token (no other first append's pins took
    it, no life came and went in between): one operation, for which it leaves room when it
    plans its pins. 98 items: 47 beside the run
    item, the checkpoint, its memo, its guard and that check, the other 51 in two pins."""
    run = make_run("first-pins-budget")
    key = key_of(run)
    shared = [make_item(f"b/{index:03d}") for index in range(98)]
    with anyio.fail_after(DEADLINE):
        await store.clients()
        with counting(store) as (dynamo, s3):
            await _append_items(store, run, 0, refs=[item.key for item in shared], items=shared)
        assert (dynamo.counts, s3.counts) == ({"TransactWriteItems": 3}, {})
        assert await _read_items(store, key) == {item.key: item.value for item in shared}
    await store.delete_run(key)


async def test_a_failed_append_undoes_its_pins_in_one_transaction(
    store: DynamoDBStore, provisioned: str, aws_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An append whose pins landed and whose own transaction is refused (another process
    appended meanwhile) lowers the 50 counts its pins raised in one transaction (up to 99
    counts each), which also checks that the run item is still of its life: 2 pins, its
    refused transaction, the undo."""
    run = make_run("undo-budget")
    key = key_of(run)
    shared = [make_item(f"b/{index:03d}") for index in range(98)]
    async with opened(provisioned, aws_names, prefix=store.prefix) as other:
        pin = store._pin

        async def overtaken(*args: Any, **kwargs: Any) -> bool:
            landed = await pin(*args, **kwargs)
            await _append_items(other, run, 1)
            return landed

        with anyio.fail_after(DEADLINE):
            await _append_items(store, run, 0)
            await store.clients()
            monkeypatch.setattr(store, "_pin", overtaken)
            with counting(store) as (dynamo, s3), pytest.raises(SequenceConflict):
                await _append_items(store, run, 1, refs=[item.key for item in shared],
                                    items=shared)
            monkeypatch.undo()
            assert (dynamo.counts, s3.counts) == ({"TransactWriteItems": 4}, {})
            count = await _raw_item(store, key, layout.counter_sk(shared[-1].key))
            assert count is not None
            assert count["rc"] == {"N": "0"}
        await store.delete_run(key)


async def _own(
    store: DynamoDBStore, run: RunRecord, name: str, expected: dict[str, bytes]
) -> None:
    """Write item ``name`` owned by checkpoint 2 of ``run``, and expect it in reads."""
    assert await store.put_owned_items(key_of(run), [make_item(name, owner=2)], owner=2,
                                       checkpoint_id=checkpoint_id_of(run, 2), if_absent=True,
                                       now=T0)
    expected[name] = f"value-{name}".encode()


async def _read_items(store: DynamoDBStore, key: str) -> dict[str, bytes]:
    found = await store.read_with_items(key, sequence=None, now=T0)
    assert found is not None
    return found[2]


async def test_item_values_above_the_item_limit_go_to_s3(store: DynamoDBStore) -> None:
    """Values too large for a DynamoDB item (400 KB) are kept in S3 like large payloads,
    whichever call writes them, and their objects go with their items."""
    run = make_run("large-items")
    key = key_of(run)
    big = {name: os.urandom(450 * 1024) for name in ("shared", "owned", "later", "free")}
    with anyio.fail_after(DEADLINE):
        await store.clients()
        with counting(store) as (dynamo, s3):
            await _append_items(store, run, 0, refs=["b/big"], items=[
                make_item("b/big", big["shared"]), make_item("w/big", big["owned"], owner=0)])
        assert (dynamo.counts, s3.counts) == ({"TransactWriteItems": 1}, {"PutObject": 2})
        assert await store.put_owned_items(key, [make_item("w/later", big["later"], owner=0)],
                                           owner=0, checkpoint_id=checkpoint_id_of(run, 0),
                                           if_absent=False, now=T0)
        await store.put_items(key, [make_item("free", big["free"])], now=T0)
        assert len(await _blob_keys(store, key)) == 4

        with counting(store) as (dynamo, s3):
            found = await store.read_with_items(key, sequence=None, now=T0)
        assert s3.counts == {"GetObject": 3}
        assert found is not None
        assert found[2] == {"b/big": big["shared"], "w/big": big["owned"],
                            "w/later": big["later"]}
        assert await store.get_items(key, ["free", "w/big"], now=T0) == {
            "free": big["free"], "w/big": big["owned"]}
        assert dict(await store.scan_items(key, prefix="b/", now=T0)) == {"b/big": big["shared"]}

        assert await store.delete_items(key, ["free"]) == 1
        assert len(await _blob_keys(store, key)) == 3
        # Pruning checkpoint 0 takes what it owns at once, and the shared value once the
        # cleanup loop finds that no checkpoint names it any more.
        await _append_items(store, run, 1, keep_latest=1)
        assert len(await _blob_keys(store, key)) == 1
        await _purge_until_done(store, T0)
        assert await _blob_keys(store, key) == []
        assert await store.get_items(key, ["b/big", "w/big", "w/later"], now=T0) == {}


async def test_a_deleted_run_takes_its_large_item_values(store: DynamoDBStore) -> None:
    run = make_run("large-items-deleted")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await _append_items(store, run, 0, refs=["b/big"], items=[
            make_item("b/big", os.urandom(450 * 1024)),
            make_item("w/big", os.urandom(450 * 1024), owner=0)])
        assert len(await _blob_keys(store, key)) == 2
        assert await store.delete_run(key) == 1
        assert await _blob_keys(store, key) == []


async def test_expiry_never_orphans_shared_items(store: DynamoDBStore) -> None:
    """A shared item stays while a live checkpoint names it, whatever expires around it, and
    goes (with its S3 object) once every checkpoint naming it expired and was purged."""
    run = make_run("expiring-shared", expires_at=T0 + 20)
    key = key_of(run)
    big = os.urandom(450 * 1024)
    with anyio.fail_after(DEADLINE):
        for sequence, expires_at in ((0, T0 + 10), (1, T0 + 20)):
            await _append_items(store, run, sequence, refs=["b/big"],
                                items=[make_item("b/big", big)], expires_at=expires_at)
        await _purge_until_done(store, T0 + 10)
        found = await store.read_with_items(key, sequence=None, now=T0 + 10)
        assert found is not None
        assert (found[0].sequence, found[2]) == (1, {"b/big": big})

        await _purge_until_done(store, T0 + 20)
        assert await store.get_items(key, ["b/big"], now=T0) == {}
        assert await _blob_keys(store, key) == []


async def test_native_ttl_removing_a_checkpoint_first_orphans_nothing(
    store: DynamoDBStore,
) -> None:
    """AWS may delete an expired checkpoint item by TTL before the store removes it: the
    shared items it named still lose its reference (kept in its guard, which has no TTL)
    and go once nothing names them."""
    run = make_run("ttl-first-items")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await _append_items(store, run, 0, refs=["b/old", "b/both"], expires_at=T0 + 10,
                            items=[make_item("b/old"), make_item("b/both")])
        await _append_items(store, run, 1, refs=["b/both"])
        ddb, _ = await store.clients()
        await ddb.delete_item(TableName=store.table, Key={  # what native TTL does
            "PK": {"S": layout.partition(key)}, "SK": {"S": layout.checkpoint_sk(0)}})

        record = make_checkpoint(run, 2, created_at=T0 + 20)
        await store.append(key, record, run=run, keep_latest=None, now=T0 + 20)
        await _purge_until_done(store, T0 + 20)
        assert await store.get_items(key, ["b/old", "b/both"], now=T0 + 20) == {
            "b/both": b"value-b/both"}
        assert await _raw_item(store, key, layout.guard_sk(0)) is None


# -- failures: blobs are cleaned up, conflicts are not retried -----------------------------


async def test_failed_item_write_deletes_its_blob(store: DynamoDBStore) -> None:
    seed = make_run("blob-of-a-loser")
    key = key_of(seed)
    big = os.urandom(DEFAULT_THRESHOLD + 1)
    with anyio.fail_after(DEADLINE):
        await store.clients()
        await store.append(key, make_checkpoint(seed, 0, payload=big), run=seed,
                           keep_latest=None, now=T0)
        kept = await _blob_keys(store, key)
        with counting(store) as (dynamo, s3), pytest.raises(SequenceConflict) as caught:
            await store.append(key, make_checkpoint(seed, 0, payload=big), run=seed,
                               keep_latest=None, now=T0)
        assert (caught.value.latest_sequence, caught.value.incarnation) == (0, seed.incarnation)
        assert s3.counts == {"PutObject": 1, "DeleteObjects": 1}
        assert dynamo.counts == {"GetItem": 1}  # the conflict is decided on a fresh read
        assert await _blob_keys(store, key) == kept


async def test_conditional_failures_are_conflicts_not_retries(
    provisioned: str, aws_names: tuple[str, str]
) -> None:
    seed = make_run("contended")
    key = key_of(seed)
    async with opened(provisioned, aws_names) as first, opened(provisioned, aws_names) as second:
        with anyio.fail_after(DEADLINE):
            await first.append(key, make_checkpoint(seed, 0), run=seed, keep_latest=None, now=T0)
            assert await second.get_run(key, now=T0) is not None  # second caches the run item
            await first.append(key, make_checkpoint(seed, 1), run=seed, keep_latest=None, now=T0)

            await second.clients()
            with counting(second) as (dynamo, _), pytest.raises(SequenceConflict) as caught:
                await second.append(key, make_checkpoint(seed, 1, payload=b"late"), run=seed,
                                    keep_latest=None, now=T0)
            # One transaction: its cancellation carries the current run item, no re-read.
            assert dynamo.counts == {"TransactWriteItems": 1}
            assert caught.value.latest_sequence == 1

            await second.update_run(key, incarnation=seed.incarnation, version=0,
                                    status="paused", data=b"", now=T0)
            with counting(first) as (dynamo, _), pytest.raises(ConflictError, match="concurrent"):
                await first.update_run(key, incarnation=seed.incarnation, version=0,
                                       status="failed", data=b"", now=T0)
            assert dynamo.counts == {"UpdateItem": 1}
            run = await first.get_run(key, now=T0)
            assert run is not None
            assert (run.status, run.version) == ("paused", 1)


# -- expiry: moto never deletes, reads hide and purging removes ---------------------------


async def test_expired_checkpoints_are_hidden_then_purged(store: DynamoDBStore) -> None:
    clock = [T0]
    manager = _manager(store, clock, max_checkpoints_per_run=None, compress_min_bytes=None)
    with anyio.fail_after(DEADLINE):
        kept = await manager.create("ageing", state={"n": 0})
        short = await manager.create("ageing", state={"blob": os.urandom(DEFAULT_THRESHOLD)},
                                     ttl_seconds=60)
        key = _ids.run_key("ageing")
        raw = await _raw_item(store, key, layout.checkpoint_sk(1))
        assert raw is not None
        assert int(raw["ttl"]["N"]) == layout.ttl_of(T0 + 60)
        assert raw["x"]["N"] in ("1700000060", "1700000060.0")
        assert len(await _blob_keys(store, key)) == 1

        clock[0] = T0 + 60
        # Expired but not deleted (moto has no TTL sweeper, and AWS takes up to days).
        assert await _raw_item(store, key, layout.checkpoint_sk(1)) is not None
        assert await manager.restore_from(short.checkpoint_id) is None
        restored = await manager.restore("ageing")
        assert restored is not None
        assert restored.checkpoint_id == kept.checkpoint_id

        assert await manager.cleanup_expired() == 1
        assert await _raw_item(store, key, layout.checkpoint_sk(1)) is None
        assert await _blob_keys(store, key) == []
        info = await manager.get_run("ageing")
        assert info is not None
        assert info.checkpoint_count == 1


async def test_expired_run_and_its_items_are_purged(store: DynamoDBStore) -> None:
    seed = make_run("bygone")
    key = key_of(seed)
    with anyio.fail_after(DEADLINE):
        await store.append(key, make_checkpoint(seed, 0, expires_at=T0 + 10,
                                                payload=os.urandom(DEFAULT_THRESHOLD)),
                           run=msgspec.structs.replace(seed, expires_at=T0 + 10),
                           keep_latest=None, now=T0)
        await store.put_items(key, [make_item("free"), make_item("owned", owner=0)], now=T0)
        run_item = await _raw_item(store, key, layout.RUN_SK)
        assert run_item is not None
        # The run item outlives its checkpoints natively, so the cleanup loop gets it first.
        assert int(run_item["ttl"]["N"]) > layout.ttl_of(T0 + 10)
        assert await store.get_run(key, now=T0 + 10) is None

        removed = 0
        for _ in range(20):
            count, done = await store.purge_expired(now=T0 + 10, limit=100)
            removed += count
            if done:
                break
        assert removed == 1
        for sort_key in (layout.RUN_SK, layout.checkpoint_sk(0), layout.item_sk("free"),
                         layout.item_sk("owned"), layout.owned_sk(0, "owned")):
            assert await _raw_item(store, key, sort_key) is None, sort_key
        assert await _blob_keys(store, key) == []


async def test_an_expired_run_is_purged_after_native_ttl_removed_its_checkpoints(
    store: DynamoDBStore,
) -> None:
    """AWS deletes expired checkpoint items by TTL whenever it gets to them, maybe before
    the cleanup loop does. The run item, its items and blobs must still be found and go."""
    seed = make_run("ttl-first", expires_at=T0 + 10)
    key = key_of(seed)
    with anyio.fail_after(DEADLINE):
        for sequence in range(2):
            await store.append(key, make_checkpoint(seed, sequence, expires_at=T0 + 10,
                                                    payload=os.urandom(DEFAULT_THRESHOLD)),
                               run=seed, keep_latest=None, now=T0)
        await store.put_items(key, [make_item("free"), make_item("owned", owner=1)], now=T0)
        ddb, _ = await store.clients()
        for sequence in range(2):  # what native TTL does, behind the store's back
            await ddb.delete_item(TableName=store.table, Key={
                "PK": {"S": layout.partition(key)}, "SK": {"S": layout.checkpoint_sk(sequence)}})

        while not (await store.purge_expired(now=T0 + 10, limit=100))[1]:
            pass  # the session's table holds other tests' expired records too
        for sort_key in (layout.RUN_SK, layout.item_sk("free"), layout.item_sk("owned"),
                         layout.owned_sk(1, "owned")):
            assert await _raw_item(store, key, sort_key) is None, sort_key
        assert await _blob_keys(store, key) == []


async def test_purge_removes_orphaned_blobs_and_spares_in_flight_ones(
    store: DynamoDBStore,
) -> None:
    seed = make_run("orphans")
    key = key_of(seed)
    big = os.urandom(DEFAULT_THRESHOLD + 1)
    with anyio.fail_after(DEADLINE):
        await store.append(key, make_checkpoint(seed, 0, payload=big), run=seed,
                           keep_latest=None, now=T0)
        await store.append(key, make_checkpoint(seed, 1, expires_at=T0 + 5), run=seed,
                           keep_latest=None, now=T0)
        await store.append(key, make_checkpoint(seed, 2), run=seed, keep_latest=None, now=T0)
        referenced = await _blob_keys(store, key)
        blobs = await store._bucket()
        # What a crash between the S3 PUT and the item write leaves behind:
        crashed = f"{key}/{seed.incarnation}/{1:020d}-dead0001"
        other_incarnation = f"{key}/aaaaaaaa/{0:020d}-dead0002"
        in_flight = f"{key}/{seed.incarnation}/{3:020d}-busy0003"  # above latest: spared
        for blob in (crashed, other_incarnation, in_flight):
            await blobs.put(blob, b"orphan")

        assert await store.purge_expired(now=T0 + 5, limit=10) == (1, True)

        assert sorted(await _blob_keys(store, key)) == sorted([*referenced, in_flight])
        found = await store.get(key, 0, now=T0 + 5)
        assert found is not None
        assert found[0].payload == big


# -- batches, clients, layout -----------------------------------------------------------------


async def test_item_writes_and_run_deletes_are_chunked(store: DynamoDBStore) -> None:
    """Items are written in transactions of up to 100 records (each write is conditioned
    so that it never hides an item owned by a checkpoint); a run's records are deleted in
    transactions of up to 99 deletes, each with the check that the run is still the life
    that was read (a late first send then spares a new life of the run)."""
    seed = make_run("batched")
    key = key_of(seed)
    with anyio.fail_after(DEADLINE):
        await store.append(key, make_checkpoint(seed, 0), run=seed, keep_latest=None, now=T0)
        await store.clients()
        with counting(store) as (dynamo, _):
            await store.put_items(key, [make_item(f"k{index:03}") for index in range(120)],
                                  now=T0)
        assert dynamo.counts == {"TransactWriteItems": 2}
        with counting(store) as (dynamo, _):
            assert await store.delete_run(key) == 1
        # 120 items and 1 checkpoint: 121 deletes in 2 transactions after one Query (the
        # first marks the run item: no write of the run lands after it), a second Query for
        # the writes that landed before the mark, then (after the blobs) the run item.
        assert dynamo.counts == {"Query": 2, "TransactWriteItems": 2, "DeleteItem": 1}


async def test_given_clients_are_used_and_never_closed(
    provisioned: str, aws_names: tuple[str, str]
) -> None:
    owner = DynamoDBStore(aws_names[0], bucket=aws_names[1], region=REGION,
                          endpoint_url=provisioned)
    try:
        ddb, s3 = await owner.clients()
        borrower = DynamoDBStore(aws_names[0], bucket=aws_names[1], dynamodb_client=ddb,
                                 s3_client=s3, prefix=f"{unique_name('b')}/")
        seed = make_run("borrowed")
        with anyio.fail_after(DEADLINE):
            await borrower.append(key_of(seed), make_checkpoint(seed, 0, payload=os.urandom(
                DEFAULT_THRESHOLD + 1)), run=seed, keep_latest=None, now=T0)
            await borrower.aclose()
            # Still open: the borrower closed nothing it was given.
            assert (await ddb.describe_table(TableName=aws_names[0]))["Table"]
            assert await s3.head_bucket(Bucket=aws_names[1])
    finally:
        await owner.aclose()


def test_book_prunes_expired_then_oldest_and_tracks_expiry() -> None:
    book = layout.Book()
    for sequence, expires_at in enumerate([None, T0 + 50, T0 + 10, T0 + 30, None]):
        book.add(sequence, expires_at, "b3" if sequence == 3 else None,
                 capacity=layout.FRONT_CAPACITY)
    assert (book.count, book.expires_at(), book.back) == (5, None, None)
    assert book.prune(T0 + 10, keep_latest=3) == [2, 0]
    assert book.sequences() == [1, 3, 4]
    assert book.held == [(1, 2), (3, 5)]
    assert book.remove(4)
    assert not book.remove(4)
    assert (book.expires_at(), book.blobs) == (T0 + 50, {3: "b3"})
    encoded = layout.BOOK_ENCODER.encode(book)
    assert layout.BOOK_DECODER.decode(encoded) == book
    assert book.prune(T0 + 50, keep_latest=None) == [1, 3]
    assert (book.count, book.expires_at()) == (0, 0.0)


def test_created_stamps_sort_like_creation_times() -> None:
    times = [-5.5, -0.0, 0.0, 1e-9, 1.0, T0, T0 + 0.000001, 1e18]
    stamps = [layout.created_stamp(at, "aaaa") for at in times]
    assert stamps == sorted(stamps)
    assert layout.created_stamp(T0, "aaaa") < layout.created_stamp(T0, "aaab")


# -- provisioning and the ops kit -------------------------------------------------------------


async def test_provision_is_idempotent_and_sets_everything(
    atomic_moto: str, moto_endpoint: str
) -> None:
    names = (unique_name("prov"), unique_name("prov"))
    rule_name = rule_id("fastcheckpoint-blobs", "blobs/")
    async with opened(atomic_moto, names, prefix="blobs/") as store:
        with anyio.fail_after(DEADLINE):
            first = await store.provision()
            again = await store.provision()
            indexes = "by_status, by_created, by_expiry"
            assert first == [
                f"created table {names[0]} with the indexes {indexes}",
                "enabled TTL on the attribute 'ttl'",
                f"created bucket s3://{names[1]}",
                "enabled versioning",
                "enabled default encryption AES256",
                f"created lifecycle rule {rule_name}",
            ]
            assert again == [
                f"found table {names[0]} with the indexes {indexes}",
                "found TTL on the attribute 'ttl'",
                f"found bucket s3://{names[1]}",
                "found versioning",
                "found default encryption AES256",
                f"found lifecycle rule {rule_name}",
            ]
            ddb, s3 = await store.clients()
            table = (await ddb.describe_table(TableName=names[0]))["Table"]
            assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
            assert {index["IndexName"] for index in table["GlobalSecondaryIndexes"]} == {
                layout.BY_STATUS, layout.BY_CREATED, layout.BY_EXPIRY
            }
            ttl = (await ddb.describe_time_to_live(TableName=names[0]))["TimeToLiveDescription"]
            assert (ttl["TimeToLiveStatus"], ttl["AttributeName"]) == ("ENABLED", "ttl")
            versioning = await s3.get_bucket_versioning(Bucket=names[1])
            assert versioning["Status"] == "Enabled"
            encryption = await s3.get_bucket_encryption(Bucket=names[1])
            rule = encryption["ServerSideEncryptionConfiguration"]["Rules"][0]
            assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
            lifecycle = await s3.get_bucket_lifecycle_configuration(Bucket=names[1])
            (rule,) = lifecycle["Rules"]
            assert rule["ID"] == rule_name
            assert rule["Status"] == "Enabled"
            assert rule["NoncurrentVersionExpiration"]["NoncurrentDays"] == 30
            assert rule["Filter"]["Prefix"] == "blobs/"


async def test_table_json_is_what_provision_creates(atomic_moto: str) -> None:
    definition = json.loads((KIT / "table.json").read_text())
    table_name = definition.pop("TableName")
    assert table_name == "fastcheckpoint"
    assert definition == layout.TABLE_DEFINITION
    names = (unique_name("kit"), unique_name("kit"))
    async with opened(atomic_moto, names) as store:
        with anyio.fail_after(DEADLINE):
            await store.provision()
            ddb, _ = await store.clients()
            table = (await ddb.describe_table(TableName=names[0]))["Table"]
    assert table["KeySchema"] == definition["KeySchema"]
    assert sorted(table["AttributeDefinitions"], key=str) == sorted(
        definition["AttributeDefinitions"], key=str
    )
    described = {
        index["IndexName"]: (index["KeySchema"], index["Projection"])
        for index in table["GlobalSecondaryIndexes"]
    }
    assert described == {
        index["IndexName"]: (index["KeySchema"], index["Projection"])
        for index in definition["GlobalSecondaryIndexes"]
    }


_S3_ACTIONS = {
    "PutObject": "s3:PutObject",
    "GetObject": "s3:GetObject",
    "DeleteObjects": "s3:DeleteObject",
    "ListObjectsV2": "s3:ListBucket",
}


async def test_iam_policy_grants_exactly_what_the_store_calls(
    store: DynamoDBStore,
) -> None:
    """Every store operation over a workload, counted per client, against iam-policy.json."""
    big = os.urandom(DEFAULT_THRESHOLD + 1)
    seed = make_run("iam")
    key = key_of(seed)
    with anyio.fail_after(DEADLINE):
        await store.clients()
        with counting(store) as (dynamo, s3):
            await store.append(key, make_checkpoint(seed, 0, payload=big, expires_at=T0 + 5),
                               run=msgspec.structs.replace(seed, expires_at=T0 + 5),
                               keep_latest=1, now=T0)
            await store.get(key, 0, now=T0)
            await store.put_items(key, [make_item("a", owner=0, expires_at=T0 + 5)], now=T0)
            await store.put_items(key, [make_item("b")], create_only=True, now=T0)
            await store.append(key, make_checkpoint(seed, 1), run=seed, keep_latest=1, now=T0)
            await store.get(key, 1, now=T0)
            await store.latest(key, now=T0)
            await store.headers(key, before=1, limit=5, now=T0)
            await store.get_items(key, ["a", "b"], now=T0)
            await store.scan_items(key, now=T0)
            await store.delete_items(key, ["b"])
            run = await store.update_run(key, incarnation=seed.incarnation, version=0,
                                         status="paused", data=b"", now=T0)
            await store.list_runs(status="paused", limit=5, cursor=None, now=T0)
            await store.count_runs(status=None, now=T0)
            await store.append(key, make_checkpoint(seed, 2, expires_at=T0 + 5), run=run,
                               keep_latest=None, now=T0)
            await store.delete(key, 2, checkpoint_id=checkpoint_id_of(seed, 2))
            await store.append(key, make_checkpoint(seed, 3, expires_at=T0 + 5), run=run,
                               keep_latest=None, now=T0)
            await capability_calls(store, value=os.urandom(DEFAULT_THRESHOLD + 1))
            await store.purge_expired(now=T0 + 5, limit=100)
            # A day later: the reply memos of the writes above are due too (BatchWriteItem).
            await store.purge_expired(now=T0 + 86_400, limit=100)
            await store.delete_run(key)
    assert dynamo.counts["BatchWriteItem"] >= 1
    called = {f"dynamodb:{name}" for name in dynamo.counts}
    if called & {"dynamodb:TransactWriteItems", "dynamodb:TransactGetItems"}:
        called |= {f"dynamodb:{name}" for name in TRANSACTION_ACTIONS}
    called |= {_S3_ACTIONS[name] for name in s3.counts}

    policy = json.loads((KIT / "iam-policy.json").read_text())
    granted = {action for statement in policy["Statement"] for action in statement["Action"]}
    assert granted == called
    assert all(statement["Effect"] == "Allow" for statement in policy["Statement"])
    for statement in policy["Statement"]:
        for resource in statement["Resource"]:
            assert "*" not in resource.split(":")[-1].split("/")[0], resource


# -- several processes ------------------------------------------------------------------------


async def test_processes_appending_to_one_run_get_unique_gap_free_sequences(
    provisioned: str, aws_names: tuple[str, str]
) -> None:
    run_id = f"shared-{unique_name('run')}"
    prefix = f"{unique_name('mp')}/"
    env = {**os.environ, "PYTHONPATH": PACKAGE_ROOT}
    outputs: dict[str, bytes] = {}

    async def worker(name: str) -> None:
        done = await anyio.run_process(
            [sys.executable, str(WORKER), provisioned, aws_names[0], aws_names[1], prefix,
             run_id, "15", name],
            env=env,
        )
        outputs[name] = done.stdout

    with anyio.fail_after(120):
        async with anyio.create_task_group() as group:
            for index in range(4):
                group.start_soon(worker, f"w{index}")
        acknowledged = [int(line) for out in outputs.values() for line in out.split()]
        assert sorted(acknowledged) == list(range(60))
        async with opened(provisioned, aws_names, prefix=prefix) as store:
            key = _ids.run_key(run_id)
            run = await store.get_run(key, now=T0)
            assert run is not None
            assert (run.latest_sequence, run.checkpoint_count) == (59, 60)
            found, _ = await store.headers(key, before=None, limit=100, now=T0)
            assert [header.sequence for header in found] == list(range(59, -1, -1))
            for name, out in outputs.items():
                for line in out.split():
                    got = await store.get(key, int(line), now=T0)
                    assert got is not None
                    assert got[0].payload == f"{name}/{int(line)}".encode()
            await store.delete_run(key)



def test_fastcheckpoint_init_provisions_from_the_shell(
    moto_endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import boto3

    from fastcheckpoint.cli import EXIT_OK, main

    names = (unique_name("init"), unique_name("init"))
    url = _url(moto_endpoint, names)

    assert main(["init", url]) == EXIT_OK
    assert f"created table {names[0]}" in capsys.readouterr().out
    assert main(["init", url]) == EXIT_OK  # idempotent
    assert f"found table {names[0]}" in capsys.readouterr().out
    table = boto3.client("dynamodb", region_name=REGION, endpoint_url=moto_endpoint)
    described = table.describe_table(TableName=names[0])["Table"]
    assert described["TableStatus"] == "ACTIVE"
    bucket = boto3.client("s3", region_name=REGION, endpoint_url=moto_endpoint)
    assert bucket.get_bucket_versioning(Bucket=names[1])["Status"] == "Enabled"
