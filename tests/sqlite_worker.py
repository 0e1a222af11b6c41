"""An OS process appending to a SQLiteStore, for tests/stores/sqlite/test_sqlite_specific.py.

    python sqlite_worker.py append PATH RUN_ID COUNT WORKER   append COUNT checkpoints, then exit
    python sqlite_worker.py forever PATH RUN_ID KEEP SYNC     append until killed, pruning to
                                                              KEEP checkpoints (0: keep all),
                                                              with synchronous=SYNC
    python sqlite_worker.py read-only PATH RUN_ID             as user nobody when run as root:
                                                              read, append and provision, and
                                                              print "<call> <outcome>" for each

Each acknowledged append prints its sequence on a line of its own, after ``append`` returned.
The store runs on the event loop library named by ``$SQLITE_WORKER_BACKEND`` (asyncio, trio).
"""

from __future__ import annotations

import os
import random
import sys
import time

import anyio

from fastcheckpoint import _ids
from fastcheckpoint.errors import CheckpointError
from fastcheckpoint.stores import Item
from fastcheckpoint.stores.sqlite import SQLiteStore
from tests import _appends as appends

BACKEND_VARIABLE = "SQLITE_WORKER_BACKEND"


def header_for(sequence: int, worker: str) -> bytes:
    return f"header {worker} {sequence}".encode()


def payload_for(sequence: int, worker: str) -> bytes:
    """Deterministic, of varying size up to ~256 KiB, so a torn write would show."""
    size = random.Random(sequence).randrange(1 << 18)
    return worker.encode() + random.Random(f"{worker}/{sequence}").randbytes(size)


def item_for(sequence: int, worker: str) -> Item:
    """A shared item each checkpoint writes and names, and one it owns."""
    return Item(key=f"w/{sequence}", value=f"{worker} {sequence}".encode(), owner=sequence)


async def append_next(
    store: SQLiteStore, run_id: str, worker: str, keep_latest: int | None = None
) -> int | None:
    """Append the run's next checkpoint; ``None`` if another writer took that sequence."""
    return await appends.append_next(
        store, run_id, keep_latest=keep_latest,
        header=lambda sequence: header_for(sequence, worker),
        payload=lambda sequence: payload_for(sequence, worker),
        owned=lambda sequence: item_for(sequence, worker).value)


async def _main(
    mode: str, path: str, run_id: str, count: int, worker: str, synchronous: str
) -> None:
    store = SQLiteStore(path, synchronous=synchronous)
    appended = 0
    keep = count if mode == "forever" and count > 0 else None
    while mode == "forever" or appended < count:
        sequence = await append_next(store, run_id, worker, keep_latest=keep)
        if sequence is not None:
            print(sequence, flush=True)
            appended += 1
    await store.aclose()


async def _read_only(path: str, run_id: str) -> None:
    store = SQLiteStore(path)
    key = _ids.run_key(run_id)
    calls = {
        "latest": lambda: store.latest(key, now=time.time()),
        "append": lambda: append_next(store, run_id, "read-only"),
        "provision": store.provision,
        "aclose": store.aclose,
    }
    for name, call in calls.items():
        try:
            await call()
        except CheckpointError as exc:
            print(name, type(exc).__name__, str(exc).replace("\n", " "), flush=True)
        except Exception as exc:  # what the test looks for: it must never happen
            print(name, "LEAKED", type(exc).__name__, exc, flush=True)
        else:
            print(name, "ok", flush=True)


def _backend() -> str:
    return os.environ.get(BACKEND_VARIABLE, "asyncio")


def _as_nobody() -> None:
    """Drop root, which reads and writes any file whatever its mode; the event loop is set
    up first, as nobody may not read the interpreter's own modules."""

    async def nothing() -> None:
        pass

    anyio.run(nothing, backend=_backend())
    os.setgid(65534)
    os.setuid(65534)


if __name__ == "__main__" and sys.argv[1] == "read-only":
    if os.geteuid() == 0:
        _as_nobody()
    anyio.run(_read_only, sys.argv[2], sys.argv[3], backend=_backend())
elif __name__ == "__main__":
    mode, path, run_id, number = sys.argv[1:5]
    name, synchronous = (sys.argv[5], "full") if mode == "append" else ("forever", sys.argv[5])
    anyio.run(_main, mode, path, run_id, int(number), name, synchronous, backend=_backend())
