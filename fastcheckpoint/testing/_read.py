"""The store contract: reading the checkpoint log (``get``, ``latest``, ``headers``)."""

from __future__ import annotations

import functools
import random

import pytest

from fastcheckpoint.errors import ValidationError
from fastcheckpoint.stores._base import CheckpointStore, StoredCheckpoint
from fastcheckpoint.testing._builders import T0, header_of, key_of, make_item, make_run, without_key
from fastcheckpoint.testing._contract import (
    ContractBase,
    _append,
    _append_many,
    _refuses_not_run_keys,
    _update,
)

__all__ = ["ReadContract"]


class ReadContract(ContractBase):
    """``get``, ``latest`` and ``headers``.

    Live checkpoints come back as written, with the run's current status; ``latest`` skips
    expired ones; ``headers`` pages newest first without payloads, counts only live headers
    unless ``include_expired``; a checkpoint is expired from its ``expires_at`` on. Payloads of
    1 MiB, empty ones and every byte value round-trip. The tests write with ``append``.
    """

    # -- reads --------------------------------------------------------------------------------

    async def test_get_returns_checkpoint_and_status(self, store: CheckpointStore) -> None:
        seed = make_run("read", status="paused")
        written = await _append_many(store, seed, [0, 1, 2], expires_at=T0 + 50)
        for record in written:
            found = await store.get(key_of(seed), record.sequence, now=T0)
            assert found is not None
            assert without_key(found[0]) == record
            assert found[1] == "paused"

    async def test_reads_fill_the_store_key(self, store: CheckpointStore) -> None:
        seed = make_run("where")
        await _append(store, seed, 0)
        got = await store.get(key_of(seed), 0, now=T0)
        latest = await store.latest(key_of(seed), now=T0)
        assert got is not None
        assert latest is not None
        assert got[0].key
        assert latest[0].key

    async def test_get_missing_returns_none(self, store: CheckpointStore) -> None:
        seed = make_run("missing")
        key = key_of(seed)
        assert await store.get(key, 0, now=T0) is None
        await _append_many(store, seed, [0, 1])
        assert await store.get(key, 2, now=T0) is None
        assert await store.get(key, -1, now=T0) is None
        assert await store.get(key_of(make_run("other")), 0, now=T0) is None

    async def test_a_sequence_that_is_no_int_is_refused(self, store: CheckpointStore) -> None:
        """A sequence of another type is the caller's mistake (``ValidationError``, as for every
        argument); an ``int`` no checkpoint holds, however large, finds none."""
        seed = make_run("typed")
        key = key_of(seed)
        await _append(store, seed, 0)
        for wrong in ("0", 0.0, True, None, 2**64):
            with pytest.raises(ValidationError):
                await store.get(key, wrong, now=T0)  # type: ignore[arg-type]
        assert await store.get(key, 2**62, now=T0) is None

    async def test_get_expired_returns_none(self, store: CheckpointStore) -> None:
        seed = make_run("ageing")
        key = key_of(seed)
        await _append(store, seed, 0)
        await _append(store, seed, 1, expires_at=T0 + 10)
        assert await store.get(key, 1, now=T0 + 9.5) is not None
        assert await store.get(key, 1, now=T0 + 10) is None
        assert await store.get(key, 1, now=T0 + 1000) is None
        assert await store.get(key, 0, now=T0 + 1000) is not None

    async def test_latest_returns_newest(self, store: CheckpointStore) -> None:
        seed = make_run("newest", status="completed")
        key = key_of(seed)
        assert await store.latest(key, now=T0) is None
        for sequence in range(4):
            record = await _append(store, seed, sequence)
            found = await store.latest(key, now=T0)
            assert found is not None
            assert without_key(found[0]) == record
            assert found[1] == "completed"

    async def test_latest_skips_expired_newest(self, store: CheckpointStore) -> None:
        seed = make_run("skip-expired")
        key = key_of(seed)
        await _append(store, seed, 0, expires_at=T0 + 30)
        older = await _append(store, seed, 1, expires_at=T0 + 20)
        await _append(store, seed, 2, expires_at=T0 + 10)
        await _append(store, seed, 3, expires_at=T0 + 10)

        found = await store.latest(key, now=T0 + 10)
        assert found is not None
        assert without_key(found[0]) == older
        assert found[1] == "active"
        found = await store.latest(key, now=T0 + 20)
        assert found is not None
        assert found[0].sequence == 0
        assert await store.latest(key, now=T0 + 30) is None

    async def test_headers_newest_first_without_payload(self, store: CheckpointStore) -> None:
        seed = make_run("listed", status="paused")
        written = await _append_many(store, seed, range(5), expires_at=T0 + 99)

        found, status = await store.headers(key_of(seed), before=None, limit=100, now=T0)

        assert status == "paused"
        assert found == [header_of(record) for record in reversed(written)]
        assert not any(isinstance(header, StoredCheckpoint) for header in found)

    async def test_headers_before_and_limit(self, store: CheckpointStore) -> None:
        seed = make_run("paged")
        key = key_of(seed)
        await _append_many(store, seed, range(10))

        async def page(before: int | None, limit: int) -> list[int]:
            found, _ = await store.headers(key, before=before, limit=limit, now=T0)
            return [header.sequence for header in found]

        assert await page(None, 3) == [9, 8, 7]
        assert await page(7, 3) == [6, 5, 4]
        assert await page(2, 10) == [1, 0]
        assert await page(0, 10) == []
        assert await page(100, 2) == [9, 8]
        assert await page(5, 1) == [4]
        visited: list[int] = []
        before: int | None = None
        for _ in range(10):
            chunk = await page(before, 4)
            if not chunk:
                break
            visited += chunk
            before = chunk[-1]
        assert visited == list(range(9, -1, -1))

    async def test_headers_limit_counts_live_headers(self, store: CheckpointStore) -> None:
        seed = make_run("gaps")
        await _append_many(store, seed, [0, 1, 2])
        await _append_many(store, seed, [3, 4], expires_at=T0 + 10)
        await _append(store, seed, 5)

        found, _ = await store.headers(key_of(seed), before=None, limit=2, now=T0 + 10)

        assert [header.sequence for header in found] == [5, 2]

    async def test_headers_include_expired(self, store: CheckpointStore) -> None:
        seed = make_run("history", status="paused")
        written = await _append_many(store, seed, [0, 1], expires_at=T0 + 10)
        written.append(await _append(store, seed, 2))
        key = key_of(seed)

        live, live_status = await store.headers(key, before=None, limit=10, now=T0 + 10)
        every, every_status = await store.headers(
            key, before=None, limit=10, now=T0 + 10, include_expired=True
        )
        page, _ = await store.headers(key, before=2, limit=1, now=T0 + 10, include_expired=True)

        assert [header.sequence for header in live] == [2]
        assert every == [header_of(record) for record in reversed(written)]
        assert [header.sequence for header in page] == [1]
        assert live_status == every_status == "paused"

    async def test_headers_of_absent_run(self, store: CheckpointStore) -> None:
        seed = make_run("nobody")
        assert await store.headers(key_of(seed), before=None, limit=10, now=T0) == ([], None)
        assert await store.headers(
            key_of(seed), before=None, limit=10, now=T0, include_expired=True
        ) == ([], None)

    async def test_reads_report_current_run_status(self, store: CheckpointStore) -> None:
        seed = make_run("status")
        key = key_of(seed)
        await _append_many(store, seed, [0, 1])

        await _update(store, seed, version=0, status="completed", now=T0 + 1)

        got = await store.get(key, 0, now=T0 + 1)
        latest = await store.latest(key, now=T0 + 1)
        _, listed = await store.headers(key, before=None, limit=10, now=T0 + 1)
        assert got is not None
        assert latest is not None
        assert (got[1], latest[1], listed) == ("completed", "completed", "completed")


    # -- payloads -----------------------------------------------------------------------------

    async def test_large_payload_round_trip(self, store: CheckpointStore) -> None:
        seed = make_run("large")
        payload = random.Random(7).randbytes(1 << 20)
        header = random.Random(8).randbytes(4096)
        written = await _append(store, seed, 0, header=header, payload=payload)

        got = await store.get(key_of(seed), 0, now=T0)
        latest = await store.latest(key_of(seed), now=T0)
        found, _ = await store.headers(key_of(seed), before=None, limit=1, now=T0)

        assert got is not None
        assert latest is not None
        assert got[0].payload == payload
        assert without_key(got[0]) == written
        assert without_key(latest[0]) == written
        assert found == [header_of(written)]

    async def test_empty_and_binary_bytes(self, store: CheckpointStore) -> None:
        seed = make_run("bytes")
        key = key_of(seed)
        empty = await _append(store, seed, 0, header=b"", payload=b"")
        every_byte = bytes(range(256))
        binary = await _append(store, seed, 1, header=every_byte, payload=every_byte * 3)
        await store.put_items(
            key, [make_item("empty", b""), make_item("binary", every_byte)], now=T0
        )

        for record in (empty, binary):
            found = await store.get(key, record.sequence, now=T0)
            assert found is not None
            assert without_key(found[0]) == record
        listed, _ = await store.headers(key, before=None, limit=10, now=T0)
        assert listed == [header_of(binary), header_of(empty)]
        assert await store.get_items(key, ["empty", "binary"], now=T0) == {
            "empty": b"",
            "binary": every_byte,
        }

    async def test_reads_refuse_what_is_not_a_run_key(self, store: CheckpointStore) -> None:
        seed = make_run("addressed")
        await _append_many(store, seed, range(2))

        await _refuses_not_run_keys(store, seed, lambda value: store.get(value, 0, now=T0))
        await _refuses_not_run_keys(store, seed, lambda value: store.latest(value, now=T0))
        for limit, include_expired in ((10, False), (10, True), (0, False)):
            await _refuses_not_run_keys(store, seed, functools.partial(
                store.headers, before=None, limit=limit, now=T0, include_expired=include_expired))
