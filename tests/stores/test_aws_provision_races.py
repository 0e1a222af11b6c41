"""Provisioning of the DynamoDB and S3 stores when another process provisions the same table or
bucket at the same moment (two ``fastcheckpoint init`` runs, several services deploying).

Each test puts the other process's requests at one chosen point of the first one's, through a
botocore ``before-call`` hook on the first store's client, against moto in server mode. Where
AWS answers a request in such a race in a way moto does not (it never says
``OperationAborted``, and lets TTL be enabled twice), the hook gives AWS's answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
import pytest
from botocore.awsrequest import AWSResponse, HTTPHeaders

from fastcheckpoint.stores._s3_provision import rule_id
from fastcheckpoint.stores.dynamodb import DynamoDBStore
from fastcheckpoint.stores.s3 import S3Store
from tests.stores._moto import REGION, moto_endpoint, unique_name

__all__ = ["moto_endpoint"]

pytestmark = pytest.mark.anyio

DEADLINE = 60.0
NONCURRENT = rule_id("fastcheckpoint-noncurrent", "checkpoints/")
"""The rule of the S3 store under ``checkpoints/`` (the DynamoDB stores' is
``fastcheckpoint-blobs``: their payloads are under the empty prefix)."""

Meanwhile = Callable[[], Awaitable["tuple[int, str, str] | None"]]
"""What happens before a request is sent; an ``(HTTP status, code, message)`` it returns is
the request's answer instead of the server's."""


_Store = TypeVar("_Store", DynamoDBStore, S3Store)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


@pytest.fixture
async def opened() -> AsyncIterator[Callable[[_Store], _Store]]:
    """Keeps the stores a test opens, and closes them afterwards."""
    stores: list[DynamoDBStore | S3Store] = []

    def keep(store: _Store) -> _Store:
        stores.append(store)
        return store

    yield keep
    for store in stores:
        await store.aclose()


def _before(client: Any, operation: str, meanwhile: Meanwhile) -> None:
    """Run ``meanwhile`` before the client's first ``operation`` request goes out."""
    service = client.meta.service_model.service_id.hyphenize()
    pending = [meanwhile]

    async def hook(**_: Any) -> tuple[AWSResponse, dict[str, Any]] | None:
        if not pending:
            return None
        answer = await pending.pop()()
        if answer is None:
            return None
        status, code, message = answer
        reply = AWSResponse("", status, HTTPHeaders(), None)
        return reply, {"Error": {"Code": code, "Message": message},
                       "ResponseMetadata": {"HTTPStatusCode": status}}

    client.meta.events.register(f"before-call.{service}.{operation}", hook)


def _dynamodb(endpoint: str, table: str, bucket: str | None = None) -> DynamoDBStore:
    return DynamoDBStore(table, bucket=bucket, region=REGION, endpoint_url=endpoint)


async def _provision_while(
    store: DynamoDBStore | S3Store, operation: str, meanwhile: Meanwhile
) -> list[str]:
    """``store.provision()``, with ``meanwhile`` run just before its ``operation`` request."""
    with anyio.fail_after(DEADLINE):
        client = (await store.clients())[0] if isinstance(store, DynamoDBStore) else (
            await store.client())
        _before(client, operation, meanwhile)
        return await store.provision()


async def test_a_table_created_meanwhile_is_found_and_checked(
    moto_endpoint: str, opened: Callable[[DynamoDBStore], DynamoDBStore]
) -> None:
    """The other run creates the table between this one's DescribeTable (not found) and its
    CreateTable, which DynamoDB refuses with ResourceInUseException."""
    table = unique_name("race")
    first, second = (opened(_dynamodb(moto_endpoint, table)) for _ in range(2))
    reports: list[list[str]] = []

    async def other_run() -> None:
        reports.append(await second.provision())

    done = await _provision_while(first, "CreateTable", other_run)
    indexes = "by_status, by_created, by_expiry"
    assert reports == [[f"created table {table} with the indexes {indexes}",
                        "enabled TTL on the attribute 'ttl'"]]
    assert done == [f"found table {table} with the indexes {indexes}",
                    "found TTL on the attribute 'ttl'"]


async def test_ttl_enabled_meanwhile_is_found(
    moto_endpoint: str, opened: Callable[[DynamoDBStore], DynamoDBStore]
) -> None:
    """The other run enables TTL between this one's DescribeTimeToLive and its
    UpdateTimeToLive, which DynamoDB then refuses ("TimeToLive is already enabled")."""
    table = unique_name("race")
    first, second = (opened(_dynamodb(moto_endpoint, table)) for _ in range(2))
    reports: list[list[str]] = []

    async def other_run() -> tuple[int, str, str] | None:
        reports.append(await second.provision())
        client, _ = await first.clients()
        ttl = (await client.describe_time_to_live(TableName=table))["TimeToLiveDescription"]
        if ttl["TimeToLiveStatus"] == "ENABLED":
            return 400, "ValidationException", "TimeToLive is already enabled"
        return None

    done = await _provision_while(first, "UpdateTimeToLive", other_run)
    assert reports[0][1] == "enabled TTL on the attribute 'ttl'"
    assert done[1] == "found TTL on the attribute 'ttl'"


async def test_a_bucket_being_created_meanwhile_is_waited_for(
    moto_endpoint: str, opened: Callable[[S3Store], S3Store]
) -> None:
    """The other run creates the bucket between this one's HeadBucket (not found) and its
    CreateBucket, which S3 answers with OperationAborted while that creation is under way."""
    bucket = unique_name("race")
    first, second = (opened(S3Store(bucket, "p", region=REGION, endpoint_url=moto_endpoint))
                     for _ in range(2))
    reports: list[list[str]] = []

    async def other_run() -> tuple[int, str, str]:
        reports.append(await second.provision())
        return 409, "OperationAborted", ("A conflicting conditional operation is currently in "
                                         "progress against this resource. Please try again.")

    done = await _provision_while(first, "CreateBucket", other_run)
    assert reports[0][0] == f"created bucket s3://{bucket}"
    assert done == [f"found bucket s3://{bucket}", "found versioning",
                    "found default encryption AES256",
                    f"found lifecycle rule {rule_id('fastcheckpoint-noncurrent', 'p/')}"]


@pytest.mark.parametrize(("operation", "step", "line"), [
    ("PutBucketVersioning", 1, "found versioning"),
    ("PutBucketEncryption", 2, "found default encryption AES256"),
    ("PutBucketLifecycleConfiguration", 3, f"created lifecycle rule {NONCURRENT}"),
])
async def test_a_bucket_change_aborted_by_another_is_tried_again(
    moto_endpoint: str, opened: Callable[[Any], Any], operation: str, step: int, line: str
) -> None:
    """The other run (a DynamoDB store keeping its payloads in the same new bucket) provisions
    whole just before this one's change, which S3 answers with OperationAborted: this one
    looks again and completes what is missing, keeping the other's rule."""
    bucket = unique_name("race")
    first = opened(S3Store(bucket, "checkpoints/", region=REGION, endpoint_url=moto_endpoint))
    second = opened(_dynamodb(moto_endpoint, unique_name("race"), bucket))

    async def other_run() -> tuple[int, str, str]:
        await second.provision()
        return 409, "OperationAborted", "A conflicting conditional operation is in progress."

    done = await _provision_while(first, operation, other_run)
    lifecycle = await (await first.client()).get_bucket_lifecycle_configuration(Bucket=bucket)
    assert done[step] == line
    assert {rule["ID"] for rule in lifecycle["Rules"]} == {NONCURRENT, "fastcheckpoint-blobs"}


async def test_provisioning_runs_at_once_all_succeed(
    moto_endpoint: str, opened: Callable[[DynamoDBStore], DynamoDBStore]
) -> None:
    """Three ``fastcheckpoint init`` of one new table and bucket at once, with nothing put in
    between: each looks before any creates, so all but one find their CreateTable refused."""
    table, bucket = unique_name("race"), unique_name("race")
    stores = [opened(_dynamodb(moto_endpoint, table, bucket)) for _ in range(3)]
    with anyio.fail_after(DEADLINE):
        reports = await asyncio.gather(*(store.provision() for store in stores))
    assert sum(report[0].startswith("created table") for report in reports) == 1
    assert all(report[0].startswith(("created table", "found table")) for report in reports)


def _when(client: Any, event: str, operation: str, action: Callable[[], Awaitable[None]]) -> None:
    """Await ``action`` at each ``event`` ("before-call", "after-call") of ``operation``."""
    async def hook(**_: Any) -> None:
        await action()

    client.meta.events.register(f"{event}.s3.{operation}", hook)


@pytest.mark.parametrize("other", ["dynamodb", "s3"])
async def test_lifecycle_rules_a_racing_run_dropped_are_put_back(
    moto_endpoint: str, opened: Callable[[Any], Any], other: str
) -> None:
    """Both runs read the new bucket's (empty) lifecycle rules before either writes. The
    other store's write lands first (a DynamoDB store's payloads, or an S3 store under
    another prefix), then the S3 store's, which drops its rule: the other store's read-back
    (held until then) finds its rule gone and merges it in again."""
    bucket = unique_name("race")
    first = opened(S3Store(bucket, "checkpoints/", region=REGION, endpoint_url=moto_endpoint))
    second = opened(_dynamodb(moto_endpoint, unique_name("race"), bucket) if other == "dynamodb"
                    else S3Store(bucket, "other/", region=REGION, endpoint_url=moto_endpoint))
    first_wrote, second_wrote = anyio.Event(), anyio.Event()
    second_reads: list[None] = []
    second_writes: list[None] = []
    later: list[asyncio.Task[list[str]]] = []

    async def other_run_until_it_wrote() -> None:
        later.append(asyncio.ensure_future(second.provision()))
        await second_wrote.wait()

    async def second_reads_after_first_wrote() -> None:
        second_reads.append(None)
        if len(second_reads) > 1:  # its read-back
            await first_wrote.wait()

    async def second_writes_counted() -> None:
        second_writes.append(None)
        second_wrote.set()

    with anyio.fail_after(DEADLINE):
        client = await first.client()
        theirs = (await second.clients())[1] if other == "dynamodb" else await second.client()
        _when(client, "before-call", "PutBucketLifecycleConfiguration", other_run_until_it_wrote)
        _when(client, "after-call", "PutBucketLifecycleConfiguration", _setter(first_wrote))
        _when(theirs, "after-call", "PutBucketLifecycleConfiguration", second_writes_counted)
        _when(theirs, "before-call", "GetBucketLifecycleConfiguration",
              second_reads_after_first_wrote)
        await first.provision()
        await later[0]
        lifecycle = await client.get_bucket_lifecycle_configuration(Bucket=bucket)
    other_rule = ("fastcheckpoint-blobs" if other == "dynamodb"
                  else rule_id("fastcheckpoint-noncurrent", "other/"))
    assert len(second_writes) == 2  # its rules, then its rule again after the read-back
    assert {rule["ID"] for rule in lifecycle["Rules"]} == {NONCURRENT, other_rule}
    assert {rule["Filter"]["Prefix"] for rule in lifecycle["Rules"]} == {
        "checkpoints/", "" if other == "dynamodb" else "other/"}


def _setter(event: anyio.Event) -> Callable[[], Awaitable[None]]:
    async def set_it() -> None:
        event.set()

    return set_it
