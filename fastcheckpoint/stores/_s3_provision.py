"""Provisioning of an S3 bucket for a store: the bucket, versioning, default encryption and
the store's lifecycle rules, created or completed idempotently, never recreated.

Shared by the S3 store (checkpoints) and the DynamoDB store (large payloads). Each step
returns one line for people: ``"created ..."``, ``"enabled ..."``, ``"updated ..."``,
``"removed ..."`` or ``"found ..."`` (in place already). Several runs at once all succeed:
each step is tried again while S3 says another request is changing the bucket. Several
stores share a bucket under prefixes of their own: each rule's id names its prefix
(:func:`rule_id`), so a store's rules never replace another's.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from typing import Any, Final, TypeVar

import anyio
from botocore.exceptions import BotoCoreError, ClientError

from fastcheckpoint._config import pauses_within
from fastcheckpoint.stores._aws import error_code, translate

__all__ = ["own_rules", "provision_bucket", "rule_id"]

_T = TypeVar("_T")

_PATIENCE: Final = 60.0
"""Seconds a step is tried again while S3 answers that a conflicting operation is under way."""
_FIRST_PAUSE: Final = 0.1
_LONGEST_PAUSE: Final = 2.0
_SETTLE: Final = 1.0
"""Seconds after writing the lifecycle rules before they are read back."""
_RECHECKS: Final = 3
"""Read-backs at most (each merging our rules in again if they were dropped)."""
_ID_HEAD: Final = 64
"""Characters of the prefix a rule id shows; its digest tells prefixes apart."""
_ID_DIGEST: Final = 16
"""Hex digits of the prefix's SHA-256 in a rule id."""


def rule_id(name: str, prefix: str) -> str:
    """The id of the lifecycle rule ``name`` of the store under ``prefix``.

    ``name`` itself for the empty prefix (the id all stores used before, so those rules stay
    as they are); else ``name``, the prefix's first 64 characters with each run of characters
    other than ``A-Z a-z 0-9 . _ -`` as one ``-``, and 16 hex digits of the SHA-256 of the
    whole prefix: one id per (rule, prefix), readable, well under S3's 255 characters."""
    if not prefix:
        return name
    head = re.sub(r"[^A-Za-z0-9._-]+", "-", prefix).strip("-")[:_ID_HEAD]
    digest = hashlib.sha256(prefix.encode("utf-8")).hexdigest()[:_ID_DIGEST]
    return "-".join(part for part in (name, head, digest) if part)


def own_rules(names: Iterable[str], prefix: str) -> set[tuple[str, str]]:
    """Each ``(id, prefix)`` under which a rule of ``names`` of the store under ``prefix`` may
    be on a bucket: its :func:`rule_id`, and its name, the id before ids named the prefix. A
    rule of that old id filtered on another prefix is another store's, so it is not ours."""
    return {(ident, prefix) for name in names for ident in (name, rule_id(name, prefix))}


async def provision_bucket(
    client: Any,
    bucket: str,
    rules: Sequence[dict[str, Any]],
    *,
    retired: Collection[tuple[str, str]] = (),
) -> list[str]:
    """Make ``bucket`` ready: it exists, keeps versions, encrypts by default (an existing
    default encryption, e.g. KMS, is kept) and holds ``rules`` beside the bucket's other
    lifecycle rules (which are kept). A rule whose ``(id, filter prefix)`` is in ``retired``
    (see :func:`own_rules`) and whose id is not one of ``rules`` is removed."""
    try:
        return [
            await _in_turn(lambda: _bucket(client, bucket)),
            await _in_turn(lambda: _versioning(client, bucket)),
            await _in_turn(lambda: _encryption(client, bucket)),
            *await _in_turn(lambda: _lifecycle(client, bucket, rules, retired)),
        ]
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, f"provisioning S3 bucket {bucket}") from exc


async def _in_turn(step: Callable[[], Awaitable[_T]]) -> _T:
    """Run one step (a look, then the change it needs), again from its look while S3 answers
    ``OperationAborted``: another request is changing the bucket (another provisioning run
    creating it, say) and S3 says to try again once it is done. Each step is idempotent."""
    pauses = pauses_within(_PATIENCE, first=_FIRST_PAUSE, longest=_LONGEST_PAUSE)
    while True:
        try:
            return await step()
        except ClientError as exc:
            pause = next(pauses, None)
            if error_code(exc) != "OperationAborted" or pause is None:
                raise
            await anyio.sleep(pause)


async def _bucket(client: Any, bucket: str) -> str:
    name = f"bucket s3://{bucket}"
    try:
        await client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if error_code(exc) not in ("404", "NoSuchBucket", "NotFound"):
            raise
    else:
        return f"found {name}"
    params: dict[str, Any] = {"Bucket": bucket}
    region = client.meta.region_name
    if region and region != "us-east-1":
        params["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        await client.create_bucket(**params)
    except ClientError as exc:
        if error_code(exc) != "BucketAlreadyOwnedByYou":
            raise
        return f"found {name}"  # created concurrently, by another provisioning run
    return f"created {name}"


async def _versioning(client: Any, bucket: str) -> str:
    current = await client.get_bucket_versioning(Bucket=bucket)
    if current.get("Status") == "Enabled":
        return "found versioning"
    await client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    return "enabled versioning"


async def _encryption(client: Any, bucket: str) -> str:
    try:
        current = await client.get_bucket_encryption(Bucket=bucket)
    except ClientError as exc:
        if error_code(exc) != "ServerSideEncryptionConfigurationNotFoundError":
            raise
    else:
        for rule in current["ServerSideEncryptionConfiguration"].get("Rules", []):
            default = rule.get("ApplyServerSideEncryptionByDefault")
            if default is not None:
                return f"found default encryption {default['SSEAlgorithm']}"
    await client.put_bucket_encryption(
        Bucket=bucket,
        ServerSideEncryptionConfiguration={
            "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
        },
    )
    return "enabled default encryption AES256"


async def _lifecycle(
    client: Any, bucket: str, rules: Sequence[dict[str, Any]],
    retired: Collection[tuple[str, str]],
) -> list[str]:
    """Merge ``rules`` into the bucket's lifecycle configuration; after a write, look again.

    S3 has no conditional write of a lifecycle configuration: two runs with other rules (an
    S3 store and a DynamoDB store's payloads on one bucket) that read it before either wrote
    each write what it read plus its own, and the later write drops the other's rule. So a
    run that wrote reads the rules back after :data:`_SETTLE` seconds, by when a run racing
    it has written too, and merges its own in again if they are gone."""
    done = await _merge_rules(client, bucket, rules, retired)
    wrote = not all(line.startswith("found") for line in done)
    for _ in range(_RECHECKS):
        if not wrote:
            break
        await anyio.sleep(_SETTLE)
        again = await _merge_rules(client, bucket, rules, retired)
        wrote = not all(line.startswith("found") for line in again)
    return done


async def _merge_rules(
    client: Any, bucket: str, rules: Sequence[dict[str, Any]],
    retired: Collection[tuple[str, str]],
) -> list[str]:
    existing = await _rules_of(client, bucket)
    by_id = {rule.get("ID"): rule for rule in existing}
    done: list[str] = []
    for rule in rules:
        found = by_id.get(rule["ID"])
        verb = "created" if found is None else "found" if _echoes(found, rule) else "updated"
        done.append(f"{verb} lifecycle rule {rule['ID']}")
    wanted = {rule["ID"] for rule in rules}
    gone = {name for name, prefix in retired
            if name in by_id and name not in wanted and _prefix_of(by_id[name]) == prefix}
    done += [f"removed lifecycle rule {name}" for name in sorted(gone)]
    if all(line.startswith("found") for line in done):
        return done
    kept = [rule for rule in existing if rule.get("ID") not in wanted | gone]
    await client.put_bucket_lifecycle_configuration(
        Bucket=bucket, LifecycleConfiguration={"Rules": [*kept, *rules]}
    )
    return done


async def _rules_of(client: Any, bucket: str) -> list[dict[str, Any]]:
    try:
        response = await client.get_bucket_lifecycle_configuration(Bucket=bucket)
    except ClientError as exc:
        if error_code(exc) == "NoSuchLifecycleConfiguration":
            return []
        raise
    return [dict(rule) for rule in response.get("Rules", [])]


def _prefix_of(rule: dict[str, Any]) -> str | None:
    """The prefix a rule filters on alone (ours never filter on tags or sizes), else None."""
    scope = rule.get("Filter")
    return scope.get("Prefix") if isinstance(scope, dict) and set(scope) == {"Prefix"} else None


def _echoes(found: Any, wanted: Any) -> bool:
    """Whether a rule as S3 returns it has every setting of ``wanted`` (S3 adds defaults)."""
    if isinstance(wanted, dict):
        return isinstance(found, dict) and all(
            _echoes(found.get(key), value) for key, value in wanted.items()
        )
    return bool(found == wanted)
