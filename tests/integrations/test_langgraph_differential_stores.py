"""The differential machines of test_langgraph_differential.py on the server stores: Redis
(also through the Redis Cluster code path, on the plain server), PostgreSQL, S3 and
DynamoDB+S3 (moto in server mode).

Each machine is one of that module's (one saver; log merges; two savers on one store, as two
processes; delta channels) with its store swapped: every example gets a backing of its own
(a Redis key prefix, its keys deleted afterwards; the test's PostgreSQL schema, emptied
afterwards; an S3 prefix; a DynamoDB table of its own with a small size threshold, so large
checkpoints and items go to the bucket), and every saver, and every probe that asks the
store whether a save landed, opens a store object of its own over it (another process: its
connections, caches and hints its own).

No TTLs: the savers' clocks never reach an expiry, so Redis's native expiry (on the server's
real clock) plays no part.

CI runs a few fixed (derandomized) examples of the one-saver and two-saver machines on each
store, and of the others on Redis and PostgreSQL: about 12 s of the test process's CPU in
all, 20 to 30 s on a 2-core machine, more when it is busy (moto serves one request at a
time). Hunt with random ones, every machine on every store: ``LGDIFF_EXAMPLES=300``
(examples per machine and store), ``-k redis`` to pick a store.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from hypothesis.stateful import run_state_machine_as_test

from fastcheckpoint import MemoryStore
from fastcheckpoint.stores import CheckpointStore
from tests._backings import (
    Backing,
    DynamoDBBacking,
    PostgresBacking,
    RedisBacking,
    S3Backing,
)
from tests.integrations.test_langgraph_differential import (
    HUNT,
    DeltaMachine,
    DifferentialMachine,
    MemoryMachine,
    MergingMachine,
    TwoProcessMachine,
    machine_settings,
)
from tests.test_model_checking_stores import _redis_url, postgres_schema

DYNAMODB_THRESHOLD = 512
"""Bytes past which the DynamoDB store puts a checkpoint or an item in the bucket: a few
messages pass it, so some of each example's checkpoints and values go there and some not."""


class StoreMachine(DifferentialMachine):
    """A machine of test_langgraph_differential.py on ``backing``: first in the bases of a
    machine there, so its ``_store`` (each saver's store) is this one's."""

    STORE_KIND = "server"

    def __init__(self, backing: Backing) -> None:
        super().__init__()
        self.backing = backing
        # Runs when the machine closes: after the savers, before the portal.
        self._exit.callback(self.call, backing.clean)
        try:
            self.call(backing.prepare)
        except BaseException:
            self.close()
            raise

    def _store(self) -> Any:
        return self.backing.open()


class OneSaver(StoreMachine, MemoryMachine):
    pass


class Merging(StoreMachine, MergingMachine):
    pass


class TwoSavers(StoreMachine, TwoProcessMachine):
    pass


class Delta(StoreMachine, DeltaMachine):
    pass


MACHINES: dict[str, type[StoreMachine]] = {
    "one-saver": OneSaver, "merging": Merging, "two-savers": TwoSavers, "delta": Delta}


# -- the backings -----------------------------------------------------------------------------


class MemoryBacking(Backing):
    """One memory store that every saver shares (the machines' own backing)."""

    def __init__(self) -> None:
        self.store = MemoryStore()

    def open(self) -> CheckpointStore:
        return self.store


# -- the tests ----------------------------------------------------------------------------------


EXAMPLES = {
    ("redis", "one-saver"): 6, ("redis", "merging"): 3, ("redis", "two-savers"): 6,
    ("redis", "delta"): 3, ("redis-cluster-path", "two-savers"): 4,
    ("postgres", "one-saver"): 4, ("postgres", "two-savers"): 4, ("postgres", "delta"): 2,
    ("s3", "one-saver"): 1, ("s3", "two-savers"): 2,
    ("dynamodb", "one-saver"): 1, ("dynamodb", "two-savers"): 2,
}
"""CI's fixed examples per machine and store."""

KINDS = ("redis", "redis-cluster-path", "postgres", "s3", "dynamodb")
CASES = list(itertools.product(KINDS, MACHINES)) if HUNT else list(EXAMPLES)
"""Hunting, every machine on every store."""


@pytest.fixture
def backing(request: pytest.FixtureRequest) -> Iterator[Callable[[], Backing]]:
    """What builds each example's backing for the store kind of the test."""
    kind = request.param
    if kind == "memory":
        yield MemoryBacking
    elif kind in ("redis", "redis-cluster-path"):
        url = _redis_url()
        yield lambda: RedisBacking(url, cluster=kind != "redis", tag="fclgdiff")
    elif kind == "postgres":
        with postgres_schema(request.config) as (target, schema):
            yield lambda: PostgresBacking(target, schema)
    elif kind == "s3":
        pytest.importorskip("moto")
        bucket, endpoint = request.getfixturevalue("s3_bucket_for_savers")
        yield lambda: S3Backing(endpoint, bucket, tag="lgdiff")
    else:
        pytest.importorskip("moto")
        _, bucket, endpoint = request.getfixturevalue("dynamodb_for_savers")
        yield lambda: DynamoDBBacking(
            endpoint, bucket, threshold=DYNAMODB_THRESHOLD, tag="lgdiff")


@pytest.mark.parametrize(
    ("backing", "machine"),
    CASES,
    indirect=["backing"],
    ids=[f"{kind}-{machine}" for kind, machine in CASES],
)
def test_the_saver_agrees_with_langgraph(
    backing: Callable[[], Backing], machine: str, request: pytest.FixtureRequest
) -> None:
    kind = request.node.callspec.params["backing"]
    machine_class = MACHINES[machine]
    run_state_machine_as_test(lambda: machine_class(backing()),
                              settings=machine_settings(EXAMPLES.get((kind, machine), 0)))


# -- what the hunts found -----------------------------------------------------------------------


def _put(machine: DifferentialMachine, thread_id: str, changes: list[tuple[Any, ...]],
         unversioned: Sequence[tuple[Any, ...]] = (), run_id: str = "run-a") -> None:
    machine.put(thread_id=thread_id, checkpoint_ns="", parent_mode="continue", fork_index=0,
                changes=changes, unversioned=list(unversioned), run_id=run_id, source="loop",
                config_extra={})


FOUND_ON = ["memory", "redis", "redis-cluster-path", "postgres"]
"""The stores the hunts' findings are replayed on (S3 and DynamoDB: 5 s each, and the saver
behaviour they pin is tested on every store in test_langgraph_logs.py)."""


@pytest.mark.parametrize("backing", FOUND_ON, indirect=True)
def test_a_save_on_a_parent_another_process_deleted_sends_every_value(
    backing: Callable[[], Backing],
) -> None:
    """One process deletes a thread and copies another into it; a second one, which never
    saw the deletion, continues a checkpoint of the thread's earlier life. The save lands
    (that process cannot tell) and, its parent gone, sends every value: ``data``, unchanged
    since the deleted checkpoint, reads back, where ``InMemorySaver`` (whose delete took
    the value) has none. The machines give the reference those values again."""
    machine = TwoSavers(backing())
    try:
        machine.build(history_min_entries=None, keep_latest=None, eager=False)
        _put(machine, "t0", [("append", 1, 0)])
        _put(machine, "t1", [("data", 1)])
        machine.delete_thread(thread_id="t1")
        machine.copy_thread(source="t0", into="t1")
        machine.switch_process(by=1)
        _put(machine, "t1", [("count", 1)])
        latest = machine.call(machine.saver.aget_tuple, {"configurable": {"thread_id": "t1"}})
        assert latest is not None
        assert latest.checkpoint["channel_values"] == {
            "data": {"key": 1, "nested": [1]}, "count": 1}
        machine.compare_list(None)
    finally:
        machine.close()


@pytest.mark.parametrize("backing", FOUND_ON, indirect=True)
def test_a_list_edited_in_place_then_its_parent_deleted_by_its_run(
    backing: Callable[[], Backing],
) -> None:
    """A node edits the list in place (no new version: not stored), then
    ``adelete_for_runs`` deletes that checkpoint; the next save names a value only it named,
    finds it removed and sends every value as it is now, the edit included (logs begin
    anew), where ``InMemorySaver`` keeps the list as stored. The machines version the list
    at such a save: the node returns it."""
    machine = OneSaver(backing())
    try:
        machine.build(history_min_entries=2, keep_latest=None, eager=False)
        _put(machine, "t0", [("append", 2, 0)])
        _put(machine, "t0", [("count", 1)], unversioned=[("swap", 0, 1)], run_id="run-b")
        machine.delete_for_runs(run_ids=["run-b"])
        _put(machine, "t0", [], run_id="run-c")
        first = machine.saved[machine.known[("t0", "")][0]].values["messages"]
        latest = machine.call(machine.saver.aget_tuple, {"configurable": {"thread_id": "t0"}})
        assert latest is not None
        assert [message.id for message in latest.checkpoint["channel_values"]["messages"]] == \
            [first[1].id, first[0].id]  # swapped
        machine.compare_list(None)
    finally:
        machine.close()
