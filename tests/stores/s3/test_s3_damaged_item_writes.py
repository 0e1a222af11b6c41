"""S3 store: a damaged item is not live. Every writer bringing a value for its key replaces
it (create-only ones too, ``IfMatch`` the damaged object's ETag, so a good value written
meanwhile is kept), and a LangGraph thread whose channel blob is damaged heals by a save
that sends the value again."""

from __future__ import annotations

import secrets
from typing import Any

import anyio
import pytest

from fastcheckpoint import _ids
from fastcheckpoint.errors import ConflictError
from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
from fastcheckpoint.stores._s3_io import Bucket
from fastcheckpoint.stores.s3 import S3Store
from fastcheckpoint.testing import T0, key_of, make_item, make_run
from fastcheckpoint.testing._adapter import _append_items, _read
from tests.integrations._langgraph_support import CountingStore, config, put
from tests.stores._moto import moto_endpoint
from tests.stores.s3.test_s3 import DEADLINE, s3_bucket, s3_store
from tests.stores.s3.test_s3_damaged_items import (
    Damage,
    _copied_from_another_run,
    _object,
    _truncated,
)

__all__ = ["moto_endpoint", "s3_bucket", "s3_store"]

pytestmark = pytest.mark.anyio

DAMAGES = [_truncated, _copied_from_another_run]
IDS = ["truncated", "copied_from_another_run"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


async def _damaged_loose(store: S3Store, damage: Damage, name: str) -> str:
    """A run with loose items a, b, c, b damaged."""
    run_key = _ids.key_of(name)
    await store.put_items(run_key, [make_item(key, key.encode()) for key in "abc"], now=T0)
    await damage(store, run_key, "b")
    return run_key


@pytest.mark.parametrize("damage", DAMAGES, ids=IDS)
async def test_a_create_only_put_replaces_a_damaged_item(s3_store: S3Store,
                                                          damage: Damage) -> None:
    with anyio.fail_after(DEADLINE):
        run_key = await _damaged_loose(s3_store, damage, "create-only")
        await s3_store.put_items(run_key, [make_item("b", b"new")], create_only=True, now=T0)
        read = await s3_store.get_items(run_key, ["a", "b", "c"], now=T0)
        with pytest.raises(ConflictError):  # live again: the next create-only put is refused
            await s3_store.put_items(run_key, [make_item("b", b"newer")], create_only=True,
                                     now=T0)

    assert read == {"a": b"a", "b": b"new", "c": b"c"}
    assert await s3_store.get_items(run_key, ["b"], now=T0) == {"b": b"new"}


@pytest.mark.parametrize("damage", DAMAGES, ids=IDS)
async def test_an_append_bringing_the_value_of_a_damaged_shared_item_replaces_it(
    s3_store: S3Store, damage: Damage
) -> None:
    """Checkpoint 0 names b; b is damaged. Checkpoint 1 naming b and bringing its value is
    written, and reads whole (it was refused, nothing written, before)."""
    run = make_run(f"shared-{secrets.token_hex(3)}")
    run_key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await _append_items(s3_store, run, 0, refs=["a", "b"],
                            items=[make_item("a"), make_item("b", b"old")])
        await damage(s3_store, run_key, "b")
        await _append_items(s3_store, run, 1, refs=["a", "b"], items=[make_item("b", b"new")])
        read = await _read(s3_store, run, None)
        first = await _read(s3_store, run, 0)

    assert read is not None
    assert (read[0].sequence, read[2]) == (1, {"a": b"value-a", "b": b"new"})
    assert first is not None
    assert first[2] == {"a": b"value-a", "b": b"new"}  # b is named by its key


@pytest.mark.parametrize("damage", DAMAGES, ids=IDS)
async def test_an_append_owning_a_damaged_item_replaces_it(
    s3_store: S3Store, damage: Damage
) -> None:
    run = make_run(f"owned-{secrets.token_hex(3)}")
    run_key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await s3_store.put_items(run_key, [make_item("w", b"old")], now=T0)
        await damage(s3_store, run_key, "w")
        await _append_items(s3_store, run, 0, items=[make_item("w", b"new", owner=0)])
        read = await _read(s3_store, run, 0)

    assert read is not None
    assert read[2] == {"w": b"new"}


@pytest.mark.parametrize("damage", DAMAGES, ids=IDS)
async def test_put_owned_items_if_absent_replaces_a_damaged_item(
    s3_store: S3Store, damage: Damage
) -> None:
    run = make_run(f"if-absent-{secrets.token_hex(3)}")
    run_key = key_of(run)
    with anyio.fail_after(DEADLINE):
        record = await _append_items(s3_store, run, 0)
        await s3_store.put_owned_items(run_key, [make_item("w", b"old", owner=0)], owner=0,
                                       checkpoint_id=record.checkpoint_id, if_absent=False,
                                       now=T0)
        await damage(s3_store, run_key, "w")
        written = await s3_store.put_owned_items(
            run_key, [make_item("w", b"new", owner=0)], owner=0,
            checkpoint_id=record.checkpoint_id, if_absent=True, now=T0)
        read = await _read(s3_store, run, 0)

    assert written is True
    assert read is not None
    assert read[2] == {"w": b"new"}


async def test_deleting_the_damaged_items_owner_leaves_the_new_item(s3_store: S3Store) -> None:
    """w was owned by checkpoint 0 (its marker is under 0's slot), then damaged, then
    replaced by a loose item: deleting checkpoint 0 (by its listing, from another process)
    leaves the new w in place."""
    run = make_run(f"deleted-{secrets.token_hex(3)}")
    run_key = key_of(run)
    with anyio.fail_after(DEADLINE):
        record = await _append_items(s3_store, run, 0, items=[make_item("w", b"old", owner=0)])
        await _truncated(s3_store, run_key, "w")
        await s3_store.put_items(run_key, [make_item("w", b"new")], create_only=True, now=T0)
        other = S3Store(s3_store.bucket, s3_store.prefix, client=await s3_store.client())
        assert await other.delete(run_key, 0, checkpoint_id=record.checkpoint_id)
        assert await s3_store.get_items(run_key, ["w"], now=T0) == {"w": b"new"}


async def test_pruning_the_damaged_items_owner_leaves_the_new_item(s3_store: S3Store) -> None:
    """w was owned by checkpoint 0, then damaged; checkpoint 1 brings w as a shared item,
    checkpoint 2 names it and prunes 0 and 1 by what this process knows: w stays, and
    checkpoint 2 reads whole."""
    run = make_run(f"pruned-{secrets.token_hex(3)}")
    run_key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await _append_items(s3_store, run, 0, items=[make_item("w", b"old", owner=0)])
        await _truncated(s3_store, run_key, "w")
        await _append_items(s3_store, run, 1, refs=["w"], items=[make_item("w", b"new")])
        await _append_items(s3_store, run, 2, refs=["w"], keep_latest=1)
        read = await _read(s3_store, run, None)

    assert read is not None
    assert (read[0].sequence, read[2]) == (2, {"w": b"new"})


async def test_a_good_value_written_while_a_damaged_item_is_replaced_is_kept(
    s3_store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two create-only writers find b damaged. The other one replaces it first, between
    this one's read and its conditional write: this one's write is refused (the ETag
    changed), it reads the good value as live and reports the conflict; the good value
    stays."""
    run_key = await _damaged_loose(s3_store, _truncated, "race")
    item = _object(run_key, "b")
    other = S3Store(s3_store.bucket, s3_store.prefix, client=await s3_store.client())
    conditional_put = Bucket.put
    raced: list[str] = []

    async def other_writes_first(self: Bucket, key: str, body: bytes, **conditions: Any) -> Any:
        if key == item and conditions.get("if_match") and not raced:
            raced.append(key)
            await other.put_items(run_key, [make_item("b", b"good")], create_only=True,
                                  now=T0)
        return await conditional_put(self, key, body, **conditions)

    monkeypatch.setattr(Bucket, "put", other_writes_first)
    with anyio.fail_after(DEADLINE):
        with pytest.raises(ConflictError):
            await s3_store.put_items(run_key, [make_item("b", b"late")], create_only=True,
                                     now=T0)
        assert raced == [item]
        assert await s3_store.get_items(run_key, ["a", "b"], now=T0) == {"a": b"a",
                                                                        "b": b"good"}


async def test_a_langgraph_thread_with_a_damaged_channel_blob_heals_by_sending_it_again(
    s3_store: S3Store,
) -> None:
    """Channel a's blob is damaged after checkpoint 1. A save that sends a's value again
    (same version) is written, and the thread's latest checkpoint reads whole; before, that
    save was refused and the thread stayed unreadable until a changed a."""
    counting = CountingStore(s3_store)
    saver = FastCheckpointSaver(counting)
    thread = f"t-{secrets.token_hex(3)}"
    with anyio.fail_after(DEADLINE):
        first = await put(saver, thread, values={"a": "A1", "b": "B1"},
                          versions={"a": 1, "b": 1})
        run_key = counting.last["append_with_items"][0][0]
        blobs = await s3_store.scan_items(run_key, now=T0)
        blob_a = next(key for key, value in blobs if b"A1" in value)
        await _truncated(s3_store, run_key, blob_a)

        second = await put(saver, thread, parent=first, values={"a": "A1", "b": "B2"},
                           versions={"a": 1, "b": 2}, new_versions={"a": 1, "b": 2})
        latest = await saver.aget_tuple(config(thread))
        again = await saver.aget_tuple(config(thread, first))

    assert latest is not None
    assert latest.config["configurable"]["checkpoint_id"] == second
    assert latest.checkpoint["channel_values"] == {"a": "A1", "b": "B2"}
    assert again is not None
    assert again.checkpoint["channel_values"] == {"a": "A1", "b": "B1"}
