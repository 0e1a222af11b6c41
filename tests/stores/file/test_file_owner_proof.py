"""FileStore: how far the checksum of a damaged item entry's metadata is trusted to name its
owner. A number the run no longer holds is tried only where its encoding differs from the
owner's bytes the metadata holds in one byte (a byte overwritten or zeroed, the type byte
too): a chance match of metadata damaged further with one of the many removed numbers must
not make a held checkpoint's write an orphan (deleted, silently), and the search costs the
same whatever the run's length."""

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
    """Checkpoint 130's pending write (owner ``cc 82``), its owner damaged into -100 (``d0
    9c``) and four bytes of its expiry too, such that the metadata passes its checksum with
    owner 129 (``cc 81``, pruned, like 0-128). Every number up to the latest held was tried,
    so 129 passed: the entry was taken as removed checkpoint 129's orphan, 130 and 131 read
    without it, and a repair or the next write deleted it (130's acknowledged write lost,
    silently). 129's encoding differs from the damaged owner's in two bytes, so it is not
    tried: no owner is proven, every checkpoint held when the entry was indexed raises
    naming it (a checkpoint appended since reads), and the entry goes with the last of
    them."""
    run = make_run("owner-collision")
    key = key_of(run)
    pending = "pending/130/a"
    with anyio.fail_after(30):
        store = FileStore(root)
        for sequence in range(130):
            await _append(store, run, sequence)
        await _append(
            store,
            run,
            130,
            expires_at=_EXPIRES,
            items=[make_item(pending, owner=130, expires_at=_EXPIRES)],
        )
        await _append(store, run, 131, keep_latest=2)
        record = item_record(root, key, pending)
        _collide(record, reads_as=-100, passes_with=129)
        forget_items(root, key)
        new_boot(monkeypatch)
        store = FileStore(root)
        if how == "repair":
            assert await store.damaged_runs(now=T0) == []
        else:
            await _append(store, run, 132)
        assert record.exists()
        for sequence in (130, 131):
            with pytest.raises(CorruptCheckpointError, match="metadata is damaged") as caught:
                await store.read_with_items(key, sequence=sequence, now=T0)
            assert caught.value.key == str(record)
        if how == "repair":
            await _append(store, run, 132)
        found = await store.read_with_items(key, sequence=132, now=T0)
        assert found is not None
        assert found[2] == {}
        assert await store.delete(key, 130, checkpoint_id=checkpoint_id_of(run, 130))
        assert record.exists()
        assert await store.delete(key, 131, checkpoint_id=checkpoint_id_of(run, 131))
        assert not record.exists()


def _owner_at(key: str) -> int:
    """Where the owner is in the data of the entry of item ``key`` (after the array's and
    the string's headers and the key; short keys)."""
    return file_store._PREFIX + 2 + len(key)


@pytest.mark.parametrize(("owner", "damaged"), [(1, 2), (5, 0), (6, 0x41), (5, 0xC0)])
async def test_a_removed_owner_damaged_in_one_byte_is_seen_through(
    root: Path, monkeypatch: pytest.MonkeyPatch, owner: int, damaged: int
) -> None:
    """A pending write of checkpoint ``owner``, its owner's byte overwritten (1 made 2, 5
    zeroed, 6 made 0x41, 5 made nil: a shared item's), left in the log when ``owner`` was
    removed (a writer that did not know the entry). Only numbers one bit from the owner the
    metadata names were tried, so an owner damaged in more bits was not found: every held
    checkpoint's read raised naming the entry until they were all gone. Its encoding differs
    from the owner's in one byte, so it passes: the entry is no held checkpoint's, the held
    ones read as before, and the run's next write removes it."""
    run = make_run("owner-byte")
    key = key_of(run)
    pending = f"pending/{owner}/a"
    with anyio.fail_after(30):
        store = FileStore(root)
        for sequence in range(8):
            owned = [make_item(f"pending/{sequence}/a", owner=sequence)]
            await _append(store, run, sequence, items=owned if sequence in (0, owner) else [])
        record = item_record(root, key, pending)
        assert record.read_bytes()[_owner_at(pending)] == owner
        _overwrite(record, _owner_at(pending), bytes([damaged]))
        forget_items(root, key)
        new_boot(monkeypatch)
        with monkeypatch.context() as patched:
            patched.setattr(file_store._ItemIndex, "unneeded", lambda *_: [])
            store = FileStore(root)
            assert await store.delete(key, owner, checkpoint_id=checkpoint_id_of(run, owner))
        assert record.exists()
        forget_items(root, key)
        new_boot(monkeypatch)
        store = FileStore(root)
        for sequence in sorted(set(range(8)) - {owner}):
            found = await store.read_with_items(key, sequence=sequence, now=T0)
            assert found is not None
            assert found[2] == ({"pending/0/a": b"value-pending/0/a"} if sequence == 0 else {})
        await _append(store, run, 8)
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


def _one_byte_apart(one: bytes, other: bytes) -> bool:
    return len(one) == len(other) and sum(a != b for a, b in zip(one, other, strict=True)) == 1


@pytest.mark.parametrize("owner", [0, 1000, 999_999])
def test_the_owner_search_of_a_damaged_entry_costs_the_same_in_a_long_run(
    monkeypatch: pytest.MonkeyPatch, owner: int
) -> None:
    """Whatever the latest held checkpoint (a million here), the search tries the held
    checkpoints, none, and the removed numbers whose encoding differs from the owner's in
    one byte: at most 255 per byte of it, fewer than 3 * 255 in all below 2**24, where the
    top byte of a 4-byte number can only be 0 and the next one under 16 (it tried every
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
    assert len(tried) <= len(held) + 1 + 3 * 255
    encoded = file_store._ENCODER.encode(owner)
    for found in tried:
        if found is not None and found not in held:
            assert 0 <= found <= 1_000_001
            assert _one_byte_apart(file_store._ENCODER.encode(found), encoded)


def _damaged_claim(
    meta: file_store._ItemMeta, at: int, value: int, *, held: set[int], bound: int
) -> file_store._Claim:
    """The claim the index makes of an entry written with ``meta`` whose metadata's byte
    ``at`` (counted from its owner's first) was overwritten with ``value``, the owner
    searched for among ``held`` and up to ``bound``."""
    data = file_store._item_bytes(meta, b"value")
    written = file_store._ENCODER.encode(meta)
    owner_at = 1 + len(file_store._ENCODER.encode(meta.key))
    raw = bytearray(written)
    raw[owner_at + at] = value
    damaged = file_store._ITEM_DECODER.decode(bytes(raw))
    covered = data[: file_store._FIXED.size]
    checksum = file_store._CRCS.unpack_from(data, file_store._FIXED.size)[0]
    claim = file_store._Claim(damaged, bytes(raw), covered, checksum)
    assert not claim.passes(damaged)
    return claim.owned_by(held, bound)


_DUE = 1_800_000_000.25  # its float64 encoding ends in 0x00: a number of one byte


@pytest.mark.parametrize(
    ("owner", "at", "value", "reads_as"),
    [
        (1, 0, 2, 2),  # two bits
        (5, 0, 0, 0),  # zeroed
        (5, 0, 0xC0, None),  # made nil
        (5, 0, 0xE5, -27),  # made a negative number of one byte
        (200, 0, 0xD0, -56),  # the type byte (cc: 0-255, d0: -128-127)
        (200, 1, 0, 0),  # the value byte zeroed
        (300, 1, 0, 44),  # cd 01 2c made cd 00 2c (the decoder reads it, as 44)
        (300, 2, 0xFF, 0x1FF),
        (70_000, 2, 0x80, 0x801170),  # over the bound
        (5, 0, 0xCF, 0xCB41DAD274801000),  # wider: the owner reads the expiry's 8 bytes
    ],
)
def test_an_owner_damaged_in_one_byte_is_found(
    owner: int, at: int, value: int, reads_as: int | None
) -> None:
    """A removed owner whose encoding the damage changed in one byte, whichever (the type
    byte too, also when the owner it reads as takes more bytes), is the one found."""
    meta = file_store._ItemMeta("pending/x/a", owner, _DUE, file_store._FIRST_ITEM)
    claim = _damaged_claim(meta, at, value, held={0, 1_000_000} - {owner}, bound=1_000_000)
    assert file_store._ITEM_DECODER.decode(claim.raw).owner == reads_as
    assert claim.checked
    assert claim.meta == meta


@pytest.mark.parametrize(
    ("owner", "damage"),
    [(300, {1: 0, 2: 0}), (200, {0: 0xD0, 1: 0x81}), (70_000, {2: 0, 3: 0})],
)
def test_an_owner_damaged_in_two_bytes_is_not_found(owner: int, damage: dict[int, int]) -> None:
    """Two bytes of the owner's encoding damaged: the owner is not proven (its entry is
    blamed on the held checkpoints), whatever removed number it is."""
    meta = file_store._ItemMeta("pending/x/a", owner, _DUE, file_store._FIRST_ITEM)
    (first, one), (second, other) = damage.items()
    once = _damaged_claim(meta, first, one, held={0}, bound=1_000_000)
    raw = bytearray(once.raw)
    raw[1 + len(file_store._ENCODER.encode(meta.key)) + second] = other
    damaged = file_store._ITEM_DECODER.decode(bytes(raw))
    claim = once._replace(meta=damaged, raw=bytes(raw), checked=False).owned_by({0}, 1_000_000)
    assert not claim.checked
    assert claim.meta == damaged
