"""S3 store: shared items across the lives of a run. A shared item records the life that
wrote it; an append of another life that finds it in place with its value writes it again
as its own, so that the removal of the ended life (which deletes what it listed, each
object with the ETag listed) leaves it (see ``test_s3_batches.py`` for those removals).
Here: what that costs an append of the same life (nothing), items stored before they
recorded their life, and a writer of an ended life that does not know it ended."""

from __future__ import annotations

import secrets

import anyio
import msgspec
import pytest

from fastcheckpoint.errors import SequenceConflict
from fastcheckpoint.stores import _s3_layout as layout
from fastcheckpoint.stores._aws import RequestCounter
from fastcheckpoint.stores.s3 import S3Store
from fastcheckpoint.testing import key_of, make_item, make_run
from fastcheckpoint.testing._adapter import _append_items, _read
from tests.stores._moto import moto_endpoint
from tests.stores.s3.test_s3 import DEADLINE, s3_bucket, s3_store
from tests.stores.s3.test_s3_delete_run import reader, writer

__all__ = ["moto_endpoint", "reader", "s3_bucket", "s3_store", "writer"]

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


async def _stored(store: S3Store, run_key: str, item_key: str) -> tuple[layout.ItemBody, str]:
    """The item object at ``item_key`` as stored, and its ETag."""
    client = await store.client()
    key = layout.item_object(run_key, layout.hex_item_key(item_key))
    found = await client.get_object(Bucket=store.bucket, Key=store.prefix + key)
    async with found["Body"] as body:
        blob = await body.read()
    return msgspec.msgpack.decode(blob[1:], type=layout.ItemBody), found["ETag"]


async def test_an_append_finding_a_shared_item_of_its_own_life_keeps_it_as_it_is(
    s3_store: S3Store,
) -> None:
    """The steady state: an append that writes a shared item its own life wrote before
    finds it in place (412, then a GET) and keeps it, writing nothing more."""
    run = make_run("own-life")
    with anyio.fail_after(DEADLINE):
        await _append_items(s3_store, run, 0, refs=["b/a"], items=[make_item("b/a")])
        before = await _stored(s3_store, key_of(run), "b/a")
        with RequestCounter.attached(await s3_store.client()) as appended:
            await _append_items(s3_store, run, 1, refs=["b/a"], items=[make_item("b/a")])
        after = await _stored(s3_store, key_of(run), "b/a")

    assert before[0].incarnation == run.incarnation
    assert after == before
    # The item (412), the slot, the marker; the item as found, the run object (304) twice
    # (with the slot, then with the marker), the sweep lease.
    assert appended.counts == {"PutObject": 3, "GetObject": 4}


async def test_a_shared_item_stored_before_items_recorded_their_life_reads_and_is_taken_once(
    s3_store: S3Store,
) -> None:
    """A shared item written before items recorded their life (no such field in its body)
    reads as before; the first append that finds it in place writes it again (it cannot
    tell which life wrote it), once."""
    run = make_run("unrecorded")
    key = key_of(run)
    hex_key = layout.hex_item_key("b/a")
    old = [b"value-b/a", None, None, secrets.token_bytes(16), True, "", key, "b/a"]
    client = await s3_store.client()
    with anyio.fail_after(DEADLINE):
        await client.put_object(Bucket=s3_store.bucket,
                                Key=s3_store.prefix + layout.item_object(key, hex_key),
                                Body=b"\x01" + msgspec.msgpack.encode(old))
        unrecorded = await _stored(s3_store, key, "b/a")
        await _append_items(s3_store, run, 0, refs=["b/a"], items=[make_item("b/a")])
        taken = await _stored(s3_store, key, "b/a")
        await _append_items(s3_store, run, 1, refs=["b/a"], items=[make_item("b/a")])
        kept = await _stored(s3_store, key, "b/a")
        found = await _read(s3_store, run, 1)

    assert unrecorded[0].incarnation == ""
    assert taken[0].incarnation == run.incarnation
    assert taken[1] != unrecorded[1]
    assert kept == taken
    assert found is not None
    assert found[2] == {"b/a": b"value-b/a"}


async def test_a_writer_of_an_ended_life_leaves_the_new_lifes_shared_value(
    s3_store: S3Store, reader: S3Store, writer: S3Store,
) -> None:
    """A process still appending to a life another process deleted, and the run begun
    again, finds the new life's shared item in place with another value: it keeps it (its
    append is refused at its commit, ``SequenceConflict``: the run was begun again), and
    the new life's checkpoint reads with its value. Only an item with the same value is
    written again."""
    run = make_run("stale")
    key = key_of(run)
    again = make_run("stale")
    with anyio.fail_after(DEADLINE):
        await _append_items(writer, run, 0, refs=["b/a"], items=[make_item("b/a", b"old")])
        assert await s3_store.delete_run(key) == 1
        await _append_items(reader, again, 0, refs=["b/a"], items=[make_item("b/a", b"new")])
        with pytest.raises(SequenceConflict):
            await _append_items(writer, run, 1, refs=["b/a"],
                                items=[make_item("b/a", b"stale")])
        found = await _read(reader, again, 0)
        stored = await _stored(s3_store, key, "b/a")

    assert found is not None
    assert found[2] == {"b/a": b"new"}
    assert (stored[0].value, stored[0].incarnation) == (b"new", again.incarnation)
