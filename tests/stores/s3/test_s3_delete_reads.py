"""``delete`` (and the cleanup loop burying a run's newest expired checkpoint) reads what the
slot names as its predecessor (``Slot.after``) for its tombstone: only the slot's last bytes
(a ranged GET), never its payload, with the request count it had when it read the whole
slot."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from fastcheckpoint.stores import _s3_layout as layout
from fastcheckpoint.stores._aws import RequestCounter
from fastcheckpoint.stores.s3 import S3Store
from fastcheckpoint.testing import T0, key_of, make_checkpoint, make_run
from fastcheckpoint.testing._adapter import _append_items
from fastcheckpoint.testing._builders import checkpoint_id_of
from tests.stores._moto import moto_endpoint
from tests.stores.s3.test_s3 import DEADLINE
from tests.stores.s3.test_s3_sequence_guard import stores

__all__ = ["moto_endpoint", "stores"]

pytestmark = pytest.mark.anyio

_PAYLOAD = 300_000


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


class _Reads:
    """The GetObject calls of one client: key, Range asked, bytes received."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None, int]] = []

    def of(self, key: str) -> list[tuple[str | None, int]]:
        return [(asked, size) for called, asked, size in self.calls if called == key]


@pytest.fixture
def reads() -> _Reads:
    return _Reads()


def _watch(monkeypatch: pytest.MonkeyPatch, client: Any, found: _Reads) -> None:
    get_object = client.get_object

    async def watched(**kwargs: Any) -> Any:
        response = await get_object(**kwargs)
        found.calls.append((kwargs["Key"], kwargs.get("Range"),
                            int(response.get("ContentLength", -1))))
        return response

    monkeypatch.setattr(client, "get_object", watched)


async def _buried_by(
    store: S3Store, run_key: str, reads: _Reads, monkeypatch: pytest.MonkeyPatch,
    bury: Callable[[], Awaitable[Any]],
) -> tuple[list[tuple[str | None, int]], layout.Slot, dict[str, int]]:
    """The reads of slot 1 that ``bury`` (through ``store``) makes, the tombstone there
    afterwards, and the requests ``bury`` sent."""
    client = await store.client()
    _watch(monkeypatch, client, reads)
    with RequestCounter.attached(client) as counted:
        await bury()
    monkeypatch.undo()
    return (reads.of(store.prefix + layout.slot_key(run_key, 1)),
            await _slot(store, run_key, 1), dict(counted.counts))


async def _slot(store: S3Store, run_key: str, sequence: int) -> layout.Slot:
    client = await store.client()
    key = store.prefix + layout.slot_key(run_key, sequence)
    found = await client.get_object(Bucket=store.bucket, Key=key)
    blob = await found["Body"].read()
    return layout.decode_slot(blob, key, run_key=run_key, sequence=sequence)


async def test_delete_reads_the_end_of_the_slot_not_its_payload(
    stores: tuple[S3Store, S3Store], reads: _Reads, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A checkpoint with a 300 KB payload is deleted by another process: its slot is read
    with ``Range: bytes=-4096`` (4,096 bytes received), the tombstone carries what the slot
    named (the token of checkpoint 0), and the requests are those the whole read took."""
    writer, deleter = stores
    run = make_run("big")
    key = key_of(run)
    big = make_checkpoint(run, 1, payload=b"p" * _PAYLOAD)
    with anyio.fail_after(DEADLINE):
        await writer.append(key, make_checkpoint(run, 0), run=run, keep_latest=None, now=T0)
        await writer.append(key, big, run=run, keep_latest=None, now=T0)
        before = await _slot(writer, key, 0)
        read, tombstone, deleting = await _buried_by(
            deleter, key, reads, monkeypatch,
            lambda: deleter.delete(key, 1, checkpoint_id=checkpoint_id_of(run, 1)))

    assert read == [("bytes=-4096", 4096)]
    assert tombstone.tombstone
    assert tombstone.after == before.token
    assert deleting == {"ListObjectsV2": 1, "GetObject": 2, "PutObject": 2,
                               "DeleteObjects": 1}


async def test_a_slot_whose_end_does_not_show_what_it_names_is_read_whole(
    stores: tuple[S3Store, S3Store], reads: _Reads, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A checkpoint naming many shared items (its refs longer than the bytes read): the
    ranged GET does not show ``after``, so the whole slot is read (1 GET more), and the
    tombstone carries what it named."""
    writer, deleter = stores
    run = make_run("many-refs")
    key = key_of(run)
    refs = [f"b/{'r' * 120}{number:03}" for number in range(60)]
    with anyio.fail_after(DEADLINE):
        await _append_items(writer, run, 0)
        await _append_items(writer, run, 1, refs=refs)
        before = await _slot(writer, key, 0)
        read, tombstone, _ = await _buried_by(
            deleter, key, reads, monkeypatch,
            lambda: deleter.delete(key, 1, checkpoint_id=checkpoint_id_of(run, 1)))

    assert [asked for asked, _ in read] == ["bytes=-4096", None]
    assert tombstone.after == before.token


async def test_the_cleanup_loop_burying_the_newest_reads_its_end(
    stores: tuple[S3Store, S3Store], reads: _Reads, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The run's newest checkpoint expires before the one under it: the cleanup loop
    replaces it with a tombstone carrying what it named, reading the end of its slot
    only."""
    writer, cleaner = stores
    run = make_run("expiring")
    key = key_of(run)
    expiring = make_checkpoint(run, 1, expires_at=T0 + 10, payload=b"p" * _PAYLOAD)
    with anyio.fail_after(DEADLINE):
        await writer.append(key, make_checkpoint(run, 0, expires_at=T0 + 100), run=run,
                            keep_latest=None, now=T0)
        await writer.append(key, expiring, run=run, keep_latest=None, now=T0)
        before = await _slot(writer, key, 0)
        read, tombstone, _ = await _buried_by(
            cleaner, key, reads, monkeypatch,
            lambda: cleaner.purge_expired(now=T0 + 20, limit=100))

    assert read == [("bytes=-4096", 4096)]
    assert tombstone.tombstone
    assert tombstone.after == before.token
