"""asyncpg against psycopg 3 on the PostgreSQL store's own statements: a W1-like loop.

    pip install asyncpg 'psycopg[binary]'   # in a throwaway environment, with fastcheckpoint
    python stores/postgres/compare_drivers.py postgresql://postgres@127.0.0.1:5432/postgres

Provisions a throwaway schema, then per round and per driver: CREATES appends of a W1-sized
checkpoint (about 10 KB of state and 20 messages, msgpack) to a run of their own, one after
the other, then as many reads of the run's latest checkpoint; each is one call of the store's
server-side function on one connection, so the difference is the driver's alone. Two modes:
``cached`` (statements prepared once per connection: asyncpg's statement cache, psycopg's
``prepare_threshold=0``) and ``unnamed`` (nothing kept in the session, as behind PgBouncer in
transaction mode: asyncpg ``statement_cache_size=0``, psycopg ``prepare_threshold=None``).
Prints ops/s (median of the rounds), p50/p99 latencies and the client's CPU time per call
(the driver's own cost, which server load and commit waits do not blur). The schema is
dropped at the end. The numbers and the choice they led to are in docs/stores/postgres.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import msgspec
import psycopg

from fastcheckpoint.stores._postgres_sql import Names, Statements
from fastcheckpoint.stores.postgres import PostgresStore

Call = Callable[[str, list[Any]], Awaitable[Any]]


def w1_checkpoint(step: int) -> tuple[bytes, bytes]:
    """Header and payload of a W1 checkpoint: ~10 KB of state and 20 messages."""
    state = {"step": step, "scratchpad": os.urandom(2500).hex(), "plan": ["search", "write"]}
    messages = [{"role": "user" if n % 2 else "assistant", "content": f"message {n} " * 30}
                for n in range(20)]
    header = msgspec.msgpack.encode({"run_id": "bench", "sequence": step, "step_name": "step"})
    return header, msgspec.msgpack.encode({"state": state, "messages": messages})


def append_args(run_key: str, step: int, header: bytes, payload: bytes) -> list[Any]:
    now = time.time()
    return [run_key, step, f"ck-{run_key}-{step}", now, None, header, payload, None,
            uuid.uuid4().hex, b"bench", "aaaa", "active", now, 0, b"", [], None, now,
            None, None, None, None]


async def timed(call: Call, sql: str, arguments: list[list[Any]]) -> list[float]:
    """Latency of each call, then the client's CPU seconds per call (the driver's own cost,
    which server load and commit waits do not blur) as the last entry."""
    latencies = []
    cpu = time.process_time()
    for args in arguments:
        started = time.perf_counter()
        await call(sql, args)
        latencies.append(time.perf_counter() - started)
    return [*latencies, (time.process_time() - cpu) / len(arguments)]


async def asyncpg_calls(url: str, cached: bool) -> tuple[Call, Callable[[], Awaitable[None]]]:
    connection = await asyncpg.connect(url, statement_cache_size=100 if cached else 0)

    async def call(sql: str, args: list[Any]) -> Any:
        return await connection.fetch(sql, *args)

    return call, connection.close


async def psycopg_calls(url: str, cached: bool) -> tuple[Call, Callable[[], Awaitable[None]]]:
    connection = await psycopg.AsyncConnection.connect(
        url, autocommit=True, prepare_threshold=0 if cached else None)

    async def call(sql: str, args: list[Any]) -> Any:
        cursor = await connection.execute(re.sub(r"\$\d+", "%s", sql), args, binary=True)
        return await cursor.fetchall()

    return call, connection.close


async def one_round(url: str, sql: Statements, creates: int, driver: str, cached: bool,
                    checkpoints: list[tuple[bytes, bytes]]) -> dict[str, list[float]]:
    opener = asyncpg_calls if driver == "asyncpg" else psycopg_calls
    call, close = await opener(url, cached)
    run_key = "".join(c for c in uuid.uuid4().hex if c in "abcdef234567")[:20] or "run"
    try:
        await call("SELECT 1", [])  # connected and warm
        create = await timed(call, sql.append, [
            append_args(run_key, step, *checkpoints[step]) for step in range(creates)])
        restore = await timed(call, sql.latest, [[run_key, time.time()]] * creates)
    finally:
        await close()
    return {"create": create, "restore": restore}


def summary(rounds: list[dict[str, list[float]]], phase: str) -> str:
    per_round = [(len(r[phase]) - 1) / sum(r[phase][:-1]) for r in rounds]
    latencies = sorted(x for r in rounds for x in r[phase][:-1])
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[int(len(latencies) * 0.99)] * 1000
    cpu = statistics.median(r[phase][-1] for r in rounds) * 1e6
    return (f"{statistics.median(per_round):8.0f} ops/s  p50 {p50:6.3f} ms  p99 {p99:6.3f} ms"
            f"  client CPU {cpu:5.0f} us/op")


async def main(url: str, creates: int, rounds: int) -> None:
    schema = f"fc_drivers_{uuid.uuid4().hex[:8]}"
    store = PostgresStore.from_url(f"{url}?schema={schema}")
    await store.provision()
    await store.aclose()
    sql = Statements(Names(schema, "fc_"))
    checkpoints = [w1_checkpoint(step) for step in range(creates)]
    results: dict[tuple[str, str], list[dict[str, list[float]]]] = {
        (driver, mode): [] for mode in ("cached", "unnamed") for driver in ("asyncpg", "psycopg")}
    try:
        for number in range(rounds):
            for cached in (True, False):
                # Alternate which driver goes first: no order effect (WAL, cache) favours one.
                for driver in ("asyncpg", "psycopg")[:: 1 if number % 2 == 0 else -1]:
                    mode = "cached" if cached else "unnamed"
                    found = await one_round(url, sql, creates, driver, cached, checkpoints)
                    results[driver, mode].append(found)
    finally:
        connection = await asyncpg.connect(url)
        await connection.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await connection.close()
    print(f"asyncpg {asyncpg.__version__}, psycopg {psycopg.__version__} "
          f"({psycopg.pq.__impl__}), {creates} creates + {creates} restores x {rounds} rounds, "
          f"payload {len(checkpoints[0][1])} bytes")
    for (driver, mode), found in results.items():
        for phase in ("create", "restore"):
            print(f"{driver:8} {mode:8} {phase:8} {summary(found, phase)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="postgresql://user@host:5432/database (a throwaway "
                                    "schema is created and dropped there)")
    parser.add_argument("--creates", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.url, arguments.creates, arguments.rounds))
