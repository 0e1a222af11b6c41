"""A create whose reply was lost after DynamoDB applied it, then another process deletes or
prunes its checkpoint, deletes the run or starts it over, then the driver sends the create's
transaction again: the create is acknowledged once and never written a second time.

Real DynamoDB answers such a resend from its idempotency token (botocore fills in
``ClientRequestToken`` once per call and sends the same request again); moto (server mode)
ignores the token and refuses the resend on its conditions, as a DynamoDB-compatible service
without idempotency tokens would. The store must then recognise its own write itself; the
run item's write token and the checkpoint's are gone by then, so only the append's memo
tells."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from fastcheckpoint import _ids
from fastcheckpoint.errors import ConfigurationError
from fastcheckpoint.stores import _dynamodb_layout as layout
from fastcheckpoint.stores.dynamodb import DynamoDBStore
from tests.stores._moto import REGION, moto_endpoint
from tests.stores.dynamodb.test_dynamodb import (
    DEADLINE,
    SESSION,
    _manager,
    atomic_moto,
    aws_names,
    counting,
    opened,
    provisioned,
)
from tests.stores.dynamodb.test_dynamodb_safety import QUICK, _LoseFirstReply

__all__ = ["atomic_moto", "aws_names", "moto_endpoint", "provisioned"]

pytestmark = pytest.mark.anyio

MEANWHILE = ["delete", "prune", "delete_run", "restart"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


def _config(meanwhile: str, history: bool) -> dict[str, Any]:
    # With a history, messages go to logs, items the checkpoint names: append_with_items.
    config: dict[str, Any] = {"history_min_entries": 2 if history else None}
    if meanwhile == "prune":
        config["max_checkpoints_per_run"] = 1
    return config


class _Tokens:
    """The ``ClientRequestToken`` of every TransactWriteItems request the client sends."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.seen: list[str] = []

    def __call__(self, request: Any, **_: Any) -> None:
        self.seen.append(json.loads(request.body)["ClientRequestToken"])

    def __enter__(self) -> _Tokens:
        self.client.meta.events.register("before-send.dynamodb.TransactWriteItems", self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.meta.events.unregister("before-send.dynamodb.TransactWriteItems", self)


def _spy(call: Callable[..., Any], name: str, paths: list[str]) -> Callable[..., Any]:
    async def spied(*args: Any, **kwargs: Any) -> Any:
        paths.append(name)
        return await call(*args, **kwargs)

    return spied


@pytest.mark.parametrize("history", [False, True], ids=["plain", "with-items"])
@pytest.mark.parametrize("meanwhile", MEANWHILE)
async def test_a_lost_create_reply_then_a_removal_is_acknowledged_once(
    provisioned: str,
    aws_names: tuple[str, str],
    meanwhile: str,
    history: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It was a SequenceConflict (the run item no longer carried the create's token, its
    checkpoint was gone), and the manager wrote the create again at the next sequence: the
    deleted checkpoint (or run) came back, or, pruned to one checkpoint, the stale create
    pruned the newer one of the other process."""
    clock = [1_000.0]
    run_id = f"lost-{meanwhile}-{history}"
    config = _config(meanwhile, history)
    async with (
        opened(provisioned, aws_names, retry=QUICK) as store,
        opened(provisioned, aws_names, prefix=store.prefix) as other,
    ):
        manager, another = _manager(store, clock, **config), _manager(other, clock, **config)
        with anyio.fail_after(DEADLINE):
            messages = [{"role": "user", "content": f"m{number}"} for number in range(3)]
            first = await manager.create(run_id, {"by": "A", "step": 0}, messages=messages)
            assert first is not None
            acted: list[Any] = []

            async def remove() -> None:  # lands between the create and its resend
                if meanwhile == "delete":
                    [newest, _] = await another.list_checkpoints(run_id)
                    assert newest.sequence == 1
                    acted.append(await another.delete(newest.checkpoint_id))
                elif meanwhile == "prune":
                    acted.append(await another.create(run_id, {"by": "B", "step": 2}))
                else:
                    acted.append(await another.delete_run(run_id))
                    if meanwhile == "restart":
                        acted.append(await another.create(run_id, {"by": "B", "step": 0}))

            paths: list[str] = []
            for name in ("append", "append_with_items"):
                monkeypatch.setattr(store, name, _spy(getattr(store, name), name, paths))
            ddb, _ = await store.clients()
            with (
                _Tokens(ddb) as tokens,
                _LoseFirstReply(ddb, "TransactWriteItems", remove) as fault,
                counting(store) as (dynamo, _),
            ):
                created = await manager.create(
                    run_id,
                    {"by": "A", "step": 1},
                    messages=[*messages, {"role": "assistant", "content": "m3"}],
                )
            assert fault.lost == 1
            assert paths == ["append_with_items" if history else "append"]
            assert acted
            assert all(acted)
            assert created is not None
            assert created.metadata.sequence == 1
            # The attempt and its resend, nothing written again; the resend carries the
            # idempotency token of the attempt (which real DynamoDB honours, moto ignores).
            # (+1 Query when it prunes a checkpoint naming items: it reads what that one names.)
            pruning = {"Query": 1} if meanwhile == "prune" and history else {}
            assert dynamo.counts == {"TransactWriteItems": 2, **pruning}
            assert len(tokens.seen) == 2
            assert len(set(tokens.seen)) == 1
            # Set by the store (botocore fills in a UUID when none is given).
            assert re.fullmatch(r"[0-9a-f]{32}", tokens.seen[0])

            listed = [(m.sequence, m.run_id) for m in await another.list_checkpoints(run_id)]
            restored = await another.restore(run_id)
            state = None if restored is None else dict(restored.state)
            if meanwhile == "delete":
                assert listed == [(0, run_id)]
                assert state == {"by": "A", "step": 0}
            elif meanwhile == "prune":
                assert [sequence for sequence, _ in listed] == [2]
                assert state == {"by": "B", "step": 2}
            elif meanwhile == "delete_run":
                assert listed == []
                assert state is None
            else:
                assert [sequence for sequence, _ in listed] == [0]
                assert state == {"by": "B", "step": 0}
            # The run is whole, and the other process carries on from what it holds.
            assert await other.damaged_runs(run_key=_ids.key_of(run_id), now=clock[0]) == []
            after = await another.create(run_id, {"by": "B", "step": "after"})
            assert after is not None
            # Sequences are not used again within a run.
            expected = {"delete": 2, "prune": 3, "delete_run": 0, "restart": 1}[meanwhile]
            assert after.metadata.sequence == expected
            restored = await manager.restore(run_id)
            assert restored is not None
            assert dict(restored.state) == {"by": "B", "step": "after"}


async def test_a_lost_reply_on_a_runs_first_create_then_a_run_delete_leaves_it_deleted(
    provisioned: str, aws_names: tuple[str, str]
) -> None:
    """The run's first create lands, its reply is lost, another process deletes the run, then
    the driver sends the create again: its conditions (no run item, no checkpoint there)
    hold again, and it was written a second time, bringing the deleted run back. The memo
    refuses the resend, and the create is acknowledged once."""
    clock = [1_000.0]
    run_id = "lost-first-create"
    async with (
        opened(provisioned, aws_names, retry=QUICK) as store,
        opened(provisioned, aws_names, prefix=store.prefix) as other,
    ):
        manager, another = _manager(store, clock), _manager(other, clock)
        with anyio.fail_after(DEADLINE):
            deleted: list[int] = []

            async def delete_run() -> None:
                deleted.append(await another.delete_run(run_id))

            ddb, _ = await store.clients()
            with _LoseFirstReply(ddb, "TransactWriteItems", delete_run) as fault:
                created = await manager.create(run_id, {"n": 0})
            assert fault.lost == 1
            assert deleted == [1]
            assert created is not None
            assert created.metadata.sequence == 0
            assert await another.restore(run_id) is None
            assert await other.get_run(_ids.key_of(run_id), now=clock[0]) is None


class _Sizes:
    """How many operations each TransactWriteItems request the client sends holds."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.seen: list[int] = []

    def __call__(self, request: Any, **_: Any) -> None:
        self.seen.append(len(json.loads(request.body)["TransactItems"]))

    def __enter__(self) -> _Sizes:
        self.client.meta.events.register("before-send.dynamodb.TransactWriteItems", self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.meta.events.unregister("before-send.dynamodb.TransactWriteItems", self)


async def _memos_of(store: DynamoDBStore, run_keys: set[str]) -> int:
    """The memos in the table of appends to these runs."""
    ddb, _ = await store.clients()
    params: dict[str, Any] = {"TableName": store.table, "ConsistentRead": True}
    found = 0
    while True:
        response = await ddb.scan(**params)
        found += sum(
            1
            for item in response["Items"]
            if item["PK"]["S"].startswith(layout.MEMO_PREFIX)
            and item["SK"]["S"] in {layout.partition(key) for key in run_keys}
        )
        if "LastEvaluatedKey" not in response:
            return found
        params["ExclusiveStartKey"] = response["LastEvaluatedKey"]


async def test_memos_are_removed_by_the_cleanup_without_native_ttl(
    provisioned: str, aws_names: tuple[str, str]
) -> None:
    """Memos were removed only by native TTL, which moto (and a table whose TTL is not
    enabled) does not run: every create left one in the table for good, through delete_run
    and purge_expired. They are in the expiry index now, due five minutes after the append,
    and purge_expired removes them then (not before: a resend may still come)."""
    clock = [1_000.0]
    async with opened(provisioned, aws_names) as store:
        manager = _manager(store, clock, history_min_entries=None)
        with anyio.fail_after(DEADLINE):
            for number in range(50):
                await manager.create("memos", {"n": number}, ttl_seconds=10)
            run_keys = {_ids.key_of("memos")}
            assert await _memos_of(store, run_keys) == 50  # an endpoint_url: memos on
            assert await manager.delete_run("memos") == 50

            async def purge(now: float) -> None:
                while not (await store.purge_expired(now=now, limit=1_000))[1]:
                    pass

            await purge(clock[0] + layout.MEMO_SECONDS - 1)
            assert await _memos_of(store, run_keys) == 50
            await purge(clock[0] + layout.MEMO_SECONDS + 1)
            assert await _memos_of(store, run_keys) == 0


async def test_resend_memos_false_writes_no_memo_at_the_same_request_count(
    provisioned: str, aws_names: tuple[str, str]
) -> None:
    clock = [1_000.0]
    async with (
        opened(provisioned, aws_names) as with_memos,
        opened(provisioned, aws_names, resend_memos=False) as without,
    ):
        with anyio.fail_after(DEADLINE):
            seen: dict[bool, tuple[dict[str, int], list[int]]] = {}
            for memos, store in ((True, with_memos), (False, without)):
                manager = _manager(store, clock, history_min_entries=None)
                ddb, _ = await store.clients()
                with counting(store) as (dynamo, _), _Sizes(ddb) as sizes:
                    for number in range(3):
                        await manager.create(f"quiet-{memos}", {"n": number})
                seen[memos] = dict(dynamo.counts), sizes.seen
                expected = 3 if memos else 0
                assert await _memos_of(store, {_ids.key_of(f"quiet-{memos}")}) == expected
            assert seen[True][0] == seen[False][0] == {"TransactWriteItems": 3}
            # One operation fewer per transaction: the memo's put.
            assert [size - 1 for size in seen[True][1]] == seen[False][1]


@pytest.mark.parametrize(
    ("endpoint_url", "memos"),
    [
        (None, False),
        ("https://dynamodb.us-east-1.amazonaws.com", False),
        ("https://dynamodb-fips.us-gov-west-1.amazonaws.com", False),
        ("https://dynamodb.cn-north-1.amazonaws.com.cn", False),
        ("https://dynamodb.us-east-1.api.aws", False),
        ("http://localhost:8000", True),
        ("http://amazonaws.com.example:4566", True),
    ],
)
async def test_resend_memos_by_default_follow_the_endpoint(
    endpoint_url: str | None, memos: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWS answers a resend from ``ClientRequestToken``: no memo there; any other endpoint
    (an emulator) gets them. The option overrides that, as a keyword or in the URL."""
    for option, expected in ((None, memos), (True, True), (False, False)):
        store = DynamoDBStore(
            "memo-table",
            region=REGION,
            endpoint_url=endpoint_url,
            session=SESSION,
            resend_memos=option,
        )
        try:
            assert (await store._current()).memos is expected
        finally:
            await store.aclose()
    url = f"dynamodb://memo-table?region={REGION}&resend_memos=false"
    # The endpoint the client resolves counts, also one botocore takes from the environment.
    monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", "http://localhost:9")
    store = DynamoDBStore("memo-table", region=REGION, session=SESSION)
    try:
        assert (await store._current()).memos is True
    finally:
        await store.aclose()
    assert DynamoDBStore.from_url(url)._resend_memos is False
    assert DynamoDBStore.from_url(url.replace("false", "on"))._resend_memos is True
    with pytest.raises(ConfigurationError, match="resend_memos"):
        DynamoDBStore.from_url(url.replace("false", "maybe"))
    with pytest.raises(ConfigurationError, match="resend_memos"):
        DynamoDBStore("memo-table", resend_memos="yes")  # type: ignore[arg-type]
