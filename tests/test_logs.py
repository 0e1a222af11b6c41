"""The log format the manager's histories and the LangGraph saver share: merging, and reads that
never depend on a part that was merged away."""

from __future__ import annotations

import random
import zlib

import msgspec
import pytest

from fastcheckpoint._logs import FANOUT, LogGap, LogPart, Tail, begin, extend, read
from fastcheckpoint.errors import CorruptCheckpointError
from fastcheckpoint.stores import nested_prefix

ANCHOR = "m/anchor.1"
_encode = msgspec.msgpack.Encoder().encode


def _entries(first: int, count: int) -> bytes:
    return b"".join(_encode(f"entry {index}") for index in range(first, first + count))


class _Log:
    """A store's items, and every version of the log a writer acknowledged."""

    def __init__(self, count: int = 3) -> None:
        self.items: dict[str, bytes] = {}
        write = begin(ANCHOR, _entries(0, count), count)
        self.items[write.key] = write.value
        self.versions: list[tuple[str, int, int, bytes]] = [
            (write.key, write.count, write.crc, _entries(0, count))]

    def start(self) -> tuple[Tail, bytes]:
        """The log's tail as a reader of its anchor finds it, and its entries."""
        _, count, crc, data = self.versions[0]
        found = read(ANCHOR, ANCHOR, count, crc, self.items, what="log", where="here")
        assert found.entries == data
        return found.tail, bytes(found.entries)

    def append(self, tail: Tail, data: bytes, added: int, *, remove: bool = True) -> Tail:
        new = _entries(tail.count, added)
        write = extend(tail, data, new, added)
        assert write.key not in self.items
        self.items[write.key] = write.value
        if remove:
            for key in write.discard:
                self.items.pop(key, None)
        self.versions.append((write.key, write.count, write.crc, bytes(data) + new))
        return write.tail(ANCHOR)

    def check_all(self) -> None:
        for last, count, crc, data in self.versions:
            found = read(ANCHOR, last, count, crc, self.items, what="log", where="here")
            assert found.entries == data


def _parts(items: dict[str, bytes]) -> int:
    return sum(1 for key in items if key.startswith(nested_prefix(ANCHOR)))


def test_a_long_log_keeps_few_parts_and_every_version_reads_exactly() -> None:
    log = _Log()
    tail, data = log.start()
    most = 0
    for step in range(1, 1200):
        added = 1 + step % 3
        tail = log.append(tail, data, added)
        data += _entries(tail.count - added, added)
        most = max(most, _parts(log.items))
    log.check_all()
    # At most FANOUT - 1 parts per level: 1,199 writes need three levels.
    assert most <= 3 * (FANOUT - 1)
    written = sum(len(value) for value in log.items.values())
    assert written < 1.2 * len(data)


def test_the_tail_a_read_returns_extends_like_the_writers() -> None:
    log = _Log()
    tail, data = log.start()
    for _ in range(40):
        tail = log.append(tail, data, 2)
        data += _entries(tail.count - 2, 2)
        last, count, crc, _ = log.versions[-1]
        reread = read(ANCHOR, last, count, crc, log.items, what="log", where="here").tail
        assert reread == tail
    log.check_all()


def test_branches_that_share_a_start_survive_each_others_merges() -> None:
    rng = random.Random(5)
    log = _Log()
    start = read(ANCHOR, ANCHOR, 3, log.versions[0][2], log.items, what="log", where="here")
    branches = [(start.tail, bytes(start.entries))]
    for _ in range(600):
        index = rng.randrange(len(branches))
        tail, data = branches[index]
        added = rng.randint(1, 3)
        new_tail = log.append(tail, data, added)
        new_data = data + _entries(tail.count, added)
        if rng.random() < 0.03 and len(branches) < 6:
            branches.append((new_tail, new_data))  # a second writer continues from here
        else:
            branches[index] = (new_tail, new_data)
        if rng.random() < 0.05:
            # A writer that reads a branch back (an older version) and continues from it.
            last, count, crc, data = log.versions[rng.randrange(len(log.versions))]
            found = read(ANCHOR, last, count, crc, log.items, what="log", where="here")
            branches[rng.randrange(len(branches))] = (found.tail, bytes(found.entries))
    log.check_all()


def test_a_part_used_only_in_part_is_never_removed() -> None:
    log = _Log()
    tail, data = log.start()
    for _ in range(FANOUT):  # ends with a merged part of level 1
        tail = log.append(tail, data, 1)
        data += _entries(tail.count - 1, 1)
    merged = tail.last
    # A reader of an older version finds its part merged away and uses the merged one cut.
    last, count, crc, _ = log.versions[5]
    found = read(ANCHOR, last, count, crc, log.items, what="log", where="here")
    assert found.tail.last == merged
    assert not found.tail.links[-1].whole
    branch, branch_data = found.tail, bytes(found.entries)
    for _ in range(3 * FANOUT):
        branch = log.append(branch, branch_data, 1)
        branch_data += _entries(branch.count - 1, 1)
    assert merged in log.items
    log.check_all()


def test_a_stray_part_with_other_entries_is_never_read() -> None:
    log = _Log()
    tail, data = log.start()
    for step in range(50):
        # A failed write leaves a part where the next write puts its own (S3).
        stray = extend(tail, data, _encode("never acknowledged"), 1)
        log.items[stray.key] = stray.value
        tail = log.append(tail, data, 1)
        data += _entries(tail.count - 1, 1)
        assert step < 0 or tail.last != stray.key
    log.check_all()


def test_a_missing_part_is_a_gap_and_a_damaged_one_is_corrupt() -> None:
    log = _Log()
    tail, data = log.start()
    for _ in range(4):
        tail = log.append(tail, data, 1)
        data += _entries(tail.count - 1, 1)
    last, count, crc, _ = log.versions[-1]
    second = log.versions[2][0]
    items = dict(log.items)
    del items[second]
    with pytest.raises(LogGap, match="is missing"):
        read(ANCHOR, last, count, crc, items, what="log", where="here")
    with pytest.raises(LogGap, match="anchor"):
        read(ANCHOR, last, count, crc, {k: v for k, v in log.items.items() if k != ANCHOR},
             what="log", where="here")
    items = dict(log.items)
    items[second] = b"\x00garbage"
    with pytest.raises(CorruptCheckpointError):
        read(ANCHOR, last, count, crc, items, what="log", where="here")
    part = msgspec.msgpack.decode(log.items[second], type=LogPart)
    items[second] = _encode(msgspec.structs.replace(part, entries=b"\xa1x"))
    with pytest.raises(CorruptCheckpointError):
        read(ANCHOR, last, count, crc, items, what="log", where="here")
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        read(ANCHOR, last, count, crc ^ 1, log.items, what="log", where="here")


def test_packed_parts_need_their_unpacker() -> None:
    def pack(raw: bytes) -> bytes | None:
        return zlib.compress(raw) if len(raw) > 10 else None

    write = begin(ANCHOR, _entries(0, 40), 40, pack=pack)
    items = {write.key: write.value}
    found = read(ANCHOR, ANCHOR, 40, write.crc, items, what="log", where="here",
                 unpack=lambda raw, key: zlib.decompress(raw))
    assert found.entries == _entries(0, 40)
    with pytest.raises(CorruptCheckpointError, match="compressed"):
        read(ANCHOR, ANCHOR, 40, write.crc, items, what="log", where="here")
