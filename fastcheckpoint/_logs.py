"""Logs: a list that grows, stored as what each write added, merged as the parts accumulate.

The manager's histories (:mod:`fastcheckpoint._history`) and the LangGraph saver's list
channels (:mod:`fastcheckpoint.integrations._langgraph_logs`) store a growing list the same
way, on a store that keeps nested items (:class:`~fastcheckpoint.stores.SupportsNestedItems`):

* the *anchor*, a shared item (its key is the caller's), holds the entries the list had when
  the log began;
* *parts*, items nested under the anchor (``<anchor>/<index of their first entry>.<token>``,
  the token random), each hold the entries of one or more later writes and name the part
  before them (the anchor for the first);
* a reader knows the log by ``(anchor, last, count, crc)``: its list is the first ``count``
  entries, those of the part ``last`` and the parts before it, with the CRC-32 ``crc``.

Entries are stored as their encodings, one after the other (msgpack is prefix-free), and read
back by checking one CRC over all of them.

**Merging keeps reads bounded.** A write normally adds one part with its new entries (level
0). When it would be the :data:`FANOUT`-th part of level 0 in a row at the end of the log, it
writes instead one part of level 1 holding the entries of those ``FANOUT - 1`` parts and its
own; likewise ``FANOUT`` parts of level 1 become one of level 2, and so on. Once the write is
acknowledged its writer removes the parts it merged (:attr:`Write.discard`). So the parts of a
log of ``n`` writes number at most ``(FANOUT - 1)`` per level, ``log_FANOUT(n)`` levels, and
every entry is written once per level it passes through.

**A removed part is never needed.** A merged part records where each write it holds ended
(its entry counts and byte sizes), so it holds every prefix of the log that ended inside it.
A reader that meets a missing part (merged away by another writer, or by this log's own later
writes) takes instead any part that holds the log up to the same entry and continues from
there; the CRC over the whole list decides which chain is right, so a part a failed write
left behind (possible on a store without atomic writes, such as S3) or a part of another
branch is never taken for the real one. A writer never removes a part it used only in part
(a longer part that another branch wrote, cut at the end of its own list).

Pieces are found by the chain from ``last``, never by position alone, and a log is extended
only by writers that know its tail (:class:`Tail`), so each log is one chain, possibly with
branches that share its start (two processes extending the same tail).
"""

from __future__ import annotations

import secrets
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import accumulate

import msgspec

from fastcheckpoint.errors import CorruptCheckpointError
from fastcheckpoint.stores import nested_prefix

__all__ = ["FANOUT", "LogGap", "LogPart", "Read", "Tail", "Write", "begin", "extend", "read"]

FANOUT = 16
"""Parts of one level at the end of a log that a write merges into one of the next level."""
_INDEX_DIGITS = 10
_TOKEN_BYTES = 6


class LogPart(msgspec.Struct, array_like=True, frozen=True):
    """The value of an anchor or a part."""

    previous: str
    """The part before: its key without the anchor's nested prefix, ``""`` for the anchor
    (and in the anchor, which has none)."""
    level: int
    """0: one write's entries; ``n``: :data:`FANOUT` parts of level ``n - 1`` merged."""
    counts: tuple[int, ...]
    """Entries each write held here added, in order (each at least one)."""
    sizes: tuple[int, ...]
    """Bytes of those writes' entries."""
    entries: bytes
    """The entries' encodings, one after the other (zlib-compressed when ``packed``)."""
    packed: bool = False


class _PartView(msgspec.Struct, array_like=True, frozen=True):
    """A :class:`LogPart` as read: its entries a view of the stored value, not a copy."""

    previous: str
    level: int
    counts: tuple[int, ...]
    sizes: tuple[int, ...]
    entries: memoryview
    packed: bool = False


_DECODER = msgspec.msgpack.Decoder(_PartView)
_ENCODER = msgspec.msgpack.Encoder()


class LogGap(CorruptCheckpointError):
    """A part of the log is missing and nothing else holds its entries. Reading again may
    succeed: on a store whose reads are not atomic (S3, DynamoDB, the file store), a part can
    be merged away between the listing of a log's parts and their reading."""


@dataclass(frozen=True)
class _Link:
    """A part of a log as its writer knows it."""

    key: str
    level: int
    first: int
    """Index of its first entry."""
    start: int
    """Byte offset of its first entry in the log's entries."""
    counts: tuple[int, ...]
    sizes: tuple[int, ...]
    whole: bool = True
    """``False``: a longer part used up to the end of this log (another branch's), never
    removed by a merge."""

    @property
    def count(self) -> int:
        return sum(self.counts)

    @property
    def end(self) -> int:
        return self.start + sum(self.sizes)


@dataclass
class Tail:
    """What a writer knows of a log, enough to extend it: its parts in order (the anchor
    first), its entry count, CRC-32 and the parts a merge could not remove yet."""

    anchor: str
    links: tuple[_Link, ...]
    count: int
    crc: int
    leftovers: tuple[str, ...] = ()
    """Parts merged away whose removal failed: removed with the next merge."""

    @property
    def last(self) -> str:
        return self.links[-1].key


@dataclass(frozen=True)
class Write:
    """One write to a log: the item to store and the parts to remove once it is acknowledged."""

    key: str
    value: bytes
    discard: tuple[str, ...]
    """Parts the new one holds: remove them after the write (it is what readers use)."""
    leftovers: tuple[str, ...]
    """Parts merged away earlier whose removal failed, still to remove."""
    links: tuple[_Link, ...]
    count: int
    crc: int

    def tail(self, anchor: str) -> Tail:
        """The log as it is once this write is acknowledged."""
        return Tail(anchor, self.links, self.count, self.crc, self.leftovers)


Pack = Callable[[bytes], "bytes | None"]
"""Compresses a part's entries, or ``None`` to store them as they are."""
Unpack = Callable[[bytes, str], bytes]
"""Inflates a packed part's entries (the second argument names the part for errors)."""


def _value(previous: str, level: int, counts: tuple[int, ...], sizes: tuple[int, ...],
           entries: bytes, pack: Pack | None) -> bytes:
    packed = None if pack is None else pack(entries)
    return _ENCODER.encode(LogPart(previous, level, counts, sizes,
                                   entries if packed is None else packed, packed is not None))


def begin(anchor: str, entries: bytes, count: int, *, pack: Pack | None = None) -> Write:
    """A new log holding ``count`` entries (their encodings ``entries``): its anchor."""
    link = _Link(anchor, 0, 0, 0, (count,), (len(entries),))
    return Write(anchor, _value("", 0, link.counts, link.sizes, entries, pack), (), (),
                 (link,), count, zlib.crc32(entries))


def extend(tail: Tail, data: bytes | bytearray | memoryview, new: bytes, added: int, *,
           pack: Pack | None = None) -> Write:
    """The write adding ``added`` (at least one) entries, whose encodings are ``new``, to the
    log ``tail``, whose entries' bytes ``data`` holds: one new part, merging the parts it ends
    a run of (see the module's docstring)."""
    counts: tuple[int, ...] = (added,)
    sizes: tuple[int, ...] = (len(new),)
    links = list(tail.links)
    level = 0
    while True:
        run = 0
        while run < FANOUT - 1 and len(links) - run > 1 and links[-1 - run].level == level:
            run += 1
        if run < FANOUT - 1:
            break
        taken, links = links[-run:], links[:-run]
        counts = (*(c for link in taken for c in link.counts), *counts)
        sizes = (*(s for link in taken for s in link.sizes), *sizes)
        level += 1
    start = links[-1].end
    first = tail.count + added - sum(counts)
    key = (f"{nested_prefix(tail.anchor)}{first:0{_INDEX_DIGITS}d}."
           f"{secrets.token_hex(_TOKEN_BYTES)}")
    entries = new if level == 0 else bytes(data[start:tail.links[-1].end]) + new
    link = _Link(key, level, first, start, counts, sizes)
    before = links[-1].key
    # A merged part is stored as it is: it is read at every load, where inflating it would
    # cost more than reading it (a single write's large entries are packed as before).
    value = _value("" if before == tail.anchor else before[len(nested_prefix(tail.anchor)):],
                   level, counts, sizes, entries, None if level else pack)
    crc = zlib.crc32(new, tail.crc)
    if not level:
        return Write(key, value, (), tail.leftovers, (*links, link), tail.count + added, crc)
    merged = [item.key for item in tail.links[len(links):] if item.whole]
    return Write(key, value, tuple(dict.fromkeys((*tail.leftovers, *merged))), (),
                 (*links, link), tail.count + added, crc)


@dataclass(frozen=True)
class Read:
    """A log read back: the caller's header and the entries' bytes (``data``), the entries
    alone (a view of ``data``), and its tail (to extend it)."""

    data: bytes
    entries: memoryview
    tail: Tail


@dataclass
class _Found:
    key: str
    part: _PartView
    first: int
    ends: tuple[int, ...] = field(default=())
    """Entry index where each of its writes ends (absolute)."""


def read(anchor: str, last: str, count: int, crc: int, items: Mapping[str, bytes], *,
         what: str, where: str, unpack: Unpack | None = None, header: bytes = b"") -> Read:
    """The log ``(anchor, last, count, crc)`` from its parts among ``items`` (what the store
    returned with the checkpoint): its first ``count`` entries, checked against ``crc``, in
    one copy, after ``header`` (a msgpack array header makes them one array to decode).

    Raises :class:`LogGap` when a part is missing and nothing else holds its entries,
    :class:`CorruptCheckpointError` when a part is damaged or the log fails its CRC; ``what``
    names the log in messages, ``where`` the checkpoint's store key.
    """
    parts = _Parts(anchor, items, what, where, unpack)
    if anchor not in items:
        raise LogGap(f"{what}: its anchor {anchor!r} is missing", key=where)
    for chain in parts.chains(last, count):
        pieces = [parts.bytes_of(found, end) for found, end in chain]
        checked = 0
        for piece in pieces:
            checked = zlib.crc32(piece, checked)
        if checked == crc:
            links, start = [], 0
            for (found, end), piece in zip(chain, pieces, strict=True):
                links.append(parts.link(found, end, start))
                start += len(piece)
            data = b"".join((header, *pieces))
            return Read(data, memoryview(data)[len(header):],
                        Tail(anchor, tuple(links), count, crc))
    if parts.missing:
        raise LogGap(f"{what}: its part {parts.missing[0]!r} is missing", key=where)
    raise CorruptCheckpointError(f"{what} fails its checksum (a part is missing or damaged)",
                                 key=where)


class _Parts:
    """The parts of one log among a read's items, decoded as they are needed."""

    def __init__(self, anchor: str, items: Mapping[str, bytes], what: str, where: str,
                 unpack: Unpack | None) -> None:
        self.anchor = anchor
        self.prefix = nested_prefix(anchor)
        self.items = items
        self.what = what
        self.where = where
        self.unpack = unpack
        self.found: dict[str, _Found | None] = {}
        self.raw: dict[str, memoryview] = {}
        self.by_end: dict[int, list[str]] | None = None
        self.missing: list[str] = []

    def get(self, key: str) -> _Found | None:
        if key in self.found:
            return self.found[key]
        value = self.items.get(key)
        found = None
        if value is not None and (key == self.anchor or key.startswith(self.prefix)):
            found = self._decoded(key, value)  # raises when damaged: never cached
        self.found[key] = found
        return found

    def _decoded(self, key: str, value: bytes) -> _Found:
        try:
            part = _DECODER.decode(value)
        except msgspec.DecodeError as exc:
            raise CorruptCheckpointError(
                f"{self.what}: its part {key!r} is damaged: {exc}", key=self.where) from exc
        if key == self.anchor:
            first = 0
            ok = part.previous == "" and part.level == 0
        else:
            index = key[len(self.prefix):].partition(".")[0]
            first = int(index) if index.isdigit() else -1
            ok = first >= 0 and part.level >= 0
        if not ok or not part.counts or len(part.counts) != len(part.sizes) or \
                min(part.counts) < 1 or min(part.sizes) < 0:
            raise CorruptCheckpointError(
                f"{self.what}: its part {key!r} is not a part of it", key=self.where)
        return _Found(key, part, first, tuple(accumulate(part.counts, initial=first))[1:])

    def holding(self, end: int) -> list[str]:
        """Parts in which a write ends at entry ``end``, longest first (a damaged part,
        one a failed write may have left, is no candidate)."""
        if self.by_end is None:
            by_end: dict[int, list[_Found]] = {}
            for key in self.items:
                if key == self.anchor or key.startswith(self.prefix):
                    try:
                        found = self.get(key)
                    except CorruptCheckpointError:
                        continue
                    assert found is not None
                    for stop in found.ends:
                        by_end.setdefault(stop, []).append(found)
            self.by_end = {
                stop: [found.key for found in sorted(held, key=lambda f: -f.part.level)]
                for stop, held in by_end.items()}
        return self.by_end.get(end, [])

    def chains(self, key: str, end: int) -> Iterator[list[tuple[_Found, int]]]:
        """Every chain of parts holding the log's first ``end`` entries whose last part is
        ``key`` (or, where a part is missing, one that holds its entries), anchor first.
        ``end`` falls strictly with each part, so every walk ends."""
        links: list[tuple[_Found, int]] = []
        while True:
            found = self.get(key)
            if found is None or end not in found.ends:
                break
            links.append((found, end))
            if found.key == self.anchor:
                yield links[::-1]
                return
            previous = found.part.previous
            key, end = self.prefix + previous if previous else self.anchor, found.first
        if self.get(key) is None:
            self.missing.append(key)
        for other in self.holding(end):
            if other == key:
                continue
            for rest in self.chains(other, end):
                yield [*rest, *links[::-1]]

    def bytes_of(self, found: _Found, end: int) -> memoryview:
        """The part's entries up to entry ``end`` (a view: copied once, by the join)."""
        raw = self.raw.get(found.key)
        if raw is None:
            raw = found.part.entries
            if found.part.packed:
                if self.unpack is None:
                    raise CorruptCheckpointError(
                        f"{self.what}: its part {found.key!r} is compressed", key=self.where)
                raw = memoryview(self.unpack(bytes(raw), found.key))
            if len(raw) != sum(found.part.sizes):
                raise CorruptCheckpointError(
                    f"{self.what}: its part {found.key!r} is damaged (size)", key=self.where)
            self.raw[found.key] = raw
        if end == found.ends[-1]:
            return raw
        return raw[:sum(found.part.sizes[:found.ends.index(end) + 1])]

    def link(self, found: _Found, end: int, start: int) -> _Link:
        """The part as a writer knows it: up to ``end``, at byte ``start`` of the log."""
        index = found.ends.index(end) + 1
        return _Link(found.key, found.part.level, found.first, start,
                     found.part.counts[:index], found.part.sizes[:index],
                     whole=index == len(found.ends))
