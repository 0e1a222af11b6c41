"""Object keys and record encodings of the S3 store (see ``docs/stores/s3.md``).

Under the store prefix ``P``, for the run with key ``rk``::

    P runs/<rk>/a                            run object: status, version, data, the shared
                                             items with nested items (compare-and-set)
    P runs/<rk>/c/<inv seq>                  slot: the checkpoint itself (create-only: the commit)
    P runs/<rk>/c/<inv seq>/m<listing>       marker: what a listing needs, in the key
    P runs/<rk>/c/<inv seq>/l<listing>       marker of a long header (the header in its body)
    P runs/<rk>/c/<inv seq>/t<listing>       tombstone marker of a deleted newest checkpoint
    P runs/<rk>/c/<inv seq>/w<hex key>/<meta> an item owned by the checkpoint (expiry in the key)
    P runs/<rk>/o/<hex item key>/<meta>      expiry of an item owned by no checkpoint, in the key
    P runs/<rk>/sweep/due                    a removal left shared items to sweep
    P runs/<rk>/sweep/lease                  a sweep in progress: what it will delete; and
                                             what the sweeps removed in the last hour
    P items/<rk>/<hex item key>              item
    P index/all/<inv created>/<rk>/<inc>     run index, newest created first
    P index/status/<status>/<inv created>/<rk>/<inc>
    P index/label/<b64 label>/<inv created>/<rk>/<inc>

``<inv seq>`` is ``10**19 - 1 - sequence`` in 19 digits, so a run's slots list newest first,
right after its run object (``a`` < ``c``): one ``ListObjectsV2`` of ``runs/<rk>/`` with a small
``MaxKeys`` returns the run object's ETag and the newest checkpoints, however long the run.

Hex keeps the code point order of item keys, and ``"/"`` is ``2f`` (no other character's
UTF-8 holds that byte), so the items nested under ``K`` (keys ``K + "/..."``) are exactly the
objects under ``items/<rk>/<hex K>2f``: one listing by prefix.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Collection, Iterable
from typing import Any, TypeVar

import msgspec

from fastcheckpoint import _ids
from fastcheckpoint._validate import shown
from fastcheckpoint.errors import CorruptCheckpointError, ValidationError
from fastcheckpoint.stores._base import MAX_ITEM_KEY_BYTES, check_str, item_key_bytes

SEQUENCE_SPAN = 10**19
"""Sequences are 0 .. 10**19 - 1: every id the manager can parse (up to 19 digits)."""
MAX_KEY_BYTES = 1024
"""S3's limit on an object key (UTF-8)."""
MAX_PREFIX_BYTES = 384
"""Longest store prefix: leaves room for item keys and listing markers under 1,024 bytes."""
_CREATED_SPAN = 10**17  # microseconds since the epoch: good until the year 5138
_STATUS = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_KEY_ALPHABET = "234567abcdefghijklmnopqrstuvwxyz"  # of run keys, in code point order
_INVERT = str.maketrans(_KEY_ALPHABET, _KEY_ALPHABET[::-1])
"""Run keys in index entries: reversed alphabet, so that ascending listings put the greater
key first (its own inverse)."""
_FORMAT = b"\x01"
_R = TypeVar("_R")


class RunState(msgspec.Struct, array_like=True, frozen=True):
    """The run object: what changes rarely. Counters and expiry are derived from listings."""

    run_id: str
    incarnation: str
    status: str
    created_at: float
    updated_at: float
    version: int
    data: bytes
    floor: int = 0
    """Slot keys below it may have been deleted (pruned, deleted or expired checkpoints);
    none at or above it ever was. A key is only deleted once the floor is above it, so a
    create-only PUT at or above the floor collides with any slot ever written there, and an
    append below it (from knowledge older than another process's pruning) is refused."""
    labels: tuple[str, ...] = ()
    nesting: tuple[str, ...] = ()
    """Keys of the shared items appends wrote nested items under (at most
    ``NESTING_CAPACITY``): a read with items lists what is nested under a ref only if it is
    here, in ``nesting_all``, or in the slot's ``nests``. A key leaves once a sweep removed
    its item."""
    nesting_all: bool = False
    """Any shared item may have nested items: ``nesting`` outgrew its capacity, or the run
    object was rebuilt (which items had nested items is lost with it)."""
    broken_guards: int = 0
    """Guards of status changes that appends broke: breaking one rewrites the run object
    with this one more, so that the change, a compare-and-set of the run object as it was
    when the guard was written, can no longer apply."""

    def may_nest(self, key: str) -> bool:
        return self.nesting_all or key in self.nesting


NESTING_CAPACITY = 32
"""Keys a run object lists in ``nesting`` at most; beyond them it says any may nest."""


def nesting_after(state: RunState, keys: Iterable[str]) -> RunState:
    """``state`` once items are written nested under ``keys`` (shared items)."""
    added = [key for key in dict.fromkeys(keys) if not state.may_nest(key)]
    if not added:
        return state
    if len(state.nesting) + len(added) > NESTING_CAPACITY:
        return msgspec.structs.replace(state, nesting=(), nesting_all=True)
    return msgspec.structs.replace(state, nesting=(*state.nesting, *added))


def nesting_without(state: RunState, keys: Collection[str]) -> RunState:
    """``state`` once the shared items ``keys`` are removed (with what was nested under them)."""
    return msgspec.structs.replace(
        state, nesting=tuple(key for key in state.nesting if key not in keys))


class Slot(msgspec.Struct, array_like=True, frozen=True):
    """A slot object: one checkpoint (or the tombstone of the newest one after a delete)."""

    incarnation: str
    sequence: int
    checkpoint_id: str
    created_at: float
    expires_at: float | None
    appended_at: float
    header: bytes
    payload: bytes
    tombstone: bool = False
    token: bytes = b""
    """Random per write: a writer whose reply was lost recognises its own slot by it."""
    run_key: str = ""
    """The run it was written for: a slot copied from another run reads as corrupt."""
    refs: tuple[str, ...] = ()
    """Keys of the shared items the checkpoint names."""
    nests: tuple[str, ...] = ()
    """Those of ``refs`` its append wrote nested items under (see ``RunState.nesting``)."""
    replaced: bytes = b""
    """A tombstone's: the write token of the checkpoint it replaced. A create whose reply was
    lost, its checkpoint deleted before the PUT was sent again, finds it was applied."""
    guards: str = ""
    """A *guard*'s (a tombstone without checkpoint id at the run's next sequence, written by
    a status change that must apply only while the run's newest checkpoint is unchanged):
    the ETag of the run object the change replaces. An append that finds a guard
    at its sequence breaks it (see ``S3Store._break_guard``); no reader takes it for a
    checkpoint or a tombstone."""
    owns: bool = False
    """Its append wrote items it owns: they are written after the slot (a slot that loses its
    sequence must not have written items the winner owns) and before its marker, so until
    the marker is there the checkpoint may lack them (its writer is still at work, or was
    killed): readers leave such a slot out (a *pending* slot)."""
    after: bytes = b""
    """The write token of the checkpoint at the sequence before, as its writer knew it (empty
    when it knew none): a create whose slot landed in a key a pruning had freed tells, from
    the next slot, whether that slot follows it or the checkpoint the key held before (see
    ``S3Store._follows``). Where the sequence before holds a tombstone whose ``after`` the
    writer knows (its marker shows it, or its own ``delete`` wrote it), that tombstone's
    ``after``: the chain goes through deleted checkpoints, whose tombstones pruning
    removes. A tombstone's is that of the slot it replaced (read by the delete, empty in
    tombstones of earlier releases), so the chain outlives the delete."""


class Listing(msgspec.Struct, array_like=True, frozen=True):
    """What a marker key carries: everything ``headers``/``latest``/run derivation need."""

    incarnation: str
    checkpoint_id: str
    created_at: float
    expires_at: float | None
    appended_at: float
    header: bytes | None = None  # None in an "l" marker: the header is in the marker's body
    token: bytes = b""
    """The slot's write token; a tombstone's marker carries the tombstone's ``Slot.after``
    instead (empty in those of earlier releases): its own token identifies no checkpoint."""
    refs: bool = False  # the slot names shared items: its removal calls for a sweep


class ItemBody(msgspec.Struct, array_like=True, frozen=True):
    value: bytes
    owner: int | None
    expires_at: float | None
    token: bytes = b""
    """Random per write: a writer whose reply was lost recognises its own item by it."""
    shared: bool = False
    """Written by ``append_with_items`` without an owner: removed by the sweep once no held
    checkpoint names it."""
    checkpoint_id: str = ""
    """The owner checkpoint's id, for items written for a checkpoint (``append_with_items``,
    ``put_owned_items``): a read of that checkpoint skips an item another life of it owns."""
    run_key: str = ""
    key: str | None = None
    """The run and the item key it was written for: an item copied from another key or run
    reads as damaged. ``""`` and ``None`` in items written before they were recorded."""
    incarnation: str = ""
    """A shared item's: the life of the run whose append wrote it (``""`` in items written
    before it was recorded). An append of another life that finds it in place writes it
    again as its own (see ``S3Store._put_item``)."""


class ItemMeta(msgspec.Struct, array_like=True, frozen=True):
    owner: int | None
    expires_at: float | None


class Removed(msgspec.Struct, array_like=True, frozen=True):
    """A shared item a sweep removed: its hex key, the ETag of the object removed, when."""

    hex_key: str
    etag: str
    at: float


class SweepLease(msgspec.Struct, array_like=True, frozen=True):
    """A sweep of a run's shared items in progress (see ``S3Store._sweep``), and what the
    run's sweeps removed lately (an append naming one of those is refused)."""

    deleting: bool
    """False while it collects (an append naming a doomed item may still veto it, by
    rewriting the lease without ``doomed``); True once it deletes, which nothing can stop."""
    token: bytes
    since: float
    doomed: tuple[str, ...]
    """Hex keys of the items it will delete; empty when no sweep is in progress."""
    etags: tuple[str, ...] = ()
    """The ETag of each doomed item, in the same order (what it deletes, ``IfMatch``)."""
    removed: tuple[Removed, ...] = ()
    """Items removed by the run's sweeps in the last ``REMOVED_SECONDS`` (by the sweeping
    worker's clock)."""


_encoder = msgspec.msgpack.Encoder()
_run_decoder = msgspec.msgpack.Decoder(RunState)
_slot_decoder = msgspec.msgpack.Decoder(Slot)
_listing_decoder = msgspec.msgpack.Decoder(Listing)
_item_decoder = msgspec.msgpack.Decoder(ItemBody)
_meta_decoder = msgspec.msgpack.Decoder(ItemMeta)
_lease_decoder = msgspec.msgpack.Decoder(SweepLease)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _decode(decoder: msgspec.msgpack.Decoder[_R], blob: bytes, where: str, what: str) -> _R:
    if not blob.startswith(_FORMAT):
        raise CorruptCheckpointError(f"unknown {what} format", key=where)
    try:
        return decoder.decode(blob[1:])
    except msgspec.DecodeError as exc:
        raise CorruptCheckpointError(f"undecodable {what}: {exc}", key=where) from exc


def encode(record: msgspec.Struct) -> bytes:
    return _FORMAT + _encoder.encode(record)


def decode_run(blob: bytes, where: str) -> RunState:
    return _decode(_run_decoder, blob, where, "run object")


def decode_run_of(blob: bytes, where: str, *, run_key: str) -> RunState:
    """The run object read from ``run_key``'s key; one of a run whose id has another key (a
    run object copied over this one) is corrupt."""
    state = decode_run(blob, where)
    problem = _ids.foreign_run(run_key, state.run_id)
    if problem is not None:
        raise CorruptCheckpointError(f"the run object of run key {run_key} {problem}",
                                     key=where)
    return state


def decode_slot(blob: bytes, where: str, *, run_key: str, sequence: int) -> Slot:
    """The slot read from ``run_key``'s key for ``sequence``; one that says it belongs to
    another run or sequence (a record copied over this one) is corrupt."""
    slot = _decode(_slot_decoder, blob, where, "checkpoint")
    if slot.sequence != sequence or slot.run_key not in ("", run_key):
        raise CorruptCheckpointError(
            f"checkpoint record of sequence {slot.sequence} of run key {slot.run_key!r} "
            f"found where sequence {sequence} of run key {run_key!r} belongs",
            key=where,
        )
    return slot


_TAIL_FIELDS = len(Slot.__struct_fields__) - Slot.__struct_fields__.index("tombstone")
_tail_decoder = msgspec.msgpack.Decoder(list[Any])


def after_in_tail(tail: bytes, token: bytes, run_key: str) -> bytes | None:
    """``Slot.after`` of a checkpoint's slot (not a tombstone) read from the last bytes of
    its object, ``token`` its write token: the fields after the payload, from ``tombstone``
    (false) and ``token`` on, are found by those two; None when ``tail`` does not hold them
    all (or not as a slot of ``run_key`` writes them)."""
    if not token:
        return None
    start = tail.rfind(_encoder.encode(False) + _encoder.encode(token))
    if start < 0:
        return None
    rest = tail[start:]
    for count in range(2, _TAIL_FIELDS + 1):  # earlier releases' slots have fewer fields
        try:
            fields = _tail_decoder.decode(bytes([0x90 | count]) + rest)
        except msgspec.DecodeError:
            continue
        names = Slot.__struct_fields__[-_TAIL_FIELDS:][:count]
        values = dict(zip(names, fields, strict=True))
        after = values.get("after", b"")
        if values.get("run_key", "") in ("", run_key) and isinstance(after, bytes):
            return after
        return None
    return None


def decode_item(blob: bytes, where: str, *, run_key: str, hex_key: str) -> ItemBody:
    """The item read from ``run_key``'s object for ``hex_key``; one that says it was written
    for another run or key (an object copied over this one) is corrupt."""
    item = _decode(_item_decoder, blob, where, "item")
    if item.run_key not in ("", run_key) or (
        item.key is not None and item.key.encode("utf-8").hex() != hex_key
    ):
        raise CorruptCheckpointError(
            f"item {item.key!r:.80} of run key {item.run_key!r} found where item "
            f"{item_key_of(hex_key)!r:.80} of run key {run_key!r} belongs",
            key=where,
        )
    return item


def decode_lease(blob: bytes, where: str) -> SweepLease:
    return _decode(_lease_decoder, blob, where, "sweep lease")


# -- keys -------------------------------------------------------------------------------------


def inverted(sequence: int) -> str:
    return f"{SEQUENCE_SPAN - 1 - sequence:019d}"


def valid_sequence(sequence: int) -> bool:
    return (isinstance(sequence, int) and not isinstance(sequence, bool)
            and 0 <= sequence < SEQUENCE_SPAN)


def run_prefix(run_key: str) -> str:
    return f"runs/{run_key}/"


def run_object(run_key: str) -> str:
    return f"runs/{run_key}/a"


def slots_prefix(run_key: str) -> str:
    return f"runs/{run_key}/c/"


def slot_key(run_key: str, sequence: int) -> str:
    return f"runs/{run_key}/c/{inverted(sequence)}"


def older_than(run_key: str, sequence: int) -> str:
    """``StartAfter`` for listing the slots older than ``sequence``: after every key of its
    slot ("~" sorts after the marker kinds and base64url) and before the next older slot."""
    return f"{slot_key(run_key, sequence)}/~"


def marker_key(run_key: str, sequence: int, kind: str, listing: Listing) -> str:
    return f"{slot_key(run_key, sequence)}/{kind}{_b64(_encoder.encode(listing))}"


def item_markers_prefix(run_key: str) -> str:
    """Where the markers of items owned by no checkpoint are (those of owned items are
    under their owner's slot key)."""
    return f"runs/{run_key}/o/"


def item_marker_key(run_key: str, hex_key: str, meta: ItemMeta) -> str:
    """The marker of an item with an owner or an expiry: under its owner's slot key (a read
    of the checkpoint lists its items there), else under ``o/``."""
    encoded = _b64(_encoder.encode(meta))
    if meta.owner is None:
        return f"runs/{run_key}/o/{hex_key}/{encoded}"
    return f"{slot_key(run_key, meta.owner)}/w{hex_key}/{encoded}"


def sweep_due(run_key: str) -> str:
    return f"runs/{run_key}/sweep/due"


def sweep_lease(run_key: str) -> str:
    return f"runs/{run_key}/sweep/lease"


def items_prefix(run_key: str) -> str:
    return f"items/{run_key}/"


def item_object(run_key: str, hex_key: str) -> str:
    return f"items/{run_key}/{hex_key}"


def hex_item_key(key: object) -> str:
    """The order-preserving key segment of an item key (hex of UTF-8 keeps code point order)."""
    return item_key_bytes(key, MAX_ITEM_KEY_BYTES, "every store").hex()


NESTING_HEX = "2f"
"""``nested_prefix`` (``"/"``) in a hex item key."""


def nested_items_prefix(run_key: str, hex_key: str) -> str:
    """Where the items nested under the item ``hex_key`` are: a listing of this prefix."""
    return f"items/{run_key}/{hex_key}{NESTING_HEX}"


def anchors_of(hex_key: str) -> list[str]:
    """The hex keys ``hex_key`` is nested under (each key before a ``"/"``), shortest first."""
    found: list[str] = []
    at = hex_key.find(NESTING_HEX)
    while at >= 0:
        if at % 2 == 0:
            found.append(hex_key[:at])
        at = hex_key.find(NESTING_HEX, at + 1)
    return found


def nested_under(hex_key: str, anchors: set[str] | frozenset[str]) -> bool:
    """Whether ``hex_key`` is nested under one of ``anchors``."""
    return bool(anchors) and any(anchor in anchors for anchor in anchors_of(hex_key))


def item_key_of(hex_key: str) -> str | None:
    """The item key of an item object's name; None for a name that is not one of ours."""
    try:
        return bytes.fromhex(hex_key).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None


def _inverted_created(created_at: float) -> str:
    micros = min(max(round(created_at * 1_000_000), 0), _CREATED_SPAN - 1)
    return f"{_CREATED_SPAN - 1 - micros:017d}"


def check_status(status: object) -> str:
    status = check_str("status", status)
    if not isinstance(status, str) or not _STATUS.fullmatch(status):
        raise ValidationError(
            f"run status {shown(status)} cannot be indexed by the S3 store: use 1-64 characters "
            "of letters, digits, '_', '.' or '-'"
        )
    return status


def index_prefix(status: str | None) -> str:
    return "index/all/" if status is None else f"index/status/{status}/"


def label_prefix(label: str) -> str:
    return f"index/label/{_b64(label.encode('utf-8'))}/"


def _index_tail(run_key: str, state: RunState) -> str:
    """Newest created first; of runs created at the same microsecond, the greater run key
    first (the order of every store: descending ``(created_at, run_key)``)."""
    return f"{_inverted_created(state.created_at)}/{run_key.translate(_INVERT)}/" \
        f"{state.incarnation}"


def index_keys(run_key: str, state: RunState) -> list[str]:
    """The run's entries in the all-runs index, the by-status index and each label's."""
    tail = _index_tail(run_key, state)
    labels = [f"{label_prefix(label)}{tail}" for label in dict.fromkeys(state.labels)]
    return [f"index/all/{tail}", status_entry(run_key, state), *labels]


def status_entry(run_key: str, state: RunState) -> str:
    return f"index/status/{state.status}/{_index_tail(run_key, state)}"


def parse_index_entry(key: str, prefix: str) -> tuple[str, str] | None:
    """``(run_key, incarnation)`` of an index key under ``prefix``."""
    parts = key[len(prefix) :].split("/")
    if len(parts) != 3:
        return None
    return parts[1].translate(_INVERT), parts[2]


def indexed_run_key(key: str) -> str | None:
    """The run key of any index entry (``index/all/...``, ``index/status/<s>/...``,
    ``index/label/<l>/...``)."""
    parts = key.split("/")
    if len(parts) == 5 and parts[1] == "all":
        return parts[3].translate(_INVERT)
    if len(parts) == 6 and parts[1] in ("status", "label"):
        return parts[4].translate(_INVERT)
    return None


# -- parsing listings --------------------------------------------------------------------------


def parse_sequence(inverted_text: str) -> int | None:
    if len(inverted_text) != 19 or not inverted_text.isdigit():
        return None
    return SEQUENCE_SPAN - 1 - int(inverted_text)


def parse_listing(encoded: str) -> Listing | None:
    try:
        return _listing_decoder.decode(_unb64(encoded))
    except (msgspec.DecodeError, binascii.Error, ValueError):
        return None


def parse_item_meta(encoded: str) -> ItemMeta | None:
    try:
        return _meta_decoder.decode(_unb64(encoded))
    except (msgspec.DecodeError, binascii.Error, ValueError):
        return None
