"""How the LangGraph saver lays out LangGraph's checkpoints in a store (no I/O here).

One LangGraph thread namespace ``(thread_id, checkpoint_ns)`` is one fastcheckpoint run: the
root namespace's run id is the thread id itself (so ``fastcheckpoint show THREAD`` works), a
child namespace's is ``thread_id + "\\x1f" + checkpoint_ns``. Every run carries the labels
``langgraph`` and one naming its thread, which find all namespaces of a thread.

A LangGraph checkpoint is one stored checkpoint at the run's next sequence: its header is the
manager's (run id, step name, parent, TTL) with :class:`LangGraphHeader` as the adapter's
extra (LangGraph's ids, its metadata and which channel values the checkpoint stores, so
listings filter and delta channel histories find their seeds without reading payloads); its
payload holds the checkpoint without channel values, serialized by LangGraph's serde. The
run's items:

* ``b/<digest of channel and version>``: one channel value, written once per version and
  shared by every checkpoint whose ``channel_versions`` name it (the checkpoint's ``refs``);
* ``w/<digit count, 2 digits><sequence>/<digest of task id>/<idx>``: a pending write, owned
  by checkpoint ``sequence`` (the sequence is part of the key: a task id such as LangGraph's
  NULL task repeats across checkpoints of one run; with its digit count first, keys sort by
  sequence, so a delta channel's history scans the writes of a range of checkpoints);
* ``i/<LangGraph checkpoint id>``: where that checkpoint lives (:class:`Located`), owned by it;
* ``l/<digest of the channel>/<token>`` and items nested under it: a long list value stored
  as a log (``fastcheckpoint.integrations._langgraph_logs``), named by the checkpoints'
  ``refs`` instead of a ``b/`` value; the header's :class:`ChannelLog` says where each
  checkpoint's value ends.

Every item value is a framed, checksummed record of the manager's codec, except a log's parts
(checked by the CRC-32 its checkpoints record over all of them). Item keys stay under the
stores' 128-byte limit whatever the channel names, task ids and versions are.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import msgspec

from fastcheckpoint._codec import Codec, json_copy
from fastcheckpoint._validate import shown
from fastcheckpoint.errors import CorruptCheckpointError, SerializationError, ValidationError

SEPARATOR = "\x1f"
"""Between thread id and namespace in a child namespace's run id; refused in thread ids."""
LANGGRAPH_LABEL = "langgraph"
"""Carried by every run the saver creates: ``list(None)`` pages through them."""
REGISTRY_RUN_ID = SEPARATOR + "langgraph run index"
"""The run id (never a thread's: it starts with the separator) whose items map LangGraph run
ids to the fastcheckpoint runs holding their checkpoints, for ``delete_for_runs``."""
INTERRUPT = "__interrupt__"
"""LangGraph's channel for interrupt writes (``langgraph.checkpoint.serde.types.INTERRUPT``)."""
RESUME = "__resume__"
"""LangGraph's channel for the answers to interrupts (``Command(resume=...)``)."""

WRITES = "w/"
"""The prefix of every pending write's key."""

_THREAD_LABEL = "langgraph.thread="
_THREAD_LABEL_HASHED = "langgraph.thread#"
_LONGEST_PLAIN_LABEL = 200
_LONGEST_PLAIN_ID = 100
_DIGEST_BYTES = 15  # 120 bits

Typed = tuple[str, bytes]
"""A value as LangGraph's serde writes it: ``(type tag, bytes)``."""


class ChannelLog(msgspec.Struct, array_like=True, frozen=True):
    """Where a checkpoint's value of one channel lives when it is a log (in its header)."""

    version: str | int | float
    """The channel version this value is."""
    anchor: str
    last: str
    """The key of the log's last part for this value (the anchor's when it has no piece)."""
    count: int
    crc: int
    """CRC-32 of the entries' bytes, all parts in order."""


class LangGraphHeader(msgspec.Struct, array_like=True, frozen=True):
    """The adapter's part of a checkpoint header (``Header.extra``)."""

    checkpoint_id: str
    parent_checkpoint_id: str | None
    thread_id: str
    checkpoint_ns: str
    metadata: Typed
    """The checkpoint metadata as LangGraph's serde wrote it."""
    values: tuple[str, ...] | None = None
    """The channels whose value the checkpoint stores (``None`` in a header written before
    this was recorded): where the history of a delta channel begins, read from headers."""
    logs: dict[str, ChannelLog] | None = None
    """The channels whose value is stored as a log (``fastcheckpoint.integrations.
    _langgraph_logs``), and where."""
    delta: dict[str, int] | None = None
    """The delta channels this checkpoint rebuilds from its ancestors' writes, each with the
    lowest sequence that rebuild reads (0: unknown, so all); empty when it stores them all.
    ``None`` in a thread without delta channels, or a header written before this was
    recorded. ``keep_latest`` keeps what the newest checkpoints name here."""


class Located(msgspec.Struct, array_like=True, frozen=True):
    """Where a LangGraph checkpoint lives in its run: the ``i/`` item's value."""

    incarnation: str
    sequence: int
    expires_at: float | None


class StoredWrite(msgspec.Struct, array_like=True, frozen=True):
    """One pending write: a ``w/`` item's value."""

    task_id: str
    task_path: str
    channel: str
    idx: int
    value: Typed


def digest(text: str) -> str:
    """A fixed-length, key-safe name for any string (30 hexadecimal digits)."""
    raw = text.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(raw, digest_size=_DIGEST_BYTES).hexdigest()


def run_id_of(thread_id: str, checkpoint_ns: str) -> str:
    return thread_id if not checkpoint_ns else f"{thread_id}{SEPARATOR}{checkpoint_ns}"


def thread_label(thread_id: str) -> str:
    """The label every run of the thread carries (hashed when the thread id is long)."""
    if len(thread_id.encode("utf-8")) <= _LONGEST_PLAIN_LABEL:
        return _THREAD_LABEL + thread_id
    return _THREAD_LABEL_HASHED + digest(thread_id)


def blob_key(channel: str, version: object) -> str:
    # The type is part of the name: the int version 1 and the string "1" are different.
    return "b/" + digest(f"{channel}\x00{type(version).__name__}:{version}")


def write_key(sequence: int, task_id: str, idx: int) -> str:
    return f"{task_writes_prefix(sequence, task_id)}{idx}"


def task_writes_prefix(sequence: int, task_id: str) -> str:
    """The key of a write of task ``task_id`` to checkpoint ``sequence`` is this prefix and
    the write's idx (:func:`write_key`)."""
    return f"{writes_prefix(sequence)}{digest(task_id)}/"


def writes_prefix(sequence: int) -> str:
    """The prefix of the keys of the writes of checkpoint ``sequence``. Keys sort by
    sequence (its digits after their count), so one scan reads the writes of a range."""
    digits = str(sequence)
    return f"{WRITES}{len(digits):02d}{digits}/"


def write_sequence(key: str) -> int | None:
    """The sequence in a write's key (:func:`writes_prefix`); ``None`` for another key."""
    if not key.startswith(WRITES):
        return None
    count = key[len(WRITES):len(WRITES) + 2]
    if not (count.isascii() and count.isdigit()):
        return None
    digits = key[len(WRITES) + 2:len(WRITES) + 2 + int(count)]
    return int(digits) if digits.isascii() and digits.isdigit() else None


def index_key(checkpoint_id: str) -> str:
    if len(checkpoint_id.encode("utf-8")) <= _LONGEST_PLAIN_ID:
        return "i/" + checkpoint_id
    return "i#" + digest(checkpoint_id)


def registry_prefix(langgraph_run_id: str) -> str:
    return f"r/{digest(langgraph_run_id)}/"


def registry_key(langgraph_run_id: str, run_key: str) -> str:
    return registry_prefix(langgraph_run_id) + run_key


def encode_header(header: LangGraphHeader) -> bytes:
    if header.delta is None:  # the form of earlier releases, byte for byte
        return _encoder.encode(msgspec.structs.astuple(header)[:-1])
    return _encoder.encode(header)


def decode_header(extra: bytes, where: str) -> LangGraphHeader:
    try:
        header: LangGraphHeader = _decoders[LangGraphHeader].decode(extra)
    except msgspec.DecodeError as exc:
        raise CorruptCheckpointError(
            f"not a LangGraph checkpoint header: {exc}", key=where) from exc
    return header


class RegistryEntry(msgspec.Struct, array_like=True, frozen=True):
    """A ``delete_for_runs`` index entry: a run holding checkpoints of a LangGraph run."""

    run_id: str


_T = TypeVar("_T")
_encoder = msgspec.msgpack.Encoder()
_decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {
    kind: msgspec.msgpack.Decoder(kind)
    for kind in (LangGraphHeader, Located, StoredWrite, RegistryEntry)
}
_decoders[tuple] = msgspec.msgpack.Decoder(Typed)


class ItemCodec:
    """Item values as framed, checksummed records of the manager's codec."""

    def __init__(self, codec: Codec) -> None:
        self._codec = codec

    def encode(self, value: object) -> bytes:
        """``value``: one of this module's structs, or a :data:`Typed` value."""
        return self._codec.encode_flat_bytes("v", _encoder.encode(value))

    def decode(self, blob: bytes, kind: type[_T], where: str) -> _T:
        body = self._codec.decode_payload(blob, where).state.get("v")
        if not isinstance(body, bytes):
            raise CorruptCheckpointError("not a LangGraph saver item", key=where)
        try:
            value: _T = _decoders[kind].decode(body)
        except msgspec.DecodeError as exc:
            raise CorruptCheckpointError(
                f"undecodable LangGraph saver item: {exc}", key=where) from exc
        return value

    def typed(self, blob: bytes, where: str) -> Typed:
        value: Typed = self.decode(blob, tuple, where)
        return value


def approval_request(checkpoint_id: str, writes: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """The approval request recorded when a root-namespace task writes an interrupt:
    ``{"interrupts": [{"value": ..., "id": ...}], "checkpoint_id": ...}``, JSON values only."""
    interrupts: list[dict[str, Any]] = []
    for channel, value in writes:
        if channel == INTERRUPT:
            interrupts.extend(_interrupts(value))
    return {"interrupts": interrupts, "checkpoint_id": checkpoint_id}


def merged_request(pending: Mapping[str, Any] | None, asked: dict[str, Any]) -> dict[str, Any]:
    """The request of a run paused again at the same checkpoint (parallel interrupts): the
    interrupts already pending and the new ones, once each."""
    if not pending or pending.get("checkpoint_id") != asked["checkpoint_id"]:
        return asked
    recorded = pending.get("interrupts")
    known = list(recorded) if isinstance(recorded, list) else []  # as recorded by hand
    fresh = [entry for entry in asked["interrupts"] if entry not in known]
    return {"interrupts": known + fresh, "checkpoint_id": asked["checkpoint_id"]}


def asks_about(approval: Mapping[str, Any] | None, asked: dict[str, Any]) -> bool:
    """Whether the run's approval record (pending or decided) is about the checkpoint of
    ``asked`` (:func:`approval_request`). The interrupts themselves are not compared: which
    of them a request answered, and how a value is shown (a set's order, a ``repr``, in
    another process), is not the saver's to tell."""
    request = (approval or {}).get("request")
    return isinstance(request, Mapping) and (
        request.get("checkpoint_id") == asked["checkpoint_id"])


def by_hand(approval: Mapping[str, Any] | None) -> bool:
    """Whether the run's approval record holds a request that names no checkpoint: one made
    by hand (``manager.pause``), not by the saver."""
    request = (approval or {}).get("request")
    return isinstance(request, Mapping) and "checkpoint_id" not in request


def _interrupts(value: object) -> list[dict[str, Any]]:
    entries = value if isinstance(value, (list, tuple)) else [value]
    found: list[dict[str, Any]] = []
    for entry in entries:
        # LangGraph's Interrupt (langgraph.types, a package this module does not need).
        if type(entry).__name__ == "Interrupt" and hasattr(entry, "value"):
            found.append({"value": json_value(entry.value), "id": str(getattr(entry, "id", ""))})
        else:
            found.append({"value": json_value(entry)})
    return found


def json_value(value: object) -> Any:
    """``value`` as JSON values for people to read (a request, an export): as it is when it
    is JSON already, else its plain form (dataclasses, pydantic models, dates as text), else
    its ``repr``."""
    try:
        return json_copy(value, "interrupt")
    except SerializationError:
        pass
    try:
        plain = msgspec.to_builtins(value, enc_hook=_plain, str_keys=True)
        return json_copy(plain, "interrupt")
    except (SerializationError, TypeError, ValueError, OverflowError, RecursionError):
        return repr(value)[:2000]


def _plain(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    raise TypeError(f"no plain form for {type(value).__name__}")


def checked_thread_id(value: object) -> str:
    """A thread id as the saver keys it: a non-empty ``str`` (an ``int`` or UUID becomes its
    text) without the namespace separator."""
    if isinstance(value, bool) or value is None:
        raise ValidationError(f"thread_id must be a str, got {shown(value)}")
    text = str.__str__(value) if isinstance(value, str) else _as_text(value)
    if not text:
        raise ValidationError("thread_id must not be empty")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValidationError("thread_id must be valid unicode (it has a lone surrogate)") \
                from exc
    if SEPARATOR in text:
        raise ValidationError(
            "thread_id must not contain the character \\x1f (the saver uses it between a "
            "thread id and a subgraph namespace)")
    return text


def _as_text(value: object) -> str:
    if isinstance(value, int) or type(value).__name__ == "UUID":
        return str(value)
    raise ValidationError(f"thread_id must be a str, got {type(value).__name__}")
