"""Helpers of the Redis tests: building stores on the chosen server, counting round trips,
cleaning up only this session's keys, and a loopback proxy that cuts connections."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar

import msgspec
import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection

from fastcheckpoint._config import RetryPolicy
from fastcheckpoint.stores import Item, RunRecord
from fastcheckpoint.stores._redis_lua import INDEX, INTENT, SCRIPTS
from fastcheckpoint.stores.redis import RedisStore
from fastcheckpoint.testing import T0, key_of, make_checkpoint
from tests.stores.conftest import RedisTarget

_counter = itertools.count()
_fake_server: Any = None

FAST_RETRY = RetryPolicy(base_delay=0.01, max_delay=0.05, max_retries=2)


class CountingConnection(Connection):
    """Counts round trips: every write of one or more packed commands to the socket is one
    request/response exchange (a pipeline is written in one go). Records the commands too."""

    round_trips: ClassVar[int] = 0
    commands: ClassVar[list[tuple[bytes, ...]]] = []

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).round_trips += 1
        await super().send_packed_command(command, check_health)

    def pack_command(self, *args: Any) -> list[bytes]:
        words = [arg if isinstance(arg, bytes) else str(arg).encode() for arg in args]
        # redis-py passes subcommands joined ("SCRIPT LOAD"): record them as Redis sees them.
        type(self).commands.append((*words[0].split(b" "), *words[1:]))
        return super().pack_command(*args)


def counting_connection_class() -> type[CountingConnection]:
    """A fresh subclass, so counts of one test never mix with another's."""
    return type("Counting", (CountingConnection,), {"round_trips": 0, "commands": []})


def unique_prefix(target: RedisTarget) -> str:
    return f"{target.prefix}-{next(_counter)}"


def make_store(target: RedisTarget, prefix: str, **options: Any) -> RedisStore:
    if target.kind == "fakeredis":
        import fakeredis

        global _fake_server
        if _fake_server is None:
            _fake_server = fakeredis.FakeServer()
        client = fakeredis.FakeAsyncRedis(server=_fake_server)
        cluster = options.pop("cluster", None)
        return RedisStore(
            client, prefix=prefix, cluster=cluster, owns_client=True, script_flags=False, **options
        )
    query = f"prefix={prefix}"
    if options.pop("cluster", None):
        query += "&cluster=false"
        return _split_index_store(target, prefix, **options)
    return RedisStore.from_url(f"{target.url}?{query}", **options)


def _split_index_store(target: RedisTarget, prefix: str, **options: Any) -> RedisStore:
    """A store on a plain server that runs the Redis Cluster code path: run scripts return
    their index changes and the client applies them in a second call."""
    client = aioredis.Redis.from_url(target.url, **options)
    return RedisStore(client, prefix=prefix, cluster=True, owns_client=True)


async def delete_prefix(client: Any, prefix: str) -> int:
    """Deletes this test's keys only: everything under ``<prefix>:``."""
    removed = 0
    batch: list[bytes] = []
    async for key in client.scan_iter(match=f"{prefix}:*", count=500):
        batch.append(key)
        if len(batch) >= 500:
            removed += await client.unlink(*batch)
            batch = []
    if batch:
        removed += await client.unlink(*batch)
    return int(removed)


async def keys_under(client: Any, prefix: str) -> list[bytes]:
    return sorted([key async for key in client.scan_iter(match=f"{prefix}:*", count=500)])


class CuttingProxy:
    """A loopback TCP proxy to a Redis server that cuts connections on purpose.

    ``cut_plan`` decides, per client->server chunk that carries an ``EVALSHA``, what happens:
    ``"pass"``, ``"drop"`` (close both sides before forwarding: the server never sees the
    request) or ``"lose-reply"`` (forward the request, then close before the reply comes back:
    applied but unacknowledged). ``on_lost_reply``, when given, runs after the server applied
    a request whose reply is lost and before the client can retry: what another client does
    in between.
    """

    def __init__(self, upstream_host: str, upstream_port: int,
                 cut_plan: Sequence[str] | None = None,
                 on_lost_reply: Callable[[], Awaitable[None]] | None = None) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.on_lost_reply = on_lost_reply
        self.plan = list(cut_plan or [])
        self.chunks = 0
        self.cuts = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def _next_action(self, data: bytes) -> str:
        # Only chunks carrying a store operation follow the plan; connection handshakes pass,
        # so that a retry on a fresh connection meets the plan's next entry, not a cut.
        if b"EVALSHA" not in data:
            return "pass"
        action = self.plan[self.chunks] if self.chunks < len(self.plan) else "pass"
        self.chunks += 1
        return action

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        closed = asyncio.Event()

        async def downstream() -> None:
            try:
                while data := await up_reader.read(65536):
                    if closed.is_set():
                        return
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                closed.set()

        task = asyncio.create_task(downstream())
        try:
            while data := await reader.read(65536):
                action = self._next_action(data)
                if action == "drop":
                    self.cuts += 1
                    break
                up_writer.write(data)
                await up_writer.drain()
                if action == "lose-reply":
                    self.cuts += 1
                    closed.set()
                    # Let the server run the command before the cut, so it is applied.
                    await asyncio.sleep(0.05)
                    if self.on_lost_reply is not None:
                        await self.on_lost_reply()
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            closed.set()
            for stream in (writer, up_writer):
                stream.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


# -- shared by the Redis test modules ------------------------------------------------------


def real_server(target: RedisTarget) -> None:
    """Skip a test that needs a real redis-server when only fakeredis is there."""
    if target.kind == "fakeredis":
        pytest.skip("needs a real redis-server (fakeredis was chosen)")


async def append(store: RedisStore, run: RunRecord, sequence: int, *, now: float = T0,
                 expires_at: float | None = None, keep_latest: int | None = None,
                 payload: bytes | None = None) -> None:
    """Append checkpoint ``sequence`` of ``run`` (built by ``make_checkpoint``)."""
    await store.append(key_of(run), make_checkpoint(run, sequence, created_at=now,
                                                     expires_at=expires_at, payload=payload),
                       run=run, keep_latest=keep_latest, now=now)


async def append_with_items(
    store: RedisStore, run: RunRecord, sequence: int, *, now: float = T0,
    expires_at: float | None = None, keep_latest: int | None = None,
    refs: Sequence[str] = (), items: Sequence[Item] = (), labels: tuple[str, ...] = (),
) -> str:
    """Append checkpoint ``sequence`` of ``run`` with ``refs`` and ``items``; ``labels`` go
    into the seed."""
    record = msgspec.structs.replace(
        make_checkpoint(run, sequence, created_at=now, expires_at=expires_at), refs=tuple(refs))
    seed = msgspec.structs.replace(run, labels=labels)
    return await store.append_with_items(key_of(run), record, run=seed,
                                         keep_latest=keep_latest, now=now, items=items)


async def load_scripts(client: Any) -> None:
    """Load every script up front, so counts see the steady state, not the NOSCRIPT path."""
    for text in [*SCRIPTS.values(), INDEX, INTENT]:
        await client.script_load(text)


async def round_trips(counter: type[CountingConnection], action: Callable[[], Any]) -> int:
    before = counter.round_trips
    await action()
    return counter.round_trips - before


def host_and_port(target: RedisTarget) -> tuple[str, int]:
    host, port = target.url.split("//", 1)[1].split("/", 1)[0].split(":")
    return host, int(port)
