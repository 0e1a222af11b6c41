"""The fault proxy does what it says: a cut request never runs (on PostgreSQL: never commits), a
lost reply's request did run, a delay delays, and the plan's rate and seed hold. The other tests
rely on each of these."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.exceptions as redis_errors
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.reliability._stores import REGION, address
from tests.reliability.faults import (
    HTTP,
    POSTGRES,
    POSTGRES_EXECUTIONS,
    REDIS,
    Fault,
    FaultPlan,
    FaultProxy,
)
from tests.stores._postgres_server import PostgresTarget
from tests.stores.conftest import RedisTarget

_SET = "redis.call('SET', KEYS[1], ARGV[1]) return 1"


@pytest.fixture
def redis_address(shared_redis: RedisTarget) -> Iterator[tuple[str, int, str]]:
    """Host, port and a key of this test on the shared Redis; the key is removed afterwards."""
    if shared_redis.kind == "fakeredis":
        pytest.skip("needs a real redis-server: fakeredis cannot sit behind a TCP proxy")
    host, port = address(shared_redis.url)
    key = f"{shared_redis.prefix}-proxy:{secrets.token_hex(4)}"
    yield host, port, key
    direct = redis.Redis(host=host, port=port)
    direct.delete(key)
    direct.close()


def _client(port: int) -> redis.Redis:
    # No retries: each call is exactly one request, so the plan's script lines up with calls.
    return redis.Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0),
                       socket_timeout=10)


def _value(host: str, port: int, key: str) -> bytes | None:
    direct = redis.Redis(host=host, port=port)
    try:
        value = direct.get(key)
        return None if value is None else bytes(value)  # type: ignore[arg-type]
    finally:
        direct.close()


def test_a_cut_request_never_runs(redis_address: tuple[str, int, str]) -> None:
    host, port, key = redis_address
    with FaultProxy((host, port), REDIS, FaultPlan(script=[Fault.CUT])) as proxy:
        client = _client(proxy.port)
        with pytest.raises(redis_errors.ConnectionError):
            client.eval(_SET, 1, key, "cut")
        assert client.eval(_SET, 1, key, "after") == 1  # the next request passes
        client.close()
    assert proxy.counts == {Fault.CUT: 1, Fault.PASS: 1}
    assert _value(host, port, key) == b"after"


def test_a_lost_reply_was_applied(redis_address: tuple[str, int, str]) -> None:
    host, port, key = redis_address
    with FaultProxy((host, port), REDIS, FaultPlan(script=[Fault.LOSE_REPLY])) as proxy:
        client = _client(proxy.port)
        with pytest.raises(redis_errors.ConnectionError):
            client.eval(_SET, 1, key, "applied")
        client.close()
    assert proxy.injected == 1
    assert _value(host, port, key) == b"applied"


def test_a_delay_delays_and_delivers(redis_address: tuple[str, int, str]) -> None:
    host, port, key = redis_address
    plan = FaultPlan(script=[Fault.DELAY])
    with FaultProxy((host, port), REDIS, plan, delay_seconds=0.3) as proxy:
        client = _client(proxy.port)
        started = time.monotonic()
        assert client.eval(_SET, 1, key, "late") == 1
        elapsed = time.monotonic() - started
        client.close()
    assert elapsed >= 0.3
    assert _value(host, port, key) == b"late"


def test_handshakes_pass_and_only_script_calls_are_requests(
    redis_address: tuple[str, int, str],
) -> None:
    host, port, key = redis_address
    with FaultProxy((host, port), REDIS, FaultPlan(rate=1.0, kinds=[Fault.CUT])) as proxy:
        client = _client(proxy.port)
        assert client.ping()
        client.set(key, "plain")
        with pytest.raises(redis_errors.ConnectionError):
            client.eval(_SET, 1, key, "cut")
        client.close()
    assert proxy.counts == {Fault.CUT: 1}
    assert _value(host, port, key) == b"plain"


def test_the_plan_keeps_its_rate_and_replays_from_its_seed() -> None:
    def draw(seed: int) -> list[Fault]:
        plan = FaultPlan(rate=0.1, seed=seed)
        return [plan.next() for _ in range(5000)]

    first = draw(7)
    assert first == draw(7)
    assert first != draw(8)
    injected = sum(fault is not Fault.PASS for fault in first)
    assert 400 <= injected <= 600
    assert {fault for fault in first if fault is not Fault.PASS} == {
        Fault.CUT, Fault.LOSE_REPLY, Fault.DELAY}


def _s3(endpoint: str) -> Any:
    import boto3  # type: ignore[import-untyped]
    from botocore.config import Config

    config = Config(retries={"total_max_attempts": 1, "mode": "standard"})
    return boto3.client("s3", region_name=REGION, endpoint_url=endpoint, config=config)


@pytest.mark.parametrize(("fault", "applied"), [(Fault.CUT, False), (Fault.LOSE_REPLY, True)])
def test_http_requests_meet_their_fate(
    moto_endpoint: str, aws_bucket: str, fault: Fault, applied: bool
) -> None:
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError

    key = f"proxy/{secrets.token_hex(4)}"
    with FaultProxy(address(moto_endpoint), HTTP, FaultPlan(script=[fault])) as proxy:
        client = _s3(proxy.endpoint)
        with pytest.raises((ConnectionClosedError, EndpointConnectionError)):
            client.put_object(Bucket=aws_bucket, Key=key, Body=b"x" * 100_000)
        client.close()
    direct = _s3(moto_endpoint)
    listed = direct.list_objects_v2(Bucket=aws_bucket, Prefix=key).get("Contents", [])
    direct.close()
    assert proxy.counts == {fault: 1}
    assert len(listed) == (1 if applied else 0)


def test_a_lost_http_reply_sent_with_its_interim_answer_is_dropped() -> None:
    # A server that is slow to say "100 Continue" may send it in one chunk with the reply
    # (botocore sends the body after a second without it): the proxy forwarded the whole
    # chunk as interim, and the "lost" reply reached the client (a flaky CI run).
    import socket
    import threading

    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    with socket.create_server(("127.0.0.1", 0)) as server:
        def answer() -> None:
            connection, _ = server.accept()
            with connection:
                connection.recv(65536)
                connection.sendall(interim + reply)
                connection.recv(65536)  # until the proxy lets go

        answering = threading.Thread(target=answer, daemon=True)
        answering.start()
        plan = FaultPlan(script=[Fault.LOSE_REPLY])
        with FaultProxy(server.getsockname(), HTTP, plan) as proxy, \
                socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as client:
            client.sendall(b"PUT /k HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx")
            heard = b""
            while chunk := client.recv(65536):
                heard += chunk
        answering.join(10)
    assert heard == interim
    assert proxy.counts == {Fault.LOSE_REPLY: 1}


# -- PostgreSQL --------------------------------------------------------------------------


@pytest.fixture
def pg_table(postgres_server: PostgresTarget) -> Iterator[tuple[PostgresTarget, str]]:
    """A table of this test's own (``n`` from a sequence, ``v`` text), dropped afterwards."""
    schema = f"proxy_{secrets.token_hex(4)}"
    _pg(postgres_server.url(), f'CREATE SCHEMA "{schema}"; '
        f'CREATE SEQUENCE "{schema}".s; CREATE TABLE "{schema}".t (n bigint, v text)')
    yield postgres_server, f'"{schema}"'
    _pg(postgres_server.url(), f'DROP SCHEMA "{schema}" CASCADE')


def _pg(url: str, statement: str, *args: Any) -> Any:
    """``statement`` on a connection of its own; the rows it returns."""
    import asyncio

    import asyncpg

    async def run() -> Any:
        connection = await asyncpg.connect(url, timeout=10)
        try:
            if ";" in statement:  # several statements: the simple protocol, no rows
                return await connection.execute(statement, *args)
            return await connection.fetch(statement, *args)
        finally:
            await connection.close()

    return asyncio.run(run())


def _through(proxy: FaultProxy, target: PostgresTarget) -> str:
    return f"postgresql://postgres@127.0.0.1:{proxy.port}/{target.database}"


def _pg_insert(url: str, schema: str) -> Exception | None:
    """One INSERT with a parameter (prepared, then run: two requests); what it raised."""
    try:
        _pg(url, f"INSERT INTO {schema}.t VALUES (nextval('{schema}.s'), $1)", "x")
    except Exception as exc:  # asyncpg's or OSError: what a broken connection raises
        return exc
    return None


def test_postgres_a_cut_statement_runs_and_is_rolled_back(
    pg_table: tuple[PostgresTarget, str],
) -> None:
    """The cut falls after Bind and Execute, before Sync: the server runs the INSERT (the
    sequence, which no rollback resets, moves on), the connection dies, nothing commits."""
    target, schema = pg_table
    with FaultProxy(address(target.url()), POSTGRES_EXECUTIONS,
                    FaultPlan(script=[Fault.CUT])) as proxy:
        assert _pg_insert(_through(proxy, target), schema) is not None
    assert proxy.counts == {Fault.CUT: 1}
    assert _pg(target.url(), f"SELECT count(*) FROM {schema}.t")[0][0] == 0
    assert _pg(target.url(), f"SELECT last_value, is_called FROM {schema}.s")[0] == (1, True)


def test_postgres_a_lost_reply_was_committed(pg_table: tuple[PostgresTarget, str]) -> None:
    target, schema = pg_table
    with FaultProxy(address(target.url()), POSTGRES_EXECUTIONS,
                    FaultPlan(script=[Fault.LOSE_REPLY])) as proxy:
        assert _pg_insert(_through(proxy, target), schema) is not None
    assert proxy.counts == {Fault.LOSE_REPLY: 1}
    assert _pg(target.url(), f"SELECT n, v FROM {schema}.t") == [(1, "x")]


def test_postgres_an_abandoned_statement_commits_after_the_client_is_gone(
    pg_table: tuple[PostgresTarget, str],
) -> None:
    """The client's connection dies before any reply; the server, its connection kept, runs
    and commits the statement all the same."""
    target, schema = pg_table
    with FaultProxy(address(target.url()), POSTGRES_EXECUTIONS,
                    FaultPlan(script=[Fault.ABANDON])) as proxy:
        assert _pg_insert(_through(proxy, target), schema) is not None
        deadline = time.monotonic() + 10
        while not _pg(target.url(), f"SELECT n, v FROM {schema}.t"):
            assert time.monotonic() < deadline, "the abandoned statement never committed"
            time.sleep(0.01)
    assert proxy.counts == {Fault.ABANDON: 1}
    assert _pg(target.url(), f"SELECT n, v FROM {schema}.t") == [(1, "x")]


def test_postgres_handshakes_pass_and_prepares_and_runs_are_requests(
    pg_table: tuple[PostgresTarget, str],
) -> None:
    """Every request is cut: the startup and authentication pass, the prepare (Parse..Sync)
    is the first request and dies; with only executions counted the prepare passes and the
    run dies."""
    target, schema = pg_table
    for wire, fates in ((POSTGRES, 1), (POSTGRES_EXECUTIONS, 1)):
        with FaultProxy(address(target.url()), wire,
                        FaultPlan(rate=1.0, kinds=[Fault.CUT])) as proxy:
            assert _pg_insert(_through(proxy, target), schema) is not None
        assert proxy.counts == {Fault.CUT: fates}
    assert _pg(target.url(), f"SELECT count(*) FROM {schema}.t")[0][0] == 0
    # The prepare was cut on the first wire; on the second the INSERT itself ran, once.
    assert _pg(target.url(), f"SELECT last_value FROM {schema}.s")[0][0] == 1
