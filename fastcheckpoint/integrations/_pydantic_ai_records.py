"""Where the Pydantic AI conversation store keeps things, and how it encodes them.

Layout (every address is a run key, a hash, so no id reaches a path or key as it is):

* A conversation is the run ``pydantic-ai:<conversation_id>``. It holds one checkpoint, its
  current :class:`ConversationRecord` (older ones are pruned by the next save), as parsed
  JSON (``record``), or as JSON text (``record_json``) when it holds an integer beyond 64
  bits. The record's revision is stored in it; the checkpoint's place, ``(incarnation,
  sequence)``, is the compare-and-set token the store checks. Labels: every conversation,
  its scope, its family.
* An entry lives in an *entries run* chosen from its id: the millisecond prefix of a UUIDv7
  (the ids Pydantic AI mints), so the entries one save adds share a run and go in one write;
  any other id is hashed whole. Its item key is the hash of the id. ``read_entry`` is one read.
* A *family* is a conversation and every fork made from it, or from its forks: the
  conversations that may share entries. Its registry run lists the entries the family wrote
  (``o:<entry key>`` -> the entries run holding it) and the markers of a release under way.
  Entries go when the family's last conversation is deleted (or expired, by
  ``cleanup_expired``), never earlier: a fork may still reach them.
* The families registry lists every family, for ``cleanup_expired``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Generic, TypeVar

import msgspec
import pydantic
import pydantic_core
from pydantic_ai.conversation_store import ConversationEntry, ConversationRecord
from pydantic_ai.messages import ModelMessage, ModelMessagesTypeAdapter

from fastcheckpoint import _ids
from fastcheckpoint._codec import Codec
from fastcheckpoint._validate import text_arg
from fastcheckpoint.errors import CorruptCheckpointError, SerializationError, ValidationError

FRAMEWORK = "pydantic-ai"
CONVERSATION_LABEL = "pydantic-ai conversation"
RUN_PREFIX = "pydantic-ai:"
OWNED_PREFIX = "o:"
CLOSING_PREFIX = "closing:"
FAMILIES_KEY = _ids.run_key("pydantic-ai families")
FORMAT = 1

_UUID7_PREFIX = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7")
_RECORDS: pydantic.TypeAdapter[ConversationRecord] = pydantic.TypeAdapter(ConversationRecord)

_K = TypeVar("_K")
_V = TypeVar("_V")


class Known(msgspec.Struct, frozen=True):
    """Where a conversation's record with ``revision`` was seen: what a write or delete
    expecting that revision proposes, without reading it again; and its title and metadata
    there, which a save of the conversation keeps."""

    revision: str
    incarnation: str
    sequence: int
    family: str
    details: dict[str, Any] = msgspec.field(default_factory=dict)
    """The record's :data:`DETAILS` fields as stored."""


DETAILS = frozenset(field.name for field in dataclasses.fields(ConversationRecord)) & {
    "title", "metadata"}
"""The fields of a record that ``update`` changes and a save keeps (none in Pydantic AI
releases from before titles)."""


def details_of(record: ConversationRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in DETAILS}


class Lru(Generic[_K, _V]):
    """A bounded mapping that forgets the least recently used key first."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._data: OrderedDict[_K, _V] = OrderedDict()

    def get(self, key: _K) -> _V | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: _K, value: _V) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        if len(self._data) > self._size:
            self._data.popitem(last=False)

    def pop(self, key: _K) -> None:
        self._data.pop(key, None)


# -- addresses ---------------------------------------------------------------------------------


def run_id_of(conversation_id: str) -> str:
    return RUN_PREFIX + text_arg("conversation_id", conversation_id)


def conversation_id_of(run_id: str) -> str | None:
    return run_id[len(RUN_PREFIX):] if run_id.startswith(RUN_PREFIX) else None


def scope_label(scope: str) -> str:
    return "pydantic-ai scope " + _ids.run_key(text_arg("scope", scope))


def family_label(family: str) -> str:
    return "pydantic-ai family " + family


def family_key(family: str) -> str:
    return _ids.run_key("pydantic-ai family " + family)


def entry_key(entry_id: str) -> str:
    """The item key of an entry (a hash: ids of any length fit)."""
    return _ids.key_of(entry_id)


def entries_run_key(entry_id: str) -> str:
    entry_key(entry_id)  # validates the id
    shard = entry_id[:13] if _UUID7_PREFIX.match(entry_id) else entry_id
    return _ids.run_key("pydantic-ai entries " + shard)


def labels_of(scope: str | None, family: str) -> tuple[str, ...]:
    labels = [CONVERSATION_LABEL, family_label(family)]
    if scope is not None:
        labels.append(scope_label(scope))
    return tuple(labels)


# -- encoding ----------------------------------------------------------------------------------


def check_record(record: ConversationRecord) -> None:
    """Raise, before anything is written, what writing ``record`` would: :class:`ValidationError`
    for a conversation id or scope that is not a str or a record that would not read back (a
    title that is not a str, say), :class:`SerializationError` for a value JSON cannot hold."""
    run_id_of(record.conversation_id)
    if record.scope is not None:
        scope_label(record.scope)
    _record_json(record)


def encode_record(codec: Codec, record: ConversationRecord, family: str) -> bytes:
    """The checkpoint body: the record as Pydantic's JSON, parsed, so ``fastcheckpoint show``
    prints it as it is; or, for JSON the body cannot hold parsed (an integer beyond 64 bits),
    as its JSON text."""
    dumped = _record_json(record)
    try:
        return codec.encode_payload(
            {"format": FORMAT, "family": family, "record": json.loads(dumped)}, [], [], {})
    except SerializationError:
        return codec.encode_payload(
            {"format": FORMAT, "family": family, "record_json": dumped}, [], [], {})


def _record_json(record: ConversationRecord) -> bytes:
    """The record's JSON, checked to read back as a record: Pydantic's serializer writes a
    value of the wrong type as it is (with a warning only), and :func:`decode_record` would
    then refuse it on every read."""
    where = f"conversation {record.conversation_id!r:.80}"
    try:
        dumped = _RECORDS.dump_json(record, warnings="none")
    except (pydantic_core.PydanticSerializationError, ValueError) as exc:
        raise SerializationError(f"{where}: its record cannot be stored as JSON: {exc}") from exc
    try:
        _RECORDS.validate_json(dumped)
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        if not error["loc"]:  # the JSON itself: nested deeper than the parser goes
            raise SerializationError(
                f"{where}: its record cannot be stored as JSON: {error['msg']}") from exc
        field = ".".join(str(part) for part in error["loc"])
        raise ValidationError(
            f"{where}: its record's {field} is not acceptable: {error['msg']} "
            f"(got {error['input']!r:.80})") from exc
    return dumped


def decode_record(codec: Codec, blob: bytes, where: str) -> tuple[ConversationRecord, str]:
    state = codec.decode_payload(blob, where).state
    family, fields = state.get("family"), state.get("record", state.get("record_json"))
    if state.get("format") != FORMAT or not isinstance(family, str) or not isinstance(
            fields, dict if "record" in state else bytes):
        raise CorruptCheckpointError("not a Pydantic AI conversation record", key=where)
    try:
        text = fields if isinstance(fields, bytes) else json.dumps(fields)
        return _RECORDS.validate_json(text), family
    except (pydantic.ValidationError, TypeError, ValueError) as exc:
        raise CorruptCheckpointError(f"undecodable conversation record: {exc}", key=where) from exc


def message_json(entry: ConversationEntry) -> bytes:
    """The entry's message as Pydantic AI writes it (JSON); :class:`SerializationError` when
    it cannot (a value JSON cannot hold, nesting deeper than the encoder goes)."""
    try:
        return ModelMessagesTypeAdapter.dump_json([entry.message])
    except (pydantic_core.PydanticSerializationError, RecursionError, ValueError,
            TypeError) as exc:
        raise SerializationError(
            f"conversation entry {entry.id!r:.80} cannot be stored: its message is not JSON "
            f"Pydantic AI can write ({type(exc).__name__}: {str(exc)[:200]})",
            path="message") from exc


def encode_entry(codec: Codec, entry: ConversationEntry, family: str, message: bytes) -> bytes:
    """The stored entry; ``message``: :func:`message_json` of it."""
    state = {"format": FORMAT, "family": family, "id": entry.id, "parent_id": entry.parent_id,
             "kind": entry.kind, "message": message}
    return codec.encode_payload(state, [], [], {})


def decode_entry(codec: Codec, blob: bytes, where: str) -> tuple[ConversationEntry, str]:
    state = codec.decode_payload(blob, where).state
    try:
        family, message = _fields(state)
        entry = ConversationEntry(id=state["id"], parent_id=state["parent_id"], message=message)
    except (KeyError, TypeError, pydantic.ValidationError) as exc:
        raise CorruptCheckpointError(f"not a Pydantic AI conversation entry: {exc}",
                                     key=where) from exc
    return entry, family


def _fields(state: Mapping[str, Any]) -> tuple[str, ModelMessage]:
    family, raw = state["family"], state["message"]
    if state.get("format") != FORMAT or state.get("kind") != "message" or not isinstance(
        family, str) or not isinstance(raw, bytes) or not isinstance(state["id"], str):
        raise TypeError("unexpected fields")
    messages = ModelMessagesTypeAdapter.validate_json(raw)
    if len(messages) != 1:
        raise TypeError("an entry holds one message")
    return family, messages[0]
