"""The S3 store against moto in server mode: the contract suite, request counts, retries,
the FastAgentic alias, provisioning, and the ops kit in ``stores/s3/``."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import http.server
import json
import os
import re
import secrets
import socket
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit

import anyio
import pytest
from aiobotocore.session import get_session
from botocore.config import Config

from fastcheckpoint import (
    Checkpoint,
    CheckpointConfig,
    CheckpointManager,
    CheckpointStatus,
    _ids,
    open_store,
)
from fastcheckpoint._config import RetryPolicy
from fastcheckpoint.errors import (
    ConfigurationError,
    StoreUnavailableError,
    ValidationError,
)
from fastcheckpoint.stores import CheckpointStore
from fastcheckpoint.stores import _s3_layout as layout
from fastcheckpoint.stores._aws import AwsEndpoint, RequestCounter, open_client
from fastcheckpoint.stores.s3 import S3CheckpointStore, S3Store, lifecycle_rules
from fastcheckpoint.testing import (
    T0,
    DamageRunRecord,
    LabelsContract,
    NestedItemsContract,
    RepairContract,
    SequenceGuardContract,
    SharedItemsContract,
    StoreContract,
    checkpoint_id_of,
    key_of,
    make_item,
    make_run,
)
from fastcheckpoint.testing._adapter import _append_items
from tests.stores._capability_calls import capability_calls
from tests.stores._moto import REGION, moto_endpoint, unique_name

__all__ = ["moto_endpoint"]

pytestmark = pytest.mark.anyio

DEADLINE = 60.0
SESSION = get_session()
"""One aiobotocore session for the stores the tests build: it loads the service model once
(a store with a session of its own loads it for each client it builds)."""
_T = TypeVar("_T")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


@pytest.fixture(scope="session")
def s3_bucket(moto_endpoint: str) -> str:
    """One bucket per test session, provisioned once; each test gets its own prefix."""
    bucket = unique_name("s3")

    async def provision() -> None:
        store = S3Store(bucket, region=REGION, endpoint_url=moto_endpoint)
        try:
            await store.provision()
        finally:
            await store.aclose()

    anyio.run(provision)
    return bucket


@contextlib.asynccontextmanager
async def raw_client(endpoint_url: str, retry: RetryPolicy | None = None) -> AsyncIterator[Any]:
    async with contextlib.AsyncExitStack() as stack:
        endpoint = AwsEndpoint(region=REGION, endpoint_url=endpoint_url)
        yield await open_client(stack, "s3", endpoint, retry or RetryPolicy())


class TestS3Store(StoreContract, RepairContract, LabelsContract, SharedItemsContract,
                  NestedItemsContract, SequenceGuardContract):
    deadline_seconds = DEADLINE
    # Refs are checked against the removals the store remembers (a key never written is
    # not looked up: that would cost a read per ref).
    refs_checked_when_appended = False

    @pytest.fixture
    async def store(self, moto_endpoint: str, s3_bucket: str) -> AsyncIterator[CheckpointStore]:
        store = S3Store(s3_bucket, f"t-{secrets.token_hex(4)}", region=REGION,
                        endpoint_url=moto_endpoint, session=SESSION)
        yield store
        with anyio.fail_after(10):
            await store.aclose()

    @pytest.fixture
    def damage_run_record(self) -> DamageRunRecord:
        return damage_run_object

async def damage_run_object(store: CheckpointStore, run_key: str) -> None:
    """Overwrite a run's run object with bytes that do not decode."""
    assert isinstance(store, S3Store)
    client = await store.client()
    await client.put_object(Bucket=store.bucket, Key=store.prefix + layout.run_object(run_key),
                            Body=b"\x01not a run object")


# -- helpers for the S3-specific tests -------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
async def s3_store(moto_endpoint: str, s3_bucket: str) -> AsyncIterator[S3Store]:
    store = S3Store(s3_bucket, f"s-{secrets.token_hex(4)}", region=REGION,
                    endpoint_url=moto_endpoint, session=SESSION)
    yield store
    with anyio.fail_after(10):
        await store.aclose()


def _manager(store: CheckpointStore, **config: Any) -> CheckpointManager:
    return CheckpointManager(store, config=CheckpointConfig(**config))


# -- layout --------------------------------------------------------------------------------------


async def test_key_layout_sorts_newest_first(s3_store: S3Store) -> None:
    with anyio.fail_after(DEADLINE):
        manager = _manager(s3_store)
        created = [
            await manager.create("layout", {"n": n}, step_name=f"s{n}", tags=["t"])
            for n in range(3)
        ]
        client = await s3_store.client()
        listed = await client.list_objects_v2(Bucket=s3_store.bucket, Prefix=s3_store.prefix)
        keys = [entry["Key"][len(s3_store.prefix) :] for entry in listed["Contents"]]

    run_key = _ids.run_key("layout")
    runs = [key for key in keys if key.startswith(f"runs/{run_key}/")]
    assert runs[0] == f"runs/{run_key}/a"
    slots = [key.split("/")[3] for key in runs[1:]]
    assert slots == sorted(slots)
    assert [layout.parse_sequence(slot) for slot in slots[::2]] == [2, 1, 0]
    assert all(key.split("/")[-1].startswith("m") for key in runs[2::2]), runs
    assert all(ckpt is not None for ckpt in created)
    assert sum(key.startswith("index/") for key in keys) == 2


async def test_long_header_goes_to_the_marker_body(s3_store: S3Store) -> None:
    with anyio.fail_after(DEADLINE):
        manager = _manager(s3_store)
        tags = [f"tag-{n:04}-{'x' * 40}" for n in range(40)]  # ~2 KB: more than a key holds
        created = await manager.create("long-header", {"n": 1}, tags=tags)
        assert created is not None
        listed = await manager.list_checkpoints("long-header")
        client = await s3_store.client()
        found = await client.list_objects_v2(Bucket=s3_store.bucket, Prefix=s3_store.prefix)

    assert [item.tags for item in listed] == [tags]
    assert all(len(entry["Key"].encode()) <= 1024 for entry in found["Contents"])
    assert any(entry["Key"].split("/")[-1].startswith("l") for entry in found["Contents"])


def test_prefix_and_url_validation() -> None:
    store = S3Store.from_url("s3://bucket/some/prefix/?region=eu-west-1")
    assert (store.bucket, store.prefix) == ("bucket", "some/prefix/")
    with pytest.raises(ConfigurationError, match=r"unknown option 'regoin'.*did you mean 'region'"):
        S3Store.from_url("s3://bucket/p?regoin=eu-west-1")
    with pytest.raises(ConfigurationError, match=r"option 'sesion'.*did you mean 'session'"):
        S3Store.from_url("s3://bucket/p", sesion=None)
    with pytest.raises(ConfigurationError, match=r"unknown option 'regoin'.*did you mean 'region'"):
        open_store("s3://bucket/p?region=eu-west-1&regoin=x")
    with pytest.raises(ConfigurationError, match="bucket"):
        S3Store.from_url("s3:///p")
    with pytest.raises(ConfigurationError, match="endpoint_url"):
        S3Store.from_url("s3://bucket?endpoint_url=localhost:9000")
    with pytest.raises(ConfigurationError, match="at most 384 bytes"):
        S3Store("bucket", "p" * 400)
    with pytest.raises(ValidationError, match="128"):
        layout.hex_item_key("k" * 129)


# -- request counts (the cost budget) ----------------------------------------------------------


async def test_request_counts_per_operation(s3_store: S3Store) -> None:
    with anyio.fail_after(DEADLINE):
        manager = _manager(s3_store, max_checkpoints_per_run=3)
        first = await manager.create("counted", {"n": 0})
        assert first is not None
        for n in range(1, 3):
            await manager.create("counted", {"n": n})
        client = await s3_store.client()

        with RequestCounter.attached(client) as raising:
            await manager.create("counted", {"n": 3})  # the 4th: the first to prune
        with RequestCounter.attached(client) as create:
            created = await manager.create("counted", {"n": 4})
        with RequestCounter.attached(client) as starting:
            await manager.create("other-run", {"n": 0})
        with RequestCounter.attached(client) as unpruned:
            await manager.create("other-run", {"n": 1})
        with RequestCounter.attached(client) as restore:
            latest = await manager.restore("counted")
        assert created is not None
        with RequestCounter.attached(client) as restore_from:
            again = await manager.restore_from(created.checkpoint_id)
        with RequestCounter.attached(client) as listing:
            listed = await manager.list_checkpoints("counted", limit=10)
        with RequestCounter.attached(client) as paging:
            older = await manager.list_checkpoints("counted", limit=1, before=created.checkpoint_id)

    # Slot (create-only: the commit) with, in the same round trip, a GET of the run object
    # that answers 304 while it is the one this process knows; then the marker, the run
    # object's GET again (304: no pruning freed the slot's key before it landed) and the
    # pruned checkpoint's two keys in one DeleteObjects. No LIST: this process wrote the run.
    assert create.counts == {"PutObject": 2, "GetObject": 2, "DeleteObjects": 1}
    # Once per max_checkpoints_per_run + 1 creates, pruning first raises the run object's
    # floor above the keys it deletes (one compare-and-set PUT).
    assert raising.counts == {"PutObject": 3, "GetObject": 2, "DeleteObjects": 1}
    assert unpruned.counts == {"PutObject": 2, "GetObject": 2}
    # A run's first create lists the run (to find it absent), takes the run object and
    # writes two index entries besides slot and marker.
    assert starting.counts == {"ListObjectsV2": 1, "PutObject": 5, "GetObject": 2}
    assert restore.counts == {"ListObjectsV2": 1, "GetObject": 1}
    assert latest is not None
    assert latest.state == {"n": 4}
    # The slot and the run object (for the run's current status) are read concurrently. On
    # a store with nested items the manager reads through read_with_items: with them, one
    # LIST of the markers of the items the checkpoint owns (still one round trip).
    assert restore_from.counts == {"GetObject": 2, "ListObjectsV2": 1}
    assert again is not None
    assert again.state == {"n": 4}
    assert listing.counts == {"ListObjectsV2": 1}
    assert [item.sequence for item in listed] == [4, 3, 2]
    # Below a checkpoint: the slots from there and the run object's ETag, two LISTs at once.
    assert paging.counts == {"ListObjectsV2": 2}
    assert [item.sequence for item in older] == [3]


async def test_request_counts_of_checkpoints_with_items(s3_store: S3Store) -> None:
    """The budget of ``SupportsSharedItems``: an append with items takes two round trips
    like any append, three when it writes shared items (they land before the commit), a
    read with items three (the head, the slot, then every item it names
    or owns at once), a write of owned items two. Nothing is nested under the names (as with
    the LangGraph saver's): no listing of what is nested under them."""
    run = make_run("items-budget")
    key = key_of(run)

    with anyio.fail_after(DEADLINE):
        client = await s3_store.client()
        await _append_items(s3_store, run, 0, refs=["b/a", "b/b"], items=[
            make_item("b/a"), make_item("b/b"), make_item("w/0", owner=0)])
        with RequestCounter.attached(client) as appended:
            await _append_items(s3_store, run, 1, refs=["b/a", "b/c"],
                                items=[make_item("b/c"), make_item("w/1", owner=1)])
        with RequestCounter.attached(client) as pruning:
            await _append_items(s3_store, run, 2, refs=["b/a", "b/d"],
                                items=[make_item("b/d"), make_item("w/2", owner=2)],
                                keep_latest=1)
        with RequestCounter.attached(client) as owned:
            assert await s3_store.put_owned_items(
                key, [make_item("w/x", owner=2)], owner=2,
                checkpoint_id=checkpoint_id_of(run, 2), if_absent=True, now=T0)
        with RequestCounter.attached(client) as newest:
            found = await s3_store.read_with_items(key, sequence=None, now=T0)
        with RequestCounter.attached(client) as at:
            again = await s3_store.read_with_items(key, sequence=2, now=T0)
        with RequestCounter.attached(client) as swept:
            assert await s3_store.purge_expired(now=T0, limit=100) == (0, True)
        stored = await s3_store.get_items(key, ["b/a", "b/b", "b/c", "b/d", "w/0", "w/1"],
                                          now=T0)

    # Round trip 1: each new shared item (create-only). Round trip 2: the slot (create-only)
    # and the run object (304). Round trip 3: the marker, each owned item with its marker,
    # the run object again (304) and the sweep lease (GET: is a cleanup deleting what the
    # checkpoint names?).
    assert appended.counts == {"PutObject": 5, "GetObject": 3}
    # Then pruning, once the append stands: the floor (1 PUT) and two DeleteObjects, one
    # after the other: the slots, then what they owned (a reader finding an item gone
    # checks that its checkpoint's slot stands).
    assert pruning.counts == {"PutObject": 6, "GetObject": 3, "DeleteObjects": 2}
    # The owner check (slot and run object, and a LIST of the slot's keys: is its marker
    # there, or is it pending?) with the item as it is, then item and marker.
    assert owned.counts == {"GetObject": 3, "ListObjectsV2": 1, "PutObject": 2}
    # The head of the run (its markers list what the newest checkpoint owns), the slot,
    # then the 4 items (2 named, 2 owned) at once. The run object lists no name as having
    # nested items: nothing is listed under them.
    assert newest.counts == {"ListObjectsV2": 1, "GetObject": 5}
    # Slot, run object and the owned items' markers at once, then the items at once.
    assert at.counts == {"ListObjectsV2": 1, "GetObject": 6}
    assert found is not None
    assert again is not None
    assert found[2] == again[2] == {"b/a": b"value-b/a", "b/d": b"value-b/d",
                                    "w/2": b"value-w/2", "w/x": b"value-w/x"}
    # The cleanup loop sweeps what only the pruned checkpoints named, and what they owned.
    assert "DeleteObjects" in swept.counts
    assert stored == {"b/a": b"value-b/a", "b/d": b"value-b/d"}


async def _write_directly(
    store: S3Store, run_id: str, sequences: range, *, like: Checkpoint
) -> None:
    """Checkpoints of ``run_id`` as another writer would leave them (slot and marker, the
    header and payload of ``like``), written concurrently so a long run is quick to build."""
    key = _ids.key_of(run_id)
    stored = await store.get(key, like.metadata.sequence, now=like.metadata.created_at)
    assert stored is not None
    parsed = _ids.parse_checkpoint_id(like.checkpoint_id)
    assert parsed is not None
    incarnation = parsed[1]
    created_at = like.metadata.created_at
    client = await store.client()
    limiter = anyio.CapacityLimiter(32)

    async def put(relative: str, body: bytes) -> None:
        async with limiter:
            await client.put_object(Bucket=store.bucket, Key=store.prefix + relative, Body=body)

    async with anyio.create_task_group() as group:
        for sequence in sequences:
            checkpoint_id = _ids.checkpoint_id(key, incarnation, sequence)
            slot = layout.Slot(incarnation, sequence, checkpoint_id, created_at, None,
                               created_at, stored[0].header, stored[0].payload)
            listing = layout.Listing(incarnation, checkpoint_id, created_at, None, created_at,
                                     stored[0].header)
            group.start_soon(put, layout.slot_key(key, sequence), layout.encode(slot))
            group.start_soon(put, layout.marker_key(key, sequence, "m", listing), b"")


async def _steady_costs(store: S3Store, manager: CheckpointManager, run_id: str) -> dict[str, Any]:
    """What the hot operations send on ``run_id``, once the process is in steady state."""
    client = await store.client()
    await manager.create(run_id, {"warm": True})  # learns the run if others wrote it
    with RequestCounter.attached(client) as create:
        created = await manager.create(run_id, {"n": "measured"})
    with RequestCounter.attached(client) as restore:
        restored = await manager.restore(run_id)
    with RequestCounter.attached(client) as listing:
        listed = await manager.list_checkpoints(run_id, limit=10)
    with RequestCounter.attached(client) as paging:
        older = await manager.list_checkpoints(run_id, limit=10, before=listed[-1].checkpoint_id)
    cold_store = S3Store(store.bucket, store.prefix, client=client)
    with RequestCounter.attached(client) as cold:
        cold_restored = await _manager(cold_store).restore(run_id)
    assert created is not None
    assert restored is not None
    assert cold_restored is not None
    assert restored.checkpoint_id == cold_restored.checkpoint_id == created.checkpoint_id
    assert len(listed) == len(older) == 10
    assert listed[-1].sequence - older[0].sequence == 1
    return {
        "create": create.counts,
        "restore": restore.counts,
        "list": listing.counts,
        "page": paging.counts,
        "cold restore": cold.counts,
    }


async def test_costs_do_not_grow_with_the_run(s3_store: S3Store) -> None:
    """W5 in miniature: the same requests at 25 checkpoints and at 600 (no pruning), a run
    whose keys take two listing pages: listing it whole would show in the counts."""
    with anyio.fail_after(180):
        manager = _manager(s3_store, max_checkpoints_per_run=None)
        for n in range(25):
            await manager.create("short", {"n": n})
        short = await _steady_costs(s3_store, manager, "short")

        first = await manager.create("long", {"n": 0})
        assert first is not None
        # Written as by another process: this one learns the run from one conflict.
        await _write_directly(s3_store, "long", range(1, 600), like=first)
        long = await _steady_costs(s3_store, manager, "long")
        run = await manager.get_run("long")

    assert short == long == {
        "create": {"PutObject": 2, "GetObject": 2},
        "restore": {"ListObjectsV2": 1, "GetObject": 1},
        "list": {"ListObjectsV2": 1},
        "page": {"ListObjectsV2": 2},
        "cold restore": {"ListObjectsV2": 1, "GetObject": 2},
    }
    assert run is not None
    assert (run.latest_sequence, run.checkpoint_count) == (601, 602)


@pytest.mark.parametrize("owned", [2, 10, 600])
async def test_reading_the_newest_checkpoint_costs_at_most_two_lists_whatever_it_owns(
    s3_store: S3Store, owned: int
) -> None:
    """``latest`` and ``read_with_items`` list the newest few keys in a small page; the
    markers of many owned items make that page too small, and the run is then listed again
    from its start in a whole page (one page shows the run at one moment, so nothing more
    is needed to confirm it): two LISTs, not three."""
    run = make_run(f"owner-{owned}")
    key = key_of(run)
    items = [make_item(f"w/{n:04}", owner=0) for n in range(owned)]
    with anyio.fail_after(DEADLINE):
        await _append_items(s3_store, run, 0, items=items)
        client = await s3_store.client()
        with RequestCounter.attached(client) as newest:
            assert await s3_store.latest(key, now=T0) is not None
        with RequestCounter.attached(client) as with_items:
            found = await s3_store.read_with_items(key, sequence=None, now=T0)
    assert newest.counts["ListObjectsV2"] <= 2
    assert with_items.counts["ListObjectsV2"] <= 2
    assert found is not None
    assert len(found[2]) == owned


async def test_joining_a_long_run_prunes_it_once_then_costs_one_delete(
    moto_endpoint: str, s3_store: S3Store
) -> None:
    """A process that did not write the run prunes what it does not know with one listing
    below what it knows; later creates delete the one key pair they know to be surplus."""
    with anyio.fail_after(DEADLINE):
        writer = _manager(s3_store, max_checkpoints_per_run=None)
        for n in range(40):
            await writer.create("joined", {"n": n})
        joiner_store = S3Store(s3_store.bucket, s3_store.prefix, region=REGION,
                               endpoint_url=moto_endpoint)
        try:
            joiner = _manager(joiner_store, max_checkpoints_per_run=3)
            client = await joiner_store.client()
            with RequestCounter.attached(client) as joining:
                await joiner.create("joined", {"n": 40})
            with RequestCounter.attached(client) as steady:
                await joiner.create("joined", {"n": 41})
            listed = await joiner.list_checkpoints("joined", limit=100)
            found = await client.list_objects_v2(
                Bucket=s3_store.bucket, Prefix=f"{s3_store.prefix}runs/"
            )
        finally:
            await joiner_store.aclose()

    # The proposal at 0 conflicts (1 LIST of the head, 1 GET of the run object this process
    # never read), the retry commits (with its two 304 checks), one LIST of what lies below the
    # known head finds the 37 surplus checkpoints, the run's floor is raised above them (1
    # PUT) and one DeleteObjects removes them.
    assert joining.counts == {
        "ListObjectsV2": 2, "GetObject": 3, "PutObject": 3, "DeleteObjects": 1
    }
    assert steady.counts == {"PutObject": 2, "GetObject": 2, "DeleteObjects": 1}
    assert [item.sequence for item in listed] == [41, 40, 39]
    assert len(found["Contents"]) == 1 + 2 * 3  # the run object, slot and marker of each


async def test_a_lost_race_heals_the_winners_marker_and_reports_the_head(
    s3_store: S3Store,
) -> None:
    """Two processes on one run: the one with stale knowledge gets 412 on the slot, writes
    the marker the winner had not written yet, and retries at the true next sequence."""
    with anyio.fail_after(DEADLINE):
        first = _manager(s3_store)
        created = await first.create("raced", {"n": 0})
        assert created is not None
        other_store = S3Store(s3_store.bucket, s3_store.prefix, client=await s3_store.client())
        other = _manager(other_store)
        await other.create("raced", {"n": 1})
        await other.create("raced", {"n": 2})
        client = await s3_store.client()
        found = await client.list_objects_v2(Bucket=s3_store.bucket, Prefix=s3_store.prefix)
        marker = next(e["Key"] for e in found["Contents"]
                      if e["Key"].split("/")[-2] == layout.inverted(2))
        await client.delete_object(Bucket=s3_store.bucket, Key=marker)  # as if still in flight

        with RequestCounter.attached(client) as racing:
            third = await first.create("raced", {"n": 3})
        after = await client.list_objects_v2(Bucket=s3_store.bucket, Prefix=s3_store.prefix)

    assert third is not None
    assert third.metadata.sequence == 3
    assert marker in {entry["Key"] for entry in after["Contents"]}
    # The slot PUT at 1 fails, one LIST of the head (+ a GET of the marker-less slot 2)
    # explains why; the marker is written; the retry at 3 commits: slot and marker. Each
    # attempt checks the run object (a 304) in the slot's round trip, and the one that
    # committed checks it again after.
    assert racing.counts == {"PutObject": 1 + 1 + 2, "ListObjectsV2": 1, "GetObject": 1 + 3}


async def test_restore_reads_the_run_object_once_per_status_change(s3_store: S3Store) -> None:
    with anyio.fail_after(DEADLINE):
        writer = _manager(s3_store)
        await writer.create("status", {"n": 0})
        reader_store = S3Store(
            s3_store.bucket, s3_store.prefix, client=await s3_store.client()
        )
        reader = _manager(reader_store)
        client = await s3_store.client()
        with RequestCounter.attached(client) as cold:
            assert await reader.restore("status") is not None
        with RequestCounter.attached(client) as warm:
            assert await reader.restore("status") is not None
        await writer.mark_completed("status")
        with RequestCounter.attached(client) as changed:
            restored = await reader.restore("status")

    assert cold.counts == {"ListObjectsV2": 1, "GetObject": 2}
    assert warm.counts == {"ListObjectsV2": 1, "GetObject": 1}
    assert changed.counts == {"ListObjectsV2": 1, "GetObject": 2}
    assert restored is not None
    assert restored.metadata.status.value == "completed"


# -- faults ---------------------------------------------------------------------------------------


@dataclass
class _Gate:
    """Stops the ``skip + 1``-th request matching ``pattern`` in the proxy until released:
    before moto sees it, or (``applied``) after moto applied it, before the reply."""

    pattern: re.Pattern[str]
    applied: bool = False
    skip: int = 0
    arrived: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)  # the proxy is threaded

    def stops(self, request: str) -> bool:
        if not self.pattern.search(request):
            return False
        with self.lock:
            self.skip -= 1
            return self.skip == -1

    def wait(self) -> None:
        self.arrived.set()
        self.release.wait(DEADLINE)

    async def reached(self) -> None:
        """Until the request is held (checked in a thread: the proxy runs in one)."""
        arrived = await anyio.to_thread.run_sync(self.arrived.wait, DEADLINE)
        assert arrived, f"no request matched {self.pattern.pattern}"


class _FaultyProxy(http.server.BaseHTTPRequestHandler):
    """Forwards to moto, but answers 503 SlowDown or cuts the connection for chosen requests,
    drops the reply of one chosen request after moto applied it, or holds one (``gate``)."""

    protocol_version = "HTTP/1.1"  # answers "Expect: 100-continue", which botocore sends
    upstream = ""
    faults: ClassVar[list[str]] = []  # one per request: "slowdown", "reset" or "" (forward)
    drop_reply_to: ClassVar[re.Pattern[str] | None] = None  # "METHOD /path?query", once
    slow_down: ClassVar[re.Pattern[str] | None] = None  # "METHOD /path?query", every time
    gate: ClassVar[_Gate | None] = None
    watches: ClassVar[list[tuple[re.Pattern[str], threading.Event]]] = []
    dropped = 0
    seen = 0

    @classmethod
    def hold(cls, pattern: re.Pattern[str], *, applied: bool = False, skip: int = 0) -> _Gate:
        cls.gate = _Gate(pattern, applied, skip)
        return cls.gate

    @classmethod
    def watch(cls, pattern: re.Pattern[str]) -> threading.Event:
        """Set once a reply to a request matching ``pattern`` (plus `` STATUS``) was sent."""
        answered = threading.Event()
        cls.watches.append((pattern, answered))
        return answered

    def _handle(self) -> None:
        type(self).seen += 1
        request = f"{self.command} {self.path}"
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        gate = type(self).gate
        if gate is not None and gate.stops(request):
            if not gate.applied:
                gate.wait()  # then handled as if it arrived now
            else:
                self._forward(body)
                gate.wait()
                type(self).dropped += 1
                self.connection.shutdown(socket.SHUT_RDWR)  # applied, but never heard of
                self.close_connection = True
                return
        fault = type(self).faults.pop(0) if type(self).faults else ""
        throttled = type(self).slow_down
        if throttled is not None and throttled.search(request):
            fault = "slowdown"
        wanted = type(self).drop_reply_to
        if wanted is not None and wanted.search(request):
            type(self).drop_reply_to = None
            type(self).dropped += 1
            self._forward(body)
            self.connection.shutdown(socket.SHUT_RDWR)  # applied, but the client never hears
            self.close_connection = True
            return
        if fault == "reset":
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        if fault == "slowdown":
            payload = b"<Error><Code>SlowDown</Code><Message>slow down</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        answer, data = self._forward(body)
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in ("content-length", "transfer-encoding", "connection", "date",
                                    "server"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        for pattern, answered in type(self).watches:
            if pattern.search(f"{request} {answer.status}"):
                answered.set()

    def _forward(self, body: bytes) -> tuple[http.client.HTTPResponse, bytes]:
        target = urlsplit(type(self).upstream)
        connection = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "expect")}
        headers["Host"] = target.netloc
        try:
            connection.request(self.command, self.path, body=body, headers=headers)
            answer = connection.getresponse()
            return answer, answer.read()
        finally:
            connection.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def faulty_proxy(moto_endpoint: str) -> Iterator[type[_FaultyProxy]]:
    _FaultyProxy.upstream = moto_endpoint
    _FaultyProxy.faults = []
    _FaultyProxy.drop_reply_to = None
    _FaultyProxy.slow_down = None
    _FaultyProxy.gate = None
    _FaultyProxy.watches = []
    _FaultyProxy.dropped = 0
    _FaultyProxy.seen = 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FaultyProxy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _FaultyProxy.address = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    try:
        yield _FaultyProxy
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("faults", "extra_attempts"),
    [
        (["slowdown", "slowdown", "", "slowdown"], 3),
        # A cut connection may also be retried inside aiohttp's pool without a new botocore
        # attempt, so only the outcome is exact there.
        (["reset", "", "reset", "slowdown", "reset"], None),
    ],
)
async def test_throttling_and_resets_are_retried(
    faulty_proxy: type[_FaultyProxy],
    s3_bucket: str,
    faults: list[str],
    extra_attempts: int | None,
) -> None:
    policy = RetryPolicy(base_delay=0.001, max_delay=0.002, max_retries=5)
    store = S3Store(s3_bucket, f"f-{secrets.token_hex(4)}", region=REGION,
                    endpoint_url=faulty_proxy.address, retry=policy)  # type: ignore[attr-defined]
    try:
        with anyio.fail_after(DEADLINE):
            manager = _manager(store)
            await manager.create("faulty", {"n": 0})
            client = await store.client()
            faulty_proxy.faults = list(faults)
            with RequestCounter.attached(client) as counter:
                created = await manager.create("faulty", {"n": 1})
                restored = await manager.restore("faulty")
    finally:
        await store.aclose()

    assert faulty_proxy.faults == []
    assert created is not None
    assert created.metadata.sequence == 1
    assert restored is not None
    assert restored.state == {"n": 1}
    if extra_attempts is not None:  # create: 2 PUTs + two 304 checks; restore: LIST + GET
        assert counter.total == 6 + extra_attempts
    # Nothing was created twice.
    assert await _count_slots(s3_bucket, store.prefix, faulty_proxy.upstream) == 2


async def _count_slots(bucket: str, prefix: str, endpoint: str) -> int:
    async with raw_client(endpoint) as client:
        found = await client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}runs/")
    keys = [entry["Key"][len(prefix) :].split("/") for entry in found.get("Contents", [])]
    return sum(1 for parts in keys if len(parts) == 4 and parts[2] == "c")


async def test_throttling_beyond_the_policy_is_unavailable(
    faulty_proxy: type[_FaultyProxy], s3_bucket: str
) -> None:
    store = S3Store(s3_bucket, "throttled", region=REGION,
                    endpoint_url=faulty_proxy.address,  # type: ignore[attr-defined]
                    retry=RetryPolicy(base_delay=0.001, max_delay=0.002, max_retries=2))
    faulty_proxy.faults = ["slowdown"] * 3
    try:
        with anyio.fail_after(DEADLINE), pytest.raises(StoreUnavailableError, match="throttling"):
            await store.get_run("a" * 24, now=0.0)
    finally:
        await store.aclose()
    assert faulty_proxy.seen == 3


async def test_a_slot_without_its_marker_is_still_committed(s3_store: S3Store) -> None:
    """A writer that stops between the slot PUT and the marker PUT leaves a readable checkpoint."""
    with anyio.fail_after(DEADLINE):
        manager = _manager(s3_store)
        await manager.create("torn", {"n": 0})
        created = await manager.create("torn", {"n": 1})
        assert created is not None
        client = await s3_store.client()
        found = await client.list_objects_v2(Bucket=s3_store.bucket, Prefix=s3_store.prefix)
        marker = next(e["Key"] for e in found["Contents"]
                      if e["Key"].split("/")[-2] == layout.inverted(1))
        await client.delete_object(Bucket=s3_store.bucket, Key=marker)

        restored = await manager.restore("torn")
        listed = await manager.list_checkpoints("torn")
        nxt = await manager.create("torn", {"n": 2})

    assert restored is not None
    assert restored.state == {"n": 1}
    assert [item.sequence for item in listed] == [1, 0]
    assert nxt is not None
    assert nxt.metadata.sequence == 2


# -- several processes --------------------------------------------------------------------------


async def test_processes_writing_one_run_get_unique_gap_free_sequences(
    moto_endpoint: str, s3_bucket: str
) -> None:
    prefix = f"mp-{secrets.token_hex(4)}"
    workers, count = 4, 8

    async def worker(outputs: list[list[int]]) -> None:
        result = await anyio.run_process(
            [sys.executable, str(ROOT / "tests" / "s3_worker.py"), moto_endpoint, s3_bucket,
             prefix, "shared", str(count)],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        outputs.append([int(line) for line in result.stdout.decode().split()])

    outputs: list[list[int]] = []
    with anyio.fail_after(180):
        async with anyio.create_task_group() as group:
            for _ in range(workers):
                group.start_soon(worker, outputs)
        store = S3Store(s3_bucket, prefix, region=REGION, endpoint_url=moto_endpoint)
        try:
            manager = _manager(store)
            listed = await manager.list_checkpoints("shared", limit=1000)
        finally:
            await store.aclose()

    acknowledged = sorted(seq for output in outputs for seq in output)
    assert acknowledged == list(range(workers * count))
    assert sorted(item.sequence for item in listed) == acknowledged


# -- event loops -------------------------------------------------------------------------------

async def _within(call: Awaitable[_T]) -> _T:
    with anyio.fail_after(DEADLINE):
        return await call


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_on_trio_every_call_says_the_store_needs_asyncio(
    moto_endpoint: str, s3_bucket: str
) -> None:
    built = S3Store(s3_bucket, "trio", region=REGION, endpoint_url=moto_endpoint)
    given = S3CheckpointStore(object(), bucket=s3_bucket)  # refused before it is touched
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: built.get_run("a" * 24, now=T0),
        lambda: CheckpointManager(built).create("trio", {"n": 0}),
        built.client,
        lambda: given.latest("a" * 24, now=T0),
    ]
    with anyio.fail_after(DEADLINE):
        for call in calls:
            with pytest.raises(ConfigurationError, match="S3Store runs on asyncio only"):
                await call()
        await built.aclose()  # nothing was opened


def test_one_store_serves_several_asyncio_runs(
    faulty_proxy: type[_FaultyProxy], s3_bucket: str
) -> None:
    """A module-level store and manager used by consecutive ``asyncio.run()`` calls, as
    FastAgentic's docs write them: the store opens a client in each event loop. (Through
    the proxy, which keeps connections alive as S3 does; moto closes each one.)"""
    store = S3Store(s3_bucket, f"loops-{secrets.token_hex(4)}", region=REGION,
                    endpoint_url=faulty_proxy.address)  # type: ignore[attr-defined]
    manager = CheckpointManager(store)
    first = asyncio.run(_within(manager.create("loops", {"n": 0})))
    second = asyncio.run(_within(manager.create("loops", {"n": 1})))
    restored = asyncio.run(_within(manager.restore("loops")))
    asyncio.run(_within(store.aclose()))

    assert first is not None
    assert second is not None
    assert second.metadata.sequence == 1
    assert restored is not None
    assert restored.checkpoint_id == second.checkpoint_id


def test_a_client_passed_in_refuses_another_event_loop(moto_endpoint: str, s3_bucket: str) -> None:
    """A client belongs to the event loop it was first used in: from another loop, the store
    refuses with a typed error before sending anything."""
    home, other = asyncio.new_event_loop(), asyncio.new_event_loop()
    stack = contextlib.AsyncExitStack()
    try:
        endpoint = AwsEndpoint(region=REGION, endpoint_url=moto_endpoint)
        client = home.run_until_complete(open_client(stack, "s3", endpoint, RetryPolicy()))
        store = S3Store(s3_bucket, f"bound-{secrets.token_hex(4)}", client=client)
        manager = CheckpointManager(store)
        created = home.run_until_complete(_within(manager.create("bound", {"n": 0})))
        with RequestCounter.attached(client) as elsewhere, pytest.raises(
            ConfigurationError, match="another event loop"
        ):
            other.run_until_complete(_within(manager.restore("bound")))
        restored = home.run_until_complete(_within(manager.restore("bound")))
    finally:
        home.run_until_complete(stack.aclose())
        home.close()
        other.close()

    assert elsewhere.counts == {}
    assert created is not None
    assert restored is not None
    assert restored.checkpoint_id == created.checkpoint_id


# -- FastAgentic alias -----------------------------------------------------------------------------


async def test_alias_works_with_a_stock_client(moto_endpoint: str, s3_bucket: str) -> None:
    session = get_session()
    with anyio.fail_after(DEADLINE):
        async with session.create_client(
            "s3", region_name=REGION, endpoint_url=moto_endpoint,
            config=Config(s3={"addressing_style": "path"}),
        ) as client:
            store = S3CheckpointStore(client, bucket=s3_bucket)
            assert store.prefix == "checkpoints/"
            manager = _manager(store)
            assert await manager.restore("never-created") is None
            assert await manager.restore_from("ck-" + "a" * 24 + "-" + "b" * 8 + "-0") is None
            created = await manager.create("alias", {"ok": True})
            assert created is not None
            restored = await manager.restore("alias")
            await store.aclose()
            # The store never closes a client it was given.
            await client.head_bucket(Bucket=s3_bucket)
            assert await manager.delete_run("alias") == 1
    assert restored is not None
    assert restored.state == {"ok": True}


# -- provisioning and the ops kit ----------------------------------------------------------------


async def test_provision_reports_what_it_created_and_what_it_found(moto_endpoint: str) -> None:
    bucket = unique_name("report")
    store = S3Store(bucket, "p", region=REGION, endpoint_url=moto_endpoint)
    try:
        with anyio.fail_after(DEADLINE):
            first = await store.provision()
            client = await store.client()
            with RequestCounter.attached(client) as checking:
                again = await store.provision()
            backstop = await store.provision(backstop_days=30)
            dropped = await store.provision()
    finally:
        await store.aclose()

    noncurrent, backstop_rule = (rule["ID"] for rule in lifecycle_rules("p/", backstop_days=30))
    assert first == [f"created bucket s3://{bucket}", "enabled versioning",
                     "enabled default encryption AES256",
                     f"created lifecycle rule {noncurrent}"]
    assert again == [f"found bucket s3://{bucket}", "found versioning",
                     "found default encryption AES256",
                     f"found lifecycle rule {noncurrent}"]
    assert not any(name.startswith(("Put", "Create")) for name in checking.counts)
    assert backstop[3:] == [f"found lifecycle rule {noncurrent}",
                            f"created lifecycle rule {backstop_rule}"]
    assert dropped[3:] == [f"found lifecycle rule {noncurrent}",
                           f"removed lifecycle rule {backstop_rule}"]


async def test_provision_keeps_a_default_encryption_of_the_bucket(moto_endpoint: str) -> None:
    bucket = unique_name("kms")
    store = S3Store(bucket, region=REGION, endpoint_url=moto_endpoint)
    try:
        with anyio.fail_after(DEADLINE):
            client = await store.client()
            await client.create_bucket(Bucket=bucket)
            await client.put_bucket_encryption(
                Bucket=bucket,
                ServerSideEncryptionConfiguration={"Rules": [
                    {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms"}}]},
            )
            done = await store.provision()
            encryption = await client.get_bucket_encryption(Bucket=bucket)
    finally:
        await store.aclose()

    assert done[:3] == [f"found bucket s3://{bucket}", "enabled versioning",
                        "found default encryption aws:kms"]
    sse = encryption["ServerSideEncryptionConfiguration"]["Rules"][0]
    assert sse["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "aws:kms"


async def test_provision_is_idempotent_and_keeps_foreign_rules(moto_endpoint: str) -> None:
    bucket = unique_name("prov")
    store = S3Store(bucket, region=REGION, endpoint_url=moto_endpoint)
    try:
        with anyio.fail_after(DEADLINE):
            await store.provision()
            client = await store.client()
            foreign = {"ID": "theirs", "Status": "Enabled", "Filter": {"Prefix": "logs/"},
                       "Expiration": {"Days": 30}}
            rules = await client.get_bucket_lifecycle_configuration(Bucket=bucket)
            await client.put_bucket_lifecycle_configuration(
                Bucket=bucket, LifecycleConfiguration={"Rules": [*rules["Rules"], foreign]}
            )
            await store.provision()
            versioning = await client.get_bucket_versioning(Bucket=bucket)
            encryption = await client.get_bucket_encryption(Bucket=bucket)
            lifecycle = await client.get_bucket_lifecycle_configuration(Bucket=bucket)
    finally:
        await store.aclose()

    assert versioning["Status"] == "Enabled"
    sse = encryption["ServerSideEncryptionConfiguration"]["Rules"][0]
    assert sse["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    by_id = {rule["ID"]: rule for rule in lifecycle["Rules"]}
    assert sorted(by_id) == ["fastcheckpoint-noncurrent", "theirs"]
    kit = json.loads((ROOT / "stores" / "s3" / "lifecycle.json").read_text())
    assert [_normalized(by_id[rule["ID"]]) for rule in kit["Rules"]] == [
        _normalized(rule) for rule in kit["Rules"]
    ]


def _normalized(rule: Mapping[str, Any]) -> dict[str, Any]:
    """A rule as S3 echoes it: moto and AWS add empty optional fields; keep what we set."""
    keys = ("ID", "Status", "Filter", "Expiration", "NoncurrentVersionExpiration",
            "AbortIncompleteMultipartUpload")
    result = {key: rule[key] for key in keys if key in rule}
    if "NoncurrentVersionExpiration" in result:
        result["NoncurrentVersionExpiration"] = {
            "NoncurrentDays": result["NoncurrentVersionExpiration"]["NoncurrentDays"]
        }
    return result


def test_lifecycle_kit_equals_the_rules_provision_sets() -> None:
    kit = json.loads((ROOT / "stores" / "s3" / "lifecycle.json").read_text())
    assert kit == {"Rules": lifecycle_rules("")}
    backstop = lifecycle_rules("p/", backstop_days=91)
    assert backstop[1]["Expiration"] == {"Days": 91}
    assert all(rule["Filter"] == {"Prefix": "p/"} for rule in backstop)


_IAM_ACTIONS = {
    "PutObject": "s3:PutObject",
    "GetObject": "s3:GetObject",
    "HeadObject": "s3:GetObject",
    "HeadBucket": "s3:ListBucket",
    "GetBucketVersioning": "s3:GetBucketVersioning",
    "GetBucketEncryption": "s3:GetEncryptionConfiguration",
    "DeleteObject": "s3:DeleteObject",
    "DeleteObjects": "s3:DeleteObject",
    "ListObjectsV2": "s3:ListBucket",
    "CreateBucket": "s3:CreateBucket",
    "PutBucketVersioning": "s3:PutBucketVersioning",
    "PutBucketEncryption": "s3:PutEncryptionConfiguration",
    "GetBucketLifecycleConfiguration": "s3:GetLifecycleConfiguration",
    "PutBucketLifecycleConfiguration": "s3:PutLifecycleConfiguration",
}


async def test_iam_policy_grants_exactly_what_the_store_calls(moto_endpoint: str) -> None:
    bucket = unique_name("iam")
    store = S3Store(bucket, "iam", region=REGION, endpoint_url=moto_endpoint)
    try:
        with anyio.fail_after(DEADLINE):
            client = await store.client()
            with RequestCounter.attached(client) as provisioning:
                await store.provision()
            with RequestCounter.attached(client) as running:
                await _full_workload(store)
    finally:
        await store.aclose()

    policy = json.loads((ROOT / "stores" / "s3" / "iam-policy.json").read_text())
    granted = {sid["Sid"]: set(sid["Action"]) for sid in policy["Statement"]}
    used = {_IAM_ACTIONS[name] for name in running.counts}
    assert used == granted["FastcheckpointObjects"] | granted["FastcheckpointList"]
    assert {_IAM_ACTIONS[name] for name in provisioning.counts} == granted[
        "FastcheckpointProvision"
    ]


async def _full_workload(store: S3Store) -> None:
    """Every store operation once or more, the way the manager and adapters call them."""
    clock = [T0]
    manager = _manager(store, max_checkpoints_per_run=2, clock=lambda: clock[0])
    first = await manager.create("iam", {"n": 0}, ttl_seconds=5)
    assert first is not None
    for n in range(1, 4):
        await manager.create("iam", {"n": n})
    await manager.restore("iam")
    await manager.list_checkpoints("iam")
    await manager.mark_completed("iam")
    await manager.list_runs(status=CheckpointStatus.COMPLETED)
    await manager.count_runs()
    latest = await manager.restore("iam")
    assert latest is not None
    await manager.restore_from(latest.checkpoint_id)
    await manager.delete(latest.checkpoint_id)
    key = _ids.run_key("iam")
    await store.put_items(key, [make_item("a", owner=3, expires_at=T0 + 5)], now=T0)
    await store.put_items(key, [make_item("b")], create_only=True, now=T0)
    await store.get_items(key, ["a", "b"], now=T0)
    await store.scan_items(key, now=T0)
    await store.delete_items(key, ["b"])
    await capability_calls(store)
    clock[0] = T0 + 10
    await manager.cleanup_expired()
    await manager.delete_run("iam")
