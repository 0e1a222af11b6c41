"""The store contract: a run's sorted item space."""

from __future__ import annotations

import functools
import math

import pytest

from fastcheckpoint.errors import ConflictError, ValidationError
from fastcheckpoint.stores._base import CheckpointStore, Item
from fastcheckpoint.testing._builders import T0, key_of, make_item, make_run
from fastcheckpoint.testing._contract import (
    ContractBase,
    _append,
    _append_many,
    _refuses_not_run_keys,
)

__all__ = ["ItemsContract"]


class ItemsContract(ContractBase):
    """Items: ``put_items``, ``get_items``, ``scan_items`` and ``delete_items``.

    Keys sort in code point order; scans go by prefix, after a key, in both directions, up to a
    limit; ``create_only`` refuses a live key and then writes nothing; expired items are hidden;
    items outlive appends and each run has its own.
    """

    # -- items --------------------------------------------------------------------------------

    async def test_put_and_get_items(self, store: CheckpointStore) -> None:
        seed = make_run("items")
        key = key_of(seed)
        await _append(store, seed, 0)
        await store.put_items(key, [make_item("a", b"1"), make_item("b", b"2")], now=T0)
        await store.put_items(key, [make_item("b", b"22"), make_item("c", b"")], now=T0)

        assert await store.get_items(key, ["a", "b", "c", "missing"], now=T0) == {
            "a": b"1",
            "b": b"22",
            "c": b"",
        }
        assert await store.get_items(key, [], now=T0) == {}
        assert await store.get_items(key_of(make_run("other")), ["a"], now=T0) == {}

    async def test_scan_items_in_code_point_order(self, store: CheckpointStore) -> None:
        seed = make_run("ordered")
        key = key_of(seed)
        await _append(store, seed, 0)
        keys = ["b", "a", "B", "ab", "a/b", "a b", "~", "é", "z", "\uff5e", "\U0001f600", "0"]
        await store.put_items(key, [make_item(item_key) for item_key in keys], now=T0)

        forward = await store.scan_items(key, limit=100, now=T0)
        backward = await store.scan_items(key, limit=100, reverse=True, now=T0)

        expected = [(item_key, f"value-{item_key}".encode()) for item_key in sorted(keys)]
        assert forward == expected
        assert backward == expected[::-1]

    async def test_scan_items_by_prefix(self, store: CheckpointStore) -> None:
        seed = make_run("prefixed")
        key = key_of(seed)
        await _append(store, seed, 0)
        keys = ["w/1/a", "w/1/b", "w/10/a", "w/2/a", "w/", "w", "x/1/a", "v/1/a"]
        await store.put_items(key, [make_item(item_key) for item_key in keys], now=T0)

        async def scanned(prefix: str, *, reverse: bool = False) -> list[str]:
            found = await store.scan_items(key, prefix=prefix, reverse=reverse, now=T0)
            return [item_key for item_key, _ in found]

        assert await scanned("w/1/") == ["w/1/a", "w/1/b"]
        assert await scanned("w/1") == ["w/1/a", "w/1/b", "w/10/a"]
        assert await scanned("w/") == ["w/", "w/1/a", "w/1/b", "w/10/a", "w/2/a"]
        assert await scanned("w/1", reverse=True) == ["w/10/a", "w/1/b", "w/1/a"]
        assert await scanned("y") == []
        assert await scanned("") == sorted(keys)

    async def test_scan_items_by_a_prefix_of_the_highest_code_point(
        self, store: CheckpointStore
    ) -> None:
        seed = make_run("highest")
        key = key_of(seed)
        await _append(store, seed, 0)
        top = "\U0010ffff"
        keys = [top, top * 2, top * 3, top * 2 + "a", "z" + top]
        await store.put_items(key, [make_item(item_key) for item_key in keys], now=T0)

        async def scanned(prefix: str) -> list[str]:
            return [item_key for item_key, _ in
                    await store.scan_items(key, prefix=prefix, now=T0)]

        assert await scanned(top) == [top, top * 2, top * 2 + "a", top * 3]
        assert await scanned(top * 2) == [top * 2, top * 2 + "a", top * 3]
        assert await scanned("z") == ["z" + top]

    async def test_scan_items_after_a_key_with_limit(self, store: CheckpointStore) -> None:
        seed = make_run("paged-items")
        key = key_of(seed)
        await _append(store, seed, 0)
        keys = [f"k{index:02}" for index in range(30)]
        await store.put_items(key, [make_item(item_key) for item_key in keys], now=T0)

        async def scanned(start_after: str | None, limit: int, reverse: bool = False) -> list[str]:
            found = await store.scan_items(
                key, start_after=start_after, limit=limit, reverse=reverse, now=T0
            )
            return [item_key for item_key, _ in found]

        assert await scanned(None, 3) == ["k00", "k01", "k02"]
        assert await scanned("k05", 3) == ["k06", "k07", "k08"]
        assert await scanned("k055", 2) == ["k06", "k07"]
        assert await scanned("k28", 10) == ["k29"]
        assert await scanned("k29", 10) == []
        assert await scanned("a", 1) == ["k00"]
        assert await scanned(None, 2, reverse=True) == ["k29", "k28"]
        assert await scanned("k05", 3, reverse=True) == ["k04", "k03", "k02"]
        assert await scanned("k00", 3, reverse=True) == []
        assert await scanned("z", 1, reverse=True) == ["k29"]
        for reverse in (False, True):
            visited: list[str] = []
            start_after: str | None = None
            for _ in range(20):
                chunk = await scanned(start_after, 7, reverse)
                if not chunk:
                    break
                visited += chunk
                start_after = chunk[-1]
            assert visited == (keys[::-1] if reverse else keys)

    async def test_scan_items_with_prefix_and_start_after(self, store: CheckpointStore) -> None:
        seed = make_run("prefix-after")
        key = key_of(seed)
        await _append(store, seed, 0)
        keys = ["a/1", "a/2", "a/3", "b/1", "b/2", "b/3", "c/1"]
        await store.put_items(key, [make_item(item_key) for item_key in keys], now=T0)

        async def scanned(start_after: str, reverse: bool = False) -> list[str]:
            found = await store.scan_items(
                key, prefix="b/", start_after=start_after, reverse=reverse, now=T0
            )
            return [item_key for item_key, _ in found]

        assert await scanned("b/1") == ["b/2", "b/3"]
        assert await scanned("a/9") == ["b/1", "b/2", "b/3"]
        assert await scanned("c") == []
        assert await scanned("b/3", reverse=True) == ["b/2", "b/1"]
        assert await scanned("z", reverse=True) == ["b/3", "b/2", "b/1"]
        assert await scanned("a", reverse=True) == []

    async def test_put_items_create_only_conflict_writes_nothing(
        self, store: CheckpointStore
    ) -> None:
        seed = make_run("create-only")
        key = key_of(seed)
        await _append(store, seed, 0)
        await store.put_items(key, [make_item("taken", b"original")], now=T0)

        with pytest.raises(ConflictError):
            await store.put_items(
                key,
                [make_item("fresh", b"new"), make_item("taken", b"clobbered")],
                create_only=True,
                now=T0,
            )

        assert await store.get_items(key, ["fresh", "taken"], now=T0) == {"taken": b"original"}
        await store.put_items(key, [make_item("fresh", b"new")], create_only=True, now=T0)
        assert await store.get_items(key, ["fresh"], now=T0) == {"fresh": b"new"}

    @pytest.mark.parametrize(
        "bad",
        [Item(key="k", value="text"), Item(key="k", value=b"v", expires_at=math.nan),  # type: ignore[arg-type]
         Item(key=7, value=b"v"), "k",  # type: ignore[arg-type]
         Item(key="k", value=bytearray(b"v")),  # type: ignore[arg-type]
         Item(key="k", value=memoryview(b"v"))],  # type: ignore[arg-type]
        ids=["text-value", "nan-expiry", "int-key", "not-an-item", "bytearray-value",
             "memoryview-value"],
    )
    async def test_items_of_the_wrong_type_are_refused_and_nothing_is_written(
        self, store: CheckpointStore, bad: object
    ) -> None:
        seed = make_run("typed-items")
        key = key_of(seed)
        await _append(store, seed, 0)
        with pytest.raises(ValidationError):
            await store.put_items(key, [make_item("good"), bad], now=T0)  # type: ignore[list-item]
        assert await store.get_items(key, ["good", "k"], now=T0) == {}

    async def test_put_items_create_only_replaces_expired_item(
        self, store: CheckpointStore
    ) -> None:
        seed = make_run("create-over-expired")
        key = key_of(seed)
        await _append(store, seed, 0)
        await store.put_items(key, [make_item("slot", b"old", expires_at=T0 + 10)], now=T0)

        with pytest.raises(ConflictError):
            await store.put_items(key, [make_item("slot", b"early")], create_only=True, now=T0 + 9)
        await store.put_items(key, [make_item("slot", b"new")], create_only=True, now=T0 + 10)

        assert await store.get_items(key, ["slot"], now=T0 + 10) == {"slot": b"new"}

    async def test_expired_items_are_hidden(self, store: CheckpointStore) -> None:
        seed = make_run("item-expiry")
        key = key_of(seed)
        await _append(store, seed, 0)
        await store.put_items(
            key,
            [
                make_item("a", expires_at=T0 + 10),
                make_item("b"),
                make_item("c", expires_at=T0 + 20),
            ],
            now=T0,
        )

        async def visible(now: float) -> tuple[list[str], list[str], list[str]]:
            got = await store.get_items(key, ["a", "b", "c"], now=now)
            forward = await store.scan_items(key, now=now)
            backward = await store.scan_items(key, reverse=True, now=now)
            return sorted(got), [k for k, _ in forward], [k for k, _ in backward]

        assert await visible(T0 + 9.5) == (["a", "b", "c"], ["a", "b", "c"], ["c", "b", "a"])
        assert await visible(T0 + 10) == (["b", "c"], ["b", "c"], ["c", "b"])
        assert await visible(T0 + 20) == (["b"], ["b"], ["b"])
        page = await store.scan_items(key, limit=1, now=T0 + 10)
        assert page == [("b", b"value-b")]

    async def test_delete_items_returns_count(self, store: CheckpointStore) -> None:
        seed = make_run("delete-items")
        key = key_of(seed)
        await _append(store, seed, 0)
        await store.put_items(key, [make_item(item_key) for item_key in "abcd"], now=T0)

        assert await store.delete_items(key, ["a", "c", "missing"]) == 2
        assert await store.delete_items(key, ["a"]) == 0
        assert await store.delete_items(key, []) == 0
        assert await store.delete_items(key_of(make_run("other")), ["b"]) == 0

        assert await store.get_items(key, list("abcd"), now=T0) == {
            "b": b"value-b",
            "d": b"value-d",
        }
        assert [k for k, _ in await store.scan_items(key, now=T0)] == ["b", "d"]

    async def test_items_survive_appends(self, store: CheckpointStore) -> None:
        seed = make_run("lasting-items")
        key = key_of(seed)
        await _append(store, seed, 0)
        await store.put_items(key, [make_item("free"), make_item("mine", owner=5)], now=T0)

        await _append_many(store, seed, range(1, 6), keep_latest=2)

        assert await store.get_items(key, ["free", "mine"], now=T0) == {
            "free": b"value-free",
            "mine": b"value-mine",
        }

    async def test_items_of_runs_are_separate(self, store: CheckpointStore) -> None:
        first, second = make_run("items-1"), make_run("items-2")
        await _append(store, first, 0)
        await _append(store, second, 0)
        await store.put_items(key_of(first), [make_item("k", b"first")], now=T0)
        await store.put_items(key_of(second), [make_item("k", b"second")], now=T0)

        assert await store.delete_items(key_of(first), ["k"]) == 1

        assert await store.get_items(key_of(first), ["k"], now=T0) == {}
        assert await store.scan_items(key_of(second), now=T0) == [("k", b"second")]

    async def test_items_refuse_what_is_not_a_run_key(self, store: CheckpointStore) -> None:
        """Also with nothing to write, read or delete: the key is checked first."""
        seed = make_run("addressed")
        await _append(store, seed, 0)
        await store.put_items(key_of(seed), [make_item("k"), make_item("k/nested")], now=T0)

        for items in ([make_item("k", b"other")], []):
            for create_only in (False, True):
                await _refuses_not_run_keys(store, seed, functools.partial(
                    store.put_items, items=items, create_only=create_only, now=T0))
        for keys in (["k"], []):
            await _refuses_not_run_keys(
                store, seed, functools.partial(store.get_items, keys=keys, now=T0))
            await _refuses_not_run_keys(
                store, seed, functools.partial(store.delete_items, keys=keys))
        for limit in (100, 0):
            await _refuses_not_run_keys(
                store, seed, functools.partial(store.scan_items, limit=limit, now=T0))
        await _refuses_not_run_keys(store, seed, lambda value: store.scan_items(
            value, prefix="k/", start_after="k", limit=5, reverse=True, now=T0))
