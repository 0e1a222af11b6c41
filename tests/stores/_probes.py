"""What the seeded sweeps of the store probes share (tests/stores/sqlite/test_sqlite_probe.py,
tests/stores/postgres/test_postgres_probe.py): the run each seeds, every public call each
makes against it after editing its rows, and the check that a create the store acknowledged
reads back whole."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from fastcheckpoint.errors import CheckpointError
from fastcheckpoint.testing import (
    T0,
    checkpoint_id_of,
    key_of,
    make_checkpoint,
    make_item,
    make_run,
)

__all__ = ["APPENDS", "READS", "WRITES", "seed_run", "store_calls", "unreadable_create"]

APPENDS = {"append": 2, "append_prune": 2, "append_new_run": 0}
"""The appends of :func:`store_calls`, with the sequence each writes."""
WRITES = ["append", "append_prune", "append_new_run", "delete", "delete_run", "update_run",
          "update_guarded", "put_items", "put_items_create", "put_owned", "put_owned_absent",
          "delete_items", "purge", "rebuild"]
READS = ["latest", "get", "read", "read_0", "headers", "headers_all", "get_items", "get_run",
         "list_runs", "list_active", "count_runs", "with_label", "scan", "scan_nested",
         "damaged", "damaged_all"]


async def seed_run(store: Any, run: Any) -> None:
    """Checkpoint 0 (expires at T0 + 10, names K, owns o0), checkpoint 1 (T0 + 1000, names
    K and P, owns o1; P/1 nested under P), a loose item L expiring at T0 + 5, two labels."""
    key = key_of(run)
    seed = msgspec.structs.replace(run, labels=("l1", "l2"))
    first = msgspec.structs.replace(make_checkpoint(run, 0, expires_at=T0 + 10), refs=("K",))
    await store.append_with_items(key, first, run=seed, keep_latest=None, now=T0,
                                  items=[make_item("K"), make_item("o0", owner=0)])
    second = msgspec.structs.replace(make_checkpoint(run, 1, expires_at=T0 + 1000),
                                     refs=("K", "P"))
    await store.append_with_items(key, second, run=seed, keep_latest=None, now=T0,
                                  items=[make_item("P"), make_item("P/1"),
                                         make_item("o1", owner=1)])
    await store.put_items(key, [make_item("L", expires_at=T0 + 5)], now=T0)


def store_calls(store: Any, run: Any, now: float) -> dict[str, Callable[[], Awaitable[Any]]]:
    """Every public call of a store against the run :func:`seed_run` wrote, by name (the
    names of :data:`WRITES` and :data:`READS`)."""
    key = key_of(run)
    third = msgspec.structs.replace(make_checkpoint(run, 2, expires_at=T0 + 9000), refs=("K",))
    fresh = make_run(run.run_id, expires_at=T0 + 9000)
    seed = msgspec.structs.replace(run, incarnation="", status="paused", data=b"rebuilt")
    return {
        "append": lambda: store.append_with_items(
            key, third, run=run, keep_latest=None, now=now, items=[make_item("Q")]),
        "append_prune": lambda: store.append_with_items(
            key, third, run=run, keep_latest=1, now=now, items=[make_item("Q")]),
        "append_new_run": lambda: store.append(
            key, make_checkpoint(fresh, 0, expires_at=T0 + 9000), run=fresh, keep_latest=None,
            now=now),
        "delete": lambda: store.delete(key, 1, checkpoint_id=checkpoint_id_of(run, 1)),
        "delete_run": lambda: store.delete_run(key),
        "update_run": lambda: store.update_run(key, incarnation=run.incarnation, version=0,
                                               status="paused", data=b"d", now=now),
        "update_guarded": lambda: store.update_run(
            key, incarnation=run.incarnation, version=0, status="paused", data=b"d", now=now,
            latest_sequence=1),
        "put_items": lambda: store.put_items(
            key, [make_item("K", expires_at=T0 + 3), make_item("N")], now=now),
        "put_items_create": lambda: store.put_items(
            key, [make_item("N"), make_item("L")], create_only=True, now=now),
        "put_owned": lambda: store.put_owned_items(
            key, [make_item("w", owner=1)], owner=1, checkpoint_id=checkpoint_id_of(run, 1),
            if_absent=False, now=now),
        "put_owned_absent": lambda: store.put_owned_items(
            key, [make_item("o1", owner=1)], owner=1, checkpoint_id=checkpoint_id_of(run, 1),
            if_absent=True, now=now),
        "delete_items": lambda: store.delete_items(key, ["K", "L", "P"]),
        "purge": lambda: store.purge_expired(now=now, limit=100),
        "rebuild": lambda: store.rebuild_run(key, seed, now=now),
        "latest": lambda: store.latest(key, now=now),
        "get": lambda: store.get(key, 1, now=now),
        "read": lambda: store.read_with_items(key, sequence=None, now=now),
        "read_0": lambda: store.read_with_items(key, sequence=0, now=now),
        "headers": lambda: store.headers(key, before=None, limit=10, now=now),
        "headers_all": lambda: store.headers(key, before=None, limit=1, now=now,
                                             include_expired=True),
        "get_items": lambda: store.get_items(key, ["K", "P", "L", "zz"], now=now),
        "get_run": lambda: store.get_run(key, now=now),
        "list_runs": lambda: store.list_runs(status=None, limit=10, cursor=None, now=now),
        "list_active": lambda: store.list_runs(status="active", limit=1, cursor=None, now=now),
        "count_runs": lambda: store.count_runs(status="active", now=now),
        "with_label": lambda: store.runs_with_label("l1", limit=10, cursor=None, now=now),
        "scan": lambda: store.scan_items(key, limit=2, now=now),
        "scan_nested": lambda: store.scan_items(key, prefix="P", reverse=True, now=now),
        "damaged": lambda: store.damaged_runs(run_key=key, now=now),
        "damaged_all": lambda: store.damaged_runs(now=now),
    }


async def unreadable_create(store: Any, run: Any, sequence: int, now: float) -> str | None:
    """Why checkpoint ``sequence``, which an append just acknowledged, does not read back
    whole (with the items it names), or ``None``."""
    try:
        found = await store.read_with_items(key_of(run), sequence=sequence, now=now)
    except CheckpointError as exc:
        return f"reading it raised {exc!r:.160}"
    if found is None:
        return "it is gone"
    record, _, items = found
    if not record.payload.startswith(b"payload-") or not set(record.refs) <= set(items):
        return f"it reads as {record!r:.160} with {sorted(items)}"
    return None
