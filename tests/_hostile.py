"""Building blocks of the hostile values the surface fuzzes pass to public calls
(tests/test_public_surface_fuzz.py, tests/integrations/test_adapters_surface_fuzz.py):
what the hostile objects raise, and containers too deep or looped for naive code."""

from __future__ import annotations

from typing import Any

DEEP = 10**5
"""Levels of :func:`nested_list` and :func:`nested_dict` in the pools: beyond any recursion
limit."""


class Boom(Exception):
    """What the hostile objects raise: a leak of it is our code calling into them."""


class BadStr(str):
    """A ``str`` that cannot be compared or hashed."""

    def __eq__(self, other: object) -> bool:
        raise Boom("__eq__")

    def __ne__(self, other: object) -> bool:
        raise Boom("__ne__")

    def __hash__(self) -> int:
        raise Boom("__hash__")


def nested_list(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def nested_dict(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def looped_list() -> list[Any]:
    """A list that holds itself."""
    value: list[Any] = [1]
    value.append(value)
    return value


def looped_dict() -> dict[str, Any]:
    """A dict that holds itself."""
    value: dict[str, Any] = {"a": 1}
    value["self"] = value
    return value
