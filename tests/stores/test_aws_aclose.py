"""``aclose()`` of the S3 and DynamoDB stores while calls run: those calls finish on the client
they hold, the close waits for them (only so long), and nothing is left open.

What is left open is counted from outside: the process's TCP connections to the moto server
(``/proc/net/tcp``), and the ``ResourceWarning`` aiohttp gives for a session never closed.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import secrets
import threading
import time
import warnings
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import pytest

from fastcheckpoint import CheckpointManager
from fastcheckpoint._config import RetryPolicy
from fastcheckpoint.errors import StoreUnavailableError
from fastcheckpoint.stores import _loops
from fastcheckpoint.stores.dynamodb import DynamoDBStore
from fastcheckpoint.stores.s3 import S3Store
from tests.stores._moto import REGION, moto_endpoint
from tests.stores.dynamodb.test_dynamodb import atomic_moto, aws_names, provisioned
from tests.stores.s3.test_s3 import s3_bucket

__all__ = ["atomic_moto", "aws_names", "moto_endpoint", "provisioned", "s3_bucket"]

pytestmark = pytest.mark.anyio

CALLS = 8
QUICK = RetryPolicy(base_delay=0.001, max_delay=0.002, max_retries=1)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


def _connections_to(endpoint: str, *, besides: frozenset[int] = frozenset()) -> int:
    """The established TCP connections of this process whose far end is ``endpoint``'s port
    (the moto server runs in this process: its own ends have it as their local port), but
    for those from the local ports in ``besides``."""
    return len(_local_ports_to(endpoint) - besides)


def _local_ports_to(endpoint: str) -> frozenset[int]:
    """The local ports of the established TCP connections to ``endpoint``'s port.

    Counted before a test, they are the connections other tests of this worker left to the
    same moto server (a client closed only by the garbage collector, or keeping a connection
    alive until its keep-alive time ends): not the store's under test."""
    port = urlsplit(endpoint).port
    found: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                    found.add(int(fields[1].rsplit(":", 1)[1], 16))
    return frozenset(found)


def _s3(endpoint: str, bucket: str) -> S3Store:
    return S3Store(bucket, f"close-{secrets.token_hex(4)}", region=REGION, endpoint_url=endpoint,
                   retry=QUICK)


def _dynamodb(endpoint: str, names: tuple[str, str]) -> DynamoDBStore:
    return DynamoDBStore(names[0], bucket=names[1], prefix=f"close-{secrets.token_hex(4)}/",
                         threshold=1_000, region=REGION, endpoint_url=endpoint, retry=QUICK)


@pytest.fixture(params=["s3", "dynamodb"])
def store_and_endpoint(
    request: pytest.FixtureRequest, moto_endpoint: str
) -> tuple[S3Store | DynamoDBStore, str]:
    if request.param == "s3":
        return _s3(moto_endpoint, request.getfixturevalue("s3_bucket")), moto_endpoint
    endpoint = request.getfixturevalue("provisioned")
    return _dynamodb(endpoint, request.getfixturevalue("aws_names")), endpoint


class _Gate:
    """A ``before-send`` hook that holds every request of a client until :meth:`open`."""

    def __init__(self) -> None:
        self.held = 0
        self._open = asyncio.Event()

    async def __call__(self, **_: Any) -> None:
        self.held += 1
        await self._open.wait()

    def open(self) -> None:
        self._open.set()


async def _gate(store: S3Store | DynamoDBStore) -> _Gate:
    """A gate on the clients ``store`` uses in the running loop."""
    gate = _Gate()
    for client in await _clients_of(store):
        client.meta.events.register("before-send", gate)
    return gate


async def _clients_of(store: S3Store | DynamoDBStore) -> list[Any]:
    """The botocore clients ``store`` uses in the running loop."""
    return [await store.client()] if isinstance(store, S3Store) else list(await store.clients())


def _start_calls(manager: CheckpointManager) -> list[asyncio.Future[Any]]:
    """Restores of run "run" (which exists) and creates of new runs, half and half (each
    sends a request at once: creates of one run would wait for each other)."""
    calls = [asyncio.ensure_future(manager.restore("run")) for _ in range(CALLS // 2)]
    calls += [asyncio.ensure_future(manager.create(f"run-{n}", state={"n": n}, messages=[]))
              for n in range(CALLS // 2)]
    return calls


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():  # noqa: ASYNC110 - the tests' deadlines bound it
        await asyncio.sleep(0.001)


async def _unclosed_after(body: Callable[[], Awaitable[None]]) -> list[str]:
    """The ``ResourceWarning`` messages of sessions ``body`` left unclosed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        await body()
        gc.collect()
    return [str(warning.message) for warning in caught
            if issubclass(warning.category, ResourceWarning)]


async def test_aclose_lets_the_calls_running_finish(
    store_and_endpoint: tuple[S3Store | DynamoDBStore, str],
) -> None:
    # They kept using the client aclose() had closed: botocore retried for about 2 s, then
    # each failed with StoreUnavailableError ("'NoneType' object has no attribute 'get'").
    store, endpoint = store_and_endpoint
    before = _local_ports_to(endpoint)  # left by other tests of this worker
    manager = CheckpointManager(store)
    outcomes: list[Any] = []

    async def body() -> None:
        await manager.create("run", state={"text": "x" * 20_000}, messages=[])
        gate = await _gate(store)
        calls = _start_calls(manager)
        await _until(lambda: gate.held >= CALLS)  # each call has sent a request, held
        closing = asyncio.ensure_future(store.aclose())
        await asyncio.sleep(0)
        # A call that starts now gets a client of its own (no gate on it), which the next
        # close closes.
        outcomes.append(await manager.restore("run"))
        gate.open()
        outcomes.extend(await asyncio.gather(*calls, return_exceptions=True))
        await closing
        outcomes.append(_connections_to(endpoint, besides=before))
        await store.aclose()
        outcomes.append(_connections_to(endpoint, besides=before))

    with anyio.fail_after(60):
        unclosed = await _unclosed_after(body)
    started_later, *results, open_after_close, open_at_end = outcomes
    assert [result for result in results if isinstance(result, BaseException)] == []
    assert len(results) == CALLS
    assert all(result is not None for result in results)
    assert started_later is not None
    assert (open_after_close, open_at_end, unclosed) == (0, 0, [])


async def test_aclose_waits_for_the_calls_running_only_so_long(
    store_and_endpoint: tuple[S3Store | DynamoDBStore, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A call that never ends (a server that stopped answering, a client without timeouts)
    # must not hang the close: it closes the client after CLOSE_WAIT_S, and the call fails.
    monkeypatch.setattr(_loops, "CLOSE_WAIT_S", 0.1)
    store, endpoint = store_and_endpoint
    before = _local_ports_to(endpoint)  # left by other tests of this worker
    manager = CheckpointManager(store)
    with anyio.fail_after(60):
        await manager.create("run", state={"n": 0}, messages=[])
        gate = await _gate(store)
        held = asyncio.ensure_future(manager.restore("run"))
        await _until(lambda: gate.held > 0)
        await store.aclose()
        assert not held.done()
        gate.open()
        with pytest.raises(StoreUnavailableError):
            await held
    assert _connections_to(endpoint, besides=before) == 0
    assert "calls still use after" in caplog.text


def test_aclose_closes_the_clients_of_other_running_loops_there(
    store_and_endpoint: tuple[S3Store | DynamoDBStore, str],
) -> None:
    # One store used from two threads, each running its own event loop: aclose() let go of
    # the other loop's client, and returned; asyncio closed it there later, under the calls
    # running. It now closes it in that loop, once those calls have returned, and waits.
    store, endpoint = store_and_endpoint
    before = _local_ports_to(endpoint)  # left by other tests of this worker
    manager = CheckpointManager(store)
    held = threading.Event()
    unblock = threading.Event()
    other: dict[str, Any] = {}

    async def serve() -> None:
        other["loop"] = asyncio.get_running_loop()
        other["stop"] = asyncio.Event()
        await manager.create("run", state={"n": 0}, messages=[])
        other["gate"] = gate = await _gate(store)
        other["clients"] = await _clients_of(store)
        calls = _start_calls(manager)
        await _until(lambda: gate.held >= CALLS)
        held.set()
        # This loop is stuck until the other thread's aclose() has begun: then nothing can
        # have been closed here yet.
        unblock.wait(60)  # blocks this loop on purpose
        other["results"] = await asyncio.gather(*calls, return_exceptions=True)
        await other["stop"].wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),))
    thread.start()

    async def close_here() -> bool:
        with anyio.fail_after(60):
            await anyio.to_thread.run_sync(held.wait)
            closing = asyncio.ensure_future(store.aclose())
            await asyncio.sleep(0)
            returned_at_once = closing.done()
            other["loop"].call_soon_threadsafe(other["gate"].open)
            unblock.set()
            started = time.monotonic()
            await closing
            other["close_s"] = time.monotonic() - started
            return returned_at_once

    try:
        returned_at_once = asyncio.run(close_here())
        # The clients the calls used are closed by now: their HTTP sessions let go (aiobotocore
        # drops them on close). Sockets are counted too, for the message only: a client built
        # in that loop after the close began (by a call starting then) is not this close's.
        unclosed = [client for client in other["clients"]
                    if client._endpoint.http_session._sessions is not None]
        left = _connections_to(endpoint, besides=before)
    finally:
        unblock.set()
        held.wait(60)
        other["loop"].call_soon_threadsafe(other["gate"].open)
        other["loop"].call_soon_threadsafe(other["stop"].set)
        thread.join(60)
    results = other["results"]
    assert [result for result in results if isinstance(result, BaseException)] == []
    assert len(results) == CALLS
    # (How long the close took tells a close given up after its wait from a client built
    # after it.)
    assert (returned_at_once, unclosed) == (False, []), \
        f"the close took {other['close_s']:.1f} s; {left} connections left"


@pytest.mark.parametrize("store_type", [S3Store, DynamoDBStore])
def test_every_call_that_sends_holds_the_client(store_type: type[Any]) -> None:
    # aclose() waits only for the calls marked so (the accessors hand the client out).
    unmarked = [name for name, member in vars(store_type).items()
                if inspect.iscoroutinefunction(member) and not name.startswith("_")
                and not hasattr(member, "__wrapped__")]
    assert sorted(unmarked) == sorted({"aclose", "client", "clients"} & set(vars(store_type)))
