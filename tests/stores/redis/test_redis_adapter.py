"""RedisStore's adapter capabilities beyond their contracts: labels, shared and nested items in
the key layout, under native expiry, on the Redis Cluster code path, after lost replies."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from fastcheckpoint._config import RetryPolicy
from fastcheckpoint.errors import ValidationError
from fastcheckpoint.stores.redis import RedisStore
from fastcheckpoint.testing import T0, checkpoint_id_of, key_of, make_item, make_run
from tests.stores._redis_support import (
    CuttingProxy,
    append,
    append_with_items,
    counting_connection_class,
    host_and_port,
    keys_under,
    load_scripts,
    make_store,
    real_server,
    round_trips,
)
from tests.stores.conftest import RedisTarget

pytestmark = pytest.mark.anyio

_DEADLINE = 30


@pytest.fixture
def anyio_backend() -> str:
    # redis.asyncio runs on asyncio only.
    return "asyncio"


def _run_key_name(prefix: str, run_id: str, name: str) -> str:
    return f"{prefix}:{{{key_of(make_run(run_id))}}}:{name}"


def _index_name(prefix: str, name: str) -> str:
    return f"{prefix}:{{idx:{prefix}}}:{name}"


async def _labelled(store: RedisStore, run_id: str, labels: tuple[str, ...], *,
                    expires_at: float | None = None, now: float = T0) -> None:
    await append_with_items(store, make_run(run_id, created_at=now), 0, now=now,
                            expires_at=expires_at, labels=labels)


async def _with_label(store: RedisStore, label: str, *, now: float = T0) -> list[str]:
    runs, cursor = await store.runs_with_label(label, limit=100, cursor=None, now=now)
    assert cursor is None
    return [run.run_id for run in runs]


# -- labels -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cluster_path", [False, True], ids=["plain", "cluster-code-path"])
async def test_labels_of_any_text_are_kept_and_found(
    prefixed: tuple[RedisTarget, str], cluster_path: bool
) -> None:
    """Labels travel as JSON into the scripts and become key names: control characters,
    braces (hash-tag syntax), non-ASCII and the longest label all round-trip."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix, cluster=cluster_path)
    labels = ("a\x00b", "new\nline", "{tag}", 'quote"\\/', "ü€😀", "é" * 128)
    with anyio.fail_after(_DEADLINE):
        await _labelled(store, "odd", labels)
        record = await store.get_run(key_of(make_run("odd")), now=T0)
        assert record is not None
        updated = await store.update_run(key_of(make_run("odd")), incarnation=record.incarnation,
                                         version=0, status="paused", data=b"", now=T0)
        found = [await _with_label(store, label) for label in labels]
        await store.aclose()
    assert record.labels == updated.labels == labels
    assert found == [["odd"]] * len(labels)


@pytest.mark.parametrize("cluster_path", [False, True], ids=["plain", "cluster-code-path"])
async def test_label_entries_never_outlive_their_run(
    prefixed: tuple[RedisTarget, str], cluster_path: bool
) -> None:
    """A run whose keys Redis expired natively (no cleanup ran) and a run that expired are
    absent from label listings at once, and purging removes their index entries."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix, cluster=cluster_path)
    client = store._client
    with anyio.fail_after(_DEADLINE):
        await _labelled(store, "vanished", ("thread:t", "vanished"), expires_at=T0 + 10)
        await _labelled(store, "expired", ("thread:t",), expires_at=T0 + 10)
        await _labelled(store, "kept", ("thread:t",))
        gone = [key async for key in client.scan_iter(
            match=_run_key_name(prefix, "vanished", "*"))]
        await client.unlink(*gone)
        listed = await _with_label(store, "thread:t", now=T0 + 10)
        await store.purge_expired(now=T0 + 10, limit=100)
        entries = await client.zrange(_index_name(prefix, "l:thread:t"), 0, -1)
        remaining = await client.exists(_index_name(prefix, "l:vanished"))
        labelled = await client.hlen(_index_name(prefix, "lab"))
        await store.aclose()
    assert listed == ["kept"]
    assert len(entries) == 1
    assert key_of(make_run("kept")).encode() in entries[0]
    assert remaining == 0
    assert labelled == 1


async def test_labels_lost_in_a_crash_are_restored_by_cleanup(
    prefixed: tuple[RedisTarget, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis Cluster code path: the process dies between the create's run script and its index
    call. The intent it recorded first lets the cleanup loop put the run under its labels."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix, cluster=True)
    applied = store._apply_index_ops

    async def crash_after_the_run_script(client: Any, ops: Any) -> None:
        if ops and ops[0] == "intend":
            await applied(client, ops)

    with anyio.fail_after(_DEADLINE):
        monkeypatch.setattr(store, "_apply_index_ops", crash_after_the_run_script)
        await _labelled(store, "crashed", ("thread:t",))
        monkeypatch.undo()
        before = await _with_label(store, "thread:t")
        await store.purge_expired(now=T0 + 61, limit=100)  # the intent's grace is over
        after = await _with_label(store, "thread:t", now=T0 + 61)
        await store.aclose()
    assert before == []
    assert after == ["crashed"]


async def test_a_label_listing_drops_entries_of_runs_that_are_gone(
    prefixed: tuple[RedisTarget, str]
) -> None:
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix)
    client = store._client
    with anyio.fail_after(_DEADLINE):
        await _labelled(store, "gone", ("thread:t",))
        await _labelled(store, "kept", ("thread:t",), now=T0 + 1)
        await client.unlink(_run_key_name(prefix, "gone", "run"),
                            _run_key_name(prefix, "gone", "seq"))
        listed = await _with_label(store, "thread:t", now=T0 + 2)
        entries = await client.zcard(_index_name(prefix, "l:thread:t"))
        await store.aclose()
    assert listed == ["kept"]
    assert entries == 1


async def test_invalid_label_queries_and_cursors_are_refused(
    prefixed: tuple[RedisTarget, str]
) -> None:
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix)
    with anyio.fail_after(_DEADLINE):
        for label in ("", "x" * 257):
            with pytest.raises(ValidationError):
                await store.runs_with_label(label, limit=1, cursor=None, now=T0)
        for cursor in ("nope", "\udcff"):
            with pytest.raises(ValidationError):
                await store.runs_with_label("ok", limit=1, cursor=cursor, now=T0)
        await store.aclose()


# -- shared items -------------------------------------------------------------------------------


async def test_referenced_items_never_expire_while_a_held_checkpoint_names_them(
    prefixed: tuple[RedisTarget, str]
) -> None:
    """A shared item carries no expiry of its own (one written earlier with an expiry loses it
    when a checkpoint names it), and the item keys live as long as the run."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix)
    client = store._client
    run = make_run("lasting")
    key = key_of(run)
    with anyio.fail_after(_DEADLINE):
        await store.put_items(key, [make_item("e/early", expires_at=T0 + 5)], now=T0)
        await append_with_items(store, run, 0, expires_at=T0 + 10, refs=["b/a", "e/early"],
                                items=[make_item("b/a")])
        await append_with_items(store, run, 1, expires_at=T0 + 100, refs=["b/a", "e/early"])
        ttls = [await client.pttl(_run_key_name(prefix, "lasting", name))
                for name in ("ik", "iv", "ir", "cr")]
        await store.purge_expired(now=T0 + 50, limit=100)
        found = await store.read_with_items(key, sequence=None, now=T0 + 50)
        await store.aclose()
    assert all(ttl > 100_000 for ttl in ttls), ttls
    assert found is not None
    assert found[0].sequence == 1
    assert found[2] == {"b/a": b"value-b/a", "e/early": b"value-e/early"}


async def test_item_keys_a_steady_append_creates_expire_with_the_run(
    prefixed: tuple[RedisTarget, str]
) -> None:
    """The run's expiry does not move, but an owned write and an append create the item keys:
    they get the run's lifetime, or they would outlive it for ever."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix)
    run = make_run("late-items")
    with anyio.fail_after(_DEADLINE):
        await append(store, run, 0, expires_at=T0 + 100)
        await store.put_owned_items(key_of(run), [make_item("w/0", owner=0)], owner=0,
                                    checkpoint_id=checkpoint_id_of(run, 0), if_absent=True,
                                    now=T0)
        owned = {name: await store._client.pttl(_run_key_name(prefix, "late-items", name))
                 for name in ("ik", "iv", "io", "ie")}
        await append_with_items(store, run, 1, expires_at=T0 + 100, refs=["b/a"],
                                items=[make_item("b/a")])
        shared = {name: await store._client.pttl(_run_key_name(prefix, "late-items", name))
                  for name in ("ir", "cr")}
        await store.aclose()
    assert all(100_000 < ttl <= 160_000 for ttl in [*owned.values(), *shared.values()]), (
        owned, shared)


async def test_refs_of_a_checkpoint_whose_key_vanished_are_released(
    prefixed: tuple[RedisTarget, str]
) -> None:
    """Redis expired (or evicted) a checkpoint's key before its log entry was dropped: its refs
    are kept beside the log, so the items only it named still go."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix)
    run = make_run("vanished-refs")
    key = key_of(run)
    with anyio.fail_after(_DEADLINE):
        await append_with_items(store, run, 0, refs=["b/old", "b/both"],
                                items=[make_item("b/old"), make_item("b/both")])
        await append_with_items(store, run, 1, refs=["b/both", "b/new"],
                                items=[make_item("b/new")])
        await store._client.unlink(_run_key_name(prefix, "vanished-refs", "c:0"))
        latest = await store.read_with_items(key, sequence=None, now=T0)  # meets the gap
        headers, _ = await store.headers(key, before=None, limit=10, now=T0)
        stored = await store.get_items(key, ["b/old", "b/both", "b/new"], now=T0)
        await store.aclose()
    assert latest is not None
    assert latest[0].refs == ("b/both", "b/new")
    assert [header.sequence for header in headers] == [1]
    assert stored == {"b/both": b"value-b/both", "b/new": b"value-b/new"}


def _history_refs(step: int) -> list[str]:
    """What a conversation log names at ``step``: the last snapshot and the segments since."""
    snapshot = step - step % 10
    return [f"log/snap/{snapshot}", *(f"log/seg/{n}" for n in range(snapshot + 1, step + 1))]


async def test_reference_counts_stay_exact_with_tens_of_refs_per_checkpoint(
    prefixed: tuple[RedisTarget, str]
) -> None:
    """A snapshot every 10 steps and a segment per step, three checkpoints kept: after 40
    appends exactly the items the held checkpoints name are left, each counted once per
    checkpoint naming it."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix)
    run = make_run("history")
    key = key_of(run)
    with anyio.fail_after(_DEADLINE):
        for step in range(40):
            new = f"log/snap/{step}" if step % 10 == 0 else f"log/seg/{step}"
            await append_with_items(store, run, step, refs=_history_refs(step), keep_latest=3,
                                    items=[make_item(new), make_item(f"w/{step}", owner=step)])
        counts = await store._client.hgetall(_run_key_name(prefix, "history", "ir"))
        scanned = await store.scan_items(key, limit=1000, now=T0)
        await store.aclose()
    held = [_history_refs(step) for step in (37, 38, 39)]
    expected = {ref: sum(ref in refs for refs in held) for refs in held for ref in refs}
    assert {name.decode(): int(count) for name, count in counts.items()} == expected
    assert sorted(name for name, _ in scanned) == sorted([*expected, "w/37", "w/38", "w/39"])


async def test_an_owned_item_goes_with_its_owner_while_a_later_checkpoint_names_it(
    prefixed: tuple[RedisTarget, str]
) -> None:
    """As on every store: an owned item's key is its owner's; a checkpoint naming it reads it
    only while the owner is held."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix)
    run = make_run("adopted")
    key = key_of(run)
    with anyio.fail_after(_DEADLINE):
        await append_with_items(store, run, 0, expires_at=T0 + 10,
                                items=[make_item("w/0", owner=0)])
        await append_with_items(store, run, 1, refs=["w/0"], keep_latest=1)
        await store.purge_expired(now=T0 + 20, limit=100)
        kept = await store.read_with_items(key, sequence=1, now=T0 + 20)
        await store.delete(key, 1, checkpoint_id=checkpoint_id_of(run, 1))
        after = await store.get_items(key, ["w/0"], now=T0 + 20)
        await store.aclose()
    assert kept is not None
    assert kept[2] == {}
    assert after == {}


async def test_a_new_incarnation_never_inherits_shared_items_of_an_expired_one(
    prefixed: tuple[RedisTarget, str]
) -> None:
    """Items are written only if absent: a thread recreated after expiry writing the same key
    must get its own value, not the old incarnation's."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix)
    old, new = make_run("reborn"), make_run("reborn", created_at=T0 + 20)
    with anyio.fail_after(_DEADLINE):
        await append_with_items(store, old, 0, expires_at=T0 + 10, refs=["b/v1"],
                                items=[make_item("b/v1", b"old")])
        await append_with_items(store, new, 0, now=T0 + 20, refs=["b/v1"],
                                items=[make_item("b/v1", b"new")])
        found = await store.read_with_items(key_of(new), sequence=0, now=T0 + 20)
        await store.aclose()
    assert found is not None
    assert found[2] == {"b/v1": b"new"}


async def test_item_keys_beyond_the_one_limit_are_refused_on_every_write_path(
    prefixed: tuple[RedisTarget, str]
) -> None:
    """128 UTF-8 bytes pass, 129 are a ValidationError before anything is sent."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix)
    run = make_run("long-keys")
    key = key_of(run)
    longest, too_long = "é" * 64, "€" * 43  # 128 and 129 bytes
    with anyio.fail_after(_DEADLINE):
        with pytest.raises(ValidationError, match="129 bytes"):
            await store.put_items(key, [make_item("fine"), make_item(too_long)], now=T0)
        written = await keys_under(store._client, prefix)
        with pytest.raises(ValidationError, match="129 bytes"):
            await append_with_items(store, run, 0, items=[make_item(too_long)])
        with pytest.raises(ValidationError, match="129 bytes"):
            await append_with_items(store, run, 0, refs=[too_long])
        await append_with_items(store, run, 0, refs=[longest], items=[make_item(longest)])
        with pytest.raises(ValidationError, match="129 bytes"):
            await store.put_owned_items(key, [make_item(too_long, owner=0)], owner=0,
                                        checkpoint_id=checkpoint_id_of(run, 0), if_absent=True,
                                        now=T0)
        found = await store.read_with_items(key, sequence=0, now=T0)
        await store.aclose()
    assert written == []
    assert found is not None
    assert found[2] == {longest: f"value-{longest}".encode()}


# -- lost replies -------------------------------------------------------------------------------


async def _lossy_store(target: RedisTarget, prefix: str, plan: list[str],
                       on_lost_reply: Any = None) -> tuple[CuttingProxy, RedisStore]:
    proxy = CuttingProxy(*host_and_port(target), plan, on_lost_reply=on_lost_reply)
    await proxy.start()
    store = RedisStore.from_url(
        f"redis://127.0.0.1:{proxy.port}/0?prefix={prefix}",
        retry=RetryPolicy(base_delay=0.001, max_delay=0.01, max_retries=3))
    return proxy, store


async def test_a_retried_append_with_items_recognises_its_own_write(
    prefixed: tuple[RedisTarget, str]
) -> None:
    """The append applied, its reply was lost, redis-py retried: acknowledged, and its refs
    counted once (deleting the checkpoint then removes what only it named)."""
    target, prefix = prefixed
    real_server(target)
    direct = make_store(target, prefix)
    run = make_run("lossy-append")
    key = key_of(run)
    await load_scripts(direct._client)
    proxy, store = await _lossy_store(target, prefix, ["lose-reply"])
    try:
        with anyio.fail_after(_DEADLINE):
            status = await append_with_items(store, run, 0, refs=["b/a"],
                                             items=[make_item("b/a"), make_item("w", owner=0)])
            found = await direct.read_with_items(key, sequence=0, now=T0)
            await direct.delete(key, 0, checkpoint_id=checkpoint_id_of(run, 0))
            left = await direct.get_items(key, ["b/a", "w"], now=T0)
    finally:
        await store.aclose()
        await direct.aclose()
        await proxy.stop()
    assert proxy.cuts == 1
    assert status == "active"
    assert found is not None
    assert found[2] == {"b/a": b"value-b/a", "w": b"value-w"}
    assert left == {}


async def test_a_retried_owned_write_reports_that_it_wrote(
    prefixed: tuple[RedisTarget, str]
) -> None:
    """The write applied, its reply was lost, and the checkpoint was deleted before redis-py
    retried: the retry still reports the write (the items then went with their checkpoint)."""
    target, prefix = prefixed
    real_server(target)
    direct = make_store(target, prefix)
    run = make_run("lossy-owned")
    key = key_of(run)
    await append(direct, run, 0)
    await append(direct, run, 1)
    await load_scripts(direct._client)

    async def delete_the_owner() -> None:
        await direct.delete(key, 0, checkpoint_id=checkpoint_id_of(run, 0))

    proxy, store = await _lossy_store(target, prefix, ["lose-reply"], delete_the_owner)
    try:
        with anyio.fail_after(_DEADLINE):
            wrote = await store.put_owned_items(
                key, [make_item("w/0", owner=0)], owner=0,
                checkpoint_id=checkpoint_id_of(run, 0), if_absent=True, now=T0)
            left = await direct.get_items(key, ["w/0"], now=T0)
    finally:
        await store.aclose()
        await direct.aclose()
        await proxy.stop()
    assert proxy.cuts == 1
    assert wrote is True
    assert left == {}


async def test_a_retried_create_only_item_write_is_no_conflict_with_itself(
    prefixed: tuple[RedisTarget, str]
) -> None:
    target, prefix = prefixed
    real_server(target)
    direct = make_store(target, prefix)
    key = key_of(make_run("lossy-items"))
    await load_scripts(direct._client)
    proxy, store = await _lossy_store(target, prefix, ["lose-reply"])
    try:
        with anyio.fail_after(_DEADLINE):
            await store.put_items(key, [make_item("a")], create_only=True, now=T0)
            found = await direct.get_items(key, ["a"], now=T0)
    finally:
        await store.aclose()
        await direct.aclose()
        await proxy.stop()
    assert proxy.cuts == 1
    assert found == {"a": b"value-a"}


async def test_refs_are_returned_by_every_read_and_counted_once(
    prefixed: tuple[RedisTarget, str]
) -> None:
    """A key a checkpoint names twice counts once: removing that checkpoint leaves the item
    for the other one naming it."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix)
    run = make_run("refs-read")
    key = key_of(run)
    with anyio.fail_after(_DEADLINE):
        await append_with_items(store, run, 0, refs=["b/x", "b/y", "b/x"],
                                items=[make_item("b/x"), make_item("b/y")])
        await append_with_items(store, run, 1, refs=["b/x"])
        await append(store, run, 2)
        got = await store.get(key, 0, now=T0)
        latest = await store.latest(key, now=T0)
        read = await store.read_with_items(key, sequence=0, now=T0)
        await store.delete(key, 0, checkpoint_id=checkpoint_id_of(run, 0))
        kept = await store.get_items(key, ["b/x"], now=T0)
        await store.delete(key, 1, checkpoint_id=checkpoint_id_of(run, 1))
        left = await store.get_items(key, ["b/x"], now=T0)
        await store.aclose()
    assert got is not None
    assert read is not None
    assert got[0].refs == read[0].refs == ("b/x", "b/y", "b/x")
    assert latest is not None
    assert (latest[0].sequence, latest[0].refs) == (2, ())
    assert kept == {"b/x": b"value-b/x"}
    assert left == {}


# -- nested items -------------------------------------------------------------------------------

# Keys beside the range of the anchor "h/log": "." sorts before "/", "0" is the range's bound,
# "\u00e9" and "\U0010ffff" sort after it (as code points and as UTF-8 bytes).
_BESIDE = ["h/lo", "h/log.x", "h/log0", "h/log0/1", "h/log\u00e9/1", "h/lof/1", "h/loh"]
_INSIDE = ["h/log/\u00e9", "h/log/\U0010ffff", "h/log//"]


async def _item_key_counts(store: RedisStore, prefix: str, run_id: str) -> list[int]:
    """How many entries the four item keys of the run hold (ik, iv, io, ie)."""
    client = store._client
    ik, iv, io, ie = (_run_key_name(prefix, run_id, part) for part in ("ik", "iv", "io", "ie"))
    return [await client.zcard(ik), await client.hlen(iv), await client.zcard(io),
            await client.zcard(ie)]


@pytest.mark.parametrize("cluster_path", [False, True], ids=["plain", "cluster-code-path"])
async def test_a_thousand_step_log_is_read_in_one_call_and_removed_in_one(
    prefixed: tuple[RedisTarget, str], cluster_path: bool
) -> None:
    """A 1,000-step conversation, about 1 KB added per step under one anchor, three checkpoints
    kept: the read returns the anchor and every nested item in one script call, and the
    append whose pruning releases the anchor's last holder removes all of them in its own call,
    leaving every item outside the range (neighbours in byte and code point order)."""
    target, prefix = prefixed
    real_server(target)
    counter = counting_connection_class()
    client = aioredis.Redis.from_url(target.url, connection_class=counter)
    store = RedisStore(client, prefix=prefix, cluster=cluster_path)
    run = make_run("long-log")
    key = key_of(run)
    with anyio.fail_after(_DEADLINE * 2):
        await load_scripts(client)
        await store.put_items(key, [make_item(name) for name in _BESIDE], now=T0)
        await append_with_items(store, run, 0, refs=["h/log"], items=[
            make_item("h/log"), *(make_item(name) for name in _INSIDE)])
        for step in range(1, 1001):
            await append_with_items(store, run, step, refs=["h/log"], keep_latest=3,
                                    items=[make_item(f"h/log/{step:06}", b"x" * 1000)])
        before = await _item_key_counts(store, prefix, "long-log")
        read_trips = await round_trips(
            counter, lambda: store.read_with_items(key, sequence=None, now=T0))
        found = await store.read_with_items(key, sequence=998, now=T0)
        prune_trips = await round_trips(counter, lambda: append_with_items(
            store, run, 1001, refs=["h/next"], items=[make_item("h/next")], keep_latest=1))
        after = await _item_key_counts(store, prefix, "long-log")
        left = [name for name, _ in await store.scan_items(key, limit=100, now=T0)]
        await client.aclose()
    assert (read_trips, prune_trips) == (1, 1)
    assert found is not None
    assert set(found[2]) == {"h/log", *_INSIDE, *(f"h/log/{step:06}" for step in range(1, 1001))}
    assert found[2]["h/log/000500"] == b"x" * 1000
    assert before == [len(_BESIDE) + 1 + len(_INSIDE) + 1000,
                      len(_BESIDE) + 1 + len(_INSIDE) + 1000, 0, 0]
    assert after == [len(_BESIDE) + 1, len(_BESIDE) + 1, 0, 0]
    assert left == sorted([*_BESIDE, "h/next"])


async def test_anchors_whose_keys_look_like_range_syntax(
    prefixed: tuple[RedisTarget, str]
) -> None:
    """ZRANGEBYLEX reads "-", "+", "[" and "(" at the start of a bound: anchor keys made of them
    still select exactly their own nested items."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix)
    run = make_run("odd-anchors")
    key = key_of(run)
    anchors = ["-", "+", "[", "(", ""]
    with anyio.fail_after(_DEADLINE):
        await store.put_items(key, [make_item(f"{anchor}0/1") for anchor in anchors], now=T0)
        await append_with_items(store, run, 0, refs=anchors[:4], items=[
            item for anchor in anchors[:4]
            for item in (make_item(anchor), make_item(f"{anchor}/1"))])
        await append_with_items(store, run, 1, refs=[""], items=[make_item(""), make_item("/1")])
        first = await store.read_with_items(key, sequence=0, now=T0)
        await store.delete(key, 0, checkpoint_id=checkpoint_id_of(run, 0))
        second = await store.read_with_items(key, sequence=1, now=T0)
        left = [name for name, _ in await store.scan_items(key, limit=100, now=T0)]
        await store.aclose()
    assert first is not None
    assert first[2] == {name: f"value-{name}".encode() for anchor in anchors[:4]
                        for name in (anchor, f"{anchor}/1")}
    assert second is not None
    # "" is an anchor too: everything that starts with "/" is nested under it.
    assert second[2] == {"": b"value-", "/1": b"value-/1"}
    assert left == sorted(["", "/1", *(f"{anchor}0/1" for anchor in anchors)])


async def test_nested_items_stay_while_their_anchor_is_named_after_its_owner_went(
    prefixed: tuple[RedisTarget, str]
) -> None:
    """An anchor written as an owned item goes with its owner, also while a later checkpoint
    names it; what is nested under it stays while it is named, and goes with the last
    checkpoint naming it."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix)
    run = make_run("adopted-anchor")
    key = key_of(run)
    with anyio.fail_after(_DEADLINE):
        await append_with_items(store, run, 0, items=[
            make_item("w/0", owner=0), make_item("w/0/a")])
        await append_with_items(store, run, 1, refs=["w/0"], items=[make_item("w/0/b")],
                                keep_latest=1)
        kept = await store.read_with_items(key, sequence=1, now=T0)
        await store.delete(key, 1, checkpoint_id=checkpoint_id_of(run, 1))
        left = await store.scan_items(key, limit=100, now=T0)
        await store.aclose()
    assert kept is not None
    assert set(kept[2]) == {"w/0/a", "w/0/b"}
    assert left == []


async def test_a_new_life_drops_what_was_nested_under_the_old_anchors(
    prefixed: tuple[RedisTarget, str]
) -> None:
    """A run created again after it expired: the old anchors go with what is nested under them,
    loose items the old life never named stay, and the new life's nested items are its own."""
    target, prefix = prefixed
    real_server(target)
    store = make_store(target, prefix)
    old, new = make_run("reborn-log"), make_run("reborn-log", created_at=T0 + 20)
    key = key_of(old)
    with anyio.fail_after(_DEADLINE):
        await store.put_items(key, [make_item("loose/1")], now=T0)
        await append_with_items(store, old, 0, expires_at=T0 + 10, refs=["h/a"],
                                items=[make_item("h/a"), make_item("h/a/0", b"old")])
        await append_with_items(store, old, 1, expires_at=T0 + 10, refs=["h/a"],
                                items=[make_item("h/a/1", b"old")])
        await append_with_items(store, new, 0, now=T0 + 20, refs=["h/a"],
                                items=[make_item("h/a", b"new"), make_item("h/a/0", b"new")])
        found = await store.read_with_items(key, sequence=0, now=T0 + 20)
        left = [name for name, _ in await store.scan_items(key, limit=100, now=T0 + 20)]
        await store.aclose()
    assert found is not None
    assert found[2] == {"h/a": b"new", "h/a/0": b"new"}
    assert left == ["h/a", "h/a/0", "loose/1"]
