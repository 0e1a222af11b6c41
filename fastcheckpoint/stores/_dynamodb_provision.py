"""Provisioning of the DynamoDB store: the table (indexes, TTL) and the bucket (versioning,
encryption, lifecycle rule), created or completed idempotently, never recreated."""

from __future__ import annotations

from typing import Any, Final

from botocore.exceptions import BotoCoreError, ClientError

from fastcheckpoint.errors import ConfigurationError, StoreError
from fastcheckpoint.stores import _dynamodb_layout as layout
from fastcheckpoint.stores._aws import error_code, translate
from fastcheckpoint.stores._s3_provision import own_rules, provision_bucket, rule_id

__all__ = ["LIFECYCLE_RULE", "provision_blob_bucket", "provision_table"]


async def provision_table(client: Any, table: str) -> list[str]:
    action = f"provisioning DynamoDB table {table}"
    try:
        done = [await _table(client, table)]
        waiter = client.get_waiter("table_exists")
        await waiter.wait(TableName=table, WaiterConfig={"Delay": 1, "MaxAttempts": 120})
        done.append(await _provision_ttl(client, table))
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, action) from exc
    return done


async def _table(client: Any, table: str) -> str:
    """Create the table, or check the one found. A table another process creates between our
    look and our CreateTable (``ResourceInUseException``) is looked at again and checked."""
    indexes = [index["IndexName"] for index in layout.TABLE_DEFINITION["GlobalSecondaryIndexes"]]
    for _ in range(2):
        try:
            described = await client.describe_table(TableName=table)
        except ClientError as exc:
            if error_code(exc) != "ResourceNotFoundException":
                raise
        else:
            _check_indexes(table, described["Table"], indexes)
            return f"found table {table} with the indexes {', '.join(indexes)}"
        try:
            await client.create_table(TableName=table, **layout.TABLE_DEFINITION)
        except ClientError as exc:
            if error_code(exc) != "ResourceInUseException":
                raise
            continue  # created meanwhile, by another provisioning run
        return f"created table {table} with the indexes {', '.join(indexes)}"
    raise StoreError(f"table {table} is being created and deleted by someone else meanwhile")


def _check_indexes(table: str, described: dict[str, Any], indexes: list[str]) -> None:
    present = {index["IndexName"] for index in described.get("GlobalSecondaryIndexes", [])}
    missing = sorted(set(indexes) - present)
    if missing:
        raise ConfigurationError(
            f"table {table} exists without the indexes {missing}; add them as in "
            "stores/dynamodb/table.json or use a new table"
        )


async def _provision_ttl(client: Any, table: str) -> str:
    status = await _ttl_status(client, table)
    if status.get("TimeToLiveStatus") not in ("ENABLED", "ENABLING"):
        try:
            await client.update_time_to_live(
                TableName=table,
                TimeToLiveSpecification={"Enabled": True, "AttributeName": layout.TTL_ATTRIBUTE},
            )
        except ClientError as exc:
            # DynamoDB refuses to enable TTL that is on already, or being switched on: another
            # provisioning run did it meanwhile. Look again, and check what it chose.
            if error_code(exc) != "ValidationException":
                raise
            status = await _ttl_status(client, table)
            if status.get("TimeToLiveStatus") not in ("ENABLED", "ENABLING"):
                raise
        else:
            return f"enabled TTL on the attribute {layout.TTL_ATTRIBUTE!r}"
    if status.get("AttributeName") != layout.TTL_ATTRIBUTE:
        raise ConfigurationError(
            f"table {table} has TTL on {status.get('AttributeName')!r}; this store needs "
            f"TTL on {layout.TTL_ATTRIBUTE!r}"
        )
    return f"found TTL on the attribute {layout.TTL_ATTRIBUTE!r}"


async def _ttl_status(client: Any, table: str) -> dict[str, Any]:
    ttl = await client.describe_time_to_live(TableName=table)
    status: dict[str, Any] = ttl.get("TimeToLiveDescription", {})
    return status


LIFECYCLE_RULE: Final[dict[str, Any]] = {
    "ID": "fastcheckpoint-blobs",
    "Status": "Enabled",
    "Filter": {"Prefix": ""},
    # Deleted blobs stay as noncurrent versions under versioning: keep them 30 days for
    # recovery, then let S3 remove them, with the delete markers left behind.
    "NoncurrentVersionExpiration": {"NoncurrentDays": 30},
    "Expiration": {"ExpiredObjectDeleteMarker": True},
    "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
}


async def provision_blob_bucket(client: Any, bucket: str, prefix: str) -> list[str]:
    """The bucket of large payloads, with :data:`LIFECYCLE_RULE` under ``prefix``, by the
    prefix's id (:func:`rule_id`); the rule set under the old fixed id on this prefix goes."""
    name = LIFECYCLE_RULE["ID"]
    rule = {**LIFECYCLE_RULE, "ID": rule_id(name, prefix), "Filter": {"Prefix": prefix}}
    return await provision_bucket(client, bucket, [rule], retired=own_rules([name], prefix))
