"""The shared helpers of fastcheckpoint.stores that stores use for nested items and prefix
scans."""

from __future__ import annotations

from fastcheckpoint.stores import (
    Item,
    nested_prefix,
    nesting_under,
    never_suspends,
    offers_nested_items,
    prefix_end,
    prefix_range,
)
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


def test_the_claim_that_calls_never_suspend_is_not_inherited() -> None:
    """A subclass may await in its methods: it makes the claim again if they do not."""
    assert never_suspends(MemoryStore())
    assert not never_suspends(object())

    class Awaits(MemoryStore):
        pass

    class AwaitsNot(MemoryStore):
        never_suspends = True

    assert not never_suspends(Awaits())
    assert never_suspends(AwaitsNot())
    withdrawn = MemoryStore()
    withdrawn.never_suspends = False  # e.g. a method replaced on the instance
    assert not never_suspends(withdrawn)


def test_the_end_of_a_prefix_bounds_every_key_that_starts_with_it() -> None:
    top = "\U0010ffff"
    assert prefix_end("w/1") == "w/2"
    assert prefix_end("a" + top) == "b"
    assert prefix_end("") is None
    assert prefix_end(top * 2) is None  # no string sorts above every run of U+10FFFF
    keys = sorted(["a", "a" + top, "b", top, top * 2, top * 3 + "x"])
    assert keys[slice(*prefix_range(keys, "a"))] == ["a", "a" + top]
    assert keys[slice(*prefix_range(keys, top * 2))] == [top * 2, top * 3 + "x"]
    assert keys[slice(*prefix_range(keys, ""))] == keys
