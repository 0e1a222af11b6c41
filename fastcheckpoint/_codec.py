"""Encoding of stored records: versioned, checksummed, msgpack, never pickle.

Every stored blob is a frame::

    b"FC" | format version (1 byte) | codec (b"m" = msgpack) | compression (0 none, 1 zlib)
    | CRC-32 of the body (4 bytes, big endian) | body

Fidelity. A restored payload equals the stored one, types included, or ``create`` refuses it
with a :class:`SerializationError` naming the path. Types are matched exactly: a subclass (an
``IntEnum``, a ``str`` Enum, an ``OrderedDict``, a ``namedtuple``) is not its base class.
msgspec encodes plain data (dict, list, str, int, float, bool, None, bytes, datetime in UTC)
natively and fast; everything else it would quietly turn into something else (a UUID into
text, a tuple into a list, an IntEnum into an int, a datetime at +02:00 into UTC), so the fast
path proves its own work. A screen walks every object reachable from the payload level by
level in C (``gc.get_referents``): when each is exactly a dict, list, str, int, float, bool,
None, bytes or a UTC datetime, and nothing is nested deeper than :data:`MAX_DEPTH`, msgspec's
bytes are stored as they are. Otherwise a slow path walks the value in Python, storing UUID,
tuple, set, frozenset, bytearray, naive or fixed-offset datetime and time, date, timedelta and
Decimal as msgpack extensions, handing any other type to the user's ``enc_hook`` (it comes back
through ``dec_hook(type_name, value)``), and raising :class:`SerializationError` naming the path
of a value nobody can encode or nested too deep.

Depth. Nothing is stored more than :data:`MAX_DEPTH` containers below ``state``,
``messages``, ``tool_calls`` or ``context``, so every record restores from an ordinary call
depth, in a worker thread too. A record nested deeper was not written by us: decoding it raises
:class:`CorruptCheckpointError`, never ``RecursionError``. What ``dec_hook`` builds from a stored
value is the user's own and may nest as deep as it likes.

Decoding builds only those types and what ``dec_hook`` returns, so a tampered store cannot make
a restore run code. A ``dec_hook`` that raises a :class:`~fastcheckpoint.errors.CheckpointError`
(``CorruptCheckpointError`` for a stored value it finds damaged) has it raised as it is; any
other exception of the hook is a :class:`SerializationError`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import decimal
import enum
import gc
import math
import operator
import sys
import threading
import uuid
import zlib
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Any

import msgspec

from fastcheckpoint.errors import CheckpointError, CorruptCheckpointError, SerializationError

__all__ = [
    "MAX_DEPTH",
    "Codec",
    "DecHook",
    "EncHook",
    "LogRef",
    "LoggedPayload",
    "from_json_text",
    "json_copy",
    "to_json_text",
]

EncHook = Callable[[Any], Any]
"""Turns an object of another type into supported values; raise to refuse."""
DecHook = Callable[[str, Any], Any]
"""Rebuilds an object from ``(type name, value)``; the type name is ``module.QualName``."""

FORMAT_VERSION = 1
LOGGED_FORMAT_VERSION = 2
"""Bodies with parts stored as logs (:class:`LoggedPayload`); everything else is version 1."""
_PAYLOAD_VERSIONS = (FORMAT_VERSION, LOGGED_FORMAT_VERSION)
_MAGIC = b"FC"
_CODEC_MSGPACK = ord("m")
_COMPRESS_NONE = 0
_COMPRESS_ZLIB = 1
_PREFIX_LEN = 9

MAX_DEPTH = 100
"""Most containers a stored value may sit below its part: ``state['a'][0]`` is 2 deep.

Decoding a level costs at most three units of Python's recursion limit (1,000 by default; on
CPython 3.10 and 3.11 the same counter as the caller's frames): nested tuples on 3.10, the
costliest. So every record restores with 690 frames already on the stack, and creates with 590,
in an event loop or a worker thread (512 KiB of stack is plenty)."""

# Extension codes: part of the stored format, never renumber.
_EXT_UUID = 1
_EXT_USER = 2
_EXT_TUPLE = 3
_EXT_SET = 4
_EXT_FROZENSET = 5
_EXT_NAIVE_DATETIME = 6
_EXT_DATE = 7
_EXT_TIME = 8
_EXT_TIMEDELTA = 9
_EXT_DECIMAL = 10
_EXT_DATETIME = 11
"""A datetime with a fixed offset other than UTC, or with ``fold=1``: [isoformat, fold, tzname]."""
_EXT_CLOCK_TIME = 12
"""A time with a fixed offset, or with ``fold=1``: [isoformat, fold, tzname]."""
_EXT_BYTEARRAY = 13

_LIST_PARTS = ("messages", "tool_calls")
_INT_RANGE = range(-(2**63), 2**64)
_UTC = _dt.timezone.utc
_LOSSLESS = frozenset({dict, list, str, int, float, bool, type(None), bytes})
"""Types msgpack stores and msgspec restores exactly: exact types, no subclasses."""
_LOSSLESS_OR_DATETIME = _LOSSLESS | {_dt.datetime}
_CONTAINERS = frozenset({dict, list})
_FLAT = frozenset({str, bytes})
"""The values of a flat state (:meth:`Codec.encode_flat`), alone or in a list."""
_WALKED = frozenset({dict, list, tuple, set, frozenset})
"""Decoded containers whose items the depth check visits; anything else is a leaf."""
_tzinfo_of = operator.attrgetter("tzinfo")
_fold_of = operator.attrgetter("fold")

_SCREEN = sys.implementation.name == "cpython" and (3, 10) <= sys.version_info[:2] < (3, 14)
"""The screen relies on ``gc.get_referents`` of a dict visiting each of its values and every
key that is not an exact ``str``, and of a list its items, as CPython 3.10 to 3.13 do, with one
exception handled by ``_INLINE_VALUES``. Elsewhere every payload takes the slow path."""
_INLINE_VALUES = sys.version_info >= (3, 13)
"""CPython 3.13 does not visit the values an object keeps inline in its ``__dict__``
(``vars(obj)``): the screen leaves such a dict to the slow path."""


class Header(msgspec.Struct, array_like=True, frozen=True):
    run_id: str
    step_name: str
    parent_id: str | None
    tags: list[str]
    ttl_seconds: float | None
    extra: bytes = b""
    """An adapter's own small metadata (a framework's checkpoint metadata, for filters that
    must not read payloads); empty for the manager's checkpoints, and in older records."""


class LogRef(msgspec.Struct, array_like=True, frozen=True):
    """Where a list stored as a log lives (:mod:`fastcheckpoint._logs`): the run's shared
    item ``anchor`` (the list's first entries) and the items nested under it (what later
    checkpoints added); the checkpoint's list is the log's first ``length`` entries, held by
    the part ``last`` (a key; the anchor's when it is alone) and the parts before it, whose
    encodings have the CRC-32 ``crc``."""

    anchor: str
    length: int
    crc: int
    last: str


class Payload(msgspec.Struct, array_like=True):
    state: dict[Any, Any]
    messages: list[Any]
    tool_calls: list[Any]
    context: dict[Any, Any]


class LoggedPayload(Payload):
    """A body with parts stored as logs: framed as format version 2, which releases that
    know only version 1 refuse (rather than restore the logged parts as empty lists)."""

    messages_log: LogRef | None = None
    """Set when ``messages`` is stored as a log (then the list above is empty)."""
    tool_calls_log: LogRef | None = None
    """Set when ``tool_calls`` is stored as a log (then the list above is empty)."""


class RunData(msgspec.Struct, array_like=True):
    error: str | None = None
    approval: dict[str, Any] | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    history: list[tuple[str, float, str | None, str]] = msgspec.field(default_factory=list)
    failed_after: int | None = None
    """The run's latest sequence as read by the status change that made it FAILED: what tells
    that FAILED episode from a later one (``None`` in details written without it, such as
    those ``repair`` rebuilds). Last, so that readers without it read these details."""


MAX_INFLATED_BYTES = 1 << 30
"""Largest body a compressed record may inflate to. The checksum catches damage, not malice:
without a bound, a few kilobytes planted in a store could inflate to gigabytes on restore."""


_FRAME_HEADS = {
    (version, compression): _MAGIC + bytes((version, _CODEC_MSGPACK, compression))
    for version in _PAYLOAD_VERSIONS for compression in (_COMPRESS_NONE, _COMPRESS_ZLIB)
}


def _frame(body: bytes, compression: int, version: int = FORMAT_VERSION) -> bytes:
    crc = zlib.crc32(body).to_bytes(4, "big")
    return b"".join((_FRAME_HEADS[version, compression], crc, body))


_FLAT_HEAD = b"\x94\x81"
"""A :class:`Payload` (an array of 4) whose ``state`` holds one key, as msgspec writes it."""
_FLAT_TAIL = b"\x90\x90\x80"
"""The rest of such a payload: empty ``messages`` and ``tool_calls``, empty ``context``."""


def _bin_header(size: int) -> bytes:
    """A msgpack bin header for ``size`` bytes (the smallest form, as msgspec writes)."""
    if size < 1 << 8:
        return bytes((0xC4, size))
    if size < 1 << 16:
        return b"\xc5" + size.to_bytes(2, "big")
    return b"\xc6" + size.to_bytes(4, "big")


def array_header(count: int) -> bytes:
    """A msgpack array header for ``count`` items."""
    if count < 16:
        return bytes((0x90 | count,))
    if count < 1 << 16:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


def split_array(data: bytes) -> tuple[int, bytes] | None:
    """The element count and the elements' bytes of the well-formed msgpack array ``data``
    (what an encoder wrote); ``None`` when it is not an array. The elements are a copy, not a
    view: comparing bytes is a ``memcmp``, comparing memoryviews goes byte by byte in Python's
    C code (50 us for 30 KB)."""
    if not data or not (data[0] & 0xF0 == 0x90 or data[0] in (0xDC, 0xDD)):
        return None
    start = _array_header_length(data[0])
    if len(data) < start:
        return None
    count = data[0] & 0x0F if start == 1 else int.from_bytes(data[1:start], "big")
    return count, data[start:]


def _array_header_length(first: int) -> int:
    """Bytes of a msgpack array header starting with the byte ``first``."""
    if first & 0xF0 == 0x90:
        return 1
    return {0xDC: 3, 0xDD: 5}[first]


def _unframe(blob: bytes, key: str, versions: tuple[int, ...] = (FORMAT_VERSION,)) -> bytes:
    if len(blob) < _PREFIX_LEN or blob[:2] != _MAGIC:
        raise CorruptCheckpointError("not a fastcheckpoint record", key=key)
    version, codec, compression = blob[2], blob[3], blob[4]
    if version not in versions or codec != _CODEC_MSGPACK:
        raise CorruptCheckpointError(
            f"unsupported record format version {version} codec {codec}", key=key
        )
    body = blob[_PREFIX_LEN:]
    if zlib.crc32(body) != int.from_bytes(blob[5:9], "big"):
        raise CorruptCheckpointError("checksum mismatch", key=key)
    if compression == _COMPRESS_NONE:
        return body
    if compression == _COMPRESS_ZLIB:
        return inflate(body, key, "body")
    raise CorruptCheckpointError(f"unknown compression {compression}", key=key)


def inflate(body: bytes | memoryview, key: str, what: str) -> bytes:
    """zlib-inflate a stored ``what`` (a body, a log part), at most
    :data:`MAX_INFLATED_BYTES` of it."""
    inflater = zlib.decompressobj()
    try:
        inflated = inflater.decompress(body, MAX_INFLATED_BYTES)
    except zlib.error as exc:
        raise CorruptCheckpointError(f"undecompressable {what}", key=key) from exc
    if inflater.unconsumed_tail:
        raise CorruptCheckpointError(
            f"compressed {what} inflates past {MAX_INFLATED_BYTES} bytes", key=key)
    if not inflater.eof:
        raise CorruptCheckpointError(f"truncated compressed {what}", key=key)
    return inflated


def _type_name(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


class _ExtKey:
    """A hashable stand-in for an extension used as a dict key (``Ext`` is unhashable)."""

    __slots__ = ("ext",)

    def __init__(self, ext: msgspec.msgpack.Ext) -> None:
        self.ext = ext

    def __hash__(self) -> int:
        return hash((self.ext.code, self.ext.data))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ExtKey) and (self.ext.code, self.ext.data) == (
            other.ext.code, other.ext.data)


def _ext_key_hook(obj: Any) -> Any:
    if isinstance(obj, _ExtKey):
        return obj.ext
    raise TypeError(f"unsupported type {_type_name(obj)}")


class _Malformed(Exception):
    """An extension whose bytes do not parse: the record is corrupt."""


# -- the create-time screen ---------------------------------------------------------------------


def _lossless_only(payload: Payload) -> bool:
    """Whether msgspec's own encoding of ``payload`` restores exactly, within :data:`MAX_DEPTH`.

    True when every object reachable from ``payload`` has one of the ``_LOSSLESS`` types or is
    a UTC datetime. Walks breadth first, one level per ``gc.get_referents`` call, all in C (see
    ``_SCREEN``); str, int, float, bool, None, bytes and datetime have no referents. Any other
    type ends the walk with ``False``. Called only on data msgspec has just encoded, so it has
    no cycles and every level is finite.
    """
    level: list[Any] = [payload.state, payload.messages, payload.tool_calls, payload.context]
    if list(map(type, level)) != [dict, list, list, dict]:
        return False
    for _ in range(MAX_DEPTH + 1):
        kinds = set(map(type, level))
        if not kinds <= _LOSSLESS and not (kinds <= _LOSSLESS_OR_DATETIME and _utc_only(level)):
            return False
        if kinds.isdisjoint(_CONTAINERS):
            return True
        if _INLINE_VALUES and dict in kinds and _hides_values(level):
            return False
        level = gc.get_referents(*level)
    return not level  # the values MAX_DEPTH + 1 containers down: there must be none


def _utc_only(level: list[Any]) -> bool:
    """Whether every datetime of ``level`` is in UTC with ``fold=0`` (msgpack's timestamp)."""
    moments = [item for item in level if type(item) is _dt.datetime]
    return set(map(_tzinfo_of, moments)) == {_UTC} and not any(map(_fold_of, moments))


def _hides_values(level: list[Any]) -> bool:
    """Whether a dict of ``level`` keeps values ``gc.get_referents`` does not visit."""
    dicts = [item for item in level if type(item) is dict]
    return any(map(operator.lt, map(len, map(gc.get_referents, dicts)), map(len, dicts)))


# -- the restore-time depth check ---------------------------------------------------------------


def _deeper_than(
    roots: list[Any], limit: int, *, plain: bool, leaves: AbstractSet[int] = frozenset()
) -> bool:
    """Whether a decoded value sits more than ``limit`` containers below one of ``roots``.

    ``plain``: every object is one msgspec builds without an extension hook (dict, list, str,
    int, float, bool, None, bytes, datetime), so each level goes to ``gc.get_referents`` as it
    is. Otherwise only dicts, lists, tuples, sets and frozensets are opened; UUIDs, dates and
    what ``dec_hook`` built (the ids in ``leaves``) are leaves: the user's objects may nest as
    they like, only what was stored counts.
    """
    level = roots
    for _ in range(limit + 1):
        if not plain:
            level = [item for item in level if type(item) in _WALKED and id(item) not in leaves]
        if not level:
            return False
        level = gc.get_referents(*level)
    return bool(level)


def _too_deep(path: str) -> SerializationError:
    return SerializationError(
        f"cannot encode {path}: nested more than {MAX_DEPTH} levels deep", path=path)


class _HookFailed(Exception):
    """The user's ``dec_hook`` raised: reported as a serialization problem, not corruption."""


_REFUSED = object()
"""``_exact``'s answer for a type it does not store by itself."""


class Codec:
    """Encodes and decodes headers, payloads and run details. Build once, reuse."""

    def __init__(
        self,
        *,
        enc_hook: EncHook | None = None,
        dec_hook: DecHook | None = None,
        compress_min_bytes: int | None = None,
        compress_level: int = 1,
    ) -> None:
        self._user_enc_hook = enc_hook
        self._user_dec_hook = dec_hook
        self._compress_min_bytes = compress_min_bytes
        self._compress_level = compress_level
        self._encoder = msgspec.msgpack.Encoder()
        self._ext_encoder = msgspec.msgpack.Encoder(enc_hook=_ext_key_hook)
        self._payload_decoder = msgspec.msgpack.Decoder(Payload, ext_hook=self._ext_hook)
        self._logged_decoder = msgspec.msgpack.Decoder(LoggedPayload, ext_hook=self._ext_hook)
        self._any_decoder = msgspec.msgpack.Decoder(ext_hook=self._ext_hook)
        self._header_decoder = msgspec.msgpack.Decoder(Header)
        self._run_decoder = msgspec.msgpack.Decoder(RunData)
        # Per thread: .extended, the decode met an extension; .built, ids of what dec_hook built.
        self._decoding = threading.local()

    # -- headers and run details ----------------------------------------------------------

    def encode_header(self, header: Header) -> bytes:
        return _frame(self._encoder.encode(header), _COMPRESS_NONE)

    def decode_header(self, blob: bytes, key: str) -> Header:
        body = _unframe(blob, key)
        try:
            return self._header_decoder.decode(body)
        except RecursionError as exc:
            raise CorruptCheckpointError("header nested too deep to decode", key=key) from exc
        except msgspec.DecodeError as exc:
            raise CorruptCheckpointError(f"undecodable header: {exc}", key=key) from exc

    def encode_run_data(self, data: RunData) -> bytes:
        try:
            return _frame(self._encoder.encode(data), _COMPRESS_NONE)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise SerializationError(f"cannot encode run details: {exc}") from exc

    def decode_run_data(self, blob: bytes, key: str) -> RunData:
        """Run details; an approval or metadata nested deeper than a pause request may be
        (``MAX_DEPTH`` below ``approval['request']``) is corrupt."""
        if not blob:
            return RunData()
        body = _unframe(blob, key)
        try:
            data = self._run_decoder.decode(body)
        except RecursionError as exc:
            raise CorruptCheckpointError("run record nested too deep to decode", key=key) from exc
        except msgspec.DecodeError as exc:
            raise CorruptCheckpointError(f"undecodable run record: {exc}", key=key) from exc
        if _deeper_than([data.approval, data.metadata], MAX_DEPTH + 1, plain=True):
            raise CorruptCheckpointError(
                f"run record nested more than {MAX_DEPTH + 1} levels deep", key=key)
        return data

    # -- payloads -------------------------------------------------------------------------

    def encode_payload(
        self,
        state: dict[Any, Any],
        messages: list[Any],
        tool_calls: list[Any],
        context: dict[Any, Any],
        *,
        messages_log: LogRef | None = None,
        tool_calls_log: LogRef | None = None,
    ) -> bytes:
        """Encode a checkpoint body; raises :class:`SerializationError` naming the bad path.

        The parts themselves are stored as a dict, a list, a list and a dict (restore returns
        those types whatever mapping or sequence was passed); their contents keep their types.
        A part stored as a log is passed empty, with its :class:`LogRef`.
        """
        parts = (
            state if type(state) is dict else dict(state),
            messages if type(messages) is list else list(messages),
            tool_calls if type(tool_calls) is list else list(tool_calls),
            context if type(context) is dict else dict(context),
        )
        if messages_log is None and tool_calls_log is None:
            return self._encode(Payload(*parts))
        return self._encode(LoggedPayload(*parts, messages_log, tool_calls_log))

    def encode_flat(self, state: dict[str, Any]) -> bytes:
        """``encode_payload(state, [], [], {})`` for an adapter's own record: a ``state`` of
        ``str`` keys whose values are ``str``, ``bytes`` or lists of them (a serializer's
        output, a struct encoded already). msgspec stores those exactly, so their types are
        checked here, one level deep, instead of by the screen; any other state, or a ``str``
        msgspec refuses (a lone surrogate), takes :meth:`encode_payload`'s way."""
        for key, value in state.items():
            kind = type(value)
            if type(key) is not str or not (
                kind in _FLAT or (kind is list and _FLAT.issuperset(map(type, value)))
            ):
                return self.encode_payload(state, [], [], {})
        try:
            body = self._encoder.encode(Payload(state, [], [], {}))
        except ValueError:
            return self.encode_payload(state, [], [], {})
        return self._framed(body, FORMAT_VERSION)

    def encode_flat_bytes(self, name: str, value: bytes) -> bytes:
        """``encode_flat({name: value})`` for a single ``bytes`` value: the same bytes,
        written out directly (an adapter's items, several per save, pay neither the type
        checks nor the record's own encoding). ``name`` is ASCII, shorter than 32
        characters; any other takes :meth:`encode_flat`'s way."""
        if type(value) is not bytes or len(name) >= 32 or not name.isascii():
            return self.encode_flat({name: value})
        body = b"".join((_FLAT_HEAD, bytes((0xA0 | len(name),)), name.encode("ascii"),
                         _bin_header(len(value)), value, _FLAT_TAIL))
        return self._framed(body, FORMAT_VERSION)

    def entries_bytes(self, part: str, entries: list[Any], first: int = 0) -> bytes:
        """The stored encodings of ``entries`` (entries ``first`` onwards of the list ``part``),
        one after the other: equal for two lists exactly when they would restore as equal
        lists, types included (a different value never encodes the same). Raises
        :class:`SerializationError` naming the entry's index in the whole list."""
        encoded = self._encoded_list(part, entries, first)
        return encoded[_array_header_length(encoded[0]):]

    def same_entries(self, part: str, entries: list[Any], encoded: bytes | bytearray) -> bool:
        """Whether ``entries`` encode to ``encoded`` (:meth:`entries_bytes`), without copying
        either."""
        mine = self._encoded_list(part, entries)
        header = _array_header_length(mine[0])
        return len(mine) - header == len(encoded) and mine.endswith(encoded)

    def pack_entries(self, raw: bytes) -> bytes | None:
        """A log part's entries zlib-compressed like payloads, or ``None`` when they are
        stored as they are (small, or no smaller compressed)."""
        if self._compress_min_bytes is None or len(raw) < self._compress_min_bytes:
            return None
        packed = zlib.compress(raw, self._compress_level)
        return packed if len(packed) < len(raw) else None

    @staticmethod
    def unpack_entries(packed: bytes, key: str) -> bytes:
        """A log part's entries as :meth:`pack_entries` stored them, inflated."""
        return inflate(packed, key, "log part")

    def decode_entries(self, array: bytes, where: str) -> list[Any]:
        """A log's entries (checked), decoded at once from ``array``: their encodings after a
        msgpack array header (:func:`array_header`)."""
        entries: list[Any] = self._decoded(
            lambda: [Payload({}, self._any_decoder.decode(array), [], {})], where)[0].messages
        return entries

    def _encoded_list(self, part: str, entries: list[Any], first: int = 0) -> bytes:
        body: list[Any] = [{}, [], [], {}]
        body[_LIST_PARTS.index(part) + 1] = entries
        payload = Payload(*body)
        try:
            encoded = None
            if _SCREEN and _lossless_only(payload):
                with contextlib.suppress(TypeError, ValueError, OverflowError):
                    encoded = self._encoder.encode(entries)
            if encoded is None:
                converted = self._convert_container(entries, part, 0, set(), first)
                encoded = self._ext_encoder.encode(converted)
        except RecursionError as exc:
            raise SerializationError(
                "cannot encode the checkpoint: the call stack is nearly exhausted; create it "
                "from a shallower call depth") from exc
        return encoded

    def _encode(self, payload: Payload) -> bytes:
        try:
            body = self._encode_plain(payload)
            if body is None:
                body = self._encode_converted(payload)
        except RecursionError as exc:  # only a caller already near the recursion limit
            raise SerializationError(
                "cannot encode the checkpoint: the call stack is nearly exhausted; create it "
                "from a shallower call depth") from exc
        version = LOGGED_FORMAT_VERSION if type(payload) is LoggedPayload else FORMAT_VERSION
        return self._framed(body, version)

    def _framed(self, body: bytes, version: int) -> bytes:
        if self._compress_min_bytes is not None and len(body) >= self._compress_min_bytes:
            packed = zlib.compress(body, self._compress_level)
            if len(packed) < len(body):
                return _frame(packed, _COMPRESS_ZLIB, version)
        return _frame(body, _COMPRESS_NONE, version)

    def _encode_plain(self, payload: Payload) -> bytes | None:
        """msgspec's own encoding if the screen proves it exact, else ``None``."""
        if not _SCREEN:
            return None
        try:
            body = self._encoder.encode(payload)
        except (TypeError, ValueError, OverflowError, RecursionError):
            return None
        return body if _lossless_only(payload) else None

    def _encode_converted(self, payload: Payload) -> bytes:
        seen: set[int] = set()  # ids of the containers being converted: finds cycles
        converted = msgspec.structs.replace(
            payload,
            state=self._convert_container(payload.state, "state", 0, seen),
            messages=self._convert_container(payload.messages, "messages", 0, seen),
            tool_calls=self._convert_container(payload.tool_calls, "tool_calls", 0, seen),
            context=self._convert_container(payload.context, "context", 0, seen),
        )
        return self._ext_encoder.encode(converted)

    def decode_payload(self, blob: bytes, key: str) -> Payload:
        """A body: a :class:`LoggedPayload` when it has parts stored as logs."""
        body = _unframe(blob, key, _PAYLOAD_VERSIONS)
        decoder = self._payload_decoder if blob[2] == FORMAT_VERSION else self._logged_decoder
        return self._decoded(lambda: [decoder.decode(body)], key)[0]

    def _decoded(self, decode: Callable[[], list[Payload]], key: str) -> list[Payload]:
        """Bodies ``decode`` returns, checked for depth; errors name ``key``."""
        decoding = self._decoding
        decoding.extended = False
        outer, decoding.built = getattr(decoding, "built", None), set()  # a dec_hook may decode
        try:
            payloads = decode()
            roots = [root for payload in payloads for root in (
                payload.state, payload.messages, payload.tool_calls, payload.context)]
            too_deep = _deeper_than(
                roots, MAX_DEPTH, plain=not decoding.extended, leaves=decoding.built)
        except _HookFailed as exc:
            raise SerializationError(f"dec_hook failed on {key}: {exc.__cause__}") from exc
        except RecursionError as exc:
            raise CorruptCheckpointError(
                f"payload nested too deep to decode (at most {MAX_DEPTH} levels are written; "
                "or the call stack here is nearly exhausted)", key=key) from exc
        except (msgspec.DecodeError, _Malformed) as exc:
            raise CorruptCheckpointError(f"undecodable payload: {exc}", key=key) from exc
        finally:
            decoding.built = outer
        if too_deep:
            raise CorruptCheckpointError(
                f"payload nested more than {MAX_DEPTH} levels deep", key=key)
        return payloads

    # -- the slow path ----------------------------------------------------------------------

    def _convert(self, value: Any, path: str, depth: int, seen: set[int]) -> Any:
        """A copy of ``value`` that msgspec encodes exactly; raises naming the bad path."""
        if depth > MAX_DEPTH:
            raise _too_deep(path)
        kind = type(value)
        if kind is str:
            return _checked_str(value, path)
        if kind is int:
            return _checked_int(value, path)
        if kind is float or kind is bool or value is None or kind is bytes:
            return value
        if kind is dict or kind is list:
            return self._convert_container(value, path, depth, seen)
        converted = self._exact(value, path, depth, seen)
        return self._via_hook(value, path, depth, seen) if converted is _REFUSED else converted

    def _convert_container(
        self, value: dict[Any, Any] | list[Any], path: str, depth: int, seen: set[int],
        first: int = 0,
    ) -> Any:
        marker = id(value)
        if marker in seen:
            raise SerializationError(f"cannot encode {path}: the value contains itself",
                                     path=path)
        seen.add(marker)
        try:
            if isinstance(value, list):
                return self._convert_items(value, path, depth, seen, first)
            converted: dict[Any, Any] = {}
            for key, item in value.items():
                # The value first: past the limit, the error names state['a']...['k'].
                stored = self._convert(item, f"{path}[{key!r}]", depth + 1, seen)
                stored_key = self._convert_member(
                    key, f"{path} key {key!r}", depth + 1, seen, as_key=True)
                converted[stored_key] = stored
            return converted
        finally:
            seen.discard(marker)

    def _convert_items(
        self, values: Any, path: str, depth: int, seen: set[int], first: int = 0
    ) -> list[Any]:
        # A loop, not a comprehension: one frame less per level on CPython 3.10 and 3.11.
        converted = []
        for index, item in enumerate(values, first):
            converted.append(self._convert(item, f"{path}[{index}]", depth + 1, seen))
        return converted

    def _convert_member(
        self, value: Any, path: str, depth: int, seen: set[int], *, as_key: bool
    ) -> Any:
        """A dict key or set item: it must come back hashable."""
        converted = self._convert(value, path, depth, seen)
        if not isinstance(converted, msgspec.msgpack.Ext):
            return converted
        if converted.code == _EXT_USER and self._user_dec_hook is None:
            _, plain = self._any_decoder.decode(converted.data)  # what restore would build
            try:
                hash(plain)
            except TypeError as exc:
                raise SerializationError(
                    f"cannot encode {path}: enc_hook turned it into an unhashable "
                    f"{type(plain).__name__}, which cannot come back as a dict key or set item "
                    "without a dec_hook", path=path) from exc
        return _ExtKey(converted) if as_key else converted

    def _exact(self, value: Any, path: str, depth: int, seen: set[int]) -> Any:
        """Types msgspec would change but we store exactly, as extensions; else ``_REFUSED``."""
        kind = type(value)
        if kind is tuple:
            items = self._convert_items(value, path, depth, seen)
            return msgspec.msgpack.Ext(_EXT_TUPLE, self._ext_encoder.encode(items))
        if kind is set or kind is frozenset:
            items = [self._convert_member(v, f"{path}[{i}]", depth + 1, seen, as_key=False)
                     for i, v in enumerate(value)]
            code = _EXT_SET if kind is set else _EXT_FROZENSET
            return msgspec.msgpack.Ext(code, self._ext_encoder.encode(items))
        if kind is uuid.UUID:
            return msgspec.msgpack.Ext(_EXT_UUID, value.bytes)
        if kind is _dt.datetime:
            return self._datetime(value)
        if kind is _dt.date:
            return msgspec.msgpack.Ext(_EXT_DATE, value.isoformat().encode())
        if kind is _dt.time:
            return self._time(value)
        if kind is _dt.timedelta:
            parts = (value.days, value.seconds, value.microseconds)
            return msgspec.msgpack.Ext(_EXT_TIMEDELTA, self._encoder.encode(parts))
        if kind is decimal.Decimal:
            return msgspec.msgpack.Ext(_EXT_DECIMAL, str(value).encode())
        if kind is bytearray:
            return msgspec.msgpack.Ext(_EXT_BYTEARRAY, bytes(value))
        return _REFUSED

    def _datetime(self, value: _dt.datetime) -> Any:
        tz = value.tzinfo
        if tz is None and not value.fold:
            return msgspec.msgpack.Ext(_EXT_NAIVE_DATETIME, value.isoformat().encode())
        if tz is _UTC and not value.fold:
            return value  # msgpack's own timestamp
        if tz is not None and type(tz) is not _dt.timezone:
            return _REFUSED  # a zone with rules (ZoneInfo, pytz): its offset alone is not it
        fields = _clock_fields(value.isoformat(), value.fold, tz)
        return msgspec.msgpack.Ext(_EXT_DATETIME, self._encoder.encode(fields))

    def _time(self, value: _dt.time) -> Any:
        tz = value.tzinfo
        if tz is None and not value.fold:
            return msgspec.msgpack.Ext(_EXT_TIME, value.isoformat().encode())
        if tz is not None and type(tz) is not _dt.timezone:
            return _REFUSED
        fields = _clock_fields(value.isoformat(), value.fold, tz)
        return msgspec.msgpack.Ext(_EXT_CLOCK_TIME, self._encoder.encode(fields))

    def _via_hook(self, value: Any, path: str, depth: int, seen: set[int]) -> Any:
        name = _type_name(value)
        if self._user_enc_hook is None:
            raise SerializationError(
                f"cannot encode {path}: {_refusal(value)}, or pass enc_hook/dec_hook in "
                "CheckpointConfig", path=path)
        try:
            converted = self._user_enc_hook(value)
        except Exception as exc:
            raise SerializationError(
                f"cannot encode {path}: enc_hook refused {name} ({type(exc).__name__}: {exc})",
                path=path) from exc
        if type(converted) is type(value):
            raise SerializationError(
                f"cannot encode {path}: enc_hook returned a {name} for a {name}; return "
                "supported values (e.g. a dict or a str)", path=path)
        inner = self._convert(converted, path, depth + 1, seen)
        return msgspec.msgpack.Ext(_EXT_USER, self._ext_encoder.encode((name, inner)))

    # -- decoding extensions ----------------------------------------------------------------

    def _ext_hook(self, code: int, data: memoryview) -> Any:
        # One frame per nested extension (no helper call): decoding depth is recursion depth.
        try:
            if code == _EXT_UUID:
                value: Any = uuid.UUID(bytes=bytes(data))
            elif code == _EXT_USER:
                name, value = self._any_decoder.decode(data)
                if self._user_dec_hook is not None:
                    value = self._rebuilt(name, value)
            elif code in (_EXT_TUPLE, _EXT_SET, _EXT_FROZENSET):
                items = self._any_decoder.decode(data)
                value = (tuple if code == _EXT_TUPLE else set if code == _EXT_SET
                         else frozenset)(items)
            elif code == _EXT_NAIVE_DATETIME:
                value = _dt.datetime.fromisoformat(bytes(data).decode())
            elif code == _EXT_DATE:
                value = _dt.date.fromisoformat(bytes(data).decode())
            elif code == _EXT_TIME:
                value = _dt.time.fromisoformat(bytes(data).decode())
            elif code == _EXT_TIMEDELTA:
                days, seconds, micros = self._any_decoder.decode(data)
                value = _dt.timedelta(days=days, seconds=seconds, microseconds=micros)
            elif code == _EXT_DECIMAL:
                value = decimal.Decimal(bytes(data).decode())
            elif code == _EXT_DATETIME:
                fields = self._any_decoder.decode(data)
                value = _with_clock_fields(_dt.datetime.fromisoformat, fields)
            elif code == _EXT_CLOCK_TIME:
                value = _with_clock_fields(_dt.time.fromisoformat, self._any_decoder.decode(data))
            elif code == _EXT_BYTEARRAY:
                value = bytearray(data)
            else:
                raise _Malformed(f"unknown extension type {code}")
        except (_HookFailed, _Malformed, CheckpointError):
            raise
        except (ValueError, TypeError, OverflowError, decimal.InvalidOperation,
                msgspec.DecodeError) as exc:
            raise _Malformed(f"malformed extension {code}: {exc}") from exc
        # Set after building, so that a decode nested in a dec_hook cannot clear it.
        self._decoding.extended = True
        return value

    def _rebuilt(self, name: str, value: Any) -> Any:
        """What ``dec_hook`` builds from a stored value, remembered as a leaf of the payload."""
        built: set[int] | None = getattr(self._decoding, "built", None)
        if _deeper_than([value], MAX_DEPTH, plain=False, leaves=built or frozenset()):
            raise _Malformed(f"the stored value of a {name} is nested too deep")
        result = self._dec_hook(name, value)
        if built is not None:
            built.add(id(result))
        return result

    def _dec_hook(self, name: str, value: Any) -> Any:
        assert self._user_dec_hook is not None
        try:
            return self._user_dec_hook(name, value)
        except (RecursionError, CheckpointError):
            # A record nested too deep is not the hook's fault; one of our errors is the
            # hook's own verdict (a stored value it finds damaged: CorruptCheckpointError).
            raise
        except Exception as exc:
            raise _HookFailed(name) from exc


def _checked_str(value: str, path: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SerializationError(
            f"cannot encode {path}: a str with a lone surrogate", path=path) from exc
    return value


def _checked_int(value: int, path: str) -> int:
    if value in _INT_RANGE:
        return value
    raise SerializationError(f"cannot encode {path}: integer out of the 64-bit range", path=path)


def _tz_name(tz: _dt.tzinfo | None) -> str | None:
    """The name of a fixed-offset timezone, if it was given one (``timezone(offset, name)``)."""
    if tz is None:
        return None
    name = tz.tzname(None)
    unnamed = _dt.timezone(tz.utcoffset(None) or _dt.timedelta())
    return None if name == unnamed.tzname(None) else name


def _clock_fields(text: str, fold: int, tz: _dt.tzinfo | None) -> tuple[Any, ...]:
    """``[isoformat, fold, tzname]``, plus the offset in microseconds when it has a fraction
    of a second: ``fromisoformat`` reads some such offsets as zero (CPython 3.11 reads
    ``+00:00:00.000001`` as UTC), so they are not left to the text."""
    offset = None if tz is None else tz.utcoffset(None)
    if offset is not None and offset.microseconds:
        return (text, fold, _tz_name(tz), offset // _dt.timedelta(microseconds=1))
    return (text, fold, _tz_name(tz))


def _with_clock_fields(parse: Callable[[str], Any], fields: Any) -> Any:
    """A datetime or time from ``[isoformat, fold, tzname]`` or ``[isoformat, fold, tzname,
    offset in microseconds]`` (``_EXT_DATETIME``/``_CLOCK_TIME``)."""
    text, fold, name, *rest = fields
    if fold not in (0, 1) or not (name is None or type(name) is str) or len(rest) > 1:
        raise ValueError(f"bad fold {fold!r}, zone name {name!r} or fields {len(fields)}")
    value = parse(text)
    if rest:
        micros = rest[0]
        if type(micros) is not int or value.tzinfo is None:
            raise ValueError(f"bad offset {micros!r} for {text!r:.60}")
        offset = _dt.timedelta(microseconds=micros)
        value = value.replace(tzinfo=_dt.timezone(offset) if name is None
                              else _dt.timezone(offset, name))
    elif name is not None:
        if value.tzinfo is None:
            raise ValueError("a zone name without an offset")
        value = value.replace(tzinfo=_dt.timezone(value.utcoffset(), name))
    return value.replace(fold=fold)


def _refusal(value: Any) -> str:
    """Why ``value`` is refused, and what to store instead."""
    kind = type(value)
    what = f"objects of type {_type_name(value)} are not supported"
    if isinstance(value, enum.Enum):
        return f"{what} (an Enum member would come back as its value); store its .value"
    if isinstance(value, tuple) and hasattr(kind, "_fields"):
        return f"{what} (a namedtuple would come back as a tuple); store value._asdict()"
    if isinstance(value, (_dt.datetime, _dt.time)) and value.tzinfo is not None and (
            kind in (_dt.datetime, _dt.time)):
        return (f"a {kind.__name__} in the zone {value.tzinfo!r} is not supported (only fixed "
                "offsets, datetime.timezone, round-trip); convert it, e.g. "
                ".astimezone(timezone.utc)")
    if kind is memoryview:
        return f"{what}; store bytes(value)"
    for base in (dict, list, tuple, set, frozenset, str, int, float, bytes, bytearray,
                 _dt.datetime, _dt.date, _dt.time, _dt.timedelta, decimal.Decimal, uuid.UUID):
        if isinstance(value, base):
            return (f"{what} (a subclass of {base.__qualname__} would come back as a "
                    f"{base.__qualname__}); convert it to a {base.__qualname__}")
    return (f"{what}; store JSON-like data, datetime, bytes, UUID, tuples, sets or Decimal "
            "instead")


# -- JSON -----------------------------------------------------------------------------------


_json_encoder = msgspec.json.Encoder()
_json_decoder = msgspec.json.Decoder()


def to_json_text(value: Any) -> str:
    """JSON for people: UUIDs, dates and Decimals become text; bytes become base64."""
    try:
        return _json_encoder.encode(value).decode("utf-8")
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise SerializationError(f"cannot encode checkpoint as JSON: {exc}") from exc


def from_json_text(data: str | bytes) -> Any:
    if not isinstance(data, (str, bytes, bytearray, memoryview)):
        raise SerializationError(
            f"invalid checkpoint JSON: expected str or bytes, got {type(data).__name__}")
    if isinstance(data, str) and type(data) is not str:
        data = str.__str__(data)  # the decoder reads a plain str only
    try:
        return _json_decoder.decode(data)
    except UnicodeEncodeError as exc:
        raise SerializationError(
            "invalid checkpoint JSON: the text is not valid unicode (it has a lone surrogate)"
        ) from exc
    except RecursionError as exc:
        raise SerializationError("invalid checkpoint JSON: nested too deep") from exc
    except msgspec.DecodeError as exc:
        raise SerializationError(f"invalid checkpoint JSON: {exc}") from exc


def json_copy(value: object, root: str) -> Any:
    """A deep copy of ``value`` if it holds JSON values only, else :class:`SerializationError`.

    JSON values: dicts with ``str`` keys, lists, ``str``, ``int`` (64-bit), finite ``float``,
    ``bool`` and ``None``, exact types (no subclasses), at most :data:`MAX_DEPTH` levels below
    ``value``. The error's ``path`` names the first other value, starting at ``root``, e.g.
    ``request['items'][2]`` for a tuple there.
    """
    try:
        return _json_copy(value, root, 0)
    except RecursionError as exc:  # only a caller already near the recursion limit
        raise SerializationError(
            f"cannot copy {root}: the call stack is nearly exhausted; call from a shallower "
            "call depth", path=root) from exc


def _json_copy(value: object, path: str, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise SerializationError(
            f"{path} is nested more than {MAX_DEPTH} levels deep", path=path)
    if value is None or type(value) is bool:
        return value
    if type(value) is str:
        return _checked_str(value, path)
    if type(value) is int:
        return _checked_int(value, path)
    if type(value) is float and math.isfinite(value):
        return value
    if type(value) is list:
        return [_json_copy(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
    if type(value) is dict:
        return {_json_key(key, path): _json_copy(item, f"{path}[{key!r}]", depth + 1)
                for key, item in value.items()}
    what = "a float that is not finite" if type(value) is float else f"a {_type_name(value)}"
    raise SerializationError(
        f"{path} is {what}, not a JSON value; use dicts with str keys, lists, str, int, "
        "float, bool or None", path=path)


def _json_key(key: object, path: str) -> str:
    where = f"{path} key {key!r}"
    if type(key) is str:
        return _checked_str(key, where)
    raise SerializationError(
        f"{where} is a {_type_name(key)}; JSON keys are str", path=where)
