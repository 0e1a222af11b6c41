"""S3 store: a read takes several requests (the run's head, the slot, the items, the parts
of a log...), and another process (another store object on the bucket and prefix) may
prune, delete or replace what the read has found between two of them. The read must return
what one consistent read would have returned, the state before the other process's change
or after it: never a checkpoint without its items or with another checkpoint's, never
``None`` for a run that had a live checkpoint all along, never an error for what was
removed legitimately.

Each race is made exact: the reading store's first request of a kind (the GET of a slot, of
an item, of a long header...) first lets the other store make its change."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import msgspec
import pytest

from fastcheckpoint import CheckpointConfig, CheckpointManager
from fastcheckpoint._config import RetryPolicy
from fastcheckpoint.errors import CorruptCheckpointError, StoreError
from fastcheckpoint.stores import _s3_layout as layout
from fastcheckpoint.stores._aws import RequestCounter
from fastcheckpoint.stores.s3 import S3Store
from fastcheckpoint.testing import (
    T0,
    checkpoint_id_of,
    key_of,
    make_checkpoint,
    make_item,
    make_run,
)
from tests.stores._moto import REGION, moto_endpoint
from tests.stores.s3.test_s3 import DEADLINE, SESSION, s3_bucket, s3_store
from tests.stores.s3.test_s3_safety import _keys, _put

__all__ = ["moto_endpoint", "s3_bucket", "s3_store"]

pytestmark = pytest.mark.anyio

_SLOT = re.compile(r"runs/[a-z2-7]+/c/\d{19}$")
_SLOT_OR_RUN = re.compile(r"runs/[a-z2-7]+/(a|c/\d{19})$")
_ITEM = re.compile(r"items/")
_LONG_HEADER = re.compile(r"runs/[a-z2-7]+/c/\d{19}/l")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


@pytest.fixture
async def other(s3_store: S3Store, moto_endpoint: str) -> AsyncIterator[S3Store]:
    """Another process on ``s3_store``'s bucket and prefix."""
    store = S3Store(s3_store.bucket, s3_store.prefix, region=REGION,
                    endpoint_url=moto_endpoint, session=SESSION)
    yield store
    with anyio.fail_after(10):
        await store.aclose()


async def _before_first(
    store: S3Store, method: str, key: re.Pattern[str] | Callable[[str], bool],
    change: Callable[[], Awaitable[Any]], monkeypatch: pytest.MonkeyPatch,
) -> list[str]:
    """Make ``store``'s first ``method`` call (``get``, ``list``...) on a key matching ``key``
    wait for ``change`` (by another store) first, and any such call sent meanwhile too; the
    list returned records that it ran."""
    io = await store._objects()
    original = getattr(io, method)
    ran: list[str] = []
    done = anyio.Event()
    matches = key.match if isinstance(key, re.Pattern) else key

    async def changed_first(name: str, *args: Any, **kwargs: Any) -> Any:
        if matches(name):
            if not ran:
                ran.append("changed")
                await change()
                done.set()
            await done.wait()  # the calls sent with the first one wait for the change too
        return await original(name, *args, **kwargs)

    monkeypatch.setattr(io, method, changed_first)
    return ran


async def _append(store: S3Store, run: Any, sequence: int, *, keep_latest: int | None = None,
                  header: bytes | None = None, **items: Any) -> None:
    """Checkpoint ``sequence`` of ``run``, owning an item ``w/<sequence>`` and naming a
    shared one ``b/<sequence>``, or what ``items`` says."""
    refs = items.pop("refs", [f"b/{sequence}"])
    written = items.pop("items", [make_item(f"b/{sequence}", f"b{sequence}".encode()),
                                  make_item(f"w/{sequence}", f"w{sequence}".encode(),
                                            owner=sequence)])
    assert not items
    record = msgspec.structs.replace(make_checkpoint(run, sequence, header=header),
                                     refs=tuple(refs))
    await store.append_with_items(key_of(run), record, run=run, keep_latest=keep_latest,
                                  now=T0, items=written)


def _whole(sequence: int) -> dict[str, bytes]:
    """What a read with items of a checkpoint ``_append`` wrote returns."""
    return {f"b/{sequence}": f"b{sequence}".encode(), f"w/{sequence}": f"w{sequence}".encode()}


# -- the newest checkpoint, pruned by a newer one while it is read ---------------------------------


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
async def test_latest_racing_a_pruning_append_returns_the_newer_checkpoint(
    s3_store: S3Store, other: S3Store, monkeypatch: pytest.MonkeyPatch, warm: bool
) -> None:
    """The head listed shows checkpoint 0; before its slot is read another process appends
    1 and prunes 0 (``keep_latest=1``). The run had a live checkpoint all along: the read
    returns 1 (it returned None)."""
    run = make_run("pruned-while-read")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await _append(other, run, 0, keep_latest=1)
        if warm:  # the reader knows the run object: no GET of it beside the slot's
            assert await s3_store.latest(key, now=T0) is not None
        ran = await _before_first(s3_store, "get", _SLOT,
                                  lambda: _append(other, run, 1, keep_latest=1), monkeypatch)
        found = await s3_store.latest(key, now=T0)
    assert ran == ["changed"]
    assert found is not None
    assert (found[0].sequence, found[0].checkpoint_id) == (1, checkpoint_id_of(run, 1))


@pytest.mark.parametrize("first", ["slot", "item"])
async def test_read_with_items_racing_a_pruning_append_reads_one_checkpoint_whole(
    s3_store: S3Store, other: S3Store, monkeypatch: pytest.MonkeyPatch, first: str
) -> None:
    """Checkpoint 0 owns ``w/0`` and names ``b/0``; another process appends 1 and prunes 0
    before the read's GET of the slot, or between it and the GETs of the items (the sweep
    removing ``b/0`` too). The read returns 1 with its items (it returned None, or 0
    without its items)."""
    run = make_run(f"pruned-while-read-whole-{first}")
    key = key_of(run)

    async def prune() -> None:
        await _append(other, run, 1, keep_latest=1)
        await other.purge_expired(now=T0, limit=100)  # the sweep: b/0 is named by none

    with anyio.fail_after(DEADLINE):
        await _append(other, run, 0)
        ran = await _before_first(s3_store, "get", _SLOT if first == "slot" else _ITEM, prune,
                                  monkeypatch)
        found = await s3_store.read_with_items(key, sequence=None, now=T0)
        assert await other.get_items(key, ["b/0", "w/0"], now=T0) == {}
    assert ran == ["changed"]
    assert found is not None
    assert (found[0].sequence, found[2]) == (1, _whole(1))


@pytest.mark.parametrize("removal", ["pruned", "deleted"])
async def test_read_with_items_at_a_sequence_racing_its_removal_finds_it_gone(
    s3_store: S3Store, other: S3Store, monkeypatch: pytest.MonkeyPatch, removal: str
) -> None:
    """``read_with_items(sequence=0)`` has read the slot when another process prunes 0
    (or deletes it: a tombstone replaces the slot): the read finds it gone (it returned 0
    without its items)."""
    run = make_run(f"{removal}-while-read-at")
    key = key_of(run)

    async def prune() -> None:
        if removal == "deleted":
            assert await other.delete(key, 0, checkpoint_id=checkpoint_id_of(run, 0))
            return
        await _append(other, run, 1, keep_latest=1)
        await other.purge_expired(now=T0, limit=100)

    with anyio.fail_after(DEADLINE):
        await _append(other, run, 0)
        ran = await _before_first(s3_store, "get", _ITEM, prune, monkeypatch)
        found = await s3_store.read_with_items(key, sequence=0, now=T0)
    assert ran == ["changed"]
    assert found is None


async def test_get_racing_its_pruning_finds_it_gone(
    s3_store: S3Store, other: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run("pruned-while-got")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await _append(other, run, 0)
        ran = await _before_first(s3_store, "get", _SLOT,
                                  lambda: _append(other, run, 1, keep_latest=1), monkeypatch)
        assert await s3_store.get(key, 0, now=T0) is None
        monkeypatch.undo()
        found = await s3_store.get(key, 1, now=T0)
    assert ran == ["changed"]
    assert found is not None
    assert found[0].checkpoint_id == checkpoint_id_of(run, 1)


# -- items deleted or replaced while a checkpoint is read ----------------------------------------


async def test_an_item_deleted_while_read_reads_as_deleted(
    s3_store: S3Store, other: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``delete_items`` between the read's GET of the slot and of the items: the checkpoint
    still stands, so the read is the state after the delete, for one conditional GET of
    the slot more (answered 304)."""
    run = make_run("deleted-while-read")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await _append(other, run, 0)
        assert await s3_store.latest(key, now=T0) is not None  # the run object is cached
        ran = await _before_first(s3_store, "get", _ITEM,
                                  lambda: other.delete_items(key, ["b/0", "w/0"]), monkeypatch)
        with RequestCounter.attached(await s3_store.client()) as read:
            found = await s3_store.read_with_items(key, sequence=None, now=T0)
    assert ran == ["changed"]
    assert found is not None
    assert (found[0].sequence, found[2]) == (0, {})
    # The head, the slot, the two items, then the slot again (304: it stands).
    assert read.counts == {"ListObjectsV2": 1, "GetObject": 4}


async def test_a_read_superseded_again_and_again_gives_up(
    s3_store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every time the read GETs the slot it listed, it is gone (another process removing
    it as fast as it is read, in effect): the read is made again a bounded number of times,
    then fails with ``StoreError`` (a ``CheckpointError``), never looping forever."""
    run = make_run("superseded-forever")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await _append(s3_store, run, 0)
        io = await s3_store._objects()
        get, lists = io.get, []

        async def gone(name: str) -> Any:
            return None if _SLOT.match(name) else await get(name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            lists.append(args[0])
            return await scan(*args, **kwargs)

        scan = io.scan
        monkeypatch.setattr(io, "get", gone)
        monkeypatch.setattr(io, "scan", counted)
        with pytest.raises(StoreError, match="kept being removed or replaced while read"):
            await s3_store.latest(key, now=T0)
    assert len(lists) == RetryPolicy().max_retries + 1


@pytest.mark.parametrize("sequence", [None, 0])
async def test_an_owned_item_taken_over_while_read_is_not_the_reader_s(
    s3_store: S3Store, other: S3Store, monkeypatch: pytest.MonkeyPatch, sequence: int | None
) -> None:
    """Checkpoint 1 takes ``w/0`` over (``put_owned_items``) between the read of
    checkpoint 0's slot and of its items: 0 no longer owns it (state after)."""
    run = make_run(f"taken-over-while-read-{sequence}")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await _append(other, run, 0)
        if sequence is None:
            take = other.put_owned_items(key, [make_item("w/0", b"taken", owner=0)], owner=0,
                                         checkpoint_id=checkpoint_id_of(run, 0),
                                         if_absent=False, now=T0)
        else:
            await _append(other, run, 1)
            take = other.put_owned_items(key, [make_item("w/0", b"taken", owner=1)], owner=1,
                                         checkpoint_id=checkpoint_id_of(run, 1),
                                         if_absent=False, now=T0)
        ran = await _before_first(s3_store, "get", _ITEM, lambda: take, monkeypatch)
        found = await s3_store.read_with_items(key, sequence=sequence, now=T0)
    assert ran == ["changed"]
    assert found is not None
    assert found[0].sequence == 0
    if sequence is None:  # rewritten for 0 itself: the new value
        assert found[2] == {"b/0": b"b0", "w/0": b"taken"}
    else:
        assert found[2] == {"b/0": b"b0"}


# -- the run deleted, or deleted and started over, while it is read ------------------------------


@pytest.mark.parametrize("first", ["slot", "item"])
async def test_a_run_deleted_while_read_reads_as_deleted(
    s3_store: S3Store, other: S3Store, monkeypatch: pytest.MonkeyPatch, first: str
) -> None:
    run = make_run(f"deleted-run-while-read-{first}")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await _append(other, run, 0)
        assert await s3_store.latest(key, now=T0) is not None  # the run object is cached
        ran = await _before_first(s3_store, "get", _SLOT if first == "slot" else _ITEM,
                                  lambda: other.delete_run(key), monkeypatch)
        found = await s3_store.read_with_items(key, sequence=None, now=T0)
    assert ran == ["changed"]
    assert found is None


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
async def test_a_run_started_over_while_read_reads_one_life(
    s3_store: S3Store, other: S3Store, monkeypatch: pytest.MonkeyPatch, warm: bool
) -> None:
    """The head listed shows the first life's checkpoint 0 (owning ``w/0``); before its
    slot and the run object are read the run is deleted and started over, its checkpoint 0
    owning ``w/new``: the slot's key was written again (its ETag is not the one listed).
    The read returns the new life's checkpoint with its items (it returned it without them:
    the markers listed were the old checkpoint's), or, when the reader knows the old run
    object (``warm``: no GET of it), nothing (the slot is not of the life it knows: the run
    was deleted meanwhile)."""
    run = make_run(f"started-over-while-read-{warm}")
    key = key_of(run)
    again = msgspec.structs.replace(run, incarnation=f"{run.incarnation}-2")

    async def start_over() -> None:
        await other.delete_run(key)
        await _append(other, again, 0, refs=[], items=[make_item("w/new", b"new", owner=0)])

    with anyio.fail_after(DEADLINE):
        await _append(other, run, 0)
        if warm:
            assert await s3_store.latest(key, now=T0) is not None
        ran = await _before_first(s3_store, "get", _SLOT_OR_RUN, start_over, monkeypatch)
        found = await s3_store.read_with_items(key, sequence=None, now=T0)
        monkeypatch.undo()
        now = await s3_store.read_with_items(key, sequence=None, now=T0)
    assert ran == ["changed"]
    new = (checkpoint_id_of(again, 0), {"w/new": b"new"})
    assert now is not None
    assert (now[0].checkpoint_id, now[2]) == new
    if warm and found is None:
        return
    assert found is not None
    assert (found[0].checkpoint_id, found[2]) == new


async def test_a_run_started_over_while_a_sequence_is_read(
    s3_store: S3Store, other: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``read_with_items(sequence=0)`` lists the markers under the slot's key while it
    GETs the slot and the run object. The run is deleted and started over after that LIST
    and before those GETs: the slot's write token is not its marker's, so the read is made
    again and returns the new checkpoint with its items (it returned it without them)."""
    run = make_run("started-over-at")
    key = key_of(run)
    again = msgspec.structs.replace(run, incarnation=f"{run.incarnation}-2")
    io = await s3_store._objects()
    listed, changed = anyio.Event(), anyio.Event()
    scan, get, ran = io.scan, io.get, []

    async def scanned(*args: Any, **kwargs: Any) -> Any:
        try:
            return await scan(*args, **kwargs)
        finally:
            listed.set()

    async def got(name: str) -> Any:
        if _SLOT_OR_RUN.match(name):
            await listed.wait()
            if not ran:
                ran.append("changed")
                await other.delete_run(key)
                await _append(other, again, 0, refs=[],
                              items=[make_item("w/new", b"new", owner=0)])
                changed.set()
            await changed.wait()
        return await get(name)

    with anyio.fail_after(DEADLINE):
        await _append(other, run, 0)
        monkeypatch.setattr(io, "scan", scanned)
        monkeypatch.setattr(io, "get", got)
        found = await s3_store.read_with_items(key, sequence=0, now=T0)
    assert ran == ["changed"]
    assert found is not None
    assert (found[0].checkpoint_id, found[2]) == (checkpoint_id_of(again, 0), {"w/new": b"new"})


async def test_a_run_started_over_while_its_slot_without_marker_is_read(
    s3_store: S3Store, other: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, but the first life's checkpoint 0 lost its marker: the read GETs its slot
    for its listing, and finds the new life's there (no marker token to compare its own
    with). The slot's ETag differs from the one listed: the read is made again and returns
    the new checkpoint with its items (it returned it without them)."""
    run = make_run("started-over-bare")
    key = key_of(run)
    again = msgspec.structs.replace(run, incarnation=f"{run.incarnation}-2")

    async def start_over() -> None:
        await other.delete_run(key)
        await _append(other, again, 0, refs=[], items=[make_item("w/new", b"new", owner=0)])

    with anyio.fail_after(DEADLINE):
        await _append(other, run, 0)
        for name in await _keys(other):
            if re.fullmatch(r"runs/[a-z2-7]+/c/\d{19}/m.*", name):
                await _delete(other, name)
        ran = await _before_first(s3_store, "get", _SLOT_OR_RUN, start_over, monkeypatch)
        found = await s3_store.read_with_items(key, sequence=None, now=T0)
    assert ran == ["changed"]
    assert found is not None
    assert (found[0].checkpoint_id, found[2]) == (checkpoint_id_of(again, 0), {"w/new": b"new"})


# -- the parts of a log merged away while read ---------------------------------------------------


async def test_log_parts_merged_away_while_read_are_read_once_more(
    s3_store: S3Store, other: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manager keeps ``messages`` as a log: an anchor and parts nested under it, merged
    16 into one as they accumulate (the merged ones then removed). Another process's create
    merges the parts the reader listed, before the reader GETs them: the restore reads them
    once more (``LogGap``) and returns the whole history."""
    config = CheckpointConfig(history_min_entries=1)
    reader = CheckpointManager(s3_store, config=config)
    writer = CheckpointManager(other, config=config)
    messages = [{"role": "user", "content": f"m{number}"} for number in range(20)]
    with anyio.fail_after(DEADLINE):
        for count in range(1, 17):  # the anchor, then 15 parts
            await writer.create("r", {"n": count}, messages=messages[:count])
        before = await _parts(other)
        ran = await _before_first(
            s3_store, "get", _is_part,
            lambda: writer.create("r", {"n": 17}, messages=messages[:17]), monkeypatch)
        restored = await reader.restore("r")
        after = await _parts(other)
    assert ran == ["changed"]
    assert (before, after) == (15, 1)  # the create merged the parts and removed them
    assert restored is not None
    assert restored.messages == messages[:16]


def _is_part(name: str) -> bool:
    """An object of a part of a log (``m/<incarnation>/<sequence>.<token>/<index>...``)."""
    key = layout.item_key_of(name.split("/")[2]) if name.startswith("items/") else None
    return key is not None and key.count("/") >= 3


async def _delete(store: S3Store, key: str) -> None:
    client = await store.client()
    await client.delete_object(Bucket=store.bucket, Key=store.prefix + key)


async def _parts(store: S3Store) -> int:
    return sum(1 for key in await _keys(store) if _is_part(key))


# -- listings --------------------------------------------------------------------------------------


async def test_a_long_header_pruned_while_listed_is_listed_as_it_is_now(
    s3_store: S3Store, other: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A header too long for a key is in its marker's body: a listing GETs it. Another
    process prunes the checkpoint between the LIST and that GET: the listing is read again
    (it raised StoreError "vanished while read")."""
    run = make_run("long-header-pruned")
    key = key_of(run)
    header = b"h" * 900
    with anyio.fail_after(DEADLINE):
        for sequence in range(2):  # naming no shared item: pruned, its marker goes too
            await _append(other, run, sequence, header=header, refs=[], items=[])
        ran = await _before_first(s3_store, "get", _LONG_HEADER, lambda: _append(
            other, run, 2, keep_latest=1, header=header, refs=[], items=[]), monkeypatch)
        headers, status = await s3_store.headers(key, before=None, limit=10, now=T0)
    assert ran == ["changed"]
    assert [found.sequence for found in headers] == [2]
    assert headers[0].header == header
    assert status == "active"


@pytest.mark.parametrize("read", ["latest", "headers", "get_run", "list_runs"])
async def test_a_slot_without_marker_pruned_while_read_is_read_anew(
    s3_store: S3Store, other: S3Store, monkeypatch: pytest.MonkeyPatch, read: str
) -> None:
    """Checkpoint 0 lost its marker (its writer stopped between the two PUTs): reads GET
    its slot for its listing. Another process appends 1 and prunes 0 between the LIST and
    that GET: the run had a live checkpoint all along, so the read shows 1 (the run read
    as empty: no checkpoint, no live run)."""
    run = make_run(f"bare-pruned-{read}")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await _append(other, run, 0, refs=[], items=[])
        for name in await _keys(other):
            if re.fullmatch(r"runs/[a-z2-7]+/c/\d{19}/m.*", name):
                await _delete(other, name)
        ran = await _before_first(s3_store, "get", _SLOT,
                                  lambda: _append(other, run, 1, keep_latest=1, refs=[],
                                                  items=[]), monkeypatch)
        if read == "latest":
            found = await s3_store.latest(key, now=T0)
            shown = None if found is None else found[0].sequence
        elif read == "headers":
            headers, _ = await s3_store.headers(key, before=None, limit=10, now=T0)
            shown = headers[0].sequence if len(headers) == 1 else headers
        elif read == "get_run":
            record = await s3_store.get_run(key, now=T0)
            shown = None if record is None else record.latest_sequence
        else:
            runs, _ = await s3_store.list_runs(status=None, limit=10, cursor=None, now=T0)
            shown = runs[0].latest_sequence if len(runs) == 1 else runs
    assert ran == ["changed"]
    assert shown == 1


@pytest.mark.parametrize("first", ["list", "get"])
async def test_runs_listed_while_one_is_deleted_or_started_over(
    s3_store: S3Store, other: S3Store, monkeypatch: pytest.MonkeyPatch, first: str
) -> None:
    """``list_runs`` lists the index, then each run (LIST), then its run object (GET,
    unless known). A run deleted, or deleted and started over, after the index was listed
    (``list``) or after the run was (``get``) is left out or shown as it is now: never the
    checkpoints of its first life under the second's run object."""
    gone, restarted = make_run(f"listed-gone-{first}"), make_run(f"listed-restarted-{first}")
    again = msgspec.structs.replace(restarted, incarnation=f"{restarted.incarnation}-2")

    async def change() -> None:
        await other.delete_run(key_of(gone))
        await other.delete_run(key_of(restarted))
        await _append(other, again, 0, refs=[], items=[])
        await _append(other, again, 1, refs=[], items=[])

    with anyio.fail_after(DEADLINE):
        await _append(other, gone, 0)
        await _append(other, restarted, 0)
        when = re.compile(r"runs/" if first == "list" else r"runs/[a-z2-7]+/a$")
        ran = await _before_first(s3_store, first, when, change, monkeypatch)
        runs, _ = await s3_store.list_runs(status=None, limit=10, cursor=None, now=T0)
    assert ran == ["changed"]
    shown = [(found.run_id, found.incarnation, found.latest_sequence) for found in runs]
    assert shown in ([], [(again.run_id, again.incarnation, 1)])


async def test_an_item_deleted_while_scanned_is_left_out(
    s3_store: S3Store, other: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run("deleted-while-scanned")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await other.put_items(key, [make_item(f"k/{number}") for number in range(4)], now=T0)
        ran = await _before_first(s3_store, "get", _ITEM,
                                  lambda: other.delete_items(key, ["k/1"]), monkeypatch)
        scanned = await s3_store.scan_items(key, prefix="k/", limit=3, now=T0)
    assert ran == ["changed"]
    assert [item_key for item_key, _ in scanned] == ["k/0", "k/2", "k/3"]


async def test_a_leftover_marker_of_another_write_does_not_stop_reads(
    s3_store: S3Store, other: S3Store
) -> None:
    """A slot whose only marker is another write's (a leftover its writer did not remove
    before it stopped, the slot's own marker not written yet): no race, so the read made
    again finds the same and goes on, returning the checkpoint with its items. (One that
    owns items would be pending without its own marker: see
    ``test_s3_pending_review.py``.)"""
    run = make_run("leftover-marker")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await _append(other, run, 0, items=[make_item("b/0", b"b0")])
        for name in await _keys(other):
            if re.fullmatch(r"runs/[a-z2-7]+/c/\d{19}/m.*", name):
                await _delete(other, name)
        leftover = layout.Listing("an-earlier-life", checkpoint_id_of(run, 0), T0, None, T0,
                                  b"header", b"token-00")
        await _put(other, layout.marker_key(key, 0, "m", leftover), b"")
        found = await s3_store.read_with_items(key, sequence=0, now=T0)
    assert found is not None
    assert (found[0].checkpoint_id, found[2]) == (checkpoint_id_of(run, 0), {"b/0": b"b0"})


# -- what stays damage ---------------------------------------------------------------------------


async def test_a_damaged_item_of_a_standing_checkpoint_is_still_reported(
    s3_store: S3Store, other: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run("damaged-while-read")
    key = key_of(run)
    with anyio.fail_after(DEADLINE):
        await _append(other, run, 0)
        ran = await _before_first(
            s3_store, "get", _ITEM,
            lambda: _put(other, f"items/{key}/{b'w/0'.hex()}", b"\x01damaged"), monkeypatch)
        with pytest.raises(CorruptCheckpointError):
            await s3_store.read_with_items(key, sequence=None, now=T0)
    assert ran == ["changed"]
