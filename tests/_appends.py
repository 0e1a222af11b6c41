"""One checkpoint appended through a store's own API (not the manager), for the worker
processes that race on one run (tests/sqlite_worker.py, tests/postgres_worker.py).

Each checkpoint names the shared item ``shared`` (written once, its value the same from
every writer) and owns ``w/<sequence>``; the store alone decides who gets which sequence.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from fastcheckpoint import _ids
from fastcheckpoint.errors import SequenceConflict
from fastcheckpoint.stores import (
    CheckpointStore,
    Item,
    RunRecord,
    StoredCheckpoint,
    SupportsSharedItems,
)

SHARED = Item(key="shared", value=b"written once")


class _Store(CheckpointStore, SupportsSharedItems, Protocol):
    pass


async def append_next(
    store: _Store,
    run_id: str,
    *,
    header: Callable[[int], bytes],
    payload: Callable[[int], bytes],
    owned: Callable[[int], bytes],
    keep_latest: int | None = None,
) -> int | None:
    """Append the run's next checkpoint (``header``, ``payload`` and the owned item's value
    made from its sequence); its sequence, or ``None`` if another writer took it."""
    key = _ids.run_key(run_id)
    now = time.time()
    run = await store.get_run(key, now=now)
    if run is None:
        sequence = 0
        run = RunRecord(
            run_id=run_id, incarnation=_ids.new_incarnation(), status="active",
            created_at=now, updated_at=now, latest_sequence=0, checkpoint_count=0,
            expires_at=None,
        )
    else:
        sequence = run.latest_sequence + 1
    record = StoredCheckpoint(
        sequence=sequence,
        checkpoint_id=_ids.checkpoint_id(key, run.incarnation, sequence),
        created_at=now,
        expires_at=None,
        header=header(sequence),
        payload=payload(sequence),
        refs=(SHARED.key,),
    )
    items = [SHARED, Item(key=f"w/{sequence}", value=owned(sequence), owner=sequence)]
    try:
        await store.append_with_items(key, record, run=run, keep_latest=keep_latest, now=now,
                                      items=items)
    except SequenceConflict:
        return None
    return sequence
