"""Records and transaction operations of the DynamoDB store's item space, shared items and
labels: built here, sent by ``dynamodb.py`` (no I/O here).

An item lives at ``i#<key>``. An unowned item holds its value there. An item owned by
checkpoint ``s`` is an *anchor* there (its owner, ``o``) and holds its value at
``k#<s>#<key>``, next to the checkpoint, so one Query reads a checkpoint with the items it
owns. Every write of an item carries a random token (``wt``): a resend refused because its
first send was applied recognises its own records, and a removal can say "only while it is
the record I read".

A shared item is counted at ``c#<key>`` (``rc``: how many held checkpoints name it), in the
same transaction as every append and removal, so that updating a count never rewrites a
large value. A count that may have reached zero enters the expiry index at 0, and the
cleanup loop removes the item, only while the count is still zero, marking the count
*condemned* in the same transaction: an append naming the item without writing it is then
refused (its writer saw the item before the removal) rather than acknowledged without it.
The mark goes after ``CONDEMNED_SECONDS``.

Items nested under a shared item (keys starting with ``<key>/``) go with it. When there are
any, its removal marks the count *nesting* too (``np``, a token) and enters it in the expiry
index at once: the nested items are then deleted in transactions that each check the mark
and that no key they concern is named meanwhile (see :func:`parent_check` for the keys the
removed item is nested under), condemning the counts of the keys they delete (see
:func:`condemn_unnamed`), and the mark
goes last, with the item's key in the run item's list of items with nested
items (which reads consult; see ``DynamoDBStore._end_nesting``). A removal interrupted in
between is completed by the next cleanup pass, and while the mark stands no append can bring
the item back (see :func:`counter_raise`), so nested items of the old item never show under a
new one.

Operations carry private tags (keys starting with ``_``), stripped before sending:
``_group`` (a failed condition drops every operation of the group: an item's value and its
anchor), ``_instead`` (what replaces an operation so dropped), ``_fatal`` (a failed
condition cancels the whole change: a guard), ``_gone`` (the shared item whose condemned
count cancelled it), ``_absent`` (a put that keeps a live item: refused by an anchor, it
checks the value the anchor points to) and ``_over_damage`` (a put sent again to replace the
damaged item that refused it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from fastcheckpoint.stores import _dynamodb_layout as layout
from fastcheckpoint.stores._base import RunRecord
from fastcheckpoint.stores._dynamodb_attrs import Names, n, s, strings

__all__ = [
    "LABEL_TTL_SLACK",
    "PIN_GRACE_SECONDS",
    "Value",
    "anchor_record",
    "condemn",
    "condemn_unnamed",
    "counter_change",
    "counter_raise",
    "delete_op",
    "delete_when",
    "expiry_attributes",
    "fence",
    "guard_check",
    "guard_delete",
    "guard_record",
    "guard_touch",
    "label_deletes",
    "label_puts",
    "label_refreshes",
    "nesting_check",
    "nesting_done",
    "owned_record",
    "parent_check",
    "pin_stamped",
    "plain_record",
    "put_op",
    "shared_group",
    "strip_tags",
    "wants_blob",
]

LABEL_TTL_SLACK: Final = 30 * 86400.0
"""How far past the run item's own ``ttl`` its label entries' ``ttl`` is set: they are
refreshed (one update each, in an append) only when the run outlives that."""


PIN_GRACE_SECONDS: Final = 3600.0
"""How long after it was written (``pa``, the writer's wall clock) a shared item or a count an
append wrote before its transaction (a pin) may still be that append's, under way: longer
than any append takes (each of its requests is bounded by the clients' timeouts, 5 s to
connect and 30 s to read for those the store builds, times the retry policy's attempts: about
4 minutes at the default 6, and an append sends a handful of them in series after its first
pin), plus any skew between the clocks of the writer and of the process that judges the pin.
An older pin of no run item is stale: its append failed (its outcome unknown, its undo
failed) or its life was removed."""


@dataclass(frozen=True)
class Value:
    """An item value as an item holds it: the bytes, or the S3 key of a blob holding them."""

    inline: bytes | None = None
    blob: str | None = None

    def attributes(self) -> dict[str, Any]:
        if self.blob is not None:
            return {"vb": s(self.blob)}
        return {"v": {"B": self.inline or b""}}


def wants_blob(size: int, threshold: int) -> bool:
    """Whether an item record of ``size`` bytes keeps its value in S3."""
    return size > threshold


def expiry_attributes(run_key: str, expires_at: float | None, *, indexed: bool) -> dict[str, Any]:
    """``x`` (exact) and ``ttl`` (native); ``xpk``/``xat`` when the cleanup loop must find it."""
    if expires_at is None:
        return {}
    attributes: dict[str, Any] = {"x": n(expires_at), "ttl": n(layout.ttl_of(expires_at))}
    if indexed:
        attributes["xpk"] = s(f"x#{layout.shard_of(run_key)}")
        attributes["xat"] = n(expires_at)
    return attributes


def plain_record(
    run_key: str, key: str, value: Value, expires_at: float | None, token: str
) -> dict[str, Any]:
    """An unowned item: its value at ``i#<key>``."""
    return {
        "PK": s(layout.partition(run_key)),
        "SK": s(layout.item_sk(key)),
        **value.attributes(),
        **expiry_attributes(run_key, expires_at, indexed=True),
        "wt": s(token),
    }


def anchor_record(
    run_key: str, key: str, owner: int, expires_at: float | None, token: str, *, indexed: bool
) -> dict[str, Any]:
    """An owned item's place in the key space: its owner; the value is next to the owner.
    ``indexed`` when it expires on its own (``put_items``), not with its checkpoint."""
    return {
        "PK": s(layout.partition(run_key)),
        "SK": s(layout.item_sk(key)),
        "o": n(owner),
        **expiry_attributes(run_key, expires_at, indexed=indexed),
        "wt": s(token),
    }


def owned_record(
    run_key: str, key: str, owner: int, value: Value, expires_at: float | None, token: str
) -> dict[str, Any]:
    """An owned item's value, next to its checkpoint (removed with it, never indexed)."""
    return {
        "PK": s(layout.partition(run_key)),
        "SK": s(layout.owned_sk(owner, key)),
        **value.attributes(),
        **expiry_attributes(run_key, expires_at, indexed=False),
        "wt": s(token),
    }


def put_op(item: dict[str, Any], condition: str | None = None, names: Names | None = None,
           **tags: Any) -> dict[str, Any]:
    put: dict[str, Any] = {"Item": item}
    if condition is not None:
        put["ConditionExpression"] = condition
        put["ReturnValuesOnConditionCheckFailure"] = "ALL_OLD"
    if names is not None:
        put.update(names.params())
    return {"Put": put, **tags}


def delete_op(pk: str, sort_key: str, **tags: Any) -> dict[str, Any]:
    return {"Delete": {"Key": {"PK": s(pk), "SK": s(sort_key)}}, **tags}


def delete_when(pk: str, sort_key: str, attribute: str, value: dict[str, Any],
                **tags: Any) -> dict[str, Any]:
    """Delete a record only while ``attribute`` holds ``value`` (it may have been rewritten)."""
    names = Names()
    operation = delete_op(pk, sort_key, **tags)
    operation["Delete"]["ConditionExpression"] = f"{names(attribute)} = {names.value(value)}"
    operation["Delete"].update(names.params())
    return operation


# -- guards ------------------------------------------------------------------------------------
#
# Items written to an existing checkpoint (``put_owned_items``) touch its guard, a small
# record next to it. A removal of the checkpoint, which reads what the checkpoint owns before
# it commits, deletes the guard only while it is as it read it (or checks that there is
# none): a write that lands in between cancels the removal, which then reads again, so no
# owned item outlives its checkpoint. The guard also keeps the token it replaced (``pw``,
# "" for none): a writer that knew the token before its write can tell, from the guard, that
# no other write came between (see ``DynamoDBStore._read_known``).


def guard_record(run_key: str, owner: int, token: str, refs: Sequence[str]) -> dict[str, Any]:
    """The guard of a checkpoint that names shared items, written with it: it keeps the
    refs, and carries no native ``ttl`` (see ``DynamoDBStore._removal``)."""
    return {
        "PK": s(layout.partition(run_key)),
        "SK": s(layout.guard_sk(owner)),
        "wt": s(token),
        "rf": strings(refs),
    }


def guard_touch(run_key: str, owner: int, token: str) -> dict[str, Any]:
    names = Names()
    return {"Update": {
        "Key": {"PK": s(layout.partition(run_key)), "SK": s(layout.guard_sk(owner))},
        "UpdateExpression": (
            f"SET {names('pw')} = if_not_exists({names('wt')}, {names.value(s(''))}), "
            f"{names('wt')} = {names.value(s(token))}"),
        **names.params(),
    }}


def guard_delete(pk: str, owner: int, token: str) -> dict[str, Any]:
    operation = delete_when(pk, layout.guard_sk(owner), "wt", s(token))
    operation["_fatal"] = True
    return operation


def guard_check(pk: str, owner: int) -> dict[str, Any]:
    names = Names()
    return {"ConditionCheck": {
        "Key": {"PK": s(pk), "SK": s(layout.guard_sk(owner))},
        "ConditionExpression": f"attribute_not_exists({names('PK')})",
        **names.params(),
    }, "_fatal": True}


# -- reference counts --------------------------------------------------------------------------


def counter_change(run_key: str, key: str, change: int, *, existing: bool = False
                   ) -> dict[str, Any]:
    """Update of the count of shared item ``key`` by ``change``. A raise must land with (or
    before) the checkpoint naming the key (see :func:`counter_raise`); a lowering may land
    after the removal, and puts the count in the expiry index (at 0), where the cleanup loop
    checks whether it reached zero. ``existing``: only while the count is there (never
    created by the change)."""
    names = Names()
    expression = f"ADD {names('rc')} {names.value(n(change))}"
    if change < 0:
        expression = (f"SET {names('xpk')} = {names.value(s(f'x#{layout.shard_of(run_key)}'))}, "
                      f"{names('xat')} = {names.value(n(0))} " + expression)
    update: dict[str, Any] = {
        "Key": {"PK": s(layout.partition(run_key)), "SK": s(layout.counter_sk(key))},
        "UpdateExpression": expression,
    }
    if existing:
        update["ConditionExpression"] = f"attribute_exists({names('rc')})"
    return {"Update": {**update, **names.params()}}


def counter_raise(run_key: str, key: str, change: int, *, writing: bool) -> dict[str, Any]:
    """The raise of shared item ``key``'s count by an append naming it.

    Not ``writing`` it (the append names an item written before): only while the count is
    not *condemned* (``gn``: the cleanup loop removed the item) and no removal is taking the
    items nested under the key (``np``), else the append's whole transaction is cancelled
    (``_fatal``; ``_gone`` names the key): the item it names is gone, or what the append
    writes under it could be taken.
    ``writing`` it (its put, ``shared_group(key)``, is in the same transaction): the put
    brings the item back, so the raise clears the mark, unless the removal is still taking
    the items nested under the old one (``np``) or the count is fenced (``nf``, see
    :func:`fence`): then it fails like a put dropped because a live item is there, and
    either way the raise is replaced by the checked one
    (``_instead``), since that item may be condemned by the time the transaction is sent
    again."""
    names = Names()
    update: dict[str, Any] = {
        "Key": {"PK": s(layout.partition(run_key)), "SK": s(layout.counter_sk(key))},
    }
    if writing:
        update["UpdateExpression"] = (
            f"ADD {names('rc')} {names.value(n(change))} REMOVE {names('gn')}")
        update["ConditionExpression"] = (
            f"attribute_not_exists({names('np')}) AND attribute_not_exists({names('nf')})")
        update.update(names.params())
        return {"Update": update, "_group": shared_group(key),
                "_instead": counter_raise(run_key, key, change, writing=False)}
    update["UpdateExpression"] = f"ADD {names('rc')} {names.value(n(change))}"
    update["ConditionExpression"] = (
        f"attribute_not_exists({names('gn')}) AND attribute_not_exists({names('np')})")
    update.update(names.params())
    return {"Update": update, "_fatal": True, "_gone": key}


def pin_stamped(operation: Mapping[str, Any], at: float) -> dict[str, Any]:
    """A pin's put of a shared item, or raise of a count, stamped with when it is sent
    (``pa``, wall clock; see :data:`PIN_GRACE_SECONDS`): a later pin restamps the record."""
    stamped = dict(operation)
    if "Put" in operation:
        put = operation["Put"]
        stamped["Put"] = {**put, "Item": {**put["Item"], "pa": n(at)}}
    else:
        update = dict(operation["Update"])
        expression = update["UpdateExpression"]
        update["UpdateExpression"] = (f"SET #pa = :pa, {expression[4:]}"
                                      if expression.startswith("SET ")
                                      else f"SET #pa = :pa {expression}")
        update["ExpressionAttributeNames"] = {**update.get("ExpressionAttributeNames", {}),
                                              "#pa": "pa"}
        update["ExpressionAttributeValues"] = {**update.get("ExpressionAttributeValues", {}),
                                               ":pa": n(at)}
        stamped["Update"] = update
    if "_instead" in operation:
        stamped["_instead"] = pin_stamped(operation["_instead"], at)
    return stamped


def shared_group(key: str) -> str:
    """The ``_group`` of a shared item's put and the raise of its count that goes with it."""
    return f"shared:{key}"


def condemn(run_key: str, key: str, now: float, until: float,
            nesting: str | None = None, *, gone: bool = True) -> dict[str, Any]:
    """The cleanup loop's mark on the count of a shared item it removes (in the same
    transaction), only while the count is zero: ``gn`` (when), the count at 0, and an
    expiry-index entry at ``until``, when the mark itself goes. Until then an append naming
    the item without writing it is refused (see :func:`counter_raise`). With ``nesting`` (a
    token: items are nested under it) also ``np``, and the entry at ``now``: the next pass
    completes the removal of the nested items if this one does not (see :func:`nesting_done`).
    Without ``gone`` (the item at the key is owned by a checkpoint, or absent: this removal
    does not take it), no ``gn``: only ``np``, which refuses appends naming the key while the
    nested items go."""
    names = Names()
    nested = "" if nesting is None else f", {names('np')} = {names.value(s(nesting))}"
    at = until if nesting is None else now
    return _zero_count(names, run_key, key, _zeroed(names, run_key, at, now if gone else None)
                       + nested, f"attribute_not_exists({names('gn')})")


def _zeroed(names: Names, run_key: str, at: float, gone: float | None) -> str:
    """The SET clauses of a count put at zero and in the expiry index at ``at``, condemned
    since ``gone`` (if given)."""
    mark = "" if gone is None else f"{names('gn')} = {names.value(n(gone))}, "
    return (f"{mark}{names('rc')} = {names.value(n(0))}, "
            f"{names('xpk')} = {names.value(s(f'x#{layout.shard_of(run_key)}'))}, "
            f"{names('xat')} = {names.value(n(at))}")


def _zero_count(names: Names, run_key: str, key: str, assignments: str, condition: str
                ) -> dict[str, Any]:
    """The update of ``key``'s count by ``assignments``, only while it is zero (or absent)
    and ``condition`` holds."""
    return {"Update": {
        "Key": {"PK": s(layout.partition(run_key)), "SK": s(layout.counter_sk(key))},
        "UpdateExpression": f"SET {assignments}",
        "ConditionExpression": (
            f"(attribute_not_exists({names('rc')}) OR {names('rc')} <= {names.value(n(0))}) "
            f"AND {condition}"),
        **names.params(),
    }}


def nesting_check(run_key: str, key: str, token: str) -> dict[str, Any]:
    """The condition of every transaction deleting items nested under a removed shared item:
    its count still carries this removal's ``np``. Once the removal is done (by this worker or
    another), the item may be written anew, with nested items of its own that must stay."""
    names = Names()
    return {"ConditionCheck": {
        "Key": {"PK": s(layout.partition(run_key)), "SK": s(layout.counter_sk(key))},
        "ConditionExpression": f"{names('np')} = {names.value(s(token))}",
        **names.params(),
    }, "_fatal": True}


def nesting_done(run_key: str, key: str, token: str, until: float) -> dict[str, Any]:
    """``UpdateItem`` parameters (without the table) ending a removal whose nested items are
    all gone: ``np`` goes and the count's expiry-index entry moves to ``until``, when the
    condemned mark goes (sent with the run item's update that stops listing ``key``)."""
    names = Names()
    return {
        "Key": {"PK": s(layout.partition(run_key)), "SK": s(layout.counter_sk(key))},
        "UpdateExpression": (f"SET {names('xat')} = {names.value(n(until))} "
                             f"REMOVE {names('np')}"),
        "ConditionExpression": f"{names('np')} = {names.value(s(token))}",
        **names.params(),
    }


def condemn_unnamed(run_key: str, key: str, since: float, until: float) -> dict[str, Any]:
    """The mark of a removal deleting items nested under a removed shared item on the count
    of a key it deletes (or of a key between such a key and the removed one), only while no
    held checkpoint names it (count zero, or none) and no removal of its own is under way
    (``np``), and the key is *condemned* as in :func:`condemn`, until ``until``. An append
    that names the key without writing it after the delete (its writer saw the item before)
    is refused then, not acknowledged without it; one that names it before the delete raises
    the count, which cancels the delete."""
    names = Names()
    return _zero_count(names, run_key, key, _zeroed(names, run_key, until, since),
                       f"attribute_not_exists({names('np')})")


def _unnamed_not_due(names: Names) -> str:
    """The condition of :func:`parent_check` and :func:`fence`."""
    zero = names.value(n(0))
    return (f"attribute_not_exists({names('rc')}) OR ({names('rc')} <= {zero} AND ("
            f"attribute_exists({names('gn')}) OR attribute_exists({names('np')}) OR "
            f"{names('xat')} > {zero}))")


def parent_check(run_key: str, key: str) -> dict[str, Any]:
    """A check sent with the removal of a shared item (and with each delete of what is
    nested under it) on the count of each key it is nested under: no held checkpoint names
    that key (an append that started naming it since the counts were read raised its
    count), and its own removal is not due, that is: the count is absent, condemned
    (``gn``), its removal under way (``np``), or at zero since its last removal (lowering a
    count puts it in the expiry index at 0, every other mark at a later time). A read of a
    checkpoint naming that key returns what is nested under it, so while its removal is
    due, an append that names it (its writer may have seen the item) could still be
    acknowledged after the item went: that key's removal goes first instead, taking the
    item with the rest and condemning the key if it holds an item of its own (see
    ``DynamoDBStore._sweep_shared``)."""
    names = Names()
    return {"ConditionCheck": {
        "Key": {"PK": s(layout.partition(run_key)), "SK": s(layout.counter_sk(key))},
        "ConditionExpression": _unnamed_not_due(names),
        **names.params(),
    }}


def fence(run_key: str, key: str, since: float, until: float) -> dict[str, Any]:
    """:func:`parent_check` made to last, for a key beyond what one transaction can check
    (a key nested under 98 others or more): sent before the transaction it stands for, it
    condemns the count (``gn``, kept if there; absent, it is created, in the expiry index
    at ``until``, when it goes) and fences it (``nf``): every raise of it is refused
    then, also one writing the key (see :func:`counter_raise`), so the key stays unnamed
    until the count goes. The cleanup loop keeps a fenced count until ``since`` plus
    ``CONDEMNED_SECONDS`` (``until``) at least, also one already due when it was fenced."""
    names = Names()
    gone, at = names.value(n(since)), names.value(n(until))
    shard = names.value(s(f"x#{layout.shard_of(run_key)}"))
    return {"Update": {
        "Key": {"PK": s(layout.partition(run_key)), "SK": s(layout.counter_sk(key))},
        "UpdateExpression": (
            f"SET {names('gn')} = if_not_exists({names('gn')}, {gone}), "
            f"{names('rc')} = {names.value(n(0))}, {names('nf')} = {names.value(n(since))}, "
            f"{names('xpk')} = if_not_exists({names('xpk')}, {shard}), "
            f"{names('xat')} = if_not_exists({names('xat')}, {at})"),
        "ConditionExpression": _unnamed_not_due(names),
        **names.params(),
    }}


# -- labels ------------------------------------------------------------------------------------


def _label_key(label: str, run_key: str, record: RunRecord) -> dict[str, Any]:
    return {
        "PK": s(layout.label_partition(label)),
        "SK": s(layout.created_stamp(record.created_at, run_key)),
    }


def label_puts(run_key: str, record: RunRecord, ttl: float | None) -> list[dict[str, Any]]:
    """The label entries of a run being created (a run's labels never change)."""
    operations = []
    for label in dict.fromkeys(record.labels):
        item = {**_label_key(label, run_key, record), "rk": s(run_key),
                "inc": s(record.incarnation)}
        if ttl is not None:
            item["ttl"] = n(ttl)
        operations.append({"Put": {"Item": item}})
    return operations


def label_deletes(run_key: str, record: RunRecord, *, sparing: Sequence[dict[str, Any]] = ()
                  ) -> list[dict[str, Any]]:
    """Deletes of a run's label entries, each only while it is this incarnation's; entries
    at the keys of ``sparing`` (puts of a new incarnation) are left to those puts."""
    spared = {(op["Put"]["Item"]["PK"]["S"], op["Put"]["Item"]["SK"]["S"]) for op in sparing}
    operations = []
    for label in dict.fromkeys(record.labels):
        key = _label_key(label, run_key, record)
        if (key["PK"]["S"], key["SK"]["S"]) in spared:
            continue
        names = Names()
        operations.append({"Delete": {
            "Key": key,
            "ConditionExpression": f"{names('inc')} = {names.value(s(record.incarnation))}",
            **names.params(),
        }})
    return operations


def label_refreshes(run_key: str, record: RunRecord, ttl: float | None) -> list[dict[str, Any]]:
    """Updates moving the ``ttl`` of a run's label entries (``None``: they never expire)."""
    operations = []
    for label in dict.fromkeys(record.labels):
        names = Names()
        change = (f"SET {names('ttl')} = {names.value(n(ttl))}" if ttl is not None
                  else f"REMOVE {names('ttl')}")
        operations.append({"Update": {
            "Key": _label_key(label, run_key, record),
            "UpdateExpression": change,
            "ConditionExpression": f"{names('inc')} = {names.value(s(record.incarnation))}",
            **names.params(),
        }})
    return operations


def strip_tags(operation: Mapping[str, Any]) -> dict[str, Any]:
    """An operation as DynamoDB takes it: without the private tags."""
    return {name: value for name, value in operation.items() if not name.startswith("_")}
