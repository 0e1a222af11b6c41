"""Validation of the manager's arguments: each returns the value to use, or raises
:class:`ValidationError` saying what is wrong and what to do."""

from __future__ import annotations

import reprlib
from collections.abc import Mapping, Sequence
from typing import Any

from fastcheckpoint import _ids
from fastcheckpoint._codec import MAX_DEPTH, json_copy
from fastcheckpoint._model import CheckpointStatus
from fastcheckpoint.errors import SerializationError, ValidationError

__all__ = [
    "count_arg",
    "list_arg",
    "lookup_id",
    "mapping_arg",
    "request_arg",
    "shown",
    "status_arg",
    "tags_arg",
    "text_arg",
]


_SHOWN = reprlib.Repr()
_SHOWN.maxlevel = 3
_SHOWN.maxstring = 60
_SHOWN.maxother = 60
_SHOWN.maxlong = 40


def shown(value: object) -> str:
    """A bad argument as an error message shows it: a ``repr`` cut short, and never failing,
    so the message cannot replace the error it explains (a list nested deeper than ``repr``
    recurses, an int too long to print, a ``__repr__`` that raises)."""
    try:
        return _SHOWN.repr(value)
    except Exception:  # only the value's display is lost, not the error it explains
        return f"a value of type {type(value).__name__}"


def status_arg(value: CheckpointStatus | str) -> CheckpointStatus:
    names = ", ".join(status.value for status in CheckpointStatus)
    if not isinstance(value, str):
        raise ValidationError(f"status must be a str, got {shown(value)}; use one of {names}")
    try:
        return CheckpointStatus(_ids.plain_str(value))
    except ValueError as exc:
        raise ValidationError(f"unknown status {shown(value)}; use one of {names}") from exc


def mapping_arg(name: str, value: object) -> dict[Any, Any]:
    if value is None and name != "state":
        return {}
    if isinstance(value, dict):
        return value
    if isinstance(value, Mapping):
        return dict(value)
    raise ValidationError(
        f"{name} must be a dict, got {type(value).__name__}; convert it first (e.g. "
        "dataclasses.asdict(obj), model.model_dump(), msgspec.structs.asdict(obj))")


def request_arg(value: object) -> dict[str, Any]:
    """An approval request: a copy of a dict of JSON values, so that the run details, the
    audit export and whoever reads the queue see exactly what the caller asked."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValidationError(f"request must be a dict, got {type(value).__name__}")
    copied: dict[str, Any]
    try:
        copied = json_copy(dict(value), "request")
    except SerializationError as exc:
        refused = exc
    else:
        return copied
    # Values that JSON writes as the same text are taken as that JSON value: a str enum or an
    # IntEnum (a pydantic model_dump() keeps them), an OrderedDict, a numpy integer.
    try:
        copied = json_copy(_plain_json(dict(value), 0), "request")
    except SerializationError as exc:
        refused = exc
    except _NotPlain:
        pass  # the first refusal says why
    else:
        return copied
    raise ValidationError(
        f"request must hold JSON values only (dicts with str keys, lists, str, int, float, "
        f"bool, None): {refused}") from refused


class _NotPlain(Exception):
    """Raised by :func:`_plain_json` for a value it cannot copy as it means: nested deeper
    than any request :func:`json_copy` takes, or a dict whose keys would merge."""


_PLAIN_DEPTH = MAX_DEPTH + 1
"""Deeper than any request :func:`json_copy` takes: the copy stops there (at once, so a dict
holding itself twice costs no more than one path down)."""


def _plain_json(value: object, depth: int) -> object:
    """``value`` with what JSON writes as it writes a JSON value replaced by that value:
    ``str``, ``int``, ``float``, ``dict`` and ``list`` subclasses by their plain types and
    numpy-style integers by ``int``. Only the base types' own methods run (never a subclass's
    ``__str__``, ``__iter__`` or ``items``); anything else is left for :func:`json_copy` to
    refuse."""
    if depth > _PLAIN_DEPTH:
        raise _NotPlain
    if value is None or type(value) is bool:
        return value
    if isinstance(value, str):
        return _ids.plain_str(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        copied = {_plain_json(key, depth + 1): _plain_json(item, depth + 1)
                  for key, item in dict.items(value)}
        if len(copied) != dict.__len__(value):  # keys of a str subclass with its own __eq__
            raise _NotPlain
        return copied
    if isinstance(value, list):
        return [_plain_json(item, depth + 1) for item in list.__iter__(value)]
    whole = _ids.plain_int(value)
    return value if whole is None else whole


def count_arg(name: str, value: object, minimum: int, why: str = "") -> int:
    """A count (a ``limit``, a page size): an integer of at least ``minimum``, as a plain
    ``int``. ``IntEnum`` members and numpy integers are taken for their value; a ``bool`` is
    no count."""
    whole = _ids.plain_int(value)
    if whole is None or whole < minimum:
        kind = "non-negative" if minimum == 0 else "positive"
        raise ValidationError(f"{name} must be a {kind} integer{why}, got {shown(value)}")
    return whole


def list_arg(name: str, value: object) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list):
        return value
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValidationError(f"{name} must be a list, got {type(value).__name__}")
    return list(value)


def text_arg(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{name} must be a str, got {type(value).__name__}")
    value = _ids.plain_str(value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValidationError(f"{name} must be valid unicode (it has a lone surrogate)") from exc
    return value


def tags_arg(tags: object) -> list[str]:
    if tags is None:
        return []
    if isinstance(tags, (str, bytes, bytearray)) or not isinstance(
            tags, (Sequence, set, frozenset)):
        raise ValidationError(f"tags must be a list of str, got {type(tags).__name__}")
    return [text_arg("tags[]", tag) for tag in tags]


def sequence_arg(name: str, value: object) -> int:
    """A checkpoint sequence: an int from 0 to the largest a run can reach, as a plain
    ``int`` (an ``IntEnum`` member or a numpy integer is taken for its value)."""
    whole = _ids.plain_int(value)
    if whole is None or not 0 <= whole <= _ids.MAX_SEQUENCE:
        raise ValidationError(
            f"{name} must be an int from 0 to {_ids.MAX_SEQUENCE}, got {shown(value)}")
    return whole


def lookup_id(value: object, what: str = "checkpoint_id") -> tuple[str, str, int] | None:
    """Where a checkpoint id points, or ``None`` for a string that is not one of our ids
    (not found, as FastAgentic's docs expect); anything but a ``str`` is a mistake."""
    if not isinstance(value, str):
        raise ValidationError(f"{what} must be a str, got {type(value).__name__}")
    return _ids.parse_checkpoint_id(value)
