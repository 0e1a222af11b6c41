"""Backings for the differential machines on every store: where one example's checkpoints
live, with a new store object over them per ``open`` (each saver, session or service a
machine treats as another process gets its own), and their removal afterwards."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from fastcheckpoint.stores import CheckpointStore
from tests.stores._moto import REGION, unique_name
from tests.test_model_checking_stores import _empty_schema, _postgres_url


class Backing:
    """Opens store objects over one example's data; :meth:`clean` deletes it afterwards."""

    def open(self) -> CheckpointStore:
        raise NotImplementedError

    async def prepare(self) -> None:
        """Create what the stores need before the first call (a DynamoDB table)."""

    async def clean(self) -> None:
        """Delete what the example wrote (after its stores are closed)."""


class SQLiteBacking(Backing):
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def open(self) -> CheckpointStore:
        from fastcheckpoint.stores.sqlite import SQLiteStore

        return SQLiteStore(self.directory / "runs.db", synchronous="normal")


class RedisBacking(Backing):
    """A key prefix of the example's own on the server; ``cluster``: the Redis Cluster code
    path on the plain server (run scripts return their index changes and the store applies
    them in a second call)."""

    def __init__(self, url: str, *, cluster: bool, tag: str) -> None:
        self.url = url
        self.cluster = cluster
        self.prefix = f"{tag}-{secrets.token_hex(6)}"

    def open(self) -> CheckpointStore:
        import redis.asyncio as aioredis

        from fastcheckpoint.stores.redis import RedisStore

        if not self.cluster:
            return RedisStore.from_url(f"{self.url}?prefix={self.prefix}")
        client = aioredis.Redis.from_url(self.url)
        return RedisStore(client, prefix=self.prefix, cluster=True, owns_client=True)

    async def clean(self) -> None:
        import redis.asyncio as aioredis

        from tests.stores._redis_support import delete_prefix

        client = aioredis.Redis.from_url(self.url)
        try:
            await delete_prefix(client, self.prefix)
        finally:
            await client.aclose()


class PostgresBacking(Backing):
    """The test's schema (provisioned once per test), emptied after each example."""

    def __init__(self, target: Any, schema: str) -> None:
        self.target = target
        self.schema = schema

    def open(self) -> CheckpointStore:
        from fastcheckpoint.stores.postgres import PostgresStore

        # Commits need not wait for the disk: this is about what is seen, not what survives.
        return PostgresStore.from_url(_postgres_url(self.target, self.schema),
                                      server_settings={"synchronous_commit": "off"})

    async def clean(self) -> None:
        await _empty_schema(self.target, self.schema)


class S3Backing(Backing):
    """A key prefix of the example's own in the test's bucket (moto's data goes with the
    server)."""

    def __init__(self, endpoint: str, bucket: str, *, tag: str) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        self.prefix = f"{tag}-{secrets.token_hex(6)}"

    def open(self) -> CheckpointStore:
        from fastcheckpoint.stores.s3 import S3Store

        return S3Store(self.bucket, self.prefix, region=REGION, endpoint_url=self.endpoint,
                       session=_aws_session())


class DynamoDBBacking(Backing):
    """A table of the example's own (listings span the table), and the test's bucket for
    checkpoints and values over ``threshold`` bytes."""

    def __init__(self, endpoint: str, bucket: str, *, threshold: int, tag: str) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        self.threshold = threshold
        self.table = unique_name(tag)

    def open(self) -> CheckpointStore:
        from fastcheckpoint.stores.dynamodb import DynamoDBStore

        return DynamoDBStore(self.table, bucket=self.bucket, prefix=f"{self.table}/",
                             threshold=self.threshold, region=REGION,
                             endpoint_url=self.endpoint, session=_aws_session())

    async def prepare(self) -> None:
        from fastcheckpoint.stores.dynamodb import DynamoDBStore

        store = self.open()
        assert isinstance(store, DynamoDBStore)
        try:
            await store.provision()
        finally:
            await store.aclose()


def _aws_session() -> Any:
    """One aiobotocore session for every store (it loads the service models once)."""
    from tests.reliability._stores import _aws_session as shared

    return shared()
