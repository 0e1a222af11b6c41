"""AWS plumbing shared by the S3 and DynamoDB stores.

One place for what both backends need from aiobotocore: where to connect (``region``,
``endpoint_url`` from a store URL), clients built with the one retry policy, translation of
botocore's exceptions into ours, counting the HTTP requests a client sends, and blobs in a
bucket (the S3 store's objects and the DynamoDB store's large payloads).

Retries (§3.11). botocore's *standard* mode decides what is transient (throttling codes such
as ``SlowDown`` and ``ProvisionedThroughputExceededException``, 5xx, connection resets and
timeouts); its backoff, however, is hard-wired (base 1 s for throttling, cap 20 s). We keep
botocore's decision and replace only the delay with :meth:`RetryPolicy.delay`, by swapping the
client's ``needs-retry`` handler for one that asks botocore's retry conditions and our policy.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

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

from fastcheckpoint._config import RetryPolicy
from fastcheckpoint.errors import (
    CheckpointError,
    ConfigurationError,
    StoreError,
    StoreUnavailableError,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

__all__ = [
    "DELETE_BATCH",
    "AwsEndpoint",
    "Blobs",
    "RequestCounter",
    "client_config",
    "error_code",
    "install_retry_policy",
    "open_client",
    "translate",
]

logger = logging.getLogger("fastcheckpoint.stores")

DELETE_BATCH = 1000
"""Most keys one ``DeleteObjects`` request takes."""

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
    """Where a client connects. ``endpoint_url`` is for emulators and S3-compatible services."""

    region: str | None = None
    endpoint_url: str | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> AwsEndpoint:
        """``region`` and ``endpoint_url`` from a store URL's query (other keys are the store's)."""
        endpoint_url = query.get("endpoint_url") or None
        if endpoint_url is not None and not endpoint_url.startswith(("http://", "https://")):
            raise ConfigurationError(
                f"endpoint_url must start with http:// or https://, got {endpoint_url!r}"
            )
        return cls(region=query.get("region") or None, endpoint_url=endpoint_url)


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


class Blobs:
    """Objects under one prefix of one bucket: put, get, delete in batches, list.

    Keys passed in are relative to ``prefix``. Missing objects are a normal ``None`` or a
    no-op, whatever the client's flavour of "not found" (aiobotocore raises ``NoSuchKey``;
    some S3-compatible services answer a bare 404).
    """

    def __init__(self, client: S3Client, bucket: str, prefix: str = "") -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix

    def full_key(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.full_key(key)}"

    async def put(
        self,
        key: str,
        body: bytes,
        *,
        metadata: Mapping[str, str] | None = None,
        create_only: bool = False,
    ) -> bool:
        """Write an object; with ``create_only`` return False (writing nothing) if it exists."""
        extra: dict[str, Any] = {}
        if metadata:
            extra["Metadata"] = dict(metadata)
        if create_only:
            extra["IfNoneMatch"] = "*"
        try:
            await self.client.put_object(
                Bucket=self.bucket, Key=self.full_key(key), Body=body, **extra
            )
        except ClientError as exc:
            # 412: another writer created it first. 409 ConditionalRequestConflict: a
            # concurrent conditional write to the same key is in flight; also "taken".
            if create_only and (http_status(exc) in (409, 412) or error_code(exc) in (
                "PreconditionFailed",
                "ConditionalRequestConflict",
            )):
                return False
            raise translate(exc, f"S3 PutObject {self.where(key)}") from exc
        except BotoCoreError as exc:
            raise translate(exc, f"S3 PutObject {self.where(key)}") from exc
        return True

    async def get(self, key: str) -> tuple[bytes, dict[str, str]] | None:
        """``(body, metadata)`` of an object, or None when it does not exist."""
        try:
            response = await self.client.get_object(Bucket=self.bucket, Key=self.full_key(key))
            async with response["Body"] as stream:
                body = await stream.read()
        except ClientError as exc:
            if error_code(exc) in ("NoSuchKey", "404", "NotFound") or http_status(exc) == 404:
                return None
            raise translate(exc, f"S3 GetObject {self.where(key)}") from exc
        except BotoCoreError as exc:
            raise translate(exc, f"S3 GetObject {self.where(key)}") from exc
        return body, dict(response.get("Metadata", {}))

    async def delete(self, keys: Sequence[str]) -> int:
        """Delete objects, 1,000 per request; missing ones are not an error. Returns requests."""
        requests = 0
        for start in range(0, len(keys), DELETE_BATCH):
            chunk = keys[start : start + DELETE_BATCH]
            objects = [{"Key": self.full_key(key)} for key in chunk]
            try:
                response = await self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": cast(Any, objects), "Quiet": True}
                )
            except (ClientError, BotoCoreError) as exc:
                raise translate(exc, f"S3 DeleteObjects in s3://{self.bucket}") from exc
            requests += 1
            errors = response.get("Errors", [])
            if errors:
                first = errors[0]
                raise StoreError(
                    f"S3 DeleteObjects in s3://{self.bucket}: {len(errors)} keys not deleted, "
                    f"first {first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
                )
        return requests

    async def list_page(
        self,
        prefix: str,
        *,
        start_after: str | None = None,
        limit: int = 1000,
        token: str | None = None,
    ) -> tuple[list[str], str | None]:
        """One ``ListObjectsV2`` page of keys (relative to ``self.prefix``) and the next token."""
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": self.full_key(prefix),
            "MaxKeys": min(limit, 1000),
        }
        if token is not None:
            params["ContinuationToken"] = token
        elif start_after is not None:
            params["StartAfter"] = self.full_key(start_after)
        try:
            response = await self.client.list_objects_v2(**params)
        except (ClientError, BotoCoreError) as exc:
            raise translate(exc, f"S3 ListObjectsV2 {self.where(prefix)}") from exc
        cut = len(self.prefix)
        keys = [entry["Key"][cut:] for entry in response.get("Contents", [])]
        next_token = response.get("NextContinuationToken") if response.get("IsTruncated") else None
        return keys, next_token

