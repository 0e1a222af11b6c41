"""FileStore: how far the checksum of a damaged item entry's metadata is trusted to name its
owner. A number the run no longer holds is tried only where it differs from the owner the
metadata names in one bit: a chance match of doubly damaged metadata with one of the many
removed numbers must not make a held checkpoint's write an orphan (deleted, silently), and
the search costs the same whatever the run's length."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import anyio
import msgspec
import pytest

from fastcheckpoint.errors import CorruptCheckpointError
from fastcheckpoint.stores import _file_log as file_log
from fastcheckpoint.stores import file as file_store
from fastcheckpoint.stores.file import FileStore
from fastcheckpoint.testing import T0, checkpoint_id_of, key_of, make_item, make_run
from tests._file_records import LogRecord, forget_items, item_record, new_boot
from tests._file_records import append_with_refs as _append

pytestmark = pytest.mark.anyio

_EXPIRES = T0 + 1000.0


def _forged(data: bytes, at: int, target: int) -> bytes:
    """``data`` with its four bytes from ``at`` chosen so that its CRC-32 is ``target``. The
    CRC is affine in those 32 bits: solve for them over GF(2), one column per bit."""

    def crc_with(window: int) -> int:
        return zlib.crc32(data[:at] + window.to_bytes(4, "little") + data[at + 4 :])

    base = crc_with(0)
    rows = [(crc_with(1 << bit) ^ base, 1 << bit) for bit in range(32)]  # (image, preimage)
    want, found = target ^ base, 0
    for bit in range(32):  # Gaussian elimination on the images' bits, low to high
        pivot = next((row for row in rows if row[0] >> bit & 1), None)
        assert pivot is not None, "a 4-byte window spans every CRC-32"
        rows.remove(pivot)
        rows = [
            (image ^ pivot[0], pre ^ pivot[1]) if image >> bit & 1 else (image, pre)
            for image, pre in rows
        ]
        if want >> bit & 1:
            want ^= pivot[0]
            found ^= pivot[1]
    assert want == 0
    forged = data[:at] + found.to_bytes(4, "little") + data[at + 4 :]
    assert zlib.crc32(forged) == target
    return forged


def _overwrite(record: LogRecord, index: int, data: bytes) -> None:
    """Write ``data`` over the record's data from byte ``index``, in place in the log (its
    checksums left as they were: damage, not a write)."""
    view = file_log.open_view(str(record.run_dir))
    assert view is not None
    with view:
        at = view.find(record.key)
    assert at is not None
    with open(record.run_dir / "log", "r+b") as log:
        log.seek(at.offset + file_log._ENTRY + index)
        log.write(data)


def _collide(record: LogRecord, *, reads_as: int, passes_with: int) -> None:
    """Damage the metadata of ``record``'s item: its owner made ``reads_as``, and four bytes
    of its expiry changed so that the metadata with ``passes_with`` as its owner passes the
    checksum the entry holds (it does not as it reads)."""
    data = record.read_bytes()
    size = file_store._FIXED.unpack_from(data)[3]
    covered = data[: file_store._FIXED.size]
    checksum = file_store._CRCS.unpack_from(data, file_store._FIXED.size)[0]
    meta = file_store._ITEM_DECODER.decode(data[file_store._PREFIX : file_store._PREFIX + size])
    as_found = file_store._ENCODER.encode(msgspec.structs.replace(meta, owner=passes_with))
    low_bytes = as_found.index(b"\xcb" + struct.pack(">d", _EXPIRES)) + 5
    forged = _forged(covered + as_found, len(covered) + low_bytes, checksum)[len(covered) :]
    damaged = file_store._ITEM_DECODER.decode(forged)
    stored = file_store._ENCODER.encode(msgspec.structs.replace(damaged, owner=reads_as))
    assert len(stored) == size
    assert zlib.crc32(stored, zlib.crc32(covered)) != checksum
    _overwrite(record, file_store._PREFIX, stored)


@pytest.mark.parametrize("how", ["repair", "write"])
async def test_a_chance_checksum_match_with_a_removed_owner_deletes_no_held_write(
    root: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Checkpoint 0's pending write, its owner damaged into 1 and four bytes of its expiry
    too, such that the metadata passes its checksum with owner 4 (removed, like 1-3). Every
    number up to the latest held was tried, so 4 passed: the entry was taken as removed
    checkpoint 4's orphan, 0 and 5 read without it, and a repair or the next write deleted
    it (0's acknowledged write lost, silently). 4 differs from 1 in two bits, so it is not
    tried: no owner is proven, every checkpoint held when the entry was indexed raises
    naming it (a checkpoint appended since reads), and the entry goes with the last of them."""
    run = make_run("owner-collision")
    key = key_of(run)
    with anyio.fail_after(30):
        store = FileStore(root)
        await _append(
            store,
            run,
            0,
            expires_at=_EXPIRES,
            items=[make_item("pending/0/a", owner=0, expires_at=_EXPIRES)],
        )
        for sequence in range(1, 6):
            await _append(store, run, sequence)
        for sequence in range(1, 5):
            assert await store.delete(key, sequence, checkpoint_id=checkpoint_id_of(run, sequence))
        record = item_record(root, key, "pending/0/a")
        _collide(record, reads_as=1, passes_with=4)
        forget_items(root, key)
        new_boot(monkeypatch)
        store = FileStore(root)
        if how == "repair":
            assert await store.damaged_runs(now=T0) == []
        else:
            await _append(store, run, 6)
        assert record.exists()
        for sequence in (0, 5):
            with pytest.raises(CorruptCheckpointError, match="metadata is damaged") as caught:
                await store.read_with_items(key, sequence=sequence, now=T0)
            assert caught.value.key == str(record)
        if how == "repair":
            await _append(store, run, 6)
        found = await store.read_with_items(key, sequence=6, now=T0)
        assert found is not None
        assert found[2] == {}
        assert await store.delete(key, 0, checkpoint_id=checkpoint_id_of(run, 0))
        assert record.exists()
        assert await store.delete(key, 5, checkpoint_id=checkpoint_id_of(run, 5))
        assert not record.exists()


def _claim(owner: int) -> file_store._Claim:
    """A claim whose metadata names ``owner``, of an entry written with owner 2,000,000:
    above every number tried, so none passes."""
    meta = file_store._ItemMeta("pending/x/a", owner, None, file_store._FIRST_ITEM)
    data = file_store._item_bytes(msgspec.structs.replace(meta, owner=2_000_000), b"value")
    raw = file_store._ENCODER.encode(meta)
    covered = data[: file_store._FIXED.size]
    checksum = file_store._CRCS.unpack_from(data, file_store._FIXED.size)[0]
    return file_store._Claim(meta, raw, covered, checksum)


@pytest.mark.parametrize("owner", [0, 1000, 999_999])
def test_the_owner_search_of_a_damaged_entry_costs_the_same_in_a_long_run(
    monkeypatch: pytest.MonkeyPatch, owner: int
) -> None:
    """Whatever the latest held checkpoint (a million here), the search tries the held
    checkpoints, none, and at most one removed number per bit of the owner (it tried every
    number up to the latest held: a million encodings and CRCs, 0.5 s, per damaged
    entry)."""
    tried: list[int | None] = []
    passes = file_store._Claim.passes

    def counted(claim: file_store._Claim, meta: file_store._ItemMeta) -> bool:
        tried.append(meta.owner)
        return passes(claim, meta)

    monkeypatch.setattr(file_store._Claim, "passes", counted)
    held = {1_000_000, 1_000_001}
    claim = _claim(owner).owned_by(held, 1_000_001)
    assert not claim.checked
    assert len(tried) <= len(held) + 1 + 21  # 10**6 < 2**20: 21 bits at most
    assert {found for found in tried if found is not None and found not in held} <= {
        owner ^ (1 << bit) for bit in range(21)
    }
