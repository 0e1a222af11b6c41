"""The record codec: framing, checksums, compression, type fidelity, error paths.

Depth limits are in test_codec_depth.py, type-by-type fidelity in test_codec_fidelity.py,
json_copy in test_codec_json.py.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime as dt
import decimal
import enum
import os
import pickle
import uuid
import zlib
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastcheckpoint
from fastcheckpoint import CorruptCheckpointError, SerializationError
from fastcheckpoint._codec import Codec, Header, Payload

KEY = "runs/abc/c/00000000000000000007"

# The documented frame: b"FC" | version | codec | compression | CRC-32 (4 bytes) | body.
PREFIX = 9


def encode(codec: Codec, state: dict[Any, Any], **parts: Any) -> bytes:
    return codec.encode_payload(
        state, parts.get("messages", []), parts.get("tool_calls", []), parts.get("context", {})
    )


def round_trip(codec: Codec, state: dict[Any, Any]) -> dict[Any, Any]:
    return codec.decode_payload(encode(codec, state), KEY).state


def reframe(body: bytes, *, version: int = 1, codec: int = ord("m"), compression: int = 0) -> bytes:
    """A frame around ``body`` with a correct checksum, as a tampering writer would make."""
    crc = zlib.crc32(body).to_bytes(4, "big")
    return b"FC" + bytes((version, codec, compression)) + crc + body


def raw_payload(state: dict[Any, Any]) -> bytes:
    return msgspec.msgpack.encode(Payload(state, [], [], {}))


# -- framing ----------------------------------------------------------------------------------


def test_round_trip_of_a_plain_payload() -> None:
    codec = Codec()
    blob = encode(codec, {"a": 1}, messages=[{"m": "x"}], tool_calls=[1], context={"c": None})
    payload = codec.decode_payload(blob, KEY)

    assert payload.state == {"a": 1}
    assert payload.messages == [{"m": "x"}]
    assert payload.tool_calls == [1]
    assert payload.context == {"c": None}
    assert blob[:2] == b"FC"


def _flip_last_byte(blob: bytes) -> bytes:
    return blob[:-1] + bytes((blob[-1] ^ 0x01,))


CORRUPTIONS = [
    pytest.param(_flip_last_byte, "checksum", id="checksum-mismatch"),
    pytest.param(lambda blob: b"XX" + blob[2:], "not a fastcheckpoint record", id="bad-magic"),
    pytest.param(lambda blob: blob[:2] + b"\x03" + blob[3:], "version", id="unknown-version"),
    pytest.param(lambda blob: blob[:3] + b"z" + blob[4:], "codec", id="unknown-codec"),
    pytest.param(lambda blob: blob[:5], "not a fastcheckpoint record", id="truncated-prefix"),
    pytest.param(lambda blob: blob[: len(blob) // 2], "checksum", id="truncated-body"),
    pytest.param(lambda blob: b"", "not a fastcheckpoint record", id="empty"),
]


@pytest.mark.parametrize(("corrupt", "reason"), CORRUPTIONS)
def test_damaged_payload_raises_corrupt_checkpoint_error_naming_the_key(
    corrupt: Any, reason: str
) -> None:
    codec = Codec()
    blob = encode(codec, {"a": "some state", "n": list(range(20))})

    with pytest.raises(CorruptCheckpointError) as caught:
        codec.decode_payload(corrupt(blob), KEY)

    assert caught.value.key == KEY
    assert KEY in str(caught.value)
    assert reason in str(caught.value)


@pytest.mark.parametrize(("corrupt", "reason"), CORRUPTIONS)
def test_damaged_header_raises_corrupt_checkpoint_error_naming_the_key(
    corrupt: Any, reason: str
) -> None:
    codec = Codec()
    blob = codec.encode_header(Header("run", "step", None, ["t"], 10.0))
    assert codec.decode_header(blob, KEY) == Header("run", "step", None, ["t"], 10.0)

    with pytest.raises(CorruptCheckpointError) as caught:
        codec.decode_header(corrupt(blob), KEY)

    assert caught.value.key == KEY
    assert reason in str(caught.value)


def test_unknown_compression_raises_corrupt_checkpoint_error() -> None:
    blob = reframe(raw_payload({"a": 1}), compression=7)

    with pytest.raises(CorruptCheckpointError) as caught:
        Codec().decode_payload(blob, KEY)

    assert caught.value.key == KEY


def test_compressed_body_that_does_not_inflate_raises_corrupt_checkpoint_error() -> None:
    blob = reframe(b"definitely not zlib", compression=1)

    with pytest.raises(CorruptCheckpointError) as caught:
        Codec().decode_payload(blob, KEY)

    assert caught.value.key == KEY


def test_compressed_body_inflating_past_the_bound_raises_corrupt_checkpoint_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bomb = reframe(zlib.compress(raw_payload({"zeros": bytes(1 << 20)}), 9), compression=1)
    assert len(bomb) < 4096  # a planted record this small would otherwise inflate to 1 MB
    monkeypatch.setattr("fastcheckpoint._codec.MAX_INFLATED_BYTES", 1 << 16)

    with pytest.raises(CorruptCheckpointError, match="inflates past") as caught:
        Codec().decode_payload(bomb, KEY)

    assert caught.value.key == KEY


def test_truncated_compressed_body_raises_corrupt_checkpoint_error() -> None:
    whole = zlib.compress(raw_payload({"a": "b" * 1000}))
    blob = reframe(whole[: len(whole) // 2], compression=1)

    with pytest.raises(CorruptCheckpointError, match="truncated") as caught:
        Codec().decode_payload(blob, KEY)

    assert caught.value.key == KEY


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(msgspec.msgpack.encode(42), id="not-a-payload"),
        pytest.param(msgspec.msgpack.encode([{"a": 1}]), id="too-short"),
        pytest.param(b"\xc1", id="invalid-msgpack"),
        pytest.param(raw_payload({"x": msgspec.msgpack.Ext(99, b"?")}), id="unknown-extension"),
        pytest.param(raw_payload({"x": msgspec.msgpack.Ext(1, b"short")}), id="malformed-uuid"),
        pytest.param(
            raw_payload({"x": msgspec.msgpack.Ext(2, msgspec.msgpack.encode([1]))}),
            id="malformed-user-extension",
        ),
    ],
)
def test_well_framed_but_unparsable_payload_raises_corrupt_checkpoint_error(body: bytes) -> None:
    # A foreign or tampered writer can produce a frame whose checksum matches.
    with pytest.raises(CorruptCheckpointError) as caught:
        Codec().decode_payload(reframe(body), KEY)

    assert caught.value.key == KEY


def test_a_pickle_in_the_store_is_never_executed(tmp_path: Path) -> None:
    target = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path.touch, (target,))

    evil = pickle.dumps(Exploit())
    codec = Codec(dec_hook=lambda name, value: value)
    for blob in (evil, reframe(evil), reframe(zlib.compress(evil), compression=1)):
        with pytest.raises(CorruptCheckpointError):
            codec.decode_payload(blob, KEY)

    assert not target.exists()


_IMPORTERS = ("import_module", "__import__")


def _imported_modules(tree: ast.AST) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and _call_name(node.func) in _IMPORTERS:
            # importlib.import_module("pickle") and friends
            found.update(arg.value.split(".")[0] for arg in node.args[:1]
                         if isinstance(arg, ast.Constant) and isinstance(arg.value, str))
    return found


def _call_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else None


def test_no_pickle_anywhere_in_the_package() -> None:
    forbidden = {
        "pickle",
        "cPickle",
        "_pickle",
        "dill",
        "cloudpickle",
        "jsonpickle",
        "shelve",
        "marshal",
    }
    package = Path(fastcheckpoint.__file__).parent
    sources = sorted(package.rglob("*.py"))
    offenders = {}
    for source in sources:
        text = source.read_text(encoding="utf-8")
        used = _imported_modules(ast.parse(text)) & forbidden
        names = {
            node.id for node in ast.walk(ast.parse(text)) if isinstance(node, ast.Name)
        } & forbidden
        if used or names:
            offenders[str(source.relative_to(package))] = sorted(used | names)

    assert len(sources) > 5  # the walk really saw the package
    assert offenders == {}


# -- compression --------------------------------------------------------------------------------


def test_payload_above_the_threshold_is_compressed_and_round_trips() -> None:
    state = {"text": "the same words again " * 5000}
    plain = encode(Codec(compress_min_bytes=None), state)
    codec = Codec(compress_min_bytes=1024)
    packed = encode(codec, state)

    assert packed[4] == 1
    assert len(packed) < len(plain) // 10
    assert codec.decode_payload(packed, KEY).state == state
    assert Codec().decode_payload(packed, KEY).state == state  # any codec instance reads it


def test_payload_below_the_threshold_is_not_compressed() -> None:
    state = {"text": "the same words again " * 40}
    blob = encode(Codec(compress_min_bytes=len(raw_payload(state)) + 100), state)

    assert blob[4] == 0
    assert blob[PREFIX:] == raw_payload(state)


def test_incompressible_payload_is_stored_uncompressed() -> None:
    state = {"raw": os.urandom(64 * 1024)}
    codec = Codec(compress_min_bytes=1024)
    blob = encode(codec, state)

    assert blob[4] == 0
    assert codec.decode_payload(blob, KEY).state == state


def test_compression_disabled_with_none() -> None:
    state = {"text": "x" * 100_000}
    blob = encode(Codec(compress_min_bytes=None), state)

    assert blob[4] == 0
    assert len(blob) > 100_000


# -- type fidelity ------------------------------------------------------------------------------


def test_uuids_nested_in_lists_and_dicts_round_trip() -> None:
    ids = [uuid.uuid4() for _ in range(4)]
    state = {"ids": [ids[0], [ids[1], {"deep": ids[2]}]], "one": ids[3]}

    restored = round_trip(Codec(), state)

    assert restored == state
    assert type(restored["ids"][1][1]["deep"]) is uuid.UUID


def test_uuid_dict_keys_round_trip() -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    state = {"by_id": {first: "a", second: {"nested": [first]}}}

    restored = round_trip(Codec(), state)

    assert restored == state
    assert all(type(key) is uuid.UUID for key in restored["by_id"])


def test_uuid_returned_by_an_enc_hook_round_trips() -> None:
    class Ref:
        def __init__(self, target: uuid.UUID) -> None:
            self.target = target

    def enc_hook(obj: Any) -> Any:
        if isinstance(obj, Ref):
            return {"target": obj.target}
        raise NotImplementedError

    def dec_hook(type_name: str, value: Any) -> Any:
        return value["target"]

    target = uuid.uuid4()
    restored = round_trip(Codec(enc_hook=enc_hook, dec_hook=dec_hook), {"ref": Ref(target)})

    assert restored == {"ref": target}
    assert type(restored["ref"]) is uuid.UUID


def test_aware_datetime_bytes_and_int_keys_round_trip_with_their_types() -> None:
    when = dt.datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=dt.timezone.utc)
    state = {
        "when": when,
        "offset": dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=-7))),
        "raw": b"\x00\x01\xff",
        "by_int": {0: "zero", -1: "minus", 2**63 - 1: "max"},
        "floats": [0.1, -0.0, 1e300],
        "edge_ints": [2**64 - 1, -(2**63)],
    }

    restored = round_trip(Codec(), state)

    assert restored == state
    assert type(restored["when"]) is dt.datetime
    assert restored["offset"].utcoffset() == dt.timedelta(hours=-7)  # not moved to UTC
    assert type(restored["raw"]) is bytes
    assert list(restored["by_int"]) == [0, -1, 2**63 - 1]


class Holder:
    alive: list[Holder] = []  # noqa: RUF012 - kept alive on purpose, see below

    def __init__(self, value: Any) -> None:
        self.value = value
        self.other = "text"
        Holder.alive.append(self)  # a dead object's __dict__ takes its values back


def same(first: Any, second: Any) -> bool:
    """Equal and of the same type at every level (``==`` alone takes ``[1]`` for ``(1,)``)."""
    if type(first) is not type(second):
        return False
    if isinstance(first, dict):
        return list(first) == list(second) and all(
            same(k1, k2) and same(first[k1], second[k2])
            for k1, k2 in zip(first, second, strict=True))
    if isinstance(first, (list, tuple)):
        return len(first) == len(second) and all(map(same, first, second))
    if isinstance(first, (set, frozenset)):
        return first == second and {type(v) for v in first} == {type(v) for v in second}
    return bool(first == second)


_int64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
# What msgpack stores as is: the create-time screen lets content made only of these through.
_lossless = st.one_of(st.none(), st.booleans(), _int64, st.floats(allow_nan=False), st.text(),
                      st.binary(max_size=8))
# What msgspec would silently turn into something else: the screen must send these to the
# exact check wherever they sit, as values or as dict keys, however deep.
_changed_by_msgpack = st.one_of(
    st.uuids(), st.datetimes(), st.dates(), st.times(), st.timedeltas(),
    st.decimals(allow_nan=False, allow_infinity=False), st.tuples(_int64),
    st.frozensets(st.text(max_size=3), max_size=2),
)
_keys = st.one_of(st.text(max_size=5), _int64, st.uuids(), st.tuples(st.text(max_size=3)),
                  st.dates(), st.frozensets(_int64, max_size=2))
_content = st.recursive(
    st.one_of(_lossless, _changed_by_msgpack),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(_keys, children, max_size=4),
        st.tuples(children, children),
        st.sets(_int64, max_size=3),
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(state=st.dictionaries(st.one_of(st.text(max_size=5), _keys), _content, max_size=4),
       messages=st.lists(_content, max_size=3))
def test_any_mix_of_supported_types_round_trips_with_every_type_intact(
    state: dict[Any, Any], messages: list[Any]
) -> None:
    codec = Codec()

    restored = codec.decode_payload(encode(codec, state, messages=messages), KEY)

    assert same(restored.state, state)
    assert same(restored.messages, messages)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param((1, 2), id="tuple"),
        pytest.param(uuid.UUID(int=7), id="uuid"),
        pytest.param(dt.date(2024, 1, 2), id="date"),
        pytest.param(True, id="bool"),
        pytest.param(b"\x00", id="bytes"),
    ],
)
@pytest.mark.parametrize(
    "place",
    [
        pytest.param(lambda v: {"a": [{"b": [v]}]}, id="deep-value"),
        pytest.param(lambda v: {"a": [{v: 1}]}, id="key-among-none"),
        pytest.param(lambda v: {"a": {"s": 1, v: 2}}, id="key-after-str-keys"),
        pytest.param(lambda v: {"a": {1: 1, v: 2}}, id="key-after-int-keys"),
        # The __dict__ of a live object: its values may live in the object (a split table;
        # on CPython 3.13 kept inline, and gc.get_referents of the dict does not visit them).
        pytest.param(lambda v: {"a": vars(Holder(v))}, id="instance-dict-value"),
        pytest.param(lambda v: vars(Holder([v])), id="instance-dict-as-state"),
    ],
)
def test_values_msgpack_would_change_keep_their_type_in_any_position(
    value: Any, place: Any
) -> None:
    state = place(value)

    assert same(round_trip(Codec(), state), state)


def test_a_msgpack_ext_in_the_state_is_refused_not_stored() -> None:
    # msgspec would write it as is, and restore would read it as one of the codec's own
    # extensions (here a malformed UUID): a checkpoint nobody could restore.
    with pytest.raises(SerializationError) as caught:
        encode(Codec(), {"a": [msgspec.msgpack.Ext(1, b"x")]})

    assert caught.value.path == "state['a'][0]"


class Color(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Box:
    size: int


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(dt.datetime(2024, 1, 2, 3, 4, 5), id="naive-datetime"),
        pytest.param(dt.date(2024, 1, 2), id="date"),
        pytest.param(decimal.Decimal("1.10"), id="decimal"),
        pytest.param(Color.RED, id="enum"),
        pytest.param(Box(3), id="dataclass"),
    ],
)
def test_values_outside_the_supported_types_round_trip_or_are_refused(value: Any) -> None:
    # Restored state equals what was stored, or the value raises SerializationError;
    # never silently comes back as something else (a str, a dict).
    codec = Codec()
    refused: SerializationError | None = None
    try:
        restored = round_trip(codec, {"value": value})
    except SerializationError as exc:
        refused = exc

    if refused is not None:
        assert refused.path == "state['value']"
        return
    assert restored["value"] == value
    assert type(restored["value"]) is type(value)


# -- serialization errors -----------------------------------------------------------------------


class Opaque:
    """A type no codec knows."""


@pytest.mark.parametrize(
    ("state", "path"),
    [
        pytest.param({"a": Opaque()}, "state['a']", id="top-level"),
        pytest.param({"a": {"b": {"c": Opaque()}}}, "state['a']['b']['c']", id="nested-dict"),
        pytest.param({"a": [0, 1, [2, Opaque()]]}, "state['a'][2][1]", id="nested-list"),
        pytest.param({"a": (0, (Opaque(),))}, "state['a'][1][0]", id="nested-tuple"),
        pytest.param({"a": {frozenset({Opaque()})}}, "state['a'][0][0]", id="set"),
        pytest.param({1: {2: Opaque()}}, "state[1][2]", id="int-keys"),
        pytest.param({"n": 2**64}, "state['n']", id="int-too-large"),
        pytest.param({"n": [-(2**63) - 1]}, "state['n'][0]", id="int-too-small"),
        pytest.param(
            {"tools": [0, 1, 2, {"client": Opaque()}]},
            "state['tools'][3]['client']",
            id="spec-example",
        ),
    ],
)
def test_serialization_error_names_the_path(state: dict[Any, Any], path: str) -> None:
    with pytest.raises(SerializationError) as caught:
        encode(Codec(), state)

    assert caught.value.path == path
    assert path in str(caught.value)


def test_serialization_error_names_an_unsupported_dict_key() -> None:
    with pytest.raises(SerializationError) as caught:
        encode(Codec(), {"a": {Opaque(): 1}})

    assert caught.value.path is not None
    assert caught.value.path.startswith("state['a'] key ")
    assert "Opaque" in caught.value.path


@pytest.mark.parametrize(
    ("part", "path"),
    [
        ("messages", "messages[0]['x']"),
        ("tool_calls", "tool_calls[0]['x']"),
        ("context", "context['x']"),
    ],
)
def test_serialization_error_paths_start_at_the_part(part: str, path: str) -> None:
    value: Any = {"x": Opaque()} if part == "context" else [{"x": Opaque()}]
    with pytest.raises(SerializationError) as caught:
        encode(Codec(), {}, **{part: value})

    assert caught.value.path == path


@pytest.mark.parametrize("refusal", [NotImplementedError, TypeError])
def test_enc_hook_refusing_raises_serialization_error_naming_the_path(
    refusal: type[Exception],
) -> None:
    calls: list[Any] = []

    def enc_hook(obj: Any) -> Any:
        calls.append(obj)
        raise refusal(f"cannot store {type(obj).__name__}")

    with pytest.raises(SerializationError) as caught:
        encode(Codec(enc_hook=enc_hook), {"tools": [{"client": Opaque()}]})

    assert calls
    assert caught.value.path == "state['tools'][0]['client']"
    assert "enc_hook" in str(caught.value)


def test_self_referencing_state_raises_serialization_error() -> None:
    state: dict[str, Any] = {}
    state["me"] = state

    with pytest.raises(SerializationError):
        encode(Codec(), state)


# -- flat states (adapters' own records) ------------------------------------------------------


class _Text(str):
    pass


@pytest.mark.parametrize("state", [
    {"v": b"\x92\xa7msgpack\xc4\x01\x05"},
    {"checkpoint": ["msgpack", b"\x80"], "checkpoint_id": "1ef-2", "checkpoint_ns": ""},
    {"v": b""},
    {},
])
@pytest.mark.parametrize("compress_min_bytes", [None, 16])
def test_a_flat_state_is_stored_as_encode_payload_stores_it(
    state: dict[str, Any], compress_min_bytes: int | None,
) -> None:
    codec = Codec(compress_min_bytes=compress_min_bytes)
    blob = codec.encode_flat(state)

    assert blob == encode(codec, state)
    assert codec.decode_payload(blob, KEY).state == state


def test_a_large_flat_state_is_compressed_like_a_payload() -> None:
    state = {"v": b"the same bytes " * 1000}
    codec = Codec(compress_min_bytes=1024)
    blob = codec.encode_flat(state)

    assert blob[4] == 1
    assert blob == encode(codec, state)


@pytest.mark.parametrize("state", [
    {"v": ("msgpack", b"")},  # a tuple: stored as an extension, not as msgpack's list
    {"v": [_Text("msgpack"), b""]},  # a str subclass: refused, as by encode_payload
    {"v": 7},
    {1: b""},
])
def test_a_state_that_is_not_flat_takes_encode_payloads_way(state: dict[Any, Any]) -> None:
    codec = Codec()
    try:
        expected: bytes | type[Exception] = encode(codec, state)
    except SerializationError:
        expected = SerializationError
    if expected is SerializationError:
        with pytest.raises(SerializationError):
            codec.encode_flat(state)
        return
    assert codec.encode_flat(state) == expected
    assert codec.decode_payload(codec.encode_flat(state), KEY).state == state


def test_a_lone_surrogate_in_a_flat_state_raises_serialization_error() -> None:
    with pytest.raises(SerializationError) as caught:
        Codec().encode_flat({"checkpoint_ns": "\udc80"})

    assert caught.value.path == "state['checkpoint_ns']"


@pytest.mark.parametrize("compress_min_bytes", [None, 100])
@pytest.mark.parametrize("size", [0, 1, 255, 256, 65_535, 65_536, 70_000])
@pytest.mark.parametrize("name", ["v", "x" * 31, "x" * 32, "\u00e9", "\udc80"])
def test_encode_flat_bytes_writes_what_encode_flat_writes(
    compress_min_bytes: int | None, size: int, name: str,
) -> None:
    codec = Codec(compress_min_bytes=compress_min_bytes)
    value = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    try:
        expected: bytes | type[Exception] = codec.encode_flat({name: value})
    except SerializationError:
        expected = SerializationError
    if expected is SerializationError:
        with pytest.raises(SerializationError):
            codec.encode_flat_bytes(name, value)
        return
    assert codec.encode_flat_bytes(name, value) == expected
    assert codec.encode_flat_bytes(name, bytearray(value)) == codec.encode_flat(
        {name: bytearray(value)})


def test_split_array_gives_the_elements_as_bytes() -> None:
    from fastcheckpoint._codec import split_array

    for items in ([], [1, "a"], list(range(20)), list(range(70_000))):
        data = msgspec.msgpack.encode(items)
        found = split_array(data)

        assert found is not None
        count, body = found
        assert type(body) is bytes  # compared by memcmp, not byte by byte as a memoryview
        assert count == len(items)
        assert msgspec.msgpack.decode(data[:len(data) - len(body)] + body) == items
    assert split_array(msgspec.msgpack.encode({"a": 1})) is None
    assert split_array(b"") is None
