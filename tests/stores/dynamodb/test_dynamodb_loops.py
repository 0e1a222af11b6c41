"""Which event loops the DynamoDB store runs in (issue 11, items 5 and 6): asyncio only, with
a ConfigurationError on trio before anything is sent; a store used by several
``asyncio.run()`` calls works in each (clients per loop), and clients it was given are refused
in another loop before anything is sent."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

import fastcheckpoint
from fastcheckpoint._config import RetryPolicy
from fastcheckpoint.errors import ConfigurationError
from fastcheckpoint.stores._aws import RequestCounter
from fastcheckpoint.stores.dynamodb import DynamoDBStore
from fastcheckpoint.testing._builders import T0, key_of, make_checkpoint, make_run
from tests.stores._moto import REGION, moto_endpoint, unique_name
from tests.stores.dynamodb.test_dynamodb import DEADLINE, atomic_moto, aws_names, provisioned

__all__ = ["atomic_moto", "aws_names", "moto_endpoint", "provisioned"]

QUICK = RetryPolicy(base_delay=0.001, max_delay=0.002, max_retries=1)


def _store(endpoint: str, names: tuple[str, str], **options: Any) -> DynamoDBStore:
    return DynamoDBStore(names[0], bucket=names[1], prefix=f"{unique_name('loop')}/",
                         region=REGION, endpoint_url=endpoint, retry=QUICK, **options)


def _run(function: Callable[[], Awaitable[Any]], backend: str = "asyncio") -> Any:
    async def with_deadline() -> Any:
        with anyio.fail_after(DEADLINE):
            return await function()

    return anyio.run(with_deadline, backend=backend)


def test_on_trio_every_call_says_it_needs_asyncio_before_sending(
    provisioned: str, aws_names: tuple[str, str]
) -> None:
    pytest.importorskip("trio")
    store = _store(provisioned, aws_names)
    seed = make_run("on-trio")
    key = key_of(seed)
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: store.append(key, make_checkpoint(seed, 0), run=seed, keep_latest=None, now=T0),
        lambda: store.latest(key, now=T0),
        lambda: store.list_runs(status=None, limit=5, cursor=None, now=T0),
        lambda: store.purge_expired(now=T0, limit=5),
        store.provision,
        lambda: fastcheckpoint.CheckpointManager(store).create("on-trio", state={}),
    ]

    async def refused(call: Callable[[], Awaitable[Any]]) -> str:
        with pytest.raises(ConfigurationError, match="DynamoDBStore runs on asyncio only") as e:
            await call()
        return str(e.value)

    for call in calls:
        assert "under trio" in _run(lambda call=call: refused(call), backend="trio")

    async def nothing_was_written() -> None:
        try:
            assert await store.get_run(key, now=T0) is None
        finally:
            await store.aclose()

    _run(nothing_was_written)


def test_a_store_serves_consecutive_asyncio_runs(
    provisioned: str, aws_names: tuple[str, str]
) -> None:
    store = _store(provisioned, aws_names)  # module-level, as FastAgentic's docs write it
    manager = fastcheckpoint.CheckpointManager(store)
    clients: list[Any] = []

    async def step(n: int) -> int:
        created = await manager.create("two-loops", state={"n": n})
        assert created is not None
        clients.append((await store.clients())[0])
        return created.metadata.sequence

    assert asyncio.run(_timed(lambda: step(0))) == 0
    assert asyncio.run(_timed(lambda: step(1))) == 1  # new loop: new clients, same run

    async def finish() -> None:
        restored = await manager.restore("two-loops")
        assert restored is not None
        assert restored.state == {"n": 1}
        await store.aclose()

    asyncio.run(_timed(finish))
    assert clients[0] is not clients[1]


def test_given_clients_are_refused_in_another_loop_before_sending(
    provisioned: str, aws_names: tuple[str, str]
) -> None:
    owner = _store(provisioned, aws_names)
    seed = make_run("given-clients")
    key = key_of(seed)

    async def first_loop() -> tuple[Any, Any, DynamoDBStore]:
        ddb, s3 = await owner.clients()
        borrower = DynamoDBStore(aws_names[0], bucket=aws_names[1], dynamodb_client=ddb,
                                 s3_client=s3, prefix=owner.prefix)
        await borrower.append(key, make_checkpoint(seed, 0), run=seed, keep_latest=None, now=T0)
        return ddb, s3, borrower

    ddb, _, borrower = asyncio.run(_timed(first_loop))

    async def second_loop() -> None:
        with RequestCounter.attached(ddb) as sent:
            with pytest.raises(ConfigurationError, match="another event loop"):
                await borrower.append(key, make_checkpoint(seed, 1), run=seed,
                                      keep_latest=None, now=T0)
            with pytest.raises(ConfigurationError, match="another event loop"):
                await borrower.latest(key, now=T0)
        assert sent.counts == {}
        # The store's own clients are per loop: the owner works here, and sees one checkpoint.
        run = await owner.get_run(key, now=T0)
        assert run is not None
        assert run.latest_sequence == 0
        await owner.aclose()

    asyncio.run(_timed(second_loop))


async def _timed(function: Callable[[], Awaitable[Any]]) -> Any:
    with anyio.fail_after(DEADLINE):
        return await function()
