"""Side-by-side subjects for ``--compare``: FastAgentic's stores and LangGraph's savers.

Each runs with its library's default configuration (FastAgentic's manager prunes to 100 per
run like ours) in the same process run as the fastcheckpoint stores, so ratios are fair.
Install them with ``pip install -e '.[compare]'``; a missing one is reported and skipped.

Mapping to LangGraph: every top-level state key is a channel, plus ``messages``, and every
channel gets a new version on every step, so each ``aput`` stores the full state like a
fastcheckpoint create does. The checkpoint dict (id, timestamp, versions) is built before the
timer starts, as Pregel builds it before calling the saver: only ``aput`` is timed.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from benchmarks.content import Content
from benchmarks.subjects import FastcheckpointDriver, Operation, StoreTarget

__all__ = ["FastAgenticSubject", "LangGraphSubject", "comparison_subjects"]

INSTALL_HINT = "pip install -e '.[compare]'"


class _FastAgenticDriver(FastcheckpointDriver):
    """FastAgentic's manager has our API (we are its drop-in), so only ``held`` differs."""

    def __init__(self, manager: Any, store: Any) -> None:
        super().__init__(manager)
        self.store = store

    async def held(self, run_id: str) -> int:
        return len(await self.store.list_checkpoints(run_id, limit=1 << 30))


class _KeyErrorS3:
    """An aiobotocore S3 client whose missing keys raise ``KeyError``.

    FastAgentic's S3 store catches ``KeyError`` for "not found" (as some S3 wrappers raise);
    a stock client raises ``NoSuchKey``, which would crash its first ``load_latest``.
    """

    def __init__(self, client: Any) -> None:
        self._client = client

    async def get_object(self, **params: Any) -> Any:
        try:
            return await self._client.get_object(**params)
        except self._client.exceptions.NoSuchKey as exc:
            raise KeyError(params.get("Key")) from exc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


@dataclass
class FastAgenticSubject:
    kind: str
    """``memory``, ``file``, ``redis`` or ``s3``: the FastAgentic store of that kind."""
    scratch: str
    url: str = ""
    """For ``redis`` and ``s3``: our store's URL, whose server (and bucket) it shares."""
    system: str = "fastagentic"
    label: str = ""

    def __post_init__(self) -> None:
        names = {"memory": "InMemoryCheckpointStore", "file": "FileCheckpointStore",
                 "redis": "RedisCheckpointStore", "s3": "S3CheckpointStore"}
        self.label = f"FastAgentic {names[self.kind]}"

    @contextlib.asynccontextmanager
    async def session(self, keep: int | None) -> AsyncIterator[_FastAgenticDriver]:
        from fastagentic.checkpoint import CheckpointConfig, CheckpointManager

        config = CheckpointConfig(max_checkpoints_per_run=keep or 0)  # 0: FastAgentic keeps all
        async with self._store() as store:
            yield _FastAgenticDriver(CheckpointManager(store, config), store)

    @contextlib.asynccontextmanager
    async def _store(self) -> AsyncIterator[Any]:
        from fastagentic.checkpoint import (
            FileCheckpointStore,
            InMemoryCheckpointStore,
            RedisCheckpointStore,
            S3CheckpointStore,
        )

        token = secrets.token_hex(4)
        if self.kind == "memory":
            yield InMemoryCheckpointStore()
        elif self.kind == "file":
            directory = os.path.join(self.scratch, f"fastagentic-{token}")
            try:
                yield FileCheckpointStore(directory)
            finally:
                shutil.rmtree(directory, ignore_errors=True)
        elif self.kind == "redis":
            import redis.asyncio

            parts = urlsplit(self.url)
            client = redis.asyncio.Redis.from_url(urlunsplit(parts._replace(query="")))
            prefix = f"{dict(parse_qsl(parts.query)).get('prefix', 'fcbench')}-fa-{token}:"
            try:
                yield RedisCheckpointStore(client, prefix=prefix)
            finally:
                keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
                for start in range(0, len(keys), 1000):
                    await client.unlink(*keys[start:start + 1000])
                await client.aclose()
        else:
            from aiobotocore.session import get_session

            parts = urlsplit(self.url)
            query = dict(parse_qsl(parts.query))
            async with get_session().create_client(
                "s3", region_name=query.get("region"), endpoint_url=query.get("endpoint_url"),
            ) as client:
                yield S3CheckpointStore(
                    _KeyErrorS3(client), bucket=parts.netloc, prefix=f"fastagentic-{token}/")


class _LangGraphDriver:
    def __init__(self, saver: Any) -> None:
        from langgraph.checkpoint.base import empty_checkpoint

        self.saver = saver
        self._empty_checkpoint = empty_checkpoint
        self._head: dict[str, tuple[str, str, int]] = {}  # thread -> (checkpoint id, version, step)

    @staticmethod
    def _config(run_id: str, checkpoint_id: str | None = None) -> dict[str, Any]:
        configurable: dict[str, Any] = {"thread_id": run_id, "checkpoint_ns": ""}
        if checkpoint_id is not None:
            configurable["checkpoint_id"] = checkpoint_id
        return {"configurable": configurable}

    def prepare_create(self, run_id: str, content: Content) -> Operation:
        parent, version, step = self._head.get(run_id, (None, None, -1))
        version = self.saver.get_next_version(version, None)
        values = {**content.state, "messages": content.messages}
        checkpoint = self._empty_checkpoint()
        checkpoint["channel_values"] = values
        checkpoint["channel_versions"] = dict.fromkeys(values, version)
        checkpoint["updated_channels"] = list(values)
        metadata = {"source": "loop", "step": step + 1, "parents": {}}
        self._head[run_id] = (checkpoint["id"], version, step + 1)
        return functools.partial(
            self.saver.aput, self._config(run_id, parent), checkpoint, metadata,
            dict(checkpoint["channel_versions"]),
        )

    def prepare_restore(self, run_id: str) -> Operation:
        return functools.partial(self.saver.aget_tuple, self._config(run_id))

    def prepare_list(self, run_id: str) -> Operation:
        config = self._config(run_id)

        async def listing() -> list[Any]:
            return [item async for item in self.saver.alist(config, limit=100)]

        return listing

    async def held(self, run_id: str) -> int:
        return len([item async for item in self.saver.alist(self._config(run_id))])


_SAVER_NAMES = {
    "memory": "InMemorySaver",
    "sqlite": "AsyncSqliteSaver",
    "sqlite-normal": "AsyncSqliteSaver (synchronous=NORMAL)",
    "postgres": "AsyncPostgresSaver",
    "dynamodb": "DynamoDBSaver (AWS)",
}
_SQLITE_SYNCHRONOUS = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


@dataclass
class LangGraphSubject:
    kind: str
    """``memory`` (InMemorySaver), ``sqlite`` (AsyncSqliteSaver on a file in WAL mode, as
    its ``setup`` leaves it, SQLite's default ``synchronous=FULL``), ``sqlite-normal`` (the
    same with ``synchronous=NORMAL``), ``postgres`` (AsyncPostgresSaver on the database of
    our PostgreSQL store) or ``dynamodb`` (langgraph-checkpoint-aws's DynamoDBSaver on our
    DynamoDB store's endpoint, in a table of its own)."""
    scratch: str
    url: str = ""
    """For ``postgres`` and ``dynamodb``: our store's URL, whose server it shares."""
    system: str = "langgraph"
    label: str = ""
    only: tuple[str, ...] | None = None
    """Workloads it takes part in (``None``: every comparable one)."""
    settings: str = ""
    """What the saver ran with (SQLite's journal mode and synchronous), read from it."""

    def __post_init__(self) -> None:
        self.label = f"LangGraph {_SAVER_NAMES[self.kind]}"

    @contextlib.asynccontextmanager
    async def session(self, keep: int | None) -> AsyncIterator[_LangGraphDriver]:
        async with self.saver() as saver:
            yield _LangGraphDriver(saver)

    @contextlib.asynccontextmanager
    async def saver(self) -> AsyncIterator[Any]:
        """A fresh saver (and, where it has one, a fresh database file or table)."""
        if self.kind == "memory":
            from langgraph.checkpoint.memory import InMemorySaver

            yield InMemorySaver()
        elif self.kind in ("sqlite", "sqlite-normal"):
            async with self._sqlite() as saver:
                yield saver
        elif self.kind == "postgres":
            from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

            parts = urlsplit(self.url)
            conninfo = urlunsplit(parts._replace(scheme="postgresql", query=""))
            async with AsyncPostgresSaver.from_conn_string(conninfo) as saver:
                await saver.setup()
                yield saver
        else:
            async with self._dynamodb() as saver:
                yield saver

    @contextlib.asynccontextmanager
    async def _sqlite(self) -> AsyncIterator[Any]:
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

        path = os.path.join(self.scratch, f"langgraph-{secrets.token_hex(4)}.sqlite")
        try:
            async with AsyncSqliteSaver.from_conn_string(path) as saver:
                await saver.setup()
                if self.kind == "sqlite-normal":
                    await saver.conn.execute("PRAGMA synchronous = NORMAL")
                mode = await (await saver.conn.execute("PRAGMA journal_mode")).fetchone()
                sync = await (await saver.conn.execute("PRAGMA synchronous")).fetchone()
                self.settings = (f"journal_mode={mode[0]}, "
                                 f"synchronous={_SQLITE_SYNCHRONOUS.get(sync[0], sync[0])}")
                saver.fcbench_path = path  # for the bytes it stores (benchmarks.graph)
                yield saver
        finally:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path + suffix)

    @contextlib.asynccontextmanager
    async def _dynamodb(self) -> AsyncIterator[Any]:
        from aiobotocore.session import get_session
        from langgraph_checkpoint_aws import DynamoDBSaver

        query = dict(parse_qsl(urlsplit(self.url).query))
        region, endpoint = query.get("region", "us-east-1"), query.get("endpoint_url")
        table = f"fcbench-lg-{secrets.token_hex(4)}"
        async with get_session().create_client(
            "dynamodb", region_name=region, endpoint_url=endpoint) as client:
            await client.create_table(
                TableName=table, BillingMode="PAY_PER_REQUEST",
                AttributeDefinitions=[{"AttributeName": "PK", "AttributeType": "S"},
                                      {"AttributeName": "SK", "AttributeType": "S"}],
                KeySchema=[{"AttributeName": "PK", "KeyType": "HASH"},
                           {"AttributeName": "SK", "KeyType": "RANGE"}],
            )
            await client.get_waiter("table_exists").wait(TableName=table)
            try:
                saver = DynamoDBSaver(table_name=table, region_name=region, endpoint_url=endpoint)
                saver.fcbench_table = table  # for the bytes it stores (benchmarks.graph)
                yield saver
            finally:
                await client.delete_table(TableName=table)


def comparison_subjects(
    scratch: str, targets: Sequence[StoreTarget] = ()
) -> tuple[list[Any], list[str]]:
    """The comparison subjects whose packages import, and a note for each that does not.

    FastAgentic's Redis and S3 stores run when one of ``targets`` is a Redis or S3 store, and
    LangGraph's AsyncPostgresSaver and AWS's DynamoDBSaver when one is a PostgreSQL or DynamoDB
    store: they use the same server (and bucket, database, endpoint), so the comparison
    measures the libraries, not servers.
    """
    subjects: list[Any] = []
    notes: list[str] = []
    try:
        import fastagentic.checkpoint  # noqa: F401
    except ImportError as exc:
        notes.append(f"FastAgentic skipped: cannot import it ({exc}); run: {INSTALL_HINT}")
    else:
        subjects += [FastAgenticSubject("memory", scratch), FastAgenticSubject("file", scratch)]
        network = {target.kind: target.url for target in targets if target.kind in ("redis", "s3")}
        subjects += [FastAgenticSubject(kind, scratch, url) for kind, url in network.items()]
    try:
        import langgraph.checkpoint.memory
    except ImportError as exc:
        notes.append(f"LangGraph InMemorySaver skipped: cannot import it ({exc}); "
                     f"run: {INSTALL_HINT}")
    else:
        subjects.append(LangGraphSubject("memory", scratch))
    try:
        import aiosqlite  # noqa: F401
        import langgraph.checkpoint.sqlite.aio
    except ImportError as exc:
        notes.append(f"LangGraph AsyncSqliteSaver skipped: cannot import it ({exc}); "
                     f"run: {INSTALL_HINT}")
    else:
        subjects.append(LangGraphSubject("sqlite", scratch))
        if any(target.kind == "sqlite-normal" for target in targets):
            subjects.append(LangGraphSubject("sqlite-normal", scratch))
    for target in targets:
        if target.kind == "postgres":
            try:
                import langgraph.checkpoint.postgres.aio  # noqa: F401
                import psycopg  # noqa: F401
            except ImportError as exc:
                notes.append(f"LangGraph AsyncPostgresSaver skipped: cannot import it ({exc}); "
                             f"run: {INSTALL_HINT}")
            else:
                subjects.append(LangGraphSubject("postgres", scratch, target.url))
            break
    for target in targets:
        if target.kind == "dynamodb":
            try:
                import langgraph_checkpoint_aws  # noqa: F401
            except ImportError as exc:
                notes.append(f"AWS's LangGraph DynamoDBSaver skipped: cannot import it ({exc}); "
                             f"run: {INSTALL_HINT}")
            else:  # the graph workload only: W1's 1,000 creates on moto take minutes
                subjects.append(LangGraphSubject("dynamodb", scratch, target.url, only=("G1",)))
            break
    return subjects, notes
