"""DynamoDB attribute values and expression placeholders: the few helpers every request of
the DynamoDB store is built from (no I/O here)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "Names",
    "binary",
    "integer",
    "n",
    "number",
    "s",
    "strings",
    "text",
    "text_list",
]


def s(value: str) -> dict[str, Any]:
    return {"S": value}


def n(value: float) -> dict[str, Any]:
    # repr is the shortest exact decimal of a float; DynamoDB keeps 38 significant digits.
    return {"N": repr(float(value)) if isinstance(value, float) else str(value)}


def b(value: bytes) -> dict[str, Any]:
    return {"B": value}


def strings(values: Sequence[str]) -> dict[str, Any]:
    """A list of strings, in order (labels, refs): ``L`` keeps order and repeats."""
    return {"L": [s(value) for value in values]}


def number(item: Mapping[str, Any], name: str) -> float | None:
    value = item.get(name)
    return None if value is None else float(value["N"])


def integer(item: Mapping[str, Any], name: str, default: int = 0) -> int:
    value = item.get(name)
    return default if value is None else int(value["N"])


def text(item: Mapping[str, Any], name: str, default: str = "") -> str:
    value = item.get(name)
    return default if value is None else str(value["S"])


def binary(item: Mapping[str, Any], name: str) -> bytes:
    value = item.get(name)
    return b"" if value is None else bytes(value["B"])


def text_list(item: Mapping[str, Any], name: str) -> tuple[str, ...]:
    """A list written by :func:`strings`; raises on one of another shape."""
    value = item.get(name)
    if value is None:
        return ()
    return tuple(str(entry["S"]) for entry in value["L"])


class Names:
    """Placeholders for attribute names (``status``, ``data``, ``ttl`` are reserved words)."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}
        self.values: dict[str, Any] = {}

    def __call__(self, attribute: str) -> str:
        for known, name in self.names.items():
            if name == attribute:
                return known
        placeholder = f"#a{len(self.names)}"
        self.names[placeholder] = attribute
        return placeholder

    def value(self, value: dict[str, Any]) -> str:
        placeholder = f":v{len(self.values)}"
        self.values[placeholder] = value
        return placeholder

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if self.names:
            params["ExpressionAttributeNames"] = dict(self.names)
        if self.values:
            params["ExpressionAttributeValues"] = dict(self.values)
        return params
