"""Randomised network faults between a store and its server (Redis, PostgreSQL, S3 and DynamoDB
on moto).

A fault proxy cuts connections mid-request, drops replies of requests the server applied, and
delays requests, at random with a fixed rate. Whatever it does:

* every create that returned a checkpoint is restorable, exactly once, with its content, at
  the sequence it was told;
* a create that failed raised a ``CheckpointError`` (nothing else), and left at most its one
  checkpoint behind;
* the run's sequences stay unique and gap-free;
* deletes report what happened.
"""

from __future__ import annotations

import random
import time

import anyio
import pytest

from fastcheckpoint import (
    CheckpointConfig,
    CheckpointError,
    CheckpointManager,
    CheckpointStatus,
    ConflictError,
    _ids,
)
from tests.reliability._audit import Ack, Figures, RunAudit, audit_run, scaled, state_for
from tests.reliability._stores import FAST_RETRY, Target
from tests.reliability.faults import (
    INJECTED,
    Fault,
    FaultPlan,
    FaultProxy,
    Wire,
    postgres_running,
)

pytestmark = pytest.mark.anyio

FAULT_RATE = 0.08
CREATES = 80
DELETES = 24
DELETE_FAULT_RATE = 0.25
CONFIG = CheckpointConfig(max_checkpoints_per_run=None, retry=FAST_RETRY)


def _deadline(operations: int) -> float:
    return 60.0 + 0.5 * operations


def _faulty(target: Target, plan: FaultPlan) -> FaultProxy:
    assert target.upstream is not None
    assert target.wire is not None
    return FaultProxy(target.upstream, target.wire, plan)


async def _audit(target: Target, run_id: str, acks: list[Ack], unconfirmed: set[str]) -> RunAudit:
    """Check the run through a store without faults."""
    store = target.store()
    try:
        with anyio.fail_after(_deadline(len(acks))):
            return await audit_run(CheckpointManager(store, config=CONFIG), run_id, acks,
                                   unconfirmed)
    finally:
        await store.aclose()


def _by_kind(proxy: FaultProxy) -> dict[str, int]:
    return {fault.value.replace("-", "_"): proxy.counts[fault] for fault in INJECTED}


def _described(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"[:300]


async def test_acknowledged_creates_survive_faults_exactly_once(
    network_target: Target, seed: int, figures: Figures
) -> None:
    run_id = f"faults-{seed}"
    count = scaled(CREATES)
    acks: list[Ack] = []
    unconfirmed: set[str] = set()
    foreign: list[str] = []
    with _faulty(network_target, FaultPlan.opening(seed, rate=FAULT_RATE)) as proxy:
        store = network_target.store(proxy.endpoint)
        manager = CheckpointManager(store, config=CONFIG)
        try:
            with anyio.fail_after(_deadline(count)):
                for step in range(count):
                    token = f"{seed}/{step}"
                    try:
                        created = await manager.create(run_id, state_for(token), force=True)
                    except CheckpointError:
                        unconfirmed.add(token)
                        continue
                    except Exception as exc:  # what is under test: nothing else escapes
                        foreign.append(_described(exc))
                        unconfirmed.add(token)
                        continue
                    assert created is not None
                    acks.append(Ack(token, created.metadata.sequence, created.checkpoint_id))
        finally:
            await store.aclose()
    audit = await _audit(network_target, run_id, acks, unconfirmed)
    figures.add("fault-creates", network_target.name, creates=count, faults=proxy.injected,
                **_by_kind(proxy), acknowledged=len(acks), raised=len(unconfirmed),
                lost=len(audit.lost), duplicated=len(audit.duplicated))
    assert min(proxy.counts[fault] for fault in INJECTED) >= 2
    replay = f"{figures.replay}, faults {dict(proxy.counts)}"
    assert not foreign, f"{replay}: creates raised non-CheckpointErrors: {foreign}"
    assert not audit.problems(), f"{replay}: {audit.problems()}"
    assert len(audit.unacknowledged) <= len(unconfirmed)


async def test_acknowledged_histories_restore_exactly_under_faults(
    network_target: Target, seed: int, figures: Figures
) -> None:
    """The same with a conversation that grows every step, stored as a log (messages of 4
    entries or more): lost replies and cut connections around appends that write pieces of
    the log never lose, mix up or duplicate an entry of an acknowledged checkpoint."""
    run_id = f"history-faults-{seed}"
    count = scaled(CREATES // 2)
    config = CheckpointConfig(max_checkpoints_per_run=None, retry=FAST_RETRY,
                              history_min_entries=4)
    conversation: list[str] = []
    sent: dict[str, list[str]] = {}
    foreign: list[str] = []
    with _faulty(network_target, FaultPlan.opening(seed, rate=FAULT_RATE)) as proxy:
        store = network_target.store(proxy.endpoint)
        manager = CheckpointManager(store, config=config)
        try:
            with anyio.fail_after(_deadline(count)):
                for step in range(count):
                    conversation.append(f"{seed}/{step}")
                    try:
                        created = await manager.create(run_id, {"step": step},
                                                       messages=conversation, force=True)
                    except CheckpointError:
                        continue
                    except Exception as exc:  # what is under test: nothing else escapes
                        foreign.append(_described(exc))
                        continue
                    assert created is not None
                    sent[created.checkpoint_id] = list(conversation)
        finally:
            await store.aclose()
    replay = f"{figures.replay}, faults {dict(proxy.counts)}"
    assert not foreign, f"{replay}: creates raised non-CheckpointErrors: {foreign}"
    clean = network_target.store()
    try:
        reader = CheckpointManager(clean, config=config)
        with anyio.fail_after(_deadline(len(sent))):
            for checkpoint_id, messages in sent.items():
                restored = await reader.restore_from(checkpoint_id)
                assert restored is not None, f"{replay}: {checkpoint_id} lost"
                assert restored.messages == messages, f"{replay}: {checkpoint_id} differs"
    finally:
        await clean.aclose()
    figures.add("fault-histories", network_target.name, creates=count, faults=proxy.injected,
                acknowledged=len(sent))
    assert sent, replay


async def _create_directly(target: Target, run_id: str, count: int) -> list[str]:
    store = target.store()
    try:
        manager = CheckpointManager(store, config=CONFIG)
        created = [await manager.create(run_id, state_for(f"{run_id}/{n}"), force=True)
                   for n in range(count)]
    finally:
        await store.aclose()
    return [checkpoint.checkpoint_id for checkpoint in created if checkpoint is not None]


async def _gone_and_kept(target: Target, run_id: str, ids: list[str]) -> tuple[set[str], int]:
    """Which of ``ids`` no longer restore, and how many live checkpoints the run holds."""
    store = target.store()
    try:
        manager = CheckpointManager(store, config=CONFIG)
        gone = {i for i in ids if await manager.restore_from(i) is None}
        listed = await manager.list_checkpoints(run_id, limit=10_000)
    finally:
        await store.aclose()
    return gone, len(listed)


async def test_deletes_under_lost_replies_report_what_happened(
    network_target: Target, seed: int, figures: Figures
) -> None:
    """``delete`` of a live checkpoint is True and ``delete_run`` counts what it removed,
    even when the reply to the request that did it was lost and the driver retried."""
    assert network_target.wire is not None
    await _deletes_under_lost_replies(network_target, seed, figures, network_target.wire,
                                      "fault-deletes")


async def _deletes_under_lost_replies(
    network_target: Target, seed: int, figures: Figures, wire: Wire, scenario: str
) -> None:
    run_id = f"deletes-{seed}"
    count = scaled(DELETES)
    with anyio.fail_after(_deadline(count)):
        ids = await _create_directly(network_target, run_id, count)
    doomed, wrong, raised = ids[: count // 2], [], 0
    confirmed: set[str] = set()
    plan = FaultPlan.opening(seed, rate=DELETE_FAULT_RATE, kinds=(Fault.LOSE_REPLY,))
    assert network_target.upstream is not None
    with FaultProxy(network_target.upstream, wire, plan) as proxy:
        store = network_target.store(proxy.endpoint)
        manager = CheckpointManager(store, config=CONFIG)
        try:
            with anyio.fail_after(_deadline(count)):
                for checkpoint_id in doomed:
                    try:
                        deleted = await manager.delete(checkpoint_id)
                    except CheckpointError:
                        raised += 1
                        continue
                    if deleted is not True:
                        wrong.append(f"delete({checkpoint_id}) returned {deleted!r}")
                    confirmed.add(checkpoint_id)
                gone, held = await _gone_and_kept(network_target, run_id, ids)
                removed: int | None
                try:
                    removed = await manager.delete_run(run_id)
                except CheckpointError:  # every try's reply lost: the retries ran out
                    removed, raised = None, raised + 1
        finally:
            await store.aclose()
    if removed is None:  # nothing to count: finish the delete without faults
        finisher = network_target.store(None)
        try:
            await CheckpointManager(finisher, config=CONFIG).delete_run(run_id)
        finally:
            await finisher.aclose()
    elif removed != held:
        wrong.append(f"delete_run removed {held} checkpoints and returned {removed}")
    after, _ = await _gone_and_kept(network_target, run_id, ids)
    figures.add(scenario, network_target.name, deletes=len(doomed) + 1,
                faults=proxy.injected, wrong_results=len(wrong), raised=raised)
    assert proxy.counts[Fault.LOSE_REPLY] >= 2
    replay = f"{figures.replay}, faults {dict(proxy.counts)}"
    assert confirmed <= gone <= set(doomed), f"{replay}: deletes removed other checkpoints"
    assert after == set(ids), f"{replay}: delete_run left checkpoints behind"
    assert not wrong, f"{replay}: {wrong}"


PG_CREATES = 40
PG_WRITERS = 3
PG_FAULT_RATE = 0.25
APPEND_FUNCTION = b'"fc_append"('
"""How the append function's call reads in the statement the PostgreSQL store prepares."""
DELETE_FUNCTIONS = b'"fc_delete'
"""The same for ``delete`` and ``delete_run`` (``fc_delete(`` and ``fc_delete_run(``)."""
SCENARIOS = {Fault.LOSE_REPLY: "pg-lost-commit", Fault.CUT: "pg-cut-commit"}
PG_CONFIG = CheckpointConfig(max_checkpoints_per_run=None, retry=FAST_RETRY,
                             max_sequence_retries=1000)


@pytest.mark.parametrize("fault", [Fault.LOSE_REPLY, Fault.CUT],
                         ids=["lost-commit-reply", "cut-before-commit"])
async def test_postgres_commits_once_whatever_the_connection_does(
    postgres_store_target: Target, seed: int, figures: Figures, fault: Fault
) -> None:
    """Faults only on the requests that run the store's append function, while several
    writers race on one run: a lost reply after the server committed the append (the retry
    must find its write token and report that one checkpoint, although other writers may have
    appended since), or a connection cut after the append ran and before the ``Sync`` that
    commits it (the server rolls back; the retry writes it once). No half-written checkpoint,
    no duplicate, and the run row agrees with the log."""
    target = postgres_store_target
    assert target.upstream is not None
    run_id = f"pg-{fault.value}-{seed}"
    count = scaled(PG_CREATES)
    acks: list[Ack] = []
    unconfirmed: set[str] = set()

    async def writer(name: int, endpoint: str) -> None:
        store = target.store(endpoint)
        manager = CheckpointManager(store, config=PG_CONFIG)
        try:
            for step in range(name, count, PG_WRITERS):
                token = f"{seed}/{step}"
                try:
                    created = await manager.create(run_id, state_for(token), force=True)
                except CheckpointError:
                    unconfirmed.add(token)
                    continue
                assert created is not None
                acks.append(Ack(token, created.metadata.sequence, created.checkpoint_id))
        finally:
            await store.aclose()

    plan = FaultPlan.opening(seed, rate=PG_FAULT_RATE, kinds=(fault,))
    with FaultProxy(target.upstream, postgres_running(APPEND_FUNCTION), plan) as proxy:
        with anyio.fail_after(_deadline(count)):
            async with anyio.create_task_group() as writers:
                for name in range(PG_WRITERS):
                    writers.start_soon(writer, name, proxy.endpoint)
    audit = await _audit(target, run_id, acks, unconfirmed)
    store = target.store()
    try:
        info = await CheckpointManager(store, config=CONFIG).get_run(run_id)
    finally:
        await store.aclose()
    figures.add(SCENARIOS[fault], target.name, creates=count, faults=proxy.injected,
                acknowledged=len(acks), raised=len(unconfirmed), lost=len(audit.lost),
                duplicated=len(audit.duplicated))
    replay = f"{figures.replay}, faults {dict(proxy.counts)}"
    assert proxy.counts[fault] >= 2
    assert not audit.problems(), f"{replay}: {audit.problems()}"
    assert len(audit.unacknowledged) <= len(unconfirmed)
    assert info is not None
    assert (info.checkpoint_count, info.latest_sequence) == (audit.listed, audit.listed - 1), (
        f"{replay}: the run row says {info.checkpoint_count} checkpoints up to sequence "
        f"{info.latest_sequence}; the log holds {audit.listed}")


async def test_postgres_deletes_report_what_happened_when_their_commit_reply_is_lost(
    postgres_store_target: Target, seed: int, figures: Figures
) -> None:
    """:func:`test_deletes_under_lost_replies_report_what_happened` with every lost reply on a
    call of the delete functions, after the server committed it."""
    await _deletes_under_lost_replies(postgres_store_target, seed, figures,
                                      postgres_running(DELETE_FUNCTIONS), "pg-lost-delete")


async def test_postgres_a_create_only_item_write_whose_reply_is_lost_succeeds(
    postgres_store_target: Target,
) -> None:
    """Insert-if-absent of items (``put_items(create_only=True)``): when the server committed
    the write and its reply was lost, the retry recognises its own write instead of reporting
    the item as taken by someone else."""
    from fastcheckpoint.stores._base import Item

    target = postgres_store_target
    assert target.upstream is not None
    direct = target.store()
    manager = CheckpointManager(direct, config=CONFIG)
    try:
        await manager.create("items", state_for("items/0"), force=True)
        key = _ids.key_of("items")
        plan = FaultPlan(script=[Fault.LOSE_REPLY])
        with FaultProxy(target.upstream, postgres_running(b'"fc_put_items"('), plan) as proxy:
            store = target.store(proxy.endpoint)
            try:
                with anyio.fail_after(_deadline(1)):
                    await store.put_items(
                        key, [Item(key="k", value=b"ours")], create_only=True, now=time.time())
            finally:
                await store.aclose()
        held = await direct.get_items(key, ["k"], now=time.time())
        with pytest.raises(ConflictError):  # a second writer still finds it taken
            await direct.put_items(
                key, [Item(key="k", value=b"theirs")], create_only=True, now=time.time())
    finally:
        await direct.aclose()
    assert proxy.counts == {Fault.LOSE_REPLY: 1, Fault.PASS: 1}
    assert held == {"k": b"ours"}


GUARDED_ROUNDS = 20


async def test_guarded_pauses_under_lost_replies_hold_their_condition(
    network_target: Target, seed: int, figures: Figures
) -> None:
    """``pause(latest_sequence=s)`` through lost replies and cut connections, with another
    process (no faults) creating a checkpoint before it in about half of the rounds: a pause
    acknowledged is one whose checkpoint was the newest (never when the other process's came
    after it), a pause refused leaves the run active, and every acknowledged create stays
    restorable once (also past whatever a pause that failed half-way left behind, such as
    the S3 store's guard at the next sequence)."""
    run_id = f"guarded-{seed}"
    rng = random.Random(seed)
    rounds = scaled(GUARDED_ROUNDS)
    acks: list[Ack] = []
    unconfirmed: set[str] = set()
    foreign: list[str] = []
    wrong: list[str] = []
    paused = refused = 0
    clean = network_target.store(None)
    other = CheckpointManager(clean, config=CONFIG)
    plan = FaultPlan.opening(seed, rate=0.2, kinds=(Fault.LOSE_REPLY, Fault.CUT))
    with _faulty(network_target, plan) as proxy:
        store = network_target.store(proxy.endpoint)
        manager = CheckpointManager(store, config=CONFIG)
        try:
            with anyio.fail_after(_deadline(4 * rounds)):
                for step in range(rounds):
                    token = f"{seed}/{step}"
                    try:
                        created = await manager.create(run_id, state_for(token), force=True)
                    except CheckpointError:
                        unconfirmed.add(token)
                        continue
                    acks.append(Ack(token, created.metadata.sequence, created.checkpoint_id))
                    overtaken = rng.random() < 0.5
                    if overtaken:
                        mine = f"{seed}/{step}/other"
                        newer = await other.create(run_id, state_for(mine), force=True)
                        acks.append(Ack(mine, newer.metadata.sequence, newer.checkpoint_id))
                    try:
                        await manager.pause(run_id, {"step": step},
                                            latest_sequence=created.metadata.sequence)
                    except CheckpointError:
                        pass
                    except Exception as exc:  # what is under test: nothing else escapes
                        foreign.append(_described(exc))
                    run = await other.get_run(run_id)
                    assert run is not None
                    if run.status is CheckpointStatus.PAUSED:
                        paused += 1
                        if overtaken:
                            wrong.append(f"round {step}: paused over a newer checkpoint")
                        await other.approve(run_id, approver="test")
                    else:
                        refused += 1
                        if run.status is not CheckpointStatus.ACTIVE:
                            wrong.append(f"round {step}: the run is {run.status.value}")
        finally:
            await store.aclose()
            await clean.aclose()
    audit = await _audit(network_target, run_id, acks, unconfirmed)
    figures.add("fault-guarded-pauses", network_target.name, rounds=rounds,
                faults=proxy.injected, paused=paused, refused=refused, wrong=len(wrong))
    replay = f"{figures.replay}, faults {dict(proxy.counts)}"
    assert proxy.injected >= 2
    assert not foreign, f"{replay}: pauses raised non-CheckpointErrors: {foreign}"
    assert not wrong, f"{replay}: {wrong}"
    assert not audit.problems(), f"{replay}: {audit.problems()}"
