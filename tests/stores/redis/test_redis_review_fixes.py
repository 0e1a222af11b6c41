"""RedisStore against damage an editor or a foreign writer leaves in a run's keys, and the
races and lifetimes a review found wrong: a call either does all it says or writes nothing,
raises only our errors, and a listing or count is not cut short by one damaged entry."""

from __future__ import annotations

import anyio
import pytest

from fastcheckpoint.errors import CorruptCheckpointError
from fastcheckpoint.stores.redis import RedisStore
from fastcheckpoint.testing import T0, key_of, make_item, make_run
from tests.stores._redis_support import append_with_items, make_store, real_server
from tests.stores.conftest import RedisTarget

pytestmark = pytest.mark.anyio

_DEADLINE = 5


@pytest.fixture
def anyio_backend() -> str:
    # redis.asyncio runs on asyncio only.
    return "asyncio"


def _key(prefix: str, run_key: str, name: str) -> str:
    return f"{prefix}:{{{run_key}}}:{name}"


def _store(prefixed: tuple[RedisTarget, str], **options: object) -> tuple[RedisStore, str]:
    target, prefix = prefixed
    real_server(target)
    return make_store(target, prefix, **options), prefix


# -- a create never stops halfway ------------------------------------------------------------


async def test_a_create_naming_an_item_whose_count_was_edited_counts_it_again(
    prefixed: tuple[RedisTarget, str],
) -> None:
    """A ref count edited into text made the create's HINCRBY fail after its checkpoint was
    written. The count is taken again from the refs of the held checkpoints instead."""
    store, prefix = _store(prefixed)
    run = make_run("recount")
    rk = key_of(run)
    with anyio.fail_after(_DEADLINE):
        await append_with_items(store, run, 0, refs=["K"], items=[make_item("K")])
        await store._client.hset(_key(prefix, rk, "ir"), "K", "not-a-number")
        await append_with_items(store, run, 1, refs=["K"])
        count = await store._client.hget(_key(prefix, rk, "ir"), "K")
        latest = await store.latest(rk, now=T0)
        await store.aclose()
    assert count == b"2"
    assert latest is not None
    assert latest[0].sequence == 1


async def test_pruning_a_checkpoint_whose_item_count_was_edited_counts_it_again(
    prefixed: tuple[RedisTarget, str],
) -> None:
    """keep_latest prunes a checkpoint naming an item whose count is not a number: the create
    completes, the count is what the held checkpoints say, and the item stays while named."""
    store, prefix = _store(prefixed)
    run = make_run("recount-prune")
    rk = key_of(run)
    with anyio.fail_after(_DEADLINE):
        await append_with_items(store, run, 0, refs=["K"], items=[make_item("K")])
        await append_with_items(store, run, 1, refs=["K"])
        await store._client.hset(_key(prefix, rk, "ir"), "K", "1x")
        await append_with_items(store, run, 2, keep_latest=2)
        log = await store._client.zrange(_key(prefix, rk, "seq"), 0, -1)
        count = await store._client.hget(_key(prefix, rk, "ir"), "K")
        items = await store.get_items(rk, ["K"], now=T0)
        await append_with_items(store, run, 3, keep_latest=1)
        after = await store.get_items(rk, ["K"], now=T0)
        counts = await store._client.hgetall(_key(prefix, rk, "ir"))
        await store.aclose()
    assert log == [b"1", b"2"]
    assert count == b"1"
    assert items == {"K": b"value-K"}
    assert after == {}
    assert counts == {}


@pytest.mark.parametrize("name", ["cr", "ir", "ik", "ie", "due"])
async def test_a_create_meeting_a_run_key_of_another_type_writes_nothing(
    prefixed: tuple[RedisTarget, str], name: str,
) -> None:
    """A run-level key replaced by a string made a create fail with WRONGTYPE after its
    checkpoint was in the log. Now it is CorruptCheckpointError naming the key, nothing
    written."""
    store, prefix = _store(prefixed)
    run = make_run("foreign-" + name)
    rk = key_of(run)
    with anyio.fail_after(_DEADLINE):
        await append_with_items(store, run, 0, expires_at=T0 + 100)
        await store._client.delete(_key(prefix, rk, name))
        await store._client.set(_key(prefix, rk, name), "foreign")
        with pytest.raises(CorruptCheckpointError) as caught:
            await append_with_items(store, run, 1, refs=["K"], items=[make_item("K")],
                                    expires_at=T0 + 50)
        log = await store._client.zrange(_key(prefix, rk, "seq"), 0, -1)
        latest = await store._client.hget(_key(prefix, rk, "run"), "ls")
        written = await store._client.exists(_key(prefix, rk, "c:1"))
        await store.aclose()
    assert caught.value.key == _key(prefix, rk, name)
    assert "nothing was written" in str(caught.value)
    assert log == [b"0"]
    assert latest == b"0"
    assert written == 0
