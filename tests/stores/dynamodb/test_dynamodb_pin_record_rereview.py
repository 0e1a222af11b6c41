"""DynamoDB+S3: a run's first append too large for one transaction, over an ended life
whose removal's mark is refused (``_plan_first`` returns ``None`` and the append plans again
from the run item the refusal returned): what it ends in when the run keeps moving on, and
when the refusal returned a damaged run item, none, or one marked by another removal."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from fastcheckpoint.errors import CheckpointError, CorruptCheckpointError, SequenceConflict
from fastcheckpoint.stores.dynamodb import DynamoDBStore
from fastcheckpoint.testing._adapter import _append_items, _read
from fastcheckpoint.testing._builders import T0, key_of, make_item, make_run
from tests.stores._moto import moto_endpoint
from tests.stores.dynamodb.test_dynamodb import (
    DEADLINE,
    atomic_moto,
    aws_names,
    opened,
    provisioned,
    store,
)
from tests.stores.dynamodb.test_dynamodb_pin_record import MANY
from tests.stores.dynamodb.test_dynamodb_pin_record_left import _is_mark
from tests.stores.dynamodb.test_dynamodb_stale_pins import _emptied, anyio_backend

__all__ = ["anyio_backend", "atomic_moto", "aws_names", "moto_endpoint", "provisioned",
           "store"]

pytestmark = pytest.mark.anyio

NOW = T0 + 1000


async def _over_refused_marks(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch, provisioned: str,
    aws_names: tuple[str, str], meanwhile: str,
) -> tuple[Any, int]:
    """L0 expired (cached); a first append of 110 items (``MANY``) at ``NOW`` must remove
    it whole first. Just before its removal's mark(s), the run item changes (``meanwhile``):
    ``short-lives``, before every mark, another process begins a life over the ended one
    that has expired too by ``NOW``; ``deleted``, ``delete_run`` removes the run;
    ``marked``, another removal marked it (and died); ``damaged``, it was damaged. The
    append's outcome (``"landed"`` or its error) and how many marks it sent."""
    l0 = make_run("rereview", expires_at=T0 + 10)
    await _append_items(store, l0, 0, refs=["a"], items=[make_item("a")], expires_at=T0 + 10)
    ddb, _ = await store.clients()
    conditional = store._conditional
    marks: list[str] = []
    async with opened(provisioned, aws_names, prefix=store.prefix) as other:

        async def changed(operation: str, **params: Any) -> Any:
            if _is_mark(operation, params):
                marks.append(operation)
                at = T0 + 20 + 10 * len(marks)
                if meanwhile == "short-lives":
                    life = make_run("rereview", created_at=at, expires_at=at + 5)
                    await _append_items(other, life, 0, refs=["b"], now=at, expires_at=at + 5,
                                        items=[make_item("b", b"other")])
                elif len(marks) == 1 and meanwhile == "deleted":
                    await other.delete_run(key_of(l0))
                elif len(marks) == 1:
                    change = ("SET pg = :v ADD rev :one" if meanwhile == "marked"
                              else "SET bk = :v ADD rev :one")
                    value = {"BOOL": True} if meanwhile == "marked" else {"B": b"junk"}
                    await ddb.update_item(
                        TableName=store.table, Key=params["Key"], UpdateExpression=change,
                        ExpressionAttributeValues={":v": value, ":one": {"N": "1"}})
            return await conditional(operation, **params)

        monkeypatch.setattr(store, "_conditional", changed)
        mine = make_run("rereview", created_at=NOW)
        try:
            await _append_items(store, mine, 0, refs=MANY, now=NOW,
                                items=[make_item(name, b"mine") for name in MANY])
            outcome: Any = "landed"
        except CheckpointError as exc:
            outcome = exc
        monkeypatch.undo()
    if outcome == "landed":
        store._cache.pop(key_of(mine), None)
        read = await _read(store, mine, None, now=NOW)
        assert read is not None
        assert read[2] == dict.fromkeys(MANY, b"mine")
    return outcome, len(marks)


async def test_marks_refused_at_every_attempt_end_in_a_conflict_naming_no_ended_life(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch, provisioned: str,
    aws_names: tuple[str, str],
) -> None:
    """Before every mark, another process begins a life that has ended by the append's
    ``now``: each mark is refused, and the append plans again over that ended life, until
    its attempts run out. It gave up with the conflict of the run item it last planned
    from, that ended life's head (sequence 0 and its incarnation), which a
    ``SequenceConflict`` tells as the live run the store holds: the manager's next attempt
    then proposed checkpoint 1 of that ended life. Now it tells no run (the store holds no
    live one): the manager reads the run again and starts it anew."""
    key = key_of(make_run("rereview"))
    try:
        with anyio.fail_after(DEADLINE):
            await _emptied(store, key, monkeypatch)
            outcome, marks = await _over_refused_marks(
                store, monkeypatch, provisioned, aws_names, "short-lives")
            assert marks == 8  # bounded: one mark per attempt
            assert isinstance(outcome, SequenceConflict)
            assert (outcome.latest_sequence, outcome.incarnation) == (None, None)
            assert await store.get_run(key, now=NOW) is None
    finally:
        await _emptied(store, key, monkeypatch)


@pytest.mark.parametrize("meanwhile", ["deleted", "marked", "damaged"])
async def test_a_refused_mark_plans_from_what_it_returned(
    store: DynamoDBStore, monkeypatch: pytest.MonkeyPatch, provisioned: str,
    aws_names: tuple[str, str], meanwhile: str,
) -> None:
    """The refusal returned no run item (``delete_run`` finished: its run item goes last),
    so the append lands over none; or the run item marked by another removal, which the
    append finishes, then lands; or a damaged run item, dropped from the cache, so the
    append's blind first pin transaction is refused by it and the damage raised (nothing
    lands over it). Sound before this review too."""
    key = key_of(make_run("rereview"))
    try:
        with anyio.fail_after(DEADLINE):
            await _emptied(store, key, monkeypatch)
            outcome, marks = await _over_refused_marks(
                store, monkeypatch, provisioned, aws_names, meanwhile)
            assert marks == 1
            if meanwhile == "damaged":
                assert isinstance(outcome, CorruptCheckpointError)
            else:
                assert outcome == "landed"
    finally:
        await _emptied(store, key, monkeypatch)
