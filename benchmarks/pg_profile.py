"""Where a PostgreSQL create's time goes: ``python -m benchmarks.pg_profile [options]``.

Creates W1 checkpoints through the manager into a database made for the run (dropped
afterwards) on the server at ``--server`` (default ``postgresql://postgres@127.0.0.1:5432``,
a superuser: it creates databases and sets their parameters), and prints the create p50 and
mean. ``--keep`` is the retention (``none`` for none); ``--async-commit`` sets
``synchronous_commit=off`` on the database (the difference is the commit's WAL flush);
``--explain`` sets ``auto_explain`` with nested statements on it, and the statements of the
store's functions, with their times, go to the server log (read it with the server's
``log_line_prefix``; the instrumented times overstate small statements).
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import anyio

from benchmarks.content import make_content
from benchmarks.settings import Sizes
from fastcheckpoint import CheckpointConfig, CheckpointManager
from fastcheckpoint.stores.postgres import PostgresStore

_EXPLAIN = ("session_preload_libraries = 'auto_explain'", "auto_explain.log_min_duration = 0",
            "auto_explain.log_nested_statements = on", "auto_explain.log_analyze = on")


async def _admin(server: str, *statements: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(f"{server}/postgres")
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


async def profile(server: str, creates: int, keep: int | None, *, explain: bool,
                  async_commit: bool) -> list[float]:
    """Seconds per create, in order."""
    database = f"fc_pgprofile_{uuid.uuid4().hex[:10]}"
    settings = [*(_EXPLAIN if explain else ()),
                *(("synchronous_commit = off",) if async_commit else ())]
    await _admin(server, f"CREATE DATABASE {database}",
                 *(f"ALTER DATABASE {database} SET {setting}" for setting in settings))
    sizes = Sizes()
    content = make_content(sizes.state_bytes, sizes.messages)
    times: list[float] = []
    try:
        store = PostgresStore.from_url(f"{server}/{database}?schema=bench")
        try:
            await store.provision()
            manager = CheckpointManager(store, CheckpointConfig(max_checkpoints_per_run=keep))
            async with manager:
                for step in range(creates):
                    content.state["step"] = step
                    started = time.perf_counter()
                    await manager.create("profiled", content.state, messages=content.messages)
                    times.append(time.perf_counter() - started)
        finally:
            await store.aclose()  # before the drop: an open pool would reconnect to it
    finally:
        await _admin(server, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--creates", type=int, default=1000)
    parser.add_argument("--keep", default="100", help="retention per run, or none")
    parser.add_argument("--explain", action="store_true")
    parser.add_argument("--async-commit", action="store_true")
    options = parser.parse_args()
    keep = None if options.keep == "none" else int(options.keep)
    times = anyio.run(lambda: profile(options.server, options.creates, keep,
                                      explain=options.explain, async_commit=options.async_commit))
    settled = times[len(times) // 5:]
    print(f"creates {options.creates}, keep {keep}, explain {options.explain}, async commit "
          f"{options.async_commit}: p50 {statistics.median(times) * 1e6:.0f} us, mean after "
          f"the first fifth {statistics.mean(settled) * 1e6:.0f} us")
    if keep is not None and options.creates > keep:
        pruning = times[keep:]  # each of these removes the run's oldest checkpoint
        print(f"pruning creates {len(pruning)}: p50 {statistics.median(pruning) * 1e6:.0f} us, "
              f"mean {statistics.mean(pruning) * 1e6:.0f} us")


if __name__ == "__main__":
    main()
