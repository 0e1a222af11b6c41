"""Serializing a growing list channel once per entry: the LangGraph saver's list memo.

LangGraph hands a save the whole value of every channel that changed. A ``messages`` channel
under ``add_messages`` is the whole conversation so far, so its serde (``JsonPlusSerializer``)
would serialize every message again at every step, and a step's cost would grow with the
thread. A msgpack array is a header followed by each element's encoding, and an element's
encoding depends on that element alone; so for each run and channel the saver keeps the bytes
the serde wrote for each entry of the list it serialized last, with a *fingerprint* of each
entry, and serializes only the entries from the first one whose fingerprint differs.

Entries are kept only when their serialization is slow: pydantic models, which the serde
dumps through Python code (``model_dump``, then its own hook), about 3 µs for a short message.
Plain data (strings, numbers, dicts, lists) it writes in C faster than any check could tell
it unchanged, so a list of those is serialized whole, as is a list from its first entry that
is not such a model.

A model's *fingerprint* is its field values and extras written by ormsgpack (the serde's own
encoder) with no hook for other objects and every ``OPT_PASSTHROUGH_*`` option: it writes
exact ``str``, ``int`` (64-bit), ``float``, ``bool``, ``None``, bytes, ``ormsgpack.Ext``,
lists and dicts, and refuses everything else (subclasses, tuples, dates, UUIDs, enums,
dataclasses, numpy arrays, other models, strings with lone surrogates, cycles), so two
entries of one class with equal fingerprints hold the same exact data and the serde writes
the same bytes for them. A model is kept only when its dump is a function of that data
alone: ``model_dump`` not overridden, no computed fields, nothing about serialization
(serializers, ``exclude_if``, serialization aliases) and no discriminator function anywhere
in its core schema; a class is judged once, the first time the memo meets it (a class whose
serialization is changed afterwards, by ``model_rebuild`` or by assigning methods, is not
judged again). An entry changed in place (a message's content edited, a key added to a dict
it holds) has another fingerprint and is serialized again, with every entry after it; so is
an entry without one, at every save. What the serde serializes of a new entry is a copy made
from its fingerprint (and the saver hands over a copy of the list): a node running in a
thread of its own that edits an entry or appends to the list while the save serializes it
changes neither what is stored nor what is kept.

The leading entries are checked together, as one msgpack array compared with the kept
fingerprints (about 0.5 µs a message), and one by one only where that finds a difference.
Only ``JsonPlusSerializer`` itself is memoized (its msgpack encoding is what this relies on);
any other serde serializes the whole value. A step still costs O(entries), but about a
sixth of it.
"""

from __future__ import annotations

import functools
import operator
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import ormsgpack
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from fastcheckpoint._codec import array_header
from fastcheckpoint._history import KEPT_BYTES, KEPT_RUNS
from fastcheckpoint.integrations._langgraph_records import Typed

__all__ = ["ListMemo", "fingerprint"]

_MSGPACK = "msgpack"
_ELEMENTS = msgspec.msgpack.Decoder(list[msgspec.Raw])
_PASSTHROUGH = ("OPT_PASSTHROUGH_BIG_INT", "OPT_PASSTHROUGH_DATACLASS", "OPT_PASSTHROUGH_DATETIME",
                "OPT_PASSTHROUGH_ENUM", "OPT_PASSTHROUGH_SUBCLASS", "OPT_PASSTHROUGH_TUPLE",
                "OPT_PASSTHROUGH_UUID")
_STRICT: int | None = (
    None if not all(hasattr(ormsgpack, name) for name in _PASSTHROUGH)
    else functools.reduce(operator.or_, (getattr(ormsgpack, name) for name in _PASSTHROUGH)))
"""ormsgpack's options that make it refuse (having no ``default`` to hand them to) everything
but exact built-in data; ``None`` (no memo) with an ormsgpack that lacks one of them."""
_PURE_MODELS: dict[type, bool] = {}
"""Per pydantic model class: whether its dump is a function of its fields alone."""
_MODELS_KNOWN = 1_000
"""Classes remembered at most (a program making classes on the fly starts over)."""
_SCHEMA_NODES = 100_000
"""Nodes of a model's core schema read at most to judge it (beyond: not memoized)."""
_NOT_SCHEMA = frozenset({"default", "metadata"})
"""Keys of a core schema whose values are the user's data, not schema."""


def fingerprint(entry: object) -> bytes | None:
    """What the serde reads of ``entry`` as exact-typed bytes; ``None`` when the memo does
    not keep it (the entry is then serialized at every save)."""
    if not _is_pure(type(entry)):
        return None
    state = _state(entry)
    return None if state is None else _strict(state)


def _state(entry: Any) -> list[Any] | None:
    try:
        return [entry.__dict__, entry.__pydantic_extra__]
    except AttributeError:  # a model whose __init__ skipped pydantic's
        return None


def _states(entries: list[Any]) -> list[Any] | None:
    """:func:`_state` of each entry (one comprehension: a call per entry costs as much as the
    entry's own state); ``None`` if any has none."""
    try:
        return [[entry.__dict__, entry.__pydantic_extra__] for entry in entries]
    except AttributeError:
        return None


def _strict(states: list[Any]) -> bytes | None:
    """``states`` as msgpack, or ``None`` if anything in them is not exact data."""
    if _STRICT is None:
        return None
    try:
        return ormsgpack.packb(states, option=_STRICT)
    except (TypeError, ValueError, RecursionError):  # a subclass, a model, a cycle, ...
        return None


def _rebuilt(entry: Any, mark: bytes) -> Any | None:
    """A copy of ``entry`` made from its fingerprint alone, for the serde to read: the bytes
    kept with a fingerprint are then the serde's for exactly that state, even if another
    thread changes ``entry`` meanwhile (and back again before a later save). ``None``: the
    class cannot be copied that way (its ``__new__`` wants arguments, ...)."""
    try:
        fields, extra = ormsgpack.unpackb(mark, ext_hook=ormsgpack.Ext)
        kind: Any = type(entry)
        copy = kind.__new__(kind)
        object.__setattr__(copy, "__dict__", fields)
        object.__setattr__(copy, "__pydantic_extra__", extra)
        object.__setattr__(copy, "__pydantic_fields_set__",
                           set(getattr(entry, "__pydantic_fields_set__", ())))
        object.__setattr__(copy, "__pydantic_private__",
                           getattr(entry, "__pydantic_private__", None))
    except Exception:
        return None
    return copy


def _is_pure(kind: type) -> bool:
    try:
        return _pure_model(kind)
    except TypeError:  # a class that cannot be hashed (its metaclass defines __eq__ only)
        return False


def _pure_model(kind: type) -> bool:
    known = _PURE_MODELS.get(kind)
    if known is not None:
        return known
    try:
        pure = _judged_pure(kind)
    except Exception:  # a class pydantic cannot describe yet (not fully defined, ...)
        pure = False
    if len(_PURE_MODELS) >= _MODELS_KNOWN:
        _PURE_MODELS.clear()
    _PURE_MODELS[kind] = pure
    return pure


def _judged_pure(kind: type) -> bool:
    pydantic = sys.modules.get("pydantic")
    base = None if pydantic is None else getattr(pydantic, "BaseModel", None)
    if base is None or not isinstance(kind, type) or not issubclass(kind, base):
        return False
    decorators = getattr(kind, "__pydantic_decorators__", None)
    schema = getattr(kind, "__pydantic_core_schema__", None)
    return (getattr(kind, "model_dump", None) is base.model_dump
            and decorators is not None and isinstance(schema, Mapping)
            and not decorators.field_serializers and not decorators.model_serializers
            and not decorators.computed_fields and _plain_schema(schema))


def _plain_schema(schema: Mapping[str, Any]) -> bool:
    """Whether a pydantic core schema says nowhere how to serialize something (nothing
    about serialization, no computed fields, no discriminator function), read within
    :data:`_SCHEMA_NODES`."""
    stack: list[object] = [schema]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if len(seen) > _SCHEMA_NODES:
            return False
        if isinstance(node, Mapping):
            if node.get("computed_fields") or callable(node.get("discriminator")) or any(
                    "serializ" in str(key) and value for key, value in node.items()):
                return False
            stack.extend(value for key, value in node.items() if key not in _NOT_SCHEMA)
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return True


def _elements(typed: Typed, count: int) -> list[bytes] | None:
    """Each element's bytes of the msgpack array of ``count`` elements ``typed`` holds."""
    if typed[0] != _MSGPACK:
        return None
    try:
        elements = _ELEMENTS.decode(typed[1])
    except msgspec.DecodeError:
        return None
    return [bytes(element) for element in elements] if len(elements) == count else None


@dataclass(frozen=True)
class _Serialized:
    """The leading entries of a list as last serialized, as far as each has a fingerprint."""

    kinds: tuple[type, ...]
    prints: bytes
    """The entries' fingerprints one after another (msgpack elements, no array header)."""
    ends: tuple[int, ...]
    """Where each entry's fingerprint ends in :attr:`prints`."""
    parts: tuple[bytes, ...]
    """The bytes the serde wrote for each entry."""
    size: int

    def fingerprint(self, index: int) -> bytes:
        return self.prints[self.ends[index - 1] if index else 0:self.ends[index]]

    def unchanged(self, value: list[Any]) -> int:
        """How many leading entries of ``value`` are as kept: one check of them all (a
        single msgpack array), entry by entry only if that finds a difference."""
        count = min(len(value), len(self.kinds))
        if not count:
            return 0
        leading = value[:count]
        if all(map(operator.is_, map(type, leading), self.kinds)):
            found = _strict(states) if (states := _states(leading)) is not None else None
            end = self.ends[count - 1]
            if found is not None and len(found) == len(array_header(count)) + end and \
                    found.endswith(self.prints if end == len(self.prints) else self.prints[:end]):
                return count
        for index, entry in enumerate(leading):
            if type(entry) is not self.kinds[index] or \
                    fingerprint(entry) != self.fingerprint(index):
                return index
        return count


_NOTHING = _Serialized((), b"", (), (), 0)
"""What is kept of a list never serialized before."""


class ListMemo:
    """The entries' bytes of each run's and channel's list as last serialized in this process
    (bounded, least recently used first out). Thread-safe: the blocking methods save on
    another event loop's thread than the async ones."""

    def __init__(self) -> None:
        self._kept: OrderedDict[tuple[str, str], _Serialized] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def dumps(self, serde: object, run_key: str, channel: str, value: object,
              dumps: Callable[[list[Any]], Typed]) -> Typed | None:
        """``value`` serialized as ``serde`` would, reusing the bytes of its unchanged leading
        entries; ``dumps(entries)`` serializes the others (the saver's checked call of the
        serde). ``None``: not a list this memo serializes (the caller serializes it whole).
        ``value`` is a list no one changes meanwhile (the saver passes a copy of LangGraph's:
        a header counting entries the bytes lack would make the value unloadable)."""
        if type(serde) is not JsonPlusSerializer or type(value) is not list or not value:
            return None
        slot = (run_key, channel)
        with self._lock:
            last = self._kept.get(slot)
        if last is None and not _is_pure(type(value[0])):
            return None  # plain data: the serde's C code is faster than any check
        base = _NOTHING if last is None else last
        reused = base.unchanged(value)
        kinds = list(base.kinds[:reused])
        ends = list(base.ends[:reused])
        marks = [base.prints[:ends[-1]]] if reused else []
        parts = list(base.parts[:reused])
        if reused < len(value):
            rest = value[reused:]
            # The serde reads copies made from the fingerprints, so the bytes kept with each
            # are the serde's for that state, whatever changes the entry meanwhile.
            end = ends[-1] if ends else 0
            for position, entry in enumerate(rest):
                mark = fingerprint(entry)
                copy = None if mark is None else _rebuilt(entry, mark)
                if mark is None or copy is None:
                    break
                rest[position] = copy
                kinds.append(type(entry))
                marks.append(mark)
                end += len(mark)
                ends.append(end)
            typed = dumps(rest)
            elements = _elements(typed, len(rest))
            if elements is None:  # not the serde's msgpack array: nothing to reuse or keep
                self._keep(slot, None)
                return typed if reused == 0 else None
            parts += elements
        kept, prints = len(kinds), b"".join(marks)
        self._keep(slot, _Serialized(tuple(kinds), prints, tuple(ends), tuple(parts[:kept]),
                                     len(prints) + sum(map(len, parts[:kept])))
                   if kept else None)
        return _MSGPACK, b"".join((array_header(len(value)), *parts))  # one copy

    def forget(self, run_key: str) -> None:
        """The run is gone: drop what is kept of its lists."""
        with self._lock:
            for slot in [slot for slot in self._kept if slot[0] == run_key]:
                self._bytes -= self._kept.pop(slot).size

    def _keep(self, slot: tuple[str, str], serialized: _Serialized | None) -> None:
        with self._lock:
            old = self._kept.pop(slot, None)
            if old is not None:
                self._bytes -= old.size
            if serialized is None:
                return
            self._kept[slot] = serialized
            self._bytes += serialized.size
            while self._kept and (self._bytes > KEPT_BYTES or len(self._kept) > KEPT_RUNS):
                _, dropped = self._kept.popitem(last=False)
                self._bytes -= dropped.size
