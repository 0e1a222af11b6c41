"""Exact round trips or a SerializationError naming the path: never a silent type change.

Types match exactly: an IntEnum is not an int, an OrderedDict not a dict, a datetime at +02:00
not one in UTC. Checked per type, then by property over any mix, on the fast path (msgspec's
own bytes, proved lossless by the screen) and on the slow path (the Python walk).
"""

from __future__ import annotations

import collections
import datetime as dt
import decimal
import enum
import fractions
import math
import uuid
from typing import Any, NamedTuple

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fastcheckpoint import SerializationError
from fastcheckpoint._codec import Codec, Payload, _lossless_only

KEY = "runs/abc/c/00000000000000000007"
SLOW = {"tool_calls": [()]}
"""A tuple anywhere sends the whole payload through the Python walk."""


def encode(codec: Codec, state: dict[Any, Any], **parts: Any) -> bytes:
    return codec.encode_payload(
        state, parts.get("messages", []), parts.get("tool_calls", []), parts.get("context", {}))


def round_trip(codec: Codec, state: dict[Any, Any], **parts: Any) -> dict[Any, Any]:
    return codec.decode_payload(encode(codec, state, **parts), KEY).state


def same(first: Any, second: Any) -> bool:
    """Equal, of the same type at every level, and alike where ``==`` does not look: a float's
    sign and NaN, a Decimal's digits, a datetime's zone, zone name and fold."""
    if type(first) is not type(second):
        return False
    if isinstance(first, dict):
        return list(map(type, first)) == list(map(type, second)) and all(
            same(k1, k2) and same(first[k1], second[k2])
            for k1, k2 in zip(first, second, strict=True))
    if isinstance(first, (list, tuple)):
        return len(first) == len(second) and all(map(same, first, second))
    if isinstance(first, (set, frozenset)):
        return len(first) == len(second) and all(
            any(same(a, b) for b in second) for a in first)
    if isinstance(first, float):
        return (math.isnan(first) and math.isnan(second)) or (
            first == second and math.copysign(1, first) == math.copysign(1, second))
    if isinstance(first, decimal.Decimal):
        return str(first) == str(second)
    if isinstance(first, (dt.datetime, dt.time)):
        return (first == second and first.fold == second.fold
                and type(first.tzinfo) is type(second.tzinfo)
                and first.utcoffset() == second.utcoffset()
                and first.tzname() == second.tzname())
    return bool(first == second)


# -- type by type -------------------------------------------------------------------------------

PLUS_2 = dt.timezone(dt.timedelta(hours=2))
EXACT = [
    pytest.param(dt.datetime(2024, 1, 1, 12, tzinfo=PLUS_2), id="datetime-at-plus-2"),
    pytest.param(dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone(-dt.timedelta(hours=7), "PDT")),
                 id="datetime-named-offset"),
    pytest.param(dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone(dt.timedelta(
        hours=5, minutes=30, seconds=15, microseconds=7))), id="datetime-odd-offset"),
    pytest.param(dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone.utc), id="datetime-utc"),
    pytest.param(dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone.utc, fold=1), id="utc-fold"),
    pytest.param(dt.datetime(2024, 11, 3, 1, 30, fold=1), id="naive-datetime-fold"),
    pytest.param(dt.datetime(2024, 1, 1, 12), id="naive-datetime"),
    pytest.param(dt.time(12, 30, tzinfo=PLUS_2), id="time-at-plus-2"),
    pytest.param(dt.time(1, 30, fold=1), id="time-fold"),
    pytest.param(dt.time(1, 30), id="time"),
    pytest.param(dt.date(2024, 2, 29), id="date"),
    pytest.param(dt.timedelta(days=-1, microseconds=3), id="timedelta"),
    pytest.param(decimal.Decimal("1.10"), id="decimal"),
    pytest.param(decimal.Decimal("-sNaN12"), id="decimal-signalling-nan"),
    pytest.param(uuid.UUID(int=7), id="uuid"),
    pytest.param((1, (2, "3")), id="tuple"),
    pytest.param({1, "a"}, id="set"),
    pytest.param(frozenset({(1, 2)}), id="frozenset"),
    pytest.param(bytearray(b"\x00\xff"), id="bytearray"),
    pytest.param(b"\x00\xff", id="bytes"),
    pytest.param(float("nan"), id="nan"),
    pytest.param(-0.0, id="negative-zero"),
    pytest.param(True, id="bool"),
    pytest.param({1: "a", "b": 2, None: 3, 1.5: 4, b"k": 5}, id="dict-with-mixed-keys"),
]


@pytest.mark.parametrize("parts", [pytest.param({}, id="fast"), pytest.param(SLOW, id="slow")])
@pytest.mark.parametrize("value", EXACT)
def test_supported_types_round_trip_exactly(value: Any, parts: dict[str, Any]) -> None:
    state = {"value": value, "in_list": [value]}

    assert same(round_trip(Codec(), state, **parts), state)


class Mode(enum.IntEnum):
    FAST = 1


class Color(str, enum.Enum):
    RED = "red"


class Plain(enum.Enum):
    ONE = 1


class Perm(enum.IntFlag):
    READ = 4


class Point(NamedTuple):
    x: int
    y: int


Pair = collections.namedtuple("Pair", ["a", "b"])  # the untyped kind, beside the typed Point


class Text(str):
    pass


class Number(int):
    pass


class Real(float):
    pass


class Blob(bytes):
    pass


class Mapping(dict[str, Any]):
    pass


class Items(list[Any]):
    pass


class Moment(dt.datetime):
    pass


class Amount(decimal.Decimal):
    pass


class Ident(uuid.UUID):
    pass


class Berlin(dt.tzinfo):
    """A zone with rules of its own (as ZoneInfo, pytz and dateutil zones are)."""

    def utcoffset(self, moment: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(hours=1)

    def dst(self, moment: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(0)

    def tzname(self, moment: dt.datetime | None) -> str:
        return "CET"

    def __repr__(self) -> str:
        return "Berlin()"


class Zulu(Berlin):
    def utcoffset(self, moment: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(0)


BERLIN = Berlin()
REFUSED = [
    pytest.param(Mode.FAST, "Enum", id="IntEnum"),
    pytest.param(Color.RED, "Enum", id="str-Enum"),
    pytest.param(Plain.ONE, "Enum", id="Enum"),
    pytest.param(Perm.READ, "Enum", id="IntFlag"),
    pytest.param(collections.OrderedDict(a=1), "subclass of dict", id="OrderedDict"),
    pytest.param(collections.defaultdict(list, a=[1]), "subclass of dict", id="defaultdict"),
    pytest.param(collections.Counter("ab"), "subclass of dict", id="Counter"),
    pytest.param(Point(1, 2), "namedtuple", id="namedtuple"),
    pytest.param(Pair(1, 2), "namedtuple", id="collections-namedtuple"),
    pytest.param(Text("x"), "subclass of str", id="str-subclass"),
    pytest.param(Number(3), "subclass of int", id="int-subclass"),
    pytest.param(Real(1.5), "subclass of float", id="float-subclass"),
    pytest.param(Blob(b"x"), "subclass of bytes", id="bytes-subclass"),
    pytest.param(Mapping(a=1), "subclass of dict", id="dict-subclass"),
    pytest.param(Items([1]), "subclass of list", id="list-subclass"),
    pytest.param(Moment(2024, 1, 1), "subclass of datetime", id="datetime-subclass"),
    pytest.param(Amount("1.5"), "subclass of Decimal", id="Decimal-subclass"),
    pytest.param(Ident(int=1), "subclass of UUID", id="UUID-subclass"),
    pytest.param(dt.datetime(2024, 7, 1, 12, tzinfo=BERLIN), "zone", id="datetime-zone-rules"),
    pytest.param(dt.datetime(2024, 7, 1, tzinfo=Zulu()), "zone", id="datetime-other-utc-zone"),
    pytest.param(dt.time(12, tzinfo=BERLIN), "zone", id="time-zone-rules"),
    pytest.param(memoryview(b"x"), "bytes(value)", id="memoryview"),
    pytest.param(collections.deque([1]), "not supported", id="deque"),
    pytest.param(1j, "not supported", id="complex"),
    pytest.param(fractions.Fraction(1, 3), "not supported", id="Fraction"),
    pytest.param(msgspec.msgpack.Ext(1, b"x"), "not supported", id="msgpack-Ext"),
]


@pytest.mark.parametrize("parts", [pytest.param({}, id="fast"), pytest.param(SLOW, id="slow")])
@pytest.mark.parametrize(("value", "hint"), REFUSED)
def test_other_types_are_refused_naming_the_path_with_a_hint(
    value: Any, hint: str, parts: dict[str, Any]
) -> None:
    with pytest.raises(SerializationError) as caught:
        encode(Codec(), {"ok": [1, "two"], "mode": value}, **parts)

    assert caught.value.path == "state['mode']"
    assert "state['mode']" in str(caught.value)
    assert hint in str(caught.value)
    assert "enc_hook" in str(caught.value)


@pytest.mark.parametrize(("value", "hint"), [p for p in REFUSED if p.id in {
    "IntEnum", "str-Enum", "namedtuple", "str-subclass", "datetime-zone-rules"}])
def test_refused_values_as_dict_keys_are_refused_naming_the_key(value: Any, hint: str) -> None:
    with pytest.raises(SerializationError) as caught:
        encode(Codec(), {"by_mode": {value: 1}})

    assert caught.value.path == f"state['by_mode'] key {value!r}"
    assert hint in str(caught.value)


def test_an_enc_hook_makes_a_refused_type_round_trip() -> None:
    def enc_hook(obj: Any) -> Any:
        if isinstance(obj, enum.Enum):
            return obj.value
        if isinstance(obj, collections.OrderedDict):
            return list(obj.items())
        raise NotImplementedError

    def dec_hook(type_name: str, value: Any) -> Any:
        if type_name.endswith(".Mode"):
            return Mode(value)
        if type_name == "collections.OrderedDict":
            return collections.OrderedDict(value)
        raise NotImplementedError(type_name)

    state = {"mode": Mode.FAST, "order": collections.OrderedDict(b=1, a=2), "by": {Mode.FAST: 1}}

    assert same(round_trip(Codec(enc_hook=enc_hook, dec_hook=dec_hook), state), state)


def test_an_enc_hook_returning_the_same_type_is_refused() -> None:
    with pytest.raises(SerializationError, match="enc_hook returned") as caught:
        encode(Codec(enc_hook=lambda obj: Mode(1)), {"mode": Mode.FAST})

    assert caught.value.path == "state['mode']"


def test_an_unhashable_enc_hook_value_as_a_key_without_dec_hook_is_refused() -> None:
    # It would come back as a list, which cannot be a dict key: refused at create, not
    # accepted and then unrestorable.
    with pytest.raises(SerializationError, match="unhashable") as caught:
        encode(Codec(enc_hook=lambda obj: [obj.x, obj.y]), {"at": {object.__new__(Pos): 1}})

    assert caught.value.path is not None
    assert caught.value.path.startswith("state['at'] key ")


class Pos:
    x = 1
    y = 2


def test_the_parts_themselves_come_back_as_dict_and_list() -> None:
    # restore returns state and context as dicts, messages and tool_calls as lists, whatever
    # mapping or sequence was passed; what they hold keeps its type.
    codec = Codec()
    blob = codec.encode_payload(collections.OrderedDict(a=Mode.FAST.value), [], [], {})
    payload = codec.decode_payload(blob, KEY)

    assert type(payload.state) is dict
    assert payload.state == {"a": 1}


# -- any mix, by property -----------------------------------------------------------------------

_int64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
_offsets = st.timedeltas(min_value=dt.timedelta(hours=-23, minutes=-59),
                         max_value=dt.timedelta(hours=23, minutes=59))
_fixed_zones = st.one_of(
    st.just(dt.timezone.utc),
    st.builds(dt.timezone, _offsets),
    st.builds(dt.timezone, _offsets, st.text(min_size=1, max_size=5)),
)
_datetimes = st.builds(
    lambda moment, fold: moment.replace(fold=fold),
    st.datetimes(timezones=st.one_of(st.none(), _fixed_zones)), st.integers(0, 1))
_times = st.builds(
    lambda moment, fold: moment.replace(fold=fold),
    st.times(timezones=st.one_of(st.none(), _fixed_zones)), st.integers(0, 1))
_hashable = st.one_of(
    st.none(), st.booleans(), _int64, st.floats(allow_nan=False), st.text(max_size=5),
    st.binary(max_size=4), st.uuids(), _datetimes, _times, st.dates(), st.timedeltas(),
    st.decimals(allow_nan=False), st.tuples(st.text(max_size=3), _int64),
    st.frozensets(_int64, max_size=2),
)
_leaves = st.one_of(
    _hashable, st.floats(), st.decimals(), st.binary(max_size=4).map(bytearray))
_supported = st.recursive(
    _leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(_hashable, children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.sets(_hashable, max_size=3),
        st.frozensets(_hashable, max_size=3),
    ),
    max_leaves=12,
)
_plain_leaves = st.one_of(
    st.none(), st.booleans(), _int64, st.floats(), st.text(max_size=5), st.binary(max_size=4),
    st.datetimes(timezones=st.just(dt.timezone.utc)).map(lambda moment: moment.replace(fold=0)))
_plain = st.recursive(
    _plain_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.one_of(st.text(max_size=5), _int64), children, max_size=3)),
    max_leaves=12,
)


_MICROSECOND_AHEAD = dt.timezone(dt.timedelta(microseconds=1))


@settings(max_examples=200, deadline=None)
@given(state=st.dictionaries(_hashable, _supported, max_size=3),
       messages=st.lists(_supported, max_size=2), slow=st.booleans())
# Offsets with a fraction of a second: CPython 3.11's fromisoformat reads +00:00:00.000001 as
# UTC, so the codec stores such offsets as numbers.
@example(state={dt.datetime(2000, 1, 1, tzinfo=_MICROSECOND_AHEAD): None},
         messages=[dt.time(1, 2, tzinfo=dt.timezone(-dt.timedelta(microseconds=1), "odd"))],
         slow=False)
def test_any_mix_of_supported_values_round_trips_with_exact_types(
    state: dict[Any, Any], messages: list[Any], slow: bool
) -> None:
    codec = Codec()
    parts = SLOW if slow else {}

    restored = codec.decode_payload(encode(codec, state, messages=messages, **parts), KEY)

    assert same(restored.state, state)
    assert same(restored.messages, messages)


@settings(max_examples=100, deadline=None)
@given(state=st.dictionaries(st.text(max_size=5), _plain, max_size=4),
       messages=st.lists(_plain, max_size=3))
def test_plain_content_takes_the_fast_path_and_round_trips(
    state: dict[str, Any], messages: list[Any]
) -> None:
    codec = Codec()
    blob = encode(codec, state, messages=messages)

    assert _lossless_only(Payload(state, messages, [], {}))
    assert blob[9:] == msgspec.msgpack.encode(Payload(state, messages, [], {}))
    restored = codec.decode_payload(blob, KEY)
    assert same(restored.state, state)
    assert same(restored.messages, messages)


_refused = st.one_of(
    st.sampled_from([Mode.FAST, Color.RED, Plain.ONE, Perm.READ, Point(1, 2), Text("t"),
                     Number(2), Real(0.5), Blob(b"b"), Moment(2024, 1, 1), Amount(1),
                     Ident(int=3), memoryview(b"m"), 2j, fractions.Fraction(1, 2)]),
    st.builds(collections.OrderedDict, st.dictionaries(st.text(max_size=3), _int64, max_size=2)),
    st.builds(lambda d: collections.defaultdict(list, d),
              st.dictionaries(st.text(max_size=3), _int64, max_size=2)),
    st.builds(Items, st.lists(_int64, max_size=2)),
    st.builds(Mapping, st.dictionaries(st.text(max_size=3), _int64, max_size=2)),
    st.datetimes(timezones=st.sampled_from([BERLIN, Zulu()])),
)


def _around(planted: st.SearchStrategy[tuple[Any, str]]) -> st.SearchStrategy[tuple[Any, str]]:
    """Puts a planted ``(value, path)`` inside a list, dict or tuple of supported values."""
    siblings = st.lists(_leaves, max_size=2)

    def in_list(inner: tuple[Any, str], before: list[Any], after: list[Any]) -> tuple[Any, str]:
        return [*before, inner[0], *after], f"[{len(before)}]{inner[1]}"

    def in_tuple(inner: tuple[Any, str], before: list[Any]) -> tuple[Any, str]:
        return (*before, inner[0]), f"[{len(before)}]{inner[1]}"

    def in_dict(inner: tuple[Any, str], others: dict[str, Any], key: str) -> tuple[Any, str]:
        return {**others, key: inner[0]}, f"[{key!r}]{inner[1]}"

    return st.one_of(
        st.builds(in_list, planted, siblings, siblings),
        st.builds(in_tuple, planted, siblings),
        st.builds(in_dict, planted, st.dictionaries(st.text(max_size=3), _leaves, max_size=2),
                  st.text(max_size=3)),
    )


_planted = st.recursive(st.tuples(_refused, st.just("")), _around, max_leaves=6)


@settings(max_examples=200, deadline=None)
@given(planted=_planted, others=st.dictionaries(st.text(max_size=3), _plain, max_size=2),
       slow=st.booleans())
def test_any_refused_value_anywhere_is_refused_naming_its_path(
    planted: tuple[Any, str], others: dict[str, Any], slow: bool
) -> None:
    value, path = planted
    state = {**others, "planted": value}

    with pytest.raises(SerializationError) as caught:
        encode(Codec(), state, **(SLOW if slow else {}))

    assert caught.value.path == f"state['planted']{path}"
