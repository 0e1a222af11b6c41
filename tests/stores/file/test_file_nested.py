"""FileStore's nested items beyond their contract: the items under ``K + "/"`` are those of the
run's item index in that key range, whenever and however they were written; every removal of
``K`` takes them in its own commit; reads answer as the memory store does, in any process and
after a restart."""

from __future__ import annotations

import itertools
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest

from fastcheckpoint.errors import CheckpointError
from fastcheckpoint.stores import RunRecord
from fastcheckpoint.stores.file import FileStore
from fastcheckpoint.stores.memory import MemoryStore
from fastcheckpoint.testing import T0, checkpoint_id_of, key_of, make_item, make_run
from tests._file_records import (
    Process,
    all_items,
    count_calls,
    count_item_reads,
    forget_items,
    snapshot,
)
from tests._file_records import append_with_refs as _append

pytestmark = pytest.mark.anyio

Store = FileStore | MemoryStore


def _values(*keys: str) -> dict[str, bytes]:
    return {key: f"value-{key}".encode() for key in keys}


async def _items_of(store: Store, run: RunRecord, sequence: int | None) -> dict[str, bytes]:
    found = await store.read_with_items(key_of(run), sequence=sequence, now=T0)
    assert found is not None
    return found[2]


async def test_items_written_under_a_key_before_it_held_an_item_are_nested_under_it(
    root: Path, store: FileStore
) -> None:
    """Loose items put under ``h/a`` before ``h/a`` held an item, owned ones, and those of a
    later append are all read with a checkpoint naming ``h/a`` (not ``h/a0`` nor ``h/a.x``),
    after a restart too, and all go with it."""
    run = make_run("put-first")
    key = key_of(run)
    with anyio.fail_after(30):
        await store.put_items(key, [make_item("h/a/early"), make_item("h/a0"),
                                    make_item("h/a.x")], now=T0)
        await store.put_items(key, [make_item("h/a")], now=T0)
        await _append(store, run, 0, ["h/a"], [make_item("h/a/0"), make_item("w/0/t/1", owner=0)])
        assert await store.put_owned_items(key, [make_item("h/a/owned", owner=0)], owner=0,
                                           checkpoint_id=checkpoint_id_of(run, 0),
                                           if_absent=True, now=T0)
        expected = _values("h/a", "h/a/0", "h/a/early", "h/a/owned", "w/0/t/1")
        assert await _items_of(store, run, 0) == expected
        forget_items(root, key)
        assert await _items_of(store, run, 0) == expected

        await _append(store, run, 1, keep_latest=1)
        assert await all_items(store, key) == _values("h/a.x", "h/a0")


async def test_dropping_a_shared_item_takes_what_the_same_append_wrote_under_it(
    root: Path, store: FileStore
) -> None:
    """An append that writes ``h/a/new`` and prunes the last checkpoint naming ``h/a`` removes
    ``h/a/new`` with it, as the memory store does."""
    run = make_run("same-append")
    key = key_of(run)
    memory = MemoryStore()
    with anyio.fail_after(30):
        for each in (store, memory):
            await _append(each, run, 0, ["h/a"], [make_item("h/a"), make_item("h/a/0")])
            await _append(each, run, 1, ["b/1"], [make_item("b/1"), make_item("h/a/new"),
                                                  make_item("h/a/new/deeper")], keep_latest=1)
        assert await snapshot(store, key) == (_values("b/1"), {1: _values("b/1")})
        assert await snapshot(memory, key) == await snapshot(store, key)
        forget_items(root, key)
        assert await snapshot(store, key) == await snapshot(memory, key)


async def _removal_setup(
    store: Store, run: RunRecord, expiries: tuple[float | None, float | None]
) -> None:
    """``h/a`` (named by checkpoint 0) with items nested under it, written loose before it
    and by the append; ``h/b`` (named by 1) with one; keys next to ``h/a`` not under it."""
    key = key_of(run)
    await store.put_items(key, [make_item("h/a/early"), make_item("h/a0"),
                                make_item("h/a.x")], now=T0)
    await _append(store, run, 0, ["h/a"], expires_at=expiries[0], items=[
        make_item("h/a"), make_item("h/a/0"), make_item("h/a/1/x"), make_item("w/0", owner=0)])
    await _append(store, run, 1, ["h/b"], expires_at=expiries[1],
                  items=[make_item("h/b"), make_item("h/b/0")])


REMOVALS: dict[str, tuple[tuple[float | None, float | None], float]] = {
    # path: (expiries of checkpoints 0 and 1, when the removal happens)
    "prune": ((None, None), T0),
    "delete": ((None, None), T0),
    "expiry": ((T0 + 3, None), T0 + 3),
    "new life": ((T0 + 5, T0 + 5), T0 + 5),  # both checkpoints expire: the run does
}


def _removal(path: str, store: Store, run: RunRecord) -> Callable[[], Awaitable[object]]:
    key = key_of(run)
    reborn = make_run(run.run_id, created_at=T0 + 5)
    return {
        "prune": lambda: _append(store, run, 2, ["h/b"], keep_latest=1,
                                 items=[make_item("h/a/late")]),
        "delete": lambda: store.delete(key, 0, checkpoint_id=checkpoint_id_of(run, 0)),
        "expiry": lambda: store.purge_expired(now=T0 + 3, limit=100),
        "new life": lambda: _append(store, reborn, 0, ["n"], now=T0 + 5,
                                    items=[make_item("n"), make_item("h/a/reborn")]),
    }[path]


@pytest.mark.parametrize("path", list(REMOVALS))
async def test_every_removal_of_an_anchor_takes_its_nested_items_in_its_commit(
    root: Path, store: FileStore, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """Pruned, deleted, expired or left by a new life: ``h/a`` goes with every item under it
    (never ``h/a0`` or ``h/a.x``), in the removal's one commit; the store then answers as the
    memory store does, also after a restart."""
    run = make_run("removals")
    key = key_of(run)
    memory = MemoryStore()
    expiries, when = REMOVALS[path]
    with anyio.fail_after(30):
        for each in (store, memory):
            await _removal_setup(each, run, expiries)
        assert await _items_of(store, run, 0) == _values(
            "h/a", "h/a/0", "h/a/1/x", "h/a/early", "w/0")
        calls = count_calls(monkeypatch, "fdatasync")
        await _removal(path, store, run)()
        assert calls == ["fdatasync"]
        monkeypatch.undo()
        await _removal(path, memory, run)()

        found = await snapshot(store, key, now=when)
        assert [item for item in found[0] if item.startswith("h/a/")] == (
            ["h/a/reborn"] if path == "new life" else [])
        assert {"h/a0", "h/a.x"} <= found[0].keys()
        assert found == await snapshot(memory, key, now=when)
        forget_items(root, key)
        assert await snapshot(store, key, now=when) == found


@pytest.mark.parametrize("path", ["prune", "delete", "expiry"])
async def test_the_removal_of_an_anchor_spares_what_others_name_or_own_under_it(
    root: Path, store: FileStore, path: str
) -> None:
    """The last checkpoint naming ``h/a`` goes: ``h/a/b`` (named by checkpoint 1) with what is
    nested under it, and ``h/a/w`` (owned by 1) stay, in this process and once the item index
    is made again from the log; the rest under ``h/a/`` goes (``h/a/b!`` sorts between
    ``h/a/b`` and ``h/a/b/``). A read of checkpoint 0 never returns ``h/a/w``. As the memory
    store does."""
    run = make_run("spared")
    key = key_of(run)
    memory = MemoryStore()
    when = T0 + 3 if path == "expiry" else T0
    removal = {
        "prune": lambda each: _append(each, run, 3, ["h/a/b"], keep_latest=3),
        "delete": lambda each: each.delete(key, 0, checkpoint_id=checkpoint_id_of(run, 0)),
        "expiry": lambda each: each.purge_expired(now=when, limit=100),
    }[path]
    with anyio.fail_after(30):
        for each in (store, memory):
            await each.put_items(key, [make_item("h/a/early")], now=T0)
            await _append(each, run, 0, ["h/a"], expires_at=T0 + 3, items=[
                make_item("h/a"), make_item("h/a/0"), make_item("h/a/b!")])
            await _append(each, run, 1, ["h/a/b"], items=[
                make_item("h/a/b"), make_item("h/a/b/0"), make_item("h/a/w", owner=1)])
            await _append(each, run, 2, ["h/a/b/0"])
        before = await snapshot(store, key)
        assert before == await snapshot(memory, key)
        for each in (store, memory):
            await removal(each)
        found = await snapshot(store, key, now=when)
        assert found == await snapshot(memory, key, now=when)
        forget_items(root, key)
        assert await snapshot(store, key, now=when) == found
    assert before[1][0] == _values("h/a", "h/a/0", "h/a/b", "h/a/b!", "h/a/b/0", "h/a/early")
    assert list(found[0]) == ["h/a/b", "h/a/b/0", "h/a/w"]
    assert found[1][1] == _values("h/a/b", "h/a/b/0", "h/a/w")
    assert found[1][2] == _values("h/a/b/0")


async def test_a_read_reads_each_item_of_its_checkpoint_once(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ref nested under another ref (``h/a/000`` under ``h/a``) and what is nested under
    both are read once, and none of the run's other items is read."""
    run = make_run("read-cost")
    key = key_of(run)
    with anyio.fail_after(60):
        await store.put_items(key, [make_item(f"other/{index}") for index in range(50)], now=T0)
        await _append(store, run, 0, ["h/a", "h/b", "c/1", "h/a/000"], [
            make_item("h/a"), make_item("h/b"), make_item("c/1"), make_item("w/0", owner=0),
            *[make_item(f"h/a/{index:03}") for index in range(60)], make_item("h/a/000/x"),
            *[make_item(f"h/b/{index:03}") for index in range(40)]])
        read = count_item_reads(monkeypatch)
        found = await _items_of(store, run, 0)
    assert len(found) == 4 + 101
    assert found["h/a/000/x"] == b"value-h/a/000/x"
    assert sorted(read) == sorted(found)


async def test_deleted_nested_items_are_gone_for_every_reader(root: Path) -> None:
    """``delete_items`` of items nested under a ref: the reads of this process, of another
    one that indexed the run before, and of a new one return the rest."""
    run = make_run("deleted-nested")
    key = key_of(run)
    other = Process()
    with anyio.fail_after(30):
        store = FileStore(root)
        await _append(store, run, 0, ["h/a"], [make_item("h/a"), make_item("h/a/0"),
                                               make_item("h/a/1"), make_item("h/a/1/x")])
        with other:
            assert await _items_of(store, run, 0) == _values("h/a", "h/a/0", "h/a/1", "h/a/1/x")
        assert await store.delete_items(key, ["h/a/0", "h/a/1/x"]) == 2
        expected = _values("h/a", "h/a/1")
        assert await _items_of(store, run, 0) == expected
        with other:
            assert await _items_of(store, run, 0) == expected
        with Process():
            assert await _items_of(store, run, 0) == expected


# -- against the memory store -----------------------------------------------------------------


class _Model:
    """Random operations on one run, applied to the file store (by one of two processes, each
    restarted now and then) and to the memory store."""

    def __init__(self, seed: int, store: FileStore) -> None:
        self.rng = random.Random(seed)
        self.store = store
        self.memory = MemoryStore()
        self.processes = [Process(), Process()]
        self.name = f"model-{seed}"
        self.run = make_run(self.name)
        self.key = key_of(self.run)
        self.now = T0
        self.numbers = itertools.count()

    def process(self) -> Process:
        if self.rng.random() < 0.1:
            self.processes[self.rng.randrange(2)] = Process()  # restarted
        return self.processes[self.rng.randrange(2)]

    async def known(self) -> list[str]:
        return list(await all_items(self.memory, self.key, now=self.now))

    def fresh(self, prefix: str) -> str:
        return f"{prefix}{next(self.numbers)}"

    def nested_keys(self, anchors: list[str], count: int) -> list[str]:
        keys: list[str] = []
        for _ in range(count):
            anchor = self.rng.choice(anchors) if anchors else self.fresh("h/")
            keys.append(f"{anchor}/{self.rng.choice(['', 'x/'])}{next(self.numbers)}")
        return keys

    async def operation(self) -> tuple[str, Callable[[Store], Awaitable[object]]]:
        rng, key, now = self.rng, self.key, self.now
        known = await self.known()
        shareable = [item for item in known if not item.startswith("w/")]
        choice = rng.choices(
            ["append", "put_items", "delete_items", "delete", "put_owned_items", "purge",
             "later"], weights=[8, 3, 2, 1, 2, 1, 2])[0]
        if choice == "append":
            current = await self.memory.get_run(key, now=now)
            if current is None:
                self.run = make_run(self.name, created_at=now)
                sequence = 0
            else:
                sequence = current.latest_sequence + 1
            run = self.run
            anchors = [self.fresh("h/") for _ in range(rng.randrange(2))]
            refs = [*rng.sample(shareable, min(len(shareable), rng.randrange(3))), *anchors]
            if rng.random() < 0.1:
                refs.append(self.fresh("gone/"))  # never written: refused
            items = [make_item(item) for item in anchors]
            items += [make_item(item) for item in self.nested_keys(refs, rng.randrange(3))]
            items += [make_item(f"w/{sequence}/{index}", owner=sequence)
                      for index in range(rng.randrange(2))]
            expires_at = rng.choice([None, None, now + rng.uniform(1, 8)])
            keep_latest = rng.choice([None, None, 1, 2, 3])
            return choice, lambda store: _append(
                store, run, sequence, refs, items, now=now, expires_at=expires_at,
                keep_latest=keep_latest)
        if choice == "put_items":
            keys = self.nested_keys(shareable, rng.randrange(1, 3))
            keys += rng.sample(shareable, min(len(shareable), rng.randrange(2)))
            expires_at = rng.choice([None, now + rng.uniform(1, 8)])
            create_only = rng.random() < 0.3
            loose = [make_item(item, f"{item}@{now}".encode(), expires_at=expires_at)
                     for item in keys]
            return choice, lambda store: store.put_items(key, loose, create_only=create_only,
                                                         now=now)
        if choice == "delete_items":
            doomed = rng.sample(known, min(len(known), rng.randrange(1, 4)))
            return choice, lambda store: store.delete_items(key, doomed)
        headers, _ = await self.memory.headers(key, before=None, limit=100, now=now)
        held = [header.sequence for header in headers] or [0]
        sequence = rng.choice(held)
        checkpoint_id = checkpoint_id_of(self.run, sequence)
        if choice == "delete":
            return choice, lambda store: store.delete(key, sequence, checkpoint_id=checkpoint_id)
        if choice == "put_owned_items":
            owned = [make_item(f"w/{sequence}/{self.rng.choice('pq')}{index}",
                               f"{now}".encode(), owner=sequence)
                     for index in range(rng.randrange(1, 3))]
            if_absent = rng.random() < 0.5
            return choice, lambda store: store.put_owned_items(
                key, owned, owner=sequence, checkpoint_id=checkpoint_id, if_absent=if_absent,
                now=now)
        if choice == "purge":
            return choice, lambda store: _purged(store, now)
        self.now += rng.uniform(0.5, 3)
        return choice, lambda store: _nothing()

    async def step(self, number: int) -> None:
        what, operation = await self.operation()
        with self.process():
            mine = await _outcome(operation(self.store))
        theirs = await _outcome(operation(self.memory))
        assert mine == theirs, f"step {number} ({what})"
        with self.process():
            found = await snapshot(self.store, self.key, now=self.now)
        assert found == await snapshot(self.memory, self.key, now=self.now), \
            f"step {number} ({what})"


async def _purged(store: Store, now: float) -> None:
    await store.purge_expired(now=now, limit=1000)


async def _nothing() -> None:
    pass


async def _outcome(result: Awaitable[object]) -> object:
    try:
        return await result
    except CheckpointError as exc:
        return type(exc)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_items_match_the_memory_store_through_random_operations(
    root: Path, seed: int
) -> None:
    """Appends (refs, nested and owned items, pruning, expiry, new lives), writes, deletions
    and purges, each by one of two processes that restart now and then: every operation has
    the memory store's outcome, and the stores then read the same."""
    model = _Model(seed, FileStore(root, fsync=False))
    with anyio.fail_after(120):
        for number in range(200):
            await model.step(number)
