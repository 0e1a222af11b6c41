"""Lists that grow, stored as what each checkpoint adds: the manager's histories.

An agent that checkpoints its conversation after every step would store it again with every
checkpoint: O(n²) bytes for n steps. On a store that keeps nested items
(:class:`~fastcheckpoint.stores.SupportsNestedItems`), a ``messages`` or ``tool_calls`` list of at
least ``CheckpointConfig.history_min_entries`` entries is stored as a *log* instead:

* the *anchor*, a shared item of the run (``m/<incarnation>/<sequence>.<token>`` for
  messages, ``t/...`` for tool calls), holds the entries the list had when the log began;
* *parts*, items nested under the anchor, each hold the entries of one later checkpoint, or
  of several merged once they accumulate (:mod:`fastcheckpoint._logs`, shared with the
  LangGraph saver), and name the part before them;
* every checkpoint of the log names the anchor in its ``refs`` and records in its payload a
  :class:`~fastcheckpoint._codec.LogRef`: its list is the log's first ``length`` entries, the
  ones its last part and the parts before it hold, with their CRC-32.

Parts are chained rather than found by position, and anchors and parts carry random tokens,
because a write that failed may leave them behind on a store without atomic writes (S3): a
later create at the same place writes items of its own, never ones it might find in place with
other entries (items are written only where no item has the key). When a create merges parts,
the manager removes the merged ones once the store acknowledged it (one more store call every
:data:`~fastcheckpoint._logs.FANOUT` creates); a read that finds one gone uses the merged part.
They stay recorded as the log's leftovers until that removal succeeds, so one that failed or was
cut short is made again with the log's next merge (a process that dies in between leaves them
until the log dies).

The store keeps the anchor while a checkpoint names it and the parts with it, and returns them
all with the checkpoint in one read, so pruning and expiry never take an entry a held checkpoint
uses, and a log dies with the last checkpoint naming it.

A create extends the log only when that is certainly right: its sequence is the one after the
checkpoint this process stored last for the run, or read last as the run's latest (writers that
take turns on a run, each restoring it first; the store refuses the create if any other process
wrote in between), and the new list starts with exactly the entries that checkpoint stored
(compared by their encodings, so an entry changed in place counts as a change). Anything else
(the first create of a run in this process that did not restore it, a lost sequence race, a
list edited, shortened or reordered, an anchor another process's removal took) begins a new log
with the whole list: never wrong, at the cost of one full copy. Extending a log another process
wrote is as safe as extending one's own: a merge removes only parts its merged part holds
whole, and a reader that misses one takes the merged part, which lives as long as the anchor.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fastcheckpoint import _logs
from fastcheckpoint._codec import Codec, LoggedPayload, LogRef, Payload, array_header
from fastcheckpoint.stores import Item

__all__ = ["Histories", "Written"]

PARTS = ("messages", "tool_calls")
_CODES = {"messages": "m", "tool_calls": "t"}
KEPT_BYTES = 64 * 1024 * 1024
"""Bytes of stored entries this process keeps decoded copies of, over all runs, to tell an
appended list from an edited one; beyond it the least recently written runs are forgotten
(their next create begins a new log)."""
KEPT_RUNS = 10_000
"""Runs this process remembers logs of (the least recently written are forgotten)."""
_TOKEN_BYTES = 6


@dataclass
class _Kept:
    """One part's log as this process stored it last."""

    tail: _logs.Tail
    encoded: bytearray
    """The entries' encodings (:meth:`Codec.entries_bytes`), as the log stores them: what a
    list must encode to, to start with exactly them."""

    @property
    def anchor(self) -> str:
        return self.tail.anchor

    @property
    def count(self) -> int:
        return self.tail.count

    @property
    def stored_bytes(self) -> int:
        return len(self.encoded)


@dataclass
class _RunLogs:
    sequence: int
    incarnation: str
    parts: dict[str, _Kept] = field(default_factory=dict)
    counted: int = 0
    """Its :attr:`stored_bytes` when it was counted in the process's total (a later create
    grows its entries in place, so it must not be counted again to be taken out)."""

    @property
    def stored_bytes(self) -> int:
        return sum(kept.stored_bytes for kept in self.parts.values())


@dataclass
class _Part:
    """What one create writes for one part stored as a log."""

    part: str
    anchor: str
    first: int
    """Index of the first entry written (0: the anchor, a new log)."""
    entries: list[Any]
    length: int
    base: _Kept | None
    """The log extended (``None``: a new one)."""
    encoded: bytes = b""
    """The encodings of the entries written, taken when they were (the caller may change
    them later)."""
    write: _logs.Write | None = None
    """The item written (``None``: nothing was added, the checkpoint names the log as is)."""


@dataclass
class Written:
    """What a create writes: the payload, its items and refs, and what to remember."""

    payload: bytes
    items: list[Item]
    refs: tuple[str, ...]
    parts: list[_Part]

    @property
    def size(self) -> int:
        return len(self.payload) + sum(len(item.value) for item in self.items)

    @property
    def discard(self) -> list[str]:
        """Parts of the logs this create merged into its own: remove them once it is
        acknowledged."""
        return [key for planned in self.parts if planned.write is not None
                for key in planned.write.discard]


class Histories:
    """Plans the logs of each create and rebuilds lists on reads; remembers, per run, what
    this process stored last (a guess that saves copies, never trusted without the store's
    sequence check)."""

    def __init__(self, codec: Codec, *, min_entries: int | None, enabled: bool) -> None:
        self._codec = codec
        self._min_entries = min_entries if enabled else None
        self._runs: OrderedDict[str, _RunLogs] = OrderedDict()
        self._kept_bytes = 0

    @property
    def enabled(self) -> bool:
        return self._min_entries is not None

    def plan(
        self, key: str, body: Payload, *, sequence: int, incarnation: str, extend: bool
    ) -> list[_Part]:
        """The parts of ``body`` to store as logs in checkpoint ``sequence``: extending the
        logs of the checkpoint before it when ``extend``, this process stored that one, and
        the lists start with what it stored (encodes the stored prefix again to compare:
        :meth:`kept_bytes` says how much)."""
        if self._min_entries is None:
            return []
        previous = self._runs.get(key) if extend else None
        if previous is not None and (previous.sequence, previous.incarnation) != (
                sequence - 1, incarnation):
            previous = None
        parts: list[_Part] = []
        for part in PARTS:
            entries: list[Any] = getattr(body, part)
            if len(entries) < self._min_entries:
                continue
            base = None if previous is None else previous.parts.get(part)
            if base is not None and self._extends(part, entries, base):
                parts.append(_Part(part, base.anchor, base.count, entries[base.count:],
                                   len(entries), base))
            else:
                # A token of its own, like parts: an anchor a failed write left at this
                # place (S3) must never pass for this one.
                anchor = (f"{_CODES[part]}/{incarnation}/{sequence:x}."
                          f"{secrets.token_hex(_TOKEN_BYTES)}")
                parts.append(_Part(part, anchor, 0, entries, len(entries), None))
        return parts

    def encode(self, body: Payload, parts: list[_Part]) -> Written:
        """Encode the payload and the new entries of ``parts`` (may run in a worker thread)."""
        logs: dict[str, LogRef] = {}
        items: list[Item] = []
        pack = self._codec.pack_entries
        for planned in parts:
            base = planned.base
            if base is None:
                planned.encoded = self._codec.entries_bytes(planned.part, planned.entries)
                planned.write = _logs.begin(planned.anchor, planned.encoded, planned.length,
                                            pack=pack)
            elif planned.entries:
                planned.encoded = self._codec.entries_bytes(
                    planned.part, planned.entries, planned.first)
                planned.write = _logs.extend(base.tail, base.encoded, planned.encoded,
                                             len(planned.entries), pack=pack)
            if planned.write is None:
                assert base is not None
                tail = base.tail  # nothing added: the checkpoint names the log as it is
                logs[planned.part] = LogRef(planned.anchor, tail.count, tail.crc, tail.last)
            else:
                items.append(Item(key=planned.write.key, value=planned.write.value))
                logs[planned.part] = LogRef(planned.anchor, planned.write.count,
                                            planned.write.crc, planned.write.key)
        payload = self._codec.encode_payload(
            body.state,
            [] if "messages" in logs else body.messages,
            [] if "tool_calls" in logs else body.tool_calls,
            body.context,
            messages_log=logs.get("messages"),
            tool_calls_log=logs.get("tool_calls"),
        )
        refs = tuple(planned.anchor for planned in parts)
        return Written(payload, items, refs, parts)

    def remember(self, key: str, written: Written, *, sequence: int, incarnation: str) -> None:
        """The create of ``written`` at ``sequence`` succeeded: it is the log to extend."""
        if self._min_entries is None:
            return
        logs = _RunLogs(sequence, incarnation)
        for planned in written.parts:
            kept = planned.base
            if planned.write is not None:
                tail = planned.write.tail(planned.anchor)
                if kept is None:
                    kept = _Kept(tail, bytearray())
                kept.tail = tail
            assert kept is not None, "a new log always writes its anchor"
            if planned.write is not None and planned.write.discard:
                # Still to remove until :meth:`discarded` says they are: a removal that
                # fails, is cut short or never runs leaves them to the log's next merge.
                kept.tail.leftovers = planned.write.discard
            kept.encoded += planned.encoded  # the old value is no one else's: it is replaced
            logs.parts[planned.part] = kept
        self._keep(key, logs)

    def adopt(self, key: str, found: Mapping[str, _logs.Read], *, sequence: int,
              incarnation: str) -> None:
        """The run's latest checkpoint, ``sequence``, was read whole with its logs ``found``
        (by part): the log to extend, as if this process had stored it, unless it remembers
        that checkpoint or a later one of the same life of the run already. A create at the
        next sequence extends it; the store refuses that create if another process wrote in
        between (it then begins new logs)."""
        if self._min_entries is None or not found:
            return
        old = self._runs.get(key)
        if old is not None and old.incarnation == incarnation and old.sequence >= sequence:
            return
        logs = _RunLogs(sequence, incarnation)
        for part, read in found.items():
            tail = read.tail
            before = None if old is None else old.parts.get(part)
            if before is not None and before.anchor == tail.anchor:
                # Parts this process merged away and could not remove yet: the merged part
                # holding them lives as long as the anchor, so the next merge may remove them.
                tail.leftovers = before.tail.leftovers
            logs.parts[part] = _Kept(tail, bytearray(read.entries))
        self._keep(key, logs)

    def _keep(self, key: str, logs: _RunLogs) -> None:
        self.forget(key)
        if not logs.parts:
            return
        self._runs[key] = logs
        logs.counted = logs.stored_bytes
        self._kept_bytes += logs.counted
        while len(self._runs) > 1 and (
                self._kept_bytes > KEPT_BYTES or len(self._runs) > KEPT_RUNS):
            _, evicted = self._runs.popitem(last=False)
            self._kept_bytes -= evicted.counted

    def _extends(self, part: str, entries: list[Any], kept: _Kept) -> bool:
        """Whether ``entries`` starts with exactly the entries of ``kept``: compared by their
        encodings, so an entry changed in place is a change, and two values that would
        restore differently (``1`` and ``1.0``, a tuple and a list) never pass for equal."""
        if len(entries) < kept.count:
            return False
        return self._codec.same_entries(part, entries[:kept.count], kept.encoded)

    def discarded(self, key: str, written: Written) -> None:
        """The parts ``written`` merged were removed: no longer left for the next merge."""
        logs = self._runs.get(key)
        for planned in written.parts:
            kept = None if logs is None else logs.parts.get(planned.part)
            if planned.write is not None and kept is not None and \
                    kept.anchor == planned.anchor and \
                    kept.tail.leftovers == planned.write.discard:
                kept.tail.leftovers = ()

    def kept_bytes(self, key: str) -> int:
        """Bytes of entries a create of the run compares before extending its logs."""
        logs = self._runs.get(key)
        return 0 if logs is None else logs.stored_bytes

    def forget(self, key: str) -> None:
        """Begin new logs at the run's next create (its anchors may be gone)."""
        old = self._runs.pop(key, None)
        if old is not None:
            self._kept_bytes -= old.counted

    def resolve(self, payload: Payload, items: Mapping[str, bytes], where: str
                ) -> tuple[Payload, dict[str, _logs.Read]]:
        """The body with its logged parts rebuilt from the items read with the checkpoint,
        and those logs as read (by part: what :meth:`adopt` takes)."""
        found: dict[str, _logs.Read] = {}
        if not isinstance(payload, LoggedPayload):
            return payload, found
        if payload.messages_log is not None:
            found["messages"] = self._read("messages", payload.messages_log, items, where)
            payload.messages = self._codec.decode_entries(found["messages"].data, where)
        if payload.tool_calls_log is not None:
            found["tool_calls"] = self._read(
                "tool_calls", payload.tool_calls_log, items, where)
            payload.tool_calls = self._codec.decode_entries(found["tool_calls"].data, where)
        return payload, found

    def _read(self, part: str, log: LogRef, items: Mapping[str, bytes], where: str
              ) -> _logs.Read:
        """The log ``log`` records; :class:`~fastcheckpoint._logs.LogGap` when a part is
        missing (reading again may find it merged)."""
        return _logs.read(log.anchor, log.last, log.length, log.crc, items,
                          what=f"the {part} log {log.anchor!r}", where=where,
                          unpack=self._codec.unpack_entries, header=array_header(log.length))
