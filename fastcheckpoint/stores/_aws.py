"""AWS plumbing shared by the S3 and DynamoDB stores.

One place for what both backends need from aiobotocore: where to connect (``region``,
``endpoint_url`` from a store URL), clients built with the one retry policy, translation of
botocore's exceptions into ours, and counting the HTTP requests a client sends. Objects in a
bucket (the S3 store's records, the DynamoDB store's large payloads) go through
``_s3_io.Bucket``.

Retries. botocore's *standard* mode decides what is transient (throttling codes such
as ``SlowDown`` and ``ProvisionedThroughputExceededException``, 5xx, connection resets and
timeouts); its backoff, however, is hard-wired (base 1 s for throttling, cap 20 s). We keep
botocore's decision and replace only the delay with :meth:`RetryPolicy.delay`, by swapping the
client's ``needs-retry`` handler for one that asks botocore's retry conditions and our policy.

Sends. A request may go on the wire more than once without botocore counting an attempt:
aiohttp sends an idempotent request (a PUT) again when a reused keep-alive connection drops.
Clients built here count every send (:func:`counting_sends`), so that a conditional write can
tell whether its answer may be to a second copy of itself.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.httpsession import AIOHTTPSession
from aiobotocore.retries.standard import AioStandardRetryConditions
from aiobotocore.session import AioSession, get_session
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    HTTPClientError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)
from botocore.retries.standard import RetryEventAdapter
from botocore.utils import is_valid_endpoint_url, is_valid_ipv6_endpoint_url

from fastcheckpoint._config import RetryPolicy
from fastcheckpoint.errors import (
    CheckpointError,
    ConfigurationError,
    StoreError,
    StoreUnavailableError,
)

if TYPE_CHECKING:
    pass

__all__ = [
    "AwsEndpoint",
    "RequestCounter",
    "Sends",
    "client_config",
    "counting_sends",
    "error_code",
    "install_retry_policy",
    "open_client",
    "translate",
]

logger = logging.getLogger("fastcheckpoint.stores")

_THROTTLING = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "ProvisionedThroughputExceededException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "TransactionInProgressException",
    }
)
_PERMISSION = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidClientTokenId",
        "MissingAuthenticationToken",
    }
)
_MISSING = frozenset({"NoSuchBucket", "ResourceNotFoundException"})


@dataclass(frozen=True)
class AwsEndpoint:
    """Where a client connects. ``endpoint_url`` is for emulators and S3-compatible services.

    A malformed ``endpoint_url`` is refused here, when the store is built: the client is built
    on first use, and botocore refuses it only then (or as it signs the first request) with a
    ``ValueError``.
    """

    region: str | None = None
    endpoint_url: str | None = None

    def __post_init__(self) -> None:
        if self.endpoint_url:
            _check_endpoint_url(self.endpoint_url)

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> AwsEndpoint:
        """``region`` and ``endpoint_url`` from a store URL's query (other keys are the store's)."""
        return cls(region=query.get("region") or None,
                   endpoint_url=query.get("endpoint_url") or None)


def _check_endpoint_url(url: str) -> None:
    """What botocore checks when it builds a client, and a port it can sign requests for."""
    if not url.startswith(("http://", "https://")):
        raise ConfigurationError(f"endpoint_url must start with http:// or https://, got {url!r}")
    try:
        urlsplit(url).port  # noqa: B018 - raises ValueError on a port out of range or not a number
        valid = bool(is_valid_endpoint_url(url) or is_valid_ipv6_endpoint_url(url))
    except ValueError:
        valid = False
    if not valid:
        raise ConfigurationError(
            f"endpoint_url is not a valid URL (http://host:port), got {url!r}")


def client_config(*, path_style: bool = False, pool_size: int = 50) -> Config:
    """The botocore config every client gets; retries are then set by the policy handler.
    Its sends are counted (see :func:`counting_sends`) where aiobotocore lets the HTTP
    session be chosen."""
    options: dict[str, Any] = {}
    if _SESSION_CLASS_CHOSEN:
        options["http_session_cls"] = _CountingSession
    config: Config = AioConfig(
        retries={"mode": "standard"},
        connect_timeout=5,
        read_timeout=30,
        max_pool_connections=pool_size,
        s3={"addressing_style": "path"} if path_style else None,
        **options,
    )
    return config


@dataclass
class Sends:
    """The sends of the requests made inside :func:`counting_sends`: every attempt botocore
    makes and every resend aiohttp makes on a dropped connection. Stays 0 with a client this
    module did not build (a client given to a store): unknown."""

    count: int = 0
    """Sends."""
    answered: int = 0
    """Sends whose answer was heard: any status but 500, 502 and 504 (a service or a gateway
    may give those for a request that was applied)."""

    @property
    def resent(self) -> bool:
        """Whether a request was sent again after a send that may have been applied without
        its answer being heard (a lost reply). A retry after ``SlowDown`` is not: heard."""
        return self.count > 1 and self.answered < self.count


_SENDS: ContextVar[Sends | None] = ContextVar("fastcheckpoint_aws_sends", default=None)


@contextlib.contextmanager
def counting_sends() -> Iterator[Sends]:
    """Count the sends of the requests this task makes inside the ``with`` block (a task
    started meanwhile counts into it too; other tasks do not)."""
    sends = Sends()
    token = _SENDS.set(sends)
    try:
        yield sends
    finally:
        _SENDS.reset(token)


async def _on_headers_sent(
    session: aiohttp.ClientSession, context: Any, params: aiohttp.TraceRequestHeadersSentParams
) -> None:
    sends = _SENDS.get()
    if sends is not None:
        sends.count += 1


_MAYBE_APPLIED = frozenset({500, 502, 504})


async def _on_answer(
    session: aiohttp.ClientSession,
    context: Any,
    params: aiohttp.TraceRequestEndParams | aiohttp.TraceRequestRedirectParams,
) -> None:
    sends = _SENDS.get()
    if sends is not None and params.response.status not in _MAYBE_APPLIED:
        sends.answered += 1


def _send_trace() -> aiohttp.TraceConfig:
    trace = aiohttp.TraceConfig()
    # Once per send: a request's headers go out again with each resend, and each retry.
    trace.on_request_headers_sent.append(_on_headers_sent)
    # Once per answer heard: a resend on a dropped connection is answered once, for two sends.
    trace.on_request_end.append(_on_answer)
    trace.on_request_redirect.append(_on_answer)  # a redirect followed: answered, not applied
    trace.freeze()
    return trace


_SEND_TRACE = _send_trace()


class _CountingSession(AIOHTTPSession):
    """aiobotocore's HTTP session, its aiohttp sessions traced to count sends."""

    async def _get_session(self, proxy_url: Any) -> aiohttp.ClientSession:
        # Not in aiobotocore's type stubs: a release without it never calls this override.
        session: aiohttp.ClientSession = await super()._get_session(proxy_url)  # type: ignore[misc]
        if _SEND_TRACE not in session.trace_configs:
            session.trace_configs.append(_SEND_TRACE)
        return session


# Older aiobotocore releases build their own HTTP session: sends are then not counted.
_SESSION_CLASS_CHOSEN = "http_session_cls" in inspect.signature(AioConfig).parameters and (
    callable(getattr(AIOHTTPSession, "_get_session", None))
)


class _PolicyRetryHandler:
    """botocore decides *whether* to retry; :class:`RetryPolicy` decides *how long* to wait."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy
        self._conditions = AioStandardRetryConditions(max_attempts=policy.max_retries + 1)
        self._adapter = RetryEventAdapter()

    async def needs_retry(self, **kwargs: Any) -> float | None:
        context = self._adapter.create_retry_context(**kwargs)
        if not await self._conditions.is_retryable(context):
            return None
        delay = self._policy.delay(context.attempt_number - 1)
        logger.debug(
            "retrying %s after %.3f s (attempt %d)",
            kwargs["operation"].name,
            delay,
            context.attempt_number,
        )
        return delay


def install_retry_policy(client: Any, policy: RetryPolicy) -> None:
    """Replace a client's standard-mode backoff with ``policy`` (same retryable conditions)."""
    events = client.meta.events
    service = client.meta.service_model.service_id.hyphenize()
    events.unregister(f"needs-retry.{service}", unique_id=f"retry-config-{service}")
    events.register(
        f"needs-retry.{service}",
        _PolicyRetryHandler(policy).needs_retry,
        unique_id=f"fastcheckpoint-retry-{service}",
    )


async def open_client(
    stack: contextlib.AsyncExitStack,
    service: str,
    endpoint: AwsEndpoint,
    retry: RetryPolicy,
    *,
    session: AioSession | None = None,
) -> Any:
    """A client owned by ``stack`` (closed when the stack closes), with ``retry`` installed.

    Path-style addressing is used whenever ``endpoint_url`` is set: emulators and most
    S3-compatible services do not resolve bucket subdomains.
    """
    session = session or get_session()
    config = client_config(path_style=endpoint.endpoint_url is not None)
    try:
        creator = session.create_client(
            service,  # type: ignore[call-overload]
            region_name=endpoint.region,
            endpoint_url=endpoint.endpoint_url,
            config=config,
        )
        client = await stack.enter_async_context(creator)
    except NoRegionError as exc:
        raise ConfigurationError(
            f"no AWS region for {service}: add ?region=... to the store URL "
            "or set AWS_REGION / AWS_DEFAULT_REGION"
        ) from exc
    except BotoCoreError as exc:
        raise ConfigurationError(f"cannot build an AWS {service} client: {exc}") from exc
    install_retry_policy(client, retry)
    return client


def error_code(exc: BaseException) -> str:
    """The service's error code of a ``ClientError`` (``""`` for anything else)."""
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def http_status(exc: BaseException) -> int:
    if isinstance(exc, ClientError):
        metadata = exc.response.get("ResponseMetadata", {})
        return int(metadata.get("HTTPStatusCode", 0) or 0)
    return 0


def translate(exc: BaseException, action: str) -> CheckpointError:
    """Our error for a botocore failure while doing ``action`` (e.g. "S3 PutObject s3://b/k").

    Callers ``raise translate(exc, ...) from exc`` so the driver's exception stays chained.
    """
    if isinstance(exc, CheckpointError):
        return exc
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return ConfigurationError(
            f"{action}: no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or run where an instance or task role is available"
        )
    if isinstance(
        exc, (BotoConnectionError, ConnectionClosedError, ReadTimeoutError, HTTPClientError)
    ):
        return StoreUnavailableError(f"{action}: cannot reach the endpoint after retries: {exc}")
    code = error_code(exc)
    status = http_status(exc)
    if code in _THROTTLING or status in (500, 502, 503, 504):
        return StoreUnavailableError(
            f"{action}: the service is throttling or failing ({code or status}) after retries; "
            "lower the request rate or raise the retry policy's max_retries"
        )
    if code in _PERMISSION or status == 403:
        return StoreError(
            f"{action}: permission denied ({code or status}); grant the actions listed in the "
            "store's IAM policy (stores/ in the repository) to these credentials"
        )
    if code in _MISSING:
        return ConfigurationError(
            f"{action}: {code}: the bucket or table does not exist; create it with "
            "`fastcheckpoint init URL` or the store's provision()"
        )
    return StoreError(f"{action}: {exc}")


@dataclass
class RequestCounter:
    """Counts the HTTP requests a client sends (every attempt, retries included).

    ``counts`` maps operation names (``PutObject``, ``Query``...) to how many were sent.
    """

    counts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def reset(self) -> None:
        self.counts.clear()

    def _on_request(self, **kwargs: Any) -> None:
        name = str(kwargs.get("operation_name", "?"))
        self.counts[name] = self.counts.get(name, 0) + 1

    @classmethod
    @contextlib.contextmanager
    def attached(cls, client: Any) -> Iterator[RequestCounter]:
        """Count what ``client`` sends inside the ``with`` block."""
        counter = cls()
        # "request-created" fires once per attempt (botocore rebuilds the request to retry).
        client.meta.events.register("request-created", counter._on_request)
        try:
            yield counter
        finally:
            client.meta.events.unregister("request-created", counter._on_request)
