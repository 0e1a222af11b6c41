"""Encoding of stored records: versioned, checksummed, msgpack, never pickle.

Every stored blob is a frame::

    b"FC" | format version (1 byte) | codec (b"m" = msgpack) | compression (0 none, 1 zlib)
    | CRC-32 of the body (4 bytes, big endian) | body

Fidelity. A restored payload equals the stored one, types included. msgspec encodes plain data
(dict, list, str, int, float, bool, None, bytes, timezone-aware datetime) natively and fast.
Everything else it would quietly turn into something else (a UUID into text, a tuple into a
list, a Decimal into text, a dataclass into a dict), so the fast path checks its own work.
First a screen: when every object reachable from the payload is exactly a dict, list, str, int,
float, bool, None or bytes, msgpack stores it losslessly and there is nothing to check (the
walk runs level by level in C and costs a third to a half of a decode and compare; CPython
3.10 to 3.12, see ``_SCREEN``). Otherwise it decodes
what it encoded and compares in C. Only when they differ, or msgspec refuses a value, does the
slow path walk the value in Python, storing UUID, tuple, set, frozenset, naive
datetime, date, time, timedelta and Decimal as msgpack extensions, handing any other type to the
user's ``enc_hook`` (it comes back through ``dec_hook(type_name, value)``), and raising
:class:`SerializationError` naming the path of a value nobody can encode.

Decoding builds only those types and what ``dec_hook`` returns, so a tampered store cannot make
a restore run code.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import gc
import sys
import uuid
import zlib
from collections.abc import Callable
from typing import Any

import msgspec

from fastcheckpoint.errors import CorruptCheckpointError, SerializationError

__all__ = ["Codec", "DecHook", "EncHook", "from_json_text", "to_json_text"]

EncHook = Callable[[Any], Any]
"""Turns an object of another type into supported values; raise to refuse."""
DecHook = Callable[[str, Any], Any]
"""Rebuilds an object from ``(type name, value)``; the type name is ``module.QualName``."""

FORMAT_VERSION = 1
_MAGIC = b"FC"
_CODEC_MSGPACK = ord("m")
_COMPRESS_NONE = 0
_COMPRESS_ZLIB = 1
_PREFIX_LEN = 9
_MAX_DEPTH = 200

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

_PLAIN = (str, float, bool, type(None), bytes)
_LOSSLESS = frozenset({dict, list, str, int, float, bool, type(None), bytes})
"""Types msgpack stores and msgspec restores exactly: exact types, no subclasses."""
_CONTAINERS = frozenset({dict, list})
_SCREEN = sys.implementation.name == "cpython" and sys.version_info < (3, 13)
"""The screen relies on ``gc.get_referents`` visiting every value of a dict and every key that
is not an exact ``str``, as CPython 3.10 to 3.12 do. CPython 3.13 does not visit the values an
object keeps inline in its ``__dict__`` (``vars(obj)``), so there, and on other interpreters,
every payload takes the decode-and-compare check."""


class Header(msgspec.Struct, array_like=True, frozen=True):
    run_id: str
    step_name: str
    parent_id: str | None
    tags: list[str]
    ttl_seconds: float | None


class Payload(msgspec.Struct, array_like=True):
    state: dict[Any, Any]
    messages: list[Any]
    tool_calls: list[Any]
    context: dict[Any, Any]


class RunData(msgspec.Struct, array_like=True):
    error: str | None = None
    approval: dict[str, Any] | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    history: list[tuple[str, float, str | None, str]] = msgspec.field(default_factory=list)


MAX_INFLATED_BYTES = 1 << 30
"""Largest body a compressed record may inflate to. The checksum catches damage, not malice:
without a bound, a few kilobytes planted in a store could inflate to gigabytes on restore."""


def _frame(body: bytes, compression: int) -> bytes:
    crc = zlib.crc32(body).to_bytes(4, "big")
    return b"".join((_MAGIC, bytes((FORMAT_VERSION, _CODEC_MSGPACK, compression)), crc, body))


def _unframe(blob: bytes, key: str) -> bytes:
    if len(blob) < _PREFIX_LEN or blob[:2] != _MAGIC:
        raise CorruptCheckpointError("not a fastcheckpoint record", key=key)
    version, codec, compression = blob[2], blob[3], blob[4]
    if version != FORMAT_VERSION or codec != _CODEC_MSGPACK:
        raise CorruptCheckpointError(
            f"unsupported record format version {version} codec {codec}", key=key
        )
    body = blob[_PREFIX_LEN:]
    if zlib.crc32(body) != int.from_bytes(blob[5:9], "big"):
        raise CorruptCheckpointError("checksum mismatch", key=key)
    if compression == _COMPRESS_NONE:
        return body
    if compression == _COMPRESS_ZLIB:
        inflater = zlib.decompressobj()
        try:
            inflated = inflater.decompress(body, MAX_INFLATED_BYTES)
        except zlib.error as exc:
            raise CorruptCheckpointError("undecompressable body", key=key) from exc
        if inflater.unconsumed_tail:
            raise CorruptCheckpointError(
                f"compressed body inflates past {MAX_INFLATED_BYTES} bytes", key=key
            )
        if not inflater.eof:
            raise CorruptCheckpointError("truncated compressed body", key=key)
        return inflated
    raise CorruptCheckpointError(f"unknown compression {compression}", key=key)


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


def _refuse_ext(code: int, data: memoryview) -> Any:
    raise _Malformed(f"extension type {code} in the data to encode")


def _lossless_only(payload: Payload) -> bool:
    """Whether every object reachable from ``payload`` has one of the ``_LOSSLESS`` types.

    Walks breadth first, one level per ``gc.get_referents`` call, all in C: on the interpreters
    of ``_SCREEN`` a dict's referents are its values and every key that is not an exact ``str``,
    a list's are its items, and str, int, float, bool, None and bytes have none. Any other type
    ends the walk with ``False``. Called only on data msgspec has just encoded, so it has no
    cycles and every level is finite.
    """
    level = [payload.state, payload.messages, payload.tool_calls, payload.context]
    if list(map(type, level)) != [dict, list, list, dict]:
        return False
    while True:
        kinds = set(map(type, level))
        if not kinds <= _LOSSLESS:
            return False
        if kinds.isdisjoint(_CONTAINERS):
            return True
        level = gc.get_referents(*level)


class _HookFailed(Exception):
    """The user's ``dec_hook`` raised: reported as a serialization problem, not corruption."""


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
        self._plain_decoder = msgspec.msgpack.Decoder(Payload, ext_hook=_refuse_ext)
        self._payload_decoder = msgspec.msgpack.Decoder(Payload, ext_hook=self._ext_hook)
        self._any_decoder = msgspec.msgpack.Decoder(ext_hook=self._ext_hook)
        self._header_decoder = msgspec.msgpack.Decoder(Header)
        self._run_decoder = msgspec.msgpack.Decoder(RunData)

    # -- headers and run details ----------------------------------------------------------

    def encode_header(self, header: Header) -> bytes:
        return _frame(self._encoder.encode(header), _COMPRESS_NONE)

    def decode_header(self, blob: bytes, key: str) -> Header:
        body = _unframe(blob, key)
        try:
            return self._header_decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise CorruptCheckpointError(f"undecodable header: {exc}", key=key) from exc

    def encode_run_data(self, data: RunData) -> bytes:
        try:
            return _frame(self._encoder.encode(data), _COMPRESS_NONE)
        except (TypeError, ValueError, OverflowError) as exc:
            raise SerializationError(f"cannot encode run details: {exc}") from exc

    def decode_run_data(self, blob: bytes, key: str) -> RunData:
        if not blob:
            return RunData()
        body = _unframe(blob, key)
        try:
            return self._run_decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise CorruptCheckpointError(f"undecodable run record: {exc}", key=key) from exc

    # -- payloads -------------------------------------------------------------------------

    def encode_payload(
        self,
        state: dict[Any, Any],
        messages: list[Any],
        tool_calls: list[Any],
        context: dict[Any, Any],
    ) -> bytes:
        """Encode a checkpoint body; raises :class:`SerializationError` naming the bad path."""
        payload = Payload(state, messages, tool_calls, context)
        body = self._encode_plain(payload)
        if body is None:
            seen: set[int] = set()  # ids of the containers being converted: finds cycles
            converted = Payload(
                self._convert(state, "state", 0, seen),
                self._convert(messages, "messages", 0, seen),
                self._convert(tool_calls, "tool_calls", 0, seen),
                self._convert(context, "context", 0, seen),
            )
            body = self._ext_encoder.encode(converted)
        if self._compress_min_bytes is not None and len(body) >= self._compress_min_bytes:
            packed = zlib.compress(body, self._compress_level)
            if len(packed) < len(body):
                return _frame(packed, _COMPRESS_ZLIB)
        return _frame(body, _COMPRESS_NONE)

    def _encode_plain(self, payload: Payload) -> bytes | None:
        """msgspec's own encoding if it round-trips exactly, else ``None``."""
        try:
            body = self._encoder.encode(payload)
        except (TypeError, ValueError, OverflowError, RecursionError):
            return None
        if _SCREEN and _lossless_only(payload):
            return body
        try:
            return body if self._plain_decoder.decode(body) == payload else None
        except _Malformed:  # an Ext in the caller's data: ours to refuse, not to store
            return None

    def decode_payload(self, blob: bytes, key: str) -> Payload:
        body = _unframe(blob, key)
        try:
            return self._payload_decoder.decode(body)
        except _HookFailed as exc:
            raise SerializationError(f"dec_hook failed on {key}: {exc.__cause__}") from exc
        except (msgspec.DecodeError, _Malformed) as exc:
            raise CorruptCheckpointError(f"undecodable payload: {exc}", key=key) from exc

    # -- the slow path ----------------------------------------------------------------------

    def _convert(self, value: Any, path: str, depth: int, seen: set[int]) -> Any:
        """A copy of ``value`` that msgspec encodes exactly; raises naming the bad path."""
        kind = type(value)
        if kind is int:
            if -(2**63) <= value < 2**64:
                return value
            raise SerializationError(f"cannot encode {path}: integer out of the 64-bit range",
                                     path=path)
        if kind is str:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise SerializationError(
                    f"cannot encode {path}: a str with a lone surrogate", path=path) from exc
            return value
        if kind in _PLAIN:
            return value
        if depth > _MAX_DEPTH:
            raise SerializationError(
                f"cannot encode {path}: nested deeper than {_MAX_DEPTH} levels", path=path)
        if isinstance(value, (dict, list)):
            return self._convert_container(value, path, depth, seen)
        special = self._special(value, path, depth, seen)
        if special is not None:
            return special
        return self._via_hook(value, path, depth, seen)

    def _convert_container(
        self, value: dict[Any, Any] | list[Any], path: str, depth: int, seen: set[int]
    ) -> Any:
        marker = id(value)
        if marker in seen:
            raise SerializationError(f"cannot encode {path}: the value contains itself",
                                     path=path)
        seen.add(marker)
        try:
            if isinstance(value, list):
                return [
                    self._convert(v, f"{path}[{i}]", depth + 1, seen) for i, v in enumerate(value)
                ]
            return {
                self._convert_key(k, f"{path} key {k!r}", depth + 1, seen):
                    self._convert(v, f"{path}[{k!r}]", depth + 1, seen)
                for k, v in value.items()
            }
        finally:
            seen.discard(marker)

    def _convert_key(self, key: Any, path: str, depth: int, seen: set[int]) -> Any:
        converted = self._convert(key, path, depth, seen)
        return _ExtKey(converted) if isinstance(converted, msgspec.msgpack.Ext) else converted

    def _special(self, value: Any, path: str, depth: int, seen: set[int]) -> Any:
        """Types msgspec would change but we store exactly, as extensions."""
        if isinstance(value, (tuple, set, frozenset)):
            code = (_EXT_TUPLE if isinstance(value, tuple)
                    else _EXT_SET if isinstance(value, set) else _EXT_FROZENSET)
            items = [
                self._convert(v, f"{path}[{i}]", depth + 1, seen) for i, v in enumerate(value)
            ]
            return msgspec.msgpack.Ext(code, self._ext_encoder.encode(items))
        if isinstance(value, uuid.UUID):
            return msgspec.msgpack.Ext(_EXT_UUID, value.bytes)
        if isinstance(value, _dt.datetime):
            if value.tzinfo is not None and value.utcoffset() is not None:
                return value
            return msgspec.msgpack.Ext(_EXT_NAIVE_DATETIME, value.isoformat().encode())
        if isinstance(value, _dt.date):
            return msgspec.msgpack.Ext(_EXT_DATE, value.isoformat().encode())
        if isinstance(value, _dt.time):
            if value.tzinfo is not None:
                return self._via_hook(value, path, depth, seen)
            return msgspec.msgpack.Ext(_EXT_TIME, value.isoformat().encode())
        if isinstance(value, _dt.timedelta):
            parts = (value.days, value.seconds, value.microseconds)
            return msgspec.msgpack.Ext(_EXT_TIMEDELTA, self._encoder.encode(parts))
        if isinstance(value, decimal.Decimal):
            return msgspec.msgpack.Ext(_EXT_DECIMAL, str(value).encode())
        if isinstance(value, (bytearray, memoryview)):
            return bytes(value)
        if isinstance(value, (str, float, bytes)):  # subclasses of plain types
            return self._via_hook(value, path, depth, seen)
        return None

    def _via_hook(self, value: Any, path: str, depth: int, seen: set[int]) -> Any:
        name = _type_name(value)
        if self._user_enc_hook is None:
            raise SerializationError(
                f"cannot encode {path}: objects of type {name} are not supported. Store "
                "JSON-like data, datetime, bytes, UUID, tuples, sets or Decimal, or pass "
                "enc_hook/dec_hook in CheckpointConfig", path=path)
        try:
            converted = self._user_enc_hook(value)
        except Exception as exc:
            raise SerializationError(
                f"cannot encode {path}: enc_hook refused {name} ({type(exc).__name__}: {exc})",
                path=path) from exc
        inner = self._convert(converted, path, depth + 1, seen)
        return msgspec.msgpack.Ext(_EXT_USER, self._ext_encoder.encode((name, inner)))

    def _ext_hook(self, code: int, data: memoryview) -> Any:
        try:
            if code == _EXT_UUID:
                return uuid.UUID(bytes=bytes(data))
            if code == _EXT_USER:
                name, value = self._any_decoder.decode(data)
                return value if self._user_dec_hook is None else self._dec_hook(name, value)
            if code in (_EXT_TUPLE, _EXT_SET, _EXT_FROZENSET):
                items = self._any_decoder.decode(data)
                return (tuple if code == _EXT_TUPLE else set if code == _EXT_SET
                        else frozenset)(items)
            if code == _EXT_NAIVE_DATETIME:
                return _dt.datetime.fromisoformat(bytes(data).decode())
            if code == _EXT_DATE:
                return _dt.date.fromisoformat(bytes(data).decode())
            if code == _EXT_TIME:
                return _dt.time.fromisoformat(bytes(data).decode())
            if code == _EXT_TIMEDELTA:
                days, seconds, micros = self._any_decoder.decode(data)
                return _dt.timedelta(days=days, seconds=seconds, microseconds=micros)
            if code == _EXT_DECIMAL:
                return decimal.Decimal(bytes(data).decode())
        except (_HookFailed, _Malformed):
            raise
        except (ValueError, TypeError, OverflowError, decimal.InvalidOperation,
                msgspec.DecodeError) as exc:
            raise _Malformed(f"malformed extension {code}: {exc}") from exc
        raise _Malformed(f"unknown extension type {code}")

    def _dec_hook(self, name: str, value: Any) -> Any:
        assert self._user_dec_hook is not None
        try:
            return self._user_dec_hook(name, value)
        except Exception as exc:
            raise _HookFailed(name) from exc


_json_encoder = msgspec.json.Encoder()
_json_decoder = msgspec.json.Decoder()


def to_json_text(value: Any) -> str:
    """JSON for people: UUIDs, dates and Decimals become text; bytes become base64."""
    try:
        return _json_encoder.encode(value).decode("utf-8")
    except (TypeError, ValueError, OverflowError) as exc:
        raise SerializationError(f"cannot encode checkpoint as JSON: {exc}") from exc


def from_json_text(data: str | bytes) -> Any:
    try:
        return _json_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise SerializationError(f"invalid checkpoint JSON: {exc}") from exc
