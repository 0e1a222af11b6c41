"""DynamoDB+S3: a run's first append too large for one transaction (two pin transactions,
the first putting the run key's pin record, then its own, which deletes it) cut at each of
its requests: a lost reply, its process killed before or after the request landed, or held
before it, while another process appends, deletes or restarts the run. Each acknowledged
create is restorable exactly once, with its own values at every key, and no append lands
naming another life's or another append's values."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
from botocore.exceptions import ConnectionClosedError

from fastcheckpoint.errors import CheckpointError
from fastcheckpoint.stores import _dynamodb_items as items_layout
from fastcheckpoint.stores import dynamodb as dynamodb_module
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
)
from tests.stores.dynamodb.test_dynamodb_pin_record import MANY
from tests.stores.dynamodb.test_dynamodb_safety import QUICK
from tests.stores.dynamodb.test_dynamodb_stale_pins import _sort_keys, anyio_backend

__all__ = ["anyio_backend", "atomic_moto", "aws_names", "moto_endpoint", "provisioned"]

pytestmark = pytest.mark.anyio

class _Fault:
    """A ``before-send`` hook on every DynamoDB request of one client: its ``at``-th request
    of ``operation`` is cut. ``delayed``: ``meanwhile`` runs before it is sent. ``lost``: it
    lands, its reply is lost, ``meanwhile`` runs, and the driver sends it again (moto
    ignores idempotency tokens). ``crash-before`` and
    ``crash-after``: the process dies before sending it, or once it landed (``meanwhile``
    runs then): no request of it reaches the server again, its undo's neither."""

    def __init__(self, client: Any, kind: str, operation: str, at: int,
                 meanwhile: Callable[[], Awaitable[Any]]) -> None:
        self.client, self.kind, self.meanwhile = client, kind, meanwhile
        self.operation, self.at = f".{operation}".encode(), at
        self.seen = 0
        self.dead = False

    async def __call__(self, request: Any, **_: Any) -> None:
        if self.dead:
            raise ConnectionClosedError(endpoint_url=request.url)
        if not request.headers.get("X-Amz-Target", b"").endswith(self.operation):
            return
        self.seen += 1
        if self.seen != self.at:
            return
        if self.kind == "delayed":
            await self.meanwhile()
            return  # sent now
        if self.kind != "crash-before":
            response = await self.client._endpoint._send(request)
            await response.content  # the server has answered: the write is applied
        self.dead = self.kind != "lost"
        await self.meanwhile()
        raise ConnectionClosedError(endpoint_url=request.url)

    def __enter__(self) -> _Fault:
        self.client.meta.events.register("before-send.dynamodb", self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.meta.events.unregister("before-send.dynamodb", self)


MEANWHILE = ["small", "expired", "large", "large-failed", "delete_run", "restart"]


async def _nothing() -> None:
    pass


async def _cut(provisioned: str, aws_names: tuple[str, str], kind: str, operation: str,
               at: int, meanwhile: str, *, over_expired: bool) -> None:
    """This process appends a run's first checkpoint naming 110 items, with their values
    (``mine``), over no run item or over an expired life of its own (which it removes whole
    first); its ``at``-th ``operation`` is cut (see :class:`_Fault`), and another process
    meanwhile appends a small first checkpoint of the run (live, or expiring at once), a
    large one of the same keys (``theirs``: landing, or dying once its pins landed, which
    took the pin record and wrote over this one's values), deletes the run, or deletes and
    restarts it, or the cleanup loop runs.
    Every call raises only ``CheckpointError``s; the run holds one checkpoint at most; an
    acknowledged create that nothing removed since holds the run, read back with its own
    values at every key; and whichever life holds the run reads its own values only."""
    name = f"cut-{kind}-{operation}-{at}-{meanwhile}-{over_expired}"
    key = key_of(make_run(name))
    mine = make_run(name, created_at=T0 + 100)
    theirs = make_run(name, created_at=T0 + 100)
    async with opened(provisioned, aws_names, retry=QUICK) as store, \
            opened(provisioned, aws_names, prefix=store.prefix) as other:
        acknowledged: dict[str, Any] = {}

        async def append(by: Any, run: Any, names: list[str], value: bytes, name: str,
                         **options: Any) -> None:
            try:
                await _append_items(by, run, 0, refs=names,
                                    items=[make_item(item, value) for item in names],
                                    **{"now": T0 + 100, **options})
            except CheckpointError:
                return
            acknowledged[name] = run

        landed: list[bool] = []

        async def act() -> None:
            if meanwhile in {"delete_run", "restart"}:
                landed.append(await store_holds_mine())
                await other.delete_run(key)
            if meanwhile in {"small", "restart"}:
                await append(other, theirs, MANY[:1], b"theirs", "theirs")
            elif meanwhile == "expired":
                await append(other, theirs, MANY[:1], b"theirs", "expired", now=T0,
                             expires_at=T0 + 10)
            elif meanwhile == "large":
                await append(other, theirs, MANY, b"theirs", "theirs")
            elif meanwhile == "cleanup":  # the cleanup loop removes what expired
                while not (await other.purge_expired(now=T0 + 100, limit=100))[1]:
                    pass  # the session's table holds other tests' expired records too
            elif meanwhile == "large-failed":  # its pins land, then its process dies
                ddb, _ = await other.clients()
                with _Fault(ddb, "crash-before", "TransactWriteItems", 3, _nothing):
                    await append(other, theirs, MANY, b"theirs", "theirs")
                assert "theirs" not in acknowledged

        async def store_holds_mine() -> bool:
            other._cache.pop(key, None)
            run = await other.get_run(key, now=T0 + 100)
            return run is not None and run.incarnation == mine.incarnation

        try:
            with anyio.fail_after(DEADLINE):
                await _emptied_by(other, key)
                if over_expired:
                    ended = make_run(name, expires_at=T0 + 10)
                    await _append_items(store, ended, 0, refs=["z", *MANY[:3]], items=[
                        make_item(item, b"ended") for item in ["z", *MANY[:3]]],
                        expires_at=T0 + 10)
                ddb, _ = await store.clients()
                with _Fault(ddb, kind, operation, at, act) as fault:
                    await append(store, mine, MANY, b"mine", "mine")
                assert fault.seen >= at
                if fault.dead:
                    assert "mine" not in acknowledged
                if landed and landed[0]:
                    # Its transaction landed before the removal: acknowledged when it learned
                    # so (its reply lost, the resend recognised), then removed.
                    acknowledged.pop("mine", None)
                other._cache.pop(key, None)
                other._families.pop(key, None)
                run = await other.get_run(key, now=T0 + 100)
                if "mine" in acknowledged:
                    assert run is not None
                    assert run.incarnation == mine.incarnation
                elif "theirs" in acknowledged:
                    assert run is not None
                    assert run.incarnation == theirs.incarnation
                if run is None:
                    return
                assert (run.latest_sequence, run.checkpoint_count) == (0, 1)
                values = {mine.incarnation: dict.fromkeys(MANY, b"mine"),
                          theirs.incarnation: (dict.fromkeys(MANY, b"theirs")
                                               if meanwhile.startswith("large")
                                               else {MANY[0]: b"theirs"})}
                assert run.incarnation in values
                read = await _read(other, mine, None, now=T0 + 100)
                assert read is not None
                assert read[2] == values[run.incarnation]
        finally:
            await _emptied_by(other, key)


async def _emptied_by(store: DynamoDBStore, key: str) -> None:
    """The run key emptied, young pins too (``delete_run`` keeps them with no run item)."""
    later = time.time() + 3 * items_layout.PIN_GRACE_SECONDS
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dynamodb_module, "_wall_clock", lambda: later)
        await store.delete_run(key)
        await store.delete_run(key)  # a run item's removal keeps a pin landed meanwhile
    assert await _sort_keys(store, key) == []


@pytest.mark.parametrize("meanwhile", MEANWHILE)
@pytest.mark.parametrize("at", [1, 2, 3], ids=["pin-1", "pin-2", "transaction"])
@pytest.mark.parametrize("kind", ["delayed", "lost", "crash-after"])
async def test_a_large_first_append_cut_at_any_request_is_restorable_once_with_its_values(
    provisioned: str, aws_names: tuple[str, str], kind: str, at: int, meanwhile: str,
) -> None:
    """Over no run item: its two pin transactions (the first puts the pin record), then its
    own transaction (which deletes it), each cut in turn (see :func:`_cut`)."""
    await _cut(provisioned, aws_names, kind, "TransactWriteItems", at, meanwhile,
               over_expired=False)
