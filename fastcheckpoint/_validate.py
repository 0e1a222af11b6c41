"""Validation of the manager's arguments: each returns the value to use, or raises
:class:`ValidationError` saying what is wrong and what to do."""

from __future__ import annotations

import reprlib
from collections.abc import Mapping, Sequence
from typing import Any

from fastcheckpoint import _ids
from fastcheckpoint._codec import json_copy
from fastcheckpoint._model import CheckpointStatus
from fastcheckpoint.errors import SerializationError, ValidationError

__all__ = [
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
    try:
        copied: dict[str, Any] = json_copy(dict(value), "request")
    except SerializationError as exc:
        raise ValidationError(
            f"request must hold JSON values only (dicts with str keys, lists, str, int, float, "
            f"bool, None): {exc}") from exc
    return copied


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
    if isinstance(tags, str) or not isinstance(tags, (list, tuple, set, frozenset)):
        raise ValidationError(f"tags must be a list of str, got {type(tags).__name__}")
    return [text_arg("tags[]", tag) for tag in tags]


def sequence_arg(name: str, value: object) -> int:
    """A checkpoint sequence: an int from 0 to the largest a run can reach."""
    if isinstance(value, bool) or not isinstance(value, int) or not (
        0 <= value <= _ids.MAX_SEQUENCE
    ):
        raise ValidationError(
            f"{name} must be an int from 0 to {_ids.MAX_SEQUENCE}, got {shown(value)}")
    return value


def lookup_id(value: object, what: str = "checkpoint_id") -> tuple[str, str, int] | None:
    """Where a checkpoint id points, or ``None`` for a string that is not one of our ids
    (not found, as FastAgentic's docs expect); anything but a ``str`` is a mistake."""
    if not isinstance(value, str):
        raise ValidationError(f"{what} must be a str, got {type(value).__name__}")
    return _ids.parse_checkpoint_id(value)
