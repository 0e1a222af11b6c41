"""The stores the reliability suite runs against, and how to damage their records by hand.

A :class:`Target` builds a store (directly, or through an endpoint such as a fault proxy),
names the URL a worker process opens, and carries a :class:`Tamperer`, which rewrites the
backend's records behind the store's back the way a bad disk, an operator or an attacker
would. Tamperers work at the documented key layout of each store and use plain clients of
their own (files, sqlite3, redis-py, boto3, a bare asyncpg connection): they must not go
through the code they are checking.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import random
import sqlite3
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
from tests._file_records import LogRecord, checkpoint_record, run_record
from tests.reliability.faults import HTTP, POSTGRES, REDIS, Wire

REGION = "us-east-1"

FAST_RETRY = RetryPolicy(base_delay=0.001, max_delay=0.01, max_retries=5)
"""Driver retries quick enough that faults never eat a test's deadline."""


class Tamperer(ABC):
    """Rewrites one store's records in place. ``*_locator`` return the part of the store key
    (as a ``CorruptCheckpointError`` names it) that identifies the record."""

    repairs = True
    """Whether the store rebuilds damaged run records (``manager.repair``)."""

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

    def damage_run(self, run_key: str, rng: random.Random) -> None:
        """Make the run record unreadable, the way this store can tell: random bytes over it
        by default."""
        self.scramble_run(run_key, rng)

    @abstractmethod
    def close(self) -> None:
        """Release clients, and remove what the test wrote where later tests look."""


def _scrambled(raw: bytes, rng: random.Random) -> bytes:
    # Never equal to the original (a no-op would make the case pass vacuously).
    noise = rng.randbytes(len(raw))
    return noise if noise != raw else bytes(b ^ 0xFF for b in raw)


def _not_utf8(rng: random.Random) -> bytes:
    return b"\x9b" + rng.randbytes(15)


# -- file --------------------------------------------------------------------------------


class FileTamperer(Tamperer):
    """Records of the runs' logs (``runs/<key>/log``), replaced and damaged the way files
    were: a replacement is a commit of the log that puts the tampered bytes."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def checkpoint_locator(self, run_key: str, sequence: int) -> str:
        return f"runs/{run_key}/log:c/{sequence:020d}"

    def run_locator(self, run_key: str) -> str:
        return f"runs/{run_key}/log:run.rec"

    def _checkpoint(self, run_key: str, sequence: int) -> LogRecord:
        return checkpoint_record(self.root, run_key, sequence)

    def copy_checkpoint(self, source_run_key: str, target_run_key: str, sequence: int) -> None:
        data = self._checkpoint(source_run_key, sequence).read_bytes()
        self._checkpoint(target_run_key, sequence).write_bytes(data)

    def truncate_checkpoint(self, run_key: str, sequence: int) -> None:
        record = self._checkpoint(run_key, sequence)
        data = record.read_bytes()
        record.write_bytes(data[: len(data) // 2])

    def scramble_checkpoint(self, run_key: str, sequence: int, rng: random.Random) -> None:
        record = self._checkpoint(run_key, sequence)
        record.write_bytes(_scrambled(record.read_bytes(), rng))

    def save_run(self, run_key: str) -> bytes:
        return run_record(self.root, run_key).read_bytes()

    def replay_run(self, run_key: str, saved: Any) -> None:
        run_record(self.root, run_key).write_bytes(saved)

    def scramble_run(self, run_key: str, rng: random.Random) -> None:
        record = run_record(self.root, run_key)
        record.write_bytes(_scrambled(record.read_bytes(), rng))

    def close(self) -> None:
        pass  # the directory is the test's own


# -- SQLite ------------------------------------------------------------------------------


class SQLiteTamperer(Tamperer):
    """Rows of ``fc_checkpoints`` (keyed ``run_key, sequence``) and ``fc_runs`` (``run_key``),
    rewritten through a connection of its own. Every column is typed by a ``CHECK``, so damage
    keeps the types: bytes in the blobs, a shorter blob, another run's row."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def checkpoint_locator(self, run_key: str, sequence: int) -> str:
        return f"#fc_checkpoints/{run_key}/{sequence}"

    def run_locator(self, run_key: str) -> str:
        return f"#fc_runs/{run_key}"

    @contextlib.contextmanager
    def _db(self) -> Any:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        finally:
            db.close()

    def _checkpoint(self, db: sqlite3.Connection, run_key: str, sequence: int) -> list[Any]:
        row = db.execute(
            "SELECT checkpoint_id, created_at, expires_at, refs, header, payload "
            "FROM fc_checkpoints WHERE run_key = ? AND sequence = ?", (run_key, sequence)
        ).fetchone()
        assert row is not None, f"no checkpoint row ({run_key}, {sequence})"
        return list(row)

    def _put_checkpoint(self, db: sqlite3.Connection, run_key: str, sequence: int,
                        row: list[Any]) -> None:
        changed = db.execute(
            "UPDATE fc_checkpoints SET checkpoint_id = ?, created_at = ?, expires_at = ?, "
            "refs = ?, header = ?, payload = ? WHERE run_key = ? AND sequence = ?",
            (*row, run_key, sequence)).rowcount
        assert changed == 1

    def copy_checkpoint(self, source_run_key: str, target_run_key: str, sequence: int) -> None:
        with self._db() as db:
            row = self._checkpoint(db, source_run_key, sequence)
            self._put_checkpoint(db, target_run_key, sequence, row)

    def truncate_checkpoint(self, run_key: str, sequence: int) -> None:
        with self._db() as db:
            row = self._checkpoint(db, run_key, sequence)
            row[5] = row[5][: len(row[5]) // 2]
            self._put_checkpoint(db, run_key, sequence, row)

    def scramble_checkpoint(self, run_key: str, sequence: int, rng: random.Random) -> None:
        with self._db() as db:
            row = self._checkpoint(db, run_key, sequence)
            row[4], row[5] = _scrambled(row[4], rng), _scrambled(row[5], rng)
            self._put_checkpoint(db, run_key, sequence, row)

    def save_run(self, run_key: str) -> tuple[Any, ...]:
        with self._db() as db:
            row = db.execute("SELECT * FROM fc_runs WHERE run_key = ?", (run_key,)).fetchone()
        assert row is not None, f"no run row {run_key}"
        return tuple(row)

    def replay_run(self, run_key: str, saved: Any) -> None:
        marks = ", ".join("?" * len(saved))
        with self._db() as db:
            db.execute(f"INSERT OR REPLACE INTO fc_runs VALUES ({marks})", saved)

    def scramble_run(self, run_key: str, rng: random.Random) -> None:
        """Random bytes in the run row's blob, random text in its status; the typed columns
        (sequence, counts, times) cannot take bytes."""
        with self._db() as db:
            row = db.execute("SELECT status, data FROM fc_runs WHERE run_key = ?",
                             (run_key,)).fetchone()
            assert row is not None, f"no run row {run_key}"
            status = rng.randbytes(len(row[0])).hex()
            changed = db.execute("UPDATE fc_runs SET status = ?, data = ? WHERE run_key = ?",
                                 (status, _scrambled(row[1], rng), run_key)).rowcount
            assert changed == 1

    def scramble_run_id(self, run_key: str, rng: random.Random) -> None:
        """Random bytes (never UTF-8: they start with a continuation byte) in the run id's
        text column, as bit rot or a foreign writer would leave them."""
        with self._db() as db:
            changed = db.execute("UPDATE fc_runs SET run_id = CAST(? AS TEXT) WHERE run_key = ?",
                                 (_not_utf8(rng), run_key)).rowcount
            assert changed == 1

    def damage_run(self, run_key: str, rng: random.Random) -> None:
        """The run row gone while its checkpoints stay (an operator's ``DELETE``, a partial
        restore): the damage this store recognises (random bytes fit only its byte and text
        columns, which :meth:`scramble_run` covers)."""
        with self._db() as db:
            assert db.execute("DELETE FROM fc_runs WHERE run_key = ?", (run_key,)).rowcount == 1

    def close(self) -> None:
        pass  # the database is the test's own


# -- PostgreSQL --------------------------------------------------------------------------


class PostgresTamperer(Tamperer):
    """Rows of ``<schema>.fc_checkpoints`` (keyed ``run_key, sequence``) and ``fc_runs``,
    rewritten through an asyncpg connection of its own, on a thread of its own (the tests call
    it from inside their event loop)."""

    repairs = True

    def __init__(self, url: str, schema: str) -> None:
        self.url = url
        self.schema = schema
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pg-tamperer")

    def _table(self, name: str) -> str:
        return f'"{self.schema}"."fc_{name}"'

    def checkpoint_locator(self, run_key: str, sequence: int) -> str:
        return f"{self._table('checkpoints')} ({run_key}, {sequence})"

    def run_locator(self, run_key: str) -> str:
        return f"{self._table('runs')} ({run_key})"

    def _run(self, statements: Callable[[Any], Any]) -> Any:
        """``statements(connection)`` (a coroutine function) in one transaction."""
        import asyncpg

        async def run() -> Any:
            connection = await asyncpg.connect(self.url, timeout=10)
            try:
                async with connection.transaction():
                    return await statements(connection)
            finally:
                await connection.close()

        return self._pool.submit(asyncio.run, run()).result(60)

    def _rewrite_checkpoint(self, run_key: str, sequence: int,
                            change: Callable[[dict[str, Any]], dict[str, Any]],
                            source_run_key: str | None = None) -> None:
        table = self._table("checkpoints")

        async def statements(connection: Any) -> None:
            row = await connection.fetchrow(
                f"SELECT checkpoint_id, created_at, expires_at, header, payload, refs, token "
                f"FROM {table} WHERE run_key = $1 AND sequence = $2",
                source_run_key or run_key, sequence)
            assert row is not None, f"no checkpoint row ({source_run_key or run_key}, {sequence})"
            new = change(dict(row))
            status = await connection.execute(
                f"UPDATE {table} SET checkpoint_id = $3, created_at = $4, expires_at = $5, "
                f"header = $6, payload = $7, refs = $8, token = $9 "
                f"WHERE run_key = $1 AND sequence = $2",
                run_key, sequence, *new.values())
            assert status == "UPDATE 1", status

        self._run(statements)

    def copy_checkpoint(self, source_run_key: str, target_run_key: str, sequence: int) -> None:
        self._rewrite_checkpoint(target_run_key, sequence, lambda row: row, source_run_key)

    def truncate_checkpoint(self, run_key: str, sequence: int) -> None:
        def change(row: dict[str, Any]) -> dict[str, Any]:
            return {**row, "payload": row["payload"][: len(row["payload"]) // 2]}

        self._rewrite_checkpoint(run_key, sequence, change)

    def scramble_checkpoint(self, run_key: str, sequence: int, rng: random.Random) -> None:
        def change(row: dict[str, Any]) -> dict[str, Any]:
            return {**row, "header": _scrambled(row["header"], rng),
                    "payload": _scrambled(row["payload"], rng)}

        self._rewrite_checkpoint(run_key, sequence, change)

    def save_run(self, run_key: str) -> dict[str, Any]:
        table = self._table("runs")

        async def statements(connection: Any) -> dict[str, Any]:
            row = await connection.fetchrow(f"SELECT * FROM {table} WHERE run_key = $1", run_key)
            assert row is not None, f"no run row {run_key}"
            return dict(row)

        saved: dict[str, Any] = self._run(statements)
        return saved

    def replay_run(self, run_key: str, saved: Any) -> None:
        table = self._table("runs")
        names = [name for name in saved if name != "run_key"]
        assignments = ", ".join(f"{name} = ${n}" for n, name in enumerate(names, start=2))

        async def statements(connection: Any) -> None:
            status = await connection.execute(
                f"UPDATE {table} SET {assignments} WHERE run_key = $1",
                run_key, *(saved[name] for name in names))
            assert status == "UPDATE 1", status

        self._run(statements)

    def scramble_run(self, run_key: str, rng: random.Random) -> None:
        """Random bytes in the run row's details, random text in its status; the typed columns
        (sequence, counts, times) cannot take bytes."""
        table = self._table("runs")

        async def statements(connection: Any) -> None:
            row = await connection.fetchrow(
                f"SELECT status, data FROM {table} WHERE run_key = $1", run_key)
            assert row is not None, f"no run row {run_key}"
            status = await connection.execute(
                f"UPDATE {table} SET status = $2, data = $3 WHERE run_key = $1",
                run_key, rng.randbytes(len(row["status"])).hex(), _scrambled(row["data"], rng))
            assert status == "UPDATE 1", status

        self._run(statements)

    def scramble_run_id(self, run_key: str, rng: random.Random) -> None:
        """Random bytes (never UTF-8: they start with a continuation byte) for the run id."""
        table = self._table("runs")

        async def statements(connection: Any) -> None:
            status = await connection.execute(
                f"UPDATE {table} SET run_id = $2 WHERE run_key = $1", run_key, _not_utf8(rng))
            assert status == "UPDATE 1", status

        self._run(statements)

    def close(self) -> None:
        self._pool.shutdown()  # the schema is dropped by the fixture


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
    build: Callable[[str | None, RetryPolicy], CheckpointStore]
    """A new store; given an ``http://host:port`` endpoint, it talks to the backend there,
    with its driver retrying as the policy says."""
    url: str
    """What ``open_store`` in a worker process opens."""
    upstream: tuple[str, int] | None
    """The backend's address, for a fault proxy; ``None`` when there is no network."""
    wire: Wire | None
    tamperer: Tamperer

    def store(self, endpoint: str | None = None,
              retry: RetryPolicy = FAST_RETRY) -> CheckpointStore:
        return self.build(endpoint, retry)


def file_target(root: Path) -> Target:
    from fastcheckpoint import FileStore

    return Target("file", lambda _, __: FileStore(root), root.as_uri(), None, None,
                  FileTamperer(root))


def sqlite_target(path: Path) -> Target:
    from fastcheckpoint.stores.sqlite import SQLiteStore

    return Target("sqlite", lambda _, __: SQLiteStore(path), f"sqlite:///{path}", None, None,
                  SQLiteTamperer(path))


def postgres_target(url: str, schema: str) -> Target:
    """``url``: the database (``postgresql://user@host:port/db``); the store's tables live in
    ``schema``, which the caller provisions and drops."""
    from fastcheckpoint.stores.postgres import PostgresStore

    parts = urlsplit(url)

    def build(endpoint: str | None, retry: RetryPolicy) -> CheckpointStore:
        netloc = parts.netloc
        options = f"schema={schema}"
        if endpoint is not None:
            user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
            netloc = user + urlsplit(endpoint).netloc
            # Through the fault proxy: no pool minimum. With one, asyncpg's pool reconnects
            # in a task of its own after each cut, and closing the store while that task is
            # in the middle of a connection leaves a future of asyncpg's failed and never
            # read, which the test runner reports as an error of the test (a warning in an
            # application). Connections are still reused; none is kept open for nothing.
            options += "&min_size=0"
            # And no TLS probe: a query cancelled under a cut makes asyncpg open a connection of
            # its own to send the cancel request, which with the default ``sslmode=prefer``
            # starts with an SSL request. When that task is torn down while connecting, the
            # probe's future fails with "unexpected connection_lost() call" and is never read:
            # the runner reports it as an error of the test (a logged warning in an
            # application). The proxied server is plain TCP on 127.0.0.1 anyway.
            options += "&sslmode=disable"
        return PostgresStore.from_url(f"postgresql://{netloc}{parts.path}?{options}",
                                      retry=retry)

    return Target("postgres", build, f"{url}?schema={schema}", address(url), POSTGRES,
                  PostgresTamperer(url, schema))


def redis_target(url: str, prefix: str) -> Target:
    from fastcheckpoint.stores.redis import RedisStore

    parts = urlsplit(url)
    database = parts.path or "/0"

    def build(endpoint: str | None, retry: RetryPolicy) -> CheckpointStore:
        netloc = parts.netloc if endpoint is None else urlsplit(endpoint).netloc
        return RedisStore.from_url(f"redis://{netloc}{database}?prefix={prefix}", retry=retry)

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

    def build(endpoint: str | None, retry: RetryPolicy) -> CheckpointStore:
        return S3Store(bucket, prefix, region=REGION, endpoint_url=endpoint or moto,
                       retry=retry, session=_aws_session())

    url = f"s3://{bucket}/{prefix}?" + urlencode({"region": REGION, "endpoint_url": moto})
    return Target("s3", build, url, address(moto), HTTP, S3Tamperer(moto, bucket, prefix + "/"))


def dynamodb_target(moto: str, table: str, bucket: str, prefix: str) -> Target:
    from fastcheckpoint.stores.dynamodb import DynamoDBStore

    def build(endpoint: str | None, retry: RetryPolicy) -> CheckpointStore:
        return DynamoDBStore(table, bucket=bucket, prefix=prefix, region=REGION,
                             endpoint_url=endpoint or moto, retry=retry,
                             session=_aws_session())

    query = {"bucket": bucket, "prefix": prefix, "region": REGION, "endpoint_url": moto}
    return Target("dynamodb", build, f"dynamodb://{table}?{urlencode(query)}", address(moto),
                  HTTP, DynamoDBTamperer(moto, table))
