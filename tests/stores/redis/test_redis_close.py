"""``aclose()`` of the Redis store while calls run: each public call holds the client it got
until it returns, the close waits for those calls (only so long), and a client closed under a
call that outlived the wait is closed again as that call returns."""

from __future__ import annotations

import asyncio
import gc
import inspect
import secrets
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from fastcheckpoint.stores import _loops
from fastcheckpoint.stores.redis import RedisStore
from fastcheckpoint.testing import T0
from tests.stores._redis_support import make_store, real_server
from tests.stores.conftest import RedisTarget

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py runs on asyncio only


class Gates:
    """Holds the store's driver calls named in :meth:`hold` until :meth:`open`, and records
    in ``events`` each driver call that ran (``"latest ran"``) and each close of a client
    (``"closed"``)."""

    def __init__(self, store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[str] = []
        self._reached: dict[str, asyncio.Event] = {}
        self._open: dict[str, asyncio.Event] = {}
        driver = store._driver

        async def gated(what: str, awaitable: Any, client: Any) -> Any:
            if what in self._open:
                self._reached[what].set()
                await self._open[what].wait()
            result = await driver(what, awaitable, client)
            self.events.append(f"{what} ran")
            return result

        monkeypatch.setattr(store, "_driver", gated)

    def hold(self, what: str) -> None:
        self._reached[what] = asyncio.Event()
        self._open[what] = asyncio.Event()

    async def reached(self, what: str) -> None:
        await self._reached[what].wait()

    def open(self, what: str) -> None:
        self._open[what].set()

    def record_closes(self, client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        close = client.aclose

        async def recorded() -> None:
            await close()
            self.events.append("closed")

        monkeypatch.setattr(client, "aclose", recorded)


def _connections(url: str, name: str) -> Any:
    async def count() -> int:
        watcher = aioredis.Redis.from_url(url)
        try:
            clients = await watcher.client_list()
        finally:
            await watcher.aclose()
        return sum(1 for client in clients if client.get("name") == name)
    return count


def test_every_public_call_holds_the_client() -> None:
    # aclose() waits only for the calls marked so.
    unmarked = [name for name, member in vars(RedisStore).items()
                if inspect.iscoroutinefunction(member) and not name.startswith("_")
                and not hasattr(member, "__wrapped__")]
    assert unmarked == ["aclose"]


async def test_aclose_waits_for_a_call_between_its_commands(
    prefixed: tuple[RedisTarget, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The close waited only for the commands running: a call that had got the client but
    # sent nothing yet saw it closed, and its command reconnected it.
    target, prefix = prefixed
    store = make_store(target, prefix)
    gates = Gates(store, monkeypatch)
    with anyio.fail_after(10):
        await store.latest("run", now=T0)
        gates.record_closes(store._client, monkeypatch)
        gates.hold("latest")
        call = asyncio.ensure_future(store.latest("run", now=T0))
        await gates.reached("latest")
        closing = asyncio.ensure_future(store.aclose())
        await asyncio.wait([closing], timeout=0.2)
        gates.open("latest")
        assert await call is None
        await closing
    assert gates.events == ["latest ran", "latest ran", "closed"]


async def test_a_call_that_outlives_the_close_wait_closes_the_client_again(
    prefixed: tuple[RedisTarget, str], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # redis-py reconnects a client closed under a call: the close gave up waiting for it,
    # and its connection stays open unless the client is closed again as the call returns.
    target, prefix = prefixed
    real_server(target)
    monkeypatch.setattr(_loops, "CLOSE_WAIT_S", 0.05)
    name = f"fc-close-{secrets.token_hex(4)}"
    store = RedisStore.from_url(f"{target.url}?prefix={prefix}&client_name={name}")
    gates = Gates(store, monkeypatch)
    gc.disable()  # the collector would close what was left open
    try:
        with anyio.fail_after(10):
            await store.latest("run", now=T0)
            gates.record_closes(store._client, monkeypatch)
            gates.hold("latest")
            call = asyncio.ensure_future(store.latest("run", now=T0))
            await gates.reached("latest")
            await store.aclose()
            closed_first = list(gates.events)
            gates.open("latest")
            assert await call is None
            left = await _connections(target.url, name)()
    finally:
        gc.enable()
    assert "calls still use after" in caplog.text
    assert closed_first == ["latest ran", "closed"]
    assert gates.events == ["latest ran", "closed", "latest ran", "closed"]
    assert left == 0


async def test_a_handed_in_client_used_again_is_not_closed_by_a_call_from_before(
    prefixed: tuple[RedisTarget, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A client handed to the store serves calls again after aclose(); a call that outlived
    # that close must not close it again under the calls made since.
    target, prefix = prefixed
    monkeypatch.setattr(_loops, "CLOSE_WAIT_S", 0.05)
    if target.kind == "fakeredis":
        store = make_store(target, prefix)  # a client handed in, owns_client=True
    else:
        store = RedisStore(aioredis.Redis.from_url(target.url), prefix=prefix, owns_client=True)
    gates = Gates(store, monkeypatch)
    gates.record_closes(store._seed, monkeypatch)
    with anyio.fail_after(10):
        gates.hold("latest")
        before = asyncio.ensure_future(store.latest("run", now=T0))
        await gates.reached("latest")
        await store.aclose()
        gates.hold("get_run")
        since = asyncio.ensure_future(store.get_run("run", now=T0))
        await gates.reached("get_run")
        gates.open("latest")
        assert await before is None
        during = list(gates.events)
        gates.open("get_run")
        assert await since is None
        await store.aclose()
    assert during == ["closed", "latest ran"]
    assert gates.events == ["closed", "latest ran", "get_run ran", "closed"]
