"""json_copy: a deep copy of JSON-only values (pause requests), or an error naming the path."""

from __future__ import annotations

import datetime as dt
import math
import uuid
from collections import OrderedDict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastcheckpoint import SerializationError
from fastcheckpoint._codec import MAX_DEPTH, json_copy


def same(first: Any, second: Any) -> bool:
    """Equal and of the same type at every level (``==`` takes ``True`` for ``1``)."""
    if type(first) is not type(second):
        return False
    if isinstance(first, dict):
        return list(first) == list(second) and all(same(first[k], second[k]) for k in first)
    if isinstance(first, list):
        return len(first) == len(second) and all(map(same, first, second))
    return bool(first == second)


class Label(str):
    pass


def test_a_json_value_is_copied_deeply_with_its_types() -> None:
    request: dict[str, Any] = {
        "items": [1, 2.5, "three", True, None, {"nested": [[], {}]}], "n": 2**64 - 1}

    copied = json_copy(request, "request")

    assert same(copied, request)
    copied["items"][5]["nested"].append("changed")
    assert request["items"][5]["nested"] == [[], {}]  # the copy shares nothing


@pytest.mark.parametrize(
    ("request_value", "path", "what"),
    [
        pytest.param({"items": [0, 1, (2, 3)]}, "request['items'][2]", "tuple", id="tuple"),
        pytest.param({"id": uuid.UUID(int=1)}, "request['id']", "UUID", id="uuid"),
        pytest.param({"at": dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)}, "request['at']",
                     "datetime", id="datetime"),
        pytest.param({"raw": [b"x"]}, "request['raw'][0]", "bytes", id="bytes"),
        pytest.param({"by": {1: "a"}}, "request['by'] key 1", "JSON keys are str", id="int-key"),
        pytest.param({"x": math.nan}, "request['x']", "not finite", id="nan"),
        pytest.param({"x": [math.inf]}, "request['x'][0]", "not finite", id="infinity"),
        pytest.param({"d": OrderedDict(a=1)}, "request['d']", "OrderedDict", id="dict-subclass"),
        pytest.param({"s": Label("x")}, "request['s']", "Label", id="str-subclass"),
        pytest.param({Label("k"): 1}, "request key 'k'", "JSON keys are str", id="key-subclass"),
        pytest.param({"s": {1, 2}}, "request['s']", "set", id="set"),
        pytest.param({"n": 2**64}, "request['n']", "64-bit", id="int-too-large"),
        pytest.param({"t": "\ud800"}, "request['t']", "surrogate", id="lone-surrogate"),
        pytest.param({"\ud800": 1}, "request key '\\ud800'", "surrogate", id="surrogate-key"),
    ],
)
def test_a_value_that_is_not_json_is_refused_naming_its_path(
    request_value: dict[Any, Any], path: str, what: str
) -> None:
    with pytest.raises(SerializationError) as caught:
        json_copy(request_value, "request")

    assert caught.value.path == path
    assert path in str(caught.value)
    assert what in str(caught.value)


def test_the_root_itself_is_named_when_it_is_not_json() -> None:
    with pytest.raises(SerializationError) as caught:
        json_copy((1, 2), "request")

    assert caught.value.path == "request"


def test_nesting_past_the_depth_limit_is_refused() -> None:
    value: Any = 1
    for _ in range(MAX_DEPTH):
        value = [value]
    assert json_copy({"a": value[0]}, "request") == {"a": value[0]}

    with pytest.raises(SerializationError) as caught:
        json_copy({"a": value}, "request")

    assert caught.value.path == "request['a']" + "[0]" * MAX_DEPTH


_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=5)),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.text(max_size=5), children, max_size=3)),
    max_leaves=15,
)


@settings(max_examples=100, deadline=None)
@given(value=_json)
def test_any_json_value_is_copied_exactly(value: Any) -> None:
    assert same(json_copy(value, "request"), value)
