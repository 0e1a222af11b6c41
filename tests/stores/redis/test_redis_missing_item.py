"""RedisStore when an item's value field was removed from the run's ``iv`` hash (its key still
listed): the item is damaged, not absent. ``get_items`` and ``read_with_items`` raise
CorruptCheckpointError naming it (a checkpoint is never read without an item it names),
scans skip it, writers replace it, ``delete_items`` removes it, and an append that only names
it is refused with SharedItemGone."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from fastcheckpoint.errors import CorruptCheckpointError, SharedItemGone
from fastcheckpoint.integrations.langgraph import FastCheckpointSaver
from fastcheckpoint.stores.redis import RedisStore
from fastcheckpoint.testing import T0, key_of, make_item, make_run
from tests.integrations._langgraph_support import config, put
from tests.stores._redis_support import append_with_items, make_store
from tests.stores.conftest import RedisTarget

pytestmark = pytest.mark.anyio

_DEADLINE = 20


@pytest.fixture
def anyio_backend() -> str:
    # redis.asyncio runs on asyncio only.
    return "asyncio"


async def _lose_value(store: RedisStore, prefix: str, run_id: str, key: str) -> None:
    client: Any = store._client
    assert await client.hdel(f"{prefix}:{{{key_of(make_run(run_id))}}}:iv", key) == 1


async def test_a_read_naming_an_item_whose_value_is_gone_raises(
    prefixed: tuple[RedisTarget, str],
) -> None:
    target, prefix = prefixed
    store = make_store(target, prefix)
    run = make_run("lost-shared")
    with anyio.fail_after(_DEADLINE):
        await append_with_items(store, run, 0, refs=["b/a", "b/b"],
                                items=[make_item("b/a"), make_item("b/b")])
        await _lose_value(store, prefix, "lost-shared", "b/a")
        with pytest.raises(CorruptCheckpointError) as read:
            await store.read_with_items(key_of(run), sequence=0, now=T0)
        with pytest.raises(CorruptCheckpointError) as latest:
            await store.read_with_items(key_of(run), sequence=None, now=T0)
        with pytest.raises(CorruptCheckpointError) as asked:
            await store.get_items(key_of(run), ["b/b", "b/a", "never"], now=T0)
        # Keys never written are left out as before; the scan skips the damaged one.
        assert await store.get_items(key_of(run), ["b/b", "never"], now=T0) == {
            "b/b": b"value-b/b"}
        scanned = await store.scan_items(key_of(run), prefix="b/", now=T0)
        await store.aclose()
    for refused in (read, latest, asked):
        assert "'b/a'" in str(refused.value)
        assert refused.value.key.endswith(":iv")
    assert scanned == [("b/b", b"value-b/b")]


async def test_owned_and_nested_items_whose_value_is_gone_fail_the_read(
    prefixed: tuple[RedisTarget, str],
) -> None:
    target, prefix = prefixed
    store = make_store(target, prefix)
    with anyio.fail_after(_DEADLINE):
        for run_id, lost in (("lost-owned", "w/0"), ("lost-nested", "l/a/1")):
            run = make_run(run_id)
            await append_with_items(
                store, run, 0, refs=["l/a"],
                items=[make_item("l/a"), make_item("l/a/1"), make_item("w/0", owner=0)])
            await _lose_value(store, prefix, run_id, lost)
            with pytest.raises(CorruptCheckpointError, match=f"'{lost}'"):
                await store.read_with_items(key_of(run), sequence=0, now=T0)
        await store.aclose()


async def test_an_expired_item_whose_value_is_gone_is_absent(
    prefixed: tuple[RedisTarget, str],
) -> None:
    target, prefix = prefixed
    store = make_store(target, prefix)
    run = make_run("lost-expired")
    with anyio.fail_after(_DEADLINE):
        await append_with_items(store, run, 0)
        await store.put_items(key_of(run), [make_item("k", expires_at=T0 + 10)], now=T0)
        await _lose_value(store, prefix, "lost-expired", "k")
        assert await store.get_items(key_of(run), ["k"], now=T0 + 20) == {}
        await store.aclose()


async def test_writers_heal_an_item_whose_value_is_gone(
    prefixed: tuple[RedisTarget, str],
) -> None:
    target, prefix = prefixed
    store = make_store(target, prefix)
    run = make_run("lost-healed")
    key = key_of(run)
    with anyio.fail_after(_DEADLINE):
        await append_with_items(store, run, 0, refs=["b/a", "b/b"],
                                items=[make_item("b/a"), make_item("b/b")])
        await _lose_value(store, prefix, "lost-healed", "b/a")
        with pytest.raises(SharedItemGone):
            await append_with_items(store, run, 1, refs=["b/a", "b/b"])
        await append_with_items(store, run, 1, refs=["b/a", "b/b"],
                                items=[make_item("b/a", b"again")])
        healed = await store.read_with_items(key, sequence=1, now=T0)
        first = await store.read_with_items(key, sequence=0, now=T0)

        await _lose_value(store, prefix, "lost-healed", "b/b")
        assert await store.delete_items(key, ["b/b"]) == 1
        assert await store.get_items(key, ["b/b"], now=T0) == {}
        await store.aclose()
    assert healed is not None
    assert healed[2] == {"b/a": b"again", "b/b": b"value-b/b"}
    assert first is not None
    assert first[2] == {"b/a": b"again", "b/b": b"value-b/b"}


async def test_the_langgraph_saver_never_loads_a_checkpoint_without_a_channel(
    prefixed: tuple[RedisTarget, str],
) -> None:
    """The saver read checkpoint 1 as ``{'b': 'B1'}`` once channel a's value was gone; it
    raises now, and the next save (a unchanged) resends the value and is read whole."""
    target, prefix = prefixed
    store = make_store(target, prefix)
    saver = FastCheckpointSaver(store)
    with anyio.fail_after(_DEADLINE):
        first = await put(saver, "lost-channel", values={"a": "A1", "b": "B1"},
                          versions={"a": 1, "b": 1})
        run = make_run("lost-channel")
        items = await store.scan_items(key_of(run), prefix="b/", now=T0)
        blob = next(key for key, value in items if b"A1" in value)
        await _lose_value(store, prefix, "lost-channel", blob)
        with pytest.raises(CorruptCheckpointError, match=blob):
            await saver.aget_tuple(config("lost-channel", first))
        await put(saver, "lost-channel", parent=first, values={"a": "A1", "b": "B2"},
                  versions={"a": 1, "b": 2}, new_versions={"b": 2})
        latest = await saver.aget_tuple(config("lost-channel"))
        await store.aclose()
    assert latest is not None
    assert latest.checkpoint["channel_values"] == {"a": "A1", "b": "B2"}
