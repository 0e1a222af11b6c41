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
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

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
    "client_config",
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
    """The botocore config every client gets; retries are then set by the policy handler."""
    return Config(
        retries={"mode": "standard"},
        connect_timeout=5,
        read_timeout=30,
        max_pool_connections=pool_size,
        s3={"addressing_style": "path"} if path_style else None,
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
