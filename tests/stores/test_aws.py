"""The AWS plumbing and S3 object access shared by the S3 and DynamoDB stores, against moto
and a failing server."""

from __future__ import annotations

import contextlib
import functools
import http.server
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest

from fastcheckpoint._config import RetryPolicy
from fastcheckpoint._gather import gather, pair
from fastcheckpoint.errors import ConfigurationError, StoreError, StoreUnavailableError
from fastcheckpoint.stores._aws import AwsEndpoint, RequestCounter, open_client
from fastcheckpoint.stores._s3_io import UNCHANGED, Bucket
from tests.stores._moto import REGION, moto_endpoint, unique_name

__all__ = ["moto_endpoint"]

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


@dataclass(frozen=True)
class RecordingPolicy(RetryPolicy):
    """Records the attempt numbers it was asked to wait for; waits almost nothing."""

    asked: list[int] = field(default_factory=list)

    def delay(self, attempt: int, rng: Any = None) -> float:
        self.asked.append(attempt)
        return 0.001


@contextlib.asynccontextmanager
async def s3_client(endpoint_url: str, retry: RetryPolicy | None = None) -> AsyncIterator[Any]:
    async with contextlib.AsyncExitStack() as stack:
        endpoint = AwsEndpoint(region=REGION, endpoint_url=endpoint_url)
        yield await open_client(stack, "s3", endpoint, retry or RetryPolicy())


@pytest.fixture
async def bucket(moto_endpoint: str) -> AsyncIterator[Bucket]:
    async with s3_client(moto_endpoint) as client:
        name = unique_name("aws")
        await client.create_bucket(Bucket=name)
        yield Bucket(client, name, prefix="p/")


async def test_bucket_round_trip_conditions_list_and_delete(bucket: Bucket) -> None:
    with anyio.fail_after(30):
        etag = await bucket.put("a/1", b"one")
        assert etag
        assert await bucket.put("a/1", b"other", if_none_match=True) is None  # taken
        assert await bucket.get("a/1") == (b"one", etag)
        assert await bucket.get("a/missing") is None
        assert await bucket.put("a/1", b"two", if_match="\"stale\"") is None  # CAS lost
        assert await bucket.put("a/missing", b"x", if_match=etag) is None  # nothing to match
        newer = await bucket.put("a/1", b"two", if_match=etag)
        assert newer is not None
        assert not await bucket.delete_if("a/1", etag)  # the old ETag no longer matches
        for name in ("a/2", "a/3", "b/1"):
            assert await bucket.put(name, name.encode(), if_none_match=True)
        assert [entry.key for entry in await bucket.list("a/", limit=2)] == ["a/1", "a/2"]
        assert [entry.key for entry in await bucket.list("a/", start_after="a/1")] == [
            "a/2", "a/3"]
        assert (await bucket.list("a/1"))[0].etag == newer
        assert await bucket.delete_if("a/1", newer)
        await bucket.delete(["a/2", "a/3", "a/never"])  # a missing key is no error
        assert [entry.key for entry in await bucket.list("")] == ["b/1"]


async def test_scan_pages_and_stops_when_told(bucket: Bucket) -> None:
    with anyio.fail_after(60):
        await gather([functools.partial(bucket.put, f"k/{n:04d}", b"") for n in range(1005)])
        with RequestCounter.attached(bucket.client) as counter:
            everything, ended = await bucket.scan("k/")
        assert (len(everything), ended, counter.counts) == (1005, True, {"ListObjectsV2": 2})
        with RequestCounter.attached(bucket.client) as counter:
            few, ended = await bucket.scan("k/", first=3, until=lambda found: len(found) >= 3)
        assert ([entry.key for entry in few], ended) == (["k/0000", "k/0001", "k/0002"], False)
        assert counter.counts == {"ListObjectsV2": 1}


async def test_delete_sends_one_request_per_thousand_keys(bucket: Bucket) -> None:
    with anyio.fail_after(30), RequestCounter.attached(bucket.client) as counter:
        await bucket.delete([f"k/{n}" for n in range(2001)])
        assert counter.counts == {"DeleteObjects": 3}


async def test_request_counter_counts_each_operation(bucket: Bucket) -> None:
    with anyio.fail_after(30):
        with RequestCounter.attached(bucket.client) as counter:
            await bucket.put("c", b"x")
            await bucket.get("c")
            await bucket.get("c")
        await bucket.get("c")  # detached: not counted
        assert counter.counts == {"PutObject": 1, "GetObject": 2}
        assert counter.total == 3


async def test_pair_and_gather_keep_the_order_of_their_calls() -> None:
    async def after(delay: float, value: int) -> int:
        await anyio.sleep(delay)
        return value

    with anyio.fail_after(10):
        assert await pair(functools.partial(after, 0.02, 1), functools.partial(after, 0, 2)) == (
            1, 2)
        calls = [functools.partial(after, (20 - n) / 1000, n) for n in range(20)]
        assert await gather(calls) == list(range(20))


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_pair_and_gather_raise_one_error_not_a_group() -> None:
    """A failed request among concurrent ones is raised alone, its driver error chained."""
    async def fails(message: str) -> int:
        try:
            raise OSError(message)
        except OSError as exc:
            raise StoreError(message) from exc

    async def waits() -> int:
        await anyio.sleep(10)
        return 0

    with anyio.fail_after(5):
        with pytest.raises(StoreError, match="first") as caught:
            await pair(functools.partial(fails, "first"), waits)
        assert isinstance(caught.value.__cause__, OSError)
        with pytest.raises(StoreError, match="failed"):
            await gather([waits, functools.partial(fails, "failed"), waits])
        with pytest.raises(KeyError):  # not ours: still one exception, never a group
            await pair(waits, functools.partial(_raise, KeyError("k")))
        with anyio.move_on_after(0.01) as scope:  # cancellation passes through unchanged
            await pair(waits, waits)
        assert scope.cancelled_caught


async def _raise(error: Exception) -> None:
    raise error


async def test_get_if_changed_answers_unchanged_changed_or_missing(bucket: Bucket) -> None:
    with anyio.fail_after(30):
        etag = await bucket.put("watched", b"one")
        assert etag is not None
        with RequestCounter.attached(bucket.client) as counter:
            assert await bucket.get_if_changed("watched", etag) is UNCHANGED
        newer = await bucket.put("watched", b"two")
        assert await bucket.get_if_changed("watched", etag) == (b"two", newer)
        assert await bucket.get_if_changed("never", etag) is None
    assert counter.counts == {"GetObject": 1}


async def test_missing_bucket_is_a_configuration_error(moto_endpoint: str) -> None:
    """Also for reads: a missing bucket is never a missing object."""
    with anyio.fail_after(30):
        async with s3_client(moto_endpoint) as client:
            absent = Bucket(client, unique_name("absent"), "")
            with pytest.raises(ConfigurationError, match="fastcheckpoint init"):
                await absent.put("k", b"v")
            with pytest.raises(ConfigurationError, match="fastcheckpoint init"):
                await absent.get("k")
            with pytest.raises(ConfigurationError, match="fastcheckpoint init"):
                await absent.get_if_changed("k", '"x"')


class _SlowDownHandler(http.server.BaseHTTPRequestHandler):
    """Answers every request like a throttling S3."""

    requests = 0
    status = 503
    body = (
        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
        b"<Message>Please reduce your request rate.</Message></Error>"
    )

    def _answer(self) -> None:
        type(self).requests += 1
        if self.headers.get("Expect", "").lower() != "100-continue":
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
        # With "Expect: 100-continue" the body never comes: answer at once, then close.
        self.close_connection = True
        self.send_response(self.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_GET = do_PUT = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def throttling_server() -> Iterator[str]:
    _SlowDownHandler.requests = 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowDownHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def test_throttling_is_retried_with_the_policy_then_unavailable(
    throttling_server: str,
) -> None:
    policy = RecordingPolicy(max_retries=3)
    with anyio.fail_after(30):
        async with s3_client(throttling_server, policy) as client:
            with pytest.raises(StoreUnavailableError, match="throttling") as caught:
                await Bucket(client, "bucket", "").get("key")
    assert _SlowDownHandler.requests == 4  # the first try and max_retries retries
    assert policy.asked == [0, 1, 2]
    assert caught.value.__cause__ is not None


async def test_zero_retries_sends_one_request(throttling_server: str) -> None:
    with anyio.fail_after(30):
        async with s3_client(throttling_server, RecordingPolicy(max_retries=0)) as client:
            with pytest.raises(StoreUnavailableError):
                await Bucket(client, "bucket", "").put("key", b"v")
    assert _SlowDownHandler.requests == 1


async def test_forbidden_names_the_iam_policy(throttling_server: str) -> None:
    _SlowDownHandler.status = 403
    _SlowDownHandler.body = b"<Error><Code>AccessDenied</Code><Message>no</Message></Error>"
    try:
        with anyio.fail_after(30):
            async with s3_client(throttling_server) as client:
                with pytest.raises(StoreError, match="IAM policy"):
                    await Bucket(client, "bucket", "").get("key")
        assert _SlowDownHandler.requests == 1  # not transient: no retry
    finally:
        _SlowDownHandler.status = 503
        _SlowDownHandler.body = _SlowDownHandler.__dict__["body"]


async def test_unreachable_endpoint_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    # Credentials of its own: without any, the call is refused before it tries to connect.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again before use: connection refused
    with anyio.fail_after(30):
        async with s3_client(f"http://127.0.0.1:{port}", RecordingPolicy(max_retries=1)) as c:
            with pytest.raises(StoreUnavailableError, match="cannot reach"):
                await Bucket(c, "bucket", "").get("key")


def test_endpoint_from_query_validates_the_url() -> None:
    assert AwsEndpoint.from_query({"region": "eu-west-1"}) == AwsEndpoint("eu-west-1", None)
    with pytest.raises(ConfigurationError, match="endpoint_url"):
        AwsEndpoint.from_query({"endpoint_url": "127.0.0.1:9000"})
