"""The shared helpers of fastcheckpoint.stores that stores use for nested items."""

from __future__ import annotations

from fastcheckpoint.stores import Item, nested_prefix, nesting_under, offers_nested_items
from fastcheckpoint.stores.memory import MemoryStore


def _item(key: str) -> Item:
    return Item(key=key, value=b"")


def test_nesting_under_finds_the_refs_items_are_nested_under() -> None:
    refs = ("m/a/1", "t/a/1", "b/x", "m/a")
    items = [_item("m/a/1/0000000005.ab"), _item("b/x"), _item("b/xy/0"), _item("m/a/1/z")]
    assert nesting_under(refs, items) == ("m/a/1", "m/a")
    assert nesting_under(refs, [_item("t/a/10/0")]) == ()
    assert nesting_under((), items) == ()


def test_nested_prefix_and_the_capability_check() -> None:
    assert nested_prefix("m/a") == "m/a/"
    assert offers_nested_items(MemoryStore())

    class Wrapped(MemoryStore):
        nested_items = False

    assert not offers_nested_items(Wrapped())
    assert not offers_nested_items(object())
