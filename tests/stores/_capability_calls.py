"""The calls of the adapter capabilities (``SupportsLabels``, ``SupportsSharedItems``) once
each, with the removals of what they wrote: part of the workloads that check a store's IAM
policy against the requests it sends."""

from __future__ import annotations

import msgspec

from fastcheckpoint.stores import CheckpointStore, SupportsLabels, SupportsSharedItems
from fastcheckpoint.testing import T0, checkpoint_id_of, key_of, make_item, make_run
from fastcheckpoint.testing._adapter import _append_items


async def capability_calls(store: CheckpointStore, *, value: bytes = b"value") -> None:
    """Labels, checkpoints with shared and owned items (of ``value``: make it large to
    send values to a store's overflow), reads, owned writes, pruning, purging, deletion."""
    assert isinstance(store, SupportsLabels)
    assert isinstance(store, SupportsSharedItems)
    run = msgspec.structs.replace(make_run("iam-items"), labels=("thread:iam",))
    key = key_of(run)
    await _append_items(store, run, 0, refs=["b/a"], expires_at=T0 + 5, items=[
        make_item("b/a", value), make_item("w/0", value, owner=0)])
    await _append_items(store, run, 1, refs=["b/b"], items=[make_item("b/b")])
    assert await store.put_owned_items(key, [make_item("w/1", owner=1)], owner=1,
                                       checkpoint_id=checkpoint_id_of(run, 1), if_absent=True,
                                       now=T0)
    await store.read_with_items(key, sequence=None, now=T0)
    await store.read_with_items(key, sequence=0, now=T0)
    await store.runs_with_label("thread:iam", limit=5, cursor=None, now=T0)
    await _append_items(store, run, 2, keep_latest=1)
    await store.purge_expired(now=T0, limit=100)
    await store.delete_run(key)
