"""S3 objects with ETags, conditions and our error types, and running requests concurrently.

Used by the S3 store (its records; ETags are its compare-and-set tokens) and by the DynamoDB
store (payloads above its threshold). A missing object is always a normal ``None``/``False``,
whatever flavour of "not found" the client raises (aiobotocore's ``NoSuchKey``, a bare 404).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from botocore.exceptions import BotoCoreError, ClientError

from fastcheckpoint.errors import StoreError
from fastcheckpoint.stores._aws import error_code, http_status, translate

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import GetObjectOutputTypeDef

_T = TypeVar("_T")

_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_TAKEN_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})
WIDE = 48
"""Concurrent requests of a batch that may be long (the items nested under a shared item):
just under the pool of 50 connections a client the stores create has."""
PAGE = 1000
"""The most keys one ``ListObjectsV2`` returns."""
DELETE_BATCH = 1000
"""The most keys one ``DeleteObjects`` request takes."""


class Unchanged(enum.Enum):
    """What :meth:`Bucket.get_if_changed` returns for an object that still has the ETag."""

    UNCHANGED = "unchanged"


UNCHANGED: Literal[Unchanged.UNCHANGED] = Unchanged.UNCHANGED


@dataclass(frozen=True)
class Listed:
    key: str  # relative to the store prefix
    etag: str


Found = list[Listed]
"""Keys found by a listing, ascending (an alias: ``Bucket.list`` shadows ``list`` there)."""


def _missing(exc: ClientError) -> bool:
    """The object is not there (the bucket is: a missing bucket is a configuration error)."""
    code = error_code(exc)
    return code != "NoSuchBucket" and (code in _MISSING_CODES or http_status(exc) == 404)


def _identifier(key: str, etag: str) -> dict[str, str]:
    """An object of a ``DeleteObjects`` request, deleted only if it has ``etag`` if given."""
    return {"Key": key, "ETag": etag} if etag else {"Key": key}


def _taken(exc: ClientError) -> bool:
    # 412: the condition failed. 409: a concurrent conditional write to the key is in flight.
    return http_status(exc) in (409, 412) or error_code(exc) in _TAKEN_CODES


class Bucket:
    """One bucket under one key prefix; keys given and returned are relative to the prefix."""

    def __init__(self, client: S3Client, bucket: str, prefix: str) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix

    def where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    async def put(
        self,
        key: str,
        body: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str | None:
        """Write ``body``; the new ETag, or None when the condition did not hold."""
        conditions: dict[str, Any] = {}
        if if_none_match:
            conditions["IfNoneMatch"] = "*"
        if if_match is not None:
            conditions["IfMatch"] = if_match
        try:
            response = await self.client.put_object(
                Bucket=self.bucket, Key=self.prefix + key, Body=body, **conditions
            )
        except ClientError as exc:
            # IfMatch on a key that vanished answers 404: the compare-and-set lost too.
            if conditions and (_taken(exc) or (if_match is not None and _missing(exc))):
                return None
            raise translate(exc, f"S3 PutObject {self.where(key)}") from exc
        except BotoCoreError as exc:
            raise translate(exc, f"S3 PutObject {self.where(key)}") from exc
        return str(response.get("ETag", ""))

    async def get(self, key: str) -> tuple[bytes, str] | None:
        """``(body, etag)`` of an object, or None when it does not exist."""
        found = await self._read(key)
        return None if found is None else (found[0], str(found[1].get("ETag", "")))

    async def get_tail(self, key: str, size: int) -> tuple[bytes, str, bool] | None:
        """``(last bytes, etag, whole)``: at most the last ``size`` bytes of an object (one
        ranged GET), and whether they are all of it; None when it does not exist."""
        found = await self._read(key, f"bytes=-{size}")
        if found is None:
            return None
        body, response = found
        shown = str(response.get("ContentRange", ""))  # "bytes first-last/total"
        return body, str(response.get("ETag", "")), not shown or shown.startswith("bytes 0-")

    async def _read(
        self, key: str, ranged: str | None = None
    ) -> tuple[bytes, GetObjectOutputTypeDef] | None:
        try:
            if ranged is None:
                response = await self.client.get_object(Bucket=self.bucket,
                                                        Key=self.prefix + key)
            else:
                response = await self.client.get_object(Bucket=self.bucket,
                                                        Key=self.prefix + key, Range=ranged)
            async with response["Body"] as stream:
                body = await stream.read()
        except ClientError as exc:
            if _missing(exc):
                return None
            raise translate(exc, f"S3 GetObject {self.where(key)}") from exc
        except BotoCoreError as exc:
            raise translate(exc, f"S3 GetObject {self.where(key)}") from exc
        return body, response

    async def get_if_changed(
        self, key: str, etag: str
    ) -> tuple[bytes, str] | Literal[Unchanged.UNCHANGED] | None:
        """``UNCHANGED`` while the object still has ``etag`` (a 304: no body is sent), else
        what :meth:`get` returns: one request that checks an object and, if it changed,
        reads it."""
        try:
            response = await self.client.get_object(
                Bucket=self.bucket, Key=self.prefix + key, IfNoneMatch=etag
            )
            async with response["Body"] as stream:
                body = await stream.read()
        except ClientError as exc:
            if http_status(exc) == 304 or error_code(exc) in ("304", "NotModified"):
                return UNCHANGED
            if _missing(exc):
                return None
            raise translate(exc, f"S3 GetObject {self.where(key)}") from exc
        except BotoCoreError as exc:
            raise translate(exc, f"S3 GetObject {self.where(key)}") from exc
        return body, str(response.get("ETag", ""))

    async def delete_if(self, key: str, etag: str) -> bool:
        """Delete the object only if it still has ``etag``; whether this call removed it.

        The condition makes removal exact when several workers race for the same object:
        one of them wins, the others see 412 (changed) or 404 (already gone).
        """
        try:
            await self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key, IfMatch=etag)
        except ClientError as exc:
            if _taken(exc) or _missing(exc):
                return False
            raise translate(exc, f"S3 DeleteObject {self.where(key)}") from exc
        except BotoCoreError as exc:
            raise translate(exc, f"S3 DeleteObject {self.where(key)}") from exc
        return True

    async def delete(self, keys: Sequence[str]) -> None:
        """Delete objects, 1,000 per ``DeleteObjects`` request; missing ones are no error."""
        await self.delete_listed([Listed(key, "") for key in keys])

    async def delete_listed(self, listed: Sequence[Listed]) -> None:
        """Delete objects each only if it still has the ETag listed (an ETag per object in
        ``DeleteObjects``, 1,000 per request; an empty ETag: unconditionally). One changed
        or gone since it was listed is left: it is not the object listed."""
        unique = list({entry.key: entry for entry in listed}.values())
        for start in range(0, len(unique), DELETE_BATCH):
            objects = [_identifier(self.prefix + entry.key, entry.etag)
                       for entry in unique[start : start + DELETE_BATCH]]
            try:
                response = await self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": cast(Any, objects), "Quiet": True}
                )
            except (ClientError, BotoCoreError) as exc:
                raise translate(exc, f"S3 DeleteObjects in s3://{self.bucket}") from exc
            errors = [error for error in response.get("Errors", [])
                      if str(error.get("Code")) not in _TAKEN_CODES | _MISSING_CODES]
            if errors:
                first = errors[0]
                raise StoreError(
                    f"S3 DeleteObjects in s3://{self.bucket}: {len(errors)} keys not deleted, "
                    f"first {first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
                )

    async def list(
        self, prefix: str, *, start_after: str | None = None, limit: int | None = None
    ) -> list[Listed]:
        """Keys under ``prefix`` in ascending order, every page (or the first ``limit``)."""
        if limit is None:
            return (await self.scan(prefix, start_after=start_after))[0]
        found, _ = await self.scan(
            prefix,
            start_after=start_after,
            first=limit,
            until=lambda found: len(found) >= limit,
        )
        return found[:limit]

    async def scan(
        self,
        prefix: str,
        *,
        start_after: str | None = None,
        first: int = PAGE,
        until: Callable[[Found], bool] | None = None,
    ) -> tuple[Found, bool]:
        """Keys under ``prefix`` in ascending order, page by page, and whether the listing
        ended. The first page asks for ``first`` keys (a reader that needs the newest few
        pays for a few), later ones for 1,000; it stops early once ``until(found)`` holds."""
        found: Found = []
        token: str | None = None
        cut = len(self.prefix)
        size = max(1, min(PAGE, first))
        while True:
            params: dict[str, Any] = {
                "Bucket": self.bucket,
                "Prefix": self.prefix + prefix,
                "MaxKeys": size,
            }
            if token is not None:
                params["ContinuationToken"] = token
            elif start_after is not None:
                params["StartAfter"] = self.prefix + start_after
            try:
                response = await self.client.list_objects_v2(**params)
            except (ClientError, BotoCoreError) as exc:
                raise translate(exc, f"S3 ListObjectsV2 {self.where(prefix)}") from exc
            found.extend(
                Listed(entry["Key"][cut:], str(entry.get("ETag", "")))
                for entry in response.get("Contents", [])
            )
            token = response.get("NextContinuationToken") if response.get("IsTruncated") else None
            if token is None:
                return found, True
            if until is not None and until(found):
                return found, False
            size = PAGE


