"""RedisStore's first contact: URL options, event loops, trio."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from fastcheckpoint import CheckpointConfig, CheckpointManager, open_store
from fastcheckpoint._config import RetryPolicy
from fastcheckpoint.errors import ConfigurationError, StoreUnavailableError
from fastcheckpoint.stores.redis import (
    DEFAULT_SOCKET_CONNECT_TIMEOUT,
    DEFAULT_SOCKET_TIMEOUT,
    RedisStore,
)
from fastcheckpoint.testing import T0, key_of, make_run
from tests.stores._redis_servers import PrivateRedis, free_cluster_port, free_port, redis_binary
from tests.stores._redis_support import (
    counting_connection_class,
    delete_prefix,
    real_server,
    unique_prefix,
)
from tests.stores.conftest import RedisTarget

_DEADLINE = 30


# -- URL options ------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "named", "suggested"), [
    ("redis://127.0.0.1:6379/0?prefx=x", "prefx", "prefix"),
    ("redis://127.0.0.1:6379/0?socket_timout=5", "socket_timout", "socket_timeout"),
    ("rediss+cluster://127.0.0.1:7000/0?max_payload=9", "max_payload", "max_payload_bytes"),
])
def test_unknown_url_options_are_named_with_the_nearest_known_one(
    url: str, named: str, suggested: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        open_store(url)
    message = str(caught.value)
    assert repr(named) in message
    assert f"did you mean {suggested!r}?" in message
    assert "ssl_cert_reqs" in message  # the known ones are listed, the driver's too


def test_unknown_keyword_options_are_named() -> None:
    with pytest.raises(ConfigurationError, match=r"'socket_timout'.*did you mean 'socket_timeout'"):
        RedisStore.from_url("redis://127.0.0.1:6379/0", socket_timout=5)


def test_the_driver_query_options_are_accepted() -> None:
    store = RedisStore.from_url(
        "rediss://127.0.0.1:6379/0?prefix=p&socket_timeout=5&health_check_interval=10"
        "&ssl_cert_reqs=none&client_name=agents&max_connections=20&protocol=3")
    kwargs = store._client.get_connection_kwargs()
    assert (kwargs["socket_timeout"], kwargs["ssl_cert_reqs"], kwargs["client_name"]) == (
        5.0, "none", "agents")
    assert store._client.connection_pool.max_connections == 20


# -- socket timeouts ----------------------------------------------------------------------------


def test_a_store_from_a_url_has_socket_timeouts_whatever_the_redis_py_version() -> None:
    """redis-py before 8 waits for ever by default; the store sets its own, which the URL query
    and keyword options override."""
    default = RedisStore.from_url("redis://127.0.0.1:6379/0")
    cluster = RedisStore.from_url("redis+cluster://127.0.0.1:7000/0")
    query = RedisStore.from_url(
        "redis://127.0.0.1:6379/0?socket_timeout=2.5&socket_connect_timeout=1")
    keyword = RedisStore.from_url("redis://127.0.0.1:6379/0", socket_timeout=3)
    timeouts = [(kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) for kwargs in (
        store._client.get_connection_kwargs() for store in (default, cluster, query, keyword))]
    assert (DEFAULT_SOCKET_TIMEOUT, DEFAULT_SOCKET_CONNECT_TIMEOUT) == (10.0, 5.0)
    assert timeouts == [(10.0, 5.0), (10.0, 5.0), (2.5, 1.0), (3, 5.0)]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_server_that_never_answers_fails_the_call_instead_of_hanging_it() -> None:
    """The connection is accepted and every request swallowed, as behind a firewall that drops
    packets: after the socket timeout and the retries, a typed error."""
    swallowed: list[bytes] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            swallowed.append(data)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = RedisStore.from_url(f"redis://127.0.0.1:{port}/0?socket_timeout=0.2",
                                retry=RetryPolicy(base_delay=0.01, max_delay=0.05, max_retries=1))
    try:
        with anyio.fail_after(_DEADLINE), pytest.raises(StoreUnavailableError) as caught:
            await store.get_run(key_of(make_run("silent")), now=T0)
    finally:
        await store.aclose()
        server.close()
        await server.wait_closed()
    assert swallowed
    assert "Timeout" in str(caught.value)


# -- event loops --------------------------------------------------------------------------------


def _create_and_restore(manager: CheckpointManager, step: int) -> Any:
    async def main() -> Any:
        with anyio.fail_after(_DEADLINE):
            created = await manager.create("module-level", {"step": step})
            restored = await manager.restore("module-level")
            return created, restored

    return main


def test_a_store_from_a_url_works_from_each_new_event_loop(redis_target: RedisTarget) -> None:
    """A module-level manager used by two asyncio.run() calls, as FastAgentic's docs do."""
    real_server(redis_target)
    prefix = unique_prefix(redis_target)
    store = RedisStore.from_url(f"{redis_target.url}?prefix={prefix}")
    manager = CheckpointManager(store, config=CheckpointConfig(clock=lambda: T0))
    try:
        first, _ = asyncio.run(_create_and_restore(manager, 1)())
        second, restored = asyncio.run(_create_and_restore(manager, 2)())
    finally:
        asyncio.run(_drop(redis_target, prefix, store))
    assert (first.metadata.sequence, second.metadata.sequence) == (0, 1)
    assert restored is not None
    assert restored.state == {"step": 2}


async def _drop(target: RedisTarget, prefix: str, store: RedisStore) -> None:
    with anyio.fail_after(_DEADLINE):
        await store.aclose()
        client = aioredis.Redis.from_url(target.url)
        await delete_prefix(client, prefix)
        await client.aclose()


def test_a_given_client_is_refused_in_another_event_loop_before_anything_is_sent(
    redis_target: RedisTarget,
) -> None:
    """The client's connections belong to the loop it was first used in: another loop gets
    a ConfigurationError saying what to do, and nothing reaches the server."""
    real_server(redis_target)
    prefix = unique_prefix(redis_target)
    counter = counting_connection_class()
    client = aioredis.Redis.from_url(redis_target.url, connection_class=counter)
    store = RedisStore(client, prefix=prefix)
    manager = CheckpointManager(store, config=CheckpointConfig(clock=lambda: T0))
    first, _ = asyncio.run(_create_and_restore(manager, 1)())
    sent = counter.round_trips
    with pytest.raises(ConfigurationError, match="from_url") as caught:
        asyncio.run(_create_and_restore(manager, 2)())
    assert counter.round_trips == sent
    assert "event loop" in str(caught.value)
    assert first.metadata.sequence == 0
    asyncio.run(_drop(redis_target, prefix, store))


# -- trio ---------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_on_trio_the_first_call_says_the_store_needs_asyncio(
    redis_target: RedisTarget,
) -> None:
    counter = counting_connection_class()
    # Never contacted: the store refuses before sending anything.
    client = aioredis.Redis.from_url("redis://127.0.0.1:6379/0", connection_class=counter)
    store = RedisStore(client, prefix=unique_prefix(redis_target))
    with anyio.fail_after(_DEADLINE):
        with pytest.raises(ConfigurationError, match="asyncio") as caught:
            await store.latest(key_of(make_run("trio")), now=T0)
        with pytest.raises(ConfigurationError, match="asyncio"):
            await CheckpointManager(store).create("trio", {"n": 1})
        await store.aclose()
    assert "RedisStore" in str(caught.value)
    assert "trio" in str(caught.value)
    assert counter.round_trips == 0


# -- first contact with a cluster URL -----------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_cluster_url_for_a_plain_server_or_no_server_is_a_typed_error(
    redis_target: RedisTarget,
) -> None:
    """redis-py reports both as RedisClusterException, which is not one of its RedisErrors."""
    real_server(redis_target)
    host_port = redis_target.url.split("//", 1)[1].split("/", 1)[0]
    plain = RedisStore.from_url(f"redis+cluster://{host_port}/0?prefix={unique_prefix(redis_target)}")
    nothing = RedisStore.from_url(f"redis+cluster://127.0.0.1:{free_port()}/0?prefix=p",
                                  retry=RetryPolicy(max_retries=0))
    with anyio.fail_after(_DEADLINE):
        with pytest.raises(ConfigurationError, match="not a Redis Cluster") as wrong:
            await plain.latest(key_of(make_run("cluster")), now=T0)
        with pytest.raises(StoreUnavailableError) as unreachable:
            await nothing.count_runs(status=None, now=T0)
        await plain.aclose()
        await nothing.aclose()
    assert "redis://" in str(wrong.value)
    assert "127.0.0.1" in str(unreachable.value)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_cluster_refusing_the_credentials_is_a_configuration_error() -> None:
    """redis-py reports the nodes' refusal as a failed discovery, in words only; it was
    reported as the cluster being unreachable, at "Redis at ?"."""
    if redis_binary() is None:
        pytest.skip("no redis-server binary here to start a cluster node with a password")
    node = PrivateRedis(free_cluster_port(), extra=(
        "--cluster-enabled", "yes", "--cluster-config-file", "nodes-auth.conf"))
    node.start()
    try:
        admin = aioredis.Redis(host="127.0.0.1", port=node.port)
        await admin.config_set("requirepass", "secret")
        await admin.aclose()
        with anyio.fail_after(_DEADLINE):
            for credentials in (":wrong@", ""):
                store = RedisStore.from_url(
                    f"redis+cluster://{credentials}127.0.0.1:{node.port}/0?prefix=p",
                    retry=RetryPolicy(max_retries=0))
                with pytest.raises(ConfigurationError, match="refused the credentials") as caught:
                    await store.count_runs(status=None, now=T0)
                await store.aclose()
                assert f"Redis Cluster at 127.0.0.1:{node.port}" in str(caught.value)
    finally:
        node.stop()


def test_a_passed_client_that_served_another_event_loop_gives_a_typed_error(
    redis_target: RedisTarget,
) -> None:
    """The client was used in an event loop that is gone before the store got it: redis-py
    fails with a bare RuntimeError on its dead connections."""
    real_server(redis_target)
    prefix = unique_prefix(redis_target)
    client = aioredis.Redis.from_url(redis_target.url)

    async def ping() -> None:
        with anyio.fail_after(_DEADLINE):
            await client.ping()

    asyncio.run(ping())
    store = RedisStore(client, prefix=prefix)

    async def latest() -> Any:
        with anyio.fail_after(_DEADLINE):
            return await store.latest(key_of(make_run("elsewhere")), now=T0)

    with pytest.raises(ConfigurationError, match="event loop") as caught:
        asyncio.run(latest())
    assert "RedisStore.from_url" in str(caught.value)
    asyncio.run(_drop(redis_target, prefix, store))


def test_event_loops_that_finished_leave_no_connection_open(redis_target: RedisTarget) -> None:
    """A program calling asyncio.run() again and again must not pile up a connection pool,
    with open sockets, per finished event loop (the last one's may wait for the next call)."""
    real_server(redis_target)
    prefix = unique_prefix(redis_target)
    name = f"fc-loops-{prefix}"
    store = RedisStore.from_url(f"{redis_target.url}?prefix={prefix}&client_name={name}")

    async def latest() -> None:
        with anyio.fail_after(_DEADLINE):
            await store.latest(key_of(make_run("loops")), now=T0)

    for _ in range(4):
        asyncio.run(latest())
    gc.collect()

    async def connections() -> int:
        with anyio.fail_after(_DEADLINE):
            admin = aioredis.Redis.from_url(redis_target.url)
            listed = await admin.client_list()
            await admin.aclose()
            return sum(1 for client in listed if client.get("name") == name)

    try:
        assert asyncio.run(connections()) <= 1
    finally:
        asyncio.run(_drop(redis_target, prefix, store))
