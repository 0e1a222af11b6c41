"""The PostgreSQL store's ``put_owned_items`` per call: the function of schema version 12
(a write token; an upsert remembers its answer) against the one of version 1 beside it (no
token), called alike through asyncpg on one connection, in alternating blocks of 200 calls.

    python -m benchmarks.pg_owned_items upsert   # if_absent=False
    python -m benchmarks.pg_owned_items absent   # if_absent=True

Makes a database of its own on the PostgreSQL at ``FC_BENCH_PG_ADMIN`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``) and drops it afterwards.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import statistics
import sys
import time

import asyncpg

from fastcheckpoint import CheckpointManager, _ids
from fastcheckpoint.stores.postgres import PostgresStore

DB = "ownedbench_" + os.urandom(3).hex()
ADMIN = os.environ.get("FC_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")

async def main() -> None:
    admin = await asyncpg.connect(ADMIN)
    await admin.execute(f'CREATE DATABASE "{DB}"')
    try:
        url = ADMIN.rsplit("/", 1)[0] + f"/{DB}"
        store = PostgresStore.from_url(url)
        await store.provision()
        manager = CheckpointManager(store)
        made = await manager.create("bench", {"x": 1})
        assert made is not None
        await manager.aclose()
        key = _ids.key_of("bench")
        conn = await asyncpg.connect(url)
        call = 'SELECT "public"."fc_put_owned_items"($1, $2, $3, $4, $5, $6, $7{})'
        old = await conn.prepare(call.format(""))
        new = await conn.prepare(call.format(", $8"))
        upsert = sys.argv[1] == "upsert"
        args = (key, made.metadata.sequence, made.checkpoint_id, [b"k"], [b"x" * 200], not upsert)
        print("upsert" if upsert else "insert-if-absent")
        times: dict[str, list[float]] = {"v1 (no memo)": [], "v12 (memo)": []}
        for _ in range(10):
            for name, statement in (("v1 (no memo)", old), ("v12 (memo)", new)):
                start = time.perf_counter()
                for _ in range(200):
                    extra = (secrets.token_hex(16),) if statement is new else ()
                    assert await statement.fetchval(*args, time.time(), *extra)
                times[name].append((time.perf_counter() - start) / 200 * 1e6)
        for name, values in times.items():
            print(f"{name}: median {statistics.median(values):.0f} µs/call, "
                  f"p10 {sorted(values)[1]:.0f}")
        print("ops rows:", await conn.fetchval('SELECT count(*) FROM "public".fc_ops'))
        await conn.close()
        await store.aclose()
    finally:
        await admin.execute(f'DROP DATABASE "{DB}" WITH (FORCE)')
        await admin.close()

if __name__ == "__main__":
    asyncio.run(main())
