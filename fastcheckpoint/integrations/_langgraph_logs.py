"""Growing list channels stored as what each version adds: the LangGraph saver's logs.

A ``messages`` channel under ``add_messages`` gets a new version at every step, each the whole
list so far: stored as one value per version, a thread of n steps stores O(n²) bytes. On a
store that keeps nested items, a list value of at least ``history_min_entries`` entries that
LangGraph's serde writes as a msgpack array is stored as a *log* instead:

* the *anchor*, a shared item of the run (``l/<digest of the channel>/<token>``), holds the
  entries the list had when the log began;
* *parts*, items nested under the anchor, each hold the entries one later version added, or
  those of several merged once they accumulate (:mod:`fastcheckpoint._logs`, shared with the
  manager's histories), and name the part before them;
* the checkpoint's header records, per logged channel, a :class:`ChannelLog` (the version, the
  anchor, the last part, the entry count and a CRC-32 of the entries), and its refs name the
  anchor instead of a per-version value. A checkpoint whose channel did not change records its
  parent's :class:`ChannelLog` again.

Entries are compared and stored as the bytes the serde wrote for them (each array element's
msgpack encoding, found without decoding it), and read back as one msgpack array, so a load
decodes the list once, as it would a whole value. A version extends the log this process
wrote or read last for the channel only when its list starts with exactly those entries' bytes
(an entry changed in place encodes differently); otherwise it begins a new log with the whole
list. Parts are found by the chain from the checkpoint's last part, never by position, so a
part a failed or concurrent save left under the anchor is never read. A save that merges parts
removes the merged ones once the store acknowledged it (one more store call every
:data:`~fastcheckpoint._logs.FANOUT` versions of a channel); a load that finds one gone reads
the merged part instead.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import msgspec

from fastcheckpoint import _logs
from fastcheckpoint._codec import array_header, split_array
from fastcheckpoint._history import KEPT_BYTES, KEPT_RUNS
from fastcheckpoint.integrations._langgraph_records import ChannelLog, Typed, digest

__all__ = ["ChannelLogs", "Planned"]

LOGS = "l/"
"""The prefix of every anchor's key."""
_MSGPACK = "msgpack"
_TOKEN_BYTES = 6


@dataclass(frozen=True)
class Planned:
    """A logged value to save: its record, the part to write, and what to remember once the
    save is acknowledged."""

    channel: str
    log: ChannelLog
    write: _logs.Write | None
    """The part to write (``None``: the list did not grow, nothing to write)."""
    tail: _logs.Tail
    """The log once the save is acknowledged."""
    entries: bytes | memoryview
    """All the value's entries (a view of the serde's output)."""
    extends: str | None
    """The incarnation of the run whose log it extends (``None``: a new log). The save may
    name that log's anchor only in that life of the run: a store that does not check refs
    of an earlier life (S3, DynamoDB) would accept a log another process's delete took."""


@dataclass
class _Kept:
    log: ChannelLog
    entries: bytes | memoryview
    """The entries' bytes as stored, all parts in order."""
    incarnation: str
    """The life of the run the log was written or read in."""
    tail: _logs.Tail


class ChannelLogs:
    """The logs of one saver's process: planning saves, reading values back, and the entries
    of each run's and channel's last log as this process wrote or read it (bounded, least
    recently used first out; a forgotten log's next version begins a new one). Thread-safe:
    saves encode in worker threads."""

    def __init__(self, min_entries: int | None) -> None:
        self.min_entries = min_entries
        self._kept: OrderedDict[tuple[str, str], _Kept] = OrderedDict()
        self._kept_bytes = 0
        self._lock = threading.Lock()

    def plan(self, run_key: str, channel: str, version: str | int | float,
             typed: Typed) -> Planned | None:
        """How to save ``typed`` (the serde's output for the channel's new value) as a log;
        ``None``: save it whole (logs are off, it is not a msgpack array, or it is short).
        Costs one comparison of the bytes stored before (no decoding, no copy of them)."""
        if self.min_entries is None or typed[0] != _MSGPACK:
            return None
        found = split_array(typed[1])
        if found is None or found[0] < self.min_entries:
            return None
        count, body = found
        with self._lock:
            kept = self._kept.get((run_key, channel))
        # msgpack is prefix-free: bytes equal to whole entries end where an entry ends.
        # (startswith compares in place; a slice would copy the list's bytes first.)
        if kept is not None and kept.log.count <= count and body.startswith(kept.entries):
            if kept.log.count == count:
                log = msgspec.structs.replace(kept.log, version=version)
                return Planned(channel, log, None, kept.tail, body, kept.incarnation)
            write = _logs.extend(kept.tail, kept.entries, bytes(body[len(kept.entries):]),
                                 count - kept.log.count)
            log = ChannelLog(version, kept.log.anchor, write.key, count, write.crc)
            return Planned(channel, log, write, write.tail(kept.log.anchor), body,
                           kept.incarnation)
        anchor = f"{LOGS}{digest(channel)}/{secrets.token_hex(_TOKEN_BYTES)}"
        write = _logs.begin(anchor, bytes(body), count)
        log = ChannelLog(version, anchor, anchor, count, write.crc)
        return Planned(channel, log, write, write.tail(anchor), body, None)

    def remember(self, run_key: str, planned: Planned, incarnation: str) -> None:
        """A save with ``planned`` was acknowledged in life ``incarnation`` of the run: the
        next version may extend it. The parts it merged away stay recorded as the log's
        leftovers until :meth:`discarded` says they were removed: a removal that fails, is cut
        short or never runs leaves them to the log's next merge."""
        if planned.write is not None and planned.write.discard:
            planned.tail.leftovers = planned.write.discard
        self._keep(run_key, planned.channel,
                   _Kept(planned.log, planned.entries, incarnation, planned.tail))

    def discarded(self, run_key: str, planned: Planned) -> None:
        """The parts ``planned`` merged away were removed: no longer left for the next merge
        (unless the log remembered since is another one, or has other parts left)."""
        if planned.write is None or not planned.write.discard:
            return
        with self._lock:
            kept = self._kept.get((run_key, planned.channel))
            if kept is not None and kept.log.anchor == planned.log.anchor and \
                    kept.tail.leftovers == planned.write.discard:
                kept.tail.leftovers = ()

    def forget(self, run_key: str) -> None:
        """The run's logs may be gone (deleted, refused): its next versions begin new ones."""
        with self._lock:
            for slot in [slot for slot in self._kept if slot[0] == run_key]:
                self._kept_bytes -= len(self._kept.pop(slot).entries)

    def read(self, run_key: str, channel: str, log: ChannelLog, items: Mapping[str, bytes],
             where: str, *, keep: str | None) -> Typed:
        """The value ``log`` records, from the anchor and parts among ``items`` (what the
        store returned with the checkpoint), as the serde wrote it; ``keep``: remember it
        (the run's latest, which the next save may extend), read in that incarnation."""
        found = _logs.read(log.anchor, log.last, log.count, log.crc, items,
                           what=f"channel {channel!r:.80}: its log", where=where,
                           header=array_header(log.count))
        if keep is not None:
            self._keep(run_key, channel, _Kept(log, found.entries, keep, found.tail),
                       read=True)
        return _MSGPACK, found.data

    def _keep(self, run_key: str, channel: str, kept: _Kept, *, read: bool = False) -> None:
        """Remember ``kept`` as the channel's log; ``read``: as a load found it, which knows
        nothing of the parts this process merged away and could not remove yet."""
        slot = (run_key, channel)
        with self._lock:
            old = self._kept.pop(slot, None)
            if old is not None:
                self._kept_bytes -= len(old.entries)
                if read and old.log.anchor == kept.log.anchor:
                    # As the manager's histories adopt a log: the merged part holding those
                    # parts lives as long as the anchor, so the next merge may remove them.
                    kept.tail.leftovers = old.tail.leftovers
            self._kept[slot] = kept
            self._kept_bytes += len(kept.entries)
            while self._kept and (self._kept_bytes > KEPT_BYTES or
                                  len(self._kept) > KEPT_RUNS):
                _, dropped = self._kept.popitem(last=False)
                self._kept_bytes -= len(dropped.entries)
