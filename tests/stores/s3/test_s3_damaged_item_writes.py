"""S3 store: a damaged item is not live. Every writer bringing a value for its key replaces
it (create-only ones too, ``IfMatch`` the damaged object's ETag, so a good value written
meanwhile is kept), and a LangGraph thread whose channel blob is damaged heals by a save
that sends the value again."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import pytest

from fastcheckpoint import _ids
from fastcheckpoint.errors import ConflictError, StoreUnavailableError
from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
from fastcheckpoint.stores import StoredCheckpoint
from fastcheckpoint.stores import _s3_layout as layout
from fastcheckpoint.stores._s3_io import Bucket, Listed
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
    _raw,
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


# -- the markers of a damaged owned item, cleared before its replacement ---------------------

Writer = Callable[[S3Store, str, StoredCheckpoint], Awaitable[None]]


async def _create_only(store: S3Store, run_key: str, one: StoredCheckpoint) -> None:
    await store.put_items(run_key, [make_item("w", b"new")], create_only=True, now=T0)


async def _unconditional(store: S3Store, run_key: str, one: StoredCheckpoint) -> None:
    await store.put_items(run_key, [make_item("w", b"new")], now=T0)


async def _owned_by_one(store: S3Store, run_key: str, one: StoredCheckpoint) -> None:
    assert await store.put_owned_items(run_key, [make_item("w", b"new", owner=1)], owner=1,
                                       checkpoint_id=one.checkpoint_id, if_absent=False,
                                       now=T0)


WRITERS = [_create_only, _unconditional, _owned_by_one]


async def _owned_by_zero(
    store: S3Store, name: str
) -> tuple[str, StoredCheckpoint, StoredCheckpoint]:
    """A run of checkpoints 0 and 1, 0 owning w (its marker under 0's slot), w damaged."""
    run = make_run(f"{name}-{secrets.token_hex(3)}")
    run_key = key_of(run)
    zero = await _append_items(store, run, 0, items=[make_item("w", b"old", owner=0)])
    one = await _append_items(store, run, 1)
    await _truncated(store, run_key, "w")
    return run_key, zero, one


def _fail_once(monkeypatch: pytest.MonkeyPatch, step: str, run_key: str) -> list[str]:
    """Make the first LIST of the run, or the first deletion of its markers, fail."""
    failed: list[str] = []
    listing, deleting = Bucket.list, Bucket.delete

    async def list_(self: Bucket, prefix: str, **options: Any) -> list[Listed]:
        if prefix == layout.run_prefix(run_key) and not failed:
            failed.append(step)
            raise StoreUnavailableError("injected: LIST failed")
        return await listing(self, prefix, **options)

    async def delete(self: Bucket, keys: Sequence[str]) -> None:
        if keys and all(key.startswith(layout.run_prefix(run_key)) for key in keys) \
                and not failed:
            failed.append(step)
            raise StoreUnavailableError("injected: DeleteObjects failed")
        await deleting(self, keys)

    monkeypatch.setattr(Bucket, step, {"list": list_, "delete": delete}[step])
    return failed


@pytest.mark.parametrize("step", ["list", "delete"])
@pytest.mark.parametrize("write", WRITERS)
async def test_a_failed_clearing_of_a_damaged_items_markers_writes_nothing(
    s3_store: S3Store, write: Writer, step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replacing w, damaged and owned by checkpoint 0, first clears the markers it left; if
    that LIST or DeleteObjects fails, the call raises and w is still the damaged object
    (before, the new w was already written and its old marker stayed). A retry replaces
    it, and deleting checkpoint 0 (from another process) then leaves the new w."""
    with anyio.fail_after(DEADLINE):
        run_key, zero, one = await _owned_by_zero(s3_store, "cleared")
        damaged = await _raw(s3_store, _object(run_key, "w"))
        failed = _fail_once(monkeypatch, step, run_key)
        with pytest.raises(StoreUnavailableError):
            await write(s3_store, run_key, one)
        monkeypatch.undo()
        assert failed == [step]
        assert await _raw(s3_store, _object(run_key, "w")) == damaged
        await write(s3_store, run_key, one)
        other = S3Store(s3_store.bucket, s3_store.prefix, client=await s3_store.client())
        assert await other.delete(run_key, 0, checkpoint_id=zero.checkpoint_id)
        assert await s3_store.get_items(run_key, ["w"], now=T0) == {"w": b"new"}


@pytest.mark.parametrize("write", [_unconditional, _owned_by_one])
async def test_an_unconditional_write_over_a_damaged_owned_item_survives_its_old_owner(
    s3_store: S3Store, write: Writer
) -> None:
    with anyio.fail_after(DEADLINE):
        run_key, zero, one = await _owned_by_zero(s3_store, "unconditional")
        await write(s3_store, run_key, one)
        other = S3Store(s3_store.bucket, s3_store.prefix, client=await s3_store.client())
        assert await other.delete(run_key, 0, checkpoint_id=zero.checkpoint_id)
        assert await s3_store.get_items(run_key, ["w"], now=T0) == {"w": b"new"}


async def _owns_w(store: S3Store, run_key: str, zero: StoredCheckpoint,
                  one: StoredCheckpoint) -> None:
    """Checkpoint 1 owns w = B, by its marker: it reads it, deleting checkpoint 0 leaves
    it, deleting checkpoint 1 removes it (all from a process that knows nothing)."""
    fresh = S3Store(store.bucket, store.prefix, client=await store.client())
    read = await fresh.read_with_items(run_key, sequence=1, now=T0)
    assert read is not None
    assert read[2] == {"w": b"B"}
    assert await fresh.delete(run_key, 0, checkpoint_id=zero.checkpoint_id)
    assert await fresh.get_items(run_key, ["w"], now=T0) == {"w": b"B"}
    assert await fresh.delete(run_key, 1, checkpoint_id=one.checkpoint_id)
    assert await fresh.get_items(run_key, ["w"], now=T0) == {}


async def _b_writes(store: S3Store, run_key: str, one: StoredCheckpoint) -> None:
    """Another process writes w = B owned by checkpoint 1, unconditionally."""
    other = S3Store(store.bucket, store.prefix, client=await store.client())
    assert await other.put_owned_items(run_key, [make_item("w", b"B", owner=1)], owner=1,
                                       checkpoint_id=one.checkpoint_id, if_absent=False,
                                       now=T0)


async def test_an_owned_write_landing_after_a_damaged_items_replacement_keeps_its_marker(
    s3_store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replaces the damaged w (create-only, loose); just after A's PUT lands, B writes w
    owned by checkpoint 1. B's item and marker stay (before, A listed the run after its PUT
    and deleted B's marker: checkpoint 1 read without w, and w outlived it)."""
    with anyio.fail_after(DEADLINE):
        run_key, zero, one = await _owned_by_zero(s3_store, "after")
        item = _object(run_key, "w")
        putting = Bucket.put
        raced: list[str] = []

        async def b_after_a(self: Bucket, key: str, body: bytes, **conditions: Any) -> Any:
            etag = await putting(self, key, body, **conditions)
            if key == item and conditions.get("if_match") and not raced:
                raced.append(key)
                await _b_writes(s3_store, run_key, one)
            return etag

        monkeypatch.setattr(Bucket, "put", b_after_a)
        await s3_store.put_items(run_key, [make_item("w", b"A")], create_only=True, now=T0)
        monkeypatch.undo()
        assert raced == [item]
        await _owns_w(s3_store, run_key, zero, one)


async def test_an_owned_write_landing_before_a_damaged_items_replacement_is_kept(
    s3_store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A is about to replace the damaged w; B writes w owned by checkpoint 1 before A lists
    the run, so A's clearing deletes B's marker with checkpoint 0's. A's PUT then finds w
    changed: B's item is kept (A gets ConflictError) and A puts B's marker back."""
    with anyio.fail_after(DEADLINE):
        run_key, zero, one = await _owned_by_zero(s3_store, "before")
        listing = Bucket.list
        raced: list[str] = []

        async def b_before_a(self: Bucket, prefix: str, **options: Any) -> list[Listed]:
            if prefix == layout.run_prefix(run_key) and not raced:
                raced.append(prefix)
                await _b_writes(s3_store, run_key, one)
            return await listing(self, prefix, **options)

        monkeypatch.setattr(Bucket, "list", b_before_a)
        with pytest.raises(ConflictError):
            await s3_store.put_items(run_key, [make_item("w", b"A")], create_only=True,
                                     now=T0)
        monkeypatch.undo()
        assert raced
        await _owns_w(s3_store, run_key, zero, one)
