"""The run item's book stays under a fixed size however many checkpoints a run holds (issue
12, item 14): the oldest checkpoints in detail, the rest counted, taken in from their items
with one Query per refill. Pure simulations up to 40,000 checkpoints, then the store on moto with
a book of 8 entries, so every path past the front runs at a scale moto allows."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from fastcheckpoint.stores import _dynamodb_layout as layout
from fastcheckpoint.stores._dynamodb_layout import Book
from fastcheckpoint.stores.dynamodb import DynamoDBStore
from fastcheckpoint.testing._builders import (
    T0,
    checkpoint_id_of,
    key_of,
    make_checkpoint,
    make_item,
    make_run,
)
from tests.stores._moto import moto_endpoint
from tests.stores.dynamodb.test_dynamodb import (
    _raw_item,
    atomic_moto,
    aws_names,
    counting,
    provisioned,
    store,
)

__all__ = ["atomic_moto", "aws_names", "moto_endpoint", "provisioned", "store"]

SMALL = 8
"""The book capacity of the moto tests: the back starts after a handful of checkpoints."""
DAY = 86400.0


# -- pure simulations -----------------------------------------------------------------------


class _Log:
    """A run's checkpoint items, and the book an append keeps of them, as the store does."""

    def __init__(self, capacity: int = layout.FRONT_CAPACITY) -> None:
        self.capacity = capacity
        self.book = Book()
        self.items: dict[int, float | None] = {}
        self.refills = 0

    def append(self, sequence: int, expires_at: float | None, now: float,
               keep_latest: int | None) -> None:
        wanted = self.book.wanted(now, keep_latest, coming=1)
        if wanted and self.book.back is not None:
            self.refills += 1
            start = self.book.back.start
            room = max(self.capacity - self.book.detail, 0)
            limit = max(wanted, min(layout.REFILL, room))
            # ``items`` iterates in ascending sequence (appends come in order).
            back = itertools.islice((s for s in self.items if s >= start), limit + 1)
            taken = list(back)
            self.book.absorb([(s, self.items[s], None) for s in taken[:limit]],
                             len(taken) <= limit)
        self.book.add(sequence, expires_at, None, capacity=self.capacity)
        self.items[sequence] = expires_at
        for removed in self.book.prune(now, keep_latest):
            del self.items[removed]
        assert self.book.count == len(self.items)

    @property
    def size(self) -> int:
        return len(layout.BOOK_ENCODER.encode(self.book))


@pytest.mark.parametrize(
    ("name", "ttl", "keep_latest", "appends"),
    [
        # Past the 31,800 held checkpoints at which the old book reached 400 KB.
        ("90-day TTL, no pruning (the reported case)", lambda n: 90 * DAY, None, 40_000),
        ("mixed TTLs, no pruning", lambda n: random.Random(n).choice([60.0, 90 * DAY]), None,
         12_000),
        ("short TTL: expiries flow through the front", lambda n: 5000.0, None, 12_000),
        ("a limit above the front", lambda n: 90 * DAY, 5_000, 12_000),
    ],
)
def test_the_book_stays_bounded(
    name: str, ttl: Callable[[int], float], keep_latest: int | None, appends: int
) -> None:
    log = _Log()
    sizes = []
    for sequence in range(appends):
        now = T0 + sequence
        log.append(sequence, now + ttl(sequence), now, keep_latest)
        if sequence % 1_000 == 999:
            sizes.append(log.size)
    # About 15 bytes per detailed entry at most, whatever the run holds (the old book took
    # 13 bytes per held checkpoint: 520 KB at 40,000).
    assert max(sizes) <= layout.FRONT_CAPACITY * 20, (name, sizes)
    if name.startswith("90-day"):
        assert sizes[-1] - sizes[3] <= 16, sizes  # past the front, only counters change
    assert log.refills <= appends // 200, (name, log.refills)  # a Query per ~256 appends
    last = T0 + appends - 1
    live = [at for at in log.items.values() if at is not None and at > last]
    if keep_latest is not None:
        assert len(log.items) == keep_latest
    assert log.book.expires_at() == max(live)


def test_the_front_refills_with_the_oldest_and_keeps_counts_exact() -> None:
    log = _Log(capacity=SMALL)
    for sequence in range(50):
        log.append(sequence, T0 + 1000 + sequence, T0, keep_latest=20)
    assert sorted(log.items) == list(range(30, 50))
    assert log.book.back is not None
    assert log.book.count == 20
    assert log.book.detail <= SMALL + 1
    # 30-49 expire (T0 + 1030-1049) while 50-79 are appended: each append removes what
    # expired, through the front, taking in more from the back as it runs dry.
    for sequence in range(50, 80):
        log.append(sequence, T0 + 2000 + sequence, T0 + 990 + sequence, keep_latest=None)
    assert sorted(log.items) == list(range(50, 80))
    assert log.book.expires_at() == T0 + 2079


def test_books_keep_blob_suffixes_and_read_whole_keys_of_older_books() -> None:
    key = layout.blob_key("runkey", "incarnat", 3, "0a1b2c3d")
    assert key == f"runkey/incarnat/{3:020d}-0a1b2c3d"
    assert layout.blob_suffix(key) == "0a1b2c3d"
    assert layout.blob_sequence(key) == 3
    assert layout.blob_key("runkey", "incarnat", 3, key) == key  # a whole key is kept as is
    assert layout.blob_sequence("runkey/elsewhere") is None


# -- the store on moto ---------------------------------------------------------------------


def _item_bytes(item: dict[str, Any]) -> int:
    """DynamoDB's size of an item: attribute names plus values."""
    size = 0
    for name, value in item.items():
        size += len(name)
        (kind, inner), = value.items()
        if kind == "NS":
            size += sum(len(str(number)) for number in inner)
        else:
            size += len(inner) if isinstance(inner, (bytes, str)) else 8
    return size


pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


@pytest.fixture
def small(store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch) -> DynamoDBStore:
    """The session's store with a book of ``SMALL`` entries."""
    monkeypatch.setattr(store, "_book_capacity", SMALL)
    return store


async def test_the_run_item_does_not_grow_with_held_checkpoints(small: DynamoDBStore) -> None:
    run = make_run("unbounded", expires_at=T0 + 90 * DAY)
    key = key_of(run)
    sizes: dict[int, int] = {}
    with anyio.fail_after(120):
        await small.clients()
        for sequence in range(72):
            with counting(small) as (dynamo, s3):
                await small.append(key, make_checkpoint(run, sequence, expires_at=T0 + 90 * DAY),
                                   run=run, keep_latest=None, now=T0)
            assert (dynamo.counts, s3.counts) == ({"TransactWriteItems": 1}, {}), sequence
            if sequence + 1 in (24, 72):
                raw = await _raw_item(small, key, layout.RUN_SK)
                assert raw is not None
                sizes[sequence + 1] = _item_bytes(raw)
        assert sizes[72] - sizes[24] <= 4, sizes  # a count's digits, not 48 entries more

        held = await small.get_run(key, now=T0)
        assert held is not None
        assert (held.checkpoint_count, held.latest_sequence) == (72, 71)
        assert held.expires_at == T0 + 90 * DAY
        for sequence in (0, 5, 40, 71):  # front and back alike
            found = await small.get(key, sequence, now=T0)
            assert found is not None
            assert found[0].checkpoint_id == checkpoint_id_of(run, sequence)
        page, _ = await small.headers(key, before=None, limit=100, now=T0)
        assert [header.sequence for header in page] == list(range(71, -1, -1))
        with counting(small) as (dynamo, _):
            latest = await small.latest(key, now=T0)
        assert dynamo.counts == {"Query": 1}
        assert latest is not None
        assert latest[0].sequence == 71


async def test_a_limit_above_the_front_prunes_exactly_with_amortised_reads(
    small: DynamoDBStore,
) -> None:
    run = make_run("long-limit")
    key = key_of(run)
    with anyio.fail_after(120):
        await small.clients()
        for sequence in range(20):
            await small.append(key, make_checkpoint(run, sequence, expires_at=T0 + DAY + sequence),
                               run=run, keep_latest=20, now=T0)
        with counting(small) as (dynamo, _):
            for sequence in range(20, 60):
                await small.append(
                    key, make_checkpoint(run, sequence, expires_at=T0 + DAY + sequence), run=run,
                    keep_latest=20, now=T0)
        assert dynamo.counts["TransactWriteItems"] == 40
        # The front takes in up to 8 at a time: a Query every few appends, not every one.
        assert dynamo.counts.get("Query", 0) <= 40 // (SMALL - 2) + 1, dynamo.counts
        page, _ = await small.headers(key, before=None, limit=100, now=T0, include_expired=True)
        assert [header.sequence for header in page] == list(range(59, 39, -1))
        held = await small.get_run(key, now=T0)
        assert held is not None
        assert held.checkpoint_count == 20


async def test_expiry_past_the_front_is_hidden_then_purged(small: DynamoDBStore) -> None:
    run = make_run("expiring-back")
    key = key_of(run)
    with anyio.fail_after(120):
        # 0-11 never expire (one range: the front holds them all in one entry), then 16
        # expiring ones: the first fill the front, the rest go to the back.
        for sequence in range(28):
            expires_at = None if sequence < 12 else T0 + 100 + sequence
            await small.append(key, make_checkpoint(run, sequence, expires_at=expires_at),
                               run=run, keep_latest=None, now=T0)
        raw: Any = await _raw_item(small, key, layout.RUN_SK)
        back = layout.BOOK_DECODER.decode(raw["bk"]["B"]).back
        assert back is not None
        assert back.start < 27

        at = T0 + 100 + 27  # every expiring one has expired
        assert await small.get(key, 27, now=at) is None
        latest = await small.latest(key, now=at)
        assert latest is not None
        assert latest[0].sequence == 11
        assert await small.purge_expired(now=at, limit=100) == (16, True)
        page, _ = await small.headers(key, before=None, limit=100, now=T0, include_expired=True)
        assert [header.sequence for header in page] == list(range(11, -1, -1))
        held = await small.get_run(key, now=at)
        assert held is not None
        assert (held.checkpoint_count, held.expires_at) == (12, None)


async def test_removing_the_latest_expiring_checkpoint_lowers_a_long_runs_expiry(
    small: DynamoDBStore,
) -> None:
    run = make_run("long-expiry")
    key = key_of(run)
    expiries = [T0 + 1000 - sequence for sequence in range(20)]  # the oldest expires last
    expiries[15] = T0 + 5000  # ... but one in the back expires later still
    with anyio.fail_after(120):
        for sequence, expires_at in enumerate(expiries):
            await small.append(key, make_checkpoint(run, sequence, expires_at=expires_at),
                               run=run, keep_latest=None, now=T0)
        held = await small.get_run(key, now=T0)
        assert held is not None
        assert held.expires_at == T0 + 5000
        assert await small.delete(key, 15, checkpoint_id=checkpoint_id_of(run, 15))
        held = await small.get_run(key, now=T0)
        assert held is not None
        assert (held.checkpoint_count, held.expires_at) == (19, T0 + 1000)
        # Pruning the oldest (which expires last) lowers it again.
        await small.append(key, make_checkpoint(run, 20, expires_at=T0 + 10), run=run,
                           keep_latest=19, now=T0)
        held = await small.get_run(key, now=T0)
        assert held is not None
        assert (held.checkpoint_count, held.expires_at) == (19, T0 + 999)


async def test_owners_beyond_the_run_items_list_still_lose_their_items(
    small: DynamoDBStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(layout, "OWNERS_CAPACITY", 4)
    run = make_run("many-owners")
    key = key_of(run)
    with anyio.fail_after(120):
        for sequence in range(10):
            await small.append(key, make_checkpoint(run, sequence), run=run, keep_latest=None,
                               now=T0)
            await small.put_items(key, [make_item(f"of-{sequence}", owner=sequence)], now=T0)
        await small.append(key, make_checkpoint(run, 10), run=run, keep_latest=None, now=T0)
        raw: Any = await _raw_item(small, key, layout.RUN_SK)
        assert len(raw["own"]["NS"]) <= 4
        assert int(raw["ofl"]["N"]) > 0  # below the floor every checkpoint counts as owning

        await small.append(key, make_checkpoint(run, 11), run=run, keep_latest=3, now=T0)

        kept = await small.get_items(key, [f"of-{s}" for s in range(10)], now=T0)
        assert sorted(kept) == ["of-9"]
        for sequence in range(9):
            assert await _raw_item(small, key, layout.owned_sk(sequence, f"of-{sequence}")) is None


async def test_reading_the_backs_expiry_again_counts_the_checkpoint_being_appended(
    small: DynamoDBStore,
) -> None:
    """Pruning the checkpoint that expires last makes the store read the back's expiries
    again; the checkpoint this append adds to the back is not in the table yet, and its
    expiry must still count, or the run expires (and is purged) while it holds it."""
    run = make_run("rescan-newest")
    key = key_of(run)
    # 0-6 fill the front (a range and 7 expiries); 7 (expiring last) and 8-9 go to the back.
    expiries = [T0 + 100.0] * 7 + [T0 + 5000.0, T0 + 100.0, T0 + 100.0]
    with anyio.fail_after(120):
        for sequence, expires_at in enumerate(expiries):
            await small.append(key, make_checkpoint(run, sequence, expires_at=expires_at),
                               run=run, keep_latest=None, now=T0)
        # Keeping 3 prunes 0-7: 7 comes into the front and goes; 10 joins 8 and 9 in the back.
        await small.append(key, make_checkpoint(run, 10, expires_at=T0 + 2000), run=run,
                           keep_latest=3, now=T0)
        held = await small.get_run(key, now=T0)
        assert held is not None
        assert (held.checkpoint_count, held.expires_at) == (3, T0 + 2000)
        later = T0 + 100  # 8 and 9 have expired, 10 has not
        latest = await small.latest(key, now=later)
        assert latest is not None
        assert latest[0].sequence == 10
        while not (await small.purge_expired(now=later, limit=100))[1]:
            pass  # the session's table holds other tests' expired records too
        found = await small.get(key, 10, now=later)
        assert found is not None
        for sequence in (8, 9):
            assert await _raw_item(small, key, layout.checkpoint_sk(sequence)) is None


async def test_a_lowered_limit_converges_past_the_front_at_the_next_create(
    small: DynamoDBStore,
) -> None:
    """Most of the run is in the back (counted, not detailed): the next create under a lower
    limit still leaves exactly that many, taking in from the back what pruning needs."""
    run = make_run("lowered-limit")
    key = key_of(run)
    with anyio.fail_after(120):
        for sequence in range(30):
            await small.append(key, make_checkpoint(run, sequence, expires_at=T0 + DAY + sequence),
                               run=run, keep_latest=None, now=T0)
        raw: Any = await _raw_item(small, key, layout.RUN_SK)
        back = layout.BOOK_DECODER.decode(raw["bk"]["B"]).back
        assert back is not None
        assert back.count > 20
        await small.append(key, make_checkpoint(run, 30, expires_at=T0 + DAY + 30), run=run,
                           keep_latest=3, now=T0)
        held = await small.get_run(key, now=T0)
        assert held is not None
        assert (held.checkpoint_count, held.expires_at) == (3, T0 + DAY + 30)
        page, _ = await small.headers(key, before=None, limit=100, now=T0, include_expired=True)
        assert [header.sequence for header in page] == [30, 29, 28]
        for sequence in (0, 10, 27):
            assert await _raw_item(small, key, layout.checkpoint_sk(sequence)) is None
