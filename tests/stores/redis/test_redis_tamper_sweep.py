"""A seeded sweep of edits to one run's keys (fields, log and item entries, counts, refs,
checkpoint fields) followed by one store call: every call either completes or raises a
`CheckpointError`, and a write that raises leaves every key of the run as it was. Redis does
not undo the writes of a script that fails halfway, so a script must never fail after its
first write."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec
import pytest

from fastcheckpoint.errors import CheckpointError
from fastcheckpoint.stores.redis import RedisStore
from fastcheckpoint.testing import (
    T0,
    checkpoint_id_of,
    key_of,
    make_checkpoint,
    make_item,
    make_run,
)
from tests.stores._redis_support import make_store, real_server
from tests.stores.conftest import RedisTarget

pytestmark = pytest.mark.anyio

_SEEDS = range(240)
_TEXT = [b"x", b"", b"\xff\xfe", b"-1", b"1e400", b"nan", b"inf", b"0x10", b"[1]", b'{"a":1}',
         b"99999999999999999999", b"1.5", b" 5", b"[null]", b'["K",{}]', b"-inf", None]
_SCORES = [float("inf"), float("-inf"), -1, 0.5, 1e18, 100, 2, 1]
_FIELDS = {"run": ["rid", "inc", "st", "ct", "ut", "ls", "v", "d", "m", "lb"],
           "due": ["s", "m"], "iv": ["K", "P", "zz"], "ir": ["K", "P", "zz"],
           "cr": ["0", "1", "2", "x"], "c:0": list("itehpqw"), "c:1": list("itehpqw")}
_MEMBERS = [b"0", b"1", b"3", b"x", b"K", b"P", b"P/1", b"o0", b"zz"]
_WRITES = ["append", "append_prune", "delete", "delete_run", "update_run", "put_items",
           "put_owned", "delete_items", "purge"]


@pytest.fixture
def anyio_backend() -> str:
    # redis.asyncio runs on asyncio only.
    return "asyncio"


async def _seed_run(store: RedisStore, run: Any) -> None:
    rk = key_of(run)
    first = msgspec.structs.replace(make_checkpoint(run, 0, expires_at=T0 + 10), refs=("K",))
    await store.append_with_items(rk, first, run=run, keep_latest=None, now=T0,
                                  items=[make_item("K"), make_item("o0", owner=0)])
    second = msgspec.structs.replace(make_checkpoint(run, 1, expires_at=T0 + 1000),
                                     refs=("K", "P"))
    await store.append_with_items(rk, second, run=run, keep_latest=None, now=T0,
                                  items=[make_item("P"), make_item("P/1")])
    await store.put_items(rk, [make_item("L", expires_at=T0 + 5)], now=T0)


async def _edit(client: Any, base: str, rnd: random.Random) -> None:
    for _ in range(rnd.randint(1, 4)):
        if rnd.random() < 0.6:
            name = rnd.choice(list(_FIELDS))
            field, value = rnd.choice(_FIELDS[name]), rnd.choice(_TEXT)
            if value is None:
                await client.hdel(base + name, field)
            else:
                await client.hset(base + name, field, value)
        else:
            name = rnd.choice(["seq", "exp", "ik", "io", "ie"])
            await client.zadd(base + name, {rnd.choice(_MEMBERS): rnd.choice(_SCORES)})


def _call(store: RedisStore, run: Any, operation: str, now: float) -> Awaitable[object]:
    rk = key_of(run)
    third = msgspec.structs.replace(make_checkpoint(run, 2, expires_at=T0 + 2000), refs=("K",))
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "append": lambda: store.append_with_items(
            rk, third, run=run, keep_latest=None, now=now, items=[make_item("Q")]),
        "append_prune": lambda: store.append_with_items(
            rk, third, run=run, keep_latest=1, now=now, items=[make_item("Q")]),
        "delete": lambda: store.delete(rk, 1, checkpoint_id=checkpoint_id_of(run, 1)),
        "delete_run": lambda: store.delete_run(rk),
        "update_run": lambda: store.update_run(rk, incarnation=run.incarnation, version=0,
                                               status="paused", data=b"d", now=now),
        "put_items": lambda: store.put_items(
            rk, [make_item("K", expires_at=T0 + 3), make_item("N")], now=now),
        "put_owned": lambda: store.put_owned_items(
            rk, [make_item("w")], owner=1, checkpoint_id=checkpoint_id_of(run, 1),
            if_absent=False, now=now),
        "delete_items": lambda: store.delete_items(rk, ["K", "L", "P"]),
        "purge": lambda: store.purge_expired(now=now, limit=100),
        "latest": lambda: store.latest(rk, now=now),
        "read": lambda: store.read_with_items(rk, sequence=None, now=now),
        "headers": lambda: store.headers(rk, before=None, limit=10, now=now),
        "get_items": lambda: store.get_items(rk, ["K", "P", "L", "zz"], now=now),
        "get_run": lambda: store.get_run(rk, now=now),
    }
    return calls[operation]()


async def _snapshot(client: Any, base: str) -> dict[bytes, bytes]:
    # The call's memo (op:<token>) is written only by a call that completed.
    return {key: await client.dump(key) async for key in client.scan_iter(match=base + "*")
            if b":op:" not in key}


@pytest.mark.parametrize("cluster_path", [False, True], ids=["plain", "cluster-code-path"])
async def test_no_call_fails_halfway_or_raises_a_foreign_error_after_edits(
    prefixed: tuple[RedisTarget, str], cluster_path: bool,
) -> None:
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix, cluster=cluster_path)
    operations = [*_WRITES, "latest", "read", "headers", "get_items", "get_run"]
    halfway: list[tuple[int, str, str]] = []
    with anyio.fail_after(120):
        for seed in _SEEDS:
            rnd = random.Random(seed)
            run = make_run(f"sweep-{seed}")
            base = f"{prefix}:{{{key_of(run)}}}:"
            await _seed_run(store, run)
            await _edit(store._client, base, rnd)
            operation = rnd.choice(operations)
            before = await _snapshot(store._client, base)
            try:
                await _call(store, run, operation, rnd.choice([T0, T0 + 20]))
            except CheckpointError as exc:
                if operation in _WRITES and await _snapshot(store._client, base) != before:
                    halfway.append((seed, operation, str(exc)[:120]))
            await store.delete_run(key_of(run))
        await store.aclose()
    assert halfway == []
