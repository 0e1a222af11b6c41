"""S3 store: ``delete_run`` on real S3. A ``DeleteObjects`` batch is not applied at once:
S3 deletes its keys one by one, in no promised order. Another process reading the run
meanwhile must find it whole (as before the delete) or gone (as after), never in between;
a create racing the delete lands in a run readers see or raises; and a ``delete_run`` that
stops between its requests leaves nothing a later read, or a new life of the run, takes
for part of a run or for damage.

moto applies a batch in one go, so the store's client here applies it key by key (each
key's ``ETag`` condition kept), in a chosen order, with a hook between the keys."""

from __future__ import annotations

import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from fastcheckpoint import CheckpointConfig, CheckpointManager, _ids
from fastcheckpoint.errors import StoreUnavailableError
from fastcheckpoint.stores import _s3_layout as layout
from fastcheckpoint.stores._aws import RequestCounter
from fastcheckpoint.stores.s3 import S3Store
from fastcheckpoint.testing import T0, key_of, make_item, make_run
from tests.stores._moto import REGION, moto_endpoint
from tests.stores.s3.test_s3 import DEADLINE, SESSION, s3_bucket, s3_store
from tests.stores.s3.test_s3_safety import _keys
from tests.stores.s3.test_s3_superseded_reads import _append, _before_first

__all__ = ["moto_endpoint", "s3_bucket", "s3_store"]

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


def _another(store: S3Store, moto_endpoint: str) -> S3Store:
    """Another process on ``store``'s bucket and prefix: a store of its own."""
    return S3Store(store.bucket, store.prefix, region=REGION, endpoint_url=moto_endpoint,
                   session=SESSION)


@pytest.fixture
async def reader(s3_store: S3Store, moto_endpoint: str) -> AsyncIterator[S3Store]:
    store = _another(s3_store, moto_endpoint)
    yield store
    with anyio.fail_after(10):
        await store.aclose()


@pytest.fixture
async def writer(s3_store: S3Store, moto_endpoint: str) -> AsyncIterator[S3Store]:
    store = _another(s3_store, moto_endpoint)
    yield store
    with anyio.fail_after(10):
        await store.aclose()


async def _piecewise(
    store: S3Store, monkeypatch: pytest.MonkeyPatch, order: Callable[[list[Any]], list[Any]],
    between: Callable[[list[str]], Awaitable[None]],
) -> list[int]:
    """Make ``store``'s ``DeleteObjects`` apply its keys one at a time (each with its ETag
    condition, as S3 does), in ``order``, awaiting ``between(done)`` (the keys of the batch
    applied so far) before each key and after the last. Returns the sizes of the batches so
    applied."""
    client = await store.client()
    batches: list[int] = []

    async def one_by_one(*, Bucket: str, Delete: dict[str, Any], **_: Any) -> dict[str, Any]:
        objects = order(list(Delete["Objects"]))
        batches.append(len(objects))
        errors = []
        for n, obj in enumerate(objects):
            await between([obj["Key"] for obj in objects[:n]])
            condition = {"IfMatch": obj["ETag"]} if "ETag" in obj else {}
            try:
                await client.delete_object(Bucket=Bucket, Key=obj["Key"], **condition)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                errors.append({"Key": obj["Key"], "Code": code, "Message": str(exc)})
        await between([obj["Key"] for obj in objects])
        return {"Errors": errors}

    monkeypatch.setattr(client, "delete_objects", one_by_one)
    return batches


def _reversed(objects: list[Any]) -> list[Any]:
    return objects[::-1]


def _items_first(objects: list[Any]) -> list[Any]:
    return sorted(objects, key=lambda obj: "/items/" not in obj["Key"])


def _shuffled(objects: list[Any]) -> list[Any]:
    random.Random(7).shuffle(objects)
    return objects


async def _views(store: S3Store, run_key: str) -> dict[str, Any]:
    """What each read of another process returns for the run (and the store's runs)."""
    latest = await store.latest(run_key, now=T0)
    with_items = await store.read_with_items(run_key, sequence=None, now=T0)
    return {
        "get_run": await store.get_run(run_key, now=T0),
        "list_runs": (await store.list_runs(status=None, limit=10, cursor=None, now=T0))[0],
        "count_runs": await store.count_runs(status=None, now=T0),
        "latest": None if latest is None else latest[0].checkpoint_id,
        "list_checkpoints": [header.checkpoint_id for header in (await store.headers(
            run_key, before=None, limit=10, now=T0))[0]],
        "older": [header.checkpoint_id for header in (await store.headers(
            run_key, before=2, limit=10, now=T0))[0]],
        "read_with_items": None if with_items is None else (with_items[0].checkpoint_id,
                                                           with_items[2]),
    }


async def _three_checkpoints(store: S3Store, run: Any) -> None:
    """Checkpoints 0-2, each owning an item and naming a shared one; and an item of no
    checkpoint with an expiry (its marker under ``o/``)."""
    for sequence in range(3):
        await _append(store, run, sequence)
    await store.put_items(key_of(run), [make_item("loose", b"v", expires_at=T0 + 3600)],
                          now=T0)


@pytest.mark.parametrize("order", [_reversed, _shuffled], ids=["reversed", "shuffled"])
async def test_reads_during_a_piecewise_delete_run_find_the_run_whole_or_gone(
    s3_store: S3Store, reader: S3Store, monkeypatch: pytest.MonkeyPatch,
    order: Callable[[list[Any]], list[Any]],
) -> None:
    """Before each key of the batch is deleted, and after the last, another process reads
    the run every way it can: each read returns what it returned before the delete or what
    it returns after it. Before the fix the run object went in the same batch: with the
    batch applied in another order, the run was listed with its newest checkpoint gone."""
    run = make_run("doomed")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await _three_checkpoints(s3_store, run)
        await _append(s3_store, make_run("kept"), 0)
        before = await _views(reader, key)
        seen: list[dict[str, Any]] = []

        async def read(_: list[str]) -> None:
            seen.append(await _views(reader, key))

        batches = await _piecewise(s3_store, monkeypatch, order, read)
        assert await s3_store.delete_run(key) == 3
        after = await _views(reader, key)

    assert before["get_run"] is not None
    assert before["get_run"].checkpoint_count == 3
    assert before["read_with_items"] == (before["latest"], {"b/2": b"b2", "w/2": b"w2"})
    assert after == {"get_run": None, "list_runs": after["list_runs"], "count_runs": 1,
                     "latest": None, "list_checkpoints": [], "older": [],
                     "read_with_items": None}
    assert [record.run_id for record in after["list_runs"]] == ["kept"]
    # The run object alone (no batch), then the slots, then the rest: markers, items, index
    # entries...
    assert batches[0] == 3
    assert batches[1] > 10
    assert len(seen) == sum(batches) + len(batches)
    for n, view in enumerate(seen):
        for read_name, found in view.items():
            assert found in (before[read_name], after[read_name]), (n, read_name, found)
    assert not any(entry.startswith(f"runs/{key}/") or entry.startswith(f"items/{key}/")
                   for entry in await _keys(s3_store))


@pytest.mark.parametrize("at", [0, 5], ids=["first-key", "mid-batch"])
async def test_a_create_racing_a_piecewise_delete_run_lands_in_a_run_readers_see(
    s3_store: S3Store, reader: S3Store, writer: S3Store, monkeypatch: pytest.MonkeyPatch,
    at: int,
) -> None:
    """A process that knows the run creates a checkpoint while the batch is being applied.
    Its append finds the run object gone, so it starts the run over at sequence 0 and is
    acknowledged; the rest of the batch must not remove the new life's checkpoint (the old
    one's slot 0 was listed at the same key). Before the fix the batch deleted the listed
    keys unconditionally, taking the acknowledged checkpoint with them."""
    run = make_run("raced")
    key = key_of(run)
    manager = CheckpointManager(writer, config=CheckpointConfig())
    created: list[Any] = []
    with anyio.fail_after(DEADLINE):
        for n in range(3):
            await manager.create("raced", {"n": n})

        async def create(done: list[str]) -> None:
            if len(done) == at and not created:
                created.append(await manager.create("raced", {"n": "new life"}))

        await _piecewise(s3_store, monkeypatch, _shuffled, create)
        assert await s3_store.delete_run(key) == 3
        found = await CheckpointManager(reader).restore_from(created[0].checkpoint_id)
        latest = await CheckpointManager(reader).restore("raced")
        listed = await CheckpointManager(reader).list_checkpoints("raced")

    assert created[0] is not None
    assert created[0].metadata.sequence == 0
    assert found is not None
    assert found.state == {"n": "new life"}
    assert latest is not None
    assert latest.checkpoint_id == created[0].checkpoint_id
    assert [item.checkpoint_id for item in listed] == [created[0].checkpoint_id]
    assert run.run_id == "raced"


async def test_a_delete_run_stopped_after_the_run_object_leaves_no_run_and_no_damage(
    s3_store: S3Store, reader: S3Store, writer: S3Store, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The process deleting the run stops after its first request (the run object went;
    the batch never arrives). Readers find no run and no damage; a new create of the run id
    is acknowledged and restorable exactly once, alone in the run; the cleanup loop then
    removes the old life's leftovers, and a later ``delete_run`` removes the rest."""
    run = make_run("crashed")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await _three_checkpoints(s3_store, run)
        client = await s3_store.client()

        async def stopped(**_: Any) -> Any:
            raise EndpointConnectionError(endpoint_url="http://s3")

        monkeypatch.setattr(client, "delete_objects", stopped)
        with pytest.raises(StoreUnavailableError):
            await s3_store.delete_run(key)
        monkeypatch.undo()
        seen = await _views(reader, key)
        damaged = await reader.damaged_runs(run_key=key, now=T0) + await reader.damaged_runs(now=T0)
        manager = CheckpointManager(writer, config=CheckpointConfig())
        created = await manager.create("crashed", {"n": "again"})
        assert created is not None
        by_reader = CheckpointManager(reader)
        found = await by_reader.restore_from(created.checkpoint_id)
        latest = await by_reader.restore("crashed")
        listed = await by_reader.list_checkpoints("crashed")
        runs = await by_reader.list_runs()
        counted = await by_reader.count_runs()
        await by_reader.cleanup_expired()
        left = [entry for entry in await _keys(s3_store) if key in entry]
        again = await by_reader.restore_from(created.checkpoint_id)
        removed = await CheckpointManager(s3_store).delete_run("crashed")
        remaining = [entry for entry in await _keys(s3_store) if key in entry]

    assert seen == {"get_run": None, "list_runs": [], "count_runs": 0, "latest": None,
                    "list_checkpoints": [], "older": [], "read_with_items": None}
    assert damaged == []
    assert created.metadata.sequence == 0
    assert found is not None
    assert found.state == {"n": "again"}
    assert latest is not None
    assert latest.checkpoint_id == created.checkpoint_id
    assert [item.checkpoint_id for item in listed] == [created.checkpoint_id]
    assert [record.run_id for record in runs] == ["crashed"]
    assert counted == 1
    assert again is not None
    assert again.state == {"n": "again"}
    # What is left is the new life's: its slot, marker, run object and index entries; the
    # old life's index entries (their incarnation ended) went with list_runs.
    incarnation = created.checkpoint_id.split("-")[2]
    old = [entry for entry in left if entry.startswith("index/") and incarnation not in entry]
    assert old == [], left
    assert len([entry for entry in left if entry.startswith(f"runs/{key}/c/")]) == 2, left
    assert removed == 1
    assert remaining == []


async def test_delete_run_request_budget(s3_store: S3Store) -> None:
    """The run object alone, conditionally, then the slots, then the rest, one batch per
    1,000 keys each: two requests more than a single batch."""
    with anyio.fail_after(DEADLINE):
        manager = CheckpointManager(s3_store, config=CheckpointConfig())
        for n in range(3):
            await manager.create("counted", {"n": n})
        client = await s3_store.client()
        with RequestCounter.attached(client) as deleting:
            assert await manager.delete_run("counted") == 3
        left = [entry for entry in await _keys(s3_store) if _ids.key_of("counted") in entry]

    # The run and its items listed (the run object cached: no GET), the run object, the
    # slots, the rest.
    assert deleting.counts == {"ListObjectsV2": 2, "DeleteObject": 1, "DeleteObjects": 2}
    assert left == []
    assert layout.run_object(_ids.key_of("counted")).endswith("/a")


@pytest.mark.parametrize("answer", [404, 412])
@pytest.mark.parametrize("new_life", [False, True], ids=["alone", "new-life-meanwhile"])
async def test_a_delete_run_whose_run_object_reply_is_lost_counts_what_it_removed(
    s3_store: S3Store, writer: S3Store, monkeypatch: pytest.MonkeyPatch, answer: int,
    new_life: bool,
) -> None:
    """The conditional delete of the run object lands, its reply is lost, and the driver's
    resend finds the object gone (404, or 412 for the ETag no object has): the call still
    removes the whole run it listed and counts its checkpoints; and when another process,
    finding no run, began the run's next life before the call lists again, that life's
    acknowledged checkpoint stays (its run object and slot are other objects)."""
    with anyio.fail_after(DEADLINE):
        manager = CheckpointManager(s3_store, config=CheckpointConfig())
        other = CheckpointManager(writer, config=CheckpointConfig())
        for n in range(3):
            await manager.create("lost-reply", {"n": n})
        client = await s3_store.client()
        real = client.delete_object
        calls: list[str] = []
        created: list[Any] = []

        async def reply_lost(**kwargs: Any) -> Any:
            calls.append(kwargs["Key"])
            if len(calls) > 1:
                return await real(**kwargs)
            await real(**kwargs)
            if new_life:
                created.append(await other.create("lost-reply", {"n": "next life"}))
            code = "NoSuchKey" if answer == 404 else "PreconditionFailed"
            raise ClientError({"Error": {"Code": code, "Message": "resent"},
                               "ResponseMetadata": {"HTTPStatusCode": answer}}, "DeleteObject")

        monkeypatch.setattr(client, "delete_object", reply_lost)
        removed = await manager.delete_run("lost-reply")
        monkeypatch.undo()
        left = [entry for entry in await _keys(s3_store) if _ids.key_of("lost-reply") in entry]
        run = await other.get_run("lost-reply")
        kept = [await other.restore_from(made.checkpoint_id) for made in created]

    assert removed == 3
    assert len(calls) == 1
    if new_life:
        assert run is not None
        assert [found.state if found else None for found in kept] == [{"n": "next life"}]
        assert run.checkpoint_count == 1
    else:
        assert left == []
        assert run is None


# -- one read's requests on either side of a delete_run -----------------------------------------


async def _paused_delete(
    store: S3Store, monkeypatch: pytest.MonkeyPatch, group: Any, run_key: str,
) -> tuple[anyio.Event, anyio.Event]:
    """Start ``store.delete_run(run_key)`` with its first batch applied key by key (listing
    order reversed: the oldest slot first), pausing after the first key until released.
    Returns ``(paused, release)``."""
    paused, release = anyio.Event(), anyio.Event()

    async def between(done: list[str]) -> None:
        if len(done) == 1 and not paused.is_set():
            paused.set()
            await release.wait()

    await _piecewise(store, monkeypatch, _reversed, between)
    group.start_soon(store.delete_run, run_key)
    return paused, release


async def _held(store: S3Store, monkeypatch: pytest.MonkeyPatch, until: anyio.Event,
                which: Callable[[dict[str, Any]], bool]) -> list[str]:
    """Make ``store``'s first ``ListObjectsV2`` whose parameters ``which`` accepts wait for
    ``until``; the list returned records that it did."""
    client = await store.client()
    original = client.list_objects_v2
    held: list[str] = []

    async def listing(**params: Any) -> Any:
        if not held and which(params):
            held.append(params["Prefix"])
            await until.wait()
        return await original(**params)

    monkeypatch.setattr(client, "list_objects_v2", listing)
    return held


async def test_an_item_found_gone_during_a_delete_run_finds_its_checkpoint_gone(
    s3_store: S3Store, reader: S3Store, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``read_with_items`` lists the head, reads the slot, then the item checkpoint 0 owns.
    The item's GET is answered once the delete has removed the item (applied first); the
    read, finding it gone, checks that the slot still stands. The delete removes the slots
    before anything else but the run object, so the slot is gone then and the read is made
    again: no run. Removed in one batch with the rest, the slot could still stand: the read
    returned checkpoint 0 without its item."""
    run = make_run("item-first")
    key = key_of(run)
    item = layout.item_object(key, layout.hex_item_key("w/0"))
    with anyio.fail_after(DEADLINE):
        await _append(s3_store, run, 0, refs=[], items=[make_item("w/0", b"w0", owner=0)])
        before = await reader.read_with_items(key, sequence=None, now=T0)
        paused, release = anyio.Event(), anyio.Event()

        async def between(done: list[str]) -> None:
            if any(name.endswith(item) for name in done) and not paused.is_set():
                paused.set()
                await release.wait()

        await _piecewise(s3_store, monkeypatch, _items_first, between)
        async with anyio.create_task_group() as group:
            group.start_soon(s3_store.delete_run, key)
            ran = await _before_first(reader, "get", re.compile(r"items/"), paused.wait,
                                      monkeypatch)
            found = await reader.read_with_items(key, sequence=None, now=T0)
            release.set()

    assert before is not None
    assert before[2] == {"w/0": b"w0"}
    assert ran == ["changed"]
    assert found is None


async def test_read_with_items_whose_marker_listing_follows_the_delete_finds_no_checkpoint(
    s3_store: S3Store, reader: S3Store, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``read_with_items(sequence=0)`` sends the GET of the slot, of the run object and the
    LIST of the slot's owned-item markers at once. The GETs are answered before the delete,
    the LIST after it: the markers listed are not those of the slot read. Before the fix
    the read returned checkpoint 0 without the item it owns."""
    run = make_run("owner")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await _append(s3_store, run, 0, refs=[], items=[make_item("w/0", b"w0", owner=0)])
        before = await reader.read_with_items(key, sequence=0, now=T0)
        deleted = anyio.Event()

        async def delete() -> None:
            await s3_store.delete_run(key)
            deleted.set()

        slot = layout.slot_key(key, 0)
        held = await _held(reader, monkeypatch, deleted,
                           lambda params: params["Prefix"].endswith(slot)
                           or params["Prefix"].endswith(slot + "/"))
        async with anyio.create_task_group() as group:
            reader_io = await reader._objects()
            original_get = reader_io.get

            async def get_then_delete(name: str) -> Any:
                found = await original_get(name)
                if name == slot and not deleted.is_set():
                    group.start_soon(delete)
                return found

            monkeypatch.setattr(reader_io, "get", get_then_delete)
            found = await reader.read_with_items(key, sequence=0, now=T0)

    assert before is not None
    assert before[2] == {"w/0": b"w0"}
    assert held
    assert found is None


async def test_an_older_page_listed_during_a_delete_run_is_whole_or_empty(
    s3_store: S3Store, reader: S3Store, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``list_checkpoints(before=...)`` lists the slots below and the run object. Its slots'
    LIST is answered once the delete has removed the run object and the oldest slot, not
    the others. Before the fix the run object was listed beside the slots (before the
    delete): the page showed checkpoint 1 without 0."""
    run = make_run("paged")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        for sequence in range(3):
            await _append(s3_store, run, sequence)
        before = (await reader.headers(key, before=2, limit=10, now=T0))[0]
        async with anyio.create_task_group() as group:
            paused, release = await _paused_delete(s3_store, monkeypatch, group, key)
            held = await _held(reader, monkeypatch, paused,
                               lambda params: "StartAfter" in params)
            found = (await reader.headers(key, before=2, limit=10, now=T0))[0]
            release.set()

    assert [header.sequence for header in before] == [1, 0]
    assert held
    assert [header.sequence for header in found] == []


@pytest.mark.parametrize("read", ["get_run", "list_checkpoints"])
async def test_a_listing_of_several_pages_during_a_delete_run_finds_the_run_whole_or_gone(
    s3_store: S3Store, reader: S3Store, monkeypatch: pytest.MonkeyPatch, read: str,
) -> None:
    """Pages of 4 keys: the run's listing takes 3 pages, the first showing the run object.
    The second page is answered once the delete has removed the run object and the oldest
    slot. Before the fix the read took the run object of the first page: the run had 2
    checkpoints (``get_run``), or the listing showed 2 and 1 without 0."""
    monkeypatch.setattr("fastcheckpoint.stores._s3_io.PAGE", 4)
    monkeypatch.setattr("fastcheckpoint.stores.s3.PAGE", 4)
    run = make_run("long")
    key = key_of(run)

    async def read_run() -> Any:
        if read == "get_run":
            record = await reader.get_run(key, now=T0)
            return None if record is None else record.checkpoint_count
        return [header.sequence for header in (await reader.headers(
            key, before=None, limit=10, now=T0))[0]]

    with anyio.fail_after(DEADLINE):
        for sequence in range(3):
            await _append(s3_store, run, sequence)
        before = await read_run()
        async with anyio.create_task_group() as group:
            paused, release = await _paused_delete(s3_store, monkeypatch, group, key)
            held = await _held(reader, monkeypatch, paused,
                               lambda params: "ContinuationToken" in params)
            found = await read_run()
            release.set()

    assert before == (3 if read == "get_run" else [2, 1, 0])
    assert held
    assert found in (None, [])


async def test_a_new_life_writing_item_markers_during_the_last_batch_keeps_them(
    s3_store: S3Store, reader: S3Store, writer: S3Store, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once the run object and the slots are gone, another process begins a new life of the
    run whose checkpoint 0 owns an item at the key the old checkpoint 0 owned one, and
    writes an expiring item the old life also held, with the same expiry: the same marker
    keys. The delete's last batch names the old life's markers with the ETags it listed;
    the new life's markers must have ETags of their own, else that batch removes them: the
    acknowledged checkpoint read without its item, and the expiring item, without its
    marker, was never found by the cleanup loop (the markers were empty objects, so every
    life's marker at one key had the same ETag)."""
    run, again = make_run("relived"), make_run("relived")
    key = key_of(run)
    expiring = make_item("loose", b"new", expires_at=T0 + 3600)
    expiry = layout.item_marker_key(key, layout.hex_item_key("loose"),
                                    layout.ItemMeta(None, T0 + 3600))
    with anyio.fail_after(DEADLINE):
        await _three_checkpoints(s3_store, run)

        async def new_life(done: list[str]) -> None:
            if len(batches) == 2 and not done:  # the last batch, before its first key
                await _append(writer, again, 0, refs=[],
                              items=[make_item("w/0", b"new", owner=0)])
                await writer.put_items(key, [expiring], now=T0)

        batches = await _piecewise(s3_store, monkeypatch, _shuffled, new_life)
        assert await s3_store.delete_run(key) == 3
        found = await reader.read_with_items(key, sequence=None, now=T0)
        loose = await reader.get_items(key, ["loose"], now=T0)
        left = await _keys(s3_store)
        await reader.purge_expired(now=T0 + 7200, limit=100)
        purged = await reader.get_items(key, ["loose"], now=T0)

    assert len(batches) == 2
    assert found is not None
    assert found[0].sequence == 0
    assert found[2] == {"w/0": b"new"}
    assert loose == {"loose": b"new"}
    assert expiry in left
    assert purged == {}
