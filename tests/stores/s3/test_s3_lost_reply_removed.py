"""S3 store: a create whose slot PUT was applied but whose reply was lost, while another
process deletes the checkpoint, purges it, prunes it, deletes the run or starts it over before
the PUT is sent again (botocore or aiohttp resends the same request). The create must never be
written a second time: the deleted checkpoint back at the next sequence, or a stale checkpoint
above a newer one.

What S3 can tell: a tombstone (delete, purge of a run's newest expired checkpoint) keeps the
key taken and names the token of the slot it replaced, so the resend's 412 is recognised. A
key freed meanwhile (pruning, ``delete_run``) lets the resend recreate the slot, and nothing
in the bucket tells that write from a first one; the store counts the sends of its commit PUT
(aiohttp resends it on a dropped connection without botocore counting an attempt), and a
resent commit it cannot prove is reported as an unknown outcome, never written again.
"""

from __future__ import annotations

import re
from typing import Any

import anyio
import pytest

from fastcheckpoint import _ids
from fastcheckpoint.errors import SequenceConflict, StoreUnavailableError
from fastcheckpoint.stores._aws import counting_sends
from fastcheckpoint.stores.s3 import S3Store
from fastcheckpoint.testing import T0
from tests.stores._moto import moto_endpoint
from tests.stores.s3.test_s3 import DEADLINE, _FaultyProxy, _manager, faulty_proxy, s3_bucket
from tests.stores.s3.test_s3_safety import _SLOT_PUT, _keys, direct, proxied

__all__ = ["direct", "faulty_proxy", "moto_endpoint", "proxied", "s3_bucket"]

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


async def _slots(store: S3Store) -> list[str]:
    return [key for key in await _keys(store) if re.fullmatch(r"runs/[a-z2-7]+/c/\d{19}", key)]


_HISTORY = [{"role": "user", "content": f"m{number}"} for number in range(3)]


async def _create_across(
    faulty_proxy: type[_FaultyProxy],
    proxied: S3Store,
    meanwhile: Any,
    *,
    ttl_seconds: float | None = None,
    messages: bool = False,
    **config: Any,
) -> list[Any]:
    """``proxied`` creates ``{"n": 1}`` in run "r" (holding ``{"n": 0}``); its slot PUT is
    applied and held; ``meanwhile()`` runs (another process); then the reply is dropped and
    the PUT sent again. What the create returned, or the error it raised."""
    writer = _manager(proxied, **config)
    outcome: list[Any] = []

    async def create() -> None:
        try:
            outcome.append(
                await writer.create(
                    "r",
                    {"n": 1},
                    ttl_seconds=ttl_seconds,
                    messages=_HISTORY[:3] if messages else None,
                )
            )
        except Exception as exc:  # the outcome is asserted
            outcome.append(exc)

    await writer.create("r", {"n": 0}, messages=_HISTORY[:2] if messages else None)
    gate = faulty_proxy.hold(_SLOT_PUT, applied=True)
    async with anyio.create_task_group() as group:
        group.start_soon(create)
        await gate.reached()
        await meanwhile()
        gate.release.set()
    assert faulty_proxy.dropped == 1
    return outcome


@pytest.mark.parametrize("messages", [False, True], ids=["append", "append_with_items"])
async def test_a_resent_create_whose_checkpoint_was_deleted_meanwhile_is_not_written_again(
    faulty_proxy: type[_FaultyProxy], proxied: S3Store, direct: S3Store, messages: bool
) -> None:
    """The resend gets 412 on the tombstone the delete left: the create was applied (and
    then deleted), so it is acknowledged and not written again at the next sequence."""
    other = _manager(direct, history_min_entries=2)

    async def delete() -> None:
        listed = await other.list_checkpoints("r")
        assert [item.sequence for item in listed] == [1, 0]
        assert await other.delete(listed[0].checkpoint_id) is True

    with anyio.fail_after(DEADLINE):
        outcome = await _create_across(
            faulty_proxy, proxied, delete, messages=messages, history_min_entries=2
        )
        listed = await other.list_checkpoints("r")
        latest = await other.restore("r")
        items = [key for key in await _keys(direct) if key.startswith("items/")]

    assert bool(items) == messages  # the log parts: written by append_with_items
    assert [item.sequence for item in listed] == [0]
    assert latest is not None
    assert latest.state == {"n": 0}
    assert len(outcome) == 1
    assert not isinstance(outcome[0], Exception)
    assert outcome[0].metadata.sequence == 1


async def test_a_resent_create_whose_checkpoint_was_purged_meanwhile_is_not_written_again(
    faulty_proxy: type[_FaultyProxy], proxied: S3Store, direct: S3Store
) -> None:
    """The applied checkpoint expires and another process's cleanup purges it (the run's
    newest: a tombstone keeps its sequence) before the resend: acknowledged, not written
    again."""
    now = [T0]
    other = _manager(direct, clock=lambda: now[0])

    async def purge() -> None:
        now[0] = T0 + 20
        assert await other.cleanup_expired() == 1

    with anyio.fail_after(DEADLINE):
        outcome = await _create_across(
            faulty_proxy, proxied, purge, ttl_seconds=10, clock=lambda: T0, default_ttl_seconds=1000
        )
        listed = await other.list_checkpoints("r")
        slots = await _slots(direct)

    assert [item.sequence for item in listed] == [0]
    assert len(slots) == 2  # checkpoint 0 and the tombstone of 1
    assert len(outcome) == 1
    assert not isinstance(outcome[0], Exception)
    assert outcome[0].metadata.sequence == 1


async def test_a_resent_create_whose_checkpoint_was_pruned_meanwhile_is_not_written_again(
    faulty_proxy: type[_FaultyProxy], proxied: S3Store, direct: S3Store
) -> None:
    """Another process appends after the applied slot and prunes it (one checkpoint per
    run): the resend must neither bring it back at its sequence nor write it above the
    newer checkpoint (which would prune that one, and restore the stale state)."""
    other = _manager(direct, max_checkpoints_per_run=1)

    async def prune() -> None:
        created = await other.create("r", {"by": "other"})
        assert created.metadata.sequence == 2

    with anyio.fail_after(DEADLINE):
        outcome = await _create_across(faulty_proxy, proxied, prune, max_checkpoints_per_run=1)
        listed = await other.list_checkpoints("r")
        latest = await other.restore("r")
        slots = await _slots(direct)

    assert latest is not None
    assert latest.state == {"by": "other"}
    assert [item.sequence for item in listed] == [2]
    assert len(slots) == 1
    assert len(outcome) == 1
    # The resend recreated the pruned slot: taken back, and the outcome unknown (the create
    # may have been applied, or may have lost the sequence to a checkpoint pruned since).
    assert isinstance(outcome[0], StoreUnavailableError)
    assert "outcome unknown" in str(outcome[0])


async def test_a_resent_create_whose_run_was_deleted_meanwhile_stays_deleted(
    faulty_proxy: type[_FaultyProxy], proxied: S3Store, direct: S3Store
) -> None:
    """The run is deleted between the applied PUT and its resend. The resend recreates the
    slot (its key is free) and the create is acknowledged, as it was applied before the
    delete; the slot is a leftover of a deleted run: no read finds it, and the run's next
    start removes it."""
    other = _manager(direct)

    async def delete_run() -> None:
        assert await other.delete_run("r") == 2

    with anyio.fail_after(DEADLINE):
        outcome = await _create_across(faulty_proxy, proxied, delete_run)
        assert len(outcome) == 1
        assert not isinstance(outcome[0], Exception)
        latest = await other.restore("r")
        by_id = await other.restore_from(outcome[0].checkpoint_id)
        leftovers = await _slots(direct)
        started = await other.create("r", {"by": "other"})
        listed = await other.list_checkpoints("r")
        slots = await _slots(direct)

    assert outcome[0].metadata.sequence == 1
    assert latest is None
    assert by_id is None
    assert len(leftovers) == 1
    assert started.metadata.sequence == 0
    assert [item.checkpoint_id for item in listed] == [started.checkpoint_id]
    assert len(slots) == 1


async def test_a_resent_create_whose_run_was_started_over_meanwhile_is_not_written_again(
    faulty_proxy: type[_FaultyProxy], proxied: S3Store, direct: S3Store
) -> None:
    """The run is deleted and started over (a new incarnation, two checkpoints) between the
    applied PUT and its resend: the new run keeps only its own checkpoints."""
    other = _manager(direct)
    restarted: list[Any] = []

    async def start_over() -> None:
        assert await other.delete_run("r") == 2
        restarted.append(await other.create("r", {"by": "other", "n": 0}))
        restarted.append(await other.create("r", {"by": "other", "n": 1}))

    with anyio.fail_after(DEADLINE):
        outcome = await _create_across(faulty_proxy, proxied, start_over)
        listed = await other.list_checkpoints("r")
        latest = await other.restore("r")

    assert [item.checkpoint_id for item in listed] == [
        ckpt.checkpoint_id for ckpt in reversed(restarted)
    ]
    assert latest is not None
    assert latest.state == {"by": "other", "n": 1}
    assert len(outcome) == 1
    # The resend's 412 is on the new run's slot: applied to the old run or not, unknown.
    assert isinstance(outcome[0], StoreUnavailableError)
    assert "outcome unknown" in str(outcome[0])
    assert _ids.parse_checkpoint_id(listed[0].checkpoint_id) == _ids.parse_checkpoint_id(
        restarted[1].checkpoint_id
    )


async def test_the_store_counts_a_put_aiohttp_sends_again_on_a_dropped_connection(
    faulty_proxy: type[_FaultyProxy], proxied: S3Store
) -> None:
    """The reply of a PUT is dropped after S3 applied it, on a reused keep-alive connection:
    aiohttp sends it again on its own (botocore counts no retry); the store's count of sends
    sees both."""
    key = f"{proxied.prefix}probe"
    with anyio.fail_after(DEADLINE):
        client = await proxied.client()
        await client.head_bucket(Bucket=proxied.bucket)  # a connection to reuse
        faulty_proxy.drop_reply_to = re.compile(rf"^PUT \S*/{re.escape(key)}(\?|$)")
        with counting_sends() as resent:
            answer = await client.put_object(Bucket=proxied.bucket, Key=key, Body=b"x")
        with counting_sends() as once:
            await client.put_object(Bucket=proxied.bucket, Key=key, Body=b"y")

    assert faulty_proxy.dropped == 1
    assert answer["ResponseMetadata"]["RetryAttempts"] == 0  # unseen by botocore
    assert (resent.count, resent.answered, resent.resent) == (2, 1, True)
    assert (once.count, once.answered, once.resent) == (1, 1, False)


async def test_a_put_retried_after_slow_down_is_not_taken_for_a_resend(
    faulty_proxy: type[_FaultyProxy], proxied: S3Store
) -> None:
    """A 503 ``SlowDown`` answers a send S3 did not apply: botocore's retry is a second send,
    but no earlier send may have been applied unheard."""
    key = f"{proxied.prefix}probe"
    with anyio.fail_after(DEADLINE):
        client = await proxied.client()
        faulty_proxy.faults = ["slowdown"]
        with counting_sends() as sends:
            answer = await client.put_object(Bucket=proxied.bucket, Key=key, Body=b"x")

    assert answer["ResponseMetadata"]["RetryAttempts"] == 1
    assert (sends.count, sends.answered, sends.resent) == (2, 2, False)


async def test_a_create_refused_on_its_first_send_is_still_a_conflict(
    proxied: S3Store, direct: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No resend: a 412 on another writer's slot is the race it always was (a
    ``SequenceConflict``, the manager writes the create at the next sequence), not an
    unknown outcome."""
    refused: list[Any] = []
    taken = S3Store._taken

    async def spy(self: S3Store, *args: Any, resent: bool = False) -> Any:
        try:
            return await taken(self, *args, resent=resent)
        except SequenceConflict as exc:
            refused.append((resent, exc))
            raise

    monkeypatch.setattr(S3Store, "_taken", spy)
    writer = _manager(proxied)
    other = _manager(direct)
    with anyio.fail_after(DEADLINE):
        await writer.create("r", {"n": 0})
        assert (await other.create("r", {"by": "other"})).metadata.sequence == 1
        created = await writer.create("r", {"n": 1})
        listed = await other.list_checkpoints("r")
        latest = await other.restore("r")

    assert [resent for resent, _ in refused] == [False]
    assert created.metadata.sequence == 2
    assert [item.sequence for item in listed] == [2, 1, 0]
    assert latest is not None
    assert latest.state == {"n": 1}
