"""The stores the reliability suite runs against, and how to damage their records by hand.

A :class:`Target` builds a store (directly, or through an endpoint such as a fault proxy),
names the URL a worker process opens, and carries a :class:`Tamperer`, which rewrites the
backend's records behind the store's back the way a bad disk, an operator or an attacker
would. Tamperers work at the documented key layout of each store and use plain synchronous
clients (files, redis-py, boto3): they must not go through the code they are checking.
"""

from __future__ import annotations

import functools
import os
import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from fastcheckpoint import CheckpointStore
from fastcheckpoint._config import RetryPolicy
from fastcheckpoint.stores import _dynamodb_layout as dynamodb_layout
from fastcheckpoint.stores import _s3_layout as s3_layout
from tests.reliability.faults import HTTP, REDIS, Wire

REGION = "us-east-1"

FAST_RETRY = RetryPolicy(base_delay=0.001, max_delay=0.01, max_retries=5)
"""Driver retries quick enough that faults never eat a test's deadline."""


class Tamperer(ABC):
    """Rewrites one store's records in place. ``*_locator`` return the part of the store key
    (as a ``CorruptCheckpointError`` names it) that identifies the record."""

    @abstractmethod
    def checkpoint_locator(self, run_key: str, sequence: int) -> str: ...

    @abstractmethod
    def run_locator(self, run_key: str) -> str: ...

    @abstractmethod
    def copy_checkpoint(self, source_run_key: str, target_run_key: str, sequence: int) -> None:
        """Put the source run's checkpoint ``sequence`` where the target run's one is."""

    @abstractmethod
    def truncate_checkpoint(self, run_key: str, sequence: int) -> None: ...

    @abstractmethod
    def scramble_checkpoint(self, run_key: str, sequence: int, rng: random.Random) -> None:
        """Overwrite the record's bytes with random ones of the same length."""

    @abstractmethod
    def save_run(self, run_key: str) -> Any:
        """The run record as stored, for :meth:`replay_run`."""

    @abstractmethod
    def replay_run(self, run_key: str, saved: Any) -> None:
        """Write back a run record saved earlier."""

    @abstractmethod
    def scramble_run(self, run_key: str, rng: random.Random) -> None: ...

    @abstractmethod
    def close(self) -> None:
        """Release clients, and remove what the test wrote where later tests look."""


def _scrambled(raw: bytes, rng: random.Random) -> bytes:
    # Never equal to the original (a no-op would make the case pass vacuously).
    noise = rng.randbytes(len(raw))
    return noise if noise != raw else bytes(b ^ 0xFF for b in raw)


# -- file --------------------------------------------------------------------------------


class FileTamperer(Tamperer):
    def __init__(self, root: Path) -> None:
        self.root = root

    def checkpoint_locator(self, run_key: str, sequence: int) -> str:
        return f"runs/{run_key}/c/{sequence:020d}"

    def run_locator(self, run_key: str) -> str:
        return f"runs/{run_key}/run.rec"

    def _path(self, locator: str) -> Path:
        return self.root / locator

    def copy_checkpoint(self, source_run_key: str, target_run_key: str, sequence: int) -> None:
        data = self._path(self.checkpoint_locator(source_run_key, sequence)).read_bytes()
        self._path(self.checkpoint_locator(target_run_key, sequence)).write_bytes(data)

    def truncate_checkpoint(self, run_key: str, sequence: int) -> None:
        path = self._path(self.checkpoint_locator(run_key, sequence))
        os.truncate(path, path.stat().st_size // 2)

    def scramble_checkpoint(self, run_key: str, sequence: int, rng: random.Random) -> None:
        path = self._path(self.checkpoint_locator(run_key, sequence))
        path.write_bytes(_scrambled(path.read_bytes(), rng))

    def save_run(self, run_key: str) -> bytes:
        return self._path(self.run_locator(run_key)).read_bytes()

    def replay_run(self, run_key: str, saved: Any) -> None:
        self._path(self.run_locator(run_key)).write_bytes(saved)

    def scramble_run(self, run_key: str, rng: random.Random) -> None:
        path = self._path(self.run_locator(run_key))
        path.write_bytes(_scrambled(path.read_bytes(), rng))

    def close(self) -> None:
        pass  # the directory is the test's own


# -- Redis -------------------------------------------------------------------------------


class RedisTamperer(Tamperer):
    """Checkpoint hashes hold ``i t e h p w`` (id, created, expiry, header, payload, token);
    the run hash ``rid inc st ct ut ls exp v d m tk``."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url)
        self.prefix = prefix
        self._ns = prefix if prefix.endswith(":") else prefix + ":"

    def checkpoint_locator(self, run_key: str, sequence: int) -> str:
        return f"{{{run_key}}}:c:{sequence}"

    def run_locator(self, run_key: str) -> str:
        return f"{{{run_key}}}:run"

    def _key(self, locator: str) -> str:
        return self._ns + locator

    def _fields(self, key: str) -> dict[bytes, bytes]:
        fields = {bytes(name): bytes(value)  # type: ignore[arg-type]  # no decode_responses
                  for name, value in self.client.hgetall(key).items()}
        assert fields, f"no record at {key}"
        return fields

    def _rewrite(self, key: str, fields: dict[bytes, bytes]) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(key)
        pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
        pipe.execute()

    def copy_checkpoint(self, source_run_key: str, target_run_key: str, sequence: int) -> None:
        fields = self._fields(self._key(self.checkpoint_locator(source_run_key, sequence)))
        self._rewrite(self._key(self.checkpoint_locator(target_run_key, sequence)), fields)

    def truncate_checkpoint(self, run_key: str, sequence: int) -> None:
        key = self._key(self.checkpoint_locator(run_key, sequence))
        fields = self._fields(key)
        fields[b"p"] = fields[b"p"][: len(fields[b"p"]) // 2]
        self._rewrite(key, fields)

    def scramble_checkpoint(self, run_key: str, sequence: int, rng: random.Random) -> None:
        key = self._key(self.checkpoint_locator(run_key, sequence))
        fields = self._fields(key)
        for name in (b"h", b"p"):
            fields[name] = _scrambled(fields[name], rng)
        self._rewrite(key, fields)

    def save_run(self, run_key: str) -> dict[bytes, bytes]:
        return self._fields(self._key(self.run_locator(run_key)))

    def replay_run(self, run_key: str, saved: Any) -> None:
        self._rewrite(self._key(self.run_locator(run_key)), saved)

    def scramble_run(self, run_key: str, rng: random.Random) -> None:
        key = self._key(self.run_locator(run_key))
        fields = self._fields(key)
        self._rewrite(key, {name: _scrambled(value, rng) if value else value
                            for name, value in fields.items()})

    def close(self) -> None:
        keys = list(self.client.scan_iter(match=f"{self._ns}*", count=500))
        for start in range(0, len(keys), 500):
            self.client.unlink(*keys[start : start + 500])
        self.client.close()


# -- S3 ----------------------------------------------------------------------------------


class S3Tamperer(Tamperer):
    def __init__(self, endpoint: str, bucket: str, prefix: str) -> None:
        import boto3  # type: ignore[import-untyped]

        self.client = boto3.client("s3", region_name=REGION, endpoint_url=endpoint)
        self.bucket = bucket
        self.prefix = prefix

    def checkpoint_locator(self, run_key: str, sequence: int) -> str:
        return s3_layout.slot_key(run_key, sequence)

    def run_locator(self, run_key: str) -> str:
        return s3_layout.run_object(run_key)

    def _get(self, locator: str) -> bytes:
        body: bytes = self.client.get_object(
            Bucket=self.bucket, Key=self.prefix + locator)["Body"].read()
        return body

    def _put(self, locator: str, body: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + locator, Body=body)

    def copy_checkpoint(self, source_run_key: str, target_run_key: str, sequence: int) -> None:
        body = self._get(self.checkpoint_locator(source_run_key, sequence))
        self._put(self.checkpoint_locator(target_run_key, sequence), body)

    def truncate_checkpoint(self, run_key: str, sequence: int) -> None:
        locator = self.checkpoint_locator(run_key, sequence)
        body = self._get(locator)
        self._put(locator, body[: len(body) // 2])

    def scramble_checkpoint(self, run_key: str, sequence: int, rng: random.Random) -> None:
        locator = self.checkpoint_locator(run_key, sequence)
        self._put(locator, _scrambled(self._get(locator), rng))

    def save_run(self, run_key: str) -> bytes:
        return self._get(self.run_locator(run_key))

    def replay_run(self, run_key: str, saved: Any) -> None:
        self._put(self.run_locator(run_key), saved)

    def scramble_run(self, run_key: str, rng: random.Random) -> None:
        locator = self.run_locator(run_key)
        self._put(locator, _scrambled(self._get(locator), rng))

    def close(self) -> None:
        self.client.close()


# -- DynamoDB ----------------------------------------------------------------------------


class DynamoDBTamperer(Tamperer):
    """Checkpoint items hold ``cid ca hdr pl`` (and ``x``, ``bl``); the run item ``rid inc st
    ca ua ls cnt ver dat rev bk`` (``bk``: the book of held checkpoints)."""

    def __init__(self, endpoint: str, table: str) -> None:
        import boto3

        self.client = boto3.client("dynamodb", region_name=REGION, endpoint_url=endpoint)
        self.table = table
        self._touched: set[str] = set()

    def checkpoint_locator(self, run_key: str, sequence: int) -> str:
        return f"{dynamodb_layout.partition(run_key)}/{dynamodb_layout.checkpoint_sk(sequence)}"

    def run_locator(self, run_key: str) -> str:
        return f"{dynamodb_layout.partition(run_key)}/{dynamodb_layout.RUN_SK}"

    def _get(self, run_key: str, sort_key: str) -> dict[str, Any]:
        self._touched.add(run_key)
        key = {"PK": {"S": dynamodb_layout.partition(run_key)}, "SK": {"S": sort_key}}
        item: dict[str, Any] | None = self.client.get_item(
            TableName=self.table, Key=key, ConsistentRead=True).get("Item")
        assert item is not None, f"no item {key}"
        return item

    def _put(self, item: dict[str, Any]) -> None:
        self.client.put_item(TableName=self.table, Item=item)

    def copy_checkpoint(self, source_run_key: str, target_run_key: str, sequence: int) -> None:
        item = self._get(source_run_key, dynamodb_layout.checkpoint_sk(sequence))
        self._touched.add(target_run_key)
        self._put({**item, "PK": {"S": dynamodb_layout.partition(target_run_key)}})

    def _rewrite_payload(self, run_key: str, sequence: int,
                         change: Callable[[bytes], bytes], names: tuple[str, ...]) -> None:
        item = self._get(run_key, dynamodb_layout.checkpoint_sk(sequence))
        assert "pl" in item, "the checkpoint's payload is in S3, not in the item"
        for name in names:
            item[name] = {"B": change(item[name]["B"])}
        self._put(item)

    def truncate_checkpoint(self, run_key: str, sequence: int) -> None:
        self._rewrite_payload(run_key, sequence, lambda raw: raw[: len(raw) // 2], ("pl",))

    def scramble_checkpoint(self, run_key: str, sequence: int, rng: random.Random) -> None:
        self._rewrite_payload(
            run_key, sequence, lambda raw: _scrambled(raw, rng), ("hdr", "pl"))

    def save_run(self, run_key: str) -> dict[str, Any]:
        return self._get(run_key, dynamodb_layout.RUN_SK)

    def replay_run(self, run_key: str, saved: Any) -> None:
        self._put(saved)

    def scramble_run(self, run_key: str, rng: random.Random) -> None:
        item = self._get(run_key, dynamodb_layout.RUN_SK)
        for name, value in list(item.items()):
            if "B" in value:
                item[name] = {"B": _scrambled(value["B"], rng) if value["B"] else b"\xff"}
        self._put(item)

    def close(self) -> None:
        """Remove the runs it damaged: the table is shared by the session's tests, and a
        damaged run left behind would be every later test's problem."""
        for run_key in self._touched:
            self._remove_partition(dynamodb_layout.partition(run_key))
        self.client.close()

    def _remove_partition(self, partition: str) -> None:
        pages = self.client.get_paginator("query").paginate(
            TableName=self.table, KeyConditionExpression="PK = :pk",
            ExpressionAttributeValues={":pk": {"S": partition}},
            ProjectionExpression="PK, SK")
        for page in pages:
            for item in page["Items"]:
                self.client.delete_item(TableName=self.table, Key=item)


# -- targets -----------------------------------------------------------------------------


@dataclass
class Target:
    """One store under test."""

    name: str
    build: Callable[[str | None], CheckpointStore]
    """A new store; given an ``http://host:port`` endpoint, it talks to the backend there."""
    url: str
    """What ``open_store`` in a worker process opens."""
    upstream: tuple[str, int] | None
    """The backend's address, for a fault proxy; ``None`` when there is no network."""
    wire: Wire | None
    tamperer: Tamperer

    def store(self, endpoint: str | None = None) -> CheckpointStore:
        return self.build(endpoint)


def file_target(root: Path) -> Target:
    from fastcheckpoint import FileStore

    return Target("file", lambda _: FileStore(root), root.as_uri(), None, None,
                  FileTamperer(root))


def redis_target(url: str, prefix: str) -> Target:
    from fastcheckpoint.stores.redis import RedisStore

    parts = urlsplit(url)
    database = parts.path or "/0"

    def build(endpoint: str | None) -> CheckpointStore:
        netloc = parts.netloc if endpoint is None else urlsplit(endpoint).netloc
        return RedisStore.from_url(f"redis://{netloc}{database}?prefix={prefix}",
                                   retry=FAST_RETRY)

    return Target("redis", build, f"{url}?prefix={prefix}", address(url), REDIS,
                  RedisTamperer(url, prefix))


def address(url: str) -> tuple[str, int]:
    """Host and port of a server URL (``redis://h:p/0``, ``http://h:p``)."""
    parts = urlsplit(url)
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"no host and port in {url!r}")
    return parts.hostname, parts.port


@functools.cache
def _aws_session() -> Any:
    """One botocore session for every AWS store of the suite: it loads the service models
    once, where each new session spends a second or two on it."""
    from aiobotocore.session import get_session

    return get_session()


def s3_target(moto: str, bucket: str, prefix: str) -> Target:
    from fastcheckpoint.stores.s3 import S3Store

    def build(endpoint: str | None) -> CheckpointStore:
        return S3Store(bucket, prefix, region=REGION, endpoint_url=endpoint or moto,
                       retry=FAST_RETRY, session=_aws_session())

    url = f"s3://{bucket}/{prefix}?" + urlencode({"region": REGION, "endpoint_url": moto})
    return Target("s3", build, url, address(moto), HTTP, S3Tamperer(moto, bucket, prefix + "/"))


def dynamodb_target(moto: str, table: str, bucket: str, prefix: str) -> Target:
    from fastcheckpoint.stores.dynamodb import DynamoDBStore

    def build(endpoint: str | None) -> CheckpointStore:
        return DynamoDBStore(table, bucket=bucket, prefix=prefix, region=REGION,
                             endpoint_url=endpoint or moto, retry=FAST_RETRY,
                             session=_aws_session())

    query = {"bucket": bucket, "prefix": prefix, "region": REGION, "endpoint_url": moto}
    return Target("dynamodb", build, f"dynamodb://{table}?{urlencode(query)}", address(moto),
                  HTTP, DynamoDBTamperer(moto, table))
