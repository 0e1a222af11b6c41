"""The file store's record log (``fastcheckpoint.stores._file_log``): commits, the index and
what happens when it is stale, missing or damaged, torn tails, damaged entries, removals,
compaction, a crash at each step of it, kill -9 of a writer, and the syncs a commit costs."""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fastcheckpoint.errors import CorruptCheckpointError
from fastcheckpoint.stores import _file_log as log
from fastcheckpoint.stores._file_log import INDEX, LOG, RUN, LogWriter, open_view
from tests._file_records import count_pread_bytes


class _Run:
    """A run directory with its log writer, and a model of what the log must hold."""

    def __init__(self, root: Path, *, fsync: bool = False) -> None:
        self.dir = root / "run"
        self.tmp = root / "tmp"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(exist_ok=True)
        self.writer = LogWriter(str(self.dir), self.temp, fsync=fsync)
        self.model: dict[int, bytes] = {}

    def temp(self) -> str:
        return str(self.tmp / secrets.token_hex(8))

    def commit(self, puts: dict[int, bytes], removes: tuple[int, ...] = ()) -> None:
        if self.writer.commit(list(puts.items()), removes):
            self.writer.compact()
        for key in removes:
            if key not in puts:
                self.model.pop(key, None)
        self.model.update(puts)

    def read_all(self) -> dict[int, bytes]:
        view = open_view(str(self.dir))
        if view is None:
            return {}
        with view:
            found = {}
            for key in view.held_keys():
                data = view.read(key, check=True)
                assert data is not None
                found[key] = data
            return found

    def check(self) -> None:
        assert self.read_all() == self.model
        view = open_view(str(self.dir))
        assert view is not None
        with view:  # lookups by key (through idx) agree with the scan
            for key, data in self.model.items():
                assert view.read(key, check=True) == data
            assert view.read(max(self.model, default=0) + 1) is None

    def check_indexed(self) -> None:
        """``idx`` covers every commit, and the log holds what the model does."""
        view = open_view(str(self.dir))
        assert view is not None
        with view:
            assert view.indexed
            assert not view.tail.found
        self.check()

    @property
    def seed(self) -> int:
        """What the log's envelope CRCs start from."""
        view = open_view(str(self.dir))
        assert view is not None
        with view:
            return view.seed

    @property
    def log_path(self) -> Path:
        return self.dir / LOG

    @property
    def index_path(self) -> Path:
        return self.dir / INDEX


def _data(key: int, version: int, size: int = 100) -> bytes:
    return f"{key}:{version}:".encode().ljust(size, b".")


@pytest.fixture
def run(tmp_path: Path) -> _Run:
    return _Run(tmp_path)


def test_commits_read_back_through_the_index_and_by_a_scan(run: _Run) -> None:
    assert open_view(str(run.dir)) is None
    run.commit({0: _data(0, 0), RUN: b"run-0"})
    run.commit({1: _data(1, 0), RUN: b"run-1"})
    run.commit({1: _data(1, 1, 5000)})
    run.check()
    view = open_view(str(run.dir))
    assert view is not None
    with view:
        assert view.indexed
        assert not view.tail.found
        assert view.read(1, limit=3) == b"1:1"
        assert view.read(RUN) == b"run-1"
    run.index_path.unlink()
    view = open_view(str(run.dir))
    assert view is not None
    with view:
        assert not view.indexed
    run.check()
    run.commit({2: b"two"})  # the writer makes a whole idx again
    run.check_indexed()


def test_a_view_takes_in_the_commits_made_through_it(
    run: _Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that commits through its view (synced, or unsynced until a flush) leaves the
    view reading as a view opened after the commit: the same end, live bytes, records and
    changes, with no byte of the commit read back from the file."""
    run.commit({0: _data(0, 0), RUN: b"run-0"})
    view = open_view(str(run.dir), writable=True)
    assert view is not None
    read: list[int] = []

    def same_as_fresh(start: int) -> None:
        fresh = open_view(str(run.dir))
        assert fresh is not None
        with fresh:
            assert (view.end, view.size, view.live, view.settled) == (
                fresh.end, fresh.size, fresh.live, fresh.settled)
            for key in [*run.model, 99]:
                assert view.read(key, check=True) == fresh.read(key, check=True)
            read.clear()
            mine = view.changes(start, view.end)
            assert read == []  # from memory
            assert mine == fresh.changes(start, fresh.end)

    with view:
        for version, sync in enumerate((True, False, False, True), start=1):
            start = view.end
            puts = {1: _data(1, version, 3000), RUN: b"run-%d" % version}
            removes = (0,) if version == 2 else ()
            read = count_pread_bytes(monkeypatch)
            run.writer.commit(list(puts.items()), removes, view=view, sync=sync)
            # Only idx slots (where the keys' older entries were, if any): nothing of the log.
            assert set(read) <= {0, 16}, read
            run.model.update(puts)
            for key in removes:
                run.model.pop(key)
            same_as_fresh(start)
            monkeypatch.undo()
            if not sync:
                assert not view.settled
        run.writer.flush(view)
        assert view.settled
        same_as_fresh(start)
    run.check_indexed()


def test_a_batch_on_a_damaged_log_is_synced_and_indexed_as_a_scan_reads_it(run: _Run) -> None:
    """A log with unreadable bytes and no usable ``idx``: a batch's commit that rewrites a
    key the scan reads as damaged is synced and indexed with the live bytes a scan counts,
    and so is the writer's view (the writer's own count takes the damaged entry off, which
    the scan never counted: taken from the view, it went negative and failed the flush
    after its sync)."""
    _damaged_without_index(run)
    view = open_view(str(run.dir), writable=True)
    assert view is not None
    with view:
        assert not view.indexed
        assert 1 in view.tail.damaged
        run.writer.commit([(1, b"n" * 10)], view=view, sync=False)
        scanned = open_view(str(run.dir))
        assert scanned is not None
        with scanned:
            assert view.live == scanned.live
        run.writer.flush(view)
    _rewritten_as_a_scan_counts(run)


def _damaged_without_index(run: _Run) -> None:
    """Key 1 reads as damaged (the next commit's envelope is unreadable); no ``idx``."""
    run.commit({1: b"x" * 1000})
    second = run.log_path.stat().st_size
    run.commit({2: b"y" * 10})
    run.commit({3: b"z" * 10})
    with run.log_path.open("r+b") as handle:  # commit 2's envelope: a gap in the log
        handle.seek(second + 2)
        handle.write(b"\xff\xff")
    run.index_path.unlink()


def _rewritten_as_a_scan_counts(run: _Run) -> None:
    """Key 1 was written anew, and ``idx`` counts the live bytes a scan counts."""
    fresh = open_view(str(run.dir))
    assert fresh is not None
    with fresh:
        assert fresh.indexed
        assert fresh.read(1, check=True) == b"n" * 10
        assert fresh.live == fresh.scan().live


def test_a_commit_over_a_damaged_key_counts_live_bytes_as_a_scan_does(run: _Run) -> None:
    """A log with unreadable bytes and no usable ``idx``: a synced commit that rewrites a key
    the scan reads as damaged writes ``idx`` with the live bytes a scan counts. It took the
    damaged entry off, which the scan never counted, and failed with ``struct.error``
    after the commit was written and synced."""
    _damaged_without_index(run)
    run.writer.commit([(1, b"n" * 10)])
    _rewritten_as_a_scan_counts(run)


def test_a_batch_whose_view_met_damage_keeps_the_index_of_the_rest(run: _Run) -> None:
    """A read within a batch meets a damaged entry, so the writer's view drops ``idx`` and
    scans the whole log (where the entry's commit, missing one, counts for nothing, and the
    key reads as damaged): the batch's flush still goes by ``idx``, and the damaged commit's
    other key keeps reading as it did (a new ``idx`` made from that scan lost it)."""
    run.commit({4: b"four", 7: b"seven" * 20})
    run.commit({9: b"nine"})
    with run.log_path.open("r+b") as handle:  # key 7's envelope, the commit's second entry
        handle.seek(log._LOG_HEADER.size + log._ENTRY + len(b"four") + 2)
        handle.write(b"\xff")
    view = open_view(str(run.dir), writable=True)
    assert view is not None
    with view:
        with pytest.raises(CorruptCheckpointError):  # its entry fails: the view scans the log
            view.read(7)
        assert not view.indexed
        run.writer.commit([(2, b"two")], view=view, sync=False)
        run.writer.flush(view)
    fresh = open_view(str(run.dir))
    assert fresh is not None
    with fresh:
        assert (fresh.read(4), fresh.read(2), fresh.read(9)) == (b"four", b"two", b"nine")


def test_an_index_behind_the_log_is_completed_by_reading_the_tail(run: _Run) -> None:
    """A crash after a commit's sync, before its idx update: readers find the commit in the
    log's tail; the next writer brings idx up to date."""
    run.commit({0: _data(0, 0), RUN: b"r0"})
    old_index = run.index_path.read_bytes()
    run.commit({1: _data(1, 0), RUN: b"r1"}, removes=(0,))
    run.index_path.write_bytes(old_index)
    view = open_view(str(run.dir))
    assert view is not None
    with view:
        assert view.indexed
        assert set(view.tail.found) == {0, 1, RUN}
    run.check()
    run.commit({2: b"two"})
    run.check_indexed()


@pytest.mark.parametrize("damage", ["slot", "header", "other log", "garbage"])
def test_a_damaged_or_foreign_index_is_not_trusted(run: _Run, damage: str) -> None:
    for version in range(3):
        run.commit({key: _data(key, version) for key in (RUN, 0, 1, 2)})
    raw = bytearray(run.index_path.read_bytes())
    if damage == "slot":
        raw[log._slot_offset(1) + 2] ^= 0xFF
    elif damage == "header":
        raw[30] ^= 0xFF
    elif damage == "other log":
        raw[8:24] = bytes(16)
    else:
        raw = bytearray(os.urandom(len(raw)))
    run.index_path.write_bytes(bytes(raw))
    run.check()
    run.commit({3: b"three"})
    run.check()


def test_an_index_cut_short_is_not_trusted(run: _Run, tmp_path: Path) -> None:
    """``idx`` cut at any length past its header: a slot it no longer holds is damage, never
    a key without an entry (its records read as absent, the run record included)."""
    for version in range(3):
        run.commit({key: _data(key, version) for key in (RUN, 0, 1, 2, -5)})
    intact = run.index_path.read_bytes()
    for length in range(log._INDEX_START, len(intact)):
        run.index_path.write_bytes(intact[:length])
        run.check()
    run.commit({3: b"three"})
    run.model[3] = b"three"
    run.check_indexed()


def test_a_torn_tail_is_ignored_and_cut_by_the_next_writer(
    run: _Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    run.commit({0: _data(0, 0), RUN: b"r0"})
    size = run.log_path.stat().st_size
    before = dict(run.model)
    run.commit({1: _data(1, 0, 3000), RUN: b"r1"})
    full = run.log_path.read_bytes()
    for cut in (size + 1, size + 40, len(full) - 1):  # everything but the whole commit
        run.log_path.write_bytes(full[:cut])
        assert run.read_all() == before
    # The commit's length in place but its bytes never written (zeros): what a power loss
    # can leave, so idx (written before the reboot) is not used; torn as well.
    run.log_path.write_bytes(full[:size] + bytes(len(full) - size))
    monkeypatch.setattr(log, "_boot", lambda: b"the next boot...")
    assert run.read_all() == before
    run.model = before
    run.commit({2: b"two"})
    run.check()
    assert b"\0" * 64 not in run.log_path.read_bytes()


def test_a_commit_being_written_is_invisible_until_its_last_entry_is_in_place(
    run: _Run,
) -> None:
    run.commit({RUN: b"r0"})
    entries = [log.entry_bytes(5, _data(5, 0), seed=run.seed, last=False),
               log.entry_bytes(RUN, b"r1", seed=run.seed, first=False)]
    data = b"".join(entries)
    with run.log_path.open("ab") as handle:
        for piece in (data[:10], data[10 : len(entries[0])], data[len(entries[0]) : -1]):
            handle.write(piece)
            handle.flush()
            assert run.read_all() == {RUN: b"r0"}
        handle.write(data[-1:])
    assert run.read_all() == {RUN: b"r1", 5: _data(5, 0)}


def test_a_damaged_entry_reads_as_damaged_never_as_its_older_version(run: _Run) -> None:
    run.commit({0: _data(0, 0), 1: _data(1, 0)})
    offset = run.log_path.stat().st_size
    run.commit({0: _data(0, 1, 2000)})
    run.commit({RUN: b"after"})  # the damaged commit is not the last one: no torn tail
    raw = bytearray(run.log_path.read_bytes())
    raw[offset + 28 + 500] ^= 0x01
    run.log_path.write_bytes(bytes(raw))
    for drop_index in (False, True):
        if drop_index:
            run.index_path.unlink()
        view = open_view(str(run.dir))
        assert view is not None
        with view:
            with pytest.raises(CorruptCheckpointError, match="checksum"):
                view.read(0, check=True)
            assert view.read(1, check=True) == _data(1, 0)
            assert view.read(RUN) == b"after"
            assert 0 in view.held_keys()
    run.writer.compact()
    view = open_view(str(run.dir))
    assert view is not None
    with view:
        with pytest.raises(CorruptCheckpointError):
            view.read(0, check=True)
        assert view.read(1, check=True) == _data(1, 0)


def _envelope_offsets(run: _Run) -> list[int]:
    raw = run.log_path.read_bytes()
    offsets, at = [], raw.find(b"FCle")
    while at >= 0:
        offsets.append(at)
        at = raw.find(b"FCle", at + 1)
    return offsets


def _flip(run: _Run, offset: int) -> None:
    raw = bytearray(run.log_path.read_bytes())
    raw[offset] ^= 0x40
    run.log_path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damaged", ["put", "removal"])
def test_unreadable_bytes_in_the_middle_make_older_records_read_as_damaged(
    run: _Run, damaged: str
) -> None:
    """A damaged envelope cannot say whose entry it was: the records found before it may have
    a newer entry (or a removal) there, so they read as damaged, never as their older entry
    (or as absent); records written after it read normally, and compaction keeps the log."""
    run.commit({0: _data(0, 0), 1: _data(1, 0), RUN: b"r0"})
    run.commit({2: _data(2, 0), RUN: b"r1"} if damaged == "put" else {RUN: b"r1"},
               removes=() if damaged == "put" else (1,))
    middle = _envelope_offsets(run)[3]  # the second commit's first entry
    run.commit({3: _data(3, 0), RUN: b"r2"})
    _flip(run, middle + 9)
    run.index_path.unlink()  # the damage is seen by a scan (idx knew better)
    view = open_view(str(run.dir))
    assert view is not None
    with view:
        for key in (0, 1):
            with pytest.raises(CorruptCheckpointError, match="unreadable bytes"):
                view.read(key)
        assert view.read(3) == _data(3, 0)
        assert view.read(RUN) == b"r2"
    size = run.log_path.stat().st_size
    run.writer.compact()
    assert run.log_path.stat().st_size == size  # the evidence stays
    # A new idx keeps it too: one a reader writes under the run lock, then a commit's.
    for make_index in (run.writer.reindex, lambda: run.commit({4: b"four"})):
        make_index()
        view = open_view(str(run.dir))
        assert view is not None
        with view:
            assert view.settled
            for key in (0, 1):
                with pytest.raises(CorruptCheckpointError, match="unreadable bytes"):
                    view.read(key)
            assert view.read(3) == _data(3, 0)


def test_entries_of_another_log_inside_a_record_are_never_taken_for_entries(
    run: _Run,
) -> None:
    """After unreadable bytes a scan looks for the next entry; a record whose data holds an
    entry (a copy of another run's log, say) must not be taken for one: envelopes check only
    in their own log."""
    forged = log.entry_bytes(RUN, b"forged", seed=log.seed_of(secrets.token_bytes(16)))
    run.commit({0: _data(0, 0), RUN: b"r0"})
    offset = run.log_path.stat().st_size
    run.commit({1: b"x" * 10 + forged})
    run.commit({2: _data(2, 0)})
    _flip(run, offset)  # the envelope of the entry holding the copy
    run.index_path.unlink()
    view = open_view(str(run.dir))
    assert view is not None
    with view:
        assert view.tail.gaps
        with pytest.raises(CorruptCheckpointError):
            view.read(RUN)  # written before the unreadable bytes: damaged, never "forged"
        assert view.read(2, check=True) == _data(2, 0)


def test_a_torn_commit_never_counts_in_part(run: _Run, monkeypatch: pytest.MonkeyPatch) -> None:
    """A power loss may keep a commit's last entry and lose its first: nothing of it counts."""
    run.commit({0: _data(0, 0), RUN: b"r0"})
    size = run.log_path.stat().st_size
    run.commit({1: _data(1, 0, 9000), RUN: b"r1"})
    raw = bytearray(run.log_path.read_bytes())
    raw[size : size + 4096] = bytes(4096)  # the first entry's envelope and data: zeros
    run.log_path.write_bytes(bytes(raw))
    monkeypatch.setattr(log, "_boot", lambda: b"the next boot...")
    assert run.read_all() == {0: _data(0, 0), RUN: b"r0"}
    run.model = {0: _data(0, 0), RUN: b"r0"}
    run.commit({2: b"two", RUN: b"r2"})
    run.check()


def test_an_index_of_an_earlier_boot_is_not_used(
    run: _Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unsynced, idx's pages may reach the disk in any order before a power loss: after a
    reboot it is rebuilt from the log (a reader under the run lock may do it, reindex)."""
    for sequence in range(300):
        run.commit({sequence: _data(sequence, 0, 10), RUN: b"r%d" % sequence})
    raw = bytearray(run.index_path.read_bytes())
    raw[log._slot_offset(299) : log._slot_offset(299) + 16] = bytes(16)  # a page not written
    run.index_path.write_bytes(bytes(raw))
    monkeypatch.setattr(log, "_boot", lambda: b"the next boot...")
    view = open_view(str(run.dir))
    assert view is not None
    with view:
        assert not view.indexed
        assert not view.settled
        assert view.read(299) == _data(299, 0, 10)
    run.writer.reindex()
    run.check_indexed()


def test_a_record_is_read_further_where_it_was_found(run: _Run) -> None:
    run.commit({0: _data(0, 0, 9000), RUN: b"r0"})
    view = open_view(str(run.dir))
    assert view is not None
    with view:
        first = view.read_sized(0, 100)
        assert first is not None
        run.commit({0: _data(0, 1, 9000)})  # a newer entry meanwhile
        more = view.read_sized(0, 5000, at=first.at)
        assert more is not None
        assert more.data == _data(0, 0, 9000)[:5000]


def test_removals_hide_keys_and_compaction_drops_them(run: _Run) -> None:
    run.commit({0: _data(0, 0), 1: _data(1, 0), RUN: b"r"})
    run.commit({RUN: b"r2"}, removes=(0,))
    run.check()
    run.index_path.unlink()
    run.check()
    run.writer.compact()
    run.check()
    assert b"0:0:" not in run.log_path.read_bytes()


def test_a_commit_compacts_once_dead_bytes_exceed_the_live_ones(run: _Run) -> None:
    big = 64 << 10
    run.commit({0: _data(0, 0, big), RUN: b"r" * 100})
    first = run.log_path.stat().st_ino
    for version in range(1, 4):
        run.commit({0: _data(0, version, big), RUN: b"r" * 100})
        assert run.log_path.stat().st_ino == first  # dead bytes below the minimum
    before = open_view(str(run.dir))
    assert before is not None
    for version in range(4, 12):
        run.commit({0: _data(0, version, big), RUN: b"r" * 100})
    assert run.log_path.stat().st_ino != first
    # Live (one entry of each key) plus at most the dead bytes that trigger a compaction.
    assert run.log_path.stat().st_size < log._COMPACT_MIN_DEAD + 3 * big
    run.check()
    with before:  # a reader that opened the old log still reads it, intact
        assert before.read(0, check=True) in {_data(0, version, big) for version in range(3, 12)}


def test_a_crash_at_any_step_of_compaction_leaves_one_whole_log(run: _Run) -> None:
    for version in range(5):
        run.commit({key: _data(key, version, 1000) for key in (RUN, 0, 1)}, removes=(version,))
    old_log, old_index = run.log_path.read_bytes(), run.index_path.read_bytes()
    run.writer.compact()
    new_log = run.log_path.read_bytes()
    # Renamed the new log, not yet its idx: readers see the old idx as another log's.
    run.index_path.write_bytes(old_index)
    run.check()
    run.commit({7: b"seven"})
    run.check()
    # Crashed before the rename: the old log and idx, and a leftover in tmp/.
    run.log_path.write_bytes(old_log)
    run.index_path.write_bytes(old_index)
    (run.tmp / "leftover").write_bytes(new_log)
    run.model.pop(7)
    run.check()


def _filled(run: _Run) -> None:
    """A log with dead entries: five versions of three keys, removals among them."""
    for version in range(5):
        run.commit({key: _data(key, version, 1000) for key in (RUN, 0, 1)}, removes=(version,))
    run.commit({5: _data(5, 0), 6: _data(6, 0)})


def test_commits_made_while_compaction_copies_are_carried_over(run: _Run) -> None:
    """Compaction copies what idx covers without the lock; the commits made meanwhile (puts,
    removals, several entries each) are added, whole, once it holds the lock."""
    _filled(run)
    first = run.log_path.stat().st_ino
    took: list[str] = []

    @contextlib.contextmanager
    def locked() -> Iterator[None]:
        took.append("lock")
        if len(took) == 2:  # the copy is made: other writers got the lock before us
            run.commit({7: b"seven", RUN: b"meanwhile"}, removes=(5,))
            run.commit({6: _data(6, 1, 3000)})
        yield

    run.writer.compact(locked=locked)
    assert took == ["lock", "lock"]  # to make the copy's file, and to finish it
    assert run.log_path.stat().st_ino != first
    run.check_indexed()
    assert b"0:0:" not in run.log_path.read_bytes()  # dead entries of the copied part went
    run.commit({8: b"eight"}, removes=(7,))  # the new log takes commits like any other
    run.check_indexed()
    assert not list(run.tmp.iterdir())


def test_a_compaction_makes_its_copy_while_it_holds_the_lock(
    run: _Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's sweep removes a temporary file whose run lock it gets and whose flock
    nobody holds: a copy made unlocked could be swept between its creation and its flock."""
    _filled(run)
    inside = [False]
    made: list[bool] = []

    @contextlib.contextmanager
    def locked() -> Iterator[None]:
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    real = log._NewLog.__init__

    def init(new: log._NewLog, path: str, log_id: bytes) -> None:
        made.append(inside[0])
        real(new, path, log_id)

    monkeypatch.setattr(log._NewLog, "__init__", init)
    run.writer.compact(locked=locked)
    assert made == [True]
    run.check_indexed()


def test_a_damaged_commit_idx_covers_is_kept_by_a_compaction_without_the_lock(
    run: _Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last commit idx covers has a bad data byte, and a commit idx does not cover follows
    (its idx update failed). Read up to idx's end, that commit looks like a torn tail; the
    compaction must not drop it (undoing its removal, its run record and its new key): it
    compacts the whole log under the lock, where the commit is not the last one."""
    for version in range(40):
        run.commit({RUN: b"r%d" % version * 500, 0: secrets.token_bytes(4000), 2: b"two"})
    run.commit({RUN: b"rC" * 500, 5: b"five" * 100}, removes=(2,))
    view = open_view(str(run.dir))
    assert view is not None
    with view:
        assert view.settled
        found = view.find(5)
        assert found is not None
    with monkeypatch.context() as patched:
        patched.setattr(LogWriter, "_update_index", _fails)
        run.commit({6: b"six"})  # past idx
    raw = bytearray(run.log_path.read_bytes())
    raw[found.offset + log._ENTRY + 3] ^= 0xFF  # a bad byte in the covered commit's data

    run.log_path.write_bytes(bytes(raw))

    def state() -> tuple[bool, bytes | None]:
        view = open_view(str(run.dir))
        assert view is not None
        with view:
            with pytest.raises(CorruptCheckpointError):
                view.read(5, check=True)  # the damage still shows
            return view.read(2) is not None, view.read(RUN)

    before = state()
    assert before == (False, b"rC" * 500)
    run.writer.compact(locked=contextlib.nullcontext)
    assert state() == before


def _fails(*_: object) -> None:
    raise OSError(errno.EIO, "idx update failed")


@pytest.mark.parametrize("meanwhile", ["compacted", "deleted"])
def test_a_compaction_overtaken_meanwhile_gives_up(run: _Run, meanwhile: str) -> None:
    _filled(run)

    @contextlib.contextmanager
    def locked() -> Iterator[None]:
        if not list(run.tmp.iterdir()):  # the copy's file is being made
            yield
            return
        if meanwhile == "compacted":
            run.writer.compact()  # another process compacted first
            run.commit({9: b"nine"})
        else:
            shutil.rmtree(run.dir)  # the run was deleted
            run.model.clear()
        yield

    run.writer.compact(locked=locked)
    assert not list(run.tmp.iterdir())  # its copy was removed
    if meanwhile == "compacted":
        run.check_indexed()
    else:
        assert not run.dir.exists()


def test_a_compaction_that_fails_leaves_the_log_and_no_copy(
    run: _Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    _filled(run)
    before = run.log_path.read_bytes()

    def fails(source: str, target: str) -> None:
        raise OSError(errno.EIO, "rename failed")

    monkeypatch.setattr(os, "replace", fails)
    with pytest.raises(OSError, match="rename failed"):
        run.writer.compact(locked=contextlib.nullcontext)
    monkeypatch.undo()
    assert run.log_path.read_bytes() == before
    assert not list(run.tmp.iterdir())
    run.check()


def test_a_failed_write_leaves_the_log_as_it_was(
    run: _Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    run.commit({0: _data(0, 0), RUN: b"r0"})
    size = run.log_path.stat().st_size
    real = os.pwrite

    def full_disk(fd: int, data: bytes, offset: int) -> int:
        if offset >= size and len(data) > 100:
            real(fd, bytes(data)[:100], offset)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_disk)
    with pytest.raises(OSError, match="space"):
        run.writer.commit([(1, _data(1, 0, 1000)), (RUN, b"r1")])
    monkeypatch.undo()
    assert run.log_path.stat().st_size == size
    run.check()


def test_a_commit_costs_one_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def counted(name: str) -> Callable[[int], None]:
        real = getattr(os, name)

        def sync(fd: int) -> None:
            calls.append(name)
            real(fd)

        return sync

    for name in ("fsync", "fdatasync"):
        monkeypatch.setattr(os, name, counted(name))
    run = _Run(tmp_path, fsync=True)
    run.commit({0: b"first", RUN: b"r0"})
    assert calls == ["fsync", "fsync"]  # the new log, and the directory that names it
    for sequence in range(1, 6):
        calls.clear()
        run.commit({sequence: _data(sequence, 0, 15_000), RUN: b"r"}, removes=(sequence - 1,))
        assert calls == ["fdatasync"]
    run.check()


def test_an_index_rebuilt_over_commits_it_did_not_write_syncs_them_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer killed between its write and its sync leaves a commit past idx that is not on
    the disk yet: whoever rewrites idx over it syncs the log before idx covers the commit."""
    run = _Run(tmp_path, fsync=True)
    run.commit({0: b"first", RUN: b"r0"})
    old_index = run.index_path.read_bytes()
    run.commit({1: b"second", RUN: b"r1"})
    run.index_path.write_bytes(old_index)  # as if killed before the sync and the idx update
    steps: list[str] = []
    real_replace, real_sync = os.replace, os.fdatasync

    def replace(source: str, target: str) -> None:
        steps.append(f"rename {Path(target).name}")
        real_replace(source, target)

    def fdatasync(fd: int) -> None:
        steps.append("fdatasync")
        real_sync(fd)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    run.writer.reindex()
    assert steps == ["fdatasync", f"rename {INDEX}"]
    run.check_indexed()
    steps.clear()
    run.writer.reindex()  # nothing past idx: nothing to sync or rewrite
    assert steps == []


def test_random_commits_reopens_and_compactions_match_a_model(tmp_path: Path) -> None:
    for seed in range(12):
        rng = random.Random(seed)
        run = _Run(tmp_path / str(seed))
        for step in range(120):
            keys = rng.sample(range(-1, 12), rng.randint(1, 4))
            puts = {key: _data(key, step, rng.choice((0, 10, 300, 5000))) for key in keys
                    if rng.random() < 0.8}
            removes = tuple(key for key in keys if key not in puts)
            run.commit(puts, removes)
            roll = rng.random()
            if roll < 0.05 and run.index_path.exists():
                run.index_path.unlink()
            elif roll < 0.1:
                run.writer.compact()
            if step % 10 == 0:
                run.check()
        run.check()


_WORKER = textwrap.dedent("""
    import contextlib, os, secrets, sys
    from fastcheckpoint.stores._file_log import LogWriter, RUN
    directory, temp = sys.argv[1], sys.argv[2]
    writer = LogWriter(directory, lambda: os.path.join(temp, secrets.token_hex(8)), fsync=True)
    for n in range(1, 1_000_000):
        data = (b"%d:" % n).ljust(2000 + (n % 7) * 3000, b"x")
        due = writer.commit([(n % 5, data), (RUN, b"%d" % n)], removes=[(n + 2) % 5])
        print(n, flush=True)
        if due or n % 9 == 0:
            writer.compact(locked=contextlib.nullcontext)
""")


def test_acknowledged_commits_survive_kill_9_during_commits_and_compactions(
    tmp_path: Path,
) -> None:
    run = _Run(tmp_path)
    for round_ in range(4):
        process = subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(run.dir), str(run.tmp)],
            stdout=subprocess.PIPE, text=True)
        assert process.stdout is not None
        acked = 0
        deadline = time.monotonic() + 0.3 + round_ * 0.2
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            acked = int(line)
        process.send_signal(signal.SIGKILL)
        rest = process.stdout.read()
        process.wait()
        acked = max([acked, *(int(line) for line in rest.split())])
        assert acked > 0, "the worker made no commit"
        view = open_view(str(run.dir))
        assert view is not None
        with view:
            latest = int(view.read(RUN, check=True) or b"0")
            # Acknowledged is durable; at most the commit in flight may also be there.
            assert latest in (acked, acked + 1)
            data = view.read(latest % 5, check=True)
            assert data is not None
            assert data.startswith(b"%d:" % latest)
            assert view.read((latest + 2) % 5) is None
        run.dir.joinpath("restart").write_text(str(round_))


def test_keys_and_sizes_are_checked() -> None:
    with pytest.raises(ValueError, match="out of range"):
        log.entry_bytes(log.MIN_KEY - 1, b"", seed=0, last=True)
    with pytest.raises(ValueError, match="out of range"):
        log.entry_bytes(1 << 56, b"", seed=0, last=True)
    assert list(itertools.islice(log.entry_bytes(0, None, seed=0), 4)) == list(b"FCle")
